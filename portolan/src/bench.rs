//! Load generator: VL3 lookups over `connections` TCP connections, each keeping `depth`
//! requests outstanding, against a running server. Reports throughput and latency percentiles.
//!
//! Each connection uses request ids `0..depth` as slots: a slot's next request goes out as soon
//! as its reply arrives, and all requests made ready by one read go out in one write. Latency is
//! measured per request from just before its write to just after the read holding its reply,
//! so it includes queueing in both directions.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::svp::{
    decode_frame, to_wire_ip, Decoded, Frame, Message, RequestId, Status, Vl3Req,
    DEFAULT_MAX_PAYLOAD, VL3_TYPE_IP, VL3_TYPE_IPV6,
};

/// Bench settings.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Server to load.
    pub server: SocketAddr,
    /// Connections.
    pub connections: usize,
    /// Outstanding requests per connection.
    pub depth: usize,
    /// Measured duration.
    pub duration: Duration,
    /// Unmeasured warm-up before it.
    pub warmup: Duration,
    /// VNI queried.
    pub vnet_id: u32,
    /// IPs queried, round-robin.
    pub ips: Vec<IpAddr>,
}

/// Bench results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Connections used.
    pub connections: usize,
    /// Depth used.
    pub depth: usize,
    /// Lookups answered in the measured window.
    pub lookups: u64,
    /// Of those, answered NOTFOUND.
    pub not_found: u64,
    /// Of those, answered with another non-OK status.
    pub failed: u64,
    /// Measured seconds.
    pub seconds: f64,
    /// Lookups per second.
    pub per_second: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Slowest, µs.
    pub max_us: f64,
}

/// Why a bench run failed.
#[derive(Debug, Error)]
pub enum BenchError {
    /// Connecting, reading or writing failed.
    #[error("bench connection to {server}: {source}")]
    Io {
        /// The server.
        server: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The server sent something other than a VL3_ACK for a live slot.
    #[error("bench got an unexpected reply: {0}")]
    Protocol(String),
    /// Nonsense settings.
    #[error("invalid bench settings: {0}")]
    Config(String),
}

struct ConnResult {
    latencies_ns: Vec<u64>,
    not_found: u64,
    failed: u64,
}

/// Runs the bench.
pub async fn run(cfg: BenchConfig) -> Result<BenchReport, BenchError> {
    if cfg.ips.is_empty() || cfg.connections == 0 || cfg.depth == 0 {
        return Err(BenchError::Config(
            "need at least one IP, one connection and depth 1".into(),
        ));
    }
    let start = Instant::now();
    let measure_from = start + cfg.warmup;
    let end = measure_from + cfg.duration;
    let mut tasks = Vec::new();
    for c in 0..cfg.connections {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            drive(&cfg, c, measure_from, end).await
        }));
    }
    let mut lat = Vec::new();
    let (mut not_found, mut failed) = (0, 0);
    for t in tasks {
        let r = t
            .await
            .map_err(|e| BenchError::Protocol(format!("bench task failed: {e}")))??;
        lat.extend(r.latencies_ns);
        not_found += r.not_found;
        failed += r.failed;
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i.min(lat.len() - 1)] as f64 / 1000.0
    };
    let seconds = cfg.duration.as_secs_f64();
    Ok(BenchReport {
        connections: cfg.connections,
        depth: cfg.depth,
        lookups: lat.len() as u64,
        not_found,
        failed,
        seconds,
        per_second: lat.len() as f64 / seconds,
        p50_us: pct(0.50),
        p90_us: pct(0.90),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        max_us: pct(1.0),
    })
}

async fn drive(
    cfg: &BenchConfig,
    conn_index: usize,
    measure_from: Instant,
    end: Instant,
) -> Result<ConnResult, BenchError> {
    let io = |source| BenchError::Io {
        server: cfg.server,
        source,
    };
    let mut sock = TcpStream::connect(cfg.server).await.map_err(io)?;
    sock.set_nodelay(true).map_err(io)?;
    let depth = cfg.depth;
    let mut sent_at = vec![None::<Instant>; depth];
    let mut next_ip = conn_index * 7919;
    let mut out = Vec::with_capacity(depth * 40);
    let mut request = |slot: usize, out: &mut Vec<u8>| {
        let ip = cfg.ips[next_ip % cfg.ips.len()];
        next_ip = next_ip.wrapping_add(1);
        let l3_type = if ip.is_ipv4() {
            VL3_TYPE_IP
        } else {
            VL3_TYPE_IPV6
        };
        Frame::new(
            RequestId::from_u32(u32::try_from(slot).unwrap_or(u32::MAX)),
            Message::Vl3Req(Vl3Req {
                ip: to_wire_ip(ip),
                l3_type,
                vnet_id: cfg.vnet_id,
            }),
        )
        .encode(out);
    };
    let now = Instant::now();
    for (slot, at) in sent_at.iter_mut().enumerate() {
        request(slot, &mut out);
        *at = Some(now);
    }
    sock.write_all(&out).await.map_err(io)?;
    let mut outstanding = depth;
    let mut res = ConnResult {
        latencies_ns: Vec::with_capacity(1 << 20),
        not_found: 0,
        failed: 0,
    };
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while outstanding > 0 {
        let n = sock.read_buf(&mut buf).await.map_err(io)?;
        if n == 0 {
            return Err(BenchError::Protocol("server closed the connection".into()));
        }
        let now = Instant::now();
        let sending = now < end;
        out.clear();
        loop {
            match decode_frame(&buf, DEFAULT_MAX_PAYLOAD) {
                Ok(Decoded::Complete { frame, len }) => {
                    let _ = buf.split_to(len);
                    let slot = frame.id.as_u32() as usize;
                    let Some(at) = sent_at.get_mut(slot).and_then(Option::take) else {
                        return Err(BenchError::Protocol(format!(
                            "reply for id {slot}, which has no request outstanding"
                        )));
                    };
                    let Message::Vl3Ack(ack) = frame.message else {
                        return Err(BenchError::Protocol(format!(
                            "{} where a VL3_ACK was expected",
                            frame.message.op()
                        )));
                    };
                    outstanding -= 1;
                    if at >= measure_from && now <= end {
                        res.latencies_ns
                            .push(u64::try_from((now - at).as_nanos()).unwrap_or(u64::MAX));
                        match ack.status {
                            Status::OK => {}
                            Status::NOT_FOUND => res.not_found += 1,
                            _ => res.failed += 1,
                        }
                    }
                    if sending {
                        request(slot, &mut out);
                        sent_at[slot] = Some(Instant::now());
                        outstanding += 1;
                    }
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(e) => return Err(BenchError::Protocol(e.to_string())),
            }
        }
        if !out.is_empty() {
            sock.write_all(&out).await.map_err(io)?;
        }
    }
    Ok(res)
}
