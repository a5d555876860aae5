//! rustls configurations (ring provider, TLS 1.2 and 1.3) for every listener and client of the
//! cluster, and what a verified certificate says ([`peer_of_cert`]).
//!
//! - [`server_config`]: the head's listeners. Client certificates are verified against the
//!   cluster CA only, and a host certificate of a removed server is refused in the handshake
//!   ([`super::Trust::is_revoked`]); [`ClientAuth::Optional`] lets a client without a
//!   certificate in (the control API, for `POST /join` only).
//! - [`client_config`]: a host or operator: the cluster CA as the only root, its certificate
//!   as identity.
//! - [`pinned_client_config`]: a joining host, which has no CA yet: the head must present a
//!   chain that contains a CA certificate whose SHA-256 is the token's digest, and its
//!   certificate must verify against that CA; else nothing is sent.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

use super::{Peer, PkiError, Trust, ACCOUNT_OU, HOST_OU, OPERATOR_OU};

/// Whether a listener requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// The handshake fails without one (Portolan's TLS port).
    Required,
    /// A client without one gets in as [`Peer::Anonymous`] (the control API, for joining).
    Optional,
}

/// The crypto provider of every configuration (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM text, in order.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Cert(format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::Cert("no certificate in the PEM text".into()));
    }
    Ok(certs)
}

/// The private key of a PEM text.
pub fn pem_key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Cert(format!("bad PEM private key: {e}")))
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut r = RootCertStore::empty();
    for c in pem_certs(ca_pem)? {
        r.add(c)
            .map_err(|e| PkiError::Cert(format!("bad CA certificate: {e}")))?;
    }
    Ok(Arc::new(r))
}

fn tls(e: rustls::Error) -> PkiError {
    PkiError::Cert(format!("TLS configuration: {e}"))
}

/// A server configuration: `chain_pem` (leaf first, the CA after it so joining hosts can check
/// the token's digest) with `key_pem`; client certificates of `ca_pem` only, refused when
/// `trust` says their server was removed. ALPN: h2, http/1.1.
pub fn server_config(
    ca_pem: &str,
    chain_pem: &str,
    key_pem: &str,
    trust: Option<Arc<Trust>>,
    auth: ClientAuth,
) -> Result<Arc<ServerConfig>, PkiError> {
    let p = provider();
    let b = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, p.clone());
    let b = match auth {
        ClientAuth::Required => b,
        ClientAuth::Optional => b.allow_unauthenticated(),
    };
    let inner = b
        .build()
        .map_err(|e| PkiError::Cert(format!("client verifier: {e}")))?;
    let verifier = Arc::new(Revocation { inner, trust });
    let mut c = ServerConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs(chain_pem)?, pem_key(key_pem)?)
        .map_err(tls)?;
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// A host's or operator's client configuration from `DIR/{ca,cert,key}.pem` (read now: build
/// it again after a renewal). ALPN: h2.
pub fn client_config(tls_dir: &Path) -> Result<Arc<ClientConfig>, PkiError> {
    let read = |n: &str| super::files::read(&tls_dir.join(n));
    let (ca, cert, key) = (read("ca.pem")?, read("cert.pem")?, read("key.pem")?);
    client_config_from(&ca, &cert, &key)
}

/// [`client_config`] from PEM texts.
pub fn client_config_from(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, PkiError> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(pem_certs(cert_pem)?, pem_key(key_pem)?)
        .map_err(tls)?;
    c.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(c))
}

/// A joining host's configuration: no client certificate; the server is trusted only if its
/// chain carries the CA whose SHA-256 is `digest` and verifies against it. ALPN: h2.
pub fn pinned_client_config(digest: [u8; 32]) -> Result<Arc<ClientConfig>, PkiError> {
    let p = provider();
    let mut c = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            digest,
            provider: p,
        }))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(c))
}

/// The name to verify a server by: an IP address or a DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, PkiError> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(h.to_owned())
        .map_err(|e| PkiError::Cert(format!("{host:?} is not a host name or address: {e}")))
}

fn parse(der: &[u8]) -> Option<x509_parser::certificate::X509Certificate<'_>> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c)
}

/// What a (verified) end-entity certificate of the cluster CA says about its holder.
pub fn peer_of_cert(der: &[u8]) -> Option<Peer> {
    let c = parse(der)?;
    let cn = c.subject().iter_common_name().next()?.as_str().ok()?;
    let ou = c
        .subject()
        .iter_organizational_unit()
        .next()?
        .as_str()
        .ok()?;
    match ou {
        HOST_OU => Some(Peer::Host {
            server_uuid: cn.to_ascii_lowercase(),
            serial: c.raw_serial_as_string().replace(':', ""),
        }),
        OPERATOR_OU => Some(Peer::Operator {
            name: cn.to_owned(),
            serial: Some(c.raw_serial_as_string().replace(':', "")),
        }),
        ACCOUNT_OU => Some(Peer::Account {
            login: cn.to_owned(),
            serial: c.raw_serial_as_string().replace(':', ""),
        }),
        _ => None,
    }
}

