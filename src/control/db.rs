//! The control plane's own tables (`napi_*`), in the same database and the same transactions as
//! Portolan's records.
//!
//! SQL is written once for both backends: column types are only `TEXT` and `BIGINT`, booleans
//! are 0/1, and parameters are `$1, $2, ...` numbered in order of first appearance (SQLite binds
//! `$N` names by first appearance, PostgreSQL by number, so both see the same positions).
//!
//! # Concurrency
//! Write transactions run at PostgreSQL's READ COMMITTED (each statement sees what committed
//! before it started) and serialise on transaction-scoped advisory locks ([`Db::lock`]) keyed by
//! the object a decision depends on. The discipline, everywhere:
//! - **lock, then read**: a transaction takes the lock of an object *before* it reads anything
//!   it will decide on (existence, holder of an IP, a document it rewrites), and re-reads what
//!   an earlier, unlocked read (a URL lookup) returned; so a row that a concurrent transaction
//!   deleted is seen as gone (404), never written back;
//! - **every writer of a row holds its lock**: NIC rows under [`LOCK_NIC`], a network's row and
//!   IP records under [`LOCK_NETWORK`], network creation/deletion, names and pools under
//!   `LOCK_GLOBAL "networks"`, NIC tags under `LOCK_GLOBAL "nic_tags"`, VLANs and vnet_ids under
//!   [`LOCK_OWNER`];
//! - **one order**: `"networks"` → `"nic_tags"` → owner → VM → NIC (by MAC) → networks
//!   (ascending UUID) → Portolan's per-VNI lock (inside the store's mapping operations). VM
//!   rows are written under [`LOCK_OWNER`] (create, update, migrate, delete: placement and alias
//!   uniqueness are per-owner decisions) and [`LOCK_VM`] (every writer, state reports too);
//!   server rows under [`LOCK_SERVER`], which no path holds together with another of ours. The only paths
//!   that can meet in opposite orders (a pool provision walking its members, a primary NIC
//!   clearing its siblings) are resolved by PostgreSQL's deadlock detector, and the HTTP layer
//!   runs an aborted write again ([`super::error::OpError::is_retryable`]).
//!
//! Updates of existing rows are `UPDATE`s, never upserts, so even a missed lock cannot
//! re-create a deleted row. SQLite serialises writers itself (`BEGIN IMMEDIATE`); the locks are
//! no-ops there.

use portolan::store::RawTxn;

use super::error::OpError;

/// A SQL value (parameter or column).
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// BIGINT (or NULL).
    Int(Option<i64>),
    /// TEXT (or NULL).
    Text(Option<String>),
    /// BLOB/BYTEA (Portolan's tables only).
    Bytes(Option<Vec<u8>>),
}

impl Val {
    /// An integer parameter.
    pub fn int(v: impl Into<i64>) -> Val {
        Val::Int(Some(v.into()))
    }
    /// A text parameter.
    pub fn text(v: impl Into<String>) -> Val {
        Val::Text(Some(v.into()))
    }
    /// An optional text parameter.
    pub fn opt_text(v: Option<&str>) -> Val {
        Val::Text(v.map(String::from))
    }
    /// A boolean parameter (0/1).
    pub fn boolean(b: bool) -> Val {
        Val::Int(Some(i64::from(b)))
    }
    /// The integer, or an error naming `what`.
    pub fn as_i64(&self, what: &str) -> Result<i64, OpError> {
        match self {
            Val::Int(Some(v)) => Ok(*v),
            other => Err(OpError::Corrupt(format!(
                "{what}: expected an integer, found {other:?}"
            ))),
        }
    }
    /// The optional integer.
    pub fn as_opt_i64(&self) -> Option<i64> {
        match self {
            Val::Int(v) => *v,
            _ => None,
        }
    }
    /// The text, or an error naming `what`.
    pub fn into_string(self, what: &str) -> Result<String, OpError> {
        match self {
            Val::Text(Some(v)) => Ok(v),
            other => Err(OpError::Corrupt(format!(
                "{what}: expected text, found {other:?}"
            ))),
        }
    }
    /// The optional text.
    pub fn into_opt_string(self) -> Option<String> {
        match self {
            Val::Text(v) => v,
            _ => None,
        }
    }
    /// The bytes, or an error naming `what`.
    pub fn into_bytes(self, what: &str) -> Result<Vec<u8>, OpError> {
        match self {
            Val::Bytes(Some(v)) => Ok(v),
            other => Err(OpError::Corrupt(format!(
                "{what}: expected bytes, found {other:?}"
            ))),
        }
    }
}

