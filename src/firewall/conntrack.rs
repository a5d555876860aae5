//! Connection tracking: the stateful half of the firewall fast path.
//!
//! A flow is classified once, against the vnic's [`VnicRuleSet`]; if allowed, its state goes
//! into a fixed-size table keyed by (VNI, protocol, both endpoints, which endpoint is the local
//! vnic's), so every later packet of either direction costs one hash lookup. Keying by the
//! local side keeps two vnics of one host that talk to each other apart: A's egress decision
//! and B's ingress decision are separate entries.
//!
//! * **TCP**: SYN (without ACK) creates state (`SynSent`); SYN-ACK from the responder →
//!   `SynReceived`; the initiator's ACK → `Established`; FIN from one side → `FinWait`, from
//!   both → `TimeWait`; RST → `Closed`. An allowed ACK packet without state is picked up as
//!   `Established` (as Linux's `tcp_loose`), so flows survive a dataplane restart; SYN-ACK or
//!   RST without state passes (if the rules allow it) without creating state. A SYN from the
//!   initiator on a `TimeWait`/`Closed` entry reopens it as a new flow (classified again).
//! * **UDP** (and any other protocol, ports 0): `Unreplied` until the other side answers, then
//!   `Replied`, with separate timeouts.
//! * **ICMP echo** (v4 8/0, v6 128/129): keyed by the echo identifier; the request creates
//!   state, replies match it. Other ICMP types are evaluated against the rules per packet.
//! * **ICMP errors** (v4 3, 4, 5, 11, 12; v6 1–4) whose embedded packet belongs to a tracked
//!   flow pass as *related*, whatever the rules say (ipf's and Linux's behaviour); others are
//!   evaluated as plain ICMP.
//!
//! Every allowed new flow keeps state in both directions (fwadm keeps state on outbound allows
//! always and on inbound allows when an outbound block could drop the replies; keeping it
//! always gives the same verdicts and replies never depend on outbound rules).
//!
//! **Rule changes.** Entries remember the rule set's generation. The first packet of a flow
//! after a swap re-evaluates the flow's first packet against the new rule set: if still
//! allowed the flow continues (one classification per flow per change), otherwise the entry is
//! marked revoked and the packet denied (`revoked` counter); a revoked flow's packets, both
//! directions, stay denied until it is idle for the closing timeout (see
//! [`FlowState::Revoked`]). So established flows survive a rule
//! change unless the new rules deny them.
//!
//! **Memory and time.** The table is allocated once ([`Conntrack::new`]): open addressing with
//! linear probing at ≤ 50 % load and backward-shift deletion, keyed hashing (seed passed in),
//! no allocation per packet. A slot's key and per-packet state fill one cache line (a lookup
//! reads one line); the flow's first packet, needed only after a rule change, lives in a
//! parallel array. Time is a parameter (`now`, any monotonic epoch); nothing here
//! reads a clock. Denied packets never create state (so a spoofing flood cannot evict real
//! flows).
//!
//! **Fair shares.** Every entry is charged to an [`Owner`] (the firewalled vnic whose rules
//! admitted it), and the table keeps a count per owner. An owner's share is the capacity
//! divided among the owners that hold flows (never below [`ConntrackConfig::min_share`]).
//! While the table has room any owner may insert; when it is full, an insert evicts one entry
//! chosen by a bounded walk from a cursor that moves on by exactly the slots it looked at (so
//! successive walks cover every slot): an expired entry of anyone; else, for an inserter at
//! or over its share, its own flows first, then those of owners over their share; for an
//! inserter under its share, flows of owners over their share first, then its own. Within a
//! group closing or half-open flows go before live ones, then the longest idle. A live flow
//! of another owner at or under its share is never evicted: when nothing else can go, the new
//! flow is refused ([`Verdict::TableFull`], counted in `refused_full`). So one tenant opening
//! flows without end churns only its own entries and cannot push another tenant's idle
//! established connection out of the table.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::Serialize;

use super::compile::{Direction, RuleId, RuleQuery, RuleVerdict, VnicRuleSet};

/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMP6: u8 = 58;

/// The transport header fields of the packet an ICMP error carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerPacket {
    /// Its source address.
    pub src: IpAddr,
    /// Its destination address.
    pub dst: IpAddr,
    /// Its IP protocol.
    pub proto: u8,
    /// Its source port (echo identifier for ICMP echo).
    pub src_port: u16,
    /// Its destination port (echo identifier for ICMP echo).
    pub dst_port: u16,
}

/// ICMP/ICMPv6 fields of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpInfo {
    /// Type.
    pub ty: u8,
    /// Code.
    pub code: u8,
    /// Echo identifier (echo request/reply only).
    pub echo_id: u16,
    /// The embedded packet of an error message, when the dataplane could parse it.
    pub inner: Option<InnerPacket>,
}

/// What conntrack needs to know about one packet (parsed by the dataplane from the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketSummary {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number (next header).
    pub proto: u8,
    /// TCP/UDP source port (0 otherwise).
    pub src_port: u16,
    /// TCP/UDP destination port (0 otherwise).
    pub dst_port: u16,
    /// TCP flags (TCP only).
    pub tcp_flags: u8,
    /// ICMP fields (ICMP/ICMPv6 only).
    pub icmp: Option<IcmpInfo>,
}

impl PacketSummary {
    /// A TCP segment.
    pub fn tcp(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16, flags: u8) -> Self {
        PacketSummary {
            src,
            dst,
            proto: PROTO_TCP,
            src_port,
            dst_port,
            tcp_flags: flags,
            icmp: None,
        }
    }

    /// A UDP datagram.
    pub fn udp(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> Self {
        PacketSummary {
            src,
            dst,
            proto: PROTO_UDP,
            src_port,
            dst_port,
            tcp_flags: 0,
            icmp: None,
        }
    }

    /// An ICMP (IPv4) or ICMPv6 (IPv6) message, by the family of `src`.
    pub fn icmp(src: IpAddr, dst: IpAddr, ty: u8, code: u8, echo_id: u16) -> Self {
        PacketSummary {
            src,
            dst,
            proto: if src.is_ipv4() {
                PROTO_ICMP
            } else {
                PROTO_ICMP6
            },
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
            icmp: Some(IcmpInfo {
                ty,
                code,
                echo_id,
                inner: None,
            }),
        }
    }

    /// An ICMP error carrying `inner`.
    pub fn icmp_error(src: IpAddr, dst: IpAddr, ty: u8, code: u8, inner: InnerPacket) -> Self {
        let mut p = Self::icmp(src, dst, ty, code, 0);
        if let Some(i) = p.icmp.as_mut() {
            i.inner = Some(inner);
        }
        p
    }

    /// Any other IP protocol.
    pub fn other(src: IpAddr, dst: IpAddr, proto: u8) -> Self {
        PacketSummary {
            src,
            dst,
            proto,
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
            icmp: None,
        }
    }
}

/// How an allowed packet got through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// First packet of a flow, classified against the rules; state created.
    NewFlow,
    /// Classified against the rules, no state kept (non-echo ICMP, stray SYN-ACK/RST).
    Stateless,
    /// Matched a tracked flow (one lookup).
    Established,
    /// An ICMP error about a tracked flow.
    Related,
    /// The VM's firewall is off.
    Unfiltered,
}

/// The verdict for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Pass. `rule` is the rule that admitted the flow (`None`: the outbound default).
    Allow {
        /// The admitting rule.
        rule: Option<RuleId>,
        /// How.
        via: Via,
    },
    /// Drop. `rule` is the blocking rule (`None`: the inbound default).
    Deny {
        /// The blocking rule.
        rule: Option<RuleId>,
    },
    /// Drop: the rules allow this new flow, but the table is full and nothing its owner may
    /// evict was found (every other flow belongs to an owner within its fair share).
    TableFull,
}

impl Verdict {
    /// Whether the packet passes.
    pub fn is_allow(self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
}

/// Idle timeouts per state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// SYN sent or received, handshake not finished.
    pub tcp_handshake: Duration,
    /// Established TCP.
    pub tcp_established: Duration,
    /// One or both FINs seen.
    pub tcp_closing: Duration,
    /// After RST.
    pub tcp_closed: Duration,
    /// UDP (and other protocols) seen one way only.
    pub udp_unreplied: Duration,
    /// UDP (and other protocols) seen both ways.
    pub udp_replied: Duration,
    /// ICMP echo.
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_handshake: Duration::from_secs(60),
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_closing: Duration::from_secs(120),
            tcp_closed: Duration::from_secs(10),
            udp_unreplied: Duration::from_secs(30),
            udp_replied: Duration::from_secs(180),
            icmp: Duration::from_secs(30),
        }
    }
}

/// Table configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackConfig {
    /// Most flows tracked at once (the table allocates twice as many slots, once).
    pub max_flows: usize,
    /// Idle timeouts.
    pub timeouts: Timeouts,
    /// Hash key (pick at random per process, so flows cannot be chosen to collide).
    pub seed: u64,
    /// Smallest fair share of the table an owner is guaranteed (its live flows up to this
    /// many are never evicted for another owner), however many owners hold flows. The share
    /// is otherwise `max_flows / owners holding flows`.
    pub min_share: usize,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig {
            max_flows: 65536,
            timeouts: Timeouts::default(),
            seed: 0x9e37_79b9_7f4a_7c15,
            // 256 live flows per vnic survive any neighbour; 256 vnics with flows reach it.
            min_share: 256,
        }
    }
}

/// Who a tracked flow is charged to: a small dense index (the core uses its vnic slot).
/// Indexes at or above [`MAX_OWNERS`] share one count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(pub u32);

/// Number of distinct owners counted apart.
pub const MAX_OWNERS: usize = 1 << 16;

