//! HTTP plumbing: one axum handler per route pattern; each request's parameters are merged
//! (query + JSON/form body), the operation runs on tokio's blocking pool inside one store
//! transaction (read-only for GETs), and the reply is NAPI's (200 + JSON, 204, or a restify
//! error), with `x-request-id`, `x-response-time`, `server` and, on objects, `etag`.
//!
//! Before an operation runs, the caller's [`Peer`] (from the request's extensions, put there by
//! the listener: TLS with a client certificate, the head's unix socket; none = [`Peer::Open`],
//! plain HTTP as before) must be allowed the route ([`super::auth::allowed`]). After a write
//! that changes membership (`PUT`/`DELETE /servers/:uuid`, `POST /join`, `PUT`/`DELETE
//! /peers/:ip`) the in-process [`Trust`] is refreshed from the store before the reply (and a
//! removed server is revoked at once); a background task refreshes it every second too
//! ([`TRUST_REFRESH`]), so other instances' writes count within a second.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, RawPathParams, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use axum::routing::any;
use axum::Extension;
use axum::Router;
use portolan::store::{self, Store, Txn};
use serde_json::{json, Value};

use super::auth::{self, AuthCounters};
use super::db::{Db, Val};
use super::error::{ApiError, OpError};
use super::metrics::Metrics;
use super::params::{parse_uuid, random_uuid, Params};
use super::{
    changes, desired, fabrics, join, networks, nic_tags, nics, peers, pools, portolan_view, rules,
    servers, vms, Config,
};
use crate::pki::{Peer, Trust};

/// How often the background task reloads [`Trust`] from the store.
pub const TRUST_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// Shared state of the service.
pub struct App {
    /// The store (shared with Portolan).
    pub store: Arc<dyn Store>,
    /// Settings.
    pub cfg: Config,
    /// Counters.
    pub metrics: Metrics,
    /// On SQLite, this process's writers queue here rather than in SQLite's busy handler,
    /// which sleeps up to 100 ms per retry and lets a writer starve under contention.
    pub sqlite_writers: Option<std::sync::Mutex<()>>,
    /// The change feed's notifier (bumped after every commit that recorded changes).
    pub feed: Arc<changes::feed::Feed>,
    /// The membership view shared with the TLS verifiers and Portolan (`Config::trust`);
    /// refreshed from the store. `None`: nothing to refresh (standalone, no TLS).
    pub trust: Option<Arc<Trust>>,
    /// Serialises refreshes of `trust` (read the store, then set), so that an older view is
    /// never set after a newer one (which would briefly undo a revocation).
    trust_sync: tokio::sync::Mutex<()>,
    /// Refreshes of `trust` that failed to read the store.
    trust_errors: std::sync::atomic::AtomicU64,
    /// Authorization refusals.
    pub auth: AuthCounters,
    /// The agents' tunnels open to this instance (attach, logs, exec on hosts).
    pub tunnels: Arc<super::tunnel::Tunnels>,
}

impl App {
    /// The service's shared state over `store` (no background work started: see [`Service`]).
    pub fn new(store: Arc<dyn Store>, cfg: Config) -> App {
        let sqlite = store.describe().starts_with("sqlite:");
        let feed = Arc::new(changes::feed::Feed::new(cfg.changes_retention));
        App {
            store,
            trust: cfg.trust.clone(),
            cfg,
            metrics: Metrics::default(),
            sqlite_writers: sqlite.then(|| std::sync::Mutex::new(())),
            feed,
            trust_sync: tokio::sync::Mutex::new(()),
            trust_errors: std::sync::atomic::AtomicU64::new(0),
            auth: AuthCounters::default(),
            tunnels: Arc::new(super::tunnel::Tunnels::new()),
        }
    }
}

/// Reloads `app.trust` from the store (every server with its removal, and the foreign peers);
/// with `revoke`, first revokes that server at once. No-op without a `Trust`. Call it after
/// committing a membership change (`POST /join` too).
pub async fn sync_trust(app: &Arc<App>, revoke: Option<&str>) {
    let Some(trust) = app.trust.clone() else {
        return;
    };
    let _turn = app.trust_sync.lock().await;
    if let Some(u) = revoke {
        trust.revoke(u);
    }
    let a = app.clone();
    let view = tokio::task::spawn_blocking(move || {
        store::with_read(&*a.store, |raw| servers::trust_view(&mut Db::from(raw)))
    })
    .await;
    match view {
        Ok(Ok((servers, foreign))) => trust.set_servers(servers, foreign),
        Ok(Err(e)) => {
            let n = app
                .trust_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_power_of_two() || n == 0 {
                tracing::warn!(error = %e, failures = n + 1, "cannot refresh the membership view from the store; keeping the last one");
            }
        }
        Err(e) => tracing::error!(error = %e, "membership refresh panicked"),
    }
}

/// What an operation answers on success.
enum Reply {
    Json(Value),
    NoContent,
    Text(String),
}

