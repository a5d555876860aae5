//! Crash safety: the real `fabric control` binary is SIGKILLed in the middle of a burst of
//! concurrent provisions, restarted on the same SQLite file, and the store must hold no
//! duplicate IP, no NIC without its Portolan mapping and no mapping without its NIC.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric::control::client::HttpClient;
use serde_json::{json, Value};

const OWNER: &str = "930896af-bf8c-48d4-885c-6573a94b1853";

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn spawn(addr: SocketAddr, url: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["control", "--listen", &addr.to_string(), "--store", url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_up(addr: SocketAddr) {
    let t0 = Instant::now();
    loop {
        let mut c = HttpClient::new(addr);
        if let Ok(r) = c.json("GET", "/ping", None).await {
            if r.status == 200 {
                return;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "fabric control did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_provisions_leaves_a_consistent_store() {
    let path = std::env::temp_dir().join(format!("fabric-control-crash-{}.db", std::process::id()));
    let url = format!("sqlite:{}", path.display());
    let addr = free_port();
    let mut child = spawn(addr, &url);
    wait_up(addr).await;
    let mut c = HttpClient::new(addr);
    let r = c
        .json(
            "POST",
            &format!("/fabrics/{OWNER}/vlans"),
            Some(&json!({"vlan_id": 3})),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = c
        .json(
            "POST",
            &format!("/fabrics/{OWNER}/vlans/3/networks"),
            Some(&json!({"name": "c", "subnet": "10.9.0.0/16"})),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let net = r.json()["uuid"].as_str().unwrap().to_string();
    let vnet = r.json()["vnet_id"].as_u64().unwrap();

    // A burst of concurrent provisions; kill the service once some have committed.
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let done = done.clone();
        let path = format!("/networks/{net}/nics");
        tasks.push(tokio::spawn(async move {
            let mut c = HttpClient::new(addr);
            for i in 0..400 {
                let body = json!({"owner_uuid": OWNER, "belongs_to_type": "zone",
                    "belongs_to_uuid": format!("00000000-0000-4000-8000-{:06x}{:06x}", w, i),
                    "cn_uuid": format!("564d1a4c-0000-4000-8000-{:012x}", i % 4)});
                match c.json("POST", &path, Some(&body)).await {
                    Ok(r) if r.status == 200 => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => panic!(
                        "provision failed before the kill: {} {:?}",
                        r.status,
                        r.json()
                    ),
                    Err(_) => return,
                }
            }
        }));
    }
    let t0 = Instant::now();
    while done.load(Ordering::Relaxed) < 150 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "provisions too slow"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = done.load(Ordering::Relaxed);

    // Restart on the same file and check consistency through the API.
    let mut child = spawn(addr, &url);
    wait_up(addr).await;
    let mut c = HttpClient::new(addr);
    let mut nics: Vec<Value> = Vec::new();
    loop {
        let r = c
            .json(
                "GET",
                &format!("/nics?network_uuid={net}&limit=1000&offset={}", nics.len()),
                None,
            )
            .await
            .unwrap();
        let page = r.json().as_array().unwrap().clone();
        if page.is_empty() {
            break;
        }
        nics.extend(page);
    }
    assert!(
        nics.len() >= acked,
        "{} NICs stored, {acked} acknowledged",
        nics.len()
    );
    let mut ips: Vec<&str> = nics.iter().map(|n| n["ip"].as_str().unwrap()).collect();
    ips.sort();
    let before = ips.len();
    ips.dedup();
    assert_eq!(ips.len(), before, "duplicate IPs");
    let maps = c
        .json("GET", &format!("/portolan/mappings?vnet_id={vnet}"), None)
        .await
        .unwrap()
        .json();
    let live: Vec<&Value> = maps
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["deleted"] == false)
        .collect();
    assert_eq!(live.len(), nics.len(), "mappings vs NICs");
    for n in &nics {
        assert!(
            live.iter().any(|m| m["ip"] == n["ip"]
                && m["mac"] == n["mac"]
                && m["cn_uuid"] == n["cn_uuid"]),
            "NIC without its mapping: {n}"
        );
    }
    // IP records held by zones match NICs one to one.
    let ipr = c
        .json(
            "GET",
            &format!("/networks/{net}/ips?belongs_to_type=zone"),
            None,
        )
        .await
        .unwrap()
        .json();
    assert_eq!(ipr.as_array().unwrap().len(), nics.len());
    // And the restarted service provisions the next free address.
    let r = c
        .json("POST", &format!("/networks/{net}/nics"), Some(&json!({"owner_uuid": OWNER, "belongs_to_type": "zone",
            "belongs_to_uuid": "00000000-0000-4000-8000-ffffffffffff", "cn_uuid": "564d1a4c-0000-4000-8000-000000000001"})))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert!(!ips.contains(&r.json()["ip"].as_str().unwrap()));
    child.kill().unwrap();
    child.wait().unwrap();
    for s in ["", "-wal", "-shm"] {
        let mut p = path.clone().into_os_string();
        p.push(s);
        let _ = std::fs::remove_file(p);
    }
}
