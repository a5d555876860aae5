//! Value checks with upstream's exact acceptance: Node's `net.isIPv4`/`net.isIPv6`, the
//! `ip6addr` parser used for subnets, decimal numbers as JavaScript's `Number()` reads them, the
//! UUID pattern, and V8's sort for upstream's (inconsistent) ICMP type comparator.

use std::cmp::Ordering;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Node's `net.isIPv4`: four decimal groups 0..255 without leading zeros.
pub(crate) fn node_is_ipv4(s: &str) -> bool {
    let groups: Vec<&str> = s.split('.').collect();
    groups.len() == 4
        && groups.iter().all(|g| {
            !g.is_empty()
                && g.len() <= 3
                && g.bytes().all(|b| b.is_ascii_digit())
                && (g.len() == 1 || !g.starts_with('0'))
                && g.parse::<u16>().is_ok_and(|v| v <= 255)
        })
}

fn is_v6_seg(g: &str) -> bool {
    (1..=4).contains(&g.len()) && g.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Node's `net.isIPv6`, for strings without a dotted-quad tail or zone (all the lexer can
/// produce, and all a model check sees): eight groups, or one `::` with at most seven groups
/// around it; groups of 1..4 hex digits.
pub(crate) fn node_is_ipv6(s: &str) -> bool {
    if s.contains('.') || s.contains('%') {
        // Not producible by the lexer; stay conservative.
        return s.parse::<Ipv6Addr>().is_ok();
    }
    match s.find("::") {
        None => {
            let groups: Vec<&str> = s.split(':').collect();
            groups.len() == 8 && groups.iter().all(|g| is_v6_seg(g))
        }
        Some(i) => {
            let head = &s[..i];
            let tail = &s[i + 2..];
            let count = |part: &str| -> Option<usize> {
                if part.is_empty() {
                    return Some(0);
                }
                let gs: Vec<&str> = part.split(':').collect();
                gs.iter().all(|g| is_v6_seg(g)).then_some(gs.len())
            };
            match (count(head), count(tail)) {
                (Some(h), Some(t)) => h + t <= 7,
                _ => false,
            }
        }
    }
}

/// Parses a Node-valid IPv6 string (after [`node_is_ipv6`]) into an address.
pub(crate) fn ipv6_value(s: &str) -> Option<Ipv6Addr> {
    s.parse().ok()
}

/// What `ip6addr.parse` gave for a subnet's address part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ip6Addr {
    pub fields: [u16; 8],
    /// A bare dotted quad (IPv4); its prefix length counts 96 more in `createCIDR`.
    pub bare_v4: bool,
}

impl Ip6Addr {
    /// The address as a std address (IPv4 for a bare dotted quad).
    pub(crate) fn to_ip(self) -> IpAddr {
        if self.bare_v4 {
            let [a, b] = self.fields[6].to_be_bytes();
            let [c, d] = self.fields[7].to_be_bytes();
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.fields))
        }
    }
}

