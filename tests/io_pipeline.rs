//! The whole io layer as the dataplane will use it, minus the core: two containers (namespaces
//! with TAP vnics) joined by a VXLAN "wire" over loopback UDP. Each host thread waits on its TAP
//! and underlay with `poll::Poller`; TAP → `offload::segment` → VXLAN header in the headroom →
//! one GSO `Underlay::send`; `Underlay::recv` (GRO) → strip VXLAN → `offload::TcpCoalescer` →
//! TAP write. A TCP transfer between the containers must arrive intact.
//!
//! Needs root; skips with a reason otherwise, except under CI=true.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fabric::dataplane::provision::{create_vnic, VnicProvision};
use fabric::io::netlink::NetnsGuard;
use fabric::io::offload::{self, Push, TcpCoalescer, VirtioNetHdr, VIRTIO_NET_HDR_LEN};
use fabric::io::poll::{Events, Interest, Poller, Waker};
use fabric::io::tap::{Tap, MAX_FRAME};
use fabric::io::underlay::{RecvMeta, SourcePorts, Transmit, Underlay, UnderlayConfig};
use fabric::io::IfName;

#[path = "util/root.rs"]
mod root;
use root::root_or_skip;

const VNI: u32 = 4242;
const BYTES: usize = 32 << 20;

#[derive(Default)]
struct Counters {
    tap_reads: AtomicU64,
    gso_reads: AtomicU64,
    transmits: AtomicU64,
    datagrams_in: AtomicU64,
    tap_writes: AtomicU64,
    coalesced: AtomicU64,
}

