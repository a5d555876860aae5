//! `GET /containers/json` (`docker ps`) and `GET /containers/{id}/json` (`docker inspect`) in
//! moby 20.10's shapes, derived from the VM.
//!
//! The Docker state comes from the VM's state as read now (`vms::effective_state`): `running`
//! is `running` (the only state `docker ps` shows as `Up`); `stopped`/`provisioning` are
//! `created` when the container never started (no start reported) and `exited` otherwise;
//! `failed` is `exited` with the agent's reason in `State.Error`; `unknown` (its host has not
//! heartbeat within the bound, or was removed) is `dead` with `State.Error` saying so: never
//! silently running, and `docker ps` (without `-a`) leaves it out. `Node` names the server the
//! container was placed on (beyond moby; the CLI ignores it).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::super::accounts::Account;
use super::super::error;
use super::super::filters::Filters;
use super::super::networks as dnet;
use super::create::{NETWORK_MODE, PENDING_NETWORK};
use super::lookup::{self, Found};
use super::validate;
use crate::control::db::Db;
use crate::control::error::OpError;
use crate::control::nics::mac_string;
use crate::control::servers::{self, now_ms, Server};
use crate::control::time::rfc3339_from_ms;
use crate::control::{vms, Config};
use crate::firewall::docker::PortProto;

/// Go's zero time as moby prints it.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A container's state as Docker shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerState {
    /// `created`, `running`, `exited`, `dead`.
    pub status: &'static str,
    /// Exit code of the last process (0 when none ended).
    pub exit_code: i32,
    /// Why it is not running when that is not its own doing.
    pub error: String,
    /// Start of the last process, ms.
    pub started_ms: Option<i64>,
    /// End of the last process, ms.
    pub finished_ms: Option<i64>,
}

impl DockerState {
    /// Running (only then is it `Up`).
    pub fn running(&self) -> bool {
        self.status == "running"
    }
}

/// The Docker state of a VM whose state reads `effective` now.
pub fn docker_state(vm: &vms::Vm, effective: &str) -> DockerState {
    let ever_started = vm.started_ms.is_some();
    let (status, error) = match effective {
        "running" => ("running", String::new()),
        "unknown" => (
            "dead",
            format!(
                "host {} has not reported within the heartbeat bound: the container's state is unknown",
                vm.server_uuid.as_deref().unwrap_or("(none)")
            ),
        ),
        "failed" => ("exited", vm.state_reason.clone().unwrap_or_default()),
        _ if ever_started => ("exited", String::new()),
        _ => ("created", String::new()),
    };
    let exit_code = match (status, vm.exit_status) {
        ("running", _) | ("created", _) => 0,
        ("exited", None) if !error.is_empty() => 127,
        (_, Some(c)) => c,
        _ => 0,
    };
    DockerState {
        status,
        exit_code,
        error,
        started_ms: vm.started_ms,
        finished_ms: if status == "running" {
            None
        } else {
            vm.finished_ms
        },
    }
}

/// Go's `units.HumanDuration`, what `docker ps` prints.
pub fn human_duration(ms: i64) -> String {
    let secs = ms.max(0) / 1000;
    if secs < 1 {
        return "Less than a second".into();
    }
    if secs == 1 {
        return "1 second".into();
    }
    if secs < 60 {
        return format!("{secs} seconds");
    }
    let minutes = secs / 60;
    if minutes == 1 {
        return "About a minute".into();
    }
    if minutes < 60 {
        return format!("{minutes} minutes");
    }
    let hours = (ms.max(0) as f64 / 3_600_000.0 + 0.5) as i64;
    if hours == 1 {
        return "About an hour".into();
    }
    if hours < 48 {
        return format!("{hours} hours");
    }
    if hours < 24 * 7 * 2 {
        return format!("{} days", hours / 24);
    }
    if hours < 24 * 30 * 2 {
        return format!("{} weeks", hours / 24 / 7);
    }
    if hours < 24 * 365 * 2 {
        return format!("{} months", hours / 24 / 30);
    }
    format!("{} years", ms / 3_600_000 / 24 / 365)
}

