//! `virtio_net_hdr`, userspace segmentation of TAP super-frames, TCP coalescing for TAP
//! writes and checksum helpers (the inner flow hash is `core::flow_hash`). Pure: no syscalls, no allocation.
//!
//! # Encapsulation path (TAP read → underlay)
//!
//! With TSO/USO negotiated ([`super::tap::Offloads`]) a TAP read returns a
//! [`VirtioNetHdr`] and a frame of up to 64 KB. Three cases:
//! - `gso_type == GSO_NONE`, no `F_NEEDS_CSUM`: the frame is complete.
//! - `GSO_NONE` with `F_NEEDS_CSUM`: call [`complete_checksum`] in place. Read the TAP into
//!   `buf[0..]` so the frame starts at byte 12; the VXLAN header then goes into `buf[4..12]`,
//!   over the already decoded vnet header, and `buf[4..12 + len]` is sent: no copy.
//! - `GSO_TCPV4`/`GSO_TCPV6`/`GSO_UDP_L4`: [`segment`] writes MSS-sized frames into one
//!   output buffer, each after `headroom` bytes, at a fixed [`Segments::stride`]. Fill the
//!   headrooms with the VXLAN header ([`Segments::fill_headroom`]) and hand
//!   `out[..segs.total_len()]` to the underlay as one transmit with
//!   `segment_size = Some(segs.stride)`: the kernel's UDP GSO cuts it exactly there.
//!
//! # Decapsulation path (underlay → TAP write)
//!
//! [`TcpCoalescer`] takes the decapsulated inner frames of one run (e.g. one GRO buffer's
//! datagrams to one vnic) and merges consecutive same-flow TCP segments into one super-frame
//! with `GSO_TCPV4/6` and `F_NEEDS_CSUM`, so the container's stack receives one 64 KB skb
//! instead of 45. See [`Push`] for the protocol.
//!
//! # Kernel quirks interpreted here
//!
//! - With `F_NEEDS_CSUM` the L4 checksum field holds the *pseudo-header* sum (not
//!   complemented), and the real checksum covers `csum_start..end` (`skb_checksum_help`). We
//!   write the same convention on coalesced frames. A computed 0 is sent as `0xffff`.
//! - `hdr_len` is only a hint (the kernel may set it to the linear length); headers are parsed
//!   from the frame at fixed offsets (Ethernet, one optional 802.1Q tag, IPv4 with options or
//!   IPv6 without extension headers, TCP/UDP), and `csum_start` must point at the L4 header.
//! - `gso_type` may carry `GSO_ECN` (0x80): CWR is kept on the first segment only, as the
//!   kernel's `tcp_gso_segment` does. FIN and PSH go on the last segment only.
//! - IPv4 IDs increment per segment from the super-frame's ID (what Linux GSO emits and what
//!   GRO on the receiver expects). `GSO_UDP_L4` is used for both IPv4 and IPv6.
//! - The IPv4 `tot_len` of a super-frame is not trusted; the frame length is.

pub use crate::wire::virtio_net::{
    VirtioNetHdr, F_DATA_VALID, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP,
    GSO_UDP_L4, LEN as VIRTIO_NET_HDR_LEN,
};

/// Why a frame could not be segmented or its checksum completed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// The frame is shorter than its headers claim.
    #[error("frame too short: {what}")]
    Truncated {
        /// Which header or field did not fit.
        what: &'static str,
    },
    /// A header combination we do not segment (IPv6 extension headers, UFO, ...).
    #[error("unsupported frame: {what}")]
    Unsupported {
        /// What was found and what was expected.
        what: &'static str,
    },
    /// The `virtio_net_hdr` contradicts the frame (checksum offsets, GSO type).
    #[error("virtio_net_hdr does not match frame: {what}")]
    BadHeader {
        /// Which field was wrong.
        what: &'static str,
    },
    /// The output buffer cannot hold all segments.
    #[error("output buffer too small: need {need} bytes, have {have}")]
    OutputTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// Internet checksum (RFC 1071)
// ---------------------------------------------------------------------------------------------

