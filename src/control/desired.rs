//! `GET /servers/:uuid/desired`: what an agent makes real on its host, read in ONE read
//! transaction (a consistent snapshot on both stores):
//!
//! - `seq`: the feed position the snapshot reflects (read first, so the data is at least that
//!   new; the agent follows `/changes?since=seq`);
//! - `portolan`: the SVP address to use ([`super::Config::portolan_advertise`]);
//! - `members`: the cluster's members, the underlay addresses the dataplane accepts VXLAN from
//!   and Portolan answers: every registered, unrevoked server and every foreign peer
//!   (`/peers`), as strings sorted by address (IPv4 before IPv6), without duplicates. Adding or
//!   removing one records a `server` or `peer` change, which every server's feed carries;
//! - `vms`: the server's VMs that are not destroyed (VM objects, `nics` with `vnet_id`);
//! - `firewall`: the closure its dataplane needs, exactly a
//!   [`FirewallState`](crate::firewall::compile::FirewallState): every rule (enabled or not)
//!   that is global or owned by an owner with a VM here, and every VM those rules can resolve —
//!   all non-destroyed VMs of those owners (on any server), plus every non-destroyed VM when an
//!   enabled global rule names VMs (`vm`, `tag`, `all vms`). A VM's `ips` are its NICs on
//!   fabric networks, as `{vni: vnet_id, ip}`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use serde_json::{json, Value};

use crate::firewall::compile::{FirewallState, RuleRecord, VmAddress, VmRecord};
use crate::firewall::rule::{FwRule, ParseOptions};

use super::db::{Db, Val};
use super::error::OpError;
use super::params::Params;
use super::rules::Rule;
use super::servers::{self, now_ms};
use super::vms::{self, Vm};
use super::Config;

/// The latest feed position (0 when the feed is empty).
fn feed_position(db: &mut Db<'_>) -> Result<i64, OpError> {
    db.query_opt("SELECT COALESCE(MAX(seq), 0) FROM fabric_changes", &[])?
        .and_then(|r| r.into_iter().next())
        .map_or(Ok(0), |v| v.as_i64("seq"))
}

/// Whether an enabled global rule names VMs (so it may resolve any owner's VMs).
fn global_names_vms(r: &Rule) -> bool {
    if !r.global || !r.enabled {
        return false;
    }
    let opts = ParseOptions {
        max_version: None,
        enforce_subnet_mask: true,
    };
    match FwRule::create(&r.rule, &opts) {
        Ok(x) => x.from.names_vms() || x.to.names_vms(),
        // Stored text is canonical and parsed already; if it no longer parses, assume the
        // widest closure rather than omit VMs.
        Err(_) => true,
    }
}

fn tag_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The firewall closure for the VMs in `local` (see the module docs).
pub fn firewall_closure(db: &mut Db<'_>, local: &[Vm]) -> Result<FirewallState, OpError> {
    let owners: BTreeSet<&str> = local.iter().map(|v| v.owner_uuid.as_str()).collect();
    let rules: Vec<Rule> = db
        .query("SELECT doc FROM napi_rules ORDER BY uuid", &[])?
        .into_iter()
        .map(|r| super::db::doc_from_row(r, "rule"))
        .collect::<Result<_, _>>()?;
    let rules: Vec<Rule> = rules
        .into_iter()
        .filter(|r| r.global || r.owner_uuid.as_deref().is_some_and(|o| owners.contains(o)))
        .collect();
    let everyone = !owners.is_empty() && rules.iter().any(global_names_vms);
    // The VMs: every owner's when a global rule may name them, else those owners'.
    let vms: Vec<Vm> = if owners.is_empty() {
        Vec::new()
    } else if everyone {
        db.query(
            "SELECT doc FROM fabric_vms WHERE state <> 'destroyed' ORDER BY uuid",
            &[],
        )?
        .into_iter()
        .map(super::vms::from_row)
        .collect::<Result<_, _>>()?
    } else {
        let mut out = Vec::new();
        for o in &owners {
            out.extend(
                db.query(
                    "SELECT doc FROM fabric_vms WHERE owner_uuid = $1 AND state <> 'destroyed' \
                     ORDER BY uuid",
                    &[Val::text(*o)],
                )?
                .into_iter()
                .map(super::vms::from_row)
                .collect::<Result<Vec<_>, _>>()?,
            );
        }
        out.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        out
    };
    // Their fabric addresses, in one query: (VM, network, IP) of every NIC that belongs to a
    // VM of the closure (joined, so the filter is the same as the VMs').
    let (filter, args): (String, Vec<Val>) = if everyone || owners.is_empty() {
        (String::new(), Vec::new())
    } else {
        let marks: Vec<String> = (1..=owners.len()).map(|i| format!("${i}")).collect();
        (
            format!(" AND v.owner_uuid IN ({})", marks.join(", ")),
            owners.iter().map(|o| Val::text(*o)).collect(),
        )
    };
    let mut addrs: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    if !vms.is_empty() {
        for r in db.query(
            &format!(
                "SELECT n.belongs_to_uuid, n.network_uuid, n.ip FROM napi_nics n \
                 JOIN fabric_vms v ON v.uuid = n.belongs_to_uuid \
                 WHERE v.state <> 'destroyed' AND n.network_uuid IS NOT NULL \
                   AND n.ip IS NOT NULL{filter} ORDER BY n.mac"
            ),
            &args,
        )? {
            let mut it = r.into_iter();
            let mut next = || it.next().ok_or_else(|| OpError::Corrupt("nic row".into()));
            let vm = next()?.into_string("belongs_to_uuid")?;
            let net = next()?.into_string("network_uuid")?;
            let ip = next()?.as_i64("ip")?;
            addrs.entry(vm).or_default().push((net, ip));
        }
    }
    let mut vnis: HashMap<String, Option<u32>> = HashMap::new();
    let mut records = Vec::with_capacity(vms.len());
    for vm in &vms {
        let mut ips = Vec::new();
        for (net, ip) in addrs.remove(&vm.uuid).unwrap_or_default() {
            if !vnis.contains_key(&net) {
                let v = super::networks::get(db, &net)?
                    .filter(|n| n.fabric)
                    .and_then(|n| n.vnet_id);
                vnis.insert(net.clone(), v);
            }
            if let (Some(vni), Ok(ip)) = (vnis.get(&net).copied().flatten(), u32::try_from(ip)) {
                ips.push(VmAddress {
                    vni,
                    ip: IpAddr::V4(std::net::Ipv4Addr::from(ip)),
                });
            }
        }
        records.push(VmRecord {
            uuid: vm.uuid.clone(),
            owner_uuid: vm.owner_uuid.clone(),
            tags: vm
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), tag_text(v)))
                .collect::<BTreeMap<_, _>>(),
            firewall_enabled: vm.firewall_enabled,
            ips,
        });
    }
    Ok(FirewallState {
        vms: records,
        rules: rules
            .into_iter()
            .map(|r| RuleRecord {
                uuid: r.uuid,
                owner_uuid: if r.global { None } else { r.owner_uuid },
                global: r.global,
                enabled: r.enabled,
                rule: r.rule,
            })
            .collect(),
    })
}

