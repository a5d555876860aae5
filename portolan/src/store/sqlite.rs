//! SQLite backend: one file, WAL journal, `BEGIN IMMEDIATE` writers and a busy timeout, so
//! several processes (Portolan servers, the control plane) can share the file on one machine.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::pool::{Pool, Pooled};
use super::{
    event_columns, event_from_columns, ip_bytes, ip_from_bytes, log_id_from_bytes, mac_from_i64,
    mac_to_i64, u16_from_i64, uuid_from_bytes, CnUuid, Event, Found, LogEntry, Lookup, Outcome,
    OverlayMapping, RawTxn, Store, StoreError, StoredMapping, Txn, UnderlayMapping, SCHEMA_VERSION,
};
use crate::svp::LogId;

/// How long a writer waits for another process's write transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections per store: readers run concurrently in WAL mode.
const POOL_SIZE: usize = 8;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS portolan_meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS portolan_overlay (
    vnet_id INTEGER NOT NULL,
    ip      BLOB    NOT NULL,
    mac     INTEGER NOT NULL,
    cn_uuid BLOB    NOT NULL,
    vlan    INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    version INTEGER NOT NULL,
    mtime   INTEGER NOT NULL,
    PRIMARY KEY (vnet_id, ip)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS portolan_overlay_by_mac ON portolan_overlay (vnet_id, mac);
CREATE INDEX IF NOT EXISTS portolan_overlay_by_cn ON portolan_overlay (vnet_id, cn_uuid);
-- Covers vnet_hosts (run twice per mapping operation): the live hosts of a VNI come from the
-- index alone instead of reading every mapping row on the VNI.
CREATE INDEX IF NOT EXISTS portolan_overlay_live_hosts ON portolan_overlay (vnet_id, cn_uuid) WHERE deleted = 0;
CREATE TABLE IF NOT EXISTS portolan_underlay (
    cn_uuid BLOB PRIMARY KEY,
    ip      BLOB    NOT NULL,
    port    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS portolan_underlay_by_ip ON portolan_underlay (ip);
CREATE TABLE IF NOT EXISTS portolan_events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    id      BLOB    NOT NULL UNIQUE,
    cn_uuid BLOB    NOT NULL,
    vnet_id INTEGER NOT NULL,
    kind    INTEGER NOT NULL,
    mac     INTEGER NOT NULL,
    ip      BLOB,
    vlan    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS portolan_events_by_cn ON portolan_events (cn_uuid, seq);
";

const VL3_SQL: &str = "SELECT o.mac, u.ip, u.port FROM portolan_overlay o \
     JOIN portolan_underlay u ON u.cn_uuid = o.cn_uuid \
     WHERE o.vnet_id = ?1 AND o.ip = ?2 AND o.deleted = 0";
const VL2_SQL: &str = "SELECT o.mac, u.ip, u.port FROM \
     (SELECT mac, cn_uuid FROM portolan_overlay WHERE vnet_id = ?1 AND mac = ?2 AND deleted = 0 \
      ORDER BY mtime DESC, version DESC LIMIT 1) o \
     JOIN portolan_underlay u ON u.cn_uuid = o.cn_uuid";

/// The SQLite store.
pub struct SqliteStore {
    path: PathBuf,
    pool: Pool<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and its schema.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = connect(&path)?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = (|| {
            conn.execute_batch(SCHEMA)?;
            let found: Option<i64> = conn
                .query_row(
                    "SELECT value FROM portolan_meta WHERE key = 'schema_version'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            match found {
                Some(v) if v > SCHEMA_VERSION => Err(StoreError::SchemaTooNew {
                    found: v,
                    expected: SCHEMA_VERSION,
                }),
                Some(_) => Ok(()),
                None => {
                    conn.execute(
                        "INSERT INTO portolan_meta (key, value) VALUES ('schema_version', ?1)",
                        [SCHEMA_VERSION],
                    )?;
                    Ok(())
                }
            }
        })();
        match r {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
        let pool = Pool::new(POOL_SIZE);
        // Seed the pool with the connection we already have.
        drop(pool.get(|| Ok::<_, StoreError>(conn))?);
        Ok(SqliteStore { path, pool })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> Result<Pooled<'_, Connection>, StoreError> {
        self.pool.get(|| connect(&self.path))
    }
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers never block the writer and vice versa; NORMAL sync is durable across
    // application crashes (a power loss may lose the last transactions, never corrupt).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn found_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, Vec<u8>, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

fn to_found((mac, ip, port): (i64, Vec<u8>, i64)) -> Result<Found, StoreError> {
    Ok(Found {
        mac: mac_from_i64(mac)?,
        ip: ip_from_bytes(&ip)?,
        port: u16_from_i64("underlay port", port)?,
    })
}

/// The one host whose underlay IP is `ip` (LOG_REQ, LOG_RM of one host's log).
fn host_by_ip(conn: &Connection, ip: IpAddr) -> Result<CnUuid, StoreError> {
    let hosts: Vec<Vec<u8>> = conn
        .prepare_cached("SELECT cn_uuid FROM portolan_underlay WHERE ip = ?1 LIMIT 2")?
        .query_map([&ip_bytes(ip)[..]], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    match hosts.as_slice() {
        [] => Err(StoreError::UnknownUnderlayIp(ip)),
        [one] => uuid_from_bytes(one),
        _ => Err(StoreError::AmbiguousUnderlayIp {
            ip,
            count: hosts.len(),
        }),
    }
}

fn lookup_one(conn: &Connection, l: &Lookup) -> Result<Option<Found>, StoreError> {
    let row = match *l {
        Lookup::Vl3 { vnet_id, ip } => conn
            .prepare_cached(VL3_SQL)?
            .query_row(params![vnet_id, &ip_bytes(ip)[..]], found_row)
            .optional()?,
        Lookup::Vl2 { vnet_id, mac } => conn
            .prepare_cached(VL2_SQL)?
            .query_row(params![vnet_id, mac_to_i64(mac)], found_row)
            .optional()?,
    };
    row.map(to_found).transpose()
}

/// Rolls back a transaction left open by an early return or a panic.
struct TxnGuard<'a> {
    conn: &'a Connection,
    armed: bool,
}

impl Drop for TxnGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

impl Store for SqliteStore {
    fn lookup(&self, lookups: &[Lookup]) -> Result<Vec<Option<Found>>, StoreError> {
        let conn = self.conn()?;
        if let [one] = lookups {
            return Ok(vec![lookup_one(&conn, one)?]);
        }
        // One read transaction for the batch: one snapshot, one lock acquisition.
        conn.prepare_cached("BEGIN")?.execute([])?;
        let mut guard = TxnGuard {
            conn: &conn,
            armed: true,
        };
        let out = lookups
            .iter()
            .map(|l| lookup_one(&conn, l))
            .collect::<Result<Vec<_>, _>>()?;
        guard.armed = false;
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(out)
    }

    fn read_log(&self, underlay_ip: IpAddr, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        let conn = self.conn()?;
        conn.prepare_cached("BEGIN")?.execute([])?;
        let mut guard = TxnGuard {
            conn: &conn,
            armed: true,
        };
        let cn = host_by_ip(&conn, underlay_ip)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = conn.prepare_cached(
            "SELECT id, vnet_id, kind, mac, ip, vlan FROM portolan_events \
             WHERE cn_uuid = ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![&cn.0[..], limit], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, vnet_id, kind, mac, ip, vlan) = row?;
            out.push(LogEntry {
                id: log_id_from_bytes(&id)?,
                cn_uuid: cn,
                event: event_from_columns(kind, vnet_id, mac, ip.as_deref(), vlan)?,
            });
        }
        drop(stmt);
        guard.armed = false;
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(out)
    }

    fn remove_log(&self, ids: &[LogId]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let conn = self.conn()?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut guard = TxnGuard {
            conn: &conn,
            armed: true,
        };
        let mut n = 0u64;
        {
            let mut stmt = conn.prepare_cached("DELETE FROM portolan_events WHERE id = ?1")?;
            for id in ids {
                n += stmt.execute([&id.0[..]])? as u64;
            }
        }
        guard.armed = false;
        conn.execute_batch("COMMIT")?;
        Ok(n)
    }

    fn remove_log_of(&self, underlay_ip: IpAddr, ids: &[LogId]) -> Result<u64, StoreError> {
        let conn = self.conn()?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut guard = TxnGuard {
            conn: &conn,
            armed: true,
        };
        let cn = host_by_ip(&conn, underlay_ip)?;
        let mut n = 0u64;
        {
            let mut stmt =
                conn.prepare_cached("DELETE FROM portolan_events WHERE id = ?1 AND cn_uuid = ?2")?;
            for id in ids {
                n += stmt.execute([&id.0[..], &cn.0[..]])? as u64;
            }
        }
        guard.armed = false;
        conn.execute_batch("COMMIT")?;
        Ok(n)
    }

    fn run_txn(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Outcome) -> Result<Outcome, StoreError> {
        let conn = self.conn()?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut guard = TxnGuard {
            conn: &conn,
            armed: true,
        };
        let outcome = f(&mut SqliteTxn { conn: &conn });
        guard.armed = false;
        match outcome {
            Outcome::Commit => {
                if let Err(e) = conn.execute_batch("COMMIT") {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(e.into());
                }
            }
            Outcome::Rollback => conn.execute_batch("ROLLBACK")?,
        }
        Ok(outcome)
    }

    fn run_read(&self, f: &mut dyn FnMut(RawTxn<'_>)) -> Result<(), StoreError> {
        let conn = self.conn()?;
        conn.execute_batch("BEGIN")?;
        let mut guard = TxnGuard {
            conn: &conn,
            armed: true,
        };
        f(RawTxn::Sqlite(&conn));
        guard.armed = false;
        // Nothing to keep: a read transaction ends the same either way.
        conn.execute_batch("ROLLBACK")?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }
}

/// A write transaction on SQLite.
struct SqliteTxn<'a> {
    conn: &'a Connection,
}

impl Txn for SqliteTxn<'_> {
    fn raw(&mut self) -> RawTxn<'_> {
        RawTxn::Sqlite(self.conn)
    }

    fn mapping(&mut self, vnet_id: u32, ip: IpAddr) -> Result<Option<StoredMapping>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT mac, cn_uuid, vlan, deleted, version FROM portolan_overlay \
                 WHERE vnet_id = ?1 AND ip = ?2",
            )?
            .query_row(params![vnet_id, &ip_bytes(ip)[..]], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, bool>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .optional()?;
        let Some((mac, cn, vlan, deleted, version)) = row else {
            return Ok(None);
        };
        Ok(Some(StoredMapping {
            mapping: OverlayMapping {
                vnet_id,
                ip: crate::svp::from_wire_ip(crate::svp::to_wire_ip(ip)),
                mac: mac_from_i64(mac)?,
                cn_uuid: uuid_from_bytes(&cn)?,
                vlan: u16_from_i64("vlan", vlan)?,
            },
            deleted,
            version: u64::try_from(version).unwrap_or(0),
        }))
    }

    fn write_mapping(&mut self, m: &OverlayMapping, deleted: bool) -> Result<u64, StoreError> {
        let version: i64 = self
            .conn
            .prepare_cached(
                "INSERT INTO portolan_overlay \
                   (vnet_id, ip, mac, cn_uuid, vlan, deleted, version, mtime) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7) \
                 ON CONFLICT (vnet_id, ip) DO UPDATE SET \
                   mac = excluded.mac, cn_uuid = excluded.cn_uuid, vlan = excluded.vlan, \
                   deleted = excluded.deleted, version = portolan_overlay.version + 1, \
                   mtime = excluded.mtime \
                 RETURNING version",
            )?
            .query_row(
                params![
                    m.vnet_id,
                    &ip_bytes(m.ip)[..],
                    mac_to_i64(m.mac),
                    &m.cn_uuid.0[..],
                    m.vlan,
                    deleted,
                    now_us()
                ],
                |r| r.get(0),
            )?;
        Ok(u64::try_from(version).unwrap_or(0))
    }

    fn vnet_hosts(&mut self, vnet_id: u32) -> Result<Vec<CnUuid>, StoreError> {
        let rows: Vec<Vec<u8>> = self
            .conn
            .prepare_cached(
                "SELECT DISTINCT cn_uuid FROM portolan_overlay \
                 WHERE vnet_id = ?1 AND deleted = 0 ORDER BY cn_uuid",
            )?
            .query_map([vnet_id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        rows.iter().map(|b| uuid_from_bytes(b)).collect()
    }

    fn append_event(&mut self, cn_uuid: CnUuid, event: &Event) -> Result<LogId, StoreError> {
        let id = LogId::random().map_err(StoreError::Random)?;
        let (kind, vnet_id, mac, ip, vlan) = event_columns(event);
        self.conn
            .prepare_cached(
                "INSERT INTO portolan_events (id, cn_uuid, vnet_id, kind, mac, ip, vlan) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                &id.0[..],
                &cn_uuid.0[..],
                vnet_id,
                kind,
                mac,
                ip.as_ref().map(|b| &b[..]),
                vlan
            ])?;
        Ok(id)
    }

    fn lock_vnet(&mut self, _vnet_id: u32) -> Result<(), StoreError> {
        // BEGIN IMMEDIATE already holds the database's single write lock.
        Ok(())
    }

    fn underlay(&mut self, cn_uuid: CnUuid) -> Result<Option<UnderlayMapping>, StoreError> {
        let row = self
            .conn
            .prepare_cached("SELECT ip, port FROM portolan_underlay WHERE cn_uuid = ?1")?
            .query_row([&cn_uuid.0[..]], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
            })
            .optional()?;
        row.map(|(ip, port)| {
            Ok(UnderlayMapping {
                cn_uuid,
                ip: ip_from_bytes(&ip)?,
                port: u16_from_i64("underlay port", port)?,
            })
        })
        .transpose()
    }

    fn put_underlay(&mut self, u: &UnderlayMapping) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO portolan_underlay (cn_uuid, ip, port) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (cn_uuid) DO UPDATE SET ip = excluded.ip, port = excluded.port",
            )?
            .execute(params![&u.cn_uuid.0[..], &ip_bytes(u.ip)[..], u.port])?;
        Ok(())
    }

    fn remove_underlay(&mut self, cn_uuid: CnUuid) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached("DELETE FROM portolan_underlay WHERE cn_uuid = ?1")?
            .execute([&cn_uuid.0[..]])?;
        Ok(n > 0)
    }
}
