//! The control plane as a cluster's head (`fabric up` on the first host, or `fabric control
//! --data DIR`): the cluster CA and join secret in `DIR/pki/`, the head's own host identity in
//! `DIR/tls/`, the API over TLS only (client certificates of the cluster CA; none only for
//! `POST /join`), and the local operator's unix socket `DIR/control.sock` (mode 0600).

use std::future::Future;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use portolan::store::Store;

use super::http::Service;
use super::join::ClusterPki;
use super::Config;
use crate::pki::accept::HttpTls;
use crate::pki::ca::ClusterCa;
use crate::pki::tls::{server_config, ClientAuth};
use crate::pki::{Peer, Trust};

/// How long the head's TLS server certificate is valid; it is issued again at every start.
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// The head's keys and membership view, ready to serve.
pub struct HeadTls {
    /// The cluster CA.
    pub ca: Arc<ClusterCa>,
    /// The TLS server certificate followed by the CA certificate (joining hosts check the
    /// token's digest against the latter).
    pub chain: String,
    /// Its key.
    pub key: String,
    /// The membership view shared by every listener of this process.
    pub trust: Arc<Trust>,
    /// The data directory.
    pub data: PathBuf,
}

impl HeadTls {
    /// Loads (or, on a first start, creates) the CA and the join secret, and issues the TLS
    /// server certificate for `ips` (every address the head is reached on) and `names`.
    pub fn prepare(
        data: &Path,
        uuid: &str,
        ips: &[IpAddr],
        names: &[String],
    ) -> anyhow::Result<HeadTls> {
        let ca = ClusterCa::create_or_load(data).context("the cluster CA")?;
        crate::pki::token::secret(data).context("the join secret")?;
        let (cert, key) = ca.issue_server(uuid, ips, names, SERVER_CERT_LIFETIME)?;
        let trust = Trust::new();
        trust.set_revoked_serials(crate::pki::cli::read_revoked(&revoked_serials_path(data))?);
        Ok(HeadTls {
            chain: format!("{cert}{}", ca.ca_pem()),
            key,
            ca: Arc::new(ca),
            trust,
            data: data.to_path_buf(),
        })
    }

    /// A server configuration with this head's certificate trusting the cluster CA.
    pub fn server_config(&self, auth: ClientAuth) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        Ok(server_config(
            self.ca.ca_pem(),
            &self.chain,
            &self.key,
            Some(self.trust.clone()),
            auth,
        )?)
    }

    /// `cfg` with this head's CA (joins, renewals) and membership view.
    pub fn configure(
        &self,
        mut cfg: Config,
        cert_lifetime: Duration,
        portolan_tls: Option<String>,
    ) -> Config {
        cfg.cluster = Some(ClusterPki {
            ca: self.ca.clone(),
            data: self.data.clone(),
            cert_lifetime,
            portolan_tls,
        });
        cfg.trust = Some(self.trust.clone());
        cfg
    }
}

/// How often the head looks at `DIR/pki/revoked-serials`.
pub const SERIALS_REFRESH: Duration = Duration::from_secs(1);

/// `DIR/pki/revoked-serials`: one revoked certificate serial (hex) per line.
pub fn revoked_serials_path(data: &Path) -> PathBuf {
    crate::pki::ca::pki_dir(data).join("revoked-serials")
}

/// `DIR/control.sock`.
pub fn socket_path(data: &Path) -> PathBuf {
    data.join("control.sock")
}

/// Binds `DIR/control.sock` (a stale one from a killed run is replaced) with mode 0600.
pub fn bind_socket(data: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    let path = socket_path(data);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the old {}", path.display())),
    }
    let l = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(l)
}

/// The Docker API's listener of a head: bound, with its TLS (accounts CA) ready.
pub struct DockerListener {
    /// The bound socket.
    pub listener: tokio::net::TcpListener,
    /// Its TLS.
    pub tls: crate::docker::DockerTls,
    /// Its settings.
    pub cfg: crate::docker::DockerConfig,
}

impl DockerListener {
    /// Prepares the accounts CA and the server certificate (`ips`, `names`, and `addr`'s own
    /// IP unless a wildcard) and binds `addr`.
    pub async fn bind(
        data: &Path,
        addr: std::net::SocketAddr,
        ips: &[IpAddr],
        names: &[String],
        max_upload: u64,
    ) -> anyhow::Result<DockerListener> {
        let mut ips = ips.to_vec();
        if !addr.ip().is_unspecified() && !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
        let tls = crate::docker::DockerTls::prepare(data, addr, &ips, names)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (Docker API)"))?;
        Ok(DockerListener {
            listener,
            tls,
            cfg: crate::docker::DockerConfig {
                data: data.to_path_buf(),
                max_upload,
            },
        })
    }
}

/// Serves the API on `listener` (TLS) and `sock` (the local operator), and the Docker API on
/// `docker` if given, until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sock: tokio::net::UnixListener,
    docker: Option<DockerListener>,
    store: Arc<dyn Store>,
    cfg: Config,
    head: &HeadTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limits = cfg.http.clone();
    let tls = HttpTls::new(
        head.server_config(ClientAuth::Optional)?,
        Some(head.trust.clone()),
    );
    let svc = Service::start(store, cfg);
    let stats = svc.app.metrics.http.clone();
    // `fabric cert revoke` writes DIR/pki/revoked-serials; a revocation counts within a second.
    let serials = {
        let (trust, path) = (head.trust.clone(), revoked_serials_path(&head.data));
        tokio::spawn(async move {
            let mut seen = None;
            let mut tick = tokio::time::interval(SERIALS_REFRESH);
            loop {
                tick.tick().await;
                let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                if mtime != seen {
                    seen = mtime;
                    match crate::pki::cli::read_revoked(&path) {
                        Ok(s) => trust.set_revoked_serials(s),
                        Err(e) => tracing::warn!(error = %e, "reading the revoked serials"),
                    }
                }
            }
        })
    };
    let feed = svc.app.feed.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let tcp = crate::http::Server::new(limits.clone())
        .with_stats(stats.clone())
        .with_acceptor(tls)
        .with_streaming(super::http::streams_body)
        .serve(listener, svc.router(), stopped());
    let unix = crate::http::Server::new(limits)
        .with_stats(stats)
        .serve_unix(
            sock,
            svc.router(),
            Peer::Operator {
                name: "local".into(),
                serial: None,
            },
            stopped(),
        );
    let docker =
        docker.map(|d| crate::docker::serve(d.listener, svc.app.clone(), d.cfg, d.tls, stopped()));
    let docker = async move {
        match docker {
            Some(d) => d.await,
            None => Ok(()),
        }
    };
    let tunnels = svc.app.tunnels.clone();
    let stop = async move {
        shutdown.await;
        // Long-polls answer at once when the service stops, so it does not wait for them.
        feed.close();
        tunnels.close();
        let _ = stop_tx.send(true);
    };
    let (a, b, c, ()) = tokio::join!(tcp, unix, docker, stop);
    serials.abort();
    drop(svc);
    a.context("control plane HTTPS")?;
    b.context("control plane unix socket")?;
    c?;
    Ok(())
}
