//! The tunnel's wire protocol (DESIGN "Agents never listen"): what the control plane asks an
//! agent to open, and the frames both directions carry.
//!
//! The agent keeps `GET /servers/:own/tunnel` open on its one HTTP/2 connection; the response
//! body is a stream of [`OpenRequest`]s, one JSON object per line (an empty line now and then
//! keeps it alive). For each, the agent makes `POST /servers/:own/tunnel/:id` on the same
//! connection: its request body carries the agent → control frames (output, exit, errors), the
//! response body the control → agent frames (stdin, resize, stdin EOF). Each sub-stream is its
//! own HTTP/2 stream, so HTTP/2's per-stream flow control keeps a slow `docker logs -f` reader
//! from holding up anyone else.
//!
//! A frame is `[kind: u8][length: u32 big-endian][payload]`, at most [`MAX_FRAME`] bytes of
//! payload.

use serde::{Deserialize, Serialize};

/// Largest frame payload.
pub const MAX_FRAME: usize = 1 << 20;
/// Frame header length.
pub const HEADER: usize = 5;

/// What the control plane asks of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// The sub-stream's id (a random UUID): the `:id` of the agent's `POST .../tunnel/:id`.
    pub id: String,
    /// The VM (container) it concerns; it must be on the agent's host.
    pub vm: String,
    /// What to do.
    pub op: StreamOp,
}

/// The kinds of sub-stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StreamOp {
    /// Attach to the container's process: live output from now (and the log first when
    /// `logs`), stdin forwarded when `stdin`.
    Attach {
        /// Forward stdin frames to the process.
        stdin: bool,
        /// Send stdout.
        stdout: bool,
        /// Send stderr.
        stderr: bool,
        /// Replay the captured log first.
        logs: bool,
    },
    /// The captured log.
    Logs {
        /// Keep sending new output until the container stops (or the stream is closed).
        follow: bool,
        /// Only the last N lines (`None`: all).
        tail: Option<u64>,
        /// Only output at or after this time (unix ns).
        since_ns: Option<i64>,
        /// Only output before this time (unix ns).
        until_ns: Option<i64>,
        /// Prefix each line with its RFC 3339 nano time, as `docker logs -t`.
        timestamps: bool,
        /// Send stdout.
        stdout: bool,
        /// Send stderr.
        stderr: bool,
    },
    /// Run a process in the running container (`docker exec`).
    Exec {
        /// argv.
        cmd: Vec<String>,
        /// Extra `K=V`.
        env: Vec<String>,
        /// Numeric `uid[:gid]`; empty: the container's user.
        user: String,
        /// Working directory; empty: the container's.
        working_dir: String,
        /// Allocate a pseudo-terminal.
        tty: bool,
        /// Forward stdin.
        stdin: bool,
    },
    /// Resize the container's terminal.
    Resize {
        /// Rows.
        height: u16,
        /// Columns.
        width: u16,
    },
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// control → agent: bytes for the process's stdin.
    Stdin(Vec<u8>),
    /// control → agent: stdin is closed.
    StdinEof,
    /// control → agent: the terminal of this stream's process is now `height` × `width`.
    Resize {
        /// Rows.
        height: u16,
        /// Columns.
        width: u16,
    },
    /// agent → control: process output (all of it when the process has a tty).
    Stdout(Vec<u8>),
    /// agent → control: process error output.
    Stderr(Vec<u8>),
    /// agent → control: the sub-stream is set up (exec: the process started, with its pid).
    Started {
        /// The process id on the host (exec), if any.
        pid: Option<u32>,
    },
    /// agent → control: the process ended with this code (exec), or the log ended.
    Exit {
        /// Exit code (128 + signal for a signalled process).
        code: i32,
    },
    /// agent → control: the sub-stream failed; the text says why, for the user.
    Error(String),
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The kind byte is not one of ours.
    #[error("unknown tunnel frame kind {0}")]
    UnknownKind(u8),
    /// The declared length is above [`MAX_FRAME`].
    #[error("tunnel frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLong(usize),
    /// A fixed-size payload has the wrong size or a text payload is not UTF-8.
    #[error("malformed tunnel frame of kind {0}")]
    Malformed(u8),
}

const K_STDIN: u8 = 0;
const K_STDOUT: u8 = 1;
const K_STDERR: u8 = 2;
const K_STDIN_EOF: u8 = 3;
const K_RESIZE: u8 = 4;
const K_STARTED: u8 = 5;
const K_EXIT: u8 = 6;
const K_ERROR: u8 = 7;

