//! `virtio_net_hdr` and userspace segmentation / coalescing (pure: no syscalls).

/// Size of the `virtio_net_hdr` we configure on TAP devices (`virtio_net_hdr_v1`).
pub const VIRTIO_NET_HDR_LEN: usize = 12;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: checksum from `csum_start` must be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksums were verified already.
pub const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP` (UFO, obsolete; rejected).
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
    /// Decodes the first 12 bytes of `buf`; `None` if shorter.
    #[inline]
    pub fn decode(buf: &[u8]) -> Option<Self> {
        let b: &[u8; VIRTIO_NET_HDR_LEN] = buf.get(..VIRTIO_NET_HDR_LEN)?.try_into().ok()?;
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

    /// Encodes into the first 12 bytes of `buf` (which must hold at least 12 bytes).
    #[inline]
    pub fn encode(&self, buf: &mut [u8]) {
        let b = &mut buf[..VIRTIO_NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_ne_bytes());
    }
}
