//! The content-addressed blob store for image layers: `DIR/images/sha256/<hex>`, written through
//! `DIR/images/tmp/` and renamed into place only once complete and fsynced, so a reader never
//! sees a partial blob and a blob's name is always the SHA-256 of its bytes.
//!
//! Blobs are a host's own files (DESIGN "Where state lives"); the metadata that references them
//! is in the store ([`super::images`]). Layers are kept uncompressed: a layer's digest is its
//! Docker `diff_id`, so the agent of any host can fetch a layer by the id in the image config
//! and check what it got.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::pki::ca::hex;
use ring::digest::{Context, SHA256};

use super::images::ImageError;

/// The largest blob [`LayerStore::put`] accepts unless [`LayerStore::with_max_blob`] says
/// otherwise (8 GiB: a large root filesystem, not a disk filler).
pub const DEFAULT_MAX_BLOB: u64 = 8 << 30;

/// Temporary files older than this are left over from a crash and removed by
/// [`LayerStore::open`].
const STALE_TMP: Duration = Duration::from_secs(24 * 3600);

/// A stored blob.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Blob {
    /// `sha256:<64 lowercase hex>` of the bytes.
    pub digest: String,
    /// Length in bytes.
    pub size: u64,
}

/// The blob store under `DIR/images`.
#[derive(Debug, Clone)]
pub struct LayerStore {
    root: PathBuf,
    max_blob: u64,
}

/// Whether `digest` is `sha256:` and 64 lowercase hex digits (the only names the store has).
pub fn valid_digest(digest: &str) -> bool {
    digest
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&crate::pki::sha256(bytes)))
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

impl LayerStore {
    /// Opens (creating) `data_dir/images/{sha256,tmp}` and removes temporary files a crash left
    /// behind (older than a day, so a concurrent writer's are never touched).
    pub fn open(data_dir: &Path) -> Result<LayerStore, ImageError> {
        let root = data_dir.join("images");
        for d in ["sha256", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(format!("cannot create {}", p.display())))?;
        }
        if let Ok(rd) = fs::read_dir(root.join("tmp")) {
            let now = SystemTime::now();
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age > STALE_TMP);
                if old {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(LayerStore {
            root,
            max_blob: DEFAULT_MAX_BLOB,
        })
    }

    /// The same store with another bound for [`put`](Self::put).
    pub fn with_max_blob(mut self, max: u64) -> LayerStore {
        self.max_blob = max;
        self
    }

    /// The bound [`put`](Self::put) applies.
    pub fn max_blob(&self) -> u64 {
        self.max_blob
    }

    /// `DIR/images`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stores everything `r` yields (at most [`max_blob`](Self::max_blob) bytes; more is
    /// [`ImageError::TooLarge`] and leaves nothing behind). Storing bytes that are there already
    /// is a no-op with the same answer.
    pub fn put(&self, r: impl Read) -> Result<Blob, ImageError> {
        self.put_bounded(r, self.max_blob)
    }

    /// [`put`](Self::put) with an explicit bound.
    pub fn put_bounded(&self, mut r: impl Read, max: u64) -> Result<Blob, ImageError> {
        let mut w = self.writer(max)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ImageError::BadRequest(format!("reading the upload: {e}"))),
            };
            w.write_all(&buf[..n]).map_err(|e| w.error(e))?;
        }
        w.commit()
    }

    /// A writer that hashes while it spools into `tmp/`; [`BlobWriter::commit`] moves it into
    /// place, dropping it without committing removes the temporary file.
    pub fn writer(&self, max: u64) -> Result<BlobWriter, ImageError> {
        let mut b = [0u8; 12];
        getrandom::getrandom(&mut b).map_err(|e| {
            io_err("no randomness for a temporary name")(io::Error::other(e.to_string()))
        })?;
        let tmp = self.root.join("tmp").join(hex(&b));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(format!("cannot create {}", tmp.display())))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            ctx: Context::new(&SHA256),
            size: 0,
            max,
            over: false,
            failed: None,
            dir: self.root.join("sha256"),
        })
    }

    /// The file of a stored blob, if it is there (`None` for a malformed digest too).
    pub fn path(&self, digest: &str) -> Option<PathBuf> {
        let p = self.blob_path(digest)?;
        p.is_file().then_some(p)
    }

    /// Whether a blob is stored.
    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).is_some()
    }

    /// Opens a stored blob for reading.
    pub fn open_blob(&self, digest: &str) -> Result<File, ImageError> {
        let p = self
            .path(digest)
            .ok_or_else(|| ImageError::BlobMissing(digest.to_string()))?;
        File::open(&p).map_err(io_err(format!("cannot open {}", p.display())))
    }

    /// Removes a blob; `Ok(false)` if it was not there. Callers remove only blobs no image
    /// references any more ([`super::images::unreferenced_layers`]).
    pub fn remove(&self, digest: &str) -> Result<bool, ImageError> {
        let Some(p) = self.blob_path(digest) else {
            return Ok(false);
        };
        match fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(format!("cannot remove {}", p.display()))(e)),
        }
    }

    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        valid_digest(digest).then(|| self.root.join("sha256").join(&digest[7..]))
    }
}

