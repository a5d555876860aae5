//! The control plane: a NAPI-compatible REST service (`fabric control`).
//!
//! NIC tags, networks and their IPs (IPAM), NICs, fabric VLANs and fabric networks, following
//! NAPI's wire contract (`specs/napi-docker.md`): 200 on create and update, 204 on delete,
//! restify error bodies, `limit`/`offset` pagination, unknown parameters rejected, parameters from
//! the query string, a JSON body or a form body. An FWAPI-style `/rules` resource holds fwrule
//! text, validated by [`crate::firewall::rule`] and returned in canonical form.
//!
//! State lives in the same database as Portolan's (SQLite file or PostgreSQL), in `napi_*`
//! tables. Every NIC change commits in ONE transaction with its Portolan records: the overlay
//! mapping (tombstoned on delete) and the VL2/VL3 events of every host on the VNI, or the host's
//! underlay mapping for underlay NICs — so a Portolan server on the same store never sees a NIC
//! without its mapping or a mapping without its NIC, even if this process is killed.
//!
//! Admin views of Portolan's state (`/portolan/...`) and Prometheus metrics (`/metrics`) are
//! served beside the API.
//!
//! VMAPI-shaped VMs (`/vms`) and CNAPI-shaped servers (`/servers`) are the registry the agents
//! converge their hosts to: a VM's NICs are NAPI NICs (`belongs_to_uuid` = the VM, `cn_uuid` =
//! its server) created in the VM's own transaction, placement picks a live server when none is
//! given, and each agent reads `GET /servers/:uuid/desired` (its VMs and the firewall closure)
//! and reports VM states back. Every write records a change in the feed ([`changes`]).
//!
//! Module map: [`http`] (routes, request/response plumbing), [`params`] (restify-style
//! parameter validation), [`error`] (error bodies), [`db`] (dialect-neutral SQL), then one module
//! per resource: [`nic_tags`], [`networks`] (with IPs and allocation), [`nics`], [`fabrics`],
//! [`pools`], [`rules`], [`portolan_view`], [`servers`], [`vms`] (with [`placement`]),
//! [`desired`] (the agent's snapshot); [`changes`] is the change feed every writer records in
//! (`GET /changes`, long-polled); [`bench`] measures NIC provisions per second.
//!
//! Cluster security (DESIGN "Trust"): [`auth`] is the route policy per caller (operator, host
//! certificate acting only for its own server, no certificate); `DELETE /servers/:uuid`
//! revokes a server for good ([`servers::remove`]); [`peers`] lists foreign VXLAN peers; the
//! members (unrevoked servers and foreign peers) are in every desired snapshot and in the
//! process's [`crate::pki::Trust`] ([`Config::trust`]), kept in step with the store. [`cli`] is
//! `fabric server …` and `fabric peer …`.

pub mod auth;
pub mod bench;
pub mod changes;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod container_spec;
pub mod db;
pub mod desired;
pub mod error;
pub mod fabrics;
pub mod http;
pub mod join;
pub mod metrics;
pub mod networks;
pub mod nic_tags;
pub mod nics;
pub mod params;
pub mod peers;
pub mod placement;
pub mod pools;
pub mod portolan_view;
pub mod rules;
pub mod servers;
pub mod time;
pub mod tunnel;
pub mod vms;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use portolan::store::{self, Store};

use self::db::Db;
use self::error::OpError;

