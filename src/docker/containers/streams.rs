//! Container routes that stream: wait, attach, logs, exec, resize (over the agents' tunnels,
//! [`crate::control::tunnel`]).
//!
//! - `POST /containers/X/wait?condition=not-running|next-exit|removed`: 200 and its headers at
//!   once, then `{"StatusCode":n,"Error":null}` when the condition holds ([`decide`], a pure
//!   function of the container's run fields before and now). It waits on the change feed's
//!   in-process notifier and re-reads the container (a short read transaction each time; no
//!   connection is held while waiting).
//! - `POST /containers/X/attach`, `GET /containers/X/logs`, `POST /exec/ID/start`: a sub-stream
//!   on the tunnel of the container's host, hijacked with `Upgrade: tcp` or a streaming 200
//!   ([`super::super::hijack`]).
//! - `POST /containers/X/exec` keeps an exec record in memory ([`Execs`]: 64-hex ids, bounded
//!   in number, dropped [`EXEC_KEEP`] after they end or [`EXEC_UNSTARTED_KEEP`] after their
//!   creation if never started); `GET /exec/ID/json` shows it.
//! - `POST /containers/X/resize` (a Resize sub-stream) and `POST /exec/ID/resize` (a Resize
//!   frame on that exec's sub-stream).
//!
//! A container whose host has no tunnel open is 409 `host H of container X is not connected`,
//! at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use portolan::store;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::super::accounts::Account;
use super::super::api::{Op, Reply, Req};
use super::super::error;
use super::super::hijack;
use super::super::Docker;
use crate::control::db::Db;
use crate::control::error::OpError;
use crate::control::tunnel::proto::{Frame, StreamOp};
use crate::control::tunnel::{Substream, TunnelError};

use super::lookup::{find, Found};

/// How long an ended exec is kept for `GET /exec/ID/json`.
pub const EXEC_KEEP: Duration = Duration::from_secs(300);
/// How long an exec that was created but never started is kept.
pub const EXEC_UNSTARTED_KEEP: Duration = Duration::from_secs(600);
/// Exec records kept at most (process-wide); creating one more drops the oldest ended one, or
/// is refused when none has ended.
pub const MAX_EXECS: usize = 4096;
/// Between re-reads of a waited-for container even without a feed change (another instance's
/// writes reach this one's notifier within its re-check anyway).
const WAIT_RECHECK: Duration = Duration::from_secs(5);

/// The operation of a streaming `/containers/...` or `/exec/...` request, if it is one.
pub fn route(req: &Req) -> Option<Op> {
    let p: Vec<&str> = req.path.iter().map(String::as_str).collect();
    let post = req.method == Method::POST;
    let get = req.method == Method::GET || req.method == Method::HEAD;
    let r = req.clone();
    let op = |f: fn(Arc<Docker>, Account, Req) -> Fut| -> Option<Op> {
        Some(Op::Async(Box::new(move |d, a| f(d, a, r))))
    };
    match p.as_slice() {
        ["containers", _, "wait"] if post => op(|d, a, r| Box::pin(wait(d, a, r))),
        ["containers", _, "attach"] if post => op(|d, a, r| Box::pin(attach(d, a, r))),
        ["containers", _, "logs"] if get => op(|d, a, r| Box::pin(logs(d, a, r))),
        ["containers", _, "exec"] if post => op(|d, a, r| Box::pin(exec_create(d, a, r))),
        ["containers", _, "resize"] if post => op(|d, a, r| Box::pin(resize(d, a, r))),
        ["exec", _, "start"] if post => op(|d, a, r| Box::pin(exec_start(d, a, r))),
        ["exec", _, "json"] if get => op(|d, a, r| Box::pin(exec_inspect(d, a, r))),
        ["exec", _, "resize"] if post => op(|d, a, r| Box::pin(exec_resize(d, a, r))),
        _ => None,
    }
}

type Fut = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, OpError>> + Send>>;

/// Looks the container up in a short read transaction.
async fn lookup(docker: &Arc<Docker>, account: &Account, name: &str) -> Result<Found, OpError> {
    let (d, a, n) = (docker.clone(), account.clone(), name.to_owned());
    tokio::task::spawn_blocking(move || {
        store::with_read(&*d.app.store, |raw| find(&mut Db::from(raw), &a, &n))
    })
    .await
    .map_err(|_| error::err(500, "internal error"))?
}

