//! The lifecycle verbs: start, stop, restart, kill, rm, rename, prune. Each sets what the VM
//! should be (control's VM actions, recorded in the feed in the same transaction); the VM's
//! agent makes it so and reports back. `stop` and `restart` block as moby's do: until the agent
//! reports the process ended (restarted), or `t` + [`WAIT_SLACK`] has passed, re-reading the VM
//! after each commit the feed's in-process notifier announces (and at least every second, for
//! a host that falls silent), holding no database connection while waiting.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::super::accounts::Account;
use super::super::api::{Ctx, Reply};
use super::super::error;
use super::super::filters::Filters;
use super::super::Docker;
use super::create::{self, PENDING_IP, PENDING_NETWORK};
use super::inspect::{self, DockerState};
use super::lookup::{self, Found};
use super::validate;
use crate::control::db::Db;
use crate::control::error::OpError;
use crate::control::vms::{self, Action, Vm};
use portolan::store::{self, Txn};

/// How long `start` waits for the agent's report of the new process (a host's first run of an
/// image fetches and unpacks its layers first).
pub const START_WAIT: Duration = Duration::from_secs(120);

/// How much longer than its timeout `stop`/`restart` wait for the agent's report.
pub const WAIT_SLACK: Duration = Duration::from_secs(30);

/// The container named `term`, under its owner's and its own locks.
fn locked(db: &mut Db<'_>, account: &Account, term: &str) -> Result<Found, OpError> {
    let f = lookup::find(db, account, term)?;
    let vm = vms::lock_and_find(db, &f.vm.uuid)?;
    let spec = vm.container.clone().ok_or_else(|| lookup::no_such(term))?;
    if vm.state == "destroyed" {
        return Err(lookup::no_such(term));
    }
    Ok(Found { vm, spec })
}

fn state(db: &mut Db<'_>, c: &Ctx<'_>, vm: &Vm) -> Result<DockerState, OpError> {
    inspect::state_now(db, &c.docker.app.cfg, vm)
}

/// `POST /containers/{id}/start`: 204 once the agent reports the new process (running, or
/// already ended: moby's start too returns once the process was started), 500 with the agent's
/// reason when it could not start it; 304 when it is running; 404 `network N not found` when
/// its network did not exist at create and still does not.
pub async fn start(docker: Arc<Docker>, account: Account, term: String) -> Result<Reply, OpError> {
    let r = start_once(&docker, &account, &term).await;
    if r.is_err() {
        // A `--rm` container that could not start is removed, as moby does (`docker run --rm`
        // waits for the removal after a failed start).
        remove_if_auto(&docker, &account, &term).await;
    }
    r
}

/// Removes container `term` if it was created with `--rm` (best effort, logged).
async fn remove_if_auto(docker: &Arc<Docker>, account: &Account, term: &str) {
    let cfg = docker.app.cfg.clone();
    let (acc, tm) = (account.clone(), term.to_owned());
    let r = write(docker, move |tx| {
        let mut d = Db::from(tx.raw());
        let f = locked(&mut d, &acc, &tm)?;
        if f.spec.auto_remove {
            vms::remove_container(tx, &cfg, &f.vm)?;
        }
        Ok(())
    })
    .await;
    if let Err(e) = r {
        tracing::warn!(container = %term, error = ?e, "removing a --rm container after its failed start");
    }
}

async fn start_once(docker: &Arc<Docker>, account: &Account, term: &str) -> Result<Reply, OpError> {
    let cfg = docker.app.cfg.clone();
    let (account, term) = (account.clone(), term.to_owned());
    let started = write(docker, move |tx| {
        let mut d = Db::from(tx.raw());
        let mut f = locked(&mut d, &account, &term)?;
        if inspect::state_now(&mut d, &cfg, &f.vm)?.running() {
            return Ok(None);
        }
        attach_pending(tx, &cfg, &account, &mut f.vm)?;
        let mut d = Db::from(tx.raw());
        vms::act(&mut d, &mut f.vm, &Action::Start)?;
        Ok(Some((f.vm.uuid.clone(), f.vm.generation)))
    })
    .await?;
    let Some((uuid, generation)) = started else {
        return Ok(Reply::Empty(StatusCode::NOT_MODIFIED));
    };
    let reported =
        |vm: &Vm| vm.state == "failed" || vm.run_generation.is_some_and(|g| g >= generation);
    let deadline = tokio::time::Instant::now() + START_WAIT;
    if !wait_for(docker, &uuid, deadline, |vm, _| reported(vm)).await? {
        tracing::warn!(vm = %uuid, "docker start: no report of the new process in time");
        return Ok(Reply::Empty(StatusCode::NO_CONTENT));
    }
    match read_state(docker, uuid).await? {
        Some((vm, _)) if vm.state == "failed" => Err(error::err(
            500,
            format!(
                "the container's host could not start it: {}",
                vm.state_reason.as_deref().unwrap_or("no reason given")
            ),
        )),
        _ => Ok(Reply::Empty(StatusCode::NO_CONTENT)),
    }
}

