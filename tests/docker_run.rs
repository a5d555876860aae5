//! `docker run` on a three-host cluster made by `fabric up`/`--join` (simulated hosts of
//! tests/util/cluster.rs), with the stock docker CLI over TLS as two accounts: containers land on
//! every host, reach each other over the overlay, are reachable from others only on published
//! ports, are real containers (namespaces, user mapping, PID 1), and read as not running when
//! their host falls silent. Every convergence check allows 10x its goal and prints what it saw.

#[path = "util/cluster.rs"]
mod cluster;
#[path = "util/docker_cli.rs"]
mod docker_cli;
#[path = "util/fab.rs"]
mod fab;
#[path = "util/images.rs"]
mod images;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster::root_or_skip;
use docker_cli::{docker_cli_present, docker_py, DockerClient, Out};
use fab::{start_up_cluster, wait_until, Fab};
use serde_json::Value;

/// A host falls silent: its containers must read as not running within the heartbeat bound
/// (11 s); the check allows 10x.
const SILENT_BOUND: Duration = Duration::from_secs(11);

/// An account and the stock CLI for it, run inside host `from`'s network namespace.
fn account(f: &Fab, login: &str, from: usize) -> DockerClient {
    let dir: PathBuf = f.c.dir.join(format!("account-{login}"));
    f.head(&["account", "add", login, "--cert-dir", dir.to_str().unwrap()]);
    DockerClient::new(
        &format!("tcp://{}:2376", f.c.hosts[0].ip),
        &dir,
        Some(&f.c.hosts[from].ns),
    )
}

fn ok(o: Out, what: &str) -> String {
    assert_eq!(o.code, 0, "{what}: {}", o.summary());
    o.stdout
}

fn inspect(d: &DockerClient, name: &str) -> Value {
    let out = ok(d.run(&["inspect", name]), &format!("inspect {name}"));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v[0].clone()
}

fn ip_of(c: &Value) -> String {
    let nets = c["NetworkSettings"]["Networks"]
        .as_object()
        .expect("Networks");
    nets.values()
        .next()
        .and_then(|n| n["IPAddress"].as_str())
        .expect("an IPAddress")
        .to_string()
}

/// The VM UUID of a container ID (its first 32 hex digits).
fn vm_of(id: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &id[0..8],
        &id[8..12],
        &id[12..16],
        &id[16..20],
        &id[20..32]
    )
}

/// `docker exec NAME sh -c SCRIPT`.
fn sh(d: &DockerClient, name: &str, script: &str) -> Out {
    d.run(&["exec", name, "sh", "-c", script])
}

fn import_busybox(d: &DockerClient, dir: &Path) {
    let tar = dir.join("busybox-rootfs.tar");
    if !tar.exists() {
        images::busybox_rootfs_tar(&tar);
    }
    ok(
        d.run(&["import", tar.to_str().unwrap(), "busybox:latest"]),
        "import busybox",
    );
}

/// Lines of `docker ps` after the header.
fn ps(d: &DockerClient, all: bool) -> Vec<String> {
    let mut args = vec!["ps", "--format", "{{.Names}} {{.Status}}"];
    if all {
        args.push("-a");
    }
    ok(d.run(&args), "ps").lines().map(str::to_string).collect()
}

