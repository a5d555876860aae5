//! The sans-IO dataplane core.
//!
//! A [`Core`] is the forwarding state machine of one host. It has no sockets, threads or
//! clock: the caller passes every frame and the current time in, and acts on what comes out.
//!
//! Inputs:
//! - [`Core::from_vnic`]: a frame a container sent. Checked against the vnic (source MAC and
//!   IP, MTU, no 802.1Q tag), then answered by the ARP/NDP proxy, delivered to a local vnic,
//!   encapsulated for the underlay, held pending a lookup, or dropped.
//! - [`Core::from_underlay`]: a VXLAN datagram from another host. Decapsulated (by moving the
//!   buffer's start; no copy) and delivered only to a vnic on that VNI with that destination MAC.
//! - [`Core::handle_answer`]: a resolver's answer to a lookup the core asked for.
//! - [`Core::handle_timeout`]: time passing (held frames expire, caches are swept).
//!
//! Outputs:
//! - the [`Verdict`] of each frame call (the buffer now holds what to send);
//! - [`Core::poll_lookup`]: lookups to hand to a resolver;
//! - [`Core::poll_output`]: frames released later (held frames after their lookup, ARP/NDP
//!   answers that needed a lookup).
//!
//! Firewall: a vnic may carry a compiled rule set ([`Core::set_firewall`]). Then every IP
//! packet it sends is checked against its outbound rules and every IP packet delivered to it
//! (from the underlay or from a local vnic) against its inbound rules, through one
//! connection-tracking table per core (created when the first filter is set): a new flow is
//! classified once, later packets of either direction cost one lookup. ARP, neighbour
//! discovery and non-first IP fragments are not filtered (the first fragment carries the
//! ports and is). Denied packets are dropped as [`DropReason::FirewallRule`] or
//! [`DropReason::FirewallDefault`].
//!
//! Caches are keyed by VNI, so tenants may reuse the same MACs and IPs. Entries past their TTL
//! are still used while a refresh lookup is in flight (so a busy flow never stalls on expiry);
//! a "not found" answer removes the entry and is remembered briefly in a negative cache.
//! Frames waiting for a lookup sit in a bytes-capped queue per destination; when it overflows
//! the oldest frame is dropped and counted.

pub mod buf;
pub mod counters;
pub mod lookup;
pub mod proxy;
pub mod ratelimit;

pub use buf::{FrameBuf, HEADROOM};
pub use counters::{Counters, CountersSnapshot, DropReason};
pub use lookup::{LookupAnswer, LookupError, LookupKey, Vl3Mapping};
pub use ratelimit::RateLimit;

use crate::firewall::compile::{Direction, VnicRuleSet};
use crate::firewall::conntrack::{self, Conntrack, ConntrackConfig, ConntrackStats, Owner};
use crate::firewall::packet::{self as fwpacket, SummaryError};
use crate::wire::{self, arp, ethernet, ipv6, ndp, vxlan, EtherType, Mac, Vni};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Identifies a vnic within one core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VnicId(pub u32);

/// What a vnic is: fixed by the operator, never by the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnicConfig {
    /// The segment this vnic is on.
    pub vni: Vni,
    /// Its MAC.
    pub mac: Mac,
    /// Its IPv4 addresses.
    pub ipv4: Vec<Ipv4Addr>,
    /// Its IPv6 addresses (the EUI-64 link-local address of `mac` is allowed as well).
    pub ipv6: Vec<Ipv6Addr>,
    /// Largest L3 packet it may send or receive.
    pub mtu: u16,
}

/// Why a vnic could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VnicError {
    /// Another vnic on the same VNI already has this MAC.
    #[error("MAC {mac} is already used by vnic {other:?} on VNI {vni}")]
    DuplicateMac {
        /// The VNI.
        vni: Vni,
        /// The MAC.
        mac: Mac,
        /// The vnic that has it.
        other: VnicId,
    },
    /// Another vnic on the same VNI already has this IP.
    #[error("IP {ip} is already used by vnic {other:?} on VNI {vni}")]
    DuplicateIp {
        /// The VNI.
        vni: Vni,
        /// The IP.
        ip: IpAddr,
        /// The vnic that has it.
        other: VnicId,
    },
    /// The MAC is multicast, broadcast or zero.
    #[error("MAC {0} is not a unicast address")]
    BadMac(Mac),
    /// The MTU is outside 576..=9000 (IPv4 minimum to jumbo).
    #[error("MTU {0} is out of range: expected 576..=9000")]
    BadMtu(u16),
    /// No such vnic.
    #[error("no vnic {0:?}")]
    NoSuchVnic(VnicId),
    /// A rule set compiled for another VNI.
    #[error("rule set is for VNI {rules}, the vnic is on VNI {vnic}")]
    FirewallVni {
        /// The vnic's VNI.
        vnic: Vni,
        /// The rule set's.
        rules: u32,
    },
}

/// Tunables. Defaults suit a production host.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a VL2/VL3 answer is fresh; after that it is still used while refreshed.
    pub cache_ttl: Duration,
    /// How long "not found" (or a failed lookup) is remembered.
    pub negative_ttl: Duration,
    /// How long a frame may wait for its lookup.
    pub lookup_timeout: Duration,
    /// Bytes held per destination while its lookup is in flight.
    pub pending_bytes_per_dest: usize,
    /// Destinations that may have frames held at once (the whole core).
    pub pending_max_dests: usize,
    /// Destinations one vnic may have waiting for a lookup at once (its new lookups beyond
    /// this are dropped as [`DropReason::PendingQuota`]). Well below `pending_max_dests`, so
    /// one container flooding ARP or SYNs to unresolved addresses cannot fill the core's
    /// table, nor the resolver's queue, for the others.
    pub pending_dests_per_vnic: usize,
    /// Cache entries stale for longer than this are removed by the sweep.
    pub stale_grace: Duration,
    /// Connection tracking (size, timeouts, hash seed); the table is allocated when the first
    /// filter is set.
    pub conntrack: ConntrackConfig,
    /// Underlay addresses whose ARP requests over VXLAN are answered on any VNI (foreign VXLAN
    /// peers listed by the operator, `fabric dataplane --peer`). Besides these, only sources
    /// this core has a mapping for on the request's VNI are answered (see
    /// [`Core::from_underlay`]).
    pub underlay_peers: Vec<IpAddr>,
    /// ARP answers to one underlay source (sources whose keyed hash collides share a bucket).
    pub underlay_arp_per_peer: RateLimit,
    /// ARP answers to the underlay, all sources together.
    pub underlay_arp_total: RateLimit,
    /// Lookups started by ARP requests from unknown underlay sources (to learn whether the
    /// sender lives there).
    pub underlay_arp_learn: RateLimit,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cache_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(2),
            lookup_timeout: Duration::from_secs(3),
            pending_bytes_per_dest: 64 * 1024,
            pending_max_dests: 4096,
            pending_dests_per_vnic: 256,
            stale_grace: Duration::from_secs(300),
            conntrack: ConntrackConfig {
                seed: random_seed(),
                ..ConntrackConfig::default()
            },
            underlay_peers: Vec::new(),
            // A Linux vxlan peer ARPs once a second per neighbour it resolves (three tries):
            // 50/s per peer host covers dozens of its containers resolving ours at once.
            underlay_arp_per_peer: RateLimit {
                per_sec: 50,
                burst: 100,
            },
            underlay_arp_total: RateLimit {
                per_sec: 1000,
                burst: 1000,
            },
            underlay_arp_learn: RateLimit {
                per_sec: 100,
                burst: 100,
            },
        }
    }
}

