//! Servers (`fabric_servers`), CNAPI-shaped: the hosts that run VMs. A host registers itself
//! with `PUT /servers/:uuid` (`underlay_ip`, `hostname`), which also publishes its underlay
//! mapping `cn_uuid → (underlay_ip, 4789)` to Portolan in the same transaction, and then
//! heartbeats (`POST /servers/:uuid/heartbeat`). The last heartbeat is stored in the store, so
//! every control-plane instance over one database agrees on which servers are live: a server is
//! `running` while its last heartbeat is at most [`super::Config::heartbeat_lifetime`] old
//! (CNAPI's 11 s), else `unknown`.
//!
//! Removal (`DELETE /servers/:uuid`, `fabric server remove`) revokes a server for good: the row
//! stays with `removed_ms` set (status `removed`), its Portolan underlay mapping is removed, its
//! VMs read `unknown` with `lost: true`, placement skips it, and registering, heartbeating or
//! reporting under its UUID is 410 Gone (the host must join again under a new identity). Its
//! underlay address is free for another server.

use std::net::IpAddr;

use portolan::store::{Txn, UnderlayMapping};

use crate::pki::ServerTrust;
use serde_json::{json, Value};

use super::changes::{self, kind, Change};
use super::db::{lock_key, Db, Row, Val, LOCK_SERVER};
use super::error::{ApiError, FieldError, OpError};
use super::nics::{cn, VXLAN_PORT};
use super::params::{page, parse_uuid, Params};
use super::{iso_from_ms, Config};

/// A registered server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// UUID (lower case): the `cn_uuid` of its NICs and of its Portolan underlay mapping.
    pub uuid: String,
    /// Host name, as the host reported it.
    pub hostname: String,
    /// Underlay address (VXLAN on UDP 4789).
    pub underlay_ip: IpAddr,
    /// Last heartbeat (or registration), ms since the epoch.
    pub last_heartbeat_ms: Option<i64>,
    /// Registration time, ms since the epoch.
    pub created_ms: i64,
    /// When it was removed from the cluster (`None`: a member).
    pub removed_ms: Option<i64>,
}

/// Milliseconds since the epoch (the clock heartbeats are stamped and judged with).
pub fn now_ms() -> i64 {
    super::now_us() / 1000
}

impl Server {
    /// Whether the server heartbeat within `lifetime_ms` of `now_ms` (a removed server never
    /// is).
    pub fn is_live(&self, now_ms: i64, lifetime_ms: i64) -> bool {
        !self.is_removed()
            && self
                .last_heartbeat_ms
                .is_some_and(|h| now_ms.saturating_sub(h) <= lifetime_ms)
    }

    /// Whether it was removed from the cluster.
    pub fn is_removed(&self) -> bool {
        self.removed_ms.is_some()
    }

    /// CNAPI's status: `running` while live, `removed` once removed, else `unknown`.
    pub fn status(&self, now_ms: i64, lifetime_ms: i64) -> &'static str {
        if self.is_removed() {
            "removed"
        } else if self.is_live(now_ms, lifetime_ms) {
            "running"
        } else {
            "unknown"
        }
    }

    /// The server object; `vms` is its count of VMs that are not destroyed.
    pub fn to_json(&self, vms: i64, now_ms: i64, cfg: &Config) -> Value {
        json!({
            "uuid": self.uuid,
            "hostname": self.hostname,
            "underlay_ip": self.underlay_ip.to_string(),
            "last_heartbeat": self.last_heartbeat_ms.map(iso_from_ms),
            "status": self.status(now_ms, cfg.heartbeat_lifetime_ms()),
            "vms": vms,
            "created": iso_from_ms(self.created_ms),
            "removed": self.removed_ms.map(iso_from_ms),
        })
    }
}

const COLUMNS: &str = "uuid, hostname, underlay_ip, last_heartbeat_ms, created_ms, removed_ms";

fn from_row(r: Row) -> Result<Server, OpError> {
    let mut it = r.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| OpError::Corrupt("server row".into()))
    };
    let uuid = next()?.into_string("server uuid")?;
    let hostname = next()?.into_string("server hostname")?;
    let ip = next()?.into_string("server underlay_ip")?;
    let underlay_ip = ip
        .parse()
        .map_err(|_| OpError::Corrupt(format!("server {uuid}: underlay_ip {ip:?}")))?;
    let last_heartbeat_ms = next()?.as_opt_i64();
    let created_ms = next()?.as_i64("server created_ms")?;
    let removed_ms = next()?.as_opt_i64();
    Ok(Server {
        uuid,
        hostname,
        underlay_ip,
        last_heartbeat_ms,
        created_ms,
        removed_ms,
    })
}

