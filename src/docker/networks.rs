//! Docker networks over fabric VLANs and fabric networks (`specs/docker-remote-api.md` §1, §3;
//! DESIGN "Networks and VNIs").
//!
//! A Docker network of an account is one fabric VLAN (the account's lowest free `vlan_id` in
//! 2..=4094) and one fabric network on it, both owned by the account's UUID, so it rides the
//! account's VNI; the Docker-only metadata (name, driver, labels, options, IPAM as asked,
//! internal, attachable) is a row of `docker_networks`. Everything a request does happens in
//! its one store transaction: a create that fails at any step (even in the fabric layer's own
//! validation, after the VLAN row was written) leaves no VLAN, network or IPAM record.
//!
//! - **Id**: the network UUID without dashes, twice (sdc-docker's rule): 64 hex, stable. The
//!   fabric network's UUID is accepted wherever an Id is.
//! - **Resolution** as moby 20.10: full Id, then exact name, then unique Id prefix. Inspect
//!   and delete word ambiguity as moby's router and daemon do (they differ).
//! - **Predefined networks.** Every account has its **default network**, Docker name `bridge`
//!   (driver `bridge`, a subnet from the pool), created with the account; `docker run` without
//!   `--network` will use it. `host` (driver `host`) and `none` (driver `null`) are listed and
//!   inspectable as moby lists them, so `docker network ls` and clients that look for the three
//!   built-ins (moby's GetDefaults) see what they expect; they have no fabric network behind
//!   them: containers will be refused `host` and get only a loopback on `none` (Docker part 2).
//!   None of the three can be created, removed or pruned (moby's 403 texts).
//! - **Drivers**: `bridge` (default) and `overlay` are accepted, stored and echoed; both mean a
//!   fabric network (there is no swarm here, so `overlay` needs none). `host`/`null` get moby's
//!   403 `only one instance of "host" network is allowed`; `macvlan`/`ipvlan` a 400 saying
//!   fabric does not support them; anything else moby's 404 `plugin "foo" not found`.
//! - **Subnets**: one IPv4 `IPAM.Config` entry at most (several: moby's 403 `bridge driver
//!   doesn't support multiple subnets`; IPv6: 400). Without one, the first free subnet of the
//!   pool ([`Config::docker_pool`](crate::control::Config), moby's defaults: the /16s of
//!   172.17–172.31, then the /20s of 192.168.0.0/16) that overlaps neither the account's
//!   networks nor any shared network. A subnet overlapping those is moby's 403 `Pool overlaps
//!   with other one on this address space`. Fabric networks use private ranges only (the
//!   fabric layer refuses others, 400). The gateway is the first usable address unless
//!   `Gateway` says otherwise, and is reserved; `IPRange` becomes the provision range;
//!   `AuxiliaryAddresses` are reserved. Inspect echoes `IPAM.Config` as it was asked (moby does
//!   the same: no `Gateway` unless given, except for pool subnets, which show it).
//! - **Internal** is stored, echoed and turns the fabric network's `internet_nat` off; keeping
//!   an internal network's containers from reaching outside is enforced with containers (part 2).
//! - **Names** are unique per account (shared networks' names included) and 409 on a taken one
//!   whatever `CheckDuplicate` says: moby 20.10 lets `CheckDuplicate:false` create a second
//!   network of the same name; we do not (by design: names are how containers and Compose
//!   find networks). A name is any non-empty text without control characters, ≤ 255 bytes.
//! - **Shared networks** ([`super::shared`]): listed and inspectable by every account, which
//!   cannot remove or prune them. `Containers` shows only the caller's endpoints (empty until
//!   containers exist, part 2).
//! - **Endpoints** are the NICs on the fabric network: `rm` refuses a network with any (moby's
//!   403 `error while removing network: network N id I has active endpoints`), `prune` skips it.
//! - `connect`/`disconnect` need a container; until containers exist (part 2) every container
//!   is unknown, answered as moby does: 404 `No such container: X` (moby looks the container up
//!   before the network).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::accounts::Account;
use super::api::{self, Op, Reply, Req};
use super::error;
use super::filters::{self, Filters};
use crate::control::db::{lock_key, Db, Val, LOCK_GLOBAL, LOCK_OWNER};
use crate::control::error::OpError;
use crate::control::params::{random_uuid, Params};
use crate::control::{fabrics, networks as fnet, Config};

/// The store's table of Docker networks.
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS docker_networks (
        network_uuid TEXT PRIMARY KEY,
        owner_uuid   TEXT NOT NULL,
        name         TEXT NOT NULL,
        driver       TEXT NOT NULL,
        labels       TEXT NOT NULL,
        options      TEXT NOT NULL,
        internal     BIGINT NOT NULL,
        attachable   BIGINT NOT NULL,
        ipam         TEXT NOT NULL,
        created_ms   BIGINT NOT NULL,
        shared       BIGINT NOT NULL,
        is_default   BIGINT NOT NULL,
        vlan_id      BIGINT NOT NULL,
        UNIQUE (owner_uuid, name)
    )",
    "CREATE INDEX IF NOT EXISTS docker_networks_by_shared ON docker_networks (shared)",
];

/// Names moby reserves (create refused with 403).
pub const PREDEFINED: &[&str] = &["bridge", "host", "none", "default"];
/// The Docker name of an account's default network.
pub const DEFAULT_NAME: &str = "bridge";
/// Longest network name, in bytes.
pub const MAX_NAME: usize = 255;
/// Lowest VLAN a Docker network takes (0 is untagged, 1 is refused by NAPI).
pub const FIRST_VLAN: u16 = 2;
/// Highest VLAN.
pub const LAST_VLAN: u16 = 4094;

/// What a Docker network is, as the account sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The account's default network (`bridge`).
    Default,
    /// Created by the account.
    Custom,
    /// Shared with every account by the operator.
    Shared,
    /// `host` or `none`: listed, no fabric network behind it.
    Builtin,
}

/// A range of subnets networks without `--subnet` get theirs from: the `size`-bit subnets of
/// `base/prefix`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool {
    /// The range's address.
    pub base: Ipv4Addr,
    /// The range's prefix length.
    pub prefix: u8,
    /// The prefix length of the subnets handed out (≥ `prefix`).
    pub size: u8,
}

impl std::fmt::Display for SubnetPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.base, self.prefix, self.size)
    }
}

/// Parses `--docker-subnet-pool CIDR[/SIZE]`: `10.100.0.0/16/24` hands out the /24s of
/// 10.100.0.0/16; without SIZE, /24s (or the CIDR itself when it is smaller).
pub fn parse_pool(s: &str) -> Result<SubnetPool, String> {
    let expected = "expected CIDR[/SIZE] of private IPv4 space, e.g. 10.100.0.0/16/24";
    let (cidr, size) = match s.matches('/').count() {
        1 => (s, None),
        2 => {
            let (c, z) = s.rsplit_once('/').unwrap_or((s, ""));
            (
                c,
                Some(z.parse::<u8>().map_err(|_| format!("{s:?}: {expected}"))?),
            )
        }
        _ => return Err(format!("{s:?}: {expected}")),
    };
    let (base, prefix) = fnet::parse_subnet(cidr).map_err(|e| format!("{s:?}: {e}; {expected}"))?;
    let size = size.unwrap_or(prefix.max(24));
    if size < prefix || size > fnet::MAX_FABRIC_PREFIX {
        return Err(format!(
            "{s:?}: SIZE must be between the CIDR's prefix length ({prefix}) and {}",
            fnet::MAX_FABRIC_PREFIX
        ));
    }
    let (lo, hi) = fnet::subnet_bounds(base, prefix);
    if !fnet::is_private(lo, hi) {
        return Err(format!("{s:?}: not private address space; {expected}"));
    }
    Ok(SubnetPool { base, prefix, size })
}

/// moby 20.10's default address pools: the /16s of 172.17.0.0 to 172.31.0.0, then the /20s
/// of 192.168.0.0/16.
pub fn default_pools() -> Vec<SubnetPool> {
    let mut v: Vec<SubnetPool> = (17..=31)
        .map(|b| SubnetPool {
            base: Ipv4Addr::new(172, b, 0, 0),
            prefix: 16,
            size: 16,
        })
        .collect();
    v.push(SubnetPool {
        base: Ipv4Addr::new(192, 168, 0, 0),
        prefix: 16,
        size: 20,
    });
    v
}

