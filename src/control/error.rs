//! Restify-style API errors, as NAPI sends them (`specs/napi-docker.md` §1.1).
//!
//! Every error body is `{"code": ..., "message": ...}`, plus `errors` (per-field entries, sorted
//! by field) for validation and in-use errors, plus any extra fields (`network_uuid` on
//! `SubnetFull`).

use serde::Serialize;
use serde_json::{Map, Value};
use thiserror::Error;

/// One entry of an error's `errors` array.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldError {
    /// The parameter (a string; an array of names for `UnknownParameters`).
    pub field: Value,
    /// `MissingParameter`, `InvalidParameter`, `Duplicate`, `UsedBy`, `UnknownParameters`.
    pub code: &'static str,
    /// What was wrong.
    pub message: String,
    /// For `UsedBy`: the kind of object using it.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// For `UsedBy`: the id of the object using it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The offending values, when there are several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<Vec<Value>>,
}

impl FieldError {
    /// `InvalidParameter` on `field`.
    pub fn invalid(field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            field: Value::String(field.to_string()),
            code: "InvalidParameter",
            message: message.into(),
            kind: None,
            id: None,
            invalid: None,
        }
    }

    /// `MissingParameter` on `field`.
    pub fn missing(field: &str) -> FieldError {
        FieldError {
            code: "MissingParameter",
            ..FieldError::invalid(field, "Missing parameter")
        }
    }

    /// `Duplicate` on `field`.
    pub fn duplicate(field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            code: "Duplicate",
            ..FieldError::invalid(field, message)
        }
    }

    /// `UsedBy` on `field`: `kind` `id` holds it.
    pub fn used_by(field: &str, kind: &str, id: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            code: "UsedBy",
            kind: Some(kind.to_string()),
            id: Some(id.to_string()),
            ..FieldError::invalid(field, message)
        }
    }

    /// `UsedBy` without a field (the in-use entries of a refused delete).
    pub fn used_by_no_field(kind: &str, id: &str, message: impl Into<String>) -> FieldError {
        let mut e = FieldError::used_by("", kind, id, message);
        e.field = Value::Null;
        e
    }

    /// `UnknownParameters` for `names` (sorted).
    pub fn unknown(names: Vec<String>) -> FieldError {
        let message = format!("Unknown parameters: {}", names.join(", "));
        FieldError {
            field: Value::Array(names.into_iter().map(Value::String).collect()),
            code: "UnknownParameters",
            message,
            kind: None,
            id: None,
            invalid: None,
        }
    }

    fn sort_key(&self) -> String {
        match &self.field {
            Value::String(s) => s.clone(),
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            _ => String::new(),
        }
    }
}

/// An error answered to an API client. `Display` is the message; the body is [`ApiError::body`].
#[derive(Debug, Clone, Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Restify error code (`InvalidParameters`, `ResourceNotFound`, ...).
    pub code: &'static str,
    /// Human message.
    pub message: String,
    /// Per-field entries (omitted from the body when empty, except for validation errors).
    pub errors: Vec<FieldError>,
    /// Whether `errors` is part of the body even when empty.
    pub with_errors: bool,
    /// Extra top-level body fields.
    pub extra: Map<String, Value>,
}

impl ApiError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            errors: Vec::new(),
            with_errors: false,
            extra: Map::new(),
        }
    }

    /// 422 `InvalidParameters` with `errors` sorted by field; the message is "Missing
    /// parameters" when every entry is a `MissingParameter`.
    pub fn invalid_params(mut errors: Vec<FieldError>) -> ApiError {
        errors.sort_by_key(FieldError::sort_key);
        let message = if !errors.is_empty() && errors.iter().all(|e| e.code == "MissingParameter") {
            "Missing parameters"
        } else {
            "Invalid parameters"
        };
        ApiError {
            errors,
            with_errors: true,
            ..ApiError::new(422, "InvalidParameters", message)
        }
    }

    /// 422 `InvalidParameters` with a specific message (e.g. "name is in use by another network").
    pub fn invalid_params_msg(message: impl Into<String>, errors: Vec<FieldError>) -> ApiError {
        let mut e = ApiError::invalid_params(errors);
        e.message = message.into();
        e
    }

    /// One invalid field.
    pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid_params(vec![FieldError::invalid(field, message)])
    }

    /// 404 `ResourceNotFound`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, "ResourceNotFound", message)
    }

    /// 422 `InUse` with its entries.
    pub fn in_use(message: impl Into<String>, errors: Vec<FieldError>) -> ApiError {
        ApiError {
            errors,
            with_errors: true,
            ..ApiError::new(422, "InUse", message)
        }
    }

    /// 507 `SubnetFull` for `network_uuid`.
    pub fn subnet_full(network_uuid: &str) -> ApiError {
        let mut e = ApiError::new(507, "SubnetFull", "no more free IPs");
        e.extra.insert(
            "network_uuid".into(),
            Value::String(network_uuid.to_string()),
        );
        e
    }

    /// 403 `NotAuthorized`.
    pub fn not_authorized(message: impl Into<String>) -> ApiError {
        ApiError::new(403, "NotAuthorized", message)
    }

    /// A join or renewal refused: 401 `InvalidJoinToken` (wrong or rotated secret), 410
    /// `ServerRemoved` (the identity was removed from the cluster), 409 `JoinConflict`.
    pub fn join_refused(status: u16, message: impl Into<String>) -> ApiError {
        let code = match status {
            401 => "InvalidJoinToken",
            410 => "ServerRemoved",
            _ => "JoinConflict",
        };
        ApiError::new(status, code, message)
    }

    /// 412 `PreconditionFailed` (an `If-Match` that does not match).
    pub fn precondition_failed(message: impl Into<String>) -> ApiError {
        ApiError::new(412, "PreconditionFailed", message)
    }

    /// 428 `PreconditionRequired`.
    pub fn precondition_required(message: impl Into<String>) -> ApiError {
        ApiError::new(428, "PreconditionRequired", message)
    }

    /// 400 `InvalidContent`: a body that is not what its content type says.
    pub fn invalid_content(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "InvalidContent", message)
    }

    /// 415 `UnsupportedMediaType`.
    pub fn unsupported_media_type(ct: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("{ct} is not supported: expected application/json or application/x-www-form-urlencoded"),
        )
    }

    /// 404 for a path no route serves.
    pub fn no_route(path: &str) -> ApiError {
        ApiError::new(404, "ResourceNotFound", format!("{path} does not exist"))
    }

    /// 405 for a known path with an unsupported method.
    pub fn bad_method(method: &str, path: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not allowed on {path}"),
        )
    }

    /// 500 `InternalError` (the detail is logged, not sent).
    pub fn internal() -> ApiError {
        ApiError::new(500, "InternalError", "Internal error")
    }

    /// 503 while the store cannot be reached.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(503, "ServiceUnavailable", message)
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut m = Map::new();
        m.insert("code".into(), Value::String(self.code.to_string()));
        m.insert("message".into(), Value::String(self.message.clone()));
        if self.with_errors || !self.errors.is_empty() {
            m.insert(
                "errors".into(),
                serde_json::to_value(&self.errors).unwrap_or(Value::Array(Vec::new())),
            );
        }
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }
}

