//! SVP v1 codec, sans I/O: the 16-byte header, every v1 message, and a frame decoder.
//!
//! Byte layout follows `shared/specs/svp.md` (illumos `libvarpd_svp_prot.h`, final v1):
//! big-endian integers, a 16-byte header `{ver u16, op u16, size u32, id [4], crc32 u32}` where
//! `size` counts the payload only, and a zlib CRC-32 over the header (CRC field zeroed) plus the
//! payload. The request id is four opaque bytes, echoed verbatim.
//!
//! [`decode_frame`] looks at the front of a byte buffer and returns one of three things:
//! - `Ok(Decoded::Complete { frame, len })`: one whole, valid frame of `len` bytes;
//! - `Ok(Decoded::Incomplete { needed })`: the bytes so far are a valid prefix, and at least
//!   `needed` bytes in total must be buffered before trying again;
//! - `Err(FrameError)`: the bytes can never become a valid frame (bad version, unknown or
//!   unsupported op, a size that is oversized or wrong for the op, bad CRC, bad payload). A
//!   server closes the connection on these.
//!
//! Header checks (version, op, size) happen as soon as 16 bytes are present, so an oversized
//! size field is rejected without waiting for (or buffering) its payload.
//!
//! BULK_REQ/BULK_ACK, SHOOTDOWN and the v2 ROUTE messages are recognised and rejected with
//! [`FrameError::Unsupported`]; op 0 and ops above 0x0F with [`FrameError::UnknownOp`].
//!
//! Under `cfg(fuzzing)` the CRC check is skipped so a fuzzer reaches the payload parsers.

mod types;

use std::net::Ipv6Addr;

use thiserror::Error;

pub use types::{
    from_wire_ip, to_wire_ip, LogId, Mac, ParseIdError, ParseMacError, RequestId, Status,
};

/// The only protocol version this codec speaks.
pub const VERSION: u16 = 1;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 16;
/// Default cap on a frame's payload size. The largest legitimate v1 request is a LOG_RM; the
/// illumos client sends at most 63 ids (1012 bytes), so 64 KiB leaves a wide margin while
/// bounding what one connection can make us buffer.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 * 1024;
/// The illumos client reads a LOG_ACK into a 1024-byte buffer: a server keeps the whole
/// LOG_ACK payload (status + records) at or below this, and at or below the request's count.
pub const LOG_ACK_MAX_PAYLOAD: usize = 1024;

/// VL3 address type: IPv4 (sent IPv4-mapped).
pub const VL3_TYPE_IP: u32 = 1;
/// VL3 address type: IPv6.
pub const VL3_TYPE_IPV6: u32 = 2;
/// Log record type: VL2 (invalidate a MAC).
pub const LOG_TYPE_VL2: u32 = 1;
/// Log record type: VL3 (re-resolve an IP).
pub const LOG_TYPE_VL3: u32 = 2;
/// Log record type: route (SVP v2 only; never valid in v1).
pub const LOG_TYPE_ROUTE: u32 = 3;

/// Size of a VL2 log record.
pub const LOG_VL2_LEN: usize = 32;
/// Size of a VL3 log record.
pub const LOG_VL3_LEN: usize = 44;

/// The op codes of SVP v1 (and the v2 route ops, which are only recognised).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Op {
    /// SVP_R_UNKNOWN (0): never valid.
    Unknown = 0x00,
    /// SVP_R_PING.
    Ping = 0x01,
    /// SVP_R_PONG.
    Pong = 0x02,
    /// SVP_R_VL2_REQ.
    Vl2Req = 0x03,
    /// SVP_R_VL2_ACK.
    Vl2Ack = 0x04,
    /// SVP_R_VL3_REQ.
    Vl3Req = 0x05,
    /// SVP_R_VL3_ACK.
    Vl3Ack = 0x06,
    /// SVP_R_BULK_REQ (unsupported).
    BulkReq = 0x07,
    /// SVP_R_BULK_ACK (unsupported).
    BulkAck = 0x08,
    /// SVP_R_LOG_REQ.
    LogReq = 0x09,
    /// SVP_R_LOG_ACK.
    LogAck = 0x0A,
    /// SVP_R_LOG_RM.
    LogRm = 0x0B,
    /// SVP_R_LOG_RM_ACK.
    LogRmAck = 0x0C,
    /// SVP_R_SHOOTDOWN (unsupported).
    Shootdown = 0x0D,
    /// SVP_R_ROUTE_REQ (v2 only, unsupported).
    RouteReq = 0x0E,
    /// SVP_R_ROUTE_ACK (v2 only, unsupported).
    RouteAck = 0x0F,
}

