//! A container's captured output: a bounded log of two files (`log`, and `log.1` before it),
//! written by the shim from the process's first byte, read by `docker logs` and by attach's
//! replay.
//!
//! A record is `[stream u8][time ns i64 LE][len u32 LE][bytes]`. The writer cuts output at
//! newlines (one record per line, a partial line is a record of its own, as moby's json-file
//! driver does), so "the last N lines" is the last N records. When `log` would grow past the
//! limit it becomes `log.1` (the older `log.1` is dropped) and a new `log` starts: the log
//! never holds more than twice the limit. A record cut short (the shim died mid-write, the disk
//! filled) ends the file for the reader: a torn tail is tolerated, never an error.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The current log file's name in the container directory.
pub const LOG_FILE: &str = "log";
/// The previous log file's name.
pub const LOG_OLD: &str = "log.1";
/// Default size limit of each of the two files.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 20;
/// Record header length.
pub const RECORD_HEADER: usize = 13;
/// Largest payload of one record (longer lines are split).
pub const MAX_RECORD: usize = 16 << 10;

/// Which output a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output (all output of a process with a terminal).
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    fn byte(self) -> u8 {
        match self {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }
    fn from_byte(b: u8) -> Option<Stream> {
        match b {
            1 => Some(Stream::Stdout),
            2 => Some(Stream::Stderr),
            _ => None,
        }
    }
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Which output.
    pub stream: Stream,
    /// When the shim read it (unix ns).
    pub time_ns: i64,
    /// The bytes (at most one line, with its newline if it had one).
    pub data: Vec<u8>,
}

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.stream.byte());
        out.extend_from_slice(&self.time_ns.to_le_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.data);
    }

    /// Decodes one record from the front of `buf`: `None` when `buf` holds no complete record
    /// (a torn tail) or the bytes are not a record (the rest of the file is then ignored).
    fn decode(buf: &[u8]) -> Option<(Record, usize)> {
        if buf.len() < RECORD_HEADER {
            return None;
        }
        let stream = Stream::from_byte(buf[0])?;
        let time_ns = i64::from_le_bytes(buf[1..9].try_into().ok()?);
        let len = u32::from_le_bytes(buf[9..13].try_into().ok()?) as usize;
        if len > MAX_RECORD || buf.len() < RECORD_HEADER + len {
            return None;
        }
        Some((
            Record {
                stream,
                time_ns,
                data: buf[RECORD_HEADER..RECORD_HEADER + len].to_vec(),
            },
            RECORD_HEADER + len,
        ))
    }

    /// The bytes `docker logs` shows for this record: with `timestamps`, each line prefixed
    /// by its RFC 3339 time with nanoseconds and a space.
    pub fn render(&self, timestamps: bool) -> Vec<u8> {
        if !timestamps {
            return self.data.clone();
        }
        let mut out = rfc3339_nano(self.time_ns).into_bytes();
        out.push(b' ');
        out.extend_from_slice(&self.data);
        out
    }
}

/// `2026-12-03T19:04:38.123456789Z` (moby's RFC3339Nano: trailing zeros of the fraction
/// dropped).
pub fn rfc3339_nano(ns: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ns as i128)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let frac = format!("{:09}", t.nanosecond());
    let frac = frac.trim_end_matches('0');
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{}{}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        if frac.is_empty() { "" } else { "." },
        frac
    )
}

/// Now, in unix ns.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Appends output to a container's log, rotating at the limit.
pub struct LogWriter {
    dir: PathBuf,
    file: File,
    size: u64,
    max: u64,
    buf: Vec<u8>,
    /// Times the log was rotated by this writer.
    pub rotations: u64,
}

impl LogWriter {
    /// Opens (appending) the log in container directory `dir`, each file at most `max` bytes.
    pub fn open(dir: &Path, max: u64) -> io::Result<LogWriter> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LOG_FILE))?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            dir: dir.to_owned(),
            file,
            size,
            max: max.max(RECORD_HEADER as u64 + MAX_RECORD as u64),
            buf: Vec::new(),
            rotations: 0,
        })
    }

    /// Records `data` read from `stream` at `time_ns`: one record per line.
    pub fn write(&mut self, stream: Stream, time_ns: i64, data: &[u8]) -> io::Result<()> {
        for line in split_lines(data) {
            let rec_len = (RECORD_HEADER + line.len()) as u64;
            if self.size > 0 && self.size + rec_len > self.max {
                self.rotate()?;
            }
            self.buf.clear();
            Record {
                stream,
                time_ns,
                data: line.to_vec(),
            }
            .encode(&mut self.buf);
            self.file.write_all(&self.buf)?;
            self.size += rec_len;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(self.dir.join(LOG_FILE), self.dir.join(LOG_OLD))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(LOG_FILE))?;
        self.size = 0;
        self.rotations += 1;
        Ok(())
    }
}

