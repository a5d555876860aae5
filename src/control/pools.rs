//! Network pools (`napi_network_pools`): an ordered set of networks of one NIC tag; provisioning
//! on a pool takes the first member network with a free address.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::db::{lock_key, Db, Val, LOCK_GLOBAL};
use super::error::{ApiError, FieldError, OpError};
use super::networks::{self, Network};
use super::params::{page, parse_uuid, random_uuid, Params};

/// A stored pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pool {
    /// UUID.
    pub uuid: String,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Member networks, in provisioning order.
    pub networks: Vec<String>,
    /// Owners (empty: anyone).
    pub owner_uuids: Vec<String>,
    /// The members' NIC tag.
    pub nic_tag: String,
}

impl Pool {
    /// NAPI's serialized pool.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("uuid".into(), json!(self.uuid));
        m.insert("name".into(), json!(self.name));
        if let Some(d) = &self.description {
            m.insert("description".into(), json!(d));
        }
        m.insert("family".into(), json!("ipv4"));
        let mut sorted = self.networks.clone();
        sorted.sort();
        m.insert("networks".into(), json!(sorted));
        m.insert("nic_tag".into(), json!(self.nic_tag));
        m.insert("nic_tags_present".into(), json!([self.nic_tag]));
        if !self.owner_uuids.is_empty() {
            m.insert("owner_uuids".into(), json!(self.owner_uuids));
        }
        Value::Object(m)
    }
}

fn from_row(r: super::db::Row) -> Result<Pool, OpError> {
    super::db::doc_from_row(r, "pool")
}

/// One pool.
pub fn get(db: &mut Db<'_>, uuid: &str) -> Result<Option<Pool>, OpError> {
    db.query_opt(
        "SELECT doc FROM napi_network_pools WHERE uuid = $1",
        &[Val::text(uuid)],
    )?
    .map(from_row)
    .transpose()
}

/// The pool in a URL, or 404.
pub fn find(db: &mut Db<'_>, uuid: &str) -> Result<Pool, OpError> {
    let Some(u) = parse_uuid(uuid) else {
        return Err(ApiError::not_found("network pool not found").into());
    };
    get(db, &u)?.ok_or_else(|| ApiError::not_found("network pool not found").into())
}

fn all(db: &mut Db<'_>) -> Result<Vec<Pool>, OpError> {
    db.query("SELECT doc FROM napi_network_pools ORDER BY name", &[])?
        .into_iter()
        .map(from_row)
        .collect()
}

/// Pools that list `network` (to refuse deleting it).
pub fn holding(db: &mut Db<'_>, network: &str) -> Result<Vec<Pool>, OpError> {
    Ok(all(db)?
        .into_iter()
        .filter(|p| p.networks.iter().any(|n| n == network))
        .collect())
}

fn save(db: &mut Db<'_>, p: &Pool) -> Result<(), OpError> {
    db.exec(
        "INSERT INTO napi_network_pools (uuid, name, doc) VALUES ($1, $2, $3) \
         ON CONFLICT (uuid) DO UPDATE SET name = excluded.name, doc = excluded.doc",
        &[
            Val::text(&p.uuid),
            Val::text(&p.name),
            Val::text(serde_json::to_string(p)?),
        ],
    )?;
    Ok(())
}

/// Checks members: they exist and share one NIC tag; returns that tag.
fn check_members(db: &mut Db<'_>, members: &[String]) -> Result<String, OpError> {
    let mut nets: Vec<Network> = Vec::new();
    let mut missing = Vec::new();
    for u in members {
        match networks::get(db, u)? {
            Some(n) => nets.push(n),
            None => missing.push(json!(u)),
        }
    }
    if !missing.is_empty() {
        let mut e = FieldError::invalid("networks", "unknown networks");
        e.invalid = Some(missing);
        return Err(ApiError::invalid_params(vec![e]).into());
    }
    let tag = nets.first().map(|n| n.nic_tag.clone()).unwrap_or_default();
    if nets.iter().any(|n| n.nic_tag != tag) {
        return Err(
            ApiError::invalid("networks", "all networks must have the same nic tag").into(),
        );
    }
    Ok(tag)
}

