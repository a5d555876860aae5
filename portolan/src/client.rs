//! Async SVP v1 client: a pool of connections to one server, pipelined requests matched by id,
//! a per-query timeout, and reconnection with a short, jittered backoff (see [`backoff`]:
//! 1, 2, 4 s, then [`BACKOFF_CAP`] = 5 s, each ±25 %).
//!
//! Each pooled connection is driven by its own tasks. A connection counts as up only once the
//! server has answered a PING sent right after `connect` (so a server's first-frame deadline
//! never closes an idle pooled connection, and a server that accepts and closes at once is a
//! failure, not a success). A failed `connect` or PING waits out the backoff and tries again;
//! the backoff grows with consecutive failures and is capped low, so lookups resume within a
//! few seconds of the server's return. A connection that breaks (EOF, I/O error, a reply that
//! fails validation, a query that times out) is closed, every query still waiting on it is sent
//! once more on a connection that is up (every v1 request is idempotent) or fails with
//! [`ClientError::ConnectionLost`], and it reconnects at once, as illumos varpd does, unless it
//! lived less than [`STABLE`]: then the break counts as a failure too (one immediate retry,
//! then the backoff). Queries go round-robin to the connections that are
//! up; when none is up but one is still connecting, a query waits (within its timeout); when all
//! are backing off it fails at once with [`ClientError::Unavailable`].
//!
//! Each connection is a TCP connection, or whatever a [`Connector`] makes of one (fabric's
//! makes it TLS with the host's certificate); the connector runs once per connection attempt,
//! so it can re-read its certificates each time.
//!
//! Replies are validated as the illumos client does: version 1, an ack op, an id that is
//! outstanding on that connection, exact sizes, the CRC; and the reply op must match the request.
//!
//! ```no_run
//! # async fn f() -> Result<(), portolan::client::ClientError> {
//! use portolan::client::{Client, ClientConfig};
//! let client = Client::new(ClientConfig::new("127.0.0.1:1296".parse().unwrap()));
//! if let Some(hit) = client.vl3("10.0.0.1".parse().unwrap(), 12340).await? {
//!     println!("{} at {}:{}", hit.mac, hit.underlay_ip, hit.underlay_port);
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::svp::{
    self, decode_frame, from_wire_ip, to_wire_ip, Decoded, Frame, FrameError, LogId, LogRecord,
    LogReq, Mac, Message, Op, RequestId, Status, Vl2Req, Vl3Req, VL3_TYPE_IP, VL3_TYPE_IPV6,
};

/// First backoff; each further consecutive failure doubles it, up to the cap.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);

/// Default [`ClientConfig::backoff_cap`]: low enough that lookups resume within about 5 s of
/// the server's return, high enough that a dead server sees one attempt per pooled connection
/// every ~5 s from each host.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// A connection that breaks sooner than this after it came up counts as a failure.
pub const STABLE: Duration = Duration::from_secs(1);

/// The wait before reconnect attempt number `failures` (1-based): nominally [`BACKOFF_BASE`]
/// doubled per failure and capped at `cap` (1, 2, 4, 5, 5 … s with the default cap), then
/// scaled by a jitter factor in [0.75, 1.25) taken from `sample` (uniform over `u32`), so hosts
/// that lost the server together do not come back in step.
pub fn backoff(failures: u32, cap: Duration, sample: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let nominal = BACKOFF_BASE.saturating_mul(1 << doublings).min(cap);
    let nanos = u64::try_from(nominal.as_nanos()).unwrap_or(u64::MAX);
    let spread = u64::try_from((u128::from(nanos / 2) * u128::from(sample)) >> 32).unwrap_or(0);
    Duration::from_nanos((nanos - nanos / 4).saturating_add(spread))
}

/// A uniform random `u32` for [`backoff`]'s jitter (mid-range if the OS has no randomness).
fn jitter_sample() -> u32 {
    let mut b = [0u8; 4];
    match getrandom::getrandom(&mut b) {
        Ok(()) => u32::from_ne_bytes(b),
        Err(_) => 1 << 31,
    }
}