/// The certificate's serial number (hex, no separators).
pub fn serial_of(der: &[u8]) -> Option<String> {
    parse(der).map(|c| c.raw_serial_as_string().replace(':', ""))
}

/// When the certificate expires.
pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    let t = parse(der)?.validity().not_after.timestamp();
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(t).ok()?))
}

/// When the certificate became valid.
pub fn not_before(der: &[u8]) -> Option<SystemTime> {
    let t = parse(der)?.validity().not_before.timestamp();
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(t).ok()?))
}

/// Whether a certificate is past two thirds of its life (or expired, or unreadable) at `now`:
/// hosts renew then.
pub fn renewal_due(der: &[u8], now: SystemTime) -> bool {
    renewal_at(der).is_none_or(|t| now >= t)
}

/// When a certificate is two thirds through its life (`None`: unreadable).
pub fn renewal_at(der: &[u8]) -> Option<SystemTime> {
    let (nb, na) = (not_before(der)?, not_after(der)?);
    let life = na.duration_since(nb).unwrap_or_default();
    Some(nb + life * 2 / 3)
}

/// The client verifier of every listener: the CA's (webpki), then no removed server.
#[derive(Debug)]
struct Revocation {
    inner: Arc<dyn ClientCertVerifier>,
    trust: Option<Arc<Trust>>,
}

