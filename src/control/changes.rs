//! The change feed: every change to VMs, NICs, rules, servers and networks gets a sequence
//! number in the same transaction as the change (`fabric_changes`). A change may carry a
//! `detail` (JSON: a container's exit code, a kill's signal; [`record_with`]), shown by
//! `GET /changes`.
//!
//! Writers call [`record`] anywhere inside a write transaction: the change is queued on the
//! current thread, and [`flush`] — called by the one write path (`http::run_write`, and any other
//! caller of `store::with_txn` that records) as the LAST step before commit — takes the feed's
//! lock (`LOCK_GLOBAL "changes"`, last in the lock order of `db.rs`) and numbers the queued
//! changes. So feed rows commit in sequence order (a reader that sees seq N has seen every seq
//! below N), and no writer holds the feed lock while it takes another lock.
//!
//! The reading side: [`read`] answers one page of `GET /changes?since=N[&server_uuid=U]` from one
//! read transaction (410 Gone for a `since` older than what is kept), [`prune`] applies the
//! retention, and [`feed`] holds what is not SQL: the in-process notifier a long-poll waits on
//! (bumped after every write commit of this process, by a 1 s re-check of the newest sequence
//! number, and on PostgreSQL by `LISTEN fabric_changes`, which [`flush`] `NOTIFY`s), the
//! long-poll itself, and the background tasks.

pub mod feed;

use std::cell::RefCell;

use serde_json::{json, Value};

use super::db::{lock_key, Db, Row, Val, LOCK_GLOBAL};
use super::error::{ApiError, OpError};

/// The PostgreSQL channel [`flush`] notifies (payload: the last sequence number written) and the
/// feed listens on.
pub const CHANNEL: &str = "fabric_changes";

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
    /// A foreign VXLAN peer (`/peers`): created, deleted. Membership: every server hears it.
    pub const PEER: &str = "peer";
    /// A Docker container (its `uuid` is the VM's): `create`, `start`, `die` (detail
    /// `{"exit_code": n}`), `stop`, `kill` (detail `{"signal": "SIGKILL"}`), `restart`,
    /// `rename`, `destroy`.
    pub const CONTAINER: &str = "container";
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
    detail: Option<String>,
}

thread_local! {
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

/// Queues a change of the caller's write transaction; [`flush`] writes it before commit.
/// (`db` is the transaction the change belongs to; it is taken so that a change can only be
/// recorded from inside one.)
pub fn record(db: &mut Db<'_>, c: &Change<'_>) -> Result<(), OpError> {
    record_with(db, c, None)
}

/// [`record`] with a `detail` (JSON, shown by `GET /changes`): a container's exit code, the
/// signal of a kill.
pub fn record_with(
    _db: &mut Db<'_>,
    c: &Change<'_>,
    detail: Option<&Value>,
) -> Result<(), OpError> {
    let detail = detail.map(Value::to_string);
    PENDING.with(|p| {
        p.borrow_mut().push(Pending {
            kind: c.kind.to_string(),
            uuid: c.uuid.to_string(),
            action: c.action.to_string(),
            owner_uuid: c.owner_uuid.map(str::to_string),
            servers: c.servers.join(","),
            detail,
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
            "INSERT INTO fabric_changes (seq, kind, uuid, action, owner_uuid, servers, time_ms, \
               detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                Val::int(seq),
                Val::text(c.kind),
                Val::text(c.uuid),
                Val::text(c.action),
                Val::opt_text(c.owner_uuid.as_deref()),
                Val::text(c.servers),
                Val::int(time_ms),
                Val::opt_text(c.detail.as_deref()),
            ],
        )?;
    }
    if db.is_pg() {
        // Delivered at commit (and not at all on rollback) to every listening instance.
        db.exec(
            "SELECT pg_notify($1, $2)",
            &[Val::text(CHANNEL), Val::text(seq.to_string())],
        )?;
    }
    Ok(Some(seq))
}

/// The newest sequence number written (0 when the feed is empty).
pub fn last_seq(db: &mut Db<'_>) -> Result<i64, OpError> {
    Ok(db
        .query_opt("SELECT MAX(seq) FROM fabric_changes", &[])?
        .and_then(|r| r.first().and_then(Val::as_opt_i64))
        .unwrap_or(0))
}

/// Largest (and default) page of `GET /changes`.
pub const MAX_PAGE: u64 = 1000;

/// What a reader asks for: changes after `since`, for one server or all, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedQuery {
    /// Return changes with `seq > since`.
    pub since: i64,
    /// Only what this server must act on (see [`read`]); all changes when `None`.
    pub server_uuid: Option<String>,
    /// At most this many (1..=[`MAX_PAGE`]).
    pub limit: u64,
}

/// One change as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedChange {
    /// Sequence number (commit order).
    pub seq: i64,
    /// One of [`kind`].
    pub kind: String,
    /// The object's UUID (a NIC's MAC as 12 hex digits).
    pub uuid: String,
    /// What happened.
    pub action: String,
    /// The object's owner.
    pub owner_uuid: Option<String>,
    /// Servers concerned.
    pub servers: Vec<String>,
    /// When it was written (ms since the epoch).
    pub time_ms: i64,
    /// What more there is to say (a container's exit code, a kill's signal), if anything.
    pub detail: Option<Value>,
}

