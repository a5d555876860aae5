//! The shared store: two control-plane services over one PostgreSQL database provision NICs on
//! the same fabric network concurrently (no address handed out twice, every NIC with its
//! mapping), and a Portolan server over the same database answers for them over SVP.
//! Needs PORTOLAN_TEST_PG (scripts/setup.d/20-postgres.sh); without it the test skips, except
//! under CI=true where it fails.

use std::collections::BTreeSet;

use fabric::control::client::HttpClient;
use portolan::client::{Client, ClientConfig};
use portolan::server::{Server, ServerConfig};
use serde_json::{json, Value};

const OWNER: &str = "930896af-bf8c-48d4-885c-6573a94b1853";

#[path = "util/pg_service.rs"]
mod pg_service;
use pg_service::TwoServices;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_share_one_postgres_database() {
    let Some(svcs) = TwoServices::start().await else {
        return;
    };
    let (a, b) = (svcs.a, svcs.b);
    let mut c = HttpClient::new(a);
    // Underlay for two hosts, then a fabric network.
    let ok = |r: fabric::control::client::HttpResponse| {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    };
    ok(
        c.json("POST", "/nic_tags", Some(&json!({"name": "sdc_underlay"})))
            .await
            .unwrap(),
    );
    let under = ok(c
        .json("POST", "/networks", Some(&json!({"name": "u", "nic_tag": "sdc_underlay", "vlan_id": 0, "subnet": "127.0.20.0/24"})))
        .await
        .unwrap());
    let mut underlay = Vec::new();
    for cn in [
        "564d1a4c-0000-4000-8000-000000000001",
        "564d1a4c-0000-4000-8000-000000000002",
    ] {
        let n = ok(c
            .json(
                "POST",
                &format!("/networks/{}/nics", under["uuid"].as_str().unwrap()),
                Some(&json!({"owner_uuid": OWNER, "belongs_to_type": "server", "belongs_to_uuid": cn, "underlay": true})),
            )
            .await
            .unwrap());
        underlay.push(
            n["ip"]
                .as_str()
                .unwrap()
                .parse::<std::net::IpAddr>()
                .unwrap(),
        );
    }
    ok(c.json(
        "POST",
        &format!("/fabrics/{OWNER}/vlans"),
        Some(&json!({"vlan_id": 2})),
    )
    .await
    .unwrap());
    let net = ok(c
        .json(
            "POST",
            &format!("/fabrics/{OWNER}/vlans/2/networks"),
            Some(&json!({"name": "pg", "subnet": "10.66.0.0/24"})),
        )
        .await
        .unwrap());
    let nu = net["uuid"].as_str().unwrap().to_string();
    let vnet = net["vnet_id"].as_u64().unwrap() as u32;

    // 4 clients on each service, 15 NICs each, all on the same network.
    let mut tasks = Vec::new();
    for w in 0..8usize {
        let addr = if w % 2 == 0 { a } else { b };
        let path = format!("/networks/{nu}/nics");
        tasks.push(tokio::spawn(async move {
            let mut c = HttpClient::new(addr);
            let mut got = Vec::new();
            for i in 0..15usize {
                let body = json!({"owner_uuid": OWNER, "belongs_to_type": "zone",
                    "belongs_to_uuid": format!("00000000-0000-4000-8000-{w:06x}{i:06x}"),
                    "cn_uuid": format!("564d1a4c-0000-4000-8000-00000000000{}", 1 + i % 2)});
                let r = c.json("POST", &path, Some(&body)).await.unwrap();
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                got.push(r.json());
            }
            got
        }));
    }
    let mut nics: Vec<Value> = Vec::new();
    for t in tasks {
        nics.extend(t.await.unwrap());
    }
    assert_eq!(nics.len(), 120);
    let ips: BTreeSet<&str> = nics.iter().map(|n| n["ip"].as_str().unwrap()).collect();
    assert_eq!(ips.len(), 120, "an address was handed out twice");
    // Lowest first: exactly .1 .. .120 (no gateway on this network).
    for i in 1..=120 {
        assert!(
            ips.contains(format!("10.66.0.{i}").as_str()),
            "10.66.0.{i} skipped"
        );
    }
    let maps = ok(c
        .json("GET", &format!("/portolan/mappings?vnet_id={vnet}"), None)
        .await
        .unwrap());
    assert_eq!(maps.as_array().unwrap().len(), 120);

    // Portolan over the same database answers for NICs written through either service.
    let server = Server::bind(
        ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        },
        svcs.stores[1].clone(),
    )
    .await
    .unwrap();
    let paddr = server.local_addr().unwrap();
    let (stop_p, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let svp = Client::new(ClientConfig::new(paddr));
    for n in nics.iter().step_by(17) {
        let ip: std::net::IpAddr = n["ip"].as_str().unwrap().parse().unwrap();
        let hit = svp.vl3(ip, vnet).await.unwrap().expect("VL3 hit");
        assert_eq!(hit.mac, n["mac"].as_str().unwrap().parse().unwrap());
        let host = if n["cn_uuid"].as_str().unwrap().ends_with('1') {
            0
        } else {
            1
        };
        assert_eq!(hit.underlay_ip, underlay[host]);
    }
    let _ = stop_p.send(());
    let _ = task.await;
    svcs.stop().await;
}
