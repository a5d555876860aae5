//! The Docker Remote API's request path: API version prefix, the calling account, dispatch to
//! the resource modules, and moby's response conventions.
//!
//! - Paths are served with and without a `/v{major}.{minor}` prefix. A version above
//!   [`MAX_VERSION`] or below [`MIN_VERSION`] is refused with moby's 400 texts.
//! - Every request acts as exactly one account: the listener verified a client certificate of
//!   the accounts CA ([`Peer::Account`]); its serial is looked up in the store inside the
//!   request's own transaction, so a removed account is refused even on a connection that was
//!   already open.
//! - Routes that are not served answer 404 `{"message":"page not found"}`, as moby does: the
//!   docker CLI's `inspect` falls through its lookup chain on 404 only.
//! - Every response carries `Api-Version`, `Ostype`, `Docker-Experimental` and `Server`.
//!
//! Operations run on tokio's blocking pool inside one store transaction (read-only for reads);
//! writes take the control plane's SQLite writer turn and are retried on PostgreSQL's
//! deadlock/serialization aborts ([`crate::control::http::write_txn`]); changes they record are
//! in the control plane's feed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use axum::Extension;
use http_body_util::BodyExt;
use portolan::store;
use serde_json::Value;

use super::accounts::{self, Account};
use super::error::{self, page_not_found};
use super::{system, Docker};
use crate::control::db::Db;
use crate::control::error::{ApiError, OpError};
use crate::pki::Peer;

/// The newest API version served (what `/_ping` announces).
pub const MAX_VERSION: Version = Version(1, 41);
/// The oldest API version served.
pub const MIN_VERSION: Version = Version(1, 24);
/// Largest JSON body of an ordinary (not image upload) request.
pub const MAX_JSON_BODY: usize = 1 << 20;

/// An API version, `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

impl Version {
    /// Parses `1.41`.
    pub fn parse(s: &str) -> Option<Version> {
        let (a, b) = s.split_once('.')?;
        let ok = |x: &str| !x.is_empty() && x.len() <= 4 && x.bytes().all(|c| c.is_ascii_digit());
        if !(ok(a) && ok(b)) {
            return None;
        }
        Some(Version(a.parse().ok()?, b.parse().ok()?))
    }
}

