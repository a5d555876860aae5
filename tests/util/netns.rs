//! Multi-host overlay topologies made of network namespaces, for the `netns_*` tests.
//!
//! A [`Topo`] is an underlay bridge namespace (`br0`, 192.168.77.254/24, where Portolan runs
//! with an SQLite store in a private temp dir), "hosts" (namespaces joined to the bridge by a
//! veth, 192.168.77.N/24 on `u0`, each running `fabric dataplane`), and containers (namespaces
//! with a TAP vnic added through `fabric vnic add`). Kernel-vxlan hosts (no fabric) can join
//! the same underlay. Every name starts with a per-topology prefix (pid + counter), and every
//! interface lives inside a namespace the topology created, so tests run in parallel and never
//! touch the machine's own interfaces. Dropping the topology stops every process it started
//! (SIGTERM, then SIGKILL), deletes every namespace (which destroys the devices in them) and
//! the temp dir, also when the test panics; on a panic it prints the daemons' logs first.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fabric::dataplane::control::Stats;
use fabric::io::netlink::Netns;

/// The underlay's first three octets.
pub const UNDERLAY: &str = "192.168.77";
/// Portolan's address on the underlay bridge.
pub const PORTOLAN_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 254);
/// Portolan's SVP port.
pub const PORTOLAN_PORT: u16 = 1296;

static COUNTER: AtomicU32 = AtomicU32::new(0);

include!("root.rs");

/// The `fabric` binary under test.
pub fn fabric_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fabric"))
}

/// The `portolan` binary: next to `fabric` (a workspace build puts it there); otherwise it is
/// built once into a private target dir.
pub fn portolan_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let fabric = fabric_bin();
        let dir = fabric.parent().expect("fabric binary has a directory");
        let next = dir.join("portolan");
        if next.exists() {
            return next;
        }
        let release = dir.file_name().and_then(|n| n.to_str()) == Some("release");
        let target = dir
            .parent()
            .expect("profile dir has a parent")
            .join("netns-portolan");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "portolan", "--bin", "portolan"])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo to build portolan");
        assert!(st.success(), "building portolan failed: {st}");
        let bin = target
            .join(if release { "release" } else { "debug" })
            .join("portolan");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// Runs a command; returns stdout, or an error with the command line, status and stderr.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `ip ARGS`, panicking with stderr on failure.
pub fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `argv` inside namespace `ns` (`ip netns exec`).
pub fn in_ns(ns: &str, argv: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(argv))
}