impl ClientCertVerifier for Revocation {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match (peer_of_cert(end_entity), &self.trust) {
            (None, _) => Err(rustls::Error::General(
                "not a fabric host, operator or account certificate".into(),
            )),
            (Some(Peer::Host { server_uuid, .. }), Some(t)) if t.is_revoked(&server_uuid) => {
                Err(rustls::Error::General(format!(
                    "the certificate of server {server_uuid}, which was removed from the cluster"
                )))
            }
            (
                Some(Peer::Operator {
                    serial: Some(s), ..
                }),
                Some(t),
            ) if t.is_serial_revoked(&s) => Err(rustls::Error::General(format!(
                "operator certificate {s}, which was revoked"
            ))),
            (Some(Peer::Account { login, serial }), Some(t)) if t.is_serial_revoked(&serial) => {
                Err(rustls::Error::General(format!(
                    "certificate {serial} of account {login:?}, which was removed or revoked"
                )))
            }
            _ => Ok(ok),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A joining host's server verifier (see [`pinned_client_config`]).
#[derive(Debug)]
struct Pinned {
    digest: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| super::sha256(c) == self.digest)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the head's certificate is not from the cluster CA the token names (sha256 {}): \
                     wrong head or wrong token",
                    super::ca::hex(&self.digest)
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("the cluster CA certificate: {e}")))?;
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("verifier: {e}")))?;
        v.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::ca::{request, ClusterCa};
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Cluster {
        dir: std::path::PathBuf,
        ca: ClusterCa,
        server: Arc<ServerConfig>,
        trust: Arc<Trust>,
    }

    const HOST: &str = "11111111-2222-3333-4444-555555555555";

    fn cluster(name: &str, auth: ClientAuth) -> Cluster {
        let dir = std::env::temp_dir().join(format!("fabric-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = ClusterCa::create_or_load(&dir).unwrap();
        let (cert, key) = ca
            .issue_server(
                HOST,
                &["127.0.0.1".parse().unwrap()],
                &[],
                Duration::from_secs(600),
            )
            .unwrap();
        let trust = Trust::new();
        let chain = format!("{cert}{}", ca.ca_pem());
        let server = server_config(ca.ca_pem(), &chain, &key, Some(trust.clone()), auth).unwrap();
        Cluster {
            dir,
            ca,
            server,
            trust,
        }
    }

    /// One handshake over an in-memory pipe: the peer the server saw, or the client's error.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<Option<Peer>, String> {
        let (a, b) = tokio::io::duplex(1 << 16);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client);
        let srv = tokio::spawn(async move {
            let mut s = acceptor.accept(a).await.map_err(|e| e.to_string())?;
            let peer = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| peer_of_cert(c));
            let mut buf = [0u8; 2];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            let _ = s.read_to_end(&mut Vec::new()).await;
            Ok::<_, String>(peer)
        });
        let cli = async {
            let mut s = connector
                .connect(server_name("127.0.0.1").unwrap(), b)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"hi").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            s.shutdown().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(s)
        };
        let c = cli.await;
        let s = srv.await.unwrap();
        // The client's end lives until the server is done (it may still write tickets).
        match (c, s) {
            (Ok(_), s) => s,
            (Err(c), Err(s)) => Err(format!("{c} (server: {s})")),
            (Err(c), Ok(p)) => Err(format!("{c} (server ok: {p:?})")),
        }
    }

    fn host_client(c: &Cluster, uuid: &str) -> Arc<ClientConfig> {
        let (csr, key) = request(uuid).unwrap();
        let cert =
            c.ca.issue_host(&csr, uuid, Duration::from_secs(600))
                .unwrap();
        client_config_from(c.ca.ca_pem(), &cert, &key).unwrap()
    }

    #[tokio::test]
    async fn host_operator_anonymous_and_foreign_certificates() {
        let c = cluster("peers", ClientAuth::Optional);
        let peer = handshake(c.server.clone(), host_client(&c, HOST))
            .await
            .unwrap();
        assert!(matches!(peer, Some(Peer::Host { server_uuid, .. }) if server_uuid == HOST));

        let (cert, key) =
            c.ca.issue_operator("alice", Duration::from_secs(600))
                .unwrap();
        let op = client_config_from(c.ca.ca_pem(), &cert, &key).unwrap();
        let peer = handshake(c.server.clone(), op.clone()).await.unwrap();
        let serial = serial_of(&pem_certs(&cert).unwrap()[0]).unwrap();
        assert_eq!(
            peer,
            Some(Peer::Operator {
                name: "alice".into(),
                serial: Some(serial.clone()),
            })
        );
        // A revoked operator certificate: refused in the handshake.
        c.trust.set_revoked_serials([serial].into_iter().collect());
        assert!(handshake(c.server.clone(), op).await.is_err());

        // No certificate: let in (Optional), no peer.
        let anon = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(c.ca.ca_pem()).unwrap())
            .with_no_client_auth();
        assert_eq!(
            handshake(c.server.clone(), Arc::new(anon)).await.unwrap(),
            None
        );

        // A certificate of another CA: refused.
        let other = cluster("other", ClientAuth::Optional);
        let (csr, key) = request(HOST).unwrap();
        let cert = other
            .ca
            .issue_host(&csr, HOST, Duration::from_secs(600))
            .unwrap();
        let foreign = client_config_from(c.ca.ca_pem(), &cert, &key).unwrap();
        assert!(handshake(c.server.clone(), foreign).await.is_err());

        // A removed server's certificate: refused in the handshake.
        c.trust.revoke(HOST);
        assert!(handshake(c.server.clone(), host_client(&c, HOST))
            .await
            .is_err());
        for d in [&c.dir, &other.dir] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[tokio::test]
    async fn required_auth_refuses_anonymous() {
        let c = cluster("required", ClientAuth::Required);
        let anon = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(c.ca.ca_pem()).unwrap())
            .with_no_client_auth();
        assert!(handshake(c.server.clone(), Arc::new(anon)).await.is_err());
        std::fs::remove_dir_all(&c.dir).unwrap();
    }

    #[tokio::test]
    async fn joining_host_checks_the_digest_before_anything_else() {
        let c = cluster("pinned", ClientAuth::Optional);
        let ok = pinned_client_config(c.ca.digest()).unwrap();
        assert_eq!(handshake(c.server.clone(), ok).await.unwrap(), None);
        // A head whose CA is another one (an impostor) fails the client's check.
        let impostor = cluster("impostor", ClientAuth::Optional);
        let e = handshake(
            impostor.server.clone(),
            pinned_client_config(c.ca.digest()).unwrap(),
        )
        .await
        .unwrap_err();
        assert!(e.contains("not from the cluster CA"), "{e}");
        for d in [&c.dir, &impostor.dir] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn renewal_is_due_after_two_thirds() {
        let c = cluster("renewal", ClientAuth::Optional);
        let (cert, _) = c.ca.issue_operator("x", Duration::from_secs(600)).unwrap();
        let der = pem_certs(&cert).unwrap().remove(0);
        let nb = not_before(&der).unwrap();
        let na = not_after(&der).unwrap();
        let life = na.duration_since(nb).unwrap();
        assert!(!renewal_due(&der, nb + life / 2));
        assert!(renewal_due(
            &der,
            nb + life * 2 / 3 + Duration::from_secs(1)
        ));
        assert!(renewal_due(&der, na + Duration::from_secs(1)));
        assert!(renewal_due(b"garbage", SystemTime::now()));
        std::fs::remove_dir_all(&c.dir).unwrap();
    }

    #[test]
    fn expiry_is_read_back() {
        let c = cluster("expiry", ClientAuth::Optional);
        let (cert, _) =
            c.ca.issue_operator("bob", Duration::from_secs(120))
                .unwrap();
        let der = pem_certs(&cert).unwrap().remove(0);
        let left = not_after(&der)
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            left > Duration::from_secs(100) && left <= Duration::from_secs(121),
            "{left:?}"
        );
        std::fs::remove_dir_all(&c.dir).unwrap();
    }
}
