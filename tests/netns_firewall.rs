//! The stateful firewall end to end: real Linux TCP, UDP and ping between container
//! namespaces on different "hosts" (see `util/netns.rs`), with the Docker-implied policy
//! (`firewall::docker`) sent to every host's dataplane by `fabric fw apply`, and the verdicts
//! checked through `fabric fw ls --json` and the per-vnic drop counters of `fabric stats`.
//! Needs root; without it each test prints why and skips, except under CI=true, where it
//! fails. Every test removes its namespaces, processes and files when it ends, also when it
//! fails.

#[path = "util/netns.rs"]
mod netns;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fabric::core::CountersSnapshot;
use fabric::dataplane::control::{FwApplied, FwListing};
use fabric::firewall::compile::{FirewallState, RuleRecord, VmAddress, VmRecord};
use fabric::firewall::docker::{self, ContainerDescription, ImpliedKind, PortBinding, PortProto};
use netns::{
    drops, fabric_bin, root_or_skip, tcp_transfer, teardown, udp_echo_server, udp_probe,
    udp_socket, Container, Topo,
};

const MB: u64 = 1024 * 1024;

/// Accounts (owner UUIDs).
const ACCOUNT_A: &str = "a0000000-0000-4000-8000-00000000000a";
const ACCOUNT_B: &str = "b0000000-0000-4000-8000-00000000000b";
const ACCOUNT_C: &str = "c0000000-0000-4000-8000-00000000000c";
/// Containers (VM UUIDs).
const VM_X: &str = "10000000-0000-4000-8000-0000000000a1";
const VM_X2: &str = "10000000-0000-4000-8000-0000000000a2";
const VM_Y: &str = "10000000-0000-4000-8000-0000000000b1";
const VM_Z: &str = "10000000-0000-4000-8000-0000000000c1";

/// How long a connection attempt the firewall should drop is given.
const BLOCKED_CONNECT: Duration = Duration::from_secs(2);

// ----- policy documents --------------------------------------------------------------------

/// A firewall state under construction: the Docker policy of some containers plus extra rules.
#[derive(Default, Clone)]
struct Policy {
    vms: Vec<VmRecord>,
    rules: Vec<RuleRecord>,
}

impl Policy {
    /// A docker container (`sdc_docker` tag, firewall enabled, T3/T4 of its account, T5 for
    /// `published`), with the address of `c` on `c`'s VNI.
    fn docker(
        &mut self,
        uuid: &str,
        owner: &str,
        c: &Container,
        published: &[(PortProto, u16)],
    ) -> &mut Self {
        let desc = ContainerDescription {
            uuid: uuid.into(),
            owner_uuid: owner.into(),
            published: published
                .iter()
                .map(|&(proto, port)| PortBinding {
                    port,
                    proto,
                    host_port: Some(port),
                    host_ip: None,
                })
                .collect(),
            ..Default::default()
        };
        let p = docker::container_policy(&desc, 4)
            .unwrap_or_else(|e| panic!("docker policy of {uuid}: {e}"));
        self.vms.push(VmRecord {
            uuid: uuid.into(),
            owner_uuid: owner.into(),
            tags: p.tags,
            firewall_enabled: p.firewall_enabled,
            ips: vec![VmAddress {
                vni: c.vni,
                ip: IpAddr::V4(c.ip),
            }],
        });
        for r in p.rules {
            self.rule(r.record);
        }
        self
    }

    /// The operator's global rules (T6: echo request from anywhere).
    fn global(&mut self) -> &mut Self {
        for r in docker::global_rules() {
            self.rule(r.record);
        }
        self
    }

    /// Adds a rule (once per UUID: the account rules are shared by an account's containers).
    fn rule(&mut self, r: RuleRecord) -> &mut Self {
        if !self.rules.iter().any(|e| e.uuid == r.uuid) {
            self.rules.push(r);
        }
        self
    }

    /// The `fw apply` document.
    fn doc(&self) -> serde_json::Value {
        serde_json::to_value(FirewallState {
            vms: self.vms.clone(),
            rules: self.rules.clone(),
        })
        .expect("firewall state as JSON")
    }
}

/// The publish (T5) rule of container `uuid` in `p`.
fn publish_rule(p: &Policy, uuid: &str) -> RuleRecord {
    p.rules
        .iter()
        .find(|r| r.rule.contains(uuid) && r.rule.contains("ALLOW tcp ports"))
        .unwrap_or_else(|| panic!("no publish rule for {uuid} in {:?}", p.rules))
        .clone()
}

// ----- fabric fw ------------------------------------------------------------------------------

static DOCS: AtomicU32 = AtomicU32::new(0);