/// Counters (monotonic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConntrackStats {
    /// Packets that hit a tracked flow.
    pub established: u64,
    /// New flows admitted and tracked.
    pub new_flows: u64,
    /// Packets allowed by the rules without state.
    pub stateless: u64,
    /// ICMP errors admitted as related.
    pub related: u64,
    /// Packets denied by a rule.
    pub denied_by_rule: u64,
    /// Packets denied by the inbound default.
    pub denied_by_default: u64,
    /// Tracked flows dropped because a new rule set denies them.
    pub revoked: u64,
    /// Packets of unfiltered vnics.
    pub unfiltered: u64,
    /// Entries found expired (on lookup or sweep) and removed.
    pub expired: u64,
    /// Evictions of expired entries to make room.
    pub evicted_expired: u64,
    /// Evictions of closing or half-open flows to make room.
    pub evicted_closing: u64,
    /// Evictions of live, idle flows to make room.
    pub evicted_idle: u64,
    /// New flows refused because the table was full and no entry could be evicted for them.
    pub refused_full: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
/// A tracked flow's state.
pub enum FlowState {
    /// Initiator's SYN seen.
    SynSent,
    /// Responder's SYN-ACK seen.
    SynReceived,
    /// Handshake complete (or picked up mid-stream).
    Established,
    /// FIN seen from one side.
    FinWait,
    /// FIN seen from both sides.
    TimeWait,
    /// RST seen.
    Closed,
    /// Non-TCP, one direction only so far.
    Unreplied,
    /// Non-TCP, both directions seen.
    Replied,
    /// Cut by a rule change: every packet of the flow, either direction, is denied (by the
    /// rule that revoked it) until the flow stays idle for the closing timeout, the
    /// originator opens it again with a SYN, or a later rule set allows it again. Without
    /// this, the local side's next mid-stream packet would pick the flow up again as a new
    /// outbound flow and re-admit the peer the rule change cut off.
    Revoked,
}

impl FlowState {
    fn closing_or_half_open(self) -> bool {
        matches!(
            self,
            FlowState::FinWait
                | FlowState::TimeWait
                | FlowState::Closed
                | FlowState::SynSent
                | FlowState::Unreplied
                | FlowState::Revoked
        )
    }
}

/// Key bit: the addresses are IPv6.
const K_V6: u8 = 1;
/// Key bit: the local vnic's endpoint is the `lo` one.
const K_LOCAL_IS_LO: u8 = 2;
/// The key bits of [`Hot::bits`].
const KEY_BITS: u8 = K_V6 | K_LOCAL_IS_LO;
/// Slot bit: the slot holds a flow.
const OCCUPIED: u8 = 4;
/// Slot bit: the flow's first packet came from the `lo` endpoint.
const ORIG_IS_LO: u8 = 8;
/// Slot bit: `Hot::rule` holds the admitting rule (otherwise a default admitted the flow).
const HAS_RULE: u8 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    lo: u128,
    hi: u128,
    /// `lo_port | hi_port << 16 | vni << 32`.
    ports_vni: u64,
    proto: u8,
    /// `K_V6 | K_LOCAL_IS_LO`.
    bits: u8,
}

#[inline(always)]
fn addr_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

impl FlowKey {
    /// Key of a packet `src → dst` seen by the vnic whose endpoint is `local_is_src`, and
    /// whether `src` is the key's `lo` endpoint.
    #[inline(always)]
    fn new(
        vni: u32,
        proto: u8,
        src: (IpAddr, u16),
        dst: (IpAddr, u16),
        local_is_src: bool,
    ) -> (Self, bool) {
        match (src.0, dst.0) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                Self::new_v4(vni, proto, (s, src.1), (d, dst.1), local_is_src)
            }
            _ => Self::new_any(vni, proto, src, dst, local_is_src),
        }
    }

    /// [`FlowKey::new`] for any address families.
    #[inline(always)]
    fn new_any(
        vni: u32,
        proto: u8,
        src: (IpAddr, u16),
        dst: (IpAddr, u16),
        local_is_src: bool,
    ) -> (Self, bool) {
        let s = (addr_bits(src.0), src.1);
        let d = (addr_bits(dst.0), dst.1);
        let src_is_lo = s <= d;
        let (lo, hi) = if src_is_lo { (s, d) } else { (d, s) };
        let v6 = src.0.is_ipv6();
        Self::assemble(vni, proto, lo, hi, v6, local_is_src, src_is_lo)
    }

    /// [`FlowKey::new`] of an IPv4 packet.
    #[inline(always)]
    fn new_v4(
        vni: u32,
        proto: u8,
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        local_is_src: bool,
    ) -> (Self, bool) {
        // The same order as the general case's, on one word: address, then port.
        let s = u64::from(u32::from(src.0)) << 16 | u64::from(src.1);
        let d = u64::from(u32::from(dst.0)) << 16 | u64::from(dst.1);
        let src_is_lo = s <= d;
        let (lo, hi) = if src_is_lo { (s, d) } else { (d, s) };
        let split = |w: u64| (u128::from(w >> 16), w as u16);
        Self::assemble(
            vni,
            proto,
            split(lo),
            split(hi),
            false,
            local_is_src,
            src_is_lo,
        )
    }

    #[inline(always)]
    fn assemble(
        vni: u32,
        proto: u8,
        lo: (u128, u16),
        hi: (u128, u16),
        v6: bool,
        local_is_src: bool,
        src_is_lo: bool,
    ) -> (Self, bool) {
        let mut bits = 0;
        if v6 {
            bits |= K_V6;
        }
        if local_is_src == src_is_lo {
            bits |= K_LOCAL_IS_LO;
        }
        let key = FlowKey {
            lo: lo.0,
            hi: hi.0,
            ports_vni: u64::from(lo.1) | u64::from(hi.1) << 16 | u64::from(vni) << 32,
            proto,
            bits,
        };
        (key, src_is_lo)
    }

    #[inline(always)]
    fn hash(&self, k: &HashKeys) -> u64 {
        let (v4_b, k) = (k.v4_b, &k.words);
        let tail = u64::from(self.proto) | u64::from(self.bits) << 8;
        // Every 64-bit word of the key is an operand of its own (two fields xored into one
        // operand collide whenever their xor does: ports xored over address bits made
        // thousands of flows share a hash). Three independent folds, so they run in parallel;
        // a secret word is xored into both operands of every fold, so no input chosen
        // without the seed zeroes a product.
        let a = fold(self.lo as u64 ^ k[0], self.hi as u64 ^ k[1]);
        let (lo_top, hi_top) = ((self.lo >> 64) as u64, (self.hi >> 64) as u64);
        let b = if lo_top | hi_top == 0 {
            // IPv4 (known at compile time on the IPv4 path).
            v4_b
        } else {
            fold(lo_top ^ k[2], hi_top ^ k[3])
        };
        let c = fold(self.ports_vni ^ k[4], tail ^ k[5]);
        a ^ b ^ c
    }
}

#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let r = u128::from(a).wrapping_mul(u128::from(b));
    (r as u64) ^ ((r >> 64) as u64)
}

/// The hash's secret words, derived from the seed once.
#[derive(Debug, Clone, Copy)]
struct HashKeys {
    words: [u64; 6],
    /// The fold of the addresses' upper halves when both are zero (IPv4).
    v4_b: u64,
}

impl HashKeys {
    fn new(seed: u64) -> Self {
        // splitmix64: independent-looking words from one seed.
        let mut x = seed;
        let words: [u64; 6] = std::array::from_fn(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        });
        HashKeys {
            v4_b: fold(words[2], words[3]),
            words,
        }
    }
}

/// The per-packet part of a slot — the key and what every packet of the flow reads or
/// writes — in one cache line, so a lookup touches one line (the probe compares keys, there
/// is no separate hash array).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Hot {
    lo: u128,
    hi: u128,
    ports_vni: u64,
    expires: u64,
    generation: u64,
    /// The admitting rule's id, when `bits & HAS_RULE`.
    rule: u32,
    proto: u8,
    /// `KEY_BITS | OCCUPIED | ORIG_IS_LO | HAS_RULE`.
    bits: u8,
    state: FlowState,
}

const _: () = assert!(std::mem::size_of::<Hot>() == 64);

impl Hot {
    const EMPTY: Hot = Hot {
        lo: 0,
        hi: 0,
        ports_vni: 0,
        expires: 0,
        generation: 0,
        rule: 0,
        proto: 0,
        bits: 0,
        state: FlowState::Closed,
    };

    #[inline(always)]
    fn occupied(&self) -> bool {
        self.bits & OCCUPIED != 0
    }

    /// Whether this (occupied) slot holds `k`.
    #[inline(always)]
    fn holds(&self, k: &FlowKey) -> bool {
        let tail = |proto: u8, bits: u8| u128::from(proto) | u128::from(bits & KEY_BITS) << 8;
        (self.lo ^ k.lo)
            | (self.hi ^ k.hi)
            | u128::from(self.ports_vni ^ k.ports_vni)
            | (tail(self.proto, self.bits) ^ tail(k.proto, k.bits))
            == 0
    }

    fn key(&self) -> FlowKey {
        FlowKey {
            lo: self.lo,
            hi: self.hi,
            ports_vni: self.ports_vni,
            proto: self.proto,
            bits: self.bits & KEY_BITS,
        }
    }

    #[inline(always)]
    fn rule(&self) -> Option<RuleId> {
        (self.bits & HAS_RULE != 0).then_some(RuleId(self.rule))
    }

    #[inline(always)]
    fn set_rule(&mut self, rule: Option<RuleId>) {
        match rule {
            Some(RuleId(id)) => {
                self.rule = id;
                self.bits |= HAS_RULE;
            }
            None => {
                self.rule = 0;
                self.bits &= !HAS_RULE;
            }
        }
    }
}

/// A packet's key, hash, and slot if tracked.
#[derive(Debug, Clone, Copy)]
struct Lookup {
    owner: Owner,
    key: FlowKey,
    src_is_lo: bool,
    hash: u64,
    found: Option<usize>,
}

