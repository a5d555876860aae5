//! What the core asks a resolver, and what the resolver answers.
//!
//! The core never talks to Portolan itself: on a miss it queues a [`LookupKey`] (read with
//! `Core::poll_lookup`) and later receives a [`LookupAnswer`] through `Core::handle_answer`.
//! `resolver::StaticResolver` answers from a table (tests, demo); the dataplane daemon answers
//! with the SVP client.

use crate::wire::{Mac, Vni};
use std::net::{IpAddr, SocketAddr};

/// A destination the core wants resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LookupKey {
    /// Which underlay host has `mac` on `vni`? (SVP VL2_REQ)
    Vl2 {
        /// The segment.
        vni: Vni,
        /// The overlay MAC.
        mac: Mac,
    },
    /// Which MAC (and underlay host) has `ip` on `vni`? (SVP VL3_REQ)
    Vl3 {
        /// The segment.
        vni: Vni,
        /// The overlay IP.
        ip: IpAddr,
    },
}

/// The answer to a VL3 lookup: the overlay MAC and the underlay address of its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vl3Mapping {
    /// Overlay MAC owning the IP.
    pub mac: Mac,
    /// Underlay address (IP, UDP port) of the host with that MAC.
    pub underlay: SocketAddr,
}

/// Why a lookup produced no answer (as opposed to "not found", which is an answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The mapping service could not be reached.
    #[error("mapping service unreachable: {0}")]
    Unreachable(String),
    /// The mapping service did not answer in time.
    #[error("lookup timed out")]
    Timeout,
    /// The mapping service answered with an error status or a malformed reply.
    #[error("mapping service error: {0}")]
    Failed(String),
}

/// A resolver's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupAnswer {
    /// Answer to [`LookupKey::Vl2`]. `Ok(None)` is "not found".
    Vl2 {
        /// The segment asked about.
        vni: Vni,
        /// The MAC asked about.
        mac: Mac,
        /// The underlay address, or not found, or why there is no answer.
        result: Result<Option<SocketAddr>, LookupError>,
    },
    /// Answer to [`LookupKey::Vl3`].
    Vl3 {
        /// The segment asked about.
        vni: Vni,
        /// The IP asked about.
        ip: IpAddr,
        /// The mapping, or not found, or why there is no answer.
        result: Result<Option<Vl3Mapping>, LookupError>,
    },
}

impl LookupAnswer {
    /// The key this answers.
    pub fn key(&self) -> LookupKey {
        match *self {
            LookupAnswer::Vl2 { vni, mac, .. } => LookupKey::Vl2 { vni, mac },
            LookupAnswer::Vl3 { vni, ip, .. } => LookupKey::Vl3 { vni, ip },
        }
    }
}
