//! Unit tests of the core's decisions, frame by frame.

use super::*;
use crate::wire::{arp, EthernetRepr, Ipv4Repr, Ipv6Repr};

const A: Mac = Mac([0x02, 0, 0, 0, 0, 0x0a]);
const B: Mac = Mac([0x02, 0, 0, 0, 0, 0x0b]);
const C: Mac = Mac([0x02, 0, 0, 0, 0, 0x0c]);

fn vni(n: u32) -> Vni {
    Vni::new(n).unwrap()
}
fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
fn under(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 4789))
}

fn cfg(v: u32, mac: Mac, addr: &str) -> VnicConfig {
    VnicConfig {
        vni: vni(v),
        mac,
        ipv4: vec![ip(addr)],
        ipv6: vec![],
        mtu: 1500,
    }
}

/// An Ethernet/IPv4/UDP frame with `payload_len` bytes of payload.
fn udp_frame(src: Mac, dst: Mac, sip: &str, dip: &str, payload_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + payload_len];
    EthernetRepr {
        src,
        dst,
        vlan_tci: None,
        ethertype: EtherType::IPV4,
    }
    .emit(&mut f);
    Ipv4Repr {
        src: ip(sip),
        dst: ip(dip),
        protocol: 17,
        payload_len: (8 + payload_len) as u16,
        ttl: 64,
    }
    .emit(&mut f[14..]);
    f[34..36].copy_from_slice(&1234u16.to_be_bytes());
    f[36..38].copy_from_slice(&80u16.to_be_bytes());
    f[38..40].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    f
}

fn arp_request(sha: Mac, spa: &str, tpa: &str) -> Vec<u8> {
    let mut f = vec![0u8; 42];
    EthernetRepr {
        src: sha,
        dst: Mac::BROADCAST,
        vlan_tci: None,
        ethertype: EtherType::ARP,
    }
    .emit(&mut f);
    arp::Repr {
        op: arp::Operation::Request,
        sha,
        spa: ip(spa),
        tha: Mac::ZERO,
        tpa: ip(tpa),
    }
    .emit(&mut f[14..]);
    f
}

fn neighbor_solicit(sha: Mac, src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let ns = ndp::Repr::Solicit {
        target,
        source_lla: Some(sha),
    };
    let dst = ndp::solicited_node(target);
    let mut f = vec![0u8; 14 + 40 + ns.buffer_len()];
    EthernetRepr {
        src: sha,
        dst: Mac::ipv6_multicast(dst),
        vlan_tci: None,
        ethertype: EtherType::IPV6,
    }
    .emit(&mut f);
    Ipv6Repr {
        src,
        dst,
        next_header: 58,
        payload_len: ns.buffer_len() as u16,
        hop_limit: 255,
    }
    .emit(&mut f[14..]);
    ns.emit(&mut f[54..], src, dst);
    f
}

/// Run `frame` through `from_vnic` in a buffer with headroom; return the verdict and bytes.
fn send(core: &mut Core, id: VnicId, frame: &[u8], now: Instant) -> (Verdict, Vec<u8>) {
    let mut raw = vec![0u8; HEADROOM + frame.len() + 128];
    raw[HEADROOM..HEADROOM + frame.len()].copy_from_slice(frame);
    let mut buf = FrameBuf::new(&mut raw, HEADROOM, frame.len()).unwrap();
    let v = core.from_vnic(id, &mut buf, now);
    (v, buf.bytes().to_vec())
}

fn recv(core: &mut Core, datagram: &[u8], now: Instant) -> (Verdict, Vec<u8>, usize) {
    let mut raw = datagram.to_vec();
    let mut buf = FrameBuf::new(&mut raw, 0, datagram.len()).unwrap();
    let v = core.from_underlay(under(9), &mut buf, now);
    (v, buf.bytes().to_vec(), buf.start())
}

fn vxlan_datagram(v: u32, inner: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    vxlan::write_header(&mut d, vni(v));
    d.extend_from_slice(inner);
    d
}

fn one_vnic() -> (Core, VnicId, Instant) {
    let mut core = Core::default();
    let id = core.add_vnic(cfg(100, A, "10.0.0.1")).unwrap();
    (core, id, Instant::now())
}

#[test]
fn known_destination_is_encapsulated_in_place() {
    let (mut core, id, now) = one_vnic();
    core.insert_vl2(vni(100), B, under(2), now);
    let frame = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 22);
    let (v, out) = send(&mut core, id, &frame, now);
    let Verdict::ToUnderlay { dst, .. } = v else {
        panic!("{v:?}")
    };
    assert_eq!(dst, under(2));
    let p = vxlan::Packet::new_checked(&out[..]).unwrap();
    assert_eq!(p.vni(), vni(100));
    assert_eq!(p.payload(), &frame[..], "inner frame unchanged");
    assert_eq!(core.vnic_counters(id).unwrap().to_underlay, 1);
}

#[test]
fn arp_answered_from_cache_never_reaches_underlay() {
    let (mut core, id, now) = one_vnic();
    core.insert_vl3(
        vni(100),
        IpAddr::V4(ip("10.0.0.2")),
        Vl3Mapping {
            mac: B,
            underlay: under(2),
        },
        now,
    );
    let (v, out) = send(&mut core, id, &arp_request(A, "10.0.0.1", "10.0.0.2"), now);
    assert_eq!(v, Verdict::Reply(id));
    let f = wire::EthernetFrame::new_checked(&out[..]).unwrap();
    assert_eq!((f.dst(), f.src()), (A, B));
    let r = arp::Repr::parse(&arp::Packet::new_checked(f.payload()).unwrap()).unwrap();
    assert_eq!(r.op, arp::Operation::Reply);
    assert_eq!(
        (r.sha, r.spa, r.tha, r.tpa),
        (B, ip("10.0.0.2"), A, ip("10.0.0.1"))
    );
    assert_eq!(core.counters().arp_replied, 1);
    assert_eq!(core.counters().to_underlay, 0);
    assert!(core.poll_lookup().is_none());
}

