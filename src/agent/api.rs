//! The agent's control-plane client: its snapshot (`GET /servers/:own/desired`), the change
//! feed (`GET /changes`, long-polled), state reports and heartbeats.
//!
//! One HTTP/2 connection ([`Conn`], DESIGN "Agents never listen"), shared by every call of the
//! agent: the long-poll, reports and heartbeats run concurrently as streams of it, so a waiting
//! poll never delays a heartbeat. `http://` speaks HTTP/2 with prior knowledge (h2c);
//! `https://` is TLS with ALPN h2, the cluster CA as the only root and the host certificate as
//! identity, read from `--tls-dir` at every connect (a renewed certificate is used from the
//! next connection on). A connection that failed is dropped and made again by the next call;
//! a call on a reused connection that fails before any answer (the server went away while it
//! was idle) is tried once more on a fresh one. Every failure is typed: unreachable, HTTP
//! status with the body, `410 Gone` for a feed position no longer kept, or a body that is not
//! the JSON expected.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::firewall::compile::FirewallState;

/// How long an ordinary call may take (connect, send, whole answer).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How much longer than the long-poll's own `timeout` the agent waits for its answer.
pub const POLL_GRACE: Duration = Duration::from_secs(10);

/// HTTP/2 pings on the connection, also while it is idle: a dead control plane (or path) is
/// noticed within `PING_EVERY + PING_TIMEOUT` even while only a long-poll is in flight.
const PING_EVERY: Duration = Duration::from_secs(15);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body: whole ([`full`]) or streamed (the tunnel's sub-streams, [`channel_body`]).
pub type ReqBody = BoxBody<Bytes, std::convert::Infallible>;

/// A whole request body.
pub fn full(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into()).boxed()
}

/// A request body streamed from a channel: each `Bytes` received is sent as it comes (HTTP/2
/// flow control holds the sender back when the peer reads slowly); the body ends when every
/// sender is dropped.
pub fn channel_body(rx: tokio::sync::mpsc::Receiver<Bytes>) -> ReqBody {
    ChannelBody { rx }.boxed()
}

struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// Why a control-plane call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Could not connect, the connection broke, or no answer in time.
    #[error("control plane {addr} unreachable ({what}): {detail}")]
    Unreachable {
        /// `host:port`.
        addr: String,
        /// The request, e.g. `GET /servers/U/desired`.
        what: String,
        /// What happened.
        detail: String,
    },
    /// `410 Gone` from `/changes`: the position asked for is no longer kept; list again.
    #[error("change feed: {0}")]
    Gone(String),
    /// Any other non-success status.
    #[error("{what}: HTTP {status}: {body}")]
    Status {
        /// The request.
        what: String,
        /// The status code.
        status: u16,
        /// The answer's body (the control plane's error JSON), truncated.
        body: String,
    },
    /// The answer is not the JSON expected.
    #[error("{what}: answer is not the expected JSON: {detail}")]
    BadJson {
        /// The request.
        what: String,
        /// The decoding error.
        detail: String,
    },
    /// The control URL is not one this client speaks.
    #[error("control URL {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    BadUrl(String),
    /// `https://` without the directory of the host's certificate, or the reverse.
    #[error("{0}")]
    Tls(String),
}

impl ApiError {
    /// Whether the control plane could not be reached at all (as opposed to answering).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ApiError::Unreachable { .. })
    }
}

/// The control plane's address, from `--control`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    /// `https://`: TLS with the host certificate.
    pub tls: bool,
    /// The host as written (an IPv6 address in brackets).
    pub host: String,
    /// The port.
    pub port: u16,
}

