//! The control plane over real HTTP: a `fabric control` service on 127.0.0.1:0 over a real
//! SQLite file; NAPI endpoints' success and error bodies, IPAM, pagination, MAC forms, Portolan
//! records written with NICs, and a Portolan server on the same store answering over SVP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fabric::control::client::{HttpClient, HttpResponse};
use fabric::control::{http, open_store, Config};
use portolan::client::{Client, ClientConfig};
use portolan::server::{Server, ServerConfig};
use portolan::store::Store;
use portolan::svp::LogRecord;
use serde_json::{json, Value};

const OWNER: &str = "930896af-bf8c-48d4-885c-6573a94b1853";
const OTHER: &str = "7b0c7a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
const CN1: &str = "564d1a4c-0000-4000-8000-000000000001";
const CN2: &str = "564d1a4c-0000-4000-8000-000000000002";
const VM1: &str = "11111111-0000-4000-8000-000000000001";
const VM2: &str = "11111111-0000-4000-8000-000000000002";

#[path = "util/temp_db.rs"]
mod temp_db;
use temp_db::TempDb;

struct Svc {
    addr: SocketAddr,
    store: Arc<dyn Store>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _db: TempDb,
}

impl Svc {
    async fn start() -> Svc {
        let db = TempDb::new("control-it");
        let cfg = Config::default();
        let store = open_store(&db.url(), &cfg).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(http::serve(listener, store.clone(), cfg, async move {
            let _ = rx.await;
        }));
        Svc {
            addr,
            store,
            stop: Some(tx),
            _db: db,
        }
    }
    fn client(&self) -> HttpClient {
        HttpClient::new(self.addr)
    }
}

