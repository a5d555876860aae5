//! VMs (`fabric_vms`), VMAPI-shaped: the registry the agents converge their hosts to.
//!
//! A VM is created with its NICs in ONE transaction: placement (when no `server_uuid` is given),
//! the VM row (`state: provisioning`), then one NAPI NIC per requested network through
//! [`nics::create`] (`belongs_to_type: zone`, `belongs_to_uuid` = the VM, `cn_uuid` = its
//! server), which writes the IP and the Portolan mapping too. A failure on any NIC rolls the
//! whole create back. Migrate moves every NIC's `cn_uuid` through [`nics::update`] (Portolan
//! moves the mapping and writes the shootdowns); delete removes the NICs through
//! [`nics::delete`] (IPs freed, mappings tombstoned) and keeps the row as `destroyed`.
//!
//! The agent of the VM's server reports `running`/`failed`/`stopped`
//! (`POST /servers/:uuid/vm_states`); a report from a server the VM is no longer on is ignored.
//! When read, a VM whose server has not heartbeat within the configured lifetime reads
//! `unknown` ([`effective_state`], the one place this rule lives). A VM whose server was
//! removed from the cluster reads `unknown` too, with `"lost": true` (every VM object carries
//! `lost`, false otherwise) and a `state_reason` saying so; it stays until an operator migrates
//! or deletes it. A state report made with a host certificate must only name VMs on that host:
//! one VM of another server refuses the whole report (403, nothing written).
//!
//! A Docker container is a VM with a [`ContainerSpec`] (`container`), created with desired
//! state `stopped` and possibly no NIC (its network did not exist yet). Its lifecycle is the
//! contract of issue 19: [`Action::Start`] (a VM that is not running gets a new `generation`:
//! the agent never starts one generation's process twice), [`Action::Stop`] and
//! [`Action::Reboot`] (with the stop timeout), [`Action::Kill`] (a one-shot [`SignalRequest`]
//! with an id the agent delivers once). Reports carry the process's exit status, start and end
//! times and generation; a container's move to running records a `container` `start`, its end
//! a `die` with `{"exit_code": n}`, and a `--rm` container goes in the same transaction
//! ([`remove_container`]).
//!
//! Locks (db.rs order): the owner (placement and alias uniqueness are per-owner decisions),
//! then the VM, then its NICs (inside `nics`). Every write records a `vm` change.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use portolan::store::Txn;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::changes::{self, kind, Change};
use super::container_spec::{ContainerSpec, SignalRequest};
use super::db::{lock_key, Db, Row, Val, LOCK_OWNER, LOCK_VM};
use super::error::{ApiError, FieldError, OpError};
use super::networks::{self, Network};
use super::nics::{self, mac_string, Nic};
use super::params::{page, parse_uuid, random_uuid, Params};
use super::servers::{self, now_ms, Server};
use super::{iso_from_ms, placement, Config};

/// Brands a VM may have (create only).
pub const BRANDS: &[&str] = &["joyent", "joyent-minimal", "lx", "bhyve", "kvm"];
/// States an agent may report.
pub const REPORTED_STATES: &[&str] = &["running", "failed", "stopped"];
/// Most networks (NICs) one VM may be created with.
pub const MAX_NICS: usize = 32;
/// Most VM states one report may carry.
pub const MAX_REPORT: usize = 10_000;
/// Longest alias (VMAPI's).
pub const MAX_ALIAS: usize = 189;
/// Most tags, longest tag name and longest string value.
pub const MAX_TAGS: usize = 256;
const MAX_TAG_KEY: usize = 128;
const MAX_TAG_VALUE: usize = 1024;
const MAX_REASON: usize = 1024;

/// A NIC of a VM, by MAC, with the interface name it was given (`net0`, `net1`, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicRef {
    /// MAC as a 48-bit integer.
    pub mac: u64,
    /// Interface name in the VM.
    pub interface: String,
}

/// A stored VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vm {
    /// UUID (lower case).
    pub uuid: String,
    /// Alias, unique per owner among VMs that are not destroyed.
    pub alias: Option<String>,
    /// Owner.
    pub owner_uuid: String,
    /// Server it runs on.
    pub server_uuid: Option<String>,
    /// Brand (create only).
    pub brand: String,
    /// Stored state: provisioning, running, stopped, failed, destroyed.
    pub state: String,
    /// running or stopped.
    pub desired_state: String,
    /// Why the agent failed it, if it did.
    pub state_reason: Option<String>,
    /// Tags (string, number or boolean values).
    pub tags: Map<String, Value>,
    /// Whether its traffic is filtered.
    pub firewall_enabled: bool,
    /// Its NICs in interface order.
    pub nics: Vec<NicRef>,
    /// Creation, ms since the epoch.
    pub created_ms: i64,
    /// Last write, ms since the epoch.
    pub modified_ms: i64,
    /// Destruction, ms since the epoch.
    pub destroyed_ms: Option<i64>,
    /// The container it runs, for Docker containers.
    #[serde(default)]
    pub container: Option<ContainerSpec>,
    /// 0 at create; +1 on every start of a VM that is not running and on every reboot: the
    /// agent never starts one generation's process twice.
    #[serde(default)]
    pub generation: u64,
    /// The last kill; the agent delivers each id once.
    #[serde(default)]
    pub signal: Option<SignalRequest>,
    /// The `timeout` (seconds) of the last stop or reboot (`None`: the spec's `stop_timeout`).
    #[serde(default)]
    pub stop_timeout: Option<u32>,
    /// The exit status of the last process that ended, as reported.
    #[serde(default)]
    pub exit_status: Option<i32>,
    /// When the process of `run_generation` started (ms since the epoch), as reported.
    #[serde(default)]
    pub started_ms: Option<i64>,
    /// When it ended, as reported.
    #[serde(default)]
    pub finished_ms: Option<i64>,
    /// The generation the last report was about.
    #[serde(default)]
    pub run_generation: Option<u64>,
}

/// The state a VM reads as: the stored state, except `unknown` when its server is gone or has
/// not heartbeat within `lifetime_ms` (a stored `destroyed` or `failed` stays as it is).
pub fn effective_state<'a>(
    stored: &'a str,
    server: Option<&Server>,
    now_ms: i64,
    lifetime_ms: i64,
) -> &'a str {
    match stored {
        "destroyed" | "failed" => stored,
        _ if server.is_some_and(|s| s.is_live(now_ms, lifetime_ms)) => stored,
        _ => "unknown",
    }
}

fn conflict(code: &'static str, message: String, errors: Vec<FieldError>) -> ApiError {
    let mut e = ApiError::invalid_params(errors);
    e.status = 409;
    e.code = code;
    e.message = message;
    e
}

/// A VM from its `doc` column.
pub(super) fn from_row(r: Row) -> Result<Vm, OpError> {
    super::db::doc_from_row(r, "vm")
}

/// One VM by (lower-case) UUID, destroyed ones too.
pub fn get(db: &mut Db<'_>, uuid: &str) -> Result<Option<Vm>, OpError> {
    db.query_opt(
        "SELECT doc FROM fabric_vms WHERE uuid = $1",
        &[Val::text(uuid)],
    )?
    .map(from_row)
    .transpose()
}

/// The VM named in a URL, or 404.
pub fn find(db: &mut Db<'_>, uuid: &str) -> Result<Vm, OpError> {
    let u = parse_uuid(uuid).ok_or_else(|| ApiError::not_found("VM not found"))?;
    get(db, &u)?.ok_or_else(|| ApiError::not_found("VM not found").into())
}

/// Takes the locks of the VM named in a URL (its owner's, then its own) and reads it under
/// them (404 if it does not exist).
pub fn lock_and_find(db: &mut Db<'_>, uuid: &str) -> Result<Vm, OpError> {
    let first = find(db, uuid)?;
    db.lock(lock_key(LOCK_OWNER, &first.owner_uuid))?;
    db.lock(lock_key(LOCK_VM, &first.uuid))?;
    find(db, &first.uuid)
}

