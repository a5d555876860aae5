//! `POST /containers/create[?name=]`: a VM with a container spec, in one transaction.
//!
//! The body is checked against the allow-list ([`super::validate`]); the image is resolved in
//! the account's image store (unknown: moby's 404 `No such image: busybox:latest`, which makes
//! the CLI pull); the spec is the request merged with the image's config as moby merges it;
//! the network is `HostConfig.NetworkMode` (default: the account's default network) resolved
//! among the networks the account sees. A network that does not exist does not fail the
//! create (moby 20.10 fails at `start`): the VM is created without NICs and carries the name
//! in its tag [`PENDING_NETWORK`]. The VM is placed by control's one placement function
//! (`vms::create`), firewall-enabled and tagged `sdc_docker`; the account's T3/T4 rules (once),
//! the global echo rule (once per cluster) and the container's publish rules are written in the
//! same transaction.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::super::accounts::{self, Account};
use super::super::api::{Ctx, Reply};
use super::super::error;
use super::super::images::{self, ImageError};
use super::super::networks::{self as dnet, Lookup};
use super::validate::{self, CreateRequest};
use crate::control::container_spec::{ContainerSpec, DEFAULT_PIDS_LIMIT};
use crate::control::db::Db;
use crate::control::error::OpError;
use crate::control::params::Params;
use crate::control::{rules, vms};
use crate::firewall::docker::{self as fwd, ContainerDescription, ImpliedRule, PortProto};
use axum::http::StatusCode;
use portolan::store::Txn;

/// VM tag naming a network the container asked for that did not exist at create.
pub const PENDING_NETWORK: &str = "docker:pending_network";
/// VM tag with the `--ip` asked for on the pending network.
pub const PENDING_IP: &str = "docker:pending_ip";
/// VM tag with `HostConfig.NetworkMode` as given (what inspect shows).
pub const NETWORK_MODE: &str = "docker:network_mode";
/// Prefix of the VM tags that carry the IPv4 address asked for on a network
/// (`docker:ip:<network uuid>`: inspect's `IPAMConfig`).
pub const IP_TAG: &str = "docker:ip:";
/// Prefix of the VM tags that carry the container's labels.
pub const LABEL_TAG: &str = "docker:label:";
/// Language version the publish rules are written in.
pub const FWRULE_VERSION: u32 = vms::CONTAINER_FWRULE_VERSION;
/// The default of `docker stop`'s timeout.
pub const DEFAULT_STOP_TIMEOUT: u32 = 10;
/// The PATH a container gets when its image sets none (moby's `DefaultPathEnv`).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const ADJECTIVES: &[&str] = &[
    "admiring",
    "brave",
    "clever",
    "dazzling",
    "eager",
    "focused",
    "gallant",
    "happy",
    "jolly",
    "keen",
    "loving",
    "modest",
    "nifty",
    "optimistic",
    "peaceful",
    "quirky",
    "relaxed",
    "serene",
    "trusting",
    "upbeat",
    "vibrant",
    "wizardly",
    "youthful",
    "zealous",
];
const SURNAMES: &[&str] = &[
    "albattani",
    "babbage",
    "curie",
    "dijkstra",
    "euclid",
    "feynman",
    "goldberg",
    "hopper",
    "johnson",
    "knuth",
    "lamport",
    "lovelace",
    "mccarthy",
    "noether",
    "pike",
    "ritchie",
    "shannon",
    "thompson",
    "turing",
    "villani",
    "wozniak",
    "yalow",
    "zhukovsky",
    "cantrill",
];

fn random_bytes<const N: usize>() -> Result<[u8; N], OpError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| OpError::Corrupt(format!("random: {e}")))?;
    Ok(b)
}

