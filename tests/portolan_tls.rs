//! SVP over TLS between a real Portolan server and client on 127.0.0.1, with fabric's pieces
//! (`pki::svp`): the server's TLS acceptor (host certificates of the cluster CA; the identity
//! is the server UUID), the membership policy over `pki::Trust`, and the client's TLS connector
//! reading `ca.pem`/`cert.pem`/`key.pem` from a directory at every connection attempt.
//! Certificates come from fabric's cluster CA (`pki::ca`), the server configuration from
//! `pki::tls::server_config`; the store is a temporary SQLite file.

#[path = "util/temp_dir.rs"]
mod temp_dir;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use temp_dir::TempDir;

use fabric::pki::ca::ClusterCa;
use fabric::pki::svp::{SvpAccess, SvpTlsAcceptor, SvpTlsConnector};
use fabric::pki::tls::{self, ClientAuth};
use fabric::pki::{ServerTrust, Trust};
use portolan::client::{Client, ClientConfig, ClientError};
use portolan::server::{Server, ServerConfig, Stats};
use portolan::store::{self, OverlayMapping, Store, UnderlayMapping};
use portolan::svp::Status;

const HOST: &str = "564d1a4c-0000-4000-8000-0000000000a1";
const OTHER: &str = "564d1a4c-0000-4000-8000-0000000000a2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A private temp dir, removed on drop.
/// A cluster CA made with fabric's own `pki::ca` in a data directory of its own.
struct Ca {
    ca: ClusterCa,
    _data: TempDir,
}

const LIFETIME: Duration = Duration::from_secs(3600);

impl Ca {
    fn new(tag: &str) -> Ca {
        let data = TempDir::new(tag);
        let ca = ClusterCa::create_or_load(&data.0).unwrap();
        Ca { ca, _data: data }
    }

    /// Writes ca.pem, cert.pem, key.pem of a host (`host`) or operator identity into `dir`.
    fn write_identity(&self, dir: &Path, name: &str, host: bool) {
        let (cert, key) = if host {
            self.ca.issue_host_local(name, LIFETIME).unwrap()
        } else {
            self.ca.issue_operator(name, LIFETIME).unwrap()
        };
        std::fs::write(dir.join("ca.pem"), self.ca.ca_pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
    }

    /// The head's SVP-TLS server configuration: client certificates of this CA required,
    /// revoked hosts refused at the handshake.
    fn server_config(&self, trust: &Arc<Trust>) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self
            .ca
            .issue_server("head", &[ip("127.0.0.1")], &[], LIFETIME)
            .unwrap();
        tls::server_config(
            self.ca.ca_pem(),
            &cert,
            &key,
            Some(trust.clone()),
            ClientAuth::Required,
        )
        .unwrap()
    }
}

/// A store with both hosts' underlays (HOST at 192.0.2.1, OTHER at 192.0.2.2) and one mapping
/// on each, so both have a log.
fn store(dir: &Path) -> Arc<dyn Store> {
    let s = store::open(&format!("sqlite:{}", dir.join("p.db").display())).unwrap();
    for (uuid, at, addr, mac) in [
        (HOST, "192.0.2.1", "10.0.0.1", "02:00:00:00:00:01"),
        (OTHER, "192.0.2.2", "10.0.0.2", "02:00:00:00:00:02"),
    ] {
        store::with_txn(&*s, |tx| {
            tx.put_underlay(&UnderlayMapping {
                cn_uuid: uuid.parse().unwrap(),
                ip: ip(at),
                port: 4789,
            })?;
            tx.create_mapping(&OverlayMapping {
                vnet_id: 7,
                ip: ip(addr),
                mac: mac.parse().unwrap(),
                cn_uuid: uuid.parse().unwrap(),
                vlan: 0,
            })
        })
        .unwrap();
    }
    s
}

fn trust() -> Arc<Trust> {
    let t = Trust::new();
    t.set_servers(
        [
            ServerTrust {
                uuid: HOST.into(),
                underlay: ip("192.0.2.1"),
                removed: false,
            },
            ServerTrust {
                uuid: OTHER.into(),
                underlay: ip("192.0.2.2"),
                removed: false,
            },
        ],
        [],
    );
    t
}

fn stat(stats: &Stats, name: &str) -> u64 {
    stats
        .snapshot()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
}

fn tls_client(addr: SocketAddr, dir: &Path) -> Client {
    let mut cc = ClientConfig::new(addr);
    cc.connections = 1;
    cc.timeout = Duration::from_secs(5);
    cc.connect_timeout = Duration::from_secs(2);
    cc.backoff_cap = Duration::from_millis(500);
    cc.connector = Some(Arc::new(SvpTlsConnector::from_dir(dir)));
    Client::new(cc)
}

