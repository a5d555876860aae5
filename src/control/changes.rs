//! The change feed: every change to VMs, NICs, rules, servers and networks gets a sequence
//! number in the same transaction as the change (`fabric_changes`).
//!
//! Writers call [`record`] once per changed object, as the LAST step of their transaction: it
//! takes the feed's lock (`LOCK_GLOBAL "changes"`, last in the lock order of `db.rs`), so feed
//! rows commit in sequence order and a reader that sees seq N has seen every seq below N.
//!
//! (This file starts as the shared interface; the reading side — `GET /changes`, long-poll,
//! 410 for a `since` older than what is kept — is built on it.)

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

/// One change, as written by [`record`].
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

/// Appends a change in the caller's transaction; returns its sequence number. Call it last.
pub fn record(db: &mut Db<'_>, c: &Change<'_>) -> Result<i64, OpError> {
    db.lock(lock_key(LOCK_GLOBAL, "changes"))?;
    let next = db
        .query_opt("SELECT COALESCE(MAX(seq), 0) + 1 FROM fabric_changes", &[])?
        .and_then(|r| r.into_iter().next())
        .map(|v| v.as_i64("seq"))
        .transpose()?
        .unwrap_or(1);
    let servers = c.servers.join(",");
    db.exec(
        "INSERT INTO fabric_changes (seq, kind, uuid, action, owner_uuid, servers, time_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            Val::int(next),
            Val::text(c.kind),
            Val::text(c.uuid),
            Val::text(c.action),
            Val::opt_text(c.owner_uuid),
            Val::text(servers),
            Val::int(super::now_us() / 1000),
        ],
    )?;
    Ok(next)
}
