//! `fabric server ls|remove` and `fabric peer ls|add|rm`: the operator's membership commands,
//! over the control API: on the head through its operator socket (`--data DIR` or `--socket
//! DIR/control.sock`), from elsewhere over https with an operator certificate (`--control
//! https://HOST:8080 --tls-dir OUTDIR` from `fabric cert admin`), or plain http to a standalone
//! `fabric control`.
//!
//! Errors are one line naming what failed: `no server 564d… is registered (404)`, `server 564d…
//! was already removed from the cluster at … (410)`, or the API's own message with its status.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use serde_json::{json, Value};

use super::client::{HttpClient, HttpResponse};

/// Default control API address (`fabric control`'s default `--listen`).
pub const DEFAULT_CONTROL: &str = "http://127.0.0.1:8080";

/// Where the control API is and how to prove who is asking.
#[derive(clap::Args, Debug, Clone)]
pub struct ControlUrl {
    /// The control API: `https://HOST:PORT` (a cluster; needs --tls-dir) or `http://HOST:PORT`
    /// (a standalone `fabric control`).
    #[arg(long, value_name = "URL", default_value = DEFAULT_CONTROL)]
    pub control: String,
    /// Operator credentials for https: ca.pem, cert.pem, key.pem (`fabric cert admin`).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// On the head: its data directory; the command talks to DIR/control.sock.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["socket", "tls_dir"])]
    pub data: Option<PathBuf>,
    /// On the head: the operator socket (DIR/control.sock).
    #[arg(long, value_name = "PATH", conflicts_with = "tls_dir")]
    pub socket: Option<PathBuf>,
}

impl ControlUrl {
    /// What the messages call the target.
    pub fn describe(&self) -> String {
        match (&self.socket, &self.data) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(d)) => super::cluster::socket_path(d).display().to_string(),
            (None, None) => self.control.clone(),
        }
    }

    /// A client for the target.
    pub fn client(&self) -> anyhow::Result<HttpClient> {
        if let Some(p) = &self.socket {
            return Ok(HttpClient::unix(p.clone()));
        }
        if let Some(d) = &self.data {
            return Ok(HttpClient::unix(super::cluster::socket_path(d)));
        }
        let (u, addr) = crate::up::control_url(&self.control)?;
        match (u.tls, &self.tls_dir) {
            (false, None) => Ok(HttpClient::new(addr)),
            (false, Some(_)) => Err(anyhow!(
                "--tls-dir is for https: expected --control https://HOST:PORT"
            )),
            (true, None) => Err(anyhow!(
                "--control {}: https needs operator credentials: --tls-dir DIR (from `fabric cert admin`), or run on the head with --data DIR",
                self.control
            )),
            (true, Some(d)) => Ok(HttpClient::https(
                addr,
                crate::pki::tls::server_name(&u.host)?,
                crate::pki::tls::client_config(d)?,
            )),
        }
    }
}

/// `fabric server …`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ServerCmd {
    /// List the registered servers: UUID, host name, underlay address, status (running,
    /// unknown, removed), VMs, last heartbeat.
    Ls {
        #[command(flatten)]
        control: ControlUrl,
        /// Members only (hide removed servers).
        #[arg(long)]
        members: bool,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a server from the cluster, for good: its certificate is refused from then on,
    /// its VMs read `unknown` (lost), Portolan and the other hosts stop accepting it. The host
    /// can only come back by joining again under a new identity.
    Remove {
        /// The server's UUID.
        uuid: String,
        #[command(flatten)]
        control: ControlUrl,
    },
}

/// `fabric peer …`: foreign VXLAN peers (Linux vxlan hosts, illumos varpd), members by
/// address.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum PeerCmd {
    /// List the foreign peers.
    Ls {
        #[command(flatten)]
        control: ControlUrl,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a foreign peer (or change its note): Portolan answers it over plain SVP and every
    /// dataplane accepts its VXLAN.
    Add {
        /// Its underlay address.
        ip: String,
        /// A note (who or what it is).
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        control: ControlUrl,
    },
    /// Remove a foreign peer.
    Rm {
        /// Its underlay address.
        ip: String,
        #[command(flatten)]
        control: ControlUrl,
    },
}

