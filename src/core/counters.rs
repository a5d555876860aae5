//! Typed drop reasons and the counters kept for every verdict, per vnic and global.

use serde::Serialize;

macro_rules! drop_reasons {
    ($( $(#[$doc:meta])* $name:ident = $label:literal, )*) => {
        /// Why the core dropped a frame. Every variant has a counter.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason { $( $(#[$doc])* $name, )* }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// Number of reasons.
            pub const COUNT: usize = Self::ALL.len();

            /// A stable snake_case label for stats output.
            pub const fn label(self) -> &'static str {
                match self { $(DropReason::$name => $label,)* }
            }
        }
    };
}

drop_reasons! {
    /// The frame came from a vnic id the core does not know.
    UnknownVnic = "unknown_vnic",
    /// Shorter than an Ethernet header, or an IP/ARP/NDP header inside is malformed.
    Malformed = "malformed",
    /// A vnic sent a frame whose source MAC is not its own.
    SpoofedSrcMac = "spoofed_src_mac",
    /// A vnic sent a frame whose source IP (or ARP sender address) is not one of its own.
    SpoofedSrcIp = "spoofed_src_ip",
    /// The L3 payload exceeds the vnic MTU.
    FrameTooBig = "frame_too_big",
    /// An 802.1Q-tagged frame: a container cannot choose its segment.
    VlanTagged = "vlan_tagged",
    /// EtherType other than IPv4, IPv6 or ARP.
    UnsupportedEtherType = "unsupported_ethertype",
    /// Broadcast that is not an ARP request (we never flood).
    Broadcast = "broadcast",
    /// Multicast that is not a neighbour solicitation (we never flood).
    Multicast = "multicast",
    /// ARP that the proxy does not answer: replies, gratuitous ARP, probes, requests for the
    /// sender's own address.
    ArpNotAnswered = "arp_not_answered",
    /// ICMPv6 neighbour discovery the proxy does not answer: DAD probes, advertisements.
    NdpNotAnswered = "ndp_not_answered",
    /// The destination is in the negative cache (recently looked up and not found).
    NegativeCached = "negative_cached",
    /// The lookup for a held frame answered "not found".
    LookupNotFound = "lookup_not_found",
    /// The lookup for a held frame failed (mapping service unreachable or erroring).
    LookupFailed = "lookup_failed",
    /// A held frame waited longer than the lookup timeout.
    LookupTimeout = "lookup_timeout",
    /// A held frame was pushed out of its full per-destination queue (oldest first).
    PendingQueueOverflow = "pending_queue_overflow",
    /// Too many destinations already have frames held.
    PendingTableFull = "pending_table_full",
    /// A destination MAC on the local host that belongs to another vnic's segment, or a frame
    /// addressed back to its sender.
    Hairpin = "hairpin",
    /// Underlay datagram too short for VXLAN, or with the I flag clear.
    VxlanMalformed = "vxlan_malformed",
    /// Underlay datagram for a VNI that has no vnic on this host.
    UnknownVni = "unknown_vni",
    /// Underlay datagram for a MAC that has no vnic on that VNI here.
    NoVnicForMac = "no_vnic_for_mac",
    /// The vnic's firewall denied it by a BLOCK rule (the rule's hit counter has it too).
    FirewallRule = "firewall_rule",
    /// The vnic's firewall denied it by the inbound default (no rule allowed the new flow).
    FirewallDefault = "firewall_default",
    /// A new flow the rules allow, refused because the connection table is full and every
    /// flow that could make room belongs to another vnic within its fair share (counted on
    /// the vnic the flow would have been charged to).
    ConntrackFull = "conntrack_full",
    /// The vnic already has its quota of destinations waiting for a lookup: its new lookup is
    /// refused (the per-core table stays open to other vnics).
    PendingQuota = "pending_quota",
    /// A held frame dropped to make room for another vnic's lookup, because the pending table
    /// was full and its vnic held the most destinations.
    PendingEvicted = "pending_evicted",
    /// An ARP request over VXLAN from an outer source that is not a known peer (neither an
    /// underlay address this host has a mapping for on that VNI, nor an operator-listed
    /// peer): not answered, so spoofed sources cannot make this host reflect.
    UnderlayArpUnknownPeer = "underlay_arp_unknown_peer",
    /// An ARP request over VXLAN from a known peer, over the answer rate limit (per source or
    /// overall).
    UnderlayArpRateLimited = "underlay_arp_rate_limited",
    /// A datagram over the underlay from a source that is not a cluster member (a registered,
    /// unrevoked server or an operator-listed peer), while a member set is in force
    /// (`fabric dataplane --peer`, the `members` control request).
    NotMember = "not_member",
}