/// The exit status a VM's record keeps, destroyed ones included (a `--rm` container is
/// removed in the same transaction as its exit report).
async fn recorded_exit(docker: &Arc<Docker>, uuid: &str) -> Option<i32> {
    let (d, u) = (docker.clone(), uuid.to_owned());
    tokio::task::spawn_blocking(move || {
        store::with_read(&*d.app.store, |raw| {
            crate::control::vms::get(&mut Db::from(raw), &u)
        })
    })
    .await
    .ok()?
    .ok()?
    .and_then(|vm| vm.exit_status)
}

/// Opens a sub-stream on the tunnel of `found`'s host, with Docker's errors.
async fn open(
    docker: &Docker,
    found: &Found,
    name: &str,
    op: StreamOp,
) -> Result<Substream, OpError> {
    let Some(server) = found.vm.server_uuid.as_deref() else {
        return Err(error::conflict(format!(
            "container {name} is not placed on any host"
        )));
    };
    docker
        .app
        .tunnels
        .open(server, &found.vm.uuid, op)
        .await
        .map_err(|e| tunnel_error(&e, server, name))
}

fn tunnel_error(e: &TunnelError, server: &str, name: &str) -> OpError {
    match e {
        TunnelError::NotConnected(_) => error::conflict(format!(
            "host {server} of container {name} is not connected"
        )),
        e => error::err(500, format!("container {name}: {e}")),
    }
}

// ---- wait ----

/// A `wait` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// The container is not running (at once if it is not).
    NotRunning,
    /// The next exit after the request.
    NextExit,
    /// The container is removed.
    Removed,
}

impl Condition {
    /// moby's names; empty is `not-running`.
    pub fn parse(s: Option<&str>) -> Result<Condition, OpError> {
        match s.unwrap_or("") {
            "" | "not-running" => Ok(Condition::NotRunning),
            "next-exit" => Ok(Condition::NextExit),
            "removed" => Ok(Condition::Removed),
            other => Err(error::bad_request(format!(
                "invalid condition: \"{other}\""
            ))),
        }
    }
}

/// The run fields of a container that `wait` looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunView {
    /// Its process (of `run_generation`) is alive.
    pub running: bool,
    /// The generation the last report was about.
    pub run_generation: Option<u64>,
    /// The exit status of the last process that ended.
    pub exit_status: Option<i32>,
}

impl RunView {
    fn of(found: &Found) -> RunView {
        RunView {
            running: found.vm.state == "running"
                && found.vm.run_generation == Some(found.vm.generation),
            run_generation: found.vm.run_generation,
            exit_status: found.vm.exit_status,
        }
    }
}

/// Whether `cond` holds, given the container as it was when the wait began and as it is now
/// (`None`: removed): the status code to answer.
pub fn decide(cond: Condition, before: &RunView, now: Option<&RunView>) -> Option<i64> {
    let code = |v: &RunView| i64::from(v.exit_status.unwrap_or(0));
    match (cond, now) {
        (Condition::Removed, None)
        | (Condition::NotRunning, None)
        | (Condition::NextExit, None) => Some(code(before)),
        (Condition::Removed, Some(_)) => None,
        (Condition::NotRunning, Some(v)) => (!v.running).then(|| code(v)),
        (Condition::NextExit, Some(v)) => {
            // A process that was not yet reported when the wait began, or the one running
            // then, has ended. Generation 0 never runs (the "stopped, never started" report
            // of a created container is no exit): no report and generation 0 count the same.
            let gen = |r: &RunView| r.run_generation.unwrap_or(0);
            let later = gen(v) > gen(before);
            let same_ended = before.running && gen(v) == gen(before);
            let ended = !v.running && (later || same_ended);
            // A restart while running: the earlier process ended on the way.
            let replaced = before.running && later;
            (ended || replaced).then(|| code(v))
        }
    }
}

