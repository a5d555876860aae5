//! Cluster authorization and membership over a real control plane (real HTTP, a real SQLite
//! file; PostgreSQL with `PORTOLAN_TEST_PG`): the route policy per caller (a wrapper puts the
//! `Peer` the listener would have established into each request, from a test header), a host
//! reporting for another server's VM (refused, nothing written), `DELETE /servers/:uuid`
//! (Trust revoked at once, the change in another server's feed, VMs lost, 410 Gone after, a
//! second instance's Trust within its 1 s refresh), foreign `/peers` and `members` in the
//! desired snapshot, the `removed_ms` migration of an older store, and `fabric server` /
//! `fabric peer` against the service.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use fabric::control::client::{HttpClient, HttpResponse};
use fabric::control::db::Db;
use fabric::control::http::Service;
use fabric::control::{open_store, Config};
use fabric::pki::{Peer, Trust};
use portolan::store::Store;
use serde_json::{json, Value};

#[path = "util/temp_db.rs"]
mod temp_db;
use temp_db::TempDb;

const OWNER: &str = "930896af-bf8c-48d4-885c-6573a94b1853";
const S1: &str = "564d1a4c-0000-4000-8000-000000000001";
const S2: &str = "564d1a4c-0000-4000-8000-000000000002";
const S3: &str = "564d1a4c-0000-4000-8000-000000000003";
const IP1: &str = "192.168.78.1";
const IP2: &str = "192.168.78.2";
const FOREIGN: &str = "192.168.78.200";

/// The test header naming the caller: `host:UUID`, `operator:NAME`, `anonymous`; absent = no
/// Peer at all (plain HTTP: `Peer::Open`).
const PEER_HEADER: &str = "x-test-peer";

async fn inject_peer(mut req: Request, next: Next) -> Response {
    let peer = req
        .headers()
        .get(PEER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| match v.split_once(':') {
            Some(("host", u)) => Peer::Host {
                server_uuid: u.to_string(),
                serial: "01".into(),
            },
            Some(("operator", n)) => Peer::Operator {
                name: n.into(),
                serial: None,
            },
            _ => Peer::Anonymous,
        });
    if let Some(p) = peer {
        req.extensions_mut().insert(p);
    }
    next.run(req).await
}

