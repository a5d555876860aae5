//! Namespaces, veth, addresses and routes through netlink, verified with `ip` (vnic setup is
//! in `dataplane_provision.rs`).
//! Needs root; skips with a reason otherwise, except under CI=true. Every test creates its own
//! uniquely named namespaces and removes them on drop, also when an assertion fails.

use std::net::IpAddr;
use std::process::Command;

use fabric::io::netlink::{Netlink, Netns, NetnsGuard, Route};

#[path = "util/root.rs"]
mod root;
use root::root_or_skip;

fn ns_name(tag: &str) -> String {
    format!("fabio-{}-{}", std::process::id(), tag)
}

/// Runs `ip ARGS` and returns stdout; panics with stderr on failure.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2 installed?)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn netns_create_open_delete() {
    if !root_or_skip("netns_create_open_delete") {
        return;
    }
    let name = ns_name("a");
    {
        let ns = NetnsGuard::create(&name).unwrap();
        assert!(Netns::exists(&name));
        assert!(ip(&["netns", "list"]).contains(&name));
        // A fresh namespace has only a down loopback.
        let links = ip(&["-n", &name, "-o", "link"]);
        assert_eq!(links.lines().count(), 1, "{links}");
        assert!(links.contains("lo:"));
        // Creating it twice fails and leaves the first intact.
        assert!(Netns::create(&name).is_err());
        assert!(Netns::exists(&name));
        // run() executes inside it: the thread sees only its loopback.
        let mut nl = Netlink::open_in(&ns).unwrap();
        let lo = nl.link_by_name("lo").unwrap();
        assert_eq!(lo.index, 1);
        assert!(nl.link_by_name("eth0").is_err());
        let inside = ns
            .run(|| std::fs::read_dir("/proc/self/net").is_ok())
            .unwrap();
        assert!(inside);
    }
    assert!(!Netns::exists(&name), "guard must delete the namespace");
    assert!(!ip(&["netns", "list"]).contains(&name));
}

#[test]
fn veth_between_namespaces_carries_traffic() {
    if !root_or_skip("veth_between_namespaces_carries_traffic") {
        return;
    }
    let a = NetnsGuard::create(&ns_name("va")).unwrap();
    let b = NetnsGuard::create(&ns_name("vb")).unwrap();
    let mut nla = Netlink::open_in(&a).unwrap();
    let mut nlb = Netlink::open_in(&b).unwrap();
    nla.create_veth("va0", "vb0", Some(&b)).unwrap();
    let la = nla.link_by_name("va0").unwrap();
    let lb = nlb.link_by_name("vb0").unwrap();
    nla.set_mtu(la.index, 1400).unwrap();
    nla.set_mac(la.index, [0x02, 0, 0, 0, 0xaa, 1]).unwrap();
    nla.add_address(la.index, "10.250.0.1".parse().unwrap(), 24)
        .unwrap();
    nlb.add_address(lb.index, "10.250.0.2".parse().unwrap(), 24)
        .unwrap();
    nlb.add_address(lb.index, "fd00:250::2".parse().unwrap(), 64)
        .unwrap();
    for (nl, idx) in [(&mut nla, la.index), (&mut nlb, lb.index)] {
        nl.set_up(idx, true).unwrap();
        nl.set_up(1, true).unwrap();
    }
    // A route with a gateway in B (on-link) and a plain on-link route.
    nlb.add_route(&Route {
        dst: "10.99.0.0".parse().unwrap(),
        prefix_len: 16,
        gateway: Some("10.250.0.1".parse().unwrap()),
        oif: lb.index,
    })
    .unwrap();
    nlb.add_route(&Route {
        dst: "10.98.0.0".parse().unwrap(),
        prefix_len: 16,
        gateway: None,
        oif: lb.index,
    })
    .unwrap();
    let link = nla.link_by_index(la.index).unwrap();
    assert_eq!(
        (link.mtu, link.mac, link.up),
        (1400, Some([2, 0, 0, 0, 0xaa, 1]), true)
    );

    let la_text = ip(&["-n", a.name(), "addr", "show", "va0"]);
    assert!(
        la_text.contains("inet 10.250.0.1/24") && la_text.contains("mtu 1400"),
        "{la_text}"
    );
    let lb_text = ip(&["-n", b.name(), "addr", "show", "vb0"]);
    assert!(lb_text.contains("inet6 fd00:250::2/64"), "{lb_text}");
    let routes = ip(&["-n", b.name(), "route"]);
    assert!(
        routes.contains("10.99.0.0/16 via 10.250.0.1 dev vb0"),
        "{routes}"
    );
    assert!(routes.contains("10.98.0.0/16 dev vb0"), "{routes}");
    // Traffic crosses the veth: a UDP socket created inside B receives what A sends (sockets
    // stay in the namespace they were created in). IPv4 and IPv6 (no DAD delay).
    let rx = b
        .run(|| std::net::UdpSocket::bind("0.0.0.0:7777").unwrap())
        .unwrap();
    let rx6 = b
        .run(|| std::net::UdpSocket::bind("[fd00:250::2]:7777").unwrap())
        .unwrap();
    rx.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    rx6.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    nla.add_address(la.index, "fd00:250::1".parse().unwrap(), 64)
        .unwrap();
    a.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"over veth", "10.250.0.2:7777").unwrap();
        let s6 = std::net::UdpSocket::bind("[fd00:250::1]:0").unwrap();
        s6.send_to(b"over veth v6", "[fd00:250::2]:7777").unwrap();
    })
    .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = rx.recv_from(&mut buf).expect("datagram over the veth");
    assert_eq!(
        (&buf[..n], from.ip()),
        (&b"over veth"[..], "10.250.0.1".parse::<IpAddr>().unwrap())
    );
    let (n, _) = rx6
        .recv_from(&mut buf)
        .expect("IPv6 datagram over the veth");
    assert_eq!(&buf[..n], b"over veth v6");

    // Errors name the message and the target.
    let err = nla
        .add_address(la.index, "10.250.0.1".parse().unwrap(), 24)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("RTM_NEWADDR") && err.contains("10.250.0.1/24"),
        "{err}"
    );
    nla.delete_link(la.index).unwrap();
    assert!(
        nlb.link_by_name("vb0").is_err(),
        "deleting one veth end removes the peer"
    );
}

