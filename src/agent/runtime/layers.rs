//! The host's layer cache: `DIR/images/sha256/<hex>`, the same layout as the head's blob store
//! ([`crate::docker::layers`]), so on the head the layers are simply there.
//!
//! [`ensure_layers`] uses a present blob as it is and fetches a missing one over the agent's
//! connection (`GET /servers/:own/layers/sha256:<hex>`). A download is written to a file of its
//! own in `DIR/images/tmp/` (a random name: concurrent downloads of one digest never share a
//! file), hashed while it is written, fsynced, and renamed into `sha256/` only when its SHA-256
//! is the digest asked for; anything else is refused ([`LayerError::DigestMismatch`]) and
//! removed. The rename is atomic, so a reader sees a whole, verified blob or none.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use ring::digest::{Context, SHA256};

use crate::agent::api::{Api, ApiError};
use crate::docker::layers::valid_digest;
use crate::pki::ca::hex;

/// The largest layer a host downloads (the head's own bound on stored blobs).
pub const MAX_LAYER: u64 = crate::docker::layers::DEFAULT_MAX_BLOB;

/// How long a download may go without receiving anything before it is given up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a layer could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The name is not `sha256:<64 lowercase hex>` (nothing is fetched or opened for it).
    #[error("layer {0:?}: expected sha256:<64 lowercase hex digits>")]
    BadDigest(String),
    /// The bytes received do not hash to the digest asked for: refused, nothing kept.
    #[error("layer {want}: the bytes received hash to {got}; refused and not kept")]
    DigestMismatch {
        /// The digest asked for.
        want: String,
        /// The SHA-256 of what came.
        got: String,
    },
    /// The control plane did not give the layer (unreachable, 404, ...).
    #[error("layer {digest}: {source}")]
    Fetch {
        /// The layer.
        digest: String,
        /// The call's error.
        source: ApiError,
    },
    /// The download broke off, stalled, or was longer than [`MAX_LAYER`].
    #[error("layer {digest}: download failed: {detail}")]
    Download {
        /// The layer.
        digest: String,
        /// What happened.
        detail: String,
    },
    /// A local file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The error.
        source: io::Error,
    },
}

/// Outcomes of [`ensure_layers`] per layer, process-wide.
#[derive(Debug, Default)]
pub struct LayerCounters {
    /// Already present.
    pub present: AtomicU64,
    /// Downloaded and verified.
    pub fetched: AtomicU64,
    /// Refused: the bytes did not match their digest.
    pub mismatched: AtomicU64,
    /// Refused: a malformed digest.
    pub bad_digest: AtomicU64,
    /// Failed: the control plane, the download or the disk.
    pub failed: AtomicU64,
}

/// This process's layer outcomes.
pub static COUNTERS: LayerCounters = LayerCounters {
    present: AtomicU64::new(0),
    fetched: AtomicU64::new(0),
    mismatched: AtomicU64::new(0),
    bad_digest: AtomicU64::new(0),
    failed: AtomicU64::new(0),
};

/// The path of `digest`'s blob under `images_dir` (`DIR/images`), once the digest is checked.
pub fn blob_path(images_dir: &Path, digest: &str) -> Result<PathBuf, LayerError> {
    if !valid_digest(digest) {
        return Err(LayerError::BadDigest(digest.to_string()));
    }
    Ok(images_dir.join("sha256").join(&digest["sha256:".len()..]))
}

