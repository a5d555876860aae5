//! A minimal HTTP/1.1 JSON client over one keep-alive connection, for the bench and the tests
//! (requests to our own service on loopback; responses framed by `Content-Length`).

use std::net::SocketAddr;

use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

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
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One keep-alive connection.
pub struct HttpClient {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl HttpClient {
    /// A client for `addr` (connects lazily).
    pub fn new(addr: SocketAddr) -> HttpClient {
        HttpClient { addr, conn: None }
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
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| ClientError::Protocol("no connection".into()))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.addr);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut out = req.into_bytes();
        out.extend_from_slice(body);
        conn.get_mut().write_all(&out).await?;
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