/// `fabric fw apply --json` of `doc` on host `host`: Ok(answer) or Err((exit code, stderr)).
fn try_apply(
    t: &Topo,
    host: usize,
    doc: &serde_json::Value,
) -> Result<FwApplied, (Option<i32>, String)> {
    let file = t.dir.join(format!(
        "fw-state-{}-{}.json",
        std::process::id(),
        DOCS.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&file, serde_json::to_vec_pretty(doc).expect("JSON"))
        .expect("write firewall state");
    let out = Command::new(fabric_bin())
        .args(["fw", "apply", "--json", "--control"])
        .arg(&t.hosts[host].control)
        .arg(&file)
        .output()
        .expect("spawn fabric fw apply");
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err((out.status.code(), format!("{stderr}{stdout}")));
    }
    serde_json::from_str(&stdout)
        .map_err(|e| (Some(0), format!("fw apply --json answer {stdout:?}: {e}")))
}

/// Applies `doc` to every host (each dataplane filters its own vnics); returns the generation
/// now in force (the same everywhere, since every host got the same sequence).
fn apply_all(t: &Topo, doc: &serde_json::Value) -> u64 {
    let mut gens = Vec::new();
    for h in 0..t.hosts.len() {
        let a = try_apply(t, h, doc).unwrap_or_else(|(code, err)| {
            panic!("fw apply on host {h} failed (exit {code:?}): {err}\ndocument: {doc:#}")
        });
        gens.push(a.generation);
    }
    assert!(
        gens.windows(2).all(|w| w[0] == w[1]),
        "hosts report different generations: {gens:?}"
    );
    gens[0]
}

/// `fabric fw ls --json` of `c`'s vnic: the typed listing and the raw text.
fn fw_ls(t: &Topo, c: &Container) -> (FwListing, String) {
    let out = Command::new(fabric_bin())
        .args([
            "fw",
            "ls",
            "--json",
            "--vnic",
            "eth0",
            "--netns",
            &c.ns,
            "--control",
        ])
        .arg(&t.hosts[c.host].control)
        .output()
        .expect("spawn fabric fw ls");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fw ls of {} failed ({}): {}{stdout}",
        c.ns,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let raw: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("fw ls --json is not JSON ({e}): {stdout}"));
    for key in [
        "netns",
        "name",
        "vni",
        "ip",
        "vm_uuid",
        "filtered",
        "generation",
        "rules",
        "denied_by_rule",
        "denied_by_default",
        "conntrack",
    ] {
        assert!(
            raw.get(key).is_some(),
            "fw ls --json lacks {key:?}: {stdout}"
        );
    }
    let l: FwListing = serde_json::from_value(raw)
        .unwrap_or_else(|e| panic!("fw ls --json has not the documented shape ({e}): {stdout}"));
    (l, stdout)
}

/// A conntrack counter from a listing (0 when absent).
fn ct_counter(l: &FwListing, name: &str) -> u64 {
    l.conntrack
        .as_ref()
        .and_then(|c| c.counters.get(name))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
}

/// `fabric fw parse RULE`: the canonical text, or the error output.
fn fw_parse(rule: &str) -> Result<String, String> {
    let out = Command::new(fabric_bin())
        .args(["fw", "parse", rule])
        .output()
        .expect("spawn fabric fw parse");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text.trim().to_string())
    } else {
        Err(text)
    }
}

/// Counters of `c`'s vnic on its host.
fn vnic_counters(t: &Topo, c: &Container) -> CountersSnapshot {
    let s = t.stats(c.host);
    s.vnics
        .iter()
        .find(|v| v.netns == c.ns)
        .unwrap_or_else(|| panic!("no vnic of {} on host {}", c.ns, c.host))
        .counters
        .clone()
}

/// The firewall drops of `c`'s vnic (`firewall_default`, `firewall_rule`), with the host's
/// global counters and conntrack, for messages.
fn fw_drops(t: &Topo, c: &Container) -> (u64, u64, String) {
    let v = vnic_counters(t, c);
    let s = t.stats(c.host);
    let dump = format!(
        "vnic {} drops {:?}; host {} global drops {:?}; conntrack {}",
        c.ns,
        v.drops,
        c.host,
        s.global.drops,
        serde_json::to_string(&s.conntrack).unwrap_or_default()
    );
    (
        drops(&v, "firewall_default"),
        drops(&v, "firewall_rule"),
        dump,
    )
}

// ----- traffic ------------------------------------------------------------------------------

/// A TCP listener inside `c` on `c.ip:port`.
fn listen(c: &Container, port: u16) -> TcpListener {
    let addr = SocketAddr::from((c.ip, port));
    c.netns()
        .run(|| TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("enter {}: {e}", c.ns))
        .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", c.ns))
}

