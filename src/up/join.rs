//! A host's cluster identity (`DIR/tls/{ca,cert,key}.pem`): joining with a token, or — on the
//! head — issuing it from the local CA; and the control URL forms `fabric up` accepts.
//!
//! Joining: the host connects to the head with a TLS configuration that trusts nothing but a
//! CA whose SHA-256 is the token's digest ([`crate::pki::tls::pinned_client_config`]), so it
//! sends its secret only to the real head; it makes its key here and sends a certificate request
//! with the secret (`POST /join`); it keeps the signed certificate, its key (0600) and the CA.
//! A host that already has an unexpired identity resumes with it and needs no token.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};

use crate::agent::api::{parse_control_url, ControlUrl};
use crate::control::client::HttpClient;
use crate::pki::{self, ca::ClusterCa, files, token::JoinToken};

/// `DIR/tls`.
pub fn tls_dir(data: &Path) -> PathBuf {
    data.join("tls")
}

/// Parses a control URL (`https://HOST:PORT`) and resolves its address.
pub fn control_url(url: &str) -> anyhow::Result<(ControlUrl, SocketAddr)> {
    let u = parse_control_url(url).map_err(|e| anyhow!("{e}"))?;
    let host = u.host.trim_start_matches('[').trim_end_matches(']');
    let addr = (host, u.port)
        .to_socket_addrs()
        .with_context(|| format!("control URL {url:?}: cannot resolve {host}"))?
        .next()
        .ok_or_else(|| anyhow!("control URL {url:?}: {host} resolves to no address"))?;
    Ok((u, addr))
}

/// Whether `DIR/tls` holds a certificate valid now and for a third of its life or more.
fn fresh(tls: &Path, ca_pem: Option<&str>) -> bool {
    let Ok(cert) = files::read(&tls.join("cert.pem")) else {
        return false;
    };
    if !tls.join("key.pem").exists() {
        return false;
    }
    if let Some(ca) = ca_pem {
        if files::read(&tls.join("ca.pem")).ok().as_deref() != Some(ca) {
            return false;
        }
    }
    let Some(der) = pki::tls::pem_certs(&cert)
        .ok()
        .and_then(|c| c.into_iter().next())
    else {
        return false;
    };
    !pki::tls::renewal_due(&der, SystemTime::now())
}

/// The head: `DIR/tls` gets a host certificate of the local CA (made here, the key never
/// leaves) unless it already holds a fresh one of this CA.
pub fn head_identity(
    data: &Path,
    ca: &ClusterCa,
    uuid: &str,
    lifetime: Duration,
) -> anyhow::Result<()> {
    let tls = tls_dir(data);
    if fresh(&tls, Some(ca.ca_pem())) {
        return Ok(());
    }
    let (cert, key) = ca.issue_host_local(uuid, lifetime)?;
    write_identity(&tls, ca.ca_pem(), &cert, &key)
}

fn write_identity(tls: &Path, ca: &str, cert: &str, key: &str) -> anyhow::Result<()> {
    files::write_cert(&tls.join("ca.pem"), ca)?;
    files::write_key(&tls.join("key.pem"), key)?;
    files::write_cert(&tls.join("cert.pem"), cert)?;
    Ok(())
}

/// What a join taught the host.
#[derive(Debug, Clone, Default)]
pub struct Joined {
    /// Portolan's plain SVP address.
    pub portolan: Option<String>,
    /// Portolan's SVP-over-TLS address.
    pub portolan_tls: Option<String>,
}