/// What only a rule change needs: the flow's first packet, to classify it again.
#[derive(Debug, Clone, Copy)]
struct Cold {
    first_dir: Direction,
    first: RuleQuery,
    /// Who the flow is charged to (read on insert, removal and eviction, never per packet).
    owner: Owner,
}

impl Cold {
    const EMPTY: Cold = Cold {
        owner: Owner(0),
        first_dir: Direction::Egress,
        first: RuleQuery {
            peer: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            proto: 0,
            dst_port: 0,
            icmp: (0, 0),
        },
    };
}

/// Size of the eviction sample: candidates of the preferred group looked at before choosing.
const EVICT_SAMPLE: usize = 16;
/// Most slots one eviction walk looks at (bounded work per insert). At the default size
/// (131 072 slots) and the smallest share, an owner over its share holds at least 1/256 of
/// the entries, so a walk this long finds one of its flows with near certainty.
const EVICT_SCAN_LIMIT: usize = 8192;
/// Upper bound on `max_flows` (2^26 flows; the table holds twice as many slots).
pub const MAX_FLOWS_LIMIT: usize = 1 << 26;
/// Longest timeout kept (≈ 292 years), so `now + timeout` never saturates for any `now`
/// below 2^63 ns and an entry's last-seen time is exactly `expires - timeout(state)`.
const MAX_TIMEOUT_NS: u64 = u64::MAX >> 1;

/// The connection-tracking table of one dataplane thread (or shard). Not `Sync`: each thread
/// owns its own, flows are pinned to threads by hash.
pub struct Conntrack {
    /// Keys and per-packet state, one cache line per slot.
    hot: Box<[Hot]>,
    /// First packets (for re-checks after rule changes), parallel to `hot`.
    cold: Box<[Cold]>,
    mask: usize,
    len: usize,
    max_flows: usize,
    min_share: usize,
    /// Where the sweep goes on.
    cursor: usize,
    /// Where the next eviction walk starts: it moves on by exactly the slots each walk looked
    /// at (a full-cycle walk), so every slot is sampled in turn.
    evict_cursor: usize,
    /// Flows charged to each owner (index: `Owner`, capped at `MAX_OWNERS - 1`).
    owner_flows: Vec<u32>,
    /// Owners with at least one flow.
    active_owners: usize,
    /// Test-only: how often each slot was looked at by an eviction walk.
    #[cfg(test)]
    sampled: Vec<u32>,
    /// Idle timeouts in nanoseconds, by `[is ICMP][state]`.
    timeout_ns: [[u64; STATES]; 2],
    hash_keys: HashKeys,
    stats: ConntrackStats,
}

#[inline(always)]
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

#[inline(always)]
fn is_icmp_proto(proto: u8) -> bool {
    proto == PROTO_ICMP || proto == PROTO_ICMP6
}

fn is_icmp_error(proto: u8, ty: u8) -> bool {
    match proto {
        PROTO_ICMP => matches!(ty, 3 | 4 | 5 | 11 | 12),
        PROTO_ICMP6 => matches!(ty, 1..=4),
        _ => false,
    }
}

fn echo_kind(proto: u8, ty: u8) -> Option<bool> {
    // Some(true): request, Some(false): reply.
    match (proto, ty) {
        (PROTO_ICMP, 8) | (PROTO_ICMP6, 128) => Some(true),
        (PROTO_ICMP, 0) | (PROTO_ICMP6, 129) => Some(false),
        _ => None,
    }
}

/// Number of [`FlowState`]s.
const STATES: usize = 9;

/// Idle timeouts in nanoseconds by `[is ICMP][state as usize]`.
fn timeout_table(t: &Timeouts) -> [[u64; STATES]; 2] {
    let ns = |d| nanos(d).min(MAX_TIMEOUT_NS);
    let states = [
        FlowState::SynSent,
        FlowState::SynReceived,
        FlowState::Established,
        FlowState::FinWait,
        FlowState::TimeWait,
        FlowState::Closed,
        FlowState::Unreplied,
        FlowState::Replied,
        FlowState::Revoked,
    ];
    let mut table = [[0; STATES]; 2];
    for (icmp, row) in table.iter_mut().enumerate() {
        for s in states {
            row[s as usize] = ns(match s {
                FlowState::SynSent | FlowState::SynReceived => t.tcp_handshake,
                FlowState::Established => t.tcp_established,
                FlowState::FinWait | FlowState::TimeWait | FlowState::Revoked => t.tcp_closing,
                FlowState::Closed => t.tcp_closed,
                _ if icmp == 1 => t.icmp,
                FlowState::Unreplied => t.udp_unreplied,
                FlowState::Replied => t.udp_replied,
            });
        }
    }
    table
}

impl Conntrack {
    /// Allocates the whole table.
    pub fn new(config: ConntrackConfig) -> Self {
        let max = config.max_flows.clamp(1, MAX_FLOWS_LIMIT);
        let cap = (max * 2).next_power_of_two();
        Conntrack {
            hot: vec![Hot::EMPTY; cap].into_boxed_slice(),
            cold: vec![Cold::EMPTY; cap].into_boxed_slice(),
            mask: cap - 1,
            len: 0,
            max_flows: max,
            min_share: config.min_share.clamp(1, max),
            cursor: 0,
            evict_cursor: 0,
            owner_flows: Vec::new(),
            active_owners: 0,
            #[cfg(test)]
            sampled: vec![0; cap],
            timeout_ns: timeout_table(&config.timeouts),
            hash_keys: HashKeys::new(config.seed),
            stats: ConntrackStats::default(),
        }
    }

    /// Flows tracked now.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The counters.
    pub fn stats(&self) -> ConntrackStats {
        self.stats
    }

    /// The state of the flow a packet belongs to, as seen by the vnic in direction `dir`.
    pub fn flow_state(&self, vni: u32, dir: Direction, pkt: &PacketSummary) -> Option<FlowState> {
        let (key, _) = key_of(vni, dir, pkt)?;
        self.find(&key, key.hash(&self.hash_keys))
            .map(|i| self.hot[i].state)
    }

    #[inline(always)]
    fn timeout(&self, state: FlowState, proto: u8) -> u64 {
        self.timeout_ns[usize::from(is_icmp_proto(proto))][state as usize]
    }