struct Svc {
    addr: SocketAddr,
    trust: Arc<Trust>,
    store: Option<Arc<dyn Store>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Svc {
    async fn start(url: &str) -> Svc {
        Svc::start_with(url, Config::default()).await
    }

    /// With `cfg` (its `trust` replaced by a fresh one).
    async fn start_with(url: &str, cfg: Config) -> Svc {
        let trust = Trust::new();
        let cfg = Config {
            trust: Some(trust.clone()),
            ..cfg
        };
        let store = open_store(url, &cfg).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let limits = cfg.http.clone();
        let st = store.clone();
        tokio::spawn(async move {
            let svc = Service::start(st, cfg);
            let router = svc.router().layer(axum::middleware::from_fn(inject_peer));
            let feed_closer = svc.app.clone();
            let _ = fabric::http::Server::new(limits)
                .serve(listener, router, async move {
                    let _ = rx.await;
                    feed_closer.feed.close();
                })
                .await;
            drop(svc);
        });
        Svc {
            addr,
            trust,
            store: Some(store),
            stop: Some(tx),
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let store = self.store.take();
        tokio::task::spawn_blocking(move || drop(store))
            .await
            .unwrap();
    }

    /// Rows of `SELECT COUNT(*) ...`.
    async fn count(&self, sql: &'static str) -> i64 {
        let store = self.store.clone().unwrap();
        tokio::task::spawn_blocking(move || {
            portolan::store::with_read(&*store, |raw| {
                Db::from(raw)
                    .query_opt(sql, &[])
                    .map(|r| r.and_then(|r| r[0].as_opt_i64()).unwrap_or(0))
            })
            .unwrap()
        })
        .await
        .unwrap()
    }

    async fn call(
        &self,
        peer: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> HttpResponse {
        let mut c = HttpClient::new(self.addr);
        let b = body.map(|v| v.to_string()).unwrap_or_default();
        let mut headers = vec![("content-type", "application/json")];
        if let Some(p) = peer {
            headers.push((PEER_HEADER, p));
        }
        c.request_with(method, path, &headers, b.as_bytes())
            .await
            .unwrap()
    }

    /// The call's status and JSON body.
    async fn st(
        &self,
        peer: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let r = self.call(peer, method, path, body).await;
        (r.status, r.json())
    }

    async fn ok(&self, peer: Option<&str>, method: &str, path: &str, body: Option<Value>) -> Value {
        let r = self.call(peer, method, path, body).await;
        assert!(
            r.status == 200 || r.status == 204,
            "{method} {path} as {peer:?}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    }
}

fn host(u: &str) -> String {
    format!("host:{u}")
}

const OP: Option<&str> = Some("operator:alice");

/// Registers S1 and S2, a fabric network, and a VM on each server.
async fn setup(s: &Svc) -> (String, String) {
    for (u, ip) in [(S1, IP1), (S2, IP2)] {
        s.ok(
            OP,
            "PUT",
            &format!("/servers/{u}"),
            Some(json!({"underlay_ip": ip, "hostname": format!("h{}", &u[35..])})),
        )
        .await;
    }
    s.ok(
        OP,
        "POST",
        &format!("/fabrics/{OWNER}/vlans"),
        Some(json!({"vlan_id": 10})),
    )
    .await;
    let net = s
        .ok(
            OP,
            "POST",
            &format!("/fabrics/{OWNER}/vlans/10/networks"),
            Some(json!({"name": "n10", "subnet": "10.10.0.0/24", "gateway": "10.10.0.1"})),
        )
        .await;
    let net = net["uuid"].as_str().unwrap().to_string();
    let mut vms = Vec::new();
    for server in [S1, S2] {
        let vm = s
            .ok(
                OP,
                "POST",
                "/vms",
                Some(json!({"owner_uuid": OWNER, "server_uuid": server, "networks": [{"uuid": net}]})),
            )
            .await;
        vms.push(vm["uuid"].as_str().unwrap().to_string());
    }
    (vms[0].clone(), vms[1].clone())
}

fn one_line(v: &Value) -> &str {
    let m = v["message"].as_str().unwrap_or("");
    assert!(!m.is_empty() && !m.contains('\n'), "{v}");
    m
}

async fn policy(url: &str) {
    let s = Svc::start(url).await;
    let (vm1, _vm2) = setup(&s).await;
    let h1 = host(S1);
    let h1 = Some(h1.as_str());

    // The agent's routes, for itself.
    let d = s
        .ok(h1, "GET", &format!("/servers/{S1}/desired"), None)
        .await;
    assert_eq!(d["members"], json!([IP1, IP2]));
    s.ok(
        h1,
        "GET",
        &format!("/changes?since=0&server_uuid={S1}&timeout=0"),
        None,
    )
    .await;
    s.ok(h1, "POST", &format!("/servers/{S1}/heartbeat"), None)
        .await;
    // Re-registering: the host name may change, the underlay address may not.
    let r = s
        .ok(
            h1,
            "PUT",
            &format!("/servers/{S1}"),
            Some(json!({"hostname": "renamed", "underlay_ip": IP1})),
        )
        .await;
    assert_eq!(r["hostname"], "renamed");
    let (st, e) = s
        .st(
            h1,
            "PUT",
            &format!("/servers/{S1}"),
            Some(json!({"underlay_ip": "192.168.78.9"})),
        )
        .await;
    assert_eq!((st, e["code"].as_str()), (403, Some("Forbidden")), "{e}");
    assert!(one_line(&e).contains("only an operator"), "{e}");
    let sv = s.ok(OP, "GET", &format!("/servers/{S1}"), None).await;
    assert_eq!(sv["underlay_ip"], IP1, "nothing written");
    // A host certificate cannot register a new server.
    let h3 = host(S3);
    let (st, e) = s
        .st(
            Some(&h3),
            "PUT",
            &format!("/servers/{S3}"),
            Some(json!({"underlay_ip": "192.168.78.3", "hostname": "h3"})),
        )
        .await;
    assert_eq!(st, 403, "{e}");
    assert_eq!(
        s.st(OP, "GET", &format!("/servers/{S3}"), None).await.0,
        404
    );

    // Another server's routes, and operator routes: 403, one line, saying why.
    let refused: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", format!("/servers/{S2}/desired"), None),
        ("POST", format!("/servers/{S2}/heartbeat"), None),
        (
            "PUT",
            format!("/servers/{S2}"),
            Some(json!({"hostname": "x"})),
        ),
        (
            "POST",
            format!("/servers/{S2}/vm_states"),
            Some(json!({"vms": []})),
        ),
        ("GET", format!("/changes?server_uuid={S2}&timeout=0"), None),
        ("GET", "/changes?timeout=0".into(), None),
        ("GET", format!("/servers/{S1}"), None),
        ("GET", "/servers".into(), None),
        ("DELETE", format!("/servers/{S1}"), None),
        ("POST", "/vms".into(), Some(json!({"owner_uuid": OWNER}))),
        ("GET", "/vms".into(), None),
        ("GET", format!("/vms/{vm1}"), None),
        (
            "POST",
            "/rules".into(),
            Some(json!({"rule": "FROM any TO all vms ALLOW tcp PORT 22", "global": true})),
        ),
        ("GET", "/metrics".into(), None),
        ("GET", "/ping".into(), None),
        ("GET", "/peers".into(), None),
        ("PUT", format!("/peers/{FOREIGN}"), None),
        ("GET", "/no/such/route".into(), None),
    ];
    for (m, p, b) in &refused {
        let (st, e) = s.st(h1, m, p, b.clone()).await;
        assert_eq!(
            (st, e["code"].as_str()),
            (403, Some("Forbidden")),
            "{m} {p}: {e}"
        );
        one_line(&e);
    }
    // Without a certificate: 401 everywhere (POST /join is the head's, not served here).
    for (m, p, b) in &refused {
        let (st, e) = s.st(Some("anonymous"), m, p, b.clone()).await;
        assert_eq!(
            (st, e["code"].as_str()),
            (401, Some("Unauthorized")),
            "{m} {p}: {e}"
        );
        one_line(&e);
    }
    let (st, _) = s
        .st(
            Some("anonymous"),
            "GET",
            &format!("/servers/{S1}/desired"),
            None,
        )
        .await;
    assert_eq!(st, 401);
    // Nothing refused was written: no peer, no new VM, no new rule.
    assert_eq!(s.count("SELECT COUNT(*) FROM fabric_peers").await, 0);
    assert_eq!(s.count("SELECT COUNT(*) FROM fabric_vms").await, 2);
    assert_eq!(s.count("SELECT COUNT(*) FROM napi_rules").await, 0);
    // Operators and plain HTTP (no Peer) may do all of it.
    s.ok(OP, "GET", "/vms", None).await;
    s.ok(None, "GET", "/servers", None).await;
    s.ok(OP, "GET", "/changes?timeout=0", None).await;
    let m = s.call(OP, "GET", "/metrics", None).await;
    let text = String::from_utf8_lossy(&m.body);
    for want in [
        format!(
            "fabric_control_auth_refused_total{{reason=\"route\"}} {}",
            refused.len()
        ),
        format!(
            "fabric_control_auth_refused_total{{reason=\"no_certificate\"}} {}",
            refused.len() + 1
        ),
    ] {
        assert!(text.contains(&want), "{want}\n{text}");
    }
    // The two refused PUTs above were refused by the write itself (underlay change, new server).
    assert!(
        text.contains("fabric_control_auth_refused_total{reason=\"other_server\"} 2"),
        "{text}"
    );
    s.stop().await;
}

async fn reports(url: &str) {
    let s = Svc::start(url).await;
    let (vm1, vm2) = setup(&s).await;
    let h1 = host(S1);
    let h1 = Some(h1.as_str());
    let changes = "SELECT COUNT(*) FROM fabric_changes";
    let before = s.count(changes).await;
    // One VM of another server in the report: all of it refused.
    let (st, e) = s
        .st(
            h1,
            "POST",
            &format!("/servers/{S1}/vm_states"),
            Some(json!({"vms": [{"uuid": vm1, "state": "running"}, {"uuid": vm2, "state": "failed", "reason": "x"}]})),
        )
        .await;
    assert_eq!(st, 403, "{e}");
    let msg = one_line(&e);
    assert!(
        msg.contains(&vm2) && msg.contains(S2) && msg.contains("nothing"),
        "{msg}"
    );
    for vm in [&vm1, &vm2] {
        let v = s.ok(OP, "GET", &format!("/vms/{vm}"), None).await;
        assert_eq!(v["state"], "provisioning", "nothing written: {v}");
    }
    assert_eq!(s.count(changes).await, before, "no change recorded");
    // Its own VM alone: applied.
    let r = s
        .ok(
            h1,
            "POST",
            &format!("/servers/{S1}/vm_states"),
            Some(json!({"vms": [{"uuid": vm1, "state": "running"}]})),
        )
        .await;
    assert_eq!(r["updated"], 1);
    assert_eq!(
        s.ok(OP, "GET", &format!("/vms/{vm1}"), None).await["state"],
        "running"
    );
    // An operator's report keeps the old leniency (a stale entry is ignored, not refused).
    let r = s
        .ok(
            OP,
            "POST",
            &format!("/servers/{S1}/vm_states"),
            Some(json!({"vms": [{"uuid": vm2, "state": "failed"}]})),
        )
        .await;
    assert_eq!(r["ignored"], json!([vm2]));
    s.stop().await;
}

async fn removal(url: &str) {
    let s = Svc::start(url).await;
    // A second instance over the same store: its Trust follows within its 1 s refresh.
    let other = Svc::start(url).await;
    let (_vm1, vm2) = setup(&s).await;
    let ip2: IpAddr = IP2.parse().unwrap();
    // Registration refreshed the Trust before the reply.
    assert!(s.trust.enforcing() && s.trust.is_member(ip2));
    assert_eq!(s.trust.underlay_of(S2), Some(ip2));
    let t0 = Instant::now();
    while !(other.trust.enforcing() && other.trust.is_member(ip2)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "second instance never loaded the servers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // S1's agent waits on its feed.
    let since = s.ok(OP, "GET", "/changes?timeout=0", None).await["next"]
        .as_i64()
        .unwrap();
    let addr = s.addr;
    let poll = tokio::spawn(async move {
        let mut c = HttpClient::new(addr);
        let h = host(S1);
        let r = c
            .request_with(
                "GET",
                &format!("/changes?since={since}&server_uuid={S1}&timeout=20"),
                &[(PEER_HEADER, &h)],
                b"",
            )
            .await
            .unwrap();
        (r.status, r.json(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (st, e) = s
        .st(Some(&host(S1)), "DELETE", &format!("/servers/{S2}"), None)
        .await;
    assert_eq!(st, 403, "a host cannot remove a server: {e}");
    let removed_at = Instant::now();
    let r = s.call(OP, "DELETE", &format!("/servers/{S2}"), None).await;
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    // Revoked in this process before the reply.
    assert!(s.trust.is_revoked(S2));
    assert!(!s.trust.is_member(ip2));
    assert_eq!(s.trust.members(), vec![IP1.parse::<IpAddr>().unwrap()]);
    let (st, page, woke) = tokio::time::timeout(Duration::from_secs(20), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st, 200);
    let c = page["changes"].as_array().unwrap();
    assert!(
        c.iter()
            .any(|c| c["kind"] == "server" && c["action"] == "remove" && c["uuid"] == S2),
        "{page}"
    );
    eprintln!(
        "removal reached S1's long-poll {:?} after the DELETE",
        woke.saturating_duration_since(removed_at)
    );
    let t0 = Instant::now();
    while !other.trust.is_revoked(S2) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "second instance never revoked S2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "second instance's Trust revoked S2 {:?} after the DELETE",
        removed_at.elapsed()
    );
    // The members the agents read.
    let d = s
        .ok(
            Some(&host(S1)),
            "GET",
            &format!("/servers/{S1}/desired"),
            None,
        )
        .await;
    assert_eq!(d["members"], json!([IP1]));
    // Its VMs read unknown and lost.
    let v = s.ok(OP, "GET", &format!("/vms/{vm2}"), None).await;
    assert_eq!(
        (v["state"].as_str(), v["lost"].as_bool()),
        (Some("unknown"), Some(true)),
        "{v}"
    );
    assert!(
        v["state_reason"].as_str().unwrap().contains("removed"),
        "{v}"
    );
    let list = s.ok(OP, "GET", "/vms", None).await;
    for v in list.as_array().unwrap() {
        assert_eq!(v["lost"].as_bool(), Some(v["server_uuid"] == S2), "{v}");
    }
    // Listed as removed; ?removed=false hides it.
    let all = s.ok(OP, "GET", "/servers", None).await;
    let st2 = all
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["uuid"] == S2)
        .unwrap();
    assert_eq!(st2["status"], "removed");
    assert!(st2["removed"].is_string());
    let members = s.ok(OP, "GET", "/servers?removed=false", None).await;
    assert_eq!(members.as_array().unwrap().len(), 1);
    let gone = s.ok(OP, "GET", "/servers?status=removed", None).await;
    assert_eq!(gone.as_array().unwrap().len(), 1);
    // Portolan no longer maps it.
    assert_eq!(
        s.st(OP, "GET", &format!("/portolan/underlay/{S2}"), None)
            .await
            .0,
        404
    );
    s.ok(OP, "GET", &format!("/portolan/underlay/{S1}"), None)
        .await;
    // Everything under its identity is 410 Gone, for good.
    let h2 = host(S2);
    for (peer, m, p, b) in [
        (
            OP,
            "PUT",
            format!("/servers/{S2}"),
            Some(json!({"underlay_ip": IP2, "hostname": "back"})),
        ),
        (
            Some(h2.as_str()),
            "PUT",
            format!("/servers/{S2}"),
            Some(json!({"underlay_ip": IP2})),
        ),
        (
            Some(h2.as_str()),
            "POST",
            format!("/servers/{S2}/heartbeat"),
            None,
        ),
        (None, "POST", format!("/servers/{S2}/heartbeat"), None),
        (
            Some(h2.as_str()),
            "POST",
            format!("/servers/{S2}/vm_states"),
            Some(json!({"vms": []})),
        ),
        (
            None,
            "POST",
            format!("/servers/{S2}/vm_states"),
            Some(json!({"vms": []})),
        ),
        (
            Some(h2.as_str()),
            "GET",
            format!("/servers/{S2}/desired"),
            None,
        ),
        (
            Some(h2.as_str()),
            "GET",
            format!("/changes?server_uuid={S2}&timeout=0"),
            None,
        ),
        (OP, "DELETE", format!("/servers/{S2}"), None),
    ] {
        let (st, e) = s.st(peer, m, &p, b).await;
        assert_eq!(
            (st, e["code"].as_str()),
            (410, Some("Gone")),
            "{m} {p} as {peer:?}: {e}"
        );
        one_line(&e);
    }
    assert_eq!(
        s.st(OP, "DELETE", &format!("/servers/{S3}"), None).await.0,
        404
    );
    // Placement skips it, and it cannot be chosen; its address is free for a new identity.
    let (st, e) = s
        .st(OP, "POST", "/vms", Some(json!({"owner_uuid": OWNER, "server_uuid": S2, "networks": [{"uuid": v["nics"][0]["network_uuid"]}]})))
        .await;
    assert_eq!(st, 422, "{e}");
    for _ in 0..2 {
        let vm = s
            .ok(OP, "POST", "/vms", Some(json!({"owner_uuid": OWNER, "networks": [{"uuid": v["nics"][0]["network_uuid"]}]})))
            .await;
        assert_eq!(vm["server_uuid"], S1);
    }
    s.ok(
        OP,
        "PUT",
        &format!("/servers/{S3}"),
        Some(json!({"underlay_ip": IP2, "hostname": "h3"})),
    )
    .await;
    assert!(s.trust.is_member(ip2) && s.trust.is_revoked(S2) && !s.trust.is_revoked(S3));
    other.stop().await;
    s.stop().await;
}

async fn peers(url: &str) {
    let s = Svc::start(url).await;
    setup(&s).await;
    let h1 = host(S1);
    let h1 = Some(h1.as_str());
    let foreign: IpAddr = FOREIGN.parse().unwrap();
    assert!(!s.trust.is_member(foreign));
    let since = s.ok(OP, "GET", "/changes?timeout=0", None).await["next"]
        .as_i64()
        .unwrap();
    let p = s
        .ok(
            OP,
            "PUT",
            &format!("/peers/{FOREIGN}"),
            Some(json!({"note": "linux vxlan"})),
        )
        .await;
    assert_eq!(
        (p["ip"].as_str(), p["note"].as_str()),
        (Some(FOREIGN), Some("linux vxlan"))
    );
    assert!(
        s.trust.is_member(foreign),
        "Trust refreshed before the reply"
    );
    // Every server's feed carries it, and its snapshot lists it.
    for server in [S1, S2] {
        let h = host(server);
        let page = s
            .ok(
                Some(&h),
                "GET",
                &format!("/changes?since={since}&server_uuid={server}&timeout=0"),
                None,
            )
            .await;
        let c = page["changes"].as_array().unwrap();
        assert!(
            c.iter()
                .any(|c| c["kind"] == "peer" && c["uuid"] == FOREIGN && c["action"] == "create"),
            "{page}"
        );
        let d = s
            .ok(Some(&h), "GET", &format!("/servers/{server}/desired"), None)
            .await;
        assert_eq!(d["members"], json!([IP1, IP2, FOREIGN]));
    }
    // A new note is no membership change.
    let n = s.count("SELECT COUNT(*) FROM fabric_changes").await;
    let p = s
        .ok(
            OP,
            "PUT",
            &format!("/peers/{FOREIGN}"),
            Some(json!({"note": "varpd"})),
        )
        .await;
    assert_eq!(p["note"], "varpd");
    s.ok(OP, "PUT", &format!("/peers/{FOREIGN}"), None).await;
    assert_eq!(s.count("SELECT COUNT(*) FROM fabric_changes").await, n);
    let l = s.ok(OP, "GET", "/peers", None).await;
    assert_eq!(
        l,
        json!([{"ip": FOREIGN, "note": "varpd", "created": p["created"]}])
    );
    // Bad addresses and fields.
    for (path, body) in [
        ("/peers/224.0.0.1", None),
        ("/peers/not-an-ip", None),
        ("/peers/192.0.2.1", Some(json!({"note": "x", "port": 4789}))),
    ] {
        let (st, e) = s.st(OP, "PUT", path, body).await;
        assert_eq!(st, 422, "{path}: {e}");
    }
    assert_eq!(
        s.ok(OP, "GET", "/peers", None)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Hosts cannot touch them.
    assert_eq!(
        s.st(h1, "DELETE", &format!("/peers/{FOREIGN}"), None)
            .await
            .0,
        403
    );
    s.ok(OP, "DELETE", &format!("/peers/{FOREIGN}"), None).await;
    assert!(!s.trust.is_member(foreign));
    let (st, e) = s.st(OP, "DELETE", &format!("/peers/{FOREIGN}"), None).await;
    assert_eq!(st, 404, "{e}");
    let d = s
        .ok(h1, "GET", &format!("/servers/{S1}/desired"), None)
        .await;
    assert_eq!(d["members"], json!([IP1, IP2]));
    let page = s
        .ok(
            h1,
            "GET",
            &format!("/changes?since={since}&server_uuid={S1}&timeout=0"),
            None,
        )
        .await;
    assert!(page["changes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["kind"] == "peer" && c["action"] == "delete"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_on_sqlite() {
    let db = TempDb::new("auth-it");
    policy(&db.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_for_another_servers_vm_on_sqlite() {
    let db = TempDb::new("auth-it");
    reports(&db.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_on_sqlite() {
    let db = TempDb::new("auth-it");
    removal(&db.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_sqlite() {
    let db = TempDb::new("auth-it");
    peers(&db.url()).await;
}

async fn pg_db() -> Option<portolan::store::postgres::TestDatabase> {
    let admin = portolan::store::postgres::test_admin_url()?;
    Some(
        tokio::task::spawn_blocking(move || {
            portolan::store::postgres::TestDatabase::create(&admin).unwrap()
        })
        .await
        .unwrap(),
    )
}

async fn drop_pg(db: portolan::store::postgres::TestDatabase) {
    tokio::task::spawn_blocking(move || drop(db)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_and_removal_on_postgres() {
    let Some(db) = pg_db().await else {
        return;
    };
    reports(&db.url).await;
    drop_pg(db).await;
    let Some(db) = pg_db().await else {
        return;
    };
    removal(&db.url).await;
    drop_pg(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_peers_on_postgres() {
    let Some(db) = pg_db().await else {
        return;
    };
    policy(&db.url).await;
    drop_pg(db).await;
    let Some(db) = pg_db().await else {
        return;
    };
    peers(&db.url).await;
    drop_pg(db).await;
}

/// A store made before removal existed (no `removed_ms`) gets the column when opened, and its
/// servers read as members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_store_gets_removed_ms() {
    let db = TempDb::new("auth-migrate");
    let path = db.0.clone();
    tokio::task::spawn_blocking(move || {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "CREATE TABLE fabric_servers (
                uuid TEXT PRIMARY KEY, hostname TEXT NOT NULL, underlay_ip TEXT NOT NULL,
                last_heartbeat_ms BIGINT, created_ms BIGINT NOT NULL, doc TEXT);
             INSERT INTO fabric_servers VALUES ('{S1}', 'old', '{IP1}', NULL, 0, NULL);"
        ))
        .unwrap();
    })
    .await
    .unwrap();
    let s = Svc::start(&db.url()).await;
    let v = s.ok(OP, "GET", &format!("/servers/{S1}"), None).await;
    assert_eq!(
        (v["status"].as_str(), v["removed"].is_null()),
        (Some("unknown"), true),
        "{v}"
    );
    s.ok(OP, "DELETE", &format!("/servers/{S1}"), None).await;
    assert_eq!(
        s.ok(OP, "GET", &format!("/servers/{S1}"), None).await["status"],
        "removed"
    );
    s.stop().await;
    // Opening it again is a no-op.
    let s = Svc::start(&db.url()).await;
    assert_eq!(
        s.ok(OP, "GET", &format!("/servers/{S1}"), None).await["status"],
        "removed"
    );
    s.stop().await;
}

/// `POST /join` (the one route without a certificate) registers and refreshes the Trust at
/// once; renewal is the host's own; a removed identity can neither renew nor join again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_renew_and_a_removed_identity() {
    let db = TempDb::new("auth-join");
    let dir = std::env::temp_dir().join(format!(
        "fabric-auth-join-{}",
        db.0.file_stem().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Arc::new(fabric::pki::ca::ClusterCa::create_or_load(&dir).unwrap());
    let secret = fabric::pki::token::current(&dir, &ca).unwrap().render();
    let secret = secret.rsplit('-').next().unwrap().to_string();
    let cfg = Config {
        cluster: Some(fabric::control::join::ClusterPki {
            ca,
            data: dir.clone(),
            cert_lifetime: Duration::from_secs(3600),
            portolan_tls: None,
        }),
        ..Config::default()
    };
    let s = Svc::start_with(&db.url(), cfg).await;
    let anon = Some("anonymous");
    let (csr, _key) = fabric::pki::ca::request(S1).unwrap();
    let join = json!({"secret": secret, "csr": csr, "server_uuid": S1, "underlay_ip": IP1, "hostname": "h1"});
    let j = s.ok(anon, "POST", "/join", Some(join.clone())).await;
    assert!(
        j["certificate"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE"),
        "{j}"
    );
    assert!(
        s.trust.is_member(IP1.parse().unwrap()),
        "the join refreshed the Trust"
    );
    assert_eq!(s.st(anon, "GET", "/servers", None).await.0, 401);
    let h1 = host(S1);
    let h1 = Some(h1.as_str());
    assert_eq!(s.st(h1, "POST", "/join", Some(join.clone())).await.0, 403);
    // Joining under a registered server's UUID from another address is refused (a token does
    // not take over another server's identity); from its own address it is a re-join.
    let mut steal = join.clone();
    steal["underlay_ip"] = json!("192.0.2.99");
    let (st, e) = s.st(anon, "POST", "/join", Some(steal)).await;
    assert_eq!(st, 409, "{e}");
    let v = s.ok(OP, "GET", &format!("/servers/{S1}"), None).await;
    assert_eq!(v["underlay_ip"], IP1, "{v}");
    s.ok(anon, "POST", "/join", Some(join.clone())).await;
    let renew = json!({"csr": csr});
    s.ok(
        h1,
        "POST",
        &format!("/servers/{S1}/certificate"),
        Some(renew.clone()),
    )
    .await;
    assert_eq!(
        s.st(
            h1,
            "POST",
            &format!("/servers/{S2}/certificate"),
            Some(renew.clone())
        )
        .await
        .0,
        403
    );
    s.ok(OP, "DELETE", &format!("/servers/{S1}"), None).await;
    // Its certificate is refused at once; the store refuses a renewal or a new join of it.
    let (st, e) = s
        .st(
            h1,
            "POST",
            &format!("/servers/{S1}/certificate"),
            Some(renew.clone()),
        )
        .await;
    assert_eq!(st, 410, "{e}");
    let (st, e) = s
        .st(
            OP,
            "POST",
            &format!("/servers/{S1}/certificate"),
            Some(renew),
        )
        .await;
    assert_eq!(st, 410, "{e}");
    let (st, e) = s.st(anon, "POST", "/join", Some(join)).await;
    assert_eq!(st, 410, "{e}");
    one_line(&e);
    assert_eq!(
        s.ok(OP, "GET", &format!("/servers/{S1}"), None).await["status"],
        "removed"
    );
    assert!(s.trust.is_revoked(S1));
    s.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn fabric_cmd(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `fabric server ls|remove` and `fabric peer ls|add|rm` against a running service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands() {
    let db = TempDb::new("auth-cli");
    let s = Svc::start(&db.url()).await;
    setup(&s).await;
    let url = format!("http://{}", s.addr);
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            fabric_cmd(&a)
        })
        .await
        .unwrap()
    };
    let a = |v: &[&str]| -> Vec<String> {
        let mut x: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        x.push("--control".into());
        x.push(url.clone());
        x
    };
    let (ok, out, err) = run(a(&["server", "ls"])).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("UUID"), "{out}");
    assert!(
        out.contains(S1) && out.contains(IP2) && out.contains("running"),
        "{out}"
    );
    let (ok, out, err) = run(a(&["server", "remove", S2])).await;
    assert!(ok, "{err}");
    assert_eq!(out, format!("server {S2} removed\n"));
    assert!(s.trust.is_revoked(S2));
    let (ok, _, err) = run(a(&["server", "remove", S2])).await;
    assert!(!ok);
    assert!(
        err.contains("already removed") && err.contains("(410 Gone)"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let (ok, _, err) = run(a(&["server", "remove", S3])).await;
    assert!(!ok);
    assert!(
        err.contains(&format!("no server {S3} is registered (404")),
        "{err}"
    );
    let (ok, out, _) = run(a(&["server", "ls"])).await;
    assert!(ok && out.contains("removed"), "{out}");
    let (ok, out, _) = run(a(&["server", "ls", "--members"])).await;
    assert!(ok && !out.contains(S2), "{out}");
    let (ok, out, err) = run(a(&["peer", "add", FOREIGN, "--note", "linux vxlan"])).await;
    assert!(ok, "{err}");
    assert_eq!(out, format!("peer {FOREIGN} added\n"));
    let (ok, out, _) = run(a(&["peer", "ls"])).await;
    assert!(
        ok && out.contains(FOREIGN) && out.contains("linux vxlan"),
        "{out}"
    );
    let (ok, out, _) = run(a(&["peer", "ls", "--json"])).await;
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()[0]["ip"],
        FOREIGN
    );
    let (ok, _, err) = run(a(&["peer", "add", "224.0.0.1"])).await;
    assert!(
        !ok && err.contains("unicast") && err.contains("422"),
        "{err}"
    );
    let (ok, _, err) = run(a(&["peer", "rm", FOREIGN])).await;
    assert!(ok, "{err}");
    let (ok, _, err) = run(a(&["peer", "rm", FOREIGN])).await;
    assert!(
        !ok && err.contains(&format!("no peer {FOREIGN} is listed (404")),
        "{err}"
    );
    s.stop().await;
}
