//! Networks the operator shares with every account (Triton's "external" networks):
//! `fabric network share NAME --subnet CIDR [--gateway IP] [--driver D]`, `fabric network
//! unshare NAME`, `fabric network shared`, through the operator-only control API routes
//! `/shared_networks` and `/shared_networks/:name`.
//!
//! A shared network is a Docker network ([`super::networks`]) whose fabric VLAN and network
//! belong to a synthetic owner UUID made for it alone, so it gets a VNI of its own (the first
//! VLAN of an owner draws a fresh `vnet_id`), never an account's. Every account lists and
//! inspects it (inspect shows the caller's endpoints only); no account can remove or prune it.
//! Its name is unique among every account's networks (an account cannot create one named
//! like it, and sharing a name an account already uses is refused), and its subnet overlaps
//! no account's Docker network and no other shared network (the pool avoids it from then on).
//! Unsharing is refused while anything is attached to it.

use anyhow::bail;
use serde_json::{json, Value};

use super::networks::{self as dnet, Kind, Net, Spec};
use crate::control::cli::{call, list, refusal, runtime, table, text, ControlUrl};
use crate::control::db::{Db, Val};
use crate::control::error::{ApiError, FieldError, OpError};
use crate::control::params::{random_uuid, Params};
use crate::control::Config;

/// The operator's view of a shared network.
pub fn to_json(db: &mut Db<'_>, n: &Net) -> Result<Value, OpError> {
    let uuid = n.uuid.clone().unwrap_or_default();
    let fabric = crate::control::networks::get(db, &uuid)?;
    let c = n.ipam.config.first();
    Ok(json!({
        "name": n.name,
        "id": n.id,
        "network_uuid": uuid,
        "owner_uuid": n.owner_uuid,
        "driver": n.driver,
        "vlan_id": n.vlan_id,
        "vnet_id": fabric.as_ref().and_then(|f| f.vnet_id),
        "subnet": c.and_then(|c| c.subnet.clone()),
        "gateway": fabric.as_ref().and_then(|f| f.gateway).map(|g| g.to_string()),
        "created": dnet::rfc3339(n.created_ms),
        "endpoints": dnet::endpoints(db, &uuid, None)?,
    }))
}

fn find(db: &mut Db<'_>, name: &str) -> Result<Net, OpError> {
    dnet::shared(db)?
        .into_iter()
        .find(|n| n.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no shared network {name}")).into())
}

/// `POST /shared_networks {name, subnet, gateway?, driver?}`.
pub fn create_api(db: &mut Db<'_>, cfg: &Config, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["name", "subnet", "gateway", "driver"]);
    let name = p.name("name", dnet::MAX_NAME);
    let name = p.require("name", name);
    let subnet = p.string("subnet");
    let subnet = p.require("subnet", subnet);
    let gateway = p.string("gateway");
    let driver = p.string("driver");
    p.finish()?;
    let name = name.unwrap_or_default();
    let refuse = |m: String| -> OpError { ApiError::invalid("name", m).into() };
    if dnet::PREDEFINED.contains(&name.as_str()) {
        return Err(refuse(format!(
            "{name} is a predefined Docker network name"
        )));
    }
    dnet::check_name(&name).map_err(|e| refuse(e.into_api().message))?;
    let driver = dnet::check_driver(driver.as_deref().unwrap_or("overlay"))
        .map_err(|e| OpError::from(ApiError::invalid("driver", e.into_api().message)))?;
    let owner = random_uuid().map_err(|e| OpError::Corrupt(format!("random: {e}")))?;
    dnet::lock(db, &owner)?;
    let users: Vec<String> = db
        .query(
            "SELECT COALESCE(a.login, d.owner_uuid) FROM docker_networks d \
               LEFT JOIN docker_accounts a ON a.uuid = d.owner_uuid WHERE d.name = $1",
            &[Val::text(&name)],
        )?
        .into_iter()
        .filter_map(|r| r.into_iter().next().and_then(Val::into_opt_string))
        .collect();
    if !users.is_empty() {
        let m = format!(
            "a network named {name} exists already (of {}): every account would see two",
            users.join(", ")
        );
        return Err(ApiError::invalid_params_msg(
            m.clone(),
            vec![FieldError::duplicate("name", m)],
        )
        .into());
    }
    let spec = Spec {
        config: Some(dnet::IpamConfig {
            subnet: subnet.clone(),
            gateway,
            ..Default::default()
        }),
        ..Spec::plain(&name, &driver)
    };
    // Every Docker network, of every account and shared: none may overlap a shared one.
    let all: Vec<(u32, u32, String)> = db
        .query(
            "SELECT n.subnet_lo, n.subnet_hi, d.name, COALESCE(a.login, 'shared') \
               FROM docker_networks d JOIN napi_networks n ON n.uuid = d.network_uuid \
               LEFT JOIN docker_accounts a ON a.uuid = d.owner_uuid ORDER BY d.name",
            &[],
        )?
        .into_iter()
        .map(|r| {
            let mut it = r.into_iter();
            let lo = it.next().and_then(|v| v.as_opt_i64()).unwrap_or(0) as u32;
            let hi = it.next().and_then(|v| v.as_opt_i64()).unwrap_or(0) as u32;
            let n = it.next().and_then(Val::into_opt_string).unwrap_or_default();
            let who = it.next().and_then(Val::into_opt_string).unwrap_or_default();
            (lo, hi, format!("{n} ({who})"))
        })
        .collect();
    let avoid: Vec<(u32, u32)> = all.iter().map(|(a, b, _)| (*a, *b)).collect();
    let net = dnet::insert(db, cfg, &owner, &spec, Kind::Shared, &avoid).map_err(|e| {
        let e = e.into_api();
        if e.message.starts_with("Pool overlaps") {
            let clash: Vec<&str> = subnet
                .as_deref()
                .and_then(|s| crate::control::networks::parse_subnet(s).ok())
                .map(|(ip, len)| {
                    let (lo, hi) = crate::control::networks::subnet_bounds(ip, len);
                    all.iter()
                        .filter(|(a, b, _)| lo <= *b && hi >= *a)
                        .map(|(_, _, w)| w.as_str())
                        .collect()
                })
                .unwrap_or_default();
            let m = format!("subnet overlaps Docker networks: {}", clash.join(", "));
            ApiError::invalid_params_msg(m.clone(), vec![FieldError::invalid("subnet", m)]).into()
        } else {
            OpError::from(ApiError::invalid("subnet", e.message))
        }
    })?;
    to_json(db, &net)
}

/// `GET /shared_networks`.
pub fn list_api(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&[]);
    p.finish()?;
    let nets = dnet::shared(db)?;
    let mut out = Vec::new();
    for n in &nets {
        out.push(to_json(db, n)?);
    }
    Ok(Value::Array(out))
}

