//! `fabric shim`: the keeper of one run of one container (one generation).
//!
//! The agent starts it in its own session (it outlives an agent restart) for a container
//! directory `DIR/containers/<vm>/`. It runs `runc --root ROOT run --bundle DIR/…/bundle <vm>`
//! in the foreground with the shim's pipes as the process's stdio (with a terminal: a pty whose
//! slave is runc's stdio and controlling terminal; runc puts it in raw mode and proxies it to
//! the container's own pty, and follows its size on SIGWINCH). It captures output from the
//! first byte into the bounded log ([`super::logs`]) and keeps the output of this run in memory
//! (up to [`EARLY_MAX`]) so that an attach made before the start (`docker run`) gets all of it.
//!
//! `shim.sock` (mode 0600) takes one JSON request line per connection ([`ShimRequest`]) and
//! answers one JSON line ([`ShimReply`]); after an `attach` answer the connection carries the
//! tunnel's frames: client → shim `Stdin`, `StdinEof`, `Resize`; shim → client `Stdout`,
//! `Stderr` and, at the end, `Exit`.
//!
//! `state.json` ([`ShimState`]) is written atomically when the process starts (and again with
//! its pid) and when it ends (exit status, 128 + signal for a signalled process). Then the
//! shim runs `runc delete`, answers the waiters, and exits.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::logs::{self, LogWriter, Stream};
use crate::control::tunnel::proto::Frame;
use crate::io::pty::{openpty, set_winsize};

/// The shim's state file in the container directory.
pub const STATE_FILE: &str = "state.json";
/// The shim's socket in the container directory.
pub const SOCK_FILE: &str = "shim.sock";
/// The shim's pid file in the container directory.
pub const PID_FILE: &str = "shim.pid";
/// runc writes the container's init pid here.
pub const INIT_PID_FILE: &str = "init.pid";
/// Output of one run kept in memory for attaches made before the start.
pub const EARLY_MAX: usize = 4 << 20;
/// Frames buffered per attached client before the process's output waits for it.
pub const ATTACH_QUEUE: usize = 256;

/// `fabric shim` flags (hidden; the agent's runtime passes them).
#[derive(clap::Args, Debug, Clone)]
pub struct ShimArgs {
    /// The container directory (`DIR/containers/<vm>`).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// runc's state root (`DIR/runc`).
    #[arg(long, value_name = "DIR")]
    pub runc_root: PathBuf,
    /// The container (VM UUID; runc's container id).
    #[arg(long)]
    pub vm: String,
    /// The generation this run is.
    #[arg(long)]
    pub generation: u64,
    /// The process has a terminal.
    #[arg(long)]
    pub tty: bool,
    /// The process's stdin is open (`-i`); otherwise it reads /dev/null.
    #[arg(long)]
    pub stdin: bool,
    /// Close the process's stdin when an attached client closes its stdin.
    #[arg(long)]
    pub stdin_once: bool,
    /// The signal `stop` sends first.
    #[arg(long, default_value = "SIGTERM")]
    pub stop_signal: String,
    /// Size limit of each of the two log files.
    #[arg(long, default_value_t = logs::DEFAULT_MAX_BYTES)]
    pub log_max: u64,
    /// The runc binary.
    #[arg(long, default_value = "runc")]
    pub runc: PathBuf,
}

