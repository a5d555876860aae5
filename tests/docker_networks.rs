//! Docker networks against a real head (`fabric control --data DIR --docker-listen`, SQLite in
//! DIR), driven by the stock docker CLI, docker-py and a raw HTTPS client with certificates
//! from `fabric account add`: the network verbs and their error cases with moby's messages and
//! exit codes, two accounts with the same names and subnets that never see each other's,
//! networks the operator shares (`fabric network share`), a failed create leaving no VLAN or
//! network behind (checked through the control API on the head's operator socket), the
//! subnet pool, moby's raw-API network cases and docker-py's.

#[path = "util/docker_cli.rs"]
mod docker_cli;
#[path = "util/docker_head.rs"]
mod docker_head;
#[path = "util/temp_dir.rs"]
mod temp_dir;

use std::path::Path;

use docker_cli::{DockerClient, Out};
use docker_head::DockerHead;
use fabric::control::client::{HttpClient, HttpResponse};
use fabric::pki::tls;
use serde_json::{json, Value};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A raw HTTPS client of the Docker API with an account's certificate.
struct Api {
    rt: tokio::runtime::Runtime,
    c: HttpClient,
}

impl Api {
    fn new(head: &DockerHead, certs: &Path) -> Api {
        Api {
            rt: rt(),
            c: HttpClient::https(
                head.docker,
                tls::server_name("127.0.0.1").unwrap(),
                tls::client_config(certs).unwrap(),
            ),
        }
    }

    /// The head's control API through its operator socket.
    fn operator(head: &DockerHead) -> Api {
        Api {
            rt: rt(),
            c: HttpClient::unix(head.path("control.sock")),
        }
    }

    fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> HttpResponse {
        let r = self.rt.block_on(self.c.json(method, path, body.as_ref()));
        r.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn raw(&mut self, method: &str, path: &str, ct: Option<&str>, body: &[u8]) -> HttpResponse {
        let r = self.rt.block_on(self.c.request(method, path, ct, body));
        r.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

/// Asserts a Docker error answer: status, `{"message"}` exactly, `Content-Type:
/// application/json` exactly.
fn refused(r: &HttpResponse, status: u16, message: &str) {
    assert_eq!(
        (r.status, r.message().as_str()),
        (status, message),
        "body {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json(), json!({ "message": message }));
}

/// Asserts the CLI failed with exit 1 and printed the daemon's `message` (the CLI trims
/// trailing blanks, as of moby's predefined-network text).
fn cli_refused(o: &Out, message: &str) {
    assert_eq!(o.code, 1, "{o:?}");
    assert!(
        o.stderr.contains(&format!(
            "Error response from daemon: {}",
            message.trim_end()
        )),
        "expected {message:?} in {o:?}"
    );
}

fn names(c: &DockerClient) -> Vec<String> {
    c.run(&["network", "ls", "--format", "{{.Name}}"])
        .ok("network ls")
        .lines()
        .map(String::from)
        .collect()
}

fn account_uuid(op: &mut Api, login: &str) -> String {
    let r = op.call("GET", &format!("/accounts/{login}"), None);
    assert_eq!(r.status, 200, "{}", r.message());
    r.json()["uuid"].as_str().unwrap().to_string()
}

/// The fabric VLANs and fabric networks of `owner`, as the control API lists them.
fn fabric_state(op: &mut Api, owner: &str) -> (Vec<Value>, Vec<Value>) {
    let vlans = op.call("GET", &format!("/fabrics/{owner}/vlans"), None);
    assert_eq!(vlans.status, 200, "{}", vlans.message());
    let vlans: Vec<Value> = vlans.json().as_array().cloned().unwrap_or_default();
    let mut nets = Vec::new();
    for v in &vlans {
        let r = op.call(
            "GET",
            &format!("/fabrics/{owner}/vlans/{}/networks", v["vlan_id"]),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.message());
        nets.extend(r.json().as_array().cloned().unwrap_or_default());
    }
    (vlans, nets)
}

#[test]
fn cli_network_verbs_errors_and_two_accounts() {
    let head = DockerHead::start();
    let alice = DockerClient::new(&head.docker_host(), &head.account("alice"), None);
    let bob = DockerClient::new(&head.docker_host(), &head.account("bob"), None);

    // A new account has its default network and moby's two other built-ins.
    let ls = alice
        .run(&[
            "network",
            "ls",
            "--format",
            "{{.Name}} {{.Driver}} {{.Scope}}",
        ])
        .ok("ls")
        .to_string();
    assert_eq!(
        ls,
        "bridge bridge local\nhost host local\nnone null local\n"
    );
    let bridge = alice
        .run(&[
            "network",
            "inspect",
            "--format",
            "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}}",
            "bridge",
        ])
        .ok("inspect bridge")
        .to_string();
    assert_eq!(bridge.trim(), "172.17.0.0/16 172.17.0.1");

    // Same name and subnet in two accounts: two networks, each invisible to the other.
    let create = ["network", "create", "--subnet", "10.50.0.0/24", "web"];
    let a_id = alice.run(&create).ok("alice create").trim().to_string();
    let b_id = bob.run(&create).ok("bob create").trim().to_string();
    assert_eq!(a_id.len(), 64, "{a_id}");
    assert_ne!(a_id, b_id);
    let inspect_id =
        |c: &DockerClient, term: &str| c.run(&["network", "inspect", "--format", "{{.Id}}", term]);
    for term in ["web", a_id.as_str(), &a_id[..12]] {
        assert_eq!(inspect_id(&alice, term).ok(term).trim(), a_id, "{term}");
    }
    for term in [b_id.as_str(), &b_id[..12]] {
        cli_refused(
            &inspect_id(&alice, term),
            &format!("network {term} not found"),
        );
        let o = alice.run(&["network", "inspect", term]);
        cli_refused(&o, &format!("network {term} not found"));
        assert_eq!(o.stdout.trim(), "[]", "{o:?}");
        cli_refused(
            &alice.run(&["network", "rm", term]),
            &format!("network {term} not found"),
        );
    }
    let ids = alice
        .run(&["network", "ls", "--no-trunc", "--format", "{{.ID}}"])
        .ok("ls ids")
        .to_string();
    assert!(ids.contains(&a_id) && !ids.contains(&b_id), "{ids}");
    assert_eq!(
        alice
            .run(&[
                "network",
                "ls",
                "--filter",
                &format!("id={}", &b_id[..12]),
                "-q"
            ])
            .ok("ls id filter")
            .trim(),
        ""
    );

    // Inspect shows moby's object.
    let v: Value =
        serde_json::from_str(alice.run(&["network", "inspect", "web"]).ok("inspect")).unwrap();
    let n = &v[0];
    assert_eq!(n["Name"], "web");
    assert_eq!(n["Scope"], "local");
    assert_eq!(n["Driver"], "bridge");
    assert_eq!(n["EnableIPv6"], false);
    assert_eq!(
        n["IPAM"],
        json!({"Driver": "default", "Options": {}, "Config": [{"Subnet": "10.50.0.0/24"}]})
    );
    assert_eq!(n["ConfigFrom"], json!({"Network": ""}));
    assert_eq!(n["Containers"], json!({}));
    assert_eq!(n["Options"], json!({}));
    assert_eq!(n["Labels"], json!({}));
    assert!(n["Created"].as_str().unwrap().ends_with('Z'), "{n}");

    // moby's refusals, as the CLI prints them.
    cli_refused(&alice.run(&create), "network with name web already exists");
    cli_refused(
        &alice.run(&["network", "create", "--subnet", "10.50.0.128/25", "web2"]),
        "Pool overlaps with other one on this address space",
    );
    cli_refused(
        &alice.run(&["network", "create", "-d", "foo", "x"]),
        "plugin \"foo\" not found",
    );
    cli_refused(
        &alice.run(&["network", "create", "-d", "host", "x"]),
        "only one instance of \"host\" network is allowed",
    );
    let o = alice.run(&["network", "create", "-d", "macvlan", "x"]);
    cli_refused(&o, "the macvlan driver is not supported by fabric");
    for p in ["bridge", "host", "none", "default"] {
        cli_refused(
            &alice.run(&["network", "create", p]),
            &format!("operation is not permitted on predefined {p} network "),
        );
    }
    for p in ["bridge", "host", "none"] {
        cli_refused(
            &alice.run(&["network", "rm", p]),
            &format!("{p} is a pre-defined network and cannot be removed"),
        );
    }
    cli_refused(
        &alice.run(&["network", "ls", "--filter", "foo=bar"]),
        "Invalid filter 'foo'",
    );
    cli_refused(
        &alice.run(&[
            "network",
            "create",
            "--ipv6",
            "--subnet",
            "fd00:1::/64",
            "v6",
        ]),
        "IPv6 is not supported",
    );
    cli_refused(
        &alice.run(&["network", "inspect", "nosuch"]),
        "network nosuch not found",
    );
    cli_refused(
        &alice.run(&["network", "connect", "web", "nocontainer"]),
        "No such container: nocontainer",
    );
    cli_refused(
        &alice.run(&["network", "disconnect", "web", "nocontainer"]),
        "No such container: nocontainer",
    );

    // Options the CLI sends, stored and shown.
    alice
        .run(&[
            "network",
            "create",
            "--subnet",
            "10.60.0.0/24",
            "--gateway",
            "10.60.0.254",
            "--ip-range",
            "10.60.0.128/25",
            "--label",
            "tier=front",
            "--label",
            "x",
            "--internal",
            "--attachable",
            "-d",
            "overlay",
            "-o",
            "com.docker.network.driver.mtu=1300",
            "front",
        ])
        .ok("create front");
    let f = alice
        .run(&[
            "network", "inspect", "--format",
            "{{.Driver}} {{.Internal}} {{.Attachable}} {{json .Labels}} {{json .Options}} {{json .IPAM.Config}}",
            "front",
        ])
        .ok("inspect front")
        .to_string();
    assert_eq!(
        f.trim(),
        r#"overlay true true {"tier":"front","x":""} {"com.docker.network.driver.mtu":"1300"} [{"Subnet":"10.60.0.0/24","IPRange":"10.60.0.128/25","Gateway":"10.60.0.254"}]"#
    );
    let sel = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["network", "ls", "--format", "{{.Name}}"];
        a.extend_from_slice(args);
        alice
            .run(&a)
            .ok("ls filtered")
            .lines()
            .map(String::from)
            .collect()
    };
    assert_eq!(sel(&["--filter", "label=tier=front"]), ["front"]);
    assert_eq!(sel(&["--filter", "label=tier=back"]), Vec::<String>::new());
    assert_eq!(sel(&["--filter", "driver=overlay"]), ["front"]);
    assert_eq!(
        sel(&["--filter", "type=builtin"]),
        ["bridge", "host", "none"]
    );
    assert_eq!(sel(&["--filter", "type=custom"]), ["front", "web"]);
    assert_eq!(sel(&["--filter", "name=we"]), ["web"]);
    assert_eq!(sel(&["--filter", "dangling=true"]), ["front", "web"]);
    assert_eq!(sel(&["--filter", "scope=swarm"]), Vec::<String>::new());

    // Prune takes only the account's own unused networks, by label.
    let o = alice.run(&["network", "prune", "-f", "--filter", "label=tier"]);
    assert_eq!(o.ok("prune").trim(), "Deleted Networks:\nfront");
    assert_eq!(names(&alice), ["bridge", "host", "none", "web"]);
    assert_eq!(names(&bob), ["bridge", "host", "none", "web"]);

    // rm several: the unknown one fails, the other goes; bob's web stays.
    let o = alice.run(&["network", "rm", "web", "nosuch"]);
    assert_eq!(o.stdout.trim(), "web", "{o:?}");
    cli_refused(&o, "network nosuch not found");
    assert_eq!(names(&alice), ["bridge", "host", "none"]);
    assert_eq!(inspect_id(&bob, "web").ok("bob web").trim(), b_id);
    let o = bob.run(&["network", "prune", "-f"]);
    assert_eq!(o.ok("bob prune").trim(), "Deleted Networks:\nweb");
}

const POOL_ARGS: [&str; 4] = [
    "--docker-subnet-pool",
    "10.200.0.0/16/24",
    "--docker-subnet-pool",
    "192.168.40.0/24",
];

#[test]
fn shared_networks_failed_creates_and_the_pool() {
    shared_failed_pool(&DockerHead::start_with(&POOL_ARGS));
}

/// The same over PostgreSQL (a fresh database; skipped without `PORTOLAN_TEST_PG`).
#[test]
fn shared_networks_failed_creates_and_the_pool_postgres() {
    let Some(admin) = portolan::store::postgres::test_admin_url() else {
        eprintln!("skipping: PORTOLAN_TEST_PG is not set");
        return;
    };
    let db = portolan::store::postgres::TestDatabase::create(&admin).unwrap();
    let mut args = POOL_ARGS.to_vec();
    args.extend(["--store", db.url.as_str()]);
    let head = DockerHead::start_with(&args);
    shared_failed_pool(&head);
    drop(head);
    drop(db);
}

fn shared_failed_pool(head: &DockerHead) {
    let alice = DockerClient::new(&head.docker_host(), &head.account("alice"), None);
    let bob = DockerClient::new(&head.docker_host(), &head.account("bob"), None);
    let mut op = Api::operator(head);
    let a_uuid = account_uuid(&mut op, "alice");
    let subnet_of = |c: &DockerClient, n: &str| {
        c.run(&[
            "network",
            "inspect",
            "--format",
            "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
            n,
        ])
        .ok("subnet")
        .trim()
        .to_string()
    };

    // The pool: the default network took the first /24, the next network the next free one.
    assert_eq!(subnet_of(&alice, "bridge"), "10.200.0.0/24");
    alice
        .run(&["network", "create", "--subnet", "10.200.1.0/24", "fixed"])
        .ok("fixed");
    alice.run(&["network", "create", "p1"]).ok("p1");
    assert_eq!(subnet_of(&alice, "p1"), "10.200.2.0/24");

    // The operator shares a network: its own VNI, every account sees it, none removes it.
    let o = head.fabric(&["network", "share", "public", "--subnet", "10.200.3.0/24"]);
    assert!(o.status.success(), "{o:?}");
    let o = head.fabric(&["network", "shared"]);
    let listing = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success() && listing.contains("public") && listing.contains("10.200.3.0/24"),
        "{listing}"
    );
    let shared = op.call("GET", "/shared_networks/public", None);
    assert_eq!(shared.status, 200, "{}", shared.message());
    let shared = shared.json();
    let (a_vlans, _) = fabric_state(&mut op, &a_uuid);
    assert_ne!(
        shared["vnet_id"], a_vlans[0]["vnet_id"],
        "{shared} {a_vlans:?}"
    );
    assert_ne!(shared["owner_uuid"].as_str(), Some(a_uuid.as_str()));
    for c in [&alice, &bob] {
        assert!(names(c).contains(&"public".to_string()));
        let d = c
            .run(&[
                "network",
                "inspect",
                "--format",
                "{{.Id}} {{.Driver}} {{len .Containers}}",
                "public",
            ])
            .ok("inspect public")
            .to_string();
        assert_eq!(
            d.trim(),
            format!("{} overlay 0", shared["id"].as_str().unwrap())
        );
        cli_refused(
            &c.run(&["network", "rm", "public"]),
            "public is shared with every account by the operator and cannot be removed",
        );
        cli_refused(
            &c.run(&["network", "create", "public"]),
            "network with name public already exists",
        );
        cli_refused(
            &c.run(&["network", "create", "--subnet", "10.200.3.128/25", "x"]),
            "Pool overlaps with other one on this address space",
        );
    }
    // The pool skips the shared network's subnet.
    bob.run(&["network", "create", "p2"]).ok("p2");
    bob.run(&["network", "create", "p3"]).ok("p3");
    assert_eq!(subnet_of(&bob, "p2"), "10.200.1.0/24");
    assert_eq!(subnet_of(&bob, "p3"), "10.200.2.0/24");
    alice.run(&["network", "create", "p4"]).ok("p4");
    assert_eq!(subnet_of(&alice, "p4"), "10.200.4.0/24");
    // The operator cannot share a name or subnet an account uses.
    let o = head.fabric(&["network", "share", "p1x", "--subnet", "10.200.0.0/25"]);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && e.contains("overlaps") && e.contains("bridge (alice)"),
        "{e}"
    );
    let o = head.fabric(&["network", "share", "p2", "--subnet", "10.201.0.0/24"]);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success() && e.contains("bob"), "{e}");

