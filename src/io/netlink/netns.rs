//! Named network namespaces: create, open, enter (per thread), delete, like `ip netns`.
//! See the parent module's documentation for how they are made and entered.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::{sys_err, NetlinkError};
use crate::io::sys;

const NETNS_RUN_DIR: &str = "/run/netns";

/// A network namespace held open by fd (and, when named, by its `/run/netns` bind mount).
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    name: Option<String>,
}

impl Netns {
    /// Creates the named namespace `/run/netns/NAME`, like `ip netns add NAME`.
    pub fn create(name: &str) -> Result<Self, NetlinkError> {
        let path = ns_path(name)?;
        prepare_run_dir()?;
        // Create the mount point file; it must not exist yet.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(sys_err("create", path.display().to_string()))?;
        let p2 = path.clone();
        let made = std::thread::spawn(move || -> Result<(), NetlinkError> {
            // SAFETY: unshare only changes this (short-lived) thread's namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            sys::cvt(rc).map_err(sys_err("unshare(CLONE_NEWNET)", p2.display().to_string()))?;
            mount_bind(Path::new("/proc/thread-self/ns/net"), &p2)
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetlinkError::Invalid(
                "namespace creation thread panicked".into(),
            ))
        });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        match Self::open(name) {
            Ok(ns) => Ok(ns),
            Err(e) => {
                let _ = Self::delete(name);
                Err(e)
            }
        }
    }

    /// Opens the existing named namespace `/run/netns/NAME`.
    pub fn open(name: &str) -> Result<Self, NetlinkError> {
        let path = ns_path(name)?;
        let fd = open_ro(&path)?;
        Ok(Self {
            fd,
            name: Some(name.to_owned()),
        })
    }

    /// Opens a namespace by path (e.g. `/proc/PID/ns/net`).
    pub fn open_path(path: &Path) -> Result<Self, NetlinkError> {
        Ok(Self {
            fd: open_ro(path)?,
            name: None,
        })
    }

    /// The calling thread's current namespace.
    pub fn current() -> Result<Self, NetlinkError> {
        Self::open_path(Path::new("/proc/thread-self/ns/net"))
    }

    /// Removes the named namespace like `ip netns del NAME` (it lives on while anything is in it).
    pub fn delete(name: &str) -> Result<(), NetlinkError> {
        let path = ns_path(name)?;
        let c = cpath(&path)?;
        // SAFETY: `c` is a valid NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let umount = sys::cvt(rc);
        let unlink = std::fs::remove_file(&path);
        match (umount, unlink) {
            (_, Ok(())) => Ok(()),
            (Err(e), Err(_)) => Err(sys_err("umount2", path.display().to_string())(e)),
            (Ok(_), Err(e)) => Err(sys_err("unlink", path.display().to_string())(e)),
        }
    }

    /// Whether `/run/netns/NAME` exists.
    pub fn exists(name: &str) -> bool {
        ns_path(name).map(|p| p.exists()).unwrap_or(false)
    }

    /// The name, if opened or created by name.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Runs `f` on a new thread that has entered this namespace; returns its result.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetlinkError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let fd = self.fd.as_raw_fd();
        let label = self.label();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: `fd` is a namespace fd kept open by `self` for the whole scope;
                // setns only affects this thread.
                let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                sys::cvt(rc).map_err(sys_err("setns(CLONE_NEWNET)", label))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(NetlinkError::Invalid("namespace thread panicked".into())))
        })
    }

    pub(super) fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("netns {n}"),
            None => format!("netns fd {}", self.fd.as_raw_fd()),
        }
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A named namespace that is deleted on drop (for tests and temporary topologies).
#[derive(Debug)]
pub struct NetnsGuard {
    ns: Netns,
    name: String,
}

impl NetnsGuard {
    /// Creates `/run/netns/NAME`, to be deleted when the guard drops.
    pub fn create(name: &str) -> Result<Self, NetlinkError> {
        Ok(Self {
            ns: Netns::create(name)?,
            name: name.to_owned(),
        })
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::ops::Deref for NetnsGuard {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = Netns::delete(&self.name) {
            tracing::warn!(netns = %self.name, error = %e, "could not delete namespace");
        }
    }
}

fn ns_path(name: &str) -> Result<PathBuf, NetlinkError> {
    if name.is_empty() || name.len() > 255 || name.contains('/') || name == "." || name == ".." {
        return Err(NetlinkError::Invalid(format!(
            "invalid namespace name {name:?}: expected 1-255 bytes without '/'"
        )));
    }
    Ok(Path::new(NETNS_RUN_DIR).join(name))
}

fn cpath(p: &Path) -> Result<CString, NetlinkError> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| NetlinkError::Invalid(format!("path {} contains NUL", p.display())))
}

fn open_ro(path: &Path) -> Result<OwnedFd, NetlinkError> {
    let c = cpath(path)?;
    // SAFETY: `c` is a valid NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let fd = sys::cvt(fd).map_err(sys_err("open", path.display().to_string()))?;
    // SAFETY: fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mount_bind(src: &Path, dst: &Path) -> Result<(), NetlinkError> {
    let (s, d) = (cpath(src)?, cpath(dst)?);
    // SAFETY: valid NUL-terminated paths; fstype and data may be NULL for a bind mount.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    sys::cvt(rc)
        .map(|_| ())
        .map_err(sys_err("mount(MS_BIND)", dst.display().to_string()))
}

/// Makes `/run/netns` a shared mount point, as iproute2 does, so namespace mounts propagate to
/// other mount namespaces (containers started later see them).
fn prepare_run_dir() -> Result<(), NetlinkError> {
    std::fs::create_dir_all(NETNS_RUN_DIR).map_err(sys_err("mkdir", NETNS_RUN_DIR))?;
    let d = cpath(Path::new(NETNS_RUN_DIR))?;
    let none = c"none";
    let shared = || {
        // SAFETY: valid NUL-terminated strings; a propagation change takes no data.
        let rc = unsafe {
            libc::mount(
                none.as_ptr(),
                d.as_ptr(),
                std::ptr::null(),
                libc::MS_SHARED | libc::MS_REC,
                std::ptr::null(),
            )
        };
        sys::cvt(rc)
    };
    match shared() {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Not a mount point yet: bind it onto itself, then make it shared.
            mount_bind(Path::new(NETNS_RUN_DIR), Path::new(NETNS_RUN_DIR))?;
            shared()
                .map(|_| ())
                .map_err(sys_err("mount(MS_SHARED)", NETNS_RUN_DIR))
        }
        Err(e) => Err(sys_err("mount(MS_SHARED)", NETNS_RUN_DIR)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_rejected() {
        assert!(matches!(ns_path("a/b"), Err(NetlinkError::Invalid(_))));
        assert!(matches!(ns_path(""), Err(NetlinkError::Invalid(_))));
        assert!(matches!(ns_path(".."), Err(NetlinkError::Invalid(_))));
        assert!(ns_path("ctr1").is_ok());
    }
}
