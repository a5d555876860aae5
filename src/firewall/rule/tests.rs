//! Unit and property tests for the fwrule language.

use super::*;
use proptest::prelude::*;

const U1: &str = "b0b0b0b0-0000-4000-8000-000000000001";

fn canon(s: &str) -> String {
    match FwRule::create(s, &ParseOptions::default()) {
        Ok(r) => r.text(),
        Err(e) => panic!("{s}: {e}"),
    }
}

fn class(s: &str, opts: ParseOptions) -> ErrorClass {
    match FwRule::create(s, &opts) {
        Ok(r) => panic!("{s} accepted as {}", r.text()),
        Err(e) => e.class(),
    }
}

#[test]
fn canonical_text_examples() {
    assert_eq!(
        canon("from tag sdc_docker to tag sdc_docker allow tcp port all"),
        r#"FROM tag "sdc_docker" TO tag "sdc_docker" ALLOW tcp PORT all"#
    );
    assert_eq!(
        canon(&format!(
            "FROM any TO vm {U1} ALLOW tcp ports 443,80, 8000-8100"
        )),
        format!("FROM any TO vm {U1} ALLOW tcp PORTS 80, 443, 8000 - 8100")
    );
    assert_eq!(
        canon("FROM (tag b OR tag a = x OR tag a OR ip 10.0.0.2 OR ip 10.0.0.1) TO all vms BLOCK udp (PORT 81 AND PORT 80) PRIORITY 010"),
        r#"FROM (ip 10.0.0.1 OR ip 10.0.0.2 OR tag "a" OR tag "b") TO all vms BLOCK udp (PORT 80 AND PORT 81) PRIORITY 10"#
    );
    assert_eq!(
        canon("FROM any TO all vms ALLOW icmp (TYPE 8 CODE 0 AND TYPE 3)"),
        "FROM any TO all vms ALLOW icmp (TYPE 3 AND TYPE 8 CODE 0)"
    );
    assert_eq!(
        canon("FROM all vms TO tag \"a\\u00a0(b)\" ALLOW esp PRIORITY 0"),
        "FROM all vms TO tag \"a\\u00A0\\(b\\)\" ALLOW esp"
    );
}

#[test]
fn error_classes() {
    let d = ParseOptions::default();
    assert_eq!(
        class("FROM any TO any ALLOW tcp PORT 80", d),
        ErrorClass::Model
    );
    assert_eq!(
        class("From any TO all vms ALLOW tcp PORT 80", d),
        ErrorClass::Syntax
    );
    assert_eq!(
        class("FROM any TO all vms ALLOW tcp PORT 0", d),
        ErrorClass::Value
    );
    assert_eq!(
        class("FROM ip 10.288.0.0 TO all vms ALLOW tcp PORT 80", d),
        ErrorClass::Value
    );
    // LALR lookahead: `)` may follow an address, so the value check runs first.
    assert_eq!(
        class("FROM ip 10.288.0.0 ) TO all vms ALLOW tcp PORT 80", d),
        ErrorClass::Value
    );
    assert_eq!(class("FROM ip 10.288.0.0 ANY", d), ErrorClass::Syntax);
    assert_eq!(
        class("FROM any TO all vms ALLOW tcp PORT 0 )", d),
        ErrorClass::Value
    );
    assert_eq!(
        class("FROM any TO all vms ALLOW tcp PORT 101 PRIORITY 101 x", d),
        ErrorClass::Value
    );
    assert_eq!(class("", d), ErrorClass::Value);
    assert_eq!(class(" ", d), ErrorClass::Syntax);
    let v1 = ParseOptions {
        max_version: Some(1),
        enforce_subnet_mask: false,
    };
    assert_eq!(
        class("FROM any TO all vms ALLOW tcp PORTS 1-2", v1),
        ErrorClass::Version
    );
    assert_eq!(
        class("FROM any TO all vms ALLOW tcp PORTS 1-2 )", v1),
        ErrorClass::Syntax
    );
    let enforce = ParseOptions {
        max_version: None,
        enforce_subnet_mask: true,
    };
    assert_eq!(
        class(
            "FROM subnet 10.8.0.0/5 TO all vms ALLOW tcp PORT 1",
            enforce
        ),
        ErrorClass::Value
    );
    assert_eq!(
        class("FROM ip fd00::1 TO all vms ALLOW icmp TYPE 8", d),
        ErrorClass::Model
    );
}

#[test]
fn limits_and_proto_quirk() {
    let ports: Vec<String> = (1..=25).map(|p| p.to_string()).collect();
    let r = format!("FROM any TO all vms ALLOW tcp PORTS {}", ports.join(","));
    assert_eq!(class(&r, ParseOptions::default()), ErrorClass::Value);
    let nine = format!(
        "FROM any TO all vms ALLOW tcp PORTS {}",
        ports[..9].join(",")
    );
    assert!(FwRule::create(&nine, &ParseOptions::default()).is_ok());
    // maxVersion 0: the parser allows everything, the port limit is the old one.
    let zero = ParseOptions {
        max_version: Some(0),
        enforce_subnet_mask: false,
    };
    assert_eq!(class(&nine, zero), ErrorClass::Value);
    // `__proto__` tags vanish, as in upstream's JavaScript object model.
    assert_eq!(
        class(
            "FROM tag __proto__ TO any ALLOW tcp PORT 1",
            ParseOptions::default()
        ),
        ErrorClass::Model
    );
}