#[test]
fn arp_miss_is_held_then_answered_after_lookup() {
    let (mut core, id, now) = one_vnic();
    let (v, _) = send(&mut core, id, &arp_request(A, "10.0.0.1", "10.0.0.2"), now);
    assert_eq!(v, Verdict::Held);
    let key = core.poll_lookup().unwrap();
    assert_eq!(
        key,
        LookupKey::Vl3 {
            vni: vni(100),
            ip: IpAddr::V4(ip("10.0.0.2"))
        }
    );
    // A second request for the same IP while in flight does not ask again.
    let (v, _) = send(&mut core, id, &arp_request(A, "10.0.0.1", "10.0.0.2"), now);
    assert_eq!(v, Verdict::Held);
    assert!(core.poll_lookup().is_none());
    core.handle_answer(
        LookupAnswer::Vl3 {
            vni: vni(100),
            ip: IpAddr::V4(ip("10.0.0.2")),
            result: Ok(Some(Vl3Mapping {
                mac: B,
                underlay: under(2),
            })),
        },
        now,
    );
    for _ in 0..2 {
        let Some(Output::Vnic { vnic, frame }) = core.poll_output() else {
            panic!("expected a released ARP reply")
        };
        assert_eq!(vnic, id);
        let f = wire::EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(f.src(), B);
    }
    assert!(core.poll_output().is_none());
    // The VL3 answer filled VL2 as well: data now goes straight out.
    assert_eq!(core.cached_vl2(vni(100), B), Some(under(2)));
    assert_eq!(core.counters().released, 2);
}

#[test]
fn first_packet_to_unknown_mac_is_delivered_after_lookup() {
    let (mut core, id, now) = one_vnic();
    let frame = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 100);
    assert_eq!(send(&mut core, id, &frame, now).0, Verdict::Held);
    assert_eq!(
        core.poll_lookup(),
        Some(LookupKey::Vl2 {
            vni: vni(100),
            mac: B
        })
    );
    core.handle_answer(
        LookupAnswer::Vl2 {
            vni: vni(100),
            mac: B,
            result: Ok(Some(under(2))),
        },
        now,
    );
    let Some(Output::Underlay { dst, datagram, .. }) = core.poll_output() else {
        panic!("held frame not released")
    };
    assert_eq!(dst, under(2));
    assert_eq!(&datagram[8..], &frame[..]);
    assert_eq!(core.held(), (0, 0));
}

#[test]
fn not_found_drops_held_and_is_negatively_cached_briefly() {
    let (mut core, id, now) = one_vnic();
    let frame = udp_frame(A, C, "10.0.0.1", "10.0.0.3", 10);
    assert_eq!(send(&mut core, id, &frame, now).0, Verdict::Held);
    core.poll_lookup().unwrap();
    core.handle_answer(
        LookupAnswer::Vl2 {
            vni: vni(100),
            mac: C,
            result: Ok(None),
        },
        now,
    );
    assert_eq!(core.counters().drops_of(DropReason::LookupNotFound), 1);
    assert_eq!(
        send(&mut core, id, &frame, now + Duration::from_millis(500)).0,
        Verdict::Drop(DropReason::NegativeCached)
    );
    assert!(core.poll_lookup().is_none());
    let later = now + core.config().negative_ttl + Duration::from_millis(1);
    assert_eq!(send(&mut core, id, &frame, later).0, Verdict::Held);
    assert!(
        core.poll_lookup().is_some(),
        "asks again once the negative entry expired"
    );
}

#[test]
fn lookup_failure_is_counted_and_bounded() {
    let (mut core, id, now) = one_vnic();
    let frame = udp_frame(A, C, "10.0.0.1", "10.0.0.3", 10);
    send(&mut core, id, &frame, now);
    core.poll_lookup().unwrap();
    core.handle_answer(
        LookupAnswer::Vl2 {
            vni: vni(100),
            mac: C,
            result: Err(LookupError::Timeout),
        },
        now,
    );
    assert_eq!(
        core.vnic_counters(id)
            .unwrap()
            .drops_of(DropReason::LookupFailed),
        1
    );
    assert_eq!(core.held(), (0, 0));
}

#[test]
fn stale_entry_keeps_forwarding_while_refreshed() {
    let (mut core, id, now) = one_vnic();
    core.insert_vl2(vni(100), B, under(2), now);
    let later = now + core.config().cache_ttl + Duration::from_secs(1);
    let frame = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 10);
    assert!(matches!(
        send(&mut core, id, &frame, later).0,
        Verdict::ToUnderlay { .. }
    ));
    assert_eq!(
        core.poll_lookup(),
        Some(LookupKey::Vl2 {
            vni: vni(100),
            mac: B
        })
    );
    assert!(matches!(
        send(&mut core, id, &frame, later).0,
        Verdict::ToUnderlay { .. }
    ));
    assert!(
        core.poll_lookup().is_none(),
        "one refresh in flight, not one per packet"
    );
}

