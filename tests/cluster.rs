//! Clusters of simulated hosts (tests/util/cluster.rs) run by `fabric up`, driven through the
//! control plane's HTTP API only, checked on the hosts themselves (namespaces, vnics,
//! addresses, traffic). Every convergence check allows 10x its goal and prints what it saw.
//!
//! - `three_hosts`: `fabric up` (head, SQLite) + two `fabric up --join`: VMs appear on the right
//!   host, ping and a checked TCP transfer across hosts, the firewall follows `/rules` and tag
//!   changes, migrate, delete, kill -9 of an agent, SIGTERM and resume of a joined host.
//! - `postgres_head`: the same basic scenario with `fabric up --store postgres://…`.
//! - `control_plane_stopped`: the scale-out shape (a separate `fabric control` and `portolan`
//!   over one store on the bridge, two `fabric up --join` hosts): with the control plane stopped,
//!   traffic between existing VMs is untouched; once it is back, a new VM appears and works.

#[path = "util/cluster.rs"]
mod cluster;
#[path = "util/fab.rs"]
mod fab;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cluster::{fabric_bin, root_or_skip, Cluster};
use fab::{ipv4, start_up_cluster, uuid, wait_until, Fab, GOAL, OWNER};
use serde_json::json;

#[test]
fn three_hosts() {
    if !root_or_skip("three_hosts") {
        return;
    }
    let (f, s) = start_up_cluster(3, &[]);
    let t_all = Instant::now();
    let net = f.network(10, 77);
    let net = net["uuid"].as_str().unwrap().to_string();
    let (a, b, cc, d) = (uuid(0xa), uuid(0xb), uuid(0xc), uuid(0xd));
    let (ip_a, ip_b, ip_c, ip_d) = (
        ipv4("10.77.0.10"),
        ipv4("10.77.0.11"),
        ipv4("10.77.0.12"),
        ipv4("10.77.0.13"),
    );

    // VMs on two servers: namespace, vnic and address on the right host only.
    f.create_vm(&a, &s[1], &net, ip_a, json!({"alias": "a"}));
    f.create_vm(&b, &s[2], &net, ip_b, json!({"alias": "b"}));
    f.wait_vm(1, &a, ip_a, "VM a on h2");
    f.wait_vm(2, &b, ip_b, "VM b on h3");
    assert!(!f.c.host_netns_names(0).contains(&a) && !f.c.host_netns_names(2).contains(&a));
    let v = f.vnics(1);
    assert!(
        v.iter()
            .any(|x| x["netns"] == a.as_str() && x["name"] == "net0" && x["ip"] == "10.77.0.10/24"),
        "h2's dataplane vnics: {v:?}"
    );
    let route =
        f.c.vm_exec(1, &a, &["ip", "-4", "route", "show", "default"])
            .unwrap();
    assert!(
        route.contains("via 10.77.0.1"),
        "default route of a: {route}"
    );

    // Traffic across hosts.
    f.ping(1, &a, ip_b, "ping a (h2) -> b (h3)");
    f.transfer((1, &a), (2, &b), ip_b, 5001, "TCP a -> b");

    // Firewall: enabled VMs refuse inbound TCP until a rule allows it.
    f.create_vm(
        &cc,
        &s[1],
        &net,
        ip_c,
        json!({"alias": "c", "firewall_enabled": true, "tags": {"role": "web"}}),
    );
    f.create_vm(
        &d,
        &s[2],
        &net,
        ip_d,
        json!({"alias": "d", "firewall_enabled": true, "tags": {"role": "db"}}),
    );
    f.wait_vm(1, &cc, ip_c, "VM c (firewall) on h2");
    f.wait_vm(2, &d, ip_d, "VM d (firewall) on h3");
    // Outbound from a firewalled VM is allowed; inbound is not.
    f.wait_tcp(
        (1, &cc),
        (2, &b),
        ip_b,
        7000,
        true,
        "c (firewall) -> b: outbound allowed",
    );
    assert!(
        !f.connects((1, &a), (2, &d), ip_d, 8080),
        "d accepts TCP 8080 before any rule"
    );
    assert!(
        !f.connects((1, &cc), (2, &d), ip_d, 5432),
        "d accepts TCP 5432 before any rule"
    );
    f.ok(
        "POST",
        "/rules",
        Some(
            json!({"rule": format!("FROM any TO vm {d} ALLOW tcp PORT 8080"),
                    "owner_uuid": OWNER, "enabled": true}),
        ),
    );
    f.wait_tcp(
        (1, &a),
        (2, &d),
        ip_d,
        8080,
        true,
        "rule on /rules -> d accepts 8080",
    );
    assert!(
        !f.connects((1, &a), (2, &d), ip_d, 5432),
        "8080 rule opened 5432"
    );

    // A rule by tag follows tag changes.
    f.ok(
        "POST",
        "/rules",
        Some(
            json!({"rule": "FROM tag role=web TO tag role=db ALLOW tcp PORT 5432",
                    "owner_uuid": OWNER, "enabled": true}),
        ),
    );
    f.wait_tcp(
        (1, &cc),
        (2, &d),
        ip_d,
        5432,
        true,
        "tag rule: web c -> db d:5432",
    );
    assert!(
        !f.connects((1, &a), (2, &d), ip_d, 5432),
        "untagged a reaches d:5432"
    );
    f.ok(
        "POST",
        &format!("/vms/{a}?action=update"),
        Some(json!({"tags": {"role": "web"}})),
    );
    f.wait_tcp(
        (1, &a),
        (2, &d),
        ip_d,
        5432,
        true,
        "a tagged web -> d:5432 allowed",
    );
    f.ok(
        "POST",
        &format!("/vms/{cc}?action=update"),
        Some(json!({"tags": {"role": "cache"}})),
    );
    f.wait_tcp(
        (1, &cc),
        (2, &d),
        ip_d,
        5432,
        false,
        "c tagged cache -> d:5432 refused",
    );

    // Migrate a from h2 to h1: the namespace moves, traffic resumes.
    let t0 = Instant::now();
    let v = f.ok(
        "POST",
        &format!("/vms/{a}?action=migrate"),
        Some(json!({"server_uuid": s[0]})),
    );
    assert_eq!(v["server_uuid"], s[0].as_str());
    f.wait_vm_gone(1, &a, "migrate: a's namespace gone from h2");
    f.wait_vm(0, &a, ip_a, "migrate: a on h1");
    f.ping(0, &a, ip_b, "after migrate: ping a (h1) -> b (h3)");
    f.ping(2, &b, ip_a, "after migrate: ping b (h3) -> a (h1)");
    eprintln!("migrate to traffic: {:?}", t0.elapsed());
    f.transfer((2, &b), (0, &a), ip_a, 5002, "after migrate: TCP b -> a");

    // kill -9 of h3's agent: fabric up restarts it; a VM created meanwhile is not lost, and
    // nothing is duplicated.
    let before_ns = f.c.host_netns_names(2);
    let before_vnics = f.vnics(2).len();
    let old = f.child_pid(2, "agent").expect("h3 agent pid");
    cluster::netns::run(std::process::Command::new("kill").args(["-9", &old.to_string()])).unwrap();
    let e = uuid(0xe);
    let ip_e = ipv4("10.77.0.14");
    f.create_vm(&e, &s[2], &net, ip_e, json!({"alias": "e"}));
    let (_, t) = wait_until("h3 agent restarted", Duration::from_secs(15), || {
        match f.child_pid(2, "agent") {
            Some(p) if p != old => Ok(()),
            p => Err(format!("agent pid {p:?}")),
        }
    });
    eprintln!("agent restarted by fabric up after {t:?}");
    f.wait_vm(2, &e, ip_e, "VM e created while h3's agent was dead");
    let mut want_ns = before_ns.clone();
    want_ns.push(e.clone());
    want_ns.sort();
    // Give a duplicating agent a chance to show it.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        f.c.host_netns_names(2),
        want_ns,
        "h3's namespaces after the restart"
    );
    let vn = f.vnics(2);
    assert_eq!(
        vn.len(),
        before_vnics + 1,
        "h3's vnics after the restart: {vn:?}"
    );
    for x in &vn {
        assert_eq!(x["state"], "up", "{x}");
    }
    f.ping(2, &e, ip_b, "e -> b (same host)");
    f.ping(2, &e, ip_a, "e (h3) -> a (h1)");
    f.wait_tcp(
        (0, &a),
        (2, &d),
        ip_d,
        8080,
        true,
        "after agent restart: a -> d:8080 still allowed",
    );

    // Delete: namespace and vnic go.
    f.ok("DELETE", &format!("/vms/{b}"), None);
    f.wait_vm_gone(2, &b, "delete: b's namespace gone from h3");
    let (_, t) = wait_until("delete: b's vnic gone", GOAL * 10, || {
        let v = f.vnics(2);
        if v.iter().any(|x| x["netns"] == b.as_str()) {
            Err(format!("{v:?}"))
        } else {
            Ok(())
        }
    });
    eprintln!("delete: vnic gone after {t:?}");
    let (st, v) = f.call("GET", &format!("/vms/{b}"), None);
    assert_eq!((st, v["state"].as_str()), (200, Some("destroyed")), "{v}");
    let (st, _) = f.call("DELETE", &format!("/vms/{b}"), None);
    assert_eq!(st, 404);

    // SIGTERM of a joined host stops it cleanly (exit 0); it resumes as the same server with
    // the same VMs on the same DIR.
    let mut f = f;
    let p = f.ups[2].unwrap();
    let t0 = Instant::now();
    let st =
        f.c.stop(p, Duration::from_secs(15))
            .expect("fabric up exit");
    assert!(
        st.success(),
        "fabric up on h3 exited with {st} after SIGTERM"
    );
    eprintln!("fabric up on h3 stopped in {:?}", t0.elapsed());
    assert!(f.child_pid(2, "agent").is_none(), "agent pid file left");
    let join = format!("https://{}", f.api);
    f.up(2, &["--join", &join]);
    assert_eq!(f.wait_server(2), s[2], "h3 resumed with another UUID");
    f.wait_vm(2, &e, ip_e, "h3 resumed: e back");
    f.ping(2, &e, ip_a, "h3 resumed: e -> a");
    let servers = f.ok("GET", "/servers", None);
    assert_eq!(servers.as_array().unwrap().len(), 3, "{servers}");
    eprintln!("three_hosts checks took {:?}", t_all.elapsed());
    cluster::teardown(f.c);
}

