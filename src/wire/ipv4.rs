//! IPv4 headers (RFC 791).

use super::checksum;
use super::{be16, need, put_be16, Result, WireError};
use std::net::Ipv4Addr;

/// Minimum header length.
pub const MIN_HEADER_LEN: usize = 20;

/// A view of an IPv4 packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap without checking.
    pub fn new_unchecked(buf: T) -> Self {
        Packet { buf }
    }

    /// Wrap after checking version, header length and total length against the buffer.
    pub fn new_checked(buf: T) -> Result<Self> {
        let p = Packet { buf };
        let b = p.buf.as_ref();
        need("IPv4 header", b, MIN_HEADER_LEN)?;
        if b[0] >> 4 != 4 {
            return Err(WireError::Malformed {
                what: "IPv4 header",
                why: "version field is not 4",
            });
        }
        let ihl = p.header_len();
        if ihl < MIN_HEADER_LEN {
            return Err(WireError::Malformed {
                what: "IPv4 header",
                why: "IHL below 5 words",
            });
        }
        need("IPv4 options", b, ihl)?;
        let total = usize::from(p.total_len());
        if total < ihl {
            return Err(WireError::Malformed {
                what: "IPv4 header",
                why: "total length shorter than the header",
            });
        }
        need("IPv4 packet (total length)", b, total)?;
        Ok(p)
    }

    /// Header length in bytes.
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.buf.as_ref()[0] & 0x0f) * 4
    }
    /// Total length field.
    #[inline]
    pub fn total_len(&self) -> u16 {
        be16(self.buf.as_ref(), 2)
    }
    /// Identification.
    pub fn ident(&self) -> u16 {
        be16(self.buf.as_ref(), 4)
    }
    /// TTL.
    pub fn ttl(&self) -> u8 {
        self.buf.as_ref()[8]
    }
    /// Protocol number.
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.buf.as_ref()[9]
    }
    /// Source address.
    #[inline]
    pub fn src(&self) -> Ipv4Addr {
        let b = self.buf.as_ref();
        Ipv4Addr::new(b[12], b[13], b[14], b[15])
    }
    /// Destination address.
    #[inline]
    pub fn dst(&self) -> Ipv4Addr {
        let b = self.buf.as_ref();
        Ipv4Addr::new(b[16], b[17], b[18], b[19])
    }
    /// Whether the header checksum verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::checksum(&self.buf.as_ref()[..self.header_len()]) == 0
    }
    /// The payload (up to total length).
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[self.header_len()..usize::from(self.total_len())]
    }
}

/// A simple IPv4 header (no options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Source.
    pub src: Ipv4Addr,
    /// Destination.
    pub dst: Ipv4Addr,
    /// Protocol number.
    pub protocol: u8,
    /// Payload length.
    pub payload_len: u16,
    /// Time to live.
    pub ttl: u8,
}

impl Repr {
    /// Parse a checked packet; the header checksum must verify.
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Repr> {
        if !p.verify_checksum() {
            return Err(WireError::Checksum {
                what: "IPv4 header",
            });
        }
        Ok(Repr {
            src: p.src(),
            dst: p.dst(),
            protocol: p.protocol(),
            payload_len: p.total_len() - p.header_len() as u16,
            ttl: p.ttl(),
        })
    }

    /// Emit a 20-byte header with a valid checksum into `b`.
    pub fn emit(&self, b: &mut [u8]) {
        b[0] = 0x45;
        b[1] = 0;
        put_be16(b, 2, self.payload_len.saturating_add(MIN_HEADER_LEN as u16));
        put_be16(b, 4, 0);
        put_be16(b, 6, 0x4000); // DF
        b[8] = self.ttl;
        b[9] = self.protocol;
        put_be16(b, 10, 0);
        b[12..16].copy_from_slice(&self.src.octets());
        b[16..20].copy_from_slice(&self.dst.octets());
        let c = checksum::checksum(&b[..MIN_HEADER_LEN]);
        put_be16(b, 10, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_bad_lengths() {
        let mut b = [0u8; 24];
        Repr {
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            protocol: 1,
            payload_len: 4,
            ttl: 64,
        }
        .emit(&mut b);
        assert!(Packet::new_checked(&b[..]).is_ok());
        assert!(
            Packet::new_checked(&b[..23]).is_err(),
            "total length beyond buffer"
        );
        let mut v = b;
        v[0] = 0x65;
        assert!(Packet::new_checked(&v[..]).is_err(), "version 6");
        let mut v = b;
        v[0] = 0x44;
        assert!(Packet::new_checked(&v[..]).is_err(), "IHL 4");
        let mut v = b;
        v[3] = 10;
        assert!(Packet::new_checked(&v[..]).is_err(), "total < header");
        let mut v = b;
        v[15] ^= 1;
        assert!(
            Repr::parse(&Packet::new_checked(&v[..]).unwrap()).is_err(),
            "checksum"
        );
    }

    proptest! {
        #[test]
        fn round_trip(src in any::<u32>(), dst in any::<u32>(), proto in any::<u8>(), len in 0u16..1480, ttl in any::<u8>()) {
            let r = Repr { src: src.into(), dst: dst.into(), protocol: proto, payload_len: len, ttl };
            let mut b = vec![0u8; 20 + usize::from(len)];
            r.emit(&mut b);
            prop_assert_eq!(Repr::parse(&Packet::new_checked(&b[..]).unwrap()).unwrap(), r);
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = Packet::new_checked(&b[..]) {
                let _ = (p.src(), p.dst(), p.payload().len(), Repr::parse(&p));
            }
        }
    }
}
