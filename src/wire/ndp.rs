//! ICMPv6 neighbour solicitation and advertisement (RFC 4861 sections 4.3, 4.4), with the
//! source/target link-layer address options.

use super::checksum;
use super::{need, put_be16, Mac, Result, WireError};
use std::net::Ipv6Addr;

/// ICMPv6 type of a neighbour solicitation.
pub const TYPE_NS: u8 = 135;
/// ICMPv6 type of a neighbour advertisement.
pub const TYPE_NA: u8 = 136;
/// Header length before options (type, code, checksum, reserved/flags, target).
pub const BASE_LEN: usize = 24;
/// Length of a link-layer address option for Ethernet.
pub const LLA_OPT_LEN: usize = 8;

const OPT_SLLA: u8 = 1;
const OPT_TLLA: u8 = 2;
const FLAG_ROUTER: u8 = 0x80;
const FLAG_SOLICITED: u8 = 0x40;
const FLAG_OVERRIDE: u8 = 0x20;

/// A view of an ICMPv6 NS/NA message.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap without checking.
    pub fn new_unchecked(buf: T) -> Self {
        Packet { buf }
    }

    /// Wrap after checking the fixed part's length.
    pub fn new_checked(buf: T) -> Result<Self> {
        need("ICMPv6 neighbour discovery message", buf.as_ref(), BASE_LEN)?;
        Ok(Packet { buf })
    }

    /// ICMPv6 type.
    pub fn msg_type(&self) -> u8 {
        self.buf.as_ref()[0]
    }
    /// ICMPv6 code.
    pub fn code(&self) -> u8 {
        self.buf.as_ref()[1]
    }
    /// The target address.
    pub fn target(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buf.as_ref()[8..24]);
        a.into()
    }
    /// NA flags byte.
    pub fn flags(&self) -> u8 {
        self.buf.as_ref()[4]
    }

    /// Walk the options and return the first link-layer address option of `kind`.
    fn lla_option(&self, kind: u8) -> Result<Option<Mac>> {
        let mut opts = &self.buf.as_ref()[BASE_LEN..];
        let mut found = None;
        while !opts.is_empty() {
            need("NDP option header", opts, 2)?;
            let len = usize::from(opts[1]) * 8;
            if len == 0 {
                return Err(WireError::Malformed {
                    what: "NDP option",
                    why: "option length 0 (RFC 4861 requires the message be discarded)",
                });
            }
            need("NDP option", opts, len)?;
            if opts[0] == kind && found.is_none() {
                if len != LLA_OPT_LEN {
                    return Err(WireError::Malformed {
                        what: "NDP link-layer address option",
                        why: "length is not 1 (8 bytes) for an Ethernet address",
                    });
                }
                found = Some(Mac::from_bytes(&opts[2..8]));
            }
            opts = &opts[len..];
        }
        Ok(found)
    }
}

/// A neighbour solicitation or advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr {
    /// Who has `target`? (`source_lla` is absent in DAD probes.)
    Solicit {
        /// The address being resolved.
        target: Ipv6Addr,
        /// The sender's link-layer address option.
        source_lla: Option<Mac>,
    },
    /// `target` is at `target_lla`.
    Advert {
        /// Router flag.
        router: bool,
        /// Solicited flag.
        solicited: bool,
        /// Override flag.
        override_: bool,
        /// The address advertised.
        target: Ipv6Addr,
        /// The target link-layer address option.
        target_lla: Option<Mac>,
    },
}

