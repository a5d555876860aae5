//! Underlay sockets on 127.0.0.1: batches, GSO sends, GRO receives, source-port selection.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fabric::io::underlay::{RecvMeta, SourcePorts, Transmit, Underlay, UnderlayConfig, BATCH_MAX};

fn cfg(gso: bool, gro: bool, ports: SourcePorts) -> UnderlayConfig {
    UnderlayConfig {
        gso,
        gro,
        source_ports: ports,
        read_timeout: Some(Duration::from_millis(200)),
        ..UnderlayConfig::new("127.0.0.1:0".parse().unwrap())
    }
}

/// A datagram payload whose bytes encode (sequence number, position), so reordering, mixing or
/// truncation is visible.
fn payload(seq: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as usize * 31 + i * 7) as u8)
        .collect()
}

/// Receives until `want` datagrams (after splitting by stride) arrived or 3 s passed.
fn recv_datagrams(u: &Underlay, want: usize) -> Vec<(SocketAddr, usize, Vec<u8>)> {
    let mut storage = vec![[0u8; 65_536]; 8];
    let mut meta = [RecvMeta::default(); 8];
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while out.len() < want && Instant::now() < deadline {
        let mut bufs: Vec<IoSliceMut<'_>> = storage
            .iter_mut()
            .map(|b| IoSliceMut::new(&mut b[..]))
            .collect();
        let n = u.recv(&mut bufs, &mut meta).unwrap();
        drop(bufs);
        for (m, buf) in meta[..n].iter().zip(&storage) {
            assert!(m.stride > 0 && m.stride <= m.len, "{m:?}");
            for chunk in buf[..m.len].chunks(m.stride) {
                out.push((m.src, m.stride, chunk.to_vec()));
            }
        }
    }
    out
}

#[test]
fn batch_send_recv_more_than_one_batch() {
    let rx = Underlay::bind(&cfg(false, false, SourcePorts::Bound)).unwrap();
    let tx = Underlay::bind(&cfg(false, false, SourcePorts::Bound)).unwrap();
    let count = BATCH_MAX * 2 + 5;
    let datas: Vec<Vec<u8>> = (0..count as u32)
        .map(|i| payload(i, 100 + i as usize))
        .collect();
    let ts: Vec<Transmit<'_>> = datas
        .iter()
        .map(|d| Transmit {
            dst: rx.local_addr(),
            segment_size: None,
            contents: d,
            flow_hash: 0,
        })
        .collect();
    tx.send(&ts).unwrap();
    let got = recv_datagrams(&rx, count);
    assert_eq!(got.len(), count);
    for (i, (src, _, data)) in got.iter().enumerate() {
        assert_eq!(
            *src,
            tx.local_addr(),
            "Bound source ports send from the listening socket"
        );
        assert_eq!(data, &datas[i], "datagram {i} differs");
    }
}

#[test]
fn gso_send_arrives_as_segments_without_gro() {
    let rx = Underlay::bind(&cfg(false, false, SourcePorts::Bound)).unwrap();
    let tx = Underlay::bind(&cfg(true, false, SourcePorts::Ephemeral(2))).unwrap();
    assert!(
        tx.gso_enabled(),
        "this kernel should have UDP_SEGMENT (>= 4.18)"
    );
    // 20 segments of 1200 B plus a short last one of 333 B.
    let seg = 1200;
    let data = payload(9, seg * 20 + 333);
    let t = Transmit {
        dst: rx.local_addr(),
        segment_size: Some(seg),
        contents: &data,
        flow_hash: 0xdead_beef,
    };
    tx.send(&[t]).unwrap();
    let got = recv_datagrams(&rx, 21);
    assert_eq!(got.len(), 21);
    let mut joined = Vec::new();
    for (i, (src, stride, d)) in got.iter().enumerate() {
        assert_eq!(*stride, d.len(), "no GRO: one datagram per slot");
        assert_eq!(d.len(), if i < 20 { seg } else { 333 });
        assert_eq!(src.port(), tx.source_port_for(0xdead_beef));
        joined.extend_from_slice(d);
    }
    assert_eq!(joined, data);
}

