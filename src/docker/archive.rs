//! Images from files, since there is no registry: `docker import` (a root filesystem tar, plain
//! or gzip, becomes a one-layer image with a config built as moby's import builds it) and
//! `docker load` (a `docker save` archive: moby 20.10's `manifest.json` + `<id>/layer.tar` +
//! `<id>.json`, or docker 25+'s OCI layout with `index.json`, `blobs/sha256/…` and still a
//! `manifest.json`).
//!
//! Every layer tar is checked member by member while it streams into the
//! [`LayerStore`]: no absolute paths, no `..` components, no device nodes, no hard link that
//! leaves the layer, data as long as the headers say, no truncation. Layers are stored
//! uncompressed (their digest is the diff_id). [`load`] verifies every layer against its
//! config's `rootfs.diff_ids` and commits blobs only once every layer of the archive verified,
//! so a bad archive stores nothing; neither function touches the database (the caller inserts
//! the returned [`NewImage`]s with [`super::images::insert`] in one transaction).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::bufread::MultiGzDecoder;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::images::{parse_reference, rfc3339_nano, ImageError, NewImage};
use super::layers::{sha256_digest, valid_digest, Blob, BlobWriter, LayerStore};

/// The largest `manifest.json` or image config [`load`] reads (they are small JSON files).
pub const MAX_JSON_MEMBER: u64 = 16 << 20;
/// The most members a `docker save` archive may have.
pub const MAX_ARCHIVE_MEMBERS: usize = 100_000;

fn bad(msg: impl Into<String>) -> ImageError {
    ImageError::BadRequest(msg.into())
}

// ---------------------------------------------------------------------------------------------
// Counters

/// Outcomes of one kind of upload (`docker import` or `docker load`).
#[derive(Debug, Default)]
pub struct UploadCounters {
    /// Stored.
    pub ok: AtomicU64,
    /// Refused as bad input (400): unsafe or malformed members, bad JSON, missing members,
    /// digest mismatches.
    pub refused: AtomicU64,
    /// Refused for size (400).
    pub too_large: AtomicU64,
    /// Failed on our side (500: disk).
    pub failed: AtomicU64,
}

/// Every upload's outcome, for the metrics page.
#[derive(Debug, Default)]
pub struct Counters {
    /// `docker import`.
    pub imports: UploadCounters,
    /// `docker load`.
    pub loads: UploadCounters,
}

/// The process's counters.
pub static COUNTERS: Counters = Counters {
    imports: UploadCounters::new(),
    loads: UploadCounters::new(),
};

impl UploadCounters {
    const fn new() -> UploadCounters {
        UploadCounters {
            ok: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
}

fn counted<T>(c: &UploadCounters, r: Result<T, ImageError>) -> Result<T, ImageError> {
    let which = match &r {
        Ok(_) => &c.ok,
        Err(ImageError::TooLarge(_)) => &c.too_large,
        Err(e) if e.status() < 500 => &c.refused,
        Err(_) => &c.failed,
    };
    which.fetch_add(1, Ordering::Relaxed);
    r
}

// ---------------------------------------------------------------------------------------------
// Layer tar validation

/// What a validated layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerSummary {
    /// Members (pax and GNU long-name headers excluded).
    pub members: u64,
    /// Content size as `docker images` counts it: regular files' data plus symlink targets.
    pub content_size: u64,
}

/// Why a layer was refused: the reader failed (`Io`, the caller decides whose fault) or the
/// tar itself is bad (`Bad`, a message for the client).
#[derive(Debug)]
pub enum ScanError {
    /// Reading failed (the source, the decompressor, or the spool's bound).
    Io(io::Error),
    /// The tar is malformed or has a refused member.
    Bad(String),
}

/// Checks a member path (or hard-link target) of a layer: relative, no `..` components.
pub fn check_member_path(p: &[u8]) -> Result<(), String> {
    let shown = String::from_utf8_lossy(p);
    if p.is_empty() {
        return Err("a member has an empty name".into());
    }
    if p[0] == b'/' {
        return Err(format!(
            "member {shown:?} has an absolute path (expected a path relative to the root)"
        ));
    }
    if p.split(|b| *b == b'/').any(|c| c == b"..") {
        return Err(format!(
            "member {shown:?} has a \"..\" component (expected a path inside the root)"
        ));
    }
    Ok(())
}

/// Reads a layer tar to its end, validating every member; `r` is consumed to EOF so a caller
/// that tees it stores the whole stream.
pub fn scan_layer<R: Read>(mut r: R) -> Result<LayerSummary, ScanError> {
    let mut sum = LayerSummary::default();
    {
        let mut ar = tar::Archive::new(&mut r);
        let entries = ar.entries().map_err(ScanError::Io)?;
        for e in entries {
            let mut e = e.map_err(ScanError::Io)?;
            use tar::EntryType as T;
            let ty = e.header().entry_type();
            let path = e.path_bytes().into_owned();
            if ty == T::XGlobalHeader {
                drain_entry(&mut e)?;
                continue;
            }
            check_member_path(&path).map_err(ScanError::Bad)?;
            let shown = String::from_utf8_lossy(&path).into_owned();
            match ty {
                T::Regular | T::Continuous => {
                    sum.content_size = sum.content_size.saturating_add(e.size());
                }
                T::Directory | T::Fifo => {}
                T::Symlink => {
                    let l = e.link_name_bytes().map(|l| l.len()).unwrap_or(0);
                    if l == 0 {
                        return Err(ScanError::Bad(format!("symlink {shown:?} has no target")));
                    }
                    sum.content_size = sum.content_size.saturating_add(l as u64);
                }
                T::Link => {
                    let target = e
                        .link_name_bytes()
                        .map(|l| l.into_owned())
                        .unwrap_or_default();
                    check_member_path(&target)
                        .map_err(|m| ScanError::Bad(format!("hard link {shown:?}: target {m}")))?;
                }
                T::Char | T::Block => {
                    return Err(ScanError::Bad(format!(
                        "member {shown:?} is a device node (not allowed in an image layer)"
                    )));
                }
                other => {
                    return Err(ScanError::Bad(format!(
                        "member {shown:?} has an unsupported type {:?} (expected a file, \
                         directory, link or fifo)",
                        other.as_byte() as char
                    )));
                }
            }
            drain_entry(&mut e)?;
            sum.members += 1;
        }
    }
    // Whatever follows the end-of-archive blocks (padding to a record) is part of the stream.
    io::copy(&mut r, &mut io::sink()).map_err(ScanError::Io)?;
    Ok(sum)
}

fn drain_entry<R: Read>(e: &mut tar::Entry<'_, R>) -> Result<(), ScanError> {
    let want = e.size();
    let got = io::copy(e, &mut io::sink()).map_err(ScanError::Io)?;
    if got != want {
        return Err(ScanError::Bad(format!(
            "invalid tar archive: truncated: member {:?} has {got} of {want} bytes",
            String::from_utf8_lossy(&e.path_bytes())
        )));
    }
    Ok(())
}

/// Wraps a reader so everything read is also written to a [`BlobWriter`].
struct Tee<'w, R> {
    inner: R,
    w: &'w mut BlobWriter,
    bytes: u64,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        io::Write::write_all(self.w, &buf[..n])?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The compression of a stream, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar (or anything else: the tar parser judges).
    None,
    /// gzip (1f 8b).
    Gzip,
}

