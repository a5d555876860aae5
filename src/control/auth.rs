//! Who may call what (DESIGN "Trust"): the route policy per [`Peer`], checked by
//! `http::handle` before an operation runs.
//!
//! - [`Peer::Open`] (standalone `fabric control` on plain HTTP) and [`Peer::Operator`] (an
//!   operator certificate, or the head's `control.sock`): every route.
//! - [`Peer::Host`]: exactly its agent's routes, and only for its own server —
//!   `GET /servers/:own/desired`, `GET /changes?server_uuid=own` (the parameter is required),
//!   `POST /servers/:own/vm_states`, `POST /servers/:own/heartbeat`, `PUT /servers/:own` and
//!   `POST /servers/:own/certificate` (renewal), `GET /servers/:own/layers/:digest` (image
//!   layers for its containers), and its tunnel (`GET /servers/:own/tunnel`, `POST
//!   /servers/:own/tunnel/:id`), which not even an operator may use. Two checks need the store
//!   and live in the
//!   writes themselves: every VM of a state report must be on `own` (else 403 and nothing is
//!   written, [`super::vms::report_states`]), and `PUT /servers/:own` only re-registers an
//!   existing server without changing its underlay address ([`super::servers::put`]).
//! - [`Peer::Anonymous`] (TLS without a client certificate): only `POST /join`.
//!
//! Refusals are restify-style: 401 `Unauthorized` without a certificate, 403 `Forbidden` for a
//! route the certificate does not cover, each with a one-line message naming what was refused
//! and why, and counted ([`AuthCounters`]).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::Method;

use super::error::ApiError;
use super::params::{parse_uuid, Params};
pub use crate::pki::Peer;

/// 401 `Unauthorized`: no client certificate.
pub fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError {
        status: 401,
        code: "Unauthorized",
        message: message.into(),
        errors: Vec::new(),
        with_errors: false,
        extra: serde_json::Map::new(),
    }
}

/// 403 `Forbidden`: the certificate does not allow this.
pub fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError {
        status: 403,
        code: "Forbidden",
        message: message.into(),
        errors: Vec::new(),
        with_errors: false,
        extra: serde_json::Map::new(),
    }
}

/// The request as a reader would write it: `PUT /servers/564d…`, with the route's parameters
/// put back into its pattern.
pub fn describe(method: &Method, pattern: &str, path: &[String]) -> String {
    let mut out = String::with_capacity(pattern.len() + 40);
    let _ = write!(out, "{method} ");
    let mut args = path.iter();
    for (i, seg) in pattern.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if seg.starts_with('{') && seg.ends_with('}') {
            out.push_str(args.next().map_or(seg, String::as_str));
        } else {
            out.push_str(seg);
        }
    }
    out
}

/// The routes a host certificate may use (besides the feed); the first path parameter must be
/// the host's own server UUID.
const HOST_ROUTES: &[(Method, &str)] = &[
    (Method::GET, "/servers/{uuid}/desired"),
    (Method::POST, "/servers/{uuid}/vm_states"),
    (Method::POST, "/servers/{uuid}/heartbeat"),
    (Method::PUT, "/servers/{uuid}"),
    (Method::POST, "/servers/{uuid}/certificate"),
    (Method::GET, "/servers/{uuid}/tunnel"),
    (Method::POST, "/servers/{uuid}/tunnel/{id}"),
    // Image layers of the host's containers (the agent's runtime fetches what it lacks).
    (Method::GET, "/servers/{uuid}/layers/{digest}"),
];

/// The agent's tunnel routes: only that server's own host certificate may use them — not an
/// operator either (the tunnel carries that host's containers' I/O; an operator opening it
/// would take the host's place). Plain HTTP without TLS ([`Peer::Open`]) has no identities.
fn is_tunnel(pattern: &str) -> bool {
    pattern == "/servers/{uuid}/tunnel" || pattern == "/servers/{uuid}/tunnel/{id}"
}

