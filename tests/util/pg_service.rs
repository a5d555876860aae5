//! A control-plane service on 127.0.0.1 over a given store URL, for the tests that run several
//! services over one PostgreSQL database.

use std::net::SocketAddr;
use std::sync::Arc;

use fabric::control::{http, open_store, Config};
use portolan::store::Store;

/// Starts a service on an ephemeral port; it stops when the returned sender is dropped or fired.
pub async fn service(url: &str) -> (SocketAddr, Arc<dyn Store>, tokio::sync::oneshot::Sender<()>) {
    let cfg = Config::default();
    let store = open_store(url, &cfg).await.unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(http::serve(l, store.clone(), cfg, async move {
        let _ = rx.await;
    }));
    (addr, store, tx)
}

/// Two services over one fresh PostgreSQL test database (`None`, with the skip printed, when
/// no server is configured outside CI).
pub struct TwoServices {
    /// The database; dropped (and removed) by [`TwoServices::stop`].
    pub db: portolan::store::postgres::TestDatabase,
    /// The first service's address.
    pub a: SocketAddr,
    /// The second service's address.
    pub b: SocketAddr,
    /// The stores the services use, in the same order.
    pub stores: [Arc<dyn Store>; 2],
    stops: [tokio::sync::oneshot::Sender<()>; 2],
}

impl TwoServices {
    /// Creates the database and starts both services.
    pub async fn start() -> Option<TwoServices> {
        let admin = portolan::store::postgres::test_admin_url()?;
        let db = tokio::task::spawn_blocking(move || {
            portolan::store::postgres::TestDatabase::create(&admin).unwrap()
        })
        .await
        .unwrap();
        let (a, store_a, stop_a) = service(&db.url).await;
        let (b, store_b, stop_b) = service(&db.url).await;
        Some(TwoServices {
            db,
            a,
            b,
            stores: [store_a, store_b],
            stops: [stop_a, stop_b],
        })
    }

    /// Stops both services, then drops the stores and the database off the async runtime (the
    /// synchronous postgres client must not be dropped on it).
    pub async fn stop(self) {
        for s in self.stops {
            let _ = s.send(());
        }
        let (stores, db) = (self.stores, self.db);
        tokio::task::spawn_blocking(move || {
            drop(stores);
            drop(db);
        })
        .await
        .unwrap();
    }
}
