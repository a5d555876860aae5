//! The dataplane's local control API: JSON lines over a Unix socket.
//!
//! Each request is one JSON object on one line, with a `cmd` field; each response is one JSON
//! object on one line: `{"ok": true, "result": …}` or `{"ok": false, "error": "…"}`. The
//! `fabric vnic …` and `fabric stats` subcommands are thin clients of this API; so is the agent.
//!
//! # vnics: the client makes the TAP, the daemon forwards
//!
//! The daemon never creates namespaces or TAPs. A client (the agent, `fabric vnic add`)
//! creates and configures the TAP inside the container's namespace
//! ([`super::provision::create_vnic`]) and sends `vnic_attach` with the TAP's queue fds
//! attached to the request line as `SCM_RIGHTS` ancillary data ([`attach`]). The daemon keeps
//! the descriptors that arrived with the bytes of a line together with that line; a
//! `vnic_attach` without fds, or with an fd that is not a `IFF_TAP | IFF_VNET_HDR` TAP of the
//! name the request gives, is refused and changes nothing; fds sent with any other request are
//! closed and counted. `vnic_rm` detaches (the daemon closes its fds).
//!
//! # Limits
//!
//! The socket is local but its clients are not all trusted to be well-behaved (a stuck agent,
//! a script piping the wrong file), so the daemon bounds what one connection can cost: a
//! request line is at most [`MAX_REQUEST_BYTES`] (`--control-max-request-bytes`; longer lines
//! are refused with an error naming the limit and the connection is closed, without buffering
//! more than the limit), a started request must be complete within
//! [`REQUEST_READ_TIMEOUT`] (`--control-read-timeout-ms`), an idle connection is closed after
//! [`IDLE_TIMEOUT`], and at most [`MAX_CONNECTIONS`] connections are served at once
//! (`--control-max-conns`; the next one gets an error reply and is closed). Each refusal is
//! counted in [`ControlStats`].
//!
//! Parsing is [`parse_request`] (bytes → [`Request`]) and [`VnicAddSpec::validate`], both pure
//! functions, which the `control_request` fuzz target drives.

use crate::core::CountersSnapshot;
use crate::firewall::compile::FirewallState;
use crate::io::fdpass;
use crate::io::tap::Tap;
use crate::io::IfName;
use crate::wire::{Mac, Vni};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Longest request line the daemon reads (default of `--control-max-request-bytes`), newline
/// excluded. The largest legitimate request is `fw_apply` with the whole firewall document:
/// a VM entry (uuid, owner, two tags, one address) is about 200 bytes of JSON and a rule about
/// 150, so 4 MiB holds some 10,000 VMs plus 13,000 rules (20,000 such VMs alone are 4.07 MB).
/// Larger deployments raise the flag. The daemon buffers at most this
/// much per connection, so with [`MAX_CONNECTIONS`] the control socket's worst case is 64 MiB.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// Most control connections served at once (default of `--control-max-conns`). The CLI uses one
/// short connection per command and the agent one, so 16 leaves room for an operator's
/// scripts while bounding buffers (see [`MAX_REQUEST_BYTES`]) and tasks.
pub const MAX_CONNECTIONS: usize = 16;

/// Time a client has from the first byte of a request to its newline (default of
/// `--control-read-timeout-ms`); also the time a reply may take to be written. A local client
/// writes even a 4 MiB document in milliseconds; 10 s only cuts off a stalled one.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may sit idle between requests before it is closed, so idle clients
/// cannot hold the [`MAX_CONNECTIONS`] slots forever.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request line was refused before any handling.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Longer than the daemon's limit.
    #[error(
        "request line longer than {limit} bytes, the control socket's limit \
         (--control-max-request-bytes); connection closed"
    )]
    TooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// Not a JSON request object of a known kind.
    #[error("bad request: {0} (expected one JSON object with a known \"cmd\" on one line)")]
    Invalid(#[from] serde_json::Error),
}

