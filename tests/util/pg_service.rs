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
