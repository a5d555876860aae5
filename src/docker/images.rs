//! Image metadata in the store, per account, and the JSON of `GET /images/json` and
//! `GET /images/{name}/json`; tagging and `docker rmi`.
//!
//! Tables (every row carries the account, `owner_uuid`):
//! - `docker_images`: one row per image: its id (`sha256:` of the exact config bytes), the
//!   config JSON itself, the layers (`[{digest,size}]`, uncompressed tars in the
//!   [`LayerStore`](super::layers::LayerStore) named by their diff_id), the content size, the
//!   creation and last-tag times;
//! - `docker_image_tags`: `repo:tag` → image (a tag names one image per account; re-tagging
//!   moves it and leaves the old image untagged, "dangling", as Docker does);
//! - `docker_image_layers`: one row per (image, layer position) with the layer's digest and chain
//!   id, so that "is this layer still used" is one indexed count: per account for what `rmi`
//!   reports, over all accounts for whether a blob may leave the disk.
//!
//! Another account's image is exactly "No such image", never a different error. Writers take the
//! account's advisory lock ([`LOCK_IMAGES`]) first, then each layer's ([`LOCK_LAYER`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use thiserror::Error;

use super::layers::{sha256_digest, valid_digest, Blob, LayerStore};
use crate::control::db::{lock_key, Db, Row, Val};
use crate::control::error::OpError;

/// Advisory lock kind: an account's images and tags (`lock_key(LOCK_IMAGES, owner)`).
pub const LOCK_IMAGES: u8 = 0x49;
/// Advisory lock kind: one layer digest, across accounts (insert vs. removal of its blob).
pub const LOCK_LAYER: u8 = 0x4c;

/// The images' tables (both backends; the lead appends them to `control::db::create_schema`).
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS docker_images (
        owner_uuid  TEXT NOT NULL,
        id          TEXT NOT NULL,
        created_ms  BIGINT NOT NULL,
        size        BIGINT NOT NULL,
        config      TEXT NOT NULL,
        layers      TEXT NOT NULL,
        last_tag_ms BIGINT,
        PRIMARY KEY (owner_uuid, id)
    )",
    "CREATE TABLE IF NOT EXISTS docker_image_tags (
        owner_uuid TEXT NOT NULL,
        repo       TEXT NOT NULL,
        tag        TEXT NOT NULL,
        image_id   TEXT NOT NULL,
        PRIMARY KEY (owner_uuid, repo, tag)
    )",
    "CREATE INDEX IF NOT EXISTS docker_image_tags_by_image ON docker_image_tags (owner_uuid, image_id)",
    "CREATE TABLE IF NOT EXISTS docker_image_layers (
        owner_uuid TEXT NOT NULL,
        image_id   TEXT NOT NULL,
        position   BIGINT NOT NULL,
        digest     TEXT NOT NULL,
        chain_id   TEXT NOT NULL,
        PRIMARY KEY (owner_uuid, image_id, position)
    )",
    "CREATE INDEX IF NOT EXISTS docker_image_layers_by_digest ON docker_image_layers (digest)",
    "CREATE INDEX IF NOT EXISTS docker_image_layers_by_chain ON docker_image_layers (owner_uuid, chain_id)",
];

/// Creates the images' tables (idempotent; serialised with the control plane's schema lock).
pub fn create_schema(db: &mut Db<'_>) -> Result<(), ImageError> {
    db.lock(lock_key(crate::control::db::LOCK_SCHEMA, "schema"))?;
    for stmt in SCHEMA {
        db.exec(stmt, &[])?;
    }
    Ok(())
}

/// What can go wrong with images; [`ImageError::status`] is the HTTP status and `Display` the
/// exact message for `{"message": ...}`.
#[derive(Debug, Error)]
pub enum ImageError {
    /// Bad input (400), the message says what was wrong and what was expected.
    #[error("{0}")]
    BadRequest(String),
    /// 404 with the name as moby prints it (`busybox:latest`, `sha256:…`); docker-py relies
    /// on the words "No such image".
    #[error("No such image: {0}")]
    NotFound(String),
    /// 409 (an `rmi` that must be forced, in-use images).
    #[error("{0}")]
    Conflict(String),
    /// The upload (or one decompressed layer) is larger than the bound (400).
    #[error("the upload is too large: more than {0} bytes (uncompressed)")]
    TooLarge(u64),
    /// A blob's content does not hash to the digest it was supposed to have (400).
    #[error("content digest {actual} does not match the expected {expected}")]
    DigestMismatch {
        /// What the manifest or config said.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// A layer the metadata names is not in this host's blob store (500).
    #[error("layer {0} is missing from the image store")]
    BlobMissing(String),
    /// A local file operation failed (500).
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The store failed (500), or a stored row could not be decoded.
    #[error("{0}")]
    Db(#[from] OpError),
}

impl ImageError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ImageError::BadRequest(_) | ImageError::TooLarge(_) => 400,
            ImageError::DigestMismatch { .. } => 400,
            ImageError::NotFound(_) => 404,
            ImageError::Conflict(_) => 409,
            ImageError::Db(OpError::Api(a)) => a.status,
            ImageError::BlobMissing(_) | ImageError::Io { .. } | ImageError::Db(_) => 500,
        }
    }
}

impl From<portolan::store::StoreError> for ImageError {
    fn from(e: portolan::store::StoreError) -> ImageError {
        ImageError::Db(OpError::Store(e))
    }
}

fn bad(msg: impl Into<String>) -> ImageError {
    ImageError::BadRequest(msg.into())
}

// ---------------------------------------------------------------------------------------------
// References (docker/distribution's grammar, as moby 20.10 parses names)

/// A parsed, normalised image reference: `repo` in its familiar form (`busybox`, `me/app`,
/// `registry.example:5000/x`; `docker.io/` and `library/` stripped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Familiar repository name.
    pub repo: String,
    /// The tag, if one was given.
    pub tag: Option<String>,
    /// The digest, if one was given (`@sha256:…`).
    pub digest: Option<String>,
}

impl Reference {
    /// `repo:tag`, the tag defaulting to `latest` (moby's `TagNameOnly`).
    pub fn repo_tag(&self) -> String {
        format!("{}:{}", self.repo, self.tag.as_deref().unwrap_or("latest"))
    }
}

const DEFAULT_DOMAIN: &str = "docker.io";
const NAME_TOTAL_MAX: usize = 255;

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn valid_name_component(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || !is_lower_alnum(b[0]) || !is_lower_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_lower_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_lower_alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_lower_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// `domainComponent(\.domainComponent)*(:[0-9]+)?`
fn valid_domain(s: &str) -> bool {
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
        })
}

/// `[\w][\w.-]{0,127}`
pub fn valid_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_ref_digest(s: &str) -> bool {
    let Some((alg, hex)) = s.split_once(':') else {
        return false;
    };
    let alg_ok = !alg.is_empty()
        && alg.as_bytes()[0].is_ascii_alphabetic()
        && alg.split(['-', '_', '+', '.']).all(|p| {
            !p.is_empty()
                && p.as_bytes()[0].is_ascii_alphabetic()
                && p.bytes().all(|c| c.is_ascii_alphanumeric())
        });
    alg_ok && hex.len() >= 32 && hex.bytes().all(|c| c.is_ascii_hexdigit())
}

const INVALID_FORMAT: &str = "invalid reference format";

