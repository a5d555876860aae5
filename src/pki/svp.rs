//! Portolan answers only members (DESIGN "Trust: Members"): the access policy of the head's
//! Portolan over [`Trust`], the TLS listener kind for fabric hosts (SVP over TLS with host
//! certificates) and the TLS connector of the dataplane's SVP client.
//!
//! - Plain SVP (port 1296, illumos varpd and other foreign peers): a connection is served
//!   while its source address is a member ([`Trust::is_member`]); its log is the log of that
//!   address.
//! - SVP over TLS ([`SvpTlsAcceptor`]): the identity is the server UUID of the host
//!   certificate (subject CN, OU [`HOST_OU`]); the session is served while that server is not
//!   revoked, and closed at once when it is ([`Trust::revoked`]); its log is the log of the
//!   server's registered underlay ([`Trust::underlay_of`]), whatever address it connects from.
//! - [`SvpTlsConnector`]: the client side, a `rustls::ClientConfig` given once, or re-read from
//!   a `tls/` directory (`ca.pem`, `cert.pem`, `key.pem`) at every connection attempt so a
//!   renewed certificate is used from the next reconnect on.
//!
//! Portolan itself knows nothing of TLS or of this module: it sees an [`Access`] policy, an
//! [`Acceptor`] and a [`Connector`].

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use portolan::client::{BoxStream, Connecting, Connector};
use portolan::server::{Acceptor, Access, Closed, Identity, LogScope};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::{tls, Peer, Trust, HOST_OU};

/// Portolan's access policy over the head's membership view (see the module docs).
#[derive(Debug, Clone)]
pub struct SvpAccess {
    trust: Arc<Trust>,
}

impl SvpAccess {
    /// The policy over `trust`.
    pub fn new(trust: Arc<Trust>) -> SvpAccess {
        SvpAccess { trust }
    }
}

impl Access for SvpAccess {
    fn allowed(&self, _peer: SocketAddr, who: &Identity) -> bool {
        match who {
            Identity::Address(ip) => self.trust.is_member(ip.to_canonical()),
            Identity::Named(uuid) => !self.trust.is_revoked(uuid),
        }
    }

    fn log_scope(&self, _peer: SocketAddr, who: &Identity) -> LogScope {
        match who {
            Identity::Address(ip) => LogScope::Own(ip.to_canonical()),
            Identity::Named(uuid) => match self.trust.underlay_of(uuid) {
                Some(ip) => LogScope::Own(ip),
                // Not registered (yet), or revoked: it has no log to read.
                None => LogScope::Nothing,
            },
        }
    }

    fn closed(&self, who: &Identity) -> Closed {
        match who {
            Identity::Named(uuid) => {
                let trust = self.trust.clone();
                let uuid = uuid.clone();
                Box::pin(async move { trust.revoked(&uuid).await })
            }
            // An address's session ends once it stops being a member (a server removed, a
            // foreign peer deleted).
            Identity::Address(ip) => {
                let trust = self.trust.clone();
                let ip = ip.to_canonical();
                Box::pin(async move { trust.not_member(ip).await })
            }
        }
    }
}

/// The server UUID a host certificate names ([`tls::peer_of_cert`]: subject CN, lower case,
/// OU [`HOST_OU`]); `None` for any other certificate (operator, foreign, unparsable).
pub fn host_uuid_of_cert(der: &[u8]) -> Option<String> {
    match tls::peer_of_cert(der)? {
        Peer::Host { server_uuid, .. } if !server_uuid.is_empty() => Some(server_uuid),
        _ => None,
    }
}

/// SVP over TLS for fabric hosts: a TLS handshake with the given server configuration (which
/// must require client certificates of the cluster CA: [`tls::server_config`] with
/// [`tls::ClientAuth::Required`] and the head's [`Trust`] also refuses revoked hosts), then the host certificate's server UUID is
/// the session's [`Identity::Named`]. A handshake without a host certificate fails (counted in
/// Portolan's `handshake_failed`).
#[derive(Clone)]
pub struct SvpTlsAcceptor {
    tls: tokio_rustls::TlsAcceptor,
}

impl SvpTlsAcceptor {
    /// An acceptor over `config`.
    pub fn new(config: Arc<rustls::ServerConfig>) -> SvpTlsAcceptor {
        SvpTlsAcceptor {
            tls: tokio_rustls::TlsAcceptor::from(config),
        }
    }
}

impl Acceptor for SvpTlsAcceptor {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;

    async fn accept(&self, tcp: TcpStream, _peer: SocketAddr) -> io::Result<(Self::Io, Identity)> {
        let stream = self.tls.accept(tcp).await?;
        let uuid = {
            let (_, conn) = stream.get_ref();
            let leaf = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "SVP over TLS without a client certificate: expected a host certificate",
                    )
                })?;
            host_uuid_of_cert(leaf).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("SVP over TLS with a certificate that is not a host certificate (OU {HOST_OU} and CN = server UUID expected)"),
                )
            })?
        };
        Ok((stream, Identity::Named(uuid)))
    }
}

/// Where the connector's TLS client configuration comes from.
#[derive(Debug, Clone)]
enum Source {
    Fixed(Arc<rustls::ClientConfig>),
    Dir(PathBuf),
}

/// SVP over TLS on the client side: wraps each new TCP connection of Portolan's client in TLS
/// (see the module docs). The server is verified by the name [`server_name`](Self::server_name)
/// gives, by default the IP address it was reached at.
#[derive(Debug, Clone)]
pub struct SvpTlsConnector {
    source: Source,
    server_name: Option<ServerName<'static>>,
}