/// The multi-host test topology: "hosts" as namespaces joined by veth to a bridge namespace.
#[test]
fn hosts_joined_by_a_bridge_namespace() {
    if !root_or_skip("hosts_joined_by_a_bridge_namespace") {
        return;
    }
    let br = NetnsGuard::create(&ns_name("br")).unwrap();
    let hosts: Vec<NetnsGuard> = (0..3)
        .map(|i| NetnsGuard::create(&ns_name(&format!("h{i}"))).unwrap())
        .collect();
    let mut nlb = Netlink::open_in(&br).unwrap();
    nlb.create_bridge("br0").unwrap();
    let bridge = nlb.link_by_name("br0").unwrap().index;
    nlb.set_up(bridge, true).unwrap();
    for (i, h) in hosts.iter().enumerate() {
        let (outer, inner) = (format!("p{i}"), format!("u{i}"));
        nlb.create_veth(&outer, &inner, Some(h)).unwrap();
        let p = nlb.link_by_name(&outer).unwrap().index;
        nlb.set_master(p, Some(bridge)).unwrap();
        nlb.set_up(p, true).unwrap();
        let mut nlh = Netlink::open_in(h).unwrap();
        let u = nlh.link_by_name(&inner).unwrap().index;
        nlh.add_address(u, format!("10.254.0.{}", i + 1).parse().unwrap(), 24)
            .unwrap();
        nlh.set_up(u, true).unwrap();
    }
    let master = ip(&["-n", br.name(), "-o", "link", "show", "master", "br0"]);
    assert_eq!(master.lines().count(), 3, "{master}");
    // Host 0 reaches hosts 1 and 2 through the bridge.
    let rx: Vec<std::net::UdpSocket> = hosts[1..]
        .iter()
        .map(|h| {
            let s = h
                .run(|| std::net::UdpSocket::bind("0.0.0.0:4789").unwrap())
                .unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
                .unwrap();
            s
        })
        .collect();
    hosts[0]
        .run(|| {
            let s = std::net::UdpSocket::bind("10.254.0.1:0").unwrap();
            s.send_to(b"to h1", "10.254.0.2:4789").unwrap();
            s.send_to(b"to h2", "10.254.0.3:4789").unwrap();
        })
        .unwrap();
    let mut buf = [0u8; 16];
    for (s, want) in rx.iter().zip([&b"to h1"[..], b"to h2"]) {
        let (n, from) = s.recv_from(&mut buf).expect("datagram across the bridge");
        assert_eq!(
            (&buf[..n], from.ip().to_string().as_str()),
            (want, "10.254.0.1")
        );
    }
    // Releasing a port from the bridge works too.
    let p0 = nlb.link_by_name("p0").unwrap().index;
    nlb.set_master(p0, None).unwrap();
    let master = ip(&["-n", br.name(), "-o", "link", "show", "master", "br0"]);
    assert_eq!(master.lines().count(), 2, "{master}");
}

