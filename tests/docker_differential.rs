//! Differential test: the same docker CLI session against moby 20.10 (the reference daemon of
//! specs/moby-reference.md) and against fabric's Docker API, in one test. Every step must print
//! the same exit code, stdout and stderr (IDs masked), except the steps listed with the reason
//! they differ by design. The table of both outcomes is printed (`--nocapture`).

#[path = "util/docker_cli.rs"]
mod docker_cli;
#[path = "util/docker_head.rs"]
mod docker_head;
#[path = "util/images.rs"]
mod images;
#[path = "util/moby.rs"]
mod moby;
#[path = "util/temp_dir.rs"]
mod temp_dir;

use docker_cli::{DockerClient, Out};
use docker_head::DockerHead;
use moby::{moby_available, Moby};

/// `[0-9a-f]{64}` → `<ID>`, `[0-9a-f]{12}` words → `<SHORT>`.
fn mask(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let run = b[i..]
            .iter()
            .take_while(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
            .count();
        let bounded = (i == 0 || !b[i - 1].is_ascii_alphanumeric())
            && b.get(i + run).is_none_or(|c| !c.is_ascii_alphanumeric());
        if run == 64 && bounded {
            out.push_str("<ID>");
            i += 64;
        } else if run == 12 && bounded {
            out.push_str("<SHORT>");
            i += 12;
        } else if run > 0 {
            out.push_str(&s[i..i + run]);
            i += run;
        } else {
            let ch = s[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// One outcome as a line; with `unordered`, stdout's lines after the first are sorted (moby
/// prints some lists, e.g. prune's, in Go map order).
fn show(o: &Out, unordered: bool) -> String {
    let mut lines: Vec<&str> = o.stdout.trim_end().lines().collect();
    if unordered && lines.len() > 2 {
        lines[1..].sort_unstable();
    }
    format!(
        "exit {} | {} | {}",
        o.code,
        mask(&lines.join("\n")).replace('\n', "\\n"),
        mask(o.stderr.trim_end()).replace('\n', "\\n")
    )
}

/// One step of the session; `differs` names why fabric answers otherwise by design.
struct Step {
    args: Vec<String>,
    differs: Option<&'static str>,
    unordered: bool,
}

fn step(args: &[&str]) -> Step {
    Step {
        args: args.iter().map(|s| s.to_string()).collect(),
        differs: None,
        unordered: false,
    }
}

/// A step whose printed list has no order (compared sorted).
fn unordered(args: &[&str]) -> Step {
    Step {
        unordered: true,
        ..step(args)
    }
}

fn differs(args: &[&str], why: &'static str) -> Step {
    Step {
        differs: Some(why),
        ..step(args)
    }
}

#[test]
fn network_and_image_verbs_print_what_moby_prints() {
    if !moby_available() {
        return;
    }
    let moby = Moby::start("differential");
    let head = DockerHead::start();
    let certs = head.account("alice");
    let ours = DockerClient::new(&head.docker_host(), &certs, None);
    let theirs = moby.client();
    let work = temp_dir::TempDir::new("differential");
    let rootfs = work.0.join("rootfs.tar");
    images::busybox_rootfs_tar(&rootfs);
    let saved = work.0.join("saved.tar");
    images::save_archive(&rootfs, "busybox", &saved);
    let (rootfs, saved) = (rootfs.to_str().unwrap(), saved.to_str().unwrap());

    let fmt_net = "{{.Name}} {{.Driver}} {{.Scope}} {{.Internal}} {{.EnableIPv6}} {{.IPAM.Driver}} {{len .Containers}} {{.Ingress}} {{.Attachable}}";
    let steps = vec![
        step(&["network", "create", "anet"]),
        step(&["network", "create", "anet"]),
        step(&["network", "create", "--subnet", "10.9.0.0/24", "a9"]),
        step(&["network", "create", "--subnet", "10.9.0.0/25", "b9"]),
        step(&["network", "create", "--subnet", "10.10.0.0/24", "--gateway", "10.10.0.254", "--ip-range", "10.10.0.128/25", "g10"]),
        step(&["network", "inspect", "--format", "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}} {{.IPRange}}{{end}}", "g10"]),
        step(&["network", "inspect", "--format", fmt_net, "anet"]),
        step(&["network", "inspect", "--format", "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}}", "a9"]),
        step(&["network", "rm", "nosuch"]),
        step(&["network", "inspect", "nosuch"]),
        step(&["network", "create", "host"]),
        step(&["network", "create", "none"]),
        step(&["network", "create", "bridge"]),
        step(&["network", "rm", "bridge"]),
        step(&["network", "create", "--label", "com.example=1", "--internal", "lab"]),
        step(&["network", "inspect", "--format", "{{.Internal}} {{index .Labels \"com.example\"}}", "lab"]),
        step(&["network", "ls", "--filter", "label=com.example=1", "--format", "{{.Name}}"]),
        step(&["network", "ls", "--filter", "name=a9", "--format", "{{.Name}} {{.Driver}}"]),
        step(&["network", "ls", "--filter", "foo=bar"]),
        step(&["network", "rm", "anet", "a9"]),
        unordered(&["network", "prune", "-f"]),
        step(&["network", "ls", "--format", "{{.Name}}"]),
        differs(
            &["network", "create", "-d", "overlay", "ov"],
            "moby needs a swarm for overlay; on fabric every network is an overlay (VXLAN across the cluster)",
        ),
        differs(
            &["network", "create", "--ipv6", "--subnet", "fd00:1::/64", "v6"],
            "fabric networks are IPv4 only (NAPI fabric networks); moby creates it",
        ),
        // Images.
        step(&["import", rootfs, "bb:1"]),
        step(&["images", "--format", "{{.Repository}}:{{.Tag}}"]),
        step(&["image", "inspect", "--format", "{{.Os}} {{.Architecture}} {{len .RootFS.Layers}} {{.Comment}}", "bb:1"]),
        step(&["tag", "bb:1", "bb:2"]),
        step(&["rmi", "bb:2"]),
        step(&["rmi", "nosuch"]),
        step(&["image", "inspect", "nosuch"]),
        step(&["load", "-i", saved]),
        step(&["images", "--format", "{{.Repository}}:{{.Tag}}"]),
        step(&["rmi", "bb:1", "busybox"]),
        differs(
            &["pull", "busybox"],
            "there is no registry: fabric says to use docker import or docker load; moby's error names its failed DNS lookup",
        ),
    ];

    let mut failures = Vec::new();
    eprintln!("{:<70} | moby 20.10 / fabric", "docker ...");
    for s in &steps {
        let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
        let (m, f) = (theirs.run(&args), ours.run(&args));
        let (sm, sf) = (show(&m, s.unordered), show(&f, s.unordered));
        let cmd = args.join(" ");
        let cmd = if cmd.len() > 70 {
            format!("{}…", &cmd[..69])
        } else {
            cmd
        };
        eprintln!("{cmd:<70} | {sm}");
        eprintln!(
            "{:<70} | {sf}{}",
            "",
            match (sm == sf, s.differs) {
                (true, _) => "   (same)".to_string(),
                (false, Some(why)) => format!("   (differs by design: {why})"),
                (false, None) => "   <-- DIFFERS".to_string(),
            }
        );
        if sm != sf && s.differs.is_none() {
            failures.push(format!(
                "docker {}\n  moby:   {sm}\n  fabric: {sf}",
                args.join(" ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} steps print otherwise than moby 20.10:\n{}\nfabric's log tail:\n{}",
        failures.len(),
        failures.join("\n"),
        head.log()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn masking() {
    let id = "a".repeat(64);
    assert_eq!(mask(&format!("x {id}\nsha256:{id}")), "x <ID>\nsha256:<ID>");
    assert_eq!(mask("0123456789ab bridge"), "<SHORT> bridge");
    assert_eq!(mask("10.9.0.0/24 deadbeef"), "10.9.0.0/24 deadbeef");
}
