//! The fwrule firewall: language, compilation, connection tracking.