#[test]
fn spoofing_is_dropped_with_reasons() {
    let (mut core, id, now) = one_vnic();
    core.insert_vl2(vni(100), B, under(2), now);
    let cases = [
        (
            udp_frame(C, B, "10.0.0.1", "10.0.0.2", 10),
            DropReason::SpoofedSrcMac,
        ),
        (
            udp_frame(A, B, "10.0.0.9", "10.0.0.2", 10),
            DropReason::SpoofedSrcIp,
        ),
        (
            arp_request(C, "10.0.0.1", "10.0.0.2"),
            DropReason::SpoofedSrcMac,
        ),
        (
            arp_request(A, "10.0.0.9", "10.0.0.2"),
            DropReason::SpoofedSrcIp,
        ),
    ];
    for (frame, reason) in cases {
        assert_eq!(send(&mut core, id, &frame, now).0, Verdict::Drop(reason));
    }
    let c = core.vnic_counters(id).unwrap();
    assert_eq!(c.drops_of(DropReason::SpoofedSrcMac), 2);
    assert_eq!(c.drops_of(DropReason::SpoofedSrcIp), 2);
    assert_eq!(core.counters().to_underlay, 0);
}

#[test]
fn oversize_tagged_broadcast_and_multicast_are_dropped() {
    let (mut core, id, now) = one_vnic();
    core.insert_vl2(vni(100), B, under(2), now);
    let big = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 1500 - 28 + 1);
    assert_eq!(
        send(&mut core, id, &big, now).0,
        Verdict::Drop(DropReason::FrameTooBig)
    );
    let exact = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 1500 - 28);
    assert!(matches!(
        send(&mut core, id, &exact, now).0,
        Verdict::ToUnderlay { .. }
    ));
    let bcast = udp_frame(A, Mac::BROADCAST, "10.0.0.1", "10.0.0.255", 10);
    assert_eq!(
        send(&mut core, id, &bcast, now).0,
        Verdict::Drop(DropReason::Broadcast)
    );
    let mcast = udp_frame(A, Mac([1, 0, 0x5e, 0, 0, 1]), "10.0.0.1", "224.0.0.1", 10);
    assert_eq!(
        send(&mut core, id, &mcast, now).0,
        Verdict::Drop(DropReason::Multicast)
    );
    let mut tagged = vec![0u8; 64];
    EthernetRepr {
        src: A,
        dst: B,
        vlan_tci: Some(5),
        ethertype: EtherType::IPV4,
    }
    .emit(&mut tagged);
    assert_eq!(
        send(&mut core, id, &tagged, now).0,
        Verdict::Drop(DropReason::VlanTagged)
    );
    assert_eq!(
        send(&mut core, id, &[0u8; 5], now).0,
        Verdict::Drop(DropReason::Malformed)
    );
    let mut bad_ip = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 10);
    bad_ip[14] = 0x46; // IHL 6 words with nothing behind: total length now shorter than header
    bad_ip[16..18].copy_from_slice(&20u16.to_be_bytes());
    assert_eq!(
        send(&mut core, id, &bad_ip, now).0,
        Verdict::Drop(DropReason::Malformed)
    );
}

#[test]
fn arp_that_needs_no_answer_is_dropped_and_counted() {
    let (mut core, id, now) = one_vnic();
    let gratuitous = arp_request(A, "10.0.0.1", "10.0.0.1");
    let probe = arp_request(A, "0.0.0.0", "10.0.0.1");
    for f in [gratuitous, probe] {
        assert_eq!(
            send(&mut core, id, &f, now).0,
            Verdict::Drop(DropReason::ArpNotAnswered)
        );
    }
}

#[test]
fn decapsulation_strips_without_copy_and_checks_vni_and_mac() {
    let (mut core, id, now) = one_vnic();
    let inner = udp_frame(B, A, "10.0.0.2", "10.0.0.1", 30);
    let (v, out, start) = recv(&mut core, &vxlan_datagram(100, &inner), now);
    assert_eq!(v, Verdict::ToVnic(id));
    assert_eq!(out, inner);
    assert_eq!(start, 8, "payload not moved");
    assert_eq!(
        recv(&mut core, &vxlan_datagram(200, &inner), now).0,
        Verdict::Drop(DropReason::UnknownVni)
    );
    let to_c = udp_frame(B, C, "10.0.0.2", "10.0.0.3", 30);
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &to_c), now).0,
        Verdict::Drop(DropReason::NoVnicForMac)
    );
    let mut no_i = vxlan_datagram(100, &inner);
    no_i[0] = 0;
    assert_eq!(
        recv(&mut core, &no_i, now).0,
        Verdict::Drop(DropReason::VxlanMalformed)
    );
    assert_eq!(
        recv(&mut core, &[8, 0, 0], now).0,
        Verdict::Drop(DropReason::VxlanMalformed)
    );
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &inner[..10]), now).0,
        Verdict::Drop(DropReason::Malformed)
    );
    let mut reserved = vxlan_datagram(100, &inner);
    reserved[7] = 0xff;
    assert_eq!(recv(&mut core, &reserved, now).0, Verdict::ToVnic(id));
    assert_eq!(core.counters().vxlan_reserved_bits, 1);
    let bcast = udp_frame(B, Mac::BROADCAST, "10.0.0.2", "10.0.0.255", 30);
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &bcast), now).0,
        Verdict::Drop(DropReason::Broadcast)
    );
}

