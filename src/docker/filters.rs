//! moby's `filters` query parameter (`api/types/filters` of moby 20.10): a JSON object from a
//! filter name to its values, in either encoding the clients send:
//!
//! - `{"name":{"x":true}}` — the docker CLI (the values' booleans are ignored: a key is a value);
//! - `{"name":["x"]}` — docker-py and the legacy form.
//!
//! An empty or absent parameter is "no filters". Names outside a route's accepted set are
//! refused with moby's 400 `Invalid filter 'foo'`. Malformed JSON is refused with 400 (moby
//! answers 500 there; a client error is ours to report as one).
//!
//! Matching follows moby: [`Filters::exact`] (any value equal), [`Filters::matches`] (any value
//! equal, or matching as an unanchored regular expression, as moby's `Args.Match` does for
//! `name` and `id`), [`Filters::kv_list`] (`label`: every value `key` or `key=value` present).
//! [`until`] parses the `until` filter's timestamps as moby's `GetTimestamp` does.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::error;
use crate::control::error::OpError;

/// Longest regular expression compiled for a filter value (a bound on a client's cost).
const MAX_PATTERN: usize = 256;

/// Parsed filters: name → values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters(pub BTreeMap<String, BTreeSet<String>>);

impl Filters {
    /// Parses the `filters` parameter (`None` or empty: no filters).
    pub fn parse(raw: Option<&str>) -> Result<Filters, OpError> {
        let raw = raw.unwrap_or("");
        if raw.trim().is_empty() {
            return Ok(Filters::default());
        }
        let bad = |why: String| {
            error::bad_request(format!(
                "invalid filters {raw:?}: {why}; expected a JSON object such as \
                 {{\"name\":{{\"x\":true}}}} or {{\"name\":[\"x\"]}}"
            ))
        };
        let v: Value = serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
        let Value::Object(m) = v else {
            return Err(bad("not an object".into()));
        };
        let mut out = BTreeMap::new();
        for (k, vals) in m {
            let set: BTreeSet<String> = match vals {
                Value::Object(o) => {
                    if let Some((x, _)) = o.iter().find(|(_, b)| !b.is_boolean()) {
                        return Err(bad(format!(
                            "filter {k:?}: value {x:?} is not mapped to a boolean"
                        )));
                    }
                    o.into_iter().map(|(x, _)| x).collect()
                }
                Value::Array(a) => a
                    .into_iter()
                    .map(|x| match x {
                        Value::String(s) => Ok(s),
                        other => Err(bad(format!("filter {k:?}: {other} is not a string"))),
                    })
                    .collect::<Result<_, _>>()?,
                Value::Null => BTreeSet::new(),
                other => {
                    return Err(bad(format!(
                        "filter {k:?}: {other} is neither a list nor an object"
                    )))
                }
            };
            out.insert(k, set);
        }
        Ok(Filters(out))
    }

    /// Refuses names outside `accepted` (moby: 400 `Invalid filter 'foo'`).
    pub fn validate(&self, accepted: &[&str]) -> Result<(), OpError> {
        match self.0.keys().find(|k| !accepted.contains(&k.as_str())) {
            Some(k) => Err(error::bad_request(format!("Invalid filter '{k}'"))),
            None => Ok(()),
        }
    }

    /// Whether filter `name` was given (even with no values).
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// The values of `name`.
    pub fn get(&self, name: &str) -> impl Iterator<Item = &str> {
        self.0.get(name).into_iter().flatten().map(String::as_str)
    }

    /// True when `name` is absent or one of its values equals `source`.
    pub fn exact(&self, name: &str, source: &str) -> bool {
        match self.0.get(name) {
            None => true,
            Some(v) => v.contains(source),
        }
    }

    /// True when `name` is absent or one of its values equals `source` or matches it as an
    /// unanchored regular expression (moby's `Args.Match`; bad expressions match nothing).
    pub fn matches(&self, name: &str, source: &str) -> bool {
        let Some(vals) = self.0.get(name) else {
            return true;
        };
        vals.iter().any(|p| {
            p == source
                || (p.len() <= MAX_PATTERN
                    && regex::RegexBuilder::new(p)
                        .size_limit(1 << 20)
                        .build()
                        .is_ok_and(|re| re.is_match(source)))
        })
    }