impl Drop for Svc {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn call(c: &mut HttpClient, method: &str, path: &str, body: Option<Value>) -> HttpResponse {
    c.json(method, path, body.as_ref()).await.unwrap()
}

/// Asserts the status of one request, showing the body when it differs.
async fn expect_status(
    c: &mut HttpClient,
    method: &str,
    path: &str,
    body: Option<Value>,
    want: u16,
) {
    let r = call(c, method, path, body).await;
    assert_eq!(
        r.status,
        want,
        "{method} {path}: {}",
        String::from_utf8_lossy(&r.body)
    );
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

async fn fabric_net(
    c: &mut HttpClient,
    owner: &str,
    vlan: u16,
    subnet: &str,
    extra: Value,
) -> Value {
    let r = call(
        c,
        "POST",
        &format!("/fabrics/{owner}/vlans"),
        Some(json!({"vlan_id": vlan})),
    )
    .await;
    assert!(
        r.status == 200 || r.json()["code"] == "InUse",
        "{:?}",
        r.json()
    );
    let mut body = json!({"name": format!("net-{vlan}-{subnet}"), "subnet": subnet});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    ok(
        c,
        "POST",
        &format!("/fabrics/{owner}/vlans/{vlan}/networks"),
        Some(body),
    )
    .await
}

fn zone(vm: &str, cn: &str) -> Value {
    json!({"owner_uuid": OWNER, "belongs_to_type": "zone", "belongs_to_uuid": vm, "cn_uuid": cn})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_nic_tags_and_errors() {
    let s = Svc::start().await;
    let mut c = s.client();
    let p = ok(&mut c, "GET", "/ping", None).await;
    assert_eq!(p["status"], "OK");
    assert_eq!(p["healthy"], true);
    let head = c.request("HEAD", "/ping", None, b"").await.unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    // The overlay tag exists from the start.
    let tags = ok(&mut c, "GET", "/nic_tags", None).await;
    assert_eq!(tags[0]["name"], "sdc_overlay");
    assert_eq!(tags[0]["mtu"], 1500);
    let t = ok(
        &mut c,
        "POST",
        "/nic_tags",
        Some(json!({"name": "external", "mtu": 9000})),
    )
    .await;
    assert_eq!(t["name"], "external");
    assert_eq!(t["mtu"], 9000);
    assert!(t["uuid"].as_str().unwrap().len() == 36);
    // Form body.
    let r = c
        .request(
            "POST",
            "/nic_tags",
            Some("application/x-www-form-urlencoded"),
            b"name=admin",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["mtu"], 1500);
    // Duplicate.
    let r = call(&mut c, "POST", "/nic_tags", Some(json!({"name": "admin"}))).await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json(),
        json!({"code":"InvalidParameters","message":"Invalid parameters",
               "errors":[{"field":"name","code":"Duplicate","message":"Already exists"}]})
    );
    // Missing / invalid / unknown.
    let r = call(&mut c, "POST", "/nic_tags", Some(json!({}))).await;
    assert_eq!(
        r.json(),
        json!({"code":"InvalidParameters","message":"Missing parameters",
               "errors":[{"field":"name","code":"MissingParameter","message":"Missing parameter"}]})
    );
    let r = call(
        &mut c,
        "POST",
        "/nic_tags",
        Some(json!({"name": "bad-name!", "mtu": 100})),
    )
    .await;
    assert_eq!(r.status, 422);
    let e = r.json();
    assert_eq!(e["errors"][0]["field"], "mtu");
    assert_eq!(
        e["errors"][0]["message"],
        "mtu must be a number between 1500 and 9000"
    );
    assert_eq!(e["errors"][1]["field"], "name");
    let r = call(&mut c, "GET", "/nic_tags?foo=1&bar=2", None).await;
    assert_eq!(
        r.json(),
        json!({"code":"InvalidParameters","message":"Invalid parameters","errors":[
            {"field":["bar","foo"],"code":"UnknownParameters","message":"Unknown parameters: bar, foo"}]})
    );
    // Non-object body, bad JSON.
    let r = c
        .request("POST", "/nic_tags", Some("application/json"), b"[1,2]")
        .await
        .unwrap();
    assert_eq!(
        r.json()["errors"][0]["message"],
        "Parameters must be objects"
    );
    let r = c
        .request("POST", "/nic_tags", Some("application/json"), b"{nope")
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    // Pagination.
    let page = ok(&mut c, "GET", "/nic_tags?limit=1&offset=1", None).await;
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(page[0]["name"], "external");
    let r = call(&mut c, "GET", "/nic_tags?limit=0", None).await;
    assert_eq!(
        r.json()["errors"][0],
        json!({"field":"limit","code":"InvalidParameter",
               "message":"invalid limit, must be an integer greater than 0 or less than or equal to 1000"})
    );
    let r = call(&mut c, "GET", "/nic_tags?offset=-1&limit=1001", None).await;
    assert_eq!(r.json()["errors"].as_array().unwrap().len(), 2);
    assert_eq!(
        r.json()["errors"][1]["message"],
        "invalid value, offset must be an integer greater than or equal to 0"
    );
    // Get / update / delete.
    let r = call(&mut c, "GET", "/nic_tags/nope", None).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json(),
        json!({"code":"ResourceNotFound","message":"nic tag not found"})
    );
    let t = ok(
        &mut c,
        "PUT",
        "/nic_tags/external",
        Some(json!({"mtu": 1600})),
    )
    .await;
    assert_eq!(t["mtu"], 1600);
    let r = call(
        &mut c,
        "PUT",
        "/nic_tags/external",
        Some(json!({"name": "ext2"})),
    )
    .await;
    assert_eq!(r.status, 422);
    let r = call(&mut c, "DELETE", "/nic_tags/external", None).await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    expect_status(&mut c, "GET", "/nic_tags/external", None, 404).await;
    // Unknown route.
    expect_status(&mut c, "GET", "/nope", None, 404).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_ipam_and_nics() {
    let s = Svc::start().await;
    let mut c = s.client();
    ok(
        &mut c,
        "POST",
        "/nic_tags",
        Some(json!({"name": "external"})),
    )
    .await;
    let r = call(
        &mut c,
        "POST",
        "/networks",
        Some(json!({"name": "n", "nic_tag": "external", "vlan_id": 4095, "subnet": "10.0.2.5/24"})),
    )
    .await;
    assert_eq!(
        r.json()["errors"],
        json!([
            {"field":"subnet","code":"InvalidParameter","message":"invalid CIDR format"},
            {"field":"vlan_id","code":"InvalidParameter","message":"VLAN ID must be a number between 0 and 4094, and not 1"}
        ])
    );
    // A /29 public network: 8 addresses, gateway .1, broadcast .7.
    let net = ok(
        &mut c,
        "POST",
        "/networks",
        Some(
            json!({"name": "pub", "nic_tag": "external", "vlan_id": 0, "subnet": "198.51.100.0/29",
                    "gateway": "198.51.100.1", "resolvers": ["198.51.100.2", "8.8.8.8"]}),
        ),
    )
    .await;
    let nu = net["uuid"].as_str().unwrap().to_string();
    assert_eq!(net["netmask"], "255.255.255.248");
    assert_eq!(net["provision_start_ip"], "198.51.100.1");
    assert_eq!(net["provision_end_ip"], "198.51.100.6");
    assert_eq!(net["mtu"], 1500);
    assert_eq!(net["family"], "ipv4");
    assert!(r.header("etag").is_none());
    // Reserved records: gateway, in-subnet resolver, broadcast.
    let ips = ok(&mut c, "GET", &format!("/networks/{nu}/ips"), None).await;
    let reserved: Vec<&str> = ips
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["reserved"] == true)
        .map(|i| i["ip"].as_str().unwrap())
        .collect();
    assert_eq!(reserved, ["198.51.100.1", "198.51.100.2", "198.51.100.7"]);
    // Duplicate name, overlap.
    let r = call(
        &mut c,
        "POST",
        "/networks",
        Some(
            json!({"name": "pub", "nic_tag": "external", "vlan_id": 0, "subnet": "203.0.113.0/24"}),
        ),
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"code":"InvalidParameters","message":"name is in use by another network",
               "errors":[{"field":"name","code":"Duplicate","message":"Already exists"}]})
    );
    let r = call(
        &mut c,
        "POST",
        "/networks",
        Some(json!({"name": "pub2", "nic_tag": "external", "vlan_id": 0, "subnet": "198.51.100.0/24"})),
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"code":"InvalidParameters","message":"Invalid parameters","errors":[
            {"field":"subnet","type":"network","id":nu,"code":"UsedBy","message":"subnet overlaps with another network"}]})
    );
    // Renaming another network to a taken name is refused the same way.
    let other = ok(
        &mut c,
        "POST",
        "/networks",
        Some(
            json!({"name": "other", "nic_tag": "external", "vlan_id": 0, "subnet": "192.0.2.0/24"}),
        ),
    )
    .await;
    let ou = other["uuid"].as_str().unwrap().to_string();
    let r = call(
        &mut c,
        "PUT",
        &format!("/networks/{ou}"),
        Some(json!({"name": "pub"})),
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"code":"InvalidParameters","message":"name is in use by another network",
               "errors":[{"field":"name","code":"Duplicate","message":"Already exists"}]})
    );
    ok(
        &mut c,
        "PUT",
        &format!("/networks/{ou}"),
        Some(json!({"name": "other2"})),
    )
    .await;
    expect_status(&mut c, "DELETE", &format!("/networks/{ou}"), None, 204).await;
    // Bad UUID or unknown network: 404.
    for u in ["nope", "00000000-0000-4000-8000-000000000000"] {
        let r = call(&mut c, "GET", &format!("/networks/{u}"), None).await;
        assert_eq!(
            r.json(),
            json!({"code":"ResourceNotFound","message":"network not found"})
        );
    }
    // Provision: lowest never-used first (.3, .4, .5, .6), then SubnetFull.
    let body =
        |vm: &str| json!({"owner_uuid": OWNER, "belongs_to_type": "zone", "belongs_to_uuid": vm});
    let mut macs = Vec::new();
    for (i, want) in [
        "198.51.100.3",
        "198.51.100.4",
        "198.51.100.5",
        "198.51.100.6",
    ]
    .iter()
    .enumerate()
    {
        let n = ok(
            &mut c,
            "POST",
            &format!("/networks/{nu}/nics"),
            Some(body(&format!("22222222-0000-4000-8000-00000000000{i}"))),
        )
        .await;
        assert_eq!(n["ip"], *want);
        assert_eq!(n["network_uuid"], nu.as_str());
        assert_eq!(n["nic_tag"], "external");
        assert_eq!(n["gateway"], "198.51.100.1");
        assert_eq!(n["netmask"], "255.255.255.248");
        assert_eq!(n["state"], "provisioning");
        assert_eq!(n["primary"], false);
        macs.push(n["mac"].as_str().unwrap().to_string());
    }
    let r = call(
        &mut c,
        "POST",
        &format!("/networks/{nu}/nics"),
        Some(body(VM1)),
    )
    .await;
    assert_eq!(r.status, 507);
    assert_eq!(
        r.json(),
        json!({"code":"SubnetFull","message":"no more free IPs","network_uuid":nu})
    );
    // MAC forms.
    let m = &macs[0];
    let bare = m.replace(':', "");
    let dash = m.replace(':', "-");
    for form in [m.clone(), bare.clone(), dash] {
        let n = ok(&mut c, "GET", &format!("/nics/{form}"), None).await;
        assert_eq!(n["mac"], m.as_str());
    }
    let r = call(&mut c, "GET", "/nics/zz:zz", None).await;
    assert_eq!(
        r.json(),
        json!({"code":"InvalidParameters","message":"Invalid parameters",
               "errors":[{"field":"mac","code":"InvalidParameter","message":"invalid MAC address"}]})
    );
    assert_eq!(
        call(&mut c, "GET", "/nics/02:00:00:00:00:99", None)
            .await
            .json(),
        json!({"code":"ResourceNotFound","message":"nic not found"})
    );
    // Delete in use.
    let r = call(&mut c, "DELETE", &format!("/networks/{nu}"), None).await;
    assert_eq!(r.status, 422);
    let e = r.json();
    assert_eq!(e["code"], "InUse");
    assert_eq!(e["message"], "network must have no NICs provisioned");
    assert_eq!(e["errors"][0]["code"], "UsedBy");
    assert_eq!(e["errors"][0]["type"], "nic");
    // Least recently freed: free .5 then .4; the next NIC gets .5.
    let by_ip =
        |ip: &str| macs[ip.rsplit('.').next().unwrap().parse::<usize>().unwrap() - 3].clone();
    assert_eq!(
        call(
            &mut c,
            "DELETE",
            &format!("/nics/{}", by_ip("198.51.100.5")),
            None
        )
        .await
        .status,
        204
    );
    assert_eq!(
        call(
            &mut c,
            "DELETE",
            &format!("/nics/{}", by_ip("198.51.100.4")),
            None
        )
        .await
        .status,
        204
    );
    let freed = ok(
        &mut c,
        "GET",
        &format!("/networks/{nu}/ips/198.51.100.5"),
        None,
    )
    .await;
    assert_eq!(
        freed,
        json!({"ip":"198.51.100.5","network_uuid":nu,"reserved":false,"free":true})
    );
    let n = ok(
        &mut c,
        "POST",
        &format!("/networks/{nu}/nics"),
        Some(body(VM1)),
    )
    .await;
    assert_eq!(n["ip"], "198.51.100.5");
    let n = ok(
        &mut c,
        "POST",
        &format!("/networks/{nu}/nics"),
        Some(body(VM2)),
    )
    .await;
    assert_eq!(n["ip"], "198.51.100.4");
    // Explicit IP in use.
    let r = call(
        &mut c,
        "POST",
        "/nics",
        Some(
            json!({"owner_uuid": OWNER, "belongs_to_type": "zone", "belongs_to_uuid": VM2,
                    "network_uuid": nu, "ip": "198.51.100.5"}),
        ),
    )
    .await;
    assert_eq!(
        r.json()["errors"][0],
        json!({"field":"ip","type":"zone","id":VM1,"code":"UsedBy","message":format!("IP in use by zone \"{VM1}\"")})
    );
    // IPs: outside subnet, invalid, never stored.
    assert_eq!(
        call(&mut c, "GET", &format!("/networks/{nu}/ips/10.0.0.1"), None)
            .await
            .json(),
        json!({"code":"ResourceNotFound","message":"IP is not in subnet"})
    );
    assert_eq!(
        call(&mut c, "GET", &format!("/networks/{nu}/ips/bogus"), None)
            .await
            .json(),
        json!({"code":"ResourceNotFound","message":"Invalid IP address"})
    );
    let r = call(
        &mut c,
        "PUT",
        &format!("/networks/{nu}/ips/198.51.100.5"),
        Some(json!({"free": true, "unassign": true})),
    )
    .await;
    assert_eq!(
        r.json()["errors"][0]["message"],
        "free and unassign cannot both be set to \"true\""
    );
    // List filters and pagination on NICs.
    let all = ok(&mut c, "GET", "/nics", None).await;
    assert_eq!(all.as_array().unwrap().len(), 4);
    let sorted: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["mac"].as_str().unwrap())
        .collect();
    let mut s2 = sorted.clone();
    s2.sort();
    assert_eq!(sorted, s2);
    let p2 = ok(&mut c, "GET", "/nics?limit=2&offset=3", None).await;
    assert_eq!(p2.as_array().unwrap().len(), 1);
    let one = ok(&mut c, "GET", &format!("/nics?belongs_to_uuid={VM1}"), None).await;
    assert_eq!(one.as_array().unwrap().len(), 1);
    expect_status(&mut c, "GET", "/nics?colour=red", None, 422).await;
    // Update: state, primary; a bad value changes nothing.
    let mac = one[0]["mac"].as_str().unwrap().to_string();
    let r = call(
        &mut c,
        "PUT",
        &format!("/nics/{mac}"),
        Some(json!({"state": "exploded"})),
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        ok(&mut c, "GET", &format!("/nics/{mac}"), None).await["state"],
        "provisioning"
    );
    let u = ok(
        &mut c,
        "PUT",
        &format!("/nics/{mac}"),
        Some(json!({"state": "running", "primary": true})),
    )
    .await;
    assert_eq!(u["state"], "running");
    assert_eq!(u["primary"], true);
    // Networks list, update, sorted by name; /metrics counts.
    let nets = ok(&mut c, "GET", "/networks?nic_tag=external", None).await;
    assert_eq!(nets.as_array().unwrap().len(), 1);
    let upd = ok(
        &mut c,
        "PUT",
        &format!("/networks/{nu}"),
        Some(json!({"description": "d"})),
    )
    .await;
    assert_eq!(upd["description"], "d");
    let r = call(
        &mut c,
        "PUT",
        &format!("/networks/{nu}"),
        Some(json!({"subnet": "10.0.0.0/8"})),
    )
    .await;
    assert_eq!(
        r.json()["errors"][0]["message"],
        "Network updates for this field are not supported"
    );
    let m = c.request("GET", "/metrics", None, b"").await.unwrap();
    let text = String::from_utf8(m.body).unwrap();
    assert!(text.contains("fabric_control_nics 4"), "{text}");
    assert!(
        text.contains("route=\"/networks/{uuid}/nics\",method=\"POST\",status=\"507\"} 1"),
        "{text}"
    );
    assert!(text.contains("fabric_control_store_seconds_count{kind=\"write\"}"));
    // Delete everything: then the network can go.
    for n in ok(&mut c, "GET", "/nics", None).await.as_array().unwrap() {
        let mac = n["mac"].as_str().unwrap();
        expect_status(&mut c, "DELETE", &format!("/nics/{mac}"), None, 204).await;
    }
    expect_status(&mut c, "DELETE", &format!("/networks/{nu}"), None, 204).await;
    expect_status(&mut c, "GET", &format!("/networks/{nu}"), None, 404).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fabrics_vlans_and_networks() {
    let s = Svc::start().await;
    let mut c = s.client();
    let v = ok(
        &mut c,
        "POST",
        &format!("/fabrics/{OWNER}/vlans"),
        Some(json!({"vlan_id": 7, "name": "seven"})),
    )
    .await;
    let vnet = v["vnet_id"].as_u64().unwrap();
    assert!(vnet <= 16_777_215);
    assert_eq!(v["owner_uuid"], OWNER);
    let v2 = ok(
        &mut c,
        "POST",
        &format!("/fabrics/{OWNER}/vlans"),
        Some(json!({"vlan_id": 8})),
    )
    .await;
    assert_eq!(v2["vnet_id"].as_u64(), Some(vnet), "one vnet_id per owner");
    let r = call(
        &mut c,
        "POST",
        &format!("/fabrics/{OWNER}/vlans"),
        Some(json!({"vlan_id": 7})),
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"code":"InUse","message":"VLAN ID is already in use",
               "errors":[{"field":"vlan_id","code":"Duplicate","message":"VLAN ID is already in use"}]})
    );
    let o = ok(
        &mut c,
        "POST",
        &format!("/fabrics/{OTHER}/vlans"),
        Some(json!({"vlan_id": 7})),
    )
    .await;
    assert_ne!(o["vnet_id"].as_u64(), Some(vnet));
    let list = ok(
        &mut c,
        "GET",
        &format!("/fabrics/{OWNER}/vlans?fields=vlan_id"),
        None,
    )
    .await;
    assert_eq!(list, json!([{"vlan_id": 7}, {"vlan_id": 8}]));
    assert_eq!(
        call(&mut c, "GET", &format!("/fabrics/{OWNER}/vlans/99"), None)
            .await
            .json(),
        json!({"code":"ResourceNotFound","message":"vlan not found"})
    );
    let u = ok(
        &mut c,
        "PUT",
        &format!("/fabrics/{OWNER}/vlans/7"),
        Some(json!({"description": "x"})),
    )
    .await;
    assert_eq!(u["description"], "x");
    // Fabric networks: private ranges only, no overlap on one vnet, per-owner names.
    let r = call(
        &mut c,
        "POST",
        &format!("/fabrics/{OWNER}/vlans/7/networks"),
        Some(json!({"name": "a", "subnet": "8.8.8.0/24"})),
    )
    .await;
    assert_eq!(
        r.json()["errors"][0]["message"],
        "subnet must be within private ranges"
    );
    let n = ok(
        &mut c,
        "POST",
        &format!("/fabrics/{OWNER}/vlans/7/networks"),
        Some(json!({"name": "a", "subnet": "10.5.0.0/24", "gateway": "10.5.0.1"})),
    )
    .await;
    assert_eq!(n["fabric"], true);
    assert_eq!(n["mtu"], 1400);
    assert_eq!(n["nic_tag"], "sdc_overlay");
    assert_eq!(n["owner_uuid"], OWNER);
    assert!(n.get("owner_uuids").is_none());
    assert_eq!(n["vnet_id"].as_u64(), Some(vnet));
    assert_eq!(n["internet_nat"], true);
    assert_eq!(n["gateway_provisioned"], false);
    let nu = n["uuid"].as_str().unwrap().to_string();
    let r = call(
        &mut c,
        "POST",
        &format!("/fabrics/{OWNER}/vlans/8/networks"),
        Some(json!({"name": "b", "subnet": "10.5.0.128/25"})),
    )
    .await;
    assert_eq!(r.json()["errors"][0]["code"], "UsedBy");
    assert_eq!(r.json()["errors"][0]["id"], nu.as_str());
    // Another owner may reuse the subnet and the name.
    fabric_net(&mut c, OTHER, 7, "10.5.0.0/24", json!({"name": "a"})).await;
    // Another owner cannot see it.
    assert_eq!(
        call(
            &mut c,
            "GET",
            &format!("/fabrics/{OTHER}/vlans/7/networks/{nu}"),
            None
        )
        .await
        .status,
        404
    );
    let plain = ok(&mut c, "GET", &format!("/networks/{nu}"), None).await;
    assert_eq!(plain["owner_uuids"], json!([OWNER]));
    // A fabric NIC needs cn_uuid; it reports sdc_overlay/<vnet_id>.
    let r = call(
        &mut c,
        "POST",
        &format!("/networks/{nu}/nics"),
        Some(json!({"owner_uuid": OWNER, "belongs_to_type": "zone", "belongs_to_uuid": VM1})),
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"code":"InvalidParameters","message":"Missing parameters",
               "errors":[{"field":"cn_uuid","code":"MissingParameter","message":"Missing parameter"}]})
    );
    let r = call(&mut c, "POST", &format!("/networks/{nu}/nics"), Some(json!({"owner_uuid": OTHER, "belongs_to_type": "zone", "belongs_to_uuid": VM1, "cn_uuid": CN1}))).await;
    assert_eq!(
        r.json()["errors"][0]["message"],
        "network owner_uuids do not match"
    );
    let nic = ok(
        &mut c,
        "POST",
        &format!("/networks/{nu}/nics"),
        Some(zone(VM1, CN1)),
    )
    .await;
    assert_eq!(nic["nic_tag"], format!("sdc_overlay/{vnet}"));
    assert_eq!(nic["ip"], "10.5.0.2");
    assert_eq!(nic["fabric"], true);
    assert_eq!(nic["mtu"], 1400);
    assert_eq!(nic["vlan_id"], 7);
    // The NAT zone takes the gateway: gateway_provisioned flips.
    let mut nat = zone(VM2, CN1);
    nat["ip"] = json!("10.5.0.1");
    nat["network_uuid"] = json!(nu);
    let natnic = ok(&mut c, "POST", "/nics", Some(nat)).await;
    assert_eq!(natnic["ip"], "10.5.0.1");
    assert_eq!(natnic["gateway_provisioned"], true);
    assert_eq!(
        ok(&mut c, "GET", &format!("/networks/{nu}"), None).await["gateway_provisioned"],
        true
    );
    // Immutable on fabrics.
    let r = call(
        &mut c,
        "PUT",
        &format!("/fabrics/{OWNER}/vlans/7/networks/{nu}"),
        Some(json!({"gateway": "10.5.0.3"})),
    )
    .await;
    assert_eq!(
        r.json()["errors"][0]["message"],
        "Network updates for this field are not supported on fabrics"
    );
    // VLAN with networks cannot go.
    let r = call(&mut c, "DELETE", &format!("/fabrics/{OWNER}/vlans/7"), None).await;
    assert_eq!(r.json()["code"], "InUse");
    assert_eq!(r.json()["message"], "VLAN must have no networks");
    // Tear down in order.
    for m in [
        nic["mac"].as_str().unwrap(),
        natnic["mac"].as_str().unwrap(),
    ] {
        expect_status(&mut c, "DELETE", &format!("/nics/{m}"), None, 204).await;
    }
    assert_eq!(
        ok(&mut c, "GET", &format!("/networks/{nu}"), None).await["gateway_provisioned"],
        false
    );
    assert_eq!(
        call(
            &mut c,
            "DELETE",
            &format!("/fabrics/{OWNER}/vlans/7/networks/{nu}"),
            None
        )
        .await
        .status,
        204
    );
    expect_status(
        &mut c,
        "DELETE",
        &format!("/fabrics/{OWNER}/vlans/7"),
        None,
        204,
    )
    .await;
    // Deleting a NIC twice: 404.
    let m = nic["mac"].as_str().unwrap();
    expect_status(&mut c, "DELETE", &format!("/nics/{m}"), None, 404).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_resource() {
    let s = Svc::start().await;
    let mut c = s.client();
    let r = ok(
        &mut c,
        "POST",
        "/rules",
        Some(json!({"rule": "from any to tag role = web allow tcp ports 443, 80", "owner_uuid": OWNER, "enabled": true})),
    )
    .await;
    assert_eq!(
        r["rule"],
        "FROM any TO tag \"role\" = \"web\" ALLOW tcp (PORT 80 AND PORT 443)"
    );
    assert_eq!(r["enabled"], true);
    assert_eq!(r["owner_uuid"], OWNER);
    let u = r["uuid"].as_str().unwrap().to_string();
    let bad = call(
        &mut c,
        "POST",
        "/rules",
        Some(json!({"rule": "FROM any TO any ALLOW tcp PORT 80", "owner_uuid": OWNER})),
    )
    .await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.json()["errors"][0]["field"], "rule");
    assert!(bad.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("rule does not affect VMs"));
    let both = call(&mut c, "POST", "/rules", Some(json!({"rule": "FROM any TO all vms ALLOW tcp PORT 22", "owner_uuid": OWNER, "global": true}))).await;
    assert_eq!(both.status, 422);
    let g = ok(
        &mut c,
        "POST",
        "/rules",
        Some(json!({"rule": "FROM any TO all vms ALLOW tcp PORT 22", "global": true})),
    )
    .await;
    assert_eq!(g["global"], true);
    let vm = ok(
        &mut c,
        "POST",
        "/rules",
        Some(
            json!({"rule": format!("FROM vm {VM1} TO any BLOCK udp PORT 53"), "owner_uuid": OTHER}),
        ),
    )
    .await;
    assert_eq!(
        ok(&mut c, "GET", &format!("/rules?owner_uuid={OWNER}"), None)
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let by_vm = ok(&mut c, "GET", &format!("/rules?vm={VM1}"), None).await;
    assert_eq!(by_vm, json!([vm]));
    let up = ok(
        &mut c,
        "PUT",
        &format!("/rules/{u}"),
        Some(json!({"enabled": false, "description": "web"})),
    )
    .await;
    assert_eq!(up["enabled"], false);
    assert_ne!(up["version"], r["version"]);
    let r2 = call(
        &mut c,
        "PUT",
        &format!("/rules/{u}"),
        Some(json!({"rule": "FROM"})),
    )
    .await;
    assert_eq!(r2.status, 422);
    assert_eq!(
        ok(&mut c, "GET", &format!("/rules/{u}"), None).await["rule"],
        r["rule"]
    );
    expect_status(&mut c, "DELETE", &format!("/rules/{u}"), None, 204).await;
    expect_status(&mut c, "GET", &format!("/rules/{u}"), None, 404).await;
}