/// `fabric up --store postgres://…` (a fresh database; the head's host reaches the machine's
/// PostgreSQL through a forwarder on its own loopback) and a joined host: VMs on both, traffic.
#[test]
fn postgres_head() {
    if !root_or_skip("postgres_head") {
        return;
    }
    let Some(admin) = portolan::store::postgres::test_admin_url() else {
        eprintln!("skipping postgres_head: PORTOLAN_TEST_PG is not set");
        return;
    };
    let db = portolan::store::postgres::TestDatabase::create(&admin).unwrap();
    let pg = pg_addr(&db.url);
    let c = Cluster::new(2);
    let _fwd = c.forward(0, pg, pg);
    let api = SocketAddr::from((c.hosts[0].ip, 8080));
    let mut f = Fab {
        c,
        api,
        ups: Vec::new(),
    };
    f.up(0, &["--store", &db.url]);
    f.c.wait_listening(api, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("head over PostgreSQL: {e}"));
    let head_dir = f.c.hosts[0].dir.clone();
    let token = f.operator(&head_dir);
    f.up(1, &["--join", &format!("https://{api}"), "--token", &token]);
    let s: Vec<String> = (0..2).map(|h| f.wait_server(h)).collect();
    let net = f.network(20, 88);
    let net = net["uuid"].as_str().unwrap().to_string();
    let (a, b) = (uuid(0x1a), uuid(0x1b));
    let (ip_a, ip_b) = (ipv4("10.88.0.10"), ipv4("10.88.0.11"));
    f.create_vm(&a, &s[0], &net, ip_a, json!({}));
    f.create_vm(&b, &s[1], &net, ip_b, json!({}));
    f.wait_vm(0, &a, ip_a, "PG: VM a on h1");
    f.wait_vm(1, &b, ip_b, "PG: VM b on h2");
    f.ping(0, &a, ip_b, "PG: ping a (h1) -> b (h2)");
    f.transfer((1, &b), (0, &a), ip_a, 5003, "PG: TCP b -> a");
    f.ok("DELETE", &format!("/vms/{a}"), None);
    f.wait_vm_gone(0, &a, "PG: delete a");
    cluster::teardown(f.c);
    drop(db);
}

