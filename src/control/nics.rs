//! NICs (`napi_nics`): create, provision on a network, update, delete, list. Every change of a
//! fabric NIC writes its Portolan overlay mapping and the VL2/VL3 events for every host on the
//! VNI, and every change of an underlay NIC its host's underlay mapping, in the same transaction
//! as the NIC and its IP.

use std::net::{IpAddr, Ipv4Addr};

use portolan::store::{CnUuid, OverlayMapping, Txn, UnderlayMapping};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::changes::{self, Change};
use super::db::{lock_nic, Db, Val};
use super::error::{ApiError, FieldError, OpError};
use super::networks::{self, IpRec, Network};
use super::params::{page, parse_uuid, Params};
use super::{db, iso_now, Config};

/// The VXLAN UDP port written in underlay mappings.
pub const VXLAN_PORT: u16 = 4789;

/// A stored NIC.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Nic {
    /// MAC as a 48-bit integer.
    pub mac: u64,
    /// Owner.
    pub owner_uuid: String,
    /// The VM, server or other object it belongs to.
    pub belongs_to_uuid: String,
    /// `zone`, `server` or `other`.
    pub belongs_to_type: String,
    /// Primary NIC of its object.
    pub primary: bool,
    /// `provisioning`, `stopped` or `running`.
    pub state: String,
    /// ISO-8601.
    pub created_timestamp: String,
    /// ISO-8601.
    pub modified_timestamp: String,
    /// IP, when on a network.
    pub ip: Option<Ipv4Addr>,
    /// Network, when it has an IP.
    pub network_uuid: Option<String>,
    /// Host.
    pub cn_uuid: Option<String>,
    /// NIC model.
    pub model: Option<String>,
    /// Tags this NIC provides (server NICs).
    pub nic_tags_provided: Option<Vec<String>>,
    /// NIC tag, for a NIC without a network.
    pub nic_tag: Option<String>,
    /// VLAN, for a NIC without a network.
    pub vlan_id: Option<u16>,
    /// Underlay NIC of a server.
    pub underlay: bool,
    /// Its IP is reserved.
    pub reserved: bool,
    /// Anti-spoofing exceptions.
    pub allow_dhcp_spoofing: bool,
    /// Anti-spoofing exceptions.
    pub allow_ip_spoofing: bool,
    /// Anti-spoofing exceptions.
    pub allow_mac_spoofing: bool,
    /// Anti-spoofing exceptions.
    pub allow_restricted_traffic: bool,
    /// Anti-spoofing exceptions.
    pub allow_unfiltered_promisc: bool,
}

const ALLOW: [&str; 5] = [
    "allow_dhcp_spoofing",
    "allow_ip_spoofing",
    "allow_mac_spoofing",
    "allow_restricted_traffic",
    "allow_unfiltered_promisc",
];

impl Nic {
    fn allow_mut(&mut self, name: &str) -> &mut bool {
        match name {
            "allow_dhcp_spoofing" => &mut self.allow_dhcp_spoofing,
            "allow_ip_spoofing" => &mut self.allow_ip_spoofing,
            "allow_mac_spoofing" => &mut self.allow_mac_spoofing,
            "allow_restricted_traffic" => &mut self.allow_restricted_traffic,
            _ => &mut self.allow_unfiltered_promisc,
        }
    }

    fn allow(&self, name: &str) -> bool {
        match name {
            "allow_dhcp_spoofing" => self.allow_dhcp_spoofing,
            "allow_ip_spoofing" => self.allow_ip_spoofing,
            "allow_mac_spoofing" => self.allow_mac_spoofing,
            "allow_restricted_traffic" => self.allow_restricted_traffic,
            _ => self.allow_unfiltered_promisc,
        }
    }

    /// The overlay mapping this NIC should have, if it is a fabric NIC.
    pub fn overlay(&self, net: Option<&Network>) -> Option<OverlayMapping> {
        let net = net?;
        if !net.fabric || self.belongs_to_type != "zone" {
            return None;
        }
        Some(OverlayMapping {
            vnet_id: net.vnet_id?,
            ip: IpAddr::V4(self.ip?),
            mac: portolan::svp::Mac::from_u64(self.mac)?,
            cn_uuid: self.cn_uuid.as_deref()?.parse().ok()?,
            vlan: net.vlan_id,
        })
    }

    /// The underlay mapping this NIC provides, if it is an underlay NIC.
    pub fn underlay_mapping(&self, net: Option<&Network>, cfg: &Config) -> Option<UnderlayMapping> {
        let net = net?;
        if !self.underlay || self.belongs_to_type != "server" || net.nic_tag != cfg.underlay_nic_tag
        {
            return None;
        }
        Some(UnderlayMapping {
            cn_uuid: self.belongs_to_uuid.parse().ok()?,
            ip: IpAddr::V4(self.ip?),
            port: VXLAN_PORT,
        })
    }

