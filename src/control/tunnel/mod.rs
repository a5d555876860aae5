//! The control plane's side of the agents' tunnels (DESIGN "Agents never listen"): work the
//! control plane starts on a host (attach, exec, logs, resize) rides the host agent's own
//! outbound connection. [`proto`] is the wire format.
//!
//! [`Tunnels`] is the registry of this process: one open `GET /servers/:uuid/tunnel` per
//! server (a newer one replaces an older one, whose stream then ends), and the sub-streams
//! asked for but not yet taken by the agent's `POST /servers/:uuid/tunnel/:id`.
//! [`Tunnels::open`] sends the [`OpenRequest`] down the server's tunnel and waits (at most
//! [`OPEN_TIMEOUT`]) for that POST; it then hands the caller a [`Substream`]: two bounded
//! channels of [`Frame`]s. The POST's request body (agent → control) is read only as fast as
//! the caller takes its frames, so a slow reader holds the agent back through HTTP/2 flow
//! control, on that sub-stream only; nothing is buffered without bound.
//!
//! The tunnel lives in one process: with several control-plane instances (PostgreSQL), a
//! Docker request reaches a host only through the instance its agent is connected to.

pub mod body;
pub mod proto;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::body::Bytes;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot};

pub use proto::{Frame, OpenRequest, StreamOp};

/// How long [`Tunnels::open`] waits for the agent to take a sub-stream.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle tunnel carries an empty line (keeps proxies and the agent's read timer
/// content; HTTP/2 pings check the connection itself).
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Frames buffered per direction of a sub-stream (each at most [`proto::MAX_FRAME`] bytes;
/// output frames are as large as one read of the agent's, usually far less).
pub const FRAMES_BUFFERED: usize = 16;
/// Open requests queued per tunnel before [`Tunnels::open`] waits for the agent to read.
pub const OPENS_QUEUED: usize = 64;

/// Why a sub-stream could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    /// The server's agent has no tunnel open to this control-plane instance.
    #[error("host {0} is not connected (its agent has no tunnel open to this control plane)")]
    NotConnected(String),
    /// The agent did not take the sub-stream in time.
    #[error("host {server} did not answer the request to open a {op} stream within {secs} s")]
    Timeout {
        /// The server.
        server: String,
        /// The kind of stream (`attach`, `logs`, `exec`, `resize`).
        op: &'static str,
        /// The time waited.
        secs: u64,
    },
    /// The tunnel closed while the open was in flight (agent restarted, replaced its tunnel,
    /// or the server was removed).
    #[error("the tunnel of host {0} closed while a stream was being opened")]
    Closed(String),
    /// No random id could be made.
    #[error("cannot make a random stream id: {0}")]
    Random(String),
}

/// A sub-stream, as [`Tunnels::open`] hands it to the caller.
#[derive(Debug)]
pub struct Substream {
    /// Frames to the agent (stdin, stdin EOF, resize); dropping it ends the sub-stream.
    pub input: mpsc::Sender<Frame>,
    /// Frames from the agent (output, started, exit, error); ends when the agent ends it.
    pub output: mpsc::Receiver<Frame>,
}

/// Why the agent's POST for a sub-stream is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    /// No open request with that id waits for this server (it timed out, was taken, or is
    /// another server's).
    #[error(
        "no stream {id} is waiting for server {server} (unknown, already taken, or timed out)"
    )]
    Unknown {
        /// The id asked for.
        id: String,
        /// The server asking.
        server: String,
    },
}

struct Registered {
    generation: u64,
    tx: mpsc::Sender<OpenRequest>,
}

struct Pending {
    server: String,
    to_agent: mpsc::Receiver<Frame>,
    from_agent: mpsc::Sender<Frame>,
    taken: oneshot::Sender<()>,
}

#[derive(Default)]
struct Inner {
    servers: HashMap<String, Registered>,
    pending: HashMap<String, Pending>,
    generation: u64,
    /// The service is stopping: no tunnel is kept or taken.
    closed: bool,
}

