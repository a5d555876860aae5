//! TAP devices with `virtio_net_hdr` offloads.
//!
//! A [`Tap`] is one queue (one file descriptor) of a TAP device opened through `/dev/net/tun`
//! with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (plus `IFF_MULTI_QUEUE` for
//! [`Tap::open_multi_queue`]). Every frame read or written is a 12-byte
//! [`VirtioNetHdr`](super::offload::VirtioNetHdr) followed by an Ethernet frame.
//!
//! # Offloads
//!
//! `TUNSETOFFLOAD` tells the kernel which kinds of packets *we* accept on read. With
//! `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6` the container's stack hands over TCP super-frames of
//! up to 64 KB with a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`); `TUN_F_USO4/6` (Linux
//! ≥ 6.2) does the same for UDP. [`Tap::open`] asks for everything and falls back step by step
//! when the kernel answers `EINVAL` (USO first, then TSO, then checksum offload); the result is
//! [`Tap::offloads`]. Those frames must be segmented before they leave the host:
//! [`super::offload::segment`]. In the other direction the kernel accepts GSO frames from us
//! whatever `TUNSETOFFLOAD` says, which is what [`super::offload::TcpCoalescer`] relies on.
//!
//! # Kernel quirks
//!
//! - The header size is set with `TUNSETVNETHDRSZ` to 12 (`virtio_net_hdr_v1` with
//!   `num_buffers`); the default would be 10. Header fields are in native byte order (legacy
//!   virtio) unless `TUNSETVNETLE`/`BE` is used, which we don't.
//! - `IFF_VNET_HDR`, the header size and the offloads belong to the device, not to a queue: they
//!   are set through the first queue and inherited by the others.
//! - The device is not persistent (`TUNSETPERSIST 0`): it disappears when the last queue's fd is
//!   closed, also after it has been moved into another network namespace. The fd keeps working
//!   after such a move.
//! - [`Tap::set_mac`], [`Tap::set_mtu`], [`Tap::set_up`] and [`Tap::ifindex`] use `SIOC*` ioctls
//!   by name in the *caller's* network namespace: call them before moving the link, or use
//!   [`super::netlink`] inside the namespace afterwards.
//! - A read returns one frame; a buffer shorter than the frame truncates it silently, so read
//!   buffers must hold [`MAX_FRAME`] bytes when TSO/USO are on.
//! - Reads and writes are nonblocking: `None` means `EAGAIN`. Wait with [`super::poll::Poller`].

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::offload::VIRTIO_NET_HDR_LEN;
use super::sys::{self, IfName, IfReq};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;

/// Largest frame a read can return: header + 64 KB IP packet + Ethernet/VLAN header.
pub const MAX_FRAME: usize = VIRTIO_NET_HDR_LEN + 65_535 + 18;

/// Offload flags for `TUNSETOFFLOAD` (`TUN_F_*` in `linux/if_tun.h`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Offloads(u32);

impl Offloads {
    /// No offloads: every frame arrives complete with its checksums.
    pub const NONE: Self = Self(0);
    /// `TUN_F_CSUM`: frames may carry a partial checksum (`NEEDS_CSUM`).
    pub const CSUM: Self = Self(0x01);
    /// `TUN_F_TSO4`: TCP over IPv4 super-frames.
    pub const TSO4: Self = Self(0x02);
    /// `TUN_F_TSO6`: TCP over IPv6 super-frames.
    pub const TSO6: Self = Self(0x04);
    /// `TUN_F_TSO_ECN`: TSO super-frames with CWR set.
    pub const TSO_ECN: Self = Self(0x08);
    /// `TUN_F_USO4`: UDP over IPv4 super-frames (Linux ≥ 6.2).
    pub const USO4: Self = Self(0x20);
    /// `TUN_F_USO6`: UDP over IPv6 super-frames (Linux ≥ 6.2).
    pub const USO6: Self = Self(0x40);
    /// Everything [`super::offload::segment`] can undo.
    pub const ALL: Self = Self(0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40);

    /// The raw `TUN_F_*` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    /// `self` without the flags of `other`.
    pub const fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }
}

impl std::ops::BitOr for Offloads {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::fmt::Debug for Offloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [(u32, &str); 6] = [
            (0x01, "CSUM"),
            (0x02, "TSO4"),
            (0x04, "TSO6"),
            (0x08, "TSO_ECN"),
            (0x20, "USO4"),
            (0x40, "USO6"),
        ];
        let mut first = true;
        f.write_str("Offloads(")?;
        for (bit, name) in NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        f.write_str(")")
    }
}

