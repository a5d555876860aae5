//! Docker containers as VMs, against a real head (`fabric control --data DIR --docker-listen`,
//! SQLite in DIR) with one registered server that heartbeats and NO agent: the test plays the
//! agent by posting state reports on the operator socket. Driven by the stock docker CLI over
//! TLS with `fabric account add` certificates: import, create (names, refused fields, `-p`,
//! an unknown network), ps, inspect, start (which waits for the report, posted from a thread
//! while the CLI runs, failing with the reason of a `failed` one), kill, stop (which waits for
//! the report), rename,
//! rm, network connect/disconnect as `network inspect` shows them, the rules `-p` adds and
//! `rm` removes, the feed's container changes, a second account that sees none of it, and a
//! host that falls silent: its running container reads `Dead`, never `Up`.

#[path = "util/docker_cli.rs"]
mod docker_cli;
#[path = "util/docker_head.rs"]
mod docker_head;
#[path = "util/images.rs"]
mod images;
#[path = "util/temp_dir.rs"]
mod temp_dir;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use docker_cli::{docker_cli_present, DockerClient, Out};
use docker_head::DockerHead;
use fabric::control::client::{HttpClient, HttpResponse};
use serde_json::{json, Value};

const SERVER: &str = "5e1f0000-0000-4000-8000-00000000c0de";

/// The head's control API through its operator socket.
struct Operator {
    rt: tokio::runtime::Runtime,
    c: HttpClient,
}

impl Operator {
    fn new(head: &DockerHead) -> Operator {
        Operator {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            c: HttpClient::unix(head.path("control.sock")),
        }
    }

    fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> HttpResponse {
        let r = self.rt.block_on(self.c.json(method, path, body.as_ref()));
        r.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn ok(&mut self, method: &str, path: &str, body: Option<Value>) -> Value {
        let r = self.call(method, path, body);
        assert!(
            r.status < 300,
            "{method} {path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    }

    /// Plays the agent: one state report for the container's VM.
    fn report(&mut self, vm: &str, entry: Value) {
        let mut e = entry;
        e["uuid"] = json!(vm);
        let v = self.ok(
            "POST",
            &format!("/servers/{SERVER}/vm_states"),
            Some(json!({ "vms": [e] })),
        );
        assert_eq!(v["updated"], json!(1), "{v}");
    }
}

fn vm_of(id: &str) -> String {
    let h = &id[..32];
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Plays the agent while `call` (a CLI start, restart or run that asks for generation
/// `generation` of `vm`) runs: moby's start returns once the process runs, and so does the
/// head's, so the report must come while the call waits. A thread waits until `GET /vms/VM`
/// shows that generation, 300 ms more (a call that did not wait returns first), then posts
/// `entry()` for it. Returns the call's result, when it returned, when the report went in
/// (None: the generation never appeared within 20 s, nothing was posted) and the entry posted.
fn reported_during<T>(
    head: &DockerHead,
    vm: &str,
    generation: u64,
    entry: impl FnOnce() -> Value + Send + 'static,
    call: impl FnOnce() -> T,
) -> (T, Instant, Option<(Instant, Value)>) {
    let reporter = {
        let sock = head.path("control.sock");
        let vm = vm.to_string();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut c = HttpClient::unix(sock);
            let t0 = Instant::now();
            loop {
                let r = rt
                    .block_on(c.json("GET", &format!("/vms/{vm}"), None))
                    .unwrap();
                if r.json()["generation"].as_u64() >= Some(generation) {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(20) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(300));
            let mut e = entry();
            e["uuid"] = json!(vm);
            e["generation"] = json!(generation);
            let body = json!({ "vms": [e.clone()] });
            let r = rt
                .block_on(c.json("POST", &format!("/servers/{SERVER}/vm_states"), Some(&body)))
                .unwrap();
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            assert_eq!(r.json()["updated"], json!(1), "{e}");
            Some((Instant::now(), e))
        })
    };
    let t0 = Instant::now();
    let out = call();
    let returned = Instant::now();
    let reported = reporter.join().expect("the reporter thread panicked");
    if let Some((at, _)) = &reported {
        eprintln!(
            "{vm} generation {generation}: the call returned {:?} after it began, {:?} after \
             the report",
            returned - t0,
            returned.saturating_duration_since(*at)
        );
    }
    (out, returned, reported)
}

/// `docker ARGS`, a start, restart or run that starts generation `generation` of `vm`, with
/// the agent's `running` report posted while it waits: asserts that the call succeeded and
/// returned only after the report. Returns the report's `started_at`.
fn start_reported(
    cli: &DockerClient,
    head: &DockerHead,
    vm: &str,
    generation: u64,
    args: &[&str],
) -> i64 {
    let (out, returned, reported) = reported_during(
        head,
        vm,
        generation,
        || json!({"state": "running", "started_at": now_ms()}),
        || cli.run(args),
    );
    out.ok(&format!("docker {args:?}"));
    let (at, entry) =
        reported.unwrap_or_else(|| panic!("docker {args:?}: generation {generation} never asked"));
    assert!(
        returned >= at,
        "docker {args:?} returned before the agent reported generation {generation}"
    );
    entry["started_at"].as_i64().unwrap()
}

fn refused(out: &Out, what: &str, words: &str) {
    assert_ne!(out.code, 0, "{what} should be refused: {}", out.summary());
    assert!(
        out.stderr.contains(words),
        "{what}: expected {words:?} in stderr: {}",
        out.summary()
    );
}

#[test]
fn container_lifecycle_with_the_docker_cli_and_a_simulated_agent() {
    if !docker_cli_present() {
        eprintln!("SKIP: the docker CLI is not installed");
        return;
    }
    let head = DockerHead::start_with(&["--heartbeat-lifetime", "3"]);
    let mut op = Operator::new(&head);
    // One server, heartbeating from a thread until told to fall silent.
    op.ok(
        "PUT",
        &format!("/servers/{SERVER}"),
        Some(json!({"hostname": "cn1", "underlay_ip": "192.0.2.10"})),
    );
    let beating = Arc::new(AtomicBool::new(true));
    let hb = {
        let beating = beating.clone();
        let sock = head.path("control.sock");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut c = HttpClient::unix(sock);
            while beating.load(Ordering::SeqCst) {
                let _ = rt.block_on(c.json("POST", &format!("/servers/{SERVER}/heartbeat"), None));
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };

    let alice = DockerClient::new(&head.docker_host(), &head.account("alice"), None);
    let bob = DockerClient::new(&head.docker_host(), &head.account("bob"), None);
    let work = temp_dir::TempDir::new("containers");
    let rootfs = work.0.join("rootfs.tar");
    images::busybox_rootfs_tar(&rootfs);
    alice
        .run(&[
            "import",
            "--change",
            "CMD [\"sh\"]",
            rootfs.to_str().unwrap(),
            "busybox:latest",
        ])
        .ok("docker import");

    // create --name → Created in ps -a, not in ps.
    let id = alice
        .run(&[
            "create",
            "--name",
            "web",
            "-p",
            "80",
            "--label",
            "role=front",
            "busybox",
            "sleep",
            "1000",
        ])
        .ok("docker create")
        .trim()
        .to_string();
    assert_eq!(id.len(), 64, "{id}");
    let vm = vm_of(&id);
    let ps = alice.run(&[
        "ps",
        "-a",
        "--format",
        "{{.Names}}|{{.Status}}|{{.Ports}}|{{.Command}}",
    ]);
    assert_eq!(
        ps.ok("ps -a").trim(),
        "web|Created|0.0.0.0:80->80/tcp|\"sleep 1000\""
    );
    assert_eq!(alice.run(&["ps", "-q"]).ok("ps").trim(), "");
    // The name is taken.
    let out = alice.run(&["create", "--name", "web", "busybox"]);
    refused(&out, "a second web", "is already in use by container");
    // inspect: the fields the CLI prints, and the Node.
    let insp = alice.run(&["inspect", "web"]);
    let v: Value = serde_json::from_str(insp.ok("inspect")).unwrap();
    let c = &v[0];
    assert_eq!(c["Id"], json!(id));
    assert_eq!(c["Name"], json!("/web"));
    assert_eq!(c["State"]["Status"], json!("created"));
    assert_eq!(c["State"]["Running"], json!(false));
    assert_eq!(c["Path"], json!("sleep"));
    assert_eq!(c["Args"], json!(["1000"]));
    assert_eq!(c["Config"]["Hostname"], json!(&id[..12]));
    assert_eq!(c["Config"]["Labels"]["role"], json!("front"));
    assert_eq!(c["Node"]["ID"], json!(SERVER));
    assert_eq!(c["Node"]["Name"], json!("cn1"));
    assert!(c["Image"].as_str().unwrap().starts_with("sha256:"));
    let nets = c["NetworkSettings"]["Networks"].as_object().unwrap();
    assert_eq!(nets.len(), 1, "{nets:?}");
    let (net_name, ep) = nets.iter().next().unwrap();
    let ip = ep["IPAddress"].as_str().unwrap().to_string();
    assert!(
        !ip.is_empty() && ep["IPPrefixLen"].as_u64().unwrap() > 0,
        "{ep}"
    );
    assert!(ep["MacAddress"].as_str().unwrap().len() == 17, "{ep}");
    assert_eq!(ep["EndpointID"].as_str().unwrap().len(), 64);
    assert_eq!(
        c["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"],
        json!("80")
    );
    // The VM: a container spec, desired stopped, generation 0, firewall on, sdc_docker.
    let vmj = op.ok("GET", &format!("/vms/{vm}"), None);
    assert_eq!(vmj["container"]["id"], json!(id));
    assert_eq!(vmj["desired_state"], json!("stopped"));
    assert_eq!(vmj["generation"], json!(0));
    assert_eq!(vmj["firewall_enabled"], json!(true));
    assert_eq!(vmj["tags"]["sdc_docker"], json!(true));
    assert!(vmj["container"]["uid_base"].as_u64().unwrap() >= 1 << 20);
    // `-p 80` added a publish rule, and the account's rules exist.
    let rules = op.ok("GET", &format!("/rules?vm={vm}"), None);
    let texts: Vec<&str> = rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains(&vm) && t.contains("ALLOW tcp") && t.contains("80")),
        "{texts:?}"
    );
    let all_rules = op.ok("GET", "/rules", None).to_string();
    assert!(all_rules.contains("sdc_docker"), "{all_rules}");

    // start: desired running, generation 1; returns once the agent reports it running → Up.
    let started = start_reported(&alice, &head, &vm, 1, &["start", "web"]);
    let vmj = op.ok("GET", &format!("/vms/{vm}"), None);
    assert_eq!(vmj["desired_state"], json!("running"));
    assert_eq!(vmj["generation"], json!(1));
    assert_eq!(vmj["run_generation"], json!(1));
    let ps = alice.run(&["ps", "--format", "{{.Names}}|{{.Status}}"]);
    let line = ps.ok("ps").trim().to_string();
    assert!(line.starts_with("web|Up "), "{line}");
    // start again: 304, the CLI says nothing and exits 0.
    alice.run(&["start", "web"]).ok("docker start (running)");
    assert_eq!(
        op.ok("GET", &format!("/vms/{vm}"), None)["generation"],
        json!(1)
    );

    // kill → signal recorded; the agent reports it died with 137.
    alice.run(&["kill", "web"]).ok("docker kill");
    let vmj = op.ok("GET", &format!("/vms/{vm}"), None);
    assert_eq!(vmj["signal"], json!({"id": 1, "signal": "SIGKILL"}));
    op.report(
        &vm,
        json!({"state": "stopped", "generation": 1, "exit_status": 137, "started_at": started,
               "finished_at": now_ms()}),
    );
    let ps = alice.run(&["ps", "-a", "--format", "{{.Names}}|{{.Status}}"]);
    let line = ps.ok("ps -a").trim().to_string();
    assert!(line.starts_with("web|Exited (137) "), "{line}");
    let out = alice.run(&["kill", "web"]);
    refused(&out, "kill of a stopped container", "is not running");
    let st = alice.run(&[
        "inspect",
        "-f",
        "{{.State.Status}} {{.State.ExitCode}}",
        "web",
    ]);
    assert_eq!(st.ok("inspect").trim(), "exited 137");

    // start again → generation 2; stop -t 1 waits for the report, posted from a thread.
    start_reported(&alice, &head, &vm, 2, &["start", "web"]);
    assert_eq!(
        op.ok("GET", &format!("/vms/{vm}"), None)["generation"],
        json!(2)
    );
    let reporter = {
        let sock = head.path("control.sock");
        let vm = vm.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut c = HttpClient::unix(sock);
            // Wait for the stop to be asked for, then report the process gone.
            let t0 = Instant::now();
            loop {
                let r = rt
                    .block_on(c.json("GET", &format!("/vms/{vm}"), None))
                    .unwrap();
                if r.json()["desired_state"] == json!("stopped") {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(20), "stop never asked");
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(300));
            let body = json!({"vms": [{"uuid": vm, "state": "stopped", "generation": 2,
                "exit_status": 143, "finished_at": now_ms()}]});
            let r = rt
                .block_on(c.json("POST", &format!("/servers/{SERVER}/vm_states"), Some(&body)))
                .unwrap();
            assert_eq!(r.status, 200);
            Instant::now()
        })
    };
    let t0 = Instant::now();
    alice.run(&["stop", "-t", "1", "web"]).ok("docker stop");
    let returned = Instant::now();
    let reported = reporter.join().unwrap();
    eprintln!(
        "docker stop returned {:?} after it started, {:?} after the report",
        returned - t0,
        returned.saturating_duration_since(reported)
    );
    assert!(
        returned >= reported,
        "stop returned before the agent reported"
    );
    assert_eq!(
        op.ok("GET", &format!("/vms/{vm}"), None)["stop_timeout"],
        json!(1)
    );
    // stop of a stopped container: 304, exit 0.
    alice.run(&["stop", "web"]).ok("docker stop (stopped)");

    // The feed: container changes with their details.
    let feed = op.ok("GET", "/changes?since=0&limit=1000", None);
    let mine: Vec<(String, Value)> = feed["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == json!("container") && c["uuid"] == json!(vm))
        .map(|c| {
            (
                c["action"].as_str().unwrap().to_string(),
                c["detail"].clone(),
            )
        })
        .collect();
    let actions: Vec<&str> = mine.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        actions,
        ["create", "start", "kill", "die", "start", "stop", "die"],
        "{mine:?}"
    );
    assert_eq!(mine[2].1, json!({"signal": "SIGKILL"}));
    assert_eq!(mine[3].1, json!({"exit_code": 137}));
    assert_eq!(mine[6].1, json!({"exit_code": 143}));

    // The VMAPI-shaped actions the Docker verbs use, on the operator API.
    let v = op.ok("POST", &format!("/vms/{vm}?action=kill&signal=HUP"), None);
    assert_eq!(v["signal"], json!({"id": 2, "signal": "SIGHUP"}));
    let v = op.ok("POST", &format!("/vms/{vm}?action=kill&signal=9"), None);
    assert_eq!(v["signal"], json!({"id": 3, "signal": "SIGKILL"}));
    let r = op.call("POST", &format!("/vms/{vm}?action=kill&signal=BOGUS"), None);
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let v = op.ok("POST", &format!("/vms/{vm}?action=reboot&timeout=5"), None);
    assert_eq!(
        (
            v["generation"].clone(),
            v["stop_timeout"].clone(),
            v["desired_state"].clone()
        ),
        (json!(3), json!(5), json!("running"))
    );
    let v = op.ok("POST", &format!("/vms/{vm}?action=stop&timeout=2"), None);
    assert_eq!(
        (v["desired_state"].clone(), v["stop_timeout"].clone()),
        (json!("stopped"), json!(2))
    );
    assert_eq!(v["exit_status"], json!(143));
    assert!(v["finished_at"].as_str().unwrap().ends_with('Z'), "{v}");
    // POST /vms with a container spec that fails its check: a field error, nothing created.
    let r = op.call(
        "POST",
        "/vms",
        Some(json!({"owner_uuid": vmj["owner_uuid"], "networks": [],
                    "container": {"cmd": ["sh"], "uid_base": 0}})),
    );
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("container"));
    // ps filters.
    let f = |args: &[&str]| {
        let mut a = vec!["ps", "-a", "--format", "{{.Names}}"];
        a.extend_from_slice(args);
        alice.run(&a).ok("ps --filter").trim().to_string()
    };
    assert_eq!(f(&["--filter", "name=we"]), "web");
    assert_eq!(f(&["--filter", "name=nope"]), "");
    assert_eq!(f(&["--filter", "status=exited"]), "web");
    assert_eq!(f(&["--filter", "status=running"]), "");
    assert_eq!(f(&["--filter", "label=role=front"]), "web");
    assert_eq!(f(&["--filter", "label=role=back"]), "");
    assert_eq!(f(&["--filter", &format!("id={}", &id[..8])]), "web");
    assert_eq!(f(&["--filter", &format!("network={net_name}")]), "web");
    let out = alice.run(&["ps", "--filter", "colour=red"]);
    refused(&out, "an unknown ps filter", "Invalid filter");