/// A port of `ip6addr`'s `parseString` for the two shapes the lexer produces (dotted quads of
/// 1..3-digit groups, and `[0-9a-f:]` strings). Leading zeros are fine in both (`010.0.0.0`,
/// `00001::`), unlike Node's `net` checks.
pub(crate) fn ip6addr_parse(input: &str) -> Option<Ip6Addr> {
    if input.len() > 40 {
        return None;
    }
    if input.contains('.') {
        // Only the bare dotted-quad shape reaches here (the lexer's IPV4ADDR).
        let groups: Vec<&str> = input.split('.').collect();
        if groups.len() != 4 || input.contains(':') {
            return None;
        }
        let mut v = [0u8; 4];
        for (i, g) in groups.iter().enumerate() {
            if g.is_empty() || !g.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            v[i] = u8::try_from(parse_decimal(g)?).ok()?;
        }
        let mut fields = [0u16; 8];
        fields[5] = 0xffff;
        fields[6] = u16::from_be_bytes([v[0], v[1]]);
        fields[7] = u16::from_be_bytes([v[2], v[3]]);
        return Some(Ip6Addr {
            fields,
            bare_v4: true,
        });
    }
    let bytes = input.as_bytes();
    let mut fields: Vec<&str> = Vec::new();
    let mut exp_index: Option<usize> = None;
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b':' {
            let value = &input[start..i];
            if i + 1 < bytes.len() && bytes[i + 1] == b':' {
                if exp_index.is_some() {
                    return None;
                }
                if !value.is_empty() {
                    fields.push(value);
                }
                exp_index = Some(fields.len());
                i += 1;
            } else {
                if value.is_empty() {
                    return None;
                }
                fields.push(value);
            }
            start = i + 1;
        }
        i += 1;
    }
    let last = &input[start.min(input.len())..];
    if !last.is_empty() {
        fields.push(last);
    } else if exp_index != Some(fields.len()) {
        return None;
    }
    if fields.len() > 8 || (fields.len() < 8 && exp_index.is_none()) {
        return None;
    }
    let mut nums = Vec::with_capacity(8);
    for f in &fields {
        if !f.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let trimmed = f.trim_start_matches('0');
        if trimmed.len() > 4 {
            return None;
        }
        nums.push(if trimmed.is_empty() {
            0
        } else {
            u16::from_str_radix(trimmed, 16).ok()?
        });
    }
    let mut out = [0u16; 8];
    match exp_index {
        Some(e) if nums.len() < 8 => {
            let fill = 8 - nums.len();
            out[..e].copy_from_slice(&nums[..e]);
            out[e + fill..].copy_from_slice(&nums[e..]);
        }
        _ => out.copy_from_slice(&nums),
    }
    Some(Ip6Addr {
        fields: out,
        bare_v4: false,
    })
}

/// Why a subnet was rejected (upstream's three reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubnetProblem {
    BadAddress,
    BadPrefix,
    BitsSet,
}

impl SubnetProblem {
    /// Upstream's parenthesised reason.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            SubnetProblem::BadAddress => "bad address component",
            SubnetProblem::BadPrefix => "bad prefix length",
            SubnetProblem::BitsSet => "bits set to right of mask",
        }
    }
}

/// Upstream's `validateSubnet` on `addr/len` text; returns the address and the prefix length
/// in its own family.
pub(crate) fn validate_subnet(
    addr_text: &str,
    len_digits: &str,
    enforce_mask: bool,
) -> Result<(IpAddr, u8), SubnetProblem> {
    let addr = ip6addr_parse(addr_text).ok_or(SubnetProblem::BadAddress)?;
    let plen = parse_decimal(len_digits).ok_or(SubnetProblem::BadPrefix)?;
    let full = if addr.bare_v4 { plen + 96 } else { plen };
    if full > 128 {
        return Err(SubnetProblem::BadPrefix);
    }
    if enforce_mask {
        let v = u128::from(Ipv6Addr::from(addr.fields));
        let mask = if full == 0 {
            0
        } else {
            u128::MAX << (128 - full)
        };
        if v & mask != v {
            return Err(SubnetProblem::BitsSet);
        }
    }
    let plen = u8::try_from(plen).map_err(|_| SubnetProblem::BadPrefix)?;
    Ok((addr.to_ip(), plen))
}

/// A string of ASCII digits as JavaScript's `Number()` reads it, saturated far above every
/// limit the language checks (so huge inputs stay "too big" rather than overflowing).
pub(crate) fn parse_decimal(s: &str) -> Option<u64> {
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let trimmed = s.trim_start_matches('0');
    if trimmed.len() > 12 {
        return Some(u64::MAX);
    }
    Some(trimmed.parse::<u64>().unwrap_or(0))
}

