//! The overlay across several "hosts" made of network namespaces: Portolan (SQLite) in an
//! underlay bridge namespace, one `fabric dataplane` per host, containers as namespaces with
//! TAP vnics (see `util/netns.rs`). Needs root; without it each test prints why and skips,
//! except under CI=true, where it fails. Every test removes its namespaces, devices, processes
//! and files when it ends, also when it fails, and checks that nothing is left.

#[path = "util/netns.rs"]
mod netns;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netns::{
    drops, root_or_skip, rss_kib, tcp_transfer, teardown, udp_echo_server, udp_probe, udp_socket,
    Topo,
};

const MB: u64 = 1024 * 1024;

#[test]
fn ping_and_tcp_100mb_across_hosts() {
    if !root_or_skip("ping_and_tcp_100mb_across_hosts") {
        return;
    }
    let mut t = Topo::new(3);
    let c1 = t.add_container(0, 4001, "10.70.0.1/24", "02:00:0a:46:00:01");
    let c2 = t.add_container(1, 4001, "10.70.0.2/24", "02:00:0a:46:00:02");
    let c3 = t.add_container(2, 4001, "10.70.0.3/24", "02:00:0a:46:00:03");

    t.ping(&c1, c2.ip, 3).unwrap_or_else(|e| panic!("{e}"));
    t.ping(&c2, c1.ip, 3).unwrap_or_else(|e| panic!("{e}"));
    t.ping(&c3, c1.ip, 3).unwrap_or_else(|e| panic!("{e}"));

    let r = tcp_transfer(&c1, &c2, 5001, 100 * MB).unwrap_or_else(|e| panic!("c1 -> c2: {e}"));
    eprintln!(
        "tcp c1 -> c2: {} MB in {:.2?} ({:.0} Mbit/s)",
        r.bytes / MB,
        r.elapsed,
        r.mbps()
    );
    let r = tcp_transfer(&c3, &c1, 5002, 100 * MB).unwrap_or_else(|e| panic!("c3 -> c1: {e}"));
    eprintln!(
        "tcp c3 -> c1: {} MB in {:.2?} ({:.0} Mbit/s)",
        r.bytes / MB,
        r.elapsed,
        r.mbps()
    );

    // The bytes crossed the underlay: host 1 encapsulated at least 100 MB for c1's flow.
    let s1 = t.stats(0);
    let v1 = s1.vnics.iter().find(|v| v.netns == c1.ns).expect("c1 vnic");
    assert!(
        v1.counters.rx_bytes >= 100 * MB,
        "host 1 counted only {} bytes from c1: {:?}",
        v1.counters.rx_bytes,
        v1.counters
    );
    assert!(
        v1.counters.to_underlay > 0 && v1.counters.to_vnic > 0,
        "c1 counters {:?}",
        v1.counters
    );
    teardown(t);
}

