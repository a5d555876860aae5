//! Property tests for userspace segmentation and coalescing, checked against etherparse.

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};
use fabric::io::offload::{
    complete_checksum, segment, segmented_len, Push, TcpCoalescer, VirtioNetHdr, F_NEEDS_CSUM,
    GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VIRTIO_NET_HDR_LEN,
};
use proptest::prelude::*;

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
const V4_A: [u8; 4] = [10, 0, 0, 1];
const V4_B: [u8; 4] = [10, 0, 0, 2];
const V6_A: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const V6_B: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

#[derive(Debug, Clone)]
struct Super {
    v6: bool,
    udp: bool,
    payload: Vec<u8>,
    mss: u16,
    seq: u32,
    psh: bool,
    fin: bool,
    timestamps: bool,
}

/// Builds a super-frame the way the kernel hands it over on a TAP read: headers of the first
/// segment, the whole payload, and the L4 checksum field holding only the pseudo-header sum.
fn build(s: &Super) -> (VirtioNetHdr, Vec<u8>) {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let ip = if s.v6 {
        eth.ipv6(V6_A, V6_B, 64)
    } else {
        eth.ipv4(V4_A, V4_B, 64)
    };
    let mut out = Vec::new();
    let (l4, csum_off) = if s.v6 {
        (54usize, 0u16)
    } else {
        (34usize, 0u16)
    };
    let _ = csum_off;
    if s.udp {
        ip.udp(40000, 4789).write(&mut out, &s.payload).unwrap();
    } else {
        let mut t = ip.tcp(40000, 80, s.seq, 4000).ack(77);
        if s.psh {
            t = t.psh();
        }
        if s.fin {
            t = t.fin();
        }
        if s.timestamps {
            t = t
                .options(&[
                    TcpOptionElement::Noop,
                    TcpOptionElement::Noop,
                    TcpOptionElement::Timestamp(7, 9),
                ])
                .unwrap();
        }
        t.write(&mut out, &s.payload).unwrap();
    }
    let csum_at = l4 + if s.udp { 6 } else { 16 };
    // Replace the full checksum by the pseudo-header sum (CHECKSUM_PARTIAL).
    let l4_len = out.len() - l4;
    let mut sum: u32 = if s.v6 {
        V6_A.chunks(2)
            .chain(V6_B.chunks(2))
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum()
    } else {
        V4_A.chunks(2)
            .chain(V4_B.chunks(2))
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum()
    };
    sum += if s.udp { 17 } else { 6 };
    sum += l4_len as u32;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    out[csum_at..csum_at + 2].copy_from_slice(&(sum as u16).to_be_bytes());
    let gso_type = match (s.udp, s.v6) {
        (true, _) => GSO_UDP_L4,
        (false, false) => GSO_TCPV4,
        (false, true) => GSO_TCPV6,
    };
    let hdr = VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: 0,
        gso_size: s.mss,
        csum_start: l4 as u16,
        csum_offset: if s.udp { 6 } else { 16 },
        num_buffers: 0,
    };
    (hdr, out)
}