#[test]
fn guard_removes_namespace_when_a_test_panics() {
    if !root_or_skip("guard_removes_namespace_when_a_test_panics") {
        return;
    }
    let name = ns_name("panic");
    let n2 = name.clone();
    let r = std::panic::catch_unwind(move || {
        let _ns = NetnsGuard::create(&n2).unwrap();
        assert!(Netns::exists(&n2));
        panic!("simulated test failure");
    });
    assert!(r.is_err());
    assert!(
        !Netns::exists(&name),
        "namespace must be gone after unwinding"
    );
}

/// Creating a link whose name is taken fails with the kernel's errno and names the message
/// and both ends; the existing link is untouched and the socket stays usable.
#[test]
fn duplicate_link_name_is_a_kernel_error_naming_op_and_errno() {
    if !root_or_skip("duplicate_link_name_is_a_kernel_error_naming_op_and_errno") {
        return;
    }
    let ns = NetnsGuard::create(&ns_name("dup")).unwrap();
    let mut nl = Netlink::open_in(&ns).unwrap();
    nl.create_veth("d0", "d1", None).unwrap();
    let before = nl.link_by_name("d0").unwrap();
    let err = nl.create_veth("d0", "d2", None).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("RTM_NEWLINK(veth)") && text.contains("d0 <-> d2"),
        "{text}"
    );
    assert!(text.contains("File exists"), "{text}");
    match &err {
        fabric::io::netlink::NetlinkError::Kernel { source, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::EEXIST), "{text}")
        }
        other => panic!("expected a kernel error, got {other:?}"),
    }
    let err = nl.create_bridge("d1").unwrap_err().to_string();
    assert!(
        err.contains("RTM_NEWLINK(bridge)") && err.contains("File exists"),
        "{err}"
    );
    // Unknown index: ENODEV, named.
    let err = nl.set_mtu(99_999, 1400).unwrap_err().to_string();
    assert!(
        err.contains("ifindex 99999") && err.contains("No such device"),
        "{err}"
    );
    // The kernel's extended ACK reason is carried along with the errno.
    let err = nl.set_mtu(before.index, 1 << 20).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("RTM_NEWLINK(IFLA_MTU)") && text.contains("Invalid argument"),
        "{text}"
    );
    match &err {
        fabric::io::netlink::NetlinkError::Kernel { detail, .. } => {
            assert!(detail.as_deref().is_some_and(|d| !d.is_empty()), "{text}")
        }
        other => panic!("expected a kernel error, got {other:?}"),
    }
    eprintln!("{text}");
    // The failed requests changed nothing and the socket still answers.
    assert_eq!(nl.link_by_name("d0").unwrap(), before);
    assert!(nl.link_by_name("d2").is_err());
}

/// 200 veth pairs created and deleted in one namespace, checked with `ip`; prints the time it
/// took (the figure compared before/after the move to netlink-packet-route).
#[test]
fn many_veth_pairs_create_and_delete() {
    if !root_or_skip("many_veth_pairs_create_and_delete") {
        return;
    }
    const PAIRS: usize = 200;
    let ns = NetnsGuard::create(&ns_name("many")).unwrap();
    let mut nl = Netlink::open_in(&ns).unwrap();
    let t0 = std::time::Instant::now();
    for i in 0..PAIRS {
        nl.create_veth(&format!("m{i}a"), &format!("m{i}b"), None)
            .unwrap();
    }
    let created = t0.elapsed();
    let listed = ip(&["-n", ns.name(), "-o", "link"]);
    assert_eq!(
        listed.lines().count(),
        1 + 2 * PAIRS,
        "lo + both ends of each pair"
    );
    // The dump (401 links of ~1.5 KB: many datagrams of NLM_F_MULTI parts) sees every link once.
    let t2 = std::time::Instant::now();
    let links = nl.links().unwrap();
    let dumped = t2.elapsed();
    assert_eq!(links.len(), 1 + 2 * PAIRS);
    let mut names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), links.len(), "no link twice");
    for i in 0..PAIRS {
        for end in ["a", "b"] {
            let name = format!("m{i}{end}");
            assert!(
                names.binary_search(&name.as_str()).is_ok(),
                "{name} missing"
            );
        }
    }
    assert_eq!(links[0].name, "lo");
    eprintln!("dump of {} links: {dumped:?}", links.len());
    let t1 = std::time::Instant::now();
    for i in 0..PAIRS {
        let l = nl.link_by_name(&format!("m{i}a")).unwrap();
        nl.delete_link(l.index).unwrap();
    }
    let deleted = t1.elapsed();
    assert_eq!(nl.links().unwrap().len(), 1, "only lo is left");
    eprintln!("{PAIRS} veth pairs: create {created:?}, look up + delete {deleted:?}");
    let listed = ip(&["-n", ns.name(), "-o", "link"]);
    assert_eq!(listed.lines().count(), 1, "{listed}");
}
