//! The OCI bundle runc runs a container from: `config.json` (runtime spec 1.0.2, as Debian's
//! runc 1.1.5 takes it) and the three files bind-mounted read-only at `/etc/hostname`,
//! `/etc/hosts` and `/etc/resolv.conf`, beside the already unpacked `rootfs/`
//! ([`super::rootfs::unpack`]).
//!
//! What the container gets is Docker's default confinement, in a user namespace: root inside is
//! `uid_base` outside (the account's range, [`UID_RANGE`] IDs), Docker's default capability set
//! (bounding = effective = permitted; nothing inheritable or ambient; never `CAP_SYS_ADMIN`),
//! `noNewPrivileges`, new pid, mount, uts, ipc and user namespaces and the VM's network
//! namespace joined by path, Docker's mounts (`/proc`, a `/dev` tmpfs, `devpts` with its own
//! `ptmx`, `/dev/shm`, `/dev/mqueue`; `/sys` is the host's bound read-only, as moby does when a
//! user-namespaced container joins a network namespace made outside, since sysfs cannot be
//! mounted then; no cgroup mount), Docker's masked and read-only `/proc` paths, runc's default device rules
//! (deny all, then the standard allow list), the spec's pids limit, `RLIMIT_NOFILE` 1048576
//! (capped at what this process may grant, [`nofile_limit`]) and
//! the cgroup `/fabric/<vm>`. No seccomp profile is applied yet.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::control::container_spec::{ContainerSpec, UID_RANGE};

/// What a bundle is made from.
pub struct BundleInput<'a> {
    /// The VM's UUID (names the cgroup).
    pub vm: &'a str,
    /// What to run.
    pub spec: &'a ContainerSpec,
    /// The VM's network namespace (`/run/netns/<vm>`), joined by path.
    pub netns: &'a Path,
    /// `/etc/hosts` contents.
    pub hosts: &'a str,
    /// `/etc/resolv.conf` contents.
    pub resolv: &'a str,
}

/// Why a bundle was not written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The spec (or the input) is one the agent does not run.
    #[error("container {vm}: refused: {why}")]
    Refused {
        /// The VM.
        vm: String,
        /// Why.
        why: String,
    },
    /// Writing a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being written.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Docker's default capabilities (moby `caps.DefaultCapabilities`).
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Docker's masked paths (moby 20.10 `oci.DefaultLinuxSpec`), and the host's cgroup tree.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    // Not Docker's: `/sys` is the host's here (see the module), and its cgroup tree would show
    // every container of the host.
    "/sys/fs/cgroup",
];

/// Docker's read-only paths.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The open-file limit of a container's processes (soft and hard; Docker's with systemd).
pub const NOFILE: u64 = 1_048_576;

/// The open-file limit a bundle asks for: [`NOFILE`], or this process's hard limit if that is
/// lower (runc, started by this process, cannot grant more from inside the user namespace; an
/// agent that raised its hard limit as root gets the full [`NOFILE`]).
pub fn nofile_limit() -> u64 {
    crate::io::rlimit::nofile().map_or(NOFILE, |(_, hard)| hard.min(NOFILE))
}

/// The cgroup of a VM's container, relative to each hierarchy's root.
pub fn cgroup_path(vm: &str) -> String {
    format!("/fabric/{vm}")
}

/// `uid[:gid]` → numbers (empty: 0:0; no gid: 0).
fn user_ids(user: &str) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = user.split_once(':').unwrap_or((user, "0"));
    let num = |s: &str| -> Result<u32, String> {
        s.parse::<u32>()
            .ok()
            .filter(|n| *n < UID_RANGE)
            .ok_or_else(|| format!("user {user:?}: expected numeric uid[:gid] below {UID_RANGE}"))
    };
    Ok((num(u)?, num(g)?))
}

/// The VM UUID as it may appear in a path (lowercase hex and dashes, 36 bytes).
fn valid_vm(vm: &str) -> bool {
    vm.len() == 36
        && vm
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'-'))
}