async fn wait(docker: Arc<Docker>, account: Account, req: Req) -> Result<Reply, OpError> {
    let name = req.path[1].clone();
    let cond = Condition::parse(req.query.get("condition"))?;
    let seen = docker.app.feed.last_seq();
    let found = lookup(&docker, &account, &name).await?;
    let before = RunView::of(&found);
    // Answered at once when it already holds; else the headers go now, the result later.
    let (tx, rx) = mpsc::channel::<axum::body::Bytes>(1);
    let result = |code: i64, err: Option<String>| {
        let e = err.map_or(Value::Null, |m| json!({ "Message": m }));
        let mut b =
            serde_json::to_vec(&json!({"StatusCode": code, "Error": e})).unwrap_or_default();
        b.push(b'\n');
        axum::body::Bytes::from(b)
    };
    // Later looks go by the full ID: the name may be taken by another container meanwhile.
    let (id, uuid) = (found.spec.id.clone(), found.vm.uuid.clone());
    tokio::spawn(async move {
        let mut seen = seen;
        let mut last = before.clone();
        loop {
            let now = match lookup(&docker, &account, &id).await {
                Ok(f) => Some(RunView::of(&f)),
                Err(OpError::Api(e)) if e.status == 404 => None,
                Err(e) => {
                    let e = e.into_api();
                    let _ = tx.send(result(-1, Some(e.message))).await;
                    return;
                }
            };
            if let Some(code) = decide(cond, &before, now.as_ref()) {
                let code = if now.is_none() {
                    let kept = recorded_exit(&docker, &uuid).await;
                    i64::from(kept.or(last.exit_status).unwrap_or(0))
                } else {
                    code
                };
                let _ = tx.send(result(code, None)).await;
                return;
            }
            if let Some(v) = now {
                last = v;
            }
            let feed = docker.app.feed.clone();
            tokio::select! {
                _ = feed.wait_past(seen, tokio::time::Instant::now() + WAIT_RECHECK) => {}
                // The client went away.
                () = tx.closed() => return,
            }
            if docker.app.feed.is_closed() {
                let _ = tx
                    .send(result(-1, Some("the Docker service is stopping".into())))
                    .await;
                return;
            }
            seen = docker.app.feed.last_seq();
        }
    });
    let mut r = axum::http::Response::new(axum::body::Body::new(
        crate::control::tunnel::body::ChannelBody::new(rx),
    ));
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    Ok(Reply::Response(r))
}

// ---- attach, logs, resize ----

async fn attach(docker: Arc<Docker>, account: Account, req: Req) -> Result<Reply, OpError> {
    let name = req.path[1].clone();
    let q = &req.query;
    let (stdin, stdout, stderr, logs) = (
        q.bool("stdin")?,
        q.bool("stdout")?,
        q.bool("stderr")?,
        q.bool("logs")?,
    );
    q.bool("stream")?;
    let found = lookup(&docker, &account, &name).await?;
    let tty = found.spec.tty;
    let op = StreamOp::Attach {
        stdin: stdin && found.spec.open_stdin,
        stdout,
        stderr,
        logs,
    };
    let sub = open(&docker, &found, &name, op).await?;
    let observer: hijack::Observer = Box::new(|_| {});
    match hijack::upgrade(&req.extensions, &req.headers, sub, tty, stdin, observer) {
        Ok(r) => Ok(Reply::Response(r)),
        Err((sub, observer)) => Ok(Reply::Response(hijack::streaming(sub, tty, observer))),
    }
}

/// `since`/`until` as moby takes them: unix seconds, optionally with a fraction
/// (`1700000000.5`); `0` or absent is none.
pub fn parse_time_ns(name: &str, v: Option<&str>) -> Result<Option<i64>, OpError> {
    let Some(v) = v.filter(|v| !v.is_empty() && *v != "0") else {
        return Ok(None);
    };
    let bad = || error::bad_request(format!("invalid value for {name}: {v:?}"));
    let (s, frac) = v.split_once('.').unwrap_or((v, ""));
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) || s.len() > 12 {
        return Err(bad());
    }
    if frac.len() > 9 || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let secs: i64 = s.parse().map_err(|_| bad())?;
    let nanos: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().map_err(|_| bad())?
    };
    Ok(Some(secs * 1_000_000_000 + nanos))
}

