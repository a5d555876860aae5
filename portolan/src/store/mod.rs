//! The mapping store: Triton's three record kinds, in SQLite (embedded) or PostgreSQL (shared).
//!
//! # Records
//! - **Overlay mappings** `(vnet_id, ip) → (mac, cn_uuid, vlan)`, with tombstones: deleting a
//!   mapping sets `deleted` on the same key and bumps its `version`, as NAPI does in Moray.
//! - **Underlay mappings** `cn_uuid → (ip, port)`: where a compute node (host) receives VXLAN.
//! - **Per-host event logs** ("shootdowns"): VL2 records (forget this MAC) and VL3 records
//!   (re-resolve this IP), each with a random 16-byte id, read oldest first, removed by id.
//!
//! Every IP is stored as its 16-byte IPv6 form, IPv4 as IPv4-mapped (`::ffff:a.b.c.d`), and
//! compared as bytes, never as text. MACs are stored as 48-bit integers, UUIDs as 16 bytes.
//!
//! # Reading
//! The [`Store`] trait's read side is what the SVP server needs: [`Store::lookup`] answers a
//! batch of VL2/VL3 lookups on one connection in one read snapshot, [`Store::read_log`] reads a
//! host's log by its underlay IP, and [`Store::remove_log`] deletes log records (idempotent).
//!
//! # Writing: mapping operations inside the caller's transaction
//! All writes go through a transaction: [`with_txn`] (or [`Store::run_txn`]) opens one, hands
//! the closure a `&mut dyn` [`Txn`], and commits if the closure returns `Ok`, rolls back if it
//! returns `Err` (or panics). A [`Txn`] offers:
//! - the **mapping operations**, which write the overlay mapping *and* the events for every host
//!   with a live mapping on that VNI, in that same transaction:
//!   - [`Txn::create_mapping`]: put the mapping (live), one VL3 event per host on the VNI;
//!   - [`Txn::move_mapping`]: the NIC moved host, or changed IP or MAC: tombstone the old key if
//!     the IP changed, put the new one, VL2 events for the old MAC and VL3 events for the new IP;
//!   - [`Txn::delete_mapping`]: tombstone, one VL2 event per host on the VNI;
//!   - [`Txn::put_underlay`] / [`Txn::remove_underlay`] for host underlay addresses;
//! - the primitives those are built from ([`Txn::mapping`], [`Txn::vnet_hosts`],
//!   [`Txn::append_event`], ...), for callers with needs the operations do not cover;
//! - [`Txn::raw`]: the backend connection *inside* the open transaction
//!   ([`RawTxn::Sqlite`] `&rusqlite::Connection` or [`RawTxn::Postgres`] `&mut postgres::Client`),
//!   so a caller (the NAPI control plane) can write its own rows (NICs, IPs) with its own SQL and
//!   have them commit or roll back together with the Portolan records. The caller must not issue
//!   `BEGIN`, `COMMIT` or `ROLLBACK` on it; savepoints are fine.
//!
//! [`with_read`] (or [`Store::run_read`]) gives the same raw connection inside a read-only
//! transaction, for the caller's own consistent reads without SQLite's write lock.
//!
//! Which hosts get events: the hosts that have a live mapping on the VNI before the change,
//! together with those that have one after it (so the host a NIC leaves is told as well).
//!
//! ```no_run
//! # use portolan::store::{self, OverlayMapping, StoreError};
//! let store = store::open("sqlite:/var/tmp/fabric.db")?;
//! let m = OverlayMapping {
//!     vnet_id: 12340,
//!     ip: "10.0.0.1".parse().unwrap(),
//!     mac: "00:0a:95:9d:68:16".parse().unwrap(),
//!     cn_uuid: "564d1a4c-0000-4000-8000-000000000001".parse().unwrap(),
//!     vlan: 0,
//! };
//! store::with_txn(&*store, |tx| {
//!     if let store::RawTxn::Sqlite(conn) = tx.raw() {
//!         conn.execute("CREATE TABLE IF NOT EXISTS nics (mac TEXT)", [])?;
//!         conn.execute("INSERT INTO nics VALUES (?1)", ["00:0a:95:9d:68:16"])?;
//!     }
//!     tx.create_mapping(&m)?;
//!     Ok::<_, StoreError>(())
//! })?;
//! # Ok::<(), StoreError>(())
//! ```
//!
//! # Blocking
//! Both backends are blocking (rusqlite; the synchronous `postgres` client). From async code call
//! them inside `tokio::task::spawn_blocking` (the server runs them on its own worker threads).
//!
//! # Concurrency
//! SQLite: one file in WAL mode, `BEGIN IMMEDIATE` for write transactions and a busy timeout, so
//! several processes can share it. PostgreSQL: each mapping operation takes a transaction-scoped
//! advisory lock on its VNI, so concurrent operations on one VNI (from any number of control
//! plane instances) see each other's hosts; reads need no locks.

