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
//! removed and the packet denied (`revoked` counter). So established flows survive a rule
//! change unless the new rules deny them.
//!
//! **Memory and time.** The table is allocated once ([`Conntrack::new`]): open addressing with
//! linear probing at ≤ 50 % load and backward-shift deletion, keyed hashing (seed passed in),
//! no allocation per packet. Time is a parameter (`now`, any monotonic epoch); nothing here
//! reads a clock. When full, an insert evicts one entry chosen among a bounded sample
//! (preferring expired, then closing or half-open, then the longest idle), each counted.
//! Denied packets never create state (so a spoofing flood cannot evict real flows).

use std::net::IpAddr;
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
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig {
            max_flows: 65536,
            timeouts: Timeouts::default(),
            seed: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

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
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FlowKey {
    lo: u128,
    hi: u128,
    lo_port: u16,
    hi_port: u16,
    vni: u32,
    proto: u8,
    v6: bool,
    local_is_lo: bool,
}

#[inline(always)]
fn addr_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

impl FlowKey {
    /// Key of a packet `src → dst` seen by the vnic whose endpoint is `local_is_src`.
    #[inline(always)]
    fn new(
        vni: u32,
        proto: u8,
        src: (IpAddr, u16),
        dst: (IpAddr, u16),
        local_is_src: bool,
    ) -> Self {
        let s = (addr_bits(src.0), src.1);
        let d = (addr_bits(dst.0), dst.1);
        let src_is_lo = s <= d;
        let (lo, hi) = if src_is_lo { (s, d) } else { (d, s) };
        FlowKey {
            lo: lo.0,
            hi: hi.0,
            lo_port: lo.1,
            hi_port: hi.1,
            vni,
            proto,
            v6: src.0.is_ipv6(),
            local_is_lo: local_is_src == src_is_lo,
        }
    }

    #[inline(always)]
    fn hash(&self, seed: u64) -> u64 {
        #[inline(always)]
        fn fold(a: u64, b: u64) -> u64 {
            let r = u128::from(a).wrapping_mul(u128::from(b));
            (r as u64) ^ ((r >> 64) as u64)
        }
        const K: u64 = 0x243f_6a88_85a3_08d3;
        let meta = u64::from(self.lo_port)
            | u64::from(self.hi_port) << 16
            | u64::from(self.vni & 0x00ff_ffff) << 32
            | u64::from(self.proto) << 56;
        let flags = u64::from(self.v6) | u64::from(self.local_is_lo) << 1;
        // Two independent folds (they run in parallel), then one to combine.
        const K2: u64 = 0x1319_8a2e_0370_7344;
        // The seed is in both operands of every fold, so no chosen input zeroes a product.
        let s2 = seed.rotate_left(32) ^ K;
        let a = fold(seed ^ self.lo as u64, s2 ^ (self.lo >> 64) as u64);
        let b = fold(
            s2 ^ meta ^ self.hi as u64,
            seed ^ K2 ^ flags ^ (self.hi >> 64) as u64,
        );
        let h = fold(a ^ K2, b ^ s2);
        // Never 0: 0 marks an empty slot.
        h | 1
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: FlowKey,
    state: FlowState,
    /// The flow's first packet came from the `lo` endpoint.
    orig_is_lo: bool,
    rule: Option<RuleId>,
    generation: u64,
    first_dir: Direction,
    first: RuleQuery,
    expires: u64,
    last_seen: u64,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            key: FlowKey::default(),
            state: FlowState::Closed,
            orig_is_lo: true,
            rule: None,
            generation: 0,
            first_dir: Direction::Egress,
            first: RuleQuery {
                peer: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                proto: 0,
                dst_port: 0,
                icmp: (0, 0),
            },
            expires: 0,
            last_seen: 0,
        }
    }
}

/// Size of the eviction sample.
const EVICT_SAMPLE: usize = 16;
/// How far the eviction cursor moves at least, so successive evictions sample new slots.
const EVICT_SCAN: usize = 128;
/// Upper bound on `max_flows` (2^26 flows; the table holds twice as many slots).
pub const MAX_FLOWS_LIMIT: usize = 1 << 26;