    // rename.
    alice.run(&["rename", "web", "web2"]).ok("docker rename");
    let names = alice.run(&["ps", "-a", "--format", "{{.Names}}"]);
    assert_eq!(names.ok("ps -a").trim(), "web2");

    // network connect/disconnect change network inspect.
    alice
        .run(&["network", "create", "--subnet", "10.44.0.0/24", "back"])
        .ok("network create");
    alice
        .run(&["network", "connect", "--ip", "10.44.0.9", "back", "web2"])
        .ok("network connect");
    let ni = alice.run(&["network", "inspect", "-f", "{{json .Containers}}", "back"]);
    let cs: Value = serde_json::from_str(ni.ok("network inspect").trim()).unwrap();
    assert_eq!(cs[&id]["Name"], json!("web2"), "{cs}");
    assert_eq!(cs[&id]["IPv4Address"], json!("10.44.0.9/24"), "{cs}");
    let out = alice.run(&["network", "connect", "back", "web2"]);
    refused(&out, "a second connect", "already exists in network back");
    let out = alice.run(&["network", "rm", "back"]);
    refused(&out, "rm of a network in use", "has active endpoints");
    let insp = alice.run(&[
        "inspect",
        "-f",
        "{{json .NetworkSettings.Networks}}",
        "web2",
    ]);
    let nets: Value = serde_json::from_str(insp.ok("inspect").trim()).unwrap();
    assert_eq!(nets["back"]["IPAddress"], json!("10.44.0.9"), "{nets}");
    assert_eq!(
        nets["back"]["IPAMConfig"],
        json!({"IPv4Address": "10.44.0.9"}),
        "{nets}"
    );
    assert_eq!(nets[net_name.as_str()]["IPAMConfig"], Value::Null, "{nets}");
    assert!(nets.get(net_name).is_some(), "{nets}");
    alice
        .run(&["network", "disconnect", "back", "web2"])
        .ok("network disconnect");
    let ni = alice.run(&["network", "inspect", "-f", "{{json .Containers}}", "back"]);
    assert_eq!(ni.ok("network inspect").trim(), "{}");
    let out = alice.run(&["network", "disconnect", "back", "web2"]);
    refused(
        &out,
        "a second disconnect",
        "is not connected to network back",
    );

