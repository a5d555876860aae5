//! The fwrule firewall: language, compilation, connection tracking.

pub mod compile;
pub mod conntrack;
pub mod rule;
