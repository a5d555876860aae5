//! Executes a reconcile's [`Action`]s on this host: network namespaces (through
//! [`crate::io::netlink`]), vnics (created in the namespace and attached to the dataplane) and
//! the dataplane's control socket (`vnic_ls`, `vnic_rm`, `fw_apply`).
//!
//! The namespaces this agent created are remembered in `STATE_DIR/owned.json`, written
//! atomically (temporary file, fsync, rename) *before* a namespace is created and after one is
//! deleted, so a crash between the two leaves at worst a name the next run cleans up, never a
//! namespace the agent forgot it made. Nothing outside that set is ever touched.
//!
//! [`Host`] is the seam between the executor ([`execute`]) and the machine, so the executor's
//! failure and report handling is unit tested with a fake host.

use crate::dataplane::provision::{self, VnicProvision};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::api::{StateReport, VmState};
use super::plan::{Action, Actual, NsLink, VnicWant};
use crate::dataplane::control::{self, ControlError, Request, VnicInfo};
use crate::firewall::compile::FirewallState;
use crate::io::netlink::{Netlink, NetlinkError, Netns};

/// The sysctls every VM namespace gets (DESIGN "Shared decisions").
pub const NETNS_SYSCTLS: [(&str, &str); 2] = [
    ("net/ipv4/ip_unprivileged_port_start", "0"),
    ("net/ipv4/ping_group_range", "0 2147483647"),
];

