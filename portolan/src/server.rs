//! The SVP v1 server (tokio).
//!
//! One task reads each connection and one writes it. The reader decodes every complete frame in
//! what it has buffered: PING is answered at once, VL2/VL3 lookups from one read are batched into
//! a single store call, LOG_REQ and LOG_RM each get their own store call. Store calls run on
//! tokio's blocking pool, at most [`ServerConfig::store_workers`] at a time, so a slow LOG_REQ
//! does not hold up the lookups behind it: replies go out in completion order (SVP clients match
//! them by id). The writer coalesces whatever replies are ready into one `write`; a frame is never
//! split between two writes by us.
//!
//! Bad input (bad version, unknown or unsupported op, wrong or oversized size field, bad CRC, a
//! reply op sent to the server, a frame cut short by EOF) is counted and closes that connection
//! only, after the replies to the valid requests before it are written. Other limits: a cap on
//! open connections (excess ones are closed at once and counted), an idle timeout, and a cap on
//! requests in flight per connection (the reader stops reading until replies drain).
//!
//! # Who is served
//! An [`Access`] policy decides: when a connection is accepted (its address, and the identity
//! its [`Acceptor`] established), again after every read before the requests in it are decoded
//! (a host removed meanwhile gets no more answers and its connection is closed, as soon as
//! [`Access::closed`] resolves or at its next request), and for the log: LOG_REQ only for the
//! underlay IP the policy says is the asker's own, LOG_RM only of ids in that host's log
//! ([`LogScope`]). The default, [`AllowAll`], serves everyone as a standalone Portolan always
//! has. Every refusal is counted in [`Stats`].
//!
//! # Listeners
//! [`Server::bind`] serves plain SVP over TCP. [`Server::bind_with`] takes an [`Acceptor`] that
//! turns each accepted TCP stream into any `AsyncRead + AsyncWrite` stream and an [`Identity`]
//! (fabric's is TLS with host certificates; this crate knows nothing of TLS). The handshake
//! runs in the connection's task, bounded by [`ServerConfig::frame_timeout`].
//!
//! [`Server::run`] returns when its shutdown future resolves: it stops accepting, lets each
//! connection finish the requests it has read, and waits up to [`ServerConfig::shutdown_grace`].

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::store::{Found, Lookup, Store};
use crate::svp::{
    self, decode_frame, from_wire_ip, to_wire_ip, Decoded, Frame, FrameError, LogAck, Mac, Message,
    RequestId, Status, Vl2Ack, Vl3Ack,
};

/// Who is on the other end of an SVP connection, as its [`Acceptor`] established it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// Plain SVP: only the source address is known (IPv4-mapped addresses as IPv4).
    Address(IpAddr),
    /// The acceptor authenticated the peer under this name (fabric: the server UUID of a host
    /// certificate).
    Named(String),
}

/// Which host's log a session may read (LOG_REQ) and trim (LOG_RM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogScope {
    /// Any log (a standalone Portolan: the request's underlay IP says whose).
    Any,
    /// Only the log of the host with this underlay IP: LOG_REQ must name it, LOG_RM removes
    /// only ids in its log.
    Own(IpAddr),
    /// No log at all (LOG_REQ and LOG_RM are answered FATAL).
    Nothing,
}

/// A future that ends a session when it resolves (see [`Access::closed`]).
pub type Closed = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The server's access policy (see the module docs). Calls must be cheap and must not block:
/// [`allowed`](Access::allowed) runs once per read on every connection.
pub trait Access: Send + Sync + 'static {
    /// Whether `who`, connected from `peer`, may be served now. Asked when the connection is
    /// accepted (false: closed at once) and after every read (false: closed, nothing answered).
    fn allowed(&self, peer: SocketAddr, who: &Identity) -> bool;

    /// Whose log `who` may read and trim.
    fn log_scope(&self, peer: SocketAddr, who: &Identity) -> LogScope;

    /// Resolves when `who`'s session must end at once (revocation), even if it is idle. The
    /// default never resolves: [`allowed`](Access::allowed) is then checked at the next read.
    fn closed(&self, who: &Identity) -> Closed {
        let _ = who;
        Box::pin(std::future::pending())
    }
}

/// The default policy: everyone is served, every log readable (Portolan standalone, as
/// Triton's: restricting who reaches it is left to the network).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Access for AllowAll {
    fn allowed(&self, _peer: SocketAddr, _who: &Identity) -> bool {
        true
    }

    fn log_scope(&self, _peer: SocketAddr, _who: &Identity) -> LogScope {
        LogScope::Any
    }
}