impl Op {
    /// The op for a wire value, if it is one SVP defines.
    pub fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            0x00 => Op::Unknown,
            0x01 => Op::Ping,
            0x02 => Op::Pong,
            0x03 => Op::Vl2Req,
            0x04 => Op::Vl2Ack,
            0x05 => Op::Vl3Req,
            0x06 => Op::Vl3Ack,
            0x07 => Op::BulkReq,
            0x08 => Op::BulkAck,
            0x09 => Op::LogReq,
            0x0A => Op::LogAck,
            0x0B => Op::LogRm,
            0x0C => Op::LogRmAck,
            0x0D => Op::Shootdown,
            0x0E => Op::RouteReq,
            0x0F => Op::RouteAck,
            _ => return None,
        })
    }

    /// Whether a v1 peer may send this op (BULK, SHOOTDOWN, ROUTE and 0 are not).
    pub fn is_supported(self) -> bool {
        !matches!(
            self,
            Op::Unknown | Op::BulkReq | Op::BulkAck | Op::Shootdown | Op::RouteReq | Op::RouteAck
        )
    }

    /// The exact payload size for fixed-size ops; `None` for LOG_ACK and LOG_RM (variable).
    fn fixed_payload_len(self) -> Option<usize> {
        match self {
            Op::Ping | Op::Pong => Some(0),
            Op::Vl2Req => Some(12),
            Op::Vl2Ack => Some(20),
            Op::Vl3Req => Some(24),
            Op::Vl3Ack => Some(28),
            Op::BulkReq => Some(4),
            Op::LogReq => Some(20),
            Op::LogRmAck => Some(4),
            Op::Shootdown => Some(12),
            Op::RouteReq => Some(40),
            Op::RouteAck => Some(48),
            Op::Unknown | Op::BulkAck | Op::LogAck | Op::LogRm => None,
        }
    }

    /// The C name, for messages and logs.
    pub fn name(self) -> &'static str {
        match self {
            Op::Unknown => "SVP_R_UNKNOWN",
            Op::Ping => "SVP_R_PING",
            Op::Pong => "SVP_R_PONG",
            Op::Vl2Req => "SVP_R_VL2_REQ",
            Op::Vl2Ack => "SVP_R_VL2_ACK",
            Op::Vl3Req => "SVP_R_VL3_REQ",
            Op::Vl3Ack => "SVP_R_VL3_ACK",
            Op::BulkReq => "SVP_R_BULK_REQ",
            Op::BulkAck => "SVP_R_BULK_ACK",
            Op::LogReq => "SVP_R_LOG_REQ",
            Op::LogAck => "SVP_R_LOG_ACK",
            Op::LogRm => "SVP_R_LOG_RM",
            Op::LogRmAck => "SVP_R_LOG_RM_ACK",
            Op::Shootdown => "SVP_R_SHOOTDOWN",
            Op::RouteReq => "SVP_R_ROUTE_REQ",
            Op::RouteAck => "SVP_R_ROUTE_ACK",
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:#04x})", self.name(), *self as u16)
    }
}

/// The 16-byte frame header as it is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// `svp_ver`.
    pub version: u16,
    /// `svp_op` (raw; may be a value SVP does not define).
    pub op: u16,
    /// `svp_size`: payload length, excluding the header.
    pub size: u32,
    /// `svp_id`: opaque.
    pub id: RequestId,
    /// `svp_crc32`.
    pub crc: u32,
}

impl Header {
    /// Reads a header from the first 16 bytes of `b`; `None` if there are fewer.
    pub fn parse(b: &[u8]) -> Option<Header> {
        let h: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Header {
            version: u16::from_be_bytes([h[0], h[1]]),
            op: u16::from_be_bytes([h[2], h[3]]),
            size: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            id: RequestId([h[8], h[9], h[10], h[11]]),
            crc: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
        })
    }
}

/// VL2_REQ: where is this MAC on this virtual network?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vl2Req {
    /// The MAC looked up.
    pub mac: Mac,
    /// The virtual network (VNI).
    pub vnet_id: u32,
}