/// One's-complement sum of `data` in *native* 16-bit lanes (fold with [`fold_ne_to_be`]).
///
/// Uses an AVX2 build of the same loop when the CPU has it (runtime check, cached by std):
/// about 1.7x faster on 1.4 KB than the baseline SSE2 build.
#[inline]
fn sum_ne(data: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= 128 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { sum_ne_avx2(data) };
    }
    sum_ne_generic(data)
}

/// [`sum_ne_generic`] compiled with AVX2 enabled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_ne_avx2(data: &[u8]) -> u64 {
    sum_ne_generic(data)
}

/// Copies `src` into `dst` (same length) and returns the native-lane sum of `src`.
///
/// The sum is taken over the *source*: summing the bytes just written would stall on store
/// forwarding, and a fused copy-and-sum loop measured slower than `memcpy` plus a separate sum.
#[inline]
fn copy_sum_ne(dst: &mut [u8], src: &[u8]) -> u64 {
    let sum = sum_ne(src);
    dst.copy_from_slice(src);
    sum
}

/// The portable loop behind [`sum_ne`]. Adds 32-bit words into 64-bit accumulators without carries (a frame has far fewer than 2^32
/// words, so they cannot overflow); the compiler vectorises this into widening SIMD adds. The
/// end-around carries are recovered by [`fold`], since 2^32 ≡ 2^16 ≡ 1 (mod 0xffff).
#[inline(always)]
fn sum_ne_generic(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(32);
    let mut lanes = [0u64; 8];
    for c in &mut chunks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            *lane +=
                u32::from_ne_bytes([c[i * 4], c[i * 4 + 1], c[i * 4 + 2], c[i * 4 + 3]]) as u64;
        }
    }
    let mut acc: u64 = lanes.iter().sum();
    let mut rest = chunks.remainder();
    while rest.len() >= 4 {
        acc += u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as u64;
        rest = &rest[4..];
    }
    if rest.len() >= 2 {
        acc += u16::from_ne_bytes([rest[0], rest[1]]) as u64;
        rest = &rest[2..];
    }
    if let Some(&b) = rest.first() {
        // A trailing odd byte is the high byte of a zero-padded big-endian word.
        acc += u16::from_ne_bytes([b, 0]) as u64;
    }
    acc
}

/// Folds a 64-bit one's-complement accumulator to 16 bits.
#[inline(always)]
fn fold(mut acc: u64) -> u16 {
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}

/// Folds a native-lane sum and converts it to the big-endian (network) numeric value.
#[inline(always)]
fn fold_ne_to_be(acc: u64) -> u16 {
    u16::from_be(fold(acc))
}

/// One's-complement sum (not complemented) of `data` plus `init`, as a network-order number.
#[inline]
pub fn checksum_partial(data: &[u8], init: u32) -> u16 {
    fold(fold_ne_to_be(sum_ne(data)) as u64 + init as u64)
}

/// The Internet checksum of `data` with an initial pseudo-header sum `init` (network order).
#[inline]
pub fn checksum(data: &[u8], init: u32) -> u16 {
    !checksum_partial(data, init)
}

/// Sum of the IPv4 or IPv6 pseudo-header for an L4 segment of `l4_len` bytes.
#[inline]
fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, l4_len: usize) -> u32 {
    let mut s = fold_ne_to_be(sum_ne(src)) as u32 + fold_ne_to_be(sum_ne(dst)) as u32;
    s += proto as u32;
    s += (l4_len as u32 >> 16) + (l4_len as u32 & 0xffff);
    s
}

// ---------------------------------------------------------------------------------------------
// Header layout
// ---------------------------------------------------------------------------------------------

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;

/// Offsets of the headers of one Ethernet frame (fixed-offset parse, at most one VLAN tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// Start of the IP header.
    l3: usize,
    /// Start of the L4 header.
    l4: usize,
    /// End of the L4 header (start of the payload).
    hdrs: usize,
    v6: bool,
    proto: u8,
}