/// Provision through the API; a Portolan server on the same store answers VL2/VL3 with the NIC
/// and its host; a move (`PUT /nics/:mac` with a new cn_uuid) answers the new host and logs the
/// VL2 + VL3 events on every host of the VNI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portolan_answers_what_the_api_wrote() {
    let s = Svc::start().await;
    let mut c = s.client();
    // Underlay: each host's server NIC on the underlay network publishes its address.
    ok(
        &mut c,
        "POST",
        "/nic_tags",
        Some(json!({"name": "sdc_underlay"})),
    )
    .await;
    let under = ok(
        &mut c,
        "POST",
        "/networks",
        Some(json!({"name": "underlay", "nic_tag": "sdc_underlay", "vlan_id": 0, "subnet": "127.0.10.0/24"})),
    )
    .await;
    let uu = under["uuid"].as_str().unwrap();
    let mut underlay = Vec::new();
    for cn in [CN1, CN2] {
        let n = ok(
            &mut c,
            "POST",
            &format!("/networks/{uu}/nics"),
            Some(json!({"owner_uuid": OWNER, "belongs_to_type": "server", "belongs_to_uuid": cn, "underlay": true})),
        )
        .await;
        assert_eq!(n["underlay"], true);
        underlay.push(
            n["ip"]
                .as_str()
                .unwrap()
                .parse::<std::net::IpAddr>()
                .unwrap(),
        );
        let u = ok(&mut c, "GET", &format!("/portolan/underlay/{cn}"), None).await;
        assert_eq!(u, json!({"cn_uuid": cn, "ip": n["ip"], "port": 4789}));
    }
    let net = fabric_net(&mut c, OWNER, 5, "192.168.50.0/24", json!({})).await;
    let nu = net["uuid"].as_str().unwrap();
    let vnet = net["vnet_id"].as_u64().unwrap() as u32;
    let a = ok(
        &mut c,
        "POST",
        &format!("/networks/{nu}/nics"),
        Some(zone(VM1, CN1)),
    )
    .await;
    let b = ok(
        &mut c,
        "POST",
        &format!("/networks/{nu}/nics"),
        Some(zone(VM2, CN2)),
    )
    .await;
    let mac: portolan::svp::Mac = a["mac"].as_str().unwrap().parse().unwrap();
    let ip: std::net::IpAddr = a["ip"].as_str().unwrap().parse().unwrap();

    let server = Server::bind(
        ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        },
        s.store.clone(),
    )
    .await
    .unwrap();
    let paddr = server.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let svp = Client::new(ClientConfig::new(paddr));
    let v3 = svp.vl3(ip, vnet).await.unwrap().expect("VL3 hit");
    assert_eq!(
        (v3.mac, v3.underlay_ip, v3.underlay_port),
        (mac, underlay[0], 4789)
    );
    let v2 = svp.vl2(mac, vnet).await.unwrap().expect("VL2 hit");
    assert_eq!((v2.underlay_ip, v2.underlay_port), (underlay[0], 4789));
    // Drain both hosts' logs, then move NIC a to host 2.
    for u in &underlay {
        let recs = svp.log(*u, 1024).await.unwrap();
        let ids: Vec<_> = recs.iter().map(LogRecord::id).collect();
        svp.log_rm(&ids).await.unwrap();
    }
    let moved = ok(
        &mut c,
        "PUT",
        &format!("/nics/{}", a["mac"].as_str().unwrap()),
        Some(json!({"cn_uuid": CN2})),
    )
    .await;
    assert_eq!(moved["cn_uuid"], CN2);
    let v3 = svp
        .vl3(ip, vnet)
        .await
        .unwrap()
        .expect("VL3 hit after the move");
    assert_eq!(v3.underlay_ip, underlay[1]);
    let v2 = svp
        .vl2(mac, vnet)
        .await
        .unwrap()
        .expect("VL2 hit after the move");
    assert_eq!(v2.underlay_ip, underlay[1]);
    // Every host on the VNI (1 held a, 2 holds b and now a) got VL2 for the MAC and VL3 for the IP.
    for u in &underlay {
        let recs = svp.log(*u, 1024).await.unwrap();
        assert!(
            recs.iter().any(|r| matches!(r, LogRecord::Vl2 { mac: m, vnet_id, .. } if *m == mac && *vnet_id == vnet)),
            "host {u}: {recs:?}"
        );
        assert!(
            recs.iter()
                .any(|r| matches!(r, LogRecord::Vl3 { ip: i, vnet_id, .. }
                if portolan::svp::from_wire_ip(*i) == ip && *vnet_id == vnet)),
            "host {u}: {recs:?}"
        );
    }
    // The admin views show the same: mapping live on CN2, version 2.
    let maps = ok(
        &mut c,
        "GET",
        &format!("/portolan/mappings?vnet_id={vnet}"),
        None,
    )
    .await;
    let ma = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["ip"] == a["ip"])
        .unwrap()
        .clone();
    assert_eq!(ma["cn_uuid"], CN2);
    assert_eq!(ma["deleted"], false);
    assert_eq!(ma["version"], 2);
    let ev = ok(
        &mut c,
        "GET",
        &format!("/portolan/events?cn_uuid={CN1}"),
        None,
    )
    .await;
    assert!(ev
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["record"]["type"] == "SVP_LOG_VL2"));
    // Delete: tombstone, VL2 events; SVP no longer answers.
    assert_eq!(
        call(
            &mut c,
            "DELETE",
            &format!("/nics/{}", a["mac"].as_str().unwrap()),
            None
        )
        .await
        .status,
        204
    );
    assert_eq!(svp.vl3(ip, vnet).await.unwrap(), None);
    let maps = ok(
        &mut c,
        "GET",
        &format!("/portolan/mappings?vnet_id={vnet}"),
        None,
    )
    .await;
    let ma = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["ip"] == a["ip"])
        .unwrap()
        .clone();
    assert_eq!(ma["deleted"], true);
    assert!(svp
        .vl3(b["ip"].as_str().unwrap().parse().unwrap(), vnet)
        .await
        .unwrap()
        .is_some());
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