    /// NAPI's serialized NIC.
    pub fn to_json(&self, net: Option<&Network>, cfg: &Config) -> Value {
        let mut m = Map::new();
        let mac = mac_string(self.mac);
        m.insert("mac".into(), json!(mac));
        m.insert("owner_uuid".into(), json!(self.owner_uuid));
        m.insert("belongs_to_uuid".into(), json!(self.belongs_to_uuid));
        m.insert("belongs_to_type".into(), json!(self.belongs_to_type));
        m.insert("primary".into(), json!(self.primary));
        m.insert("state".into(), json!(self.state));
        m.insert("created_timestamp".into(), json!(self.created_timestamp));
        m.insert("modified_timestamp".into(), json!(self.modified_timestamp));
        if let (Some(ip), Some(n)) = (self.ip, net) {
            m.insert("ip".into(), json!(ip.to_string()));
            m.insert("network_uuid".into(), json!(n.uuid));
            if n.fabric {
                m.insert("fabric".into(), json!(true));
                m.insert("internet_nat".into(), json!(n.internet_nat));
                if n.gateway.is_some() {
                    m.insert("gateway_provisioned".into(), json!(n.gateway_provisioned));
                }
            }
            if let Some(g) = n.gateway {
                m.insert("gateway".into(), json!(g.to_string()));
            }
            m.insert("mtu".into(), json!(n.mtu));
            m.insert("netmask".into(), json!(n.netmask().to_string()));
            let tag = match (n.fabric, n.vnet_id) {
                (true, Some(v)) => format!("{}/{v}", cfg.overlay_nic_tag),
                _ => n.nic_tag.clone(),
            };
            m.insert("nic_tag".into(), json!(tag));
            m.insert(
                "resolvers".into(),
                json!(n
                    .resolvers
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()),
            );
            m.insert("vlan_id".into(), json!(n.vlan_id));
            if !n.routes.is_empty() {
                let routes: Map<String, Value> = n
                    .routes
                    .iter()
                    .map(|(k, v)| {
                        let v = if v == "linklocal" {
                            json!(format!("macs[{mac}]"))
                        } else {
                            v.clone()
                        };
                        (k.clone(), v)
                    })
                    .collect();
                m.insert("routes".into(), Value::Object(routes));
            }
        } else {
            if let Some(t) = &self.nic_tag {
                m.insert("nic_tag".into(), json!(t));
            }
            if let Some(v) = self.vlan_id {
                m.insert("vlan_id".into(), json!(v));
            }
        }
        if let Some(c) = &self.cn_uuid {
            m.insert("cn_uuid".into(), json!(c));
        }
        if let Some(x) = &self.model {
            m.insert("model".into(), json!(x));
        }
        if let Some(x) = &self.nic_tags_provided {
            m.insert("nic_tags_provided".into(), json!(x));
        }
        for a in ALLOW {
            if self.allow(a) {
                m.insert(a.into(), json!(true));
            }
        }
        if self.underlay {
            m.insert("underlay".into(), json!(true));
        }
        Value::Object(m)
    }
}

/// `xx:xx:xx:xx:xx:xx`.
pub fn mac_string(mac: u64) -> String {
    let b = mac.to_be_bytes();
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[2], b[3], b[4], b[5], b[6], b[7]
    )
}

/// A MAC in colon, dash or bare form (leading zeros optional with separators).
pub fn parse_mac(s: &str) -> Option<u64> {
    s.parse::<crate::wire::Mac>().ok().map(|m| m.to_u64())
}

fn nic_from_row(r: db::Row) -> Result<Nic, OpError> {
    super::db::doc_from_row(r, "nic")
}

/// One NIC.
pub fn get(db: &mut Db<'_>, mac: u64) -> Result<Option<Nic>, OpError> {
    db.query_opt(
        "SELECT doc FROM napi_nics WHERE mac = $1",
        &[Val::int(mac as i64)],
    )?
    .map(nic_from_row)
    .transpose()
}

/// The NIC named in a URL: a bad MAC is 422 on `mac`, a missing NIC 404.
pub fn find(db: &mut Db<'_>, mac: &str) -> Result<Nic, OpError> {
    let Some(m) = parse_mac(mac) else {
        return Err(ApiError::invalid("mac", "invalid MAC address").into());
    };
    get(db, m)?.ok_or_else(|| ApiError::not_found("nic not found").into())
}

fn row_params(n: &Nic) -> Result<[Val; 10], OpError> {
    Ok([
        Val::int(n.mac as i64),
        Val::text(&n.owner_uuid),
        Val::text(&n.belongs_to_uuid),
        Val::text(&n.belongs_to_type),
        Val::opt_text(n.cn_uuid.as_deref()),
        Val::opt_text(n.network_uuid.as_deref()),
        Val::Int(n.ip.map(|i| i64::from(u32::from(i)))),
        Val::boolean(n.primary),
        Val::text(&n.state),
        Val::text(serde_json::to_string(n)?),
    ])
}

/// Writes a new NIC row (the caller holds the NIC's lock and saw no row with its MAC).
fn insert(db: &mut Db<'_>, n: &Nic) -> Result<(), OpError> {
    db.exec(
        "INSERT INTO napi_nics (mac, owner_uuid, belongs_to_uuid, belongs_to_type, cn_uuid, \
           network_uuid, ip, is_primary, state, doc) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &row_params(n)?,
    )?;
    Ok(())
}

/// Rewrites an existing NIC row; a NIC that is gone is 404, never re-created.
fn update_row(db: &mut Db<'_>, n: &Nic) -> Result<(), OpError> {
    // Parameters are numbered in order of first appearance (db.rs): the key comes last.
    let mut params = row_params(n)?;
    params.rotate_left(1);
    let changed = db.exec(
        "UPDATE napi_nics SET owner_uuid = $1, belongs_to_uuid = $2, belongs_to_type = $3, \
           cn_uuid = $4, network_uuid = $5, ip = $6, is_primary = $7, state = $8, doc = $9 \
         WHERE mac = $10",
        &params,
    )?;
    if changed == 0 {
        return Err(ApiError::not_found("nic not found").into());
    }
    Ok(())
}

