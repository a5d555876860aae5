//! The reconciler's pure core: desired state (the snapshot's VMs and firewall) plus actual
//! state (owned namespaces, their links, the dataplane's vnics, the firewall last applied, the
//! states last reported) → an ordered list of [`Action`]s. No I/O; [`super::host`] executes.
//!
//! Order: the firewall first (so a vnic attached next is filtered from its first frame), then
//! namespaces that are no longer desired (their vnics detached, then the namespace deleted),
//! then each desired VM in UUID order (stale vnics detached and their links removed, the
//! namespace created, vnics attached), then the state reports.
//!
//! Rules:
//! - Only namespaces this agent created (`owned`) are ever touched. A desired VM whose
//!   namespace exists but is not owned is reported `failed`.
//! - A vnic is in place when the dataplane lists it `up` with the NIC's VNI, MAC, address and
//!   MTU, and its link is in the namespace with that MAC and MTU. Otherwise it is detached
//!   (if the dataplane has it), its link removed (if present) and it is made again.
//! - Links named like vnics (`net<N>`) in an owned namespace that no NIC wants are removed.
//! - A VM whose NICs cannot be set up (no `vnet_id`, a bad MAC or address) is reported
//!   `failed` with the reason and left as it is.
//! - A report is emitted only when it differs from the last one sent, or when the control
//!   plane still shows a different state (e.g. `provisioning` after a restart or a migrate).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use super::api::{Nic, Vm, VmState};
use crate::dataplane::control::{parse_cidr, VnicAddSpec, VnicInfo, VnicState};
use crate::firewall::compile::FirewallState;
use crate::wire::Mac;

/// A vnic as the agent wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnicWant {
    /// Interface name in the namespace (`net0`, …).
    pub name: String,
    /// Segment.
    pub vni: u32,
    /// MAC.
    pub mac: Mac,
    /// Address.
    pub ip: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
    /// MTU.
    pub mtu: u32,
    /// Default route via this gateway (only on the primary NIC).
    pub gateway: Option<IpAddr>,
}

impl VnicWant {
    /// The dataplane's spec for this vnic in namespace `netns`.
    pub fn spec(&self, netns: &str) -> VnicAddSpec {
        VnicAddSpec {
            netns: netns.to_owned(),
            name: self.name.clone(),
            vni: self.vni,
            mac: self.mac.to_string(),
            ip: format!("{}/{}", self.ip, self.prefix_len),
            mtu: self.mtu,
        }
    }
}

/// A link found in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsLink {
    /// Name.
    pub name: String,
    /// MAC, if it has one.
    pub mac: Option<[u8; 6]>,
    /// MTU.
    pub mtu: u32,
}

/// What is on the host now.
#[derive(Debug, Clone, Default)]
pub struct Actual {
    /// Namespaces this agent created (from its state file).
    pub owned: BTreeSet<String>,
    /// Names under `/run/netns` (all of them; only owned ones are ever acted on).
    pub namespaces: BTreeSet<String>,
    /// The links of each owned namespace that exists.
    pub links: BTreeMap<String, Vec<NsLink>>,
    /// The dataplane's vnics (`vnic_ls`).
    pub dataplane: Vec<VnicInfo>,
    /// The firewall state last applied to this dataplane (`None`: none since it (re)started).
    pub firewall: Option<FirewallState>,
    /// The state last reported per VM (since this agent started).
    pub reported: BTreeMap<String, (VmState, Option<String>)>,
}

/// One step of a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the snapshot's firewall state to the dataplane (`fw_apply`).
    ApplyFirewall,
    /// Create the VM's namespace (recorded as owned first), with its sysctls and loopback up.
    CreateNetns {
        /// VM UUID = namespace name.
        vm: String,
    },
    /// Detach a vnic from the dataplane (`vnic_rm`).
    DetachVnic {
        /// Namespace.
        vm: String,
        /// Interface name.
        name: String,
    },
    /// Delete a link in the VM's namespace.
    RemoveLink {
        /// Namespace.
        vm: String,
        /// Interface name.
        name: String,
    },
    /// Create the vnic's TAP in the namespace and attach it to the dataplane.
    AttachVnic {
        /// Namespace.
        vm: String,
        /// What to create.
        vnic: VnicWant,
    },
    /// Delete the namespace (and forget it as owned).
    DeleteNetns {
        /// Namespace.
        vm: String,
    },
    /// Report the VM's state (if an earlier action for this VM failed, the executor reports
    /// `failed` with that error instead).
    Report {
        /// The VM.
        vm: String,
        /// Its state.
        state: VmState,
        /// Why.
        reason: Option<String>,
    },
}

