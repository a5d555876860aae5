//! Docker accounts (DESIGN "Control plane": an owner UUID, a login, a default fabric network,
//! and the client certificates that authenticate its Docker API requests).
//!
//! The operator manages them through the control API (`/accounts`, operator certificates or
//! the head's unix socket only; `fabric account add|cert|ls|rm`). A certificate is issued by
//! the accounts CA from a request whose key never leaves the operator's machine, and its serial
//! is stored with its account: every Docker request is resolved by serial, in its own
//! transaction, to an account that is not removed. Removing an account revokes all its
//! certificates: the Docker listener refuses them in the handshake and closes their open
//! connections ([`revoked_serials`] feeds the listener's [`crate::pki::Trust`]). A removed
//! account keeps its UUID and login (its networks and images stay, owned by that UUID); its
//! login is not given to anyone else.

use serde_json::{json, Value};

use super::error;
use crate::control::db::{lock_key, Db, Val, LOCK_GLOBAL};
use crate::control::error::OpError;
use crate::control::params::{random_uuid, Params};

/// The store's tables of accounts.
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS docker_accounts (
        uuid            TEXT PRIMARY KEY,
        login           TEXT NOT NULL UNIQUE,
        created_ms      BIGINT NOT NULL,
        removed_ms      BIGINT,
        default_network TEXT,
        uid_index       BIGINT
    )",
    "CREATE TABLE IF NOT EXISTS docker_account_certs (
        serial       TEXT PRIMARY KEY,
        account_uuid TEXT NOT NULL,
        created_ms   BIGINT NOT NULL,
        not_after_ms BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS docker_account_certs_by_account
        ON docker_account_certs (account_uuid)",
];

/// An account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its owner UUID: everything it creates is owned by this UUID.
    pub uuid: String,
    /// Its login (the certificates' common name).
    pub login: String,
    /// Created, ms since the epoch.
    pub created_ms: i64,
    /// Removed, ms since the epoch.
    pub removed_ms: Option<i64>,
    /// The UUID of its default fabric network (what `docker run` without `--network` uses).
    pub default_network: Option<String>,
}

impl Account {
    /// The JSON of `/accounts`.
    pub fn to_json(&self, certs: i64) -> Value {
        json!({
            "uuid": self.uuid,
            "login": self.login,
            "created": crate::control::iso_from_ms(self.created_ms),
            "removed": self.removed_ms.map(crate::control::iso_from_ms),
            "default_network": self.default_network,
            "certificates": certs,
        })
    }
}

const COLS: &str = "uuid, login, created_ms, removed_ms, default_network";

fn from_row(r: Vec<Val>) -> Result<Account, OpError> {
    let mut it = r.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| OpError::Corrupt("account row".into()))
    };
    Ok(Account {
        uuid: next()?.into_string("uuid")?,
        login: next()?.into_string("login")?,
        created_ms: next()?.as_i64("created_ms")?,
        removed_ms: next()?.as_opt_i64(),
        default_network: next()?.into_opt_string(),
    })
}

/// Whether `login` is a valid login: 1 to 64 characters, a letter first, then letters, digits
/// and `_ . @ -` (it is a certificate's common name and appears in paths).
pub fn valid_login(login: &str) -> bool {
    let b = login.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'@' | b'-'))
}

fn check_login(login: &str) -> Result<(), OpError> {
    if valid_login(login) {
        Ok(())
    } else {
        Err(error::bad_request(format!(
            "login {login:?}: expected 1 to 64 characters, a letter first, then letters, digits, _ . @ -"
        )))
    }
}

/// The account with this login (removed or not).
pub fn by_login(db: &mut Db<'_>, login: &str) -> Result<Option<Account>, OpError> {
    db.query_opt(
        &format!("SELECT {COLS} FROM docker_accounts WHERE login = $1"),
        &[Val::text(login)],
    )?
    .map(from_row)
    .transpose()
}

/// The account with this UUID (removed or not).
pub fn by_uuid(db: &mut Db<'_>, uuid: &str) -> Result<Option<Account>, OpError> {
    db.query_opt(
        &format!("SELECT {COLS} FROM docker_accounts WHERE uuid = $1"),
        &[Val::text(uuid)],
    )?
    .map(from_row)
    .transpose()
}