/// moby's `reference.ParseNormalizedNamed`, with its error texts.
pub fn parse_reference(s: &str) -> Result<Reference, ImageError> {
    if is_hex64(s) {
        return Err(bad(format!(
            "invalid repository name ({s}), cannot specify 64-byte hexadecimal strings"
        )));
    }
    // splitDockerDomain
    let (mut domain, mut rest) = match s.find('/') {
        Some(i) if s[..i].contains(['.', ':']) || &s[..i] == "localhost" => {
            (s[..i].to_string(), s[i + 1..].to_string())
        }
        _ => (DEFAULT_DOMAIN.to_string(), s.to_string()),
    };
    if domain == "index.docker.io" {
        domain = DEFAULT_DOMAIN.to_string();
    }
    if domain == DEFAULT_DOMAIN && !rest.contains('/') {
        rest = format!("library/{rest}");
    }
    let remote = rest.split(':').next().unwrap_or("");
    if remote.to_lowercase() != remote {
        return Err(bad(
            "invalid reference format: repository name must be lowercase",
        ));
    }
    if s.is_empty() {
        return Err(bad("repository name must have at least one component"));
    }
    // Parse(domain + "/" + rest)
    let (name_tag, digest) = match rest.split_once('@') {
        Some((a, d)) => (a, Some(d)),
        None => (rest.as_str(), None),
    };
    let (path, tag) = match name_tag.rfind(':') {
        Some(i) if !name_tag[i..].contains('/') => (&name_tag[..i], Some(&name_tag[i + 1..])),
        _ => (name_tag, None),
    };
    let ok = valid_domain(&domain)
        && path.split('/').all(valid_name_component)
        && tag.is_none_or(valid_tag)
        && digest.is_none_or(valid_ref_digest);
    if !ok {
        return Err(bad(INVALID_FORMAT));
    }
    if domain.len() + 1 + path.len() > NAME_TOTAL_MAX {
        return Err(bad("repository name must not be more than 255 characters"));
    }
    let repo = if domain == DEFAULT_DOMAIN {
        match path.strip_prefix("library/") {
            Some(p) if !p.contains('/') => p.to_string(),
            _ => path.to_string(),
        }
    } else {
        format!("{domain}/{path}")
    };
    Ok(Reference {
        repo,
        tag: tag.map(str::to_string),
        digest: digest.map(str::to_string),
    })
}

/// The `repo:tag` a tag operation writes, from moby's `repo` and `tag` parameters (`tag` empty:
/// the tag in `repo`, else `latest`). Digest references are refused.
pub fn tag_reference(repo: &str, tag: &str) -> Result<String, ImageError> {
    let r = parse_reference(repo)?;
    if r.digest.is_some() {
        return Err(bad("refusing to create a tag with a digest reference"));
    }
    if tag.is_empty() {
        return Ok(r.repo_tag());
    }
    if !valid_tag(tag) {
        return Err(bad("invalid tag format"));
    }
    Ok(format!("{}:{tag}", r.repo))
}

/// The reference `POST /images/create?fromSrc=-&repo=R&tag=T` tags the import with (`None`
/// when `repo` is empty), as moby's `ImportImage` checks it.
pub fn import_reference(repo: &str, tag: &str) -> Result<Option<String>, ImageError> {
    if repo.is_empty() {
        return Ok(None);
    }
    let r = parse_reference(repo)?;
    if r.digest.is_some() {
        return Err(bad("cannot import digest reference"));
    }
    tag_reference(repo, tag).map(Some)
}

fn split_repo_tag(rt: &str) -> (&str, &str) {
    // A repo_tag we wrote: the tag is after the last ':' that follows the last '/'.
    match rt.rfind(':') {
        Some(i) if !rt[i..].contains('/') => (&rt[..i], &rt[i + 1..]),
        _ => (rt, "latest"),
    }
}

// ---------------------------------------------------------------------------------------------
// Time

/// RFC 3339 with nanoseconds, trailing zeros trimmed (Go's `time.RFC3339Nano`), in UTC.
pub fn rfc3339_nano(t: SystemTime) -> String {
    crate::control::time::rfc3339_of(t)
}

/// Go's zero time, what moby prints for "never".
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Milliseconds since the epoch of an RFC 3339 time (`Z` or `±hh:mm`, any fraction).
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    crate::control::time::parse_ms(s, crate::control::time::Form::Rfc3339)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Images in the store

/// An image ready to be stored (from [`super::archive::import`] or [`super::archive::load`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewImage {
    /// `sha256:` of `config`.
    pub id: String,
    /// The exact config JSON bytes.
    pub config: Vec<u8>,
    /// The layers, bottom first (digest = diff_id, size = the uncompressed tar's).
    pub layers: Vec<Blob>,
    /// Normalised `repo:tag`s to point at it.
    pub repo_tags: Vec<String>,
    /// The config's `created` (RFC 3339).
    pub created: String,
    /// The content size (sum of the layers' file sizes), as `docker images` shows it.
    pub size: u64,
}

/// A stored image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRow {
    /// `sha256:<hex>`.
    pub id: String,
    /// Creation time (from the config).
    pub created_ms: i64,
    /// Content size.
    pub size: u64,
    /// The config JSON.
    pub config: String,
    /// The layers, bottom first.
    pub layers: Vec<Blob>,
    /// When a tag last moved onto it.
    pub last_tag_ms: Option<i64>,
}

impl ImageRow {
    /// The config, parsed (`Null` if it does not parse: it was checked on the way in).
    pub fn config_json(&self) -> Value {
        serde_json::from_str(&self.config).unwrap_or(Value::Null)
    }
}

/// What [`insert`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Inserted {
    /// False if the account had this image already.
    pub new: bool,
    /// Tags that moved here from another image: `(repo:tag, old image id)`.
    pub moved: Vec<(String, String)>,
}

/// Docker's chain ids of a layer stack: `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let c = match out.last() {
            None => d.to_string(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(c);
    }
    out
}

fn lock_owner(db: &mut Db<'_>, owner: &str) -> Result<(), ImageError> {
    Ok(db.lock(lock_key(LOCK_IMAGES, owner))?)
}

fn lock_layers<'a>(
    db: &mut Db<'_>,
    digests: impl IntoIterator<Item = &'a str>,
) -> Result<(), ImageError> {
    // Ascending order, so two writers never wait on each other in opposite orders.
    let set: BTreeSet<&str> = digests.into_iter().collect();
    for d in set {
        db.lock(lock_key(LOCK_LAYER, d))?;
    }
    Ok(())
}