/// A TCP connection from inside `from` to `to:port`, within `within`.
fn connect(
    from: &Container,
    to: Ipv4Addr,
    port: u16,
    within: Duration,
) -> std::io::Result<TcpStream> {
    let addr = SocketAddr::from((to, port));
    let s = from
        .netns()
        .run(|| TcpStream::connect_timeout(&addr, within))
        .unwrap_or_else(|e| panic!("enter {}: {e}", from.ns))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// Asserts that a connection from `from` to `to:port` is silently dropped (connect times
/// out, no RST), i.e. the firewall ate the SYN.
fn assert_connect_dropped(from: &Container, to: &Container, port: u16, why: &str) {
    let t0 = Instant::now();
    match connect(from, to.ip, port, BLOCKED_CONNECT) {
        Ok(_) => panic!("{why}: {} -> {}:{port} connected", from.ns, to.ip),
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
            "{why}: {} -> {}:{port} failed with {e} ({:?}) after {:.1?}, expected a timeout (a \
             dropped SYN)",
            from.ns,
            to.ip,
            e.kind(),
            t0.elapsed()
        ),
    }
}

/// Accepts connections on `l` until the flag clears; each is echoed back on its own thread.
fn tcp_echo_server(l: TcpListener, run: Arc<AtomicBool>) -> JoinHandle<u32> {
    l.set_nonblocking(true).expect("nonblocking listener");
    std::thread::spawn(move || {
        let mut conns = Vec::new();
        while run.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let run = run.clone();
                    conns.push(std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                        let mut buf = vec![0u8; 64 * 1024];
                        while run.load(Ordering::Relaxed) {
                            match s.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        ErrorKind::WouldBlock | ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                    }));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(_) => break,
            }
        }
        let n = conns.len() as u32;
        for c in conns {
            let _ = c.join();
        }
        n
    })
}

/// Sends `total` bytes through an echo server in chunks and checks every byte comes back.
fn echo_roundtrip(s: &mut TcpStream, total: usize, seed: u64) -> Result<(), String> {
    let pat = netns::Pattern::new(seed);
    let chunk = 64 * 1024;
    let mut out = vec![0u8; chunk];
    let mut back = vec![0u8; chunk];
    let mut off = 0usize;
    while off < total {
        let n = chunk.min(total - off);
        pat.fill(off as u64, &mut out[..n]);
        s.write_all(&out[..n])
            .map_err(|e| format!("write at offset {off}: {e}"))?;
        s.read_exact(&mut back[..n])
            .map_err(|e| format!("read echo at offset {off}: {e}"))?;
        if back[..n] != out[..n] {
            return Err(format!("echo differs in the chunk at offset {off}"));
        }
        off += n;
    }
    Ok(())
}

/// Waits until `cond` holds or `within` passes.
fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ----- tests --------------------------------------------------------------------------------

#[test]
fn published_port_reachable_only_on_that_port() {
    if !root_or_skip("published_port_reachable_only_on_that_port") {
        return;
    }
    let mut t = Topo::new(2);
    let vni = 5101;
    let x = t.add_container(0, vni, "10.81.1.1/24", "02:00:0a:51:01:01");
    let y = t.add_container(1, vni, "10.81.1.2/24", "02:00:0a:51:01:02");
    t.ping(&y, x.ip, 2)
        .unwrap_or_else(|e| panic!("unfiltered overlay: {e}"));
    // Without a firewall state, X's port 8081 is reachable: what follows is the firewall.
    let l8081 = listen(&x, 8081);
    drop(connect(&y, x.ip, 8081, Duration::from_secs(5)).expect("Y -> X:8081 before any firewall"));
    drop(l8081.accept().expect("accept the unfiltered connection"));

    let mut p = Policy::default();
    p.docker(VM_X, ACCOUNT_A, &x, &[(PortProto::Tcp, 8080)])
        .docker(VM_Y, ACCOUNT_B, &y, &[]);
    let publish = publish_rule(&p, VM_X);
    let gen = apply_all(&t, &p.doc());

    let (l, raw) = fw_ls(&t, &x);
    assert!(l.filtered, "X's vnic is not filtered: {raw}");
    assert_eq!(l.vm_uuid.as_deref(), Some(VM_X), "{raw}");
    assert_eq!(l.generation, gen, "{raw}");
    assert_eq!((l.vni, l.ip.as_str()), (vni, "10.81.1.1"), "{raw}");
    assert!(
        l.rules
            .iter()
            .any(|r| r.uuid == publish.uuid && r.direction == "in" && r.action == "allow"),
        "X's inbound rules lack the publish rule {}: {raw}",
        publish.uuid
    );

    // The published port: connection and a few MB.
    let r = tcp_transfer(&y, &x, 8080, 4 * MB).unwrap_or_else(|e| {
        let (_, _, dump) = fw_drops(&t, &x);
        panic!("Y -> X:8080 (published) failed: {e}; {dump}")
    });
    eprintln!("Y -> X:8080: {} MB in {:.2?}", r.bytes / MB, r.elapsed);

    // Any other port: the SYN is dropped by the inbound default and counted on X's vnic.
    let (def0, _, _) = fw_drops(&t, &x);
    assert_connect_dropped(&y, &x, 8081, "unpublished port");
    let counted = wait_for(Duration::from_secs(2), || fw_drops(&t, &x).0 > def0);
    let (def1, _, dump) = fw_drops(&t, &x);
    assert!(
        counted,
        "X's vnic counted no firewall_default drop for Y -> X:8081 ({def0} -> {def1}); {dump}"
    );
    let (l, raw) = fw_ls(&t, &x);
    assert!(
        l.denied_by_default >= def1,
        "fw ls denied_by_default {} < stats' {def1}: {raw}",
        l.denied_by_default
    );
    let hits = l
        .rules
        .iter()
        .find(|r| r.uuid == publish.uuid)
        .map_or(0, |r| r.hits);
    assert!(hits >= 1, "publish rule admitted no flow: {raw}");
    drop(l8081);
    teardown(t);
}

