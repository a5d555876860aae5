//! `docker exec` on a host: `fabric ns-exec --dir DIR [--user] [--cwd] [--env]… -- argv…`
//! ([`ns_exec_main`], over `io::nsexec`: Debian's runc 1.1.5 `exec` cannot enter our
//! containers) in the foreground, its stdio our pipes (with a terminal: a pty whose slave is its
//! stdio and controlling terminal, as for the shim), its output sent as tunnel frames,
//! `Exit{code}` at the end.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use tokio::sync::mpsc;

use super::Runtime;
use crate::control::tunnel::proto::Frame;
use crate::io::pty::{openpty, set_winsize};

/// What to run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// argv (not empty).
    pub cmd: Vec<String>,
    /// Extra `K=V`.
    pub env: Vec<String>,
    /// Numeric `uid[:gid]`; empty: the container's user.
    pub user: String,
    /// Working directory; empty: the container's.
    pub working_dir: String,
    /// Allocate a terminal.
    pub tty: bool,
    /// Forward stdin.
    pub stdin: bool,
}

/// Why an exec could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Something in the request is refused.
    #[error("exec refused: {0}")]
    Refused(String),
    /// runc could not be started.
    #[error("starting runc exec: {0}")]
    Spawn(std::io::Error),
}

impl ExecSpec {
    /// The checks made before anything runs (the same rules as the container's own process).
    pub fn check(&self) -> Result<(), ExecError> {
        if self.cmd.is_empty() {
            return Err(ExecError::Refused("no command given".into()));
        }
        let all = self
            .cmd
            .iter()
            .chain(&self.env)
            .chain([&self.user, &self.working_dir]);
        for s in all {
            if s.contains('\0') {
                return Err(ExecError::Refused(format!("{s:?} contains a NUL byte")));
            }
        }
        if !self.user.is_empty()
            && !self
                .user
                .split(':')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(ExecError::Refused(format!(
                "user {:?}: only numeric uid[:gid] is supported",
                self.user
            )));
        }
        if !self.working_dir.is_empty() && !self.working_dir.starts_with('/') {
            return Err(ExecError::Refused(format!(
                "working directory {:?} is not absolute",
                self.working_dir
            )));
        }
        if let Some(e) = self.env.iter().find(|e| !e.contains('=')) {
            return Err(ExecError::Refused(format!("env {e:?} is not K=V")));
        }
        Ok(())
    }

    /// `fabric ns-exec`'s arguments after `--dir DIR`.
    pub fn ns_exec_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if !self.user.is_empty() {
            a.extend(["--user".into(), self.user.clone()]);
        }
        if !self.working_dir.is_empty() {
            a.extend(["--cwd".into(), self.working_dir.clone()]);
        }
        for e in &self.env {
            a.extend(["--env".into(), e.clone()]);
        }
        a.push("--".into());
        a.extend(self.cmd.iter().cloned());
        a
    }
}

