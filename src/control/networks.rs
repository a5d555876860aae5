//! Networks and their IPs (NAPI's `napi_networks` and `napi_ips_<uuid>` buckets), with IPAM:
//! gateway, in-subnet resolvers and broadcast reserved on create; allocation takes the lowest
//! never-used address of the provision range, then the least recently freed one.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::changes::{self, Change};
use super::db::{lock_key, Db, Val, LOCK_GLOBAL, LOCK_NETWORK, LOCK_OWNER};
use super::error::{ApiError, FieldError, OpError};
use super::params::{page, parse_uuid, random_uuid, select_fields, Params};
use super::{now_us, Config};

/// A stored network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Network {
    /// UUID.
    pub uuid: String,
    /// Name (unique globally, or per owner for fabrics).
    pub name: String,
    /// 802.1Q tag, 0..4094.
    pub vlan_id: u16,
    /// Subnet address (canonical).
    pub subnet_ip: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// First address NICs may get.
    pub provision_start: Ipv4Addr,
    /// Last address NICs may get.
    pub provision_end: Ipv4Addr,
    /// NIC tag.
    pub nic_tag: String,
    /// MTU.
    pub mtu: u32,
    /// DNS resolvers.
    pub resolvers: Vec<Ipv4Addr>,
    /// Gateway.
    pub gateway: Option<Ipv4Addr>,
    /// Static routes.
    pub routes: Map<String, Value>,
    /// Owners (empty: anyone).
    pub owner_uuids: Vec<String>,
    /// Free text.
    pub description: Option<String>,
    /// A fabric (overlay) network.
    pub fabric: bool,
    /// The owner's VNI (fabrics).
    pub vnet_id: Option<u32>,
    /// NAT to the internet through the gateway (fabrics).
    pub internet_nat: bool,
    /// Whether a NIC holds the gateway IP (fabrics).
    pub gateway_provisioned: bool,
}

/// How a network is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// `/networks`: `owner_uuids`.
    Plain,
    /// `/fabrics/...`: `owner_uuid`.
    Fabric,
}

impl Network {
    /// Numeric subnet bounds (inclusive).
    pub fn bounds(&self) -> (u32, u32) {
        subnet_bounds(self.subnet_ip, self.prefix)
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> u32 {
        self.bounds().1
    }

    /// Whether `ip` is the subnet's own (network) address, which no host may have: subnets of
    /// four or more addresses (a /31 or /32 has none).
    pub fn is_network_address(&self, ip: Ipv4Addr) -> bool {
        let (lo, hi) = self.bounds();
        hi - lo >= 2 && u32::from(ip) == lo
    }

    /// Whether `ip` is the subnet's broadcast address: subnets of four or more addresses.
    pub fn is_broadcast_address(&self, ip: Ipv4Addr) -> bool {
        let (lo, hi) = self.bounds();
        hi - lo >= 2 && u32::from(ip) == hi
    }

    /// Whether `ip` is in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let (lo, hi) = self.bounds();
        (lo..=hi).contains(&u32::from(ip))
    }

    /// The dotted netmask.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    /// The subnet in CIDR form.
    pub fn subnet(&self) -> String {
        format!("{}/{}", self.subnet_ip, self.prefix)
    }

    /// NAPI's serialized network.
    pub fn to_json(&self, view: View) -> Value {
        let mut m = Map::new();
        m.insert("uuid".into(), json!(self.uuid));
        m.insert("name".into(), json!(self.name));
        m.insert("vlan_id".into(), json!(self.vlan_id));
        m.insert("family".into(), json!("ipv4"));
        m.insert("subnet".into(), json!(self.subnet()));
        m.insert("netmask".into(), json!(self.netmask().to_string()));
        m.insert(
            "provision_start_ip".into(),
            json!(self.provision_start.to_string()),
        );
        m.insert(
            "provision_end_ip".into(),
            json!(self.provision_end.to_string()),
        );
        m.insert("nic_tag".into(), json!(self.nic_tag));
        m.insert("mtu".into(), json!(self.mtu));
        m.insert(
            "resolvers".into(),
            json!(self
                .resolvers
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()),
        );
        if let Some(g) = self.gateway {
            m.insert("gateway".into(), json!(g.to_string()));
        }
        if !self.routes.is_empty() {
            m.insert("routes".into(), Value::Object(self.routes.clone()));
        }
        match view {
            View::Fabric => {
                if let Some(o) = self.owner_uuids.first() {
                    m.insert("owner_uuid".into(), json!(o));
                }
            }
            View::Plain => {
                if !self.owner_uuids.is_empty() {
                    m.insert("owner_uuids".into(), json!(self.owner_uuids));
                }
            }
        }
        if let Some(d) = &self.description {
            m.insert("description".into(), json!(d));
        }
        if self.fabric {
            m.insert("fabric".into(), json!(true));
            m.insert("vnet_id".into(), json!(self.vnet_id));
            m.insert("internet_nat".into(), json!(self.internet_nat));
            if self.gateway.is_some() {
                m.insert(
                    "gateway_provisioned".into(),
                    json!(self.gateway_provisioned),
                );
            }
        }
        Value::Object(m)
    }
}

/// The netmask of a prefix length as an integer.
pub fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// Inclusive numeric bounds of a subnet.
pub fn subnet_bounds(ip: Ipv4Addr, prefix: u8) -> (u32, u32) {
    let lo = u32::from(ip) & mask(prefix);
    (lo, lo | !mask(prefix))
}

/// Whether `lo..=hi` is in RFC 1918 space.
pub fn is_private(lo: u32, hi: u32) -> bool {
    [
        (Ipv4Addr::new(10, 0, 0, 0), 8),
        (Ipv4Addr::new(172, 16, 0, 0), 12),
        (Ipv4Addr::new(192, 168, 0, 0), 16),
    ]
    .iter()
    .any(|(n, p)| {
        let (a, b) = subnet_bounds(*n, *p);
        lo >= a && hi <= b
    })
}

/// Parses a canonical IPv4 CIDR (`10.0.2.0/24`, prefix 8..=32).
pub fn parse_subnet(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let Some((ip, len)) = s.split_once('/') else {
        return Err("Subnet must be in CIDR form".into());
    };
    if ip.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err("IPv6 networks are not supported: expected an IPv4 subnet".into());
    }
    let (Ok(ip), Ok(len)) = (ip.parse::<Ipv4Addr>(), len.parse::<u8>()) else {
        return Err("Subnet must be in CIDR form".into());
    };
    if len > 32 || !len.to_string().eq(s.split_once('/').map_or("", |x| x.1)) {
        return Err("Subnet must be in CIDR form".into());
    }
    if len < 8 {
        return Err("Subnet prefix length must be at least 8".into());
    }
    if u32::from(ip) & !mask(len) != 0 {
        return Err("invalid CIDR format".into());
    }
    Ok((ip, len))
}