/// VL2_ACK: the underlay address for a MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vl2Ack {
    /// OK, NOTFOUND or FATAL. On the wire this field is 16 bits; codes above 0xffff are sent
    /// as 0xffff.
    pub status: Status,
    /// Underlay UDP port.
    pub port: u16,
    /// Underlay IP (IPv4 mapped).
    pub addr: Ipv6Addr,
}

/// VL3_REQ: who has this IP on this virtual network?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vl3Req {
    /// The IP looked up (IPv4 mapped).
    pub ip: Ipv6Addr,
    /// `sl3r_type`: 1 = IPv4, 2 = IPv6. Servers ignore it (illumos sends 2 for mapped IPv4).
    pub l3_type: u32,
    /// The virtual network (VNI).
    pub vnet_id: u32,
}

/// VL3_ACK: the MAC owning an IP, and that MAC's underlay address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vl3Ack {
    /// OK, NOTFOUND or FATAL.
    pub status: Status,
    /// The VL2 address owning the IP.
    pub mac: Mac,
    /// Underlay UDP port.
    pub port: u16,
    /// Underlay IP (IPv4 mapped).
    pub addr: Ipv6Addr,
}

/// LOG_REQ: give me up to `count` bytes of my event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogReq {
    /// How many bytes the client can take.
    pub count: u32,
    /// The requesting host's underlay IP (identifies whose log).
    pub ip: Ipv6Addr,
}

/// One record of a LOG_ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogRecord {
    /// Forget this MAC (type 1, 32 bytes).
    Vl2 {
        /// Record id, to be passed back in LOG_RM.
        id: LogId,
        /// The MAC to invalidate.
        mac: Mac,
        /// Its virtual network.
        vnet_id: u32,
    },
    /// Re-resolve this IP (type 2, 44 bytes).
    Vl3 {
        /// Record id, to be passed back in LOG_RM.
        id: LogId,
        /// The IP (IPv4 mapped).
        ip: Ipv6Addr,
        /// The VLAN for the gratuitous ARP.
        vlan: u16,
        /// Its virtual network.
        vnet_id: u32,
    },
}

impl LogRecord {
    /// The record's id.
    pub fn id(&self) -> LogId {
        match self {
            LogRecord::Vl2 { id, .. } | LogRecord::Vl3 { id, .. } => *id,
        }
    }
    /// Bytes this record takes on the wire.
    pub fn wire_len(&self) -> usize {
        match self {
            LogRecord::Vl2 { .. } => LOG_VL2_LEN,
            LogRecord::Vl3 { .. } => LOG_VL3_LEN,
        }
    }
}

/// LOG_ACK: status then records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogAck {
    /// OK or FATAL.
    pub status: Status,
    /// Records, oldest first.
    pub records: Vec<LogRecord>,
}

/// Every supported v1 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// SVP_R_PING.
    Ping,
    /// SVP_R_PONG.
    Pong,
    /// SVP_R_VL2_REQ.
    Vl2Req(Vl2Req),
    /// SVP_R_VL2_ACK.
    Vl2Ack(Vl2Ack),
    /// SVP_R_VL3_REQ.
    Vl3Req(Vl3Req),
    /// SVP_R_VL3_ACK.
    Vl3Ack(Vl3Ack),
    /// SVP_R_LOG_REQ.
    LogReq(LogReq),
    /// SVP_R_LOG_ACK.
    LogAck(LogAck),
    /// SVP_R_LOG_RM with the ids to delete.
    LogRm(Vec<LogId>),
    /// SVP_R_LOG_RM_ACK.
    LogRmAck(Status),
}

impl Message {
    /// The op this message is sent with.
    pub fn op(&self) -> Op {
        match self {
            Message::Ping => Op::Ping,
            Message::Pong => Op::Pong,
            Message::Vl2Req(_) => Op::Vl2Req,
            Message::Vl2Ack(_) => Op::Vl2Ack,
            Message::Vl3Req(_) => Op::Vl3Req,
            Message::Vl3Ack(_) => Op::Vl3Ack,
            Message::LogReq(_) => Op::LogReq,
            Message::LogAck(_) => Op::LogAck,
            Message::LogRm(_) => Op::LogRm,
            Message::LogRmAck(_) => Op::LogRmAck,
        }
    }

