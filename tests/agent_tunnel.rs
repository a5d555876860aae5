//! The agents' tunnel with real parts: the control plane's service (a SQLite file) behind
//! fabric's serving layer and its TLS accept step on loopback, certificates of a real cluster
//! CA, and the agent's HTTP/2 client (`agent::api::Conn` with a host certificate) running
//! `agent::tunnel::run` with a fake [`Handler`]: exec `echo CODE` echoes stdin to stdout and
//! exits with CODE; logs sends `tail` numbered lines. Covered: 20 concurrent sub-streams, a
//! slow reader that holds back only its own sub-stream (and its agent: nothing buffers without
//! bound), a restart of the control plane (the agent reconnects; new opens work), an open for
//! an unconnected server (fails at once), who may open a server's tunnel (its own host
//! certificate only: not another host's, not an operator's), and a revoked host's tunnel
//! (closed at once, and its agent cannot open it again).

#[path = "util/temp_db.rs"]
mod temp_db;
#[path = "util/temp_dir.rs"]
mod temp_dir;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric::agent::api::{parse_control_url, Api, ApiError, Conn};
use fabric::agent::tunnel::{self, Frames, Handler, Input};
use fabric::control::http::{streams_body, App, Service};
use fabric::control::tunnel::proto::{Frame, OpenRequest, StreamOp};
use fabric::control::tunnel::{Substream, TunnelError};
use fabric::control::{open_store, Config};
use fabric::http::{Limits, Server};
use fabric::pki::accept::HttpTls;
use fabric::pki::ca::{request, ClusterCa};
use fabric::pki::tls::{self, ClientAuth};
use fabric::pki::{ServerTrust, Trust};
use portolan::store::Store;
use temp_db::TempDb;
use temp_dir::TempDir;
use tokio::sync::oneshot;

const HOST: &str = "0f6c3e1e-1111-4222-8333-444455556666";
const OTHER: &str = "0f6c3e1e-1111-4222-8333-777788889999";
const LIFE: Duration = Duration::from_secs(3600);
/// Goal for the agent to (re)connect its tunnel; checks allow 10x.
const CONNECT_GOAL: Duration = Duration::from_secs(3);

struct Pki {
    dir: TempDir,
    ca: ClusterCa,
    trust: Arc<Trust>,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new("agent-tunnel");
        let ca = ClusterCa::create_or_load(&dir.0.join("ca")).unwrap();
        let trust = Trust::new();
        trust.set_servers(
            [HOST, OTHER].map(|u| ServerTrust {
                uuid: u.into(),
                underlay: "192.0.2.1".parse().unwrap(),
                removed: false,
            }),
            [],
        );
        Pki { dir, ca, trust }
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

    /// A TLS dir (`ca.pem`, `cert.pem`, `key.pem`) named `name` holding `cert`/`key`.
    fn tls_dir(&self, name: &str, cert: &str, key: &str) -> std::path::PathBuf {
        let d = self.dir.0.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca.pem"), self.ca.ca_pem()).unwrap();
        std::fs::write(d.join("cert.pem"), cert).unwrap();
        std::fs::write(d.join("key.pem"), key).unwrap();
        d
    }

    fn host_dir(&self, uuid: &str) -> std::path::PathBuf {
        let (csr, key) = request(uuid).unwrap();
        let cert = self.ca.issue_host(&csr, uuid, LIFE).unwrap();
        self.tls_dir(uuid, &cert, &key)
    }

    fn operator_dir(&self) -> std::path::PathBuf {
        let (cert, key) = self.ca.issue_operator("ops", LIFE).unwrap();
        self.tls_dir("operator", &cert, &key)
    }
}