/// Service settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// NIC tag of fabric networks (NAPI `overlay.overlayNicTag`).
    pub overlay_nic_tag: String,
    /// NIC tag of underlay networks (NAPI `overlay.underlayNicTag`).
    pub underlay_nic_tag: String,
    /// Default MTU of fabric networks (NAPI `overlay.defaultOverlayMTU`).
    pub overlay_mtu: u32,
    /// Whether `/fabrics` routes are served (else 428).
    pub fabrics_enabled: bool,
    /// Owner of reserved IPs (gateway, resolvers, broadcast): NAPI's `ufdsAdminUuid`.
    pub admin_uuid: String,
    /// OUI (24 bits) of generated MACs.
    pub mac_oui: u32,
    /// Limits of the HTTP serving layer (timeouts, connection and body caps).
    pub http: crate::http::Limits,
    /// The SVP address agents and joining hosts are told (`--portolan-advertise`), shown in
    /// each server's desired-state snapshot.
    pub portolan_advertise: Option<String>,
    /// A server whose last heartbeat is older than this is not `running`: placement skips it
    /// and its VMs read `unknown` (CNAPI's 11 s: one missed 5 s beat plus 1 s).
    pub heartbeat_lifetime: std::time::Duration,
    /// How long the change feed keeps changes (`--changes-retention`, `--changes-keep`).
    pub changes_retention: changes::Retention,
    /// The store's URL when known: on PostgreSQL the change feed LISTENs on a connection of its
    /// own, so other instances' writes wake long-polls at once (else within 1 s).
    pub store_url: Option<changes::feed::StoreUrl>,
    /// The process's membership view (shared with the TLS verifiers and Portolan), which the
    /// service keeps in step with the store: at start, every second, and right after its own
    /// membership writes. `None` (standalone `fabric control`): nothing to keep.
    pub trust: Option<Arc<crate::pki::Trust>>,
    /// The head's cluster CA: `POST /join` and certificate renewals are served with it.
    pub cluster: Option<join::ClusterPki>,
    /// The accounts CA and the Docker listener's revocation view: `/accounts` certificates
    /// are issued with it, and an account's removal is pushed to the listener at once.
    pub docker: Option<crate::docker::DockerPki>,
    /// Where Docker networks created without `--subnet` get theirs (`--docker-subnet-pool`;
    /// moby's default pools when not given).
    pub docker_pool: Vec<crate::docker::networks::SubnetPool>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            overlay_nic_tag: "sdc_overlay".into(),
            underlay_nic_tag: "sdc_underlay".into(),
            overlay_mtu: 1400,
            fabrics_enabled: true,
            admin_uuid: "aaaaaaaa-aaaa-aaaa-aaaa-000000000000".into(),
            mac_oui: 0x90b8d0,
            http: crate::http::Limits::default(),
            portolan_advertise: None,
            heartbeat_lifetime: std::time::Duration::from_secs(11),
            changes_retention: changes::Retention::default(),
            store_url: None,
            trust: None,
            cluster: None,
            docker: None,
            docker_pool: crate::docker::networks::default_pools(),
        }
    }
}

impl Config {
    /// [`Config::heartbeat_lifetime`] in milliseconds.
    pub fn heartbeat_lifetime_ms(&self) -> i64 {
        i64::try_from(self.heartbeat_lifetime.as_millis()).unwrap_or(i64::MAX)
    }
}

