//! The only place with syscalls and `unsafe`: TAP devices, the UDP underlay, netns/netlink.
//!
//! Layout, one concern per file:
//! - [`tap`]: TAP devices with `IFF_VNET_HDR` offloads (frames are `virtio_net_hdr` + Ethernet),
//!   single or multi-queue, nonblocking.
//! - [`offload`]: the `virtio_net_hdr` codec, userspace segmentation of TSO/USO super-frames,
//!   TCP coalescing for TAP writes, checksums. Pure (no syscalls), but
//!   it lives here because it interprets the TAP's GSO metadata.
//! - [`underlay`]: the VXLAN UDP socket(s): `sendmmsg`/`recvmmsg` batches into caller buffers,
//!   `UDP_SEGMENT`/`UDP_GRO`, outer source port picked from the inner flow hash.
//! - [`netlink`]: named network namespaces, veth pairs, link moves, addresses, MTU, routes
//!   (the vnic provisioning built from them is `crate::dataplane::provision`).
//! - [`poll`]: epoll + eventfd, so hot-path threads can wait without `unsafe` of their own.
//! - [`process`]: signals, the effective UID, children that die with their supervisor.
//! - [`rlimit`]: `RLIMIT_NOFILE` read and raised (daemons at start, the HTTP layer's cap).
//! - [`fdpass`]: `SCM_RIGHTS` over a Unix socket, so the agent can hand TAP fds to the
//!   dataplane ([`tap::Tap::into_fd`] / [`tap::Tap::from_fd`]).
//!
//! Every `unsafe` block carries a `// SAFETY:` comment. Hot-path calls ([`tap::Tap::read`] /
//! [`tap::Tap::write`], [`underlay::Underlay::send`] / [`underlay::Underlay::recv`],
//! [`offload::segment`], [`offload::TcpCoalescer`], [`poll::Poller::wait`]) allocate nothing,
//! take no lock and do not log per packet. Errors are `thiserror` enums whose messages name
//! the failing syscall (or netlink message) and the device, address or namespace.
//!
//! # How the dataplane uses this
//!
//! One thread per direction, each owning its buffers (allocated once):
//!
//! ```no_run
//! use std::io::{IoSlice, IoSliceMut};
//! use fabric::io::{offload, tap, underlay};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The agent made the TAP in the container's namespace and passed its queue fd over the
//! // control socket (`fdpass`); the daemon adopts it.
//! # let received: std::os::fd::OwnedFd = std::fs::File::open("/dev/null")?.into();
//! let vnic = tap::Tap::from_fd(received, tap::Offloads::ALL)?;
//! let udp = underlay::Underlay::bind(&underlay::UnderlayConfig::new("192.0.2.10:4789".parse()?))?;
//!
//! // Encap: TAP read -> segment -> one GSO transmit.
//! let mut rd = vec![0u8; tap::MAX_FRAME];
//! let mut segs_buf = vec![0u8; 256 * 1024];
//! let vxlan_hdr = [0x08, 0, 0, 0, 0, 0, 42, 0]; // I flag, VNI 42 (built by core/wire)
//! if let Some(n) = vnic.read(&mut rd)? {
//!     let hdr = offload::VirtioNetHdr::decode(&rd[..n]).unwrap();
//!     let frame = &rd[offload::VIRTIO_NET_HDR_LEN..n];
//!     let hash = fabric::core::flow_hash(frame);
//!     let segs = offload::segment(&hdr, frame, vxlan_hdr.len(), &mut segs_buf)?;
//!     segs.fill_headroom(&mut segs_buf, &vxlan_hdr);
//!     udp.send(&[underlay::Transmit {
//!         dst: "192.0.2.11:4789".parse()?,
//!         segment_size: Some(segs.stride),
//!         contents: &segs_buf[..segs.total_len()],
//!         flow_hash: hash,
//!     }])?;
//! }
//!
//! // Decap: recvmmsg (GRO) -> strip VXLAN -> coalesce -> TAP write.
//! let mut slots = vec![[0u8; 65_536]; 8];
//! let mut meta = [underlay::RecvMeta::default(); 8];
//! let mut sup = vec![0u8; 70_000];
//! let mut bufs: Vec<IoSliceMut<'_>> = slots.iter_mut().map(|s| IoSliceMut::new(s)).collect();
//! let got = udp.recv(&mut bufs, &mut meta)?;
//! drop(bufs);
//! let mut co = offload::TcpCoalescer::new(&mut sup);
//! for (m, slot) in meta[..got].iter().zip(&slots) {
//!     for dgram in slot[..m.len].chunks(m.stride) {
//!         let inner = &dgram[8..]; // after the VXLAN header (validated by core)
//!         loop {
//!             match co.push(inner) {
//!                 offload::Push::Started | offload::Push::Merged => break,
//!                 offload::Push::Flush => {
//!                     if let Some(f) = co.finish() { vnic.write(f)?; }
//!                 }
//!                 offload::Push::Bypass => {
//!                     if let Some(f) = co.finish() { vnic.write(f)?; }
//!                     let zero = [0u8; offload::VIRTIO_NET_HDR_LEN];
//!                     vnic.write_vectored(&[IoSlice::new(&zero), IoSlice::new(inner)])?;
//!                     break;
//!                 }
//!             }
//!         }
//!     }
//! }
//! if let Some(f) = co.finish() { vnic.write(f)?; }
//! # Ok(())
//! # }
//! ```
//!
//! Readiness: register [`tap::Tap`] and [`underlay::Underlay`] (both `AsFd`) with a
//! [`poll::Poller`]; a [`poll::Waker`] interrupts the wait for shutdown or vnic changes.
#![allow(unsafe_code)]

pub mod fdpass;
pub mod netlink;
pub mod nsexec;
pub mod offload;
pub mod poll;
pub mod process;
pub mod pty;
pub mod rlimit;
pub mod tap;
pub mod underlay;

mod sys;

pub use sys::{IfName, IfNameError};