fn sigterm(child: &mut Child, grace: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One fabric (or kernel-vxlan) host on the underlay.
#[derive(Debug)]
pub struct Host {
    /// Namespace name.
    pub ns: String,
    /// Underlay address (on `u0`).
    pub ip: Ipv4Addr,
    /// Identity in Portolan.
    pub cn_uuid: String,
    /// Control socket of its dataplane (fabric hosts).
    pub control: PathBuf,
    /// Whether it runs `fabric dataplane` (false: a Linux vxlan host).
    pub fabric: bool,
    dataplane: Option<Child>,
    log: PathBuf,
}

impl Host {
    /// Pid of the running dataplane.
    pub fn dataplane_pid(&self) -> Option<u32> {
        self.dataplane.as_ref().map(Child::id)
    }
}

/// A container: a namespace with one interface `eth0`.
#[derive(Debug, Clone)]
pub struct Container {
    /// Namespace name.
    pub ns: String,
    /// Overlay address.
    pub ip: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// MAC.
    pub mac: String,
    /// Segment.
    pub vni: u32,
    /// Index of its host in the topology.
    pub host: usize,
}

impl Container {
    /// Opens the container's namespace (for sockets created inside it).
    pub fn netns(&self) -> Netns {
        Netns::open(&self.ns).unwrap_or_else(|e| panic!("open netns {}: {e}", self.ns))
    }
}

/// A whole topology; see the module docs.
pub struct Topo {
    /// Prefix of every namespace name.
    pub prefix: String,
    /// Private temp dir (store, sockets, logs).
    pub dir: PathBuf,
    /// The underlay bridge namespace (Portolan runs here).
    pub bridge_ns: String,
    /// Hosts, index 0 is 192.168.77.1.
    pub hosts: Vec<Host>,
    namespaces: Vec<String>,
    portolan: Option<Child>,
    portolan_log: PathBuf,
    store: PathBuf,
    imports: u32,
    containers: u32,
}

/// Host `i`'s cn_uuid (stable, readable).
pub fn cn_uuid(i: usize) -> String {
    format!("564d1a4c-0000-4000-8000-{:012x}", i + 1)
}

impl Topo {
    /// Builds the underlay, starts Portolan and `fabric_hosts` fabric hosts.
    pub fn new(fabric_hosts: usize) -> Topo {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("fnt{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let mut t = Topo {
            bridge_ns: format!("{prefix}-u"),
            prefix,
            store: dir.join("portolan.db"),
            portolan_log: dir.join("portolan.log"),
            dir,
            hosts: Vec::new(),
            namespaces: Vec::new(),
            portolan: None,
            imports: 0,
            containers: 0,
        };
        let br = t.bridge_ns.clone();
        t.create_ns(&br);
        // A fixed MAC: otherwise the bridge takes the lowest MAC of its ports, and adding a
        // host's port may change it under hosts that already resolved Portolan's address.
        ip(&[
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "address",
            "02:00:c0:a8:4d:fe",
            "type",
            "bridge",
        ]);
        ip(&[
            "-n",
            &br,
            "addr",
            "add",
            &format!("{PORTOLAN_IP}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        t.start_portolan();
        for _ in 0..fabric_hosts {
            t.add_host(true);
        }
        t
    }

    fn create_ns(&mut self, name: &str) {
        let ns = Netns::create(name).unwrap_or_else(|e| panic!("create netns {name}: {e}"));
        drop(ns);
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    /// Adds a host on the underlay; with `fabric`, registers it in Portolan and starts its
    /// dataplane. Returns its index.
    pub fn add_host(&mut self, fabric: bool) -> usize {
        let i = self.hosts.len();
        let ns = format!("{}-h{}", self.prefix, i + 1);
        let hip = Ipv4Addr::new(192, 168, 77, (i + 1) as u8);
        self.create_ns(&ns);
        let br = self.bridge_ns.clone();
        let peer = format!("vh{}", i + 1);
        ip(&[
            "-n", &br, "link", "add", &peer, "type", "veth", "peer", "name", "u0", "netns", &ns,
        ]);
        ip(&["-n", &br, "link", "set", &peer, "master", "br0", "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{hip}/24"), "dev", "u0"]);
        ip(&["-n", &ns, "link", "set", "u0", "up"]);
        let uuid = cn_uuid(i);
        self.import(&serde_json::json!({
            "underlay": [{"cn_uuid": uuid, "ip": hip.to_string(), "port": 4789}]
        }));
        let control = self.dir.join(format!("h{}.sock", i + 1));
        let log = self.dir.join(format!("h{}.log", i + 1));
        self.hosts.push(Host {
            ns,
            ip: hip,
            cn_uuid: uuid,
            control,
            fabric,
            dataplane: None,
            log,
        });
        if fabric {
            self.start_dataplane(i);
        }
        i
    }

    /// Starts host `i`'s dataplane and waits until its control socket answers.
    pub fn start_dataplane(&mut self, i: usize) {
        self.start_dataplane_with(i, &[]);
    }

    /// [`Topo::start_dataplane`] with extra `fabric dataplane` arguments (`--peer IP`, ...).
    pub fn start_dataplane_with(&mut self, i: usize, extra: &[&str]) {
        let h = &mut self.hosts[i];
        assert!(
            h.dataplane.is_none(),
            "dataplane of host {i} already running"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log)
            .expect("dataplane log");
        let child = Command::new("ip")
            .args(["netns", "exec", &h.ns])
            .arg(fabric_bin())
            .args(["dataplane", "--underlay", &h.ip.to_string()])
            .args(["--portolan", &format!("{PORTOLAN_IP}:{PORTOLAN_PORT}")])
            .args(["--cn-uuid", &h.cn_uuid])
            .arg("--control")
            .arg(&h.control)
            .args(["--poll-interval-ms", "500"])
            .arg("--firewall-state")
            .arg(self.dir.join(format!("h{i}-firewall.json")))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn fabric dataplane");
        h.dataplane = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.try_stats(i).is_ok() {
                return;
            }
            let h = &mut self.hosts[i];
            if let Some(st) = h
                .dataplane
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "dataplane of host {i} exited ({st}) at start:\n{}",
                    std::fs::read_to_string(&h.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "dataplane of host {i} did not answer on {} within 20 s",
                h.control.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops host `i`'s dataplane (SIGTERM, which removes its TAPs; SIGKILL after 5 s).
    pub fn stop_dataplane(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].dataplane.take() {
            sigterm(&mut c, Duration::from_secs(5));
        }
    }

    /// Whether host `i`'s dataplane process is still the one we started and alive.
    pub fn dataplane_alive(&mut self, i: usize) -> bool {
        self.hosts[i]
            .dataplane
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Starts Portolan in the bridge namespace and waits until it accepts connections.
    pub fn start_portolan(&mut self) {
        assert!(self.portolan.is_none(), "portolan already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.portolan_log)
            .expect("portolan log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.bridge_ns])
            .arg(portolan_bin())
            .args([
                "serve",
                "--listen",
                &format!("{PORTOLAN_IP}:{PORTOLAN_PORT}"),
            ])
            .arg("--store")
            .arg(format!("sqlite:{}", self.store.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn portolan serve");
        self.portolan = Some(child);
        let ns = Netns::open(&self.bridge_ns).expect("bridge netns");
        let addr = SocketAddr::from((PORTOLAN_IP, PORTOLAN_PORT));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = ns
                .run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
                .unwrap_or(false);
            if ok {
                return;
            }
            if let Some(st) = self
                .portolan
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "portolan exited ({st}) at start:\n{}",
                    std::fs::read_to_string(&self.portolan_log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "portolan did not listen on {addr} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops Portolan (SIGTERM, then SIGKILL).
    pub fn stop_portolan(&mut self) {
        if let Some(mut c) = self.portolan.take() {
            sigterm(&mut c, Duration::from_secs(5));
        }
    }

    /// `portolan import` of a JSON document into the store.
    pub fn import(&mut self, doc: &serde_json::Value) {
        self.imports += 1;
        let f = self.dir.join(format!("import-{}.json", self.imports));
        std::fs::write(&f, doc.to_string()).expect("write import file");
        run(Command::new(portolan_bin())
            .arg("import")
            .arg("--store")
            .arg(format!("sqlite:{}", self.store.display()))
            .arg(&f))
        .unwrap_or_else(|e| panic!("portolan import {doc}: {e}"));
    }

    /// Maps a container in Portolan (a new mapping, or a move when it was on another host).
    pub fn map(&mut self, c: &Container, host: usize) {
        let uuid = self.hosts[host].cn_uuid.clone();
        self.import(&serde_json::json!({
            "overlay": [{"vnet_id": c.vni, "ip": c.ip.to_string(), "mac": c.mac, "cn_uuid": uuid}]
        }));
    }

    fn new_container_ns(&mut self) -> String {
        self.containers += 1;
        let ns = format!("{}-c{}", self.prefix, self.containers);
        self.create_ns(&ns);
        ns
    }

    /// A container on fabric host `host`: a namespace with vnic `eth0` from that host's
    /// dataplane, mapped in Portolan.
    pub fn add_container(&mut self, host: usize, vni: u32, ip: &str, mac: &str) -> Container {
        let (a, l) = ip.split_once('/').expect("ip as A/LEN");
        let ns = self.new_container_ns();
        let c = Container {
            ns,
            ip: a.parse().expect("IPv4 address"),
            prefix_len: l.parse().expect("prefix length"),
            mac: mac.to_owned(),
            vni,
            host,
        };
        self.vnic_add(host, &c);
        self.map(&c, host);
        c
    }

    /// `fabric vnic add` of `c`'s interface on host `host`.
    pub fn vnic_add(&self, host: usize, c: &Container) {
        let h = &self.hosts[host];
        run(Command::new(fabric_bin())
            .args(["vnic", "add", "--control"])
            .arg(&h.control)
            .args(["--netns", &c.ns, "--name", "eth0"])
            .args(["--vni", &c.vni.to_string(), "--mac", &c.mac])
            .args(["--ip", &format!("{}/{}", c.ip, c.prefix_len)])
            .args(["--mtu", "1450"]))
        .unwrap_or_else(|e| panic!("vnic add {} on host {host}: {e}", c.ns));
    }

    /// `fabric vnic rm` of `c`'s interface on host `host`.
    pub fn vnic_rm(&self, host: usize, c: &Container) {
        let h = &self.hosts[host];
        run(Command::new(fabric_bin())
            .args(["vnic", "rm", "--control"])
            .arg(&h.control)
            .args(["--netns", &c.ns, "--name", "eth0"]))
        .unwrap_or_else(|e| panic!("vnic rm {} on host {host}: {e}", c.ns));
    }

    fn try_stats(&self, host: usize) -> Result<Stats, String> {
        let out = run(Command::new(fabric_bin())
            .args(["stats", "--json", "--control"])
            .arg(&self.hosts[host].control))?;
        serde_json::from_str(&out).map_err(|e| format!("fabric stats --json: {e}: {out}"))
    }

    /// `fabric stats --json` of host `host`.
    pub fn stats(&self, host: usize) -> Stats {
        self.try_stats(host)
            .unwrap_or_else(|e| panic!("stats of host {host}: {e}"))
    }

    /// A Linux-vxlan host (no fabric): bridge `brk` with vxlan `vx0` (VNI `vni`, dstport 4789,
    /// nolearning, MTU 1450), registered in Portolan so fabric can reach it.
    pub fn add_kernel_host(&mut self, vni: u32) -> usize {
        let i = self.add_host(false);
        let ns = self.hosts[i].ns.clone();
        let local = self.hosts[i].ip.to_string();
        ip(&["-n", &ns, "link", "add", "brk", "type", "bridge"]);
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            &vni.to_string(),
            "dstport",
            "4789",
            "local",
            &local,
            "dev",
            "u0",
            "nolearning",
        ]);
        ip(&["-n", &ns, "link", "set", "vx0", "mtu", "1450"]);
        ip(&["-n", &ns, "link", "set", "vx0", "master", "brk", "up"]);
        ip(&["-n", &ns, "link", "set", "brk", "up"]);
        // A veth "NIC" passes CHECKSUM_PARTIAL packets on unfinished: the kernel vxlan driver
        // would leave the inner TCP checksum to the underlay device, and fabric's UDP socket
        // would receive it incomplete (a real NIC computes it on the wire). Without TX
        // checksum offload on u0 the kernel completes checksums (and segments) in software.
        in_ns(&ns, &["ethtool", "-K", "u0", "tx", "off"])
            .unwrap_or_else(|e| panic!("ethtool -K u0 tx off: {e}"));
        i
    }

    /// A container behind kernel host `host`'s bridge (veth), mapped in Portolan.
    pub fn add_kernel_container(
        &mut self,
        host: usize,
        vni: u32,
        ip_: &str,
        mac: &str,
    ) -> Container {
        let (a, l) = ip_.split_once('/').expect("ip as A/LEN");
        let ns = self.new_container_ns();
        let hns = self.hosts[host].ns.clone();
        let port = format!("k{}", self.containers);
        ip(&[
            "-n", &hns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["-n", &hns, "link", "set", &port, "mtu", "1450"]);
        ip(&["-n", &hns, "link", "set", &port, "master", "brk", "up"]);
        ip(&[
            "-n", &ns, "link", "set", "eth0", "address", mac, "mtu", "1450",
        ]);
        ip(&["-n", &ns, "addr", "add", ip_, "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        let c = Container {
            ns,
            ip: a.parse().expect("IPv4 address"),
            prefix_len: l.parse().expect("prefix length"),
            mac: mac.to_owned(),
            vni,
            host,
        };
        self.map(&c, host);
        c
    }

    /// A static FDB entry on kernel host `host`'s `vx0`: `mac` lives at `dst` (underlay IP).
    pub fn kernel_fdb(&self, host: usize, mac: &str, dst: Ipv4Addr) {
        in_ns(
            &self.hosts[host].ns,
            &[
                "bridge",
                "fdb",
                "append",
                mac,
                "dev",
                "vx0",
                "dst",
                &dst.to_string(),
            ],
        )
        .unwrap_or_else(|e| panic!("bridge fdb append: {e}"));
    }

    /// Pings `to` from container `from`; Ok(output) when every reply arrived.
    pub fn ping(&self, from: &Container, to: Ipv4Addr, count: u32) -> Result<String, String> {
        in_ns(
            &from.ns,
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                &to.to_string(),
            ],
        )
        .and_then(|out| {
            if out.contains(&format!(" {count} received")) {
                Ok(out)
            } else {
                Err(format!("ping {to} from {}: {out}", from.ns))
            }
        })
    }

    /// Pings until one reply arrives or `within` passes; returns the time it took.
    pub fn ping_until(&self, from: &Container, to: Ipv4Addr, within: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if in_ns(
                &from.ns,
                &["ping", "-n", "-q", "-c", "1", "-W", "1", &to.to_string()],
            )
            .is_ok()
            {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Prints every daemon's log (for diagnosing a failure).
    pub fn dump_logs(&self) {
        eprintln!(
            "--- portolan log ({}):\n{}",
            self.portolan_log.display(),
            tail(&self.portolan_log)
        );
        for h in self.hosts.iter().filter(|h| h.fabric) {
            eprintln!("--- dataplane {} log:\n{}", h.ns, tail(&h.log));
        }
    }
}

fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

impl Drop for Topo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
            let keep = std::env::temp_dir().join(format!("{}-failed-logs", self.prefix));
            if std::fs::create_dir_all(&keep).is_ok() {
                for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                    if e.path().extension().is_some_and(|x| x == "log") {
                        let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                    }
                }
                eprintln!("--- full logs kept in {}", keep.display());
            }
            for (i, _) in self.hosts.iter().enumerate().filter(|(_, h)| h.fabric) {
                if let Ok(s) = self.try_stats(i) {
                    eprintln!(
                        "--- stats of host {i}: {}",
                        serde_json::to_string(&s).unwrap_or_default()
                    );
                }
            }
        }
        for i in 0..self.hosts.len() {
            self.stop_dataplane(i);
        }
        self.stop_portolan();
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = Netns::delete(ns) {
                eprintln!("cleanup: delete netns {ns}: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Namespaces under /run/netns whose name starts with `prefix` (to check cleanup).
pub fn leftover_namespaces(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// Drops the topology and asserts nothing it created is left.
pub fn teardown(t: Topo) {
    let prefix = t.prefix.clone();
    let dir = t.dir.clone();
    drop(t);
    let left = leftover_namespaces(&prefix);
    assert!(left.is_empty(), "namespaces left after teardown: {left:?}");
    assert!(
        !dir.exists(),
        "temp dir {} left after teardown",
        dir.display()
    );
}

// ----- traffic helpers -----------------------------------------------------------------------

/// A deterministic, non-periodic byte stream: byte i of the stream is byte i%8 of
/// splitmix64(seed + i/8), so lost, duplicated or reordered data shows up at its offset.
pub struct Pattern {
    seed: u64,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// Fills `buf` with the stream's bytes starting at `offset`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut i = 0usize;
        while i < buf.len() {
            let pos = offset + i as u64;
            let word = splitmix64(self.seed.wrapping_add(pos / 8)).to_le_bytes();
            let within = (pos % 8) as usize;
            let n = (8 - within).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&word[within..within + n]);
            i += n;
        }
    }
}

/// What a checked TCP transfer measured.
#[derive(Debug)]
pub struct Transfer {
    /// Bytes the receiver verified.
    pub bytes: u64,
    /// Wall time of the transfer.
    pub elapsed: Duration,
}

impl Transfer {
    /// Throughput in Mbit/s.
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// Sends `bytes` of [`Pattern`] over TCP from `client` to a listener in `server` on
/// `server.ip:port`, verifies every byte on the receiving side, and returns what was
/// verified. Any stall longer than 20 s is an error.
pub fn tcp_transfer(
    client: &Container,
    server: &Container,
    port: u16,
    bytes: u64,
) -> Result<Transfer, String> {
    tcp_transfer_in(
        (&client.netns(), &client.ns),
        (&server.netns(), &server.ns),
        server.ip,
        port,
        bytes,
    )
}

/// [`tcp_transfer`] between two namespaces, each given with a name for error messages: the
/// listener binds `ip:port` in `server`.
pub fn tcp_transfer_in(
    (client_ns, client_name): (&Netns, &str),
    (server_ns, server_name): (&Netns, &str),
    ip: Ipv4Addr,
    port: u16,
    bytes: u64,
) -> Result<Transfer, String> {
    let addr = SocketAddr::from((ip, port));
    let listener = server_ns
        .run(|| TcpListener::bind(addr))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind {addr} in {server_name}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let seed = 0x5eed_0000 + u64::from(port);
    let receiver = std::thread::spawn(move || -> Result<u64, String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(format!("no connection to {addr} within 20 s"));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let pat = Pattern::new(seed);
        let mut buf = vec![0u8; 256 * 1024];
        let mut want = vec![0u8; 256 * 1024];
        let mut off = 0u64;
        loop {
            let n = s
                .read(&mut buf)
                .map_err(|e| format!("receiver read at offset {off}: {e}"))?;
            if n == 0 {
                break;
            }
            pat.fill(off, &mut want[..n]);
            if buf[..n] != want[..n] {
                let i = (0..n).find(|&i| buf[i] != want[i]).unwrap_or(0);
                return Err(format!(
                    "content mismatch at offset {}: got {:#04x}, expected {:#04x}",
                    off + i as u64,
                    buf[i],
                    want[i]
                ));
            }
            off += n as u64;
        }
        s.write_all(&off.to_le_bytes())
            .map_err(|e| format!("receiver ack: {e}"))?;
        Ok(off)
    });
    let t0 = Instant::now();
    let sent = (|| -> Result<(), String> {
        let mut s = client_ns
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("connect {addr} from {client_name}: {e}"))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let pat = Pattern::new(seed);
        let mut buf = vec![0u8; 256 * 1024];
        let mut off = 0u64;
        while off < bytes {
            let n = (bytes - off).min(buf.len() as u64) as usize;
            pat.fill(off, &mut buf[..n]);
            s.write_all(&buf[..n])
                .map_err(|e| format!("sender write at offset {off}: {e}"))?;
            off += n as u64;
        }
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let mut ack = [0u8; 8];
        s.read_exact(&mut ack)
            .map_err(|e| format!("sender waiting for the receiver's ack: {e}"))?;
        Ok(())
    })();
    let got = receiver
        .join()
        .map_err(|_| "receiver thread panicked".to_string())?;
    let elapsed = t0.elapsed();
    let got = got?;
    sent?;
    if got != bytes {
        return Err(format!("receiver verified {got} bytes, expected {bytes}"));
    }
    Ok(Transfer {
        bytes: got,
        elapsed,
    })
}

/// A UDP socket created inside container `c`'s namespace, bound to `0.0.0.0:port`.
pub fn udp_socket(c: &Container, port: u16) -> UdpSocket {
    let s = c
        .netns()
        .run(|| UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
        .unwrap_or_else(|e| panic!("enter {}: {e}", c.ns))
        .unwrap_or_else(|e| panic!("udp bind :{port} in {}: {e}", c.ns));
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    s
}

/// Resident memory of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A drop counter by label (0 when absent).
pub fn drops(c: &fabric::core::CountersSnapshot, reason: &str) -> u64 {
    c.drops.get(reason).copied().unwrap_or(0)
}

/// Echoes UDP datagrams on `port` inside `c` until the flag clears; returns how many.
pub fn udp_echo_server(
    c: &Container,
    port: u16,
    run: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let s = udp_socket(c, port);
    std::thread::spawn(move || {
        let mut n = 0;
        let mut buf = [0u8; 2048];
        while run.load(Ordering::Relaxed) {
            if let Ok((len, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..len], from);
                n += 1;
            }
        }
        n
    })
}

/// Sends numbered probes to an echo server at `dst` (one every 50 ms) until one comes back
/// from it or `within` passes; returns how long it took.
pub fn udp_probe(s: &UdpSocket, dst: SocketAddr, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    let mut seq = 0u32;
    while t0.elapsed() < within {
        seq += 1;
        let _ = s.send_to(&seq.to_be_bytes(), dst);
        let sent = Instant::now();
        while sent.elapsed() < Duration::from_millis(50) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                if from == dst && n == 4 && buf[..4] == seq.to_be_bytes() {
                    return Some(t0.elapsed());
                }
            }
        }
    }
    None
}
