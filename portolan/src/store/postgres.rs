//! PostgreSQL backend: the shared store. Any number of Portolan servers and control-plane
//! instances can use one database; mapping operations serialise per VNI with a
//! transaction-scoped advisory lock, and readers take no locks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use postgres::{Client, NoTls, Statement};

use super::pool::{Pool, Pooled};
use super::{
    event_columns, event_from_columns, ip_bytes, ip_from_bytes, log_id_from_bytes, mac_from_i64,
    mac_to_i64, u16_from_i64, uuid_from_bytes, CnUuid, Event, Found, LogEntry, Lookup, Outcome,
    OverlayMapping, RawTxn, Store, StoreError, StoredMapping, Txn, UnderlayMapping, SCHEMA_VERSION,
};
use crate::svp::LogId;

/// Connections per store when opened through [`super::open`].
pub const DEFAULT_POOL_SIZE: usize = 16;

/// Advisory lock key taken while creating the schema (ASCII "portolan").
const SCHEMA_LOCK: i64 = 0x706f_7274_6f6c_616e;
/// High bits of the per-VNI advisory lock keys ("PO" then the 32-bit VNI).
const VNET_LOCK_BASE: i64 = 0x504f_0000_0000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS portolan_meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS portolan_overlay (
    vnet_id BIGINT  NOT NULL,
    ip      BYTEA   NOT NULL,
    mac     BIGINT  NOT NULL,
    cn_uuid BYTEA   NOT NULL,
    vlan    BIGINT  NOT NULL,
    deleted BOOLEAN NOT NULL,
    version BIGINT  NOT NULL,
    mtime   BIGINT  NOT NULL,
    PRIMARY KEY (vnet_id, ip)
);
CREATE INDEX IF NOT EXISTS portolan_overlay_by_mac ON portolan_overlay (vnet_id, mac);
CREATE INDEX IF NOT EXISTS portolan_overlay_by_cn ON portolan_overlay (vnet_id, cn_uuid);
-- Covers vnet_hosts (run twice per mapping operation): the live hosts of a VNI come from the
-- index alone instead of reading every mapping row on the VNI.
CREATE INDEX IF NOT EXISTS portolan_overlay_live_hosts ON portolan_overlay (vnet_id, cn_uuid) WHERE NOT deleted;
CREATE TABLE IF NOT EXISTS portolan_underlay (
    cn_uuid BYTEA  PRIMARY KEY,
    ip      BYTEA  NOT NULL,
    port    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS portolan_underlay_by_ip ON portolan_underlay (ip);
CREATE TABLE IF NOT EXISTS portolan_events (
    seq     BIGSERIAL PRIMARY KEY,
    id      BYTEA  NOT NULL UNIQUE,
    cn_uuid BYTEA  NOT NULL,
    vnet_id BIGINT NOT NULL,
    kind    BIGINT NOT NULL,
    mac     BIGINT NOT NULL,
    ip      BYTEA,
    vlan    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS portolan_events_by_cn ON portolan_events (cn_uuid, seq);
";

/// VL3 lookups of a batch: `$1` VNIs and `$2` IPs, answered with their 1-based position.
const VL3_BATCH_SQL: &str = "SELECT o.mac, u.ip, u.port, q.ord \
     FROM unnest($1::bigint[], $2::bytea[]) WITH ORDINALITY AS q(vnet_id, ip, ord) \
     JOIN portolan_overlay o ON o.vnet_id = q.vnet_id AND o.ip = q.ip AND NOT o.deleted \
     JOIN portolan_underlay u ON u.cn_uuid = o.cn_uuid";
/// VL2 lookups of a batch: `$1` VNIs and `$2` MACs; the most recently written live mapping of
/// a MAC wins, as in Portolan.
const VL2_BATCH_SQL: &str = "SELECT o.mac, u.ip, u.port, q.ord \
     FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS q(vnet_id, mac, ord) \
     CROSS JOIN LATERAL (SELECT mac, cn_uuid FROM portolan_overlay \
        WHERE vnet_id = q.vnet_id AND mac = q.mac AND NOT deleted \
        ORDER BY mtime DESC, version DESC LIMIT 1) o \
     JOIN portolan_underlay u ON u.cn_uuid = o.cn_uuid";
const HOST_BY_IP_SQL: &str = "SELECT cn_uuid FROM portolan_underlay WHERE ip = $1 LIMIT 2";
const LOG_SQL: &str = "SELECT id, vnet_id, kind, mac, ip, vlan FROM portolan_events \
     WHERE cn_uuid = $1 ORDER BY seq LIMIT $2";
const LOG_RM_SQL: &str = "DELETE FROM portolan_events WHERE id = ANY($1)";
const LOG_RM_OF_SQL: &str = "DELETE FROM portolan_events WHERE id = ANY($1) AND cn_uuid = $2";

/// The one host whose underlay IP is `ip` (LOG_REQ, LOG_RM of one host's log).
fn host_by_ip(c: &mut PgConn, by_ip: &Statement, ip: IpAddr) -> Result<CnUuid, StoreError> {
    let hosts = c.client.query(by_ip, &[&&ip_bytes(ip)[..]])?;
    match hosts.as_slice() {
        [] => Err(StoreError::UnknownUnderlayIp(ip)),
        [one] => uuid_from_bytes(one.try_get::<_, &[u8]>(0)?),
        _ => Err(StoreError::AmbiguousUnderlayIp {
            ip,
            count: hosts.len(),
        }),
    }
}

/// A client with its prepared statements.
struct PgConn {
    client: Client,
    stmts: HashMap<&'static str, Statement>,
}

impl PgConn {
    fn stmt(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    url: String,
    pool: Pool<PgConn>,
}

impl PgStore {
    /// Connects to `url` (a `postgres://` URL), creating the schema if needed, with at most
    /// `pool_size` connections.
    pub fn open(url: &str, pool_size: usize) -> Result<PgStore, StoreError> {
        let mut conn = connect(url)?;
        let mut tx = conn.client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        // "already exists, skipping" notices on every start are noise.
        tx.batch_execute("SET LOCAL client_min_messages TO warning")?;
        tx.batch_execute(SCHEMA)?;
        let found: Option<i64> = tx
            .query_opt(
                "SELECT value FROM portolan_meta WHERE key = 'schema_version'",
                &[],
            )?
            .map(|r| r.get(0));
        match found {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::SchemaTooNew {
                    found: v,
                    expected: SCHEMA_VERSION,
                })
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO portolan_meta (key, value) VALUES ('schema_version', $1)",
                    &[&SCHEMA_VERSION],
                )?;
            }
        }
        tx.commit()?;
        let pool = Pool::new(pool_size);
        drop(pool.get(|| Ok::<_, StoreError>(conn))?);
        Ok(PgStore {
            url: url.to_string(),
            pool,
        })
    }

    fn conn(&self) -> Result<Pooled<'_, PgConn>, StoreError> {
        self.pool.get(|| connect(&self.url))
    }

    /// Runs `f` on a pooled connection; drops the connection if it broke.
    fn with_conn<R>(
        &self,
        f: impl FnOnce(&mut PgConn) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut c = self.conn()?;
        let r = f(&mut c);
        if c.client.is_closed() {
            c.discard();
        }
        r
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // A synchronous postgres client blocks on its own runtime when closed, which panics
        // inside an async context (a server shutting down drops its store there). Close the
        // connections on a plain thread instead.
        let idle = self.pool.take_idle();
        if !idle.is_empty() {
            let _ = std::thread::Builder::new()
                .name("portolan-pg-close".into())
                .spawn(move || drop(idle));
        }
    }
}