type ReadOp = Box<dyn Fn(&mut Db<'_>, &App, &mut Params) -> Result<Reply, OpError> + Send>;
/// A write runs again (on fresh parameters) when PostgreSQL aborts it for a deadlock or a
/// serialization failure, so it is `Fn`.
type WriteOp = Box<dyn Fn(&mut dyn Txn, &App, &mut Params) -> Result<Reply, OpError> + Send>;

enum Op {
    Read(ReadOp),
    Write(WriteOp),
    /// Answered without the store.
    Now(Result<Reply, ApiError>),
    Metrics,
    /// `GET /changes`: a long-poll, awaited outside the blocking pool.
    Feed,
}

fn read<F>(f: F) -> Op
where
    F: Fn(&mut Db<'_>, &App, &mut Params) -> Result<Value, OpError> + Send + 'static,
{
    Op::Read(Box::new(move |d, a, p| f(d, a, p).map(Reply::Json)))
}

fn write<F>(f: F) -> Op
where
    F: Fn(&mut dyn Txn, &App, &mut Params) -> Result<Value, OpError> + Send + 'static,
{
    Op::Write(Box::new(move |t, a, p| f(t, a, p).map(Reply::Json)))
}

fn write_db<F>(f: F) -> Op
where
    F: Fn(&mut Db<'_>, &App, &mut Params) -> Result<Value, OpError> + Send + 'static,
{
    Op::Write(Box::new(move |t, a, p| {
        f(&mut Db::from(t.raw()), a, p).map(Reply::Json)
    }))
}

fn delete_db<F>(f: F) -> Op
where
    F: Fn(&mut Db<'_>, &App, &mut Params) -> Result<(), OpError> + Send + 'static,
{
    Op::Write(Box::new(move |t, a, p| {
        f(&mut Db::from(t.raw()), a, p).map(|()| Reply::NoContent)
    }))
}

fn no_params(p: &mut Params) -> Result<(), ApiError> {
    p.allow_only(&[]);
    p.finish()
}

/// Picks the operation for a route and method, as `peer` asks it (a host certificate's writes
/// get the checks that need the store).
fn route(method: &Method, pattern: &str, path: Vec<String>, peer: &Peer) -> Op {
    let by_host = auth::is_host(peer);
    let m = if *method == Method::HEAD {
        Method::GET
    } else {
        method.clone()
    };
    let arg = |i: usize| path.get(i).cloned().unwrap_or_default();
    let (a0, a1, a2) = (arg(0), arg(1), arg(2));
    match (m, pattern) {
        (Method::GET, "/ping") => read(|_, a, _| {
            Ok(json!({
                "config": {"fabrics_enabled": a.cfg.fabrics_enabled, "subnet_alloc_enabled": false},
                "healthy": true,
                "services": {"store": "online"},
                "status": "OK",
            }))
        }),
        (Method::GET, "/metrics") => Op::Metrics,
        (Method::GET, "/changes") => Op::Feed,
        // NIC tags.
        (Method::GET, "/nic_tags") => read(|d, _, p| nic_tags::list(d, p)),
        (Method::POST, "/nic_tags") => write_db(|d, _, p| nic_tags::create(d, p)),
        (Method::GET, "/nic_tags/{name}") => read(move |d, _, p| {
            no_params(p)?;
            Ok(nic_tags::find(d, &a0)?.to_json())
        }),
        (Method::PUT, "/nic_tags/{name}") => write_db(move |d, _, p| nic_tags::update(d, &a0, p)),
        (Method::DELETE, "/nic_tags/{name}") => delete_db(move |d, _, _| nic_tags::delete(d, &a0)),
        // Networks.
        (Method::GET, "/networks") => read(|d, _, p| {
            let q = networks::validate_list(p)?;
            networks::list(d, &q)
        }),
        (Method::POST, "/networks") => write_db(|d, a, p| {
            let req = networks::validate_create(p, &a.cfg, None)?;
            networks::create(d, &a.cfg, req, networks::View::Plain)
        }),
        (Method::GET, "/networks/{uuid}") => read(move |d, _, p| networks::get_checked(d, &a0, p)),
        (Method::PUT, "/networks/{uuid}") => write_db(move |d, _, p| {
            let n = networks::find(d, &a0)?;
            networks::update(d, n, p, networks::View::Plain)
        }),
        (Method::DELETE, "/networks/{uuid}") => delete_db(move |d, _, p| {
            no_params(p)?;
            let n = networks::find(d, &a0)?;
            networks::delete(d, &n)
        }),
        (Method::GET, "/networks/{uuid}/ips") => read(move |d, _, p| {
            let n = networks::find(d, &a0)?;
            networks::list_ips_api(d, &n, p)
        }),
        (Method::GET, "/networks/{uuid}/ips/{ip}") => read(move |d, _, p| {
            no_params(p)?;
            let n = networks::find(d, &a0)?;
            networks::get_ip_api(d, &n, &a1)
        }),
        (Method::PUT, "/networks/{uuid}/ips/{ip}") => write_db(move |d, _, p| {
            let n = networks::find(d, &a0)?;
            networks::update_ip(d, &n, &a1, p)
        }),
        (Method::POST, "/networks/{uuid}/nics") => write(move |t, a, p| {
            let Some(u) = super::params::parse_uuid(&a0) else {
                return Err(ApiError::not_found("network not found").into());
            };
            let req = nics::validate_create(p, Some(&u))?;
            nics::create(t, &a.cfg, req)
        }),
        // NICs.
        (Method::GET, "/nics") => read(|d, a, p| nics::list(d, &a.cfg, p)),
        (Method::POST, "/nics") => write(|t, a, p| {
            let req = nics::validate_create(p, None)?;
            nics::create(t, &a.cfg, req)
        }),
        (Method::GET, "/nics/{mac}") => read(move |d, a, p| {
            no_params(p)?;
            nics::get_api(d, &a.cfg, &a0)
        }),
        (Method::PUT, "/nics/{mac}") => write(move |t, a, p| nics::update(t, &a.cfg, &a0, p)),
        (Method::DELETE, "/nics/{mac}") => Op::Write(Box::new(move |t, a, p| {
            p.allow_only(&["belongs_to_uuid", "belongs_to_type", "owner_uuid"]);
            p.finish()?;
            nics::delete(t, &a.cfg, &a0).map(|()| Reply::NoContent)
        })),
        // Fabrics.
        (m, p) if p.starts_with("/fabrics/") => fabric_route(m, p, a0, a1, a2),
        // Servers and VMs.
        (m, p) if p.starts_with("/servers") || p.starts_with("/vms") || p == "/join" => {
            vm_route(m, p, a0, by_host)
        }
        // Docker accounts (the operator's).
        (Method::GET, "/accounts") => read(|d, _, p| crate::docker::accounts::list_api(d, p)),
        (Method::POST, "/accounts") => {
            write_db(|d, a, p| crate::docker::accounts::create_api(d, &a.cfg, p))
        }
        (Method::GET, "/accounts/{login}") => {
            read(move |d, _, p| crate::docker::accounts::get_api(d, &a0, p))
        }
        (Method::DELETE, "/accounts/{login}") => delete_db(move |d, _, p| {
            no_params(p)?;
            crate::docker::accounts::remove(d, &a0).map(|_| ())
        }),
        (Method::POST, "/accounts/{login}/certificates") => {
            write_db(move |d, a, p| crate::docker::accounts::issue_api(d, &a.cfg, &a0, p))
        }
        // Networks shared with every Docker account (the operator's).
        (Method::GET, "/shared_networks") => read(|d, _, p| crate::docker::shared::list_api(d, p)),
        (Method::POST, "/shared_networks") => {
            write_db(|d, a, p| crate::docker::shared::create_api(d, &a.cfg, p))
        }
        (Method::GET, "/shared_networks/{name}") => {
            read(move |d, _, p| crate::docker::shared::get_api(d, &a0, p))
        }
        (Method::DELETE, "/shared_networks/{name}") => {
            delete_db(move |d, _, p| crate::docker::shared::delete_api(d, &a0, p))
        }
        // Foreign VXLAN peers.
        (Method::GET, "/peers") => read(|d, _, p| peers::list(d, p)),
        (Method::PUT, "/peers/{ip}") => write_db(move |d, _, p| peers::put(d, &a0, p)),
        (Method::DELETE, "/peers/{ip}") => delete_db(move |d, _, p| peers::delete(d, &a0, p)),
        (Method::GET, "/network_pools") => read(|d, _, p| pools::list(d, p)),
        (Method::POST, "/network_pools") => write_db(|d, _, p| pools::create(d, p)),
        (Method::GET, "/network_pools/{uuid}") => read(move |d, _, p| {
            no_params(p)?;
            Ok(pools::find(d, &a0)?.to_json())
        }),
        (Method::PUT, "/network_pools/{uuid}") => write_db(move |d, _, p| pools::update(d, &a0, p)),
        (Method::DELETE, "/network_pools/{uuid}") => delete_db(move |d, _, p| {
            no_params(p)?;
            pools::delete(d, &a0)
        }),
        (Method::GET, "/search/ips") => read(|d, _, p| networks::search_ips(d, p)),
        // Rules.
        (Method::GET, "/rules") => read(|d, _, p| rules::list(d, p)),
        (Method::POST, "/rules") => write_db(|d, _, p| rules::create(d, p)),
        (Method::GET, "/rules/{uuid}") => read(move |d, _, p| {
            no_params(p)?;
            Ok(rules::find(d, &a0)?.to_json())
        }),
        (Method::PUT, "/rules/{uuid}") => write_db(move |d, _, p| rules::update(d, &a0, p)),
        (Method::DELETE, "/rules/{uuid}") => delete_db(move |d, _, p| {
            no_params(p)?;
            rules::delete(d, &a0)
        }),
        // Portolan admin views.
        (Method::GET, "/portolan/mappings") => read(|d, _, p| portolan_view::mappings(d, p)),
        (Method::GET, "/portolan/underlay/{cn_uuid}") => read(move |d, _, p| {
            no_params(p)?;
            portolan_view::underlay(d, &a0)
        }),
        (Method::GET, "/portolan/events") => read(|d, _, p| portolan_view::events(d, p)),
        (m, p) => Op::Now(Err(ApiError::bad_method(m.as_str(), p))),
    }
}

fn vm_route(m: Method, pattern: &str, a0: String, by_host: bool) -> Op {
    match (m, pattern) {
        (Method::GET, "/servers") => read(|d, a, p| servers::list(d, &a.cfg, p)),
        (Method::GET, "/servers/{uuid}") => {
            read(move |d, a, p| servers::get_api(d, &a.cfg, &a0, p))
        }
        (Method::PUT, "/servers/{uuid}") => {
            write(move |t, a, p| servers::put(t, &a.cfg, &a0, p, by_host))
        }
        (Method::DELETE, "/servers/{uuid}") => Op::Write(Box::new(move |t, _, p| {
            servers::remove(t, &a0, p).map(|_| Reply::NoContent)
        })),
        (Method::POST, "/servers/{uuid}/heartbeat") => {
            delete_db(move |d, _, p| servers::heartbeat(d, &a0, p))
        }
        (Method::GET, "/servers/{uuid}/desired") => {
            read(move |d, a, p| desired::snapshot(d, &a.cfg, &a0, p))
        }
        (Method::POST, "/servers/{uuid}/certificate") => {
            read(move |d, a, p| join::renew(d, &a.cfg, &a0, p))
        }
        (Method::POST, "/join") => write(|t, a, p| join::join(t, &a.cfg, p)),
        (Method::POST, "/servers/{uuid}/vm_states") => {
            write(move |t, a, p| vms::report_states(t, &a.cfg, &a0, p, by_host))
        }
        (Method::GET, "/vms") => read(|d, a, p| vms::list(d, &a.cfg, p)),
        (Method::POST, "/vms") => write(|t, a, p| vms::create(t, &a.cfg, p)),
        (Method::GET, "/vms/{uuid}") => read(move |d, a, p| vms::get_api(d, &a.cfg, &a0, p)),
        (Method::POST, "/vms/{uuid}") => write(move |t, a, p| vms::action(t, &a.cfg, &a0, p)),
        (Method::DELETE, "/vms/{uuid}") => Op::Write(Box::new(move |t, a, p| {
            vms::delete(t, &a.cfg, &a0, p).map(|()| Reply::NoContent)
        })),
        (m, p) => Op::Now(Err(ApiError::bad_method(m.as_str(), p))),
    }
}

fn fabric_route(m: Method, pattern: &str, owner: String, vlan: String, uuid: String) -> Op {
    let check = move |a: &App| fabrics::check_owner(&a.cfg, &owner);
    match (m, pattern) {
        (Method::GET, "/fabrics/{owner_uuid}/vlans") => read(move |d, a, p| {
            let o = check(a)?;
            fabrics::list_vlans(d, &o, p)
        }),
        (Method::POST, "/fabrics/{owner_uuid}/vlans") => write_db(move |d, a, p| {
            let o = check(a)?;
            fabrics::create_vlan(d, &o, p)
        }),
        (Method::GET, "/fabrics/{owner_uuid}/vlans/{vlan_id}") => read(move |d, a, p| {
            let o = check(a)?;
            fabrics::get_vlan_api(d, &o, &vlan, p)
        }),
        (Method::PUT, "/fabrics/{owner_uuid}/vlans/{vlan_id}") => write_db(move |d, a, p| {
            let o = check(a)?;
            fabrics::update_vlan(d, &o, &vlan, p)
        }),
        (Method::DELETE, "/fabrics/{owner_uuid}/vlans/{vlan_id}") => delete_db(move |d, a, _| {
            let o = check(a)?;
            fabrics::delete_vlan(d, &o, &vlan)
        }),
        (Method::GET, "/fabrics/{owner_uuid}/vlans/{vlan_id}/networks") => read(move |d, a, p| {
            let o = check(a)?;
            fabrics::list_networks(d, &o, &vlan, p)
        }),
        (Method::POST, "/fabrics/{owner_uuid}/vlans/{vlan_id}/networks") => {
            write_db(move |d, a, p| {
                let o = check(a)?;
                fabrics::create_network(d, &a.cfg, &o, &vlan, p)
            })
        }
        (Method::GET, "/fabrics/{owner_uuid}/vlans/{vlan_id}/networks/{uuid}") => {
            read(move |d, a, p| {
                let o = check(a)?;
                fabrics::get_network(d, &o, &vlan, &uuid, p)
            })
        }
        (Method::PUT, "/fabrics/{owner_uuid}/vlans/{vlan_id}/networks/{uuid}") => {
            write_db(move |d, a, p| {
                let o = check(a)?;
                let n = fabrics::find_network(d, &o, &vlan, &uuid)?;
                networks::update(d, n, p, networks::View::Fabric)
            })
        }
        (Method::DELETE, "/fabrics/{owner_uuid}/vlans/{vlan_id}/networks/{uuid}") => {
            delete_db(move |d, a, _| {
                let o = check(a)?;
                let n = fabrics::find_network(d, &o, &vlan, &uuid)?;
                networks::delete(d, &n)
            })
        }
        (m, p) => Op::Now(Err(ApiError::bad_method(m.as_str(), p))),
    }
}

/// Route patterns served (axum syntax).
const ROUTES: &[&str] = &[
    "/ping",
    "/metrics",
    "/nic_tags",
    "/nic_tags/{name}",
    "/networks",
    "/networks/{uuid}",
    "/networks/{uuid}/ips",
    "/networks/{uuid}/ips/{ip}",
    "/networks/{uuid}/nics",
    "/nics",
    "/nics/{mac}",
    "/fabrics/{owner_uuid}/vlans",
    "/fabrics/{owner_uuid}/vlans/{vlan_id}",
    "/fabrics/{owner_uuid}/vlans/{vlan_id}/networks",
    "/fabrics/{owner_uuid}/vlans/{vlan_id}/networks/{uuid}",
    "/network_pools",
    "/network_pools/{uuid}",
    "/search/ips",
    "/rules",
    "/rules/{uuid}",
    "/portolan/mappings",
    "/portolan/underlay/{cn_uuid}",
    "/portolan/events",
    "/servers",
    "/servers/{uuid}",
    "/servers/{uuid}/heartbeat",
    "/servers/{uuid}/desired",
    "/servers/{uuid}/vm_states",
    "/servers/{uuid}/certificate",
    "/servers/{uuid}/layers/{digest}",
    "/join",
    "/vms",
    "/vms/{uuid}",
    "/changes",
    "/peers",
    "/peers/{ip}",
    "/accounts",
    "/accounts/{login}",
    "/accounts/{login}/certificates",
    "/shared_networks",
    "/shared_networks/{name}",
];

/// The agents' tunnel routes ([`super::tunnel`]): their bodies stream, so they have a handler
/// of their own (the policy is the same [`authorize`]).
pub const TUNNEL_ROUTES: &[&str] = &["/servers/{uuid}/tunnel", "/servers/{uuid}/tunnel/{id}"];

/// Whether a request's body streams for as long as it lasts (an agent's tunnel sub-stream):
/// the HTTP layer does not cap its size ([`crate::http::Server::with_streaming`]); the tunnel
/// reads it only as fast as its frames are taken.
pub fn streams_body(method: &Method, path: &str) -> bool {
    *method == Method::POST
        && path
            .strip_prefix("/servers/")
            .and_then(|r| r.split_once('/'))
            .and_then(|(_, r)| r.strip_prefix("tunnel/"))
            .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// `GET /servers/:uuid/tunnel` (the agent's tunnel: a stream of open requests) and `POST
/// /servers/:uuid/tunnel/:id` (one sub-stream: agent frames in, control frames out).
async fn tunnel_handle(
    State(app): State<Arc<App>>,
    peer: Option<Extension<Peer>>,
    matched: MatchedPath,
    raw: RawPathParams,
    method: Method,
    uri: Uri,
    body: Body,
) -> Response<Body> {
    let started = Instant::now();
    let pattern = matched.as_str().to_string();
    let path: Vec<String> = raw.iter().map(|(_, v)| v.to_string()).collect();
    let peer = peer.map_or(Peer::Open, |Extension(p)| p);
    let result = tunnel_op(&app, &peer, &method, &pattern, &path, uri.query(), body);
    let status = match &result {
        Ok(_) => 200,
        Err(e) => e.status,
    };
    app.metrics.request(&pattern, method.as_str(), status);
    match result {
        Ok(body) => {
            let mut r = Response::new(body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(if pattern.ends_with("{id}") {
                    "application/vnd.fabric.tunnel-frames"
                } else {
                    "application/x-ndjson"
                }),
            );
            r
        }
        Err(e) => respond(&method, Err(e), started),
    }
}

fn tunnel_op(
    app: &Arc<App>,
    peer: &Peer,
    method: &Method,
    pattern: &str,
    path: &[String],
    query: Option<&str>,
    body: Body,
) -> Result<Body, ApiError> {
    let mut params = Params::parse(query, None, &[])?;
    if let Err(e) = authorize(app, peer, method, pattern, path, &params) {
        app.auth.count(peer, e.status, true);
        return Err(e);
    }
    params.allow_only(&[]);
    params.finish()?;
    let server = path.first().and_then(|u| parse_uuid(u)).ok_or_else(|| {
        ApiError::invalid(
            "uuid",
            format!(
                "{}: expected a server UUID",
                auth::describe(method, pattern, path)
            ),
        )
    })?;
    match (method.as_str(), path.get(1)) {
        ("GET", None) => Ok(app.tunnels.register(&server)),
        ("POST", Some(id)) => app
            .tunnels
            .accept(&server, id, body)
            .map_err(|e| ApiError::not_found(e.to_string())),
        _ => Err(ApiError::bad_method(method.as_str(), pattern)),
    }
}

/// The router.
pub fn router(app: Arc<App>) -> Router {
    let mut r = Router::new();
    for p in ROUTES {
        r = r.route(p, any(handle));
    }
    for p in TUNNEL_ROUTES {
        r = r.route(p, any(tunnel_handle));
    }
    r.fallback(fallback).with_state(app)
}

/// A running service: its state and its background work (the change feed's re-check,
/// retention and LISTEN; the membership refresh), which stop when this is dropped. Serve
/// [`Service::router`] with any acceptor of [`crate::http::Server`] (plain TCP, TLS, a unix
/// socket).
pub struct Service {
    /// The shared state.
    pub app: Arc<App>,
    background: Option<changes::feed::Background>,
    trust_task: Option<tokio::task::JoinHandle<()>>,
}

impl Service {
    /// Starts the background work over `store` (must be called inside a tokio runtime).
    pub fn start(store: Arc<dyn Store>, cfg: Config) -> Service {
        let app = Arc::new(App::new(store, cfg));
        let background = changes::feed::start(&app);
        let trust_task = app.trust.is_some().then(|| {
            let a = app.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(TRUST_REFRESH);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if a.feed.is_closed() {
                        return;
                    }
                    sync_trust(&a, None).await;
                }
            })
        });
        Service {
            app,
            background: Some(background),
            trust_task,
        }
    }

    /// The router over this service's state.
    pub fn router(&self) -> Router {
        router(self.app.clone())
    }

    /// Ends every long-poll and agent tunnel at once (the service is stopping).
    pub fn close(&self) {
        self.app.feed.close();
        self.app.tunnels.close();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(t) = self.trust_task.take() {
            t.abort();
        }
        drop(self.background.take());
    }
}

/// Serves until `shutdown` completes, through the shared HTTP layer ([`crate::http`]) with
/// `cfg.http`'s limits; its connection counters show on `/metrics`. With `cfg.trust`, keeps
/// that membership view in step with the store.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = cfg.http.clone();
    let svc = Service::start(store, cfg);
    let stats = svc.app.metrics.http.clone();
    let feed = svc.app.feed.clone();
    let tunnels = svc.app.tunnels.clone();
    // Long-polls and tunnels end at once when the service stops, so it does not wait for them.
    let shutdown = async move {
        shutdown.await;
        feed.close();
        tunnels.close();
    };
    let r = crate::http::Server::new(limits)
        .with_stats(stats)
        .with_streaming(streams_body)
        .serve(listener, svc.router(), shutdown)
        .await;
    drop(svc);
    r
}

async fn fallback(
    State(app): State<Arc<App>>,
    peer: Option<Extension<Peer>>,
    method: Method,
    uri: Uri,
) -> Response<Body> {
    let started = Instant::now();
    let peer = peer.map_or(Peer::Open, |Extension(p)| p);
    // Who may not use the API learns nothing about which paths exist.
    let e = match auth::allowed(&peer, &method, uri.path(), &[], &Params::default()) {
        Err(e) => {
            app.auth.count(&peer, e.status, true);
            e
        }
        Ok(()) => ApiError::no_route(uri.path()),
    };
    app.metrics.request("unmatched", method.as_str(), e.status);
    respond(&method, Err(e), started)
}

/// Whether a write on `pattern` changes who is a member (the [`Trust`] view): registering,
/// removing, joining, foreign peers.
fn changes_membership(method: &Method, pattern: &str) -> bool {
    matches!(
        (method.as_str(), pattern),
        ("PUT" | "DELETE", "/servers/{uuid}" | "/peers/{ip}") | ("POST", "/join")
    )
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    State(app): State<Arc<App>>,
    peer: Option<Extension<Peer>>,
    matched: MatchedPath,
    raw: RawPathParams,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let started = Instant::now();
    let pattern = matched.as_str().to_string();
    let path: Vec<String> = raw.iter().map(|(_, v)| v.to_string()).collect();
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let if_match = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let peer = peer.map_or(Peer::Open, |Extension(p)| p);
    let result = match Params::parse(uri.query(), ct.as_deref(), &body) {
        Err(e) => Err(e),
        Ok(params) => match authorize(&app, &peer, &method, &pattern, &path, &params) {
            Err(e) => {
                app.auth.count(&peer, e.status, true);
                Err(e)
            }
            Ok(()) if pattern == LAYER_ROUTE => {
                let r = layer_blob(&app, &method, &path).await;
                let status = r.as_ref().map_or_else(|e| e.status, |_| 200);
                app.metrics.request(&pattern, method.as_str(), status);
                return match r {
                    Ok(resp) => resp,
                    Err(e) => respond(&method, Err(e), started),
                };
            }
            Ok(()) => {
                let mut op = route(&method, &pattern, path.clone(), &peer);
                if let (Some(im), true) =
                    (if_match, method == Method::PUT || method == Method::DELETE)
                {
                    let get = route(&Method::GET, &pattern, path.clone(), &peer);
                    op = conditional(op, get, im, pattern.clone(), path.clone());
                }
                let r = run(&app, op, params).await;
                match &r {
                    Ok(_) if changes_membership(&method, &pattern) => {
                        let removed = (method == Method::DELETE && pattern == "/servers/{uuid}")
                            .then(|| path.first().and_then(|u| parse_uuid(u)))
                            .flatten();
                        sync_trust(&app, removed.as_deref()).await;
                    }
                    Ok(_) if method == Method::DELETE && pattern == "/accounts/{login}" => {
                        // The Docker listener refuses the account's certificates from now on.
                        if let Some(d) = &app.cfg.docker {
                            crate::docker::sync_revoked(&app, &d.trust).await;
                        }
                    }
                    Err(e) => app.auth.count(&peer, e.status, false),
                    Ok(_) => {}
                }
                r
            }
        },
    };
    let status = match &result {
        Ok(Reply::NoContent) => 204,
        Ok(_) => 200,
        Err(e) => e.status,
    };
    app.metrics.request(&pattern, method.as_str(), status);
    respond(&method, result, started)
}

/// The route policy, then (with a [`Trust`]) a host certificate of a removed server is 410
/// Gone on every route, its feed included.
fn authorize(
    app: &App,
    peer: &Peer,
    method: &Method,
    pattern: &str,
    path: &[String],
    params: &Params,
) -> Result<(), ApiError> {
    auth::allowed(peer, method, pattern, path, params)?;
    if let (Peer::Host { server_uuid, .. }, Some(t)) = (peer, &app.trust) {
        if t.is_revoked(server_uuid) {
            return Err(changes::gone(format!(
                "{}: server {server_uuid} was removed from the cluster; its certificate is \
                 revoked",
                auth::describe(method, pattern, path)
            )));
        }
    }
    Ok(())
}

/// `If-Match` on a per-object PUT or DELETE (restify's `conditionalRequest`): inside the write
/// transaction, the object's current representation must have one of the given etags (or the
/// header is `*`), else 412 and nothing changes.
/// The object's current representation is read under the locks the write takes first (see
/// [`lock_object`]), so two writers with one etag cannot both match.
fn conditional(op: Op, get: Op, if_match: String, pattern: String, path: Vec<String>) -> Op {
    match (op, get) {
        (Op::Write(w), Op::Read(g)) => Op::Write(Box::new(move |tx, a, p| {
            lock_object(&mut Db::from(tx.raw()), &pattern, &path)?;
            let cur = g(&mut Db::from(tx.raw()), a, &mut Params::default())?;
            if let Reply::Json(v) = cur {
                let etag = etag_of(&serde_json::to_vec(&v)?);
                let wanted = if_match.trim();
                let matches = wanted == "*"
                    || wanted
                        .split(',')
                        .map(|t| t.trim().trim_start_matches("W/"))
                        .any(|t| t == etag || t.trim_matches('"') == etag.trim_matches('"'));
                if !matches {
                    return Err(ApiError::precondition_failed(format!(
                        "if-match '{wanted}' didn't match etag '{etag}'"
                    ))
                    .into());
                }
            }
            w(tx, a, p)
        })),
        (op, _) => op,
    }
}

async fn run(app: &Arc<App>, op: Op, mut params: Params) -> Result<Reply, ApiError> {
    let kind = match &op {
        Op::Feed => return changes::feed::poll(app, params).await.map(Reply::Json),
        Op::Now(_) => {
            return match op {
                Op::Now(r) => r,
                _ => Err(ApiError::internal()),
            }
        }
        Op::Read(_) | Op::Metrics => "read",
        Op::Write(_) => "write",
    };
    let a = app.clone();
    let task = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let r: Result<Reply, OpError> = match op {
            Op::Read(f) => {
                store::with_read(&*a.store, |raw| f(&mut Db::from(raw), &a, &mut params))
            }
            Op::Write(f) => run_write(&a, &f, &params),
            Op::Metrics => {
                let counts = store::with_read(
                    &*a.store,
                    |raw| -> Result<(u64, u64, u64, u64, u64), OpError> {
                        let mut d = Db::from(raw);
                        let mut count = |sql: &str| -> Result<u64, OpError> {
                            let r = d.query_opt(sql, &[])?;
                            Ok(r.and_then(|r| r.first().and_then(Val::as_opt_i64))
                                .unwrap_or(0) as u64)
                        };
                        Ok((
                            count("SELECT COUNT(*) FROM napi_nics")?,
                            count("SELECT COUNT(*) FROM napi_networks")?,
                            count("SELECT COUNT(*) FROM napi_rules")?,
                            count("SELECT COUNT(*) FROM fabric_vms WHERE state <> 'destroyed'")?,
                            count("SELECT COUNT(*) FROM fabric_servers")?,
                        ))
                    },
                );
                counts.map(|(n, w, r, v, s)| {
                    let mut text = a.metrics.render(&[
                        ("fabric_control_nics", "NICs in the store.", n),
                        ("fabric_control_networks", "Networks in the store.", w),
                        ("fabric_control_rules", "Firewall rules in the store.", r),
                        (
                            "fabric_control_vms",
                            "VMs in the store that are not destroyed.",
                            v,
                        ),
                        ("fabric_control_servers", "Registered servers.", s),
                    ]);
                    a.feed.render(&mut text);
                    a.auth.render(&mut text);
                    a.tunnels.render(&mut text);
                    if a.cfg.docker.is_some() {
                        crate::docker::render_metrics(&mut text);
                    }
                    text.push_str(
                        "# HELP fabric_control_trust_refresh_errors_total Membership refreshes \
                         that could not read the store.\n# TYPE \
                         fabric_control_trust_refresh_errors_total counter\n",
                    );
                    text.push_str(&format!(
                        "fabric_control_trust_refresh_errors_total {}\n",
                        a.trust_errors.load(std::sync::atomic::Ordering::Relaxed)
                    ));
                    Reply::Text(text)
                })
            }
            Op::Now(r) => r.map_err(OpError::from),
            Op::Feed => Err(ApiError::internal().into()),
        };
        a.metrics.store(kind, t0.elapsed());
        r
    });
    match task.await {
        Ok(r) => r.map_err(OpError::into_api),
        Err(e) => {
            tracing::error!(error = %e, "control plane operation panicked");
            Err(ApiError::internal())
        }
    }
}

