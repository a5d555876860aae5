//! A real server on 127.0.0.1 over a temporary SQLite store, driven by our client and by raw
//! sockets.

mod common;

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use portolan::client::{Client, ClientConfig, ClientError};
use portolan::server::ServerConfig;
use portolan::store::{self, Store};
use portolan::svp::{
    self, to_wire_ip, Frame, LogRecord, LogReq, Mac, Message, RequestId, Status, Vl2Req, Vl3Req,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn open(db: &TempDb) -> Arc<dyn Store> {
    store::open(&db.url()).unwrap()
}

fn client(addr: std::net::SocketAddr) -> Client {
    let mut cfg = ClientConfig::new(addr);
    cfg.timeout = Duration::from_secs(5);
    Client::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vl2_and_vl3_found_and_not_found() {
    let db = TempDb::new();
    let s = open(&db);
    put_underlay(&*s, 1);
    let m = mapping(12340, "10.0.0.1", "00:0a:95:9d:68:16", 1);
    create(&*s, &m);
    // Overlay present, underlay missing (host 9 has no underlay mapping).
    create(&*s, &mapping(12340, "10.0.0.9", "00:0a:95:9d:68:99", 9));
    // Tombstoned.
    let dead = mapping(12340, "10.0.0.7", "00:0a:95:9d:68:77", 1);
    create(&*s, &dead);
    store::with_txn(&*s, |tx| tx.delete_mapping(12340, dead.ip)).unwrap();

    let srv = Running::start(s.clone(), ServerConfig::default()).await;
    let c = client(srv.addr);
    c.ping().await.unwrap();

    let hit = c.vl3(m.ip, 12340).await.unwrap().unwrap();
    assert_eq!(hit.mac, m.mac);
    assert_eq!(hit.underlay_ip, underlay_ip(1));
    assert_eq!(hit.underlay_port, 4789);
    let hit = c.vl2(m.mac, 12340).await.unwrap().unwrap();
    assert_eq!((hit.underlay_ip, hit.underlay_port), (underlay_ip(1), 4789));

    // Unknown MAC; known MAC on another VNI.
    assert_eq!(
        c.vl2("00:0a:95:9d:68:17".parse().unwrap(), 12340)
            .await
            .unwrap(),
        None
    );
    assert_eq!(c.vl2(m.mac, 12341).await.unwrap(), None);
    // Unknown IP; known IP on another VNI.
    assert_eq!(
        c.vl3("10.0.0.2".parse().unwrap(), 12340).await.unwrap(),
        None
    );
    assert_eq!(c.vl3(m.ip, 12341).await.unwrap(), None);
    // Overlay present but underlay missing.
    assert_eq!(
        c.vl3("10.0.0.9".parse().unwrap(), 12340).await.unwrap(),
        None
    );
    assert_eq!(
        c.vl2("00:0a:95:9d:68:99".parse().unwrap(), 12340)
            .await
            .unwrap(),
        None
    );
    // Tombstoned.
    assert_eq!(c.vl3(dead.ip, 12340).await.unwrap(), None);
    assert_eq!(c.vl2(dead.mac, 12340).await.unwrap(), None);

    assert_eq!(srv.stat("vl3_requests"), 5);
    assert_eq!(srv.stat("vl3_not_found"), 4);
    assert_eq!(srv.stat("vl2_not_found"), 4);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notfound_replies_are_byte_exact() {
    let db = TempDb::new();
    let srv = Running::start(open(&db), ServerConfig::default()).await;
    let mut sock = TcpStream::connect(srv.addr).await.unwrap();
    // VL2_REQ id 9 for an unknown MAC, VL3_REQ id 10 for an unknown IP: the spec's vectors.
    let mut req = Frame::new(
        RequestId::from_u32(9),
        Message::Vl2Req(Vl2Req {
            mac: Mac([0, 0x0a, 0x95, 0x9d, 0x68, 0x16]),
            vnet_id: 12340,
        }),
    )
    .to_bytes();
    sock.write_all(&req).await.unwrap();
    let mut got = [0u8; 36];
    sock.read_exact(&mut got).await.unwrap();
    let mut want = hex("0001 0004 00000014 00000009 52700c4d 0002 0000");
    want.extend_from_slice(&[0; 16]);
    assert_eq!(&got[..], &want[..]);

    req = Frame::new(
        RequestId::from_u32(10),
        Message::Vl3Req(Vl3Req {
            ip: to_wire_ip("10.0.0.1".parse().unwrap()),
            l3_type: svp::VL3_TYPE_IPV6,
            vnet_id: 12340,
        }),
    )
    .to_bytes();
    sock.write_all(&req).await.unwrap();
    let mut got = [0u8; 44];
    sock.read_exact(&mut got).await.unwrap();
    let mut want = hex("0001 0006 0000001c 0000000a 987ad8fc 00000002");
    want.extend_from_slice(&[0; 24]);
    assert_eq!(&got[..], &want[..]);
    srv.shutdown().await;
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_with_their_ids() {
    let db = TempDb::new();
    let s = open(&db);
    put_underlay(&*s, 1);
    put_underlay(&*s, 2);
    for i in 0..50u8 {
        create(
            &*s,
            &mapping(
                7,
                &format!("10.0.0.{i}"),
                &format!("02:00:00:00:00:{i:02x}"),
                1 + i % 2,
            ),
        );
    }
    let srv = Running::start(s, ServerConfig::default()).await;
    let mut sock = TcpStream::connect(srv.addr).await.unwrap();
    // 200 requests of every kind in one write, with ids written little-endian as illumos does.
    let mut wire = Vec::new();
    let mut expect: HashMap<[u8; 4], Message> = HashMap::new();
    for k in 0..200u32 {
        let id = RequestId(k.to_le_bytes());
        let i = (k % 60) as u8; // 50..59 are unknown
        let host_ip = to_wire_ip(underlay_ip(1 + i % 2));
        let (req, want) = match k % 4 {
            0 => (
                Message::Vl3Req(Vl3Req {
                    ip: to_wire_ip(format!("10.0.0.{i}").parse().unwrap()),
                    // illumos' shootdown path sends type 2 (IPv6) for mapped IPv4: same answer.
                    l3_type: if k % 8 == 0 {
                        svp::VL3_TYPE_IPV6
                    } else {
                        svp::VL3_TYPE_IP
                    },
                    vnet_id: 7,
                }),
                if i < 50 {
                    Message::Vl3Ack(svp::Vl3Ack {
                        status: Status::OK,
                        mac: Mac([2, 0, 0, 0, 0, i]),
                        port: 4789,
                        addr: host_ip,
                    })
                } else {
                    Message::Vl3Ack(svp::Vl3Ack {
                        status: Status::NOT_FOUND,
                        mac: Mac::ZERO,
                        port: 0,
                        addr: Ipv6Addr::UNSPECIFIED,
                    })
                },
            ),
            1 => (
                Message::Vl2Req(Vl2Req {
                    mac: Mac([2, 0, 0, 0, 0, i]),
                    vnet_id: 7,
                }),
                if i < 50 {
                    Message::Vl2Ack(svp::Vl2Ack {
                        status: Status::OK,
                        port: 4789,
                        addr: host_ip,
                    })
                } else {
                    Message::Vl2Ack(svp::Vl2Ack {
                        status: Status::NOT_FOUND,
                        port: 0,
                        addr: Ipv6Addr::UNSPECIFIED,
                    })
                },
            ),
            2 => (Message::Ping, Message::Pong),
            _ => (
                // A log read with room for nothing but the status.
                Message::LogReq(LogReq {
                    count: 4,
                    ip: to_wire_ip(underlay_ip(1)),
                }),
                Message::LogAck(svp::LogAck {
                    status: Status::OK,
                    records: vec![],
                }),
            ),
        };
        Frame::new(id, req).encode(&mut wire);
        expect.insert(id.0, want);
    }
    sock.write_all(&wire).await.unwrap();
    let replies = read_frames(&mut sock, 200).await;
    let mut seen = std::collections::HashSet::new();
    for r in replies {
        assert!(seen.insert(r.id.0), "id {:?} answered twice", r.id);
        let want = expect
            .get(&r.id.0)
            .unwrap_or_else(|| panic!("unknown id {:?}", r.id));
        assert_eq!(&r.message, want, "reply to id {:?}", r.id);
    }
    assert_eq!(seen.len(), 200);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_req_and_log_rm_after_a_move() {
    let db = TempDb::new();
    let s = open(&db);
    for h in [1, 2, 3] {
        put_underlay(&*s, h);
    }
    let old = mapping(100, "10.0.0.1", "02:00:00:00:01:01", 1);
    create(&*s, &old);
    create(&*s, &mapping(100, "10.0.0.2", "02:00:00:00:01:02", 2));
    let srv = Running::start(s.clone(), ServerConfig::default()).await;
    let c = client(srv.addr);
    // Drain what creation produced.
    for h in [1, 2] {
        let ids: Vec<_> = c
            .log(underlay_ip(h), 1024)
            .await
            .unwrap()
            .iter()
            .map(LogRecord::id)
            .collect();
        assert!(!ids.is_empty());
        c.log_rm(&ids).await.unwrap();
        assert!(c.log(underlay_ip(h), 1024).await.unwrap().is_empty());
    }

    // The NIC moves to host 3 with a new IP.
    let new = mapping(100, "10.0.0.5", "02:00:00:00:01:01", 3);
    store::with_txn(&*s, |tx| tx.move_mapping(100, old.ip, &new)).unwrap();

    let log = c.log(underlay_ip(2), 1024).await.unwrap();
    assert_eq!(log.len(), 2);
    match log[0] {
        LogRecord::Vl2 { mac, vnet_id, .. } => assert_eq!((mac, vnet_id), (old.mac, 100)),
        other => panic!("expected a VL2 record first, got {other:?}"),
    }
    match log[1] {
        LogRecord::Vl3 { ip, vnet_id, .. } => {
            assert_eq!((ip, vnet_id), (to_wire_ip(new.ip), 100))
        }
        other => panic!("expected a VL3 record second, got {other:?}"),
    }
    // What a varpd host does with them: VL2 → forget; VL3 → look it up again.
    assert_eq!(c.vl3(old.ip, 100).await.unwrap(), None);
    let hit = c.vl3(new.ip, 100).await.unwrap().unwrap();
    assert_eq!((hit.mac, hit.underlay_ip), (new.mac, underlay_ip(3)));

    // Size rules: room for one VL2 record (4 + 32 bytes) returns exactly that one.
    let one = c.log(underlay_ip(2), 36).await.unwrap();
    assert_eq!(one, vec![log[0]]);
    // 4 + 32 + 43 is one byte short of both records.
    assert_eq!(c.log(underlay_ip(2), 79).await.unwrap().len(), 1);
    assert_eq!(c.log(underlay_ip(2), 80).await.unwrap().len(), 2);

    let ids: Vec<_> = log.iter().map(LogRecord::id).collect();
    c.log_rm(&ids).await.unwrap();
    assert!(c.log(underlay_ip(2), 1024).await.unwrap().is_empty());
    // Idempotent: the same ids again, and unknown ones, are fine.
    c.log_rm(&ids).await.unwrap();
    c.log_rm(&[svp::LogId([0x55; 16])]).await.unwrap();
    // Host 1 (which the NIC left) and host 3 were told too.
    assert_eq!(c.log(underlay_ip(1), 1024).await.unwrap().len(), 2);
    assert_eq!(c.log(underlay_ip(3), 1024).await.unwrap().len(), 2);
    // An unknown underlay IP gets FATAL, as Portolan answers.
    let e = c
        .log("192.168.77.77".parse().unwrap(), 1024)
        .await
        .unwrap_err();
    assert_eq!(e, ClientError::Status(Status::FATAL));
    // Drained after creation: host 1 had 2 events (its own NIC, host 2's), host 2 had 1;
    // then host 2's two move events.
    assert_eq!(srv.stat("log_records_removed"), 3 + 2);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_ack_never_exceeds_1024_bytes() {
    let db = TempDb::new();
    let s = open(&db);
    put_underlay(&*s, 1);
    create(&*s, &mapping(1, "10.0.0.1", "02:00:00:00:00:01", 1));
    // 100 VL2 events: far more than 1024 bytes.
    store::with_txn(&*s, |tx| {
        for i in 0..100u32 {
            tx.append_event(
                cn(1),
                &store::Event::Vl2 {
                    mac: Mac([2, 0, 0, 0, 1, i as u8]),
                    vnet_id: i,
                },
            )?;
        }
        Ok::<_, store::StoreError>(())
    })
    .unwrap();
    let srv = Running::start(s, ServerConfig::default()).await;
    let c = client(srv.addr);
    // (1024 - 4) / 32 = 31 VL2 records (the first is creation's VL3 event: 44 bytes → 30 VL2).
    let recs = c.log(underlay_ip(1), 1_000_000).await.unwrap();
    let bytes: usize = 4 + recs.iter().map(LogRecord::wire_len).sum::<usize>();
    assert!(bytes <= 1024, "{bytes}");
    assert_eq!(recs.len(), 1 + (1024 - 4 - 44) / 32);
    srv.shutdown().await;
}

/// Raw header bytes with a correct CRC over `payload`.
fn frame_bytes(version: u16, op: u16, id: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&version.to_be_bytes());
    b.extend_from_slice(&op.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(payload);
    let crc = crc32fast::hash(&b);
    b[12..16].copy_from_slice(&crc.to_be_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_never_takes_the_server_down() {
    let db = TempDb::new();
    let s = open(&db);
    put_underlay(&*s, 1);
    create(&*s, &mapping(5, "10.0.0.1", "02:00:00:00:00:01", 1));
    let srv = Running::start(s, ServerConfig::default()).await;
    // A healthy client connected throughout.
    let c = client(srv.addr);
    assert!(c
        .vl3("10.0.0.1".parse().unwrap(), 5)
        .await
        .unwrap()
        .is_some());

    let ping = frame_bytes(1, 1, 1, &[]);
    let mut bad_crc = ping.clone();
    bad_crc[15] ^= 0xff;
    let mut oversized = frame_bytes(1, 0x0b, 1, &[]);
    oversized[4..8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad CRC", bad_crc, "bad_crc"),
        ("unknown op", frame_bytes(1, 0x42, 1, &[]), "unknown_op"),
        ("op 0", frame_bytes(1, 0, 1, &[]), "unknown_op"),
        ("oversized size field", oversized, "oversized"),
        ("bad version", frame_bytes(2, 1, 1, &[]), "bad_version"),
        (
            "BULK_REQ",
            frame_bytes(1, 7, 1, &[0, 0, 0, 1]),
            "unsupported_op",
        ),
        (
            "SHOOTDOWN",
            frame_bytes(1, 0x0d, 1, &[0; 12]),
            "unsupported_op",
        ),
        (
            "PONG sent to the server",
            frame_bytes(1, 2, 1, &[]),
            "unexpected_op",
        ),
        (
            "VL2_REQ of the wrong size",
            frame_bytes(1, 3, 1, &[0; 8]),
            "bad_size",
        ),
        (
            "LOG_RM count mismatch",
            frame_bytes(1, 0x0b, 1, &[0, 0, 0, 3, 1, 2]),
            "bad_size",
        ),
    ];
    for (what, bytes, counter) in cases {
        let before = srv.stat(counter);
        expect_closed_after(srv.addr, &bytes).await;
        assert_eq!(
            srv.stat(counter),
            before + 1,
            "{what} not counted in {counter}"
        );
        // The server and the other connection are unaffected.
        assert!(
            c.vl3("10.0.0.1".parse().unwrap(), 5)
                .await
                .unwrap()
                .is_some(),
            "after {what}"
        );
    }

    // A valid request before the garbage is still answered before the close.
    let mut sock = TcpStream::connect(srv.addr).await.unwrap();
    let mut wire = ping.clone();
    wire.extend_from_slice(&frame_bytes(1, 0x42, 2, &[]));
    sock.write_all(&wire).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, hex("0001 0002 00000000 00000001 087c0c46"));

    // Half a header, then close.
    let runts = srv.stat("runt");
    let mut sock = TcpStream::connect(srv.addr).await.unwrap();
    sock.write_all(&ping[..7]).await.unwrap();
    drop(sock);
    // A header and half a payload, then close.
    let mut sock = TcpStream::connect(srv.addr).await.unwrap();
    sock.write_all(&frame_bytes(1, 3, 1, &[0; 12])[..20])
        .await
        .unwrap();
    drop(sock);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while srv.stat("runt") < runts + 2 {
        assert!(tokio::time::Instant::now() < deadline, "runts not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Random bytes on many connections at once.
    let mut tasks = Vec::new();
    for k in 0..20u8 {
        let addr = srv.addr;
        tasks.push(tokio::spawn(async move {
            let mut junk = vec![0u8; 64 + usize::from(k) * 13];
            getrandom::getrandom(&mut junk).unwrap();
            junk[0] = 0; // keep the version plausible half the time
            junk[1] = k % 2;
            if let Ok(mut s) = TcpStream::connect(addr).await {
                let _ = s.write_all(&junk).await;
                let mut sink = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(c
        .vl3("10.0.0.1".parse().unwrap(), 5)
        .await
        .unwrap()
        .is_some());
    assert!(c.ping().await.is_ok());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_and_idle_timeout() {
    let db = TempDb::new();
    let cfg = ServerConfig {
        max_connections: 2,
        idle_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = Running::start(open(&db), cfg).await;
    let ping = Frame::new(RequestId::from_u32(1), Message::Ping).to_bytes();
    let mut a = TcpStream::connect(srv.addr).await.unwrap();
    let mut b = TcpStream::connect(srv.addr).await.unwrap();
    for s in [&mut a, &mut b] {
        s.write_all(&ping).await.unwrap();
        assert_eq!(read_frames(s, 1).await[0].message, Message::Pong);
    }
    // The third is closed at once.
    let mut third = TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(srv.stat("connections_rejected"), 1);
    // Idle connections are closed after 300 ms, freeing slots.
    let n = tokio::time::timeout(Duration::from_secs(5), a.read_to_end(&mut buf))
        .await
        .expect("idle connection was not closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(srv.stat("connections_idle_closed") >= 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while srv.stat("connections_open") > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut d = TcpStream::connect(srv.addr).await.unwrap();
    d.write_all(&ping).await.unwrap();
    assert_eq!(read_frames(&mut d, 1).await[0].message, Message::Pong);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_connections_and_returns() {
    let db = TempDb::new();
    let srv = Running::start(open(&db), ServerConfig::default()).await;
    let addr = srv.addr;
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(&Frame::new(RequestId::from_u32(1), Message::Ping).to_bytes())
        .await
        .unwrap();
    assert_eq!(read_frames(&mut sock, 1).await[0].message, Message::Pong);
    srv.shutdown().await;
    // The open connection was closed and nothing listens any more.
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_the_server_restarts() {
    let db = TempDb::new();
    let s = open(&db);
    let srv = Running::start(s.clone(), ServerConfig::default()).await;
    let addr = srv.addr;
    let mut cfg = ClientConfig::new(addr);
    cfg.connections = 1;
    cfg.timeout = Duration::from_secs(3);
    let c = Client::new(cfg);
    c.ping().await.unwrap();
    srv.shutdown().await;
    // Down: queries fail with a typed error, never hang.
    let e = c.ping().await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::ConnectionLost { .. }
                | ClientError::Unavailable { .. }
                | ClientError::Timeout { .. }
        ),
        "{e}"
    );
    // Same port again; the client's backoff (1 s, then 2 s) brings it back.
    let listener = std::net::TcpListener::bind(addr);
    drop(listener);
    let cfg = ServerConfig {
        listen: addr,
        ..ServerConfig::default()
    };
    let server = portolan::server::Server::bind(cfg, s).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match c.ping().await {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never reconnected: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pipelines_many_queries_over_few_connections() {
    let db = TempDb::new();
    let s = open(&db);
    put_underlay(&*s, 1);
    for i in 0..100u8 {
        create(
            &*s,
            &mapping(
                3,
                &format!("10.3.0.{i}"),
                &format!("02:00:00:00:03:{i:02x}"),
                1,
            ),
        );
    }
    let srv = Running::start(s, ServerConfig::default()).await;
    let c = client(srv.addr);
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let k = (i % 120) as u8;
            let r = c
                .vl3(format!("10.3.0.{k}").parse().unwrap(), 3)
                .await
                .unwrap();
            (k, r)
        }));
    }
    for t in tasks {
        let (k, r) = t.await.unwrap();
        if k < 100 {
            assert_eq!(r.unwrap().mac, Mac([2, 0, 0, 0, 3, k]));
        } else {
            assert!(r.is_none());
        }
    }
    assert!(srv.stat("connections_accepted") <= 2);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_closed_not_buffered() {
    let db = TempDb::new();
    let cfg = ServerConfig {
        idle_timeout: Duration::from_millis(500),
        max_in_flight: 64,
        ..ServerConfig::default()
    };
    let srv = Running::start(open(&db), cfg).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stream = sock.connect(srv.addr).await.unwrap();
    // Pipeline PINGs forever and never read a PONG.
    let flood = tokio::spawn(async move {
        let mut chunk = Vec::new();
        for i in 0..4096u32 {
            Frame::new(RequestId::from_u32(i), Message::Ping).encode(&mut chunk);
        }
        for _ in 0..1000 {
            if stream.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while srv.stat("write_timeouts") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server kept a non-reading peer open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The reader stopped long before the flood was all sent: at most max_in_flight replies
    // were ever queued, so the writes of the flooding peer fail or stall.
    assert!(srv.stat("ping_requests") < 4096 * 1000);
    let c = client(srv.addr);
    c.ping().await.unwrap();
    flood.abort();
    srv.shutdown().await;
}

/// A store whose every call fails, as a database that went away would.
struct BrokenStore;

impl Store for BrokenStore {
    fn lookup(&self, _: &[store::Lookup]) -> Result<Vec<Option<store::Found>>, store::StoreError> {
        Err(store::StoreError::Corrupt {
            what: "test",
            detail: "the database is gone".into(),
        })
    }
    fn read_log(
        &self,
        _: std::net::IpAddr,
        _: usize,
    ) -> Result<Vec<store::LogEntry>, store::StoreError> {
        self.lookup(&[]).map(|_| vec![])
    }
    fn remove_log(&self, _: &[svp::LogId]) -> Result<u64, store::StoreError> {
        self.lookup(&[]).map(|_| 0)
    }
    fn remove_log_of(
        &self,
        _: std::net::IpAddr,
        _: &[svp::LogId],
    ) -> Result<u64, store::StoreError> {
        self.lookup(&[]).map(|_| 0)
    }
    fn run_txn(
        &self,
        _: &mut dyn FnMut(&mut dyn store::Txn) -> store::Outcome,
    ) -> Result<store::Outcome, store::StoreError> {
        self.lookup(&[]).map(|_| store::Outcome::Rollback)
    }
    fn run_read(&self, _: &mut dyn FnMut(store::RawTxn<'_>)) -> Result<(), store::StoreError> {
        self.lookup(&[]).map(|_| ())
    }
    fn describe(&self) -> String {
        "broken".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failures_are_answered_fatal() {
    let srv = Running::start(Arc::new(BrokenStore), ServerConfig::default()).await;
    let c = client(srv.addr);
    let fatal = ClientError::Status(Status::FATAL);
    assert_eq!(
        c.vl3("10.0.0.1".parse().unwrap(), 1).await.unwrap_err(),
        fatal
    );
    assert_eq!(c.vl2(Mac([2, 0, 0, 0, 0, 1]), 1).await.unwrap_err(), fatal);
    assert_eq!(c.log(underlay_ip(1), 1024).await.unwrap_err(), fatal);
    assert_eq!(c.log_rm(&[svp::LogId([1; 16])]).await.unwrap_err(), fatal);
    // PING needs no store.
    c.ping().await.unwrap();
    assert_eq!(srv.stat("store_errors"), 4);
    srv.shutdown().await;
}