/// Every VM of `server_uuid` that is not destroyed, by UUID.
pub fn on_server(db: &mut Db<'_>, server_uuid: &str) -> Result<Vec<Vm>, OpError> {
    db.query(
        "SELECT doc FROM fabric_vms WHERE server_uuid = $1 AND state <> 'destroyed' ORDER BY uuid",
        &[Val::text(server_uuid)],
    )?
    .into_iter()
    .map(from_row)
    .collect()
}

fn save(db: &mut Db<'_>, vm: &Vm, creating: bool) -> Result<(), OpError> {
    let params = [
        Val::text(&vm.owner_uuid),
        Val::opt_text(vm.server_uuid.as_deref()),
        Val::text(&vm.state),
        Val::opt_text(vm.alias.as_deref()),
        Val::int(vm.created_ms),
        Val::text(serde_json::to_string(vm)?),
        Val::text(&vm.uuid),
    ];
    if creating {
        db.exec(
            "INSERT INTO fabric_vms (owner_uuid, server_uuid, state, alias, created_ms, doc, uuid) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &params,
        )?;
    } else if db.exec(
        "UPDATE fabric_vms SET owner_uuid = $1, server_uuid = $2, state = $3, alias = $4, \
           created_ms = $5, doc = $6 WHERE uuid = $7",
        &params,
    )? == 0
    {
        return Err(ApiError::not_found("VM not found").into());
    }
    Ok(())
}

fn record(db: &mut Db<'_>, vm: &Vm, action: &str, servers: &[&str]) -> Result<(), OpError> {
    changes::record(
        db,
        &Change {
            kind: kind::VM,
            uuid: &vm.uuid,
            action,
            owner_uuid: Some(&vm.owner_uuid),
            servers,
        },
    )
}

/// Records a `container` change of a container VM (same transaction as the VM write).
pub fn record_container(
    db: &mut Db<'_>,
    vm: &Vm,
    action: &str,
    detail: Option<&Value>,
) -> Result<(), OpError> {
    let server = vm.server_uuid.clone().unwrap_or_default();
    changes::record_with(
        db,
        &Change {
            kind: kind::CONTAINER,
            uuid: &vm.uuid,
            action,
            owner_uuid: Some(&vm.owner_uuid),
            servers: &[&server],
        },
        detail,
    )
}

/// A VM's NICs with their interface names and networks: those it was created with, in their
/// order, then any other NIC that belongs to it (created through `/nics`), by MAC, named with
/// the next free `netN`.
pub fn vm_nics(db: &mut Db<'_>, vm: &Vm) -> Result<Vec<(String, Nic, Option<Network>)>, OpError> {
    let mut rows: Vec<Nic> = db
        .query(
            "SELECT doc FROM napi_nics WHERE belongs_to_uuid = $1 ORDER BY mac",
            &[Val::text(&vm.uuid)],
        )?
        .into_iter()
        .map(|r| super::db::doc_from_row(r, "nic"))
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &vm.nics {
        if let Some(i) = rows.iter().position(|n| n.mac == r.mac) {
            out.push((r.interface.clone(), rows.remove(i)));
        }
    }
    let mut next = vm.nics.len();
    for n in rows {
        while out.iter().any(|(i, _)| *i == format!("net{next}"))
            || vm.nics.iter().any(|r| r.interface == format!("net{next}"))
        {
            next += 1;
        }
        out.push((format!("net{next}"), n));
        next += 1;
    }
    let mut nets: HashMap<String, Option<Network>> = HashMap::new();
    let mut res = Vec::with_capacity(out.len());
    for (iface, n) in out {
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
        res.push((iface, n, net));
    }
    Ok(res)
}

/// One entry of a VM's `nics`: NAPI's fields a host needs, the interface and the VNI.
fn nic_json(iface: &str, nic: &Nic, net: Option<&Network>, cfg: &Config) -> Value {
    let full = nic.to_json(net, cfg);
    let mut m = Map::new();
    m.insert("interface".into(), json!(iface));
    for k in [
        "mac",
        "ip",
        "netmask",
        "gateway",
        "mtu",
        "vlan_id",
        "nic_tag",
        "network_uuid",
        "primary",
    ] {
        if let Some(v) = full.get(k) {
            m.insert(k.into(), v.clone());
        }
    }
    if let Some(v) = net.filter(|n| n.fabric).and_then(|n| n.vnet_id) {
        m.insert("vnet_id".into(), json!(v));
    }
    Value::Object(m)
}

/// The VM object, with `state` as read at `now_ms` given its server.
pub fn to_json(
    db: &mut Db<'_>,
    cfg: &Config,
    vm: &Vm,
    server: Option<&Server>,
    now_ms: i64,
) -> Result<Value, OpError> {
    let nics: Vec<Value> = vm_nics(db, vm)?
        .iter()
        .map(|(i, n, net)| nic_json(i, n, net.as_ref(), cfg))
        .collect();
    let mut m = Map::new();
    m.insert("uuid".into(), json!(vm.uuid));
    m.insert("alias".into(), json!(vm.alias));
    m.insert("owner_uuid".into(), json!(vm.owner_uuid));
    m.insert("server_uuid".into(), json!(vm.server_uuid));
    m.insert("brand".into(), json!(vm.brand));
    m.insert(
        "state".into(),
        json!(effective_state(
            &vm.state,
            server,
            now_ms,
            cfg.heartbeat_lifetime_ms()
        )),
    );
    m.insert("desired_state".into(), json!(vm.desired_state));
    let lost = server.is_some_and(Server::is_removed) && vm.state != "destroyed";
    if lost {
        m.insert(
            "state_reason".into(),
            json!(format!(
                "lost: server {} was removed from the cluster",
                vm.server_uuid.as_deref().unwrap_or("")
            )),
        );
    } else {
        m.insert("state_reason".into(), json!(vm.state_reason));
    }
    m.insert("lost".into(), json!(lost));
    m.insert("tags".into(), Value::Object(vm.tags.clone()));
    m.insert("firewall_enabled".into(), json!(vm.firewall_enabled));
    m.insert("nics".into(), Value::Array(nics));
    m.insert("create_timestamp".into(), json!(iso_from_ms(vm.created_ms)));
    m.insert("last_modified".into(), json!(iso_from_ms(vm.modified_ms)));
    if let Some(d) = vm.destroyed_ms {
        m.insert("destroyed".into(), json!(iso_from_ms(d)));
    }
    if let Some(c) = &vm.container {
        m.insert("container".into(), serde_json::to_value(c)?);
    }
    m.insert("generation".into(), json!(vm.generation));
    m.insert("signal".into(), json!(vm.signal));
    m.insert("stop_timeout".into(), json!(vm.stop_timeout));
    m.insert("exit_status".into(), json!(vm.exit_status));
    m.insert("started_at".into(), json!(vm.started_ms.map(iso_from_ms)));
    m.insert("finished_at".into(), json!(vm.finished_ms.map(iso_from_ms)));
    m.insert("run_generation".into(), json!(vm.run_generation));
    Ok(Value::Object(m))
}

/// The VM object as read now (looks its server up).
pub fn to_json_now(db: &mut Db<'_>, cfg: &Config, vm: &Vm) -> Result<Value, OpError> {
    let server = match &vm.server_uuid {
        Some(s) => servers::get(db, s)?,
        None => None,
    };
    to_json(db, cfg, vm, server.as_ref(), now_ms())
}

