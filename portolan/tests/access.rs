//! The server's access policy and its pluggable acceptor/connector, on a real server over a
//! temporary SQLite store on 127.0.0.1: who gets answers, whose log a host may read and trim,
//! and sessions closed when a host stops being allowed.

mod common;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use portolan::client::{BoxStream, Client, ClientConfig, ClientError, Connecting, Connector};
use portolan::server::{Acceptor, Access, Closed, Identity, LogScope, Server, ServerConfig};
use portolan::store::{self, Store, UnderlayMapping};
use portolan::svp::{to_wire_ip, Frame, LogId, Message, RequestId, Status, Vl3Req};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// A members policy like fabric's: an address is served while it is a member, its own log is
/// the log of its own address; named sessions are served while their name is not revoked and
/// their log is the underlay registered for the name.
#[derive(Default)]
struct Members {
    ips: Mutex<HashSet<IpAddr>>,
    names: Mutex<Vec<(String, IpAddr)>>,
    revoked: Mutex<Option<watch::Sender<Vec<String>>>>,
}

impl Members {
    fn with_ips(ips: &[IpAddr]) -> Arc<Members> {
        let m = Members::default();
        m.ips.lock().unwrap().extend(ips.iter().copied());
        *m.revoked.lock().unwrap() = Some(watch::channel(Vec::new()).0);
        Arc::new(m)
    }

    fn revoke(&self, name: &str) {
        self.names.lock().unwrap().retain(|(n, _)| n != name);
        if let Some(tx) = &*self.revoked.lock().unwrap() {
            tx.send_modify(|v| v.push(name.to_string()));
        }
    }
}

impl Access for Members {
    fn allowed(&self, _peer: SocketAddr, who: &Identity) -> bool {
        match who {
            Identity::Address(ip) => self.ips.lock().unwrap().contains(ip),
            Identity::Named(n) => self.names.lock().unwrap().iter().any(|(m, _)| m == n),
        }
    }

    fn log_scope(&self, _peer: SocketAddr, who: &Identity) -> LogScope {
        match who {
            Identity::Address(ip) => LogScope::Own(*ip),
            Identity::Named(n) => match self.names.lock().unwrap().iter().find(|(m, _)| m == n) {
                Some((_, ip)) => LogScope::Own(*ip),
                None => LogScope::Nothing,
            },
        }
    }

    fn closed(&self, who: &Identity) -> Closed {
        let Identity::Named(name) = who.clone() else {
            return Box::pin(std::future::pending());
        };
        let mut rx = self.revoked.lock().unwrap().as_ref().unwrap().subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|v| v.contains(&name)).await;
        })
    }
}

fn loopback() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

fn open(db: &TempDb) -> Arc<dyn Store> {
    store::open(&db.url()).unwrap()
}

fn cfg() -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    }
}

fn client(addr: SocketAddr) -> Client {
    let mut c = ClientConfig::new(addr);
    c.connections = 1;
    c.connect_timeout = Duration::from_secs(2);
    Client::new(c)
}

/// Host 1's underlay is this machine's loopback address (so its plain-SVP connections are
/// its own), host 2 is elsewhere; both have a mapping on VNI 7 and so a log.
fn two_hosts(s: &dyn Store) {
    store::with_txn(s, |tx| {
        tx.put_underlay(&UnderlayMapping {
            cn_uuid: cn(1),
            ip: loopback(),
            port: 4789,
        })
    })
    .unwrap();
    put_underlay(s, 2);
    create(s, &mapping(7, "10.0.0.1", "02:00:00:00:00:01", 1));
    create(s, &mapping(7, "10.0.0.2", "02:00:00:00:00:02", 2));
}

async fn vl3_req(sock: &mut TcpStream) {
    let req = Frame::new(
        RequestId::from_u32(5),
        Message::Vl3Req(Vl3Req {
            ip: to_wire_ip("10.0.0.1".parse().unwrap()),
            l3_type: 1,
            vnet_id: 7,
        }),
    );
    sock.write_all(&req.to_bytes()).await.unwrap();
}

