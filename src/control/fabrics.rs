//! Fabrics: per-owner overlays. Every owner gets one random 24-bit `vnet_id` (on its first
//! VLAN), shared by all its VLANs and fabric networks.

use serde_json::{json, Map, Value};

use super::db::{lock_key, Db, Val, LOCK_GLOBAL, LOCK_OWNER};
use super::error::{ApiError, FieldError, OpError};
use super::networks::{self, Network, View};
use super::params::{page, parse_uuid, select_fields, Params};
use super::Config;

/// Largest vnet_id (24 bits).
pub const MAX_VNET_ID: u32 = 16_777_215;

/// A fabric VLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vlan {
    /// Owner.
    pub owner_uuid: String,
    /// 0..=4094.
    pub vlan_id: u16,
    /// The owner's VNI.
    pub vnet_id: u32,
    /// Optional name.
    pub name: Option<String>,
    /// Optional description.
    pub description: Option<String>,
}

impl Vlan {
    /// NAPI's serialized VLAN.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), json!(self.name));
        m.insert("owner_uuid".into(), json!(self.owner_uuid));
        m.insert("vlan_id".into(), json!(self.vlan_id));
        m.insert("vnet_id".into(), json!(self.vnet_id));
        if let Some(d) = &self.description {
            m.insert("description".into(), json!(d));
        }
        Value::Object(m)
    }
}

const VLAN_FIELDS: &[&str] = &["name", "owner_uuid", "vlan_id", "vnet_id", "description"];
const VLAN_MSG: &str = "VLAN ID must be a number between 0 and 4094, and not 1";

/// Checks the overlay switch and the owner UUID in the URL.
pub fn check_owner(cfg: &Config, owner: &str) -> Result<String, ApiError> {
    if !cfg.fabrics_enabled {
        return Err(ApiError::precondition_required(
            "overlay networking is not enabled",
        ));
    }
    parse_uuid(owner).ok_or_else(|| ApiError::invalid("owner_uuid", "invalid UUID"))
}

fn url_vlan(vlan: &str) -> Result<u16, ApiError> {
    match vlan.parse::<u16>() {
        Ok(v) if v <= 4094 && vlan.bytes().all(|b| b.is_ascii_digit()) => Ok(v),
        _ => Err(ApiError::invalid("vlan_id", VLAN_MSG)),
    }
}

/// The owner's vnet_id, if it has one.
pub fn vnet_of(db: &mut Db<'_>, owner: &str) -> Result<Option<u32>, OpError> {
    db.query_opt(
        "SELECT vnet_id FROM napi_fabrics WHERE owner_uuid = $1",
        &[Val::text(owner)],
    )?
    .map(|r| r[0].as_i64("vnet_id").map(|v| v as u32))
    .transpose()
}

/// The owner's vnet_id, created (random, retried on collision) if it has none.
fn ensure_vnet(db: &mut Db<'_>, owner: &str) -> Result<u32, OpError> {
    if let Some(v) = vnet_of(db, owner)? {
        return Ok(v);
    }
    for _ in 0..64 {
        let mut b = [0u8; 4];
        getrandom::getrandom(&mut b).map_err(|e| OpError::Corrupt(format!("random: {e}")))?;
        let v = u32::from_be_bytes(b) % MAX_VNET_ID;
        let taken = db
            .query_opt(
                "SELECT owner_uuid FROM napi_fabrics WHERE vnet_id = $1",
                &[Val::int(v)],
            )?
            .is_some();
        if !taken {
            db.exec(
                "INSERT INTO napi_fabrics (owner_uuid, vnet_id) VALUES ($1, $2)",
                &[Val::text(owner), Val::int(v)],
            )?;
            return Ok(v);
        }
    }
    Err(OpError::Corrupt("no free vnet_id after 64 tries".into()))
}

fn vlan_from_row(r: super::db::Row, vnet_id: u32) -> Result<Vlan, OpError> {
    let mut it = r.into_iter();
    let mut next = || it.next().ok_or_else(|| OpError::Corrupt("vlan row".into()));
    Ok(Vlan {
        owner_uuid: next()?.into_string("owner_uuid")?,
        vlan_id: next()?.as_i64("vlan_id")? as u16,
        name: next()?.into_opt_string(),
        description: next()?.into_opt_string(),
        vnet_id,
    })
}

/// One VLAN.
pub fn get_vlan(db: &mut Db<'_>, owner: &str, vlan: u16) -> Result<Option<Vlan>, OpError> {
    let Some(vnet) = vnet_of(db, owner)? else {
        return Ok(None);
    };
    db.query_opt(
        "SELECT owner_uuid, vlan_id, name, description FROM napi_fabric_vlans \
         WHERE owner_uuid = $1 AND vlan_id = $2",
        &[Val::text(owner), Val::int(vlan)],
    )?
    .map(|r| vlan_from_row(r, vnet))
    .transpose()
}

