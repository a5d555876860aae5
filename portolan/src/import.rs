//! `portolan import`: load underlay and overlay mappings from JSON.
//!
//! ```json
//! {"underlay": [{"cn_uuid": "…", "ip": "192.168.1.1", "port": 4789}],
//!  "overlay":  [{"vnet_id": 12340, "ip": "10.0.0.1", "mac": "00:0a:95:9d:68:16", "cn_uuid": "…"}]}
//! ```
//!
//! Both lists are optional; `port` defaults to 4789 and an overlay entry may carry `"vlan"`.
//! Unknown fields are errors that name their path (`overlay[2].colour`). Everything is applied
//! in one transaction through the store's mapping operations, so hosts on the VNI get events:
//! a new mapping is created, one that differs from what is stored is moved, an identical one
//! is left alone (importing the same file twice changes nothing).

use std::fmt::Display;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

use crate::store::{self, CnUuid, OverlayMapping, Store, StoreError, UnderlayMapping};
use crate::svp::Mac;

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportFile {
    /// Hosts' underlay addresses.
    #[serde(default)]
    pub underlay: Vec<ImportUnderlay>,
    /// NICs' overlay mappings.
    #[serde(default)]
    pub overlay: Vec<ImportOverlay>,
}

/// One underlay entry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportUnderlay {
    /// The host.
    #[serde(deserialize_with = "from_str")]
    pub cn_uuid: CnUuid,
    /// Its underlay IP.
    pub ip: IpAddr,
    /// Its VXLAN port.
    #[serde(default = "vxlan_port")]
    pub port: u16,
}

/// One overlay entry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportOverlay {
    /// The VNI.
    pub vnet_id: u32,
    /// The overlay IP.
    pub ip: IpAddr,
    /// The NIC's MAC.
    #[serde(deserialize_with = "from_str")]
    pub mac: Mac,
    /// The host.
    #[serde(deserialize_with = "from_str")]
    pub cn_uuid: CnUuid,
    /// VLAN for VL3 events.
    #[serde(default)]
    pub vlan: u16,
}

fn vxlan_port() -> u16 {
    4789
}

fn from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// Why an import failed.
#[derive(Debug, Error)]
pub enum ImportError {
    /// The JSON does not have the expected shape.
    #[error("invalid import file at {path}: {message}")]
    Parse {
        /// Where in the document (`overlay[0].mac`, or `.` for the top).
        path: String,
        /// What was wrong.
        message: String,
    },
    /// The store failed; nothing was imported.
    #[error("import failed, nothing was written: {0}")]
    Store(#[from] StoreError),
}

/// Parses an import document; errors name the offending path.
pub fn parse(text: &str) -> Result<ImportFile, ImportError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| ImportError::Parse {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportSummary {
    /// Underlay mappings written.
    pub underlay: usize,
    /// Overlay mappings created.
    pub created: usize,
    /// Overlay mappings changed (moved).
    pub moved: usize,
    /// Overlay mappings already as in the file.
    pub unchanged: usize,
    /// Log events written.
    pub events: usize,
}

/// Applies `file` to `store` in one transaction.
pub fn apply(store: &dyn Store, file: &ImportFile) -> Result<ImportSummary, ImportError> {
    store::with_txn(store, |tx| {
        let mut sum = ImportSummary::default();
        for u in &file.underlay {
            tx.put_underlay(&UnderlayMapping {
                cn_uuid: u.cn_uuid,
                ip: u.ip,
                port: u.port,
            })?;
            sum.underlay += 1;
        }
        for o in &file.overlay {
            let m = OverlayMapping {
                vnet_id: o.vnet_id,
                ip: o.ip,
                mac: o.mac,
                cn_uuid: o.cn_uuid,
                vlan: o.vlan,
            };
            match tx.mapping(m.vnet_id, m.ip)? {
                Some(s) if !s.deleted && s.mapping == m => sum.unchanged += 1,
                Some(s) if !s.deleted => {
                    sum.events += tx.move_mapping(m.vnet_id, m.ip, &m)?.len();
                    sum.moved += 1;
                }
                _ => {
                    sum.events += tx.create_mapping(&m)?.len();
                    sum.created += 1;
                }
            }
        }
        Ok::<_, ImportError>(sum)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"underlay":[{"cn_uuid":"564d1a4c-0000-4000-8000-000000000001","ip":"192.168.1.1","port":4789}],
        "overlay":[{"vnet_id":12340,"ip":"10.0.0.1","mac":"00:0a:95:9d:68:16","cn_uuid":"564d1a4c-0000-4000-8000-000000000001"}]}"#;

    #[test]
    fn parses_the_documented_shape() {
        let f = parse(GOOD).unwrap();
        assert_eq!(f.underlay.len(), 1);
        assert_eq!(f.overlay[0].mac.to_string(), "00:0a:95:9d:68:16");
        assert_eq!(f.overlay[0].vlan, 0);
        assert_eq!(
            parse("{}").unwrap(),
            ImportFile {
                underlay: vec![],
                overlay: vec![]
            }
        );
    }

    #[test]
    fn errors_name_the_path() {
        let cases = [
            (
                r#"{"overlay":[{"vnet_id":1,"ip":"10.0.0.1","mac":"00:0a:95:9d:68:16","cn_uuid":"564d1a4c-0000-4000-8000-000000000001","colour":"red"}]}"#,
                "overlay[0].colour",
                "colour",
            ),
            (
                r#"{"overlay":[{"vnet_id":1,"ip":"10.0.0.1","mac":"nope","cn_uuid":"564d1a4c-0000-4000-8000-000000000001"}]}"#,
                "overlay[0].mac",
                "MAC",
            ),
            (
                r#"{"underlay":[{"cn_uuid":"x","ip":"192.168.1.1"}]}"#,
                "underlay[0].cn_uuid",
                "id",
            ),
            (
                r#"{"underlay":[{"cn_uuid":"564d1a4c-0000-4000-8000-000000000001","ip":"300.1.1.1"}]}"#,
                "underlay[0].ip",
                "address",
            ),
            (
                r#"{"overlays":[]}"#,
                "overlays",
                "expected `underlay` or `overlay`",
            ),
            (
                r#"{"overlay":[{"vnet_id":-1}]}"#,
                "overlay[0].vnet_id",
                "-1",
            ),
        ];
        for (text, path, word) in cases {
            match parse(text) {
                Err(ImportError::Parse { path: p, message }) => {
                    assert_eq!(p, path, "{text}: {message}");
                    assert!(message.contains(word), "{text}: {message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
