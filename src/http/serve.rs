//! The accept loop and the per-connection task: admission ([`super::conns::Table`]),
//! deadlines ([`super::conns::Lifecycle`]), the body cap, and graceful shutdown.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Notify};

use super::conns::{Admit, Expiry, Lifecycle, Table};
use super::Limits;

/// How long a connection told to shut down (idle timeout, server shutdown) may take to say
/// goodbye (HTTP/2 GOAWAY) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The step between `accept(2)` and HTTP: nothing for plain TCP, a handshake for TLS. It runs
/// inside the header-read timeout. It also says who the client is ([`Accept::Peer`], put into
/// every request's extensions, so a handler reads it with axum's `Extension`) and when that
/// client's access ends ([`Accept::closed`], [`Accept::expires`]): the connection is then
/// dropped at once, requests in flight (long-polls) included.
pub trait Accept: Send + Sync + 'static {
    /// The stream HTTP runs over.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Who the client is, as this step established it (`()` when it establishes nothing).
    type Peer: Clone + Send + Sync + 'static;
    /// Turns an accepted TCP stream into the stream HTTP runs over.
    fn accept(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Io>> + Send;
    /// The client of an accepted stream.
    fn peer(&self, io: &Self::Io) -> Self::Peer;
    /// Resolves when `peer` may no longer talk (e.g. its certificate was revoked); never, by
    /// default.
    fn closed(&self, peer: &Self::Peer) -> impl Future<Output = ()> + Send {
        let _ = peer;
        std::future::pending()
    }
    /// When the stream's credentials stop being valid (a client certificate's `not_after`);
    /// never, by default.
    fn expires(&self, io: &Self::Io) -> Option<SystemTime> {
        let _ = io;
        None
    }
}

/// Plain TCP: HTTP straight over the accepted stream; the client is not identified.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainTcp;

impl Accept for PlainTcp {
    type Io = TcpStream;
    type Peer = ();
    fn accept(&self, tcp: TcpStream) -> impl Future<Output = io::Result<TcpStream>> + Send {
        std::future::ready(Ok(tcp))
    }
    fn peer(&self, _io: &TcpStream) {}
}

/// What a listener hands over, turned into the stream HTTP runs over: [`Accept`] over TCP, or
/// nothing over a unix socket (whose peer the caller names).
trait Handshake: Send + Sync + 'static {
    type In: Send + 'static;
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Peer: Clone + Send + Sync + 'static;
    fn handshake(&self, s: Self::In) -> impl Future<Output = io::Result<Self::Io>> + Send;
    fn peer(&self, io: &Self::Io) -> Self::Peer;
    fn closed(&self, peer: &Self::Peer) -> impl Future<Output = ()> + Send;
    fn expires(&self, io: &Self::Io) -> Option<SystemTime>;
}

struct OverTcp<A>(A);

impl<A: Accept> Handshake for OverTcp<A> {
    type In = TcpStream;
    type Io = A::Io;
    type Peer = A::Peer;
    fn handshake(&self, s: TcpStream) -> impl Future<Output = io::Result<A::Io>> + Send {
        self.0.accept(s)
    }
    fn peer(&self, io: &A::Io) -> A::Peer {
        self.0.peer(io)
    }
    fn closed(&self, peer: &A::Peer) -> impl Future<Output = ()> + Send {
        self.0.closed(peer)
    }
    fn expires(&self, io: &A::Io) -> Option<SystemTime> {
        self.0.expires(io)
    }
}

/// A unix socket: every connection is the peer given to [`Server::serve_unix`].
struct OverUnix<P>(P);

impl<P: Clone + Send + Sync + 'static> Handshake for OverUnix<P> {
    type In = UnixStream;
    type Io = UnixStream;
    type Peer = P;
    fn handshake(&self, s: UnixStream) -> impl Future<Output = io::Result<UnixStream>> + Send {
        std::future::ready(Ok(s))
    }
    fn peer(&self, _io: &UnixStream) -> P {
        self.0.clone()
    }
    fn closed(&self, _peer: &P) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
    fn expires(&self, _io: &UnixStream) -> Option<SystemTime> {
        None
    }
}

/// A listening socket: accepts streams and says which source each counts against.
trait Listen: Send {
    type Stream: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, std::net::IpAddr)>> + Send;
    fn prepare(&self, s: &Self::Stream, limits: &Limits);
}