/// Stores `img` for `owner` (a no-op for an image the account has) and points its
/// `repo_tags` at it; a tag that named another image moves, and that image stays, untagged.
/// With `blobs`, checks under each layer's lock that its blob is there (a concurrent `rmi` of
/// the last other user may have removed it between the upload and this insert).
pub fn insert(
    db: &mut Db<'_>,
    owner: &str,
    img: &NewImage,
    blobs: Option<&LayerStore>,
) -> Result<Inserted, ImageError> {
    if sha256_digest(&img.config) != img.id {
        return Err(bad(format!(
            "image {}: the id is not the digest of its config",
            img.id
        )));
    }
    let config = std::str::from_utf8(&img.config)
        .map_err(|_| bad(format!("image {}: the config is not UTF-8 JSON", img.id)))?;
    for l in &img.layers {
        if !valid_digest(&l.digest) {
            return Err(bad(format!(
                "image {}: bad layer digest {}",
                img.id, l.digest
            )));
        }
    }
    let tags = img
        .repo_tags
        .iter()
        .map(|t| parse_reference(t).map(|r| r.repo_tag()))
        .collect::<Result<Vec<_>, _>>()?;
    lock_owner(db, owner)?;
    lock_layers(db, img.layers.iter().map(|l| l.digest.as_str()))?;
    if let Some(store) = blobs {
        for l in &img.layers {
            if !store.has(&l.digest) {
                return Err(ImageError::BlobMissing(l.digest.clone()));
            }
        }
    }
    let mut out = Inserted::default();
    let exists = db
        .query_opt(
            "SELECT id FROM docker_images WHERE owner_uuid = $1 AND id = $2",
            &[Val::text(owner), Val::text(&img.id)],
        )?
        .is_some();
    if !exists {
        let created_ms = parse_rfc3339_ms(&img.created).unwrap_or_else(now_ms);
        let layers = serde_json::to_string(&img.layers).map_err(|e| bad(e.to_string()))?;
        db.exec(
            "INSERT INTO docker_images (owner_uuid, id, created_ms, size, config, layers, last_tag_ms)
             VALUES ($1, $2, $3, $4, $5, $6, NULL)",
            &[
                Val::text(owner),
                Val::text(&img.id),
                Val::int(created_ms),
                Val::int(i64::try_from(img.size).unwrap_or(i64::MAX)),
                Val::text(config),
                Val::text(layers),
            ],
        )?;
        let diffs: Vec<&str> = img.layers.iter().map(|l| l.digest.as_str()).collect();
        for (i, (d, c)) in diffs.iter().zip(chain_ids(&diffs)).enumerate() {
            db.exec(
                "INSERT INTO docker_image_layers (owner_uuid, image_id, position, digest, chain_id)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    Val::text(owner),
                    Val::text(&img.id),
                    Val::int(i as i64),
                    Val::text(*d),
                    Val::text(c),
                ],
            )?;
        }
        out.new = true;
    }
    for rt in tags {
        if let Some(old) = set_tag(db, owner, &rt, &img.id)? {
            out.moved.push((rt, old));
        }
    }
    Ok(out)
}

/// Points `repo:tag` at `id`; the image it named before, if another.
fn set_tag(db: &mut Db<'_>, owner: &str, rt: &str, id: &str) -> Result<Option<String>, ImageError> {
    let (repo, tag) = split_repo_tag(rt);
    let prev = db
        .query_opt(
            "SELECT image_id FROM docker_image_tags WHERE owner_uuid = $1 AND repo = $2 AND tag = $3",
            &[Val::text(owner), Val::text(repo), Val::text(tag)],
        )?
        .map(|r| text(r, 0, "image_id"))
        .transpose()?;
    match &prev {
        Some(p) if p == id => return Ok(None),
        Some(_) => {
            db.exec(
                // SQLite numbers `$N` by first appearance: keep them in order.
                "UPDATE docker_image_tags SET image_id = $1
                 WHERE owner_uuid = $2 AND repo = $3 AND tag = $4",
                &[
                    Val::text(id),
                    Val::text(owner),
                    Val::text(repo),
                    Val::text(tag),
                ],
            )?;
        }
        None => {
            db.exec(
                "INSERT INTO docker_image_tags (owner_uuid, repo, tag, image_id) VALUES ($1, $2, $3, $4)",
                &[Val::text(owner), Val::text(repo), Val::text(tag), Val::text(id)],
            )?;
        }
    }
    db.exec(
        "UPDATE docker_images SET last_tag_ms = $1 WHERE owner_uuid = $2 AND id = $3",
        &[Val::int(now_ms()), Val::text(owner), Val::text(id)],
    )?;
    Ok(prev)
}

fn text(r: Row, i: usize, what: &str) -> Result<String, ImageError> {
    Ok(r.into_iter()
        .nth(i)
        .ok_or_else(|| OpError::Corrupt(format!("{what}: missing column")))?
        .into_string(what)?)
}

const IMAGE_COLS: &str = "id, created_ms, size, config, layers, last_tag_ms";

fn image_from_row(r: Row) -> Result<ImageRow, ImageError> {
    let mut it = r.into_iter();
    let mut next = |what: &str| {
        it.next()
            .ok_or_else(|| ImageError::Db(OpError::Corrupt(format!("docker_images.{what}"))))
    };
    let id = next("id")?.into_string("docker_images.id")?;
    let created_ms = next("created_ms")?.as_i64("docker_images.created_ms")?;
    let size = next("size")?.as_i64("docker_images.size")?.max(0) as u64;
    let config = next("config")?.into_string("docker_images.config")?;
    let layers = next("layers")?.into_string("docker_images.layers")?;
    let layers: Vec<Blob> = serde_json::from_str(&layers).map_err(OpError::from)?;
    let last_tag_ms = next("last_tag_ms")?.as_opt_i64();
    Ok(ImageRow {
        id,
        created_ms,
        size,
        config,
        layers,
        last_tag_ms,
    })
}

fn get_by_id(db: &mut Db<'_>, owner: &str, id: &str) -> Result<Option<ImageRow>, ImageError> {
    db.query_opt(
        &format!("SELECT {IMAGE_COLS} FROM docker_images WHERE owner_uuid = $1 AND id = $2"),
        &[Val::text(owner), Val::text(id)],
    )?
    .map(image_from_row)
    .transpose()
}

/// The account's `repo:tag`s of image `id`, sorted.
pub fn tags_of(db: &mut Db<'_>, owner: &str, id: &str) -> Result<Vec<String>, ImageError> {
    let rows = db.query(
        "SELECT repo, tag FROM docker_image_tags WHERE owner_uuid = $1 AND image_id = $2",
        &[Val::text(owner), Val::text(id)],
    )?;
    let mut out = rows
        .into_iter()
        .map(|r| {
            let mut it = r.into_iter();
            let repo = it.next().map(|v| v.into_string("repo")).transpose()?;
            let tag = it.next().map(|v| v.into_string("tag")).transpose()?;
            Ok(format!(
                "{}:{}",
                repo.unwrap_or_default(),
                tag.unwrap_or_default()
            ))
        })
        .collect::<Result<Vec<_>, OpError>>()?;
    out.sort();
    Ok(out)
}

/// The name moby's "No such image" error shows for `name`.
fn not_found(name: &str) -> ImageError {
    let shown = match parse_reference(name) {
        Ok(r) if r.digest.is_none() => r.repo_tag(),
        _ => name.to_string(),
    };
    ImageError::NotFound(shown)
}

