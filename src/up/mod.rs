//! `fabric up`: one host of a fabric cluster in one command.
//!
//! Two shapes (DESIGN "Deployment shapes"):
//! - **Head** (`fabric up --data DIR --underlay IP`): the cluster CA (`DIR/pki/`, created once)
//!   and, in this process on one tokio runtime, the control plane's API over TLS (on `--listen`,
//!   default `IP:8080`; client certificates of the cluster CA, none only to join) and on
//!   `DIR/control.sock` for the local operator, and Portolan (plain SVP on `IP:1296` for member
//!   addresses, SVP over TLS on `IP:1297` for host certificates) over the same store (`--store`,
//!   default `sqlite:DIR/fabric.db`); the head issues its own host certificate and registers
//!   itself through its socket.
//! - **Join** (`fabric up --data DIR --underlay IP --join URL --token TOKEN`): checks the head
//!   against the token's CA digest, joins with a certificate request (the key stays here), keeps
//!   its certificate in `DIR/tls/` ([`join`]), and learns Portolan's addresses.
//!
//! Both then run `fabric dataplane` and `fabric agent` as child processes of the same executable
//! (logs in `DIR/logs/{dataplane,agent}.log`, pids in `DIR/run/{dataplane,agent}.pid`) and keep
//! them running: a child that exits is restarted after a backoff (0.2 s doubling to 5 s, back to
//! 0.2 s after a minute of good health). Children get `PR_SET_PDEATHSIG`, so a `fabric up`
//! killed with SIGKILL takes them along and a new `fabric up` on the same DIR starts clean.
//! SIGTERM or SIGINT stop the agent, then the dataplane (SIGTERM, SIGKILL after 5 s), then the
//! HTTP and SVP servers, and exit 0. The server UUID is generated once into `DIR/server-uuid`,
//! so running again on the same DIR resumes as the same server.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::control::client::HttpClient;

mod join;
mod supervise;

pub use join::control_url;
pub use supervise::{Backoff, ChildSpec, Supervisor};

/// The Portolan (SVP) port of the head.
pub const PORTOLAN_PORT: u16 = 1296;
/// The head's Portolan port for SVP over TLS (fabric's own hosts).
pub const PORTOLAN_TLS_PORT: u16 = 1297;
/// The VXLAN port of every host.
pub const VXLAN_PORT: u16 = 4789;

/// The one line a non-root user gets.
pub const NEEDS_ROOT: &str =
    "needs root (creates network namespaces and TAP devices); run it as root";

/// `fabric up` arguments.
#[derive(clap::Args, Debug, Clone)]
#[command(after_long_help = "\
Shapes:
  Head (control plane + Portolan + dataplane + agent, SQLite in DIR):
    fabric up --data /var/lib/fabric --underlay 192.168.77.1
  Another host joining it (dataplane + agent), with the token `fabric token --data DIR` prints
  on the head (later runs resume with DIR/tls and need no token):
    fabric up --data /var/lib/fabric --underlay 192.168.77.2 \\
      --join https://192.168.77.1:8080 --token FABRIC1-...