/// Makes every layer of `digests` (`sha256:<hex>`, bottom first) present in `images_dir`
/// (`DIR/images`): present blobs are used as they are, missing ones are fetched from the
/// control plane and verified. Answers their paths, in the same order.
pub async fn ensure_layers(
    api: &Api,
    images_dir: &Path,
    digests: &[String],
) -> Result<Vec<PathBuf>, LayerError> {
    let mut out = Vec::with_capacity(digests.len());
    for d in digests {
        let r = ensure_one(api, images_dir, d).await;
        let c = match &r {
            Ok((_, true)) => &COUNTERS.fetched,
            Ok((_, false)) => &COUNTERS.present,
            Err(LayerError::DigestMismatch { .. }) => &COUNTERS.mismatched,
            Err(LayerError::BadDigest(_)) => &COUNTERS.bad_digest,
            Err(_) => &COUNTERS.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
        out.push(r?.0);
    }
    Ok(out)
}

/// One layer: its path and whether it was downloaded now.
async fn ensure_one(
    api: &Api,
    images_dir: &Path,
    digest: &str,
) -> Result<(PathBuf, bool), LayerError> {
    let path = blob_path(images_dir, digest)?;
    if path.is_file() {
        return Ok((path, false));
    }
    let fetch = |source| LayerError::Fetch {
        digest: digest.to_string(),
        source,
    };
    let broke = |detail: String| LayerError::Download {
        digest: digest.to_string(),
        detail,
    };
    let mut w = LayerWriter::new(images_dir, MAX_LAYER)?;
    let url = format!("/servers/{}/layers/{digest}", api.server());
    let mut body = api.get_stream(&url).await.map_err(fetch)?;
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
            Err(_) => return Err(broke(format!("nothing received for {IDLE_TIMEOUT:?}"))),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(broke(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            w.write(&data).map_err(|e| match e {
                WriteError::TooLarge => broke(format!("longer than {MAX_LAYER} bytes")),
                WriteError::Io(e) => e,
            })?;
        }
    }
    let want = digest.to_string();
    let done = tokio::task::spawn_blocking(move || w.finish(&want))
        .await
        .map_err(|e| broke(format!("the writer task failed: {e}")))??;
    Ok((done, true))
}

/// Why a [`LayerWriter::write`] failed.
#[derive(Debug)]
pub enum WriteError {
    /// Past the writer's bound.
    TooLarge,
    /// The disk.
    Io(LayerError),
}

/// A blob being written into `DIR/images/tmp/<random>`: hashed as it is written; moved into
/// `sha256/` by [`finish`](Self::finish) only if its digest is the one expected. Dropped
/// unfinished (or refused), its file is removed.
pub struct LayerWriter {
    file: Option<File>,
    tmp: PathBuf,
    dir: PathBuf,
    ctx: Context,
    size: u64,
    max: u64,
}

impl LayerWriter {
    /// A new temporary file in `images_dir/tmp` (the directories are created if missing).
    pub fn new(images_dir: &Path, max: u64) -> Result<LayerWriter, LayerError> {
        let io = |what: String| move |source| LayerError::Io { what, source };
        let (tmp_dir, dir) = (images_dir.join("tmp"), images_dir.join("sha256"));
        for d in [&tmp_dir, &dir] {
            fs::create_dir_all(d).map_err(io(format!("cannot create {}", d.display())))?;
        }
        let mut b = [0u8; 12];
        getrandom::getrandom(&mut b).map_err(|e| {
            io("no randomness for a temporary name".into())(io::Error::other(e.to_string()))
        })?;
        let tmp = tmp_dir.join(format!("{}.{}", hex(&b), std::process::id()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(format!("cannot create {}", tmp.display())))?;
        Ok(LayerWriter {
            file: Some(file),
            tmp,
            dir,
            ctx: Context::new(&SHA256),
            size: 0,
            max,
        })
    }

    /// Appends `data` (hashing it).
    pub fn write(&mut self, data: &[u8]) -> Result<(), WriteError> {
        if self.size.saturating_add(data.len() as u64) > self.max {
            return Err(WriteError::TooLarge);
        }
        let Some(f) = self.file.as_mut() else {
            return Err(WriteError::Io(LayerError::Io {
                what: format!("writing {}", self.tmp.display()),
                source: io::Error::other("the layer was finished"),
            }));
        };
        f.write_all(data).map_err(|source| {
            WriteError::Io(LayerError::Io {
                what: format!("cannot write {}", self.tmp.display()),
                source,
            })
        })?;
        self.ctx.update(data);
        self.size += data.len() as u64;
        Ok(())
    }

    /// `sha256:<hex>` of what was written.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex(self.ctx.clone().finish().as_ref()))
    }

    /// Checks the digest against `want`, fsyncs, renames into `sha256/<hex>` (fsyncing the
    /// directory) and answers the blob's path; on a mismatch nothing is kept.
    pub fn finish(mut self, want: &str) -> Result<PathBuf, LayerError> {
        let got = self.digest();
        if got != want {
            return Err(LayerError::DigestMismatch {
                want: want.to_string(),
                got,
            });
        }
        let file = self.file.take().expect("finished once");
        let io = |what: String| move |source| LayerError::Io { what, source };
        file.sync_all()
            .map_err(io(format!("cannot fsync {}", self.tmp.display())))?;
        drop(file);
        let dst = self.dir.join(&got["sha256:".len()..]);
        if let Err(e) = fs::rename(&self.tmp, &dst) {
            let _ = fs::remove_file(&self.tmp);
            return Err(io(format!("cannot move a layer to {}", dst.display()))(e));
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(dst)
    }
}

impl Drop for LayerWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let mut b = [0u8; 6];
        getrandom::getrandom(&mut b).unwrap();
        let d = std::env::temp_dir().join(format!("fabric-layers-{}", hex(&b)));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn sha(b: &[u8]) -> String {
        crate::docker::layers::sha256_digest(b)
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn verified_blob_is_moved_into_place() {
        let d = tmp();
        let mut w = LayerWriter::new(&d, 1 << 20).unwrap();
        w.write(b"hello ").unwrap();
        w.write(b"layer").unwrap();
        let p = w.finish(&sha(b"hello layer")).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello layer");
        assert_eq!(p, blob_path(&d, &sha(b"hello layer")).unwrap());
        assert!(entries(&d.join("tmp")).is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn mismatch_is_refused_and_nothing_kept() {
        let d = tmp();
        let mut w = LayerWriter::new(&d, 1 << 20).unwrap();
        w.write(b"evil").unwrap();
        let want = sha(b"good");
        match w.finish(&want) {
            Err(LayerError::DigestMismatch { want: w, got }) => {
                assert_eq!(w, want);
                assert_eq!(got, sha(b"evil"));
            }
            r => panic!("{r:?}"),
        }
        assert!(entries(&d.join("tmp")).is_empty());
        assert!(entries(&d.join("sha256")).is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bound_and_drop() {
        let d = tmp();
        let mut w = LayerWriter::new(&d, 4).unwrap();
        w.write(b"1234").unwrap();
        assert!(matches!(w.write(b"5"), Err(WriteError::TooLarge)));
        assert_eq!(entries(&d.join("tmp")).len(), 1);
        drop(w);
        assert!(entries(&d.join("tmp")).is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_writers_of_one_digest_do_not_collide() {
        let d = tmp();
        let data = vec![7u8; 300_000];
        let want = sha(&data);
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (d, data, want) = (d.clone(), data.clone(), want.clone());
                std::thread::spawn(move || {
                    let mut w = LayerWriter::new(&d, 1 << 20).unwrap();
                    for c in data.chunks(1000) {
                        w.write(c).unwrap();
                    }
                    w.finish(&want).unwrap()
                })
            })
            .collect();
        for h in hs {
            let p = h.join().unwrap();
            assert_eq!(fs::read(&p).unwrap(), data);
        }
        assert!(entries(&d.join("tmp")).is_empty());
        assert_eq!(entries(&d.join("sha256")).len(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn digests_are_checked_before_any_path() {
        for bad in [
            "sha256:../../etc/passwd",
            "sha256:ABCDEF",
            "md5:00",
            "",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(matches!(
                blob_path(Path::new("/x"), bad),
                Err(LayerError::BadDigest(_))
            ));
        }
    }
}