/// A byte stream SVP can run over (a TCP stream, a TLS stream over one).
pub trait SvpStream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> SvpStream for T {}

/// A boxed [`SvpStream`], what a [`Connector`] returns.
pub type BoxStream = Box<dyn SvpStream>;

/// The future a [`Connector`] returns.
pub type Connecting = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send>>;

/// Turns each new TCP connection to the server into the stream SVP is spoken over (a TLS
/// handshake, say). Called once per connection attempt, bounded by
/// [`ClientConfig::connect_timeout`]; an error counts as a failed connect (backoff).
pub trait Connector: Send + Sync + fmt::Debug + 'static {
    /// Wraps `tcp`, connected to `server`.
    fn connect(&self, tcp: TcpStream, server: SocketAddr) -> Connecting;
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server.
    pub server: SocketAddr,
    /// Connections in the pool.
    pub connections: usize,
    /// Per-query timeout (from the call to the reply).
    pub timeout: Duration,
    /// Largest reply payload accepted.
    pub max_payload: u32,
    /// Timeout for one `connect` attempt, and again for the server's answer to the PING sent
    /// on the new connection.
    pub connect_timeout: Duration,
    /// Longest wait between reconnect attempts, before jitter (see [`backoff`]).
    pub backoff_cap: Duration,
    /// Makes each connection's stream from its TCP connection; `None` speaks plain SVP.
    pub connector: Option<std::sync::Arc<dyn Connector>>,
}

impl ClientConfig {
    /// Defaults for `server`: 2 connections, 5 s query timeout.
    pub fn new(server: SocketAddr) -> Self {
        ClientConfig {
            server,
            connections: 2,
            timeout: Duration::from_secs(5),
            max_payload: svp::DEFAULT_MAX_PAYLOAD,
            connect_timeout: Duration::from_secs(5),
            backoff_cap: BACKOFF_CAP,
            connector: None,
        }
    }
}

/// What can go wrong with a query.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// No reply within the query timeout.
    #[error("no reply from {server} within {timeout:?}")]
    Timeout {
        /// The server.
        server: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// No connection is up and none is being attempted right now (all backing off).
    #[error("cannot reach SVP server {server}: {reason} (retrying with backoff)")]
    Unavailable {
        /// The server.
        server: SocketAddr,
        /// The last connect error.
        reason: String,
    },
    /// The connection carrying the query broke before its reply.
    #[error("connection to {server} lost before the reply: {reason}")]
    ConnectionLost {
        /// The server.
        server: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The server sent bytes that are not a valid reply.
    #[error("invalid reply from {server}: {reason}")]
    Protocol {
        /// The server.
        server: SocketAddr,
        /// What was wrong.
        reason: String,
    },
    /// The reply's op does not answer the request.
    #[error("{got} in reply to {sent}: expected the matching ack")]
    UnexpectedReply {
        /// Request op.
        sent: Op,
        /// Reply op.
        got: Op,
    },
    /// The server answered with a failure status (FATAL, or a code other than OK/NOTFOUND).
    #[error("server answered {0} (expected OK or NOTFOUND)")]
    Status(Status),
    /// A request that cannot be encoded (too many ids for one LOG_RM).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

/// A found VL2 lookup: where the MAC's host receives VXLAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vl2Reply {
    /// Underlay IP.
    pub underlay_ip: IpAddr,
    /// Underlay port.
    pub underlay_port: u16,
}

/// A found VL3 lookup: the MAC owning the IP and its host's underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vl3Reply {
    /// The MAC.
    pub mac: Mac,
    /// Underlay IP.
    pub underlay_ip: IpAddr,
    /// Underlay port.
    pub underlay_port: u16,
}

/// Connection phase of one pool slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Active,
    Backoff,
}

type Pending = Arc<Mutex<HashMap<[u8; 4], oneshot::Sender<Result<Frame, ClientError>>>>>;

/// A live connection: where to queue frames and who waits for replies.
struct Conn {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    /// Asks the connection to reset (after a query timeout).
    reset: Arc<Notify>,
}