/// The control plane's service on `addr` (or an ephemeral port), TLS with the cluster CA.
struct Control {
    addr: SocketAddr,
    app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Control {
    async fn start(pki: &Pki, store: Arc<dyn Store>, addr: Option<SocketAddr>) -> Control {
        let mut listener = None;
        // The port of a stopped instance may take a moment to be free again.
        for _ in 0..50 {
            match tokio::net::TcpListener::bind(addr.unwrap_or(([127, 0, 0, 1], 0).into())).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let listener = listener.expect("bind the control plane's port");
        let addr = listener.local_addr().unwrap();
        // No membership refresh from the (empty) store: the test's Trust names the servers.
        let svc = Service::start(store, Config::default());
        let app = svc.app.clone();
        let server = Server::new(Limits::default())
            .with_acceptor(HttpTls::new(pki.server_config(), Some(pki.trust.clone())))
            .with_streaming(streams_body);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let closer = svc.app.clone();
            let _ = server
                .serve(listener, svc.router(), async move {
                    let _ = rx.await;
                    closer.feed.close();
                    closer.tunnels.close();
                })
                .await;
            drop(svc);
        });
        Control {
            addr,
            app,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .expect("the control plane stops within 20 s")
            .unwrap();
    }

    fn api(&self, tls_dir: &Path, server: &str) -> Api {
        let url = parse_control_url(&format!("https://{}", self.addr)).unwrap();
        Api::new(Conn::new(url, Some(tls_dir.to_path_buf())).unwrap(), server)
    }

    async fn wait_connected(&self, server: &str) -> Duration {
        let t0 = Instant::now();
        while !self.app.tunnels.is_connected(server) {
            assert!(
                t0.elapsed() < CONNECT_GOAL * 10,
                "the agent's tunnel did not connect within {:?}",
                CONNECT_GOAL * 10
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        t0.elapsed()
    }
}

/// The fake runtime (the lines its logs streams sent so far are in [`LOG_FRAMES`]).
#[derive(Default)]
struct Fake;

const LINE: usize = 1024;

impl Handler for Fake {
    fn serve(
        &self,
        req: OpenRequest,
        mut input: Input,
        output: Frames,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            match req.op {
                StreamOp::Exec { cmd, .. } if cmd.first().map(String::as_str) == Some("echo") => {
                    let code: i32 = cmd.get(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                    if output
                        .send(Frame::Started { pid: Some(4242) })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    while let Some(f) = input.recv().await {
                        let sent = match f {
                            Frame::Stdin(d) => output.send(Frame::Stdout(d)).await,
                            Frame::StdinEof => break,
                            _ => Ok(()),
                        };
                        if sent.is_err() {
                            return;
                        }
                    }
                    let _ = output.send(Frame::Exit { code }).await;
                }
                StreamOp::Exec { cmd, .. } if cmd.first().map(String::as_str) == Some("deaf") => {
                    // Never reads its input; ends when the control side goes away.
                    let _ = output.send(Frame::Started { pid: None }).await;
                    output.closed().await;
                    drop(input);
                }
                StreamOp::Logs { tail, .. } => {
                    for i in 0..tail.unwrap_or(10) {
                        let mut line = format!("{i:08}").into_bytes();
                        line.resize(LINE - 1, b'.');
                        line.push(b'\n');
                        if output.send(Frame::Stdout(line)).await.is_err() {
                            return;
                        }
                        LOG_FRAMES.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = output.send(Frame::Exit { code: 0 }).await;
                }
                op => {
                    let _ = output
                        .send(Frame::Error(format!("the fake handler does not do {op:?}")))
                        .await;
                }
            }
        })
    }
}

/// Lines sent by the fake's logs streams (only one test reads logs through an agent).
static LOG_FRAMES: AtomicU64 = AtomicU64::new(0);

fn exec(code: i32) -> StreamOp {
    StreamOp::Exec {
        cmd: vec!["echo".into(), code.to_string()],
        env: vec![],
        user: String::new(),
        working_dir: String::new(),
        tty: false,
        stdin: true,
    }
}

fn deaf_exec() -> StreamOp {
    StreamOp::Exec {
        cmd: vec!["deaf".into()],
        env: vec![],
        user: String::new(),
        working_dir: String::new(),
        tty: false,
        stdin: true,
    }
}

fn logs(lines: u64) -> StreamOp {
    StreamOp::Logs {
        follow: false,
        tail: Some(lines),
        since_ns: None,
        until_ns: None,
        timestamps: false,
        stdout: true,
        stderr: false,
    }
}

/// One echo exec through the tunnel: stdin frames come back as stdout, then the exit code.
async fn echo_round(app: &App, code: i32) {
    let Substream { input, mut output } = app
        .tunnels
        .open(HOST, "vm-1", exec(code))
        .await
        .unwrap_or_else(|e| panic!("open {code}: {e}"));
    assert_eq!(
        output.recv().await,
        Some(Frame::Started { pid: Some(4242) })
    );
    for k in 0..3 {
        let msg = format!("stream {code} message {k}\n").into_bytes();
        input.send(Frame::Stdin(msg.clone())).await.unwrap();
        assert_eq!(
            output.recv().await,
            Some(Frame::Stdout(msg)),
            "stream {code}"
        );
    }
    input.send(Frame::StdinEof).await.unwrap();
    assert_eq!(output.recv().await, Some(Frame::Exit { code }));
    assert_eq!(output.recv().await, None, "the agent ends its side");
}

async fn store(db: &TempDb) -> Arc<dyn Store> {
    open_store(&db.url(), &Config::default()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn substreams_run_concurrently_and_a_slow_reader_holds_back_only_itself() {
    let pki = Pki::new();
    let db = TempDb::new("agent-tunnel");
    let c = Control::start(&pki, store(&db).await, None).await;
    let agent = tokio::spawn(tunnel::run(
        c.api(&pki.host_dir(HOST), HOST),
        Arc::new(Fake),
    ));
    println!("tunnel connected after {:?}", c.wait_connected(HOST).await);

    // 20 sub-streams at once.
    let t0 = Instant::now();
    let mut all = Vec::new();
    for code in 0..20 {
        let app = c.app.clone();
        all.push(tokio::spawn(async move { echo_round(&app, code).await }));
    }
    for t in all {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("20 echo sub-streams finish within 30 s")
            .unwrap();
    }
    println!("20 concurrent echo sub-streams: {:?}", t0.elapsed());

    // Three logs streams of 8 MB nobody reads for now: the agent is held back (far fewer
    // lines sent than it has: nothing buffers without bound), and another sub-stream still
    // works (HTTP/2 flow control stalls only the unread streams, not the connection).
    const LINES: u64 = 8 * 1024;
    LOG_FRAMES.store(0, Ordering::SeqCst);
    let mut slow = c.app.tunnels.open(HOST, "vm-1", logs(LINES)).await.unwrap();
    // Two more nobody reads at all (dropped at the end).
    let _stalled = [
        c.app.tunnels.open(HOST, "vm-1", logs(LINES)).await.unwrap(),
        c.app.tunnels.open(HOST, "vm-1", logs(LINES)).await.unwrap(),
    ];
    let t0 = Instant::now();
    let mut last = 0;
    // Until the handler stops making progress (its output is full all the way back).
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = LOG_FRAMES.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        last = now;
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the slow stream never stalls"
        );
    }
    println!(
        "3 unread logs streams stalled after {last} of 3 x {LINES} lines ({} KiB in flight)",
        last * LINE as u64 / 1024
    );
    assert!(
        last < LINES / 2,
        "the agent was held back by flow control ({last} of {LINES} lines sent)"
    );
    let t1 = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), echo_round(&c.app, 77))
        .await
        .expect("another sub-stream works beside a stalled one");
    println!("echo beside a stalled stream: {:?}", t1.elapsed());
    // Now read it all: every line in order, then the exit.
    let mut n = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.output.recv())
            .await
            .expect("the logs stream moves again")
        {
            Some(Frame::Stdout(d)) => {
                assert_eq!(d.len(), LINE);
                assert_eq!(&d[..8], format!("{n:08}").as_bytes());
                n += 1;
            }
            Some(Frame::Exit { code: 0 }) => break,
            f => panic!("unexpected {f:?}"),
        }
    }
    assert_eq!(n, LINES);

    // The other way: three processes that never read their stdin, fed until it stalls; the
    // tunnel still opens new sub-streams and they work.
    let mut deaf = Vec::new();
    let mut fed = 0usize;
    for _ in 0..3 {
        let mut sub = c.app.tunnels.open(HOST, "vm-1", deaf_exec()).await.unwrap();
        assert_eq!(sub.output.recv().await, Some(Frame::Started { pid: None }));
        let chunk = vec![b'x'; 64 << 10];
        loop {
            let send = sub.input.send(Frame::Stdin(chunk.clone()));
            match tokio::time::timeout(Duration::from_millis(300), send).await {
                Ok(r) => r.unwrap(),
                Err(_) => break,
            }
            fed += chunk.len();
            assert!(
                fed < 64 << 20,
                "stdin of a deaf process is buffered without bound"
            );
        }
        deaf.push(sub);
    }
    println!(
        "3 deaf processes took {} KiB of stdin before it stalled",
        fed >> 10
    );
    tokio::time::timeout(Duration::from_secs(10), echo_round(&c.app, 78))
        .await
        .expect("a new sub-stream works beside stalled stdin");
    drop(deaf);

    let mut text = String::new();
    c.app.tunnels.render(&mut text);
    println!("{text}");
    assert!(text.contains("fabric_control_tunnel_events_total{kind=\"accepted\"} 28"));

    // The control plane stops with the agent still running and sub-streams stalled both
    // ways: the stop does not wait on them.
    c.stop().await;
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_after_a_control_plane_restart() {
    let pki = Pki::new();
    let db = TempDb::new("agent-tunnel-restart");
    let st = store(&db).await;
    let c = Control::start(&pki, st.clone(), None).await;
    let addr = c.addr;
    let agent = tokio::spawn(tunnel::run(
        c.api(&pki.host_dir(HOST), HOST),
        Arc::new(Fake),
    ));
    c.wait_connected(HOST).await;
    echo_round(&c.app, 1).await;
    c.stop().await;

    let c = Control::start(&pki, st, Some(addr)).await;
    let waited = c.wait_connected(HOST).await;
    println!("tunnel back {waited:?} after the restart");
    echo_round(&c.app, 2).await;
    agent.abort();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_fail_fast_and_only_the_hosts_own_certificate_opens_its_tunnel() {
    let pki = Pki::new();
    let db = TempDb::new("agent-tunnel-policy");
    let c = Control::start(&pki, store(&db).await, None).await;

    // Nobody connected: NotConnected at once, saying which host.
    let t0 = Instant::now();
    let e = c
        .app
        .tunnels
        .open(OTHER, "vm-9", logs(1))
        .await
        .unwrap_err();
    assert_eq!(e, TunnelError::NotConnected(OTHER.into()));
    assert!(
        e.to_string()
            .contains(&format!("host {OTHER} is not connected")),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());

    let path = format!("/servers/{HOST}/tunnel");
    // Another host's certificate.
    let other = c.api(&pki.host_dir(OTHER), OTHER);
    match other.get_stream(&path).await {
        Err(ApiError::Status {
            status: 403, body, ..
        }) => {
            assert!(
                body.contains(OTHER) && body.contains("acts only for that server"),
                "{body}"
            )
        }
        r => panic!("{:?}", r.map(|_| ())),
    }
    // And its POST for a sub-stream of HOST.
    let e = other
        .conn()
        .request(
            hyper::Method::POST,
            &format!("/servers/{HOST}/tunnel/x"),
            fabric::agent::api::full(Vec::new()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(e.status(), 403);
    // An operator.
    let op = c.api(&pki.operator_dir(), HOST);
    match op.get_stream(&path).await {
        Err(ApiError::Status {
            status: 403, body, ..
        }) => {
            assert!(
                body.contains("only that server's host certificate"),
                "{body}"
            )
        }
        r => panic!("{:?}", r.map(|_| ())),
    }
    // The host itself, for an id nobody asked for: 404, nothing opened.
    let own = c.api(&pki.host_dir(HOST), HOST);
    let r = own
        .conn()
        .request(
            hyper::Method::POST,
            &format!("/servers/{HOST}/tunnel/nope"),
            fabric::agent::api::full(Vec::new()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(!c.app.tunnels.is_connected(HOST));
    // Its tunnel opens.
    let _body = own.get_stream(&path).await.unwrap();
    c.wait_connected(HOST).await;
    // An agent that never answers: the open gives up with Timeout (bounded).
    let e = c
        .app
        .tunnels
        .open_within(HOST, "vm-1", logs(1), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, TunnelError::Timeout { .. }), "{e}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_hosts_tunnel_is_closed_and_stays_closed() {
    let pki = Pki::new();
    let db = TempDb::new("agent-tunnel-revoke");
    let c = Control::start(&pki, store(&db).await, None).await;
    let agent = tokio::spawn(tunnel::run(
        c.api(&pki.host_dir(HOST), HOST),
        Arc::new(Fake),
    ));
    c.wait_connected(HOST).await;
    let t0 = Instant::now();
    pki.trust.revoke(HOST);
    while c.app.tunnels.is_connected(HOST) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the revoked host's tunnel is still registered after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("revoked host's tunnel closed after {:?}", t0.elapsed());
    // Its agent keeps trying (with backoff) and is refused every time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!c.app.tunnels.is_connected(HOST));
    let e = c.app.tunnels.open(HOST, "vm-1", logs(1)).await.unwrap_err();
    assert_eq!(e, TunnelError::NotConnected(HOST.into()));
    agent.abort();
    c.stop().await;
}