    // --network NAME --ip at create.
    alice
        .run(&[
            "create",
            "--name",
            "fixed",
            "--network",
            "back",
            "--ip",
            "10.44.0.20",
            "busybox",
            "true",
        ])
        .ok("create --ip");
    let insp = alice.run(&[
        "inspect",
        "-f",
        "{{json .NetworkSettings.Networks}}",
        "fixed",
    ]);
    let nets: Value = serde_json::from_str(insp.ok("inspect").trim()).unwrap();
    assert_eq!(nets.as_object().unwrap().len(), 1, "{nets}");
    assert_eq!(nets["back"]["IPAddress"], json!("10.44.0.20"), "{nets}");
    assert_eq!(
        nets["back"]["IPAMConfig"]["IPv4Address"],
        json!("10.44.0.20"),
        "{nets}"
    );
    let out = alice.run(&[
        "create",
        "--network",
        "back",
        "--ip",
        "10.44.0.20",
        "busybox",
        "true",
    ]);
    assert_ne!(out.code, 0, "a taken IP: {}", out.summary());
    alice.run(&["rm", "fixed"]).ok("rm fixed");

    // The other account sees none of it.
    assert_eq!(bob.run(&["ps", "-aq"]).ok("bob ps").trim(), "");
    for args in [
        vec!["inspect", "--type", "container", "web2"],
        vec!["stop", "web2"],
        vec!["rm", "web2"],
        vec!["kill", &id[..12]],
    ] {
        let out = bob.run(&args);
        refused(&out, &format!("bob: {args:?}"), "No such container");
    }

