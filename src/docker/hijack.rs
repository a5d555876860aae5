//! Docker's streamed process I/O over a tunnel sub-stream: the stdcopy framing, the hijacked
//! connection (`Upgrade: tcp` → `HTTP/1.1 101 UPGRADED`, then raw bytes both ways) and the
//! plain streaming answer used without an upgrade.
//!
//! Output frames from the agent become the client's bytes: with a tty raw, otherwise each
//! chunk behind moby's 8-byte stdcopy header `[stream, 0, 0, 0, length u32 BE]` (1 stdout, 2
//! stderr). Client bytes become `Stdin` frames; the client's half-close becomes `StdinEof`.
//! An `Error` frame is shown to the client on stderr (its text, as the daemon would log it)
//! and ends the stream. `Started` and `Exit` are handed to an observer (exec records).

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::control::tunnel::body::ChannelBody;
use crate::control::tunnel::proto::{Frame, MAX_FRAME};
use crate::control::tunnel::Substream;

/// The content type of a raw (or stdcopy-framed) stream, API 1.41.
pub const RAW_STREAM: &str = "application/vnd.docker.raw-stream";

/// stdcopy stream numbers.
pub const STDOUT: u8 = 1;
/// stdcopy stream number of stderr.
pub const STDERR: u8 = 2;

/// Appends `data` as stdcopy frames of stream `stream` (split below 4 GiB, never in fact).
pub fn stdcopy(stream: u8, data: &[u8], out: &mut Vec<u8>) {
    for c in data.chunks(u32::MAX as usize) {
        out.extend_from_slice(&[stream, 0, 0, 0]);
        out.extend_from_slice(&(c.len() as u32).to_be_bytes());
        out.extend_from_slice(c);
    }
}

/// What an observer of a stream's control frames sees.
pub type Observer = Box<dyn FnMut(&Frame) + Send>;

/// The client's bytes of one agent frame: `Some(bytes)` to write, `None` to end the stream
/// (exit or error written already).
fn client_bytes(f: &Frame, tty: bool) -> (Option<Vec<u8>>, bool) {
    let data = |stream: u8, d: &[u8]| {
        if tty {
            d.to_vec()
        } else {
            let mut v = Vec::with_capacity(d.len() + 8);
            stdcopy(stream, d, &mut v);
            v
        }
    };
    match f {
        Frame::Stdout(d) => (Some(data(STDOUT, d)), false),
        Frame::Stderr(d) => (Some(data(STDERR, d)), false),
        Frame::Error(m) => (Some(data(STDERR, format!("Error: {m}\n").as_bytes())), true),
        Frame::Exit { .. } => (None, true),
        _ => (None, false),
    }
}

/// A 101 answer that hands the connection to [`pipe`]: exactly `HTTP/1.1 101 UPGRADED` with
/// moby's headers. `None` when the request cannot be upgraded (HTTP/2, or no upgrade asked).
pub fn upgrade(
    extensions: &axum::http::Extensions,
    headers: &axum::http::HeaderMap,
    sub: Substream,
    tty: bool,
    stdin: bool,
    observer: Observer,
) -> Result<Response<Body>, (Substream, Observer)> {
    let asked = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("tcp"));
    let Some(on) = extensions
        .get::<hyper::upgrade::OnUpgrade>()
        .filter(|_| asked)
        .cloned()
    else {
        return Err((sub, observer));
    };
    tokio::spawn(async move {
        match on.await {
            Ok(up) => pipe(TokioIo::new(up), sub, tty, stdin, observer).await,
            Err(e) => tracing::debug!(error = %e, "Docker hijack: the upgrade failed"),
        }
    });
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(RAW_STREAM));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
    r.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(b"UPGRADED"));
    Ok(r)
}