/// The live (not removed) account that certificate `serial` was issued to.
pub fn by_serial(db: &mut Db<'_>, serial: &str) -> Result<Option<Account>, OpError> {
    db.query_opt(
        "SELECT a.uuid, a.login, a.created_ms, a.removed_ms, a.default_network \
         FROM docker_account_certs c JOIN docker_accounts a ON a.uuid = c.account_uuid \
         WHERE c.serial = $1 AND a.removed_ms IS NULL",
        &[Val::text(serial.to_ascii_lowercase())],
    )?
    .map(from_row)
    .transpose()
}

/// A live account by login, or 404.
pub fn find_live(db: &mut Db<'_>, login: &str) -> Result<Account, OpError> {
    match by_login(db, login)? {
        Some(a) if a.removed_ms.is_none() => Ok(a),
        Some(_) => Err(error::err(410, format!("account {login} was removed"))),
        None => Err(error::not_found(format!("no account {login}"))),
    }
}

/// Creates an account (409 when the login is taken, also by a removed account). The caller
/// gives it its default network in the same transaction ([`set_default_network`]).
pub fn create(db: &mut Db<'_>, login: &str) -> Result<Account, OpError> {
    check_login(login)?;
    db.lock(lock_key(LOCK_GLOBAL, "docker_accounts"))?;
    if let Some(a) = by_login(db, login)? {
        return Err(error::conflict(match a.removed_ms {
            None => format!("account {login} already exists (its UUID is {})", a.uuid),
            Some(ms) => format!(
                "account {login} was removed at {}; a login is never reused",
                crate::control::iso_from_ms(ms)
            ),
        }));
    }
    let a = Account {
        uuid: random_uuid().map_err(|e| OpError::Corrupt(format!("random: {e}")))?,
        login: login.to_string(),
        created_ms: crate::control::now_us() / 1000,
        removed_ms: None,
        default_network: None,
    };
    let index = next_uid_index(db)?;
    db.exec(
        "INSERT INTO docker_accounts (uuid, login, created_ms, uid_index) VALUES ($1, $2, $3, $4)",
        &[
            Val::text(&a.uuid),
            Val::text(&a.login),
            Val::int(a.created_ms),
            Val::int(index),
        ],
    )?;
    Ok(a)
}

/// The next free UID-range index: one past the largest ever given (removed accounts keep
/// theirs, so an index is never reused). The caller holds the accounts lock.
fn next_uid_index(db: &mut Db<'_>) -> Result<i64, OpError> {
    Ok(db
        .query_opt("SELECT MAX(uid_index) FROM docker_accounts", &[])?
        .and_then(|r| r.first().and_then(Val::as_opt_i64))
        .map_or(0, |m| m + 1))
}

/// Gives every account without a UID-range index one, oldest first (the migration of stores
/// made before accounts had them; run by the schema creation, idempotent).
pub fn backfill_uid_index(db: &mut Db<'_>) -> Result<(), OpError> {
    db.lock(lock_key(LOCK_GLOBAL, "docker_accounts"))?;
    let rows = db.query(
        "SELECT uuid FROM docker_accounts WHERE uid_index IS NULL ORDER BY created_ms, uuid",
        &[],
    )?;
    for r in rows {
        let uuid = r
            .into_iter()
            .next()
            .ok_or_else(|| OpError::Corrupt("account row".into()))?
            .into_string("uuid")?;
        let i = next_uid_index(db)?;
        db.exec(
            "UPDATE docker_accounts SET uid_index = $1 WHERE uuid = $2",
            &[Val::int(i), Val::text(uuid)],
        )?;
    }
    Ok(())
}