impl Action {
    /// The VM (namespace) the action is about, if any.
    pub fn vm(&self) -> Option<&str> {
        match self {
            Action::ApplyFirewall => None,
            Action::CreateNetns { vm }
            | Action::DetachVnic { vm, .. }
            | Action::RemoveLink { vm, .. }
            | Action::AttachVnic { vm, .. }
            | Action::DeleteNetns { vm }
            | Action::Report { vm, .. } => Some(vm),
        }
    }
}

/// Why a NIC cannot become a vnic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NicError {
    /// Not on a fabric network.
    #[error("NIC {0} has no vnet_id (its network is not a fabric network): the dataplane only serves fabric networks")]
    NoVni(String),
    /// The netmask is not a contiguous IPv4 mask.
    #[error("NIC {nic}: netmask {mask:?} is not a contiguous dotted IPv4 mask")]
    Netmask {
        /// Interface.
        nic: String,
        /// Mask given.
        mask: String,
    },
    /// The gateway does not parse.
    #[error("NIC {nic}: gateway {gw:?} is not an IP address")]
    Gateway {
        /// Interface.
        nic: String,
        /// Value given.
        gw: String,
    },
    /// The dataplane would refuse the vnic.
    #[error("NIC {nic}: {detail}")]
    Spec {
        /// Interface.
        nic: String,
        /// The dataplane's validation error.
        detail: String,
    },
    /// Two NICs with one interface name.
    #[error("two NICs are named {0}")]
    Duplicate(String),
}

/// `255.255.255.0` → 24.
pub fn prefix_from_netmask(mask: &str) -> Option<u8> {
    let m = u32::from(mask.parse::<Ipv4Addr>().ok()?);
    let len = m.leading_ones();
    (m.checked_shl(len).unwrap_or(0) == 0).then_some(len as u8)
}

/// The vnics a VM's NICs ask for, or why they cannot be made.
pub fn vnic_wants(vm: &Vm) -> Result<Vec<VnicWant>, NicError> {
    let primary = vm.nics.iter().position(|n| n.primary).unwrap_or(0);
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(vm.nics.len());
    for (i, nic) in vm.nics.iter().enumerate() {
        if !seen.insert(nic.interface.as_str()) {
            return Err(NicError::Duplicate(nic.interface.clone()));
        }
        out.push(vnic_want(nic, i == primary)?);
    }
    Ok(out)
}

fn vnic_want(nic: &Nic, primary: bool) -> Result<VnicWant, NicError> {
    let vni = nic
        .vnet_id
        .ok_or_else(|| NicError::NoVni(nic.interface.clone()))?;
    let prefix = if nic.ip.contains(':') {
        // An IPv6 NIC carries its prefix length in the netmask field, if at all.
        nic.netmask.trim_start_matches('/').parse::<u8>().ok()
    } else {
        prefix_from_netmask(&nic.netmask)
    }
    .ok_or_else(|| NicError::Netmask {
        nic: nic.interface.clone(),
        mask: nic.netmask.clone(),
    })?;
    let spec = VnicAddSpec {
        netns: "x".into(),
        name: nic.interface.clone(),
        vni,
        mac: nic.mac.clone(),
        ip: format!("{}/{prefix}", nic.ip),
        mtu: nic.mtu,
    };
    let v = spec.validate().map_err(|e| NicError::Spec {
        nic: nic.interface.clone(),
        detail: e.to_string(),
    })?;
    let gateway = match (&nic.gateway, primary) {
        (Some(g), true) if !g.is_empty() => Some(g.parse().map_err(|_| NicError::Gateway {
            nic: nic.interface.clone(),
            gw: g.clone(),
        })?),
        _ => None,
    };
    Ok(VnicWant {
        name: nic.interface.clone(),
        vni,
        mac: v.mac,
        ip: v.ip,
        prefix_len: v.prefix_len,
        mtu: nic.mtu,
        gateway,
    })
}

/// Whether the dataplane's vnic is up and exactly what `w` asks for.
fn dp_matches(d: &VnicInfo, w: &VnicWant) -> bool {
    d.state == VnicState::Up
        && d.vni == w.vni
        && d.mtu == w.mtu
        && d.mac.parse::<Mac>().ok() == Some(w.mac)
        && parse_cidr(&d.ip).ok() == Some((w.ip, w.prefix_len))
}

fn link_matches(l: &NsLink, w: &VnicWant) -> bool {
    l.mac == Some(w.mac.0) && l.mtu == w.mtu
}