/// A blob being written (see [`LayerStore::writer`]). Writing past its bound fails with an
/// `io::Error` and marks it, so [`BlobWriter::error`] reports [`ImageError::TooLarge`].
pub struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    ctx: Context,
    size: u64,
    max: u64,
    over: bool,
    failed: Option<String>,
    dir: PathBuf,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `sha256:<hex>` of what was written so far.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex(self.ctx.clone().finish().as_ref()))
    }

    /// Whether a write went past the bound.
    pub fn over_limit(&self) -> bool {
        self.over
    }

    /// The error to report for `e`, which came out of a read or write involving this writer:
    /// the bound, a local I/O failure, or else (the reader's) a bad request.
    pub fn error(&self, e: io::Error) -> ImageError {
        if self.over {
            ImageError::TooLarge(self.max)
        } else if let Some(what) = &self.failed {
            ImageError::Io {
                what: what.clone(),
                source: e,
            }
        } else {
            ImageError::BadRequest(format!("reading the upload: {e}"))
        }
    }

    /// fsyncs and renames into `sha256/<hex>`; the blob's digest and size.
    pub fn commit(self) -> Result<Blob, ImageError> {
        self.commit_checked(None)
    }

    /// [`commit`](Self::commit), but only if the digest is `expected` (nothing is stored
    /// otherwise: [`ImageError::DigestMismatch`]).
    pub fn commit_expecting(self, expected: &str) -> Result<Blob, ImageError> {
        self.commit_checked(Some(expected))
    }

    fn commit_checked(mut self, expected: Option<&str>) -> Result<Blob, ImageError> {
        let digest = self.digest();
        if let Some(want) = expected {
            if want != digest {
                return Err(ImageError::DigestMismatch {
                    expected: want.to_string(),
                    actual: digest,
                });
            }
        }
        let file = self.file.take().expect("a BlobWriter is committed once");
        file.sync_all()
            .map_err(io_err(format!("cannot fsync {}", self.tmp.display())))?;
        drop(file);
        let dst = self.dir.join(&digest[7..]);
        if dst.is_file() {
            // Same digest, same content: keep the one that is there.
            let _ = fs::remove_file(&self.tmp);
        } else {
            fs::rename(&self.tmp, &dst)
                .map_err(io_err(format!("cannot move a blob to {}", dst.display())))?;
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
        }
        Ok(Blob {
            digest,
            size: self.size,
        })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size.saturating_add(buf.len() as u64) > self.max {
            self.over = true;
            return Err(io::Error::other(format!(
                "the blob is larger than {} bytes",
                self.max
            )));
        }
        let Some(f) = self.file.as_mut() else {
            return Err(io::Error::other("the blob was committed"));
        };
        let n = match f.write(buf) {
            Ok(n) => n,
            Err(e) => {
                self.failed = Some(format!("cannot write {}", self.tmp.display()));
                return Err(e);
            }
        };
        self.ctx.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A temporary data directory, removed on drop.
    pub(crate) struct TmpDir(pub PathBuf);

    impl TmpDir {
        pub(crate) fn new(tag: &str) -> TmpDir {
            let mut b = [0u8; 8];
            getrandom::getrandom(&mut b).unwrap();
            let p = std::env::temp_dir().join(format!("fabric-{tag}-{}", hex(&b)));
            fs::create_dir_all(&p).unwrap();
            TmpDir(p)
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tmp_files(s: &LayerStore) -> usize {
        fs::read_dir(s.root().join("tmp")).unwrap().count()
    }

    #[test]
    fn put_is_content_addressed_and_idempotent() {
        let d = TmpDir::new("layers-unit");
        let s = LayerStore::open(&d.0).unwrap();
        let b = s.put(&b"hello"[..]).unwrap();
        assert_eq!(
            b.digest,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(b.size, 5);
        assert_eq!(b.digest, sha256_digest(b"hello"));
        let p = s.path(&b.digest).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello");
        assert_eq!(p, d.0.join("images/sha256").join(&b.digest[7..]));
        // Again: same answer, one file, no temporary left.
        assert_eq!(s.put(&b"hello"[..]).unwrap(), b);
        assert_eq!(fs::read_dir(d.0.join("images/sha256")).unwrap().count(), 1);
        assert_eq!(tmp_files(&s), 0);
        assert!(s.has(&b.digest));
        let mut got = String::new();
        s.open_blob(&b.digest)
            .unwrap()
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "hello");
        assert!(s.remove(&b.digest).unwrap());
        assert!(!s.remove(&b.digest).unwrap());
        assert!(!s.has(&b.digest));
        assert!(matches!(
            s.open_blob(&b.digest),
            Err(ImageError::BlobMissing(_))
        ));
    }

    #[test]
    fn bounded_put_leaves_nothing_behind() {
        let d = TmpDir::new("layers-unit");
        let s = LayerStore::open(&d.0).unwrap().with_max_blob(10);
        let e = s.put(&[7u8; 11][..]).unwrap_err();
        assert!(matches!(e, ImageError::TooLarge(10)), "{e}");
        assert_eq!(e.status(), 400);
        assert_eq!(tmp_files(&s), 0);
        assert_eq!(fs::read_dir(d.0.join("images/sha256")).unwrap().count(), 0);
        // Exactly the bound is fine.
        assert_eq!(s.put(&[7u8; 10][..]).unwrap().size, 10);
    }

    #[test]
    fn a_failing_reader_stores_nothing() {
        struct Bad(usize);
        impl Read for Bad {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone"));
                }
                self.0 -= 1;
                b[0] = 1;
                Ok(1)
            }
        }
        let d = TmpDir::new("layers-unit");
        let s = LayerStore::open(&d.0).unwrap();
        let e = s.put(Bad(3)).unwrap_err();
        assert_eq!(e.status(), 400, "{e}");
        assert_eq!(tmp_files(&s), 0);
    }

    #[test]
    fn expected_digest_is_checked_before_the_rename() {
        let d = TmpDir::new("layers-unit");
        let s = LayerStore::open(&d.0).unwrap();
        let mut w = s.writer(100).unwrap();
        w.write_all(b"abc").unwrap();
        let e = w.commit_expecting(&sha256_digest(b"abd")).unwrap_err();
        assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
        assert_eq!(tmp_files(&s), 0);
        assert!(!s.has(&sha256_digest(b"abc")));
        let mut w = s.writer(100).unwrap();
        w.write_all(b"abc").unwrap();
        assert_eq!(
            w.commit_expecting(&sha256_digest(b"abc")).unwrap().digest,
            sha256_digest(b"abc")
        );
    }

    #[test]
    fn digests_are_checked_before_touching_paths() {
        let d = TmpDir::new("layers-unit");
        let s = LayerStore::open(&d.0).unwrap();
        for bad in [
            "",
            "sha256:",
            "sha256:../../etc/passwd",
            "md5:0123",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}/", "a".repeat(63)),
        ] {
            assert!(!valid_digest(bad), "{bad}");
            assert!(s.path(bad).is_none());
            assert!(!s.remove(bad).unwrap());
        }
        assert!(valid_digest(&sha256_digest(b"")));
    }
}
