//! Fuzz the tunnel's frame decoder (`control::tunnel::proto`): arbitrary bytes, decoded as a
//! stream of frames as the control plane and the agent read them. Every decoded frame must
//! re-encode to exactly the bytes it came from, a frame never claims more bytes than it has,
//! and nothing may panic; the same bytes fed in two pieces (as HTTP/2 data frames split them)
//! decode to the same frames.
#![no_main]

use fabric::control::tunnel::proto::{Frame, HEADER, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fn decode_all(data: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Ok(Some((f, n))) = Frame::decode(&data[at..]) {
        assert!(n >= HEADER && n <= data.len() - at && n <= HEADER + MAX_FRAME);
        let mut again = Vec::new();
        f.encode(&mut again);
        assert_eq!(&again[..], &data[at..at + n]);
        out.push(f);
        at += n;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let whole = decode_all(data);
    if data.is_empty() {
        return;
    }
    // Reassembly from two pieces, as the readers do it.
    let cut = data[0] as usize % data.len();
    let mut buf = data[..cut].to_vec();
    let mut got = Vec::new();
    let mut at = 0;
    for piece in [&data[cut..], &[][..]] {
        loop {
            match Frame::decode(&buf[at..]) {
                Ok(Some((f, n))) => {
                    got.push(f);
                    at += n;
                }
                _ => break,
            }
        }
        buf.extend_from_slice(piece);
    }
    assert_eq!(got, whole);
});
