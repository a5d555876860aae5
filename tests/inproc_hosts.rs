//! Multi-host behaviour with in-process hosts: real UDP underlay sockets on loopback, real
//! smoltcp TCP/IP stacks as containers, one shared mapping table standing in for Portolan.

use fabric::core::{Config, DropReason};
use fabric::dataplane::inproc::{ContainerId, HostId, World};
use fabric::wire::{vxlan, EtherType, EthernetRepr, Ipv4Repr, Mac, Vni};
use std::net::Ipv4Addr;
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

fn vni(n: u32) -> Vni {
    Vni::new(n).unwrap()
}
fn mac(last: u8) -> Mac {
    Mac([0x02, 0x08, 0x20, 0, 0, last])
}
fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

/// Two hosts; tenant 1 (VNI 4001) and tenant 2 (VNI 4002) each have container .1 on host 1 and
/// .2 on host 2, with identical IPs *and* MACs across tenants.
struct Two {
    w: World,
    h1: HostId,
    h2: HostId,
    a1: ContainerId,
    b1: ContainerId,
    a2: ContainerId,
    b2: ContainerId,
}

fn two_tenants(delay: Duration, cfg: Config) -> Two {
    let mut w = World::with_config(delay, cfg);
    let h1 = w.add_host("host1", Ipv4Addr::new(127, 0, 0, 1)).unwrap();
    let h2 = w.add_host("host2", Ipv4Addr::new(127, 0, 0, 1)).unwrap();
    let a1 = w
        .add_container("t1-a", h1, vni(4001), mac(1), ip(1), 24)
        .unwrap();
    let b1 = w
        .add_container("t1-b", h2, vni(4001), mac(2), ip(2), 24)
        .unwrap();
    let a2 = w
        .add_container("t2-a", h1, vni(4002), mac(1), ip(1), 24)
        .unwrap();
    let b2 = w
        .add_container("t2-b", h2, vni(4002), mac(2), ip(2), 24)
        .unwrap();
    Two {
        w,
        h1,
        h2,
        a1,
        b1,
        a2,
        b2,
    }
}

fn udp_frame(src: Mac, dst: Mac, sip: Ipv4Addr, dip: Ipv4Addr, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + len];
    EthernetRepr {
        src,
        dst,
        vlan_tci: None,
        ethertype: EtherType::IPV4,
    }
    .emit(&mut f);
    Ipv4Repr {
        src: sip,
        dst: dip,
        protocol: 17,
        payload_len: (8 + len) as u16,
        ttl: 64,
    }
    .emit(&mut f[14..]);
    f[38..40].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    f
}

#[test]
fn same_tenant_ping_and_tcp_across_two_hosts() {
    let mut t = two_tenants(Duration::from_millis(2), Config::default());
    let rtt = t.w.ping(t.a1, ip(2), 7, T).unwrap();
    assert!(rtt.is_some(), "no echo reply from 10.0.0.2 in tenant 1");
    let tr =
        t.w.tcp_transfer(t.a1, t.b1, 5001, 2 << 20, Duration::from_secs(20))
            .unwrap();
    assert_eq!(tr.bytes, 2 << 20);
    assert!(tr.content_ok, "TCP payload corrupted");
    // And the reverse direction, host 2 to host 1.
    assert!(t.w.ping(t.b1, ip(1), 8, T).unwrap().is_some());
    let c1 = t.w.host(t.h1).core.counters();
    assert!(c1.to_underlay > 0 && c1.to_vnic > 0);
}

