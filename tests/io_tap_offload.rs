//! The offload path against the real kernel: a TCP connection from a container namespace to a
//! peer played in userspace on the other side of the container's TAP.
//!
//! - container → peer: the kernel hands over TSO super-frames (vnet_hdr GSO_TCPV4 with a
//!   partial checksum); `offload::segment` cuts them and every segment is checked with
//!   etherparse before its payload is accepted.
//! - peer → container: MSS-sized segments are merged by `offload::TcpCoalescer` and written as
//!   GSO super-frames; the container's socket must read exactly the bytes sent.
//!
//! Needs root; skips with a reason otherwise, except under CI=true.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};
use fabric::dataplane::provision::{create_vnic, VnicProvision};
use fabric::io::netlink::NetnsGuard;
use fabric::io::offload::{
    complete_checksum, segment, segmented_len, Push, TcpCoalescer, VirtioNetHdr, GSO_NONE,
    GSO_TCPV4, VIRTIO_NET_HDR_LEN,
};
use fabric::io::tap::{Offloads, Tap, MAX_FRAME};
use fabric::io::IfName;

#[path = "util/root.rs"]
mod root;
use root::root_or_skip;

const CONTAINER_MAC: [u8; 6] = [0x02, 0xc0, 0, 0, 0, 2];
const PEER_MAC: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 1];
const CONTAINER_IP: [u8; 4] = [10, 253, 0, 2];
const PEER_IP: [u8; 4] = [10, 253, 0, 1];
const PEER_PORT: u16 = 5000;
const MSS: usize = 1460;
const UP_BYTES: usize = 1 << 20; // container → peer
const DOWN_BYTES: usize = 300_000; // peer → container

fn up_byte(i: usize) -> u8 {
    (i % 251) as u8
}

fn down_byte(i: usize) -> u8 {
    (i % 241) as u8 ^ 0x5a
}

/// Writes `frame` (plain Ethernet) to the TAP behind an all-zero vnet header.
fn write_plain(tap: &Tap, frame: &[u8]) {
    let hdr = [0u8; VIRTIO_NET_HDR_LEN];
    let n = tap
        .write_vectored(&[std::io::IoSlice::new(&hdr), std::io::IoSlice::new(frame)])
        .unwrap()
        .expect("TAP write would block");
    assert_eq!(n, hdr.len() + frame.len());
}

/// Answers an ARP request from the container for the peer's address.
fn answer_arp(tap: &Tap, req: &[u8]) {
    assert_eq!(&req[38..42], &PEER_IP, "ARP for an unexpected address");
    let mut reply = req[..42].to_vec();
    reply[..6].copy_from_slice(&CONTAINER_MAC);
    reply[6..12].copy_from_slice(&PEER_MAC);
    reply[20..22].copy_from_slice(&[0, 2]);
    reply[22..28].copy_from_slice(&PEER_MAC);
    reply[28..32].copy_from_slice(&PEER_IP);
    reply[32..38].copy_from_slice(&CONTAINER_MAC);
    reply[38..42].copy_from_slice(&CONTAINER_IP);
    write_plain(tap, &reply);
}

fn tcp_frame(
    seq: u32,
    ack: u32,
    cport: u16,
    payload: &[u8],
    syn: bool,
    opts: &[TcpOptionElement],
) -> Vec<u8> {
    let mut t = PacketBuilder::ethernet2(PEER_MAC, CONTAINER_MAC)
        .ipv4(PEER_IP, CONTAINER_IP, 64)
        .tcp(PEER_PORT, cport, seq, 65_535)
        .ack(ack);
    if syn {
        t = t.syn();
    }
    if !opts.is_empty() {
        t = t.options(opts).unwrap();
    }
    let mut v = Vec::new();
    t.write(&mut v, payload).unwrap();
    v
}

/// Peer-side TCP state.
struct Peer {
    cport: u16,
    /// Next byte expected from the container (cumulative ACK we send).
    rcv_nxt: u32,
    /// Our next sequence number.
    snd_nxt: u32,
    /// Highest ACK the container sent us.
    snd_una: u32,
    established: bool,
    received: Vec<u8>,
    tso_reads: usize,
    max_segments_per_read: usize,
}

