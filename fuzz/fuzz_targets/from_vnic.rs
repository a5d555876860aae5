//! Arbitrary frames from a container into the core: never panic, and whatever leaves for
//! the underlay is a VXLAN datagram on the sender's own VNI carrying the sender's MAC.
#![no_main]

use fabric::core::{
    Core, FrameBuf, LookupAnswer, Output, Verdict, Vl3Mapping, VnicConfig, HEADROOM,
};
use fabric::wire::{vxlan, Mac, Vni};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

const A: Mac = Mac([2, 0, 0, 0, 0, 1]);

fuzz_target!(|data: &[u8]| {
    let vni = Vni::new(4001).unwrap();
    let mut core = Core::default();
    let id = core
        .add_vnic(VnicConfig {
            vni,
            mac: A,
            ipv4: vec![Ipv4Addr::new(10, 0, 0, 1)],
            ipv6: vec!["fd00::1".parse().unwrap()],
            mtu: 1500,
        })
        .unwrap();
    let under: SocketAddr = "127.0.0.2:4789".parse().unwrap();
    let now = Instant::now();
    core.insert_vl3(
        vni,
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        Vl3Mapping {
            mac: Mac([2, 0, 0, 0, 0, 2]),
            underlay: under,
        },
        now,
    );
    // Split the input into frames on a 2-byte length prefix, so one input is a sequence.
    let mut rest = data;
    let mut raw = vec![0u8; HEADROOM + 65_536];
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let frame = &rest[2..2 + n];
        rest = &rest[2 + n..];
        raw[HEADROOM..HEADROOM + n].copy_from_slice(frame);
        // Most frames get the vnic's own source MAC, so the fuzzer gets past the anti-spoofing
        // check into ARP/NDP/IP handling; the length prefix's top bit keeps the raw bytes.
        if rest.len() % 4 != 0 && n >= 12 {
            raw[HEADROOM + 6..HEADROOM + 12].copy_from_slice(&A.0);
        }
        let mut buf = FrameBuf::new(&mut raw, HEADROOM, n).unwrap();
        if let Verdict::ToUnderlay { .. } = core.from_vnic(id, &mut buf, now) {
            check(buf.bytes(), vni);
        }
    }
    // Answer every lookup (found for VL2, not found for VL3) and check what is released.
    while let Some(key) = core.poll_lookup() {
        let ans = match key {
            fabric::core::LookupKey::Vl2 { vni, mac } => LookupAnswer::Vl2 {
                vni,
                mac,
                result: Ok(Some(under)),
            },
            fabric::core::LookupKey::Vl3 { vni, ip } => LookupAnswer::Vl3 {
                vni,
                ip,
                result: Ok(None),
            },
        };
        core.handle_answer(ans, now);
    }
    while let Some(out) = core.poll_output() {
        match out {
            Output::Underlay { datagram, .. } => check(&datagram, vni),
            Output::Vnic { vnic, .. } => assert_eq!(vnic, id),
        }
    }
    core.handle_timeout(now + Duration::from_secs(10));
    assert_eq!(core.held(), (0, 0));
});

fn check(d: &[u8], vni: Vni) {
    let p = vxlan::Packet::new_checked(d).expect("we emit valid VXLAN");
    assert_eq!(p.vni(), vni);
    assert_eq!(&p.payload()[6..12], &A.0, "source MAC is the vnic's");
}
