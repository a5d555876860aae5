//! The dataplane's local control API: JSON lines over a Unix socket.
//!
//! Each request is one JSON object on one line, with a `cmd` field; each response is one JSON
//! object on one line: `{"ok": true, "result": …}` or `{"ok": false, "error": "…"}`. The
//! `fabric vnic …` and `fabric stats` subcommands are thin clients of this API; so is the agent.

use crate::core::CountersSnapshot;
use crate::firewall::compile::FirewallState;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Create a TAP in an existing network namespace, configure it and attach it as a vnic.
    VnicAdd(VnicAddSpec),
    /// Detach a vnic and remove its TAP.
    VnicRm {
        /// Namespace of the vnic.
        netns: String,
        /// Interface name inside it.
        name: String,
    },
    /// List vnics. (Empty struct variants, not unit variants, so that serde rejects unknown
    /// fields on them too.)
    VnicLs {},
    /// Counters: global, per vnic, per drop reason, and the resolver's.
    Stats {},
    /// Replace the whole firewall input (VM directory + rules). Validated and compiled as a
    /// whole: a bad rule rejects the request and the previous state stays in force.
    FwApply {
        /// The new state.
        state: FirewallState,
    },
    /// One vnic's compiled rule set with hit counters.
    FwLs {
        /// Namespace of the vnic (needed only when the name is not unique).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
        /// Interface name.
        vnic: String,
    },
}

/// The answer to `fw_apply`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FwApplied {
    /// Generation of the compiled state now in force.
    pub generation: u64,
    /// VMs in the directory.
    pub vms: usize,
    /// Rules received.
    pub rules: usize,
    /// Of which enabled.
    pub enabled_rules: usize,
    /// What each local vnic got.
    pub vnics: Vec<FwVnicSummary>,
}

/// One local vnic after `fw_apply`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FwVnicSummary {
    /// Namespace.
    pub netns: String,
    /// Interface name.
    pub name: String,
    /// The VM whose address the vnic has (`None`: no VM in the directory claims it; the vnic
    /// is unfiltered).
    pub vm_uuid: Option<String>,
    /// Whether its traffic is filtered (the VM has `firewall_enabled`).
    pub filtered: bool,
    /// Compiled rule entries.
    pub rules: usize,
}

/// The answer to `fw_ls`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FwListing {
    /// Namespace.
    pub netns: String,
    /// Interface name.
    pub name: String,
    /// Segment.
    pub vni: u32,
    /// Address.
    pub ip: String,
    /// The VM the vnic belongs to, if the directory names one.
    pub vm_uuid: Option<String>,
    /// Whether its traffic is filtered.
    pub filtered: bool,
    /// Generation of the firewall state in force.
    pub generation: u64,
    /// Compiled rules in evaluation order (outbound first), canonical text.
    pub rules: Vec<FwRuleLine>,
    /// Packets this vnic dropped by a BLOCK rule.
    pub denied_by_rule: u64,
    /// Packets this vnic dropped by the inbound default.
    pub denied_by_default: u64,
    /// The host's connection-tracking table.
    pub conntrack: Option<ConntrackInfo>,
}

/// One compiled rule of a vnic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FwRuleLine {
    /// `in` or `out`.
    pub direction: String,
    /// Rule UUID.
    pub uuid: String,
    /// Priority (0–100).
    pub priority: u8,
    /// `allow` or `block`.
    pub action: String,
    /// Canonical rule text.
    pub text: String,
    /// Flows admitted (allow) or packets dropped (block) by it.
    pub hits: u64,
}

/// The connection-tracking table's size and counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConntrackInfo {
    /// Flows tracked now.
    pub flows: usize,
    /// Counters (established, new_flows, denied_by_rule, evictions, …).
    pub counters: serde_json::Value,
}