/// Parses one request line (without its newline). Pure: the daemon and the fuzz target call it.
pub fn parse_request(line: &[u8], limit: usize) -> Result<Request, RequestError> {
    if line.len() > limit {
        return Err(RequestError::TooLong { limit });
    }
    Ok(serde_json::from_slice(line)?)
}

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Attach a TAP the client created and configured in the namespace (see
    /// [`super::provision::create_vnic`]) as a vnic. The line must carry the TAP's queue fds as
    /// `SCM_RIGHTS` ancillary data (see [`attach`]); without them it is refused.
    VnicAttach(VnicAddSpec),
    /// Obsolete: the daemon no longer creates TAPs. Refused with a message pointing at
    /// `vnic_attach` (kept so an old client gets a clear answer, not "unknown variant").
    VnicAdd(VnicAddSpec),
    /// Detach a vnic: the daemon closes its TAP queue fds (a TAP nobody else holds then
    /// disappears from its namespace; `fabric vnic rm` also deletes the link).
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
    /// Replace the member set: VXLAN is accepted only from these underlay addresses (a
    /// cluster's registered servers and foreign peers); others are dropped as `not_member`.
    /// They are also the peers whose ARP requests over VXLAN are answered on every VNI.
    /// `null` accepts every source again (the start without `--peer`). Answer:
    /// [`MembersSet`].
    Members {
        /// The new set (`null`: no filter).
        members: Option<Vec<IpAddr>>,
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

/// The answer to `members`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MembersSet {
    /// Members now in force (`None`: every source accepted).
    pub members: Option<usize>,
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

/// A vnic as the control socket names it (`vnic_attach`): where its TAP is, its segment and
/// the addresses the dataplane lets it use.
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

/// Why a vnic spec was refused (before anything was created or attached).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VnicSpecError {
    /// The VNI does not fit in 24 bits.
    #[error("vni {0} does not fit in 24 bits (expected 0..=16777215)")]
    Vni(u32),
    /// The MAC does not parse.
    #[error("{0:?} is not a MAC address (expected e.g. 02:00:00:00:00:01)")]
    MacSyntax(String),
    /// The MAC is not a unicast address a vnic can own.
    #[error("MAC {mac} is {why}: a vnic needs a unicast MAC (first octet even, not all zero)")]
    MacNotUnicast {
        /// The MAC.
        mac: Mac,
        /// `multicast`, `broadcast` or `all zero`.
        why: &'static str,
    },
    /// The address is not `IP/LEN`.
    #[error("address {0:?} is not IP/LEN (expected e.g. 10.0.0.2/24 or fd00::2/64)")]
    Cidr(String),
    /// The prefix length is outside the family's range.
    #[error("prefix length {len:?} is out of range: expected 1..={max}")]
    PrefixLen {
        /// What was given.
        len: String,
        /// 32 or 128.
        max: u8,
    },
    /// The address cannot be a vnic's own address.
    #[error("address {ip}/{prefix_len} is {why}: a vnic needs a unicast host address")]
    Address {
        /// The address.
        ip: IpAddr,
        /// Its prefix length.
        prefix_len: u8,
        /// What it is (e.g. `multicast`, `the network address of its prefix`).
        why: &'static str,
    },
    /// The MTU is outside what the dataplane supports.
    #[error("mtu {0} is out of range: expected 576..=9000")]
    Mtu(u32),
    /// The interface name is not a Linux interface name.
    #[error("interface name {0:?} is invalid: expected 1-15 bytes without '/', ':' or spaces")]
    Name(String),
}

/// A vnic spec after [`VnicAddSpec::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidVnic {
    /// Segment.
    pub vni: Vni,
    /// A unicast MAC.
    pub mac: Mac,
    /// A unicast host address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// MTU (576..=9000).
    pub mtu: u16,
}

impl VnicAddSpec {
    /// Checks every field; nothing is created for a spec that fails. Refused: a VNI over 24
    /// bits; a MAC that is multicast, broadcast or all zero; an address without a prefix
    /// length or with one outside `1..=32` / `1..=128`; an address that is not a unicast host
    /// address (see [`check_host_address`]); an MTU outside 576..=9000; a bad interface name.
    pub fn validate(&self) -> Result<ValidVnic, VnicSpecError> {
        let vni = Vni::new(self.vni).ok_or(VnicSpecError::Vni(self.vni))?;
        let mac: Mac = self
            .mac
            .parse()
            .map_err(|_| VnicSpecError::MacSyntax(self.mac.clone()))?;
        let why = if mac.is_broadcast() {
            Some("broadcast")
        } else if mac.is_multicast() {
            Some("multicast")
        } else if mac == Mac::ZERO {
            Some("all zero")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(VnicSpecError::MacNotUnicast { mac, why });
        }
        let (ip, prefix_len) = parse_cidr(&self.ip)?;
        check_host_address(ip, prefix_len)?;
        let mtu = u16::try_from(self.mtu)
            .ok()
            .filter(|m| (576..=9000).contains(m))
            .ok_or(VnicSpecError::Mtu(self.mtu))?;
        IfName::new(&self.name).map_err(|_| VnicSpecError::Name(self.name.clone()))?;
        Ok(ValidVnic {
            vni,
            mac,
            ip,
            prefix_len,
            mtu,
        })
    }
}