/// `tail`: `all` (or absent, or negative) is everything.
pub fn parse_tail(v: Option<&str>) -> Result<Option<u64>, OpError> {
    match v {
        None | Some("" | "all") => Ok(None),
        Some(n) if n.starts_with('-') => Ok(None),
        Some(n) => n
            .parse::<u64>()
            .map(Some)
            .map_err(|_| error::bad_request(format!("invalid value for tail: {n:?}"))),
    }
}

async fn logs(docker: Arc<Docker>, account: Account, req: Req) -> Result<Reply, OpError> {
    let name = req.path[1].clone();
    let q = &req.query;
    let (stdout, stderr) = (q.bool("stdout")?, q.bool("stderr")?);
    if !stdout && !stderr {
        return Err(error::bad_request(
            "Bad parameters: you must choose at least one stream",
        ));
    }
    let op = StreamOp::Logs {
        follow: q.bool("follow")?,
        tail: parse_tail(q.get("tail"))?,
        since_ns: parse_time_ns("since", q.get("since"))?,
        until_ns: parse_time_ns("until", q.get("until"))?,
        timestamps: q.bool("timestamps")?,
        stdout,
        stderr,
    };
    let found = lookup(&docker, &account, &name).await?;
    let sub = open(&docker, &found, &name, op).await?;
    Ok(Reply::Response(hijack::streaming(
        sub,
        found.spec.tty,
        Box::new(|_| {}),
    )))
}

fn dims(req: &Req) -> Result<(u16, u16), OpError> {
    let one = |n: &str| -> Result<u16, OpError> {
        match req.query.get(n) {
            None | Some("") => Ok(0),
            Some(v) => v
                .parse::<u16>()
                .map_err(|_| error::bad_request(format!("invalid value for {n}: {v:?}"))),
        }
    };
    Ok((one("h")?, one("w")?))
}

async fn resize(docker: Arc<Docker>, account: Account, req: Req) -> Result<Reply, OpError> {
    let name = req.path[1].clone();
    let (height, width) = dims(&req)?;
    let found = lookup(&docker, &account, &name).await?;
    let mut sub = open(&docker, &found, &name, StreamOp::Resize { height, width }).await?;
    // The agent answers with Exit (done) or Error (no terminal, not running).
    let answer = tokio::time::timeout(Duration::from_secs(10), sub.output.recv()).await;
    match answer {
        Ok(Some(Frame::Error(m))) => Err(error::conflict(m)),
        Ok(_) => Ok(Reply::Empty(StatusCode::OK)),
        Err(_) => Err(error::err(
            500,
            format!("container {name}: its host did not answer the resize within 10 s"),
        )),
    }
}

// ---- exec ----

/// One `docker exec`, as `GET /exec/ID/json` shows it.
#[derive(Debug, Clone)]
pub struct ExecRecord {
    /// 64 hex.
    pub id: String,
    /// The owner (account UUID): other accounts never see it.
    pub owner: String,
    /// The container's 64-hex ID.
    pub container_id: String,
    /// The container's name (as asked; for messages).
    pub container_name: String,
    /// argv.
    pub cmd: Vec<String>,
    /// Extra `K=V`.
    pub env: Vec<String>,
    /// `uid[:gid]` or empty.
    pub user: String,
    /// Working directory or empty.
    pub working_dir: String,
    /// Terminal.
    pub tty: bool,
    /// Attach stdin / stdout / stderr.
    pub attach: (bool, bool, bool),
    /// Running now.
    pub running: bool,
    /// Started once (a second start is refused).
    pub started: bool,
    /// Exit code, once ended.
    pub exit_code: Option<i32>,
    /// Host pid, once started.
    pub pid: Option<u32>,
    created: Instant,
    ended: Option<Instant>,
    /// The sub-stream's input while it runs (resize).
    input: Option<mpsc::Sender<Frame>>,
}