/// Runs `spec` in running container `vm`: `Started{pid}`, output frames, `Exit{code}` on
/// `output`; `Stdin`/`StdinEof`/`Resize` from `input`. Returns the exit code.
pub async fn run(
    rt: &Runtime,
    vm: &str,
    spec: &ExecSpec,
    mut input: mpsc::Receiver<Frame>,
    output: mpsc::Sender<Frame>,
) -> Result<i32, ExecError> {
    spec.check()?;
    let mut cmd = Command::new(rt.exe());
    cmd.arg("ns-exec").arg("--dir").arg(rt.dir(vm));
    cmd.args(spec.ns_exec_args());
    let mut readers: Vec<(bool, Box<dyn Read + Send>)> = Vec::new();
    let mut stdin_w: Option<Box<dyn Write + Send>> = None;
    let mut pty = None;
    let mut child = if spec.tty {
        let (master, slave) = openpty(24, 80).map_err(ExecError::Spawn)?;
        let dup = |f: &std::os::fd::OwnedFd| f.try_clone().map_err(ExecError::Spawn);
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        crate::io::pty::new_session(&mut cmd, true);
        let child = cmd.spawn().map_err(ExecError::Spawn)?;
        readers.push((false, Box::new(File::from(dup(&master)?))));
        if spec.stdin {
            stdin_w = Some(Box::new(File::from(dup(&master)?)));
        }
        pty = Some(master);
        child
    } else {
        cmd.stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(ExecError::Spawn)?;
        if let Some(o) = child.stdout.take() {
            readers.push((false, Box::new(o)));
        }
        if let Some(e) = child.stderr.take() {
            readers.push((true, Box::new(e)));
        }
        if let Some(i) = child.stdin.take() {
            stdin_w = Some(Box::new(i));
        }
        child
    };
    // The Command holds the pty slave: the master reads EOF only when every copy is closed.
    drop(cmd);
    let _ = output
        .send(Frame::Started {
            pid: Some(child.id()),
        })
        .await;
    let mut threads = Vec::new();
    for (err, mut r) in readers {
        let out = output.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let make = if err { Frame::Stderr } else { Frame::Stdout };
                        if out.blocking_send(make(buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }));
    }
    let (stdin_tx, stdin_rx) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
    if let Some(mut w) = stdin_w {
        let tty = spec.tty;
        std::thread::spawn(move || {
            while let Ok(Some(b)) = stdin_rx.recv() {
                if w.write_all(&b).is_err() {
                    return;
                }
            }
            if tty {
                let _ = w.write_all(&[4]);
                while stdin_rx.recv().is_ok() {}
            }
        });
    }
    let stdin_on = spec.stdin;
    let pump = tokio::spawn(async move {
        while let Some(f) = input.recv().await {
            match f {
                Frame::Stdin(b) if stdin_on => {
                    let _ = stdin_tx.send(Some(b));
                }
                Frame::StdinEof => {
                    let _ = stdin_tx.send(None);
                }
                Frame::Resize { height, width } => {
                    if let Some(m) = &pty {
                        let _ = set_winsize(m, height, width);
                    }
                }
                _ => {}
            }
        }
    });
    let code = tokio::task::spawn_blocking(move || {
        let st = child.wait();
        for t in threads {
            let _ = t.join();
        }
        st
    })
    .await
    .map_err(|e| ExecError::Spawn(std::io::Error::other(e.to_string())))?
    .map_err(ExecError::Spawn)?;
    pump.abort();
    use std::os::unix::process::ExitStatusExt;
    let code = code
        .code()
        .or_else(|| code.signal().map(|s| 128 + s))
        .unwrap_or(255);
    let _ = output.send(Frame::Exit { code }).await;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_exec_arguments() {
        let s = ExecSpec {
            cmd: vec!["sh".into(), "-c".into(), "id -u".into()],
            env: vec!["A=1".into()],
            user: "1000".into(),
            working_dir: "/tmp".into(),
            tty: true,
            stdin: false,
        };
        assert_eq!(
            s.ns_exec_args(),
            ["--user", "1000", "--cwd", "/tmp", "--env", "A=1", "--", "sh", "-c", "id -u"]
        );
        s.check().unwrap();
    }

    #[test]
    fn bad_requests_are_refused() {
        let ok = ExecSpec {
            cmd: vec!["true".into()],
            ..Default::default()
        };
        ok.check().unwrap();
        for bad in [
            ExecSpec {
                cmd: vec![],
                ..ok.clone()
            },
            ExecSpec {
                user: "root".into(),
                ..ok.clone()
            },
            ExecSpec {
                working_dir: "tmp".into(),
                ..ok.clone()
            },
            ExecSpec {
                env: vec!["NOEQ".into()],
                ..ok.clone()
            },
            ExecSpec {
                cmd: vec!["a\0b".into()],
                ..ok.clone()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}

/// `fabric ns-exec` flags (hidden; [`run`] passes them).
#[derive(clap::Args, Debug, Clone)]
pub struct NsExecArgs {
    /// The container directory (`DIR/containers/<vm>`: `init.pid`, `bundle/config.json`).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Numeric `uid[:gid]` (default: the container's user).
    #[arg(long)]
    pub user: Option<String>,
    /// Working directory (default: the container's).
    #[arg(long)]
    pub cwd: Option<String>,
    /// Extra `K=V` (after the container's environment).
    #[arg(long)]
    pub env: Vec<String>,
    /// The command.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

/// `fabric ns-exec`: runs the command in the running container of `--dir` with the
/// container's environment, user, working directory and capability set (see
/// [`crate::io::nsexec`]); exits with the command's status.
pub fn ns_exec_main(a: NsExecArgs) -> anyhow::Result<i32> {
    use anyhow::Context;
    let pid: i32 = std::fs::read_to_string(a.dir.join(super::shim::INIT_PID_FILE))
        .context("the container's init pid (is it running?)")?
        .trim()
        .parse()
        .context("init.pid")?;
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(a.dir.join("bundle/config.json")).context("bundle/config.json")?,
    )
    .context("bundle/config.json")?;
    let p = &cfg["process"];
    let mut env: Vec<(String, String)> = Vec::new();
    let vars = p["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .map(str::to_owned)
        .chain(a.env.iter().cloned());
    for kv in vars {
        if let Some((k, v)) = kv.split_once('=') {
            env.retain(|(x, _)| x != k);
            env.push((k.to_owned(), v.to_owned()));
        }
    }
    let (mut uid, mut gid) = (
        p["user"]["uid"].as_u64().unwrap_or(0) as u32,
        p["user"]["gid"].as_u64().unwrap_or(0) as u32,
    );
    if let Some(u) = &a.user {
        let mut it = u.split(':');
        uid = it.next().unwrap_or("0").parse().context("--user uid")?;
        gid = it.next().map_or(Ok(0), str::parse).context("--user gid")?;
    }
    let cwd = a
        .cwd
        .clone()
        .or_else(|| p["cwd"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "/".into());
    let caps = p["capabilities"]["bounding"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .filter_map(crate::io::nsexec::cap_number)
        .collect();
    // The program as the container sees it: a name is looked up on the container's PATH in
    // its root filesystem (lstat only: nothing on the host is followed).
    let rootfs = a.dir.join("bundle/rootfs");
    let name = a.cmd[0].clone();
    let program = if name.contains('/') {
        name.clone()
    } else {
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map_or(
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                |(_, v)| v.as_str(),
            )
            .to_owned();
        path.split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| format!("{}/{name}", d.trim_end_matches('/')))
            .find(|c| std::fs::symlink_metadata(rootfs.join(c.trim_start_matches('/'))).is_ok())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "OCI runtime exec failed: exec: \"{name}\": executable file not found in $PATH"
                )
            })?
    };
    let t = crate::io::nsexec::Target {
        pid,
        program,
        argv: a.cmd.clone(),
        env,
        cwd,
        uid,
        gid,
        caps,
    };
    Ok(crate::io::nsexec::run(&t)?)
}
