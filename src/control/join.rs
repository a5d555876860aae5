//! Joining the cluster and renewing host certificates (the head only: it holds the cluster CA).
//!
//! `POST /join` (the one route a client without a certificate may use): `secret` (the token's),
//! `csr` (PEM; the key stays on the host), `server_uuid`, `underlay_ip`, `hostname`. With the
//! right secret the server is registered (as `PUT /servers/:uuid`, in the same transaction) and
//! the answer carries its host certificate, the CA certificate and Portolan's addresses. A
//! wrong or rotated secret is 401 and registers nothing; a removed server's UUID is 410.
//!
//! `POST /servers/:uuid/certificate` (`csr`): a host renews its own certificate before it
//! expires (the route policy lets a host certificate do it for its own UUID only).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portolan::store::Txn;
use serde_json::{json, Map, Value};

use super::db::Db;
use super::error::{ApiError, OpError};
use super::params::{parse_uuid, Params};
use super::{servers, Config};
use crate::pki::ca::ClusterCa;

/// What the head needs to admit hosts.
#[derive(Clone)]
pub struct ClusterPki {
    /// The cluster CA (with its key).
    pub ca: Arc<ClusterCa>,
    /// The head's data directory (the join secret is read from it at every join, so a
    /// rotation by `fabric token --rotate` applies at once).
    pub data: PathBuf,
    /// Lifetime of the host certificates issued.
    pub cert_lifetime: Duration,
    /// Portolan's SVP-over-TLS address, told to joining hosts.
    pub portolan_tls: Option<String>,
}

impl std::fmt::Debug for ClusterPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterPki")
            .field("ca", &self.ca)
            .field("data", &self.data)
            .field("cert_lifetime", &self.cert_lifetime)
            .finish()
    }
}

fn pki(cfg: &Config) -> Result<&ClusterPki, ApiError> {
    cfg.cluster.as_ref().ok_or_else(|| {
        ApiError::not_found(
            "this control plane has no cluster CA: hosts join the head that `fabric up` started",
        )
    })
}

fn issue(pki: &ClusterPki, csr: &str, uuid: &str) -> Result<String, OpError> {
    pki.ca
        .issue_host(csr, uuid, pki.cert_lifetime)
        .map_err(|e| match e {
            crate::pki::PkiError::Request(m) => ApiError::invalid("csr", m).into(),
            e => OpError::Corrupt(format!("issuing a host certificate: {e}")),
        })
}

fn answer(cfg: &Config, pki: &ClusterPki, uuid: &str, cert: String) -> Value {
    json!({
        "server_uuid": uuid,
        "certificate": cert,
        "ca": pki.ca.ca_pem(),
        "portolan": cfg.portolan_advertise,
        "portolan_tls": pki.portolan_tls,
        "expires_in_s": pki.cert_lifetime.as_secs(),
    })
}

/// `POST /join`.
pub fn join(tx: &mut dyn Txn, cfg: &Config, p: &mut Params) -> Result<Value, OpError> {
    let pki = pki(cfg)?;
    p.allow_only(&["secret", "csr", "server_uuid", "underlay_ip", "hostname"]);
    let secret = p.string("secret");
    let secret = p.require("secret", secret);
    let csr = p.string("csr");
    let csr = p.require("csr", csr);
    let uuid = p.string("server_uuid");
    let uuid = p.require("server_uuid", uuid);
    p.finish()?;
    let (secret, csr, uuid) = (
        secret.unwrap_or_default(),
        csr.unwrap_or_default(),
        uuid.unwrap_or_default(),
    );
    let ok = crate::pki::token::check_secret(&pki.data, &secret)
        .map_err(|e| OpError::Corrupt(format!("the join secret: {e}")))?;
    if !ok {
        return Err(ApiError::join_refused(
            401,
            "the join token's secret is wrong or was rotated: ask the operator for a current `fabric token`",
        )
        .into());
    }
    let Some(uuid) = parse_uuid(&uuid) else {
        return Err(ApiError::invalid("server_uuid", "expected a UUID").into());
    };
    let mut m = Map::new();
    for k in ["underlay_ip", "hostname"] {
        if let Some(v) = p.raw(k) {
            m.insert(k.into(), v.clone());
        }
    }
    // A joining host names its own UUID; one already registered may only join again from its
    // registered address (a host whose certificate expired). Taking over another server's
    // identity would give its VMs and its feed to whoever holds a token.
    let existing = servers::get(&mut Db::from(tx.raw()), &uuid)?;
    if let Some(old) = &existing {
        let asked = p.raw("underlay_ip").and_then(|v| v.as_str()).unwrap_or("");
        if asked.parse::<std::net::IpAddr>().ok() != Some(old.underlay_ip) {
            return Err(ApiError::join_refused(
                409,
                format!(
                    "server {uuid} is already registered with underlay {}: a host joins again only from its own address; a new host needs a new identity (remove DIR/server-uuid)",
                    old.underlay_ip
                ),
            )
            .into());
        }
    }
    // An existing server re-joins under the host rules (same underlay, in the lock).
    servers::put(tx, cfg, &uuid, &mut Params::from_map(m), existing.is_some())?;
    let cert = issue(pki, &csr, &uuid)?;
    tracing::info!(server_uuid = %uuid, "a host joined");
    Ok(answer(cfg, pki, &uuid, cert))
}

/// `POST /servers/:uuid/certificate`.
pub fn renew(db: &mut Db<'_>, cfg: &Config, uuid: &str, p: &mut Params) -> Result<Value, OpError> {
    let pki = pki(cfg)?;
    p.allow_only(&["csr"]);
    let csr = p.string("csr");
    let csr = p.require("csr", csr);
    p.finish()?;
    let uuid = parse_uuid(uuid).ok_or_else(|| ApiError::not_found("server not found"))?;
    servers::find_member(db, &uuid, &format!("POST /servers/{uuid}/certificate"))?;
    let cert = issue(pki, &csr.unwrap_or_default(), &uuid)?;
    tracing::info!(server_uuid = %uuid, "host certificate renewed");
    Ok(answer(cfg, pki, &uuid, cert))
}
