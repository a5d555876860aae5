//! A private moby 20.10 (Debian's `docker.io`) as the reference daemon of differential tests,
//! started exactly as specs/moby-reference.md says: its own network namespace (nothing reaches
//! the host's networking), a private mount namespace with tmpfs over `/run` and `/etc/docker`,
//! `--iptables=false`, data and exec roots and a cgroup parent of its own, TLS with a CA made
//! for it. Dropping a [`Moby`] stops it (by PID), waits for it and its containerd, deletes the
//! namespace and the cgroup directories and removes every file, also when the test panics.
//!
//! Include it at the crate root of a test together with the CLI runner:
//! ```ignore
//! #[path = "util/docker_cli.rs"] mod docker_cli;
//! #[path = "util/moby.rs"] mod moby;
//! ```

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::docker_cli::DockerClient;

include!("root.rs");

/// The daemon's TLS port inside its namespace.
pub const MOBY_PORT: u16 = 23760;
/// How long the daemon may take to answer `docker version` (it takes about 0.3 s).
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long dockerd and its containerd may take to exit after SIGTERM (about 2.5 s).
const STOP_WITHIN: Duration = Duration::from_secs(20);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether a moby reference daemon can run here: root and Debian's `dockerd`. Otherwise prints
/// why the calling test (named after its thread) skips; under CI=true a missing one panics
/// (the setup scripts install it).
pub fn moby_available() -> bool {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("moby reference test");
    if !root_or_skip(test) {
        return false;
    }
    if Path::new("/usr/sbin/dockerd").exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{test}: /usr/sbin/dockerd (Debian docker.io) is missing and CI=true forbids \
             skipping (scripts/setup.d/40-docker.sh installs it)"
        );
    }
    eprintln!("skipping {test}: /usr/sbin/dockerd (Debian docker.io) is not installed");
    false
}

