//! The UDP underlay socket that carries VXLAN between hosts.
//!
//! The API follows quinn-udp: a batch of [`Transmit`]s goes out with `sendmmsg`, and `recvmmsg`
//! fills caller-provided buffers with one [`RecvMeta`] each. Nothing is allocated per packet;
//! the `mmsghdr`/`iovec`/address/cmsg arrays live on the stack, [`BATCH_MAX`] entries per call.
//!
//! # GSO and GRO
//!
//! - **Send (`UDP_SEGMENT`)**: a [`Transmit`] with `segment_size: Some(n)` carries equal `n`-byte
//!   datagrams back to back (the last may be shorter) and goes out as *one* `sendmmsg` entry with
//!   a `SOL_UDP/UDP_SEGMENT` cmsg; the kernel (or the NIC) cuts it. GSO is probed with
//!   `getsockopt(UDP_SEGMENT)` (Linux ≥ 4.18). A transmit larger than the kernel's segment
//!   limit (`UDP_MAX_SEGMENTS`: 64 on older kernels, 128 on recent ones; we use 64) or than
//!   64 KB is split into several entries. If a GSO send fails with `EIO` (egress device without
//!   checksum offload, as quinn-udp and wireguard-go found), GSO is
//!   switched off for this socket (logged once) and the same transmits are re-sent one datagram
//!   per entry: nothing is lost. (Current kernels, 6.18 here, segment and checksum in software
//!   instead of failing, so this is for older ones.)
//! - **Receive (`UDP_GRO`)**: enabled with `setsockopt(UDP_GRO)` on Linux ≥ 5.12 (earlier
//!   kernels have buggy GRO with `recvmsg`, as wireguard-go and msquic found). A received buffer
//!   may then hold several datagrams of `stride` bytes each (the last may be shorter), signalled
//!   by a `UDP_GRO` cmsg. Receive buffers must be 64 KB when GRO is on, or datagrams are cut.
//!
//! # Outer source port (RFC 7348 entropy)
//!
//! RFC 7348 wants the outer UDP source port to be a hash of the inner flow so that ECMP and the
//! receiver's RSS / `SO_REUSEPORT` spread flows. A bound UDP socket has one source port, and the
//! alternatives were:
//! 1. one fixed source port for everything: simplest, but every flow between two hosts hashes to
//!    one receive queue on the peer;
//! 2. a raw socket (`IP_HDRINCL`) writing any source port: loses `UDP_SEGMENT`, needs
//!    `CAP_NET_RAW`, and makes us compute outer IP/UDP headers and checksums ourselves;
//! 3. a small set of UDP sockets bound to distinct source ports, the flow hash picking one.
//!
//! We take (3): [`SourcePorts::Ephemeral`] (the default, 8 sockets on kernel-chosen ports) or
//! [`SourcePorts::Range`] (explicit ports, for operators who filter source ports). Eight ports
//! give 3 bits of entropy, enough to spread over the handful of receive queues or reuseport
//! workers a host has, at the cost of 8 fds per underlay. Each flow always maps to the same
//! socket, so per-flow order is kept. The send-only sockets get a drop-all socket filter so
//! stray traffic to their ports never queues. [`SourcePorts::Bound`] is choice (1): send from
//! the listening socket itself.
//!
//! # Blocking
//!
//! Sockets are blocking: `sendmmsg` waits for buffer space (back-pressure, not loss) and
//! [`Underlay::recv`] waits with `MSG_WAITFORONE` until at least one datagram is there, at most
//! [`UnderlayConfig::read_timeout`], then returns what is queued. Use [`Underlay::as_raw_fd`]
//! with [`super::poll::Poller`] for readiness-driven loops.