fn valid_alias(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && s.chars().count() <= MAX_ALIAS
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn alias_param(p: &mut Params) -> Option<String> {
    let a = p.string("alias")?;
    if valid_alias(&a) {
        Some(a)
    } else {
        p.invalid(
            "alias",
            format!(
                "must be 1 to {MAX_ALIAS} characters: a letter or digit, then letters, digits, \
                 '_', '.' or '-'"
            ),
        );
        None
    }
}

fn tags_param(p: &mut Params) -> Option<Map<String, Value>> {
    let raw = p.raw("tags")?.clone();
    let Value::Object(o) = raw else {
        p.invalid(
            "tags",
            "must be an object of string, number or boolean values",
        );
        return None;
    };
    if o.len() > MAX_TAGS {
        p.invalid("tags", format!("must have at most {MAX_TAGS} tags"));
        return None;
    }
    for (k, v) in &o {
        if k.is_empty() || k.chars().count() > MAX_TAG_KEY || k.contains('\0') {
            p.invalid(
                "tags",
                format!("tag name {k:?}: expected 1 to {MAX_TAG_KEY} characters"),
            );
            return None;
        }
        let ok = match v {
            Value::String(s) => s.chars().count() <= MAX_TAG_VALUE && !s.contains('\0'),
            Value::Number(_) | Value::Bool(_) => true,
            _ => false,
        };
        if !ok {
            p.invalid(
                "tags",
                format!(
                    "tag {k:?}: expected a string (at most {MAX_TAG_VALUE} characters), a number \
                     or a boolean"
                ),
            );
            return None;
        }
    }
    Some(o)
}

/// One requested network of a create.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetReq {
    uuid: String,
    ip: Option<Ipv4Addr>,
    primary: bool,
}

/// `networks`: `[{uuid, ip?, primary?}]` (or bare UUID strings, VMAPI's legacy form); at least
/// one (none only when `allow_none`: a container may wait for a network that does not exist
/// yet), at most [`MAX_NICS`], at most one primary (the first when none is marked).
fn networks_param(p: &mut Params, allow_none: bool) -> Option<Vec<NetReq>> {
    let raw = p.raw("networks")?.clone();
    if allow_none && raw.as_array().is_some_and(Vec::is_empty) {
        return Some(Vec::new());
    }
    let Value::Array(items) = raw else {
        p.invalid(
            "networks",
            "must be an array of {\"uuid\": NETWORK, \"ip\"?, \"primary\"?}",
        );
        return None;
    };
    if items.is_empty() || items.len() > MAX_NICS {
        p.invalid(
            "networks",
            format!("must have 1 to {MAX_NICS} networks (found {})", items.len()),
        );
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let f = |x: &str| format!("networks[{i}].{x}");
        let (uuid, ip, primary) = match item {
            Value::String(s) => (Some(s.clone()), None, None),
            Value::Object(o) => {
                let unknown: Vec<&String> = o
                    .keys()
                    .filter(|k| !matches!(k.as_str(), "uuid" | "ip" | "primary"))
                    .collect();
                if !unknown.is_empty() {
                    p.invalid(
                        &format!("networks[{i}]"),
                        format!("unknown keys {unknown:?}: expected uuid, ip, primary"),
                    );
                    ok = false;
                    continue;
                }
                let uuid = match o.get("uuid") {
                    Some(Value::String(s)) => Some(s.clone()),
                    None | Some(Value::Null) => {
                        p.error(FieldError::missing(&f("uuid")));
                        ok = false;
                        continue;
                    }
                    Some(_) => None,
                };
                let ip = match o.get("ip") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => match s.parse::<Ipv4Addr>() {
                        Ok(ip) => Some(ip),
                        Err(_) => {
                            p.invalid(&f("ip"), format!("{s:?} is not an IPv4 address"));
                            ok = false;
                            continue;
                        }
                    },
                    Some(_) => {
                        p.invalid(&f("ip"), "must be a string (an IPv4 address)");
                        ok = false;
                        continue;
                    }
                };
                let primary = match o.get("primary") {
                    None | Some(Value::Null) => None,
                    Some(Value::Bool(b)) => Some(*b),
                    Some(_) => {
                        p.invalid(&f("primary"), "must be a boolean value");
                        ok = false;
                        continue;
                    }
                };
                (uuid, ip, primary)
            }
            _ => {
                p.invalid(
                    &format!("networks[{i}]"),
                    "must be an object {\"uuid\": NETWORK, \"ip\"?, \"primary\"?}",
                );
                ok = false;
                continue;
            }
        };
        match uuid.as_deref().and_then(parse_uuid) {
            Some(u) => out.push(NetReq {
                uuid: u,
                ip,
                primary: primary.unwrap_or(false),
            }),
            None => {
                p.invalid(&f("uuid"), "invalid UUID");
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }
    match out.iter().filter(|n| n.primary).count() {
        0 => out[0].primary = true,
        1 => {}
        _ => {
            p.invalid("networks", "at most one network can be primary");
            return None;
        }
    }
    Some(out)
}

/// Names `nics`' field errors after the network they came from (`networks[i].uuid`, ...).
fn nic_error(e: OpError, i: usize) -> OpError {
    match e {
        OpError::Api(mut a) => {
            for fe in &mut a.errors {
                if let Value::String(s) = &fe.field {
                    let name = if s == "network_uuid" {
                        "uuid"
                    } else {
                        s.as_str()
                    };
                    fe.field = Value::String(format!("networks[{i}].{name}"));
                }
            }
            OpError::Api(a)
        }
        other => other,
    }
}

const CREATE_PARAMS: &[&str] = &[
    "owner_uuid",
    "uuid",
    "alias",
    "server_uuid",
    "brand",
    "tags",
    "firewall_enabled",
    "networks",
    "container",
    "check_owner",
];

/// `container`: a [`ContainerSpec`] that passes its own check.
fn container_param(p: &mut Params) -> Option<ContainerSpec> {
    let raw = p.raw("container")?.clone();
    if raw.is_null() {
        return None;
    }
    match serde_json::from_value::<ContainerSpec>(raw) {
        Ok(c) => match c.check() {
            Ok(()) => Some(c),
            Err(e) => {
                p.invalid("container", e);
                None
            }
        },
        Err(e) => {
            p.invalid(
                "container",
                format!("expected a container spec object: {e}"),
            );
            None
        }
    }
}

/// `POST /vms`.
pub fn create(tx: &mut dyn Txn, cfg: &Config, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(CREATE_PARAMS);
    let owner = p.uuid("owner_uuid");
    let owner = p.require("owner_uuid", owner);
    let uuid = p.uuid("uuid");
    let alias = alias_param(p);
    let server = p.uuid("server_uuid");
    let brand = p.one_of("brand", BRANDS);
    let tags = tags_param(p);
    let firewall_enabled = p.boolean("firewall_enabled");
    // NAPI's `check_owner` for every NIC (default true): a caller that decided itself which
    // networks the owner may use (the Docker layer: its own and the shared ones) says false.
    let check_owner = p.boolean("check_owner").unwrap_or(true);
    let container = container_param(p);
    let is_container = p.raw("container").is_some_and(|v| !v.is_null());
    let nets = networks_param(p, is_container);
    let nets = if is_container {
        Some(nets.unwrap_or_default())
    } else {
        p.require("networks", nets)
    };
    p.finish()?;
    let (Some(owner), Some(nets)) = (owner, nets) else {
        return Err(ApiError::invalid_params(vec![FieldError::missing("owner_uuid")]).into());
    };
    let now = now_ms();
    let lifetime = cfg.heartbeat_lifetime_ms();
    let uuid = match uuid {
        Some(u) => u,
        None => random_uuid().map_err(|e| OpError::Corrupt(format!("random: {e}")))?,
    };
    let server_uuid = {
        let mut d = Db::from(tx.raw());
        d.lock(lock_key(LOCK_OWNER, &owner))?;
        d.lock(lock_key(LOCK_VM, &uuid))?;
        if get(&mut d, &uuid)?.is_some() {
            return Err(conflict(
                "Duplicate",
                format!("VM {uuid} already exists"),
                vec![FieldError::duplicate("uuid", "Already exists")],
            )
            .into());
        }
        if let Some(a) = &alias {
            if d.query_opt(
                "SELECT uuid FROM fabric_vms WHERE owner_uuid = $1 AND alias = $2 \
                   AND state <> 'destroyed'",
                &[Val::text(&owner), Val::text(a)],
            )?
            .is_some()
            {
                return Err(conflict(
                    "Duplicate",
                    format!("alias {a:?} already exists for this owner_uuid"),
                    vec![FieldError::duplicate(
                        "alias",
                        "Already exists for this owner_uuid",
                    )],
                )
                .into());
            }
        }
        // Networks first (an unlocked read, for one clear error naming every unknown network;
        // `nics::create` reads each again under its lock).
        let mut missing = Vec::new();
        for (i, n) in nets.iter().enumerate() {
            if networks::get(&mut d, &n.uuid)?.is_none() {
                missing.push(FieldError::invalid(
                    &format!("networks[{i}].uuid"),
                    format!("network {} does not exist", n.uuid),
                ));
            }
        }
        if !missing.is_empty() {
            return Err(ApiError::invalid_params(missing).into());
        }
        match server {
            Some(s) => {
                servers::target(&mut d, &s, &format!(" (PUT /servers/{s} first)"))?;
                s
            }
            None => placement::place(&mut d, &owner, now, lifetime, &|_| true)?,
        }
    };
    let mut refs = Vec::with_capacity(nets.len());
    for (i, n) in nets.iter().enumerate() {
        let mut m = Map::new();
        m.insert("belongs_to_uuid".into(), json!(uuid));
        m.insert("belongs_to_type".into(), json!("zone"));
        m.insert("owner_uuid".into(), json!(owner));
        m.insert("cn_uuid".into(), json!(server_uuid));
        m.insert("network_uuid".into(), json!(n.uuid));
        m.insert("check_owner".into(), json!(check_owner));
        m.insert("primary".into(), json!(n.primary));
        if let Some(ip) = n.ip {
            m.insert("ip".into(), json!(ip.to_string()));
        }
        let req = nics::validate_create(&mut Params::from_map(m), None)
            .map_err(|e| nic_error(e.into(), i))?;
        let nic = nics::create(tx, cfg, req).map_err(|e| nic_error(e, i))?;
        let mac = nic
            .get("mac")
            .and_then(Value::as_str)
            .and_then(nics::parse_mac)
            .ok_or_else(|| OpError::Corrupt("created NIC without a MAC".into()))?;
        refs.push(NicRef {
            mac,
            interface: format!("net{i}"),
        });
    }
    let vm = Vm {
        uuid,
        alias,
        owner_uuid: owner,
        server_uuid: Some(server_uuid.clone()),
        brand: brand.unwrap_or_else(|| "joyent-minimal".into()),
        state: "provisioning".into(),
        // A container is created, not started (`docker create`); other VMs run at once.
        desired_state: if container.is_some() {
            "stopped"
        } else {
            "running"
        }
        .into(),
        state_reason: None,
        tags: tags.unwrap_or_default(),
        firewall_enabled: firewall_enabled.unwrap_or(false),
        nics: refs,
        created_ms: now,
        modified_ms: now,
        destroyed_ms: None,
        container,
        generation: 0,
        signal: None,
        stop_timeout: None,
        exit_status: None,
        started_ms: None,
        finished_ms: None,
        run_generation: None,
    };
    let mut d = Db::from(tx.raw());
    save(&mut d, &vm, true)?;
    record(&mut d, &vm, "create", &[&server_uuid])?;
    if vm.container.is_some() {
        record_container(&mut d, &vm, "create", None)?;
    }
    to_json_now(&mut d, cfg, &vm)
}

/// `GET /vms/:uuid` (destroyed VMs too).
pub fn get_api(
    db: &mut Db<'_>,
    cfg: &Config,
    uuid: &str,
    p: &mut Params,
) -> Result<Value, OpError> {
    p.allow_only(&[]);
    p.finish()?;
    let vm = find(db, uuid)?;
    to_json_now(db, cfg, &vm)
}

/// States `GET /vms?state=` accepts.
const LIST_STATES: &[&str] = &[
    "active",
    "provisioning",
    "running",
    "stopped",
    "failed",
    "unknown",
    "destroyed",
];

/// `GET /vms`: filters `owner_uuid`, `server_uuid`, `alias`, `state` (as read: `active` is
/// neither destroyed nor failed; without it destroyed VMs are left out), `limit`, `offset`;
/// oldest first.
pub fn list(db: &mut Db<'_>, cfg: &Config, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&[
        "owner_uuid",
        "server_uuid",
        "alias",
        "state",
        "limit",
        "offset",
    ]);
    let owner = p.uuid("owner_uuid");
    let server = p.uuid("server_uuid");
    let alias = p.string("alias");
    let state = p.one_of("state", LIST_STATES);
    let (limit, offset) = p.pagination();
    p.finish()?;
    let mut conds = Vec::new();
    let mut args = Vec::new();
    for (col, v) in [
        ("owner_uuid", owner),
        ("server_uuid", server),
        ("alias", alias),
    ] {
        if let Some(v) = v {
            args.push(Val::text(v));
            conds.push(format!("{col} = ${}", args.len()));
        }
    }
    conds.push(if state.as_deref() == Some("destroyed") {
        "state = 'destroyed'".into()
    } else {
        "state <> 'destroyed'".into()
    });
    let sql = format!(
        "SELECT doc FROM fabric_vms WHERE {} ORDER BY created_ms, uuid",
        conds.join(" AND ")
    );
    let vms: Vec<Vm> = db
        .query(&sql, &args)?
        .into_iter()
        .map(from_row)
        .collect::<Result<_, _>>()?;
    let servers: HashMap<String, Server> = servers::all(db)?
        .into_iter()
        .map(|s| (s.uuid.clone(), s))
        .collect();
    let now = now_ms();
    let lifetime = cfg.heartbeat_lifetime_ms();
    let wanted: Vec<(&Vm, Option<&Server>)> = vms
        .iter()
        .map(|v| (v, v.server_uuid.as_ref().and_then(|s| servers.get(s))))
        .filter(|(v, s)| {
            let st = effective_state(&v.state, *s, now, lifetime);
            match state.as_deref() {
                None | Some("destroyed") => true,
                Some("active") => st != "failed",
                Some(w) => st == w,
            }
        })
        .collect();
    let mut out = Vec::new();
    for (v, s) in page(wanted, limit, offset) {
        out.push(to_json(db, cfg, v, s, now)?);
    }
    Ok(Value::Array(out))
}

