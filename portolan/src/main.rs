//! The `portolan` command: run the SVP server, load mappings, query a server, benchmark it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use portolan::client::{Client, ClientConfig};
use portolan::server::{Server, ServerConfig, Stats};
use portolan::store::{self, OverlayMapping, UnderlayMapping};
use portolan::svp::{from_wire_ip, LogId, LogRecord, Mac};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ABOUT: &str = "Portolan: the SVP v1 mapping service of a Triton-style overlay network.

Hosts ask Portolan, over SVP (TCP port 1296, byte-compatible with illumos varpd), where a MAC
lives (VL2), who owns an IP (VL3), and what they must forget (their event log). Mappings live
in a store: an SQLite file (sqlite:PATH) or a PostgreSQL database (postgres://...), which any
number of Portolan servers can share.

Try it:
  portolan serve --store sqlite:/tmp/portolan.db &
  portolan import --store sqlite:/tmp/portolan.db mappings.json
  portolan vl3 --ip 10.0.0.1 --vnet 12340";

#[derive(Parser)]
#[command(name = "portolan", version, about = ABOUT, long_about = ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a client subcommand connects, and how it prints.
#[derive(clap::Args, Clone)]
struct ClientArgs {
    /// The SVP server.
    #[arg(long, short = 's', default_value = "127.0.0.1:1296")]
    server: SocketAddr,
    /// Seconds to wait for the reply.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the SVP server over a store (SIGTERM or Ctrl-C stops it gracefully).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:1296")]
        listen: SocketAddr,
        /// Store URL: sqlite:PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE.
        #[arg(long, env = "PORTOLAN_STORE")]
        store: String,
        /// Also serve counters in Prometheus text format over HTTP at this address
        /// (read them with `portolan stats --metrics ADDR`).
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Open connections allowed at once.
        #[arg(long, default_value_t = 4096)]
        max_connections: usize,
        /// Close connections idle for this many seconds (a partial frame is not activity).
        #[arg(long, default_value_t = 300)]
        idle_timeout: u64,
        /// Milliseconds a frame may take to arrive whole once its first byte is in, and a new
        /// connection to send its first whole frame.
        #[arg(long, default_value_t = 5000)]
        frame_timeout_ms: u64,
        /// Open connections allowed from one peer (an IPv4 address or an IPv6 /64).
        #[arg(long, default_value_t = 64)]
        max_connections_per_peer: usize,
        /// Connection slots kept for peers holding fewer than 2 connections (at most a quarter
        /// of --max-connections).
        #[arg(long, default_value_t = 256)]
        reserved_connections: usize,
        /// Bytes of partial frames buffered across all connections; the connection that would
        /// exceed this is closed.
        #[arg(long, default_value_t = 64 << 20)]
        max_buffered_bytes: usize,
        /// Store calls running at once.
        #[arg(long, default_value_t = 8)]
        store_workers: usize,
        /// Runtime worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Load underlay and overlay mappings from a JSON file, in one transaction.
    ///
    /// Shape: {"underlay":[{"cn_uuid":"…","ip":"192.168.1.1","port":4789}],
    ///         "overlay":[{"vnet_id":12340,"ip":"10.0.0.1","mac":"00:0a:95:9d:68:16","cn_uuid":"…"}]}
    /// Unknown fields are errors. Hosts on each VNI get log events for what changed.
    Import {
        /// Store URL: sqlite:PATH or postgres://….
        #[arg(long, env = "PORTOLAN_STORE")]
        store: String,
        /// The JSON file ("-" for standard input).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check that a server answers (PING).
    Ping {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// VL2 lookup: which host (underlay IP and port) has this MAC on this VNI?
    Vl2 {
        /// The MAC, e.g. 00:0a:95:9d:68:16.
        #[arg(long)]
        mac: Mac,
        /// The virtual network id (VNI).
        #[arg(long)]
        vnet: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// VL3 lookup: which MAC owns this IP on this VNI, and on which host?
    Vl3 {
        /// The overlay IP (IPv4 or IPv6).
        #[arg(long)]
        ip: IpAddr,
        /// The virtual network id (VNI).
        #[arg(long)]
        vnet: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Read a host's event log (what it must invalidate), oldest first.
    Log {
        /// The host's underlay IP (identifies whose log).
        #[arg(long)]
        underlay_ip: IpAddr,
        /// Bytes the reply may take (the server also caps it at 1024).
        #[arg(long, default_value_t = 1024)]
        count: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete log entries by id (as printed by `portolan log`).
    LogRm {
        /// Entry ids (UUIDs).
        #[arg(required = true)]
        ids: Vec<LogId>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a running server's counters (needs `serve --metrics ADDR`).
    Stats {
        /// The server's metrics address.
        #[arg(long)]
        metrics: SocketAddr,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark VL3 lookups against a running server.
    ///
    /// With --populate N, first writes N mappings (10.128.0.0 upwards on --vnet, one host)
    /// into --store; then queries them round-robin.
    Bench {
        /// The SVP server.
        #[arg(long, short = 's', default_value = "127.0.0.1:1296")]
        server: SocketAddr,
        /// Connections.
        #[arg(long, short = 'c', default_value_t = 4)]
        connections: usize,
        /// Requests outstanding per connection (pipeline depth).
        #[arg(long, short = 'd', default_value_t = 16)]
        depth: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Warm-up seconds (not measured).
        #[arg(long, default_value_t = 1)]
        warmup: u64,
        /// VNI to query.
        #[arg(long, default_value_t = 4242)]
        vnet: u32,
        /// How many distinct IPs (from 10.128.0.0) to query.
        #[arg(long, default_value_t = 1000)]
        ips: u32,
        /// Write the IPs' mappings into this store first.
        #[arg(long)]
        store: Option<String>,
        /// With --store: create this many mappings.
        #[arg(long)]
        populate: bool,
        /// Load generator threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PORTOLAN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            store,
            metrics,
            max_connections,
            idle_timeout,
            frame_timeout_ms,
            max_connections_per_peer,
            reserved_connections,
            max_buffered_bytes,
            store_workers,
            threads,
        } => {
            if max_connections_per_peer == 0 || frame_timeout_ms == 0 {
                bail!(
                    "--max-connections-per-peer and --frame-timeout-ms must be at least 1 \
                     (got {max_connections_per_peer} and {frame_timeout_ms})"
                );
            }
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(t) = threads {
                rt.worker_threads(t.max(1));
            }
            let rt = rt.enable_all().build()?;
            let store = store::open(&store).with_context(|| format!("opening store {store}"))?;
            let cfg = ServerConfig {
                listen,
                max_connections,
                idle_timeout: Duration::from_secs(idle_timeout),
                frame_timeout: Duration::from_millis(frame_timeout_ms),
                max_connections_per_peer,
                reserved_connections,
                max_buffered_bytes,
                store_workers,
                ..ServerConfig::default()
            };
            rt.block_on(serve(cfg, store, metrics))
        }
        Command::Import { store, file, json } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let doc =
                portolan::import::parse(&text).with_context(|| format!("in {}", file.display()))?;
            let st = store::open(&store).with_context(|| format!("opening store {store}"))?;
            let sum = portolan::import::apply(&*st, &doc)?;
            if json {
                println!("{}", serde_json::to_string(&sum)?);
            } else {
                println!(
                    "imported {} underlay, {} overlay created, {} moved, {} unchanged; {} log events",
                    sum.underlay, sum.created, sum.moved, sum.unchanged, sum.events
                );
            }
            Ok(())
        }
        Command::Ping { client } => run_client(&client, |c| async move {
            let t = std::time::Instant::now();
            c.ping().await?;
            let us = t.elapsed().as_micros();
            Ok((
                format!("PONG from {} in {us} µs", c.server()),
                serde_json::json!({"ok": true, "server": c.server().to_string(), "rtt_us": us}),
            ))
        }),
        Command::Vl2 { mac, vnet, client } => run_client(&client, |c| async move {
            Ok(match c.vl2(mac, vnet).await? {
                Some(r) => (
                    format!(
                        "{mac} on vnet {vnet}: underlay {}:{}",
                        r.underlay_ip, r.underlay_port
                    ),
                    serde_json::json!({"status": "OK", "mac": mac.to_string(), "vnet_id": vnet,
                        "underlay_ip": r.underlay_ip.to_string(), "underlay_port": r.underlay_port}),
                ),
                None => (
                    format!("{mac} on vnet {vnet}: not found"),
                    serde_json::json!({"status": "NOTFOUND", "mac": mac.to_string(), "vnet_id": vnet}),
                ),
            })
        }),
        Command::Vl3 { ip, vnet, client } => run_client(&client, |c| async move {
            Ok(match c.vl3(ip, vnet).await? {
                Some(r) => (
                    format!(
                        "{ip} on vnet {vnet}: mac {} underlay {}:{}",
                        r.mac, r.underlay_ip, r.underlay_port
                    ),
                    serde_json::json!({"status": "OK", "ip": ip.to_string(), "vnet_id": vnet,
                        "mac": r.mac.to_string(), "underlay_ip": r.underlay_ip.to_string(),
                        "underlay_port": r.underlay_port}),
                ),
                None => (
                    format!("{ip} on vnet {vnet}: not found"),
                    serde_json::json!({"status": "NOTFOUND", "ip": ip.to_string(), "vnet_id": vnet}),
                ),
            })
        }),
        Command::Log {
            underlay_ip,
            count,
            client,
        } => run_client(&client, |c| async move {
            let records = c.log(underlay_ip, count).await?;
            let mut text = format!("{} log entries for {underlay_ip}", records.len());
            let mut js = Vec::new();
            for r in &records {
                match *r {
                    LogRecord::Vl2 { id, mac, vnet_id } => {
                        text.push_str(&format!("\n{id}  VL2  vnet {vnet_id}  mac {mac}"));
                        js.push(serde_json::json!({"id": id.to_string(), "type": "VL2",
                            "vnet_id": vnet_id, "mac": mac.to_string()}));
                    }
                    LogRecord::Vl3 {
                        id,
                        ip,
                        vlan,
                        vnet_id,
                    } => {
                        let ip = from_wire_ip(ip);
                        text.push_str(&format!(
                            "\n{id}  VL3  vnet {vnet_id}  ip {ip}  vlan {vlan}"
                        ));
                        js.push(serde_json::json!({"id": id.to_string(), "type": "VL3",
                            "vnet_id": vnet_id, "ip": ip.to_string(), "vlan": vlan}));
                    }
                }
            }
            Ok((text, serde_json::Value::Array(js)))
        }),
        Command::LogRm { ids, client } => run_client(&client, |c| async move {
            c.log_rm(&ids).await?;
            Ok((
                format!(
                    "removed {} log entries (unknown ids are ignored)",
                    ids.len()
                ),
                serde_json::json!({"status": "OK", "ids": ids.len()}),
            ))
        }),
        Command::Stats { metrics, json } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let body = rt.block_on(fetch_metrics(metrics))?;
            let mut pairs = Vec::new();
            for line in body.lines().filter(|l| !l.starts_with('#')) {
                if let Some((k, v)) = line.split_once(' ') {
                    pairs.push((k.trim_start_matches("portolan_").to_string(), v.to_string()));
                }
            }
            if json {
                let m: serde_json::Map<String, serde_json::Value> = pairs
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::json!(v.parse::<u64>().unwrap_or(0))))
                    .collect();
                println!("{}", serde_json::Value::Object(m));
            } else {
                for (k, v) in pairs {
                    println!("{k:<28} {v}");
                }
            }
            Ok(())
        }
        Command::Bench {
            server,
            connections,
            depth,
            seconds,
            warmup,
            vnet,
            ips,
            store,
            populate,
            threads,
            json,
        } => {
            let first = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0));
            let addrs: Vec<IpAddr> = (0..ips)
                .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(first + i)))
                .collect();
            if populate {
                let Some(url) = store else {
                    bail!("--populate needs --store URL (the store the server uses)");
                };
                populate_store(&url, vnet, &addrs)?;
            }
            let rt = if threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .enable_all()
                    .build()?
            };
            let report = rt.block_on(portolan::bench::run(portolan::bench::BenchConfig {
                server,
                connections,
                depth,
                duration: Duration::from_secs(seconds.max(1)),
                warmup: Duration::from_secs(warmup),
                vnet_id: vnet,
                ips: addrs,
            }))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "{} connections x depth {}: {} VL3 lookups in {:.1} s = {:.0}/s \
                     (not found {}, failed {})\nlatency µs: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
                    report.connections,
                    report.depth,
                    report.lookups,
                    report.seconds,
                    report.per_second,
                    report.not_found,
                    report.failed,
                    report.p50_us,
                    report.p90_us,
                    report.p99_us,
                    report.p999_us,
                    report.max_us
                );
            }
            Ok(())
        }
    }
}

