//! The namespace side of a vnic: create, inspect and remove the TAP inside a container's network
//! namespace. The agent and `fabric vnic add` call this, then hand the TAP's queue fds to the
//! dataplane with [`super::control::attach`]; the dataplane itself never creates namespaces or
//! TAPs (DESIGN "vnic kinds").
//!
//! [`create_vnic`] opens the TAP in the *caller's* namespace under a temporary unique name,
//! configures it, moves it into the container's namespace and renames it there. That matters
//! for lifetimes: a TAP fd pins the namespace it was opened in, so opened in the host's
//! namespace (where the agent and the dataplane run) it lets the container's namespace die
//! when it is deleted, taking the device with it (the dataplane then lists the vnic `gone`);
//! opened inside, the dataplane's fd would keep a deleted VM's namespace alive. The TAP is
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE` with one fd per queue, not
//! persistent: it lives while any queue fd is open. After a successful attach the caller drops
//! its [`Tap`]s, so the device's lifetime is the dataplane's (a dataplane that exits takes its
//! vnics with it, and the agent creates them again).
//!
//! Every function is blocking (netlink and ioctls on a short-lived thread inside the
//! namespace); call them from `spawn_blocking` in async code.

use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use super::control::{ValidVnic, VnicAddSpec, VnicSpecError};
use crate::io::netlink::{Netlink, NetlinkError, Netns, Route};
use crate::io::tap::{Tap, TapConfig, TapError};
use crate::io::IfName;

/// TAP transmit queue length for vnics (the kernel's default of 500 is short for 64 KB
/// super-frames).
pub const TXQUEUELEN: u32 = 5000;

/// Most queues a vnic may have (the most fds one control message carries).
pub const MAX_QUEUES: usize = crate::io::fdpass::MAX_FDS;

/// What [`create_vnic`] makes inside the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnicProvision {
    /// Interface name inside the namespace (`net0`, `eth0`, …).
    pub name: IfName,
    /// MAC address.
    pub mac: [u8; 6],
    /// Address assigned to the interface.
    pub addr: IpAddr,
    /// Its prefix length; an on-link route for the prefix is installed.
    pub prefix_len: u8,
    /// MTU (1450 leaves room for VXLAN over a 1500-byte underlay).
    pub mtu: u32,
    /// Default gateway (installed with the on-link flag), if any.
    pub gateway: Option<IpAddr>,
    /// TAP transmit queue length.
    pub txqueuelen: u32,
    /// TAP queues (fds) to open: one per dataplane worker.
    pub queues: usize,
}

impl VnicProvision {
    /// The namespace side of a control-socket spec, validated the way the dataplane validates
    /// it ([`VnicAddSpec::validate`]), with one queue and [`TXQUEUELEN`].
    pub fn from_spec(spec: &VnicAddSpec, gateway: Option<IpAddr>) -> Result<Self, VnicSpecError> {
        let ValidVnic {
            mac,
            ip,
            prefix_len,
            mtu,
            ..
        } = spec.validate()?;
        let name = IfName::new(&spec.name).map_err(|_| VnicSpecError::Name(spec.name.clone()))?;
        Ok(Self {
            name,
            mac: mac.0,
            addr: ip,
            prefix_len,
            mtu: u32::from(mtu),
            gateway,
            txqueuelen: TXQUEUELEN,
            queues: 1,
        })
    }
}

/// A vnic's link as it exists in its namespace ([`vnic_state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnicLink {
    /// Interface index inside the namespace.
    pub index: u32,
    /// Hardware address (`None` for a link without a 6-byte one).
    pub mac: Option<[u8; 6]>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Addresses with prefix lengths, IPv6 link-local ones left out.
    pub addrs: Vec<(IpAddr, u8)>,
}