/// `host:port` of a postgres URL.
fn pg_addr(url: &str) -> SocketAddr {
    let rest = url.split_once('@').map(|x| x.1).unwrap_or(url);
    let hostport = rest.split('/').next().unwrap();
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5432")
    };
    use std::net::ToSocketAddrs;
    hostport
        .to_socket_addrs()
        .unwrap()
        .find(SocketAddr::is_ipv4)
        .expect("an IPv4 address for PostgreSQL")
}

#[test]
fn control_plane_stopped() {
    if !root_or_skip("control_plane_stopped") {
        return;
    }
    let mut c = Cluster::new(2);
    let bridge = cluster::BRIDGE_IP;
    let api = SocketAddr::from((bridge, 8080));
    let store = format!("sqlite:{}", c.dir.join("control.db").display());
    let (bin, pbin) = (fabric_bin(), cluster::netns::portolan_bin());
    let (bin, pbin) = (bin.display().to_string(), pbin.display().to_string());
    let (listen, svp) = (api.to_string(), format!("{bridge}:1296"));
    let ctl_dir = c.dir.join("control");
    let ctl = ctl_dir.display().to_string();
    let control_argv = [
        bin.as_str(),
        "control",
        "--data",
        &ctl,
        "--listen",
        &listen,
        "--store",
        &store,
        "--portolan-advertise",
        &svp,
    ];
    // The control plane and Portolan as separate processes on the bridge, over one store.
    let mut control = c.spawn_bridge("control", &control_argv, &[("RUST_LOG", "info")]);
    c.spawn_bridge(
        "portolan",
        &[&pbin, "serve", "--listen", &svp, "--store", &store],
        &[],
    );
    c.wait_listening(api, Duration::from_secs(30))
        .expect("fabric control listening");
    let mut f = Fab {
        c,
        api,
        ups: Vec::new(),
    };
    let token = f.operator(&ctl_dir);
    let join = format!("https://{api}");
    f.up(0, &["--join", &join, "--token", &token]);
    f.up(1, &["--join", &join, "--token", &token]);
    let s: Vec<String> = (0..2).map(|h| f.wait_server(h)).collect();
    let net = f.network(30, 99);
    let net = net["uuid"].as_str().unwrap().to_string();
    let (a, b, n) = (uuid(0x2a), uuid(0x2b), uuid(0x2c));
    let (ip_a, ip_b, ip_n) = (ipv4("10.99.0.10"), ipv4("10.99.0.11"), ipv4("10.99.0.12"));
    f.create_vm(&a, &s[0], &net, ip_a, json!({}));
    f.create_vm(&b, &s[1], &net, ip_b, json!({}));
    f.wait_vm(0, &a, ip_a, "VM a on h1");
    f.wait_vm(1, &b, ip_b, "VM b on h2");
    f.ping(0, &a, ip_b, "ping a -> b");

    // Stop the control plane: existing VMs keep working, for longer than the agents' backoff
    // and local re-checks (~2 s).
    let t0 = Instant::now();
    let st = f.c.stop(control, Duration::from_secs(10));
    eprintln!("fabric control stopped ({st:?}) in {:?}", t0.elapsed());
    assert!(
        f.c.http(f.api, "GET", "/servers", None).is_err(),
        "the control plane still answers"
    );
    for round in 0..3 {
        std::thread::sleep(Duration::from_secs(2));
        f.c.ping_once(0, &a, ip_b)
            .unwrap_or_else(|e| panic!("control plane down, round {round}: ping a -> b: {e}"));
        assert!(
            f.c.host_netns_names(0).contains(&a),
            "a's namespace removed"
        );
        assert!(
            f.c.host_netns_names(1).contains(&b),
            "b's namespace removed"
        );
    }
    f.transfer(
        (0, &a),
        (1, &b),
        ip_b,
        5004,
        "control plane down: TCP a -> b",
    );
    assert_eq!(
        f.vnics(0).len(),
        1,
        "h1's vnics changed while the control plane was down"
    );

    // Back: a new VM appears and works.
    let t0 = Instant::now();
    control =
        f.c.spawn_bridge("control", &control_argv, &[("RUST_LOG", "info")]);
    f.c.wait_listening(api, Duration::from_secs(30))
        .expect("fabric control back");
    f.create_vm(&n, &s[1], &net, ip_n, json!({}));
    f.wait_vm(1, &n, ip_n, "control plane back: new VM n on h2");
    f.ping(1, &n, ip_a, "control plane back: n (h2) -> a (h1)");
    eprintln!("control plane back to new VM pinging: {:?}", t0.elapsed());
    assert!(f.c.alive(control));
    cluster::teardown(f.c);
}