fn sniff<R: BufRead>(r: &mut R, what: &str) -> Result<Compression, ImageError> {
    let head = fill(r, 6).map_err(|e| bad(format!("{what}: reading: {e}")))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Compression::Gzip);
    }
    let other = if head.starts_with(b"BZh") {
        Some("bzip2")
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz")
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd")
    } else {
        None
    };
    if let Some(c) = other {
        return Err(bad(format!(
            "{what} is {c}-compressed; expected a tar archive, plain or gzip-compressed"
        )));
    }
    Ok(Compression::None)
}

/// Peeks up to `n` bytes (fewer only at EOF).
fn fill<R: BufRead>(r: &mut R, n: usize) -> io::Result<Vec<u8>> {
    // One buffer's worth is enough: a reader that trickled fewer bytes than a magic number
    // would only turn a gzip into a tar parse error, with a clear message.
    let b = r.fill_buf()?;
    Ok(b[..b.len().min(n)].to_vec())
}

/// Streams a layer (plain or gzip tar) into `store`, validating it; the blob is not committed
/// (the caller commits or drops it). `what` names the layer in errors.
fn spool_layer<R: Read>(
    store: &LayerStore,
    body: R,
    max: u64,
    what: &str,
) -> Result<(BlobWriter, LayerSummary), ImageError> {
    let mut br = BufReader::with_capacity(64 * 1024, body);
    let comp = sniff(&mut br, what)?;
    let mut w = store.writer(max)?;
    let res = {
        let src: Box<dyn Read + '_> = match comp {
            Compression::Gzip => Box::new(MultiGzDecoder::new(&mut br)),
            Compression::None => Box::new(&mut br),
        };
        let mut tee = Tee {
            inner: src,
            w: &mut w,
            bytes: 0,
        };
        let r = scan_layer(&mut tee);
        (r, tee.bytes)
    };
    match res {
        (Ok(_), 0) => Err(bad(format!(
            "{what} is empty; expected a tar archive, plain or gzip-compressed"
        ))),
        (Ok(sum), _) => Ok((w, sum)),
        (Err(_), _) if w.over_limit() => Err(ImageError::TooLarge(max)),
        (Err(ScanError::Bad(m)), _) => Err(bad(format!("{what}: {m}"))),
        (Err(ScanError::Io(e)), _) => {
            let msg = format!("{what} is not a valid tar archive (plain or gzip-compressed): {e}");
            Err(match w.error(e) {
                ImageError::BadRequest(_) => bad(msg),
                other => other,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// docker import

/// `POST /images/create?fromSrc=-` parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportOpts {
    /// `changes`: Dockerfile-style instructions applied to the config.
    pub changes: Vec<String>,
    /// `message`: the history comment (default `Imported from -`).
    pub message: Option<String>,
    /// The normalised `repo:tag` to tag it with ([`super::images::import_reference`]).
    pub repo_tag: Option<String>,
}

/// Docker's container config (Go's `container.Config`, in its field order, as moby writes it
/// into image configs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// Hostname.
    pub hostname: String,
    /// Domainname.
    pub domainname: String,
    /// USER.
    pub user: String,
    /// AttachStdin.
    pub attach_stdin: bool,
    /// AttachStdout.
    pub attach_stdout: bool,
    /// AttachStderr.
    pub attach_stderr: bool,
    /// EXPOSE: `"80/tcp": {}`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exposed_ports: Option<BTreeMap<String, Map<String, Value>>>,
    /// Tty.
    pub tty: bool,
    /// OpenStdin.
    pub open_stdin: bool,
    /// StdinOnce.
    pub stdin_once: bool,
    /// ENV: `KEY=value`.
    pub env: Option<Vec<String>>,
    /// CMD.
    pub cmd: Option<Vec<String>>,
    /// Image.
    pub image: String,
    /// VOLUME: `"/data": {}`.
    pub volumes: Option<BTreeMap<String, Map<String, Value>>>,
    /// WORKDIR.
    pub working_dir: String,
    /// ENTRYPOINT.
    pub entrypoint: Option<Vec<String>>,
    /// ONBUILD.
    pub on_build: Option<Vec<String>>,
    /// LABEL.
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    diff_ids: Vec<&'a str>,
}

#[derive(Serialize)]
struct History<'a> {
    created: &'a str,
    comment: &'a str,
}

/// An imported image's config, in the field order of moby's `image.Image`.
#[derive(Serialize)]
struct ImportConfig<'a> {
    comment: &'a str,
    created: &'a str,
    container_config: ContainerConfig,
    config: &'a ContainerConfig,
    architecture: &'a str,
    os: &'a str,
    rootfs: RootFs<'a>,
    history: Vec<History<'a>>,
}

/// Splits a shell-form argument list into words: whitespace separates; `"…"`, `'…'` and
/// backslash escapes as in a Dockerfile.
fn words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(n) => cur.push(n),
                    None => cur.push('\\'),
                }
            }
            '"' | '\'' => {
                in_word = true;
                let q = c;
                loop {
                    match chars.next() {
                        None => return Err(format!("unterminated quote in {s:?}")),
                        Some(x) if x == q => break,
                        Some('\\') if q == '"' => match chars.next() {
                            Some(n) => cur.push(n),
                            None => return Err(format!("unterminated quote in {s:?}")),
                        },
                        Some(x) => cur.push(x),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// `key=value` pairs (ENV and LABEL), or the legacy `KEY value` form.
fn pairs(args: &str, legacy: bool, instr: &str) -> Result<Vec<(String, String)>, String> {
    let ws = words(args)?;
    if ws.is_empty() {
        return Err(format!("{instr} requires at least one argument"));
    }
    if !ws[0].contains('=') {
        if !legacy {
            return Err(format!("{instr} names can not be blank"));
        }
        // `ENV KEY value with spaces`: the rest of the line is the value.
        let t = args.trim_start();
        let key_end = t.find(char::is_whitespace).unwrap_or(t.len());
        let key = &t[..key_end];
        let value = t[key_end..].trim();
        if value.is_empty() {
            return Err(format!("{instr} must have two arguments"));
        }
        let v = words(value)?.join(" ");
        return Ok(vec![(key.to_string(), v)]);
    }
    ws.into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!(
                "Syntax error - can't find = in {w:?}. Must be of the form: name=value"
            )),
        })
        .collect()
}

/// CMD/ENTRYPOINT argument: a JSON array of strings (exec form) or `/bin/sh -c LINE`.
fn command(args: &str) -> Vec<String> {
    let t = args.trim();
    if t.starts_with('[') {
        if let Ok(v) = serde_json::from_str::<Vec<String>>(t) {
            return v;
        }
    }
    vec!["/bin/sh".into(), "-c".into(), t.to_string()]
}

fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

const KNOWN_INSTRUCTIONS: &[&str] = &[
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
];