use std::io::{self, IoSliceMut};
use std::mem::{size_of, zeroed, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::sys;

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// Most entries handed to one `sendmmsg`/`recvmmsg` call (quinn-udp uses 32; wireguard-go 128).
pub const BATCH_MAX: usize = 64;
/// Segments per GSO send that every GSO-capable kernel accepts (older kernels cap `UDP_MAX_SEGMENTS` at 64).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Default socket buffer size (wireguard-go settled on 7 MB).
pub const DEFAULT_BUFFER_BYTES: usize = 8 << 20;
/// Largest UDP payload that fits in one IPv4 datagram.
const MAX_UDP_PAYLOAD: usize = 65_507;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// How outer UDP source ports are chosen (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePorts {
    /// Send from the bound (listening) socket: one fixed source port.
    Bound,
    /// This many send sockets on kernel-chosen ephemeral ports (1..=64).
    Ephemeral(u16),
    /// Send sockets bound to `first..first + count` (`count` in 1..=64).
    Range {
        /// First port.
        first: u16,
        /// Number of ports.
        count: u16,
    },
}

/// Settings for [`Underlay::bind`].
#[derive(Debug, Clone, Copy)]
pub struct UnderlayConfig {
    /// Local address to receive on (port 4789 for VXLAN; port 0 picks one).
    pub bind: SocketAddr,
    /// Source-port layout for sending.
    pub source_ports: SourcePorts,
    /// Set `SO_REUSEPORT` so several workers can bind the same address (and source ports).
    pub reuse_port: bool,
    /// `SO_RCVBUF`/`SO_SNDBUF` to ask for (`*BUFFORCE` first, which needs `CAP_NET_ADMIN`).
    pub buffer_bytes: usize,
    /// Use `UDP_SEGMENT` on send when the kernel has it.
    pub gso: bool,
    /// Use `UDP_GRO` on receive when the kernel has it (≥ 5.12).
    pub gro: bool,
    /// Longest [`Underlay::recv`] waits before returning 0 (`None`: forever).
    pub read_timeout: Option<Duration>,
}

impl UnderlayConfig {
    /// Defaults for `bind`: 8 ephemeral source ports, 8 MB buffers, GSO and GRO on, 100 ms timeout.
    pub fn new(bind: SocketAddr) -> Self {
        Self {
            bind,
            source_ports: SourcePorts::Ephemeral(8),
            reuse_port: false,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            gso: true,
            gro: true,
            read_timeout: Some(Duration::from_millis(100)),
        }
    }
}

/// One outgoing (possibly GSO) datagram batch to one destination.
#[derive(Debug, Clone, Copy)]
pub struct Transmit<'a> {
    /// Destination (same address family as the bound socket).
    pub dst: SocketAddr,
    /// `Some(n)`: `contents` is several `n`-byte datagrams (last may be shorter). `None`: one.
    pub segment_size: Option<usize>,
    /// The UDP payload(s).
    pub contents: &'a [u8],
    /// Hash of the inner flow, picks the outer source port; keep it stable per flow.
    pub flow_hash: u32,
}

/// What one receive slot got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// Sender address.
    pub src: SocketAddr,
    /// Bytes written into the slot's buffer.
    pub len: usize,
    /// Size of each datagram in the buffer (`== len` without GRO); the last may be shorter.
    pub stride: usize,
    /// The slot was too small and the kernel cut the data (`MSG_TRUNC`): drop and count it.
    pub truncated: bool,
}

impl Default for RecvMeta {
    fn default() -> Self {
        Self {
            src: SocketAddr::from(([0, 0, 0, 0], 0)),
            len: 0,
            stride: 0,
            truncated: false,
        }
    }
}

