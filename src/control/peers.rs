//! Foreign VXLAN peers (`fabric_peers`): hosts that are not fabric servers but exchange VXLAN
//! with them (a Linux vxlan host with static FDB entries, illumos varpd). An operator lists
//! them by underlay address (`PUT /peers/:ip`, `DELETE /peers/:ip`, `GET /peers`); they are
//! members of the cluster beside the registered, unrevoked servers: Portolan answers them over
//! plain SVP and every dataplane accepts their VXLAN. Adding or removing one records a `peer`
//! change, which every server's feed carries (each agent re-reads its snapshot's `members`).

use std::net::IpAddr;

use serde_json::{json, Value};

use super::changes::{self, kind, Change};
use super::db::{lock_key, Db, Row, Val, LOCK_GLOBAL};
use super::error::{ApiError, OpError};
use super::iso_from_ms;
use super::params::{page, Params};
use super::servers::now_ms;

/// Longest note.
pub const MAX_NOTE: usize = 1024;

/// A foreign peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its underlay address (canonical text form).
    pub ip: IpAddr,
    /// What the operator wrote about it.
    pub note: String,
    /// When it was added, ms since the epoch.
    pub created_ms: i64,
}

impl Peer {
    /// `{"ip", "note", "created"}`.
    pub fn to_json(&self) -> Value {
        json!({
            "ip": self.ip.to_string(),
            "note": self.note,
            "created": iso_from_ms(self.created_ms),
        })
    }
}

fn from_row(r: Row) -> Result<Peer, OpError> {
    let mut it = r.into_iter();
    let mut next = || it.next().ok_or_else(|| OpError::Corrupt("peer row".into()));
    let ip = next()?.into_string("peer ip")?;
    let note = next()?.into_string("peer note")?;
    let created_ms = next()?.as_i64("peer created_ms")?;
    Ok(Peer {
        ip: ip
            .parse()
            .map_err(|_| OpError::Corrupt(format!("peer ip {ip:?}")))?,
        note,
        created_ms,
    })
}

/// Every foreign peer, by address text.
pub fn all(db: &mut Db<'_>) -> Result<Vec<Peer>, OpError> {
    db.query(
        "SELECT ip, note, created_ms FROM fabric_peers ORDER BY ip",
        &[],
    )?
    .into_iter()
    .map(from_row)
    .collect()
}

/// The foreign peers' addresses.
pub fn addresses(db: &mut Db<'_>) -> Result<Vec<IpAddr>, OpError> {
    Ok(all(db)?.into_iter().map(|p| p.ip).collect())
}

/// The address in a URL: a unicast IPv4 or IPv6 address, else 422 naming it.
pub fn parse_peer_ip(raw: &str) -> Result<IpAddr, ApiError> {
    let bad = |why: &str| {
        ApiError::invalid(
            "ip",
            format!("{raw:?} {why}: expected the unicast underlay address of a VXLAN peer, e.g. 192.168.77.9"),
        )
    };
    let ip: IpAddr = raw.parse().map_err(|_| bad("is not an IP address"))?;
    let unicast = match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_multicast() && !v4.is_broadcast(),
        IpAddr::V6(v6) => !v6.is_unspecified() && !v6.is_multicast(),
    };
    if !unicast {
        return Err(bad("is not a unicast address"));
    }
    Ok(ip)
}

fn get(db: &mut Db<'_>, ip: IpAddr) -> Result<Option<Peer>, OpError> {
    db.query_opt(
        "SELECT ip, note, created_ms FROM fabric_peers WHERE ip = $1",
        &[Val::text(ip.to_string())],
    )?
    .map(from_row)
    .transpose()
}

fn record(db: &mut Db<'_>, ip: IpAddr, action: &str) -> Result<(), OpError> {
    let ip = ip.to_string();
    changes::record(
        db,
        &Change {
            kind: kind::PEER,
            uuid: &ip,
            action,
            owner_uuid: None,
            servers: &[],
        },
    )
}

/// `GET /peers`: every foreign peer by address; `limit`, `offset`.
pub fn list(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["limit", "offset"]);
    let (limit, offset) = p.pagination();
    p.finish()?;
    let out: Vec<Value> = all(db)?.iter().map(Peer::to_json).collect();
    Ok(Value::Array(page(out, limit, offset)))
}

/// `PUT /peers/:ip` (`note` optional, kept when absent): adds the peer (a `peer` `create`
/// change) or updates its note (no change: members are the same).
pub fn put(db: &mut Db<'_>, raw_ip: &str, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["note"]);
    let note = p.text("note", MAX_NOTE);
    p.finish()?;
    let ip = parse_peer_ip(raw_ip)?;
    db.lock(lock_key(LOCK_GLOBAL, "peers"))?;
    let peer = match get(db, ip)? {
        Some(old) => {
            let new = Peer {
                note: note.unwrap_or_else(|| old.note.clone()),
                ..old.clone()
            };
            if new != old {
                db.exec(
                    "UPDATE fabric_peers SET note = $1 WHERE ip = $2",
                    &[Val::text(&new.note), Val::text(ip.to_string())],
                )?;
            }
            new
        }
        None => {
            let new = Peer {
                ip,
                note: note.unwrap_or_default(),
                created_ms: now_ms(),
            };
            db.exec(
                "INSERT INTO fabric_peers (ip, note, created_ms) VALUES ($1, $2, $3)",
                &[
                    Val::text(ip.to_string()),
                    Val::text(&new.note),
                    Val::int(new.created_ms),
                ],
            )?;
            record(db, ip, "create")?;
            new
        }
    };
    Ok(peer.to_json())
}

/// `DELETE /peers/:ip`: removes the peer (a `peer` `delete` change); 404 if it is not listed.
pub fn delete(db: &mut Db<'_>, raw_ip: &str, p: &mut Params) -> Result<(), OpError> {
    p.allow_only(&[]);
    p.finish()?;
    let ip = parse_peer_ip(raw_ip)?;
    db.lock(lock_key(LOCK_GLOBAL, "peers"))?;
    let n = db.exec(
        "DELETE FROM fabric_peers WHERE ip = $1",
        &[Val::text(ip.to_string())],
    )?;
    if n == 0 {
        return Err(ApiError::not_found(format!("peer {ip} not found")).into());
    }
    record(db, ip, "delete")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_must_be_unicast() {
        assert_eq!(
            parse_peer_ip("192.168.77.9").unwrap(),
            "192.168.77.9".parse::<IpAddr>().unwrap()
        );
        assert!(parse_peer_ip("fd00::9").is_ok());
        for bad in [
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "ff02::1",
            "x",
            "1.2.3",
        ] {
            let e = parse_peer_ip(bad).unwrap_err();
            assert_eq!(e.status, 422, "{bad}");
            assert!(e.errors[0].message.contains("unicast underlay"), "{bad}");
        }
    }

    #[test]
    fn json_shape() {
        let p = Peer {
            ip: "192.168.77.9".parse().unwrap(),
            note: "linux vxlan".into(),
            created_ms: 0,
        };
        assert_eq!(
            p.to_json(),
            json!({"ip": "192.168.77.9", "note": "linux vxlan", "created": "1970-01-01T00:00:00.000Z"})
        );
    }
}