const NET_COLS: &str = "doc, gap_hint";

fn net_from_row(row: super::db::Row) -> Result<(Network, i64), OpError> {
    let mut it = row.into_iter();
    let doc = it
        .next()
        .ok_or_else(|| OpError::Corrupt("network row".into()))?
        .into_string("network doc")?;
    let hint = it
        .next()
        .ok_or_else(|| OpError::Corrupt("network row".into()))?
        .as_i64("gap_hint")?;
    Ok((serde_json::from_str(&doc)?, hint))
}

/// Loads a network by UUID.
pub fn get(db: &mut Db<'_>, uuid: &str) -> Result<Option<Network>, OpError> {
    let row = db.query_opt(
        &format!("SELECT {NET_COLS} FROM napi_networks WHERE uuid = $1"),
        &[Val::text(uuid)],
    )?;
    row.map(|r| net_from_row(r).map(|x| x.0)).transpose()
}

/// Loads a network and its allocation hint.
fn get_with_hint(db: &mut Db<'_>, uuid: &str) -> Result<Option<(Network, i64)>, OpError> {
    let row = db.query_opt(
        &format!("SELECT {NET_COLS} FROM napi_networks WHERE uuid = $1"),
        &[Val::text(uuid)],
    )?;
    row.map(net_from_row).transpose()
}

/// Every network, sorted by name.
pub fn all(db: &mut Db<'_>) -> Result<Vec<Network>, OpError> {
    db.query(
        &format!("SELECT {NET_COLS} FROM napi_networks ORDER BY name, uuid"),
        &[],
    )?
    .into_iter()
    .map(|r| net_from_row(r).map(|x| x.0))
    .collect()
}

/// Networks on one VNI.
pub fn on_vnet(db: &mut Db<'_>, vnet_id: u32) -> Result<Vec<Network>, OpError> {
    db.query(
        &format!("SELECT {NET_COLS} FROM napi_networks WHERE vnet_id = $1 ORDER BY name"),
        &[Val::int(vnet_id)],
    )?
    .into_iter()
    .map(|r| net_from_row(r).map(|x| x.0))
    .collect()
}

fn name_key(n: &Network) -> String {
    if n.fabric {
        format!(
            "{}:{}",
            n.owner_uuids.first().map_or("", String::as_str),
            n.name
        )
    } else {
        format!("global:{}", n.name)
    }
}

/// Writes a new network row (the caller holds `LOCK_GLOBAL "networks"` and saw no row with its
/// UUID).
pub fn insert(db: &mut Db<'_>, n: &Network, gap_hint: i64) -> Result<(), OpError> {
    let (lo, hi) = n.bounds();
    let params = [
        Val::text(&n.uuid),
        Val::text(name_key(n)),
        Val::text(&n.name),
        Val::boolean(n.fabric),
        Val::Int(n.vnet_id.map(i64::from)),
        Val::opt_text(n.owner_uuids.first().map(String::as_str)),
        Val::int(n.vlan_id),
        Val::text(&n.nic_tag),
        Val::int(lo),
        Val::int(hi),
        Val::int(gap_hint),
        Val::text(serde_json::to_string(n)?),
    ];
    db.exec(
        "INSERT INTO napi_networks (uuid, name_key, name, fabric, vnet_id, owner_uuid, vlan_id, \
           nic_tag, subnet_lo, subnet_hi, gap_hint, doc) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        &params,
    )?;
    Ok(())
}

/// Rewrites an existing network row (name, owner, hint, document; the rest is immutable); a
/// network that is gone is 404, never re-created.
fn update_row(db: &mut Db<'_>, n: &Network, gap_hint: i64) -> Result<(), OpError> {
    let changed = db.exec(
        "UPDATE napi_networks SET name_key = $1, name = $2, owner_uuid = $3, gap_hint = $4, \
           doc = $5 WHERE uuid = $6",
        &[
            Val::text(name_key(n)),
            Val::text(&n.name),
            Val::opt_text(n.owner_uuids.first().map(String::as_str)),
            Val::int(gap_hint),
            Val::text(serde_json::to_string(n)?),
            Val::text(&n.uuid),
        ],
    )?;
    if changed == 0 {
        return Err(ApiError::not_found("network not found").into());
    }
    Ok(())
}

/// Updates only the document (e.g. `gateway_provisioned`).
pub fn save_doc(db: &mut Db<'_>, n: &Network) -> Result<(), OpError> {
    db.exec(
        "UPDATE napi_networks SET doc = $1 WHERE uuid = $2",
        &[Val::text(serde_json::to_string(n)?), Val::text(&n.uuid)],
    )?;
    Ok(())
}

/// A stored IP record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpRec {
    /// The address.
    pub ip: u32,
    /// Never auto-allocated.
    pub reserved: bool,
    /// `zone`, `server` or `other`.
    pub belongs_to_type: Option<String>,
    /// Who holds it.
    pub belongs_to_uuid: Option<String>,
    /// Its owner.
    pub owner_uuid: Option<String>,
}

impl IpRec {
    /// An unused record.
    pub fn free(ip: u32) -> IpRec {
        IpRec {
            ip,
            reserved: false,
            belongs_to_type: None,
            belongs_to_uuid: None,
            owner_uuid: None,
        }
    }

    /// NAPI's serialized IP.
    pub fn to_json(&self, network_uuid: &str) -> Value {
        let mut m = Map::new();
        m.insert("ip".into(), json!(Ipv4Addr::from(self.ip).to_string()));
        m.insert("network_uuid".into(), json!(network_uuid));
        m.insert("reserved".into(), json!(self.reserved));
        let free = !self.reserved
            && self.belongs_to_type.is_none()
            && self.belongs_to_uuid.is_none()
            && self.owner_uuid.is_none();
        m.insert("free".into(), json!(free));
        for (k, v) in [
            ("belongs_to_type", &self.belongs_to_type),
            ("belongs_to_uuid", &self.belongs_to_uuid),
            ("owner_uuid", &self.owner_uuid),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        }
        Value::Object(m)
    }
}

