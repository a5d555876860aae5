//! `fabric token` and `fabric cert admin`: run on the head, against its data directory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::ca::{ClusterCa, DEFAULT_CERT_LIFETIME};
use super::{files, token};

/// `fabric token` arguments.
#[derive(clap::Args, Debug, Clone)]
#[command(after_long_help = "\
A join token is FABRIC1-<sha256 of the cluster CA certificate>-<secret>. The joining host checks
the head's certificate against the digest before it sends anything, then proves itself with the
secret:
    fabric up --data DIR --underlay IP --join https://HEAD:8080 --token FABRIC1-...
--rotate replaces the secret: tokens printed before stop working at once; hosts that already
joined keep their certificates.")]
pub struct TokenArgs {
    /// The head's data directory (the one `fabric up` runs on).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Make a new secret (old tokens stop working) and print the new token.
    #[arg(long)]
    pub rotate: bool,
}

/// `fabric token`.
pub fn token(args: &TokenArgs) -> anyhow::Result<()> {
    let ca = ClusterCa::load(&args.data)?;
    if args.rotate {
        token::rotate(&args.data).context("rotating the join secret")?;
        eprintln!("join secret rotated: tokens printed before no longer work; joined hosts are unaffected");
    }
    println!("{}", token::current(&args.data, &ca)?.render());
    Ok(())
}

/// `fabric cert` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum CertCmd {
    /// Write an operator certificate of the cluster CA (ca.pem, cert.pem, key.pem in OUTDIR,
    /// the key mode 0600): for `curl --cacert OUTDIR/ca.pem --cert OUTDIR/cert.pem --key
    /// OUTDIR/key.pem https://HEAD:8080/...` and `fabric ... --control https://HEAD:8080
    /// --tls-dir OUTDIR`. Run it on the head.
    Admin(AdminArgs),
    /// List the operator certificates issued on this head (name, serial, expiry, revoked).
    Ls {
        /// The head's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
    /// Revoke a certificate by serial number (as `fabric cert ls` shows it): the head refuses
    /// it from then on (within a second) and closes its open connections. Hosts are removed with
    /// `fabric server remove` instead.
    Revoke {
        /// The serial number (hex).
        serial: String,
        /// The head's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
}

fn issued_path(data: &std::path::Path) -> PathBuf {
    super::ca::pki_dir(data).join("operators")
}

fn revoked_path(data: &std::path::Path) -> PathBuf {
    super::ca::pki_dir(data).join("revoked-serials")
}

/// The revoked serials in `path` (a missing file: none).
pub fn read_revoked(
    path: &std::path::Path,
) -> Result<std::collections::HashSet<String>, super::PkiError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s
            .lines()
            .map(|l| l.trim().to_ascii_lowercase())
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(super::PkiError::io(path, e)),
    }
}

/// `fabric cert admin` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminArgs {
    /// The head's data directory.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Where to write ca.pem, cert.pem and key.pem (created if missing).
    #[arg(long, value_name = "OUTDIR")]
    pub out: PathBuf,
    /// The operator's name (the certificate's common name).
    #[arg(long, default_value = "admin")]
    pub name: String,
    /// How long the certificate is valid (e.g. 90s, 10m, 12h, 30d).
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_lifetime)]
    pub lifetime: Duration,
}

/// `fabric cert ...`.
pub fn cert(cmd: &CertCmd) -> anyhow::Result<()> {
    match cmd {
        CertCmd::Admin(a) => {
            let ca = ClusterCa::load(&a.data)?;
            let (cert, key) = ca.issue_operator(&a.name, a.lifetime)?;
            files::write_cert(&a.out.join("ca.pem"), ca.ca_pem())?;
            files::write_key(&a.out.join("key.pem"), &key)?;
            files::write_cert(&a.out.join("cert.pem"), &cert)?;
            // Remembered for `fabric cert ls` and `fabric cert revoke`.
            let der = super::tls::pem_certs(&cert)?.remove(0);
            let serial = super::tls::serial_of(&der).unwrap_or_default();
            let line = format!(
                "{serial} {} {}\n",
                a.name.replace(char::is_whitespace, "_"),
                render_lifetime(a.lifetime)
            );
            let issued = issued_path(&a.data);
            let old = std::fs::read_to_string(&issued).unwrap_or_default();
            files::write(&issued, &(old + &line), 0o600)?;
            println!(
                "operator certificate for {:?} (serial {serial}) written to {} (ca.pem, cert.pem, key.pem), valid {}",
                a.name,
                a.out.display(),
                render_lifetime(a.lifetime)
            );
            Ok(())
        }
        CertCmd::Ls { data } => {
            ClusterCa::load(data)?;
            let revoked = read_revoked(&revoked_path(data))?;
            let issued = std::fs::read_to_string(issued_path(data)).unwrap_or_default();
            println!("{:<34}  {:<20}  {:<9}  STATE", "SERIAL", "NAME", "LIFETIME");
            for l in issued.lines() {
                let mut f = l.split_whitespace();
                let (Some(serial), Some(name), Some(life)) = (f.next(), f.next(), f.next()) else {
                    continue;
                };
                let state = if revoked.contains(serial) {
                    "revoked"
                } else {
                    "issued"
                };
                println!("{serial:<34}  {name:<20}  {life:<9}  {state}");
            }
            Ok(())
        }
        CertCmd::Revoke { serial, data } => {
            ClusterCa::load(data)?;
            let s = serial.trim().to_ascii_lowercase().replace(':', "");
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_hexdigit()) || s.len() > 40 {
                anyhow::bail!("{serial:?}: expected a certificate serial number in hex, as `fabric cert ls` shows it");
            }
            let path = revoked_path(data);
            let mut revoked = read_revoked(&path)?;
            if !revoked.insert(s.clone()) {
                println!("certificate {s} was already revoked");
                return Ok(());
            }
            let mut all: Vec<String> = revoked.into_iter().collect();
            all.sort();
            files::write(&path, &(all.join("\n") + "\n"), 0o644)?;
            println!("certificate {s} revoked: the head refuses it within a second and closes its connections");
            Ok(())
        }
    }
}

/// Parses `90s`, `10m`, `12h`, `30d` (a bare number is seconds). At least 60 s: a shorter
/// certificate could expire before it is used.
pub fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with a unit, e.g. 90s, 10m, 12h, 30d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}: expected s, m, h or d"
            ))
        }
    };
    let secs = n
        .checked_mul(mult)
        .filter(|&v| v <= 10 * 365 * 86_400)
        .ok_or_else(|| format!("{s:?}: at most 10 years"))?;
    if secs < 60 {
        return Err(format!("{s:?}: at least 60 seconds"));
    }
    Ok(Duration::from_secs(secs))
}

/// `30d`, `1m`, ... for messages.
pub fn render_lifetime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The default `--cert-lifetime`.
pub fn default_lifetime() -> Duration {
    DEFAULT_CERT_LIFETIME
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_lifetime("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_lifetime("90"), Ok(Duration::from_secs(90)));
        assert!(parse_lifetime("59s").unwrap_err().contains("at least 60"));
        assert!(parse_lifetime("3w").unwrap_err().contains("unknown unit"));
        assert!(parse_lifetime("").is_err());
        assert!(parse_lifetime("99999999999999d").is_err());
        assert_eq!(render_lifetime(Duration::from_secs(30 * 86_400)), "30d");
        assert_eq!(render_lifetime(Duration::from_secs(90)), "90s");
    }
}
