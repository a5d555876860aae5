//! VMs and servers over real HTTP, on a real SQLite file and on PostgreSQL (`PORTOLAN_TEST_PG`;
//! skipped without it outside CI): registration and Portolan underlay mappings, placement
//! spreading over live servers only, VM creation with NAPI-shaped NICs and their mappings in one
//! transaction (a failing NIC rolls everything back), updates, migrate (mapping moves, every
//! host on the VNI gets its shootdowns), delete (IP freed and reusable, mapping tombstoned),
//! agent state reports (a stale report from the old server is ignored), `unknown` after the
//! heartbeat lifetime, and the desired-state snapshot with its firewall closure.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fabric::control::client::{HttpClient, HttpResponse};
use fabric::control::db::Db;
use fabric::control::{http, open_store, Config};
use fabric::firewall::compile::FirewallState;
use portolan::store::Store;
use serde_json::{json, Value};

const OWNER: &str = "930896af-bf8c-48d4-885c-6573a94b1853";
const OTHER: &str = "7b0c7a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
const S1: &str = "564d1a4c-0000-4000-8000-000000000001";
const S2: &str = "564d1a4c-0000-4000-8000-000000000002";
const S3: &str = "564d1a4c-0000-4000-8000-000000000003";
const S4: &str = "564d1a4c-0000-4000-8000-000000000004";
const WEB: &str = "11111111-0000-4000-8000-000000000001";
const ADVERTISE: &str = "192.168.78.1:1296";

#[path = "util/temp_db.rs"]
mod temp_db;
use temp_db::TempDb;

struct Svc {
    addr: SocketAddr,
    store: Option<Arc<dyn Store>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Svc {
    async fn start(url: &str, cfg: Config) -> Svc {
        let store = open_store(url, &cfg).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(http::serve(listener, store.clone(), cfg, async move {
            let _ = rx.await;
        }));
        Svc {
            addr,
            store: Some(store),
            stop: Some(tx),
        }
    }

    /// Stops the service and drops its store off the async runtime (the synchronous
    /// PostgreSQL client must not be dropped on it).
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let store = self.store.take();
        tokio::task::spawn_blocking(move || drop(store))
            .await
            .unwrap();
    }

    /// `(kind, action, servers)` of every change in the feed, in order.
    async fn changes(&self) -> Vec<(String, String, String)> {
        let store = self.store.clone().unwrap();
        tokio::task::spawn_blocking(move || {
            portolan::store::with_read(&*store, |raw| {
                Db::from(raw).query(
                    "SELECT kind, action, servers FROM fabric_changes ORDER BY seq",
                    &[],
                )
            })
            .unwrap()
            .into_iter()
            .map(|r| {
                let mut it = r.into_iter();
                let mut s = || it.next().unwrap().into_string("col").unwrap();
                (s(), s(), s())
            })
            .collect()
        })
        .await
        .unwrap()
    }
}

async fn call(c: &mut HttpClient, method: &str, path: &str, body: Option<Value>) -> HttpResponse {
    c.json(method, path, body.as_ref()).await.unwrap()
}

