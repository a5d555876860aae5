//! Network namespaces and rtnetlink: links, veth pairs, bridges, addresses, MTU, routes, and
//! [`setup_vnic`] for `fabric vnic add`.
//!
//! # Why raw netlink
//!
//! The handful of messages we need (`RTM_{NEW,DEL,GET}LINK`, `RTM_NEWADDR`, `RTM_NEWROUTE`) are
//! small, fixed-layout structs plus type-length-value attributes. Building them by hand over a
//! blocking `NETLINK_ROUTE` socket keeps this synchronous (no tokio runtime needed by the agent's
//! provisioning path), dependency-free and stable across `netlink-packet-route`'s frequent API
//! changes. Every request asks for an ACK, and a kernel error comes back as
//! [`NetlinkError::Kernel`] naming the message and its target.
//!
//! # Namespaces
//!
//! [`Netns::create`] does what `ip netns add NAME` does: make `/run/netns` a shared mount point,
//! create `/run/netns/NAME`, `unshare(CLONE_NEWNET)` on a short-lived thread and bind-mount that
//! thread's `/proc/thread-self/ns/net` onto the file, which keeps the namespace alive with no
//! process in it. [`Netns::delete`] unmounts (`MNT_DETACH`) and unlinks, like `ip netns del`.
//! Namespaces are entered per *thread* with `setns`, never for the whole process:
//! [`Netns::run`] runs a closure on a fresh thread inside the namespace. A netlink socket stays
//! bound to the namespace it was created in, so [`Netlink::open_in`] creates one on such a
//! thread and hands it back: all later requests on it act inside that namespace.
//!
//! # Kernel quirks
//!
//! - Moving a link to another namespace (`IFLA_NET_NS_FD`) may change its ifindex (when the old
//!   one is taken there); look it up again by name on the other side.
//! - A TAP fd keeps working after its link is moved; the device still vanishes when the fd is
//!   closed.
//! - The kernel adds the prefix route for an IPv4 address itself (`proto kernel`); adding the
//!   same on-link route again uses `NLM_F_REPLACE` so it is idempotent.
//! - IPv6 addresses get `IFA_F_NODAD` so they are usable at once (no duplicate detection delay).

use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::sys::{self, IfName};
use super::tap::{Tap, TapConfig, TapError};

const NETNS_RUN_DIR: &str = "/run/netns";

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTNH_F_ONLINK: u32 = 4;

const NLA_F_NESTED: u16 = 0x8000;
const IFF_UP: u32 = 1;

/// Failure of a namespace or rtnetlink operation, naming the syscall or message and its target.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// A syscall on the netlink socket or for a namespace failed.
    #[error("{op} for {target}: {source}")]
    Sys {
        /// The syscall, e.g. `setns(CLONE_NEWNET)`.
        op: &'static str,
        /// What it was for (namespace name, path, link).
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel rejected a request.
    #[error("{op} {target}: kernel said: {source}")]
    Kernel {
        /// The message, e.g. `RTM_NEWADDR`.
        op: &'static str,
        /// What it was about, e.g. `10.0.0.2/24 on ifindex 7`.
        target: String,
        /// The errno the kernel returned.
        #[source]
        source: io::Error,
    },
    /// The kernel's answer could not be parsed.
    #[error("{op} {target}: malformed netlink reply: {what}")]
    Protocol {
        /// The request.
        op: &'static str,
        /// Its target.
        target: String,
        /// What was wrong.
        what: &'static str,
    },
    /// A TAP operation failed during [`setup_vnic`].
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Bad argument (name, prefix length ...).
    #[error("{0}")]
    Invalid(String),
}

fn sys_err(op: &'static str, target: impl Into<String>) -> impl FnOnce(io::Error) -> NetlinkError {
    let target = target.into();
    move |source| NetlinkError::Sys { op, target, source }
}

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

    fn label(&self) -> String {
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

/// A link as reported by `RTM_GETLINK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index in the socket's namespace.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// Hardware address, when the link has a 6-byte one.
    pub mac: Option<[u8; 6]>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

/// A route to add with [`Netlink::add_route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Destination network (use the unspecified address with prefix 0 for a default route).
    pub dst: IpAddr,
    /// Destination prefix length.
    pub prefix_len: u8,
    /// Next hop; `None` makes the route on-link (scope link).
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: u32,
}

