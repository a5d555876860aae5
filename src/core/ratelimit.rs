//! Token buckets for answers the core sends to the underlay (ARP over VXLAN): fixed size, no
//! allocation, time passed in (nanoseconds on the core's clock).

use std::net::IpAddr;

/// A rate: `per_sec` events a second on average, bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained events per second (0: none).
    pub per_sec: u32,
    /// Events allowed back to back after a quiet period (at least 1 when `per_sec` > 0).
    pub burst: u32,
}

impl RateLimit {
    /// Nanoseconds of credit one event costs, and the most credit a bucket keeps.
    fn cost_and_cap(self) -> Option<(u64, u64)> {
        if self.per_sec == 0 {
            return None;
        }
        let cost = 1_000_000_000 / u64::from(self.per_sec).max(1);
        Some((cost.max(1), cost.max(1) * u64::from(self.burst.max(1))))
    }
}

/// One token bucket. Credit is time: it grows by the time passed, up to `burst` events' worth.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenBucket {
    credit_ns: u64,
    last_ns: Option<u64>,
}

impl TokenBucket {
    /// Takes one token at `now_ns` if there is one. A bucket never used starts full.
    #[inline]
    pub fn take(&mut self, limit: RateLimit, now_ns: u64) -> bool {
        let Some((cost, cap)) = limit.cost_and_cap() else {
            return false;
        };
        let credit = match self.last_ns {
            None => cap,
            Some(last) => self
                .credit_ns
                .saturating_add(now_ns.saturating_sub(last))
                .min(cap),
        };
        self.last_ns = Some(now_ns.max(self.last_ns.unwrap_or(0)));
        if credit >= cost {
            self.credit_ns = credit - cost;
            true
        } else {
            self.credit_ns = credit;
            false
        }
    }
}

/// Number of per-source buckets: sources whose keyed hash collide share one (which only ever
/// limits them more), so the table never grows and a flood of source addresses cannot reset
/// anyone's bucket.
pub const SOURCE_BUCKETS: usize = 256;

/// Token buckets per underlay source address, in a fixed table.
#[derive(Debug, Clone)]
pub struct PerSource {
    buckets: Box<[TokenBucket; SOURCE_BUCKETS]>,
    seed: u64,
}

impl PerSource {
    /// An empty table; `seed` keys the hash that picks a source's bucket.
    pub fn new(seed: u64) -> PerSource {
        PerSource {
            buckets: Box::new([TokenBucket::default(); SOURCE_BUCKETS]),
            seed,
        }
    }

    /// Takes one token from `src`'s bucket.
    #[inline]
    pub fn take(&mut self, src: IpAddr, limit: RateLimit, now_ns: u64) -> bool {
        let bits = match src {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        // splitmix64's finaliser over the keyed address: every input bit moves the index.
        let mut x = (bits as u64 ^ (bits >> 64) as u64).wrapping_add(self.seed);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        let i = x as usize % SOURCE_BUCKETS;
        self.buckets[i].take(limit, now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let lim = RateLimit {
            per_sec: 10,
            burst: 5,
        };
        let mut b = TokenBucket::default();
        let n = (0..100).filter(|_| b.take(lim, S)).count();
        assert_eq!(n, 5, "burst");
        // One second later: ten more (and the burst cap holds over long pauses).
        let n = (0..100).filter(|_| b.take(lim, 2 * S)).count();
        assert_eq!(n, 5, "refill capped at the burst");
        let mut allowed = 0;
        for ms in 0..1000u64 {
            allowed += usize::from(b.take(lim, 2 * S + ms * 1_000_000));
        }
        assert!(
            (9..=11).contains(&allowed),
            "{allowed} in one second at 10/s"
        );
        // Time going backwards never adds credit.
        assert!(!b.take(lim, 0));
        let zero = RateLimit {
            per_sec: 0,
            burst: 9,
        };
        assert!(!TokenBucket::default().take(zero, S));
    }

    #[test]
    fn sources_are_limited_apart() {
        let lim = RateLimit {
            per_sec: 1,
            burst: 2,
        };
        let mut t = PerSource::new(42);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(t.take(a, lim, S));
        assert!(t.take(a, lim, S));
        assert!(!t.take(a, lim, S));
        // The others mostly have buckets of their own (198 sources over 256 buckets of two
        // tokens: about 15 find theirs shared with `a` or emptied by two others).
        let free = (2..200u8)
            .filter(|&i| t.take(IpAddr::from([192, 0, 2, i]), lim, S))
            .count();
        assert!(free >= 160, "{free} of 198 other sources answered");
    }
}