/// Whether `peer` may call `method pattern` with these path and request parameters (`pattern`
/// is the matched route, `""` when none matched). `HEAD` counts as `GET`.
pub fn allowed(
    peer: &Peer,
    method: &Method,
    pattern: &str,
    path: &[String],
    params: &Params,
) -> Result<(), ApiError> {
    let m = if *method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    match peer {
        Peer::Operator { name, .. } if is_tunnel(pattern) => Err(forbidden(format!(
            "{}: the tunnel is its agent's own; only that server's host certificate may use it,              not an operator's ({name:?})",
            describe(method, pattern, path)
        ))),
        Peer::Open | Peer::Operator { .. } => Ok(()),
        Peer::Anonymous => {
            if *m == Method::POST && pattern == "/join" {
                Ok(())
            } else {
                Err(unauthorized(format!(
                    "{} needs a client certificate of the cluster CA (an operator's, or a \
                     host's for its agent routes); without one only POST /join is allowed",
                    describe(method, pattern, path)
                )))
            }
        }
        // The control API's listeners trust only the cluster CA, so an account certificate
        // never gets this far; should one, it is refused outright.
        Peer::Account { login, .. } => Err(forbidden(format!(
            "{}: a Docker account's certificate ({login:?}) is for the Docker API only",
            describe(method, pattern, path)
        ))),
        Peer::Host { server_uuid, .. } => {
            let what = describe(method, pattern, path);
            let own = server_uuid.to_ascii_lowercase();
            if *m == Method::GET && pattern == "/changes" {
                let asked = params
                    .raw("server_uuid")
                    .and_then(|v| v.as_str())
                    .and_then(parse_uuid);
                return match asked {
                    Some(u) if u == own => Ok(()),
                    Some(u) => Err(forbidden(format!(
                        "GET /changes?server_uuid={u}: the host certificate of server {own} \
                         reads only its own feed (server_uuid={own})"
                    ))),
                    None => Err(forbidden(format!(
                        "GET /changes: a host certificate (server {own}) must ask for its own \
                         feed with server_uuid={own}"
                    ))),
                };
            }
            if !HOST_ROUTES.iter().any(|(hm, hp)| hm == m && *hp == pattern) {
                return Err(forbidden(format!(
                    "{what}: a host certificate (server {own}) may only use its agent's routes \
                     (desired state, feed, state reports, heartbeats, image layers); this needs \
                     an operator certificate"
                )));
            }
            let target = path.first().map(String::as_str).unwrap_or("");
            match parse_uuid(target) {
                Some(u) if u == own => Ok(()),
                _ => Err(forbidden(format!(
                    "{what}: the host certificate of server {own} acts only for that server, \
                     not for {target}"
                ))),
            }
        }
    }
}

/// Whether the request comes with a host certificate (whose writes get the extra checks in the
/// store).
pub fn is_host(peer: &Peer) -> bool {
    matches!(peer, Peer::Host { .. })
}

/// Refusals by kind, on `/metrics`.
#[derive(Debug, Default)]
pub struct AuthCounters {
    /// 401: no client certificate.
    pub unauthorized: AtomicU64,
    /// 403: a route or server the certificate does not cover (the route policy).
    pub forbidden_route: AtomicU64,
    /// 403 from a write's own check: a state report for another server's VM, a host
    /// registering or moving its underlay address.
    pub forbidden_write: AtomicU64,
    /// 410: a request with the certificate of a removed (revoked) server.
    pub revoked: AtomicU64,
}

