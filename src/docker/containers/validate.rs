//! `POST /containers/create`'s body, checked against DESIGN's allow-list ("Containers are
//! sandboxed"): a field outside it is refused (400 naming it) only when it carries a value
//! other than the default the docker CLI and docker-py send with every create. Parsed into a
//! [`CreateRequest`]: what the create module fills a container spec from. No store access.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::{Map, Value};

use super::super::error;
use crate::control::error::OpError;
use crate::firewall::docker::{PortBinding, PortProto};

/// What a create asks for, validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CreateRequest {
    /// `Image` as given.
    pub image: String,
    /// `Entrypoint`: `None` when absent or null (the image's applies); `Some([])` clears it.
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `Env` (`K=V`).
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User` (numeric `uid[:gid]` only).
    pub user: String,
    /// `Hostname`.
    pub hostname: String,
    /// `Tty`.
    pub tty: bool,
    /// `OpenStdin`.
    pub open_stdin: bool,
    /// `StdinOnce`.
    pub stdin_once: bool,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `ExposedPorts` (`80/tcp`).
    pub exposed: Vec<String>,
    /// `StopSignal`.
    pub stop_signal: Option<String>,
    /// `StopTimeout`.
    pub stop_timeout: Option<u32>,
    /// `HostConfig.NetworkMode` (empty: default).
    pub network_mode: String,
    /// `HostConfig.PortBindings`.
    pub published: Vec<PortBinding>,
    /// `HostConfig.PublishAllPorts`.
    pub publish_all: bool,
    /// `HostConfig.AutoRemove`.
    pub auto_remove: bool,
    /// `HostConfig.Dns`.
    pub dns: Vec<String>,
    /// `NetworkingConfig.EndpointsConfig`: the network named and its `IPAMConfig.IPv4Address`.
    pub endpoint: Option<(String, Option<Ipv4Addr>)>,
}

/// moby's container name rule: `^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$`.
pub fn valid_name(name: &str) -> bool {
    let n = name.strip_prefix('/').unwrap_or(name);
    let b = n.as_bytes();
    b.len() >= 2
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A container name from `?name=` (leading `/` dropped), or moby's 400.
pub fn check_name(name: &str) -> Result<String, OpError> {
    if valid_name(name) {
        Ok(name.strip_prefix('/').unwrap_or(name).to_string())
    } else {
        Err(error::bad_request(format!(
            "Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )))
    }
}

fn refuse(field: &str, why: &str) -> OpError {
    error::bad_request(format!(
        "{field} is not supported: {why} (fabric containers are sandboxed; see DESIGN \"Containers are sandboxed\")"
    ))
}

/// Whether `v` is what a client sends when the user did not set the field.
fn is_default(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// HostConfig fields that are refused when set (to something but their default).
const REFUSED_HOST: &[(&str, &str)] = &[
    ("Privileged", "privileged containers would own the host"),
    ("Binds", "volumes and bind mounts do not exist here yet"),
    ("Mounts", "volumes and bind mounts do not exist here yet"),
    ("VolumesFrom", "volumes do not exist here yet"),
    ("VolumeDriver", "volumes do not exist here yet"),
    ("CapAdd", "containers keep Docker's default capabilities"),
    ("Devices", "containers see the standard devices only"),
    ("DeviceRequests", "containers see the standard devices only"),
    (
        "DeviceCgroupRules",
        "containers see the standard devices only",
    ),
    ("Sysctls", "kernel parameters are the host's"),
    ("SecurityOpt", "the security profile is fixed"),
    ("CgroupParent", "cgroups are placed by the host"),
    ("Cgroup", "cgroups are placed by the host"),
    ("Runtime", "the runtime is runc"),
    ("Links", "links are not supported"),
    ("ExtraHosts", "extra hosts are not supported yet"),
    ("Tmpfs", "volumes and mounts do not exist here yet"),
    ("StorageOpt", "storage options are the host's"),
];

/// HostConfig namespace modes: anything but the default (private) is refused.
const NAMESPACE_MODES: &[&str] = &[
    "PidMode",
    "IpcMode",
    "UTSMode",
    "UsernsMode",
    "CgroupnsMode",
];

/// HostConfig fields accepted at any value (resource limits and the like are ignored: the
/// host applies its own), or checked below.
const ACCEPTED_HOST: &[&str] = &[
    "NetworkMode",
    "PortBindings",
    "PublishAllPorts",
    "AutoRemove",
    "RestartPolicy",
    "LogConfig",
    "Dns",
    "DnsOptions",
    "DnsSearch",
    "ConsoleSize",
    "Isolation",
    "CpuShares",
    "Memory",
    "NanoCpus",
    "CpuPeriod",
    "CpuQuota",
    "CpuRealtimePeriod",
    "CpuRealtimeRuntime",
    "CpusetCpus",
    "CpusetMems",
    "BlkioWeight",
    "BlkioWeightDevice",
    "BlkioDeviceReadBps",
    "BlkioDeviceWriteBps",
    "BlkioDeviceReadIOps",
    "BlkioDeviceWriteIOps",
    "KernelMemory",
    "KernelMemoryTCP",
    "MemoryReservation",
    "MemorySwap",
    "MemorySwappiness",
    "OomKillDisable",
    "OomScoreAdj",
    "PidsLimit",
    "Ulimits",
    "CpuCount",
    "CpuPercent",
    "IOMaximumIOps",
    "IOMaximumBandwidth",
    "ContainerIDFile",
    "GroupAdd",
    "CapDrop",
    "ReadonlyRootfs",
    "ShmSize",
    "Init",
    "MaskedPaths",
    "ReadonlyPaths",
    "AutoRemove",
];

fn strings(v: Option<&Value>, field: &str) -> Result<Option<Vec<String>>, OpError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        // moby's strslice accepts a single string too.
        Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    error::bad_request(format!("{field}: expected an array of strings"))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(error::bad_request(format!(
            "{field}: expected an array of strings"
        ))),
    }
}

fn string(v: Option<&Value>, field: &str) -> Result<String, OpError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(error::bad_request(format!("{field}: expected a string"))),
    }
}

fn boolean(v: Option<&Value>, field: &str) -> Result<bool, OpError> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(error::bad_request(format!("{field}: expected a boolean"))),
    }
}

fn object<'a>(
    v: Option<&'a Value>,
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, OpError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(error::bad_request(format!("{field}: expected an object"))),
    }
}

/// `80`, `80/tcp`, `53/udp` → (port, proto); moby's error otherwise.
pub fn parse_port(s: &str) -> Result<(u16, PortProto), OpError> {
    let (p, proto) = match s.split_once('/') {
        Some((p, "tcp")) => (p, PortProto::Tcp),
        Some((p, "udp")) => (p, PortProto::Udp),
        Some((_, other)) => {
            return Err(error::bad_request(format!(
                "invalid proto {other:?} of port {s}: only tcp and udp are supported"
            )))
        }
        None => (s, PortProto::Tcp),
    };
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok((n, proto)),
        _ => Err(error::bad_request(format!(
            "invalid port specification: {s:?}"
        ))),
    }
}

/// The canonical `80/tcp` form.
pub fn port_key(port: u16, proto: PortProto) -> String {
    match proto {
        PortProto::Tcp => format!("{port}/tcp"),
        PortProto::Udp => format!("{port}/udp"),
    }
}

/// Checks and parses a create body.
pub fn parse(body: &Value) -> Result<CreateRequest, OpError> {
    let Value::Object(o) = body else {
        return Err(error::bad_request(
            "json: cannot unmarshal into Go value of type container.Config: expected an object",
        ));
    };
    let image = string(o.get("Image"), "Image")?;
    if image.is_empty() {
        return Err(error::bad_request("Config.Image: an image is required"));
    }
    let user = string(o.get("User"), "User")?;
    if !user.is_empty()
        && !user
            .split(':')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(error::bad_request(format!(
            "User {user:?}: only a numeric uid[:gid] is supported (names need the image's /etc/passwd)"
        )));
    }
    for (f, why) in [
        ("Volumes", "volumes do not exist here yet"),
        ("Healthcheck", "health checks are not supported yet"),
        ("Shell", "SHELL applies to builds only"),
    ] {
        if o.get(f).is_some_and(|v| !is_default(v)) {
            return Err(refuse(&format!("Config.{f}"), why));
        }
    }
    if o.get("Domainname").is_some_and(|v| !is_default(v)) {
        return Err(refuse(
            "Config.Domainname",
            "domain names are not supported",
        ));
    }
    let mut exposed: Vec<String> = Vec::new();
    if let Some(e) = object(o.get("ExposedPorts"), "ExposedPorts")? {
        for k in e.keys() {
            let (p, proto) = parse_port(k)?;
            exposed.push(port_key(p, proto));
        }
    }
    let labels = match object(o.get("Labels"), "Labels")? {
        None => BTreeMap::new(),
        Some(l) => l
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(error::bad_request(
                    "json: cannot unmarshal into Go struct field Config.Labels of type string",
                )),
            })
            .collect::<Result<_, _>>()?,
    };
    let stop_timeout = match o.get("StopTimeout") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n <= 86_400 => Some(n as u32),
            _ => {
                return Err(error::bad_request(
                    "StopTimeout: expected whole seconds from 0 to 86400",
                ))
            }
        },
    };
    let stop_signal = match string(o.get("StopSignal"), "StopSignal")? {
        s if s.is_empty() => None,
        s => Some(
            crate::control::vms::parse_signal(&s)
                .ok_or_else(|| error::bad_request(format!("Invalid signal: {s}")))?,
        ),
    };
    let mut req = CreateRequest {
        image,
        entrypoint: strings(o.get("Entrypoint"), "Entrypoint")?,
        cmd: strings(o.get("Cmd"), "Cmd")?,
        env: strings(o.get("Env"), "Env")?.unwrap_or_default(),
        working_dir: string(o.get("WorkingDir"), "WorkingDir")?,
        user,
        hostname: string(o.get("Hostname"), "Hostname")?,
        tty: boolean(o.get("Tty"), "Tty")?,
        open_stdin: boolean(o.get("OpenStdin"), "OpenStdin")?,
        stdin_once: boolean(o.get("StdinOnce"), "StdinOnce")?,
        labels,
        exposed,
        stop_signal,
        stop_timeout,
        ..CreateRequest::default()
    };
    if !req.working_dir.is_empty() && !req.working_dir.starts_with('/') {
        return Err(error::bad_request(format!(
            "the working directory '{}' is invalid, it needs to be an absolute path",
            req.working_dir
        )));
    }
    if req.hostname.len() > 63 {
        return Err(error::bad_request(format!(
            "invalid hostname format: {}",
            req.hostname
        )));
    }
    for e in &req.env {
        if e.split('=').next().unwrap_or("").is_empty() {
            return Err(error::bad_request(format!(
                "invalid environment variable: {e}"
            )));
        }
    }
    if let Some(h) = object(o.get("HostConfig"), "HostConfig")? {
        host_config(h, &mut req)?;
    }
    if let Some(n) = object(o.get("NetworkingConfig"), "NetworkingConfig")? {
        if let Some(eps) = object(n.get("EndpointsConfig"), "NetworkingConfig.EndpointsConfig")? {
            if eps.len() > 1 {
                let mut names: Vec<&str> = eps.keys().map(String::as_str).collect();
                names.sort();
                return Err(error::bad_request(format!(
                    "Container cannot be connected to network endpoints: {}",
                    names.join(", ")
                )));
            }
            if let Some((name, ep)) = eps.iter().next() {
                let ip = endpoint_ip(ep)?;
                req.endpoint = Some((name.clone(), ip));
            }
        }
    }
    Ok(req)
}

/// `EndpointSettings.IPAMConfig.IPv4Address`, if set.
pub fn endpoint_ip(ep: &Value) -> Result<Option<Ipv4Addr>, OpError> {
    let Some(ipam) = object(ep.get("IPAMConfig"), "IPAMConfig")? else {
        return Ok(None);
    };
    if ipam.get("IPv6Address").is_some_and(|v| !is_default(v)) {
        return Err(error::bad_request(
            "IPAMConfig.IPv6Address: IPv6 is not supported on fabric networks",
        ));
    }
    match string(ipam.get("IPv4Address"), "IPAMConfig.IPv4Address")? {
        s if s.is_empty() => Ok(None),
        s => s
            .parse::<Ipv4Addr>()
            .map(Some)
            .map_err(|_| error::bad_request(format!("invalid IPv4 address: {s}"))),
    }
}

fn host_config(h: &Map<String, Value>, req: &mut CreateRequest) -> Result<(), OpError> {
    for (f, why) in REFUSED_HOST {
        if h.get(*f).is_some_and(|v| !is_default(v)) {
            return Err(refuse(&format!("HostConfig.{f}"), why));
        }
    }
    for f in NAMESPACE_MODES {
        let v = string(h.get(*f), &format!("HostConfig.{f}"))?;
        if !(v.is_empty()
            || (*f == "IpcMode" && matches!(v.as_str(), "private" | "shareable"))
            || (*f == "CgroupnsMode" && v == "private"))
        {
            return Err(refuse(
                &format!("HostConfig.{f}={v}"),
                "containers have their own namespaces",
            ));
        }
    }
    for k in h.keys() {
        if !ACCEPTED_HOST.contains(&k.as_str())
            && !REFUSED_HOST.iter().any(|(f, _)| f == k)
            && !NAMESPACE_MODES.contains(&k.as_str())
            && h.get(k).is_some_and(|v| !is_default(v))
        {
            return Err(refuse(&format!("HostConfig.{k}"), "not in the allow-list"));
        }
    }
    if let Some(r) = object(h.get("RestartPolicy"), "HostConfig.RestartPolicy")? {
        let name = string(r.get("Name"), "HostConfig.RestartPolicy.Name")?;
        if !(name.is_empty() || name == "no") {
            return Err(refuse(
                &format!("HostConfig.RestartPolicy={name}"),
                "restart policies come with a later version",
            ));
        }
    }
    let mode = string(h.get("NetworkMode"), "HostConfig.NetworkMode")?;
    if mode == "host" {
        return Err(refuse(
            "HostConfig.NetworkMode=host",
            "containers have their own network stack on the fabric",
        ));
    }
    if mode.starts_with("container:") {
        return Err(refuse(
            &format!("HostConfig.NetworkMode={mode}"),
            "containers do not share network stacks",
        ));
    }
    req.network_mode = mode;
    req.publish_all = boolean(h.get("PublishAllPorts"), "HostConfig.PublishAllPorts")?;
    req.auto_remove = boolean(h.get("AutoRemove"), "HostConfig.AutoRemove")?;
    req.dns = strings(h.get("Dns"), "HostConfig.Dns")?.unwrap_or_default();
    for d in &req.dns {
        if d.parse::<std::net::IpAddr>().is_err() {
            return Err(error::bad_request(format!("{d} is not an ip address")));
        }
    }
    if let Some(pb) = object(h.get("PortBindings"), "HostConfig.PortBindings")? {
        for (k, v) in pb {
            let (port, proto) = parse_port(k)?;
            let binds = match v {
                Value::Null => Vec::new(),
                Value::Array(a) => a.clone(),
                _ => {
                    return Err(error::bad_request(format!(
                        "HostConfig.PortBindings[{k}]: expected an array"
                    )))
                }
            };
            if binds.is_empty() {
                req.published.push(PortBinding {
                    port,
                    proto,
                    host_port: None,
                    host_ip: None,
                });
            }
            for b in binds {
                let hp = string(b.get("HostPort"), "HostPort")?;
                let hi = string(b.get("HostIp"), "HostIp")?;
                let host_port = if hp.is_empty() {
                    None
                } else {
                    // `-p 8000-8001:80` style ranges are remapping too.
                    Some(hp.parse::<u16>().map_err(|_| {
                        error::bad_request(format!(
                            "publish port: remapping of port numbers not allowed (host port {hp} for container port {port})"
                        ))
                    })?)
                };
                req.published.push(PortBinding {
                    port,
                    proto,
                    host_port,
                    host_ip: (!hi.is_empty()).then_some(hi),
                });
            }
            let key = port_key(port, proto);
            if !req.exposed.contains(&key) {
                req.exposed.push(key);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What docker CLI 28 sends for `docker create busybox` (API 1.41): the whole HostConfig
    /// with its defaults.
    fn cli_default() -> Value {
        serde_json::from_str(
            r#"{
            "Hostname": "", "Domainname": "", "User": "", "AttachStdin": false,
            "AttachStdout": true, "AttachStderr": true, "Tty": false, "OpenStdin": false,
            "StdinOnce": false, "Env": null, "Cmd": null, "Image": "busybox", "Volumes": {},
            "WorkingDir": "", "Entrypoint": null, "OnBuild": null, "Labels": {},
            "HostConfig": {
                "Binds": null, "ContainerIDFile": "", "LogConfig": {"Type": "", "Config": {}},
                "NetworkMode": "default", "PortBindings": {}, "RestartPolicy": {"Name": "no",
                "MaximumRetryCount": 0}, "AutoRemove": false, "VolumeDriver": "",
                "VolumesFrom": null, "ConsoleSize": [0, 0], "CapAdd": null, "CapDrop": null,
                "CgroupnsMode": "", "Dns": [], "DnsOptions": [], "DnsSearch": [],
                "ExtraHosts": null, "GroupAdd": null, "IpcMode": "", "Cgroup": "",
                "Links": null, "OomScoreAdj": 0, "PidMode": "", "Privileged": false,
                "PublishAllPorts": false, "ReadonlyRootfs": false, "SecurityOpt": null,
                "UTSMode": "", "UsernsMode": "", "ShmSize": 0, "Isolation": "",
                "CpuShares": 0, "Memory": 0, "NanoCpus": 0, "CgroupParent": "",
                "BlkioWeight": 0, "BlkioWeightDevice": [], "BlkioDeviceReadBps": [],
                "BlkioDeviceWriteBps": [], "BlkioDeviceReadIOps": [], "BlkioDeviceWriteIOps": [],
                "CpuPeriod": 0, "CpuQuota": 0, "CpuRealtimePeriod": 0, "CpuRealtimeRuntime": 0,
                "CpusetCpus": "", "CpusetMems": "", "Devices": [], "DeviceCgroupRules": null,
                "DeviceRequests": null, "MemoryReservation": 0, "MemorySwap": 0,
                "MemorySwappiness": null, "OomKillDisable": null, "PidsLimit": null,
                "Ulimits": [], "CpuCount": 0, "CpuPercent": 0, "IOMaximumIOps": 0,
                "IOMaximumBandwidth": 0, "MaskedPaths": null, "ReadonlyPaths": null
            },
            "NetworkingConfig": {"EndpointsConfig": {}}
        }"#,
        )
        .unwrap()
    }

    fn with_host(k: &str, v: Value) -> Value {
        let mut b = cli_default();
        b["HostConfig"][k] = v;
        b
    }

    #[test]
    fn the_cli_defaults_pass() {
        let r = parse(&cli_default()).unwrap();
        assert_eq!(r.image, "busybox");
        assert_eq!(r.network_mode, "default");
        assert_eq!(r.entrypoint, None);
        assert!(r.published.is_empty());
    }

    #[test]
    fn every_refused_field_is_a_400_naming_it() {
        let cases = [
            (
                with_host("Privileged", json!(true)),
                "HostConfig.Privileged",
            ),
            (with_host("Binds", json!(["/:/x"])), "HostConfig.Binds"),
            (
                with_host("Mounts", json!([{"Type": "bind"}])),
                "HostConfig.Mounts",
            ),
            (
                with_host("VolumesFrom", json!(["c"])),
                "HostConfig.VolumesFrom",
            ),
            (
                with_host("NetworkMode", json!("host")),
                "HostConfig.NetworkMode=host",
            ),
            (
                with_host("NetworkMode", json!("container:x")),
                "HostConfig.NetworkMode=container:x",
            ),
            (
                with_host("CapAdd", json!(["NET_ADMIN"])),
                "HostConfig.CapAdd",
            ),
            (
                with_host("Devices", json!([{"PathOnHost": "/dev/sda"}])),
                "HostConfig.Devices",
            ),
            (
                with_host("PidMode", json!("host")),
                "HostConfig.PidMode=host",
            ),
            (
                with_host("IpcMode", json!("host")),
                "HostConfig.IpcMode=host",
            ),
            (
                with_host("UTSMode", json!("host")),
                "HostConfig.UTSMode=host",
            ),
            (
                with_host("UsernsMode", json!("host")),
                "HostConfig.UsernsMode=host",
            ),
            (
                with_host("Sysctls", json!({"net.ipv4.ip_forward": "1"})),
                "HostConfig.Sysctls",
            ),
            (
                with_host("SecurityOpt", json!(["seccomp=unconfined"])),
                "HostConfig.SecurityOpt",
            ),
            (
                with_host("CgroupParent", json!("/x")),
                "HostConfig.CgroupParent",
            ),
            (
                with_host("RestartPolicy", json!({"Name": "always"})),
                "HostConfig.RestartPolicy=always",
            ),
            (with_host("Frobnicate", json!(1)), "HostConfig.Frobnicate"),
        ];
        for (body, field) in cases {
            let e = parse(&body).unwrap_err().into_api();
            assert_eq!(e.status, 400, "{field}");
            assert!(e.message.starts_with(field), "{field}: {}", e.message);
        }
    }

    #[test]
    fn user_must_be_numeric() {
        let mut b = cli_default();
        b["User"] = json!("nobody");
        assert_eq!(parse(&b).unwrap_err().into_api().status, 400);
        b["User"] = json!("1000:1000");
        assert_eq!(parse(&b).unwrap().user, "1000:1000");
    }

    #[test]
    fn ports_and_endpoints() {
        let mut b = with_host(
            "PortBindings",
            json!({"80/tcp": [{"HostIp": "", "HostPort": ""}], "53/udp": [{"HostIp": "", "HostPort": "53"}]}),
        );
        b["NetworkingConfig"] =
            json!({"EndpointsConfig": {"net1": {"IPAMConfig": {"IPv4Address": "10.1.0.7"}}}});
        let r = parse(&b).unwrap();
        assert_eq!(r.published.len(), 2);
        assert!(r.exposed.contains(&"80/tcp".to_string()));
        assert_eq!(
            r.endpoint,
            Some(("net1".into(), Some(Ipv4Addr::new(10, 1, 0, 7))))
        );
        let b = with_host("PortBindings", json!({"80/sctp": []}));
        assert_eq!(parse(&b).unwrap_err().into_api().status, 400);
        let mut b = cli_default();
        b["NetworkingConfig"] = json!({"EndpointsConfig": {"a": {}, "b": {}}});
        assert_eq!(
            parse(&b).unwrap_err().into_api().message,
            "Container cannot be connected to network endpoints: a, b"
        );
    }

    #[test]
    fn names_as_moby() {
        for ok in ["ab", "/web-1", "a.b_c", "0x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["a", "", "-a", "/", "a b", "_a", "a/b"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(check_name("/web").unwrap(), "web");
        assert_eq!(
            check_name("x y").unwrap_err().into_api().message,
            "Invalid container name (x y), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        );
    }
}