/// Pipes a hijacked connection and a sub-stream until the output ends: agent output to the
/// client, client bytes to stdin (with `stdin`), the client's half-close as `StdinEof`.
pub async fn pipe<IO>(io: IO, sub: Substream, tty: bool, stdin: bool, mut observer: Observer)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let Substream { input, mut output } = sub;
    let (mut rd, mut wr) = tokio::io::split(io);
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    if stdin {
                        let _ = input.send(Frame::StdinEof).await;
                    }
                    // Keep the sub-stream open (the output may go on) until it ends.
                    input.closed().await;
                    return;
                }
                Ok(n) => {
                    if !stdin {
                        continue;
                    }
                    let chunk = buf[..n.min(MAX_FRAME)].to_vec();
                    if input.send(Frame::Stdin(chunk)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    while let Some(f) = output.recv().await {
        observer(&f);
        let (bytes, end) = client_bytes(&f, tty);
        if let Some(b) = bytes {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        if end {
            break;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
    drop(output);
    up.abort();
}

/// A plain 200 streaming answer of the sub-stream's output (logs, attach without upgrade,
/// exec start without upgrade): stdcopy-framed unless `tty`. Without stdin, the sub-stream's
/// input is held until the output ends.
pub fn streaming(sub: Substream, tty: bool, mut observer: Observer) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let Substream { input, mut output } = sub;
        while let Some(f) = output.recv().await {
            observer(&f);
            let (bytes, end) = client_bytes(&f, tty);
            if let Some(b) = bytes {
                if tx.send(Bytes::from(b)).await.is_err() {
                    break;
                }
            }
            if end {
                break;
            }
        }
        drop(input);
    });
    let mut r = Response::new(Body::new(ChannelBody::new(rx)));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(RAW_STREAM));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdcopy_headers_carry_stream_and_length() {
        let mut out = Vec::new();
        stdcopy(STDOUT, b"hi\n", &mut out);
        stdcopy(STDERR, &[7u8; 300], &mut out);
        assert_eq!(&out[..11], &[1, 0, 0, 0, 0, 0, 0, 3, b'h', b'i', b'\n']);
        assert_eq!(&out[11..19], &[2, 0, 0, 0, 0, 0, 1, 44]);
        assert_eq!(out.len(), 11 + 8 + 300);
    }

    #[test]
    fn frames_become_client_bytes() {
        assert_eq!(
            client_bytes(&Frame::Stdout(b"x".to_vec()), true),
            (Some(b"x".to_vec()), false)
        );
        assert_eq!(
            client_bytes(&Frame::Stderr(b"x".to_vec()), false),
            (Some(vec![2, 0, 0, 0, 0, 0, 0, 1, b'x']), false)
        );
        let (b, end) = client_bytes(&Frame::Error("no such process".into()), false);
        assert!(end);
        let b = b.unwrap();
        assert_eq!(b[0], STDERR);
        assert_eq!(&b[8..], b"Error: no such process\n");
        assert_eq!(client_bytes(&Frame::Exit { code: 3 }, false), (None, true));
        assert_eq!(
            client_bytes(&Frame::Started { pid: None }, false),
            (None, false)
        );
    }

    /// Through fabric's serving layer on loopback, as the docker CLI sees it: the exact 101
    /// status line and headers, then the raw stream both ways; without `Upgrade` a 200 stream.
    #[tokio::test]
    async fn the_served_upgrade_is_moby_s_101_and_then_raw_bytes() {
        use axum::extract::Request;
        let router = axum::Router::new().route(
            "/attach",
            axum::routing::post(move |req: Request| {
                async move {
                    let (input, to_agent) = mpsc::channel(4);
                    let (from_agent, output) = mpsc::channel(4);
                    // The fake agent: echoes stdin as stdout, exits 0 at stdin EOF.
                    tokio::spawn(async move {
                        let mut to_agent = to_agent;
                        while let Some(f) = to_agent.recv().await {
                            match f {
                                Frame::Stdin(d) => {
                                    let _ = from_agent.send(Frame::Stdout(d)).await;
                                }
                                Frame::StdinEof => break,
                                _ => {}
                            }
                        }
                        let _ = from_agent.send(Frame::Exit { code: 0 }).await;
                    });
                    let sub = Substream { input, output };
                    match upgrade(
                        req.extensions(),
                        req.headers(),
                        sub,
                        true,
                        true,
                        Box::new(|_| {}),
                    ) {
                        Ok(r) => r,
                        Err((sub, obs)) => streaming(sub, true, obs),
                    }
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = crate::http::Server::new(crate::http::Limits::default());
        tokio::spawn(server.serve(l, router, std::future::pending()));

        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"POST /attach HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(c.read(&mut b).await.unwrap(), 1, "head: {head:?}");
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101 upgraded\r\n"), "{head}");
        for h in [
            "content-type: application/vnd.docker.raw-stream",
            "connection: upgrade",
            "upgrade: tcp",
        ] {
            assert!(head.contains(h), "{h} in {head}");
        }
        c.write_all(b"hello\n").await.unwrap();
        let mut got = [0u8; 6];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello\n");
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), c.read_to_end(&mut rest))
            .await
            .expect("the server ends the stream after the exit")
            .unwrap();
        assert!(rest.is_empty(), "{rest:?}");

        // No upgrade asked: a plain 200 stream (ends with the exit after the body is read).
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"POST /attach HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut b = [0u8; 12];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"HTTP/1.1 200");
    }

    #[tokio::test]
    async fn a_hijacked_pipe_carries_both_ways_and_half_close_is_stdin_eof() {
        let (input, mut to_agent) = mpsc::channel(4);
        let (from_agent, output) = mpsc::channel(4);
        let (client, server) = tokio::io::duplex(1024);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let task = tokio::spawn(pipe(
            server,
            Substream { input, output },
            false,
            true,
            Box::new(move |f| s2.lock().unwrap().push(f.clone())),
        ));
        let (mut crd, mut cwr) = tokio::io::split(client);
        cwr.write_all(b"ls\n").await.unwrap();
        assert_eq!(to_agent.recv().await, Some(Frame::Stdin(b"ls\n".to_vec())));
        cwr.shutdown().await.unwrap();
        assert_eq!(to_agent.recv().await, Some(Frame::StdinEof));
        from_agent
            .send(Frame::Started { pid: Some(9) })
            .await
            .unwrap();
        from_agent.send(Frame::Stdout(b"a".to_vec())).await.unwrap();
        from_agent.send(Frame::Exit { code: 2 }).await.unwrap();
        let mut got = Vec::new();
        crd.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, vec![1, 0, 0, 0, 0, 0, 0, 1, b'a']);
        task.await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                Frame::Started { pid: Some(9) },
                Frame::Stdout(b"a".to_vec()),
                Frame::Exit { code: 2 }
            ]
        );
        // The sub-stream's input is dropped once the output ended.
        assert_eq!(to_agent.recv().await, None);
    }
}
