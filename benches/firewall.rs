//! Criterion benches of the firewall fast path.
//!
//! Targets (issue 5): established-flow check ≤ 30 ns per packet; first-packet classification
//! against 1 000 rules ≤ 2 µs. Run: `cargo bench --bench firewall`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use fabric::firewall::compile::{
    Direction, Firewall, FirewallState, RuleQuery, RuleRecord, VmAddress, VmRecord, VnicRuleSet,
};
use fabric::firewall::conntrack::{Conntrack, ConntrackConfig, PacketSummary, TCP_ACK, TCP_SYN};

const OWNER: &str = "aaaaaaaa-0000-4000-8000-000000000000";
const VNI: u32 = 4001;

fn vm_uuid(i: u32) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

fn v4(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

/// A directory of 200 VMs (tags role=r0..r9) and `n` inbound TCP rules to VM 0, half
/// `PORT all` from address sets, half single ports from tags and subnets, none matching the
/// probe packet: a full walk of the TCP bucket, the worst case.
fn ruleset(n: u32) -> VnicRuleSet {
    let vms = (0..200)
        .map(|i| VmRecord {
            uuid: vm_uuid(i),
            owner_uuid: OWNER.into(),
            tags: [("role".to_string(), format!("r{}", i % 10))]
                .into_iter()
                .collect(),
            firewall_enabled: true,
            ips: vec![VmAddress {
                vni: VNI,
                ip: v4(i + 1),
            }],
        })
        .collect();
    let target = vm_uuid(0);
    let rules = (0..n)
        .map(|i| {
            let text = if i % 2 == 0 {
                format!(
                    "FROM (ip 172.16.{}.1 OR ip 172.16.{}.2 OR ip 172.16.{}.3 OR subnet 192.168.{}.0/24) TO vm {target} ALLOW tcp PORT all",
                    i % 250,
                    i % 250,
                    i % 250,
                    i % 250
                )
            } else {
                format!(
                    "FROM (tag role = r{} OR subnet 172.17.{}.0/24) TO vm {target} ALLOW tcp PORTS {}, {}-{}",
                    i % 10,
                    i % 250,
                    1000 + i,
                    20000 + i,
                    20010 + i
                )
            };
            RuleRecord {
                uuid: format!("cccccccc-0000-4000-8000-{i:012x}"),
                owner_uuid: Some(OWNER.into()),
                global: false,
                enabled: true,
                rule: text,
            }
        })
        .collect();
    let fw = Firewall::new(&FirewallState { vms, rules }).expect("valid state");
    fw.compile_vnic(&target, VNI, 1)
}

fn established(c: &mut Criterion) {
    let rs = ruleset(1000);
    let mut ct = Conntrack::new(ConntrackConfig {
        max_flows: 1 << 16,
        ..Default::default()
    });
    let me = v4(1);
    const FLOWS: u16 = 4096;
    let now = Duration::from_secs(1);
    // Outbound connections from the VM, handshake done.
    for p in 0..FLOWS {
        let peer = IpAddr::V4(Ipv4Addr::new(198, 51, 100, (p % 200) as u8));
        ct.classify(
            &rs,
            Direction::Egress,
            &PacketSummary::tcp(me, 10000 + p, peer, 443, TCP_SYN),
            now,
        );
        ct.classify(
            &rs,
            Direction::Ingress,
            &PacketSummary::tcp(peer, 443, me, 10000 + p, TCP_SYN | TCP_ACK),
            now,
        );
        ct.classify(
            &rs,
            Direction::Egress,
            &PacketSummary::tcp(me, 10000 + p, peer, 443, TCP_ACK),
            now,
        );
    }
    let pkts: Vec<PacketSummary> = (0..FLOWS)
        .map(|p| {
            let peer = IpAddr::V4(Ipv4Addr::new(198, 51, 100, (p % 200) as u8));
            PacketSummary::tcp(peer, 443, me, 10000 + p, TCP_ACK)
        })
        .collect();
    let mut g = c.benchmark_group("firewall");
    g.throughput(Throughput::Elements(1));
    g.bench_function("established_flow_one", |b| {
        let p = pkts[7];
        b.iter(|| black_box(ct.classify(&rs, Direction::Ingress, black_box(&p), now)))
    });
    let mut i = 0usize;
    g.bench_function("established_flow_4096_round_robin", |b| {
        b.iter(|| {
            i = (i + 1) & (FLOWS as usize - 1);
            black_box(ct.classify(&rs, Direction::Ingress, black_box(&pkts[i]), now))
        })
    });
    assert_eq!(
        ct.stats().new_flows,
        FLOWS as u64,
        "every benchmarked packet hit its flow"
    );
    // IPv6 takes the general key path (the IPv4 one is specialised).
    let mut ct6 = Conntrack::new(ConntrackConfig {
        max_flows: 1 << 16,
        ..Default::default()
    });
    let (me6, peer6) = (
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
    );
    let rs6 = VnicRuleSet::empty(&vm_uuid(0), VNI, 1, true);
    let out6 = |flags| PacketSummary::tcp(me6, 10007, peer6, 443, flags);
    let in6 = |flags| PacketSummary::tcp(peer6, 443, me6, 10007, flags);
    ct6.classify(&rs6, Direction::Egress, &out6(TCP_SYN), now);
    ct6.classify(&rs6, Direction::Ingress, &in6(TCP_SYN | TCP_ACK), now);
    ct6.classify(&rs6, Direction::Egress, &out6(TCP_ACK), now);
    g.bench_function("established_flow_one_v6", |b| {
        let p = in6(TCP_ACK);
        b.iter(|| black_box(ct6.classify(&rs6, Direction::Ingress, black_box(&p), now)))
    });
    let s6 = ct6.stats();
    assert_eq!(
        (s6.new_flows, s6.denied_by_default),
        (1, 0),
        "every benchmarked IPv6 packet hit its flow"
    );
    g.finish();
}

fn first_packet(c: &mut Criterion) {
    let rs = ruleset(1000);
    assert_eq!(rs.rules().len(), 1000);
    let mut g = c.benchmark_group("firewall");
    g.throughput(Throughput::Elements(1));
    let probe = RuleQuery {
        peer: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        proto: 6,
        dst_port: 5555,
        icmp: (0, 0),
    };
    g.bench_function("first_packet_1000_rules_evaluate", |b| {
        b.iter(|| black_box(rs.evaluate(Direction::Ingress, black_box(&probe))))
    });
    // Through conntrack: a new inbound SYN that no rule admits (denied: nothing inserted).
    let mut ct = Conntrack::new(ConntrackConfig::default());
    let syn = PacketSummary::tcp(probe.peer, 40000, v4(1), 5555, TCP_SYN);
    let now = Duration::from_secs(1);
    g.bench_function("first_packet_1000_rules_classify", |b| {
        b.iter(|| black_box(ct.classify(&rs, Direction::Ingress, black_box(&syn), now)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = established, first_packet
}
criterion_main!(benches);