/// One host's hot loop: both directions on one thread, driven by epoll.
fn host(
    tap: &Tap,
    udp: &Underlay,
    peer: SocketAddr,
    stop: &AtomicBool,
    waker: &Waker,
    c: &Counters,
) {
    const TAP: u64 = 1;
    const UDP: u64 = 2;
    const WAKE: u64 = 3;
    let poller = Poller::new().unwrap();
    poller
        .add(tap.as_fd_borrowed(), TAP, Interest::Read)
        .unwrap();
    poller
        .add(std::os::fd::AsFd::as_fd(udp), UDP, Interest::Read)
        .unwrap();
    poller
        .add(std::os::fd::AsFd::as_fd(waker), WAKE, Interest::Read)
        .unwrap();
    let mut events = Events::with_capacity(8);
    let mut rd = vec![0u8; MAX_FRAME];
    let mut segs = vec![0u8; 128 * 1024];
    let mut slots = vec![[0u8; 65_536]; 8];
    let mut meta = [RecvMeta::default(); 8];
    let mut sup = vec![0u8; 70_000];
    let mut vx = [0u8; 8];
    vx[0] = 0x08;
    vx[4..7].copy_from_slice(&VNI.to_be_bytes()[1..]);
    while !stop.load(Ordering::Relaxed) {
        poller
            .wait(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for ev in events.iter() {
            match ev.token {
                TAP => {
                    // Drain the TAP: each read may be a 64 KB super-frame.
                    for _ in 0..64 {
                        let Some(n) = tap.read(&mut rd).unwrap() else {
                            break;
                        };
                        c.tap_reads.fetch_add(1, Ordering::Relaxed);
                        let Some(hdr) = VirtioNetHdr::decode(&rd[..n]) else {
                            continue;
                        };
                        if hdr.gso_type != offload::GSO_NONE {
                            c.gso_reads.fetch_add(1, Ordering::Relaxed);
                        }
                        let frame = &rd[VIRTIO_NET_HDR_LEN..n];
                        let Ok(s) = offload::segment(&hdr, frame, vx.len(), &mut segs) else {
                            continue;
                        };
                        s.fill_headroom(&mut segs, &vx);
                        udp.send(&[Transmit {
                            dst: peer,
                            segment_size: Some(s.stride),
                            contents: &segs[..s.total_len()],
                            flow_hash: fabric::core::flow_hash(frame),
                        }])
                        .unwrap();
                        c.transmits.fetch_add(1, Ordering::Relaxed);
                    }
                }
                UDP => {
                    let mut bufs: Vec<IoSliceMut<'_>> =
                        slots.iter_mut().map(|s| IoSliceMut::new(s)).collect();
                    let got = udp.recv(&mut bufs, &mut meta).unwrap();
                    drop(bufs);
                    let mut co = TcpCoalescer::new(&mut sup);
                    let write = |f: &[u8]| {
                        tap.write(f).unwrap();
                        c.tap_writes.fetch_add(1, Ordering::Relaxed);
                    };
                    for (m, slot) in meta[..got].iter().zip(&slots) {
                        for d in slot[..m.len].chunks(m.stride) {
                            c.datagrams_in.fetch_add(1, Ordering::Relaxed);
                            if d.len() < 8 + 14 || d[..8] != vx {
                                continue;
                            }
                            let inner = &d[8..];
                            loop {
                                match co.push(inner) {
                                    Push::Started | Push::Merged => break,
                                    Push::Flush => {
                                        if let Some(f) = co.finish() {
                                            if VirtioNetHdr::decode(f).unwrap().gso_type != 0 {
                                                c.coalesced.fetch_add(1, Ordering::Relaxed);
                                            }
                                            write(f);
                                        }
                                    }
                                    Push::Bypass => {
                                        if let Some(f) = co.finish() {
                                            write(f);
                                        }
                                        let zero = [0u8; VIRTIO_NET_HDR_LEN];
                                        tap.write_vectored(&[
                                            IoSlice::new(&zero),
                                            IoSlice::new(inner),
                                        ])
                                        .unwrap();
                                        c.tap_writes.fetch_add(1, Ordering::Relaxed);
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    if let Some(f) = co.finish() {
                        if VirtioNetHdr::decode(f).unwrap().gso_type != 0 {
                            c.coalesced.fetch_add(1, Ordering::Relaxed);
                        }
                        write(f);
                    }
                }
                _ => waker.reset(),
            }
        }
    }
}

trait BorrowFd {
    fn as_fd_borrowed(&self) -> std::os::fd::BorrowedFd<'_>;
}
impl BorrowFd for Tap {
    fn as_fd_borrowed(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

#[test]
fn tcp_between_two_containers_over_a_vxlan_wire() {
    if !root_or_skip("tcp_between_two_containers_over_a_vxlan_wire") {
        return;
    }
    let pid = std::process::id();
    let ns_a = NetnsGuard::create(&format!("fabio-{pid}-pa")).unwrap();
    let ns_b = NetnsGuard::create(&format!("fabio-{pid}-pb")).unwrap();
    let vnic = |i: u8| VnicProvision {
        name: IfName::new("eth0").unwrap(),
        mac: [0x02, 0x77, 0, 0, 0, i],
        addr: Ipv4Addr::new(10, 77, 0, i).into(),
        prefix_len: 24,
        mtu: 1450,
        gateway: None,
        txqueuelen: 5000,
        queues: 1,
    };
    let tap_a = create_vnic(&ns_a, &vnic(1)).unwrap().remove(0);
    let tap_b = create_vnic(&ns_b, &vnic(2)).unwrap().remove(0);
    let ucfg = UnderlayConfig {
        source_ports: SourcePorts::Ephemeral(4),
        read_timeout: Some(Duration::from_millis(50)),
        ..UnderlayConfig::new("127.0.0.1:0".parse().unwrap())
    };
    let udp_a = Underlay::bind(&ucfg).unwrap();
    let udp_b = Underlay::bind(&ucfg).unwrap();
    let stop = AtomicBool::new(false);
    let (waker_a, waker_b) = (Waker::new().unwrap(), Waker::new().unwrap());
    let (ca, cb) = (Counters::default(), Counters::default());

    let listener = ns_b
        .run(|| TcpListener::bind("10.77.0.2:5001").unwrap())
        .unwrap();
    /// Stops the host threads when the test body ends, also by panic, so the scope can join.
    struct Stopper<'a>(&'a AtomicBool, [&'a Waker; 2]);
    impl Drop for Stopper<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
            for w in self.1 {
                let _ = w.wake();
            }
        }
    }
    listener.set_nonblocking(true).unwrap();
    std::thread::scope(|s| {
        let _stopper = Stopper(&stop, [&waker_a, &waker_b]);
        s.spawn(|| host(&tap_a, &udp_a, udp_b.local_addr(), &stop, &waker_a, &ca));
        s.spawn(|| host(&tap_b, &udp_b, udp_a.local_addr(), &stop, &waker_b, &cb));
        let server = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut conn = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut buf = vec![0u8; 256 * 1024];
            let (mut total, mut sum) = (0usize, 0u64);
            loop {
                let n = conn.read(&mut buf).expect("server read");
                if n == 0 {
                    break;
                }
                for (i, &b) in buf[..n].iter().enumerate() {
                    sum = sum
                        .wrapping_mul(31)
                        .wrapping_add(b as u64 ^ ((total + i) as u64 & 0xff));
                }
                total += n;
            }
            conn.write_all(b"done").unwrap();
            (total, sum)
        });
        let t0 = Instant::now();
        let expect = ns_a
            .run(|| {
                let mut c = TcpStream::connect_timeout(
                    &"10.77.0.2:5001".parse().unwrap(),
                    Duration::from_secs(10),
                )
                .expect("connect across the VXLAN wire");
                c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 13 % 256) as u8).collect();
                let mut sum = 0u64;
                for k in 0..BYTES / chunk.len() {
                    c.write_all(&chunk).expect("client write");
                    for (i, &b) in chunk.iter().enumerate() {
                        let pos = k * chunk.len() + i;
                        sum = sum
                            .wrapping_mul(31)
                            .wrapping_add(b as u64 ^ (pos as u64 & 0xff));
                    }
                }
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut done = [0u8; 4];
                c.read_exact(&mut done).expect("server's reply");
                assert_eq!(&done, b"done");
                sum
            })
            .unwrap();
        let elapsed = t0.elapsed();
        let (total, sum) = server.join().unwrap();
        assert_eq!(total, BYTES);
        assert_eq!(sum, expect, "content differs");
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        eprintln!(
            "{} MB in {:.2?} ({:.2} Gbit/s, {} build); A: {} TAP reads ({} GSO), {} transmits; B: {} datagrams in, {} TAP writes ({} coalesced)",
            BYTES >> 20,
            elapsed,
            BYTES as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
            if cfg!(debug_assertions) { "debug" } else { "release" },
            r(&ca.tap_reads),
            r(&ca.gso_reads),
            r(&ca.transmits),
            r(&cb.datagrams_in),
            r(&cb.tap_writes),
            r(&cb.coalesced)
        );
        assert!(
            r(&ca.gso_reads) > 0,
            "expected TSO super-frames from container A"
        );
        assert!(
            r(&cb.coalesced) > 0,
            "expected coalesced super-frames into container B"
        );
    });
}