/// Applies `changes` (Dockerfile instructions, one per entry; an entry may hold several lines)
/// to `cfg`, as moby's `BuildFromConfig` does for import and commit. Supported: CMD,
/// ENTRYPOINT, ENV, EXPOSE, LABEL, ONBUILD, USER, VOLUME, WORKDIR. Errors are moby's texts.
pub fn apply_changes(cfg: &mut ContainerConfig, changes: &[String]) -> Result<(), ImageError> {
    let mut cmd_set = false;
    let mut line_no = 0usize;
    for change in changes {
        // Backslash-newline continues a line, as in a Dockerfile.
        let joined = change.replace("\\\r\n", " ").replace("\\\n", " ");
        for line in joined.lines() {
            line_no += 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (instr, args) = match line.find(char::is_whitespace) {
                Some(i) => (&line[..i], line[i..].trim()),
                None => (line, ""),
            };
            let lower = instr.to_ascii_lowercase();
            if !KNOWN_INSTRUCTIONS.contains(&lower.as_str()) {
                return Err(bad(format!(
                    "dockerfile parse error line {line_no}: unknown instruction: {}",
                    instr.to_ascii_uppercase()
                )));
            }
            let perr = |m: String| bad(format!("dockerfile parse error line {line_no}: {m}"));
            match lower.as_str() {
                "cmd" => {
                    cfg.cmd = Some(command(args));
                    cmd_set = true;
                }
                "entrypoint" => {
                    cfg.entrypoint = if args.is_empty() {
                        None
                    } else {
                        let c = command(args);
                        (!(c.len() == 1 && c[0].is_empty())).then_some(c)
                    };
                    if !cmd_set {
                        cfg.cmd = None;
                    }
                }
                "env" => {
                    for (k, v) in pairs(args, true, "ENV").map_err(perr)? {
                        let env = cfg.env.get_or_insert_with(Vec::new);
                        let prefix = format!("{k}=");
                        let kv = format!("{k}={v}");
                        match env.iter_mut().find(|e| e.starts_with(&prefix) || **e == k) {
                            Some(e) => *e = kv,
                            None => env.push(kv),
                        }
                    }
                }
                "label" => {
                    for (k, v) in pairs(args, true, "LABEL").map_err(perr)? {
                        cfg.labels.get_or_insert_with(BTreeMap::new).insert(k, v);
                    }
                }
                "expose" => {
                    let ports = words(args).map_err(perr)?;
                    if ports.is_empty() {
                        return Err(perr("EXPOSE requires at least one argument".into()));
                    }
                    for p in ports {
                        for spec in expose_ports(&p).map_err(bad)? {
                            cfg.exposed_ports
                                .get_or_insert_with(BTreeMap::new)
                                .insert(spec, Map::new());
                        }
                    }
                }
                "user" => {
                    let w = words(args).map_err(perr)?;
                    if w.len() != 1 {
                        return Err(perr("USER requires exactly one argument".into()));
                    }
                    cfg.user = w[0].clone();
                }
                "volume" => {
                    let vols = if args.trim_start().starts_with('[') {
                        serde_json::from_str::<Vec<String>>(args.trim())
                            .map_err(|e| perr(format!("VOLUME: {e}")))?
                    } else {
                        words(args).map_err(perr)?
                    };
                    if vols.is_empty() {
                        return Err(perr("VOLUME requires at least one argument".into()));
                    }
                    for v in vols {
                        let v = v.trim().to_string();
                        if v.is_empty() {
                            return Err(bad("VOLUME specified can not be an empty string"));
                        }
                        cfg.volumes
                            .get_or_insert_with(BTreeMap::new)
                            .insert(v, Map::new());
                    }
                }
                "workdir" => {
                    let w = words(args).map_err(perr)?;
                    if w.len() != 1 {
                        return Err(perr("WORKDIR requires exactly one argument".into()));
                    }
                    let p = if w[0].starts_with('/') {
                        w[0].clone()
                    } else {
                        format!("{}/{}", cfg.working_dir, w[0])
                    };
                    cfg.working_dir = clean_path(&p);
                }
                "onbuild" => {
                    let inner = args
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    match inner.as_str() {
                        "" => return Err(perr("ONBUILD requires at least one argument".into())),
                        "ONBUILD" => {
                            return Err(bad("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"))
                        }
                        "MAINTAINER" | "FROM" => {
                            return Err(bad(format!("{inner} isn't allowed as an ONBUILD trigger")))
                        }
                        _ => cfg
                            .on_build
                            .get_or_insert_with(Vec::new)
                            .push(args.to_string()),
                    }
                }
                "healthcheck" => {
                    return Err(bad(
                        "healthcheck is not supported in changes here; supported: CMD, \
                         ENTRYPOINT, ENV, EXPOSE, LABEL, ONBUILD, USER, VOLUME, WORKDIR",
                    ))
                }
                other => {
                    return Err(bad(format!("{other} is not a valid change command")));
                }
            }
        }
    }
    Ok(())
}