fn ip_from_row(row: super::db::Row) -> Result<IpRec, OpError> {
    let mut it = row.into_iter();
    let mut next = || it.next().ok_or_else(|| OpError::Corrupt("ip row".into()));
    let ip = next()?.as_i64("ip")?;
    Ok(IpRec {
        ip: u32::try_from(ip).map_err(|_| OpError::Corrupt(format!("ip {ip}")))?,
        reserved: next()?.as_i64("reserved")? != 0,
        belongs_to_type: next()?.into_opt_string(),
        belongs_to_uuid: next()?.into_opt_string(),
        owner_uuid: next()?.into_opt_string(),
    })
}

const IP_COLS: &str = "ip, reserved, belongs_to_type, belongs_to_uuid, owner_uuid";

/// One IP record.
pub fn get_ip(db: &mut Db<'_>, network: &str, ip: u32) -> Result<Option<IpRec>, OpError> {
    db.query_opt(
        &format!("SELECT {IP_COLS} FROM napi_ips WHERE network_uuid = $1 AND ip = $2"),
        &[Val::text(network), Val::int(ip)],
    )?
    .map(ip_from_row)
    .transpose()
}

/// Every IP record of a network, ascending.
pub fn list_ips(db: &mut Db<'_>, network: &str) -> Result<Vec<IpRec>, OpError> {
    db.query(
        &format!("SELECT {IP_COLS} FROM napi_ips WHERE network_uuid = $1 ORDER BY ip"),
        &[Val::text(network)],
    )?
    .into_iter()
    .map(ip_from_row)
    .collect()
}

/// Writes an IP record (insert or replace), stamping its modification time.
pub fn put_ip(db: &mut Db<'_>, network: &str, r: &IpRec) -> Result<(), OpError> {
    db.exec(
        "INSERT INTO napi_ips (network_uuid, ip, reserved, belongs_to_type, belongs_to_uuid, \
           owner_uuid, mtime) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (network_uuid, ip) DO UPDATE SET reserved = excluded.reserved, \
           belongs_to_type = excluded.belongs_to_type, belongs_to_uuid = excluded.belongs_to_uuid, \
           owner_uuid = excluded.owner_uuid, mtime = excluded.mtime",
        &[
            Val::text(network),
            Val::int(r.ip),
            Val::boolean(r.reserved),
            Val::opt_text(r.belongs_to_type.as_deref()),
            Val::opt_text(r.belongs_to_uuid.as_deref()),
            Val::opt_text(r.owner_uuid.as_deref()),
            Val::int(now_us()),
        ],
    )?;
    Ok(())
}

/// Takes a free address of `net` for a NIC: the lowest never-used address of the provision
/// range, else the least recently freed unreserved one; `None` when the range is full.
/// Callers hold the network's lock (see [`lock_network`]).
pub fn allocate(db: &mut Db<'_>, net_uuid: &str) -> Result<Option<u32>, OpError> {
    let Some((net, hint)) = get_with_hint(db, net_uuid)? else {
        return Ok(None);
    };
    let start = i64::from(u32::from(net.provision_start));
    let end = i64::from(u32::from(net.provision_end));
    // Invariant: every address of start..=hint has a record (records are never deleted while
    // the network exists), so the lowest gap is above the hint.
    let h = hint.max(start - 1);
    if h < end {
        let next = h + 1;
        let taken = db
            .query_opt(
                "SELECT 1 FROM napi_ips WHERE network_uuid = $1 AND ip = $2",
                &[Val::text(net_uuid), Val::int(next)],
            )?
            .is_some();
        let gap = if !taken {
            Some(next)
        } else {
            db.query_opt(
                "SELECT a.ip + 1 FROM napi_ips a WHERE a.network_uuid = $1 AND a.ip >= $2 \
                   AND a.ip < $3 AND NOT EXISTS (SELECT 1 FROM napi_ips b \
                     WHERE b.network_uuid = $1 AND b.ip = a.ip + 1) \
                 ORDER BY a.ip LIMIT 1",
                &[Val::text(net_uuid), Val::int(next), Val::int(end)],
            )?
            .map(|r| r[0].as_i64("gap"))
            .transpose()?
        };
        let new_hint = gap.map_or(end, |g| g);
        db.exec(
            "UPDATE napi_networks SET gap_hint = $1 WHERE uuid = $2",
            &[Val::int(new_hint), Val::text(net_uuid)],
        )?;
        if let Some(g) = gap {
            return Ok(Some(
                u32::try_from(g).map_err(|_| OpError::Corrupt(format!("gap {g}")))?,
            ));
        }
    }
    // No never-used address left: the least recently freed one.
    let row = db.query_opt(
        "SELECT ip FROM napi_ips WHERE network_uuid = $1 AND ip >= $2 AND ip <= $3 \
           AND reserved = 0 AND belongs_to_uuid IS NULL \
         ORDER BY mtime, ip LIMIT 1",
        &[Val::text(net_uuid), Val::int(start), Val::int(end)],
    )?;
    row.map(|r| {
        let ip = r[0].as_i64("ip")?;
        u32::try_from(ip).map_err(|_| OpError::Corrupt(format!("ip {ip}")))
    })
    .transpose()
}

/// Serialises allocations on one network across processes.
pub fn lock_network(db: &mut Db<'_>, uuid: &str) -> Result<(), OpError> {
    db.lock(lock_key(LOCK_NETWORK, uuid))
}

/// Whether a NIC holds an address of the network; returns one such NIC's MAC.
pub fn first_nic(db: &mut Db<'_>, uuid: &str) -> Result<Vec<u64>, OpError> {
    db.query(
        "SELECT mac FROM napi_nics WHERE network_uuid = $1 ORDER BY mac LIMIT 10",
        &[Val::text(uuid)],
    )?
    .into_iter()
    .map(|r| r[0].as_i64("mac").map(|m| m as u64))
    .collect()
}

/// Parameters accepted when creating a network.
pub const CREATE_PARAMS: &[&str] = &[
    "name",
    "nic_tag",
    "vlan_id",
    "subnet",
    "provision_start_ip",
    "provision_end_ip",
    "gateway",
    "resolvers",
    "routes",
    "owner_uuids",
    "description",
    "mtu",
    "uuid",
    "fields",
    "internet_nat",
    "family",
];

/// Fields a `fields` parameter may name.
pub const FIELDS: &[&str] = &[
    "uuid",
    "name",
    "vlan_id",
    "family",
    "subnet",
    "netmask",
    "provision_start_ip",
    "provision_end_ip",
    "nic_tag",
    "mtu",
    "resolvers",
    "gateway",
    "routes",
    "owner_uuids",
    "owner_uuid",
    "description",
    "fabric",
    "vnet_id",
    "internet_nat",
    "gateway_provisioned",
];