/// Reads until EOF (or a reset): what the server sent before closing.
async fn read_until_closed(sock: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut rest))
        .await
        .expect("server did not close the connection within 5 s");
    if r.is_err() {
        rest.clear();
    }
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_address_gets_no_mapping_and_is_closed() {
    let db = TempDb::new();
    let s = open(&db);
    two_hosts(&*s);
    let members = Members::with_ips(&["192.168.1.2".parse().unwrap()]);
    let srv = Running::serve(
        Server::bind(cfg(), s.clone())
            .await
            .unwrap()
            .with_access(members.clone()),
    );

    let mut sock = TcpStream::connect(srv.addr).await.unwrap();
    vl3_req(&mut sock).await;
    let got = read_until_closed(&mut sock).await;
    assert!(got.is_empty(), "a non-member got {} bytes", got.len());
    assert_eq!(srv.stat("access_refused"), 1);
    assert_eq!(srv.stat("vl3_requests"), 0);

    // Our own client sees a failed connect, never a mapping.
    let c = client(srv.addr);
    let err = c.vl3("10.0.0.1".parse().unwrap(), 7).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Unavailable { .. } | ClientError::ConnectionLost { .. }
        ),
        "{err:?}"
    );
    assert!(srv.stat("access_refused") >= 2);

    // Made a member, the same address is served.
    members.ips.lock().unwrap().insert(loopback());
    let c = client(srv.addr);
    let t0 = Instant::now();
    let hit = loop {
        match c.vl3("10.0.0.1".parse().unwrap(), 7).await {
            Ok(h) => break h,
            Err(e) if t0.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("member not served: {e}"),
        }
    };
    assert_eq!(hit.unwrap().mac, "02:00:00:00:00:01".parse().unwrap());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_reads_and_trims_only_its_own_log() {
    let db = TempDb::new();
    let s = open(&db);
    two_hosts(&*s);
    let members = Members::with_ips(&[loopback()]);
    let srv = Running::serve(
        Server::bind(cfg(), s.clone())
            .await
            .unwrap()
            .with_access(members),
    );
    let c = client(srv.addr);
    let own = c.log(loopback(), 1024).await.unwrap();
    assert!(!own.is_empty());
    let other_ip = underlay_ip(2);
    let theirs: Vec<LogId> = s
        .read_log(other_ip, 100)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert!(!theirs.is_empty());

    // LOG_REQ naming host 2's underlay: FATAL, no records, counted.
    let err = c.log(other_ip, 1024).await.unwrap_err();
    assert_eq!(err, ClientError::Status(Status::FATAL));
    assert_eq!(srv.stat("log_refused"), 1);
    assert_eq!(srv.stat("log_records_sent"), own.len() as u64);

    // LOG_RM of host 2's ids: acknowledged (ids not in its log are ignored, as unknown ids
    // always were), and nothing of host 2's is removed.
    c.log_rm(&theirs).await.unwrap();
    assert_eq!(s.read_log(other_ip, 100).unwrap().len(), theirs.len());
    assert_eq!(srv.stat("log_records_removed"), 0);
    // Its own ids go.
    let own_ids: Vec<LogId> = own.iter().map(|r| r.id()).collect();
    c.log_rm(&own_ids).await.unwrap();
    assert!(c.log(loopback(), 1024).await.unwrap().is_empty());
    assert_eq!(srv.stat("log_records_removed"), own_ids.len() as u64);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_gets_no_more_answers_and_is_closed() {
    let db = TempDb::new();
    let s = open(&db);
    two_hosts(&*s);
    let members = Members::with_ips(&[loopback()]);
    let srv = Running::serve(
        Server::bind(cfg(), s.clone())
            .await
            .unwrap()
            .with_access(members.clone()),
    );
    let mut sock = TcpStream::connect(srv.addr).await.unwrap();
    vl3_req(&mut sock).await;
    let replies = read_frames(&mut sock, 1).await;
    assert!(matches!(&replies[0].message, Message::Vl3Ack(a) if a.status == Status::OK));

    members.ips.lock().unwrap().clear();
    vl3_req(&mut sock).await;
    let got = read_until_closed(&mut sock).await;
    assert!(got.is_empty(), "a removed member got {} bytes", got.len());
    assert_eq!(srv.stat("access_revoked"), 1);
    assert_eq!(srv.stat("vl3_requests"), 1);
    srv.shutdown().await;
}

/// A toy handshake standing in for TLS: the client sends its name on one line first.
#[derive(Debug)]
struct NameLine(&'static str);

impl Connector for NameLine {
    fn connect(&self, mut tcp: TcpStream, _server: SocketAddr) -> Connecting {
        let name = self.0;
        Box::pin(async move {
            tcp.write_all(format!("{name}\n").as_bytes()).await?;
            Ok(Box::new(tcp) as BoxStream)
        })
    }
}

struct NameAcceptor;

impl Acceptor for NameAcceptor {
    type Io = BufReader<TcpStream>;

    async fn accept(
        &self,
        tcp: TcpStream,
        _peer: SocketAddr,
    ) -> std::io::Result<(Self::Io, Identity)> {
        let mut rd = BufReader::new(tcp);
        let mut line = String::new();
        rd.read_line(&mut line).await?;
        let name = line.trim_end().to_string();
        if name.is_empty() {
            return Err(std::io::Error::other("no name line"));
        }
        Ok((rd, Identity::Named(name)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_sessions_over_an_acceptor_use_their_own_log_and_close_on_revocation() {
    let db = TempDb::new();
    let s = open(&db);
    two_hosts(&*s);
    let members = Members::with_ips(&[]);
    members
        .names
        .lock()
        .unwrap()
        .push(("host-two".into(), underlay_ip(2)));
    let srv = Running::serve(
        Server::bind_with(cfg(), s.clone(), NameAcceptor)
            .await
            .unwrap()
            .with_access(members.clone()),
    );
    let mut cc = ClientConfig::new(srv.addr);
    cc.connections = 1;
    cc.connector = Some(Arc::new(NameLine("host-two")));
    let c = Client::new(cc);
    // Served by name, although its address is no member; its log is host 2's underlay.
    assert!(c
        .vl3("10.0.0.1".parse().unwrap(), 7)
        .await
        .unwrap()
        .is_some());
    assert!(!c.log(underlay_ip(2), 1024).await.unwrap().is_empty());
    assert_eq!(
        c.log(loopback(), 1024).await.unwrap_err(),
        ClientError::Status(Status::FATAL)
    );

    // An unknown name is refused at accept.
    let mut cc = ClientConfig::new(srv.addr);
    cc.connections = 1;
    cc.connector = Some(Arc::new(NameLine("stranger")));
    let stranger = Client::new(cc);
    assert!(stranger.ping().await.is_err());
    assert!(srv.stat("access_refused") >= 1);

    // Revocation closes the idle session at once, without waiting for a request.
    let before = srv.stat("access_revoked");
    let t0 = Instant::now();
    members.revoke("host-two");
    while srv.stat("access_revoked") == before {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "revoked session still open"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("revoked session closed after {:?}", t0.elapsed());
    assert!(c.vl3("10.0.0.1".parse().unwrap(), 7).await.is_err());

    // A connection that never completes the handshake is closed and counted.
    let mut raw = TcpStream::connect(srv.addr).await.unwrap();
    raw.write_all(b"\n").await.unwrap();
    assert!(read_until_closed(&mut raw).await.is_empty());
    assert!(srv.stat("handshake_failed") >= 1);
    srv.shutdown().await;
}