/// One server by (lower-case) UUID.
pub fn get(db: &mut Db<'_>, uuid: &str) -> Result<Option<Server>, OpError> {
    db.query_opt(
        &format!("SELECT {COLUMNS} FROM fabric_servers WHERE uuid = $1"),
        &[Val::text(uuid)],
    )?
    .map(from_row)
    .transpose()
}

/// The server named in a URL, or 404.
pub fn find(db: &mut Db<'_>, uuid: &str) -> Result<Server, OpError> {
    let u = parse_uuid(uuid).ok_or_else(|| ApiError::not_found("server not found"))?;
    get(db, &u)?.ok_or_else(|| ApiError::not_found("server not found").into())
}

/// 410 Gone: `s` was removed from the cluster; `what` is what was refused.
pub fn removed_error(s: &Server, what: &str) -> ApiError {
    super::changes::gone(format!(
        "{what}: server {} was removed from the cluster at {}; a removed server cannot come \
         back, join again under a new identity",
        s.uuid,
        iso_from_ms(s.removed_ms.unwrap_or(0))
    ))
}

/// The server named in a URL that must still be a member: 404 if unknown, 410 if removed
/// (`what` names the refused request in the message).
pub fn find_member(db: &mut Db<'_>, uuid: &str, what: &str) -> Result<Server, OpError> {
    let s = find(db, uuid)?;
    if s.is_removed() {
        return Err(removed_error(&s, what).into());
    }
    Ok(s)
}

/// The server a VM is to be put on (create, migrate): registered and not removed, else 422 on
/// `server_uuid` saying which (`hint` is appended to the "not registered" message).
pub fn target(db: &mut Db<'_>, uuid: &str, hint: &str) -> Result<Server, OpError> {
    match get(db, uuid)? {
        None => Err(ApiError::invalid(
            "server_uuid",
            format!("server {uuid} is not registered{hint}"),
        )
        .into()),
        Some(x) if x.is_removed() => Err(ApiError::invalid(
            "server_uuid",
            format!("server {uuid} was removed from the cluster"),
        )
        .into()),
        Some(x) => Ok(x),
    }
}

/// Every server, by UUID.
pub fn all(db: &mut Db<'_>) -> Result<Vec<Server>, OpError> {
    db.query(
        &format!("SELECT {COLUMNS} FROM fabric_servers ORDER BY uuid"),
        &[],
    )?
    .into_iter()
    .map(from_row)
    .collect()
}

/// How many VMs that are not destroyed are on `uuid`.
pub fn vm_count(db: &mut Db<'_>, uuid: &str) -> Result<i64, OpError> {
    db.query_opt(
        "SELECT COUNT(*) FROM fabric_vms WHERE server_uuid = $1 AND state <> 'destroyed'",
        &[Val::text(uuid)],
    )?
    .and_then(|r| r.into_iter().next())
    .map_or(Ok(0), |v| v.as_i64("count"))
}

/// Whether `s` is a host name: 1..=255 characters of letters, digits, `-`, `.` and `_`.
fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// An underlay address: a unicast IPv4 or IPv6 address another host can send to.
fn parse_underlay(p: &mut Params) -> Option<IpAddr> {
    let raw = p.string("underlay_ip")?;
    match raw.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
            p.invalid(
                "underlay_ip",
                format!("{raw} cannot be an underlay address: expected a unicast address"),
            );
            None
        }
        Ok(IpAddr::V4(v4)) if v4.is_broadcast() => {
            p.invalid(
                "underlay_ip",
                "255.255.255.255 cannot be an underlay address: expected a unicast address",
            );
            None
        }
        Ok(ip) => Some(ip),
        Err(_) => {
            p.invalid(
                "underlay_ip",
                format!("{raw:?} is not an IP address: expected e.g. 192.168.77.1"),
            );
            None
        }
    }
}

