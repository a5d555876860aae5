//! Request parameters, as restify merges them: query string and body (JSON object or
//! form-encoded) into one map, each value checked by a typed getter that records a
//! [`FieldError`] naming the field instead of failing at once, so one reply lists every problem.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde_json::{Map, Value};

use super::error::{ApiError, FieldError};

/// Largest `limit` (and the default).
pub const MAX_LIMIT: u64 = 1000;

/// Most values a list parameter (`owner_uuid=a,b,...`, a JSON array) may carry: filters and
/// member lists are bounded like pages, so no request turns into a statement with tens of
/// thousands of bound values.
pub const MAX_LIST: usize = 1000;

/// Whether `c` may not appear in a name: control characters (C0, DEL, C1) and the bidi
/// embedding/override/isolate controls (U+202A..U+202E, U+2066..U+2069) that make a name
/// display as something it is not.
pub fn forbidden_in_name(c: char) -> bool {
    c.is_control()
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// The merged parameters of one request.
#[derive(Debug, Clone, Default)]
pub struct Params {
    map: Map<String, Value>,
    errors: Vec<FieldError>,
}

/// Adds `k=v` to `map`; a repeated key becomes an array.
fn push(map: &mut Map<String, Value>, k: String, v: Value) {
    match map.get_mut(&k) {
        Some(Value::Array(a)) => a.push(v),
        Some(old) => {
            let first = old.take();
            *old = Value::Array(vec![first, v]);
        }
        None => {
            map.insert(k, v);
        }
    }
}

impl Params {
    /// Parameters from a query string and a body with its content type. Body parameters win
    /// over query parameters of the same name.
    pub fn parse(
        query: Option<&str>,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Params, ApiError> {
        let mut map = Map::new();
        if let Some(q) = query {
            for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                push(&mut map, k.into_owned(), Value::String(v.into_owned()));
            }
        }
        let blank = body.iter().all(u8::is_ascii_whitespace);
        if !blank {
            let ct = content_type
                .unwrap_or("application/json")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            let mut body_map = Map::new();
            match ct.as_str() {
                "application/json" | "" => {
                    let v: Value = serde_json::from_slice(body)
                        .map_err(|e| ApiError::invalid_content(format!("Invalid JSON: {e}")))?;
                    match v {
                        Value::Object(o) => body_map = o,
                        _ => {
                            return Err(ApiError::invalid_params(vec![FieldError::invalid(
                                "parameters",
                                "Parameters must be objects",
                            )]))
                        }
                    }
                }
                "application/x-www-form-urlencoded" => {
                    for (k, v) in form_urlencoded::parse(body) {
                        push(&mut body_map, k.into_owned(), Value::String(v.into_owned()));
                    }
                }
                other => return Err(ApiError::unsupported_media_type(other)),
            }
            for (k, v) in body_map {
                map.insert(k, v);
            }
        }
        Ok(Params {
            map,
            errors: Vec::new(),
        })
    }

    /// Parameters from a JSON object (tests and in-process callers).
    pub fn from_map(map: Map<String, Value>) -> Params {
        Params {
            map,
            errors: Vec::new(),
        }
    }

    /// The raw value of `name`, if present and not null.
    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// Whether `name` was given.
    pub fn has(&self, name: &str) -> bool {
        self.raw(name).is_some()
    }

    /// Records an error.
    pub fn error(&mut self, e: FieldError) {
        self.errors.push(e);
    }

    /// Records `InvalidParameter` on `field`.
    pub fn invalid(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::invalid(field, message));
    }

    /// Whether any error was recorded.
    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Rejects parameters not in `allowed` (restify's strict validation).
    pub fn allow_only(&mut self, allowed: &[&str]) {
        let unknown: BTreeSet<String> = self
            .map
            .keys()
            .filter(|k| !allowed.contains(&k.as_str()))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            self.errors
                .push(FieldError::unknown(unknown.into_iter().collect()));
        }
    }

    /// Ends validation: the recorded errors as one 422, or `Ok`.
    pub fn finish(&mut self) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid_params(std::mem::take(&mut self.errors)))
        }
    }

    /// A required value: records `MissingParameter` if absent.
    pub fn require<T>(&mut self, name: &str, v: Option<T>) -> Option<T> {
        if v.is_none() && !self.has(name) {
            self.errors.push(FieldError::missing(name));
        }
        v
    }

    /// A string (numbers are not strings) without NUL characters (which no store keeps).
    pub fn string(&mut self, name: &str) -> Option<String> {
        match self.raw(name)? {
            Value::String(s) if s.contains('\0') => {
                self.invalid(name, "must not contain NUL characters");
                None
            }
            Value::String(s) => Some(s.clone()),
            _ => {
                self.invalid(name, "must be a string");
                None
            }
        }
    }

    /// A non-empty string of at most `max` characters.
    pub fn text(&mut self, name: &str, max: usize) -> Option<String> {
        let s = self.string(name)?;
        if s.chars().count() > max {
            self.invalid(name, format!("must be at most {max} characters long"));
            return None;
        }
        Some(s)
    }

    /// A name: [`Params::text`] without control characters or bidi controls
    /// ([`forbidden_in_name`]).
    pub fn name(&mut self, name: &str, max: usize) -> Option<String> {
        let s = self.text(name, max)?;
        if let Some(c) = s.chars().find(|c| forbidden_in_name(*c)) {
            self.invalid(
                name,
                format!(
                    "must not contain control or bidirectional-override characters (found U+{:04X})",
                    u32::from(c)
                ),
            );
            return None;
        }
        Some(s)
    }

    /// A UUID, returned lower-cased.
    pub fn uuid(&mut self, name: &str) -> Option<String> {
        let raw = self.raw(name)?.clone();
        match raw.as_str().and_then(parse_uuid) {
            Some(u) => Some(u),
            None => {
                self.invalid(name, "invalid UUID");
                None
            }
        }
    }

    /// An array of UUIDs (JSON array, repeated parameter, or comma-separated string).
    pub fn uuid_array(&mut self, name: &str) -> Option<Vec<String>> {
        let items = self.string_array(name)?;
        let bad: Vec<Value> = items
            .iter()
            .filter(|s| parse_uuid(s).is_none())
            .map(|s| Value::String(s.clone()))
            .collect();
        if !bad.is_empty() {
            let mut e = FieldError::invalid(name, "invalid UUIDs");
            e.invalid = Some(bad);
            self.error(e);
            return None;
        }
        Some(items.iter().filter_map(|s| parse_uuid(s)).collect())
    }

    /// An array of at most [`MAX_LIST`] strings without NUL characters (JSON array, repeated
    /// parameter, or comma-separated string).
    pub fn string_array(&mut self, name: &str) -> Option<Vec<String>> {
        let v = self.string_array_unbounded(name)?;
        if v.len() > MAX_LIST {
            self.invalid(
                name,
                format!("must have at most {MAX_LIST} values (found {})", v.len()),
            );
            return None;
        }
        if v.iter().any(|s| s.contains('\0')) {
            self.invalid(name, "must not contain NUL characters");
            return None;
        }
        Some(v)
    }

    fn string_array_unbounded(&mut self, name: &str) -> Option<Vec<String>> {
        match self.raw(name)? {
            Value::String(s) => Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            ),
            Value::Array(a) => {
                let mut out = Vec::new();
                for v in a {
                    match v {
                        Value::String(s) => out.push(s.clone()),
                        _ => {
                            self.invalid(name, "must be an array of strings");
                            return None;
                        }
                    }
                }
                Some(out)
            }
            _ => {
                self.invalid(name, "must be an array");
                None
            }
        }
    }

    /// A boolean: JSON true/false or the strings "true"/"false".
    pub fn boolean(&mut self, name: &str) -> Option<bool> {
        match self.raw(name)? {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s == "true" => Some(true),
            Value::String(s) if s == "false" => Some(false),
            _ => {
                self.invalid(name, "must be a boolean value");
                None
            }
        }
    }

    /// An integer in `lo..=hi` (JSON number or decimal string); `message` on failure.
    pub fn int_in(&mut self, name: &str, lo: i64, hi: i64, message: &str) -> Option<i64> {
        let v = self.raw(name)?.clone();
        match as_int(&v) {
            Some(n) if (lo..=hi).contains(&n) => Some(n),
            _ => {
                self.invalid(name, message);
                None
            }
        }
    }

    /// An IPv4 address.
    pub fn ipv4(&mut self, name: &str) -> Option<Ipv4Addr> {
        let v = self.raw(name)?.clone();
        match v.as_str().and_then(|s| s.parse::<Ipv4Addr>().ok()) {
            Some(ip) => Some(ip),
            None => {
                if v.as_str()
                    .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
                    .is_some()
                {
                    self.invalid(
                        name,
                        "IPv6 addresses are not supported: expected an IPv4 address",
                    );
                } else {
                    self.invalid(name, "invalid IP address");
                }
                None
            }
        }
    }

    /// An array of IPv4 addresses.
    pub fn ipv4_array(&mut self, name: &str) -> Option<Vec<Ipv4Addr>> {
        let items = self.string_array(name)?;
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for s in items {
            match s.parse::<Ipv4Addr>() {
                Ok(ip) => out.push(ip),
                Err(_) => bad.push(Value::String(s)),
            }
        }
        if !bad.is_empty() {
            let mut e = FieldError::invalid(name, "invalid IPs");
            e.invalid = Some(bad);
            self.error(e);
            return None;
        }
        Some(out)
    }

    /// One of `choices`.
    pub fn one_of(&mut self, name: &str, choices: &[&str]) -> Option<String> {
        let s = self.string(name)?;
        if choices.contains(&s.as_str()) {
            Some(s)
        } else {
            self.invalid(name, format!("must be one of: {}", choices.join(", ")));
            None
        }
    }

    /// `limit` and `offset`, with NAPI's messages.
    pub fn pagination(&mut self) -> (u64, u64) {
        let limit = self
            .int_in(
                "limit",
                1,
                MAX_LIMIT as i64,
                "invalid limit, must be an integer greater than 0 or less than or equal to 1000",
            )
            .map_or(MAX_LIMIT, |n| n as u64);
        let offset = self
            .int_in(
                "offset",
                0,
                i64::MAX,
                "invalid value, offset must be an integer greater than or equal to 0",
            )
            .map_or(0, |n| n as u64);
        (limit, offset)
    }

    /// `fields`: which properties to return (all when absent).
    pub fn fields(&mut self, allowed: &[&str]) -> Option<Vec<String>> {
        let f = self.string_array("fields")?;
        let bad: Vec<Value> = f
            .iter()
            .filter(|x| !allowed.contains(&x.as_str()))
            .map(|x| Value::String(x.clone()))
            .collect();
        if !bad.is_empty() || f.is_empty() {
            let mut e = FieldError::invalid(
                "fields",
                format!(
                    "unknown field specified; expected some of: {}",
                    allowed.join(", ")
                ),
            );
            if !bad.is_empty() {
                e.invalid = Some(bad);
            }
            self.error(e);
            return None;
        }
        Some(f)
    }
}

