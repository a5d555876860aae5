//! The agent's side of the tunnel (DESIGN "Agents never listen"): it keeps `GET
//! /servers/:own/tunnel` open on its one connection to the control plane and, for each
//! [`OpenRequest`] that arrives, makes `POST /servers/:own/tunnel/:id` on the same connection:
//! the request body carries the [`Handler`]'s frames (agent → control), the answer's body the
//! control plane's (stdin, stdin EOF, resize), each its own HTTP/2 stream. Both directions go
//! through bounded channels and are read only as fast as they are taken, so a slow consumer
//! holds back only its own sub-stream (HTTP/2 flow control), never the tunnel or the others.
//!
//! What a [`Handler`] can rely on: `input` ends without `StdinEof` when the control side
//! went away (the Docker client left); a send on `output` fails when nobody reads the
//! sub-stream any more; and its future is dropped (aborted) when the tunnel it came from
//! ends, so it must clean up on drop (e.g. an exec's process).
//!
//! The tunnel is made again (with the agent's [`Backoff`]) whenever it ends: the control plane
//! restarted, the connection broke, nothing (not even a keep-alive line) came for
//! [`SILENCE`], or a newer tunnel of this server replaced it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::Method;

use super::api::{Api, ApiError, ReqBody, CALL_TIMEOUT};
use super::{Backoff, BACKOFF_MAX};
use crate::control::tunnel::body::Frames as FramesBody;
use crate::control::tunnel::proto::{Frame, OpenRequest};
use crate::control::tunnel::{FRAMES_BUFFERED, KEEPALIVE};

/// The frames a [`Handler`] sends: agent → control.
pub type Frames = tokio::sync::mpsc::Sender<Frame>;
/// The frames a [`Handler`] receives: control → agent (Stdin, StdinEof, Resize).
pub type Input = tokio::sync::mpsc::Receiver<Frame>;

/// Serves the sub-streams the control plane opens (proc's runtime implements it).
pub trait Handler: Send + Sync + 'static {
    /// Serves one sub-stream until done; sends Started/Exit/Error frames as the op requires.
    fn serve(
        &self,
        req: OpenRequest,
        input: Input,
        output: Frames,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// With no byte on the tunnel for this long (keep-alive lines come every [`KEEPALIVE`]), it
/// is taken for dead and made again.
pub const SILENCE: Duration = Duration::from_secs(KEEPALIVE.as_secs() * 3);

/// Keeps `GET /servers/:own/tunnel` open, reconnecting with backoff, and serves each open
/// request with `handler`. Runs until the task is dropped.
pub async fn run(api: Api, handler: Arc<dyn Handler>) {
    let mut backoff = Backoff::default();
    let mut failures: u64 = 0;
    loop {
        let began = Instant::now();
        match tunnel_once(&api, &handler).await {
            Ok(()) => {
                failures = 0;
                tracing::info!(
                    server = api.server(),
                    "control-plane tunnel ended; opening it again"
                );
            }
            Err(e) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "control-plane tunnel");
                }
            }
        }
        // A tunnel that lasted a while was healthy: start over with short delays.
        if began.elapsed() >= BACKOFF_MAX {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Why a tunnel ended (other than the control plane closing it).
#[derive(Debug, thiserror::Error)]
enum TunnelEnd {
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("tunnel read failed: {0}")]
    Read(String),
    #[error("no byte on the tunnel for {0:?}")]
    Silent(Duration),
    #[error("tunnel line is not an open request: {0}")]
    BadLine(String),
}

/// One tunnel, until it ends.
async fn tunnel_once(api: &Api, handler: &Arc<dyn Handler>) -> Result<(), TunnelEnd> {
    let path = format!("/servers/{}/tunnel", api.server());
    let mut body = api.get_stream(&path).await?;
    tracing::info!(server = api.server(), "control-plane tunnel open");
    let mut buf: Vec<u8> = Vec::new();
    // The sub-streams of this tunnel end with it (the control plane stopped or the
    // connection is gone): their handlers are dropped, so nothing waits on a dead peer.
    let mut subs = Substreams(Vec::new());
    loop {
        let frame = match tokio::time::timeout(SILENCE, body.frame()).await {
            Err(_) => return Err(TunnelEnd::Silent(SILENCE)),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(TunnelEnd::Read(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = &line[..nl];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let req: OpenRequest = serde_json::from_slice(line).map_err(|e| {
                TunnelEnd::BadLine(format!("{e}: {}", String::from_utf8_lossy(line)))
            })?;
            subs.0.retain(|h| !h.is_finished());
            subs.0
                .push(tokio::spawn(substream(api.clone(), handler.clone(), req)).abort_handle());
        }
        // One open request is a few hundred bytes: a line this long is not one.
        if buf.len() > 1 << 20 {
            return Err(TunnelEnd::BadLine(format!(
                "{} bytes without a newline",
                buf.len()
            )));
        }
    }
}

/// Aborts the sub-streams of a tunnel when it ends.
struct Substreams(Vec<tokio::task::AbortHandle>);

impl Drop for Substreams {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Aborts the handler's task if the sub-stream is dropped before it ended.
struct Serving(Option<tokio::task::JoinHandle<()>>);

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// One sub-stream: the handler's frames go up as the POST's body, the answer's frames come
/// down into the handler's input.
async fn substream(api: Api, handler: Arc<dyn Handler>, req: OpenRequest) {
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(FRAMES_BUFFERED);
    let (in_tx, in_rx) = tokio::sync::mpsc::channel(FRAMES_BUFFERED);
    let path = format!("/servers/{}/tunnel/{}", api.server(), req.id);
    let id = req.id.clone();
    let serve: Pin<Box<dyn Future<Output = ()> + Send>> = handler.serve(req, in_rx, out_tx);
    let mut serving = Serving(Some(tokio::spawn(serve)));
    let body: ReqBody = FramesBody::new(out_rx).boxed();
    let resp = match api
        .conn()
        .request(Method::POST, &path, body, CALL_TIMEOUT)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            // The handler sees its input closed and its output refused, and ends.
            tracing::warn!(error = %e, stream = %id, "cannot answer the control plane's stream");
            return;
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        tracing::warn!(stream = %id, %status, body = %String::from_utf8_lossy(&text), "control plane refused the stream");
        return;
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    'read: loop {
        let data: Bytes = match body.frame().await {
            None | Some(Err(_)) => break,
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        buf.extend_from_slice(&data);
        let mut at = 0;
        loop {
            match Frame::decode(&buf[at..]) {
                Ok(Some((f, n))) => {
                    at += n;
                    if in_tx.send(f).await.is_err() {
                        // The handler no longer reads its input.
                        break 'read;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, stream = %id, "control plane sent bytes that are not frames");
                    break 'read;
                }
            }
        }
        buf.drain(..at);
    }
    drop(in_tx);
    // The request body (the handler's output) goes on until the handler ends.
    if let Some(h) = serving.0.take() {
        let _ = h.await;
    }
}