impl Layout {
    fn src_dst<'a>(&self, f: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        if self.v6 {
            (
                &f[self.l3 + 8..self.l3 + 24],
                &f[self.l3 + 24..self.l3 + 40],
            )
        } else {
            (
                &f[self.l3 + 12..self.l3 + 16],
                &f[self.l3 + 16..self.l3 + 20],
            )
        }
    }
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Parses Ethernet (+1 VLAN) / IPv4 or IPv6 (no extension headers) / TCP or UDP.
fn parse(f: &[u8]) -> Result<Layout, OffloadError> {
    let short = |what| OffloadError::Truncated { what };
    if f.len() < 14 {
        return Err(short("Ethernet header"));
    }
    let (mut ethertype, mut l3) = (be16(f, 12), 14);
    if ethertype == ETH_P_8021Q {
        if f.len() < 18 {
            return Err(short("VLAN tag"));
        }
        ethertype = be16(f, 16);
        l3 = 18;
    }
    let (v6, proto, l4) = match ethertype {
        ETH_P_IPV4 => {
            let b = *f.get(l3).ok_or(short("IPv4 header"))?;
            let ihl = (b & 0x0f) as usize * 4;
            if b >> 4 != 4 || ihl < 20 {
                return Err(OffloadError::Unsupported {
                    what: "IPv4 header with bad version or IHL",
                });
            }
            if f.len() < l3 + ihl {
                return Err(short("IPv4 header"));
            }
            (false, f[l3 + 9], l3 + ihl)
        }
        ETH_P_IPV6 => {
            if f.len() < l3 + 40 {
                return Err(short("IPv6 header"));
            }
            (true, f[l3 + 6], l3 + 40)
        }
        _ => {
            return Err(OffloadError::Unsupported {
                what: "ethertype is neither IPv4 nor IPv6",
            })
        }
    };
    let hdrs = match proto {
        PROTO_TCP => {
            let b = *f.get(l4 + 12).ok_or(short("TCP header"))?;
            let doff = (b >> 4) as usize * 4;
            if doff < 20 {
                return Err(OffloadError::Unsupported {
                    what: "TCP data offset below 5",
                });
            }
            l4 + doff
        }
        PROTO_UDP => l4 + 8,
        _ => {
            return Err(OffloadError::Unsupported {
                what: "L4 protocol is not TCP or UDP (IPv6 extension headers are not supported)",
            })
        }
    };
    if f.len() < hdrs {
        return Err(short("L4 header"));
    }
    Ok(Layout {
        l3,
        l4,
        hdrs,
        v6,
        proto,
    })
}

// ---------------------------------------------------------------------------------------------
// Checksum completion and segmentation (TAP read → underlay)
// ---------------------------------------------------------------------------------------------

/// Completes a partial checksum in place (`VIRTIO_NET_HDR_F_NEEDS_CSUM`): the kernel left the
/// pseudo-header sum in the field at `csum_start + csum_offset`; sum from `csum_start` to the
/// end and store the complement. Does nothing when the flag is not set.
pub fn complete_checksum(hdr: &VirtioNetHdr, frame: &mut [u8]) -> Result<(), OffloadError> {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = hdr.csum_start as usize;
    let at = start + hdr.csum_offset as usize;
    if at + 2 > frame.len() || start > frame.len() {
        return Err(OffloadError::BadHeader {
            what: "csum_start/csum_offset beyond the frame",
        });
    }
    let c = checksum(&frame[start..], 0);
    // As skb_checksum_help: a computed 0 is sent as 0xffff (equivalent, and required for UDP).
    put16(frame, at, if c == 0 { 0xffff } else { c });
    Ok(())
}

/// Where [`segment`] put the segments: segment `i` is the frame at
/// `out[i * stride + headroom ..][..len]`, `len` being `seg_len` for all but the last
/// (`last_len`). With the headroom filled (e.g. by a VXLAN header), `out[..total_len()]` is one
/// UDP GSO send with `segment_size = stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    /// Number of segments (≥ 1).
    pub count: usize,
    /// Distance between segment starts: `headroom + seg_len`.
    pub stride: usize,
    /// Headroom left before each segment.
    pub headroom: usize,
    /// Length of every segment frame but the last.
    pub seg_len: usize,
    /// Length of the last segment frame.
    pub last_len: usize,
}