fn connect(url: &str) -> Result<PgConn, StoreError> {
    Ok(PgConn {
        client: Client::connect(url, NoTls)?,
        stmts: HashMap::new(),
    })
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn found(row: &postgres::Row) -> Result<Found, StoreError> {
    Ok(Found {
        mac: mac_from_i64(row.try_get(0)?)?,
        ip: ip_from_bytes(row.try_get::<_, &[u8]>(1)?)?,
        port: u16_from_i64("underlay port", row.try_get(2)?)?,
    })
}

/// Where in the caller's batch a batch-query row belongs (`ord` is 1-based).
fn batch_index(row: &postgres::Row, positions: &[usize]) -> Result<usize, StoreError> {
    let ord: i64 = row.try_get(3)?;
    usize::try_from(ord - 1)
        .ok()
        .and_then(|i| positions.get(i).copied())
        .ok_or_else(|| StoreError::Corrupt {
            what: "batch lookup position",
            detail: format!("{ord} outside 1..={}", positions.len()),
        })
}

impl Store for PgStore {
    fn lookup(&self, lookups: &[Lookup]) -> Result<Vec<Option<Found>>, StoreError> {
        // One round trip per kind of lookup, whatever the batch size: the lookups go in as
        // arrays and come back tagged with their position.
        let mut out = vec![None; lookups.len()];
        let (mut vl3_pos, mut vl3_vnet, mut vl3_ip) = (Vec::new(), Vec::new(), Vec::new());
        let (mut vl2_pos, mut vl2_vnet, mut vl2_mac) = (Vec::new(), Vec::new(), Vec::new());
        for (i, l) in lookups.iter().enumerate() {
            match *l {
                Lookup::Vl3 { vnet_id, ip } => {
                    vl3_pos.push(i);
                    vl3_vnet.push(i64::from(vnet_id));
                    vl3_ip.push(ip_bytes(ip).to_vec());
                }
                Lookup::Vl2 { vnet_id, mac } => {
                    vl2_pos.push(i);
                    vl2_vnet.push(i64::from(vnet_id));
                    vl2_mac.push(mac_to_i64(mac));
                }
            }
        }
        self.with_conn(|c| {
            if !vl3_pos.is_empty() {
                let stmt = c.stmt(VL3_BATCH_SQL)?;
                for row in c.client.query(&stmt, &[&vl3_vnet, &vl3_ip])? {
                    let at = batch_index(&row, &vl3_pos)?;
                    out[at] = Some(found(&row)?);
                }
            }
            if !vl2_pos.is_empty() {
                let stmt = c.stmt(VL2_BATCH_SQL)?;
                for row in c.client.query(&stmt, &[&vl2_vnet, &vl2_mac])? {
                    let at = batch_index(&row, &vl2_pos)?;
                    out[at] = Some(found(&row)?);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn read_log(&self, underlay_ip: IpAddr, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        self.with_conn(|c| {
            let by_ip = c.stmt(HOST_BY_IP_SQL)?;
            let log = c.stmt(LOG_SQL)?;
            let cn = host_by_ip(c, &by_ip, underlay_ip)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = c.client.query(&log, &[&&cn.0[..], &limit])?;
            rows.iter()
                .map(|r| {
                    Ok(LogEntry {
                        id: log_id_from_bytes(r.try_get::<_, &[u8]>(0)?)?,
                        cn_uuid: cn,
                        event: event_from_columns(
                            r.try_get(2)?,
                            r.try_get(1)?,
                            r.try_get(3)?,
                            r.try_get::<_, Option<&[u8]>>(4)?,
                            r.try_get(5)?,
                        )?,
                    })
                })
                .collect()
        })
    }

    fn remove_log(&self, ids: &[LogId]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.with_conn(|c| {
            let stmt = c.stmt(LOG_RM_SQL)?;
            let ids: Vec<&[u8]> = ids.iter().map(|i| &i.0[..]).collect();
            Ok(c.client.execute(&stmt, &[&ids])?)
        })
    }

    fn remove_log_of(&self, underlay_ip: IpAddr, ids: &[LogId]) -> Result<u64, StoreError> {
        self.with_conn(|c| {
            let by_ip = c.stmt(HOST_BY_IP_SQL)?;
            let stmt = c.stmt(LOG_RM_OF_SQL)?;
            // Resolve first: an unknown or shared IP is an error even with no ids.
            let cn = host_by_ip(c, &by_ip, underlay_ip)?;
            if ids.is_empty() {
                return Ok(0);
            }
            let ids: Vec<&[u8]> = ids.iter().map(|i| &i.0[..]).collect();
            Ok(c.client.execute(&stmt, &[&ids, &&cn.0[..]])?)
        })
    }

    fn run_txn(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Outcome) -> Result<Outcome, StoreError> {
        let mut conn = self.conn()?;
        let r = (|| {
            conn.client.batch_execute("BEGIN")?;
            let outcome = {
                let mut tx = PgTxn {
                    conn: &mut conn,
                    open: true,
                };
                let o = f(&mut tx);
                tx.open = false;
                o
            };
            match outcome {
                Outcome::Commit => conn.client.batch_execute("COMMIT")?,
                Outcome::Rollback => conn.client.batch_execute("ROLLBACK")?,
            }
            Ok(outcome)
        })();
        if r.is_err() {
            // Leave no transaction open on a pooled connection.
            if conn.client.batch_execute("ROLLBACK").is_err() || conn.client.is_closed() {
                conn.discard();
            }
        }
        r
    }

    fn run_read(&self, f: &mut dyn FnMut(RawTxn<'_>)) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let r = (|| {
            conn.client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
            let mut tx = PgTxn {
                conn: &mut conn,
                open: true,
            };
            f(tx.raw());
            tx.open = false;
            drop(tx);
            conn.client.batch_execute("ROLLBACK")?;
            Ok(())
        })();
        if r.is_err() && (conn.client.batch_execute("ROLLBACK").is_err() || conn.client.is_closed())
        {
            conn.discard();
        }
        r
    }

    fn describe(&self) -> String {
        // Never log the password.
        match (self.url.find("://"), self.url.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("postgres://{}", &self.url[at + 1..]),
            _ => "postgres".to_string(),
        }
    }
}

/// A write transaction on PostgreSQL. If the closure panics, the guard below rolls back.
struct PgTxn<'a> {
    conn: &'a mut PgConn,
    open: bool,
}

impl Drop for PgTxn<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.client.batch_execute("ROLLBACK");
        }
    }
}

impl Txn for PgTxn<'_> {
    fn raw(&mut self) -> RawTxn<'_> {
        RawTxn::Postgres(&mut self.conn.client)
    }

    fn mapping(&mut self, vnet_id: u32, ip: IpAddr) -> Result<Option<StoredMapping>, StoreError> {
        let stmt = self.conn.stmt(
            "SELECT mac, cn_uuid, vlan, deleted, version FROM portolan_overlay \
             WHERE vnet_id = $1 AND ip = $2",
        )?;
        let Some(r) = self
            .conn
            .client
            .query_opt(&stmt, &[&i64::from(vnet_id), &&ip_bytes(ip)[..]])?
        else {
            return Ok(None);
        };
        Ok(Some(StoredMapping {
            mapping: OverlayMapping {
                vnet_id,
                ip: crate::svp::from_wire_ip(crate::svp::to_wire_ip(ip)),
                mac: mac_from_i64(r.try_get(0)?)?,
                cn_uuid: uuid_from_bytes(r.try_get::<_, &[u8]>(1)?)?,
                vlan: u16_from_i64("vlan", r.try_get(2)?)?,
            },
            deleted: r.try_get(3)?,
            version: u64::try_from(r.try_get::<_, i64>(4)?).unwrap_or(0),
        }))
    }

    fn write_mapping(&mut self, m: &OverlayMapping, deleted: bool) -> Result<u64, StoreError> {
        let stmt = self.conn.stmt(
            "INSERT INTO portolan_overlay \
               (vnet_id, ip, mac, cn_uuid, vlan, deleted, version, mtime) \
             VALUES ($1, $2, $3, $4, $5, $6, 1, $7) \
             ON CONFLICT (vnet_id, ip) DO UPDATE SET \
               mac = excluded.mac, cn_uuid = excluded.cn_uuid, vlan = excluded.vlan, \
               deleted = excluded.deleted, version = portolan_overlay.version + 1, \
               mtime = excluded.mtime \
             RETURNING version",
        )?;
        let row = self.conn.client.query_one(
            &stmt,
            &[
                &i64::from(m.vnet_id),
                &&ip_bytes(m.ip)[..],
                &mac_to_i64(m.mac),
                &&m.cn_uuid.0[..],
                &i64::from(m.vlan),
                &deleted,
                &now_us(),
            ],
        )?;
        Ok(u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0))
    }

    fn vnet_hosts(&mut self, vnet_id: u32) -> Result<Vec<CnUuid>, StoreError> {
        let stmt = self.conn.stmt(
            "SELECT DISTINCT cn_uuid FROM portolan_overlay \
             WHERE vnet_id = $1 AND NOT deleted ORDER BY cn_uuid",
        )?;
        self.conn
            .client
            .query(&stmt, &[&i64::from(vnet_id)])?
            .iter()
            .map(|r| uuid_from_bytes(r.try_get::<_, &[u8]>(0)?))
            .collect()
    }

    fn append_event(&mut self, cn_uuid: CnUuid, event: &Event) -> Result<LogId, StoreError> {
        let id = LogId::random().map_err(StoreError::Random)?;
        let (kind, vnet_id, mac, ip, vlan) = event_columns(event);
        let stmt = self.conn.stmt(
            "INSERT INTO portolan_events (id, cn_uuid, vnet_id, kind, mac, ip, vlan) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )?;
        self.conn.client.execute(
            &stmt,
            &[
                &&id.0[..],
                &&cn_uuid.0[..],
                &vnet_id,
                &kind,
                &mac,
                &ip.as_ref().map(|b| &b[..]),
                &vlan,
            ],
        )?;
        Ok(id)
    }

    fn lock_vnet(&mut self, vnet_id: u32) -> Result<(), StoreError> {
        let key = VNET_LOCK_BASE | i64::from(vnet_id);
        self.conn
            .client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&key])?;
        Ok(())
    }

    fn underlay(&mut self, cn_uuid: CnUuid) -> Result<Option<UnderlayMapping>, StoreError> {
        let stmt = self
            .conn
            .stmt("SELECT ip, port FROM portolan_underlay WHERE cn_uuid = $1")?;
        let Some(r) = self.conn.client.query_opt(&stmt, &[&&cn_uuid.0[..]])? else {
            return Ok(None);
        };
        Ok(Some(UnderlayMapping {
            cn_uuid,
            ip: ip_from_bytes(r.try_get::<_, &[u8]>(0)?)?,
            port: u16_from_i64("underlay port", r.try_get(1)?)?,
        }))
    }

    fn put_underlay(&mut self, u: &UnderlayMapping) -> Result<(), StoreError> {
        let stmt = self.conn.stmt(
            "INSERT INTO portolan_underlay (cn_uuid, ip, port) VALUES ($1, $2, $3) \
             ON CONFLICT (cn_uuid) DO UPDATE SET ip = excluded.ip, port = excluded.port",
        )?;
        self.conn.client.execute(
            &stmt,
            &[&&u.cn_uuid.0[..], &&ip_bytes(u.ip)[..], &i64::from(u.port)],
        )?;
        Ok(())
    }

    fn remove_underlay(&mut self, cn_uuid: CnUuid) -> Result<bool, StoreError> {
        let stmt = self
            .conn
            .stmt("DELETE FROM portolan_underlay WHERE cn_uuid = $1")?;
        Ok(self.conn.client.execute(&stmt, &[&&cn_uuid.0[..]])? > 0)
    }
}

