//! IPv6 fixed headers (RFC 8200).

use super::{be16, need, put_be16, Result, WireError};
use std::net::Ipv6Addr;

/// Fixed header length.
pub const HEADER_LEN: usize = 40;
/// Next-header value for ICMPv6.
pub const NEXT_HEADER_ICMPV6: u8 = 58;

/// A view of an IPv6 packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap without checking.
    pub fn new_unchecked(buf: T) -> Self {
        Packet { buf }
    }

    /// Wrap after checking the version and that the payload length fits the buffer.
    pub fn new_checked(buf: T) -> Result<Self> {
        let p = Packet { buf };
        let b = p.buf.as_ref();
        need("IPv6 header", b, HEADER_LEN)?;
        if b[0] >> 4 != 6 {
            return Err(WireError::Malformed {
                what: "IPv6 header",
                why: "version field is not 6",
            });
        }
        need(
            "IPv6 packet (payload length)",
            b,
            HEADER_LEN + usize::from(p.payload_len()),
        )?;
        Ok(p)
    }

    /// Payload length field.
    #[inline]
    pub fn payload_len(&self) -> u16 {
        be16(self.buf.as_ref(), 4)
    }
    /// Next header.
    #[inline]
    pub fn next_header(&self) -> u8 {
        self.buf.as_ref()[6]
    }
    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buf.as_ref()[7]
    }
    /// Source address.
    #[inline]
    pub fn src(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buf.as_ref()[8..24]);
        a.into()
    }
    /// Destination address.
    #[inline]
    pub fn dst(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buf.as_ref()[24..40]);
        a.into()
    }
    /// The payload (up to payload length).
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..HEADER_LEN + usize::from(self.payload_len())]
    }
}

/// A fixed IPv6 header (traffic class and flow label zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Source.
    pub src: Ipv6Addr,
    /// Destination.
    pub dst: Ipv6Addr,
    /// Next header.
    pub next_header: u8,
    /// Payload length.
    pub payload_len: u16,
    /// Hop limit.
    pub hop_limit: u8,
}

impl Repr {
    /// Parse a checked packet.
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Repr> {
        Ok(Repr {
            src: p.src(),
            dst: p.dst(),
            next_header: p.next_header(),
            payload_len: p.payload_len(),
            hop_limit: p.hop_limit(),
        })
    }

    /// Emit the 40-byte header into `b`.
    pub fn emit(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
        put_be16(b, 4, self.payload_len);
        b[6] = self.next_header;
        b[7] = self.hop_limit;
        b[8..24].copy_from_slice(&self.src.octets());
        b[24..40].copy_from_slice(&self.dst.octets());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(src in any::<u128>(), dst in any::<u128>(), nh in any::<u8>(), len in 0u16..200, hl in any::<u8>()) {
            let r = Repr { src: src.into(), dst: dst.into(), next_header: nh, payload_len: len, hop_limit: hl };
            let mut b = vec![0u8; 40 + usize::from(len)];
            r.emit(&mut b);
            prop_assert_eq!(Repr::parse(&Packet::new_checked(&b[..]).unwrap()).unwrap(), r);
            prop_assert!(Packet::new_checked(&b[..b.len() - 1]).is_err());
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = Packet::new_checked(&b[..]) {
                let _ = (p.src(), p.dst(), p.payload().len());
            }
        }
    }
}