/// `fabric up` alone on one host: the HTTP API and Portolan listen, the server registers and
/// its dataplane and agent run; SIGTERM stops children and servers and exits 0; a second run
/// on the same DIR is the same server.
#[test]
fn up_head_lifecycle() {
    if !root_or_skip("up_head_lifecycle") {
        return;
    }
    let c = Cluster::new(1);
    let api = SocketAddr::from((c.hosts[0].ip, 8080));
    let svp = SocketAddr::from((c.hosts[0].ip, 1296));
    let mut f = Fab {
        c,
        api,
        ups: Vec::new(),
    };
    let mut uuids = Vec::new();
    for run in 0..2 {
        let p = f.up(0, &[]);
        f.c.wait_listening(api, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("run {run}: {e}"));
        if run == 0 {
            let head_dir = f.c.hosts[0].dir.clone();
            f.operator(&head_dir);
        }
        f.c.wait_listening(svp, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("run {run}: Portolan: {e}"));
        let u = f.wait_server(0);
        let v = f.ok("GET", &format!("/servers/{u}"), None);
        assert_eq!(v["underlay_ip"], "192.168.78.1", "{v}");
        let desired = f.ok("GET", &format!("/servers/{u}/desired"), None);
        assert_eq!(desired["portolan"], "192.168.78.1:1296", "{desired}");
        let (_, t) = wait_until(
            "dataplane and agent running",
            Duration::from_secs(10),
            || match (f.child_pid(0, "dataplane"), f.child_pid(0, "agent")) {
                (Some(d), Some(a)) => Ok((d, a)),
                x => Err(format!("pids {x:?}")),
            },
        );
        let (dp, agent) = (
            f.child_pid(0, "dataplane").unwrap(),
            f.child_pid(0, "agent").unwrap(),
        );
        eprintln!("run {run}: children up after {t:?}");
        uuids.push(u);
        let t0 = Instant::now();
        let st = f.c.stop(p, Duration::from_secs(15)).expect("exit status");
        assert!(st.success(), "run {run}: fabric up exited {st} on SIGTERM");
        eprintln!("run {run}: SIGTERM to exit in {:?}", t0.elapsed());
        assert!(
            cluster::gone(dp) && cluster::gone(agent),
            "children survived fabric up"
        );
        assert!(
            f.c.http(api, "GET", "/ping", None).is_err(),
            "HTTP still served"
        );
    }
    assert_eq!(
        uuids[0], uuids[1],
        "a second run on the same DIR changed the server UUID"
    );
    cluster::teardown(f.c);
}

#[test]
fn up_needs_root() {
    use std::os::unix::process::CommandExt;
    let dir = std::env::temp_dir().join(format!("fabric-up-nonroot-{}", std::process::id()));
    let mut cmd = std::process::Command::new(fabric_bin());
    cmd.args(["up", "--data"])
        .arg(&dir)
        .args(["--underlay", "127.0.0.1"]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().expect("run fabric up");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "fabric up: needs root (creates network namespaces and TAP devices); run it as root"
    );
    assert!(
        !dir.exists(),
        "fabric up made {} before its root check",
        dir.display()
    );
}