impl ExecRecord {
    /// moby's `GET /exec/ID/json`.
    pub fn to_json(&self) -> Value {
        json!({
            "ID": self.id,
            "ContainerID": self.container_id,
            "Running": self.running,
            "ExitCode": self.exit_code,
            "Pid": self.pid.unwrap_or(0),
            "ProcessConfig": {
                "tty": self.tty,
                "entrypoint": self.cmd.first().cloned().unwrap_or_default(),
                "arguments": self.cmd.iter().skip(1).collect::<Vec<_>>(),
                "privileged": false,
                "user": self.user,
            },
            "OpenStdin": self.attach.0,
            "OpenStdout": self.attach.1,
            "OpenStderr": self.attach.2,
            "CanRemove": false,
            "DetachKeys": "",
        })
    }

    /// Whether it may be dropped at `now`.
    fn expired(&self, now: Instant) -> bool {
        match self.ended {
            Some(e) => now.duration_since(e) >= EXEC_KEEP,
            None => !self.started && now.duration_since(self.created) >= EXEC_UNSTARTED_KEEP,
        }
    }
}

/// The exec records of this process (bounded; see the module docs).
#[derive(Default)]
pub struct Execs {
    map: Mutex<HashMap<String, ExecRecord>>,
}

impl Execs {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, ExecRecord>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `rec`, first dropping expired ones (and, when full, the oldest ended one).
    pub fn insert(&self, rec: ExecRecord, now: Instant) -> Result<(), OpError> {
        let mut m = self.lock();
        m.retain(|_, r| !r.expired(now));
        if m.len() >= MAX_EXECS {
            let oldest = m
                .values()
                .filter_map(|r| r.ended.map(|e| (e, r.id.clone())))
                .min()
                .map(|(_, id)| id);
            match oldest {
                Some(id) => {
                    m.remove(&id);
                }
                None => {
                    return Err(error::err(
                        503,
                        format!(
                            "too many exec instances ({MAX_EXECS}) are running or waiting to start"
                        ),
                    ))
                }
            }
        }
        m.insert(rec.id.clone(), rec);
        Ok(())
    }

    /// The record `id` of `owner` (a unique prefix works too), if kept.
    pub fn get(&self, owner: &str, id: &str, now: Instant) -> Option<ExecRecord> {
        let mut m = self.lock();
        m.retain(|_, r| !r.expired(now));
        if let Some(r) = m.get(id) {
            return (r.owner == owner).then(|| r.clone());
        }
        let mut hits = m
            .values()
            .filter(|r| r.owner == owner && !id.is_empty() && r.id.starts_with(id));
        match (hits.next(), hits.next()) {
            (Some(r), None) => Some(r.clone()),
            _ => None,
        }
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut ExecRecord)) {
        if let Some(r) = self.lock().get_mut(id) {
            f(r);
        }
    }
}

static EXECS: std::sync::OnceLock<Execs> = std::sync::OnceLock::new();

/// The process's exec records.
pub fn execs() -> &'static Execs {
    EXECS.get_or_init(Execs::default)
}

fn random_id() -> Result<String, OpError> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| error::err(500, format!("random exec id: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn no_such_exec(id: &str) -> OpError {
    error::not_found(format!("No such exec instance: {id}"))
}

/// `User` as the agent takes it: numeric `uid[:gid]`, `root` is 0, empty is the container's.
pub fn exec_user(u: &str) -> Result<String, OpError> {
    let u = u.trim();
    let num = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|c| c.is_ascii_digit());
    let (user, group) = u.split_once(':').unwrap_or((u, ""));
    let map = |s: &str| {
        if s == "root" {
            "0".to_string()
        } else {
            s.to_string()
        }
    };
    let (user, group) = (map(user), map(group));
    if u.is_empty() {
        return Ok(String::new());
    }
    if !num(&user) || !(group.is_empty() || num(&group)) {
        return Err(error::bad_request(format!(
            "exec user {u:?}: fabric takes a numeric uid[:gid] (or root)"
        )));
    }
    Ok(if group.is_empty() {
        user
    } else {
        format!("{user}:{group}")
    })
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, OpError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str().map(String::from).ok_or_else(|| {
                    error::bad_request(format!("{field}: expected an array of strings"))
                })
            })
            .collect(),
        Some(Value::String(s)) if field == "Cmd" => Ok(vec![s.clone()]),
        Some(_) => Err(error::bad_request(format!(
            "{field}: expected an array of strings"
        ))),
    }
}