Files in DIR: server-uuid (this host's identity, kept), tls/{ca,cert,key}.pem (its certificate),
fabric.db (head, SQLite store), pki/ (head: the cluster CA and the join secret), control.sock
(head: the operator's socket, mode 0600), dataplane.sock, firewall.json, agent/ (the agent's
state), logs/{dataplane,agent}.log, run/{dataplane,agent}.pid.")]
pub struct UpArgs {
    /// Data directory of this host (created if missing).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// This host's underlay address: VXLAN is received on IP:4789; on the head, Portolan
    /// listens on IP:1296 and the HTTP API on IP:8080 by default.
    #[arg(long, value_name = "IP")]
    pub underlay: IpAddr,
    /// Head only: the control plane's HTTP address (default IP:8080).
    #[arg(long, value_name = "ADDR", conflicts_with = "join")]
    pub listen: Option<SocketAddr>,
    /// Head only: the store, `sqlite:PATH` or `postgres://USER:PASSWORD@HOST:PORT/DB`
    /// (default sqlite:DIR/fabric.db).
    #[arg(long, value_name = "URL", conflicts_with = "join")]
    pub store: Option<String>,
    /// Join the cluster whose control plane is at URL (`https://IP:PORT`) instead of running
    /// the control plane and Portolan here.
    #[arg(long, value_name = "URL")]
    pub join: Option<String>,
    /// The join token (`fabric token --data DIR` on the head). Needed the first time a host
    /// joins (and after its certificate expired); later runs resume with `DIR/tls/`. From the
    /// environment (FABRIC_JOIN_TOKEN) it stays out of the process list.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "FABRIC_JOIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Head only: lifetime of the host certificates the head issues (e.g. 30d, 12h, 10m);
    /// hosts renew theirs after two thirds of it.
    #[arg(long, value_name = "DURATION", default_value = "30d",
          value_parser = crate::pki::cli::parse_lifetime, conflicts_with = "join")]
    pub cert_lifetime: std::time::Duration,
    /// Head only: another name or address the control plane is reached by (repeatable; the
    /// listen address, the underlay address and 127.0.0.1 are always in its certificate).
    #[arg(long, value_name = "NAME|IP", conflicts_with = "join")]
    pub san: Vec<String>,
    /// Head: where the Docker Remote API listens (TLS; client certificates of the accounts
    /// CA only, from `fabric account add`). Default: the --listen address's IP, port 2376.
    #[arg(long, value_name = "ADDR", conflicts_with = "join")]
    pub docker_listen: Option<SocketAddr>,
    /// Head: largest image upload the Docker API accepts (`docker import`, `docker load`).
    #[arg(long, value_name = "SIZE", default_value = "4G", value_parser = crate::docker::parse_size)]
    pub docker_max_upload: u64,
    /// Head: where Docker networks created without --subnet get one, CIDR[/SIZE]
    /// (repeatable; default moby's pools: the /16s of 172.17-172.31, then /20s of 192.168/16).
    #[arg(long, value_name = "CIDR[/SIZE]", value_parser = crate::docker::networks::parse_pool,
          conflicts_with = "join")]
    pub docker_subnet_pool: Vec<crate::docker::networks::SubnetPool>,
    /// Host name this server registers with (default: the kernel's host name).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Dataplane worker threads. The dataplane runs exactly one worker today (several workers
    /// per host are a later issue), so only 1 is accepted.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Dataplane busy-poll budget in microseconds. The dataplane never busy-polls today, so
    /// only 0 is accepted.
    #[arg(long, value_name = "US")]
    pub poll_us: Option<u64>,
    /// Seconds between the agent's heartbeats.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub heartbeat_secs: u64,
}

/// Everything `fabric up` decided before starting anything (pure, unit tested).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// This host's server UUID.
    pub server_uuid: String,
    /// The control plane the agent talks to, `https://IP:PORT`.
    pub control_url: String,
    /// Head: where the HTTP API listens, the store, where Portolan listens, where the Docker
    /// API listens.
    pub head: Option<HeadPlan>,
    /// The data directory.
    pub data: PathBuf,
}

/// The head's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadPlan {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// The Docker API's listen address.
    pub docker: SocketAddr,
    /// Store URL.
    pub store: String,
    /// Portolan's listen address for plain SVP (foreign peers such as illumos varpd; member
    /// addresses only).
    pub portolan: SocketAddr,
    /// Portolan's SVP-over-TLS address (fabric's own hosts, with their host certificates).
    pub portolan_tls: SocketAddr,
}

