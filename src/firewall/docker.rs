//! The firewall policy Docker semantics imply, in sdc-docker's exact form (`specs/fwrule.md`
//! §5 and §8, T1–T7).
//!
//! * Every docker container is `firewall_enabled` and tagged `sdc_docker = true`
//!   ([`DockerPolicy::tags`]); with the defaults that gives T1 (inbound denied) and T2
//!   (outbound allowed, stateful — conntrack's job).
//! * T3/T4 ([`account_rules`]): per account, `FROM tag sdc_docker TO tag sdc_docker ALLOW tcp
//!   PORT all` and the same for udp. Owned by the account, so they never cross tenants.
//! * T5 ([`publish_rules`]): for each protocol with published ports, `FROM any to vm <uuid>
//!   ALLOW <proto> ports a,b-c,…` (ports de-duplicated, sorted and merged into ranges as
//!   sdc-docker's `compressPorts`, at most 8 entries per rule). With language version 1 the
//!   form is `… ALLOW <proto> (port a AND port b …)`, 8 ports per rule, each chunk sorted as
//!   strings (JavaScript's default sort), as sdc-docker writes it. `-p` publishes its
//!   container port (host port must equal it; the host IP is ignored); `-P` publishes every
//!   image `EXPOSE` entry; exposed-but-unpublished ports get no rule.
//! * T6 ([`global_rules`]): the operator's global `FROM any TO all vms ALLOW icmp TYPE 8 CODE 0`.
//!
//! Rule UUIDs are derived from their content (RFC 9562 version 8, name-based), so recomputing
//! the policy of an unchanged container yields the same rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::compile::RuleRecord;
use super::rule::PortTarget;

/// Most ports or ranges in one sdc-docker publish rule (`MAX_PORTS_PER_RULE`).
pub const MAX_PORTS_PER_RULE: usize = 8;
/// Most published entries per protocol (`MAX_EXPOSED_PORTS`).
pub const MAX_EXPOSED_PORTS: usize = 128;

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl PortProto {
    fn as_str(self) -> &'static str {
        match self {
            PortProto::Tcp => "tcp",
            PortProto::Udp => "udp",
        }
    }
}

/// One `-p` binding (`HostConfig.PortBindings` entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortBinding {
    /// Container port.
    pub port: u16,
    /// Protocol.
    pub proto: PortProto,
    /// Host port, if given; it must equal `port` (no remapping).
    #[serde(default)]
    pub host_port: Option<u16>,
    /// Host IP, if given; ignored, as sdc-docker does.
    #[serde(default)]
    pub host_ip: Option<String>,
}

/// What the policy needs to know about a container.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContainerDescription {
    /// Container (VM) UUID.
    pub uuid: String,
    /// Owner account UUID.
    pub owner_uuid: String,
    /// The container's own tags (labels turned tags), if any.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// `-p` bindings.
    #[serde(default)]
    pub published: Vec<PortBinding>,
    /// The image's `EXPOSE` entries.
    #[serde(default)]
    pub exposed: Vec<(PortProto, u16)>,
    /// `-P`: publish every exposed port.
    #[serde(default)]
    pub publish_all: bool,
}

/// Which Docker-implied rule this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImpliedKind {
    /// T3: intra-account TCP.
    AccountTcp,
    /// T4: intra-account UDP.
    AccountUdp,
    /// T5: published ports.
    Published,
    /// T6: global echo request.
    GlobalPing,
}

/// A rule the Docker semantics imply, ready to store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImpliedRule {
    /// Which rule of the policy.
    pub kind: ImpliedKind,
    /// The stored rule (enabled, owner or global).
    pub record: RuleRecord,
}

/// The policy of one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerPolicy {
    /// The container's tags, `sdc_docker = true` added.
    pub tags: BTreeMap<String, String>,
    /// Always true for docker containers.
    pub firewall_enabled: bool,
    /// The account rules (T3/T4) and the container's publish rules (T5).
    pub rules: Vec<ImpliedRule>,
}