/// Turns an accepted TCP connection into the stream SVP is spoken over, and says who is on
/// the other end (see the module docs).
pub trait Acceptor: Send + Sync + 'static {
    /// The stream SVP runs over.
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    /// The handshake (none for plain TCP). An error closes the connection (counted in
    /// [`Stats::handshake_failed`]).
    fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = io::Result<(Self::Io, Identity)>> + Send;
}

/// Plain SVP over TCP: the identity is the source address.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainTcp;

impl Acceptor for PlainTcp {
    type Io = TcpStream;

    async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> io::Result<(TcpStream, Identity)> {
        Ok((tcp, Identity::Address(peer.ip().to_canonical())))
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (default 127.0.0.1:1296, the SVP port).
    pub listen: SocketAddr,
    /// Open connections allowed; more are accepted and closed at once.
    pub max_connections: usize,
    /// A connection with nothing in flight that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Largest accepted frame payload.
    pub max_payload: u32,
    /// Store calls running at once (blocking threads).
    pub store_workers: usize,
    /// Requests in flight per connection before the reader pauses.
    pub max_in_flight: usize,
    /// How long shutdown waits for connections to finish.
    pub shutdown_grace: Duration,
    /// Once the first byte of a frame has arrived, the whole frame must arrive within this; a
    /// new connection must also send its first complete frame within this. A partial frame
    /// does not count as activity for [`idle_timeout`](Self::idle_timeout).
    pub frame_timeout: Duration,
    /// Open connections allowed from one peer (one IPv4 address, or one IPv6 /64); more are
    /// accepted and closed at once.
    pub max_connections_per_peer: usize,
    /// The last this many connection slots (at most a quarter of
    /// [`max_connections`](Self::max_connections)) go only to peers holding fewer than
    /// [`reserve_peer_below`](Self::reserve_peer_below) connections, so a new host or CLI still
    /// gets in while heavy peers fill the server.
    pub reserved_connections: usize,
    /// See [`reserved_connections`](Self::reserved_connections): the client's default pool size.
    pub reserve_peer_below: usize,
    /// Bytes of partial frames buffered across all connections; a connection whose partial
    /// frame would take the total above this is closed.
    pub max_buffered_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1296)),
            max_connections: 4096,
            idle_timeout: Duration::from_secs(300),
            max_payload: svp::DEFAULT_MAX_PAYLOAD,
            store_workers: 8,
            max_in_flight: 1024,
            shutdown_grace: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
            max_connections_per_peer: 64,
            reserved_connections: 256,
            reserve_peer_below: 2,
            max_buffered_bytes: 64 << 20,
        }
    }
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Server counters. Every way a request or a connection can fail has one.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        impl Stats {
            /// Every counter with its name, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$( (stringify!($name), self.$name.load(Ordering::Relaxed)), )*]
            }
        }
    };
}

counters! {
    /// Connections accepted (including those closed at once for the cap).
    connections_accepted,
    /// Connections refused because `max_connections` were open.
    connections_rejected,
    /// Connections open now.
    connections_open,
    /// Connections refused because their peer already had `max_connections_per_peer` open.
    connections_rejected_peer,
    /// Connections refused because only reserved slots were left and their peer already held
    /// `reserve_peer_below` connections.
    connections_rejected_reserve,
    /// Connections closed for being idle.
    connections_idle_closed,
    /// Connections closed because a frame (or a new connection's first frame) did not arrive
    /// whole within `frame_timeout`.
    frame_timeouts,
    /// Connections closed because their partial frame would take the bytes buffered across all
    /// connections above `max_buffered_bytes`.
    buffer_limit_closed,
    /// Bytes of partial frames buffered now, across all connections.
    buffered_bytes,
    /// PING requests.
    ping_requests,
    /// VL2_REQ requests.
    vl2_requests,
    /// VL2 lookups answered NOTFOUND.
    vl2_not_found,
    /// VL3_REQ requests.
    vl3_requests,
    /// VL3 lookups answered NOTFOUND.
    vl3_not_found,
    /// LOG_REQ requests.
    log_requests,
    /// Log records sent.
    log_records_sent,
    /// LOG_RM requests.
    log_rm_requests,
    /// Log records deleted by LOG_RM.
    log_records_removed,
    /// Replies answered FATAL because the store failed.
    store_errors,
    /// Reply frames written.
    replies,
    /// Connections closed for a frame with a bad CRC.
    bad_crc,
    /// Connections closed for a version other than 1.
    bad_version,
    /// Connections closed for an op SVP does not define.
    unknown_op,
    /// Connections closed for BULK, SHOOTDOWN or ROUTE requests.
    unsupported_op,
    /// Connections closed for a reply op (PONG, *_ACK) sent to the server.
    unexpected_op,
    /// Connections closed for a size field wrong for the op, or a malformed payload.
    bad_size,
    /// Connections closed for a size field above the cap.
    oversized,
    /// Connections that ended in the middle of a frame.
    runt,
    /// Connections closed after a read or write error.
    io_errors,
    /// Connections closed because the peer did not read its replies within the idle timeout.
    write_timeouts,
    /// Connections whose acceptor handshake (TLS) failed or did not finish within the frame
    /// timeout.
    handshake_failed,
    /// Connections refused by the access policy when accepted (not a member).
    access_refused,
    /// Sessions closed because the access policy stopped allowing them (revoked, removed).
    access_revoked,
    /// LOG_REQ and LOG_RM refused for naming a log that is not the asker's own.
    log_refused,
}

