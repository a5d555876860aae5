//! The per-host dataplane: in-process hosts (tests, demo) and the daemon wiring core + io + resolver.
pub mod demo;
pub mod inproc;