    // A create that fails in the fabric layer, after its VLAN was written, leaves nothing.
    let before = fabric_state(&mut op, &a_uuid);
    let o = alice.run(&["network", "create", "--subnet", "8.8.8.0/24", "public2"]);
    cli_refused(
        &o,
        "the fabric refused the network: subnet: subnet must be within private ranges",
    );
    let o = alice.run(&[
        "network",
        "create",
        "--subnet",
        "10.210.0.0/24",
        "--gateway",
        "10.211.0.1",
        "g",
    ]);
    assert_eq!(o.code, 1, "{o:?}");
    assert_eq!(fabric_state(&mut op, &a_uuid), before);
    assert_eq!(
        names(&alice),
        ["bridge", "fixed", "host", "none", "p1", "p4", "public"]
    );

    // rm removes the VLAN and the network; the VLAN is free for the next one.
    let before_vlans = before.0.len();
    alice.run(&["network", "rm", "fixed"]).ok("rm fixed");
    let after = fabric_state(&mut op, &a_uuid);
    assert_eq!(after.0.len(), before_vlans - 1);
    assert!(
        !after.1.iter().any(|n| n["name"] == "fixed"),
        "{:?}",
        after.1
    );
    alice.run(&["network", "create", "again"]).ok("again");
    let again = fabric_state(&mut op, &a_uuid);
    assert_eq!(again.0.len(), before_vlans);

