//! The fwrule language: parser, parse tree, rule model and canonical text.
//!
//! Behaviour is that of Joyent's npm package `fwrule` (2.1.1), which is the reference: the
//! same inputs are accepted, rejections fall in the same class ([`ErrorClass`]: syntax, value,
//! version, model), [`parse_tree`] returns upstream's `parse()` tree (serialised by serde in the
//! exact JSON shape) and [`FwRule::text`] is upstream's `FwRule.text()`, byte for byte. The
//! differential test `tests/fwrule_differential.rs` checks all of that against the real package.
//!
//! Layers, as upstream's:
//! 1. lexer (`lexer.rs`) — upstream's first-match lexer, unescaping strings at lex time.
//! 2. parser — the grammar plus the *parser-level* value checks (addresses, subnets, ports,
//!    ranges, ICMP types/codes, priority, UUIDs) and the language-version checks
//!    ([`ParseOptions::max_version`]). See `parser.rs` for how the order of checks and syntax
//!    errors is kept identical to upstream's LALR parser.
//! 3. model — [`FwRule::create`]: limits (24 targets per side, 24 ports/types, 8 below
//!    version 4), ICMP address-family checks and "rule does not affect VMs"; targets
//!    de-duplicated and sorted per side, ports sorted by start, ICMP types in V8's order for
//!    upstream's comparator.
//!
//! Upstream quirks reproduced on purpose (each is pinned by a test): a tag named or valued
//! `__proto__` vanishes from the model (a JavaScript object-key artefact); `maxVersion: 0`
//! means "current" for the parser but "below 4" for the port/type limit; the empty rule is a
//! value error ("No rule specified") while a blank one is a syntax error. The one known
//! divergence: a `\uD800`-style escape producing a lone UTF-16 surrogate is held as U+FFFD,
//! since a Rust string cannot hold a lone surrogate.

mod lexer;
mod parser;
mod validate;

#[cfg(test)]
mod tests;

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

/// The newest language version (upstream's `CURR_VERSION`).
pub const CURRENT_VERSION: u32 = 4;
/// Most targets allowed on one side of a rule.
pub const MAX_TARGETS_PER_SIDE: usize = 24;
/// Most ports or ICMP types in one rule (language version 4).
pub const MAX_PROTOCOL_TARGETS: usize = 24;
/// Most ports or ICMP types in one rule below language version 4.
pub const OLD_MAX_PORTS: usize = 8;

/// Options of upstream's `parse()`/`create()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParseOptions {
    /// Newest language version allowed (`maxVersion`); `None` (or 0) means the current one.
    pub max_version: Option<u32>,
    /// Reject subnets with host bits set (`enforceSubnetMask`).
    pub enforce_subnet_mask: bool,
}

/// The class of a rejection, as the differential test compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorClass {
    /// The lexer or grammar rejected the text.
    Syntax,
    /// A value check failed (address, subnet, port, range, ICMP, priority, UUID, limits).
    Value,
    /// The rule uses a feature newer than `max_version`.
    Version,
    /// The model rejected a rule that parsed (ICMP family, "does not affect VMs").
    Model,
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorClass::Syntax => "syntax",
            ErrorClass::Value => "value",
            ErrorClass::Version => "version",
            ErrorClass::Model => "model",
        })
    }
}

/// Why a rule was rejected. Positions are character offsets into the rule text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The lexer or the grammar rejected the text.
    #[error("syntax error at character {pos}: {message}")]
    Syntax {
        /// Where the offending token starts.
        pos: usize,
        /// The offending token and what was expected there.
        message: String,
    },
    /// A value in the rule is invalid (upstream's wording, plus the position).
    #[error("{message} (at character {pos})")]
    Value {
        /// Where the offending value starts.
        pos: usize,
        /// Upstream's message.
        message: String,
    },
    /// A feature newer than the allowed language version.
    #[error("The rule uses a feature ({feature}) newer than this API allows (language version {needed} needed; at character {pos})")]
    Version {
        /// Upstream's feature name.
        feature: &'static str,
        /// The version that introduced it.
        needed: u32,
        /// Where the feature is used.
        pos: usize,
    },
    /// A limit of the model was exceeded (a value-class error without a single position).
    #[error("{0}")]
    Limit(String),
    /// The model rejected a rule that parsed.
    #[error("{0}")]
    Model(String),
}

