//! Calendar time without a dependency: ISO 8601 / RFC 3339 formatting and parsing in UTC, for
//! NAPI's timestamps (`iso_from_ms`), Docker's (`rfc3339_nano`, Go's `time.RFC3339Nano`) and
//! the times clients send (`parse_ms`). Howard Hinnant's civil-date algorithms.

/// (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (if month <= 2 { y + 1 } else { y }, month, day)
}

/// Days since 1970-01-01 of a civil date.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn date_time(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// ISO 8601 with milliseconds (`2026-11-29T19:00:00.000Z`), as NAPI writes times.
pub fn iso_from_ms(ms: i64) -> String {
    format!(
        "{}.{:03}Z",
        date_time(ms.div_euclid(1000)),
        ms.rem_euclid(1000)
    )
}

/// Go's `time.RFC3339Nano`: the fraction's trailing zeros trimmed, none when zero.
pub fn rfc3339_nano(secs: i64, nanos: u32) -> String {
    let mut s = date_time(secs);
    if nanos > 0 {
        let f = format!("{nanos:09}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// [`rfc3339_nano`] of milliseconds since the epoch.
pub fn rfc3339_from_ms(ms: i64) -> String {
    rfc3339_nano(
        ms.div_euclid(1000),
        (ms.rem_euclid(1000) * 1_000_000) as u32,
    )
}

/// [`rfc3339_nano`] of a system time.
pub fn rfc3339_of(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    rfc3339_nano(d.as_secs() as i64, d.subsec_nanos())
}

/// How strict [`parse_ms`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// RFC 3339 proper: a date, a time, and `Z` or `±hh:mm`.
    Rfc3339,
    /// Also a bare date (`2006-01-02`) and a date-time without a zone (taken as UTC), as
    /// moby's `GetTimestamp` reads filter values.
    Lenient,
}

/// Milliseconds since the epoch of an RFC 3339 time (any fraction; its first three digits
/// count).
pub fn parse_ms(s: &str, form: Form) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let day_ms = days_from_civil(y, mo, d) * 86_400_000;
    if b.len() == 10 {
        return (form == Form::Lenient).then_some(day_ms);
    }
    if b.len() < 19 || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        let mut j = start;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j == start {
            return None;
        }
        ms = format!("{:0<3}", &s[start..j.min(start + 3)])
            .parse()
            .ok()?;
        i = j;
    }
    let offset_min = match &s[i..] {
        "" if form == Form::Lenient => 0,
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && &tz[3..4] == ":" => {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if tz.starts_with('-') {
                -m
            } else {
                m
            }
        }
        _ => return None,
    };
    Some(day_ms + ((h * 60 + mi - offset_min) * 60 + se) * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(iso_from_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_from_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(iso_from_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_nano(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_nano(1_704_164_645, 123_456_789),
            "2024-01-02T03:04:05.123456789Z"
        );
        assert_eq!(
            rfc3339_nano(1_704_164_645, 500_000_000),
            "2024-01-02T03:04:05.5Z"
        );
        assert_eq!(
            rfc3339_from_ms(1_700_000_000_120),
            "2023-11-14T22:13:20.12Z"
        );
    }

    #[test]
    fn parses() {
        let strict = |s| parse_ms(s, Form::Rfc3339);
        assert_eq!(
            strict("2024-01-02T03:04:05.123456789Z"),
            Some(1_704_164_645_123)
        );
        assert_eq!(strict("2024-01-02T04:04:05+01:00"), Some(1_704_164_645_000));
        assert_eq!(strict("1970-01-01T00:00:00Z"), Some(0));
        for bad in [
            "",
            "2024-13-02T03:04:05Z",
            "2024-01-02",
            "2024-01-02T03:04:05",
            "2024-01-02T03:04:05.Z",
            "2024-01-02T03:04:05+0100",
        ] {
            assert_eq!(strict(bad), None, "{bad}");
        }
        assert_eq!(
            parse_ms("2024-01-02", Form::Lenient),
            Some(1_704_153_600_000)
        );
        assert_eq!(
            parse_ms("2024-01-02T03:04:05", Form::Lenient),
            Some(1_704_164_645_000)
        );
        let now = rfc3339_of(std::time::SystemTime::now());
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((strict(&now).unwrap() - ms).abs() < 5_000);
    }

    proptest::proptest! {
        #[test]
        fn round_trips(ms in -62_135_596_800_000i64..253_402_300_799_999) {
            proptest::prop_assert_eq!(parse_ms(&rfc3339_from_ms(ms), Form::Rfc3339), Some(ms));
            proptest::prop_assert_eq!(parse_ms(&iso_from_ms(ms), Form::Rfc3339), Some(ms));
        }

        #[test]
        fn never_panics(s in ".{0,40}") {
            let _ = parse_ms(&s, Form::Lenient);
        }
    }
}
