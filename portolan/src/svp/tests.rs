//! Codec tests: the spec's vectors, error cases, and encode→decode property tests.

use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn decode_all(b: &[u8]) -> Frame {
    match decode_frame(b, DEFAULT_MAX_PAYLOAD).unwrap() {
        Decoded::Complete { frame, len } => {
            assert_eq!(len, b.len());
            frame
        }
        other => panic!("expected a complete frame, got {other:?}"),
    }
}

/// Checks that `frame` encodes to exactly `wire`, and that `wire` decodes back to `frame`.
fn vector(frame: Frame, wire: &str) {
    let wire = hex(wire);
    assert_eq!(frame.to_bytes(), wire, "encoding of {frame:?}");
    assert_eq!(frame.encoded_len(), wire.len());
    assert_eq!(decode_all(&wire), frame);
}

#[test]
fn spec_vector_ping() {
    vector(
        Frame::new(RequestId::from_u32(1), Message::Ping),
        "0001 0001 00000000 00000001 b5b66088",
    );
}

#[test]
fn spec_vector_pong() {
    vector(
        Frame::new(RequestId::from_u32(1), Message::Pong),
        "0001 0002 00000000 00000001 087c0c46",
    );
    vector(
        Frame::new(RequestId([1, 2, 3, 4]), Message::Pong),
        "0001 0002 00000000 01020304 1d3de02f",
    );
}

#[test]
fn spec_vector_vl2_req() {
    vector(
        Frame::new(
            RequestId::from_u32(2),
            Message::Vl2Req(Vl2Req {
                mac: "00:0a:95:9d:68:16".parse().unwrap(),
                vnet_id: 12340,
            }),
        ),
        "0001 0003 0000000c 00000002 3f23290d 000a959d6816 0000 00003034",
    );
}

#[test]
fn spec_vector_vl2_ack_notfound() {
    vector(
        Frame::new(
            RequestId::from_u32(9),
            Message::Vl2Ack(Vl2Ack {
                status: Status::NOT_FOUND,
                port: 0,
                addr: Ipv6Addr::UNSPECIFIED,
            }),
        ),
        "0001 0004 00000014 00000009 52700c4d 0002 0000 00000000000000000000000000000000",
    );
}

#[test]
fn spec_vector_vl3_ack_notfound() {
    vector(
        Frame::new(
            RequestId::from_u32(10),
            Message::Vl3Ack(Vl3Ack {
                status: Status::NOT_FOUND,
                mac: Mac::ZERO,
                port: 0,
                addr: Ipv6Addr::UNSPECIFIED,
            }),
        ),
        "0001 0006 0000001c 0000000a 987ad8fc 00000002 000000000000 0000 00000000000000000000000000000000",
    );
}

#[test]
fn id_bytes_are_opaque() {
    // The illumos client writes id 1 little-endian: 01 00 00 00. It must come back unchanged.
    let f = Frame::new(RequestId([1, 0, 0, 0]), Message::Ping);
    let b = f.to_bytes();
    assert_eq!(&b[8..12], &[1, 0, 0, 0]);
    assert_eq!(decode_all(&b).id, RequestId([1, 0, 0, 0]));
}