impl ControlUrl {
    /// `HOST:PORT`.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// `http[s]://HOST:PORT[/]` → its parts.
pub fn parse_control_url(url: &str) -> Result<ControlUrl, ApiError> {
    let bad = || ApiError::BadUrl(url.to_owned());
    let (tls, rest) = match url.strip_prefix("https://") {
        Some(r) => (true, r),
        None => (false, url.strip_prefix("http://").ok_or_else(bad)?),
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') {
        return Err(bad());
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(bad)?;
    let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
    if host.is_empty() || (host.contains(':') && !bracketed) {
        return Err(bad());
    }
    Ok(ControlUrl {
        tls,
        host: host.to_owned(),
        port,
    })
}

/// The one HTTP/2 connection to the control plane; clones share it.
#[derive(Clone)]
pub struct Conn {
    inner: Arc<Inner>,
}

struct Inner {
    url: ControlUrl,
    /// `ca.pem`, `cert.pem`, `key.pem` (with `https://`).
    tls_dir: Option<PathBuf>,
    /// The connection in use and its number; `None` until the first call or after a failure.
    current: tokio::sync::Mutex<Option<(u64, SendRequest<ReqBody>)>>,
    /// Connections made so far.
    made: AtomicU64,
}

impl Conn {
    /// The connection to `url` (made on first use): with `https://`, `tls_dir` must hold the
    /// host's `ca.pem`, `cert.pem` and `key.pem`; with `http://` it must be `None`.
    pub fn new(url: ControlUrl, tls_dir: Option<PathBuf>) -> Result<Conn, ApiError> {
        match (url.tls, &tls_dir) {
            (true, None) => {
                return Err(ApiError::Tls(format!(
                    "control URL https://{}: expected --tls-dir DIR (ca.pem, cert.pem, key.pem)",
                    url.authority()
                )))
            }
            (false, Some(d)) => {
                return Err(ApiError::Tls(format!(
                    "--tls-dir {} given for http://{}: expected an https:// control URL",
                    d.display(),
                    url.authority()
                )))
            }
            _ => {}
        }
        Ok(Conn {
            inner: Arc::new(Inner {
                url,
                tls_dir,
                current: tokio::sync::Mutex::new(None),
                made: AtomicU64::new(0),
            }),
        })
    }

    /// How many connections were made so far (one while the control plane stays up).
    pub fn connections_made(&self) -> u64 {
        self.inner.made.load(Ordering::Relaxed)
    }

    /// The control plane's `HOST:PORT`.
    pub fn authority(&self) -> String {
        self.inner.url.authority()
    }

    async fn connect(&self) -> Result<SendRequest<ReqBody>, String> {
        let url = &self.inner.url;
        let tcp = TcpStream::connect(url.authority())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).ok();
        match &self.inner.tls_dir {
            None => handshake(tcp).await,
            Some(dir) => {
                // Read at every connect: a renewed certificate is used from now on.
                let config = crate::pki::tls::client_config(dir)
                    .map_err(|e| format!("TLS files in {}: {e}", dir.display()))?;
                let name =
                    crate::pki::tls::server_name(&url.host).map_err(|e| format!("TLS: {e}"))?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                handshake(tls).await
            }
        }
    }

    /// The connection in use (made now if there is none): its number and a handle.
    async fn sender(&self) -> Result<(u64, bool, SendRequest<ReqBody>), String> {
        let mut cur = self.inner.current.lock().await;
        if let Some((n, s)) = cur.as_ref() {
            if !s.is_closed() {
                return Ok((*n, true, s.clone()));
            }
        }
        *cur = None;
        let s = self.connect().await?;
        let n = self.inner.made.fetch_add(1, Ordering::Relaxed) + 1;
        *cur = Some((n, s.clone()));
        Ok((n, false, s))
    }

    /// Forgets connection `n` (it failed), unless another call replaced it already.
    async fn forget(&self, n: u64) {
        let mut cur = self.inner.current.lock().await;
        if cur.as_ref().is_some_and(|(m, _)| *m == n) {
            *cur = None;
        }
    }

    /// Sends one request and reads the whole answer within `timeout`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let what = format!("{method} {path}");
        let unreachable = |detail: String| ApiError::Unreachable {
            addr: self.authority(),
            what: what.clone(),
            detail,
        };
        let attempt = async {
            let (n, reused, sender) = self.sender().await?;
            match self.try_call(sender, &method, path, body.clone()).await {
                Ok(v) => Ok(v),
                Err(e) => {
                    self.forget(n).await;
                    if !reused {
                        return Err(e);
                    }
                    // A connection that went away while idle: once more, fresh.
                    tracing::debug!(error = %e, "retrying on a fresh connection");
                    let (n, _, sender) = self.sender().await?;
                    let r = self.try_call(sender, &method, path, body).await;
                    if r.is_err() {
                        self.forget(n).await;
                    }
                    r
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unreachable(e)),
            // The connection may be fine (a slow answer); HTTP/2 pings tell if it is not.
            Err(_) => Err(unreachable(format!("no answer within {timeout:?}"))),
        }
    }

    /// Sends one request whose body may stream and returns the answer's head as soon as it
    /// comes (within `timeout`); the body is read by the caller, as long as it likes. Not
    /// retried: a streamed body cannot be sent twice.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: ReqBody,
        timeout: Duration,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ApiError> {
        let what = format!("{method} {path}");
        let attempt = async {
            let (n, _, mut sender) = self.sender().await?;
            let r = async {
                sender
                    .ready()
                    .await
                    .map_err(|e| format!("connection: {e}"))?;
                let req = self
                    .request_head(&method, path)
                    .body(body)
                    .map_err(|e| format!("building request: {e}"))?;
                sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("request: {e}"))
            }
            .await;
            if r.is_err() {
                self.forget(n).await;
            }
            r
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(detail)) => Err(ApiError::Unreachable {
                addr: self.authority(),
                what,
                detail,
            }),
            Err(_) => Err(ApiError::Unreachable {
                addr: self.authority(),
                what,
                detail: format!("no answer within {timeout:?}"),
            }),
        }
    }

    fn request_head(&self, method: &Method, path: &str) -> hyper::http::request::Builder {
        let scheme = if self.inner.url.tls { "https" } else { "http" };
        Request::builder()
            .method(method.clone())
            .uri(format!("{scheme}://{}{path}", self.authority()))
    }

    async fn try_call(
        &self,
        mut sender: SendRequest<ReqBody>,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let mut req = self.request_head(method, path);
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(full(body.unwrap_or_default()))
            .map_err(|e| format!("building request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

/// HTTP/2 over `io`; the connection's task runs until it closes.
async fn handshake<I>(io: I) -> Result<SendRequest<ReqBody>, String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(PING_EVERY)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(true)
        // Tunnel sub-streams whose handler does not read its input hold back only themselves
        // (hyper's default connection window is a few streams' worth).
        .initial_stream_window_size(crate::http::serve::STREAMING_STREAM_WINDOW)
        .initial_connection_window_size(crate::http::serve::STREAMING_CONN_WINDOW)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "control-plane connection ended");
        }
    });
    Ok(sender)
}