/// What to do with the frame that was passed in. The buffer holds the bytes to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The buffer holds a VXLAN datagram (header + inner frame): send it to `dst` over UDP.
    /// `flow_hash` hashes the inner flow, for the outer source port (RFC 7348).
    ToUnderlay {
        /// Underlay destination.
        dst: SocketAddr,
        /// Inner flow hash.
        flow_hash: u32,
    },
    /// The buffer holds an Ethernet frame for this local vnic.
    ToVnic(VnicId),
    /// The buffer now holds a synthesised ARP/NDP answer for this vnic (the sender).
    Reply(VnicId),
    /// The frame was copied into a queue pending a lookup; nothing to send now.
    Held,
    /// The frame was dropped.
    Drop(DropReason),
}

/// A frame released later by the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this VXLAN datagram to `dst`.
    Underlay {
        /// Underlay destination.
        dst: SocketAddr,
        /// Inner flow hash.
        flow_hash: u32,
        /// VXLAN header + inner frame.
        datagram: Vec<u8>,
    },
    /// Write this Ethernet frame to a local vnic.
    Vnic {
        /// The vnic.
        vnic: VnicId,
        /// The frame.
        frame: Vec<u8>,
    },
}

#[derive(Debug)]
struct Vnic {
    cfg: VnicConfig,
    link_local: Ipv6Addr,
    counters: Counters,
    /// The firewall (`None`: unfiltered).
    rules: Option<Arc<VnicRuleSet>>,
    /// Pending destinations (and so lookups in flight) this vnic started.
    pending_dests: usize,
}

impl Vnic {
    #[inline]
    fn owns_v4(&self, ip: Ipv4Addr) -> bool {
        self.cfg.ipv4.contains(&ip)
    }
    #[inline]
    fn owns_v6(&self, ip: Ipv6Addr) -> bool {
        ip == self.link_local || self.cfg.ipv6.contains(&ip)
    }
}

#[derive(Debug, Clone, Copy)]
struct Vl2Entry {
    underlay: SocketAddr,
    expires: Instant,
}

/// Where a (VNI, MAC) lives: one table for local vnics and VL2 answers, so forwarding a frame
/// costs one hash probe. A local vnic is authoritative: answers never overwrite it, and cache
/// invalidation and sweeps never remove it.
#[derive(Debug, Clone, Copy)]
enum L2Dest {
    Local(VnicId),
    Remote(Vl2Entry),
}

#[derive(Debug, Clone, Copy)]
struct Vl3Entry {
    mac: Mac,
    expires: Instant,
}

#[derive(Debug)]
struct Held {
    vnic: VnicId,
    at: Instant,
    frame: Vec<u8>,
}

#[derive(Debug)]
struct PendingQueue {
    /// The vnic whose frame started the lookup: the destination counts against its quota.
    owner: VnicId,
    frames: VecDeque<Held>,
    bytes: usize,
}

/// The forwarding state machine of one host. See the module docs.
#[derive(Debug)]
pub struct Core {
    cfg: Config,
    vnics: Vec<Option<Vnic>>,
    l2: FxHashMap<(Vni, Mac), L2Dest>,
    local_ip: FxHashMap<(Vni, IpAddr), VnicId>,
    vni_vnics: FxHashMap<Vni, u32>,
    vl3: FxHashMap<(Vni, IpAddr), Vl3Entry>,
    negative: FxHashMap<LookupKey, Instant>,
    in_flight: FxHashMap<LookupKey, Instant>,
    pending: FxHashMap<LookupKey, PendingQueue>,
    lookups: VecDeque<LookupKey>,
    outputs: VecDeque<Output>,
    counters: Counters,
    last_sweep: Option<Instant>,
    scratch: Vec<u8>,
    conntrack: Option<Tracker>,
    /// Time zero of the connection-tracking and rate-limit clocks.
    epoch: Instant,
    /// Remote VL2 entries per (VNI, underlay IP): the underlay hosts this core knows, per
    /// segment, whose ARP requests it answers.
    underlays: FxHashMap<(Vni, IpAddr), u32>,
    /// Operator-listed underlay peers (answered on every VNI).
    peers: rustc_hash::FxHashSet<IpAddr>,
    arp_per_peer: ratelimit::PerSource,
    arp_total: ratelimit::TokenBucket,
    arp_learn: ratelimit::TokenBucket,
    /// The underlay sources VXLAN is accepted from (`None`: every source). Replaced whole
    /// between batches by [`Core::set_members`]; one hash lookup per datagram.
    members: Option<rustc_hash::FxHashSet<IpAddr>>,
}

/// The connection-tracking table (allocated on first use).
struct Tracker(Conntrack);

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conntrack({} flows)", self.0.len())
    }
}

/// A per-process random hash key for the connection-tracking table.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish()
}

impl Default for Core {
    fn default() -> Self {
        Core::new(Config::default())
    }
}

impl Core {
    /// An empty core.
    pub fn new(cfg: Config) -> Core {
        let peers = cfg.underlay_peers.iter().copied().collect();
        let seed = cfg.conntrack.seed;
        Core {
            cfg,
            vnics: Vec::new(),
            l2: FxHashMap::default(),
            local_ip: FxHashMap::default(),
            vni_vnics: FxHashMap::default(),
            vl3: FxHashMap::default(),
            negative: FxHashMap::default(),
            in_flight: FxHashMap::default(),
            pending: FxHashMap::default(),
            lookups: VecDeque::new(),
            outputs: VecDeque::new(),
            counters: Counters::default(),
            last_sweep: None,
            scratch: vec![0u8; HEADROOM + 65_536],
            conntrack: None,
            epoch: Instant::now(),
            underlays: FxHashMap::default(),
            peers,
            arp_per_peer: ratelimit::PerSource::new(seed),
            arp_total: ratelimit::TokenBucket::default(),
            arp_learn: ratelimit::TokenBucket::default(),
            members: None,
        }
    }

    /// Replaces the member set: from now on VXLAN is accepted only from these underlay
    /// addresses (IPv4-mapped IPv6 counts as IPv4); others are dropped as
    /// [`DropReason::NotMember`]. `None` accepts every source again.
    pub fn set_members<I: IntoIterator<Item = IpAddr>>(&mut self, members: Option<I>) {
        self.members = members.map(|m| m.into_iter().map(|ip| ip.to_canonical()).collect());
    }

    /// How many members are in force (`None`: no member set, every source accepted).
    pub fn member_count(&self) -> Option<usize> {
        self.members.as_ref().map(|m| m.len())
    }