impl UpArgs {
    /// The plan for these arguments and this host's server UUID.
    pub fn plan(&self, server_uuid: &str) -> anyhow::Result<Plan> {
        if self.underlay.is_unspecified() {
            bail!(
                "--underlay {}: expected this host's own address on the underlay, not a wildcard",
                self.underlay
            );
        }
        let (control_url, head) = match &self.join {
            Some(url) => {
                let u = join::control_url(url)?;
                if !u.0.tls {
                    bail!("--join {url}: a cluster's control plane speaks https; expected --join https://HOST:PORT");
                }
                (url.trim_end_matches('/').to_string(), None)
            }
            None => {
                let listen = self.listen.unwrap_or(SocketAddr::new(self.underlay, 8080));
                let store = self
                    .store
                    .clone()
                    .unwrap_or_else(|| format!("sqlite:{}", self.data.join("fabric.db").display()));
                let reach = if listen.ip().is_unspecified() {
                    SocketAddr::new(self.underlay, listen.port())
                } else {
                    listen
                };
                (
                    format!("https://{reach}"),
                    Some(HeadPlan {
                        listen,
                        docker: self
                            .docker_listen
                            .unwrap_or_else(|| crate::docker::default_listen(listen)),
                        store,
                        portolan: SocketAddr::new(self.underlay, PORTOLAN_PORT),
                        portolan_tls: SocketAddr::new(self.underlay, PORTOLAN_TLS_PORT),
                    }),
                )
            }
        };
        Ok(Plan {
            server_uuid: server_uuid.to_string(),
            control_url,
            head,
            data: self.data.clone(),
        })
    }
}