/// The VLAN in a URL, or 404 "vlan not found".
pub fn find_vlan(db: &mut Db<'_>, owner: &str, vlan: &str) -> Result<Vlan, OpError> {
    let v = url_vlan(vlan)?;
    get_vlan(db, owner, v)?.ok_or_else(|| ApiError::not_found("vlan not found").into())
}

/// Writes a VLAN: a new row (`creating`), or the existing one (404 if it is gone, never
/// re-created). The caller holds the owner's lock.
fn save_vlan(db: &mut Db<'_>, v: &Vlan, creating: bool) -> Result<(), OpError> {
    let params = [
        Val::text(&v.owner_uuid),
        Val::int(v.vlan_id),
        Val::opt_text(v.name.as_deref()),
        Val::opt_text(v.description.as_deref()),
    ];
    if creating {
        db.exec(
            "INSERT INTO napi_fabric_vlans (owner_uuid, vlan_id, name, description) \
             VALUES ($1, $2, $3, $4)",
            &params,
        )?;
    } else if db.exec(
        "UPDATE napi_fabric_vlans SET name = $1, description = $2 \
         WHERE owner_uuid = $3 AND vlan_id = $4",
        &[
            params[2].clone(),
            params[3].clone(),
            params[0].clone(),
            params[1].clone(),
        ],
    )? == 0
    {
        return Err(ApiError::not_found("vlan not found").into());
    }
    Ok(())
}

/// CreateFabricVLAN.
pub fn create_vlan(db: &mut Db<'_>, owner: &str, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["vlan_id", "name", "description", "fields", "owner_uuid"]);
    let vlan = p.int_in("vlan_id", 0, 4094, VLAN_MSG);
    let vlan = p.require("vlan_id", vlan);
    let name = p.name("name", 255);
    let description = p.text("description", 255);
    let fields = if p.has("fields") {
        p.fields(VLAN_FIELDS)
    } else {
        None
    };
    p.finish()?;
    let vlan = vlan.unwrap_or(0) as u16;
    db.lock(lock_key(LOCK_OWNER, owner))?;
    db.lock(lock_key(LOCK_OWNER, "vnet_ids"))?;
    if get_vlan(db, owner, vlan)?.is_some() {
        return Err(ApiError::in_use(
            "VLAN ID is already in use",
            vec![FieldError::duplicate(
                "vlan_id",
                "VLAN ID is already in use",
            )],
        )
        .into());
    }
    let vnet_id = ensure_vnet(db, owner)?;
    let v = Vlan {
        owner_uuid: owner.to_string(),
        vlan_id: vlan,
        vnet_id,
        name,
        description,
    };
    save_vlan(db, &v, true)?;
    Ok(select_fields(v.to_json(), fields.as_deref()))
}