/// A NIC of a VM, as the snapshot lists it (VMAPI's shape; unknown fields ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// `net0`, `net1`, …
    pub interface: String,
    /// MAC address.
    pub mac: String,
    /// Address (without prefix).
    pub ip: String,
    /// Dotted netmask, e.g. `255.255.255.0`.
    pub netmask: String,
    /// Default gateway of the NIC's network, if it has one.
    #[serde(default)]
    pub gateway: Option<String>,
    /// MTU.
    pub mtu: u32,
    /// The VM's default route goes through its primary NIC.
    #[serde(default)]
    pub primary: bool,
    /// The segment; absent for a NIC on a network that is not a fabric network.
    #[serde(default)]
    pub vnet_id: Option<u32>,
    /// The NIC's network.
    #[serde(default)]
    pub network_uuid: Option<String>,
}

/// A VM as the snapshot lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// VM UUID (also the name of its network namespace).
    pub uuid: String,
    /// Alias.
    #[serde(default)]
    pub alias: Option<String>,
    /// Owner.
    #[serde(default)]
    pub owner_uuid: String,
    /// Actual state as the control plane has it.
    #[serde(default)]
    pub state: String,
    /// `running` or `stopped`.
    #[serde(default = "running")]
    pub desired_state: String,
    /// NICs in interface order.
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// What to run, for a Docker container.
    #[serde(default)]
    pub container: Option<crate::control::container_spec::ContainerSpec>,
    /// The run the container should be in (0: never started; +1 on every start and restart).
    #[serde(default)]
    pub generation: u64,
    /// The last `docker kill` (each id delivered once).
    #[serde(default)]
    pub signal: Option<crate::control::container_spec::SignalRequest>,
    /// Grace period of the last stop/restart (None: the spec's).
    #[serde(default)]
    pub stop_timeout: Option<u32>,
    /// The generation the control plane's last report was about.
    #[serde(default)]
    pub run_generation: Option<u64>,
}