    /// Replace the operator-listed underlay peers (see [`Config::underlay_peers`]).
    pub fn set_underlay_peers(&mut self, peers: impl IntoIterator<Item = IpAddr>) {
        self.peers = peers.into_iter().collect();
    }

    /// Whether ARP requests over VXLAN from `src` on `vni` are answered: an operator-listed
    /// peer, or an underlay host this core has a mapping for on `vni`.
    pub fn is_known_peer(&self, vni: Vni, src: IpAddr) -> bool {
        self.peers.contains(&src) || self.underlays.contains_key(&(vni, src))
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    // ----- vnics -----------------------------------------------------------------------------

    /// Attach a vnic. Its (VNI, MAC) and (VNI, IP)s must be unique on this host.
    pub fn add_vnic(&mut self, cfg: VnicConfig) -> Result<VnicId, VnicError> {
        if !cfg.mac.is_unicast() {
            return Err(VnicError::BadMac(cfg.mac));
        }
        if !(576..=9000).contains(&cfg.mtu) {
            return Err(VnicError::BadMtu(cfg.mtu));
        }
        if let Some(&L2Dest::Local(other)) = self.l2.get(&(cfg.vni, cfg.mac)) {
            return Err(VnicError::DuplicateMac {
                vni: cfg.vni,
                mac: cfg.mac,
                other,
            });
        }
        let ips: Vec<IpAddr> = cfg
            .ipv4
            .iter()
            .map(|a| IpAddr::V4(*a))
            .chain(cfg.ipv6.iter().map(|a| IpAddr::V6(*a)))
            .collect();
        for ip in &ips {
            if let Some(&other) = self.local_ip.get(&(cfg.vni, *ip)) {
                return Err(VnicError::DuplicateIp {
                    vni: cfg.vni,
                    ip: *ip,
                    other,
                });
            }
        }
        let slot = self
            .vnics
            .iter()
            .position(Option::is_none)
            .unwrap_or_else(|| {
                self.vnics.push(None);
                self.vnics.len() - 1
            });
        let id = VnicId(slot as u32);
        if let Some(L2Dest::Remote(old)) = self.l2.insert((cfg.vni, cfg.mac), L2Dest::Local(id)) {
            unindex_underlay(&mut self.underlays, cfg.vni, old.underlay);
        }
        for ip in ips {
            self.local_ip.insert((cfg.vni, ip), id);
        }
        *self.vni_vnics.entry(cfg.vni).or_default() += 1;
        self.vnics[slot] = Some(Vnic {
            link_local: eui64_link_local(cfg.mac),
            cfg,
            counters: Counters::default(),
            rules: None,
            pending_dests: 0,
        });
        Ok(id)
    }

    /// Set (or with `None` remove) a vnic's firewall. The new rule set applies from the next
    /// frame; tracked flows are re-checked against it on their next packet and survive unless
    /// it denies them. The rule set must have been compiled for the vnic's VNI.
    pub fn set_firewall(
        &mut self,
        id: VnicId,
        rules: Option<Arc<VnicRuleSet>>,
    ) -> Result<(), VnicError> {
        let v = self
            .vnics
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(VnicError::NoSuchVnic(id))?;
        if let Some(r) = &rules {
            if r.vni() != v.cfg.vni.get() {
                return Err(VnicError::FirewallVni {
                    vnic: v.cfg.vni,
                    rules: r.vni(),
                });
            }
            if self.conntrack.is_none() {
                self.conntrack = Some(Tracker(Conntrack::new(self.cfg.conntrack)));
            }
        }
        v.rules = rules;
        Ok(())
    }

    /// Connection-tracking counters and the number of tracked flows (`None` until a filter
    /// was set).
    pub fn conntrack_stats(&self) -> Option<(ConntrackStats, usize)> {
        self.conntrack.as_ref().map(|t| (t.0.stats(), t.0.len()))
    }

    /// Checks a frame crossing vnic `id` in direction `dir` against its firewall.
    #[inline]
    fn filter(
        &mut self,
        id: VnicId,
        dir: Direction,
        frame: &[u8],
        now: Instant,
    ) -> Result<(), DropReason> {
        let Some(rules) = self
            .vnics
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .and_then(|v| v.rules.as_deref())
        else {
            return Ok(());
        };
        let pkt = match fwpacket::summarize(frame) {
            Ok(p) => p,
            Err(SummaryError::NotIp | SummaryError::NonFirstFragment) => return Ok(()),
            Err(SummaryError::Malformed(_)) => return Err(DropReason::Malformed),
        };
        if is_ndp(&pkt) {
            return Ok(());
        }
        let Some(ct) = self.conntrack.as_mut() else {
            return Ok(());
        };
        let t = now.saturating_duration_since(self.epoch);
        // A new flow is charged to the vnic whose rules admit it: its fair share of the table.
        let reason = match ct.0.classify_for(Owner(id.0), rules, dir, &pkt, t) {
            conntrack::Verdict::Allow { .. } => return Ok(()),
            conntrack::Verdict::Deny { rule: Some(_) } => DropReason::FirewallRule,
            conntrack::Verdict::Deny { rule: None } => DropReason::FirewallDefault,
            conntrack::Verdict::TableFull => DropReason::ConntrackFull,
        };
        if dir == Direction::Ingress {
            // The frame's own accounting counts the drop globally (and on the sending vnic for
            // local traffic); the vnic whose rules denied it counts it here.
            if let Some(Some(v)) = self.vnics.get_mut(id.0 as usize) {
                v.counters.drop(reason);
            }
        }
        Err(reason)
    }

    /// Detach a vnic; its held frames are dropped when their lookups complete.
    pub fn remove_vnic(&mut self, id: VnicId) -> Result<VnicConfig, VnicError> {
        let v = self
            .vnics
            .get_mut(id.0 as usize)
            .and_then(Option::take)
            .ok_or(VnicError::NoSuchVnic(id))?;
        self.l2.remove(&(v.cfg.vni, v.cfg.mac));
        for a in &v.cfg.ipv4 {
            self.local_ip.remove(&(v.cfg.vni, IpAddr::V4(*a)));
        }
        for a in &v.cfg.ipv6 {
            self.local_ip.remove(&(v.cfg.vni, IpAddr::V6(*a)));
        }
        if let Some(n) = self.vni_vnics.get_mut(&v.cfg.vni) {
            *n -= 1;
            if *n == 0 {
                self.vni_vnics.remove(&v.cfg.vni);
            }
        }
        // Its pending destinations go too (their frames would be dropped on release anyway),
        // so a vnic attached later in the same slot starts with its whole quota.
        let gone: Vec<LookupKey> = self
            .pending
            .iter()
            .filter(|(_, q)| q.owner == id)
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            if let Some(q) = self.pending.remove(&k) {
                self.release_pending(q, DropReason::UnknownVnic);
            }
        }
        // Its flows go with it, so a vnic attached later in the same slot starts with its
        // whole fair share of the connection table.
        if let Some(ct) = self.conntrack.as_mut() {
            ct.0.forget_owner(Owner(id.0));
        }
        Ok(v.cfg)
    }

