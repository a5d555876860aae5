//! Ethernet II frames with an optional 802.1Q tag.

use super::{be16, need, put_be16, Mac, Result};
use std::fmt;

/// Untagged header length.
pub const HEADER_LEN: usize = 14;
/// 802.1Q tag length.
pub const VLAN_TAG_LEN: usize = 4;

/// An EtherType.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EtherType(pub u16);

impl EtherType {
    /// IPv4.
    pub const IPV4: EtherType = EtherType(0x0800);
    /// ARP.
    pub const ARP: EtherType = EtherType(0x0806);
    /// IPv6.
    pub const IPV6: EtherType = EtherType(0x86dd);
    /// 802.1Q VLAN tag.
    pub const VLAN: EtherType = EtherType(0x8100);
}

impl fmt::Debug for EtherType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::IPV4 => write!(f, "IPv4"),
            Self::ARP => write!(f, "ARP"),
            Self::IPV6 => write!(f, "IPv6"),
            Self::VLAN => write!(f, "802.1Q"),
            EtherType(t) => write!(f, "0x{t:04x}"),
        }
    }
}

/// A view of an Ethernet II frame.
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wrap without checking.
    pub fn new_unchecked(buf: T) -> Self {
        Frame { buf }
    }

    /// Wrap after checking that the header (with its tag, if any) fits.
    pub fn new_checked(buf: T) -> Result<Self> {
        let f = Self::new_unchecked(buf);
        need("Ethernet header", f.buf.as_ref(), HEADER_LEN)?;
        if be16(f.buf.as_ref(), 12) == EtherType::VLAN.0 {
            need(
                "802.1Q tagged Ethernet header",
                f.buf.as_ref(),
                HEADER_LEN + VLAN_TAG_LEN,
            )?;
        }
        Ok(f)
    }

    /// Destination MAC.
    #[inline]
    pub fn dst(&self) -> Mac {
        Mac::from_bytes(&self.buf.as_ref()[0..6])
    }

    /// Source MAC.
    #[inline]
    pub fn src(&self) -> Mac {
        Mac::from_bytes(&self.buf.as_ref()[6..12])
    }

    /// The 802.1Q TCI, if the frame is tagged.
    #[inline]
    pub fn vlan_tci(&self) -> Option<u16> {
        let b = self.buf.as_ref();
        (be16(b, 12) == EtherType::VLAN.0).then(|| be16(b, 14))
    }

    /// The EtherType of the payload (after the tag, if any).
    #[inline]
    pub fn ethertype(&self) -> EtherType {
        let b = self.buf.as_ref();
        let t = be16(b, 12);
        if t == EtherType::VLAN.0 {
            EtherType(be16(b, 16))
        } else {
            EtherType(t)
        }
    }

    /// Header length including the tag.
    #[inline]
    pub fn header_len(&self) -> usize {
        if be16(self.buf.as_ref(), 12) == EtherType::VLAN.0 {
            HEADER_LEN + VLAN_TAG_LEN
        } else {
            HEADER_LEN
        }
    }

    /// The L3 payload.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[self.header_len()..]
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buf
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Set the destination MAC.
    pub fn set_dst(&mut self, m: Mac) {
        self.buf.as_mut()[0..6].copy_from_slice(&m.0)
    }

    /// Set the source MAC.
    pub fn set_src(&mut self, m: Mac) {
        self.buf.as_mut()[6..12].copy_from_slice(&m.0)
    }

    /// The L3 payload, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let h = self.header_len();
        &mut self.buf.as_mut()[h..]
    }
}

/// The high-level Ethernet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Source MAC.
    pub src: Mac,
    /// Destination MAC.
    pub dst: Mac,
    /// 802.1Q tag control information, if tagged.
    pub vlan_tci: Option<u16>,
    /// Payload EtherType.
    pub ethertype: EtherType,
}

impl Repr {
    /// Parse a checked frame.
    pub fn parse<T: AsRef<[u8]>>(f: &Frame<T>) -> Result<Repr> {
        Ok(Repr {
            src: f.src(),
            dst: f.dst(),
            vlan_tci: f.vlan_tci(),
            ethertype: f.ethertype(),
        })
    }

    /// Header length this repr emits.
    pub fn header_len(&self) -> usize {
        HEADER_LEN
            + if self.vlan_tci.is_some() {
                VLAN_TAG_LEN
            } else {
                0
            }
    }

    /// Emit the header into the start of `buf` (which must hold `header_len()` bytes).
    pub fn emit(&self, buf: &mut [u8]) {
        buf[0..6].copy_from_slice(&self.dst.0);
        buf[6..12].copy_from_slice(&self.src.0);
        match self.vlan_tci {
            Some(tci) => {
                put_be16(buf, 12, EtherType::VLAN.0);
                put_be16(buf, 14, tci);
                put_be16(buf, 16, self.ethertype.0);
            }
            None => put_be16(buf, 12, self.ethertype.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tagged_frame() {
        let mut b = [0u8; 22];
        Repr {
            src: Mac([2, 0, 0, 0, 0, 1]),
            dst: Mac::BROADCAST,
            vlan_tci: Some(0x0064),
            ethertype: EtherType::ARP,
        }
        .emit(&mut b);
        let f = Frame::new_checked(&b[..]).unwrap();
        assert_eq!(f.header_len(), 18);
        assert_eq!(f.ethertype(), EtherType::ARP);
        assert_eq!(f.vlan_tci(), Some(100));
        assert_eq!(f.payload().len(), 4);
        // A tag that is cut short is an error, not a panic.
        assert!(Frame::new_checked(&b[..16]).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(src in any::<[u8;6]>(), dst in any::<[u8;6]>(), tci in proptest::option::of(any::<u16>()),
                      et in any::<u16>().prop_filter("not a tag", |t| *t != 0x8100)) {
            let r = Repr { src: Mac(src), dst: Mac(dst), vlan_tci: tci, ethertype: EtherType(et) };
            let mut b = vec![0u8; r.header_len()];
            r.emit(&mut b);
            let f = Frame::new_checked(&b[..]).unwrap();
            prop_assert_eq!(Repr::parse(&f).unwrap(), r);
            prop_assert_eq!(f.payload().len(), 0);
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok(f) = Frame::new_checked(&b[..]) {
                let _ = (f.src(), f.dst(), f.ethertype(), f.vlan_tci(), f.payload().len());
            }
        }
    }
}
