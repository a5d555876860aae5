//! `fabric up` clusters driven through the control plane's API as an operator (a `Fab`): start
//! a head and joining hosts with a token, create networks and VMs, and check them on the hosts
//! (namespaces, vnics, ping, TCP). Shared by tests/cluster.rs and tests/cluster_security.rs.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::cluster::{self, fabric_bin, Cluster, ProcId};
use serde_json::{json, Value};

pub const OWNER: &str = "930896af-bf8c-48d4-885c-6573a94b1853";
/// Goal for a change made through the API to show on a host (the checks allow 10x).
pub const GOAL: Duration = Duration::from_secs(1);

pub fn uuid(n: u32) -> String {
    format!("7e1f0000-0000-4000-8000-{n:012x}")
}

/// A cluster of `fabric up` hosts and the control plane's address.
pub struct Fab {
    pub c: Cluster,
    pub api: SocketAddr,
    pub ups: Vec<Option<ProcId>>,
}

impl Fab {
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.c
            .http(self.api, method, path, body.as_ref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A request that must succeed (2xx); returns the body.
    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (st, v) = self.call(method, path, body.clone());
        assert!(
            (200..300).contains(&st),
            "{method} {path} {body:?} answered {st}: {v}"
        );
        v
    }

    pub fn server_uuid(&self, host: usize) -> String {
        let f = self.c.hosts[host].dir.join("server-uuid");
        wait_until(
            &format!("h{} server-uuid", host + 1),
            Duration::from_secs(10),
            || {
                std::fs::read_to_string(&f)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| s.len() == 36)
                    .ok_or_else(|| format!("{} not written", f.display()))
            },
        )
        .0
    }

    /// `fabric ARGS --data HEAD` on the machine (the head's operator commands through its
    /// `control.sock`): its stdout; panics with what it printed on failure.
    pub fn head(&self, args: &[&str]) -> String {
        let o = std::process::Command::new(fabric_bin())
            .args(args)
            .arg("--data")
            .arg(&self.c.hosts[0].dir)
            .output()
            .expect("run fabric");
        assert!(
            o.status.success(),
            "fabric {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Starts `fabric up` on `host` with `extra` arguments.
    pub fn up(&mut self, host: usize, extra: &[&str]) -> ProcId {
        let dir = self.c.hosts[host].dir.display().to_string();
        let ip = self.c.hosts[host].ip.to_string();
        let bin = fabric_bin().display().to_string();
        let mut argv = vec![bin.as_str(), "up", "--data", &dir, "--underlay", &ip];
        argv.extend_from_slice(extra);
        let p = self.c.spawn_env(host, "up", &argv, &[("RUST_LOG", "info")]);
        if self.ups.len() <= host {
            self.ups.resize(host + 1, None);
        }
        self.ups[host] = Some(p);
        p
    }

    /// An operator certificate of the head whose data directory is `head_dir` (`fabric cert
    /// admin`), from then on used by every API call; and the cluster's join token.
    pub fn operator(&mut self, head_dir: &std::path::Path) -> String {
        let out = self.c.dir.join("operator");
        let run = |args: &[&str]| {
            let o = std::process::Command::new(fabric_bin())
                .args(args)
                .output()
                .expect("run fabric");
            assert!(
                o.status.success(),
                "fabric {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        };
        let head = head_dir.display().to_string();
        let ca = head_dir.join("pki/cluster-ca.crt");
        wait_until("the head's cluster CA", Duration::from_secs(30), || {
            ca.exists()
                .then_some(())
                .ok_or_else(|| "not yet".to_string())
        });
        run(&[
            "cert",
            "admin",
            "--data",
            &head,
            "--out",
            &out.display().to_string(),
        ]);
        self.c.tls = Some(fabric::pki::tls::client_config(&out).expect("operator credentials"));
        run(&["token", "--data", &head])
    }

    /// Waits until the server `host` registered shows `running` in `GET /servers`.
    pub fn wait_server(&self, host: usize) -> String {
        let u = self.server_uuid(host);
        let (_, t) = wait_until(
            &format!("h{} registered and heartbeating", host + 1),
            Duration::from_secs(20),
            || {
                let (st, v) = self.call("GET", &format!("/servers/{u}"), None);
                if st == 200 && v["status"] == "running" {
                    Ok(())
                } else {
                    Err(format!("{st} {v}"))
                }
            },
        );
        eprintln!("h{} server {u} running after {t:?}", host + 1);
        u
    }

    /// A fabric network of OWNER (vlan `vlan`, 10.`net`.0.0/24, gateway .1).
    pub fn network(&self, vlan: u16, net: u8) -> Value {
        let (st, v) = self.call(
            "POST",
            &format!("/fabrics/{OWNER}/vlans"),
            Some(json!({"vlan_id": vlan})),
        );
        assert!(st == 200 || v["code"] == "InUse", "{st} {v}");
        self.ok(
            "POST",
            &format!("/fabrics/{OWNER}/vlans/{vlan}/networks"),
            Some(json!({
                "name": format!("net{vlan}"),
                "subnet": format!("10.{net}.0.0/24"),
                "gateway": format!("10.{net}.0.1"),
                "provision_start_ip": format!("10.{net}.0.2"),
                "provision_end_ip": format!("10.{net}.0.250"),
            })),
        )
    }

    /// `POST /vms` of OWNER's VM `vm` on `server` with one NIC on `net` at `ip`.
    pub fn create_vm(
        &self,
        vm: &str,
        server: &str,
        net: &str,
        ip: Ipv4Addr,
        extra: Value,
    ) -> Value {
        let mut body = json!({
            "uuid": vm, "owner_uuid": OWNER, "server_uuid": server,
            "networks": [{"uuid": net, "ip": ip.to_string(), "primary": true}],
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let v = self.ok("POST", "/vms", Some(body));
        assert_eq!(v["uuid"], vm);
        assert_eq!(v["nics"][0]["interface"], "net0");
        assert_eq!(v["nics"][0]["ip"], ip.to_string());
        v
    }

    /// Waits until VM `vm` has its namespace on `host` with `net0` at `ip` (and `GET /vms`
    /// says `running`); returns the time it took.
    pub fn wait_vm(&self, host: usize, vm: &str, ip: Ipv4Addr, what: &str) -> Duration {
        let (_, t) = wait_until(what, GOAL * 10, || {
            if !self.c.host_netns_names(host).iter().any(|n| n == vm) {
                return Err(format!("no namespace {vm} on h{}", host + 1));
            }
            let a = self
                .c
                .vm_exec(host, vm, &["ip", "-4", "-o", "addr", "show", "dev", "net0"])?;
            if !a.contains(&format!("{ip}/24")) {
                return Err(format!("net0 of {vm}: {a}"));
            }
            Ok(())
        });
        let (_, ts) = wait_until(&format!("{what}: state running"), GOAL * 10, || {
            let v = self.ok("GET", &format!("/vms/{vm}"), None);
            if v["state"] == "running" {
                Ok(())
            } else {
                Err(format!("state {} ({})", v["state"], v["state_reason"]))
            }
        });
        eprintln!(
            "{what}: namespace and address after {t:?}, running after {:?} more",
            ts
        );
        t
    }

    /// Waits until VM `vm`'s namespace is gone from `host`.
    pub fn wait_vm_gone(&self, host: usize, vm: &str, what: &str) -> Duration {
        let (_, t) = wait_until(what, GOAL * 10, || {
            if self.c.host_netns_names(host).iter().any(|n| n == vm) {
                Err(format!("namespace {vm} still on h{}", host + 1))
            } else {
                Ok(())
            }
        });
        eprintln!("{what}: after {t:?}");
        t
    }

    /// The vnics host `host`'s dataplane has (`fabric vnic ls --json`).
    pub fn vnics(&self, host: usize) -> Vec<Value> {
        let sock = self.c.hosts[host].dir.join("dataplane.sock");
        let out = cluster::netns::run(
            std::process::Command::new(fabric_bin())
                .args(["vnic", "ls", "--json", "--control"])
                .arg(&sock),
        )
        .unwrap_or_else(|e| panic!("vnic ls on h{}: {e}", host + 1));
        serde_json::from_str::<Value>(&out)
            .unwrap_or_else(|e| panic!("vnic ls --json: {e}: {out}"))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn vm_ns(&self, host: usize, vm: &str) -> fabric::io::netlink::Netns {
        self.c
            .vm_netns(host, vm)
            .unwrap_or_else(|e| panic!("VM {vm} on h{}: {e}", host + 1))
    }

    /// Pings `to` from `vm` on `host` until it answers (10x the goal).
    pub fn ping(&self, host: usize, vm: &str, to: Ipv4Addr, what: &str) -> Duration {
        let t = self
            .c
            .ping_until(host, vm, to, GOAL * 10)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        eprintln!("{what}: first reply after {t:?}");
        t
    }

    /// A checked TCP transfer of 2 MiB from `from` to `to` (at `ip:port`).
    pub fn transfer(
        &self,
        from: (usize, &str),
        to: (usize, &str),
        ip: Ipv4Addr,
        port: u16,
        what: &str,
    ) {
        let t = cluster::tcp_transfer(
            &self.vm_ns(from.0, from.1),
            &self.vm_ns(to.0, to.1),
            ip,
            port,
            2 << 20,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        eprintln!("{what}: 2 MiB checked in {t:?}");
    }

    /// Whether a TCP connection from `from` to `to` at `ip:port` gets through (1 s wait).
    pub fn connects(
        &self,
        from: (usize, &str),
        to: (usize, &str),
        ip: Ipv4Addr,
        port: u16,
    ) -> bool {
        self.connects_within(from, to, ip, port, Duration::from_secs(1))
    }

    pub fn connects_within(
        &self,
        from: (usize, &str),
        to: (usize, &str),
        ip: Ipv4Addr,
        port: u16,
        wait: Duration,
    ) -> bool {
        cluster::tcp_connects(
            &self.vm_ns(from.0, from.1),
            &self.vm_ns(to.0, to.1),
            ip,
            port,
            wait,
        )
        .unwrap_or_else(|e| panic!("tcp {ip}:{port}: {e}"))
    }

    /// Waits until connecting `from` → `to` at `ip:port` gives `want`; prints the latency.
    /// Waiting for "allowed", each attempt waits 200 ms (a veth answers in well under that), so
    /// the latency printed is within ~0.2 s; waiting for "refused", each attempt waits 1 s.
    pub fn wait_tcp(
        &self,
        from: (usize, &str),
        to: (usize, &str),
        ip: Ipv4Addr,
        port: u16,
        want: bool,
        what: &str,
    ) {
        let (_, t) = wait_until(what, GOAL * 10 + Duration::from_secs(2), || {
            let wait = Duration::from_millis(if want { 200 } else { 1000 });
            if self.connects_within(from, to, ip, port, wait) == want {
                Ok(())
            } else {
                Err(format!("tcp {ip}:{port} connects = {}", !want))
            }
        });
        eprintln!("{what}: after {t:?}");
    }

    /// Pid in `DIR/run/NAME.pid` of host `host`.
    pub fn child_pid(&self, host: usize, name: &str) -> Option<u32> {
        let f = self.c.hosts[host]
            .dir
            .join("run")
            .join(format!("{name}.pid"));
        std::fs::read_to_string(f).ok()?.trim().parse().ok()
    }
}

/// Retries `f` every 50 ms until it succeeds or `within` passes (then panics with the last
/// error); returns its value and the time it took.
pub fn wait_until<T>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> (T, Duration) {
    let t0 = Instant::now();
    loop {
        match f() {
            Ok(v) => return (v, t0.elapsed()),
            Err(e) if t0.elapsed() > within => {
                panic!("{what}: not within {within:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

pub fn ipv4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A head on host 0 (`fabric up` with `head_extra`) and `joiners` hosts joining it; waits until
/// every server is registered and running.
pub fn start_up_cluster(hosts: usize, head_extra: &[&str]) -> (Fab, Vec<String>) {
    let c = Cluster::new(hosts);
    let api = SocketAddr::from((c.hosts[0].ip, 8080));
    let mut f = Fab {
        c,
        api,
        ups: Vec::new(),
    };
    let t0 = Instant::now();
    f.up(0, head_extra);
    let t =
        f.c.wait_listening(api, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("head: {e}"));
    eprintln!("head HTTP API up after {t:?}");
    let head_dir = f.c.hosts[0].dir.clone();
    let token = f.operator(&head_dir);
    let join = format!("https://{api}");
    for h in 1..hosts {
        f.up(h, &["--join", &join, "--token", &token]);
    }
    let servers: Vec<String> = (0..hosts).map(|h| f.wait_server(h)).collect();
    eprintln!("{hosts} servers running after {:?}", t0.elapsed());
    let list = f.ok("GET", "/servers", None);
    assert_eq!(list.as_array().map(Vec::len), Some(hosts), "{list}");
    (f, servers)
}