/// Finds the account's image named `name`, in moby's order: a full id (`sha256:<hex>` or 64
/// hex), then `repo[:tag]` (tag `latest` by default; `docker.io/library/` dropped), then a unique
/// id prefix (with or without `sha256:`; ambiguous is not found). A malformed name is 400 as
/// moby words it; anything else that does not match is [`ImageError::NotFound`].
pub fn resolve(db: &mut Db<'_>, owner: &str, name: &str) -> Result<ImageRow, ImageError> {
    let full = if is_hex64(name) {
        Some(format!("sha256:{name}"))
    } else if name.strip_prefix("sha256:").is_some_and(is_hex64) {
        Some(name.to_string())
    } else {
        None
    };
    if let Some(id) = full {
        return get_by_id(db, owner, &id)?.ok_or_else(|| ImageError::NotFound(id));
    }
    // ParseAnyReference: `sha256:<short>` is not a name; moby then searches ids by prefix.
    let is_digest_like = name.contains(':') && name.starts_with("sha256:");
    let parsed = if is_digest_like {
        None
    } else {
        Some(parse_reference(name)?)
    };
    if let Some(r) = &parsed {
        if r.digest.is_none() {
            let (repo, tag) = (r.repo.clone(), r.tag.clone().unwrap_or("latest".into()));
            let row = db.query_opt(
                "SELECT image_id FROM docker_image_tags WHERE owner_uuid = $1 AND repo = $2 AND tag = $3",
                &[Val::text(owner), Val::text(&repo), Val::text(&tag)],
            )?;
            if let Some(row) = row {
                let id = text(row, 0, "image_id")?;
                if let Some(img) = get_by_id(db, owner, &id)? {
                    return Ok(img);
                }
            }
        }
    }
    // Id prefix (digestset.Lookup): hex only, unique.
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    if !hex.is_empty()
        && hex.len() < 64
        && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        let rows = db.query(
            &format!(
                // `hex` is [0-9a-f] only, so the pattern has no wildcard but the last.
                "SELECT {IMAGE_COLS} FROM docker_images WHERE owner_uuid = $1 AND id LIKE $2 LIMIT 2"
            ),
            &[Val::text(owner), Val::text(format!("sha256:{hex}%"))],
        )?;
        if rows.len() == 1 {
            return image_from_row(rows.into_iter().next().expect("one row"));
        }
    }
    Err(not_found(name))
}

/// `GET /images/{name}/json`.
pub fn inspect(db: &mut Db<'_>, owner: &str, name: &str) -> Result<Value, ImageError> {
    let img = resolve(db, owner, name)?;
    let tags = tags_of(db, owner, &img.id)?;
    Ok(inspect_json(&img, &tags))
}

fn empty_container_config() -> Value {
    json!({
        "Hostname": "", "Domainname": "", "User": "", "AttachStdin": false,
        "AttachStdout": false, "AttachStderr": false, "Tty": false, "OpenStdin": false,
        "StdinOnce": false, "Env": null, "Cmd": null, "Image": "", "Volumes": null,
        "WorkingDir": "", "Entrypoint": null, "OnBuild": null, "Labels": null
    })
}

fn inspect_json(img: &ImageRow, tags: &[String]) -> Value {
    let c = img.config_json();
    let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let diff_ids: Vec<&str> = img.layers.iter().map(|l| l.digest.as_str()).collect();
    let mut v = json!({
        "Id": img.id,
        "RepoTags": tags,
        "RepoDigests": [],
        "Parent": s("parent"),
        "Comment": s("comment"),
        "Created": c.get("created").cloned().unwrap_or(Value::String(ZERO_TIME.into())),
        "Container": s("container"),
        "ContainerConfig": c.get("container_config").cloned().unwrap_or_else(empty_container_config),
        "DockerVersion": s("docker_version"),
        "Author": s("author"),
        "Config": c.get("config").cloned().unwrap_or(Value::Null),
        "Architecture": s("architecture"),
        "Os": s("os"),
        "Size": img.size,
        "VirtualSize": img.size,
        "GraphDriver": {"Name": "fabric", "Data": null},
        "RootFS": {"Type": "layers", "Layers": diff_ids},
        "Metadata": {"LastTagTime": img.last_tag_ms.map(crate::control::time::rfc3339_from_ms).unwrap_or_else(|| ZERO_TIME.into())},
    });
    if let Some(var) = c.get("variant").and_then(Value::as_str) {
        v["Variant"] = Value::String(var.into());
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Listing

/// Parsed `filters`: key → values.
pub type Filters = BTreeMap<String, Vec<String>>;

/// Parses a `filters` query parameter in either encoding: `{"k":{"v":true}}` (the CLI) or
/// `{"k":["v"]}` (docker-py). Empty text is no filter.
pub fn parse_filters(text: &str) -> Result<Filters, ImageError> {
    let f = super::filters::Filters::parse(Some(text))?;
    Ok(f.0
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().collect()))
        .collect())
}

const IMAGE_FILTERS: &[&str] = &["before", "dangling", "label", "reference", "since"];

/// Go's `path.Match`: `*` (not `/`), `?`, `[...]` classes with ranges and `^`/`!`, `\` escapes.
/// `Err` for a malformed pattern.
pub fn glob_match(pattern: &str, name: &str) -> Result<bool, BadPattern> {
    glob(pattern, name).map_err(|()| BadPattern)
}

/// A malformed glob pattern (Go's `path.ErrBadPattern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("syntax error in pattern")]
pub struct BadPattern;

fn glob(pattern: &str, name: &str) -> Result<bool, ()> {
    fn class(p: &[char], c: char) -> Result<(bool, usize), ()> {
        // p starts after '['; returns (matched, chars consumed including ']').
        let mut i = 0;
        let negate = matches!(p.first(), Some('^') | Some('!'));
        if negate {
            i += 1;
        }
        let mut matched = false;
        let mut first = true;
        loop {
            let ch = *p.get(i).ok_or(())?;
            if ch == ']' && !first {
                i += 1;
                break;
            }
            first = false;
            let lo = if ch == '\\' {
                i += 1;
                *p.get(i).ok_or(())?
            } else {
                ch
            };
            i += 1;
            let mut hi = lo;
            if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|x| *x != ']') {
                i += 1;
                hi = if p[i] == '\\' {
                    i += 1;
                    *p.get(i).ok_or(())?
                } else {
                    p[i]
                };
                i += 1;
            }
            if lo <= c && c <= hi {
                matched = true;
            }
        }
        Ok((matched != negate, i))
    }
    fn go(p: &[char], n: &[char]) -> Result<bool, ()> {
        match p.first() {
            None => Ok(n.is_empty()),
            Some('*') => {
                let rest = &p[1..];
                for k in 0..=n.len() {
                    if k > 0 && n[k - 1] == '/' {
                        break;
                    }
                    if go(rest, &n[k..])? {
                        return Ok(true);
                    }
                }
                // Validate the rest of the pattern even without a match.
                go(rest, &[]).map(|_| false)
            }
            Some('?') => match n.first() {
                Some(c) if *c != '/' => go(&p[1..], &n[1..]),
                _ => check(&p[1..]).map(|_| false),
            },
            Some('[') => match n.first() {
                Some(c) => {
                    let (m, used) = class(&p[1..], *c)?;
                    if m && *c != '/' {
                        go(&p[1 + used..], &n[1..])
                    } else {
                        check(&p[1 + used..]).map(|_| false)
                    }
                }
                None => class(&p[1..], '\0')
                    .and_then(|(_, u)| check(&p[1 + u..]))
                    .map(|_| false),
            },
            Some('\\') => {
                let c = *p.get(1).ok_or(())?;
                match n.first() {
                    Some(x) if *x == c => go(&p[2..], &n[1..]),
                    _ => check(&p[2..]).map(|_| false),
                }
            }
            Some(c) => match n.first() {
                Some(x) if x == c => go(&p[1..], &n[1..]),
                _ => check(&p[1..]).map(|_| false),
            },
        }
    }
    fn check(p: &[char]) -> Result<(), ()> {
        let mut i = 0;
        while i < p.len() {
            match p[i] {
                '\\' => {
                    if i + 1 >= p.len() {
                        return Err(());
                    }
                    i += 2;
                }
                '[' => {
                    let (_, used) = class(&p[i + 1..], '\0')?;
                    i += 1 + used;
                }
                _ => i += 1,
            }
        }
        Ok(())
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// moby's `reference.FamiliarMatch` on a stored `repo:tag`: the pattern against `repo:tag`, or
/// else against `repo`.
fn familiar_match(pattern: &str, repo_tag: &str) -> Result<bool, ImageError> {
    let badp = |_| bad(format!("syntax error in pattern: {pattern}"));
    if glob_match(pattern, repo_tag).map_err(badp)? {
        return Ok(true);
    }
    glob_match(pattern, split_repo_tag(repo_tag).0).map_err(badp)
}

fn labels_match(config: &Value, wanted: &[String]) -> bool {
    let labels = config.get("config").and_then(|c| c.get("Labels"));
    wanted.iter().all(|w| {
        let (k, v) = match w.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (w.as_str(), None),
        };
        match labels.and_then(|l| l.get(k)) {
            Some(Value::String(have)) => v.is_none_or(|v| v == have),
            Some(_) => v.is_none(),
            None => false,
        }
    })
}