/// `PUT /servers/:uuid`: registers the server or updates it (both fields are required on first
/// registration); publishes its underlay mapping; counts as a heartbeat. A change of name or
/// address (or a new server) records a `server` change. A removed server is 410 Gone.
///
/// `by_host`: the request comes with the server's own host certificate, which may only
/// re-register (heartbeat-like: the server exists and `underlay_ip`, if given, is unchanged;
/// the hostname may change). Registering and changing the underlay address need an operator:
/// 403 otherwise, and nothing is written.
pub fn put(
    tx: &mut dyn Txn,
    cfg: &Config,
    uuid: &str,
    p: &mut Params,
    by_host: bool,
) -> Result<Value, OpError> {
    let Some(uuid) = parse_uuid(uuid) else {
        return Err(ApiError::invalid("uuid", "invalid UUID: expected a server UUID").into());
    };
    let Some(cn_uuid) = cn(&uuid) else {
        return Err(ApiError::invalid("uuid", "invalid UUID").into());
    };
    p.allow_only(&["underlay_ip", "hostname", "cpus", "memory_bytes"]);
    let ip = parse_underlay(p);
    // What the host has, as it reports it (the Docker API's `/info` sums live servers').
    let cpus = p.int_in(
        "cpus",
        1,
        1 << 20,
        "cpus must be a number between 1 and 1048576",
    );
    let memory = p.int_in(
        "memory_bytes",
        1,
        i64::MAX,
        "memory_bytes must be a positive number of bytes",
    );
    let hostname = p.string("hostname");
    if let Some(h) = &hostname {
        if !valid_hostname(h) {
            p.invalid(
                "hostname",
                "expected 1 to 255 letters, digits, '-', '.' or '_'",
            );
        }
    }
    p.finish()?;
    let mut d = Db::from(tx.raw());
    // One key for every registration: underlay addresses are unique across servers.
    d.lock(lock_key(LOCK_SERVER, "servers"))?;
    let old = get(&mut d, &uuid)?;
    if let Some(o) = old.as_ref().filter(|o| o.is_removed()) {
        return Err(removed_error(o, &format!("PUT /servers/{uuid}")).into());
    }
    if by_host {
        match &old {
            None => {
                return Err(super::auth::forbidden(format!(
                    "PUT /servers/{uuid}: server {uuid} is not registered; a host certificate \
                     cannot register a server (hosts are registered when they join, or by an \
                     operator)"
                ))
                .into())
            }
            Some(o) if ip.is_some_and(|ip| ip != o.underlay_ip) => {
                return Err(super::auth::forbidden(format!(
                    "PUT /servers/{uuid}: the underlay_ip of server {uuid} is {}; a host \
                     certificate cannot change it to {} (only an operator can)",
                    o.underlay_ip,
                    ip.map(|i| i.to_string()).unwrap_or_default()
                ))
                .into())
            }
            Some(_) => {}
        }
    }
    let now = now_ms();
    let new = match &old {
        Some(o) => Server {
            hostname: hostname.unwrap_or_else(|| o.hostname.clone()),
            underlay_ip: ip.unwrap_or(o.underlay_ip),
            last_heartbeat_ms: Some(now),
            ..o.clone()
        },
        None => {
            let mut missing = Vec::new();
            if ip.is_none() {
                missing.push(FieldError::missing("underlay_ip"));
            }
            if hostname.is_none() {
                missing.push(FieldError::missing("hostname"));
            }
            if !missing.is_empty() {
                return Err(ApiError::invalid_params(missing).into());
            }
            Server {
                uuid: uuid.clone(),
                hostname: hostname.unwrap_or_default(),
                underlay_ip: ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                last_heartbeat_ms: Some(now),
                created_ms: now,
                removed_ms: None,
            }
        }
    };
    let ip_text = new.underlay_ip.to_string();
    if let Some(r) = d.query_opt(
        "SELECT uuid FROM fabric_servers WHERE underlay_ip = $1 AND uuid <> $2 \
           AND removed_ms IS NULL",
        &[Val::text(&ip_text), Val::text(&uuid)],
    )? {
        let other = r
            .into_iter()
            .next()
            .map(|v| v.into_string("uuid"))
            .transpose()?
            .unwrap_or_default();
        return Err(ApiError::invalid_params(vec![FieldError::used_by(
            "underlay_ip",
            "server",
            &other,
            format!("underlay_ip {ip_text} is in use by server {other}"),
        )])
        .into());
    }
    let params = [
        Val::text(&new.hostname),
        Val::text(&ip_text),
        Val::int(now),
        Val::int(new.created_ms),
        Val::text(&uuid),
    ];
    if old.is_some() {
        d.exec(
            "UPDATE fabric_servers SET hostname = $1, underlay_ip = $2, last_heartbeat_ms = $3, \
               created_ms = $4 WHERE uuid = $5",
            &params,
        )?;
    } else {
        d.exec(
            "INSERT INTO fabric_servers (hostname, underlay_ip, last_heartbeat_ms, created_ms, uuid) \
             VALUES ($1, $2, $3, $4, $5)",
            &params,
        )?;
    }
    if cpus.is_some() || memory.is_some() {
        let doc = json!({"cpus": cpus, "memory_bytes": memory});
        d.exec(
            "UPDATE fabric_servers SET doc = $1 WHERE uuid = $2",
            &[Val::text(doc.to_string()), Val::text(&uuid)],
        )?;
    }
    let changed = old
        .as_ref()
        .is_none_or(|o| o.hostname != new.hostname || o.underlay_ip != new.underlay_ip);
    let vms = vm_count(&mut d, &uuid)?;
    if changed {
        let action = if old.is_some() { "update" } else { "create" };
        changes::record(
            &mut d,
            &Change {
                kind: kind::SERVER,
                uuid: &uuid,
                action,
                owner_uuid: None,
                servers: &[&uuid],
            },
        )?;
    }
    let want = UnderlayMapping {
        cn_uuid,
        ip: new.underlay_ip,
        port: VXLAN_PORT,
    };
    if changed || tx.underlay(cn_uuid)?.as_ref() != Some(&want) {
        tx.put_underlay(&want)?;
    }
    Ok(new.to_json(vms, now, cfg))
}