impl Listen for TcpListener {
    type Stream = TcpStream;
    async fn accept(&self) -> io::Result<(TcpStream, std::net::IpAddr)> {
        let (s, peer) = TcpListener::accept(self).await?;
        Ok((s, peer.ip()))
    }
    fn prepare(&self, tcp: &TcpStream, limits: &Limits) {
        let _ = tcp.set_nodelay(true);
        let ka = socket2::TcpKeepalive::new()
            .with_time(limits.tcp_keepalive)
            .with_interval(Duration::from_secs(10))
            .with_retries(6);
        let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
    }
}

/// Every client of a unix socket is local: one source for the per-source cap.
const UNIX_SOURCE: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

impl Listen for UnixListener {
    type Stream = UnixStream;
    async fn accept(&self) -> io::Result<(UnixStream, std::net::IpAddr)> {
        let (s, _) = UnixListener::accept(self).await?;
        Ok((s, UNIX_SOURCE))
    }
    fn prepare(&self, _s: &UnixStream, _limits: &Limits) {}
}

/// Builds the response of a refusal made by the layer itself (413 today): status, error code,
/// message.
pub type Refusal = fn(StatusCode, &'static str, String) -> Response<Body>;

/// A restify-style error (`{"code": ..., "message": ...}`), as NAPI and the other Triton APIs
/// answer.
pub fn restify_refusal(status: StatusCode, code: &'static str, message: String) -> Response<Body> {
    let body = serde_json::json!({"code": code, "message": message}).to_string();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Counters of one HTTP service's connections and refusals.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections open now (gauge).
    pub open: AtomicU64,
    /// Connections refused: their source held its share.
    pub refused_per_source: AtomicU64,
    /// Connections refused: every slot taken and none could be freed.
    pub refused_full: AtomicU64,
    /// Idle connections closed to make room for a new source (or when descriptors ran out).
    pub evicted: AtomicU64,
    /// Connections closed: a request head (or the handshake) took too long.
    pub header_timeouts: AtomicU64,
    /// Connections closed: idle too long between requests.
    pub idle_timeouts: AtomicU64,
    /// Connections whose accept step (TLS handshake) failed.
    pub handshake_failures: AtomicU64,
    /// `accept(2)` errors (descriptors exhausted, ...).
    pub accept_errors: AtomicU64,
    /// Requests answered 413: body over the cap.
    pub body_too_large: AtomicU64,
    /// Connections dropped because their peer's access ended ([`Accept::closed`]: revoked).
    pub revoked: AtomicU64,
    /// Connections dropped because their credentials expired ([`Accept::expires`]).
    pub expired: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    /// Appends the counters in Prometheus text format, names starting with `prefix`.
    pub fn render(&self, prefix: &str, out: &mut String) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP {prefix}_connections_open HTTP connections open."
        );
        let _ = writeln!(out, "# TYPE {prefix}_connections_open gauge");
        let _ = writeln!(out, "{prefix}_connections_open {}", g(&self.open));
        let _ = writeln!(
            out,
            "# HELP {prefix}_connections_accepted_total HTTP connections accepted."
        );
        let _ = writeln!(out, "# TYPE {prefix}_connections_accepted_total counter");
        let _ = writeln!(
            out,
            "{prefix}_connections_accepted_total {}",
            g(&self.accepted)
        );
        let _ = writeln!(
            out,
            "# HELP {prefix}_connections_closed_total HTTP connections refused or closed by a limit, by reason."
        );
        let _ = writeln!(out, "# TYPE {prefix}_connections_closed_total counter");
        for (reason, c) in [
            ("refused_per_source", &self.refused_per_source),
            ("refused_full", &self.refused_full),
            ("evicted", &self.evicted),
            ("header_timeout", &self.header_timeouts),
            ("idle_timeout", &self.idle_timeouts),
            ("handshake_failed", &self.handshake_failures),
            ("revoked", &self.revoked),
            ("expired", &self.expired),
        ] {
            let _ = writeln!(
                out,
                "{prefix}_connections_closed_total{{reason=\"{reason}\"}} {}",
                g(c)
            );
        }
        let _ = writeln!(
            out,
            "# HELP {prefix}_accept_errors_total accept(2) failures."
        );
        let _ = writeln!(out, "# TYPE {prefix}_accept_errors_total counter");
        let _ = writeln!(
            out,
            "{prefix}_accept_errors_total {}",
            g(&self.accept_errors)
        );
        let _ = writeln!(
            out,
            "# HELP {prefix}_requests_refused_total Requests refused by the serving layer, by reason."
        );
        let _ = writeln!(out, "# TYPE {prefix}_requests_refused_total counter");
        let _ = writeln!(
            out,
            "{prefix}_requests_refused_total{{reason=\"body_too_large\"}} {}",
            g(&self.body_too_large)
        );
    }
}

