//! The HTTP layer's connections under cluster security (issue 17), with real parts: fabric's
//! serving layer behind the TLS accept step (`pki::accept::HttpTls`) on loopback, certificates
//! of a real cluster CA (`pki::ca`), and the clients fabric ships (`control::client::HttpClient`
//! over https and a unix socket, the agent's HTTP/2 `agent::api::Conn`). A tiny router echoes the
//! `Peer` each request carries.

#[path = "util/temp_dir.rs"]
mod temp_dir;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use temp_dir::TempDir;

use axum::routing::get;
use axum::{Extension, Router};
use fabric::agent::api::{parse_control_url, Conn};
use fabric::control::client::HttpClient;
use fabric::http::{Limits, Server, Stats};
use fabric::pki::accept::HttpTls;
use fabric::pki::ca::{request, ClusterCa};
use fabric::pki::tls::{self, ClientAuth};
use fabric::pki::{Peer, ServerTrust, Trust};
use hyper::{Method, StatusCode};
use tokio::sync::oneshot;

const HOST: &str = "0f6c3e1e-1111-4222-8333-444455556666";
const OTHER_HOST: &str = "0f6c3e1e-1111-4222-8333-777788889999";
const LIFE: Duration = Duration::from_secs(3600);

/// A directory in the temp dir, removed on drop.
/// A cluster CA and the head's server configuration for 127.0.0.1.
struct Cluster {
    _dir: TempDir,
    ca: ClusterCa,
    trust: Arc<Trust>,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = TempDir::new("http-tls-ca");
        let ca = ClusterCa::create_or_load(&dir.0).unwrap();
        let trust = Trust::new();
        trust.set_servers(
            [HOST, OTHER_HOST].map(|u| ServerTrust {
                uuid: u.into(),
                underlay: "192.0.2.1".parse().unwrap(),
                removed: false,
            }),
            [],
        );
        Cluster {
            _dir: dir,
            ca,
            trust,
        }
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self
            .ca
            .issue_server(HOST, &["127.0.0.1".parse().unwrap()], &[], LIFE)
            .unwrap();
        let chain = format!("{cert}{}", self.ca.ca_pem());
        tls::server_config(
            self.ca.ca_pem(),
            &chain,
            &key,
            Some(self.trust.clone()),
            ClientAuth::Optional,
        )
        .unwrap()
    }

    /// A host certificate and key (PEM) for `uuid`, its key made "on the host".
    fn host_cert(&self, uuid: &str, life: Duration) -> (String, String) {
        let (csr, key) = request(uuid).unwrap();
        (self.ca.issue_host(&csr, uuid, life).unwrap(), key)
    }

    fn client(&self, addr: SocketAddr, cert: &str, key: &str) -> HttpClient {
        let cfg = tls::client_config_from(self.ca.ca_pem(), cert, key).unwrap();
        HttpClient::https(addr, tls::server_name("127.0.0.1").unwrap(), cfg)
    }

    fn anonymous(&self, addr: SocketAddr) -> HttpClient {
        let mut roots = rustls::RootCertStore::empty();
        for c in tls::pem_certs(self.ca.ca_pem()).unwrap() {
            roots.add(c).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        HttpClient::https(addr, tls::server_name("127.0.0.1").unwrap(), Arc::new(cfg))
    }

    /// Writes `ca.pem`, `cert.pem`, `key.pem` as a joined host keeps them.
    fn write_tls_dir(&self, dir: &Path, cert: &str, key: &str) {
        std::fs::write(dir.join("ca.pem"), self.ca.ca_pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
    }
}

/// `/who` answers the peer; `/wait` never answers (counted in `waiting` while it runs);
/// `/slow` answers after 1.5 s.
fn echo(waiting: Arc<AtomicU64>) -> Router {
    struct Waiting(Arc<AtomicU64>);
    impl Drop for Waiting {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    Router::new()
        .route(
            "/who",
            get(|Extension(p): Extension<Peer>| async move { format!("{p:?}") }),
        )
        .route(
            "/wait",
            get(move || async move {
                waiting.fetch_add(1, Ordering::SeqCst);
                let _w = Waiting(waiting);
                std::future::pending::<()>().await;
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                "slow done"
            }),
        )
}

/// Serves `echo()` behind TLS on an ephemeral loopback port.
struct Served {
    addr: SocketAddr,
    stats: Arc<Stats>,
    waiting: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    async fn start(c: &Cluster, addr: Option<SocketAddr>) -> Served {
        let l = tokio::net::TcpListener::bind(addr.unwrap_or(([127, 0, 0, 1], 0).into()))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let server = Server::new(Limits::default())
            .with_acceptor(HttpTls::new(c.server_config(), Some(c.trust.clone())));
        let stats = server.stats();
        let (tx, rx) = oneshot::channel();
        let waiting = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(server.serve(l, echo(waiting.clone()), async {
            let _ = rx.await;
        }));
        Served {
            addr,
            stats,
            waiting,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the server stops within 10 s")
            .unwrap()
            .unwrap();
    }

    fn count(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

async fn who(c: &mut HttpClient) -> Result<String, String> {
    let r = c
        .json("GET", "/who", None)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    Ok(String::from_utf8_lossy(&r.body).into_owned())
}

#[tokio::test]
async fn the_certificate_names_the_peer_and_foreign_ones_are_refused() {
    let c = Cluster::new();
    let s = Served::start(&c, None).await;

    // No client certificate: let in, as Anonymous (only `POST /join` will be allowed).
    assert_eq!(who(&mut c.anonymous(s.addr)).await.unwrap(), "Anonymous");

    // A host certificate: that server, with the certificate's serial.
    let (cert, key) = c.host_cert(HOST, LIFE);
    let serial = tls::serial_of(&tls::pem_certs(&cert).unwrap()[0]).unwrap();
    let mut host = c.client(s.addr, &cert, &key);
    let got = who(&mut host).await.unwrap();
    assert_eq!(
        got,
        format!(
            "{:?}",
            Peer::Host {
                server_uuid: HOST.into(),
                serial
            }
        )
    );
    // Every request of the connection carries it.
    assert_eq!(who(&mut host).await.unwrap(), got);

    // An operator certificate.
    let (cert, key) = c.ca.issue_operator("alice", LIFE).unwrap();
    let serial =
        fabric::pki::tls::serial_of(&fabric::pki::tls::pem_certs(&cert).unwrap()[0]).unwrap();
    assert_eq!(
        who(&mut c.client(s.addr, &cert, &key)).await.unwrap(),
        format!(r#"Operator {{ name: "alice", serial: Some("{serial}") }}"#)
    );

    // A host certificate from another CA: the handshake is refused, nothing is served.
    let other = Cluster::new();
    let (cert, key) = other.host_cert(HOST, LIFE);
    let failures = s.count(&s.stats.handshake_failures);
    let e = who(&mut c.client(s.addr, &cert, &key)).await.unwrap_err();
    println!("certificate of another CA: {e}");
    let t0 = Instant::now();
    while s.count(&s.stats.handshake_failures) == failures {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "handshake failure counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.stop().await;
}

/// Opens `/wait` on `client` in a task and waits until the server runs it.
async fn open_long_request(
    s: &Served,
    mut client: HttpClient,
) -> tokio::task::JoinHandle<Result<u16, String>> {
    let before = s.waiting.load(Ordering::SeqCst);
    let h = tokio::spawn(async move {
        client
            .json("GET", "/wait", None)
            .await
            .map(|r| r.status)
            .map_err(|e| e.to_string())
    });
    let t0 = Instant::now();
    while s.waiting.load(Ordering::SeqCst) <= before {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "long request started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h
}

#[tokio::test]
async fn revoking_a_host_closes_its_open_long_request_and_refuses_it_after() {
    let c = Cluster::new();
    let s = Served::start(&c, None).await;
    let (cert, key) = c.host_cert(HOST, LIFE);
    let (ocert, okey) = c.host_cert(OTHER_HOST, LIFE);
    let victim = open_long_request(&s, c.client(s.addr, &cert, &key)).await;
    let bystander = open_long_request(&s, c.client(s.addr, &ocert, &okey)).await;

    let t0 = Instant::now();
    c.trust.revoke(HOST);
    let r = tokio::time::timeout(Duration::from_secs(10), victim)
        .await
        .expect("the revoked host's long request is closed within 10 s")
        .unwrap();
    let latency = t0.elapsed();
    println!("revocation closed the open long request in {latency:?} (goal < 1 s)");
    assert!(r.is_err(), "no answer, the connection was dropped: {r:?}");
    assert_eq!(s.count(&s.stats.revoked), 1);
    // The other host's long request is untouched.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!bystander.is_finished());
    // The revoked certificate is refused from now on; the other host still gets in.
    assert!(who(&mut c.client(s.addr, &cert, &key)).await.is_err());
    assert!(who(&mut c.client(s.addr, &ocert, &okey))
        .await
        .unwrap()
        .contains(OTHER_HOST));
    bystander.abort();
    s.stop().await;
}

#[tokio::test]
async fn an_expiring_certificate_ends_its_connection() {
    let c = Cluster::new();
    let s = Served::start(&c, None).await;
    // Certificate times have one-second resolution: 3 s leaves room for the handshake.
    let (cert, key) = c.host_cert(HOST, Duration::from_secs(3));
    let t0 = Instant::now();
    let long = open_long_request(&s, c.client(s.addr, &cert, &key)).await;
    let r = tokio::time::timeout(Duration::from_secs(30), long)
        .await
        .expect("closed within 10x the certificate's life")
        .unwrap();
    println!(
        "connection of a 3 s certificate closed after {:?}",
        t0.elapsed()
    );
    assert!(r.is_err(), "{r:?}");
    assert_eq!(s.count(&s.stats.expired), 1);
    s.stop().await;
}

#[tokio::test]
async fn unix_socket_requests_carry_the_given_peer() {
    let dir = TempDir::new("http-tls-sock");
    let path = dir.0.join("control.sock");
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(Server::new(Limits::default()).serve_unix(
        l,
        echo(Arc::default()),
        Peer::Operator {
            name: "local".into(),
            serial: None,
        },
        async {
            let _ = rx.await;
        },
    ));
    let mut c = HttpClient::unix(&path);
    assert_eq!(
        who(&mut c).await.unwrap(),
        r#"Operator { name: "local", serial: None }"#
    );
    // Keep-alive over the socket: a second request on the same connection.
    assert_eq!(
        who(&mut c).await.unwrap(),
        r#"Operator { name: "local", serial: None }"#
    );
    let _ = tx.send(());
    drop(c);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_agent_runs_concurrent_calls_over_one_mtls_http2_connection() {
    let c = Cluster::new();
    let s = Served::start(&c, None).await;
    let tls_dir = TempDir::new("http-tls-agent");
    let (cert, key) = c.host_cert(HOST, LIFE);
    c.write_tls_dir(&tls_dir.0, &cert, &key);
    let url = parse_control_url(&format!("https://127.0.0.1:{}", s.addr.port())).unwrap();
    let conn = Conn::new(url, Some(tls_dir.0.clone())).unwrap();

    // One long call and, meanwhile, short ones: all on the same connection.
    let slow = {
        let conn = conn.clone();
        tokio::spawn(async move {
            conn.call(Method::GET, "/slow", None, Duration::from_secs(20))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let (st, body) = conn
            .call(Method::GET, "/who", None, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(st, StatusCode::OK);
        assert!(String::from_utf8_lossy(&body).contains(HOST), "{body:?}");
    }
    assert!(
        !slow.is_finished(),
        "short calls answered beside the long one"
    );
    let (st, body) = slow.await.unwrap().unwrap();
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"slow done"[..]));
    assert_eq!(
        s.count(&s.stats.accepted),
        1,
        "one connection for all calls"
    );
    assert_eq!(conn.connections_made(), 1);

    // The head restarts; meanwhile the host renewed its certificate: the next call
    // reconnects with the new one.
    let addr = s.addr;
    s.stop().await;
    let (cert2, key2) = c.host_cert(HOST, LIFE);
    c.write_tls_dir(&tls_dir.0, &cert2, &key2);
    let s = Served::start(&c, Some(addr)).await;
    let serial2 = tls::serial_of(&tls::pem_certs(&cert2).unwrap()[0]).unwrap();
    let (st, body) = conn
        .call(Method::GET, "/who", None, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    assert!(
        String::from_utf8_lossy(&body).contains(&serial2),
        "the renewed certificate is used: {body:?}"
    );
    assert_eq!(conn.connections_made(), 2);
    s.stop().await;
}