/// Waits (up to 20 s) for `f` to succeed; returns how long it took.
async fn until_ok<F, Fut, T>(what: &str, mut f: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let t0 = Instant::now();
    loop {
        match f().await {
            Ok(v) => return (v, t0.elapsed()),
            Err(e) if t0.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: still failing after 20 s: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_speak_svp_over_tls_with_their_certificate_until_revoked() {
    let tmp = TempDir::new("svp");
    let ca = Ca::new("ca");
    let s = store(&tmp.0);
    let trust = trust();
    let server = Server::bind_with(
        ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        },
        s.clone(),
        SvpTlsAcceptor::new(ca.server_config(&trust)),
    )
    .await
    .unwrap()
    .with_access(Arc::new(SvpAccess::new(trust.clone())));
    let addr = server.local_addr().unwrap();
    let stats = server.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    // The host: its certificate names its server UUID; it connects from 127.0.0.1, which is
    // no member address, and is served by certificate.
    let host_dir = TempDir::new("host");
    ca.write_identity(&host_dir.0, HOST, true);
    let c = tls_client(addr, &host_dir.0);
    let (hit, took) = until_ok("TLS lookup", || c.vl3(ip("10.0.0.2"), 7)).await;
    println!("first lookup over TLS answered after {took:?}");
    assert_eq!(hit.unwrap().underlay_ip, ip("192.0.2.2"));
    // Its own log is its registered underlay's, whatever its source address.
    assert!(!c.log(ip("192.0.2.1"), 1024).await.unwrap().is_empty());
    // Another host's log: refused.
    assert_eq!(
        c.log(ip("192.0.2.2"), 1024).await.unwrap_err(),
        ClientError::Status(Status::FATAL)
    );
    assert_eq!(stat(&stats, "log_refused"), 1);
    // LOG_RM of the other host's ids removes nothing.
    let theirs: Vec<_> = s
        .read_log(ip("192.0.2.2"), 100)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    c.log_rm(&theirs).await.unwrap();
    assert_eq!(
        s.read_log(ip("192.0.2.2"), 100).unwrap().len(),
        theirs.len()
    );

    // Plain SVP on the TLS port, an operator certificate, and a certificate of another CA:
    // none gets an answer; each is counted as a failed handshake.
    let mut plain = ClientConfig::new(addr);
    plain.connections = 1;
    plain.connect_timeout = Duration::from_millis(500);
    assert!(Client::new(plain).ping().await.is_err());
    let op_dir = TempDir::new("op");
    ca.write_identity(&op_dir.0, "admin", false);
    assert!(tls_client(addr, &op_dir.0).ping().await.is_err());
    let foreign_dir = TempDir::new("foreign");
    Ca::new("other-ca").write_identity(&foreign_dir.0, HOST, true);
    // Trusting the right CA but holding a certificate of another: still refused.
    std::fs::copy(host_dir.0.join("ca.pem"), foreign_dir.0.join("ca.pem")).unwrap();
    let foreign = tls_client(addr, &foreign_dir.0);
    assert!(foreign.ping().await.is_err());
    let t0 = Instant::now();
    while stat(&stats, "handshake_failed") < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "handshakes not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The connector re-reads its directory at each attempt: a good certificate written
    // there is picked up at the next reconnect, without a new client.
    ca.write_identity(&foreign_dir.0, OTHER, true);
    let (_, took) = until_ok("re-read identity", || foreign.ping()).await;
    println!("renewed identity used after {took:?}");
    assert!(!foreign.log(ip("192.0.2.2"), 1024).await.unwrap().is_empty());

    // Revocation closes the host's open session at once and refuses it from then on (its
    // reconnects fail the handshake); the other host is untouched.
    let before = stat(&stats, "access_revoked");
    let failed_before = stat(&stats, "handshake_failed");
    let t0 = Instant::now();
    trust.revoke(HOST);
    while stat(&stats, "access_revoked") == before {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "revoked host's session still open"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!("revoked host's SVP session closed after {:?}", t0.elapsed());
    assert!(c.vl3(ip("10.0.0.2"), 7).await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.vl3(ip("10.0.0.2"), 7).await.is_err());
    assert!(stat(&stats, "handshake_failed") > failed_before);
    assert!(foreign.vl3(ip("10.0.0.1"), 7).await.unwrap().is_some());

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("server stopped")
        .unwrap()
        .unwrap();
}