#[test]
fn tcp_through_tap_with_tso_segmentation_and_gro_coalescing() {
    if !root_or_skip("tcp_through_tap_with_tso_segmentation_and_gro_coalescing") {
        return;
    }
    let ns = NetnsGuard::create(&format!("fabio-{}-tso", std::process::id())).unwrap();
    let spec = VnicProvision {
        name: IfName::new("eth0").unwrap(),
        mac: CONTAINER_MAC,
        addr: Ipv4Addr::from(CONTAINER_IP).into(),
        prefix_len: 24,
        mtu: 1500,
        gateway: None,
        txqueuelen: 1000,
        queues: 1,
    };
    let tap = create_vnic(&ns, &spec).unwrap().remove(0);
    assert!(
        tap.offloads().contains(Offloads::TSO4 | Offloads::CSUM),
        "{:?}",
        tap.offloads()
    );

    std::thread::scope(|s| {
        let client = s.spawn(|| {
            ns.run(|| -> Result<Vec<u8>, String> {
                let mut c = TcpStream::connect_timeout(
                    &(Ipv4Addr::from(PEER_IP), PEER_PORT).into(),
                    Duration::from_secs(10),
                )
                .map_err(|e| format!("connect: {e}"))?;
                c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                c.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
                let up: Vec<u8> = (0..UP_BYTES).map(up_byte).collect();
                c.write_all(&up).map_err(|e| format!("write: {e}"))?;
                let mut down = vec![0u8; DOWN_BYTES];
                c.read_exact(&mut down).map_err(|e| format!("read: {e}"))?;
                Ok(down)
            })
            .unwrap()
        });

        let mut peer = Peer {
            cport: 0,
            rcv_nxt: 0,
            snd_nxt: 0x1000_0000,
            snd_una: 0x1000_0000,
            established: false,
            received: Vec::with_capacity(UP_BYTES),
            tso_reads: 0,
            max_segments_per_read: 0,
        };
        let mut buf = vec![0u8; MAX_FRAME];
        let mut segbuf = vec![0u8; 128 * 1024];
        let mut cobuf = vec![0u8; 70_000];
        let mut down_sent = 0usize;
        let mut coalesced_writes = 0usize;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                Instant::now() < deadline,
                "timed out: received {} of {UP_BYTES}",
                peer.received.len()
            );
            if client.is_finished() {
                break;
            }
            // Phase 2: once everything arrived, send the download within the container's window.
            if peer.received.len() == UP_BYTES && down_sent < DOWN_BYTES {
                let in_flight = peer.snd_nxt.wrapping_sub(peer.snd_una) as usize;
                if in_flight < 32 * 1024 {
                    let n = (DOWN_BYTES - down_sent).min(40 * MSS);
                    let mut co = TcpCoalescer::new(&mut cobuf);
                    let mut off = 0;
                    while off < n {
                        let len = MSS.min(n - off);
                        let payload: Vec<u8> = (down_sent + off..down_sent + off + len)
                            .map(down_byte)
                            .collect();
                        let f = tcp_frame(
                            peer.snd_nxt.wrapping_add(off as u32),
                            peer.rcv_nxt,
                            peer.cport,
                            &payload,
                            false,
                            &[],
                        );
                        match co.push(&f) {
                            Push::Started | Push::Merged => {}
                            Push::Flush => {
                                let sup = co.finish().unwrap();
                                tap.write(sup).unwrap().unwrap();
                                coalesced_writes += 1;
                                assert_ne!(co.push(&f), Push::Flush);
                            }
                            Push::Bypass => panic!("data segment bypassed the coalescer"),
                        }
                        off += len;
                    }
                    let sup = co.finish().unwrap();
                    let h = VirtioNetHdr::decode(sup).unwrap();
                    if h.gso_type == GSO_TCPV4 {
                        coalesced_writes += 1;
                    }
                    tap.write(sup).unwrap().unwrap();
                    peer.snd_nxt = peer.snd_nxt.wrapping_add(n as u32);
                    down_sent += n;
                }
            }
            let Some(n) = tap.read(&mut buf).unwrap() else {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            };
            let hdr = VirtioNetHdr::decode(&buf[..n]).unwrap();
            let frame = &mut buf[VIRTIO_NET_HDR_LEN..n];
            if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] {
                // ARP request for the peer: answer it.
                assert_eq!(&frame[38..42], &PEER_IP);
                answer_arp(&tap, frame);
                continue;
            }
            if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
                continue; // IPv6 ND, MLD and the like
            }
            // Cut super-frames into segments; complete partial checksums of single frames.
            let segs = if hdr.gso_type == GSO_NONE {
                complete_checksum(&hdr, frame).unwrap();
                let len = frame.len();
                segbuf[..len].copy_from_slice(frame);
                #[allow(clippy::single_range_in_vec_init)]
                let one = vec![0..len];
                one
            } else {
                assert_eq!(hdr.gso_type, GSO_TCPV4);
                let need = segmented_len(&hdr, frame, 0).unwrap();
                let sg = segment(&hdr, frame, 0, &mut segbuf[..need]).unwrap();
                peer.tso_reads += 1;
                peer.max_segments_per_read = peer.max_segments_per_read.max(sg.count);
                (0..sg.count).map(|i| sg.frame_range(i)).collect()
            };
            for r in segs {
                handle_segment(&tap, &mut peer, &segbuf[r]);
            }
        }
        let down = client.join().unwrap().expect("client side failed");
        assert!(
            down.iter().enumerate().all(|(i, &b)| b == down_byte(i)),
            "download corrupted"
        );
        assert_eq!(peer.received.len(), UP_BYTES);
        assert!(
            peer.received
                .iter()
                .enumerate()
                .all(|(i, &b)| b == up_byte(i)),
            "upload corrupted"
        );
        assert!(
            peer.tso_reads > 0,
            "the kernel never handed over a TSO super-frame"
        );
        assert!(peer.max_segments_per_read > 1);
        assert!(coalesced_writes > 0, "no GSO super-frame was written");
        eprintln!(
            "TSO reads: {}, max segments per read: {}, coalesced writes: {coalesced_writes}",
            peer.tso_reads, peer.max_segments_per_read
        );
    });
}

