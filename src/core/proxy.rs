//! The ARP/NDP proxy: replies synthesised in place over the request's buffer.

use super::buf::FrameBuf;
use crate::wire::{arp, ethernet, ipv6, ndp, EtherType, EthernetRepr, Ipv6Repr, Mac};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Length of an ARP reply frame (untagged Ethernet + 28-byte ARP).
pub const ARP_REPLY_LEN: usize = ethernet::HEADER_LEN + arp::LEN;
/// Length of a neighbour advertisement frame with a target link-layer address option.
pub const NA_LEN: usize =
    ethernet::HEADER_LEN + ipv6::HEADER_LEN + ndp::BASE_LEN + ndp::LLA_OPT_LEN;

/// Overwrite `buf` with "`ip` is at `mac`", addressed to `to_mac`/`to_ip`. `false` if the
/// buffer cannot hold the reply (nothing written).
pub fn write_arp_reply(
    buf: &mut FrameBuf<'_>,
    mac: Mac,
    ip: Ipv4Addr,
    to_mac: Mac,
    to_ip: Ipv4Addr,
) -> bool {
    if !buf.set_len(ARP_REPLY_LEN) {
        return false;
    }
    let b = buf.bytes_mut();
    EthernetRepr {
        src: mac,
        dst: to_mac,
        vlan_tci: None,
        ethertype: EtherType::ARP,
    }
    .emit(b);
    arp::Repr {
        op: arp::Operation::Reply,
        sha: mac,
        spa: ip,
        tha: to_mac,
        tpa: to_ip,
    }
    .emit(&mut b[ethernet::HEADER_LEN..]);
    true
}

/// Overwrite `buf` with a solicited neighbour advertisement "`ip` is at `mac`" for
/// `to_mac`/`to_ip`. `false` if the buffer cannot hold it.
pub fn write_neighbor_advert(
    buf: &mut FrameBuf<'_>,
    mac: Mac,
    ip: Ipv6Addr,
    to_mac: Mac,
    to_ip: Ipv6Addr,
) -> bool {
    if !buf.set_len(NA_LEN) {
        return false;
    }
    let b = buf.bytes_mut();
    EthernetRepr {
        src: mac,
        dst: to_mac,
        vlan_tci: None,
        ethertype: EtherType::IPV6,
    }
    .emit(b);
    let na = ndp::Repr::Advert {
        router: false,
        solicited: true,
        override_: true,
        target: ip,
        target_lla: Some(mac),
    };
    Ipv6Repr {
        src: ip,
        dst: to_ip,
        next_header: ipv6::NEXT_HEADER_ICMPV6,
        payload_len: na.buffer_len() as u16,
        hop_limit: 255,
    }
    .emit(&mut b[ethernet::HEADER_LEN..]);
    na.emit(&mut b[ethernet::HEADER_LEN + ipv6::HEADER_LEN..], ip, to_ip);
    true
}

/// A gratuitous ARP frame announcing `ip` at `mac` (for refreshing neighbours after a move).
pub fn gratuitous_arp(mac: Mac, ip: Ipv4Addr) -> Vec<u8> {
    let mut v = vec![0u8; ARP_REPLY_LEN];
    EthernetRepr {
        src: mac,
        dst: Mac::BROADCAST,
        vlan_tci: None,
        ethertype: EtherType::ARP,
    }
    .emit(&mut v);
    arp::Repr {
        op: arp::Operation::Request,
        sha: mac,
        spa: ip,
        tha: Mac::ZERO,
        tpa: ip,
    }
    .emit(&mut v[ethernet::HEADER_LEN..]);
    v
}
