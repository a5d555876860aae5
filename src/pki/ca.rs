//! The cluster CA: created once on the head (`DIR/pki/cluster-ca.{crt,key}`, the key mode 0600
//! and never sent anywhere), it signs host certificates from certificate requests (the host's
//! key never leaves the host), operator certificates, and the head's TLS server certificate.
//!
//! Every certificate it issues has a random 128-bit serial, a lifetime counted from one minute
//! before issue (clock skew between hosts), and the subject [`super`] documents: CN = server
//! UUID and OU = `fabric-host` for hosts, CN = a name and OU = `fabric-operator` for operators.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::{files, PkiError, ACCOUNT_OU, HOST_OU, OPERATOR_OU};

/// How long the cluster CA's own certificate is valid.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The default lifetime of host and operator certificates (`--cert-lifetime`).
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Issued certificates start up to this long before now (a tenth of their lifetime at most, so
/// a short-lived certificate's two-thirds renewal point stays near two thirds of its real life),
/// so a host whose clock is a little behind the head's can use its certificate at once.
const BACKDATE: Duration = Duration::from_secs(60);

/// `DIR/pki`, where the head keeps its CA and the join secret.
pub fn pki_dir(data: &Path) -> PathBuf {
    data.join("pki")
}

/// Which of the head's two CAs (DESIGN "Trust": never one for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    /// `pki/cluster-ca.*`: hosts, operators, the control API's server certificate.
    Cluster,
    /// `pki/accounts-ca.*`: Docker accounts and the Docker API's server certificate.
    Accounts,
}

impl CaKind {
    fn stem(self) -> &'static str {
        match self {
            CaKind::Cluster => "cluster-ca",
            CaKind::Accounts => "accounts-ca",
        }
    }
    fn subject(self) -> (&'static str, &'static str) {
        match self {
            CaKind::Cluster => ("fabric cluster CA", "fabric-cluster-ca"),
            CaKind::Accounts => ("fabric accounts CA", "fabric-accounts-ca"),
        }
    }
}

/// The cluster CA.
pub type ClusterCa = Ca;

/// One of the head's CAs ([`CaKind`]), loaded with its key.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
    der: Vec<u8>,
    kind: CaKind,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("kind", &self.kind)
            .field("digest", &hex(&self.digest()))
            .finish_non_exhaustive()
    }
}

fn rc(what: &str) -> impl Fn(rcgen::Error) -> PkiError + '_ {
    move |e| PkiError::Cert(format!("{what}: {e}"))
}

/// A random serial number (128 bits, positive).
fn serial() -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| PkiError::Cert(format!("no randomness: {e}")))?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE.min(lifetime / 10);
    params.not_after = now + lifetime;
}

fn subject(cn: &str, ou: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fabric");
    dn.push(DnType::OrganizationalUnitName, ou);
    dn.push(DnType::CommonName, cn);
    dn
}

fn leaf(cn: &str, ou: &str, lifetime: Duration) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = subject(cn, ou);
    p.serial_number = Some(serial()?);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, lifetime);
    Ok(p)
}

impl Ca {
    /// Loads `DIR/pki/cluster-ca.{crt,key}`, creating them first if neither exists.
    pub fn create_or_load(data: &Path) -> Result<Ca, PkiError> {
        Self::create_or_load_kind(data, CaKind::Cluster)
    }

    /// Loads the CA of a head's data directory.
    pub fn load(data: &Path) -> Result<Ca, PkiError> {
        Self::load_kind(data, CaKind::Cluster)
    }

    /// Which CA this is.
    pub fn kind(&self) -> CaKind {
        self.kind
    }

    /// Loads `DIR/pki/<kind>.{crt,key}`, creating them first if neither exists.
    pub fn create_or_load_kind(data: &Path, kind: CaKind) -> Result<Ca, PkiError> {
        let dir = pki_dir(data);
        let stem = kind.stem();
        let (crt, key) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        match (crt.exists(), key.exists()) {
            (true, true) => Self::load_kind(data, kind),
            (false, false) => {
                let key_pair = KeyPair::generate().map_err(rc("generating the CA key"))?;
                let mut p = CertificateParams::default();
                let (cn, ou) = kind.subject();
                p.distinguished_name = subject(cn, ou);
                p.serial_number = Some(serial()?);
                p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                p.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                validity(&mut p, CA_LIFETIME);
                let cert = p
                    .self_signed(&key_pair)
                    .map_err(rc("signing the CA certificate"))?;
                // The key first: a crash in between leaves a key without a certificate, which
                // `load` reports, never a certificate whose key is lost.
                files::write_key(&key, &key_pair.serialize_pem())?;
                files::write_cert(&crt, &cert.pem())?;
                Self::load_kind(data, kind)
            }
            (true, false) => Err(PkiError::Cert(format!(
                "{} exists but {} does not: the CA's key is lost; restore it from a backup",
                crt.display(),
                key.display()
            ))),
            (false, true) => Err(PkiError::Cert(format!(
                "{} exists but {} does not: restore the CA certificate from a backup",
                key.display(),
                crt.display()
            ))),
        }
    }