impl Stats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn count_frame_error(&self, e: &FrameError) {
        Stats::inc(match e {
            FrameError::BadCrc { .. } => &self.bad_crc,
            FrameError::BadVersion { .. } => &self.bad_version,
            FrameError::UnknownOp(_) => &self.unknown_op,
            FrameError::Unsupported(_) => &self.unsupported_op,
            FrameError::Oversized { .. } => &self.oversized,
            FrameError::BadSize { .. }
            | FrameError::BadLogRmCount { .. }
            | FrameError::ShortLogAck { .. }
            | FrameError::BadLogRecordType { .. }
            | FrameError::TruncatedLogRecord { .. } => &self.bad_size,
        });
    }

    /// The counters in Prometheus text format.
    pub fn prometheus(&self) -> String {
        let mut s = String::new();
        for (name, v) in self.snapshot() {
            let kind = if matches!(name, "connections_open" | "buffered_bytes") {
                "gauge"
            } else {
                "counter"
            };
            s.push_str(&format!(
                "# TYPE portolan_{name} {kind}\nportolan_{name} {v}\n"
            ));
        }
        s
    }
}

/// A bound server, ready to [`run`](Server::run); `A` makes each connection's stream.
pub struct Server<A: Acceptor = PlainTcp> {
    listener: TcpListener,
    config: ServerConfig,
    store: Arc<dyn Store>,
    stats: Arc<Stats>,
    access: Arc<dyn Access>,
    acceptor: Arc<A>,
}

struct Shared {
    store: Arc<dyn Store>,
    stats: Arc<Stats>,
    workers: Semaphore,
    admission: Mutex<Admission>,
    config: ServerConfig,
    access: Arc<dyn Access>,
}

/// Open connections, in total and per peer (see [`peer_key`]).
#[derive(Default)]
struct Admission {
    open: usize,
    peers: HashMap<IpAddr, usize>,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `max_connections` are open.
    Full,
    /// The peer has `max_connections_per_peer` open.
    PeerCap,
    /// Only reserved slots are left and the peer holds `reserve_peer_below` or more.
    Reserve,
}

/// One admitted connection's place in [`Admission`]; given back on drop.
struct Admitted {
    shared: Arc<Shared>,
    key: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut a = lock(&self.shared.admission);
        a.open = a.open.saturating_sub(1);
        if let Some(n) = a.peers.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                a.peers.remove(&self.key);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain counters that every update leaves consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the per-peer cap counts by: an IPv4 address (IPv4-mapped IPv6 included), or an IPv6
/// /64, which one host or one customer usually holds whole.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

impl Shared {
    /// Admits a connection from `peer`, or says why not: the global cap, then the per-peer
    /// cap, then the reserve (the last slots go only to peers holding few connections).
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refusal> {
        let cfg = &self.config;
        let key = peer_key(peer);
        let mut a = lock(&self.admission);
        let held = a.peers.get(&key).copied().unwrap_or(0);
        let reserve = cfg.reserved_connections.min(cfg.max_connections / 4);
        if a.open >= cfg.max_connections {
            return Err(Refusal::Full);
        }
        if held >= cfg.max_connections_per_peer {
            return Err(Refusal::PeerCap);
        }
        if a.open >= cfg.max_connections - reserve && held >= cfg.reserve_peer_below {
            return Err(Refusal::Reserve);
        }
        a.open += 1;
        *a.peers.entry(key).or_insert(0) += 1;
        Ok(Admitted {
            shared: self.clone(),
            key,
        })
    }
}

/// This connection's share of [`Stats::buffered_bytes`], bounded by
/// [`ServerConfig::max_buffered_bytes`] across all connections; given back on drop.
struct Buffered<'a> {
    stats: &'a Stats,
    max: u64,
    held: u64,
}