#[test]
fn docker_run_across_the_cluster() {
    if !root_or_skip("docker_run_across_the_cluster") {
        return;
    }
    if !docker_cli_present() {
        panic!("the stock docker CLI is missing: run scripts/setup.d/40-docker.sh");
    }
    let (mut f, servers) = start_up_cluster(3, &[]);
    let alice = account(&f, "alice", 1);
    let bob = account(&f, "bob", 2);
    import_busybox(&alice, &f.c.dir);
    import_busybox(&bob, &f.c.dir);

    // Attached runs: the output, then the container's exit code.
    let t0 = Instant::now();
    let o = alice.run(&["run", "--rm", "busybox", "echo", "hi"]);
    eprintln!("docker run --rm busybox echo hi: {:?}", t0.elapsed());
    assert_eq!((o.code, o.stdout.as_str()), (0, "hi\n"), "{}", o.summary());
    let o = alice.run(&["run", "--rm", "busybox", "sh", "-c", "exit 3"]);
    assert_eq!(o.code, 3, "{}", o.summary());

    // A real container: PID 1 is the command, the hostname is the short ID, root inside is an
    // unprivileged UID outside, its namespaces are not the host's.
    let o = alice.run(&[
        "run",
        "--name",
        "proof",
        "busybox",
        "sh",
        "-c",
        "echo $$; hostname; cat /proc/self/uid_map; for n in pid mnt uts ipc user net; do readlink /proc/self/ns/$n; done",
    ]);
    assert_eq!(o.code, 0, "{}", o.summary());
    let lines: Vec<&str> = o.stdout.lines().collect();
    eprintln!("inside a container: {lines:?}");
    assert_eq!(lines[0], "1", "PID 1 is the command");
    let proof = inspect(&alice, "proof");
    let id = proof["Id"].as_str().unwrap();
    assert_eq!(lines[1], &id[..12], "hostname = short ID");
    let map: Vec<u64> = lines[2]
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(map[0], 0);
    assert!(map[1] >= 1 << 20, "root inside maps to {} outside", map[1]);
    for (i, n) in ["pid", "mnt", "uts", "ipc", "user", "net"]
        .iter()
        .enumerate()
    {
        let host = std::fs::read_link(format!("/proc/self/ns/{n}")).unwrap();
        assert_ne!(
            lines[3 + i],
            host.to_str().unwrap(),
            "the {n} namespace is the host's"
        );
    }
    ok(alice.run(&["rm", "proof"]), "rm proof");

    // Three detached servers land on the three hosts.
    let mut ips = Vec::new();
    let mut nodes = BTreeSet::new();
    for i in 0..3 {
        let name = format!("web{i}");
        ok(
            alice.run(&[
                "run", "-d", "--name", &name, "busybox", "httpd", "-f", "-p", "8000", "-h", "/etc",
            ]),
            &format!("run -d {name}"),
        );
        let c = inspect(&alice, &name);
        assert_eq!(c["State"]["Running"], true, "{c}");
        nodes.insert(c["Node"]["ID"].as_str().unwrap_or("").to_string());
        ips.push(ip_of(&c));
    }
    let expected: BTreeSet<String> = servers.iter().cloned().collect();
    assert_eq!(nodes, expected, "one container per host");
    eprintln!("web0..2 at {ips:?}");
    // From web0, the others by IP: TCP and ping, across hosts.
    for (i, ip) in ips.iter().enumerate().skip(1) {
        let script = format!("timeout 5 wget -q -O- http://{ip}:8000/hostname");
        let (out, t) = wait_until(
            &format!("web0 -> web{i} tcp"),
            Duration::from_secs(10),
            || {
                let o = sh(&alice, "web0", &script);
                if o.code == 0 {
                    Ok(o.stdout)
                } else {
                    Err(o.summary())
                }
            },
        );
        let want = inspect(&alice, &format!("web{i}"));
        assert_eq!(out.trim(), &want["Id"].as_str().unwrap()[..12]);
        eprintln!("web0 -> web{i} over TCP after {t:?}");
        // ICMP from web0's network stack (its namespace, with the host's iputils ping, which
        // uses an ICMP datagram socket: busybox 1.35's ping insists on a raw socket, which root
        // of a container's user namespace may not open on a host-made network namespace).
        let web0 = inspect(&alice, "web0");
        let host = servers
            .iter()
            .position(|s| web0["Node"]["ID"] == s.as_str())
            .unwrap();
        let vm = vm_of(web0["Id"].as_str().unwrap());
        let out =
            f.c.vm_exec(host, &vm, &["ping", "-c", "1", "-W", "2", ip])
                .unwrap_or_else(|e| panic!("ping web{i} from web0's namespace: {e}"));
        assert!(out.contains("1 received"), "{out}");
    }

    // Bob sees none of it.
    assert!(ps(&bob, true).is_empty(), "bob's ps");
    for verb in [
        vec!["inspect", "web0"],
        vec!["stop", "-t", "1", "web0"],
        vec!["logs", "web0"],
        vec!["exec", "web0", "true"],
    ] {
        let o = bob.run(&verb);
        assert_ne!(o.code, 0, "bob {verb:?}: {}", o.summary());
        assert!(
            o.stderr.contains("No such container") || o.stderr.contains("No such object"),
            "bob {verb:?}: {}",
            o.summary()
        );
    }
    assert_eq!(ps(&alice, false).len(), 3, "alice's containers still run");

    // A shared network: alice publishes 8000 and not 8001; bob's container reaches 8000 only.
    f.head(&["network", "share", "public", "--subnet", "10.200.3.0/24"]);
    ok(
        alice.run(&[
            "run",
            "-d",
            "--name",
            "pubweb",
            "--network",
            "public",
            "-p",
            "8000",
            "busybox",
            "sh",
            "-c",
            "httpd -p 8001 -h /etc; exec httpd -f -p 8000 -h /etc",
        ]),
        "run pubweb",
    );
    let pub_ip = ip_of(&inspect(&alice, "pubweb"));
    let rules = f.ok("GET", "/rules", None);
    let pub_id = inspect(&alice, "pubweb")["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let vm_uuid = vm_of(&pub_id);
    let publish_rule = format!("FROM any TO vm {vm_uuid} ALLOW tcp PORT 8000");
    assert!(
        rules
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["rule"] == publish_rule.as_str()),
        "{publish_rule} in {rules}"
    );
    let reach = |who: &DockerClient, port: u16| {
        who.run(&[
            "run",
            "--rm",
            "--network",
            "public",
            "busybox",
            "sh",
            "-c",
            // `; exit $?` keeps sh as PID 1: a last command would be exec'd as PID 1, which
            // ignores timeout's SIGTERM.
            &format!("timeout 5 wget -q -O- http://{pub_ip}:{port}/hostname; exit $?"),
        ])
    };
    let o = reach(&bob, 8000);
    assert_eq!(o.code, 0, "published port from bob: {}", o.summary());
    assert_eq!(o.stdout.trim(), &pub_id[..12]);
    let o = reach(&bob, 8001);
    assert_ne!(
        o.code,
        0,
        "unpublished port reached from bob: {}",
        o.summary()
    );
    // Alice's own containers reach every port (the account's T3/T4 rules).
    let o = reach(&alice, 8001);
    assert_eq!(
        o.code,
        0,
        "alice to her own unpublished port: {}",
        o.summary()
    );

    // Logs: stdout and stderr kept apart, tail.
    ok(
        alice.run(&[
            "run",
            "-d",
            "--name",
            "talker",
            "busybox",
            "sh",
            "-c",
            "echo one; echo two >&2; sleep 1; echo three; exec sleep 1000",
        ]),
        "run talker",
    );
    // (stdout and stderr are read apart, as moby does: their relative order is only kept
    // across a pause.)
    let (o, _) = wait_until("talker's logs", Duration::from_secs(10), || {
        let o = alice.run(&["logs", "talker"]);
        if o.stdout == "one\nthree\n" {
            Ok(o)
        } else {
            Err(o.summary())
        }
    });
    assert_eq!(o.stderr, "two\n");
    let o = alice.run(&["logs", "--tail", "1", "talker"]);
    assert_eq!(o.stdout, "three\n", "{}", o.summary());

    // Stop (busybox ignores SIGTERM as PID 1: -t 1), start again, rm.
    let t0 = Instant::now();
    ok(alice.run(&["stop", "-t", "1", "talker"]), "stop talker");
    eprintln!("docker stop -t 1: {:?}", t0.elapsed());
    let c = inspect(&alice, "talker");
    assert_eq!(c["State"]["Running"], false, "{c}");
    assert_eq!(c["State"]["ExitCode"], 137, "{c}");
    assert!(ps(&alice, true)
        .iter()
        .any(|l| l.starts_with("talker Exited (137)")));
    ok(alice.run(&["start", "talker"]), "start talker");
    assert_eq!(inspect(&alice, "talker")["State"]["Running"], true);
    let o = alice.run(&["rm", "talker"]);
    assert_ne!(o.code, 0, "rm of a running container without -f");
    ok(alice.run(&["rm", "-f", "talker"]), "rm -f talker");

    // connect / disconnect show in network inspect, and the vnic is there.
    ok(
        alice.run(&["network", "create", "--subnet", "10.66.0.0/24", "side"]),
        "net create",
    );
    ok(
        alice.run(&["network", "connect", "--ip", "10.66.0.10", "side", "web1"]),
        "connect",
    );
    let net = ok(alice.run(&["network", "inspect", "side"]), "inspect side");
    let web1 = inspect(&alice, "web1");
    assert!(net.contains(web1["Id"].as_str().unwrap()), "{net}");
    assert!(net.contains("10.66.0.10/24"), "{net}");
    let o = sh(&alice, "web1", "ip -4 addr show");
    assert!(o.stdout.contains("10.66.0.10"), "{}", o.summary());
    ok(
        alice.run(&["network", "disconnect", "side", "web1"]),
        "disconnect",
    );
    let net = ok(alice.run(&["network", "inspect", "side"]), "inspect side");
    assert!(!net.contains(web1["Id"].as_str().unwrap()), "{net}");

    // Refused create fields: 4xx naming the field, nothing created.
    for (args, field) in [
        (vec!["--privileged"], "Privileged"),
        (vec!["-v", "/:/host"], "Binds"),
        (vec!["--network", "host"], "NetworkMode"),
        (vec!["--cap-add", "NET_ADMIN"], "CapAdd"),
        (vec!["--device", "/dev/null"], "Devices"),
        (vec!["--pid", "host"], "PidMode"),
        (vec!["-p", "8080:80"], "remapping"),
    ] {
        let mut argv = vec!["create"];
        argv.extend(args.iter());
        argv.extend(["busybox", "true"]);
        let o = alice.run(&argv);
        eprintln!("create {args:?}: {}", o.stderr.trim());
        assert_eq!(o.code, 1, "create {args:?}: {}", o.summary());
        assert!(
            o.stderr.contains("Error response from daemon") && o.stderr.contains(field),
            "create {args:?} must name {field}: {}",
            o.summary()
        );
    }
    assert_eq!(
        ps(&alice, true).len(),
        4,
        "nothing was created by the refused creates"
    );
    // An unknown network: moby creates the container and refuses to start it (no pull);
    // `--rm` removes it again.
    let t0 = Instant::now();
    let o = alice.run(&["run", "--rm", "--network", "nosuch", "busybox", "true"]);
    eprintln!(
        "run --network nosuch: {:?}: {}",
        t0.elapsed(),
        o.stderr.trim()
    );
    assert_eq!(o.code, 125, "{}", o.summary());
    assert!(
        o.stderr.contains("network nosuch not found"),
        "{}",
        o.summary()
    );
    assert!(
        !o.stderr.contains("Unable to find image"),
        "{}",
        o.summary()
    );
    assert_eq!(ps(&alice, true).len(), 4, "the --rm container is gone");

    // A host falls silent: its container reads as not running. The victim: whichever of
    // web0..2 is not on the head (one is on each host).
    let (victim_name, host) = (0..3)
        .map(|i| format!("web{i}"))
        .find_map(|n| {
            let node = inspect(&alice, &n)["Node"]["ID"].as_str()?.to_string();
            let h = servers.iter().position(|s| *s == node)?;
            (h != 0).then_some((n, h))
        })
        .expect("a web container off the head");
    let up = f.ups[host].take().unwrap();
    f.c.signal(up, libc::SIGKILL);
    for name in ["agent", "dataplane"] {
        if let Some(pid) = f.child_pid(host, name) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    let what = format!("{victim_name} reads as not running");
    let (_, t) = wait_until(&what, SILENT_BOUND * 10, || {
        let lines = ps(&alice, false);
        if lines
            .iter()
            .any(|l| l.starts_with(&format!("{victim_name} ")))
        {
            Err(format!("{lines:?}"))
        } else {
            Ok(())
        }
    });
    eprintln!("{victim_name} not running in docker ps {t:?} after its host was killed");
    let c = inspect(&alice, &victim_name);
    assert_eq!(c["State"]["Running"], false, "{c}");
}

/// docker-py's network integration cases that need a container (connect/disconnect, connect on
/// create, an IPv4 address), against the same kind of cluster.
#[test]
fn docker_py_container_network_cases() {
    if !root_or_skip("docker_py_container_network_cases") {
        return;
    }
    if docker_py().is_none() {
        return;
    }
    let (f, _) = start_up_cluster(2, &[]);
    let alice = account(&f, "alice", 1);
    import_busybox(&alice, &f.c.dir);
    let script = include_str!("docker_py/containers.py");
    let o = alice.py(script);
    eprintln!("{}", o.stdout);
    assert_eq!(o.code, 0, "{}", o.summary());
}