#[test]
fn identical_addresses_on_two_vnis_never_cross() {
    let mut core = Core::default();
    let now = Instant::now();
    let t1 = core.add_vnic(cfg(100, A, "10.0.0.1")).unwrap();
    let t2 = core.add_vnic(cfg(200, A, "10.0.0.1")).unwrap();
    let inner = udp_frame(B, A, "10.0.0.2", "10.0.0.1", 30);
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &inner), now).0,
        Verdict::ToVnic(t1)
    );
    assert_eq!(
        recv(&mut core, &vxlan_datagram(200, &inner), now).0,
        Verdict::ToVnic(t2)
    );
    // Tenant 1's neighbour B is local; tenant 2 knows no B: it must not be delivered locally.
    let b1 = core.add_vnic(cfg(100, B, "10.0.0.2")).unwrap();
    let f = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 10);
    assert_eq!(send(&mut core, t1, &f, now).0, Verdict::ToVnic(b1));
    assert_eq!(send(&mut core, t2, &f, now).0, Verdict::Held);
    assert_eq!(
        core.poll_lookup(),
        Some(LookupKey::Vl2 {
            vni: vni(200),
            mac: B
        })
    );
    // ARP for 10.0.0.2 is answered locally in tenant 1 only.
    assert_eq!(
        send(&mut core, t1, &arp_request(A, "10.0.0.1", "10.0.0.2"), now).0,
        Verdict::Reply(t1)
    );
    assert_eq!(
        send(&mut core, t2, &arp_request(A, "10.0.0.1", "10.0.0.2"), now).0,
        Verdict::Held
    );
}

#[test]
fn pending_queue_is_bytes_capped_oldest_first() {
    let mut core = Core::new(Config {
        pending_bytes_per_dest: 10_000,
        ..Config::default()
    });
    let id = core.add_vnic(cfg(100, A, "10.0.0.1")).unwrap();
    let now = Instant::now();
    for i in 0..50u8 {
        let mut f = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 958);
        f[42] = i; // tag the payload
        assert_eq!(send(&mut core, id, &f, now).0, Verdict::Held);
    }
    let (frames, bytes) = core.held();
    assert!(bytes <= 10_000, "{bytes}");
    assert_eq!(frames, 10);
    assert_eq!(
        core.counters().drops_of(DropReason::PendingQueueOverflow),
        40
    );
    core.handle_answer(
        LookupAnswer::Vl2 {
            vni: vni(100),
            mac: B,
            result: Ok(Some(under(2))),
        },
        now,
    );
    let mut tags = vec![];
    while let Some(Output::Underlay { datagram, .. }) = core.poll_output() {
        tags.push(datagram[8 + 42]);
    }
    assert_eq!(tags, (40..50).collect::<Vec<u8>>(), "newest kept, in order");
}

#[test]
fn pending_table_and_timeout_bound_memory() {
    let mut core = Core::new(Config {
        pending_max_dests: 3,
        ..Config::default()
    });
    let id = core.add_vnic(cfg(100, A, "10.0.0.1")).unwrap();
    let now = Instant::now();
    for n in 0..5u8 {
        let f = udp_frame(A, Mac([2, 0, 0, 0, 1, n]), "10.0.0.1", "10.0.0.2", 10);
        let v = send(&mut core, id, &f, now).0;
        assert_eq!(
            v,
            if n < 3 {
                Verdict::Held
            } else {
                Verdict::Drop(DropReason::PendingTableFull)
            }
        );
    }
    core.handle_timeout(now + Duration::from_secs(1));
    assert_eq!(core.held().0, 3);
    core.handle_timeout(now + core.config().lookup_timeout);
    assert_eq!(core.held(), (0, 0));
    assert_eq!(core.counters().drops_of(DropReason::LookupTimeout), 3);
    // The timed-out lookups may be asked again.
    while core.poll_lookup().is_some() {}
    let f = udp_frame(A, Mac([2, 0, 0, 0, 1, 0]), "10.0.0.1", "10.0.0.2", 10);
    send(&mut core, id, &f, now + Duration::from_secs(4));
    assert!(core.poll_lookup().is_some());
}

#[test]
fn neighbour_solicitation_is_answered_by_the_proxy() {
    let mut core = Core::default();
    let now = Instant::now();
    let mine: Ipv6Addr = "fd00::1".parse().unwrap();
    let theirs: Ipv6Addr = "fd00::2".parse().unwrap();
    let id = core
        .add_vnic(VnicConfig {
            vni: vni(100),
            mac: A,
            ipv4: vec![],
            ipv6: vec![mine],
            mtu: 1500,
        })
        .unwrap();
    let ns = neighbor_solicit(A, mine, theirs);
    assert_eq!(send(&mut core, id, &ns, now).0, Verdict::Held);
    core.handle_answer(
        LookupAnswer::Vl3 {
            vni: vni(100),
            ip: IpAddr::V6(theirs),
            result: Ok(Some(Vl3Mapping {
                mac: B,
                underlay: under(2),
            })),
        },
        now,
    );
    let Some(Output::Vnic { frame, .. }) = core.poll_output() else {
        panic!("no advert")
    };
    let f = wire::EthernetFrame::new_checked(&frame[..]).unwrap();
    assert_eq!((f.src(), f.dst()), (B, A));
    let ip6 = wire::Ipv6Packet::new_checked(f.payload()).unwrap();
    assert_eq!((ip6.src(), ip6.dst(), ip6.hop_limit()), (theirs, mine, 255));
    let na = ndp::Repr::parse(
        &ndp::Packet::new_checked(ip6.payload()).unwrap(),
        theirs,
        mine,
    )
    .unwrap();
    assert_eq!(
        na,
        ndp::Repr::Advert {
            router: false,
            solicited: true,
            override_: true,
            target: theirs,
            target_lla: Some(B)
        }
    );
    // From the link-local address too; and a DAD probe is not answered.
    let ll = eui64_link_local(A);
    assert_eq!(
        send(&mut core, id, &neighbor_solicit(A, ll, theirs), now).0,
        Verdict::Reply(id)
    );
    let dad = neighbor_solicit(A, Ipv6Addr::UNSPECIFIED, mine);
    assert_eq!(
        send(&mut core, id, &dad, now).0,
        Verdict::Drop(DropReason::NdpNotAnswered)
    );
    let spoofed = neighbor_solicit(A, "fd00::9".parse().unwrap(), theirs);
    assert_eq!(
        send(&mut core, id, &spoofed, now).0,
        Verdict::Drop(DropReason::SpoofedSrcIp)
    );
    assert_eq!(
        core.counters().ndp_replied,
        2,
        "one released after the lookup, one from cache"
    );
}

