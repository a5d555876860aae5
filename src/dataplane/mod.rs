//! The per-host dataplane: in-process hosts (tests, demo) and the daemon wiring core + io + resolver.
pub mod cli;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod inproc;
pub mod provision;
