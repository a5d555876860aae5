//! Portolan: the SVP v1 mapping service (Joyent/illumos varpd compatible).
//!
//! - [`svp`]: the wire codec, sans I/O.
//! - [`store`]: overlay/underlay mappings and per-host event logs, in SQLite or PostgreSQL.
//! - [`server`]: the tokio SVP server over a store.
//! - [`client`]: the async, pooled, pipelining SVP client.
//! - [`import`]: JSON import of mappings; [`bench`](mod@bench): the load generator.
pub mod bench;
pub mod client;
pub mod import;
pub mod server;
pub mod store;
pub mod svp;