    /// True when `name` is absent, or every value `key` / `key=value` is among `labels`
    /// (moby's `Args.MatchKVList`).
    pub fn kv_list(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        let Some(vals) = self.0.get(name) else {
            return true;
        };
        if vals.is_empty() {
            return true;
        }
        vals.iter().all(|v| match v.split_once('=') {
            Some((k, want)) => labels.get(k).is_some_and(|have| have == want),
            None => labels.contains_key(v.as_str()),
        })
    }

    /// The boolean of filter `name` (`true`/`1`, `false`/`0`), moby's message otherwise;
    /// `None` when absent. With several values, any true one wins, as moby reads them.
    pub fn boolean(&self, name: &str) -> Result<Option<bool>, OpError> {
        let Some(vals) = self.0.get(name) else {
            return Ok(None);
        };
        let mut out = None;
        for v in vals {
            let b = match v.to_ascii_lowercase().as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(error::bad_request(format!(
                        "invalid value for filter '{name}', must be \"true\" (or \"1\"), or \"false\" (or \"0\")"
                    )))
                }
            };
            out = Some(out.unwrap_or(false) || b);
        }
        Ok(out)
    }
}

/// The instant (ms since the epoch) of an `until` value as moby's `GetTimestamp` reads it: a
/// Go duration before `now_ms` (`10m`, `1h30m`, `2.5h`), RFC 3339 (`2006-01-02T15:04:05Z`,
/// fractions and offsets allowed), a date (`2006-01-02`), or Unix seconds (`1700000000.5`).
pub fn until(value: &str, now_ms: i64) -> Result<i64, OpError> {
    let bad = || {
        error::bad_request(format!(
            "failed to parse value as time or duration: {value:?}"
        ))
    };
    if let Some(d) = go_duration_ms(value) {
        return Ok(now_ms - d);
    }
    if let Some(t) = crate::control::time::parse_ms(value, crate::control::time::Form::Lenient) {
        return Ok(t);
    }
    // Unix seconds, optionally with a fraction.
    let (s, frac) = value.split_once('.').unwrap_or((value, ""));
    if !s.is_empty()
        && s.len() <= 12
        && s.bytes().all(|c| c.is_ascii_digit())
        && frac.len() <= 9
        && frac.bytes().all(|c| c.is_ascii_digit())
    {
        let secs: i64 = s.parse().map_err(|_| bad())?;
        let ms = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<3}")[..3]
                .parse::<i64>()
                .map_err(|_| bad())?
        };
        return Ok(secs * 1000 + ms);
    }
    Err(bad())
}

