//! Read-only admin views of Portolan's records (`/portolan/...`), for operators and tests:
//! overlay mappings of a VNI (tombstones included), a host's underlay mapping, a host's event log.

use std::net::Ipv6Addr;

use serde_json::{json, Value};

use super::db::{Db, Row, Val};
use super::error::{ApiError, OpError};
use super::nics::mac_string;
use super::params::{page, Params};

fn ip_text(b: Vec<u8>) -> Result<String, OpError> {
    let a: [u8; 16] = b
        .try_into()
        .map_err(|_| OpError::Corrupt("portolan IP: expected 16 bytes".into()))?;
    Ok(portolan::svp::from_wire_ip(Ipv6Addr::from(a)).to_string())
}

fn uuid_text(b: Vec<u8>) -> Result<String, OpError> {
    let a: [u8; 16] = b
        .try_into()
        .map_err(|_| OpError::Corrupt("portolan UUID: expected 16 bytes".into()))?;
    Ok(portolan::store::CnUuid(a).to_string())
}

fn cn_param(p: &mut Params, name: &str) -> Option<portolan::store::CnUuid> {
    let u = p.uuid(name)?;
    u.parse().ok()
}

/// `GET /portolan/mappings?vnet_id=N`: every mapping of the VNI, by IP.
pub fn mappings(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["vnet_id", "limit", "offset"]);
    let vnet = p.int_in(
        "vnet_id",
        0,
        i64::from(u32::MAX),
        "vnet_id must be a number between 0 and 16777215",
    );
    let vnet = p.require("vnet_id", vnet);
    let (limit, offset) = p.pagination();
    p.finish()?;
    let rows = db.query(
        "SELECT ip, mac, cn_uuid, vlan, deleted, version FROM portolan_overlay \
         WHERE vnet_id = $1 ORDER BY ip",
        &[Val::Int(vnet)],
    )?;
    let mut out = Vec::new();
    for r in rows {
        let mut it = r.into_iter();
        let mut next = || {
            it.next()
                .ok_or_else(|| OpError::Corrupt("mapping row".into()))
        };
        let ip = ip_text(next()?.into_bytes("ip")?)?;
        let mac = next()?.as_i64("mac")? as u64;
        let cn = uuid_text(next()?.into_bytes("cn_uuid")?)?;
        let vlan = next()?.as_i64("vlan")?;
        let deleted = next()?.as_i64("deleted")? != 0;
        let version = next()?.as_i64("version")?;
        out.push(json!({
            "vnet_id": vnet, "ip": ip, "mac": mac_string(mac), "mac_int": mac,
            "cn_uuid": cn, "vlan": vlan, "deleted": deleted, "version": version,
        }));
    }
    Ok(Value::Array(page(out, limit, offset)))
}

/// `GET /portolan/underlay/:cn_uuid`.
pub fn underlay(db: &mut Db<'_>, cn: &str) -> Result<Value, OpError> {
    let Some(c) =
        super::params::parse_uuid(cn).and_then(|u| u.parse::<portolan::store::CnUuid>().ok())
    else {
        return Err(ApiError::invalid("cn_uuid", "invalid UUID").into());
    };
    let row = db.query_opt(
        "SELECT ip, port FROM portolan_underlay WHERE cn_uuid = $1",
        &[Val::Bytes(Some(c.0.to_vec()))],
    )?;
    let Some(r) = row else {
        return Err(ApiError::not_found("underlay mapping not found").into());
    };
    let mut it = r.into_iter();
    let ip = ip_text(
        it.next()
            .ok_or_else(|| OpError::Corrupt("underlay row".into()))?
            .into_bytes("ip")?,
    )?;
    let port = it
        .next()
        .ok_or_else(|| OpError::Corrupt("underlay row".into()))?
        .as_i64("port")?;
    Ok(json!({"cn_uuid": c.to_string(), "ip": ip, "port": port}))
}

fn event_json(cn: &str, r: Row) -> Result<Value, OpError> {
    let mut it = r.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| OpError::Corrupt("event row".into()))
    };
    let id = uuid_text(next()?.into_bytes("id")?)?;
    let vnet = next()?.as_i64("vnet_id")?;
    let kind = next()?.as_i64("kind")?;
    let mac = next()?.as_i64("mac")? as u64;
    let ip = match next()? {
        Val::Bytes(Some(b)) => Some(ip_text(b)?),
        _ => None,
    };
    let vlan = next()?.as_i64("vlan")?;
    let record = match kind {
        1 => json!({"type": "SVP_LOG_VL2", "mac": mac_string(mac), "vnet_id": vnet}),
        2 => {
            json!({"type": "SVP_LOG_VL3", "ip": ip, "mac": mac_string(mac), "vlan": vlan, "vnet_id": vnet})
        }
        k => return Err(OpError::Corrupt(format!("event kind {k}"))),
    };
    Ok(json!({"id": id, "cn_uuid": cn, "vnet_id": vnet, "record": record}))
}

/// `GET /portolan/events?cn_uuid=U`: the host's log, oldest first.
pub fn events(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["cn_uuid", "limit", "offset"]);
    let cn = cn_param(p, "cn_uuid");
    let cn = p.require("cn_uuid", cn);
    let (limit, offset) = p.pagination();
    p.finish()?;
    let Some(cn) = cn else {
        return Ok(json!([]));
    };
    let rows = db.query(
        "SELECT id, vnet_id, kind, mac, ip, vlan FROM portolan_events WHERE cn_uuid = $1 ORDER BY seq",
        &[Val::Bytes(Some(cn.0.to_vec()))],
    )?;
    let c = cn.to_string();
    let out = rows
        .into_iter()
        .map(|r| event_json(&c, r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(page(out, limit, offset)))
}
