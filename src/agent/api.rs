//! The agent's control-plane client: its snapshot (`GET /servers/:own/desired`), the change
//! feed (`GET /changes`, long-polled), state reports and heartbeats.
//!
//! Plain HTTP/1.1 on hyper's client connection, one keep-alive connection per [`Conn`]: the
//! agent holds one for its calls and one for the long-poll, so a waiting poll never delays a
//! heartbeat. A connection that failed is dropped and made again on the next call; a call on a
//! reused connection that fails before any answer (the server closed it while idle) is tried
//! once more on a fresh one. Every failure is typed: unreachable, HTTP status with the body,
//! `410 Gone` for a feed position no longer kept, or a body that is not the JSON expected.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::firewall::compile::FirewallState;

/// How long an ordinary call may take (connect, send, whole answer).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How much longer than the long-poll's own `timeout` the agent waits for its answer.
pub const POLL_GRACE: Duration = Duration::from_secs(10);

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
    #[error("control URL {0:?}: expected http://HOST:PORT (TLS comes with cluster security)")]
    BadUrl(String),
}

impl ApiError {
    /// Whether the control plane could not be reached at all (as opposed to answering).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ApiError::Unreachable { .. })
    }
}

/// `http://HOST:PORT[/]` → `HOST:PORT`.
pub fn parse_control_url(url: &str) -> Result<String, ApiError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ApiError::BadUrl(url.to_owned()))?;
    let rest = rest.trim_end_matches('/');
    let ok = !rest.is_empty()
        && !rest.contains('/')
        && rest
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(rest.to_owned())
    } else {
        Err(ApiError::BadUrl(url.to_owned()))
    }
}

/// One keep-alive HTTP/1.1 connection to the control plane.
pub struct Conn {
    addr: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    /// A connection to `addr` (`HOST:PORT`), made on first use.
    pub fn new(addr: &str) -> Conn {
        Conn {
            addr: addr.to_owned(),
            sender: None,
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).ok();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "control-plane connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends one request and reads the whole answer within `timeout`.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let what = format!("{method} {path}");
        let addr = self.addr.clone();
        let unreachable = |detail: String| ApiError::Unreachable {
            addr: addr.clone(),
            what: what.clone(),
            detail,
        };
        let reused = self.sender.as_ref().is_some_and(|s| !s.is_closed());
        let r = tokio::time::timeout(timeout, self.try_call(&method, path, body.clone())).await;
        let r = match r {
            Ok(Err(e)) if reused => {
                // A keep-alive connection the server closed while idle: once more, fresh.
                tracing::debug!(error = %e, "retrying on a fresh connection");
                self.sender = None;
                tokio::time::timeout(timeout, self.try_call(&method, path, body)).await
            }
            r => r,
        };
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.sender = None;
                Err(unreachable(e))
            }
            Err(_) => {
                self.sender = None;
                Err(unreachable(format!("no answer within {timeout:?}")))
            }
        }
    }

    async fn try_call(
        &mut self,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(self.connect().await?);
        }
        let sender = self.sender.as_mut().ok_or("no connection")?;
        sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, &self.addr);
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
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

/// The agent's view of the control plane: its server UUID and a connection.
pub struct Api {
    server: String,
    conn: Conn,
}

impl Api {
    /// A client for `addr` (`HOST:PORT`) acting for server `server_uuid`.
    pub fn new(addr: &str, server_uuid: &str) -> Api {
        Api {
            server: server_uuid.to_owned(),
            conn: Conn::new(addr),
        }
    }

    async fn json<T: DeserializeOwned>(
        &mut self,
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
    pub async fn snapshot(&mut self) -> Result<Snapshot, ApiError> {
        let path = format!("/servers/{}/desired", self.server);
        self.json(Method::GET, &path, None, CALL_TIMEOUT).await
    }

    /// The changes after `since` that concern this server, waiting up to `wait` for one.
    pub async fn changes(&mut self, since: u64, wait: Duration) -> Result<Changes, ApiError> {
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
    pub async fn report(&mut self, vms: &[StateReport]) -> Result<ReportAnswer, ApiError> {
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

    /// Tells the control plane this server is alive.
    pub async fn heartbeat(&mut self) -> Result<(), ApiError> {
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
        assert_eq!(
            parse_control_url("http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(parse_control_url("http://h1:80/").unwrap(), "h1:80");
        for bad in [
            "https://127.0.0.1:8080",
            "127.0.0.1:8080",
            "http://127.0.0.1",
            "http://:80",
            "http://h:0",
            "http://h:80/api",
            "http://",
        ] {
            let e = parse_control_url(bad).expect_err(bad);
            assert!(e.to_string().contains("expected http://HOST:PORT"), "{e}");
        }
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
        let r = StateReport {
            uuid: "v".into(),
            state: VmState::Running,
            reason: None,
        };
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

    /// A loopback HTTP/1.1 server answering by path; counts the connections it accepted.
    async fn canned() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns = std::sync::Arc::new(AtomicUsize::new(0));
        let c2 = conns.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                c2.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut r = BufReader::new(s);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            r.read_line(&mut h).await.unwrap();
                            if h.trim().is_empty() {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; len];
                        tokio::io::AsyncReadExt::read_exact(&mut r, &mut body)
                            .await
                            .unwrap();
                        let (status, out) = if path.starts_with("/changes?since=1&") {
                            (
                                "410 Gone",
                                r#"{"code":"Gone","message":"changes after 1 are no longer kept"}"#,
                            )
                        } else if path.starts_with("/changes") {
                            (
                                "200 OK",
                                r#"{"changes":[{"seq":8,"kind":"vm","uuid":"v","action":"create","owner_uuid":"o","servers":["s"],"time":"t"}],"next":8,"oldest":1}"#,
                            )
                        } else if path == "/servers/s/desired" {
                            ("200 OK", r#"{"seq": "not a number"}"#)
                        } else if path == "/servers/s/heartbeat" {
                            ("204 No Content", "")
                        } else if path == "/servers/s/vm_states" {
                            assert!(String::from_utf8_lossy(&body).contains(r#""state":"failed""#));
                            ("200 OK", r#"{"updated":1,"ignored":[]}"#)
                        } else {
                            (
                                "404 Not Found",
                                r#"{"code":"ResourceNotFound","message":"server x not found"}"#,
                            )
                        };
                        let resp = format!(
                            "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n{out}",
                            out.len()
                        );
                        r.get_mut().write_all(resp.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (addr, conns)
    }

    #[tokio::test]
    async fn calls_share_one_connection_and_errors_are_typed() {
        let (addr, conns) = canned().await;
        let mut api = Api::new(&addr, "s");
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
        let rep = [StateReport {
            uuid: "v".into(),
            state: VmState::Failed,
            reason: Some("no".into()),
        }];
        assert_eq!(api.report(&rep).await.unwrap().updated, 1);
        let mut other = Api::new(&addr, "x");
        match other.heartbeat().await {
            Err(ApiError::Status {
                status: 404, body, ..
            }) => assert!(body.contains("not found")),
            r => panic!("{r:?}"),
        }
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "one keep-alive connection per client"
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut api = Api::new(&format!("127.0.0.1:{port}"), "s");
        let e = api.heartbeat().await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("unreachable"), "{e}");
    }
}
