//! The container runtime of an agent (proc's module; img's parts listed here until it lands).

pub mod bundle;
pub mod layers;
pub mod rootfs;