/// `GET /images/json`: the account's images, newest first, in the shape `docker images` and
/// docker-py read. `all` shows intermediate images too; imported and loaded images have no
/// parents here, so it changes nothing. Filters: `dangling`, `label`, `reference` (glob on
/// `repo:tag` or `repo`), `before`, `since` (an image name); others are 400 `invalid filter`.
pub fn list(
    db: &mut Db<'_>,
    owner: &str,
    all: bool,
    filters: &Filters,
) -> Result<Value, ImageError> {
    let _ = all;
    for k in filters.keys() {
        if !IMAGE_FILTERS.contains(&k.as_str()) {
            return Err(bad(format!("Invalid filter '{k}'")));
        }
    }
    let mut dangling_only = false;
    if let Some(vals) = filters.get("dangling") {
        for v in vals {
            match v.to_ascii_lowercase().as_str() {
                "true" | "1" => dangling_only = true,
                "false" | "0" => {}
                _ => return Err(bad(format!("Invalid filter 'dangling={v}'"))),
            }
        }
    }
    let has_dangling = filters.contains_key("dangling");
    let references = filters.get("reference");
    if let Some(pats) = references {
        for p in pats {
            glob_match(p, "").map_err(|_| bad(format!("syntax error in pattern: {p}")))?;
        }
    }
    let mut before = None;
    for v in filters.get("before").into_iter().flatten() {
        before = Some(resolve(db, owner, v)?.created_ms);
    }
    let mut since = None;
    for v in filters.get("since").into_iter().flatten() {
        since = Some(resolve(db, owner, v)?.created_ms);
    }
    let rows = db.query(
        &format!("SELECT {IMAGE_COLS} FROM docker_images WHERE owner_uuid = $1"),
        &[Val::text(owner)],
    )?;
    let mut images = rows
        .into_iter()
        .map(image_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    images.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
    let mut out = Vec::new();
    for img in images {
        if before.is_some_and(|t| img.created_ms >= t) || since.is_some_and(|t| img.created_ms <= t)
        {
            continue;
        }
        let config = img.config_json();
        if let Some(l) = filters.get("label") {
            if !labels_match(&config, l) {
                continue;
            }
        }
        let all_tags = tags_of(db, owner, &img.id)?;
        let mut tags = Vec::new();
        for t in &all_tags {
            let keep = match references {
                Some(pats) => {
                    let mut any = false;
                    for p in pats {
                        if familiar_match(p, t)? {
                            any = true;
                            break;
                        }
                    }
                    any
                }
                None => true,
            };
            if keep {
                tags.push(t.clone());
            }
        }
        let (repo_tags, repo_digests) = if tags.is_empty() {
            if !all_tags.is_empty() {
                // Tagged, but no tag matched the reference filter.
                continue;
            }
            if (has_dangling && !dangling_only) || references.is_some() {
                continue;
            }
            (json!(["<none>:<none>"]), json!(["<none>@<none>"]))
        } else {
            if dangling_only {
                continue;
            }
            (json!(tags), json!([]))
        };
        let labels = config
            .get("config")
            .and_then(|c| c.get("Labels"))
            .cloned()
            .unwrap_or(Value::Null);
        out.push(json!({
            "Id": img.id,
            "ParentId": config.get("parent").and_then(Value::as_str).unwrap_or(""),
            "RepoTags": repo_tags,
            "RepoDigests": repo_digests,
            "Created": img.created_ms.div_euclid(1000),
            "Size": img.size,
            "SharedSize": -1,
            "VirtualSize": img.size,
            "Labels": labels,
            "Containers": -1,
        }));
    }
    Ok(Value::Array(out))
}

// ---------------------------------------------------------------------------------------------
// Tag and remove

/// `POST /images/{source}/tag?repo=R&tag=T`: points `repo:tag` at the account's image
/// `source` (moving the tag if it named another); returns the familiar `repo:tag`. The source
/// is resolved first (404), then the name checked (400 as moby words it).
pub fn tag(
    db: &mut Db<'_>,
    owner: &str,
    source: &str,
    repo: &str,
    tag: &str,
) -> Result<String, ImageError> {
    let img = resolve(db, owner, source)?;
    let rt = tag_reference(repo, tag)?;
    lock_owner(db, owner)?;
    // Re-read under the lock: a concurrent rmi may have removed it.
    if get_by_id(db, owner, &img.id)?.is_none() {
        return Err(not_found(source));
    }
    set_tag(db, owner, &rt, &img.id)?;
    Ok(rt)
}

/// What [`remove`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Removed {
    /// The `[{"Untagged": …}, {"Deleted": …}]` list `docker rmi` prints.
    pub items: Vec<Value>,
    /// Layer digests that no image of any account references any more: the caller removes
    /// them from the [`LayerStore`] after the transaction commits, with [`gc_layers`].
    pub unreferenced: Vec<String>,
}

fn short_id(id: &str) -> &str {
    let h = id.strip_prefix("sha256:").unwrap_or(id);
    &h[..h.len().min(12)]
}

fn is_id_prefix(id: &str, name: &str) -> bool {
    id.starts_with(name)
        || id
            .strip_prefix("sha256:")
            .is_some_and(|h| h.starts_with(name))
}

/// `DELETE /images/{name}[?force=1]`, as moby's `ImageDelete` decides: a `repo:tag` name only
/// untags, unless it was the image's last tag; an id removes the image with its one tag, but
/// an image with several tags needs `force` (409 `conflict: unable to delete <short> (must be
/// forced) - image is referenced in multiple repositories`). 404 `No such image: NAME`.
pub fn remove(
    db: &mut Db<'_>,
    owner: &str,
    name: &str,
    force: bool,
) -> Result<Removed, ImageError> {
    lock_owner(db, owner)?;
    let img = resolve(db, owner, name)?;
    let mut items = Vec::new();
    let mut tags = tags_of(db, owner, &img.id)?;
    if !is_id_prefix(&img.id, name) {
        // A repository reference: remove it first.
        let rt = parse_reference(name)?.repo_tag();
        let (repo, tag) = split_repo_tag(&rt);
        db.exec(
            "DELETE FROM docker_image_tags WHERE owner_uuid = $1 AND repo = $2 AND tag = $3",
            &[Val::text(owner), Val::text(repo), Val::text(tag)],
        )?;
        items.push(json!({ "Untagged": rt }));
        tags.retain(|t| *t != rt);
        if !tags.is_empty() {
            return Ok(Removed {
                items,
                unreferenced: Vec::new(),
            });
        }
    } else if tags.len() > 1 && !force {
        return Err(ImageError::Conflict(format!(
            "conflict: unable to delete {} (must be forced) - image is referenced in multiple repositories",
            short_id(&img.id)
        )));
    }
    for t in &tags {
        items.push(json!({ "Untagged": t }));
    }
    db.exec(
        "DELETE FROM docker_image_tags WHERE owner_uuid = $1 AND image_id = $2",
        &[Val::text(owner), Val::text(&img.id)],
    )?;
    db.exec(
        "DELETE FROM docker_image_layers WHERE owner_uuid = $1 AND image_id = $2",
        &[Val::text(owner), Val::text(&img.id)],
    )?;
    db.exec(
        "DELETE FROM docker_images WHERE owner_uuid = $1 AND id = $2",
        &[Val::text(owner), Val::text(&img.id)],
    )?;
    items.push(json!({ "Deleted": img.id }));
    // The layers this account no longer has (moby lists removed layers by chain id, top first).
    let diffs: Vec<&str> = img.layers.iter().map(|l| l.digest.as_str()).collect();
    for c in chain_ids(&diffs).iter().rev() {
        let n = count(
            db,
            "SELECT COUNT(*) FROM docker_image_layers WHERE owner_uuid = $1 AND chain_id = $2",
            &[Val::text(owner), Val::text(c)],
        )?;
        if n == 0 {
            items.push(json!({ "Deleted": c }));
        }
    }
    let unreferenced = unreferenced_layers(db, diffs.iter().copied())?;
    Ok(Removed {
        items,
        unreferenced,
    })
}

