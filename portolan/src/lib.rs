//! Portolan: the SVP v1 mapping service (Joyent/illumos varpd compatible).
//!
//! - [`svp`]: the wire codec, sans I/O.
//! - [`store`]: overlay/underlay mappings and per-host event logs, in SQLite or PostgreSQL.
pub mod store;
pub mod svp;
