//! Sans-IO matching of the kernel's answers to one rtnetlink request.
//!
//! A request carries a sequence number and `NLM_F_ACK`. Its answer is, for a plain request,
//! zero or more data messages and then an `NLMSG_ERROR` (code 0 is the ACK); for a dump
//! (`NLM_F_DUMP`), data messages spread over any number of datagrams (`NLM_F_MULTI`) and then
//! `NLMSG_DONE`. Messages with another sequence number are left-overs of an earlier request
//! that was abandoned (an error mid-dump, a timeout) and are skipped. A dump part flagged
//! `NLM_F_DUMP_INTR` means the table changed while it was walked: the dump is read to its end
//! and reported as [`Failure::Interrupted`] so the caller can ask again.

use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NetlinkBuffer, NlasIterator, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP,
    NLMSG_OVERRUN, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP_INTR,
};

/// `NLMSGERR_ATTR_MSG`: the extended ACK's human-readable reason.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;

/// Receives each data message answering the request: `(message_type, payload)`; an `Err`
/// (what was wrong) ends the exchange as malformed.
pub(super) type OnReply<'a> = dyn FnMut(u16, &[u8]) -> Result<(), String> + 'a;

/// Where an exchange stands after a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    /// The answer is not complete: receive another datagram.
    More,
    /// ACK or end of dump received: the request succeeded.
    Finished,
}

/// Why an exchange ended without success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// The kernel refused the request: positive errno, and its extended-ACK message if any.
    Kernel { errno: i32, detail: Option<String> },
    /// The dump was interrupted by a concurrent change (`NLM_F_DUMP_INTR`); ask again.
    Interrupted,
    /// The answer could not be parsed.
    Malformed(String),
}

/// The state of one request's exchange.
#[derive(Debug)]
pub(super) struct Exchange {
    seq: u32,
    dump: bool,
    interrupted: bool,
}

impl Exchange {
    /// Starts matching answers to the request sent with `seq`.
    pub(super) fn new(seq: u32, dump: bool) -> Self {
        Self {
            seq,
            dump,
            interrupted: false,
        }
    }

    /// Feeds one received datagram. Each data message answering this request is handed to
    /// `reply(message_type, payload)`; an `Err` from it ends the exchange as malformed.
    pub(super) fn feed(
        &mut self,
        datagram: &[u8],
        reply: &mut OnReply<'_>,
    ) -> Result<Progress, Failure> {
        let mut rest = datagram;
        while !rest.is_empty() {
            let msg = NetlinkBuffer::new_checked(rest)
                .map_err(|e| Failure::Malformed(format!("bad nlmsghdr: {e}")))?;
            let len = msg.length() as usize;
            let (ty, flags, seq) = (msg.message_type(), msg.flags(), msg.sequence_number());
            let payload = &rest[NLMSG_HDRLEN..len];
            rest = &rest[align4(len).min(rest.len())..];
            if seq != self.seq {
                continue;
            }
            if flags & NLM_F_DUMP_INTR != 0 {
                self.interrupted = true;
            }
            match ty {
                NLMSG_NOOP => {}
                NLMSG_ERROR => {
                    let err = ErrorBuffer::new_checked(payload)
                        .map_err(|e| Failure::Malformed(format!("bad NLMSG_ERROR: {e}")))?;
                    return match err.code() {
                        None => Ok(Progress::Finished),
                        Some(code) => Err(Failure::Kernel {
                            errno: code.get().saturating_abs(),
                            detail: extack_message(flags, payload),
                        }),
                    };
                }
                NLMSG_DONE => {
                    // The kernel may send a bare NLMSG_DONE without the error code.
                    let code = match DoneBuffer::new_checked(payload) {
                        Ok(done) => done.code(),
                        Err(_) if payload.is_empty() => 0,
                        Err(e) => return Err(Failure::Malformed(format!("bad NLMSG_DONE: {e}"))),
                    };
                    if !self.dump {
                        return Err(Failure::Malformed(
                            "NLMSG_DONE answering a request that is not a dump".into(),
                        ));
                    }
                    return if code != 0 {
                        Err(Failure::Kernel {
                            errno: code.saturating_abs(),
                            detail: None,
                        })
                    } else if self.interrupted {
                        Err(Failure::Interrupted)
                    } else {
                        Ok(Progress::Finished)
                    };
                }
                NLMSG_OVERRUN => return Err(Failure::Malformed("NLMSG_OVERRUN: data lost".into())),
                _ => reply(ty, payload).map_err(Failure::Malformed)?,
            }
        }
        Ok(Progress::More)
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The extended ACK's message: the TLVs follow the echoed request (its header alone when the
/// kernel capped it).
fn extack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = payload.get(4..)?;
    let echoed_len = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        u32::from_ne_bytes(echoed.get(..4)?.try_into().ok()?) as usize
    };
    let tlvs = echoed.get(align4(echoed_len)..)?;
    NlasIterator::new(tlvs)
        .map_while(Result::ok)
        .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
        .map(|nla| {
            let v = nla.value();
            let v = v.strip_suffix(&[0]).unwrap_or(v);
            String::from_utf8_lossy(v).into_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NLMSG_ALIGNTO, NLM_F_MULTIPART};

    /// One netlink message: header and payload, padded.
    fn msg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % NLMSG_ALIGNTO as usize != 0 {
            m.push(0);
        }
        m
    }

    fn error(code: i32, echoed: &[u8]) -> Vec<u8> {
        let mut p = code.to_ne_bytes().to_vec();
        p.extend_from_slice(echoed);
        p
    }