/// A result row.
pub type Row = Vec<Val>;

/// Decodes the JSON document in a row's first column (`SELECT doc FROM …`); `what` names the
/// object in the error ("nic", "rule", …).
pub fn doc_from_row<T: serde::de::DeserializeOwned>(r: Row, what: &str) -> Result<T, OpError> {
    let doc = r
        .into_iter()
        .next()
        .ok_or_else(|| OpError::Corrupt(format!("{what} row")))?
        .into_string(&format!("{what} doc"))?;
    Ok(serde_json::from_str(&doc)?)
}

/// Our SQL on the connection of an open transaction.
pub enum Db<'a> {
    /// SQLite.
    Sqlite(&'a rusqlite::Connection),
    /// PostgreSQL.
    Pg(&'a mut postgres::Client),
}

impl<'a> From<RawTxn<'a>> for Db<'a> {
    fn from(r: RawTxn<'a>) -> Db<'a> {
        match r {
            RawTxn::Sqlite(c) => Db::Sqlite(c),
            RawTxn::Postgres(c) => Db::Pg(c),
        }
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value as V};
        Ok(match self {
            Val::Int(Some(v)) => ToSqlOutput::Owned(V::Integer(*v)),
            Val::Text(Some(v)) => {
                ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Text(v.as_bytes()))
            }
            Val::Bytes(Some(v)) => ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Blob(v)),
            Val::Int(None) | Val::Text(None) | Val::Bytes(None) => ToSqlOutput::Owned(V::Null),
        })
    }
}

fn pg_params(params: &[Val]) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    params
        .iter()
        .map(|p| -> Box<dyn postgres::types::ToSql + Sync> {
            match p {
                Val::Int(v) => Box::new(*v),
                Val::Text(v) => Box::new(v.clone()),
                Val::Bytes(v) => Box::new(v.clone()),
            }
        })
        .collect()
}

fn sqlite_row(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Row> {
    use rusqlite::types::ValueRef;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(match r.get_ref(i)? {
            ValueRef::Null => Val::Int(None),
            ValueRef::Integer(v) => Val::Int(Some(v)),
            ValueRef::Real(f) => Val::Int(Some(f as i64)),
            ValueRef::Text(t) => Val::Text(Some(String::from_utf8_lossy(t).into_owned())),
            ValueRef::Blob(b) => Val::Bytes(Some(b.to_vec())),
        });
    }
    Ok(out)
}

fn pg_row(r: &postgres::Row) -> Result<Row, OpError> {
    use postgres::types::Type;
    let mut out = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let t = c.type_();
        out.push(if *t == Type::INT8 {
            Val::Int(r.try_get::<_, Option<i64>>(i)?)
        } else if *t == Type::INT4 {
            Val::Int(r.try_get::<_, Option<i32>>(i)?.map(i64::from))
        } else if *t == Type::BOOL {
            Val::Int(r.try_get::<_, Option<bool>>(i)?.map(i64::from))
        } else if *t == Type::BYTEA {
            Val::Bytes(r.try_get::<_, Option<Vec<u8>>>(i)?)
        } else {
            Val::Text(r.try_get::<_, Option<String>>(i)?)
        });
    }
    Ok(out)
}

impl Db<'_> {
    /// Runs a statement; returns the number of rows changed.
    pub fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64, OpError> {
        match self {
            Db::Sqlite(c) => {
                let n = c
                    .prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(params.iter()))?;
                Ok(n as u64)
            }
            Db::Pg(c) => {
                let boxed = pg_params(params);
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    boxed.iter().map(|b| b.as_ref()).collect();
                Ok(c.execute(sql, &refs)?)
            }
        }
    }

    /// Runs a query; returns every row.
    pub fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, OpError> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let n = stmt.column_count();
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(params.iter()), |r| {
                        sqlite_row(r, n)
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            }
            Db::Pg(c) => {
                let boxed = pg_params(params);
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    boxed.iter().map(|b| b.as_ref()).collect();
                c.query(sql, &refs)?.iter().map(pg_row).collect()
            }
        }
    }

    /// Runs a query; returns the first row, if any.
    pub fn query_opt(&mut self, sql: &str, params: &[Val]) -> Result<Option<Row>, OpError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Serialises writers of `key` across processes (PostgreSQL advisory transaction lock; a
    /// no-op on SQLite, whose write transactions are exclusive already).
    pub fn lock(&mut self, key: i64) -> Result<(), OpError> {
        if let Db::Pg(c) = self {
            c.execute("SELECT pg_advisory_xact_lock($1)", &[&key])?;
        }
        Ok(())
    }

    /// Whether this is PostgreSQL.
    pub fn is_pg(&self) -> bool {
        matches!(self, Db::Pg(_))
    }
}