/// A blocking `NETLINK_ROUTE` socket, bound to the namespace it was opened in.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        let fd = sys::cvt(fd).map_err(sys_err("socket(AF_NETLINK)", "NETLINK_ROUTE"))?;
        // SAFETY: fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_nl (pid 0: the kernel assigns one).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `sa` is a live sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        sys::cvt(rc).map_err(sys_err("bind(AF_NETLINK)", "NETLINK_ROUTE"))?;
        // Extended ACKs make the kernel explain EINVALs; not required.
        let _ = sys::setsockopt_int(&fd, libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1);
        Ok(Self {
            fd,
            seq: 1,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Opens a netlink socket that acts inside `ns`.
    pub fn open_in(ns: &Netns) -> Result<Self, NetlinkError> {
        ns.run(Self::open)?
    }

    /// Looks a link up by name.
    pub fn link_by_name(&mut self, name: &str) -> Result<Link, NetlinkError> {
        let ifname = IfName::new(name).map_err(|e| NetlinkError::Invalid(e.to_string()))?;
        let mut m = Msg::new(&mut self.buf, RTM_GETLINK, NLM_F_REQUEST, self.seq);
        m.push_ifinfo(0, 0, 0);
        m.attr_str(IFLA_IFNAME, ifname.as_str());
        self.request_reply("RTM_GETLINK", || format!("link {name}"))
    }

    /// Looks a link up by index.
    pub fn link_by_index(&mut self, index: u32) -> Result<Link, NetlinkError> {
        let mut m = Msg::new(&mut self.buf, RTM_GETLINK, NLM_F_REQUEST, self.seq);
        m.push_ifinfo(index, 0, 0);
        self.request_reply("RTM_GETLINK", || format!("ifindex {index}"))
    }

    /// Creates a veth pair `a` ↔ `b`, with `b` placed in `b_ns` if given.
    pub fn create_veth(
        &mut self,
        a: &str,
        b: &str,
        b_ns: Option<&Netns>,
    ) -> Result<(), NetlinkError> {
        let (a, b) = (ifname(a)?, ifname(b)?);
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let mut m = Msg::new(&mut self.buf, RTM_NEWLINK, flags, self.seq);
        m.push_ifinfo(0, 0, 0);
        m.attr_str(IFLA_IFNAME, a.as_str());
        let info = m.nest_begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        let data = m.nest_begin(IFLA_INFO_DATA);
        let peer = m.nest_begin(VETH_INFO_PEER);
        m.push_ifinfo(0, 0, 0);
        m.attr_str(IFLA_IFNAME, b.as_str());
        if let Some(ns) = b_ns {
            m.attr_u32(IFLA_NET_NS_FD, ns.fd.as_raw_fd() as u32);
        }
        m.nest_end(peer);
        m.nest_end(data);
        m.nest_end(info);
        self.request_ack("RTM_NEWLINK(veth)", || format!("{a} <-> {b}"))
    }

    /// Creates a bridge device (kind `bridge`), down, with default settings.
    pub fn create_bridge(&mut self, name: &str) -> Result<(), NetlinkError> {
        let n = ifname(name)?;
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let mut m = Msg::new(&mut self.buf, RTM_NEWLINK, flags, self.seq);
        m.push_ifinfo(0, 0, 0);
        m.attr_str(IFLA_IFNAME, n.as_str());
        let info = m.nest_begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "bridge");
        m.nest_end(info);
        self.request_ack("RTM_NEWLINK(bridge)", || name.to_owned())
    }

    /// Enslaves a link to a bridge (`Some(bridge_index)`) or releases it (`None`).
    pub fn set_master(&mut self, index: u32, master: Option<u32>) -> Result<(), NetlinkError> {
        let mut m = Msg::new(
            &mut self.buf,
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK,
            self.seq,
        );
        m.push_ifinfo(index, 0, 0);
        m.attr_u32(IFLA_MASTER, master.unwrap_or(0));
        self.request_ack("RTM_NEWLINK(IFLA_MASTER)", || {
            format!(
                "ifindex {index} master {}",
                master.map_or("none".to_owned(), |m| m.to_string())
            )
        })
    }

    /// Deletes a link (for a veth, both ends go).
    pub fn delete_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut m = Msg::new(
            &mut self.buf,
            RTM_DELLINK,
            NLM_F_REQUEST | NLM_F_ACK,
            self.seq,
        );
        m.push_ifinfo(index, 0, 0);
        self.request_ack("RTM_DELLINK", || format!("ifindex {index}"))
    }

    /// Moves a link into `ns` (its index there may differ: look it up by name).
    pub fn move_link(&mut self, index: u32, ns: &Netns) -> Result<(), NetlinkError> {
        let mut m = Msg::new(
            &mut self.buf,
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK,
            self.seq,
        );
        m.push_ifinfo(index, 0, 0);
        m.attr_u32(IFLA_NET_NS_FD, ns.fd.as_raw_fd() as u32);
        let label = ns.label();
        self.request_ack("RTM_NEWLINK(IFLA_NET_NS_FD)", || {
            format!("ifindex {index} to {label}")
        })
    }

    /// Renames a link (it must be down).
    pub fn set_name(&mut self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let n = ifname(name)?;
        let mut m = Msg::new(
            &mut self.buf,
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK,
            self.seq,
        );
        m.push_ifinfo(index, 0, 0);
        m.attr_str(IFLA_IFNAME, n.as_str());
        self.request_ack("RTM_NEWLINK(IFLA_IFNAME)", || {
            format!("ifindex {index} to {name}")
        })
    }

    /// Brings a link up or down.
    pub fn set_up(&mut self, index: u32, up: bool) -> Result<(), NetlinkError> {
        let mut m = Msg::new(
            &mut self.buf,
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK,
            self.seq,
        );
        m.push_ifinfo(index, if up { IFF_UP } else { 0 }, IFF_UP);
        self.request_ack("RTM_NEWLINK(IFF_UP)", || format!("ifindex {index} up={up}"))
    }

    /// Sets the MTU.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let mut m = Msg::new(
            &mut self.buf,
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK,
            self.seq,
        );
        m.push_ifinfo(index, 0, 0);
        m.attr_u32(IFLA_MTU, mtu);
        self.request_ack("RTM_NEWLINK(IFLA_MTU)", || {
            format!("ifindex {index} mtu {mtu}")
        })
    }

    /// Sets the MAC address.
    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        let mut m = Msg::new(
            &mut self.buf,
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK,
            self.seq,
        );
        m.push_ifinfo(index, 0, 0);
        m.attr(IFLA_ADDRESS, &mac);
        self.request_ack("RTM_NEWLINK(IFLA_ADDRESS)", || {
            format!("ifindex {index} mac {}", fmt_mac(&mac))
        })
    }

    /// Adds `addr/prefix_len` to a link (IPv6 without duplicate address detection).
    pub fn add_address(
        &mut self,
        index: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        check_prefix(addr, prefix_len)?;
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let mut m = Msg::new(&mut self.buf, RTM_NEWADDR, flags, self.seq);
        let (family, bytes) = ip_bytes(&addr);
        let ifa_flags = if addr.is_ipv6() { IFA_F_NODAD } else { 0 };
        // struct ifaddrmsg { family, prefixlen, flags, scope, index }
        m.push(&[family, prefix_len, ifa_flags, RT_SCOPE_UNIVERSE]);
        m.push(&index.to_ne_bytes());
        m.attr(IFA_LOCAL, bytes.as_slice());
        m.attr(IFA_ADDRESS, bytes.as_slice());
        self.request_ack("RTM_NEWADDR", || {
            format!("{addr}/{prefix_len} on ifindex {index}")
        })
    }

    /// Adds (or replaces) a route in the main table.
    pub fn add_route(&mut self, route: &Route) -> Result<(), NetlinkError> {
        check_prefix(route.dst, route.prefix_len)?;
        if let Some(gw) = route.gateway {
            if gw.is_ipv6() != route.dst.is_ipv6() {
                return Err(NetlinkError::Invalid(format!(
                    "route to {}/{} via {gw}: gateway family differs from destination",
                    route.dst, route.prefix_len
                )));
            }
        }
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        let mut m = Msg::new(&mut self.buf, RTM_NEWROUTE, flags, self.seq);
        let (family, dst) = ip_bytes(&route.dst);
        let scope = if route.gateway.is_some() {
            RT_SCOPE_UNIVERSE
        } else {
            RT_SCOPE_LINK
        };
        let rtm_flags = if route.gateway.is_some() {
            RTNH_F_ONLINK
        } else {
            0
        };
        // struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type, flags }
        m.push(&[
            family,
            route.prefix_len,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            scope,
            RTN_UNICAST,
        ]);
        m.push(&rtm_flags.to_ne_bytes());
        if route.prefix_len > 0 {
            m.attr(RTA_DST, dst.as_slice());
        }
        if let Some(gw) = route.gateway {
            m.attr(RTA_GATEWAY, ip_bytes(&gw).1.as_slice());
        }
        m.attr_u32(RTA_OIF, route.oif);
        self.request_ack("RTM_NEWROUTE", || {
            let via = route
                .gateway
                .map(|g| format!(" via {g}"))
                .unwrap_or_default();
            format!(
                "{}/{}{via} dev ifindex {}",
                route.dst, route.prefix_len, route.oif
            )
        })
    }

    fn send_buf(
        &mut self,
        op: &'static str,
        target: &dyn Fn() -> String,
    ) -> Result<u32, NetlinkError> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        // SAFETY: `buf` is initialised for its whole length; the kernel only reads it.
        let rc = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                self.buf.as_ptr().cast(),
                self.buf.len(),
                0,
            )
        };
        sys::cvt_size(rc).map_err(|source| NetlinkError::Sys {
            op: "send(netlink)",
            target: format!("{op} {}", target()),
            source,
        })?;
        Ok(seq)
    }

    /// Receives one datagram of netlink messages into `buf`.
    fn recv_buf(
        &mut self,
        op: &'static str,
        target: &dyn Fn() -> String,
    ) -> Result<(), NetlinkError> {
        self.buf.clear();
        self.buf.resize(32 * 1024, 0);
        loop {
            // SAFETY: `buf` is a writable buffer of its full length.
            let rc = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            match sys::cvt_size(rc) {
                Ok(n) => {
                    self.buf.truncate(n);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(source) => {
                    return Err(NetlinkError::Sys {
                        op: "recv(netlink)",
                        target: format!("{op} {}", target()),
                        source,
                    })
                }
            }
        }
    }

    fn request_ack(
        &mut self,
        op: &'static str,
        target: impl Fn() -> String,
    ) -> Result<(), NetlinkError> {
        let seq = self.send_buf(op, &target)?;
        loop {
            self.recv_buf(op, &target)?;
            for msg in Messages::new(&self.buf) {
                let msg = msg.map_err(|what| NetlinkError::Protocol {
                    op,
                    target: target(),
                    what,
                })?;
                if msg.seq != seq {
                    continue;
                }
                if msg.ty == NLMSG_ERROR {
                    return ack_result(op, &target, msg.payload);
                }
            }
        }
    }

    fn request_reply(
        &mut self,
        op: &'static str,
        target: impl Fn() -> String,
    ) -> Result<Link, NetlinkError> {
        let seq = self.send_buf(op, &target)?;
        loop {
            self.recv_buf(op, &target)?;
            for msg in Messages::new(&self.buf) {
                let msg = msg.map_err(|what| NetlinkError::Protocol {
                    op,
                    target: target(),
                    what,
                })?;
                if msg.seq != seq {
                    continue;
                }
                match msg.ty {
                    NLMSG_ERROR => {
                        ack_result(op, &target, msg.payload)?;
                        return Err(NetlinkError::Protocol {
                            op,
                            target: target(),
                            what: "ACK without link",
                        });
                    }
                    NLMSG_DONE => {
                        return Err(NetlinkError::Protocol {
                            op,
                            target: target(),
                            what: "no link in reply",
                        })
                    }
                    RTM_NEWLINK => {
                        return parse_link(msg.payload).ok_or_else(|| NetlinkError::Protocol {
                            op,
                            target: target(),
                            what: "short RTM_NEWLINK",
                        })
                    }
                    _ => {}
                }
            }
        }
    }
}

