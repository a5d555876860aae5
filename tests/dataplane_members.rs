//! The dataplane accepts VXLAN only from members: a `fabric dataplane --peer` in a network
//! namespace on a private underlay bridge, one container behind it, and raw VXLAN datagrams
//! sent from two other underlay namespaces (a member and a stranger). A non-member's frames
//! never reach the container and are counted as `not_member`; the `members` control request
//! replaces the set live; `null` accepts every source again.
//!
//! Needs root (namespaces); without it each test prints why and skips, except under CI=true.

#[path = "util/netns.rs"]
mod netns;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use fabric::dataplane::control::{self, Request};
use fabric::io::netlink::Netns;
use netns::{drops, root_or_skip, udp_socket, Container, Topo};

const VNI: u32 = 4242;
const PORT: u16 = 5555;

/// An Ethernet + IPv4 + UDP frame from 10.77.0.9 to `to` (checksummed IPv4 header, UDP
/// checksum 0 as IPv4 allows), behind an 8-byte VXLAN header for `VNI`.
fn vxlan_datagram(to: &Container, payload: &[u8]) -> Vec<u8> {
    let mac: Vec<u8> = to
        .mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    let mut d = vec![0x08, 0, 0, 0];
    d.extend_from_slice(&(VNI << 8).to_be_bytes());
    d.extend_from_slice(&mac);
    d.extend_from_slice(&[0x02, 0, 0, 0, 0x09, 0x09]);
    d.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&Ipv4Addr::new(10, 77, 0, 9).octets());
    ip.extend_from_slice(&to.ip.octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    d.extend_from_slice(&ip);
    d.extend_from_slice(&40000u16.to_be_bytes());
    d.extend_from_slice(&PORT.to_be_bytes());
    d.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    d
}

/// A UDP socket in underlay namespace `ns`, bound to `ip` (the source of what it sends).
fn underlay_socket(ns: &str, ip: Ipv4Addr) -> UdpSocket {
    Netns::open(ns)
        .unwrap_or_else(|e| panic!("open netns {ns}: {e}"))
        .run(|| UdpSocket::bind(SocketAddr::from((ip, 0))))
        .unwrap_or_else(|e| panic!("enter {ns}: {e}"))
        .unwrap_or_else(|e| panic!("bind {ip} in {ns}: {e}"))
}

/// Sends a datagram from `from` every 50 ms until `rx` gets it (`Some(latency)`) or `within`
/// passes (`None`). Each probe carries its own tag so late copies of earlier probes are not
/// mistaken for it.
fn probe(
    from: &UdpSocket,
    dst: SocketAddr,
    to: &Container,
    rx: &UdpSocket,
    tag: &str,
    within: Duration,
) -> Option<Duration> {
    let t0 = Instant::now();
    let d = vxlan_datagram(to, tag.as_bytes());
    let mut buf = [0u8; 256];
    while t0.elapsed() < within {
        from.send_to(&d, dst).expect("send VXLAN");
        let wait = Instant::now() + Duration::from_millis(50);
        while Instant::now() < wait {
            if let Ok((n, _)) = rx.recv_from(&mut buf) {
                if &buf[..n] == tag.as_bytes() {
                    return Some(t0.elapsed());
                }
            }
        }
    }
    None
}

fn not_member(t: &Topo) -> u64 {
    drops(&t.stats(0).global, "not_member")
}

#[test]
fn vxlan_from_non_members_is_dropped_and_the_set_is_replaced_live() {
    if !root_or_skip("vxlan_from_non_members_is_dropped_and_the_set_is_replaced_live") {
        return;
    }
    let mut t = Topo::new(0);
    // Host 0 runs the dataplane with one member; hosts 1 and 2 are bare underlay namespaces.
    let h0 = t.add_host(false);
    let member = t.add_host(false);
    let stranger = t.add_host(false);
    let member_ip = t.hosts[member].ip;
    let stranger_ip = t.hosts[stranger].ip;
    t.hosts[h0].fabric = true;
    t.start_dataplane_with(h0, &["--peer", &member_ip.to_string()]);
    let c = t.add_container(h0, VNI, "10.77.0.1/24", "02:00:0a:4d:00:01");
    let rx = udp_socket(&c, PORT);
    let dst = SocketAddr::from((t.hosts[h0].ip, 4789));
    let from_member = underlay_socket(&t.hosts[member].ns, member_ip);
    let from_stranger = underlay_socket(&t.hosts[stranger].ns, stranger_ip);
    let short = Duration::from_millis(600);
    let long = Duration::from_secs(10);

    // The member's frames arrive.
    let took = probe(&from_member, dst, &c, &rx, "m1", long).expect("member's frame delivered");
    println!("member frame delivered in {took:?}");
    // The stranger's do not, and each one is counted.
    let before = not_member(&t);
    assert_eq!(
        probe(&from_stranger, dst, &c, &rx, "s1", short),
        None,
        "a non-member's frame reached the vnic"
    );
    let after = not_member(&t);
    assert!(
        after > before,
        "not_member did not rise ({before} → {after})"
    );

    // The control request replaces the set: now only the former stranger is a member.
    let r = control::call(
        &t.hosts[h0].control,
        &Request::Members {
            members: Some(vec![stranger_ip.into()]),
        },
    )
    .expect("members request");
    assert_eq!(r["members"], 1, "{r}");
    let took = probe(&from_stranger, dst, &c, &rx, "s2", long).expect("new member delivered");
    println!("new member's frame delivered {took:?} after the set changed");
    let before = not_member(&t);
    assert_eq!(probe(&from_member, dst, &c, &rx, "m2", short), None);
    assert!(not_member(&t) > before);

    // `null`: every source again.
    let r = control::call(&t.hosts[h0].control, &Request::Members { members: None })
        .expect("members request");
    assert!(r["members"].is_null(), "{r}");
    probe(&from_member, dst, &c, &rx, "m3", long).expect("accept-all again");
    let before = not_member(&t);
    probe(&from_stranger, dst, &c, &rx, "s3", long).expect("accept-all again");
    assert_eq!(not_member(&t), before);

    // An empty set is a set: nobody is accepted.
    let r = control::call(
        &t.hosts[h0].control,
        &Request::Members {
            members: Some(vec![]),
        },
    )
    .expect("members request");
    assert_eq!(r["members"], 0, "{r}");
    assert_eq!(probe(&from_member, dst, &c, &rx, "m4", short), None);
    netns::teardown(t);
}

#[test]
fn without_peers_every_source_is_accepted() {
    if !root_or_skip("without_peers_every_source_is_accepted") {
        return;
    }
    let mut t = Topo::new(1);
    let other = t.add_host(false);
    let other_ip = t.hosts[other].ip;
    let c = t.add_container(0, VNI, "10.77.0.1/24", "02:00:0a:4d:00:01");
    let rx = udp_socket(&c, PORT);
    let dst = SocketAddr::from((t.hosts[0].ip, 4789));
    let from = underlay_socket(&t.hosts[other].ns, other_ip);
    probe(&from, dst, &c, &rx, "a1", Duration::from_secs(10)).expect("delivered");
    assert_eq!(not_member(&t), 0);
    netns::teardown(t);
}