/// Advisory lock keys (high bits "NA" for NAPI, then a kind byte, then a 32-bit hash).
pub fn lock_key(kind: u8, s: &str) -> i64 {
    // FNV-1a: stable across processes and builds.
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (0x4e41_i64 << 40) | (i64::from(kind) << 32) | i64::from(h)
}

/// Lock kinds.
pub const LOCK_SCHEMA: u8 = 0;
/// Per network: IP allocation.
pub const LOCK_NETWORK: u8 = 1;
/// Per owner: fabric vnet_id and names.
pub const LOCK_OWNER: u8 = 2;
/// Global: network names, overlaps, nic tags, MACs.
pub const LOCK_GLOBAL: u8 = 3;
/// Per NIC (MAC): every writer of a NIC row.
pub const LOCK_NIC: u8 = 4;
/// Per firewall rule (UUID): every writer of a rule row.
pub const LOCK_RULE: u8 = 5;
/// Per VM (UUID): every writer of a VM row (after the owner's lock, before its NICs').
pub const LOCK_VM: u8 = 6;
/// Per server (UUID): every writer of a server row.
pub const LOCK_SERVER: u8 = 7;

/// Takes the lock of the NIC with `mac` (see the module docs for the order).
pub fn lock_nic(db: &mut Db<'_>, mac: u64) -> Result<(), OpError> {
    db.lock(lock_key(LOCK_NIC, &format!("{mac:012x}")))
}