/// Longest prefix of a fabric network: a /31 or /32 has no room for a gateway and hosts.
pub const MAX_FABRIC_PREFIX: u8 = 30;

/// A validated create request, before the store is consulted.
pub struct NewNetwork {
    net: Network,
    fields: Option<Vec<String>>,
}

fn validate_routes(p: &mut Params) -> Option<Map<String, Value>> {
    match p.raw("routes")?.clone() {
        Value::Object(o) => {
            let mut bad = Vec::new();
            for (k, v) in &o {
                let dest_ok = k.parse::<Ipv4Addr>().is_ok() || parse_subnet(k).is_ok();
                let gw_ok = v
                    .as_str()
                    .is_some_and(|s| s == "linklocal" || s.parse::<Ipv4Addr>().is_ok());
                if !dest_ok || !gw_ok {
                    bad.push(Value::String(k.clone()));
                }
            }
            if bad.is_empty() {
                Some(o)
            } else {
                let mut e = FieldError::invalid("routes", "invalid routes");
                e.invalid = Some(bad);
                p.error(e);
                None
            }
        }
        Value::String(s) => match serde_json::from_str::<Value>(&s) {
            Ok(Value::Object(o)) => {
                let mut q = Params::from_map(Map::from_iter([("routes".into(), Value::Object(o))]));
                let r = validate_routes(&mut q);
                if q.has_errors() {
                    p.invalid("routes", "invalid routes");
                }
                r
            }
            _ => {
                p.invalid("routes", "must be an object");
                None
            }
        },
        _ => {
            p.invalid("routes", "must be an object");
            None
        }
    }
}

/// Validates a create request. `fabric` is `Some((owner, vlan_id, vnet_id))` for
/// CreateFabricNetwork, which forces those and the overlay tag and MTU.
pub fn validate_create(
    p: &mut Params,
    cfg: &Config,
    fabric: Option<(&str, u16, u32)>,
) -> Result<NewNetwork, ApiError> {
    if fabric.is_some() {
        p.allow_only(&[
            "name",
            "subnet",
            "provision_start_ip",
            "provision_end_ip",
            "gateway",
            "resolvers",
            "routes",
            "description",
            "mtu",
            "uuid",
            "fields",
            "internet_nat",
            "vlan_id",
            "owner_uuid",
        ]);
    } else {
        p.allow_only(CREATE_PARAMS);
    }
    let name = p.name("name", 255);
    let name = p.require("name", name);
    let (nic_tag, vlan_id) = match fabric {
        Some((_, vlan, _)) => (Some(cfg.overlay_nic_tag.clone()), Some(i64::from(vlan))),
        None => {
            let t = p.string("nic_tag");
            let t = p.require("nic_tag", t);
            let v = p.int_in(
                "vlan_id",
                0,
                4094,
                "VLAN ID must be a number between 0 and 4094, and not 1",
            );
            (t, p.require("vlan_id", v))
        }
    };
    // `subnet` is required only once the per-field checks pass (NAPI's "after" validators):
    // `POST /networks {}` reports name, nic_tag and vlan_id.
    let subnet_raw = p.string("subnet");
    let subnet = match subnet_raw {
        Some(s) => match parse_subnet(&s) {
            Ok(x) => Some(x),
            Err(m) => {
                p.invalid("subnet", m);
                None
            }
        },
        None => None,
    };
    let start = p.ipv4("provision_start_ip");
    let end = p.ipv4("provision_end_ip");
    let gateway = p.ipv4("gateway");
    let resolvers = p.ipv4_array("resolvers").unwrap_or_default();
    let routes = validate_routes(p).unwrap_or_default();
    let owner_uuids = match fabric {
        Some((owner, _, _)) => vec![owner.to_string()],
        None => p.uuid_array("owner_uuids").unwrap_or_default(),
    };
    let description = p.text("description", 255);
    let default_mtu = if fabric.is_some() {
        cfg.overlay_mtu
    } else {
        1500
    };
    let mtu = p
        .int_in(
            "mtu",
            576,
            9000,
            "mtu must be a number between 576 and 9000",
        )
        .map_or(default_mtu, |m| m as u32);
    let uuid = p.uuid("uuid");
    let internet_nat = if fabric.is_some() {
        p.boolean("internet_nat").unwrap_or(true)
    } else {
        if p.has("internet_nat") {
            p.invalid("internet_nat", "only fabric networks have internet_nat");
        }
        true
    };
    if let Some(f) = p.raw("family").cloned() {
        if f != json!("ipv4") {
            p.invalid("family", "only ipv4 networks are supported");
        }
    }
    let fields = if p.has("fields") {
        p.fields(FIELDS)
    } else {
        None
    };
    p.finish()?;
    // Cross-field checks run only when every field is individually valid (as warden does).
    if !p.has("subnet") {
        p.error(FieldError::missing("subnet"));
        p.finish()?;
    }
    if let (Some(_), Some((_, len))) = (fabric, subnet) {
        if len > MAX_FABRIC_PREFIX {
            p.invalid(
                "subnet",
                format!(
                    "fabric subnets must have a prefix length of at most {MAX_FABRIC_PREFIX} \
                     (a /{len} leaves no address for hosts besides the gateway)"
                ),
            );
            p.finish()?;
        }
    }
    let (subnet_ip, prefix) = subnet.unwrap_or((Ipv4Addr::UNSPECIFIED, 32));
    let (lo, hi) = subnet_bounds(subnet_ip, prefix);
    let first_usable = if hi - lo >= 2 { lo + 1 } else { lo };
    let last_usable = if hi - lo >= 2 { hi - 1 } else { hi };
    let start = start.unwrap_or(Ipv4Addr::from(first_usable));
    let end = end.unwrap_or(Ipv4Addr::from(last_usable));
    let inside = |ip: Ipv4Addr| (lo..=hi).contains(&u32::from(ip));
    if !inside(start) {
        p.invalid(
            "provision_start_ip",
            "provision_start_ip cannot be outside subnet",
        );
    } else if u32::from(start) == hi && hi != lo {
        p.invalid(
            "provision_start_ip",
            "provision_start_ip cannot be the broadcast address",
        );
    } else if u32::from(start) == lo && hi - lo >= 2 {
        p.invalid(
            "provision_start_ip",
            "provision_start_ip cannot be the network address",
        );
    }
    if !inside(end) {
        p.invalid(
            "provision_end_ip",
            "provision_end_ip cannot be outside subnet",
        );
    } else if u32::from(end) == hi && hi - lo >= 2 {
        p.invalid(
            "provision_end_ip",
            "provision_end_ip cannot be the broadcast address",
        );
    }
    if inside(start) && inside(end) && u32::from(start) > u32::from(end) {
        p.invalid(
            "provision_end_ip",
            "provision_end_ip must be greater than provision_start_ip",
        );
    }
    if let Some(g) = gateway {
        if !inside(g) {
            p.invalid("gateway", "gateway cannot be outside subnet");
        }
    }
    if fabric.is_some() && !is_private(lo, hi) {
        p.invalid("subnet", "subnet must be within private ranges");
    }
    p.finish()?;
    let uuid = match uuid {
        Some(u) => u,
        None => random_uuid().map_err(|_| ApiError::internal())?,
    };
    Ok(NewNetwork {
        net: Network {
            uuid,
            name: name.unwrap_or_default(),
            vlan_id: vlan_id.unwrap_or(0) as u16,
            subnet_ip,
            prefix,
            provision_start: start,
            provision_end: end,
            nic_tag: nic_tag.unwrap_or_default(),
            mtu,
            resolvers,
            gateway,
            routes,
            owner_uuids,
            description,
            fabric: fabric.is_some(),
            vnet_id: fabric.map(|f| f.2),
            internet_nat,
            gateway_provisioned: false,
        },
        fields,
    })
}