async fn ok(c: &mut HttpClient, method: &str, path: &str, body: Option<Value>) -> Value {
    let r = call(c, method, path, body).await;
    assert_eq!(
        r.status,
        200,
        "{method} {path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

async fn status(c: &mut HttpClient, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let r = call(c, method, path, body).await;
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        r.json()
    };
    (r.status, v)
}

async fn fabric_net(c: &mut HttpClient, owner: &str, vlan: u16, subnet: &str, gw: &str) -> Value {
    ok(
        c,
        "POST",
        &format!("/fabrics/{owner}/vlans"),
        Some(json!({"vlan_id": vlan})),
    )
    .await;
    ok(
        c,
        "POST",
        &format!("/fabrics/{owner}/vlans/{vlan}/networks"),
        Some(json!({"name": format!("n{vlan}"), "subnet": subnet, "gateway": gw})),
    )
    .await
}

async fn register(c: &mut HttpClient, uuid: &str, ip: &str) -> Value {
    ok(
        c,
        "PUT",
        &format!("/servers/{uuid}"),
        Some(json!({"underlay_ip": ip, "hostname": format!("h-{}", &uuid[34..])})),
    )
    .await
}

fn field_of(err: &Value) -> Vec<String> {
    err["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["field"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn count(c: &mut HttpClient, path: &str) -> usize {
    ok(c, "GET", path, None).await.as_array().unwrap().len()
}

/// The Portolan mapping of `ip` on `vnet` (deleted ones included), as the API lists it.
async fn mapping(c: &mut HttpClient, vnet: impl std::fmt::Display, ip: &str) -> Value {
    let maps = ok(
        c,
        "GET",
        &format!("/portolan/mappings?vnet_id={vnet}"),
        None,
    )
    .await;
    maps.as_array()
        .unwrap()
        .iter()
        .find(|m| m["ip"] == ip)
        .unwrap_or_else(|| panic!("no mapping for {ip} on {vnet}: {maps}"))
        .clone()
}

async fn ip_free(c: &mut HttpClient, net: &str, ip: &str) -> bool {
    ok(c, "GET", &format!("/networks/{net}/ips/{ip}"), None).await["free"] == true
}

/// Everything but heartbeat ageing, with the default 11 s lifetime.
async fn scenario(url: &str) {
    let cfg = Config {
        portolan_advertise: Some(ADVERTISE.into()),
        ..Config::default()
    };
    let svc = Svc::start(url, cfg).await;
    let mut c = HttpClient::new(svc.addr);

    // Servers: registration publishes the underlay mapping.
    let s = register(&mut c, S1, "192.168.78.1").await;
    assert_eq!(s["uuid"], S1);
    assert_eq!(s["underlay_ip"], "192.168.78.1");
    assert_eq!(s["status"], "running");
    assert_eq!(s["vms"], 0);
    assert!(s["last_heartbeat"].as_str().unwrap().ends_with('Z'));
    register(&mut c, S2, "192.168.78.2").await;
    register(&mut c, S3, "192.168.78.3").await;
    let u = ok(&mut c, "GET", &format!("/portolan/underlay/{S1}"), None).await;
    assert_eq!(
        u,
        json!({"cn_uuid": S1, "ip": "192.168.78.1", "port": 4789})
    );
    let s = ok(
        &mut c,
        "PUT",
        &format!("/servers/{S1}"),
        Some(json!({"hostname": "renamed"})),
    )
    .await;
    assert_eq!(s["hostname"], "renamed");
    assert_eq!(s["underlay_ip"], "192.168.78.1");
    let (st, e) = status(
        &mut c,
        "PUT",
        &format!("/servers/{S4}"),
        Some(json!({"underlay_ip": "192.168.78.2", "hostname": "dup"})),
    )
    .await;
    assert_eq!(st, 422, "{e}");
    assert_eq!(e["errors"][0]["code"], "UsedBy");
    let (st, e) = status(
        &mut c,
        "PUT",
        &format!("/servers/{S4}"),
        Some(json!({"hostname": "x"})),
    )
    .await;
    assert_eq!((st, field_of(&e)), (422, vec!["underlay_ip".to_string()]));
    // What a host has (the Docker API's /info sums it): validated, and nothing changes on a
    // refusal.
    let s = ok(
        &mut c,
        "PUT",
        &format!("/servers/{S1}"),
        Some(json!({"cpus": 4, "memory_bytes": 8_589_934_592u64})),
    )
    .await;
    assert_eq!(s["hostname"], "renamed");
    for bad in [
        json!({"cpus": 0}),
        json!({"memory_bytes": -1}),
        json!({"cpus": "x"}),
    ] {
        let (st, e) = status(&mut c, "PUT", &format!("/servers/{S1}"), Some(bad.clone())).await;
        assert_eq!(st, 422, "{bad}: {e}");
    }
    let (st, _) = status(&mut c, "POST", &format!("/servers/{S1}/heartbeat"), None).await;
    assert_eq!(st, 204);
    let (st, _) = status(&mut c, "POST", &format!("/servers/{S4}/heartbeat"), None).await;
    assert_eq!(st, 404);
    let all = ok(&mut c, "GET", "/servers", None).await;
    assert_eq!(all.as_array().unwrap().len(), 3);
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["status"] == "running"));

    // Networks.
    let net = fabric_net(&mut c, OWNER, 10, "10.10.0.0/24", "10.10.0.1").await;
    let net_uuid = net["uuid"].as_str().unwrap().to_string();
    let vnet = net["vnet_id"].as_u64().unwrap();
    let onet = fabric_net(&mut c, OTHER, 20, "10.20.0.0/24", "10.20.0.1").await;
    let onet_uuid = onet["uuid"].as_str().unwrap().to_string();

    // A VM on a given server, with its NIC.
    let vm = ok(
        &mut c,
        "POST",
        "/vms",
        Some(
            json!({"owner_uuid": OWNER, "uuid": WEB, "alias": "web", "server_uuid": S1,
                    "tags": {"role": "web", "tier": 1}, "firewall_enabled": true,
                    "networks": [{"uuid": net_uuid, "ip": "10.10.0.5"}]}),
        ),
    )
    .await;
    assert_eq!(vm["uuid"], WEB);
    assert_eq!(vm["alias"], "web");
    assert_eq!(vm["server_uuid"], S1);
    assert_eq!(vm["brand"], "joyent-minimal");
    assert_eq!(vm["state"], "provisioning");
    assert_eq!(vm["desired_state"], "running");
    assert_eq!(vm["state_reason"], Value::Null);
    assert_eq!(vm["firewall_enabled"], true);
    assert_eq!(vm["tags"], json!({"role": "web", "tier": 1}));
    assert!(vm.get("destroyed").is_none());
    let n0 = &vm["nics"][0];
    assert_eq!(n0["interface"], "net0");
    assert_eq!(n0["ip"], "10.10.0.5");
    assert_eq!(n0["netmask"], "255.255.255.0");
    assert_eq!(n0["gateway"], "10.10.0.1");
    assert_eq!(n0["mtu"], 1400);
    assert_eq!(n0["vlan_id"], 10);
    assert_eq!(n0["nic_tag"], format!("sdc_overlay/{vnet}"));
    assert_eq!(n0["network_uuid"], net_uuid.as_str());
    assert_eq!(n0["primary"], true);
    assert_eq!(n0["vnet_id"], vnet);
    let mac = n0["mac"].as_str().unwrap().to_string();
    assert!(mac.starts_with("90:b8:d0:"), "{mac}");
    assert_eq!(ok(&mut c, "GET", &format!("/vms/{WEB}"), None).await, vm);

    // The NIC is NAPI's.
    let nics = ok(&mut c, "GET", &format!("/nics?belongs_to_uuid={WEB}"), None).await;
    let nic = &nics[0];
    assert_eq!(nics.as_array().unwrap().len(), 1);
    assert_eq!(nic["mac"], mac.as_str());
    assert_eq!(nic["belongs_to_type"], "zone");
    assert_eq!(nic["belongs_to_uuid"], WEB);
    assert_eq!(nic["owner_uuid"], OWNER);
    assert_eq!(nic["cn_uuid"], S1);
    assert_eq!(nic["ip"], "10.10.0.5");
    assert_eq!(nic["vlan_id"], 10);
    assert_eq!(nic["mtu"], 1400);
    assert_eq!(nic["nic_tag"], format!("sdc_overlay/{vnet}"));
    assert_eq!(nic["network_uuid"], net_uuid.as_str());
    assert_eq!(nic["primary"], true);
    assert_eq!(nic["fabric"], true);
    assert_eq!(nic["state"], "provisioning");
    assert_eq!(ok(&mut c, "GET", &format!("/nics/{mac}"), None).await, *nic);
    // Its Portolan mapping.
    let m = mapping(&mut c, vnet, "10.10.0.5").await;
    assert_eq!(
        (
            m["mac"].as_str(),
            m["cn_uuid"].as_str(),
            m["deleted"].as_bool()
        ),
        (Some(mac.as_str()), Some(S1), Some(false))
    );

    // Refusals change nothing.
    let nics_before = count(&mut c, "/nics").await;
    let vms_before = count(&mut c, "/vms").await;
    let (st, e) = status(
        &mut c,
        "POST",
        "/vms",
        Some(
            json!({"owner_uuid": OWNER, "alias": "web", "server_uuid": S2,
                    "networks": [{"uuid": net_uuid}]}),
        ),
    )
    .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["code"], "Duplicate");
    assert_eq!(e["errors"][0]["field"], "alias");
    let missing = "00000000-0000-4000-8000-00000000dead";
    let (st, e) = status(
        &mut c,
        "POST",
        "/vms",
        Some(json!({"owner_uuid": OWNER, "server_uuid": S2,
                    "networks": [{"uuid": net_uuid, "ip": "10.10.0.6"}, {"uuid": missing}]})),
    )
    .await;
    assert_eq!(
        (st, field_of(&e)),
        (422, vec!["networks[1].uuid".to_string()]),
        "{e}"
    );
    // The first NIC is created in the transaction, the second fails: all rolled back.
    let (st, e) = status(
        &mut c,
        "POST",
        "/vms",
        Some(json!({"owner_uuid": OWNER, "server_uuid": S2,
                    "networks": [{"uuid": net_uuid, "ip": "10.10.0.6"},
                                 {"uuid": net_uuid, "ip": "10.10.0.5"}]})),
    )
    .await;
    assert_eq!(
        (st, field_of(&e)),
        (422, vec!["networks[1].ip".to_string()]),
        "{e}"
    );
    let (st, e) = status(
        &mut c,
        "POST",
        "/vms",
        Some(json!({"owner_uuid": OWNER, "server_uuid": S4, "networks": [{"uuid": net_uuid}]})),
    )
    .await;
    assert_eq!(
        (st, field_of(&e)),
        (422, vec!["server_uuid".to_string()]),
        "{e}"
    );
    let (st, e) = status(&mut c, "POST", "/vms", Some(json!({"owner_uuid": OWNER}))).await;
    assert_eq!(
        (st, field_of(&e)),
        (422, vec!["networks".to_string()]),
        "{e}"
    );
    assert_eq!(count(&mut c, "/nics").await, nics_before);
    assert_eq!(count(&mut c, "/vms").await, vms_before);
    assert!(ip_free(&mut c, &net_uuid, "10.10.0.6").await);

    // Placement: OTHER's 3 VMs all on S1 do not stop OWNER's spreading 2/2/2 (web on S1
    // counts); every VM is on a live server.
    for _ in 0..3 {
        ok(
            &mut c,
            "POST",
            "/vms",
            Some(
                json!({"owner_uuid": OTHER, "server_uuid": S1, "tags": {"role": "db"},
                        "networks": [{"uuid": onet_uuid}]}),
            ),
        )
        .await;
    }
    for i in 0..5 {
        let v = ok(
            &mut c,
            "POST",
            "/vms",
            Some(json!({"owner_uuid": OWNER, "alias": format!("w{i}"),
                        "tags": {"role": if i == 0 { "db" } else { "web" }},
                        "networks": [{"uuid": net_uuid}]})),
        )
        .await;
        assert_eq!(v["nics"][0]["network_uuid"], net_uuid.as_str());
    }
    for s in [S1, S2, S3] {
        let n = count(&mut c, &format!("/vms?owner_uuid={OWNER}&server_uuid={s}")).await;
        assert_eq!(n, 2, "owner's VMs on {s}");
        // Each NIC's cn_uuid is its VM's server.
        for v in ok(
            &mut c,
            "GET",
            &format!("/vms?owner_uuid={OWNER}&server_uuid={s}"),
            None,
        )
        .await
        .as_array()
        .unwrap()
        {
            let nics = ok(
                &mut c,
                "GET",
                &format!("/nics?belongs_to_uuid={}", v["uuid"].as_str().unwrap()),
                None,
            )
            .await;
            assert_eq!(nics[0]["cn_uuid"], s);
        }
    }
    assert_eq!(
        ok(&mut c, "GET", &format!("/servers/{S1}"), None).await["vms"],
        5
    );

    // Update: tags replaced, firewall flag.
    let v = ok(
        &mut c,
        "POST",
        &format!("/vms/{WEB}?action=update"),
        Some(json!({"tags": {"role": "web", "env": "prod"}, "firewall_enabled": false})),
    )
    .await;
    assert_eq!(v["tags"], json!({"role": "web", "env": "prod"}));
    assert_eq!(v["firewall_enabled"], false);
    let v = ok(&mut c, "POST", &format!("/vms/{WEB}?action=stop"), None).await;
    assert_eq!(v["desired_state"], "stopped");
    let v = ok(&mut c, "POST", &format!("/vms/{WEB}?action=start"), None).await;
    assert_eq!(v["desired_state"], "running");
    let (st, e) = status(
        &mut c,
        "POST",
        &format!("/vms/{WEB}?action=reprovision"),
        None,
    )
    .await;
    assert_eq!((st, field_of(&e)), (422, vec!["action".to_string()]), "{e}");

    // Migrate S1 → S2: the mapping moves; every host on the VNI gets VL2 + VL3 shootdowns.
    let ev_before = count(&mut c, &format!("/portolan/events?cn_uuid={S3}")).await;
    let v = ok(
        &mut c,
        "POST",
        &format!("/vms/{WEB}?action=migrate"),
        Some(json!({"server_uuid": S2})),
    )
    .await;
    assert_eq!(v["server_uuid"], S2);
    assert_eq!(v["state"], "provisioning");
    assert_eq!(v["nics"][0]["mac"], mac.as_str());
    let nic = ok(&mut c, "GET", &format!("/nics/{mac}"), None).await;
    assert_eq!(nic["cn_uuid"], S2);
    let m = mapping(&mut c, vnet, "10.10.0.5").await;
    assert_eq!(
        (m["cn_uuid"].as_str(), m["deleted"].as_bool()),
        (Some(S2), Some(false))
    );
    for s in [S1, S2, S3] {
        let ev = ok(
            &mut c,
            "GET",
            &format!("/portolan/events?cn_uuid={s}"),
            None,
        )
        .await;
        let ev = ev.as_array().unwrap();
        assert!(ev.iter().any(|e| e["record"]["type"] == "SVP_LOG_VL2" && e["record"]["mac"] == mac.as_str()), "{s}: {ev:?}");
        assert!(
            ev.iter()
                .any(|e| e["record"]["type"] == "SVP_LOG_VL3" && e["record"]["ip"] == "10.10.0.5"),
            "{s}: {ev:?}"
        );
    }
    assert!(count(&mut c, &format!("/portolan/events?cn_uuid={S3}")).await >= ev_before + 2);

    // State reports: the new server's count, the old server's is stale.
    let r = ok(
        &mut c,
        "POST",
        &format!("/servers/{S2}/vm_states"),
        Some(json!({"vms": [{"uuid": WEB, "state": "running"}]})),
    )
    .await;
    assert_eq!(r, json!({"updated": 1, "ignored": []}));
    let r = ok(
        &mut c,
        "POST",
        &format!("/servers/{S1}/vm_states"),
        Some(json!({"vms": [{"uuid": WEB, "state": "failed", "reason": "namespace gone"}]})),
    )
    .await;
    assert_eq!(r, json!({"updated": 0, "ignored": [WEB]}));
    let r = ok(
        &mut c,
        "POST",
        &format!("/servers/{S2}/vm_states"),
        Some(json!({"vms": [{"uuid": WEB, "state": "running"}]})),
    )
    .await;
    assert_eq!(
        r,
        json!({"updated": 0, "ignored": []}),
        "no change, no write"
    );
    assert_eq!(
        ok(&mut c, "GET", &format!("/vms/{WEB}"), None).await["state"],
        "running"
    );
    let (st, _) = status(
        &mut c,
        "POST",
        &format!("/servers/{S4}/vm_states"),
        Some(json!({"vms": []})),
    )
    .await;
    assert_eq!(st, 404);
    let (st, e) = status(
        &mut c,
        "POST",
        &format!("/servers/{S2}/vm_states"),
        Some(json!({"vms": [{"uuid": WEB, "state": "exploded"}]})),
    )
    .await;
    assert_eq!((st, field_of(&e)), (422, vec!["vms[0].state".to_string()]));

    // The desired snapshot of S2: its VMs only; the firewall closure holds OWNER's VMs on
    // every server and OWNER's rules, but nothing of OTHER's while no global rule names VMs.
    let tag_rule = ok(
        &mut c,
        "POST",
        "/rules",
        Some(json!({"owner_uuid": OWNER, "enabled": true,
                    "rule": "FROM tag role = web TO tag role = db ALLOW tcp PORT 5432"})),
    )
    .await;
    let other_rule = ok(
        &mut c,
        "POST",
        "/rules",
        Some(json!({"owner_uuid": OTHER, "enabled": true,
                    "rule": "FROM any TO tag role = db ALLOW tcp PORT 5432"})),
    )
    .await;
    let d = ok(&mut c, "GET", &format!("/servers/{S2}/desired"), None).await;
    assert_eq!(d["server"]["uuid"], S2);
    assert_eq!(d["portolan"], ADVERTISE);
    assert!(d["seq"].as_i64().unwrap() > 0, "{}", d["seq"]);
    let local: BTreeSet<String> = d["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            assert_eq!(v["server_uuid"], S2);
            v["uuid"].as_str().unwrap().to_string()
        })
        .collect();
    let on_s2: BTreeSet<String> = ok(&mut c, "GET", &format!("/vms?server_uuid={S2}"), None)
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["uuid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(local, on_s2);
    assert!(local.contains(WEB));
    let fw: FirewallState = serde_json::from_value(d["firewall"].clone()).unwrap();
    let owner_vms: BTreeSet<String> = ok(&mut c, "GET", &format!("/vms?owner_uuid={OWNER}"), None)
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["uuid"].as_str().unwrap().to_string())
        .collect();
    let fw_vms: BTreeSet<String> = fw.vms.iter().map(|v| v.uuid.clone()).collect();
    assert_eq!(
        fw_vms, owner_vms,
        "same-owner VMs on every server, nobody else's"
    );
    let fw_rules: Vec<&str> = fw.rules.iter().map(|r| r.uuid.as_str()).collect();
    assert_eq!(fw_rules, vec![tag_rule["uuid"].as_str().unwrap()]);
    let web = fw.vms.iter().find(|v| v.uuid == WEB).unwrap();
    assert_eq!(web.owner_uuid, OWNER);
    assert_eq!(web.tags.get("role").map(String::as_str), Some("web"));
    assert!(!web.firewall_enabled);
    assert_eq!(
        serde_json::to_value(&web.ips).unwrap(),
        json!([{"vni": vnet, "ip": "10.10.0.5"}])
    );
    // S1 holds OTHER's VMs too: its rules and VMs are in S1's closure.
    let d1 = ok(&mut c, "GET", &format!("/servers/{S1}/desired"), None).await;
    let fw1: FirewallState = serde_json::from_value(d1["firewall"].clone()).unwrap();
    assert_eq!(fw1.rules.len(), 2);
    assert_eq!(
        fw1.vms.len(),
        9,
        "{:?}",
        fw1.vms.iter().map(|v| &v.uuid).collect::<Vec<_>>()
    );
    // A global rule naming VMs widens every closure to every VM.
    ok(
        &mut c,
        "POST",
        "/rules",
        Some(json!({"global": true, "enabled": true,
                    "rule": "FROM any TO all vms ALLOW icmp TYPE 8 CODE 0"})),
    )
    .await;
    let d = ok(&mut c, "GET", &format!("/servers/{S2}/desired"), None).await;
    let fw: FirewallState = serde_json::from_value(d["firewall"].clone()).unwrap();
    assert_eq!(fw.vms.len(), 9);
    assert_eq!(fw.rules.len(), 2, "OWNER's rule and the global one");
    assert!(fw
        .rules
        .iter()
        .all(|r| r.uuid != other_rule["uuid"].as_str().unwrap()));

    // Delete: NIC gone, IP free, mapping tombstoned, VM kept as destroyed.
    let (st, _) = status(&mut c, "DELETE", &format!("/vms/{WEB}"), None).await;
    assert_eq!(st, 204);
    let v = ok(&mut c, "GET", &format!("/vms/{WEB}"), None).await;
    assert_eq!(v["state"], "destroyed");
    assert!(v["destroyed"].as_str().is_some());
    assert_eq!(v["nics"], json!([]));
    assert_eq!(
        count(&mut c, &format!("/nics?belongs_to_uuid={WEB}")).await,
        0
    );
    assert!(ip_free(&mut c, &net_uuid, "10.10.0.5").await);
    let m = mapping(&mut c, vnet, "10.10.0.5").await;
    assert_eq!(m["deleted"], true);
    let listed = |v: &Value| v.as_array().unwrap().iter().any(|x| x["uuid"] == WEB);
    assert!(!listed(
        &ok(&mut c, "GET", &format!("/vms?owner_uuid={OWNER}"), None).await
    ));
    assert!(listed(
        &ok(&mut c, "GET", "/vms?state=destroyed", None).await
    ));
    let (st, _) = status(&mut c, "DELETE", &format!("/vms/{WEB}"), None).await;
    assert_eq!(st, 404);
    let (st, _) = status(&mut c, "POST", &format!("/vms/{WEB}?action=start"), None).await;
    assert_eq!(st, 409);
    let r = ok(
        &mut c,
        "POST",
        &format!("/servers/{S2}/vm_states"),
        Some(json!({"vms": [{"uuid": WEB, "state": "running"}]})),
    )
    .await;
    assert_eq!(r["ignored"], json!([WEB]), "a destroyed VM takes no report");
    // Its IP and alias are reusable.
    let again = ok(
        &mut c,
        "POST",
        "/vms",
        Some(
            json!({"owner_uuid": OWNER, "alias": "web", "server_uuid": S3,
                    "networks": [{"uuid": net_uuid, "ip": "10.10.0.5"}]}),
        ),
    )
    .await;
    assert_eq!(again["nics"][0]["ip"], "10.10.0.5");
    let d = ok(&mut c, "GET", &format!("/servers/{S2}/desired"), None).await;
    assert!(d["vms"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["uuid"] != WEB));

    // The store's counts on /metrics.
    let m = c.request("GET", "/metrics", None, b"").await.unwrap();
    let text = String::from_utf8_lossy(&m.body).to_string();
    assert!(text.contains("\nfabric_control_vms 9\n"), "{text}");
    assert!(text.contains("\nfabric_control_servers 3\n"), "{text}");

    // Every write recorded its change, with the servers concerned.
    let ch = svc.changes().await;
    let vm_actions: Vec<(&str, &str)> = ch
        .iter()
        .filter(|c| c.0 == "vm")
        .map(|c| (c.1.as_str(), c.2.as_str()))
        .collect();
    assert!(
        vm_actions.contains(&("migrate", &format!("{S1},{S2}"))),
        "{vm_actions:?}"
    );
    assert!(vm_actions.contains(&("state", S2)), "{vm_actions:?}");
    assert!(vm_actions.contains(&("delete", S2)), "{vm_actions:?}");
    assert_eq!(vm_actions.iter().filter(|a| a.0 == "create").count(), 10);
    assert_eq!(vm_actions.iter().filter(|a| a.0 == "state").count(), 1);
    let servers: Vec<&str> = ch
        .iter()
        .filter(|c| c.0 == "server")
        .map(|c| c.1.as_str())
        .collect();
    assert_eq!(servers, vec!["create", "create", "create", "update"]);
    svc.stop().await;
}

