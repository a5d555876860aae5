//! The Docker Remote API (`specs/docker-remote-api.md`): the stock `docker` CLI and docker-py
//! drive a virtual Docker host that spans every server of the cluster, over TLS with a client
//! certificate per account; each account sees only its own networks, containers and images
//! (plus the networks the operator shares with everyone).
//!
//! Served by the head (`fabric up`, `fabric control --data DIR --docker-listen ADDR`) in the
//! control plane's process, over the same store: a Docker network is a fabric VLAN and fabric
//! network of the account's owner UUID, a Docker container (next issue) a VM.
//!
//! Trust (DESIGN "Trust"): the listener accepts client certificates of the **accounts CA**
//! (`DIR/pki/accounts-ca.*`) only; host and operator certificates of the cluster CA fail the
//! handshake, and a removed account's certificates are refused in the handshake and their open
//! connections closed ([`DockerPki::trust`], refreshed from the store every second and right
//! after a removal). The server certificate is in `DIR/docker-tls/`, with every listen address
//! as a SAN.
//!
//! Module map: [`api`] (version prefix, the calling account, dispatch, moby's conventions),
//! [`error`] (`{"message"}` bodies), [`system`] (`/_ping`, `/version`, `/info`),
//! [`accounts`] (accounts and their certificates in the store, `/accounts` of the control
//! API), [`networks`] (Docker networks over fabric VLANs and networks) with [`filters`]
//! (moby's `filters` parameter) and [`shared`] (networks the operator shares with every
//! account, `fabric network share|unshare|shared`), images ([`layers`]: the content-addressed
//! blob store in `DIR/images/`; [`archive`]: `docker import` tars and `docker save` archives,
//! checked member by member; [`images`]: image metadata per account; [`images_api`]: the
//! routes, uploads streamed), [`containers`] (none run yet: the answers say so), [`cli`]
//! (`fabric account …`).

pub mod accounts;
pub mod api;
pub mod archive;
pub mod cli;
pub mod containers;
pub mod error;
pub mod filters;
pub mod hijack;
pub mod images;
pub mod images_api;
pub mod layers;
pub mod networks;
pub mod shared;
pub mod system;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use portolan::store;

use crate::control::db::Db;
use crate::control::http::App;
use crate::pki::accept::HttpTls;
use crate::pki::ca::{Ca, CaKind};
use crate::pki::tls::{server_config, ClientAuth};
use crate::pki::Trust;

/// The Docker API's tables (created with the control plane's schema).
pub const SCHEMA: &[&[&str]] = &[accounts::SCHEMA, networks::SCHEMA, images::SCHEMA];

/// The Docker API's default port (Docker's TLS port).
pub const DEFAULT_PORT: u16 = 2376;
/// How long the Docker API's server certificate is valid; it is issued again at every start.
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How often the listener's view of revoked account certificates is refreshed from the store.
pub const REVOCATION_REFRESH: Duration = Duration::from_secs(1);

/// The Docker API's settings.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// The head's data directory (images are kept in `DIR/images/`).
    pub data: PathBuf,
    /// Largest request body of an image upload (`docker import`, `docker load`).
    pub max_upload: u64,
}

/// The accounts CA as the control plane uses it (`/accounts/:login/certificates`), and the
/// Docker listener's revocation view.
#[derive(Debug, Clone)]
pub struct DockerPki {
    /// The accounts CA.
    pub ca: Arc<Ca>,
    /// Where the Docker API is reached (`tcp://IP:PORT`), told to `fabric account add`.
    pub endpoint: Option<String>,
    /// Serials of removed accounts' certificates: refused by the listener.
    pub trust: Arc<Trust>,
}

/// The Docker listener's TLS: the accounts CA and the server certificate.
pub struct DockerTls {
    /// The accounts CA and revocation view.
    pub pki: DockerPki,
    /// The server configuration (client certificates of the accounts CA required).
    pub server: Arc<rustls::ServerConfig>,
}

/// `DIR/docker-tls`.
pub fn tls_dir(data: &Path) -> PathBuf {
    data.join("docker-tls")
}

impl DockerTls {
    /// Loads (or, the first time, creates) the accounts CA in `DIR/pki/`, issues the server
    /// certificate for `ips` and `names` into `DIR/docker-tls/`, and builds the listener's TLS
    /// configuration for `listen`.
    pub fn prepare(
        data: &Path,
        listen: SocketAddr,
        ips: &[IpAddr],
        names: &[String],
    ) -> anyhow::Result<DockerTls> {
        let ca = Ca::create_or_load_kind(data, CaKind::Accounts).context("the accounts CA")?;
        let (cert, key) = ca.issue_server("fabric-docker", ips, names, SERVER_CERT_LIFETIME)?;
        let dir = tls_dir(data);
        crate::pki::files::write_cert(&dir.join("ca.pem"), ca.ca_pem())?;
        crate::pki::files::write_cert(&dir.join("cert.pem"), &cert)?;
        crate::pki::files::write_key(&dir.join("key.pem"), &key)?;
        let trust = Trust::new();
        let server = server_config(
            ca.ca_pem(),
            &cert,
            &key,
            Some(trust.clone()),
            ClientAuth::Required,
        )?;
        let reach = if listen.ip().is_unspecified() {
            ips.iter()
                .find(|ip| !ip.is_loopback())
                .or(ips.first())
                .map(|ip| SocketAddr::new(*ip, listen.port()))
        } else {
            Some(listen)
        };
        Ok(DockerTls {
            pki: DockerPki {
                ca: Arc::new(ca),
                endpoint: reach.map(|a| format!("tcp://{a}")),
                trust,
            },
            server,
        })
    }
}

