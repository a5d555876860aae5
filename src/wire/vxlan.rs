//! The VXLAN header (RFC 7348 section 5).
//!
//! ```text
//!  0                   1                   2                   3
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! What we accept and reject on receipt:
//! - **I flag clear: rejected.** Without it the VNI field is not valid (RFC 7348: "MUST be set
//!   to 1 for a valid VNI"), so we cannot know the segment and must not deliver.
//! - **Reserved bits set: tolerated and ignored**, as RFC 7348 requires ("MUST be ignored on
//!   receipt"). We only ever emit zeros. (Linux's vxlan driver is stricter by default and drops
//!   such packets unless an extension claims the bits; we follow the RFC so that a peer using
//!   GBP or GPE bits we do not understand still reaches the right VNI.)

use super::{need, Result, WireError};
use std::fmt;

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The I flag (VNI valid) in the first byte.
pub const FLAG_I: u8 = 0x08;
/// IANA-assigned VXLAN UDP port.
pub const PORT: u16 = 4789;

/// A 24-bit VXLAN network identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Vni(u32);

impl Vni {
    /// The largest VNI.
    pub const MAX: u32 = 0x00ff_ffff;

    /// A VNI, if `v` fits in 24 bits.
    pub const fn new(v: u32) -> Option<Vni> {
        if v <= Self::MAX {
            Some(Vni(v))
        } else {
            None
        }
    }

    /// The low 24 bits of `v` as a VNI.
    #[inline]
    pub const fn from_u32_truncated(v: u32) -> Vni {
        Vni(v & Self::MAX)
    }

    /// The numeric value.
    #[inline]
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vni({})", self.0)
    }
}

/// A view of a VXLAN header followed by the inner Ethernet frame.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap without checking; accessors may panic on a short buffer.
    pub fn new_unchecked(buf: T) -> Self {
        Packet { buf }
    }

    /// Wrap after checking the length and the I flag.
    pub fn new_checked(buf: T) -> Result<Self> {
        let p = Self::new_unchecked(buf);
        p.check()?;
        Ok(p)
    }

    /// Length and I-flag check (see the module docs for what is tolerated).
    pub fn check(&self) -> Result<()> {
        need("VXLAN header", self.buf.as_ref(), HEADER_LEN)?;
        if self.flags() & FLAG_I == 0 {
            return Err(WireError::Malformed {
                what: "VXLAN header",
                why: "I flag clear: the VNI is not valid (RFC 7348 requires the I flag)",
            });
        }
        Ok(())
    }

    /// The flags byte.
    #[inline]
    pub fn flags(&self) -> u8 {
        self.buf.as_ref()[0]
    }

    /// The VNI.
    #[inline]
    pub fn vni(&self) -> Vni {
        let b = self.buf.as_ref();
        Vni(u32::from_be_bytes([0, b[4], b[5], b[6]]))
    }

    /// Whether any reserved bit is set (tolerated; reported for counters).
    pub fn reserved_bits_set(&self) -> bool {
        let b = self.buf.as_ref();
        (b[0] & !FLAG_I) != 0 || b[1] != 0 || b[2] != 0 || b[3] != 0 || b[7] != 0
    }

    /// The inner Ethernet frame.
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Write a clean header (I flag, VNI, zero reserved bits).
    #[inline]
    pub fn set_header(&mut self, vni: Vni) {
        write_header(self.buf.as_mut(), vni)
    }
}

/// Write an 8-byte VXLAN header for `vni` into the start of `b` (which holds at least 8 bytes).
#[inline]
pub fn write_header(b: &mut [u8], vni: Vni) {
    let v = vni.0.to_be_bytes();
    b[..HEADER_LEN].copy_from_slice(&[FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]);
}

/// The high-level VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// The segment.
    pub vni: Vni,
}

impl Repr {
    /// Parse a checked packet.
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Repr> {
        p.check()?;
        Ok(Repr { vni: p.vni() })
    }

    /// Bytes this header occupies.
    pub const fn header_len(&self) -> usize {
        HEADER_LEN
    }

    /// Emit into a packet buffer.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Packet<T>) {
        p.set_header(self.vni)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // RFC 7348 layout: flags 0x08, VNI 0x123456.
    const BYTES: [u8; 8] = [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0];

    #[test]
    fn parse_known_bytes() {
        let p = Packet::new_checked(&BYTES[..]).unwrap();
        assert_eq!(p.vni().get(), 0x123456);
        assert!(!p.reserved_bits_set());
    }

    #[test]
    fn i_flag_clear_rejected() {
        let mut b = BYTES;
        b[0] = 0;
        assert!(matches!(
            Packet::new_checked(&b[..]),
            Err(WireError::Malformed { .. })
        ));
    }

    #[test]
    fn reserved_bits_tolerated() {
        let b = [0x88, 1, 2, 3, 0, 0, 7, 0xff];
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.vni().get(), 7);
        assert!(p.reserved_bits_set());
    }

    #[test]
    fn short_rejected() {
        for n in 0..HEADER_LEN {
            assert!(matches!(
                Packet::new_checked(&BYTES[..n]),
                Err(WireError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn vni_bounds() {
        assert!(Vni::new(Vni::MAX).is_some());
        assert!(Vni::new(Vni::MAX + 1).is_none());
    }

    proptest! {
        #[test]
        fn round_trip(v in 0u32..=Vni::MAX) {
            let r = Repr { vni: Vni::new(v).unwrap() };
            let mut b = [0u8; 8];
            r.emit(&mut Packet::new_unchecked(&mut b[..]));
            prop_assert_eq!(Repr::parse(&Packet::new_checked(&b[..]).unwrap()).unwrap(), r);
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Ok(p) = Packet::new_checked(&b[..]) {
                let _ = (p.vni(), p.payload().len(), p.reserved_bits_set());
            }
        }
    }
}