/// `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    /// The generation this run is (written by the agent before the shim starts, so that a
    /// generation is never started twice).
    pub generation: u64,
    /// The container's init process on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// When runc was started (ms since the epoch); `None`: the shim has not started it yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<i64>,
    /// When the process ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
    /// Its exit status (128 + signal when signalled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// Why the run failed before the process could run (runc refused the bundle, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ShimState {
    /// Reads `dir/state.json` (`None` when absent or unreadable).
    pub fn read(dir: &Path) -> Option<ShimState> {
        let b = std::fs::read(dir.join(STATE_FILE)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Writes `dir/state.json` atomically.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join("state.json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(self).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(tmp, dir.join(STATE_FILE))
    }
}

/// One request on `shim.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ShimRequest {
    /// Attach: the answer, then frames both ways.
    Attach {
        /// Forward `Stdin` frames.
        stdin: bool,
        /// Send stdout.
        stdout: bool,
        /// Send stderr.
        stderr: bool,
        /// First send all output of this run so far (an attach made before the start).
        from_start: bool,
    },
    /// Stop: the stop signal, then SIGKILL after `timeout` seconds.
    Stop {
        /// Seconds of grace.
        timeout: u32,
    },
    /// Deliver a signal (`SIGHUP`, `HUP`, `1`).
    Signal {
        /// The signal.
        name: String,
    },
    /// Resize the terminal.
    Resize {
        /// Rows.
        height: u16,
        /// Columns.
        width: u16,
    },
    /// The current state.
    Status,
    /// Answer when the process has ended (with the final state).
    Wait,
}

/// The answer line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimReply {
    /// The state at the time of the answer.
    #[serde(default)]
    pub state: Option<ShimState>,
    /// Why the request was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A signal name or number as runc kill takes it, checked (`SIGTERM`, `TERM`, `15`).
pub fn signal_name(s: &str) -> Option<String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u8>() {
        return (1..=64).contains(&n).then(|| n.to_string());
    }
    let up = s.to_ascii_uppercase();
    let bare = up.strip_prefix("SIG").unwrap_or(&up);
    const NAMES: [&str; 31] = [
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
        "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
        "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
    ];
    NAMES.contains(&bare).then(|| format!("SIG{bare}"))
}

struct Hub {
    early: Vec<(Stream, Vec<u8>)>,
    early_len: usize,
    subs: Vec<(u64, bool, bool, mpsc::Sender<Frame>)>,
    next_id: u64,
    exit: Option<i32>,
}

struct Shared {
    args: ShimArgs,
    hub: Mutex<Hub>,
    log: Mutex<LogWriter>,
    state: Mutex<ShimState>,
    stdin: Mutex<Option<std::sync::mpsc::Sender<Option<Vec<u8>>>>>,
    pty: Option<OwnedFd>,
    exited: AtomicBool,
    conns: AtomicUsize,
    done: tokio::sync::Notify,
}

impl Shared {
    fn output(&self, stream: Stream, data: &[u8]) {
        if let Ok(mut l) = self.log.lock() {
            if let Err(e) = l.write(stream, logs::now_ns(), data) {
                eprintln!("fabric shim: writing the log: {e}");
            }
        }
        let subs: Vec<mpsc::Sender<Frame>> = {
            let mut h = self.hub.lock().unwrap_or_else(|e| e.into_inner());
            if h.early_len + data.len() <= EARLY_MAX {
                h.early_len += data.len();
                h.early.push((stream, data.to_vec()));
            }
            h.subs
                .iter()
                .filter(|(_, o, e, _)| match stream {
                    Stream::Stdout => *o,
                    Stream::Stderr => *e,
                })
                .map(|s| s.3.clone())
                .collect()
        };
        let make = match stream {
            Stream::Stdout => Frame::Stdout,
            Stream::Stderr => Frame::Stderr,
        };
        for s in subs {
            for f in Frame::chunks(make, data) {
                // A client that went away is dropped at the end; a slow one holds the output
                // (as moby's attach does).
                let _ = s.blocking_send(f);
            }
        }
    }

    fn runc(&self) -> Command {
        let mut c = Command::new(&self.args.runc);
        c.arg("--root").arg(&self.args.runc_root);
        c
    }

