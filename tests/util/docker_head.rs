//! A fabric head serving the Docker API for tests: `fabric control --data DIR --docker-listen
//! 127.0.0.1:PORT` on loopback over a SQLite file in DIR (or PostgreSQL with `start_with`),
//! and accounts made with the real `fabric account add`. Killed when dropped.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::temp_dir::TempDir;

/// A free loopback port (bound and released: good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The fabric binary under test.
pub fn fabric_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fabric"))
}

/// A running head with its Docker API.
pub struct DockerHead {
    /// Its data directory (removed on drop).
    pub dir: TempDir,
    /// The control API (HTTPS, cluster CA).
    pub api: SocketAddr,
    /// The Docker API (TLS, accounts CA).
    pub docker: SocketAddr,
    child: Child,
}

impl DockerHead {
    /// Starts a head on SQLite.
    pub fn start() -> DockerHead {
        Self::start_with(&[])
    }

    /// Starts a head with `extra` arguments to `fabric control` (e.g. `--store postgres://…`).
    pub fn start_with(extra: &[&str]) -> DockerHead {
        let dir = TempDir::new("docker-head");
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let docker: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let store = format!("sqlite:{}", dir.0.join("fabric.db").display());
        let mut args: Vec<String> = vec![
            "control".into(),
            "--data".into(),
            dir.0.display().to_string(),
            "--listen".into(),
            api.to_string(),
            "--docker-listen".into(),
            docker.to_string(),
        ];
        if !extra.contains(&"--store") {
            args.push("--store".into());
            args.push(store);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = std::fs::File::create(dir.0.join("control.log")).unwrap();
        let child = Command::new(fabric_bin())
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start fabric control");
        let head = DockerHead {
            dir,
            api,
            docker,
            child,
        };
        let t0 = Instant::now();
        while TcpStream::connect(head.docker).is_err() || !head.dir.0.join("control.sock").exists()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "fabric control did not come up in 20 s; its log:\n{}",
                head.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "fabric control (Docker API on {}) up in {:?}",
            head.docker,
            t0.elapsed()
        );
        head
    }

    /// The head's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("control.log")).unwrap_or_default()
    }

    /// `DOCKER_HOST` for the docker CLI.
    pub fn docker_host(&self) -> String {
        format!("tcp://{}", self.docker)
    }

    /// Runs `fabric ARGS --data DIR`.
    pub fn fabric(&self, args: &[&str]) -> Output {
        Command::new(fabric_bin())
            .args(args)
            .arg("--data")
            .arg(&self.dir.0)
            .output()
            .expect("run fabric")
    }

    /// `fabric account add LOGIN`: the account's certificate directory (ca.pem, cert.pem,
    /// key.pem), inside the head's directory.
    pub fn account(&self, login: &str) -> PathBuf {
        let out = self.dir.0.join(format!("account-{login}"));
        let o = self.fabric(&["account", "add", login, "--cert-dir", out.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "fabric account add {login}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }

    /// The directory of the head's own files (`docker-tls/`, `pki/`).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.0.join(rel)
    }

    /// The data directory.
    pub fn data(&self) -> &Path {
        &self.dir.0
    }
}

impl Drop for DockerHead {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