/// Networks whose subnet overlaps `n` and that it may not overlap: fabrics on the same VNI;
/// for non-fabric public subnets, other non-fabric networks.
fn overlapping(db: &mut Db<'_>, n: &Network) -> Result<Vec<String>, OpError> {
    let (lo, hi) = n.bounds();
    let rows = if n.fabric {
        db.query(
            "SELECT uuid FROM napi_networks WHERE fabric = 1 AND vnet_id = $1 \
               AND subnet_lo <= $2 AND subnet_hi >= $3 AND uuid <> $4 ORDER BY uuid",
            &[
                Val::Int(n.vnet_id.map(i64::from)),
                Val::int(hi),
                Val::int(lo),
                Val::text(&n.uuid),
            ],
        )?
    } else if is_private(lo, hi) {
        Vec::new()
    } else {
        db.query(
            "SELECT uuid FROM napi_networks WHERE fabric = 0 \
               AND subnet_lo <= $1 AND subnet_hi >= $2 AND uuid <> $3 ORDER BY uuid",
            &[Val::int(hi), Val::int(lo), Val::text(&n.uuid)],
        )?
    };
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .next()
                .map_or(Err(OpError::Corrupt("uuid".into())), |v| {
                    v.into_string("uuid")
                })
        })
        .collect()
}

/// Records a network change in the feed (every server reads network changes); the owner of a
/// fabric network is its owner.
fn record(db: &mut Db<'_>, n: &Network, action: &str) -> Result<(), OpError> {
    changes::record(
        db,
        &Change {
            kind: changes::kind::NETWORK,
            uuid: &n.uuid,
            action,
            owner_uuid: n.owner_uuids.first().map(String::as_str),
            servers: &[],
        },
    )
}

/// Creates a validated network: checks the tag, the name, overlaps; writes the network and its
/// reserved IP records (gateway, in-subnet resolvers, broadcast) and range markers.
pub fn create(
    db: &mut Db<'_>,
    cfg: &Config,
    req: NewNetwork,
    view: View,
) -> Result<Value, OpError> {
    let n = req.net;
    db.lock(lock_key(LOCK_GLOBAL, "networks"))?;
    // The tag must still exist when this commits (a tag delete checks for networks under it).
    db.lock(lock_key(LOCK_GLOBAL, "nic_tags"))?;
    if n.fabric {
        db.lock(lock_key(
            LOCK_OWNER,
            n.owner_uuids.first().map_or("", String::as_str),
        ))?;
    }
    let tag = super::nic_tags::get(db, &n.nic_tag)?;
    let mut errs = Vec::new();
    match &tag {
        None => errs.push(FieldError::invalid("nic_tag", "nic tag does not exist")),
        Some(t) if i64::from(n.mtu) > t.mtu => errs.push(FieldError::invalid(
            "mtu",
            format!("network MTU must be under nic_tag MTU ({})", t.mtu),
        )),
        _ => {}
    }
    if get(db, &n.uuid)?.is_some() {
        errs.push(FieldError::duplicate("uuid", "Already exists"));
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid_params(errs).into());
    }
    ensure_name_free(db, &n)?;
    let overlaps = overlapping(db, &n)?;
    if !overlaps.is_empty() {
        return Err(ApiError::invalid_params(
            overlaps
                .iter()
                .map(|u| {
                    FieldError::used_by(
                        "subnet",
                        "network",
                        u,
                        "subnet overlaps with another network",
                    )
                })
                .collect(),
        )
        .into());
    }
    let start = u32::from(n.provision_start);
    insert(db, &n, i64::from(start) - 1)?;
    let (lo, hi) = n.bounds();
    let admin = |ip: u32| IpRec {
        ip,
        reserved: true,
        belongs_to_type: Some("other".into()),
        belongs_to_uuid: Some(cfg.admin_uuid.clone()),
        owner_uuid: Some(cfg.admin_uuid.clone()),
    };
    let end = u32::from(n.provision_end);
    if start > lo {
        put_ip(db, &n.uuid, &IpRec::free(start - 1))?;
    }
    if end < hi {
        put_ip(db, &n.uuid, &IpRec::free(end + 1))?;
    }
    for r in &n.resolvers {
        if n.contains(*r) {
            put_ip(db, &n.uuid, &admin(u32::from(*r)))?;
        }
    }
    if let Some(g) = n.gateway {
        let rec = if n.fabric && !n.internet_nat {
            IpRec {
                ip: u32::from(g),
                reserved: true,
                belongs_to_type: Some("other".into()),
                belongs_to_uuid: Some("00000000-0000-0000-0000-000000000000".into()),
                owner_uuid: n.owner_uuids.first().cloned(),
            }
        } else {
            admin(u32::from(g))
        };
        put_ip(db, &n.uuid, &rec)?;
    }
    if hi - lo >= 2 {
        put_ip(db, &n.uuid, &admin(hi))?;
    }
    record(db, &n, "create")?;
    Ok(select_fields(n.to_json(view), req.fields.as_deref()))
}

/// ListNetworks filters.
pub const LIST_PARAMS: &[&str] = &[
    "uuid",
    "fabric",
    "family",
    "name",
    "nic_tag",
    "vlan_id",
    "owner_uuid",
    "provisionable_by",
    "limit",
    "offset",
];

