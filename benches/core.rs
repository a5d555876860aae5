//! Criterion benches of the sans-IO core's per-frame paths.
//!
//! Targets (issue 2): encapsulation with lookup and decapsulation with delivery at ≤ 50 ns per
//! 64-byte frame. Run: `cargo bench --bench core`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fabric::core::{Core, FrameBuf, Verdict, Vl3Mapping, VnicConfig, HEADROOM};
use fabric::wire::{arp, vxlan, EtherType, EthernetRepr, Ipv4Repr, Mac, Vni};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

const A: Mac = Mac([2, 0, 0, 0, 0, 1]);
const B: Mac = Mac([2, 0, 0, 0, 0, 2]);

fn vni() -> Vni {
    Vni::new(4001).unwrap()
}

/// An Ethernet/IPv4/UDP frame of exactly `len` bytes from A (10.0.0.1) to `dst`.
fn frame(dst: Mac, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    EthernetRepr {
        src: A,
        dst,
        vlan_tci: None,
        ethertype: EtherType::IPV4,
    }
    .emit(&mut f);
    Ipv4Repr {
        src: Ipv4Addr::new(10, 0, 0, 1),
        dst: Ipv4Addr::new(10, 0, 0, 2),
        protocol: 17,
        payload_len: (len - 34) as u16,
        ttl: 64,
    }
    .emit(&mut f[14..]);
    f
}

fn core_with_a() -> (Core, fabric::core::VnicId) {
    let mut core = Core::default();
    let id = core
        .add_vnic(VnicConfig {
            vni: vni(),
            mac: A,
            ipv4: vec![Ipv4Addr::new(10, 0, 0, 1)],
            ipv6: vec![],
            mtu: 1500,
        })
        .unwrap();
    (core, id)
}

fn encap(c: &mut Criterion) {
    let mut g = c.benchmark_group("encap_with_lookup");
    for len in [64usize, 1400] {
        let (mut core, id) = core_with_a();
        let now = Instant::now();
        core.insert_vl2(vni(), B, "127.0.0.2:4789".parse().unwrap(), now);
        let mut raw = vec![0u8; HEADROOM + len];
        raw[HEADROOM..].copy_from_slice(&frame(B, len));
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, &len| {
            b.iter(|| {
                let mut buf = FrameBuf::new(&mut raw, HEADROOM, len).unwrap();
                let v = core.from_vnic(id, &mut buf, now);
                debug_assert!(matches!(v, Verdict::ToUnderlay { .. }));
                black_box(v)
            })
        });
    }
    g.finish();
}

fn decap(c: &mut Criterion) {
    let mut g = c.benchmark_group("decap_with_delivery");
    for len in [64usize, 1400] {
        let (mut core, _id) = core_with_a();
        let now = Instant::now();
        let src: SocketAddr = "127.0.0.2:4789".parse().unwrap();
        let mut raw = vec![0u8; vxlan::HEADER_LEN + len];
        vxlan::write_header(&mut raw, vni());
        let mut inner = frame(A, len);
        inner[6..12].copy_from_slice(&B.0);
        raw[vxlan::HEADER_LEN..].copy_from_slice(&inner);
        let total = raw.len();
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
            b.iter(|| {
                let mut buf = FrameBuf::new(&mut raw, 0, total).unwrap();
                let v = core.from_underlay(src, &mut buf, now);
                debug_assert!(matches!(v, Verdict::ToVnic(_)));
                black_box(v)
            })
        });
    }
    g.finish();
}

/// The same decapsulation with a member set in force (`--peer`, the agent's `members`): one
/// hash lookup of the outer source per datagram.
fn decap_members(c: &mut Criterion) {
    let mut g = c.benchmark_group("decap_with_delivery_members");
    let len = 64usize;
    let (mut core, _id) = core_with_a();
    let src: SocketAddr = "127.0.0.2:4789".parse().unwrap();
    let members: Vec<IpAddr> = (1..=64u8)
        .map(|n| IpAddr::V4(Ipv4Addr::new(192, 168, 0, n)))
        .chain([src.ip()])
        .collect();
    core.set_members(Some(members));
    let now = Instant::now();
    let mut raw = vec![0u8; vxlan::HEADER_LEN + len];
    vxlan::write_header(&mut raw, vni());
    let mut inner = frame(A, len);
    inner[6..12].copy_from_slice(&B.0);
    raw[vxlan::HEADER_LEN..].copy_from_slice(&inner);
    let total = raw.len();
    g.throughput(Throughput::Elements(1));
    g.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
        b.iter(|| {
            let mut buf = FrameBuf::new(&mut raw, 0, total).unwrap();
            let v = core.from_underlay(src, &mut buf, now);
            debug_assert!(matches!(v, Verdict::ToVnic(_)));
            black_box(v)
        })
    });
    g.finish();
}