/// Validates one segment from the container with etherparse and plays the peer's TCP.
fn handle_segment(tap: &Tap, peer: &mut Peer, seg: &[u8]) {
    let p = SlicedPacket::from_ethernet(seg).expect("segment parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4")
    };
    let ih = ip.header().to_header();
    assert_eq!(
        ih.header_checksum,
        ih.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!("not TCP")
    };
    assert_eq!(
        t.checksum(),
        t.calc_checksum_ipv4(ih.source, ih.destination).unwrap(),
        "TCP checksum"
    );
    assert!(t.payload().len() <= MSS, "segment above MSS");
    if t.syn() {
        peer.cport = t.source_port();
        peer.rcv_nxt = t.sequence_number().wrapping_add(1);
        let synack = tcp_frame(
            peer.snd_nxt,
            peer.rcv_nxt,
            peer.cport,
            &[],
            true,
            &[TcpOptionElement::MaximumSegmentSize(MSS as u16)],
        );
        write_plain(tap, &synack);
        peer.snd_nxt = peer.snd_nxt.wrapping_add(1);
        peer.snd_una = peer.snd_nxt;
        return;
    }
    if t.ack() {
        let a = t.acknowledgment_number();
        if a.wrapping_sub(peer.snd_una) as i32 > 0 {
            peer.snd_una = a;
        }
        peer.established = true;
    }
    if !t.payload().is_empty() && t.sequence_number() == peer.rcv_nxt {
        peer.received.extend_from_slice(t.payload());
        peer.rcv_nxt = peer.rcv_nxt.wrapping_add(t.payload().len() as u32);
    }
    if !t.payload().is_empty() || t.fin() {
        if t.fin() && t.sequence_number().wrapping_add(t.payload().len() as u32) == peer.rcv_nxt {
            peer.rcv_nxt = peer.rcv_nxt.wrapping_add(1);
        }
        let ack = tcp_frame(peer.snd_nxt, peer.rcv_nxt, peer.cport, &[], false, &[]);
        write_plain(tap, &ack);
    }
}