/// A running moby 20.10; see the module docs.
pub struct Moby {
    /// Its network namespace (`fmoby<pid>x<n>`); run clients in it.
    pub netns: String,
    /// Everything of this daemon: certificates, data root, exec root, log.
    pub dir: PathBuf,
    /// `tcp://127.0.0.1:23760` (inside `netns`).
    pub host: String,
    /// Its unix socket (reachable from the host: a path socket is not namespaced), no TLS.
    pub socket: PathBuf,
    /// The client certificate directories (`ca.pem`, `cert.pem`, `key.pem`): `alice`, `bob`.
    pub clients: Vec<PathBuf>,
    /// `--cgroup-parent`, one directory per cgroup hierarchy.
    pub cgroup_parent: String,
    log: PathBuf,
    pid_file: PathBuf,
    daemon: Option<Child>,
    /// The time `start` took until the daemon answered.
    pub started_in: Duration,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run openssl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Docker docs' recipe (2048-bit keys for speed): CA, server certificate for 127.0.0.1,
/// and one client directory per name in `clients` holding `ca.pem`, `cert.pem`, `key.pem`.
fn make_certs(t: &Path, clients: &[&str]) -> Vec<PathBuf> {
    openssl(t, &["genrsa", "-out", "ca-key.pem", "2048"]);
    openssl(
        t,
        &[
            "req",
            "-new",
            "-x509",
            "-days",
            "30",
            "-key",
            "ca-key.pem",
            "-sha256",
            "-subj",
            "/CN=ref-ca",
            "-out",
            "ca.pem",
        ],
    );
    openssl(t, &["genrsa", "-out", "server-key.pem", "2048"]);
    openssl(
        t,
        &[
            "req",
            "-subj",
            "/CN=127.0.0.1",
            "-sha256",
            "-new",
            "-key",
            "server-key.pem",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        t.join("ext.cnf"),
        "subjectAltName = IP:127.0.0.1,DNS:localhost\nextendedKeyUsage = serverAuth\n",
    )
    .expect("write ext.cnf");
    sign(t, "server.csr", "server-cert.pem", "ext.cnf");
    std::fs::write(t.join("ext-client.cnf"), "extendedKeyUsage = clientAuth\n")
        .expect("write ext-client.cnf");
    clients
        .iter()
        .map(|name| {
            let c = t.join(name);
            std::fs::create_dir_all(&c).expect("client cert dir");
            let key = format!("{name}/key.pem");
            let csr = format!("{name}.csr");
            let cert = format!("{name}/cert.pem");
            openssl(t, &["genrsa", "-out", &key, "2048"]);
            openssl(
                t,
                &[
                    "req",
                    "-subj",
                    &format!("/CN={name}"),
                    "-new",
                    "-key",
                    &key,
                    "-out",
                    &csr,
                ],
            );
            sign(t, &csr, &cert, "ext-client.cnf");
            std::fs::copy(t.join("ca.pem"), c.join("ca.pem")).expect("copy ca.pem");
            c
        })
        .collect()
}

/// Signs `csr` with the test CA (30 days, SHA-256, the extensions in `ext`) into `out`.
fn sign(t: &Path, csr: &str, out: &str, ext: &str) {
    openssl(
        t,
        &[
            "x509",
            "-req",
            "-days",
            "30",
            "-sha256",
            "-in",
            csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            out,
            "-extfile",
            ext,
        ],
    );
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The pids of `pid`'s children (from /proc/PID/task/*/children).
fn children(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            v.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    v
}

/// A raw HTTP answer from the daemon's unix socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Header lines (name lower-cased, value trimmed), in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Moby {
    /// Creates certificates, a namespace and directories named after `name` (plus pid and a
    /// counter, so parallel tests never collide), starts dockerd and waits until the stock CLI
    /// reports API 1.41. Panics (after cleaning up) with the daemon's log if it does not.
    pub fn start(name: &str) -> Moby {
        let t0 = Instant::now();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let netns = format!("fmoby{}x{n}", std::process::id());
        // Short: unix socket paths (containerd's under the exec root) must fit 108 bytes.
        let dir = std::env::temp_dir().join(&netns);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tls")).expect("create the moby dir");
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let mut m = Moby {
            host: format!("tcp://127.0.0.1:{MOBY_PORT}"),
            socket: dir.join("docker.sock"),
            clients: Vec::new(),
            cgroup_parent: format!("/{netns}-{safe}"),
            log: dir.join("dockerd.log"),
            pid_file: dir.join("dockerd.pid"),
            daemon: None,
            started_in: Duration::ZERO,
            netns,
            dir,
        };
        // From here on, Drop cleans up whatever exists.
        let tls = m.dir.join("tls");
        m.clients = make_certs(&tls, &["alice", "bob"]);
        let certs_at = t0.elapsed();
        std::fs::write(m.dir.join("daemon.json"), "{}\n").expect("write daemon.json");
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &m.netns]);
        ip(&["-n", &m.netns, "link", "set", "lo", "up"]);
        let log = std::fs::File::create(&m.log).expect("create dockerd.log");
        let d = &m.dir;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", m.netns))
            .args(["--", "unshare", "--mount", "--propagation", "private", "--"])
            .args([
                "sh",
                "-c",
                "mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /etc/docker && exec \"$@\"",
                "sh",
                "dockerd",
            ])
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--host")
            .arg(format!("unix://{}", m.socket.display()))
            .arg("--host")
            .arg(format!("tcp://127.0.0.1:{MOBY_PORT}"))
            .arg("--tlsverify")
            .arg("--tlscacert")
            .arg(tls.join("ca.pem"))
            .arg("--tlscert")
            .arg(tls.join("server-cert.pem"))
            .arg("--tlskey")
            .arg(tls.join("server-key.pem"))
            .arg("--data-root")
            .arg(d.join("root"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(&m.pid_file)
            .args(["--iptables=false", "--ip6tables=false"])
            .args(["--storage-driver", "overlay2"])
            .args(["--cgroup-parent", &m.cgroup_parent])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn nsenter ... dockerd");
        m.daemon = Some(child);
        let launched = Instant::now();
        let cli = m.client();
        loop {
            let out = cli.run(&["version", "--format", "{{.Server.APIVersion}}"]);
            if out.code == 0 && out.stdout.trim() == "1.41" {
                break;
            }
            if let Some(st) = m.daemon.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "moby {}: dockerd exited ({st}) at start:\n{}",
                    m.netns,
                    m.log_tail(60)
                );
            }
            assert!(
                launched.elapsed() < READY_WITHIN,
                "moby {}: `docker version` did not report API 1.41 within {READY_WITHIN:?} \
                 (last: {})\n{}",
                m.netns,
                out.summary(),
                m.log_tail(60)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m.started_in = t0.elapsed();
        eprintln!(
            "moby {}: certificates in {:.2} s, daemon ready {:.2} s after launch",
            m.netns,
            certs_at.as_secs_f64(),
            launched.elapsed().as_secs_f64()
        );
        m
    }

    /// A stock-CLI/docker-py client with the first client certificate (`alice`), run inside
    /// the daemon's namespace.
    pub fn client(&self) -> DockerClient {
        self.client_as(0)
    }

    /// A client with client certificate `i` (0 `alice`, 1 `bob`).
    pub fn client_as(&self, i: usize) -> DockerClient {
        DockerClient::new(&self.host, &self.clients[i], Some(&self.netns))
    }

    /// dockerd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// The last `lines` lines of dockerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// One raw HTTP/1.1 request on the daemon's unix socket (no TLS, no client): what moby
    /// answers to exactly these bytes, for comparing status codes, headers and bodies.
    /// `path` includes any version prefix (`/v1.41/networks/create`). Panics on I/O errors.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> RawResponse {
        self.try_raw(method, path, headers, body)
            .unwrap_or_else(|e| panic!("moby {}: {method} {path}: {e}", self.netns))
    }

    /// [`Moby::raw`], returning I/O and protocol errors instead of panicking.
    pub fn try_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<RawResponse, String> {
        let e = |what: &str| {
            let what = what.to_owned();
            move |err: std::io::Error| format!("{what}: {err}")
        };
        let mut s = UnixStream::connect(&self.socket)
            .map_err(e(&format!("connect {}", self.socket.display())))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(e("read timeout"))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() || matches!(method, "POST" | "PUT") {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).map_err(e("write request"))?;
        s.write_all(body).map_err(e("write body"))?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).map_err(e("read status line"))?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            r.read_line(&mut line).map_err(e("read header"))?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((n, v)) = l.split_once(':') {
                headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        let mut body = Vec::new();
        if method == "HEAD" || status == 204 || status == 304 {
            // no body
        } else if chunked {
            loop {
                line.clear();
                r.read_line(&mut line).map_err(e("read chunk size"))?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| format!("bad chunk size {line:?}"))?;
                if size == 0 {
                    break;
                }
                let at = body.len();
                body.resize(at + size, 0);
                r.read_exact(&mut body[at..]).map_err(e("read chunk"))?;
                line.clear();
                r.read_line(&mut line).map_err(e("read chunk end"))?;
            }
        } else {
            r.read_to_end(&mut body).map_err(e("read body"))?;
        }
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }

    /// SIGKILLs every running container through the API, so that stopping the daemon does not
    /// wait out busybox's ignored SIGTERM (10 s per container). Best effort.
    fn kill_containers(&self) {
        let Ok(r) = self.try_raw("GET", "/v1.41/containers/json", &[], b"") else {
            return;
        };
        let list: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        for c in list.as_array().into_iter().flatten() {
            if let Some(id) = c["Id"].as_str() {
                let _ = self.try_raw("POST", &format!("/v1.41/containers/{id}/kill"), &[], b"");
            }
        }
    }

    fn stop(&mut self) {
        let Some(mut child) = self.daemon.take() else {
            return;
        };
        let pid = child.id() as i32;
        if child.try_wait().ok().flatten().is_none() {
            self.kill_containers();
        }
        // containerd is dockerd's child; remember it before dockerd goes.
        let kids = children(pid);
        // SAFETY: SIGTERM to the pid of the dockerd we spawned (nsenter and unshare exec it).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let t0 = Instant::now();
        let mut dead = false;
        while t0.elapsed() < STOP_WITHIN {
            if child.try_wait().ok().flatten().is_some() && !kids.iter().any(|&k| pid_alive(k)) {
                dead = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !dead {
            eprintln!(
                "moby {}: dockerd or containerd still running {STOP_WITHIN:?} after SIGTERM, \
                 killing",
                self.netns
            );
            for &k in &kids {
                // SAFETY: SIGKILL to containerd, a child of our dockerd recorded above.
                unsafe {
                    libc::kill(k, libc::SIGKILL);
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        eprintln!(
            "moby {}: stopped in {:.2} s",
            self.netns,
            t0.elapsed().as_secs_f64()
        );
    }
}

/// Removes `dir` and every directory below it, children first (cgroupfs refuses rm -r).
fn rmdir_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("cleanup: rmdir {}: {e}", dir.display());
        }
    }
}

impl Drop for Moby {
    fn drop(&mut self) {
        if std::thread::panicking() && self.daemon.is_some() {
            eprintln!(
                "--- moby {} dockerd log (tail):\n{}",
                self.netns,
                self.log_tail(40)
            );
        }
        self.stop();
        let out = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        if let Ok(o) = &out {
            if !o.status.success() && Path::new("/run/netns").join(&self.netns).exists() {
                eprintln!(
                    "cleanup: ip netns del {}: {}",
                    self.netns,
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let d = h.path().join(self.cgroup_parent.trim_start_matches('/'));
            if d.exists() {
                rmdir_tree(&d);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: rm -rf {}: {e}", self.dir.display());
        }
    }
}