#[test]
fn payload_offsets() {
    let ip: Ipv6Addr = "::ffff:192.168.1.1".parse().unwrap();
    let b = Frame::new(
        RequestId::from_u32(3),
        Message::Vl3Ack(Vl3Ack {
            status: Status::OK,
            mac: Mac([1, 2, 3, 4, 5, 6]),
            port: 4789,
            addr: ip,
        }),
    )
    .to_bytes();
    let p = &b[HEADER_LEN..];
    assert_eq!(p.len(), 28);
    assert_eq!(&p[0..4], &[0, 0, 0, 0]);
    assert_eq!(&p[4..10], &[1, 2, 3, 4, 5, 6]);
    assert_eq!(&p[10..12], &4789u16.to_be_bytes());
    assert_eq!(&p[12..28], &ip.octets());

    let id = LogId([0xaa; 16]);
    let b = Frame::new(
        RequestId::from_u32(4),
        Message::LogAck(LogAck {
            status: Status::OK,
            records: vec![
                LogRecord::Vl2 {
                    id,
                    mac: Mac([1, 2, 3, 4, 5, 6]),
                    vnet_id: 7,
                },
                LogRecord::Vl3 {
                    id,
                    ip,
                    vlan: 9,
                    vnet_id: 7,
                },
            ],
        }),
    )
    .to_bytes();
    let p = &b[HEADER_LEN..];
    assert_eq!(p.len(), 4 + 32 + 44);
    let v2 = &p[4..36];
    assert_eq!(&v2[0..4], &[0, 0, 0, 1]);
    assert_eq!(&v2[4..20], &[0xaa; 16]);
    assert_eq!(&v2[20..26], &[1, 2, 3, 4, 5, 6]);
    assert_eq!(&v2[26..28], &[0, 0]);
    assert_eq!(&v2[28..32], &[0, 0, 0, 7]);
    let v3 = &p[36..];
    assert_eq!(&v3[0..4], &[0, 0, 0, 2]);
    assert_eq!(&v3[20..36], &ip.octets());
    assert_eq!(&v3[36..38], &[0, 0]);
    assert_eq!(&v3[38..40], &[0, 9]);
    assert_eq!(&v3[40..44], &[0, 0, 0, 7]);

    let b = Frame::new(
        RequestId::from_u32(5),
        Message::LogReq(LogReq { count: 1024, ip }),
    )
    .to_bytes();
    assert_eq!(&b[HEADER_LEN..HEADER_LEN + 4], &[0, 0, 4, 0]);
    let b = Frame::new(RequestId::from_u32(5), Message::LogRm(vec![id, id])).to_bytes();
    assert_eq!(b.len(), HEADER_LEN + 4 + 32);
    assert_eq!(&b[HEADER_LEN..HEADER_LEN + 4], &[0, 0, 0, 2]);
}

