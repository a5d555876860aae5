//! Compilation of fwrule rules plus a VM directory into one rule set per vnic.
//!
//! Semantics (fwadm's, see `specs/fwrule.md` §3–4):
//! * A rule applies to a VM named on either side (`vm`, `tag`, `tag = value`, `all vms`);
//!   `ip`/`subnet` targets are literal addresses and never name a VM. Rules with an owner only
//!   apply to, and only resolve, that owner's VMs; global rules see every VM.
//! * A VM on the TO side gets an **inbound** filter matching the packet's source against the
//!   FROM side; a VM on the FROM side gets an **outbound** filter matching the destination
//!   against the TO side. Ports and ICMP types always describe the destination (the TO side's
//!   service).
//! * Order is fwrule precedence: priority descending; at equal priority the action against the
//!   default wins (inbound ALLOW before BLOCK, outbound BLOCK before ALLOW); first match wins.
//!   Priority-0 inbound BLOCKs and outbound ALLOWs equal the default and are dropped.
//! * Every address a rule resolves to is taken **on the vnic's VNI only**: a VM's addresses on
//!   other VNIs never appear, so tenants reusing the same addresses on their own overlays never
//!   match each other's rules. Literal addresses and `any` only ever see packets of the vnic's
//!   own VNI, because a rule set belongs to one vnic and conntrack keys carry the VNI.
//! * Defaults: inbound denied, outbound allowed; a vnic whose VM has `firewall_enabled = false`
//!   gets an unfiltered rule set that allows everything without state.
//!
//! The result, [`VnicRuleSet`], is immutable and cheap to share (`Arc`). Rules are bucketed
//! per direction and protocol, in precedence order, and each bucket carries a bit-vector index
//! over (service, peer address) (see `index.rs`): a first-packet classification is two binary
//! searches and an AND of two bit sets, O(log n + n/64), not a walk over the rules.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::index::{first_common, Dimension};
use super::rule::{
    Action, FwRule, IcmpTarget, ParseOptions, PortTarget, ProtoTargets, Protocol, RuleError, Side,
    Wildcard,
};

/// One address of a VM, on one overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmAddress {
    /// The VXLAN network identifier (24 bits).
    pub vni: u32,
    /// The address on that network.
    pub ip: IpAddr,
}

/// A VM (container) as the firewall sees it: local or remote, it is resolved the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    /// VM UUID (lower case).
    pub uuid: String,
    /// Owner account UUID.
    pub owner_uuid: String,
    /// Tags; values are compared as strings (`true` matches `"true"`).
    #[serde(default, deserialize_with = "tags_as_strings")]
    pub tags: BTreeMap<String, String>,
    /// Whether the VM's own traffic is filtered (rules still resolve its addresses either way).
    #[serde(default)]
    pub firewall_enabled: bool,
    /// Every address of every NIC.
    #[serde(default)]
    pub ips: Vec<VmAddress>,
}

fn tags_as_strings<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: BTreeMap<String, serde_json::Value> = BTreeMap::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let s = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, s)
        })
        .collect())
}

/// A stored rule, in FWAPI's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleRecord {
    /// Rule UUID.
    pub uuid: String,
    /// Owner; absent for a global rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uuid: Option<String>,
    /// Applies to every owner's VMs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub global: bool,
    /// Disabled rules are kept but never compiled (FWAPI's default is disabled).
    #[serde(default)]
    pub enabled: bool,
    /// The rule text.
    pub rule: String,
}

/// The whole firewall input: VM directory and rules (the `fw apply` document).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallState {
    /// Every VM, local and remote.
    #[serde(default)]
    pub vms: Vec<VmRecord>,
    /// Every rule.
    #[serde(default)]
    pub rules: Vec<RuleRecord>,
}