/// An integer from a JSON number or a decimal string.
pub fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                .map(|f| f as i64)
        }),
        Value::String(s) if !s.is_empty() && s.len() < 19 => {
            let t = s.strip_prefix('-').unwrap_or(s);
            if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                s.parse().ok()
            } else {
                None
            }
        }
        _ => None,
    }
}

/// A UUID in 8-4-4-4-12 hex form, lower-cased; `None` if it is not one.
pub fn parse_uuid(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    for (i, c) in b.iter().enumerate() {
        let dash = matches!(i, 8 | 13 | 18 | 23);
        if dash != (*c == b'-') || (!dash && !c.is_ascii_hexdigit()) {
            return None;
        }
    }
    Some(s.to_ascii_lowercase())
}

/// A random v4 UUID.
pub fn random_uuid() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Keeps only `fields` of an object (all when `None`).
pub fn select_fields(v: Value, fields: Option<&[String]>) -> Value {
    match (v, fields) {
        (Value::Object(o), Some(f)) => Value::Object(
            o.into_iter()
                .filter(|(k, _)| f.iter().any(|x| x == k))
                .collect(),
        ),
        (v, _) => v,
    }
}

/// `items[offset..offset+limit]`.
pub fn page<T>(items: Vec<T>, limit: u64, offset: u64) -> Vec<T> {
    items
        .into_iter()
        .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_and_types() {
        let mut p = Params::parse(
            Some("limit=5&a=1&a=2"),
            Some("application/x-www-form-urlencoded"),
            b"vlan_id=7&flag=true",
        )
        .unwrap();
        assert_eq!(p.int_in("vlan_id", 0, 4094, "x"), Some(7));
        assert_eq!(p.boolean("flag"), Some(true));
        assert_eq!(p.raw("a"), Some(&json!(["1", "2"])));
        assert_eq!(p.pagination(), (5, 0));
        assert!(p.finish().is_ok());
        let e = Params::parse(None, Some("application/json"), b"[1]").unwrap_err();
        assert_eq!(
            e.body()["errors"][0]["message"],
            "Parameters must be objects"
        );
        let e = Params::parse(None, Some("application/json"), b"{").unwrap_err();
        assert_eq!(e.status, 400);
        let mut p = Params::parse(Some("limit=0&offset=-1&zz=1"), None, b"").unwrap();
        p.pagination();
        p.allow_only(&["limit", "offset"]);
        let e = p.finish().unwrap_err();
        assert_eq!(e.errors.len(), 3);
        assert_eq!(e.errors[2].code, "UnknownParameters");
    }

    #[test]
    fn bounded_lists_and_names() {
        let many = vec!["x"; MAX_LIST + 1].join(",");
        let mut p = Params::from_map(Map::from_iter([("a".into(), Value::String(many))]));
        assert_eq!(p.string_array("a"), None);
        let e = p.finish().unwrap_err();
        assert_eq!(e.errors[0].field, "a");
        assert!(
            e.errors[0].message.contains("at most 1000"),
            "{:?}",
            e.errors
        );
        let ok = vec!["x"; MAX_LIST].join(",");
        let mut p = Params::from_map(Map::from_iter([("a".into(), Value::String(ok))]));
        assert_eq!(p.string_array("a").map(|v| v.len()), Some(MAX_LIST));
        for bad in [
            "a\0b",
            "a\u{202e}b",
            "a\u{2066}b",
            "a\nb",
            "a\u{85}b",
            "a\u{7f}",
        ] {
            let mut p = Params::from_map(Map::from_iter([("n".into(), json!(bad))]));
            assert_eq!(p.name("n", 255), None, "{bad:?}");
            assert_eq!(p.finish().unwrap_err().errors[0].field, "n");
        }
        let mut p = Params::from_map(Map::from_iter([("n".into(), json!("réseau-1 ok"))]));
        assert_eq!(p.name("n", 255).as_deref(), Some("réseau-1 ok"));
    }

    #[test]
    fn uuids() {
        assert_eq!(
            parse_uuid("AAAAAAAA-aaaa-aaaa-aaaa-000000000000").as_deref(),
            Some("aaaaaaaa-aaaa-aaaa-aaaa-000000000000")
        );
        assert!(parse_uuid("aaaaaaaa-aaaa-aaaa-aaaa-00000000000").is_none());
        assert!(parse_uuid("aaaaaaaaaaaaa-aaaa-aaaa-000000000000").is_none());
        let u = random_uuid().unwrap();
        assert!(parse_uuid(&u).is_some());
        assert_eq!(&u[14..15], "4");
    }
}