/// Cuts `data` after each newline and every [`MAX_RECORD`] bytes.
fn split_lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .iter()
            .take(MAX_RECORD)
            .position(|b| *b == b'\n')
            .map(|i| i + 1)
            .unwrap_or(rest.len().min(MAX_RECORD));
        let (a, b) = rest.split_at(end);
        rest = b;
        Some(a)
    })
}

/// What `docker logs` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogQuery {
    /// Include stdout.
    pub stdout: bool,
    /// Include stderr.
    pub stderr: bool,
    /// Only records at or after this time (unix ns).
    pub since_ns: Option<i64>,
    /// Only records before this time (unix ns).
    pub until_ns: Option<i64>,
    /// Only the last N lines of what the other filters keep.
    pub tail: Option<u64>,
}

impl LogQuery {
    /// Whether `r` passes the stream and time filters (not `tail`).
    pub fn keeps(&self, r: &Record) -> bool {
        let stream = match r.stream {
            Stream::Stdout => self.stdout,
            Stream::Stderr => self.stderr,
        };
        stream
            && self.since_ns.is_none_or(|s| r.time_ns >= s)
            && self.until_ns.is_none_or(|u| r.time_ns < u)
    }

    /// The records of `all` this query selects, in order.
    pub fn select(&self, all: Vec<Record>) -> Vec<Record> {
        let mut v: Vec<Record> = all.into_iter().filter(|r| self.keeps(r)).collect();
        if let Some(n) = self.tail {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if v.len() > n {
                v.drain(..v.len() - n);
            }
        }
        v
    }
}

/// Decodes the complete records at the front of `buf`; returns them and how many bytes they
/// took (the rest is a torn tail, or garbage).
pub fn decode_all(buf: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((r, n)) = Record::decode(&buf[at..]) {
        out.push(r);
        at += n;
    }
    (out, at)
}

/// Follows a container's log: everything there now, then what is appended (across
/// rotations).
pub struct LogFollower {
    dir: PathBuf,
    file: Option<File>,
    ino: u64,
    pending: Vec<u8>,
}

impl LogFollower {
    /// Reads the whole log of container directory `dir` (older file first) and returns it
    /// with a follower positioned after it. A missing log reads as empty.
    pub fn open(dir: &Path) -> io::Result<(Vec<Record>, LogFollower)> {
        let old = open_opt(&dir.join(LOG_OLD))?;
        let cur = open_opt(&dir.join(LOG_FILE))?;
        let mut out = Vec::new();
        if let Some(mut f) = old {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            out.extend(decode_all(&buf).0);
        }
        let mut fol = LogFollower {
            dir: dir.to_owned(),
            ino: 0,
            file: None,
            pending: Vec::new(),
        };
        if let Some(f) = cur {
            fol.ino = f.metadata()?.ino();
            fol.file = Some(f);
            out.extend(fol.read_current()?);
        }
        Ok((out, fol))
    }

    fn read_current(&mut self) -> io::Result<Vec<Record>> {
        let Some(f) = self.file.as_mut() else {
            return Ok(Vec::new());
        };
        f.read_to_end(&mut self.pending)?;
        let (recs, used) = decode_all(&self.pending);
        self.pending.drain(..used);
        Ok(recs)
    }

    /// The records appended since the last call (none when nothing new).
    pub fn poll(&mut self) -> io::Result<Vec<Record>> {
        let mut out = self.read_current()?;
        // Rotated: the file we hold became log.1; finish it, then start on the new log.
        if let Some(f) = open_opt(&self.dir.join(LOG_FILE))? {
            let ino = f.metadata()?.ino();
            if ino != self.ino {
                out.extend(self.read_current()?);
                self.pending.clear();
                self.ino = ino;
                self.file = Some(f);
                out.extend(self.read_current()?);
            }
        }
        Ok(out)
    }
}