#[test]
fn remote_arp_for_a_local_vnic_is_answered_over_the_underlay() {
    let (mut core, _id, now) = one_vnic();
    let req = arp_request(B, "10.0.0.2", "10.0.0.1");
    // Unknown source: not answered; its sender is looked up instead.
    let (v, _, _) = recv(&mut core, &vxlan_datagram(100, &req), now);
    assert_eq!(v, Verdict::Drop(DropReason::UnderlayArpUnknownPeer));
    assert_eq!(
        core.poll_lookup(),
        Some(LookupKey::Vl3 {
            vni: vni(100),
            ip: IpAddr::V4(ip("10.0.0.2"))
        })
    );
    // The mapping service says the sender lives at under(2): that host is a known peer now.
    core.handle_answer(
        LookupAnswer::Vl3 {
            vni: vni(100),
            ip: IpAddr::V4(ip("10.0.0.2")),
            result: Ok(Some(Vl3Mapping {
                mac: B,
                underlay: under(2),
            })),
        },
        now,
    );
    assert!(core.is_known_peer(vni(100), under(2).ip()));
    assert!(!core.is_known_peer(vni(101), under(2).ip()));
    let mut raw = vxlan_datagram(100, &req);
    raw.resize(raw.len() + 64, 0);
    let len = 8 + req.len();
    let mut buf = FrameBuf::new(&mut raw, 0, len).unwrap();
    let v = core.from_underlay(under(2), &mut buf, now);
    assert!(
        matches!(v, Verdict::ToUnderlay { dst, .. } if dst == under(2)),
        "{v:?}"
    );
    let p = vxlan::Packet::new_checked(buf.bytes()).unwrap();
    let f = wire::EthernetFrame::new_checked(p.payload()).unwrap();
    let r = arp::Repr::parse(&arp::Packet::new_checked(f.payload()).unwrap()).unwrap();
    assert_eq!(
        (r.op, r.sha, r.spa),
        (arp::Operation::Reply, A, ip("10.0.0.1"))
    );
    // ... but not for an address that is not local.
    let req = arp_request(B, "10.0.0.2", "10.0.0.7");
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &req), now).0,
        Verdict::Drop(DropReason::Broadcast)
    );
}

#[test]
fn operator_listed_peers_are_answered_on_every_vni_within_the_limit() {
    let mut core = Core::new(Config {
        underlay_peers: vec![under(5).ip()],
        underlay_arp_per_peer: RateLimit {
            per_sec: 1,
            burst: 3,
        },
        ..Config::default()
    });
    let now = Instant::now();
    core.add_vnic(cfg(100, A, "10.0.0.1")).unwrap();
    core.add_vnic(cfg(200, C, "10.0.0.1")).unwrap();
    let req = arp_request(B, "10.0.0.2", "10.0.0.1");
    let mut answered = 0;
    for v in [100, 200, 100, 200, 100] {
        let mut raw = vxlan_datagram(v, &req);
        raw.resize(raw.len() + 64, 0);
        let mut buf = FrameBuf::new(&mut raw, 0, 8 + req.len()).unwrap();
        match core.from_underlay(under(5), &mut buf, now) {
            Verdict::ToUnderlay { dst, .. } => {
                assert_eq!(dst, under(5));
                answered += 1;
            }
            v => assert_eq!(v, Verdict::Drop(DropReason::UnderlayArpRateLimited)),
        }
    }
    assert_eq!(answered, 3, "the per-peer burst");
    assert_eq!(
        core.counters().drops_of(DropReason::UnderlayArpRateLimited),
        2
    );
    // The list can change at run time.
    core.set_underlay_peers([]);
    assert!(!core.is_known_peer(vni(100), under(5).ip()));
}

#[test]
fn pending_quota_per_vnic_and_eviction_from_the_largest_holder() {
    let mut core = Core::new(Config {
        pending_max_dests: 8,
        pending_dests_per_vnic: 5,
        ..Config::default()
    });
    let now = Instant::now();
    let a = core.add_vnic(cfg(100, A, "10.0.0.1")).unwrap();
    let b = core.add_vnic(cfg(100, B, "10.0.0.2")).unwrap();
    let c = core.add_vnic(cfg(200, C, "10.0.0.3")).unwrap();
    let arp = |who: Mac, me: &str, n: u8| arp_request(who, me, &format!("10.0.1.{n}"));
    for n in 0..7 {
        let (v, _) = send(&mut core, a, &arp(A, "10.0.0.1", n), now);
        let want = if n < 5 {
            Verdict::Held
        } else {
            Verdict::Drop(DropReason::PendingQuota)
        };
        assert_eq!(v, want, "a's lookup {n}");
    }
    for n in 10..13 {
        assert_eq!(
            send(&mut core, b, &arp(B, "10.0.0.2", n), now).0,
            Verdict::Held
        );
    }
    // Table full (5 + 3): c takes from a (5 held), then a and b are level (4, 3)...
    assert_eq!(
        send(&mut core, c, &arp(C, "10.0.0.3", 20), now).0,
        Verdict::Held
    );
    assert_eq!(
        core.vnic_counters(a)
            .unwrap()
            .drops_of(DropReason::PendingEvicted),
        1
    );
    assert_eq!(core.held().0, 8);
    // ... b (3) cannot take from a (4) unless a holds more than b: it does.
    assert_eq!(
        send(&mut core, b, &arp(B, "10.0.0.2", 13), now).0,
        Verdict::Held
    );
    // Now a 3, b 4, c 1: c takes from b.
    assert_eq!(
        send(&mut core, c, &arp(C, "10.0.0.3", 21), now).0,
        Verdict::Held
    );
    assert_eq!(
        core.vnic_counters(b)
            .unwrap()
            .drops_of(DropReason::PendingEvicted),
        1
    );
    // Answers and timeouts give the quota back.
    core.handle_timeout(now + Duration::from_secs(10));
    assert_eq!(core.held(), (0, 0));
    for n in 30..35 {
        assert_eq!(
            send(&mut core, a, &arp(A, "10.0.0.1", n), now).0,
            Verdict::Held
        );
    }
}