    fn kill(&self, sig: &str) -> Result<(), String> {
        let out = self
            .runc()
            .args(["kill", &self.args.vm, sig])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running runc kill: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "runc kill {sig}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Waits (at most 10 s) until runc has started the process; false if it ended first.
    fn wait_started(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.exited.load(Ordering::SeqCst) {
                return false;
            }
            if self.snapshot().pid.is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn snapshot(&self) -> ShimState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Runs `fabric shim` until the container's process has ended.
pub fn run(args: ShimArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone();
    let bundle = dir.join("bundle");
    anyhow::ensure!(
        bundle.join("config.json").is_file(),
        "{}: no bundle/config.json (expected a prepared container directory)",
        dir.display()
    );
    std::fs::write(dir.join(PID_FILE), std::process::id().to_string())
        .context("writing shim.pid")?;
    let mut state = ShimState::read(&dir).unwrap_or_default();
    if state.generation != args.generation || state.started_ms.is_some() {
        // The agent writes {generation} just before it starts us; anything else means this
        // generation already ran (or is running): never run it twice.
        anyhow::bail!(
            "state.json says generation {} (started: {}), not a fresh generation {}",
            state.generation,
            state.started_ms.is_some(),
            args.generation
        );
    }
    let log = LogWriter::open(&dir, args.log_max).context("opening the log")?;

    // A container of this id left from an earlier generation (its shim died) is in the way.
    let _ = Command::new(&args.runc)
        .arg("--root")
        .arg(&args.runc_root)
        .args(["delete", "--force", &args.vm])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_file(dir.join(INIT_PID_FILE));

    let mut cmd = Command::new(&args.runc);
    cmd.arg("--root")
        .arg(&args.runc_root)
        .arg("run")
        .arg("--bundle")
        .arg(&bundle)
        .arg("--pid-file")
        .arg(dir.join(INIT_PID_FILE))
        .arg(&args.vm);
    let mut readers: Vec<(Stream, Box<dyn Read + Send>)> = Vec::new();
    let mut stdin_w: Option<Box<dyn Write + Send>> = None;
    let mut pty = None;
    let mut child = if args.tty {
        let (master, slave) = openpty(24, 80).context("allocating a pty")?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        crate::io::pty::new_session(&mut cmd, true);
        let child = cmd.spawn().context("starting runc")?;
        let r = File::from(master.try_clone()?);
        readers.push((Stream::Stdout, Box::new(r)));
        if args.stdin {
            stdin_w = Some(Box::new(File::from(master.try_clone()?)));
        }
        pty = Some(master);
        child
    } else {
        cmd.stdin(if args.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting runc")?;
        if let Some(o) = child.stdout.take() {
            readers.push((Stream::Stdout, Box::new(o)));
        }
        if let Some(e) = child.stderr.take() {
            readers.push((Stream::Stderr, Box::new(e)));
        }
        if let Some(i) = child.stdin.take() {
            stdin_w = Some(Box::new(i));
        }
        child
    };
    // The Command holds the pty slave: the master reads EOF only when every copy is closed.
    drop(cmd);
    state.started_ms = Some(logs::now_ns() / 1_000_000);
    state.write(&dir).context("writing state.json")?;

    let (stdin_tx, stdin_rx) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
    let shared = Arc::new(Shared {
        args: args.clone(),
        hub: Mutex::new(Hub {
            early: Vec::new(),
            early_len: 0,
            subs: Vec::new(),
            next_id: 0,
            exit: None,
        }),
        log: Mutex::new(log),
        state: Mutex::new(state),
        stdin: Mutex::new(stdin_w.is_some().then_some(stdin_tx)),
        pty,
        exited: AtomicBool::new(false),
        conns: AtomicUsize::new(0),
        done: tokio::sync::Notify::new(),
    });
    if let Some(mut w) = stdin_w {
        let is_pty = args.tty;
        std::thread::spawn(move || {
            while let Ok(Some(b)) = stdin_rx.recv() {
                if w.write_all(&b).is_err() {
                    break;
                }
            }
            if is_pty {
                // EOF on a terminal is ^D at the start of a line.
                let _ = w.write_all(&[4]);
                // Keep the master open: closing it would hang up the terminal.
                while stdin_rx.recv().is_ok() {}
            }
        });
    }
    let mut threads = Vec::new();
    for (stream, mut r) in readers {
        let sh = shared.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => sh.output(stream, &buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // EIO: the pty's last slave closed.
                    Err(_) => break,
                }
            }
        }));
    }
    // The pid, once runc has written it.
    {
        let sh = shared.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && !sh.exited.load(Ordering::Relaxed) {
                if let Some(pid) = std::fs::read_to_string(sh.args.dir.join(INIT_PID_FILE))
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                {
                    let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
                    if st.finished_ms.is_none() {
                        st.pid = Some(pid);
                        let _ = st.write(&sh.args.dir);
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }

    // Its own thread serves the socket while this one waits for runc.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the shim's runtime")?;
    let sock = dir.join(SOCK_FILE);
    let _ = std::fs::remove_file(&sock);
    let listener = {
        let _g = rt.enter();
        let l = tokio::net::UnixListener::bind(&sock)
            .with_context(|| format!("binding {}", sock.display()))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
        l
    };
    let server = {
        let sh = shared.clone();
        rt.spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let sh = sh.clone();
                sh.conns.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Err(e) = serve_conn(&sh, conn).await {
                        eprintln!("fabric shim: connection: {e}");
                    }
                    sh.conns.fetch_sub(1, Ordering::SeqCst);
                });
            }
        })
    };

    // The process's end.
    let status = child.wait().context("waiting for runc")?;
    for t in threads {
        let _ = t.join();
    }
    let code = exit_code(status);
    shared.exited.store(true, Ordering::SeqCst);
    {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.finished_ms = Some(logs::now_ns() / 1_000_000);
        st.exit_status = Some(code);
        st.write(&dir).context("writing state.json")?;
    }
    let _ = shared
        .runc()
        .args(["delete", "--force", &args.vm])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    {
        let mut h = shared.hub.lock().unwrap_or_else(|e| e.into_inner());
        h.exit = Some(code);
        for (_, _, _, s) in h.subs.drain(..) {
            let _ = s.try_send(Frame::Exit { code });
        }
    }
    *shared.stdin.lock().unwrap_or_else(|e| e.into_inner()) = None;
    shared.done.notify_waiters();
    // Let the clients read their answers, then go.
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(2);
        while shared.conns.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    server.abort();
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(dir.join(PID_FILE));
    Ok(())
}