struct SlotState {
    phase: Phase,
    conn: Option<Arc<Conn>>,
    last_error: String,
}

struct Slot {
    state: Mutex<SlotState>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data is a plain map or state record that every update leaves consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    config: ClientConfig,
    slots: Vec<Arc<Slot>>,
    next_slot: AtomicUsize,
    next_id: AtomicU32,
    /// Bumped whenever a slot changes phase.
    changed: watch::Receiver<u64>,
    stop: watch::Sender<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// An SVP client (cheap to clone; clones share the pool). Needs a tokio runtime.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Starts the pool; connections are made in the background by tasks on the current tokio
    /// runtime, and end when the last clone of the client is dropped.
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the connection tasks).
    pub fn new(config: ClientConfig) -> Client {
        let (changed_tx, changed_rx) = watch::channel(0u64);
        let changed_tx = Arc::new(changed_tx);
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots: Vec<Arc<Slot>> = (0..config.connections.max(1))
            .map(|_| {
                Arc::new(Slot {
                    state: Mutex::new(SlotState {
                        phase: Phase::Connecting,
                        conn: None,
                        last_error: "not connected yet".into(),
                    }),
                })
            })
            .collect();
        for slot in &slots {
            tokio::spawn(drive_slot(
                slot.clone(),
                config.clone(),
                changed_tx.clone(),
                stop_rx.clone(),
            ));
        }
        Client {
            inner: Arc::new(Inner {
                config,
                slots,
                next_slot: AtomicUsize::new(0),
                next_id: AtomicU32::new(1),
                changed: changed_rx,
                stop: stop_tx,
            }),
        }
    }

    /// The configured server.
    pub fn server(&self) -> SocketAddr {
        self.inner.config.server
    }

    /// PING → PONG.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.request(Message::Ping).await.map(|_| ())
    }

    /// VL2 lookup: `Ok(None)` on NOTFOUND.
    pub async fn vl2(&self, mac: Mac, vnet_id: u32) -> Result<Option<Vl2Reply>, ClientError> {
        match self
            .request(Message::Vl2Req(Vl2Req { mac, vnet_id }))
            .await?
        {
            Message::Vl2Ack(a) => match a.status {
                Status::OK => Ok(Some(Vl2Reply {
                    underlay_ip: from_wire_ip(a.addr),
                    underlay_port: a.port,
                })),
                Status::NOT_FOUND => Ok(None),
                s => Err(ClientError::Status(s)),
            },
            other => Err(unexpected(Op::Vl2Req, &other)),
        }
    }

    /// VL3 lookup: `Ok(None)` on NOTFOUND.
    pub async fn vl3(&self, ip: IpAddr, vnet_id: u32) -> Result<Option<Vl3Reply>, ClientError> {
        let l3_type = if ip.is_ipv4() {
            VL3_TYPE_IP
        } else {
            VL3_TYPE_IPV6
        };
        let req = Message::Vl3Req(Vl3Req {
            ip: to_wire_ip(ip),
            l3_type,
            vnet_id,
        });
        match self.request(req).await? {
            Message::Vl3Ack(a) => match a.status {
                Status::OK => Ok(Some(Vl3Reply {
                    mac: a.mac,
                    underlay_ip: from_wire_ip(a.addr),
                    underlay_port: a.port,
                })),
                Status::NOT_FOUND => Ok(None),
                s => Err(ClientError::Status(s)),
            },
            other => Err(unexpected(Op::Vl3Req, &other)),
        }
    }

    /// Reads up to `count` bytes of the event log of the host with `underlay_ip`.
    pub async fn log(
        &self,
        underlay_ip: IpAddr,
        count: u32,
    ) -> Result<Vec<LogRecord>, ClientError> {
        let req = Message::LogReq(LogReq {
            count,
            ip: to_wire_ip(underlay_ip),
        });
        match self.request(req).await? {
            Message::LogAck(a) if a.status == Status::OK => Ok(a.records),
            Message::LogAck(a) => Err(ClientError::Status(a.status)),
            other => Err(unexpected(Op::LogReq, &other)),
        }
    }

    /// Deletes log records by id (unknown ids are fine).
    pub async fn log_rm(&self, ids: &[LogId]) -> Result<(), ClientError> {
        let max = (self.inner.config.max_payload as usize).saturating_sub(4) / 16;
        if ids.len() > max {
            return Err(ClientError::InvalidRequest(format!(
                "{} ids in one LOG_RM: expected at most {max}",
                ids.len()
            )));
        }
        match self.request(Message::LogRm(ids.to_vec())).await? {
            Message::LogRmAck(Status::OK) => Ok(()),
            Message::LogRmAck(s) => Err(ClientError::Status(s)),
            other => Err(unexpected(Op::LogRm, &other)),
        }
    }

    /// Sends any request and returns the validated reply message.
    ///
    /// Every SVP v1 request is idempotent (lookups, log reads, LOG_RM of ids), so a query whose
    /// connection breaks before the reply is sent once more, on whichever connection is up,
    /// within the same deadline, as illumos re-queues them.
    pub async fn request(&self, message: Message) -> Result<Message, ClientError> {
        let deadline = Instant::now() + self.inner.config.timeout;
        match self.attempt(message.clone(), deadline).await {
            Err(ClientError::ConnectionLost { .. }) => self.attempt(message, deadline).await,
            r => r,
        }
    }

    async fn attempt(&self, message: Message, deadline: Instant) -> Result<Message, ClientError> {
        let cfg = &self.inner.config;
        let timeout = ClientError::Timeout {
            server: cfg.server,
            timeout: cfg.timeout,
        };
        let conn = self.pick(deadline).await?.ok_or(timeout.clone())?;
        // Ids 1..2^31-1 like illumos, sent big-endian (the server treats them as opaque).
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed) % 0x7fff_ffff + 1;
        let id = RequestId::from_u32(n);
        let sent_op = message.op();
        let (otx, orx) = oneshot::channel();
        lock(&conn.pending).insert(id.0, otx);
        if conn.tx.send(Frame::new(id, message).to_bytes()).is_err() {
            lock(&conn.pending).remove(&id.0);
            return Err(ClientError::ConnectionLost {
                server: cfg.server,
                reason: "connection closed".into(),
            });
        }
        match tokio::time::timeout_at(deadline, orx).await {
            Ok(Ok(Ok(frame))) => {
                let want = match sent_op {
                    Op::Ping => Op::Pong,
                    Op::Vl2Req => Op::Vl2Ack,
                    Op::Vl3Req => Op::Vl3Ack,
                    Op::LogReq => Op::LogAck,
                    Op::LogRm => Op::LogRmAck,
                    other => other,
                };
                if frame.message.op() != want {
                    return Err(ClientError::UnexpectedReply {
                        sent: sent_op,
                        got: frame.message.op(),
                    });
                }
                Ok(frame.message)
            }
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(ClientError::ConnectionLost {
                server: cfg.server,
                reason: "connection closed".into(),
            }),
            Err(_) => {
                lock(&conn.pending).remove(&id.0);
                // A query with no answer in time means a dead or stuck peer: start over.
                conn.reset.notify_one();
                Err(timeout)
            }
        }
    }

    /// A live connection, waiting (until `deadline`) while one is being made. `Ok(None)` means
    /// the deadline passed.
    async fn pick(&self, deadline: Instant) -> Result<Option<Arc<Conn>>, ClientError> {
        let mut changed = self.inner.changed.clone();
        loop {
            changed.borrow_and_update();
            let n = self.inner.slots.len();
            let start = self.inner.next_slot.fetch_add(1, Ordering::Relaxed);
            let mut connecting = false;
            let mut reason = String::new();
            for i in 0..n {
                let st = lock(&self.inner.slots[(start + i) % n].state);
                match (st.phase, &st.conn) {
                    (Phase::Active, Some(c)) => return Ok(Some(c.clone())),
                    (Phase::Connecting, _) => connecting = true,
                    _ => reason.clone_from(&st.last_error),
                }
            }
            if !connecting {
                return Err(ClientError::Unavailable {
                    server: self.inner.config.server,
                    reason,
                });
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(None),
            }
        }
    }
}

