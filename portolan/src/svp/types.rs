//! Small value types that appear in SVP messages and in the store: MAC addresses, log ids,
//! request ids, status codes and the IPv4-mapped address helpers.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use thiserror::Error;

/// A 48-bit Ethernet MAC address, six raw bytes as on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The all-zero MAC, sent in NOTFOUND replies.
    pub const ZERO: Mac = Mac([0; 6]);

    /// The MAC as a 48-bit integer (the form Triton's buckets store).
    pub fn to_u64(self) -> u64 {
        let mut b = [0u8; 8];
        b[2..].copy_from_slice(&self.0);
        u64::from_be_bytes(b)
    }

    /// The MAC from the low 48 bits of `v`; `None` if any higher bit is set.
    pub fn from_u64(v: u64) -> Option<Mac> {
        if v >> 48 != 0 {
            return None;
        }
        let b = v.to_be_bytes();
        let mut m = [0u8; 6];
        m.copy_from_slice(&b[2..]);
        Some(Mac(m))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

/// A string that is not a MAC address in `xx:xx:xx:xx:xx:xx` form.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: expected six hex octets separated by ':' or '-', e.g. 00:0a:95:9d:68:16")]
pub struct ParseMacError(pub String);

impl FromStr for Mac {
    type Err = ParseMacError;
    fn from_str(s: &str) -> Result<Mac, ParseMacError> {
        let err = || ParseMacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            if p.is_empty() || p.len() > 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Mac(out))
    }
}

/// The 16-byte id of a log (shootdown) record. Portolan uses random v4 UUIDs; the textual
/// form is the usual hyphenated UUID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LogId(pub [u8; 16]);

impl LogId {
    /// A fresh random version-4 UUID.
    pub fn random() -> Result<LogId, getrandom::Error> {
        let mut b = [0u8; 16];
        getrandom::getrandom(&mut b)?;
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Ok(LogId(b))
    }
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogId({self})")
    }
}

/// A string that is not a 16-byte id.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid id {0:?}: expected 32 hex digits, optionally as a hyphenated UUID (8-4-4-4-12)")]
pub struct ParseIdError(pub String);

impl FromStr for LogId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<LogId, ParseIdError> {
        let err = || ParseIdError(s.to_string());
        let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
        if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
            return Err(err());
        }
        // A hyphenated form must put the hyphens where a UUID has them.
        if s.contains('-') {
            let groups: Vec<usize> = s.split('-').map(str::len).collect();
            if groups != [8, 4, 4, 4, 12] {
                return Err(err());
            }
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            let pair = std::str::from_utf8(&hex[2 * i..2 * i + 2]).map_err(|_| err())?;
            *o = u8::from_str_radix(pair, 16).map_err(|_| err())?;
        }
        Ok(LogId(out))
    }
}

/// The request id: four opaque bytes that the server echoes unchanged (the illumos client
/// writes its id without byte-swapping, so the server must never interpret it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RequestId(pub [u8; 4]);

impl RequestId {
    /// The id the way our client numbers requests (big-endian counter).
    pub fn from_u32(v: u32) -> RequestId {
        RequestId(v.to_be_bytes())
    }
    /// The four bytes read as a big-endian number (for display only).
    pub fn as_u32(self) -> u32 {
        u32::from_be_bytes(self.0)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({:08x})", self.as_u32())
    }
}

/// An SVP status code. Kept as the raw number so that unknown values survive a round trip;
/// the named constants are the v1 codes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status(pub u32);

impl Status {
    /// SVP_S_OK: success.
    pub const OK: Status = Status(0);
    /// SVP_S_FATAL: a server-side failure.
    pub const FATAL: Status = Status(1);
    /// SVP_S_NOTFOUND: no such entry.
    pub const NOT_FOUND: Status = Status(2);
    /// SVP_S_BADL3TYPE: unknown VL3 address type (never produced by Portolan).
    pub const BAD_L3_TYPE: Status = Status(3);
    /// SVP_S_BADBULK: unknown bulk type.
    pub const BAD_BULK: Status = Status(4);

    /// The symbolic name, or `None` for a code v1 does not define.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "OK",
            1 => "FATAL",
            2 => "NOTFOUND",
            3 => "BADL3TYPE",
            4 => "BADBULK",
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "status {}", self.0),
        }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status({self})")
    }
}

/// The address as it goes on the wire: IPv6 unchanged, IPv4 as IPv4-mapped IPv6.
pub fn to_wire_ip(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The address a wire value stands for: IPv4-mapped becomes IPv4, anything else stays IPv6.
pub fn from_wire_ip(ip: Ipv6Addr) -> IpAddr {
    match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parse_and_display() {
        let m: Mac = "00:0a:95:9d:68:16".parse().unwrap();
        assert_eq!(m.0, [0x00, 0x0a, 0x95, 0x9d, 0x68, 0x16]);
        assert_eq!(m.to_string(), "00:0a:95:9d:68:16");
        assert_eq!("0-a-95-9D-68-16".parse::<Mac>().unwrap(), m);
        assert_eq!(Mac::from_u64(m.to_u64()), Some(m));
        assert_eq!(Mac::from_u64(1 << 48), None);
        for bad in [
            "",
            "00:0a:95:9d:68",
            "00:0a:95:9d:68:16:00",
            "000:a:95:9d:68:16",
            "zz:0a:95:9d:68:16",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn log_id_parse_and_display() {
        let s = "0123abcd-4567-489a-bcde-f0123456789a";
        let id: LogId = s.parse().unwrap();
        assert_eq!(id.to_string(), s);
        assert_eq!(
            "0123abcd4567489abcdef0123456789a".parse::<LogId>().unwrap(),
            id
        );
        assert!("0123abcd-4567489a-bcde-f0123456789a"
            .parse::<LogId>()
            .is_err());
        assert!("0123".parse::<LogId>().is_err());
        let r = LogId::random().unwrap();
        assert_eq!(r.0[6] >> 4, 4);
        assert_eq!(r.to_string().parse::<LogId>().unwrap(), r);
    }

    #[test]
    fn mapped_addresses() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let w = to_wire_ip(v4);
        assert_eq!(w.to_string(), "::ffff:10.0.0.1");
        assert_eq!(from_wire_ip(w), v4);
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(from_wire_ip(to_wire_ip(v6)), v6);
    }
}