fn running() -> String {
    "running".into()
}

/// `GET /servers/:uuid/desired`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Snapshot {
    /// The server object.
    #[serde(default)]
    pub server: serde_json::Value,
    /// The feed position this snapshot reflects.
    pub seq: u64,
    /// Portolan's address, if the control plane knows it.
    #[serde(default)]
    pub portolan: Option<String>,
    /// The VMs on this server that are not destroyed.
    #[serde(default)]
    pub vms: Vec<Vm>,
    /// The firewall state for this host's dataplane.
    #[serde(default)]
    pub firewall: FirewallState,
    /// The cluster's members (registered, unrevoked servers' underlay addresses and foreign
    /// peers): the only underlay sources this host's dataplane accepts VXLAN from. Absent
    /// (a control plane without membership): the dataplane's set is left alone.
    #[serde(default)]
    pub members: Option<Vec<std::net::IpAddr>>,
}

/// One change of the feed (only what the agent reads).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Change {
    /// Feed position.
    pub seq: u64,
    /// `vm`, `nic`, `rule`, `server`, `network`, …
    pub kind: String,
    /// The object.
    #[serde(default)]
    pub uuid: String,
    /// `create`, `update`, `delete`, …
    #[serde(default)]
    pub action: String,
}

/// `GET /changes`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Changes {
    /// The changes after `since`, in order.
    pub changes: Vec<Change>,
    /// The `since` to ask next.
    pub next: u64,
    /// The oldest position kept.
    #[serde(default)]
    pub oldest: u64,
}

/// A VM's actual state as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Namespace and vnics are in place.
    Running,
    /// In place, but its desired state is `stopped`.
    Stopped,
    /// Could not be set up (see the reason).
    Failed,
}

impl VmState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }
}

/// One entry of `POST /servers/:uuid/vm_states`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateReport {
    /// The VM.
    pub uuid: String,
    /// Its state.
    pub state: VmState,
    /// Why (for `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A container's process: the exit status of the run that ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// When the run started (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    /// When the run ended (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// The generation the report is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

impl StateReport {
    /// A report of a VM's state alone (no container fields).
    pub fn vm(uuid: String, state: VmState, reason: Option<String>) -> StateReport {
        StateReport {
            uuid,
            state,
            reason,
            exit_status: None,
            started_at: None,
            finished_at: None,
            generation: None,
        }
    }
}

/// The answer to a state report.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReportAnswer {
    /// Rows changed.
    #[serde(default)]
    pub updated: u64,
    /// VMs whose report was ignored (not on this server any more, destroyed).
    #[serde(default)]
    pub ignored: Vec<String>,
}

/// The agent's view of the control plane: its server UUID and the (shared) connection.
#[derive(Clone)]
pub struct Api {
    server: String,
    conn: Conn,
}

impl Api {
    /// A client acting for server `server_uuid` over `conn` (clones of one [`Conn`] share
    /// its connection).
    pub fn new(conn: Conn, server_uuid: &str) -> Api {
        Api {
            server: server_uuid.to_owned(),
            conn,
        }
    }

    /// The connection.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// The UUID of the server this agent acts for.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// `GET path` whose answer is read as a stream (layer downloads, the tunnel): the body of
    /// a success, or the error (status with the body's text) of anything else. Only the head
    /// must come within [`CALL_TIMEOUT`]; a call on an idle connection that went away is
    /// tried once more on a fresh one.
    pub async fn get_stream(&self, path: &str) -> Result<hyper::body::Incoming, ApiError> {
        let what = format!("GET {path}");
        let resp = match self
            .conn
            .request(Method::GET, path, full(Bytes::new()), CALL_TIMEOUT)
            .await
        {
            Err(e) if e.is_unreachable() => {
                self.conn
                    .request(Method::GET, path, full(Bytes::new()), CALL_TIMEOUT)
                    .await?
            }
            r => r?,
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.into_body());
        }
        let body = tokio::time::timeout(CALL_TIMEOUT, resp.into_body().collect())
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Err(ApiError::Status {
            what,
            status: status.as_u16(),
            body: body_text(&body),
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let what = format!("{method} {path}");
        let (status, bytes) = self.conn.call(method, path, body, timeout).await?;
        check(&what, status, &bytes)?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadJson {
            what,
            detail: e.to_string(),
        })
    }