fn unexpected(sent: Op, got: &Message) -> ClientError {
    ClientError::UnexpectedReply {
        sent,
        got: got.op(),
    }
}

fn set_phase(slot: &Slot, changed: &watch::Sender<u64>, phase: Phase, conn: Option<Arc<Conn>>) {
    {
        let mut st = lock(&slot.state);
        st.phase = phase;
        st.conn = conn;
    }
    changed.send_modify(|g| *g = g.wrapping_add(1));
}

/// Connect / hello / run / reconnect loop of one pool slot.
async fn drive_slot(
    slot: Arc<Slot>,
    config: ClientConfig,
    changed: Arc<watch::Sender<u64>>,
    mut stop: watch::Receiver<bool>,
) {
    let server = config.server;
    // Consecutive failures: connects or hellos that failed, and connections that broke
    // before they were STABLE.
    let mut failures = 0u32;
    // Set when the next attempt must first wait out the backoff.
    let mut wait = false;
    loop {
        if *stop.borrow() {
            return;
        }
        if wait {
            set_phase(&slot, &changed, Phase::Backoff, None);
            let pause = backoff(failures, config.backoff_cap, jitter_sample());
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.changed() => return,
            }
        }
        set_phase(&slot, &changed, Phase::Connecting, None);
        let attempt = async {
            let sock = match tokio::time::timeout(
                config.connect_timeout,
                TcpStream::connect(server),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(format!("connect failed: {e}")),
                Err(_) => {
                    return Err(format!(
                        "connect timed out after {:?}",
                        config.connect_timeout
                    ))
                }
            };
            let _ = sock.set_nodelay(true);
            let mut sock: BoxStream = match &config.connector {
                None => Box::new(sock),
                Some(c) => {
                    match tokio::time::timeout(config.connect_timeout, c.connect(sock, server))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            return Err(format!("connected, but the handshake failed: {e}"))
                        }
                        Err(_) => {
                            return Err(format!(
                                "connected, but no handshake within {:?}",
                                config.connect_timeout
                            ))
                        }
                    }
                }
            };
            match tokio::time::timeout(config.connect_timeout, hello(&mut sock, &config)).await {
                Ok(Ok(())) => Ok(sock),
                Ok(Err(reason)) => Err(format!("connected, but {reason}")),
                Err(_) => Err(format!(
                    "connected, but no PONG within {:?}",
                    config.connect_timeout
                )),
            }
        };
        let sock = tokio::select! {
            r = attempt => r,
            _ = stop.changed() => return,
        };
        let sock = match sock {
            Ok(s) => s,
            Err(reason) => {
                failures = failures.saturating_add(1);
                wait = true;
                lock(&slot.state).last_error = reason;
                continue;
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            tx,
            pending: Arc::new(Mutex::new(HashMap::new())),
            reset: Arc::new(Notify::new()),
        });
        let up_since = Instant::now();
        set_phase(&slot, &changed, Phase::Active, Some(conn.clone()));
        let reason = tokio::select! {
            r = run_connection(sock, rx, conn.pending.clone(), &config) => r,
            () = conn.reset.notified() => "a query timed out; resetting the connection".to_string(),
            _ = stop.changed() => "client dropped".to_string(),
        };
        // New queries must not pick this connection any more; fail those still waiting.
        set_phase(&slot, &changed, Phase::Connecting, None);
        let waiting: Vec<_> = lock(&conn.pending).drain().map(|(_, tx)| tx).collect();
        for w in waiting {
            let _ = w.send(Err(ClientError::ConnectionLost {
                server,
                reason: reason.clone(),
            }));
        }
        lock(&slot.state).last_error = reason;
        if up_since.elapsed() >= STABLE {
            // It worked for a while: reconnect at once, as varpd does.
            failures = 0;
            wait = false;
        } else {
            // Up and straight down again: one immediate retry, then the backoff.
            wait = failures > 0;
            failures = failures.saturating_add(1);
        }
    }
}