/// The control plane's schema (both backends).
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS napi_nic_tags (
        name TEXT PRIMARY KEY,
        uuid TEXT NOT NULL,
        mtu  BIGINT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS napi_networks (
        uuid       TEXT PRIMARY KEY,
        name_key   TEXT NOT NULL UNIQUE,
        name       TEXT NOT NULL,
        fabric     BIGINT NOT NULL,
        vnet_id    BIGINT,
        owner_uuid TEXT,
        vlan_id    BIGINT NOT NULL,
        nic_tag    TEXT NOT NULL,
        subnet_lo  BIGINT NOT NULL,
        subnet_hi  BIGINT NOT NULL,
        gap_hint   BIGINT NOT NULL,
        doc        TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS napi_networks_by_vnet ON napi_networks (vnet_id)",
    "CREATE TABLE IF NOT EXISTS napi_ips (
        network_uuid    TEXT NOT NULL,
        ip              BIGINT NOT NULL,
        reserved        BIGINT NOT NULL,
        belongs_to_type TEXT,
        belongs_to_uuid TEXT,
        owner_uuid      TEXT,
        mtime           BIGINT NOT NULL,
        PRIMARY KEY (network_uuid, ip)
    )",
    "CREATE INDEX IF NOT EXISTS napi_ips_by_mtime ON napi_ips (network_uuid, mtime)",
    "CREATE TABLE IF NOT EXISTS napi_nics (
        mac             BIGINT PRIMARY KEY,
        owner_uuid      TEXT NOT NULL,
        belongs_to_uuid TEXT NOT NULL,
        belongs_to_type TEXT NOT NULL,
        cn_uuid         TEXT,
        network_uuid    TEXT,
        ip              BIGINT,
        is_primary      BIGINT NOT NULL,
        state           TEXT NOT NULL,
        doc             TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS napi_nics_by_belongs ON napi_nics (belongs_to_uuid)",
    "CREATE INDEX IF NOT EXISTS napi_nics_by_network ON napi_nics (network_uuid, ip)",
    "CREATE TABLE IF NOT EXISTS napi_fabrics (
        owner_uuid TEXT PRIMARY KEY,
        vnet_id    BIGINT NOT NULL UNIQUE
    )",
    "CREATE TABLE IF NOT EXISTS napi_fabric_vlans (
        owner_uuid  TEXT NOT NULL,
        vlan_id     BIGINT NOT NULL,
        name        TEXT,
        description TEXT,
        PRIMARY KEY (owner_uuid, vlan_id)
    )",
    "CREATE TABLE IF NOT EXISTS napi_network_pools (
        uuid TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        doc  TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS fabric_changes (
        seq        BIGINT PRIMARY KEY,
        kind       TEXT NOT NULL,
        uuid       TEXT NOT NULL,
        action     TEXT NOT NULL,
        owner_uuid TEXT,
        servers    TEXT NOT NULL,
        time_ms    BIGINT NOT NULL,
        detail     TEXT
    )",
    "CREATE TABLE IF NOT EXISTS fabric_servers (
        uuid              TEXT PRIMARY KEY,
        hostname          TEXT NOT NULL,
        underlay_ip       TEXT NOT NULL,
        last_heartbeat_ms BIGINT,
        created_ms        BIGINT NOT NULL,
        doc               TEXT,
        removed_ms        BIGINT
    )",
    "CREATE TABLE IF NOT EXISTS fabric_vms (
        uuid        TEXT PRIMARY KEY,
        owner_uuid  TEXT NOT NULL,
        server_uuid TEXT,
        state       TEXT NOT NULL,
        alias       TEXT,
        created_ms  BIGINT NOT NULL,
        doc         TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS fabric_vms_by_owner ON fabric_vms (owner_uuid)",
    "CREATE INDEX IF NOT EXISTS fabric_vms_by_server ON fabric_vms (server_uuid)",
    // An alias is unique per owner among VMs that are not destroyed (checked under the owner's
    // lock first, for a proper error; this is the backstop).
    "CREATE UNIQUE INDEX IF NOT EXISTS fabric_vms_alias ON fabric_vms (owner_uuid, alias)
        WHERE state <> 'destroyed' AND alias IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS napi_rules (
        uuid       TEXT PRIMARY KEY,
        owner_uuid TEXT,
        doc        TEXT NOT NULL
    )",
    // The change feed's per-owner reads (`?server_uuid=` follows owners with a VM on a server).
    "CREATE INDEX IF NOT EXISTS fabric_changes_by_owner ON fabric_changes (owner_uuid, seq)",
    // Foreign VXLAN peers (Linux vxlan hosts, illumos varpd): members by address.
    "CREATE TABLE IF NOT EXISTS fabric_peers (
        ip         TEXT PRIMARY KEY,
        note       TEXT NOT NULL,
        created_ms BIGINT NOT NULL
    )",
];

/// Columns added after their table was first released: `(table, column, type)`. A store
/// created before gets them from [`create_schema`] (`ALTER TABLE ... ADD COLUMN`); new stores
/// have them in [`SCHEMA`] already.
pub const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("fabric_servers", "removed_ms", "BIGINT"),
    ("fabric_changes", "detail", "TEXT"),
    ("docker_accounts", "uid_index", "BIGINT"),
];

/// Whether `table` has `column` (both backends; PostgreSQL: in the current schema).
pub fn has_column(db: &mut Db<'_>, table: &str, column: &str) -> Result<bool, OpError> {
    let sql = if db.is_pg() {
        "SELECT COUNT(*) FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2"
    } else {
        "SELECT COUNT(*) FROM pragma_table_info($1) WHERE name = $2"
    };
    let n = db
        .query_opt(sql, &[Val::text(table), Val::text(column)])?
        .and_then(|r| r.first().and_then(Val::as_opt_i64))
        .unwrap_or(0);
    Ok(n > 0)
}

/// Creates the schema (idempotent; serialised across processes on PostgreSQL).
pub fn create_schema(db: &mut Db<'_>) -> Result<(), OpError> {
    db.lock(lock_key(LOCK_SCHEMA, "schema"))?;
    let docker = crate::docker::SCHEMA.iter().flat_map(|t| t.iter());
    for stmt in SCHEMA.iter().chain(docker) {
        db.exec(stmt, &[])?;
    }
    for (table, column, ty) in ADDED_COLUMNS {
        if !has_column(db, table, column)? {
            db.exec(
                &format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"),
                &[],
            )?;
        }
    }
    crate::docker::accounts::backfill_uid_index(db)?;
    Ok(())
}
