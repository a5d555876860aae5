//! `/containers/...` before containers run (they are the next part of the Docker API, stored
//! as VMs with a container spec): no account has a Docker container, so the answers say exactly
//! that. `docker ps` lists none; `inspect`, `logs`, `stop`, `rm`… of any name are moby's 404 `No
//! such container: X` (the docker CLI's `inspect` then falls through to images and networks);
//! `docker create`/`run` is refused with 501 saying so — never a 404, which would make the CLI
//! try to pull an image the account already has.

use axum::http::{Method, StatusCode};
use serde_json::json;

use super::api::{Op, Reply, Req};
use super::error;

pub mod streams;

/// The operation of a `/containers/...` request.
pub fn route(req: &Req) -> Option<Op> {
    if let Some(op) = streams::route(req) {
        return Some(op);
    }
    let p: Vec<&str> = req.path.iter().map(String::as_str).collect();
    let get = req.method == Method::GET || req.method == Method::HEAD;
    match p.as_slice() {
        ["containers", "json"] if get => Some(Op::Now(Ok(Reply::Json(StatusCode::OK, json!([]))))),
        ["containers", "create"] if req.method == Method::POST => Some(Op::Now(Err(error::err(
            501,
            "fabric does not run containers yet: networks and images are served, `docker create` and `docker run` come with the next version of its Docker API",
        )))),
        ["containers", "prune"] if req.method == Method::POST => Some(Op::Now(Ok(Reply::Json(
            StatusCode::OK,
            json!({"ContainersDeleted": null, "SpaceReclaimed": 0}),
        )))),
        ["containers", name, ..] => Some(Op::Now(Err(error::not_found(format!(
            "No such container: {name}"
        ))))),
        _ => None,
    }
}
