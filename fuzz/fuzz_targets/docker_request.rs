//! Fuzz target: the Docker API's whole request path in process (version prefix, routing, query
//! and filter parsing, JSON bodies, network and image operations, uploads) over a real SQLite
//! store, as one account. Input: a method byte, the path and query up to the first newline,
//! then the body. Bad input must be answered 4xx with a JSON `{"message"}`, never 5xx, and
//! never panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Method, Request};
use fabric::control::db::Db;
use fabric::docker::{accounts, Docker, DockerConfig};
use fabric::pki::Peer;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;

struct Harness {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    _docker: Arc<Docker>,
    _service: fabric::control::http::Service,
}

const SERIAL: &str = "0f00ba11";

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fabric-fuzz-docker-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (docker, service) = rt.block_on(async {
            let cfg = fabric::control::Config::default();
            let url = format!("sqlite:{}", dir.join("fabric.db").display());
            let store = fabric::control::open_store(&url, &cfg).await.unwrap();
            let svc = fabric::control::http::Service::start(store, cfg);
            let app = svc.app.clone();
            fabric::control::http::write_txn(&app, |tx| {
                let mut db = Db::from(tx.raw());
                let a = accounts::create(&mut db, "fuzz")?;
                if let Some(n) = fabric::docker::networks::create_default(&mut db, &app.cfg, &a)? {
                    accounts::set_default_network(&mut db, &a.uuid, &n)?;
                }
                accounts::add_certificate(&mut db, &a, SERIAL, i64::MAX)
            })
            .unwrap();
            let cfg = DockerConfig {
                data: dir.clone(),
                max_upload: 1 << 20,
            };
            (Docker::new(app, cfg, "FUZZ".into()).unwrap(), svc)
        });
        Harness {
            rt,
            router: fabric::docker::router(docker.clone()),
            _docker: docker,
            _service: service,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = [Method::GET, Method::POST, Method::DELETE, Method::HEAD, Method::PUT][m as usize % 5].clone();
    let (line, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(path) = std::str::from_utf8(line) else {
        return;
    };
    if !path.starts_with('/') {
        return;
    }
    let Ok(mut req) = Request::builder()
        .method(method.clone())
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    req.extensions_mut().insert(Peer::Account {
        login: "fuzz".into(),
        serial: SERIAL.into(),
    });
    let h = harness();
    let mut router = h.router.clone();
    let (status, text) = h.rt.block_on(async move {
        let resp = tower_service::Service::call(&mut router, req).await.unwrap();
        let status = resp.status();
        let b = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        (status, String::from_utf8_lossy(&b).into_owned())
    });
    assert!(
        status.as_u16() < 500,
        "{method} {path} ({} body bytes) answered {status}: {text}",
        body.len()
    );
    if status.as_u16() >= 400 && method != Method::HEAD {
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: {status} body is not JSON ({e}): {text}"));
        assert!(v["message"].is_string(), "{method} {path}: {text}");
    }
});