    /// This server's desired state.
    pub async fn snapshot(&self) -> Result<Snapshot, ApiError> {
        let path = format!("/servers/{}/desired", self.server);
        self.json(Method::GET, &path, None, CALL_TIMEOUT).await
    }

    /// The changes after `since` that concern this server, waiting up to `wait` for one.
    pub async fn changes(&self, since: u64, wait: Duration) -> Result<Changes, ApiError> {
        let path = format!(
            "/changes?since={since}&server_uuid={}&timeout={}",
            self.server,
            wait.as_secs()
        );
        let what = format!("GET {path}");
        let (status, bytes) = self
            .conn
            .call(Method::GET, &path, None, wait + POLL_GRACE)
            .await?;
        if status == StatusCode::GONE {
            return Err(ApiError::Gone(body_text(&bytes)));
        }
        check(&what, status, &bytes)?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadJson {
            what,
            detail: e.to_string(),
        })
    }

    /// Reports VM states.
    pub async fn report(&self, vms: &[StateReport]) -> Result<ReportAnswer, ApiError> {
        let path = format!("/servers/{}/vm_states", self.server);
        let body = serde_json::to_vec(&serde_json::json!({ "vms": vms })).map_err(|e| {
            ApiError::BadJson {
                what: format!("POST {path}"),
                detail: e.to_string(),
            }
        })?;
        self.json(Method::POST, &path, Some(body), CALL_TIMEOUT)
            .await
    }

    /// Asks for a new host certificate for the key of `csr_pem`; returns it (PEM).
    pub async fn renew(&self, csr_pem: &str) -> Result<String, ApiError> {
        #[derive(Deserialize)]
        struct Renewed {
            certificate: String,
        }
        let path = format!("/servers/{}/certificate", self.server);
        let body = serde_json::to_vec(&serde_json::json!({ "csr": csr_pem })).map_err(|e| {
            ApiError::BadJson {
                what: format!("POST {path}"),
                detail: e.to_string(),
            }
        })?;
        let r: Renewed = self
            .json(Method::POST, &path, Some(body), CALL_TIMEOUT)
            .await?;
        Ok(r.certificate)
    }

    /// Tells the control plane this server is alive.
    pub async fn heartbeat(&self) -> Result<(), ApiError> {
        let path = format!("/servers/{}/heartbeat", self.server);
        let what = format!("POST {path}");
        let (status, bytes) = self
            .conn
            .call(Method::POST, &path, None, CALL_TIMEOUT)
            .await?;
        check(&what, status, &bytes)
    }
}

