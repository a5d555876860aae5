//! The simulated-host harness itself (tests/util/cluster.rs), without any fabric daemon:
//! hosts reach each other over the bridge, each host's `/run/netns` is private, processes
//! started in a host (and their children) are killed and every namespace removed on drop.

#[path = "util/cluster.rs"]
mod cluster;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use cluster::{root_or_skip, teardown, Cluster};

#[test]
fn hosts_have_private_run_netns_and_are_cleaned_up() {
    if !root_or_skip("hosts_have_private_run_netns_and_are_cleaned_up") {
        return;
    }
    let mut c = Cluster::new(2);
    let vm = format!("{}-vm", c.prefix);

    // Underlay: host 1 reaches host 2 and the bridge.
    c.exec(
        0,
        &["ping", "-n", "-q", "-c", "1", "-W", "2", "192.168.78.2"],
    )
    .expect("h1 pings h2 over the bridge");
    c.exec(
        1,
        &["ping", "-n", "-q", "-c", "1", "-W", "2", "192.168.78.254"],
    )
    .expect("h2 pings the bridge");

    // A VM namespace made inside host 1 is seen by host 1 only.
    c.exec(0, &["ip", "netns", "add", &vm])
        .expect("ip netns add in h1");
    assert_eq!(c.host_netns_names(0), vec![vm.clone()]);
    assert!(c.host_netns_names(1).is_empty(), "h2 sees h1's namespace");
    assert!(
        !Path::new("/run/netns").join(&vm).exists(),
        "the machine's /run/netns sees h1's namespace"
    );
    let list = c
        .exec(1, &["ip", "netns", "list"])
        .expect("ip netns list in h2");
    assert!(!list.contains(&vm), "h2 lists {vm}: {list}");
    let list = c
        .exec(0, &["ip", "netns", "list"])
        .expect("ip netns list in h1");
    assert!(list.contains(&vm), "h1 does not list {vm}: {list}");

    // The VM namespace is a real, separate stack: a veth to the host, pinged from inside.
    c.exec(
        0,
        &[
            "ip", "link", "add", "vmh", "type", "veth", "peer", "name", "eth0", "netns", &vm,
        ],
    )
    .expect("veth into the VM namespace");
    c.exec(0, &["ip", "addr", "add", "10.9.0.1/24", "dev", "vmh"])
        .unwrap();
    c.exec(0, &["ip", "link", "set", "vmh", "up"]).unwrap();
    c.vm_exec(0, &vm, &["ip", "addr", "add", "10.9.0.2/24", "dev", "eth0"])
        .unwrap();
    c.vm_exec(0, &vm, &["ip", "link", "set", "eth0", "up"])
        .unwrap();
    c.vm_exec(0, &vm, &["ip", "link", "set", "lo", "up"])
        .unwrap();
    let t = c
        .ping_until(0, &vm, Ipv4Addr::new(10, 9, 0, 1), Duration::from_secs(10))
        .expect("ping from the VM namespace");
    eprintln!("VM namespace ping answered after {t:?}");

    // Sockets made in the VM namespace from the test process, through the holder's view.
    let vmns = c.vm_netns(0, &vm).expect("open the VM namespace");
    let hostns = c.host_netns(0);
    let took = cluster::tcp_transfer(&hostns, &vmns, Ipv4Addr::new(10, 9, 0, 2), 7001, 1 << 20)
        .expect("checked TCP transfer host -> VM namespace");
    eprintln!("1 MiB host -> VM namespace in {took:?}");
    drop((vmns, hostns));

    // Processes started in a host, and their own children, must die with the cluster.
    let sleeper = c.spawn(1, "sleeper", &["sleep", "30"]);
    assert!(c.alive(sleeper));
    let bg_file = c.hosts[1].dir.join("bg.pid");
    let script = format!(
        "sleep 300 & echo $! > {}; exec sleep 300",
        bg_file.display()
    );
    let grandchild = c.spawn(1, "grandchild", &["sh", "-c", &script]);
    let mut bg = String::new();
    for _ in 0..100 {
        bg = std::fs::read_to_string(&bg_file).unwrap_or_default();
        if bg.ends_with('\n') {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let bg: u32 = bg.trim().parse().expect("background pid");
    assert!(c.alive(grandchild));
    // A process started in host 2 sees host 2's network: its underlay address is there.
    let addrs = c
        .exec(1, &["ip", "-4", "-o", "addr", "show", "dev", "u0"])
        .unwrap();
    assert!(addrs.contains("192.168.78.2/24"), "{addrs}");

    // wait_listening gives up on a closed port within its bound.
    let closed = SocketAddr::from((Ipv4Addr::new(192, 168, 78, 2), 9));
    assert!(c
        .wait_listening(closed, Duration::from_millis(300))
        .is_err());

    let pid = c.pid(grandchild).unwrap();
    teardown(c);
    assert!(
        cluster::gone(pid),
        "spawned process {pid} survived the drop"
    );
    assert!(cluster::gone(bg), "its child {bg} survived the drop");
}

#[test]
fn drop_on_panic_cleans_up() {
    if !root_or_skip("drop_on_panic_cleans_up") {
        return;
    }
    let prefix = std::sync::Mutex::new(String::new());
    let r = std::panic::catch_unwind(|| {
        let mut c = Cluster::new(1);
        *prefix.lock().unwrap() = c.prefix.clone();
        c.spawn(0, "sleeper", &["sleep", "300"]);
        panic!("deliberate");
    });
    assert!(r.is_err());
    let prefix = prefix.into_inner().unwrap();
    let left = cluster::netns::leftover_namespaces(&prefix);
    assert!(left.is_empty(), "left after a panic: {left:?}");
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("{prefix}-failed-logs")));
}