    // rm: publish rules go with it.
    let out = alice.run(&["rm", "web2"]);
    assert_eq!(out.code, 0, "{}", out.summary());
    assert_eq!(alice.run(&["ps", "-aq"]).ok("ps").trim(), "");
    let rules = op.ok("GET", &format!("/rules?vm={vm}"), None);
    assert_eq!(rules, json!([]), "publish rules stay after rm");
    assert_eq!(
        op.ok("GET", &format!("/vms/{vm}"), None)["state"],
        json!("destroyed")
    );

    // prune removes what is not running.
    alice
        .run(&["create", "--name", "p1", "busybox"])
        .ok("create p1");
    alice
        .run(&["create", "--name", "p2", "busybox"])
        .ok("create p2");
    let out = alice.run(&["container", "prune", "-f"]);
    assert!(
        out.ok("container prune").lines().count() >= 3,
        "{}",
        out.summary()
    );
    assert_eq!(
        alice.run(&["ps", "-aq"]).ok("ps").trim(),
        "",
        "prune left containers"
    );

    // Refused create fields, each a 4xx through the CLI, naming the field.
    for (args, words) in [
        (vec!["--privileged"], "HostConfig.Privileged"),
        (vec!["-v", "/:/x"], "HostConfig.Binds"),
        (vec!["--network", "host"], "HostConfig.NetworkMode=host"),
        (vec!["--cap-add", "NET_ADMIN"], "HostConfig.CapAdd"),
        (vec!["--device", "/dev/null:/dev/x"], "HostConfig.Devices"),
        (vec!["--pid", "host"], "HostConfig.PidMode=host"),
        (
            vec!["-p", "8080:80"],
            "remapping of port numbers not allowed",
        ),
        (vec!["--user", "nobody"], "numeric"),
    ] {
        let mut a = vec!["create"];
        a.extend(args.iter().copied());
        a.push("busybox");
        let out = alice.run(&a);
        refused(&out, &format!("create {args:?}"), words);
    }
    assert_eq!(
        alice.run(&["ps", "-aq"]).ok("ps").trim(),
        "",
        "a refused create left a container"
    );