/// Parses `IP/LEN` with `LEN` in `1..=32` (IPv4) or `1..=128` (IPv6). A /0 would make every
/// address on-link in the container.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), VnicSpecError> {
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| VnicSpecError::Cidr(s.to_owned()))?;
    let ip: IpAddr = a.parse().map_err(|_| VnicSpecError::Cidr(s.to_owned()))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = l
        .parse::<u8>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| VnicSpecError::PrefixLen {
            len: l.to_owned(),
            max,
        })?;
    Ok((ip, len))
}

/// Checks that `ip/prefix_len` can be a vnic's own address.
///
/// IPv4 refuses 0.0.0.0/8 ("this network", with the unspecified address), 127/8 (loopback),
/// 169.254/16 (link-local: the overlay routes it nowhere), 224/4 (multicast), 240/4 (reserved,
/// with 255.255.255.255), and for prefixes shorter than /31 the prefix's network and broadcast
/// addresses (a /31 has neither, RFC 3021; a /32 is the host alone).
///
/// IPv6 refuses `::`, `::1`, ff00::/8 (multicast), fe80::/10 (link-local: the container's
/// kernel configures its own, and the overlay maps only routable addresses), ::ffff:0:0/96
/// (IPv4-mapped: the dataplane treats those as the IPv4 address), and for prefixes shorter
/// than /127 the all-zero host part (the subnet-router anycast address, RFC 4291; /127 links
/// use both addresses, RFC 6164).
pub fn check_host_address(ip: IpAddr, prefix_len: u8) -> Result<(), VnicSpecError> {
    let refuse = |why| {
        Err(VnicSpecError::Address {
            ip,
            prefix_len,
            why,
        })
    };
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if a == Ipv4Addr::BROADCAST {
                return refuse("the broadcast address");
            }
            if o[0] == 0 {
                return refuse("unspecified (0.0.0.0/8, \"this network\")");
            }
            if a.is_loopback() {
                return refuse("loopback (127.0.0.0/8)");
            }
            if a.is_link_local() {
                return refuse("link-local (169.254.0.0/16)");
            }
            if a.is_multicast() {
                return refuse("multicast (224.0.0.0/4)");
            }
            if o[0] >= 240 {
                return refuse("reserved (240.0.0.0/4)");
            }
            if prefix_len < 31 {
                let host = u32::MAX >> prefix_len;
                let bits = u32::from(a) & host;
                if bits == 0 {
                    return refuse("the network address of its prefix");
                }
                if bits == host {
                    return refuse("the broadcast address of its prefix");
                }
            }
        }
        IpAddr::V6(a) => {
            if a.is_unspecified() {
                return refuse("unspecified (::)");
            }
            if a.is_loopback() {
                return refuse("loopback (::1)");
            }
            if a.is_multicast() {
                return refuse("multicast (ff00::/8)");
            }
            if a.segments()[0] & 0xffc0 == 0xfe80 {
                return refuse("link-local (fe80::/10)");
            }
            if a.to_ipv4_mapped().is_some() {
                return refuse("IPv4-mapped (::ffff:0:0/96)");
            }
            if prefix_len < 127 && u128::from(a) & (u128::MAX >> prefix_len) == 0 {
                return refuse("the subnet-router anycast address (host part zero) of its prefix");
            }
        }
    }
    Ok(())
}

/// Health of a vnic.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VnicState {
    /// Attached and polled.
    #[default]
    Up,
    /// Its namespace's name was deleted (or now names another namespace) without `vnic rm`,
    /// but the namespace and the device live on (something still holds them): frames may
    /// still pass, but nothing can manage the vnic by its namespace name any more.
    Orphaned,
    /// Its TAP device disappeared (typically its namespace was deleted without `vnic rm`):
    /// nothing can pass. It stays listed until `vnic rm`, which cleans it up.
    Gone,
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
    /// Whether it is usable.
    #[serde(default)]
    pub state: VnicState,
    /// Why it is not `up` (e.g. "network namespace c1 was deleted").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// Since when it is not `up`, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_since_unix_ms: Option<u64>,
    /// Counters of frames from and to this vnic.
    pub counters: CountersSnapshot,
}

