//! The control plane's write transactions under concurrency on a real PostgreSQL: two
//! `fabric control` services over one database, and rounds of racing requests:
//! (a) 8 concurrent `PUT /nics/:mac {ip}` then `DELETE`, (b) a `PUT {ip}` racing a `DELETE`,
//! (c) a NIC provision racing the delete of its network, (d) 4 `PUT`s with one `If-Match`
//! etag (exactly one may apply). After every round the invariants are
//! checked directly in the database: one IP record per held address and it is the NIC's, no IP
//! held by a missing NIC, no NIC on a missing network, no IP records of a missing network,
//! Portolan's live overlay mappings exactly the live fabric NICs, and DELETE 204 ⇒ GET 404 (for
//! every MAC ever deleted, at the end of every round).
//!
//! Needs PORTOLAN_TEST_PG (scripts/setup.d/20-postgres.sh); without it the test skips, except
//! under CI=true where it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use fabric::control::client::{HttpClient, HttpResponse};
use serde_json::{json, Value};

const OWNER: &str = "930896af-bf8c-48d4-885c-6573a94b1853";
const CN1: &str = "564d1a4c-0000-4000-8000-000000000001";
const CN2: &str = "564d1a4c-0000-4000-8000-000000000002";
/// Rounds of each kind (bounded: the whole test takes seconds).
const ROUNDS: usize = 10;

#[path = "util/pg_service.rs"]
mod pg_service;
use pg_service::TwoServices;