mod pool;
pub mod postgres;
pub mod sqlite;

#[cfg(test)]
mod suite;

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use thiserror::Error;

use crate::svp::{LogId, LogRecord, Mac};

pub use self::postgres::PgStore;
pub use self::sqlite::SqliteStore;

/// A compute node (host) id: a UUID, 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CnUuid(pub [u8; 16]);

impl fmt::Display for CnUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&LogId(self.0), f)
    }
}

impl fmt::Debug for CnUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CnUuid({self})")
    }
}

impl FromStr for CnUuid {
    type Err = crate::svp::ParseIdError;
    fn from_str(s: &str) -> Result<CnUuid, Self::Err> {
        s.parse::<LogId>().map(|id| CnUuid(id.0))
    }
}

/// An overlay mapping: the NIC with `mac` owns `ip` on `vnet_id` and lives on host `cn_uuid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayMapping {
    /// The virtual network (VNI, 24 bits in practice).
    pub vnet_id: u32,
    /// The overlay IP.
    pub ip: IpAddr,
    /// The NIC's MAC.
    pub mac: Mac,
    /// The host the NIC is on.
    pub cn_uuid: CnUuid,
    /// The VLAN carried in VL3 events (0 when untagged).
    pub vlan: u16,
}

/// An overlay mapping as stored: with its tombstone flag and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredMapping {
    /// The mapping.
    pub mapping: OverlayMapping,
    /// Tombstoned (deleted) mappings are kept so stale events can be told apart.
    pub deleted: bool,
    /// Bumped on every write of this key, starting at 1.
    pub version: u64,
}

/// Where a host receives VXLAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnderlayMapping {
    /// The host.
    pub cn_uuid: CnUuid,
    /// Its underlay IP.
    pub ip: IpAddr,
    /// Its VXLAN UDP port (4789).
    pub port: u16,
}

/// The body of a log event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Forget `mac` on `vnet_id` (sent as an SVP VL2 log record).
    Vl2 {
        /// The MAC.
        mac: Mac,
        /// The VNI.
        vnet_id: u32,
    },
    /// Re-resolve `ip` on `vnet_id` (sent as an SVP VL3 log record; the MAC is kept for
    /// operators, the wire record has none).
    Vl3 {
        /// The IP.
        ip: IpAddr,
        /// The MAC that owns it now.
        mac: Mac,
        /// VLAN for the gratuitous ARP.
        vlan: u16,
        /// The VNI.
        vnet_id: u32,
    },
}

/// One event in a host's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntry {
    /// Random id (a v4 UUID), what LOG_RM names.
    pub id: LogId,
    /// The host whose log this is.
    pub cn_uuid: CnUuid,
    /// What happened.
    pub event: Event,
}

impl LogEntry {
    /// The SVP wire record for this entry.
    pub fn to_record(&self) -> LogRecord {
        match self.event {
            Event::Vl2 { mac, vnet_id } => LogRecord::Vl2 {
                id: self.id,
                mac,
                vnet_id,
            },
            Event::Vl3 {
                ip, vlan, vnet_id, ..
            } => LogRecord::Vl3 {
                id: self.id,
                ip: crate::svp::to_wire_ip(ip),
                vlan,
                vnet_id,
            },
        }
    }
}

/// One lookup in a batch given to [`Store::lookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Where is `mac` on `vnet_id`?
    Vl2 {
        /// The VNI.
        vnet_id: u32,
        /// The MAC.
        mac: Mac,
    },
    /// Who has `ip` on `vnet_id`?
    Vl3 {
        /// The VNI.
        vnet_id: u32,
        /// The IP.
        ip: IpAddr,
    },
}

