//! `fabric control bench`: NIC provisions per second through the HTTP API of an in-process
//! service on 127.0.0.1, over a fresh store: first one client provisioning sequentially, then
//! `--concurrency` clients at once. Every provision is a full ProvisionNic: IP allocation, NIC
//! row, Portolan mapping and events, one transaction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use super::client::HttpClient;
use super::Config;

/// Arguments of `fabric control bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Store to use; must be empty or new (default: a temporary SQLite file, removed after).
    #[arg(long)]
    pub store: Option<String>,
    /// NICs to provision in the sequential phase.
    #[arg(long, default_value_t = 2000)]
    pub sequential: usize,
    /// NICs to provision in the concurrent phase.
    #[arg(long, default_value_t = 4000)]
    pub concurrent: usize,
    /// Clients (connections) in the concurrent phase.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Tenants (owners, each with its own VNI and fabric network); NIC i goes to tenant
    /// i mod N. Each provision tells every host on its VNI, so one big VNI is the worst case.
    #[arg(long, default_value_t = 1)]
    pub tenants: usize,
}

/// Runs the benchmark and prints the figures.
pub async fn run(args: BenchArgs, cfg: Config) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency 0: expected at least 1");
    }
    if args.tenants == 0 || args.tenants > 256 {
        bail!("--tenants {}: expected 1..=256", args.tenants);
    }
    let tmp = std::env::temp_dir().join(format!("fabric-control-bench-{}.db", std::process::id()));
    let url = args
        .store
        .clone()
        .unwrap_or_else(|| format!("sqlite:{}", tmp.display()));
    let store = super::open_store(&url, &cfg).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(super::http::serve(listener, store, cfg, async move {
        let _ = stop_rx.await;
    }));
    let result = drive(addr, &args).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    if args.store.is_none() {
        for s in ["", "-wal", "-shm"] {
            let mut p = tmp.clone().into_os_string();
            p.push(s);
            let _ = std::fs::remove_file(p);
        }
    }
    let (seq, conc) = result?;
    println!("store: {url}, {} tenant(s)", args.tenants);
    println!(
        "sequential: {} NICs in {:.3} s = {:.0} provisions/s",
        args.sequential,
        seq.as_secs_f64(),
        args.sequential as f64 / seq.as_secs_f64()
    );
    println!(
        "concurrent ({} clients): {} NICs in {:.3} s = {:.0} provisions/s",
        args.concurrency,
        args.concurrent,
        conc.as_secs_f64(),
        args.concurrent as f64 / conc.as_secs_f64()
    );
    Ok(())
}

async fn drive(
    addr: std::net::SocketAddr,
    args: &BenchArgs,
) -> anyhow::Result<(Duration, Duration)> {
    let mut c = HttpClient::new(addr);
    let mut paths = Vec::new();
    for t in 0..args.tenants {
        let owner = format!("930896af-bf8c-48d4-885c-{t:012x}");
        let r = c
            .json(
                "POST",
                &format!("/fabrics/{owner}/vlans"),
                Some(&json!({"vlan_id": 10})),
            )
            .await?;
        if r.status != 200 {
            bail!(
                "creating the bench VLAN: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        let r = c
            .json(
                "POST",
                &format!("/fabrics/{owner}/vlans/10/networks"),
                Some(&json!({"name": "bench", "subnet": "10.128.0.0/14", "gateway": "10.128.0.1"})),
            )
            .await?;
        if r.status != 200 {
            bail!(
                "creating the bench network: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        let net = r.json()["uuid"]
            .as_str()
            .context("network uuid")?
            .to_string();
        paths.push((owner, format!("/networks/{net}/nics")));
    }
    let paths = Arc::new(paths);
    let req = move |i: usize| {
        let (owner, path) = &paths[i % paths.len()];
        let body = json!({
            "owner_uuid": owner,
            "belongs_to_type": "zone",
            "belongs_to_uuid": format!("00000000-0000-4000-8000-{:012x}", i),
            "cn_uuid": format!("564d1a4c-0000-4000-8000-{:012x}", i % 8),
        });
        (path.clone(), body)
    };
    let t0 = Instant::now();
    for i in 0..args.sequential {
        let (path, body) = req(i);
        let r = c.json("POST", &path, Some(&body)).await?;
        if r.status != 200 {
            bail!(
                "provision {i}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
    }
    let seq = t0.elapsed();
    let per = args.concurrent.div_ceil(args.concurrency);
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let req = req.clone();
        let lo = args.sequential + w * per;
        let hi = (lo + per).min(args.sequential + args.concurrent);
        tasks.push(tokio::spawn(async move {
            let mut c = HttpClient::new(addr);
            for i in lo..hi {
                let (path, body) = req(i);
                let r = c.json("POST", &path, Some(&body)).await?;
                if r.status != 200 {
                    bail!(
                        "provision {i}: {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    );
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await.context("bench client panicked")??;
    }
    Ok((seq, t1.elapsed()))
}
