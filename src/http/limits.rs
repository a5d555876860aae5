//! The limits every HTTP service runs with, their production defaults and their checks.

use std::time::Duration;

/// Limits of one HTTP service (see the module docs of [`crate::http`] for what each bounds).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// From accept (TLS handshake included) to the end of the first request's head, and from
    /// the first byte of a later request's head to its end.
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may wait, with no request in flight and no byte of a
    /// new one, before it is closed. Never applies while a response is being produced or
    /// streamed (long-poll, streaming, upgraded connections).
    pub idle_timeout: Duration,
    /// Open connections at most, all sources together (lowered to what `RLIMIT_NOFILE` leaves
    /// after [`Limits::fd_reserve`]).
    pub max_connections: usize,
    /// Open connections at most from one source (an IPv4 address or an IPv6 /64).
    pub max_connections_per_source: usize,
    /// Largest request body, in bytes; larger ones are answered 413.
    pub max_body_bytes: usize,
    /// Largest request head (HTTP/1 read buffer, HTTP/2 header list), in bytes.
    pub max_header_bytes: usize,
    /// File descriptors kept for everything but connections (store, runtime, logs).
    pub fd_reserve: usize,
    /// TCP keepalive idle time: what keeps exempt long-lived connections honest.
    pub tcp_keepalive: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_h2_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_source: 256,
            max_body_bytes: 1 << 20,
            max_header_bytes: 64 << 10,
            fd_reserve: 64,
            tcp_keepalive: Duration::from_secs(60),
            max_h2_streams: 128,
        }
    }
}

/// A limit that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// A timeout of zero (or beyond a day).
    #[error("{name} {value:?}: expected a timeout between 1 ms and 1 day")]
    Timeout {
        /// Which limit.
        name: &'static str,
        /// The value given.
        value: Duration,
    },
    /// A count or size of zero, or one that cannot hold what it must.
    #[error("{name} {value}: expected at least {min}")]
    TooSmall {
        /// Which limit.
        name: &'static str,
        /// The value given.
        value: usize,
        /// The smallest that works.
        min: usize,
    },
}

impl Limits {
    /// Checks that every limit can work.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let day = Duration::from_secs(86_400);
        for (name, value) in [
            ("header read timeout", self.header_read_timeout),
            ("idle timeout", self.idle_timeout),
            ("TCP keepalive", self.tcp_keepalive),
        ] {
            if value < Duration::from_millis(1) || value > day {
                return Err(LimitsError::Timeout { name, value });
            }
        }
        for (name, value, min) in [
            ("max connections", self.max_connections, 1),
            (
                "max connections per source",
                self.max_connections_per_source,
                1,
            ),
            ("max body bytes", self.max_body_bytes, 1),
            // hyper's HTTP/1 read buffer cannot be smaller.
            ("max header bytes", self.max_header_bytes, 8192),
            ("max HTTP/2 streams", self.max_h2_streams as usize, 1),
        ] {
            if value < min {
                return Err(LimitsError::TooSmall { name, value, min });
            }
        }
        Ok(())
    }

    /// The connection cap in force when the process may hold `nofile` descriptors: never more
    /// than fit beside [`Limits::fd_reserve`] (and at least one, so the service still serves).
    pub fn connection_cap(&self, nofile: u64) -> usize {
        let fit = usize::try_from(nofile)
            .unwrap_or(usize::MAX)
            .saturating_sub(self.fd_reserve)
            .max(1);
        self.max_connections.min(fit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Limits::default().validate(), Ok(()));
    }

    #[test]
    fn zero_limits_are_refused_by_name() {
        let l = Limits {
            idle_timeout: Duration::ZERO,
            ..Limits::default()
        };
        assert!(l
            .validate()
            .unwrap_err()
            .to_string()
            .contains("idle timeout"));
        let l = Limits {
            max_connections_per_source: 0,
            ..Limits::default()
        };
        let e = l.validate().unwrap_err().to_string();
        assert!(e.contains("per source") && e.contains("at least 1"), "{e}");
    }

    #[test]
    fn cap_follows_the_fd_limit() {
        let l = Limits::default();
        assert_eq!(l.connection_cap(1 << 20), 4096);
        assert_eq!(l.connection_cap(1024), 1024 - 64);
        assert_eq!(l.connection_cap(10), 1);
    }
}