fn open_opt(p: &Path) -> io::Result<Option<File>> {
    match File::open(p) {
        Ok(mut f) => {
            f.seek(SeekFrom::Start(0))?;
            Ok(Some(f))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads the whole log of container directory `dir`, older file first.
pub fn read_all(dir: &Path) -> io::Result<Vec<Record>> {
    LogFollower::open(dir).map(|(r, _)| r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "fabric-logs-{name}-{}-{}",
            std::process::id(),
            now_ns()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn lines_are_records_and_round_trip() {
        let d = tmp("rt");
        let mut w = LogWriter::open(&d, DEFAULT_MAX_BYTES).unwrap();
        w.write(Stream::Stdout, 10, b"a\nbb\nccc").unwrap();
        w.write(Stream::Stderr, 20, b"err\n").unwrap();
        let all = read_all(&d).unwrap();
        let data: Vec<&[u8]> = all.iter().map(|r| r.data.as_slice()).collect();
        assert_eq!(data, vec![&b"a\n"[..], b"bb\n", b"ccc", b"err\n"]);
        assert_eq!(all[3].stream, Stream::Stderr);
        assert_eq!(all[3].time_ns, 20);
        let q = LogQuery {
            stdout: true,
            stderr: false,
            tail: Some(2),
            ..Default::default()
        };
        let t: Vec<Vec<u8>> = q.select(all.clone()).into_iter().map(|r| r.data).collect();
        assert_eq!(t, vec![b"bb\n".to_vec(), b"ccc".to_vec()]);
        let q = LogQuery {
            stdout: true,
            stderr: true,
            since_ns: Some(15),
            ..Default::default()
        };
        assert_eq!(q.select(all.clone()).len(), 1);
        let q = LogQuery {
            stdout: true,
            stderr: true,
            until_ns: Some(15),
            tail: Some(0),
            ..Default::default()
        };
        assert!(q.select(all).is_empty());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn timestamps_are_rfc3339_nano() {
        assert_eq!(rfc3339_nano(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_nano(1_500_000_000), "1970-01-01T00:00:01.5Z");
        let r = Record {
            stream: Stream::Stdout,
            time_ns: 1_700_000_000_123_456_789,
            data: b"hi\n".to_vec(),
        };
        assert_eq!(r.render(true), b"2023-11-14T22:13:20.123456789Z hi\n");
        assert_eq!(r.render(false), b"hi\n");
    }

    #[test]
    fn torn_tail_is_ignored_and_follow_picks_up_the_rest() {
        let d = tmp("torn");
        let mut w = LogWriter::open(&d, DEFAULT_MAX_BYTES).unwrap();
        w.write(Stream::Stdout, 1, b"one\n").unwrap();
        // Half a record, as a shim killed mid-write leaves it.
        let mut half = Vec::new();
        Record {
            stream: Stream::Stdout,
            time_ns: 2,
            data: b"two\n".to_vec(),
        }
        .encode(&mut half);
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.join(LOG_FILE))
            .unwrap();
        f.write_all(&half[..7]).unwrap();
        let (recs, mut fol) = LogFollower::open(&d).unwrap();
        assert_eq!(recs.len(), 1);
        assert!(fol.poll().unwrap().is_empty());
        f.write_all(&half[7..]).unwrap();
        let more = fol.poll().unwrap();
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].data, b"two\n");
        // Garbage ends the file for the reader; it is not an error.
        f.write_all(&[9, 9, 9]).unwrap();
        assert_eq!(read_all(&d).unwrap().len(), 2);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn follower_crosses_a_rotation() {
        let d = tmp("rot");
        let max = (RECORD_HEADER + MAX_RECORD) as u64 * 2;
        let mut w = LogWriter::open(&d, max).unwrap();
        w.write(Stream::Stdout, 1, b"first\n").unwrap();
        let (recs, mut fol) = LogFollower::open(&d).unwrap();
        assert_eq!(recs.len(), 1);
        let big = vec![b'x'; MAX_RECORD];
        for i in 0..3 {
            w.write(Stream::Stdout, 2 + i, &big).unwrap();
        }
        assert!(w.rotations >= 1);
        let got = fol.poll().unwrap();
        assert_eq!(
            got.len(),
            3,
            "every record written after open, across the rotation"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Whatever is written, the two files stay within twice the limit and the newest
        /// output is all there, in order.
        #[test]
        fn rotation_bounds_the_log(chunks in proptest::collection::vec(
            (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..3000)), 1..60)) {
            let d = tmp("prop");
            let max = 20_000u64;
            let mut w = LogWriter::open(&d, max).unwrap();
            let mut expect: Vec<u8> = Vec::new();
            for (i, (err, c)) in chunks.iter().enumerate() {
                let s = if *err { Stream::Stderr } else { Stream::Stdout };
                w.write(s, i as i64, c).unwrap();
                expect.extend_from_slice(c);
            }
            let size = |n: &str| std::fs::metadata(d.join(n)).map(|m| m.len()).unwrap_or(0);
            prop_assert!(size(LOG_FILE) <= max && size(LOG_OLD) <= max);
            let all = read_all(&d).unwrap();
            let got: Vec<u8> = all.iter().flat_map(|r| r.data.iter().copied()).collect();
            prop_assert!(expect.ends_with(&got), "the log is a suffix of the output");
            if w.rotations == 0 {
                prop_assert_eq!(got, expect);
            }
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}
