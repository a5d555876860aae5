//! FWAPI-style firewall rules (`/rules`): the rule object of `specs/fwrule.md` §1, validated by
//! the fwrule parser ([`crate::firewall::rule::FwRule::create`] with FWAPI's options: current
//! language version, subnet masks enforced, exactly one of `global` or `owner_uuid`), stored with
//! and returned in canonical text.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::firewall::rule::{FwRule, ParseOptions};

use super::changes::{self, Change};
use super::db::{lock_key, Db, Val, LOCK_RULE};
use super::error::{ApiError, FieldError, OpError};
use super::params::{page, parse_uuid, random_uuid, Params};

/// A stored rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rule {
    /// UUID.
    pub uuid: String,
    /// Canonical rule text.
    pub rule: String,
    /// Owner (absent for global rules).
    pub owner_uuid: Option<String>,
    /// Applies to every owner's VMs.
    pub global: bool,
    /// Compiled only when enabled.
    pub enabled: bool,
    /// Log matches.
    pub log: bool,
    /// `<ms since epoch>.<pid, 6 digits>`, changed on every write.
    pub version: String,
    /// Free text, at most 255 characters.
    pub description: Option<String>,
    /// Free text, at most 255 characters.
    pub created_by: Option<String>,
    /// VMs the rule names (for the `vm` filter).
    #[serde(default)]
    pub vms: Vec<String>,
}

impl Rule {
    /// FWAPI's serialized rule.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("uuid".into(), json!(self.uuid));
        m.insert("rule".into(), json!(self.rule));
        m.insert("enabled".into(), json!(self.enabled));
        m.insert("log".into(), json!(self.log));
        m.insert("version".into(), json!(self.version));
        if self.global {
            m.insert("global".into(), json!(true));
        }
        if let Some(o) = &self.owner_uuid {
            m.insert("owner_uuid".into(), json!(o));
        }
        if let Some(d) = &self.description {
            m.insert("description".into(), json!(d));
        }
        if let Some(c) = &self.created_by {
            m.insert("created_by".into(), json!(c));
        }
        Value::Object(m)
    }
}

fn version() -> String {
    let ms = super::now_us() / 1000;
    format!("{ms}.{:06}", std::process::id() % 1_000_000)
}

/// Parses rule text with FWAPI's options; the error names the field `rule`.
fn parse_rule(text: &str) -> Result<(String, Vec<String>), String> {
    let opts = ParseOptions {
        max_version: None,
        enforce_subnet_mask: true,
    };
    match FwRule::create(text, &opts) {
        Ok(r) => {
            let mut vms: Vec<String> = r.from.vms.iter().chain(r.to.vms.iter()).cloned().collect();
            vms.sort();
            vms.dedup();
            Ok((r.text(), vms))
        }
        Err(e) => Err(format!("{} error: {e}", e.class())),
    }
}

fn from_row(r: super::db::Row) -> Result<Rule, OpError> {
    super::db::doc_from_row(r, "rule")
}

/// Writes a rule: a new row (`creating`), or the existing one (404 if it is gone, never
/// re-created).
fn save(db: &mut Db<'_>, r: &Rule, creating: bool) -> Result<(), OpError> {
    let params = [
        Val::text(&r.uuid),
        Val::opt_text(r.owner_uuid.as_deref()),
        Val::text(serde_json::to_string(r)?),
    ];
    if creating {
        db.exec(
            "INSERT INTO napi_rules (uuid, owner_uuid, doc) VALUES ($1, $2, $3)",
            &params,
        )?;
    } else if db.exec(
        "UPDATE napi_rules SET owner_uuid = $1, doc = $2 WHERE uuid = $3",
        &[params[1].clone(), params[2].clone(), params[0].clone()],
    )? == 0
    {
        return Err(ApiError::not_found("rule not found").into());
    }
    Ok(())
}

/// Records a rule change in the feed (every server reads rule changes).
fn record(db: &mut Db<'_>, r: &Rule, action: &str) -> Result<(), OpError> {
    changes::record(
        db,
        &Change {
            kind: changes::kind::RULE,
            uuid: &r.uuid,
            action,
            owner_uuid: r.owner_uuid.as_deref(),
            servers: &[],
        },
    )
}

/// Takes the lock of the rule named in a URL (before reading it; see db.rs).
fn lock_rule(db: &mut Db<'_>, uuid: &str) -> Result<(), OpError> {
    match parse_uuid(uuid) {
        Some(u) => db.lock(lock_key(LOCK_RULE, &u)),
        None => Ok(()),
    }
}

/// The rule named in a URL, or 404.
pub fn find(db: &mut Db<'_>, uuid: &str) -> Result<Rule, OpError> {
    let Some(u) = parse_uuid(uuid) else {
        return Err(ApiError::not_found("rule not found").into());
    };
    db.query_opt(
        "SELECT doc FROM napi_rules WHERE uuid = $1",
        &[Val::text(u)],
    )?
    .map(from_row)
    .transpose()?
    .ok_or_else(|| ApiError::not_found("rule not found").into())
}