impl RuleError {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            RuleError::Syntax { .. } => ErrorClass::Syntax,
            RuleError::Value { .. } | RuleError::Limit(_) => ErrorClass::Value,
            RuleError::Version { .. } => ErrorClass::Version,
            RuleError::Model(_) => ErrorClass::Model,
        }
    }
}

/// A rule's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `ALLOW`.
    Allow,
    /// `BLOCK`.
    Block,
}

impl Action {
    /// Lower-case name as in the parse tree.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Block => "block",
        }
    }
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A rule's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP, with ports.
    Tcp,
    /// UDP, with ports.
    Udp,
    /// ICMPv4, with types.
    Icmp,
    /// ICMPv6, with types (language version 3).
    Icmp6,
    /// IPsec AH (language version 4).
    Ah,
    /// IPsec ESP (language version 4).
    Esp,
}

impl Protocol {
    /// Lower-case name as in rule text.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Icmp6 => "icmp6",
            Protocol::Ah => "ah",
            Protocol::Esp => "esp",
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp => 1,
            Protocol::Icmp6 => 58,
            Protocol::Ah => 51,
            Protocol::Esp => 50,
        }
    }

    /// The protocol with this IP protocol number, if the language knows it.
    pub fn from_number(n: u8) -> Option<Protocol> {
        Some(match n {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            1 => Protocol::Icmp,
            58 => Protocol::Icmp6,
            51 => Protocol::Ah,
            50 => Protocol::Esp,
            _ => return None,
        })
    }
}

/// One port target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortTarget {
    /// `PORT all`.
    All,
    /// One port.
    Port(u16),
    /// An inclusive range (`PORTS a-b`).
    Range {
        /// First port.
        start: u16,
        /// Last port.
        end: u16,
    },
}

impl PortTarget {
    /// Whether destination port `p` matches.
    pub fn contains(self, p: u16) -> bool {
        match self {
            PortTarget::All => true,
            PortTarget::Port(x) => x == p,
            PortTarget::Range { start, end } => (start..=end).contains(&p),
        }
    }
}

/// One ICMP type target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IcmpTarget {
    /// `TYPE all`.
    All,
    /// A type, any code.
    Type(u8),
    /// A type and code.
    TypeCode(u8, u8),
}

impl IcmpTarget {
    /// Whether an ICMP message of this type and code matches.
    pub fn contains(self, t: u8, c: u8) -> bool {
        match self {
            IcmpTarget::All => true,
            IcmpTarget::Type(x) => x == t,
            IcmpTarget::TypeCode(x, y) => x == t && y == c,
        }
    }
}

/// The protocol targets of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProtoTargets {
    /// TCP/UDP destination ports.
    Ports(Vec<PortTarget>),
    /// ICMP/ICMPv6 types.
    Types(Vec<IcmpTarget>),
    /// AH/ESP: the whole protocol (upstream's `["all"]`).
    All,
}

impl ProtoTargets {
    fn len(&self) -> usize {
        match self {
            ProtoTargets::Ports(p) => p.len(),
            ProtoTargets::Types(t) => t.len(),
            ProtoTargets::All => 1,
        }
    }
}

/// A literal `ip` target: its text as written and its value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpTarget {
    /// The address as written (the model de-duplicates by this text, as upstream).
    pub text: String,
    /// The address.
    pub addr: IpAddr,
}

/// A literal `subnet` target: its text as written (never normalised) and its value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubnetTarget {
    /// `addr/len` as written.
    pub text: String,
    /// The address part (host bits possibly set, unless `enforce_subnet_mask`).
    pub addr: IpAddr,
    /// Prefix length in the address's own family.
    pub prefix: u8,
}

impl SubnetTarget {
    /// Whether `ip` is inside this subnet (same family only).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix.min(32)))
                };
                u32::from(n) & m == u32::from(a) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix.min(128)))
                };
                u128::from(n) & m == u128::from(a) & m
            }
            _ => false,
        }
    }
}

/// A `tag` target: a bare tag name, or `name = value`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag {
    /// Tag name.
    pub name: String,
    /// Required value, compared as a string.
    pub value: Option<String>,
}