const RUN_NETNS: &str = "/run/netns";

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A namespace or link operation failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: NetlinkError,
    },
    /// The dataplane refused or could not be reached.
    #[error("dataplane {what}: {source}")]
    Dataplane {
        /// The request.
        what: String,
        /// Why it failed.
        #[source]
        source: ControlError,
    },
    /// A file of the agent's (state file, sysctl) could not be read or written.
    #[error("{what}: {source}")]
    File {
        /// What was being done, with the path.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A vnic the snapshot asks for cannot be built (the dataplane would refuse it too).
    #[error("{what}: {detail}")]
    Invalid {
        /// Which vnic.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Creating a vnic's TAP in the namespace failed.
    #[error("{what}: {source}")]
    Provision {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: crate::dataplane::provision::ProvisionError,
    },
    /// The state file is not what this agent writes.
    #[error("state file {path}: {detail} (expected {{\"namespaces\": [\"<vm uuid>\", …]}})")]
    BadState {
        /// Its path.
        path: String,
        /// The decoding error.
        detail: String,
    },
}

impl HostError {
    /// Whether the dataplane could not be reached at all.
    pub fn is_dataplane_down(&self) -> bool {
        matches!(
            self,
            HostError::Dataplane {
                source: ControlError::Connect { .. } | ControlError::Protocol(_),
                ..
            }
        )
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(NetlinkError) -> HostError {
    let what = what.into();
    move |source| HostError::Netlink { what, source }
}

/// What the executor needs from the machine.
pub trait Host {
    /// Namespaces under `/run/netns`, the links of owned ones, and the dataplane's vnics.
    fn observe(&mut self) -> Result<Actual, HostError>;
    /// Namespaces this agent created.
    fn owned(&self) -> &BTreeSet<String>;
    /// `fw_apply`.
    fn apply_firewall(&mut self, fw: &FirewallState) -> Result<(), HostError>;
    /// `members`: replace the dataplane's member set.
    fn apply_members(&mut self, members: &[IpAddr]) -> Result<(), HostError>;
    /// Records the namespace as owned, creates it, sets its sysctls and brings loopback up.
    fn create_netns(&mut self, vm: &str) -> Result<(), HostError>;
    /// `vnic_rm` (a vnic the dataplane does not have counts as detached).
    fn detach_vnic(&mut self, vm: &str, name: &str) -> Result<(), HostError>;
    /// Deletes a link in the namespace (a missing one counts as removed).
    fn remove_link(&mut self, vm: &str, name: &str) -> Result<(), HostError>;
    /// Creates the vnic in the namespace and attaches it to the dataplane.
    fn attach_vnic(&mut self, vm: &str, vnic: &VnicWant) -> Result<(), HostError>;
    /// Deletes the namespace (if it exists) and forgets it as owned.
    fn delete_netns(&mut self, vm: &str) -> Result<(), HostError>;
}

/// What one reconcile did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Actions that succeeded (reports excluded).
    pub done: usize,
    /// Actions that failed.
    pub failed: usize,
    /// Actions skipped because an earlier one for the same VM failed.
    pub skipped: usize,
    /// Whether the firewall state was applied.
    pub firewall_applied: bool,
    /// Reports to send.
    pub reports: Vec<StateReport>,
    /// Failures (VM or `firewall`, error), for the logs.
    pub errors: Vec<(String, String)>,
}

/// Sends the snapshot's member set to the dataplane when it differs from `pushed`, what was
/// last pushed (the caller forgets that when the dataplane looks restarted, as for the
/// firewall). `want` `None`: the control plane sends no members; the dataplane is left alone.
/// Returns whether a push was made; on failure `pushed` is cleared so the next run tries again.
pub fn sync_members<H: Host>(
    host: &mut H,
    pushed: &mut Option<Vec<IpAddr>>,
    want: Option<&[IpAddr]>,
) -> Result<bool, HostError> {
    let Some(want) = want else {
        return Ok(false);
    };
    let mut want = want.to_vec();
    want.sort();
    want.dedup();
    if pushed.as_deref() == Some(&want[..]) {
        return Ok(false);
    }
    match host.apply_members(&want) {
        Ok(()) => {
            tracing::info!(members = want.len(), "member set pushed to the dataplane");
            *pushed = Some(want);
            Ok(true)
        }
        Err(e) => {
            *pushed = None;
            Err(e)
        }
    }
}

/// Runs `actions` in order. After a VM's action fails, its remaining actions are skipped and
/// its report becomes `failed` with the error (sent only if that differs from the last one).
pub fn execute<H: Host>(
    host: &mut H,
    actions: &[Action],
    firewall: &FirewallState,
    reported: &BTreeMap<String, (VmState, Option<String>)>,
) -> Outcome {
    let mut out = Outcome::default();
    let mut broken: BTreeMap<String, String> = BTreeMap::new();
    for a in actions {
        let vm = a.vm().map(str::to_owned);
        if let Some(v) = &vm {
            if broken.contains_key(v) && !matches!(a, Action::Report { .. }) {
                out.skipped += 1;
                continue;
            }
        }
        let r = match a {
            Action::ApplyFirewall => host.apply_firewall(firewall).map(|()| {
                out.firewall_applied = true;
            }),
            Action::CreateNetns { vm } => host.create_netns(vm),
            Action::DetachVnic { vm, name } => host.detach_vnic(vm, name),
            Action::RemoveLink { vm, name } => host.remove_link(vm, name),
            Action::AttachVnic { vm, vnic } => host.attach_vnic(vm, vnic),
            Action::DeleteNetns { vm } => host.delete_netns(vm),
            Action::Report { vm, state, reason } => {
                let (state, reason) = match broken.get(vm) {
                    Some(e) => (VmState::Failed, Some(e.clone())),
                    None => (*state, reason.clone()),
                };
                out.reports.push(StateReport::vm(vm.clone(), state, reason));
                continue;
            }
        };
        match r {
            Ok(()) => {
                out.done += 1;
                tracing::info!(action = ?Brief(a), "done");
            }
            Err(e) => {
                out.failed += 1;
                let msg = e.to_string();
                tracing::warn!(action = ?Brief(a), error = %msg, "failed");
                let key = vm.clone().unwrap_or_else(|| "firewall".into());
                out.errors.push((key, msg.clone()));
                if let Some(v) = vm {
                    broken.insert(v, msg);
                }
            }
        }
    }
    // A VM that broke but had no report planned (it was reported running before) is reported
    // failed now.
    for (vm, e) in broken {
        let planned = out.reports.iter().any(|r| r.uuid == vm);
        let deleted = actions
            .iter()
            .any(|a| matches!(a, Action::DeleteNetns { vm: v } if *v == vm));
        if !planned && !deleted {
            out.reports
                .push(StateReport::vm(vm, VmState::Failed, Some(e)));
        }
    }
    out.reports.retain(|r| {
        reported.get(&r.uuid) != Some(&(r.state, r.reason.clone())) || r.state != VmState::Failed
    });
    out
}

/// An action for a log line (a vnic by name, address and VNI, not all its fields).
struct Brief<'a>(&'a Action);

impl std::fmt::Debug for Brief<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Action::ApplyFirewall => write!(f, "apply firewall"),
            Action::CreateNetns { vm } => write!(f, "create netns {vm}"),
            Action::DetachVnic { vm, name } => write!(f, "detach vnic {vm}/{name}"),
            Action::RemoveLink { vm, name } => write!(f, "remove link {vm}/{name}"),
            Action::AttachVnic { vm, vnic } => write!(
                f,
                "attach vnic {vm}/{} {} {}/{} vni {} mtu {}",
                vnic.name, vnic.mac, vnic.ip, vnic.prefix_len, vnic.vni, vnic.mtu
            ),
            Action::DeleteNetns { vm } => write!(f, "delete netns {vm}"),
            Action::Report { vm, state, .. } => write!(f, "report {vm} {}", state.as_str()),
        }
    }
}

