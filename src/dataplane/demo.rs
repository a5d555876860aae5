//! `fabric demo`: two in-process hosts, two tenants reusing one subnet, and a report.
//!
//! Runs unprivileged on loopback: host 1 and host 2 are cores with UDP underlay sockets on
//! 127.0.0.11 and 127.0.0.12; containers are smoltcp stacks; one container is firewalled
//! (tcp port 80 and ping allowed in, everything else denied). Each step is an expectation;
//! the demo fails (non-zero exit) if any is not met.

use super::inproc::{ContainerId, World, WorldError};
use crate::core::{Config, CountersSnapshot, DropReason};
use crate::wire::{vxlan, Mac, Vni};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// One checked step.
#[derive(Debug, Clone)]
pub struct Check {
    /// Whether the expectation held.
    pub ok: bool,
    /// What was expected and what happened.
    pub text: String,
}

/// The demo's outcome.
#[derive(Debug, Clone)]
pub struct Report {
    /// Topology description.
    pub topology: String,
    /// Steps in order.
    pub checks: Vec<Check>,
    /// Counters per host, then per vnic.
    pub counters: Vec<(String, CountersSnapshot)>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl Report {
    /// Whether every expectation held.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "fabric demo: two hosts, two tenants, one reused subnet (10.0.0.0/24)\n"
        );
        s.push_str(&self.topology);
        s.push('\n');
        for c in &self.checks {
            let _ = writeln!(s, "  [{}] {}", if c.ok { " ok " } else { "FAIL" }, c.text);
        }
        let _ = writeln!(s, "\ncounters (non-zero):");
        for (name, c) in &self.counters {
            let mut line = format!(
                "  {name:<16} rx={} to_underlay={} to_vnic={} arp_replied={} held={} released={} vl2_lookups={} vl3_lookups={}",
                c.rx_frames, c.to_underlay, c.to_vnic, c.arp_replied, c.held, c.released, c.vl2_lookups, c.vl3_lookups
            );
            for (reason, n) in &c.drops {
                let _ = write!(line, " drop.{reason}={n}");
            }
            let _ = writeln!(s, "{line}");
        }
        let passed = self.checks.iter().filter(|c| c.ok).count();
        let _ = writeln!(
            s,
            "\n{} {passed}/{} expectations met in {:.2} s",
            if self.ok() { "PASS" } else { "FAIL" },
            self.checks.len(),
            self.elapsed.as_secs_f64()
        );
        s
    }
}

struct Tenant {
    name: &'static str,
    vni: Vni,
    a: ContainerId,
    b: ContainerId,
}

/// The demo's firewall: blue-c (10.0.0.3 on `vni`) allows tcp port 80 and, by the global
/// rule, echo requests; everything else inbound is denied by the default.
fn demo_firewall(
    vni: Vni,
) -> Result<
    std::sync::Arc<crate::firewall::compile::VnicRuleSet>,
    crate::firewall::compile::StateError,
> {
    use crate::firewall::compile::{Firewall, FirewallState, RuleRecord, VmAddress, VmRecord};
    const VM: &str = "b10ec000-0000-4000-8000-000000000003";
    const OWNER: &str = "b10e0000-0000-4000-8000-000000000000";
    let rule = |uuid: &str, owner: Option<&str>, text: String| RuleRecord {
        uuid: uuid.into(),
        owner_uuid: owner.map(Into::into),
        global: owner.is_none(),
        enabled: true,
        rule: text,
    };
    let state = FirewallState {
        vms: vec![VmRecord {
            uuid: VM.into(),
            owner_uuid: OWNER.into(),
            tags: Default::default(),
            firewall_enabled: true,
            ips: vec![VmAddress {
                vni: vni.get(),
                ip: Ipv4Addr::new(10, 0, 0, 3).into(),
            }],
        }],
        rules: vec![
            rule(
                "f1000000-0000-4000-8000-000000000001",
                Some(OWNER),
                format!("FROM any TO vm {VM} ALLOW tcp PORT 80"),
            ),
            rule(
                "f1000000-0000-4000-8000-000000000002",
                None,
                "FROM any TO all vms ALLOW icmp TYPE 8 CODE 0".into(),
            ),
        ],
    };
    Ok(std::sync::Arc::new(Firewall::new(&state)?.compile_vnic(
        VM,
        vni.get(),
        1,
    )))
}