/// A failure inside a control-plane operation: either an answer for the client, or the store.
#[derive(Debug, Error)]
pub enum OpError {
    /// Tell the client (4xx/5xx with a restify body).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The store failed (logged; the client gets 500).
    #[error("store: {0}")]
    Store(#[from] portolan::store::StoreError),
    /// Our own SQL failed on SQLite.
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Our own SQL failed on PostgreSQL.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] postgres::Error),
    /// A stored row could not be decoded.
    #[error("corrupt {0}")]
    Corrupt(String),
}

impl OpError {
    /// Whether this is a unique-constraint violation (a race another writer won).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            OpError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::ConstraintViolation
            }
            OpError::Postgres(e) => e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }

    /// Whether PostgreSQL aborted the transaction for a deadlock (40P01) or a serialization
    /// failure (40001): running it again from the start is safe and usually succeeds.
    pub fn is_retryable(&self) -> bool {
        use postgres::error::SqlState;
        let pg = match self {
            OpError::Postgres(e) | OpError::Store(portolan::store::StoreError::Postgres(e)) => e,
            _ => return false,
        };
        matches!(
            pg.code(),
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
        )
    }

    /// Whether the database was busy (another process held SQLite's write lock too long).
    pub fn is_busy(&self) -> bool {
        let busy = |e: &rusqlite::Error| {
            matches!(e, rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::DatabaseBusy
                    || f.code == rusqlite::ErrorCode::DatabaseLocked)
        };
        match self {
            OpError::Sqlite(e) | OpError::Store(portolan::store::StoreError::Sqlite(e)) => busy(e),
            _ => false,
        }
    }

    /// The answer for the client.
    pub fn into_api(self) -> ApiError {
        match self {
            OpError::Api(e) => e,
            e if e.is_busy() => {
                tracing::warn!(error = %e, "store busy");
                ApiError::unavailable("the store is busy; retry the request")
            }
            other => {
                // Database errors may quote the statement: never log kilobytes of SQL.
                tracing::error!(error = %clip(&other.to_string(), LOG_MAX), "control plane operation failed");
                ApiError::internal()
            }
        }
    }
}

/// The longest error text logged (bytes).
pub const LOG_MAX: usize = 512;

/// `s` cut to at most `max` bytes (on a character boundary), saying how much was cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} more bytes)", &s[..end], s.len() - end)
}

impl From<serde_json::Error> for OpError {
    fn from(e: serde_json::Error) -> OpError {
        OpError::Corrupt(format!("JSON document: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn clipped() {
        assert_eq!(clip("abc", 5), "abc");
        let long = "é".repeat(600);
        let c = clip(&long, LOG_MAX);
        assert!(c.len() < LOG_MAX + 40, "{}", c.len());
        assert!(c.ends_with("(688 more bytes)"), "{c}");
    }

    #[test]
    fn bodies() {
        let e = ApiError::invalid_params(vec![
            FieldError::missing("vlan_id"),
            FieldError::missing("name"),
        ]);
        assert_eq!(
            e.body(),
            json!({"code":"InvalidParameters","message":"Missing parameters","errors":[
                {"field":"name","code":"MissingParameter","message":"Missing parameter"},
                {"field":"vlan_id","code":"MissingParameter","message":"Missing parameter"}]})
        );
        assert_eq!(e.status, 422);
        let e = ApiError::subnet_full("u");
        assert_eq!(
            e.body(),
            json!({"code":"SubnetFull","message":"no more free IPs","network_uuid":"u"})
        );
        let e = ApiError::invalid_params(vec![FieldError::unknown(vec!["a".into(), "b".into()])]);
        assert_eq!(
            e.body()["errors"][0],
            json!({"field":["a","b"],"code":"UnknownParameters","message":"Unknown parameters: a, b"})
        );
    }
}