/// Linux signal names (without `SIG`) and numbers a kill may name.
pub const SIGNALS: &[(&str, u8)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// A signal as `SIGKILL`, `KILL`, `sigkill` or `9` → its `SIG`-prefixed name (`SIGKILL`);
/// `RTMIN+n` forms are not accepted. `None`: not a signal.
pub fn parse_signal(s: &str) -> Option<String> {
    if !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()) {
        let n: u8 = s.parse().ok()?;
        return SIGNALS
            .iter()
            .find(|(_, v)| *v == n)
            .map(|(name, _)| format!("SIG{name}"));
    }
    let up = s.to_ascii_uppercase();
    let bare = up.strip_prefix("SIG").unwrap_or(&up);
    SIGNALS
        .iter()
        .find(|(name, _)| *name == bare)
        .map(|(name, _)| format!("SIG{name}"))
}

/// A lifecycle action on a VM (`POST /vms/:uuid?action=`, and the Docker verbs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Desired running; a VM that is not running gets a new generation.
    Start,
    /// Desired stopped, with the stop timeout (seconds) to use.
    Stop(Option<u32>),
    /// A new generation, desired running, with the stop timeout for the old process.
    Reboot(Option<u32>),
    /// A one-shot signal (`SIG`-prefixed name).
    Kill(String),
}

impl Action {
    /// The action's name in the `container` change it records.
    fn container_change(&self) -> Option<&'static str> {
        match self {
            Action::Start => None,
            Action::Stop(_) => Some("stop"),
            Action::Reboot(_) => Some("restart"),
            Action::Kill(_) => Some("kill"),
        }
    }
}