/// A validated network list request.
pub struct ListNetworks {
    uuid: Option<String>,
    fabric: Option<bool>,
    family: Option<String>,
    names: Option<Vec<String>>,
    nic_tags: Option<Vec<String>>,
    vlan_id: Option<i64>,
    owner_uuid: Option<String>,
    provisionable_by: Option<String>,
    limit: u64,
    offset: u64,
}

/// Validates a list request.
pub fn validate_list(p: &mut Params) -> Result<ListNetworks, ApiError> {
    p.allow_only(LIST_PARAMS);
    let uuid = p.string("uuid");
    let fabric = p.boolean("fabric");
    let family = p.one_of("family", &["ipv4", "ipv6"]);
    let names = p.string_array("name");
    let nic_tags = p.string_array("nic_tag");
    let vlan_id = p.int_in(
        "vlan_id",
        0,
        4094,
        "VLAN ID must be a number between 0 and 4094, and not 1",
    );
    let owner_uuid = p.uuid("owner_uuid");
    let provisionable_by = p.uuid("provisionable_by");
    let (limit, offset) = p.pagination();
    p.finish()?;
    Ok(ListNetworks {
        uuid,
        fabric,
        family,
        names,
        nic_tags,
        vlan_id,
        owner_uuid,
        provisionable_by,
        limit,
        offset,
    })
}

/// Lists networks, sorted by name.
pub fn list(db: &mut Db<'_>, q: &ListNetworks) -> Result<Value, OpError> {
    let nets: Vec<Value> = all(db)?
        .into_iter()
        .filter(|n| match &q.uuid {
            Some(u) => match u.strip_suffix('*') {
                Some(prefix) => n.uuid.starts_with(&prefix.to_ascii_lowercase()),
                None => n.uuid == u.to_ascii_lowercase(),
            },
            None => true,
        })
        .filter(|n| q.fabric.is_none_or(|f| n.fabric == f))
        .filter(|_| q.family.as_deref().is_none_or(|f| f == "ipv4"))
        .filter(|n| q.names.as_ref().is_none_or(|v| v.contains(&n.name)))
        .filter(|n| q.nic_tags.as_ref().is_none_or(|v| v.contains(&n.nic_tag)))
        .filter(|n| q.vlan_id.is_none_or(|v| i64::from(n.vlan_id) == v))
        .filter(|n| {
            q.owner_uuid
                .as_ref()
                .is_none_or(|o| n.owner_uuids.contains(o))
        })
        .filter(|n| {
            q.provisionable_by
                .as_ref()
                .is_none_or(|o| n.owner_uuids.is_empty() || n.owner_uuids.contains(o))
        })
        .map(|n| n.to_json(View::Plain))
        .collect();
    Ok(Value::Array(page(nets, q.limit, q.offset)))
}

/// GetNetwork; `provisionable_by` (403) and `owner_uuid` (404) as NAPI.
pub fn get_checked(db: &mut Db<'_>, uuid: &str, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["provisionable_by", "owner_uuid", "fields"]);
    let prov = p.uuid("provisionable_by");
    let owner = p.uuid("owner_uuid");
    let fields = if p.has("fields") {
        p.fields(FIELDS)
    } else {
        None
    };
    p.finish()?;
    let n = find(db, uuid)?;
    if let Some(o) = owner {
        if !n.owner_uuids.contains(&o) {
            return Err(ApiError::not_found("network not found").into());
        }
    }
    if let Some(o) = prov {
        if !n.owner_uuids.is_empty() && !n.owner_uuids.contains(&o) {
            return Err(ApiError::not_authorized("owner cannot provision on network").into());
        }
    }
    Ok(select_fields(n.to_json(View::Plain), fields.as_deref()))
}

/// A network by UUID in the URL: an invalid UUID or a missing one is 404 "network not found".
pub fn find(db: &mut Db<'_>, uuid: &str) -> Result<Network, OpError> {
    let Some(u) = parse_uuid(uuid) else {
        return Err(ApiError::not_found("network not found").into());
    };
    get(db, &u)?.ok_or_else(|| ApiError::not_found("network not found").into())
}

const IMMUTABLE: &[&str] = &[
    "fabric",
    "family",
    "gateway_provisioned",
    "internet_nat",
    "nic_tag",
    "vlan_id",
    "vnet_id",
    "subnet",
];