/// A path split into its version and segments: `/v1.41/networks/x` → (1.41, [networks, x]).
/// `Err` carries moby's refusal of a version out of range; `Ok(None)` a malformed prefix.
pub fn split_path(path: &str) -> Result<(Option<Version>, Vec<String>), ApiError> {
    let mut segs: Vec<&str> = path.split('/').skip(1).collect();
    let mut version = None;
    if let Some(first) = segs.first() {
        if let Some(v) = first.strip_prefix('v') {
            if v.bytes().all(|c| c.is_ascii_digit() || c == b'.') && !v.is_empty() {
                let ver = Version::parse(v).ok_or_else(page_not_found)?;
                if ver > MAX_VERSION {
                    return Err(error::api(
                        400,
                        format!(
                            "client version {ver} is too new. Maximum supported API version is {MAX_VERSION}"
                        ),
                    ));
                }
                if ver < MIN_VERSION {
                    return Err(error::api(
                        400,
                        format!(
                            "client version {ver} is too old. Minimum supported API version is {MIN_VERSION}, please upgrade your client to a newer version"
                        ),
                    ));
                }
                version = Some(ver);
                segs.remove(0);
            }
        }
    }
    // `/networks/` lists as `/networks` does (moby's router strips one trailing slash).
    if segs.len() > 1 && segs.last() == Some(&"") {
        segs.pop();
    }
    let segs = segs
        .into_iter()
        .map(|s| {
            percent_decode(s).ok_or_else(|| error::api(400, format!("invalid path segment {s:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((version, segs))
}

/// Percent-encodes everything but unreserved characters (a path segment or query value).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The query string's parameters, in order.
#[derive(Debug, Clone, Default)]
pub struct Query(pub Vec<(String, String)>);

impl Query {
    /// Parses a query string.
    pub fn parse(q: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }
    /// The last value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// A boolean as moby reads one (`1`, `true`, `True` → true; absent, `0`, `false`, `` →
    /// false); anything else is 400.
    pub fn bool(&self, name: &str) -> Result<bool, OpError> {
        match self.get(name) {
            None | Some("" | "0" | "false" | "False" | "FALSE") => Ok(false),
            Some("1" | "true" | "True" | "TRUE") => Ok(true),
            Some(v) => Err(error::bad_request(format!(
                "invalid boolean value for {name}: {v:?}"
            ))),
        }
    }
}

/// One request, as the resource modules see it.
#[derive(Debug, Clone)]
pub struct Req {
    /// The method (`HEAD` is answered as `GET` without a body).
    pub method: Method,
    /// The path's segments after the version, decoded.
    pub path: Vec<String>,
    /// The API version asked for (the newest when unversioned).
    pub version: Version,
    /// The query string.
    pub query: Query,
    /// The headers.
    pub headers: HeaderMap,
    /// The body (empty for the streaming routes, which read theirs themselves).
    pub body: Bytes,
    /// The request's extensions: hyper's upgrade handle, for the hijacking routes (attach,
    /// exec start).
    pub extensions: axum::http::Extensions,
}

impl Req {
    /// The body as JSON of a create-style request, refused as moby refuses: a content type
    /// other than JSON, an empty body, malformed JSON.
    pub fn json(&self) -> Result<Value, OpError> {
        if let Some(ct) = self.headers.get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            let mime = ct.split(';').next().unwrap_or("").trim();
            if !mime.eq_ignore_ascii_case("application/json") {
                return Err(error::bad_request(format!(
                    "Content-Type specified ({ct}) must be 'application/json'"
                )));
            }
        }
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err(error::bad_request("got EOF while reading request body"));
        }
        serde_json::from_slice(&self.body).map_err(|e| error::bad_request(e.to_string()))
    }
}

/// What an operation answers.
pub enum Reply {
    /// JSON with a status.
    Json(StatusCode, Value),
    /// No body (204, 304, or 200 with an empty body).
    Empty(StatusCode),
    /// A ready response (streams, text).
    Response(Response<Body>),
}

/// The context of one operation: the service and the calling account.
pub struct Ctx<'a> {
    /// The service.
    pub docker: &'a Docker,
    /// Who is asking.
    pub account: &'a Account,
}

/// A read operation (one read-only transaction).
pub type ReadOp = Box<dyn FnOnce(&mut Db<'_>, &Ctx<'_>) -> Result<Reply, OpError> + Send>;
/// A write operation (one transaction; run again from the start if PostgreSQL aborts it).
pub type WriteOp = Box<dyn Fn(&mut Db<'_>, &Ctx<'_>) -> Result<Reply, OpError> + Send>;
/// A write operation that needs the store transaction itself (NICs: Portolan mappings), not
/// only its SQL connection.
pub type TxWriteOp = Box<dyn Fn(&mut dyn store::Txn, &Ctx<'_>) -> Result<Reply, OpError> + Send>;
/// An operation that awaits (streams a body in or out); it resolves the account itself.
pub type AsyncOp = Box<
    dyn FnOnce(Arc<Docker>, Account) -> Pin<Box<dyn Future<Output = Result<Reply, OpError>> + Send>>
        + Send,
>;

/// How a route is served.
pub enum Op {
    /// In one read-only transaction.
    Read(ReadOp),
    /// In one write transaction.
    Write(WriteOp),
    /// In one write transaction, given the transaction.
    TxWrite(TxWriteOp),
    /// Asynchronously.
    Async(AsyncOp),
    /// Answered at once.
    Now(Result<Reply, OpError>),
}

/// A read operation.
pub fn read(
    f: impl FnOnce(&mut Db<'_>, &Ctx<'_>) -> Result<Reply, OpError> + Send + 'static,
) -> Op {
    Op::Read(Box::new(f))
}

/// A write operation.
pub fn write(f: impl Fn(&mut Db<'_>, &Ctx<'_>) -> Result<Reply, OpError> + Send + 'static) -> Op {
    Op::Write(Box::new(f))
}

/// A write operation given the transaction.
pub fn write_tx(
    f: impl Fn(&mut dyn store::Txn, &Ctx<'_>) -> Result<Reply, OpError> + Send + 'static,
) -> Op {
    Op::TxWrite(Box::new(f))
}

/// JSON 200.
pub fn ok(v: Value) -> Result<Reply, OpError> {
    Ok(Reply::Json(StatusCode::OK, v))
}

/// Picks the operation of a request (the body is already read).
fn route(req: Req) -> Op {
    let m = if req.method == Method::HEAD {
        Method::GET
    } else {
        req.method.clone()
    };
    let p: Vec<&str> = req.path.iter().map(String::as_str).collect();
    match (&m, p.as_slice()) {
        (&Method::GET, ["_ping"]) => Op::Now(Ok(Reply::Response(system::ping(&req.method)))),
        (&Method::GET, ["version"]) => read(|d, c| ok(system::version(d, c)?)),
        (&Method::GET, ["info"]) => read(|d, c| ok(system::info(d, c)?)),
        // Swarm is never active here: what docker-py's tearDown and the CLI expect of a
        // daemon that is not part of one.
        (&Method::POST, ["swarm", "leave"]) => {
            Op::Now(Err(error::err(503, "This node is not part of a swarm")))
        }
        (_, ["networks", ..]) => super::networks::route(&req).unwrap_or_else(no_route),
        (_, ["images", ..]) => super::images_api::route(&req).unwrap_or_else(no_route),
        (_, ["containers", ..]) | (_, ["exec", ..]) => {
            super::containers::route(&req).unwrap_or_else(no_route)
        }
        _ => no_route(),
    }
}

fn no_route() -> Op {
    Op::Now(Err(OpError::Api(page_not_found())))
}

/// The service's one handler (the router's fallback): every path.
pub async fn handle(
    State(docker): State<Arc<Docker>>,
    peer: Option<Extension<Peer>>,
    req: Request<Body>,
) -> Response<Body> {
    let method = req.method().clone();
    let mut resp = match serve(&docker, peer.map(|Extension(p)| p), req).await {
        Ok(Reply::Json(status, v)) => {
            let mut r = Response::new(Body::from(serde_json::to_vec(&v).unwrap_or_default()));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Ok(Reply::Empty(status)) => {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = status;
            r
        }
        Ok(Reply::Response(r)) => r,
        Err(e) => {
            let e = e.into_api();
            error::response(&e)
        }
    };
    docker.count(resp.status().as_u16());
    if method == Method::HEAD {
        *resp.body_mut() = Body::empty();
    }
    let h = resp.headers_mut();
    h.insert("api-version", HeaderValue::from_static("1.41"));
    h.insert("ostype", HeaderValue::from_static("linux"));
    h.insert("docker-experimental", HeaderValue::from_static("false"));
    h.insert(
        header::SERVER,
        HeaderValue::from_static(concat!("fabric/", env!("CARGO_PKG_VERSION"), " (linux)")),
    );
    resp
}

async fn serve(
    docker: &Arc<Docker>,
    peer: Option<Peer>,
    req: Request<Body>,
) -> Result<Reply, OpError> {
    let (head, body) = req.into_parts();
    let (version, path) = split_path(head.uri.path())?;
    // The listener admits account certificates only; anything else gets nothing.
    let Some(Peer::Account { serial, login }) = peer else {
        return Err(error::err(
            401,
            "the Docker API needs a client certificate of this cluster's accounts CA (fabric account add)",
        ));
    };
    let mut req = Req {
        method: head.method,
        path,
        version: version.unwrap_or(MAX_VERSION),
        query: Query::parse(head.uri.query()),
        headers: head.headers,
        body: Bytes::new(),
        extensions: head.extensions,
    };
    // Uploads (`docker import`, `docker load`) stream their bodies themselves, up to the
    // listener's body cap.
    if super::images_api::is_upload(&req) {
        let op = super::images_api::route_upload(&req, body);
        return run(docker, op, serial, login).await;
    }
    req.body = match http_body_util::Limited::new(body, MAX_JSON_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(error::err(
                413,
                format!("request body larger than {MAX_JSON_BODY} bytes"),
            ))
        }
        Err(e) => return Err(error::bad_request(format!("reading the request body: {e}"))),
    };
    run(docker, route(req), serial, login).await
}

/// The account of a certificate, or the refusal.
fn account_of(db: &mut Db<'_>, serial: &str, login: &str) -> Result<Account, OpError> {
    accounts::by_serial(db, serial)?.ok_or_else(|| {
        error::err(
            401,
            format!("account {login:?} was removed, or this certificate was revoked"),
        )
    })
}

/// Runs an operation as the account of certificate `serial`.
pub async fn run(
    docker: &Arc<Docker>,
    op: Op,
    serial: String,
    login: String,
) -> Result<Reply, OpError> {
    let d = docker.clone();
    let blocking = match op {
        Op::Now(r) => return r,
        Op::Async(f) => {
            let d2 = d.clone();
            let account = tokio::task::spawn_blocking(move || {
                store::with_read(&*d2.app.store, |raw| {
                    account_of(&mut Db::from(raw), &serial, &login)
                })
            })
            .await
            .map_err(|_| error::err(500, "internal error"))??;
            return f(d, account).await;
        }
        op => op,
    };
    let task = tokio::task::spawn_blocking(move || match blocking {
        Op::Read(f) => store::with_read(&*d.app.store, |raw| {
            let mut db = Db::from(raw);
            let account = account_of(&mut db, &serial, &login)?;
            f(
                &mut db,
                &Ctx {
                    docker: &d,
                    account: &account,
                },
            )
        }),
        Op::Write(f) => crate::control::http::write_txn(&d.app, |tx| {
            let mut db = Db::from(tx.raw());
            let account = account_of(&mut db, &serial, &login)?;
            f(
                &mut db,
                &Ctx {
                    docker: &d,
                    account: &account,
                },
            )
        }),
        Op::TxWrite(f) => crate::control::http::write_txn(&d.app, |tx| {
            let account = account_of(&mut Db::from(tx.raw()), &serial, &login)?;
            f(
                tx,
                &Ctx {
                    docker: &d,
                    account: &account,
                },
            )
        }),
        Op::Now(r) => r,
        Op::Async(_) => Err(error::err(500, "internal error")),
    });
    match task.await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "Docker API operation panicked");
            Err(error::err(500, "internal error"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_paths() {
        let (v, p) = split_path("/v1.41/networks/abc").unwrap();
        assert_eq!(v, Some(Version(1, 41)));
        assert_eq!(p, vec!["networks", "abc"]);
        let (v, p) = split_path("/_ping").unwrap();
        assert_eq!(v, None);
        assert_eq!(p, vec!["_ping"]);
        assert_eq!(split_path("/networks/").unwrap().1, vec!["networks"]);
        assert_eq!(split_path("/v1.24/info").unwrap().0, Some(Version(1, 24)));
        let e = split_path("/v1.52/info").unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(
            e.message,
            "client version 1.52 is too new. Maximum supported API version is 1.41"
        );
        let e = split_path("/v1.12/info").unwrap_err();
        assert!(
            e.message.starts_with("client version 1.12 is too old."),
            "{}",
            e.message
        );
        assert_eq!(split_path("/v1/info").unwrap_err().status, 404);
        assert_eq!(
            split_path("/networks/a%20b").unwrap().1,
            vec!["networks", "a b"]
        );
        assert_eq!(split_path("/networks/%zz").unwrap_err().status, 400);
        // Not a version: an ordinary segment.
        assert_eq!(split_path("/version").unwrap().1, vec!["version"]);
    }

    proptest::proptest! {
        /// Any path either splits (and every segment is valid UTF-8 without a `/` from the
        /// original) or is refused with a 4xx; nothing panics.
        #[test]
        fn any_path_splits_or_is_refused(path in "(/[a-zA-Z0-9%._v-]{0,12}){0,5}") {
            match split_path(&path) {
                Ok((_, segs)) => {
                    proptest::prop_assert!(segs.len() <= path.matches('/').count());
                }
                Err(e) => proptest::prop_assert!((400..500).contains(&e.status)),
            }
        }

        #[test]
        fn any_query_parses(q in ".{0,64}") {
            let q = Query::parse(Some(&q));
            for (k, _) in &q.0 {
                let _ = q.bool(k);
            }
        }
    }

    #[test]
    fn booleans_as_moby_reads_them() {
        let q = Query::parse(Some("a=1&b=false&c=yes&d="));
        assert!(q.bool("a").unwrap());
        assert!(!q.bool("b").unwrap());
        assert!(!q.bool("d").unwrap());
        assert!(!q.bool("missing").unwrap());
        assert!(q.bool("c").is_err());
    }
}