/// Applies `act` to `vm` (no I/O): the state model of the contract.
pub fn apply_action(vm: &mut Vm, act: &Action) {
    match act {
        Action::Start => {
            if vm.state != "running" {
                vm.generation += 1;
            }
            // A new attempt: an earlier failure is not this one's (the agent reports again).
            if vm.state == "failed" {
                vm.state = "provisioning".into();
                vm.state_reason = None;
            }
            vm.desired_state = "running".into();
        }
        Action::Stop(t) => {
            vm.desired_state = "stopped".into();
            vm.stop_timeout = *t;
        }
        Action::Reboot(t) => {
            vm.generation += 1;
            vm.desired_state = "running".into();
            vm.stop_timeout = *t;
        }
        Action::Kill(sig) => {
            let id = vm.signal.as_ref().map_or(0, |s| s.id) + 1;
            vm.signal = Some(SignalRequest {
                id,
                signal: sig.clone(),
            });
        }
    }
}

/// Applies a lifecycle action to the (locked) VM `vm`, saves it and records the `vm` change
/// (and the `container` change of a container: `stop`, `restart`, `kill` with its signal).
pub fn act(db: &mut Db<'_>, vm: &mut Vm, act: &Action) -> Result<(), OpError> {
    if vm.state == "destroyed" {
        return Err(conflict(
            "VmDestroyed",
            format!("VM {} is destroyed: nothing can change it", vm.uuid),
            Vec::new(),
        )
        .into());
    }
    let before = vm.clone();
    apply_action(vm, act);
    let server = vm.server_uuid.clone().unwrap_or_default();
    if *vm != before {
        vm.modified_ms = now_ms();
        save(db, vm, false)?;
        record(db, vm, "update", &[&server])?;
    }
    // A container change only when what the agent must do changed (a stop of a stopped
    // container is no event, as in moby).
    let moved = vm.desired_state != before.desired_state
        || vm.generation != before.generation
        || vm.signal != before.signal;
    if vm.container.is_some() && moved {
        if let Some(name) = act.container_change() {
            let detail = match act {
                Action::Kill(sig) => Some(json!({ "signal": sig })),
                _ => None,
            };
            record_container(db, vm, name, detail.as_ref())?;
        }
    }
    Ok(())
}

/// Renames a VM (its alias; unique per owner among VMs not destroyed) and records a `vm`
/// `update` (and a container's `rename`). The caller holds the owner's and the VM's locks.
pub fn rename(db: &mut Db<'_>, vm: &mut Vm, alias: &str) -> Result<(), OpError> {
    if !valid_alias(alias) {
        return Err(ApiError::invalid(
            "alias",
            format!(
                "must be 1 to {MAX_ALIAS} characters: a letter or digit, then letters, digits, \
                 '_', '.' or '-'"
            ),
        )
        .into());
    }
    if alias_taken(db, &vm.owner_uuid, alias, Some(&vm.uuid))?.is_some() {
        return Err(duplicate_alias(alias).into());
    }
    vm.alias = Some(alias.to_string());
    vm.modified_ms = now_ms();
    save(db, vm, false)?;
    let server = vm.server_uuid.clone().unwrap_or_default();
    record(db, vm, "update", &[&server])?;
    if vm.container.is_some() {
        record_container(db, vm, "rename", None)?;
    }
    Ok(())
}

/// The VM (not destroyed) of `owner` with `alias`, other than `except`.
pub fn alias_taken(
    db: &mut Db<'_>,
    owner: &str,
    alias: &str,
    except: Option<&str>,
) -> Result<Option<String>, OpError> {
    match db.query_opt(
        "SELECT uuid FROM fabric_vms WHERE owner_uuid = $1 AND alias = $2 \
           AND state <> 'destroyed' AND uuid <> $3",
        &[
            Val::text(owner),
            Val::text(alias),
            Val::text(except.unwrap_or("")),
        ],
    )? {
        Some(r) => r
            .into_iter()
            .next()
            .map(|v| v.into_string("uuid"))
            .transpose(),
        None => Ok(None),
    }
}

fn duplicate_alias(a: &str) -> ApiError {
    conflict(
        "Duplicate",
        format!("alias {a:?} already exists for this owner_uuid"),
        vec![FieldError::duplicate(
            "alias",
            "Already exists for this owner_uuid",
        )],
    )
}

/// `timeout`: whole seconds, at most a day.
fn timeout_param(p: &mut Params) -> Option<u32> {
    let v = p.raw("timeout")?.clone();
    let n = match &v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n <= 86_400 => Some(n as u32),
        _ => {
            p.invalid("timeout", "expected whole seconds from 0 to 86400");
            None
        }
    }
}

/// `POST /vms/:uuid?action=update|migrate|start|stop|reboot|kill`.
pub fn action(
    tx: &mut dyn Txn,
    cfg: &Config,
    uuid: &str,
    p: &mut Params,
) -> Result<Value, OpError> {
    let act = p.string("action");
    let act = p.require("action", act);
    let act = act.unwrap_or_default();
    if !matches!(
        act.as_str(),
        "update" | "migrate" | "start" | "stop" | "reboot" | "kill"
    ) && !p.has_errors()
    {
        p.invalid(
            "action",
            format!(
                "unsupported action {act:?}: expected update, migrate, start, stop, reboot or kill"
            ),
        );
    }
    match act.as_str() {
        "update" => p.allow_only(&["action", "tags", "firewall_enabled", "alias"]),
        "migrate" => p.allow_only(&["action", "server_uuid"]),
        "stop" | "reboot" => p.allow_only(&["action", "timeout"]),
        "kill" => p.allow_only(&["action", "signal"]),
        _ => p.allow_only(&["action"]),
    }
    let tags = tags_param(p);
    let fw = p.boolean("firewall_enabled");
    let alias = alias_param(p);
    let target = p.uuid("server_uuid");
    let timeout = timeout_param(p);
    let signal = match p.string("signal") {
        None => Some("SIGKILL".to_string()),
        Some(s) => match parse_signal(&s) {
            Some(x) => Some(x),
            None => {
                p.invalid(
                    "signal",
                    format!("{s:?} is not a signal: expected a name (SIGKILL, KILL) or a number"),
                );
                None
            }
        },
    };
    if act == "migrate" {
        p.require("server_uuid", target.as_ref());
    }
    p.finish()?;
    let mut vm = lock_and_find(&mut Db::from(tx.raw()), uuid)?;
    if vm.state == "destroyed" {
        return Err(conflict(
            "VmDestroyed",
            format!("VM {} is destroyed: nothing can change it", vm.uuid),
            Vec::new(),
        )
        .into());
    }
    let lifecycle = match act.as_str() {
        "start" => Some(Action::Start),
        "stop" => Some(Action::Stop(timeout)),
        "reboot" => Some(Action::Reboot(timeout)),
        "kill" => Some(Action::Kill(signal.unwrap_or_else(|| "SIGKILL".into()))),
        _ => None,
    };
    if let Some(a) = lifecycle {
        let mut d = Db::from(tx.raw());
        self::act(&mut d, &mut vm, &a)?;
        return to_json_now(&mut d, cfg, &vm);
    }
    let before = vm.clone();
    let server = vm.server_uuid.clone().unwrap_or_default();
    let now = now_ms();
    match act.as_str() {
        "update" => {
            if let Some(a) = &alias {
                let mut d = Db::from(tx.raw());
                if alias_taken(&mut d, &vm.owner_uuid, a, Some(&vm.uuid))?.is_some() {
                    return Err(duplicate_alias(a).into());
                }
                if vm.container.is_some() && vm.alias.as_deref() != Some(a.as_str()) {
                    vm.alias = Some(a.clone());
                    record_container(&mut d, &vm, "rename", None)?;
                }
                vm.alias = Some(a.clone());
            }
            if let Some(t) = tags {
                vm.tags = t;
            }
            if let Some(f) = fw {
                vm.firewall_enabled = f;
            }
        }
        _ => {
            let target = target.unwrap_or_default();
            let mut d = Db::from(tx.raw());
            servers::target(&mut d, &target, "")?;
            if target == server {
                return Err(ApiError::invalid(
                    "server_uuid",
                    format!("the VM is already on server {target}"),
                )
                .into());
            }
            let macs: Vec<u64> = vm_nics(&mut d, &vm)?
                .iter()
                .map(|(_, n, _)| n.mac)
                .collect();
            for mac in macs {
                let mut m = Map::new();
                m.insert("cn_uuid".into(), json!(target));
                nics::update(tx, cfg, &mac_string(mac), &mut Params::from_map(m))?;
            }
            vm.server_uuid = Some(target.clone());
            vm.state = "provisioning".into();
            vm.state_reason = None;
            vm.modified_ms = now;
            let mut d = Db::from(tx.raw());
            save(&mut d, &vm, false)?;
            record(&mut d, &vm, "migrate", &[&server, &target])?;
            return to_json_now(&mut d, cfg, &vm);
        }
    }
    let mut d = Db::from(tx.raw());
    if vm != before {
        vm.modified_ms = now;
        save(&mut d, &vm, false)?;
        record(&mut d, &vm, "update", &[&server])?;
    }
    to_json_now(&mut d, cfg, &vm)
}