#[test]
fn incomplete_is_not_invalid() {
    let wire = hex("0001 0003 0000000c 00000002 3f23290d 000a959d6816 0000 00003034");
    for n in 0..wire.len() {
        let expect = if n < HEADER_LEN {
            HEADER_LEN
        } else {
            wire.len()
        };
        assert_eq!(
            decode_frame(&wire[..n], DEFAULT_MAX_PAYLOAD),
            Ok(Decoded::Incomplete { needed: expect }),
            "prefix of {n} bytes"
        );
    }
    // Trailing bytes of the next frame are left alone.
    let mut two = wire.clone();
    two.extend_from_slice(&wire[..5]);
    match decode_frame(&two, DEFAULT_MAX_PAYLOAD).unwrap() {
        Decoded::Complete { len, .. } => assert_eq!(len, wire.len()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_crc_is_rejected() {
    let mut wire = hex("0001 0001 00000000 00000001 b5b66088");
    wire[15] ^= 1;
    assert_eq!(
        decode_frame(&wire, DEFAULT_MAX_PAYLOAD),
        Err(FrameError::BadCrc {
            header: 0xb5b66089,
            computed: 0xb5b66088
        })
    );
    // A flipped payload bit is caught too.
    let mut wire = hex("0001 0003 0000000c 00000002 3f23290d 000a959d6816 0000 00003034");
    wire[20] ^= 0x80;
    assert!(matches!(
        decode_frame(&wire, DEFAULT_MAX_PAYLOAD),
        Err(FrameError::BadCrc { .. })
    ));
}

fn raw(version: u16, op: u16, size: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&version.to_be_bytes());
    b.extend_from_slice(&op.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    b
}

/// A frame with a correct CRC around an arbitrary payload.
fn with_crc(op: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = raw(1, op, payload.len() as u32);
    b.extend_from_slice(payload);
    let crc = crc32fast::hash(&b);
    b[12..16].copy_from_slice(&crc.to_be_bytes());
    b
}

#[test]
fn header_errors_need_no_payload() {
    let d = |b: &[u8]| decode_frame(b, DEFAULT_MAX_PAYLOAD);
    assert_eq!(d(&raw(2, 1, 0)), Err(FrameError::BadVersion { found: 2 }));
    assert_eq!(d(&raw(0, 1, 0)), Err(FrameError::BadVersion { found: 0 }));
    assert_eq!(d(&raw(1, 0, 0)), Err(FrameError::UnknownOp(0)));
    assert_eq!(d(&raw(1, 0x10, 0)), Err(FrameError::UnknownOp(0x10)));
    assert_eq!(d(&raw(1, 0xffff, 0)), Err(FrameError::UnknownOp(0xffff)));
    assert_eq!(d(&raw(1, 7, 4)), Err(FrameError::Unsupported(Op::BulkReq)));
    assert_eq!(
        d(&raw(1, 0x0d, 12)),
        Err(FrameError::Unsupported(Op::Shootdown))
    );
    assert_eq!(
        d(&raw(1, 0x0e, 40)),
        Err(FrameError::Unsupported(Op::RouteReq))
    );
    assert_eq!(
        d(&raw(1, 0x0b, u32::MAX)),
        Err(FrameError::Oversized {
            size: u32::MAX,
            max: DEFAULT_MAX_PAYLOAD
        })
    );
    assert_eq!(
        d(&raw(1, 1, 4)),
        Err(FrameError::BadSize {
            op: Op::Ping,
            size: 4,
            expected: 0
        })
    );
    assert_eq!(
        d(&raw(1, 5, 20)),
        Err(FrameError::BadSize {
            op: Op::Vl3Req,
            size: 20,
            expected: 24
        })
    );
}

#[test]
fn bulk_and_shootdown_with_valid_crc_are_rejected() {
    let d = |b: &[u8]| decode_frame(b, DEFAULT_MAX_PAYLOAD);
    assert_eq!(
        d(&with_crc(7, &[0, 0, 0, 1])),
        Err(FrameError::Unsupported(Op::BulkReq))
    );
    assert_eq!(
        d(&with_crc(0x0d, &[0; 12])),
        Err(FrameError::Unsupported(Op::Shootdown))
    );
}

#[test]
fn log_rm_count_must_match_size() {
    let d = |b: &[u8]| decode_frame(b, DEFAULT_MAX_PAYLOAD);
    let mut p = vec![0, 0, 0, 2];
    p.extend_from_slice(&[7; 16]);
    assert_eq!(
        d(&with_crc(0x0b, &p)),
        Err(FrameError::BadLogRmCount { count: 2, size: 20 })
    );
    assert_eq!(
        d(&with_crc(0x0b, &[0, 0])),
        Err(FrameError::BadLogRmCount { count: 0, size: 2 })
    );
    assert_eq!(
        d(&with_crc(0x0b, &[0, 0, 0, 0, 1])),
        Err(FrameError::BadLogRmCount { count: 0, size: 5 })
    );
    p[3] = 1;
    assert_eq!(
        decode_all(&with_crc(0x0b, &p)).message,
        Message::LogRm(vec![LogId([7; 16])])
    );
}

#[test]
fn log_ack_records_are_checked() {
    let d = |b: &[u8]| decode_frame(b, DEFAULT_MAX_PAYLOAD);
    assert_eq!(
        d(&with_crc(0x0a, &[0, 0])),
        Err(FrameError::ShortLogAck { size: 2 })
    );
    let mut p = vec![0, 0, 0, 0, 0, 0, 0, 3];
    p.extend_from_slice(&[0; 68]);
    assert_eq!(
        d(&with_crc(0x0a, &p)),
        Err(FrameError::BadLogRecordType {
            offset: 4,
            found: 3
        })
    );
    let mut p = vec![0, 0, 0, 0, 0, 0, 0, 2];
    p.extend_from_slice(&[0; 30]);
    assert_eq!(
        d(&with_crc(0x0a, &p)),
        Err(FrameError::TruncatedLogRecord {
            offset: 4,
            available: 34,
            expected: 44
        })
    );
    assert_eq!(
        d(&with_crc(0x0a, &[0, 0, 0, 0, 0, 0])),
        Err(FrameError::TruncatedLogRecord {
            offset: 4,
            available: 2,
            expected: 4
        })
    );
    // Empty OK log.
    assert_eq!(
        decode_all(&with_crc(0x0a, &[0, 0, 0, 0])).message,
        Message::LogAck(LogAck {
            status: Status::OK,
            records: vec![]
        })
    );
}

#[test]
fn vl2_ack_status_is_16_bits() {
    let f = Frame::new(
        RequestId::from_u32(1),
        Message::Vl2Ack(Vl2Ack {
            status: Status::FATAL,
            port: 4789,
            addr: Ipv6Addr::LOCALHOST,
        }),
    );
    let b = f.to_bytes();
    assert_eq!(&b[16..18], &[0, 1]);
    assert_eq!(decode_all(&b), f);
}

fn arb_ip() -> impl Strategy<Value = Ipv6Addr> {
    any::<[u8; 16]>().prop_map(Ipv6Addr::from)
}
fn arb_mac() -> impl Strategy<Value = Mac> {
    any::<[u8; 6]>().prop_map(Mac)
}
fn arb_record() -> impl Strategy<Value = LogRecord> {
    prop_oneof![
        (any::<[u8; 16]>(), arb_mac(), any::<u32>()).prop_map(|(id, mac, vnet_id)| {
            LogRecord::Vl2 {
                id: LogId(id),
                mac,
                vnet_id,
            }
        }),
        (any::<[u8; 16]>(), arb_ip(), any::<u16>(), any::<u32>()).prop_map(
            |(id, ip, vlan, vnet_id)| LogRecord::Vl3 {
                id: LogId(id),
                ip,
                vlan,
                vnet_id
            }
        ),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        Just(Message::Ping),
        Just(Message::Pong),
        (arb_mac(), any::<u32>())
            .prop_map(|(mac, vnet_id)| Message::Vl2Req(Vl2Req { mac, vnet_id })),
        (any::<u16>(), any::<u16>(), arb_ip()).prop_map(|(s, port, addr)| Message::Vl2Ack(
            Vl2Ack {
                status: Status(u32::from(s)),
                port,
                addr
            }
        )),
        (arb_ip(), any::<u32>(), any::<u32>()).prop_map(|(ip, l3_type, vnet_id)| {
            Message::Vl3Req(Vl3Req {
                ip,
                l3_type,
                vnet_id,
            })
        }),
        (any::<u32>(), arb_mac(), any::<u16>(), arb_ip()).prop_map(|(s, mac, port, addr)| {
            Message::Vl3Ack(Vl3Ack {
                status: Status(s),
                mac,
                port,
                addr,
            })
        }),
        (any::<u32>(), arb_ip()).prop_map(|(count, ip)| Message::LogReq(LogReq { count, ip })),
        (any::<u32>(), proptest::collection::vec(arb_record(), 0..40)).prop_map(|(s, records)| {
            Message::LogAck(LogAck {
                status: Status(s),
                records,
            })
        }),
        proptest::collection::vec(any::<[u8; 16]>().prop_map(LogId), 0..80)
            .prop_map(Message::LogRm),
        any::<u32>().prop_map(|s| Message::LogRmAck(Status(s))),
    ]
}

proptest! {
    #[test]
    fn encode_decode_round_trip(id in any::<[u8; 4]>(), message in arb_message()) {
        let frame = Frame::new(RequestId(id), message);
        let bytes = frame.to_bytes();
        prop_assert_eq!(bytes.len(), frame.encoded_len());
        match decode_frame(&bytes, DEFAULT_MAX_PAYLOAD) {
            Ok(Decoded::Complete { frame: back, len }) => {
                prop_assert_eq!(len, bytes.len());
                prop_assert_eq!(back, frame);
            }
            other => prop_assert!(false, "decode gave {:?}", other),
        }
    }

    #[test]
    fn stream_of_frames_decodes_in_order(messages in proptest::collection::vec(arb_message(), 1..8), cut in any::<usize>()) {
        let mut stream = Vec::new();
        let frames: Vec<Frame> = messages.into_iter().enumerate()
            .map(|(i, m)| Frame::new(RequestId::from_u32(i as u32), m)).collect();
        for f in &frames { f.encode(&mut stream); }
        // Feed the stream in two pieces split at an arbitrary point, as a socket might.
        let cut = cut % (stream.len() + 1);
        let mut buf = stream[..cut].to_vec();
        let mut rest = &stream[cut..];
        let mut got = Vec::new();
        loop {
            match decode_frame(&buf, DEFAULT_MAX_PAYLOAD) {
                Ok(Decoded::Complete { frame, len }) => { got.push(frame); buf.drain(..len); }
                Ok(Decoded::Incomplete { needed }) => {
                    prop_assert!(needed > buf.len());
                    if rest.is_empty() { break; }
                    buf.extend_from_slice(rest);
                    rest = &[];
                }
                Err(e) => { prop_assert!(false, "error {}", e); }
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_frame(&b, DEFAULT_MAX_PAYLOAD);
    }

    #[test]
    fn any_single_bit_flip_is_detected(message in arb_message(), bit in any::<usize>()) {
        let bytes = Frame::new(RequestId::from_u32(1), message).to_bytes();
        let mut bad = bytes.clone();
        let bit = bit % (bad.len() * 8);
        bad[bit / 8] ^= 1 << (bit % 8);
        // Whatever field the flip lands in, the result is never a different valid frame.
        match decode_frame(&bad, DEFAULT_MAX_PAYLOAD) {
            Ok(Decoded::Complete { .. }) => prop_assert!(false, "flip of bit {} went unnoticed", bit),
            Ok(Decoded::Incomplete { .. }) | Err(_) => {}
        }
    }
}