    #[inline(always)]
    fn find(&self, key: &FlowKey, hash: u64) -> Option<usize> {
        let mut i = hash as usize & self.mask;
        loop {
            let e = &self.hot[i];
            if !e.occupied() {
                return None;
            }
            if e.holds(key) {
                return Some(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    fn remove_at(&mut self, idx: usize) {
        self.uncharge(self.cold[idx].owner);
        let mask = self.mask;
        let mut i = idx;
        self.hot[i].bits = 0;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            if !self.hot[j].occupied() {
                break;
            }
            let home = self.hot[j].key().hash(&self.hash_keys) as usize & mask;
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if stays {
                continue;
            }
            self.hot[i] = self.hot[j];
            self.cold[i] = self.cold[j];
            self.hot[j].bits = 0;
            i = j;
        }
        self.len -= 1;
    }

    #[inline]
    fn owner_index(owner: Owner) -> usize {
        (owner.0 as usize).min(MAX_OWNERS - 1)
    }

    /// Flows charged to `owner` now.
    pub fn owner_flows(&self, owner: Owner) -> usize {
        self.owner_flows
            .get(Self::owner_index(owner))
            .map_or(0, |&n| n as usize)
    }

    /// Owners holding at least one flow.
    pub fn active_owners(&self) -> usize {
        self.active_owners
    }

    fn charge(&mut self, owner: Owner) {
        let i = Self::owner_index(owner);
        if i >= self.owner_flows.len() {
            // Grows once per new highest owner (a vnic slot), never per packet.
            self.owner_flows.resize(i + 1, 0);
        }
        if self.owner_flows[i] == 0 {
            self.active_owners += 1;
        }
        self.owner_flows[i] += 1;
    }

    fn uncharge(&mut self, owner: Owner) {
        let i = Self::owner_index(owner);
        if let Some(n) = self.owner_flows.get_mut(i) {
            if *n > 0 {
                *n -= 1;
                if *n == 0 {
                    self.active_owners -= 1;
                }
            }
        }
    }

    /// The fair share of every owner when `owner` inserts: the capacity divided among the
    /// owners holding flows (counting `owner` even if it holds none yet), at least
    /// `min_share`.
    pub fn fair_share(&self, owner: Owner) -> usize {
        let n = self.active_owners + usize::from(self.owner_flows(owner) == 0);
        (self.max_flows / n.max(1)).max(self.min_share)
    }

    /// Makes room for one entry of `owner` if the table is full (see the module docs, "Fair
    /// shares"). `false`: the table is full and nothing `owner` may evict was found.
    fn make_room(&mut self, owner: Owner, now: u64) -> bool {
        if self.len < self.max_flows {
            return true;
        }
        let share = self.fair_share(owner);
        let over = self.owner_flows(owner) >= share;
        // (slot, tier, rank, last seen): lower is a better victim. Tier 0: expired (anyone's);
        // tier 1: the preferred group; tier 2: the other group. Rank 0: closing or half-open.
        let mut best: Option<(usize, u8, u8, u64)> = None;
        let mut preferred = 0;
        let mut scanned = 0;
        let limit = EVICT_SCAN_LIMIT.min(self.mask + 1);
        while scanned < limit {
            let i = (self.evict_cursor + scanned) & self.mask;
            scanned += 1;
            #[cfg(test)]
            {
                self.sampled[i] += 1;
            }
            let e = &self.hot[i];
            if !e.occupied() {
                continue;
            }
            if e.expires <= now {
                best = Some((i, 0, 0, 0));
                break;
            }
            let o = self.cold[i].owner;
            let mine = o == owner;
            let tier = if mine {
                if over {
                    1
                } else {
                    2
                }
            } else if self.owner_flows(o) > share {
                if over {
                    2
                } else {
                    1
                }
            } else {
                // Another owner within its share: its live flows are not ours to take.
                continue;
            };
            let rank = u8::from(!e.state.closing_or_half_open());
            // Every update sets `expires = now + timeout(state)` (never saturating, see
            // MAX_TIMEOUT_NS), so this is the time the flow was last seen.
            let last_seen = e.expires.saturating_sub(self.timeout(e.state, e.proto));
            if best.is_none_or(|(_, t, r, l)| (tier, rank, last_seen) < (t, r, l)) {
                best = Some((i, tier, rank, last_seen));
            }
            if tier == 1 {
                preferred += 1;
                if preferred >= EVICT_SAMPLE {
                    break;
                }
            }
        }
        self.evict_cursor = (self.evict_cursor + scanned) & self.mask;
        let Some((i, tier, rank, _)) = best else {
            return false;
        };
        match (tier, rank) {
            (0, _) => self.stats.evicted_expired += 1,
            (_, 0) => self.stats.evicted_closing += 1,
            _ => self.stats.evicted_idle += 1,
        }
        self.remove_at(i);
        true
    }

    /// Inserts a new entry charged to `cold.owner`; `false` if refused (table full).
    fn insert(&mut self, hot: Hot, cold: Cold, hash: u64, now: u64) -> bool {
        if !self.make_room(cold.owner, now) {
            return false;
        }
        let mut i = hash as usize & self.mask;
        while self.hot[i].occupied() {
            i = (i + 1) & self.mask;
        }
        self.charge(cold.owner);
        self.hot[i] = hot;
        self.cold[i] = cold;
        self.len += 1;
        true
    }

    /// Removes every flow charged to `owner` (its vnic is gone: a later vnic in the same slot
    /// starts with nothing charged to it). Returns how many. Walks the whole table: for the
    /// control path only.
    pub fn forget_owner(&mut self, owner: Owner) -> usize {
        if self.owner_flows(owner) == 0 {
            return 0;
        }
        let mut removed = 0;
        let mut i = 0;
        while i <= self.mask {
            if self.hot[i].occupied() && self.cold[i].owner == owner {
                self.remove_at(i);
                removed += 1;
                // Another entry may have shifted into slot i: look at it again.
                continue;
            }
            i += 1;
        }
        removed
    }

    /// Test-only: every occupied slot is reachable from its home slot, and `len` is right.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut count = 0;
        let mut owners = std::collections::HashMap::new();
        for i in 0..=self.mask {
            if !self.hot[i].occupied() {
                continue;
            }
            count += 1;
            *owners.entry(self.cold[i].owner).or_insert(0usize) += 1;
            let key = self.hot[i].key();
            assert_eq!(
                self.find(&key, key.hash(&self.hash_keys)),
                Some(i),
                "slot {i} reachable"
            );
        }
        assert_eq!(count, self.len);
        assert!(self.len <= self.max_flows);
        for (o, n) in &owners {
            assert_eq!(self.owner_flows(*o), *n, "flows of {o:?}");
        }
        assert_eq!(self.active_owners, owners.len());
    }

    /// Removes up to `budget` expired entries, scanning from a rotating cursor; returns how
    /// many were removed. Call it now and then (expired entries are also dropped on lookup).
    pub fn sweep(&mut self, now: Duration, budget: usize) -> usize {
        let now = nanos(now);
        let mut removed = 0;
        let cap = self.mask + 1;
        let mut scanned = 0;
        while scanned < cap && removed < budget {
            let i = self.cursor & self.mask;
            if self.hot[i].occupied() && self.hot[i].expires <= now {
                self.remove_at(i);
                removed += 1;
                self.stats.expired += 1;
                // Another entry may have shifted into slot i: look at it again.
                continue;
            }
            self.cursor = (self.cursor + 1) & self.mask;
            scanned += 1;
        }
        removed
    }

    /// [`Conntrack::classify_for`] with every flow charged to `Owner(0)` (a table serving
    /// one vnic).
    #[inline]
    pub fn classify(
        &mut self,
        rules: &VnicRuleSet,
        dir: Direction,
        pkt: &PacketSummary,
        now: Duration,
    ) -> Verdict {
        self.classify_for(Owner(0), rules, dir, pkt, now)
    }

    /// Classifies one packet crossing the vnic of `rules` in direction `dir` at time `now`:
    /// one hash lookup for a tracked flow; otherwise one rule evaluation, and state for an
    /// allowed new flow, charged to `owner` (the vnic of `rules`). No allocation.
    pub fn classify_for(
        &mut self,
        owner: Owner,
        rules: &VnicRuleSet,
        dir: Direction,
        pkt: &PacketSummary,
        now: Duration,
    ) -> Verdict {
        let now_ns = nanos(now);
        if !rules.is_filtered() || is_icmp_proto(pkt.proto) {
            return self.classify_other(owner, rules, dir, pkt, now_ns);
        }
        let (vni, local_is_src) = (rules.vni(), dir == Direction::Egress);
        // The same code twice, so the IPv4 copy is compiled for IPv4 keys.
        match (&pkt.src, &pkt.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let (key, src_is_lo) = FlowKey::new_v4(
                    vni,
                    pkt.proto,
                    (*src, pkt.src_port),
                    (*dst, pkt.dst_port),
                    local_is_src,
                );
                self.classify_flow(owner, rules, dir, pkt, key, src_is_lo, now_ns)
            }
            _ => {
                let (key, src_is_lo) = FlowKey::new(
                    vni,
                    pkt.proto,
                    (pkt.src, pkt.src_port),
                    (pkt.dst, pkt.dst_port),
                    local_is_src,
                );
                self.classify_flow(owner, rules, dir, pkt, key, src_is_lo, now_ns)
            }
        }
    }

    /// `classify` of a TCP, UDP or other non-ICMP packet, from its key.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn classify_flow(
        &mut self,
        owner: Owner,
        rules: &VnicRuleSet,
        dir: Direction,
        pkt: &PacketSummary,
        key: FlowKey,
        src_is_lo: bool,
        now_ns: u64,
    ) -> Verdict {
        let hash = key.hash(&self.hash_keys);
        let found = self.find(&key, hash);
        if let Some(i) = found {
            // The common case, kept short: a live flow, rules unchanged since its last
            // packet, not closed (where a SYN would reopen it). Everything else, and
            // exactly the same for this case, in `classify_keyed`.
            let e = &mut self.hot[i];
            if e.expires > now_ns
                && e.generation == rules.generation()
                && !matches!(
                    e.state,
                    FlowState::TimeWait | FlowState::Closed | FlowState::Revoked
                )
            {
                let from_orig = src_is_lo == (e.bits & ORIG_IS_LO != 0);
                let next = next_state(e.state, pkt.proto, pkt.tcp_flags, from_orig);
                e.state = next;
                // Not ICMP: row 0.
                e.expires = now_ns.saturating_add(self.timeout_ns[0][next as usize]);
                let rule = e.rule();
                self.stats.established += 1;
                return Verdict::Allow {
                    rule,
                    via: Via::Established,
                };
            }
        } else {
            return self.new_flow(owner, rules, dir, pkt, key, src_is_lo, hash, now_ns);
        }
        let lookup = Lookup {
            owner,
            key,
            src_is_lo,
            hash,
            found,
        };
        self.classify_keyed(rules, dir, pkt, lookup, now_ns)
    }

    /// `classify` for unfiltered vnics and ICMP.
    #[inline(never)]
    fn classify_other(
        &mut self,
        owner: Owner,
        rules: &VnicRuleSet,
        dir: Direction,
        pkt: &PacketSummary,
        now_ns: u64,
    ) -> Verdict {
        if !rules.is_filtered() {
            self.stats.unfiltered += 1;
            return Verdict::Allow {
                rule: None,
                via: Via::Unfiltered,
            };
        }
        let (key, src_is_lo) = match self.icmp_key(rules, dir, pkt, now_ns) {
            Ok(k) => k,
            Err(verdict) => return verdict,
        };
        let hash = key.hash(&self.hash_keys);
        let lookup = Lookup {
            owner,
            key,
            src_is_lo,
            hash,
            found: self.find(&key, hash),
        };
        self.classify_keyed(rules, dir, pkt, lookup, now_ns)
    }

    /// `classify` once the packet's key is known and looked up: the tracked flow's state
    /// machine, expiry, re-check after a rule change, reopening; or a new flow.
    #[inline(never)]
    fn classify_keyed(
        &mut self,
        rules: &VnicRuleSet,
        dir: Direction,
        pkt: &PacketSummary,
        lookup: Lookup,
        now_ns: u64,
    ) -> Verdict {
        let Lookup {
            owner,
            key,
            src_is_lo,
            hash,
            found,
        } = lookup;
        let flags = pkt.tcp_flags;
        let syn_only = pkt.proto == PROTO_TCP && flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
        if let Some(i) = found {
            let e = &self.hot[i];
            let state = e.state;
            let from_orig = src_is_lo == (e.bits & ORIG_IS_LO != 0);
            let reopen = syn_only
                && from_orig
                && matches!(
                    state,
                    FlowState::TimeWait | FlowState::Closed | FlowState::Revoked
                );
            if e.expires > now_ns && !reopen && state == FlowState::Revoked {
                return self.revoked_packet(i, rules, pkt.proto, now_ns);
            }
            if e.expires > now_ns && !reopen {
                if e.generation != rules.generation() {
                    if let Err(verdict) = self.recheck(i, rules, now_ns) {
                        return verdict;
                    }
                }
                let next = next_state(state, pkt.proto, flags, from_orig);
                let expires = now_ns.saturating_add(self.timeout(next, pkt.proto));
                let e = &mut self.hot[i];
                e.state = next;
                e.expires = expires;
                let rule = e.rule();
                self.stats.established += 1;
                return Verdict::Allow {
                    rule,
                    via: Via::Established,
                };
            }
            self.remove_at(i);
            if !reopen {
                self.stats.expired += 1;
            }
        }
        self.new_flow(owner, rules, dir, pkt, key, src_is_lo, hash, now_ns)
    }