/// Parameters of CreateNic / ProvisionNic.
const CREATE_PARAMS: &[&str] = &[
    "belongs_to_uuid",
    "belongs_to_type",
    "owner_uuid",
    "mac",
    "ip",
    "network_uuid",
    "nic_tag",
    "vlan_id",
    "cn_uuid",
    "primary",
    "reserved",
    "state",
    "nic_tags_provided",
    "model",
    "check_owner",
    "underlay",
    "allow_dhcp_spoofing",
    "allow_ip_spoofing",
    "allow_mac_spoofing",
    "allow_restricted_traffic",
    "allow_unfiltered_promisc",
];

/// A validated NIC create request.
pub struct NewNic {
    nic: Nic,
    network_uuid: Option<String>,
    mac_given: bool,
    check_owner: bool,
    /// ProvisionNic: the network came from the URL.
    url_network: bool,
}

fn validate_common(p: &mut Params, nic: &mut Nic) {
    if let Some(c) = p.uuid("cn_uuid") {
        nic.cn_uuid = Some(c);
    }
    if let Some(x) = p.boolean("primary") {
        nic.primary = x;
    }
    if let Some(x) = p.one_of("state", &["provisioning", "stopped", "running"]) {
        nic.state = x;
    }
    if let Some(x) = p.string_array("nic_tags_provided") {
        nic.nic_tags_provided = Some(x);
    }
    if let Some(x) = p.text("model", 255) {
        nic.model = Some(x);
    }
    if let Some(x) = p.boolean("underlay") {
        nic.underlay = x;
    }
    if let Some(x) = p.boolean("reserved") {
        nic.reserved = x;
    }
    for a in ALLOW {
        if let Some(x) = p.boolean(a) {
            *nic.allow_mut(a) = x;
        }
    }
}

/// Validates CreateNic (`url_network` None) or ProvisionNic (the network UUID from the URL).
pub fn validate_create(p: &mut Params, url_network: Option<&str>) -> Result<NewNic, ApiError> {
    p.allow_only(CREATE_PARAMS);
    let btu = p.uuid("belongs_to_uuid");
    let btu = p.require("belongs_to_uuid", btu);
    let btt = p.one_of("belongs_to_type", &["other", "server", "zone"]);
    let btt = p.require("belongs_to_type", btt);
    let owner = p.uuid("owner_uuid");
    let owner = p.require("owner_uuid", owner);
    let mac = match p.raw("mac").cloned() {
        Some(v) => match v.as_str().and_then(parse_mac) {
            Some(m) if m >> 40 & 1 == 0 && m != 0 => Some(m),
            Some(_) => {
                p.invalid("mac", "MAC address must be a unicast address");
                None
            }
            None => {
                p.invalid("mac", "invalid MAC address");
                None
            }
        },
        None => None,
    };
    let ip = p.ipv4("ip");
    let network_uuid = match url_network {
        Some(u) => Some(u.to_string()),
        None => p.uuid("network_uuid"),
    };
    let nic_tag = p.string("nic_tag");
    let vlan_id = p.int_in(
        "vlan_id",
        0,
        4094,
        "VLAN ID must be a number between 0 and 4094, and not 1",
    );
    let check_owner = p.boolean("check_owner").unwrap_or(true);
    let now = iso_now();
    let mut nic = Nic {
        mac: mac.unwrap_or(0),
        owner_uuid: owner.unwrap_or_default(),
        belongs_to_uuid: btu.unwrap_or_default(),
        belongs_to_type: btt.unwrap_or_default(),
        primary: false,
        state: "provisioning".into(),
        created_timestamp: now.clone(),
        modified_timestamp: now,
        ip,
        network_uuid: None,
        cn_uuid: None,
        model: None,
        nic_tags_provided: None,
        nic_tag,
        vlan_id: vlan_id.map(|v| v as u16),
        underlay: false,
        reserved: false,
        allow_dhcp_spoofing: false,
        allow_ip_spoofing: false,
        allow_mac_spoofing: false,
        allow_restricted_traffic: false,
        allow_unfiltered_promisc: false,
    };
    validate_common(p, &mut nic);
    p.finish()?;
    if nic.underlay && nic.belongs_to_type != "server" {
        p.invalid("underlay", "Only server NICs can be underlay NICs");
    }
    if nic.ip.is_some()
        && network_uuid.is_none()
        && (nic.nic_tag.is_none() || nic.vlan_id.is_none())
    {
        p.invalid(
            "ip",
            "ip requires network_uuid, or nic_tag and vlan_id, to find its network",
        );
    }
    p.finish()?;
    Ok(NewNic {
        nic,
        network_uuid,
        mac_given: mac.is_some(),
        check_owner,
        url_network: url_network.is_some(),
    })
}

fn random_mac(oui: u32) -> Result<u64, OpError> {
    let mut b = [0u8; 3];
    getrandom::getrandom(&mut b).map_err(|e| OpError::Corrupt(format!("random: {e}")))?;
    Ok((u64::from(oui) << 24) | (u64::from(b[0]) << 16) | (u64::from(b[1]) << 8) | u64::from(b[2]))
}