/// `docker ps`'s Status column: `Up 3 seconds`, `Exited (3) 2 seconds ago`, `Created`, `Dead`.
pub fn status_text(s: &DockerState, now: i64) -> String {
    match s.status {
        "running" => format!("Up {}", human_duration(now - s.started_ms.unwrap_or(now))),
        "exited" => match s.finished_ms {
            Some(f) => format!("Exited ({}) {} ago", s.exit_code, human_duration(now - f)),
            None => format!("Exited ({})", s.exit_code),
        },
        "dead" => "Dead".into(),
        _ => "Created".into(),
    }
}

fn time_or_zero(ms: Option<i64>) -> String {
    ms.map_or_else(|| ZERO_TIME.to_string(), rfc3339_from_ms)
}

/// The container's published (port, proto): `-p` bindings, and every exposed port with `-P`.
pub fn published(f: &Found) -> Vec<(u16, PortProto)> {
    let mut out: Vec<(u16, PortProto)> =
        f.spec.published.iter().map(|b| (b.port, b.proto)).collect();
    if f.spec.publish_all {
        for e in &f.spec.exposed {
            if let Ok(p) = validate::parse_port(e) {
                out.push(p);
            }
        }
    }
    out.sort_by_key(|(p, proto)| (*p, *proto as u8));
    out.dedup();
    out
}

struct Endpoint {
    /// The IPv4 address asked for (`--ip`), if one was.
    asked_ip: Option<String>,
    net_name: String,
    net_id: String,
    ip: String,
    prefix: u8,
    gateway: String,
    mac: String,
    endpoint_id: String,
}

/// The endpoint ID of a container's NIC: stable, 64 hex (sha256 of VM and MAC).
pub fn endpoint_id(vm_uuid: &str, mac: u64) -> String {
    crate::pki::ca::hex(&crate::pki::sha256(
        format!("fabric endpoint {vm_uuid} {mac:012x}").as_bytes(),
    ))
}

fn endpoints(db: &mut Db<'_>, vm: &vms::Vm) -> Result<Vec<Endpoint>, OpError> {
    let mut out = Vec::new();
    for (_, nic, net) in vms::vm_nics(db, vm)? {
        let Some(nu) = &nic.network_uuid else {
            continue;
        };
        let (name, id) = match dnet::by_uuid(db, nu)? {
            Some(n) => (n.name.clone(), n.id.clone()),
            None => (
                net.as_ref().map(|n| n.name.clone()).unwrap_or_default(),
                dnet::docker_id(nu),
            ),
        };
        let asked_ip = vm
            .tags
            .get(&format!("{}{nu}", super::create::IP_TAG))
            .and_then(Value::as_str)
            .map(str::to_string);
        out.push(Endpoint {
            asked_ip,
            net_name: name,
            net_id: id,
            ip: nic.ip.map(|i| i.to_string()).unwrap_or_default(),
            prefix: net.as_ref().map_or(0, |n| n.prefix),
            gateway: net
                .as_ref()
                .and_then(|n| n.gateway)
                .map(|g| g.to_string())
                .unwrap_or_default(),
            mac: mac_string(nic.mac),
            endpoint_id: endpoint_id(&vm.uuid, nic.mac),
        });
    }
    Ok(out)
}

fn server_of(db: &mut Db<'_>, vm: &vms::Vm) -> Result<Option<Server>, OpError> {
    match &vm.server_uuid {
        Some(s) => servers::get(db, s),
        None => Ok(None),
    }
}

/// The state of a container as read now.
pub fn state_now(db: &mut Db<'_>, cfg: &Config, vm: &vms::Vm) -> Result<DockerState, OpError> {
    let server = server_of(db, vm)?;
    let removed = server.as_ref().is_some_and(Server::is_removed);
    let eff = if removed {
        "unknown"
    } else {
        vms::effective_state(
            &vm.state,
            server.as_ref(),
            now_ms(),
            cfg.heartbeat_lifetime_ms(),
        )
    };
    Ok(docker_state(vm, eff))
}

