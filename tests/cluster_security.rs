//! Cluster security on simulated hosts (tests/util/cluster.rs) run by `fabric up`: who may
//! join, who may call the control API (checked with the stock `curl`, a real TLS client), what
//! a removed host loses, certificate renewal, and Portolan's members-only answers. Every
//! convergence check allows 10x its goal (revocation < 1 s) and prints what it saw.

#[path = "util/cluster.rs"]
mod cluster;
#[path = "util/fab.rs"]
mod fab;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use cluster::{fabric_bin, root_or_skip, Cluster};
use fab::{ipv4, start_up_cluster, uuid, wait_until, Fab};
use serde_json::{json, Value};

/// Goal for a revocation to take effect everywhere (the checks allow 10x).
const REVOKE_GOAL: Duration = Duration::from_secs(1);

/// `curl` from host `host`'s namespace: `Ok(HTTP status)` or `Err(curl's complaint)` (a
/// refused TLS handshake).
fn curl(
    f: &Fab,
    host: usize,
    method: &str,
    path: &str,
    ca: &Path,
    cert: Option<&Path>,
) -> Result<u16, String> {
    let url = format!("https://{}{path}", f.api);
    let ca = ca.display().to_string();
    let mut argv = vec![
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
        "--cacert",
        &ca,
        "-X",
        method,
    ];
    let (c, k);
    if let Some(dir) = cert {
        c = dir.join("cert.pem").display().to_string();
        k = dir.join("key.pem").display().to_string();
        argv.extend(["--cert", &c, "--key", &k]);
    }
    if method != "GET" {
        argv.extend(["-H", "content-type: application/json", "-d", "{}"]);
    }
    argv.push(&url);
    let out = f.c.exec(host, &argv)?;
    out.trim()
        .parse()
        .map_err(|_| format!("curl printed {out:?}"))
}

/// Runs `fabric ARGS` to completion: (success, stdout, stderr).
fn fabric(args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(fabric_bin())
        .args(args)
        .output()
        .expect("run fabric");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).trim().to_string(),
        String::from_utf8_lossy(&o.stderr).trim().to_string(),
    )
}

/// Starts `fabric up --join` on `host` with `extra` and waits for it to exit; its stderr's
/// last line.
fn failed_join(f: &mut Fab, host: usize, extra: &[&str]) -> String {
    let p = f.up(host, extra);
    let st =
        f.c.wait_exit(p, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("fabric up {extra:?} on h{} did not exit", host + 1));
    assert!(!st.success(), "fabric up {extra:?} succeeded");
    let log = std::fs::read_to_string(f.c.log_of(p)).unwrap_or_default();
    log.lines()
        .rev()
        .find(|l| l.starts_with("fabric up:"))
        .unwrap_or_else(|| panic!("no one-line error in {log}"))
        .to_string()
}

fn server_uuids(f: &Fab) -> Vec<String> {
    let v = f.ok("GET", "/servers", None);
    let mut u: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["uuid"].as_str().unwrap().to_string())
        .collect();
    u.sort();
    u
}

/// A `not_member` drop count of host `host`'s dataplane.
fn not_member(f: &Fab, host: usize) -> u64 {
    let sock = f.c.hosts[host].dir.join("dataplane.sock");
    let out = cluster::netns::run(
        std::process::Command::new(fabric_bin())
            .args(["stats", "--json", "--control"])
            .arg(&sock),
    )
    .unwrap_or_else(|e| panic!("fabric stats on h{}: {e}", host + 1));
    let v: Value = serde_json::from_str(&out).unwrap();
    v["global"]["drops"]["not_member"].as_u64().unwrap_or(0)
}