/// runc's exit status is the process's (runc itself reports 128 + signal for a signalled
/// process); a runc killed by a signal reads the same way.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

async fn reply(
    w: &mut (impl AsyncWriteExt + Unpin),
    state: Option<ShimState>,
    error: Option<String>,
) -> std::io::Result<()> {
    let mut b = serde_json::to_vec(&ShimReply { state, error }).unwrap_or_default();
    b.push(b'\n');
    w.write_all(&b).await
}

async fn serve_conn(sh: &Arc<Shared>, conn: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    (&mut r).take(4096).read_line(&mut line).await?;
    let req: ShimRequest = match serde_json::from_str(line.trim()) {
        Ok(q) => q,
        Err(e) => return reply(&mut w, None, Some(format!("bad request: {e}"))).await,
    };
    match req {
        ShimRequest::Status => reply(&mut w, Some(sh.snapshot()), None).await,
        ShimRequest::Wait => {
            let notified = sh.done.notified();
            if !sh.exited.load(Ordering::SeqCst) {
                notified.await;
            }
            reply(&mut w, Some(sh.snapshot()), None).await
        }
        ShimRequest::Signal { name } => {
            let r = match signal_name(&name) {
                Some(sig) => {
                    let sh = sh.clone();
                    tokio::task::spawn_blocking(move || {
                        if !sh.wait_started() {
                            return Err("the container's process is not running".to_string());
                        }
                        sh.kill(&sig)
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("runc kill: {e}")))
                }
                None => Err(format!("{name:?} is not a signal name or number")),
            };
            reply(&mut w, Some(sh.snapshot()), r.err()).await
        }
        ShimRequest::Stop { timeout } => {
            let sig = signal_name(&sh.args.stop_signal).unwrap_or_else(|| "SIGTERM".into());
            let sh2 = sh.clone();
            // On the shim's own clock: the agent may be gone by the time it is due.
            std::thread::spawn(move || {
                if sh2.wait_started() {
                    let _ = sh2.kill(&sig);
                }
                let deadline = Instant::now() + Duration::from_secs(timeout.into());
                while Instant::now() < deadline && !sh2.exited.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if !sh2.exited.load(Ordering::SeqCst) {
                    let _ = sh2.kill("SIGKILL");
                }
            });
            reply(&mut w, Some(sh.snapshot()), None).await
        }
        ShimRequest::Resize { height, width } => {
            let r = match &sh.pty {
                Some(fd) => set_winsize(fd, height, width).map_err(|e| format!("resize: {e}")),
                None => Err("the container has no terminal".to_string()),
            };
            reply(&mut w, Some(sh.snapshot()), r.err()).await
        }
        ShimRequest::Attach {
            stdin,
            stdout,
            stderr,
            from_start,
        } => attach(sh, r, w, stdin, stdout, stderr, from_start).await,
    }
}

