//! Who may talk to what (DESIGN "Trust"): the cluster CA, join tokens, host and operator
//! certificates, the rustls configurations of every listener and client, and the head's view
//! of which servers are members (registered, not revoked) of the cluster.
//!
//! Two certificate authorities, never one: the **cluster CA** (this module today) issues host
//! certificates (subject CN = server UUID, OU = [`HOST_OU`]) and operator certificates (CN = a
//! name, OU = [`OPERATOR_OU`]); the accounts CA of the Docker API is a separate one. Each
//! listener trusts exactly one CA.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::watch;

pub mod accept;
pub mod ca;
pub mod cli;
pub mod files;
pub mod svp;
pub mod tls;
pub mod token;

/// Failures of key, certificate and token handling.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A certificate or key is bad, or signing failed.
    #[error("{0}")]
    Cert(String),
    /// A certificate request is bad (the requester's fault).
    #[error("{0}")]
    Request(String),
    /// A join token is bad.
    #[error("{0}")]
    Token(String),
}

impl PkiError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> PkiError {
        PkiError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// SHA-256.
pub fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The organizational unit of host certificates.
pub const HOST_OU: &str = "fabric-host";
/// The organizational unit of operator certificates.
pub const OPERATOR_OU: &str = "fabric-operator";
/// The organizational unit of Docker account certificates (accounts CA).
pub const ACCOUNT_OU: &str = "fabric-account";

/// Who is asking, as the listener established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// No authentication in force (a standalone `fabric control` on plain HTTP): everything is
    /// allowed, as before clusters had certificates.
    Open,
    /// The operator: an operator certificate of the cluster CA, or the head's unix socket
    /// (`name` = `local`).
    Operator {
        /// The certificate's common name (or `local`).
        name: String,
        /// The certificate's serial number (hex; `None` on the head's unix socket), by which
        /// `fabric cert revoke` refuses it.
        serial: Option<String>,
    },
    /// A host certificate: acts only for this server.
    Host {
        /// The server UUID the certificate names (lower case).
        server_uuid: String,
        /// The certificate's serial number (hex), for logs.
        serial: String,
    },
    /// TLS without a client certificate: may only join.
    Anonymous,
    /// A Docker account's certificate of the accounts CA: the Docker API only, as that
    /// account alone.
    Account {
        /// The certificate's common name: the account's login.
        login: String,
        /// The certificate's serial number (hex): the store maps it to the account, and
        /// removing the account revokes it.
        serial: String,
    },
}

/// One server as membership sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTrust {
    /// Server UUID (lower case).
    pub uuid: String,
    /// Its underlay address.
    pub underlay: IpAddr,
    /// Removed (`fabric server remove`): its certificates are refused, it is no member.
    pub removed: bool,
}

#[derive(Debug, Default)]
struct View {
    /// Set once the first full view arrived; before that nothing is refused by address.
    loaded: bool,
    underlay: HashMap<String, IpAddr>,
    revoked: HashSet<String>,
    members: HashSet<IpAddr>,
}

/// The head's membership view, shared by the TLS verifiers (revocation), the HTTP layer (live
/// sessions of a revoked host are closed), Portolan (answers only members) and the control
/// plane (which refreshes it from the store).
#[derive(Debug)]
pub struct Trust {
    view: RwLock<View>,
    /// Serial numbers of revoked certificates (`fabric cert revoke`), kept apart from the
    /// store-backed view: they come from the head's `DIR/pki/revoked-serials`.
    serials: RwLock<HashSet<String>>,
    /// Bumped on every change that revoked something; `revoked()` waiters re-check.
    epoch: watch::Sender<u64>,
}