impl Repr {
    /// Parse a checked message; `src`/`dst` are the IPv6 addresses, for the checksum.
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>, src: Ipv6Addr, dst: Ipv6Addr) -> Result<Repr> {
        let b = p.buf.as_ref();
        let acc = checksum::pseudo_v6(src, dst, super::ipv6::NEXT_HEADER_ICMPV6, b.len() as u32);
        if checksum::finish(checksum::sum(acc, b)) != 0 {
            return Err(WireError::Checksum { what: "ICMPv6" });
        }
        if p.code() != 0 {
            return Err(WireError::Malformed {
                what: "ICMPv6 neighbour discovery message",
                why: "code is not 0",
            });
        }
        let target = p.target();
        if target.is_multicast() {
            return Err(WireError::Malformed {
                what: "ICMPv6 neighbour discovery message",
                why: "target address is multicast",
            });
        }
        match p.msg_type() {
            TYPE_NS => Ok(Repr::Solicit {
                target,
                source_lla: p.lla_option(OPT_SLLA)?,
            }),
            TYPE_NA => {
                let f = p.flags();
                Ok(Repr::Advert {
                    router: f & FLAG_ROUTER != 0,
                    solicited: f & FLAG_SOLICITED != 0,
                    override_: f & FLAG_OVERRIDE != 0,
                    target,
                    target_lla: p.lla_option(OPT_TLLA)?,
                })
            }
            _ => Err(WireError::Malformed {
                what: "ICMPv6 neighbour discovery message",
                why: "type is neither 135 (NS) nor 136 (NA)",
            }),
        }
    }

    /// Bytes this message occupies.
    pub fn buffer_len(&self) -> usize {
        let opt = match self {
            Repr::Solicit { source_lla, .. } => source_lla.is_some(),
            Repr::Advert { target_lla, .. } => target_lla.is_some(),
        };
        BASE_LEN + if opt { LLA_OPT_LEN } else { 0 }
    }

    /// Emit into the first `buffer_len()` bytes of `b`, with the checksum for `src`→`dst`.
    pub fn emit(&self, b: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr) {
        let len = self.buffer_len();
        let b = &mut b[..len];
        b[1] = 0;
        b[2] = 0;
        b[3] = 0;
        b[4..8].fill(0);
        let (target, opt) = match *self {
            Repr::Solicit { target, source_lla } => {
                b[0] = TYPE_NS;
                (target, source_lla.map(|m| (OPT_SLLA, m)))
            }
            Repr::Advert {
                router,
                solicited,
                override_,
                target,
                target_lla,
            } => {
                b[0] = TYPE_NA;
                b[4] = (if router { FLAG_ROUTER } else { 0 })
                    | (if solicited { FLAG_SOLICITED } else { 0 })
                    | (if override_ { FLAG_OVERRIDE } else { 0 });
                (target, target_lla.map(|m| (OPT_TLLA, m)))
            }
        };
        b[8..24].copy_from_slice(&target.octets());
        if let Some((kind, mac)) = opt {
            b[24] = kind;
            b[25] = 1;
            b[26..32].copy_from_slice(&mac.0);
        }
        let acc = checksum::pseudo_v6(src, dst, super::ipv6::NEXT_HEADER_ICMPV6, len as u32);
        let c = checksum::finish(checksum::sum(acc, b));
        put_be16(b, 2, c);
    }
}

/// The solicited-node multicast address of `a` (ff02::1:ffXX:XXXX).
pub fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn src() -> Ipv6Addr {
        "fe80::1".parse().unwrap()
    }
    fn dst() -> Ipv6Addr {
        "ff02::1:ff00:2".parse().unwrap()
    }

    #[test]
    fn bad_checksum_and_zero_option_rejected() {
        let r = Repr::Solicit {
            target: "fd00::2".parse().unwrap(),
            source_lla: Some(Mac([2, 0, 0, 0, 0, 1])),
        };
        let mut b = vec![0u8; r.buffer_len()];
        r.emit(&mut b, src(), dst());
        assert_eq!(
            Repr::parse(&Packet::new_checked(&b[..]).unwrap(), src(), dst()).unwrap(),
            r
        );
        let mut bad = b.clone();
        bad[10] ^= 1;
        assert!(matches!(
            Repr::parse(&Packet::new_checked(&bad[..]).unwrap(), src(), dst()),
            Err(WireError::Checksum { .. })
        ));
        // Option length 0 must be rejected (and not loop forever).
        let mut z = b.clone();
        z[25] = 0;
        let z2 = {
            // recompute checksum so only the option is wrong
            z[2] = 0;
            z[3] = 0;
            let acc = checksum::pseudo_v6(src(), dst(), 58, z.len() as u32);
            let c = checksum::finish(checksum::sum(acc, &z));
            put_be16(&mut z, 2, c);
            z
        };
        assert!(matches!(
            Repr::parse(&Packet::new_checked(&z2[..]).unwrap(), src(), dst()),
            Err(WireError::Malformed { .. })
        ));
    }

    #[test]
    fn solicited_node_address() {
        assert_eq!(
            solicited_node("fd00::1234:5678".parse().unwrap()),
            "ff02::1:ff34:5678".parse::<Ipv6Addr>().unwrap()
        );
    }

    fn arb_repr() -> impl Strategy<Value = Repr> {
        let target = any::<u128>()
            .prop_map(Ipv6Addr::from)
            .prop_filter("unicast target", |a| !a.is_multicast());
        let mac = proptest::option::of(any::<[u8; 6]>().prop_map(Mac));
        prop_oneof![
            (target.clone(), mac.clone())
                .prop_map(|(target, source_lla)| Repr::Solicit { target, source_lla }),
            (any::<bool>(), any::<bool>(), any::<bool>(), target, mac).prop_map(
                |(r, s, o, target, target_lla)| Repr::Advert {
                    router: r,
                    solicited: s,
                    override_: o,
                    target,
                    target_lla
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(r in arb_repr(), s in any::<u128>(), d in any::<u128>()) {
            let (s, d) = (Ipv6Addr::from(s), Ipv6Addr::from(d));
            let mut b = vec![0u8; r.buffer_len()];
            r.emit(&mut b, s, d);
            prop_assert_eq!(Repr::parse(&Packet::new_checked(&b[..]).unwrap(), s, d).unwrap(), r);
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = Packet::new_checked(&b[..]) {
                let _ = Repr::parse(&p, src(), dst());
            }
        }
    }
}