/// Counters of the tunnels, on `/metrics`.
#[derive(Debug, Default)]
pub struct TunnelCounters {
    /// Tunnels opened by agents (`GET .../tunnel`).
    pub tunnels_opened: AtomicU64,
    /// Tunnels replaced by a newer one of the same server.
    pub tunnels_replaced: AtomicU64,
    /// Sub-streams asked for ([`Tunnels::open`]).
    pub opens: AtomicU64,
    /// Sub-streams the agent took.
    pub accepted: AtomicU64,
    /// Opens that failed: the server was not connected.
    pub not_connected: AtomicU64,
    /// Opens that failed: the agent did not answer in time.
    pub timeouts: AtomicU64,
    /// Opens that failed: the tunnel closed meanwhile.
    pub closed: AtomicU64,
    /// Agent POSTs for an unknown or foreign sub-stream id.
    pub unknown_accepts: AtomicU64,
    /// Sub-streams whose agent → control bytes were not frames (the sub-stream was ended).
    pub bad_frames: AtomicU64,
    /// Sub-streams in progress now.
    pub active: AtomicU64,
}

/// This process's tunnels; see the module docs.
pub struct Tunnels {
    inner: Mutex<Inner>,
    /// Set once by [`Tunnels::close`]: sub-streams in progress end too.
    closing: tokio::sync::watch::Sender<bool>,
    /// Counters.
    pub counters: TunnelCounters,
}

