//! The dataplane daemon's control socket and underlay edges under hostile or broken input:
//! oversized and stalled requests, too many connections, `vnic add` with addresses and MACs a
//! vnic cannot own, vnics whose namespace vanished, zero-length underlay datagrams;
//! `vnic_attach` without a usable TAP fd, and a dataplane restart (the vnics go, fresh TAPs
//! attach in the same namespaces).
//!
//! Each test runs one `fabric dataplane` in a network namespace it creates (underlay on that
//! namespace's 127.0.0.1, Portolan pointed at a closed port there), with its control socket in
//! a private temp dir. Needs root; without it each test prints why and skips, except under
//! CI=true. Dropping the harness stops the daemon and deletes every namespace and file it made,
//! also when the test fails.

#[path = "util/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fabric::dataplane::control::{self, Request, VnicAddSpec};
use fabric::dataplane::provision::{self, VnicProvision};
use fabric::io::fdpass;
use fabric::io::netlink::Netns;
use netns::{fabric_bin, root_or_skip, rss_kib, run};
use serde_json::Value;
use std::os::fd::{AsFd, BorrowedFd};

static N: AtomicU32 = AtomicU32::new(0);

/// One dataplane in its own namespace, plus the container namespaces a test adds.
struct Daemon {
    prefix: String,
    host_ns: String,
    dir: PathBuf,
    control: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    namespaces: Vec<String>,
    containers: u32,
}