/// `fabric control`: serve the NAPI-compatible API with VMs (`/vms`), servers (`/servers`,
/// heartbeats, each agent's desired state) and rules (or, with `bench`, measure it).
#[derive(clap::Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ControlArgs {
    /// Address to listen on (HTTP; HTTPS with --data).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Serve as (one instance of) a cluster's head: the cluster CA and join secret in
    /// DIR/pki/ (created if missing; share DIR/pki between instances), the API over TLS with
    /// client certificates of the cluster CA only, the local operator on DIR/control.sock.
    /// Without it: plain HTTP and no authentication (keep --listen on loopback).
    #[arg(long, value_name = "DIR")]
    pub data: Option<std::path::PathBuf>,
    /// With --data: other names or addresses the API is reached by (repeatable; the listen
    /// address and 127.0.0.1 are always in its certificate).
    #[arg(long, value_name = "NAME|IP", requires = "data")]
    pub san: Vec<String>,
    /// With --data: also serve the Docker Remote API on ADDR (TLS, client certificates of the
    /// accounts CA only: `fabric account add`), e.g. 127.0.0.1:2376.
    #[arg(long, value_name = "ADDR", requires = "data")]
    pub docker_listen: Option<SocketAddr>,
    /// Largest image upload the Docker API accepts (`docker import`, `docker load`), e.g.
    /// 512M, 4G.
    #[arg(long, value_name = "SIZE", default_value = "4G", value_parser = crate::docker::parse_size)]
    pub docker_max_upload: u64,
    /// Where Docker networks created without --subnet get one: the SIZE-bit subnets of CIDR
    /// (default /24), first free first, avoiding the account's subnets and shared networks'
    /// (repeatable; default moby's: the /16s of 172.17-172.31, then /20s of 192.168.0.0/16).
    #[arg(long, value_name = "CIDR[/SIZE]", value_parser = crate::docker::networks::parse_pool)]
    pub docker_subnet_pool: Vec<crate::docker::networks::SubnetPool>,
    /// With --data: lifetime of the host certificates issued (e.g. 30d, 12h, 10m).
    #[arg(long, value_name = "DURATION", default_value = "30d",
          value_parser = crate::pki::cli::parse_lifetime)]
    pub cert_lifetime: std::time::Duration,
    /// The store, shared with Portolan: `sqlite:PATH` (embedded default) or
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`.
    #[arg(long, default_value = "sqlite:fabric.db")]
    pub store: String,
    /// NIC tag of fabric (overlay) networks; fabric NICs report `<tag>/<vnet_id>`.
    #[arg(long, default_value = "sdc_overlay")]
    pub overlay_nic_tag: String,
    /// NIC tag of underlay networks: server NICs with `underlay: true` on a network with this tag
    /// publish their host's underlay address to Portolan.
    #[arg(long, default_value = "sdc_underlay")]
    pub underlay_nic_tag: String,
    /// Default MTU of fabric networks.
    #[arg(long, default_value_t = 1400)]
    pub overlay_mtu: u32,
    /// Refuse `/fabrics` routes (428), as NAPI does with overlays disabled.
    #[arg(long)]
    pub no_fabrics: bool,
    /// UUID that owns reserved IPs (gateway, resolvers, broadcast).
    #[arg(long, default_value = "aaaaaaaa-aaaa-aaaa-aaaa-000000000000")]
    pub admin_uuid: String,
    /// OUI of generated MAC addresses, 6 hex digits (must be unicast).
    #[arg(long, default_value = "90b8d0")]
    pub mac_oui: String,
    /// Seconds a client has to send a request head (from connect, and from the first byte of
    /// each later head); slower connections are closed.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub http_header_timeout: f64,
    /// Seconds a keep-alive connection may sit idle between requests before it is closed
    /// (never while a response is produced or streamed).
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub http_idle_timeout: f64,
    /// Open HTTP connections at most, all clients together (lowered to fit RLIMIT_NOFILE);
    /// at the cap, a new client takes the slot of the oldest idle connection of the client
    /// holding the most.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub http_max_connections: usize,
    /// Open HTTP connections at most from one client address (IPv4 address or IPv6 /64).
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub http_max_connections_per_source: usize,
    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub http_max_body: usize,
    /// The Portolan (SVP) address agents and joining hosts are told, `HOST:PORT`
    /// (`GET /servers/:uuid/desired` shows it as `portolan`).
    #[arg(long, value_name = "ADDR")]
    pub portolan_advertise: Option<String>,
    /// Seconds after its last heartbeat (or registration) a server stops counting as running:
    /// placement skips it and its VMs read `unknown`.
    #[arg(long, default_value_t = 11.0, value_name = "SECS")]
    pub heartbeat_lifetime: f64,
    /// Seconds the change feed keeps a change (older ones are deleted, except the newest
    /// `--changes-keep`); a reader further behind gets 410 Gone and lists again.
    #[arg(long, default_value_t = 86_400, value_name = "SECS")]
    pub changes_retention: u64,
    /// Changes always kept, however old (at least 1).
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub changes_keep: u64,
    /// Measure NIC provisions per second instead of serving.
    #[command(subcommand)]
    pub cmd: Option<ControlCmd>,
}

/// Subcommands of `fabric control`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ControlCmd {
    /// Benchmark: provision NICs through the HTTP API of an in-process service on 127.0.0.1,
    /// sequentially then concurrently, and print provisions per second.
    Bench(bench::BenchArgs),
}

impl ControlArgs {
    /// The service settings these arguments give.
    pub fn config(&self) -> anyhow::Result<Config> {
        let oui = u32::from_str_radix(&self.mac_oui, 16)
            .ok()
            .filter(|o| self.mac_oui.len() == 6 && o >> 16 & 1 == 0)
            .with_context(|| {
                format!(
                    "--mac-oui {:?}: expected 6 hex digits of a unicast OUI, e.g. 90b8d0",
                    self.mac_oui
                )
            })?;
        let admin = params::parse_uuid(&self.admin_uuid)
            .with_context(|| format!("--admin-uuid {:?}: expected a UUID", self.admin_uuid))?;
        if !(576..=9000).contains(&self.overlay_mtu) {
            anyhow::bail!("--overlay-mtu {}: expected 576..=9000", self.overlay_mtu);
        }
        let secs = |flag: &str, v: f64| -> anyhow::Result<std::time::Duration> {
            std::time::Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("{flag} {v}: expected a positive number of seconds"))
        };
        let http = crate::http::Limits {
            header_read_timeout: secs("--http-header-timeout", self.http_header_timeout)?,
            idle_timeout: secs("--http-idle-timeout", self.http_idle_timeout)?,
            max_connections: self.http_max_connections,
            max_connections_per_source: self.http_max_connections_per_source,
            max_body_bytes: self.http_max_body,
            ..crate::http::Limits::default()
        };
        http.validate().context("HTTP limits")?;
        let heartbeat_lifetime = secs("--heartbeat-lifetime", self.heartbeat_lifetime)?;
        if let Some(a) = &self.portolan_advertise {
            if a.parse::<SocketAddr>().is_err()
                && a.rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                anyhow::bail!(
                    "--portolan-advertise {a:?}: expected HOST:PORT, e.g. 192.168.77.1:1296"
                );
            }
        }
        if self.changes_retention == 0 {
            anyhow::bail!("--changes-retention 0: expected a positive number of seconds");
        }
        if self.changes_keep == 0 {
            anyhow::bail!(
                "--changes-keep 0: expected at least 1 (the newest change is always kept)"
            );
        }
        Ok(Config {
            overlay_nic_tag: self.overlay_nic_tag.clone(),
            underlay_nic_tag: self.underlay_nic_tag.clone(),
            overlay_mtu: self.overlay_mtu,
            fabrics_enabled: !self.no_fabrics,
            admin_uuid: admin,
            mac_oui: oui,
            http,
            portolan_advertise: self.portolan_advertise.clone(),
            heartbeat_lifetime,
            changes_retention: changes::Retention {
                max_age: std::time::Duration::from_secs(self.changes_retention),
                keep: self.changes_keep,
            },
            store_url: Some(changes::feed::StoreUrl(self.store.clone())),
            trust: None,
            cluster: None,
            docker: None,
            docker_pool: if self.docker_subnet_pool.is_empty() {
                crate::docker::networks::default_pools()
            } else {
                self.docker_subnet_pool.clone()
            },
        })
    }
}

/// Entry point of `fabric control`: builds its own tokio runtime.
pub fn run(args: ControlArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fabric-control")
        .build()
        .context("cannot start the tokio runtime")?;
    if let Some(ControlCmd::Bench(b)) = &args.cmd {
        let cfg = args.config()?;
        return rt.block_on(bench::run(b.clone(), cfg));
    }
    let cfg = args.config()?;
    // A daemon: as many descriptors as allowed (the HTTP layer sizes its cap from them).
    match crate::io::rlimit::raise_nofile() {
        Ok(n) => tracing::debug!(nofile = n, "RLIMIT_NOFILE raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    rt.block_on(async move {
        let store = open_store(&args.store, &cfg).await?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        let Some(data) = &args.data else {
            tracing::info!(addr = %listener.local_addr()?, store = %store.describe(), "fabric control listening (HTTP, no authentication)");
            http::serve(listener, store, cfg, shutdown).await?;
            return Ok(());
        };
        std::fs::create_dir_all(data)
            .with_context(|| format!("creating the data directory {}", data.display()))?;
        if args.listen.ip().is_unspecified() && args.san.is_empty() {
            anyhow::bail!(
                "--listen {}: a wildcard address; name the addresses clients use with --san IP (they must be in the certificate)",
                args.listen
            );
        }
        let mut ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
        if !args.listen.ip().is_unspecified() {
            ips.push(args.listen.ip());
        }
        let mut names = vec!["localhost".to_string()];
        for san in &args.san {
            match san.parse::<std::net::IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => names.push(san.clone()),
            }
        }
        let head = cluster::HeadTls::prepare(data, "fabric-control", &ips, &names)?;
        let mut cfg = head.configure(cfg, args.cert_lifetime, None);
        let docker = match args.docker_listen {
            None => None,
            Some(addr) => {
                let docker = cluster::DockerListener::bind(data, addr, &ips, &names, args.docker_max_upload).await?;
                cfg.docker = Some(docker.tls.pki.clone());
                Some(docker)
            }
        };
        let sock = cluster::bind_socket(data)?;
        tracing::info!(addr = %listener.local_addr()?, socket = %cluster::socket_path(data).display(), store = %store.describe(), "fabric control listening (HTTPS, cluster CA)");
        cluster::serve(listener, sock, docker, store, cfg, &head, shutdown).await
    })
}

/// Opens the store and prepares the control plane's schema and the overlay NIC tag.
pub async fn open_store(url: &str, cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = url.to_string();
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Arc<dyn Store>> {
        let store = store::open(&url).with_context(|| format!("cannot open store {url}"))?;
        prepare(&*store, &cfg).context("cannot prepare the control plane's tables")?;
        Ok(store)
    })
    .await
    .context("store opening task failed")?
}

/// Creates the `napi_*` tables and the overlay NIC tag (MTU max(overlay MTU, 1500)).
pub fn prepare(store: &dyn Store, cfg: &Config) -> Result<(), OpError> {
    store::with_txn(store, |tx| {
        let mut d = Db::from(tx.raw());
        db::create_schema(&mut d)?;
        nic_tags::ensure(
            &mut d,
            &cfg.overlay_nic_tag,
            i64::from(cfg.overlay_mtu.max(1500)),
        )
    })
}

static LAST_US: AtomicI64 = AtomicI64::new(0);

/// Microseconds since the epoch, strictly increasing within this process (IP records are freed
/// in this order).
pub fn now_us() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let mut last = LAST_US.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST_US.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(x) => last = x,
        }
    }
}

/// The current time, ISO-8601 with milliseconds (`2026-11-29T19:00:00.000Z`).
pub fn iso_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    iso_from_ms(d.as_millis() as i64)
}

pub use time::iso_from_ms;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ControlArgs,
    }

    fn config(argv: &[&str]) -> anyhow::Result<Config> {
        let mut full = vec!["control"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full)?.args.config()
    }

    #[test]
    fn advertise_and_heartbeat_flags() {
        let c = config(&[]).unwrap();
        assert_eq!(c.portolan_advertise, None);
        assert_eq!(c.heartbeat_lifetime_ms(), 11_000);
        let c = config(&[
            "--portolan-advertise",
            "192.168.77.1:1296",
            "--heartbeat-lifetime",
            "1.5",
        ])
        .unwrap();
        assert_eq!(c.portolan_advertise.as_deref(), Some("192.168.77.1:1296"));
        assert_eq!(c.heartbeat_lifetime_ms(), 1_500);
        assert!(config(&["--portolan-advertise", "portolan.example:1296"]).is_ok());
        for bad in ["192.168.77.1", ":1296", "h:99999"] {
            let e = config(&["--portolan-advertise", bad]).unwrap_err();
            assert!(e.to_string().contains("HOST:PORT"), "{bad}: {e}");
        }
        assert!(config(&["--heartbeat-lifetime", "0"]).is_err());
    }

    #[test]
    fn monotonic() {
        let a = now_us();
        let b = now_us();
        assert!(b > a);
    }
}