impl Segments {
    /// Bytes of `out` covered, headroom of the first segment included.
    pub fn total_len(&self) -> usize {
        (self.count - 1) * self.stride + self.headroom + self.last_len
    }

    /// Copies `bytes` (at most `headroom` long) into the headroom in front of every segment,
    /// right before the frame (e.g. the 8-byte VXLAN header, identical for all segments).
    pub fn fill_headroom(&self, out: &mut [u8], bytes: &[u8]) {
        let n = bytes.len().min(self.headroom);
        for i in 0..self.count {
            let end = i * self.stride + self.headroom;
            out[end - n..end].copy_from_slice(&bytes[bytes.len() - n..]);
        }
    }

    /// Byte range in `out` of segment `i`'s frame (without headroom).
    pub fn frame_range(&self, i: usize) -> std::ops::Range<usize> {
        let start = i * self.stride + self.headroom;
        let len = if i + 1 == self.count {
            self.last_len
        } else {
            self.seg_len
        };
        start..start + len
    }
}

/// Output bytes [`segment`] needs for this frame with `headroom` before each segment.
pub fn segmented_len(
    hdr: &VirtioNetHdr,
    frame: &[u8],
    headroom: usize,
) -> Result<usize, OffloadError> {
    if hdr.gso_type & !GSO_ECN == GSO_NONE {
        return Ok(headroom + frame.len());
    }
    let plan = plan(hdr, frame, headroom)?;
    Ok(plan.0.total_len())
}

fn plan(
    hdr: &VirtioNetHdr,
    frame: &[u8],
    headroom: usize,
) -> Result<(Segments, Layout), OffloadError> {
    let gso = hdr.gso_type & !GSO_ECN;
    let lay = parse(frame)?;
    let want = match gso {
        GSO_TCPV4 => (false, PROTO_TCP),
        GSO_TCPV6 => (true, PROTO_TCP),
        GSO_UDP_L4 => (lay.v6, PROTO_UDP),
        GSO_UDP => {
            return Err(OffloadError::Unsupported {
                what: "UFO (GSO_UDP) is not negotiated",
            })
        }
        _ => {
            return Err(OffloadError::BadHeader {
                what: "unknown gso_type",
            })
        }
    };
    if (lay.v6, lay.proto) != want {
        return Err(OffloadError::BadHeader {
            what: "gso_type does not match the IP version / L4 protocol",
        });
    }
    if hdr.flags & F_NEEDS_CSUM != 0 && hdr.csum_start as usize != lay.l4 {
        return Err(OffloadError::BadHeader {
            what: "csum_start is not the L4 header offset",
        });
    }
    let mss = hdr.gso_size as usize;
    if mss == 0 {
        return Err(OffloadError::BadHeader {
            what: "gso_size is 0",
        });
    }
    let payload = frame.len() - lay.hdrs;
    let count = payload.div_ceil(mss).max(1);
    let seg_len = lay.hdrs + mss.min(payload);
    let last_len = lay.hdrs + (payload - (count - 1) * mss);
    let s = Segments {
        count,
        stride: headroom + seg_len,
        headroom,
        seg_len,
        last_len,
    };
    Ok((s, lay))
}