/// Which requests' bodies stream for as long as they last and are not capped at
/// [`Limits::max_body_bytes`] (their handler bounds what it buffers): by method and path.
pub type Streaming = fn(&Method, &str) -> bool;

fn never_streams(_: &Method, _: &str) -> bool {
    false
}

/// HTTP/2 receive window of one stream on a server with streaming routes: what one sub-stream
/// nobody reads can hold.
pub const STREAMING_STREAM_WINDOW: u32 = 256 << 10;
/// HTTP/2 receive window of a connection on a server with streaming routes: unread streams
/// hold their windows out of this one, so 64 stalled streams fit before the others stall
/// (with hyper's defaults, 1 MiB each, one stalled stream stalls the whole connection).
pub const STREAMING_CONN_WINDOW: u32 = 16 << 20;

/// An HTTP service's serving layer: limits, accept step, counters, refusal bodies.
pub struct Server<A = PlainTcp> {
    limits: Limits,
    acceptor: A,
    stats: Arc<Stats>,
    refusal: Refusal,
    streaming: Streaming,
    /// `with_streaming` was called: HTTP/2 windows for long-lived streams.
    streams: bool,
}

impl Server<PlainTcp> {
    /// Plain TCP with these limits, restify-style refusals and fresh counters.
    pub fn new(limits: Limits) -> Server<PlainTcp> {
        Server {
            limits,
            acceptor: PlainTcp,
            stats: Arc::default(),
            refusal: restify_refusal,
            streaming: never_streams,
            streams: false,
        }
    }
}

impl<A: Accept> Server<A> {
    /// Runs `acceptor` on each accepted stream (e.g. a TLS handshake).
    pub fn with_acceptor<B: Accept>(self, acceptor: B) -> Server<B> {
        Server {
            limits: self.limits,
            acceptor,
            stats: self.stats,
            refusal: self.refusal,
            streaming: self.streaming,
            streams: self.streams,
        }
    }

    /// Requests for which `streaming` is true have bodies that stream without the size cap
    /// (an agent's tunnel sub-stream).
    /// Such a server's HTTP/2 windows are [`STREAMING_STREAM_WINDOW`] per stream and
    /// [`STREAMING_CONN_WINDOW`] per connection, so that a stream nobody reads holds back only
    /// itself.
    pub fn with_streaming(mut self, streaming: Streaming) -> Self {
        self.streaming = streaming;
        self.streams = true;
        self
    }

    /// Counts into `stats` (shared with the service's `/metrics`).
    pub fn with_stats(mut self, stats: Arc<Stats>) -> Self {
        self.stats = stats;
        self
    }

    /// Builds the layer's own refusals with `refusal`.
    pub fn with_refusal(mut self, refusal: Refusal) -> Self {
        self.refusal = refusal;
        self
    }

    /// The counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Serves `router` on `listener` until `shutdown` completes, then stops accepting, lets
    /// each connection finish its requests, and returns once all are closed.
    pub async fn serve(
        self,
        listener: TcpListener,
        router: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let (limits, acceptor, stats, refusal) =
            (self.limits, self.acceptor, self.stats, self.refusal);
        run(
            limits,
            OverTcp(acceptor),
            stats,
            (refusal, self.streaming, self.streams),
            listener,
            router,
            shutdown,
        )
        .await
    }

    /// Serves `router` on a unix socket (e.g. the head's `DIR/control.sock`) with the same
    /// limits (all its clients are one source), until `shutdown` completes. Every request
    /// carries `peer` in its extensions (the socket's file mode is what authenticates them).
    /// The accept step of this server is not used.
    pub async fn serve_unix<P: Clone + Send + Sync + 'static>(
        self,
        listener: UnixListener,
        router: Router,
        peer: P,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let (limits, stats, refusal) = (self.limits, self.stats, self.refusal);
        run(
            limits,
            OverUnix(peer),
            stats,
            (refusal, self.streaming, self.streams),
            listener,
            router,
            shutdown,
        )
        .await
    }
}