    /// Loads the `kind` CA of a head's data directory.
    pub fn load_kind(data: &Path, kind: CaKind) -> Result<Ca, PkiError> {
        let dir = pki_dir(data);
        let stem = kind.stem();
        let crt = dir.join(format!("{stem}.crt"));
        if !crt.exists() {
            return Err(PkiError::Cert(format!(
                "no cluster CA in {}: this is not a head's data directory (run `fabric up --data {}` on the head first)",
                dir.display(),
                data.display()
            )));
        }
        let pem = files::read(&crt)?;
        let key = KeyPair::from_pem(&files::read(&dir.join(format!("{stem}.key")))?)
            .map_err(rc("reading the CA key"))?;
        let params =
            CertificateParams::from_ca_cert_pem(&pem).map_err(rc("reading the CA certificate"))?;
        // Re-signing the parsed parameters with the same key gives an issuer with the same
        // subject and key identifier: what it signs chains to the certificate on disk.
        let cert = params
            .self_signed(&key)
            .map_err(rc("loading the CA certificate"))?;
        let der = super::tls::pem_certs(&pem)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::Cert(format!("{} holds no certificate", crt.display())))?
            .to_vec();
        Ok(Ca {
            cert,
            key,
            pem,
            der,
            kind,
        })
    }

    /// The CA certificate (PEM), as written in `pki/cluster-ca.crt`.
    pub fn ca_pem(&self) -> &str {
        &self.pem
    }

    /// SHA-256 of the CA certificate (DER): what join tokens carry.
    pub fn digest(&self) -> [u8; 32] {
        super::sha256(&self.der)
    }

    /// Signs a host certificate for `server_uuid` over the public key of `csr_pem`. The request's
    /// own subject and extensions are ignored: the head decides what the certificate says.
    pub fn issue_host(
        &self,
        csr_pem: &str,
        server_uuid: &str,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Request(format!("not a certificate request: {e}")))?;
        csr.params = leaf(server_uuid, HOST_OU, lifetime)?;
        let cert = csr
            .signed_by(&self.cert, &self.key)
            .map_err(rc("signing the host certificate"))?;
        Ok(cert.pem())
    }

    /// Signs a Docker account's certificate (CN = `login`, OU = [`ACCOUNT_OU`]) over the public
    /// key of `csr_pem`; the request's own subject is ignored. Accounts CA only.
    pub fn issue_account(
        &self,
        csr_pem: &str,
        login: &str,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        if self.kind != CaKind::Accounts {
            return Err(PkiError::Cert(
                "account certificates come from the accounts CA, never the cluster CA".into(),
            ));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Request(format!("not a certificate request: {e}")))?;
        csr.params = leaf(login, ACCOUNT_OU, lifetime)?;
        let cert = csr
            .signed_by(&self.cert, &self.key)
            .map_err(rc("signing the account certificate"))?;
        Ok(cert.pem())
    }

    /// A host certificate and its key made here (the head's own host identity).
    pub fn issue_host_local(
        &self,
        server_uuid: &str,
        lifetime: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate().map_err(rc("generating a key"))?;
        let cert = leaf(server_uuid, HOST_OU, lifetime)?
            .signed_by(&key, &self.cert, &self.key)
            .map_err(rc("signing the host certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// An operator certificate and its key.
    pub fn issue_operator(
        &self,
        name: &str,
        lifetime: Duration,
    ) -> Result<(String, String), PkiError> {
        if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
            return Err(PkiError::Request(format!(
                "operator name {name:?}: expected 1 to 64 printable characters"
            )));
        }
        let key = KeyPair::generate().map_err(rc("generating a key"))?;
        let cert = leaf(name, OPERATOR_OU, lifetime)?
            .signed_by(&key, &self.cert, &self.key)
            .map_err(rc("signing the operator certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The head's TLS server certificate (server auth only) for `ips` and `names`, and its key.
    pub fn issue_server(
        &self,
        server_uuid: &str,
        ips: &[IpAddr],
        names: &[String],
        lifetime: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate().map_err(rc("generating a key"))?;
        let mut p = leaf(server_uuid, "fabric-head", lifetime)?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        for n in names {
            let n = n
                .clone()
                .try_into()
                .map_err(|e| PkiError::Request(format!("--san {n:?}: not a DNS name: {e}")))?;
            p.subject_alt_names.push(SanType::DnsName(n));
        }
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .map_err(rc("signing the server certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A new key and a certificate request for it (PEM): what a joining or renewing host sends.
/// The subject is advisory (the head sets its own).
pub fn request(server_uuid: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(rc("generating a key"))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = subject(server_uuid, HOST_OU);
    let csr = p
        .serialize_request(&key)
        .map_err(rc("making the certificate request"))?;
    let pem = csr.pem().map_err(rc("encoding the certificate request"))?;
    Ok((pem, key.serialize_pem()))
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fabric-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn created_once_then_loaded_with_the_same_digest() {
        let d = tmp("once");
        let a = ClusterCa::create_or_load(&d).unwrap();
        let b = ClusterCa::create_or_load(&d).unwrap();
        assert_eq!(a.digest(), b.digest());
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(d.join("pki/cluster-ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o600);
        std::fs::remove_file(d.join("pki/cluster-ca.key")).unwrap();
        let e = ClusterCa::create_or_load(&d).unwrap_err().to_string();
        assert!(e.contains("key is lost"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn host_certificates_name_the_uuid_whatever_the_request_says() {
        let d = tmp("host");
        let ca = ClusterCa::create_or_load(&d).unwrap();
        let (csr, _key) = request("someone-else").unwrap();
        let pem = ca
            .issue_host(
                &csr,
                "11111111-2222-3333-4444-555555555555",
                Duration::from_secs(60),
            )
            .unwrap();
        let der = super::super::tls::pem_certs(&pem).unwrap().remove(0);
        assert_eq!(
            super::super::tls::peer_of_cert(&der),
            Some(super::super::Peer::Host {
                server_uuid: "11111111-2222-3333-4444-555555555555".into(),
                serial: super::super::tls::serial_of(&der).unwrap(),
            })
        );
        let e = ca
            .issue_host("garbage", "x", Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(e, PkiError::Request(_)), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