/// `IPAM` as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ipam {
    /// Always `default`.
    #[serde(rename = "Driver")]
    pub driver: String,
    /// As given (`null` when the request had none, as moby shows it).
    #[serde(rename = "Options")]
    pub options: Option<BTreeMap<String, String>>,
    /// As given; for a pool subnet, the subnet and gateway.
    #[serde(rename = "Config")]
    pub config: Vec<IpamConfig>,
}

/// One `IPAM.Config` entry (empty fields omitted, as Go's `omitempty`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpamConfig {
    /// The subnet.
    #[serde(rename = "Subnet", default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// The provision range.
    #[serde(rename = "IPRange", default, skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<String>,
    /// The gateway.
    #[serde(rename = "Gateway", default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Reserved addresses by name.
    #[serde(
        rename = "AuxiliaryAddresses",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub aux: Option<BTreeMap<String, String>>,
}

/// A Docker network as an account sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Net {
    /// What it is.
    pub kind: Kind,
    /// The Docker `Id` (64 hex).
    pub id: String,
    /// The fabric network (none for `host` and `none`).
    pub uuid: Option<String>,
    /// The owner of its fabric VLAN and network (the account; a synthetic owner for shared
    /// networks).
    pub owner_uuid: String,
    /// Docker name.
    pub name: String,
    /// Driver as created.
    pub driver: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Driver options.
    pub options: BTreeMap<String, String>,
    /// `--internal`.
    pub internal: bool,
    /// `--attachable`.
    pub attachable: bool,
    /// IPAM as shown.
    pub ipam: Ipam,
    /// Created, ms since the epoch.
    pub created_ms: i64,
    /// Its fabric VLAN.
    pub vlan_id: Option<u16>,
}

/// The Docker `Id` of a fabric network: its UUID without dashes, twice.
pub fn docker_id(uuid: &str) -> String {
    let h: String = uuid.chars().filter(|c| *c != '-').collect();
    format!("{h}{h}")
}

fn builtin(account: &Account, name: &str, driver: &str) -> Net {
    let d = crate::pki::sha256(
        format!("fabric docker builtin network {name} of {}", account.uuid).as_bytes(),
    );
    Net {
        kind: Kind::Builtin,
        id: crate::pki::ca::hex(&d),
        uuid: None,
        owner_uuid: account.uuid.clone(),
        name: name.into(),
        driver: driver.into(),
        labels: BTreeMap::new(),
        options: BTreeMap::new(),
        internal: false,
        attachable: false,
        ipam: Ipam {
            driver: "default".into(),
            options: None,
            config: Vec::new(),
        },
        created_ms: account.created_ms,
        vlan_id: None,
    }
}

/// RFC 3339 with the fraction's trailing zeros trimmed (Go's `RFC3339Nano`).
pub fn rfc3339(ms: i64) -> String {
    crate::control::time::rfc3339_from_ms(ms)
}

/// The JSON moby writes for a network, in moby's field order.
#[derive(Serialize)]
#[allow(non_snake_case)]
struct Resource<'a> {
    Name: &'a str,
    Id: &'a str,
    Created: String,
    Scope: &'static str,
    Driver: &'a str,
    EnableIPv6: bool,
    IPAM: &'a Ipam,
    Internal: bool,
    Attachable: bool,
    Ingress: bool,
    ConfigFrom: ConfigFrom,
    ConfigOnly: bool,
    Containers: Map<String, Value>,
    Options: &'a BTreeMap<String, String>,
    Labels: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
#[allow(non_snake_case)]
struct ConfigFrom {
    Network: &'static str,
}

impl Net {
    fn resource(&self) -> Resource<'_> {
        Resource {
            Name: &self.name,
            Id: &self.id,
            Created: rfc3339(self.created_ms),
            Scope: "local",
            Driver: &self.driver,
            EnableIPv6: false,
            IPAM: &self.ipam,
            Internal: self.internal,
            Attachable: self.attachable,
            Ingress: false,
            ConfigFrom: ConfigFrom { Network: "" },
            ConfigOnly: false,
            // Filled by `inspect` with the caller's containers on it.
            Containers: Map::new(),
            Options: &self.options,
            Labels: &self.labels,
        }
    }

    /// The network's JSON (`/networks`, `/networks/{id}`), as a value.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.resource()).unwrap_or(Value::Null)
    }
}

/// A JSON reply that keeps the serializer's field order (moby's), which a `Value` would sort.
fn ordered(status: StatusCode, v: &impl Serialize) -> Result<Reply, OpError> {
    let body = serde_json::to_vec(v)?;
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(Reply::Response(r))
}

const COLS: &str = "network_uuid, owner_uuid, name, driver, labels, options, internal, \
                    attachable, ipam, created_ms, shared, is_default, vlan_id";

fn from_row(r: Vec<Val>) -> Result<Net, OpError> {
    let mut it = r.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| OpError::Corrupt("docker network row".into()))
    };
    let uuid = next()?.into_string("network_uuid")?;
    let owner_uuid = next()?.into_string("owner_uuid")?;
    let name = next()?.into_string("name")?;
    let driver = next()?.into_string("driver")?;
    let labels = serde_json::from_str(&next()?.into_string("labels")?)?;
    let options = serde_json::from_str(&next()?.into_string("options")?)?;
    let internal = next()?.as_i64("internal")? != 0;
    let attachable = next()?.as_i64("attachable")? != 0;
    let ipam = serde_json::from_str(&next()?.into_string("ipam")?)?;
    let created_ms = next()?.as_i64("created_ms")?;
    let shared = next()?.as_i64("shared")? != 0;
    let is_default = next()?.as_i64("is_default")? != 0;
    let vlan_id = next()?.as_i64("vlan_id")?;
    Ok(Net {
        kind: if shared {
            Kind::Shared
        } else if is_default {
            Kind::Default
        } else {
            Kind::Custom
        },
        id: docker_id(&uuid),
        uuid: Some(uuid),
        owner_uuid,
        name,
        driver,
        labels,
        options,
        internal,
        attachable,
        ipam,
        created_ms,
        vlan_id: u16::try_from(vlan_id).ok(),
    })
}

/// Every network `account` sees: its own, the shared ones, and `host`/`none`, by name.
pub fn visible(db: &mut Db<'_>, account: &Account) -> Result<Vec<Net>, OpError> {
    let mut v = db
        .query(
            &format!(
                "SELECT {COLS} FROM docker_networks WHERE owner_uuid = $1 OR shared = 1 \
                 ORDER BY name, network_uuid"
            ),
            &[Val::text(&account.uuid)],
        )?
        .into_iter()
        .map(from_row)
        .collect::<Result<Vec<_>, _>>()?;
    v.push(builtin(account, "host", "host"));
    v.push(builtin(account, "none", "null"));
    v.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    Ok(v)
}

/// Every shared network.
pub fn shared(db: &mut Db<'_>) -> Result<Vec<Net>, OpError> {
    db.query(
        &format!("SELECT {COLS} FROM docker_networks WHERE shared = 1 ORDER BY name"),
        &[],
    )?
    .into_iter()
    .map(from_row)
    .collect()
}

/// The Docker network of a fabric network.
pub fn by_uuid(db: &mut Db<'_>, uuid: &str) -> Result<Option<Net>, OpError> {
    db.query_opt(
        &format!("SELECT {COLS} FROM docker_networks WHERE network_uuid = $1"),
        &[Val::text(uuid)],
    )?
    .map(from_row)
    .transpose()
}

/// Endpoints (NICs) on a fabric network; only `owner`'s when given.
pub fn endpoints(db: &mut Db<'_>, uuid: &str, owner: Option<&str>) -> Result<i64, OpError> {
    let row = match owner {
        None => db.query_opt(
            "SELECT COUNT(*) FROM napi_nics WHERE network_uuid = $1",
            &[Val::text(uuid)],
        )?,
        Some(o) => db.query_opt(
            "SELECT COUNT(*) FROM napi_nics WHERE network_uuid = $1 AND owner_uuid = $2",
            &[Val::text(uuid), Val::text(o)],
        )?,
    };
    Ok(row.and_then(|r| r[0].as_opt_i64()).unwrap_or(0))
}

/// How a lookup words its refusals: the router's inspect or the daemon's `FindNetwork`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// `GET /networks/{id}`: `N matches found based on ID prefix: network X is ambiguous`.
    Inspect,
    /// Delete, connect: `network X is ambiguous (N matches found based on ID prefix)`.
    Daemon,
}

