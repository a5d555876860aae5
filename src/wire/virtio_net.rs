//! The `virtio_net_hdr` that a TAP device opened with `IFF_VNET_HDR` puts before every frame.
//!
//! We use the 12-byte form (`virtio_net_hdr_v1` / `virtio_net_hdr_mrg_rxbuf`, set with
//! `TUNSETVNETHDRSZ`), in the host's byte order, which the kernel uses for TAP unless
//! `TUNSETVNETLE/BE` says otherwise.
//!
//! ```text
//! u8 flags | u8 gso_type | u16 hdr_len | u16 gso_size | u16 csum_start | u16 csum_offset | u16 num_buffers
//! ```
//!
//! This is the one codec of the header: `io::offload` (segmentation, checksum completion,
//! coalescing) and the daemon use it. Decoding does not judge the values; the segmenter
//! rejects what it cannot handle (unknown GSO types, inconsistent offsets) with a typed error.

/// Length of the header we negotiate.
pub const LEN: usize = 12;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum from `csum_start` must be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksums were verified already.
pub const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP` (UFO, obsolete; the segmenter rejects it).
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO, Linux ≥ 6.2 on TAP).
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN` bit, or-ed into `gso_type`.
pub const GSO_ECN: u8 = 0x80;

/// The 12-byte `virtio_net_hdr_v1` in front of every TAP frame (fields in host byte order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    /// `F_NEEDS_CSUM` / `F_DATA_VALID`.
    pub flags: u8,
    /// One of the `GSO_*` values, possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers (Ethernet + IP + L4), a hint only.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS) when `gso_type != GSO_NONE`.
    pub gso_size: u16,
    /// Offset of the L4 header (from the start of the Ethernet frame) for `NEEDS_CSUM`.
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
    /// Unused on TAP (mergeable buffers); always written as 0.
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    /// Decodes the first [`LEN`] bytes of `buf`; `None` if shorter.
    #[inline]
    pub fn decode(buf: &[u8]) -> Option<Self> {
        let b: &[u8; LEN] = buf.get(..LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        })
    }

    /// Encodes into the first [`LEN`] bytes of `buf`, which must hold at least that many.
    #[inline]
    pub fn encode(&self, buf: &mut [u8]) {
        let b = &mut buf[..LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_ne_bytes());
    }

    /// Whether the frame is a plain one: no segmentation and complete checksums.
    #[inline]
    pub fn is_plain(&self) -> bool {
        self.gso_type & !GSO_ECN == GSO_NONE && self.flags & F_NEEDS_CSUM == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn kernel_layout() {
        // TSOv4 with partial checksum, as the kernel hands it over on a little-endian host:
        // flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16.
        let b = [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0];
        let h = VirtioNetHdr::decode(&b).unwrap();
        assert_eq!(h.gso_type, GSO_TCPV4);
        assert_eq!(h.gso_size, 1448);
        assert_eq!((h.csum_start, h.csum_offset), (34, 16));
        assert!(!h.is_plain());
        assert!(VirtioNetHdr::decode(&b[..11]).is_none());
        assert!(VirtioNetHdr::default().is_plain());
    }

    proptest! {
        #[test]
        fn round_trip(flags in any::<u8>(), t in any::<u8>(), hl in any::<u16>(), gs in any::<u16>(),
                      cs in any::<u16>(), co in any::<u16>(), nb in any::<u16>()) {
            let h = VirtioNetHdr { flags, gso_type: t, hdr_len: hl, gso_size: gs, csum_start: cs, csum_offset: co, num_buffers: nb };
            let mut b = [0u8; LEN + 3];
            h.encode(&mut b);
            prop_assert_eq!(VirtioNetHdr::decode(&b), Some(h));
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..20)) {
            let _ = VirtioNetHdr::decode(&b);
        }
    }
}
