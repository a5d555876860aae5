//! The tunnel's sub-streams on this host ([`Streams`], the contract's `Handler`): attach
//! (through the container's `shim.sock`), logs (the log reader), exec (`runc exec`) and resize.
//!
//! Attach made while the container is not running waits (up to [`ATTACH_WAIT`]) for the next
//! run's shim and then asks it for everything since that run's start: `docker run` attaches
//! before it starts the container, and must see the first byte.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::exec::{self, ExecSpec};
use super::logs::{LogFollower, LogQuery};
use super::shim::{ShimClient, ShimRequest};
use super::{Phase, Runtime};
use crate::agent::tunnel::{Frames, Handler, Input};
use crate::control::tunnel::proto::{Frame, OpenRequest, StreamOp};

/// How long an attach waits for a container that is not running to start.
pub const ATTACH_WAIT: Duration = Duration::from_secs(60);
/// How often `logs --follow` looks for new output.
pub const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The tunnel handler of this host's containers.
#[derive(Clone)]
pub struct Streams {
    rt: Arc<Runtime>,
}

impl Streams {
    /// Serves the containers of `rt`.
    pub fn new(rt: Arc<Runtime>) -> Streams {
        Streams { rt }
    }

    /// Serves one sub-stream to its end.
    pub async fn serve_one(&self, req: OpenRequest, input: Input, output: Frames) {
        // The control plane opens sub-streams only for VMs it placed on this host; one that
        // is not prepared yet (`docker run` attaches before it starts) is attached to when it
        // starts, and has no logs yet. Exec and resize need it running.
        let waits = matches!(req.op, StreamOp::Attach { .. } | StreamOp::Logs { .. });
        if !super::id_ok(&req.vm) || (!waits && matches!(self.rt.phase(&req.vm), Phase::Absent)) {
            let _ = output
                .send(Frame::Error(format!(
                    "container {} is not running on this host",
                    req.vm
                )))
                .await;
            return;
        }
        let r = match req.op {
            StreamOp::Attach {
                stdin,
                stdout,
                stderr,
                logs,
            } => {
                self.attach(&req.vm, stdin, stdout, stderr, logs, input, &output)
                    .await
            }
            StreamOp::Logs {
                follow,
                tail,
                since_ns,
                until_ns,
                timestamps,
                stdout,
                stderr,
            } => {
                let q = LogQuery {
                    stdout,
                    stderr,
                    since_ns,
                    until_ns,
                    tail,
                };
                self.logs(&req.vm, q, follow, timestamps, &output).await
            }
            StreamOp::Exec {
                cmd,
                env,
                user,
                working_dir,
                tty,
                stdin,
            } => {
                let spec = ExecSpec {
                    cmd,
                    env,
                    user,
                    working_dir,
                    tty,
                    stdin,
                };
                if !self.started(&req.vm).await {
                    Err(format!("container {} is not running", req.vm))
                } else {
                    exec::run(&self.rt, &req.vm, &spec, input, output.clone())
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            }
            StreamOp::Resize { height, width } => ShimClient::new(&self.rt.dir(&req.vm))
                .call(&ShimRequest::Resize { height, width })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        match r {
            Ok(()) => {}
            Err(e) => {
                let _ = output.send(Frame::Error(e)).await;
            }
        }
    }

    /// Whether the container is running with its process started (runc has written its pid),
    /// waiting a little for a run that is starting.
    async fn started(&self, vm: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.rt.phase(vm) {
                Phase::Running { state } if state.pid.is_some() => return true,
                Phase::Running { .. } if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => return false,
            }
        }
    }

    async fn logs(
        &self,
        vm: &str,
        q: LogQuery,
        follow: bool,
        timestamps: bool,
        out: &Frames,
    ) -> Result<(), String> {
        let dir = self.rt.dir(vm);
        let (all, mut fol) =
            LogFollower::open(&dir).map_err(|e| format!("reading the log of {vm}: {e}"))?;
        for r in q.select(all) {
            if send_record(out, &r, timestamps).await.is_err() {
                return Ok(());
            }
        }
        let live = LogQuery { tail: None, ..q };
        if follow {
            loop {
                let running = matches!(self.rt.phase(vm), Phase::Running { .. });
                let more = fol
                    .poll()
                    .map_err(|e| format!("reading the log of {vm}: {e}"))?;
                for r in more.into_iter().filter(|r| live.keeps(r)) {
                    if send_record(out, &r, timestamps).await.is_err() {
                        return Ok(());
                    }
                }
                // Followed until the process has ended (its last output read after that).
                if !running || live.until_ns.is_some_and(|u| super::logs::now_ns() >= u) {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(FOLLOW_POLL) => {}
                    _ = out.closed() => return Ok(()),
                }
            }
        }
        let _ = out.send(Frame::Exit { code: 0 }).await;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn attach(
        &self,
        vm: &str,
        stdin: bool,
        stdout: bool,
        stderr: bool,
        logs: bool,
        mut input: Input,
        out: &Frames,
    ) -> Result<(), String> {
        if logs {
            let q = LogQuery {
                stdout,
                stderr,
                ..Default::default()
            };
            let all = super::logs::read_all(&self.rt.dir(vm))
                .map_err(|e| format!("reading the log of {vm}: {e}"))?;
            for r in q.select(all) {
                if send_record(out, &r, false).await.is_err() {
                    return Ok(());
                }
            }
        }
        // Running now: live output from now on. Not running: wait for the next run and take
        // all of its output.
        let was = self.rt.phase(vm);
        let from_start = !matches!(was, Phase::Running { .. });
        let last_gen = was.generation();
        let deadline = Instant::now() + ATTACH_WAIT;
        let client = ShimClient::new(&self.rt.dir(vm));
        let req = ShimRequest::Attach {
            stdin,
            stdout,
            stderr,
            from_start,
        };
        let mut conn = loop {
            let ph = self.rt.phase(vm);
            let fresh = match &ph {
                Phase::Running { state } => !from_start || Some(state.generation) != last_gen,
                _ => false,
            };
            if fresh {
                if let Ok((_, c)) = client.request(&req).await {
                    break c;
                }
            }
            if let Phase::Exited { state } = &ph {
                if from_start && Some(state.generation) != last_gen {
                    // The run started and ended between two looks (`echo hi`): its output
                    // is in the log, from its start.
                    let since = state.started_ms.map(|ms| ms * 1_000_000);
                    let q = LogQuery {
                        stdout,
                        stderr,
                        since_ns: since,
                        ..Default::default()
                    };
                    let all = super::logs::read_all(&self.rt.dir(vm))
                        .map_err(|e| format!("reading the log of {vm}: {e}"))?;
                    let _ = out.send(Frame::Started { pid: None }).await;
                    for r in q.select(all) {
                        if send_record(out, &r, false).await.is_err() {
                            return Ok(());
                        }
                    }
                    let code = state.exit_status.unwrap_or(-1);
                    let _ = out.send(Frame::Exit { code }).await;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "container {vm} did not start within {ATTACH_WAIT:?}"
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = out.closed() => return Ok(()),
            }
        };
        let _ = out.send(Frame::Started { pid: None }).await;
        let (mut rd, mut wr) = conn.split();
        let to_shim = async {
            let mut b = Vec::new();
            while let Some(f) = input.recv().await {
                b.clear();
                f.encode(&mut b);
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
            // Keep the attach open for output after the client's input ended.
            std::future::pending::<()>().await
        };
        let from_shim = async {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 << 10];
            loop {
                while let Ok(Some((f, n))) = Frame::decode(&buf) {
                    buf.drain(..n);
                    let end = matches!(f, Frame::Exit { .. });
                    if out.send(f).await.is_err() || end {
                        return;
                    }
                }
                match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::select! {
            _ = to_shim => {}
            _ = from_shim => {}
        }
        Ok(())
    }
}

async fn send_record(out: &Frames, r: &super::logs::Record, timestamps: bool) -> Result<(), ()> {
    let data = r.render(timestamps);
    let make = match r.stream {
        super::logs::Stream::Stdout => Frame::Stdout,
        super::logs::Stream::Stderr => Frame::Stderr,
    };
    for f in Frame::chunks(make, &data) {
        out.send(f).await.map_err(|_| ())?;
    }
    Ok(())
}

impl Handler for Streams {
    fn serve(
        &self,
        req: OpenRequest,
        input: Input,
        output: Frames,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let me = self.clone();
        Box::pin(async move { me.serve_one(req, input, output).await })
    }
}