/// A wildcard target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wildcard {
    /// `any`: every address.
    Any,
    /// `all vms`: every VM of the rule's owner (upstream's `vmall`).
    AllVms,
}

/// One target as written on a side.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `ip …`.
    Ip(IpTarget),
    /// `subnet …`.
    Subnet(SubnetTarget),
    /// `tag …`.
    Tag(Tag),
    /// `vm <uuid>`.
    Vm(String),
    /// `any` / `all vms`.
    Wildcard(Wildcard),
}

/// Upstream's `parse()` result: the rule as written, before the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseTree {
    /// FROM side, in written order.
    pub from: Vec<Target>,
    /// TO side, in written order.
    pub to: Vec<Target>,
    /// Action.
    pub action: Action,
    /// Protocol.
    pub protocol: Protocol,
    /// Ports/types in written order.
    pub targets: ProtoTargets,
    /// `PRIORITY n` when written.
    pub priority: Option<u8>,
}

/// Upstream's `parse(text, opts)`: grammar and parser-level checks only (no model checks).
pub fn parse_tree(text: &str, opts: &ParseOptions) -> Result<ParseTree, RuleError> {
    parser::Parser::new(text, opts).parse_rule()
}

// ---- JSON in upstream's parse() shape ----

struct TargetsJson<'a>(&'a [Target]);

impl Serialize for TargetsJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for t in self.0 {
            match t {
                Target::Ip(ip) => seq.serialize_element(&("ip", &ip.text))?,
                Target::Subnet(n) => seq.serialize_element(&("subnet", &n.text))?,
                Target::Tag(Tag { name, value: None }) => seq.serialize_element(&("tag", name))?,
                Target::Tag(Tag {
                    name,
                    value: Some(v),
                }) => seq.serialize_element(&("tag", (name, v)))?,
                Target::Vm(u) => seq.serialize_element(&("vm", u))?,
                Target::Wildcard(Wildcard::Any) => seq.serialize_element(&("wildcard", "any"))?,
                Target::Wildcard(Wildcard::AllVms) => {
                    seq.serialize_element(&("wildcard", "vmall"))?
                }
            }
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct RangeJson {
    start: u16,
    end: u16,
}

struct ProtoJson<'a>(Protocol, &'a ProtoTargets);

/// One protocol target as upstream's tree holds it: a number, `{start, end}`, `"t:c"`, `"all"`.
#[derive(Serialize)]
#[serde(untagged)]
enum ProtoTargetJson {
    Num(u16),
    Range(RangeJson),
    Text(String),
}

impl Serialize for ProtoJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("name", self.0.as_str())?;
        let all = || ProtoTargetJson::Text("all".into());
        let targets: Vec<ProtoTargetJson> = match self.1 {
            ProtoTargets::All => vec![all()],
            ProtoTargets::Ports(ps) => ps
                .iter()
                .map(|p| match *p {
                    PortTarget::All => all(),
                    PortTarget::Port(n) => ProtoTargetJson::Num(n),
                    PortTarget::Range { start, end } => {
                        ProtoTargetJson::Range(RangeJson { start, end })
                    }
                })
                .collect(),
            ProtoTargets::Types(ts) => ts
                .iter()
                .map(|t| match *t {
                    IcmpTarget::All => all(),
                    IcmpTarget::Type(n) => ProtoTargetJson::Num(u16::from(n)),
                    IcmpTarget::TypeCode(a, b) => ProtoTargetJson::Text(format!("{a}:{b}")),
                })
                .collect(),
        };
        m.serialize_entry("targets", &targets)?;
        m.end()
    }
}

impl Serialize for ParseTree {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = if self.priority.is_some() { 5 } else { 4 };
        let mut m = s.serialize_map(Some(n))?;
        m.serialize_entry("from", &TargetsJson(&self.from))?;
        m.serialize_entry("to", &TargetsJson(&self.to))?;
        m.serialize_entry("action", self.action.as_str())?;
        m.serialize_entry("protocol", &ProtoJson(self.protocol, &self.targets))?;
        if let Some(p) = self.priority {
            m.serialize_entry("priority", &p)?;
        }
        m.end()
    }
}

// ---- the model ----

