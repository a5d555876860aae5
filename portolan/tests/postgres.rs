//! Two Portolan servers over one PostgreSQL database: they answer the same mappings and drain
//! the same event log. Needs PORTOLAN_TEST_PG (see scripts/setup.d/20-postgres.sh); without it
//! the test skips, except under CI=true where it fails.

mod common;

use common::*;
use portolan::client::{Client, ClientConfig};
use portolan::server::ServerConfig;
use portolan::store::postgres::{test_admin_url, TestDatabase};
use portolan::store::{self, PgStore};
use portolan::svp::LogRecord;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_one_database() {
    let Some(admin) = test_admin_url() else {
        return;
    };
    // The store is blocking (the synchronous postgres client runs its own small runtime), so
    // every direct store call in this async test goes through block_in_place.
    let db = blocking(|| TestDatabase::create(&admin).unwrap());
    // Two independent stores (two pools), as two processes would have.
    let s1: Arc<dyn store::Store> = blocking(|| Arc::new(PgStore::open(&db.url, 4).unwrap()));
    let s2: Arc<dyn store::Store> = blocking(|| Arc::new(PgStore::open(&db.url, 4).unwrap()));
    let a = Running::start(s1.clone(), ServerConfig::default()).await;
    let b = Running::start(s2.clone(), ServerConfig::default()).await;
    let ca = Client::new(ClientConfig::new(a.addr));
    let cb = Client::new(ClientConfig::new(b.addr));

    let m = mapping(4000, "10.40.0.1", "02:00:00:00:40:01", 1);
    blocking(|| {
        put_underlay(&*s1, 1);
        put_underlay(&*s1, 2);
        create(&*s1, &m);
        create(&*s2, &mapping(4000, "10.40.0.2", "02:00:00:00:40:02", 2));
    });

    for c in [&ca, &cb] {
        let hit = c.vl3(m.ip, 4000).await.unwrap().unwrap();
        assert_eq!(
            (hit.mac, hit.underlay_ip, hit.underlay_port),
            (m.mac, underlay_ip(1), 4789)
        );
        let hit = c.vl2(m.mac, 4000).await.unwrap().unwrap();
        assert_eq!(hit.underlay_ip, underlay_ip(1));
        assert_eq!(
            c.vl3("10.40.0.3".parse().unwrap(), 4000).await.unwrap(),
            None
        );
    }

    // Host 1's log, read through server A, is the same as through server B.
    let via_a = ca.log(underlay_ip(1), 1024).await.unwrap();
    let via_b = cb.log(underlay_ip(1), 1024).await.unwrap();
    assert_eq!(via_a.len(), 2);
    assert_eq!(via_a, via_b);
    // Drain half through B: A sees the rest.
    cb.log_rm(&[via_a[0].id()]).await.unwrap();
    assert_eq!(
        ca.log(underlay_ip(1), 1024).await.unwrap(),
        via_a[1..].to_vec()
    );
    ca.log_rm(&[via_a[1].id()]).await.unwrap();
    assert!(cb.log(underlay_ip(1), 1024).await.unwrap().is_empty());

    // A change written through one store is seen by both servers, and both see its events.
    blocking(|| store::with_txn(&*s2, |tx| tx.delete_mapping(4000, m.ip)).unwrap());
    for c in [&ca, &cb] {
        assert_eq!(c.vl3(m.ip, 4000).await.unwrap(), None);
    }
    let log = ca.log(underlay_ip(2), 1024).await.unwrap();
    assert!(matches!(log.last(), Some(LogRecord::Vl2 { mac, .. }) if *mac == m.mac));
    let ids: Vec<_> = log.iter().map(LogRecord::id).collect();
    cb.log_rm(&ids).await.unwrap();
    assert!(ca.log(underlay_ip(2), 1024).await.unwrap().is_empty());

    a.shutdown().await;
    b.shutdown().await;
    drop((s1, s2));
    blocking(move || drop(db));
}

fn blocking<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}