fn body_text(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let mut s = s.trim().to_string();
    if s.len() > 512 {
        let mut cut = 512;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn check(what: &str, status: StatusCode, body: &[u8]) -> Result<(), ApiError> {
    if status.is_success() {
        Ok(())
    } else {
        Err(ApiError::Status {
            what: what.to_owned(),
            status: status.as_u16(),
            body: body_text(body),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_urls() {
        let u = parse_control_url("http://127.0.0.1:8080").unwrap();
        assert_eq!((u.tls, u.authority().as_str()), (false, "127.0.0.1:8080"));
        let u = parse_control_url("https://h1:80/").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "h1", 80));
        let u = parse_control_url("https://[fd00::1]:8443").unwrap();
        assert_eq!(u.authority(), "[fd00::1]:8443");
        for bad in [
            "ftp://127.0.0.1:8080",
            "127.0.0.1:8080",
            "http://127.0.0.1",
            "http://:80",
            "http://h:0",
            "http://h:80/api",
            "http://fd00::1:80",
            "http://",
        ] {
            let e = parse_control_url(bad).expect_err(bad);
            assert!(e.to_string().contains("expected http://HOST:PORT"), "{e}");
        }
        let https = parse_control_url("https://h:1").unwrap();
        let e = Conn::new(https, None).err().unwrap();
        assert!(e.to_string().contains("expected --tls-dir"), "{e}");
        let http = parse_control_url("http://h:1").unwrap();
        assert!(Conn::new(http, Some("/tmp".into())).is_err());
    }

    #[test]
    fn snapshot_decodes_the_contract_shape() {
        let s: Snapshot = serde_json::from_value(serde_json::json!({
            "server": {"uuid": "s"},
            "seq": 12,
            "portolan": null,
            "vms": [{
                "uuid": "v", "alias": null, "owner_uuid": "o", "server_uuid": "s",
                "brand": "joyent-minimal", "state": "provisioning", "desired_state": "running",
                "state_reason": null, "tags": {"a": 1}, "firewall_enabled": false,
                "create_timestamp": "2024-01-01T00:00:00.000Z",
                "nics": [{"interface": "net0", "mac": "90:b8:d0:00:00:01", "ip": "10.0.0.5",
                          "netmask": "255.255.255.0", "gateway": "10.0.0.1", "mtu": 1400,
                          "vlan_id": 0, "nic_tag": "sdc_overlay/5", "network_uuid": "n",
                          "primary": true, "vnet_id": 5}]
            }],
            "firewall": {"vms": [], "rules": []}
        }))
        .unwrap();
        assert_eq!(s.seq, 12);
        assert_eq!(s.vms[0].nics[0].vnet_id, Some(5));
        assert_eq!(s.vms[0].nics[0].gateway.as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn reports_serialize_without_empty_reason() {
        let r = StateReport::vm("v".into(), VmState::Running, None);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"uuid":"v","state":"running"}"#
        );
    }

    #[test]
    fn long_bodies_are_truncated_on_a_char_boundary() {
        let s = "é".repeat(400);
        let t = body_text(s.as_bytes());
        assert!(t.len() <= 515 && t.ends_with('…'), "{}", t.len());
    }

    /// The canned control plane: fabric's own serving layer (HTTP/1.1 + h2c) on loopback,
    /// answering by path; its counters say how many connections it accepted.
    async fn canned() -> (String, Arc<crate::http::Stats>) {
        use axum::extract::{Path, RawQuery};
        use axum::response::IntoResponse;
        use axum::routing::{get, post};
        let json = |status: StatusCode, body: &'static str| {
            (
                status,
                [(hyper::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        };
        let router = axum::Router::new()
            .route(
                "/changes",
                get(move |RawQuery(q): RawQuery| async move {
                    let q = q.unwrap_or_default();
                    if q.starts_with("since=1&") {
                        json(StatusCode::GONE, r#"{"code":"Gone","message":"changes after 1 are no longer kept"}"#)
                    } else if q.starts_with("since=9&") {
                        // A long-poll: nothing happens for a while.
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        json(StatusCode::OK, r#"{"changes":[],"next":9,"oldest":1}"#)
                    } else {
                        json(StatusCode::OK, r#"{"changes":[{"seq":8,"kind":"vm","uuid":"v","action":"create","owner_uuid":"o","servers":["s"],"time":"t"}],"next":8,"oldest":1}"#)
                    }
                }),
            )
            .route(
                "/servers/{uuid}/desired",
                get(move || async move { json(StatusCode::OK, r#"{"seq": "not a number"}"#) }),
            )
            .route(
                "/servers/{uuid}/heartbeat",
                post(move |Path(u): Path<String>| async move {
                    if u == "s" {
                        StatusCode::NO_CONTENT.into_response()
                    } else {
                        json(StatusCode::NOT_FOUND, r#"{"code":"ResourceNotFound","message":"server x not found"}"#)
                    }
                }),
            )
            .route(
                "/echo",
                post(move |body: axum::body::Body| async move {
                    // Streams the request body back as it comes.
                    axum::response::Response::new(body)
                }),
            )
            .route(
                "/servers/{uuid}/vm_states",
                post(move |body: Bytes| async move {
                    assert!(String::from_utf8_lossy(&body).contains(r#""state":"failed""#));
                    json(StatusCode::OK, r#"{"updated":1,"ignored":[]}"#)
                }),
            );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = crate::http::Server::new(crate::http::Limits::default());
        let stats = server.stats();
        tokio::spawn(server.serve(l, router, std::future::pending()));
        (addr, stats)
    }

    fn conn(addr: &str) -> Conn {
        Conn::new(parse_control_url(&format!("http://{addr}")).unwrap(), None).unwrap()
    }

    #[tokio::test]
    async fn calls_share_one_connection_and_errors_are_typed() {
        let (addr, stats) = canned().await;
        let c0 = conn(&addr);
        let api = Api::new(c0.clone(), "s");
        api.heartbeat().await.unwrap();
        let c = api.changes(5, Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            (c.next, c.changes.len(), c.changes[0].kind.as_str()),
            (8, 1, "vm")
        );
        match api.changes(1, Duration::from_secs(1)).await {
            Err(ApiError::Gone(m)) => assert!(m.contains("no longer kept"), "{m}"),
            other => panic!("{other:?}"),
        }
        match api.snapshot().await {
            Err(ApiError::BadJson { what, .. }) => assert!(what.contains("/desired"), "{what}"),
            other => panic!("{other:?}"),
        }
        let rep = [StateReport::vm(
            "v".into(),
            VmState::Failed,
            Some("no".into()),
        )];
        assert_eq!(api.report(&rep).await.unwrap().updated, 1);
        // Another server's client on the same connection.
        let other = Api::new(c0.clone(), "x");
        match other.heartbeat().await {
            Err(ApiError::Status {
                status: 404, body, ..
            }) => assert!(body.contains("not found")),
            r => panic!("{r:?}"),
        }
        // A long-poll and heartbeats at the same time: the heartbeats do not wait for it.
        let poll = {
            let api = api.clone();
            tokio::spawn(async move { api.changes(9, Duration::from_secs(1)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = std::time::Instant::now();
        for _ in 0..3 {
            api.heartbeat().await.unwrap();
        }
        assert!(
            !poll.is_finished(),
            "heartbeats answered while the poll waits"
        );
        println!("3 heartbeats beside a long-poll: {:?}", t0.elapsed());
        assert_eq!(poll.await.unwrap().unwrap().next, 9);
        assert_eq!(c0.connections_made(), 1);
        assert_eq!(
            stats.accepted.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "one HTTP/2 connection for every call"
        );
    }

    #[tokio::test]
    async fn streamed_bodies_flow_both_ways_and_errors_stay_typed() {
        let (addr, _) = canned().await;
        let c = conn(&addr);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let resp = c
            .request(Method::POST, "/echo", channel_body(rx), CALL_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        // Each chunk comes back before the next is sent: the body really streams.
        for i in 0..5u8 {
            tx.send(Bytes::from(vec![i; 3])).await.unwrap();
            let f = tokio::time::timeout(CALL_TIMEOUT, body.frame())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(f.into_data().unwrap(), Bytes::from(vec![i; 3]));
        }
        drop(tx);
        let rest = body.collect().await.unwrap().to_bytes();
        assert!(rest.is_empty(), "ends when the sender is dropped: {rest:?}");
        let api = Api::new(c, "s");
        assert_eq!(api.server(), "s");
        let b = api.get_stream("/servers/s/desired").await.unwrap();
        assert!(b
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .starts_with(b"{\"seq\""));
        match api.get_stream("/nothing").await {
            Err(ApiError::Status {
                status: 404, what, ..
            }) => {
                assert_eq!(what, "GET /nothing")
            }
            r => panic!("{:?}", r.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn a_closed_connection_is_made_again() {
        let (addr, stats) = canned().await;
        let c = conn(&addr);
        let api = Api::new(c.clone(), "s");
        api.heartbeat().await.unwrap();
        // The connection goes away (as when the server restarts or closes it while idle).
        c.inner.current.lock().await.take();
        api.heartbeat().await.unwrap();
        assert_eq!(c.connections_made(), 2);
        assert_eq!(stats.accepted.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let api = Api::new(conn(&format!("127.0.0.1:{port}")), "s");
        let e = api.heartbeat().await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("unreachable"), "{e}");
    }
}
