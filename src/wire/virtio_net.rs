//! The `virtio_net_hdr` that a TAP device opened with `IFF_VNET_HDR` puts before every frame.
//!
//! We use the 12-byte form (`virtio_net_hdr_mrg_rxbuf`, set with `TUNSETVNETHDRSZ`), in the
//! host's byte order, which the kernel uses for TAP unless `TUNSETVNETLE/BE` says otherwise;
//! fabric only runs on little-endian Linux hosts, so fields are little-endian here.
//!
//! ```text
//! u8 flags | u8 gso_type | le16 hdr_len | le16 gso_size | le16 csum_start | le16 csum_offset | le16 num_buffers
//! ```

use super::{need, Result, WireError};

/// Length of the header we negotiate.
pub const LEN: usize = 12;

/// `flags`: the checksum at `csum_start + csum_offset` must be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has been validated.
pub const F_DATA_VALID: u8 = 2;

/// Segmentation the frame needs (`gso_type`, without the ECN bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoType {
    /// Not a super-frame.
    None,
    /// TCP over IPv4.
    TcpV4,
    /// UDP (UFO, deprecated).
    Udp,
    /// TCP over IPv6.
    TcpV6,
    /// UDP segmentation (USO).
    UdpL4,
}

/// `gso_type` bit: ECN was negotiated for this TCP flow.
pub const GSO_ECN: u8 = 0x80;

impl GsoType {
    fn from_u8(v: u8) -> Option<GsoType> {
        Some(match v & !GSO_ECN {
            0 => GsoType::None,
            1 => GsoType::TcpV4,
            3 => GsoType::Udp,
            4 => GsoType::TcpV6,
            5 => GsoType::UdpL4,
            _ => return None,
        })
    }

    fn to_u8(self) -> u8 {
        match self {
            GsoType::None => 0,
            GsoType::TcpV4 => 1,
            GsoType::Udp => 3,
            GsoType::TcpV6 => 4,
            GsoType::UdpL4 => 5,
        }
    }
}

/// A view of the header.
#[derive(Debug, Clone)]
pub struct Header<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wrap after checking the length.
    pub fn new_checked(buf: T) -> Result<Self> {
        need("virtio_net_hdr", buf.as_ref(), LEN)?;
        Ok(Header { buf })
    }

    fn le16(&self, at: usize) -> u16 {
        let b = self.buf.as_ref();
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    /// flags.
    pub fn flags(&self) -> u8 {
        self.buf.as_ref()[0]
    }
    /// Raw gso_type.
    pub fn gso_type_raw(&self) -> u8 {
        self.buf.as_ref()[1]
    }
    /// hdr_len.
    pub fn hdr_len(&self) -> u16 {
        self.le16(2)
    }
    /// gso_size.
    pub fn gso_size(&self) -> u16 {
        self.le16(4)
    }
    /// csum_start.
    pub fn csum_start(&self) -> u16 {
        self.le16(6)
    }
    /// csum_offset.
    pub fn csum_offset(&self) -> u16 {
        self.le16(8)
    }
    /// num_buffers.
    pub fn num_buffers(&self) -> u16 {
        self.le16(10)
    }
}

/// A valid header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// F_NEEDS_CSUM / F_DATA_VALID.
    pub flags: u8,
    /// Segmentation type.
    pub gso_type: GsoType,
    /// ECN bit of gso_type.
    pub ecn: bool,
    /// Length of the headers to replicate on each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, from csum_start, the checksum goes.
    pub csum_offset: u16,
    /// num_buffers (mergeable rx buffers; 0 or 1 from TAP).
    pub num_buffers: u16,
}

impl Repr {
    /// An all-zero header: a plain frame, checksums complete.
    pub const NONE: Repr = Repr {
        flags: 0,
        gso_type: GsoType::None,
        ecn: false,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
        num_buffers: 0,
    };

    /// Parse, rejecting unknown flags and GSO types.
    pub fn parse<T: AsRef<[u8]>>(h: &Header<T>) -> Result<Repr> {
        if h.flags() & !(F_NEEDS_CSUM | F_DATA_VALID) != 0 {
            return Err(WireError::Malformed {
                what: "virtio_net_hdr",
                why: "unknown flag bits",
            });
        }
        let gso_type = GsoType::from_u8(h.gso_type_raw()).ok_or(WireError::Malformed {
            what: "virtio_net_hdr",
            why: "unknown gso_type",
        })?;
        if gso_type != GsoType::None && h.gso_size() == 0 {
            return Err(WireError::Malformed {
                what: "virtio_net_hdr",
                why: "GSO frame with gso_size 0",
            });
        }
        Ok(Repr {
            flags: h.flags(),
            gso_type,
            ecn: h.gso_type_raw() & GSO_ECN != 0,
            hdr_len: h.hdr_len(),
            gso_size: h.gso_size(),
            csum_start: h.csum_start(),
            csum_offset: h.csum_offset(),
            num_buffers: h.num_buffers(),
        })
    }

    /// Emit into the first [`LEN`] bytes of `b`.
    pub fn emit(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type.to_u8() | if self.ecn { GSO_ECN } else { 0 };
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kernel_layout() {
        // TSOv4 with partial checksum, as the kernel hands it over: flags=1, gso_type=1,
        // hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16.
        let b = [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0];
        let r = Repr::parse(&Header::new_checked(&b[..]).unwrap()).unwrap();
        assert_eq!(r.gso_type, GsoType::TcpV4);
        assert_eq!(r.gso_size, 1448);
        assert_eq!((r.csum_start, r.csum_offset), (34, 16));
        assert!(Header::new_checked(&b[..11]).is_err());
        let mut bad = b;
        bad[1] = 9;
        assert!(Repr::parse(&Header::new_checked(&bad[..]).unwrap()).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(flags in 0u8..4, t in prop_oneof![Just(GsoType::None), Just(GsoType::TcpV4), Just(GsoType::Udp), Just(GsoType::TcpV6), Just(GsoType::UdpL4)],
                      ecn in any::<bool>(), hl in any::<u16>(), gs in 1u16.., cs in any::<u16>(), co in any::<u16>(), nb in any::<u16>()) {
            let r = Repr { flags, gso_type: t, ecn, hdr_len: hl, gso_size: gs, csum_start: cs, csum_offset: co, num_buffers: nb };
            let mut b = [0u8; LEN];
            r.emit(&mut b);
            prop_assert_eq!(Repr::parse(&Header::new_checked(&b[..]).unwrap()).unwrap(), r);
        }
    }
}
