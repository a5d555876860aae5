//! Fuzz target: the control plane's request parameters, built exactly as every handler gets
//! them (`Params::parse`: query string + JSON or form body with its content type), then read
//! through the typed getters the handlers use. Nothing panics, and every refusal is a
//! restify-shaped client error (400 `InvalidContent`, 415 `UnsupportedMediaType` or 422
//! `InvalidParameters` naming fields).
#![no_main]

use fabric::control::params::Params;
use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 8] = [
    None,
    Some("application/json"),
    Some("application/x-www-form-urlencoded"),
    Some("application/json; charset=utf-8"),
    Some("Application/X-WWW-Form-Urlencoded ; charset=utf-8"),
    Some("text/plain"),
    Some(""),
    Some(";"),
];

fn check_refusal(e: &fabric::control::error::ApiError) {
    let ok = matches!(
        (e.status, e.code),
        (400, "InvalidContent") | (415, "UnsupportedMediaType") | (422, "InvalidParameters")
    );
    assert!(ok, "unexpected refusal {} {}: {}", e.status, e.code, e.message);
    let body = e.body();
    assert!(body["code"].is_string() && body["message"].is_string(), "{body}");
    if e.status == 422 {
        let errors = body["errors"].as_array().expect("422 lists its field errors");
        assert!(!errors.is_empty(), "{body}");
        for f in errors {
            assert!(f["code"].is_string(), "{body}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let ct = TYPES[usize::from(sel & 7)];
    // With the high bit set, the bytes before the first NUL are the query string.
    let (query, body) = match (sel & 0x80 != 0, rest.iter().position(|b| *b == 0)) {
        (true, Some(i)) => (std::str::from_utf8(&rest[..i]).ok(), &rest[i + 1..]),
        _ => (None, rest),
    };
    let mut p = match Params::parse(query, ct, body) {
        Ok(p) => p,
        Err(e) => return check_refusal(&e),
    };
    // The getters handlers call, on names a NAPI request carries.
    let _ = p.text("name", 64);
    let _ = p.uuid("owner_uuid");
    let _ = p.uuid_array("owner_uuids");
    let _ = p.string_array("resolvers");
    let _ = p.boolean("primary");
    let _ = p.int_in("vlan_id", 0, 4094, "VLAN ID must be a number between 0 and 4094");
    let _ = p.ipv4("gateway");
    let _ = p.ipv4_array("routes");
    let _ = p.one_of("belongs_to_type", &["other", "server", "zone"]);
    let _ = p.pagination();
    let _ = p.fields(&["name", "uuid", "vlan_id"]);
    let _ = p.require("mtu", None::<i64>);
    p.allow_only(&[
        "name",
        "owner_uuid",
        "owner_uuids",
        "resolvers",
        "primary",
        "vlan_id",
        "gateway",
        "routes",
        "belongs_to_type",
        "limit",
        "offset",
        "fields",
        "mtu",
    ]);
    if let Err(e) = p.finish() {
        check_refusal(&e);
    }
});