/// A one-line error for an API refusal: the body's message, then status and code.
pub fn refusal(r: &HttpResponse) -> String {
    let body = r.json();
    let msg = body["message"].as_str().unwrap_or("").trim();
    let code = body["code"].as_str().unwrap_or("");
    let msg = if msg.is_empty() {
        String::from_utf8_lossy(&r.body).trim().to_string()
    } else {
        msg.to_string()
    };
    let mut first = msg.lines().next().unwrap_or("").to_string();
    // Validation errors: the first field's complaint says what was wrong.
    if let Some(errs) = body["errors"].as_array().filter(|e| !e.is_empty()) {
        let e = &errs[0];
        let field = match &e["field"] {
            Value::String(f) => f.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        let m = e["message"].as_str().unwrap_or("");
        let m = m.lines().next().unwrap_or("");
        first = match (field.is_empty(), m.is_empty()) {
            (_, true) => first,
            (true, false) => format!("{first}: {m}"),
            (false, false) => format!("{first}: {field}: {m}"),
        };
        if errs.len() > 1 {
            first.push_str(&format!(" (and {} more)", errs.len() - 1));
        }
    }
    match (first.is_empty(), code.is_empty()) {
        (true, _) => format!("HTTP {}", r.status),
        (false, true) => format!("{first} ({})", r.status),
        (false, false) => format!("{first} ({} {code})", r.status),
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

pub(crate) async fn call(
    control: &ControlUrl,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<HttpResponse> {
    let mut c = control.client()?;
    c.json(method, path, body)
        .await
        .with_context(|| format!("{method} {path} to {}", control.describe()))
}

/// `GET path` as a list command prints it: the API's JSON with `json`, else `render`'s table;
/// a refusal is one line naming `what` was being listed.
pub(crate) async fn list(
    control: &ControlUrl,
    path: &str,
    what: &str,
    json: bool,
    render: fn(&Value) -> String,
) -> anyhow::Result<String> {
    let r = call(control, "GET", path, None).await?;
    if r.status != 200 {
        return Err(anyhow!("listing {what}: {}", refusal(&r)));
    }
    let v = r.json();
    Ok(if json { format!("{v:#}\n") } else { render(&v) })
}

pub(crate) fn text(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Renders `rows` as aligned columns under `header`.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// The text of `fabric server ls` for the API's server list.
pub fn render_servers(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    vec![
                        text(s, "uuid"),
                        text(s, "hostname"),
                        text(s, "underlay_ip"),
                        text(s, "status"),
                        text(s, "vms"),
                        text(s, "last_heartbeat"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "UUID",
            "HOSTNAME",
            "UNDERLAY",
            "STATUS",
            "VMS",
            "LAST_HEARTBEAT",
        ],
        &rows,
    )
}

/// The text of `fabric peer ls`.
pub fn render_peers(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| vec![text(p, "ip"), text(p, "created"), text(p, "note")])
                .collect()
        })
        .unwrap_or_default();
    table(&["IP", "ADDED", "NOTE"], &rows)
}

/// Runs `fabric server …`; returns what to print.
pub fn server(cmd: ServerCmd) -> anyhow::Result<String> {
    runtime()?.block_on(async move {
        match cmd {
            ServerCmd::Ls {
                control,
                members,
                json,
            } => {
                let path = if members {
                    "/servers?removed=false"
                } else {
                    "/servers"
                };
                list(&control, path, "servers", json, render_servers).await
            }
            ServerCmd::Remove { uuid, control } => {
                let Some(u) = super::params::parse_uuid(&uuid) else {
                    return Err(anyhow!(
                        "{uuid:?} is not a server UUID: expected e.g. \
                         564d1a4c-0000-4000-8000-000000000001 (see fabric server ls)"
                    ));
                };
                let r = call(&control, "DELETE", &format!("/servers/{u}"), None).await?;
                match r.status {
                    204 => Ok(format!("server {u} removed\n")),
                    404 => Err(anyhow!(
                        "no server {u} is registered (404; see fabric server ls)"
                    )),
                    _ => Err(anyhow!("removing server {u}: {}", refusal(&r))),
                }
            }
        }
    })
}

/// Runs `fabric peer …`; returns what to print.
pub fn peer(cmd: PeerCmd) -> anyhow::Result<String> {
    runtime()?.block_on(async move {
        match cmd {
            PeerCmd::Ls { control, json } => {
                list(&control, "/peers", "peers", json, render_peers).await
            }
            PeerCmd::Add { ip, note, control } => {
                let body = note.map(|n| json!({ "note": n }));
                let path = format!("/peers/{ip}");
                let r = call(&control, "PUT", &path, body.as_ref()).await?;
                if r.status != 200 {
                    return Err(anyhow!("adding peer {ip}: {}", refusal(&r)));
                }
                Ok(format!("peer {} added\n", text(&r.json(), "ip")))
            }
            PeerCmd::Rm { ip, control } => {
                let r = call(&control, "DELETE", &format!("/peers/{ip}"), None).await?;
                match r.status {
                    204 => Ok(format!("peer {ip} removed\n")),
                    404 => Err(anyhow!("no peer {ip} is listed (404; see fabric peer ls)")),
                    _ => Err(anyhow!("removing peer {ip}: {}", refusal(&r))),
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn refusals_are_one_line() {
        assert_eq!(
            refusal(&resp(
                410,
                r#"{"code":"Gone","message":"server x was already removed"}"#
            )),
            "server x was already removed (410 Gone)"
        );
        assert_eq!(refusal(&resp(502, "bad\ngateway")), "bad (502)");
        assert_eq!(
            refusal(&resp(
                422,
                r#"{"code":"InvalidParameters","message":"Invalid parameters","errors":[{"field":"ip","code":"InvalidParameter","message":"not unicast"},{"field":"x","message":"y"}]}"#
            )),
            "Invalid parameters: ip: not unicast (and 1 more) (422 InvalidParameters)"
        );
        assert_eq!(refusal(&resp(500, "")), "HTTP 500");
    }

    #[test]
    fn tables_align() {
        let v = json!([
            {"uuid": "u1", "hostname": "h", "underlay_ip": "192.0.2.1", "status": "running",
             "vms": 2, "last_heartbeat": "2026-01-01T00:00:00.000Z"},
            {"uuid": "u2", "hostname": "host-two", "underlay_ip": "192.0.2.2",
             "status": "removed", "vms": 0, "last_heartbeat": null},
        ]);
        let t = render_servers(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("UUID  HOSTNAME  UNDERLAY"), "{t}");
        assert!(lines[2].contains("host-two  192.0.2.2  removed"), "{t}");
        assert!(lines[2].ends_with('-'), "{t}");
        let p = render_peers(&json!([{"ip": "192.0.2.9", "created": "c", "note": "linux"}]));
        assert_eq!(p, "IP         ADDED  NOTE\n192.0.2.9  c      linux\n");
    }
}