/// Resolves `term` among `nets` as moby does: full Id (or fabric UUID), exact name, unique Id
/// prefix.
pub fn resolve(nets: Vec<Net>, term: &str, how: Lookup) -> Result<Net, OpError> {
    let mut by_name = Vec::new();
    let mut by_prefix = Vec::new();
    for n in nets {
        if n.id == term || n.uuid.as_deref() == Some(term) {
            return Ok(n);
        }
        let named = n.name == term;
        let prefixed = !term.is_empty() && n.id.starts_with(term);
        match (named, prefixed) {
            (true, true) => {
                by_prefix.push(n.clone());
                by_name.push(n);
            }
            (true, false) => by_name.push(n),
            (false, true) => by_prefix.push(n),
            _ => {}
        }
    }
    let ambiguous = |n: usize, basis: &str| {
        error::bad_request(match how {
            Lookup::Inspect => {
                format!("{n} matches found based on {basis}: network {term} is ambiguous")
            }
            Lookup::Daemon => {
                format!("network {term} is ambiguous ({n} matches found based on {basis})")
            }
        })
    };
    match (by_name.len(), by_prefix.len()) {
        (1, _) => Ok(by_name.remove(0)),
        (n, _) if n > 1 => Err(ambiguous(n, "name")),
        (_, 1) => Ok(by_prefix.remove(0)),
        (_, n) if n > 1 => Err(ambiguous(n, "ID prefix")),
        _ => Err(not_found(term)),
    }
}

/// moby's 404 for a network.
pub fn not_found(term: &str) -> OpError {
    error::not_found(format!("network {term} not found"))
}

/// What a network create asks for, validated field by field (the store is not consulted).
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Docker name.
    pub name: String,
    /// `bridge` or `overlay`.
    pub driver: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Driver options.
    pub options: BTreeMap<String, String>,
    /// `--internal`.
    pub internal: bool,
    /// `--attachable`.
    pub attachable: bool,
    /// `IPAM.Options`.
    pub ipam_options: Option<BTreeMap<String, String>>,
    /// The one IPv4 `IPAM.Config` entry, if any.
    pub config: Option<IpamConfig>,
}

impl Spec {
    /// A network with a pool subnet and nothing else set.
    pub fn plain(name: &str, driver: &str) -> Spec {
        Spec {
            name: name.into(),
            driver: driver.into(),
            labels: BTreeMap::new(),
            options: BTreeMap::new(),
            internal: false,
            attachable: false,
            ipam_options: None,
            config: None,
        }
    }
}

/// Go's name for a JSON value's kind (`json: cannot unmarshal number into …`).
fn go_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_error(v: &Value, path: &str, ty: &str) -> OpError {
    error::bad_request(format!(
        "json: cannot unmarshal {} into Go struct field {path} of type {ty}",
        go_kind(v)
    ))
}

fn get_str(o: &Map<String, Value>, k: &str, path: &str) -> Result<Option<String>, OpError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(type_error(v, path, "string")),
    }
}

fn get_bool(o: &Map<String, Value>, k: &str, path: &str) -> Result<bool, OpError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(type_error(v, path, "bool")),
    }
}

fn get_map(
    o: &Map<String, Value>,
    k: &str,
    path: &str,
) -> Result<Option<BTreeMap<String, String>>, OpError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(a, b)| match b {
                Value::String(s) => Ok((a.clone(), s.clone())),
                v => Err(type_error(v, path, "string")),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map(Some),
        Some(v) => Err(type_error(v, path, "map[string]string")),
    }
}

/// Whether `name` may name a network: non-empty, ≤ 255 bytes, no control or
/// bidirectional-override characters.
pub fn check_name(name: &str) -> Result<(), OpError> {
    if name.is_empty() {
        return Err(error::bad_request(
            "invalid name: a network name must not be empty",
        ));
    }
    if name.len() > MAX_NAME {
        return Err(error::bad_request(format!(
            "invalid name: a network name has at most {MAX_NAME} bytes"
        )));
    }
    if let Some(c) = name.chars().find(|c| {
        c.is_control()
            || ('\u{202a}'..='\u{202e}').contains(c)
            || ('\u{2066}'..='\u{2069}').contains(c)
    }) {
        return Err(error::bad_request(format!(
            "invalid name {name:?}: control and bidirectional-override characters are not allowed (found U+{:04X})",
            u32::from(c)
        )));
    }
    Ok(())
}

/// The driver of a create, or moby's refusal.
pub fn check_driver(d: &str) -> Result<String, OpError> {
    match d {
        "" | "bridge" => Ok("bridge".into()),
        "overlay" => Ok("overlay".into()),
        "host" | "null" => Err(error::forbidden(format!(
            "only one instance of \"{d}\" network is allowed"
        ))),
        "macvlan" | "ipvlan" => Err(error::bad_request(format!(
            "the {d} driver is not supported by fabric: a Docker network is a fabric overlay network; use the bridge (default) or overlay driver"
        ))),
        other => Err(error::not_found(format!("plugin \"{other}\" not found"))),
    }
}

/// Parses and validates a `POST /networks/create` body (moby's `NetworkCreateRequest`);
/// returns the spec and `CheckDuplicate`.
pub fn parse_create(body: &Value) -> Result<(Spec, bool), OpError> {
    const T: &str = "NetworkCreateRequest";
    let Value::Object(o) = body else {
        return Err(error::bad_request(format!(
            "json: cannot unmarshal {} into Go value of type types.NetworkCreateRequest",
            go_kind(body)
        )));
    };
    let name = get_str(o, "Name", &format!("{T}.Name"))?.unwrap_or_default();
    let check_duplicate = get_bool(o, "CheckDuplicate", &format!("{T}.CheckDuplicate"))?;
    let driver = get_str(o, "Driver", &format!("{T}.Driver"))?.unwrap_or_default();
    let scope = get_str(o, "Scope", &format!("{T}.Scope"))?.unwrap_or_default();
    let ipv6 = get_bool(o, "EnableIPv6", &format!("{T}.EnableIPv6"))?;
    let internal = get_bool(o, "Internal", &format!("{T}.Internal"))?;
    let attachable = get_bool(o, "Attachable", &format!("{T}.Attachable"))?;
    let ingress = get_bool(o, "Ingress", &format!("{T}.Ingress"))?;
    let config_only = get_bool(o, "ConfigOnly", &format!("{T}.ConfigOnly"))?;
    let config_from = match o.get("ConfigFrom") {
        None | Some(Value::Null) => None,
        Some(Value::Object(c)) => get_str(c, "Network", "ConfigReference.Network")?,
        Some(v) => {
            return Err(type_error(
                v,
                &format!("{T}.ConfigFrom"),
                "network.ConfigReference",
            ))
        }
    };
    let options = get_map(o, "Options", &format!("{T}.Options"))?.unwrap_or_default();
    let labels = get_map(o, "Labels", &format!("{T}.Labels"))?.unwrap_or_default();
    let (ipam_driver, ipam_options, configs) = match o.get("IPAM") {
        None | Some(Value::Null) => (String::new(), None, Vec::new()),
        Some(Value::Object(i)) => {
            let d = get_str(i, "Driver", "IPAM.Driver")?.unwrap_or_default();
            let opts = get_map(i, "Options", "IPAM.Options")?;
            let cfgs = match i.get("Config") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|c| match c {
                        Value::Object(c) => Ok(IpamConfig {
                            subnet: get_str(c, "Subnet", "IPAMConfig.Subnet")?
                                .filter(|s| !s.is_empty()),
                            ip_range: get_str(c, "IPRange", "IPAMConfig.IPRange")?
                                .filter(|s| !s.is_empty()),
                            gateway: get_str(c, "Gateway", "IPAMConfig.Gateway")?
                                .filter(|s| !s.is_empty()),
                            aux: get_map(c, "AuxiliaryAddresses", "IPAMConfig.AuxiliaryAddresses")?
                                .filter(|m| !m.is_empty()),
                        }),
                        v => Err(type_error(v, "IPAM.Config", "network.IPAMConfig")),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                Some(v) => return Err(type_error(v, "IPAM.Config", "[]network.IPAMConfig")),
            };
            (d, opts, cfgs)
        }
        Some(v) => return Err(type_error(v, &format!("{T}.IPAM"), "network.IPAM")),
    };
    // moby's order: the name first, then the driver, then the IPAM configuration.
    if PREDEFINED.contains(&name.as_str()) {
        return Err(error::forbidden(format!(
            "operation is not permitted on predefined {name} network "
        )));
    }
    check_name(&name)?;
    let driver = check_driver(&driver)?;
    match scope.as_str() {
        "" | "local" => {}
        s => {
            return Err(error::bad_request(format!(
                "scope {s:?} is not supported: networks here are \"local\" (each account's own, on the whole cluster)"
            )))
        }
    }
    if ingress {
        return Err(error::bad_request(
            "ingress networks are part of swarm mode, which fabric does not have",
        ));
    }
    if config_only || config_from.is_some_and(|c| !c.is_empty()) {
        return Err(error::bad_request(
            "config-only networks (--config-only, --config-from) are not supported",
        ));
    }
    match ipam_driver.as_str() {
        "" | "default" => {}
        other => return Err(error::not_found(format!("plugin \"{other}\" not found"))),
    }
    if ipv6
        || configs
            .iter()
            .any(|c| c.subnet.as_deref().is_some_and(|s| s.contains(':')))
    {
        return Err(error::bad_request(
            "IPv6 is not supported: fabric networks are IPv4 only (drop --ipv6 and IPv6 subnets)",
        ));
    }
    if configs.len() > 1 {
        return Err(error::forbidden(format!(
            "{driver} driver doesn't support multiple subnets"
        )));
    }
    let config = configs.into_iter().next();
    if let Some(c) = &config {
        if c.subnet.is_none() {
            return Err(error::bad_request(
                "an IPAM config that sets a gateway, IP range or auxiliary addresses needs a subnet (--subnet)",
            ));
        }
    }
    Ok((
        Spec {
            name,
            driver,
            labels,
            options,
            internal,
            attachable,
            ipam_options,
            config,
        },
        check_duplicate,
    ))
}

