//! The sans-IO dataplane core.