/// One side of a modelled rule: targets de-duplicated and sorted by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Side {
    /// `any` / `all vms` (at most one, since the grammar allows a wildcard only alone).
    pub wildcards: Vec<Wildcard>,
    /// Literal addresses, sorted by text.
    pub ips: Vec<IpTarget>,
    /// Literal subnets, sorted by text.
    pub subnets: Vec<SubnetTarget>,
    /// Tags, sorted by name then value; a bare tag hides `name = value` entries.
    pub tags: Vec<Tag>,
    /// VM UUIDs, sorted.
    pub vms: Vec<String>,
}

impl Side {
    /// Whether this side names VMs (a tag, a VM or `all vms`).
    pub fn names_vms(&self) -> bool {
        !self.tags.is_empty() || !self.vms.is_empty() || self.wildcards.contains(&Wildcard::AllVms)
    }

    /// Whether this side has no target left (only possible through upstream's `__proto__`
    /// quirk).
    pub fn is_empty(&self) -> bool {
        self.wildcards.is_empty()
            && self.ips.is_empty()
            && self.subnets.is_empty()
            && self.tags.is_empty()
            && self.vms.is_empty()
    }

    /// Whether this side is `any`.
    pub fn is_any(&self) -> bool {
        self.wildcards.contains(&Wildcard::Any)
    }
}

/// A validated rule (upstream's `FwRule` built by `create()`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FwRule {
    /// FROM side.
    pub from: Side,
    /// TO side.
    pub to: Side,
    /// Action.
    pub action: Action,
    /// Protocol.
    pub protocol: Protocol,
    /// Ports (sorted by start) or types (in upstream's order).
    pub targets: ProtoTargets,
    /// 0..=100; 0 when not written.
    pub priority: u8,
}

/// Collects tags as upstream's `addTag`/`tagList` do over a JavaScript object.
#[derive(Default)]
struct TagSet {
    // name -> (has bare tag, values)
    tags: BTreeMap<String, (bool, Vec<String>)>,
}

impl TagSet {
    fn add(&mut self, tag: &Tag) {
        // `obj["__proto__"] = {}` sets the prototype instead of adding a key, and
        // `values["__proto__"] = true` is ignored: such tags vanish upstream.
        if tag.name == "__proto__" {
            return;
        }
        let e = self.tags.entry(tag.name.clone()).or_default();
        match &tag.value {
            None => e.0 = true,
            Some(v) if v == "__proto__" => {}
            Some(v) => {
                if !e.1.contains(v) {
                    e.1.push(v.clone());
                }
            }
        }
    }

    fn list(self) -> Vec<Tag> {
        let mut names: Vec<(String, (bool, Vec<String>))> = self.tags.into_iter().collect();
        names.sort_by(|a, b| validate::js_str_cmp(&a.0, &b.0));
        let mut out = Vec::new();
        for (name, (all, mut values)) in names {
            if all {
                out.push(Tag { name, value: None });
            } else {
                values.sort_by(|a, b| validate::js_str_cmp(a, b));
                for v in values {
                    out.push(Tag {
                        name: name.clone(),
                        value: Some(v),
                    });
                }
            }
        }
        out
    }
}

fn dedup_sorted<T: Clone>(items: Vec<T>, key: impl Fn(&T) -> &str) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for it in items {
        if !out.iter().any(|o| key(o) == key(&it)) {
            out.push(it);
        }
    }
    out.sort_by(|a, b| validate::js_str_cmp(key(a), key(b)));
    out
}

fn build_side(targets: &[Target]) -> Side {
    let mut side = Side::default();
    let mut tags = TagSet::default();
    let mut ips = Vec::new();
    let mut subnets = Vec::new();
    let mut vms = Vec::new();
    for t in targets {
        match t {
            Target::Ip(ip) => ips.push(ip.clone()),
            Target::Subnet(n) => subnets.push(n.clone()),
            Target::Tag(tag) => tags.add(tag),
            Target::Vm(u) => vms.push(u.clone()),
            Target::Wildcard(w) => {
                if !side.wildcards.contains(w) {
                    side.wildcards.push(*w);
                }
            }
        }
    }
    // "any" < "vmall"
    side.wildcards
        .sort_by_key(|w| matches!(w, Wildcard::AllVms));
    side.ips = dedup_sorted(ips, |i| i.text.as_str());
    side.subnets = dedup_sorted(subnets, |n| n.text.as_str());
    side.vms = dedup_sorted(vms, |v| v.as_str());
    side.tags = tags.list();
    side
}

