//! Fuzz the dataplane control socket's request parser: arbitrary bytes as one request line.
//! `parse_request` must never panic; a line over the limit must be refused as too long, whatever
//! it holds; a parsed request must survive a serialize/parse round trip unchanged; and a
//! `vnic_attach` spec that validates must hold only what a vnic may own (unicast MAC, 24-bit VNI,
//! MTU in range, an address that passes the host-address check), so the daemon can never be
//! handed state the validator promised to keep out.
#![no_main]

use fabric::dataplane::control::{check_host_address, parse_request, Request, RequestError};
use libfuzzer_sys::fuzz_target;

/// Small, so the fuzzer reaches the limit and both sides of it.
const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let r = parse_request(data, LIMIT);
    if data.len() > LIMIT {
        assert!(matches!(r, Err(RequestError::TooLong { limit: LIMIT })));
        return;
    }
    let Ok(req) = r else { return };
    let again = serde_json::to_vec(&req).expect("a parsed request serializes");
    let back = parse_request(&again, usize::MAX).expect("a serialized request parses");
    assert_eq!(back, req);
    if let Request::VnicAttach(spec) | Request::VnicAdd(spec) = &req {
        if let Ok(v) = spec.validate() {
            assert!(v.mac.is_unicast(), "{spec:?}");
            assert!(v.vni.get() <= 0x00ff_ffff);
            assert!((576..=9000).contains(&v.mtu));
            let max = if v.ip.is_ipv4() { 32 } else { 128 };
            assert!((1..=max).contains(&v.prefix_len));
            assert!(check_host_address(v.ip, v.prefix_len).is_ok());
            assert!(!v.ip.is_unspecified() && !v.ip.is_loopback() && !v.ip.is_multicast());
        }
    }
});
