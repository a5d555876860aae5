//! From an Ethernet frame to the [`PacketSummary`] connection tracking judges.
//!
//! [`summarize`] runs for every packet of a firewalled vnic, so it reads the few fields it
//! needs straight from the byte slice: no allocation, no checksum verification (offloaded
//! frames carry partial checksums), and no panic on any input (every read follows a length
//! check; proptests and the `packet_summary` fuzz target hold it to that).
//!
//! What it reads:
//!
//! * **Ethernet**: 14 bytes, untagged. EtherType IPv4 (0x0800) or IPv6 (0x86dd); anything
//!   else, an 802.1Q tag (0x8100) included, is [`SummaryError::NotIp`].
//! * **IPv4**: version 4, IHL ≥ 5 and within the frame, total length between the header
//!   length and the frame length. The total length bounds the payload, so Ethernet padding is
//!   ignored. A fragment offset ≠ 0 is [`SummaryError::NonFirstFragment`]; a first fragment is
//!   summarised from its transport header.
//! * **IPv6**: version 6, payload length within the frame (and bounding the payload). Up to
//!   [`MAX_IPV6_EXTENSIONS`] extension headers are skipped: Hop-by-Hop (0), Routing (43),
//!   Destination Options (60) and Fragment (44, offset ≠ 0 → `NonFirstFragment`). The first
//!   other next header is the protocol.
//! * **TCP** (6): ports and the flags byte (byte 13, as is); the 20-byte header must be there
//!   and the data offset must be ≥ 5 and within the packet.
//! * **UDP** (17): ports; 8 bytes required.
//! * **ICMP** (1 over IPv4) / **ICMPv6** (58 over IPv6): type and code (4 bytes required). Echo
//!   request/reply (v4 8/0, v6 128/129) also give the identifier (the 8-byte echo header is
//!   required). Errors (v4 3, 4, 5, 11, 12; v6 1–4) give the embedded original packet, parsed
//!   leniently from byte 8 into [`IcmpInfo::inner`] (`None` when it cannot be parsed: that is
//!   not an error).
//! * Any other protocol (AH, ESP, GRE, ICMP over the wrong family, …):
//!   [`PacketSummary::other`].

use std::net::IpAddr;

use super::conntrack::{IcmpInfo, InnerPacket, PacketSummary};
use crate::wire::{be16, ethernet, ipv4, ipv6, EtherType, Ipv4Packet, Ipv6Packet};

/// The most IPv6 extension headers [`summarize`] skips before giving up.
pub const MAX_IPV6_EXTENSIONS: usize = 8;

const PROTO_HOP_BY_HOP: u8 = 0;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ROUTING: u8 = 43;
const PROTO_FRAGMENT: u8 = 44;
const PROTO_ICMP6: u8 = 58;
const PROTO_DEST_OPTS: u8 = 60;

const TCP_MIN_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
const ICMP_MIN_HEADER_LEN: usize = 4;
/// Echo header, and where an error's embedded packet starts.
const ICMP_HEADER_LEN: usize = 8;
const IPV6_FRAGMENT_HEADER_LEN: usize = 8;

/// Why a frame has no summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SummaryError {
    /// EtherType is not IPv4/IPv6 (ARP etc.): the firewall does not judge it.
    #[error("not an IP packet")]
    NotIp,
    /// A non-first IPv4/IPv6 fragment: it carries no transport header.
    #[error("non-first fragment")]
    NonFirstFragment,
    /// Truncated or inconsistent header (message says which).
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

use SummaryError::{Malformed, NonFirstFragment};

/// Summarise the Ethernet frame `frame` (starting at the untagged Ethernet header) for
/// [`Conntrack::classify`](super::conntrack::Conntrack::classify).
///
/// Errors: [`SummaryError::NotIp`] for non-IP EtherTypes (the firewall does not judge them),
/// [`SummaryError::NonFirstFragment`] for fragments without a transport header, and
/// [`SummaryError::Malformed`] for truncated or inconsistent IP/TCP/UDP/ICMP headers.
#[inline]
pub fn summarize(frame: &[u8]) -> Result<PacketSummary, SummaryError> {
    if frame.len() < ethernet::HEADER_LEN {
        return Err(Malformed("truncated Ethernet header"));
    }
    let ip = &frame[ethernet::HEADER_LEN..];
    let (l3, v6) = match EtherType(be16(frame, 12)) {
        EtherType::IPV4 => (ipv4_layer(ip, Bound::Strict)?, false),
        EtherType::IPV6 => (ipv6_layer(ip, Bound::Strict)?, true),
        _ => return Err(SummaryError::NotIp),
    };
    transport(l3, v6)
}

/// How a length field that runs past the buffer is treated.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// An error: the packet itself.
    Strict,
    /// Cut to the buffer: the packet embedded in an ICMP error, truncated by design.
    Lenient,
}

/// The network layer of a packet: addresses, protocol, and the transport bytes.
struct Network<'a> {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    payload: &'a [u8],
}

