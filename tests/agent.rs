//! `fabric agent` against a real `fabric control` (SQLite in a temp dir, HTTP on loopback) and
//! a real `fabric dataplane` (in a namespace this test creates, underlay on its loopback), on
//! one simulated host. Everything goes through the control plane's HTTP API; the test then
//! looks at the host: `/run/netns/<vm uuid>`, the vnic's MAC/address/MTU/route in it, the
//! dataplane's `vnic_ls`, and the VM's `state` as the control plane reports it.
//!
//! VM and server UUIDs are random, so tests run in parallel; every namespace a test or its
//! agent created (the VMs', from the agent's `owned.json`, and the host's) is deleted when the
//! rig drops, also on panic (after printing the logs).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fabric::control::client::HttpClient;
use fabric::dataplane::control::{call, Request, VnicInfo, VnicState};
use fabric::io::netlink::Netns;
use serde_json::{json, Value};

#[path = "util/root.rs"]
mod root;
use root::root_or_skip;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The convergence goal is 1 s; tests allow 10x (shared, noisy machine) and print what they saw.
const GOAL: Duration = Duration::from_secs(10);

fn fabric_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fabric"))
}

fn uuid() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).expect("random bytes");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if f() {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sh(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A vnic as seen inside a VM's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NsVnic {
    ifindex: u64,
    mac: String,
    cidr: String,
    mtu: u64,
}

/// A namespace's `net<N>` links and its default gateway.
type NsView = (Vec<(String, NsVnic)>, Option<String>);

/// `net<N>` links of namespace `ns` with their IPv4 address, and its default gateway.
fn ns_view(ns: &str) -> Option<NsView> {
    if !Netns::exists(ns) {
        return None;
    }
    let addrs: Value =
        serde_json::from_str(&sh(Command::new("ip").args(["-j", "-n", ns, "addr"])).ok()?).ok()?;
    let mut out = Vec::new();
    for l in addrs.as_array()? {
        let name = l["ifname"].as_str()?.to_owned();
        if !name.starts_with("net") {
            continue;
        }
        let cidr = l["addr_info"]
            .as_array()?
            .iter()
            .find(|a| a["family"] == "inet")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
            .unwrap_or_default();
        out.push((
            name,
            NsVnic {
                ifindex: l["ifindex"].as_u64()?,
                mac: l["address"].as_str()?.to_owned(),
                cidr,
                mtu: l["mtu"].as_u64()?,
            },
        ));
    }
    let routes: Value =
        serde_json::from_str(&sh(Command::new("ip").args(["-j", "-n", ns, "route"])).ok()?).ok()?;
    let gw = routes
        .as_array()?
        .iter()
        .find(|r| r["dst"] == "default")
        .and_then(|r| r["gateway"].as_str().map(str::to_owned));
    Some((out, gw))
}

struct Rig {
    dir: PathBuf,
    host_ns: String,
    server: String,
    port: u16,
    sock: PathBuf,
    control: Option<Child>,
    dataplane: Option<Child>,
    agent: Option<Child>,
    rt: tokio::runtime::Runtime,
    http: HttpClient,
    /// VMs created (their namespaces are removed at drop).
    vms: Vec<String>,
    owner: String,
}

impl Rig {
    fn new() -> Rig {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("fag{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("fabric-agent-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let host_ns = format!("{tag}-host");
        Netns::create(&host_ns).expect("host namespace");
        let port = free_port();
        let mut rig = Rig {
            sock: dir.join("dataplane.sock"),
            dir,
            host_ns,
            server: uuid(),
            port,
            control: None,
            dataplane: None,
            agent: None,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: HttpClient::new(([127, 0, 0, 1], port).into()),
            vms: Vec::new(),
            owner: uuid(),
        };
        sh(Command::new("ip").args(["-n", &rig.host_ns, "link", "set", "lo", "up"])).unwrap();
        rig.start_control();
        rig.start_dataplane();
        let (st, body) = rig.req(
            "PUT",
            &format!("/servers/{}", rig.server),
            Some(json!({"underlay_ip": "192.168.79.1", "hostname": "agent-test"})),
        );
        assert_eq!(st, 200, "register server: {body}");
        rig.start_agent();
        rig
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("{name}.log")))
            .unwrap()
    }

    fn spawn(&self, name: &str, cmd: &mut Command) -> Child {
        let log = self.log(name);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .env("RUST_LOG", "info")
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"))
    }

    fn start_control(&mut self) {
        let c = self.spawn(
            "control",
            Command::new(fabric_bin())
                .arg("control")
                .args(["--listen", &format!("127.0.0.1:{}", self.port)])
                .arg("--store")
                .arg(format!("sqlite:{}", self.dir.join("fabric.db").display())),
        );
        self.control = Some(c);
        // A fresh connection: the old one died with the previous instance.
        self.http = HttpClient::new(([127, 0, 0, 1], self.port).into());
        let up = wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
        assert!(up.is_some(), "control plane did not listen within 20 s");
    }

    fn stop_control(&mut self) {
        if let Some(mut c) = self.control.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn start_dataplane(&mut self) {
        let c = self.spawn(
            "dataplane",
            Command::new("ip")
                .args(["netns", "exec", &self.host_ns])
                .arg(fabric_bin())
                .args(["dataplane", "--underlay", "127.0.0.1"])
                .args(["--portolan", "127.0.0.1:9"])
                .args(["--cn-uuid", &self.server])
                .arg("--control")
                .arg(&self.sock),
        );
        self.dataplane = Some(c);
        let up = wait_until(Duration::from_secs(20), || {
            call(&self.sock, &Request::VnicLs {}).is_ok()
        });
        assert!(up.is_some(), "dataplane did not answer within 20 s");
    }

    fn kill(c: &mut Option<Child>) {
        if let Some(mut c) = c.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn start_agent(&mut self) {
        let c = self.spawn(
            "agent",
            Command::new(fabric_bin())
                .arg("agent")
                .args(["--control", &format!("http://127.0.0.1:{}", self.port)])
                .args(["--server-uuid", &self.server])
                .arg("--dataplane")
                .arg(&self.sock)
                .arg("--state-dir")
                .arg(self.dir.join("agent"))
                .args(["--heartbeat-secs", "1"]),
        );
        self.agent = Some(c);
    }

    fn agent_alive(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn req(&mut self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let r = self
            .rt
            .block_on(self.http.json(method, path, body.as_ref()))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (r.status, r.json())
    }

    fn fabric_net(&mut self, vlan: u16, subnet: &str, gw: &str) -> String {
        let o = self.owner.clone();
        let (st, b) = self.req(
            "POST",
            &format!("/fabrics/{o}/vlans"),
            Some(json!({"vlan_id": vlan})),
        );
        assert_eq!(st, 200, "{b}");
        let (st, b) = self.req(
            "POST",
            &format!("/fabrics/{o}/vlans/{vlan}/networks"),
            Some(json!({"name": format!("n{vlan}"), "subnet": subnet, "gateway": gw})),
        );
        assert_eq!(st, 200, "{b}");
        b["uuid"].as_str().unwrap().to_owned()
    }

    fn create_vm(&mut self, body: Value) -> Value {
        let mut body = body;
        let uuid = body
            .get("uuid")
            .and_then(|u| u.as_str().map(str::to_owned))
            .unwrap_or_else(uuid);
        body["uuid"] = json!(uuid);
        body["owner_uuid"] = json!(self.owner);
        body["server_uuid"] = json!(self.server);
        self.vms.push(uuid);
        let (st, b) = self.req("POST", "/vms", Some(body));
        assert_eq!(st, 200, "create VM: {b}");
        b
    }

    fn vm_state(&mut self, uuid: &str) -> (String, Option<String>) {
        let (_, b) = self.req("GET", &format!("/vms/{uuid}"), None);
        (
            b["state"].as_str().unwrap_or("").to_owned(),
            b["state_reason"].as_str().map(str::to_owned),
        )
    }

    fn vnics(&self) -> Vec<VnicInfo> {
        serde_json::from_value(call(&self.sock, &Request::VnicLs {}).unwrap()).unwrap()
    }

    /// Whether VM `vm`'s namespace has exactly its NICs (MAC, address, MTU), the primary's
    /// default route, and the dataplane has them up.
    fn in_place(&self, vm: &Value) -> bool {
        let uuid = vm["uuid"].as_str().unwrap();
        let Some((links, gw)) = ns_view(uuid) else {
            return false;
        };
        let nics = vm["nics"].as_array().unwrap();
        if links.len() != nics.len() {
            return false;
        }
        let dp = self.vnics();
        for n in nics {
            let name = n["interface"].as_str().unwrap();
            let prefix = n["netmask"]
                .as_str()
                .unwrap()
                .parse::<std::net::Ipv4Addr>()
                .map(|m| u32::from(m).leading_ones())
                .unwrap();
            let cidr = format!("{}/{prefix}", n["ip"].as_str().unwrap());
            let ok = links.iter().any(|(l, v)| {
                l == name
                    && v.mac == n["mac"].as_str().unwrap()
                    && v.cidr == cidr
                    && v.mtu == n["mtu"].as_u64().unwrap()
            });
            let dp_ok = dp.iter().any(|d| {
                d.netns == uuid
                    && d.name == name
                    && d.state == VnicState::Up
                    && u64::from(d.vni) == n["vnet_id"].as_u64().unwrap()
                    && d.ip == cidr
            });
            if !ok || !dp_ok {
                return false;
            }
            if n["primary"] == true && gw.as_deref() != n["gateway"].as_str() {
                return false;
            }
        }
        true
    }

    fn wait_in_place(&self, vm: &Value, what: &str) -> Duration {
        let t = wait_until(GOAL, || self.in_place(vm));
        let t = t.unwrap_or_else(|| {
            panic!(
                "{what}: VM {} not in place within {GOAL:?}: ns {:?}, dataplane {:?}",
                vm["uuid"],
                ns_view(vm["uuid"].as_str().unwrap()),
                self.vnics()
            )
        });
        eprintln!("{what}: in place after {t:?}");
        t
    }

    fn wait_state(&mut self, uuid: &str, want: &str) -> (String, Option<String>) {
        let mut last = (String::new(), None);
        let t = wait_until(GOAL, || {
            last = self.vm_state(uuid);
            last.0 == want
        });
        assert!(t.is_some(), "VM {uuid} state {last:?}, expected {want}");
        eprintln!("VM {uuid} {want} after {:?}", t.unwrap());
        last
    }

    fn owned(&self) -> Vec<String> {
        std::fs::read(self.dir.join("agent/owned.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| {
                v["namespaces"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    fn dump_logs(&self) {
        for name in ["control", "dataplane", "agent"] {
            let p = self.dir.join("logs").join(format!("{name}.log"));
            let s = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            eprintln!("--- {} (last 60 lines)", p.display());
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        Rig::kill(&mut self.agent);
        if let Some(mut c) = self.dataplane.take() {
            // SIGTERM lets it remove its TAPs; SIGKILL if it does not exit.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            if wait_until(Duration::from_secs(5), || {
                c.try_wait().ok().flatten().is_some()
            })
            .is_none()
            {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.stop_control();
        let mut names = self.owned();
        names.extend(self.vms.iter().cloned());
        names.sort();
        names.dedup();
        for ns in names {
            if Netns::exists(&ns) {
                if let Err(e) = Netns::delete(&ns) {
                    eprintln!("cleanup: delete netns {ns}: {e}");
                }
            }
        }
        if let Err(e) = Netns::delete(&self.host_ns) {
            eprintln!("cleanup: delete netns {}: {e}", self.host_ns);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Create → namespace, vnic (MAC, address, MTU, default route), sysctls, `running`; kill -9 of
/// the agent and a VM created meanwhile → picked up, nothing duplicated or recreated; kill -9
/// of the dataplane → vnics attached again; delete → namespace gone and forgotten.
#[test]
fn agent_converges_and_survives_restarts() {
    if !root_or_skip("agent_converges_and_survives_restarts") {
        return;
    }
    let mut rig = Rig::new();
    let net = rig.fabric_net(10, "10.10.0.0/24", "10.10.0.1");
    let net2 = rig.fabric_net(11, "10.11.0.0/24", "10.11.0.1");

    let vm1 = rig.create_vm(json!({"networks": [{"uuid": net}]}));
    let u1 = vm1["uuid"].as_str().unwrap().to_owned();
    rig.wait_in_place(&vm1, "VM created over HTTP");
    rig.wait_state(&u1, "running");
    for (key, want) in [
        ("net.ipv4.ip_unprivileged_port_start", "0"),
        ("net.ipv4.ping_group_range", "0\t2147483647"),
    ] {
        let got = sh(Command::new("ip").args(["netns", "exec", &u1, "sysctl", "-n", key])).unwrap();
        assert_eq!(got.trim(), want, "{key} in the VM's namespace");
    }
    let lo = sh(Command::new("ip").args(["-n", &u1, "-j", "link", "show", "lo"])).unwrap();
    assert!(lo.contains("\"UP\""), "loopback up: {lo}");
    assert_eq!(rig.owned(), vec![u1.clone()]);
    let before = ns_view(&u1).unwrap();

    // kill -9 the agent; a VM with two NICs is created while it is away.
    Rig::kill(&mut rig.agent);
    let vm2 = rig.create_vm(json!({"networks": [{"uuid": net2}, {"uuid": net, "primary": true}]}));
    let u2 = vm2["uuid"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !Netns::exists(&u2),
        "nothing happens while the agent is away"
    );
    rig.start_agent();
    rig.wait_in_place(&vm2, "VM created while the agent was down");
    rig.wait_state(&u2, "running");
    assert_eq!(
        ns_view(&u1).unwrap(),
        before,
        "the restarted agent left the running VM's vnic alone (same ifindex)"
    );
    let dp = rig.vnics();
    assert_eq!(dp.len(), 3, "no duplicate vnics: {dp:?}");
    let (links2, gw2) = ns_view(&u2).unwrap();
    assert_eq!(
        gw2.as_deref(),
        Some("10.10.0.1"),
        "default route via the primary NIC"
    );
    assert_eq!(
        links2.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["net0", "net1"]
    );

    // kill -9 the dataplane: its TAPs vanish; the agent attaches them again.
    Rig::kill(&mut rig.dataplane);
    rig.start_dataplane();
    let t = wait_until(GOAL, || rig.in_place(&vm1) && rig.in_place(&vm2));
    assert!(
        t.is_some(),
        "vnics not re-attached after a dataplane restart: {:?}",
        rig.vnics()
    );
    eprintln!("dataplane restarted: vnics back after {:?}", t.unwrap());
    assert_eq!(rig.vnics().len(), 3);

    // Delete: namespace gone, vnics detached, forgotten as owned.
    let (st, b) = rig.req("DELETE", &format!("/vms/{u1}"), None);
    assert_eq!(st, 204, "{b}");
    let t = wait_until(GOAL, || !Netns::exists(&u1));
    assert!(t.is_some(), "namespace of deleted VM {u1} still there");
    eprintln!("VM deleted: namespace gone after {:?}", t.unwrap());
    let t = wait_until(GOAL, || rig.vnics().iter().all(|v| v.netns != u1));
    assert!(
        t.is_some(),
        "vnic of deleted VM still listed: {:?}",
        rig.vnics()
    );
    // The agent forgets the namespace (owned.json) right after deleting it: wait for both.
    let t = wait_until(GOAL, || rig.owned() == vec![u2.clone()]);
    assert!(t.is_some(), "still owned: {:?}", rig.owned());
    assert!(rig.in_place(&vm2), "the other VM is untouched");
    assert!(rig.agent_alive());
}

/// Control plane stopped: nothing local changes and the agent keeps retrying; once it is back,
/// a VM created then appears.
#[test]
fn control_plane_outage_changes_nothing() {
    if !root_or_skip("control_plane_outage_changes_nothing") {
        return;
    }
    let mut rig = Rig::new();
    let net = rig.fabric_net(20, "10.20.0.0/24", "10.20.0.1");
    let vm1 = rig.create_vm(json!({"networks": [{"uuid": net}]}));
    let u1 = vm1["uuid"].as_str().unwrap().to_owned();
    rig.wait_in_place(&vm1, "VM before the outage");
    rig.wait_state(&u1, "running");
    let ns_before = ns_view(&u1).unwrap();
    let dp_before: Vec<_> = rig
        .vnics()
        .into_iter()
        .map(|v| (v.netns, v.name, v.mac, v.ip, v.state))
        .collect();

    rig.stop_control();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        rig.agent_alive(),
        "the agent keeps running without a control plane"
    );
    assert_eq!(
        ns_view(&u1).unwrap(),
        ns_before,
        "namespace untouched during the outage"
    );
    let dp_during: Vec<_> = rig
        .vnics()
        .into_iter()
        .map(|v| (v.netns, v.name, v.mac, v.ip, v.state))
        .collect();
    assert_eq!(
        dp_during, dp_before,
        "dataplane untouched during the outage"
    );
    let log = std::fs::read_to_string(rig.dir.join("logs/agent.log")).unwrap();
    assert!(
        log.contains("unreachable"),
        "the agent says it cannot reach the control plane"
    );

    rig.start_control();
    let vm2 = rig.create_vm(json!({"networks": [{"uuid": net}]}));
    // The agent's backoff is at most 5 s: allow that on top of the goal.
    let t = wait_until(GOAL + Duration::from_secs(5), || rig.in_place(&vm2));
    assert!(t.is_some(), "VM created after the outage did not appear");
    eprintln!(
        "VM created after the outage: in place after {:?}",
        t.unwrap()
    );
    rig.wait_state(vm2["uuid"].as_str().unwrap(), "running");
    assert_eq!(ns_view(&u1).unwrap(), ns_before);
}

/// A namespace named like a VM but not made by the agent is never touched: the VM is
/// reported failed with the reason, and the namespace stays as it was.
#[test]
fn foreign_namespace_fails_the_vm_and_is_left_alone() {
    if !root_or_skip("foreign_namespace_fails_the_vm_and_is_left_alone") {
        return;
    }
    let mut rig = Rig::new();
    let net = rig.fabric_net(30, "10.30.0.0/24", "10.30.0.1");
    let taken = uuid();
    rig.vms.push(taken.clone());
    Netns::create(&taken).expect("foreign namespace");
    sh(Command::new("ip").args([
        "-n", &taken, "link", "add", "net0", "type", "veth", "peer", "name", "vp0",
    ]))
    .unwrap();
    rig.create_vm(json!({"uuid": taken, "networks": [{"uuid": net}]}));
    let (_, reason) = rig.wait_state(&taken, "failed");
    let reason = reason.unwrap_or_default();
    assert!(reason.contains("not created by this agent"), "{reason}");
    let (links, _) = ns_view(&taken).unwrap();
    assert_eq!(
        links.len(),
        1,
        "the foreign dummy link is still there: {links:?}"
    );
    assert!(rig.vnics().is_empty());
    assert!(rig.owned().is_empty());
    // Another VM on the same host is set up regardless.
    let vm = rig.create_vm(json!({"networks": [{"uuid": net}]}));
    rig.wait_in_place(&vm, "VM beside a failed one");
}