    /// A vnic's configuration.
    pub fn vnic(&self, id: VnicId) -> Option<&VnicConfig> {
        self.vnic_ref(id).map(|v| &v.cfg)
    }

    /// All attached vnics.
    pub fn vnics(&self) -> impl Iterator<Item = (VnicId, &VnicConfig)> {
        self.vnics
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (VnicId(i as u32), &v.cfg)))
    }

    /// A vnic's counters.
    pub fn vnic_counters(&self, id: VnicId) -> Option<&Counters> {
        self.vnic_ref(id).map(|v| &v.counters)
    }

    /// Host-wide counters (every drop is counted here too, with or without a vnic).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    #[inline]
    fn vnic_ref(&self, id: VnicId) -> Option<&Vnic> {
        self.vnics.get(id.0 as usize).and_then(Option::as_ref)
    }

    // ----- cache administration (shootdowns, tests, benches) ---------------------------------

    /// Record that `mac` on `vni` lives behind `underlay` (as a VL2 answer would).
    pub fn insert_vl2(&mut self, vni: Vni, mac: Mac, underlay: SocketAddr, now: Instant) {
        let e = L2Dest::Remote(Vl2Entry {
            underlay,
            expires: now + self.cfg.cache_ttl,
        });
        match self.l2.entry((vni, mac)) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                if let L2Dest::Remote(old) = *o.get() {
                    o.insert(e);
                    unindex_underlay(&mut self.underlays, vni, old.underlay);
                    *self.underlays.entry((vni, underlay.ip())).or_default() += 1;
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(e);
                *self.underlays.entry((vni, underlay.ip())).or_default() += 1;
            }
        }
        self.negative.remove(&LookupKey::Vl2 { vni, mac });
    }

    /// Remove a remote (cached) VL2 entry; a local vnic's entry stays.
    fn forget_vl2(&mut self, vni: Vni, mac: Mac) -> bool {
        if let Some(L2Dest::Remote(e)) = self.l2.get(&(vni, mac)) {
            unindex_underlay(&mut self.underlays, vni, e.underlay);
            self.l2.remove(&(vni, mac));
            true
        } else {
            false
        }
    }

    /// Record that `ip` on `vni` is `mapping` (as a VL3 answer would; fills VL2 too).
    pub fn insert_vl3(&mut self, vni: Vni, ip: IpAddr, mapping: Vl3Mapping, now: Instant) {
        self.vl3.insert(
            (vni, ip),
            Vl3Entry {
                mac: mapping.mac,
                expires: now + self.cfg.cache_ttl,
            },
        );
        self.negative.remove(&LookupKey::Vl3 { vni, ip });
        self.insert_vl2(vni, mapping.mac, mapping.underlay, now);
    }

    /// Forget where `mac` on `vni` lives (a VL2 shootdown). Returns whether it was cached.
    pub fn invalidate_vl2(&mut self, vni: Vni, mac: Mac) -> bool {
        self.negative.remove(&LookupKey::Vl2 { vni, mac });
        self.forget_vl2(vni, mac)
    }

    /// Forget who has `ip` on `vni` (a VL3 shootdown). Returns whether it was cached.
    pub fn invalidate_vl3(&mut self, vni: Vni, ip: IpAddr) -> bool {
        self.negative.remove(&LookupKey::Vl3 { vni, ip });
        self.vl3.remove(&(vni, ip)).is_some()
    }

    /// Cached underlay address for `mac` on `vni`, fresh or stale.
    pub fn cached_vl2(&self, vni: Vni, mac: Mac) -> Option<SocketAddr> {
        match self.l2.get(&(vni, mac)) {
            Some(L2Dest::Remote(e)) => Some(e.underlay),
            _ => None,
        }
    }

    /// Cached MAC for `ip` on `vni`, fresh or stale.
    pub fn cached_vl3(&self, vni: Vni, ip: IpAddr) -> Option<Mac> {
        self.vl3.get(&(vni, ip)).map(|e| e.mac)
    }

    /// Number of (VL2, VL3, negative) cache entries.
    pub fn cache_sizes(&self) -> (usize, usize, usize) {
        let remote = self
            .l2
            .values()
            .filter(|d| matches!(d, L2Dest::Remote(_)))
            .count();
        (remote, self.vl3.len(), self.negative.len())
    }

    /// Frames and bytes currently held pending lookups.
    pub fn held(&self) -> (usize, usize) {
        self.pending
            .values()
            .fold((0, 0), |(f, b), q| (f + q.frames.len(), b + q.bytes))
    }

    // ----- outputs ---------------------------------------------------------------------------

    /// The next lookup for the resolver to perform.
    pub fn poll_lookup(&mut self) -> Option<LookupKey> {
        self.lookups.pop_front()
    }

    /// The next frame released by a lookup answer.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    // ----- from a vnic -----------------------------------------------------------------------

    /// A frame `vnic` sent. See [`Verdict`] for what the buffer holds afterwards.
    pub fn from_vnic(&mut self, vnic: VnicId, buf: &mut FrameBuf<'_>, now: Instant) -> Verdict {
        let Some(v) = self.vnics.get_mut(vnic.0 as usize).and_then(Option::as_mut) else {
            self.counters.drop(DropReason::UnknownVnic);
            return Verdict::Drop(DropReason::UnknownVnic);
        };
        v.counters.rx_frames += 1;
        v.counters.rx_bytes += buf.len() as u64;
        let verdict = self.process_vnic(vnic, buf, now);
        self.account(vnic, verdict);
        verdict
    }

    fn account(&mut self, vnic: VnicId, verdict: Verdict) {
        let c = &mut self.counters;
        let vc = self.vnics[vnic.0 as usize]
            .as_mut()
            .map(|v| &mut v.counters);
        let bump =
            |f: fn(&mut Counters) -> &mut u64, c: &mut Counters, vc: Option<&mut Counters>| {
                *f(c) += 1;
                if let Some(vc) = vc {
                    *f(vc) += 1;
                }
            };
        match verdict {
            Verdict::ToUnderlay { .. } => bump(|c| &mut c.to_underlay, c, vc),
            Verdict::ToVnic(_) => bump(|c| &mut c.to_vnic, c, vc),
            Verdict::Held => bump(|c| &mut c.held, c, vc),
            Verdict::Reply(_) => {} // counted as arp_replied / ndp_replied where synthesised
            Verdict::Drop(r) => {
                c.drop(r);
                if let Some(vc) = vc {
                    vc.drop(r);
                }
            }
        }
    }

    fn process_vnic(&mut self, id: VnicId, buf: &mut FrameBuf<'_>, now: Instant) -> Verdict {
        let v = self.vnics[id.0 as usize]
            .as_ref()
            .expect("checked by caller");
        let f = buf.bytes();
        if f.len() < ethernet::HEADER_LEN {
            return Verdict::Drop(DropReason::Malformed);
        }
        if f[6..12] != v.cfg.mac.0 {
            return Verdict::Drop(DropReason::SpoofedSrcMac);
        }
        if f.len() - ethernet::HEADER_LEN > usize::from(v.cfg.mtu) {
            return Verdict::Drop(DropReason::FrameTooBig);
        }
        let dst = Mac::from_bytes(&f[0..6]);
        match EtherType(wire::be16(f, 12)) {
            EtherType::IPV4 => {
                let Ok(ip) = wire::Ipv4Packet::new_checked(&f[ethernet::HEADER_LEN..]) else {
                    return Verdict::Drop(DropReason::Malformed);
                };
                if !v.owns_v4(ip.src()) {
                    return Verdict::Drop(DropReason::SpoofedSrcIp);
                }
                if let Err(r) = self.filter(id, Direction::Egress, buf.bytes(), now) {
                    return Verdict::Drop(r);
                }
                self.forward(id, dst, buf, now)
            }
            EtherType::ARP => self.vnic_arp(id, buf, now),
            EtherType::IPV6 => {
                let Ok(ip) = wire::Ipv6Packet::new_checked(&f[ethernet::HEADER_LEN..]) else {
                    return Verdict::Drop(DropReason::Malformed);
                };
                let payload = ip.payload();
                if ip.next_header() == ipv6::NEXT_HEADER_ICMPV6
                    && matches!(payload.first(), Some(&ndp::TYPE_NS) | Some(&ndp::TYPE_NA))
                {
                    return self.vnic_ndp(id, buf, now);
                }
                if dst.is_multicast() {
                    // MLD reports and router solicitations (often from `::` during DAD):
                    // never flooded, and not worth calling spoofed.
                    return Verdict::Drop(DropReason::Multicast);
                }
                if !v.owns_v6(ip.src()) {
                    return Verdict::Drop(DropReason::SpoofedSrcIp);
                }
                if let Err(r) = self.filter(id, Direction::Egress, buf.bytes(), now) {
                    return Verdict::Drop(r);
                }
                self.forward(id, dst, buf, now)
            }
            EtherType::VLAN => Verdict::Drop(DropReason::VlanTagged),
            _ => Verdict::Drop(DropReason::UnsupportedEtherType),
        }
    }

    /// Unicast forwarding of a validated frame from vnic `id` on its VNI.
    #[inline]
    fn forward(&mut self, id: VnicId, dst: Mac, buf: &mut FrameBuf<'_>, now: Instant) -> Verdict {
        let v = self.vnics[id.0 as usize]
            .as_ref()
            .expect("checked by caller");
        let vni = v.cfg.vni;
        if dst.is_multicast() {
            return Verdict::Drop(if dst.is_broadcast() {
                DropReason::Broadcast
            } else {
                DropReason::Multicast
            });
        }
        if dst == v.cfg.mac {
            return Verdict::Drop(DropReason::Hairpin);
        }
        match self.l2.get(&(vni, dst)) {
            Some(&L2Dest::Local(local)) => {
                let mtu = self.vnic_ref(local).map_or(0, |l| l.cfg.mtu);
                if buf.len() - ethernet::HEADER_LEN > usize::from(mtu) {
                    return Verdict::Drop(DropReason::FrameTooBig);
                }
                if let Err(r) = self.filter(local, Direction::Ingress, buf.bytes(), now) {
                    return Verdict::Drop(r);
                }
                Verdict::ToVnic(local)
            }
            Some(L2Dest::Remote(e)) => {
                let (underlay, stale) = (e.underlay, e.expires <= now);
                if stale {
                    self.request(LookupKey::Vl2 { vni, mac: dst }, now);
                }
                encapsulate(buf, vni, underlay)
            }
            None => {
                let key = LookupKey::Vl2 { vni, mac: dst };
                if self.is_negative(&key, now) {
                    return Verdict::Drop(DropReason::NegativeCached);
                }
                self.hold(key, id, buf.bytes(), now)
            }
        }
    }

    fn vnic_arp(&mut self, id: VnicId, buf: &mut FrameBuf<'_>, now: Instant) -> Verdict {
        let v = self.vnics[id.0 as usize]
            .as_ref()
            .expect("checked by caller");
        let (vni, my_mac) = (v.cfg.vni, v.cfg.mac);
        let Ok(p) = arp::Packet::new_checked(&buf.bytes()[ethernet::HEADER_LEN..]) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let Ok(req) = arp::Repr::parse(&p) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        if req.sha != my_mac {
            return Verdict::Drop(DropReason::SpoofedSrcMac);
        }
        if req.op != arp::Operation::Request || req.spa.is_unspecified() || req.spa == req.tpa {
            // Replies, probes and gratuitous announcements: nobody needs them, we know every
            // binding already.
            return Verdict::Drop(DropReason::ArpNotAnswered);
        }
        if !v.owns_v4(req.spa) {
            return Verdict::Drop(DropReason::SpoofedSrcIp);
        }
        if v.owns_v4(req.tpa) {
            return Verdict::Drop(DropReason::ArpNotAnswered);
        }
        let target = IpAddr::V4(req.tpa);
        let mac = match self.resolve_l3(vni, target, now) {
            Resolved::Mac(m) => m,
            Resolved::Negative => return Verdict::Drop(DropReason::NegativeCached),
            Resolved::Miss => {
                return self.hold(LookupKey::Vl3 { vni, ip: target }, id, buf.bytes(), now)
            }
        };
        if !proxy::write_arp_reply(buf, mac, req.tpa, my_mac, req.spa) {
            return Verdict::Drop(DropReason::Malformed);
        }
        self.bump_replied(id, false);
        Verdict::Reply(id)
    }

    fn vnic_ndp(&mut self, id: VnicId, buf: &mut FrameBuf<'_>, now: Instant) -> Verdict {
        let v = self.vnics[id.0 as usize]
            .as_ref()
            .expect("checked by caller");
        let (vni, my_mac) = (v.cfg.vni, v.cfg.mac);
        let f = buf.bytes();
        let ip = wire::Ipv6Packet::new_unchecked(&f[ethernet::HEADER_LEN..]);
        let (src, dst) = (ip.src(), ip.dst());
        let Ok(msg) = ndp::Packet::new_checked(ip.payload()) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let Ok(repr) = ndp::Repr::parse(&msg, src, dst) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        if ip.hop_limit() != 255 {
            // RFC 4861 7.1.1: not from an on-link neighbour.
            return Verdict::Drop(DropReason::Malformed);
        }
        let ndp::Repr::Solicit { target, source_lla } = repr else {
            return Verdict::Drop(DropReason::NdpNotAnswered);
        };
        if src.is_unspecified() {
            // Duplicate address detection: silence means "address free", which is right.
            return Verdict::Drop(DropReason::NdpNotAnswered);
        }
        if !v.owns_v6(src) {
            return Verdict::Drop(DropReason::SpoofedSrcIp);
        }
        if source_lla.is_some_and(|m| m != my_mac) {
            return Verdict::Drop(DropReason::SpoofedSrcMac);
        }
        if v.owns_v6(target) {
            return Verdict::Drop(DropReason::NdpNotAnswered);
        }
        let t = IpAddr::V6(target);
        let mac = match self.resolve_l3(vni, t, now) {
            Resolved::Mac(m) => m,
            Resolved::Negative => return Verdict::Drop(DropReason::NegativeCached),
            Resolved::Miss => {
                return self.hold(LookupKey::Vl3 { vni, ip: t }, id, buf.bytes(), now)
            }
        };
        if !proxy::write_neighbor_advert(buf, mac, target, my_mac, src) {
            return Verdict::Drop(DropReason::Malformed);
        }
        self.bump_replied(id, true);
        Verdict::Reply(id)
    }

    fn bump_replied(&mut self, id: VnicId, ndp: bool) {
        let v = &mut self.vnics[id.0 as usize]
            .as_mut()
            .expect("checked")
            .counters;
        if ndp {
            v.ndp_replied += 1;
            self.counters.ndp_replied += 1;
        } else {
            v.arp_replied += 1;
            self.counters.arp_replied += 1;
        }
    }

    fn resolve_l3(&mut self, vni: Vni, ip: IpAddr, now: Instant) -> Resolved {
        if let Some(&local) = self.local_ip.get(&(vni, ip)) {
            if let Some(l) = self.vnic_ref(local) {
                return Resolved::Mac(l.cfg.mac);
            }
        }
        let key = LookupKey::Vl3 { vni, ip };
        if let Some(e) = self.vl3.get(&(vni, ip)) {
            let (mac, stale) = (e.mac, e.expires <= now);
            if stale {
                self.request(key, now);
            }
            return Resolved::Mac(mac);
        }
        if self.is_negative(&key, now) {
            Resolved::Negative
        } else {
            Resolved::Miss
        }
    }

    fn is_negative(&mut self, key: &LookupKey, now: Instant) -> bool {
        match self.negative.get(key) {
            Some(&until) if until > now => true,
            Some(_) => {
                self.negative.remove(key);
                false
            }
            None => false,
        }
    }

    /// Ask the resolver for `key` now (e.g. to re-resolve after a shootdown), unless a lookup
    /// for it is already in flight.
    pub fn resolve(&mut self, key: LookupKey, now: Instant) {
        self.request(key, now)
    }

    /// Ask the resolver for `key` unless a lookup for it is already in flight.
    fn request(&mut self, key: LookupKey, now: Instant) {
        if self.in_flight.contains_key(&key) {
            return;
        }
        self.in_flight.insert(key, now);
        match key {
            LookupKey::Vl2 { .. } => self.counters.vl2_lookups += 1,
            LookupKey::Vl3 { .. } => self.counters.vl3_lookups += 1,
        }
        self.lookups.push_back(key);
    }

    fn hold(&mut self, key: LookupKey, vnic: VnicId, frame: &[u8], now: Instant) -> Verdict {
        if !self.pending.contains_key(&key) {
            let Some(mine) = self.vnic_ref(vnic).map(|v| v.pending_dests) else {
                return Verdict::Drop(DropReason::UnknownVnic);
            };
            if mine >= self.cfg.pending_dests_per_vnic {
                return Verdict::Drop(DropReason::PendingQuota);
            }
            if self.pending.len() >= self.cfg.pending_max_dests && !self.evict_pending(vnic) {
                return Verdict::Drop(DropReason::PendingTableFull);
            }
            self.pending.insert(
                key,
                PendingQueue {
                    owner: vnic,
                    frames: VecDeque::new(),
                    bytes: 0,
                },
            );
            if let Some(v) = self.vnics[vnic.0 as usize].as_mut() {
                v.pending_dests += 1;
            }
        }
        let cap = self.cfg.pending_bytes_per_dest;
        let q = self.pending.get_mut(&key).expect("inserted above");
        q.frames.push_back(Held {
            vnic,
            at: now,
            frame: frame.to_vec(),
        });
        q.bytes += frame.len();
        while q.bytes > cap && q.frames.len() > 1 {
            // The sender's own oldest frame goes first: another vnic waiting on the same
            // destination does not lose its frames to this one's burst.
            let last = q.frames.len() - 1;
            let at = q.frames.iter().take(last).position(|h| h.vnic == vnic);
            let old = q
                .frames
                .remove(at.unwrap_or(0))
                .expect("index within the queue");
            q.bytes -= old.frame.len();
            Self::count_drop(
                &mut self.counters,
                &mut self.vnics,
                old.vnic,
                DropReason::PendingQueueOverflow,
            );
        }
        self.request(key, now);
        Verdict::Held
    }

    /// The pending table is full and `for_vnic` (within its quota) needs a destination: take
    /// the oldest destination of the vnic holding the most, if it holds more than `for_vnic`.
    /// Its frames are dropped as [`DropReason::PendingEvicted`]. Walks the vnics and the
    /// pending table: reached only when the whole table is full.
    fn evict_pending(&mut self, for_vnic: VnicId) -> bool {
        let mine = self.vnic_ref(for_vnic).map_or(0, |v| v.pending_dests);
        let Some((top, most)) = self
            .vnics
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (VnicId(i as u32), v.pending_dests)))
            .max_by_key(|&(_, n)| n)
        else {
            return false;
        };
        if most <= mine {
            return false;
        }
        let Some(key) = self
            .pending
            .iter()
            .filter(|(_, q)| q.owner == top)
            .min_by_key(|(_, q)| q.frames.front().map(|h| h.at))
            .map(|(k, _)| *k)
        else {
            return false;
        };
        let q = self.pending.remove(&key).expect("found above");
        self.release_pending(q, DropReason::PendingEvicted);
        true
    }

    /// A pending destination is gone: its owner's quota gets it back; its frames (if any are
    /// left) are dropped for `reason`.
    fn release_pending(&mut self, q: PendingQueue, reason: DropReason) {
        Self::uncount_pending(&mut self.vnics, q.owner);
        for h in q.frames {
            Self::count_drop(&mut self.counters, &mut self.vnics, h.vnic, reason);
        }
    }

    fn uncount_pending(vnics: &mut [Option<Vnic>], owner: VnicId) {
        if let Some(Some(v)) = vnics.get_mut(owner.0 as usize) {
            v.pending_dests = v.pending_dests.saturating_sub(1);
        }
    }

    fn count_drop(global: &mut Counters, vnics: &mut [Option<Vnic>], vnic: VnicId, r: DropReason) {
        global.drop(r);
        if let Some(Some(v)) = vnics.get_mut(vnic.0 as usize) {
            v.counters.drop(r);
        }
    }

    // ----- from the underlay -----------------------------------------------------------------

    /// A UDP datagram from the underlay host `src`. On [`Verdict::ToVnic`] the buffer holds the
    /// inner frame (the VXLAN header was stripped by moving the start; nothing copied). On
    /// [`Verdict::ToUnderlay`] the buffer holds an ARP answer for a remote host that asked
    /// about a local vnic (interop with peers that flood ARP, like Linux vxlan): only a known
    /// peer is answered (see [`Core::is_known_peer`]), within per-source and overall rate
    /// limits; others are dropped as [`DropReason::UnderlayArpUnknownPeer`] or
    /// [`DropReason::UnderlayArpRateLimited`].
    pub fn from_underlay(
        &mut self,
        src: SocketAddr,
        buf: &mut FrameBuf<'_>,
        now: Instant,
    ) -> Verdict {
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += buf.len() as u64;
        let verdict = self.process_underlay(src, buf, now);
        match verdict {
            Verdict::ToVnic(id) => {
                self.counters.to_vnic += 1;
                if let Some(v) = self.vnics[id.0 as usize].as_mut() {
                    v.counters.to_vnic += 1;
                }
            }
            Verdict::ToUnderlay { .. } => self.counters.arp_replied += 1,
            Verdict::Drop(r) => self.counters.drop(r),
            Verdict::Reply(_) | Verdict::Held => {}
        }
        verdict
    }

    fn process_underlay(
        &mut self,
        src: SocketAddr,
        buf: &mut FrameBuf<'_>,
        now: Instant,
    ) -> Verdict {
        // Before anything else, ARP included: a non-member gets no answer at all.
        if let Some(m) = &self.members {
            if !m.contains(&src.ip().to_canonical()) {
                return Verdict::Drop(DropReason::NotMember);
            }
        }
        let Ok(p) = vxlan::Packet::new_checked(buf.bytes()) else {
            return Verdict::Drop(DropReason::VxlanMalformed);
        };
        if p.reserved_bits_set() {
            self.counters.vxlan_reserved_bits += 1;
        }
        let vni = p.vni();
        buf.strip(vxlan::HEADER_LEN);
        let f = buf.bytes();
        if f.len() < ethernet::HEADER_LEN {
            return Verdict::Drop(DropReason::Malformed);
        }
        let dst = Mac::from_bytes(&f[0..6]);
        let ethertype = EtherType(wire::be16(f, 12));
        if ethertype == EtherType::VLAN {
            return Verdict::Drop(DropReason::VlanTagged);
        }
        if dst.is_multicast() {
            if ethertype == EtherType::ARP {
                if let Some(v) = self.underlay_arp(vni, src, buf, now) {
                    return v;
                }
            }
            return Verdict::Drop(if dst.is_broadcast() {
                DropReason::Broadcast
            } else {
                DropReason::Multicast
            });
        }
        match self.l2.get(&(vni, dst)) {
            Some(&L2Dest::Local(id)) => {
                let mtu = self.vnic_ref(id).map_or(0, |v| v.cfg.mtu);
                if f.len() - ethernet::HEADER_LEN > usize::from(mtu) {
                    return Verdict::Drop(DropReason::FrameTooBig);
                }
                if let Err(r) = self.filter(id, Direction::Ingress, buf.bytes(), now) {
                    return Verdict::Drop(r);
                }
                Verdict::ToVnic(id)
            }
            _ if self.vni_vnics.contains_key(&vni) => Verdict::Drop(DropReason::NoVnicForMac),
            _ => Verdict::Drop(DropReason::UnknownVni),
        }
    }

    /// A broadcast ARP request from a remote host: answer it if it asks for a local vnic's
    /// address on that VNI (sent back encapsulated to the asking host), but only to a known
    /// peer and within the rate limits: the outer source of a datagram is not authenticated,
    /// and answering every spoofed request would make this host reflect traffic at whatever
    /// address the sender chose. `None`: not a request for a local address (the caller drops
    /// it as broadcast).
    ///
    /// A request from an unknown source starts (rate-limited) a VL3 lookup of its sender's
    /// IP: once the mapping service says that sender lives at that underlay address, the
    /// source is known and its next request (a kernel retries every second) is answered.
    fn underlay_arp(
        &mut self,
        vni: Vni,
        src: SocketAddr,
        buf: &mut FrameBuf<'_>,
        now: Instant,
    ) -> Option<Verdict> {
        let p = arp::Packet::new_checked(&buf.bytes()[ethernet::HEADER_LEN..]).ok()?;
        let req = arp::Repr::parse(&p).ok()?;
        if req.op != arp::Operation::Request || req.spa == req.tpa || !req.sha.is_unicast() {
            return None;
        }
        let id = *self.local_ip.get(&(vni, IpAddr::V4(req.tpa)))?;
        let mac = self.vnic_ref(id)?.cfg.mac;
        let now_ns =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        if !self.is_known_peer(vni, src.ip()) {
            let sender = IpAddr::V4(req.spa);
            let key = LookupKey::Vl3 { vni, ip: sender };
            if !req.spa.is_unspecified()
                && !self.vl3.contains_key(&(vni, sender))
                && !self.local_ip.contains_key(&(vni, sender))
                && !self.in_flight.contains_key(&key)
                && !self.is_negative(&key, now)
                && self.arp_learn.take(self.cfg.underlay_arp_learn, now_ns)
            {
                self.request(key, now);
            }
            return Some(Verdict::Drop(DropReason::UnderlayArpUnknownPeer));
        }
        if !self
            .arp_per_peer
            .take(src.ip(), self.cfg.underlay_arp_per_peer, now_ns)
            || !self.arp_total.take(self.cfg.underlay_arp_total, now_ns)
        {
            return Some(Verdict::Drop(DropReason::UnderlayArpRateLimited));
        }
        if !proxy::write_arp_reply(buf, mac, req.tpa, req.sha, req.spa) {
            return None;
        }
        Some(encapsulate(buf, vni, src))
    }

    // ----- answers and time ------------------------------------------------------------------

    /// A resolver's answer. Fills the caches and releases (or drops) the frames waiting on it;
    /// released frames come out of [`Core::poll_output`].
    pub fn handle_answer(&mut self, answer: LookupAnswer, now: Instant) {
        let key = answer.key();
        self.in_flight.remove(&key);
        let outcome = match answer {
            LookupAnswer::Vl2 { vni, mac, result } => match result {
                Ok(Some(underlay)) => {
                    self.insert_vl2(vni, mac, underlay, now);
                    None
                }
                Ok(None) => {
                    self.forget_vl2(vni, mac);
                    Some(DropReason::LookupNotFound)
                }
                Err(_) => Some(DropReason::LookupFailed),
            },
            LookupAnswer::Vl3 { vni, ip, result } => match result {
                Ok(Some(m)) => {
                    self.insert_vl3(vni, ip, m, now);
                    None
                }
                Ok(None) => {
                    self.vl3.remove(&(vni, ip));
                    Some(DropReason::LookupNotFound)
                }
                Err(_) => Some(DropReason::LookupFailed),
            },
        };
        if let Some(reason) = outcome {
            // Remember the miss briefly (also for failures: do not hammer a mapping service
            // that is down), unless a stale entry is still serving traffic.
            let cached = match key {
                LookupKey::Vl2 { vni, mac } => self.cached_vl2(vni, mac).is_some(),
                LookupKey::Vl3 { vni, ip } => self.vl3.contains_key(&(vni, ip)),
            };
            if !cached {
                self.negative.insert(key, now + self.cfg.negative_ttl);
            }
            if let Some(q) = self.pending.remove(&key) {
                self.release_pending(q, reason);
            }
            return;
        }
        let Some(q) = self.pending.remove(&key) else {
            return;
        };
        Self::uncount_pending(&mut self.vnics, q.owner);
        let mut scratch = std::mem::take(&mut self.scratch);
        for h in q.frames {
            if self.vnic_ref(h.vnic).is_none() {
                self.counters.drop(DropReason::UnknownVnic);
                continue;
            }
            let Some(mut buf) = FrameBuf::new(&mut scratch, HEADROOM, h.frame.len()) else {
                Self::count_drop(
                    &mut self.counters,
                    &mut self.vnics,
                    h.vnic,
                    DropReason::FrameTooBig,
                );
                continue;
            };
            buf.bytes_mut().copy_from_slice(&h.frame);
            let verdict = self.process_vnic(h.vnic, &mut buf, now);
            if verdict != Verdict::Held {
                self.counters.released += 1;
                if let Some(v) = self.vnics[h.vnic.0 as usize].as_mut() {
                    v.counters.released += 1;
                }
            }
            match verdict {
                Verdict::ToUnderlay { dst, flow_hash } => {
                    self.counters.to_underlay += 1;
                    if let Some(v) = self.vnics[h.vnic.0 as usize].as_mut() {
                        v.counters.to_underlay += 1;
                    }
                    self.outputs.push_back(Output::Underlay {
                        dst,
                        flow_hash,
                        datagram: buf.bytes().to_vec(),
                    })
                }
                Verdict::ToVnic(vnic) | Verdict::Reply(vnic) => {
                    if matches!(verdict, Verdict::ToVnic(_)) {
                        self.counters.to_vnic += 1;
                    }
                    self.outputs.push_back(Output::Vnic {
                        vnic,
                        frame: buf.bytes().to_vec(),
                    })
                }
                Verdict::Held => {}
                Verdict::Drop(r) => {
                    Self::count_drop(&mut self.counters, &mut self.vnics, h.vnic, r)
                }
            }
        }
        self.scratch = scratch;
    }

    /// Let time pass: held frames older than the lookup timeout are dropped (and their lookups
    /// forgotten so they can be asked again), expired negative entries and long-stale cache
    /// entries are removed. Call it every 100 ms or so.
    pub fn handle_timeout(&mut self, now: Instant) {
        let timeout = self.cfg.lookup_timeout;
        let (counters, vnics) = (&mut self.counters, &mut self.vnics);
        self.pending.retain(|_, q| {
            while q
                .frames
                .front()
                .is_some_and(|h| now.saturating_duration_since(h.at) >= timeout)
            {
                let h = q.frames.pop_front().expect("front exists");
                q.bytes -= h.frame.len();
                Self::count_drop(counters, vnics, h.vnic, DropReason::LookupTimeout);
            }
            if q.frames.is_empty() {
                Self::uncount_pending(vnics, q.owner);
                return false;
            }
            true
        });
        self.in_flight
            .retain(|_, sent| now.saturating_duration_since(*sent) < timeout);
        self.negative.retain(|_, until| *until > now);
        if let Some(ct) = self.conntrack.as_mut() {
            ct.0.sweep(now.saturating_duration_since(self.epoch), 4096);
        }
        let sweep_every = self.cfg.stale_grace.max(Duration::from_secs(1));
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= sweep_every)
        {
            self.last_sweep = Some(now);
            let grace = self.cfg.stale_grace;
            let underlays = &mut self.underlays;
            self.l2.retain(|&(vni, _), d| match d {
                L2Dest::Local(_) => true,
                L2Dest::Remote(e) => {
                    let keep = e.expires + grace > now;
                    if !keep {
                        unindex_underlay(underlays, vni, e.underlay);
                    }
                    keep
                }
            });
            self.vl3.retain(|_, e| e.expires + grace > now);
        }
    }
}