/// The host name inside: the spec's, else the short container ID.
pub fn hostname(spec: &ContainerSpec) -> String {
    if spec.hostname.is_empty() {
        spec.id.chars().take(12).collect()
    } else {
        spec.hostname.clone()
    }
}

/// The runtime spec (`config.json`) for `input`; the bind-mounted files are under `bundle`.
pub fn config(bundle: &Path, input: &BundleInput<'_>) -> Result<Value, BundleError> {
    let spec = input.spec;
    let refused = |why: String| BundleError::Refused {
        vm: input.vm.to_string(),
        why,
    };
    spec.check().map_err(refused)?;
    if !valid_vm(input.vm) {
        return Err(refused(format!(
            "VM id {:?}: expected a lowercase UUID",
            input.vm
        )));
    }
    if !input.netns.is_absolute() {
        return Err(refused(format!(
            "network namespace {}: expected an absolute path",
            input.netns.display()
        )));
    }
    let (uid, gid) = user_ids(&spec.user).map_err(refused)?;
    let host = hostname(spec);
    let mut env = spec.env.clone();
    let has = |env: &[String], k: &str| env.iter().any(|e| e.split('=').next() == Some(k));
    if !has(&env, "PATH") {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    if !has(&env, "HOSTNAME") {
        env.insert(1, format!("HOSTNAME={host}"));
    }
    if spec.tty && !has(&env, "TERM") {
        env.push("TERM=xterm".into());
    }
    let cwd = if spec.working_dir.is_empty() {
        "/".to_string()
    } else {
        spec.working_dir.clone()
    };
    let caps: Vec<&str> = DEFAULT_CAPS.to_vec();
    let nofile = nofile_limit();
    let file = |name: &str| bundle.join(name).display().to_string();
    let bind_ro = |dest: &str, name: &str| {
        json!({
            "destination": dest,
            "type": "bind",
            "source": file(name),
            "options": ["rbind", "rprivate", "ro", "nosuid", "nodev", "noexec"],
        })
    };
    let char_dev = |major: i64, minor: Option<i64>| json!({"allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"});
    let ns = |t: &str| json!({"type": t});
    let map = json!([{"containerID": 0, "hostID": spec.uid_base, "size": UID_RANGE}]);
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": spec.tty,
            "user": {"uid": uid, "gid": gid},
            "args": spec.argv(),
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": host,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            // A sysfs of its own cannot be mounted: the network namespace, made outside, is
            // not the user namespace's (EPERM). Moby bind-mounts the host's read-only then.
            {"destination": "/sys", "type": "bind", "source": "/sys",
             "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            bind_ro("/etc/hostname", "hostname"),
            bind_ro("/etc/hosts", "hosts"),
            bind_ro("/etc/resolv.conf", "resolv.conf"),
        ],
        "linux": {
            "uidMappings": map,
            "gidMappings": map,
            "namespaces": [
                ns("pid"),
                ns("mount"),
                ns("uts"),
                ns("ipc"),
                ns("user"),
                {"type": "network", "path": input.netns.display().to_string()},
            ],
            "resources": {
                "devices": [
                    {"allow": false, "access": "rwm"},
                    {"allow": true, "type": "c", "access": "m"},
                    {"allow": true, "type": "b", "access": "m"},
                    char_dev(1, Some(3)),   // null
                    char_dev(1, Some(5)),   // zero
                    char_dev(1, Some(7)),   // full
                    char_dev(1, Some(8)),   // random
                    char_dev(1, Some(9)),   // urandom
                    char_dev(5, Some(0)),   // tty
                    char_dev(5, Some(1)),   // console
                    char_dev(5, Some(2)),   // ptmx
                    char_dev(136, None),    // pts/*
                ],
                "pids": {"limit": spec.pids_limit},
            },
            "cgroupsPath": cgroup_path(input.vm),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }))
}