#[test]
fn replies_to_outbound_connections_return() {
    if !root_or_skip("replies_to_outbound_connections_return") {
        return;
    }
    let mut t = Topo::new(2);
    let vni = 5102;
    let x = t.add_container(0, vni, "10.81.2.1/24", "02:00:0a:51:02:01");
    let y = t.add_container(1, vni, "10.81.2.2/24", "02:00:0a:51:02:02");
    t.ping(&x, y.ip, 2)
        .unwrap_or_else(|e| panic!("unfiltered overlay: {e}"));
    // X: firewalled, nothing published, no rule admits account B. Y: publishes 9000 and 9001.
    let mut p = Policy::default();
    p.docker(VM_X, ACCOUNT_A, &x, &[]).docker(
        VM_Y,
        ACCOUNT_B,
        &y,
        &[(PortProto::Tcp, 9000), (PortProto::Udp, 9001)],
    );
    apply_all(&t, &p.doc());
    let (l, raw) = fw_ls(&t, &x);
    assert!(l.filtered, "{raw}");
    // Its only inbound rules are account A's T3/T4, which name A's containers only.
    let account: Vec<String> = docker::account_rules(ACCOUNT_A)
        .into_iter()
        .map(|r| r.record.uuid)
        .collect();
    assert!(
        l.rules
            .iter()
            .filter(|r| r.direction == "in")
            .all(|r| account.contains(&r.uuid)),
        "X has an inbound rule besides account A's T3/T4: {raw}"
    );

    let run = Arc::new(AtomicBool::new(true));
    let tcp_echo = tcp_echo_server(listen(&y, 9000), run.clone());
    let udp_echo = udp_echo_server(&y, 9001, run.clone());

    // TCP out of X: 1 MiB each way through Y's echo, in 64 KiB round trips.
    let mut s = connect(&x, y.ip, 9000, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("X -> Y:9000: {e}; {}", fw_drops(&t, &x).2));
    echo_roundtrip(&mut s, MB as usize, 0x9000)
        .unwrap_or_else(|e| panic!("X -> Y:9000 echo: {e}; {}", fw_drops(&t, &x).2));
    drop(s);

    // UDP out of X: the reply (same 5-tuple reversed) comes back.
    let xs = udp_socket(&x, 0);
    let ydst = SocketAddr::from((y.ip, 9001));
    let took = udp_probe(&xs, ydst, Duration::from_secs(3));
    assert!(
        took.is_some(),
        "no UDP reply from Y:9001 to X; {}",
        fw_drops(&t, &x).2
    );

    // Nothing unsolicited gets in: a TCP connection from Y, and UDP from Y to a port X
    // listens on but never sent from.
    let (def0, _, _) = fw_drops(&t, &x);
    let l9100 = listen(&x, 9100);
    assert_connect_dropped(&y, &x, 9100, "inbound TCP to a firewalled container");
    let xr = udp_socket(&x, 9101);
    let ys = udp_socket(&y, 0);
    for i in 0..5u8 {
        ys.send_to(&[i], SocketAddr::from((x.ip, 9101)))
            .expect("send from Y");
    }
    let mut buf = [0u8; 16];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(700) {
        if let Ok((n, from)) = xr.recv_from(&mut buf) {
            panic!("unsolicited UDP from {from} reached X ({n} bytes)");
        }
    }
    let counted = wait_for(Duration::from_secs(2), || fw_drops(&t, &x).0 >= def0 + 2);
    let (def1, _, dump) = fw_drops(&t, &x);
    assert!(
        counted,
        "X's vnic did not count the unsolicited TCP and UDP as firewall_default ({def0} -> \
         {def1}); {dump}"
    );
    let (l, raw) = fw_ls(&t, &x);
    assert!(
        ct_counter(&l, "established") > 0 && ct_counter(&l, "new_flows") > 0,
        "conntrack on X's host saw no tracked traffic: {raw}"
    );

    run.store(false, Ordering::Relaxed);
    tcp_echo.join().expect("tcp echo");
    let echoed = udp_echo.join().expect("udp echo");
    assert!(echoed >= 1, "Y's UDP echo saw nothing");
    drop(l9100);
    teardown(t);
}