fn count(db: &mut Db<'_>, sql: &str, params: &[Val]) -> Result<i64, ImageError> {
    Ok(db
        .query_opt(sql, params)?
        .and_then(|r| r.first().and_then(Val::as_opt_i64))
        .unwrap_or(0))
}

/// Of `digests`, those no image of any account references.
pub fn unreferenced_layers<'a>(
    db: &mut Db<'_>,
    digests: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, ImageError> {
    let set: BTreeSet<&str> = digests.into_iter().collect();
    let mut out = Vec::new();
    for d in set {
        let n = count(
            db,
            "SELECT COUNT(*) FROM docker_image_layers WHERE digest = $1",
            &[Val::text(d)],
        )?;
        if n == 0 {
            out.push(d.to_string());
        }
    }
    Ok(out)
}

/// Removes from `store` the blobs of `digests` that no image references, each under its layer
/// lock and re-counted (run in its own transaction after [`remove`]'s committed). An insert
/// that races it holds the same lock and checks its blobs are there ([`insert`] with
/// `Some(store)`), so it fails cleanly instead of referencing a removed blob. Returns the
/// digests removed.
pub fn gc_layers(
    db: &mut Db<'_>,
    store: &LayerStore,
    digests: &[String],
) -> Result<Vec<String>, ImageError> {
    lock_layers(db, digests.iter().map(String::as_str))?;
    let mut removed = Vec::new();
    for d in unreferenced_layers(db, digests.iter().map(String::as_str))? {
        if store.remove(&d)? {
            removed.push(d);
        }
    }
    Ok(removed)
}