fn ack_result(
    op: &'static str,
    target: &dyn Fn() -> String,
    payload: &[u8],
) -> Result<(), NetlinkError> {
    let Some(code) = payload.get(..4) else {
        return Err(NetlinkError::Protocol {
            op,
            target: target(),
            what: "short NLMSG_ERROR",
        });
    };
    let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
    if code == 0 {
        Ok(())
    } else {
        Err(NetlinkError::Kernel {
            op,
            target: target(),
            source: io::Error::from_raw_os_error(-code),
        })
    }
}

fn parse_link(p: &[u8]) -> Option<Link> {
    // struct ifinfomsg { family u8, pad u8, type u16, index i32, flags u32, change u32 }
    let hdr = p.get(..16)?;
    let index = u32::from_ne_bytes(hdr[4..8].try_into().ok()?);
    let flags = u32::from_ne_bytes(hdr[8..12].try_into().ok()?);
    let mut link = Link {
        index,
        name: String::new(),
        mtu: 0,
        mac: None,
        up: flags & IFF_UP != 0,
    };
    for (ty, val) in Attrs(&p[16..]) {
        match ty & !NLA_F_NESTED {
            IFLA_IFNAME => link.name = IfName::from_kernel(val).as_str().to_owned(),
            IFLA_MTU if val.len() >= 4 => link.mtu = u32::from_ne_bytes(val[..4].try_into().ok()?),
            IFLA_ADDRESS if val.len() == 6 => link.mac = Some(val.try_into().ok()?),
            _ => {}
        }
    }
    Some(link)
}

