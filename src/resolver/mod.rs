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
/// `T` tags each lookup with who asked (a host id), so the answer goes back to that asker.
#[derive(Debug)]
pub struct StaticResolver<T = ()> {
    vl2: FxHashMap<(Vni, Mac), SocketAddr>,
    vl3: FxHashMap<(Vni, IpAddr), Vl3Mapping>,
    delay: Duration,
    queue: VecDeque<(Instant, T, LookupKey)>,
    /// Lookups answered so far.
    pub answered: u64,
}

impl<T> StaticResolver<T> {
    /// An empty table answering after `delay`.
    pub fn new(delay: Duration) -> Self {
        StaticResolver {
            vl2: FxHashMap::default(),
            vl3: FxHashMap::default(),
            delay,
            queue: VecDeque::new(),
            answered: 0,
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

    /// Accept a lookup from the asker `tag`.
    pub fn submit(&mut self, tag: T, key: LookupKey, now: Instant) {
        self.queue.push_back((now + self.delay, tag, key));
    }

    /// The next answer that is due at `now`, with the tag of whoever asked.
    pub fn poll_answer(&mut self, now: Instant) -> Option<(T, LookupAnswer)> {
        if self.queue.front().is_none_or(|(due, _, _)| *due > now) {
            return None;
        }
        let (_, tag, key) = self.queue.pop_front()?;
        self.answered += 1;
        Some((tag, self.answer(key)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_after_delay_to_the_asker() {
        let mut r = StaticResolver::new(Duration::from_millis(5));
        let vni = Vni::new(7).unwrap();
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let under: SocketAddr = "127.0.0.2:4789".parse().unwrap();
        r.insert(vni, mac, &[ip], under);
        let t0 = Instant::now();
        r.submit(3usize, LookupKey::Vl3 { vni, ip }, t0);
        assert!(r.poll_answer(t0).is_none(), "not before the delay");
        let (tag, ans) = r.poll_answer(t0 + Duration::from_millis(5)).unwrap();
        assert_eq!(tag, 3);
        assert_eq!(
            ans,
            LookupAnswer::Vl3 {
                vni,
                ip,
                result: Ok(Some(Vl3Mapping {
                    mac,
                    underlay: under
                }))
            }
        );
        r.remove(vni, mac);
        assert_eq!(
            r.answer(LookupKey::Vl2 { vni, mac }),
            LookupAnswer::Vl2 {
                vni,
                mac,
                result: Ok(None)
            }
        );
        let other = Vni::new(8).unwrap();
        assert_eq!(
            r.answer(LookupKey::Vl3 { vni: other, ip }),
            LookupAnswer::Vl3 {
                vni: other,
                ip,
                result: Ok(None)
            }
        );
    }
}
