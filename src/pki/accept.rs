//! The TLS accept step of the head's HTTP listeners ([`crate::http::Accept`]): a tokio-rustls
//! handshake (the client verifier of [`super::tls::server_config`] checks the cluster CA and
//! refuses removed servers), then the verified client certificate names the [`Peer`] of every
//! request on the connection. A host's connection is dropped the moment its server is revoked
//! ([`Trust::revoked`]), and any client's when its certificate expires: an open long-poll of
//! a removed host ends at once.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::tls::{not_after, peer_of_cert};
use super::{Peer, Trust};

/// TLS with client certificates of the cluster CA; [`Peer`] from the certificate.
#[derive(Clone)]
pub struct HttpTls {
    /// The handshake (a [`super::tls::server_config`]).
    pub acceptor: TlsAcceptor,
    /// The membership view: a revoked host's connections are closed. `None`: nothing is
    /// revoked (certificates still expire).
    pub trust: Option<Arc<Trust>>,
}

impl HttpTls {
    /// The accept step of `config`, closing revoked hosts' connections per `trust`.
    pub fn new(config: Arc<rustls::ServerConfig>, trust: Option<Arc<Trust>>) -> HttpTls {
        HttpTls {
            acceptor: TlsAcceptor::from(config),
            trust,
        }
    }
}

/// The client's end-entity certificate, if it sent one (verified by the handshake).
fn client_cert(io: &TlsStream<TcpStream>) -> Option<&CertificateDer<'static>> {
    io.get_ref().1.peer_certificates()?.first()
}

/// Who a verified client certificate (or its absence) makes the client.
fn peer_of(cert: Option<&CertificateDer<'_>>) -> Peer {
    // The verifier refuses certificates that are neither host nor operator; should one get
    // through, it gets the least: what a client without a certificate may do.
    cert.and_then(|c| peer_of_cert(c))
        .unwrap_or(Peer::Anonymous)
}

impl crate::http::Accept for HttpTls {
    type Io = TlsStream<TcpStream>;
    type Peer = Peer;

    fn accept(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Io>> + Send {
        let acceptor = self.acceptor.clone();
        let trust = self.trust.clone();
        async move {
            let s = acceptor.accept(tcp).await?;
            // The verifier already refused removed servers; a revocation that landed during
            // the handshake is caught here.
            if let (Peer::Host { server_uuid, .. }, Some(t)) = (peer_of(client_cert(&s)), &trust) {
                if t.is_revoked(&server_uuid) {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("server {server_uuid} was removed from the cluster"),
                    ));
                }
            }
            Ok(s)
        }
    }

    fn peer(&self, io: &Self::Io) -> Peer {
        peer_of(client_cert(io))
    }

    fn closed(&self, peer: &Peer) -> impl Future<Output = ()> + Send {
        enum Watch {
            Server(Arc<Trust>, String),
            Serial(Arc<Trust>, String),
            Nothing,
        }
        let watch = match (peer, &self.trust) {
            (Peer::Host { server_uuid, .. }, Some(t)) => {
                Watch::Server(t.clone(), server_uuid.clone())
            }
            (
                Peer::Operator {
                    serial: Some(s), ..
                },
                Some(t),
            ) => Watch::Serial(t.clone(), s.clone()),
            (Peer::Account { serial, .. }, Some(t)) => Watch::Serial(t.clone(), serial.clone()),
            _ => Watch::Nothing,
        };
        async move {
            match watch {
                Watch::Server(t, uuid) => t.revoked(&uuid).await,
                Watch::Serial(t, serial) => t.revoked_serial(&serial).await,
                Watch::Nothing => std::future::pending().await,
            }
        }
    }

    fn expires(&self, io: &Self::Io) -> Option<SystemTime> {
        not_after(client_cert(io)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_or_unknown_certificate_is_anonymous() {
        assert_eq!(peer_of(None), Peer::Anonymous);
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert_eq!(peer_of(Some(&junk)), Peer::Anonymous);
    }

    #[tokio::test]
    async fn closed_follows_revocation_of_the_server_or_the_serial() {
        let t = Trust::new();
        let cfg = test_config();
        let a = HttpTls::new(cfg, Some(t.clone()));
        let host = Peer::Host {
            server_uuid: "u1".into(),
            serial: "01".into(),
        };
        let op = Peer::Operator {
            name: "alice".into(),
            serial: Some("0a".into()),
        };
        let d = std::time::Duration::from_millis(50);
        use crate::http::Accept as _;
        assert!(tokio::time::timeout(d, a.closed(&host)).await.is_err());
        t.revoke("u1");
        tokio::time::timeout(d, a.closed(&host))
            .await
            .expect("a revoked host's sessions end");
        assert!(tokio::time::timeout(d, a.closed(&op)).await.is_err());
        t.set_revoked_serials(["0a".to_string()].into_iter().collect());
        tokio::time::timeout(d, a.closed(&op))
            .await
            .expect("a revoked operator certificate's sessions end");
        // Without a membership view nothing is revoked.
        let plain = HttpTls::new(test_config(), None);
        assert!(tokio::time::timeout(d, plain.closed(&host)).await.is_err());
    }

    fn test_config() -> Arc<rustls::ServerConfig> {
        let dir = std::env::temp_dir().join(format!(
            "fabric-accept-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = super::super::ca::ClusterCa::create_or_load(&dir).unwrap();
        let (cert, key) = ca
            .issue_server(
                "h",
                &["127.0.0.1".parse().unwrap()],
                &[],
                std::time::Duration::from_secs(60),
            )
            .unwrap();
        let cfg = super::super::tls::server_config(
            ca.ca_pem(),
            &cert,
            &key,
            None,
            super::super::tls::ClientAuth::Optional,
        )
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        cfg
    }
}