fn run_client<F, Fut>(args: &ClientArgs, f: F) -> Result<()>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<(String, serde_json::Value)>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let json = args.json;
    let (text, value) = rt.block_on(async {
        let mut cfg = ClientConfig::new(args.server);
        cfg.connections = 1;
        cfg.timeout = Duration::from_secs(args.timeout.max(1));
        f(Client::new(cfg)).await
    })?;
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
    Ok(())
}

async fn serve(
    cfg: ServerConfig,
    store: Arc<dyn store::Store>,
    metrics: Option<SocketAddr>,
) -> Result<()> {
    let server = Server::bind(cfg.clone(), store)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = server.local_addr()?;
    let stats = server.stats();
    if let Some(m) = metrics {
        let listener = tokio::net::TcpListener::bind(m)
            .await
            .with_context(|| format!("metrics listener on {m}"))?;
        println!("metrics on http://{}/metrics", listener.local_addr()?);
        tokio::spawn(serve_metrics(listener, stats.clone()));
    }
    // Tests and scripts read this line to learn the port when --listen has port 0.
    println!("listening on {addr}");
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C still stops the server");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        }
    };
    server.run(shutdown).await?;
    let summary: Vec<String> = stats
        .snapshot()
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!(counters = %summary.join(" "), "stopped");
    Ok(())
}

