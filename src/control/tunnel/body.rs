//! HTTP bodies of the tunnel: the stream of open requests, a stream of frames, and a body fed
//! from a channel of bytes. Each is read only as fast as the peer takes it (HTTP/2 flow
//! control), so nothing here buffers beyond its bounded channel.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use http_body::{Body as HttpBody, Frame as BodyFrame};
use tokio::sync::mpsc;

use super::proto::{Frame, OpenRequest, MAX_FRAME};
use super::Registration;

type Polled = Poll<Option<Result<BodyFrame<Bytes>, Infallible>>>;

/// The `GET .../tunnel` answer: one JSON line per open request, an empty line at every tick
/// while nothing else is sent; ends when its sender is dropped (replaced tunnel).
pub(crate) struct OpenRequests {
    pub(crate) rx: mpsc::Receiver<OpenRequest>,
    pub(crate) tick: tokio::time::Interval,
    pub(crate) _registration: Registration,
}

impl HttpBody for OpenRequests {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(req)) => {
                // An OpenRequest is strings and numbers: it always serializes.
                let mut line = serde_json::to_vec(&req).unwrap_or_default();
                line.push(b'\n');
                self.tick.reset();
                return Poll::Ready(Some(Ok(BodyFrame::data(Bytes::from(line)))));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        match self.tick.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(Ok(BodyFrame::data(Bytes::from_static(b"\n"))))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Frames from a channel, encoded; data frames longer than [`MAX_FRAME`] are split.
pub struct Frames {
    rx: mpsc::Receiver<Frame>,
}

impl Frames {
    /// The body of the frames `rx` yields; it ends when every sender is dropped.
    pub fn new(rx: mpsc::Receiver<Frame>) -> Frames {
        Frames { rx }
    }
}

/// [`Frames`] that fail (so that HTTP/2 resets the stream, dropping what is still queued for
/// a peer that does not read) when `until` resolves: the service is stopping.
pub struct FramesUntil {
    rx: mpsc::Receiver<Frame>,
    until: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
}

impl FramesUntil {
    /// The body of the frames `rx` yields until `until`.
    pub fn new(
        rx: mpsc::Receiver<Frame>,
        until: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
    ) -> FramesUntil {
        FramesUntil { rx, until }
    }
}

impl HttpBody for FramesUntil {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, std::io::Error>>> {
        if self.until.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(std::io::Error::other(
                "the control plane is stopping",
            ))));
        }
        self.rx
            .poll_recv(cx)
            .map(|f| f.map(|f| Ok(BodyFrame::data(Bytes::from(encode_split(&f))))))
    }
}

/// `frame`'s bytes, data frames split at [`MAX_FRAME`].
pub fn encode_split(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    match frame {
        Frame::Stdin(d) if d.len() > MAX_FRAME => {
            Frame::chunks(Frame::Stdin, d).for_each(|f| f.encode(&mut out))
        }
        Frame::Stdout(d) if d.len() > MAX_FRAME => {
            Frame::chunks(Frame::Stdout, d).for_each(|f| f.encode(&mut out))
        }
        Frame::Stderr(d) if d.len() > MAX_FRAME => {
            Frame::chunks(Frame::Stderr, d).for_each(|f| f.encode(&mut out))
        }
        Frame::Error(m) if m.len() > MAX_FRAME => {
            let mut cut = MAX_FRAME;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            Frame::Error(m[..cut].to_owned()).encode(&mut out)
        }
        f => f.encode(&mut out),
    }
    out
}

impl HttpBody for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        self.rx
            .poll_recv(cx)
            .map(|f| f.map(|f| Ok(BodyFrame::data(Bytes::from(encode_split(&f))))))
    }
}

/// Bytes from a channel, each sent as it comes; ends when every sender is dropped.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    /// The body of what `rx` yields.
    pub fn new(rx: mpsc::Receiver<Bytes>) -> ChannelBody {
        ChannelBody { rx }
    }
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        self.rx
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(BodyFrame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_output_is_split_into_frames_that_decode() {
        let big = vec![7u8; MAX_FRAME * 2 + 3];
        let bytes = encode_split(&Frame::Stdout(big.clone()));
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((f, n)) = Frame::decode(&bytes[at..]).unwrap() {
            match f {
                Frame::Stdout(d) => got.extend(d),
                f => panic!("{f:?}"),
            }
            at += n;
        }
        assert_eq!((at, got), (bytes.len(), big));
        let e = encode_split(&Frame::Error("é".repeat(MAX_FRAME)));
        assert!(matches!(Frame::decode(&e), Ok(Some((Frame::Error(_), _)))));
    }
}