#[test]
fn identical_addressing_in_two_tenants_is_isolated() {
    let mut t = two_tenants(Duration::from_millis(2), Config::default());
    // Both tenants work, each within itself.
    for (a, b, id) in [(t.a1, t.b1, 1u16), (t.a2, t.b2, 2)] {
        assert!(t.w.ping(a, ip(2), id, T).unwrap().is_some());
        let tr = t.w.tcp_transfer(a, b, 6000 + id, 256 * 1024, T).unwrap();
        assert!(tr.content_ok);
    }
    // Per-vnic counters: everything tenant 2's b received came over VNI 4002 only.
    let b2_rx =
        t.w.host(t.h2)
            .core
            .vnic_counters(t.w.container(t.b2).vnic)
            .unwrap()
            .to_vnic;
    let b1_rx =
        t.w.host(t.h2)
            .core
            .vnic_counters(t.w.container(t.b1).vnic)
            .unwrap()
            .to_vnic;
    assert!(b1_rx > 0 && b2_rx > 0);
    // A third address that exists only in tenant 2 is unreachable from tenant 1.
    let h2 = t.h2;
    let _c2 =
        t.w.add_container("t2-c", h2, vni(4002), mac(3), ip(3), 24)
            .unwrap();
    assert!(
        t.w.ping(t.a2, ip(3), 30, T).unwrap().is_some(),
        "tenant 2 reaches its own .3"
    );
    assert!(t
        .w
        .ping(t.a1, ip(3), 31, Duration::from_millis(1500))
        .unwrap()
        .is_none());
    let c = t.w.host(t.h1).core.counters();
    assert!(c.drops_of(DropReason::LookupNotFound) >= 1, "{c:?}");
    // A forged datagram for tenant 2's VNI addressed to a MAC only tenant 1 has on host 2 goes
    // nowhere.
    let inner = udp_frame(mac(1), mac(9), ip(1), ip(2), 10);
    let mut d = vec![0u8; 8];
    vxlan::write_header(&mut d, vni(4002));
    d.extend_from_slice(&inner);
    t.w.inject_underlay(Ipv4Addr::new(127, 0, 0, 1), t.h2, &d)
        .unwrap();
    let h2 = t.h2;
    t.w.run_until("forged drop", T, |w| {
        w.host(h2)
            .core
            .counters()
            .drops_of(DropReason::NoVnicForMac)
            == 1
    })
    .unwrap();
}

#[test]
fn arp_is_answered_locally_with_no_arp_on_the_underlay() {
    let mut t = two_tenants(Duration::from_millis(2), Config::default());
    for (a, id) in [(t.a1, 1u16), (t.a2, 2)] {
        assert!(t.w.ping(a, ip(2), id, T).unwrap().is_some());
    }
    assert!(t.w.ping(t.b1, ip(1), 3, T).unwrap().is_some());
    let replied: u64 = [t.h1, t.h2]
        .iter()
        .map(|h| t.w.host(*h).core.counters().arp_replied)
        .sum();
    assert!(replied >= 3, "ARP answered by the proxy: {replied}");
    assert!(t.w.underlay.datagrams > 0);
    assert_eq!(t.w.underlay.arp_frames, 0, "ARP crossed the underlay");
    assert_eq!(
        t.w.underlay.flood_frames, 0,
        "broadcast crossed the underlay"
    );
}

#[test]
fn first_packet_to_unresolved_destination_is_delivered_after_lookup() {
    // A slow mapping service: 50 ms per lookup.
    let mut t = two_tenants(Duration::from_millis(50), Config::default());
    assert!(t.w.ping(t.a1, ip(2), 1, T).unwrap().is_some());
    // Forget the VL2 entry (as a shootdown would); smoltcp still knows the MAC, so the next
    // datagram goes straight to an unresolved MAC.
    let (h1, a1, b1) = (t.h1, t.a1, t.b1);
    assert!(t.w.host_mut(h1).core.invalidate_vl2(vni(4001), mac(2)));
    let held_before = t.w.host(h1).core.counters().held;
    let released_before = t.w.host(h1).core.counters().released;
    assert!(
        t.w.udp_once(a1, b1, 7000, b"first packet", T).unwrap(),
        "first datagram lost"
    );
    let c = t.w.host(h1).core.counters();
    assert_eq!(c.held, held_before + 1);
    assert_eq!(c.released, released_before + 1);
}