/// Run the demo.
pub fn run() -> Result<Report, WorldError> {
    let started = Instant::now();
    // A mapping service that takes 5 ms to answer, so held frames are visible.
    let mut w = World::with_config(Duration::from_millis(5), Config::default());
    let h1 = w.add_host("host1", Ipv4Addr::new(127, 0, 0, 11))?;
    let h2 = w.add_host("host2", Ipv4Addr::new(127, 0, 0, 12))?;
    let mac = |t: u8, n: u8| Mac([0x02, 0x08, 0x20, t, 0, n]);
    let ip = |n: u8| Ipv4Addr::new(10, 0, 0, n);
    let mut tenants = Vec::new();
    for (t, name, vni) in [(1u8, "red", 4001u32), (2, "blue", 4002)] {
        let vni = Vni::new(vni).expect("24-bit");
        // Identical IPs in both tenants; identical MACs too for the .1 containers.
        let a = w.add_container(&format!("{name}-a"), h1, vni, mac(0, 1), ip(1), 24)?;
        let b = w.add_container(&format!("{name}-b"), h2, vni, mac(t, 2), ip(2), 24)?;
        tenants.push(Tenant { name, vni, a, b });
    }
    // blue has a third container, 10.0.0.3, which red must never reach.
    let blue_c = w.add_container("blue-c", h2, tenants[1].vni, mac(2, 3), ip(3), 24)?;

    let mut topology = String::new();
    let _ = writeln!(
        topology,
        "  underlay: host1 {}  host2 {}   (VXLAN over UDP on loopback)",
        w.host(h1).underlay_addr(),
        w.host(h2).underlay_addr()
    );
    let _ = writeln!(
        topology,
        "  {:<8} {:<6} {:<8} {:<6} {:<18} ip",
        "tenant", "vni", "name", "host", "mac"
    );
    for c in &w.containers {
        let tenant = if c.vni == tenants[0].vni {
            "red"
        } else {
            "blue"
        };
        let _ = writeln!(
            topology,
            "  {:<8} {:<6} {:<8} {:<6} {:<18} {}/24",
            tenant,
            c.vni,
            c.name,
            w.host(c.host).name,
            c.mac,
            c.ip
        );
    }

    let mut checks = Vec::new();
    let mut check = |ok: bool, text: String| checks.push(Check { ok, text });
    let t = Duration::from_secs(5);

    for tn in &tenants {
        let rtt = w.ping(tn.a, ip(2), 1, t)?;
        check(
            rtt.is_some(),
            match rtt {
                Some(d) => format!(
                    "{}: ping 10.0.0.1 -> 10.0.0.2 across hosts, rtt {:.2} ms",
                    tn.name,
                    d.as_secs_f64() * 1e3
                ),
                None => format!("{}: ping 10.0.0.1 -> 10.0.0.2 got no reply", tn.name),
            },
        );
        // Warm the reverse direction too (smoltcp drops replies while it resolves).
        w.ping(tn.b, ip(1), 2, t)?;
        let len = 4 << 20;
        match w.tcp_transfer(tn.a, tn.b, 5001, len, Duration::from_secs(30)) {
            Ok(tr) => check(
                tr.content_ok,
                format!(
                    "{}: TCP 4 MiB 10.0.0.1 -> 10.0.0.2 in {:.2} s ({:.0} Mbit/s), content {}",
                    tn.name,
                    tr.elapsed.as_secs_f64(),
                    tr.bytes as f64 * 8.0 / tr.elapsed.as_secs_f64() / 1e6,
                    if tr.content_ok {
                        "verified"
                    } else {
                        "CORRUPTED"
                    }
                ),
            ),
            Err(e) => check(false, format!("{}: TCP transfer failed: {e}", tn.name)),
        }
    }

    let arp_replied: u64 = [h1, h2]
        .iter()
        .map(|h| w.host(*h).core.counters().arp_replied)
        .sum();
    check(
        arp_replied > 0 && w.underlay.arp_frames == 0 && w.underlay.flood_frames == 0,
        format!(
            "ARP answered locally: {arp_replied} requests answered by the proxies, {} ARP and {} broadcast frames on the underlay ({} datagrams in all)",
            w.underlay.arp_frames, w.underlay.flood_frames, w.underlay.datagrams
        ),
    );
    let (vl3, held, released) = [h1, h2].iter().fold((0, 0, 0), |(a, b, c), h| {
        let k = w.host(*h).core.counters();
        (a + k.vl3_lookups, b + k.held, c + k.released)
    });
    check(
        vl3 > 0 && held > 0 && released == held,
        format!("lookups resolved: {vl3} VL3 lookups; {held} frames held while resolving, {released} released, none lost"),
    );

    // Isolation: red-a asks for 10.0.0.3, which only blue has.
    let red = &tenants[0];
    let reply = w.ping(red.a, ip(3), 3, Duration::from_millis(1500))?;
    let k = w.host(h1).core.counters();
    let (nf, neg) = (
        k.drops_of(DropReason::LookupNotFound),
        k.drops_of(DropReason::NegativeCached),
    );
    check(
        reply.is_none() && nf > 0,
        format!(
            "isolation: red-a -> 10.0.0.3 (exists only in blue) {}: lookup on VNI {} not found ({nf} dropped, {neg} more by the negative cache)",
            if reply.is_none() { "blocked" } else { "ANSWERED" },
            red.vni
        ),
    );
    let blue_reply = w.ping(tenants[1].a, ip(3), 4, t)?;
    check(
        blue_reply.is_some(),
        "isolation: blue-a -> 10.0.0.3 in its own tenant answers".to_string(),
    );

    // A forged datagram for red's VNI addressed to blue-c's MAC is not delivered.
    let before = w
        .host(h2)
        .core
        .counters()
        .drops_of(DropReason::NoVnicForMac);
    let mut d = vec![0u8; vxlan::HEADER_LEN];
    vxlan::write_header(&mut d, red.vni);
    let mut inner = vec![0u8; 60];
    inner[0..6].copy_from_slice(&w.container(blue_c).mac.0);
    inner[6..12].copy_from_slice(&mac(0, 1).0);
    inner[12..14].copy_from_slice(&[0x08, 0x00]);
    d.extend_from_slice(&inner);
    w.inject_underlay(Ipv4Addr::new(127, 0, 0, 11), h2, &d)?;
    let forged = w
        .run_until("forged datagram", t, |w| {
            w.host(h2)
                .core
                .counters()
                .drops_of(DropReason::NoVnicForMac)
                > before
        })
        .is_ok();
    check(
        forged,
        format!(
            "isolation: forged VXLAN on VNI {} to blue-c's MAC dropped (no_vnic_for_mac)",
            red.vni
        ),
    );

    // Firewall: blue-c's VM gets its firewall on, with one inbound rule (tcp port 80) and
    // the operator's global echo-request rule. The rule set is compiled from an fwrule
    // document, as `fabric fw apply` does, and swapped into host2's core.
    let rules = demo_firewall(tenants[1].vni).map_err(|e| WorldError::Stack(e.to_string()))?;
    let vnic_c = w.container(blue_c).vnic;
    w.host_mut(h2)
        .core
        .set_firewall(vnic_c, Some(rules))
        .map_err(|e| WorldError::Stack(e.to_string()))?;
    let blue_a = tenants[1].a;
    let http = w.tcp_transfer(blue_a, blue_c, 80, 256 << 10, Duration::from_secs(10));
    check(
        matches!(&http, Ok(tr) if tr.content_ok),
        match &http {
            Ok(tr) => {
                format!(
                "firewall: blue-c allows tcp port 80: 256 KiB from blue-a in {:.2} s, content {}",
                tr.elapsed.as_secs_f64(),
                if tr.content_ok { "verified" } else { "CORRUPTED" }
            )
            }
            Err(e) => format!("firewall: blue-a -> blue-c tcp port 80 failed: {e}"),
        },
    );
    let denied = |w: &World| {
        w.host(h2)
            .core
            .vnic_counters(vnic_c)
            .map_or(0, |k| k.drops_of(DropReason::FirewallDefault))
    };
    let before = denied(&w);
    let udp = w.udp_once(blue_a, blue_c, 53, b"query", Duration::from_millis(800))?;
    let after = denied(&w);
    let pinged = w.ping(blue_a, ip(3), 2, t)?;
    check(
        !udp && after > before && pinged.is_some(),
        format!(
            "firewall: blue-a -> blue-c udp port 53 {} by the inbound default ({} counted), ping {} by the global echo rule",
            if udp { "DELIVERED" } else { "dropped" },
            after - before,
            if pinged.is_some() { "allowed" } else { "NOT answered" }
        ),
    );

    let mut counters = Vec::new();
    for h in [h1, h2] {
        counters.push((w.host(h).name.clone(), w.host(h).core.counters().snapshot()));
    }
    for c in &w.containers {
        if let Some(k) = w.host(c.host).core.vnic_counters(c.vnic) {
            counters.push((format!("  {}", c.name), k.snapshot()));
        }
    }
    Ok(Report {
        topology,
        checks,
        counters,
        elapsed: started.elapsed(),
    })
}