/// The accept loop of [`Server::serve`] and [`Server::serve_unix`].
async fn run<H: Handshake, L: Listen<Stream = H::In>>(
    limits: Limits,
    handshake: H,
    stats: Arc<Stats>,
    (refusal, streaming, streams): (Refusal, Streaming, bool),
    listener: L,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    limits
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let nofile = crate::io::rlimit::nofile()
        .map(|(soft, _)| soft)
        .unwrap_or(u64::MAX);
    let cap = limits.connection_cap(nofile);
    tracing::info!(
        max_connections = cap,
        per_source = limits.max_connections_per_source,
        nofile,
        "HTTP connection caps"
    );
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A backstop only: the connection task enforces both deadlines itself (and counts
        // them). hyper starts this clock a little later or earlier than ours, so it must
        // fire well after both, or it would close an idle connection uncounted.
        .header_read_timeout(
            limits
                .header_read_timeout
                .max(limits.idle_timeout)
                .saturating_mul(2)
                .saturating_add(Duration::from_secs(1)),
        )
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_h2_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    if streams {
        builder
            .http2()
            .initial_stream_window_size(STREAMING_STREAM_WINDOW)
            .initial_connection_window_size(STREAMING_CONN_WINDOW);
    }
    let registry = Arc::new(Registry {
        table: Mutex::new(Table::new(cap, limits.max_connections_per_source)),
        stats,
    });
    let shared = Arc::new(Shared {
        limits,
        handshake,
        builder,
        router,
        refusal,
        streaming,
        registry,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (open_tx, open_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let (stream, source) = match accepted {
            Ok(x) => x,
            Err(e) => {
                shared.accept_failed(&e).await;
                continue;
            }
        };
        let Some(slot) = shared.admit(source) else {
            continue;
        };
        listener.prepare(&stream, &shared.limits);
        tokio::spawn(connection(
            shared.clone(),
            stream,
            slot,
            stop_rx.clone(),
            open_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

/// The open connections and the counters; each connection holds it to update its entry.
struct Registry {
    table: Mutex<Table<Arc<Notify>>>,
    stats: Arc<Stats>,
}

impl Registry {
    fn table(&self) -> MutexGuard<'_, Table<Arc<Notify>>> {
        // The table stays consistent whatever panicked while holding the lock.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Shared<H> {
    limits: Limits,
    handshake: H,
    builder: Builder<TokioExecutor>,
    router: Router,
    refusal: Refusal,
    streaming: Streaming,
    registry: Arc<Registry>,
}

impl<H> Shared<H> {
    /// Admits a connection from `ip` (evicting another if that makes room), or refuses it.
    fn admit(&self, ip: std::net::IpAddr) -> Option<Slot> {
        let reg = &self.registry;
        let kill = Arc::new(Notify::new());
        let now = Instant::now();
        let decision = reg.table().admit(ip, now, kill.clone());
        let id = match decision {
            Admit::Accept(id) => id,
            Admit::AcceptEvicting { id, victim } => {
                inc(&reg.stats.evicted);
                victim.notify_one();
                id
            }
            Admit::RefuseSource => {
                inc(&reg.stats.refused_per_source);
                return None;
            }
            Admit::RefuseFull => {
                inc(&reg.stats.refused_full);
                return None;
            }
        };
        inc(&reg.stats.accepted);
        reg.stats.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            conn: Arc::new(Conn {
                id,
                registry: reg.clone(),
                life: Mutex::new(Lifecycle::new(
                    now,
                    self.limits.header_read_timeout,
                    self.limits.idle_timeout,
                )),
                idle_h1: AtomicBool::new(false),
                changed: Notify::new(),
                kill,
            }),
        })
    }

    /// `accept(2)` failed: when descriptors ran out, free one (an idle connection of the
    /// largest source) and pause briefly rather than spin.
    async fn accept_failed(&self, e: &io::Error) {
        inc(&self.registry.stats.accept_errors);
        let exhausted = matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        let per_connection = matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
        );
        if exhausted {
            if let Some(victim) = self.registry.table().evict_any() {
                inc(&self.registry.stats.evicted);
                victim.notify_one();
            }
            tracing::warn!(error = %e, "accept failed: out of descriptors");
        }
        if !per_connection {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One connection's state, shared by its task, its stream and its requests.
struct Conn {
    id: u64,
    registry: Arc<Registry>,
    life: Mutex<Lifecycle>,
    /// Idle between HTTP/1 requests: the next byte read starts a head (checked per read
    /// without the lock).
    idle_h1: AtomicBool,
    /// Wakes the task when the deadline changes.
    changed: Notify,
    /// Closes the connection now (evicted).
    kill: Arc<Notify>,
}

impl Conn {
    fn life(&self) -> MutexGuard<'_, Lifecycle> {
        self.life.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request_started(&self, version: Version) {
        {
            let mut l = self.life();
            if version == Version::HTTP_2 {
                l.set_multiplexed();
            }
            l.request_started();
        }
        self.idle_h1.store(false, Ordering::Relaxed);
        self.registry.table().set_idle_since(self.id, None);
        self.changed.notify_one();
    }

    fn request_done(&self, h1: bool) {
        let now = Instant::now();
        if self.life().request_done(now) {
            self.idle_h1.store(h1, Ordering::Relaxed);
            self.registry.table().set_idle_since(self.id, Some(now));
            self.changed.notify_one();
        }
    }

    fn bytes_read(&self) {
        if self.idle_h1.load(Ordering::Relaxed) && self.life().bytes_read(Instant::now()) {
            self.idle_h1.store(false, Ordering::Relaxed);
            self.changed.notify_one();
        }
    }
}

/// A connection's place in the table, released when its stream is dropped (by the task, or
/// later by whoever took an upgraded stream).
struct Slot {
    conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conn.registry.table().remove(self.conn.id);
        self.conn
            .registry
            .stats
            .open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client's stream, noting reads (a new request head starts its clock) and holding the
/// connection's slot.
struct Watched<I> {
    inner: I,
    slot: Slot,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.slot.conn.bytes_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one connection until it closes, its time is up, it is evicted, or the server
/// shuts down.
async fn connection<H: Handshake>(
    shared: Arc<Shared<H>>,
    stream: H::In,
    slot: Slot,
    mut stop: watch::Receiver<bool>,
    _open: watch::Receiver<()>,
) {
    let conn = slot.conn.clone();
    let stats = &shared.registry.stats;
    let handshake_deadline = conn
        .life()
        .deadline()
        .map_or_else(Instant::now, |(at, _)| at);
    let io = tokio::select! {
        r = tokio::time::timeout_at(handshake_deadline.into(), shared.handshake.handshake(stream)) => {
            match r {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "HTTP accept step failed");
                    inc(&stats.handshake_failures);
                    return;
                }
                Err(_) => {
                    inc(&stats.header_timeouts);
                    return;
                }
            }
        }
        () = conn.kill.notified() => return,
    };
    let peer = shared.handshake.peer(&io);
    // Credentials that expire end the connection then (a clock jump is seen at the next wake).
    let expires = shared.handshake.expires(&io).map(|t| {
        let left = t
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Instant::now()
            .checked_add(left)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365))
    });
    if expires.is_some_and(|at| at <= Instant::now()) {
        inc(&stats.expired);
        return;
    }
    let revoked = shared.handshake.closed(&peer);
    tokio::pin!(revoked);
    let svc = ConnService {
        router: shared.router.clone(),
        conn: conn.clone(),
        max_body: shared.limits.max_body_bytes,
        refusal: shared.refusal,
        streaming: shared.streaming,
        peer: peer.clone(),
    };
    let io = TokioIo::new(Watched { inner: io, slot });
    let c = shared.builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(c);
    let mut closing: Option<Instant> = None;
    let mut stopping = *stop.borrow();
    if stopping {
        c.as_mut().graceful_shutdown();
    }
    loop {
        let wake = closing.or_else(|| conn.life().deadline().map(|(at, _)| at));
        tokio::select! {
            // Checked first: a revoked peer gets no further answer.
            biased;
            // The peer's access ended: drop the connection now, requests in flight included.
            () = &mut revoked => {
                inc(&stats.revoked);
                tracing::info!("closing a connection: its peer's access was revoked");
                break;
            }
            () = sleep_until(expires), if expires.is_some() => {
                inc(&stats.expired);
                tracing::info!("closing a connection: its peer's credentials expired");
                break;
            }
            r = c.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                break;
            }
            () = conn.changed.notified() => {}
            () = conn.kill.notified() => break,
            () = sleep_until(wake), if wake.is_some() => {
                let now = Instant::now();
                if closing.is_some_and(|end| now >= end) {
                    break;
                }
                match conn.life().expired(now) {
                    // No request in flight: nothing is lost by closing now.
                    Some(Expiry::Header) => {
                        inc(&stats.header_timeouts);
                        break;
                    }
                    Some(Expiry::Idle) if closing.is_none() => {
                        inc(&stats.idle_timeouts);
                        c.as_mut().graceful_shutdown();
                        closing = Some(now + CLOSE_GRACE);
                    }
                    _ => {}
                }
            }
            r = stop.changed(), if !stopping => {
                stopping = true;
                if r.is_ok() {
                    c.as_mut().graceful_shutdown();
                }
            }
        }
    }
    // An upgraded stream may live on with whoever took it: never evict it.
    shared.registry.table().set_idle_since(conn.id, None);
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Marks a request in flight until its response body is done or dropped.
struct Busy {
    conn: Arc<Conn>,
    h1: bool,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.conn.request_done(self.h1);
    }
}

/// The router, seen from one connection: counts requests in flight, caps bodies.
#[derive(Clone)]
struct ConnService<P> {
    router: Router,
    conn: Arc<Conn>,
    max_body: usize,
    refusal: Refusal,
    streaming: Streaming,
    /// Who the client is: put into every request's extensions.
    peer: P,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send>>;

impl<P: Clone + Send + Sync + 'static> hyper::service::Service<Request<Incoming>>
    for ConnService<P>
{
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, mut req: Request<Incoming>) -> ServiceFuture {
        req.extensions_mut().insert(self.peer.clone());
        let version = req.version();
        self.conn.request_started(version);
        let busy = Busy {
            conn: self.conn.clone(),
            h1: version != Version::HTTP_2,
        };
        let stats = self.conn.registry.stats.clone();
        let (max, refusal) = (self.max_body, self.refusal);
        // A streaming body is not capped: its handler reads it as it goes.
        let cap = if (self.streaming)(req.method(), req.uri().path()) {
            usize::MAX
        } else {
            max
        };
        let too_large = move || {
            inc(&stats.body_too_large);
            let mut r = refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                format!("Request body size exceeds {max}"),
            );
            // The unread body is not worth reading: end the connection after this reply.
            if version < Version::HTTP_2 {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            r
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > cap as u64) {
            let r = too_large().map(|b| Tracked::new(b, busy));
            return Box::pin(std::future::ready(Ok(r)));
        }
        let tripped = Arc::new(AtomicBool::new(false));
        let t = tripped.clone();
        let req = req.map(move |b| Capped {
            inner: Limited::new(b, cap),
            tripped: t,
        });
        let mut router = self.router.clone();
        let fut = tower_service::Service::call(&mut router, req);
        Box::pin(async move {
            let resp = match fut.await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            // The handler could not have read its body: whatever it answered, the answer is 413.
            let resp = if tripped.load(Ordering::Relaxed) {
                too_large()
            } else {
                resp
            };
            Ok(resp.map(|b| Tracked::new(b, busy)))
        })
    }
}

/// A request body that notes when it went over the cap.
struct Capped {
    inner: Limited<Incoming>,
    tripped: Arc<AtomicBool>,
}

impl HttpBody for Capped {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &r {
            if e.is::<LengthLimitError>() {
                self.tripped.store(true, Ordering::Relaxed);
            }
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request counted as in flight until it is done.
struct Tracked {
    inner: Body,
    busy: Option<Busy>,
}

impl Tracked {
    fn new(inner: Body, busy: Busy) -> Tracked {
        Tracked {
            inner,
            busy: Some(busy),
        }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Err(_)))) {
            self.busy = None;
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use axum::Extension;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An accept step naming each client by its address, cut off when `cut` is notified,
    /// whose credentials expire at `expires`.
    struct Fake {
        cut: Arc<Notify>,
        expires: Option<SystemTime>,
    }

    impl Accept for Fake {
        type Io = TcpStream;
        type Peer = String;
        fn accept(&self, tcp: TcpStream) -> impl Future<Output = io::Result<TcpStream>> + Send {
            std::future::ready(Ok(tcp))
        }
        fn peer(&self, io: &TcpStream) -> String {
            format!(
                "client {}",
                io.peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default()
            )
        }
        fn closed(&self, _peer: &String) -> impl Future<Output = ()> + Send {
            self.cut.notified()
        }
        fn expires(&self, _io: &TcpStream) -> Option<SystemTime> {
            self.expires
        }
    }

    fn app() -> Router {
        Router::new()
            .route(
                "/who",
                get(|Extension(p): Extension<String>| async move { p }),
            )
            .route("/wait", get(std::future::pending::<&'static str>))
    }

    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, path: &str) -> String {
        let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the connection ends within 10 s")
            .ok();
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn start(fake: Fake) -> (std::net::SocketAddr, Arc<Stats>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = Server::new(Limits::default()).with_acceptor(fake);
        let stats = server.stats();
        tokio::spawn(server.serve(l, app(), std::future::pending()));
        (addr, stats)
    }

    #[tokio::test]
    async fn every_request_carries_the_peer() {
        let cut = Arc::new(Notify::new());
        let (addr, _) = start(Fake { cut, expires: None }).await;
        let out = exchange(TcpStream::connect(addr).await.unwrap(), "/who").await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("client 127.0.0.1"), "{out}");
    }

    #[tokio::test]
    async fn closed_cuts_an_open_long_request() {
        let cut = Arc::new(Notify::new());
        let (addr, stats) = start(Fake {
            cut: cut.clone(),
            expires: None,
        })
        .await;
        let waiting = tokio::spawn(async move {
            exchange(TcpStream::connect(addr).await.unwrap(), "/wait").await
        });
        // The request is in flight (no deadline applies to it) before the peer is cut off.
        let t0 = Instant::now();
        while stats.open.load(Ordering::Relaxed) == 0 || t0.elapsed() < Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!waiting.is_finished());
        let t1 = Instant::now();
        cut.notify_one();
        let out = waiting.await.unwrap();
        println!(
            "long request cut {:?} after closed() resolved",
            t1.elapsed()
        );
        assert_eq!(out, "", "no answer: the connection was dropped");
        assert_eq!(stats.revoked.load(Ordering::Relaxed), 1);
        assert_eq!(stats.open.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn expired_credentials_cut_the_connection() {
        let (addr, stats) = start(Fake {
            cut: Arc::new(Notify::new()),
            expires: Some(SystemTime::now() + Duration::from_millis(300)),
        })
        .await;
        let t0 = Instant::now();
        let out = exchange(TcpStream::connect(addr).await.unwrap(), "/wait").await;
        println!("connection closed {:?} after accept", t0.elapsed());
        assert_eq!(out, "");
        assert!(t0.elapsed() >= Duration::from_millis(250));
        assert_eq!(stats.expired.load(Ordering::Relaxed), 1);
        // Already expired: closed before any answer.
        let (addr, _) = start(Fake {
            cut: Arc::new(Notify::new()),
            expires: Some(SystemTime::now() - Duration::from_secs(1)),
        })
        .await;
        assert_eq!(
            exchange(TcpStream::connect(addr).await.unwrap(), "/who").await,
            ""
        );
    }

    #[tokio::test]
    async fn unix_socket_serves_with_the_given_peer_as_one_source() {
        let dir = std::env::temp_dir().join(format!(
            "fabric-serve-unix-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let server = Server::new(Limits {
            max_connections_per_source: 1,
            ..Limits::default()
        });
        let stats = server.stats();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve_unix(l, app(), "local".to_string(), async {
            let _ = rx.await;
        }));
        let out = exchange(UnixStream::connect(&path).await.unwrap(), "/who").await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("\r\n\r\nlocal"), "{out}");
        // One source: a second connection while one is open is refused.
        let first = UnixStream::connect(&path).await.unwrap();
        let t0 = Instant::now();
        while stats.open.load(Ordering::Relaxed) == 0 && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            exchange(UnixStream::connect(&path).await.unwrap(), "/who").await,
            ""
        );
        assert_eq!(stats.refused_per_source.load(Ordering::Relaxed), 1);
        drop(first);
        let _ = tx.send(());
        task.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