/// The first exchange on a new connection: PING, and a PONG with the same id back. Returns why
/// not, otherwise.
async fn hello(sock: &mut BoxStream, config: &ClientConfig) -> Result<(), String> {
    let id = RequestId::from_u32(0);
    sock.write_all(&Frame::new(id, Message::Ping).to_bytes())
        .await
        .map_err(|e| format!("the PING failed: {e}"))?;
    // A TLS stream may hold the record until flushed (a no-op on TCP).
    sock.flush()
        .await
        .map_err(|e| format!("the PING failed: {e}"))?;
    let mut buf = BytesMut::with_capacity(64);
    loop {
        match decode_frame(&buf, config.max_payload) {
            Ok(Decoded::Complete { frame, len }) => {
                return if frame.message != Message::Pong || frame.id != id {
                    Err(format!(
                        "the server answered PING with {} (id {:?}), expected PONG (id {id:?})",
                        frame.message.op(),
                        frame.id
                    ))
                } else if len != buf.len() {
                    Err("the server sent more than a PONG to a PING".to_string())
                } else {
                    Ok(())
                };
            }
            Ok(Decoded::Incomplete { .. }) => {}
            Err(e) => return Err(format!("the answer to PING was invalid: {e}")),
        }
        match sock.read_buf(&mut buf).await {
            Ok(0) => return Err("the server closed the connection before answering".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read failed before the first answer: {e}")),
        }
    }
}

/// Runs one connection until it breaks; returns why.
async fn run_connection(
    sock: BoxStream,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    pending: Pending,
    config: &ClientConfig,
) -> String {
    let (mut rd, mut wr) = tokio::io::split(sock);
    let writer = async move {
        let mut out = Vec::new();
        while let Some(first) = rx.recv().await {
            out.clear();
            out.extend_from_slice(&first);
            while out.len() < 64 * 1024 {
                match rx.try_recv() {
                    Ok(more) => out.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            let written = async {
                wr.write_all(&out).await?;
                wr.flush().await
            };
            if let Err(e) = written.await {
                return format!("write failed: {e}");
            }
        }
        "client dropped".to_string()
    };
    let reader = async {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            loop {
                match decode_frame(&buf, config.max_payload) {
                    Ok(Decoded::Complete { frame, len }) => {
                        let _ = buf.split_to(len);
                        if !matches!(
                            frame.message.op(),
                            Op::Pong | Op::Vl2Ack | Op::Vl3Ack | Op::LogAck | Op::LogRmAck
                        ) {
                            return format!("server sent {}, expected an ack", frame.message.op());
                        }
                        let Some(waiter) = lock(&pending).remove(&frame.id.0) else {
                            return format!(
                                "reply with id {:?} that no outstanding query has",
                                frame.id
                            );
                        };
                        let _ = waiter.send(Ok(frame));
                    }
                    Ok(Decoded::Incomplete { .. }) => break,
                    Err(e) => return protocol_reason(&e),
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) => return "server closed the connection".to_string(),
                Ok(_) => {}
                Err(e) => return format!("read failed: {e}"),
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}

fn protocol_reason(e: &FrameError) -> String {
    format!("invalid reply: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_table() {
        // Mid-range jitter sample: factor exactly 1.
        let mid = 1u32 << 31;
        let ms: Vec<u128> = (1..=8)
            .map(|f| backoff(f, BACKOFF_CAP, mid).as_millis())
            .collect();
        assert_eq!(ms, vec![1000, 2000, 4000, 5000, 5000, 5000, 5000, 5000]);
        assert_eq!(backoff(0, BACKOFF_CAP, mid), Duration::from_secs(1));
        assert_eq!(backoff(u32::MAX, BACKOFF_CAP, mid), BACKOFF_CAP);
        // Another cap bounds the whole schedule.
        let cap = Duration::from_millis(300);
        assert!((1..=10).all(|f| backoff(f, cap, mid) == cap));
        assert_eq!(
            ClientConfig::new("127.0.0.1:1".parse().unwrap()).backoff_cap,
            BACKOFF_CAP
        );
    }

    #[test]
    fn backoff_jitter_stays_within_a_quarter() {
        for f in [1u32, 2, 3, 4, 9, u32::MAX] {
            let nominal = backoff(f, BACKOFF_CAP, 1 << 31);
            let lo = backoff(f, BACKOFF_CAP, 0);
            let hi = backoff(f, BACKOFF_CAP, u32::MAX);
            assert_eq!(lo, nominal * 3 / 4, "failures {f}");
            assert!(hi < nominal * 5 / 4 && hi > nominal * 5 / 4 - Duration::from_millis(1));
            for s in [1u32, 1 << 20, 0x7fff_ffff, 0xdead_beef] {
                let d = backoff(f, BACKOFF_CAP, s);
                assert!(d >= lo && d <= hi, "failures {f} sample {s}: {d:?}");
            }
        }
        // Real samples spread: 64 draws are not all equal.
        let draws: std::collections::HashSet<_> = (0..64)
            .map(|_| backoff(1, BACKOFF_CAP, jitter_sample()))
            .collect();
        assert!(draws.len() > 1);
        // Never longer than cap + 25 %, so recovery follows the server within ~6.25 s.
        assert!(backoff(u32::MAX, BACKOFF_CAP, u32::MAX) < Duration::from_millis(6250));
    }

    /// A fake server: the first connection answers the client's hello, then is dropped on the
    /// next request; later ones answer PINGs, in reverse order of arrival within each read
    /// (out-of-order replies).
    async fn flaky_server() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let drop_it = std::mem::take(&mut first);
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    let mut hello = true;
                    loop {
                        if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut ids = Vec::new();
                        while let Ok(Decoded::Complete { frame, len }) =
                            decode_frame(&buf, svp::DEFAULT_MAX_PAYLOAD)
                        {
                            let _ = buf.split_to(len);
                            ids.push(frame.id);
                        }
                        if drop_it && !ids.is_empty() && !std::mem::take(&mut hello) {
                            return;
                        }
                        let mut out = Vec::new();
                        for id in ids.into_iter().rev() {
                            Frame::new(id, Message::Pong).encode(&mut out);
                        }
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn lost_connection_is_retried_and_replies_match_by_id() {
        let addr = flaky_server().await;
        let mut cfg = ClientConfig::new(addr);
        cfg.connections = 1;
        let c = Client::new(cfg);
        // The first attempt's connection is dropped; the retry on the new connection succeeds.
        c.ping().await.unwrap();
        let results = futures_join_all((0..50).map(|_| {
            let c = c.clone();
            async move { c.ping().await }
        }))
        .await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }

    async fn futures_join_all<
        F: std::future::Future<Output = R> + Send + 'static,
        R: Send + 'static,
    >(
        futs: impl Iterator<Item = F>,
    ) -> Vec<R> {
        let handles: Vec<_> = futs.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn unreachable_server_is_unavailable_then_backs_off() {
        // Bind then drop a listener to get a port nobody listens on.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut cfg = ClientConfig::new(addr);
        cfg.connections = 1;
        cfg.timeout = Duration::from_millis(500);
        let c = Client::new(cfg);
        // The first query waits for the first attempt, which is refused.
        let e = c.ping().await.unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Unavailable { .. } | ClientError::Timeout { .. }
            ),
            "{e}"
        );
        // Now the slot is backing off: fail at once, naming the connect error.
        let t = Instant::now();
        let e = c.ping().await.unwrap_err();
        assert!(t.elapsed() < Duration::from_millis(100));
        match e {
            ClientError::Unavailable { reason, .. } => {
                assert!(reason.contains("connect"), "{reason}")
            }
            other => panic!("expected Unavailable, got {other}"),
        }
    }
}