/// The service's state.
pub struct Docker {
    /// The control plane's state (store, settings, feed) this API shares.
    pub app: Arc<App>,
    /// Settings.
    pub cfg: DockerConfig,
    /// The "host" ID `/info` shows (from the accounts CA's digest: stable per cluster).
    pub cluster_id: String,
    /// The image blobs (`DIR/images/`).
    pub layers: layers::LayerStore,
}

/// Answers of the Docker API, process-wide (shown on the control plane's `/metrics`).
#[derive(Debug)]
pub struct Answers {
    /// Requests answered 2xx/3xx.
    pub ok: AtomicU64,
    /// Requests answered 4xx (refused: bad input, not found, conflicts, no account).
    pub client_errors: AtomicU64,
    /// Requests answered 5xx.
    pub server_errors: AtomicU64,
}

/// The process's Docker API answers.
pub static ANSWERS: Answers = Answers {
    ok: AtomicU64::new(0),
    client_errors: AtomicU64::new(0),
    server_errors: AtomicU64::new(0),
};

/// The Docker API's counters in Prometheus text (answers by class, uploads by outcome).
pub fn render_metrics(out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "# HELP fabric_docker_requests_total Docker API requests by answer class.
         # TYPE fabric_docker_requests_total counter"
    );
    for (class, c) in [
        ("ok", &ANSWERS.ok),
        ("client_error", &ANSWERS.client_errors),
        ("server_error", &ANSWERS.server_errors),
    ] {
        let _ = writeln!(
            out,
            "fabric_docker_requests_total{{class=\"{class}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP fabric_docker_uploads_total Image uploads (docker import, docker load) by outcome.
         # TYPE fabric_docker_uploads_total counter"
    );
    for (kind, u) in [
        ("import", &archive::COUNTERS.imports),
        ("load", &archive::COUNTERS.loads),
    ] {
        for (outcome, c) in [
            ("ok", &u.ok),
            ("refused", &u.refused),
            ("too_large", &u.too_large),
            ("failed", &u.failed),
        ] {
            let _ = writeln!(
                out,
                "fabric_docker_uploads_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
    }
}

impl Docker {
    /// The service over the control plane's `app`, its image store opened in `cfg.data`.
    pub fn new(
        app: Arc<App>,
        cfg: DockerConfig,
        cluster_id: String,
    ) -> anyhow::Result<Arc<Docker>> {
        let layers = layers::LayerStore::open(&cfg.data)
            .context("the image store")?
            .with_max_blob(cfg.max_upload);
        Ok(Arc::new(Docker {
            layers,
            cluster_id,
            app,
            cfg,
        }))
    }

    /// Counts an answer by its status.
    pub fn count(&self, status: u16) {
        let c = match status {
            500.. => &ANSWERS.server_errors,
            400..=499 => &ANSWERS.client_errors,
            _ => &ANSWERS.ok,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reloads the revoked account certificates into `trust` from the store.
pub async fn sync_revoked(app: &Arc<App>, trust: &Arc<Trust>) {
    let a = app.clone();
    let r = tokio::task::spawn_blocking(move || {
        store::with_read(&*a.store, |raw| {
            accounts::revoked_serials(&mut Db::from(raw))
        })
    })
    .await;
    match r {
        Ok(Ok(s)) => trust.set_revoked_serials(s),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read revoked account certificates; keeping the last view")
        }
        Err(e) => tracing::error!(error = %e, "account revocation refresh panicked"),
    }
}

/// The router of the Docker API over `docker`.
pub fn router(docker: Arc<Docker>) -> Router {
    Router::new().fallback(api::handle).with_state(docker)
}

/// Serves the Docker API on `listener` until `shutdown`, sharing the control plane's `app`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    cfg: DockerConfig,
    tls: DockerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut limits = app.cfg.http.clone();
    limits.max_body_bytes = usize::try_from(cfg.max_upload).unwrap_or(usize::MAX);
    let trust = tls.pki.trust.clone();
    sync_revoked(&app, &trust).await;
    let refresh = {
        let (app, trust) = (app.clone(), trust.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REVOCATION_REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                sync_revoked(&app, &trust).await;
            }
        })
    };
    let id = crate::pki::ca::hex(&tls.pki.ca.digest()[..12]).to_ascii_uppercase();
    let docker = Docker::new(app, cfg, id)?;
    tracing::info!(addr = %listener.local_addr()?, "Docker API listening (TLS, accounts CA)");
    let r = crate::http::Server::new(limits)
        .with_acceptor(HttpTls::new(tls.server.clone(), Some(trust)))
        .serve(listener, router(docker), shutdown)
        .await;
    refresh.abort();
    r.context("Docker API")
}

/// `--docker-listen`'s value for a head whose API listens on `listen`: the same IP, port 2376.
pub fn default_listen(listen: SocketAddr) -> SocketAddr {
    SocketAddr::new(listen.ip(), DEFAULT_PORT)
}

/// The default `--docker-max-upload` (4 GiB).
pub const DEFAULT_MAX_UPLOAD: u64 = 4 << 30;

/// Parses a byte size: `512`, `64k`, `100M`, `4G` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(format!("{s:?}: expected a size like 512, 64k, 100M, 4G")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?}: expected a size like 512, 64k, 100M, 4G"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65_536);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        for bad in ["", "0", "x", "4X", "-1", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
