//! `fabric account add|cert|ls|rm`: the operator's commands for Docker accounts, over the
//! control API (on the head: `--data DIR`, through `DIR/control.sock`; elsewhere `--control
//! https://HEAD:8080 --tls-dir OPERATOR_DIR`). They never open the store or the CA keys: the
//! running head signs. The account's key is made here and never sent anywhere; the head signs a
//! certificate request for it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail};
use serde_json::{json, Value};

use crate::control::cli::{call, list, refusal, runtime, table, text, ControlUrl};
use crate::pki::files;

/// `fabric account …`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum AccountCmd {
    /// Create a Docker account (an owner UUID, a login, a default network) and write its
    /// client certificate into --cert-dir: ca.pem, cert.pem, key.pem, as the docker CLI reads
    /// them with DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH=DIR.
    Add(CertArgs),
    /// Issue another certificate for an existing account (e.g. a second machine, or before the
    /// first expires).
    Cert(CertArgs),
    /// List the accounts: login, UUID, created, certificates, state.
    Ls {
        #[command(flatten)]
        control: ControlUrl,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an account: every certificate it has is refused from then on (open connections
    /// are closed within a second). Its networks and images stay, owned by its UUID; the
    /// login is never given out again.
    Rm {
        /// The account's login.
        login: String,
        #[command(flatten)]
        control: ControlUrl,
    },
}

/// Arguments of `fabric account add` and `fabric account cert`.
#[derive(clap::Args, Debug, Clone)]
pub struct CertArgs {
    /// The account's login (1 to 64 characters: a letter, then letters, digits, _ . @ -).
    pub login: String,
    /// Where to write ca.pem, cert.pem and key.pem (created if missing; key.pem mode 0600).
    #[arg(long, value_name = "DIR", alias = "out")]
    pub cert_dir: PathBuf,
    /// How long the certificate is valid (e.g. 90d, 12h).
    #[arg(long, value_name = "DURATION", default_value = "365d",
          value_parser = crate::pki::cli::parse_lifetime)]
    pub lifetime: Duration,
    #[command(flatten)]
    pub control: ControlUrl,
}

/// Runs `fabric account …`; returns what to print.
pub fn account(cmd: AccountCmd) -> anyhow::Result<String> {
    runtime()?.block_on(async move {
        match cmd {
            AccountCmd::Add(a) => {
                check_login(&a.login)?;
                let r = call(
                    &a.control,
                    "POST",
                    "/accounts",
                    Some(&json!({"login": a.login})),
                )
                .await?;
                if r.status != 200 {
                    bail!("creating account {}: {}", a.login, refusal(&r));
                }
                let acct = r.json();
                let issued = issue(&a).await?;
                Ok(format!(
                    "account {} created (UUID {}, default network {})\n{issued}",
                    a.login,
                    text(&acct, "uuid"),
                    text(&acct, "default_network"),
                ))
            }
            AccountCmd::Cert(a) => {
                check_login(&a.login)?;
                issue(&a).await
            }
            AccountCmd::Ls { control, json } => {
                list(&control, "/accounts", "accounts", json, render).await
            }
            AccountCmd::Rm { login, control } => {
                check_login(&login)?;
                let r = call(&control, "DELETE", &format!("/accounts/{login}"), None).await?;
                match r.status {
                    204 => Ok(format!(
                        "account {login} removed: its certificates are refused from now on\n"
                    )),
                    _ => Err(anyhow!("removing account {login}: {}", refusal(&r))),
                }
            }
        }
    })
}

fn check_login(login: &str) -> anyhow::Result<()> {
    if super::accounts::valid_login(login) {
        Ok(())
    } else {
        Err(anyhow!(
            "login {login:?}: expected 1 to 64 characters, a letter first, then letters, digits, _ . @ -"
        ))
    }
}

/// A key made here, a certificate for it signed by the head, the three files written.
async fn issue(a: &CertArgs) -> anyhow::Result<String> {
    let (csr, key) = crate::pki::ca::request(&a.login)?;
    let r = call(
        &a.control,
        "POST",
        &format!("/accounts/{}/certificates", a.login),
        Some(&json!({"csr": csr, "lifetime_secs": a.lifetime.as_secs()})),
    )
    .await?;
    if r.status != 200 {
        bail!(
            "issuing a certificate for account {}: {}",
            a.login,
            refusal(&r)
        );
    }
    let v = r.json();
    let (Some(cert), Some(ca)) = (v["certificate"].as_str(), v["ca"].as_str()) else {
        bail!("the head's answer has no certificate: {v}");
    };
    write_trio(&a.cert_dir, ca, cert, &key)?;
    let host = v["docker_host"].as_str().unwrap_or("tcp://HEAD:2376");
    Ok(format!(
        "certificate {} for {} (valid until {}) written to {} (ca.pem, cert.pem, key.pem)\n\
         use it with:\n  export DOCKER_HOST={host} DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH={}\n",
        text(&v, "serial"),
        a.login,
        text(&v, "not_after"),
        a.cert_dir.display(),
        a.cert_dir.display(),
    ))
}

fn write_trio(dir: &Path, ca: &str, cert: &str, key: &str) -> anyhow::Result<()> {
    files::write_cert(&dir.join("ca.pem"), ca)?;
    files::write_key(&dir.join("key.pem"), key)?;
    files::write_cert(&dir.join("cert.pem"), cert)?;
    Ok(())
}

/// The text of `fabric account ls`.
pub fn render(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    vec![
                        text(x, "login"),
                        text(x, "uuid"),
                        text(x, "created"),
                        text(x, "certificates"),
                        if x["removed"].is_null() {
                            "active".to_string()
                        } else {
                            format!("removed {}", text(x, "removed"))
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["LOGIN", "UUID", "CREATED", "CERTS", "STATE"], &rows)
}