/// Test support: a uniquely named database created through an admin URL and dropped (with
/// `FORCE`) when this value is dropped.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    /// URL of the new database.
    pub url: String,
}

impl TestDatabase {
    /// Creates a fresh database through `admin_url` (a URL whose role may `CREATE DATABASE`).
    pub fn create(admin_url: &str) -> Result<TestDatabase, StoreError> {
        let mut rnd = [0u8; 6];
        getrandom::getrandom(&mut rnd).map_err(StoreError::Random)?;
        let suffix: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("portolan_test_{}_{suffix}", std::process::id());
        let mut admin = Client::connect(admin_url, NoTls)?;
        admin.batch_execute(&format!("CREATE DATABASE {name}"))?;
        let base = admin_url.split('?').next().unwrap_or(admin_url);
        let url = match base.rfind('/') {
            Some(i) if i > base.find("://").map_or(0, |s| s + 2) => {
                format!("{}/{name}", &base[..i])
            }
            _ => format!("{base}/{name}"),
        };
        Ok(TestDatabase {
            admin_url: admin_url.to_string(),
            name,
            url,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&self.admin_url, NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// Test support: the admin URL from `PORTOLAN_TEST_PG`. When it is unset, panics under
/// `CI=true` (PostgreSQL tests must run in CI) and otherwise prints why and returns `None`
/// so the caller can skip.
pub fn test_admin_url() -> Option<String> {
    match std::env::var("PORTOLAN_TEST_PG") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "PORTOLAN_TEST_PG is unset under CI=true: the PostgreSQL tests must run in CI; \
                     scripts/setup.d/20-postgres.sh starts a server and exports it"
                );
            }
            eprintln!(
                "skipping PostgreSQL test: PORTOLAN_TEST_PG is unset \
                 (source scripts/setup.d/20-postgres.sh as root to get a server)"
            );
            None
        }
    }
}