    // `--rm`: the process ends → the container goes, with its publish rules.
    let id3 = alice
        .run(&["create", "--rm", "-p", "81", "busybox", "true"])
        .ok("create --rm")
        .trim()
        .to_string();
    let vm3 = vm_of(&id3);
    start_reported(&alice, &head, &vm3, 1, &["start", &id3[..12]]);
    assert_eq!(
        op.ok("GET", &format!("/rules?vm={vm3}"), None)
            .as_array()
            .unwrap()
            .len(),
        1
    );
    op.report(
        &vm3,
        json!({"state": "stopped", "generation": 1, "exit_status": 0, "finished_at": now_ms()}),
    );
    assert_eq!(
        alice.run(&["ps", "-aq"]).ok("ps").trim(),
        "",
        "--rm left the container"
    );
    assert_eq!(op.ok("GET", &format!("/rules?vm={vm3}"), None), json!([]));
    let vmj = op.ok("GET", &format!("/vms/{vm3}"), None);
    assert_eq!(
        (vmj["state"].clone(), vmj["exit_status"].clone()),
        (json!("destroyed"), json!(0))
    );

    // A host that cannot start the new generation reports it failed: start is a 500 with the
    // reason (the CLI exits 1), and the container reads exited with that error.
    let id4 = alice
        .run(&["create", "--name", "doomed", "busybox", "true"])
        .ok("create doomed")
        .trim()
        .to_string();
    let vm4 = vm_of(&id4);
    let why = "fetching layer sha256:0123: connection refused";
    let (out, returned, reported) = reported_during(
        &head,
        &vm4,
        1,
        move || json!({"state": "failed", "reason": why}),
        || alice.run(&["start", "doomed"]),
    );
    let (at, _) = reported.expect("start of doomed never made generation 1");
    assert_eq!(
        out.code,
        1,
        "start of a failed container: {}",
        out.summary()
    );
    assert!(
        out.stderr.contains("could not start it") && out.stderr.contains(why),
        "the reason is not in stderr: {}",
        out.summary()
    );
    assert!(returned >= at, "start returned before the failure report");
    let st = alice.run(&[
        "inspect",
        "-f",
        "{{.State.Status}}|{{.State.Error}}",
        "doomed",
    ]);
    assert_eq!(st.ok("inspect doomed").trim(), format!("exited|{why}"));
    alice.run(&["rm", "doomed"]).ok("rm doomed");

