//! Packet views and representations, in smoltcp's style.
//!
//! Every protocol has two views:
//! - a `Packet<T: AsRef<[u8]>>` (or `Frame<T>`) wrapper over a byte buffer with accessors named
//!   after the RFC's fields. `new_checked` validates lengths once; after it succeeds no accessor
//!   panics. Untrusted bytes (from a container or from the underlay) must go through
//!   `new_checked`; emitters use `new_unchecked` over a buffer they sized themselves.
//! - a `Repr` holding only valid, high-level values, with `parse(&Packet)` and
//!   `emit(&mut Packet)`. `parse(emit(r)) == r` is property-tested for every type.
//!
//! Parsing never panics: a short or malformed buffer is a [`WireError`] value. The hot path
//! (VXLAN, Ethernet, the IPv4/IPv6 source address check) reads fixed offsets directly; it is
//! measurably faster than building a full `Repr` and the fields it needs are at fixed places.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod ipv4;
pub mod ipv6;
pub mod mac;
pub mod ndp;
pub mod virtio_net;
pub mod vxlan;

pub use arp::{Operation as ArpOperation, Packet as ArpPacket, Repr as ArpRepr};
pub use ethernet::{EtherType, Frame as EthernetFrame, Repr as EthernetRepr};
pub use ipv4::{Packet as Ipv4Packet, Repr as Ipv4Repr};
pub use ipv6::{Packet as Ipv6Packet, Repr as Ipv6Repr};
pub use mac::Mac;
pub use ndp::{Packet as NdpPacket, Repr as NdpRepr};
pub use virtio_net::VirtioNetHdr;
pub use vxlan::{Packet as VxlanPacket, Repr as VxlanRepr, Vni};

/// Why a buffer could not be parsed as the protocol asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer ends before the header (or the length a header field announces) does.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// Which header or field was cut short.
        what: &'static str,
        /// Bytes required.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A field holds a value the protocol forbids or that we do not handle.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which header.
        what: &'static str,
        /// What was wrong with it, and what was expected.
        why: &'static str,
    },
    /// A checksum did not verify.
    #[error("bad {what} checksum")]
    Checksum {
        /// Which header's checksum.
        what: &'static str,
    },
}

/// Result of a parse.
pub type Result<T> = core::result::Result<T, WireError>;

/// Check that `buf` holds at least `need` bytes.
#[inline]
pub(crate) fn need(what: &'static str, buf: &[u8], need: usize) -> Result<()> {
    if buf.len() < need {
        Err(WireError::Truncated {
            what,
            need,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn put_be16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