/// Splits a TAP frame announcing GSO (TCPv4, TCPv6, UDP L4) into MSS-sized Ethernet frames in
/// `out`, leaving `headroom` bytes before each; fixes IP length/ID/header checksum, TCP
/// sequence numbers, flags (FIN/PSH on the last segment only, CWR on the first only) and L4
/// checksums. A frame without GSO (of any kind, ARP included) is copied with its partial
/// checksum completed. No allocation.
pub fn segment(
    hdr: &VirtioNetHdr,
    frame: &[u8],
    headroom: usize,
    out: &mut [u8],
) -> Result<Segments, OffloadError> {
    if hdr.gso_type & !GSO_ECN == GSO_NONE {
        // Any frame (ARP, IPv6 with extension headers, ...): copy, finish a partial checksum.
        let len = frame.len();
        let segs = Segments {
            count: 1,
            stride: headroom + len,
            headroom,
            seg_len: len,
            last_len: len,
        };
        if out.len() < headroom + len {
            return Err(OffloadError::OutputTooSmall {
                need: headroom + len,
                have: out.len(),
            });
        }
        let dst = &mut out[headroom..headroom + len];
        dst.copy_from_slice(frame);
        complete_checksum(hdr, dst)?;
        return Ok(segs);
    }
    let (segs, lay) = plan(hdr, frame, headroom)?;
    let need = segs.total_len();
    if out.len() < need {
        return Err(OffloadError::OutputTooSmall {
            need,
            have: out.len(),
        });
    }
    let mss = hdr.gso_size as usize;
    let hl = lay.hdrs;
    let tcp = lay.proto == PROTO_TCP;
    let payload = &frame[hl..];
    let (src, dst) = lay.src_dst(frame);
    let ip_id = if lay.v6 { 0 } else { be16(frame, lay.l3 + 4) };
    let seq0 = if tcp { be32(frame, lay.l4 + 4) } else { 0 };
    let csum_at = lay.l4 + if tcp { 16 } else { 6 };

    // Checksums are assembled from sums computed once here (headers with their per-segment
    // fields zeroed) plus the per-segment values, and the payload sum taken while copying.
    // Re-reading the freshly written segment would stall on store forwarding.
    let mut tmpl = [0u8; 160];
    let th = &mut tmpl[..hl];
    th.copy_from_slice(&frame[..hl]);
    let ip_base = if lay.v6 {
        0
    } else {
        for at in [2, 4, 10] {
            put16(th, lay.l3 + at, 0);
        }
        fold_ne_to_be(sum_ne_generic(&th[lay.l3..lay.l4])) as u64
    };
    let zero_at: &[usize] = if tcp { &[4, 6, 12, 16] } else { &[4, 6] };
    for &at in zero_at {
        put16(th, lay.l4 + at, 0);
    }
    let l4_base = fold_ne_to_be(sum_ne_generic(&th[lay.l4..hl])) as u64
        + pseudo_sum(src, dst, lay.proto, 0) as u64;
    let flags0 = frame[lay.l4 + 13];
    let doff_byte = frame[lay.l4 + 12];

    for i in 0..segs.count {
        let chunk = &payload[i * mss..payload.len().min((i + 1) * mss)];
        let base = i * segs.stride + headroom;
        let seg = &mut out[base..base + hl + chunk.len()];
        seg[..hl].copy_from_slice(&frame[..hl]);
        let payload_sum = fold_ne_to_be(copy_sum_ne(&mut seg[hl..], chunk)) as u64;
        let l4_len = hl - lay.l4 + chunk.len();
        if lay.v6 {
            put16(seg, lay.l3 + 4, l4_len as u16);
        } else {
            let tot = (lay.l4 - lay.l3 + l4_len) as u16;
            let id = ip_id.wrapping_add(i as u16);
            put16(seg, lay.l3 + 2, tot);
            put16(seg, lay.l3 + 4, id);
            put16(seg, lay.l3 + 10, !fold(ip_base + tot as u64 + id as u64));
        }
        // Pseudo-header length (≤ 16 bits for a GSO segment).
        let mut sum = l4_base + payload_sum + l4_len as u64;
        if tcp {
            let seq = seq0.wrapping_add((i * mss) as u32);
            seg[lay.l4 + 4..lay.l4 + 8].copy_from_slice(&seq.to_be_bytes());
            let last = i + 1 == segs.count;
            let mut flags = flags0;
            if !last {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                flags &= !TCP_CWR;
            }
            seg[lay.l4 + 13] = flags;
            sum += (seq >> 16) as u64 + (seq & 0xffff) as u64;
            sum += u16::from_be_bytes([doff_byte, flags]) as u64;
            put16(seg, csum_at, !fold(sum));
        } else {
            put16(seg, lay.l4 + 4, l4_len as u16);
            sum += l4_len as u64;
            let c = !fold(sum);
            put16(seg, csum_at, if c == 0 { 0xffff } else { c });
        }
    }
    Ok(segs)
}