    /// Payload size in bytes.
    pub fn payload_len(&self) -> usize {
        match self {
            Message::LogAck(a) => 4 + a.records.iter().map(LogRecord::wire_len).sum::<usize>(),
            Message::LogRm(ids) => 4 + 16 * ids.len(),
            m => m.op().fixed_payload_len().unwrap_or(0),
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Message::Ping | Message::Pong => {}
            Message::Vl2Req(r) => {
                out.extend_from_slice(&r.mac.0);
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&r.vnet_id.to_be_bytes());
            }
            Message::Vl2Ack(a) => {
                let status = u16::try_from(a.status.0).unwrap_or(u16::MAX);
                out.extend_from_slice(&status.to_be_bytes());
                out.extend_from_slice(&a.port.to_be_bytes());
                out.extend_from_slice(&a.addr.octets());
            }
            Message::Vl3Req(r) => {
                out.extend_from_slice(&r.ip.octets());
                out.extend_from_slice(&r.l3_type.to_be_bytes());
                out.extend_from_slice(&r.vnet_id.to_be_bytes());
            }
            Message::Vl3Ack(a) => {
                out.extend_from_slice(&a.status.0.to_be_bytes());
                out.extend_from_slice(&a.mac.0);
                out.extend_from_slice(&a.port.to_be_bytes());
                out.extend_from_slice(&a.addr.octets());
            }
            Message::LogReq(r) => {
                out.extend_from_slice(&r.count.to_be_bytes());
                out.extend_from_slice(&r.ip.octets());
            }
            Message::LogAck(a) => {
                out.extend_from_slice(&a.status.0.to_be_bytes());
                for rec in &a.records {
                    match rec {
                        LogRecord::Vl2 { id, mac, vnet_id } => {
                            out.extend_from_slice(&LOG_TYPE_VL2.to_be_bytes());
                            out.extend_from_slice(&id.0);
                            out.extend_from_slice(&mac.0);
                            out.extend_from_slice(&[0, 0]);
                            out.extend_from_slice(&vnet_id.to_be_bytes());
                        }
                        LogRecord::Vl3 {
                            id,
                            ip,
                            vlan,
                            vnet_id,
                        } => {
                            out.extend_from_slice(&LOG_TYPE_VL3.to_be_bytes());
                            out.extend_from_slice(&id.0);
                            out.extend_from_slice(&ip.octets());
                            out.extend_from_slice(&[0, 0]);
                            out.extend_from_slice(&vlan.to_be_bytes());
                            out.extend_from_slice(&vnet_id.to_be_bytes());
                        }
                    }
                }
            }
            Message::LogRm(ids) => {
                // The count of ids always fits: a frame's size field is 32 bits and every id
                // takes 16 bytes, so a frame with more than u32::MAX ids cannot be sent anyway.
                let n = u32::try_from(ids.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&n.to_be_bytes());
                for id in ids {
                    out.extend_from_slice(&id.0);
                }
            }
            Message::LogRmAck(s) => out.extend_from_slice(&s.0.to_be_bytes()),
        }
    }
}

/// A whole frame: the request id and the message. The version is always [`VERSION`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The opaque request id.
    pub id: RequestId,
    /// The message.
    pub message: Message,
}

impl Frame {
    /// A frame.
    pub fn new(id: RequestId, message: Message) -> Frame {
        Frame { id, message }
    }

    /// Bytes the encoded frame takes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.message.payload_len()
    }

    /// Appends the encoded frame (header with CRC, then payload) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let size = self.message.payload_len();
        out.reserve(HEADER_LEN + size);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&(self.message.op() as u16).to_be_bytes());
        out.extend_from_slice(&u32::try_from(size).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&[0; 4]);
        self.message.encode_payload(out);
        debug_assert_eq!(out.len() - start, HEADER_LEN + size);
        let crc = crc32fast::hash(&out[start..]);
        out[start + 12..start + 16].copy_from_slice(&crc.to_be_bytes());
    }

    /// The encoded frame as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }
}

/// The CRC-32 of a frame: zlib CRC over the header with bytes 12..16 zeroed, then the payload.
pub fn frame_crc(header: &[u8; HEADER_LEN], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..12]);
    h.update(&[0; 4]);
    h.update(payload);
    h.finalize()
}

/// What [`decode_frame`] found at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole valid frame, `len` bytes long (header + payload).
    Complete {
        /// The frame.
        frame: Frame,
        /// How many bytes to consume.
        len: usize,
    },
    /// A valid prefix: buffer at least `needed` bytes in total and call again.
    Incomplete {
        /// Total bytes needed before the next attempt can make progress.
        needed: usize,
    },
}