impl Default for Tunnels {
    fn default() -> Tunnels {
        Tunnels {
            inner: Mutex::default(),
            closing: tokio::sync::watch::Sender::new(false),
            counters: TunnelCounters::default(),
        }
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn op_name(op: &StreamOp) -> &'static str {
    match op {
        StreamOp::Attach { .. } => "attach",
        StreamOp::Logs { .. } => "logs",
        StreamOp::Exec { .. } => "exec",
        StreamOp::Resize { .. } => "resize",
    }
}

impl Tunnels {
    /// An empty registry.
    pub fn new() -> Tunnels {
        Tunnels::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `server` has a tunnel open now.
    pub fn is_connected(&self, server: &str) -> bool {
        let key = server.to_ascii_lowercase();
        self.lock()
            .servers
            .get(&key)
            .is_some_and(|r| !r.tx.is_closed())
    }

    /// Registers `server`'s new tunnel (replacing an older one, whose stream ends) and returns
    /// the body of the `GET .../tunnel` answer: the open requests as JSON lines, an empty line
    /// every [`KEEPALIVE`]. The registration ends when that body is dropped (the connection
    /// went away, or the server was revoked).
    pub fn register(self: &Arc<Self>, server: &str) -> Body {
        let key = server.to_ascii_lowercase();
        let (tx, rx) = mpsc::channel(OPENS_QUEUED);
        let generation = {
            let mut inner = self.lock();
            if inner.closed {
                return Body::empty();
            }
            inner.generation += 1;
            let generation = inner.generation;
            let old = inner
                .servers
                .insert(key.clone(), Registered { generation, tx });
            if old.is_some() {
                inc(&self.counters.tunnels_replaced);
            }
            generation
        };
        inc(&self.counters.tunnels_opened);
        tracing::info!(server = %key, "agent tunnel open");
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Body::new(body::OpenRequests {
            rx,
            tick,
            _registration: Registration {
                tunnels: Arc::downgrade(self),
                server: key,
                generation,
            },
        })
    }

    /// Ends every tunnel (their streams end, so the service's connections can close) and
    /// refuses new ones: the service is stopping.
    pub fn close(&self) {
        {
            let mut inner = self.lock();
            inner.closed = true;
            inner.servers.clear();
            inner.pending.clear();
        }
        self.closing.send_replace(true);
    }

    /// Resolves once [`Tunnels::close`] was called.
    fn closed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + Sync>> {
        let mut rx = self.closing.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|c| *c).await;
        })
    }

    /// Asks `server`'s agent to open a sub-stream for `vm` doing `op`, and waits (at most
    /// [`OPEN_TIMEOUT`]) until the agent takes it.
    pub async fn open(
        &self,
        server_uuid: &str,
        vm: &str,
        op: StreamOp,
    ) -> Result<Substream, TunnelError> {
        self.open_within(server_uuid, vm, op, OPEN_TIMEOUT).await
    }

    /// [`Tunnels::open`] with another bound on the wait.
    pub async fn open_within(
        &self,
        server_uuid: &str,
        vm: &str,
        op: StreamOp,
        wait: Duration,
    ) -> Result<Substream, TunnelError> {
        inc(&self.counters.opens);
        let server = server_uuid.to_ascii_lowercase();
        let name = op_name(&op);
        let fail = |e: TunnelError| {
            inc(match &e {
                TunnelError::NotConnected(_) => &self.counters.not_connected,
                TunnelError::Timeout { .. } => &self.counters.timeouts,
                TunnelError::Closed(_) | TunnelError::Random(_) => &self.counters.closed,
            });
            e
        };
        let id = crate::control::params::random_uuid()
            .map_err(|e| fail(TunnelError::Random(e.to_string())))?;
        let (input, to_agent) = mpsc::channel(FRAMES_BUFFERED);
        let (from_agent, output) = mpsc::channel(FRAMES_BUFFERED);
        let (taken_tx, taken_rx) = oneshot::channel();
        let tx = {
            let mut inner = self.lock();
            let Some(r) = inner.servers.get(&server).filter(|r| !r.tx.is_closed()) else {
                return Err(fail(TunnelError::NotConnected(server)));
            };
            let tx = r.tx.clone();
            inner.pending.insert(
                id.clone(),
                Pending {
                    server: server.clone(),
                    to_agent,
                    from_agent,
                    taken: taken_tx,
                },
            );
            tx
        };
        // Whatever happens from here on, a pending entry not taken is removed.
        let _unpend = Unpend {
            tunnels: self,
            id: &id,
        };
        let req = OpenRequest {
            id: id.clone(),
            vm: vm.to_owned(),
            op,
        };
        let waited = tokio::time::timeout(wait, async {
            tx.send(req)
                .await
                .map_err(|_| TunnelError::Closed(server.clone()))?;
            drop(tx);
            taken_rx
                .await
                .map_err(|_| TunnelError::Closed(server.clone()))
        })
        .await;
        match waited {
            Ok(Ok(())) => Ok(Substream { input, output }),
            Ok(Err(e)) => Err(fail(e)),
            Err(_) => Err(fail(TunnelError::Timeout {
                server: server.clone(),
                op: name,
                secs: wait.as_secs().max(1),
            })),
        }
    }

    /// The agent of `server` takes sub-stream `id` (its `POST .../tunnel/:id`, whose request
    /// body is `from_agent_body`): returns the body of the answer, the control → agent frames.
    /// The agent's frames are read in a task of their own, only as fast as the caller of
    /// [`Tunnels::open`] takes them.
    pub fn accept(
        self: &Arc<Self>,
        server: &str,
        id: &str,
        from_agent_body: Body,
    ) -> Result<Body, AcceptError> {
        let server = server.to_ascii_lowercase();
        let p = {
            let mut inner = self.lock();
            match inner.pending.get(id) {
                Some(p) if p.server == server => inner.pending.remove(id),
                _ => None,
            }
        };
        let Some(p) = p else {
            inc(&self.counters.unknown_accepts);
            return Err(AcceptError::Unknown {
                id: id.to_owned(),
                server,
            });
        };
        if p.taken.send(()).is_err() {
            // The opener gave up just now.
            inc(&self.counters.unknown_accepts);
            return Err(AcceptError::Unknown {
                id: id.to_owned(),
                server,
            });
        }
        inc(&self.counters.accepted);
        self.counters.active.fetch_add(1, Ordering::Relaxed);
        let active = Active(self.clone());
        let me = self.clone();
        let from_agent = p.from_agent;
        let closed = self.closed();
        tokio::spawn(async move {
            let _active = active;
            tokio::select! {
                r = pump_frames(from_agent_body, &from_agent) => if let Err(e) = r {
                    inc(&me.counters.bad_frames);
                    tracing::warn!(error = %e, "tunnel sub-stream from an agent ended: not frames");
                    let _ = from_agent.send(Frame::Error(format!("tunnel: {e}"))).await;
                },
                // The service stops: the agent's side is dropped (its stream is reset).
                () = closed => {}
            }
        });
        Ok(Body::new(body::FramesUntil::new(p.to_agent, self.closed())))
    }

    /// Appends the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let c = &self.counters;
        let connected = self
            .lock()
            .servers
            .values()
            .filter(|r| !r.tx.is_closed())
            .count();
        let _ = writeln!(
            out,
            "# HELP fabric_control_tunnels Agents with a tunnel open to this instance.\n\
             # TYPE fabric_control_tunnels gauge\nfabric_control_tunnels {connected}"
        );
        let _ = writeln!(
            out,
            "# HELP fabric_control_tunnel_streams_active Tunnel sub-streams in progress.\n\
             # TYPE fabric_control_tunnel_streams_active gauge\n\
             fabric_control_tunnel_streams_active {}",
            c.active.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP fabric_control_tunnel_events_total Tunnel events by kind.\n\
             # TYPE fabric_control_tunnel_events_total counter"
        );
        for (kind, v) in [
            ("tunnel_opened", &c.tunnels_opened),
            ("tunnel_replaced", &c.tunnels_replaced),
            ("open", &c.opens),
            ("accepted", &c.accepted),
            ("not_connected", &c.not_connected),
            ("timeout", &c.timeouts),
            ("closed", &c.closed),
            ("unknown_accept", &c.unknown_accepts),
            ("bad_frames", &c.bad_frames),
        ] {
            let _ = writeln!(
                out,
                "fabric_control_tunnel_events_total{{kind=\"{kind}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// Reads the agent's request body, decodes frames and hands them on, waiting while the
/// receiver is full (so the body is not read ahead: HTTP/2 flow control holds the agent).
/// Ends when the body ends or the receiver is gone.
async fn pump_frames(mut body: Body, to: &mpsc::Sender<Frame>) -> Result<(), proto::FrameError> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let next = tokio::select! {
            f = body.frame() => f,
            // The caller dropped its side: stop reading (the agent's stream is reset).
            () = to.closed() => return Ok(()),
        };
        let chunk: Bytes = match next {
            None => return Ok(()),
            // The connection broke or the agent reset the stream: the sub-stream ends.
            Some(Err(_)) => return Ok(()),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        buf.extend_from_slice(&chunk);
        let mut at = 0;
        while let Some((f, n)) = Frame::decode(&buf[at..])? {
            at += n;
            if to.send(f).await.is_err() {
                return Ok(());
            }
        }
        buf.drain(..at);
    }
}

/// Counts a sub-stream as active until dropped.
struct Active(Arc<Tunnels>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Unpend<'a> {
    tunnels: &'a Tunnels,
    id: &'a str,
}

impl Drop for Unpend<'_> {
    fn drop(&mut self) {
        self.tunnels.lock().pending.remove(self.id);
    }
}