fn ifname(s: &str) -> Result<IfName, NetlinkError> {
    IfName::new(s).map_err(|e| NetlinkError::Invalid(e.to_string()))
}

fn check_prefix(addr: IpAddr, len: u8) -> Result<(), NetlinkError> {
    let max = if addr.is_ipv6() { 128 } else { 32 };
    if len > max {
        return Err(NetlinkError::Invalid(format!(
            "prefix length {len} for {addr}: expected 0..={max}"
        )));
    }
    Ok(())
}

fn ip_bytes(a: &IpAddr) -> (u8, Vec<u8>) {
    match a {
        IpAddr::V4(v) => (libc::AF_INET as u8, v.octets().to_vec()),
        IpAddr::V6(v) => (libc::AF_INET6 as u8, v.octets().to_vec()),
    }
}

fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Builds one netlink message in a reused buffer; the header length is kept up to date.
struct Msg<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Msg<'a> {
    fn new(buf: &'a mut Vec<u8>, ty: u16, flags: u16, seq: u32) -> Self {
        buf.clear();
        buf.extend_from_slice(&16u32.to_ne_bytes());
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        Self { buf }
    }

    fn sync_len(&mut self) {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self.sync_len();
    }

    fn push_ifinfo(&mut self, index: u32, flags: u32, change: u32) {
        let mut h = [0u8; 16];
        h[0] = libc::AF_UNSPEC as u8;
        h[4..8].copy_from_slice(&index.to_ne_bytes());
        h[8..12].copy_from_slice(&flags.to_ne_bytes());
        h[12..16].copy_from_slice(&change.to_ne_bytes());
        self.push(&h);
    }

    fn attr(&mut self, ty: u16, val: &[u8]) {
        let len = (4 + val.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.push(val);
    }

    fn attr_u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut v = [0u8; 64];
        let n = s.len().min(63);
        v[..n].copy_from_slice(&s.as_bytes()[..n]);
        self.attr(ty, &v[..n + 1]);
    }

    fn nest_begin(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self.sync_len();
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self.sync_len();
    }
}

