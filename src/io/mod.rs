//! The only place with syscalls and `unsafe`: TAP devices, the UDP underlay, netns/netlink.
//!
//! Layout, one concern per file:
//! - [`tap`]: TAP devices with `IFF_VNET_HDR` offloads (frames are `virtio_net_hdr` + Ethernet).
//! - [`offload`]: the `virtio_net_hdr` codec, userspace segmentation of TSO/USO super-frames
//!   and TCP coalescing for TAP writes. Pure (no syscalls), but it lives here because it
//!   interprets the TAP's GSO metadata.
//! - [`underlay`]: the VXLAN UDP socket(s): `sendmmsg`/`recvmmsg` batches, `UDP_SEGMENT`/`UDP_GRO`,
//!   outer source port from the inner flow hash.
//! - [`netlink`]: network namespaces, veth pairs, link moves, addresses, MTU, routes, and
//!   [`netlink::setup_vnic`] for `fabric vnic add`.
//! - [`poll`]: epoll + eventfd so hot-path threads can wait without `unsafe` of their own.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment. Hot-path calls ([`tap::Tap::read`],
//! [`underlay::Underlay::send`]/[`underlay::Underlay::recv`], [`offload::segment`],
//! [`offload::TcpCoalescer`]) allocate nothing, take no lock and do not log per packet; errors
//! name the failing syscall and the device or address.
#![allow(unsafe_code)]

pub mod netlink;
pub mod offload;
pub mod poll;
pub mod tap;
pub mod underlay;

mod sys;

pub use sys::{IfName, IfNameError};