/// Joining: without a token, with a wrong secret, against an impostor head, with a rotated
/// token: refused with one line and nothing registered; a correct join works. The API: no
/// certificate, a host certificate on an operator route, a foreign CA's certificate refused;
/// the operator's works.
#[test]
fn joining_and_calling_the_api() {
    if !root_or_skip("joining_and_calling_the_api") {
        return;
    }
    let c = Cluster::new(3);
    let api = SocketAddr::from((c.hosts[0].ip, 8080));
    let mut f = Fab {
        c,
        api,
        ups: Vec::new(),
    };
    f.up(0, &[]);
    f.c.wait_listening(api, Duration::from_secs(30)).unwrap();
    let head = f.c.hosts[0].dir.clone();
    let token = f.operator(&head);
    let head_uuid = f.wait_server(0);
    let join = format!("https://{api}");

    // `fabric up` serves the Docker API on the --listen IP, port 2376: the stock CLI with a
    // certificate from `fabric account add` reaches it from another host's namespace.
    let certs = f.c.dir.join("alice");
    let (ok, out, err) = fabric(&[
        "account",
        "add",
        "alice",
        "--data",
        &head.display().to_string(),
        "--cert-dir",
        &certs.display().to_string(),
    ]);
    assert!(ok, "fabric account add: {out}{err}");
    let docker_host = format!("DOCKER_HOST=tcp://{}:2376", f.c.hosts[0].ip);
    assert!(
        out.contains(&docker_host.replace("DOCKER_HOST=", "export DOCKER_HOST=")),
        "{out}"
    );
    // The stock CLI on host 2, against the head.
    let docker = |args: &[&str]| -> String {
        let cert_path = format!("DOCKER_CERT_PATH={}", certs.display());
        let config = format!("DOCKER_CONFIG={}", f.c.dir.join("docker-config").display());
        let mut argv = vec![
            "env",
            &docker_host,
            "DOCKER_TLS_VERIFY=1",
            &cert_path,
            &config,
            "/usr/local/bin/docker",
        ];
        argv.extend_from_slice(args);
        f.c.exec(1, &argv)
            .unwrap_or_else(|e| panic!("docker {args:?} against fabric up: {e}"))
    };
    let v = docker(&["version", "--format", "{{.Server.APIVersion}}"]);
    assert_eq!(v.trim(), "1.41");
    // The "host" is the cluster: /info sums the CPUs and memory the live servers registered.
    let info = docker(&[
        "info",
        "--format",
        "{{.NCPU}} {{.MemTotal}} {{.Swarm.LocalNodeState}}",
    ]);
    let f3: Vec<&str> = info.split_whitespace().collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(f3.len(), 3, "{info}");
    assert_eq!(
        f3[0],
        cpus.to_string(),
        "one live server (the head): {info}"
    );
    assert!(f3[1].parse::<u64>().unwrap_or(0) > 1 << 20, "{info}");
    assert_eq!(f3[2], "inactive");

    // No token.
    let e = failed_join(&mut f, 1, &["--join", &join]);
    eprintln!("no token: {e}");
    assert!(e.contains("needs --token"), "{e}");
    // A wrong secret (the right CA digest).
    let wrong = format!("{}{}", &token[..token.len() - 4], "0000");
    let wrong = if wrong == token {
        format!("{}{}", &token[..token.len() - 4], "1111")
    } else {
        wrong
    };
    let e = failed_join(&mut f, 1, &["--join", &join, "--token", &wrong]);
    eprintln!("wrong secret: {e}");
    assert!(e.contains("secret is wrong"), "{e}");
    assert_eq!(
        server_uuids(&f),
        vec![head_uuid.clone()],
        "nothing registered"
    );
    assert!(
        !f.c.hosts[1].dir.join("tls/cert.pem").exists(),
        "a refused host kept a certificate"
    );

    // An impostor: h3 runs a head of its own; h2 is pointed at it with h1's token.
    f.up(2, &[]);
    let fake = SocketAddr::from((f.c.hosts[2].ip, 8080));
    f.c.wait_listening(fake, Duration::from_secs(30)).unwrap();
    let fake_dir = f.c.hosts[2].dir.clone();
    wait_until("the impostor's CA", Duration::from_secs(30), || {
        fake_dir
            .join("pki/cluster-ca.crt")
            .exists()
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    let e = failed_join(
        &mut f,
        1,
        &["--join", &format!("https://{fake}"), "--token", &token],
    );
    eprintln!("impostor head: {e}");
    assert!(e.contains("not from the CA the token names"), "{e}");
    // Nothing reached the impostor: its socket lists only itself.
    let (ok, out, err) = fabric(&[
        "server",
        "ls",
        "--json",
        "--data",
        &fake_dir.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(server_uuids(&f), vec![head_uuid.clone()]);

    // The right join.
    f.up(1, &["--join", &join, "--token", &token]);
    let h2 = f.wait_server(1);

    // The API from h2 with curl.
    let h2_tls = f.c.hosts[1].dir.join("tls");
    let ca = h2_tls.join("ca.pem");
    let op = f.c.dir.join("operator");
    let st = curl(&f, 1, "GET", "/vms", &ca, None).unwrap();
    assert_eq!(st, 401, "no certificate");
    let st = curl(&f, 1, "POST", "/vms", &ca, Some(&h2_tls)).unwrap();
    assert_eq!(st, 403, "a host certificate on an operator route");
    let st = curl(
        &f,
        1,
        "GET",
        &format!("/servers/{head_uuid}/desired"),
        &ca,
        Some(&h2_tls),
    )
    .unwrap();
    assert_eq!(st, 403, "a host reading another server's desired state");
    let st = curl(
        &f,
        1,
        "GET",
        &format!("/servers/{h2}/desired"),
        &ca,
        Some(&h2_tls),
    )
    .unwrap();
    assert_eq!(st, 200, "a host reading its own desired state");
    // A certificate of another CA (the impostor's operator): the handshake fails.
    let foreign = f.c.dir.join("foreign-operator");
    let (ok, _, err) = fabric(&[
        "cert",
        "admin",
        "--data",
        &fake_dir.display().to_string(),
        "--out",
        &foreign.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let e = curl(&f, 1, "GET", "/vms", &ca, Some(&foreign)).unwrap_err();
    eprintln!("foreign CA: {e}");
    let st = curl(&f, 1, "GET", "/vms", &ca, Some(&op)).unwrap();
    assert_eq!(st, 200, "the operator");

    // A second operator certificate, revoked by serial: refused from then on.
    let bob = f.c.dir.join("bob");
    let head_s = head.display().to_string();
    let (ok, out, err) = fabric(&[
        "cert",
        "admin",
        "--data",
        &head_s,
        "--name",
        "bob",
        "--out",
        &bob.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let serial = out
        .split("(serial ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no serial in {out:?}"))
        .to_string();
    assert_eq!(curl(&f, 1, "GET", "/vms", &ca, Some(&bob)), Ok(200));
    let (ok, out, err) = fabric(&["cert", "revoke", &serial, "--data", &head_s]);
    assert!(ok, "{err}");
    eprintln!("{out}");
    let (e, t) = wait_until(
        "bob's certificate refused",
        Duration::from_secs(10),
        || match curl(&f, 1, "GET", "/vms", &ca, Some(&bob)) {
            Err(e) => Ok(e),
            Ok(st) => Err(format!("answered {st}")),
        },
    );
    eprintln!("revoked operator certificate refused after {t:?}: {e}");
    let (_, ls, _) = fabric(&["cert", "ls", "--data", &head_s]);
    assert!(
        ls.lines()
            .any(|l| l.contains(&serial) && l.ends_with("revoked")),
        "{ls}"
    );
    assert_eq!(
        curl(&f, 1, "GET", "/vms", &ca, Some(&op)),
        Ok(200),
        "admin unaffected"
    );

    // Rotation: the old token stops working for a new host; joined hosts are unaffected.
    let h3_up = f.ups[2].unwrap();
    f.c.stop(h3_up, Duration::from_secs(15));
    std::fs::remove_dir_all(&fake_dir).unwrap();
    std::fs::create_dir_all(fake_dir.join("logs")).unwrap();
    let (ok, new_token, err) =
        fabric(&["token", "--data", &head.display().to_string(), "--rotate"]);
    assert!(ok && new_token != token, "{err}");
    let e = failed_join(&mut f, 2, &["--join", &join, "--token", &token]);
    eprintln!("rotated token: {e}");
    assert!(e.contains("secret is wrong or was rotated"), "{e}");
    f.up(2, &["--join", &join, "--token", &new_token]);
    f.wait_server(2);
    let st = curl(
        &f,
        1,
        "GET",
        &format!("/servers/{h2}/desired"),
        &ca,
        Some(&h2_tls),
    )
    .unwrap();
    assert_eq!(st, 200, "h2 still works after the rotation");
    cluster::teardown(f.c);
}

/// `fabric server remove`: the host's API requests, its open long-poll, its SVP and its VXLAN
/// are refused; the other hosts' traffic is untouched. Plain SVP from a non-member address
/// gets no mapping; a host asking for another host's log gets nothing.
#[test]
fn removing_a_host() {
    if !root_or_skip("removing_a_host") {
        return;
    }
    let (f, s) = start_up_cluster(3, &[]);
    let net = f.network(40, 77);
    let net = net["uuid"].as_str().unwrap().to_string();
    let (a, b, c) = (uuid(0x3a), uuid(0x3b), uuid(0x3c));
    let (ip_a, ip_b, ip_c) = (ipv4("10.77.0.10"), ipv4("10.77.0.11"), ipv4("10.77.0.12"));
    f.create_vm(&a, &s[0], &net, ip_a, json!({}));
    f.create_vm(&b, &s[1], &net, ip_b, json!({}));
    f.create_vm(&c, &s[2], &net, ip_c, json!({}));
    f.wait_vm(0, &a, ip_a, "a on h1");
    f.wait_vm(1, &b, ip_b, "b on h2");
    f.wait_vm(2, &c, ip_c, "c on h3");
    f.ping(0, &a, ip_b, "a -> b");
    f.ping(2, &c, ip_a, "c -> a");

    // Plain SVP from the bridge (not a member): no mapping. From h2 (a member): answered.
    let pbin = cluster::netns::portolan_bin().display().to_string();
    let vni = f.ok("GET", &format!("/networks/{net}"), None)["vnet_id"]
        .as_u64()
        .unwrap()
        .to_string();
    let svp = format!("{}:1296", f.c.hosts[0].ip);
    let lookup = [
        "vl3",
        "--server",
        &svp,
        "--ip",
        "10.77.0.10",
        "--vnet",
        &vni,
    ];
    let mut argv = vec![pbin.as_str()];
    argv.extend(lookup);
    let member = f.c.exec(1, &argv).expect("a member's plain SVP lookup");
    assert!(
        member.contains("10.77.0.10") && !member.contains("not found"),
        "a member's lookup found no mapping: {member}"
    );
    let stranger = cluster::netns::run(
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", f.c.bridge_ns))
            .args(&argv),
    );
    eprintln!("plain SVP from a non-member: {stranger:?}");
    assert!(
        stranger.is_err(),
        "a non-member got an answer: {stranger:?}"
    );

    // A host asking for another host's shootdown log over SVP-TLS gets nothing.
    let h2_tls = f.c.hosts[1].dir.join("tls");
    let (own, other) = (f.c.hosts[1].ip, f.c.hosts[0].ip);
    let svp_tls: SocketAddr = format!("{}:1297", f.c.hosts[0].ip).parse().unwrap();
    let logs =
        f.c.host_netns(1)
            .run(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut cc = portolan::client::ClientConfig::new(svp_tls);
                    cc.connector = Some(std::sync::Arc::new(
                        fabric::pki::svp::SvpTlsConnector::from_dir(h2_tls.clone()),
                    ));
                    let client = portolan::client::Client::new(cc);
                    let mine = client.log(own.into(), 16).await.map(|r| r.len());
                    let theirs = client.log(other.into(), 16).await.map(|r| r.len());
                    (mine, theirs)
                })
            })
            .unwrap();
    eprintln!(
        "SVP-TLS log requests: own {:?}, another host's {:?}",
        logs.0, logs.1
    );
    assert!(logs.0.is_ok(), "own log refused: {:?}", logs.0);
    assert!(logs.1.is_err(), "another host's log answered: {:?}", logs.1);

    // h3 holds a long-poll open with its certificate.
    let h3_tls = f.c.hosts[2].dir.join("tls");
    let (cert, key, ca) = (
        h3_tls.join("cert.pem").display().to_string(),
        h3_tls.join("key.pem").display().to_string(),
        h3_tls.join("ca.pem").display().to_string(),
    );
    // The feed's end (a cluster this small has far fewer than 1000 changes), so the poll waits.
    let since = f.ok("GET", "/changes?since=0&limit=1000", None)["next"]
        .as_u64()
        .expect("the feed's next");
    let poll = format!(
        "https://{}/changes?since={since}&server_uuid={}&timeout=50",
        f.api, s[2]
    );
    let mut f = f;
    let poller = f.c.spawn(
        2,
        "longpoll",
        &[
            "curl",
            "-sS",
            "--max-time",
            "55",
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            &poll,
        ],
    );
    // c pings a every 50 ms throughout, so h1's drop counter shows when h3's VXLAN stops
    // counting as a member's.
    let ip_a_s = ip_a.to_string();
    let pinger = f.c.spawn(
        2,
        "pinger",
        &[
            "ip", "netns", "exec", &c, "ping", "-q", "-i", "0.05", "-c", "600", &ip_a_s,
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(f.c.alive(poller), "the long-poll ended early");
    let before = not_member(&f, 0);
    assert_eq!(
        before, 0,
        "h1 dropped VXLAN as not a member's before the remove"
    );

    // Remove h3 (on the head, through its operator socket).
    let head = f.c.hosts[0].dir.display().to_string();
    let t0 = Instant::now();
    let (ok, out, err) = fabric(&["server", "remove", &s[2], "--data", &head]);
    assert!(ok, "fabric server remove: {err}");
    eprintln!("fabric server remove: {out}");
    let (_, t) = wait_until("h3's open long-poll closed", REVOKE_GOAL * 10, || {
        if f.c.alive(poller) {
            Err("still open".to_string())
        } else {
            Ok(())
        }
    });
    eprintln!("revocation: h3's long-poll closed {t:?} after the remove");
    let e = curl(
        &f,
        2,
        "GET",
        &format!("/servers/{}/desired", s[2]),
        Path::new(&ca),
        Some(&h3_tls),
    )
    .unwrap_err();
    eprintln!(
        "revocation: h3's request refused {:?} after the remove: {e}",
        t0.elapsed()
    );
    // Its VXLAN: h1 drops it (the members reach h1's dataplane through its agent).
    let (_, t) = wait_until("h1 drops h3's VXLAN", REVOKE_GOAL * 10, || {
        let n = not_member(&f, 0);
        if n > before {
            Ok(())
        } else {
            Err(format!("not_member {n}"))
        }
    });
    eprintln!(
        "revocation: h1 drops h3's VXLAN {t:?} later ({:?} after the remove)",
        t0.elapsed()
    );
    f.c.stop(pinger, Duration::from_secs(5));
    assert!(
        f.c.ping_once(2, &c, ip_a).is_err(),
        "c on the removed h3 still reaches a"
    );
    // Its plain SVP: refused by address now.
    let mut argv = vec![pbin.as_str()];
    argv.extend(lookup);
    assert!(
        f.c.exec(2, &argv).is_err(),
        "the removed host's SVP answered"
    );
    // Its VM reads unknown (lost); the others are untouched.
    let v = f.ok("GET", &format!("/vms/{c}"), None);
    assert_eq!(
        (v["state"].as_str(), v["lost"].as_bool()),
        (Some("unknown"), Some(true)),
        "{v}"
    );
    f.ping(0, &a, ip_b, "after the remove: a -> b");
    f.ping(1, &b, ip_a, "after the remove: b -> a");
    cluster::teardown(f.c);
}

fn serial(dir: &Path) -> String {
    let pem = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    let der = fabric::pki::tls::pem_certs(&pem).unwrap().remove(0);
    fabric::pki::tls::serial_of(&der).unwrap()
}

/// With `--cert-lifetime 1m` a joined host renews its certificate (new serial) after ~40 s;
/// provisioning and lookups go on; the old certificate is refused once it expired.
#[test]
fn certificates_are_renewed() {
    if !root_or_skip("certificates_are_renewed") {
        return;
    }
    let (f, s) = start_up_cluster(2, &["--cert-lifetime", "1m"]);
    let tls = f.c.hosts[1].dir.join("tls");
    let old_dir: PathBuf = f.c.dir.join("h2-old-cert");
    std::fs::create_dir_all(&old_dir).unwrap();
    for n in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::copy(tls.join(n), old_dir.join(n)).unwrap();
    }
    let old = serial(&tls);
    let pem = std::fs::read_to_string(tls.join("cert.pem")).unwrap();
    let der = fabric::pki::tls::pem_certs(&pem).unwrap().remove(0);
    let expires = fabric::pki::tls::not_after(&der).unwrap();
    let (new, t) = wait_until("h2 renews its certificate", Duration::from_secs(70), || {
        let s = serial(&tls);
        if s != old {
            Ok(s)
        } else {
            Err("same serial".to_string())
        }
    });
    eprintln!("h2 renewed its certificate after {t:?}: serial {old} -> {new}");
    // Provisioning and lookups go on.
    let net = f.network(50, 66);
    let net = net["uuid"].as_str().unwrap().to_string();
    let (a, b) = (uuid(0x4a), uuid(0x4b));
    let (ip_a, ip_b) = (ipv4("10.66.0.10"), ipv4("10.66.0.11"));
    f.create_vm(&a, &s[0], &net, ip_a, json!({}));
    f.create_vm(&b, &s[1], &net, ip_b, json!({}));
    f.wait_vm(1, &b, ip_b, "after renewal: b on h2");
    f.wait_vm(0, &a, ip_a, "after renewal: a on h1");
    f.ping(1, &b, ip_a, "after renewal: b (h2) -> a (h1)");
    // Once expired, the old certificate is refused; the new one works.
    let left = expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    std::thread::sleep(left + Duration::from_secs(2));
    let path = format!("/servers/{}/desired", s[1]);
    let ca = tls.join("ca.pem");
    let e = curl(&f, 1, "GET", &path, &ca, Some(&old_dir)).unwrap_err();
    eprintln!("expired certificate: {e}");
    assert_eq!(curl(&f, 1, "GET", &path, &ca, Some(&tls)), Ok(200));
    f.ping(1, &b, ip_a, "after the old certificate expired: b -> a");
    cluster::teardown(f.c);
}
