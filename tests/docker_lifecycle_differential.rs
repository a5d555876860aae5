//! Differential test of the container lifecycle verbs (issue 19): one session of the stock
//! docker CLI against moby 20.10 (tests/util/moby.rs, in its own namespace) and against fabric
//! (a one-host `fabric up` cluster with an account), step by step. Every step must print the
//! same exit code, stdout and stderr once IDs, generated names, durations, IPs and MACs are
//! masked, except the steps listed with the reason they differ by design (or marked
//! `KNOWN BUG:`, which the lead decides on). The table of both outcomes is printed
//! (`--nocapture`).

#[path = "util/cluster.rs"]
mod cluster;
#[path = "util/docker_cli.rs"]
mod docker_cli;
#[path = "util/fab.rs"]
mod fab;
#[path = "util/images.rs"]
mod images;
#[path = "util/moby.rs"]
mod moby;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use cluster::root_or_skip;
use docker_cli::{docker_cli_present, DockerClient, Out};
use fab::start_up_cluster;
use moby::{moby_available, Moby};
use regex::Regex;

/// The masks, applied in order: MACs and IPs first (their hex and digits must not be read as
/// IDs), then IDs, durations and the names moby's (and fabric's) name generator makes.
fn masks() -> &'static [(Regex, &'static str)] {
    static M: OnceLock<Vec<(Regex, &'static str)>> = OnceLock::new();
    M.get_or_init(|| {
        let duration = r"(?:Less than a second|About an? (?:second|minute|hour)|\d+ (?:seconds?|minutes?|hours?|days?|weeks?|months?|years?))";
        [
            (r"\b(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\b", "<MAC>"),
            (r"\b\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?\b", "<IP>"),
            (r"\b[0-9a-f]{64}\b", "<ID>"),
            (r"\b[0-9a-f]{12}\b", "<SHORT>"),
            (&format!(r"\bUp {duration}"), "Up <T>"),
            (&format!(r"\bExited \((-?\d+)\) {duration} ago"), "Exited ($1) <T> ago"),
            // docker's names generator: adjective_surname (a digit appended on a retry).
            (r"\b[a-z]+_[a-z]+\d?\b", "<NAME>"),
        ]
        .iter()
        .map(|(re, to)| (Regex::new(re).expect("mask regex"), *to))
        .collect()
    })
}

/// `s` with every mask applied.
fn mask(s: &str) -> String {
    let mut s = s.to_string();
    for (re, to) in masks() {
        s = re.replace_all(&s, *to).into_owned();
    }
    s
}

/// One step of the session.
struct Step {
    args: Vec<String>,
    /// Written to the CLI's standard input.
    stdin: &'static [u8],
    /// Keep only stdout's lines that start with this (one container's `ps -a` line).
    pick: Option<&'static str>,
    /// Why fabric answers otherwise by design.
    differs: Option<&'static str>,
    /// A fabric bug left out of the must-match set (the lead decides).
    known_bug: Option<&'static str>,
}

fn step(args: &[&str]) -> Step {
    Step {
        args: args.iter().map(|s| s.to_string()).collect(),
        stdin: b"",
        pick: None,
        differs: None,
        known_bug: None,
    }
}

impl Step {
    fn stdin(self, stdin: &'static [u8]) -> Step {
        Step { stdin, ..self }
    }
    fn pick(self, prefix: &'static str) -> Step {
        Step {
            pick: Some(prefix),
            ..self
        }
    }
    fn differs(self, why: &'static str) -> Step {
        Step {
            differs: Some(why),
            ..self
        }
    }
    #[allow(dead_code)]
    fn known_bug(self, why: &'static str) -> Step {
        Step {
            known_bug: Some(why),
            ..self
        }
    }
}

/// One outcome as a line: exit code, stdout (only the picked lines) and stderr, masked.
fn show(o: &Out, pick: Option<&str>) -> String {
    let lines: Vec<&str> = o
        .stdout
        .trim_end()
        .lines()
        .filter(|l| pick.is_none_or(|p| l.starts_with(p)))
        .collect();
    format!(
        "exit {} | {} | {}",
        o.code,
        mask(&lines.join("\n")).replace('\n', "\\n"),
        mask(o.stderr.trim_end()).replace('\n', "\\n")
    )
}

/// The steps of the session, in order (see the brief of issue 19's differential).
fn steps(rootfs: &str) -> Vec<Step> {
    let ps_fmt = "{{.Names}} {{.Status}} {{.Image}} {{.Command}}";
    let field = |f: &str| format!("{{{{{f}}}}}");
    let inspect_ca = |f: &str| step(&["inspect", "-f", &field(f), "ca"]);
    vec![
        step(&["import", rootfs, "busybox:latest"]),
        // Attached runs: output and the container's exit code.
        step(&["run", "--rm", "busybox", "echo", "hi"]),
        step(&["run", "--rm", "busybox", "sh", "-c", "exit 3"]),
        step(&["run", "busybox", "false"]),
        // moby 20.10 wants names of two characters or more ([a-zA-Z0-9][a-zA-Z0-9_.-]+).
        step(&["create", "--name", "a", "busybox", "true"]),
        // A detached container and what ps and inspect print of it.
        step(&["run", "--name", "ca", "-d", "busybox", "sleep", "1000"]),
        step(&["ps", "--format", ps_fmt]),
        inspect_ca(".State.Status"),
        inspect_ca(".State.Running"),
        inspect_ca(".State.ExitCode"),
        inspect_ca(".Config.Cmd"),
        inspect_ca(".Config.Image"),
        inspect_ca(".Name"),
        inspect_ca(".HostConfig.NetworkMode"),
        inspect_ca(".RestartCount"),
        inspect_ca(".Node.Name").differs(
            "fabric's inspect carries the host a container runs on (Node, as Triton's sdc-docker \
             does); moby's template has no such key",
        ),
        // Created, then started attached, then its logs.
        step(&["create", "--name", "cb", "busybox", "echo", "hello"]),
        step(&["ps", "-a", "--format", ps_fmt]).pick("cb "),
        step(&["start", "-a", "cb"]),
        step(&["logs", "cb"]),
        step(&["ps", "-a", "--format", ps_fmt]).pick("cb "),
        // Stop (busybox's sleep as PID 1 ignores SIGTERM: SIGKILL after 1 s).
        step(&["stop", "-t", "1", "ca"]),
        inspect_ca(".State.ExitCode"),
        inspect_ca(".State.Status"),
        step(&["ps", "-a", "--format", ps_fmt]),
        // Again, restart, exec, kill, rm.
        step(&["start", "ca"]),
        inspect_ca(".State.Status"),
        step(&["restart", "-t", "1", "ca"]),
        inspect_ca(".State.Running"),
        inspect_ca(".RestartCount"),
        step(&["exec", "ca", "sh", "-c", "echo $((1+2))"]),
        step(&["exec", "ca", "sh", "-c", "exit 5"]),
        step(&["kill", "ca"]),
        inspect_ca(".State.ExitCode"),
        step(&["kill", "ca"]),
        step(&["rm", "ca"]),
        step(&["rm", "nonexistent"]),
        step(&["rm", "-f", "nonexistent"]),
        // Rename.
        step(&["rename", "cb", "cc"]),
        step(&["rm", "cb"]),
        step(&["rm", "cc"]),
        // stdin, a taken name, wait.
        step(&["run", "--rm", "-i", "busybox", "cat"]).stdin(b"hello\n"),
        step(&["run", "--name", "ce", "busybox", "sh", "-c", "exit 7"]),
        step(&["create", "--name", "ce", "busybox", "true"]),
        step(&["wait", "ce"]),
        step(&["rm", "ce"]),
        // Refused by design.
        step(&["run", "--rm", "-p", "8080:80", "busybox", "true"]).differs(
            "fabric has no port remapping (a container's own IP is reachable on its published \
             ports); moby maps 8080 to 80 with docker-proxy",
        ),
        step(&["run", "--rm", "--network", "host", "busybox", "true"]).differs(
            "a container never shares a host's network namespace on fabric (NetworkMode host is \
             refused); moby runs it in its own namespace's host network",
        ),
        step(&["ps", "-a", "--format", ps_fmt]),
    ]
}

#[test]
fn lifecycle_verbs_print_what_moby_prints() {
    if !root_or_skip("lifecycle_verbs_print_what_moby_prints") || !moby_available() {
        return;
    }
    if !docker_cli_present() {
        panic!("the stock docker CLI is missing: run scripts/setup.d/40-docker.sh");
    }
    let t0 = Instant::now();
    // Both daemons start at once (moby's certificates and fabric's head take seconds each).
    let (moby, (f, _servers)) = std::thread::scope(|s| {
        let m = s.spawn(|| Moby::start("lifecycle"));
        let f = start_up_cluster(1, &[]);
        (m.join().expect("moby starts"), f)
    });
    eprintln!("moby and a one-host fabric up in {:?}", t0.elapsed());
    let certs: PathBuf = f.c.dir.join("account-alice");
    f.head(&[
        "account",
        "add",
        "alice",
        "--cert-dir",
        certs.to_str().unwrap(),
    ]);
    let ours = DockerClient::new(
        &format!("tcp://{}:2376", f.c.hosts[0].ip),
        &certs,
        Some(&f.c.hosts[0].ns),
    );
    let theirs = moby.client();
    let rootfs = f.c.dir.join("busybox-rootfs.tar");
    images::busybox_rootfs_tar(&rootfs);

    let mut failures = Vec::new();
    let (mut same, mut by_design, mut bugs) = (0, 0, 0);
    eprintln!("{:<60} | moby 20.10 / fabric", "docker ...");
    for s in steps(rootfs.to_str().unwrap()) {
        let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
        let (m, fo) = (
            theirs.run_stdin(&args, s.stdin),
            ours.run_stdin(&args, s.stdin),
        );
        let (sm, sf) = (show(&m, s.pick), show(&fo, s.pick));
        let mut cmd = mask(&args.join(" "));
        if let Some(p) = s.pick {
            cmd.push_str(&format!(" [line {p:?}]"));
        }
        let cmd = match cmd.char_indices().nth(59) {
            Some((i, _)) => format!("{}…", &cmd[..i]),
            None => cmd,
        };
        eprintln!("{cmd:<60} | {sm}");
        let verdict = match (sm == sf, s.differs, s.known_bug) {
            (true, _, _) => {
                same += 1;
                "   (same)".to_string()
            }
            (false, Some(why), _) => {
                by_design += 1;
                format!("   (differs by design: {why})")
            }
            (false, None, Some(why)) => {
                bugs += 1;
                format!("   (KNOWN BUG: {why})")
            }
            (false, None, None) => "   <-- DIFFERS".to_string(),
        };
        eprintln!("{:<60} | {sf}{verdict}", "");
        if sm != sf && s.differs.is_none() && s.known_bug.is_none() {
            failures.push(format!(
                "docker {}\n  moby:   {sm}\n  fabric: {sf}",
                args.join(" ")
            ));
        }
    }
    eprintln!(
        "{same} steps the same, {by_design} differ by design, {bugs} known bugs, {} differ; \
         {:?} in all",
        failures.len(),
        t0.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} steps print otherwise than moby 20.10:\n{}",
        failures.len(),
        failures.join("\n"),
    );
}

#[test]
fn masking() {
    let id = "0123456789abcdef".repeat(4);
    assert_eq!(mask(&format!("x {id}\n{}", &id[..12])), "x <ID>\n<SHORT>");
    assert_eq!(mask("a Up 2 seconds busybox"), "a Up <T> busybox");
    assert_eq!(mask("a Up Less than a second"), "a Up <T>");
    assert_eq!(mask("a Up About a minute x"), "a Up <T> x");
    assert_eq!(
        mask("b Exited (3) 1 second ago busybox"),
        "b Exited (3) <T> ago busybox"
    );
    assert_eq!(mask("Exited (137) 12 minutes ago"), "Exited (137) <T> ago");
    assert_eq!(mask("Created"), "Created");
    assert_eq!(mask("10.0.0.5/24 172.17.0.2"), "<IP> <IP>");
    assert_eq!(mask("02:42:ac:11:00:02"), "<MAC>");
    assert_eq!(mask("eager_turing Exited (1)"), "<NAME> Exited (1)");
    // Not a 12-hex word, not an ID: left alone.
    assert_eq!(mask("deadbeef 1000 /a"), "deadbeef 1000 /a");
}
