//! Shared helpers for the integration tests: temporary stores, a server on 127.0.0.1:0, and
//! raw-socket SVP helpers.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portolan::server::{Acceptor, Server, ServerConfig, Stats};
use portolan::store::{self, CnUuid, OverlayMapping, Store, UnderlayMapping};
use portolan::svp::{decode_frame, Decoded, Frame, DEFAULT_MAX_PAYLOAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A temporary SQLite file, removed with its WAL files on drop.
pub struct TempDb(pub PathBuf);

impl TempDb {
    pub fn new() -> TempDb {
        let mut rnd = [0u8; 8];
        getrandom::getrandom(&mut rnd).unwrap();
        let name: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        TempDb(std::env::temp_dir().join(format!("portolan-it-{name}.db")))
    }
    pub fn url(&self) -> String {
        format!("sqlite:{}", self.0.display())
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for s in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(s);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A server running in this test's runtime.
pub struct Running {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub async fn start(store: Arc<dyn Store>, cfg: ServerConfig) -> Running {
        let cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..cfg
        };
        Running::serve(Server::bind(cfg, store).await.unwrap())
    }

    /// Runs an already bound server (another acceptor, an access policy).
    pub fn serve<A: Acceptor>(server: Server<A>) -> Running {
        let addr = server.local_addr().unwrap();
        let stats = server.stats();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Running {
            addr,
            stats,
            stop: Some(tx),
            task,
        }
    }

    /// Triggers graceful shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server did not stop within 10 s")
            .unwrap()
            .unwrap();
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.stats
            .snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }
}

pub fn cn(n: u8) -> CnUuid {
    format!("564d1a4c-0000-4000-8000-0000000000{n:02x}")
        .parse()
        .unwrap()
}

pub fn underlay_ip(n: u8) -> IpAddr {
    format!("192.168.1.{n}").parse().unwrap()
}

pub fn put_underlay(s: &dyn Store, n: u8) {
    store::with_txn(s, |tx| {
        tx.put_underlay(&UnderlayMapping {
            cn_uuid: cn(n),
            ip: underlay_ip(n),
            port: 4789,
        })
    })
    .unwrap();
}

pub fn mapping(vnet_id: u32, ip: &str, mac: &str, host: u8) -> OverlayMapping {
    OverlayMapping {
        vnet_id,
        ip: ip.parse().unwrap(),
        mac: mac.parse().unwrap(),
        cn_uuid: cn(host),
        vlan: 0,
    }
}

pub fn create(s: &dyn Store, m: &OverlayMapping) {
    store::with_txn(s, |tx| tx.create_mapping(m)).unwrap();
}

/// Reads frames from `sock` until `n` have arrived (or panics after 5 s).
pub async fn read_frames(sock: &mut TcpStream, n: usize) -> Vec<Frame> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while out.len() < n {
            while let Decoded::Complete { frame, len } =
                decode_frame(&buf, DEFAULT_MAX_PAYLOAD).unwrap()
            {
                buf.drain(..len);
                out.push(frame);
            }
            if out.len() >= n {
                break;
            }
            let k = sock.read(&mut chunk).await.unwrap();
            assert!(k > 0, "server closed after {} of {n} replies", out.len());
            buf.extend_from_slice(&chunk[..k]);
        }
    })
    .await
    .expect("replies did not arrive within 5 s");
    out
}

/// Writes `bytes` and expects the server to close the connection without replying.
pub async fn expect_closed_after(addr: SocketAddr, bytes: &[u8]) {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(bytes).await.unwrap();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut rest))
        .await
        .expect("server did not close the connection within 5 s");
    // A reset is as good as a close here.
    if r.is_ok() {
        assert!(rest.is_empty(), "server replied {rest:?} to garbage");
    }
}