/// Checks one emitted segment with etherparse; returns (seq, payload, fin, psh, ip_id).
fn check_segment(seg: &[u8], s: &Super) -> (u32, Vec<u8>, bool, bool, u16) {
    let p = SlicedPacket::from_ethernet(seg).expect("segment parses");
    let (ip_id, src4, dst4, src6, dst6) = match p.net.as_ref().expect("has IP") {
        NetSlice::Ipv4(v4) => {
            let h = v4.header().to_header();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "IPv4 header checksum"
            );
            assert_eq!(h.total_len as usize, seg.len() - 14, "IPv4 total length");
            (h.identification, h.source, h.destination, [0; 16], [0; 16])
        }
        NetSlice::Ipv6(v6) => {
            let h = v6.header();
            assert_eq!(
                h.payload_length() as usize,
                seg.len() - 54,
                "IPv6 payload length"
            );
            (0, [0; 4], [0; 4], h.source(), h.destination())
        }
    };
    match p.transport.expect("has L4") {
        TransportSlice::Tcp(t) => {
            let want = if s.v6 {
                t.calc_checksum_ipv6(src6, dst6)
            } else {
                t.calc_checksum_ipv4(src4, dst4)
            };
            assert_eq!(t.checksum(), want.unwrap(), "TCP checksum");
            assert!(
                t.payload().len() <= s.mss as usize,
                "segment larger than MSS"
            );
            (
                t.sequence_number(),
                t.payload().to_vec(),
                t.fin(),
                t.psh(),
                ip_id,
            )
        }
        TransportSlice::Udp(u) => {
            let h = u.to_header();
            let want = if s.v6 {
                h.calc_checksum_ipv6_raw(src6, dst6, u.payload())
            } else {
                h.calc_checksum_ipv4_raw(src4, dst4, u.payload())
            };
            assert_eq!(u.checksum(), want.unwrap(), "UDP checksum");
            assert_eq!(h.length as usize, 8 + u.payload().len(), "UDP length");
            assert!(
                u.payload().len() <= s.mss as usize,
                "datagram larger than MSS"
            );
            (0, u.payload().to_vec(), false, false, ip_id)
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

fn supers() -> impl Strategy<Value = Super> {
    (
        any::<bool>(),
        prop::bool::weighted(0.2),
        1usize..=64_000,
        200u16..=9000,
        any::<u32>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(|(v6, udp, len, mss, seq, psh, fin, ts, fill)| Super {
            v6,
            udp,
            payload: (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(fill))
                .collect(),
            mss,
            seq,
            psh,
            fin,
            timestamps: ts,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn segment_then_reassemble(s in supers(), headroom in 0usize..=16) {
        let (hdr, frame) = build(&s);
        let need = segmented_len(&hdr, &frame, headroom).unwrap();
        let mut out = vec![0xeeu8; need];
        let segs = segment(&hdr, &frame, headroom, &mut out).unwrap();
        prop_assert_eq!(segs.total_len(), need);
        prop_assert_eq!(segs.count, s.payload.len().div_ceil(s.mss as usize));
        let mut joined = Vec::new();
        let mut next_seq = s.seq;
        for i in 0..segs.count {
            let r = segs.frame_range(i);
            if i + 1 < segs.count {
                prop_assert_eq!(r.len(), segs.seg_len);
                prop_assert_eq!(r.start, i * segs.stride + headroom);
            }
            // Headroom is untouched.
            prop_assert!(out[r.start - headroom..r.start].iter().all(|&b| b == 0xee));
            let (seq, payload, fin, psh, ip_id) = check_segment(&out[r], &s);
            let last = i + 1 == segs.count;
            if !s.udp {
                prop_assert_eq!(seq, next_seq);
                prop_assert_eq!(fin, s.fin && last, "FIN only on the last segment");
                prop_assert_eq!(psh, s.psh && last, "PSH only on the last segment");
                if !last {
                    prop_assert_eq!(payload.len(), s.mss as usize);
                }
            }
            if !s.v6 {
                prop_assert_eq!(ip_id, i as u16, "IPv4 ID increments per segment (builder starts at 0)");
            }
            next_seq = next_seq.wrapping_add(payload.len() as u32);
            joined.extend_from_slice(&payload);
        }
        prop_assert_eq!(joined, s.payload);
    }

    #[test]
    fn coalesce_inverts_segment(mut s in supers()) {
        s.udp = false;
        s.fin = false;
        let (hdr, frame) = build(&s);
        let mut segbuf = vec![0u8; segmented_len(&hdr, &frame, 0).unwrap()];
        let segs = segment(&hdr, &frame, 0, &mut segbuf).unwrap();
        let mut outbuf = vec![0u8; 70_000];
        let mut c = TcpCoalescer::new(&mut outbuf);
        for i in 0..segs.count {
            let want = if i == 0 { Push::Started } else { Push::Merged };
            prop_assert_eq!(c.push(&segbuf[segs.frame_range(i)]), want, "segment {}", i);
        }
        prop_assert_eq!(c.pending_segments() as usize, segs.count);
        let sup = c.finish().unwrap().to_vec();
        let h2 = VirtioNetHdr::decode(&sup).unwrap();
        let f2 = &sup[VIRTIO_NET_HDR_LEN..];
        if segs.count == 1 {
            prop_assert_eq!(h2, VirtioNetHdr::default());
            prop_assert_eq!(f2, &segbuf[segs.frame_range(0)]);
        } else {
            prop_assert_eq!(h2.gso_type, if s.v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            prop_assert_eq!(h2.gso_size, s.mss);
            prop_assert_eq!(h2.flags, F_NEEDS_CSUM);
            // Re-segmenting the coalesced frame yields byte-identical segments.
            let mut again = vec![0u8; segmented_len(&h2, f2, 0).unwrap()];
            let segs2 = segment(&h2, f2, 0, &mut again).unwrap();
            prop_assert_eq!(segs2, segs);
            prop_assert!(again == segbuf[..segs.total_len()], "re-segmented bytes differ");
            // The partial checksum is what the kernel expects: completing it gives a valid one.
            let mut whole = f2.to_vec();
            complete_checksum(&h2, &mut whole).unwrap();
            let p = SlicedPacket::from_ethernet(&whole).unwrap();
            if let Some(TransportSlice::Tcp(t)) = p.transport {
                let want = if s.v6 { t.calc_checksum_ipv6(V6_A, V6_B) } else { t.calc_checksum_ipv4(V4_A, V4_B) };
                prop_assert_eq!(t.checksum(), want.unwrap());
                prop_assert_eq!(t.payload(), &s.payload[..]);
            } else {
                prop_assert!(false, "not TCP");
            }
        }
    }
}

fn tcp_segment(seq: u32, payload: &[u8], psh: bool) -> Vec<u8> {
    let mut t = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(V4_A, V4_B, 64)
        .tcp(1, 2, seq, 1000)
        .ack(5);
    if psh {
        t = t.psh();
    }
    let mut v = Vec::new();
    t.write(&mut v, payload).unwrap();
    v
}

#[test]
fn coalescer_flush_and_bypass_rules() {
    let mut buf = vec![0u8; 70_000];
    let mut c = TcpCoalescer::new(&mut buf);
    let p = [7u8; 100];
    assert_eq!(c.push(&tcp_segment(1000, &p, false)), Push::Started);
    assert_eq!(c.push(&tcp_segment(1100, &p, false)), Push::Merged);
    // A gap in sequence numbers ends the super-frame.
    assert_eq!(c.push(&tcp_segment(1300, &p, false)), Push::Flush);
    // A larger segment than the MSS too.
    assert_eq!(c.push(&tcp_segment(1200, &[1u8; 101], false)), Push::Flush);
    // A shorter one is accepted but closes it.
    assert_eq!(c.push(&tcp_segment(1200, &[1u8; 50], true)), Push::Merged);
    assert_eq!(c.push(&tcp_segment(1250, &p, false)), Push::Flush);
    let f = c.finish().unwrap();
    let h = VirtioNetHdr::decode(f).unwrap();
    assert_eq!(
        (h.gso_type, h.gso_size, h.csum_start, h.csum_offset),
        (GSO_TCPV4, 100, 34, 16)
    );
    let frame = &f[VIRTIO_NET_HDR_LEN..];
    assert_eq!(frame.len(), 54 + 250);
    assert_eq!(
        frame[34 + 13] & 0x08,
        0x08,
        "PSH of the last segment is kept"
    );
    assert!(!c.is_pending());
    assert!(c.finish().is_none());

    // SYN, zero payload, UDP, bad checksum: never coalesced.
    let mut syn = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(V4_A, V4_B, 64)
        .tcp(1, 2, 0, 1000)
        .syn()
        .write(&mut syn, &[])
        .unwrap();
    assert_eq!(c.push(&syn), Push::Bypass);
    assert_eq!(c.push(&tcp_segment(5, &[], false)), Push::Bypass);
    let mut udp = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(V4_A, V4_B, 64)
        .udp(1, 2)
        .write(&mut udp, &p)
        .unwrap();
    assert_eq!(c.push(&udp), Push::Bypass);
    let mut bad = tcp_segment(1, &p, false);
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    assert_eq!(
        c.push(&bad),
        Push::Bypass,
        "corrupted payload must not be coalesced"
    );
    assert_eq!(c.push(&[0u8; 10]), Push::Bypass);

    // A different flow (other ports) flushes.
    assert_eq!(c.push(&tcp_segment(1, &p, false)), Push::Started);
    let mut other = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(V4_A, V4_B, 64)
        .tcp(9, 2, 101, 1000)
        .ack(5)
        .write(&mut other, &p)
        .unwrap();
    assert_eq!(c.push(&other), Push::Flush);
    // A single pending segment comes back unchanged with GSO_NONE.
    let single = c.finish().unwrap();
    assert_eq!(VirtioNetHdr::decode(single).unwrap().gso_type, GSO_NONE);
    assert_eq!(
        &single[VIRTIO_NET_HDR_LEN..],
        &tcp_segment(1, &p, false)[..]
    );
}

#[test]
fn coalesced_super_frame_stays_below_64k() {
    let mut buf = vec![0u8; 200_000];
    let mut c = TcpCoalescer::new(&mut buf);
    let p = [3u8; 1400];
    let mut seq = 0u32;
    let mut merged = 0;
    loop {
        match c.push(&tcp_segment(seq, &p, false)) {
            Push::Started | Push::Merged => merged += 1,
            Push::Flush => break,
            Push::Bypass => panic!("bypass"),
        }
        seq += 1400;
    }
    assert_eq!(merged, (65_535 - 40) / 1400);
    let f = c.finish().unwrap();
    assert!(f.len() - VIRTIO_NET_HDR_LEN - 14 <= 65_535);
}

#[test]
fn complete_checksum_of_plain_frames() {
    let s = Super {
        v6: false,
        udp: true,
        payload: vec![1, 2, 3, 4, 5],
        mss: 1400,
        seq: 0,
        psh: false,
        fin: false,
        timestamps: false,
    };
    let (mut hdr, mut frame) = build(&s);
    hdr.gso_type = GSO_NONE;
    complete_checksum(&hdr, &mut frame).unwrap();
    check_segment(&frame, &s);
    // Copying path of segment() does the same with headroom.
    let (hdr, frame) = build(&Super {
        v6: true,
        udp: false,
        ..s.clone()
    });
    let hdr = VirtioNetHdr {
        gso_type: GSO_NONE,
        ..hdr
    };
    let mut out = vec![0u8; 8 + frame.len()];
    let segs = segment(&hdr, &frame, 8, &mut out).unwrap();
    assert_eq!(segs.count, 1);
    check_segment(
        &out[8..],
        &Super {
            v6: true,
            udp: false,
            ..s
        },
    );
    // A header pointing outside the frame is rejected, not a panic.
    let bad = VirtioNetHdr {
        csum_start: 60_000,
        ..hdr
    };
    let mut f = frame.clone();
    assert!(complete_checksum(&bad, &mut f).is_err());
}

#[test]
fn malformed_gso_frames_are_errors() {
    let s = Super {
        v6: false,
        udp: false,
        payload: vec![9; 5000],
        mss: 1000,
        seq: 1,
        psh: false,
        fin: false,
        timestamps: false,
    };
    let (hdr, frame) = build(&s);
    let mut out = vec![0u8; 10_000];
    for bad in [
        VirtioNetHdr { gso_size: 0, ..hdr },
        VirtioNetHdr {
            gso_type: GSO_TCPV6,
            ..hdr
        },
        VirtioNetHdr {
            csum_start: 14,
            ..hdr
        },
        VirtioNetHdr { gso_type: 3, ..hdr },
        VirtioNetHdr { gso_type: 9, ..hdr },
    ] {
        assert!(segment(&bad, &frame, 0, &mut out).is_err(), "{bad:?}");
    }
    assert!(segment(&hdr, &frame[..40], 0, &mut out).is_err());
    let mut small = vec![0u8; 100];
    assert!(matches!(
        segment(&hdr, &frame, 0, &mut small),
        Err(fabric::io::offload::OffloadError::OutputTooSmall { .. })
    ));
}

proptest! {
    #[test]
    fn segment_never_panics_on_garbage(hdr in any::<[u8; 12]>(), frame in prop::collection::vec(any::<u8>(), 0..3000)) {
        let hdr = VirtioNetHdr::decode(&hdr).unwrap();
        let mut out = vec![0u8; 70_000];
        let _ = segment(&hdr, &frame, 4, &mut out);
        let mut f = frame.clone();
        let _ = complete_checksum(&hdr, &mut f);
        let mut c = TcpCoalescer::new(&mut out);
        let _ = c.push(&frame);
        let _ = c.push(&frame);
        let _ = c.finish();
    }
}

#[test]
fn non_ip_frames_pass_through_segment() {
    // An ARP request: no IP header at all; segment() must copy it untouched.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&V4_A);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&V4_B);
    let hdr = VirtioNetHdr::default();
    assert_eq!(segmented_len(&hdr, &arp, 8).unwrap(), 8 + arp.len());
    let mut out = vec![0u8; 100];
    let s = segment(&hdr, &arp, 8, &mut out).unwrap();
    assert_eq!((s.count, s.total_len()), (1, 8 + arp.len()));
    assert_eq!(&out[s.frame_range(0)], &arp[..]);
}