/// The addresses a validated `IPAM.Config` gives the fabric network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressing {
    /// Subnet address.
    pub subnet: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Gateway.
    pub gateway: Ipv4Addr,
    /// First address NICs get.
    pub start: Ipv4Addr,
    /// Last address NICs get.
    pub end: Ipv4Addr,
    /// Reserved auxiliary addresses.
    pub aux: Vec<Ipv4Addr>,
}

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    if !len.to_string().eq(s.split_once('/')?.1) {
        return None;
    }
    Some((Ipv4Addr::from(u32::from(ip) & fnet::mask(len)), len))
}

/// Checks an `IPAM.Config` entry against its subnet (moby's words where moby has them; 400).
pub fn addressing(c: &IpamConfig, subnet: (Ipv4Addr, u8)) -> Result<Addressing, OpError> {
    let (net, prefix) = subnet;
    let cidr = format!("{net}/{prefix}");
    if !(8..=fnet::MAX_FABRIC_PREFIX).contains(&prefix) {
        return Err(error::bad_request(format!(
            "subnet {cidr}: the prefix length must be between 8 and {} (a gateway and hosts must fit)",
            fnet::MAX_FABRIC_PREFIX
        )));
    }
    let (lo, hi) = fnet::subnet_bounds(net, prefix);
    let gateway = match &c.gateway {
        None => Ipv4Addr::from(lo + 1),
        Some(g) => {
            let ip: Ipv4Addr = g.parse().map_err(|_| {
                error::bad_request(format!(
                    "invalid gateway {g:?}: expected an IPv4 address in {cidr}"
                ))
            })?;
            let n = u32::from(ip);
            if !(lo..=hi).contains(&n) {
                return Err(error::bad_request(format!(
                    "failed to allocate gateway ({g}): Requested address is out of range"
                )));
            }
            if n == lo || n == hi {
                return Err(error::bad_request(format!(
                    "failed to allocate gateway ({g}): Address already in use"
                )));
            }
            ip
        }
    };
    let (start, end) = match &c.ip_range {
        None => (lo + 1, hi - 1),
        Some(r) => {
            let (rnet, rlen) = parse_cidr(r).ok_or_else(|| {
                error::bad_request(format!(
                    "invalid ip range {r:?}: expected a CIDR inside subnet {cidr}"
                ))
            })?;
            let (rlo, rhi) = fnet::subnet_bounds(rnet, rlen);
            if rlo < lo || rhi > hi {
                return Err(error::bad_request(format!(
                    "ip range {r} is not inside subnet {cidr}"
                )));
            }
            let (s, e) = (rlo.max(lo + 1), rhi.min(hi - 1));
            if s > e {
                return Err(error::bad_request(format!(
                    "ip range {r} leaves no address for containers in subnet {cidr}"
                )));
            }
            (s, e)
        }
    };
    let mut aux = Vec::new();
    for (k, v) in c.aux.iter().flatten() {
        let ip: Ipv4Addr = v.parse().map_err(|_| {
            error::bad_request(format!(
                "invalid auxiliary address {k}={v:?}: expected an IPv4 address in {cidr}"
            ))
        })?;
        let n = u32::from(ip);
        if n <= lo || n >= hi {
            return Err(error::bad_request(format!(
                "auxiliary address {k}={v} is not a host address of subnet {cidr}"
            )));
        }
        aux.push(ip);
    }
    Ok(Addressing {
        subnet: net,
        prefix,
        gateway,
        start: Ipv4Addr::from(start),
        end: Ipv4Addr::from(end),
        aux,
    })
}

/// Subnet ranges (inclusive) an `owner`'s new network must not overlap: its fabric networks
/// and every shared network.
fn taken(db: &mut Db<'_>, owner: &str) -> Result<Vec<(u32, u32)>, OpError> {
    let mut rows = db.query(
        "SELECT subnet_lo, subnet_hi FROM napi_networks WHERE fabric = 1 AND owner_uuid = $1",
        &[Val::text(owner)],
    )?;
    rows.extend(db.query(
        "SELECT n.subnet_lo, n.subnet_hi FROM docker_networks d \
           JOIN napi_networks n ON n.uuid = d.network_uuid WHERE d.shared = 1",
        &[],
    )?);
    rows.into_iter()
        .map(|r| {
            let lo = r[0].as_i64("subnet_lo")?;
            let hi = r[1].as_i64("subnet_hi")?;
            Ok((lo as u32, hi as u32))
        })
        .collect()
}

fn overlaps(taken: &[(u32, u32)], lo: u32, hi: u32) -> bool {
    taken.iter().any(|(a, b)| lo <= *b && hi >= *a)
}

/// The first subnet of `pools` that overlaps nothing in `taken`.
pub fn pick_subnet(pools: &[SubnetPool], taken: &[(u32, u32)]) -> Option<(Ipv4Addr, u8)> {
    for p in pools {
        let (lo, hi) = fnet::subnet_bounds(p.base, p.prefix);
        let step = 1u64 << (32 - u32::from(p.size));
        let mut at = u64::from(lo);
        while at + step - 1 <= u64::from(hi) {
            let (a, b) = (at as u32, (at + step - 1) as u32);
            if !overlaps(taken, a, b) {
                return Some((Ipv4Addr::from(a), p.size));
            }
            at += step;
        }
    }
    None
}

/// The lowest VLAN in 2..=4094 `owner` does not use.
fn free_vlan(db: &mut Db<'_>, owner: &str) -> Result<u16, OpError> {
    let used: std::collections::BTreeSet<i64> = db
        .query(
            "SELECT vlan_id FROM napi_fabric_vlans WHERE owner_uuid = $1",
            &[Val::text(owner)],
        )?
        .into_iter()
        .filter_map(|r| r[0].as_opt_i64())
        .collect();
    (FIRST_VLAN..=LAST_VLAN)
        .find(|v| !used.contains(&i64::from(*v)))
        .ok_or_else(|| {
            error::conflict(format!(
                "no free fabric VLAN left ({FIRST_VLAN}..{LAST_VLAN} are all in use): remove a network first"
            ))
        })
}

/// A refusal of the fabric layer (restify-shaped) as a Docker error: 422 becomes 400, the
/// per-field complaints are spelled out.
pub fn fabric_refusal(e: OpError) -> OpError {
    match e {
        OpError::Api(a) if a.code != "DockerError" => {
            let detail: Vec<String> = a
                .errors
                .iter()
                .map(|f| match &f.field {
                    Value::String(s) if !s.is_empty() => format!("{s}: {}", f.message),
                    _ => f.message.clone(),
                })
                .collect();
            let status = if a.status == 422 { 400 } else { a.status };
            let msg = if detail.is_empty() {
                format!("the fabric refused the network: {}", a.message)
            } else {
                format!("the fabric refused the network: {}", detail.join("; "))
            };
            error::err(status, msg)
        }
        other => other,
    }
}

/// Takes the locks of a Docker network change, in the store's order.
pub fn lock(db: &mut Db<'_>, owner: &str) -> Result<(), OpError> {
    db.lock(lock_key(LOCK_GLOBAL, "docker_networks"))?;
    db.lock(lock_key(LOCK_GLOBAL, "networks"))?;
    db.lock(lock_key(LOCK_GLOBAL, "nic_tags"))?;
    db.lock(lock_key(LOCK_OWNER, owner))
}

