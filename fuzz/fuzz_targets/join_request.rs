//! Fuzz target: what a joining or renewing host sends that the head parses before trusting it:
//! the join token (`JoinToken::parse`, also what an operator pastes) and the certificate request
//! (`ClusterCa::issue_host`, PEM text straight from `POST /join`), plus `peer_of_cert` on
//! arbitrary DER. Nothing panics; a bad request is a `PkiError::Request`, never a signature.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use fabric::pki::ca::ClusterCa;
use fabric::pki::token::JoinToken;
use fabric::pki::PkiError;
use libfuzzer_sys::fuzz_target;

fn ca() -> &'static ClusterCa {
    static CA: OnceLock<ClusterCa> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fabric-fuzz-ca-{}", std::process::id()));
        ClusterCa::create_or_load(&dir).expect("a CA for the fuzzer")
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = JoinToken::parse(&text) {
        assert_eq!(JoinToken::parse(&t.render()).unwrap(), t);
    }
    match ca().issue_host(&text, "11111111-2222-3333-4444-555555555555", Duration::from_secs(60)) {
        Ok(_) | Err(PkiError::Request(_)) => {}
        Err(e) => panic!("a bad request must be the requester's error, not {e}"),
    }
    let _ = fabric::pki::tls::peer_of_cert(data);
});