impl Frame {
    /// Appends the frame's bytes to `out`. Data frames longer than [`MAX_FRAME`] must be split
    /// by the caller ([`Frame::chunks`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Frame::Stdin(b) => (K_STDIN, b.as_slice().into()),
            Frame::Stdout(b) => (K_STDOUT, b.as_slice().into()),
            Frame::Stderr(b) => (K_STDERR, b.as_slice().into()),
            Frame::StdinEof => (K_STDIN_EOF, Vec::new().into()),
            Frame::Resize { height, width } => {
                let mut v = height.to_be_bytes().to_vec();
                v.extend_from_slice(&width.to_be_bytes());
                (K_RESIZE, v.into())
            }
            Frame::Started { pid } => (
                K_STARTED,
                pid.map(|p| p.to_be_bytes().to_vec())
                    .unwrap_or_default()
                    .into(),
            ),
            Frame::Exit { code } => (K_EXIT, code.to_be_bytes().to_vec().into()),
            Frame::Error(s) => (K_ERROR, s.as_bytes().into()),
        };
        debug_assert!(payload.len() <= MAX_FRAME);
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
    }

    /// Splits output or input bytes into frames of at most [`MAX_FRAME`] bytes.
    pub fn chunks(make: fn(Vec<u8>) -> Frame, data: &[u8]) -> impl Iterator<Item = Frame> + '_ {
        data.chunks(MAX_FRAME).map(move |c| make(c.to_vec()))
    }

    /// Decodes one frame from the front of `buf`: `Ok(Some((frame, consumed)))`, `Ok(None)`
    /// when more bytes are needed, or the error (the stream is then unusable).
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let kind = buf[0];
        if kind > K_ERROR {
            return Err(FrameError::UnknownKind(kind));
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLong(len));
        }
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        let p = &buf[HEADER..HEADER + len];
        let bad = || FrameError::Malformed(kind);
        let f = match kind {
            K_STDIN => Frame::Stdin(p.to_vec()),
            K_STDOUT => Frame::Stdout(p.to_vec()),
            K_STDERR => Frame::Stderr(p.to_vec()),
            K_STDIN_EOF if p.is_empty() => Frame::StdinEof,
            K_RESIZE if p.len() == 4 => Frame::Resize {
                height: u16::from_be_bytes([p[0], p[1]]),
                width: u16::from_be_bytes([p[2], p[3]]),
            },
            K_STARTED if p.is_empty() => Frame::Started { pid: None },
            K_STARTED if p.len() == 4 => Frame::Started {
                pid: Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]])),
            },
            K_EXIT if p.len() == 4 => Frame::Exit {
                code: i32::from_be_bytes([p[0], p[1], p[2], p[3]]),
            },
            K_ERROR => Frame::Error(String::from_utf8(p.to_vec()).map_err(|_| bad())?),
            _ => return Err(bad()),
        };
        Ok(Some((f, HEADER + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Stdin(b"ls\n".to_vec()),
            Frame::StdinEof,
            Frame::Resize {
                height: 24,
                width: 80,
            },
            Frame::Stdout(b"hi\n".to_vec()),
            Frame::Stderr(Vec::new()),
            Frame::Started { pid: Some(42) },
            Frame::Started { pid: None },
            Frame::Exit { code: -1 },
            Frame::Error("no such container".into()),
        ]
    }

    #[test]
    fn every_kind_round_trips_back_to_back() {
        let mut buf = Vec::new();
        for f in frames() {
            f.encode(&mut buf);
        }
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((f, n)) = Frame::decode(&buf[at..]).unwrap() {
            got.push(f);
            at += n;
        }
        assert_eq!(got, frames());
        assert_eq!(at, buf.len());
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(
            Frame::decode(&[9, 0, 0, 0, 0]),
            Err(FrameError::UnknownKind(9))
        );
        assert_eq!(
            Frame::decode(&[1, 0xff, 0, 0, 0]),
            Err(FrameError::TooLong(0xff00_0000))
        );
        assert_eq!(
            Frame::decode(&[K_EXIT, 0, 0, 0, 1, 7]),
            Err(FrameError::Malformed(K_EXIT))
        );
        assert_eq!(
            Frame::decode(&[K_ERROR, 0, 0, 0, 1, 0xff]),
            Err(FrameError::Malformed(K_ERROR))
        );
        assert_eq!(Frame::decode(&[K_STDOUT, 0, 0, 0, 2, b'a']), Ok(None));
    }

    #[test]
    fn open_requests_have_a_stable_json_shape() {
        let r = OpenRequest {
            id: "i".into(),
            vm: "v".into(),
            op: StreamOp::Resize {
                height: 1,
                width: 2,
            },
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":"i","vm":"v","op":{"kind":"resize","height":1,"width":2}}"#
        );
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some((f, n))) = Frame::decode(&b) {
                let mut out = Vec::new();
                f.encode(&mut out);
                prop_assert_eq!(&out[..], &b[..n]);
            }
        }
    }
}