/// Upstream's `icmpTypeSort` comparator, bug included (`a.length` used for b's code); `None`
/// is NaN.
fn icmp_cmp(a: &IcmpTarget, b: &IcmpTarget) -> Option<i64> {
    let split = |t: &IcmpTarget| -> (i64, Option<i64>) {
        match *t {
            // Number("all") << 8 is 0.
            IcmpTarget::All => (0, None),
            IcmpTarget::Type(x) => (i64::from(x), None),
            IcmpTarget::TypeCode(x, y) => (i64::from(x), Some(i64::from(y))),
        }
    };
    let (at, ac) = split(a);
    let (bt, bc) = split(b);
    match ac {
        None => Some((at << 8) - (bt << 8)),
        Some(ac) => bc.map(|bc| ((at << 8) + ac) - ((bt << 8) + bc)),
    }
}

impl FwRule {
    /// Upstream's `create({rule: text}, opts)`: parse, then the model checks.
    pub fn create(text: &str, opts: &ParseOptions) -> Result<FwRule, RuleError> {
        if text.is_empty() {
            return Err(RuleError::Limit("No rule specified".into()));
        }
        let tree = parse_tree(text, opts)?;
        FwRule::from_tree(&tree, opts)
    }

    /// The model checks and normalisation on an already parsed tree.
    pub fn from_tree(tree: &ParseTree, opts: &ParseOptions) -> Result<FwRule, RuleError> {
        let mut targets = tree.targets.clone();
        match &mut targets {
            ProtoTargets::Ports(ps) => ps.sort_by_key(|p| match *p {
                // Number("all") is NaN, which compares equal to everything; "all" is alone.
                PortTarget::All => 0,
                PortTarget::Port(n) => n,
                PortTarget::Range { start, .. } => start,
            }),
            ProtoTargets::Types(ts) => validate::v8_sort(ts, icmp_cmp),
            ProtoTargets::All => {}
        }
        let what = if matches!(tree.protocol, Protocol::Icmp | Protocol::Icmp6) {
            "types"
        } else {
            "ports"
        };
        // `opts.maxVersion < 4`: undefined is not below 4, but 0 is.
        let limit = match opts.max_version {
            Some(v) if v < 4 => OLD_MAX_PORTS,
            _ => MAX_PROTOCOL_TARGETS,
        };
        if targets.len() > limit {
            return Err(RuleError::Limit(format!(
                "maximum of {limit} {what} allowed"
            )));
        }
        for side in [&tree.to, &tree.from] {
            if side.len() > MAX_TARGETS_PER_SIDE {
                return Err(RuleError::Limit(format!(
                    "maximum of {MAX_TARGETS_PER_SIDE} targets allowed per side"
                )));
            }
        }
        let from = build_side(&tree.from);
        let to = build_side(&tree.to);
        let all: Vec<Target> = tree.from.iter().chain(tree.to.iter()).cloned().collect();
        let both = build_side(&all);
        match tree.protocol {
            Protocol::Icmp => {
                if both.ips.iter().any(|i| !validate::node_is_ipv4(&i.text)) {
                    return Err(RuleError::Model(
                        "rule affects ICMPv4 but contains a non-IPv4 address".into(),
                    ));
                }
                if both
                    .subnets
                    .iter()
                    .any(|n| !validate::node_is_ipv4(n.text.split('/').next().unwrap_or_default()))
                {
                    return Err(RuleError::Model(
                        "rule affects ICMPv4 but contains a non-IPv4 subnet".into(),
                    ));
                }
            }
            Protocol::Icmp6 => {
                if both.ips.iter().any(|i| !validate::node_is_ipv6(&i.text)) {
                    return Err(RuleError::Model(
                        "rule affects ICMPv6 but contains a non-IPv6 address".into(),
                    ));
                }
                if both
                    .subnets
                    .iter()
                    .any(|n| !validate::node_is_ipv6(n.text.split('/').next().unwrap_or_default()))
                {
                    return Err(RuleError::Model(
                        "rule affects ICMPv6 but contains a non-IPv6 subnet".into(),
                    ));
                }
            }
            _ => {}
        }
        if !both.names_vms() {
            return Err(RuleError::Model("rule does not affect VMs".into()));
        }
        Ok(FwRule {
            from,
            to,
            action: tree.action,
            protocol: tree.protocol,
            targets,
            priority: tree.priority.unwrap_or(0),
        })
    }