/// Counters of the control socket itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ControlStats {
    /// Connections accepted and served.
    pub connections: u64,
    /// Connections refused because [`MAX_CONNECTIONS`] were open.
    pub refused_connections: u64,
    /// Requests answered (including refusals of bad requests).
    pub requests: u64,
    /// Request lines that were not a valid request.
    pub bad_requests: u64,
    /// Request lines over the length limit (connection closed).
    pub oversized_requests: u64,
    /// Connections closed because a request did not complete in time, or sat idle too long.
    pub read_timeouts: u64,
    /// Replies that could not be written in time (connection closed).
    pub write_timeouts: u64,
    /// `vnic_attach` requests refused because no TAP fd came with them.
    #[serde(default)]
    pub attach_without_fds: u64,
    /// `vnic_attach` requests refused because an fd was not a usable TAP (not a TAP, no
    /// vnet header, another device than the request names).
    #[serde(default)]
    pub attach_bad_fds: u64,
    /// Descriptors that came with other requests (closed and ignored).
    #[serde(default)]
    pub unexpected_fds: u64,
    /// Connections closed because the ancillary data was unusable (more fds than
    /// [`crate::io::fdpass::MAX_FDS`] with one line).
    #[serde(default)]
    pub fd_overflows: u64,
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
    /// Zero-length datagrams received on the underlay (no VXLAN header: dropped).
    #[serde(default)]
    pub underlay_empty: u64,
    /// Underlay datagrams cut by the kernel because they exceeded the receive slot (dropped).
    #[serde(default)]
    pub underlay_truncated: u64,
    /// The control socket's own counters.
    #[serde(default)]
    pub control: ControlStats,
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
    #[error("control socket {path}: {source} (is `fabric dataplane --dataplane {path}` running?)")]
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
    call_with_fds(path, req, &[])
}

/// Attaches the TAP `taps` (the queues of one device, from
/// [`super::provision::create_vnic`]) to the dataplane at `sock` as the vnic `spec`: sends
/// `vnic_attach` with the queue fds as `SCM_RIGHTS` (blocking). The dataplane keeps its own
/// copies of the fds: drop `taps` afterwards, so the device lives exactly as long as the
/// dataplane holds it.
pub fn attach(sock: &Path, spec: &VnicAddSpec, taps: &[Tap]) -> Result<VnicInfo, ControlError> {
    if taps.is_empty() {
        return Err(ControlError::Protocol(
            "attach: no TAP queue to attach (expected the fds from create_vnic)".into(),
        ));
    }
    let fds: Vec<BorrowedFd<'_>> = taps.iter().map(AsFd::as_fd).collect();
    let v = call_with_fds(sock, &Request::VnicAttach(spec.clone()), &fds)?;
    serde_json::from_value(v)
        .map_err(|e| ControlError::Protocol(format!("bad vnic_attach reply: {e}")))
}

