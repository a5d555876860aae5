//! Arbitrary datagrams from the underlay into the core: never panic, deliver only to a vnic
//! on the datagram's VNI whose MAC is the inner destination.
#![no_main]

use fabric::core::{Core, FrameBuf, Verdict, VnicConfig};
use fabric::wire::{vxlan, Mac, Vni};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    let mut core = Core::default();
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
        }
        Verdict::ToUnderlay { dst, .. } => {
            assert_eq!(dst, src, "ARP answers go back to the asker only");
            vxlan::Packet::new_checked(buf.bytes()).expect("valid VXLAN answer");
        }
        Verdict::Drop(_) => {}
        v => panic!("unexpected verdict {v:?}"),
    }
});