/// Why a firewall state was rejected; the whole state is rejected and the old one stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A rule's text is invalid.
    #[error("rule {uuid}: {source}")]
    Rule {
        /// The rule's UUID.
        uuid: String,
        /// What was wrong with its text.
        source: RuleError,
    },
    /// A rule has both or neither of `owner_uuid` and `global`.
    #[error("rule {uuid}: {what}")]
    Scope {
        /// The rule's UUID.
        uuid: String,
        /// What was wrong.
        what: &'static str,
    },
    /// A UUID field is not a lower-case UUID.
    #[error("{field} {value:?} is not a lower-case UUID")]
    BadUuid {
        /// Which field.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// Two VMs or two rules share a UUID.
    #[error("duplicate {what} UUID {uuid}")]
    Duplicate {
        /// "vm" or "rule".
        what: &'static str,
        /// The UUID.
        uuid: String,
    },
    /// A VNI does not fit in 24 bits.
    #[error("vm {uuid}: VNI {vni} does not fit in 24 bits")]
    BadVni {
        /// The VM.
        uuid: String,
        /// The VNI given.
        vni: u32,
    },
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// A rule after validation: record plus model.
#[derive(Debug, Clone)]
pub struct ParsedRule {
    /// Rule UUID.
    pub uuid: String,
    /// Owner (None: global).
    pub owner: Option<String>,
    /// The model.
    pub rule: FwRule,
    /// Canonical text (for listings).
    pub text: String,
}

/// A validated firewall state, ready to compile per vnic.
#[derive(Debug, Clone, Default)]
pub struct Firewall {
    vms: Vec<VmRecord>,
    by_uuid: BTreeMap<String, usize>,
    rules: Vec<ParsedRule>,
}

impl Firewall {
    /// Validates a state as FWAPI would (current language, subnet masks enforced, exactly one
    /// of `owner_uuid`/`global`). Disabled rules are validated and then left out.
    pub fn new(state: &FirewallState) -> Result<Firewall, StateError> {
        let opts = ParseOptions {
            max_version: None,
            enforce_subnet_mask: true,
        };
        let mut by_uuid = BTreeMap::new();
        for (i, vm) in state.vms.iter().enumerate() {
            for (field, value) in [("vm uuid", &vm.uuid), ("vm owner_uuid", &vm.owner_uuid)] {
                if !is_uuid(value) {
                    return Err(StateError::BadUuid {
                        field,
                        value: value.clone(),
                    });
                }
            }
            if let Some(a) = vm.ips.iter().find(|a| a.vni >= 1 << 24) {
                return Err(StateError::BadVni {
                    uuid: vm.uuid.clone(),
                    vni: a.vni,
                });
            }
            if by_uuid.insert(vm.uuid.clone(), i).is_some() {
                return Err(StateError::Duplicate {
                    what: "vm",
                    uuid: vm.uuid.clone(),
                });
            }
        }
        let mut rules = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for r in &state.rules {
            if !is_uuid(&r.uuid) {
                return Err(StateError::BadUuid {
                    field: "rule uuid",
                    value: r.uuid.clone(),
                });
            }
            if !seen.insert(r.uuid.clone()) {
                return Err(StateError::Duplicate {
                    what: "rule",
                    uuid: r.uuid.clone(),
                });
            }
            let owner = match (&r.owner_uuid, r.global) {
                (Some(_), true) => {
                    return Err(StateError::Scope {
                        uuid: r.uuid.clone(),
                        what: "cannot specify both global and owner_uuid",
                    })
                }
                (None, false) => {
                    return Err(StateError::Scope {
                        uuid: r.uuid.clone(),
                        what: "owner_uuid required (or global: true)",
                    })
                }
                (Some(o), false) => {
                    if !is_uuid(o) {
                        return Err(StateError::BadUuid {
                            field: "rule owner_uuid",
                            value: o.clone(),
                        });
                    }
                    Some(o.clone())
                }
                (None, true) => None,
            };
            let rule = FwRule::create(&r.rule, &opts).map_err(|source| StateError::Rule {
                uuid: r.uuid.clone(),
                source,
            })?;
            if r.enabled {
                let text = rule.text();
                rules.push(ParsedRule {
                    uuid: r.uuid.clone(),
                    owner,
                    rule,
                    text,
                });
            }
        }
        rules.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        Ok(Firewall {
            vms: state.vms.clone(),
            by_uuid,
            rules,
        })
    }

    /// The enabled rules, by UUID.
    pub fn rules(&self) -> &[ParsedRule] {
        &self.rules
    }

    /// A VM by UUID.
    pub fn vm(&self, uuid: &str) -> Option<&VmRecord> {
        self.by_uuid.get(uuid).map(|&i| &self.vms[i])
    }

    /// Compiles the rule set of the vnic of VM `vm_uuid` on `vni`. `generation` identifies this
    /// compilation (the caller increments it on every change) so that conntrack entries made
    /// under an older rule set get re-checked. An unknown VM gets a rule set denying inbound
    /// and allowing outbound (the defaults).
    pub fn compile_vnic(&self, vm_uuid: &str, vni: u32, generation: u64) -> VnicRuleSet {
        let Some(vm) = self.vm(vm_uuid) else {
            return VnicRuleSet::empty(vm_uuid, vni, generation, true);
        };
        if !vm.firewall_enabled {
            return VnicRuleSet::empty(vm_uuid, vni, generation, false);
        }
        let mut metas = Vec::new();
        let mut inbound: Vec<(u8, u8, CompiledRule)> = Vec::new();
        let mut outbound: Vec<(u8, u8, CompiledRule)> = Vec::new();
        for pr in &self.rules {
            if pr.owner.as_deref().is_some_and(|o| o != vm.owner_uuid) {
                continue;
            }
            let r = &pr.rule;
            let scope = |v: &&VmRecord| pr.owner.as_deref().is_none_or(|o| o == v.owner_uuid);
            for dir in [Direction::Ingress, Direction::Egress] {
                let (local_side, peer_side) = match dir {
                    Direction::Ingress => (&r.to, &r.from),
                    Direction::Egress => (&r.from, &r.to),
                };
                if !side_names_vm(local_side, vm) {
                    continue;
                }
                let no_op = r.priority == 0
                    && matches!(
                        (dir, r.action),
                        (Direction::Ingress, Action::Block) | (Direction::Egress, Action::Allow)
                    );
                if no_op {
                    continue;
                }
                let peers = self.resolve(peer_side, vni, &scope);
                if peers.is_empty() {
                    continue;
                }
                let id = RuleId(metas.len() as u32);
                metas.push(RuleMeta {
                    uuid: pr.uuid.clone(),
                    text: pr.text.clone(),
                    direction: dir,
                    action: r.action,
                    priority: r.priority,
                });
                let compiled = CompiledRule {
                    id,
                    action: r.action,
                    protocol: r.protocol,
                    ports: match &r.targets {
                        ProtoTargets::Ports(ps) => {
                            if ps.contains(&PortTarget::All) {
                                PortMatch::All
                            } else {
                                PortMatch::Ranges(
                                    ps.iter()
                                        .map(|p| match *p {
                                            PortTarget::Port(n) => (n, n),
                                            PortTarget::Range { start, end } => (start, end),
                                            PortTarget::All => (0, u16::MAX),
                                        })
                                        .collect(),
                                )
                            }
                        }
                        ProtoTargets::Types(ts) => {
                            if ts.contains(&IcmpTarget::All) {
                                PortMatch::All
                            } else {
                                PortMatch::Icmp(ts.clone().into_boxed_slice())
                            }
                        }
                        ProtoTargets::All => PortMatch::All,
                    },
                    peers,
                };
                // Rank: priority descending, then the action against the default first.
                let against_default = match (dir, r.action) {
                    (Direction::Ingress, Action::Allow) | (Direction::Egress, Action::Block) => 0,
                    _ => 1,
                };
                let entry = (100 - r.priority, against_default, compiled);
                match dir {
                    Direction::Ingress => inbound.push(entry),
                    Direction::Egress => outbound.push(entry),
                }
            }
        }
        // Stable: equal ranks keep rule-UUID order, so compilation is deterministic.
        inbound.sort_by_key(|e| (e.0, e.1));
        outbound.sort_by_key(|e| (e.0, e.1));
        let bucket = |list: Vec<(u8, u8, CompiledRule)>| -> [Bucket; PROTOCOLS] {
            let mut b: [Vec<CompiledRule>; PROTOCOLS] = Default::default();
            for (_, _, c) in list {
                b[proto_index(c.protocol)].push(c);
            }
            b.map(|rules| Bucket::new(&rules))
        };
        let hits = (0..metas.len()).map(|_| AtomicU64::new(0)).collect();
        VnicRuleSet {
            vm_uuid: vm_uuid.to_string(),
            vni,
            generation,
            filtered: true,
            inbound: bucket(inbound),
            outbound: bucket(outbound),
            rules: metas.into_boxed_slice(),
            hits,
        }
    }

    /// Addresses of a side, on `vni`, with VM targets resolved within `scope`.
    fn resolve(&self, side: &Side, vni: u32, scope: &dyn Fn(&&VmRecord) -> bool) -> PeerSet {
        let mut set = PeerSetBuilder::default();
        if side.is_any() {
            return PeerSet::any();
        }
        for ip in &side.ips {
            set.add_ip(ip.addr);
        }
        for n in &side.subnets {
            set.add_net(n.addr, n.prefix);
        }
        if side.names_vms() {
            for vm in self.vms.iter().filter(scope) {
                if side_names_vm(side, vm) {
                    for a in vm.ips.iter().filter(|a| a.vni == vni) {
                        set.add_ip(a.ip);
                    }
                }
            }
        }
        set.build()
    }
}

/// Whether a side names this VM (by UUID, by tag, or `all vms`); owner scope is the caller's.
fn side_names_vm(side: &Side, vm: &VmRecord) -> bool {
    side.wildcards.contains(&Wildcard::AllVms)
        || side.vms.contains(&vm.uuid)
        || side
            .tags
            .iter()
            .any(|t| match (&t.value, vm.tags.get(&t.name)) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(want), Some(have)) => want == have,
            })
}