/// Gives a container whose network did not exist at create its NIC on it now (moby 20.10
/// resolves the network at start): 404 `network N not found` while it still does not exist.
fn attach_pending(
    tx: &mut dyn Txn,
    cfg: &crate::control::Config,
    account: &Account,
    vm: &mut Vm,
) -> Result<(), OpError> {
    let Some(net) = inspect::pending_network(vm) else {
        return Ok(());
    };
    let n = {
        let mut d = Db::from(tx.raw());
        create::resolve_network(&mut d, account, &net)?
    }
    .ok_or_else(|| error::not_found(format!("network {net} not found")))?;
    let Some(nu) = n.uuid.clone() else {
        return Err(error::bad_request(format!(
            "network {} cannot be used by fabric containers",
            n.name
        )));
    };
    let ip = vm
        .tags
        .get(PENDING_IP)
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok());
    vms::add_nic(tx, cfg, vm, &nu, ip, false)?;
    let mut tags = vm.tags.clone();
    tags.remove(PENDING_NETWORK);
    tags.remove(PENDING_IP);
    if let Some(ip) = ip {
        tags.insert(format!("{}{nu}", create::IP_TAG), json!(ip.to_string()));
    }
    vms::set_tags(&mut Db::from(tx.raw()), vm, tags)
}

/// `t` of stop/restart: seconds, `-1` (moby: wait forever; here: the spec's) or absent.
fn timeout(q: Option<&str>) -> Result<Option<u32>, OpError> {
    match q {
        None | Some("") => Ok(None),
        Some(t) => match t.parse::<i64>() {
            Ok(-1) => Ok(None),
            Ok(n) if (0..=86_400).contains(&n) => Ok(Some(n as u32)),
            _ => Err(error::bad_request(format!(
                "invalid value for t: {t:?}: expected whole seconds (0 to 86400)"
            ))),
        },
    }
}

/// Runs a write transaction on the blocking pool.
async fn write<T: Send + 'static>(
    docker: &Arc<Docker>,
    f: impl Fn(&mut dyn Txn) -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    let d = docker.clone();
    tokio::task::spawn_blocking(move || crate::control::http::write_txn(&d.app, f))
        .await
        .map_err(|_| error::err(500, "internal error"))?
}

/// The container's VM and Docker state now (`None`: it is gone).
async fn read_state(
    docker: &Arc<Docker>,
    uuid: String,
) -> Result<Option<(Vm, DockerState)>, OpError> {
    let d = docker.clone();
    tokio::task::spawn_blocking(move || {
        store::with_read(&*d.app.store, |raw| {
            let mut db = Db::from(raw);
            let Some(vm) = vms::get(&mut db, &uuid)? else {
                return Ok(None);
            };
            if vm.state == "destroyed" {
                return Ok(None);
            }
            let st = inspect::state_now(&mut db, &d.app.cfg, &vm)?;
            Ok(Some((vm, st)))
        })
    })
    .await
    .map_err(|_| error::err(500, "internal error"))?
}