/// Creates a Docker network of `owner`: its VLAN, fabric network, IPAM reservations and row.
/// The caller took [`lock`] and checked the name. `avoid` are the subnet ranges it must not
/// overlap (the pool avoids them too).
pub fn insert(
    db: &mut Db<'_>,
    cfg: &Config,
    owner: &str,
    spec: &Spec,
    kind: Kind,
    avoid: &[(u32, u32)],
) -> Result<Net, OpError> {
    let (subnet, pooled) = match spec.config.as_ref().and_then(|c| c.subnet.as_deref()) {
        Some(s) => (
            parse_cidr(s).ok_or_else(|| {
                error::bad_request(format!("Invalid subnet {s} : invalid CIDR address: {s}"))
            })?,
            false,
        ),
        None => (
            pick_subnet(&cfg.docker_pool, avoid).ok_or_else(|| {
                error::forbidden(
                    "could not find an available, non-overlapping IPv4 address pool among the defaults to assign to the network",
                )
            })?,
            true,
        ),
    };
    let asked = spec.config.clone().unwrap_or_default();
    let a = addressing(&asked, subnet)?;
    let (lo, hi) = fnet::subnet_bounds(a.subnet, a.prefix);
    if overlaps(avoid, lo, hi) {
        return Err(error::forbidden(
            "Pool overlaps with other one on this address space",
        ));
    }
    let uuid = random_uuid().map_err(|e| OpError::Corrupt(format!("random: {e}")))?;
    let id = docker_id(&uuid);
    let vlan = free_vlan(db, owner)?;
    let what = format!("docker network {}", &id[..12]);
    let mut vp = Params::from_map(Map::from_iter([
        ("vlan_id".to_string(), json!(vlan)),
        ("description".to_string(), json!(what)),
    ]));
    fabrics::create_vlan(db, owner, &mut vp).map_err(fabric_refusal)?;
    let mut np = Map::from_iter([
        ("uuid".to_string(), json!(uuid)),
        ("name".to_string(), json!(spec.name)),
        (
            "subnet".to_string(),
            json!(format!("{}/{}", a.subnet, a.prefix)),
        ),
        ("gateway".to_string(), json!(a.gateway.to_string())),
        ("provision_start_ip".to_string(), json!(a.start.to_string())),
        ("provision_end_ip".to_string(), json!(a.end.to_string())),
        ("internet_nat".to_string(), json!(!spec.internal)),
        ("description".to_string(), json!(what)),
    ]);
    if let Some(mtu) = spec.options.get("com.docker.network.driver.mtu") {
        let m: i64 = mtu.parse().map_err(|_| {
            error::bad_request(format!(
                "com.docker.network.driver.mtu {mtu:?}: expected a number between 576 and 9000"
            ))
        })?;
        np.insert("mtu".into(), json!(m));
    }
    fabrics::create_network(db, cfg, owner, &vlan.to_string(), &mut Params::from_map(np))
        .map_err(fabric_refusal)?;
    for ip in &a.aux {
        if u32::from(*ip) == u32::from(a.gateway) {
            continue;
        }
        fnet::put_ip(
            db,
            &uuid,
            &fnet::IpRec {
                ip: u32::from(*ip),
                reserved: true,
                belongs_to_type: Some("other".into()),
                belongs_to_uuid: Some(cfg.admin_uuid.clone()),
                owner_uuid: Some(cfg.admin_uuid.clone()),
            },
        )?;
    }
    let ipam = Ipam {
        driver: "default".into(),
        options: spec.ipam_options.clone(),
        config: vec![if pooled {
            IpamConfig {
                subnet: Some(format!("{}/{}", a.subnet, a.prefix)),
                gateway: Some(a.gateway.to_string()),
                ..IpamConfig::default()
            }
        } else {
            asked
        }],
    };
    let net = Net {
        kind,
        id,
        uuid: Some(uuid.clone()),
        owner_uuid: owner.to_string(),
        name: spec.name.clone(),
        driver: spec.driver.clone(),
        labels: spec.labels.clone(),
        options: spec.options.clone(),
        internal: spec.internal,
        attachable: spec.attachable,
        ipam,
        created_ms: crate::control::now_us() / 1000,
        vlan_id: Some(vlan),
    };
    db.exec(
        &format!(
            "INSERT INTO docker_networks ({COLS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ),
        &[
            Val::text(&uuid),
            Val::text(owner),
            Val::text(&net.name),
            Val::text(&net.driver),
            Val::text(serde_json::to_string(&net.labels)?),
            Val::text(serde_json::to_string(&net.options)?),
            Val::boolean(net.internal),
            Val::boolean(net.attachable),
            Val::text(serde_json::to_string(&net.ipam)?),
            Val::int(net.created_ms),
            Val::boolean(kind == Kind::Shared),
            Val::boolean(kind == Kind::Default),
            Val::int(vlan),
        ],
    )?;
    Ok(net)
}

/// Removes a Docker network with its fabric network, IPAM records and VLAN. The caller took
/// [`lock`] and checked it may.
pub fn remove(db: &mut Db<'_>, net: &Net) -> Result<(), OpError> {
    let Some(uuid) = &net.uuid else {
        return Err(error::forbidden(format!(
            "{} is a pre-defined network and cannot be removed",
            net.name
        )));
    };
    if let Some(n) = fnet::get(db, uuid)? {
        fnet::delete(db, &n).map_err(fabric_refusal)?;
    }
    if let Some(v) = net.vlan_id {
        if fabrics::get_vlan(db, &net.owner_uuid, v)?.is_some() {
            fabrics::delete_vlan(db, &net.owner_uuid, &v.to_string()).map_err(fabric_refusal)?;
        }
    }
    db.exec(
        "DELETE FROM docker_networks WHERE network_uuid = $1",
        &[Val::text(uuid)],
    )?;
    Ok(())
}

/// Creates `account`'s default network (`bridge`, a pool subnet) in the account's creation
/// transaction; returns its fabric network's UUID.
pub fn create_default(
    db: &mut Db<'_>,
    cfg: &Config,
    account: &Account,
) -> Result<Option<String>, OpError> {
    lock(db, &account.uuid)?;
    let avoid = taken(db, &account.uuid)?;
    let net = insert(
        db,
        cfg,
        &account.uuid,
        &Spec::plain(DEFAULT_NAME, "bridge"),
        Kind::Default,
        &avoid,
    )?;
    Ok(net.uuid)
}

/// `POST /networks/create`.
fn create(
    db: &mut Db<'_>,
    cfg: &Config,
    account: &Account,
    body: &Value,
) -> Result<Reply, OpError> {
    let (spec, _check_duplicate) = parse_create(body)?;
    lock(db, &account.uuid)?;
    // Names are unique per account whatever CheckDuplicate says (see the module doc).
    if visible(db, account)?.iter().any(|n| n.name == spec.name) {
        return Err(error::conflict(format!(
            "network with name {} already exists",
            spec.name
        )));
    }
    let avoid = taken(db, &account.uuid)?;
    let net = insert(db, cfg, &account.uuid, &spec, Kind::Custom, &avoid)?;
    ordered(StatusCode::CREATED, &json!({"Id": net.id, "Warning": ""}))
}

/// Which networks a list's filters keep (moby's `filterNetworks`).
fn keep(f: &Filters, n: &Net, in_use: bool) -> Result<bool, OpError> {
    let builtin = matches!(n.kind, Kind::Builtin | Kind::Default);
    if !f.exact("driver", &n.driver)
        || !f.matches("name", &n.name)
        || !f.matches("id", &n.id)
        || !f.kv_list("label", &n.labels)
        || !f.exact("scope", "local")
    {
        return Ok(false);
    }
    for t in f.get("type") {
        if t != "custom" && t != "builtin" {
            return Err(error::bad_request(format!("invalid filter: 'type'='{t}'")));
        }
    }
    if f.contains("type") && !f.get("type").any(|t| (t == "builtin") == builtin) {
        return Ok(false);
    }
    if let Some(d) = f.boolean("dangling")? {
        // Dangling: a network nobody created by default and nothing is attached to.
        let dangling = !builtin && !in_use;
        if d != dangling {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `GET /networks`.
fn list(db: &mut Db<'_>, account: &Account, raw: Option<&str>) -> Result<Reply, OpError> {
    let f = Filters::parse(raw)?;
    f.validate(&["dangling", "driver", "id", "label", "name", "scope", "type"])?;
    let mut out = Vec::new();
    for n in visible(db, account)? {
        let in_use = match (&n.uuid, f.contains("dangling")) {
            (Some(u), true) => endpoints(db, u, Some(&account.uuid))? > 0,
            _ => false,
        };
        if keep(&f, &n, in_use)? {
            out.push(n);
        }
    }
    let res: Vec<Resource<'_>> = out.iter().map(Net::resource).collect();
    ordered(StatusCode::OK, &res)
}

/// Go's `strconv.ParseBool`.
fn go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `GET /networks/{id}`.
fn inspect(db: &mut Db<'_>, account: &Account, term: &str, req: &Req) -> Result<Reply, OpError> {
    if let Some(v) = req.query.get("verbose").filter(|v| !v.is_empty()) {
        if go_bool(v).is_none() {
            return Err(error::bad_request(format!(
                "invalid value for verbose: {v}: strconv.ParseBool: parsing {v:?}: invalid syntax"
            )));
        }
    }
    let mut nets = visible(db, account)?;
    if let Some(s) = req.query.get("scope").filter(|s| !s.is_empty()) {
        if s != "local" {
            nets.clear();
        }
    }
    let n = resolve(nets, term, Lookup::Inspect)?;
    let mut r = n.resource();
    if let Some(u) = &n.uuid {
        r.Containers = containers_on(db, account, u)?;
    }
    ordered(StatusCode::OK, &r)
}

/// `Containers` of a network's inspect: the caller's containers with a NIC on it (never
/// another account's, on a shared network too), by container ID.
fn containers_on(
    db: &mut Db<'_>,
    account: &Account,
    network_uuid: &str,
) -> Result<Map<String, Value>, OpError> {
    let prefix = fnet::get(db, network_uuid)?.map_or(0, |n| n.prefix);
    let rows = db.query(
        "SELECT doc FROM napi_nics WHERE network_uuid = $1 AND owner_uuid = $2 \
         AND belongs_to_type = 'zone' ORDER BY mac",
        &[Val::text(network_uuid), Val::text(&account.uuid)],
    )?;
    let mut out = Map::new();
    for r in rows {
        let nic: crate::control::nics::Nic = crate::control::db::doc_from_row(r, "nic")?;
        let Some(vm) = crate::control::vms::get(db, &nic.belongs_to_uuid)? else {
            continue;
        };
        let Some(spec) = vm.container.as_ref().filter(|_| vm.state != "destroyed") else {
            continue;
        };
        out.insert(
            spec.id.clone(),
            json!({
                "Name": vm.alias,
                "EndpointID": super::containers::inspect::endpoint_id(&vm.uuid, nic.mac),
                "MacAddress": crate::control::nics::mac_string(nic.mac),
                "IPv4Address": nic.ip.map(|ip| format!("{ip}/{prefix}")).unwrap_or_default(),
                "IPv6Address": "",
            }),
        );
    }
    Ok(out)
}

/// `DELETE /networks/{id}`.
fn delete(db: &mut Db<'_>, account: &Account, term: &str) -> Result<Reply, OpError> {
    lock(db, &account.uuid)?;
    let n = resolve(visible(db, account)?, term, Lookup::Daemon)?;
    match n.kind {
        Kind::Builtin | Kind::Default => {
            return Err(error::forbidden(format!(
                "{} is a pre-defined network and cannot be removed",
                n.name
            )))
        }
        Kind::Shared => {
            return Err(error::forbidden(format!(
                "{} is shared with every account by the operator and cannot be removed",
                n.name
            )))
        }
        Kind::Custom => {}
    }
    let uuid = n.uuid.clone().unwrap_or_default();
    if endpoints(db, &uuid, None)? > 0 {
        return Err(error::forbidden(format!(
            "error while removing network: network {} id {} has active endpoints",
            n.name, n.id
        )));
    }
    remove(db, &n)?;
    Ok(Reply::Empty(StatusCode::NO_CONTENT))
}

/// `POST /networks/prune`: the account's own networks without endpoints (never the default,
/// `host`/`none` or shared ones), filtered by `label`, `label!`, `until`.
fn prune(db: &mut Db<'_>, account: &Account, raw: Option<&str>) -> Result<Reply, OpError> {
    let f = Filters::parse(raw)?;
    f.validate(&["label", "label!", "until"])?;
    let now = crate::control::now_us() / 1000;
    let mut until = None;
    for v in f.get("until") {
        until = Some(filters::until(v, now)?);
    }
    lock(db, &account.uuid)?;
    let mut deleted = Vec::new();
    for n in visible(db, account)? {
        if n.kind != Kind::Custom {
            continue;
        }
        if !f.kv_list("label", &n.labels)
            || (f.contains("label!") && f.kv_list("label!", &n.labels))
        {
            continue;
        }
        if until.is_some_and(|t| n.created_ms >= t) {
            continue;
        }
        let uuid = n.uuid.clone().unwrap_or_default();
        if endpoints(db, &uuid, None)? > 0 {
            continue;
        }
        remove(db, &n)?;
        deleted.push(n.name);
    }
    // moby answers null, not [], when nothing was deleted.
    let v = if deleted.is_empty() {
        json!({ "NetworksDeleted": null })
    } else {
        json!({ "NetworksDeleted": deleted })
    };
    ordered(StatusCode::OK, &v)
}

/// `POST /networks/{id}/connect|disconnect`'s body: the container and, for connect, the
/// `--ip` (`EndpointConfig.IPAMConfig.IPv4Address`).
fn attach_body(req: &Req) -> Result<(String, Option<std::net::Ipv4Addr>), OpError> {
    let body = req.json()?;
    let kind = if req.path.get(2).map(String::as_str) == Some("connect") {
        "NetworkConnect"
    } else {
        "NetworkDisconnect"
    };
    let Value::Object(o) = &body else {
        return Err(error::bad_request(format!(
            "json: cannot unmarshal {} into Go value of type types.{kind}",
            go_kind(&body)
        )));
    };
    let c = get_str(o, "Container", &format!("{kind}.Container"))?.unwrap_or_default();
    if c.is_empty() {
        return Err(error::bad_request("invalid name or ID supplied: \"\""));
    }
    let ip = match o.get("EndpointConfig") {
        Some(ep) if kind == "NetworkConnect" && !ep.is_null() => {
            super::containers::validate::endpoint_ip(ep)?
        }
        _ => None,
    };
    Ok((c, ip))
}

/// `POST /networks/{id}/connect`: a NIC on the network for the container (through control's
/// NIC code: IP, Portolan mapping; the agent adds the vnic in its namespace); 403 when it is
/// connected already.
fn connect(
    tx: &mut dyn portolan::store::Txn,
    c: &api::Ctx<'_>,
    term: &str,
    container: &str,
    ip: Option<std::net::Ipv4Addr>,
) -> Result<Reply, OpError> {
    let (mut vm, spec, n) = attach_target(tx, c, term, container)?;
    let Some(nu) = n.uuid.clone() else {
        return Err(error::forbidden(format!(
            "container cannot be connected to the {} network: it is not a fabric network",
            n.name
        )));
    };
    let nics = crate::control::vms::vm_nics(&mut Db::from(tx.raw()), &vm)?;
    if nics
        .iter()
        .any(|(_, nic, _)| nic.network_uuid.as_deref() == Some(nu.as_str()))
    {
        return Err(error::forbidden(format!(
            "endpoint with name {} already exists in network {}",
            vm.alias.as_deref().unwrap_or(&spec.id[..12]),
            n.name
        )));
    }
    crate::control::vms::add_nic(tx, &c.docker.app.cfg, &mut vm, &nu, ip, false)?;
    if let Some(ip) = ip {
        let mut tags = vm.tags.clone();
        tags.insert(
            format!("{}{nu}", super::containers::create::IP_TAG),
            json!(ip.to_string()),
        );
        crate::control::vms::set_tags(&mut Db::from(tx.raw()), &mut vm, tags)?;
    }
    Ok(Reply::Empty(StatusCode::OK))
}

/// `POST /networks/{id}/disconnect`: deletes the container's NIC on the network; 500 (moby's)
/// when it is not connected.
fn disconnect(
    tx: &mut dyn portolan::store::Txn,
    c: &api::Ctx<'_>,
    term: &str,
    container: &str,
) -> Result<Reply, OpError> {
    let (mut vm, spec, n) = attach_target(tx, c, term, container)?;
    let nics = crate::control::vms::vm_nics(&mut Db::from(tx.raw()), &vm)?;
    let mac = nics
        .iter()
        .find(|(_, nic, _)| n.uuid.is_some() && nic.network_uuid == n.uuid)
        .map(|(_, nic, _)| nic.mac);
    let Some(mac) = mac else {
        return Err(error::err(
            500,
            format!(
                "container {} is not connected to network {}",
                spec.id, n.name
            ),
        ));
    };
    crate::control::vms::remove_nic(tx, &c.docker.app.cfg, &mut vm, mac)?;
    let key = format!(
        "{}{}",
        super::containers::create::IP_TAG,
        n.uuid.as_deref().unwrap_or("")
    );
    if vm.tags.contains_key(&key) {
        let mut tags = vm.tags.clone();
        tags.remove(&key);
        crate::control::vms::set_tags(&mut Db::from(tx.raw()), &mut vm, tags)?;
    }
    Ok(Reply::Empty(StatusCode::OK))
}

/// The container (locked) and the network of a connect/disconnect: moby looks the container
/// up first.
fn attach_target(
    tx: &mut dyn portolan::store::Txn,
    c: &api::Ctx<'_>,
    term: &str,
    container: &str,
) -> Result<
    (
        crate::control::vms::Vm,
        crate::control::container_spec::ContainerSpec,
        Net,
    ),
    OpError,
> {
    let mut d = Db::from(tx.raw());
    let f = super::containers::lookup::find(&mut d, c.account, container)?;
    lock(&mut d, &c.account.uuid)?;
    let vm = crate::control::vms::lock_and_find(&mut d, &f.vm.uuid)?;
    let n = resolve(visible(&mut d, c.account)?, term, Lookup::Daemon)?;
    Ok((vm, f.spec, n))
}

/// The operation of a `/networks/...` request, if it is one this module serves.
pub fn route(req: &Req) -> Option<Op> {
    let m = if req.method == Method::HEAD {
        Method::GET
    } else {
        req.method.clone()
    };
    let p: Vec<&str> = req.path.iter().map(String::as_str).collect();
    let filters = req.query.get("filters").map(String::from);
    Some(match (&m, p.as_slice()) {
        (&Method::GET, ["networks"]) => {
            api::read(move |d, c| list(d, c.account, filters.as_deref()))
        }
        (&Method::POST, ["networks", "create"]) => match req.json() {
            Err(e) => Op::Now(Err(e)),
            Ok(body) => api::write(move |d, c| create(d, &c.docker.app.cfg, c.account, &body)),
        },
        (&Method::POST, ["networks", "prune"]) => {
            api::write(move |d, c| prune(d, c.account, filters.as_deref()))
        }
        (&Method::GET, ["networks", id]) => {
            let (id, req) = (id.to_string(), req.clone());
            api::read(move |d, c| inspect(d, c.account, &id, &req))
        }
        (&Method::DELETE, ["networks", id]) => {
            let id = id.to_string();
            api::write(move |d, c| delete(d, c.account, &id))
        }
        (&Method::POST, ["networks", id, verb @ ("connect" | "disconnect")]) => {
            match attach_body(req) {
                Err(e) => Op::Now(Err(e)),
                Ok((container, ip)) => {
                    let (id, connecting) = (id.to_string(), *verb == "connect");
                    api::write_tx(move |tx, c| {
                        if connecting {
                            connect(tx, c, &id, &container, ip)
                        } else {
                            disconnect(tx, c, &id, &container)
                        }
                    })
                }
            }
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: OpError) -> (u16, String) {
        let e = e.into_api();
        (e.status, e.message)
    }

    #[test]
    fn ids_derive_from_the_uuid() {
        let id = docker_id("0f1e2d3c-4b5a-4697-8877-665544332211");
        assert_eq!(id.len(), 64);
        assert_eq!(
            id,
            "0f1e2d3c4b5a46978877665544332211\
             0f1e2d3c4b5a46978877665544332211"
        );
    }

    #[test]
    fn created_is_go_rfc3339nano() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(1_700_000_000_120), "2023-11-14T22:13:20.12Z");
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn pools() {
        let p = parse_pool("10.100.0.0/16/24").unwrap();
        assert_eq!(
            (p.base, p.prefix, p.size),
            (Ipv4Addr::new(10, 100, 0, 0), 16, 24)
        );
        assert_eq!(parse_pool("10.100.0.0/16").unwrap().size, 24);
        assert_eq!(parse_pool("10.100.0.0/28").unwrap().size, 28);
        for bad in [
            "10.100.0.0",
            "8.8.0.0/16",
            "10.100.0.0/16/8",
            "10.100.0.0/16/31",
            "x/16/24",
            "10.100.0.1/16/24",
        ] {
            assert!(parse_pool(bad).is_err(), "{bad}");
        }
        let d = default_pools();
        assert_eq!(d[0].to_string(), "172.17.0.0/16/16");
        // The first free one, avoiding what is taken.
        let t = |a: [u8; 4], p: u8| fnet::subnet_bounds(Ipv4Addr::from(a), p);
        assert_eq!(
            pick_subnet(&d, &[]),
            Some((Ipv4Addr::new(172, 17, 0, 0), 16))
        );
        assert_eq!(
            pick_subnet(&d, &[t([172, 17, 0, 0], 16), t([172, 18, 5, 0], 24)]),
            Some((Ipv4Addr::new(172, 19, 0, 0), 16))
        );
        let small = [parse_pool("10.9.0.0/23/24").unwrap()];
        assert_eq!(
            pick_subnet(&small, &[t([10, 9, 0, 0], 24)]),
            Some((Ipv4Addr::new(10, 9, 1, 0), 24))
        );
        assert_eq!(pick_subnet(&small, &[t([10, 0, 0, 0], 8)]), None);
    }

    #[test]
    fn create_requests_as_moby_reads_them() {
        let (s, dup) = parse_create(&json!({
            "Name": "n1", "CheckDuplicate": true, "Driver": "overlay",
            "IPAM": {"Driver": "default", "Options": {},
                     "Config": [{"Subnet": "10.20.0.0/24", "IPRange": "10.20.0.128/25",
                                 "Gateway": "10.20.0.1", "AuxiliaryAddresses": {}}]},
            "Labels": {"a": "b"}, "Options": {}, "Internal": true, "Attachable": true,
            "ConfigFrom": null, "Scope": ""
        }))
        .unwrap();
        assert!(dup);
        assert_eq!(s.driver, "overlay");
        assert_eq!(s.ipam_options, Some(BTreeMap::new()));
        let c = s.config.unwrap();
        assert_eq!(c.gateway.as_deref(), Some("10.20.0.1"));
        assert_eq!(c.aux, None);
        assert!(s.internal && s.attachable);
        // docker-py sends nulls.
        let (s, _) =
            parse_create(&json!({"Name": "x", "Driver": null, "IPAM": null, "Options": null}))
                .unwrap();
        assert_eq!(s, Spec::plain("x", "bridge"));

        let cases: &[(Value, u16, &str)] = &[
            (json!({"Name": "bridge"}), 403, "operation is not permitted on predefined bridge network "),
            (json!({"Name": "default"}), 403, "operation is not permitted on predefined default network "),
            (json!({"Name": ""}), 400, "invalid name: a network name must not be empty"),
            (json!({"Name": 5}), 400, "json: cannot unmarshal number into Go struct field NetworkCreateRequest.Name of type string"),
            (json!({"Name": "x", "Driver": "foo"}), 404, "plugin \"foo\" not found"),
            (json!({"Name": "x", "Driver": "host"}), 403, "only one instance of \"host\" network is allowed"),
            (json!({"Name": "x", "Driver": "null"}), 403, "only one instance of \"null\" network is allowed"),
            (json!({"Name": "x", "IPAM": {"Driver": "foo"}}), 404, "plugin \"foo\" not found"),
            (json!({"Name": "x", "IPAM": {"Config": [{"Subnet": "10.9.0.0/24"}, {"Subnet": "10.10.0.0/24"}]}}), 403, "bridge driver doesn't support multiple subnets"),
            (json!({"Name": "x", "IPAM": {"Config": [{"Gateway": "10.12.0.1"}]}}), 400, "an IPAM config that sets a gateway, IP range or auxiliary addresses needs a subnet (--subnet)"),
            (json!({"Name": "x", "Labels": {"a": 1}}), 400, "json: cannot unmarshal number into Go struct field NetworkCreateRequest.Labels of type string"),
            (json!([]), 400, "json: cannot unmarshal array into Go value of type types.NetworkCreateRequest"),
        ];
        for (body, st, m) in cases {
            assert_eq!(
                status(parse_create(body).unwrap_err()),
                (*st, m.to_string()),
                "{body}"
            );
        }
        for body in [
            json!({"Name": "x", "EnableIPv6": true}),
            json!({"Name": "x", "IPAM": {"Config": [{"Subnet": "fd00::/64"}]}}),
            json!({"Name": "x", "Driver": "macvlan"}),
            json!({"Name": "x", "Ingress": true}),
            json!({"Name": "x", "ConfigOnly": true}),
            json!({"Name": "x", "Scope": "swarm"}),
            json!({"Name": "a\u{0007}b"}),
            json!({"Name": "x".repeat(256)}),
        ] {
            assert_eq!(status(parse_create(&body).unwrap_err()).0, 400, "{body}");
        }
        // Any other name is fine, as in moby.
        assert!(parse_create(&json!({"Name": "test@#$"})).is_ok());
        assert!(parse_create(&json!({"Name": "a b"})).is_ok());
    }

    #[test]
    fn addressing_checks() {
        let sub = (Ipv4Addr::new(10, 6, 0, 0), 24);
        let c = |g: Option<&str>, r: Option<&str>| IpamConfig {
            subnet: Some("10.6.0.0/24".into()),
            gateway: g.map(String::from),
            ip_range: r.map(String::from),
            aux: None,
        };
        let a = addressing(&c(None, None), sub).unwrap();
        assert_eq!(a.gateway, Ipv4Addr::new(10, 6, 0, 1));
        assert_eq!(
            (a.start, a.end),
            (Ipv4Addr::new(10, 6, 0, 1), Ipv4Addr::new(10, 6, 0, 254))
        );
        let a = addressing(&c(Some("10.6.0.254"), Some("10.6.0.128/25")), sub).unwrap();
        assert_eq!(a.gateway, Ipv4Addr::new(10, 6, 0, 254));
        assert_eq!(
            (a.start, a.end),
            (Ipv4Addr::new(10, 6, 0, 128), Ipv4Addr::new(10, 6, 0, 254))
        );
        assert_eq!(
            status(addressing(&c(Some("10.7.0.1"), None), sub).unwrap_err()),
            (
                400,
                "failed to allocate gateway (10.7.0.1): Requested address is out of range".into()
            )
        );
        assert_eq!(
            status(addressing(&c(Some("10.6.0.0"), None), sub).unwrap_err()),
            (
                400,
                "failed to allocate gateway (10.6.0.0): Address already in use".into()
            )
        );
        assert_eq!(
            status(addressing(&c(Some("x"), None), sub).unwrap_err()).0,
            400
        );
        assert_eq!(
            status(addressing(&c(None, Some("10.8.0.0/28")), sub).unwrap_err()).0,
            400
        );
        assert_eq!(
            status(addressing(&c(None, Some("bogus")), sub).unwrap_err()).0,
            400
        );
        let mut aux = c(None, None);
        aux.aux = Some(BTreeMap::from([("a".to_string(), "10.6.1.5".to_string())]));
        assert_eq!(status(addressing(&aux, sub).unwrap_err()).0, 400);
        assert_eq!(
            status(addressing(&c(None, None), (Ipv4Addr::new(10, 6, 0, 0), 31)).unwrap_err()).0,
            400
        );
        assert_eq!(
            parse_cidr("10.6.0.5/24"),
            Some((Ipv4Addr::new(10, 6, 0, 0), 24))
        );
        assert_eq!(parse_cidr("10.6.0.0/024"), None);
        assert_eq!(parse_cidr("bogus"), None);
    }

    fn net(name: &str, uuid: &str) -> Net {
        let acct = Account {
            uuid: "a".into(),
            login: "a".into(),
            created_ms: 0,
            removed_ms: None,
            default_network: None,
        };
        let mut n = builtin(&acct, name, "bridge");
        n.kind = Kind::Custom;
        n.id = docker_id(uuid);
        n.uuid = Some(uuid.into());
        n
    }

    #[test]
    fn resolution_prefers_id_then_name_then_prefix() {
        let a = net("alpha", "aaaa0000-0000-4000-8000-000000000001");
        let b = net("beta", "aaaa0000-0000-4000-8000-000000000002");
        // A network named after another's full Id: the Id wins (TestDockerNetworkDeletePreferID).
        let c = net(&a.id, "cccc0000-0000-4000-8000-000000000003");
        // A network named like a prefix of another's Id: the name wins.
        let d = net("cccc", "dddd0000-0000-4000-8000-000000000004");
        let all = vec![a.clone(), b.clone(), c.clone(), d.clone()];
        assert_eq!(
            resolve(all.clone(), &a.id, Lookup::Daemon).unwrap().name,
            "alpha"
        );
        assert_eq!(
            resolve(all.clone(), "cccc", Lookup::Daemon).unwrap().name,
            "cccc"
        );
        assert_eq!(resolve(all.clone(), "beta", Lookup::Daemon).unwrap(), b);
        assert_eq!(resolve(all.clone(), "dddd", Lookup::Daemon).unwrap(), d);
        assert_eq!(
            resolve(
                all.clone(),
                "aaaa0000-0000-4000-8000-000000000002",
                Lookup::Inspect
            )
            .unwrap(),
            b
        );
        assert_eq!(
            status(resolve(all.clone(), "aaaa", Lookup::Inspect).unwrap_err()),
            (
                400,
                "2 matches found based on ID prefix: network aaaa is ambiguous".into()
            )
        );
        assert_eq!(
            status(resolve(all.clone(), "aaaa", Lookup::Daemon).unwrap_err()),
            (
                400,
                "network aaaa is ambiguous (2 matches found based on ID prefix)".into()
            )
        );
        assert_eq!(
            status(resolve(all, "nope", Lookup::Inspect).unwrap_err()),
            (404, "network nope not found".into())
        );
    }

    #[test]
    fn list_filters() {
        let mut n = net("web", "aaaa0000-0000-4000-8000-000000000001");
        n.labels.insert("tier".into(), "front".into());
        let f = |s: &str| Filters::parse(Some(s)).unwrap();
        assert!(keep(&f(r#"{"name":["we"]}"#), &n, false).unwrap());
        assert!(!keep(&f(r#"{"name":["db"]}"#), &n, false).unwrap());
        assert!(keep(&f(r#"{"label":["tier=front"]}"#), &n, false).unwrap());
        assert!(keep(&f(r#"{"type":["custom"]}"#), &n, false).unwrap());
        assert!(!keep(&f(r#"{"type":["builtin"]}"#), &n, false).unwrap());
        assert!(keep(&f(r#"{"dangling":["true"]}"#), &n, false).unwrap());
        assert!(!keep(&f(r#"{"dangling":["true"]}"#), &n, true).unwrap());
        assert!(!keep(&f(r#"{"scope":["swarm"]}"#), &n, false).unwrap());
        assert!(keep(&f(r#"{"driver":["bridge"]}"#), &n, false).unwrap());
        assert!(keep(&f(r#"{"id":["aaaa"]}"#), &n, false).unwrap());
        assert_eq!(
            status(keep(&f(r#"{"type":["bogus"]}"#), &n, false).unwrap_err()),
            (400, "invalid filter: 'type'='bogus'".into())
        );
        n.kind = Kind::Default;
        assert!(keep(&f(r#"{"type":["builtin"]}"#), &n, false).unwrap());
        assert!(!keep(&f(r#"{"dangling":["1"]}"#), &n, false).unwrap());
    }

    #[test]
    fn resource_json_in_moby_order() {
        let n = net("web", "aaaa0000-0000-4000-8000-000000000001");
        let s = serde_json::to_string(&n.resource()).unwrap();
        let keys = [
            "Name",
            "Id",
            "Created",
            "Scope",
            "Driver",
            "EnableIPv6",
            "IPAM",
            "Internal",
            "Attachable",
            "Ingress",
            "ConfigFrom",
            "ConfigOnly",
            "Containers",
            "Options",
            "Labels",
        ];
        let mut at = 0;
        for k in keys {
            let i = s[at..]
                .find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k} missing or out of order in {s}"));
            at += i + 1;
        }
        assert!(
            s.contains(r#""IPAM":{"Driver":"default","Options":null,"Config":[]}"#),
            "{s}"
        );
        assert!(s.contains(r#""ConfigFrom":{"Network":""}"#));
        assert!(s.contains(r#""Containers":{}"#));
    }

    #[test]
    fn fabric_refusals_become_docker_400s() {
        let e = crate::control::error::ApiError::invalid(
            "subnet",
            "subnet must be within private ranges",
        );
        let (s, m) = status(fabric_refusal(OpError::Api(e)));
        assert_eq!(s, 400);
        assert_eq!(
            m,
            "the fabric refused the network: subnet: subnet must be within private ranges"
        );
    }
}
