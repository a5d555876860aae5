//! A minimal HTTP/1.1 JSON client over one keep-alive connection, for the bench, the tests and
//! the CLIs (requests to our own service; responses framed by `Content-Length`): plain TCP,
//! TLS (`https`, with the caller's rustls configuration: the cluster CA and an operator or host
//! certificate), or a unix socket (the head's `DIR/control.sock`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// Client failures.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Socket error.
    #[error("HTTP connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server's reply is not HTTP/1.1 as expected.
    #[error("bad HTTP response: {0}")]
    Protocol(String),
}

/// A response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Raw body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as JSON (`Null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// A refusal's message: the restify body's `message`, else the body as text.
    pub fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string())
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A byte stream a request runs over.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Where the requests go.
#[derive(Clone)]
enum Target {
    Tcp(SocketAddr),
    Tls {
        addr: SocketAddr,
        name: rustls::pki_types::ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
    },
    Unix(PathBuf),
}

/// One keep-alive connection (made again after a failure).
pub struct HttpClient {
    target: Target,
    conn: Option<BufReader<Box<dyn Stream>>>,
}

impl HttpClient {
    /// A client for `addr`, plain HTTP (connects lazily).
    pub fn new(addr: SocketAddr) -> HttpClient {
        HttpClient {
            target: Target::Tcp(addr),
            conn: None,
        }
    }

    /// A client for `https://addr`, verifying the server as `server_name` with `config`
    /// (e.g. [`crate::pki::tls::client_config`]: the cluster CA, an operator's certificate).
    /// It speaks HTTP/1.1 whatever ALPN `config` offers.
    pub fn https(
        addr: SocketAddr,
        server_name: rustls::pki_types::ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
    ) -> HttpClient {
        let mut c = (*config).clone();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        HttpClient {
            target: Target::Tls {
                addr,
                name: server_name,
                config: Arc::new(c),
            },
            conn: None,
        }
    }

    /// A client for the HTTP service on the unix socket `path`.
    pub fn unix(path: impl Into<PathBuf>) -> HttpClient {
        HttpClient {
            target: Target::Unix(path.into()),
            conn: None,
        }
    }

    async fn connect(target: &Target) -> Result<Box<dyn Stream>, ClientError> {
        Ok(match target {
            Target::Tcp(addr) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Target::Tls { addr, name, config } => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), s)
                    .await?;
                Box::new(tls)
            }
            Target::Unix(path) => Box::new(UnixStream::connect(path).await?),
        })
    }

    /// The `host` header: the address, or `localhost` over a unix socket.
    fn host(&self) -> String {
        match &self.target {
            Target::Tcp(a) | Target::Tls { addr: a, .. } => a.to_string(),
            Target::Unix(_) => "localhost".into(),
        }
    }

    /// Sends a request with an optional JSON body.
    pub async fn json(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<HttpResponse, ClientError> {
        let b = body.map(|v| v.to_string()).unwrap_or_default();
        let ct = if body.is_some() {
            Some("application/json")
        } else {
            None
        };
        self.request(method, path, ct, b.as_bytes()).await
    }

    /// Sends a request with a raw body and content type.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<HttpResponse, ClientError> {
        let ct: Vec<(&str, &str)> = content_type
            .map(|c| ("content-type", c))
            .into_iter()
            .collect();
        self.request_with(method, path, &ct, body).await
    }

    /// Sends a request with extra headers (`content-type`, `if-match`, ...) and a raw body.
    pub async fn request_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<HttpResponse, ClientError> {
        match self.try_request(method, path, headers, body).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    async fn try_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<HttpResponse, ClientError> {
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(Self::connect(&self.target).await?));
        }
        let host = self.host();
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| ClientError::Protocol("no connection".into()))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut out = req.into_bytes();
        out.extend_from_slice(body);
        conn.get_mut().write_all(&out).await?;
        conn.get_mut().flush().await?;
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Err(ClientError::Protocol(
                "connection closed before the status line".into(),
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Protocol(format!("status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            conn.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; if method == "HEAD" { 0 } else { len }];
        conn.read_exact(&mut body).await?;
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}