/// Upstream's `NON_DIGIT_RE`-then-range check: digits only (the empty string reads as 0).
pub(crate) fn decimal_in(s: &str, lo: u64, hi: u64) -> Option<u64> {
    parse_decimal(s).filter(|v| (lo..=hi).contains(v))
}

/// Upstream's `UUID_REGEX`: lower-case 8-4-4-4-12 hex.
pub(crate) fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// Compares two strings as JavaScript's default sort does (UTF-16 code units).
pub(crate) fn js_str_cmp(a: &str, b: &str) -> Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

/// V8's `Array.prototype.sort` (TimSort) for arrays shorter than 64 elements: one run found by
/// `CountAndMakeRun`, extended by `BinaryInsertionSort`. The comparator returns a JavaScript
/// number where `None` stands for NaN (which the sort reads as 0). Used where upstream's
/// comparator is inconsistent, so that the resulting order is V8's, not just "a" sorted order.
pub(crate) fn v8_sort<T: Clone>(v: &mut [T], cmp: impl Fn(&T, &T) -> Option<i64>) {
    let order = |a: &T, b: &T| cmp(a, b).unwrap_or(0);
    let n = v.len();
    if n < 2 {
        return;
    }
    // CountAndMakeRun(0, n)
    let mut run = 2;
    let descending = order(&v[1], &v[0]) < 0;
    for idx in 2..n {
        let o = order(&v[idx], &v[idx - 1]);
        if (descending && o >= 0) || (!descending && o < 0) {
            break;
        }
        run += 1;
    }
    if descending {
        v[..run].reverse();
    }
    // BinaryInsertionSort(0, run, n)
    for start in run..n {
        let pivot = v[start].clone();
        let (mut left, mut right) = (0, start);
        while left < right {
            let mid = left + ((right - left) >> 1);
            if order(&pivot, &v[mid]) < 0 {
                right = mid;
            } else {
                left = mid + 1;
            }
        }
        v[left..=start].rotate_right(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ip_checks() {
        assert!(node_is_ipv4("10.0.0.1"));
        assert!(!node_is_ipv4("010.0.0.1"));
        assert!(!node_is_ipv4("10.288.0.0"));
        assert!(node_is_ipv6("fd00::1"));
        assert!(node_is_ipv6("1:2:3:4:5:6:7::"));
        assert!(node_is_ipv6("::1:2:3:4:5:6:7"));
        assert!(!node_is_ipv6("::1:2:3:4:5:6:7:8"));
        assert!(!node_is_ipv6("fd00::12345"));
        assert!(!node_is_ipv6("1::2::3"));
        assert!(!node_is_ipv6(":1::"));
    }

    #[test]
    fn ip6addr_quirks() {
        assert!(ip6addr_parse("010.0.0.0").is_some());
        assert!(ip6addr_parse("00001::").is_some());
        assert!(ip6addr_parse("256.0.0.0").is_none());
        assert!(ip6addr_parse("1:::").is_none());
        assert_eq!(
            validate_subnet("10.8.0.0", "5", true),
            Err(SubnetProblem::BitsSet)
        );
        assert!(validate_subnet("10.8.0.0", "5", false).is_ok());
        assert_eq!(
            validate_subnet("10.8.0.0", "33", false),
            Err(SubnetProblem::BadPrefix)
        );
        assert!(validate_subnet("0.0.0.0", "0", true).is_ok());
    }

    #[test]
    fn v8_sort_matches_plain_sort_for_consistent_comparators() {
        let mut v = vec![5, 3, 9, 1, 1, 7, 2];
        v8_sort(&mut v, |a, b| Some(i64::from(*a) - i64::from(*b)));
        assert_eq!(v, vec![1, 1, 2, 3, 5, 7, 9]);
        let mut d = vec![9, 8, 7, 3];
        v8_sort(&mut d, |a, b| Some(i64::from(*a) - i64::from(*b)));
        assert_eq!(d, vec![3, 7, 8, 9]);
    }
}