/// A new container ID: 64 random hex digits.
pub fn new_id() -> Result<String, OpError> {
    Ok(random_bytes::<32>()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A generated `adjective_surname` name not used by the account (a number appended after a
/// few tries, as moby does).
fn generated_name(db: &mut Db<'_>, owner: &str) -> Result<String, OpError> {
    for attempt in 0..10u32 {
        let r = random_bytes::<2>()?;
        let mut n = format!(
            "{}_{}",
            ADJECTIVES[r[0] as usize % ADJECTIVES.len()],
            SURNAMES[r[1] as usize % SURNAMES.len()]
        );
        if attempt >= 3 {
            n.push_str(&(u32::from(r[0]) % 10).to_string());
        }
        if vms::alias_taken(db, owner, &n, None)?.is_none() {
            return Ok(n);
        }
    }
    Ok(format!("container_{}", &new_id()?[..12]))
}

/// moby's 409 for a name in use.
pub fn name_conflict(name: &str, id: &str) -> OpError {
    error::conflict(format!(
        "Conflict. The container name \"/{name}\" is already in use by container \"{id}\". You have to remove (or rename) that container to be able to reuse that name."
    ))
}

/// The image config's `config` object (moby's `ContainerConfig` of the image).
fn image_conf(img: &images::ImageRow) -> Map<String, Value> {
    img.config_json()
        .get("config")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// The parts of a container spec that come from the request merged with the image config,
/// as moby's `merge` does: entrypoint and cmd (an entrypoint given at create drops the
/// image's cmd), env (the create's first, then the image's keys it did not set), working
/// directory, user, exposed ports, labels, stop signal.
pub fn merge(req: &CreateRequest, conf: &Map<String, Value>) -> ContainerSpec {
    let mut entrypoint = req.entrypoint.clone().unwrap_or_default();
    let mut cmd = req.cmd.clone().unwrap_or_default();
    if entrypoint.is_empty() {
        if cmd.is_empty() {
            cmd = str_list(conf.get("Cmd"));
        }
        if req.entrypoint.is_none() {
            entrypoint = str_list(conf.get("Entrypoint"));
        }
    }
    let mut env = req.env.clone();
    for e in str_list(conf.get("Env")) {
        let k = e.split('=').next().unwrap_or("");
        if !env.iter().any(|u| u.split('=').next() == Some(k)) {
            env.push(e);
        }
    }
    let working_dir = if req.working_dir.is_empty() {
        conf.get("WorkingDir")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    } else {
        req.working_dir.clone()
    };
    let user = if req.user.is_empty() {
        conf.get("User")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    } else {
        req.user.clone()
    };
    let mut exposed: Vec<String> = req.exposed.clone();
    if let Some(Value::Object(e)) = conf.get("ExposedPorts") {
        for k in e.keys() {
            if let Ok((p, proto)) = validate::parse_port(k) {
                let key = validate::port_key(p, proto);
                if !exposed.contains(&key) {
                    exposed.push(key);
                }
            }
        }
    }
    exposed.sort();
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    if let Some(Value::Object(l)) = conf.get("Labels") {
        for (k, v) in l {
            if let Some(v) = v.as_str() {
                labels.insert(k.clone(), v.to_string());
            }
        }
    }
    labels.extend(req.labels.clone());
    let stop_signal = req
        .stop_signal
        .clone()
        .or_else(|| {
            conf.get("StopSignal")
                .and_then(Value::as_str)
                .and_then(vms::parse_signal)
        })
        .unwrap_or_else(|| "SIGTERM".into());
    ContainerSpec {
        entrypoint,
        cmd,
        env,
        working_dir,
        user,
        tty: req.tty,
        open_stdin: req.open_stdin,
        stdin_once: req.stdin_once,
        labels,
        exposed,
        published: req.published.clone(),
        publish_all: req.publish_all,
        auto_remove: req.auto_remove,
        stop_signal,
        stop_timeout: req.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT),
        pids_limit: DEFAULT_PIDS_LIMIT,
        dns: req.dns.clone(),
        ..ContainerSpec::default()
    }
}

/// What the firewall policy needs of a container.
pub fn description(vm_uuid: &str, owner: &str, spec: &ContainerSpec) -> ContainerDescription {
    ContainerDescription {
        uuid: vm_uuid.to_string(),
        owner_uuid: owner.to_string(),
        tags: BTreeMap::new(),
        published: spec.published.clone(),
        exposed: spec
            .exposed
            .iter()
            .filter_map(|e| validate::parse_port(e).ok())
            .map(|(p, proto)| (proto, p))
            .collect::<Vec<(PortProto, u16)>>(),
        publish_all: spec.publish_all,
    }
}

/// The container's publish rules (T5), or the 400 refusing them (`-p 8080:80`).
pub fn publish_rules(
    vm_uuid: &str,
    owner: &str,
    spec: &ContainerSpec,
) -> Result<Vec<ImpliedRule>, OpError> {
    fwd::publish_rules(&description(vm_uuid, owner, spec), FWRULE_VERSION)
        .map_err(|e| error::bad_request(e.to_string()))
}

/// Stores `r` through control's rules code unless a rule with its (content-derived) UUID
/// exists.
fn ensure_rule(db: &mut Db<'_>, r: &ImpliedRule) -> Result<(), OpError> {
    match rules::find(db, &r.record.uuid) {
        Ok(_) => return Ok(()),
        Err(OpError::Api(a)) if a.status == 404 => {}
        Err(e) => return Err(e),
    }
    let mut m = Map::new();
    m.insert("uuid".into(), json!(r.record.uuid));
    m.insert("rule".into(), json!(r.record.rule));
    m.insert("enabled".into(), json!(r.record.enabled));
    if r.record.global {
        m.insert("global".into(), json!(true));
    } else if let Some(o) = &r.record.owner_uuid {
        m.insert("owner_uuid".into(), json!(o));
    }
    m.insert("created_by".into(), json!("docker"));
    rules::create(db, &mut Params::from_map(m))?;
    Ok(())
}

/// A network of `account` by Docker name or ID: `None` when it does not exist (moby's
/// create does not fail on it), `Err` when the term is ambiguous.
pub fn resolve_network(
    db: &mut Db<'_>,
    account: &Account,
    term: &str,
) -> Result<Option<dnet::Net>, OpError> {
    let nets = dnet::visible(db, account)?;
    match dnet::resolve(nets, term, Lookup::Daemon) {
        Ok(n) => Ok(Some(n)),
        Err(OpError::Api(a)) if a.status == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// `POST /containers/create`.
pub fn create(
    tx: &mut dyn Txn,
    c: &Ctx<'_>,
    body: &Value,
    name: Option<&str>,
) -> Result<Reply, OpError> {
    let account = c.account;
    let cfg = &c.docker.app.cfg;
    let req = validate::parse(body)?;
    let name = name
        .filter(|n| !n.is_empty())
        .map(validate::check_name)
        .transpose()?;
    let mut d = Db::from(tx.raw());
    let img = match images::resolve(&mut d, &account.uuid, &req.image) {
        Ok(i) => i,
        Err(e @ ImageError::NotFound(_)) => return Err(error::not_found(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    let conf = image_conf(&img);
    let mut spec = merge(&req, &conf);
    if spec.argv().is_empty() {
        return Err(error::bad_request("No command specified"));
    }
    if !spec.user.is_empty()
        && !spec
            .user
            .split(':')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(error::bad_request(format!(
            "the image's User {:?}: only a numeric uid[:gid] is supported",
            spec.user
        )));
    }
    if !spec.env.iter().any(|e| e.starts_with("PATH=")) {
        spec.env.push(DEFAULT_PATH.into());
    }
    if spec.working_dir.is_empty() {
        spec.working_dir = "/".into();
    }
    let id = new_id()?;
    let vm_uuid = super::lookup::vm_uuid(&id).ok_or_else(|| OpError::Corrupt("id".into()))?;
    spec.id = id.clone();
    spec.image = req.image.clone();
    spec.image_id = img.id.clone();
    spec.layers = img.layers.iter().map(|b| b.digest.clone()).collect();
    spec.hostname = if req.hostname.is_empty() {
        id[..12].to_string()
    } else {
        req.hostname.clone()
    };
    spec.uid_base = accounts::uid_base(&mut d, &account.uuid)?;
    spec.check().map_err(error::bad_request)?;
    let rules = publish_rules(&vm_uuid, &account.uuid, &spec)?;
    // The name, under the owner's lock (vms::create checks again, as the backstop).
    d.lock(crate::control::db::lock_key(
        crate::control::db::LOCK_OWNER,
        &account.uuid,
    ))?;
    let name = match name {
        Some(n) => {
            if let Some(other) = vms::alias_taken(&mut d, &account.uuid, &n, None)? {
                let other_id = vms::get(&mut d, &other)?
                    .and_then(|v| v.container.map(|c| c.id))
                    .unwrap_or(other);
                return Err(name_conflict(&n, &other_id));
            }
            n
        }
        None => generated_name(&mut d, &account.uuid)?,
    };
    // The network.
    let mode = req.network_mode.clone();
    let mut tags = Map::new();
    tags.insert("sdc_docker".into(), json!(true));
    tags.insert(NETWORK_MODE.into(), json!(mode));
    for (k, v) in &spec.labels {
        let key = format!("{LABEL_TAG}{k}");
        if key.len() <= 128 && v.chars().count() <= 1024 {
            tags.insert(key, json!(v));
        }
    }
    let term = match mode.as_str() {
        "" | "default" | "bridge" => None,
        m => Some(m.to_string()),
    };
    let ip = match &req.endpoint {
        Some((n, ip)) if term.as_deref().is_none_or(|t| t == n) || n == "bridge" => *ip,
        Some((n, _)) => {
            return Err(error::bad_request(format!(
                "Container cannot be connected to network endpoints: {n} (it is on {})",
                term.as_deref().unwrap_or("the default network")
            )))
        }
        None => None,
    };
    let mut networks = Vec::new();
    match term {
        None => match &account.default_network {
            Some(u) => {
                if let Some(ip) = ip {
                    tags.insert(format!("{IP_TAG}{u}"), json!(ip.to_string()));
                }
                networks.push(json!({"uuid": u, "ip": ip.map(|i| i.to_string())}))
            }
            None => {
                return Err(error::err(
                    500,
                    format!("account {} has no default network", account.login),
                ))
            }
        },
        Some(t) if t == "none" => {}
        Some(t) => match resolve_network(&mut d, account, &t)? {
            Some(n) => match &n.uuid {
                Some(u) => {
                    if let Some(ip) = ip {
                        tags.insert(format!("{IP_TAG}{u}"), json!(ip.to_string()));
                    }
                    networks.push(json!({"uuid": u, "ip": ip.map(|i| i.to_string())}))
                }
                None if n.name == "none" => {}
                None => {
                    return Err(error::bad_request(format!(
                        "network {} cannot be used by fabric containers",
                        n.name
                    )))
                }
            },
            None => {
                tags.insert(PENDING_NETWORK.into(), json!(t));
                if let Some(ip) = ip {
                    tags.insert(PENDING_IP.into(), json!(ip.to_string()));
                }
            }
        },
    }
    let mut p = Map::new();
    p.insert("owner_uuid".into(), json!(account.uuid));
    p.insert("uuid".into(), json!(vm_uuid));
    p.insert("alias".into(), json!(name));
    p.insert("brand".into(), json!("lx"));
    p.insert("tags".into(), Value::Object(tags));
    p.insert("firewall_enabled".into(), json!(true));
    // The networks were resolved for this account above (its own, or shared with everyone).
    p.insert("check_owner".into(), json!(false));
    p.insert("networks".into(), Value::Array(networks));
    p.insert("container".into(), serde_json::to_value(&spec)?);
    vms::create(tx, cfg, &mut Params::from_map(p)).map_err(|e| match e {
        OpError::Api(mut a) if a.status < 500 => {
            // Name the field as the restify error does, in one line.
            if let Some(fe) = a.errors.first() {
                if !a.message.contains(&fe.message) {
                    a.message = format!("{}: {}", a.message, fe.message);
                }
            }
            a.code = "DockerError";
            if a.status == 422 {
                a.status = 400;
            }
            OpError::Api(a)
        }
        e => e,
    })?;
    let mut d = Db::from(tx.raw());
    for r in fwd::account_rules(&account.uuid)
        .iter()
        .chain(fwd::global_rules().iter())
        .chain(rules.iter())
    {
        ensure_rule(&mut d, r)?;
    }
    Ok(Reply::Json(
        StatusCode::CREATED,
        json!({"Id": id, "Warnings": []}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn merge_as_moby() {
        let image = conf(json!({
            "Cmd": ["sh"], "Entrypoint": null, "Env": ["PATH=/bin", "A=1"],
            "WorkingDir": "/w", "ExposedPorts": {"80/tcp": {}}, "Labels": {"x": "1"},
            "StopSignal": "SIGQUIT", "User": "5"
        }));
        let s = merge(&CreateRequest::default(), &image);
        assert_eq!(s.argv(), vec!["sh"]);
        assert_eq!(s.env, vec!["PATH=/bin", "A=1"]);
        assert_eq!(s.working_dir, "/w");
        assert_eq!(s.exposed, vec!["80/tcp"]);
        assert_eq!(s.stop_signal, "SIGQUIT");
        assert_eq!(s.user, "5");
        assert_eq!(s.stop_timeout, DEFAULT_STOP_TIMEOUT);

        let req = CreateRequest {
            cmd: Some(vec!["echo".into(), "hi".into()]),
            env: vec!["A=2".into()],
            labels: BTreeMap::from([("y".to_string(), "2".to_string())]),
            exposed: vec!["53/udp".into()],
            ..Default::default()
        };
        let s = merge(&req, &image);
        assert_eq!(s.argv(), vec!["echo", "hi"]);
        assert_eq!(s.env, vec!["A=2", "PATH=/bin"]);
        assert_eq!(s.labels.len(), 2);
        assert_eq!(s.exposed, vec!["53/udp", "80/tcp"]);

        // An entrypoint at create drops the image's cmd.
        let image = conf(json!({"Cmd": ["-c", "x"], "Entrypoint": ["/bin/sh"]}));
        let req = CreateRequest {
            entrypoint: Some(vec!["/bin/echo".into()]),
            ..Default::default()
        };
        assert_eq!(merge(&req, &image).argv(), vec!["/bin/echo"]);
        // An empty entrypoint clears the image's, keeps its cmd.
        let req = CreateRequest {
            entrypoint: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(merge(&req, &image).argv(), vec!["-c", "x"]);
        // Neither: the image's both.
        assert_eq!(
            merge(&CreateRequest::default(), &image).argv(),
            vec!["/bin/sh", "-c", "x"]
        );
    }

    #[test]
    fn ids_and_names() {
        let id = new_id().unwrap();
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, new_id().unwrap());
        assert!(name_conflict("web", "abc").into_api().message.starts_with(
            "Conflict. The container name \"/web\" is already in use by container \"abc\"."
        ));
    }

    #[test]
    fn remapping_is_refused() {
        let spec = ContainerSpec {
            published: vec![fwd::PortBinding {
                port: 80,
                proto: PortProto::Tcp,
                host_port: Some(8080),
                host_ip: None,
            }],
            ..Default::default()
        };
        let e = publish_rules("11111111-0000-4000-8000-000000000001", "o", &spec)
            .unwrap_err()
            .into_api();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("remapping"), "{}", e.message);
    }
}