#[test]
fn gso_send_received_with_gro_stride() {
    let rx = Underlay::bind(&cfg(false, true, SourcePorts::Bound)).unwrap();
    assert!(
        rx.gro_enabled(),
        "this kernel should have UDP_GRO (>= 5.12)"
    );
    let tx = Underlay::bind(&cfg(true, false, SourcePorts::Bound)).unwrap();
    let seg = 1400;
    let data = payload(3, seg * 30 + 10);
    let t = Transmit {
        dst: rx.local_addr(),
        segment_size: Some(seg),
        contents: &data,
        flow_hash: 1,
    };
    tx.send(&[t]).unwrap();
    let mut storage = vec![0u8; 65_536];
    let mut meta = [RecvMeta::default(); 1];
    let n = rx
        .recv(&mut [IoSliceMut::new(&mut storage)], &mut meta)
        .unwrap();
    assert_eq!(n, 1);
    // Loopback keeps the GSO skb whole for a UDP_GRO socket: one slot, stride = segment size.
    assert_eq!(meta[0].stride, seg, "{:?}", meta[0]);
    assert_eq!(meta[0].len, data.len());
    assert_eq!(&storage[..meta[0].len], &data[..]);
}

#[test]
fn gso_transmit_larger_than_64k_is_split() {
    let rx = Underlay::bind(&cfg(false, false, SourcePorts::Bound)).unwrap();
    let tx = Underlay::bind(&cfg(true, false, SourcePorts::Bound)).unwrap();
    // 100 segments of 1000 B: over 64 KB and over 64 segments, so it needs two GSO entries.
    let data = payload(5, 100 * 1000);
    let t = Transmit {
        dst: rx.local_addr(),
        segment_size: Some(1000),
        contents: &data,
        flow_hash: 0,
    };
    tx.send(&[t]).unwrap();
    let got = recv_datagrams(&rx, 100);
    assert_eq!(got.len(), 100);
    let joined: Vec<u8> = got.iter().flat_map(|g| g.2.iter().copied()).collect();
    assert_eq!(joined, data);
}

#[test]
fn source_port_follows_flow_hash() {
    let rx = Underlay::bind(&cfg(false, false, SourcePorts::Bound)).unwrap();
    let tx = Underlay::bind(&cfg(true, false, SourcePorts::Ephemeral(8))).unwrap();
    assert_eq!(tx.source_ports().len(), 8);
    let hashes: Vec<u32> = (0..64u32).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
    let datas: Vec<Vec<u8>> = (0..64u32).map(|i| payload(i, 64)).collect();
    let ts: Vec<Transmit<'_>> = hashes
        .iter()
        .zip(&datas)
        .map(|(&h, d)| Transmit {
            dst: rx.local_addr(),
            segment_size: None,
            contents: d,
            flow_hash: h,
        })
        .collect();
    tx.send(&ts).unwrap();
    let got = recv_datagrams(&rx, 64);
    assert_eq!(got.len(), 64);
    let mut seen_ports = std::collections::HashSet::new();
    for (src, _, d) in &got {
        let i = datas.iter().position(|x| x == d).expect("unknown datagram");
        assert_eq!(src.port(), tx.source_port_for(hashes[i]), "datagram {i}");
        seen_ports.insert(src.port());
    }
    assert!(
        seen_ports.len() >= 6,
        "64 flows should use most of the 8 ports: {seen_ports:?}"
    );
}

#[test]
fn explicit_source_port_range_and_reuseport() {
    let rx = Underlay::bind(&cfg(false, false, SourcePorts::Bound)).unwrap();
    // Find a free range by trying a few bases in the high dynamic range.
    let mut made = None;
    for base in (50_000u16..60_000).step_by(997) {
        let c = UnderlayConfig {
            reuse_port: true,
            ..cfg(
                true,
                false,
                SourcePorts::Range {
                    first: base,
                    count: 4,
                },
            )
        };
        if let Ok(u) = Underlay::bind(&c) {
            made = Some((base, c, u));
            break;
        }
    }
    let (base, c, tx) = made.expect("no free 4-port range");
    assert_eq!(tx.source_ports(), &[base, base + 1, base + 2, base + 3]);
    // With SO_REUSEPORT a second worker can bind the same listening address and ports.
    let c2 = UnderlayConfig {
        bind: tx.local_addr(),
        ..c
    };
    let tx2 = Underlay::bind(&c2).expect("reuseport bind of the same address");
    let d = payload(1, 10);
    tx2.send(&[Transmit {
        dst: rx.local_addr(),
        segment_size: None,
        contents: &d,
        flow_hash: u32::MAX,
    }])
    .unwrap();
    let got = recv_datagrams(&rx, 1);
    assert_eq!(got[0].0.port(), base + 3);
}