/// `GET /servers/:uuid/desired` (the caller runs it in one read transaction); 404 for an unknown
/// server, 410 Gone for a removed one.
pub fn snapshot(
    db: &mut Db<'_>,
    cfg: &Config,
    uuid: &str,
    p: &mut Params,
) -> Result<Value, OpError> {
    p.allow_only(&[]);
    p.finish()?;
    let seq = feed_position(db)?;
    let server = servers::find_member(db, uuid, &format!("GET /servers/{uuid}/desired"))?;
    let members: Vec<String> = servers::members(db)?
        .into_iter()
        .map(|ip| ip.to_string())
        .collect();
    let now = now_ms();
    let local = vms::on_server(db, &server.uuid)?;
    let mut vm_objects = Vec::with_capacity(local.len());
    for vm in &local {
        vm_objects.push(vms::to_json(db, cfg, vm, Some(&server), now)?);
    }
    let firewall = firewall_closure(db, &local)?;
    Ok(json!({
        "server": server.to_json(local.len() as i64, now, cfg),
        "seq": seq,
        "portolan": cfg.portolan_advertise,
        "portolan_tls": cfg.cluster.as_ref().and_then(|c| c.portolan_tls.clone()),
        "members": members,
        "vms": vm_objects,
        "firewall": serde_json::to_value(&firewall)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str, global: bool, enabled: bool) -> Rule {
        Rule {
            uuid: "r".into(),
            rule: text.into(),
            owner_uuid: (!global).then(|| "o".into()),
            global,
            enabled,
            log: false,
            version: String::new(),
            description: None,
            created_by: None,
            vms: Vec::new(),
        }
    }

    #[test]
    fn only_enabled_global_rules_naming_vms_widen_the_closure() {
        assert!(global_names_vms(&rule(
            "FROM any TO all vms ALLOW icmp TYPE 8 CODE 0",
            true,
            true
        )));
        assert!(global_names_vms(&rule(
            "FROM tag \"role\" = \"web\" TO any ALLOW tcp PORT 80",
            true,
            true
        )));
        assert!(!global_names_vms(&rule(
            "FROM any TO all vms ALLOW icmp TYPE 8 CODE 0",
            true,
            false
        )));
        assert!(!global_names_vms(&rule(
            "FROM any TO all vms ALLOW icmp TYPE 8 CODE 0",
            false,
            true
        )));
        // Every valid rule names VMs on some side (fwrule refuses one that affects none), so in
        // practice any enabled global rule widens the closure.
        let literal = "FROM any TO ip 10.0.0.2 ALLOW tcp PORT 80";
        assert!(FwRule::create(literal, &ParseOptions::default()).is_err());
    }

    #[test]
    fn tag_values_are_strings() {
        assert_eq!(tag_text(&json!("db")), "db");
        assert_eq!(tag_text(&json!(5)), "5");
        assert_eq!(tag_text(&json!(true)), "true");
    }
}