#[test]
fn vnic_table_rejects_conflicts() {
    let (mut core, id, _) = one_vnic();
    assert!(matches!(
        core.add_vnic(cfg(100, A, "10.0.0.5")),
        Err(VnicError::DuplicateMac { .. })
    ));
    assert!(matches!(
        core.add_vnic(cfg(100, B, "10.0.0.1")),
        Err(VnicError::DuplicateIp { .. })
    ));
    assert!(
        core.add_vnic(cfg(200, A, "10.0.0.1")).is_ok(),
        "same addresses on another VNI"
    );
    assert!(matches!(
        core.add_vnic(cfg(100, Mac::BROADCAST, "10.0.0.6")),
        Err(VnicError::BadMac(_))
    ));
    let mut c = cfg(100, C, "10.0.0.7");
    c.mtu = 100;
    assert!(matches!(core.add_vnic(c), Err(VnicError::BadMtu(100))));
    core.remove_vnic(id).unwrap();
    assert!(
        core.add_vnic(cfg(100, A, "10.0.0.1")).is_ok(),
        "freed on removal"
    );
    let (v, _) = send(&mut core, VnicId(99), &[0u8; 60], Instant::now());
    assert_eq!(v, Verdict::Drop(DropReason::UnknownVnic));
}

#[test]
fn flow_hash_is_per_flow() {
    let a = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 10);
    assert_eq!(flow_hash(&a), flow_hash(&a.clone()));
    let mut longer = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 900);
    longer[42] = 7; // other payload and length: same flow
    assert_eq!(flow_hash(&longer), flow_hash(&a));
    let mut b = a.clone();
    b[35] ^= 1; // other source port: other flow
    assert_ne!(flow_hash(&a), flow_hash(&b));
    // IPv6: addresses and ports count too.
    let mut v6 = vec![0u8; 14 + 40 + 8];
    EthernetRepr {
        src: A,
        dst: B,
        vlan_tci: None,
        ethertype: EtherType::IPV6,
    }
    .emit(&mut v6);
    Ipv6Repr {
        src: "fd00::1".parse().unwrap(),
        dst: "fd00::2".parse().unwrap(),
        next_header: 17,
        payload_len: 8,
        hop_limit: 64,
    }
    .emit(&mut v6[14..]);
    let mut w = v6.clone();
    w[55] ^= 1;
    assert_ne!(flow_hash(&v6), flow_hash(&w), "IPv6 source port");
    let mut x = v6.clone();
    x[37] ^= 1;
    assert_ne!(flow_hash(&v6), flow_hash(&x), "IPv6 source address");
    assert_eq!(flow_hash(&[0u8; 3]), 0);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes from a vnic or the underlay never panic, and never leave the host
        /// as anything but a well-formed VXLAN datagram on the vnic's own VNI.
        #[test]
        fn arbitrary_frames_never_panic_or_leak(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20)) {
            let (mut core, id, now) = one_vnic();
            core.insert_vl2(vni(100), B, under(2), now);
            for f in &frames {
                let (v, out) = send(&mut core, id, f, now);
                if let Verdict::ToUnderlay { .. } = v {
                    let p = vxlan::Packet::new_checked(&out[..]).unwrap();
                    prop_assert_eq!(p.vni(), vni(100));
                    prop_assert_eq!(&p.payload()[6..12], &A.0[..]);
                }
                let (v, _, _) = recv(&mut core, f, now);
                if let Verdict::ToVnic(to) = v { prop_assert_eq!(to, id); }
            }
        }
    }
}

#[test]
fn local_vnic_is_authoritative_over_cache_answers() {
    let mut core = Core::default();
    let now = Instant::now();
    let a = core.add_vnic(cfg(100, A, "10.0.0.1")).unwrap();
    let b = core.add_vnic(cfg(100, B, "10.0.0.2")).unwrap();
    // A (stale or hostile) VL2 answer claiming B is remote does not redirect local traffic.
    core.insert_vl2(vni(100), B, under(7), now);
    assert_eq!(core.cached_vl2(vni(100), B), None);
    assert!(
        !core.invalidate_vl2(vni(100), B),
        "local entries are not cache entries"
    );
    core.handle_timeout(now + Duration::from_secs(3600));
    let f = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 10);
    assert_eq!(send(&mut core, a, &f, now).0, Verdict::ToVnic(b));
    // Once B leaves, the MAC can be cached as remote again.
    core.remove_vnic(b).unwrap();
    core.insert_vl2(vni(100), B, under(7), now);
    assert_eq!(core.cached_vl2(vni(100), B), Some(under(7)));
    assert_eq!(core.cache_sizes().0, 1);
}

// ----- firewall in the core ------------------------------------------------------------------

const OWNER: &str = "aaaaaaaa-0000-4000-8000-000000000000";
const VM_A: &str = "00000000-0000-4000-8000-00000000000a";
const VM_B: &str = "00000000-0000-4000-8000-00000000000b";