impl Daemon {
    fn start(extra: &[&str]) -> Daemon {
        let prefix = format!(
            "fdc{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let host_ns = format!("{prefix}-h");
        let mut d = Daemon {
            control: dir.join("dp.sock"),
            log: dir.join("dp.log"),
            prefix,
            host_ns: host_ns.clone(),
            dir,
            child: None,
            namespaces: Vec::new(),
            containers: 0,
        };
        d.create_ns(&host_ns);
        d.spawn(extra);
        d
    }

    /// Starts the daemon (again) and waits until it answers.
    fn spawn(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "dataplane already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.host_ns])
            .arg(fabric_bin())
            .args(["dataplane", "--underlay", "127.0.0.1:4789"])
            .args(["--portolan", "127.0.0.1:1"])
            .args(["--server-uuid", "564d1a4c-0000-4000-8000-0000000000c1"])
            .arg("--dataplane")
            .arg(&self.control)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn fabric dataplane");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.try_cli(&["stats", "--json"]).is_err() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("dataplane exited ({st}) at start:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "dataplane did not answer in 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the daemon: SIGTERM, then SIGKILL after 5 s.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn create_ns(&mut self, name: &str) {
        drop(Netns::create(name).unwrap_or_else(|e| panic!("create netns {name}: {e}")));
        self.namespaces.push(name.to_owned());
        netns::ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    /// A new (empty) container namespace.
    fn container(&mut self) -> String {
        self.containers += 1;
        let ns = format!("{}-c{}", self.prefix, self.containers);
        self.create_ns(&ns);
        ns
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `fabric ARGS --dataplane SOCK`.
    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        run(Command::new(fabric_bin())
            .args(args)
            .arg("--dataplane")
            .arg(&self.control))
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self
            .try_cli(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    fn stats(&self) -> Value {
        self.json(&["stats", "--json"])
    }

    /// `fabric vnic add` of eth0 in `ns`.
    fn vnic_add(&self, ns: &str, ip: &str, mac: &str) -> Result<String, String> {
        self.try_cli(&[
            "vnic", "add", "--netns", ns, "--name", "eth0", "--vni", "4001", "--mac", mac, "--ip",
            ip,
        ])
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.control).expect("connect control socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- dataplane log:\n{}", self.log_text());
        }
        self.stop();
        for ns in self.namespaces.iter().rev() {
            if Netns::exists(ns) {
                if let Err(e) = Netns::delete(ns) {
                    eprintln!("cleanup: delete netns {ns}: {e}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads one reply line (JSON) from a control connection.
fn reply(s: &UnixStream) -> Result<Value, String> {
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("reading the reply: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("reply {line:?}: {e}"))
}

fn error_of(v: &Value) -> &str {
    assert_eq!(v["ok"], Value::Bool(false), "expected a refusal: {v}");
    v["error"].as_str().expect("error text")
}

/// Whether the peer closed the connection (EOF or reset) within `within`.
fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

const CAP: usize = 4 << 20;

#[test]
fn oversized_request_line_is_refused_with_bounded_memory() {
    if !root_or_skip("oversized_request_line_is_refused_with_bounded_memory") {
        return;
    }
    let d = Daemon::start(&[]);
    let pid = d.pid();
    let rss0 = rss_kib(pid);
    // 64 MiB without a newline, 16 times the limit, streamed in 256 KiB writes.
    let total = 64usize << 20;
    let s = d.connect();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 256 << 10];
        let mut sent = 0usize;
        while sent < total {
            if w.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    // Sample the daemon's memory while the line streams in.
    let mut peak = rss0;
    let t0 = Instant::now();
    while !writer.is_finished() && t0.elapsed() < Duration::from_secs(10) {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(5));
    }
    let v = reply(&s).expect("an answer to the oversized request");
    let sent = writer.join().unwrap();
    peak = peak.max(rss_kib(pid));
    let e = error_of(&v);
    println!(
        "oversized line: {sent} bytes accepted of {total}, RSS {rss0} -> peak {peak} KiB, error: {e}"
    );
    assert!(
        e.contains(&CAP.to_string()) && e.contains("--control-max-request-bytes"),
        "the error names the limit: {e}"
    );
    assert!(
        sent < total,
        "the daemon kept reading all {total} bytes of one line"
    );
    assert!(
        peak < rss0 + 3 * (CAP as u64 / 1024) + 8 * 1024,
        "daemon RSS grew from {rss0} to {peak} KiB while a {total}-byte line streamed in"
    );
    let st = d.stats();
    assert_eq!(st["control"]["oversized_requests"], 1, "{st}");
    // A request just under the limit is still served (the limit is not off by much).
    let mut s = d.connect();
    let pad = " ".repeat(CAP - 40);
    writeln!(s, "{{\"cmd\":\"vnic_ls\"{pad}}}").unwrap();
    let v = reply(&s).expect("answer to a large valid request");
    assert_eq!(v["ok"], Value::Bool(true), "{v}");
    // Through the CLI: a firewall document over the limit gets the daemon's reason, not a
    // broken pipe, and nothing is applied.
    let vms: Vec<Value> = (0..25_000u32)
        .map(|i| {
            serde_json::json!({
                "uuid": format!("00000000-0000-4000-8000-{i:012x}"),
                "owner_uuid": "aaaaaaaa-0000-4000-8000-000000000000",
                "tags": {"role": "web", "tier": "frontend"},
                "firewall_enabled": true,
                "ips": [{"vni": 4001, "ip": format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)}]
            })
        })
        .collect();
    let doc = serde_json::json!({"vms": vms, "rules": []}).to_string();
    assert!(doc.len() > CAP, "{} bytes", doc.len());
    let file = d.dir.join("big-fw.json");
    std::fs::write(&file, &doc).unwrap();
    let e = d
        .try_cli(&["fw", "apply", file.to_str().unwrap()])
        .expect_err("an over-limit fw apply is refused");
    assert!(e.contains("--control-max-request-bytes"), "{e}");
    let st = d.stats();
    assert_eq!(st["control"]["oversized_requests"], 2, "{st}");
}

#[test]
fn stalled_requests_time_out_and_connections_are_capped() {
    if !root_or_skip("stalled_requests_time_out_and_connections_are_capped") {
        return;
    }
    let d = Daemon::start(&[
        "--control-read-timeout-ms",
        "300",
        "--control-max-conns",
        "3",
    ]);
    // A partial line, then silence: answered with an error and closed after the timeout.
    let mut s = d.connect();
    s.write_all(br#"{"cmd":"sta"#).unwrap();
    let t0 = Instant::now();
    let v = reply(&s).expect("an answer to the stalled request");
    let waited = t0.elapsed();
    let e = error_of(&v);
    assert!(e.contains("300 ms"), "{e}");
    assert!(
        closed_within(&mut s, Duration::from_secs(3)),
        "connection not closed"
    );
    println!("stalled request: refused after {waited:?} (limit 300 ms): {e}");
    assert!(waited < Duration::from_secs(3), "took {waited:?}");
    drop(s);

    // Three connections held open (idle): the fourth is refused at once and closed.
    let held: Vec<UnixStream> = (0..3).map(|_| d.connect()).collect();
    // Make sure all three are being served (each answers a request).
    for mut h in &held {
        writeln!(h, r#"{{"cmd":"vnic_ls"}}"#).unwrap();
        assert_eq!(reply(h).unwrap()["ok"], Value::Bool(true));
    }
    let mut extra = d.connect();
    let v = reply(&extra).expect("a refusal for the connection over the cap");
    let e = error_of(&v);
    assert!(
        e.contains("too many control connections") && e.contains('3'),
        "{e}"
    );
    assert!(closed_within(&mut extra, Duration::from_secs(3)));
    drop(held);
    // The slots come back once the clients leave.
    let t0 = Instant::now();
    let st = loop {
        match d.try_cli(&["stats", "--json"]) {
            Ok(out) => break serde_json::from_str::<Value>(&out).unwrap(),
            Err(e) if t0.elapsed() > Duration::from_secs(5) => panic!("stats: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    println!("control counters: {}", st["control"]);
    assert!(
        st["control"]["refused_connections"].as_u64() >= Some(1),
        "{st}"
    );
    assert!(st["control"]["read_timeouts"].as_u64() >= Some(1), "{st}");
}

#[test]
fn vnic_add_refuses_addresses_and_macs_a_vnic_cannot_own() {
    if !root_or_skip("vnic_add_refuses_addresses_and_macs_a_vnic_cannot_own") {
        return;
    }
    let mut d = Daemon::start(&[]);
    let ns = d.container();
    let good_mac = "02:00:0a:00:00:05";
    let bad = [
        ("0.0.0.0/24", good_mac),
        ("224.0.0.1/24", good_mac),
        ("255.255.255.255/32", good_mac),
        ("127.0.0.2/8", good_mac),
        ("169.254.1.1/16", good_mac),
        ("10.0.0.0/24", good_mac),
        ("10.0.0.255/24", good_mac),
        ("10.0.0.5/33", good_mac),
        ("10.0.0.5/0", good_mac),
        ("::1/128", good_mac),
        ("ff02::1/64", good_mac),
        ("fe80::5/64", good_mac),
        ("::ffff:10.0.0.5/96", good_mac),
        ("10.0.0.5/24", "ff:ff:ff:ff:ff:ff"),
        ("10.0.0.5/24", "01:00:5e:00:00:01"),
        ("10.0.0.5/24", "00:00:00:00:00:00"),
    ];
    for (ip, mac) in bad {
        let r = d.vnic_add(&ns, ip, mac);
        let e = r.expect_err(&format!("vnic add {ip} {mac} was accepted"));
        let shown = if mac == good_mac { ip } else { mac };
        assert!(
            e.contains(shown.split('/').next().unwrap()),
            "the error names what was wrong ({shown}): {e}"
        );
        // Nothing was created: no interface in the namespace, nothing listed.
        let links = run(Command::new("ip").args(["-n", &ns, "-o", "link", "show"])).unwrap();
        assert!(
            !links.contains("eth0"),
            "{ip} {mac}: interface left behind: {links}"
        );
        assert_eq!(d.json(&["vnic", "ls", "--json"]), Value::Array(vec![]));
    }
    // The same namespace takes a proper address.
    d.vnic_add(&ns, "10.0.0.5/24", good_mac)
        .expect("a valid vnic is added");
    let ls = d.json(&["vnic", "ls", "--json"]);
    assert_eq!(ls[0]["ip"], "10.0.0.5/24", "{ls}");
}

#[test]
fn vnic_whose_namespace_vanished_is_listed_as_gone_and_rm_cleans_it() {
    if !root_or_skip("vnic_whose_namespace_vanished_is_listed_as_gone_and_rm_cleans_it") {
        return;
    }
    let mut d = Daemon::start(&[]);
    let ns = d.container();
    let keep = d.container();
    d.vnic_add(&ns, "10.0.0.7/24", "02:00:0a:00:00:07").unwrap();
    d.vnic_add(&keep, "10.0.0.8/24", "02:00:0a:00:00:08")
        .unwrap();
    let state = |d: &Daemon, ns: &str| {
        let ls = d.json(&["vnic", "ls", "--json"]);
        ls.as_array()
            .unwrap()
            .iter()
            .find(|v| v["netns"] == ns)
            .cloned()
            .unwrap_or_else(|| panic!("{ns} not listed: {ls}"))
    };
    assert_eq!(state(&d, &ns)["state"], "up");
    let wait_for = |want: &str| {
        let t0 = Instant::now();
        loop {
            let v = state(&d, &ns);
            if v["state"] == want {
                println!("vnic {want} after {:?}: {v}", t0.elapsed());
                return v;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "still {} 10 s after the change, expected {want}",
                v["state"]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // First only the name goes (something still holds the namespace, so the device lives):
    // the vnic can no longer be managed by that name.
    let held = Netns::open(&ns).unwrap();
    Netns::delete(&ns).expect("delete the vnic's namespace name");
    let orphaned = wait_for("orphaned");
    let reason = orphaned["state_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&ns) && reason.contains("deleted"),
        "{orphaned}"
    );
    // Then the namespace itself goes, taking the TAP device with it.
    drop(held);
    let gone = wait_for("gone");
    let reason = gone["state_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("TAP"), "{gone}");
    assert!(
        gone["state_since_unix_ms"].as_u64().unwrap_or(0) > 0,
        "{gone}"
    );
    // The other vnic is unaffected; the text listing flags the gone one.
    assert_eq!(state(&d, &keep)["state"], "up");
    let text = d.try_cli(&["vnic", "ls"]).unwrap();
    let line = text.lines().find(|l| l.starts_with(&ns)).unwrap();
    assert!(line.contains("GONE"), "{text}");
    let text = d.try_cli(&["stats"]).unwrap();
    assert!(text.contains("GONE"), "{text}");
    // `vnic rm` still removes it.
    d.try_cli(&["vnic", "rm", "--netns", &ns, "--name", "eth0"])
        .expect("vnic rm of a gone vnic");
    let ls = d.json(&["vnic", "ls", "--json"]);
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(ls[0]["netns"], keep.as_str());
}

#[test]
fn zero_length_underlay_datagrams_are_counted() {
    if !root_or_skip("zero_length_underlay_datagrams_are_counted") {
        return;
    }
    let d = Daemon::start(&[]);
    let before = d.stats();
    assert_eq!(before["underlay_empty"], 0, "{before}");
    let sent = 25u64;
    Netns::open(&d.host_ns)
        .unwrap()
        .run(|| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            for _ in 0..sent {
                assert_eq!(s.send_to(&[], "127.0.0.1:4789").unwrap(), 0);
            }
        })
        .unwrap();
    let t0 = Instant::now();
    let st = loop {
        let st = d.stats();
        if st["underlay_empty"].as_u64() >= Some(sent) || t0.elapsed() > Duration::from_secs(5) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "{sent} zero-length datagrams counted after {:?}",
        t0.elapsed()
    );
    assert_eq!(st["underlay_empty"].as_u64(), Some(sent), "{st}");
    let text = d.try_cli(&["stats"]).unwrap();
    assert!(text.contains(&format!("underlay_empty {sent}")), "{text}");
}

/// Sends `line` (a newline is added) on a new control connection with `fds` attached
/// (SCM_RIGHTS) and returns the reply.
fn send_with_fds(d: &Daemon, line: &str, fds: &[BorrowedFd<'_>]) -> Value {
    let mut s = d.connect();
    let line = format!("{line}\n");
    if fds.is_empty() {
        s.write_all(line.as_bytes()).unwrap();
    } else {
        let n = fdpass::send_with_fds(s.as_fd(), line.as_bytes(), fds).unwrap();
        s.write_all(&line.as_bytes()[n..]).unwrap();
    }
    reply(&s).expect("a reply")
}

fn attach_spec(ns: &str, name: &str) -> VnicAddSpec {
    VnicAddSpec {
        netns: ns.to_owned(),
        name: name.to_owned(),
        vni: 4001,
        mac: "90:b8:d0:00:00:05".into(),
        ip: "10.0.0.5/24".into(),
        mtu: 1400,
    }
}

fn control_counter(d: &Daemon, name: &str) -> u64 {
    let s = d.stats();
    s["control"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no control.{name} in {s}"))
}

#[test]
fn vnic_attach_without_a_usable_tap_fd_is_refused_and_changes_nothing() {
    if !root_or_skip("vnic_attach_without_a_usable_tap_fd_is_refused_and_changes_nothing") {
        return;
    }
    let mut d = Daemon::start(&[]);
    let ns = d.container();
    let handle = Netns::open(&ns).unwrap();
    let spec = attach_spec(&ns, "eth0");
    let line = serde_json::to_string(&Request::VnicAttach(spec.clone())).unwrap();
    let empty = Value::Array(vec![]);

    // No fd at all.
    let v = send_with_fds(&d, &line, &[]);
    let e = error_of(&v);
    assert!(
        e.contains("vnic_attach needs the TAP queue fds attached (SCM_RIGHTS)"),
        "{e}"
    );
    assert_eq!(control_counter(&d, "attach_without_fds"), 1);
    assert_eq!(d.json(&["vnic", "ls", "--json"]), empty);

    // An fd that is not a TAP.
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let v = send_with_fds(&d, &line, &[devnull.as_fd()]);
    let e = error_of(&v);
    assert!(
        e.contains("not a usable TAP") && e.contains("TUNGETIFF"),
        "{e}"
    );
    assert_eq!(control_counter(&d, "attach_bad_fds"), 1);
    assert_eq!(d.json(&["vnic", "ls", "--json"]), empty);

    // A TAP, but not the one the request names.
    let mut other = VnicProvision::from_spec(&attach_spec(&ns, "net7"), None).unwrap();
    other.queues = 1;
    let taps = provision::create_vnic(&handle, &other).unwrap();
    let e = control::attach(&d.control, &spec, &taps)
        .expect_err("a TAP of another name")
        .to_string();
    assert!(
        e.contains("is the TAP net7, but the request names eth0"),
        "{e}"
    );
    assert_eq!(control_counter(&d, "attach_bad_fds"), 2);
    assert_eq!(d.json(&["vnic", "ls", "--json"]), empty);
    // The daemon kept no copy: dropping ours removes the device.
    drop(taps);
    assert_eq!(provision::vnic_state(&handle, "net7").unwrap(), None);

    // The old in-daemon request points at the new one.
    let old = line.replacen("vnic_attach", "vnic_add", 1);
    let e = error_of(&send_with_fds(&d, &old, &[])).to_owned();
    assert!(
        e.contains("no longer served") && e.contains("vnic_attach"),
        "{e}"
    );

    // Descriptors sent with another request are closed and counted; the request is served.
    let v = send_with_fds(&d, r#"{"cmd":"vnic_ls"}"#, &[devnull.as_fd()]);
    assert_eq!(v["ok"], Value::Bool(true), "{v}");
    assert_eq!(control_counter(&d, "unexpected_fds"), 1);

    // The real thing works, and the device then lives as long as the daemon holds it.
    let prov = VnicProvision::from_spec(&spec, None).unwrap();
    let taps = provision::create_vnic(&handle, &prov).unwrap();
    let info = control::attach(&d.control, &spec, &taps).expect("attach with the TAP fd");
    drop(taps);
    assert_eq!((info.name.as_str(), info.vni), ("eth0", 4001));
    assert_eq!(info.state, fabric::dataplane::control::VnicState::Up);
    let st = provision::vnic_state(&handle, "eth0")
        .unwrap()
        .expect("eth0");
    assert_eq!(st.mac, Some([0x90, 0xb8, 0xd0, 0, 0, 5]));
    assert_eq!(st.addrs, vec![("10.0.0.5".parse().unwrap(), 24)]);
    let ls = d.json(&["vnic", "ls", "--json"]);
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(ls[0]["state"], "up", "{ls}");
    // A second attach of the same vnic is refused.
    let mut dup = spec.clone();
    dup.name = "eth1".into();
    dup.mac = "90:b8:d0:00:00:06".into();
    dup.ip = "10.0.0.6/24".into();
    let again =
        provision::create_vnic(&handle, &VnicProvision::from_spec(&dup, None).unwrap()).unwrap();
    control::attach(&d.control, &dup, &again).expect("eth1 is another vnic");
    let e = control::attach(&d.control, &dup, &again)
        .expect_err("eth1 attached twice")
        .to_string();
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn dataplane_restart_loses_vnics_and_fresh_taps_attach_in_the_same_namespace() {
    if !root_or_skip("dataplane_restart_loses_vnics_and_fresh_taps_attach_in_the_same_namespace") {
        return;
    }
    let mut d = Daemon::start(&[]);
    let ns = d.container();
    let handle = Netns::open(&ns).unwrap();
    let mac = "02:00:0a:00:00:09";
    d.vnic_add(&ns, "10.0.0.9/24", mac).expect("vnic add");
    assert!(provision::vnic_state(&handle, "eth0").unwrap().is_some());

    // The dataplane held the only fds: its exit takes the TAP with it.
    d.stop();
    let t0 = Instant::now();
    while provision::vnic_state(&handle, "eth0").unwrap().is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "eth0 still in {ns} 5 s after the dataplane stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("TAP gone {:?} after the dataplane stopped", t0.elapsed());

    // A new dataplane knows nothing; the same namespace takes a freshly created TAP.
    d.spawn(&[]);
    assert_eq!(d.json(&["vnic", "ls", "--json"]), Value::Array(vec![]));
    d.vnic_add(&ns, "10.0.0.9/24", mac)
        .expect("vnic add after the restart");
    let ls = d.json(&["vnic", "ls", "--json"]);
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(
        (ls[0]["netns"].as_str(), ls[0]["state"].as_str()),
        (Some(ns.as_str()), Some("up"))
    );
    let st = provision::vnic_state(&handle, "eth0")
        .unwrap()
        .expect("eth0");
    assert_eq!(st.mac, Some([2, 0, 0x0a, 0, 0, 9]));

    // `vnic rm` detaches and deletes the link.
    d.try_cli(&["vnic", "rm", "--netns", &ns, "--name", "eth0"])
        .expect("vnic rm");
    assert_eq!(d.json(&["vnic", "ls", "--json"]), Value::Array(vec![]));
    assert_eq!(provision::vnic_state(&handle, "eth0").unwrap(), None);
}