/// The connection-tracking table of one dataplane thread (or shard). Not `Sync`: each thread
/// owns its own, flows are pinned to threads by hash.
pub struct Conntrack {
    hashes: Box<[u64]>,
    slots: Box<[Entry]>,
    mask: usize,
    len: usize,
    max_flows: usize,
    cursor: usize,
    timeouts: Timeouts,
    /// `timeouts.tcp_established` in nanoseconds (the hot path's timeout).
    established_ns: u64,
    seed: u64,
    stats: ConntrackStats,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
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

impl Conntrack {
    /// Allocates the whole table.
    pub fn new(config: ConntrackConfig) -> Self {
        let max = config.max_flows.clamp(1, MAX_FLOWS_LIMIT);
        let cap = (max * 2).next_power_of_two();
        Conntrack {
            hashes: vec![0; cap].into_boxed_slice(),
            slots: vec![Entry::default(); cap].into_boxed_slice(),
            mask: cap - 1,
            len: 0,
            max_flows: max,
            cursor: 0,
            timeouts: config.timeouts,
            established_ns: nanos(config.timeouts.tcp_established),
            seed: config.seed,
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
        let key = self.key_of(vni, dir, pkt)?;
        self.find(&key, key.hash(self.seed))
            .map(|i| self.slots[i].state)
    }

    #[inline(always)]
    fn key_of(&self, vni: u32, dir: Direction, pkt: &PacketSummary) -> Option<FlowKey> {
        let local_is_src = dir == Direction::Egress;
        match pkt.proto {
            PROTO_ICMP | PROTO_ICMP6 => {
                let i = pkt.icmp?;
                echo_kind(pkt.proto, i.ty)?;
                Some(FlowKey::new(
                    vni,
                    pkt.proto,
                    (pkt.src, i.echo_id),
                    (pkt.dst, i.echo_id),
                    local_is_src,
                ))
            }
            _ => Some(FlowKey::new(
                vni,
                pkt.proto,
                (pkt.src, pkt.src_port),
                (pkt.dst, pkt.dst_port),
                local_is_src,
            )),
        }
    }

    #[inline(always)]
    fn find(&self, key: &FlowKey, hash: u64) -> Option<usize> {
        let mut i = hash as usize & self.mask;
        loop {
            let h = self.hashes[i];
            if h == 0 {
                return None;
            }
            if h == hash && self.slots[i].key == *key {
                return Some(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    fn remove_at(&mut self, idx: usize) {
        let mask = self.mask;
        let mut i = idx;
        self.hashes[i] = 0;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let h = self.hashes[j];
            if h == 0 {
                break;
            }
            let home = h as usize & mask;
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if stays {
                continue;
            }
            self.hashes[i] = h;
            self.slots[i] = self.slots[j];
            self.hashes[j] = 0;
            i = j;
        }
        self.len -= 1;
    }

    /// Makes room for one entry if the table is full.
    fn make_room(&mut self, now: u64) {
        if self.len < self.max_flows {
            return;
        }
        // (rank, idle-since) — lower is a better victim.
        let mut best: Option<(usize, u8, u64)> = None;
        let mut seen = 0;
        let mut scanned = 0;
        for step in 0..=self.mask {
            scanned = step + 1;
            let i = (self.cursor + step) & self.mask;
            if self.hashes[i] == 0 {
                continue;
            }
            let e = &self.slots[i];
            let rank = if e.expires <= now {
                0
            } else if e.state.closing_or_half_open() {
                1
            } else {
                2
            };
            if best.is_none_or(|(_, r, t)| (rank, e.last_seen) < (r, t)) {
                best = Some((i, rank, e.last_seen));
            }
            seen += 1;
            if rank == 0 || seen >= EVICT_SAMPLE {
                break;
            }
        }
        self.cursor = (self.cursor + scanned.max(EVICT_SCAN)) & self.mask;
        if let Some((i, rank, _)) = best {
            match rank {
                0 => self.stats.evicted_expired += 1,
                1 => self.stats.evicted_closing += 1,
                _ => self.stats.evicted_idle += 1,
            }
            self.remove_at(i);
        }
    }

    fn insert(&mut self, entry: Entry, hash: u64, now: u64) {
        self.make_room(now);
        if self.len >= self.max_flows {
            return;
        }
        let mut i = hash as usize & self.mask;
        while self.hashes[i] != 0 {
            i = (i + 1) & self.mask;
        }
        self.hashes[i] = hash;
        self.slots[i] = entry;
        self.len += 1;
    }

    fn timeout(&self, state: FlowState, proto: u8) -> u64 {
        let t = &self.timeouts;
        nanos(match state {
            FlowState::SynSent | FlowState::SynReceived => t.tcp_handshake,
            FlowState::Established => t.tcp_established,
            FlowState::FinWait | FlowState::TimeWait => t.tcp_closing,
            FlowState::Closed => t.tcp_closed,
            _ if proto == PROTO_ICMP || proto == PROTO_ICMP6 => t.icmp,
            FlowState::Unreplied => t.udp_unreplied,
            FlowState::Replied => t.udp_replied,
        })
    }

    /// Test-only: every occupied slot is reachable from its home slot, and `len` is right.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut count = 0;
        for i in 0..=self.mask {
            if self.hashes[i] == 0 {
                continue;
            }
            count += 1;
            let key = self.slots[i].key;
            assert_eq!(self.hashes[i], key.hash(self.seed), "slot {i} hash");
            assert_eq!(
                self.find(&key, self.hashes[i]),
                Some(i),
                "slot {i} reachable"
            );
        }
        assert_eq!(count, self.len);
        assert!(self.len <= self.max_flows);
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
            if self.hashes[i] != 0 && self.slots[i].expires <= now {
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

    /// Classifies one packet crossing the vnic of `rules` in direction `dir` at time `now`:
    /// one hash lookup for a tracked flow; otherwise one rule evaluation, and state for an
    /// allowed new flow. No allocation.
    pub fn classify(
        &mut self,
        rules: &VnicRuleSet,
        dir: Direction,
        pkt: &PacketSummary,
        now: Duration,
    ) -> Verdict {
        if !rules.is_filtered() {
            self.stats.unfiltered += 1;
            return Verdict::Allow {
                rule: None,
                via: Via::Unfiltered,
            };
        }
        let now_ns = nanos(now);
        let vni = rules.vni();
        // ICMP errors about a tracked flow.
        if let Some(icmp) = pkt.icmp {
            if is_icmp_error(pkt.proto, icmp.ty) {
                if let Some(inner) = icmp.inner {
                    if let Some(rule) = self.related(vni, dir, &inner, now_ns) {
                        self.stats.related += 1;
                        return Verdict::Allow {
                            rule,
                            via: Via::Related,
                        };
                    }
                }
                return self.stateless(rules, dir, pkt);
            }
        }
        let Some(key) = self.key_of(vni, dir, pkt) else {
            // Non-echo, non-error ICMP: rules only.
            return self.stateless(rules, dir, pkt);
        };
        let hash = key.hash(self.seed);
        let flags = pkt.tcp_flags;
        let syn_only = pkt.proto == PROTO_TCP && flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
        if let Some(i) = self.find(&key, hash) {
            let (expires, state, orig_is_lo, generation, mut rule) = {
                let e = &self.slots[i];
                (e.expires, e.state, e.orig_is_lo, e.generation, e.rule)
            };
            let src_is_lo = (addr_bits(pkt.src), key_port(pkt, true))
                <= (addr_bits(pkt.dst), key_port(pkt, false));
            let from_orig = src_is_lo == orig_is_lo;
            let reopen =
                syn_only && from_orig && matches!(state, FlowState::TimeWait | FlowState::Closed);
            if expires <= now_ns || reopen {
                self.remove_at(i);
                if !reopen {
                    self.stats.expired += 1;
                }
            } else {
                if generation != rules.generation() {
                    let (first_dir, first) = (self.slots[i].first_dir, self.slots[i].first);
                    match rules.evaluate(first_dir, &first) {
                        RuleVerdict::AllowedBy(id) => rule = Some(id),
                        RuleVerdict::DefaultAllow | RuleVerdict::Unfiltered => rule = None,
                        v => {
                            self.remove_at(i);
                            self.stats.revoked += 1;
                            return deny(v);
                        }
                    }
                }
                let next = next_state(state, pkt.proto, flags, from_orig);
                let timeout =
                    if next == state && pkt.proto == PROTO_TCP && state == FlowState::Established {
                        self.established_ns
                    } else {
                        self.timeout(next, pkt.proto)
                    };
                let slot = &mut self.slots[i];
                slot.rule = rule;
                slot.generation = rules.generation();
                slot.state = next;
                slot.last_seen = now_ns;
                slot.expires = now_ns.saturating_add(timeout);
                self.stats.established += 1;
                return Verdict::Allow {
                    rule,
                    via: Via::Established,
                };
            }
        }
        // A new flow: classify once.
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
        let initial = match pkt.proto {
            PROTO_TCP => {
                if syn_only {
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
        let src_is_lo =
            (addr_bits(pkt.src), key_port(pkt, true)) <= (addr_bits(pkt.dst), key_port(pkt, false));
        let entry = Entry {
            key,
            state,
            orig_is_lo: src_is_lo,
            rule,
            generation: rules.generation(),
            first_dir: dir,
            first: query,
            expires: now_ns.saturating_add(self.timeout(state, pkt.proto)),
            last_seen: now_ns,
        };
        self.insert(entry, hash, now_ns);
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
        let (sp, dp) = if inner.proto == PROTO_ICMP || inner.proto == PROTO_ICMP6 {
            (inner.src_port, inner.src_port)
        } else {
            (inner.src_port, inner.dst_port)
        };
        let key = FlowKey::new(
            vni,
            inner.proto,
            (inner.src, sp),
            (inner.dst, dp),
            local_is_src,
        );
        let i = self.find(&key, key.hash(self.seed))?;
        let e = &self.slots[i];
        (e.expires > now).then_some(e.rule)
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

#[inline(always)]
fn key_port(pkt: &PacketSummary, src: bool) -> u16 {
    match (pkt.proto, pkt.icmp) {
        (PROTO_ICMP | PROTO_ICMP6, Some(i)) => i.echo_id,
        _ if src => pkt.src_port,
        _ => pkt.dst_port,
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

    use proptest::prelude::*;

    proptest! {
        /// Random traffic over a tiny table (constant eviction, probe chains wrapping around,
        /// backward-shift deletions): the table stays consistent, bounded, and a flow just
        /// admitted is always found.
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
