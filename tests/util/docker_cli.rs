//! Runs the real Docker clients against a Docker endpoint over TLS: the stock docker CLI
//! (28.x, `/usr/local/bin/docker`, not Debian's 20.10 `/usr/bin/docker`) and docker-py (in its
//! own virtual environment). Used against fabric's Docker API and against the moby 20.10
//! reference daemon (`moby.rs`) alike, so that a test can diff their answers.
//!
//! Include it at the crate root of a test as `#[path = "util/docker_cli.rs"] mod docker_cli;`
//! (`moby.rs` refers to it as `crate::docker_cli`).
//!
//! Every command gets a fresh, empty `DOCKER_CONFIG` (one per client, removed on drop), no
//! `DOCKER_API_VERSION` or `DOCKER_CONTEXT` (the CLI negotiates, as a user's would) and a
//! timeout that kills the client and panics with what it printed.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one CLI or docker-py command may take before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What a client command printed and how it exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Out {
    /// Panics with the whole output unless the command exited 0; returns stdout.
    pub fn ok(&self, what: &str) -> &str {
        assert_eq!(
            self.code, 0,
            "{what}: exit {} (expected 0)\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        &self.stdout
    }

    /// One line for a table of observed outputs: exit code, stdout and stderr, escaped.
    pub fn summary(&self) -> String {
        format!(
            "exit {} | stdout {:?} | stderr {:?}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The stock docker CLI: `$FABRIC_DOCKER_CLI`, else `/usr/local/bin/docker` (28.x).
pub fn docker_cli() -> PathBuf {
    std::env::var_os("FABRIC_DOCKER_CLI")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/docker"))
}

/// Whether the stock CLI runs; when it does not, says why the caller skips (under CI=true a
/// missing one panics: it is part of the machine).
pub fn docker_cli_present() -> bool {
    let ok = Command::new(docker_cli()).arg("--version").output().is_ok();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the stock docker CLI {} is missing (CI=true)",
            docker_cli().display()
        );
        eprintln!("skipping: no docker CLI at {}", docker_cli().display());
    }
    ok
}

/// docker-py's Python: `$FABRIC_DOCKER_PY`, else `/opt/fabric-docker-py/bin/python`. `None`
/// (after printing why the caller skips) when it is missing; under CI=true a missing one
/// panics, since the setup scripts install it there.
pub fn docker_py() -> Option<PathBuf> {
    let p = std::env::var_os("FABRIC_DOCKER_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/fabric-docker-py/bin/python"));
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "docker-py's python {} is missing and CI=true forbids skipping \
             (scripts/setup.d/40-docker.sh installs it)",
            p.display()
        );
    }
    eprintln!(
        "skipping the docker-py part: {} is missing (set FABRIC_DOCKER_PY or run \
         scripts/setup.d/40-docker.sh)",
        p.display()
    );
    None
}

/// A Docker client configuration: where the endpoint is, the client certificate directory
/// (`ca.pem`, `cert.pem`, `key.pem`) and, for an endpoint inside a network namespace, its name.
pub struct DockerClient {
    /// `tcp://IP:PORT`.
    pub host: String,
    /// `DOCKER_CERT_PATH`.
    pub cert_dir: PathBuf,
    /// `DOCKER_CONFIG`: an empty directory private to this client (removed on drop).
    pub config_dir: PathBuf,
    /// Run the clients inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
}

impl DockerClient {
    /// A client of `host` (`tcp://IP:PORT`) with the certificates in `cert_dir`, run inside
    /// `netns` if given; creates its empty `DOCKER_CONFIG`.
    pub fn new(host: &str, cert_dir: &Path, netns: Option<&str>) -> DockerClient {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let config_dir =
            std::env::temp_dir().join(format!("fabric-dockercfg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&config_dir);
        std::fs::create_dir_all(&config_dir).expect("create an empty DOCKER_CONFIG");
        DockerClient {
            host: host.to_owned(),
            cert_dir: cert_dir.to_owned(),
            config_dir,
            netns: netns.map(str::to_owned),
        }
    }

    /// The command line prefix: `ip netns exec NS` when in a namespace, with the client
    /// environment set and everything that would change the CLI's choices removed.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        };
        for var in [
            "DOCKER_API_VERSION",
            "DOCKER_CONTEXT",
            "DOCKER_TLS",
            "DOCKER_DEFAULT_PLATFORM",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "SSL_CERT_FILE",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("DOCKER_HOST", &self.host)
            .env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", &self.cert_dir)
            .env("DOCKER_CONFIG", &self.config_dir);
        cmd
    }

    /// `docker ARGS` with the stock CLI.
    pub fn run(&self, args: &[&str]) -> Out {
        self.run_stdin(args, &[])
    }

    /// `docker ARGS` with `stdin` on its standard input.
    pub fn run_stdin(&self, args: &[&str], stdin: &[u8]) -> Out {
        let mut cmd = self.command(&docker_cli());
        cmd.args(args);
        run_bounded(cmd, stdin, &format!("docker {}", args.join(" ")))
    }

    /// Runs `script` with docker-py's Python (`docker.from_env()` sees this client's host and
    /// certificates). Panics if docker-py is missing: call [`docker_py`] first to skip.
    pub fn py(&self, script: &str) -> Out {
        let python = docker_py().expect("docker-py is not installed");
        let mut cmd = self.command(&python);
        cmd.arg("-c").arg(script);
        let first = script.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        run_bounded(cmd, &[], &format!("docker-py script ({first} ...)"))
    }
}

impl Drop for DockerClient {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.config_dir);
    }
}

/// Runs `cmd` with `stdin`, collecting stdout and stderr; kills it and panics with what it
/// printed if it runs longer than [`COMMAND_TIMEOUT`].
pub fn run_bounded(mut cmd: Command, stdin: &[u8], what: &str) -> Out {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    let stdin = stdin.to_vec();
    // A writer thread: a large stdin (an image tar) must not dead-lock against full pipes.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let mut so = child.stdout.take().expect("piped stdout");
    let mut se = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for a client") {
            break Some(st);
        }
        if t0.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    match status {
        Some(st) => Out {
            code: st.code().unwrap_or(-1),
            stdout,
            stderr,
        },
        None => panic!(
            "{what}: no exit within {COMMAND_TIMEOUT:?}, killed\nstdout: {stdout}\nstderr: {stderr}"
        ),
    }
}