impl FeedChange {
    /// The change's JSON form.
    pub fn to_json(&self) -> Value {
        json!({
            "seq": self.seq,
            "kind": self.kind,
            "uuid": self.uuid,
            "action": self.action,
            "owner_uuid": self.owner_uuid,
            "servers": self.servers,
            "time": super::iso_from_ms(self.time_ms),
            "detail": self.detail,
        })
    }
}

/// One page of the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The changes after `since`, by sequence number.
    pub changes: Vec<FeedChange>,
    /// The `since` to ask next: the last sequence number returned, or `since` if none.
    pub next: i64,
    /// The oldest sequence number kept (the newest + 1 while the feed is empty).
    pub oldest: i64,
    /// The newest sequence number written (0: none).
    pub last: i64,
}

impl Page {
    /// `{"changes": [...], "next": M, "oldest": O}`.
    pub fn to_json(&self) -> Value {
        json!({
            "changes": self.changes.iter().map(FeedChange::to_json).collect::<Vec<_>>(),
            "next": self.next,
            "oldest": self.oldest,
        })
    }
}

/// 410 Gone: the reader's position is no longer (or was never) in the feed.
pub fn gone(message: String) -> ApiError {
    ApiError {
        status: 410,
        code: "Gone",
        message,
        errors: Vec::new(),
        with_errors: false,
        extra: serde_json::Map::new(),
    }
}

fn change_from_row(r: Row) -> Result<FeedChange, OpError> {
    let mut it = r.into_iter();
    let mut next = |what: &str| {
        it.next()
            .ok_or_else(|| OpError::Corrupt(format!("change row: no {what}")))
    };
    let seq = next("seq")?.as_i64("change seq")?;
    let kind = next("kind")?.into_string("change kind")?;
    let uuid = next("uuid")?.into_string("change uuid")?;
    let action = next("action")?.into_string("change action")?;
    let owner_uuid = next("owner_uuid")?.into_opt_string();
    let servers = next("servers")?.into_string("change servers")?;
    let time_ms = next("time_ms")?.as_i64("change time")?;
    let detail = match next("detail")?.into_opt_string() {
        Some(t) => Some(serde_json::from_str(&t)?),
        None => None,
    };
    Ok(FeedChange {
        seq,
        kind,
        uuid,
        action,
        owner_uuid,
        servers: servers
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        time_ms,
        detail,
    })
}

const COLUMNS: &str =
    "c.seq, c.kind, c.uuid, c.action, c.owner_uuid, c.servers, c.time_ms, c.detail";

/// Reads one page of the feed in the caller's (read) transaction.
///
/// With `server_uuid = U`, a change is returned when U must act on it: U is among its
/// `servers`; or it is a `rule`, `server`, `network` or `peer` change (anyone's firewall,
/// networks or members may depend on it); or its owner has a non-destroyed VM on U (that owner's firewall closure
/// covers U's VMs). Evaluated at read time, so it may include more than U needs, never less
/// for what U hosts now.
///
/// A `since` below what is kept (`since < oldest - 1`: changes after it were pruned) or beyond
/// the newest change (the feed was reset under the reader) is 410 Gone: list again.
pub fn read(db: &mut Db<'_>, q: &FeedQuery) -> Result<Page, OpError> {
    let bounds = db.query_opt("SELECT MIN(seq), MAX(seq) FROM fabric_changes", &[])?;
    let (min, last) = match bounds.as_deref() {
        Some([a, b, ..]) => (a.as_opt_i64(), b.as_opt_i64().unwrap_or(0)),
        _ => (None, 0),
    };
    let oldest = min.unwrap_or(last + 1);
    if q.since < oldest - 1 {
        return Err(gone(format!(
            "changes after {} are no longer kept (oldest is {oldest}): list again",
            q.since
        ))
        .into());
    }
    if q.since > last {
        return Err(gone(format!(
            "changes after {}: the feed ends at {last} (was the store replaced?): list again",
            q.since
        ))
        .into());
    }
    let limit = q.limit.clamp(1, MAX_PAGE) as i64;
    let rows = match &q.server_uuid {
        None => db.query(
            &format!(
                "SELECT {COLUMNS} FROM fabric_changes c WHERE c.seq > $1 ORDER BY c.seq LIMIT $2"
            ),
            &[Val::int(q.since), Val::int(limit)],
        )?,
        Some(u) => db.query(
            &format!(
                "SELECT {COLUMNS} FROM fabric_changes c
                 WHERE c.seq > $1 AND (
                     c.kind IN ('rule', 'server', 'network', 'peer')
                     OR (',' || c.servers || ',') LIKE $2
                     OR (c.owner_uuid IS NOT NULL AND EXISTS (
                         SELECT 1 FROM fabric_vms v
                         WHERE v.owner_uuid = c.owner_uuid AND v.server_uuid = $3
                           AND v.state <> 'destroyed')))
                 ORDER BY c.seq LIMIT $4"
            ),
            &[
                Val::int(q.since),
                // A UUID (checked by the caller) has no LIKE wildcards.
                Val::text(format!("%,{u},%")),
                Val::text(u),
                Val::int(limit),
            ],
        )?,
    };
    let changes = rows
        .into_iter()
        .map(change_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next = changes.last().map_or(q.since, |c| c.seq);
    Ok(Page {
        changes,
        next,
        oldest,
        last,
    })
}

/// How long changes are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Changes older than this may be deleted...
    pub max_age: std::time::Duration,
    /// ...except the newest this many (at least 1: the newest change carries the sequence).
    pub keep: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: std::time::Duration::from_secs(86_400),
            keep: 100_000,
        }
    }
}