/// A joining host: resumes with `DIR/tls` when it holds an unexpired certificate, else joins
/// with `token` (required then).
pub async fn join(
    url_text: &str,
    token: Option<&str>,
    data: &Path,
    uuid: &str,
    underlay: IpAddr,
    hostname: &str,
) -> anyhow::Result<Option<Joined>> {
    let tls = tls_dir(data);
    let (url, addr) = control_url(url_text)?;
    let url_text = url_text.trim_end_matches('/');
    if let Ok(cert) = files::read(&tls.join("cert.pem")) {
        let der = pki::tls::pem_certs(&cert)?.remove(0);
        let alive = pki::tls::not_after(&der).is_some_and(|t| t > SystemTime::now());
        if alive && tls.join("key.pem").exists() && tls.join("ca.pem").exists() {
            tracing::info!(tls = %tls.display(), "resuming with this host's certificate");
            return Ok(None);
        }
        if token.is_none() {
            bail!(
                "this host's certificate in {} has expired: join again with --token (from `fabric token` on the head)",
                tls.display()
            );
        }
    }
    let Some(token) = token else {
        bail!(
            "joining {} needs --token TOKEN (run `fabric token --data DIR` on the head)",
            url_text
        );
    };
    let token = JoinToken::parse(token)?;
    if !url.tls {
        bail!(
            "--join {}: a cluster's control plane speaks https; expected --join https://HOST:PORT",
            url_text
        );
    }
    let config = pki::tls::pinned_client_config(token.ca_digest)?;
    let mut client = HttpClient::https(addr, pki::tls::server_name(&url.host)?, config);
    let (csr, key) = pki::ca::request(uuid)?;
    let body = serde_json::json!({
        "secret": pki::ca::hex(&token.secret),
        "csr": csr,
        "server_uuid": uuid,
        "underlay_ip": underlay.to_string(),
        "hostname": hostname,
    });
    let r = client
        .json("POST", "/join", Some(&body))
        .await
        .map_err(|e| anyhow!("joining {}: {}", url_text, one_line(&e.to_string())))?;
    if r.status != 200 {
        bail!(
            "the head at {} refused to join this host ({}): {}",
            url_text,
            r.status,
            r.message()
        );
    }
    let v = r.json();
    let (Some(cert), Some(ca)) = (v["certificate"].as_str(), v["ca"].as_str()) else {
        bail!(
            "the head at {} answered the join without a certificate",
            url_text
        );
    };
    if pki::sha256(&pki::tls::pem_certs(ca)?.remove(0)) != token.ca_digest {
        bail!(
            "the head at {} sent a CA certificate that is not the token's",
            url_text
        );
    }
    write_identity(&tls, ca, cert, &key)?;
    tracing::info!(tls = %tls.display(), "joined: host certificate written");
    Ok(Some(Joined {
        portolan: v["portolan"].as_str().map(String::from),
        portolan_tls: v["portolan_tls"].as_str().map(String::from),
    }))
}

/// A TLS failure's message on one line, with the reason a user can act on first.
fn one_line(s: &str) -> String {
    let s = s.replace('\n', " ");
    if let Some(i) = s.find("(sha256 ") {
        let digest: String = s[i + 8..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        return format!(
            "the head's certificate is not from the CA the token names (sha256 {digest}): wrong head, or a token of another cluster; nothing was sent"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (u, a) = control_url("https://127.0.0.1:8080/").unwrap();
        assert!(u.tls);
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(a, "127.0.0.1:8080".parse().unwrap());
        assert!(!control_url("http://127.0.0.1:8080").unwrap().0.tls);
        for bad in [
            "127.0.0.1:8080",
            "https://127.0.0.1",
            "https://h:1/x",
            "ftp://a:1",
        ] {
            assert!(control_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn head_identity_is_made_once_and_kept_while_fresh() {
        let d = std::env::temp_dir().join(format!("fabric-up-renew-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let ca = ClusterCa::create_or_load(&d).unwrap();
        // The head's identity is made once and kept while fresh.
        head_identity(&d, &ca, "u", Duration::from_secs(600)).unwrap();
        let first = files::read(&d.join("tls/cert.pem")).unwrap();
        head_identity(&d, &ca, "u", Duration::from_secs(600)).unwrap();
        assert_eq!(files::read(&d.join("tls/cert.pem")).unwrap(), first);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