/// Counters for one vnic or for the whole core. Plain integers: one core is owned by one
/// thread; the daemon publishes snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames received from the vnic (or from the underlay, globally).
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames encapsulated to the underlay.
    pub to_underlay: u64,
    /// Frames delivered to a local vnic (from the underlay or another local vnic).
    pub to_vnic: u64,
    /// ARP requests answered by the proxy.
    pub arp_replied: u64,
    /// Neighbour solicitations answered by the proxy.
    pub ndp_replied: u64,
    /// Frames held pending a lookup.
    pub held: u64,
    /// Held frames released after their lookup completed.
    pub released: u64,
    /// VL2 lookups requested.
    pub vl2_lookups: u64,
    /// VL3 lookups requested.
    pub vl3_lookups: u64,
    /// Underlay datagrams with reserved VXLAN bits set (tolerated).
    pub vxlan_reserved_bits: u64,
    /// Frames dropped, by reason.
    pub drops: [u64; DropReason::COUNT],
}

impl Counters {
    /// Count a drop.
    #[inline]
    pub fn drop(&mut self, r: DropReason) {
        self.drops[r as usize] += 1;
    }

    /// Drops for one reason.
    pub fn drops_of(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }

    /// All drops.
    pub fn drops_total(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// A serialisable view (drop reasons by label, zeros omitted).
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            rx_frames: self.rx_frames,
            rx_bytes: self.rx_bytes,
            to_underlay: self.to_underlay,
            to_vnic: self.to_vnic,
            arp_replied: self.arp_replied,
            ndp_replied: self.ndp_replied,
            held: self.held,
            released: self.released,
            vl2_lookups: self.vl2_lookups,
            vl3_lookups: self.vl3_lookups,
            vxlan_reserved_bits: self.vxlan_reserved_bits,
            drops: DropReason::ALL
                .iter()
                .filter(|r| self.drops_of(**r) > 0)
                .map(|r| (r.label().to_string(), self.drops_of(*r)))
                .collect(),
        }
    }
}

/// Counters as JSON-friendly data.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// See [`Counters::rx_frames`].
    pub rx_frames: u64,
    /// See [`Counters::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`Counters::to_underlay`].
    pub to_underlay: u64,
    /// See [`Counters::to_vnic`].
    pub to_vnic: u64,
    /// See [`Counters::arp_replied`].
    pub arp_replied: u64,
    /// See [`Counters::ndp_replied`].
    pub ndp_replied: u64,
    /// See [`Counters::held`].
    pub held: u64,
    /// See [`Counters::released`].
    pub released: u64,
    /// See [`Counters::vl2_lookups`].
    pub vl2_lookups: u64,
    /// See [`Counters::vl3_lookups`].
    pub vl3_lookups: u64,
    /// See [`Counters::vxlan_reserved_bits`].
    pub vxlan_reserved_bits: u64,
    /// Non-zero drop counters by reason label.
    pub drops: std::collections::BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_unique_and_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in DropReason::ALL {
            assert!(seen.insert(r.label()), "duplicate label {}", r.label());
            assert!(r
                .label()
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c == b'_'));
        }
        assert_eq!(
            DropReason::ALL[DropReason::NoVnicForMac as usize],
            DropReason::NoVnicForMac
        );
    }

    #[test]
    fn snapshot_omits_zero_drops() {
        let mut c = Counters::default();
        c.drop(DropReason::SpoofedSrcMac);
        c.drop(DropReason::SpoofedSrcMac);
        let s = c.snapshot();
        assert_eq!(s.drops.len(), 1);
        assert_eq!(s.drops["spoofed_src_mac"], 2);
        assert_eq!(c.drops_total(), 2);
    }
}