/// Failure of an underlay operation; every variant names the syscall and the address.
#[derive(Debug, thiserror::Error)]
pub enum UnderlayError {
    /// Creating or configuring a socket failed.
    #[error("{op} for underlay socket {addr}: {source}")]
    Setup {
        /// The syscall or option, e.g. `bind`.
        op: &'static str,
        /// The local address being set up.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `sendmmsg` failed. `transmits[..sent]` went out whole; `transmits[sent]` failed (possibly
    /// after part of its segments went out); the rest were not tried.
    #[error("sendmmsg from underlay {local} to {dst}: {source} ({sent} transmits sent before)")]
    Send {
        /// Local (listening) address.
        local: SocketAddr,
        /// Destination of the failing transmit.
        dst: SocketAddr,
        /// Transmits sent completely before the failure.
        sent: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `recvmmsg` failed.
    #[error("recvmmsg on underlay {local}: {source}")]
    Recv {
        /// Local address.
        local: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Bad arguments (wrong family, zero ports, ...).
    #[error("underlay {local}: {what}")]
    Invalid {
        /// Local address.
        local: SocketAddr,
        /// What was wrong and what was expected.
        what: &'static str,
    },
}

/// A bound VXLAN underlay: one receive socket plus the send sockets of [`SourcePorts`].
#[derive(Debug)]
pub struct Underlay {
    rx: OwnedFd,
    tx: Vec<OwnedFd>,
    tx_ports: Vec<u16>,
    local: SocketAddr,
    /// 0 = GSO unusable (never probed OK or switched off after EIO); else max segments per send.
    gso_segments: AtomicUsize,
    gro: bool,
}

impl Underlay {
    /// Creates and binds the sockets described by `config`.
    pub fn bind(config: &UnderlayConfig) -> Result<Self, UnderlayError> {
        let addr = config.bind;
        let setup = |op: &'static str| move |source| UnderlayError::Setup { op, addr, source };
        let rx = udp_socket(addr)?;
        if config.reuse_port {
            sys::setsockopt_int(&rx, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)
                .map_err(setup("setsockopt(SO_REUSEPORT)"))?;
        }
        set_buffers(&rx, config.buffer_bytes, addr)?;
        if let Some(t) = config.read_timeout {
            set_rcvtimeo(&rx, t).map_err(setup("setsockopt(SO_RCVTIMEO)"))?;
        }
        bind_fd(&rx, addr).map_err(setup("bind"))?;
        let local = local_addr(&rx).map_err(setup("getsockname"))?;

        let gro = config.gro
            && kernel_at_least(5, 12)
            && sys::setsockopt_int(&rx, SOL_UDP, UDP_GRO, 1).is_ok();
        let gso_ok = config.gso && sys::getsockopt_int(&rx, SOL_UDP, UDP_SEGMENT).is_ok();

        let ports: Vec<u16> = match config.source_ports {
            SourcePorts::Bound => Vec::new(),
            SourcePorts::Ephemeral(n) => {
                check_count(n, local)?;
                vec![0; n as usize]
            }
            SourcePorts::Range { first, count } => {
                check_count(count, local)?;
                if first as u32 + count as u32 > 65_536 || first == 0 {
                    return Err(UnderlayError::Invalid {
                        local,
                        what: "source port range must be within 1..=65535",
                    });
                }
                (0..count).map(|i| first + i).collect()
            }
        };
        let mut tx = Vec::with_capacity(ports.len());
        let mut tx_ports = Vec::with_capacity(ports.len());
        for port in ports {
            let mut a = local;
            a.set_port(port);
            let setup = |op: &'static str| {
                move |source| UnderlayError::Setup {
                    op,
                    addr: a,
                    source,
                }
            };
            let s = udp_socket(a)?;
            if config.reuse_port {
                sys::setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)
                    .map_err(setup("setsockopt(SO_REUSEPORT)"))?;
            }
            let sndbuf = config.buffer_bytes.min(i32::MAX as usize) as libc::c_int;
            if sys::setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, sndbuf).is_err() {
                sys::setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_SNDBUF, sndbuf)
                    .map_err(setup("setsockopt(SO_SNDBUF)"))?;
            }
            drop_all_input(&s).map_err(setup("setsockopt(SO_ATTACH_FILTER)"))?;
            bind_fd(&s, a).map_err(setup("bind"))?;
            let bound = local_addr(&s).map_err(setup("getsockname"))?;
            tx_ports.push(bound.port());
            tx.push(s);
        }
        if tx.is_empty() {
            tx_ports.push(local.port());
        }
        Ok(Self {
            rx,
            tx,
            tx_ports,
            local,
            gso_segments: AtomicUsize::new(if gso_ok { GSO_MAX_SEGMENTS } else { 0 }),
            gro,
        })
    }

    /// The bound receive address (with the real port if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The outer source ports in use, indexed like [`Self::source_port_for`] picks them.
    pub fn source_ports(&self) -> &[u16] {
        &self.tx_ports
    }

    /// The outer source port a transmit with `flow_hash` leaves from.
    #[inline]
    pub fn source_port_for(&self, flow_hash: u32) -> u16 {
        self.tx_ports[self.pick(flow_hash)]
    }

    /// Whether sends currently use `UDP_SEGMENT`.
    pub fn gso_enabled(&self) -> bool {
        self.gso_segments.load(Ordering::Relaxed) > 0
    }

    /// Segments per GSO send (0 when GSO is off).
    pub fn max_gso_segments(&self) -> usize {
        self.gso_segments.load(Ordering::Relaxed)
    }

    /// Effective (`SO_RCVBUF`, `SO_SNDBUF`) of the receive socket, as the kernel reports them
    /// (twice the requested value, for its bookkeeping).
    pub fn buffer_sizes(&self) -> Result<(usize, usize), UnderlayError> {
        let get = |name, op| {
            sys::getsockopt_int(&self.rx, libc::SOL_SOCKET, name)
                .map(|v| v.max(0) as usize)
                .map_err(|source| UnderlayError::Setup {
                    op,
                    addr: self.local,
                    source,
                })
        };
        Ok((
            get(libc::SO_RCVBUF, "getsockopt(SO_RCVBUF)")?,
            get(libc::SO_SNDBUF, "getsockopt(SO_SNDBUF)")?,
        ))
    }

    /// Whether receive slots may hold several datagrams (`UDP_GRO` on).
    pub fn gro_enabled(&self) -> bool {
        self.gro
    }

    #[inline]
    fn pick(&self, flow_hash: u32) -> usize {
        // Lemire's multiply-shift range reduction: uniform, no division.
        ((flow_hash as u64 * self.tx_ports.len() as u64) >> 32) as usize
    }

    #[inline]
    fn tx_fd(&self, i: usize) -> RawFd {
        match self.tx.get(i) {
            Some(fd) => fd.as_raw_fd(),
            None => self.rx.as_raw_fd(),
        }
    }

    /// Sends every transmit, batching consecutive ones that share a source socket into one
    /// `sendmmsg`. Blocks while socket buffers are full. See [`UnderlayError::Send`] for what a
    /// failure means.
    pub fn send(&self, transmits: &[Transmit<'_>]) -> Result<(), UnderlayError> {
        let v6 = self.local.is_ipv6();
        // Cursor: transmit index and byte offset within it.
        let (mut ti, mut off) = (0usize, 0usize);
        // SAFETY: all-zero is a valid bit pattern for these plain C structs.
        let mut hdrs: [libc::mmsghdr; BATCH_MAX] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut iovs: [libc::iovec; BATCH_MAX] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut names: [libc::sockaddr_in6; BATCH_MAX] = unsafe { zeroed() };
        let mut cmsgs = [CmsgBuf::ZERO; BATCH_MAX];
        // Where each entry starts (transmit index, offset), to resume after a short send.
        let mut starts = [(0usize, 0usize); BATCH_MAX];
        while ti < transmits.len() {
            let gso_segs = self.gso_segments.load(Ordering::Relaxed);
            let sock = self.pick(transmits[ti].flow_hash);
            let mut n = 0;
            let (mut bt, mut bo) = (ti, off);
            while n < BATCH_MAX && bt < transmits.len() {
                let t = &transmits[bt];
                if self.pick(t.flow_hash) != sock {
                    break;
                }
                if t.dst.is_ipv6() != v6 {
                    return Err(UnderlayError::Send {
                        local: self.local,
                        dst: t.dst,
                        sent: bt,
                        source: io::Error::from_raw_os_error(libc::EAFNOSUPPORT),
                    });
                }
                let len = t.contents.len();
                let seg = t
                    .segment_size
                    .filter(|&s| s > 0 && s < len)
                    .unwrap_or(len.max(1));
                let per_entry = if gso_segs > 0 {
                    (MAX_UDP_PAYLOAD / seg).clamp(1, gso_segs) * seg
                } else {
                    seg
                };
                let chunk = per_entry.min(len - bo);
                starts[n] = (bt, bo);
                let slice = &t.contents[bo..bo + chunk];
                iovs[n] = libc::iovec {
                    iov_base: slice.as_ptr() as *mut _,
                    iov_len: chunk,
                };
                let name_len = write_sockaddr(&mut names[n], t.dst);
                let h = &mut hdrs[n].msg_hdr;
                h.msg_name = (&mut names[n] as *mut libc::sockaddr_in6).cast();
                h.msg_namelen = name_len;
                h.msg_iov = &mut iovs[n];
                h.msg_iovlen = 1;
                if chunk > seg {
                    cmsgs[n].set_u16(SOL_UDP, UDP_SEGMENT, seg as u16);
                    h.msg_control = cmsgs[n].as_mut_ptr();
                    h.msg_controllen = CmsgBuf::space(size_of::<u16>());
                } else {
                    h.msg_control = std::ptr::null_mut();
                    h.msg_controllen = 0;
                }
                n += 1;
                bo += chunk;
                if bo >= len {
                    bt += 1;
                    bo = 0;
                }
            }
            // SAFETY: hdrs[..n] are initialised above and point into `iovs`, `names`, `cmsgs`
            // and the callers' `contents`, all of which outlive the call.
            let rc = unsafe {
                libc::sendmmsg(self.tx_fd(sock), hdrs.as_mut_ptr(), n as libc::c_uint, 0)
            };
            if rc > 0 {
                let k = rc as usize;
                if k == n {
                    (ti, off) = (bt, bo);
                } else {
                    (ti, off) = starts[k];
                }
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EIO) if gso_segs > 0 && !hdrs[0].msg_hdr.msg_control.is_null() => {
                    // The egress device cannot do UDP GSO (no checksum offload): switch it off
                    // and resend the same entry as single datagrams.
                    if self.gso_segments.swap(0, Ordering::Relaxed) > 0 {
                        tracing::warn!(local = %self.local, error = %err,
                            "UDP GSO send failed; disabling GSO on this underlay");
                    }
                    continue;
                }
                _ => {
                    return Err(UnderlayError::Send {
                        local: self.local,
                        dst: transmits[ti].dst,
                        sent: ti,
                        source: err,
                    })
                }
            }
        }
        Ok(())
    }

    /// Receives up to `min(bufs.len(), meta.len(), BATCH_MAX)` buffers of datagrams. Waits for
    /// the first one at most the read timeout; returns how many slots were filled (0 on timeout).
    pub fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Result<usize, UnderlayError> {
        self.recv_flags(bufs, meta, libc::MSG_WAITFORONE)
    }

    /// Like [`Underlay::recv`] but never waits: returns 0 at once when nothing is queued (for
    /// callers that wait on readiness with a poller).
    pub fn try_recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Result<usize, UnderlayError> {
        self.recv_flags(bufs, meta, libc::MSG_DONTWAIT)
    }

    fn recv_flags(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        flags: libc::c_int,
    ) -> Result<usize, UnderlayError> {
        let n = bufs.len().min(meta.len()).min(BATCH_MAX);
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: all-zero is a valid bit pattern for these plain C structs.
        let mut hdrs: [libc::mmsghdr; BATCH_MAX] = unsafe { zeroed() };
        let mut names: [MaybeUninit<libc::sockaddr_storage>; BATCH_MAX] =
            [MaybeUninit::uninit(); BATCH_MAX];
        let mut cmsgs = [CmsgBuf::ZERO; BATCH_MAX];
        for i in 0..n {
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = names[i].as_mut_ptr().cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // IoSliceMut is ABI-compatible with iovec.
            h.msg_iov = (&mut bufs[i] as *mut IoSliceMut<'_>).cast();
            h.msg_iovlen = 1;
            h.msg_control = cmsgs[i].as_mut_ptr();
            h.msg_controllen = size_of::<CmsgBuf>() as _;
        }
        let rc = loop {
            // SAFETY: hdrs[..n] point at live buffers (`bufs`, `names`, `cmsgs`) of the sizes
            // given; the kernel writes only within them.
            let rc = unsafe {
                libc::recvmmsg(
                    self.rx.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                break rc as usize;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                _ => {
                    return Err(UnderlayError::Recv {
                        local: self.local,
                        source: err,
                    })
                }
            }
        };
        for i in 0..rc {
            let h = &hdrs[i].msg_hdr;
            let len = hdrs[i].msg_len as usize;
            // SAFETY: the kernel filled `msg_namelen` bytes of names[i] with a sockaddr of the
            // socket's family.
            let src = unsafe { read_sockaddr(names[i].as_ptr(), h.msg_namelen) }
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
            let mut stride = len;
            // SAFETY: `h` is a msghdr whose control buffer the kernel just filled with
            // `msg_controllen` bytes of well-formed cmsgs; the CMSG_* macros stay inside it.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(h);
                while !c.is_null() {
                    if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                        let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                        if v > 0 {
                            stride = v as usize;
                        }
                    }
                    c = libc::CMSG_NXTHDR(h, c);
                }
            }
            let truncated = h.msg_flags & libc::MSG_TRUNC != 0;
            meta[i] = RecvMeta {
                src,
                len,
                stride,
                truncated,
            };
        }
        Ok(rc)
    }
}