/// `POST /servers/:uuid/heartbeat`: stamps the server's last heartbeat (404 if it is not
/// registered, 410 if it was removed). No feed change: liveness is judged from the stamp when
/// read.
pub fn heartbeat(db: &mut Db<'_>, uuid: &str, p: &mut Params) -> Result<(), OpError> {
    p.allow_only(&[]);
    p.finish()?;
    let u = parse_uuid(uuid).ok_or_else(|| ApiError::not_found("server not found"))?;
    // One statement: nothing is decided on what was there before.
    let n = db.exec(
        "UPDATE fabric_servers SET last_heartbeat_ms = $1 WHERE uuid = $2 AND removed_ms IS NULL",
        &[Val::int(now_ms()), Val::text(&u)],
    )?;
    if n == 0 {
        find_member(db, &u, &format!("POST /servers/{u}/heartbeat"))?;
        return Err(ApiError::not_found("server not found").into());
    }
    Ok(())
}

/// `DELETE /servers/:uuid` (operator): removes the server from the cluster, for good. Marks it
/// removed, removes its Portolan underlay mapping (so Portolan no longer resolves to it), and
/// records a `server` `remove` change, which every server's feed carries (their agents read
/// the new `members`). 404 if unknown, 410 if removed already. The caller revokes it in the
/// in-process [`crate::pki::Trust`] after commit.
pub fn remove(tx: &mut dyn Txn, uuid: &str, p: &mut Params) -> Result<Server, OpError> {
    p.allow_only(&[]);
    p.finish()?;
    let mut d = Db::from(tx.raw());
    d.lock(lock_key(LOCK_SERVER, "servers"))?;
    let mut s = find(&mut d, uuid)?;
    if s.is_removed() {
        return Err(super::changes::gone(format!(
            "server {} was already removed from the cluster at {}",
            s.uuid,
            iso_from_ms(s.removed_ms.unwrap_or(0))
        ))
        .into());
    }
    let now = now_ms();
    d.exec(
        "UPDATE fabric_servers SET removed_ms = $1 WHERE uuid = $2",
        &[Val::int(now), Val::text(&s.uuid)],
    )?;
    s.removed_ms = Some(now);
    changes::record(
        &mut d,
        &Change {
            kind: kind::SERVER,
            uuid: &s.uuid,
            action: "remove",
            owner_uuid: None,
            servers: &[&s.uuid],
        },
    )?;
    if let Some(cn_uuid) = cn(&s.uuid) {
        tx.remove_underlay(cn_uuid)?;
    }
    Ok(s)
}

/// Every registered server as membership sees it (removed ones included, flagged), and the
/// foreign peers: what [`crate::pki::Trust::set_servers`] takes.
pub fn trust_view(db: &mut Db<'_>) -> Result<(Vec<ServerTrust>, Vec<IpAddr>), OpError> {
    let servers = all(db)?
        .into_iter()
        .map(|s| ServerTrust {
            removed: s.is_removed(),
            uuid: s.uuid,
            underlay: s.underlay_ip,
        })
        .collect();
    Ok((servers, super::peers::addresses(db)?))
}

