//! Small shared syscall helpers: interface names, `ifreq` ioctls, errno handling.
//!
//! Everything here is crate-private plumbing for [`super::tap`], [`super::underlay`] and
//! [`super::netlink`]; the public surface is [`IfName`].

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Maximum interface name length in bytes, without the trailing NUL (`IFNAMSIZ - 1`).
pub const IFNAME_MAX: usize = 15;

/// A Linux interface name (1..=15 bytes, no `/`, NUL or whitespace), stored inline and `Copy`.
///
/// Kept inline so that error values naming a device never allocate on the hot path.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IfName {
    bytes: [u8; IFNAME_MAX + 1],
    len: u8,
}

/// An interface name that the kernel would reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid interface name {name:?}: expected 1 to 15 bytes without '/', ':', NUL or whitespace"
)]
pub struct IfNameError {
    /// The rejected name.
    pub name: String,
}

impl IfName {
    /// Validates `name` the way the kernel's `dev_valid_name` does.
    pub fn new(name: &str) -> Result<Self, IfNameError> {
        let b = name.as_bytes();
        let bad = b.is_empty()
            || b.len() > IFNAME_MAX
            || name == "."
            || name == ".."
            || b.iter()
                .any(|&c| c == b'/' || c == b':' || c == 0 || c.is_ascii_whitespace());
        if bad {
            return Err(IfNameError {
                name: name.to_owned(),
            });
        }
        let mut bytes = [0u8; IFNAME_MAX + 1];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Self {
            bytes,
            len: b.len() as u8,
        })
    }

    /// Builds a name from a NUL-padded kernel buffer (as returned in an `ifreq`).
    pub(crate) fn from_kernel(buf: &[u8]) -> Self {
        let len = buf
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(buf.len())
            .min(IFNAME_MAX);
        let mut bytes = [0u8; IFNAME_MAX + 1];
        bytes[..len].copy_from_slice(&buf[..len]);
        Self {
            bytes,
            len: len as u8,
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        // Constructed from a &str or validated kernel bytes; fall back to "?" on non-UTF-8 kernel
        // names rather than panic.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("?")
    }

    /// The name followed by NUL padding, as `ifr_name` wants it.
    pub(crate) fn c_bytes(&self) -> [u8; IFNAME_MAX + 1] {
        self.bytes
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IfName({:?})", self.as_str())
    }
}

impl std::str::FromStr for IfName {
    type Err = IfNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// `struct ifreq` with the union spelled out as bytes (40 bytes on 64-bit Linux).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct IfReq {
    pub name: [u8; 16],
    pub data: [u8; 24],
}

impl IfReq {
    pub fn new(name: &IfName) -> Self {
        Self {
            name: name.c_bytes(),
            data: [0; 24],
        }
    }
    pub fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    pub fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }
    pub fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
    pub fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

/// Runs `ioctl(fd, req, &mut ifreq)`.
pub(crate) fn ioctl_ifreq(
    fd: &impl AsRawFd,
    req: libc::c_ulong,
    ifr: &mut IfReq,
) -> io::Result<()> {
    // SAFETY: `ifr` is a valid, writable 40-byte `struct ifreq` that outlives the call; every
    // request we pass reads and/or writes at most that struct.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, ifr as *mut IfReq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A throwaway `AF_INET` datagram socket for `SIOC*IF*` ioctls in the *current* network namespace.
pub(crate) fn inet_ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with constant arguments; no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Converts a `-1`-on-error syscall return value into `io::Result`.
pub(crate) fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Converts a `-1`-on-error `ssize_t` return value into `io::Result<usize>`.
pub(crate) fn cvt_size(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Sets an integer socket option.
pub(crate) fn setsockopt_int(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and we pass its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(rc).map(|_| ())
}

/// Reads an integer socket option.
pub(crate) fn getsockopt_int(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &mut value as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    cvt(rc).map(|_| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_validation() {
        assert!(IfName::new("tap0").is_ok());
        assert!(IfName::new("123456789012345").is_ok());
        assert!(IfName::new("1234567890123456").is_err());
        assert!(IfName::new("").is_err());
        assert!(IfName::new("a/b").is_err());
        assert!(IfName::new("a b").is_err());
        assert!(IfName::new("..").is_err());
        assert_eq!(IfName::new("veth1").unwrap().to_string(), "veth1");
        assert_eq!(IfName::from_kernel(b"eth0\0\0\0").as_str(), "eth0");
    }
}