/// Which way a packet crosses the vnic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Towards the VM (delivered to the vnic): inbound rules apply.
    Ingress,
    /// From the VM (sent by the vnic): outbound rules apply.
    Egress,
}

/// Index of a rule in its [`VnicRuleSet`] (valid for that rule set's generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RuleId(pub u32);

/// What a compiled rule came from (for listings and counters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleMeta {
    /// The rule's UUID.
    pub uuid: String,
    /// Its canonical text.
    pub text: String,
    /// Which direction this compiled entry filters.
    pub direction: Direction,
    /// Its action.
    pub action: Action,
    /// Its priority.
    pub priority: u8,
}

const PROTOCOLS: usize = 6;

fn proto_index(p: Protocol) -> usize {
    match p {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
        Protocol::Icmp => 2,
        Protocol::Icmp6 => 3,
        Protocol::Ah => 4,
        Protocol::Esp => 5,
    }
}

#[derive(Debug, Clone)]
enum PortMatch {
    All,
    Ranges(Box<[(u16, u16)]>),
    Icmp(Box<[IcmpTarget]>),
}

/// A set of peer addresses: `any`, or sorted addresses and subnets per family.
#[derive(Debug, Clone, Default)]
struct PeerSet {
    any: bool,
    v4: Box<[u32]>,
    v6: Box<[u128]>,
    nets4: Box<[(u32, u32)]>,
    nets6: Box<[(u128, u128)]>,
}

impl PeerSet {
    fn any() -> Self {
        PeerSet {
            any: true,
            ..Default::default()
        }
    }

    fn is_empty(&self) -> bool {
        !self.any
            && self.v4.is_empty()
            && self.v6.is_empty()
            && self.nets4.is_empty()
            && self.nets6.is_empty()
    }
}

#[derive(Default)]
struct PeerSetBuilder {
    v4: Vec<u32>,
    v6: Vec<u128>,
    nets4: Vec<(u32, u32)>,
    nets6: Vec<(u128, u128)>,
}

impl PeerSetBuilder {
    fn add_ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => self.v4.push(u32::from(a)),
            IpAddr::V6(a) => self.v6.push(u128::from(a)),
        }
    }

    fn add_net(&mut self, addr: IpAddr, prefix: u8) {
        match addr {
            IpAddr::V4(a) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(prefix.min(32)))
                };
                self.nets4.push((u32::from(a) & m, m));
            }
            IpAddr::V6(a) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(prefix.min(128)))
                };
                self.nets6.push((u128::from(a) & m, m));
            }
        }
    }

    fn build(mut self) -> PeerSet {
        self.v4.sort_unstable();
        self.v4.dedup();
        self.v6.sort_unstable();
        self.v6.dedup();
        self.nets4.sort_unstable();
        self.nets4.dedup();
        self.nets6.sort_unstable();
        self.nets6.dedup();
        PeerSet {
            any: false,
            v4: self.v4.into(),
            v6: self.v6.into(),
            nets4: self.nets4.into(),
            nets6: self.nets6.into(),
        }
    }
}