fn flag(v: &Value, field: &str) -> Result<bool, OpError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(error::bad_request(format!("{field}: expected a boolean"))),
    }
}

fn text(v: &Value, field: &str) -> Result<String, OpError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(error::bad_request(format!("{field}: expected a string"))),
    }
}

fn not_running(name: &str) -> OpError {
    error::conflict(format!("Container {name} is not running"))
}

async fn exec_create(docker: Arc<Docker>, account: Account, req: Req) -> Result<Reply, OpError> {
    let name = req.path[1].clone();
    let body = req.json()?;
    let cmd = strings(&body, "Cmd")?;
    if cmd.is_empty() {
        return Err(error::bad_request("No exec command specified"));
    }
    if flag(&body, "Privileged")? {
        return Err(error::forbidden(
            "fabric does not run privileged exec processes",
        ));
    }
    let env = strings(&body, "Env")?;
    if let Some(bad) = env.iter().find(|e| !e.contains('=') || e.starts_with('=')) {
        return Err(error::bad_request(format!(
            "invalid environment variable: {bad}"
        )));
    }
    let user = exec_user(&text(&body, "User")?)?;
    let found = lookup(&docker, &account, &name).await?;
    if !RunView::of(&found).running {
        return Err(not_running(&name));
    }
    let rec = ExecRecord {
        id: random_id()?,
        owner: account.uuid.clone(),
        container_id: found.spec.id.clone(),
        container_name: name,
        cmd,
        env,
        user,
        working_dir: text(&body, "WorkingDir")?,
        tty: flag(&body, "Tty")?,
        attach: (
            flag(&body, "AttachStdin")?,
            flag(&body, "AttachStdout")?,
            flag(&body, "AttachStderr")?,
        ),
        running: false,
        started: false,
        exit_code: None,
        pid: None,
        created: Instant::now(),
        ended: None,
        input: None,
    };
    let id = rec.id.clone();
    execs().insert(rec, Instant::now())?;
    Ok(Reply::Json(StatusCode::CREATED, json!({ "Id": id })))
}

async fn exec_inspect(_docker: Arc<Docker>, account: Account, req: Req) -> Result<Reply, OpError> {
    let id = &req.path[1];
    let r = execs()
        .get(&account.uuid, id, Instant::now())
        .ok_or_else(|| no_such_exec(id))?;
    Ok(Reply::Json(StatusCode::OK, r.to_json()))
}

async fn exec_resize(_docker: Arc<Docker>, account: Account, req: Req) -> Result<Reply, OpError> {
    let id = &req.path[1];
    let (height, width) = dims(&req)?;
    let r = execs()
        .get(&account.uuid, id, Instant::now())
        .ok_or_else(|| no_such_exec(id))?;
    let Some(input) = r.input.filter(|_| r.running) else {
        return Err(error::conflict(format!("Exec {} is not running", r.id)));
    };
    input
        .send(Frame::Resize { height, width })
        .await
        .map_err(|_| error::conflict(format!("Exec {} is not running", r.id)))?;
    Ok(Reply::Empty(StatusCode::OK))
}