impl SvpTlsConnector {
    /// With a fixed client configuration.
    pub fn new(config: Arc<rustls::ClientConfig>) -> SvpTlsConnector {
        SvpTlsConnector {
            source: Source::Fixed(config),
            server_name: None,
        }
    }

    /// Re-reading `dir`/{ca,cert,key}.pem at every connection attempt.
    pub fn from_dir(dir: impl Into<PathBuf>) -> SvpTlsConnector {
        SvpTlsConnector {
            source: Source::Dir(dir.into()),
            server_name: None,
        }
    }

    /// Verifies the server's certificate for `name` instead of the address it was reached at.
    #[must_use]
    pub fn server_name(mut self, name: ServerName<'static>) -> SvpTlsConnector {
        self.server_name = Some(name);
        self
    }

    fn config(&self) -> io::Result<Arc<rustls::ClientConfig>> {
        match &self.source {
            Source::Fixed(c) => Ok(c.clone()),
            Source::Dir(d) => tls::client_config(d)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
    }
}

impl Connector for SvpTlsConnector {
    fn connect(&self, tcp: TcpStream, server: SocketAddr) -> Connecting {
        let config = self.config();
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(server.ip().to_canonical().into()));
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(config?);
            let stream = tls.connect(name, tcp).await?;
            Ok(Box::new(stream) as BoxStream)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::ServerTrust;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn peer() -> SocketAddr {
        "192.0.2.200:40000".parse().unwrap()
    }

    fn trust() -> Arc<Trust> {
        let t = Trust::new();
        t.set_servers(
            [
                ServerTrust {
                    uuid: "aaaa".into(),
                    underlay: ip("192.0.2.1"),
                    removed: false,
                },
                ServerTrust {
                    uuid: "bbbb".into(),
                    underlay: ip("192.0.2.2"),
                    removed: true,
                },
            ],
            [ip("198.51.100.7")],
        );
        t
    }

    #[test]
    fn addresses_are_served_while_members_and_read_their_own_log() {
        let a = SvpAccess::new(trust());
        let member = Identity::Address(ip("192.0.2.1"));
        assert!(a.allowed(peer(), &member));
        assert!(a.allowed(peer(), &Identity::Address(ip("198.51.100.7"))));
        // IPv4-mapped forms are the same address.
        assert!(a.allowed(peer(), &Identity::Address(ip("::ffff:192.0.2.1"))));
        assert!(!a.allowed(peer(), &Identity::Address(ip("192.0.2.2"))));
        assert!(!a.allowed(peer(), &Identity::Address(ip("203.0.113.1"))));
        assert_eq!(a.log_scope(peer(), &member), LogScope::Own(ip("192.0.2.1")));
    }

    #[test]
    fn named_sessions_follow_revocation_and_own_underlay() {
        let t = trust();
        let a = SvpAccess::new(t.clone());
        let host = Identity::Named("aaaa".into());
        assert!(a.allowed(peer(), &host));
        assert_eq!(a.log_scope(peer(), &host), LogScope::Own(ip("192.0.2.1")));
        let removed = Identity::Named("bbbb".into());
        assert!(!a.allowed(peer(), &removed));
        assert_eq!(a.log_scope(peer(), &removed), LogScope::Nothing);
        // Joined but not registered yet: served, no log.
        let fresh = Identity::Named("cccc".into());
        assert!(a.allowed(peer(), &fresh));
        assert_eq!(a.log_scope(peer(), &fresh), LogScope::Nothing);
        t.revoke("aaaa");
        assert!(!a.allowed(peer(), &host));
        assert_eq!(a.log_scope(peer(), &host), LogScope::Nothing);
    }

    #[tokio::test]
    async fn a_named_session_is_closed_on_revocation() {
        let t = trust();
        let a = SvpAccess::new(t.clone());
        let closed = a.closed(&Identity::Named("aaaa".into()));
        let w = tokio::spawn(closed);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!w.is_finished());
        t.revoke("aaaa");
        tokio::time::timeout(std::time::Duration::from_secs(5), w)
            .await
            .expect("closed on revocation")
            .unwrap();
    }

    #[tokio::test]
    async fn an_address_session_is_closed_when_it_stops_being_a_member() {
        let t = trust();
        let a = SvpAccess::new(t.clone());
        let w = tokio::spawn(a.closed(&Identity::Address(ip("::ffff:192.0.2.1"))));
        let peer_w = tokio::spawn(a.closed(&Identity::Address(ip("198.51.100.7"))));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!w.is_finished() && !peer_w.is_finished());
        // The server is removed: its address's plain session ends; the foreign peer's stays.
        t.revoke("aaaa");
        tokio::time::timeout(std::time::Duration::from_secs(5), w)
            .await
            .expect("closed once no member")
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!peer_w.is_finished());
        peer_w.abort();
    }

    fn cert_with(cn: &str, ou: &str) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_string());
        p.distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, ou.to_string());
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn host_uuid_only_from_host_certificates() {
        let uuid = "564D1A4C-0000-4000-8000-000000000001";
        assert_eq!(
            host_uuid_of_cert(&cert_with(uuid, HOST_OU)).as_deref(),
            Some("564d1a4c-0000-4000-8000-000000000001")
        );
        assert_eq!(
            host_uuid_of_cert(&cert_with("admin", crate::pki::OPERATOR_OU)),
            None
        );
        assert_eq!(host_uuid_of_cert(b"not a certificate"), None);
    }
}