/// Removes a tunnel's registration when its answer's body is dropped, unless a newer tunnel
/// of the same server replaced it.
pub(crate) struct Registration {
    tunnels: std::sync::Weak<Tunnels>,
    server: String,
    generation: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(t) = self.tunnels.upgrade() else {
            return;
        };
        let mut inner = t.lock();
        if inner
            .servers
            .get(&self.server)
            .is_some_and(|r| r.generation == self.generation)
        {
            inner.servers.remove(&self.server);
            // Opens waiting for this server's agent fail now rather than at their timeout.
            let server = self.server.clone();
            inner.pending.retain(|_, p| p.server != server);
            tracing::info!(server = %self.server, "agent tunnel closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs() -> StreamOp {
        StreamOp::Logs {
            follow: false,
            tail: None,
            since_ns: None,
            until_ns: None,
            timestamps: false,
            stdout: true,
            stderr: true,
        }
    }

    async fn line(b: &mut Body) -> String {
        loop {
            let f = b.frame().await.unwrap().unwrap();
            let d = f.into_data().unwrap();
            let s = String::from_utf8(d.to_vec()).unwrap();
            if s != "\n" {
                return s;
            }
        }
    }

    #[tokio::test]
    async fn open_waits_for_the_agent_and_pipes_both_ways() {
        let t = Arc::new(Tunnels::new());
        assert_eq!(
            t.open("S", "v", logs()).await.unwrap_err(),
            TunnelError::NotConnected("s".into())
        );
        let mut tunnel = t.register("S");
        assert!(t.is_connected("s"));
        let t2 = t.clone();
        let opener = tokio::spawn(async move { t2.open("s", "v", logs()).await });
        let l = line(&mut tunnel).await;
        let req: OpenRequest = serde_json::from_str(l.trim_end()).unwrap();
        assert_eq!((req.vm.as_str(), req.op.clone()), ("v", logs()));
        // Another server cannot take it, nor an unknown id.
        assert!(t.accept("other", &req.id, Body::empty()).is_err());
        assert!(t.accept("s", "nope", Body::empty()).is_err());
        let mut out = Vec::new();
        Frame::Stdout(b"hello".to_vec()).encode(&mut out);
        Frame::Exit { code: 3 }.encode(&mut out);
        // Split mid-frame: the reader reassembles.
        let (a, b) = out.split_at(3);
        let (btx, brx) = mpsc::channel(2);
        btx.send(Bytes::copy_from_slice(a)).await.unwrap();
        btx.send(Bytes::copy_from_slice(b)).await.unwrap();
        drop(btx);
        let mut resp = t
            .accept("s", &req.id, Body::new(body::ChannelBody::new(brx)))
            .unwrap();
        let mut sub = opener.await.unwrap().unwrap();
        assert_eq!(
            sub.output.recv().await,
            Some(Frame::Stdout(b"hello".to_vec()))
        );
        assert_eq!(sub.output.recv().await, Some(Frame::Exit { code: 3 }));
        assert_eq!(sub.output.recv().await, None);
        sub.input.send(Frame::StdinEof).await.unwrap();
        let d = resp.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(Frame::decode(&d).unwrap(), Some((Frame::StdinEof, 5)));
        drop(sub);
        assert!(
            resp.frame().await.is_none(),
            "dropping the substream ends the answer"
        );
        // Taken once only.
        assert!(t.accept("s", &req.id, Body::empty()).is_err());
    }

    #[tokio::test]
    async fn an_unanswered_open_times_out_and_a_dropped_tunnel_fails_opens() {
        let t = Arc::new(Tunnels::new());
        let tunnel = t.register("s");
        let e = t
            .open_within("s", "v", logs(), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, TunnelError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("did not answer"), "{e}");
        assert!(
            t.lock().pending.is_empty(),
            "a timed-out open leaves nothing behind"
        );
        let t2 = t.clone();
        let opener = tokio::spawn(async move { t2.open("s", "v", logs()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(tunnel);
        let e = opener.await.unwrap().unwrap_err();
        assert_eq!(e, TunnelError::Closed("s".into()));
        assert!(!t.is_connected("s"));
        assert_eq!(t.counters.timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(t.counters.closed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_second_tunnel_replaces_the_first() {
        let t = Arc::new(Tunnels::new());
        let mut first = t.register("s");
        let _second = t.register("s");
        assert!(
            first.frame().await.is_none(),
            "the replaced tunnel's stream ends"
        );
        drop(first);
        assert!(
            t.is_connected("s"),
            "dropping the old one keeps the new one"
        );
        let mut text = String::new();
        t.render(&mut text);
        assert!(text.contains("fabric_control_tunnels 1"), "{text}");
        assert!(
            text.contains("fabric_control_tunnel_events_total{kind=\"tunnel_replaced\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn bad_agent_bytes_end_the_substream_with_an_error() {
        let t = Arc::new(Tunnels::new());
        let mut tunnel = t.register("s");
        let t2 = t.clone();
        let opener = tokio::spawn(async move { t2.open("s", "v", logs()).await });
        let req: OpenRequest = serde_json::from_str(line(&mut tunnel).await.trim_end()).unwrap();
        let _resp = t
            .accept("s", &req.id, Body::from(vec![9u8, 0, 0, 0, 0]))
            .unwrap();
        let mut sub = opener.await.unwrap().unwrap();
        match sub.output.recv().await {
            Some(Frame::Error(m)) => assert!(m.contains("unknown tunnel frame kind 9"), "{m}"),
            f => panic!("{f:?}"),
        }
        assert_eq!(sub.output.recv().await, None);
        assert_eq!(t.counters.bad_frames.load(Ordering::Relaxed), 1);
    }
}