// ---------------------------------------------------------------------------------------------
// Coalescing (underlay → TAP write)
// ---------------------------------------------------------------------------------------------

/// What [`TcpCoalescer::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// The frame started a new super-frame.
    Started,
    /// The frame was appended to the super-frame being built.
    Merged,
    /// The frame does not continue the pending super-frame: [`TcpCoalescer::finish`] (write
    /// the result), then push the frame again.
    Flush,
    /// The frame can never be coalesced (not TCP, SYN/FIN/RST/URG, no payload, IP options or
    /// fragments, bad checksum, too big): finish the pending super-frame first, then write
    /// this frame alone with an all-zero `virtio_net_hdr`.
    Bypass,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    lay: Layout,
    mss: usize,
    next_seq: u32,
    segs: u32,
    /// A segment shorter than the MSS or with PSH was appended: nothing may follow.
    closed: bool,
    psh: bool,
}

/// Largest IP packet a super-frame may become (IPv4 total length / IPv6 payload length field).
const MAX_IP_LEN: usize = 65_535;

/// Coalesces consecutive same-flow TCP segments (plain Ethernet frames, e.g. just decapsulated)
/// into one super-frame with a `virtio_net_hdr` (`GSO_TCPV4/6`, `NEEDS_CSUM`) in a caller
/// buffer, ready for one TAP write. Segments merge when Ethernet/IP/TCP headers match except
/// for lengths, IDs, checksums, sequence number and window, sequence numbers are contiguous,
/// flags are ACK (PSH allowed on the last one), and all but the last carry exactly the MSS of
/// the first. Checksums of incoming segments are verified before merging (the super-frame is
/// handed over as `NEEDS_CSUM`, which the receiving stack trusts). No allocation.
pub struct TcpCoalescer<'b> {
    out: &'b mut [u8],
    len: usize,
    pending: Option<Pending>,
    verify: bool,
}

impl<'b> TcpCoalescer<'b> {
    /// A coalescer writing into `out` (64 KB + headers is enough for any super-frame),
    /// verifying incoming checksums.
    pub fn new(out: &'b mut [u8]) -> Self {
        Self {
            out,
            len: 0,
            pending: None,
            verify: true,
        }
    }

    /// Skips checksum verification (only for segments whose integrity is already known).
    pub fn without_verification(mut self) -> Self {
        self.verify = false;
        self
    }

    /// Whether a super-frame is being built.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Segments merged into the pending super-frame.
    pub fn pending_segments(&self) -> u32 {
        self.pending.map_or(0, |p| p.segs)
    }

    /// Offers one Ethernet frame; see [`Push`] for what the caller must do next.
    pub fn push(&mut self, f: &[u8]) -> Push {
        let Some((lay, flags)) = self.coalescable(f) else {
            return Push::Bypass;
        };
        let payload = f.len() - lay.hdrs;
        let Some(p) = self.pending else {
            if VIRTIO_NET_HDR_LEN + f.len() > self.out.len() {
                return Push::Bypass;
            }
            let dst = &mut self.out[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + f.len()];
            dst[..lay.hdrs].copy_from_slice(&f[..lay.hdrs]);
            let psum = copy_sum_ne(&mut dst[lay.hdrs..], &f[lay.hdrs..]);
            if self.verify && !checksums_valid(f, &lay, psum) {
                return Push::Bypass;
            }
            self.len = VIRTIO_NET_HDR_LEN + f.len();
            let psh = flags & TCP_PSH != 0;
            self.pending = Some(Pending {
                lay,
                mss: payload,
                next_seq: be32(f, lay.l4 + 4).wrapping_add(payload as u32),
                segs: 1,
                closed: psh,
                psh,
            });
            return Push::Started;
        };
        let cur = &self.out[VIRTIO_NET_HDR_LEN..self.len];
        let fits = self.len + payload <= self.out.len()
            && (self.len - VIRTIO_NET_HDR_LEN - lay.l3) + payload <= MAX_IP_LEN;
        if p.closed
            || lay != p.lay
            || payload > p.mss
            || !fits
            || be32(f, lay.l4 + 4) != p.next_seq
            || !same_flow(cur, f, &lay)
        {
            return Push::Flush;
        }
        // Copy and sum in one pass; a bad segment leaves `len` where it was.
        let psum = copy_sum_ne(&mut self.out[self.len..self.len + payload], &f[lay.hdrs..]);
        if self.verify && !checksums_valid(f, &lay, psum) {
            return Push::Bypass;
        }
        self.len += payload;
        // The latest window is the most accurate one.
        let (wa, wb) = (VIRTIO_NET_HDR_LEN + lay.l4 + 14, lay.l4 + 14);
        self.out[wa..wa + 2].copy_from_slice(&f[wb..wb + 2]);
        let psh = flags & TCP_PSH != 0;
        self.pending = Some(Pending {
            next_seq: p.next_seq.wrapping_add(payload as u32),
            segs: p.segs + 1,
            closed: psh || payload < p.mss,
            psh: p.psh || psh,
            ..p
        });
        Push::Merged
    }