/// Adds a NIC on `network_uuid` (at `ip` if given) to the (locked) VM `vm`, named with the next
/// free `netN`, through [`nics::create`] (IP, Portolan mapping); saves the VM and records a
/// `vm` `update`. Returns the new NIC's MAC.
pub fn add_nic(
    tx: &mut dyn Txn,
    cfg: &Config,
    vm: &mut Vm,
    network_uuid: &str,
    ip: Option<Ipv4Addr>,
    check_owner: bool,
) -> Result<u64, OpError> {
    let server = vm.server_uuid.clone().unwrap_or_default();
    let existing = {
        let mut d = Db::from(tx.raw());
        vm_nics(&mut d, vm)?
    };
    let mut m = Map::new();
    m.insert("belongs_to_uuid".into(), json!(vm.uuid));
    m.insert("belongs_to_type".into(), json!("zone"));
    m.insert("owner_uuid".into(), json!(vm.owner_uuid));
    m.insert("cn_uuid".into(), json!(server));
    m.insert("network_uuid".into(), json!(network_uuid));
    m.insert("primary".into(), json!(existing.is_empty()));
    m.insert("check_owner".into(), json!(check_owner));
    if let Some(ip) = ip {
        m.insert("ip".into(), json!(ip.to_string()));
    }
    let req = nics::validate_create(&mut Params::from_map(m), None)?;
    let nic = nics::create(tx, cfg, req)?;
    let mac = nic
        .get("mac")
        .and_then(Value::as_str)
        .and_then(nics::parse_mac)
        .ok_or_else(|| OpError::Corrupt("created NIC without a MAC".into()))?;
    let mut n = 0;
    while existing.iter().any(|(i, _, _)| *i == format!("net{n}"))
        || vm.nics.iter().any(|r| r.interface == format!("net{n}"))
    {
        n += 1;
    }
    vm.nics.push(NicRef {
        mac,
        interface: format!("net{n}"),
    });
    vm.modified_ms = now_ms();
    let mut d = Db::from(tx.raw());
    save(&mut d, vm, false)?;
    record(&mut d, vm, "update", &[&server])?;
    Ok(mac)
}

/// Removes the NIC `mac` of the (locked) VM `vm` through [`nics::delete`] (IP freed, mapping
/// tombstoned); saves the VM and records a `vm` `update`.
pub fn remove_nic(tx: &mut dyn Txn, cfg: &Config, vm: &mut Vm, mac: u64) -> Result<(), OpError> {
    nics::delete(tx, cfg, &mac_string(mac))?;
    vm.nics.retain(|r| r.mac != mac);
    vm.modified_ms = now_ms();
    let server = vm.server_uuid.clone().unwrap_or_default();
    let mut d = Db::from(tx.raw());
    save(&mut d, vm, false)?;
    record(&mut d, vm, "update", &[&server])
}

/// Saves a VM's tags (the Docker layer's bookkeeping: a pending network) and records a `vm`
/// `update`. The caller holds the VM's lock.
pub fn set_tags(db: &mut Db<'_>, vm: &mut Vm, tags: Map<String, Value>) -> Result<(), OpError> {
    if vm.tags == tags {
        return Ok(());
    }
    vm.tags = tags;
    vm.modified_ms = now_ms();
    save(db, vm, false)?;
    let server = vm.server_uuid.clone().unwrap_or_default();
    record(db, vm, "update", &[&server])
}

/// `DELETE /vms/:uuid`: deletes its NICs (IPs freed, mappings tombstoned), keeps the VM as
/// `destroyed`. A VM destroyed already is 404.
pub fn delete(tx: &mut dyn Txn, cfg: &Config, uuid: &str, p: &mut Params) -> Result<(), OpError> {
    p.allow_only(&[]);
    p.finish()?;
    let mut d = Db::from(tx.raw());
    let mut vm = lock_and_find(&mut d, uuid)?;
    if vm.state == "destroyed" {
        return Err(ApiError::not_found("VM not found (it is destroyed)").into());
    }
    let macs: Vec<u64> = vm_nics(&mut d, &vm)?
        .iter()
        .map(|(_, n, _)| n.mac)
        .collect();
    for mac in macs {
        nics::delete(tx, cfg, &mac_string(mac))?;
    }
    let now = now_ms();
    vm.state = "destroyed".into();
    vm.state_reason = None;
    vm.destroyed_ms = Some(now);
    vm.modified_ms = now;
    let mut d = Db::from(tx.raw());
    save(&mut d, &vm, false)?;
    let server = vm.server_uuid.clone().unwrap_or_default();
    record(&mut d, &vm, "delete", &[&server])?;
    if vm.container.is_some() {
        record_container(&mut d, &vm, "destroy", None)?;
    }
    Ok(())
}