#[derive(Debug, Clone)]
struct CompiledRule {
    id: RuleId,
    action: Action,
    protocol: Protocol,
    ports: PortMatch,
    peers: PeerSet,
}

/// The rules of one (direction, protocol), in precedence order, with their index.
#[derive(Debug, Clone)]
struct Bucket {
    rules: Box<[(RuleId, Action)]>,
    words: usize,
    service: Dimension<u16>,
    v4: Dimension<u32>,
    v6: Dimension<u128>,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket::new(&[])
    }
}

impl Bucket {
    fn new(rules: &[CompiledRule]) -> Self {
        let words = rules.len().div_ceil(64);
        let full16 = vec![(0u16, u16::MAX)];
        let service: Vec<Vec<(u16, u16)>> = rules
            .iter()
            .map(|r| match &r.ports {
                PortMatch::All => full16.clone(),
                PortMatch::Ranges(rs) => rs.to_vec(),
                PortMatch::Icmp(ts) => ts
                    .iter()
                    .map(|t| match *t {
                        IcmpTarget::All => (0, u16::MAX),
                        IcmpTarget::Type(x) => (u16::from(x) << 8, u16::from(x) << 8 | 0xff),
                        IcmpTarget::TypeCode(x, c) => {
                            let v = u16::from(x) << 8 | u16::from(c);
                            (v, v)
                        }
                    })
                    .collect(),
            })
            .collect();
        let v4: Vec<Vec<(u32, u32)>> = rules
            .iter()
            .map(|r| {
                if r.peers.any {
                    return vec![(0, u32::MAX)];
                }
                r.peers
                    .v4
                    .iter()
                    .map(|&a| (a, a))
                    .chain(r.peers.nets4.iter().map(|&(n, m)| (n, n | !m)))
                    .collect()
            })
            .collect();
        let v6: Vec<Vec<(u128, u128)>> = rules
            .iter()
            .map(|r| {
                if r.peers.any {
                    return vec![(0, u128::MAX)];
                }
                r.peers
                    .v6
                    .iter()
                    .map(|&a| (a, a))
                    .chain(r.peers.nets6.iter().map(|&(n, m)| (n, n | !m)))
                    .collect()
            })
            .collect();
        Bucket {
            rules: rules.iter().map(|r| (r.id, r.action)).collect(),
            words,
            service: Dimension::build(&service, words),
            v4: Dimension::build(&v4, words),
            v6: Dimension::build(&v6, words),
        }
    }

    /// The first rule (in precedence order) matching the packet.
    #[inline]
    fn first_match(&self, proto: Protocol, q: &RuleQuery) -> Option<(RuleId, Action)> {
        if self.rules.is_empty() {
            return None;
        }
        let svc = match proto {
            Protocol::Icmp | Protocol::Icmp6 => u16::from(q.icmp.0) << 8 | u16::from(q.icmp.1),
            _ => q.dst_port,
        };
        let s = self.service.row(svc, self.words);
        let p = match q.peer {
            IpAddr::V4(a) => self.v4.row(u32::from(a), self.words),
            IpAddr::V6(a) => self.v6.row(u128::from(a), self.words),
        };
        first_common(s, p).and_then(|r| self.rules.get(r).copied())
    }

    fn bytes(&self) -> usize {
        self.service.bytes() + self.v4.bytes() + self.v6.bytes() + self.rules.len() * 8
    }
}

/// What the rule set needs to know about a packet (or a flow's first packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleQuery {
    /// The peer's address: the source for ingress, the destination for egress.
    pub peer: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// TCP/UDP destination port.
    pub dst_port: u16,
    /// ICMP type and code (ICMP/ICMPv6 only).
    pub icmp: (u8, u8),
}

/// The decision of the rule set alone (no state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleVerdict {
    /// A rule allowed it.
    AllowedBy(RuleId),
    /// A rule blocked it.
    DeniedBy(RuleId),
    /// No rule matched: the default allowed it (outbound).
    DefaultAllow,
    /// No rule matched: the default denied it (inbound).
    DefaultDeny,
    /// The VM's firewall is off.
    Unfiltered,
}

impl RuleVerdict {
    /// Whether the packet may pass.
    pub fn allows(self) -> bool {
        matches!(
            self,
            RuleVerdict::AllowedBy(_) | RuleVerdict::DefaultAllow | RuleVerdict::Unfiltered
        )
    }
}

/// The compiled, immutable rule set of one vnic. Share it as `Arc<VnicRuleSet>`; replace the
/// whole `Arc` to update (see the module docs of [`crate::firewall`]).
#[derive(Debug)]
pub struct VnicRuleSet {
    vm_uuid: String,
    vni: u32,
    generation: u64,
    filtered: bool,
    inbound: [Bucket; PROTOCOLS],
    outbound: [Bucket; PROTOCOLS],
    rules: Box<[RuleMeta]>,
    hits: Box<[AtomicU64]>,
}

impl VnicRuleSet {
    /// A rule set with no rules: defaults only (`filtered`), or everything allowed.
    pub fn empty(vm_uuid: &str, vni: u32, generation: u64, filtered: bool) -> Self {
        VnicRuleSet {
            vm_uuid: vm_uuid.to_string(),
            vni,
            generation,
            filtered,
            inbound: Default::default(),
            outbound: Default::default(),
            rules: Box::new([]),
            hits: Box::new([]),
        }
    }

