//! The namespace side of a vnic (`fabric::dataplane::provision`): a TAP created inside an
//! existing namespace, configured, inspected, removed; verified with `ip` and by reading a
//! frame from the TAP. Needs root; skips with a reason otherwise, except under CI=true. Every
//! test creates its own uniquely named namespaces and removes them on drop.

use std::time::{Duration, Instant};

use fabric::dataplane::provision::{
    create_vnic, remove_vnic, vnic_state, ProvisionError, VnicProvision,
};
use fabric::io::netlink::NetnsGuard;
use fabric::io::tap::Offloads;
use fabric::io::IfName;

#[path = "util/netns.rs"]
mod netns;
use netns::{ip, root_or_skip};

fn ns_name(tag: &str) -> String {
    format!("fabpv-{}-{}", std::process::id(), tag)
}

fn spec(name: &str, queues: usize) -> VnicProvision {
    VnicProvision {
        name: IfName::new(name).unwrap(),
        mac: [0x90, 0xb8, 0xd0, 0x11, 0x22, 0x33],
        addr: "10.251.0.2".parse().unwrap(),
        prefix_len: 24,
        mtu: 1400,
        gateway: Some("10.251.0.1".parse().unwrap()),
        txqueuelen: 5000,
        queues,
    }
}

#[test]
fn vnic_is_created_inside_the_namespace_configured_and_usable() {
    if !root_or_skip("vnic_is_created_inside_the_namespace_configured_and_usable") {
        return;
    }
    let ns = NetnsGuard::create(&ns_name("mk")).unwrap();
    let host_links = ip(&["-o", "link"]);
    let spec = spec("net0", 2);
    let taps = create_vnic(&ns, &spec).unwrap();
    assert_eq!(taps.len(), 2, "one fd per queue");
    assert!(taps.iter().all(|t| t.name().as_str() == "net0"));
    assert!(
        taps[0].offloads().contains(Offloads::CSUM | Offloads::TSO4),
        "{:?}",
        taps[0].offloads()
    );
    let link = ip(&["-n", ns.name(), "-d", "link", "show", "net0"]);
    assert!(link.contains("mtu 1400"), "{link}");
    assert!(link.contains("link/ether 90:b8:d0:11:22:33"), "{link}");
    assert!(link.contains(",UP") || link.contains("<UP"), "{link}");
    assert!(link.contains("qlen 5000"), "{link}");
    assert!(
        link.contains("tun type tap") && link.contains("multi_queue"),
        "{link}"
    );
    assert!(link.contains("vnet_hdr"), "{link}");
    let addr = ip(&["-n", ns.name(), "addr", "show", "net0"]);
    assert!(addr.contains("inet 10.251.0.2/24"), "{addr}");
    let routes = ip(&["-n", ns.name(), "route"]);
    assert!(routes.contains("10.251.0.0/24 dev net0"), "{routes}");
    assert!(
        routes.contains("default via 10.251.0.1 dev net0"),
        "{routes}"
    );
    // The temporary name it was created under in the host's namespace is gone with the move.
    assert_eq!(ip(&["-o", "link"]), host_links);

    // What the agent reads back to decide whether the vnic is as wanted.
    let st = vnic_state(&ns, "net0").unwrap().expect("net0 exists");
    assert_eq!(st.mac, Some(spec.mac));
    assert_eq!((st.mtu, st.up), (1400, true));
    assert_eq!(st.addrs, vec![(spec.addr, 24)], "link-local left out");
    assert_eq!(vnic_state(&ns, "net1").unwrap(), None);

    // A second create under the same name is refused and leaves the first alone.
    let e = create_vnic(&ns, &spec).unwrap_err();
    assert!(matches!(e, ProvisionError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("net0"), "{e}");
    assert!(vnic_state(&ns, "net0").unwrap().is_some());

    // The fds work: a datagram sent inside the namespace to an on-link address makes the
    // kernel ARP out of the TAP, and one of its queues reads that frame here.
    ns.run(|| {
        let s = std::net::UdpSocket::bind("10.251.0.2:0").unwrap();
        s.send_to(b"hello", "10.251.0.77:9").unwrap();
    })
    .unwrap();
    let mut buf = vec![0u8; fabric::io::tap::MAX_FRAME];
    let deadline = Instant::now() + Duration::from_secs(3);
    let arp = 'found: loop {
        for t in &taps {
            if let Some(n) = t.read(&mut buf).unwrap() {
                let f = &buf[12..n];
                if f.len() >= 42 && f[12..14] == [0x08, 0x06] {
                    break 'found f.to_vec();
                }
            }
        }
        assert!(Instant::now() < deadline, "no ARP request on the TAP");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(&arp[6..12], &spec.mac, "ARP from the vnic's MAC");
    assert_eq!(&arp[38..42], &[10, 251, 0, 77]);

    // Dropping every queue removes the device.
    drop(taps);
    assert_eq!(vnic_state(&ns, "net0").unwrap(), None);
    let links = ip(&["-n", ns.name(), "-o", "link"]);
    assert!(!links.contains("net0"), "{links}");
}

#[test]
fn remove_vnic_deletes_a_held_tap_and_is_idempotent() {
    if !root_or_skip("remove_vnic_deletes_a_held_tap_and_is_idempotent") {
        return;
    }
    let ns = NetnsGuard::create(&ns_name("rm")).unwrap();
    let taps = create_vnic(&ns, &spec("net0", 1)).unwrap();
    // Someone (a dataplane) still holds the fd: the link goes anyway, and reads then fail.
    assert!(remove_vnic(&ns, "net0").unwrap(), "there was a link");
    assert_eq!(vnic_state(&ns, "net0").unwrap(), None);
    let mut buf = vec![0u8; fabric::io::tap::MAX_FRAME];
    assert!(
        taps[0].read(&mut buf).is_err(),
        "a deleted TAP reads an error"
    );
    assert!(
        !remove_vnic(&ns, "net0").unwrap(),
        "nothing to remove: Ok(false)"
    );
    // The name is free again: the agent's recreate.
    let again = create_vnic(&ns, &spec("net0", 1)).unwrap();
    assert!(vnic_state(&ns, "net0").unwrap().is_some());
    drop(again);
    drop(taps);
}

#[test]
fn failed_create_leaves_nothing_behind() {
    if !root_or_skip("failed_create_leaves_nothing_behind") {
        return;
    }
    let ns = NetnsGuard::create(&ns_name("bad")).unwrap();
    // The namespace's loopback has the name: refused before anything is created.
    let e = create_vnic(&ns, &spec("lo", 1)).unwrap_err();
    assert!(matches!(e, ProvisionError::Exists { .. }), "{e}");
    // An MTU the kernel refuses: the TAP was created, then goes again with its fd.
    let mut s = spec("net0", 1);
    s.mtu = 100_000;
    let e = create_vnic(&ns, &s).unwrap_err().to_string();
    assert!(e.contains("SIOCSIFMTU"), "{e}");
    // A prefix length the address step refuses, after the TAP exists: same.
    let mut s = spec("net0", 1);
    s.prefix_len = 33;
    let e = create_vnic(&ns, &s).unwrap_err().to_string();
    assert!(e.contains("prefix length 33"), "{e}");
    let links = ip(&["-n", ns.name(), "-o", "link"]);
    assert_eq!(links.lines().count(), 1, "only lo may remain: {links}");
}