    fn collect(ex: &mut Exchange, d: &[u8]) -> (Result<Progress, Failure>, Vec<u16>) {
        let mut seen = Vec::new();
        let r = ex.feed(d, &mut |ty, _| {
            seen.push(ty);
            Ok(())
        });
        (r, seen)
    }

    #[test]
    fn ack_finishes_and_stale_answers_are_skipped() {
        let mut ex = Exchange::new(7, false);
        let mut d = msg(NLMSG_ERROR, 0, 6, &error(-17, &[0; 16])); // the previous request's
        d.extend(msg(16, 0, 7, &[0; 16]));
        d.extend(msg(NLMSG_ERROR, 0, 7, &error(0, &[0; 16])));
        let (r, seen) = collect(&mut ex, &d);
        assert_eq!((r, seen), (Ok(Progress::Finished), vec![16]));
    }

    #[test]
    fn kernel_error_carries_errno_and_extack_message() {
        let mut ex = Exchange::new(3, false);
        // Capped echo (16 bytes of the request header), then NLMSGERR_ATTR_MSG.
        let mut p = error(-22, &[0; 16]);
        let text = b"Invalid prefix length\0";
        p.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        p.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        p.extend_from_slice(text);
        let d = msg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 3, &p);
        assert_eq!(
            collect(&mut ex, &d).0,
            Err(Failure::Kernel {
                errno: 22,
                detail: Some("Invalid prefix length".into())
            })
        );
        // Without TLVs: the errno alone.
        let d = msg(NLMSG_ERROR, 0, 3, &error(-19, &[0; 16]));
        assert_eq!(
            Exchange::new(3, false).feed(&d, &mut |_, _| Ok(())),
            Err(Failure::Kernel {
                errno: 19,
                detail: None
            })
        );
    }

    #[test]
    fn dump_spans_datagrams_until_done() {
        let mut ex = Exchange::new(9, true);
        let part = |n: usize| {
            let mut d = Vec::new();
            for _ in 0..n {
                d.extend(msg(16, NLM_F_MULTIPART, 9, &[0; 16]));
            }
            d
        };
        assert_eq!(
            collect(&mut ex, &part(3)),
            (Ok(Progress::More), vec![16; 3])
        );
        let mut last = part(2);
        last.extend(msg(NLMSG_DONE, NLM_F_MULTIPART, 9, &0i32.to_ne_bytes()));
        assert_eq!(
            collect(&mut ex, &last),
            (Ok(Progress::Finished), vec![16; 2])
        );
        // A bare NLMSG_DONE (no code) also ends a dump.
        let bare = msg(NLMSG_DONE, NLM_F_MULTIPART, 1, &[]);
        assert_eq!(
            collect(&mut Exchange::new(1, true), &bare).0,
            Ok(Progress::Finished)
        );
        // An error code in NLMSG_DONE fails the dump.
        let bad = msg(NLMSG_DONE, NLM_F_MULTIPART, 1, &(-16i32).to_ne_bytes());
        assert!(matches!(
            collect(&mut Exchange::new(1, true), &bad).0,
            Err(Failure::Kernel { errno: 16, .. })
        ));
    }

    #[test]
    fn interrupted_dump_is_reported_at_its_end() {
        let mut ex = Exchange::new(4, true);
        let d = msg(16, NLM_F_MULTIPART | NLM_F_DUMP_INTR, 4, &[0; 16]);
        assert_eq!(collect(&mut ex, &d).0, Ok(Progress::More));
        let done = msg(NLMSG_DONE, NLM_F_MULTIPART, 4, &0i32.to_ne_bytes());
        assert_eq!(collect(&mut ex, &done).0, Err(Failure::Interrupted));
    }

    #[test]
    fn malformed_datagrams_fail_without_panicking() {
        let cases: Vec<Vec<u8>> = vec![
            vec![1, 2, 3],
            // nlmsg_len larger than the datagram
            {
                let mut m = msg(16, 0, 1, &[0; 4]);
                m[0] = 200;
                m
            },
            // nlmsg_len shorter than a header
            {
                let mut m = msg(16, 0, 1, &[0; 4]);
                m[..4].copy_from_slice(&8u32.to_ne_bytes());
                m
            },
            // NLMSG_ERROR without its code
            msg(NLMSG_ERROR, 0, 1, &[0, 0]),
            msg(NLMSG_OVERRUN, 0, 1, &[]),
        ];
        for d in cases {
            let r = Exchange::new(1, false).feed(&d, &mut |_, _| Ok(()));
            assert!(matches!(r, Err(Failure::Malformed(_))), "{d:?}: {r:?}");
        }
        // A reply the caller cannot parse ends the exchange as malformed.
        let d = msg(16, 0, 1, &[0; 4]);
        let r = Exchange::new(1, false).feed(&d, &mut |_, _| Err("short".into()));
        assert_eq!(r, Err(Failure::Malformed("short".into())));
        // DONE answering a plain request is a protocol error.
        let d = msg(NLMSG_DONE, 0, 1, &0i32.to_ne_bytes());
        assert!(matches!(
            Exchange::new(1, false).feed(&d, &mut |_, _| Ok(())),
            Err(Failure::Malformed(_))
        ));
        // Extended ACK TLVs that run past the end are ignored, not trusted.
        assert_eq!(
            extack_message(NLM_F_ACK_TLVS, &error(-1, &[255, 0, 0, 0])),
            None
        );
    }
}
