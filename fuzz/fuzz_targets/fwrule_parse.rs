//! Fuzz target: the fwrule parser and model never panic, and accepted rules round-trip
//! through their canonical text.
#![no_main]

use fabric::firewall::rule::{parse_tree, FwRule, ParseOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let opts = ParseOptions {
        max_version: match flags & 7 {
            0 | 5 => None,
            v => Some(u32::from(v) - 1),
        },
        enforce_subnet_mask: flags & 8 != 0,
    };
    let _ = parse_tree(text, &opts).map(|t| format!("{t:?}"));
    if let Ok(rule) = FwRule::create(text, &opts) {
        // Upstream drops `__proto__` tags, which can leave a side empty; such text does not
        // parse again (upstream's too), so only full rules must round-trip.
        if rule.from.is_empty() || rule.to.is_empty() {
            return;
        }
        let canonical = rule.text();
        let again = FwRule::create(&canonical, &opts).expect("canonical text parses");
        assert_eq!(again.text(), canonical, "canonical text is a fixed point");
    }
});