#[test]
fn same_account_any_port_third_account_blocked() {
    if !root_or_skip("same_account_any_port_third_account_blocked") {
        return;
    }
    let mut t = Topo::new(3);
    let vni = 5103;
    let x1 = t.add_container(0, vni, "10.81.3.1/24", "02:00:0a:51:03:01");
    let x2 = t.add_container(1, vni, "10.81.3.2/24", "02:00:0a:51:03:02");
    let z = t.add_container(2, vni, "10.81.3.3/24", "02:00:0a:51:03:03");
    t.ping(&x1, x2.ip, 2)
        .unwrap_or_else(|e| panic!("unfiltered overlay: {e}"));
    t.ping(&z, x2.ip, 2)
        .unwrap_or_else(|e| panic!("unfiltered overlay: {e}"));
    let mut p = Policy::default();
    p.docker(VM_X, ACCOUNT_A, &x1, &[])
        .docker(VM_X2, ACCOUNT_A, &x2, &[])
        .docker(VM_Z, ACCOUNT_C, &z, &[]);
    apply_all(&t, &p.doc());
    let account: Vec<RuleRecord> = docker::account_rules(ACCOUNT_A)
        .into_iter()
        .map(|r| r.record)
        .collect();
    let (l, raw) = fw_ls(&t, &x2);
    for r in &account {
        assert!(
            l.rules
                .iter()
                .any(|e| e.uuid == r.uuid && e.direction == "in" && e.action == "allow"),
            "X2 lacks account rule {} ({}): {raw}",
            r.uuid,
            r.rule
        );
    }

    // Same account: any TCP port, and UDP.
    let (tcp_port, udp_port) = (23456, 23457);
    tcp_transfer(&x1, &x2, tcp_port, MB)
        .unwrap_or_else(|e| panic!("X1 -> X2:{tcp_port}: {e}; {}", fw_drops(&t, &x2).2));
    let run = Arc::new(AtomicBool::new(true));
    let echo = udp_echo_server(&x2, udp_port, run.clone());
    let x1s = udp_socket(&x1, 0);
    let dst = SocketAddr::from((x2.ip, udp_port));
    assert!(
        udp_probe(&x1s, dst, Duration::from_secs(3)).is_some(),
        "X1 -> X2:{udp_port}/udp got no answer; {}",
        fw_drops(&t, &x2).2
    );

    // Another account: the same ports are closed.
    let (def0, _, _) = fw_drops(&t, &x2);
    let l = listen(&x2, tcp_port);
    assert_connect_dropped(&z, &x2, tcp_port, "third account, TCP");
    let zs = udp_socket(&z, 0);
    let got = udp_probe(&zs, dst, Duration::from_secs(1));
    assert!(got.is_none(), "Z (account C) got a UDP answer from X2");
    let counted = wait_for(Duration::from_secs(2), || fw_drops(&t, &x2).0 >= def0 + 2);
    let (def1, _, dump) = fw_drops(&t, &x2);
    assert!(
        counted,
        "X2's vnic did not count Z's TCP and UDP as firewall_default ({def0} -> {def1}); {dump}"
    );
    let (l2, raw) = fw_ls(&t, &x2);
    for r in &account {
        let hits = l2
            .rules
            .iter()
            .find(|e| e.uuid == r.uuid)
            .map_or(0, |e| e.hits);
        assert!(hits >= 1, "account rule {} admitted nothing: {raw}", r.rule);
    }
    run.store(false, Ordering::Relaxed);
    echo.join().expect("udp echo");
    drop(l);
    teardown(t);
}

#[test]
fn ping_allowed_by_global_rule() {
    if !root_or_skip("ping_allowed_by_global_rule") {
        return;
    }
    let mut t = Topo::new(2);
    let vni = 5104;
    let x = t.add_container(0, vni, "10.81.4.1/24", "02:00:0a:51:04:01");
    let z = t.add_container(1, vni, "10.81.4.3/24", "02:00:0a:51:04:03");
    t.ping(&z, x.ip, 2)
        .unwrap_or_else(|e| panic!("unfiltered overlay: {e}"));

    let mut p = Policy::default();
    p.docker(VM_X, ACCOUNT_A, &x, &[])
        .docker(VM_Z, ACCOUNT_C, &z, &[]);
    let gen0 = apply_all(&t, &p.doc());
    let (def0, _, _) = fw_drops(&t, &x);
    let refused = t.ping(&z, x.ip, 2);
    assert!(
        refused.is_err(),
        "ping Z -> X passed without the global rule: {refused:?}"
    );
    let counted = wait_for(Duration::from_secs(2), || fw_drops(&t, &x).0 >= def0 + 2);
    let (def1, _, dump) = fw_drops(&t, &x);
    assert!(
        counted,
        "X's vnic did not count 2 echo requests as firewall_default ({def0} -> {def1}); {dump}"
    );

    p.global();
    let ping_rule = docker::global_rules()
        .into_iter()
        .find(|r| r.kind == ImpliedKind::GlobalPing)
        .expect("T6")
        .record;
    let gen1 = apply_all(&t, &p.doc());
    assert_eq!(gen1, gen0 + 1, "generation after the second apply");
    t.ping(&z, x.ip, 3)
        .unwrap_or_else(|e| panic!("ping with the global rule: {e}; {}", fw_drops(&t, &x).2));
    let (l, raw) = fw_ls(&t, &x);
    assert_eq!(l.generation, gen1, "{raw}");
    let line = l
        .rules
        .iter()
        .find(|r| r.uuid == ping_rule.uuid)
        .unwrap_or_else(|| panic!("X lacks the global ping rule: {raw}"));
    assert!(
        line.direction == "in" && line.action == "allow" && line.hits >= 1,
        "global ping rule line {line:?}: {raw}"
    );
    teardown(t);
}