async fn attach(
    sh: &Arc<Shared>,
    mut r: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut w: tokio::net::unix::OwnedWriteHalf,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    from_start: bool,
) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Frame>(ATTACH_QUEUE);
    let (early, id, exit) = {
        let mut h = sh.hub.lock().unwrap_or_else(|e| e.into_inner());
        let early: Vec<(Stream, Vec<u8>)> = if from_start {
            h.early
                .iter()
                .filter(|(s, _)| match s {
                    Stream::Stdout => stdout,
                    Stream::Stderr => stderr,
                })
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let id = h.next_id;
        h.next_id += 1;
        if h.exit.is_none() {
            h.subs.push((id, stdout, stderr, tx));
        }
        (early, id, h.exit)
    };
    reply(&mut w, Some(sh.snapshot()), None).await?;
    let mut buf = Vec::new();
    for (s, d) in early {
        let make = match s {
            Stream::Stdout => Frame::Stdout,
            Stream::Stderr => Frame::Stderr,
        };
        for f in Frame::chunks(make, &d) {
            buf.clear();
            f.encode(&mut buf);
            w.write_all(&buf).await?;
        }
    }
    if let Some(code) = exit {
        buf.clear();
        Frame::Exit { code }.encode(&mut buf);
        return w.write_all(&buf).await;
    }
    let input = {
        let sh = sh.clone();
        tokio::spawn(async move {
            let mut pending = Vec::new();
            let mut chunk = vec![0u8; 32 << 10];
            loop {
                match crate::control::tunnel::proto::Frame::decode(&pending) {
                    Ok(Some((f, n))) => {
                        pending.drain(..n);
                        match f {
                            Frame::Stdin(b) if stdin => {
                                if let Some(s) =
                                    sh.stdin.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
                                {
                                    let _ = s.send(Some(b));
                                }
                            }
                            Frame::StdinEof if stdin && sh.args.stdin_once => {
                                if let Some(s) =
                                    sh.stdin.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
                                {
                                    let _ = s.send(None);
                                }
                            }
                            Frame::Resize { height, width } => {
                                if let Some(fd) = &sh.pty {
                                    let _ = set_winsize(fd, height, width);
                                }
                            }
                            _ => {}
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(_) => return,
                }
                match r.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&chunk[..n]),
                }
            }
        })
    };
    while let Some(f) = rx.recv().await {
        buf.clear();
        f.encode(&mut buf);
        if w.write_all(&buf).await.is_err() {
            break;
        }
        if matches!(f, Frame::Exit { .. }) {
            break;
        }
    }
    input.abort();
    let mut h = sh.hub.lock().unwrap_or_else(|e| e.into_inner());
    h.subs.retain(|s| s.0 != id);
    Ok(())
}