/// ListFabricVLANs, by vlan_id.
pub fn list_vlans(db: &mut Db<'_>, owner: &str, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["fields", "limit", "offset", "owner_uuid"]);
    let fields = if p.has("fields") {
        p.fields(VLAN_FIELDS)
    } else {
        None
    };
    let (limit, offset) = p.pagination();
    p.finish()?;
    let Some(vnet) = vnet_of(db, owner)? else {
        return Ok(json!([]));
    };
    let vlans = db
        .query(
            "SELECT owner_uuid, vlan_id, name, description FROM napi_fabric_vlans \
             WHERE owner_uuid = $1 ORDER BY vlan_id",
            &[Val::text(owner)],
        )?
        .into_iter()
        .map(|r| vlan_from_row(r, vnet).map(|v| select_fields(v.to_json(), fields.as_deref())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(page(vlans, limit, offset)))
}

/// GetFabricVLAN.
pub fn get_vlan_api(
    db: &mut Db<'_>,
    owner: &str,
    vlan: &str,
    p: &mut Params,
) -> Result<Value, OpError> {
    p.allow_only(&["fields", "owner_uuid", "vlan_id"]);
    let fields = if p.has("fields") {
        p.fields(VLAN_FIELDS)
    } else {
        None
    };
    p.finish()?;
    let v = find_vlan(db, owner, vlan)?;
    Ok(select_fields(v.to_json(), fields.as_deref()))
}

/// UpdateFabricVLAN: name and description.
pub fn update_vlan(
    db: &mut Db<'_>,
    owner: &str,
    vlan: &str,
    p: &mut Params,
) -> Result<Value, OpError> {
    p.allow_only(&[
        "name",
        "description",
        "fields",
        "owner_uuid",
        "vlan_id",
        "vnet_id",
    ]);
    let name = p.name("name", 255);
    let description = p.text("description", 255);
    let fields = if p.has("fields") {
        p.fields(VLAN_FIELDS)
    } else {
        None
    };
    db.lock(lock_key(LOCK_OWNER, owner))?;
    let mut v = find_vlan(db, owner, vlan)?;
    if let Some(x) = p.raw("vlan_id").cloned() {
        if super::params::as_int(&x) != Some(i64::from(v.vlan_id)) {
            p.invalid("vlan_id", "vlan_id cannot be changed");
        }
    }
    if let Some(x) = p.raw("owner_uuid").cloned() {
        if x.as_str().and_then(parse_uuid).as_deref() != Some(owner) {
            p.invalid("owner_uuid", "owner_uuid cannot be changed");
        }
    }
    if p.has("vnet_id") {
        p.invalid("vnet_id", "vnet_id cannot be changed");
    }
    p.finish()?;
    if let Some(x) = name {
        v.name = Some(x);
    }
    if let Some(x) = description {
        v.description = Some(x);
    }
    save_vlan(db, &v, false)?;
    Ok(select_fields(v.to_json(), fields.as_deref()))
}

fn vlan_networks(db: &mut Db<'_>, v: &Vlan) -> Result<Vec<Network>, OpError> {
    Ok(networks::on_vnet(db, v.vnet_id)?
        .into_iter()
        .filter(|n| {
            n.fabric && n.vlan_id == v.vlan_id && n.owner_uuids.first() == Some(&v.owner_uuid)
        })
        .collect())
}

/// DeleteFabricVLAN: refused while it has networks.
pub fn delete_vlan(db: &mut Db<'_>, owner: &str, vlan: &str) -> Result<(), OpError> {
    db.lock(lock_key(LOCK_OWNER, owner))?;
    let v = find_vlan(db, owner, vlan)?;
    let nets = vlan_networks(db, &v)?;
    if !nets.is_empty() {
        return Err(ApiError::in_use(
            "VLAN must have no networks",
            nets.iter()
                .map(|n| {
                    FieldError::used_by_no_field(
                        "network",
                        &n.uuid,
                        format!("In use by network \"{}\"", n.uuid),
                    )
                })
                .collect(),
        )
        .into());
    }
    db.exec(
        "DELETE FROM napi_fabric_vlans WHERE owner_uuid = $1 AND vlan_id = $2",
        &[Val::text(owner), Val::int(v.vlan_id)],
    )?;
    Ok(())
}

/// CreateFabricNetwork.
pub fn create_network(
    db: &mut Db<'_>,
    cfg: &Config,
    owner: &str,
    vlan: &str,
    p: &mut Params,
) -> Result<Value, OpError> {
    // The locks networks::create takes, in its order, before the VLAN is read: a concurrent
    // DeleteFabricVLAN (owner lock) either sees this network or has removed the VLAN (404).
    db.lock(lock_key(LOCK_GLOBAL, "networks"))?;
    db.lock(lock_key(LOCK_GLOBAL, "nic_tags"))?;
    db.lock(lock_key(LOCK_OWNER, owner))?;
    let v = find_vlan(db, owner, vlan)?;
    let req = networks::validate_create(p, cfg, Some((owner, v.vlan_id, v.vnet_id)))?;
    networks::create(db, cfg, req, View::Fabric)
}

/// ListFabricNetworks.
pub fn list_networks(
    db: &mut Db<'_>,
    owner: &str,
    vlan: &str,
    p: &mut Params,
) -> Result<Value, OpError> {
    p.allow_only(&["fields", "limit", "offset", "owner_uuid", "vlan_id"]);
    let fields = if p.has("fields") {
        p.fields(networks::FIELDS)
    } else {
        None
    };
    let (limit, offset) = p.pagination();
    p.finish()?;
    let v = find_vlan(db, owner, vlan)?;
    let nets: Vec<Value> = vlan_networks(db, &v)?
        .iter()
        .map(|n| select_fields(n.to_json(View::Fabric), fields.as_deref()))
        .collect();
    Ok(Value::Array(page(nets, limit, offset)))
}

/// A fabric network of this owner and VLAN, or 404.
pub fn find_network(
    db: &mut Db<'_>,
    owner: &str,
    vlan: &str,
    uuid: &str,
) -> Result<Network, OpError> {
    let v = find_vlan(db, owner, vlan)?;
    let n = networks::find(db, uuid)?;
    if !n.fabric
        || n.vlan_id != v.vlan_id
        || n.owner_uuids.first().map(String::as_str) != Some(owner)
    {
        return Err(ApiError::not_found("network not found").into());
    }
    Ok(n)
}

/// GetFabricNetwork.
pub fn get_network(
    db: &mut Db<'_>,
    owner: &str,
    vlan: &str,
    uuid: &str,
    p: &mut Params,
) -> Result<Value, OpError> {
    p.allow_only(&["fields", "owner_uuid", "vlan_id"]);
    let fields = if p.has("fields") {
        p.fields(networks::FIELDS)
    } else {
        None
    };
    p.finish()?;
    let n = find_network(db, owner, vlan, uuid)?;
    Ok(select_fields(n.to_json(View::Fabric), fields.as_deref()))
}