/// UpdateNetwork (and UpdateFabricNetwork with `view` Fabric).
pub fn update(db: &mut Db<'_>, n: Network, p: &mut Params, view: View) -> Result<Value, OpError> {
    let mut allowed: Vec<&str> = vec![
        "name",
        "description",
        "mtu",
        "resolvers",
        "routes",
        "provision_start_ip",
        "provision_end_ip",
        "gateway",
        "owner_uuids",
        "fields",
    ];
    allowed.extend_from_slice(IMMUTABLE);
    if view == View::Fabric {
        allowed.push("owner_uuid");
        allowed.push("uuid");
    }
    p.allow_only(&allowed);
    for f in IMMUTABLE {
        if p.has(f) {
            p.invalid(f, "Network updates for this field are not supported");
        }
    }
    if n.fabric {
        for f in ["gateway", "owner_uuids"] {
            if p.has(f) {
                p.invalid(
                    f,
                    "Network updates for this field are not supported on fabrics",
                );
            }
        }
    }
    let name = p.name("name", 255);
    let description = p.text("description", 255);
    let mtu = p.int_in(
        "mtu",
        576,
        9000,
        "mtu must be a number between 576 and 9000",
    );
    let resolvers = p.ipv4_array("resolvers");
    let routes = validate_routes(p);
    let start = p.ipv4("provision_start_ip");
    let end = p.ipv4("provision_end_ip");
    let gateway = if n.fabric { None } else { p.ipv4("gateway") };
    let owners = if n.fabric {
        None
    } else {
        p.uuid_array("owner_uuids")
    };
    let fields = if p.has("fields") {
        p.fields(FIELDS)
    } else {
        None
    };
    p.finish()?;
    db.lock(lock_key(LOCK_GLOBAL, "networks"))?;
    db.lock(lock_key(LOCK_GLOBAL, "nic_tags"))?;
    lock_network(db, &n.uuid)?;
    // Read again under the lock: `n` came from an unlocked lookup (gateway_provisioned may have
    // changed since, or the network may be gone).
    let n = get(db, &n.uuid)?.ok_or_else(|| ApiError::not_found("network not found"))?;
    let mut m = n.clone();
    if let Some(x) = name {
        m.name = x;
    }
    if let Some(x) = description {
        m.description = Some(x);
    }
    if let Some(x) = mtu {
        m.mtu = x as u32;
        let tag = super::nic_tags::get(db, &m.nic_tag)?;
        if let Some(t) = tag {
            if x > t.mtu {
                p.invalid(
                    "mtu",
                    format!("network MTU must be under nic_tag MTU ({})", t.mtu),
                );
            }
        }
    }
    if let Some(x) = resolvers {
        m.resolvers = x;
    }
    if let Some(x) = routes {
        m.routes = x;
    }
    if let Some(x) = start {
        m.provision_start = x;
    }
    if let Some(x) = end {
        m.provision_end = x;
    }
    if let Some(x) = gateway {
        m.gateway = Some(x);
    }
    if let Some(x) = owners {
        m.owner_uuids = x;
    }
    let (lo, hi) = m.bounds();
    let inside = |ip: Ipv4Addr| (lo..=hi).contains(&u32::from(ip));
    if !inside(m.provision_start) {
        p.invalid(
            "provision_start_ip",
            "provision_start_ip cannot be outside subnet",
        );
    } else if m.is_network_address(m.provision_start) {
        p.invalid(
            "provision_start_ip",
            "provision_start_ip cannot be the network address",
        );
    }
    if !inside(m.provision_end) {
        p.invalid(
            "provision_end_ip",
            "provision_end_ip cannot be outside subnet",
        );
    } else if u32::from(m.provision_end) == hi && hi - lo >= 2 {
        p.invalid(
            "provision_end_ip",
            "provision_end_ip cannot be the broadcast address",
        );
    }
    if u32::from(m.provision_start) > u32::from(m.provision_end) {
        p.invalid(
            "provision_end_ip",
            "provision_end_ip must be greater than provision_start_ip",
        );
    }
    if let Some(g) = m.gateway {
        if !inside(g) {
            p.invalid("gateway", "gateway cannot be outside subnet");
        }
    }
    p.finish()?;
    if m.name != n.name {
        ensure_name_free(db, &m)?;
    }
    // A new range start restarts the gap search there (records below it stay).
    let hint = i64::from(u32::from(m.provision_start)) - 1;
    update_row(db, &m, hint)?;
    if let Some(g) = gateway {
        if get_ip(db, &m.uuid, u32::from(g))?.is_none() {
            put_ip(
                db,
                &m.uuid,
                &IpRec {
                    ip: u32::from(g),
                    reserved: true,
                    belongs_to_type: Some("other".into()),
                    belongs_to_uuid: None,
                    owner_uuid: None,
                },
            )?;
        }
    }
    record(db, &m, "update")?;
    Ok(select_fields(m.to_json(view), fields.as_deref()))
}

/// DeleteNetwork: refused while NICs are on it; drops its IP records.
pub fn delete(db: &mut Db<'_>, n: &Network) -> Result<(), OpError> {
    // Pools name networks under this lock; NIC writers hold the network's.
    db.lock(lock_key(LOCK_GLOBAL, "networks"))?;
    lock_network(db, &n.uuid)?;
    if get(db, &n.uuid)?.is_none() {
        return Err(ApiError::not_found("network not found").into());
    }
    let nics = first_nic(db, &n.uuid)?;
    if !nics.is_empty() {
        return Err(ApiError::in_use(
            "network must have no NICs provisioned",
            nics.iter()
                .map(|m| {
                    let mac = super::nics::mac_string(*m);
                    FieldError::used_by_no_field("nic", &mac, format!("In use by nic \"{mac}\""))
                })
                .collect(),
        )
        .into());
    }
    let pools = super::pools::holding(db, &n.uuid)?;
    if !pools.is_empty() {
        return Err(ApiError::in_use(
            "Network is in use",
            pools
                .iter()
                .map(|p| {
                    FieldError::used_by_no_field(
                        "network_pool",
                        &p.uuid,
                        format!("In use by network_pool \"{}\"", p.uuid),
                    )
                })
                .collect(),
        )
        .into());
    }
    db.exec(
        "DELETE FROM napi_ips WHERE network_uuid = $1",
        &[Val::text(&n.uuid)],
    )?;
    db.exec(
        "DELETE FROM napi_networks WHERE uuid = $1",
        &[Val::text(&n.uuid)],
    )?;
    record(db, n, "delete")
}

/// ListIPs.
pub fn list_ips_api(db: &mut Db<'_>, n: &Network, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&[
        "belongs_to_type",
        "belongs_to_uuid",
        "owner_uuid",
        "limit",
        "offset",
    ]);
    let btt = p.one_of("belongs_to_type", &["zone", "server", "other"]);
    let btu = p.uuid("belongs_to_uuid");
    let owner = p.uuid("owner_uuid");
    let (limit, offset) = p.pagination();
    p.finish()?;
    let ips: Vec<Value> = list_ips(db, &n.uuid)?
        .into_iter()
        .filter(|r| btt.is_none() || r.belongs_to_type == btt)
        .filter(|r| btu.is_none() || r.belongs_to_uuid == btu)
        .filter(|r| owner.is_none() || r.owner_uuid == owner)
        .map(|r| r.to_json(&n.uuid))
        .collect();
    Ok(Value::Array(page(ips, limit, offset)))
}

/// The IP in a URL: 404 "Invalid IP address" or "IP is not in subnet".
pub fn url_ip(n: &Network, ip: &str) -> Result<u32, ApiError> {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) if n.contains(a) => Ok(u32::from(a)),
        Ok(std::net::IpAddr::V4(_)) => Err(ApiError::not_found("IP is not in subnet")),
        Ok(std::net::IpAddr::V6(_)) => Err(ApiError::not_found(
            "IP and subnet are of different address families",
        )),
        Err(_) => Err(ApiError::not_found("Invalid IP address")),
    }
}

/// GetIP: a never-stored address is a free record.
pub fn get_ip_api(db: &mut Db<'_>, n: &Network, ip: &str) -> Result<Value, OpError> {
    let a = url_ip(n, ip)?;
    let rec = get_ip(db, &n.uuid, a)?.unwrap_or_else(|| IpRec::free(a));
    Ok(rec.to_json(&n.uuid))
}