/// `net0`, `net12`: the names vnics get.
pub fn is_vnic_name(name: &str) -> bool {
    name.strip_prefix("net")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Computes the actions that bring `actual` to `vms` + `firewall`.
pub fn plan(vms: &[Vm], firewall: &FirewallState, actual: &Actual) -> Vec<Action> {
    let mut out = Vec::new();
    if actual.firewall.as_ref() != Some(firewall) {
        out.push(Action::ApplyFirewall);
    }
    let mut dp: BTreeMap<&str, BTreeMap<&str, &VnicInfo>> = BTreeMap::new();
    for v in &actual.dataplane {
        dp.entry(v.netns.as_str())
            .or_default()
            .insert(v.name.as_str(), v);
    }
    let desired: BTreeMap<&str, &Vm> = vms.iter().map(|v| (v.uuid.as_str(), v)).collect();
    let no_links = Vec::new();

    // Owned namespaces no VM wants any more.
    for ns in &actual.owned {
        if desired.contains_key(ns.as_str()) {
            continue;
        }
        for name in dp.get(ns.as_str()).into_iter().flat_map(|m| m.keys()) {
            out.push(Action::DetachVnic {
                vm: ns.clone(),
                name: (*name).to_owned(),
            });
        }
        out.push(Action::DeleteNetns { vm: ns.clone() });
    }

    let mut reports = Vec::new();
    for (&uuid, vm) in &desired {
        let owned = actual.owned.contains(uuid);
        let exists = actual.namespaces.contains(uuid);
        let computed = if exists && !owned {
            Err(format!(
                "network namespace {uuid} exists but was not created by this agent; \
                 remove it (ip netns del {uuid}) to let the agent set the VM up"
            ))
        } else {
            vnic_wants(vm).map_err(|e| e.to_string())
        };
        let wants = match computed {
            Ok(w) => w,
            Err(reason) => {
                reports.push((vm, VmState::Failed, Some(reason)));
                continue;
            }
        };
        let here = owned && exists;
        let links = if here {
            actual.links.get(uuid).unwrap_or(&no_links)
        } else {
            &no_links
        };
        let empty = BTreeMap::new();
        let dpv = dp.get(uuid).unwrap_or(&empty);
        // Stale vnics leave the dataplane before the namespace is made again or changed.
        let mut detach = Vec::new();
        let mut rest = Vec::new();
        for w in &wants {
            let d = dpv.get(w.name.as_str());
            let l = links.iter().find(|l| l.name == w.name);
            let in_place =
                d.is_some_and(|d| dp_matches(d, w)) && l.is_some_and(|l| link_matches(l, w));
            if in_place {
                continue;
            }
            if d.is_some() {
                detach.push(Action::DetachVnic {
                    vm: uuid.to_owned(),
                    name: w.name.clone(),
                });
            }
            if l.is_some() {
                rest.push(Action::RemoveLink {
                    vm: uuid.to_owned(),
                    name: w.name.clone(),
                });
            }
            rest.push(Action::AttachVnic {
                vm: uuid.to_owned(),
                vnic: w.clone(),
            });
        }
        let wanted: BTreeSet<&str> = wants.iter().map(|w| w.name.as_str()).collect();
        for name in dpv.keys().filter(|n| !wanted.contains(*n)) {
            detach.push(Action::DetachVnic {
                vm: uuid.to_owned(),
                name: (*name).to_owned(),
            });
        }
        for l in links
            .iter()
            .filter(|l| is_vnic_name(&l.name) && !wanted.contains(l.name.as_str()))
        {
            rest.push(Action::RemoveLink {
                vm: uuid.to_owned(),
                name: l.name.clone(),
            });
        }
        out.extend(detach);
        if !here {
            out.push(Action::CreateNetns {
                vm: uuid.to_owned(),
            });
        }
        out.extend(rest);
        let state = if vm.desired_state == "stopped" {
            VmState::Stopped
        } else {
            VmState::Running
        };
        reports.push((vm, state, None));
    }
    for (vm, state, reason) in reports {
        if vm.container.is_some() && reason.is_none() {
            // A container's state is its process's: reported by the container step.
            continue;
        }
        let last = actual.reported.get(&vm.uuid);
        let sent = last == Some(&(state, reason.clone()));
        let shown = vm.state == state.as_str() || vm.state == "unknown" || vm.state.is_empty();
        if !sent || !shown {
            out.push(Action::Report {
                vm: vm.uuid.clone(),
                state,
                reason,
            });
        }
    }
    out
}

/// A container as its files show it (see `runtime::Phase`), for [`container_actions`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerView {
    /// Its bundle is complete.
    pub prepared: bool,
    /// A shim is running its process.
    pub running: bool,
    /// The generation last started (`state.json`), if any.
    pub started: Option<u64>,
    /// The last signal id delivered (or skipped).
    pub signal_done: u64,
}