    // An unknown network: create succeeds (no pull), start is 404.
    let id2 = alice
        .run(&[
            "create",
            "--name",
            "lonely",
            "--network",
            "nowhere",
            "busybox",
        ])
        .ok("create on an unknown network")
        .trim()
        .to_string();
    assert_eq!(id2.len(), 64);
    let out = alice.run(&["start", "lonely"]);
    refused(
        &out,
        "start on an unknown network",
        "network nowhere not found",
    );
    // Once the network exists, start attaches it.
    let vm2 = vm_of(&id2);
    assert_eq!(
        op.ok("GET", &format!("/vms/{vm2}"), None)["generation"],
        json!(0),
        "a start refused for its network made a generation"
    );
    alice
        .run(&["network", "create", "nowhere"])
        .ok("network create nowhere");
    start_reported(&alice, &head, &vm2, 1, &["start", "lonely"]);
    let ni = alice.run(&["network", "inspect", "-f", "{{len .Containers}}", "nowhere"]);
    assert_eq!(ni.ok("network inspect").trim(), "1");

    // A running container whose host falls silent reads Dead, never Up.
    let ps = alice.run(&["ps", "--format", "{{.Names}}|{{.Status}}"]);
    assert!(
        ps.ok("ps").trim().starts_with("lonely|Up"),
        "{}",
        ps.summary()
    );
    // restart -t 1: a new generation; returns once the agent reports it running.
    start_reported(&alice, &head, &vm2, 2, &["restart", "-t", "1", "lonely"]);
    let out = alice.run(&["rm", "lonely"]);
    refused(
        &out,
        "rm of a running container",
        "You cannot remove a running container",
    );
    beating.store(false, Ordering::SeqCst);
    hb.join().unwrap();
    let t0 = Instant::now();
    loop {
        let ps = alice.run(&["ps", "-a", "--format", "{{.Names}}|{{.Status}}"]);
        let line = ps.ok("ps -a").trim().to_string();
        if line == "lonely|Dead" {
            eprintln!("silent host read as Dead after {:?}", t0.elapsed());
            break;
        }
        assert!(line.starts_with("lonely|Up"), "{line}");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "still {line} 30 s after the heartbeats stopped (lifetime 3 s)"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        alice.run(&["ps", "-q"]).ok("ps").trim(),
        "",
        "a dead container listed by ps"
    );
    let out = alice.run(&["rm", "lonely"]);
    assert_eq!(out.code, 0, "rm of a dead container: {}", out.summary());
}

#[path = "util/temp_db.rs"]
mod temp_db;

/// A store made before containers (no `fabric_changes.detail`, no `docker_accounts.uid_index`)
/// is migrated when the control plane prepares it: the columns appear, existing accounts get
/// UID-range indexes in creation order, a new account the next one, and old feed rows read
/// with no detail.
#[test]
fn an_old_store_gets_the_detail_column_and_uid_ranges() {
    use fabric::control::changes::{self, FeedQuery};
    use fabric::control::db::Db;
    use portolan::store;

    let tdb = temp_db::TempDb::new("migrate-containers");
    {
        let c = rusqlite::Connection::open(&tdb.0).unwrap();
        c.execute_batch(
            "CREATE TABLE fabric_changes (seq BIGINT PRIMARY KEY, kind TEXT NOT NULL,
                uuid TEXT NOT NULL, action TEXT NOT NULL, owner_uuid TEXT,
                servers TEXT NOT NULL, time_ms BIGINT NOT NULL);
             INSERT INTO fabric_changes VALUES (1, 'vm', 'u', 'create', NULL, '', 1000);
             CREATE TABLE docker_accounts (uuid TEXT PRIMARY KEY, login TEXT NOT NULL UNIQUE,
                created_ms BIGINT NOT NULL, removed_ms BIGINT, default_network TEXT);
             INSERT INTO docker_accounts (uuid, login, created_ms) VALUES ('b', 'second', 20);
             INSERT INTO docker_accounts (uuid, login, created_ms) VALUES ('a', 'first', 10);",
        )
        .unwrap();
    }
    let st = store::open(&tdb.url()).unwrap();
    fabric::control::prepare(&*st, &fabric::control::Config::default()).unwrap();
    // Twice: idempotent.
    fabric::control::prepare(&*st, &fabric::control::Config::default()).unwrap();
    store::with_txn(&*st, |tx| {
        let mut d = Db::from(tx.raw());
        let base = |d: &mut Db<'_>, u: &str| fabric::docker::accounts::uid_base(d, u).unwrap();
        let (a, b) = (base(&mut d, "a"), base(&mut d, "b"));
        assert_eq!(a, fabric::control::container_spec::UID_BASE_START);
        assert_eq!(b, a + fabric::control::container_spec::UID_RANGE);
        let c = fabric::docker::accounts::create(&mut d, "third").unwrap();
        assert_eq!(
            base(&mut d, &c.uuid),
            a + 2 * fabric::control::container_spec::UID_RANGE
        );
        let page = changes::read(
            &mut d,
            &FeedQuery {
                since: 0,
                server_uuid: None,
                limit: 10,
            },
        )
        .unwrap();
        assert_eq!(page.changes.len(), 1);
        assert_eq!(page.changes[0].detail, None);
        assert_eq!(page.changes[0].to_json()["detail"], Value::Null);
        Ok::<_, fabric::control::error::OpError>(())
    })
    .unwrap();
}