#[test]
fn parse_tree_json_shape() {
    let t = parse_tree(
        &format!("FROM (tag a = 1 OR ip 10.0.0.1) TO vm {U1} ALLOW tcp PORTS 5-6, 1 PRIORITY 3"),
        &ParseOptions::default(),
    )
    .unwrap();
    let j = serde_json::to_string(&t).unwrap();
    assert_eq!(
        j,
        format!(
            r#"{{"from":[["tag",["a","1"]],["ip","10.0.0.1"]],"to":[["vm","{U1}"]],"action":"allow","protocol":{{"name":"tcp","targets":[{{"start":5,"end":6}},1]}},"priority":3}}"#
        )
    );
}

/// A generator of valid rule texts over the whole language.
fn arb_target() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u8..=254, 0u8..=255, 0u8..=255, 1u8..=254)
            .prop_map(|(a, b, c, d)| format!("ip {a}.{b}.{c}.{d}")),
        (any::<u16>(), any::<u16>())
            .prop_map(|(a, b)| format!("ip fd{:02x}:{a:x}::{b:x}", a % 256)),
        (1u8..=223, 0u8..=32).prop_map(|(a, l)| format!("subnet {a}.0.0.0/{l}")),
        "[a-z_][a-z0-9_-]{0,8}".prop_map(|t| format!("tag {t}")),
        ("[a-z]{1,5}", "[ -~]{0,6}").prop_map(|(n, v)| format!("tag {n} = {}", quote(&v))),
        any::<u128>().prop_map(|u| {
            let h = format!("{u:032x}");
            format!(
                "vm {}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }),
    ]
}

fn arb_side() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("any".to_string()),
        Just("all vms".to_string()),
        Just("(ALL VMS)".to_string()),
        proptest::collection::vec(arb_target(), 1..5)
            .prop_map(|ts| format!("({})", ts.join(" OR "))),
        arb_target(),
    ]
}

fn arb_proto() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u16..=65535).prop_map(|p| format!("tcp PORT {p}")),
        Just("udp PORT all".to_string()),
        proptest::collection::vec(1u16..=65535, 1..6).prop_map(|ps| format!(
            "tcp ({})",
            ps.iter()
                .map(|p| format!("PORT {p}"))
                .collect::<Vec<_>>()
                .join(" AND ")
        )),
        proptest::collection::vec((1u16..=60000, 0u16..100), 1..6).prop_map(|rs| format!(
            "udp PORTS {}",
            rs.iter()
                .map(|(a, d)| if *d % 2 == 0 {
                    format!("{a}")
                } else {
                    format!("{a}-{}", a + d)
                })
                .collect::<Vec<_>>()
                .join(",")
        )),
        proptest::collection::vec((0u16..=255, proptest::option::of(0u16..=255)), 1..5).prop_map(
            |ts| format!(
                "icmp6 ({})",
                ts.iter()
                    .map(|(t, c)| match c {
                        Some(c) => format!("TYPE {t} CODE {c}"),
                        None => format!("TYPE {t}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" AND ")
            )
        ),
        Just("ah".to_string()),
        Just("esp".to_string()),
        Just("icmp6 TYPE all".to_string()),
    ]
}

fn arb_rule() -> impl Strategy<Value = String> {
    (
        arb_side(),
        arb_side(),
        any::<bool>(),
        arb_proto(),
        proptest::option::of(0u8..=100),
    )
        .prop_map(|(f, t, a, p, pr)| {
            let mut s = format!("FROM {f} TO {t} {} {p}", if a { "ALLOW" } else { "BLOCK" });
            if let Some(pr) = pr {
                s.push_str(&format!(" PRIORITY {pr}"));
            }
            s
        })
}

proptest! {
    /// parse -> text -> parse is stable: the canonical text parses to the same model and
    /// prints to itself.
    #[test]
    fn canonical_text_round_trips(rule in arb_rule()) {
        let opts = ParseOptions::default();
        if let Ok(r) = FwRule::create(&rule, &opts).map_err(|e| e.class()) {
            prop_assume!(!r.from.is_empty() && !r.to.is_empty());
            let text = r.text();
            let again = FwRule::create(&text, &opts).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            prop_assert_eq!(&again.text(), &text);
            prop_assert_eq!(again, r);
        }
    }

    /// No input makes the parser panic; every rejection has a class.
    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,80}") {
        let _ = FwRule::create(&s, &ParseOptions::default()).map_err(|e| e.class());
    }

    /// Token soup built from the language's own words never panics either.
    #[test]
    fn token_soup_never_panics(words in proptest::collection::vec(prop_oneof![
        Just("FROM"), Just("TO"), Just("any"), Just("all"), Just("vms"), Just("("), Just(")"),
        Just("OR"), Just("AND"), Just("tag"), Just("ip"), Just("10.0.0.1"), Just("fd00::1"),
        Just("subnet"), Just("/24"), Just("ALLOW"), Just("BLOCK"), Just("tcp"), Just("icmp6"),
        Just("PORT"), Just("PORTS"), Just("80"), Just("-"), Just(","), Just("TYPE"), Just("CODE"),
        Just("PRIORITY"), Just("="), Just("\"x\""), Just("esp"),
    ], 0..20)) {
        let s = words.join(" ");
        let _ = FwRule::create(&s, &ParseOptions::default());
    }
}