/// Deletes a container VM and its publish rules (the Docker-implied T5 rules of its spec,
/// whose UUIDs derive from their content) in the caller's transaction.
pub fn remove_container(tx: &mut dyn Txn, cfg: &Config, vm: &Vm) -> Result<(), OpError> {
    use crate::firewall::docker::{publish_rules, ContainerDescription, PortProto};
    if let Some(spec) = &vm.container {
        let exposed = spec
            .exposed
            .iter()
            .filter_map(|e| {
                let (p, proto) = e.split_once('/').unwrap_or((e.as_str(), "tcp"));
                let proto = match proto {
                    "udp" => PortProto::Udp,
                    _ => PortProto::Tcp,
                };
                p.parse::<u16>().ok().map(|p| (proto, p))
            })
            .collect();
        let desc = ContainerDescription {
            uuid: vm.uuid.clone(),
            owner_uuid: vm.owner_uuid.clone(),
            tags: Default::default(),
            published: spec.published.clone(),
            exposed,
            publish_all: spec.publish_all,
        };
        let mut d = Db::from(tx.raw());
        for r in publish_rules(&desc, CONTAINER_FWRULE_VERSION).unwrap_or_default() {
            match super::rules::delete(&mut d, &r.record.uuid) {
                Ok(()) => {}
                Err(OpError::Api(a)) if a.status == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    delete(tx, cfg, &vm.uuid, &mut Params::from_map(Map::new()))
}

/// The fwrule language version containers' publish rules are written in.
pub const CONTAINER_FWRULE_VERSION: u32 = 4;

/// One entry of a state report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    uuid: String,
    state: String,
    reason: Option<String>,
    exit_status: Option<i32>,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
    generation: Option<u64>,
}

/// Keys a report entry may have.
const REPORT_KEYS: &[&str] = &[
    "uuid",
    "state",
    "reason",
    "exit_status",
    "started_at",
    "finished_at",
    "generation",
];

fn reports_param(p: &mut Params) -> Option<Vec<Report>> {
    let raw = p.raw("vms")?.clone();
    let Value::Array(items) = raw else {
        p.invalid(
            "vms",
            "must be an array of {\"uuid\", \"state\", \"reason\"?}",
        );
        return None;
    };
    if items.len() > MAX_REPORT {
        p.invalid("vms", format!("must have at most {MAX_REPORT} entries"));
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        let f = |x: &str| format!("vms[{i}].{x}");
        let Value::Object(o) = it else {
            p.invalid(
                &format!("vms[{i}]"),
                "must be an object {\"uuid\", \"state\", \"reason\"?}",
            );
            return None;
        };
        if let Some(k) = o.keys().find(|k| !REPORT_KEYS.contains(&k.as_str())) {
            p.invalid(
                &format!("vms[{i}]"),
                format!(
                    "unknown key {k:?}: expected one of {}",
                    REPORT_KEYS.join(", ")
                ),
            );
            return None;
        }
        // Integers only: ms since the epoch (from 0 to the year 9999), exit statuses as a
        // process has them (0..=255, or negative for "killed before it ran").
        let int = |k: &str, lo: i64, hi: i64| -> Result<Option<i64>, ()> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => match n.as_i64() {
                    Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
                    _ => Err(()),
                },
                Some(_) => Err(()),
            }
        };
        const MAX_MS: i64 = 253_402_300_799_999;
        let Ok(exit_status) = int("exit_status", -1, 255) else {
            p.invalid(&f("exit_status"), "expected an integer from -1 to 255");
            return None;
        };
        let Ok(started_ms) = int("started_at", 0, MAX_MS) else {
            p.invalid(&f("started_at"), "expected ms since the epoch (an integer)");
            return None;
        };
        let Ok(finished_ms) = int("finished_at", 0, MAX_MS) else {
            p.invalid(
                &f("finished_at"),
                "expected ms since the epoch (an integer)",
            );
            return None;
        };
        let Ok(generation) = int("generation", 0, i64::MAX) else {
            p.invalid(&f("generation"), "expected a non-negative integer");
            return None;
        };
        let Some(uuid) = o.get("uuid").and_then(Value::as_str).and_then(parse_uuid) else {
            p.invalid(&f("uuid"), "expected a VM UUID");
            return None;
        };
        let state = match o.get("state").and_then(Value::as_str) {
            Some(s) if REPORTED_STATES.contains(&s) => s.to_string(),
            _ => {
                p.invalid(&f("state"), "expected running, failed or stopped");
                return None;
            }
        };
        let reason = match o.get("reason") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.chars().count() <= MAX_REASON && !s.contains('\0') => {
                Some(s.clone())
            }
            Some(_) => {
                p.invalid(
                    &f("reason"),
                    format!("expected a string of at most {MAX_REASON} characters"),
                );
                return None;
            }
        };
        out.push(Report {
            uuid,
            state,
            reason,
            exit_status: exit_status.map(|x| x as i32),
            started_ms,
            finished_ms,
            generation: generation.map(|g| g as u64),
        });
    }
    Some(out)
}