/// The state file's shape.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnedFile {
    namespaces: BTreeSet<String>,
}

/// The real host: `/run/netns`, rtnetlink and the dataplane's socket.
pub struct LinuxHost {
    dataplane: PathBuf,
    state_file: PathBuf,
    owned: BTreeSet<String>,
}

impl LinuxHost {
    /// Opens the state directory (created if missing) and reads which namespaces are ours.
    pub fn open(dataplane: &Path, state_dir: &Path) -> Result<LinuxHost, HostError> {
        std::fs::create_dir_all(state_dir).map_err(|source| HostError::File {
            what: format!("creating state directory {}", state_dir.display()),
            source,
        })?;
        let state_file = state_dir.join("owned.json");
        let owned = match std::fs::read(&state_file) {
            Ok(b) => {
                serde_json::from_slice::<OwnedFile>(&b)
                    .map_err(|e| HostError::BadState {
                        path: state_file.display().to_string(),
                        detail: e.to_string(),
                    })?
                    .namespaces
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(source) => {
                return Err(HostError::File {
                    what: format!("reading {}", state_file.display()),
                    source,
                })
            }
        };
        Ok(LinuxHost {
            dataplane: dataplane.to_owned(),
            state_file,
            owned,
        })
    }

    fn save(&self) -> Result<(), HostError> {
        let file = OwnedFile {
            namespaces: self.owned.clone(),
        };
        write_atomic(
            &self.state_file,
            &serde_json::to_vec_pretty(&file).unwrap_or_default(),
        )
    }

    fn call(&self, what: &str, req: &Request) -> Result<serde_json::Value, HostError> {
        control::call(&self.dataplane, req).map_err(|source| HostError::Dataplane {
            what: what.to_owned(),
            source,
        })
    }

    /// The dataplane's vnics.
    pub fn vnic_ls(&self) -> Result<Vec<VnicInfo>, HostError> {
        let v = self.call("vnic_ls", &Request::VnicLs {})?;
        serde_json::from_value(v).map_err(|e| HostError::Dataplane {
            what: "vnic_ls".into(),
            source: ControlError::Protocol(format!("unexpected answer: {e}")),
        })
    }

    fn setup_netns(ns: &Netns, vm: &str) -> Result<(), HostError> {
        ns.run(|| -> Result<(), HostError> {
            for (key, value) in NETNS_SYSCTLS {
                let path = format!("/proc/sys/{key}");
                std::fs::write(&path, value).map_err(|source| HostError::File {
                    what: format!("sysctl {path}={value} in netns {vm}"),
                    source,
                })?;
            }
            let mut link = Netlink::open().map_err(nl(format!("netlink in netns {vm}")))?;
            let lo = link
                .link_by_name("lo")
                .map_err(nl(format!("lo in netns {vm}")))?;
            link.set_up(lo.index, true)
                .map_err(nl(format!("lo up in netns {vm}")))
        })
        .map_err(nl(format!("entering netns {vm}")))?
    }
}

/// Writes `data` to `path` through a temporary file in the same directory, fsynced, renamed.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), HostError> {
    let tmp = path.with_extension("json.tmp");
    let err = |what: &str| {
        let what = format!("{what} {}", tmp.display());
        move |source| HostError::File { what, source }
    };
    let mut f = std::fs::File::create(&tmp).map_err(err("creating"))?;
    f.write_all(data).map_err(err("writing"))?;
    f.sync_all().map_err(err("syncing"))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|source| HostError::File {
        what: format!("renaming {} to {}", tmp.display(), path.display()),
        source,
    })
}

fn is_enodev(e: &NetlinkError) -> bool {
    match e {
        NetlinkError::Kernel { source, .. } | NetlinkError::Sys { source, .. } => {
            matches!(
                source.raw_os_error(),
                Some(libc::ENODEV) | Some(libc::ENOENT)
            )
        }
        _ => false,
    }
}