/// One step for a container, after its namespace and vnics are in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerAction {
    /// Layers, root filesystem, bundle (once per VM; kept across restarts).
    Prepare,
    /// Start generation `generation` under a new shim.
    Start {
        /// The generation.
        generation: u64,
    },
    /// Stop the running process: stop signal, SIGKILL after `timeout` s.
    Stop {
        /// Grace period.
        timeout: u32,
    },
    /// Deliver signal `id` to the running process.
    Signal {
        /// The request's id.
        id: u64,
        /// The signal.
        signal: String,
    },
    /// Remember signal `id` as done without delivering it (the process is not running).
    SkipSignal {
        /// The request's id.
        id: u64,
    },
}

/// The steps that bring a container to what `vm` asks: prepared; the process of
/// `vm.generation` running when desired running (never a generation twice: one that ran and
/// ended stays ended, restart policy "no"); stopped when desired stopped; each signal once.
/// `Err` is why the container cannot be run (its spec fails the agent's re-check).
pub fn container_actions(vm: &Vm, view: &ContainerView) -> Result<Vec<ContainerAction>, String> {
    let Some(spec) = &vm.container else {
        return Ok(Vec::new());
    };
    spec.check()?;
    let mut out = Vec::new();
    if !view.prepared {
        out.push(ContainerAction::Prepare);
    }
    let want = vm.generation;
    let timeout = vm.stop_timeout.unwrap_or(spec.stop_timeout);
    if let Some(sig) = &vm.signal {
        if sig.id > view.signal_done {
            out.push(if view.running {
                ContainerAction::Signal {
                    id: sig.id,
                    signal: sig.signal.clone(),
                }
            } else {
                ContainerAction::SkipSignal { id: sig.id }
            });
        }
    }
    if vm.desired_state == "stopped" {
        if view.running {
            out.push(ContainerAction::Stop { timeout });
        }
    } else if view.running {
        if view.started.is_some_and(|g| g < want) {
            // A restart: the old run ends first; the next pass starts the new one.
            out.push(ContainerAction::Stop { timeout });
        }
    } else if want >= 1 && view.started.is_none_or(|g| g < want) {
        out.push(ContainerAction::Start { generation: want });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::compile::{RuleRecord, VmAddress, VmRecord};

    const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";
    const C: &str = "cccccccc-0000-4000-8000-000000000003";

    fn nic(i: u8, vni: Option<u32>) -> Nic {
        Nic {
            interface: format!("net{i}"),
            mac: format!("90:b8:d0:00:00:{:02x}", i + 1),
            ip: format!("10.0.{i}.5"),
            netmask: "255.255.255.0".into(),
            gateway: Some(format!("10.0.{i}.1")),
            mtu: 1400,
            primary: i == 0,
            vnet_id: vni,
            network_uuid: None,
        }
    }

    fn vm(uuid: &str, nics: Vec<Nic>) -> Vm {
        Vm {
            uuid: uuid.into(),
            alias: None,
            owner_uuid: "o".into(),
            state: "provisioning".into(),
            desired_state: "running".into(),
            nics,
            container: None,
            generation: 0,
            signal: None,
            stop_timeout: None,
            run_generation: None,
        }
    }

    fn dp_of(ns: &str, w: &VnicWant) -> VnicInfo {
        let s = w.spec(ns);
        VnicInfo {
            netns: s.netns,
            name: s.name,
            vni: s.vni,
            mac: s.mac,
            ip: s.ip,
            mtu: s.mtu,
            offloads: String::new(),
            state: VnicState::Up,
            state_reason: None,
            state_since_unix_ms: None,
            counters: crate::core::Counters::default().snapshot(),
        }
    }

    fn link_of(w: &VnicWant) -> NsLink {
        NsLink {
            name: w.name.clone(),
            mac: Some(w.mac.0),
            mtu: w.mtu,
        }
    }

    fn fw() -> FirewallState {
        FirewallState {
            vms: vec![VmRecord {
                uuid: A.into(),
                owner_uuid: "11111111-0000-4000-8000-000000000000".into(),
                tags: Default::default(),
                firewall_enabled: true,
                ips: vec![VmAddress {
                    vni: 5,
                    ip: "10.0.0.5".parse().unwrap(),
                }],
            }],
            rules: vec![RuleRecord {
                uuid: "22222222-0000-4000-8000-000000000000".into(),
                owner_uuid: Some("11111111-0000-4000-8000-000000000000".into()),
                global: false,
                enabled: true,
                rule: "FROM any TO all vms ALLOW tcp PORT 22".into(),
            }],
        }
    }

    /// The actual state after `vms` were all set up, reported and `fw` applied.
    fn converged(vms: &[Vm], fw: &FirewallState) -> Actual {
        let mut a = Actual {
            firewall: Some(fw.clone()),
            ..Default::default()
        };
        for v in vms {
            a.owned.insert(v.uuid.clone());
            a.namespaces.insert(v.uuid.clone());
            let wants = vnic_wants(v).unwrap();
            a.links.insert(
                v.uuid.clone(),
                std::iter::once(NsLink {
                    name: "lo".into(),
                    mac: Some([0; 6]),
                    mtu: 65536,
                })
                .chain(wants.iter().map(link_of))
                .collect(),
            );
            a.dataplane.extend(wants.iter().map(|w| dp_of(&v.uuid, w)));
            a.reported.insert(v.uuid.clone(), (VmState::Running, None));
        }
        a
    }

    fn running(vms: &mut [Vm]) {
        for v in vms {
            v.state = "running".into();
        }
    }

    #[test]
    fn netmask_prefixes() {
        assert_eq!(prefix_from_netmask("255.255.255.0"), Some(24));
        assert_eq!(prefix_from_netmask("255.255.0.0"), Some(16));
        assert_eq!(prefix_from_netmask("255.255.255.255"), Some(32));
        assert_eq!(prefix_from_netmask("0.0.0.0"), Some(0));
        assert_eq!(prefix_from_netmask("255.0.255.0"), None);
        assert_eq!(prefix_from_netmask("nope"), None);
    }

    #[test]
    fn vnic_names() {
        assert!(is_vnic_name("net0") && is_vnic_name("net12"));
        assert!(!is_vnic_name("net") && !is_vnic_name("lo") && !is_vnic_name("netx"));
    }

    #[test]
    fn empty_host_gets_everything_created_in_order() {
        let vms = vec![
            vm(B, vec![nic(0, Some(5)), nic(1, Some(5))]),
            vm(A, vec![nic(0, Some(7))]),
        ];
        let p = plan(&vms, &fw(), &Actual::default());
        let wa = vnic_wants(&vms[1]).unwrap();
        let wb = vnic_wants(&vms[0]).unwrap();
        assert_eq!(
            p,
            vec![
                Action::ApplyFirewall,
                Action::CreateNetns { vm: A.into() },
                Action::AttachVnic {
                    vm: A.into(),
                    vnic: wa[0].clone()
                },
                Action::CreateNetns { vm: B.into() },
                Action::AttachVnic {
                    vm: B.into(),
                    vnic: wb[0].clone()
                },
                Action::AttachVnic {
                    vm: B.into(),
                    vnic: wb[1].clone()
                },
                Action::Report {
                    vm: A.into(),
                    state: VmState::Running,
                    reason: None
                },
                Action::Report {
                    vm: B.into(),
                    state: VmState::Running,
                    reason: None
                },
            ]
        );
        // The primary NIC carries the default route, the others do not.
        assert_eq!(wb[0].gateway, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(wb[1].gateway, None);
        assert_eq!((wb[0].prefix_len, wb[0].mtu, wb[0].vni), (24, 1400, 5));
        assert_eq!(wb[0].spec(B).ip, "10.0.0.5/24");
    }

    #[test]
    fn converged_host_needs_nothing() {
        let mut vms = vec![
            vm(A, vec![nic(0, Some(5))]),
            vm(B, vec![nic(0, Some(5)), nic(1, Some(6))]),
        ];
        running(&mut vms);
        let a = converged(&vms, &fw());
        assert_eq!(plan(&vms, &fw(), &a), vec![]);
    }

    #[test]
    fn control_plane_still_provisioning_gets_the_report_again() {
        let vms = vec![vm(A, vec![nic(0, Some(5))])];
        let a = converged(&vms, &fw());
        assert_eq!(
            plan(&vms, &fw(), &a),
            vec![Action::Report {
                vm: A.into(),
                state: VmState::Running,
                reason: None
            }]
        );
        // An "unknown" read (stale heartbeat) is not a reason to report again.
        let mut vms = vms;
        vms[0].state = "unknown".into();
        assert_eq!(plan(&vms, &fw(), &a), vec![]);
        // After a restart nothing was reported yet: every VM is reported once.
        let mut a = a;
        a.reported.clear();
        vms[0].state = "running".into();
        assert_eq!(
            plan(&vms, &fw(), &a),
            vec![Action::Report {
                vm: A.into(),
                state: VmState::Running,
                reason: None
            }]
        );
    }

    #[test]
    fn a_differing_vnic_alone_is_recreated() {
        let mut vms = vec![vm(A, vec![nic(0, Some(5)), nic(1, Some(5))])];
        running(&mut vms);
        let base = converged(&vms, &fw());
        let w1 = vnic_wants(&vms[0]).unwrap()[1].clone();
        let recreate = vec![
            Action::DetachVnic {
                vm: A.into(),
                name: "net1".into(),
            },
            Action::RemoveLink {
                vm: A.into(),
                name: "net1".into(),
            },
            Action::AttachVnic {
                vm: A.into(),
                vnic: w1.clone(),
            },
        ];
        type Edit = fn(&mut Actual);
        let edits: [(&str, Edit); 6] = [
            ("mac in dataplane", |a| {
                a.dataplane[1].mac = "90:b8:d0:00:00:99".into()
            }),
            ("ip", |a| a.dataplane[1].ip = "10.0.1.6/24".into()),
            ("prefix", |a| a.dataplane[1].ip = "10.0.1.5/16".into()),
            ("mtu", |a| a.dataplane[1].mtu = 1500),
            ("vni", |a| a.dataplane[1].vni = 6),
            ("link mac", |a| {
                a.links.get_mut(A).unwrap()[2].mac = Some([2, 0, 0, 0, 0, 9])
            }),
        ];
        for (what, edit) in edits {
            let mut a = base.clone();
            edit(&mut a);
            assert_eq!(plan(&vms, &fw(), &a), recreate, "{what}");
        }
        // The NIC's record changed (e.g. a new IP): the vnic follows.
        let mut moved = vms.clone();
        moved[0].nics[1].ip = "10.0.1.9".into();
        let w = vnic_wants(&moved[0]).unwrap()[1].clone();
        assert_eq!(
            plan(&moved, &fw(), &base),
            vec![
                Action::DetachVnic {
                    vm: A.into(),
                    name: "net1".into()
                },
                Action::RemoveLink {
                    vm: A.into(),
                    name: "net1".into()
                },
                Action::AttachVnic {
                    vm: A.into(),
                    vnic: w
                },
            ]
        );
    }

    #[test]
    fn undesired_owned_namespace_is_detached_then_deleted() {
        let mut vms = vec![vm(A, vec![nic(0, Some(5))]), vm(B, vec![nic(0, Some(5))])];
        running(&mut vms);
        let a = converged(&vms, &fw());
        assert_eq!(
            plan(&vms[..1], &fw(), &a),
            vec![
                Action::DetachVnic {
                    vm: B.into(),
                    name: "net0".into()
                },
                Action::DeleteNetns { vm: B.into() },
            ]
        );
        // Owned but already gone by hand: forgotten (delete is idempotent), vnic detached.
        let mut a2 = a.clone();
        a2.namespaces.remove(B);
        a2.links.remove(B);
        a2.dataplane[1].state = VnicState::Gone;
        assert_eq!(
            plan(&vms[..1], &fw(), &a2),
            vec![
                Action::DetachVnic {
                    vm: B.into(),
                    name: "net0".into()
                },
                Action::DeleteNetns { vm: B.into() },
            ]
        );
    }

    #[test]
    fn namespaces_not_owned_are_never_touched() {
        let mut vms = vec![vm(A, vec![nic(0, Some(5))])];
        running(&mut vms);
        let mut a = converged(&vms, &fw());
        // Someone else's namespace with a vnic in the dataplane (`fabric vnic add` by hand).
        a.namespaces.insert("ops-test".into());
        let w = vnic_wants(&vm(C, vec![nic(3, Some(9))])).unwrap();
        a.dataplane.push(dp_of("ops-test", &w[0]));
        assert_eq!(plan(&vms, &fw(), &a), vec![]);
        // A desired VM whose namespace exists but is not ours: failed, nothing done to it.
        let mut vms2 = vms.clone();
        vms2.push(vm(C, vec![nic(0, Some(5))]));
        a.namespaces.insert(C.into());
        a.dataplane.push(dp_of(C, &w[0]));
        let p = plan(&vms2, &fw(), &a);
        assert_eq!(p.len(), 1, "{p:?}");
        match &p[0] {
            Action::Report {
                vm,
                state: VmState::Failed,
                reason: Some(r),
            } => {
                assert_eq!(vm, C);
                assert!(r.contains("not created by this agent"), "{r}");
            }
            other => panic!("{other:?}"),
        }
        assert!(p.iter().all(|x| x.vm() != Some("ops-test")));
    }

    #[test]
    fn restarted_dataplane_gets_links_replaced_and_vnics_attached() {
        let mut vms = vec![vm(A, vec![nic(0, Some(5)), nic(1, Some(5))])];
        running(&mut vms);
        let mut a = converged(&vms, &fw());
        a.dataplane.clear();
        a.firewall = None;
        let w = vnic_wants(&vms[0]).unwrap();
        assert_eq!(
            plan(&vms, &fw(), &a),
            vec![
                Action::ApplyFirewall,
                Action::RemoveLink {
                    vm: A.into(),
                    name: "net0".into()
                },
                Action::AttachVnic {
                    vm: A.into(),
                    vnic: w[0].clone()
                },
                Action::RemoveLink {
                    vm: A.into(),
                    name: "net1".into()
                },
                Action::AttachVnic {
                    vm: A.into(),
                    vnic: w[1].clone()
                },
            ]
        );
    }

    #[test]
    fn namespace_deleted_by_hand_is_made_again() {
        let mut vms = vec![vm(A, vec![nic(0, Some(5))])];
        running(&mut vms);
        let mut a = converged(&vms, &fw());
        a.namespaces.remove(A);
        a.links.remove(A);
        a.dataplane[0].state = VnicState::Orphaned;
        let w = vnic_wants(&vms[0]).unwrap();
        assert_eq!(
            plan(&vms, &fw(), &a),
            vec![
                Action::DetachVnic {
                    vm: A.into(),
                    name: "net0".into()
                },
                Action::CreateNetns { vm: A.into() },
                Action::AttachVnic {
                    vm: A.into(),
                    vnic: w[0].clone()
                },
            ]
        );
    }

    #[test]
    fn extra_vnics_and_links_are_removed() {
        let mut vms = vec![vm(A, vec![nic(0, Some(5)), nic(1, Some(5))])];
        running(&mut vms);
        let a = converged(&vms, &fw());
        let mut fewer = vms.clone();
        fewer[0].nics.pop();
        assert_eq!(
            plan(&fewer, &fw(), &a),
            vec![
                Action::DetachVnic {
                    vm: A.into(),
                    name: "net1".into()
                },
                Action::RemoveLink {
                    vm: A.into(),
                    name: "net1".into()
                },
            ]
        );
    }

    #[test]
    fn nic_without_vnet_id_fails_the_vm_with_a_reason() {
        let vms = vec![
            vm(A, vec![nic(0, Some(5)), nic(1, None)]),
            vm(B, vec![nic(0, Some(5))]),
        ];
        let p = plan(&vms, &fw(), &Actual::default());
        assert!(p
            .iter()
            .all(|x| !matches!(x, Action::CreateNetns { vm } if vm == A)));
        let r = p
            .iter()
            .find_map(|x| match x {
                Action::Report {
                    vm,
                    state: VmState::Failed,
                    reason,
                } if vm == A => reason.clone(),
                _ => None,
            })
            .expect("a failed report for A");
        assert!(r.contains("net1") && r.contains("vnet_id"), "{r}");
        assert!(p.contains(&Action::CreateNetns { vm: B.into() }));
        // Once reported (and shown), the failure is not reported again.
        let mut a = Actual::default();
        a.reported.insert(A.into(), (VmState::Failed, Some(r)));
        let mut vms = vms;
        vms[0].state = "failed".into();
        let p = plan(&vms, &fw(), &a);
        assert!(p.iter().all(|x| x.vm() != Some(A)), "{p:?}");
    }

    #[test]
    fn bad_nic_fields_fail_the_vm() {
        for (edit, want) in [
            (
                (|n: &mut Nic| n.netmask = "255.0.255.0".into()) as fn(&mut Nic),
                "netmask",
            ),
            (|n| n.mac = "ff:ff:ff:ff:ff:ff".into(), "unicast"),
            (|n| n.ip = "10.0.0.0".into(), "network address"),
            (|n| n.gateway = Some("gw".into()), "gateway"),
            (|n| n.mtu = 70000, "mtu"),
        ] {
            let mut n = nic(0, Some(5));
            edit(&mut n);
            let e = vnic_wants(&vm(A, vec![n])).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = vnic_wants(&vm(A, vec![nic(0, Some(5)), nic(0, Some(5))])).unwrap_err();
        assert_eq!(e, NicError::Duplicate("net0".into()));
    }

    #[test]
    fn firewall_applied_only_when_it_differs() {
        let mut vms = vec![vm(A, vec![nic(0, Some(5))])];
        running(&mut vms);
        let a = converged(&vms, &fw());
        assert_eq!(plan(&vms, &fw(), &a), vec![]);
        let mut f2 = fw();
        f2.rules[0].enabled = false;
        assert_eq!(plan(&vms, &f2, &a), vec![Action::ApplyFirewall]);
        // Never applied since the dataplane (re)started: applied even when empty.
        let a2 = Actual::default();
        assert!(a2.firewall.is_none());
        assert_eq!(
            plan(&[], &FirewallState::default(), &a2),
            vec![Action::ApplyFirewall]
        );
    }

    #[test]
    fn stopped_vms_are_reported_stopped() {
        let mut vms = vec![vm(A, vec![nic(0, Some(5))])];
        running(&mut vms);
        vms[0].desired_state = "stopped".into();
        let a = converged(&vms, &fw());
        assert_eq!(
            plan(&vms, &fw(), &a),
            vec![Action::Report {
                vm: A.into(),
                state: VmState::Stopped,
                reason: None
            }]
        );
    }

    fn ct(desired: &str, generation: u64) -> Vm {
        let mut v = vm(A, vec![nic(0, Some(5))]);
        v.desired_state = desired.into();
        v.generation = generation;
        v.container = Some(crate::control::container_spec::ContainerSpec {
            cmd: vec!["sh".into()],
            stop_timeout: 10,
            uid_base: crate::control::container_spec::UID_BASE_START,
            ..Default::default()
        });
        v
    }

    #[test]
    fn a_new_container_is_prepared_then_started_once_per_generation() {
        let fresh = ContainerView::default();
        // Created, never started: prepared only.
        assert_eq!(
            container_actions(&ct("stopped", 0), &fresh).unwrap(),
            vec![ContainerAction::Prepare]
        );
        assert_eq!(
            container_actions(&ct("running", 1), &fresh).unwrap(),
            vec![
                ContainerAction::Prepare,
                ContainerAction::Start { generation: 1 }
            ]
        );
        let prepared = ContainerView {
            prepared: true,
            ..Default::default()
        };
        assert_eq!(
            container_actions(&ct("running", 1), &prepared).unwrap(),
            vec![ContainerAction::Start { generation: 1 }]
        );
        // Generation 1 ran and ended: never again, though desired is still running.
        let ended = ContainerView {
            prepared: true,
            started: Some(1),
            ..Default::default()
        };
        assert_eq!(
            container_actions(&ct("running", 1), &ended).unwrap(),
            vec![]
        );
        // `docker start` again: generation 2.
        assert_eq!(
            container_actions(&ct("running", 2), &ended).unwrap(),
            vec![ContainerAction::Start { generation: 2 }]
        );
        // Running the wanted generation: nothing.
        let running = ContainerView {
            running: true,
            ..ended.clone()
        };
        assert_eq!(
            container_actions(&ct("running", 1), &running).unwrap(),
            vec![]
        );
    }

    #[test]
    fn stop_restart_and_the_grace_period() {
        let running = ContainerView {
            prepared: true,
            running: true,
            started: Some(3),
            signal_done: 0,
        };
        assert_eq!(
            container_actions(&ct("stopped", 3), &running).unwrap(),
            vec![ContainerAction::Stop { timeout: 10 }]
        );
        let mut v = ct("running", 4);
        v.stop_timeout = Some(1);
        assert_eq!(
            container_actions(&v, &running).unwrap(),
            vec![ContainerAction::Stop { timeout: 1 }],
            "a restart stops the old run first"
        );
        let stopped = ContainerView {
            running: false,
            ..running
        };
        assert_eq!(
            container_actions(&ct("stopped", 3), &stopped).unwrap(),
            vec![]
        );
    }

    #[test]
    fn each_signal_once() {
        let mut v = ct("running", 1);
        v.signal = Some(crate::control::container_spec::SignalRequest {
            id: 2,
            signal: "SIGHUP".into(),
        });
        let mut view = ContainerView {
            prepared: true,
            running: true,
            started: Some(1),
            signal_done: 1,
        };
        assert_eq!(
            container_actions(&v, &view).unwrap(),
            vec![ContainerAction::Signal {
                id: 2,
                signal: "SIGHUP".into()
            }]
        );
        view.signal_done = 2;
        assert_eq!(container_actions(&v, &view).unwrap(), vec![]);
        // Not running: remembered as done, not delivered to a later run.
        view.signal_done = 1;
        view.running = false;
        v.desired_state = "stopped".into();
        assert_eq!(
            container_actions(&v, &view).unwrap(),
            vec![ContainerAction::SkipSignal { id: 2 }]
        );
    }

    #[test]
    fn a_refused_spec_fails_the_container_and_its_vm_report_is_left_to_it() {
        let mut v = ct("running", 1);
        v.container.as_mut().unwrap().working_dir = "relative".into();
        let e = container_actions(&v, &ContainerView::default()).unwrap_err();
        assert!(e.contains("not absolute"), "{e}");
        // The network part reports nothing for a healthy container VM.
        let p = plan(&[ct("running", 1)], &fw(), &Actual::default());
        assert!(
            p.iter().all(|a| !matches!(a, Action::Report { .. })),
            "{p:?}"
        );
        assert!(p.contains(&Action::CreateNetns { vm: A.into() }));
    }
}