/// Takes the locks a per-object write on `pattern` starts with, in the order of db.rs (the
/// write takes them again, which is free), so what is read before the write stays true.
fn lock_object(d: &mut Db<'_>, pattern: &str, path: &[String]) -> Result<(), OpError> {
    use super::db::{lock_key, lock_nic, LOCK_GLOBAL, LOCK_OWNER, LOCK_RULE, LOCK_SERVER};
    let arg = |i: usize| path.get(i).map(String::as_str).unwrap_or("");
    match pattern {
        "/nics/{mac}" => {
            if let Some(m) = nics::parse_mac(arg(0)) {
                lock_nic(d, m)?;
            }
        }
        "/networks/{uuid}" | "/fabrics/{owner_uuid}/vlans/{vlan_id}/networks/{uuid}" => {
            d.lock(lock_key(LOCK_GLOBAL, "networks"))?;
            let u = if pattern.starts_with("/fabrics") {
                arg(2)
            } else {
                arg(0)
            };
            if let Some(u) = super::params::parse_uuid(u) {
                networks::lock_network(d, &u)?;
            }
        }
        "/networks/{uuid}/ips/{ip}" => {
            if let Some(u) = super::params::parse_uuid(arg(0)) {
                networks::lock_network(d, &u)?;
            }
        }
        "/nic_tags/{name}" => d.lock(lock_key(LOCK_GLOBAL, "nic_tags"))?,
        "/servers/{uuid}" => d.lock(lock_key(LOCK_SERVER, "servers"))?,
        "/vms/{uuid}" => match vms::lock_and_find(d, arg(0)) {
            // A missing VM is the write's own 404.
            Err(OpError::Api(e)) if e.status == 404 => {}
            r => {
                r?;
            }
        },
        "/network_pools/{uuid}" => d.lock(lock_key(LOCK_GLOBAL, "networks"))?,
        "/rules/{uuid}" => {
            if let Some(u) = super::params::parse_uuid(arg(0)) {
                d.lock(lock_key(LOCK_RULE, &u))?;
            }
        }
        "/fabrics/{owner_uuid}/vlans/{vlan_id}" => {
            if let Some(o) = super::params::parse_uuid(arg(0)) {
                d.lock(lock_key(LOCK_OWNER, &o))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Attempts of one write transaction when PostgreSQL aborts it for a deadlock or a
/// serialization failure (the locks of every write path are taken in one order, so this is
/// rare: two pool provisions or two primary-NIC changes meeting in opposite orders).
pub const WRITE_ATTEMPTS: u32 = 5;

/// Runs a write in one store transaction, again (from the same parameters) while the database
/// aborts it with a retryable error; counts the retries.
fn run_write(a: &App, f: &WriteOp, params: &Params) -> Result<Reply, OpError> {
    write_txn(a, |tx| f(tx, a, &mut params.clone()))
}

/// Runs `f` in one write transaction of the service's store (in this process's SQLite writer
/// turn), with the changes it records written before commit and this process's long-polls woken
/// after; again from the start while PostgreSQL aborts it for a deadlock or a serialization
/// failure (up to [`WRITE_ATTEMPTS`]). Call it on the blocking pool. The Docker API's writes
/// go through here too.
pub fn write_txn<T>(a: &App, f: impl Fn(&mut dyn Txn) -> Result<T, OpError>) -> Result<T, OpError> {
    // A panic in another writer cannot leave `()` inconsistent.
    let _turn = a
        .sqlite_writers
        .as_ref()
        .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
    let mut attempt = 1;
    loop {
        super::changes::discard();
        let mut flushed = None;
        let r: Result<T, OpError> = store::with_txn(&*a.store, |tx| {
            let reply = f(tx)?;
            flushed = super::changes::flush(&mut Db::from(tx.raw()))?;
            Ok(reply)
        });
        if let (Ok(_), Some(seq)) = (&r, flushed) {
            // Committed: wake this process's long-polls.
            a.feed.committed(seq);
        }
        match r {
            Err(e) if e.is_retryable() && attempt < WRITE_ATTEMPTS => {
                a.metrics.txn_retry();
                tracing::debug!(attempt, error = %e, "write transaction aborted; retrying");
                // 1, 2, 4, 8 ms plus jitter: the other transaction is usually done by then.
                let jitter = u64::from(super::now_us().unsigned_abs() as u32 % 1000);
                std::thread::sleep(std::time::Duration::from_micros(
                    (1000 << (attempt - 1)) + jitter,
                ));
                attempt += 1;
            }
            r => return r,
        }
    }
}

fn respond(method: &Method, result: Result<Reply, ApiError>, started: Instant) -> Response<Body> {
    let (status, body, ctype, etag) = match result {
        Ok(Reply::Json(v)) => {
            let b = serde_json::to_vec(&v).unwrap_or_default();
            let etag = v.is_object().then(|| etag_of(&b));
            (200, b, "application/json", etag)
        }
        Ok(Reply::Text(t)) => (200, t.into_bytes(), "text/plain; version=0.0.4", None),
        Ok(Reply::NoContent) => (204, Vec::new(), "", None),
        Err(e) => (
            e.status,
            serde_json::to_vec(&e.body()).unwrap_or_default(),
            "application/json",
            None,
        ),
    };
    let len = body.len();
    let body = if *method == Method::HEAD || status == 204 {
        Body::empty()
    } else {
        Body::from(body)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    if !ctype.is_empty() {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
        if *method == Method::HEAD {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    if let Some(e) = etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
        h.insert(header::ETAG, e);
    }
    if let Ok(Ok(id)) = random_uuid().map(|u| HeaderValue::from_str(&u)) {
        h.insert("x-request-id", id);
    }
    h.insert(
        "x-response-time",
        HeaderValue::from(started.elapsed().as_millis() as u64),
    );
    h.insert(header::SERVER, HeaderValue::from_static("fabric-control"));
    resp
}

/// A weak content hash for `Etag` (FNV-1a 64).
fn etag_of(b: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}\"")
}

// ---------------------------------------------------------------------------------------------
// Image layers for agents: `GET /servers/:uuid/layers/sha256:<hex>` streams a blob of the head's
// store (`DIR/images/sha256/<hex>`, [`crate::docker::layers`]) to the agent of that server, which
// checks its digest as it writes it (`agent::runtime::layers`).

/// The route pattern of a layer download.
const LAYER_ROUTE: &str = "/servers/{uuid}/layers/{digest}";

/// Bytes per chunk of a layer download.
const LAYER_CHUNK: usize = 64 * 1024;

/// The answer to a layer download: the blob (`Content-Length` set; `HEAD` without it), 404 for
/// a digest the head does not have, 422 `InvalidParameters` for one that is not
/// `sha256:<64 lowercase hex>` (checked before any path is made from it).
async fn layer_blob(
    app: &App,
    method: &Method,
    path: &[String],
) -> Result<Response<Body>, ApiError> {
    let digest = path.get(1).map(String::as_str).unwrap_or("");
    if !crate::docker::layers::valid_digest(digest) {
        return Err(ApiError::invalid(
            "digest",
            format!("layer {digest:?}: expected sha256:<64 lowercase hex digits>"),
        ));
    }
    let Some(cluster) = &app.cfg.cluster else {
        return Err(ApiError::not_found(format!(
            "layer {digest}: this control plane keeps no image layers (no --data directory)"
        )));
    };
    let file_path = cluster
        .data
        .join("images")
        .join("sha256")
        .join(&digest["sha256:".len()..]);
    let opened = std::fs::File::open(&file_path).and_then(|f| {
        let m = f.metadata()?;
        Ok((f, m))
    });
    let (file, len) = match opened {
        Ok((f, m)) if m.is_file() => (f, m.len()),
        Ok(_) => return Err(ApiError::not_found(format!("layer {digest} not found"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found(format!("layer {digest} not found")))
        }
        Err(e) => {
            tracing::warn!(error = %e, path = %file_path.display(), "cannot open a layer blob");
            return Err(ApiError::internal());
        }
    };
    let body = if *method == Method::HEAD {
        Body::empty()
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || send_file(file, len, tx));
        Body::new(LayerBody(rx))
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::SERVER, HeaderValue::from_static("fabric-control"));
    Ok(resp)
}

/// Reads `len` bytes of `file` into `tx` chunk by chunk until done, an error (sent on, so the
/// download breaks rather than ends short), or the receiver going away.
fn send_file(
    mut file: std::fs::File,
    len: u64,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) {
    use std::io::Read as _;
    let mut left = len;
    while left > 0 {
        let mut buf = vec![0u8; LAYER_CHUNK.min(usize::try_from(left).unwrap_or(LAYER_CHUNK))];
        let r = match file.read(&mut buf) {
            Ok(0) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the layer blob is shorter than when it was opened",
            )),
            Ok(n) => {
                buf.truncate(n);
                left -= n as u64;
                Ok(Bytes::from(buf))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
        let stop = r.is_err();
        if tx.blocking_send(r).is_err() || stop {
            return;
        }
    }
}

/// A response body fed by [`send_file`].
struct LayerBody(tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>);

impl http_body::Body for LayerBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(http_body::Frame::data)))
    }
}