impl Trust {
    /// An empty view that enforces nothing until [`Trust::set_servers`] is first called.
    pub fn new() -> Arc<Trust> {
        Arc::new(Trust {
            view: RwLock::new(View::default()),
            serials: RwLock::new(HashSet::new()),
            epoch: watch::channel(0).0,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the whole view: every registered server (removed ones included) and the
    /// operator-listed foreign VXLAN peers.
    pub fn set_servers(
        &self,
        servers: impl IntoIterator<Item = ServerTrust>,
        foreign: impl IntoIterator<Item = IpAddr>,
    ) {
        let mut v = View {
            loaded: true,
            ..View::default()
        };
        for s in servers {
            if s.removed {
                v.revoked.insert(s.uuid);
            } else {
                v.members.insert(s.underlay);
                v.underlay.insert(s.uuid, s.underlay);
            }
        }
        v.members.extend(foreign);
        let narrowed = {
            let mut cur = self.write();
            // Someone lost something: a server revoked, or a member address gone.
            let newly = v.revoked.iter().any(|u| !cur.revoked.contains(u))
                || (cur.loaded && cur.members.iter().any(|m| !v.members.contains(m)));
            *cur = v;
            newly
        };
        if narrowed {
            self.epoch.send_modify(|e| *e += 1);
        }
    }

    /// Revokes `uuid` at once in this process (the store says so too; the next refresh agrees).
    pub fn revoke(&self, uuid: &str) {
        {
            let mut v = self.write();
            v.revoked.insert(uuid.to_owned());
            if let Some(ip) = v.underlay.remove(uuid) {
                if !v.underlay.values().any(|&o| o == ip) {
                    v.members.remove(&ip);
                }
            }
        }
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Replaces the revoked serial numbers (lower-case hex); a newly revoked one wakes
    /// [`Trust::revoked_serial`] waiters.
    pub fn set_revoked_serials(&self, serials: HashSet<String>) {
        let newly = {
            let mut cur = self.serials.write().unwrap_or_else(|e| e.into_inner());
            let newly = serials.iter().any(|s| !cur.contains(s));
            *cur = serials;
            newly
        };
        if newly {
            self.epoch.send_modify(|e| *e += 1);
        }
    }

    /// Whether the certificate with this serial number was revoked.
    pub fn is_serial_revoked(&self, serial: &str) -> bool {
        self.serials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&serial.to_ascii_lowercase())
    }

    /// Resolves once the certificate with this serial is revoked (at once if it already is).
    pub async fn revoked_serial(&self, serial: &str) {
        let mut rx = self.epoch.subscribe();
        loop {
            if self.is_serial_revoked(serial) {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether `uuid` was removed from the cluster.
    pub fn is_revoked(&self, uuid: &str) -> bool {
        self.read().revoked.contains(uuid)
    }

    /// Whether the view has been loaded at least once (before that nothing is refused by
    /// address).
    pub fn enforcing(&self) -> bool {
        self.read().loaded
    }

    /// Whether `ip` is a member: the underlay address of a registered, unrevoked server, or a
    /// foreign peer. Before the first load every address is.
    pub fn is_member(&self, ip: IpAddr) -> bool {
        let v = self.read();
        !v.loaded || v.members.contains(&ip)
    }

    /// The underlay address of an unrevoked server.
    pub fn underlay_of(&self, uuid: &str) -> Option<IpAddr> {
        self.read().underlay.get(uuid).copied()
    }

    /// Every member address, sorted.
    pub fn members(&self) -> Vec<IpAddr> {
        let mut m: Vec<IpAddr> = self.read().members.iter().copied().collect();
        m.sort();
        m
    }

    /// Resolves once `ip` is no member (at once if it is not): a removed server's address, a
    /// deleted foreign peer.
    pub async fn not_member(&self, ip: IpAddr) {
        let mut rx = self.epoch.subscribe();
        loop {
            if !self.is_member(ip) {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves once `uuid` is revoked (at once if it already is).
    pub async fn revoked(&self, uuid: &str) {
        let mut rx = self.epoch.subscribe();
        loop {
            if self.is_revoked(uuid) {
                return;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`; unreachable, but never spin.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(uuid: &str, ip: &str, removed: bool) -> ServerTrust {
        ServerTrust {
            uuid: uuid.into(),
            underlay: ip.parse().unwrap(),
            removed,
        }
    }

    #[test]
    fn nothing_is_refused_before_the_first_load() {
        let t = Trust::new();
        assert!(!t.enforcing());
        assert!(t.is_member("192.0.2.9".parse().unwrap()));
        t.set_servers([s("a", "192.0.2.1", false)], []);
        assert!(t.enforcing());
        assert!(!t.is_member("192.0.2.9".parse().unwrap()));
        assert!(t.is_member("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn removed_servers_and_foreign_peers() {
        let t = Trust::new();
        t.set_servers(
            [s("a", "192.0.2.1", false), s("b", "192.0.2.2", true)],
            ["198.51.100.7".parse().unwrap()],
        );
        assert!(t.is_revoked("b") && !t.is_revoked("a"));
        assert_eq!(t.underlay_of("a"), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(t.underlay_of("b"), None);
        assert_eq!(
            t.members(),
            vec![
                "192.0.2.1".parse::<IpAddr>().unwrap(),
                "198.51.100.7".parse().unwrap()
            ]
        );
        t.revoke("a");
        assert!(t.is_revoked("a"));
        assert!(!t.is_member("192.0.2.1".parse().unwrap()));
    }

    #[tokio::test]
    async fn revoked_wakes_waiters() {
        let t = Trust::new();
        t.set_servers([s("a", "192.0.2.1", false)], []);
        let t2 = t.clone();
        let w = tokio::spawn(async move { t2.revoked("a").await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!w.is_finished());
        t.set_servers([s("a", "192.0.2.1", true)], []);
        tokio::time::timeout(std::time::Duration::from_secs(5), w)
            .await
            .expect("woken")
            .unwrap();
        // Already revoked: at once.
        t.revoked("a").await;
    }

    #[tokio::test]
    async fn not_member_wakes_when_an_address_leaves() {
        let t = Trust::new();
        let peer: IpAddr = "198.51.100.7".parse().unwrap();
        t.set_servers([s("a", "192.0.2.1", false)], [peer]);
        let t2 = t.clone();
        let w = tokio::spawn(async move { t2.not_member(peer).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!w.is_finished());
        t.set_servers([s("a", "192.0.2.1", false)], []);
        tokio::time::timeout(std::time::Duration::from_secs(5), w)
            .await
            .expect("woken")
            .unwrap();
    }
}