async fn exec_start(docker: Arc<Docker>, account: Account, req: Req) -> Result<Reply, OpError> {
    let id = req.path[1].clone();
    let body = if req.body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        req.json()?
    };
    let detach = flag(&body, "Detach")?;
    let rec = execs()
        .get(&account.uuid, &id, Instant::now())
        .ok_or_else(|| no_such_exec(&id))?;
    if rec.started {
        return Err(error::conflict(format!(
            "Error: Exec command {} is already running",
            rec.id
        )));
    }
    let found = lookup(&docker, &account, &rec.container_id).await?;
    if !RunView::of(&found).running {
        return Err(not_running(&rec.container_name));
    }
    let tty = rec.tty || flag(&body, "Tty")?;
    let stdin = rec.attach.0 && !detach;
    let op = StreamOp::Exec {
        cmd: rec.cmd.clone(),
        env: rec.env.clone(),
        user: rec.user.clone(),
        working_dir: rec.working_dir.clone(),
        tty,
        stdin,
    };
    let sub = open(&docker, &found, &rec.container_name, op).await?;
    let rid = rec.id.clone();
    execs().update(&rid, |r| {
        r.started = true;
        r.running = true;
        r.input = Some(sub.input.clone());
    });
    let observer = {
        let rid = rid.clone();
        let mut ended = false;
        move |f: &Frame| match f {
            Frame::Started { pid } => execs().update(&rid, |r| r.pid = *pid),
            Frame::Exit { code } if !ended => {
                ended = true;
                execs().update(&rid, |r| {
                    r.running = false;
                    r.exit_code = Some(*code);
                    r.ended = Some(Instant::now());
                    r.input = None;
                });
            }
            Frame::Error(_) if !ended => {
                ended = true;
                execs().update(&rid, |r| {
                    r.running = false;
                    r.exit_code = Some(126);
                    r.ended = Some(Instant::now());
                    r.input = None;
                });
            }
            _ => {}
        }
    };
    // However the stream ends, the record says it ended.
    let mut observer = EndGuard {
        id: rid.clone(),
        f: Box::new(observer),
    };
    if detach {
        let Substream { input, mut output } = sub;
        let _ = input.send(Frame::StdinEof).await;
        tokio::spawn(async move {
            while let Some(f) = output.recv().await {
                observer.see(&f);
                if matches!(f, Frame::Exit { .. } | Frame::Error(_)) {
                    break;
                }
            }
            drop(input);
        });
        return Ok(Reply::Empty(StatusCode::OK));
    }
    let obs: hijack::Observer = Box::new(move |f| observer.see(f));
    match hijack::upgrade(&req.extensions, &req.headers, sub, tty, stdin, obs) {
        Ok(r) => Ok(Reply::Response(r)),
        Err((sub, obs)) => Ok(Reply::Response(hijack::streaming(sub, tty, obs))),
    }
}

/// Marks the exec ended when its stream is dropped without an exit (host gone).
struct EndGuard {
    id: String,
    f: Box<dyn FnMut(&Frame) + Send>,
}

