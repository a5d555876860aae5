//! Resolvers answer the core's lookups.
//!
//! [`StaticResolver`] answers from a table, after an optional delay: it serves the in-process
//! hosts, the demo and the benches. The dataplane daemon answers with the Portolan SVP client.

use crate::core::{LookupAnswer, LookupKey, Vl3Mapping};
use crate::wire::{Mac, Vni};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// A table of mappings answering lookups after `delay` (to exercise the held-frame path).
#[derive(Debug, Default)]
pub struct StaticResolver {
    vl2: FxHashMap<(Vni, Mac), SocketAddr>,
    vl3: FxHashMap<(Vni, IpAddr), Vl3Mapping>,
    delay: Duration,
    queue: VecDeque<(Instant, LookupKey)>,
    /// Lookups answered so far.
    pub answered: u64,
}

impl StaticResolver {
    /// An empty table answering after `delay`.
    pub fn new(delay: Duration) -> Self {
        StaticResolver {
            delay,
            ..Default::default()
        }
    }

    /// Publish that `mac` (with `ips`) on `vni` lives behind `underlay`.
    pub fn insert(&mut self, vni: Vni, mac: Mac, ips: &[IpAddr], underlay: SocketAddr) {
        self.vl2.insert((vni, mac), underlay);
        for ip in ips {
            self.vl3.insert((vni, *ip), Vl3Mapping { mac, underlay });
        }
    }

    /// Forget `mac` on `vni` and its IPs.
    pub fn remove(&mut self, vni: Vni, mac: Mac) {
        self.vl2.remove(&(vni, mac));
        self.vl3.retain(|(v, _), m| !(*v == vni && m.mac == mac));
    }

    /// Accept a lookup from the core.
    pub fn submit(&mut self, key: LookupKey, now: Instant) {
        self.queue.push_back((now + self.delay, key));
    }

    /// The next answer that is due at `now`.
    pub fn poll_answer(&mut self, now: Instant) -> Option<LookupAnswer> {
        if self.queue.front().is_none_or(|(due, _)| *due > now) {
            return None;
        }
        let (_, key) = self.queue.pop_front()?;
        self.answered += 1;
        Some(self.answer(key))
    }

    /// The answer for `key` right now.
    pub fn answer(&self, key: LookupKey) -> LookupAnswer {
        match key {
            LookupKey::Vl2 { vni, mac } => LookupAnswer::Vl2 {
                vni,
                mac,
                result: Ok(self.vl2.get(&(vni, mac)).copied()),
            },
            LookupKey::Vl3 { vni, ip } => LookupAnswer::Vl3 {
                vni,
                ip,
                result: Ok(self.vl3.get(&(vni, ip)).copied()),
            },
        }
    }

    /// Lookups accepted but not yet answered.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}