#[test]
fn tenants_with_identical_addresses_are_isolated() {
    if !root_or_skip("tenants_with_identical_addresses_are_isolated") {
        return;
    }
    let mut t = Topo::new(3);
    let (va, vb) = (4101, 4102);
    let a1 = t.add_container(0, va, "10.71.0.1/24", "02:00:0a:47:00:01");
    let a2 = t.add_container(1, va, "10.71.0.2/24", "02:00:0a:47:00:02");
    let b1 = t.add_container(0, vb, "10.71.0.1/24", "02:00:0a:47:00:01");
    let b2 = t.add_container(1, vb, "10.71.0.2/24", "02:00:0a:47:00:02");
    // Only tenant B has a .3.
    let b3 = t.add_container(2, vb, "10.71.0.3/24", "02:00:0a:47:00:03");

    t.ping(&a1, a2.ip, 2)
        .unwrap_or_else(|e| panic!("tenant A: {e}"));
    t.ping(&b1, b2.ip, 2)
        .unwrap_or_else(|e| panic!("tenant B: {e}"));
    t.ping(&b1, b3.ip, 2)
        .unwrap_or_else(|e| panic!("tenant B: {e}"));

    // Same destination IP and MAC in both tenants: each receiver sees only its own tenant.
    let ra = udp_socket(&a2, 7000);
    let rb = udp_socket(&b2, 7000);
    let sa = udp_socket(&a1, 0);
    let sb = udp_socket(&b1, 0);
    let dst = SocketAddr::from((a2.ip, 7000));
    for i in 0..100u32 {
        sa.send_to(format!("A{i}").as_bytes(), dst).expect("send A");
        sb.send_to(format!("B{i}").as_bytes(), dst).expect("send B");
        std::thread::sleep(Duration::from_millis(2));
    }
    let collect = |s: &UdpSocket| {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(n) = s.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got
    };
    let (got_a, got_b) = (collect(&ra), collect(&rb));
    let foreign_a: Vec<_> = got_a.iter().filter(|m| !m.starts_with('A')).collect();
    let foreign_b: Vec<_> = got_b.iter().filter(|m| !m.starts_with('B')).collect();
    assert!(
        foreign_a.is_empty(),
        "tenant A's .2 received tenant B datagrams: {foreign_a:?}"
    );
    assert!(
        foreign_b.is_empty(),
        "tenant B's .2 received tenant A datagrams: {foreign_b:?}"
    );
    assert!(
        got_a.len() >= 90,
        "tenant A's .2 got only {} of 100",
        got_a.len()
    );
    assert!(
        got_b.len() >= 90,
        "tenant B's .2 got only {} of 100",
        got_b.len()
    );

    // Tenant A cannot reach B's .3: the VL3 lookup on A's VNI finds nothing.
    let before = t.stats(0);
    let b3_before = t.stats(2);
    assert!(
        t.ping(&a1, b3.ip, 2).is_err(),
        "tenant A reached tenant B's 10.71.0.3"
    );
    let after = t.stats(0);
    assert!(
        after.resolver.not_found > before.resolver.not_found,
        "host 1 resolver.not_found did not grow: before {:?} after {:?}",
        before.resolver,
        after.resolver
    );
    let dropped = |s: &fabric::dataplane::control::Stats| {
        drops(&s.global, "lookup_not_found") + drops(&s.global, "negative_cached")
    };
    assert!(
        dropped(&after) > dropped(&before),
        "host 1 did not count the unanswerable ARP as lookup_not_found/negative_cached: {:?}",
        after.global.drops
    );
    let b3_after = t.stats(2);
    let b3c = |s: &fabric::dataplane::control::Stats| {
        s.vnics
            .iter()
            .find(|v| v.netns == b3.ns)
            .expect("b3 vnic")
            .counters
            .to_vnic
    };
    assert_eq!(
        b3c(&b3_after),
        b3c(&b3_before),
        "something from tenant A was delivered to tenant B's .3"
    );

    // Forged VXLAN from the underlay: an unknown VNI, and A's VNI with a MAC only B has.
    let h2 = netns::Container {
        ns: t.hosts[1].ns.clone(),
        ip: t.hosts[1].ip,
        prefix_len: 24,
        mac: String::new(),
        vni: 0,
        host: 1,
    };
    let forger = udp_socket(&h2, 0);
    let h1 = SocketAddr::from((t.hosts[0].ip, 4789));
    let vxlan = |vni: u32, dst_mac: [u8; 6]| {
        let mut p = vec![0x08, 0, 0, 0];
        p.extend_from_slice(&(vni << 8).to_be_bytes());
        p.extend_from_slice(&dst_mac);
        p.extend_from_slice(&[0x02, 0, 0x0a, 0x47, 0, 0x02, 0x08, 0x00]);
        p.extend_from_slice(&[0u8; 46]);
        p
    };
    let before = t.stats(0);
    for _ in 0..5 {
        forger
            .send_to(&vxlan(4103, [2, 0, 0x0a, 0x47, 0, 1]), h1)
            .unwrap();
        forger
            .send_to(&vxlan(va, [2, 0, 0x0a, 0x47, 0, 3]), h1)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = t.stats(0);
    let d = |s: &fabric::dataplane::control::Stats, r: &str| drops(&s.global, r);
    assert!(
        d(&after, "unknown_vni") >= d(&before, "unknown_vni") + 5,
        "forged VNI 4103 not counted as unknown_vni: {:?}",
        after.global.drops
    );
    assert!(
        d(&after, "no_vnic_for_mac") >= d(&before, "no_vnic_for_mac") + 5,
        "frame on A's VNI for B-only MAC not counted as no_vnic_for_mac: {:?}",
        after.global.drops
    );
    teardown(t);
}

#[test]
fn moved_container_is_followed_within_2s() {
    if !root_or_skip("moved_container_is_followed_within_2s") {
        return;
    }
    let mut t = Topo::new(3);
    let c1 = t.add_container(0, 4201, "10.72.0.1/24", "02:00:0a:48:00:01");
    let c2 = t.add_container(1, 4201, "10.72.0.2/24", "02:00:0a:48:00:02");
    let run = Arc::new(AtomicBool::new(true));
    let echo = udp_echo_server(&c2, 7001, run.clone());
    let client = udp_socket(&c1, 0);
    let dst = SocketAddr::from((c2.ip, 7001));
    t.ping(&c1, c2.ip, 2)
        .unwrap_or_else(|e| panic!("before the move: {e}"));
    assert!(
        udp_probe(&client, dst, Duration::from_secs(3)).is_some(),
        "UDP echo c1 -> c2 does not work before the move"
    );
    let pids: Vec<_> = t.hosts.iter().map(|h| h.dataplane_pid()).collect();
    let h1_before = t.stats(0).resolver;

    // Move c2 from host 2 to host 3: same namespace, MAC and IP; new vnic on host 3.
    t.vnic_rm(1, &c2);
    t.vnic_add(2, &c2);
    let t0 = Instant::now();
    t.map(&c2, 2);
    let imported = t0.elapsed();
    let took = udp_probe(&client, dst, Duration::from_secs(10));
    run.store(false, Ordering::Relaxed);
    let echoed = echo.join().expect("echo thread");
    let took = took.map(|d| d + imported);
    let h1_after = t.stats(0).resolver;
    eprintln!(
        "move: import took {imported:.2?}, traffic followed after {took:?} (from the import's start), {echoed} echoes"
    );
    let took = took.unwrap_or_else(|| {
        panic!(
            "traffic did not follow the move within 10 s; host 1 resolver before {h1_before:?} after {h1_after:?}"
        )
    });
    assert!(
        took < Duration::from_secs(2),
        "traffic followed only after {took:.2?} (limit 2 s); host 1 resolver {h1_after:?}"
    );
    assert!(
        h1_after.vl2_shootdowns + h1_after.vl3_shootdowns
            > h1_before.vl2_shootdowns + h1_before.vl3_shootdowns,
        "host 1 applied no shootdown: before {h1_before:?} after {h1_after:?}"
    );
    // Host 3 delivers to the moved container; nobody restarted.
    let s3 = t.stats(2);
    let v = s3
        .vnics
        .iter()
        .find(|v| v.netns == c2.ns)
        .expect("c2 on host 3");
    assert!(
        v.counters.to_vnic > 0,
        "host 3 delivered nothing to c2: {:?}",
        v.counters
    );
    for (i, pid) in pids.iter().enumerate() {
        assert!(t.dataplane_alive(i), "dataplane of host {i} died");
        assert_eq!(t.hosts[i].dataplane_pid(), *pid, "dataplane {i} restarted");
    }
    t.ping(&c1, c2.ip, 2)
        .unwrap_or_else(|e| panic!("after the move: {e}"));
    teardown(t);
}

#[test]
fn portolan_down_keeps_flows_and_recovers() {
    if !root_or_skip("portolan_down_keeps_flows_and_recovers") {
        return;
    }
    let mut t = Topo::new(3);
    let c1 = t.add_container(0, 4301, "10.73.0.1/16", "02:00:0a:49:00:01");
    let c2 = t.add_container(1, 4301, "10.73.0.2/16", "02:00:0a:49:00:02");
    let c3 = t.add_container(2, 4301, "10.73.0.3/16", "02:00:0a:49:00:03");
    t.ping(&c1, c2.ip, 2)
        .unwrap_or_else(|e| panic!("before: {e}"));

    t.stop_portolan();
    let down_at = Instant::now();
    // The resolved flow keeps working, in both directions.
    t.ping(&c1, c2.ip, 5)
        .unwrap_or_else(|e| panic!("resolved flow broke with Portolan down: {e}"));
    let r = tcp_transfer(&c2, &c1, 5003, 10 * MB)
        .unwrap_or_else(|e| panic!("TCP on a resolved flow with Portolan down: {e}"));
    eprintln!("tcp with portolan down: {:.0} Mbit/s", r.mbps());

    eprintln!(
        "[{:.1?}] resolved flow ok with Portolan down",
        down_at.elapsed()
    );
    // A new destination cannot be resolved: counted, not hung.
    let before = t.stats(0);
    assert!(
        t.ping(&c1, c3.ip, 2).is_err(),
        "c3 resolved with Portolan down?"
    );
    // Many new destinations at once: UDP to 1000 unresolved addresses makes c1's kernel ARP
    // for each (three tries a second apart). The lookups fail; memory stays bounded.
    let pid = t.hosts[0].dataplane_pid().expect("dataplane pid");
    let rss0 = rss_kib(pid);
    let s = udp_socket(&c1, 0);
    // Unresolved neighbours hold the datagrams against the socket's send buffer: don't block.
    s.set_nonblocking(true).expect("nonblocking");
    for i in 0..1000u32 {
        let ip = Ipv4Addr::new(10, 73, 10 + (i / 250) as u8, 1 + (i % 250) as u8);
        let _ = s.send_to(&[1], SocketAddr::from((ip, 9)));
    }
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("[{:.1?}] lookup storm sent", down_at.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    let after = t.stats(0);
    let rss1 = rss_kib(pid);
    eprintln!(
        "portolan down: resolver {:?}, drops {:?}, rss {rss0} -> {rss1} KiB",
        after.resolver, after.global.drops
    );
    assert!(
        after.resolver.failed >= before.resolver.failed + 100,
        "expected >= 100 more failed lookups (ARP for 1000 new addresses): before {:?} after {:?}",
        before.resolver,
        after.resolver
    );
    let failed_drops = |s: &fabric::dataplane::control::Stats| {
        drops(&s.global, "lookup_failed")
            + drops(&s.global, "lookup_timeout")
            + drops(&s.global, "negative_cached")
    };
    assert!(
        failed_drops(&after) > failed_drops(&before),
        "frames waiting for failed lookups not counted as lookup_failed/lookup_timeout/negative_cached: {:?}",
        after.global.drops
    );
    assert!(
        rss1 < rss0 + 64 * 1024,
        "dataplane RSS grew from {rss0} to {rss1} KiB under failing lookups"
    );
    assert!(t.dataplane_alive(0), "dataplane of host 1 died");
    t.ping(&c1, c2.ip, 2)
        .unwrap_or_else(|e| panic!("resolved flow broke after the lookup storm: {e}"));

    // Portolan returns: resolution resumes by itself (the client backs off 1, 2, 4, then 5 s,
    // each ±25 %; portolan/tests/hardening.rs measures the recovery itself).
    let down_for = down_at.elapsed();
    t.start_portolan();
    let took = t.ping_until(&c1, c3.ip, Duration::from_secs(45));
    let after = t.stats(0);
    eprintln!("portolan was down {down_for:.1?}; c3 reachable {took:?} after its return");
    assert!(
        took.is_some(),
        "resolution did not resume within 45 s of Portolan's return: resolver {:?}",
        after.resolver
    );
    teardown(t);
}

#[test]
fn interop_with_linux_vxlan() {
    if !root_or_skip("interop_with_linux_vxlan") {
        return;
    }
    let vni = 4401;
    let mut t = Topo::new(1);
    let f = t.add_container(0, vni, "10.74.0.1/24", "02:00:0a:4a:00:01");
    let kh = t.add_kernel_host(vni);
    let k = t.add_kernel_container(kh, vni, "10.74.0.9/24", "02:00:0a:4a:00:09");
    // The kernel side: static FDB entries for fabric's container, and an all-zeros entry so
    // its ARP requests (broadcast) reach host 1, whose dataplane answers for local vnics.
    let h1 = t.hosts[0].ip;
    t.kernel_fdb(kh, &f.mac, h1);
    t.kernel_fdb(kh, "00:00:00:00:00:00", h1);

    t.ping(&f, k.ip, 3)
        .unwrap_or_else(|e| panic!("fabric -> kernel vxlan: {e}"));
    t.ping(&k, f.ip, 3)
        .unwrap_or_else(|e| panic!("kernel vxlan -> fabric: {e}"));
    let r = tcp_transfer(&f, &k, 5004, 20 * MB)
        .unwrap_or_else(|e| panic!("TCP fabric -> kernel vxlan: {e}"));
    eprintln!("tcp fabric -> kernel: {:.0} Mbit/s", r.mbps());
    let r = tcp_transfer(&k, &f, 5005, 20 * MB)
        .unwrap_or_else(|e| panic!("TCP kernel vxlan -> fabric: {e}"));
    eprintln!("tcp kernel -> fabric: {:.0} Mbit/s", r.mbps());
    let s = t.stats(0);
    let v = s.vnics.iter().find(|v| v.netns == f.ns).expect("vnic");
    assert!(
        v.counters.to_vnic > 0 && v.counters.to_underlay > 0,
        "fabric counters {:?}",
        v.counters
    );
    teardown(t);
}