impl EndGuard {
    fn see(&mut self, f: &Frame) {
        (self.f)(f)
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        execs().update(&self.id, |r| {
            if r.running {
                r.running = false;
                r.ended = Some(Instant::now());
                r.input = None;
                if r.exit_code.is_none() {
                    r.exit_code = Some(-1);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(running: bool, gen: Option<u64>, exit: Option<i32>) -> RunView {
        RunView {
            running,
            run_generation: gen,
            exit_status: exit,
        }
    }

    #[test]
    fn wait_conditions() {
        use Condition::*;
        let created = v(false, None, None);
        let running1 = v(true, Some(1), None);
        let exited1 = v(false, Some(1), Some(3));
        let running2 = v(true, Some(2), Some(3));
        let exited2 = v(false, Some(2), Some(7));
        // not-running: at once for a stopped or created one.
        assert_eq!(decide(NotRunning, &created, Some(&created)), Some(0));
        assert_eq!(decide(NotRunning, &exited1, Some(&exited1)), Some(3));
        assert_eq!(decide(NotRunning, &running1, Some(&running1)), None);
        assert_eq!(decide(NotRunning, &running1, Some(&exited1)), Some(3));
        // next-exit: `docker run` waits before start; the exit of generation 1 answers.
        assert_eq!(decide(NextExit, &created, Some(&created)), None);
        assert_eq!(decide(NextExit, &created, Some(&running1)), None);
        assert_eq!(decide(NextExit, &created, Some(&exited1)), Some(3));
        // The agent's "stopped, never started" report of generation 0 is no exit.
        let reported0 = v(false, Some(0), None);
        assert_eq!(decide(NextExit, &created, Some(&reported0)), None);
        assert_eq!(decide(NextExit, &reported0, Some(&exited1)), Some(3));
        // ...not the exit that was there before the request.
        assert_eq!(decide(NextExit, &exited1, Some(&exited1)), None);
        assert_eq!(decide(NextExit, &exited1, Some(&running2)), None);
        assert_eq!(decide(NextExit, &exited1, Some(&exited2)), Some(7));
        assert_eq!(decide(NextExit, &running1, Some(&exited1)), Some(3));
        // A restart while running is an exit too.
        assert_eq!(decide(NextExit, &running1, Some(&running2)), Some(3));
        // removed: only removal answers; every condition ends at removal.
        assert_eq!(decide(Removed, &exited1, Some(&exited1)), None);
        assert_eq!(decide(Removed, &exited1, None), Some(3));
        assert_eq!(decide(NextExit, &running1, None), Some(0));
        assert!(Condition::parse(Some("whenever")).is_err());
        assert_eq!(Condition::parse(None).unwrap(), NotRunning);
    }

    fn rec(id: &str, owner: &str, created: Instant) -> ExecRecord {
        ExecRecord {
            id: id.into(),
            owner: owner.into(),
            container_id: "c".repeat(64),
            container_name: "web".into(),
            cmd: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec![],
            user: String::new(),
            working_dir: String::new(),
            tty: false,
            attach: (false, true, true),
            running: false,
            started: false,
            exit_code: None,
            pid: None,
            created,
            ended: None,
            input: None,
        }
    }

    #[test]
    fn exec_records_expire_and_stay_with_their_owner() {
        let e = Execs::default();
        let t0 = Instant::now();
        e.insert(rec("aa11", "alice", t0), t0).unwrap();
        e.insert(rec("bb22", "alice", t0), t0).unwrap();
        assert!(e.get("alice", "aa11", t0).is_some());
        assert!(e.get("bob", "aa11", t0).is_none(), "another account's exec");
        assert_eq!(e.get("alice", "b", t0).unwrap().id, "bb22", "unique prefix");
        // Ended: kept EXEC_KEEP, then gone.
        e.update("aa11", |r| {
            r.started = true;
            r.ended = Some(t0);
            r.exit_code = Some(0);
        });
        assert!(e.get("alice", "aa11", t0 + EXEC_KEEP / 2).is_some());
        assert!(e.get("alice", "aa11", t0 + EXEC_KEEP).is_none());
        // Never started: kept EXEC_UNSTARTED_KEEP.
        assert!(e.get("alice", "bb22", t0 + EXEC_UNSTARTED_KEEP).is_none());
        let j = rec("cc", "x", t0).to_json();
        assert_eq!(j["ProcessConfig"]["entrypoint"], "sh");
        assert_eq!(j["ProcessConfig"]["arguments"], json!(["-c", "true"]));
        assert_eq!(j["ExitCode"], Value::Null);
        assert_eq!(j["CanRemove"], false);
    }

    #[test]
    fn a_full_table_drops_the_oldest_ended_or_refuses() {
        let e = Execs::default();
        let t0 = Instant::now();
        for i in 0..MAX_EXECS {
            let mut r = rec(&format!("{i:064x}"), "a", t0);
            r.started = true;
            r.running = true;
            e.insert(r, t0).unwrap();
        }
        let err = e.insert(rec("new", "a", t0), t0).unwrap_err().into_api();
        assert_eq!(err.status, 503);
        e.update(&format!("{:064x}", 5), |r| {
            r.running = false;
            r.ended = Some(t0);
        });
        e.insert(rec("new", "a", t0), t0).unwrap();
        assert!(e.get("a", &format!("{:064x}", 5), t0).is_none());
        assert!(e.get("a", "new", t0).is_some());
    }

    #[test]
    fn query_values() {
        assert_eq!(parse_tail(Some("all")).unwrap(), None);
        assert_eq!(parse_tail(Some("10")).unwrap(), Some(10));
        assert!(parse_tail(Some("x")).is_err());
        assert_eq!(
            parse_time_ns("since", Some("1700000000.5")).unwrap(),
            Some(1_700_000_000_500_000_000)
        );
        assert_eq!(parse_time_ns("since", Some("0")).unwrap(), None);
        assert!(parse_time_ns("since", Some("1h")).is_err());
        assert!(parse_time_ns("since", Some("1.1234567890")).is_err());
        assert_eq!(exec_user("").unwrap(), "");
        assert_eq!(exec_user("root").unwrap(), "0");
        assert_eq!(exec_user("1000:100").unwrap(), "1000:100");
        assert!(exec_user("www-data").is_err());
    }
}