/// NIC updates that renumber or change kind keep Portolan in step; underlay NICs publish and
/// withdraw their host; reserved IPs are skipped by allocation but can be asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nic_updates_and_ip_reservations() {
    let s = Svc::start().await;
    let mut c = s.client();
    let net = fabric_net(&mut c, OWNER, 9, "10.9.9.0/29", json!({})).await;
    let nu = net["uuid"].as_str().unwrap().to_string();
    let vnet = net["vnet_id"].as_u64().unwrap();
    // Reserve .2: allocation skips it; an explicit request may still take it.
    let r = ok(
        &mut c,
        "PUT",
        &format!("/networks/{nu}/ips/10.9.9.2"),
        Some(json!({"reserved": true})),
    )
    .await;
    assert_eq!(
        r,
        json!({"ip":"10.9.9.2","network_uuid":nu,"reserved":true,"free":false})
    );
    let a = ok(
        &mut c,
        "POST",
        &format!("/networks/{nu}/nics"),
        Some(zone(VM1, CN1)),
    )
    .await;
    assert_eq!(a["ip"], "10.9.9.1");
    let b = ok(
        &mut c,
        "POST",
        &format!("/networks/{nu}/nics"),
        Some(zone(VM2, CN1)),
    )
    .await;
    assert_eq!(b["ip"], "10.9.9.3");
    let mac = a["mac"].as_str().unwrap().to_string();
    // Renumber a to the reserved .2: old address tombstoned, new one live, .1 freed.
    let u = ok(
        &mut c,
        "PUT",
        &format!("/nics/{mac}"),
        Some(json!({"ip": "10.9.9.2"})),
    )
    .await;
    assert_eq!(u["ip"], "10.9.9.2");
    let maps = ok(
        &mut c,
        "GET",
        &format!("/portolan/mappings?vnet_id={vnet}"),
        None,
    )
    .await;
    let state: Vec<(String, bool)> = maps
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["ip"].as_str().unwrap().to_string(),
                m["deleted"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        state,
        [
            ("10.9.9.1".to_string(), true),
            ("10.9.9.2".to_string(), false),
            ("10.9.9.3".to_string(), false)
        ]
    );
    assert_eq!(
        ok(&mut c, "GET", &format!("/networks/{nu}/ips/10.9.9.1"), None).await["free"],
        true
    );
    // Taking b's address is refused and changes nothing.
    let r = call(
        &mut c,
        "PUT",
        &format!("/nics/{mac}"),
        Some(json!({"ip": "10.9.9.3"})),
    )
    .await;
    assert_eq!(r.json()["errors"][0]["code"], "UsedBy");
    assert_eq!(
        ok(&mut c, "GET", &format!("/nics/{mac}"), None).await["ip"],
        "10.9.9.2"
    );
    // An IP a NIC holds cannot be freed behind its back.
    let r = call(
        &mut c,
        "PUT",
        &format!("/networks/{nu}/ips/10.9.9.2"),
        Some(json!({"free": true})),
    )
    .await;
    assert_eq!(r.json()["errors"][0]["id"], mac.as_str());
    // No longer a zone: the mapping is tombstoned.
    ok(
        &mut c,
        "PUT",
        &format!("/nics/{mac}"),
        Some(json!({"belongs_to_type": "other"})),
    )
    .await;
    let maps = ok(
        &mut c,
        "GET",
        &format!("/portolan/mappings?vnet_id={vnet}"),
        None,
    )
    .await;
    assert!(maps
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["ip"] != "10.9.9.2" || m["deleted"] == true));
    // Primary moves within one owner object.
    let p1 = ok(
        &mut c,
        "PUT",
        &format!("/nics/{}", b["mac"].as_str().unwrap()),
        Some(json!({"primary": true})),
    )
    .await;
    assert_eq!(p1["primary"], true);
    let c2 = ok(
        &mut c,
        "POST",
        &format!("/networks/{nu}/nics"),
        Some(json!({"owner_uuid": OWNER, "belongs_to_type": "zone", "belongs_to_uuid": VM2, "cn_uuid": CN2, "primary": true})),
    )
    .await;
    assert_eq!(c2["primary"], true);
    assert_eq!(
        ok(
            &mut c,
            "GET",
            &format!("/nics/{}", b["mac"].as_str().unwrap()),
            None
        )
        .await["primary"],
        false
    );
    // Underlay: a server NIC publishes its host and withdraws it on delete.
    ok(
        &mut c,
        "POST",
        "/nic_tags",
        Some(json!({"name": "sdc_underlay"})),
    )
    .await;
    let un = ok(
        &mut c,
        "POST",
        "/networks",
        Some(json!({"name": "u", "nic_tag": "sdc_underlay", "vlan_id": 0, "subnet": "127.0.30.0/24"})),
    )
    .await;
    let r = call(
        &mut c,
        "POST",
        &format!("/networks/{}/nics", un["uuid"].as_str().unwrap()),
        Some(json!({"owner_uuid": OWNER, "belongs_to_type": "zone", "belongs_to_uuid": VM1, "underlay": true})),
    )
    .await;
    assert_eq!(
        r.json()["errors"][0]["message"],
        "Only server NICs can be underlay NICs"
    );
    let srv = ok(
        &mut c,
        "POST",
        &format!("/networks/{}/nics", un["uuid"].as_str().unwrap()),
        Some(json!({"owner_uuid": OWNER, "belongs_to_type": "server", "belongs_to_uuid": CN1, "underlay": true})),
    )
    .await;
    assert_eq!(
        ok(&mut c, "GET", &format!("/portolan/underlay/{CN1}"), None).await["ip"],
        srv["ip"]
    );
    assert_eq!(
        call(
            &mut c,
            "DELETE",
            &format!("/nics/{}", srv["mac"].as_str().unwrap()),
            None
        )
        .await
        .status,
        204
    );
    expect_status(
        &mut c,
        "GET",
        &format!("/portolan/underlay/{CN1}"),
        None,
        404,
    )
    .await;
    // A given MAC in any form is stored canonically; a duplicate is refused.
    let n = ok(
        &mut c,
        "POST",
        "/nics",
        Some(json!({"owner_uuid": OWNER, "belongs_to_type": "other", "belongs_to_uuid": VM1, "mac": "2-0-0-a-b-c"})),
    )
    .await;
    assert_eq!(n["mac"], "02:00:00:0a:0b:0c");
    let r = call(
        &mut c,
        "POST",
        "/nics",
        Some(json!({"owner_uuid": OWNER, "belongs_to_type": "other", "belongs_to_uuid": VM1, "mac": "02000000 0a0b0c"})),
    )
    .await;
    assert_eq!(r.json()["errors"][0]["message"], "invalid MAC address");
    let r = call(
        &mut c,
        "POST",
        "/nics",
        Some(json!({"owner_uuid": OWNER, "belongs_to_type": "other", "belongs_to_uuid": VM1, "mac": "0200000a0b0c"})),
    )
    .await;
    assert_eq!(
        r.json()["errors"][0],
        json!({"field":"mac","code":"Duplicate","message":"Already exists"})
    );
}