impl Buffered<'_> {
    /// Sets this connection's share to `n` bytes; false (and unchanged) if that would take the
    /// total above the bound.
    fn set(&mut self, n: usize) -> bool {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        let total = &self.stats.buffered_bytes;
        if n > self.held {
            let add = n - self.held;
            let max = self.max;
            if total
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                    cur.checked_add(add).filter(|t| *t <= max)
                })
                .is_err()
            {
                return false;
            }
        } else {
            total.fetch_sub(self.held - n, Ordering::Relaxed);
        }
        self.held = n;
        true
    }
}

impl Drop for Buffered<'_> {
    fn drop(&mut self) {
        self.stats
            .buffered_bytes
            .fetch_sub(self.held, Ordering::Relaxed);
    }
}

impl Server<PlainTcp> {
    /// Binds the listening socket for plain SVP; everyone is served until
    /// [`with_access`](Server::with_access) says otherwise.
    pub async fn bind(config: ServerConfig, store: Arc<dyn Store>) -> io::Result<Server> {
        Server::bind_with(config, store, PlainTcp).await
    }
}

impl<A: Acceptor> Server<A> {
    /// Binds the listening socket; `acceptor` makes each connection's stream (TLS, say).
    pub async fn bind_with(
        config: ServerConfig,
        store: Arc<dyn Store>,
        acceptor: A,
    ) -> io::Result<Server<A>> {
        let listener = TcpListener::bind(config.listen).await?;
        Ok(Server {
            listener,
            config,
            store,
            stats: Arc::new(Stats::default()),
            access: Arc::new(AllowAll),
            acceptor: Arc::new(acceptor),
        })
    }

    /// Serves only whom `access` allows (the default is [`AllowAll`]).
    #[must_use]
    pub fn with_access(mut self, access: Arc<dyn Access>) -> Self {
        self.access = access;
        self
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Serves until `shutdown` resolves, then drains connections (see the module docs).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let shared = Arc::new(Shared {
            store: self.store,
            stats: self.stats,
            workers: Semaphore::new(self.config.store_workers.max(1)),
            admission: Mutex::new(Admission::default()),
            config: self.config.clone(),
            access: self.access,
        });
        let acceptor = self.acceptor;
        info!(
            addr = %self.listener.local_addr()?,
            store = %shared.store.describe(),
            "portolan listening"
        );
        tokio::pin!(shutdown);
        let mut accept_errors = 0u32;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = self.listener.accept() => {
                    let (sock, peer) = match accepted {
                        Ok(a) => { accept_errors = 0; a }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            accept_errors = accept_errors.saturating_add(1);
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(10u64 << accept_errors.min(6))).await;
                            continue;
                        }
                    };
                    let stats = &shared.stats;
                    Stats::inc(&stats.connections_accepted);
                    let permit = match shared.admit(peer.ip()) {
                        Ok(p) => p,
                        Err(why) => {
                            Stats::inc(match why {
                                Refusal::Full => &stats.connections_rejected,
                                Refusal::PeerCap => &stats.connections_rejected_peer,
                                Refusal::Reserve => &stats.connections_rejected_reserve,
                            });
                            debug!(%peer, ?why, "connection refused; closing");
                            drop(sock);
                            continue;
                        }
                    };
                    let shared = shared.clone();
                    let acceptor = acceptor.clone();
                    let stop = stop_rx.clone();
                    tasks.spawn(async move {
                        Stats::inc(&shared.stats.connections_open);
                        let _ = sock.set_nodelay(true);
                        let handshake = tokio::time::timeout(
                            shared.config.frame_timeout,
                            acceptor.accept(sock, peer),
                        );
                        match handshake.await {
                            Ok(Ok((io, who))) => {
                                serve_connection(io, peer, who, shared.clone(), stop).await;
                            }
                            Ok(Err(e)) => {
                                Stats::inc(&shared.stats.handshake_failed);
                                debug!(%peer, error = %e, "handshake failed; closing");
                            }
                            Err(_) => {
                                Stats::inc(&shared.stats.handshake_failed);
                                debug!(%peer, "no handshake within the frame timeout; closing");
                            }
                        }
                        shared.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
                        drop(permit);
                    });
                }
            }
        }
        info!(
            connections = tasks.len(),
            "shutting down: draining connections"
        );
        let _ = stop_tx.send(true);
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.config.shutdown_grace, drain)
            .await
            .is_err()
        {
            warn!("connections still open after the grace period; closing them");
            tasks.abort_all();
        }
        Ok(())
    }
}