    /// The VNI this rule set belongs to.
    pub fn vni(&self) -> u32 {
        self.vni
    }

    /// The VM this rule set belongs to.
    pub fn vm_uuid(&self) -> &str {
        &self.vm_uuid
    }

    /// The compilation generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the VM's firewall is on.
    pub fn is_filtered(&self) -> bool {
        self.filtered
    }

    /// The compiled rules' origins, indexed by [`RuleId`].
    pub fn rules(&self) -> &[RuleMeta] {
        &self.rules
    }

    /// The rule behind an id.
    pub fn rule(&self, id: RuleId) -> Option<&RuleMeta> {
        self.rules.get(id.0 as usize)
    }

    /// How many flows each rule decided, indexed by [`RuleId`].
    pub fn hit_counts(&self) -> Vec<u64> {
        self.hits
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .collect()
    }

    /// The compiled rules in evaluation order for one direction (ids), all protocols.
    pub fn order(&self, dir: Direction) -> Vec<RuleId> {
        let lists = match dir {
            Direction::Ingress => &self.inbound,
            Direction::Egress => &self.outbound,
        };
        lists
            .iter()
            .flat_map(|b| b.rules.iter().map(|&(id, _)| id))
            .collect()
    }

    /// Evaluates the rules for one packet: first match in precedence order, else the default.
    /// Counts a hit on the deciding rule. No allocation.
    pub fn evaluate(&self, dir: Direction, q: &RuleQuery) -> RuleVerdict {
        if !self.filtered {
            return RuleVerdict::Unfiltered;
        }
        let default = match dir {
            Direction::Ingress => RuleVerdict::DefaultDeny,
            Direction::Egress => RuleVerdict::DefaultAllow,
        };
        let Some(proto) = Protocol::from_number(q.proto) else {
            return default;
        };
        let bucket = match dir {
            Direction::Ingress => &self.inbound[proto_index(proto)],
            Direction::Egress => &self.outbound[proto_index(proto)],
        };
        match bucket.first_match(proto, q) {
            Some((id, action)) => {
                if let Some(h) = self.hits.get(id.0 as usize) {
                    h.fetch_add(1, Ordering::Relaxed);
                }
                match action {
                    Action::Allow => RuleVerdict::AllowedBy(id),
                    Action::Block => RuleVerdict::DeniedBy(id),
                }
            }
            None => default,
        }
    }

    /// Bytes held by the classifier index (all buckets).
    pub fn index_bytes(&self) -> usize {
        self.inbound
            .iter()
            .chain(self.outbound.iter())
            .map(Bucket::bytes)
            .sum()
    }