/// Etag on objects; `If-Match` on PUT/DELETE is honoured (412 and no change on a mismatch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etags_and_if_match() {
    let s = Svc::start().await;
    let mut c = s.client();
    let r = call(
        &mut c,
        "POST",
        "/nic_tags",
        Some(json!({"name": "etagged"})),
    )
    .await;
    let etag = r.header("etag").unwrap().to_string();
    let g = call(&mut c, "GET", "/nic_tags/etagged", None).await;
    assert_eq!(g.header("etag"), Some(etag.as_str()));
    let put = |tag: &str| {
        format!(
            "PUT /nic_tags/etagged HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nif-match: {tag}\r\ncontent-length: 12\r\n\r\n{{\"mtu\":1600}}"
        )
    };
    // A stale etag: 412, nothing changes.
    let raw = raw_request(s.addr, &put("\"0000000000000000\"")).await;
    assert!(raw.starts_with("HTTP/1.1 412"), "{raw}");
    assert!(raw.contains("\"code\":\"PreconditionFailed\""), "{raw}");
    assert_eq!(
        ok(&mut c, "GET", "/nic_tags/etagged", None).await["mtu"],
        1500
    );
    // The current etag: applied.
    let raw = raw_request(s.addr, &put(&etag)).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert_eq!(
        ok(&mut c, "GET", "/nic_tags/etagged", None).await["mtu"],
        1600
    );
}