/// The cluster's members: the underlay addresses of registered, unrevoked servers and the
/// foreign peers, sorted (as [`crate::pki::Trust::members`] sorts them) without duplicates.
pub fn members(db: &mut Db<'_>) -> Result<Vec<IpAddr>, OpError> {
    let (servers, foreign) = trust_view(db)?;
    let mut m: Vec<IpAddr> = servers
        .into_iter()
        .filter(|s| !s.removed)
        .map(|s| s.underlay)
        .chain(foreign)
        .collect();
    m.sort();
    m.dedup();
    Ok(m)
}

/// `GET /servers/:uuid`.
pub fn get_api(
    db: &mut Db<'_>,
    cfg: &Config,
    uuid: &str,
    p: &mut Params,
) -> Result<Value, OpError> {
    p.allow_only(&[]);
    p.finish()?;
    let s = find(db, uuid)?;
    let n = vm_count(db, &s.uuid)?;
    Ok(s.to_json(n, now_ms(), cfg))
}

/// `GET /servers`: every server by UUID, removed ones included (status `removed`); filters
/// `status` (`running`|`unknown`|`removed`), `removed` (`false`: members only, `true`: removed
/// only), `limit`, `offset`.
pub fn list(db: &mut Db<'_>, cfg: &Config, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["status", "removed", "limit", "offset"]);
    let status = p.one_of("status", &["running", "unknown", "removed"]);
    let removed = p.boolean("removed");
    let (limit, offset) = p.pagination();
    p.finish()?;
    let now = now_ms();
    let counts: std::collections::HashMap<String, i64> = db
        .query(
            "SELECT server_uuid, COUNT(*) FROM fabric_vms \
             WHERE state <> 'destroyed' AND server_uuid IS NOT NULL GROUP BY server_uuid",
            &[],
        )?
        .into_iter()
        .map(|r| {
            let mut it = r.into_iter();
            let u = it
                .next()
                .map(|v| v.into_string("server_uuid"))
                .transpose()?;
            let n = it.next().map(|v| v.as_i64("count")).transpose()?;
            Ok((u.unwrap_or_default(), n.unwrap_or(0)))
        })
        .collect::<Result<_, OpError>>()?;
    let out: Vec<Value> = all(db)?
        .into_iter()
        .filter(|s| {
            removed.is_none_or(|r| r == s.is_removed())
                && status
                    .as_deref()
                    .is_none_or(|w| s.status(now, cfg.heartbeat_lifetime_ms()) == w)
        })
        .map(|s| {
            let n = counts.get(&s.uuid).copied().unwrap_or(0);
            s.to_json(n, now, cfg)
        })
        .collect();
    Ok(Value::Array(page(out, limit, offset)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(hb: Option<i64>) -> Server {
        Server {
            uuid: "564d1a4c-0000-4000-8000-000000000001".into(),
            hostname: "h1".into(),
            underlay_ip: "192.168.77.1".parse().unwrap(),
            last_heartbeat_ms: hb,
            created_ms: 0,
            removed_ms: None,
        }
    }

    #[test]
    fn liveness_is_at_most_the_lifetime() {
        assert!(server(Some(1_000)).is_live(12_000, 11_000));
        assert!(!server(Some(1_000)).is_live(12_001, 11_000));
        assert!(!server(None).is_live(0, 11_000));
        assert_eq!(server(Some(1_000)).status(12_001, 11_000), "unknown");
        assert_eq!(server(Some(1_000)).status(1_500, 11_000), "running");
        let gone = Server {
            removed_ms: Some(1_200),
            ..server(Some(1_000))
        };
        assert!(!gone.is_live(1_500, 11_000));
        assert_eq!(gone.status(1_500, 11_000), "removed");
        assert_eq!(
            gone.to_json(0, 1_500, &Config::default())["status"],
            "removed"
        );
    }

    #[test]
    fn hostnames() {
        assert!(valid_hostname("cn-1.example_a"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("a b"));
        assert!(!valid_hostname(&"a".repeat(256)));
    }

    #[test]
    fn underlay_addresses() {
        let mut p = Params::from_map(
            json!({"underlay_ip": "224.0.0.1"})
                .as_object()
                .cloned()
                .unwrap(),
        );
        assert_eq!(parse_underlay(&mut p), None);
        assert!(p.has_errors());
        let mut p = Params::from_map(
            json!({"underlay_ip": "fd00::1"})
                .as_object()
                .cloned()
                .unwrap(),
        );
        assert_eq!(parse_underlay(&mut p), Some("fd00::1".parse().unwrap()));
        assert!(!p.has_errors());
    }
}