/// Deletes changes older than `now_ms - max_age` that are not among the newest `keep` (the
/// newest is always kept, so numbering never restarts); returns how many were deleted.
pub fn prune(db: &mut Db<'_>, r: &Retention, now_ms: i64) -> Result<u64, OpError> {
    let cutoff = now_ms.saturating_sub(i64::try_from(r.max_age.as_millis()).unwrap_or(i64::MAX));
    let keep = i64::try_from(r.keep.max(1)).unwrap_or(i64::MAX);
    // Sequence numbers are dense (flush numbers from MAX + 1 under the feed lock), so the
    // newest `keep` are those above MAX - keep.
    db.exec(
        "DELETE FROM fabric_changes WHERE time_ms < $1
           AND seq <= (SELECT MAX(seq) FROM fabric_changes) - $2",
        &[Val::int(cutoff), Val::int(keep)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use portolan::store::{self, Store};
    use std::sync::Arc;

    struct Tmp(std::path::PathBuf, Arc<dyn Store>);

    impl Drop for Tmp {
        fn drop(&mut self) {
            for s in ["", "-wal", "-shm"] {
                let mut p = self.0.clone().into_os_string();
                p.push(s);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn store() -> Tmp {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).unwrap();
        let n: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let path = std::env::temp_dir().join(format!("fabric-changes-unit-{n}.db"));
        let s = store::open(&format!("sqlite:{}", path.display())).unwrap();
        crate::control::prepare(&*s, &crate::control::Config::default()).unwrap();
        Tmp(path, s)
    }

    const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";
    const O1: &str = "01010101-0000-4000-8000-000000000001";
    const O2: &str = "02020202-0000-4000-8000-000000000002";

    /// Writes `changes` in one transaction; returns flush's answer.
    fn write(s: &dyn Store, changes: &[(&str, &str, Option<&str>, &[&str])]) -> Option<i64> {
        discard();
        store::with_txn(s, |tx| -> Result<Option<i64>, OpError> {
            let mut d = Db::from(tx.raw());
            for (k, u, o, servers) in changes {
                record(
                    &mut d,
                    &Change {
                        kind: k,
                        uuid: u,
                        action: "create",
                        owner_uuid: *o,
                        servers,
                    },
                )?;
            }
            flush(&mut d)
        })
        .unwrap()
    }

    fn page(s: &dyn Store, since: i64, server: Option<&str>, limit: u64) -> Result<Page, OpError> {
        store::with_read(s, |raw| {
            read(
                &mut Db::from(raw),
                &FeedQuery {
                    since,
                    server_uuid: server.map(str::to_string),
                    limit,
                },
            )
        })
    }

    fn seqs(p: &Page) -> Vec<i64> {
        p.changes.iter().map(|c| c.seq).collect()
    }

    #[test]
    fn numbering_paging_and_bounds() {
        let t = store();
        let s = &*t.1;
        assert_eq!(write(s, &[]), None, "nothing queued, nothing written");
        let p = page(s, 0, None, 10).unwrap();
        assert_eq!((p.changes.len(), p.next, p.oldest, p.last), (0, 0, 1, 0));
        assert_eq!(
            write(s, &[("rule", "r1", None, &[]), ("rule", "r2", None, &[])]),
            Some(2)
        );
        assert_eq!(
            write(s, &[("nic", "90b8d0000001", Some(O1), &[A, B])]),
            Some(3)
        );
        let p = page(s, 0, None, 2).unwrap();
        assert_eq!(seqs(&p), [1, 2]);
        assert_eq!(p.next, 2);
        let p = page(s, p.next, None, 2).unwrap();
        assert_eq!(seqs(&p), [3]);
        assert_eq!(p.changes[0].servers, [A, B]);
        assert_eq!(p.changes[0].owner_uuid.as_deref(), Some(O1));
        let j = p.to_json();
        assert_eq!(j["changes"][0]["kind"], "nic");
        assert_eq!(j["changes"][0]["servers"][1], B);
        assert!(j["changes"][0]["time"].as_str().unwrap().ends_with('Z'));
        let p = page(s, 3, None, 10).unwrap();
        assert!(p.changes.is_empty());
        assert_eq!(p.next, 3);
        // Beyond the end: the feed was reset under the reader.
        let e = page(s, 4, None, 10).unwrap_err().into_api();
        assert_eq!((e.status, e.code), (410, "Gone"));
    }

    #[test]
    fn server_filter() {
        let t = store();
        let s = &*t.1;
        store::with_txn(s, |tx| -> Result<(), OpError> {
            let mut d = Db::from(tx.raw());
            for (vm, owner, server, state) in [
                ("v1", O1, A, "running"),
                ("v2", O2, B, "running"),
                ("v3", O2, A, "destroyed"),
            ] {
                d.exec(
                    "INSERT INTO fabric_vms (uuid, owner_uuid, server_uuid, state, created_ms, doc) \
                     VALUES ($1, $2, $3, $4, 0, '{}')",
                    &[
                        Val::text(vm),
                        Val::text(owner),
                        Val::text(server),
                        Val::text(state),
                    ],
                )?;
            }
            Ok(())
        })
        .unwrap();
        write(s, &[("vm", "v2", Some(O2), &[B])]); // 1: B only
        write(s, &[("rule", "r", Some(O2), &[])]); // 2: everyone
        write(s, &[("nic", "m1", Some(O1), &[B])]); // 3: B (servers), A (O1 has a VM on A)
        write(s, &[("vm", "v9", Some(O2), &[])]); // 4: B (O2 live on B); not A (v3 destroyed)
        write(s, &[("network", "n", None, &[])]); // 5: everyone
        write(s, &[("server", B, None, &[B])]); // 6: everyone
        write(s, &[("vm", "v1", Some(O1), &[A, B])]); // 7: both (migrate)
        assert_eq!(seqs(&page(s, 0, Some(A), 100).unwrap()), [2, 3, 5, 6, 7]);
        assert_eq!(
            seqs(&page(s, 0, Some(B), 100).unwrap()),
            [1, 2, 3, 4, 5, 6, 7]
        );
        let p = page(s, 0, Some(A), 2).unwrap();
        assert_eq!((seqs(&p), p.next), (vec![2, 3], 3));
        // A server that hosts nothing still hears about rules, servers and networks.
        let c = "cccccccc-0000-4000-8000-000000000003";
        assert_eq!(seqs(&page(s, 0, Some(c), 100).unwrap()), [2, 5, 6]);
    }

    #[test]
    fn prune_keeps_the_newest_and_reports_gone() {
        let t = store();
        let s = &*t.1;
        for i in 0..5 {
            write(s, &[("rule", &format!("r{i}"), None, &[])]);
        }
        let now = crate::control::now_us() / 1000;
        let r = |keep| Retention {
            max_age: std::time::Duration::from_secs(3600),
            keep,
        };
        let prune_at = |now_ms: i64, keep| {
            store::with_txn(s, |tx| prune(&mut Db::from(tx.raw()), &r(keep), now_ms)).unwrap()
        };
        // Young changes are kept whatever `keep` says.
        assert_eq!(prune_at(now, 1), 0);
        // An hour and a bit later, all but the newest 2 go.
        assert_eq!(prune_at(now + 3_700_000, 2), 3);
        let p = page(s, 3, None, 10).unwrap();
        assert_eq!((seqs(&p), p.oldest), (vec![4, 5], 4));
        let e = page(s, 2, None, 10).unwrap_err().into_api();
        assert_eq!(e.status, 410);
        assert!(e.message.contains("oldest is 4"), "{}", e.message);
        // keep 0 still keeps the newest: numbering never restarts.
        assert_eq!(prune_at(now + 3_700_000, 0), 1);
        assert_eq!(write(s, &[("rule", "again", None, &[])]), Some(6));
        assert_eq!(seqs(&page(s, 5, None, 10).unwrap()), [6]);
    }
}