    // Prune never takes shared networks (nor the default one).
    let o = alice.run(&["network", "prune", "-f"]);
    assert_eq!(o.ok("prune").trim(), "Deleted Networks:\nagain\np1\np4");
    assert_eq!(names(&alice), ["bridge", "host", "none", "public"]);

    // Unshare: gone for everyone.
    let o = head.fabric(&["network", "unshare", "public"]);
    assert!(o.status.success(), "{o:?}");
    assert!(!names(&bob).contains(&"public".to_string()));
    assert_eq!(op.call("GET", "/shared_networks", None).json(), json!([]));
}

#[test]
fn moby_api_network_cases() {
    let head = DockerHead::start();
    let certs = head.account("carol");
    let mut api = Api::new(&head, &certs);
    let names_of = |r: &HttpResponse| -> Vec<String> {
        r.json()
            .as_array()
            .unwrap_or_else(|| panic!("not a list: {}", String::from_utf8_lossy(&r.body)))
            .iter()
            .map(|n| n["Name"].as_str().unwrap().to_string())
            .collect()
    };

    // GetDefaults, and TestNetworkList: `/networks` and `/networks/` list alike.
    let all = api.call("GET", "/v1.41/networks", None);
    assert_eq!(all.status, 200);
    assert_eq!(all.header("content-type"), Some("application/json"));
    assert_eq!(names_of(&all), ["bridge", "host", "none"]);
    assert_eq!(
        names_of(&api.call("GET", "/v1.41/networks/", None)),
        names_of(&all)
    );
    assert_eq!(
        names_of(&api.call("GET", "/networks", None)),
        names_of(&all)
    );

    // CreateCheckDuplicate: 201, then 409 (also with CheckDuplicate false: by design).
    let r = api.call(
        "POST",
        "/v1.41/networks/create",
        Some(json!({"Name": "dup", "CheckDuplicate": true})),
    );
    assert_eq!(r.status, 201, "{}", r.message());
    let dup_id = r.json()["Id"].as_str().unwrap().to_string();
    assert_eq!(r.json()["Warning"], "");
    for cd in [true, false] {
        let r = api.call(
            "POST",
            "/v1.41/networks/create",
            Some(json!({"Name": "dup", "CheckDuplicate": cd})),
        );
        refused(&r, 409, "network with name dup already exists");
    }

    // TestNetworkInvalidJSON (20.10's words): create, connect, disconnect.
    for ep in [
        "/v1.41/networks/create",
        "/v1.41/networks/bridge/connect",
        "/v1.41/networks/bridge/disconnect",
    ] {
        let r = api.raw("POST", ep, Some("text/plain"), b"{}");
        refused(
            &r,
            400,
            "Content-Type specified (text/plain) must be 'application/json'",
        );
        let r = api.raw("POST", ep, Some("application/json"), b"");
        refused(&r, 400, "got EOF while reading request body");
        let r = api.raw("POST", ep, Some("application/json"), b"{invalid json");
        assert_eq!(r.status, 400, "{ep}: {}", r.message());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(!r.message().is_empty());
    }

    // CreateDeletePredefined.
    for p in ["bridge", "host", "none", "default"] {
        let r = api.call("POST", "/v1.41/networks/create", Some(json!({"Name": p})));
        refused(
            &r,
            403,
            &format!("operation is not permitted on predefined {p} network "),
        );
    }
    for p in ["bridge", "host", "none"] {
        let r = api.call("DELETE", &format!("/v1.41/networks/{p}"), None);
        refused(
            &r,
            403,
            &format!("{p} is a pre-defined network and cannot be removed"),
        );
    }

    // TestDockerNetworkDeletePreferID: the full ID beats a name, a name beats an ID prefix.
    let mk = |api: &mut Api, name: &str| {
        let r = api.call(
            "POST",
            "/v1.41/networks/create",
            Some(json!({"Name": name, "CheckDuplicate": true})),
        );
        assert_eq!(r.status, 201, "{name}: {}", r.message());
        r.json()["Id"].as_str().unwrap().to_string()
    };
    let c_id = mk(&mut api, "testNet");
    let prefix = c_id[..11].to_string();
    mk(&mut api, &prefix);
    mk(&mut api, &c_id);
    let r = api.call("DELETE", &format!("/v1.41/networks/{c_id}"), None);
    assert_eq!(r.status, 204, "{}", r.message());
    let left = names_of(&api.call("GET", "/v1.41/networks", None));
    assert!(!left.contains(&"testNet".to_string()), "{left:?}");
    assert!(left.contains(&prefix) && left.contains(&c_id), "{left:?}");
    let r = api.call("DELETE", &format!("/v1.41/networks/{prefix}"), None);
    assert_eq!(r.status, 204, "{}", r.message());
    let left = names_of(&api.call("GET", "/v1.41/networks", None));
    assert!(!left.contains(&prefix) && left.contains(&c_id), "{left:?}");

    // Filters in both encodings; unknown names refused.
    let q = |f: &str| {
        format!(
            "/v1.41/networks?filters={}",
            fabric::docker::api::percent_encode(f)
        )
    };
    let a = api.call("GET", &q(r#"{"name":{"dup":true}}"#), None);
    let b = api.call("GET", &q(r#"{"name":["dup"]}"#), None);
    assert_eq!(names_of(&a), ["dup"]);
    assert_eq!(a.body, b.body);
    let by_id = api.call(
        "GET",
        &q(&format!(r#"{{"id":["{}"]}}"#, &dup_id[..12])),
        None,
    );
    assert_eq!(names_of(&by_id), ["dup"]);
    assert_eq!(
        names_of(&api.call("GET", &q(r#"{"name":["nothing-like-it"]}"#), None)),
        Vec::<String>::new()
    );
    assert_eq!(
        api.call("GET", &q(r#"{"name":["nothing-like-it"]}"#), None)
            .body,
        b"[]"
    );
    refused(
        &api.call("GET", &q(r#"{"foo":["x"]}"#), None),
        400,
        "Invalid filter 'foo'",
    );
    refused(
        &api.call("GET", &q(r#"{"type":["bogus"]}"#), None),
        400,
        "invalid filter: 'type'='bogus'",
    );
    assert_eq!(api.call("GET", &q("bogus"), None).status, 400);

    // Inspect: by ID, 404s in moby's words, verbose and scope accepted.
    let r = api.call(
        "GET",
        &format!("/v1.41/networks/{dup_id}?verbose=true&scope=local"),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["Name"], "dup");
    let raw = String::from_utf8_lossy(&r.body).to_string();
    assert!(
        raw.starts_with(r#"{"Name":"dup","Id":""#),
        "moby's field order: {raw}"
    );
    refused(
        &api.call("GET", "/v1.41/networks/nosuch", None),
        404,
        "network nosuch not found",
    );
    refused(
        &api.call("DELETE", "/v1.41/networks/nosuch", None),
        404,
        "network nosuch not found",
    );
    refused(
        &api.call(
            "GET",
            &format!("/v1.41/networks/{dup_id}?scope=swarm"),
            None,
        ),
        404,
        &format!("network {dup_id} not found"),
    );
    assert_eq!(
        api.call("GET", "/v1.41/networks/dup?verbose=bogus", None)
            .status,
        400
    );

    // Connect: moby looks the container up first.
    let r = api.call(
        "POST",
        "/v1.41/networks/dup/connect",
        Some(json!({"Container": "nocont"})),
    );
    refused(&r, 404, "No such container: nocont");
    let r = api.call(
        "POST",
        "/v1.41/networks/nonet/disconnect",
        Some(json!({"Container": "nocont", "Force": true})),
    );
    refused(&r, 404, "No such container: nocont");

    // Prune (bodyless POST, as the CLI sends it): until in the past keeps everything, then all.
    let r = api.raw(
        "POST",
        &format!(
            "/v1.41/networks/prune?filters={}",
            fabric::docker::api::percent_encode(r#"{"until":["1h"]}"#)
        ),
        Some("text/plain"),
        b"",
    );
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"NetworksDeleted": null}))
    );
    refused(
        &api.raw(
            "POST",
            &format!(
                "/v1.41/networks/prune?filters={}",
                fabric::docker::api::percent_encode(r#"{"until":["bogus"]}"#)
            ),
            None,
            b"",
        ),
        400,
        "failed to parse value as time or duration: \"bogus\"",
    );
    let r = api.raw("POST", "/v1.41/networks/prune", None, b"");
    assert_eq!(r.status, 200);
    let mut deleted: Vec<String> =
        serde_json::from_value(r.json()["NetworksDeleted"].clone()).unwrap();
    deleted.sort();
    let mut want = vec![c_id.clone(), "dup".to_string()];
    want.sort();
    assert_eq!(deleted, want);
    assert_eq!(
        names_of(&api.call("GET", "/v1.41/networks", None)),
        ["bridge", "host", "none"]
    );

    // Bad input never leaves state and never gets a 500.
    for body in [
        json!({"Name": 5}),
        json!({"Name": "x", "IPAM": {"Config": [{"Subnet": "bogus"}]}}),
        json!({"Name": "x", "IPAM": {"Config": [{"Subnet": "10.1.0.0/24", "IPRange": "10.2.0.0/24"}]}}),
        json!({"Name": "x", "IPAM": {"Config": [{"Subnet": "10.1.0.0/24", "AuxiliaryAddresses": {"a": "10.9.9.9"}}]}}),
        json!({"Name": "x", "Options": {"com.docker.network.driver.mtu": "huge"}}),
        json!({"Name": "x", "Options": {"com.docker.network.driver.mtu": "100"}}),
        json!({"Name": "x", "Labels": ["a"]}),
        json!({"Name": "a\u{0000}b"}),
    ] {
        let r = api.call("POST", "/v1.41/networks/create", Some(body.clone()));
        assert_eq!(r.status, 400, "{body}: {}", r.message());
    }
    assert_eq!(
        names_of(&api.call("GET", "/v1.41/networks", None)),
        ["bridge", "host", "none"]
    );
}

#[test]
fn docker_py_network_cases() {
    if docker_cli::docker_py().is_none() {
        return;
    }
    let head = DockerHead::start();
    let c = DockerClient::new(&head.docker_host(), &head.account("dave"), None);
    let o = c.py(include_str!("docker_py/networks.py"));
    eprintln!("{}{}", o.stdout, o.stderr);
    assert_eq!(
        o.code, 0,
        "docker-py cases failed:\n{}\n{}",
        o.stdout, o.stderr
    );
    assert!(!o.stdout.contains("FAIL"), "{}", o.stdout);
    assert_eq!(
        o.stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        15,
        "{}",
        o.stdout
    );
    // Every case's networks were removed again.
    assert_eq!(names(&c), ["bridge", "host", "none"]);
}