/// `GET /containers/{id}/json`.
pub fn inspect(
    db: &mut Db<'_>,
    cfg: &Config,
    account: &Account,
    term: &str,
) -> Result<Value, OpError> {
    let f = lookup::find(db, account, term)?;
    let server = server_of(db, &f.vm)?;
    let st = state_now(db, cfg, &f.vm)?;
    let spec = &f.spec;
    let eps = endpoints(db, &f.vm)?;
    let mut networks = Map::new();
    for e in &eps {
        networks.insert(
            e.net_name.clone(),
            json!({
                "IPAMConfig": e.asked_ip.as_ref().map(|ip| json!({"IPv4Address": ip})),
                "Links": null,
                "Aliases": [&spec.id[..12]],
                "NetworkID": e.net_id,
                "EndpointID": e.endpoint_id,
                "Gateway": e.gateway,
                "IPAddress": e.ip,
                "IPPrefixLen": e.prefix,
                "IPv6Gateway": "",
                "GlobalIPv6Address": "",
                "GlobalIPv6PrefixLen": 0,
                "MacAddress": e.mac,
                "DriverOpts": null
            }),
        );
    }
    let pubs = published(&f);
    let mut ports = Map::new();
    for e in &spec.exposed {
        ports.insert(e.clone(), Value::Null);
    }
    for (p, proto) in &pubs {
        ports.insert(
            validate::port_key(*p, *proto),
            json!([{"HostIp": "0.0.0.0", "HostPort": p.to_string()}]),
        );
    }
    let mut bindings = Map::new();
    for b in &spec.published {
        let key = validate::port_key(b.port, b.proto);
        let entry = json!({"HostIp": b.host_ip.clone().unwrap_or_default(),
            "HostPort": b.host_port.map(|h| h.to_string()).unwrap_or_default()});
        match bindings.get_mut(&key) {
            Some(Value::Array(a)) => a.push(entry),
            _ => {
                bindings.insert(key, json!([entry]));
            }
        }
    }
    let mode =
        f.vm.tags
            .get(NETWORK_MODE)
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .unwrap_or("default");
    let exposed: Map<String, Value> = spec
        .exposed
        .iter()
        .map(|e| (e.clone(), json!({})))
        .collect();
    let first = eps.first();
    let (path, args) = match spec.argv().split_first() {
        Some((p, rest)) => (p.clone(), rest.to_vec()),
        None => (String::new(), Vec::new()),
    };
    let env: Vec<&String> = spec.env.iter().collect();
    Ok(json!({
        "Id": spec.id,
        "Created": rfc3339_from_ms(f.vm.created_ms),
        "Path": path,
        "Args": args,
        "State": {
            "Status": st.status,
            "Running": st.running(),
            "Paused": false,
            "Restarting": false,
            "OOMKilled": false,
            "Dead": st.status == "dead",
            "Pid": 0,
            "ExitCode": st.exit_code,
            "Error": st.error,
            "StartedAt": time_or_zero(st.started_ms),
            "FinishedAt": time_or_zero(st.finished_ms),
        },
        "Image": spec.image_id,
        "ResolvConfPath": "",
        "HostnamePath": "",
        "HostsPath": "",
        "LogPath": "",
        "Name": format!("/{}", f.vm.alias.as_deref().unwrap_or("")),
        "RestartCount": 0,
        "Driver": "fabric",
        "Platform": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "",
        "ExecIDs": null,
        "HostConfig": {
            "Binds": null,
            "NetworkMode": mode,
            "PortBindings": bindings,
            "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
            "AutoRemove": spec.auto_remove,
            "PublishAllPorts": spec.publish_all,
            "Privileged": false,
            "Dns": spec.dns,
            "CapAdd": null,
            "PidMode": "",
            "IpcMode": "private",
            "UTSMode": "",
            "UsernsMode": "",
            "PidsLimit": spec.pids_limit,
            "ReadonlyRootfs": false,
            "SecurityOpt": null,
            "LogConfig": {"Type": "json-file", "Config": {}},
        },
        "Mounts": [],
        "Config": {
            "Hostname": spec.hostname,
            "Domainname": "",
            "User": spec.user,
            "AttachStdin": false,
            "AttachStdout": true,
            "AttachStderr": true,
            "ExposedPorts": if exposed.is_empty() { Value::Null } else { Value::Object(exposed) },
            "Tty": spec.tty,
            "OpenStdin": spec.open_stdin,
            "StdinOnce": spec.stdin_once,
            "Env": env,
            "Cmd": spec.cmd,
            "Image": spec.image,
            "Volumes": null,
            "WorkingDir": spec.working_dir,
            "Entrypoint": if spec.entrypoint.is_empty() { Value::Null } else { json!(spec.entrypoint) },
            "OnBuild": null,
            "Labels": spec.labels,
            "StopSignal": spec.stop_signal,
            "StopTimeout": spec.stop_timeout,
        },
        "NetworkSettings": {
            "Bridge": "",
            "SandboxID": "",
            "HairpinMode": false,
            "LinkLocalIPv6Address": "",
            "LinkLocalIPv6PrefixLen": 0,
            "Ports": ports,
            "SandboxKey": "",
            "SecondaryIPAddresses": null,
            "SecondaryIPv6Addresses": null,
            "EndpointID": first.map(|e| e.endpoint_id.clone()).unwrap_or_default(),
            "Gateway": first.map(|e| e.gateway.clone()).unwrap_or_default(),
            "GlobalIPv6Address": "",
            "GlobalIPv6PrefixLen": 0,
            "IPAddress": first.map(|e| e.ip.clone()).unwrap_or_default(),
            "IPPrefixLen": first.map_or(0, |e| e.prefix),
            "IPv6Gateway": "",
            "MacAddress": first.map(|e| e.mac.clone()).unwrap_or_default(),
            "Networks": networks,
        },
        "Node": {
            "ID": f.vm.server_uuid,
            "Name": server.as_ref().map(|s| s.hostname.clone()),
        },
    }))
}

