//! Sans-IO bookkeeping of open connections: who may connect (caps overall and per source,
//! which idle connection makes room for a new source) and when each connection's time is up
//! (header-read and idle deadlines). Time is passed in; the serving loop does the I/O.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// The unit a per-source cap counts: an IPv4 address, or an IPv6 /64 (one host's usual
/// allocation, so a client cannot dodge the cap by cycling its interface identifier).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// What [`Table::admit`] decided for a new connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<H> {
    /// Take it: its id.
    Accept(u64),
    /// Take it after closing `victim` (the oldest idle connection of the largest source),
    /// whose handle is returned.
    AcceptEvicting {
        /// The new connection's id.
        id: u64,
        /// The connection to close now.
        victim: H,
    },
    /// Its source already holds its share.
    RefuseSource,
    /// Every slot is taken and no source holds more than the newcomer's, or none is idle.
    RefuseFull,
}

struct Entry<H> {
    source: IpAddr,
    /// Since when the connection has had no request in flight; `None` while busy (or
    /// detached: upgraded), when it is never evicted.
    idle_since: Option<Instant>,
    handle: H,
}

/// Open connections, by id, with a count per source. `H` is whatever the caller needs to
/// close a connection it is told to evict.
pub struct Table<H> {
    entries: HashMap<u64, Entry<H>>,
    per_source: HashMap<IpAddr, usize>,
    next_id: u64,
    max_total: usize,
    max_per_source: usize,
}

impl<H: Clone> Table<H> {
    /// An empty table with these caps (both at least 1).
    pub fn new(max_total: usize, max_per_source: usize) -> Table<H> {
        Table {
            entries: HashMap::new(),
            per_source: HashMap::new(),
            next_id: 0,
            max_total: max_total.max(1),
            max_per_source: max_per_source.max(1),
        }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Open connections from `ip`'s source.
    pub fn from_source(&self, ip: IpAddr) -> usize {
        self.per_source.get(&source_key(ip)).copied().unwrap_or(0)
    }

    /// Decides on a new connection from `ip`, registering it (idle since `now`) unless refused.
    /// At the overall cap, the oldest idle connection of the source holding the most makes
    /// room, provided that source holds more than the newcomer's: a new source always gets in
    /// while any source above its share has an idle connection.
    pub fn admit(&mut self, ip: IpAddr, now: Instant, handle: H) -> Admit<H> {
        let source = source_key(ip);
        let mine = self.per_source.get(&source).copied().unwrap_or(0);
        if mine >= self.max_per_source {
            return Admit::RefuseSource;
        }
        let mut victim = None;
        if self.entries.len() >= self.max_total {
            match self.victim(|n| n > mine) {
                Some(v) => victim = Some(v),
                None => return Admit::RefuseFull,
            }
        }
        let victim = victim.and_then(|v| self.remove(v));
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                source,
                idle_since: Some(now),
                handle,
            },
        );
        *self.per_source.entry(source).or_default() += 1;
        match victim {
            Some(victim) => Admit::AcceptEvicting { id, victim },
            None => Admit::Accept(id),
        }
    }

    /// Removes an idle connection of the largest source to make room (the process ran out of
    /// descriptors): its handle, or `None` if every connection is busy.
    pub fn evict_any(&mut self) -> Option<H> {
        let v = self.victim(|_| true)?;
        self.remove(v)
    }

    /// Marks a connection busy (`None`) or idle since a time; busy ones are never evicted.
    pub fn set_idle_since(&mut self, id: u64, since: Option<Instant>) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.idle_since = since;
        }
    }

    /// Forgets a closed connection; its handle if it was still registered.
    pub fn remove(&mut self, id: u64) -> Option<H> {
        let e = self.entries.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&e.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&e.source);
            }
        }
        Some(e.handle)
    }

    /// The oldest idle connection among the sources holding the most (whose count passes
    /// `eligible`). Linear, but only run at the cap.
    fn victim(&self, eligible: impl Fn(usize) -> bool) -> Option<u64> {
        let mut best: Option<(usize, Instant, u64)> = None;
        for (id, e) in &self.entries {
            let Some(since) = e.idle_since else { continue };
            let n = self.per_source.get(&e.source).copied().unwrap_or(0);
            if !eligible(n) {
                continue;
            }
            let better = match best {
                None => true,
                Some((bn, bs, bid)) => {
                    (n, std::cmp::Reverse(since), std::cmp::Reverse(*id))
                        > (bn, std::cmp::Reverse(bs), std::cmp::Reverse(bid))
                }
            };
            if better {
                best = Some((n, since, *id));
            }
        }
        best.map(|(_, _, id)| id)
    }
}