    /// A listing: per compiled rule in evaluation order, direction, canonical text and hits.
    pub fn listing(&self) -> Vec<(Direction, &RuleMeta, u64)> {
        let hits = self.hit_counts();
        [Direction::Egress, Direction::Ingress]
            .into_iter()
            .flat_map(|d| self.order(d).into_iter().map(move |id| (d, id)))
            .filter_map(|(d, id)| {
                let m = self.rules.get(id.0 as usize)?;
                Some((d, m, hits.get(id.0 as usize).copied().unwrap_or(0)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaa-0000-4000-8000-000000000000";
    const B: &str = "bbbbbbbb-0000-4000-8000-000000000000";
    const VM1: &str = "00000000-0000-4000-8000-000000000001";
    const VM2: &str = "00000000-0000-4000-8000-000000000002";
    const VM3: &str = "00000000-0000-4000-8000-000000000003";
    const VMB: &str = "00000000-0000-4000-8000-0000000000b1";

    fn vm(uuid: &str, owner: &str, tags: &[(&str, &str)], ips: &[(u32, &str)]) -> VmRecord {
        VmRecord {
            uuid: uuid.into(),
            owner_uuid: owner.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            firewall_enabled: true,
            ips: ips
                .iter()
                .map(|(vni, ip)| VmAddress {
                    vni: *vni,
                    ip: ip.parse().unwrap(),
                })
                .collect(),
        }
    }

    fn rule(n: u32, owner: Option<&str>, text: &str) -> RuleRecord {
        RuleRecord {
            uuid: format!("cccccccc-0000-4000-8000-{n:012}"),
            owner_uuid: owner.map(str::to_string),
            global: owner.is_none(),
            enabled: true,
            rule: text.into(),
        }
    }

    fn q(peer: &str, proto: u8, port: u16) -> RuleQuery {
        RuleQuery {
            peer: peer.parse().unwrap(),
            proto,
            dst_port: port,
            icmp: (0, 0),
        }
    }

    fn fw(vms: Vec<VmRecord>, rules: Vec<RuleRecord>) -> Firewall {
        Firewall::new(&FirewallState { vms, rules }).unwrap()
    }

    #[test]
    fn priority_overrides_inbound_allow() {
        let f = fw(
            vec![vm(VM1, A, &[("mta", "true")], &[(10, "10.0.0.1")])],
            vec![
                rule(1, Some(A), "FROM any TO tag mta ALLOW tcp PORT 25"),
                rule(
                    2,
                    Some(A),
                    "FROM subnet 10.20.30.0/24 TO tag mta BLOCK tcp PORT 25 PRIORITY 1",
                ),
            ],
        );
        let rs = f.compile_vnic(VM1, 10, 1);
        assert!(matches!(
            rs.evaluate(Direction::Ingress, &q("10.20.30.7", 6, 25)),
            RuleVerdict::DeniedBy(_)
        ));
        assert!(matches!(
            rs.evaluate(Direction::Ingress, &q("10.20.31.7", 6, 25)),
            RuleVerdict::AllowedBy(_)
        ));
        assert_eq!(
            rs.evaluate(Direction::Ingress, &q("10.20.31.7", 6, 26)),
            RuleVerdict::DefaultDeny
        );
    }

    #[test]
    fn same_priority_inbound_allow_beats_block() {
        let f = fw(
            vec![vm(VM1, A, &[], &[(10, "10.0.0.1")])],
            vec![
                rule(
                    1,
                    Some(A),
                    &format!("FROM ip 10.0.0.9 TO vm {VM1} BLOCK tcp PORT 80 PRIORITY 5"),
                ),
                rule(
                    2,
                    Some(A),
                    &format!("FROM any TO vm {VM1} ALLOW tcp PORT 80 PRIORITY 5"),
                ),
            ],
        );
        let rs = f.compile_vnic(VM1, 10, 1);
        let v = rs.evaluate(Direction::Ingress, &q("10.0.0.9", 6, 80));
        let RuleVerdict::AllowedBy(id) = v else {
            panic!("{v:?}")
        };
        assert_eq!(rs.rule(id).unwrap().action, Action::Allow);
    }

    #[test]
    fn same_priority_outbound_block_beats_allow_and_priority_reverses_it() {
        let f = fw(
            vec![vm(VM1, A, &[], &[(10, "10.0.0.1")])],
            vec![
                rule(1, Some(A), "FROM all vms TO any BLOCK tcp PORT all"),
                rule(
                    2,
                    Some(A),
                    "FROM all vms TO any ALLOW tcp PORT 22 PRIORITY 1",
                ),
                rule(3, Some(A), "FROM all vms TO any ALLOW tcp PORT 443"),
            ],
        );
        let rs = f.compile_vnic(VM1, 10, 1);
        assert!(matches!(
            rs.evaluate(Direction::Egress, &q("192.0.2.1", 6, 22)),
            RuleVerdict::AllowedBy(_)
        ));
        // PORT 443 ALLOW at priority 0 outbound is a no-op: the BLOCK wins.
        assert!(matches!(
            rs.evaluate(Direction::Egress, &q("192.0.2.1", 6, 443)),
            RuleVerdict::DeniedBy(_)
        ));
        assert_eq!(
            rs.evaluate(Direction::Egress, &q("192.0.2.1", 17, 443)),
            RuleVerdict::DefaultAllow
        );
    }

    #[test]
    fn priority_zero_no_ops_are_dropped() {
        let f = fw(
            vec![vm(VM1, A, &[], &[(10, "10.0.0.1")])],
            vec![
                rule(1, Some(A), "FROM any TO all vms BLOCK tcp PORT 143"),
                rule(2, Some(A), "FROM all vms TO any ALLOW tcp PORT 143"),
                rule(
                    3,
                    Some(A),
                    "FROM any TO all vms BLOCK tcp PORT 143 PRIORITY 1",
                ),
            ],
        );
        let rs = f.compile_vnic(VM1, 10, 1);
        assert_eq!(rs.rules().len(), 1, "only the priority-1 block is compiled");
        assert_eq!(rs.rules()[0].priority, 1);
    }

    #[test]
    fn tenant_scoping_with_overlapping_addresses() {
        // Owners A and B both use 192.168.128.2, on their own VNIs (100 and 200); VM3 of A has
        // an address on a shared VNI 300 where B's VM also has one.
        let vms = vec![
            vm(
                VM1,
                A,
                &[("sdc_docker", "true")],
                &[(100, "192.168.128.2"), (300, "203.0.113.10")],
            ),
            vm(VM2, A, &[("sdc_docker", "true")], &[(100, "192.168.128.3")]),
            vm(VM3, A, &[], &[(100, "192.168.128.4")]),
            vm(
                VMB,
                B,
                &[("sdc_docker", "true")],
                &[(200, "192.168.128.2"), (300, "203.0.113.20")],
            ),
        ];
        let rules = vec![
            rule(
                1,
                Some(A),
                "FROM tag sdc_docker TO tag sdc_docker ALLOW tcp PORT all",
            ),
            rule(
                2,
                Some(B),
                "FROM tag sdc_docker TO tag sdc_docker ALLOW tcp PORT all",
            ),
            rule(3, None, "FROM any TO all vms ALLOW icmp TYPE 8 CODE 0"),
        ];
        let f = fw(vms, rules);
        let a1 = f.compile_vnic(VM1, 100, 1);
        assert!(a1
            .evaluate(Direction::Ingress, &q("192.168.128.3", 6, 5000))
            .allows());
        assert!(
            !a1.evaluate(Direction::Ingress, &q("192.168.128.4", 6, 5000))
                .allows(),
            "untagged VM3"
        );
        // B's rule never lands on A's vnic, and B's address is not in A's set.
        assert_eq!(
            a1.rules().len(),
            2,
            "A's inbound tcp rule (its outbound half is a no-op) and the global ping rule"
        );
        let b1 = f.compile_vnic(VMB, 200, 1);
        assert!(
            b1.evaluate(Direction::Ingress, &q("192.168.128.2", 6, 80))
                .allows(),
            "its own address"
        );
        assert!(
            !b1.evaluate(Direction::Ingress, &q("192.168.128.3", 6, 80))
                .allows(),
            "A's VM2 address means nothing on VNI 200"
        );
        // On the shared VNI, A's rule resolves only A's addresses on that VNI.
        let a1_shared = f.compile_vnic(VM1, 300, 1);
        assert!(
            !a1_shared
                .evaluate(Direction::Ingress, &q("203.0.113.20", 6, 80))
                .allows(),
            "B's VM on the shared network"
        );
        assert!(
            !a1_shared
                .evaluate(Direction::Ingress, &q("192.168.128.3", 6, 80))
                .allows(),
            "VM2 has no address on VNI 300"
        );
        // The global rule applies to every owner.
        let mut ping = q("198.51.100.1", 1, 0);
        ping.icmp = (8, 0);
        assert!(b1.evaluate(Direction::Ingress, &ping).allows());
        assert!(a1.evaluate(Direction::Ingress, &ping).allows());
        ping.icmp = (13, 0);
        assert!(!a1.evaluate(Direction::Ingress, &ping).allows());
    }

    #[test]
    fn state_json_shape_of_fw_apply() {
        let doc = format!(
            r#"{{"vms":[{{"uuid":"{VM1}","owner_uuid":"{A}","tags":{{"sdc_docker":true,"n":3,"role":"web"}},
                "firewall_enabled":true,"ips":[{{"vni":4001,"ip":"10.0.0.1"}},{{"vni":4001,"ip":"fd00::1"}}]}}],
               "rules":[{{"uuid":"cccccccc-0000-4000-8000-000000000001","owner_uuid":"{A}","enabled":true,
                          "rule":"FROM any TO tag sdc_docker = true ALLOW tcp PORT 80"}},
                        {{"uuid":"cccccccc-0000-4000-8000-000000000002","global":true,"enabled":true,
                          "rule":"FROM any TO tag n = 3 ALLOW udp PORT 53"}}]}}"#
        );
        let state: FirewallState = serde_json::from_str(&doc).unwrap();
        assert_eq!(state.vms[0].tags["sdc_docker"], "true");
        let f = Firewall::new(&state).unwrap();
        let rs = f.compile_vnic(VM1, 4001, 1);
        assert!(rs
            .evaluate(Direction::Ingress, &q("192.0.2.1", 6, 80))
            .allows());
        assert!(rs
            .evaluate(Direction::Ingress, &q("192.0.2.1", 17, 53))
            .allows());
        let listing = rs.listing();
        assert_eq!(listing.len(), 2);
        assert!(listing
            .iter()
            .all(|(d, _, hits)| *d == Direction::Ingress && *hits == 1));
        assert_eq!(
            listing[0].1.text,
            r#"FROM any TO tag "sdc_docker" = "true" ALLOW tcp PORT 80"#
        );
    }