/// A found lookup: the owning MAC (for VL2 lookups, the MAC asked for) and the host's underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// The MAC.
    pub mac: Mac,
    /// Underlay IP of the host.
    pub ip: IpAddr,
    /// Underlay port of the host.
    pub port: u16,
}

/// Failures of the store. Messages say what was wrong and what was expected.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The store URL is not one we understand.
    #[error("invalid store URL {0:?}: expected sqlite:PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE")]
    BadUrl(String),
    /// SQLite failed.
    #[error("SQLite store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed.
    #[error("PostgreSQL store: {}", pg_detail(.0))]
    Postgres(#[from] ::postgres::Error),
    /// A stored value cannot be what this code wrote.
    #[error("corrupt {what} in the store: {detail}")]
    Corrupt {
        /// Which field.
        what: &'static str,
        /// What was found.
        detail: String,
    },
    /// A move named a mapping that is not live.
    #[error(
        "no live overlay mapping for {ip} on vnet {vnet_id}: expected an existing mapping to move"
    )]
    NoSuchMapping {
        /// The VNI.
        vnet_id: u32,
        /// The IP.
        ip: IpAddr,
    },
    /// LOG_REQ from an underlay IP no host has.
    #[error("no host has underlay IP {0}: expected the IP of a registered underlay mapping")]
    UnknownUnderlayIp(IpAddr),
    /// LOG_REQ from an underlay IP several hosts share.
    #[error("{count} hosts share underlay IP {ip}: expected exactly one")]
    AmbiguousUnderlayIp {
        /// The IP.
        ip: IpAddr,
        /// How many hosts have it.
        count: usize,
    },
    /// The OS random source failed (event ids).
    #[error("cannot generate a random event id: {0}")]
    Random(getrandom::Error),
    /// A database schema newer than this code.
    #[error(
        "store schema version {found} is newer than this portolan (expected at most {expected})"
    )]
    SchemaTooNew {
        /// Found in the database.
        found: i64,
        /// What this code writes.
        expected: i64,
    },
}

/// The server's own message for database errors (the client's Display only says "db error").
fn pg_detail(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}: {})", e, db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Whether a transaction closure asked to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Commit the transaction.
    Commit,
    /// Roll it back.
    Rollback,
}

