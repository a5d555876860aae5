//! Portolan: the SVP v1 mapping service (Joyent/illumos varpd compatible).
//!
//! - [`svp`]: the wire codec, sans I/O.
pub mod svp;