    /// Completes the pending super-frame and returns it (`virtio_net_hdr` + frame), or `None`
    /// when nothing is pending. A single segment is returned unchanged with `GSO_NONE`.
    pub fn finish(&mut self) -> Option<&[u8]> {
        let p = self.pending.take()?;
        let len = self.len;
        self.len = 0;
        let (hdr_buf, f) = self.out[..len].split_at_mut(VIRTIO_NET_HDR_LEN);
        if p.segs == 1 {
            VirtioNetHdr::default().encode(hdr_buf);
            return Some(&self.out[..len]);
        }
        let lay = p.lay;
        let l4_len = f.len() - lay.l4;
        if lay.v6 {
            put16(f, lay.l3 + 4, l4_len as u16);
        } else {
            put16(f, lay.l3 + 2, (f.len() - lay.l3) as u16);
            put16(f, lay.l3 + 10, 0);
            let c = checksum(&f[lay.l3..lay.l4], 0);
            put16(f, lay.l3 + 10, c);
        }
        if p.psh {
            f[lay.l4 + 13] |= TCP_PSH;
        }
        // CHECKSUM_PARTIAL convention: the field holds the folded pseudo-header sum.
        let (src, dst) = lay.src_dst(f);
        let ps = checksum_partial(&[], pseudo_sum(src, dst, PROTO_TCP, l4_len));
        put16(f, lay.l4 + 16, ps);
        VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if lay.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: lay.hdrs as u16,
            gso_size: p.mss as u16,
            csum_start: lay.l4 as u16,
            csum_offset: 16,
            num_buffers: 0,
        }
        .encode(hdr_buf);
        Some(&self.out[..len])
    }

    /// Parses `f` and checks everything that does not depend on the pending super-frame.
    fn coalescable(&self, f: &[u8]) -> Option<(Layout, u8)> {
        let lay = parse(f).ok()?;
        if lay.proto != PROTO_TCP || f.len() == lay.hdrs {
            return None;
        }
        if lay.v6 {
            if be16(f, lay.l3 + 4) as usize != f.len() - lay.l4 {
                return None; // padded or truncated
            }
        } else {
            let frag = be16(f, lay.l3 + 6) & 0x3fff;
            if lay.l4 - lay.l3 != 20
                || frag != 0
                || be16(f, lay.l3 + 2) as usize != f.len() - lay.l3
            {
                return None;
            }
        }
        let flags = f[lay.l4 + 13];
        if flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG) != 0 || flags & TCP_ACK == 0 {
            return None;
        }
        Some((lay, flags))
    }
}