/// docker-py's container-dependent network cases (its `test_create_with_ipv4_address`,
/// `test_connect_and_disconnect_container`, `test_connect_on_container_create`) against the
/// same head shape: create with `networking_config`, connect with `ipv4_address`, disconnect.
#[test]
fn docker_py_network_cases_with_containers() {
    let Some(_) = docker_cli::docker_py() else {
        eprintln!("SKIP: docker-py is not installed");
        return;
    };
    if !docker_cli_present() {
        eprintln!("SKIP: the docker CLI is not installed");
        return;
    }
    let head = DockerHead::start();
    let mut op = Operator::new(&head);
    op.ok(
        "PUT",
        &format!("/servers/{SERVER}"),
        Some(json!({"hostname": "cn1", "underlay_ip": "192.0.2.10"})),
    );
    op.ok("POST", &format!("/servers/{SERVER}/heartbeat"), None);
    let alice = DockerClient::new(&head.docker_host(), &head.account("alice"), None);
    let work = temp_dir::TempDir::new("containers-py");
    let rootfs = work.0.join("rootfs.tar");
    images::busybox_rootfs_tar(&rootfs);
    alice
        .run(&[
            "import",
            "--change",
            "CMD [\"sh\"]",
            rootfs.to_str().unwrap(),
            "busybox:latest",
        ])
        .ok("docker import");
    let out = alice.py(
        r#"
import docker
c = docker.from_env(version="1.41")
api = c.api
ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet="172.28.0.0/16")])
net = api.create_network("pynet", ipam=ipam)["Id"]
# test_create_with_ipv4_address
ctr = api.create_container(
    "busybox", "top",
    host_config=api.create_host_config(network_mode="pynet"),
    networking_config=api.create_networking_config(
        {"pynet": api.create_endpoint_config(ipv4_address="172.28.5.24")}),
)
data = api.inspect_container(ctr)
assert data["NetworkSettings"]["Networks"]["pynet"]["IPAMConfig"]["IPv4Address"] == "172.28.5.24", data
assert data["NetworkSettings"]["Networks"]["pynet"]["IPAddress"] == "172.28.5.24"
# test_connect_and_disconnect_container
other = api.create_container("busybox", "top")
api.connect_container_to_network(other, net, ipv4_address="172.28.5.25")
ids = list(api.inspect_network(net)["Containers"].keys())
assert sorted(ids) == sorted([ctr["Id"], other["Id"]]), ids
api.disconnect_container_from_network(other, net)
assert list(api.inspect_network(net)["Containers"].keys()) == [ctr["Id"]]
try:
    api.disconnect_container_from_network(other, net)
    raise SystemExit("a second disconnect succeeded")
except docker.errors.APIError as e:
    assert "is not connected to network" in str(e), e
# names, removal, and the network freed
api.remove_container(ctr)
api.remove_container(other)
assert api.containers(all=True) == []
api.remove_network(net)
print("ok")
"#,
    );
    assert_eq!(out.ok("docker-py").trim(), "ok", "{}", out.summary());
}