/// Reads `DIR/server-uuid`, or generates a random (v4) UUID and writes it there (atomically).
pub fn server_uuid(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("server-uuid");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let u = s.trim().to_ascii_lowercase();
            crate::control::params::parse_uuid(&u).ok_or_else(|| {
                anyhow!(
                    "{} holds {:?}: expected a UUID (remove the file to make a new identity)",
                    path.display(),
                    s.trim()
                )
            })?;
            Ok(u)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let u = new_uuid()?;
            let tmp = dir.join(".server-uuid.tmp");
            std::fs::write(&tmp, format!("{u}\n"))
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
            Ok(u)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn new_uuid() -> anyhow::Result<String> {
    crate::control::params::random_uuid()
        .map_err(|e| anyhow!("no randomness for a server UUID: {e}"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The control plane's settings for the head: agents and joining hosts are told the head's
/// Portolan address, and on PostgreSQL the change feed LISTENs so other instances' writes wake
/// long-polls at once.
fn head_config(head: &HeadPlan) -> crate::control::Config {
    crate::control::Config {
        portolan_advertise: Some(head.portolan.to_string()),
        store_url: Some(crate::control::changes::feed::StoreUrl(head.store.clone())),
        ..crate::control::Config::default()
    }
}

/// Entry point of `fabric up`.
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    if let Some(w) = args.workers.filter(|&w| w != 1) {
        bail!("--workers {w}: the dataplane runs one worker per host today; expected 1");
    }
    if let Some(p) = args.poll_us.filter(|&p| p != 0) {
        bail!("--poll-us {p}: the dataplane never busy-polls today; expected 0");
    }
    if crate::io::process::effective_uid() != 0 {
        bail!("{NEEDS_ROOT}");
    }
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating the data directory {}", args.data.display()))?;
    for sub in ["logs", "run", "agent"] {
        let d = args.data.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let uuid = server_uuid(&args.data)?;
    let plan = args.plan(&uuid)?;
    if plan.head.is_some() && args.token.is_some() {
        tracing::warn!("ignoring the join token (--token or FABRIC_JOIN_TOKEN): without --join this host is the head");
    }
    match crate::io::rlimit::raise_nofile() {
        Ok(n) => tracing::debug!(nofile = n, "RLIMIT_NOFILE raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("fabric-up")
        .build()
        .context("cannot start the tokio runtime")?;
    let hostname = args.hostname.clone().unwrap_or_else(hostname);
    tracing::info!(server_uuid = %uuid, data = %args.data.display(), "fabric up");

    // Head: the cluster CA, the control plane (TLS + the operator's socket) and Portolan on
    // this runtime, over one store.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // A server task that ends by itself (an error) reports here and stops `fabric up`.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<anyhow::Result<()>>();
    let mut servers = Vec::new();
    let tls_dir = join::tls_dir(&args.data);
    let mut portolan_tls: Option<String> = None;
    if let Some(head) = &plan.head {
        let mut ips = vec![args.underlay, IpAddr::from([127, 0, 0, 1])];
        if !head.listen.ip().is_unspecified() {
            ips.push(head.listen.ip());
        }
        ips.sort();
        ips.dedup();
        let mut names = vec!["localhost".to_string()];
        for san in &args.san {
            match san.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => names.push(san.clone()),
            }
        }
        let tls = crate::control::cluster::HeadTls::prepare(&args.data, &uuid, &ips, &names)?;
        join::head_identity(&args.data, &tls.ca, &uuid, args.cert_lifetime)?;
        portolan_tls = Some(head.portolan_tls.to_string());
        let mut cfg = tls.configure(head_config(head), args.cert_lifetime, portolan_tls.clone());
        let docker = rt.block_on(crate::control::cluster::DockerListener::bind(
            &args.data,
            head.docker,
            &ips,
            &names,
            args.docker_max_upload,
        ))?;
        cfg.docker = Some(docker.tls.pki.clone());
        if !args.docker_subnet_pool.is_empty() {
            cfg.docker_pool = args.docker_subnet_pool.clone();
        }
        tracing::info!(addr = %head.docker, "Docker API (TLS, accounts CA) listening");
        let store = rt.block_on(crate::control::open_store(&head.store, &cfg))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(head.listen))
            .with_context(|| format!("cannot listen on {} (HTTPS)", head.listen))?;
        let sock = {
            let _rt = rt.enter();
            crate::control::cluster::bind_socket(&args.data)?
        };
        // Portolan answers members only: plain SVP by source address (foreign peers such as
        // illumos varpd, listed with `fabric peer add`), SVP over TLS by host certificate.
        let access: Arc<dyn portolan::server::Access> =
            Arc::new(crate::pki::svp::SvpAccess::new(tls.trust.clone()));
        let svp = rt
            .block_on(portolan::server::Server::bind(
                portolan::server::ServerConfig {
                    listen: head.portolan,
                    ..Default::default()
                },
                store.clone(),
            ))
            .with_context(|| format!("cannot listen on {} (Portolan SVP)", head.portolan))?
            .with_access(access.clone());
        let svp_tls = rt
            .block_on(portolan::server::Server::bind_with(
                portolan::server::ServerConfig {
                    listen: head.portolan_tls,
                    ..Default::default()
                },
                store.clone(),
                crate::pki::svp::SvpTlsAcceptor::new(
                    tls.server_config(crate::pki::tls::ClientAuth::Required)?,
                ),
            ))
            .with_context(|| {
                format!(
                    "cannot listen on {} (Portolan SVP over TLS)",
                    head.portolan_tls
                )
            })?
            .with_access(access);
        tracing::info!(addr = %head.listen, store = %store.describe(), "control plane (HTTPS) listening");
        tracing::info!(addr = %head.portolan, tls = %head.portolan_tls, "Portolan (SVP, SVP over TLS) listening");
        let stopped = || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let stop = stopped();
        let control = async move {
            crate::control::cluster::serve(listener, sock, Some(docker), store, cfg, &tls, stop)
                .await
        };
        servers.push(spawn_server(
            &rt,
            &done_tx,
            "control plane HTTP server",
            control,
        ));
        let svp = svp.run(stopped());
        servers.push(spawn_server(&rt, &done_tx, "Portolan server", svp));
        let svp_tls = svp_tls.run(stopped());
        servers.push(spawn_server(
            &rt,
            &done_tx,
            "Portolan server (TLS)",
            svp_tls,
        ));
    }

    // Register (head: over its own operator socket; a joining host: join with the token, or
    // resume with its certificate), learn Portolan's address.
    let registered = rt.block_on(async {
        let control = join::control_url(&plan.control_url)?;
        let joined = match &plan.head {
            Some(_) => None,
            None => tokio::select! {
                r = join::join(&plan.control_url, args.token.as_deref(), &args.data, &uuid, args.underlay, &hostname) => r?,
                _ = shutdown_signal() => return Ok(None),
            },
        };
        let client = || -> anyhow::Result<HttpClient> {
            Ok(match &plan.head {
                Some(_) => HttpClient::unix(crate::control::cluster::socket_path(&args.data)),
                None => HttpClient::https(
                    control.1,
                    crate::pki::tls::server_name(&control.0.host)?,
                    crate::pki::tls::client_config(&tls_dir)?,
                ),
            })
        };
        let portolan = tokio::select! {
            r = register(&plan.control_url, client, &uuid, args.underlay, &hostname) => r?,
            _ = shutdown_signal() => return Ok(None),
        };
        let joined = joined.unwrap_or_default();
        let (p, t) = portolan;
        Ok::<_, anyhow::Error>(Some((
            p.or(joined.portolan),
            portolan_tls.clone().or(t).or(joined.portolan_tls),
        )))
    });
    let (portolan, portolan_tls) = match registered {
        Ok(Some((p, t))) => match (&plan.head, p) {
            (Some(h), _) => (h.portolan.to_string(), t),
            (None, Some(p)) => (p, t),
            (None, None) => {
                let c = join::control_url(&plan.control_url)?.1;
                let p = SocketAddr::new(c.ip(), PORTOLAN_PORT).to_string();
                tracing::warn!(portolan = %p, "the control plane advertises no Portolan address; using its host");
                (p, t)
            }
        },
        Ok(None) => {
            stop_servers(&rt, stop_tx, servers);
            return Ok(());
        }
        Err(e) => {
            stop_servers(&rt, stop_tx, servers);
            return Err(e);
        }
    };
    tracing::info!(server_uuid = %uuid, control = %plan.control_url, portolan = %portolan, portolan_tls = ?portolan_tls, "registered");

    // The children.
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let d = &args.data;
    let sock = d.join("dataplane.sock");
    // fabric's own hosts speak SVP over TLS with their host certificate when the head offers
    // it (a separate `fabric control` advertises plain SVP only).
    let mut dp = vec![
        "dataplane".to_string(),
        "--underlay".into(),
        SocketAddr::new(args.underlay, VXLAN_PORT).to_string(),
        "--portolan".into(),
        portolan_tls.clone().unwrap_or_else(|| portolan.clone()),
        "--cn-uuid".into(),
        uuid.clone(),
        "--control".into(),
        sock.display().to_string(),
        "--firewall-state".into(),
        d.join("firewall.json").display().to_string(),
    ];
    if portolan_tls.is_some() {
        dp.extend(["--portolan-tls".to_string(), tls_dir.display().to_string()]);
    }
    let agent = vec![
        "agent".to_string(),
        "--control".into(),
        plan.control_url.clone(),
        "--server-uuid".into(),
        uuid.clone(),
        "--dataplane".into(),
        sock.display().to_string(),
        "--state-dir".into(),
        d.join("agent").display().to_string(),
        // Containers (layers, bundles, logs, runc state) live in the data directory: on the
        // head, its images are already in DIR/images.
        "--data".into(),
        d.display().to_string(),
        "--heartbeat-secs".into(),
        args.heartbeat_secs.to_string(),
        "--tls-dir".into(),
        tls_dir.display().to_string(),
    ];
    let dataplane = Supervisor::start(ChildSpec::new("dataplane", &exe, dp, d));
    // The agent retries by itself, but starting it once the socket is there saves a round.
    let t0 = Instant::now();
    while !sock.exists() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent = Supervisor::start(ChildSpec::new("agent", &exe, agent, d));
    tracing::info!(
        dataplane_socket = %sock.display(),
        logs = %d.join("logs").display(),
        "dataplane and agent started"
    );

    // Until SIGTERM/SIGINT, or a server task failing.
    let failed = rt.block_on(async {
        tokio::select! {
            _ = shutdown_signal() => None,
            r = done_rx.recv() => r,
        }
    });
    tracing::info!("stopping: agent, then dataplane, then the servers");
    agent.stop();
    dataplane.stop();
    stop_servers(&rt, stop_tx, servers);
    match failed {
        Some(Err(e)) => Err(e),
        Some(Ok(())) => Err(anyhow!("a server stopped by itself")),
        None => Ok(()),
    }
}

/// Runs one of the head's servers on `rt`; its end (an error, or stopping by itself) is sent to
/// `done`, which stops `fabric up`.
fn spawn_server<E>(
    rt: &tokio::runtime::Runtime,
    done: &tokio::sync::mpsc::UnboundedSender<anyhow::Result<()>>,
    what: &'static str,
    server: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    E: Into<anyhow::Error>,
{
    let done = done.clone();
    rt.spawn(async move {
        let r = server.await.map_err(|e| e.into().context(what));
        let _ = done.send(r);
    })
}

fn stop_servers(
    rt: &tokio::runtime::Runtime,
    stop: tokio::sync::watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
) {
    let _ = stop.send(true);
    rt.block_on(async {
        for s in servers {
            if tokio::time::timeout(Duration::from_secs(10), s)
                .await
                .is_err()
            {
                tracing::warn!("a server did not stop within 10 s");
            }
        }
    });
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot catch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}

/// This host's CPUs and memory (bytes, from /proc/meminfo), as registration reports them.
fn capacity() -> (Option<usize>, Option<u64>) {
    let cpus = std::thread::available_parallelism().ok().map(|n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    (cpus, memory)
}

/// `PUT /servers/:uuid` until it succeeds (retrying with backoff while the control plane is
/// unreachable or failing), then `GET /servers/:uuid/desired` for Portolan's address.
async fn register(
    control: &str,
    client: impl Fn() -> anyhow::Result<HttpClient>,
    uuid: &str,
    underlay: IpAddr,
    hostname: &str,
) -> anyhow::Result<(Option<String>, Option<String>)> {
    let (cpus, memory) = capacity();
    let body = serde_json::json!({
        "underlay_ip": underlay.to_string(),
        "hostname": hostname,
        "cpus": cpus,
        "memory_bytes": memory,
    });
    let mut backoff = Backoff::new();
    let mut c = client()?;
    loop {
        let put = c
            .json("PUT", &format!("/servers/{uuid}"), Some(&body))
            .await;
        match put {
            Ok(r) if r.status == 200 => break,
            // Refused (an underlay address taken by another server, a changed underlay address,
            // a removed server): retrying will not help.
            Ok(r) if (400..500).contains(&r.status) && r.status != 404 && r.status != 429 => {
                bail!(
                    "the control plane at {control} refused to register this server ({}): {}",
                    r.status,
                    r.message()
                )
            }
            Ok(r) => {
                tracing::warn!(status = r.status, body = %String::from_utf8_lossy(&r.body), %control, "registering: retrying")
            }
            Err(e) => {
                tracing::warn!(error = %e, %control, "registering: control plane unreachable, retrying");
                c = client()?;
            }
        }
        tokio::time::sleep(backoff.next()).await;
    }
    let mut backoff = Backoff::new();
    loop {
        match c
            .json("GET", &format!("/servers/{uuid}/desired"), None)
            .await
        {
            Ok(r) if r.status == 200 => {
                let v = r.json();
                let s = |k: &str| v[k].as_str().map(String::from);
                return Ok((s("portolan"), s("portolan_tls")));
            }
            Ok(r) => {
                tracing::warn!(status = r.status, %control, "reading the desired state: retrying")
            }
            Err(e) => {
                tracing::warn!(error = %e, %control, "reading the desired state: retrying");
                c = client()?;
            }
        }
        tokio::time::sleep(backoff.next()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> UpArgs {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            up: UpArgs,
        }
        let mut v = vec!["up", "--data", "/d", "--underlay", "192.0.2.1"];
        v.extend_from_slice(extra);
        <P as clap::Parser>::try_parse_from(v).unwrap().up
    }

    const U: &str = "0b7e5c1a-8a3b-4c55-9d21-6f1a2b3c4d5e";

    #[test]
    fn head_defaults() {
        let p = args(&[]).plan(U).unwrap();
        let h = p.head.unwrap();
        assert_eq!(h.listen, "192.0.2.1:8080".parse().unwrap());
        assert_eq!(h.portolan, "192.0.2.1:1296".parse().unwrap());
        assert_eq!(h.store, "sqlite:/d/fabric.db");
        assert_eq!(p.control_url, "https://192.0.2.1:8080");
        assert_eq!(h.portolan_tls, "192.0.2.1:1297".parse().unwrap());
        assert_eq!(p.server_uuid, U);
    }

    #[test]
    fn head_wildcard_listen_is_reached_on_the_underlay() {
        let p = args(&["--listen", "0.0.0.0:9000", "--store", "postgres://u:p@h/db"])
            .plan(U)
            .unwrap();
        assert_eq!(p.control_url, "https://192.0.2.1:9000");
        assert_eq!(p.head.unwrap().store, "postgres://u:p@h/db");
    }

    #[test]
    fn join_has_no_head() {
        let p = args(&["--join", "https://192.0.2.9:8080/"])
            .plan(U)
            .unwrap();
        assert!(p.head.is_none());
        assert_eq!(p.control_url, "https://192.0.2.9:8080");
    }

    #[test]
    fn join_conflicts_with_head_flags() {
        #[derive(clap::Parser, Debug)]
        struct P {
            #[command(flatten)]
            up: UpArgs,
        }
        let r = <P as clap::Parser>::try_parse_from([
            "up",
            "--data",
            "/d",
            "--underlay",
            "192.0.2.1",
            "--join",
            "https://192.0.2.9:8080",
            "--listen",
            "192.0.2.1:8080",
        ]);
        assert!(r.is_err());
    }

    #[test]
    fn bad_urls_and_underlay() {
        for u in ["192.0.2.9:8080", "https://", "https://h:1/x"] {
            let e = args(&["--join", u, "--token", "t"])
                .plan(U)
                .unwrap_err()
                .to_string();
            assert!(e.contains("expected"), "{u}: {e}");
        }
        let e = args(&["--join", "http://192.0.2.9:8080"])
            .plan(U)
            .unwrap_err()
            .to_string();
        assert!(e.contains("speaks https"), "{e}");
        let e = args(&[]).clone();
        let e = UpArgs {
            underlay: "0.0.0.0".parse().unwrap(),
            ..e
        }
        .plan(U)
        .unwrap_err();
        assert!(e.to_string().contains("not a wildcard"), "{e}");
    }

    #[test]
    fn server_uuid_is_generated_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("fabric-up-uuid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let a = server_uuid(&dir).unwrap();
        assert!(crate::control::params::parse_uuid(&a).is_some(), "{a}");
        assert_eq!(&a[14..15], "4", "v4: {a}");
        assert_eq!(server_uuid(&dir).unwrap(), a);
        std::fs::write(dir.join("server-uuid"), "not-a-uuid\n").unwrap();
        let e = server_uuid(&dir).unwrap_err().to_string();
        assert!(e.contains("expected a UUID"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