/// Finds the network containing `ip` with `nic_tag` and `vlan_id` (CreateNic without
/// `network_uuid`).
fn network_for(
    db: &mut Db<'_>,
    ip: Ipv4Addr,
    tag: &str,
    vlan: u16,
) -> Result<Option<Network>, OpError> {
    // A fabric NIC's tag is `<overlay tag>/<vnet_id>`: the VNI picks the owner's network.
    let (name, vnet) = match tag.split_once('/') {
        Some((n, v)) => match v.parse::<u32>() {
            Ok(v) => (n, Some(v)),
            Err(_) => return Err(ApiError::invalid("nic_tag", "nic tag does not exist").into()),
        },
        None => (tag, None),
    };
    let mut sql = String::from(
        "SELECT uuid FROM napi_networks WHERE nic_tag = $1 AND vlan_id = $2 \
           AND subnet_lo <= $3 AND subnet_hi >= $3",
    );
    let mut args = vec![Val::text(name), Val::int(vlan), Val::int(u32::from(ip))];
    if let Some(v) = vnet {
        sql.push_str(" AND vnet_id = $4");
        args.push(Val::int(v));
    }
    sql.push_str(" ORDER BY uuid LIMIT 2");
    let rows = db.query(&sql, &args)?;
    if rows.len() > 1 {
        return Err(ApiError::invalid(
            "ip",
            "more than one network matches ip, nic_tag and vlan_id: give network_uuid",
        )
        .into());
    }
    match rows.into_iter().next() {
        Some(r) => {
            let u = r.into_iter().next().map(|v| v.into_string("uuid"));
            let u = u.unwrap_or_else(|| Err(OpError::Corrupt("uuid".into())))?;
            // Lock, then read again: the network may have been deleted since the search.
            networks::lock_network(db, &u)?;
            networks::get(db, &u)
        }
        None => Ok(None),
    }
}