fn arp_proxy(c: &mut Criterion) {
    let (mut core, id) = core_with_a();
    let now = Instant::now();
    let target = Ipv4Addr::new(10, 0, 0, 2);
    core.insert_vl3(
        vni(),
        IpAddr::V4(target),
        Vl3Mapping {
            mac: B,
            underlay: "127.0.0.2:4789".parse().unwrap(),
        },
        now,
    );
    let mut req = vec![0u8; 42];
    EthernetRepr {
        src: A,
        dst: Mac::BROADCAST,
        vlan_tci: None,
        ethertype: EtherType::ARP,
    }
    .emit(&mut req);
    arp::Repr {
        op: arp::Operation::Request,
        sha: A,
        spa: Ipv4Addr::new(10, 0, 0, 1),
        tha: Mac::ZERO,
        tpa: target,
    }
    .emit(&mut req[14..]);
    let mut raw = vec![0u8; HEADROOM + 64];
    // Includes restoring the 42-byte request each iteration (the reply overwrites it).
    c.bench_function("arp_proxy_answer", |b| {
        b.iter(|| {
            raw[HEADROOM..HEADROOM + 42].copy_from_slice(&req);
            let mut buf = FrameBuf::new(&mut raw, HEADROOM, 42).unwrap();
            let v = core.from_vnic(id, &mut buf, now);
            debug_assert!(matches!(v, Verdict::Reply(_)));
            black_box(v)
        })
    });
}

fn big_cache(c: &mut Criterion) {
    const N: u32 = 1_000_000;
    let (mut core, id) = core_with_a();
    let now = Instant::now();
    let mac_of = |i: u32| {
        let b = i.to_be_bytes();
        Mac([2, 0xaa, b[0], b[1], b[2], b[3]])
    };
    for i in 0..N {
        core.insert_vl2(
            vni(),
            mac_of(i),
            SocketAddr::from(([127, 0, 0, 2], 4789)),
            now,
        );
    }
    // A pseudo-random walk over the million entries defeats the CPU caches.
    let order: Vec<Mac> = (0..4096u32)
        .map(|i| mac_of(i.wrapping_mul(2_654_435_761) % N))
        .collect();
    let len = 64;
    let mut raw = vec![0u8; HEADROOM + len];
    raw[HEADROOM..].copy_from_slice(&frame(B, len));
    let mut k = 0usize;
    c.bench_function("encap_lookup_hit_1M_entries", |b| {
        b.iter(|| {
            k = (k + 1) & 4095;
            raw[HEADROOM..HEADROOM + 6].copy_from_slice(&order[k].0);
            let mut buf = FrameBuf::new(&mut raw, HEADROOM, len).unwrap();
            let v = core.from_vnic(id, &mut buf, now);
            debug_assert!(matches!(v, Verdict::ToUnderlay { .. }));
            black_box(v)
        })
    });
}

/// The same two paths for a vnic whose firewall is on (default policy plus a few rules), on an
/// established UDP flow: the added cost is parsing the packet summary and one conntrack
/// lookup per frame.
fn firewalled(c: &mut Criterion) {
    use fabric::firewall::compile::{Firewall, FirewallState, RuleRecord, VmAddress, VmRecord};
    use std::sync::Arc;
    let owner = "aaaaaaaa-0000-4000-8000-000000000000";
    let vm_a = "00000000-0000-4000-8000-00000000000a";
    let state = FirewallState {
        vms: vec![VmRecord {
            uuid: vm_a.into(),
            owner_uuid: owner.into(),
            tags: Default::default(),
            firewall_enabled: true,
            ips: vec![VmAddress {
                vni: vni().get(),
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            }],
        }],
        rules: (0..8)
            .map(|i| RuleRecord {
                uuid: format!("11111111-0000-4000-8000-{i:012}"),
                owner_uuid: Some(owner.into()),
                global: false,
                enabled: true,
                rule: format!("FROM any TO vm {vm_a} ALLOW tcp PORT {}", 8000 + i),
            })
            .collect(),
    };
    let rules = Arc::new(
        Firewall::new(&state)
            .unwrap()
            .compile_vnic(vm_a, vni().get(), 1),
    );
    let (mut core, id) = core_with_a();
    core.set_firewall(id, Some(rules)).unwrap();
    let now = Instant::now();
    let src: SocketAddr = "127.0.0.2:4789".parse().unwrap();
    core.insert_vl2(vni(), B, src, now);
    let len = 64;
    let mut out = vec![0u8; HEADROOM + len];
    out[HEADROOM..].copy_from_slice(&frame(B, len));
    // The reply: B → A, ports swapped (frame() writes zero ports, so the same 5-tuple).
    let mut back = vec![0u8; vxlan::HEADER_LEN + len];
    vxlan::write_header(&mut back, vni());
    let mut inner = frame(A, len);
    inner[6..12].copy_from_slice(&B.0);
    inner[26..30].copy_from_slice(&[10, 0, 0, 2]);
    inner[30..34].copy_from_slice(&[10, 0, 0, 1]);
    back[vxlan::HEADER_LEN..].copy_from_slice(&inner);
    let total = back.len();
    {
        let mut buf = FrameBuf::new(&mut out, HEADROOM, len).unwrap();
        assert!(matches!(
            core.from_vnic(id, &mut buf, now),
            Verdict::ToUnderlay { .. }
        ));
    }
    let mut g = c.benchmark_group("firewalled_established");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encap_64", |b| {
        b.iter(|| {
            let mut buf = FrameBuf::new(&mut out, HEADROOM, len).unwrap();
            let v = core.from_vnic(id, &mut buf, now);
            debug_assert!(matches!(v, Verdict::ToUnderlay { .. }));
            black_box(v)
        })
    });
    g.bench_function("decap_64", |b| {
        b.iter(|| {
            let mut buf = FrameBuf::new(&mut back, 0, total).unwrap();
            let v = core.from_underlay(src, &mut buf, now);
            debug_assert!(matches!(v, Verdict::ToVnic(_)));
            black_box(v)
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    encap,
    decap,
    decap_members,
    arp_proxy,
    big_cache,
    firewalled
);
criterion_main!(benches);