/// Writes `bundle/config.json` and `bundle/{hostname,hosts,resolv.conf}` for `input` (the
/// spec is checked first: nothing is written for one the agent refuses). `bundle/rootfs/` is
/// made separately.
pub fn write_bundle(bundle: &Path, input: &BundleInput<'_>) -> Result<(), BundleError> {
    let cfg = config(bundle, input)?;
    let io = |what: String| move |source| BundleError::Io { what, source };
    std::fs::create_dir_all(bundle).map_err(io(format!("cannot create {}", bundle.display())))?;
    let host = format!("{}\n", hostname(input.spec));
    for (name, data) in [
        ("hostname", host.as_bytes()),
        ("hosts", input.hosts.as_bytes()),
        ("resolv.conf", input.resolv.as_bytes()),
        (
            "config.json",
            &serde_json::to_vec_pretty(&cfg).unwrap_or_default()[..],
        ),
    ] {
        write_replace(&bundle.join(name), data)
            .map_err(io(format!("cannot write {}", bundle.join(name).display())))?;
    }
    Ok(())
}

/// Writes `path` through a temporary file beside it and a rename (readable by everyone: the
/// container's root is not the host's).
fn write_replace(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp: PathBuf = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::container_spec::UID_BASE_START;

    const VM: &str = "0123abcd-0000-4000-8000-000000000001";

    fn spec() -> ContainerSpec {
        ContainerSpec {
            id: format!("0123abcd000040008000000000000001{}", "e".repeat(32)),
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            env: vec!["PATH=/bin".into(), "A=1".into()],
            working_dir: "/work".into(),
            user: "1000:100".into(),
            uid_base: UID_BASE_START + 65_536,
            pids_limit: 321,
            layers: vec![format!("sha256:{}", "a".repeat(64))],
            ..Default::default()
        }
    }

    fn cfg(s: &ContainerSpec) -> Result<Value, BundleError> {
        config(
            Path::new("/b"),
            &BundleInput {
                vm: VM,
                spec: s,
                netns: Path::new("/run/netns/x"),
                hosts: "",
                resolv: "",
            },
        )
    }

    #[test]
    fn process_and_confinement() {
        let c = cfg(&spec()).unwrap();
        let p = &c["process"];
        assert_eq!(p["args"], json!(["/bin/sh", "-c", "echo hi"]));
        assert_eq!(p["cwd"], "/work");
        assert_eq!(p["user"], json!({"uid": 1000, "gid": 100}));
        assert_eq!(p["terminal"], false);
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["env"][0], "PATH=/bin");
        assert_eq!(p["env"][1], "HOSTNAME=0123abcd0000");
        assert_eq!(c["hostname"], "0123abcd0000");
        let caps = &p["capabilities"];
        for set in ["bounding", "effective", "permitted"] {
            let v: Vec<&str> = caps[set]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect();
            assert_eq!(v, DEFAULT_CAPS, "{set}");
            assert!(!v.contains(&"CAP_SYS_ADMIN"));
            assert!(!v.contains(&"CAP_NET_ADMIN"));
        }
        assert!(caps.get("inheritable").is_none() && caps.get("ambient").is_none());
        assert_eq!(p["rlimits"][0]["type"], "RLIMIT_NOFILE");
        assert_eq!(p["rlimits"][0]["hard"], nofile_limit());
        assert_eq!(p["rlimits"][0]["soft"], nofile_limit());
        assert!(nofile_limit() <= NOFILE);
    }

    #[test]
    fn namespaces_mappings_and_cgroup() {
        let c = cfg(&spec()).unwrap();
        let l = &c["linux"];
        let types: Vec<&str> = l["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["pid", "mount", "uts", "ipc", "user", "network"]);
        assert_eq!(l["namespaces"][5]["path"], "/run/netns/x");
        assert!(l["namespaces"][0].get("path").is_none());
        let m = json!([{"containerID": 0, "hostID": UID_BASE_START + 65_536, "size": UID_RANGE}]);
        assert_eq!(l["uidMappings"], m);
        assert_eq!(l["gidMappings"], m);
        assert_eq!(l["cgroupsPath"], format!("/fabric/{VM}"));
        assert_eq!(l["resources"]["pids"]["limit"], 321);
        assert_eq!(
            l["resources"]["devices"][0],
            json!({"allow": false, "access": "rwm"})
        );
        assert_eq!(
            l["maskedPaths"].as_array().unwrap().len(),
            MASKED_PATHS.len()
        );
        assert!(l["maskedPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/kcore")));
        assert!(l["readonlyPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/sys")));
        assert_eq!(c["root"], json!({"path": "rootfs", "readonly": false}));
        let dests: Vec<&str> = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        for d in [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys",
            "/etc/hosts",
        ] {
            assert!(dests.contains(&d), "{d}");
        }
        let pts = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/dev/pts");
        let opts = pts.unwrap()["options"].as_array().unwrap();
        for o in ["newinstance", "ptmxmode=0666", "mode=0620"] {
            assert!(opts.contains(&json!(o)), "{o}");
        }
        let hosts = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/etc/hosts");
        assert_eq!(hosts.unwrap()["source"], "/b/hosts");
        assert!(hosts.unwrap()["options"]
            .as_array()
            .unwrap()
            .contains(&json!("ro")));
    }

    #[test]
    fn tty_and_defaults() {
        let mut s = spec();
        s.tty = true;
        s.env.clear();
        s.user.clear();
        s.working_dir.clear();
        s.hostname = "web".into();
        let c = cfg(&s).unwrap();
        assert_eq!(c["process"]["terminal"], true);
        assert_eq!(c["process"]["user"], json!({"uid": 0, "gid": 0}));
        assert_eq!(c["process"]["cwd"], "/");
        assert_eq!(c["hostname"], "web");
        let env = c["process"]["env"].as_array().unwrap();
        assert!(env[0].as_str().unwrap().starts_with("PATH="));
        assert!(env.contains(&json!("TERM=xterm")));
        assert!(env.contains(&json!("HOSTNAME=web")));
    }

    #[test]
    fn refusals() {
        let mut s = spec();
        s.uid_base = 0;
        assert!(matches!(cfg(&s), Err(BundleError::Refused { .. })));
        let mut s = spec();
        s.cmd.clear();
        s.entrypoint.clear();
        assert!(matches!(cfg(&s), Err(BundleError::Refused { .. })));
        let mut s = spec();
        s.user = "70000".into();
        assert!(matches!(cfg(&s), Err(BundleError::Refused { .. })));
        let s = spec();
        let bad_vm = config(
            Path::new("/b"),
            &BundleInput {
                vm: "../../etc",
                spec: &s,
                netns: Path::new("/run/netns/x"),
                hosts: "",
                resolv: "",
            },
        );
        assert!(matches!(bad_vm, Err(BundleError::Refused { .. })));
        let rel_ns = config(
            Path::new("/b"),
            &BundleInput {
                vm: VM,
                spec: &s,
                netns: Path::new("netns"),
                hosts: "",
                resolv: "",
            },
        );
        assert!(matches!(rel_ns, Err(BundleError::Refused { .. })));
    }

    #[test]
    fn writes_the_files() {
        let d = std::env::temp_dir().join(format!("fabric-bundle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let s = spec();
        let input = BundleInput {
            vm: VM,
            spec: &s,
            netns: Path::new("/run/netns/x"),
            hosts: "127.0.0.1 localhost\n",
            resolv: "nameserver 192.0.2.1\n",
        };
        write_bundle(&d, &input).unwrap();
        let c: Value =
            serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
        assert_eq!(c, config(&d, &input).unwrap());
        assert_eq!(
            std::fs::read_to_string(d.join("hostname")).unwrap(),
            "0123abcd0000\n"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("resolv.conf")).unwrap(),
            "nameserver 192.0.2.1\n"
        );
        // Nothing is written for a refused spec.
        let e = d.join("refused");
        let mut bad = spec();
        bad.uid_base = 5;
        assert!(write_bundle(
            &e,
            &BundleInput {
                spec: &bad,
                ..input
            }
        )
        .is_err());
        assert!(!e.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