/// Initial (and usual) size of a connection's read buffer.
const READ_BUF: usize = 16 * 1024;

/// How a connection's reader ended.
enum End {
    /// Peer closed cleanly between frames, or shutdown.
    Clean,
    /// Closed by us for bad input or a limit.
    Closed,
}

/// Who a connection's requests come from, and how to ask the policy about them.
struct Session {
    peer: SocketAddr,
    who: Identity,
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    io: S,
    peer: SocketAddr,
    who: Identity,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    if !shared.access.allowed(peer, &who) {
        Stats::inc(&shared.stats.access_refused);
        debug!(%peer, ?who, "not allowed by the access policy; closing");
        return;
    }
    let session = Session { peer, who };
    let (rd, wr) = tokio::io::split(io);
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(write_replies(
        wr,
        rx,
        shared.stats.clone(),
        shared.config.idle_timeout,
    ));
    let in_flight = Arc::new(Semaphore::new(shared.config.max_in_flight.max(1)));
    let end = read_requests(rd, &session, &shared, tx, in_flight, stop).await;
    // The reader dropped its sender; the writer ends when the last in-flight reply is written.
    let _ = writer.await;
    if let End::Closed = end {
        debug!(%peer, "connection closed by server");
    }
}

/// Encoded reply frames, with the in-flight permits they hold until written: a peer that
/// stops reading stops the reader too (bounded memory), instead of queueing replies forever.
type Reply = (Vec<u8>, OwnedSemaphorePermit);

async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    stats: Arc<Stats>,
    write_timeout: Duration,
) {
    let mut out = Vec::new();
    let mut permits = Vec::new();
    while let Some((first, permit)) = rx.recv().await {
        out.clear();
        out.extend_from_slice(&first);
        permits.push(permit);
        // Coalesce replies that are already waiting: fewer syscalls, frames stay whole.
        while out.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok((more, permit)) => {
                    out.extend_from_slice(&more);
                    permits.push(permit);
                }
                Err(_) => break,
            }
        }
        match tokio::time::timeout(write_timeout, async {
            wr.write_all(&out).await?;
            wr.flush().await
        })
        .await
        {
            Ok(Ok(())) => permits.clear(),
            Ok(Err(e)) => {
                debug!(error = %e, "write failed");
                Stats::inc(&stats.io_errors);
                break;
            }
            Err(_) => {
                debug!("peer has not read its replies for {write_timeout:?}; closing");
                Stats::inc(&stats.write_timeouts);
                break;
            }
        }
    }
    // Dropping the receiver makes the reader's next send fail, which ends it.
    drop(rx);
    let _ = wr.shutdown().await;
}