async fn raw_request(addr: SocketAddr, req: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// CreateNic without network_uuid (net-agent's way): ip + nic_tag (`sdc_overlay/<vnet_id>`) +
/// vlan_id find the owner's network even when another owner uses the same subnet and VLAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_nic_by_ip_tag_and_vlan() {
    let s = Svc::start().await;
    let mut c = s.client();
    let mine = fabric_net(&mut c, OWNER, 4, "10.4.0.0/24", json!({})).await;
    let theirs = fabric_net(&mut c, OTHER, 4, "10.4.0.0/24", json!({})).await;
    assert_ne!(mine["vnet_id"], theirs["vnet_id"]);
    let mut body = zone(VM1, CN1);
    body["ip"] = json!("10.4.0.20");
    body["nic_tag"] = json!(format!("sdc_overlay/{}", mine["vnet_id"]));
    body["vlan_id"] = json!(4);
    let n = ok(&mut c, "POST", "/nics", Some(body.clone())).await;
    assert_eq!(n["network_uuid"], mine["uuid"]);
    assert_eq!(n["ip"], "10.4.0.20");
    // Without the VNI the tag is ambiguous.
    body["nic_tag"] = json!("sdc_overlay");
    body["ip"] = json!("10.4.0.21");
    let r = call(&mut c, "POST", "/nics", Some(body.clone())).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["errors"][0]["field"], "ip");
    // Without nic_tag and vlan_id, an ip alone says nothing.
    let mut lone = zone(VM2, CN1);
    lone["ip"] = json!("10.4.0.22");
    let r = call(&mut c, "POST", "/nics", Some(lone)).await;
    assert_eq!(r.json()["errors"][0]["field"], "ip");
    // SearchIPs: both owners' networks hold 10.4.0.20; only one NIC has it.
    let found = ok(&mut c, "GET", "/search/ips?ip=10.4.0.20", None).await;
    assert_eq!(found.as_array().unwrap().len(), 2);
    let held: Vec<&Value> = found
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["free"] == false)
        .collect();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0]["belongs_to_uuid"], VM1);
    assert_eq!(held[0]["network_uuid"], mine["uuid"]);
    let r = call(&mut c, "GET", "/search/ips?ip=192.0.2.1", None).await;
    assert_eq!(r.status, 404);
    let r = call(&mut c, "GET", "/search/ips", None).await;
    assert_eq!(r.json()["message"], "Missing parameters");
}