/// Bytes that can never become a valid v1 frame. Every variant says what was found and what
/// was expected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// `svp_ver` is not 1.
    #[error("unsupported SVP version {found}: expected {VERSION}")]
    BadVersion {
        /// The version in the header.
        found: u16,
    },
    /// An op code SVP does not define (0 or above 0x0F).
    #[error("unknown SVP op {0:#06x}: expected one of 0x01..=0x0c")]
    UnknownOp(u16),
    /// A defined op this implementation does not handle (BULK, SHOOTDOWN, ROUTE).
    #[error("{0} is not supported by SVP v1 peers: expected PING, VL2, VL3 or LOG messages")]
    Unsupported(Op),
    /// `svp_size` above the configured cap.
    #[error("frame payload size {size} exceeds the limit of {max} bytes")]
    Oversized {
        /// The size field.
        size: u32,
        /// The cap.
        max: u32,
    },
    /// A fixed-size op whose size field is wrong.
    #[error("{op} with payload size {size}: expected exactly {expected} bytes")]
    BadSize {
        /// The op.
        op: Op,
        /// The size field.
        size: u32,
        /// The op's payload size.
        expected: usize,
    },
    /// The CRC in the header does not match the frame.
    #[error("CRC mismatch: header says {header:#010x}, frame computes to {computed:#010x}")]
    BadCrc {
        /// CRC from the header.
        header: u32,
        /// CRC computed over the frame.
        computed: u32,
    },
    /// LOG_RM whose id count disagrees with its size.
    #[error(
        "SVP_R_LOG_RM says {count} ids but carries {size} payload bytes: expected 4 + 16 x count"
    )]
    BadLogRmCount {
        /// The count field.
        count: u32,
        /// The payload size.
        size: u32,
    },
    /// LOG_ACK shorter than its 4-byte status.
    #[error("SVP_R_LOG_ACK payload of {size} bytes: expected at least 4 (the status)")]
    ShortLogAck {
        /// The payload size.
        size: u32,
    },
    /// A LOG_ACK record with a type v1 does not define.
    #[error("log record at payload offset {offset} has type {found}: expected 1 (VL2) or 2 (VL3)")]
    BadLogRecordType {
        /// Offset of the record within the payload.
        offset: usize,
        /// Its type.
        found: u32,
    },
    /// A LOG_ACK record cut short by the end of the payload.
    #[error("log record at payload offset {offset} is truncated: {available} bytes left, expected {expected}")]
    TruncatedLogRecord {
        /// Offset of the record within the payload.
        offset: usize,
        /// Bytes left.
        available: usize,
        /// Bytes the record needs.
        expected: usize,
    },
}

/// Decodes one frame from the front of `buf`, refusing payloads above `max_payload` bytes.
/// See the module docs for the three outcomes. Never panics, whatever `buf` holds.
pub fn decode_frame(buf: &[u8], max_payload: u32) -> Result<Decoded, FrameError> {
    let Some(header) = Header::parse(buf) else {
        return Ok(Decoded::Incomplete { needed: HEADER_LEN });
    };
    let op = check_header(&header, max_payload)?;
    // `size <= max_payload <= u32::MAX`, so this fits a usize on every platform we build for.
    let size = header.size as usize;
    let total = HEADER_LEN + size;
    let Some(frame_bytes) = buf.get(..total) else {
        return Ok(Decoded::Incomplete { needed: total });
    };
    let (head, payload) = frame_bytes.split_at(HEADER_LEN);
    let computed = frame_crc(head.try_into().unwrap_or(&[0; HEADER_LEN]), payload);
    if computed != header.crc && !cfg!(fuzzing) {
        return Err(FrameError::BadCrc {
            header: header.crc,
            computed,
        });
    }
    let message = decode_payload(op, payload)?;
    Ok(Decoded::Complete {
        frame: Frame {
            id: header.id,
            message,
        },
        len: total,
    })
}

/// Checks what can be checked from the header alone; returns the op.
pub fn check_header(header: &Header, max_payload: u32) -> Result<Op, FrameError> {
    if header.version != VERSION {
        return Err(FrameError::BadVersion {
            found: header.version,
        });
    }
    let op = match Op::from_u16(header.op) {
        Some(Op::Unknown) | None => return Err(FrameError::UnknownOp(header.op)),
        Some(op) if !op.is_supported() => return Err(FrameError::Unsupported(op)),
        Some(op) => op,
    };
    if let Some(expected) = op.fixed_payload_len() {
        if header.size as usize != expected {
            return Err(FrameError::BadSize {
                op,
                size: header.size,
                expected,
            });
        }
    }
    if header.size > max_payload {
        return Err(FrameError::Oversized {
            size: header.size,
            max: max_payload,
        });
    }
    Ok(op)
}

