//! The firewall: Triton's fwrule language, compiled per vnic, enforced with connection
//! tracking, plus the rules Docker semantics imply. Everything here is sans-IO: no sockets,
//! no threads, no clock (time is a parameter).
//!
//! * [`rule`] — the fwrule language (versions 1–4): lexer, parser, parse tree (JSON in the
//!   npm package `fwrule`'s `parse()` shape), model checks and canonical text, equal to
//!   upstream on every input (`tests/fwrule_differential.rs` runs the real package).
//! * [`compile`] — rules plus a VM directory → one immutable [`compile::VnicRuleSet`] per vnic:
//!   targets resolved within the rule owner's VMs and on the vnic's VNI only, fwrule
//!   precedence, no-op rules dropped, defaults (inbound deny, outbound allow).
//! * [`conntrack`] — the flow table: first packet classified against the rule set, then one
//!   hash lookup per packet; TCP/UDP/ICMP state, timeouts, related ICMP errors, bounded size
//!   with counted eviction, no per-packet allocation.
//! * [`packet`] — an Ethernet frame → the [`conntrack::PacketSummary`] conntrack judges:
//!   IPv4/IPv6 (extension headers, fragments), TCP/UDP ports and flags, ICMP echo ids and
//!   the packet an ICMP error embeds; no allocation, no panic on any input.
//! * [`docker`] — the Docker-implied policy (sdc-docker's T3–T6 rules) for a container.
//! * [`cli`] — `fabric fw parse`.
//!
//! # How the dataplane core uses it
//!
//! ```text
//! control plane JSON ──► FirewallState ──► Firewall::new(&state)?          (validate all; on
//!                                             │                            error keep the old)
//!        per local vnic (vm uuid, vni):       ▼
//!        Arc<VnicRuleSet> = Arc::new(fw.compile_vnic(vm, vni, generation))
//!
//! per packet (one Conntrack per hot-path thread, flows pinned to threads by hash):
//!   let summary = PacketSummary::tcp(src, sport, dst, dport, flags);  // or udp/icmp/…
//!   match conntrack.classify(&vnic.rules, Direction::Egress /* from the vnic */, &summary, now) {
//!       Verdict::Allow { .. } => forward,
//!       Verdict::Deny { rule } => drop, count (per rule, or "default")
//!   }
//! ```
//!
//! * **Building**: [`compile::Firewall::new`] validates a whole [`compile::FirewallState`]
//!   (bad rules are rejected with their UUID); [`compile::Firewall::compile_vnic`]`(vm_uuid,
//!   vni, generation) -> VnicRuleSet`.
//! * **Swapping**: a rule set is immutable; the core holds `Arc<VnicRuleSet>` per vnic in its
//!   read-mostly vnic snapshot and replaces the `Arc` (with a higher `generation`) when the
//!   state changes. No lock is needed on the packet path; packets in flight finish with the
//!   set they loaded. Conntrack notices the new generation on a flow's next packet and
//!   re-checks that flow once: it survives unless the new rules deny it.
//! * **Classifying**: [`conntrack::Conntrack::classify`]`(&VnicRuleSet, Direction,
//!   &PacketSummary, now: Duration) -> Verdict`. `Direction::Egress` for frames from the vnic,
//!   `Direction::Ingress` for frames to it. An offloaded super-frame is one call (its first
//!   segment's header). ICMP errors should carry their embedded header in
//!   [`conntrack::IcmpInfo::inner`] so they can pass as related.
//! * **Housekeeping**: [`conntrack::Conntrack::sweep`]`(now, budget)` now and then;
//!   [`conntrack::Conntrack::stats`] and [`compile::VnicRuleSet::hit_counts`] for counters;
//!   [`compile::VnicRuleSet::listing`] for `fw ls`.

pub mod cli;
pub mod compile;
pub mod conntrack;
pub mod docker;
mod index;
pub mod packet;
pub mod rule;