    #[test]
    fn firewall_disabled_and_bad_state() {
        let mut v = vm(VM1, A, &[], &[(1, "10.0.0.1")]);
        v.firewall_enabled = false;
        let f = fw(vec![v], vec![]);
        assert_eq!(
            f.compile_vnic(VM1, 1, 1)
                .evaluate(Direction::Ingress, &q("10.0.0.2", 6, 1)),
            RuleVerdict::Unfiltered
        );
        let bad = Firewall::new(&FirewallState {
            vms: vec![],
            rules: vec![rule(9, Some(A), "FROM any TO all vms ALLOW tcp PORT 0")],
        });
        let err = bad.unwrap_err().to_string();
        assert!(
            err.contains("cccccccc-0000-4000-8000-000000000009") && err.contains("Port number"),
            "{err}"
        );
        let both = RuleRecord {
            global: true,
            ..rule(1, Some(A), "FROM any TO all vms ALLOW tcp PORT 1")
        };
        assert!(Firewall::new(&FirewallState {
            vms: vec![],
            rules: vec![both]
        })
        .is_err());
    }

    /// An independent, naive evaluation of the fwrule semantics: every applicable rule that
    /// matches, the best by (priority desc, action against the default first); else the default.
    fn reference(
        state: &FirewallState,
        vm_uuid: &str,
        vni: u32,
        dir: Direction,
        q: &RuleQuery,
    ) -> bool {
        let vm = state.vms.iter().find(|v| v.uuid == vm_uuid).unwrap();
        let default = dir == Direction::Egress;
        if !vm.firewall_enabled {
            return true;
        }
        let mut best: Option<(u8, u8, bool)> = None;
        for rec in state.rules.iter().filter(|r| r.enabled) {
            let rule = FwRule::create(
                &rec.rule,
                &ParseOptions {
                    max_version: None,
                    enforce_subnet_mask: true,
                },
            )
            .unwrap();
            if rec
                .owner_uuid
                .as_deref()
                .is_some_and(|o| o != vm.owner_uuid)
            {
                continue;
            }
            let (local, peer) = match dir {
                Direction::Ingress => (&rule.to, &rule.from),
                Direction::Egress => (&rule.from, &rule.to),
            };
            if !side_names_vm(local, vm) {
                continue;
            }
            if rule.protocol.number() != q.proto {
                continue;
            }
            let service = match &rule.targets {
                ProtoTargets::Ports(ps) => ps.iter().any(|p| p.contains(q.dst_port)),
                ProtoTargets::Types(ts) => ts.iter().any(|t| t.contains(q.icmp.0, q.icmp.1)),
                ProtoTargets::All => true,
            };
            let in_scope =
                |v: &&VmRecord| rec.owner_uuid.as_deref().is_none_or(|o| o == v.owner_uuid);
            let peer_match = peer.is_any()
                || peer.ips.iter().any(|i| i.addr == q.peer)
                || peer.subnets.iter().any(|n| n.contains(q.peer))
                || state.vms.iter().filter(in_scope).any(|v| {
                    side_names_vm(peer, v) && v.ips.iter().any(|a| a.vni == vni && a.ip == q.peer)
                });
            if !(service && peer_match) {
                continue;
            }
            let allow = rule.action == Action::Allow;
            let no_op = rule.priority == 0 && allow == default;
            if no_op {
                continue;
            }
            let rank = (100 - rule.priority, u8::from(allow == default), allow);
            if best.is_none_or(|b| (rank.0, rank.1) < (b.0, b.1)) {
                best = Some(rank);
            }
        }
        best.map(|b| b.2).unwrap_or(default)
    }