/// Why a container's publish request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerPolicyError {
    /// `-p H:C` with H ≠ C.
    #[error("publish port: remapping of port numbers not allowed (host port {host} for container port {port}/{proto})")]
    Remapping {
        /// Container port.
        port: u16,
        /// Host port asked for.
        host: u16,
        /// Protocol.
        proto: &'static str,
    },
    /// More than [`MAX_EXPOSED_PORTS`] entries for one protocol.
    #[error(
        "publish port: only support processing {MAX_EXPOSED_PORTS} {proto} ports ({count} given)"
    )]
    TooManyPorts {
        /// Protocol, upper case.
        proto: &'static str,
        /// How many were given.
        count: usize,
    },
    /// Port 0 cannot be published.
    #[error("publish port: port 0/{proto} is not a valid port")]
    PortZero {
        /// Protocol.
        proto: &'static str,
    },
}

/// A name-based UUID (RFC 9562 version 8) from the given parts.
fn derived_uuid(parts: &[&str]) -> String {
    // Two independent 64-bit FNV-1a hashes over the parts.
    let mut h1: u64 = 0xcbf2_9ce4_8422_2325;
    let mut h2: u64 = 0x8422_2325_cbf2_9ce4;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h1 = (h1 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            h2 = (h2 ^ u64::from(b))
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(17);
        }
    }
    let hi = (h1 & !0xf000) | 0x8000; // version 8 in bits 48..52 of the first half
    let lo = (h2 & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000; // variant 10
    let h = format!("{hi:016x}{lo:016x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// T3/T4: the two per-account rules between `sdc_docker`-tagged VMs.
pub fn account_rules(owner_uuid: &str) -> Vec<ImpliedRule> {
    [
        (PortProto::Tcp, ImpliedKind::AccountTcp),
        (PortProto::Udp, ImpliedKind::AccountUdp),
    ]
    .into_iter()
    .map(|(p, kind)| {
        let rule = format!(
            "FROM tag sdc_docker TO tag sdc_docker ALLOW {} PORT all",
            p.as_str()
        );
        ImpliedRule {
            kind,
            record: RuleRecord {
                uuid: derived_uuid(&["sdc_docker-account", owner_uuid, &rule]),
                owner_uuid: Some(owner_uuid.to_string()),
                global: false,
                enabled: true,
                rule,
            },
        }
    })
    .collect()
}

/// T6: the operator's global rules (echo request to every VM).
pub fn global_rules() -> Vec<ImpliedRule> {
    let rule = "FROM any TO all vms ALLOW icmp TYPE 8 CODE 0".to_string();
    vec![ImpliedRule {
        kind: ImpliedKind::GlobalPing,
        record: RuleRecord {
            uuid: derived_uuid(&["global", &rule]),
            owner_uuid: None,
            global: true,
            enabled: true,
            rule,
        },
    }]
}

/// sdc-docker's `compressPorts`: de-duplicated, ascending, consecutive ports merged.
pub fn compress_ports(ports: &[u16]) -> Vec<PortTarget> {
    let mut sorted: Vec<u16> = ports.iter().copied().filter(|&p| p > 0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = Vec::new();
    let mut iter = sorted.into_iter();
    let Some(first) = iter.next() else {
        return out;
    };
    let (mut start, mut end) = (first, first);
    let mut push = |s: u16, e: u16| {
        out.push(if s == e {
            PortTarget::Port(s)
        } else {
            PortTarget::Range { start: s, end: e }
        })
    };
    for p in iter {
        if u32::from(end) + 1 == u32::from(p) {
            end = p;
        } else {
            push(start, end);
            start = p;
            end = p;
        }
    }
    push(start, end);
    out
}

/// The published (proto, port) list in sdc-docker's order: image EXPOSE entries first (when
/// `-P`), then `-p` bindings.
fn published_ports(
    c: &ContainerDescription,
) -> Result<BTreeMap<PortProto, Vec<u16>>, DockerPolicyError> {
    let mut by_proto: BTreeMap<PortProto, Vec<u16>> = BTreeMap::new();
    let mut add = |proto: PortProto, port: u16| -> Result<(), DockerPolicyError> {
        if port == 0 {
            return Err(DockerPolicyError::PortZero {
                proto: proto.as_str(),
            });
        }
        let list = by_proto.entry(proto).or_default();
        list.push(port);
        if list.len() > MAX_EXPOSED_PORTS {
            return Err(DockerPolicyError::TooManyPorts {
                proto: match proto {
                    PortProto::Tcp => "TCP",
                    PortProto::Udp => "UDP",
                },
                count: list.len(),
            });
        }
        Ok(())
    };
    if c.publish_all {
        for &(proto, port) in &c.exposed {
            add(proto, port)?;
        }
    }
    for b in &c.published {
        if let Some(h) = b.host_port {
            if h != b.port {
                return Err(DockerPolicyError::Remapping {
                    port: b.port,
                    host: h,
                    proto: b.proto.as_str(),
                });
            }
        }
        add(b.proto, b.port)?;
    }
    Ok(by_proto)
}

/// T5: the publish rules of one container, for FWAPI language version `fwrule_version`.
pub fn publish_rules(
    c: &ContainerDescription,
    fwrule_version: u32,
) -> Result<Vec<ImpliedRule>, DockerPolicyError> {
    let mut rules = Vec::new();
    for (proto, ports) in published_ports(c)? {
        let texts: Vec<String> = if fwrule_version > 1 {
            compress_ports(&ports)
                .chunks(MAX_PORTS_PER_RULE)
                .map(|chunk| {
                    let list: Vec<String> = chunk
                        .iter()
                        .map(|p| match *p {
                            PortTarget::Range { start, end } => format!("{start}-{end}"),
                            PortTarget::Port(n) => n.to_string(),
                            PortTarget::All => "all".to_string(),
                        })
                        .collect();
                    format!(
                        "FROM any to vm {} ALLOW {} ports {}",
                        c.uuid,
                        proto.as_str(),
                        list.join(",")
                    )
                })
                .collect()
        } else {
            ports
                .chunks(MAX_PORTS_PER_RULE)
                .map(|chunk| {
                    // JavaScript's default sort compares the numbers as strings.
                    let mut list: Vec<String> = chunk.iter().map(u16::to_string).collect();
                    list.sort();
                    format!(
                        "FROM any to vm {} ALLOW {} (port {})",
                        c.uuid,
                        proto.as_str(),
                        list.join(" AND port ")
                    )
                })
                .collect()
        };
        for rule in texts {
            rules.push(ImpliedRule {
                kind: ImpliedKind::Published,
                record: RuleRecord {
                    uuid: derived_uuid(&["sdc_docker-publish", &c.owner_uuid, &c.uuid, &rule]),
                    owner_uuid: Some(c.owner_uuid.clone()),
                    global: false,
                    enabled: true,
                    rule,
                },
            });
        }
    }
    Ok(rules)
}

/// The whole policy of one container: tags, T3/T4 for its account, T5 for its ports. The
/// global T6 rules are the operator's and come from [`global_rules`] once per deployment.
pub fn container_policy(
    c: &ContainerDescription,
    fwrule_version: u32,
) -> Result<DockerPolicy, DockerPolicyError> {
    let mut tags = c.tags.clone();
    tags.insert("sdc_docker".into(), "true".into());
    let mut rules = account_rules(&c.owner_uuid);
    rules.extend(publish_rules(c, fwrule_version)?);
    Ok(DockerPolicy {
        tags,
        firewall_enabled: true,
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::compile::{Direction, Firewall, FirewallState, VmAddress, VmRecord};
    use crate::firewall::conntrack::{Conntrack, ConntrackConfig, PacketSummary, TCP_ACK, TCP_SYN};
    use crate::firewall::rule::{FwRule, ParseOptions};
    use std::net::IpAddr;
    use std::time::Duration;

    const A: &str = "aaaaaaaa-0000-4000-8000-000000000000";
    const B: &str = "bbbbbbbb-0000-4000-8000-000000000000";
    const C: &str = "cccccccc-0000-4000-8000-000000000000";
    const C1: &str = "00000000-0000-4000-8000-0000000000c1";
    const C2: &str = "00000000-0000-4000-8000-0000000000c2";
    const B1: &str = "00000000-0000-4000-8000-0000000000b1";
    const X1: &str = "00000000-0000-4000-8000-0000000000d1";

    fn bind(port: u16, proto: PortProto) -> PortBinding {
        PortBinding {
            port,
            proto,
            host_port: Some(port),
            host_ip: None,
        }
    }

    fn container(uuid: &str, owner: &str) -> ContainerDescription {
        ContainerDescription {
            uuid: uuid.into(),
            owner_uuid: owner.into(),
            ..Default::default()
        }
    }

    fn texts(rules: &[ImpliedRule]) -> Vec<&str> {
        rules.iter().map(|r| r.record.rule.as_str()).collect()
    }

    #[test]
    fn compress_ports_like_sdc_docker() {
        assert_eq!(
            compress_ports(&[443, 80, 81, 82, 80, 8000, 0]),
            vec![
                PortTarget::Range { start: 80, end: 82 },
                PortTarget::Port(443),
                PortTarget::Port(8000)
            ]
        );
        assert_eq!(
            compress_ports(&[65535, 65534]),
            vec![PortTarget::Range {
                start: 65534,
                end: 65535
            }]
        );
        assert!(compress_ports(&[]).is_empty());
    }

    #[test]
    fn publish_rules_exact_form_and_chunking() {
        let mut c = container(C1, A);
        c.published = (1..=10u16).map(|i| bind(i * 10, PortProto::Tcp)).collect();
        c.published.push(bind(11, PortProto::Tcp));
        c.published.push(bind(12, PortProto::Tcp));
        c.published.push(PortBinding {
            host_ip: Some("127.0.0.1".into()),
            ..bind(53, PortProto::Udp)
        });
        let rules = publish_rules(&c, 4).unwrap();
        assert_eq!(
            texts(&rules),
            vec![
                format!("FROM any to vm {C1} ALLOW tcp ports 10-12,20,30,40,50,60,70,80"),
                format!("FROM any to vm {C1} ALLOW tcp ports 90,100"),
                format!("FROM any to vm {C1} ALLOW udp ports 53"),
            ]
        );
        for r in &rules {
            assert_eq!(r.kind, ImpliedKind::Published);
            assert_eq!(r.record.owner_uuid.as_deref(), Some(A));
            let parsed = FwRule::create(&r.record.rule, &ParseOptions::default()).unwrap();
            assert!(parsed.text().starts_with("FROM any TO vm "));
        }
        // Version 1: (port a AND port b), 8 per rule, string-sorted per chunk, no merging.
        let mut c1 = container(C1, A);
        c1.published = [80u16, 443, 9, 80]
            .iter()
            .map(|&p| bind(p, PortProto::Tcp))
            .collect();
        assert_eq!(
            texts(&publish_rules(&c1, 1).unwrap()),
            vec![format!(
                "FROM any to vm {C1} ALLOW tcp (port 443 AND port 80 AND port 80 AND port 9)"
            )]
        );
    }

    #[test]
    fn publish_all_exposed_and_refusals() {
        let mut c = container(C1, A);
        c.exposed = vec![(PortProto::Tcp, 8080), (PortProto::Udp, 5000)];
        assert!(
            publish_rules(&c, 4).unwrap().is_empty(),
            "EXPOSE alone publishes nothing"
        );
        c.publish_all = true;
        c.published = vec![bind(8081, PortProto::Tcp)];
        assert_eq!(
            texts(&publish_rules(&c, 4).unwrap()),
            vec![
                format!("FROM any to vm {C1} ALLOW tcp ports 8080-8081"),
                format!("FROM any to vm {C1} ALLOW udp ports 5000"),
            ]
        );
        c.published = vec![PortBinding {
            host_port: Some(8000),
            ..bind(80, PortProto::Tcp)
        }];
        assert!(matches!(
            publish_rules(&c, 4),
            Err(DockerPolicyError::Remapping {
                port: 80,
                host: 8000,
                ..
            })
        ));
        let mut many = container(C1, A);
        many.published = (1..=129u16).map(|p| bind(p * 2, PortProto::Udp)).collect();
        assert!(matches!(
            publish_rules(&many, 4),
            Err(DockerPolicyError::TooManyPorts { count: 129, .. })
        ));
    }

    #[test]
    fn account_and_global_rules_canonical_text() {
        let rules = container_policy(&container(C1, A), 4).unwrap();
        assert_eq!(
            rules.tags.get("sdc_docker").map(String::as_str),
            Some("true")
        );
        let canon: Vec<String> = rules
            .rules
            .iter()
            .map(|r| {
                FwRule::create(&r.record.rule, &ParseOptions::default())
                    .unwrap()
                    .text()
            })
            .collect();
        assert_eq!(
            canon,
            vec![
                r#"FROM tag "sdc_docker" TO tag "sdc_docker" ALLOW tcp PORT all"#,
                r#"FROM tag "sdc_docker" TO tag "sdc_docker" ALLOW udp PORT all"#,
            ]
        );
        let g = global_rules();
        assert!(g[0].record.global && g[0].record.owner_uuid.is_none());
        assert_eq!(
            g[0].record.rule,
            "FROM any TO all vms ALLOW icmp TYPE 8 CODE 0"
        );
        // Deterministic, distinct UUIDs.
        assert_eq!(account_rules(A), account_rules(A));
        assert_ne!(
            account_rules(A)[0].record.uuid,
            account_rules(B)[0].record.uuid
        );
    }

    /// T1–T7 end to end through compile + conntrack: a published port is reachable from
    /// another account, others are not; one account's containers reach each other on any
    /// TCP port; a third account cannot; ping comes in through the global rule; replies to
    /// outbound connections come back.
    #[test]
    fn docker_policy_end_to_end() {
        const SHARED: u32 = 300;
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let mut c1 = container(C1, A);
        c1.published = vec![bind(80, PortProto::Tcp)];
        let c2 = container(C2, A);
        let b1 = container(B1, B);
        let x1 = container(X1, C);
        let mut vms = Vec::new();
        let mut rules = global_rules();
        for (c, addr) in [
            (&c1, "10.9.0.1"),
            (&c2, "10.9.0.2"),
            (&b1, "10.9.0.3"),
            (&x1, "10.9.0.4"),
        ] {
            let p = container_policy(c, 4).unwrap();
            vms.push(VmRecord {
                uuid: c.uuid.clone(),
                owner_uuid: c.owner_uuid.clone(),
                tags: p.tags,
                firewall_enabled: p.firewall_enabled,
                ips: vec![VmAddress {
                    vni: SHARED,
                    ip: ip(addr),
                }],
            });
            for r in p.rules {
                if !rules.iter().any(|e| e.record.uuid == r.record.uuid) {
                    rules.push(r);
                }
            }
        }
        let state = FirewallState {
            vms,
            rules: rules.into_iter().map(|r| r.record).collect(),
        };
        let fw = Firewall::new(&state).unwrap();
        let rs1 = fw.compile_vnic(C1, SHARED, 1);
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let t0 = Duration::ZERO;
        let syn = |from: &str, port: u16| {
            PacketSummary::tcp(ip(from), 40000, ip("10.9.0.1"), port, TCP_SYN)
        };
        assert!(
            ct.classify(&rs1, Direction::Ingress, &syn("10.9.0.3", 80), t0)
                .is_allow(),
            "published port from account B"
        );
        assert!(
            !ct.classify(&rs1, Direction::Ingress, &syn("10.9.0.3", 81), t0)
                .is_allow(),
            "unpublished port from account B"
        );
        assert!(
            ct.classify(&rs1, Direction::Ingress, &syn("10.9.0.2", 5432), t0)
                .is_allow(),
            "same account, any port"
        );
        assert!(
            !ct.classify(&rs1, Direction::Ingress, &syn("10.9.0.4", 5432), t0)
                .is_allow(),
            "third account"
        );
        let ping = PacketSummary::icmp(ip("10.9.0.4"), ip("10.9.0.1"), 8, 0, 1);
        assert!(
            ct.classify(&rs1, Direction::Ingress, &ping, t0).is_allow(),
            "global ping rule"
        );
        let udp_in = PacketSummary::udp(ip("10.9.0.4"), 1, ip("10.9.0.1"), 53);
        assert!(!ct
            .classify(&rs1, Direction::Ingress, &udp_in, t0)
            .is_allow());
        // Outbound to the third account's container, and its reply.
        let out = PacketSummary::tcp(ip("10.9.0.1"), 50000, ip("10.9.0.4"), 22, TCP_SYN);
        assert!(ct.classify(&rs1, Direction::Egress, &out, t0).is_allow());
        let back = PacketSummary::tcp(ip("10.9.0.4"), 22, ip("10.9.0.1"), 50000, TCP_SYN | TCP_ACK);
        assert!(
            ct.classify(&rs1, Direction::Ingress, &back, t0).is_allow(),
            "reply to outbound"
        );
    }
}
