//! `/containers/...`: Docker containers, stored as VMs with a container spec (DESIGN "Control
//! plane": VMs; the contract of issue 19). The lifecycle verbs set what the VM should be; the
//! VM's agent makes it so and reports the actual state, which `ps` and `inspect` show.
//!
//! - [`create`]: `POST /containers/create` (allow-list in [`validate`]);
//! - [`lifecycle`]: start, stop, restart, kill, rm, rename, prune;
//! - [`inspect`]: `ps` and `inspect`;
//! - [`lookup`]: name / ID / prefix resolution, per account;
//! - [`streams`]: wait, attach, logs, exec, resize (over the agents' tunnels).

use axum::http::Method;

use super::api::{self, Op, Req};
use super::filters::Filters;

pub mod create;
pub mod inspect;
pub mod lifecycle;
pub mod lookup;
pub mod streams;
pub mod validate;

/// The operation of a `/containers/...` request.
pub fn route(req: &Req) -> Option<Op> {
    if let Some(op) = streams::route(req) {
        return Some(op);
    }
    let m = if req.method == Method::HEAD {
        Method::GET
    } else {
        req.method.clone()
    };
    let p: Vec<&str> = req.path.iter().map(String::as_str).collect();
    let q = |k: &str| req.query.get(k).map(str::to_string);
    Some(match (&m, p.as_slice()) {
        (&Method::GET, ["containers", "json"]) => {
            let all = match req.query.bool("all") {
                Ok(a) => a,
                Err(e) => return Some(Op::Now(Err(e))),
            };
            let limit = match q("limit").filter(|l| !l.is_empty()) {
                None => None,
                Some(l) => match l.parse::<i64>() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        return Some(Op::Now(Err(super::error::bad_request(format!(
                            "invalid value for limit: {l:?}"
                        )))))
                    }
                },
            };
            let filters = match Filters::parse(req.query.get("filters")) {
                Ok(f) => f,
                Err(e) => return Some(Op::Now(Err(e))),
            };
            api::read(move |d, c| {
                api::ok(inspect::list(
                    d,
                    &c.docker.app.cfg,
                    c.account,
                    all || limit.is_some_and(|l| l > 0),
                    limit,
                    &filters,
                )?)
            })
        }
        (&Method::POST, ["containers", "create"]) => match req.json() {
            Err(e) => Op::Now(Err(e)),
            Ok(body) => {
                let name = q("name");
                api::write_tx(move |tx, c| create::create(tx, c, &body, name.as_deref()))
            }
        },
        (&Method::POST, ["containers", "prune"]) => {
            let f = q("filters");
            api::write_tx(move |tx, c| lifecycle::prune(tx, c, f.as_deref()))
        }
        (&Method::GET, ["containers", id, "json"]) => {
            let id = id.to_string();
            api::read(move |d, c| api::ok(inspect::inspect(d, &c.docker.app.cfg, c.account, &id)?))
        }
        (&Method::POST, ["containers", id, "start"]) => {
            let id = id.to_string();
            Op::Async(Box::new(move |d, a| Box::pin(lifecycle::start(d, a, id))))
        }
        (&Method::POST, ["containers", id, "stop"]) => {
            let (id, t) = (id.to_string(), q("t"));
            Op::Async(Box::new(move |d, a| Box::pin(lifecycle::stop(d, a, id, t))))
        }
        (&Method::POST, ["containers", id, "restart"]) => {
            let (id, t) = (id.to_string(), q("t"));
            Op::Async(Box::new(move |d, a| {
                Box::pin(lifecycle::restart(d, a, id, t))
            }))
        }
        (&Method::POST, ["containers", id, "kill"]) => {
            let (id, s) = (id.to_string(), q("signal"));
            Op::Async(Box::new(move |d, a| Box::pin(lifecycle::kill(d, a, id, s))))
        }
        (&Method::POST, ["containers", id, "rename"]) => {
            let (id, n) = (id.to_string(), q("name"));
            api::write(move |d, c| lifecycle::rename(d, c, &id, n.as_deref()))
        }
        (&Method::DELETE, ["containers", id]) => {
            let id = id.to_string();
            let force = match req.query.bool("force") {
                Ok(f) => f,
                Err(e) => return Some(Op::Now(Err(e))),
            };
            api::write_tx(move |tx, c| lifecycle::remove(tx, c, &id, force))
        }
        (_, ["containers", name, ..]) => {
            // A verb not served yet: moby's 404 for an unknown container when the account has
            // no such container, else "page not found"-style 404 naming the route.
            let name = name.to_string();
            let rest = p[2..].join("/");
            api::read(move |d, c| {
                lookup::find(d, c.account, &name)?;
                Err(super::error::not_found(format!(
                    "/containers/{name}/{rest}: not served by fabric"
                )))
            })
        }
        _ => return None,
    })
}