/// Why provisioning failed. Whatever [`create_vnic`] had made is gone again when it fails.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A link of that name already exists in the namespace (remove it first: [`remove_vnic`]).
    #[error("{ns}: a link named {name} already exists (remove it first)")]
    Exists {
        /// The namespace.
        ns: String,
        /// The interface name.
        name: String,
    },
    /// Bad request (queue count, gateway family …).
    #[error("{0}")]
    Invalid(String),
    /// A netlink or namespace operation failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A TAP ioctl failed.
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// Creates the vnic's TAP inside `ns` with `spec.queues` queue fds and configures it: MAC, MTU,
/// txqueuelen, address, up, the on-link prefix route and, with a gateway, a default route.
/// Returns the queues (the first one carries the device's negotiated offloads). On failure
/// nothing is left behind (the non-persistent device goes with its fds). Refuses a name that
/// already exists in the namespace.
pub fn create_vnic(ns: &Netns, spec: &VnicProvision) -> Result<Vec<Tap>, ProvisionError> {
    if spec.queues == 0 || spec.queues > MAX_QUEUES {
        return Err(ProvisionError::Invalid(format!(
            "vnic {}: {} queues asked for, expected 1..={MAX_QUEUES}",
            spec.name, spec.queues
        )));
    }
    if let Some(gw) = spec.gateway {
        if gw.is_ipv6() != spec.addr.is_ipv6() {
            return Err(ProvisionError::Invalid(format!(
                "vnic {}: gateway {gw} is not of the family of its address {}",
                spec.name, spec.addr
            )));
        }
    }
    let label = ns_label(ns);
    let exists = ns.run(|| -> Result<bool, ProvisionError> {
        Ok(find_link(&mut Netlink::open()?, spec.name.as_str())?.is_some())
    })??;
    if exists {
        return Err(ProvisionError::Exists {
            ns: label,
            name: spec.name.to_string(),
        });
    }
    // Created here (see the module docs), under a name that cannot clash with the host's own
    // links; any error below drops `taps`, which removes the device wherever it is.
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!("fv{:x}.{:x}", std::process::id() & 0xf_ffff, n & 0xf_ffff);
    let tmp = IfName::new(&tmp).map_err(|e| ProvisionError::Invalid(e.to_string()))?;
    let mut taps = Tap::open_multi_queue(&TapConfig::new(tmp), spec.queues)?;
    // SIOC* ioctls act by name in the calling thread's namespace: before the move.
    taps[0].set_mac(spec.mac)?;
    taps[0].set_mtu(spec.mtu)?;
    taps[0].set_txqueuelen(spec.txqueuelen)?;
    let index = taps[0].ifindex()?;
    Netlink::open()?.move_link(index, ns)?;
    ns.run(|| -> Result<(), ProvisionError> {
        let mut nl = Netlink::open()?;
        // The index may differ on this side of the move.
        let index = nl.link_by_name(tmp.as_str())?.index;
        nl.set_name(index, spec.name.as_str())?;
        nl.add_address(index, spec.addr, spec.prefix_len)?;
        nl.set_up(index, true)?;
        nl.add_route(&Route {
            dst: mask(spec.addr, spec.prefix_len),
            prefix_len: spec.prefix_len,
            gateway: None,
            oif: index,
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
                oif: index,
            })?;
        }
        Ok(())
    })??;
    for t in &mut taps {
        t.rename_after_move(spec.name);
    }
    Ok(taps)
}

