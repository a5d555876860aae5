//! Host certificate renewal: once the certificate in `--tls-dir` is two thirds through its
//! life, the agent makes a new key here, sends a certificate request for it on its connection
//! (`POST /servers/:own/certificate`, allowed only for its own UUID) and replaces `key.pem` and
//! `cert.pem`. Its connection (and the dataplane's Portolan session) pick the new pair up when
//! they next connect; the control plane drops connections whose certificate expired, so that
//! happens at the latest when the old one expires. A failure is retried (1 s doubling to
//! 30 s) until the certificate expires, and after.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::api::Api;
use crate::pki::{ca, files, tls};

/// Longest wait between two looks at the certificate (a renewal by hand is noticed).
const LOOK_EVERY: Duration = Duration::from_secs(60);
/// Retry delays after a failed renewal.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// When the certificate in `dir` is due for renewal (`None`: unreadable, so now).
fn due_at(dir: &Path) -> Option<SystemTime> {
    let pem = files::read(&dir.join("cert.pem")).ok()?;
    let der = tls::pem_certs(&pem).ok()?.into_iter().next()?;
    tls::renewal_at(&der)
}

/// One renewal: a new key and request, the answer checked against the key, then the files.
async fn renew_once(api: &Api, dir: &Path, server: &str) -> anyhow::Result<String> {
    let (csr, key) = ca::request(server)?;
    let cert = api.renew(&csr).await?;
    // The answer must be a certificate for this key from our CA before it replaces anything.
    let ca_pem = files::read(&dir.join("ca.pem"))?;
    tls::client_config_from(&ca_pem, &cert, &key)?;
    files::write_key(&dir.join("key.pem"), &key)?;
    files::write_cert(&dir.join("cert.pem"), &cert)?;
    let der = tls::pem_certs(&cert)?.remove(0);
    Ok(tls::serial_of(&der).unwrap_or_default())
}

/// Renews the certificate in `dir` whenever it is due, forever.
pub async fn run(api: Api, dir: PathBuf, server: String) {
    let mut retry = RETRY_MIN;
    loop {
        let now = SystemTime::now();
        let due = due_at(&dir);
        if due.is_some_and(|t| t > now) {
            let wait = due
                .and_then(|t| t.duration_since(now).ok())
                .unwrap_or_default()
                .min(LOOK_EVERY);
            tokio::time::sleep(wait).await;
            continue;
        }
        match renew_once(&api, &dir, &server).await {
            Ok(serial) => {
                tracing::info!(serial = %serial, tls = %dir.display(), "host certificate renewed");
                retry = RETRY_MIN;
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry = ?retry, "renewing the host certificate failed");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}
