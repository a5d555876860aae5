//! 48-bit IEEE 802 MAC addresses.

use std::fmt;
use std::str::FromStr;

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl std::hash::Hash for Mac {
    /// One 64-bit write: MACs key the hot-path tables, and hashing the array would write a
    /// length prefix and six single bytes.
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.to_u64())
    }
}

impl Mac {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Mac = Mac([0xff; 6]);
    /// 00:00:00:00:00:00.
    pub const ZERO: Mac = Mac([0; 6]);

    /// Read a MAC from the first six bytes of `b` (caller has checked the length).
    #[inline]
    pub fn from_bytes(b: &[u8]) -> Mac {
        let mut m = [0u8; 6];
        m.copy_from_slice(&b[..6]);
        Mac(m)
    }

    /// The octets.
    #[inline]
    pub fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }

    /// Group bit set (multicast, including broadcast).
    #[inline]
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// ff:ff:ff:ff:ff:ff.
    #[inline]
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// A unicast address other than all-zeros.
    #[inline]
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast() && *self != Self::ZERO
    }

    /// The Ethernet multicast address for an IPv6 multicast group (RFC 2464: 33:33 + low 32 bits).
    pub fn ipv6_multicast(group: std::net::Ipv6Addr) -> Mac {
        let o = group.octets();
        Mac([0x33, 0x33, o[12], o[13], o[14], o[15]])
    }

    /// The MAC as a u64 (high 16 bits zero), for hashing and compact keys.
    #[inline]
    pub fn to_u64(&self) -> u64 {
        let b = self.0;
        u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        f.pad(&format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        ))
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {input:?}: expected six hex octets separated by ':' or '-', or 12 hex digits")]
pub struct MacParseError {
    input: String,
}

impl FromStr for Mac {
    type Err = MacParseError;

    /// Accepts `00:0a:95:9d:68:16`, `00-0a-95-9d-68-16` and `000a959d6816`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError {
            input: s.to_string(),
        };
        let hex: String = if s.len() == 12 {
            s.to_string()
        } else {
            let sep = if s.contains(':') { ':' } else { '-' };
            let parts: Vec<&str> = s.split(sep).collect();
            if parts.len() != 6 || parts.iter().any(|p| p.is_empty() || p.len() > 2) {
                return Err(err());
            }
            parts.iter().map(|p| format!("{p:0>2}")).collect()
        };
        if hex.len() != 12 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut m = [0u8; 6];
        for (i, o) in m.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(Mac(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_forms() {
        let m = Mac([0, 0x0a, 0x95, 0x9d, 0x68, 0x16]);
        assert_eq!("00:0a:95:9d:68:16".parse::<Mac>().unwrap(), m);
        assert_eq!("00-0A-95-9d-68-16".parse::<Mac>().unwrap(), m);
        assert_eq!("000a959d6816".parse::<Mac>().unwrap(), m);
        assert_eq!("0:a:95:9d:68:16".parse::<Mac>().unwrap(), m);
        for bad in [
            "",
            "00:0a:95:9d:68",
            "00:0a:95:9d:68:16:00",
            "zz:0a:95:9d:68:16",
            "000a959d681",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn classes() {
        assert!(Mac::BROADCAST.is_broadcast() && Mac::BROADCAST.is_multicast());
        assert!(Mac([0x33, 0x33, 0, 0, 0, 1]).is_multicast());
        assert!(Mac([2, 0, 0, 0, 0, 1]).is_unicast());
        assert!(!Mac::ZERO.is_unicast());
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(b in any::<[u8; 6]>()) {
            let m = Mac(b);
            prop_assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        }
    }
}