/// Whether the IPv4 header checksum and the TCP checksum of `f` are valid, given the native
/// sum of its payload (taken while copying it).
#[inline]
fn checksums_valid(f: &[u8], lay: &Layout, payload_sum_ne: u64) -> bool {
    if !lay.v6 && checksum(&f[lay.l3..lay.l4], 0) != 0 {
        return false;
    }
    let (src, dst) = lay.src_dst(f);
    let l4_len = f.len() - lay.l4;
    let sum = fold_ne_to_be(sum_ne_generic(&f[lay.l4..lay.hdrs])) as u64
        + fold_ne_to_be(payload_sum_ne) as u64
        + pseudo_sum(src, dst, PROTO_TCP, l4_len) as u64;
    fold(sum) == 0xffff
}

/// Whether `f` has the same Ethernet, IP and TCP headers as the pending super-frame `cur`,
/// ignoring lengths, IPv4 ID and checksums, TCP sequence number, PSH, window and checksum.
fn same_flow(cur: &[u8], f: &[u8], lay: &Layout) -> bool {
    let (l3, l4, hl) = (lay.l3, lay.l4, lay.hdrs);
    if cur[..l3] != f[..l3] {
        return false;
    }
    let ip_same = if lay.v6 {
        cur[l3..l3 + 4] == f[l3..l3 + 4] && cur[l3 + 6..l3 + 40] == f[l3 + 6..l3 + 40]
    } else {
        cur[l3..l3 + 2] == f[l3..l3 + 2]
            && cur[l3 + 6..l3 + 10] == f[l3 + 6..l3 + 10]
            && cur[l3 + 12..l3 + 20] == f[l3 + 12..l3 + 20]
    };
    ip_same
        && cur[l4..l4 + 4] == f[l4..l4 + 4] // ports
        && cur[l4 + 8..l4 + 12] == f[l4 + 8..l4 + 12] // ack
        && cur[l4 + 12] == f[l4 + 12] // data offset
        && (cur[l4 + 13] | TCP_PSH) == (f[l4 + 13] | TCP_PSH)
        && cur[l4 + 18..hl] == f[l4 + 18..hl] // urgent pointer and options
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference RFC 1071 checksum, byte pair by byte pair.
    fn reference(data: &[u8], init: u32) -> u16 {
        let mut s = init as u64;
        for c in data.chunks(2) {
            s += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64;
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn checksum_matches_reference() {
        let mut x = 0x1234_5678u32;
        for len in (0..200).chain([1499, 1500, 9000, 65_535]) {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            for init in [0, 1, 0xffff, 0x1_2345] {
                assert_eq!(
                    checksum(&data, init),
                    reference(&data, init),
                    "len {len} init {init}"
                );
            }
        }
        // All-ones data: the sum is 0xffff and the checksum 0.
        assert_eq!(checksum(&[0xff; 64], 0), 0);
    }

    #[test]
    fn simd_and_portable_sums_agree() {
        for len in [0usize, 1, 31, 32, 127, 128, 129, 1448, 9001] {
            let data: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
            let a = fold(sum_ne(&data));
            assert_eq!(a, fold(sum_ne_generic(&data)), "len {len}");
            let mut dst = vec![0u8; len];
            assert_eq!(fold(copy_sum_ne(&mut dst, &data)), a);
            assert_eq!(dst, data);
        }
    }

    #[test]
    fn vnet_hdr_roundtrip() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 74,
            gso_size: 1428,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 0,
        };
        let mut b = [0u8; 12];
        h.encode(&mut b);
        assert_eq!(VirtioNetHdr::decode(&b), Some(h));
        assert_eq!(VirtioNetHdr::decode(&b[..11]), None);
    }

    #[test]
    fn fill_headroom_targets_each_segment() {
        let s = Segments {
            count: 3,
            stride: 10,
            headroom: 4,
            seg_len: 6,
            last_len: 2,
        };
        let mut out = vec![0u8; s.total_len()];
        s.fill_headroom(&mut out, &[1, 2, 3, 4]);
        assert_eq!(&out[..4], &[1, 2, 3, 4]);
        assert_eq!(&out[10..14], &[1, 2, 3, 4]);
        assert_eq!(&out[20..24], &[1, 2, 3, 4]);
        assert_eq!(s.frame_range(2), 24..26);
    }
}