/// UDP GSO from the container arrives as a USO super-frame (when the kernel has USO on TAP),
/// is cut into valid datagrams, and a USO super-frame written by us reaches the container's
/// socket as datagrams of the announced size.
#[test]
fn udp_through_tap_with_uso_segmentation() {
    use fabric::io::offload::{F_NEEDS_CSUM, GSO_UDP_L4};
    use fabric::io::underlay::{RecvMeta, SourcePorts, Transmit, Underlay, UnderlayConfig};

    if !root_or_skip("udp_through_tap_with_uso_segmentation") {
        return;
    }
    let ns = NetnsGuard::create(&format!("fabio-{}-uso", std::process::id())).unwrap();
    let spec = VnicProvision {
        name: IfName::new("eth0").unwrap(),
        mac: CONTAINER_MAC,
        addr: Ipv4Addr::from(CONTAINER_IP).into(),
        prefix_len: 24,
        mtu: 1500,
        gateway: None,
        txqueuelen: 1000,
        queues: 1,
    };
    let tap = create_vnic(&ns, &spec).unwrap().remove(0);
    let uso = tap.offloads().contains(Offloads::USO4);
    const SEG: usize = 1000;
    const UP: usize = 20 * SEG + 77;
    const DOWN_SEGS: usize = 15;

    let sock = ns
        .run(|| {
            Underlay::bind(&UnderlayConfig {
                source_ports: SourcePorts::Bound,
                read_timeout: Some(Duration::from_secs(10)),
                ..UnderlayConfig::new((Ipv4Addr::from(CONTAINER_IP), 7000).into())
            })
            .unwrap()
        })
        .unwrap();
    let up: Vec<u8> = (0..UP).map(up_byte).collect();
    sock.send(&[Transmit {
        dst: (Ipv4Addr::from(PEER_IP), 9999).into(),
        segment_size: Some(SEG),
        contents: &up,
        flow_hash: 0,
    }])
    .unwrap();

    let mut buf = vec![0u8; MAX_FRAME];
    let mut segbuf = vec![0u8; 128 * 1024];
    let mut got = Vec::new();
    let mut uso_reads = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < UP {
        assert!(
            Instant::now() < deadline,
            "timed out with {} of {UP} bytes",
            got.len()
        );
        let Some(n) = tap.read(&mut buf).unwrap() else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        let hdr = VirtioNetHdr::decode(&buf[..n]).unwrap();
        let frame = &mut buf[VIRTIO_NET_HDR_LEN..n];
        if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] {
            answer_arp(&tap, frame);
            continue;
        }
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
            continue;
        }
        let need = segmented_len(&hdr, frame, 0).unwrap();
        let sg = segment(&hdr, frame, 0, &mut segbuf[..need]).unwrap();
        if hdr.gso_type == GSO_UDP_L4 {
            uso_reads += 1;
            assert!(sg.count > 1);
        }
        for i in 0..sg.count {
            let p = SlicedPacket::from_ethernet(&segbuf[sg.frame_range(i)]).unwrap();
            let Some(NetSlice::Ipv4(ip)) = &p.net else {
                panic!("not IPv4")
            };
            let ih = ip.header().to_header();
            assert_eq!(ih.header_checksum, ih.calc_header_checksum());
            let Some(TransportSlice::Udp(u)) = &p.transport else {
                panic!("not UDP")
            };
            let want = u
                .to_header()
                .calc_checksum_ipv4_raw(ih.source, ih.destination, u.payload())
                .unwrap();
            assert_eq!(u.checksum(), want, "UDP checksum of datagram {i}");
            assert!(u.payload().len() <= SEG);
            got.extend_from_slice(u.payload());
        }
    }
    assert_eq!(got, up);
    eprintln!(
        "TAP offloads {:?}, USO super-frames read: {uso_reads}",
        tap.offloads()
    );
    if uso {
        assert!(
            uso_reads > 0,
            "TAP has USO4 but the kernel never handed over a UDP super-frame"
        );
    }

    // Peer → container: one USO super-frame with a partial checksum.
    let down: Vec<u8> = (0..DOWN_SEGS * SEG).map(down_byte).collect();
    let mut f = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, CONTAINER_MAC)
        .ipv4(PEER_IP, CONTAINER_IP, 64)
        .udp(9999, 7000)
        .write(&mut f, &down)
        .unwrap();
    // Pseudo-header sum in the checksum field, as NEEDS_CSUM requires.
    let mut ps: u32 = [10u32 * 256 + 253, 1, 10 * 256 + 253, 2]
        .iter()
        .sum::<u32>()
        + 17
        + (f.len() - 34) as u32;
    while ps > 0xffff {
        ps = (ps & 0xffff) + (ps >> 16);
    }
    f[40..42].copy_from_slice(&(ps as u16).to_be_bytes());
    let mut frame = vec![0u8; VIRTIO_NET_HDR_LEN];
    VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: 42,
        gso_size: SEG as u16,
        csum_start: 34,
        csum_offset: 6,
        num_buffers: 0,
    }
    .encode(&mut frame);
    frame.extend_from_slice(&f);
    tap.write(&frame).unwrap().unwrap();
    let mut rx = vec![0u8; 65_536];
    let mut meta = [RecvMeta::default(); 1];
    let mut received = Vec::new();
    let mut datagrams = 0;
    while received.len() < down.len() {
        let n = sock
            .recv(&mut [std::io::IoSliceMut::new(&mut rx)], &mut meta)
            .unwrap();
        assert_eq!(n, 1, "container socket got nothing");
        assert_eq!(meta[0].stride, SEG, "datagrams keep the gso_size");
        datagrams += meta[0].len.div_ceil(meta[0].stride);
        received.extend_from_slice(&rx[..meta[0].len]);
    }
    assert_eq!(received, down);
    assert_eq!(datagrams, DOWN_SEGS);
}