/// Claims `ip` (explicit) or allocates one on `net` for `nic`; writes the IP record. The
/// caller holds the network's lock and read `net` under it.
fn take_ip(
    db: &mut Db<'_>,
    net: &Network,
    nic: &Nic,
    explicit: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, OpError> {
    let addr = match explicit {
        Some(ip) => {
            if !net.contains(ip) {
                return Err(ApiError::invalid("ip", "ip cannot be outside subnet").into());
            }
            if u32::from(ip) == net.broadcast() {
                return Err(ApiError::invalid("ip", "ip cannot be the broadcast address").into());
            }
            if net.is_network_address(ip) {
                return Err(ApiError::invalid("ip", "ip cannot be the network address").into());
            }
            if let Some(r) = networks::get_ip(db, &net.uuid, u32::from(ip))? {
                // Gateway and resolvers (held by `other`) may be requested explicitly.
                let held = r
                    .belongs_to_uuid
                    .as_ref()
                    .is_some_and(|b| b != &nic.belongs_to_uuid)
                    && r.belongs_to_type.as_deref() != Some("other");
                let nic_holds = db
                    .query_opt(
                        "SELECT mac FROM napi_nics WHERE network_uuid = $1 AND ip = $2 AND mac <> $3",
                        &[Val::text(&net.uuid), Val::int(u32::from(ip)), Val::int(nic.mac as i64)],
                    )?
                    .is_some();
                if held || nic_holds {
                    let t = r.belongs_to_type.clone().unwrap_or_else(|| "zone".into());
                    let id = r.belongs_to_uuid.clone().unwrap_or_default();
                    return Err(ApiError::invalid_params(vec![FieldError::used_by(
                        "ip",
                        &t,
                        &id,
                        format!("IP in use by {t} \"{id}\""),
                    )])
                    .into());
                }
            }
            u32::from(ip)
        }
        None => match networks::allocate(db, &net.uuid)? {
            Some(a) => a,
            None => return Err(ApiError::subnet_full(&net.uuid).into()),
        },
    };
    networks::put_ip(
        db,
        &net.uuid,
        &IpRec {
            ip: addr,
            reserved: nic.reserved,
            belongs_to_type: Some(nic.belongs_to_type.clone()),
            belongs_to_uuid: Some(nic.belongs_to_uuid.clone()),
            owner_uuid: Some(nic.owner_uuid.clone()),
        },
    )?;
    Ok(Ipv4Addr::from(addr))
}

/// Strips a NIC's hold on its IP (the record stays, as NAPI keeps it).
fn release_ip(db: &mut Db<'_>, net_uuid: &str, ip: Ipv4Addr) -> Result<(), OpError> {
    if let Some(mut r) = networks::get_ip(db, net_uuid, u32::from(ip))? {
        r.belongs_to_type = None;
        r.belongs_to_uuid = None;
        if !r.reserved {
            r.owner_uuid = None;
        }
        networks::put_ip(db, net_uuid, &r)?;
    }
    Ok(())
}

fn check_network(req: &NewNic, net: &Network) -> Result<(), OpError> {
    let nic = &req.nic;
    let mut errs = Vec::new();
    if net.fabric && nic.belongs_to_type == "zone" && nic.cn_uuid.is_none() {
        errs.push(FieldError::missing("cn_uuid"));
    }
    if req.check_owner && !net.owner_uuids.is_empty() && !net.owner_uuids.contains(&nic.owner_uuid)
    {
        errs.push(FieldError::invalid(
            "owner_uuid",
            "network owner_uuids do not match",
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_params(errs).into())
    }
}

/// Sets `gateway_provisioned` when a NIC takes (or leaves) a fabric network's gateway IP.
fn mark_gateway(
    db: &mut Db<'_>,
    net: &Network,
    ip: Ipv4Addr,
    provisioned: bool,
) -> Result<(), OpError> {
    if net.fabric && net.gateway == Some(ip) && net.gateway_provisioned != provisioned {
        // Re-read: the caller's copy may predate this transaction's other writes.
        if let Some(mut n) = networks::get(db, &net.uuid)? {
            n.gateway_provisioned = provisioned;
            networks::save_doc(db, &n)?;
        }
    }
    Ok(())
}

fn clear_other_primaries(db: &mut Db<'_>, nic: &Nic) -> Result<(), OpError> {
    if !nic.primary {
        return Ok(());
    }
    let others = db
        .query(
            "SELECT mac FROM napi_nics WHERE belongs_to_uuid = $1 AND is_primary = 1 AND mac <> $2 \
             ORDER BY mac",
            &[Val::text(&nic.belongs_to_uuid), Val::int(nic.mac as i64)],
        )?
        .into_iter()
        .map(|r| r[0].as_i64("mac").map(|m| m as u64))
        .collect::<Result<Vec<_>, _>>()?;
    for mac in others {
        // Lock, then read again: rewrite the sibling as it is now, not as it was.
        lock_nic(db, mac)?;
        if let Some(mut o) = get(db, mac)?.filter(|o| o.primary) {
            o.primary = false;
            update_row(db, &o)?;
            record(db, &o, "update", None)?;
        }
    }
    Ok(())
}

/// Records a NIC change in the feed: uuid = the MAC as 12 hex digits, servers = the NIC's
/// host(s) (`extra`: the old one after a move).
fn record(db: &mut Db<'_>, nic: &Nic, action: &str, extra: Option<&str>) -> Result<(), OpError> {
    let mac = format!("{:012x}", nic.mac);
    let mut servers: Vec<&str> = nic.cn_uuid.iter().map(String::as_str).collect();
    if let Some(x) = extra.filter(|x| !servers.contains(x)) {
        servers.push(x);
    }
    changes::record(
        db,
        &Change {
            kind: changes::kind::NIC,
            uuid: &mac,
            action,
            owner_uuid: Some(&nic.owner_uuid),
            servers: &servers,
        },
    )
}

/// Creates a NIC (with its IP and Portolan records) in the caller's transaction.
pub fn create(tx: &mut dyn Txn, cfg: &Config, mut req: NewNic) -> Result<Value, OpError> {
    let mut d = Db::from(tx.raw());
    // Lock order (db.rs): the NIC, then its network, then Portolan's VNI.
    if req.mac_given {
        lock_nic(&mut d, req.nic.mac)?;
    }
    // The network, if any: locked before it is read, so a concurrent delete either sees this
    // NIC or has already removed the network (404 here).
    let net = match (
        &req.network_uuid,
        req.nic.ip,
        &req.nic.nic_tag,
        req.nic.vlan_id,
    ) {
        (Some(u), _, _, _) => match lock_then_get(&mut d, u)? {
            Some(n) => Some(n),
            None if req.url_network => match super::pools::get(&mut d, u)? {
                Some(pool) => Some(pick_from_pool(&mut d, &mut req, &pool)?),
                None => return Err(ApiError::not_found("network not found").into()),
            },
            None => return Err(ApiError::invalid("network_uuid", "network does not exist").into()),
        },
        (None, Some(ip), Some(tag), Some(vlan)) => match network_for(&mut d, ip, tag, vlan)? {
            Some(n) => Some(n),
            None => {
                return Err(ApiError::invalid(
                    "ip",
                    "No networks found matching parameters: ip, nic_tag, vlan_id",
                )
                .into())
            }
        },
        _ => None,
    };
    if let Some(n) = &net {
        check_network(&req, n)?;
    }
    // The MAC: given (must be new) or random in the OUI.
    if req.mac_given {
        if get(&mut d, req.nic.mac)?.is_some() {
            return Err(ApiError::invalid_params(vec![FieldError::duplicate(
                "mac",
                "Already exists",
            )])
            .into());
        }
    } else {
        let mut found = None;
        for _ in 0..50 {
            let m = random_mac(cfg.mac_oui)?;
            lock_nic(&mut d, m)?;
            if get(&mut d, m)?.is_none() {
                found = Some(m);
                break;
            }
        }
        req.nic.mac = found.ok_or_else(|| {
            ApiError::invalid("mac", "could not find a free MAC address after 50 tries")
        })?;
    }
    let mut nic = req.nic;
    if let Some(n) = &net {
        let ip = take_ip(&mut d, n, &nic, nic.ip)?;
        nic.ip = Some(ip);
        nic.network_uuid = Some(n.uuid.clone());
        nic.nic_tag = None;
        nic.vlan_id = None;
        mark_gateway(&mut d, n, ip, true)?;
    } else {
        nic.ip = None;
    }
    clear_other_primaries(&mut d, &nic)?;
    insert(&mut d, &nic)?;
    record(&mut d, &nic, "create", None)?;
    if let Some(m) = nic.overlay(net.as_ref()) {
        tx.create_mapping(&m)?;
    }
    if let Some(u) = nic.underlay_mapping(net.as_ref(), cfg) {
        tx.put_underlay(&u)?;
    }
    let net = refreshed(tx, net)?;
    Ok(nic.to_json(net.as_ref(), cfg))
}

/// ProvisionNic on a pool: the first member network (in pool order) that the owner may use and
/// that has a free address; that address is claimed as if requested.
fn pick_from_pool(
    d: &mut Db<'_>,
    req: &mut NewNic,
    pool: &super::pools::Pool,
) -> Result<Network, OpError> {
    if req.nic.ip.is_some() {
        return Err(ApiError::invalid("ip", "ip cannot be specified with a network pool").into());
    }
    let mut refusal = None;
    for u in &pool.networks {
        let Some(n) = lock_then_get(d, u)? else {
            continue;
        };
        if let Err(e) = check_network(req, &n) {
            refusal = Some(e);
            continue;
        }
        if let Some(a) = networks::allocate(d, &n.uuid)? {
            req.nic.ip = Some(Ipv4Addr::from(a));
            return Ok(n);
        }
        refusal = None;
    }
    Err(refusal.unwrap_or_else(|| ApiError::subnet_full(&pool.uuid).into()))
}

/// Takes a network's lock, then reads it (`None`: it does not exist, or no longer).
fn lock_then_get(d: &mut Db<'_>, uuid: &str) -> Result<Option<Network>, OpError> {
    networks::lock_network(d, uuid)?;
    networks::get(d, uuid)
}

fn refreshed(tx: &mut dyn Txn, net: Option<Network>) -> Result<Option<Network>, OpError> {
    match net {
        Some(n) => networks::get(&mut Db::from(tx.raw()), &n.uuid),
        None => Ok(None),
    }
}

/// GetNic.
pub fn get_api(db: &mut Db<'_>, cfg: &Config, mac: &str) -> Result<Value, OpError> {
    let nic = find(db, mac)?;
    let net = match &nic.network_uuid {
        Some(u) => networks::get(db, u)?,
        None => None,
    };
    Ok(nic.to_json(net.as_ref(), cfg))
}

/// UpdateNic: owner, host, state, flags; `network_uuid` or `ip` to renumber. Portolan records
/// follow: a fabric NIC that moves host or changes IP is moved (VL2 + VL3 events), one that
/// stops being a fabric NIC is tombstoned, one that becomes one is created.
pub fn update(tx: &mut dyn Txn, cfg: &Config, mac: &str, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&[
        "owner_uuid",
        "belongs_to_uuid",
        "belongs_to_type",
        "cn_uuid",
        "primary",
        "state",
        "nic_tags_provided",
        "model",
        "underlay",
        "reserved",
        "network_uuid",
        "ip",
        "check_owner",
        "nic_tag",
        "vlan_id",
        "mac",
        "allow_dhcp_spoofing",
        "allow_ip_spoofing",
        "allow_mac_spoofing",
        "allow_restricted_traffic",
        "allow_unfiltered_promisc",
    ]);
    let owner = p.uuid("owner_uuid");
    let btu = p.uuid("belongs_to_uuid");
    let btt = p.one_of("belongs_to_type", &["other", "server", "zone"]);
    let network_uuid = p.uuid("network_uuid");
    let ip = p.ipv4("ip");
    let check_owner = p.boolean("check_owner").unwrap_or(true);
    let _ = p.string("nic_tag");
    let _ = p.int_in(
        "vlan_id",
        0,
        4094,
        "VLAN ID must be a number between 0 and 4094, and not 1",
    );
    let mut d = Db::from(tx.raw());
    // Lock, then read: concurrent updates of one NIC apply one after the other, each to what
    // the previous one left, and an update after a delete finds nothing (404).
    if let Some(m) = parse_mac(mac) {
        lock_nic(&mut d, m)?;
    }
    let old = find(&mut d, mac)?;
    if let Some(m) = p.raw("mac").cloned() {
        if m.as_str().and_then(parse_mac) != Some(old.mac) {
            p.invalid("mac", "mac cannot be changed");
        }
    }
    let mut nic = old.clone();
    validate_common(p, &mut nic);
    p.finish()?;
    if let Some(x) = owner {
        nic.owner_uuid = x;
    }
    if let Some(x) = btu {
        nic.belongs_to_uuid = x;
    }
    if let Some(x) = btt {
        nic.belongs_to_type = x;
    }
    if nic.underlay && nic.belongs_to_type != "server" {
        return Err(ApiError::invalid("underlay", "Only server NICs can be underlay NICs").into());
    }
    nic.modified_timestamp = iso_now();
    // The networks this update may touch, locked in UUID order before they are read.
    let mut touched: Vec<&String> = old.network_uuid.iter().chain(&network_uuid).collect();
    touched.sort();
    touched.dedup();
    for u in touched {
        networks::lock_network(&mut d, u)?;
    }
    let old_net = match &old.network_uuid {
        Some(u) => networks::get(&mut d, u)?,
        None => None,
    };
    // Renumbering: a new network, or a new IP on the current one.
    let target_net = match &network_uuid {
        Some(u) if Some(u) != old.network_uuid.as_ref() => Some(
            networks::get(&mut d, u)?
                .ok_or_else(|| ApiError::invalid("network_uuid", "network does not exist"))?,
        ),
        _ => old_net.clone(),
    };
    let renumber = target_net.as_ref().map(|n| &n.uuid) != old_net.as_ref().map(|n| &n.uuid)
        || (ip.is_some() && ip != old.ip);
    if let Some(n) = &target_net {
        let req = NewNic {
            nic: nic.clone(),
            network_uuid: Some(n.uuid.clone()),
            mac_given: true,
            check_owner,
            url_network: false,
        };
        if renumber || nic.owner_uuid != old.owner_uuid {
            check_network(&req, n)?;
        } else if n.fabric && nic.belongs_to_type == "zone" && nic.cn_uuid.is_none() {
            return Err(ApiError::invalid_params(vec![FieldError::missing("cn_uuid")]).into());
        }
    }
    if renumber {
        let n = target_net.as_ref().ok_or_else(|| {
            ApiError::invalid("ip", "ip requires network_uuid: this NIC is on no network")
        })?;
        let new_ip = take_ip(&mut d, n, &nic, ip)?;
        if let (Some(on), Some(oip)) = (&old_net, old.ip) {
            release_ip(&mut d, &on.uuid, oip)?;
            mark_gateway(&mut d, on, oip, false)?;
        }
        nic.ip = Some(new_ip);
        nic.network_uuid = Some(n.uuid.clone());
        mark_gateway(&mut d, n, new_ip, true)?;
    } else if let (Some(n), Some(cur)) = (&target_net, nic.ip) {
        // The IP record follows the NIC's owner and holder.
        if nic.owner_uuid != old.owner_uuid
            || nic.belongs_to_uuid != old.belongs_to_uuid
            || nic.belongs_to_type != old.belongs_to_type
            || nic.reserved != old.reserved
        {
            networks::put_ip(
                &mut d,
                &n.uuid,
                &IpRec {
                    ip: u32::from(cur),
                    reserved: nic.reserved,
                    belongs_to_type: Some(nic.belongs_to_type.clone()),
                    belongs_to_uuid: Some(nic.belongs_to_uuid.clone()),
                    owner_uuid: Some(nic.owner_uuid.clone()),
                },
            )?;
        }
    }
    clear_other_primaries(&mut d, &nic)?;
    update_row(&mut d, &nic)?;
    record(&mut d, &nic, "update", old.cn_uuid.as_deref())?;
    if old.owner_uuid != nic.owner_uuid {
        // The old owner's servers had this NIC in their firewall closure.
        record(&mut d, &old, "update", None)?;
    }
    // Portolan.
    let before = old.overlay(old_net.as_ref());
    let after = nic.overlay(target_net.as_ref());
    match (before, after) {
        (Some(b), Some(a)) if b != a => {
            let live = tx.mapping(b.vnet_id, b.ip)?.is_some_and(|s| !s.deleted);
            if live {
                tx.move_mapping(b.vnet_id, b.ip, &a)?;
            } else {
                tx.create_mapping(&a)?;
            }
        }
        (Some(_), Some(_)) => {}
        (Some(b), None) => {
            tx.delete_mapping(b.vnet_id, b.ip)?;
        }
        (None, Some(a)) => {
            tx.create_mapping(&a)?;
        }
        (None, None) => {}
    }
    let ub = old.underlay_mapping(old_net.as_ref(), cfg);
    let ua = nic.underlay_mapping(target_net.as_ref(), cfg);
    if ub != ua {
        if let Some(b) = ub {
            if ua.is_none_or(|a| a.cn_uuid != b.cn_uuid) {
                tx.remove_underlay(b.cn_uuid)?;
            }
        }
        if let Some(a) = ua {
            tx.put_underlay(&a)?;
        }
    }
    let net = refreshed(tx, target_net)?;
    Ok(nic.to_json(net.as_ref(), cfg))
}

/// DeleteNic: frees the IP (the record stays), tombstones a fabric mapping (VL2 events),
/// removes an underlay mapping.
pub fn delete(tx: &mut dyn Txn, cfg: &Config, mac: &str) -> Result<(), OpError> {
    let mut d = Db::from(tx.raw());
    if let Some(m) = parse_mac(mac) {
        lock_nic(&mut d, m)?;
    }
    let nic = find(&mut d, mac)?;
    let net = match &nic.network_uuid {
        Some(u) => lock_then_get(&mut d, u)?,
        None => None,
    };
    if let (Some(n), Some(ip)) = (&net, nic.ip) {
        release_ip(&mut d, &n.uuid, ip)?;
        mark_gateway(&mut d, n, ip, false)?;
    }
    let gone = d.exec(
        "DELETE FROM napi_nics WHERE mac = $1",
        &[Val::int(nic.mac as i64)],
    )?;
    if gone == 0 {
        return Err(ApiError::not_found("nic not found").into());
    }
    record(&mut d, &nic, "delete", None)?;
    if let Some(m) = nic.overlay(net.as_ref()) {
        tx.delete_mapping(m.vnet_id, m.ip)?;
    }
    if let Some(u) = nic.underlay_mapping(net.as_ref(), cfg) {
        tx.remove_underlay(u.cn_uuid)?;
    }
    Ok(())
}

/// ListNics filters.
const LIST_PARAMS: &[&str] = &[
    "owner_uuid",
    "belongs_to_uuid",
    "belongs_to_type",
    "cn_uuid",
    "network_uuid",
    "nic_tag",
    "nic_tags_provided",
    "state",
    "underlay",
    "allow_dhcp_spoofing",
    "allow_ip_spoofing",
    "allow_mac_spoofing",
    "allow_restricted_traffic",
    "allow_unfiltered_promisc",
    "limit",
    "offset",
];

/// ListNics, by MAC; comma lists mean OR.
pub fn list(db: &mut Db<'_>, cfg: &Config, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(LIST_PARAMS);
    let mut uuid_filters = Vec::new();
    for f in ["owner_uuid", "belongs_to_uuid", "cn_uuid", "network_uuid"] {
        if let Some(v) = p.string_array(f) {
            let bad: Vec<Value> = v
                .iter()
                .filter(|x| parse_uuid(x).is_none())
                .map(|x| json!(x))
                .collect();
            if bad.is_empty() {
                uuid_filters.push((
                    f,
                    v.iter().filter_map(|x| parse_uuid(x)).collect::<Vec<_>>(),
                ));
            } else {
                let mut e = FieldError::invalid(f, "invalid UUID");
                e.invalid = Some(bad);
                p.error(e);
            }
        }
    }
    let btt = p.string_array("belongs_to_type");
    let states = p.string_array("state");
    let tags = p.string_array("nic_tag");
    let provided = p.string_array("nic_tags_provided");
    let underlay = p.boolean("underlay");
    let allows: Vec<(&str, bool)> = ALLOW
        .iter()
        .filter_map(|a| p.boolean(a).map(|b| (*a, b)))
        .collect();
    let (limit, offset) = p.pagination();
    p.finish()?;
    // Column filters go to SQL; the rest are checked below. Without the latter, the page is
    // cut in SQL too.
    let mut sql = String::from("SELECT doc FROM napi_nics");
    let mut args: Vec<Val> = Vec::new();
    let mut conds: Vec<String> = Vec::new();
    let column_filters = uuid_filters
        .iter()
        .map(|(f, v)| (*f, v.clone()))
        .chain(btt.clone().map(|v| ("belongs_to_type", v)))
        .chain(states.clone().map(|v| ("state", v)));
    for (col, vals) in column_filters {
        let mut marks = Vec::new();
        for v in vals {
            args.push(Val::text(v));
            marks.push(format!("${}", args.len()));
        }
        if marks.is_empty() {
            conds.push("1 = 0".into());
        } else {
            conds.push(format!("{col} IN ({})", marks.join(", ")));
        }
    }
    if !conds.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    sql.push_str(" ORDER BY mac");
    let rust_side =
        underlay.is_some() || !allows.is_empty() || provided.is_some() || tags.is_some();
    let (limit, offset) = if rust_side {
        (limit, offset)
    } else {
        args.push(Val::int(i64::try_from(limit).unwrap_or(i64::MAX)));
        sql.push_str(&format!(" LIMIT ${}", args.len()));
        args.push(Val::int(i64::try_from(offset).unwrap_or(i64::MAX)));
        sql.push_str(&format!(" OFFSET ${}", args.len()));
        (super::params::MAX_LIMIT, 0)
    };
    let nics: Vec<Nic> = db
        .query(&sql, &args)?
        .into_iter()
        .map(nic_from_row)
        .collect::<Result<_, _>>()?;
    let mut nets: std::collections::HashMap<String, Option<Network>> = Default::default();
    let mut out = Vec::new();
    for n in nics {
        let ok = uuid_filters.iter().all(|(f, vals)| {
            let v = match *f {
                "owner_uuid" => Some(&n.owner_uuid),
                "belongs_to_uuid" => Some(&n.belongs_to_uuid),
                "cn_uuid" => n.cn_uuid.as_ref(),
                _ => n.network_uuid.as_ref(),
            };
            v.is_some_and(|v| vals.contains(v))
        }) && btt.as_ref().is_none_or(|v| v.contains(&n.belongs_to_type))
            && states.as_ref().is_none_or(|v| v.contains(&n.state))
            && underlay.is_none_or(|u| n.underlay == u)
            && allows.iter().all(|(a, b)| n.allow(a) == *b)
            && provided.as_ref().is_none_or(|v| {
                n.nic_tags_provided
                    .as_ref()
                    .is_some_and(|p| p.iter().any(|t| v.contains(t)))
            });
        if !ok {
            continue;
        }
        let net = match &n.network_uuid {
            Some(u) => {
                if !nets.contains_key(u) {
                    let x = networks::get(db, u)?;
                    nets.insert(u.clone(), x);
                }
                nets.get(u).cloned().flatten()
            }
            None => None,
        };
        let j = n.to_json(net.as_ref(), cfg);
        if let Some(t) = &tags {
            let tag = j.get("nic_tag").and_then(Value::as_str).unwrap_or("");
            let base = tag.split('/').next().unwrap_or("");
            if !t.iter().any(|x| x == tag || x == base) {
                continue;
            }
        }
        out.push(j);
    }
    Ok(Value::Array(page(out, limit, offset)))
}

/// The CN UUID form Portolan uses.
pub fn cn(s: &str) -> Option<CnUuid> {
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        let m = parse_mac("90:b8:d0:0a:0b:0c").unwrap();
        assert_eq!(parse_mac("90-b8-d0-0a-0b-0c"), Some(m));
        assert_eq!(parse_mac("90b8d00a0b0c"), Some(m));
        assert_eq!(parse_mac("90:b8:d0:a:b:c"), Some(m));
        assert_eq!(mac_string(m), "90:b8:d0:0a:0b:0c");
        assert_eq!(parse_mac("90:b8:d0:0a:0b"), None);
        assert_eq!(parse_mac("zz"), None);
    }
}