impl AsRawFd for Underlay {
    /// The receive socket (register it with a poller).
    fn as_raw_fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }
}

impl AsFd for Underlay {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

/// Room for one cmsg with up to 8 bytes of data, 8-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; 32]);

impl CmsgBuf {
    const ZERO: Self = Self([0; 32]);

    fn space(data: usize) -> usize {
        // SAFETY: CMSG_SPACE is a pure arithmetic macro.
        unsafe { libc::CMSG_SPACE(data as u32) as usize }
    }

    fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.0.as_mut_ptr().cast()
    }

    fn set_u16(&mut self, level: libc::c_int, ty: libc::c_int, v: u16) {
        // SAFETY: the buffer is 32 bytes, 8-aligned; a cmsghdr (16 bytes) plus 2 bytes of data
        // fits. CMSG_LEN is pure arithmetic; CMSG_DATA points right after the header.
        unsafe {
            let c = self.0.as_mut_ptr() as *mut libc::cmsghdr;
            (*c).cmsg_level = level;
            (*c).cmsg_type = ty;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, v);
        }
    }
}

fn check_count(n: u16, local: SocketAddr) -> Result<(), UnderlayError> {
    if n == 0 || n > 64 {
        return Err(UnderlayError::Invalid {
            local,
            what: "source port count must be 1..=64",
        });
    }
    Ok(())
}