/// Makes temporary TAP names unique within the process.
static TMP_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Deletes the link `name` in `ns` if it exists. Returns whether there was one. A TAP whose
/// queues a dataplane still holds goes from the namespace at once (the dataplane's reads then
/// fail and `vnic_ls` shows it `gone` until it is detached).
pub fn remove_vnic(ns: &Netns, name: &str) -> Result<bool, ProvisionError> {
    check_name(name)?;
    ns.run(|| -> Result<bool, ProvisionError> {
        let mut nl = Netlink::open()?;
        let Some(link) = find_link(&mut nl, name)? else {
            return Ok(false);
        };
        match nl.delete_link(link.index) {
            Ok(()) => Ok(true),
            // Gone between the lookup and the delete (its last fd was closed): fine.
            Err(e) if is_no_device(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    })?
}

/// What exists in `ns` under `name`: MAC, MTU, up, addresses (`None`: no such link). The agent
/// compares it with what it wants before deciding to recreate a vnic.
pub fn vnic_state(ns: &Netns, name: &str) -> Result<Option<VnicLink>, ProvisionError> {
    check_name(name)?;
    ns.run(|| -> Result<Option<VnicLink>, ProvisionError> {
        let mut nl = Netlink::open()?;
        let Some(link) = find_link(&mut nl, name)? else {
            return Ok(None);
        };
        let addrs = nl
            .addresses(Some(link.index))?
            .into_iter()
            .filter(|a| !is_ipv6_link_local(a.addr))
            .map(|a| (a.addr, a.prefix_len))
            .collect();
        Ok(Some(VnicLink {
            index: link.index,
            mac: link.mac,
            mtu: link.mtu,
            up: link.up,
            addrs,
        }))
    })?
}

fn check_name(name: &str) -> Result<(), ProvisionError> {
    IfName::new(name)
        .map(|_| ())
        .map_err(|e| ProvisionError::Invalid(e.to_string()))
}

/// The link named `name`, or `None` when the kernel says there is none.
fn find_link(
    nl: &mut Netlink,
    name: &str,
) -> Result<Option<crate::io::netlink::Link>, ProvisionError> {
    match nl.link_by_name(name) {
        Ok(l) => Ok(Some(l)),
        Err(e) if is_no_device(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn is_no_device(e: &NetlinkError) -> bool {
    matches!(e, NetlinkError::Kernel { source, .. }
        if source.raw_os_error() == Some(libc::ENODEV) || source.kind() == io::ErrorKind::NotFound)
}

fn is_ipv6_link_local(a: IpAddr) -> bool {
    matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80)
}

fn ns_label(ns: &Netns) -> String {
    ns.name()
        .map_or_else(|| "network namespace".to_owned(), |n| format!("netns {n}"))
}

/// `addr` with the host bits cleared.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            IpAddr::from((u32::from(a) & m).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            IpAddr::from((u128::from(a) & m).to_be_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            mask("10.1.2.3".parse().unwrap(), 32),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            mask("fd00::1:2".parse().unwrap(), 64),
            "fd00::".parse::<IpAddr>().unwrap()
        );
    }

    fn spec() -> VnicAddSpec {
        VnicAddSpec {
            netns: "c1".into(),
            name: "net0".into(),
            vni: 4001,
            mac: "90:b8:d0:00:00:01".into(),
            ip: "10.0.0.5/24".into(),
            mtu: 1400,
        }
    }

    #[test]
    fn provision_from_spec_takes_the_validated_fields() {
        let p = VnicProvision::from_spec(&spec(), Some("10.0.0.1".parse().unwrap())).unwrap();
        assert_eq!(p.name.as_str(), "net0");
        assert_eq!(p.mac, [0x90, 0xb8, 0xd0, 0, 0, 1]);
        assert_eq!((p.addr, p.prefix_len), ("10.0.0.5".parse().unwrap(), 24));
        assert_eq!((p.mtu, p.queues, p.txqueuelen), (1400, 1, TXQUEUELEN));
        assert_eq!(p.gateway, Some("10.0.0.1".parse().unwrap()));
        let mut bad = spec();
        bad.mac = "01:00:5e:00:00:01".into();
        assert!(matches!(
            VnicProvision::from_spec(&bad, None),
            Err(VnicSpecError::MacNotUnicast { .. })
        ));
        let mut bad = spec();
        bad.name = "much-too-long-name0".into();
        assert!(matches!(
            VnicProvision::from_spec(&bad, None),
            Err(VnicSpecError::Name(_))
        ));
    }

    #[test]
    fn bad_requests_are_refused_before_touching_the_namespace() {
        // The current namespace is never entered for these: the checks come first.
        let ns = Netns::current().unwrap();
        let mut p = VnicProvision::from_spec(&spec(), None).unwrap();
        p.queues = 0;
        let e = create_vnic(&ns, &p).unwrap_err().to_string();
        assert!(e.contains("0 queues") && e.contains("1..=16"), "{e}");
        p.queues = MAX_QUEUES + 1;
        assert!(matches!(
            create_vnic(&ns, &p),
            Err(ProvisionError::Invalid(_))
        ));
        p.queues = 1;
        p.gateway = Some("fd00::1".parse().unwrap());
        let e = create_vnic(&ns, &p).unwrap_err().to_string();
        assert!(e.contains("family"), "{e}");
        assert!(matches!(
            remove_vnic(&ns, "a/b"),
            Err(ProvisionError::Invalid(_))
        ));
        assert!(matches!(
            vnic_state(&ns, ""),
            Err(ProvisionError::Invalid(_))
        ));
    }
}