/// The backend connection inside an open transaction (see the module docs).
pub enum RawTxn<'a> {
    /// SQLite: a connection inside `BEGIN IMMEDIATE`.
    Sqlite(&'a rusqlite::Connection),
    /// PostgreSQL: a client inside `BEGIN`.
    Postgres(&'a mut ::postgres::Client),
}

/// The mapping store. Both backends implement it; see the module docs.
pub trait Store: Send + Sync {
    /// Answers a batch of lookups in one read snapshot; one result per lookup, in order.
    /// A mapping is found only if it is live and its host has an underlay mapping.
    fn lookup(&self, lookups: &[Lookup]) -> Result<Vec<Option<Found>>, StoreError>;

    /// Reads up to `limit` entries of the log of the host whose underlay IP is
    /// `underlay_ip`, oldest first. Unknown or shared IPs are errors.
    fn read_log(&self, underlay_ip: IpAddr, limit: usize) -> Result<Vec<LogEntry>, StoreError>;

    /// Deletes log entries by id; unknown ids are ignored. Returns how many were deleted.
    fn remove_log(&self, ids: &[LogId]) -> Result<u64, StoreError>;

    /// Deletes log entries by id, but only those in the log of the host whose underlay IP is
    /// `underlay_ip` (LOG_RM from a host that may trim only its own log): ids of other hosts'
    /// logs and unknown ids are left alone. Unknown or shared IPs are errors, as for
    /// [`read_log`](Self::read_log). Returns how many were deleted.
    fn remove_log_of(&self, underlay_ip: IpAddr, ids: &[LogId]) -> Result<u64, StoreError>;

    /// Runs `f` in a write transaction; commits if it returns [`Outcome::Commit`]. Prefer
    /// [`with_txn`], which carries a result and an error type of the caller's choice.
    fn run_txn(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Outcome) -> Result<Outcome, StoreError>;

    /// Runs `f` in a read-only transaction on the backend connection (one consistent snapshot
    /// for the caller's own queries; takes no write lock). Prefer [`with_read`].
    fn run_read(&self, f: &mut dyn FnMut(RawTxn<'_>)) -> Result<(), StoreError>;

    /// A short name for logs ("sqlite:/path", "postgres://host/db").
    fn describe(&self) -> String;

    /// VL2 lookup of one MAC.
    fn vl2(&self, vnet_id: u32, mac: Mac) -> Result<Option<Found>, StoreError> {
        Ok(self
            .lookup(&[Lookup::Vl2 { vnet_id, mac }])?
            .into_iter()
            .next()
            .flatten())
    }

    /// VL3 lookup of one IP.
    fn vl3(&self, vnet_id: u32, ip: IpAddr) -> Result<Option<Found>, StoreError> {
        Ok(self
            .lookup(&[Lookup::Vl3 { vnet_id, ip }])?
            .into_iter()
            .next()
            .flatten())
    }
}

/// Runs `f` inside a write transaction of `store`: commit on `Ok`, roll back on `Err`.
/// `E` is the caller's error type; store errors convert into it.
pub fn with_txn<R, E, F>(store: &dyn Store, f: F) -> Result<R, E>
where
    E: From<StoreError>,
    F: FnOnce(&mut dyn Txn) -> Result<R, E>,
{
    let mut f = Some(f);
    let mut result: Option<Result<R, E>> = None;
    store.run_txn(&mut |tx| {
        let Some(f) = f.take() else {
            return Outcome::Rollback;
        };
        let r = f(tx);
        let outcome = if r.is_ok() {
            Outcome::Commit
        } else {
            Outcome::Rollback
        };
        result = Some(r);
        outcome
    })?;
    match result {
        Some(r) => r,
        // run_txn always calls the closure once when it returns Ok.
        None => Err(E::from(StoreError::Corrupt {
            what: "transaction",
            detail: "the transaction closure was never run".into(),
        })),
    }
}

/// Runs `f` inside a read-only transaction of `store` with the raw backend connection: the
/// control plane's own reads (listing NICs, say) without taking SQLite's write lock.
pub fn with_read<R, E, F>(store: &dyn Store, f: F) -> Result<R, E>
where
    E: From<StoreError>,
    F: FnOnce(RawTxn<'_>) -> Result<R, E>,
{
    let mut f = Some(f);
    let mut result: Option<Result<R, E>> = None;
    store.run_read(&mut |raw| {
        if let Some(f) = f.take() {
            result = Some(f(raw));
        }
    })?;
    result.unwrap_or_else(|| {
        Err(E::from(StoreError::Corrupt {
            what: "transaction",
            detail: "the read closure was never run".into(),
        }))
    })
}

/// Operations inside a write transaction. Backends implement the primitives; the mapping
/// operations are provided on top of them so both backends share their semantics.
pub trait Txn {
    /// The backend connection inside this transaction (see the module docs).
    fn raw(&mut self) -> RawTxn<'_>;

    /// The stored mapping for `(vnet_id, ip)`, tombstoned or not.
    fn mapping(&mut self, vnet_id: u32, ip: IpAddr) -> Result<Option<StoredMapping>, StoreError>;

    /// Writes `(vnet_id, ip)` live or tombstoned, bumping its version. Writes no events.
    fn write_mapping(&mut self, m: &OverlayMapping, deleted: bool) -> Result<u64, StoreError>;

    /// Hosts with at least one live mapping on `vnet_id`.
    fn vnet_hosts(&mut self, vnet_id: u32) -> Result<Vec<CnUuid>, StoreError>;

    /// Appends `event` to `cn_uuid`'s log; returns the new entry's id.
    fn append_event(&mut self, cn_uuid: CnUuid, event: &Event) -> Result<LogId, StoreError>;

    /// Serialises mapping operations on one VNI across connections (PostgreSQL advisory lock;
    /// a no-op on SQLite, whose write transactions are already exclusive).
    fn lock_vnet(&mut self, vnet_id: u32) -> Result<(), StoreError>;

    /// The host's underlay mapping.
    fn underlay(&mut self, cn_uuid: CnUuid) -> Result<Option<UnderlayMapping>, StoreError>;

    /// Creates or replaces a host's underlay mapping.
    fn put_underlay(&mut self, u: &UnderlayMapping) -> Result<(), StoreError>;

    /// Removes a host's underlay mapping; returns whether there was one.
    fn remove_underlay(&mut self, cn_uuid: CnUuid) -> Result<bool, StoreError>;

    /// A NIC appeared: writes the mapping live, and a VL3 event for every host on the VNI.
    /// Returns the event ids.
    fn create_mapping(&mut self, m: &OverlayMapping) -> Result<Vec<LogId>, StoreError> {
        self.lock_vnet(m.vnet_id)?;
        let before = self.vnet_hosts(m.vnet_id)?;
        self.write_mapping(m, false)?;
        let after = self.vnet_hosts(m.vnet_id)?;
        let event = Event::Vl3 {
            ip: m.ip,
            mac: m.mac,
            vlan: m.vlan,
            vnet_id: m.vnet_id,
        };
        notify(self, union(&before, &after), &[event])
    }

    /// A NIC moved host, or its IP or MAC changed: tombstones `(from_vnet, from_ip)` if `to`
    /// has another key, writes `to` live, a VL2 event for the old MAC and a VL3 event for the
    /// new IP to every host on the VNI(s). The old mapping must be live.
    fn move_mapping(
        &mut self,
        from_vnet: u32,
        from_ip: IpAddr,
        to: &OverlayMapping,
    ) -> Result<Vec<LogId>, StoreError> {
        let (a, b) = (from_vnet.min(to.vnet_id), from_vnet.max(to.vnet_id));
        self.lock_vnet(a)?;
        if b != a {
            self.lock_vnet(b)?;
        }
        let old = match self.mapping(from_vnet, from_ip)? {
            Some(s) if !s.deleted => s.mapping,
            _ => {
                return Err(StoreError::NoSuchMapping {
                    vnet_id: from_vnet,
                    ip: from_ip,
                })
            }
        };
        let mut hosts = self.vnet_hosts(from_vnet)?;
        hosts.extend(self.vnet_hosts(to.vnet_id)?);
        let same_key = from_vnet == to.vnet_id
            && crate::svp::to_wire_ip(from_ip) == crate::svp::to_wire_ip(to.ip);
        if !same_key {
            self.write_mapping(&old, true)?;
        }
        self.write_mapping(to, false)?;
        hosts.extend(self.vnet_hosts(from_vnet)?);
        hosts.extend(self.vnet_hosts(to.vnet_id)?);
        let vl2 = Event::Vl2 {
            mac: old.mac,
            vnet_id: old.vnet_id,
        };
        let vl3 = Event::Vl3 {
            ip: to.ip,
            mac: to.mac,
            vlan: to.vlan,
            vnet_id: to.vnet_id,
        };
        notify(self, union(&hosts, &[]), &[vl2, vl3])
    }

    /// A NIC went away: tombstones `(vnet_id, ip)` and writes a VL2 event for its MAC to every
    /// host on the VNI. Returns the removed mapping, or `None` (and writes nothing) if there was
    /// no live one.
    fn delete_mapping(
        &mut self,
        vnet_id: u32,
        ip: IpAddr,
    ) -> Result<Option<OverlayMapping>, StoreError> {
        self.lock_vnet(vnet_id)?;
        let old = match self.mapping(vnet_id, ip)? {
            Some(s) if !s.deleted => s.mapping,
            _ => return Ok(None),
        };
        let before = self.vnet_hosts(vnet_id)?;
        self.write_mapping(&old, true)?;
        let event = Event::Vl2 {
            mac: old.mac,
            vnet_id,
        };
        notify(self, union(&before, &[]), &[event])?;
        Ok(Some(old))
    }
}

fn union(a: &[CnUuid], b: &[CnUuid]) -> Vec<CnUuid> {
    a.iter()
        .chain(b)
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn notify<T: Txn + ?Sized>(
    tx: &mut T,
    hosts: Vec<CnUuid>,
    events: &[Event],
) -> Result<Vec<LogId>, StoreError> {
    let mut ids = Vec::with_capacity(hosts.len() * events.len());
    for cn in hosts {
        for e in events {
            ids.push(tx.append_event(cn, e)?);
        }
    }
    Ok(ids)
}

/// Opens a store from a URL: `sqlite:PATH` (also `sqlite://PATH`) or `postgres://…` /
/// `postgresql://…`, creating the schema if needed.
pub fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        if path.is_empty() {
            return Err(StoreError::BadUrl(url.to_string()));
        }
        return Ok(Arc::new(SqliteStore::open(path)?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PgStore::open(url, postgres::DEFAULT_POOL_SIZE)?));
    }
    Err(StoreError::BadUrl(url.to_string()))
}

/// 16-byte form of an IP (IPv4 mapped).
pub(crate) fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    crate::svp::to_wire_ip(ip).octets()
}

/// IP from its stored 16-byte form.
pub(crate) fn ip_from_bytes(b: &[u8]) -> Result<IpAddr, StoreError> {
    let a: [u8; 16] = b.try_into().map_err(|_| StoreError::Corrupt {
        what: "IP address",
        detail: format!("{} bytes, expected 16", b.len()),
    })?;
    Ok(crate::svp::from_wire_ip(std::net::Ipv6Addr::from(a)))
}

pub(crate) fn uuid_from_bytes(b: &[u8]) -> Result<CnUuid, StoreError> {
    let a: [u8; 16] = b.try_into().map_err(|_| StoreError::Corrupt {
        what: "UUID",
        detail: format!("{} bytes, expected 16", b.len()),
    })?;
    Ok(CnUuid(a))
}

pub(crate) fn log_id_from_bytes(b: &[u8]) -> Result<LogId, StoreError> {
    uuid_from_bytes(b).map(|u| LogId(u.0))
}

pub(crate) fn mac_from_i64(v: i64) -> Result<Mac, StoreError> {
    u64::try_from(v)
        .ok()
        .and_then(Mac::from_u64)
        .ok_or_else(|| StoreError::Corrupt {
            what: "MAC",
            detail: format!("{v} is not a 48-bit value"),
        })
}

pub(crate) fn mac_to_i64(m: Mac) -> i64 {
    // 48 bits always fit in an i64.
    i64::try_from(m.to_u64()).unwrap_or(i64::MAX)
}

pub(crate) fn u32_from_i64(what: &'static str, v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt {
        what,
        detail: format!("{v} does not fit 32 bits"),
    })
}