fn udp_socket(addr: SocketAddr) -> Result<OwnedFd, UnderlayError> {
    let family = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2) with constant arguments.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(UnderlayError::Setup {
            op: "socket",
            addr,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_buffers(fd: &OwnedFd, bytes: usize, addr: SocketAddr) -> Result<(), UnderlayError> {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    for (force, plain, op) in [
        (
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            "setsockopt(SO_RCVBUF)",
        ),
        (
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            "setsockopt(SO_SNDBUF)",
        ),
    ] {
        // *BUFFORCE ignores net.core.[rw]mem_max but needs CAP_NET_ADMIN; fall back quietly.
        if sys::setsockopt_int(fd, libc::SOL_SOCKET, force, v).is_err() {
            sys::setsockopt_int(fd, libc::SOL_SOCKET, plain, v)
                .map_err(|source| UnderlayError::Setup { op, addr, source })?;
        }
    }
    Ok(())
}

fn set_rcvtimeo(fd: &OwnedFd, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a live timeval and we pass its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    sys::cvt(rc).map(|_| ())
}

/// Attaches a one-instruction classic BPF program (`ret #0`) so the socket accepts nothing.
fn drop_all_input(fd: &OwnedFd) -> io::Result<()> {
    let mut insn = [libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: insn.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `insn`, both live for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    sys::cvt(rc).map(|_| ())
}

fn bind_fd(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
    let len = write_sockaddr(&mut sa, addr);
    // SAFETY: `sa` holds a sockaddr of `len` bytes for the family of `addr`.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in6).cast(),
            len,
        )
    };
    sys::cvt(rc).map(|_| ())
}

fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    let mut ss = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` is a writable sockaddr_storage and `len` its size.
    let rc = unsafe { libc::getsockname(fd.as_raw_fd(), ss.as_mut_ptr().cast(), &mut len) };
    sys::cvt(rc)?;
    // SAFETY: getsockname filled `len` bytes of a sockaddr.
    unsafe { read_sockaddr(ss.as_ptr(), len) }
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EAFNOSUPPORT))
}

/// Writes `addr` as a `sockaddr_in` or `sockaddr_in6` into `out`; returns its length.
#[inline]
fn write_sockaddr(out: &mut libc::sockaddr_in6, addr: SocketAddr) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in (16 bytes) fits in sockaddr_in6 (28 bytes), whose alignment
            // (4) is at least sockaddr_in's.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_in6).cast(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            *out = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a sockaddr written by the kernel.
///
/// # Safety
/// `p` must point to at least `len` initialised bytes of a sockaddr.
unsafe fn read_sockaddr(
    p: *const libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    // SAFETY: guaranteed by the caller; the family field is the first two bytes.
    let family = unsafe { (*p).ss_family } as libc::c_int;
    match family {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the caller wrote a sockaddr_in of sufficient length.
            let sin = unsafe { &*(p as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the caller wrote a sockaddr_in6 of sufficient length.
            let sin6 = unsafe { &*(p as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Whether the running kernel's release is at least `major.minor` (from `uname`).
pub(crate) fn kernel_at_least(major: u32, minor: u32) -> bool {
    // SAFETY: all-zero is a valid utsname; uname fills it.
    let mut u: libc::utsname = unsafe { zeroed() };
    // SAFETY: `u` is a writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return false;
    }
    let rel: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    let rel = String::from_utf8_lossy(&rel);
    let mut it = rel
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let ma: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mi: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (ma, mi) >= (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_is_uniform_and_in_range() {
        let u = Underlay::bind(&UnderlayConfig {
            source_ports: SourcePorts::Ephemeral(4),
            ..UnderlayConfig::new("127.0.0.1:0".parse().unwrap())
        })
        .unwrap();
        assert_eq!(u.source_ports().len(), 4);
        let mut counts = [0u32; 4];
        for h in 0..4096u32 {
            counts[u.pick(h.wrapping_mul(0x9E37_79B9))] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
        let ports: std::collections::HashSet<_> = u.source_ports().iter().collect();
        assert_eq!(ports.len(), 4, "ephemeral source ports must be distinct");
    }

    #[test]
    fn sockaddr_roundtrip() {
        for a in ["10.1.2.3:4789", "[fe80::1]:99"] {
            let addr: SocketAddr = a.parse().unwrap();
            // SAFETY: all-zero is a valid sockaddr_in6 / sockaddr_storage.
            let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
            let len = write_sockaddr(&mut sa, addr);
            // SAFETY: as above.
            let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
            // Copy into storage the way the kernel would hand it back.
            // SAFETY: `len` ≤ 28 bytes, within both structs.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (&sa as *const libc::sockaddr_in6).cast::<u8>(),
                    (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
                    len as usize,
                )
            };
            // SAFETY: `ss` holds `len` initialised bytes of a sockaddr.
            assert_eq!(unsafe { read_sockaddr(&ss, len) }, Some(addr));
        }
    }

    #[test]
    fn invalid_source_ports() {
        let base = UnderlayConfig::new("127.0.0.1:0".parse().unwrap());
        for sp in [
            SourcePorts::Ephemeral(0),
            SourcePorts::Range {
                first: 65_535,
                count: 2,
            },
        ] {
            let r = Underlay::bind(&UnderlayConfig {
                source_ports: sp,
                ..base
            });
            assert!(matches!(r, Err(UnderlayError::Invalid { .. })), "{sp:?}");
        }
    }
}