/// The host UID that root in `account`'s containers maps to:
/// `UID_BASE_START + index * UID_RANGE` (an account without an index gets one now).
pub fn uid_base(db: &mut Db<'_>, account_uuid: &str) -> Result<u32, OpError> {
    use crate::control::container_spec::{UID_BASE_START, UID_RANGE};
    let idx = db
        .query_opt(
            "SELECT uid_index FROM docker_accounts WHERE uuid = $1",
            &[Val::text(account_uuid)],
        )?
        .and_then(|r| r.first().and_then(Val::as_opt_i64));
    let idx = match idx {
        Some(i) => i,
        None => {
            backfill_uid_index(db)?;
            db.query_opt(
                "SELECT uid_index FROM docker_accounts WHERE uuid = $1",
                &[Val::text(account_uuid)],
            )?
            .and_then(|r| r.first().and_then(Val::as_opt_i64))
            .ok_or_else(|| error::not_found(format!("no account {account_uuid}")))?
        }
    };
    uid_base_of(idx).ok_or_else(|| {
        error::err(
            507,
            format!(
                "account UID range {idx} is beyond the host UID space (at most {} accounts)",
                (u32::MAX - UID_BASE_START) / UID_RANGE
            ),
        )
    })
}

/// `UID_BASE_START + index * UID_RANGE`, if the whole range fits in 32 bits.
pub fn uid_base_of(index: i64) -> Option<u32> {
    use crate::control::container_spec::{UID_BASE_START, UID_RANGE};
    let i = u32::try_from(index).ok()?;
    let base = UID_BASE_START.checked_add(i.checked_mul(UID_RANGE)?)?;
    base.checked_add(UID_RANGE)?;
    Some(base)
}

/// Records the account's default network.
pub fn set_default_network(db: &mut Db<'_>, uuid: &str, network: &str) -> Result<(), OpError> {
    db.exec(
        "UPDATE docker_accounts SET default_network = $1 WHERE uuid = $2",
        &[Val::text(network), Val::text(uuid)],
    )?;
    Ok(())
}

/// Marks an account removed (its certificates are refused from then on).
pub fn remove(db: &mut Db<'_>, login: &str) -> Result<Account, OpError> {
    db.lock(lock_key(LOCK_GLOBAL, "docker_accounts"))?;
    let mut a = find_live(db, login)?;
    let now = crate::control::now_us() / 1000;
    db.exec(
        "UPDATE docker_accounts SET removed_ms = $1 WHERE uuid = $2",
        &[Val::int(now), Val::text(&a.uuid)],
    )?;
    a.removed_ms = Some(now);
    Ok(a)
}

/// Remembers a certificate issued to an account.
pub fn add_certificate(
    db: &mut Db<'_>,
    account: &Account,
    serial: &str,
    not_after_ms: i64,
) -> Result<(), OpError> {
    db.exec(
        "INSERT INTO docker_account_certs (serial, account_uuid, created_ms, not_after_ms) \
         VALUES ($1, $2, $3, $4)",
        &[
            Val::text(serial.to_ascii_lowercase()),
            Val::text(&account.uuid),
            Val::int(crate::control::now_us() / 1000),
            Val::int(not_after_ms),
        ],
    )?;
    Ok(())
}

/// Every account with its number of certificates, by login.
pub fn list(db: &mut Db<'_>) -> Result<Vec<(Account, i64)>, OpError> {
    let rows = db.query(
        "SELECT a.uuid, a.login, a.created_ms, a.removed_ms, a.default_network, \
                (SELECT COUNT(*) FROM docker_account_certs c WHERE c.account_uuid = a.uuid) \
         FROM docker_accounts a ORDER BY a.login",
        &[],
    )?;
    rows.into_iter()
        .map(|mut r| {
            let n = r.pop().and_then(|v| v.as_opt_i64()).unwrap_or(0);
            Ok((from_row(r)?, n))
        })
        .collect()
}

/// The serials of every certificate of a removed account: what the Docker listener refuses.
pub fn revoked_serials(db: &mut Db<'_>) -> Result<std::collections::HashSet<String>, OpError> {
    let rows = db.query(
        "SELECT c.serial FROM docker_account_certs c JOIN docker_accounts a \
           ON a.uuid = c.account_uuid WHERE a.removed_ms IS NOT NULL",
        &[],
    )?;
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .next()
                .ok_or_else(|| OpError::Corrupt("serial".into()))?
                .into_string("serial")
        })
        .collect()
}