/// A Go `time.ParseDuration` value in milliseconds (units ns, us, µs, ms, s, m, h; a sign;
/// fractions).
fn go_duration_ms(s: &str) -> Option<i64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total_ns: f64 = 0.0;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if n == 0 {
            return None;
        }
        let num: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[u..];
        total_ns += num * unit;
    }
    if !total_ns.is_finite() || total_ns > 9.2e18 {
        return None;
    }
    let ms = (total_ns / 1e6) as i64;
    Some(if neg { -ms } else { ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(e: OpError) -> (u16, String) {
        let e = e.into_api();
        (e.status, e.message)
    }

    #[test]
    fn both_encodings_parse_alike() {
        let a = Filters::parse(Some(r#"{"name":{"x":true,"y":true}}"#)).unwrap();
        let b = Filters::parse(Some(r#"{"name":["x","y"]}"#)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.get("name").collect::<Vec<_>>(), ["x", "y"]);
        // moby ignores the booleans: a key is a value.
        let c = Filters::parse(Some(r#"{"name":{"x":false}}"#)).unwrap();
        assert!(c.exact("name", "x"));
        assert_eq!(Filters::parse(None).unwrap(), Filters::default());
        assert_eq!(Filters::parse(Some("")).unwrap(), Filters::default());
        assert_eq!(Filters::parse(Some("{}")).unwrap(), Filters::default());
    }

    #[test]
    fn malformed_filters_are_400() {
        for bad in [
            "bogus",
            "[]",
            r#"{"name":"x"}"#,
            r#"{"name":[1]}"#,
            r#"{"name":{"x":"y"}}"#,
            "{",
        ] {
            let (s, m) = msg(Filters::parse(Some(bad)).unwrap_err());
            assert_eq!(s, 400, "{bad}");
            assert!(m.contains("expected a JSON object"), "{bad}: {m}");
        }
    }

    #[test]
    fn unknown_names_refused_as_moby_does() {
        let f = Filters::parse(Some(r#"{"foo":{"x":true}}"#)).unwrap();
        assert_eq!(
            msg(f.validate(&["name"]).unwrap_err()),
            (400, "Invalid filter 'foo'".to_string())
        );
        assert!(Filters::default().validate(&[]).is_ok());
    }

    #[test]
    fn matching() {
        let f = Filters::parse(Some(r#"{"name":["s1","test@#$"],"driver":["bridge"]}"#)).unwrap();
        assert!(f.matches("name", "s16"));
        assert!(f.matches("name", "xs1"));
        assert!(!f.matches("name", "s2"));
        // Exact match first: a name that is not a sensible expression still matches itself.
        assert!(f.matches("name", "test@#$"));
        assert!(f.matches("id", "anything"));
        assert!(f.exact("driver", "bridge"));
        assert!(!f.exact("driver", "overlay"));
        let f = Filters::parse(Some(r#"{"name":["^s1$","(("]}"#)).unwrap();
        assert!(f.matches("name", "s1"));
        assert!(!f.matches("name", "s16"));
    }

    #[test]
    fn labels() {
        let mut l = BTreeMap::new();
        l.insert("a".to_string(), "1".to_string());
        l.insert("b".to_string(), String::new());
        let f = |s: &str| Filters::parse(Some(s)).unwrap();
        assert!(f(r#"{"label":["a"]}"#).kv_list("label", &l));
        assert!(f(r#"{"label":["a=1","b"]}"#).kv_list("label", &l));
        assert!(f(r#"{"label":["b="]}"#).kv_list("label", &l));
        assert!(!f(r#"{"label":["a=2"]}"#).kv_list("label", &l));
        assert!(!f(r#"{"label":["a","c"]}"#).kv_list("label", &l));
        assert!(!f(r#"{"label":["a"]}"#).kv_list("label", &BTreeMap::new()));
        assert!(f("{}").kv_list("label", &BTreeMap::new()));
    }

    #[test]
    fn booleans() {
        let f = |s: &str| Filters::parse(Some(s)).unwrap();
        assert_eq!(
            f(r#"{"dangling":["true"]}"#).boolean("dangling").unwrap(),
            Some(true)
        );
        assert_eq!(
            f(r#"{"dangling":["0"]}"#).boolean("dangling").unwrap(),
            Some(false)
        );
        assert_eq!(f("{}").boolean("dangling").unwrap(), None);
        let (s, m) = msg(f(r#"{"dangling":["bogus"]}"#)
            .boolean("dangling")
            .unwrap_err());
        assert_eq!(s, 400);
        assert_eq!(
            m,
            r#"invalid value for filter 'dangling', must be "true" (or "1"), or "false" (or "0")"#
        );
    }

    #[test]
    fn until_values() {
        let now = 1_700_000_000_000;
        assert_eq!(until("10m", now).unwrap(), now - 600_000);
        assert_eq!(until("1h30m", now).unwrap(), now - 5_400_000);
        assert_eq!(until("1.5s", now).unwrap(), now - 1_500);
        assert_eq!(
            until("2023-11-14T22:13:20Z", now).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            until("2023-11-14T22:13:20.5Z", now).unwrap(),
            1_700_000_000_500
        );
        assert_eq!(
            until("2023-11-14T23:13:20+01:00", now).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(until("2023-11-14", now).unwrap(), 1_699_920_000_000);
        assert_eq!(until("1700000000", now).unwrap(), 1_700_000_000_000);
        assert_eq!(until("1700000000.25", now).unwrap(), 1_700_000_000_250);
        for bad in ["bogus", "", "10x", "2023-13-01", "1.2.3", "h"] {
            let (s, m) = msg(until(bad, now).unwrap_err());
            assert_eq!(s, 400);
            assert_eq!(
                m,
                format!("failed to parse value as time or duration: {bad:?}")
            );
        }
    }
}