/// A TCP segment `sip:sport → dip:dport` with `flags`.
fn tcp_frame(
    src: Mac,
    dst: Mac,
    sip: &str,
    sport: u16,
    dip: &str,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20];
    EthernetRepr {
        src,
        dst,
        vlan_tci: None,
        ethertype: EtherType::IPV4,
    }
    .emit(&mut f);
    Ipv4Repr {
        src: ip(sip),
        dst: ip(dip),
        protocol: 6,
        payload_len: 20,
        ttl: 64,
    }
    .emit(&mut f[14..]);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[46] = 5 << 4;
    f[47] = flags;
    f
}

/// Rule sets for VM_A (10.0.0.1, firewall on) and VM_B (10.0.0.2) on VNI 100 from `rules`.
fn rule_sets(rules: &[&str], generation: u64) -> (Arc<VnicRuleSet>, Arc<VnicRuleSet>) {
    use crate::firewall::compile::{Firewall, FirewallState, RuleRecord, VmAddress, VmRecord};
    let vm = |uuid: &str, addr: &str, on: bool| VmRecord {
        uuid: uuid.into(),
        owner_uuid: OWNER.into(),
        tags: Default::default(),
        firewall_enabled: on,
        ips: vec![VmAddress {
            vni: 100,
            ip: IpAddr::V4(ip(addr)),
        }],
    };
    let state = FirewallState {
        vms: vec![vm(VM_A, "10.0.0.1", true), vm(VM_B, "10.0.0.2", true)],
        rules: rules
            .iter()
            .enumerate()
            .map(|(i, r)| RuleRecord {
                uuid: format!("11111111-0000-4000-8000-{i:012}"),
                owner_uuid: Some(OWNER.into()),
                global: false,
                enabled: true,
                rule: r.to_string(),
            })
            .collect(),
    };
    let fw = Firewall::new(&state).expect("valid state");
    (
        Arc::new(fw.compile_vnic(VM_A, 100, generation)),
        Arc::new(fw.compile_vnic(VM_B, 100, generation)),
    )
}

#[test]
fn firewall_inbound_default_deny_outbound_with_state() {
    let (mut core, a, now) = one_vnic();
    core.insert_vl2(vni(100), B, under(2), now);
    let (rules_a, _) = rule_sets(&[], 1);
    core.set_firewall(a, Some(rules_a)).unwrap();
    // A new inbound flow is denied by the default, counted per vnic.
    let syn_in = tcp_frame(B, A, "10.0.0.2", 40000, "10.0.0.1", 22, 0x02);
    let (v, _, _) = recv(&mut core, &vxlan_datagram(100, &syn_in), now);
    assert_eq!(v, Verdict::Drop(DropReason::FirewallDefault));
    assert_eq!(
        core.vnic_counters(a)
            .unwrap()
            .drops_of(DropReason::FirewallDefault),
        1
    );
    // Outbound is allowed and its replies come back through the state.
    let syn_out = tcp_frame(A, B, "10.0.0.1", 50000, "10.0.0.2", 80, 0x02);
    assert!(matches!(
        send(&mut core, a, &syn_out, now).0,
        Verdict::ToUnderlay { .. }
    ));
    let synack = tcp_frame(B, A, "10.0.0.2", 80, "10.0.0.1", 50000, 0x12);
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &synack), now).0,
        Verdict::ToVnic(a)
    );
    let ack = tcp_frame(A, B, "10.0.0.1", 50000, "10.0.0.2", 80, 0x10);
    assert!(matches!(
        send(&mut core, a, &ack, now).0,
        Verdict::ToUnderlay { .. }
    ));
    let data_in = tcp_frame(B, A, "10.0.0.2", 80, "10.0.0.1", 50000, 0x18);
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &data_in), now).0,
        Verdict::ToVnic(a)
    );
    let (stats, flows) = core.conntrack_stats().unwrap();
    assert_eq!(flows, 1);
    assert_eq!(stats.new_flows, 1);
    assert!(stats.established >= 3, "{stats:?}");
    // ARP is never filtered.
    core.insert_vl3(
        vni(100),
        IpAddr::V4(ip("10.0.0.2")),
        Vl3Mapping {
            mac: B,
            underlay: under(2),
        },
        now,
    );
    let (v, _) = send(&mut core, a, &arp_request(A, "10.0.0.1", "10.0.0.2"), now);
    assert_eq!(v, Verdict::Reply(a));
}