/// One request on a fresh connection (so concurrent requests really are concurrent).
async fn req(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> HttpResponse {
    HttpClient::new(addr)
        .json(method, path, body.as_ref())
        .await
        .unwrap()
}

async fn ok(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let r = req(addr, method, path, body).await;
    assert_eq!(
        r.status,
        200,
        "{method} {path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// A NIC row: network_uuid, ip, belongs_to_uuid, cn_uuid.
type NicRow = (Option<String>, Option<i64>, String, Option<String>);

/// What the database holds, read in one snapshot.
struct State {
    /// mac → its row
    nics: BTreeMap<i64, NicRow>,
    /// (network_uuid, ip) → (belongs_to_type, belongs_to_uuid)
    ips: BTreeMap<(String, i64), (Option<String>, Option<String>)>,
    /// uuid → (fabric, vnet_id)
    networks: BTreeMap<String, (bool, Option<i64>)>,
    /// live overlay mappings: (vnet_id, ip) → mac
    mappings: BTreeMap<(i64, u32), i64>,
}

fn read_state(url: &str) -> State {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let mut tx = c
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .unwrap();
    let nics = tx
        .query(
            "SELECT mac, network_uuid, ip, belongs_to_uuid, cn_uuid FROM napi_nics",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
        .collect();
    let ips = tx
        .query(
            "SELECT network_uuid, ip, belongs_to_type, belongs_to_uuid FROM napi_ips",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();
    let networks = tx
        .query("SELECT uuid, fabric, vnet_id FROM napi_networks", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get::<_, i64>(1) != 0, r.get(2))))
        .collect();
    let mappings = tx
        .query(
            "SELECT vnet_id, ip, mac FROM portolan_overlay WHERE NOT deleted",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let ip: Vec<u8> = r.get(1);
            let v4 = u32::from_be_bytes(ip[12..16].try_into().unwrap());
            ((r.get(0), v4), r.get(2))
        })
        .collect();
    tx.commit().unwrap();
    State {
        nics,
        ips,
        networks,
        mappings,
    }
}

/// Every invariant violation the database shows now.
fn violations(s: &State, deleted_macs: &BTreeSet<i64>) -> Vec<String> {
    let mut out = Vec::new();
    let mut held: BTreeMap<(String, i64), Vec<i64>> = BTreeMap::new();
    let mut want_maps: BTreeMap<(i64, u32), i64> = BTreeMap::new();
    for (mac, (net, ip, btu, cn)) in &s.nics {
        if deleted_macs.contains(mac) {
            out.push(format!(
                "NIC {mac:x} answered DELETE 204 but is in napi_nics"
            ));
        }
        let (Some(net), Some(ip)) = (net, ip) else {
            continue;
        };
        held.entry((net.clone(), *ip)).or_default().push(*mac);
        match s.networks.get(net) {
            None => out.push(format!("NIC {mac:x} is on missing network {net}")),
            Some((true, Some(vnet))) if cn.is_some() => {
                want_maps.insert((*vnet, *ip as u32), *mac);
            }
            Some(_) => {}
        }
        match s.ips.get(&(net.clone(), *ip)) {
            Some((_, Some(b))) if b == btu => {}
            other => out.push(format!(
                "NIC {mac:x} holds {} but its IP record is {other:?}",
                Ipv4Addr::from(*ip as u32)
            )),
        }
    }
    for ((net, ip), macs) in &held {
        if macs.len() > 1 {
            out.push(format!(
                "{} on {net} held by {} NICs",
                Ipv4Addr::from(*ip as u32),
                macs.len()
            ));
        }
    }
    for ((net, ip), (btt, btu)) in &s.ips {
        if !s.networks.contains_key(net) {
            out.push(format!(
                "IP record {} of missing network {net}",
                Ipv4Addr::from(*ip as u32)
            ));
            continue;
        }
        let nic_type = matches!(btt.as_deref(), Some("zone") | Some("server"));
        if nic_type && btu.is_some() && !held.contains_key(&(net.clone(), *ip)) {
            out.push(format!(
                "IP {} on {net} held by {btu:?} but no NIC has it",
                Ipv4Addr::from(*ip as u32)
            ));
        }
    }
    for (k, mac) in &s.mappings {
        if want_maps.get(k) != Some(mac) {
            out.push(format!(
                "live mapping {} on vnet {} → {mac:x} has no such NIC",
                Ipv4Addr::from(k.1),
                k.0
            ));
        }
    }
    for (k, mac) in &want_maps {
        if s.mappings.get(k) != Some(mac) {
            out.push(format!(
                "NIC {mac:x} ({} on vnet {}) has no live mapping",
                Ipv4Addr::from(k.1),
                k.0
            ));
        }
    }
    out
}

/// Reads the database and records every violation (by kind, digits stripped) in `found`.
async fn check(
    url: &str,
    deleted: &BTreeSet<i64>,
    found: &mut BTreeMap<String, usize>,
    round: String,
) {
    let (url, deleted) = (url.to_string(), deleted.clone());
    let v = tokio::task::spawn_blocking(move || violations(&read_state(&url), &deleted))
        .await
        .unwrap();
    for x in v {
        eprintln!("{round}: {x}");
        let kind: String = x
            .split_whitespace()
            .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
            .collect::<Vec<_>>()
            .join(" ");
        *found.entry(kind).or_default() += 1;
    }
}

fn mac_of(nic: &Value) -> i64 {
    let s = nic["mac"].as_str().unwrap().replace(':', "");
    i64::from_str_radix(&s, 16).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writes_keep_the_invariants_on_postgres() {
    let Some(svcs) = TwoServices::start().await else {
        return;
    };
    let (a, b) = (svcs.a, svcs.b);
    // The rounds run in their own task so that a panic still stops the services and drops the
    // database off the async runtime below.
    let rounds = tokio::spawn(run_rounds(a, b, svcs.db.url.clone())).await;
    svcs.stop().await;
    match rounds {
        Err(e) => std::panic::resume_unwind(e.into_panic()),
        Ok(found) => assert!(found.is_empty(), "invariants violated: {found:?}"),
    }
}

/// The racing rounds; returns the violations found, by kind.
async fn run_rounds(a: SocketAddr, b: SocketAddr, url: String) -> BTreeMap<String, usize> {
    let addrs = [a, b];
    let started = Instant::now();

    ok(
        a,
        "POST",
        &format!("/fabrics/{OWNER}/vlans"),
        Some(json!({"vlan_id": 2})),
    )
    .await;
    let net = ok(
        a,
        "POST",
        &format!("/fabrics/{OWNER}/vlans/2/networks"),
        Some(json!({"name": "conc", "subnet": "10.77.0.0/24"})),
    )
    .await;
    let nu = net["uuid"].as_str().unwrap().to_string();

    let mut found: BTreeMap<String, usize> = BTreeMap::new();
    let mut deleted_macs: BTreeSet<i64> = BTreeSet::new();
    let mut both_ok = 0usize;
    let mut outcomes_c: BTreeMap<(u16, u16), usize> = BTreeMap::new();
    let mut resurrected: BTreeSet<i64> = BTreeSet::new();
    let new_nic = |i: usize| {
        json!({"owner_uuid": OWNER, "belongs_to_type": "zone",
               "belongs_to_uuid": format!("00000000-0000-4000-8000-{i:012x}"),
               "cn_uuid": if i.is_multiple_of(2) { CN1 } else { CN2 }})
    };

    for round in 0..ROUNDS {
        // (a) 8 concurrent renumberings of one NIC, then DELETE.
        let nic = ok(
            a,
            "POST",
            &format!("/networks/{nu}/nics"),
            Some(new_nic(round)),
        )
        .await;
        let mac = nic["mac"].as_str().unwrap().to_string();
        let mut tasks = Vec::new();
        for k in 0..8usize {
            let (addr, path) = (addrs[k % 2], format!("/nics/{mac}"));
            let ip = format!("10.77.0.{}", 100 + k);
            tasks.push(tokio::spawn(async move {
                req(addr, "PUT", &path, Some(json!({"ip": ip})))
                    .await
                    .status
            }));
        }
        for t in tasks {
            let s = t.await.unwrap();
            assert!(s == 200 || s == 422, "PUT answered {s}");
        }
        let r = req(b, "DELETE", &format!("/nics/{mac}"), None).await;
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        deleted_macs.insert(mac_of(&nic));
        check(
            &url,
            &deleted_macs,
            &mut found,
            format!("(a) round {round}"),
        )
        .await;

        // (b) a renumbering racing a delete.
        let nic = ok(
            b,
            "POST",
            &format!("/networks/{nu}/nics"),
            Some(new_nic(100 + round)),
        )
        .await;
        let mac = nic["mac"].as_str().unwrap().to_string();
        let path = format!("/nics/{mac}");
        let (p2, p3) = (path.clone(), path.clone());
        let put = tokio::spawn(async move {
            req(a, "PUT", &p2, Some(json!({"ip": "10.77.0.200"})))
                .await
                .status
        });
        let del = tokio::spawn(async move { req(b, "DELETE", &p3, None).await.status });
        let (put, del) = (put.await.unwrap(), del.await.unwrap());
        assert!(
            matches!(put, 200 | 404 | 422),
            "PUT racing DELETE answered {put}"
        );
        if del == 204 {
            deleted_macs.insert(mac_of(&nic));
            let g = req(a, "GET", &path, None).await.status;
            if g != 404 {
                eprintln!("(b) round {round}: DELETE said 204, then GET said {g}");
                *found.entry("resurrected after DELETE".into()).or_default() += 1;
            }
        } else {
            assert_eq!(del, 404, "DELETE answered {del}");
        }
        check(
            &url,
            &deleted_macs,
            &mut found,
            format!("(b) round {round}"),
        )
        .await;

        // (c) a provision racing the delete of its network.
        let subnet = format!("10.78.{round}.0/24");
        let n2 = ok(
            a,
            "POST",
            &format!("/fabrics/{OWNER}/vlans/2/networks"),
            Some(json!({"name": format!("doomed-{round}"), "subnet": subnet})),
        )
        .await;
        let n2u = n2["uuid"].as_str().unwrap().to_string();
        let (pp, dp) = (format!("/networks/{n2u}/nics"), format!("/networks/{n2u}"));
        let body = new_nic(200 + round);
        let prov = tokio::spawn(async move { req(b, "POST", &pp, Some(body)).await });
        let del = tokio::spawn(async move { req(a, "DELETE", &dp, None).await.status });
        let (prov, del) = (prov.await.unwrap(), del.await.unwrap());
        *outcomes_c.entry((prov.status, del)).or_default() += 1;
        match (prov.status, del) {
            (200, 204) => {
                eprintln!("(c) round {round}: provision 200 and network delete 204");
                both_ok += 1;
            }
            (200, 422) | (404, 204) | (422, 204) => {}
            other => {
                eprintln!("(c) round {round}: provision and network delete answered {other:?}");
                *found.entry(format!("(c) answers {other:?}")).or_default() += 1;
            }
        }
        check(
            &url,
            &deleted_macs,
            &mut found,
            format!("(c) round {round}"),
        )
        .await;
        if prov.status == 200 {
            let r = req(
                b,
                "DELETE",
                &format!("/nics/{}", prov.json()["mac"].as_str().unwrap()),
                None,
            )
            .await;
            if r.status == 204 {
                deleted_macs.insert(mac_of(&prov.json()));
            }
            let _ = req(a, "DELETE", &format!("/networks/{n2u}"), None).await;
        }
        // (d) conditional updates racing: 4 PUTs with the same If-Match etag; exactly one
        // may apply, the others see the changed NIC (412).
        let nic = ok(
            a,
            "POST",
            &format!("/networks/{nu}/nics"),
            Some(new_nic(300 + round)),
        )
        .await;
        let mac = nic["mac"].as_str().unwrap().to_string();
        let g = req(b, "GET", &format!("/nics/{mac}"), None).await;
        let etag = g.header("etag").unwrap().to_string();
        let mut tasks = Vec::new();
        for k in 0..4usize {
            let (addr, path, etag) = (addrs[k % 2], format!("/nics/{mac}"), etag.clone());
            let body = json!({"ip": format!("10.77.0.{}", 150 + k)}).to_string();
            tasks.push(tokio::spawn(async move {
                let mut c = HttpClient::new(addr);
                let headers = [("content-type", "application/json"), ("if-match", &etag)];
                c.request_with("PUT", &path, &headers, body.as_bytes())
                    .await
                    .unwrap()
                    .status
            }));
        }
        let mut applied = 0;
        for t in tasks {
            match t.await.unwrap() {
                200 => applied += 1,
                412 => {}
                other => panic!("(d) round {round}: conditional PUT answered {other}"),
            }
        }
        if applied != 1 {
            eprintln!("(d) round {round}: {applied} of 4 PUTs with one If-Match applied");
            *found
                .entry("conditional PUTs applied on one etag (should be 1)".into())
                .or_default() += applied;
        }
        let r = req(b, "DELETE", &format!("/nics/{mac}"), None).await;
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        deleted_macs.insert(mac_of(&nic));
        check(
            &url,
            &deleted_macs,
            &mut found,
            format!("(d) round {round}"),
        )
        .await;

        // DELETE 204 ⇒ GET 404, for every MAC ever deleted.
        for m in &deleted_macs {
            let hex = format!("{m:012x}");
            let g = req(a, "GET", &format!("/nics/{hex}"), None).await.status;
            if g != 404 {
                resurrected.insert(*m);
            }
        }
    }
    if !resurrected.is_empty() {
        found.insert(
            "NICs answering GET after DELETE 204".into(),
            resurrected.len(),
        );
    }
    if both_ok > 0 {
        *found
            .entry("provision 200 and network delete 204".into())
            .or_default() += both_ok;
    }
    eprintln!(
        "{} rounds of each kind in {:?}; (c) answers (provision, delete): {outcomes_c:?}; \
         violations by kind: {found:?}",
        ROUNDS,
        started.elapsed()
    );
    found
}
