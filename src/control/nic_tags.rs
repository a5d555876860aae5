//! NIC tags (`napi_nic_tags`): named physical networks a NIC can attach to, with an MTU.

use serde_json::{json, Value};

use super::db::{lock_key, Db, Val, LOCK_GLOBAL};
use super::error::{ApiError, FieldError, OpError};
use super::params::{page, random_uuid, Params};

/// A stored NIC tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicTag {
    /// Name (`[a-zA-Z0-9_]`, at most 31 characters).
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// MTU, 1500..=9000.
    pub mtu: i64,
}

impl NicTag {
    /// NAPI's serialized tag.
    pub fn to_json(&self) -> Value {
        json!({"mtu": self.mtu, "name": self.name, "uuid": self.uuid})
    }
}

fn from_row(r: super::db::Row) -> Result<NicTag, OpError> {
    let mut it = r.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| OpError::Corrupt("nic tag row".into()))
    };
    Ok(NicTag {
        name: next()?.into_string("name")?,
        uuid: next()?.into_string("uuid")?,
        mtu: next()?.as_i64("mtu")?,
    })
}

/// One tag.
pub fn get(db: &mut Db<'_>, name: &str) -> Result<Option<NicTag>, OpError> {
    db.query_opt(
        "SELECT name, uuid, mtu FROM napi_nic_tags WHERE name = $1",
        &[Val::text(name)],
    )?
    .map(from_row)
    .transpose()
}

/// A tag named in a URL, or 404.
pub fn find(db: &mut Db<'_>, name: &str) -> Result<NicTag, OpError> {
    get(db, name)?.ok_or_else(|| ApiError::not_found("nic tag not found").into())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 31 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

const NAME_MSG: &str =
    "must only contain numbers, letters and underscores, and be at most 31 characters long";
const MTU_MSG: &str = "mtu must be a number between 1500 and 9000";

/// Writes a tag (insert or replace).
fn put(db: &mut Db<'_>, t: &NicTag) -> Result<(), OpError> {
    db.exec(
        "INSERT INTO napi_nic_tags (name, uuid, mtu) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET uuid = excluded.uuid, mtu = excluded.mtu",
        &[Val::text(&t.name), Val::text(&t.uuid), Val::int(t.mtu)],
    )?;
    Ok(())
}

/// Creates the tag if it does not exist (the overlay tag at start).
pub fn ensure(db: &mut Db<'_>, name: &str, mtu: i64) -> Result<(), OpError> {
    db.lock(lock_key(LOCK_GLOBAL, "nic_tags"))?;
    if get(db, name)?.is_none() {
        let uuid = random_uuid().map_err(|e| OpError::Corrupt(format!("random: {e}")))?;
        put(
            db,
            &NicTag {
                name: name.to_string(),
                uuid,
                mtu,
            },
        )?;
    }
    Ok(())
}

/// CreateNicTag.
pub fn create(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["name", "mtu", "uuid"]);
    let name = p.string("name");
    let name = p.require("name", name);
    if let Some(n) = &name {
        if !valid_name(n) {
            p.invalid("name", NAME_MSG);
        }
    }
    let mtu = p.int_in("mtu", 1500, 9000, MTU_MSG).unwrap_or(1500);
    let uuid = p.uuid("uuid");
    p.finish()?;
    let name = name.unwrap_or_default();
    db.lock(lock_key(LOCK_GLOBAL, "nic_tags"))?;
    if get(db, &name)?.is_some() {
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
    let t = NicTag { name, uuid, mtu };
    put(db, &t)?;
    Ok(t.to_json())
}

/// ListNicTags, by name.
pub fn list(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["limit", "offset"]);
    let (limit, offset) = p.pagination();
    p.finish()?;
    let tags = db
        .query(
            "SELECT name, uuid, mtu FROM napi_nic_tags ORDER BY name",
            &[],
        )?
        .into_iter()
        .map(|r| from_row(r).map(|t| t.to_json()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(page(tags, limit, offset)))
}

/// Networks using a tag (for refusing renames and deletes).
fn users(db: &mut Db<'_>, name: &str) -> Result<Vec<FieldError>, OpError> {
    db.query(
        "SELECT uuid FROM napi_networks WHERE nic_tag = $1 ORDER BY uuid LIMIT 10",
        &[Val::text(name)],
    )?
    .into_iter()
    .map(|r| {
        let u = r.into_iter().next().map(|v| v.into_string("uuid"));
        let u = u.unwrap_or_else(|| Err(OpError::Corrupt("uuid".into())))?;
        Ok(FieldError::used_by(
            "nic_tag",
            "network",
            &u,
            format!("In use by network \"{u}\""),
        ))
    })
    .collect()
}

/// UpdateNicTag.
pub fn update(db: &mut Db<'_>, name: &str, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["name", "mtu", "uuid"]);
    let new_name = p.string("name");
    if let Some(n) = &new_name {
        if !valid_name(n) {
            p.invalid("name", NAME_MSG);
        }
    }
    let mtu = p.int_in("mtu", 1500, 9000, MTU_MSG);
    if p.has("uuid") {
        p.invalid("uuid", "uuid cannot be changed");
    }
    p.finish()?;
    db.lock(lock_key(LOCK_GLOBAL, "nic_tags"))?;
    let mut t = find(db, name)?;
    if name == "admin" {
        return Err(ApiError::invalid("name", "\"admin\" tag cannot be updated").into());
    }
    if let Some(n) = new_name.filter(|n| n != name) {
        if name == "external" {
            return Err(ApiError::invalid("name", "\"external\" tag cannot be renamed").into());
        }
        let used = users(db, name)?;
        if !used.is_empty() {
            return Err(ApiError::invalid_params(used).into());
        }
        if get(db, &n)?.is_some() {
            return Err(ApiError::invalid_params(vec![FieldError::duplicate(
                "name",
                "Already exists",
            )])
            .into());
        }
        db.exec(
            "DELETE FROM napi_nic_tags WHERE name = $1",
            &[Val::text(name)],
        )?;
        t.name = n;
    }
    if let Some(m) = mtu {
        let max_net: Option<i64> = db
            .query(
                "SELECT doc FROM napi_networks WHERE nic_tag = $1",
                &[Val::text(name)],
            )?
            .into_iter()
            .filter_map(|r| r.into_iter().next()?.into_opt_string())
            .filter_map(|d| serde_json::from_str::<super::networks::Network>(&d).ok())
            .map(|n| i64::from(n.mtu))
            .max();
        if max_net.is_some_and(|x| x > m) {
            return Err(ApiError::invalid(
                "mtu",
                "mtu must be at least the MTU of every network with this tag",
            )
            .into());
        }
        t.mtu = m;
    }
    put(db, &t)?;
    Ok(t.to_json())
}

/// DeleteNicTag: refused while networks use it.
pub fn delete(db: &mut Db<'_>, name: &str) -> Result<(), OpError> {
    db.lock(lock_key(LOCK_GLOBAL, "nic_tags"))?;
    find(db, name)?;
    let used = users(db, name)?;
    if !used.is_empty() {
        return Err(ApiError::in_use("nic tag is in use by networks", used).into());
    }
    db.exec(
        "DELETE FROM napi_nic_tags WHERE name = $1",
        &[Val::text(name)],
    )?;
    Ok(())
}