pub(crate) fn u16_from_i64(what: &'static str, v: i64) -> Result<u16, StoreError> {
    u16::try_from(v).map_err(|_| StoreError::Corrupt {
        what,
        detail: format!("{v} does not fit 16 bits"),
    })
}

/// Event kind column values.
pub(crate) const KIND_VL2: i64 = 1;
pub(crate) const KIND_VL3: i64 = 2;

/// Schema version written by this code.
pub(crate) const SCHEMA_VERSION: i64 = 1;

/// Builds an [`Event`] from its stored columns.
pub(crate) fn event_from_columns(
    kind: i64,
    vnet_id: i64,
    mac: i64,
    ip: Option<&[u8]>,
    vlan: i64,
) -> Result<Event, StoreError> {
    let vnet_id = u32_from_i64("vnet_id", vnet_id)?;
    let mac = mac_from_i64(mac)?;
    match kind {
        KIND_VL2 => Ok(Event::Vl2 { mac, vnet_id }),
        KIND_VL3 => {
            let ip = ip.ok_or_else(|| StoreError::Corrupt {
                what: "VL3 event",
                detail: "no IP".into(),
            })?;
            Ok(Event::Vl3 {
                ip: ip_from_bytes(ip)?,
                mac,
                vlan: u16_from_i64("vlan", vlan)?,
                vnet_id,
            })
        }
        k => Err(StoreError::Corrupt {
            what: "event kind",
            detail: format!("{k}, expected 1 (VL2) or 2 (VL3)"),
        }),
    }
}

/// The stored columns of an [`Event`]: (kind, vnet_id, mac, ip, vlan).
pub(crate) fn event_columns(e: &Event) -> (i64, i64, i64, Option<[u8; 16]>, i64) {
    match *e {
        Event::Vl2 { mac, vnet_id } => (KIND_VL2, i64::from(vnet_id), mac_to_i64(mac), None, 0),
        Event::Vl3 {
            ip,
            mac,
            vlan,
            vnet_id,
        } => (
            KIND_VL3,
            i64::from(vnet_id),
            mac_to_i64(mac),
            Some(ip_bytes(ip)),
            i64::from(vlan),
        ),
    }
}