/// Filters `docker ps` accepts.
pub const PS_FILTERS: &[&str] = &["name", "id", "label", "status", "network", "ancestor"];
/// Statuses the `status` filter accepts (moby's).
const STATUSES: &[&str] = &[
    "created",
    "restarting",
    "running",
    "removing",
    "paused",
    "exited",
    "dead",
];

/// `GET /containers/json?all=&limit=&filters=`, newest first.
pub fn list(
    db: &mut Db<'_>,
    cfg: &Config,
    account: &Account,
    all: bool,
    limit: Option<i64>,
    filters: &Filters,
) -> Result<Value, OpError> {
    filters.validate(PS_FILTERS)?;
    for s in filters.get("status") {
        if !STATUSES.contains(&s) {
            return Err(error::bad_request(format!("Invalid filter 'status={s}'")));
        }
    }
    let now = now_ms();
    let mut out = Vec::new();
    let mut found = lookup::all(db, account)?;
    found.reverse();
    for f in found {
        let st = state_now(db, cfg, &f.vm)?;
        // `status` filter implies all (moby: a status filter lists non-running ones too).
        if !all && !filters.contains("status") && !st.running() {
            continue;
        }
        let name = f.vm.alias.clone().unwrap_or_default();
        if !filters.exact("status", st.status)
            || !filters.matches("name", &name)
            || (filters.contains("id") && !filters.get("id").any(|p| f.spec.id.starts_with(p)))
            || !filters.kv_list("label", &f.spec.labels)
        {
            continue;
        }
        let eps = endpoints(db, &f.vm)?;
        if filters.contains("network") {
            let ok = filters.get("network").any(|n| {
                eps.iter()
                    .any(|e| e.net_name == n || e.net_id == n || e.net_id.starts_with(n))
            });
            if !ok {
                continue;
            }
        }
        if filters.contains("ancestor")
            && !filters.get("ancestor").any(|a| {
                a == f.spec.image
                    || a == f.spec.image_id
                    || f.spec.image_id.trim_start_matches("sha256:").starts_with(a)
            })
        {
            continue;
        }
        let pubs = published(&f);
        let mut ports = Vec::new();
        for e in &f.spec.exposed {
            if let Ok((p, proto)) = validate::parse_port(e) {
                if !pubs.contains(&(p, proto)) {
                    ports.push(json!({"PrivatePort": p, "Type": proto_str(proto)}));
                }
            }
        }
        for (p, proto) in &pubs {
            ports.push(json!({"IP": "0.0.0.0", "PrivatePort": p, "PublicPort": p,
                "Type": proto_str(*proto)}));
        }
        let mut networks = Map::new();
        for e in &eps {
            networks.insert(
                e.net_name.clone(),
                json!({"NetworkID": e.net_id, "EndpointID": e.endpoint_id,
                    "Gateway": e.gateway, "IPAddress": e.ip, "IPPrefixLen": e.prefix,
                    "MacAddress": e.mac, "IPAMConfig": null, "Links": null, "Aliases": null,
                    "IPv6Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
                    "DriverOpts": null}),
            );
        }
        let command = shell_join(&f.spec.argv());
        let mode =
            f.vm.tags
                .get(NETWORK_MODE)
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty())
                .unwrap_or("default")
                .to_string();
        out.push(json!({
            "Id": f.spec.id,
            "Names": [format!("/{name}")],
            "Image": f.spec.image,
            "ImageID": f.spec.image_id,
            "Command": command,
            "Created": f.vm.created_ms / 1000,
            "Ports": ports,
            "Labels": f.spec.labels,
            "State": st.status,
            "Status": status_text(&st, now),
            "HostConfig": {"NetworkMode": mode},
            "NetworkSettings": {"Networks": networks},
            "Mounts": [],
        }));
        if let Some(l) = limit.filter(|l| *l > 0) {
            if out.len() as i64 >= l {
                break;
            }
        }
    }
    Ok(Value::Array(out))
}