impl AuthCounters {
    /// Counts a refusal answered with `status` for a request by `peer` (only 401, 403 and 410
    /// to a host count; `policy`: refused by [`allowed`] rather than by the operation).
    pub fn count(&self, peer: &Peer, status: u16, policy: bool) {
        let c = match (status, policy) {
            (401, _) => &self.unauthorized,
            (403, true) => &self.forbidden_route,
            (403, false) if is_host(peer) => &self.forbidden_write,
            (410, _) if is_host(peer) => &self.revoked,
            _ => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP fabric_control_auth_refused_total Requests refused by authorization, by reason."
        );
        let _ = writeln!(out, "# TYPE fabric_control_auth_refused_total counter");
        for (reason, c) in [
            ("no_certificate", &self.unauthorized),
            ("route", &self.forbidden_route),
            ("other_server", &self.forbidden_write),
            ("revoked", &self.revoked),
        ] {
            let _ = writeln!(
                out,
                "fabric_control_auth_refused_total{{reason=\"{reason}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const OWN: &str = "564d1a4c-0000-4000-8000-000000000001";
    const OTHER: &str = "564d1a4c-0000-4000-8000-000000000002";
    const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn host() -> Peer {
        Peer::Host {
            server_uuid: OWN.into(),
            serial: "01".into(),
        }
    }

    fn no_params() -> Params {
        Params::default()
    }

    fn q(server: &str) -> Params {
        Params::from_map(json!({"server_uuid": server}).as_object().cloned().unwrap())
    }

    fn check(peer: &Peer, m: Method, pattern: &str, path: &[&str], p: &Params) -> Option<u16> {
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        allowed(peer, &m, pattern, &path, p).err().map(|e| e.status)
    }

    /// Every route of the service, with a representative path.
    fn every_route() -> Vec<(Method, &'static str, Vec<&'static str>)> {
        use Method as M;
        vec![
            (M::GET, "/ping", vec![]),
            (M::GET, "/metrics", vec![]),
            (M::GET, "/nic_tags", vec![]),
            (M::POST, "/nic_tags", vec![]),
            (M::DELETE, "/nic_tags/{name}", vec!["x"]),
            (M::GET, "/networks", vec![]),
            (M::POST, "/networks", vec![]),
            (M::PUT, "/networks/{uuid}", vec![OWN]),
            (M::POST, "/networks/{uuid}/nics", vec![OWN]),
            (M::GET, "/nics", vec![]),
            (M::POST, "/nics", vec![]),
            (M::DELETE, "/nics/{mac}", vec!["90b8d0000001"]),
            (M::POST, "/fabrics/{owner_uuid}/vlans", vec![OWN]),
            (M::GET, "/rules", vec![]),
            (M::POST, "/rules", vec![]),
            (M::GET, "/portolan/mappings", vec![]),
            (M::GET, "/servers", vec![]),
            (M::GET, "/servers/{uuid}", vec![OWN]),
            (M::DELETE, "/servers/{uuid}", vec![OWN]),
            (M::GET, "/vms", vec![]),
            (M::POST, "/vms", vec![]),
            (M::GET, "/vms/{uuid}", vec![OWN]),
            (M::POST, "/vms/{uuid}", vec![OWN]),
            (M::DELETE, "/vms/{uuid}", vec![OWN]),
            (M::GET, "/peers", vec![]),
            (M::PUT, "/peers/{ip}", vec!["192.0.2.9"]),
            (M::DELETE, "/peers/{ip}", vec!["192.0.2.9"]),
            (M::GET, "/servers/{uuid}/desired", vec![OWN]),
            (M::POST, "/servers/{uuid}/vm_states", vec![OWN]),
            (M::POST, "/servers/{uuid}/heartbeat", vec![OWN]),
            (M::PUT, "/servers/{uuid}", vec![OWN]),
            (M::POST, "/servers/{uuid}/certificate", vec![OWN]),
            (M::GET, "/servers/{uuid}/tunnel", vec![OWN]),
            (M::POST, "/servers/{uuid}/tunnel/{id}", vec![OWN, "x"]),
            (M::GET, "/servers/{uuid}/layers/{digest}", vec![OWN, DIGEST]),
            (M::GET, "/changes", vec![]),
            (M::POST, "/join", vec![]),
            (M::GET, "", vec![]),
        ]
    }

    #[test]
    fn open_and_operator_may_do_everything_but_the_tunnel() {
        for peer in [
            Peer::Open,
            Peer::Operator {
                name: "local".into(),
                serial: None,
            },
        ] {
            for (m, pat, path) in every_route() {
                let want = match peer {
                    Peer::Operator { .. } if is_tunnel(pat) => Some(403),
                    _ => None,
                };
                assert_eq!(
                    check(&peer, m.clone(), pat, &path, &no_params()),
                    want,
                    "{m} {pat}"
                );
            }
        }
    }

    #[test]
    fn anonymous_may_only_join() {
        for (m, pat, path) in every_route() {
            let want = if m == Method::POST && pat == "/join" {
                None
            } else {
                Some(401)
            };
            assert_eq!(
                check(&Peer::Anonymous, m.clone(), pat, &path, &q(OWN)),
                want,
                "{m} {pat}"
            );
        }
        let e = allowed(&Peer::Anonymous, &Method::POST, "/vms", &[], &no_params()).unwrap_err();
        assert_eq!(e.code, "Unauthorized");
        assert!(
            e.message
                .starts_with("POST /vms needs a client certificate"),
            "{}",
            e.message
        );
        assert!(!e.message.contains('\n'));
    }

    #[test]
    fn host_gets_exactly_its_agent_routes_for_itself() {
        let own_routes = [
            (Method::GET, "/servers/{uuid}/desired"),
            (Method::POST, "/servers/{uuid}/vm_states"),
            (Method::POST, "/servers/{uuid}/heartbeat"),
            (Method::PUT, "/servers/{uuid}"),
            (Method::POST, "/servers/{uuid}/certificate"),
            (Method::GET, "/servers/{uuid}/tunnel"),
            (Method::POST, "/servers/{uuid}/tunnel/{id}"),
            (Method::GET, "/servers/{uuid}/layers/{digest}"),
        ];
        for (m, pat, path) in every_route() {
            let agent = own_routes.iter().any(|(om, op)| *om == m && *op == pat);
            let feed = m == Method::GET && pat == "/changes";
            let want = if agent || feed { None } else { Some(403) };
            assert_eq!(
                check(&host(), m.clone(), pat, &path, &q(OWN)),
                want,
                "{m} {pat}"
            );
            if agent {
                // The same route for another server, or an unparsable one, is refused.
                assert_eq!(
                    check(&host(), m.clone(), pat, &[OTHER], &no_params()),
                    Some(403)
                );
                assert_eq!(
                    check(&host(), m.clone(), pat, &["nope"], &no_params()),
                    Some(403)
                );
                // Upper case is the same UUID.
                let upper = OWN.to_ascii_uppercase();
                assert_eq!(
                    check(&host(), m.clone(), pat, &[&upper], &no_params()),
                    None
                );
            }
        }
        // HEAD is GET.
        assert_eq!(
            check(
                &host(),
                Method::HEAD,
                "/servers/{uuid}/desired",
                &[OWN],
                &no_params()
            ),
            None
        );
        // GET /servers/:own (not an agent route) and DELETE of itself are operator-only.
        assert_eq!(
            check(
                &host(),
                Method::GET,
                "/servers/{uuid}",
                &[OWN],
                &no_params()
            ),
            Some(403)
        );
        assert_eq!(
            check(
                &host(),
                Method::DELETE,
                "/servers/{uuid}",
                &[OWN],
                &no_params()
            ),
            Some(403)
        );
    }

    #[test]
    fn host_feed_needs_its_own_server_uuid() {
        let c = |p: &Params| check(&host(), Method::GET, "/changes", &[], p);
        assert_eq!(c(&q(OWN)), None);
        assert_eq!(c(&q(&OWN.to_ascii_uppercase())), None);
        assert_eq!(c(&q(OTHER)), Some(403));
        assert_eq!(c(&no_params()), Some(403));
        assert_eq!(c(&q("garbage")), Some(403));
        let e = allowed(&host(), &Method::GET, "/changes", &[], &no_params()).unwrap_err();
        assert!(
            e.message.contains(&format!("server_uuid={OWN}")),
            "{}",
            e.message
        );
    }

    #[test]
    fn refusals_say_what_and_why_in_one_line() {
        let e = allowed(&host(), &Method::POST, "/vms", &[], &no_params()).unwrap_err();
        assert_eq!((e.status, e.code), (403, "Forbidden"));
        assert!(
            e.message.starts_with("POST /vms: a host certificate"),
            "{}",
            e.message
        );
        assert!(e.message.contains("operator"), "{}", e.message);
        let e = allowed(
            &host(),
            &Method::POST,
            "/servers/{uuid}/heartbeat",
            &[OTHER.to_string()],
            &no_params(),
        )
        .unwrap_err();
        assert!(
            e.message.starts_with(&format!(
                "POST /servers/{OTHER}/heartbeat: the host certificate of server {OWN}"
            )),
            "{}",
            e.message
        );
        for e in [unauthorized("x"), forbidden("y")] {
            let b = e.body();
            assert_eq!(b.as_object().unwrap().len(), 2, "{b}");
        }
    }

    #[test]
    fn describe_fills_the_pattern() {
        assert_eq!(
            describe(&Method::PUT, "/peers/{ip}", &["192.0.2.9".into()]),
            "PUT /peers/192.0.2.9"
        );
        assert_eq!(describe(&Method::GET, "/vms", &[]), "GET /vms");
    }

    #[test]
    fn counters() {
        let c = AuthCounters::default();
        c.count(&Peer::Anonymous, 401, true);
        c.count(&host(), 403, true);
        c.count(&host(), 403, false);
        c.count(&Peer::Open, 403, false); // not an authorization refusal
        c.count(&host(), 410, false);
        c.count(&host(), 404, false);
        let mut out = String::new();
        c.render(&mut out);
        for line in [
            "reason=\"no_certificate\"} 1",
            "reason=\"route\"} 1",
            "reason=\"other_server\"} 1",
            "reason=\"revoked\"} 1",
        ] {
            assert!(out.contains(line), "{line}\n{out}");
        }
    }
}