/// A client of a shim's socket.
pub struct ShimClient {
    sock: PathBuf,
}

/// Why a shim did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// No shim listens (the container is not running).
    #[error("no shim at {0}: the container is not running")]
    NotRunning(String),
    /// The socket failed mid-request.
    #[error("shim at {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The shim refused the request.
    #[error("shim refused: {0}")]
    Refused(String),
}

impl ShimClient {
    /// A client of the shim of container directory `dir`.
    pub fn new(dir: &Path) -> ShimClient {
        ShimClient {
            sock: dir.join(SOCK_FILE),
        }
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> ShimError + '_ {
        |source| ShimError::Io {
            path: self.sock.display().to_string(),
            source,
        }
    }

    /// Sends `req`; returns the answer and the connection (for an attach's frames).
    pub async fn request(&self, req: &ShimRequest) -> Result<(ShimReply, UnixStream), ShimError> {
        let mut c = UnixStream::connect(&self.sock)
            .await
            .map_err(|_| ShimError::NotRunning(self.sock.display().to_string()))?;
        let mut b = serde_json::to_vec(req).unwrap_or_default();
        b.push(b'\n');
        c.write_all(&b).await.map_err(self.io())?;
        // Read the answer line byte by byte: frames may follow it on the same connection.
        let mut line = Vec::new();
        loop {
            let mut one = [0u8; 1];
            let n = c.read(&mut one).await.map_err(self.io())?;
            if n == 0 || one[0] == b'\n' || line.len() > 65536 {
                break;
            }
            line.push(one[0]);
        }
        let rep: ShimReply = serde_json::from_slice(&line)
            .map_err(|e| self.io()(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        if let Some(e) = &rep.error {
            return Err(ShimError::Refused(e.clone()));
        }
        Ok((rep, c))
    }

    /// A request that needs no connection afterwards.
    pub async fn call(&self, req: &ShimRequest) -> Result<ShimReply, ShimError> {
        self.request(req).await.map(|(r, _)| r)
    }
}

/// Names of the shim's files, for the runtime's clean-up.
pub fn files() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("state", STATE_FILE),
        ("sock", SOCK_FILE),
        ("pid", PID_FILE),
        ("init_pid", INIT_PID_FILE),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_are_checked() {
        assert_eq!(signal_name("SIGTERM").as_deref(), Some("SIGTERM"));
        assert_eq!(signal_name("term").as_deref(), Some("SIGTERM"));
        assert_eq!(signal_name("9").as_deref(), Some("9"));
        assert_eq!(signal_name("KILL").as_deref(), Some("SIGKILL"));
        assert_eq!(signal_name("0"), None);
        assert_eq!(signal_name("SIGFOO"), None);
        assert_eq!(signal_name("--all"), None);
    }

    #[test]
    fn requests_and_state_round_trip() {
        let q = ShimRequest::Attach {
            stdin: true,
            stdout: true,
            stderr: false,
            from_start: true,
        };
        let s = serde_json::to_string(&q).unwrap();
        assert!(s.contains("\"op\":\"attach\""), "{s}");
        assert_eq!(serde_json::from_str::<ShimRequest>(&s).unwrap(), q);
        let st = ShimState {
            generation: 3,
            pid: Some(7),
            started_ms: Some(1),
            finished_ms: None,
            exit_status: None,
            error: None,
        };
        let j = serde_json::to_string(&st).unwrap();
        assert_eq!(j, r#"{"generation":3,"pid":7,"started_ms":1}"#);
        assert_eq!(serde_json::from_str::<ShimState>(&j).unwrap(), st);
    }
}
