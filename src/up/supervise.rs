//! Keeping `fabric up`'s children running: each on a supervisor thread that spawns it (so
//! `PR_SET_PDEATHSIG` ties it to `fabric up`), restarts it after a backoff when it exits, and
//! stops it with SIGTERM (SIGKILL after a grace period).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Restart delays: 0.2 s doubling to 5 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    /// The first delay is 0.2 s.
    pub fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(200),
        }
    }

    /// The delay to wait now; the following one doubles, up to 5 s.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        d
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

/// A child process to keep running.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// Name (log and pid file names).
    pub name: String,
    /// Executable.
    pub exe: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Its log file (stdout and stderr, appended).
    pub log: PathBuf,
    /// Its pid file, rewritten at each start.
    pub pid_file: PathBuf,
}

impl ChildSpec {
    /// `exe args`, logging to `DIR/logs/NAME.log`, pid in `DIR/run/NAME.pid`.
    pub fn new(name: &str, exe: &Path, args: Vec<String>, dir: &Path) -> ChildSpec {
        ChildSpec {
            name: name.to_string(),
            exe: exe.to_path_buf(),
            args,
            log: dir.join("logs").join(format!("{name}.log")),
            pid_file: dir.join("run").join(format!("{name}.pid")),
        }
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        crate::io::process::die_with_parent(&mut cmd);
        let child = cmd.spawn()?;
        let _ = std::fs::write(&self.pid_file, format!("{}\n", child.id()));
        Ok(child)
    }
}

/// Keeps one child running on a thread of its own (which is also the thread that spawns it,
/// so `PR_SET_PDEATHSIG` ties the child to the supervisor's life).
pub struct Supervisor {
    name: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A child healthy for this long resets the restart backoff.
const HEALTHY: Duration = Duration::from_secs(60);
/// Time a child has to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

impl Supervisor {
    /// Starts the child and its supervising thread.
    pub fn start(spec: ChildSpec) -> Supervisor {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = spec.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("supervise-{name}"))
            .spawn(move || supervise(&spec, &flag))
            .expect("spawn a supervisor thread");
        Supervisor {
            name,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the child (SIGTERM, SIGKILL after 5 s) and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        tracing::info!(child = %self.name, "stopped");
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn supervise(spec: &ChildSpec, stop: &AtomicBool) {
    let mut backoff = Backoff::new();
    let mut restarts = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let mut child = match spec.spawn() {
            Ok(c) => {
                tracing::info!(child = %spec.name, pid = c.id(), restarts, log = %spec.log.display(), "started");
                c
            }
            Err(e) => {
                tracing::error!(child = %spec.name, error = %e, exe = %spec.exe.display(), "cannot start");
                if sleep_unless(stop, backoff.next()) {
                    break;
                }
                continue;
            }
        };
        let status = loop {
            if stop.load(Ordering::SeqCst) {
                terminate(spec, &mut child);
                let _ = std::fs::remove_file(&spec.pid_file);
                return;
            }
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    tracing::error!(child = %spec.name, error = %e, "cannot wait for the child");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        if started.elapsed() >= HEALTHY {
            backoff = Backoff::new();
        }
        let delay = backoff.next();
        restarts += 1;
        tracing::warn!(
            child = %spec.name, %status, ran_ms = started.elapsed().as_millis() as u64,
            restart_in_ms = delay.as_millis() as u64, log = %spec.log.display(),
            "exited; restarting"
        );
        if sleep_unless(stop, delay) {
            break;
        }
    }
    let _ = std::fs::remove_file(&spec.pid_file);
}

/// Sleeps `d` in short steps; true if `stop` was set meanwhile.
fn sleep_unless(stop: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
    }
    stop.load(Ordering::SeqCst)
}

fn terminate(spec: &ChildSpec, child: &mut Child) {
    if let Err(e) = crate::io::process::signal(child.id(), libc::SIGTERM) {
        tracing::warn!(child = %spec.name, error = %e, "SIGTERM failed");
    }
    let until = Instant::now() + STOP_GRACE;
    while Instant::now() < until {
        if let Ok(Some(st)) = child.try_wait() {
            tracing::info!(child = %spec.name, %st, "exited after SIGTERM");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(child = %spec.name, "no exit within 5 s of SIGTERM: SIGKILL");
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_seconds() {
        let mut b = Backoff::new();
        let v: Vec<u64> = (0..7).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(v, [200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn supervisor_restarts_a_child_that_exits_and_stops_it() {
        let dir = std::env::temp_dir().join(format!("fabric-up-sup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        std::fs::create_dir_all(dir.join("run")).unwrap();
        // Each run appends a line, then exits at once: the supervisor must start it again.
        let spec = ChildSpec::new(
            "flaky",
            Path::new("/bin/sh"),
            vec!["-c".into(), "echo run; exit 3".into()],
            &dir,
        );
        let log = spec.log.clone();
        let sup = Supervisor::start(spec);
        let t0 = Instant::now();
        while std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
            < 3
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no third start within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sup.stop();
        // A long-running child is stopped with SIGTERM and its pid file removed.
        let spec = ChildSpec::new("long", Path::new("/bin/sleep"), vec!["30".into()], &dir);
        let pid_file = spec.pid_file.clone();
        let sup = Supervisor::start(spec);
        let t0 = Instant::now();
        let pid: u32 = loop {
            if let Some(p) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            assert!(t0.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        };
        let t1 = Instant::now();
        sup.stop();
        assert!(t1.elapsed() < STOP_GRACE, "sleep should exit on SIGTERM");
        assert!(
            crate::io::process::signal(pid, 0).is_err(),
            "child {pid} still there"
        );
        assert!(!pid_file.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