#[test]
fn recv_times_out_with_zero() {
    let rx = Underlay::bind(&cfg(false, true, SourcePorts::Bound)).unwrap();
    let mut b = [0u8; 2048];
    let mut meta = [RecvMeta::default(); 1];
    let t = Instant::now();
    assert_eq!(
        rx.recv(&mut [IoSliceMut::new(&mut b)], &mut meta).unwrap(),
        0
    );
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[test]
fn wrong_family_destination_is_an_error() {
    let tx = Underlay::bind(&cfg(true, false, SourcePorts::Bound)).unwrap();
    let d = [0u8; 8];
    let ok = Transmit {
        dst: "127.0.0.1:9".parse().unwrap(),
        segment_size: None,
        contents: &d,
        flow_hash: 0,
    };
    let bad = Transmit {
        dst: "[::1]:9".parse().unwrap(),
        ..ok
    };
    match tx.send(&[ok, bad]) {
        Err(fabric::io::underlay::UnderlayError::Send { sent, .. }) => assert_eq!(sent, 1),
        other => panic!("expected Send error after 1 transmit, got {other:?}"),
    }
}

#[test]
fn segmented_transmit_without_gso_goes_out_datagram_by_datagram() {
    let rx = Underlay::bind(&cfg(false, false, SourcePorts::Bound)).unwrap();
    let tx = Underlay::bind(&cfg(false, false, SourcePorts::Bound)).unwrap();
    assert!(!tx.gso_enabled());
    // 70 segments: more than BATCH_MAX entries for one transmit.
    let data = payload(2, 70 * 500 + 1);
    let t = Transmit {
        dst: rx.local_addr(),
        segment_size: Some(500),
        contents: &data,
        flow_hash: 0,
    };
    tx.send(&[t]).unwrap();
    let got = recv_datagrams(&rx, 71);
    assert_eq!(got.len(), 71);
    assert!(got[..70].iter().all(|g| g.2.len() == 500));
    let joined: Vec<u8> = got.iter().flat_map(|g| g.2.iter().copied()).collect();
    assert_eq!(joined, data);
}

#[test]
fn ipv6_gso_and_gro() {
    let c = |gso, gro| UnderlayConfig {
        gso,
        gro,
        source_ports: SourcePorts::Ephemeral(2),
        read_timeout: Some(Duration::from_millis(500)),
        ..UnderlayConfig::new("[::1]:0".parse().unwrap())
    };
    let rx = Underlay::bind(&c(false, true)).unwrap();
    let tx = Underlay::bind(&c(true, false)).unwrap();
    let data = payload(4, 10 * 1200 + 1);
    tx.send(&[Transmit {
        dst: rx.local_addr(),
        segment_size: Some(1200),
        contents: &data,
        flow_hash: 7,
    }])
    .unwrap();
    let got = recv_datagrams(&rx, 11);
    assert_eq!(got.len(), 11);
    assert!(got.iter().all(|g| g.1 == 1200 && g.0.is_ipv6()));
    assert_eq!(got[0].0.port(), tx.source_port_for(7));
    let joined: Vec<u8> = got.iter().flat_map(|g| g.2.iter().copied()).collect();
    assert_eq!(joined, data);
}

#[test]
fn too_small_slot_is_flagged_truncated() {
    let rx = Underlay::bind(&cfg(false, false, SourcePorts::Bound)).unwrap();
    let tx = Underlay::bind(&cfg(false, false, SourcePorts::Bound)).unwrap();
    let d = payload(1, 3000);
    tx.send(&[Transmit {
        dst: rx.local_addr(),
        segment_size: None,
        contents: &d,
        flow_hash: 0,
    }])
    .unwrap();
    let mut small = [0u8; 1000];
    let mut meta = [RecvMeta::default(); 1];
    assert_eq!(
        rx.recv(&mut [IoSliceMut::new(&mut small)], &mut meta)
            .unwrap(),
        1
    );
    assert!(meta[0].truncated, "{:?}", meta[0]);
    assert_eq!(meta[0].len, 1000);
}

#[test]
fn large_socket_buffers() {
    let u = Underlay::bind(&cfg(true, true, SourcePorts::Bound)).unwrap();
    let (rcv, snd) = u.buffer_sizes().unwrap();
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if root {
        // *BUFFORCE ignores net.core.rmem_max; the kernel reports double the request.
        assert!(
            rcv >= fabric::io::underlay::DEFAULT_BUFFER_BYTES,
            "SO_RCVBUF {rcv}"
        );
        assert!(
            snd >= fabric::io::underlay::DEFAULT_BUFFER_BYTES,
            "SO_SNDBUF {snd}"
        );
    } else {
        assert!(rcv > 0 && snd > 0);
    }
}
