//! The fwrule firewall: language, compilation, connection tracking.

pub mod rule;