const WRITE_PARAMS: &[&str] = &[
    "rule",
    "owner_uuid",
    "global",
    "enabled",
    "log",
    "description",
    "created_by",
    "uuid",
    "version",
];

/// Applies the writable fields of `p` to `r`; checks the global/owner rule.
fn apply(p: &mut Params, r: &mut Rule, creating: bool) -> Result<(), ApiError> {
    p.allow_only(WRITE_PARAMS);
    let text = p.string("rule");
    let text = if creating {
        p.require("rule", text)
    } else {
        text
    };
    let owner = p.uuid("owner_uuid");
    let global = p.boolean("global");
    let enabled = p.boolean("enabled");
    let log = p.boolean("log");
    let description = p.text("description", 255);
    let created_by = p.text("created_by", 255);
    if !creating && p.has("uuid") {
        p.invalid("uuid", "uuid cannot be changed");
    }
    if let Some(t) = &text {
        match parse_rule(t) {
            Ok((canon, vms)) => {
                r.rule = canon;
                r.vms = vms;
            }
            Err(e) => p.invalid("rule", e),
        }
    }
    p.finish()?;
    if let Some(o) = owner {
        r.owner_uuid = Some(o);
        if global.is_none() {
            r.global = false;
        }
    }
    if let Some(g) = global {
        r.global = g;
        if g && p.raw("owner_uuid").is_none() && !creating {
            r.owner_uuid = None;
        }
    }
    if r.global == r.owner_uuid.is_some() {
        let msg = if r.global {
            "owner_uuid and global cannot both be set"
        } else {
            "one of owner_uuid or global must be set"
        };
        return Err(ApiError::invalid_params(vec![
            FieldError::invalid("global", msg),
            FieldError::invalid("owner_uuid", msg),
        ]));
    }
    if let Some(x) = enabled {
        r.enabled = x;
    }
    if let Some(x) = log {
        r.log = x;
    }
    if let Some(x) = description {
        r.description = Some(x);
    }
    if let Some(x) = created_by {
        r.created_by = Some(x);
    }
    r.version = version();
    Ok(())
}

/// CreateRule.
pub fn create(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    let uuid = p.uuid("uuid");
    let mut r = Rule {
        uuid: String::new(),
        rule: String::new(),
        owner_uuid: None,
        global: false,
        enabled: false,
        log: false,
        version: String::new(),
        description: None,
        created_by: None,
        vms: Vec::new(),
    };
    apply(p, &mut r, true)?;
    r.uuid = match uuid {
        Some(u) => u,
        None => random_uuid().map_err(|e| OpError::Corrupt(format!("random: {e}")))?,
    };
    db.lock(lock_key(LOCK_RULE, &r.uuid))?;
    if db
        .query_opt(
            "SELECT uuid FROM napi_rules WHERE uuid = $1",
            &[Val::text(&r.uuid)],
        )?
        .is_some()
    {
        return Err(ApiError::invalid_params(vec![FieldError::duplicate(
            "uuid",
            "Already exists",
        )])
        .into());
    }
    save(db, &r, true)?;
    record(db, &r, "create")?;
    Ok(r.to_json())
}

/// UpdateRule.
pub fn update(db: &mut Db<'_>, uuid: &str, p: &mut Params) -> Result<Value, OpError> {
    lock_rule(db, uuid)?;
    let mut r = find(db, uuid)?;
    apply(p, &mut r, false)?;
    save(db, &r, false)?;
    record(db, &r, "update")?;
    Ok(r.to_json())
}

/// DeleteRule.
pub fn delete(db: &mut Db<'_>, uuid: &str) -> Result<(), OpError> {
    lock_rule(db, uuid)?;
    let r = find(db, uuid)?;
    db.exec(
        "DELETE FROM napi_rules WHERE uuid = $1",
        &[Val::text(&r.uuid)],
    )?;
    record(db, &r, "delete")
}

/// ListRules: `owner_uuid` (that owner's rules and global rules), `vm` (rules naming the VM),
/// `global`, `enabled`, `limit`, `offset`; by UUID.
pub fn list(db: &mut Db<'_>, p: &mut Params) -> Result<Value, OpError> {
    p.allow_only(&["owner_uuid", "vm", "global", "enabled", "limit", "offset"]);
    let owner = p.uuid("owner_uuid");
    let vm = p.uuid("vm");
    let global = p.boolean("global");
    let enabled = p.boolean("enabled");
    let (limit, offset) = p.pagination();
    p.finish()?;
    let rules: Vec<Value> = db
        .query("SELECT doc FROM napi_rules ORDER BY uuid", &[])?
        .into_iter()
        .map(from_row)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|r| owner.is_none() || r.global || r.owner_uuid == owner)
        .filter(|r| vm.as_ref().is_none_or(|v| r.vms.contains(v)))
        .filter(|r| global.is_none_or(|g| r.global == g))
        .filter(|r| enabled.is_none_or(|e| r.enabled == e))
        .map(|r| r.to_json())
        .collect();
    Ok(Value::Array(page(rules, limit, offset)))
}