/// Why a connection's time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A request head (or the first one, or the handshake) took longer than the header-read
    /// timeout.
    Header,
    /// No request came within the idle timeout.
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head: since accept (`first`) or since its first byte.
    Head { deadline: Instant },
    /// Between requests, nothing read yet.
    Idle { since: Instant },
    /// Requests in flight (responses being produced or streamed): no deadline.
    Busy(usize),
}

/// One connection's lifecycle: requests in flight, and the deadline that applies.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: Phase,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// HTTP/2 sends frames between requests (pings, settings), so bytes there do not start a
    /// request head.
    multiplexed: bool,
}

impl Lifecycle {
    /// A connection accepted at `now`: the first head is due within the header-read timeout.
    pub fn new(now: Instant, header_timeout: Duration, idle_timeout: Duration) -> Lifecycle {
        Lifecycle {
            phase: Phase::Head {
                deadline: now + header_timeout,
            },
            header_timeout,
            idle_timeout,
            multiplexed: false,
        }
    }

    /// The connection speaks HTTP/2.
    pub fn set_multiplexed(&mut self) {
        self.multiplexed = true;
    }

    /// A request's head is complete and its handler runs.
    pub fn request_started(&mut self) {
        self.phase = match self.phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        };
    }

    /// A response is fully sent (or abandoned); returns whether the connection went idle.
    pub fn request_done(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Busy(n) if n > 1 => {
                self.phase = Phase::Busy(n - 1);
                false
            }
            Phase::Busy(_) => {
                self.phase = Phase::Idle { since: now };
                true
            }
            _ => false,
        }
    }

    /// Bytes arrived; returns whether that started a request head (and a shorter deadline).
    pub fn bytes_read(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Idle { since } if !self.multiplexed => {
                let deadline = (now + self.header_timeout).min(since + self.idle_timeout);
                self.phase = Phase::Head { deadline };
                true
            }
            _ => false,
        }
    }

    /// Whether no request is in flight.
    pub fn is_idle(&self) -> bool {
        !matches!(self.phase, Phase::Busy(_))
    }

    /// When the connection is closed if nothing changes, and why.
    pub fn deadline(&self) -> Option<(Instant, Expiry)> {
        match self.phase {
            Phase::Head { deadline } => Some((deadline, Expiry::Header)),
            Phase::Idle { since } => Some((since + self.idle_timeout, Expiry::Idle)),
            Phase::Busy(_) => None,
        }
    }

    /// Why the connection must close at `now`, if it must.
    pub fn expired(&self, now: Instant) -> Option<Expiry> {
        self.deadline()
            .and_then(|(at, why)| (now >= at).then_some(why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_cap_refuses_only_that_source() {
        let now = Instant::now();
        let mut t: Table<u32> = Table::new(100, 2);
        assert_eq!(t.admit(ip("10.0.0.1"), now, 0), Admit::Accept(0));
        assert_eq!(t.admit(ip("10.0.0.1"), now, 1), Admit::Accept(1));
        assert_eq!(t.admit(ip("10.0.0.1"), now, 2), Admit::RefuseSource);
        assert_eq!(t.admit(ip("10.0.0.2"), now, 3), Admit::Accept(2));
        t.remove(0);
        assert_eq!(t.admit(ip("10.0.0.1"), now, 4), Admit::Accept(3));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let now = Instant::now();
        let mut t: Table<()> = Table::new(100, 1);
        assert_eq!(t.admit(ip("2001:db8::1"), now, ()), Admit::Accept(0));
        assert_eq!(t.admit(ip("2001:db8::2"), now, ()), Admit::RefuseSource);
        assert_eq!(t.admit(ip("2001:db8:0:1::2"), now, ()), Admit::Accept(1));
        assert_eq!(t.admit(ip("::ffff:10.0.0.1"), now, ()), Admit::Accept(2));
        assert_eq!(t.admit(ip("10.0.0.1"), now, ()), Admit::RefuseSource);
    }

    #[test]
    fn full_table_evicts_oldest_idle_of_largest_source_for_a_new_one() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut t: Table<&str> = Table::new(4, 10);
        t.admit(ip("10.0.0.1"), t0, "a0");
        t.admit(ip("10.0.0.1"), t0 + s, "a1");
        t.admit(ip("10.0.0.1"), t0 + 2 * s, "a2");
        t.admit(ip("10.0.0.2"), t0, "b0");
        // a0 is busy: the oldest idle of the largest source is a1.
        t.set_idle_since(0, None);
        assert_eq!(
            t.admit(ip("10.0.0.3"), t0 + 3 * s, "c0"),
            Admit::AcceptEvicting {
                id: 4,
                victim: "a1"
            }
        );
        assert_eq!(t.from_source(ip("10.0.0.1")), 2);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn full_table_refuses_when_no_source_holds_more_or_all_are_busy() {
        let now = Instant::now();
        let mut t: Table<()> = Table::new(2, 10);
        t.admit(ip("10.0.0.1"), now, ());
        t.admit(ip("10.0.0.2"), now, ());
        // Both sources hold 1; the second connection of source 1 may not push out source 2.
        assert_eq!(t.admit(ip("10.0.0.1"), now, ()), Admit::RefuseFull);
        // A source with none may take the oldest idle one.
        assert!(matches!(
            t.admit(ip("10.0.0.3"), now, ()),
            Admit::AcceptEvicting { .. }
        ));
        for id in 0..10 {
            t.set_idle_since(id, None);
        }
        assert_eq!(t.admit(ip("10.0.0.4"), now, ()), Admit::RefuseFull);
        assert_eq!(t.evict_any(), None);
    }

    #[test]
    fn lifecycle_header_then_idle_then_header() {
        let t0 = Instant::now();
        let (h, i) = (Duration::from_secs(10), Duration::from_secs(60));
        let mut l = Lifecycle::new(t0, h, i);
        assert_eq!(l.deadline(), Some((t0 + h, Expiry::Header)));
        // Bytes of the first head do not extend its deadline.
        assert!(!l.bytes_read(t0 + Duration::from_secs(5)));
        assert_eq!(l.expired(t0 + h), Some(Expiry::Header));
        l.request_started();
        assert_eq!(l.deadline(), None);
        let t1 = t0 + Duration::from_secs(100);
        assert!(l.request_done(t1));
        assert_eq!(l.deadline(), Some((t1 + i, Expiry::Idle)));
        assert_eq!(
            l.expired(t1 + h),
            None,
            "the header timeout is not the idle one"
        );
        // The first byte of the next head starts the header-read clock.
        let t2 = t1 + Duration::from_secs(30);
        assert!(l.bytes_read(t2));
        assert_eq!(l.deadline(), Some((t2 + h, Expiry::Header)));
        // ... never beyond the idle deadline.
        let mut l2 = l.clone();
        l2.request_started();
        l2.request_done(t1);
        assert!(l2.bytes_read(t1 + Duration::from_secs(55)));
        assert_eq!(l2.deadline(), Some((t1 + i, Expiry::Header)));
    }

    #[test]
    fn lifecycle_busy_has_no_deadline_until_every_response_is_done() {
        let t0 = Instant::now();
        let mut l = Lifecycle::new(t0, Duration::from_secs(1), Duration::from_secs(2));
        l.set_multiplexed();
        l.request_started();
        l.request_started();
        assert!(!l.request_done(t0));
        assert!(!l.is_idle());
        assert_eq!(l.expired(t0 + Duration::from_secs(3600)), None);
        assert!(l.request_done(t0));
        // HTTP/2 frames between requests do not start a head.
        assert!(!l.bytes_read(t0));
        assert_eq!(l.expired(t0 + Duration::from_secs(2)), Some(Expiry::Idle));
    }
}
