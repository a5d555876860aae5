//! `fabric vnic …` and `fabric stats`: clients of the dataplane's control socket.

use super::control::{
    self, ControlError, FwApplied, FwListing, Request, Stats, VnicAddSpec, VnicInfo, VnicState,
};
use super::daemon::print_counters;
use super::provision::{self, VnicProvision};
use crate::firewall::compile::FirewallState;
use crate::io::netlink::Netns;
use anyhow::Context as _;
use std::path::PathBuf;

/// Where the daemon listens.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlPath {
    /// The dataplane's control socket.
    #[arg(
        long = "dataplane",
        visible_alias = "control",
        value_name = "PATH",
        default_value = "/run/fabric/dataplane.sock"
    )]
    pub control: PathBuf,
}

/// `fabric vnic …`.
#[derive(Debug, clap::Subcommand)]
pub enum VnicCmd {
    /// Create a TAP inside an existing network namespace, give it MAC, address, MTU and an
    /// on-link route (and a default route with --gateway), bring it up, and attach it to the
    /// dataplane on segment VNI (its queue fds go over the control socket).
    Add {
        #[command(flatten)]
        control: ControlPath,
        /// Existing network namespace (as created by `ip netns add`).
        #[arg(long, value_name = "NS")]
        netns: String,
        /// Interface name inside the namespace.
        #[arg(long, value_name = "IF", default_value = "eth0")]
        name: String,
        /// Segment: the tenant's 24-bit VXLAN network identifier.
        #[arg(long, value_name = "N")]
        vni: u32,
        /// MAC address (colon, dash or bare hex).
        #[arg(long, value_name = "MAC")]
        mac: String,
        /// Address with prefix length, e.g. 10.0.0.2/24.
        #[arg(long, value_name = "A/LEN")]
        ip: String,
        /// MTU (1450 leaves room for VXLAN on a 1500-byte underlay).
        #[arg(long, value_name = "M", default_value_t = 1450)]
        mtu: u32,
        /// Default gateway of the container (a route via it, on-link).
        #[arg(long, value_name = "IP")]
        gateway: Option<std::net::IpAddr>,
    },
    /// Detach a vnic from the dataplane and delete its TAP in the namespace.
    Rm {
        #[command(flatten)]
        control: ControlPath,
        /// Namespace of the vnic.
        #[arg(long, value_name = "NS")]
        netns: String,
        /// Interface name inside it.
        #[arg(long, value_name = "IF", default_value = "eth0")]
        name: String,
    },
    /// List vnics.
    Ls {
        #[command(flatten)]
        control: ControlPath,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run a `fabric vnic` subcommand.
pub fn vnic(cmd: VnicCmd) -> anyhow::Result<()> {
    match cmd {
        VnicCmd::Add {
            control,
            netns,
            name,
            vni,
            mac,
            ip,
            mtu,
            gateway,
        } => {
            let spec = VnicAddSpec {
                netns,
                name,
                vni,
                mac,
                ip,
                mtu,
            };
            // Checked before anything is created, as the dataplane will check it.
            let prov = VnicProvision::from_spec(&spec, gateway)?;
            let ns = Netns::open(&spec.netns)
                .with_context(|| format!("network namespace {:?}", spec.netns))?;
            let taps = provision::create_vnic(&ns, &prov)?;
            // On failure the TAPs are dropped here, which removes the device again.
            let info = control::attach(&control.control, &spec, &taps)?;
            drop(taps);
            println!(
                "added {} in netns {}: vni {} mac {} ip {} mtu {} (offloads {})",
                info.name, info.netns, info.vni, info.mac, info.ip, info.mtu, info.offloads
            );
        }
        VnicCmd::Rm {
            control,
            netns,
            name,
        } => {
            let detached = control::call(
                &control.control,
                &Request::VnicRm {
                    netns: netns.clone(),
                    name: name.clone(),
                },
            );
            // The link goes with the dataplane's fds; delete it anyway (a TAP someone else
            // still holds, or a dataplane that lost the vnic in a restart).
            let removed = match Netns::open(&netns) {
                Ok(ns) => provision::remove_vnic(&ns, &name)
                    .with_context(|| format!("deleting {name} in netns {netns}"))?,
                Err(_) => false,
            };
            match (detached, removed) {
                (Ok(_), _) => println!("removed {name} from netns {netns}"),
                (Err(ControlError::Refused(e)), true) => {
                    println!(
                        "deleted {name} in netns {netns} (the dataplane had no such vnic: {e})"
                    )
                }
                (Err(e), _) => return Err(e.into()),
            }
        }
        VnicCmd::Ls { control, json } => {
            let v = control::call(&control.control, &Request::VnicLs {})?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let list: Vec<VnicInfo> = serde_json::from_value(v)?;
                println!(
                    "{:<12} {:<10} {:<9} {:<18} {:<20} {:<6} STATE",
                    "NETNS", "NAME", "VNI", "MAC", "IP", "MTU"
                );
                for i in list {
                    println!(
                        "{:<12} {:<10} {:<9} {:<18} {:<20} {:<6} {}",
                        i.netns,
                        i.name,
                        i.vni,
                        i.mac,
                        i.ip,
                        i.mtu,
                        state_text(&i)
                    );
                }
            }
        }
    }
    Ok(())
}

/// Run `fabric stats`.
pub fn stats(control: ControlPath, json: bool) -> anyhow::Result<()> {
    let Some(v) = call_unless_json(&control.control, &Request::Stats {}, json)? else {
        return Ok(());
    };
    let s: Stats = serde_json::from_value(v)?;
    println!(
        "host {} underlay {} (gso {}, gro {})",
        s.cn_uuid, s.underlay, s.gso, s.gro
    );
    println!("{}", print_counters("global", &s.global));
    println!(
        "io: tap_malformed {}, underlay_send_errors {}, tap_write_errors {}, tap_read_errors {}, underlay_empty {}, underlay_truncated {}",
        s.tap_malformed,
        s.underlay_send_errors,
        s.tap_write_errors,
        s.tap_read_errors,
        s.underlay_empty,
        s.underlay_truncated
    );
    let c = &s.control;
    println!(
        "control: connections {}, refused_connections {}, requests {}, bad_requests {}, oversized_requests {}, read_timeouts {}, write_timeouts {}, attach_without_fds {}, attach_bad_fds {}, unexpected_fds {}, fd_overflows {}",
        c.connections, c.refused_connections, c.requests, c.bad_requests, c.oversized_requests, c.read_timeouts, c.write_timeouts,
        c.attach_without_fds, c.attach_bad_fds, c.unexpected_fds, c.fd_overflows
    );
    let r = &s.resolver;
    println!(
        "resolver: lookups {}, not_found {}, failed {}, log_polls {}, log_errors {}, vl2_shootdowns {}, vl3_shootdowns {}, garps {}",
        r.lookups, r.not_found, r.failed, r.log_polls, r.log_errors, r.vl2_shootdowns, r.vl3_shootdowns, r.garps
    );
    for v in &s.vnics {
        println!(
            "{}",
            print_counters(
                &format!(
                    "vnic {}/{} (vni {}, {}) {}",
                    v.netns,
                    v.name,
                    v.vni,
                    v.ip,
                    state_text(v)
                ),
                &v.counters
            )
        );
    }
    Ok(())
}

/// `fabric fw apply`.
#[derive(Debug, Clone, clap::Args)]
pub struct FwApplyArgs {
    #[command(flatten)]
    pub control: ControlPath,
    /// The whole firewall state as JSON (`-` for standard input):
    /// `{"vms":[{"uuid":…,"owner_uuid":…,"tags":{…},"firewall_enabled":true,
    /// "ips":[{"vni":N,"ip":"…"}]}], "rules":[{"uuid":…,"owner_uuid":…|"global":true,
    /// "enabled":true,"rule":"FROM … TO … ALLOW …"}]}`. A local vnic belongs to the VM that
    /// lists its (vni, ip); vnics no VM claims are not filtered.
    #[arg(value_name = "FILE.json")]
    pub file: PathBuf,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `fabric fw ls`.
#[derive(Debug, Clone, clap::Args)]
pub struct FwLsArgs {
    #[command(flatten)]
    pub control: ControlPath,
    /// The vnic (interface name).
    #[arg(long, value_name = "IF")]
    pub vnic: String,
    /// Its namespace, when the name is used in several.
    #[arg(long, value_name = "NS")]
    pub netns: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Reads a firewall state document; unknown fields and bad values are errors with a position.
pub fn read_fw_state(path: &std::path::Path) -> anyhow::Result<FirewallState> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a firewall state", path.display()))
}

/// Run `fabric fw apply`.
pub fn fw_apply(args: FwApplyArgs) -> anyhow::Result<()> {
    let state = read_fw_state(&args.file)?;
    let req = Request::FwApply { state };
    let Some(v) = call_unless_json(&args.control.control, &req, args.json)? else {
        return Ok(());
    };
    let a: FwApplied = serde_json::from_value(v)?;
    println!(
        "applied firewall generation {}: {} VMs, {} rules ({} enabled)",
        a.generation, a.vms, a.rules, a.enabled_rules
    );
    for v in &a.vnics {
        let what = filter_state(&v.vm_uuid, v.filtered);
        if v.filtered {
            println!(
                "  {}/{}: {what}, {} compiled rules",
                v.netns, v.name, v.rules
            );
        } else {
            println!("  {}/{}: {what}", v.netns, v.name);
        }
    }
    Ok(())
}

/// Run `fabric fw ls`.
pub fn fw_ls(args: FwLsArgs) -> anyhow::Result<()> {
    let req = Request::FwLs {
        netns: args.netns,
        vnic: args.vnic,
    };
    let Some(v) = call_unless_json(&args.control.control, &req, args.json)? else {
        return Ok(());
    };
    let l: FwListing = serde_json::from_value(v)?;
    let mut state = filter_state(&l.vm_uuid, l.filtered);
    if l.filtered {
        state.push_str(" (inbound default deny, outbound default allow)");
    }
    println!(
        "vnic {}/{} vni {} ip {}: {state}; firewall generation {}",
        l.netns, l.name, l.vni, l.ip, l.generation
    );
    if l.filtered {
        println!(
            "{:<4} {:>4} {:<6} {:>10}  RULE",
            "DIR", "PRI", "ACTION", "HITS"
        );
        for r in &l.rules {
            println!(
                "{:<4} {:>4} {:<6} {:>10}  {}  [{}]",
                r.direction, r.priority, r.action, r.hits, r.text, r.uuid
            );
        }
        println!(
            "denied: {} by rule, {} by the inbound default",
            l.denied_by_rule, l.denied_by_default
        );
    }
    if let Some(ct) = &l.conntrack {
        println!("conntrack (host): {} flows, {}", ct.flows, ct.counters);
    }
    Ok(())
}

/// Sends `req`; with `json`, prints the answer as JSON and returns `None`, else returns it.
fn call_unless_json(
    path: &std::path::Path,
    req: &Request,
    json: bool,
) -> anyhow::Result<Option<serde_json::Value>> {
    let v = control::call(path, req)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(None);
    }
    Ok(Some(v))
}

/// How a vnic is filtered, in words.
fn filter_state(vm_uuid: &Option<String>, filtered: bool) -> String {
    match (vm_uuid, filtered) {
        (None, _) => "no VM claims its address: unfiltered".to_string(),
        (Some(vm), false) => format!("vm {vm}, firewall off: unfiltered"),
        (Some(vm), true) => format!("vm {vm}, filtered"),
    }
}

/// `up`, or `GONE|ORPHANED <n> s ago: <reason>` for a vnic that needs `vnic rm`.
fn state_text(v: &VnicInfo) -> String {
    match v.state {
        VnicState::Up => "up".to_string(),
        VnicState::Gone | VnicState::Orphaned => {
            let ago = v.state_since_unix_ms.map_or_else(String::new, |t| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                format!(" {} s ago", now.saturating_sub(t) / 1000)
            });
            let label = if v.state == VnicState::Gone {
                "GONE"
            } else {
                "ORPHANED"
            };
            format!(
                "{label}{ago}: {} (run `fabric vnic rm`)",
                v.state_reason.as_deref().unwrap_or("unknown reason")
            )
        }
    }
}