/// Failure of a TAP operation; every variant names the syscall and the device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `open("/dev/net/tun")` failed (module not loaded, no permission, no such device node).
    #[error("open /dev/net/tun for TAP {dev}: {source}")]
    Open {
        /// The device being created.
        dev: IfName,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An ioctl on the TAP fd or on a control socket failed.
    #[error("ioctl {op} on TAP {dev}: {source}")]
    Ioctl {
        /// The ioctl, e.g. `TUNSETIFF`.
        op: &'static str,
        /// The device.
        dev: IfName,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A read, readv, write or writev on the TAP fd failed.
    #[error("{op} on TAP {dev}: {source}")]
    Io {
        /// The syscall, e.g. `read`.
        op: &'static str,
        /// The device.
        dev: IfName,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel created a device with another name than the one asked for.
    #[error("TUNSETIFF for TAP {asked} created {got} instead (name contained a format like %d?)")]
    NameMismatch {
        /// The name passed in.
        asked: IfName,
        /// The name the kernel chose.
        got: IfName,
    },
    /// The caller asked for something impossible, e.g. zero queues.
    #[error("TAP {dev}: {what}")]
    Invalid {
        /// The device.
        dev: IfName,
        /// What was wrong and what was expected.
        what: &'static str,
    },
}

/// What to open: device name and the offloads to ask for.
#[derive(Debug, Clone, Copy)]
pub struct TapConfig {
    /// Interface name (created if missing, attached to if it exists and is not in use).
    pub name: IfName,
    /// Offloads to request; the kernel's answer is [`Tap::offloads`].
    pub offloads: Offloads,
}

impl TapConfig {
    /// Config for `name` requesting [`Offloads::ALL`].
    pub fn new(name: IfName) -> Self {
        Self {
            name,
            offloads: Offloads::ALL,
        }
    }
}

/// One queue of a TAP device: nonblocking fd, frames are `virtio_net_hdr` + Ethernet.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: IfName,
    offloads: Offloads,
}

impl Tap {
    /// Opens (creating if needed) a single-queue TAP device.
    pub fn open(config: &TapConfig) -> Result<Self, TapError> {
        let fd = open_queue(config.name, false)?;
        let offloads = setup_device(&fd, config.name, config.offloads)?;
        Ok(Self {
            fd,
            name: config.name,
            offloads,
        })
    }

    /// Opens `queues` queues of one `IFF_MULTI_QUEUE` TAP device; the kernel spreads flows over
    /// them by hash. The device goes away when the last queue is dropped.
    pub fn open_multi_queue(config: &TapConfig, queues: usize) -> Result<Vec<Self>, TapError> {
        if queues == 0 {
            return Err(TapError::Invalid {
                dev: config.name,
                what: "asked for 0 queues, expected at least 1",
            });
        }
        let mut out = Vec::with_capacity(queues);
        let first = open_queue(config.name, true)?;
        let offloads = setup_device(&first, config.name, config.offloads)?;
        out.push(Self {
            fd: first,
            name: config.name,
            offloads,
        });
        for _ in 1..queues {
            let fd = open_queue(config.name, true)?;
            out.push(Self {
                fd,
                name: config.name,
                offloads,
            });
        }
        Ok(out)
    }

    /// Adopts a TAP queue fd received from another process (see [`super::fdpass`]): checks with
    /// `TUNGETIFF` that it is an `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` device, makes it
    /// nonblocking, and negotiates `offloads` again (device-wide and idempotent) to learn them.
    pub fn from_fd(fd: OwnedFd, offloads: Offloads) -> Result<Self, TapError> {
        let unknown = IfName::from_kernel(b"?");
        let mut ifr = IfReq::new(&unknown);
        sys::ioctl_ifreq(&fd, TUNGETIFF, &mut ifr).map_err(|source| TapError::Ioctl {
            op: "TUNGETIFF",
            dev: unknown,
            source,
        })?;
        let name = IfName::from_kernel(&ifr.name);
        let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if ifr.short() & want != want {
            return Err(TapError::Invalid {
                dev: name,
                what: "fd is not a TAP opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR",
            });
        }
        // SAFETY: F_GETFL/F_SETFL take and return plain ints.
        let rc = unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if fl < 0 {
                fl
            } else {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
            }
        };
        sys::cvt(rc).map_err(|source| TapError::Ioctl {
            op: "fcntl(O_NONBLOCK)",
            dev: name,
            source,
        })?;
        let offloads = setup_device(&fd, name, offloads)?;
        Ok(Self { fd, name, offloads })
    }

    /// Gives up the fd (e.g. to pass it to another process); the device lives while it is open.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The interface name.
    pub fn name(&self) -> IfName {
        self.name
    }

    /// Records the name the link got after a move and rename in another namespace.
    pub(crate) fn rename_after_move(&mut self, name: IfName) {
        self.name = name;
    }

    /// The offloads the kernel accepted (a subset of what was asked for).
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// Reads one frame (`virtio_net_hdr` + Ethernet) into `buf`; `Ok(None)` when none is queued.
    #[inline]
    pub fn read(&self, buf: &mut [u8]) -> Result<Option<usize>, TapError> {
        // SAFETY: `buf` is a valid writable region of `buf.len()` bytes for the whole call.
        let rc = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        self.io_result("read", rc)
    }

    /// Reads one frame scattered over `bufs` (e.g. header and frame into separate buffers).
    #[inline]
    pub fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> Result<Option<usize>, TapError> {
        let n = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: `IoSliceMut` is ABI-compatible with `struct iovec` and each points to a
        // writable buffer that lives for the call; `n` does not exceed the slice length.
        let rc = unsafe { libc::readv(self.fd.as_raw_fd(), bufs.as_ptr().cast(), n) };
        self.io_result("readv", rc)
    }

    /// Writes one frame (`virtio_net_hdr` + Ethernet); `Ok(None)` if the kernel said `EAGAIN`.
    #[inline]
    pub fn write(&self, frame: &[u8]) -> Result<Option<usize>, TapError> {
        // SAFETY: `frame` is a valid readable region of `frame.len()` bytes for the whole call.
        let rc = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        self.io_result("write", rc)
    }

    /// Writes one frame gathered from `bufs` (e.g. a header buffer and a payload slice).
    #[inline]
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> Result<Option<usize>, TapError> {
        let n = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: `IoSlice` is ABI-compatible with `struct iovec`; each points to readable
        // memory that lives for the call; `n` does not exceed the slice length.
        let rc = unsafe { libc::writev(self.fd.as_raw_fd(), bufs.as_ptr().cast(), n) };
        self.io_result("writev", rc)
    }

    #[inline]
    fn io_result(&self, op: &'static str, rc: libc::ssize_t) -> Result<Option<usize>, TapError> {
        if rc >= 0 {
            return Ok(Some(rc as usize));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) => Ok(None),
            _ => Err(TapError::Io {
                op,
                dev: self.name,
                source: err,
            }),
        }
    }

    /// Detaches (`false`) or re-attaches (`true`) this queue of a multi-queue device.
    pub fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
        let mut ifr = IfReq::new(&self.name);
        ifr.set_short(if enabled {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        });
        sys::ioctl_ifreq(&self.fd, TUNSETQUEUE, &mut ifr).map_err(|source| TapError::Ioctl {
            op: "TUNSETQUEUE",
            dev: self.name,
            source,
        })
    }

    /// Sets the MAC address (`SIOCSIFHWADDR`, caller's namespace).
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<(), TapError> {
        let mut ifr = IfReq::new(&self.name);
        ifr.data[..2].copy_from_slice(&(libc::ARPHRD_ETHER).to_ne_bytes());
        ifr.data[2..8].copy_from_slice(&mac);
        self.ctl("SIOCSIFHWADDR", libc::SIOCSIFHWADDR, &mut ifr)
    }

    /// Sets the MTU (`SIOCSIFMTU`, caller's namespace).
    pub fn set_mtu(&self, mtu: u32) -> Result<(), TapError> {
        let mut ifr = IfReq::new(&self.name);
        ifr.set_int(i32::try_from(mtu).unwrap_or(i32::MAX));
        self.ctl("SIOCSIFMTU", libc::SIOCSIFMTU, &mut ifr)
    }

    /// Sets the transmit queue length (`SIOCSIFTXQLEN`; TAP's default of 500 is short).
    pub fn set_txqueuelen(&self, len: u32) -> Result<(), TapError> {
        let mut ifr = IfReq::new(&self.name);
        ifr.set_int(i32::try_from(len).unwrap_or(i32::MAX));
        self.ctl("SIOCSIFTXQLEN", libc::SIOCSIFTXQLEN, &mut ifr)
    }

    /// Brings the link up or down (`SIOCGIFFLAGS` + `SIOCSIFFLAGS`, caller's namespace).
    pub fn set_up(&self, up: bool) -> Result<(), TapError> {
        let mut ifr = IfReq::new(&self.name);
        self.ctl("SIOCGIFFLAGS", libc::SIOCGIFFLAGS, &mut ifr)?;
        let flags = ifr.short();
        let up_flag = libc::IFF_UP as i16;
        ifr.set_short(if up {
            flags | up_flag
        } else {
            flags & !up_flag
        });
        self.ctl("SIOCSIFFLAGS", libc::SIOCSIFFLAGS, &mut ifr)
    }

    /// The interface index (`SIOCGIFINDEX`, caller's namespace).
    pub fn ifindex(&self) -> Result<u32, TapError> {
        let mut ifr = IfReq::new(&self.name);
        self.ctl("SIOCGIFINDEX", libc::SIOCGIFINDEX, &mut ifr)?;
        Ok(ifr.int() as u32)
    }

    fn ctl(&self, op: &'static str, req: libc::c_ulong, ifr: &mut IfReq) -> Result<(), TapError> {
        let map = |source| TapError::Ioctl {
            op,
            dev: self.name,
            source,
        };
        let sock = sys::inet_ctl_socket().map_err(map)?;
        sys::ioctl_ifreq(&sock, req, ifr).map_err(map)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Opens /dev/net/tun and attaches it to `name` with TUNSETIFF.
fn open_queue(name: IfName, multi_queue: bool) -> Result<OwnedFd, TapError> {
    // SAFETY: the path is a NUL-terminated literal; open(2) takes no other pointers.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(TapError::Open {
            dev: name,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `raw` is a freshly opened descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut ifr = IfReq::new(&name);
    let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if multi_queue {
        flags |= IFF_MULTI_QUEUE;
    }
    ifr.set_short(flags);
    sys::ioctl_ifreq(&fd, TUNSETIFF, &mut ifr).map_err(|source| TapError::Ioctl {
        op: "TUNSETIFF",
        dev: name,
        source,
    })?;
    let got = IfName::from_kernel(&ifr.name);
    if got != name {
        return Err(TapError::NameMismatch { asked: name, got });
    }
    Ok(fd)
}

/// Device-wide settings: not persistent, 12-byte vnet header, offloads (with fallback).
fn setup_device(fd: &OwnedFd, name: IfName, want: Offloads) -> Result<Offloads, TapError> {
    let ioctl_err = |op: &'static str| {
        move |source| TapError::Ioctl {
            op,
            dev: name,
            source,
        }
    };
    // SAFETY: TUNSETPERSIST takes its argument by value (an int), not a pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST as _, 0 as libc::c_ulong) };
    sys::cvt(rc).map_err(ioctl_err("TUNSETPERSIST"))?;

    let mut size: libc::c_int = VIRTIO_NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points to a live local.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ as _, &mut size as *mut _) };
    sys::cvt(rc).map_err(ioctl_err("TUNSETVNETHDRSZ"))?;
    let mut got: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int through the pointer, which points to a live local.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETVNETHDRSZ as _, &mut got as *mut _) };
    sys::cvt(rc).map_err(ioctl_err("TUNGETVNETHDRSZ"))?;
    if got != VIRTIO_NET_HDR_LEN as libc::c_int {
        return Err(TapError::Invalid {
            dev: name,
            what: "kernel kept a vnet header size other than the 12 bytes we set",
        });
    }

    // Ask for everything, then drop what older kernels reject with EINVAL: USO (6.2), then
    // TSO/ECN, then checksum offload. TSO without CSUM is rejected by the kernel, so CSUM stays
    // in every TSO attempt.
    let usos = Offloads::USO4 | Offloads::USO6;
    let tsos = Offloads::TSO4 | Offloads::TSO6 | Offloads::TSO_ECN;
    let attempts = [
        want,
        want.without(usos),
        want.without(usos | tsos),
        Offloads::NONE,
    ];
    let mut last_err = None;
    for (i, attempt) in attempts.iter().enumerate() {
        if i > 0 && *attempt == attempts[i - 1] {
            continue;
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value (unsigned int flags).
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                TUNSETOFFLOAD as _,
                attempt.bits() as libc::c_ulong,
            )
        };
        match sys::cvt(rc) {
            Ok(_) => return Ok(*attempt),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last_err = Some(e),
            Err(e) => return Err(ioctl_err("TUNSETOFFLOAD")(e)),
        }
    }
    Err(ioctl_err("TUNSETOFFLOAD")(last_err.unwrap_or_else(|| {
        io::Error::from_raw_os_error(libc::EINVAL)
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_flags() {
        let all = Offloads::ALL;
        assert!(all.contains(Offloads::TSO4 | Offloads::CSUM));
        assert!(!all.without(Offloads::USO4).contains(Offloads::USO4));
        assert_eq!(
            format!("{:?}", Offloads::CSUM | Offloads::TSO6),
            "Offloads(CSUM|TSO6)"
        );
        assert_eq!(Offloads::NONE.bits(), 0);
    }

    #[test]
    fn zero_queues_rejected() {
        let cfg = TapConfig::new(IfName::new("fabtq0").unwrap());
        assert!(matches!(
            Tap::open_multi_queue(&cfg, 0),
            Err(TapError::Invalid { .. })
        ));
    }
}