/// A minimal HTTP endpoint: `GET /metrics` answers the counters, anything else 404.
async fn serve_metrics(listener: tokio::net::TcpListener, stats: Arc<Stats>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            let read = async {
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let ok = req.starts_with(b"GET /metrics ") || req.starts_with(b"GET / ");
            let (status, body) = if ok {
                ("200 OK", stats.prometheus())
            } else {
                ("404 Not Found", "only GET /metrics is served\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

async fn fetch_metrics(addr: SocketAddr) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to metrics endpoint {addr}"))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: portolan\r\nconnection: close\r\n\r\n")
        .await?;
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut resp))
        .await
        .context("metrics endpoint did not answer within 5 s")??;
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        bail!("metrics endpoint {addr} sent no HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "metrics endpoint {addr} answered {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.to_string())
}

fn populate_store(url: &str, vnet: u32, ips: &[IpAddr]) -> Result<()> {
    let st = store::open(url).with_context(|| format!("opening store {url}"))?;
    let cn: store::CnUuid = "00000000-0000-4000-8000-0000000be4c5".parse()?;
    store::with_txn(&*st, |tx| {
        tx.put_underlay(&UnderlayMapping {
            cn_uuid: cn,
            ip: IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)),
            port: 4789,
        })?;
        for (i, ip) in ips.iter().enumerate() {
            let n = u64::try_from(i).unwrap_or(0) | 0x0200_0000_0000;
            let m = OverlayMapping {
                vnet_id: vnet,
                ip: *ip,
                mac: Mac::from_u64(n).unwrap_or(Mac::ZERO),
                cn_uuid: cn,
                vlan: 0,
            };
            // Plain writes: a bench fixture needs no events (one host, its own NICs).
            tx.write_mapping(&m, false)?;
        }
        Ok::<_, store::StoreError>(())
    })?;
    eprintln!(
        "populated {} mappings on vnet {vnet} in {}",
        ips.len(),
        st.describe()
    );
    Ok(())
}