/// `POST /accounts {login}`: a new account with its default network.
pub fn create_api(
    db: &mut Db<'_>,
    cfg: &crate::control::Config,
    p: &mut Params,
) -> Result<Value, OpError> {
    p.allow_only(&["login"]);
    let login = p.string("login");
    let login = p.require("login", login);
    p.finish()?;
    let mut a = create(db, &login.unwrap_or_default())?;
    if let Some(net) = super::networks::create_default(db, cfg, &a)? {
        set_default_network(db, &a.uuid, &net)?;
        a.default_network = Some(net);
    }
    Ok(a.to_json(0))
}

/// `GET /accounts`.
pub fn list_api(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&[]);
    p.finish()?;
    Ok(Value::Array(
        list(db)?.iter().map(|(a, n)| a.to_json(*n)).collect(),
    ))
}

/// `GET /accounts/:login`.
pub fn get_api(db: &mut Db<'_>, login: &str, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&[]);
    p.finish()?;
    let a = by_login(db, login)?.ok_or_else(|| error::not_found(format!("no account {login}")))?;
    let n = list(db)?
        .into_iter()
        .find(|(x, _)| x.uuid == a.uuid)
        .map_or(0, |(_, n)| n);
    Ok(a.to_json(n))
}

/// `POST /accounts/:login/certificates {csr, lifetime_secs}`: signs the request with the
/// accounts CA; answers the certificate, the CA certificate and where the Docker API listens.
pub fn issue_api(
    db: &mut Db<'_>,
    cfg: &crate::control::Config,
    login: &str,
    p: &mut Params,
) -> Result<Value, OpError> {
    p.allow_only(&["csr", "lifetime_secs"]);
    let csr = p.string("csr");
    let csr = p.require("csr", csr);
    let life = p.int_in(
        "lifetime_secs",
        60,
        10 * 365 * 86_400,
        "lifetime_secs must be between 60 and 315360000",
    );
    p.finish()?;
    let Some(docker) = &cfg.docker else {
        return Err(error::err(
            409,
            "this control plane has no accounts CA: run it with --data DIR (fabric up, or fabric control --data DIR --docker-listen ADDR)",
        ));
    };
    let a = find_live(db, login)?;
    let lifetime = std::time::Duration::from_secs(life.unwrap_or(365 * 86_400) as u64);
    let cert = docker
        .ca
        .issue_account(&csr.unwrap_or_default(), &a.login, lifetime)
        .map_err(|e| match e {
            crate::pki::PkiError::Request(m) => error::bad_request(m),
            other => OpError::Corrupt(other.to_string()),
        })?;
    let der = crate::pki::tls::pem_certs(&cert)
        .map_err(|e| OpError::Corrupt(e.to_string()))?
        .remove(0);
    let serial = crate::pki::tls::serial_of(&der).unwrap_or_default();
    let not_after = crate::pki::tls::not_after(&der)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64);
    add_certificate(db, &a, &serial, not_after)?;
    Ok(json!({
        "login": a.login,
        "uuid": a.uuid,
        "serial": serial,
        "not_after": crate::control::iso_from_ms(not_after),
        "certificate": cert,
        "ca": docker.ca.ca_pem(),
        "docker_host": docker.endpoint,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_do_not_overlap_and_stay_in_32_bits() {
        use crate::control::container_spec::{UID_BASE_START, UID_RANGE};
        assert_eq!(uid_base_of(0), Some(UID_BASE_START));
        assert_eq!(uid_base_of(1), Some(UID_BASE_START + UID_RANGE));
        let last = (u32::MAX - UID_BASE_START) / UID_RANGE;
        assert!(uid_base_of(i64::from(last) - 1).is_some());
        assert_eq!(uid_base_of(i64::from(last) + 1), None);
        assert_eq!(uid_base_of(-1), None);
    }

    #[test]
    fn logins() {
        for ok in ["alice", "a", "bob.smith@example-1", "X_1"] {
            assert!(valid_login(ok), "{ok}");
        }
        for bad in ["", "1abc", "-a", "a b", "a/b", "ä", &"a".repeat(65)] {
            assert!(!valid_login(bad), "{bad}");
        }
    }
}