fn proto_str(p: PortProto) -> &'static str {
    match p {
        PortProto::Tcp => "tcp",
        PortProto::Udp => "udp",
    }
}

/// moby's `Command` column: the argv joined by spaces (words with spaces quoted).
fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.contains(' ') || a.is_empty() {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The pending network of a container, if its create named one that did not exist.
pub fn pending_network(vm: &vms::Vm) -> Option<String> {
    vm.tags
        .get(PENDING_NETWORK)
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// A map of the labels (for filters).
pub fn labels(f: &Found) -> &BTreeMap<String, String> {
    &f.spec.labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_as_go() {
        assert_eq!(human_duration(300), "Less than a second");
        assert_eq!(human_duration(1_000), "1 second");
        assert_eq!(human_duration(3_400), "3 seconds");
        assert_eq!(human_duration(61_000), "About a minute");
        assert_eq!(human_duration(5 * 60_000), "5 minutes");
        assert_eq!(human_duration(3_600_000), "About an hour");
        assert_eq!(human_duration(5 * 3_600_000), "5 hours");
        assert_eq!(human_duration(3 * 86_400_000), "3 days");
    }

    fn vm(state: &str) -> vms::Vm {
        serde_json::from_value(json!({
            "uuid": "11111111-0000-4000-8000-000000000001", "alias": "a",
            "owner_uuid": "o", "server_uuid": "s", "brand": "lx", "state": state,
            "desired_state": "running", "state_reason": null, "tags": {},
            "firewall_enabled": true, "nics": [], "created_ms": 0, "modified_ms": 0,
            "destroyed_ms": null
        }))
        .unwrap()
    }

    #[test]
    fn states_and_status_texts() {
        let mut v = vm("provisioning");
        let s = docker_state(&v, "provisioning");
        assert_eq!(
            (s.status, status_text(&s, 0).as_str()),
            ("created", "Created")
        );
        v.started_ms = Some(1_000);
        let s = docker_state(&v, "running");
        assert_eq!(status_text(&s, 4_000), "Up 3 seconds");
        v.exit_status = Some(137);
        v.finished_ms = Some(2_000);
        let s = docker_state(&v, "stopped");
        assert_eq!(s.status, "exited");
        assert_eq!(status_text(&s, 4_000), "Exited (137) 2 seconds ago");
        // A silent host: never Up.
        let s = docker_state(&v, "unknown");
        assert_eq!(s.status, "dead");
        assert!(!s.running());
        assert_eq!(status_text(&s, 4_000), "Dead");
        assert!(s.error.contains("heartbeat"));
        let mut f = vm("failed");
        f.state_reason = Some("runc: exec failed".into());
        let s = docker_state(&f, "failed");
        assert_eq!((s.status, s.exit_code), ("exited", 127));
    }
}