/// How many images the account has (for `/info`'s `Images`).
pub fn count_images(db: &mut Db<'_>, owner: &str) -> Result<i64, ImageError> {
    count(
        db,
        "SELECT COUNT(*) FROM docker_images WHERE owner_uuid = $1",
        &[Val::text(owner)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::archive::testutil::*;
    use crate::docker::archive::{import, ImportOpts};
    use crate::docker::layers::tests::TmpDir;
    use portolan::store::{self, Store};
    use std::sync::Arc;

    struct TmpStore(Option<std::path::PathBuf>, Arc<dyn Store>);

    impl Drop for TmpStore {
        fn drop(&mut self) {
            if let Some(p) = &self.0 {
                for s in ["", "-wal", "-shm"] {
                    let mut p = p.clone().into_os_string();
                    p.push(s);
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }

    fn sqlite() -> TmpStore {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).unwrap();
        let path =
            std::env::temp_dir().join(format!("fabric-images-unit-{}.db", crate::pki::ca::hex(&b)));
        let s = store::open(&format!("sqlite:{}", path.display())).unwrap();
        run(&*s, create_schema).unwrap();
        TmpStore(Some(path), s)
    }

    fn run<R>(
        s: &dyn Store,
        f: impl FnOnce(&mut Db<'_>) -> Result<R, ImageError>,
    ) -> Result<R, ImageError> {
        store::with_txn(s, |tx| f(&mut Db::from(tx.raw())))
    }

    fn uuid() -> String {
        crate::control::params::random_uuid().unwrap()
    }

    fn imp(blobs: &LayerStore, what: &str, tag: Option<&str>, changes: &[&str]) -> NewImage {
        import(
            blobs,
            &rootfs(what)[..],
            &ImportOpts {
                changes: changes.iter().map(|c| c.to_string()).collect(),
                message: None,
                repo_tag: tag.map(str::to_string),
            },
        )
        .unwrap()
    }

    fn ids(v: &Value) -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i["Id"].as_str().unwrap().to_string())
            .collect()
    }

    fn filters(s: &str) -> Filters {
        parse_filters(s).unwrap()
    }

    /// The whole life of images in two accounts; run on SQLite and (if configured) PostgreSQL.
    fn lifecycle(s: &dyn Store) {
        let d = TmpDir::new("images-unit");
        let blobs = LayerStore::open(&d.0).unwrap();
        let (a, b) = (uuid(), uuid());
        let (a, b) = (a.as_str(), b.as_str());
        let img1 = imp(&blobs, "one", Some("bb:1"), &["LABEL tier=web"]);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let img2 = imp(&blobs, "two", Some("bb:latest"), &[]);
        let ins = run(s, |db| insert(db, a, &img1, Some(&blobs))).unwrap();
        assert_eq!(
            ins,
            Inserted {
                new: true,
                moved: vec![]
            }
        );
        run(s, |db| insert(db, a, &img2, Some(&blobs))).unwrap();
        // Again: nothing new.
        assert!(!run(s, |db| insert(db, a, &img1, None)).unwrap().new);

        // Resolution, in moby's order.
        let hex = &img1.id[7..];
        for name in [
            img1.id.as_str(),
            hex,
            &hex[..12],
            &format!("sha256:{}", &hex[..5]),
            "bb:1",
            "docker.io/library/bb:1",
            "index.docker.io/library/bb:1",
        ] {
            assert_eq!(
                run(s, |db| resolve(db, a, name)).unwrap().id,
                img1.id,
                "{name}"
            );
        }
        assert_eq!(run(s, |db| resolve(db, a, "bb")).unwrap().id, img2.id);
        for (name, msg) in [
            ("nope", "No such image: nope:latest"),
            ("bb:2", "No such image: bb:2"),
            ("me/x", "No such image: me/x:latest"),
        ] {
            let e = run(s, |db| resolve(db, a, name)).unwrap_err();
            assert_eq!((e.status(), e.to_string()), (404, msg.to_string()));
        }
        let e = run(s, |db| resolve(db, a, "BB")).unwrap_err();
        assert_eq!(
            (e.status(), e.to_string()),
            (
                400,
                "invalid reference format: repository name must be lowercase".to_string()
            )
        );
        // Another account sees nothing, by any name.
        for name in [img1.id.as_str(), hex, &hex[..12], "bb:1", "bb"] {
            let e = run(s, |db| resolve(db, b, name)).unwrap_err();
            assert_eq!(e.status(), 404, "{name}");
            assert!(e.to_string().starts_with("No such image: "), "{e}");
        }
        assert_eq!(
            run(s, |db| list(db, b, false, &Filters::new())).unwrap(),
            json!([])
        );

        // List: newest first, the CLI's fields.
        let l = run(s, |db| list(db, a, false, &Filters::new())).unwrap();
        assert_eq!(ids(&l), [img2.id.clone(), img1.id.clone()]);
        let e1 = &l[1];
        assert_eq!(e1["RepoTags"], json!(["bb:1"]));
        assert_eq!(e1["RepoDigests"], json!([]));
        assert_eq!(e1["ParentId"], "");
        assert_eq!(e1["SharedSize"], -1);
        assert_eq!(e1["Containers"], -1);
        assert_eq!(e1["Size"], img1.size);
        assert_eq!(e1["VirtualSize"], img1.size);
        assert_eq!(e1["Labels"], json!({"tier": "web"}));
        assert_eq!(
            e1["Created"].as_i64().unwrap(),
            parse_rfc3339_ms(&img1.created).unwrap() / 1000
        );

        // Inspect.
        let i = run(s, |db| inspect(db, a, "bb:1")).unwrap();
        assert_eq!(i["Id"], img1.id.as_str());
        assert_eq!(i["RepoTags"], json!(["bb:1"]));
        assert_eq!(i["Comment"], "Imported from -");
        assert_eq!(i["Created"], img1.created.as_str());
        assert_eq!(i["Architecture"], "amd64");
        assert_eq!(i["Os"], "linux");
        assert_eq!(
            i["RootFS"],
            json!({"Type": "layers", "Layers": [img1.layers[0].digest]})
        );
        assert_eq!(i["Config"]["Labels"], json!({"tier": "web"}));
        assert_eq!(i["ContainerConfig"]["Cmd"], Value::Null);
        assert!(parse_rfc3339_ms(i["Metadata"]["LastTagTime"].as_str().unwrap()).is_some());
        for k in ["Parent", "Container", "DockerVersion", "Author"] {
            assert_eq!(i[k], "", "{k}");
        }

        // Tag: a new name; moving bb:latest from img2 to img1 leaves img2 dangling.
        assert_eq!(
            run(s, |db| tag(db, a, "bb:1", "docker.io/me/web", "v1")).unwrap(),
            "me/web:v1"
        );
        assert_eq!(
            run(s, |db| tag(db, a, &img1.id, "bb", "")).unwrap(),
            "bb:latest"
        );
        let l = run(s, |db| list(db, a, false, &Filters::new())).unwrap();
        let by_id = |l: &Value, id: &str| {
            l.as_array()
                .unwrap()
                .iter()
                .find(|i| i["Id"] == id)
                .cloned()
                .unwrap()
        };
        assert_eq!(
            by_id(&l, &img1.id)["RepoTags"],
            json!(["bb:1", "bb:latest", "me/web:v1"])
        );
        assert_eq!(by_id(&l, &img2.id)["RepoTags"], json!(["<none>:<none>"]));
        assert_eq!(by_id(&l, &img2.id)["RepoDigests"], json!(["<none>@<none>"]));
        // Filters.
        let f = |q: &str| ids(&run(s, |db| list(db, a, false, &filters(q))).unwrap());
        assert_eq!(f(r#"{"dangling":{"true":true}}"#), vec![img2.id.clone()]);
        assert_eq!(f(r#"{"dangling":["false"]}"#), vec![img1.id.clone()]);
        assert_eq!(f(r#"{"label":["tier=web"]}"#), vec![img1.id.clone()]);
        assert_eq!(f(r#"{"label":["tier"]}"#), vec![img1.id.clone()]);
        assert!(f(r#"{"label":["tier=db"]}"#).is_empty());
        assert_eq!(f(r#"{"reference":["me/*"]}"#), vec![img1.id.clone()]);
        assert_eq!(f(r#"{"reference":["bb"]}"#), vec![img1.id.clone()]);
        assert!(f(r#"{"reference":["b?:9"]}"#).is_empty());
        let refd = run(s, |db| {
            list(db, a, false, &filters(r#"{"reference":["*/*:v1"]}"#))
        })
        .unwrap();
        assert_eq!(refd[0]["RepoTags"], json!(["me/web:v1"]));
        // `*` does not cross a `/`, as in Go's path.Match.
        assert!(f(r#"{"reference":["*:v1"]}"#).is_empty());
        assert_eq!(
            f(&format!(r#"{{"before":["{}"]}}"#, img2.id)),
            vec![img1.id.clone()]
        );
        assert_eq!(f(r#"{"since":["bb:1"]}"#), vec![img2.id.clone()]);
        for (q, msg) in [
            (r#"{"nope":["x"]}"#, "Invalid filter 'nope'"),
            (
                r#"{"dangling":["maybe"]}"#,
                "Invalid filter 'dangling=maybe'",
            ),
            (r#"{"reference":["[a"]}"#, "syntax error in pattern: [a"),
        ] {
            let e = run(s, |db| list(db, a, false, &filters(q))).unwrap_err();
            assert_eq!((e.status(), e.to_string()), (400, msg.to_string()), "{q}");
        }
        let e = run(s, |db| {
            list(db, a, false, &filters(r#"{"since":["gone"]}"#))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "No such image: gone:latest");

        // Tag errors: 404 first, then the name as moby words it.
        let e = run(s, |db| tag(db, a, "gone", "x", "")).unwrap_err();
        assert_eq!(e.status(), 404);
        for (repo, t, msg) in [
            (
                "Upper",
                "",
                "invalid reference format: repository name must be lowercase",
            ),
            ("a/b:c", "bad tag!", "invalid tag format"),
            ("bad//name", "", "invalid reference format"),
            (
                hex,
                "",
                &*format!(
                    "invalid repository name ({hex}), cannot specify 64-byte hexadecimal strings"
                ),
            ),
            (
                "x@sha256:0123456789abcdef0123456789abcdef",
                "",
                "refusing to create a tag with a digest reference",
            ),
        ] {
            let e = run(s, |db| tag(db, a, "bb:1", repo, t)).unwrap_err();
            assert_eq!(
                (e.status(), e.to_string()),
                (400, msg.to_string()),
                "{repo}"
            );
        }

        // The same image (same layer) in account b, tagged differently.
        run(s, |db| insert(db, b, &img1, Some(&blobs))).unwrap();
        assert_eq!(run(s, |db| tags_of(db, b, &img1.id)).unwrap(), ["bb:1"]);

        // rmi: a tag of a multi-tagged image only untags.
        let r = run(s, |db| remove(db, a, "me/web:v1", false)).unwrap();
        assert_eq!(r.items, vec![json!({"Untagged": "me/web:v1"})]);
        assert!(r.unreferenced.is_empty());
        // An id with several tags needs force.
        let e = run(s, |db| remove(db, a, &hex[..12], false)).unwrap_err();
        assert_eq!(
            (e.status(), e.to_string()),
            (409, format!("conflict: unable to delete {} (must be forced) - image is referenced in multiple repositories", &hex[..12]))
        );
        // Another account cannot remove it, and gets exactly "No such image".
        let e = run(s, |db| remove(db, b, "bb:latest", true)).unwrap_err();
        assert_eq!(e.to_string(), "No such image: bb:latest");
        // Forced: every tag, then the image, then its layer (by chain id) for this account;
        // account b still has the layer, so it stays on disk.
        let r = run(s, |db| remove(db, a, &hex[..12], true)).unwrap();
        assert_eq!(
            r.items,
            vec![
                json!({"Untagged": "bb:1"}),
                json!({"Untagged": "bb:latest"}),
                json!({"Deleted": img1.id}),
                json!({"Deleted": img1.layers[0].digest}),
            ]
        );
        assert!(r.unreferenced.is_empty());
        assert!(blobs.has(&img1.layers[0].digest));
        assert_eq!(run(s, |db| resolve(db, b, "bb:1")).unwrap().id, img1.id);
        // The dangling one by id; its layer is nobody's now.
        let r = run(s, |db| remove(db, a, &img2.id, false)).unwrap();
        assert_eq!(
            r.items,
            vec![
                json!({"Deleted": img2.id}),
                json!({"Deleted": img2.layers[0].digest})
            ]
        );
        assert_eq!(r.unreferenced, [img2.layers[0].digest.clone()]);
        let gone = run(s, |db| gc_layers(db, &blobs, &r.unreferenced)).unwrap();
        assert_eq!(gone, r.unreferenced);
        assert!(!blobs.has(&img2.layers[0].digest));
        // An insert whose blob went away fails cleanly.
        let e = run(s, |db| insert(db, a, &img2, Some(&blobs))).unwrap_err();
        assert_eq!(e.status(), 500);
        assert!(run(s, |db| resolve(db, a, &img2.id)).is_err());
        // b's last tag by name: untagged and deleted, the layer is unreferenced.
        let r = run(s, |db| remove(db, b, "bb:1", false)).unwrap();
        assert_eq!(
            r.items,
            vec![
                json!({"Untagged": "bb:1"}),
                json!({"Deleted": img1.id}),
                json!({"Deleted": img1.layers[0].digest}),
            ]
        );
        assert_eq!(r.unreferenced, [img1.layers[0].digest.clone()]);
        assert_eq!(run(s, |db| count_images(db, a)).unwrap(), 0);
        assert_eq!(run(s, |db| count_images(db, b)).unwrap(), 0);
        let e = run(s, |db| remove(db, b, "bb:1", false)).unwrap_err();
        assert_eq!(
            (e.status(), e.to_string()),
            (404, "No such image: bb:1".to_string())
        );
    }

    #[test]
    fn lifecycle_on_sqlite() {
        let t = sqlite();
        lifecycle(&*t.1);
    }

    #[test]
    fn lifecycle_on_postgres() {
        let Some(admin) = portolan::store::postgres::test_admin_url() else {
            return;
        };
        let tdb = portolan::store::postgres::TestDatabase::create(&admin).unwrap();
        let s = store::open(&tdb.url).unwrap();
        run(&*s, create_schema).unwrap();
        lifecycle(&*s);
    }

    #[test]
    fn moving_a_tag_reports_the_old_image_and_multi_layer_chain_ids() {
        let t = sqlite();
        let s = &*t.1;
        let d = TmpDir::new("images-unit");
        let blobs = LayerStore::open(&d.0).unwrap();
        let a = uuid();
        let i1 = imp(&blobs, "a", Some("x:1"), &[]);
        let i2 = imp(&blobs, "b", Some("x:1"), &[]);
        run(s, |db| insert(db, &a, &i1, None)).unwrap();
        let ins = run(s, |db| insert(db, &a, &i2, None)).unwrap();
        assert_eq!(ins.moved, vec![("x:1".to_string(), i1.id.clone())]);
        assert!(run(s, |db| tags_of(db, &a, &i1.id)).unwrap().is_empty());
        // Chain ids: the first is the diff_id, then sha256("<prev> <diff>").
        let c = chain_ids(&["sha256:aa", "sha256:bb"]);
        assert_eq!(c[0], "sha256:aa");
        assert_eq!(c[1], sha256_digest(b"sha256:aa sha256:bb"));
        // A config that is not the id's is refused before anything is written.
        let mut bad_img = i1.clone();
        bad_img.config.push(b' ');
        let e = run(s, |db| insert(db, &a, &bad_img, None)).unwrap_err();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn references_parse_as_moby_does() {
        let ok = |s: &str| parse_reference(s).unwrap();
        assert_eq!(ok("busybox").repo_tag(), "busybox:latest");
        assert_eq!(
            ok("docker.io/library/busybox:1.35").repo_tag(),
            "busybox:1.35"
        );
        assert_eq!(ok("docker.io/me/app").repo_tag(), "me/app:latest");
        assert_eq!(ok("library/busybox").repo_tag(), "busybox:latest");
        assert_eq!(
            ok("localhost:5000/a/b:c").repo_tag(),
            "localhost:5000/a/b:c"
        );
        assert_eq!(
            ok("Registry.Example/x").repo_tag(),
            "Registry.Example/x:latest"
        );
        assert_eq!(ok("a__b-c---e/f_g.h").repo, "a__b-c---e/f_g.h");
        // A first component with a dot is a registry host, where `_` is not allowed.
        assert_eq!(
            parse_reference("a_b.c/d").unwrap_err().to_string(),
            "invalid reference format"
        );
        let r = ok("x@sha256:0123456789abcdef0123456789abcdef");
        assert_eq!(
            r.digest.as_deref(),
            Some("sha256:0123456789abcdef0123456789abcdef")
        );
        for (s, msg) in [
            ("", "repository name must have at least one component"),
            (
                "A",
                "invalid reference format: repository name must be lowercase",
            ),
            ("a:B@", "invalid reference format"),
            ("-a", "invalid reference format"),
            ("a.", "invalid reference format"),
            ("a___b", "invalid reference format"),
            ("a:", "invalid reference format"),
            ("a:-x", "invalid reference format"),
            ("a b", "invalid reference format"),
            (
                &"a".repeat(300),
                "repository name must not be more than 255 characters",
            ),
        ] {
            let e = parse_reference(s).unwrap_err();
            assert_eq!(e.to_string(), msg, "{s:?}");
        }
        assert_eq!(import_reference("", "").unwrap(), None);
        assert_eq!(
            import_reference("bb:1", "").unwrap().as_deref(),
            Some("bb:1")
        );
        assert_eq!(
            import_reference("bb", "2").unwrap().as_deref(),
            Some("bb:2")
        );
        assert_eq!(
            import_reference("x@sha256:0123456789abcdef0123456789abcdef", "")
                .unwrap_err()
                .to_string(),
            "cannot import digest reference"
        );
    }

    #[test]
    fn glob_is_go_s_path_match() {
        let m = |p: &str, n: &str| glob_match(p, n).unwrap();
        assert!(m("*", "busybox"));
        assert!(!m("*", "me/app"));
        assert!(m("*/*", "me/app"));
        assert!(m("b?sy*:1.*", "busybox:1.35"));
        assert!(m("[a-c]b", "bb"));
        assert!(!m("[^a-c]b", "bb"));
        assert!(m("a\\*", "a*"));
        assert!(!m("a\\*", "ab"));
        assert!(glob_match("[a", "x").is_err());
        assert!(glob_match("a\\", "a").is_err());
    }

    #[test]
    fn filters_accept_both_encodings() {
        assert_eq!(
            parse_filters(r#"{"dangling":{"true":true},"label":["a=1","b"]}"#).unwrap(),
            Filters::from([
                ("dangling".to_string(), vec!["true".to_string()]),
                (
                    "label".to_string(),
                    vec!["a=1".to_string(), "b".to_string()]
                ),
            ])
        );
        assert!(parse_filters("").unwrap().is_empty());
        assert_eq!(parse_filters("[1]").unwrap_err().status(), 400);
        assert_eq!(parse_filters("{").unwrap_err().status(), 400);
    }
}