/// One remote VL2 entry for `underlay` on `vni` is gone.
fn unindex_underlay(underlays: &mut FxHashMap<(Vni, IpAddr), u32>, vni: Vni, underlay: SocketAddr) {
    let k = (vni, underlay.ip());
    if let Some(n) = underlays.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            underlays.remove(&k);
        }
    }
}

/// Neighbour discovery (router/neighbour solicitation and advertisement, redirect) is link
/// machinery, not traffic: never filtered.
#[inline]
fn is_ndp(p: &conntrack::PacketSummary) -> bool {
    p.proto == ipv6::NEXT_HEADER_ICMPV6 && p.icmp.is_some_and(|i| (133..=137).contains(&i.ty))
}

enum Resolved {
    Mac(Mac),
    Negative,
    Miss,
}

/// Prepend the VXLAN header in the headroom and compute the inner flow hash.
#[inline]
fn encapsulate(buf: &mut FrameBuf<'_>, vni: Vni, dst: SocketAddr) -> Verdict {
    let flow_hash = flow_hash(buf.bytes());
    match buf.prepend(vxlan::HEADER_LEN) {
        Some(h) => {
            vxlan::write_header(h, vni);
            Verdict::ToUnderlay { dst, flow_hash }
        }
        None => Verdict::Drop(DropReason::Malformed),
    }
}