#[test]
fn firewall_rules_admit_and_block_and_swap_atomically() {
    let (mut core, a, now) = one_vnic();
    let (rules_a, _) = rule_sets(&["FROM vm 00000000-0000-4000-8000-00000000000b TO vm 00000000-0000-4000-8000-00000000000a ALLOW tcp PORT 22"], 1);
    core.set_firewall(a, Some(rules_a.clone())).unwrap();
    let syn = |sport| tcp_frame(B, A, "10.0.0.2", sport, "10.0.0.1", 22, 0x02);
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &syn(40000)), now).0,
        Verdict::ToVnic(a)
    );
    // Another port stays closed.
    let other = tcp_frame(B, A, "10.0.0.2", 40001, "10.0.0.1", 23, 0x02);
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &other), now).0,
        Verdict::Drop(DropReason::FirewallDefault)
    );
    assert_eq!(rules_a.hit_counts().iter().sum::<u64>(), 1);
    // A PRIORITY 1 BLOCK overrides the allow: new flows denied by that rule, and the flow
    // admitted before is revoked on its next packet.
    let (blocking, _) = rule_sets(
        &[
            "FROM vm 00000000-0000-4000-8000-00000000000b TO vm 00000000-0000-4000-8000-00000000000a ALLOW tcp PORT 22",
            "FROM vm 00000000-0000-4000-8000-00000000000b TO vm 00000000-0000-4000-8000-00000000000a BLOCK tcp PORT 22 PRIORITY 1",
        ],
        2,
    );
    core.set_firewall(a, Some(blocking.clone())).unwrap();
    let data = tcp_frame(B, A, "10.0.0.2", 40000, "10.0.0.1", 22, 0x10);
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &data), now).0,
        Verdict::Drop(DropReason::FirewallRule)
    );
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &syn(40002)), now).0,
        Verdict::Drop(DropReason::FirewallRule)
    );
    assert_eq!(core.conntrack_stats().unwrap().0.revoked, 1);
    // Removing the filter passes everything again.
    core.set_firewall(a, None).unwrap();
    assert_eq!(
        recv(&mut core, &vxlan_datagram(100, &other), now).0,
        Verdict::ToVnic(a)
    );
    // A rule set for another VNI is refused.
    let other_vni = Arc::new(VnicRuleSet::empty(VM_A, 200, 3, true));
    assert!(core.set_firewall(a, Some(other_vni)).is_err());
}

#[test]
fn firewall_between_two_local_vnics_checks_both_sides() {
    let (mut core, a, now) = one_vnic();
    let b = core.add_vnic(cfg(100, B, "10.0.0.2")).unwrap();
    let (rules_a, rules_b) = rule_sets(&[], 1);
    core.set_firewall(a, Some(rules_a)).unwrap();
    core.set_firewall(b, Some(rules_b)).unwrap();
    // A → B: A's egress allows, B's ingress default denies.
    let syn = tcp_frame(A, B, "10.0.0.1", 50000, "10.0.0.2", 80, 0x02);
    assert_eq!(
        send(&mut core, a, &syn, now).0,
        Verdict::Drop(DropReason::FirewallDefault)
    );
    // Counted on the sender's frame and on the vnic whose rules denied it.
    assert_eq!(
        core.vnic_counters(a)
            .unwrap()
            .drops_of(DropReason::FirewallDefault),
        1
    );
    assert_eq!(
        core.vnic_counters(b)
            .unwrap()
            .drops_of(DropReason::FirewallDefault),
        1
    );
    // With an allow for B's port 80 from A, the flow and its replies pass locally.
    let (rules_a, rules_b) = rule_sets(
        &["FROM vm 00000000-0000-4000-8000-00000000000a TO vm 00000000-0000-4000-8000-00000000000b ALLOW tcp PORT 80"],
        2,
    );
    core.set_firewall(a, Some(rules_a)).unwrap();
    core.set_firewall(b, Some(rules_b)).unwrap();
    assert_eq!(send(&mut core, a, &syn, now).0, Verdict::ToVnic(b));
    let synack = tcp_frame(B, A, "10.0.0.2", 80, "10.0.0.1", 50000, 0x12);
    assert_eq!(send(&mut core, b, &synack, now).0, Verdict::ToVnic(a));
    // One flow per side: A's egress entry and B's ingress entry.
    assert_eq!(core.conntrack_stats().unwrap().1, 2);
}

#[test]
fn vxlan_only_from_members_while_a_member_set_is_in_force() {
    let (mut core, id, now) = one_vnic();
    let frame = udp_frame(B, A, "10.0.0.2", "10.0.0.1", 22);
    let from = |core: &mut Core, src: SocketAddr| {
        let mut raw = vxlan_datagram(100, &frame);
        let len = raw.len();
        let mut buf = FrameBuf::new(&mut raw, 0, len).unwrap();
        core.from_underlay(src, &mut buf, now)
    };
    // No set: every source (today's behaviour).
    assert_eq!(core.member_count(), None);
    assert_eq!(from(&mut core, under(9)), Verdict::ToVnic(id));
    core.set_members(Some([under(2).ip()]));
    assert_eq!(core.member_count(), Some(1));
    assert_eq!(
        from(&mut core, under(9)),
        Verdict::Drop(DropReason::NotMember)
    );
    // ARP from a non-member is not answered either (no reflection, no learning).
    let arp = vxlan_datagram(100, &arp_request(B, "10.0.0.2", "10.0.0.1"));
    let mut raw = arp.clone();
    let mut buf = FrameBuf::new(&mut raw, 0, arp.len()).unwrap();
    assert_eq!(
        core.from_underlay(under(9), &mut buf, now),
        Verdict::Drop(DropReason::NotMember)
    );
    assert_eq!(core.poll_lookup(), None);
    assert_eq!(from(&mut core, under(2)), Verdict::ToVnic(id));
    // The IPv4-mapped form of a member is that member.
    let mapped = SocketAddr::new("::ffff:127.0.0.2".parse().unwrap(), 4789);
    assert_eq!(from(&mut core, mapped), Verdict::ToVnic(id));
    assert_eq!(core.counters().drops_of(DropReason::NotMember), 2);
    // Replaced whole; an empty set accepts nobody; None accepts everyone again.
    core.set_members(Some([under(9).ip()]));
    assert_eq!(from(&mut core, under(9)), Verdict::ToVnic(id));
    assert_eq!(
        from(&mut core, under(2)),
        Verdict::Drop(DropReason::NotMember)
    );
    core.set_members(Some(std::iter::empty()));
    assert_eq!(
        from(&mut core, under(9)),
        Verdict::Drop(DropReason::NotMember)
    );
    core.set_members(None::<Vec<IpAddr>>);
    assert_eq!(from(&mut core, under(2)), Verdict::ToVnic(id));
}