/// What `vnic_add` needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VnicAddSpec {
    /// Existing network namespace (as under /run/netns).
    pub netns: String,
    /// Interface name inside the namespace.
    pub name: String,
    /// Segment (24-bit VNI).
    pub vni: u32,
    /// MAC (colon, dash or bare hex).
    pub mac: String,
    /// Address with prefix length, e.g. `10.0.0.2/24`.
    pub ip: String,
    /// MTU of the vnic.
    pub mtu: u32,
}

/// One vnic as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VnicInfo {
    /// Namespace.
    pub netns: String,
    /// Interface name.
    pub name: String,
    /// Segment.
    pub vni: u32,
    /// MAC.
    pub mac: String,
    /// Address with prefix.
    pub ip: String,
    /// MTU.
    pub mtu: u32,
    /// Offloads the TAP negotiated.
    pub offloads: String,
    /// Counters of frames from and to this vnic.
    pub counters: CountersSnapshot,
}

/// The answer to `stats`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// This host's identity.
    pub cn_uuid: String,
    /// Underlay address we receive on.
    pub underlay: String,
    /// Whether UDP GSO / GRO are in use.
    pub gso: bool,
    /// See above.
    pub gro: bool,
    /// Host-wide counters.
    pub global: CountersSnapshot,
    /// Per vnic.
    pub vnics: Vec<VnicInfo>,
    /// Frames from TAPs that could not be segmented (bad virtio_net_hdr or GSO metadata).
    pub tap_malformed: u64,
    /// Underlay send errors.
    pub underlay_send_errors: u64,
    /// TAP write errors (device gone or full).
    pub tap_write_errors: u64,
    /// TAP read errors (device gone); such a vnic is no longer polled.
    #[serde(default)]
    pub tap_read_errors: u64,
    /// Resolver counters.
    pub resolver: ResolverStats,
    /// Connection tracking (absent until a vnic is filtered).
    #[serde(default)]
    pub conntrack: Option<ConntrackInfo>,
}

/// Resolver counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResolverStats {
    /// Lookups sent to Portolan.
    pub lookups: u64,
    /// Lookups answered "not found".
    pub not_found: u64,
    /// Lookups that failed (Portolan unreachable, timeout, error status).
    pub failed: u64,
    /// LOG_REQ polls.
    pub log_polls: u64,
    /// Failed LOG_REQ/LOG_RM exchanges.
    pub log_errors: u64,
    /// VL2 shootdown records applied.
    pub vl2_shootdowns: u64,
    /// VL3 shootdown records applied.
    pub vl3_shootdowns: u64,
    /// Gratuitous ARPs injected into local vnics after VL3 shootdowns.
    pub garps: u64,
}

/// Why a control request failed on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Could not talk to the daemon.
    #[error("control socket {path}: {source} (is `fabric dataplane --control {path}` running?)")]
    Connect {
        /// The socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The connection broke or the reply was not JSON.
    #[error("control socket: {0}")]
    Protocol(String),
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(String),
}

/// Send one request and wait for its result (blocking; for the CLI).
pub fn call(path: &Path, req: &Request) -> Result<serde_json::Value, ControlError> {
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut line = serde_json::to_string(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| ControlError::Protocol(e.to_string()))?;
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .map_err(|e| ControlError::Protocol(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&reply)
        .map_err(|e| ControlError::Protocol(format!("bad reply {reply:?}: {e}")))?;
    if v.get("ok") == Some(&serde_json::Value::Bool(true)) {
        Ok(v.get("result").cloned().unwrap_or(serde_json::Value::Null))
    } else {
        Err(ControlError::Refused(
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("unknown error")
                .to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_form() {
        let r = Request::VnicAdd(VnicAddSpec {
            netns: "c1".into(),
            name: "eth0".into(),
            vni: 4001,
            mac: "02:00:00:00:00:01".into(),
            ip: "10.0.0.1/24".into(),
            mtu: 1450,
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"cmd":"vnic_add","netns":"c1""#), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"stats"}"#).unwrap(),
            Request::Stats {}
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"stats","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }
}
