//! Arbitrary datagrams from the underlay into the core: never panic, deliver only to a vnic
//! on the datagram's VNI whose MAC is the inner destination, and never deliver to the
//! firewalled vnic what its rules (only tcp port 80 inbound) do not allow.
#![no_main]

use fabric::core::{Config, Core, FrameBuf, Verdict, VnicConfig};
use fabric::firewall::compile::{
    Firewall, FirewallState, RuleRecord, VmAddress, VmRecord, VnicRuleSet,
};
use fabric::firewall::conntrack::ConntrackConfig;
use fabric::firewall::packet::summarize;
use fabric::wire::{vxlan, Mac, Vni};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// The rule set of vnic 10.0.0.2 on VNI 4001: inbound tcp port 80 only (compiled once).
fn rules() -> Arc<VnicRuleSet> {
    static RULES: OnceLock<Arc<VnicRuleSet>> = OnceLock::new();
    RULES
        .get_or_init(|| {
            let state = FirewallState {
                vms: vec![VmRecord {
                    uuid: "00000000-0000-4000-8000-000000000002".into(),
                    owner_uuid: "aaaaaaaa-0000-4000-8000-000000000000".into(),
                    tags: Default::default(),
                    firewall_enabled: true,
                    ips: vec![VmAddress {
                        vni: 4001,
                        ip: Ipv4Addr::new(10, 0, 0, 2).into(),
                    }],
                }],
                rules: vec![RuleRecord {
                    uuid: "11111111-0000-4000-8000-000000000001".into(),
                    owner_uuid: None,
                    global: true,
                    enabled: true,
                    rule: "FROM any TO all vms ALLOW tcp PORT 80".into(),
                }],
            };
            Arc::new(Firewall::new(&state).expect("valid").compile_vnic(
                "00000000-0000-4000-8000-000000000002",
                4001,
                1,
            ))
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    // A small connection-tracking table: the default one (65 536 flows) would be allocated
    // for every input.
    let mut core = Core::new(Config {
        conntrack: ConntrackConfig {
            max_flows: 64,
            ..ConntrackConfig::default()
        },
        ..Config::default()
    });
    let mut vnics = Vec::new();
    for (v, last) in [(4001u32, 1u8), (4002, 1), (4001, 2)] {
        let cfg = VnicConfig {
            vni: Vni::new(v).unwrap(),
            mac: Mac([2, 0, 0, 0, 0, last]),
            ipv4: vec![Ipv4Addr::new(10, 0, 0, last)],
            ipv6: vec![],
            mtu: 1500,
        };
        vnics.push((core.add_vnic(cfg.clone()).unwrap(), cfg));
    }
    let filtered = vnics[2].0;
    core.set_firewall(filtered, Some(rules())).unwrap();
    let src: SocketAddr = "127.0.0.9:4789".parse().unwrap();
    let mut raw = data.to_vec();
    raw.resize(data.len() + 64, 0);
    let mut buf = FrameBuf::new(&mut raw, 0, data.len()).unwrap();
    match core.from_underlay(src, &mut buf, Instant::now()) {
        Verdict::ToVnic(id) => {
            let p = vxlan::Packet::new_checked(data).expect("delivered means valid VXLAN");
            let cfg = &vnics.iter().find(|(v, _)| *v == id).unwrap().1;
            assert_eq!(p.vni(), cfg.vni, "delivered across VNIs");
            assert_eq!(&buf.bytes()[0..6], &cfg.mac.0, "delivered to the wrong MAC");
            if id == filtered {
                // A fresh core has no flows: only what the rules admit, or what the firewall
                // does not judge (non-IP, non-first fragments, neighbour discovery).
                if let Ok(s) = summarize(buf.bytes()) {
                    let ndp = s.proto == 58 && s.icmp.is_some_and(|i| (133..=137).contains(&i.ty));
                    assert!(
                        ndp || (s.proto == 6 && s.dst_port == 80),
                        "firewalled vnic got {s:?}"
                    );
                }
            }
        }
        Verdict::ToUnderlay { dst, .. } => {
            assert_eq!(dst, src, "ARP answers go back to the asker only");
            vxlan::Packet::new_checked(buf.bytes()).expect("valid VXLAN answer");
        }
        Verdict::Drop(_) => {}
        v => panic!("unexpected verdict {v:?}"),
    }
});
