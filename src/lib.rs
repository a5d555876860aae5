//! fabric: a Triton-style overlay network for containers.
//!
//! Layers (dependencies point one way): [`wire`] ← [`core`] / [`firewall`] ← `dataplane` → `io`,
//! `resolver` → `portolan`. Nothing below the dataplane knows about threads, sockets or clocks.

#![deny(unsafe_code)]

pub mod agent;
pub mod control;
pub mod core;
pub mod dataplane;
pub mod docker;
pub mod firewall;
pub mod http;
pub mod io;
pub mod pki;
pub mod resolver;
pub mod up;
pub mod wire;