    use proptest::prelude::*;

    fn arb_peer() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("any".to_string()),
            Just("all vms".to_string()),
            (0u8..4).prop_map(|i| format!("ip 10.0.0.{i}")),
            (0u8..4).prop_map(|i| format!("ip fd00::{i}")),
            (
                0u8..2,
                prop_oneof![Just(24u8), Just(30), Just(31), Just(32), Just(8)]
            )
                .prop_map(|(i, l)| {
                    let base = match l {
                        8 => "10.0.0.0".to_string(),
                        24 => format!("10.0.{i}.0"),
                        _ => "10.0.0.0".to_string(),
                    };
                    format!("subnet {base}/{l}")
                }),
            Just("subnet fd00::/126".to_string()),
            (0u8..3).prop_map(|i| format!("tag role = r{i}")),
            Just("tag role".to_string()),
            (1u8..5).prop_map(|i| format!("vm 00000000-0000-4000-8000-00000000000{i}")),
        ]
    }

    fn arb_service() -> impl Strategy<Value = String> {
        prop_oneof![
            (1u16..6).prop_map(|p| format!("tcp PORT {p}")),
            Just("tcp PORT all".to_string()),
            (1u16..4, 0u16..3).prop_map(|(a, d)| format!("udp PORTS {a}-{}", a + d)),
            (0u8..3).prop_map(|t| format!("icmp TYPE {t}")),
            (0u8..3, 0u8..2).prop_map(|(t, c)| format!("icmp6 TYPE {t} CODE {c}")),
            Just("ah".to_string()),
        ]
    }

    fn arb_rule_text() -> impl Strategy<Value = String> {
        (
            arb_peer(),
            arb_peer(),
            any::<bool>(),
            arb_service(),
            prop_oneof![Just(0u8), Just(0), Just(1), Just(2)],
        )
            .prop_map(|(f, t, allow, svc, prio)| {
                let mut s = format!(
                    "FROM {f} TO {t} {} {svc}",
                    if allow { "ALLOW" } else { "BLOCK" }
                );
                if prio > 0 {
                    s.push_str(&format!(" PRIORITY {prio}"));
                }
                s
            })
    }

    proptest! {
        /// The compiled, indexed rule set decides exactly as the naive reading of the
        /// semantics, for random rules, owners, VNIs and packets.
        #[test]
        fn compiled_index_matches_reference(
            texts in proptest::collection::vec((arb_rule_text(), any::<bool>(), 0u8..3), 0..40),
            probes in proptest::collection::vec((0u8..6, 0u8..5, 0u16..7, 0u8..3, 0u8..3, any::<bool>()), 1..40),
        ) {
            let owners = [A, B];
            let vms: Vec<VmRecord> = (1..5u8)
                .map(|i| {
                    let mut v = vm(
                        &format!("00000000-0000-4000-8000-00000000000{i}"),
                        owners[usize::from(i % 2)],
                        &[("role", ["r0", "r1", "r2"][usize::from(i % 3)])],
                        &[(10, &format!("10.0.0.{i}")), (20, &format!("10.0.0.{}", i % 3)), (10, &format!("fd00::{i}"))],
                    );
                    v.firewall_enabled = i != 4;
                    v
                })
                .collect();
            let rules: Vec<RuleRecord> = texts
                .iter()
                .enumerate()
                .filter_map(|(n, (t, enabled, owner))| {
                    FwRule::create(t, &ParseOptions { max_version: None, enforce_subnet_mask: true }).ok()?;
                    let mut r = rule(n as u32, match owner { 0 => Some(A), 1 => Some(B), _ => None }, t);
                    r.enabled = *enabled;
                    Some(r)
                })
                .collect();
            let state = FirewallState { vms, rules };
            let f = Firewall::new(&state).unwrap();
            for vm_i in 1..5u8 {
                let uuid = format!("00000000-0000-4000-8000-00000000000{vm_i}");
                for vni in [10, 20] {
                    let rs = f.compile_vnic(&uuid, vni, 1);
                    for &(peer, proto_i, port, t, c, ingress) in &probes {
                        let proto = [6u8, 17, 1, 58, 51, 47][usize::from(proto_i)];
                        let peer: IpAddr = if peer < 5 && proto != 58 {
                            format!("10.0.0.{peer}").parse().unwrap()
                        } else {
                            format!("fd00::{}", peer % 5).parse().unwrap()
                        };
                        let q = RuleQuery { peer, proto, dst_port: port, icmp: (t, c) };
                        let dir = if ingress { Direction::Ingress } else { Direction::Egress };
                        let got = rs.evaluate(dir, &q).allows();
                        let want = reference(&state, &uuid, vni, dir, &q);
                        prop_assert_eq!(got, want, "vm {} vni {} {:?} {:?}\n{:#?}", uuid, vni, dir, q, state.rules);
                    }
                }
            }
        }
    }
}
