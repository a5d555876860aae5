//! The change feed: every change to VMs, NICs, rules, servers and networks gets a sequence
//! number in the same transaction as the change (`fabric_changes`).
//!
//! Writers call [`record`] anywhere inside a write transaction: the change is queued on the
//! current thread, and [`flush`] — called by the one write path (`http::run_write`, and any other
//! caller of `store::with_txn` that records) as the LAST step before commit — takes the feed's
//! lock (`LOCK_GLOBAL "changes"`, last in the lock order of `db.rs`) and numbers the queued
//! changes. So feed rows commit in sequence order (a reader that sees seq N has seen every seq
//! below N), and no writer holds the feed lock while it takes another lock.
//!
//! (This file starts as the shared interface; the reading side — `GET /changes`, long-poll,
//! 410 for a `since` older than what is kept — is built on it.)

use std::cell::RefCell;

use super::db::{lock_key, Db, Val, LOCK_GLOBAL};
use super::error::OpError;

/// Kinds of change (the `kind` column).
pub mod kind {
    /// A VM: created, updated (tags, firewall, state, server), migrated, destroyed.
    pub const VM: &str = "vm";
    /// A NIC: created, updated, deleted.
    pub const NIC: &str = "nic";
    /// A firewall rule: created, updated, deleted.
    pub const RULE: &str = "rule";
    /// A server: registered, updated, removed.
    pub const SERVER: &str = "server";
    /// A network: created, updated, deleted.
    pub const NETWORK: &str = "network";
}

/// One change, as passed to [`record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change<'a> {
    /// One of [`kind`].
    pub kind: &'a str,
    /// The object's UUID (a NIC's MAC as 12 hex digits).
    pub uuid: &'a str,
    /// What happened: `create`, `update`, `delete`, `state`, `migrate`, ...
    pub action: &'a str,
    /// The object's owner, if it has one.
    pub owner_uuid: Option<&'a str>,
    /// Servers concerned (a VM's server, and its old one after a migrate).
    pub servers: &'a [&'a str],
}

/// A queued change (owned).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    kind: String,
    uuid: String,
    action: String,
    owner_uuid: Option<String>,
    servers: String,
}

thread_local! {
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

/// Queues a change of the caller's write transaction; [`flush`] writes it before commit.
/// (`db` is the transaction the change belongs to; it is taken so that a change can only be
/// recorded from inside one.)
pub fn record(_db: &mut Db<'_>, c: &Change<'_>) -> Result<(), OpError> {
    PENDING.with(|p| {
        p.borrow_mut().push(Pending {
            kind: c.kind.to_string(),
            uuid: c.uuid.to_string(),
            action: c.action.to_string(),
            owner_uuid: c.owner_uuid.map(str::to_string),
            servers: c.servers.join(","),
        })
    });
    Ok(())
}

/// Forgets changes queued by a transaction that did not commit (called before each attempt).
pub fn discard() {
    PENDING.with(|p| p.borrow_mut().clear());
}

/// Writes the changes queued on this thread, numbered after the last committed one; returns the
/// last sequence number written (`None`: nothing was queued). Call it last in the transaction.
pub fn flush(db: &mut Db<'_>) -> Result<Option<i64>, OpError> {
    let queued = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if queued.is_empty() {
        return Ok(None);
    }
    db.lock(lock_key(LOCK_GLOBAL, "changes"))?;
    let mut seq = db
        .query_opt("SELECT COALESCE(MAX(seq), 0) FROM fabric_changes", &[])?
        .and_then(|r| r.into_iter().next())
        .map(|v| v.as_i64("seq"))
        .transpose()?
        .unwrap_or(0);
    let time_ms = super::now_us() / 1000;
    for c in queued {
        seq += 1;
        db.exec(
            "INSERT INTO fabric_changes (seq, kind, uuid, action, owner_uuid, servers, time_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                Val::int(seq),
                Val::text(c.kind),
                Val::text(c.uuid),
                Val::text(c.action),
                Val::opt_text(c.owner_uuid.as_deref()),
                Val::text(c.servers),
                Val::int(time_ms),
            ],
        )?;
    }
    Ok(Some(seq))
}