    /// Upstream's `FwRule.text()`: the canonical text.
    pub fn text(&self) -> String {
        let side = |s: &Side| -> String {
            let mut parts: Vec<String> = Vec::new();
            for w in &s.wildcards {
                parts.push(
                    match w {
                        Wildcard::Any => "any",
                        Wildcard::AllVms => "all vms",
                    }
                    .to_string(),
                );
            }
            for ip in &s.ips {
                parts.push(format!("ip {}", ip.text));
            }
            for n in &s.subnets {
                parts.push(format!("subnet {}", n.text));
            }
            for t in &s.tags {
                match &t.value {
                    None => parts.push(format!("tag {}", quote(&t.name))),
                    Some(v) => parts.push(format!("tag {} = {}", quote(&t.name), quote(v))),
                }
            }
            for v in &s.vms {
                parts.push(format!("vm {v}"));
            }
            if parts.len() > 1 {
                format!("({})", parts.join(" OR "))
            } else {
                parts.join(" OR ")
            }
        };
        let proto = match &self.targets {
            ProtoTargets::All => String::new(),
            ProtoTargets::Types(ts) => {
                let items: Vec<String> = ts
                    .iter()
                    .map(|t| match *t {
                        IcmpTarget::All => "all".to_string(),
                        IcmpTarget::Type(x) => x.to_string(),
                        IcmpTarget::TypeCode(x, y) => format!("{x} CODE {y}"),
                    })
                    .collect();
                let (o, c) = if ts.len() > 1 { ("(", ")") } else { ("", "") };
                format!(" {o}TYPE {}{c}", items.join(" AND TYPE "))
            }
            ProtoTargets::Ports(ps) => {
                let has_range = ps.iter().any(|p| matches!(p, PortTarget::Range { .. }));
                let items: Vec<String> = ps
                    .iter()
                    .map(|p| match *p {
                        PortTarget::All => "all".to_string(),
                        PortTarget::Port(n) => n.to_string(),
                        PortTarget::Range { start, end } => format!("{start} - {end}"),
                    })
                    .collect();
                if has_range {
                    format!(" PORTS {}", items.join(", "))
                } else {
                    let (o, c) = if ps.len() > 1 { ("(", ")") } else { ("", "") };
                    format!(" {o}PORT {}{c}", items.join(" AND PORT "))
                }
            }
        };
        let prio = if self.priority > 0 {
            format!(" PRIORITY {}", self.priority)
        } else {
            String::new()
        };
        format!(
            "FROM {} TO {} {} {}{}{}",
            side(&self.from),
            side(&self.to),
            self.action.as_str().to_uppercase(),
            self.protocol.as_str(),
            proto,
            prio
        )
    }
}

impl fmt::Display for FwRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// Upstream's `tagEscape` table: the characters written back as escapes.
fn escape_for(c: char) -> Option<String> {
    Some(match c {
        '"' => "\\\"".into(),
        '(' => "\\(".into(),
        ')' => "\\)".into(),
        '\\' => "\\\\".into(),
        '\u{8}' => "\\b".into(),
        '\t' => "\\t".into(),
        '\n' => "\\n".into(),
        '\u{c}' => "\\f".into(),
        '\r' => "\\r".into(),
        '\u{0}'..='\u{1f}'
        | '\u{7f}'
        | '\u{85}'
        | '\u{a0}'
        | '\u{1680}'
        | '\u{180e}'
        | '\u{2000}'..='\u{200d}'
        | '\u{2028}'
        | '\u{2029}'
        | '\u{202f}'
        | '\u{205f}'
        | '\u{2060}'
        | '\u{3000}'
        | '\u{feff}' => format!("\\u{:04X}", u32::from(c)),
        _ => return None,
    })
}

/// Quotes and escapes a tag name or value as upstream's `quote()`.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match escape_for(c) {
            Some(e) => out.push_str(&e),
            None => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Compares two strings in JavaScript's default sort order (UTF-16 code units).
pub fn js_cmp(a: &str, b: &str) -> Ordering {
    validate::js_str_cmp(a, b)
}
