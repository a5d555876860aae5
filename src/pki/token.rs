//! Join tokens: `FABRIC1-<sha256 of the cluster CA certificate, 64 hex>-<secret, 32 hex>`.
//!
//! The digest lets a joining host authenticate the head before it sends anything (Docker
//! Swarm's `SWMTKN-1-<digest>-<secret>`); the secret, kept in `DIR/pki/join-secret` (0600) on
//! the head, lets the head authenticate the joining host. `--rotate` writes a new secret: tokens
//! carrying the old one stop working at once (the head reads the file at every join), hosts
//! that already joined keep their certificates.

use std::path::Path;

use super::ca::{hex, pki_dir, ClusterCa};
use super::{files, PkiError};

const PREFIX: &str = "FABRIC1-";
const SECRET_BYTES: usize = 16;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the cluster CA certificate (DER).
    pub ca_digest: [u8; 32],
    /// The join secret.
    pub secret: [u8; SECRET_BYTES],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, not even in a debug log.
        f.debug_struct("JoinToken")
            .field("ca_digest", &hex(&self.ca_digest))
            .finish_non_exhaustive()
    }
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl JoinToken {
    /// Parses a token, saying what is wrong with a bad one (never echoing the secret).
    pub fn parse(s: &str) -> Result<JoinToken, PkiError> {
        let bad = |why: &str| {
            PkiError::Token(format!(
                "{why}: expected FABRIC1-<64 hex digits>-<32 hex digits>, as `fabric token` prints"
            ))
        };
        let rest = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("not a fabric join token"))?;
        let (d, sec) = rest
            .split_once('-')
            .ok_or_else(|| bad("the token has no secret part"))?;
        let ca_digest = unhex::<32>(d).ok_or_else(|| bad("the token's CA digest is malformed"))?;
        let secret =
            unhex::<SECRET_BYTES>(sec).ok_or_else(|| bad("the token's secret is malformed"))?;
        Ok(JoinToken { ca_digest, secret })
    }

    /// The printed form.
    pub fn render(&self) -> String {
        format!("{PREFIX}{}-{}", hex(&self.ca_digest), hex(&self.secret))
    }
}

fn secret_path(data: &Path) -> std::path::PathBuf {
    pki_dir(data).join("join-secret")
}

/// The head's current join secret, made on first use.
pub fn secret(data: &Path) -> Result<[u8; SECRET_BYTES], PkiError> {
    let p = secret_path(data);
    if p.exists() {
        let s = files::read(&p)?;
        unhex::<SECRET_BYTES>(s.trim()).ok_or_else(|| {
            PkiError::Token(format!(
                "{} is malformed: run `fabric token --rotate` to make a new secret",
                p.display()
            ))
        })
    } else {
        rotate(data)
    }
}

/// Replaces the join secret (old tokens stop working).
pub fn rotate(data: &Path) -> Result<[u8; SECRET_BYTES], PkiError> {
    let mut s = [0u8; SECRET_BYTES];
    getrandom::getrandom(&mut s).map_err(|e| PkiError::Token(format!("no randomness: {e}")))?;
    files::write_key(&secret_path(data), &format!("{}\n", hex(&s)))?;
    Ok(s)
}

/// The current token of the head whose data directory is `data`.
pub fn current(data: &Path, ca: &ClusterCa) -> Result<JoinToken, PkiError> {
    Ok(JoinToken {
        ca_digest: ca.digest(),
        secret: secret(data)?,
    })
}

/// Whether `given` is the head's current secret (constant time).
pub fn check_secret(data: &Path, given: &str) -> Result<bool, PkiError> {
    let want = secret(data)?;
    let Some(given) = unhex::<SECRET_BYTES>(given.trim()) else {
        return Ok(false);
    };
    Ok(want
        .iter()
        .zip(given.iter())
        .fold(0u8, |a, (x, y)| a | (x ^ y))
        == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_clear_errors() {
        let t = JoinToken {
            ca_digest: [0xab; 32],
            secret: [7; 16],
        };
        let s = t.render();
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_eq!(JoinToken::parse(&format!("  {s}\n")).unwrap(), t);
        for (bad, why) in [
            ("", "not a fabric join token"),
            ("SWMTKN-1-abc-def", "not a fabric join token"),
            ("FABRIC1-abcd", "no secret part"),
            ("FABRIC1-zz-00", "CA digest is malformed"),
            (&s[..s.len() - 1], "secret is malformed"),
        ] {
            let e = JoinToken::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(!format!("{t:?}").contains("0707"), "the secret never shows");
    }

    #[test]
    fn rotate_replaces_the_secret() {
        let d = std::env::temp_dir().join(format!("fabric-token-{}", std::process::id()));
        let a = secret(&d).unwrap();
        assert_eq!(secret(&d).unwrap(), a);
        assert!(check_secret(&d, &hex(&a)).unwrap());
        let b = rotate(&d).unwrap();
        assert_ne!(a, b);
        assert!(!check_secret(&d, &hex(&a)).unwrap());
        assert!(check_secret(&d, &hex(&b)).unwrap());
        assert!(!check_secret(&d, "nonsense").unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,120}") {
            let _ = JoinToken::parse(&s);
        }
    }
}