/// Sends one request line, with `fds` (if any) attached to its first bytes, and waits for the
/// result (blocking).
pub fn call_with_fds(
    path: &Path,
    req: &Request,
    fds: &[BorrowedFd<'_>],
) -> Result<serde_json::Value, ControlError> {
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.set_write_timeout(Some(Duration::from_secs(30))).ok();
    let mut line = serde_json::to_string(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push('\n');
    // A daemon that refuses the request (too long) answers and closes before it has read it
    // all: the write then fails, but its answer is waiting to be read and says why.
    let written = if fds.is_empty() {
        s.write_all(line.as_bytes())
    } else {
        fdpass::send_with_fds(s.as_fd(), line.as_bytes(), fds)
            .and_then(|n| s.write_all(&line.as_bytes()[n..]))
    };
    let mut reply = String::new();
    let read = BufReader::new(&s).read_line(&mut reply);
    if reply.is_empty() {
        let e = written.err().or(read.err()).map_or_else(
            || "the daemon closed the connection without an answer".to_string(),
            |e| e.to_string(),
        );
        return Err(ControlError::Protocol(e));
    }
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
        let r = Request::VnicAttach(VnicAddSpec {
            netns: "c1".into(),
            name: "eth0".into(),
            vni: 4001,
            mac: "02:00:00:00:00:01".into(),
            ip: "10.0.0.1/24".into(),
            mtu: 1450,
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"cmd":"vnic_attach","netns":"c1""#), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"stats"}"#).unwrap(),
            Request::Stats {}
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"stats","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }

    fn spec(ip: &str, mac: &str) -> VnicAddSpec {
        VnicAddSpec {
            netns: "c1".into(),
            name: "eth0".into(),
            vni: 4001,
            mac: mac.into(),
            ip: ip.into(),
            mtu: 1450,
        }
    }

    const MAC: &str = "02:00:00:00:00:01";

    #[test]
    fn vnic_spec_accepts_host_addresses() {
        for ip in [
            "10.0.0.2/24",
            "10.0.0.254/24",
            "192.168.1.1/32",
            "10.0.0.0/31",
            "10.0.0.1/31",
            "100.64.0.1/10",
            "fd00::2/64",
            "2001:db8::1/128",
            "fd00::/127",
            "fd00::1/127",
        ] {
            let v = spec(ip, MAC)
                .validate()
                .unwrap_or_else(|e| panic!("{ip}: {e}"));
            assert_eq!(format!("{}/{}", v.ip, v.prefix_len), ip);
            assert_eq!(v.mtu, 1450);
        }
    }

    #[test]
    fn vnic_spec_refuses_non_host_addresses() {
        for (ip, why) in [
            ("0.0.0.0/24", "unspecified"),
            ("0.1.2.3/8", "unspecified"),
            ("224.0.0.1/24", "multicast"),
            ("239.1.1.1/32", "multicast"),
            ("255.255.255.255/32", "broadcast"),
            ("240.0.0.1/8", "reserved"),
            ("127.0.0.2/8", "loopback"),
            ("169.254.1.1/16", "link-local"),
            ("10.0.0.0/24", "network address"),
            ("10.0.0.255/24", "broadcast address of its prefix"),
            ("10.0.3.255/22", "broadcast address of its prefix"),
            ("::/64", "unspecified"),
            ("::1/128", "loopback"),
            ("ff02::1/64", "multicast"),
            ("fe80::1/64", "link-local"),
            ("febf::1/64", "link-local"),
            ("::ffff:10.0.0.1/96", "IPv4-mapped"),
            ("fd00::/64", "subnet-router anycast"),
        ] {
            let e = spec(ip, MAC).validate().expect_err(ip);
            assert!(matches!(e, VnicSpecError::Address { .. }), "{ip}: {e:?}");
            let text = e.to_string();
            assert!(text.contains(why) && text.contains(ip), "{ip}: {text}");
        }
    }

    #[test]
    fn vnic_spec_refuses_bad_prefixes_macs_and_fields() {
        for ip in [
            "10.0.0.5/33",
            "10.0.0.5/0",
            "fd00::5/129",
            "fd00::5/0",
            "10.0.0.5/-1",
        ] {
            assert!(
                matches!(
                    spec(ip, MAC).validate(),
                    Err(VnicSpecError::PrefixLen { .. })
                ),
                "{ip}"
            );
        }
        for ip in ["10.0.0.5", "10.0.0/24", "", "/24", "x/24"] {
            assert!(
                matches!(spec(ip, MAC).validate(), Err(VnicSpecError::Cidr(_))),
                "{ip}"
            );
        }
        for (mac, why) in [
            ("ff:ff:ff:ff:ff:ff", "broadcast"),
            ("01:00:5e:00:00:01", "multicast"),
            ("33:33:00:00:00:01", "multicast"),
            ("00:00:00:00:00:00", "all zero"),
        ] {
            let e = spec("10.0.0.2/24", mac).validate().expect_err(mac);
            assert!(
                matches!(e, VnicSpecError::MacNotUnicast { why: w, .. } if w == why),
                "{mac}: {e:?}"
            );
        }
        assert!(matches!(
            spec("10.0.0.2/24", "02:00:00:00:00").validate(),
            Err(VnicSpecError::MacSyntax(_))
        ));
        let mut s = spec("10.0.0.2/24", MAC);
        s.vni = 1 << 24;
        assert_eq!(s.validate(), Err(VnicSpecError::Vni(1 << 24)));
        let mut s = spec("10.0.0.2/24", MAC);
        s.mtu = 65_536 + 1450;
        assert_eq!(s.validate(), Err(VnicSpecError::Mtu(65_536 + 1450)));
        let mut s = spec("10.0.0.2/24", MAC);
        s.name = "a/b".into();
        assert!(matches!(s.validate(), Err(VnicSpecError::Name(_))));
    }

    #[test]
    fn parse_request_limits_length_before_parsing() {
        let line = br#"{"cmd":"stats"}"#;
        assert_eq!(parse_request(line, line.len()).unwrap(), Request::Stats {});
        assert!(matches!(
            parse_request(line, line.len() - 1),
            Err(RequestError::TooLong { limit }) if limit == line.len() - 1
        ));
        let e = parse_request(b"{\"cmd\":", 100).unwrap_err();
        assert!(matches!(e, RequestError::Invalid(_)));
        assert!(e.to_string().starts_with("bad request"), "{e}");
        assert!(parse_request(&[0xff, 0xfe], 100).is_err());
    }
}
