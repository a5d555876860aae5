//! Fuzz target: the firewall's frame parser never panics, and what it accepts is consistent
//! (TCP/UDP carry no ICMP fields, ICMP carries no ports, the family of both addresses agrees).
#![no_main]

use fabric::firewall::packet::summarize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = summarize(data) else {
        return;
    };
    assert_eq!(s.src.is_ipv4(), s.dst.is_ipv4(), "one family per packet");
    match s.proto {
        6 | 17 => assert!(s.icmp.is_none()),
        1 | 58 if s.icmp.is_some() => {
            assert_eq!((s.src_port, s.dst_port, s.tcp_flags), (0, 0, 0));
            if let Some(inner) = s.icmp.and_then(|i| i.inner) {
                assert_eq!(
                    inner.src.is_ipv4(),
                    s.src.is_ipv4(),
                    "inner of the same family"
                );
            }
        }
        _ => assert_eq!(
            (s.src_port, s.dst_port, s.tcp_flags, s.icmp),
            (0, 0, 0, None)
        ),
    }
});