/// A UDP GSO send through a device without checksum offload: older kernels fail it with EIO
/// (the underlay then switches GSO off and resends datagram by datagram); current ones segment
/// and checksum in software. Either way every datagram must arrive intact.
#[test]
fn underlay_gso_through_device_without_checksum_offload_delivers() {
    use fabric::io::netlink::Netlink;
    use fabric::io::tap::TapConfig;
    use fabric::io::underlay::{SourcePorts, Transmit, Underlay, UnderlayConfig};

    if !root_or_skip("underlay_gso_through_device_without_checksum_offload_delivers") {
        return;
    }
    let ns = NetnsGuard::create(&format!("fabio-{}-eio", std::process::id())).unwrap();
    // A TAP without TUN_F_CSUM has no checksum offload: the kernel refuses UDP GSO through it.
    let name = IfName::new(&format!("fabe{}", std::process::id() % 100_000)).unwrap();
    let tap = Tap::open(&TapConfig {
        name,
        offloads: Offloads::NONE,
    })
    .unwrap();
    tap.set_mac(CONTAINER_MAC).unwrap();
    Netlink::open()
        .unwrap()
        .move_link(tap.ifindex().unwrap(), &ns)
        .unwrap();
    let mut nl = Netlink::open_in(&ns).unwrap();
    let idx = nl.link_by_name(name.as_str()).unwrap().index;
    nl.add_address(idx, Ipv4Addr::from(CONTAINER_IP).into(), 24)
        .unwrap();
    nl.set_up(idx, true).unwrap();

    let sock = ns
        .run(|| {
            Underlay::bind(&UnderlayConfig {
                source_ports: SourcePorts::Bound,
                ..UnderlayConfig::new((Ipv4Addr::from(CONTAINER_IP), 7001).into())
            })
            .unwrap()
        })
        .unwrap();
    assert!(
        sock.gso_enabled(),
        "GSO is probed per socket, not per route"
    );
    const SEG: usize = 700;
    let data: Vec<u8> = (0..5 * SEG + 9).map(up_byte).collect();
    sock.send(&[Transmit {
        dst: (Ipv4Addr::from(PEER_IP), 9999).into(),
        segment_size: Some(SEG),
        contents: &data,
        flow_hash: 0,
    }])
    .expect("GSO send (or its fallback) must not fail");
    eprintln!(
        "GSO still enabled after sending through a device without csum offload: {}",
        sock.gso_enabled()
    );

    let mut buf = vec![0u8; MAX_FRAME];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < data.len() {
        assert!(
            Instant::now() < deadline,
            "timed out with {} of {} bytes",
            got.len(),
            data.len()
        );
        let Some(n) = tap.read(&mut buf).unwrap() else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        let hdr = VirtioNetHdr::decode(&buf[..n]).unwrap();
        assert_eq!(hdr.gso_type, GSO_NONE, "no offloads were negotiated");
        let frame = &buf[VIRTIO_NET_HDR_LEN..n];
        if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] {
            answer_arp(&tap, frame);
            continue;
        }
        if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
            continue;
        }
        let p = SlicedPacket::from_ethernet(frame).unwrap();
        let Some(TransportSlice::Udp(u)) = &p.transport else {
            panic!("not UDP")
        };
        assert!(u.payload().len() <= SEG);
        got.extend_from_slice(u.payload());
    }
    assert_eq!(got, data);
}
