//! Images onto hosts, with real parts: layers served by a real head (`fabric control --data`,
//! HTTPS with an operator certificate of its cluster CA, then a host certificate, which gets its
//! own server's route only) and fetched by the agent's client into a host cache, verified
//! (a blob whose bytes are not its digest refused, nothing kept); crafted layers that try to escape their root filesystem refused with
//! nothing written outside (a sentinel directory beside the root is checked); whiteouts across
//! two layers; and one real container: a busybox image unpacked, its OCI bundle written for a
//! network namespace the test makes, run by Debian's runc in a user namespace.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fabric::agent::api::{parse_control_url, Api, ApiError, Conn};
use fabric::agent::runtime::bundle::{nofile_limit, write_bundle, BundleInput};
use fabric::agent::runtime::layers::{ensure_layers, LayerError};
use fabric::agent::runtime::rootfs::{unpack, UnpackError};
use fabric::control::container_spec::{ContainerSpec, UID_BASE_START, UID_RANGE};

#[path = "util/docker_head.rs"]
mod docker_head;
#[path = "util/images.rs"]
mod images;
#[path = "util/root.rs"]
mod root;
#[path = "util/temp_dir.rs"]
mod temp_dir;

use temp_dir::TempDir;

// ---------------------------------------------------------------------------------------------
// Crafted layers