struct RawMsg<'a> {
    ty: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Iterates over the netlink messages of one received datagram.
struct Messages<'a>(&'a [u8]);

impl<'a> Messages<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self(b)
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<RawMsg<'a>, &'static str>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        if self.0.len() < 16 {
            self.0 = &[];
            return Some(Err("truncated nlmsghdr"));
        }
        let len = u32::from_ne_bytes(self.0[..4].try_into().unwrap_or([0; 4])) as usize;
        if len < 16 || len > self.0.len() {
            self.0 = &[];
            return Some(Err("bad nlmsg_len"));
        }
        let ty = u16::from_ne_bytes([self.0[4], self.0[5]]);
        let seq = u32::from_ne_bytes(self.0[8..12].try_into().unwrap_or([0; 4]));
        let payload = &self.0[16..len];
        let adv = ((len + 3) & !3).min(self.0.len());
        self.0 = &self.0[adv..];
        Some(Ok(RawMsg { ty, seq, payload }))
    }
}

/// Iterates over `(type, value)` of a run of rtattrs.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        if self.0.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([self.0[0], self.0[1]]) as usize;
        let ty = u16::from_ne_bytes([self.0[2], self.0[3]]);
        if len < 4 || len > self.0.len() {
            return None;
        }
        let val = &self.0[4..len];
        let adv = ((len + 3) & !3).min(self.0.len());
        self.0 = &self.0[adv..];
        Some((ty, val))
    }
}