/// A cheap hash of the inner flow, for the outer UDP source port (RFC 7348 section 5) and so
/// for which underlay socket a frame leaves from: MACs, plus for IPv4 and IPv6 the addresses
/// and (for TCP/UDP) the ports. Every segment of a flow hashes alike, so a flow keeps one outer
/// source port and its order. This is the only flow hash: the dataplane takes it from the
/// verdict.
#[inline]
pub fn flow_hash(f: &[u8]) -> u32 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    #[inline(always)]
    fn mix(h: u64, v: u64) -> u64 {
        (h.rotate_left(5) ^ v).wrapping_mul(K)
    }
    #[inline(always)]
    fn word(f: &[u8], at: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&f[at..at + 8]);
        u64::from_le_bytes(w)
    }
    #[inline(always)]
    fn ports(f: &[u8], at: usize) -> u64 {
        u64::from(u32::from_le_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]]))
    }
    if f.len() < 16 {
        return 0;
    }
    // dst+src MAC (12 bytes) as two overlapping words.
    let mut h = mix(mix(0, word(f, 0)), word(f, 4));
    match (f[12], f[13]) {
        (0x08, 0x00) if f.len() >= 42 => {
            h = mix(h, word(f, 26)); // IPv4 src + dst
            let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
            if matches!(f[23], 6 | 17) && f.len() >= l4 + 4 {
                h = mix(h, ports(f, l4));
            }
        }
        (0x86, 0xdd) if f.len() >= 54 => {
            for at in [22, 30, 38, 46] {
                h = mix(h, word(f, at)); // IPv6 src + dst
            }
            if matches!(f[20], 6 | 17) && f.len() >= 58 {
                h = mix(h, ports(f, 54));
            }
        }
        _ => {}
    }
    (h >> 32) as u32 ^ h as u32
}

/// The EUI-64 IPv6 link-local address Linux derives from a MAC by default.
pub fn eui64_link_local(mac: Mac) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

#[cfg(test)]
mod tests;