async fn read_requests<R: AsyncRead + Unpin>(
    mut rd: R,
    session: &Session,
    shared: &Arc<Shared>,
    tx: mpsc::UnboundedSender<Reply>,
    in_flight: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) -> End {
    let stats = &shared.stats;
    let peer = session.peer;
    let access = &*shared.access;
    let mut revoked = access.closed(&session.who);
    let max_payload = shared.config.max_payload;
    let cap = shared.config.max_in_flight.max(1);
    let idle = shared.config.idle_timeout;
    let frame_timeout = shared.config.frame_timeout;
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut buffered = Buffered {
        stats,
        max: u64::try_from(shared.config.max_buffered_bytes).unwrap_or(u64::MAX),
        held: 0,
    };
    let mut batch: Vec<(RequestId, Lookup)> = Vec::new();
    // A new connection owes its first whole frame within the frame timeout; after that, a
    // frame's deadline starts with its first byte. Only whole frames count as activity.
    let mut frame_deadline = Some(Instant::now() + frame_timeout);
    let mut last_active = Instant::now();
    loop {
        // Decode everything complete in the buffer.
        let mut immediate = Vec::new();
        let mut immediate_count = 0u32;
        let mut failed = None;
        let mut completed = false;
        loop {
            match decode_frame(&buf, max_payload) {
                Ok(Decoded::Complete { frame, len }) => {
                    let _ = buf.split_to(len);
                    completed = true;
                    match frame.message {
                        Message::Ping => {
                            Stats::inc(&stats.ping_requests);
                            Frame::new(frame.id, Message::Pong).encode(&mut immediate);
                            immediate_count += 1;
                            Stats::inc(&stats.replies);
                        }
                        Message::Vl2Req(r) => {
                            Stats::inc(&stats.vl2_requests);
                            batch.push((
                                frame.id,
                                Lookup::Vl2 {
                                    vnet_id: r.vnet_id,
                                    mac: r.mac,
                                },
                            ));
                        }
                        Message::Vl3Req(r) => {
                            Stats::inc(&stats.vl3_requests);
                            batch.push((
                                frame.id,
                                Lookup::Vl3 {
                                    vnet_id: r.vnet_id,
                                    ip: from_wire_ip(r.ip),
                                },
                            ));
                        }
                        Message::LogReq(r) => {
                            Stats::inc(&stats.log_requests);
                            let Some(permit) = acquire(&in_flight, 1, cap).await else {
                                return End::Closed;
                            };
                            let asked = from_wire_ip(r.ip).to_canonical();
                            let scope = access.log_scope(peer, &session.who);
                            let own = match scope {
                                LogScope::Any => true,
                                LogScope::Own(ip) => ip.to_canonical() == asked,
                                LogScope::Nothing => false,
                            };
                            if own {
                                spawn_store_job(shared, tx.clone(), permit, move |s, st| {
                                    log_reply(s, st, frame.id, r.count, asked)
                                });
                            } else {
                                Stats::inc(&stats.log_refused);
                                debug!(%peer, ?scope, %asked, "LOG_REQ for another host's log; refused");
                                if tx.send((log_refusal(stats, frame.id), permit)).is_err() {
                                    return End::Closed;
                                }
                            }
                        }
                        Message::LogRm(ids) => {
                            Stats::inc(&stats.log_rm_requests);
                            let Some(permit) = acquire(&in_flight, 1, cap).await else {
                                return End::Closed;
                            };
                            let scope = access.log_scope(peer, &session.who);
                            if scope == LogScope::Nothing {
                                Stats::inc(&stats.log_refused);
                                debug!(%peer, "LOG_RM from a session with no log; refused");
                                Stats::inc(&stats.replies);
                                let nack = Frame::new(frame.id, Message::LogRmAck(Status::FATAL));
                                if tx.send((nack.to_bytes(), permit)).is_err() {
                                    return End::Closed;
                                }
                            } else {
                                spawn_store_job(shared, tx.clone(), permit, move |s, st| {
                                    log_rm_reply(s, st, frame.id, scope, &ids)
                                });
                            }
                        }
                        Message::Pong
                        | Message::Vl2Ack(_)
                        | Message::Vl3Ack(_)
                        | Message::LogAck(_)
                        | Message::LogRmAck(_) => {
                            Stats::inc(&stats.unexpected_op);
                            debug!(%peer, op = %frame.message.op(), "reply op sent to server; closing");
                            failed = Some(());
                            break;
                        }
                    }
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(e) => {
                    stats.count_frame_error(&e);
                    debug!(%peer, error = %e, "bad frame; closing connection");
                    failed = Some(());
                    break;
                }
            }
        }
        if !immediate.is_empty() {
            let Some(permit) = acquire(&in_flight, immediate_count, cap).await else {
                return End::Closed;
            };
            if tx.send((immediate, permit)).is_err() {
                return End::Closed;
            }
        }
        if !batch.is_empty() {
            let n = u32::try_from(batch.len()).unwrap_or(u32::MAX);
            let Some(permit) = acquire(&in_flight, n, cap).await else {
                return End::Closed;
            };
            let lookups = std::mem::take(&mut batch);
            spawn_store_job(shared, tx.clone(), permit, move |s, st| {
                lookup_replies(s, st, &lookups)
            });
        }
        if failed.is_some() {
            return End::Closed;
        }
        if *stop.borrow() {
            return End::Clean;
        }
        let now = Instant::now();
        if completed {
            last_active = now;
            frame_deadline = None;
        }
        if buf.is_empty() {
            // Give back what a large frame made the buffer grow to.
            if buf.capacity() > 4 * READ_BUF {
                buf = BytesMut::with_capacity(READ_BUF);
            }
        } else if frame_deadline.is_none() {
            frame_deadline = Some(now + frame_timeout);
        }
        if !buffered.set(buf.len()) {
            Stats::inc(&stats.buffer_limit_closed);
            debug!(%peer, bytes = buf.len(), "buffered-bytes bound reached; closing");
            return End::Closed;
        }
        // Read more. Keep room for a good batch of requests so one read can fill a whole
        // lookup batch.
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(READ_BUF);
        }
        let res = loop {
            // The idle clock runs only while nothing is in flight; with replies pending, wake
            // now and then to look again.
            let busy = in_flight.available_permits() != cap;
            let now = Instant::now();
            if busy {
                last_active = now;
            }
            let mut wake = if busy {
                now + idle.min(Duration::from_secs(1))
            } else {
                last_active + idle
            };
            if let Some(f) = frame_deadline {
                wake = wake.min(f);
            }
            let r = tokio::select! {
                r = tokio::time::timeout_at(wake, rd.read_buf(&mut buf)) => r,
                _ = stop.changed() => return End::Clean,
                () = &mut revoked => {
                    Stats::inc(&stats.access_revoked);
                    debug!(%peer, who = ?session.who, "session revoked; closing");
                    return End::Closed;
                }
                // The writer gave up (write error or timeout): stop reading too.
                () = tx.closed() => return End::Closed,
            };
            if let Ok(read) = r {
                break read;
            }
            let now = Instant::now();
            if frame_deadline.is_some_and(|f| now >= f) {
                Stats::inc(&stats.frame_timeouts);
                debug!(%peer, partial = buf.len(), "no whole frame within {frame_timeout:?}");
                return End::Closed;
            }
            if !busy && now >= last_active + idle {
                Stats::inc(&stats.connections_idle_closed);
                debug!(%peer, "idle timeout");
                return End::Closed;
            }
        };
        match res {
            Ok(0) => {
                if !buf.is_empty() {
                    Stats::inc(&stats.runt);
                    debug!(%peer, bytes = buf.len(), "peer closed mid-frame");
                }
                return End::Clean;
            }
            Ok(_) => {
                // Asked again before anything just read is answered: a host removed since
                // the last read gets nothing more.
                if !access.allowed(peer, &session.who) {
                    Stats::inc(&stats.access_revoked);
                    debug!(%peer, who = ?session.who, "no longer allowed; closing");
                    return End::Closed;
                }
            }
            Err(e) => {
                Stats::inc(&stats.io_errors);
                debug!(%peer, error = %e, "read failed");
                return End::Closed;
            }
        }
    }
}