/// Waits until `done` holds for the container (or it is gone), or `deadline`; returns
/// whether it held. Re-reads after each commit, and at least every second.
async fn wait_for(
    docker: &Arc<Docker>,
    uuid: &str,
    deadline: tokio::time::Instant,
    done: impl Fn(&Vm, &DockerState) -> bool,
) -> Result<bool, OpError> {
    loop {
        let seen = docker.app.feed.last_seq();
        match read_state(docker, uuid.to_string()).await? {
            None => return Ok(true),
            Some((vm, st)) if done(&vm, &st) => return Ok(true),
            Some(_) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let step = deadline.min(now + Duration::from_secs(1));
        docker.app.feed.wait_past(seen, step).await;
    }
}

/// `POST /containers/{id}/stop?t=`: 204 once the agent reports it stopped (or the wait is
/// over); 304 when it is not running (its desired state is set to stopped all the same, so a
/// host that comes back does not run it).
pub async fn stop(
    docker: Arc<Docker>,
    account: Account,
    term: String,
    t: Option<String>,
) -> Result<Reply, OpError> {
    let t = timeout(t.as_deref())?;
    let (acc, tm) = (account.clone(), term.clone());
    let d2 = docker.clone();
    let r = write(&docker, move |tx| {
        let mut d = Db::from(tx.raw());
        let mut f = locked(&mut d, &acc, &tm)?;
        let st = inspect::state_now(&mut d, &d2.app.cfg, &f.vm)?;
        vms::act(&mut d, &mut f.vm, &Action::Stop(t))?;
        Ok((
            f.vm.uuid.clone(),
            st.running(),
            t.unwrap_or(f.spec.stop_timeout),
        ))
    })
    .await?;
    let (uuid, was_running, secs) = r;
    if !was_running {
        return Ok(Reply::Empty(StatusCode::NOT_MODIFIED));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(secs)) + WAIT_SLACK;
    let stopped = wait_for(&docker, &uuid, deadline, |_, st| !st.running()).await?;
    if !stopped {
        tracing::warn!(vm = %uuid, "docker stop: no report of the container stopping in time");
    }
    Ok(Reply::Empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/restart?t=`: a new generation (the agent stops the old process
/// with the timeout, starts a new one); 204 once it reports the new one running (or the wait
/// is over).
pub async fn restart(
    docker: Arc<Docker>,
    account: Account,
    term: String,
    t: Option<String>,
) -> Result<Reply, OpError> {
    let t = timeout(t.as_deref())?;
    let (acc, tm) = (account.clone(), term.clone());
    let cfg = docker.app.cfg.clone();
    let (uuid, generation, secs) = write(&docker, move |tx| {
        let mut f = {
            let mut d = Db::from(tx.raw());
            locked(&mut d, &acc, &tm)?
        };
        attach_pending(tx, &cfg, &acc, &mut f.vm)?;
        let mut d = Db::from(tx.raw());
        vms::act(&mut d, &mut f.vm, &Action::Reboot(t))?;
        Ok((
            f.vm.uuid.clone(),
            f.vm.generation,
            t.unwrap_or(f.spec.stop_timeout),
        ))
    })
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(secs)) + WAIT_SLACK;
    let ok = wait_for(&docker, &uuid, deadline, |vm, st| {
        st.running() && vm.run_generation.is_some_and(|g| g >= generation)
    })
    .await?;
    if !ok {
        tracing::warn!(vm = %uuid, "docker restart: no report of the new process in time");
    }
    Ok(Reply::Empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/kill?signal=`: 204; 409 when it is not running (moby's texts:
/// `Cannot kill container: TERM: …`). A SIGKILL answers once the agent reports the process
/// gone (or after [`KILL_WAIT`]), as moby's does: a `docker kill` is followed at once by
/// `inspect` showing exit code 137 or a second kill refused as not running.
pub async fn kill(
    docker: Arc<Docker>,
    account: Account,
    term: String,
    signal: Option<String>,
) -> Result<Reply, OpError> {
    let sig = match signal.as_deref() {
        None | Some("") => "SIGKILL".to_string(),
        Some(s) => vms::parse_signal(s)
            .ok_or_else(|| error::bad_request(format!("Invalid signal: {s}")))?,
    };
    let wait = sig == "SIGKILL";
    let d2 = docker.clone();
    let uuid = write(&docker, move |tx| {
        let mut d = Db::from(tx.raw());
        let mut f = locked(&mut d, &account, &term).map_err(|e| cannot_kill(&term, e))?;
        if !inspect::state_now(&mut d, &d2.app.cfg, &f.vm)?.running() {
            return Err(cannot_kill(
                &term,
                error::conflict(format!("Container {} is not running", f.spec.id)),
            ));
        }
        vms::act(&mut d, &mut f.vm, &Action::Kill(sig.clone()))?;
        Ok(f.vm.uuid.clone())
    })
    .await?;
    if wait {
        let deadline = tokio::time::Instant::now() + KILL_WAIT;
        if !wait_for(&docker, &uuid, deadline, |_, st| !st.running()).await? {
            tracing::warn!(vm = %uuid, "docker kill: no report of the container ending in time");
        }
    }
    Ok(Reply::Empty(StatusCode::NO_CONTENT))
}

/// How long a SIGKILL's `docker kill` waits for the agent's report of the end (moby waits 2 s
/// for the process, then for the daemon's own bookkeeping).
pub const KILL_WAIT: Duration = Duration::from_secs(10);

/// moby's kill route wraps every refusal of its backend (not found, not running) as `Cannot
/// kill container: TERM: …`, status kept; store failures stay as they are (500).
fn cannot_kill(term: &str, e: OpError) -> OpError {
    match e {
        OpError::Api(mut a) => {
            a.message = format!("Cannot kill container: {term}: {}", a.message);
            OpError::Api(a)
        }
        other => other,
    }
}

/// Deletes a container: its publish rules and its VM (NICs freed), in the caller's
/// transaction; the agent removes the process when the VM leaves its snapshot.
pub fn destroy(tx: &mut dyn Txn, c: &Ctx<'_>, f: &Found) -> Result<(), OpError> {
    vms::remove_container(tx, &c.docker.app.cfg, &f.vm)
}

/// `DELETE /containers/{id}?force=`: 204; 409 when running without `force`.
pub fn remove(tx: &mut dyn Txn, c: &Ctx<'_>, term: &str, force: bool) -> Result<Reply, OpError> {
    let mut d = Db::from(tx.raw());
    let f = locked(&mut d, c.account, term)?;
    if state(&mut d, c, &f.vm)?.running() && !force {
        return Err(error::conflict(format!(
            "You cannot remove a running container {}. Stop the container before attempting removal or force remove",
            f.spec.id
        )));
    }
    destroy(tx, c, &f)?;
    Ok(Reply::Empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/rename?name=`: 204; 409 when the name is taken.
pub fn rename(
    db: &mut Db<'_>,
    c: &Ctx<'_>,
    term: &str,
    name: Option<&str>,
) -> Result<Reply, OpError> {
    let name = match name {
        None | Some("") => {
            return Err(error::bad_request("Neither old nor new names may be empty"))
        }
        Some(n) => validate::check_name(n)?,
    };
    let mut f = locked(db, c.account, term)?;
    if f.vm.alias.as_deref() == Some(name.as_str()) {
        return Err(error::bad_request(
            "Renaming a container with the same name as its current name",
        ));
    }
    if let Some(other) = vms::alias_taken(db, &c.account.uuid, &name, Some(&f.vm.uuid))? {
        let id = vms::get(db, &other)?
            .and_then(|v| v.container.map(|s| s.id))
            .unwrap_or(other);
        return Err(create::name_conflict(&name, &id));
    }
    vms::rename(db, &mut f.vm, &name)?;
    Ok(Reply::Empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/prune?filters=`: removes every container that is created or exited
/// (not running, and not on a silent host: its state is unknown); filters `label`, `until`.
pub fn prune(tx: &mut dyn Txn, c: &Ctx<'_>, filters: Option<&str>) -> Result<Reply, OpError> {
    let filters = Filters::parse(filters)?;
    filters.validate(&["label", "label!", "until"])?;
    let now = crate::control::servers::now_ms();
    let until = match filters.get("until").next() {
        Some(u) => Some(super::super::filters::until(u, now)?),
        None => None,
    };
    let all = {
        let mut d = Db::from(tx.raw());
        lookup::all(&mut d, c.account)?
    };
    let mut deleted = Vec::new();
    for f in all {
        let st = {
            let mut d = Db::from(tx.raw());
            state(&mut d, c, &f.vm)?
        };
        if !matches!(st.status, "created" | "exited")
            || !filters.kv_list("label", &f.spec.labels)
            || (filters.contains("label!")
                && filters.get("label!").any(|l| match l.split_once('=') {
                    Some((k, v)) => f.spec.labels.get(k).is_some_and(|x| x == v),
                    None => f.spec.labels.contains_key(l),
                }))
            || until.is_some_and(|u| f.vm.created_ms > u)
        {
            continue;
        }
        let locked_f = {
            let mut d = Db::from(tx.raw());
            locked(&mut d, c.account, &f.spec.id)?
        };
        destroy(tx, c, &locked_f)?;
        deleted.push(f.spec.id.clone());
    }
    Ok(Reply::Json(
        StatusCode::OK,
        json!({
            "ContainersDeleted": if deleted.is_empty() { Value::Null } else { json!(deleted) },
            "SpaceReclaimed": 0
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(timeout(None).unwrap(), None);
        assert_eq!(timeout(Some("1")).unwrap(), Some(1));
        assert_eq!(timeout(Some("-1")).unwrap(), None);
        assert!(timeout(Some("x")).is_err());
        assert!(timeout(Some("-5")).is_err());
    }

    #[test]
    fn kill_refusals_read_as_mobys() {
        let e = cannot_kill("ca", error::not_found("No such container: ca"));
        match e {
            OpError::Api(a) => {
                assert_eq!(a.status, 404);
                assert_eq!(
                    a.message,
                    "Cannot kill container: ca: No such container: ca"
                );
            }
            other => panic!("{other:?}"),
        }
        let e = cannot_kill("x", OpError::Corrupt("vm".into()));
        assert!(
            matches!(e, OpError::Corrupt(_)),
            "store errors are not rewritten"
        );
    }
}