/// One tar member.
enum M {
    Dir(&'static str),
    File(&'static str, &'static [u8]),
    Sym(&'static str, String),
    Link(&'static str, String),
    Char(&'static str),
}

/// A tar of `members` with names written raw (the tar crate's setters refuse `..` and absolute
/// names, which these layers need).
fn tar_of(members: &[M]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for m in members {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(0o644);
        h.set_size(0);
        let (name, link, data): (&str, Option<&str>, &[u8]) = match m {
            M::Dir(n) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (n, None, &[])
            }
            M::File(n, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                (n, None, d)
            }
            M::Sym(n, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                (n, Some(t.as_str()), &[])
            }
            M::Link(n, t) => {
                h.set_entry_type(tar::EntryType::Link);
                (n, Some(t.as_str()), &[])
            }
            M::Char(n) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_device_major(1).unwrap();
                h.set_device_minor(1).unwrap();
                (n, None, &[])
            }
        };
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            old.linkname = [0; 100];
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// `dir/root` (the root filesystem to make) beside `dir/sentinel/keep`.
struct Scene {
    dir: TempDir,
}

impl Scene {
    fn new() -> Scene {
        let dir = TempDir::new("rootfs");
        std::fs::create_dir(dir.0.join("sentinel")).unwrap();
        std::fs::write(dir.0.join("sentinel/keep"), b"keep").unwrap();
        Scene { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.0.join("root")
    }
    fn sentinel(&self) -> PathBuf {
        self.dir.0.join("sentinel")
    }
    fn layer(&self, name: &str, tar: &[u8]) -> PathBuf {
        let p = self.dir.0.join(name);
        std::fs::write(&p, tar).unwrap();
        p
    }
    /// The scene's directory holds only what the test put there (and the root if `root`),
    /// and the sentinel only its one unchanged file.
    fn untouched(&self, root: bool) {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir.0)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("layer"))
            .collect();
        names.sort();
        let want: &[&str] = if root {
            &["root", "sentinel"]
        } else {
            &["sentinel"]
        };
        assert_eq!(names, want);
        let s: Vec<_> = std::fs::read_dir(self.sentinel())
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(s.len(), 1);
        assert_eq!(
            std::fs::read(self.sentinel().join("keep")).unwrap(),
            b"keep"
        );
    }
}

#[test]
fn crafted_layers_that_escape_are_refused() {
    if !root::root_or_skip("crafted_layers_that_escape_are_refused") {
        return;
    }
    // Each case in a scene of its own; `SENTINEL` stands for that scene's sentinel directory.
    let cases: Vec<(&str, Vec<M>, &str)> = vec![
        ("../x", vec![M::File("../x", b"x")], "`..`"),
        ("/etc/x", vec![M::File("/etc/x", b"x")], "absolute"),
        (
            "a -> / then a/etc/passwd",
            vec![M::Sym("a", "/".into()), M::File("a/etc/passwd", b"x")],
            "symbolic link",
        ),
        (
            "a -> SENTINEL then a/evil",
            vec![M::Sym("a", "SENTINEL".into()), M::File("a/evil", b"x")],
            "symbolic link",
        ),
        (
            "a chain of .. symlinks",
            vec![
                M::Dir("d/"),
                M::Sym("d/u1", "..".into()),
                M::Sym("d/u2", "u1/..".into()),
                M::File("d/u2/sentinel/evil", b"x"),
            ],
            "symbolic link",
        ),
        (
            "hard link to /etc/shadow",
            vec![M::Link("shadow", "/etc/shadow".into())],
            "absolute",
        ),
        (
            "hard link through a symlink",
            vec![
                M::Sym("s", "SENTINEL".into()),
                M::Link("k", "s/keep".into()),
            ],
            "symbolic link",
        ),
        ("char device", vec![M::Char("dev/mem")], "device"),
    ];
    for (what, members, why) in cases {
        let s = Scene::new();
        let sentinel = s.sentinel().display().to_string();
        let members: Vec<M> = members
            .into_iter()
            .map(|m| match m {
                M::Sym(n, t) if t == "SENTINEL" => M::Sym(n, sentinel.clone()),
                m => m,
            })
            .collect();
        // A good layer first: the refusal in the second removes everything.
        let l0 = s.layer(
            "layer0",
            &tar_of(&[M::Dir("etc/"), M::File("etc/ok", b"ok")]),
        );
        let l1 = s.layer("layer1", &tar_of(&members));
        match unpack(&[l0, l1], &s.root(), UID_BASE_START) {
            Err(e @ UnpackError::Refused { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(why), "{what}: {msg}");
                assert!(msg.contains("layer1"), "{what}: names the layer: {msg}");
                eprintln!("{what}: {msg}");
            }
            r => panic!("{what}: expected a refusal, got {r:?}"),
        }
        s.untouched(false);
    }
}

#[test]
fn whiteouts_and_opaque_directories_across_two_layers() {
    if !root::root_or_skip("whiteouts_and_opaque_directories_across_two_layers") {
        return;
    }
    let s = Scene::new();
    let l0 = s.layer(
        "layer0",
        &tar_of(&[
            M::File("etc/keep", b"1"),
            M::File("etc/gone", b"2"),
            M::File("var/lib/old", b"3"),
            M::File("opt/x/y", b"4"),
        ]),
    );
    let l1 = s.layer(
        "layer1",
        &tar_of(&[
            M::File("etc/.wh.gone", b""),
            M::Dir("var/lib/"),
            M::File("var/lib/.wh..wh..opq", b""),
            M::File("var/lib/new", b"5"),
            M::File(".wh.opt", b""),
        ]),
    );
    let st = unpack(&[l0, l1], &s.root(), UID_BASE_START).unwrap();
    assert_eq!((st.layers, st.whiteouts), (2, 3));
    let r = s.root();
    assert_eq!(std::fs::read(r.join("etc/keep")).unwrap(), b"1");
    assert!(!r.join("etc/gone").exists() && !r.join("etc/.wh.gone").exists());
    assert!(!r.join("var/lib/old").exists());
    assert_eq!(std::fs::read(r.join("var/lib/new")).unwrap(), b"5");
    assert!(!r.join("opt").exists());
    assert_eq!(
        std::fs::metadata(r.join("etc/keep")).unwrap().uid(),
        UID_BASE_START
    );
    s.untouched(true);
}

// ---------------------------------------------------------------------------------------------
// Layers from the head

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", images::sha256_hex(data))
}

#[test]
fn layers_are_fetched_from_the_head_and_verified() {
    let head = docker_head::DockerHead::start();
    let certs = head.path("operator");
    let o = head.fabric(&["cert", "admin", "--out", certs.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The head's blob store: one good blob, one whose bytes are not its name.
    let blobs = head.path("images/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    // Larger than many of the route's chunks.
    let good = images::busybox_rootfs();
    let good_d = sha256(&good);
    std::fs::write(blobs.join(&good_d[7..]), &good).unwrap();
    let bad_d = sha256(b"what the name promises");
    std::fs::write(blobs.join(&bad_d[7..]), b"something else entirely").unwrap();
    let missing_d = sha256(b"never stored");

    // What the route answers, seen by curl.
    let curl = |digest: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-D", "-", "--cacert"])
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join("cert.pem"))
            .arg("--key")
            .arg(certs.join("key.pem"))
            .arg(format!(
                "https://{}/servers/{SERVER}/layers/{digest}",
                head.api
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
    };
    let h = curl(&good_d);
    assert!(h.starts_with("http/") && h.contains(" 200"), "{h}");
    assert!(
        h.contains(&format!("content-length: {}", good.len())),
        "{h}"
    );
    assert!(curl(&missing_d).contains(" 404"));
    assert!(curl("sha256:..%2F..%2Fetc%2Fpasswd").contains(" 422"));
    assert!(curl(&format!("sha256:{}", "A".repeat(64))).contains(" 422"));

    // The agent's client into a host cache of its own.
    let host = TempDir::new("host-images");
    let images_dir = host.0.join("images");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = parse_control_url(&format!("https://{}", head.api)).unwrap();
    let api = Api::new(Conn::new(url, Some(certs.clone())).unwrap(), SERVER);
    rt.block_on(async {
        // Two ensures of one digest at once: both get the whole, verified blob.
        let t0 = Instant::now();
        let (a, b) = tokio::join!(
            ensure_layers(&api, &images_dir, std::slice::from_ref(&good_d)),
            ensure_layers(&api, &images_dir, std::slice::from_ref(&good_d)),
        );
        eprintln!(
            "fetched {} bytes (twice at once) in {:?}",
            good.len(),
            t0.elapsed()
        );
        let got = a.unwrap();
        assert_eq!(b.unwrap(), got);
        assert_eq!(got, vec![images_dir.join("sha256").join(&good_d[7..])]);
        assert_eq!(std::fs::read(&got[0]).unwrap(), good);
        // Present now: used as it is (even with the head's copy gone).
        std::fs::remove_file(blobs.join(&good_d[7..])).unwrap();
        let again = ensure_layers(&api, &images_dir, std::slice::from_ref(&good_d))
            .await
            .unwrap();
        assert_eq!(again, got);

        match ensure_layers(&api, &images_dir, &[good_d.clone(), bad_d.clone()]).await {
            Err(LayerError::DigestMismatch { want, got }) => {
                assert_eq!(want, bad_d);
                assert_eq!(got, sha256(b"something else entirely"));
            }
            r => panic!("expected a digest mismatch, got {r:?}"),
        }
        match ensure_layers(&api, &images_dir, std::slice::from_ref(&missing_d)).await {
            Err(LayerError::Fetch {
                source: ApiError::Status { status: 404, .. },
                ..
            }) => {}
            r => panic!("expected a 404, got {r:?}"),
        }
        assert!(matches!(
            ensure_layers(&api, &images_dir, &["sha256:../../x".into()]).await,
            Err(LayerError::BadDigest(_))
        ));
    });
    // A host certificate: its own server's layers only.
    let ca = fabric::pki::ca::Ca::load(head.data()).unwrap();
    let (cert, key) = ca
        .issue_host_local(SERVER, Duration::from_secs(3600))
        .unwrap();
    let host_certs = head.path("host-certs");
    std::fs::create_dir(&host_certs).unwrap();
    std::fs::write(host_certs.join("ca.pem"), ca.ca_pem()).unwrap();
    std::fs::write(host_certs.join("cert.pem"), cert).unwrap();
    std::fs::write(host_certs.join("key.pem"), key).unwrap();
    std::fs::set_permissions(
        host_certs.join("key.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let small = tar_of(&[M::File("hello", b"hello from the head")]);
    let small_d = sha256(&small);
    std::fs::write(blobs.join(&small_d[7..]), &small).unwrap();
    let host_dir = TempDir::new("host-images-2");
    let as_server = |server: &str| {
        let url = parse_control_url(&format!("https://{}", head.api)).unwrap();
        Api::new(Conn::new(url, Some(host_certs.clone())).unwrap(), server)
    };
    rt.block_on(async {
        let own = ensure_layers(
            &as_server(SERVER),
            &host_dir.0,
            std::slice::from_ref(&small_d),
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(&own[0]).unwrap(), small);
        let other = "5e7e0000-0000-4000-8000-00000000a002";
        match ensure_layers(&as_server(other), &host_dir.0, std::slice::from_ref(&bad_d)).await {
            Err(LayerError::Fetch {
                source:
                    ApiError::Status {
                        status: 403, body, ..
                    },
                ..
            }) => eprintln!("another server's layer route: 403 {body}"),
            r => panic!("expected 403 for another server's route, got {r:?}"),
        }
    });

    // Nothing of the refused layers is kept: one blob, no temporary files.
    let names = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&images_dir.join("sha256")),
        vec![good_d[7..].to_string()]
    );
    assert!(names(&images_dir.join("tmp")).is_empty());
}

const SERVER: &str = "5e7e0000-0000-4000-8000-00000000a001";

// ---------------------------------------------------------------------------------------------
// A real container

/// Removes the runc container and the network namespace when dropped (also on failure).
struct Cleanup {
    runc_root: PathBuf,
    id: String,
    netns: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["delete", "-f", &self.id])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

fn ns_inode(link: &str) -> String {
    // `net:[4026531840]` → `4026531840`
    link.rsplit('[')
        .next()
        .unwrap_or("")
        .trim_end_matches(']')
        .to_string()
}

#[test]
fn busybox_runs_under_runc_in_a_user_namespace() {
    if !root::root_or_skip("busybox_runs_under_runc_in_a_user_namespace") {
        return;
    }
    let dir = TempDir::new("runc");
    let layer = dir.0.join("busybox.tar");
    images::busybox_rootfs_tar(&layer);
    let bundle = dir.0.join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    let uid_base = UID_BASE_START + 3 * UID_RANGE;
    let t0 = Instant::now();
    let st = unpack(&[layer], &bundle.join("rootfs"), uid_base).unwrap();
    eprintln!(
        "unpacked busybox ({} entries, {} bytes) in {:?}",
        st.entries,
        st.bytes,
        t0.elapsed()
    );

    let n = std::process::id();
    let vm = format!("fab1c000-0000-4000-8000-{n:012x}");
    let id = format!("fab1c0000000400080000{n:011x}{}", "0".repeat(32));
    let netns = format!("fabric-rootfs-{n}");
    let runc_root = dir.0.join("runc");
    let _cleanup = Cleanup {
        runc_root: runc_root.clone(),
        id: vm.clone(),
        netns: netns.clone(),
    };
    let o = Command::new("ip")
        .args(["netns", "add", &netns])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ip netns add: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let netns_path = PathBuf::from(format!("/run/netns/{netns}"));
    let script = "echo pid=$$; echo host=$(hostname); echo uid=$(id -u); \
                  echo map=$(cat /proc/self/uid_map); echo nofile=$(ulimit -n); \
                  echo cgroups=$(ls /sys/fs/cgroup | wc -l); echo sys=$(ls /sys | wc -l); touch /tmp/made-inside; \
                  cat /etc/resolv.conf; ls -l /proc/self/ns; \
                  echo x > /etc/hosts 2>/dev/null && echo hosts=writable || echo hosts=ro";
    let spec = ContainerSpec {
        id,
        entrypoint: vec!["sh".into(), "-c".into()],
        cmd: vec![script.into()],
        env: vec!["PATH=/bin".into()],
        working_dir: "/".into(),
        hostname: "boxy".into(),
        uid_base,
        pids_limit: 64,
        ..Default::default()
    };
    write_bundle(
        &bundle,
        &BundleInput {
            vm: &vm,
            spec: &spec,
            netns: &netns_path,
            hosts: "127.0.0.1 localhost\n",
            resolv: "nameserver 192.0.2.53\n",
        },
    )
    .unwrap();
    let t0 = Instant::now();
    let out = Command::new("timeout")
        .args(["30", "runc", "--root"])
        .arg(&runc_root)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&vm)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!(
        "runc run took {:?}\n--- stdout\n{stdout}--- stderr\n{stderr}",
        t0.elapsed()
    );
    assert!(out.status.success(), "runc run failed: {}", out.status);
    let line = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in the output"))
            .trim()
            .to_string()
    };
    assert_eq!(
        line("pid"),
        "1",
        "the shell is PID 1 of its own pid namespace"
    );
    assert_eq!(line("host"), "boxy");
    assert_eq!(line("uid"), "0");
    let map: Vec<String> = line("map").split_whitespace().map(String::from).collect();
    assert_eq!(map, ["0", &uid_base.to_string(), &UID_RANGE.to_string()]);
    assert!(stdout.contains("nameserver 192.0.2.53"));
    assert_eq!(line("nofile"), nofile_limit().to_string());
    assert_eq!(line("cgroups"), "0", "the host's cgroup tree is masked");
    assert_ne!(line("sys"), "0", "/sys is there");
    assert_eq!(line("hosts"), "ro", "/etc/hosts is mounted read-only");
    // Root inside is uid_base outside.
    let made = std::fs::metadata(bundle.join("rootfs/tmp/made-inside")).unwrap();
    assert_eq!((made.uid(), made.gid()), (uid_base, uid_base));
    // Namespaces: the network one is the namespace made here; the others are not the host's.
    let ns_of = |name: &str| -> String {
        let l = stdout
            .lines()
            .find(|l| l.contains(&format!(" {name} -> ")))
            .unwrap_or_else(|| panic!("no {name} in ls -l /proc/self/ns"));
        ns_inode(l)
    };
    let host_ns = |name: &str| {
        ns_inode(
            &std::fs::read_link(format!("/proc/self/ns/{name}"))
                .unwrap()
                .display()
                .to_string(),
        )
    };
    for name in ["pid", "mnt", "uts", "ipc", "user", "net"] {
        assert_ne!(ns_of(name), host_ns(name), "{name} namespace is the host's");
    }
    let netns_ino = std::fs::metadata(&netns_path).unwrap().ino().to_string();
    assert_eq!(
        ns_of("net"),
        netns_ino,
        "joined the test's network namespace by path"
    );
    let _ = Duration::from_secs(0);
}

/// The fuzz target's seeds (tars made by Python's tarfile, not by the tar crate) keep its
/// invariants: unpacked or refused, never anything written beside the root.
#[test]
fn fuzz_seeds_unpack_or_are_refused_without_escaping() {
    if !root::root_or_skip("fuzz_seeds_unpack_or_are_refused_without_escaping") {
        return;
    }
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/rootfs_unpack");
    let mut n = 0;
    for e in std::fs::read_dir(&seeds).unwrap().flatten() {
        let s = Scene::new();
        let l = s.layer("layer0", &std::fs::read(e.path()).unwrap());
        let r = unpack(&[l], &s.root(), UID_BASE_START);
        eprintln!(
            "{}: {:?}",
            e.file_name().to_string_lossy(),
            r.as_ref().map(|_| ())
        );
        s.untouched(r.is_ok());
        n += 1;
    }
    assert!(n >= 5, "expected the seeds in {}", seeds.display());
}