/// Takes `n` in-flight permits; a batch larger than the whole cap takes the whole cap (it
/// waits for everything else to drain). `None` only if the semaphore was closed.
async fn acquire(sem: &Arc<Semaphore>, n: u32, cap: usize) -> Option<OwnedSemaphorePermit> {
    let n = n.min(u32::try_from(cap).unwrap_or(u32::MAX)).max(1);
    sem.clone().acquire_many_owned(n).await.ok()
}

/// Runs `job` on a blocking thread, bounded by the store worker semaphore, and sends its
/// encoded replies to the writer.
fn spawn_store_job<F>(
    shared: &Arc<Shared>,
    tx: mpsc::UnboundedSender<Reply>,
    permit: OwnedSemaphorePermit,
    job: F,
) where
    F: FnOnce(&dyn Store, &Stats) -> Vec<u8> + Send + 'static,
{
    let shared = shared.clone();
    tokio::spawn(async move {
        let Ok(worker) = shared.workers.acquire().await else {
            return;
        };
        let s = shared.clone();
        let out = tokio::task::spawn_blocking(move || job(&*s.store, &s.stats)).await;
        drop(worker);
        if let Ok(out) = out {
            let _ = tx.send((out, permit));
        }
    });
}

/// Logs a store failure at most once a second (a failing database would otherwise log once
/// per request batch, and hosts' lookups are driven by container traffic); the `store_errors`
/// counter has the full count.
fn store_failure(e: &crate::store::StoreError, what: &str) {
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let last = LAST_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 1000
        && LAST_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        warn!(error = %e, suppressed, "store {what} failed; answering FATAL");
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
}