    /// The key of an ICMP echo, or the verdict of any other ICMP message (related to a
    /// tracked flow, or by the rules alone).
    #[inline(never)]
    fn icmp_key(
        &mut self,
        rules: &VnicRuleSet,
        dir: Direction,
        pkt: &PacketSummary,
        now_ns: u64,
    ) -> Result<(FlowKey, bool), Verdict> {
        // ICMP errors about a tracked flow.
        if let Some(icmp) = pkt.icmp {
            if is_icmp_error(pkt.proto, icmp.ty) {
                if let Some(inner) = icmp.inner {
                    if let Some(rule) = self.related(rules.vni(), dir, &inner, now_ns) {
                        self.stats.related += 1;
                        return Err(Verdict::Allow {
                            rule,
                            via: Via::Related,
                        });
                    }
                }
                return Err(self.stateless(rules, dir, pkt));
            }
        }
        // Non-echo, non-error ICMP: rules only.
        key_of(rules.vni(), dir, pkt).ok_or_else(|| self.stateless(rules, dir, pkt))
    }

    /// The rule set changed since slot `i`'s flow was last seen: classifies its first packet
    /// again; if now denied, the flow becomes [`FlowState::Revoked`] (kept, so that later
    /// packets of either direction stay denied) and the packet is denied.
    #[cold]
    #[inline(never)]
    fn recheck(&mut self, i: usize, rules: &VnicRuleSet, now_ns: u64) -> Result<(), Verdict> {
        let Cold {
            first_dir, first, ..
        } = self.cold[i];
        let rule = match rules.evaluate(first_dir, &first) {
            RuleVerdict::AllowedBy(id) => Some(id),
            RuleVerdict::DefaultAllow | RuleVerdict::Unfiltered => None,
            v => {
                let timeout = self.timeout_ns[0][FlowState::Revoked as usize];
                let e = &mut self.hot[i];
                e.state = FlowState::Revoked;
                e.generation = rules.generation();
                e.set_rule(match v {
                    RuleVerdict::DeniedBy(id) => Some(id),
                    _ => None,
                });
                e.expires = now_ns.saturating_add(timeout);
                self.stats.revoked += 1;
                return Err(deny(v));
            }
        };
        let e = &mut self.hot[i];
        e.set_rule(rule);
        e.generation = rules.generation();
        Ok(())
    }

    /// A packet of a revoked flow: denied by the rule that revoked it (the idle timer
    /// restarts), unless the rule set changed since and now allows the flow's first packet,
    /// which brings the flow back (as established, or replied for non-TCP).
    #[cold]
    #[inline(never)]
    fn revoked_packet(&mut self, i: usize, rules: &VnicRuleSet, proto: u8, now_ns: u64) -> Verdict {
        if self.hot[i].generation != rules.generation() {
            let Cold {
                first_dir, first, ..
            } = self.cold[i];
            let verdict = rules.evaluate(first_dir, &first);
            let e = &mut self.hot[i];
            e.generation = rules.generation();
            if verdict.allows() {
                e.set_rule(match verdict {
                    RuleVerdict::AllowedBy(id) => Some(id),
                    _ => None,
                });
                let state = if proto == PROTO_TCP {
                    FlowState::Established
                } else {
                    FlowState::Replied
                };
                e.state = state;
                e.expires = now_ns.saturating_add(
                    self.timeout_ns[usize::from(is_icmp_proto(proto))][state as usize],
                );
                let rule = e.rule();
                self.stats.established += 1;
                return Verdict::Allow {
                    rule,
                    via: Via::Established,
                };
            }
            e.set_rule(match verdict {
                RuleVerdict::DeniedBy(id) => Some(id),
                _ => None,
            });
        }
        let timeout = self.timeout(FlowState::Revoked, proto);
        let e = &mut self.hot[i];
        e.expires = now_ns.saturating_add(timeout);
        let rule = e.rule();
        match rule {
            Some(_) => self.stats.denied_by_rule += 1,
            None => self.stats.denied_by_default += 1,
        }
        Verdict::Deny { rule }
    }

    /// A packet without state: classify it once, and track it if allowed and it starts a
    /// flow.
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    fn new_flow(
        &mut self,
        owner: Owner,
        rules: &VnicRuleSet,
        dir: Direction,
        pkt: &PacketSummary,
        key: FlowKey,
        src_is_lo: bool,
        hash: u64,
        now_ns: u64,
    ) -> Verdict {
        let query = query_of(dir, pkt);
        let verdict = rules.evaluate(dir, &query);
        let rule = match verdict {
            RuleVerdict::AllowedBy(id) => Some(id),
            RuleVerdict::DefaultAllow | RuleVerdict::Unfiltered => None,
            v => {
                match v {
                    RuleVerdict::DeniedBy(_) => self.stats.denied_by_rule += 1,
                    _ => self.stats.denied_by_default += 1,
                }
                return deny(v);
            }
        };
        let flags = pkt.tcp_flags;
        let initial = match pkt.proto {
            PROTO_TCP => {
                if flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN {
                    Some(FlowState::SynSent)
                } else if flags & (TCP_SYN | TCP_RST | TCP_FIN) == 0 && flags & TCP_ACK != 0 {
                    Some(FlowState::Established)
                } else {
                    None
                }
            }
            PROTO_ICMP | PROTO_ICMP6 => pkt
                .icmp
                .and_then(|i| echo_kind(pkt.proto, i.ty))
                .filter(|&req| req)
                .map(|_| FlowState::Unreplied),
            _ => Some(FlowState::Unreplied),
        };
        let Some(state) = initial else {
            self.stats.stateless += 1;
            return Verdict::Allow {
                rule,
                via: Via::Stateless,
            };
        };
        let mut hot = Hot {
            lo: key.lo,
            hi: key.hi,
            ports_vni: key.ports_vni,
            expires: now_ns.saturating_add(self.timeout(state, pkt.proto)),
            generation: rules.generation(),
            rule: 0,
            proto: key.proto,
            bits: key.bits | OCCUPIED | if src_is_lo { ORIG_IS_LO } else { 0 },
            state,
        };
        hot.set_rule(rule);
        let cold = Cold {
            first_dir: dir,
            first: query,
            owner,
        };
        if !self.insert(hot, cold, hash, now_ns) {
            self.stats.refused_full += 1;
            return Verdict::TableFull;
        }
        self.stats.new_flows += 1;
        Verdict::Allow {
            rule,
            via: Via::NewFlow,
        }
    }

    /// The admitting rule of the tracked flow an ICMP error's inner packet belongs to.
    fn related(
        &self,
        vni: u32,
        dir: Direction,
        inner: &InnerPacket,
        now: u64,
    ) -> Option<Option<RuleId>> {
        // The inner packet travelled the other way: for an error arriving at the vnic
        // (ingress) the inner packet was sent by the vnic, so its source is local.
        let local_is_src = dir == Direction::Ingress;
        let (sp, dp) = if is_icmp_proto(inner.proto) {
            (inner.src_port, inner.src_port)
        } else {
            (inner.src_port, inner.dst_port)
        };
        let (key, _) = FlowKey::new(
            vni,
            inner.proto,
            (inner.src, sp),
            (inner.dst, dp),
            local_is_src,
        );
        let i = self.find(&key, key.hash(&self.hash_keys))?;
        let e = &self.hot[i];
        (e.expires > now).then(|| e.rule())
    }

    fn stateless(&mut self, rules: &VnicRuleSet, dir: Direction, pkt: &PacketSummary) -> Verdict {
        match rules.evaluate(dir, &query_of(dir, pkt)) {
            RuleVerdict::AllowedBy(id) => {
                self.stats.stateless += 1;
                Verdict::Allow {
                    rule: Some(id),
                    via: Via::Stateless,
                }
            }
            RuleVerdict::DefaultAllow | RuleVerdict::Unfiltered => {
                self.stats.stateless += 1;
                Verdict::Allow {
                    rule: None,
                    via: Via::Stateless,
                }
            }
            v => {
                match v {
                    RuleVerdict::DeniedBy(_) => self.stats.denied_by_rule += 1,
                    _ => self.stats.denied_by_default += 1,
                }
                deny(v)
            }
        }
    }
}

/// The key of a packet (ICMP: echo only, keyed by the identifier), and whether its source is
/// the key's `lo` endpoint.
#[inline(always)]
fn key_of(vni: u32, dir: Direction, pkt: &PacketSummary) -> Option<(FlowKey, bool)> {
    let local_is_src = dir == Direction::Egress;
    if is_icmp_proto(pkt.proto) {
        let i = pkt.icmp?;
        echo_kind(pkt.proto, i.ty)?;
        Some(FlowKey::new(
            vni,
            pkt.proto,
            (pkt.src, i.echo_id),
            (pkt.dst, i.echo_id),
            local_is_src,
        ))
    } else {
        Some(FlowKey::new(
            vni,
            pkt.proto,
            (pkt.src, pkt.src_port),
            (pkt.dst, pkt.dst_port),
            local_is_src,
        ))
    }
}

fn deny(v: RuleVerdict) -> Verdict {
    Verdict::Deny {
        rule: match v {
            RuleVerdict::DeniedBy(id) => Some(id),
            _ => None,
        },
    }
}

fn query_of(dir: Direction, pkt: &PacketSummary) -> RuleQuery {
    RuleQuery {
        peer: match dir {
            Direction::Ingress => pkt.src,
            Direction::Egress => pkt.dst,
        },
        proto: pkt.proto,
        dst_port: pkt.dst_port,
        icmp: pkt.icmp.map(|i| (i.ty, i.code)).unwrap_or((0, 0)),
    }
}

