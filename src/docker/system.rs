//! The handshake and system routes: `/_ping`, `/version`, `/info`.
//!
//! The "host" the docker CLI sees is the whole cluster: `/info` counts this account's
//! containers and images, lists the cluster's servers in `DriverStatus` (printed by `docker
//! info` under "Storage Driver"), and says swarm is inactive.

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, Response};
use serde_json::{json, Value};

use super::api::{Ctx, MAX_VERSION, MIN_VERSION};
use crate::control::db::{Db, Val};
use crate::control::error::OpError;

/// `GET`/`HEAD /_ping`: `OK`, not cached (the version headers are added to every response).
pub fn ping(method: &Method) -> Response<Body> {
    let body = if *method == Method::HEAD { "" } else { "OK" };
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if *method == Method::HEAD {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    r
}

/// The kernel release of this machine (`/proc/sys/kernel/osrelease`).
fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `GET /version`.
pub fn version(_db: &mut Db<'_>, _c: &Ctx<'_>) -> Result<Value, OpError> {
    let v = env!("CARGO_PKG_VERSION");
    let details = json!({
        "ApiVersion": MAX_VERSION.to_string(),
        "MinAPIVersion": MIN_VERSION.to_string(),
        "GitCommit": "fabric",
        "GoVersion": "none (Rust)",
        "Os": "linux",
        "Arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "KernelVersion": kernel(),
        "Experimental": "false",
        "BuildTime": "",
    });
    Ok(json!({
        "Platform": {"Name": "fabric"},
        "Components": [{"Name": "Engine", "Version": v, "Details": details}],
        "Version": v,
        "ApiVersion": MAX_VERSION.to_string(),
        "MinAPIVersion": MIN_VERSION.to_string(),
        "GitCommit": "fabric",
        "GoVersion": "none (Rust)",
        "Os": "linux",
        "Arch": details["Arch"],
        "KernelVersion": details["KernelVersion"],
        "BuildTime": "",
    }))
}

fn count(db: &mut Db<'_>, sql: &str, owner: &str) -> Result<i64, OpError> {
    Ok(db
        .query_opt(sql, &[Val::text(owner)])?
        .and_then(|r| r.first().and_then(Val::as_opt_i64))
        .unwrap_or(0))
}

/// `GET /info`: this account's counts, the cluster's servers.
pub fn info(db: &mut Db<'_>, c: &Ctx<'_>) -> Result<Value, OpError> {
    let owner = &c.account.uuid;
    let containers = count(
        db,
        "SELECT COUNT(*) FROM fabric_vms WHERE owner_uuid = $1 AND state <> 'destroyed'",
        owner,
    )?;
    let running = count(
        db,
        "SELECT COUNT(*) FROM fabric_vms WHERE owner_uuid = $1 AND state = 'running'",
        owner,
    )?;
    let images = super::images::count_images(db, owner)?;
    let now = crate::control::now_us() / 1000;
    let life = c.docker.app.cfg.heartbeat_lifetime_ms();
    let rows = db.query(
        "SELECT uuid, hostname, underlay_ip, last_heartbeat_ms, doc FROM fabric_servers \
         WHERE removed_ms IS NULL ORDER BY hostname, uuid",
        &[],
    )?;
    // The "host" is the cluster: CPUs and memory of the live servers, as they reported them.
    let (mut ncpu, mut mem) = (0i64, 0i64);
    let mut status = vec![json!(["Servers", rows.len().to_string()])];
    let mut live = 0;
    for r in rows {
        let mut it = r.into_iter();
        let uuid = it.next().and_then(Val::into_opt_string).unwrap_or_default();
        let host = it.next().and_then(Val::into_opt_string).unwrap_or_default();
        let ip = it.next().and_then(Val::into_opt_string).unwrap_or_default();
        let beat = it.next().and_then(|v| v.as_opt_i64());
        let doc: Value = it
            .next()
            .and_then(Val::into_opt_string)
            .and_then(|d| serde_json::from_str(&d).ok())
            .unwrap_or(Value::Null);
        let up = beat.is_some_and(|b| now - b <= life);
        live += i64::from(up);
        if up {
            ncpu += doc["cpus"].as_i64().unwrap_or(0);
            mem = mem.saturating_add(doc["memory_bytes"].as_i64().unwrap_or(0));
        }
        status.push(json!([
            format!(" {host}"),
            format!("{ip} {uuid} ({})", if up { "running" } else { "unknown" })
        ]));
    }
    status.insert(1, json!(["Servers running", live.to_string()]));
    let mut v = json!({
        "ID": c.docker.cluster_id,
        "Containers": containers,
        "ContainersRunning": running,
        "ContainersPaused": 0,
        "ContainersStopped": containers - running,
        "Images": images,
        "Driver": "fabric",
        "DriverStatus": status,
        "Plugins": {
            "Volume": [],
            "Network": ["bridge", "overlay"],
            "Authorization": null,
            "Log": ["json-file"],
        },
        "MemoryLimit": false,
        "SwapLimit": false,
        "KernelMemory": false,
        "CpuCfsPeriod": false,
        "CpuCfsQuota": false,
        "CPUShares": false,
        "CPUSet": false,
        "PidsLimit": true,
        "OomKillDisable": false,
        "IPv4Forwarding": true,
        "BridgeNfIptables": true,
        "BridgeNfIp6tables": true,
    });
    let more = json!({
        "Debug": false,
        "NFd": 0,
        "NGoroutines": 0,
        "SystemTime": crate::control::iso_now(),
        "LoggingDriver": "json-file",
        "CgroupDriver": "cgroupfs",
        "NEventsListener": 0,
        "KernelVersion": kernel(),
        "OperatingSystem": format!("fabric {} (a cluster of {live} running servers)", env!("CARGO_PKG_VERSION")),
        "OSVersion": "",
        "OSType": "linux",
        "Architecture": std::env::consts::ARCH,
        "IndexServerAddress": "",
        "RegistryConfig": {"IndexConfigs": {}, "InsecureRegistryCIDRs": [], "Mirrors": []},
        "NCPU": ncpu,
        "MemTotal": mem,
        "DockerRootDir": c.docker.cfg.data.display().to_string(),
        "Name": "fabric",
        "Labels": [],
        "ExperimentalBuild": false,
        "ServerVersion": env!("CARGO_PKG_VERSION"),
        "Runtimes": {"runc": {"path": "runc"}},
        "DefaultRuntime": "runc",
        "Swarm": {
            "NodeID": "",
            "NodeAddr": "",
            "LocalNodeState": "inactive",
            "ControlAvailable": false,
            "Error": "",
            "RemoteManagers": null,
        },
        "LiveRestoreEnabled": true,
        "Isolation": "",
        "InitBinary": "",
        "SecurityOptions": ["name=userns", "name=no-new-privileges"],
        // Each false limit flag above would otherwise print a legacy line of its own.
        "Warnings": ["WARNING: fabric does not apply memory, swap or CPU limits to containers yet"],
    });
    if let (Some(a), Value::Object(b)) = (v.as_object_mut(), more) {
        a.extend(b);
    }
    Ok(v)
}