/// Network pools: provisioning moves on to the next member when one is full; a pooled network
/// cannot be deleted; an explicit IP cannot go with a pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_pools() {
    let s = Svc::start().await;
    let mut c = s.client();
    ok(
        &mut c,
        "POST",
        "/nic_tags",
        Some(json!({"name": "external"})),
    )
    .await;
    let mk = |name: &str, subnet: &str| json!({"name": name, "nic_tag": "external", "vlan_id": 0, "subnet": subnet});
    let n1 = ok(
        &mut c,
        "POST",
        "/networks",
        Some(mk("p1", "203.0.113.0/30")),
    )
    .await;
    let n2 = ok(
        &mut c,
        "POST",
        "/networks",
        Some(mk("p2", "203.0.113.8/30")),
    )
    .await;
    let (u1, u2) = (n1["uuid"].as_str().unwrap(), n2["uuid"].as_str().unwrap());
    let r = call(
        &mut c,
        "POST",
        "/network_pools",
        Some(json!({"name": "pool"})),
    )
    .await;
    assert_eq!(
        r.json()["errors"],
        json!([{"field":"networks","code":"MissingParameter","message":"Missing parameter"}])
    );
    let pool = ok(
        &mut c,
        "POST",
        "/network_pools",
        Some(json!({"name": "pool", "networks": [u1, u2]})),
    )
    .await;
    assert_eq!(pool["nic_tag"], "external");
    let mut want = vec![u1, u2];
    want.sort();
    assert_eq!(pool["networks"], json!(want));
    let pu = pool["uuid"].as_str().unwrap().to_string();
    // Each /30 has two usable addresses: .1 .2 on p1, then .9 .10 on p2, then full.
    let body = json!({"owner_uuid": OWNER, "belongs_to_type": "zone", "belongs_to_uuid": VM1});
    let mut got = Vec::new();
    for _ in 0..4 {
        let n = ok(
            &mut c,
            "POST",
            &format!("/networks/{pu}/nics"),
            Some(body.clone()),
        )
        .await;
        got.push((
            n["network_uuid"].as_str().unwrap().to_string(),
            n["ip"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(
        got,
        [
            (u1.to_string(), "203.0.113.1".to_string()),
            (u1.to_string(), "203.0.113.2".to_string()),
            (u2.to_string(), "203.0.113.9".to_string()),
            (u2.to_string(), "203.0.113.10".to_string()),
        ]
    );
    let r = call(
        &mut c,
        "POST",
        &format!("/networks/{pu}/nics"),
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status, 507);
    assert_eq!(r.json()["network_uuid"], pu.as_str());
    let mut with_ip = body.clone();
    with_ip["ip"] = json!("203.0.113.1");
    let r = call(
        &mut c,
        "POST",
        &format!("/networks/{pu}/nics"),
        Some(with_ip),
    )
    .await;
    assert_eq!(r.json()["errors"][0]["field"], "ip");
    // Pooled networks stay; pool CRUD.
    for n in ok(&mut c, "GET", "/nics", None).await.as_array().unwrap() {
        let m = n["mac"].as_str().unwrap();
        expect_status(&mut c, "DELETE", &format!("/nics/{m}"), None, 204).await;
    }
    let r = call(&mut c, "DELETE", &format!("/networks/{u1}"), None).await;
    assert_eq!(r.json()["code"], "InUse");
    assert_eq!(r.json()["message"], "Network is in use");
    let up = ok(
        &mut c,
        "PUT",
        &format!("/network_pools/{pu}"),
        Some(json!({"networks": [u2]})),
    )
    .await;
    assert_eq!(up["networks"], json!([u2]));
    expect_status(&mut c, "DELETE", &format!("/networks/{u1}"), None, 204).await;
    assert_eq!(
        ok(&mut c, "GET", "/network_pools", None)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    expect_status(&mut c, "DELETE", &format!("/network_pools/{pu}"), None, 204).await;
    assert_eq!(
        call(&mut c, "GET", &format!("/network_pools/{pu}"), None)
            .await
            .json(),
        json!({"code":"ResourceNotFound","message":"network pool not found"})
    );
}

/// NAPI's order of checks: `POST /networks {}` reports exactly name, nic_tag and vlan_id
/// missing (the per-field pass); `subnet` is reported only once those pass (the cross-field
/// pass, as NAPI's "after" validators).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_network_reports_per_field_checks_first() {
    let s = Svc::start().await;
    let mut c = s.client();
    ok(
        &mut c,
        "POST",
        "/nic_tags",
        Some(json!({"name": "external"})),
    )
    .await;
    let r = call(&mut c, "POST", "/networks", Some(json!({}))).await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json(),
        json!({"code":"InvalidParameters","message":"Missing parameters","errors":[
            {"field":"name","code":"MissingParameter","message":"Missing parameter"},
            {"field":"nic_tag","code":"MissingParameter","message":"Missing parameter"},
            {"field":"vlan_id","code":"MissingParameter","message":"Missing parameter"}]})
    );
    let r = call(
        &mut c,
        "POST",
        "/networks",
        Some(json!({"name": "n", "nic_tag": "external", "vlan_id": 0})),
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json(),
        json!({"code":"InvalidParameters","message":"Missing parameters","errors":[
            {"field":"subnet","code":"MissingParameter","message":"Missing parameter"}]})
    );
    // Nothing was created.
    assert_eq!(ok(&mut c, "GET", "/networks", None).await, json!([]));
}

/// The (field, message) of the first entry of a 422 InvalidParameters answer.
fn field_of(r: &HttpResponse) -> (String, String) {
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let b = r.json();
    assert_eq!(b["code"], "InvalidParameters", "{b}");
    (
        b["errors"][0]["field"].as_str().unwrap_or("").to_string(),
        b["errors"][0]["message"].as_str().unwrap_or("").to_string(),
    )
}

/// A list filter with thousands of values is 422 naming the field (40 000 `owner_uuid`s made
/// SQLite fail with 500 "too many SQL variables" and logged the whole statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_are_bounded() {
    let s = Svc::start().await;
    let mut c = s.client();

    // A list filter of 2 000 values: 422 naming the field (not a statement with 2 000 bound
    // values; 40 000 made SQLite fail with 500 "too many SQL variables").
    let many: Vec<String> = (0..2000u32)
        .map(|i| format!("00000000-0000-4000-8000-{i:012x}"))
        .collect();
    let r = call(&mut c, "GET", "/nics", Some(json!({"owner_uuid": many}))).await;
    let (f, m) = field_of(&r);
    assert_eq!(f, "owner_uuid");
    assert!(m.contains("at most 1000"), "{m}");
    let r = call(
        &mut c,
        "GET",
        &format!("/nics?belongs_to_uuid={}", many[..1001].join(",")),
        None,
    )
    .await;
    assert_eq!(field_of(&r).0, "belongs_to_uuid");
    // 1 000 values are fine.
    let r = call(
        &mut c,
        "GET",
        "/nics",
        Some(json!({"owner_uuid": many[..1000]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// Fabric networks of one or two addresses are refused; a /30 is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fabric_networks_need_room_for_hosts() {
    let s = Svc::start().await;
    let mut c = s.client();
    ok(
        &mut c,
        "POST",
        &format!("/fabrics/{OWNER}/vlans"),
        Some(json!({"vlan_id": 5})),
    )
    .await;
    for subnet in ["10.9.0.0/31", "10.9.0.4/32"] {
        let r = call(
            &mut c,
            "POST",
            &format!("/fabrics/{OWNER}/vlans/5/networks"),
            Some(json!({"name": format!("tiny-{subnet}"), "subnet": subnet})),
        )
        .await;
        let (f, m) = field_of(&r);
        assert_eq!(f, "subnet");
        assert!(m.contains("at most 30"), "{m}");
    }
    fabric_net(&mut c, OWNER, 5, "10.9.2.0/30", json!({})).await;
}

/// No NIC, reservation or provision range on a network's own address (nor its broadcast).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_host_on_the_network_address() {
    let s = Svc::start().await;
    let mut c = s.client();
    let net = fabric_net(&mut c, OWNER, 5, "10.9.1.0/24", json!({})).await;
    let nu = net["uuid"].as_str().unwrap().to_string();
    for (ip, what) in [("10.9.1.0", "network"), ("10.9.1.255", "broadcast")] {
        let mut body = zone(VM1, CN1);
        body["ip"] = json!(ip);
        let r = call(&mut c, "POST", &format!("/networks/{nu}/nics"), Some(body)).await;
        let (f, m) = field_of(&r);
        assert_eq!(f, "ip");
        assert!(m.contains(what), "{m}");
    }
    let nic = ok(
        &mut c,
        "POST",
        &format!("/networks/{nu}/nics"),
        Some(zone(VM1, CN1)),
    )
    .await;
    assert_eq!(nic["ip"], "10.9.1.1");
    let r = call(
        &mut c,
        "PUT",
        &format!("/nics/{}", nic["mac"].as_str().unwrap()),
        Some(json!({"ip": "10.9.1.0"})),
    )
    .await;
    assert_eq!(field_of(&r).0, "ip");
    // Nor a reservation or assignment of it through the IP API.
    let r = call(
        &mut c,
        "PUT",
        &format!("/networks/{nu}/ips/10.9.1.0"),
        Some(json!({"reserved": true, "belongs_to_uuid": VM2, "belongs_to_type": "zone"})),
    )
    .await;
    let (f, m) = field_of(&r);
    assert_eq!(f, "ip");
    assert!(m.contains("network address"), "{m}");
    // A provision range starting on the network address.
    ok(
        &mut c,
        "POST",
        "/nic_tags",
        Some(json!({"name": "external"})),
    )
    .await;
    let r = call(
        &mut c,
        "POST",
        "/networks",
        Some(json!({"name": "edge", "nic_tag": "external", "vlan_id": 0,
                    "subnet": "198.51.100.0/24", "provision_start_ip": "198.51.100.0"})),
    )
    .await;
    assert_eq!(field_of(&r).0, "provision_start_ip");

    assert_eq!(
        ok(&mut c, "GET", "/nics", None)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// Names with NUL, other control characters or bidi overrides are refused per field, and NUL
/// in any other string is a 422, never a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_without_control_or_bidi_characters() {
    let s = Svc::start().await;
    let mut c = s.client();
    ok(
        &mut c,
        "POST",
        "/nic_tags",
        Some(json!({"name": "external"})),
    )
    .await;
    let net = fabric_net(&mut c, OWNER, 5, "10.9.1.0/24", json!({})).await;
    let nu = net["uuid"].as_str().unwrap().to_string();
    for bad in [
        "a\u{0}b",
        "evil\u{202e}gpj.exe",
        "x\u{2066}y",
        "tab\there",
        "c1\u{9b}x",
    ] {
        let r = call(
            &mut c,
            "POST",
            "/networks",
            Some(
                json!({"name": bad, "nic_tag": "external", "vlan_id": 0, "subnet": "192.0.2.0/24"}),
            ),
        )
        .await;
        assert_eq!(field_of(&r).0, "name", "{bad:?}");
        let r = call(
            &mut c,
            "POST",
            &format!("/fabrics/{OWNER}/vlans"),
            Some(json!({"vlan_id": 6, "name": bad})),
        )
        .await;
        assert_eq!(field_of(&r).0, "name", "{bad:?}");
        let r = call(
            &mut c,
            "POST",
            &format!("/fabrics/{OWNER}/vlans/5/networks"),
            Some(json!({"name": bad, "subnet": "10.9.3.0/24"})),
        )
        .await;
        assert_eq!(field_of(&r).0, "name", "{bad:?}");
        let r = call(
            &mut c,
            "POST",
            "/network_pools",
            Some(json!({"name": bad, "networks": [nu]})),
        )
        .await;
        assert_eq!(field_of(&r).0, "name", "{bad:?}");
        let r = call(&mut c, "POST", "/nic_tags", Some(json!({"name": bad}))).await;
        assert_eq!(field_of(&r).0, "name", "{bad:?}");
    }
    // NUL anywhere else is refused too (no store keeps it), never a 500.
    let mut body = zone(VM2, CN1);
    body["model"] = json!("vir\u{0}tio");
    let r = call(&mut c, "POST", &format!("/networks/{nu}/nics"), Some(body)).await;
    assert_eq!(field_of(&r).0, "model");
    // Nothing above changed state: no NIC, no VLAN 6, one network.
    assert_eq!(ok(&mut c, "GET", "/nics", None).await, json!([]));
    expect_status(
        &mut c,
        "GET",
        &format!("/fabrics/{OWNER}/vlans/6"),
        None,
        404,
    )
    .await;
    let nets = ok(&mut c, "GET", "/networks", None).await;
    assert_eq!(nets.as_array().unwrap().len(), 1);
}