/// `POST /servers/:uuid/vm_states`: the agent's report. An entry is applied only when the VM
/// is on this server and not destroyed (else it is listed in `ignored`); only an actual change
/// of state or reason writes the VM and records a `vm` `state` change. A removed server's
/// report is 410 Gone.
///
/// `by_host`: the report comes with the server's host certificate; then a VM that exists on
/// another server refuses the whole report (403 naming it; the transaction rolls back, so
/// nothing is written). Unknown VMs and this server's destroyed ones are still `ignored`.
pub fn report_states(
    tx: &mut dyn Txn,
    cfg: &Config,
    server_uuid: &str,
    p: &mut Params,
    by_host: bool,
) -> Result<Value, OpError> {
    p.allow_only(&["vms"]);
    let reports = reports_param(p);
    let reports = p.require("vms", reports);
    p.finish()?;
    let mut reports = reports.unwrap_or_default();
    // VM locks in UUID order: two reports never wait on each other in a cycle.
    reports.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    reports.dedup_by(|a, b| a.uuid == b.uuid);
    let mut d = Db::from(tx.raw());
    let server = servers::find_member(
        &mut d,
        server_uuid,
        &format!("POST /servers/{server_uuid}/vm_states"),
    )?;
    let mut updated = 0;
    let mut ignored = Vec::new();
    let mut auto_remove = Vec::new();
    for r in reports {
        d.lock(lock_key(LOCK_VM, &r.uuid))?;
        let Some(mut vm) = get(&mut d, &r.uuid)? else {
            ignored.push(r.uuid);
            continue;
        };
        if by_host && vm.server_uuid.as_deref() != Some(server.uuid.as_str()) {
            return Err(super::auth::forbidden(format!(
                "POST /servers/{}/vm_states: VM {} is on server {}, not {}; a host reports \
                 only its own VMs (nothing of this report was written)",
                server.uuid,
                vm.uuid,
                vm.server_uuid.as_deref().unwrap_or("(none)"),
                server.uuid
            ))
            .into());
        }
        if vm.server_uuid.as_deref() != Some(server.uuid.as_str()) || vm.state == "destroyed" {
            ignored.push(r.uuid);
            continue;
        }
        let reason = if r.state == "running" { None } else { r.reason };
        let before = vm.clone();
        let was_running = vm.state == "running";
        vm.state = r.state;
        vm.state_reason = reason;
        if r.exit_status.is_some() {
            vm.exit_status = r.exit_status;
        }
        if r.started_ms.is_some() {
            vm.started_ms = r.started_ms;
        }
        if r.finished_ms.is_some() {
            vm.finished_ms = r.finished_ms;
        }
        if r.generation.is_some() {
            vm.run_generation = r.generation;
        }
        if vm == before {
            continue;
        }
        vm.modified_ms = now_ms();
        save(&mut d, &vm, false)?;
        record(&mut d, &vm, "state", &[&server.uuid])?;
        if vm.container.is_some() {
            let running = vm.state == "running";
            if running && (!was_running || vm.run_generation != before.run_generation) {
                record_container(&mut d, &vm, "start", None)?;
            } else if !running
                && vm.state == "stopped"
                && (was_running
                    || vm.exit_status != before.exit_status
                    || vm.finished_ms != before.finished_ms)
                && vm.exit_status.is_some()
            {
                let detail = json!({ "exit_code": vm.exit_status });
                record_container(&mut d, &vm, "die", Some(&detail))?;
                if vm.container.as_ref().is_some_and(|c| c.auto_remove) {
                    auto_remove.push(vm.clone());
                }
            }
        }
        updated += 1;
    }
    // `--rm`: a container whose process ended goes, with its publish rules, in this
    // transaction (its `destroy` change follows its `die`).
    for vm in auto_remove {
        remove_container(tx, cfg, &vm)?;
    }
    Ok(json!({"updated": updated, "ignored": ignored}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: Value) -> Params {
        Params::from_map(v.as_object().cloned().unwrap())
    }

    fn server(hb: i64) -> Server {
        Server {
            uuid: "564d1a4c-0000-4000-8000-000000000001".into(),
            hostname: "h".into(),
            underlay_ip: "192.168.77.1".parse().unwrap(),
            last_heartbeat_ms: Some(hb),
            created_ms: 0,
            removed_ms: None,
        }
    }

    #[test]
    fn state_reads_unknown_when_the_server_is_silent_or_gone() {
        let s = server(1_000);
        assert_eq!(
            effective_state("running", Some(&s), 5_000, 11_000),
            "running"
        );
        assert_eq!(
            effective_state("running", Some(&s), 13_000, 11_000),
            "unknown"
        );
        assert_eq!(effective_state("provisioning", None, 0, 11_000), "unknown");
        assert_eq!(effective_state("failed", None, 0, 11_000), "failed");
        assert_eq!(
            effective_state("destroyed", Some(&s), 99_000, 11_000),
            "destroyed"
        );
    }

    #[test]
    fn aliases() {
        assert!(valid_alias("web-1.a_b"));
        assert!(!valid_alias("-web"));
        assert!(!valid_alias(""));
        assert!(!valid_alias("a b"));
        assert!(!valid_alias(&"a".repeat(MAX_ALIAS + 1)));
    }

    #[test]
    fn networks_forms_and_primary() {
        let n = "6a3e1cf4-8fb5-4c4b-9a51-8f1e2d1c0b0a";
        let mut p = params(json!({"networks": [n, {"uuid": n, "ip": "10.0.0.5"}]}));
        let v = networks_param(&mut p, false).unwrap();
        assert!(!p.has_errors());
        assert!(v[0].primary && !v[1].primary);
        assert_eq!(v[1].ip, Some("10.0.0.5".parse().unwrap()));
        let mut p = params(json!({"networks": [{"uuid": n}, {"uuid": n, "primary": true}]}));
        let v = networks_param(&mut p, false).unwrap();
        assert!(!v[0].primary && v[1].primary);
        for bad in [
            json!({"networks": []}),
            json!({"networks": [{"uuid": n, "primary": true}, {"uuid": n, "primary": true}]}),
            json!({"networks": [{"uuid": "nope"}]}),
            json!({"networks": [{"uuid": n, "ip": "10.0.0.300"}]}),
            json!({"networks": [{"uuid": n, "vlan": 3}]}),
            json!({"networks": [{}]}),
            json!({"networks": "x"}),
        ] {
            let mut p = params(bad.clone());
            assert_eq!(networks_param(&mut p, false), None, "{bad}");
            assert!(p.has_errors(), "{bad}");
        }
    }

    #[test]
    fn tags_accept_scalars_only() {
        let mut p = params(json!({"tags": {"role": "web", "n": 3, "on": true}}));
        assert_eq!(tags_param(&mut p).unwrap().len(), 3);
        for bad in [
            json!({"tags": {"a": null}}),
            json!({"tags": {"a": [1]}}),
            json!({"tags": []}),
        ] {
            let mut p = params(bad.clone());
            assert_eq!(tags_param(&mut p), None, "{bad}");
            assert!(p.has_errors());
        }
    }

    #[test]
    fn reports_validate() {
        let u = "11111111-0000-4000-8000-000000000001";
        let mut p = params(json!({"vms": [{"uuid": u, "state": "failed", "reason": "x"}]}));
        let r = reports_param(&mut p).unwrap();
        assert_eq!(r[0].reason.as_deref(), Some("x"));
        for bad in [
            json!({"vms": [{"uuid": u, "state": "destroyed"}]}),
            json!({"vms": [{"uuid": "x", "state": "running"}]}),
            json!({"vms": [{"uuid": u, "state": "running", "extra": 1}]}),
            json!({"vms": {}}),
        ] {
            let mut p = params(bad.clone());
            assert_eq!(reports_param(&mut p), None, "{bad}");
        }
    }

    #[test]
    fn signals_take_the_sig_prefix() {
        for (i, o) in [
            ("SIGKILL", "SIGKILL"),
            ("KILL", "SIGKILL"),
            ("kill", "SIGKILL"),
            ("9", "SIGKILL"),
            ("SIGHUP", "SIGHUP"),
            ("15", "SIGTERM"),
            ("usr1", "SIGUSR1"),
        ] {
            assert_eq!(parse_signal(i).as_deref(), Some(o), "{i}");
        }
        for bad in ["", "SIG", "FOO", "0", "99", "1234", "-9", "SIGKILLX"] {
            assert_eq!(parse_signal(bad), None, "{bad}");
        }
    }

    fn vm(state: &str) -> Vm {
        Vm {
            uuid: "11111111-0000-4000-8000-000000000001".into(),
            alias: None,
            owner_uuid: "22222222-0000-4000-8000-000000000001".into(),
            server_uuid: None,
            brand: "joyent-minimal".into(),
            state: state.into(),
            desired_state: "stopped".into(),
            state_reason: None,
            tags: Map::new(),
            firewall_enabled: true,
            nics: Vec::new(),
            created_ms: 0,
            modified_ms: 0,
            destroyed_ms: None,
            container: None,
            generation: 0,
            signal: None,
            stop_timeout: None,
            exit_status: None,
            started_ms: None,
            finished_ms: None,
            run_generation: None,
        }
    }

    #[test]
    fn actions_follow_the_state_model() {
        let mut v = vm("stopped");
        apply_action(&mut v, &Action::Start);
        assert_eq!((v.desired_state.as_str(), v.generation), ("running", 1));
        // Starting again before the agent reported does not double the generation only if
        // it is running; a VM still stopped gets another (the agent starts the newest).
        v.state = "running".into();
        apply_action(&mut v, &Action::Start);
        assert_eq!(v.generation, 1);
        apply_action(&mut v, &Action::Stop(Some(1)));
        assert_eq!(
            (v.desired_state.as_str(), v.stop_timeout),
            ("stopped", Some(1))
        );
        apply_action(&mut v, &Action::Reboot(None));
        assert_eq!(
            (v.desired_state.as_str(), v.generation, v.stop_timeout),
            ("running", 2, None)
        );
        apply_action(&mut v, &Action::Kill("SIGKILL".into()));
        apply_action(&mut v, &Action::Kill("SIGHUP".into()));
        assert_eq!(
            v.signal,
            Some(SignalRequest {
                id: 2,
                signal: "SIGHUP".into()
            })
        );
        assert_eq!(v.desired_state, "running", "kill leaves the desired state");
    }

    #[test]
    fn reports_carry_exit_status_times_and_generation() {
        let u = "11111111-0000-4000-8000-000000000001";
        let mut p = params(
            json!({"vms": [{"uuid": u, "state": "stopped", "exit_status": 137,
            "started_at": 1_700_000_000_000i64, "finished_at": 1_700_000_001_000i64,
            "generation": 3}]}),
        );
        let r = reports_param(&mut p).unwrap();
        assert_eq!(r[0].exit_status, Some(137));
        assert_eq!(r[0].finished_ms, Some(1_700_000_001_000));
        assert_eq!(r[0].generation, Some(3));
        for bad in [
            json!({"vms": [{"uuid": u, "state": "stopped", "exit_status": "1"}]}),
            json!({"vms": [{"uuid": u, "state": "stopped", "exit_status": 256}]}),
            json!({"vms": [{"uuid": u, "state": "stopped", "started_at": 1.5}]}),
            json!({"vms": [{"uuid": u, "state": "stopped", "finished_at": -1}]}),
            json!({"vms": [{"uuid": u, "state": "running", "generation": -1}]}),
        ] {
            let mut p = params(bad.clone());
            assert_eq!(reports_param(&mut p), None, "{bad}");
            assert!(p.has_errors(), "{bad}");
        }
    }

    #[test]
    fn container_param_is_checked() {
        let mut p = params(json!({"container": {"cmd": ["sh"], "uid_base": 0}}));
        assert_eq!(container_param(&mut p), None);
        assert!(p.has_errors());
        let mut p = params(json!({"container": {"cmd": ["sh"], "uid_base": 1 << 20,
            "working_dir": "/"}}));
        assert!(container_param(&mut p).is_some());
        assert!(!p.has_errors());
        let mut p = params(json!({"container": [1]}));
        assert_eq!(container_param(&mut p), None);
        assert!(p.has_errors());
    }

    #[test]
    fn old_vm_documents_read_with_defaults() {
        let mut v = serde_json::to_value(vm("running")).unwrap();
        for k in [
            "container",
            "generation",
            "signal",
            "exit_status",
            "run_generation",
        ] {
            v.as_object_mut().unwrap().remove(k);
        }
        let back: Vm = serde_json::from_value(v).unwrap();
        assert_eq!(back.generation, 0);
        assert_eq!(back.container, None);
    }

    #[test]
    fn nic_errors_name_the_network() {
        let e = nic_error(ApiError::invalid("network_uuid", "x").into(), 2);
        let OpError::Api(a) = e else { panic!() };
        assert_eq!(a.errors[0].field, json!("networks[2].uuid"));
    }
}