/// UpdateIP: reserve, unreserve, assign, unassign, free.
pub fn update_ip(db: &mut Db<'_>, n: &Network, ip: &str, p: &mut Params) -> Result<Value, OpError> {
    let a = url_ip(n, ip)?;
    p.allow_only(&[
        "owner_uuid",
        "belongs_to_uuid",
        "belongs_to_type",
        "reserved",
        "unassign",
        "free",
        "check_owner",
        "ip",
        "network_uuid",
    ]);
    let owner = p.uuid("owner_uuid");
    let btu = p.uuid("belongs_to_uuid");
    let btt = p.one_of("belongs_to_type", &["zone", "server", "other"]);
    let reserved = p.boolean("reserved");
    let unassign = p.boolean("unassign").unwrap_or(false);
    let free = p.boolean("free").unwrap_or(false);
    let check_owner = p.boolean("check_owner").unwrap_or(true);
    if free && unassign {
        p.invalid(
            "unassign",
            "free and unassign cannot both be set to \"true\"",
        );
    }
    if btu.is_some() != btt.is_some() && !free && !unassign {
        if btu.is_none() {
            p.error(FieldError::missing("belongs_to_uuid"));
        } else {
            p.error(FieldError::missing("belongs_to_type"));
        }
    }
    p.finish()?;
    lock_network(db, &n.uuid)?;
    // Read again under the lock: the network may have been deleted since the URL lookup.
    let n = &get(db, &n.uuid)?.ok_or_else(|| ApiError::not_found("network not found"))?;
    if n.is_network_address(Ipv4Addr::from(a)) || n.is_broadcast_address(Ipv4Addr::from(a)) {
        let what = if n.is_broadcast_address(Ipv4Addr::from(a)) {
            "the broadcast address"
        } else {
            "the network address"
        };
        return Err(ApiError::invalid("ip", format!("ip cannot be {what}")).into());
    }
    // An address a NIC holds changes only through that NIC.
    let holder = db.query_opt(
        "SELECT mac FROM napi_nics WHERE network_uuid = $1 AND ip = $2",
        &[Val::text(&n.uuid), Val::int(a)],
    )?;
    if let Some(row) = holder {
        if free || unassign || btu.is_some() {
            let mac = super::nics::mac_string(row[0].as_i64("mac")? as u64);
            let field = if free {
                "free"
            } else if unassign {
                "unassign"
            } else {
                "belongs_to_uuid"
            };
            return Err(ApiError::invalid_params(vec![FieldError::used_by(
                field,
                "nic",
                &mac,
                format!("In use by nic \"{mac}\""),
            )])
            .into());
        }
    }
    if check_owner {
        if let Some(o) = &owner {
            if !n.owner_uuids.is_empty() && !n.owner_uuids.contains(o) {
                return Err(
                    ApiError::invalid("owner_uuid", "network owner_uuids do not match").into(),
                );
            }
        }
    }
    let mut rec = get_ip(db, &n.uuid, a)?.unwrap_or_else(|| IpRec::free(a));
    if free {
        rec = IpRec::free(a);
    } else {
        if unassign {
            rec.belongs_to_type = None;
            rec.belongs_to_uuid = None;
        }
        if let Some(r) = reserved {
            rec.reserved = r;
        }
        if let Some(o) = owner {
            rec.owner_uuid = Some(o);
        }
        if btu.is_some() {
            rec.belongs_to_uuid = btu;
            rec.belongs_to_type = btt;
        }
    }
    put_ip(db, &n.uuid, &rec)?;
    Ok(rec.to_json(&n.uuid))
}

/// SearchIPs (`GET /search/ips?ip=`): the IP's record on every network whose subnet holds it
/// (never-stored addresses appear as free records); 404 when no network holds it.
pub fn search_ips(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&[
        "ip",
        "belongs_to_type",
        "belongs_to_uuid",
        "fabric",
        "owner_uuid",
    ]);
    let ip = p.ipv4("ip");
    let ip = p.require("ip", ip);
    let btt = p.one_of("belongs_to_type", &["zone", "server", "other"]);
    let btu = p.uuid("belongs_to_uuid");
    let fabric = p.boolean("fabric");
    let owner = p.uuid("owner_uuid");
    p.finish()?;
    let Some(ip) = ip else {
        return Ok(Value::Array(Vec::new()));
    };
    let a = u32::from(ip);
    let uuids = db.query(
        "SELECT uuid FROM napi_networks WHERE subnet_lo <= $1 AND subnet_hi >= $1 ORDER BY uuid",
        &[Val::int(a)],
    )?;
    let mut out = Vec::new();
    for r in uuids {
        let u = r
            .into_iter()
            .next()
            .ok_or_else(|| OpError::Corrupt("uuid".into()))?
            .into_string("uuid")?;
        let Some(n) = get(db, &u)? else { continue };
        if fabric.is_some_and(|f| f != n.fabric) {
            continue;
        }
        let rec = get_ip(db, &u, a)?.unwrap_or_else(|| IpRec::free(a));
        if (btt.is_some() && rec.belongs_to_type != btt)
            || (btu.is_some() && rec.belongs_to_uuid != btu)
            || (owner.is_some() && rec.owner_uuid != owner)
        {
            continue;
        }
        out.push(rec.to_json(&u));
    }
    if out.is_empty() {
        return Err(ApiError::not_found("No networks found containing that IP address").into());
    }
    Ok(Value::Array(out))
}

/// Refuses `n`'s name when another network (not `n` itself) already has it.
fn ensure_name_free(db: &mut Db<'_>, n: &Network) -> Result<(), OpError> {
    let taken = db
        .query_opt(
            "SELECT uuid FROM napi_networks WHERE name_key = $1 AND uuid <> $2",
            &[Val::text(name_key(n)), Val::text(&n.uuid)],
        )?
        .is_some();
    if taken {
        return Err(ApiError::invalid_params_msg(
            "name is in use by another network",
            vec![FieldError::duplicate("name", "Already exists")],
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        assert_eq!(
            parse_subnet("10.0.2.0/24").unwrap(),
            (Ipv4Addr::new(10, 0, 2, 0), 24)
        );
        assert_eq!(
            parse_subnet("10.0.2.5/24").unwrap_err(),
            "invalid CIDR format"
        );
        assert!(parse_subnet("10.0.0.0/7").is_err());
        assert!(parse_subnet("10.0.0.0").is_err());
        assert!(parse_subnet("10.0.0.0/024").is_err());
        assert!(parse_subnet("fd00::/64").unwrap_err().contains("IPv6"));
        assert!(is_private(
            u32::from(Ipv4Addr::new(172, 16, 0, 0)),
            u32::from(Ipv4Addr::new(172, 16, 0, 255))
        ));
        assert!(!is_private(
            u32::from(Ipv4Addr::new(8, 8, 8, 0)),
            u32::from(Ipv4Addr::new(8, 8, 8, 255))
        ));
    }
}