/// A tiny big-endian reader over a slice whose length the caller has already checked; reads
/// past the end yield zeros instead of panicking (they cannot happen for checked lengths).
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, pos: 0 }
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(s) = self.b.get(self.pos..self.pos + N) {
            out.copy_from_slice(s);
        }
        self.pos += N;
        out
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }
    fn ip(&mut self) -> Ipv6Addr {
        Ipv6Addr::from(self.array::<16>())
    }
    fn mac(&mut self) -> Mac {
        Mac(self.array())
    }
    fn remaining(&self) -> usize {
        self.b.len().saturating_sub(self.pos)
    }
}

fn decode_payload(op: Op, p: &[u8]) -> Result<Message, FrameError> {
    let mut r = Reader::new(p);
    Ok(match op {
        Op::Ping => Message::Ping,
        Op::Pong => Message::Pong,
        Op::Vl2Req => {
            let mac = r.mac();
            let _pad = r.u16();
            Message::Vl2Req(Vl2Req {
                mac,
                vnet_id: r.u32(),
            })
        }
        Op::Vl2Ack => Message::Vl2Ack(Vl2Ack {
            status: Status(u32::from(r.u16())),
            port: r.u16(),
            addr: r.ip(),
        }),
        Op::Vl3Req => Message::Vl3Req(Vl3Req {
            ip: r.ip(),
            l3_type: r.u32(),
            vnet_id: r.u32(),
        }),
        Op::Vl3Ack => Message::Vl3Ack(Vl3Ack {
            status: Status(r.u32()),
            mac: r.mac(),
            port: r.u16(),
            addr: r.ip(),
        }),
        Op::LogReq => Message::LogReq(LogReq {
            count: r.u32(),
            ip: r.ip(),
        }),
        Op::LogRmAck => Message::LogRmAck(Status(r.u32())),
        Op::LogRm => {
            let size = u32::try_from(p.len()).unwrap_or(u32::MAX);
            if p.len() < 4 {
                return Err(FrameError::BadLogRmCount { count: 0, size });
            }
            let count = r.u32();
            if !(p.len() - 4).is_multiple_of(16) || ((p.len() - 4) / 16) as u64 != u64::from(count)
            {
                return Err(FrameError::BadLogRmCount { count, size });
            }
            let ids = (0..count).map(|_| LogId(r.array())).collect();
            Message::LogRm(ids)
        }
        Op::LogAck => {
            if p.len() < 4 {
                return Err(FrameError::ShortLogAck {
                    size: u32::try_from(p.len()).unwrap_or(u32::MAX),
                });
            }
            let status = Status(r.u32());
            let mut records = Vec::new();
            while r.remaining() > 0 {
                let offset = r.pos;
                let available = r.remaining();
                if available < 4 {
                    return Err(FrameError::TruncatedLogRecord {
                        offset,
                        available,
                        expected: 4,
                    });
                }
                let ty = r.u32();
                let expected = match ty {
                    LOG_TYPE_VL2 => LOG_VL2_LEN,
                    LOG_TYPE_VL3 => LOG_VL3_LEN,
                    found => return Err(FrameError::BadLogRecordType { offset, found }),
                };
                if available < expected {
                    return Err(FrameError::TruncatedLogRecord {
                        offset,
                        available,
                        expected,
                    });
                }
                let id = LogId(r.array());
                records.push(if ty == LOG_TYPE_VL2 {
                    let mac = r.mac();
                    let _pad = r.u16();
                    LogRecord::Vl2 {
                        id,
                        mac,
                        vnet_id: r.u32(),
                    }
                } else {
                    let ip = r.ip();
                    let _pad = r.u16();
                    LogRecord::Vl3 {
                        id,
                        ip,
                        vlan: r.u16(),
                        vnet_id: r.u32(),
                    }
                });
            }
            Message::LogAck(LogAck { status, records })
        }
        Op::Unknown | Op::BulkReq | Op::BulkAck | Op::Shootdown | Op::RouteReq | Op::RouteAck => {
            return Err(FrameError::Unsupported(op))
        }
    })
}

#[cfg(test)]
mod tests;