#[inline(always)]
fn next_state(s: FlowState, proto: u8, flags: u8, from_orig: bool) -> FlowState {
    if proto != PROTO_TCP {
        return match s {
            FlowState::Unreplied if !from_orig => FlowState::Replied,
            other => other,
        };
    }
    let syn = flags & TCP_SYN != 0;
    let ack = flags & TCP_ACK != 0;
    let fin = flags & TCP_FIN != 0;
    if flags & TCP_RST != 0 {
        return FlowState::Closed;
    }
    match s {
        FlowState::SynSent if !from_orig && syn && ack => FlowState::SynReceived,
        FlowState::SynReceived if from_orig && ack && !syn => {
            if fin {
                FlowState::FinWait
            } else {
                FlowState::Established
            }
        }
        FlowState::Established if fin => FlowState::FinWait,
        FlowState::FinWait if fin => FlowState::TimeWait,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::compile::{Firewall, FirewallState, RuleRecord, VmAddress, VmRecord};

    const A: &str = "aaaaaaaa-0000-4000-8000-000000000000";
    const VM1: &str = "00000000-0000-4000-8000-000000000001";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ruleset(rules: &[&str], generation: u64) -> VnicRuleSet {
        let state = FirewallState {
            vms: vec![VmRecord {
                uuid: VM1.into(),
                owner_uuid: A.into(),
                tags: Default::default(),
                firewall_enabled: true,
                ips: vec![VmAddress {
                    vni: 7,
                    ip: ip("10.0.0.1"),
                }],
            }],
            rules: rules
                .iter()
                .enumerate()
                .map(|(n, r)| RuleRecord {
                    uuid: format!("cccccccc-0000-4000-8000-{n:012}"),
                    owner_uuid: Some(A.into()),
                    global: false,
                    enabled: true,
                    rule: r.to_string(),
                })
                .collect(),
        };
        Firewall::new(&state)
            .unwrap()
            .compile_vnic(VM1, 7, generation)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    const ME: &str = "10.0.0.1";
    const PEER: &str = "192.0.2.9";

    #[test]
    fn tcp_outbound_handshake_and_teardown() {
        let rs = ruleset(&[], 1);
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let out = |f| PacketSummary::tcp(ip(ME), 40000, ip(PEER), 80, f);
        let inb = |f| PacketSummary::tcp(ip(PEER), 80, ip(ME), 40000, f);
        // A stray inbound SYN-ACK is denied by default before any state exists.
        assert!(!ct
            .classify(&rs, Direction::Ingress, &inb(TCP_SYN | TCP_ACK), secs(0))
            .is_allow());
        let v = ct.classify(&rs, Direction::Egress, &out(TCP_SYN), secs(1));
        assert_eq!(
            v,
            Verdict::Allow {
                rule: None,
                via: Via::NewFlow
            }
        );
        assert_eq!(
            ct.flow_state(7, Direction::Egress, &out(TCP_SYN)),
            Some(FlowState::SynSent)
        );
        let v = ct.classify(&rs, Direction::Ingress, &inb(TCP_SYN | TCP_ACK), secs(1));
        assert_eq!(
            v,
            Verdict::Allow {
                rule: None,
                via: Via::Established
            }
        );
        assert_eq!(
            ct.flow_state(7, Direction::Egress, &out(TCP_ACK)),
            Some(FlowState::SynReceived)
        );
        ct.classify(&rs, Direction::Egress, &out(TCP_ACK), secs(2));
        assert_eq!(
            ct.flow_state(7, Direction::Egress, &out(TCP_ACK)),
            Some(FlowState::Established)
        );
        ct.classify(&rs, Direction::Egress, &out(TCP_FIN | TCP_ACK), secs(3));
        assert_eq!(
            ct.flow_state(7, Direction::Egress, &out(TCP_ACK)),
            Some(FlowState::FinWait)
        );
        assert!(ct
            .classify(&rs, Direction::Ingress, &inb(TCP_FIN | TCP_ACK), secs(3))
            .is_allow());
        assert_eq!(
            ct.flow_state(7, Direction::Egress, &out(TCP_ACK)),
            Some(FlowState::TimeWait)
        );
        // Closing state times out after tcp_closing; then an inbound packet is a new, denied flow.
        assert!(!ct
            .classify(&rs, Direction::Ingress, &inb(TCP_ACK), secs(3 + 121))
            .is_allow());
        assert_eq!(ct.len(), 0);
    }

    #[test]
    fn tcp_rst_closes_and_syn_reopens() {
        let rs = ruleset(&[], 1);
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let out = |f| PacketSummary::tcp(ip(ME), 40001, ip(PEER), 22, f);
        let inb = |f| PacketSummary::tcp(ip(PEER), 22, ip(ME), 40001, f);
        ct.classify(&rs, Direction::Egress, &out(TCP_SYN), secs(0));
        ct.classify(&rs, Direction::Ingress, &inb(TCP_RST | TCP_ACK), secs(0));
        assert_eq!(
            ct.flow_state(7, Direction::Egress, &out(0)),
            Some(FlowState::Closed)
        );
        let v = ct.classify(&rs, Direction::Egress, &out(TCP_SYN), secs(1));
        assert_eq!(
            v,
            Verdict::Allow {
                rule: None,
                via: Via::NewFlow
            }
        );
        assert_eq!(
            ct.flow_state(7, Direction::Egress, &out(0)),
            Some(FlowState::SynSent)
        );
        // Closed entries expire after tcp_closed.
        ct.classify(&rs, Direction::Ingress, &inb(TCP_RST), secs(2));
        assert!(!ct
            .classify(&rs, Direction::Ingress, &inb(TCP_ACK), secs(2 + 11))
            .is_allow());
    }

    #[test]
    fn inbound_needs_a_rule_and_the_rule_is_reported() {
        let rs = ruleset(&["FROM any TO all vms ALLOW tcp PORT 80"], 1);
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let syn = PacketSummary::tcp(ip(PEER), 5555, ip(ME), 80, TCP_SYN);
        let v = ct.classify(&rs, Direction::Ingress, &syn, secs(0));
        assert_eq!(
            v,
            Verdict::Allow {
                rule: Some(RuleId(0)),
                via: Via::NewFlow
            }
        );
        let reply = PacketSummary::tcp(ip(ME), 80, ip(PEER), 5555, TCP_SYN | TCP_ACK);
        assert_eq!(
            ct.classify(&rs, Direction::Egress, &reply, secs(0)),
            Verdict::Allow {
                rule: Some(RuleId(0)),
                via: Via::Established
            }
        );
        let other = PacketSummary::tcp(ip(PEER), 5555, ip(ME), 81, TCP_SYN);
        assert_eq!(
            ct.classify(&rs, Direction::Ingress, &other, secs(0)),
            Verdict::Deny { rule: None }
        );
        assert_eq!(ct.stats().denied_by_default, 1);
    }

    #[test]
    fn udp_and_icmp_echo_state() {
        let rs = ruleset(&[], 1);
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let q = PacketSummary::udp(ip(ME), 5353, ip(PEER), 53);
        let a = PacketSummary::udp(ip(PEER), 53, ip(ME), 5353);
        ct.classify(&rs, Direction::Egress, &q, secs(0));
        assert_eq!(
            ct.flow_state(7, Direction::Egress, &q),
            Some(FlowState::Unreplied)
        );
        assert!(ct.classify(&rs, Direction::Ingress, &a, secs(1)).is_allow());
        assert_eq!(
            ct.flow_state(7, Direction::Egress, &q),
            Some(FlowState::Replied)
        );
        // Unanswered UDP expires after udp_unreplied, answered after udp_replied.
        assert!(ct
            .classify(&rs, Direction::Ingress, &a, secs(1 + 179))
            .is_allow());
        assert!(!ct
            .classify(&rs, Direction::Ingress, &a, secs(1 + 179 + 181))
            .is_allow());

        let req = PacketSummary::icmp(ip(ME), ip(PEER), 8, 0, 77);
        let rep = PacketSummary::icmp(ip(PEER), ip(ME), 0, 0, 77);
        let other_id = PacketSummary::icmp(ip(PEER), ip(ME), 0, 0, 78);
        ct.classify(&rs, Direction::Egress, &req, secs(0));
        assert!(ct
            .classify(&rs, Direction::Ingress, &rep, secs(1))
            .is_allow());
        assert!(!ct
            .classify(&rs, Direction::Ingress, &other_id, secs(1))
            .is_allow());
        assert!(
            !ct.classify(&rs, Direction::Ingress, &rep, secs(1 + 31))
                .is_allow(),
            "icmp timeout"
        );
    }

    #[test]
    fn icmp_errors_of_tracked_flows_are_related() {
        let rs = ruleset(&[], 1);
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let q = PacketSummary::udp(ip(ME), 5353, ip(PEER), 53);
        ct.classify(&rs, Direction::Egress, &q, secs(0));
        let inner = InnerPacket {
            src: ip(ME),
            dst: ip(PEER),
            proto: 17,
            src_port: 5353,
            dst_port: 53,
        };
        let unreach = PacketSummary::icmp_error(ip("198.51.100.1"), ip(ME), 3, 3, inner);
        assert_eq!(
            ct.classify(&rs, Direction::Ingress, &unreach, secs(1)),
            Verdict::Allow {
                rule: None,
                via: Via::Related
            }
        );
        let stranger = InnerPacket {
            src_port: 9999,
            ..inner
        };
        let unrelated = PacketSummary::icmp_error(ip("198.51.100.1"), ip(ME), 3, 3, stranger);
        assert_eq!(
            ct.classify(&rs, Direction::Ingress, &unrelated, secs(1)),
            Verdict::Deny { rule: None }
        );
    }

    #[test]
    fn rule_change_revokes_only_denied_flows() {
        let rs1 = ruleset(
            &[
                "FROM any TO all vms ALLOW tcp PORT 80",
                "FROM any TO all vms ALLOW tcp PORT 22",
            ],
            1,
        );
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let s80 = PacketSummary::tcp(ip(PEER), 1000, ip(ME), 80, TCP_SYN);
        let s22 = PacketSummary::tcp(ip(PEER), 1001, ip(ME), 22, TCP_SYN);
        assert!(ct
            .classify(&rs1, Direction::Ingress, &s80, secs(0))
            .is_allow());
        assert!(ct
            .classify(&rs1, Direction::Ingress, &s22, secs(0))
            .is_allow());
        let rs2 = ruleset(&["FROM any TO all vms ALLOW tcp PORT 80"], 2);
        let a80 = PacketSummary::tcp(ip(PEER), 1000, ip(ME), 80, TCP_ACK);
        let a22 = PacketSummary::tcp(ip(PEER), 1001, ip(ME), 22, TCP_ACK);
        assert_eq!(
            ct.classify(&rs2, Direction::Ingress, &a80, secs(1)),
            Verdict::Allow {
                rule: Some(RuleId(0)),
                via: Via::Established
            }
        );
        assert_eq!(
            ct.classify(&rs2, Direction::Ingress, &a22, secs(1)),
            Verdict::Deny { rule: None }
        );
        assert_eq!(ct.stats().revoked, 1);
        // The revoked flow stays cut both ways: the local side's next mid-stream packet must
        // not pick it up again as a new outbound flow (which would re-admit the peer).
        let out22 = PacketSummary::tcp(ip(ME), 22, ip(PEER), 1001, TCP_ACK);
        assert_eq!(
            ct.flow_state(7, Direction::Egress, &out22),
            Some(FlowState::Revoked)
        );
        assert_eq!(
            ct.classify(&rs2, Direction::Egress, &out22, secs(2)),
            Verdict::Deny { rule: None }
        );
        assert_eq!(
            ct.classify(&rs2, Direction::Ingress, &a22, secs(3)),
            Verdict::Deny { rule: None }
        );
        assert_eq!(ct.stats().revoked, 1);
        // It stays revoked while packets keep coming, and ends after the closing timeout of
        // silence.
        let closing = Timeouts::default().tcp_closing.as_secs();
        assert!(!ct
            .classify(&rs2, Direction::Egress, &out22, secs(3 + closing - 1))
            .is_allow());
        assert!(ct.sweep(secs(3 + 2 * closing), 1 << 20) >= 1);
        assert_eq!(ct.flow_state(7, Direction::Egress, &out22), None);
        // A later rule set that allows it again brings a revoked flow back.
        let s23 = PacketSummary::tcp(ip(PEER), 1002, ip(ME), 22, TCP_SYN);
        assert!(ct
            .classify(&rs1, Direction::Ingress, &s23, secs(1000))
            .is_allow());
        let rs3 = ruleset(&["FROM any TO all vms ALLOW tcp PORT 80"], 3);
        let a23 = PacketSummary::tcp(ip(PEER), 1002, ip(ME), 22, TCP_ACK);
        assert!(!ct
            .classify(&rs3, Direction::Ingress, &a23, secs(1001))
            .is_allow());
        let rs4 = ruleset(&["FROM any TO all vms ALLOW tcp PORT 22"], 4);
        assert!(ct
            .classify(&rs4, Direction::Ingress, &a23, secs(1002))
            .is_allow());
        assert_eq!(
            ct.flow_state(7, Direction::Ingress, &a23),
            Some(FlowState::Established)
        );
    }

    #[test]
    fn local_side_keeps_two_vnics_apart_and_vni_scopes() {
        let rs = ruleset(&[], 1);
        let mut ct = Conntrack::new(ConntrackConfig::default());
        // A (10.0.0.1) → B (10.0.0.2) on the same host and VNI: A's egress creates state; B's
        // ingress is a different entry and needs B's own rules (default deny here).
        let p = PacketSummary::tcp(ip(ME), 1, ip("10.0.0.2"), 2, TCP_SYN);
        assert!(ct.classify(&rs, Direction::Egress, &p, secs(0)).is_allow());
        assert!(!ct.classify(&rs, Direction::Ingress, &p, secs(0)).is_allow());
        // The same 5-tuple on another VNI is another flow.
        let rs_other = VnicRuleSet::empty(VM1, 8, 1, true);
        let back = PacketSummary::tcp(ip("10.0.0.2"), 2, ip(ME), 1, TCP_SYN | TCP_ACK);
        assert!(ct
            .classify(&rs, Direction::Ingress, &back, secs(0))
            .is_allow());
        assert!(!ct
            .classify(&rs_other, Direction::Ingress, &back, secs(0))
            .is_allow());
    }

    #[test]
    fn bounded_table_evicts_closing_first_and_counts() {
        let rs = ruleset(&[], 1);
        let mut ct = Conntrack::new(ConntrackConfig {
            max_flows: 8,
            ..Default::default()
        });
        for port in 0..8u16 {
            let p = PacketSummary::tcp(ip(ME), 1000 + port, ip(PEER), 80, TCP_SYN);
            ct.classify(&rs, Direction::Egress, &p, secs(0));
            let r = PacketSummary::tcp(ip(PEER), 80, ip(ME), 1000 + port, TCP_SYN | TCP_ACK);
            ct.classify(&rs, Direction::Ingress, &r, secs(0));
            let a = PacketSummary::tcp(ip(ME), 1000 + port, ip(PEER), 80, TCP_ACK);
            ct.classify(&rs, Direction::Egress, &a, secs(0));
        }
        // Close flow 3 with RST, then add a ninth flow: flow 3 is the victim.
        let rst = PacketSummary::tcp(ip(PEER), 80, ip(ME), 1003, TCP_RST);
        ct.classify(&rs, Direction::Ingress, &rst, secs(1));
        let p9 = PacketSummary::tcp(ip(ME), 2000, ip(PEER), 80, TCP_SYN);
        ct.classify(&rs, Direction::Egress, &p9, secs(2));
        assert_eq!(ct.len(), 8);
        assert_eq!(ct.stats().evicted_closing, 1);
        let f3 = PacketSummary::tcp(ip(ME), 1003, ip(PEER), 80, TCP_ACK);
        assert_eq!(ct.flow_state(7, Direction::Egress, &f3), None);
        for port in [0u16, 1, 2, 4, 5, 6, 7] {
            let f = PacketSummary::tcp(ip(ME), 1000 + port, ip(PEER), 80, TCP_ACK);
            assert_eq!(
                ct.flow_state(7, Direction::Egress, &f),
                Some(FlowState::Established)
            );
        }
        // All live and established: the longest idle goes.
        for port in 0..2u16 {
            let p = PacketSummary::tcp(ip(ME), 3000 + port, ip(PEER), 80, TCP_ACK);
            ct.classify(&rs, Direction::Egress, &p, secs(3));
        }
        assert_eq!(ct.len(), 8);
        assert!(ct.stats().evicted_closing + ct.stats().evicted_idle >= 2);
        // Sweep removes expired entries.
        assert_eq!(ct.sweep(secs(1_000_000), 100), 8);
        assert!(ct.is_empty());
    }

    /// `n` replied UDP flows of `owner` (to peers of its own), one a millisecond from `t0` ms.
    fn udp_flood(ct: &mut Conntrack, rs: &VnicRuleSet, owner: Owner, n: u32, t0: u64) {
        for i in 0..n {
            let peer = IpAddr::V4((0xc000_0200 + (owner.0 << 16) + i).into());
            let port = 1024 + (i % 60000) as u16;
            let now = Duration::from_millis(t0 + u64::from(i));
            let out = PacketSummary::udp(ip(ME), port, peer, 53);
            let _ = ct.classify_for(owner, rs, Direction::Egress, &out, now);
            let back = PacketSummary::udp(peer, 53, ip(ME), port);
            let _ = ct.classify_for(owner, rs, Direction::Ingress, &back, now);
        }
    }

    #[test]
    fn eviction_walk_samples_every_slot() {
        let rs = ruleset(&[], 1);
        let mut ct = Conntrack::new(ConntrackConfig {
            max_flows: 2048,
            ..Default::default()
        });
        let slots = ct.mask + 1;
        // Fill the table, then keep inserting: every insert evicts after a walk.
        udp_flood(&mut ct, &rs, Owner(0), 2048 + 1024, 0);
        ct.check_invariants();
        let unsampled = ct.sampled.iter().filter(|&&n| n == 0).count();
        assert_eq!(unsampled, 0, "{unsampled} of {slots} slots never sampled");
        // And evenly: no slot looked at far more often than the average.
        let total: u64 = ct.sampled.iter().map(|&n| u64::from(n)).sum();
        let max = u64::from(*ct.sampled.iter().max().unwrap());
        assert!(
            max <= 2 * total.div_ceil(slots as u64) + 1,
            "max {max}, total {total}"
        );
    }

    #[test]
    fn one_owner_cannot_evict_another_within_its_share() {
        let rs = ruleset(&["FROM any TO all vms ALLOW tcp PORT 22"], 1);
        let mut ct = Conntrack::new(ConntrackConfig {
            max_flows: 64,
            min_share: 4,
            ..Default::default()
        });
        let (victim, flooder) = (Owner(1), Owner(0));
        // The victim's inbound SSH session, then idle.
        let syn = PacketSummary::tcp(ip(PEER), 40000, ip(ME), 22, TCP_SYN);
        assert!(ct
            .classify_for(victim, &rs, Direction::Ingress, &syn, secs(0))
            .is_allow());
        let sa = PacketSummary::tcp(ip(ME), 22, ip(PEER), 40000, TCP_SYN | TCP_ACK);
        ct.classify_for(victim, &rs, Direction::Egress, &sa, secs(0));
        let ack = PacketSummary::tcp(ip(PEER), 40000, ip(ME), 22, TCP_ACK);
        ct.classify_for(victim, &rs, Direction::Ingress, &ack, secs(0));
        // Ten times the table in replied UDP flows, all more recent than the SSH session.
        udp_flood(&mut ct, &rs, flooder, 640, 1000);
        ct.check_invariants();
        assert_eq!(ct.len(), 64);
        assert_eq!(ct.owner_flows(victim), 1);
        assert_eq!(ct.owner_flows(flooder), 63);
        assert_eq!(
            ct.flow_state(7, Direction::Ingress, &ack),
            Some(FlowState::Established)
        );
        // The victim may grow to its share (32) by taking the flooder's flows...
        for p in 0..31u16 {
            let syn = PacketSummary::tcp(ip(PEER), 41000 + p, ip(ME), 22, TCP_SYN);
            assert!(ct
                .classify_for(victim, &rs, Direction::Ingress, &syn, secs(10))
                .is_allow());
        }
        assert_eq!(ct.owner_flows(victim), 32);
        // ... and the flooder, now at its share, only churns its own.
        udp_flood(&mut ct, &rs, flooder, 100, 20_000);
        assert_eq!(ct.owner_flows(victim), 32);
        assert_eq!(ct.owner_flows(flooder), 32);
        ct.check_invariants();
        // Removing an owner frees its share.
        assert_eq!(ct.forget_owner(flooder), 32);
        assert_eq!((ct.len(), ct.active_owners()), (32, 1));
        ct.check_invariants();
    }

    #[test]
    fn full_table_of_owners_within_their_share_refuses() {
        let rs = ruleset(&[], 1);
        let mut ct = Conntrack::new(ConntrackConfig {
            max_flows: 8,
            min_share: 4,
            ..Default::default()
        });
        udp_flood(&mut ct, &rs, Owner(0), 4, 0);
        udp_flood(&mut ct, &rs, Owner(1), 4, 100);
        assert_eq!(ct.len(), 8);
        // A third owner: every flow belongs to an owner within its share (4).
        let p = PacketSummary::udp(ip(ME), 9, ip(PEER), 9);
        assert_eq!(
            ct.classify_for(Owner(2), &rs, Direction::Egress, &p, secs(1)),
            Verdict::TableFull
        );
        assert_eq!(ct.stats().refused_full, 1);
        assert_eq!(ct.flow_state(7, Direction::Egress, &p), None);
        // Once a flow expires, its slot is anyone's.
        assert!(ct
            .classify_for(Owner(2), &rs, Direction::Egress, &p, secs(1000))
            .is_allow());
        assert_eq!(ct.stats().evicted_expired, 1);
        ct.check_invariants();
    }

    #[test]
    fn many_flows_insert_and_remove_consistently() {
        let rs = ruleset(&[], 1);
        let mut ct = Conntrack::new(ConntrackConfig {
            max_flows: 1000,
            ..Default::default()
        });
        for i in 0..5000u32 {
            let p = PacketSummary::udp(
                ip(ME),
                (i % 60000) as u16,
                IpAddr::V4((0xc000_0200 + i).into()),
                53,
            );
            assert!(ct
                .classify(
                    &rs,
                    Direction::Egress,
                    &p,
                    Duration::from_millis(u64::from(i))
                )
                .is_allow());
            assert!(ct.len() <= 1000);
        }
        // The most recent flows are all still found.
        for i in 4990..5000u32 {
            let p = PacketSummary::udp(
                ip(ME),
                (i % 60000) as u16,
                IpAddr::V4((0xc000_0200 + i).into()),
                53,
            );
            assert_eq!(
                ct.flow_state(7, Direction::Egress, &p),
                Some(FlowState::Unreplied)
            );
        }
        let s = ct.stats();
        assert_eq!(s.evicted_expired + s.evicted_closing + s.evicted_idle, 4000);
    }

    #[test]
    fn hash_keeps_ports_and_addresses_apart() {
        // Flows whose ports and low address bits vary together (one VM, many peers and
        // source ports) must not share hashes: long probe chains would make every lookup slow.
        let mut hashes = std::collections::HashSet::new();
        let mut homes = std::collections::HashSet::new();
        let k = HashKeys::new(1);
        for p in 0..4096u16 {
            let peer = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, (p % 200) as u8));
            let pkt = PacketSummary::tcp(peer, 443, ip(ME), 10000 + p, TCP_ACK);
            let (key, _) = key_of(7, Direction::Ingress, &pkt).unwrap();
            hashes.insert(key.hash(&k));
            homes.insert(key.hash(&k) & 0xffff);
        }
        assert_eq!(hashes.len(), 4096);
        // 4096 keys into 65536 buckets: about 3 900 distinct if uniform.
        assert!(homes.len() > 3800, "{}", homes.len());
    }

    #[test]
    fn ipv6_flows_and_echo() {
        let rs = ruleset(&["FROM any TO all vms ALLOW tcp PORT 22"], 1);
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let (me, peer) = (ip("fd00::1"), ip("2001:db8::9"));
        let syn = PacketSummary::tcp(peer, 40000, me, 22, TCP_SYN);
        assert_eq!(
            ct.classify(&rs, Direction::Ingress, &syn, secs(0)),
            Verdict::Allow {
                rule: Some(RuleId(0)),
                via: Via::NewFlow
            }
        );
        let syn_ack = PacketSummary::tcp(me, 22, peer, 40000, TCP_SYN | TCP_ACK);
        assert!(ct
            .classify(&rs, Direction::Egress, &syn_ack, secs(0))
            .is_allow());
        let ack = PacketSummary::tcp(peer, 40000, me, 22, TCP_ACK);
        assert_eq!(
            ct.classify(&rs, Direction::Ingress, &ack, secs(1)),
            Verdict::Allow {
                rule: Some(RuleId(0)),
                via: Via::Established
            }
        );
        assert_eq!(
            ct.flow_state(7, Direction::Ingress, &ack),
            Some(FlowState::Established)
        );
        // IPv4 addresses and IPv6 ones of the same value are different flows.
        let udp4 = PacketSummary::udp(ip("0.0.0.1"), 53, ip("0.0.0.9"), 53);
        let udp6 = PacketSummary::udp(ip("::1"), 53, ip("::9"), 53);
        assert!(ct
            .classify(&rs, Direction::Egress, &udp4, secs(1))
            .is_allow());
        assert!(ct.flow_state(7, Direction::Egress, &udp4).is_some());
        assert_eq!(ct.flow_state(7, Direction::Egress, &udp6), None);
        let req = PacketSummary::icmp(me, peer, 128, 0, 5);
        let rep = PacketSummary::icmp(peer, me, 129, 0, 5);
        assert!(ct
            .classify(&rs, Direction::Egress, &req, secs(2))
            .is_allow());
        assert_eq!(
            ct.classify(&rs, Direction::Ingress, &rep, secs(2)),
            Verdict::Allow {
                rule: None,
                via: Via::Established
            }
        );
        ct.check_invariants();
    }

    use proptest::prelude::*;

    proptest! {
        /// Random traffic over a tiny table (constant eviction, probe chains wrapping around,
        /// backward-shift deletions): the table stays consistent, bounded, and a flow just
        /// admitted is always found.
        /// The IPv4 key (one-word ordering) is the general key.
        #[test]
        fn ipv4_key_is_the_general_key(a in any::<u32>(), b in any::<u32>(), pa in any::<u16>(),
                                       pb in any::<u16>(), vni in any::<u32>(), local in any::<bool>()) {
            let (sa, sb) = (Ipv4Addr::from(a), Ipv4Addr::from(b));
            let v4 = FlowKey::new_v4(vni, 6, (sa, pa), (sb, pb), local);
            let any = FlowKey::new_any(vni, 6, (IpAddr::V4(sa), pa), (IpAddr::V4(sb), pb), local);
            prop_assert_eq!(v4, any);
        }

        #[test]
        fn table_stays_consistent(ops in proptest::collection::vec(
            (0u8..6, 0u8..4, 0u16..6, 0u16..3, any::<u8>(), any::<bool>(), 0u64..40), 1..300
        )) {
            let rs = ruleset(&["FROM any TO all vms ALLOW tcp PORT 1", "FROM any TO all vms ALLOW udp PORT all"], 1);
            let mut ct = Conntrack::new(ConntrackConfig { max_flows: 5, seed: 1, ..Default::default() });
            let mut now = Duration::ZERO;
            for (kind, peer, lport, rport, flags, ingress, dt) in ops {
                now += Duration::from_secs(dt);
                let me = ip(ME);
                let other = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, peer));
                let dir = if ingress { Direction::Ingress } else { Direction::Egress };
                let (src, sp, dst, dp) = if ingress { (other, rport, me, lport) } else { (me, lport, other, rport) };
                let pkt = match kind {
                    0 | 1 => PacketSummary::tcp(src, sp, dst, dp, flags & 0x17),
                    2 => PacketSummary::udp(src, sp, dst, dp),
                    3 => PacketSummary::icmp(src, dst, if flags % 2 == 0 { 8 } else { 0 }, 0, sp),
                    4 => PacketSummary::icmp_error(src, dst, 3, 1, InnerPacket { src: dst, dst: src, proto: 17, src_port: dp, dst_port: sp }),
                    _ => {
                        ct.sweep(now, usize::from(flags % 4));
                        ct.check_invariants();
                        continue;
                    }
                };
                let v = ct.classify(&rs, dir, &pkt, now);
                ct.check_invariants();
                if let Verdict::Allow { via: Via::NewFlow, .. } = v {
                    prop_assert!(ct.flow_state(7, dir, &pkt).is_some());
                }
            }
        }
    }
}