#[test]
fn spoofed_source_mac_and_ip_are_dropped_with_their_reasons() {
    let mut t = two_tenants(Duration::from_millis(2), Config::default());
    assert!(t.w.ping(t.a1, ip(2), 1, T).unwrap().is_some());
    let (h1, a1) = (t.h1, t.a1);
    let vnic = t.w.container(a1).vnic;
    let before = t.w.underlay.datagrams;
    // Another tenant's identical MAC is still "someone else" only if it is not ours; spoof a
    // foreign MAC, then a foreign IP.
    t.w.inject_from_container(a1, udp_frame(mac(77), mac(2), ip(1), ip(2), 10));
    t.w.inject_from_container(a1, udp_frame(mac(1), mac(2), ip(99), ip(2), 10));
    t.w.run_until("spoof drops", T, |w| {
        let c = w.host(h1).core.vnic_counters(vnic).unwrap();
        c.drops_of(DropReason::SpoofedSrcMac) == 1 && c.drops_of(DropReason::SpoofedSrcIp) == 1
    })
    .unwrap();
    assert_eq!(
        t.w.underlay.datagrams, before,
        "a spoofed frame reached the underlay"
    );
}

#[test]
fn malformed_and_wrong_vni_vxlan_are_dropped_with_their_reasons() {
    let mut t = two_tenants(Duration::from_millis(2), Config::default());
    let h2 = t.h2;
    let inner = udp_frame(mac(1), mac(2), ip(1), ip(2), 10);
    let with = |v: u32, flags: u8| {
        let mut d = vec![0u8; 8];
        vxlan::write_header(&mut d, vni(v));
        d[0] = flags;
        d.extend_from_slice(&inner);
        d
    };
    let lo = Ipv4Addr::new(127, 0, 0, 1);
    t.w.inject_underlay(lo, h2, &with(4001, 0x00)).unwrap(); // I flag clear
    t.w.inject_underlay(lo, h2, &[0x08, 0, 0]).unwrap(); // runt
    t.w.inject_underlay(lo, h2, &with(999, 0x08)).unwrap(); // no vnic on this VNI
    t.w.inject_underlay(lo, h2, &with(4001, 0x08)[..12])
        .unwrap(); // inner frame truncated
    t.w.run_until("underlay drops", T, |w| {
        let c = w.host(h2).core.counters();
        c.drops_of(DropReason::VxlanMalformed) == 2
            && c.drops_of(DropReason::UnknownVni) == 1
            && c.drops_of(DropReason::Malformed) == 1
    })
    .unwrap();
    // Nothing was delivered to a container.
    assert_eq!(t.w.host(h2).core.counters().to_vnic, 0);
}

#[test]
fn held_queue_overflow_is_bounded() {
    let cfg = Config {
        pending_bytes_per_dest: 8 * 1024,
        ..Config::default()
    };
    // The mapping service takes 200 ms: meanwhile the container floods an unresolved MAC.
    let mut t = two_tenants(Duration::from_millis(200), cfg);
    let (h1, a1) = (t.h1, t.a1);
    for i in 0..100u8 {
        let mut f = udp_frame(mac(1), mac(2), ip(1), ip(2), 1000);
        f[42] = i;
        t.w.inject_from_container(a1, f);
    }
    t.w.poll(std::time::Instant::now()).unwrap();
    let (frames, bytes) = t.w.host(h1).core.held();
    assert!(bytes <= 8 * 1024, "held {bytes} bytes");
    assert!(frames <= 8);
    let c = t.w.host(h1).core.counters();
    assert_eq!(
        c.drops_of(DropReason::PendingQueueOverflow) as usize,
        100 - frames
    );
    // When the answer comes, the survivors go out.
    t.w.run_until("release", T, |w| {
        w.host(h1).core.counters().released as usize == frames
    })
    .unwrap();
    assert_eq!(t.w.host(h1).core.held(), (0, 0));
}