impl Host for LinuxHost {
    fn observe(&mut self) -> Result<Actual, HostError> {
        let dataplane = self.vnic_ls()?;
        let mut namespaces = BTreeSet::new();
        match std::fs::read_dir(RUN_NETNS) {
            Ok(rd) => {
                for e in rd.flatten() {
                    if let Some(n) = e.file_name().to_str() {
                        namespaces.insert(n.to_owned());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(HostError::File {
                    what: format!("listing {RUN_NETNS}"),
                    source,
                })
            }
        }
        let mut links = BTreeMap::new();
        for vm in &self.owned {
            if !namespaces.contains(vm) {
                continue;
            }
            let listed = Netns::open(vm)
                .and_then(|ns| Netlink::open_in(&ns))
                .and_then(|mut n| n.links());
            match listed {
                Ok(l) => {
                    links.insert(
                        vm.clone(),
                        l.into_iter()
                            .map(|l| NsLink {
                                name: l.name,
                                mac: l.mac,
                                mtu: l.mtu,
                            })
                            .collect::<Vec<_>>(),
                    );
                }
                Err(e) => {
                    // A name without a live namespace behind it (a half-made one): treated as
                    // missing, so it is made again.
                    tracing::warn!(netns = %vm, error = %e, "cannot list links; treating namespace as missing");
                    namespaces.remove(vm);
                }
            }
        }
        Ok(Actual {
            owned: self.owned.clone(),
            namespaces,
            links,
            dataplane,
            ..Default::default()
        })
    }

    fn owned(&self) -> &BTreeSet<String> {
        &self.owned
    }

    fn apply_firewall(&mut self, fw: &FirewallState) -> Result<(), HostError> {
        self.call("fw_apply", &Request::FwApply { state: fw.clone() })
            .map(|_| ())
    }

    fn apply_members(&mut self, members: &[IpAddr]) -> Result<(), HostError> {
        self.call(
            "members",
            &Request::Members {
                members: Some(members.to_vec()),
            },
        )
        .map(|_| ())
    }

    fn create_netns(&mut self, vm: &str) -> Result<(), HostError> {
        if self.owned.insert(vm.to_owned()) {
            if let Err(e) = self.save() {
                self.owned.remove(vm);
                return Err(e);
            }
        }
        if Netns::exists(vm) {
            // A name left by a crash between create and setup, or a dead mount: start over.
            Netns::delete(vm).map_err(nl(format!("deleting stale netns {vm}")))?;
        }
        let ns = Netns::create(vm).map_err(nl(format!("creating netns {vm}")))?;
        if let Err(e) = Self::setup_netns(&ns, vm) {
            let _ = Netns::delete(vm);
            return Err(e);
        }
        Ok(())
    }

    fn detach_vnic(&mut self, vm: &str, name: &str) -> Result<(), HostError> {
        let req = Request::VnicRm {
            netns: vm.to_owned(),
            name: name.to_owned(),
        };
        match self.call(&format!("vnic_rm {vm}/{name}"), &req) {
            Err(HostError::Dataplane {
                source: ControlError::Refused(m),
                ..
            }) if m.starts_with("no vnic") => Ok(()),
            r => r.map(|_| ()),
        }
    }

    fn remove_link(&mut self, vm: &str, name: &str) -> Result<(), HostError> {
        let ns = match Netns::open(vm) {
            Ok(ns) => ns,
            Err(e) if is_enodev(&e) => return Ok(()),
            Err(e) => return Err(nl(format!("opening netns {vm}"))(e)),
        };
        let mut n = Netlink::open_in(&ns).map_err(nl(format!("netlink in netns {vm}")))?;
        let link = match n.link_by_name(name) {
            Ok(l) => l,
            Err(e) if is_enodev(&e) => return Ok(()),
            Err(e) => return Err(nl(format!("link {name} in netns {vm}"))(e)),
        };
        match n.delete_link(link.index) {
            Err(e) if !is_enodev(&e) => Err(nl(format!("deleting link {name} in netns {vm}"))(e)),
            _ => Ok(()),
        }
    }

    /// Creates the TAP in the VM's namespace (MAC, address, MTU, up, default route via the
    /// gateway) and hands its queue fds to the dataplane (`vnic_attach`, SCM_RIGHTS); the
    /// dataplane then owns the device. On a refused attach the link is removed again.
    fn attach_vnic(&mut self, vm: &str, w: &VnicWant) -> Result<(), HostError> {
        let spec = w.spec(vm);
        let prov = VnicProvision::from_spec(&spec, w.gateway).map_err(|e| HostError::Invalid {
            what: format!("vnic {vm}/{}", w.name),
            detail: e.to_string(),
        })?;
        let ns = Netns::open(vm).map_err(nl(format!("opening netns {vm}")))?;
        let taps = provision::create_vnic(&ns, &prov).map_err(|source| HostError::Provision {
            what: format!("creating vnic {vm}/{}", w.name),
            source,
        })?;
        let r = control::attach(&self.dataplane, &spec, &taps);
        // The dataplane holds its own copies of the queue fds now.
        drop(taps);
        match r {
            Ok(_) => Ok(()),
            Err(source) => {
                let _ = provision::remove_vnic(&ns, &w.name);
                Err(HostError::Dataplane {
                    what: format!("vnic_attach {vm}/{}", w.name),
                    source,
                })
            }
        }
    }

    fn delete_netns(&mut self, vm: &str) -> Result<(), HostError> {
        if Netns::exists(vm) {
            Netns::delete(vm).map_err(nl(format!("deleting netns {vm}")))?;
        }
        if self.owned.remove(vm) {
            self.save()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records calls; fails the ones listed.
    #[derive(Default)]
    struct Fake {
        owned: BTreeSet<String>,
        calls: Vec<String>,
        fail: BTreeSet<String>,
    }

    impl Fake {
        fn op(&mut self, s: String) -> Result<(), HostError> {
            self.calls.push(s.clone());
            if self.fail.contains(&s) {
                Err(HostError::File {
                    what: s,
                    source: std::io::Error::other("boom"),
                })
            } else {
                Ok(())
            }
        }
    }

    impl Host for Fake {
        fn observe(&mut self) -> Result<Actual, HostError> {
            Ok(Actual::default())
        }
        fn owned(&self) -> &BTreeSet<String> {
            &self.owned
        }
        fn apply_firewall(&mut self, _: &FirewallState) -> Result<(), HostError> {
            self.op("fw".into())
        }
        fn apply_members(&mut self, m: &[IpAddr]) -> Result<(), HostError> {
            self.op(format!("members {m:?}"))
        }
        fn create_netns(&mut self, vm: &str) -> Result<(), HostError> {
            self.op(format!("create {vm}"))
        }
        fn detach_vnic(&mut self, vm: &str, name: &str) -> Result<(), HostError> {
            self.op(format!("detach {vm}/{name}"))
        }
        fn remove_link(&mut self, vm: &str, name: &str) -> Result<(), HostError> {
            self.op(format!("rmlink {vm}/{name}"))
        }
        fn attach_vnic(&mut self, vm: &str, w: &VnicWant) -> Result<(), HostError> {
            self.op(format!("attach {vm}/{}", w.name))
        }
        fn delete_netns(&mut self, vm: &str) -> Result<(), HostError> {
            self.op(format!("delete {vm}"))
        }
    }

    fn want(name: &str) -> VnicWant {
        VnicWant {
            name: name.into(),
            vni: 5,
            mac: "02:00:00:00:00:01".parse().unwrap(),
            ip: "10.0.0.2".parse().unwrap(),
            prefix_len: 24,
            mtu: 1400,
            gateway: None,
        }
    }

    fn plan_two() -> Vec<Action> {
        vec![
            Action::ApplyFirewall,
            Action::CreateNetns { vm: "a".into() },
            Action::AttachVnic {
                vm: "a".into(),
                vnic: want("net0"),
            },
            Action::AttachVnic {
                vm: "a".into(),
                vnic: want("net1"),
            },
            Action::CreateNetns { vm: "b".into() },
            Action::AttachVnic {
                vm: "b".into(),
                vnic: want("net0"),
            },
            Action::Report {
                vm: "a".into(),
                state: VmState::Running,
                reason: None,
            },
            Action::Report {
                vm: "b".into(),
                state: VmState::Running,
                reason: None,
            },
        ]
    }

    #[test]
    fn all_succeed() {
        let mut h = Fake::default();
        let o = execute(
            &mut h,
            &plan_two(),
            &FirewallState::default(),
            &BTreeMap::new(),
        );
        assert_eq!(
            (o.done, o.failed, o.skipped, o.firewall_applied),
            (6, 0, 0, true)
        );
        assert_eq!(o.reports.len(), 2);
        assert!(o.reports.iter().all(|r| r.state == VmState::Running));
    }

    #[test]
    fn a_failure_skips_the_rest_of_that_vm_and_reports_it_failed() {
        let mut h = Fake::default();
        h.fail.insert("attach a/net0".into());
        h.fail.insert("fw".into());
        let o = execute(
            &mut h,
            &plan_two(),
            &FirewallState::default(),
            &BTreeMap::new(),
        );
        assert_eq!(
            (o.done, o.failed, o.skipped, o.firewall_applied),
            (3, 2, 1, false)
        );
        assert!(!h.calls.contains(&"attach a/net1".to_string()));
        assert!(h.calls.contains(&"attach b/net0".to_string()));
        let a = o.reports.iter().find(|r| r.uuid == "a").unwrap();
        assert_eq!(a.state, VmState::Failed);
        assert!(a.reason.as_deref().unwrap().contains("attach a/net0: boom"));
        assert_eq!(
            o.reports.iter().find(|r| r.uuid == "b").unwrap().state,
            VmState::Running
        );
        assert_eq!(o.errors.len(), 2);
    }

    #[test]
    fn a_vm_reported_running_before_is_reported_failed_when_a_repair_fails() {
        let mut h = Fake::default();
        h.fail.insert("attach a/net0".into());
        let plan = vec![Action::AttachVnic {
            vm: "a".into(),
            vnic: want("net0"),
        }];
        let o = execute(&mut h, &plan, &FirewallState::default(), &BTreeMap::new());
        assert_eq!(o.reports.len(), 1);
        assert_eq!(o.reports[0].state, VmState::Failed);
        // The same failure already reported: not sent again.
        let mut rep = BTreeMap::new();
        rep.insert(
            "a".to_string(),
            (VmState::Failed, o.reports[0].reason.clone()),
        );
        let o = execute(&mut h, &plan, &FirewallState::default(), &rep);
        assert!(o.reports.is_empty(), "{:?}", o.reports);
        // A failed delete of an undesired namespace reports nothing (the VM is not ours).
        h.fail.insert("delete z".into());
        let o = execute(
            &mut h,
            &[Action::DeleteNetns { vm: "z".into() }],
            &FirewallState::default(),
            &BTreeMap::new(),
        );
        assert!(o.reports.is_empty() && o.failed == 1);
    }

    #[test]
    fn state_file_round_trips_and_refuses_garbage() {
        let dir = std::env::temp_dir().join(format!("fabric-agent-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut h = LinuxHost::open(Path::new("/nonexistent.sock"), &dir).unwrap();
        assert!(h.owned().is_empty());
        h.owned.insert("x".into());
        h.save().unwrap();
        let h2 = LinuxHost::open(Path::new("/nonexistent.sock"), &dir).unwrap();
        assert_eq!(h2.owned().iter().collect::<Vec<_>>(), vec!["x"]);
        std::fs::write(dir.join("owned.json"), b"[1,2]").unwrap();
        let e = LinuxHost::open(Path::new("/nonexistent.sock"), &dir)
            .err()
            .unwrap();
        assert!(e.to_string().contains("owned.json"), "{e}");
        // The dataplane being down is recognised as such.
        let mut h3 = LinuxHost::open(Path::new("/nonexistent.sock"), &dir.join("b")).unwrap();
        let e = h3.observe().unwrap_err();
        assert!(e.is_dataplane_down(), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn members_are_pushed_when_they_differ_and_again_after_a_failure_or_reset() {
        let mut h = Fake::default();
        let mut pushed = None;
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        // No members in the snapshot: nothing sent.
        assert!(!sync_members(&mut h, &mut pushed, None).unwrap());
        assert!(h.calls.is_empty());
        // Unsorted with a repeat: pushed sorted, once.
        assert!(sync_members(&mut h, &mut pushed, Some(&[b, a, b])).unwrap());
        assert!(!sync_members(&mut h, &mut pushed, Some(&[a, b])).unwrap());
        assert_eq!(h.calls, vec![format!("members {:?}", [a, b])]);
        // A change is pushed; a failed push is retried next time.
        h.fail.insert(format!("members {:?}", [a]));
        assert!(sync_members(&mut h, &mut pushed, Some(&[a])).is_err());
        assert_eq!(pushed, None);
        h.fail.clear();
        assert!(sync_members(&mut h, &mut pushed, Some(&[a])).unwrap());
        // The dataplane restarted (the caller forgets what it pushed): pushed again.
        pushed = None;
        assert!(sync_members(&mut h, &mut pushed, Some(&[a])).unwrap());
        assert_eq!(h.calls.len(), 4);
    }
}