/// `GET /shared_networks/:name`.
pub fn get_api(db: &mut Db<'_>, name: &str, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&[]);
    p.finish()?;
    let n = find(db, name)?;
    to_json(db, &n)
}

/// `DELETE /shared_networks/:name`: refused while anything is attached.
pub fn delete_api(db: &mut Db<'_>, name: &str, p: &mut Params) -> Result<(), OpError> {
    p.allow_only(&[]);
    p.finish()?;
    let n = find(db, name)?;
    dnet::lock(db, &n.owner_uuid)?;
    let n = find(db, name)?;
    let k = dnet::endpoints(db, n.uuid.as_deref().unwrap_or(""), None)?;
    if k > 0 {
        return Err(ApiError::in_use(
            format!("shared network {name} has {k} endpoints attached; detach them first"),
            Vec::new(),
        )
        .into());
    }
    dnet::remove(db, &n)
}

/// `fabric network …`: networks shared with every Docker account.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum NetworkCmd {
    /// Share a new network with every Docker account (Triton's "external" role): a fabric
    /// network with its own VNI that every account lists, inspects and can attach
    /// containers to, but cannot remove.
    Share {
        /// Its Docker name (unique among all accounts' networks).
        name: String,
        /// Its IPv4 subnet (private space; overlapping no account's network).
        #[arg(long, value_name = "CIDR")]
        subnet: String,
        /// Its gateway (default: the subnet's first address).
        #[arg(long, value_name = "IP")]
        gateway: Option<String>,
        /// The Docker driver accounts see (bridge or overlay).
        #[arg(long, default_value = "overlay")]
        driver: String,
        #[command(flatten)]
        control: ControlUrl,
    },
    /// Stop sharing a network and remove it (refused while anything is attached).
    Unshare {
        /// Its name.
        name: String,
        #[command(flatten)]
        control: ControlUrl,
    },
    /// List the shared networks.
    Shared {
        #[command(flatten)]
        control: ControlUrl,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `fabric network …`; returns what to print.
pub fn network(cmd: NetworkCmd) -> anyhow::Result<String> {
    runtime()?.block_on(async move {
        match cmd {
            NetworkCmd::Share {
                name,
                subnet,
                gateway,
                driver,
                control,
            } => {
                let r = call(
                    &control,
                    "POST",
                    "/shared_networks",
                    Some(&json!({"name": name, "subnet": subnet, "gateway": gateway, "driver": driver})),
                )
                .await?;
                if r.status != 200 {
                    bail!("sharing network {name}: {}", refusal(&r));
                }
                let v = r.json();
                Ok(format!(
                    "network {name} shared with every account: Id {}, subnet {}, gateway {}, VNI {}\n",
                    text(&v, "id"),
                    text(&v, "subnet"),
                    text(&v, "gateway"),
                    text(&v, "vnet_id"),
                ))
            }
            NetworkCmd::Unshare { name, control } => {
                let path = format!("/shared_networks/{}", super::api::percent_encode(&name));
                let r = call(&control, "DELETE", &path, None).await?;
                if r.status != 204 {
                    bail!("unsharing network {name}: {}", refusal(&r));
                }
                Ok(format!("network {name} is no longer shared, and removed\n"))
            }
            NetworkCmd::Shared { control, json } => {
                list(&control, "/shared_networks", "shared networks", json, render).await
            }
        }
    })
}

/// The text of `fabric network shared`.
pub fn render(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    vec![
                        text(x, "name"),
                        text(x, "id").chars().take(12).collect(),
                        text(x, "driver"),
                        text(x, "subnet"),
                        text(x, "gateway"),
                        text(x, "vnet_id"),
                        text(x, "endpoints"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "NAME",
            "ID",
            "DRIVER",
            "SUBNET",
            "GATEWAY",
            "VNI",
            "ENDPOINTS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_paths_are_escaped() {
        assert_eq!(
            super::super::api::percent_encode("pub lic/x"),
            "pub%20lic%2Fx"
        );
        assert_eq!(super::super::api::percent_encode("a-b_c.d"), "a-b_c.d");
    }

    #[test]
    fn listing_renders() {
        let s = render(
            &json!([{"name": "public", "id": "0123456789abcdef", "driver": "overlay",
            "subnet": "10.99.0.0/24", "gateway": "10.99.0.1", "vnet_id": 77, "endpoints": 0}]),
        );
        assert!(s.contains("public"), "{s}");
        assert!(
            s.contains("0123456789ab ") || s.contains("0123456789ab"),
            "{s}"
        );
        assert!(!s.contains("0123456789abc"), "{s}");
        assert!(s.contains("10.99.0.0/24"), "{s}");
    }
}