#[inline]
fn ipv4_layer(ip: &[u8], bound: Bound) -> Result<Network<'_>, SummaryError> {
    if ip.len() < ipv4::MIN_HEADER_LEN {
        return Err(Malformed("truncated IPv4 header"));
    }
    if ip[0] >> 4 != 4 {
        return Err(Malformed("IPv4 version is not 4"));
    }
    let p = Ipv4Packet::new_unchecked(ip);
    let ihl = p.header_len();
    if ihl < ipv4::MIN_HEADER_LEN {
        return Err(Malformed("IPv4 IHL below 5"));
    }
    if ihl > ip.len() {
        return Err(Malformed("IPv4 header longer than the frame"));
    }
    let mut end = usize::from(p.total_len());
    if end < ihl {
        return Err(Malformed("IPv4 total length shorter than the header"));
    }
    if end > ip.len() {
        match bound {
            Bound::Strict => return Err(Malformed("IPv4 total length beyond the frame")),
            Bound::Lenient => end = ip.len(),
        }
    }
    // Flags (3 bits) and fragment offset (13 bits).
    if be16(ip, 6) & 0x1fff != 0 {
        return Err(NonFirstFragment);
    }
    Ok(Network {
        src: IpAddr::V4(p.src()),
        dst: IpAddr::V4(p.dst()),
        proto: p.protocol(),
        payload: &ip[ihl..end],
    })
}

#[inline]
fn ipv6_layer(ip: &[u8], bound: Bound) -> Result<Network<'_>, SummaryError> {
    if ip.len() < ipv6::HEADER_LEN {
        return Err(Malformed("truncated IPv6 header"));
    }
    if ip[0] >> 4 != 6 {
        return Err(Malformed("IPv6 version is not 6"));
    }
    let p = Ipv6Packet::new_unchecked(ip);
    let mut end = ipv6::HEADER_LEN + usize::from(p.payload_len());
    if end > ip.len() {
        match bound {
            Bound::Strict => return Err(Malformed("IPv6 payload length beyond the frame")),
            Bound::Lenient => end = ip.len(),
        }
    }
    let mut next = p.next_header();
    let mut rest = &ip[ipv6::HEADER_LEN..end];
    let mut skipped = 0;
    loop {
        if !matches!(
            next,
            PROTO_HOP_BY_HOP | PROTO_ROUTING | PROTO_DEST_OPTS | PROTO_FRAGMENT
        ) {
            break;
        }
        if skipped == MAX_IPV6_EXTENSIONS {
            return Err(Malformed("too many IPv6 extension headers"));
        }
        let len = if next == PROTO_FRAGMENT {
            IPV6_FRAGMENT_HEADER_LEN
        } else {
            // Byte 1: length in 8-octet units, not counting the first 8.
            match rest.get(1) {
                Some(&units) => (usize::from(units) + 1) * 8,
                None => return Err(Malformed("truncated IPv6 extension header")),
            }
        };
        if rest.len() < len {
            return Err(Malformed("truncated IPv6 extension header"));
        }
        // Fragment: offset (13 bits), 2 reserved bits, M flag.
        if next == PROTO_FRAGMENT && be16(rest, 2) >> 3 != 0 {
            return Err(NonFirstFragment);
        }
        skipped += 1;
        next = rest[0];
        rest = &rest[len..];
    }
    Ok(Network {
        src: IpAddr::V6(p.src()),
        dst: IpAddr::V6(p.dst()),
        proto: next,
        payload: rest,
    })
}

/// The ICMP protocol number of the family.
#[inline]
fn icmp_proto(v6: bool) -> u8 {
    if v6 {
        PROTO_ICMP6
    } else {
        PROTO_ICMP
    }
}

/// Echo request or reply.
#[inline]
fn is_echo(ty: u8, v6: bool) -> bool {
    if v6 {
        matches!(ty, 128 | 129)
    } else {
        matches!(ty, 0 | 8)
    }
}

/// An error message that embeds the packet it is about.
#[inline]
fn is_error(ty: u8, v6: bool) -> bool {
    if v6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 4 | 5 | 11 | 12)
    }
}

#[inline]
fn transport(l3: Network<'_>, v6: bool) -> Result<PacketSummary, SummaryError> {
    let Network {
        src,
        dst,
        proto,
        payload: t,
    } = l3;
    match proto {
        PROTO_TCP => {
            if t.len() < TCP_MIN_HEADER_LEN {
                return Err(Malformed("truncated TCP header"));
            }
            let data_offset = usize::from(t[12] >> 4) * 4;
            if data_offset < TCP_MIN_HEADER_LEN {
                return Err(Malformed("TCP data offset below 5"));
            }
            if data_offset > t.len() {
                return Err(Malformed("TCP header longer than the packet"));
            }
            Ok(PacketSummary::tcp(src, be16(t, 0), dst, be16(t, 2), t[13]))
        }
        PROTO_UDP => {
            if t.len() < UDP_HEADER_LEN {
                return Err(Malformed("truncated UDP header"));
            }
            Ok(PacketSummary::udp(src, be16(t, 0), dst, be16(t, 2)))
        }
        p if p == icmp_proto(v6) => {
            if t.len() < ICMP_MIN_HEADER_LEN {
                return Err(Malformed("truncated ICMP header"));
            }
            let (ty, code) = (t[0], t[1]);
            let (echo_id, inner) = if is_echo(ty, v6) {
                if t.len() < ICMP_HEADER_LEN {
                    return Err(Malformed("truncated ICMP echo header"));
                }
                (be16(t, 4), None)
            } else if is_error(ty, v6) {
                (0, t.get(ICMP_HEADER_LEN..).and_then(|e| embedded(e, v6)))
            } else {
                (0, None)
            };
            Ok(PacketSummary {
                src,
                dst,
                proto,
                src_port: 0,
                dst_port: 0,
                tcp_flags: 0,
                icmp: Some(IcmpInfo {
                    ty,
                    code,
                    echo_id,
                    inner,
                }),
            })
        }
        _ => Ok(PacketSummary::other(src, dst, proto)),
    }
}