#[test]
fn priority_block_overrides_allow() {
    if !root_or_skip("priority_block_overrides_allow") {
        return;
    }
    let mut t = Topo::new(2);
    let vni = 5105;
    let x = t.add_container(0, vni, "10.81.5.1/24", "02:00:0a:51:05:01");
    let y = t.add_container(1, vni, "10.81.5.2/24", "02:00:0a:51:05:02");
    t.ping(&y, x.ip, 2)
        .unwrap_or_else(|e| panic!("unfiltered overlay: {e}"));
    let mut p = Policy::default();
    p.docker(VM_X, ACCOUNT_A, &x, &[(PortProto::Tcp, 8080)])
        .docker(VM_Y, ACCOUNT_B, &y, &[]);
    let publish = publish_rule(&p, VM_X);
    apply_all(&t, &p.doc());

    let run = Arc::new(AtomicBool::new(true));
    let server = tcp_echo_server(listen(&x, 8080), run.clone());
    // A long-lived connection, opened and used before the change.
    let mut long = connect(&y, x.ip, 8080, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("Y -> X:8080 (published): {e}; {}", fw_drops(&t, &x).2));
    echo_roundtrip(&mut long, 4096, 1).unwrap_or_else(|e| panic!("long-lived echo: {e}"));
    let mut fresh = connect(&y, x.ip, 8080, Duration::from_secs(5)).expect("second connection");
    echo_roundtrip(&mut fresh, 4096, 2).unwrap_or_else(|e| panic!("echo: {e}"));
    drop(fresh);

    // An owner's rule resolves `vm` targets among that owner's VMs only (fwadm's semantics):
    // account A naming account B's container matches nothing and compiles to no entry.
    let by_vm = format!("FROM vm {VM_Y} TO vm {VM_X} BLOCK tcp PORT 8080 PRIORITY 1");
    fw_parse(&by_vm).unwrap_or_else(|e| panic!("fw parse {by_vm:?}: {e}"));
    let by_vm_uuid = "20000000-0000-4000-8000-000000000001";
    let mut p1 = p.clone();
    p1.rule(RuleRecord {
        uuid: by_vm_uuid.into(),
        owner_uuid: Some(ACCOUNT_A.into()),
        global: false,
        enabled: true,
        rule: by_vm.clone(),
    });
    apply_all(&t, &p1.doc());
    let (l, raw) = fw_ls(&t, &x);
    assert!(
        !l.rules.iter().any(|r| r.uuid == by_vm_uuid),
        "a rule of account A naming account B's VM was compiled into X's rules: {raw}"
    );
    let mut check = connect(&y, x.ip, 8080, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("A's rule naming B's VM blocked Y: {e}"));
    echo_roundtrip(&mut check, 4096, 3).unwrap_or_else(|e| panic!("echo: {e}"));
    drop(check);

    // The same block by Y's address.
    let block = format!(
        "FROM ip {} TO vm {VM_X} BLOCK tcp PORT 8080 PRIORITY 1",
        y.ip
    );
    let canonical = fw_parse(&block).unwrap_or_else(|e| panic!("fw parse {block:?}: {e}"));
    let block_uuid = "20000000-0000-4000-8000-000000000002";
    let mut p2 = p.clone();
    p2.rule(RuleRecord {
        uuid: block_uuid.into(),
        owner_uuid: Some(ACCOUNT_A.into()),
        global: false,
        enabled: true,
        rule: block.clone(),
    });
    let gen = apply_all(&t, &p2.doc());
    let (_, rule0, _) = fw_drops(&t, &x);
    assert_connect_dropped(&y, &x, 8080, "priority-1 BLOCK over the publish ALLOW");
    let counted = wait_for(Duration::from_secs(2), || fw_drops(&t, &x).1 > rule0);
    let (_, rule1, dump) = fw_drops(&t, &x);
    assert!(
        counted,
        "X's vnic counted no firewall_rule drop for the blocked SYN ({rule0} -> {rule1}); {dump}"
    );
    let (l, raw) = fw_ls(&t, &x);
    assert_eq!(l.generation, gen, "{raw}");
    let inbound: Vec<_> = l.rules.iter().filter(|r| r.direction == "in").collect();
    let bi = inbound
        .iter()
        .position(|r| r.uuid == block_uuid)
        .unwrap_or_else(|| panic!("X lacks the BLOCK rule: {raw}"));
    let ai = inbound
        .iter()
        .position(|r| r.uuid == publish.uuid)
        .unwrap_or_else(|| panic!("X lacks the publish rule: {raw}"));
    assert!(bi < ai, "BLOCK (priority 1) listed after the ALLOW: {raw}");
    let b = inbound[bi];
    assert!(
        b.action == "block" && b.priority == 1 && b.hits >= 1 && b.text == canonical,
        "BLOCK line {b:?} (canonical {canonical:?}): {raw}"
    );
    assert!(l.denied_by_rule >= 1, "fw ls denied_by_rule: {raw}");

    // The long-lived connection is re-checked on its next packet and revoked: Y's data no
    // longer reaches X, nothing comes back.
    let revoked0 = ct_counter(&l, "revoked");
    long.set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("read timeout");
    long.write_all(b"after the block")
        .expect("write (queued locally)");
    let mut buf = [0u8; 64];
    let echoed = long.read(&mut buf);
    let (l, raw) = fw_ls(&t, &x);
    assert!(
        matches!(&echoed, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "the established connection still works after the BLOCK: read gave {echoed:?}; {raw}"
    );
    assert!(
        ct_counter(&l, "revoked") > revoked0,
        "conntrack revoked nothing ({revoked0} before): {raw}"
    );
    drop(long);
    run.store(false, Ordering::Relaxed);
    server.join().expect("echo server");
    teardown(t);
}

#[test]
fn bad_rule_rejected_old_state_kept() {
    if !root_or_skip("bad_rule_rejected_old_state_kept") {
        return;
    }
    let mut t = Topo::new(2);
    let vni = 5106;
    let x = t.add_container(0, vni, "10.81.6.1/24", "02:00:0a:51:06:01");
    let y = t.add_container(1, vni, "10.81.6.2/24", "02:00:0a:51:06:02");
    t.ping(&y, x.ip, 2)
        .unwrap_or_else(|e| panic!("unfiltered overlay: {e}"));
    let mut p = Policy::default();
    p.docker(VM_X, ACCOUNT_A, &x, &[(PortProto::Tcp, 8080)])
        .docker(VM_Y, ACCOUNT_B, &y, &[]);
    let gen = apply_all(&t, &p.doc());
    let (before, raw_before) = fw_ls(&t, &x);
    tcp_transfer(&y, &x, 8080, MB).unwrap_or_else(|e| panic!("published port: {e}"));
    let l8081 = listen(&x, 8081);
    assert_connect_dropped(&y, &x, 8081, "unpublished port under the good state");

    let bad_text = "FROM any TO all vms ALLOW tcp PORT 99999";
    assert!(fw_parse(bad_text).is_err(), "fw parse accepts {bad_text:?}");
    let bad_uuid = "30000000-0000-4000-8000-0000000000ba";
    p.rule(RuleRecord {
        uuid: bad_uuid.into(),
        owner_uuid: Some(ACCOUNT_A.into()),
        global: false,
        enabled: true,
        rule: bad_text.into(),
    });
    let doc = p.doc();
    for h in 0..t.hosts.len() {
        match try_apply(&t, h, &doc) {
            Ok(a) => panic!("host {h} accepted a state with {bad_text:?}: {a:?}"),
            Err((code, err)) => {
                assert!(
                    code.is_some_and(|c| c != 0),
                    "fw apply exit {code:?}: {err}"
                );
                assert!(
                    err.contains(bad_uuid),
                    "fw apply's error does not name rule {bad_uuid}: {err}"
                );
            }
        }
    }

    // The old state stays in force: same generation and rules, same verdicts.
    let (after, raw_after) = fw_ls(&t, &x);
    assert_eq!(
        after.generation, gen,
        "generation changed after a rejected apply:\nbefore {raw_before}\nafter {raw_after}"
    );
    assert!(after.filtered, "{raw_after}");
    let texts = |l: &FwListing| {
        l.rules
            .iter()
            .map(|r| (r.direction.clone(), r.uuid.clone(), r.text.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        texts(&after),
        texts(&before),
        "rules changed after a rejected apply:\nbefore {raw_before}\nafter {raw_after}"
    );
    tcp_transfer(&y, &x, 8080, MB)
        .unwrap_or_else(|e| panic!("published port after the rejected apply: {e}"));
    assert_connect_dropped(&y, &x, 8081, "unpublished port after the rejected apply");
    drop(l8081);
    teardown(t);
}

/// The BLOCK of `priority_block_overrides_allow` again, on an established connection whose
/// next packet after the change comes from the firewalled container (a response, a push, a
/// keepalive) rather than from the blocked peer: the blocked direction must stay blocked.
#[test]
fn revoked_connection_stays_cut_when_container_sends() {
    if !root_or_skip("revoked_connection_stays_cut_when_container_sends") {
        return;
    }
    let mut t = Topo::new(2);
    let vni = 5107;
    let x = t.add_container(0, vni, "10.81.7.1/24", "02:00:0a:51:07:01");
    let y = t.add_container(1, vni, "10.81.7.2/24", "02:00:0a:51:07:02");
    t.ping(&y, x.ip, 2)
        .unwrap_or_else(|e| panic!("unfiltered overlay: {e}"));
    let mut p = Policy::default();
    p.docker(VM_X, ACCOUNT_A, &x, &[(PortProto::Tcp, 8080)])
        .docker(VM_Y, ACCOUNT_B, &y, &[]);
    apply_all(&t, &p.doc());
    let l = listen(&x, 8080);
    let mut ys = connect(&y, x.ip, 8080, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("Y -> X:8080 (published): {e}; {}", fw_drops(&t, &x).2));
    let (mut xs, _) = l.accept().expect("accept on X");
    let mut buf = [0u8; 64];
    xs.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    ys.write_all(b"request").expect("Y writes");
    assert_eq!(xs.read(&mut buf).ok(), Some(7), "X did not get Y's request");
    xs.write_all(b"response").expect("X writes");
    assert_eq!(
        ys.read(&mut buf).ok(),
        Some(8),
        "Y did not get X's response"
    );

    let block = format!(
        "FROM ip {} TO vm {VM_X} BLOCK tcp PORT 8080 PRIORITY 1",
        y.ip
    );
    fw_parse(&block).unwrap_or_else(|e| panic!("fw parse {block:?}: {e}"));
    p.rule(RuleRecord {
        uuid: "20000000-0000-4000-8000-000000000003".into(),
        owner_uuid: Some(ACCOUNT_A.into()),
        global: false,
        enabled: true,
        rule: block,
    });
    apply_all(&t, &p.doc());
    // X speaks first after the change. Whether its bytes reach Y is not the point (fwadm lets
    // outbound TCP pass); Y's answer on the connection must not reach X.
    xs.write_all(b"push").expect("X writes after the block");
    ys.set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let pushed = ys.read(&mut buf);
    eprintln!("X's push after the block, read by Y: {pushed:?}");
    ys.write_all(b"reply").expect("Y writes (queued locally)");
    xs.set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let got = xs.read(&mut buf);
    let (l, raw) = fw_ls(&t, &x);
    assert!(
        matches!(&got, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "Y's data reached X on port 8080 after `FROM ip {} ... BLOCK tcp PORT 8080 PRIORITY 1` \
         (X read {got:?}; X's push read by Y: {pushed:?}): X's first packet after the change \
         revoked the flow, and its retransmission (ACK, no SYN) was taken as a new outbound \
         flow, whose state then admits Y's packets; conntrack new_flows {} revoked {}: {raw}",
        y.ip,
        ct_counter(&l, "new_flows"),
        ct_counter(&l, "revoked"),
    );
    assert_connect_dropped(&y, &x, 8080, "new connection after the BLOCK");
    drop((xs, ys, l));
    teardown(t);
}

#[test]
fn firewall_state_survives_a_dataplane_restart() {
    if !root_or_skip("firewall_state_survives_a_dataplane_restart") {
        return;
    }
    let mut t = Topo::new(2);
    let vni = 5107;
    let x = t.add_container(0, vni, "10.81.7.1/24", "02:00:0a:51:07:01");
    let y = t.add_container(1, vni, "10.81.7.2/24", "02:00:0a:51:07:02");
    let mut p = Policy::default();
    p.docker(VM_X, ACCOUNT_A, &x, &[(PortProto::Tcp, 8080)])
        .docker(VM_Y, ACCOUNT_B, &y, &[]);
    let gen = apply_all(&t, &p.doc());
    let (before, raw) = fw_ls(&t, &x);
    assert!(before.filtered, "{raw}");

    // Restart X's host (its TAP goes away with it) and attach X again: the vnic is filtered
    // from its first frame, by the state saved with --firewall-state, without a new apply.
    t.stop_dataplane(0);
    t.start_dataplane(0);
    t.vnic_add(0, &x);
    let (after, raw) = fw_ls(&t, &x);
    assert!(after.filtered, "X unfiltered after a restart: {raw}");
    assert_eq!(after.generation, gen, "{raw}");
    let texts = |l: &FwListing| {
        l.rules
            .iter()
            .map(|r| (r.direction.clone(), r.text.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(texts(&after), texts(&before), "{raw}");
    // And enforced: the published port answers, another one does not.
    let _l8080 = listen(&x, 8080);
    let _l8081 = listen(&x, 8081);
    connect(&y, x.ip, 8080, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("Y -> X:8080 after restart: {e}"));
    assert_connect_dropped(&y, &x, 8081, "unpublished port after restart");
    // The next apply continues the generation sequence.
    assert_eq!(apply_all(&t, &p.doc()), gen + 1);
    teardown(t);
}