/// What `fabric vnic add` asks for.
#[derive(Debug, Clone)]
pub struct VnicSpec {
    /// Interface name inside the namespace (e.g. `eth0`).
    pub name: IfName,
    /// MAC address.
    pub mac: [u8; 6],
    /// Address assigned to the interface.
    pub addr: IpAddr,
    /// Its prefix length; an on-link route for the prefix is installed.
    pub prefix_len: u8,
    /// MTU (1450 leaves room for VXLAN over a 1500-byte underlay).
    pub mtu: u32,
    /// Default gateway (installed on-link), if any.
    pub gateway: Option<IpAddr>,
    /// TAP transmit queue length (the default 500 is short for 64 KB super-frames).
    pub txqueuelen: u32,
}

static TMP_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Creates the TAP for a vnic and places it into `ns`: MAC, MTU, address, up, on-link route
/// (and default route when a gateway is given). Returns the TAP fd, which keeps working in the
/// host namespace; dropping it removes the device. On failure nothing is left behind.
///
/// The TAP is created under a temporary unique name in the caller's namespace (so that e.g.
/// `eth0` does not clash with the host's own), moved, then renamed inside `ns`.
pub fn setup_vnic(ns: &Netns, spec: &VnicSpec) -> Result<Tap, NetlinkError> {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!("fv{:x}.{:x}", std::process::id() & 0xf_ffff, n & 0xf_ffff);
    let tmp = ifname(&tmp)?;
    let mut tap = Tap::open(&TapConfig::new(tmp))?;
    tap.set_mac(spec.mac)?;
    tap.set_mtu(spec.mtu)?;
    tap.set_txqueuelen(spec.txqueuelen)?;
    let index = tap.ifindex()?;
    Netlink::open()?.move_link(index, ns)?;
    let mut nl = Netlink::open_in(ns)?;
    let link = nl.link_by_name(tmp.as_str())?;
    nl.set_name(link.index, spec.name.as_str())?;
    tap.rename_after_move(spec.name);
    nl.add_address(link.index, spec.addr, spec.prefix_len)?;
    nl.set_up(link.index, true)?;
    let net = mask(spec.addr, spec.prefix_len);
    nl.add_route(&Route {
        dst: net,
        prefix_len: spec.prefix_len,
        gateway: None,
        oif: link.index,
    })?;
    if let Some(gw) = spec.gateway {
        let any = if gw.is_ipv6() {
            IpAddr::from([0u16; 8])
        } else {
            IpAddr::from([0u8; 4])
        };
        nl.add_route(&Route {
            dst: any,
            prefix_len: 0,
            gateway: Some(gw),
            oif: link.index,
        })?;
    }
    Ok(tap)
}

/// `addr` with the host bits cleared.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len.min(32) as u32)
            };
            IpAddr::from((u32::from(a) & m).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len.min(128) as u32)
            };
            IpAddr::from((u128::from(a) & m).to_be_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout() {
        let mut buf = Vec::new();
        let mut m = Msg::new(&mut buf, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 7);
        m.push_ifinfo(3, IFF_UP, IFF_UP);
        let n = m.nest_begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        m.nest_end(n);
        assert_eq!(buf.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize,
            buf.len()
        );
        let msgs: Vec<_> = Messages::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!((msgs.len(), msgs[0].ty, msgs[0].seq), (1, RTM_NEWLINK, 7));
        let attrs: Vec<_> = Attrs(&msgs[0].payload[16..]).collect();
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].0, IFLA_LINKINFO | NLA_F_NESTED);
        let inner: Vec<_> = Attrs(attrs[0].1).collect();
        assert_eq!(inner, vec![(IFLA_INFO_KIND, &b"veth\0"[..])]);
    }

    #[test]
    fn malformed_replies_do_not_panic() {
        for bad in [
            &[1u8, 2, 3][..],
            &[200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ] {
            assert!(Messages::new(bad).any(|m| m.is_err()));
        }
        assert!(parse_link(&[0; 8]).is_none());
        assert_eq!(Attrs(&[9, 0, 1, 0]).count(), 0);
    }

    #[test]
    fn masks() {
        assert_eq!(
            mask("10.1.2.3".parse().unwrap(), 24),
            "10.1.2.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            mask("10.1.2.3".parse().unwrap(), 0),
            "0.0.0.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            mask("fd00::1:2".parse().unwrap(), 64),
            "fd00::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn bad_names_rejected() {
        assert!(matches!(ns_path("a/b"), Err(NetlinkError::Invalid(_))));
        assert!(matches!(ns_path(""), Err(NetlinkError::Invalid(_))));
        assert!(check_prefix("1.2.3.4".parse().unwrap(), 33).is_err());
    }
}