fn validate(p: &mut Params, creating: bool) -> (Option<String>, Option<Vec<String>>) {
    p.allow_only(&["name", "networks", "description", "owner_uuids", "uuid"]);
    let name = p.name("name", 255);
    let networks = p.uuid_array("networks");
    if creating {
        p.require("name", name.as_ref());
        p.require("networks", networks.as_ref());
    }
    if networks.as_ref().is_some_and(Vec::is_empty) {
        p.invalid("networks", "must contain at least one network");
    }
    (name, networks)
}

/// CreateNetworkPool.
pub fn create(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    let (name, members) = validate(p, true);
    let description = p.text("description", 255);
    let owners = p.uuid_array("owner_uuids").unwrap_or_default();
    let uuid = p.uuid("uuid");
    p.finish()?;
    db.lock(lock_key(LOCK_GLOBAL, "networks"))?;
    let members = members.unwrap_or_default();
    let nic_tag = check_members(db, &members)?;
    let name = name.unwrap_or_default();
    if all(db)?.iter().any(|x| x.name == name) {
        return Err(ApiError::invalid_params(vec![FieldError::duplicate(
            "name",
            "Already exists",
        )])
        .into());
    }
    let uuid = match uuid {
        Some(u) => u,
        None => random_uuid().map_err(|e| OpError::Corrupt(format!("random: {e}")))?,
    };
    let pool = Pool {
        uuid,
        name,
        description,
        networks: members,
        owner_uuids: owners,
        nic_tag,
    };
    save(db, &pool)?;
    Ok(pool.to_json())
}

/// ListNetworkPools.
pub fn list(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["provisionable_by", "name", "limit", "offset"]);
    let prov = p.uuid("provisionable_by");
    let name = p.string("name");
    let (limit, offset) = p.pagination();
    p.finish()?;
    let out: Vec<Value> = all(db)?
        .into_iter()
        .filter(|x| name.as_ref().is_none_or(|n| &x.name == n))
        .filter(|x| {
            prov.as_ref()
                .is_none_or(|o| x.owner_uuids.is_empty() || x.owner_uuids.contains(o))
        })
        .map(|x| x.to_json())
        .collect();
    Ok(Value::Array(page(out, limit, offset)))
}

/// UpdateNetworkPool.
pub fn update(db: &mut Db<'_>, uuid: &str, p: &mut Params) -> Result<Value, OpError> {
    let (name, members) = validate(p, false);
    let description = p.text("description", 255);
    let owners = p.uuid_array("owner_uuids");
    if p.has("uuid") {
        p.invalid("uuid", "uuid cannot be changed");
    }
    p.finish()?;
    db.lock(lock_key(LOCK_GLOBAL, "networks"))?;
    let mut pool = find(db, uuid)?;
    if let Some(m) = members {
        pool.nic_tag = check_members(db, &m)?;
        pool.networks = m;
    }
    if let Some(n) = name {
        if n != pool.name && all(db)?.iter().any(|x| x.name == n) {
            return Err(ApiError::invalid_params(vec![FieldError::duplicate(
                "name",
                "Already exists",
            )])
            .into());
        }
        pool.name = n;
    }
    if let Some(d) = description {
        pool.description = Some(d);
    }
    if let Some(o) = owners {
        pool.owner_uuids = o;
    }
    save(db, &pool)?;
    Ok(pool.to_json())
}

/// DeleteNetworkPool.
pub fn delete(db: &mut Db<'_>, uuid: &str) -> Result<(), OpError> {
    db.lock(lock_key(LOCK_GLOBAL, "networks"))?;
    let pool = find(db, uuid)?;
    db.exec(
        "DELETE FROM napi_network_pools WHERE uuid = $1",
        &[Val::text(&pool.uuid)],
    )?;
    Ok(())
}
