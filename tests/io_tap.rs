//! TAP devices: creation, offload negotiation, link settings, multi-queue, removal on drop.
//! Needs root (CAP_NET_ADMIN); skips with a reason otherwise, except under CI=true.

use std::path::Path;

use fabric::io::tap::{Offloads, Tap, TapConfig, TapError};
use fabric::io::IfName;

#[path = "util/root.rs"]
mod root;
use root::root_or_skip;

/// A name unique to this process and call site.
fn unique(tag: &str) -> IfName {
    IfName::new(&format!("fab{}{}", tag, std::process::id() % 100_000)).unwrap()
}

fn sysfs(name: IfName, attr: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{name}/{attr}"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn tap_open_configure_and_remove_on_drop() {
    if !root_or_skip("tap_open_configure_and_remove_on_drop") {
        return;
    }
    let name = unique("t");
    let tap = Tap::open(&TapConfig::new(name)).unwrap();
    assert_eq!(tap.name(), name);
    let off = tap.offloads();
    assert!(
        off.contains(Offloads::CSUM | Offloads::TSO4 | Offloads::TSO6),
        "{off:?}"
    );
    assert!(Path::new(&format!("/sys/class/net/{name}")).exists());
    // TAP, vnet header, not persistent: tun_flags in sysfs (0x1002 | 0x4000 = IFF_TAP|NO_PI|VNET_HDR).
    let flags = u32::from_str_radix(sysfs(name, "tun_flags").trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 0x5002, 0x5002, "tun_flags {flags:#x}");
    assert_eq!(flags & 0x0800, 0, "IFF_PERSIST must be off: {flags:#x}");

    tap.set_mac([0x02, 0xfa, 0xb0, 0, 0, 1]).unwrap();
    tap.set_mtu(1450).unwrap();
    tap.set_txqueuelen(4000).unwrap();
    tap.set_up(true).unwrap();
    assert_eq!(sysfs(name, "address"), "02:fa:b0:00:00:01");
    assert_eq!(sysfs(name, "mtu"), "1450");
    assert_eq!(sysfs(name, "tx_queue_len"), "4000");
    let ifflags = u32::from_str_radix(sysfs(name, "flags").trim_start_matches("0x"), 16).unwrap();
    assert_eq!(ifflags & 1, 1, "IFF_UP");
    assert_eq!(tap.ifindex().unwrap().to_string(), sysfs(name, "ifindex"));
    // Nothing queued: a nonblocking read says so instead of blocking.
    let mut buf = vec![0u8; fabric::io::tap::MAX_FRAME];
    assert!(tap.read(&mut buf).unwrap().is_none());
    tap.set_up(false).unwrap();

    drop(tap);
    assert!(
        !Path::new(&format!("/sys/class/net/{name}")).exists(),
        "TAP must vanish on close"
    );
}

#[test]
fn tap_offloads_fall_back_to_what_was_asked() {
    if !root_or_skip("tap_offloads_fall_back_to_what_was_asked") {
        return;
    }
    let name = unique("o");
    let cfg = TapConfig {
        name,
        offloads: Offloads::CSUM,
    };
    let tap = Tap::open(&cfg).unwrap();
    assert_eq!(tap.offloads(), Offloads::CSUM);
    drop(tap);
    let tap = Tap::open(&TapConfig {
        name,
        offloads: Offloads::NONE,
    })
    .unwrap();
    assert_eq!(tap.offloads(), Offloads::NONE);
}

#[test]
fn tap_multi_queue() {
    if !root_or_skip("tap_multi_queue") {
        return;
    }
    let name = unique("m");
    let mut queues = Tap::open_multi_queue(&TapConfig::new(name), 3).unwrap();
    assert_eq!(queues.len(), 3);
    let flags = u32::from_str_radix(sysfs(name, "tun_flags").trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 0x0100, 0x0100, "IFF_MULTI_QUEUE");
    assert_eq!(
        std::fs::read_dir(format!("/sys/class/net/{name}/queues"))
            .unwrap()
            .count(),
        6
    );
    queues[1].set_queue_enabled(false).unwrap();
    queues[1].set_queue_enabled(true).unwrap();
    // A single-queue open of a multi-queue device is refused by the kernel.
    match Tap::open(&TapConfig::new(name)) {
        Err(TapError::Ioctl {
            op: "TUNSETIFF", ..
        }) => {}
        other => panic!("expected TUNSETIFF error, got {other:?}"),
    }
    queues.truncate(1);
    assert!(
        Path::new(&format!("/sys/class/net/{name}")).exists(),
        "device lives while a queue is open"
    );
    drop(queues);
    assert!(!Path::new(&format!("/sys/class/net/{name}")).exists());
}

#[test]
fn error_messages_name_syscall_and_device() {
    if !root_or_skip("error_messages_name_syscall_and_device") {
        return;
    }
    let name = unique("e");
    let tap = Tap::open(&TapConfig::new(name)).unwrap();
    let err = tap.set_mtu(10).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("SIOCSIFMTU") && msg.contains(name.as_str()),
        "{msg}"
    );
}

#[test]
fn tap_fd_survives_passing_over_a_unix_socket() {
    if !root_or_skip("tap_fd_survives_passing_over_a_unix_socket") {
        return;
    }
    use fabric::io::fdpass::{recv_fds, send_fds};
    use std::os::fd::AsFd;
    let name = unique("p");
    let tap = Tap::open(&TapConfig::new(name)).unwrap();
    let offloads = tap.offloads();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    send_fds(&a, br#"{"vnic":"x"}"#, &[tap.as_fd()]).unwrap();
    drop(tap.into_fd());
    // Still alive: the fd in flight keeps the device.
    let mut buf = [0u8; 64];
    let mut fds = Vec::new();
    let n = recv_fds(&b, &mut buf, &mut fds).unwrap();
    assert_eq!(&buf[..n], br#"{"vnic":"x"}"#);
    let tap = Tap::from_fd(fds.pop().unwrap(), Offloads::ALL).unwrap();
    assert_eq!(tap.name(), name);
    assert_eq!(tap.offloads(), offloads);
    tap.set_up(true).unwrap();
    drop(tap);
    assert!(!Path::new(&format!("/sys/class/net/{name}")).exists());

    // A non-TAP fd is refused with the reason.
    let f = std::fs::File::open("/dev/null").unwrap();
    let err = Tap::from_fd(f.into(), Offloads::ALL)
        .unwrap_err()
        .to_string();
    assert!(err.contains("TUNGETIFF"), "{err}");
}