fn lookup_replies(store: &dyn Store, stats: &Stats, batch: &[(RequestId, Lookup)]) -> Vec<u8> {
    let lookups: Vec<Lookup> = batch.iter().map(|(_, l)| *l).collect();
    let results = match store.lookup(&lookups) {
        Ok(r) => r.into_iter().map(Ok).collect::<Vec<_>>(),
        Err(e) => {
            store_failure(&e, "lookup");
            Stats::inc(&stats.store_errors);
            lookups.iter().map(|_| Err(())).collect()
        }
    };
    let mut out = Vec::with_capacity(batch.len() * 44);
    for ((id, lookup), result) in batch.iter().zip(results) {
        let message = match (lookup, result) {
            (Lookup::Vl2 { .. }, r) => {
                let (status, port, addr) = match r {
                    Ok(Some(Found { ip, port, .. })) => (Status::OK, port, to_wire_ip(ip)),
                    Ok(None) => {
                        Stats::inc(&stats.vl2_not_found);
                        (Status::NOT_FOUND, 0, std::net::Ipv6Addr::UNSPECIFIED)
                    }
                    Err(()) => (Status::FATAL, 0, std::net::Ipv6Addr::UNSPECIFIED),
                };
                Message::Vl2Ack(Vl2Ack { status, port, addr })
            }
            (Lookup::Vl3 { .. }, r) => {
                let (status, mac, port, addr) = match r {
                    Ok(Some(Found { mac, ip, port })) => (Status::OK, mac, port, to_wire_ip(ip)),
                    Ok(None) => {
                        Stats::inc(&stats.vl3_not_found);
                        (
                            Status::NOT_FOUND,
                            Mac::ZERO,
                            0,
                            std::net::Ipv6Addr::UNSPECIFIED,
                        )
                    }
                    Err(()) => (Status::FATAL, Mac::ZERO, 0, std::net::Ipv6Addr::UNSPECIFIED),
                };
                Message::Vl3Ack(Vl3Ack {
                    status,
                    mac,
                    port,
                    addr,
                })
            }
        };
        Frame::new(*id, message).encode(&mut out);
    }
    stats
        .replies
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    out
}

/// LOG_REQ: the whole payload (4-byte status + records) stays within both the client's count
/// and [`svp::LOG_ACK_MAX_PAYLOAD`]. A count below 4 still gets the bare 4-byte status.
fn log_reply(store: &dyn Store, stats: &Stats, id: RequestId, count: u32, ip: IpAddr) -> Vec<u8> {
    let budget = usize::try_from(count)
        .unwrap_or(usize::MAX)
        .min(svp::LOG_ACK_MAX_PAYLOAD)
        .saturating_sub(4);
    let limit = budget / svp::LOG_VL2_LEN;
    let ack = match store.read_log(ip, limit) {
        Ok(entries) => {
            let mut used = 0;
            let mut records = Vec::new();
            for e in entries {
                let r = e.to_record();
                if used + r.wire_len() > budget {
                    break;
                }
                used += r.wire_len();
                records.push(r);
            }
            stats
                .log_records_sent
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            LogAck {
                status: Status::OK,
                records,
            }
        }
        Err(e) => {
            if matches!(
                e,
                crate::store::StoreError::UnknownUnderlayIp(_)
                    | crate::store::StoreError::AmbiguousUnderlayIp { .. }
            ) {
                debug!(error = %e, "LOG_REQ from an unknown host; answering FATAL");
            } else {
                Stats::inc(&stats.store_errors);
                store_failure(&e, "LOG_REQ");
            }
            LogAck {
                status: Status::FATAL,
                records: Vec::new(),
            }
        }
    };
    Stats::inc(&stats.replies);
    Frame::new(id, Message::LogAck(ack)).to_bytes()
}

/// LOG_ACK FATAL with no records: the answer to a LOG_REQ for a log that is not the asker's
/// (what Portolan answers for an underlay IP it does not know).
fn log_refusal(stats: &Stats, id: RequestId) -> Vec<u8> {
    Stats::inc(&stats.replies);
    Frame::new(
        id,
        Message::LogAck(LogAck {
            status: Status::FATAL,
            records: Vec::new(),
        }),
    )
    .to_bytes()
}

fn log_rm_reply(
    store: &dyn Store,
    stats: &Stats,
    id: RequestId,
    scope: LogScope,
    ids: &[svp::LogId],
) -> Vec<u8> {
    let removed = match scope {
        LogScope::Own(ip) => store.remove_log_of(ip.to_canonical(), ids),
        LogScope::Any | LogScope::Nothing => store.remove_log(ids),
    };
    let status = match removed {
        Ok(n) => {
            stats.log_records_removed.fetch_add(n, Ordering::Relaxed);
            Status::OK
        }
        Err(
            e @ (crate::store::StoreError::UnknownUnderlayIp(_)
            | crate::store::StoreError::AmbiguousUnderlayIp { .. }),
        ) => {
            debug!(error = %e, "LOG_RM from a host with no single log; answering FATAL");
            Status::FATAL
        }
        Err(e) => {
            store_failure(&e, "LOG_RM");
            Stats::inc(&stats.store_errors);
            Status::FATAL
        }
    };
    Stats::inc(&stats.replies);
    Frame::new(id, Message::LogRmAck(status)).to_bytes()
}