/// The packet an ICMP error embeds (same family as the error), which may stop after its
/// first 8 transport bytes. Ports for TCP/UDP, the identifier in both ports for ICMP echo,
/// zeros for anything else; `None` when the headers we need are not there.
#[inline]
fn embedded(b: &[u8], v6: bool) -> Option<InnerPacket> {
    let l3 = if v6 {
        ipv6_layer(b, Bound::Lenient)
    } else {
        ipv4_layer(b, Bound::Lenient)
    }
    .ok()?;
    let t = l3.payload;
    let (src_port, dst_port) = match l3.proto {
        PROTO_TCP | PROTO_UDP => {
            if t.len() < 4 {
                return None;
            }
            (be16(t, 0), be16(t, 2))
        }
        p if p == icmp_proto(v6) => {
            let ty = *t.first()?;
            if is_echo(ty, v6) {
                if t.len() < 6 {
                    return None;
                }
                let id = be16(t, 4);
                (id, id)
            } else {
                (0, 0)
            }
        }
        _ => (0, 0),
    };
    Some(InnerPacket {
        src: l3.src,
        dst: l3.dst,
        proto: l3.proto,
        src_port,
        dst_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::conntrack::{TCP_ACK, TCP_SYN};
    use etherparse::{PacketBuilder, TcpHeader};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    // ---- hand-written frames ------------------------------------------------------------

    const MACS: [u8; 12] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    const A4: [u8; 4] = [10, 0, 0, 1];
    const B4: [u8; 4] = [10, 0, 0, 2];
    const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }
    fn v6(a: [u8; 16]) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(a))
    }

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = MACS.to_vec();
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// IPv4 header (IHL 5, DF, total length = 20 + payload) and payload.
    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(payload);
        p
    }

    /// IPv6 header (payload length = payload) and payload.
    fn ipv6(next: u8, src: [u8; 16], dst: [u8; 16], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(payload);
        p
    }

    /// A 20-byte TCP header.
    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = sport.to_be_bytes().to_vec();
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t
    }

    /// A UDP header and payload.
    fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = sport.to_be_bytes().to_vec();
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        u
    }

    /// An ICMP/ICMPv6 message: type, code, zero checksum, bytes 4..8, body.
    fn icmp(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
        let mut m = vec![ty, code, 0, 0];
        m.extend_from_slice(&rest);
        m.extend_from_slice(body);
        m
    }

    fn malformed(frame: &[u8]) -> bool {
        matches!(summarize(frame), Err(SummaryError::Malformed(_)))
    }

    #[test]
    fn tcp_syn_v4() {
        #[rustfmt::skip]
        let frame: [u8; 54] = [
            // Ethernet: dst, src, IPv4.
            0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00,
            // IPv4: IHL 5, total 40, DF, TTL 64, TCP, 10.0.0.1 → 10.0.0.2.
            0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0xab, 0xcd,
            10, 0, 0, 1, 10, 0, 0, 2,
            // TCP: 40000 → 22, seq 1, data offset 5, SYN, window 65535.
            0x9c, 0x40, 0, 22, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
        ];
        assert_eq!(
            summarize(&frame),
            Ok(PacketSummary::tcp(v4(A4), 40000, v4(B4), 22, TCP_SYN))
        );
    }

    #[test]
    fn tcp_flags_byte_is_kept_as_is() {
        let f = eth(0x0800, &ipv4(6, A4, B4, &tcp(1, 2, 0xff)));
        assert_eq!(summarize(&f).unwrap().tcp_flags, 0xff);
        let f = eth(0x86dd, &ipv6(6, A6, B6, &tcp(1, 2, TCP_SYN | TCP_ACK)));
        assert_eq!(
            summarize(&f),
            Ok(PacketSummary::tcp(v6(A6), 1, v6(B6), 2, TCP_SYN | TCP_ACK))
        );
    }

    #[test]
    fn ipv4_options_are_skipped() {
        let mut p = ipv4(17, A4, B4, &udp(53, 5353, b"x"));
        p[0] = 0x47; // IHL 7: 8 bytes of options (NOPs).
        p.splice(20..20, [1u8; 8]);
        p[3] += 8;
        assert_eq!(
            summarize(&eth(0x0800, &p)),
            Ok(PacketSummary::udp(v4(A4), 53, v4(B4), 5353))
        );
    }

    #[test]
    fn udp_v6_behind_hop_by_hop() {
        // Hop-by-Hop: next UDP, length 0 (8 bytes), PadN option of 4 bytes.
        let mut payload = vec![17, 0, 1, 4, 0, 0, 0, 0];
        payload.extend_from_slice(&udp(5353, 53, b"query"));
        let f = eth(0x86dd, &ipv6(0, A6, B6, &payload));
        assert_eq!(
            summarize(&f),
            Ok(PacketSummary::udp(v6(A6), 5353, v6(B6), 53))
        );
    }

    #[test]
    fn ipv6_extension_chain() {
        // Destination options (16 bytes) → Routing (8) → Fragment (offset 0, M) → TCP.
        let mut payload = vec![43, 1];
        payload.extend_from_slice(&[0; 14]);
        payload.extend_from_slice(&[44, 0, 0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(&[6, 0, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef]);
        payload.extend_from_slice(&tcp(443, 50000, TCP_ACK));
        let f = eth(0x86dd, &ipv6(60, A6, B6, &payload));
        assert_eq!(
            summarize(&f),
            Ok(PacketSummary::tcp(v6(A6), 443, v6(B6), 50000, TCP_ACK))
        );
    }

    #[test]
    fn at_most_eight_ipv6_extension_headers() {
        let chain = |n: usize| {
            let mut payload = Vec::new();
            for i in 0..n {
                payload.extend_from_slice(&[if i + 1 == n { 17 } else { 60 }, 0, 0, 0, 0, 0, 0, 0]);
            }
            payload.extend_from_slice(&udp(1, 2, b""));
            eth(0x86dd, &ipv6(60, A6, B6, &payload))
        };
        assert_eq!(
            summarize(&chain(8)),
            Ok(PacketSummary::udp(v6(A6), 1, v6(B6), 2))
        );
        assert_eq!(
            summarize(&chain(9)),
            Err(SummaryError::Malformed("too many IPv6 extension headers"))
        );
    }

    #[test]
    fn truncated_ipv6_extension_header() {
        // Hop-by-Hop announcing 16 bytes, 8 present.
        let f = eth(0x86dd, &ipv6(0, A6, B6, &[17, 1, 0, 0, 0, 0, 0, 0]));
        assert!(malformed(&f));
        let f = eth(0x86dd, &ipv6(44, A6, B6, &[17, 0, 0, 0]));
        assert!(malformed(&f));
    }

    #[test]
    fn icmp_echo_v4() {
        let req = eth(
            0x0800,
            &ipv4(1, A4, B4, &icmp(8, 0, [0x12, 0x34, 0, 1], b"ping")),
        );
        assert_eq!(
            summarize(&req),
            Ok(PacketSummary::icmp(v4(A4), v4(B4), 8, 0, 0x1234))
        );
        let rep = eth(
            0x0800,
            &ipv4(1, B4, A4, &icmp(0, 0, [0x12, 0x34, 0, 1], b"ping")),
        );
        assert_eq!(
            summarize(&rep),
            Ok(PacketSummary::icmp(v4(B4), v4(A4), 0, 0, 0x1234))
        );
    }

    #[test]
    fn icmp_echo_v6() {
        let req = eth(
            0x86dd,
            &ipv6(58, A6, B6, &icmp(128, 0, [0xbe, 0xef, 0, 7], b"")),
        );
        assert_eq!(
            summarize(&req),
            Ok(PacketSummary::icmp(v6(A6), v6(B6), 128, 0, 0xbeef))
        );
        let rep = eth(
            0x86dd,
            &ipv6(58, B6, A6, &icmp(129, 0, [0xbe, 0xef, 0, 7], b"")),
        );
        assert_eq!(
            summarize(&rep),
            Ok(PacketSummary::icmp(v6(B6), v6(A6), 129, 0, 0xbeef))
        );
    }

    #[test]
    fn other_icmp_types_have_no_echo_id() {
        // Router advertisement (v6 134), timestamp (v4 13): bytes 4..6 are not an identifier.
        let f = eth(0x86dd, &ipv6(58, A6, B6, &icmp(134, 0, [0xff; 4], &[0; 8])));
        assert_eq!(
            summarize(&f),
            Ok(PacketSummary::icmp(v6(A6), v6(B6), 134, 0, 0))
        );
        let f = eth(0x0800, &ipv4(1, A4, B4, &icmp(13, 0, [0xff; 4], &[0; 12])));
        assert_eq!(
            summarize(&f),
            Ok(PacketSummary::icmp(v4(A4), v4(B4), 13, 0, 0))
        );
    }

    #[test]
    fn icmp_port_unreachable_v4_carries_udp() {
        // The original datagram 10.0.0.2:5353 → 10.0.0.1:53 with a 100-byte payload, cut
        // after its UDP header (total length still says 128).
        let original = ipv4(17, B4, A4, &udp(5353, 53, &[0; 100]));
        let err = icmp(3, 3, [0; 4], &original[..28]);
        let f = eth(0x0800, &ipv4(1, A4, B4, &err));
        let inner = InnerPacket {
            src: v4(B4),
            dst: v4(A4),
            proto: 17,
            src_port: 5353,
            dst_port: 53,
        };
        assert_eq!(
            summarize(&f),
            Ok(PacketSummary::icmp_error(v4(A4), v4(B4), 3, 3, inner))
        );
    }

    #[test]
    fn icmpv6_packet_too_big_carries_tcp() {
        // The original segment, cut after 8 bytes of its TCP header; payload length says 1440.
        let mut original = ipv6(6, B6, A6, &tcp(50000, 443, TCP_ACK));
        original[4..6].copy_from_slice(&1440u16.to_be_bytes());
        original.truncate(48);
        let err = icmp(2, 0, 1280u32.to_be_bytes(), &original);
        let f = eth(0x86dd, &ipv6(58, A6, B6, &err));
        let inner = InnerPacket {
            src: v6(B6),
            dst: v6(A6),
            proto: 6,
            src_port: 50000,
            dst_port: 443,
        };
        assert_eq!(
            summarize(&f),
            Ok(PacketSummary::icmp_error(v6(A6), v6(B6), 2, 0, inner))
        );
    }

    #[test]
    fn icmp_time_exceeded_carries_echo() {
        let original = ipv4(1, B4, A4, &icmp(8, 0, [0x0a, 0x0b, 0, 1], b""));
        let f = eth(0x0800, &ipv4(1, A4, B4, &icmp(11, 0, [0; 4], &original)));
        let inner = InnerPacket {
            src: v4(B4),
            dst: v4(A4),
            proto: 1,
            src_port: 0x0a0b,
            dst_port: 0x0a0b,
        };
        assert_eq!(
            summarize(&f),
            Ok(PacketSummary::icmp_error(v4(A4), v4(B4), 11, 0, inner))
        );
    }

    #[test]
    fn unparseable_embedded_packet_is_no_inner() {
        let none = |f: &[u8]| summarize(f).unwrap().icmp.unwrap().inner;
        // Nothing after the ICMP header; shorter than 8 bytes; garbage; wrong family.
        let f = eth(0x0800, &ipv4(1, A4, B4, &icmp(3, 1, [0; 4], b"")));
        assert_eq!(none(&f), None);
        let f = eth(0x0800, &ipv4(1, A4, B4, &[3, 1, 0, 0]));
        assert_eq!(none(&f), None);
        let f = eth(0x0800, &ipv4(1, A4, B4, &icmp(3, 1, [0; 4], &[0x45; 30])));
        assert_eq!(none(&f), None);
        let v6_inside_v4 = ipv6(17, B6, A6, &udp(1, 2, b""));
        let f = eth(0x0800, &ipv4(1, A4, B4, &icmp(3, 3, [0; 4], &v6_inside_v4)));
        assert_eq!(none(&f), None);
        // An embedded UDP header cut before its ports are complete.
        let original = ipv4(17, B4, A4, &udp(5353, 53, b""));
        let f = eth(
            0x0800,
            &ipv4(1, A4, B4, &icmp(3, 3, [0; 4], &original[..22])),
        );
        assert_eq!(none(&f), None);
    }

    #[test]
    fn non_first_fragment_v4() {
        let mut p = ipv4(17, A4, B4, &[0; 16]);
        p[6..8].copy_from_slice(&185u16.to_be_bytes()); // offset 185 × 8, no MF
        assert_eq!(
            summarize(&eth(0x0800, &p)),
            Err(SummaryError::NonFirstFragment)
        );
    }

    #[test]
    fn non_first_fragment_v6() {
        let mut payload = vec![17, 0];
        payload.extend_from_slice(&((100u16 << 3) | 1).to_be_bytes()); // offset 100, M
        payload.extend_from_slice(&[0, 0, 0, 9]);
        payload.extend_from_slice(&[0; 16]);
        let f = eth(0x86dd, &ipv6(44, A6, B6, &payload));
        assert_eq!(summarize(&f), Err(SummaryError::NonFirstFragment));
    }

    #[test]
    fn first_fragment_v4_with_more_fragments() {
        let mut p = ipv4(6, A4, B4, &tcp(40000, 80, TCP_ACK));
        p[6..8].copy_from_slice(&0x2000u16.to_be_bytes()); // MF, offset 0
        assert_eq!(
            summarize(&eth(0x0800, &p)),
            Ok(PacketSummary::tcp(v4(A4), 40000, v4(B4), 80, TCP_ACK))
        );
    }

    #[test]
    fn truncated_tcp() {
        let t = tcp(1, 2, TCP_SYN);
        assert!(malformed(&eth(0x0800, &ipv4(6, A4, B4, &t[..19]))));
        assert!(malformed(&eth(0x86dd, &ipv6(6, A6, B6, &t[..12]))));
        // Data offset 4, and data offset 6 with no room for the options.
        let mut t4 = t.clone();
        t4[12] = 0x40;
        assert!(malformed(&eth(0x0800, &ipv4(6, A4, B4, &t4))));
        let mut t6 = t;
        t6[12] = 0x60;
        assert!(malformed(&eth(0x0800, &ipv4(6, A4, B4, &t6))));
    }

    #[test]
    fn truncated_udp_and_icmp() {
        assert!(malformed(&eth(
            0x0800,
            &ipv4(17, A4, B4, &udp(1, 2, b"")[..7])
        )));
        assert!(malformed(&eth(0x0800, &ipv4(1, A4, B4, &[8, 0, 0]))));
        // An echo needs its identifier (the 8-byte echo header).
        assert!(malformed(&eth(
            0x86dd,
            &ipv6(58, A6, B6, &[128, 0, 0, 0, 0])
        )));
        // Any other type needs only 4 bytes.
        assert_eq!(
            summarize(&eth(0x86dd, &ipv6(58, A6, B6, &[135, 0, 0, 0]))),
            Ok(PacketSummary::icmp(v6(A6), v6(B6), 135, 0, 0))
        );
    }

    #[test]
    fn ip_header_checks() {
        let good = ipv4(17, A4, B4, &udp(1, 2, b""));
        // IHL 15 (60 bytes) in a 28-byte packet; IHL 4.
        let mut p = good.clone();
        p[0] = 0x4f;
        assert_eq!(
            summarize(&eth(0x0800, &p)),
            Err(SummaryError::Malformed("IPv4 header longer than the frame"))
        );
        p[0] = 0x44;
        assert!(malformed(&eth(0x0800, &p)));
        // Version 6 under the IPv4 EtherType.
        p[0] = 0x65;
        assert!(malformed(&eth(0x0800, &p)));
        // Total length beyond the frame; shorter than the header.
        let mut p = good.clone();
        p[3] = 29;
        assert!(malformed(&eth(0x0800, &p)));
        p[3] = 19;
        assert!(malformed(&eth(0x0800, &p)));
        // Short IPv4/IPv6 headers, IPv6 payload length beyond the frame, bad version.
        assert!(malformed(&eth(0x0800, &good[..19])));
        let good6 = ipv6(17, A6, B6, &udp(1, 2, b""));
        assert!(malformed(&eth(0x86dd, &good6[..39])));
        let mut p = good6.clone();
        p[5] += 1;
        assert!(malformed(&eth(0x86dd, &p)));
        let mut p = good6;
        p[0] = 0x40;
        assert!(malformed(&eth(0x86dd, &p)));
        assert!(malformed(&[0u8; 13]));
    }

    #[test]
    fn non_ip_frames() {
        // An ARP request, and an 802.1Q-tagged IPv4 frame.
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
        arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
        assert_eq!(summarize(&eth(0x0806, &arp)), Err(SummaryError::NotIp));
        let mut tagged = vec![0, 5, 8, 0];
        tagged.extend_from_slice(&ipv4(6, A4, B4, &tcp(1, 2, TCP_SYN)));
        assert_eq!(summarize(&eth(0x8100, &tagged)), Err(SummaryError::NotIp));
    }

    #[test]
    fn ethernet_padding_is_ignored() {
        // A 28-byte UDP datagram padded to the 60-byte Ethernet minimum.
        let mut f = eth(0x0800, &ipv4(17, A4, B4, &udp(68, 67, b"")));
        f.resize(60, 0);
        assert_eq!(
            summarize(&f),
            Ok(PacketSummary::udp(v4(A4), 68, v4(B4), 67))
        );
        // The total length bounds the payload: a 4-byte "UDP header" is not completed by
        // the padding.
        let mut f = eth(0x0800, &ipv4(17, A4, B4, &udp(68, 67, b"")[..4]));
        f.resize(60, 0);
        assert!(malformed(&f));
        // Same for IPv6's payload length.
        let mut f = eth(0x86dd, &ipv6(6, A6, B6, &tcp(1, 2, TCP_SYN)[..16]));
        f.resize(100, 0);
        assert!(malformed(&f));
    }

    #[test]
    fn other_protocols() {
        let esp = eth(0x0800, &ipv4(50, A4, B4, &[0; 16]));
        assert_eq!(
            summarize(&esp),
            Ok(PacketSummary::other(v4(A4), v4(B4), 50))
        );
        let gre = eth(0x86dd, &ipv6(47, A6, B6, &[0; 4]));
        assert_eq!(
            summarize(&gre),
            Ok(PacketSummary::other(v6(A6), v6(B6), 47))
        );
        // No next header (59) after a destination options header.
        let none = eth(0x86dd, &ipv6(60, A6, B6, &[59, 0, 1, 4, 0, 0, 0, 0]));
        assert_eq!(
            summarize(&none),
            Ok(PacketSummary::other(v6(A6), v6(B6), 59))
        );
        // ICMP over the other family is not ICMP to the firewall.
        let icmp4_in_v6 = eth(0x86dd, &ipv6(1, A6, B6, &icmp(8, 0, [0; 4], b"")));
        assert_eq!(
            summarize(&icmp4_in_v6),
            Ok(PacketSummary::other(v6(A6), v6(B6), 1))
        );
        let icmp6_in_v4 = eth(0x0800, &ipv4(58, A4, B4, &icmp(128, 0, [0; 4], b"")));
        assert_eq!(
            summarize(&icmp6_in_v4),
            Ok(PacketSummary::other(v4(A4), v4(B4), 58))
        );
    }

    // ---- property tests against etherparse ---------------------------------------------

    /// What travels in a generated packet.
    #[derive(Debug, Clone)]
    enum L4 {
        Tcp {
            sport: u16,
            dport: u16,
            flags: u8,
            ns: bool,
            option_words: usize,
        },
        Udp {
            sport: u16,
            dport: u16,
        },
        Echo {
            reply: bool,
            id: u16,
            seq: u16,
        },
        /// A non-echo, non-error ICMP type.
        Icmp {
            ty: u8,
            code: u8,
            rest: [u8; 4],
        },
        /// Any protocol we do not parse.
        Other {
            proto: u8,
        },
    }

    fn l4() -> impl Strategy<Value = L4> {
        prop_oneof![
            (
                any::<u16>(),
                any::<u16>(),
                any::<u8>(),
                any::<bool>(),
                0..=10usize
            )
                .prop_map(|(sport, dport, flags, ns, option_words)| L4::Tcp {
                    sport,
                    dport,
                    flags,
                    ns,
                    option_words
                }),
            (any::<u16>(), any::<u16>()).prop_map(|(sport, dport)| L4::Udp { sport, dport }),
            (any::<bool>(), any::<u16>(), any::<u16>()).prop_map(|(reply, id, seq)| L4::Echo {
                reply,
                id,
                seq
            }),
            (any::<u8>(), any::<u8>(), any::<[u8; 4]>()).prop_map(|(ty, code, rest)| L4::Icmp {
                ty,
                code,
                rest
            }),
            any::<u8>().prop_map(|proto| L4::Other { proto }),
        ]
    }

    /// A generated frame's parameters.
    #[derive(Debug, Clone)]
    struct Spec {
        v6: bool,
        src4: [u8; 4],
        dst4: [u8; 4],
        src6: [u8; 16],
        dst6: [u8; 16],
        l4: L4,
        payload: Vec<u8>,
        /// IPv4 option words (IHL − 5).
        ip_option_words: usize,
        /// IPv6 extension headers: (kind 0..4, 8-octet units beyond the first, fragment M).
        extensions: Vec<(u8, u8, bool)>,
        padding: Vec<u8>,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            any::<bool>(),
            (any::<[u8; 4]>(), any::<[u8; 4]>()),
            (any::<[u8; 16]>(), any::<[u8; 16]>()),
            l4(),
            proptest::collection::vec(any::<u8>(), 0..48),
            0..=10usize,
            proptest::collection::vec((0..4u8, 0..3u8, any::<bool>()), 0..=MAX_IPV6_EXTENSIONS),
            proptest::collection::vec(any::<u8>(), 0..24),
        )
            .prop_map(
                |(
                    v6,
                    (src4, dst4),
                    (src6, dst6),
                    l4,
                    payload,
                    ip_option_words,
                    extensions,
                    padding,
                )| {
                    Spec {
                        v6,
                        src4,
                        dst4,
                        src6,
                        dst6,
                        l4,
                        payload,
                        ip_option_words,
                        extensions,
                        padding,
                    }
                },
            )
    }

    /// Build the frame with etherparse (plus IPv4 options / IPv6 extension headers spliced in
    /// by hand, and trailing padding) and the summary it must give.
    fn build(s: &Spec) -> (Vec<u8>, PacketSummary) {
        let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = if s.v6 {
            eth.ipv6(s.src6, s.dst6, 64)
        } else {
            eth.ipv4(s.src4, s.dst4, 64)
        };
        let (src, dst) = if s.v6 {
            (v6(s.src6), v6(s.dst6))
        } else {
            (v4(s.src4), v4(s.dst4))
        };
        let mut f = Vec::new();
        let expected = match s.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                ns,
                option_words,
            } => {
                let mut h = TcpHeader::new(sport, dport, 7, 1000);
                h.ns = ns;
                h.fin = flags & 0x01 != 0;
                h.syn = flags & 0x02 != 0;
                h.rst = flags & 0x04 != 0;
                h.psh = flags & 0x08 != 0;
                h.ack = flags & 0x10 != 0;
                h.urg = flags & 0x20 != 0;
                h.ece = flags & 0x40 != 0;
                h.cwr = flags & 0x80 != 0;
                h.set_options_raw(&vec![1; option_words * 4]).unwrap();
                ip.tcp_header(h).write(&mut f, &s.payload).unwrap();
                PacketSummary::tcp(src, sport, dst, dport, flags)
            }
            L4::Udp { sport, dport } => {
                ip.udp(sport, dport).write(&mut f, &s.payload).unwrap();
                PacketSummary::udp(src, sport, dst, dport)
            }
            L4::Echo { reply, id, seq } => {
                let ty = match (s.v6, reply) {
                    (false, false) => {
                        ip.icmpv4_echo_request(id, seq)
                            .write(&mut f, &s.payload)
                            .unwrap();
                        8
                    }
                    (false, true) => {
                        ip.icmpv4_echo_reply(id, seq)
                            .write(&mut f, &s.payload)
                            .unwrap();
                        0
                    }
                    (true, false) => {
                        ip.icmpv6_echo_request(id, seq)
                            .write(&mut f, &s.payload)
                            .unwrap();
                        128
                    }
                    (true, true) => {
                        ip.icmpv6_echo_reply(id, seq)
                            .write(&mut f, &s.payload)
                            .unwrap();
                        129
                    }
                };
                PacketSummary::icmp(src, dst, ty, 0, id)
            }
            L4::Icmp { ty, code, rest } => {
                let ty = if is_echo(ty, s.v6) || is_error(ty, s.v6) {
                    13 // timestamp (v4), unassigned (v6)
                } else {
                    ty
                };
                if s.v6 {
                    ip.icmpv6_raw(ty, code, rest)
                        .write(&mut f, &s.payload)
                        .unwrap();
                } else {
                    ip.icmpv4_raw(ty, code, rest)
                        .write(&mut f, &s.payload)
                        .unwrap();
                }
                PacketSummary::icmp(src, dst, ty, code, 0)
            }
            L4::Other { proto } => {
                let proto = match proto {
                    // Protocols we parse, and IPv6 extension headers, are not "other".
                    1 | 6 | 17 | 58 | 0 | 43 | 44 | 60 => 50,
                    p => p,
                };
                ip.write(&mut f, etherparse::IpNumber(proto), &s.payload)
                    .unwrap();
                PacketSummary::other(src, dst, proto)
            }
        };
        if s.v6 {
            let mut next = f[20];
            let mut chain = Vec::new();
            for &(kind, units, more) in s.extensions.iter().rev() {
                let proto = [0, 43, 60, 44][usize::from(kind)];
                let mut h = if proto == 44 {
                    vec![next, 0, 0, u8::from(more), 1, 2, 3, 4]
                } else {
                    let mut h = vec![0x5a; (usize::from(units) + 1) * 8];
                    h[0] = next;
                    h[1] = units;
                    h
                };
                h.extend_from_slice(&chain);
                chain = h;
                next = proto;
            }
            f[20] = next;
            let pl = u16::from_be_bytes([f[18], f[19]]) + chain.len() as u16;
            f[18..20].copy_from_slice(&pl.to_be_bytes());
            f.splice(54..54, chain);
        } else {
            let words = s.ip_option_words;
            f[14] = 0x45 + words as u8;
            let total = u16::from_be_bytes([f[16], f[17]]) + (words * 4) as u16;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            f.splice(34..34, vec![1; words * 4]);
        }
        f.extend_from_slice(&s.padding);
        (f, expected)
    }

    /// An ICMP error with an embedded packet, cut after at least 8 transport bytes.
    #[derive(Debug, Clone)]
    struct ErrSpec {
        outer: Spec,
        inner: Spec,
        /// Index into the family's error types.
        ty: usize,
        code: u8,
        /// Transport bytes of the embedded packet kept beyond the first 8.
        keep: usize,
    }

    fn err_spec() -> impl Strategy<Value = ErrSpec> {
        (spec(), spec(), 0..5usize, any::<u8>(), 0..64usize).prop_map(
            |(outer, mut inner, ty, code, keep)| {
                inner.v6 = outer.v6;
                inner.padding.clear();
                inner.extensions.clear();
                inner.ip_option_words = 0;
                if let L4::Icmp { .. } = inner.l4 {
                    // Plain ICMP inner packets carry no ports; keep the echo case.
                    inner.l4 = L4::Echo {
                        reply: false,
                        id: code.into(),
                        seq: 1,
                    };
                }
                ErrSpec {
                    outer,
                    inner,
                    ty,
                    code,
                    keep,
                }
            },
        )
    }

    fn build_error(e: &ErrSpec) -> (Vec<u8>, PacketSummary) {
        let (inner_frame, inner_summary) = build(&e.inner);
        let ip_len = if e.inner.v6 { 40 } else { 20 };
        let mut original = inner_frame[14..].to_vec();
        original.truncate(ip_len + 8 + e.keep);
        let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let mut f = Vec::new();
        let (src, dst, ty) = if e.outer.v6 {
            let ty = [1, 2, 3, 4, 1][e.ty];
            eth.ipv6(e.outer.src6, e.outer.dst6, 64)
                .icmpv6_raw(ty, e.code, [0, 0, 5, 0xdc])
                .write(&mut f, &original)
                .unwrap();
            (v6(e.outer.src6), v6(e.outer.dst6), ty)
        } else {
            let ty = [3, 4, 5, 11, 12][e.ty];
            eth.ipv4(e.outer.src4, e.outer.dst4, 64)
                .icmpv4_raw(ty, e.code, [0; 4])
                .write(&mut f, &original)
                .unwrap();
            (v4(e.outer.src4), v4(e.outer.dst4), ty)
        };
        let (src_port, dst_port) = match inner_summary.icmp {
            Some(i) => (i.echo_id, i.echo_id),
            None => (inner_summary.src_port, inner_summary.dst_port),
        };
        let inner = InnerPacket {
            src: inner_summary.src,
            dst: inner_summary.dst,
            proto: inner_summary.proto,
            src_port,
            dst_port,
        };
        (f, PacketSummary::icmp_error(src, dst, ty, e.code, inner))
    }

    /// Cut `frame` at `cut` (a fraction of its length) and flip the bits `flips` names.
    fn mutate(mut frame: Vec<u8>, cut: f64, flips: &[(usize, u8)]) -> Vec<u8> {
        frame.truncate((frame.len() as f64 * cut) as usize);
        if !frame.is_empty() {
            for &(at, bit) in flips {
                let n = frame.len();
                frame[at % n] ^= 1 << (bit % 8);
            }
        }
        frame
    }

    proptest! {
        #[test]
        fn summary_matches_etherparse(s in spec()) {
            let (frame, expected) = build(&s);
            prop_assert_eq!(summarize(&frame), Ok(expected));
        }

        #[test]
        fn icmp_error_inner_matches_etherparse(e in err_spec()) {
            let (frame, expected) = build_error(&e);
            prop_assert_eq!(summarize(&frame), Ok(expected));
        }

        #[test]
        fn truncation_is_malformed_or_harmless(s in spec(), cut in 0.0..1.0f64) {
            let (frame, expected) = build(&s);
            let ip_end = frame.len() - s.padding.len();
            let at = (frame.len() as f64 * cut) as usize;
            let got = summarize(&frame[..at]);
            if at >= ip_end {
                prop_assert_eq!(got, Ok(expected));
            } else {
                prop_assert!(matches!(got, Err(SummaryError::Malformed(_))), "{:?}", got);
            }
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            ethertype in prop_oneof![Just(None), Just(Some(0x0800u16)), Just(Some(0x86dd))],
        ) {
            let mut frame = bytes;
            if let (Some(t), true) = (ethertype, frame.len() > 14) {
                frame[12..14].copy_from_slice(&t.to_be_bytes());
                frame[14] = (frame[14] & 0x0f) | if t == 0x0800 { 0x40 } else { 0x60 };
            }
            let _ = summarize(&frame);
        }

        #[test]
        fn never_panics_on_mutated_frames(
            s in spec(),
            e in err_spec(),
            cut in 0.0..=1.0f64,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        ) {
            let _ = summarize(&mutate(build(&s).0, cut, &flips));
            let _ = summarize(&mutate(build_error(&e).0, cut, &flips));
        }
    }
}