/// `80`, `80/tcp`, `53/udp`, `8000-8002` → `["8000/tcp", …]` (moby's `nat.ParsePortSpecs`).
fn expose_ports(spec: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match spec.split_once('/') {
        Some((p, pr)) => (p, pr.to_ascii_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid proto: {proto}"));
    }
    let parse = |s: &str| -> Result<u16, String> {
        s.parse::<u16>()
            .map_err(|_| format!("invalid containerPort: {ports}"))
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => {
            let p = parse(ports)?;
            (p, p)
        }
    };
    if hi < lo {
        return Err(format!(
            "invalid range specified for container port: {ports}"
        ));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

/// `docker import`: stores the body (a root filesystem tar, plain or gzip; at most
/// `store.max_blob()` bytes uncompressed) as one layer and builds the image config as moby's
/// import does. Changes are checked before a byte is read.
pub fn import(
    store: &LayerStore,
    body: impl Read,
    opts: &ImportOpts,
) -> Result<NewImage, ImageError> {
    counted(&COUNTERS.imports, import_inner(store, body, opts))
}

fn import_inner(
    store: &LayerStore,
    body: impl Read,
    opts: &ImportOpts,
) -> Result<NewImage, ImageError> {
    let mut config = ContainerConfig::default();
    apply_changes(&mut config, &opts.changes)?;
    let repo_tags = match &opts.repo_tag {
        Some(rt) => vec![parse_reference(rt)?.repo_tag()],
        None => Vec::new(),
    };
    let (w, sum) = spool_layer(store, body, store.max_blob(), "the imported archive")?;
    let blob = w.commit()?;
    let created = rfc3339_nano(std::time::SystemTime::now());
    let comment = match opts.message.as_deref() {
        Some(m) if !m.is_empty() => m,
        _ => "Imported from -",
    };
    let cfg = ImportConfig {
        comment,
        created: &created,
        container_config: ContainerConfig::default(),
        config: &config,
        architecture: "amd64",
        os: "linux",
        rootfs: RootFs {
            kind: "layers",
            diff_ids: vec![&blob.digest],
        },
        history: vec![History {
            created: &created,
            comment,
        }],
    };
    let bytes = serde_json::to_vec(&cfg).map_err(|e| bad(e.to_string()))?;
    Ok(NewImage {
        id: sha256_digest(&bytes),
        config: bytes,
        layers: vec![blob],
        repo_tags,
        created,
        size: sum.content_size,
    })
}

// ---------------------------------------------------------------------------------------------
// docker load

#[derive(Debug, Clone)]
struct Member {
    kind: tar::EntryType,
    offset: u64,
    size: u64,
    link: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Member names as the index keys them: no leading `./`, no trailing `/`.
fn norm_name(p: &str) -> String {
    let mut s = p;
    while let Some(r) = s.strip_prefix("./") {
        s = r;
    }
    s.trim_end_matches('/').to_string()
}

/// The index of a `docker save` archive's members.
struct Index {
    members: HashMap<String, Member>,
}

impl Index {
    fn build<R: Read + Seek>(body: &mut R) -> Result<Index, ImageError> {
        let len = body
            .seek(SeekFrom::End(0))
            .map_err(|e| bad(format!("reading the archive: {e}")))?;
        body.seek(SeekFrom::Start(0))
            .map_err(|e| bad(format!("reading the archive: {e}")))?;
        if len == 0 {
            return Err(bad(
                "the archive is empty; expected a tar archive from docker save",
            ));
        }
        let mut members = HashMap::new();
        let mut ar = tar::Archive::new(&mut *body);
        let entries = ar
            .entries_with_seek()
            .map_err(|e| bad(format!("invalid tar archive: {e}")))?;
        for e in entries {
            let e = e.map_err(|e| bad(format!("invalid tar archive: {e}")))?;
            let ty = e.header().entry_type();
            if ty == tar::EntryType::XGlobalHeader {
                continue;
            }
            let path = e.path_bytes().into_owned();
            check_member_path(&path).map_err(|m| bad(format!("invalid archive: {m}")))?;
            if matches!(ty, tar::EntryType::Char | tar::EntryType::Block) {
                return Err(bad(format!(
                    "invalid archive: member {:?} is a device node",
                    String::from_utf8_lossy(&path)
                )));
            }
            let offset = e.raw_file_position();
            let size = e.size();
            if offset.checked_add(size).is_none_or(|end| end > len) {
                return Err(bad(format!(
                    "invalid tar archive: truncated: member {:?} needs {size} bytes at {offset}, the archive has {len}",
                    String::from_utf8_lossy(&path)
                )));
            }
            let link = e
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned());
            let name = norm_name(&String::from_utf8_lossy(&path));
            members.insert(
                name,
                Member {
                    kind: ty,
                    offset,
                    size,
                    link,
                },
            );
            if members.len() > MAX_ARCHIVE_MEMBERS {
                return Err(bad(format!(
                    "invalid archive: more than {MAX_ARCHIVE_MEMBERS} members"
                )));
            }
        }
        Ok(Index { members })
    }

    /// The regular file `name` refers to, following symlinks (docker 25+ saves
    /// `<id>/layer.tar` as a link to `../blobs/sha256/<hex>`) inside the archive.
    fn file(&self, name: &str, what: &str) -> Result<&Member, ImageError> {
        let mut cur = norm_name(name);
        for _ in 0..8 {
            let m = self.members.get(&cur).ok_or_else(|| {
                bad(format!(
                    "invalid archive: {what} {name:?} is not in the archive"
                ))
            })?;
            match m.kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => return Ok(m),
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let target = m.link.clone().unwrap_or_default();
                    let joined = if m.kind == tar::EntryType::Link || target.starts_with('/') {
                        target.trim_start_matches('/').to_string()
                    } else {
                        match cur.rfind('/') {
                            Some(i) => format!("{}/{target}", &cur[..i]),
                            None => target,
                        }
                    };
                    let clean = clean_path(&joined);
                    cur = clean.trim_start_matches('/').to_string();
                }
                _ => {
                    return Err(bad(format!(
                        "invalid archive: {what} {name:?} is not a regular file"
                    )))
                }
            }
        }
        Err(bad(format!(
            "invalid archive: {what} {name:?}: too many levels of symbolic links"
        )))
    }
}

fn read_member<R: Read + Seek>(
    body: &mut R,
    idx: &Index,
    name: &str,
    what: &str,
) -> Result<Vec<u8>, ImageError> {
    let m = idx.file(name, what)?;
    if m.size > MAX_JSON_MEMBER {
        return Err(bad(format!(
            "invalid archive: {what} {name:?} is {} bytes, more than {MAX_JSON_MEMBER}",
            m.size
        )));
    }
    body.seek(SeekFrom::Start(m.offset))
        .map_err(|e| bad(format!("reading {name:?}: {e}")))?;
    let mut buf = Vec::with_capacity(m.size as usize);
    body.take(m.size)
        .read_to_end(&mut buf)
        .map_err(|e| bad(format!("reading {name:?}: {e}")))?;
    if buf.len() as u64 != m.size {
        return Err(bad(format!("invalid tar archive: {name:?} is truncated")));
    }
    Ok(buf)
}

/// The parsed parts of a `docker save` archive: its images, checked, with the layers still to
/// be read. Used by [`load`] and by the fuzz target (no store).
#[derive(Debug, Clone, PartialEq)]
pub struct SavedImage {
    /// Config bytes.
    pub config: Vec<u8>,
    /// Normalised `repo:tag`s.
    pub repo_tags: Vec<String>,
    /// Member names of the layers, bottom first.
    pub layers: Vec<String>,
    /// `rootfs.diff_ids`, one per layer.
    pub diff_ids: Vec<String>,
    /// The config's `created`.
    pub created: String,
}

/// Reads and checks `manifest.json` and each image's config: everything [`load`] needs
/// before it reads a layer. 400 with what is missing or wrong.
pub fn parse_saved<R: Read + Seek>(body: &mut R) -> Result<Vec<SavedImage>, ImageError> {
    let idx = Index::build(body)?;
    parse_with_index(body, &idx)
}

fn parse_with_index<R: Read + Seek>(
    body: &mut R,
    idx: &Index,
) -> Result<Vec<SavedImage>, ImageError> {
    if !idx.members.contains_key("manifest.json") {
        return Err(bad(
            "invalid archive: no manifest.json (expected an archive from docker save; for a \
             root filesystem tar use docker import)",
        ));
    }
    let raw = read_member(body, idx, "manifest.json", "member")?;
    let manifest: Vec<ManifestEntry> = serde_json::from_slice(&raw)
        .map_err(|e| bad(format!("invalid archive: manifest.json: {e}")))?;
    if manifest.is_empty() {
        return Err(bad("invalid archive: manifest.json lists no images"));
    }
    let mut out = Vec::new();
    for (i, m) in manifest.iter().enumerate() {
        let config = read_member(body, idx, &m.config, "config")?;
        let v: Value = serde_json::from_slice(&config)
            .map_err(|e| bad(format!("invalid archive: config {:?}: {e}", m.config)))?;
        let rootfs = v.get("rootfs").ok_or_else(|| {
            bad(format!(
                "invalid archive: config {:?} has no rootfs",
                m.config
            ))
        })?;
        if rootfs.get("type").and_then(Value::as_str) != Some("layers") {
            return Err(bad(format!(
                "invalid archive: config {:?}: rootfs type must be \"layers\"",
                m.config
            )));
        }
        let diff_ids = rootfs
            .get("diff_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|d| d.as_str().filter(|d| valid_digest(d)).map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .unwrap_or(Some(Vec::new()))
            .ok_or_else(|| {
                bad(format!(
                    "invalid archive: config {:?}: rootfs.diff_ids must be sha256:<hex> digests",
                    m.config
                ))
            })?;
        if diff_ids.len() != m.layers.len() {
            return Err(bad(format!(
                "invalid archive: image {} of manifest.json has {} layers but its config has {} diff_ids",
                i + 1,
                m.layers.len(),
                diff_ids.len()
            )));
        }
        for l in &m.layers {
            idx.file(l, "layer")?;
        }
        let mut repo_tags = Vec::new();
        for t in m.repo_tags.iter().flatten() {
            repo_tags.push(
                parse_reference(t)
                    .map_err(|e| bad(format!("invalid archive: RepoTags {t:?}: {e}")))?
                    .repo_tag(),
            );
        }
        let created = v
            .get("created")
            .and_then(Value::as_str)
            .unwrap_or(super::images::ZERO_TIME)
            .to_string();
        out.push(SavedImage {
            config,
            repo_tags,
            layers: m.layers.clone(),
            diff_ids,
            created,
        });
    }
    Ok(out)
}

/// `docker load`: the images of a `docker save` archive (seekable: spool the upload to a file
/// first). Every layer is validated like an import and must hash to its config's diff_id (400
/// naming the layer otherwise); blobs are committed to `store` only after every layer of the
/// archive verified. Returns one [`NewImage`] per manifest entry.
pub fn load<R: Read + Seek>(store: &LayerStore, body: R) -> Result<Vec<NewImage>, ImageError> {
    counted(&COUNTERS.loads, load_inner(store, body))
}

fn load_inner<R: Read + Seek>(
    store: &LayerStore,
    mut body: R,
) -> Result<Vec<NewImage>, ImageError> {
    let idx = Index::build(&mut body)?;
    let saved = parse_with_index(&mut body, &idx)?;
    // Layer member → (pending blob, summary); a layer shared by images is read once.
    let mut pending: Vec<BlobWriter> = Vec::new();
    let mut done: HashMap<String, (String, u64, u64)> = HashMap::new();
    let mut images = Vec::new();
    for s in &saved {
        let mut blobs = Vec::new();
        let mut size = 0u64;
        for (layer, diff_id) in s.layers.iter().zip(&s.diff_ids) {
            let key = norm_name(layer);
            if let Some((d, tar_size, content)) = done.get(&key) {
                if d != diff_id {
                    return Err(bad(format!(
                        "layer {layer:?}: its content's digest {d} does not match {diff_id} in the image config"
                    )));
                }
                blobs.push(Blob {
                    digest: d.clone(),
                    size: *tar_size,
                });
                size += content;
                continue;
            }
            let m = idx.file(layer, "layer")?;
            body.seek(SeekFrom::Start(m.offset))
                .map_err(|e| bad(format!("reading layer {layer:?}: {e}")))?;
            let what = format!("layer {layer:?}");
            let (w, sum) = spool_layer(store, (&mut body).take(m.size), store.max_blob(), &what)?;
            let actual = w.digest();
            if actual != *diff_id {
                return Err(bad(format!(
                    "layer {layer:?}: its content's digest {actual} does not match {diff_id} in the image config"
                )));
            }
            blobs.push(Blob {
                digest: diff_id.clone(),
                size: w.size(),
            });
            done.insert(key, (diff_id.clone(), w.size(), sum.content_size));
            size += sum.content_size;
            pending.push(w);
        }
        images.push(NewImage {
            id: sha256_digest(&s.config),
            config: s.config.clone(),
            layers: blobs,
            repo_tags: s.repo_tags.clone(),
            created: s.created.clone(),
            size,
        });
    }
    for w in pending {
        w.commit()?;
    }
    Ok(images)
}

/// Tar builders for the tests of this module and of [`super::images`] (raw headers, so they can
/// also write what a well-behaved builder refuses to: `..`, absolute paths, device nodes).
#[cfg(test)]
pub(crate) mod testutil {
    use std::io::Write;

    /// One member: name, type byte, data, link target.
    pub(crate) struct M<'a>(pub &'a str, pub u8, pub &'a [u8], pub &'a str);

    pub(crate) fn file<'a>(name: &'a str, data: &'a [u8]) -> M<'a> {
        M(name, b'0', data, "")
    }

    pub(crate) fn dir(name: &str) -> M<'_> {
        M(name, b'5', b"", "")
    }

    /// A tar of `members` (names up to 100 bytes), ending with two zero blocks.
    pub(crate) fn tar(members: &[M<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in members {
            let mut h = tar::Header::new_ustar();
            h.as_old_mut().name[..m.0.len()].copy_from_slice(m.0.as_bytes());
            h.as_old_mut().linkname[..m.3.len()].copy_from_slice(m.3.as_bytes());
            h.set_entry_type(tar::EntryType::new(m.1));
            h.set_size(m.2.len() as u64);
            h.set_mode(if m.1 == b'5' { 0o755 } else { 0o644 });
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(m.2);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    pub(crate) fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    /// A small root filesystem layer.
    pub(crate) fn rootfs(tag: &str) -> Vec<u8> {
        tar(&[
            dir("bin"),
            file("bin/hello", tag.as_bytes()),
            M("bin/sh", b'2', b"", "hello"),
            M("bin/hello2", b'1', b"", "bin/hello"),
            dir("etc/"),
            file("./etc/os-release", b"ID=test\n"),
        ])
    }

    /// The config of an image with these layers (diff_ids are the layers' sha256).
    pub(crate) fn config(layers: &[&[u8]], created: &str) -> Vec<u8> {
        let diff_ids: Vec<String> = layers.iter().map(|l| super::sha256_digest(l)).collect();
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "created": created,
            "config": {"Cmd": ["sh"], "Labels": {"a": "1"}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use crate::docker::layers::tests::TmpDir;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn store(d: &TmpDir) -> LayerStore {
        LayerStore::open(&d.0).unwrap()
    }

    fn stored(d: &TmpDir) -> usize {
        std::fs::read_dir(d.0.join("images/sha256"))
            .unwrap()
            .count()
            + std::fs::read_dir(d.0.join("images/tmp")).unwrap().count()
    }

    fn opts(changes: &[&str]) -> ImportOpts {
        ImportOpts {
            changes: changes.iter().map(|s| s.to_string()).collect(),
            ..ImportOpts::default()
        }
    }

    #[test]
    fn import_stores_the_uncompressed_tar_and_builds_moby_s_config() {
        let d = TmpDir::new("archive-unit");
        let s = store(&d);
        let layer = rootfs("hi");
        let img = import(
            &s,
            &layer[..],
            &ImportOpts {
                repo_tag: Some("docker.io/library/bb:1".into()),
                ..ImportOpts::default()
            },
        )
        .unwrap();
        assert_eq!(img.layers.len(), 1);
        assert_eq!(img.layers[0].digest, sha256_digest(&layer));
        assert_eq!(img.layers[0].size, layer.len() as u64);
        assert_eq!(
            std::fs::read(s.path(&img.layers[0].digest).unwrap()).unwrap(),
            layer
        );
        assert_eq!(img.id, sha256_digest(&img.config));
        assert_eq!(img.repo_tags, ["bb:1"]);
        // "hi" + "ID=test\n" + the symlink target "hello".
        assert_eq!(img.size, 2 + 8 + 5);
        let c: Value = serde_json::from_slice(&img.config).unwrap();
        assert_eq!(c["architecture"], "amd64");
        assert_eq!(c["os"], "linux");
        assert_eq!(c["comment"], "Imported from -");
        assert_eq!(c["rootfs"]["type"], "layers");
        assert_eq!(c["rootfs"]["diff_ids"][0], img.layers[0].digest.as_str());
        assert_eq!(c["history"][0]["comment"], "Imported from -");
        assert_eq!(c["history"][0]["created"], c["created"]);
        assert_eq!(c["created"], img.created.as_str());
        assert!(super::super::images::parse_rfc3339_ms(&img.created).is_some());
        assert_eq!(c["config"]["Cmd"], Value::Null);
        assert_eq!(c["config"]["Env"], Value::Null);
        assert_eq!(c["config"]["WorkingDir"], "");
        assert!(c["config"].get("ExposedPorts").is_none());
        // Field order as moby writes it.
        let text = String::from_utf8(img.config.clone()).unwrap();
        assert!(
            text.starts_with("{\"comment\":\"Imported from -\",\"created\":"),
            "{text}"
        );
        // gzip: the same layer, the same diff_id.
        let gz = import(&s, &gzip(&layer)[..], &ImportOpts::default()).unwrap();
        assert_eq!(gz.layers, img.layers);
        assert_eq!(stored(&d), 1);
        let m = import(
            &s,
            &layer[..],
            &ImportOpts {
                message: Some("from a test".into()),
                ..ImportOpts::default()
            },
        )
        .unwrap();
        let c: Value = serde_json::from_slice(&m.config).unwrap();
        assert_eq!(c["comment"], "from a test");
    }

    #[test]
    fn changes_build_the_config() {
        let d = TmpDir::new("archive-unit");
        let s = store(&d);
        let img = import(
            &s,
            &rootfs("x")[..],
            &opts(&[
                r#"CMD ["/bin/hello", "a b"]"#,
                "ENV A=1 B=\"two words\"",
                "ENV C three words",
                "ENV A=3",
                "EXPOSE 80 53/udp 8000-8002",
                "LABEL com.example=\"x y\" k=v",
                "USER nobody",
                "WORKDIR /srv",
                "WORKDIR app/../data",
                "VOLUME /v1 /v2",
                "ONBUILD RUN true",
            ]),
        )
        .unwrap();
        let c: Value = serde_json::from_slice(&img.config).unwrap();
        let cfg = &c["config"];
        assert_eq!(cfg["Cmd"], serde_json::json!(["/bin/hello", "a b"]));
        assert_eq!(
            cfg["Env"],
            serde_json::json!(["A=3", "B=two words", "C=three words"])
        );
        assert_eq!(
            cfg["ExposedPorts"],
            serde_json::json!({"80/tcp": {}, "53/udp": {}, "8000/tcp": {}, "8001/tcp": {}, "8002/tcp": {}})
        );
        assert_eq!(
            cfg["Labels"],
            serde_json::json!({"com.example": "x y", "k": "v"})
        );
        assert_eq!(cfg["User"], "nobody");
        assert_eq!(cfg["WorkingDir"], "/srv/data");
        assert_eq!(cfg["Volumes"], serde_json::json!({"/v1": {}, "/v2": {}}));
        assert_eq!(cfg["OnBuild"], serde_json::json!(["RUN true"]));

        let mut cfg = ContainerConfig::default();
        // ENTRYPOINT after CMD (in one set of changes) keeps it.
        apply_changes(
            &mut cfg,
            &["CMD echo hi".into(), "ENTRYPOINT [\"/e\"]".into()],
        )
        .unwrap();
        assert_eq!(cfg.cmd.as_deref().unwrap(), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(cfg.entrypoint.as_deref().unwrap(), ["/e"]);
        // ENTRYPOINT without a CMD in the same changes clears the one the config had (moby's
        // BuildFromConfig: `cmdSet` is per build).
        let mut cfg2 = cfg.clone();
        apply_changes(&mut cfg2, &["ENTRYPOINT /x -y".into()]).unwrap();
        assert_eq!(cfg2.cmd, None);
        assert_eq!(
            cfg2.entrypoint.as_deref().unwrap(),
            ["/bin/sh", "-c", "/x -y"]
        );
    }

    #[test]
    fn bad_changes_are_400_with_moby_s_words_and_store_nothing() {
        let d = TmpDir::new("archive-unit");
        let s = store(&d);
        for (change, want) in [
            ("FOO bar", "dockerfile parse error line 1: unknown instruction: FOO"),
            ("RUN true", "run is not a valid change command"),
            ("from busybox", "from is not a valid change command"),
            ("EXPOSE 70000", "invalid containerPort: 70000"),
            ("EXPOSE 80/icmp", "invalid proto: icmp"),
            ("ENV", "dockerfile parse error line 1: ENV requires at least one argument"),
            ("USER a b", "dockerfile parse error line 1: USER requires exactly one argument"),
            ("LABEL =x", "dockerfile parse error line 1: Syntax error - can't find = in \"=x\". Must be of the form: name=value"),
        ] {
            let e = import(&s, &rootfs("x")[..], &opts(&[change])).unwrap_err();
            assert_eq!((e.status(), e.to_string()), (400, want.to_string()), "{change}");
        }
        let e = import(&s, &rootfs("x")[..], &opts(&["ENV A=1\nBOGUS x"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "dockerfile parse error line 2: unknown instruction: BOGUS"
        );
        assert_eq!(stored(&d), 0);
    }

    #[test]
    fn unsafe_or_broken_tars_are_refused_and_leave_nothing() {
        let d = TmpDir::new("archive-unit");
        let s = store(&d);
        let good = rootfs("x");
        let mut truncated_data = tar(&[file("a", &[1u8; 2000])]);
        truncated_data.truncate(512 + 1000);
        let mut truncated_header = good.clone();
        truncated_header.truncate(512 * 2 + 100);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (tar(&[file("/etc/passwd", b"x")]), "absolute path"),
            (tar(&[file("a/../../x", b"x")]), "\"..\" component"),
            (tar(&[file("..", b"")]), "\"..\" component"),
            (tar(&[M("dev/null", b'3', b"", "")]), "device node"),
            (tar(&[M("dev/sda", b'4', b"", "")]), "device node"),
            (
                tar(&[file("a", b"x"), M("b", b'1', b"", "../a")]),
                "hard link \"b\"",
            ),
            (
                tar(&[file("a", b"x"), M("b", b'1', b"", "/etc/shadow")]),
                "hard link \"b\"",
            ),
            (tar(&[M("s", b'S', b"", "")]), "sparse"),
            (tar(&[M("v", b'V', b"", "")]), "unsupported type"),
            (
                truncated_data,
                "truncated: member \"a\" has 1000 of 2000 bytes",
            ),
            (truncated_header, "not a valid tar archive"),
            (vec![b'x'; 1500], "not a valid tar archive"),
            (Vec::new(), "is empty"),
            (gzip(&[]), "is empty"),
            (gzip(&good)[..40].to_vec(), "not a valid tar archive"),
            (vec![0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2], "xz-compressed"),
        ];
        for (i, (body, want)) in cases.iter().enumerate() {
            let e = import(&s, &body[..], &ImportOpts::default()).unwrap_err();
            assert_eq!(e.status(), 400, "case {i}: {e}");
            assert!(e.to_string().contains(want), "case {i}: {e}");
            assert_eq!(stored(&d), 0, "case {i} left a file");
        }
        // A symlink may point anywhere (the unpacker never writes through it); an empty
        // archive (just the end blocks) is an empty root filesystem.
        import(
            &s,
            &tar(&[M("l", b'2', b"", "/etc/passwd")])[..],
            &ImportOpts::default(),
        )
        .unwrap();
        let empty = import(&s, &tar(&[])[..], &ImportOpts::default()).unwrap();
        assert_eq!(empty.size, 0);
    }

    #[test]
    fn refusals_are_counted() {
        let d = TmpDir::new("archive-unit");
        let s = LayerStore::open(&d.0).unwrap().with_max_blob(2048);
        let c = &COUNTERS.imports;
        let (ok, refused, large) = (
            c.ok.load(Ordering::Relaxed),
            c.refused.load(Ordering::Relaxed),
            c.too_large.load(Ordering::Relaxed),
        );
        import(&s, &tar(&[file("a", b"x")])[..], &ImportOpts::default()).unwrap();
        import(&s, &tar(&[file("/a", b"x")])[..], &ImportOpts::default()).unwrap_err();
        import(
            &s,
            &tar(&[file("a", &[0; 4096])])[..],
            &ImportOpts::default(),
        )
        .unwrap_err();
        // Other tests run in parallel: at least ours were counted.
        assert!(c.ok.load(Ordering::Relaxed) > ok);
        assert!(c.refused.load(Ordering::Relaxed) > refused);
        assert!(c.too_large.load(Ordering::Relaxed) > large);
        let l = COUNTERS.loads.refused.load(Ordering::Relaxed);
        load(&s, Cursor::new(b"junk")).unwrap_err();
        assert!(COUNTERS.loads.refused.load(Ordering::Relaxed) > l);
    }

    #[test]
    fn import_is_bounded() {
        let d = TmpDir::new("archive-unit");
        let s = LayerStore::open(&d.0).unwrap().with_max_blob(4096);
        let big = tar(&[file("a", &[0u8; 8192])]);
        let e = import(&s, &gzip(&big)[..], &ImportOpts::default()).unwrap_err();
        assert!(matches!(e, ImageError::TooLarge(4096)), "{e}");
        assert_eq!(stored(&d), 0);
        import(
            &s,
            &tar(&[file("a", &[0u8; 100])])[..],
            &ImportOpts::default(),
        )
        .unwrap();
    }

    /// A moby 20.10 `docker save` archive: `manifest.json`, `<id>.json`, `<dir>/layer.tar`.
    fn save_archive(images: &[(&[&[u8]], &[&str])]) -> Vec<u8> {
        let mut members: Vec<(String, u8, Vec<u8>, String)> = Vec::new();
        let mut manifest = Vec::new();
        for (layers, tags) in images {
            let cfg = config(layers, "2024-01-02T03:04:05.123456789Z");
            let cfg_name = format!("{}.json", &sha256_digest(&cfg)[7..]);
            let mut names = Vec::new();
            for l in *layers {
                let dirname = &sha256_digest(l)[7..71];
                let n = format!("{dirname}/layer.tar");
                if !members.iter().any(|m| m.0 == n) {
                    members.push((format!("{dirname}/"), b'5', vec![], String::new()));
                    members.push((n.clone(), b'0', l.to_vec(), String::new()));
                }
                names.push(n);
            }
            members.push((cfg_name.clone(), b'0', cfg, String::new()));
            manifest
                .push(serde_json::json!({"Config": cfg_name, "RepoTags": tags, "Layers": names}));
        }
        members.push((
            "manifest.json".into(),
            b'0',
            serde_json::to_vec(&manifest).unwrap(),
            String::new(),
        ));
        let ms: Vec<M<'_>> = members.iter().map(|(n, t, d, l)| M(n, *t, d, l)).collect();
        tar(&ms)
    }

    #[test]
    fn load_reads_a_moby_20_10_save_archive() {
        let d = TmpDir::new("archive-unit");
        let s = store(&d);
        let base = rootfs("base");
        let top = tar(&[file("app", b"app")]);
        let other = rootfs("other");
        let ar = save_archive(&[
            (&[&base, &top], &["app:1", "docker.io/library/app:latest"]),
            (&[&base], &[]),
            (&[&other], &["me/other:v2"]),
        ]);
        let imgs = load(&s, Cursor::new(&ar)).unwrap();
        assert_eq!(imgs.len(), 3);
        assert_eq!(imgs[0].repo_tags, ["app:1", "app:latest"]);
        assert_eq!(
            imgs[0]
                .layers
                .iter()
                .map(|b| b.digest.clone())
                .collect::<Vec<_>>(),
            [sha256_digest(&base), sha256_digest(&top)]
        );
        assert_eq!(imgs[0].layers[1].size, top.len() as u64);
        assert_eq!(imgs[0].size, (4 + 8 + 5) + 3);
        assert_eq!(imgs[0].created, "2024-01-02T03:04:05.123456789Z");
        assert_eq!(imgs[0].id, sha256_digest(&imgs[0].config));
        assert!(imgs[1].repo_tags.is_empty());
        assert_eq!(imgs[2].repo_tags, ["me/other:v2"]);
        for b in imgs.iter().flat_map(|i| &i.layers) {
            assert!(s.has(&b.digest));
        }
        assert_eq!(stored(&d), 3);
    }

    #[test]
    fn load_reads_the_oci_layout_of_docker_25() {
        // blobs/sha256/<hex> (a gzip layer here), <id>/layer.tar a symlink to it, index.json.
        let d = TmpDir::new("archive-unit");
        let s = store(&d);
        let layer = rootfs("oci");
        let gz = gzip(&layer);
        let gz_name = format!("blobs/sha256/{}", &sha256_digest(&gz)[7..]);
        let cfg = config(&[&layer], "2025-02-03T04:05:06Z");
        let cfg_name = format!("blobs/sha256/{}", &sha256_digest(&cfg)[7..]);
        let link = format!("../{gz_name}");
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": cfg_name, "RepoTags": ["oci:1"], "Layers": ["abc/layer.tar"]}
        ]))
        .unwrap();
        let ar = tar(&[
            dir("blobs/"),
            dir("blobs/sha256/"),
            file(&gz_name, &gz),
            file(&cfg_name, &cfg),
            dir("abc/"),
            M("abc/layer.tar", b'2', b"", &link),
            file("index.json", b"{\"schemaVersion\":2,\"manifests\":[]}"),
            file("oci-layout", b"{\"imageLayoutVersion\":\"1.0.0\"}"),
            file("manifest.json", &manifest),
        ]);
        let imgs = load(&s, Cursor::new(&ar)).unwrap();
        assert_eq!(imgs.len(), 1);
        assert_eq!(imgs[0].layers[0].digest, sha256_digest(&layer));
        assert_eq!(imgs[0].layers[0].size, layer.len() as u64);
        assert_eq!(
            std::fs::read(s.path(&imgs[0].layers[0].digest).unwrap()).unwrap(),
            layer
        );
        assert_eq!(imgs[0].repo_tags, ["oci:1"]);
    }

    #[test]
    fn bad_save_archives_are_400_naming_what_is_wrong_and_store_nothing() {
        let d = TmpDir::new("archive-unit");
        let s = store(&d);
        let base = rootfs("base");
        let top = tar(&[file("app", b"app")]);
        let cfg = config(&[&base], "2024-01-02T03:04:05Z");
        let m = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
        let good_manifest = m(
            serde_json::json!([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["l/layer.tar"]}]),
        );
        let case = |members: &[M<'_>]| tar(members);
        let mut truncated = case(&[
            file("c.json", &cfg),
            file("l/layer.tar", &base),
            file("manifest.json", &good_manifest),
        ]);
        truncated.truncate(512 + cfg.len().div_ceil(512) * 512 + 512 + 100);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                case(&[file("c.json", &cfg), file("l/layer.tar", &base)]),
                "no manifest.json",
            ),
            (
                case(&[file("manifest.json", b"{not json")]),
                "manifest.json:",
            ),
            (case(&[file("manifest.json", b"[]")]), "lists no images"),
            (
                case(&[
                    file("l/layer.tar", &base),
                    file("manifest.json", &good_manifest),
                ]),
                "config \"c.json\" is not in the archive",
            ),
            (
                case(&[file("c.json", &cfg), file("manifest.json", &good_manifest)]),
                "layer \"l/layer.tar\" is not in the archive",
            ),
            (
                case(&[
                    file(
                        "c.json",
                        b"{\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:zz\"]}}",
                    ),
                    file("l/layer.tar", &base),
                    file("manifest.json", &good_manifest),
                ]),
                "diff_ids must be",
            ),
            (
                case(&[
                    file("c.json", b"{}"),
                    file("l/layer.tar", &base),
                    file("manifest.json", &good_manifest),
                ]),
                "has no rootfs",
            ),
            // The layer's bytes are not what the config says.
            (
                case(&[
                    file("c.json", &cfg),
                    file("l/layer.tar", &top),
                    file("manifest.json", &good_manifest),
                ]),
                "layer \"l/layer.tar\": its content's digest",
            ),
            (
                case(&[
                    file("c.json", &cfg),
                    M("l/layer.tar", b'2', b"", "layer.tar"),
                    file("manifest.json", &good_manifest),
                ]),
                "too many levels",
            ),
            (
                case(&[
                    file("c.json", &cfg),
                    file("l/layer.tar", &base),
                    file(
                        "manifest.json",
                        &m(
                            serde_json::json!([{"Config": "c.json", "RepoTags": ["UPPER:1"], "Layers": ["l/layer.tar"]}]),
                        ),
                    ),
                ]),
                "repository name must be lowercase",
            ),
            (
                case(&[
                    file("c.json", &cfg),
                    file("l/layer.tar", &base),
                    file(
                        "manifest.json",
                        &m(serde_json::json!([{"Config": "c.json", "Layers": []}])),
                    ),
                ]),
                "has 0 layers but its config has 1 diff_ids",
            ),
            (case(&[file("../c.json", &cfg)]), "\"..\" component"),
            (truncated, "truncated"),
            (Vec::new(), "empty"),
        ];
        for (i, (body, want)) in cases.iter().enumerate() {
            let e = load(&s, Cursor::new(body)).unwrap_err();
            assert_eq!(e.status(), 400, "case {i}: {e}");
            assert!(e.to_string().contains(want), "case {i}: {e}");
            assert_eq!(stored(&d), 0, "case {i} left a file");
        }
        // Two images: the first verifies, the second's layer does not: nothing is stored.
        let cfg2 = config(&[&top], "2024-01-02T03:04:05Z");
        let bad_layer = tar(&[file("evil", b"evil")]);
        let two = case(&[
            file("c.json", &cfg),
            file("c2.json", &cfg2),
            file("l/layer.tar", &base),
            file("l2/layer.tar", &bad_layer),
            file(
                "manifest.json",
                &m(serde_json::json!([
                {"Config": "c.json", "Layers": ["l/layer.tar"]},
                {"Config": "c2.json", "Layers": ["l2/layer.tar"]}])),
            ),
        ]);
        let e = load(&s, Cursor::new(&two)).unwrap_err();
        assert!(e.to_string().contains("l2/layer.tar"), "{e}");
        assert_eq!(stored(&d), 0);
        // A layer with a device node inside is refused like an import.
        let dev = tar(&[M("dev/kmem", b'3', b"", "")]);
        let cfg3 = config(&[&dev], "2024-01-02T03:04:05Z");
        let e = load(
            &s,
            Cursor::new(case(&[
                file("c.json", &cfg3),
                file("l/layer.tar", &dev),
                file("manifest.json", &good_manifest),
            ])),
        )
        .unwrap_err();
        assert!(e.to_string().contains("device node"), "{e}");
        assert_eq!(stored(&d), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let d = TmpDir::new("archive-prop");
            let s = LayerStore::open(&d.0).unwrap().with_max_blob(1 << 20);
            let _ = import(&s, &data[..], &ImportOpts::default());
            let _ = import(&s, &gzip(&data)[..], &ImportOpts::default());
            let _ = load(&s, Cursor::new(&data));
            let _ = scan_layer(&data[..]);
        }

        #[test]
        fn mutated_archives_never_panic(pos in 0usize..4096, byte in any::<u8>()) {
            let d = TmpDir::new("archive-prop");
            let s = LayerStore::open(&d.0).unwrap();
            let base = rootfs("m");
            let cfg = config(&[&base], "2024-01-02T03:04:05Z");
            let manifest = serde_json::to_vec(&serde_json::json!([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["l/layer.tar"]}])).unwrap();
            let mut ar = tar(&[file("c.json", &cfg), file("l/layer.tar", &base), file("manifest.json", &manifest)]);
            let p = pos % ar.len();
            ar[p] = byte;
            let _ = load(&s, Cursor::new(&ar));
            let mut layer = base.clone();
            let p = pos % layer.len();
            layer[p] = byte;
            let _ = import(&s, &layer[..], &ImportOpts::default());
        }

        #[test]
        fn dot_dot_components_are_always_refused(
            pre in proptest::collection::vec("[a-z.]{1,5}", 0..3),
            post in proptest::collection::vec("[a-z.]{1,5}", 0..3),
            as_link in any::<bool>(),
        ) {
            let mut parts = pre.clone();
            parts.push("..".into());
            parts.extend(post);
            let p = parts.join("/");
            prop_assume!(p.len() < 100);
            let t = if as_link {
                tar(&[file("a", b"x"), M("b", b'1', b"", &p)])
            } else {
                tar(&[file(&p, b"x")])
            };
            let d = TmpDir::new("archive-prop");
            let s = LayerStore::open(&d.0).unwrap();
            let e = import(&s, &t[..], &ImportOpts::default()).unwrap_err();
            prop_assert_eq!(e.status(), 400);
            prop_assert!(e.to_string().contains("\"..\" component"), "{}", e);
            prop_assert_eq!(stored(&d), 0);
        }
    }
}
