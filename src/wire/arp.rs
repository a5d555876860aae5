//! ARP for IPv4 over Ethernet (RFC 826): the 28-byte request/reply body.

use super::{be16, need, put_be16, Mac, Result, WireError};
use std::net::Ipv4Addr;

/// Length of an Ethernet/IPv4 ARP body.
pub const LEN: usize = 28;

/// ARP opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Who has TPA? Tell SPA.
    Request,
    /// SPA is at SHA.
    Reply,
}

/// A view of an ARP packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap without checking.
    pub fn new_unchecked(buf: T) -> Self {
        Packet { buf }
    }

    /// Wrap after checking the length.
    pub fn new_checked(buf: T) -> Result<Self> {
        need("ARP packet", buf.as_ref(), LEN)?;
        Ok(Packet { buf })
    }

    /// Hardware type (1 = Ethernet).
    pub fn htype(&self) -> u16 {
        be16(self.buf.as_ref(), 0)
    }
    /// Protocol type (0x0800 = IPv4).
    pub fn ptype(&self) -> u16 {
        be16(self.buf.as_ref(), 2)
    }
    /// Hardware address length.
    pub fn hlen(&self) -> u8 {
        self.buf.as_ref()[4]
    }
    /// Protocol address length.
    pub fn plen(&self) -> u8 {
        self.buf.as_ref()[5]
    }
    /// Opcode.
    pub fn oper(&self) -> u16 {
        be16(self.buf.as_ref(), 6)
    }
    /// Sender hardware address.
    pub fn sha(&self) -> Mac {
        Mac::from_bytes(&self.buf.as_ref()[8..14])
    }
    /// Sender protocol address.
    pub fn spa(&self) -> Ipv4Addr {
        let b = self.buf.as_ref();
        Ipv4Addr::new(b[14], b[15], b[16], b[17])
    }
    /// Target hardware address.
    pub fn tha(&self) -> Mac {
        Mac::from_bytes(&self.buf.as_ref()[18..24])
    }
    /// Target protocol address.
    pub fn tpa(&self) -> Ipv4Addr {
        let b = self.buf.as_ref();
        Ipv4Addr::new(b[24], b[25], b[26], b[27])
    }
}

/// A valid Ethernet/IPv4 ARP request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Request or reply.
    pub op: Operation,
    /// Sender MAC.
    pub sha: Mac,
    /// Sender IPv4.
    pub spa: Ipv4Addr,
    /// Target MAC (zero in requests).
    pub tha: Mac,
    /// Target IPv4.
    pub tpa: Ipv4Addr,
}

impl Repr {
    /// Parse, rejecting anything but Ethernet/IPv4 requests and replies.
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Repr> {
        if p.htype() != 1 || p.ptype() != 0x0800 || p.hlen() != 6 || p.plen() != 4 {
            return Err(WireError::Malformed {
                what: "ARP packet",
                why: "not Ethernet/IPv4 (expected htype 1, ptype 0x0800, hlen 6, plen 4)",
            });
        }
        let op = match p.oper() {
            1 => Operation::Request,
            2 => Operation::Reply,
            _ => {
                return Err(WireError::Malformed {
                    what: "ARP packet",
                    why: "opcode is neither request (1) nor reply (2)",
                })
            }
        };
        Ok(Repr {
            op,
            sha: p.sha(),
            spa: p.spa(),
            tha: p.tha(),
            tpa: p.tpa(),
        })
    }

    /// Emit into the first [`LEN`] bytes of `b`.
    pub fn emit(&self, b: &mut [u8]) {
        put_be16(b, 0, 1);
        put_be16(b, 2, 0x0800);
        b[4] = 6;
        b[5] = 4;
        put_be16(
            b,
            6,
            match self.op {
                Operation::Request => 1,
                Operation::Reply => 2,
            },
        );
        b[8..14].copy_from_slice(&self.sha.0);
        b[14..18].copy_from_slice(&self.spa.octets());
        b[18..24].copy_from_slice(&self.tha.0);
        b[24..28].copy_from_slice(&self.tpa.octets());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_non_ethernet_ipv4() {
        let mut b = [0u8; LEN];
        Repr {
            op: Operation::Request,
            sha: Mac([2, 0, 0, 0, 0, 1]),
            spa: Ipv4Addr::new(10, 0, 0, 1),
            tha: Mac::ZERO,
            tpa: Ipv4Addr::new(10, 0, 0, 2),
        }
        .emit(&mut b);
        b[5] = 16;
        assert!(Repr::parse(&Packet::new_checked(&b[..]).unwrap()).is_err());
        b[5] = 4;
        b[7] = 9;
        assert!(Repr::parse(&Packet::new_checked(&b[..]).unwrap()).is_err());
        assert!(Packet::new_checked(&b[..27]).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(req in any::<bool>(), sha in any::<[u8;6]>(), spa in any::<u32>(), tha in any::<[u8;6]>(), tpa in any::<u32>()) {
            let r = Repr { op: if req { Operation::Request } else { Operation::Reply },
                sha: Mac(sha), spa: spa.into(), tha: Mac(tha), tpa: tpa.into() };
            let mut b = [0u8; LEN];
            r.emit(&mut b);
            prop_assert_eq!(Repr::parse(&Packet::new_checked(&b[..]).unwrap()).unwrap(), r);
        }
    }
}