/// With a 1 s heartbeat lifetime: silent servers are never placed on, and their VMs read
/// `unknown` until they heartbeat again.
async fn silence(url: &str) {
    let cfg = Config {
        heartbeat_lifetime: Duration::from_secs(1),
        ..Config::default()
    };
    let svc = Svc::start(url, cfg).await;
    let mut c = HttpClient::new(svc.addr);
    register(&mut c, S1, "192.168.78.1").await;
    register(&mut c, S2, "192.168.78.2").await;
    register(&mut c, S3, "192.168.78.3").await;
    let net = fabric_net(&mut c, OWNER, 10, "10.10.0.0/24", "10.10.0.1").await;
    let net_uuid = net["uuid"].as_str().unwrap().to_string();
    let vm = ok(
        &mut c,
        "POST",
        "/vms",
        Some(json!({"owner_uuid": OWNER, "server_uuid": S3, "networks": [net_uuid]})),
    )
    .await;
    let vm_uuid = vm["uuid"].as_str().unwrap().to_string();
    ok(
        &mut c,
        "POST",
        &format!("/servers/{S3}/vm_states"),
        Some(json!({"vms": [{"uuid": vm_uuid, "state": "running"}]})),
    )
    .await;
    assert_eq!(
        ok(&mut c, "GET", &format!("/vms/{vm_uuid}"), None).await["state"],
        "running"
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // S3 is silent: its VM reads unknown (listed as such), the server too.
    assert_eq!(
        ok(&mut c, "GET", &format!("/vms/{vm_uuid}"), None).await["state"],
        "unknown"
    );
    assert_eq!(count(&mut c, "/vms?state=unknown").await, 1);
    assert_eq!(count(&mut c, "/vms?state=running").await, 0);
    assert_eq!(
        ok(&mut c, "GET", &format!("/servers/{S3}"), None).await["status"],
        "unknown"
    );
    // Nobody is live: a clear refusal, and nothing is created.
    let (st, e) = status(
        &mut c,
        "POST",
        "/vms",
        Some(json!({"owner_uuid": OWNER, "networks": [net_uuid]})),
    )
    .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["code"], "InsufficientCapacity");
    assert!(e["message"].as_str().unwrap().contains("heartbeat"), "{e}");
    assert_eq!(count(&mut c, "/vms").await, 1);
    // S1 and S2 beat (again before each create, so a slow machine cannot age them): four VMs
    // go to them, 2/2, none to silent S3.
    for _ in 0..4 {
        for s in [S1, S2] {
            let (st, _) = status(&mut c, "POST", &format!("/servers/{s}/heartbeat"), None).await;
            assert_eq!(st, 204);
        }
        let v = ok(
            &mut c,
            "POST",
            "/vms",
            Some(json!({"owner_uuid": OWNER, "networks": [net_uuid]})),
        )
        .await;
        assert_ne!(v["server_uuid"], S3);
    }
    assert_eq!(count(&mut c, &format!("/vms?server_uuid={S1}")).await, 2);
    assert_eq!(count(&mut c, &format!("/vms?server_uuid={S2}")).await, 2);
    // S3 beats again: its VM reads its stored state.
    let (st, _) = status(&mut c, "POST", &format!("/servers/{S3}/heartbeat"), None).await;
    assert_eq!(st, 204);
    assert_eq!(
        ok(&mut c, "GET", &format!("/vms/{vm_uuid}"), None).await["state"],
        "running"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_and_servers_on_sqlite() {
    let db = TempDb::new("vms-it");
    scenario(&db.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_servers_on_sqlite() {
    let db = TempDb::new("vms-it");
    silence(&db.url()).await;
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
async fn vms_and_servers_on_postgres() {
    let Some(db) = pg_db().await else {
        return;
    };
    scenario(&db.url).await;
    drop_pg(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_servers_on_postgres() {
    let Some(db) = pg_db().await else {
        return;
    };
    silence(&db.url).await;
    drop_pg(db).await;
}

/// Concurrent creates of one owner on PostgreSQL (two services, one database) still spread:
/// placement runs under the owner's lock, so each create sees the others' VMs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_placement_on_postgres() {
    let Some(db) = pg_db().await else {
        return;
    };
    let a = Svc::start(&db.url, Config::default()).await;
    let b = Svc::start(&db.url, Config::default()).await;
    let mut c = HttpClient::new(a.addr);
    register(&mut c, S1, "192.168.78.1").await;
    register(&mut c, S2, "192.168.78.2").await;
    let net = fabric_net(&mut c, OWNER, 10, "10.10.0.0/24", "10.10.0.1").await;
    let net_uuid = net["uuid"].as_str().unwrap().to_string();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let n = net_uuid.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = HttpClient::new(addr);
            ok(
                &mut c,
                "POST",
                "/vms",
                Some(json!({"owner_uuid": OWNER, "networks": [{"uuid": n}]})),
            )
            .await
        }));
    }
    let mut ips = BTreeSet::new();
    for t in tasks {
        let v = t.await.unwrap();
        assert!(ips.insert(v["nics"][0]["ip"].as_str().unwrap().to_string()));
    }
    assert_eq!(count(&mut c, &format!("/vms?server_uuid={S1}")).await, 4);
    assert_eq!(count(&mut c, &format!("/vms?server_uuid={S2}")).await, 4);
    a.stop().await;
    b.stop().await;
    drop_pg(db).await;
}
