//! A container's root filesystem from its image layers, unpacked so that no layer can write
//! anything outside it.
//!
//! [`unpack`] applies the layers (uncompressed tars, bottom first) into a fresh directory. Every
//! path is resolved from the root's directory descriptor one component at a time with
//! `openat(O_DIRECTORY | O_NOFOLLOW)`, so no write ever goes through a symbolic link (a layer's
//! own or a lower layer's), and nothing is looked up by a path string the kernel would resolve
//! on its own. Refused, naming the layer, the entry and why:
//! - absolute names and `..` components (in names and in hard-link targets);
//! - a name whose parent is (or passes through) a symbolic link or a non-directory;
//! - hard links whose target is absolute, has `..`, or passes through a symbolic link;
//! - character and block devices (FIFOs are created);
//! - owners outside the container's range: a file's uid/gid `u` becomes `uid_base + u` on the
//!   host, and `u ≥ UID_RANGE` is refused, so a setuid or setgid bit (kept) only ever names a
//!   UID of the container's own range;
//! - entry kinds that are not files, directories, symbolic links, hard links or FIFOs.
//!
//! Whiteouts are honoured: `.wh.NAME` removes `NAME` of lower layers, `.wh..wh..opq` empties
//! its directory of what lower layers put there (other `.wh..wh.*` aufs metadata is skipped).
//! Modes (with setuid/setgid/sticky) and modification times are kept; a directory's time is set
//! once every layer is applied. Extended attributes are not applied. A failed unpack removes
//! what it made.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self, AtFlags, FileType, Gid, Mode, OFlags, Uid};

use crate::control::container_spec::UID_RANGE;

/// What [`unpack`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Layers applied.
    pub layers: usize,
    /// Entries created (files, directories, links, FIFOs).
    pub entries: u64,
    /// Bytes of regular files written.
    pub bytes: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
}

/// Why a root filesystem could not be made (it is removed again).
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// A layer entry that would be unsafe or cannot be represented.
    #[error("layer {layer}: entry {entry:?} refused: {why}")]
    Refused {
        /// The layer's file name (its digest's hex).
        layer: String,
        /// The entry's name as the tar has it.
        entry: String,
        /// Why.
        why: String,
    },
    /// The layer is not a well-formed tar.
    #[error("layer {layer}: not a readable tar: {detail}")]
    BadTar {
        /// The layer.
        layer: String,
        /// The reader's error.
        detail: String,
    },
    /// The root filesystem's directory is there already.
    #[error("root filesystem {0}: already exists; expected a path where a fresh one is made")]
    Exists(PathBuf),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
}

/// Outcomes of [`unpack`], process-wide.
#[derive(Debug, Default)]
pub struct UnpackCounters {
    /// Root filesystems made.
    pub ok: AtomicU64,
    /// Refused for an unsafe or unsupported entry.
    pub refused: AtomicU64,
    /// Failed: malformed tar, the disk, an existing target.
    pub failed: AtomicU64,
}

/// This process's unpack outcomes.
pub static COUNTERS: UnpackCounters = UnpackCounters {
    ok: AtomicU64::new(0),
    refused: AtomicU64::new(0),
    failed: AtomicU64::new(0),
};

/// Applies `layers` (uncompressed tars, bottom first) into `rootfs`, which must not exist yet
/// (its parents are made if missing), owned by `uid_base` (root inside). On any error the
/// partial `rootfs` is removed. runc enters it as `uid_base`: every directory above it must be
/// searchable by others (mode `o+x`).
pub fn unpack(
    layers: &[PathBuf],
    rootfs: &Path,
    uid_base: u32,
) -> Result<UnpackStats, UnpackError> {
    if uid_base.checked_add(UID_RANGE).is_none() {
        return Err(UnpackError::Io {
            what: format!("uid_base {uid_base}"),
            source: io::Error::other("leaves no room for the container's range"),
        });
    }
    if std::fs::symlink_metadata(rootfs).is_ok() {
        COUNTERS.failed.fetch_add(1, Ordering::Relaxed);
        return Err(UnpackError::Exists(rootfs.to_path_buf()));
    }
    if let Some(parent) = rootfs.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| UnpackError::Io {
            what: format!("cannot create {}", parent.display()),
            source,
        })?;
    }
    let r = std::fs::create_dir(rootfs)
        .map_err(|source| UnpackError::Io {
            what: format!("cannot create {}", rootfs.display()),
            source,
        })
        .and_then(|()| unpack_into(layers, rootfs, uid_base));
    let c = match &r {
        Ok(_) => &COUNTERS.ok,
        Err(UnpackError::Refused { .. }) => &COUNTERS.refused,
        Err(_) => &COUNTERS.failed,
    };
    c.fetch_add(1, Ordering::Relaxed);
    if r.is_err() {
        // remove_dir_all never follows symbolic links below its argument.
        let _ = std::fs::remove_dir_all(rootfs);
    }
    r
}

fn unpack_into(
    layers: &[PathBuf],
    rootfs: &Path,
    uid_base: u32,
) -> Result<UnpackStats, UnpackError> {
    let croot = cstr_path(rootfs)?;
    let root = open_dir_at(fs::CWD, &croot).map_err(|source| UnpackError::Io {
        what: format!("cannot open {}", rootfs.display()),
        source,
    })?;
    let io_err = |what: String| move |source| UnpackError::Io { what, source };
    set_owner_mode(&root, uid_base, uid_base, 0o755)
        .map_err(io_err(format!("cannot chown {}", rootfs.display())))?;
    let mut u = Unpacker {
        root,
        uid_base,
        stats: UnpackStats::default(),
        dir_times: Vec::new(),
        layer: String::new(),
        this_layer: HashSet::new(),
    };
    for l in layers {
        u.layer = l
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| l.display().to_string());
        u.this_layer.clear();
        let f = File::open(l).map_err(io_err(format!("cannot open layer {}", l.display())))?;
        u.apply(f)?;
        u.stats.layers += 1;
    }
    u.set_dir_times();
    Ok(u.stats)
}

struct Unpacker {
    root: OwnedFd,
    uid_base: u32,
    stats: UnpackStats,
    /// Directories whose time is set at the end (their children change it until then).
    dir_times: Vec<(Vec<Vec<u8>>, i64)>,
    /// The current layer's name, for errors.
    layer: String,
    /// Paths the current layer made (an opaque marker keeps them).
    this_layer: HashSet<Vec<Vec<u8>>>,
}

/// An entry's name split into checked components (no empty, `.` or `..` ones).
type Components = Vec<Vec<u8>>;

/// Splits a tar name into components: `./a//b/` → `[a, b]`; absolute names, `..` and NUL are
/// refused (the reason).
pub fn components(name: &[u8]) -> Result<Components, &'static str> {
    if name.first() == Some(&b'/') {
        return Err("absolute name");
    }
    if name.contains(&0) {
        return Err("NUL byte in the name");
    }
    let mut out = Vec::new();
    for c in name.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("`..` component"),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

impl Unpacker {
    fn refused(&self, entry: &[u8], why: impl Into<String>) -> UnpackError {
        UnpackError::Refused {
            layer: self.layer.clone(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            why: why.into(),
        }
    }

    fn io(&self, entry: &[u8], what: &str) -> impl FnOnce(io::Error) -> UnpackError {
        let what = format!(
            "layer {}: entry {:?}: {what}",
            self.layer,
            String::from_utf8_lossy(entry)
        );
        move |source| UnpackError::Io { what, source }
    }

    fn apply(&mut self, f: File) -> Result<(), UnpackError> {
        let mut ar = tar::Archive::new(io::BufReader::with_capacity(64 * 1024, f));
        let bad_tar = |layer: &str, e: io::Error| UnpackError::BadTar {
            layer: layer.to_string(),
            detail: e.to_string(),
        };
        let entries = ar.entries().map_err(|e| bad_tar(&self.layer, e))?;
        for e in entries {
            let e = e.map_err(|e| bad_tar(&self.layer, e))?;
            self.entry(e)?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, mut e: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        if e.header().entry_type() == tar::EntryType::XGlobalHeader {
            // pax global headers (`git archive` writes one) carry no file.
            return Ok(());
        }
        let name = e.path_bytes().into_owned();
        let comps = components(&name).map_err(|why| self.refused(&name, why))?;
        let kind = e.header().entry_type();
        let h = e.header();
        let (uid, gid) = (
            h.uid()
                .map_err(|x| self.refused(&name, format!("uid: {x}")))?,
            h.gid()
                .map_err(|x| self.refused(&name, format!("gid: {x}")))?,
        );
        let mode_bits = h
            .mode()
            .map_err(|x| self.refused(&name, format!("mode: {x}")))?
            & 0o7777;
        let mtime = h.mtime().unwrap_or(0).min(i64::MAX as u64) as i64;
        for (what, id) in [("uid", uid), ("gid", gid)] {
            if id >= u64::from(UID_RANGE) {
                return Err(self.refused(
                    &name,
                    format!("{what} {id} is outside the container's range 0..{UID_RANGE}"),
                ));
            }
        }
        let (huid, hgid) = (self.uid_base + uid as u32, self.uid_base + gid as u32);
        let Some((last, parents)) = comps.split_last() else {
            // The root itself (`./`): it keeps the mode and owner it was made with.
            if kind.is_dir() {
                return Ok(());
            }
            return Err(self.refused(&name, "a non-directory at the root"));
        };
        // Whiteouts.
        if let Some(hidden) = last.strip_prefix(b".wh.") {
            let Some(parent) = self.walk_or_missing(&name, parents, false, true)? else {
                // Nothing below it in lower layers: nothing to hide.
                self.stats.whiteouts += 1;
                return Ok(());
            };
            if hidden == b".wh..opq" {
                self.opaque(&name, &parent, parents)?;
            } else if hidden.starts_with(b".wh.") {
                // aufs metadata (`.wh..wh.plnk`, `.wh..wh.aufs`): nothing to apply.
                return Ok(());
            } else if !hidden.is_empty() {
                let c = cstr(hidden);
                remove_at(&parent, &c).map_err(self.io(&name, "cannot apply the whiteout"))?;
            }
            self.stats.whiteouts += 1;
            return Ok(());
        }
        let parent = self.walk(&name, parents, true)?;
        let c = cstr(last);
        let pfd = &parent;
        // What is there already: a directory stays for a directory, anything else goes.
        let existing = lstat_at(pfd, &c);
        let keep_dir = match &existing {
            Ok(st) if kind.is_dir() && is_dir(st) => true,
            Ok(_) => {
                remove_at(&parent, &c).map_err(self.io(&name, "cannot replace"))?;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => {
                return Err(self.io(&name, "cannot look up")(io::Error::from(e.kind())));
            }
        };
        let (u, g) = ids(huid, hgid);
        match kind {
            tar::EntryType::Directory => {
                if !keep_dir {
                    fs::mkdirat(pfd, c.as_c_str(), mode(0o700))
                        .map_err(ioe)
                        .map_err(self.io(&name, "cannot create the directory"))?;
                }
                let d =
                    open_dir_at(pfd, &c).map_err(self.io(&name, "cannot open the directory"))?;
                set_owner_mode(&d, huid, hgid, mode_bits)
                    .map_err(self.io(&name, "cannot set owner and mode"))?;
                self.dir_times.push((comps.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let fd = fs::openat(
                    pfd,
                    c.as_c_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    mode(0o600),
                )
                .map_err(ioe)
                .map_err(self.io(&name, "cannot create the file"))?;
                let mut f = File::from(fd);
                let n = io::copy(&mut e, &mut f).map_err(self.io(&name, "cannot write"))?;
                self.stats.bytes += n;
                set_owner_mode(&f, huid, hgid, mode_bits)
                    .map_err(self.io(&name, "cannot set owner and mode"))?;
                set_time(&f, mtime).map_err(self.io(&name, "cannot set the time"))?;
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| self.refused(&name, "a symbolic link without a target"))?;
                if target.is_empty() || target.contains(&0) {
                    return Err(
                        self.refused(&name, "an empty symbolic link target or one with NUL")
                    );
                }
                let t = cstr(&target);
                fs::symlinkat(t.as_c_str(), pfd, c.as_c_str())
                    .map_err(ioe)
                    .map_err(self.io(&name, "cannot create the symbolic link"))?;
                fs::chownat(pfd, c.as_c_str(), u, g, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(ioe)
                    .map_err(self.io(&name, "cannot set the link's owner"))?;
                set_time_at(pfd, &c, mtime).map_err(self.io(&name, "cannot set the time"))?;
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| self.refused(&name, "a hard link without a target"))?
                    .into_owned();
                let tcomps = components(&target).map_err(|why| {
                    self.refused(
                        &name,
                        format!("hard link to {:?}: {why}", String::from_utf8_lossy(&target)),
                    )
                })?;
                let Some((tlast, tparents)) = tcomps.split_last() else {
                    return Err(self.refused(&name, "a hard link to the root"));
                };
                let tparent = self.walk(&name, tparents, false)?;
                let tc = cstr(tlast);
                match lstat_at(&tparent, &tc) {
                    Ok(st) if is_dir(&st) => {
                        return Err(self.refused(&name, "a hard link to a directory"))
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(self.refused(
                            &name,
                            format!(
                                "hard link to {:?}, which is not in the root filesystem",
                                String::from_utf8_lossy(&target)
                            ),
                        ))
                    }
                }
                // No AT_SYMLINK_FOLLOW: a link to a symbolic link links the symbolic link.
                fs::linkat(&tparent, tc.as_c_str(), pfd, c.as_c_str(), AtFlags::empty())
                    .map_err(ioe)
                    .map_err(self.io(&name, "cannot create the hard link"))?;
            }
            tar::EntryType::Fifo => {
                fs::mknodat(pfd, c.as_c_str(), FileType::Fifo, mode(0o600), 0)
                    .map_err(ioe)
                    .map_err(self.io(&name, "cannot create the FIFO"))?;
                // Just made by us, in a directory reached without links.
                fs::chownat(pfd, c.as_c_str(), u, g, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(ioe)
                    .map_err(self.io(&name, "cannot set the FIFO's owner"))?;
                fs::chmodat(pfd, c.as_c_str(), mode(mode_bits), AtFlags::empty())
                    .map_err(ioe)
                    .map_err(self.io(&name, "cannot set the FIFO's mode"))?;
                set_time_at(pfd, &c, mtime).map_err(self.io(&name, "cannot set the time"))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(self.refused(&name, "device nodes are not allowed in a layer"));
            }
            other => {
                return Err(self.refused(&name, format!("unsupported entry kind {other:?}")));
            }
        }
        self.this_layer.insert(comps);
        self.stats.entries += 1;
        Ok(())
    }

    /// The directory `parents` (from the root), every component opened without following a
    /// symbolic link; with `create`, missing directories are made (mode 0755, root inside).
    fn walk(&self, name: &[u8], parents: &[Vec<u8>], create: bool) -> Result<OwnedFd, UnpackError> {
        self.walk_or_missing(name, parents, create, false)?
            .ok_or_else(|| self.refused(name, "a parent does not exist"))
    }

    /// [`walk`](Self::walk); with `missing_ok`, a parent that does not exist is `None` (a
    /// whiteout of something no lower layer has).
    fn walk_or_missing(
        &self,
        name: &[u8],
        parents: &[Vec<u8>],
        create: bool,
        missing_ok: bool,
    ) -> Result<Option<OwnedFd>, UnpackError> {
        let mut cur = dup(&self.root).map_err(self.io(name, "cannot open the root"))?;
        for (i, p) in parents.iter().enumerate() {
            let c = cstr(p);
            let next = match open_dir_at(&cur, &c) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::mkdirat(&cur, c.as_c_str(), mode(0o755))
                        .map_err(ioe)
                        .map_err(self.io(name, "cannot create a parent directory"))?;
                    let d = open_dir_at(&cur, &c)
                        .map_err(self.io(name, "cannot open a parent directory"))?;
                    set_owner_mode(&d, self.uid_base, self.uid_base, 0o755)
                        .map_err(self.io(name, "cannot set a parent's owner"))?;
                    d
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && missing_ok => return Ok(None),
                Err(e) => {
                    let so_far = parents[..=i]
                        .iter()
                        .map(|c| String::from_utf8_lossy(c).into_owned())
                        .collect::<Vec<_>>()
                        .join("/");
                    let why = match lstat_at(&cur, &c) {
                        Ok(st) if is_symlink(&st) => {
                            format!("{so_far} is a symbolic link: nothing is written through one")
                        }
                        Ok(_) => format!("{so_far} is not a directory"),
                        Err(_) => format!("{so_far} does not exist ({e})"),
                    };
                    return Err(self.refused(name, why));
                }
            };
            cur = next;
        }
        Ok(Some(cur))
    }

    /// `.wh..wh..opq`: removes what lower layers put in the directory.
    fn opaque(
        &mut self,
        name: &[u8],
        dir: &OwnedFd,
        parents: &[Vec<u8>],
    ) -> Result<(), UnpackError> {
        let listing = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let rd = std::fs::read_dir(&listing).map_err(self.io(name, "cannot list the directory"))?;
        for ent in rd {
            let ent = ent.map_err(self.io(name, "cannot list the directory"))?;
            let child =
                std::os::unix::ffi::OsStrExt::as_bytes(ent.file_name().as_os_str()).to_vec();
            let mut path = parents.to_vec();
            path.push(child.clone());
            // Kept: what this layer made there (also as the parent of what it made).
            if self.this_layer.iter().any(|p| p.starts_with(&path)) {
                continue;
            }
            remove_at(dir, &cstr(&child)).map_err(self.io(name, "cannot empty the directory"))?;
        }
        Ok(())
    }

    /// Sets every directory's time (last entry wins), reached again without links; ones a
    /// later layer removed are skipped.
    fn set_dir_times(&self) {
        for (comps, mtime) in &self.dir_times {
            let mut cur = match dup(&self.root) {
                Ok(fd) => fd,
                Err(_) => return,
            };
            let mut ok = true;
            for c in comps {
                match open_dir_at(&cur, &cstr(c)) {
                    Ok(fd) => cur = fd,
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                let _ = set_time(&cur, *mtime);
            }
        }
    }
}

fn cstr(b: &[u8]) -> CString {
    // Components were checked for NUL bytes.
    CString::new(b).unwrap_or_default()
}

fn cstr_path(p: &Path) -> Result<CString, UnpackError> {
    CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str())).map_err(|_| {
        UnpackError::Io {
            what: format!("{}", p.display()),
            source: io::Error::other("NUL byte in the path"),
        }
    })
}

fn ioe(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

fn mode(m: u32) -> Mode {
    Mode::from_raw_mode(m & 0o7777)
}

/// Opens the directory `name` in `dir` without following a symbolic link (one is `ELOOP` or
/// `ENOTDIR`).
fn open_dir_at<Fd: AsFd>(dir: Fd, name: &CString) -> io::Result<OwnedFd> {
    fs::openat(
        dir,
        name.as_c_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(ioe)
}

fn lstat_at<Fd: AsFd>(dir: Fd, name: &CString) -> io::Result<fs::Stat> {
    fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW).map_err(ioe)
}

fn is_dir(st: &fs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

fn is_symlink(st: &fs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Symlink
}

fn ids(uid: u32, gid: u32) -> (Option<Uid>, Option<Gid>) {
    (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
}

/// Owner first: a change of owner clears setuid/setgid, which the mode then sets.
fn set_owner_mode<Fd: AsFd>(fd: Fd, uid: u32, gid: u32, m: u32) -> io::Result<()> {
    let (u, g) = ids(uid, gid);
    fs::fchown(&fd, u, g).map_err(ioe)?;
    fs::fchmod(&fd, mode(m)).map_err(ioe)
}

fn stamps(mtime: i64) -> fs::Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    fs::Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Access and modification time of `fd` itself to `mtime`.
fn set_time<Fd: AsFd>(fd: Fd, mtime: i64) -> io::Result<()> {
    fs::futimens(fd, &stamps(mtime)).map_err(ioe)
}

/// The same for `name` in `dir`, not following a link.
fn set_time_at<Fd: AsFd>(dir: Fd, name: &CString, mtime: i64) -> io::Result<()> {
    fs::utimensat(
        dir,
        name.as_c_str(),
        &stamps(mtime),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(ioe)
}

/// Removes `name` in `dir` (a directory recursively), never following a symbolic link;
/// missing is fine.
fn remove_at(dir: &OwnedFd, name: &CString) -> io::Result<()> {
    match lstat_at(dir, name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(st) if is_dir(&st) => {
            // Through the descriptor of the directory reached without links; std's
            // remove_dir_all does not follow links below its argument.
            let p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name.as_bytes()),
            );
            std::fs::remove_dir_all(p)
        }
        Ok(_) => fs::unlinkat(dir, name.as_c_str(), AtFlags::empty()).map_err(ioe),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// One tar member for [`tar_of`].
    #[derive(Debug, Clone)]
    pub(crate) enum M {
        Dir(&'static str),
        File(String, Vec<u8>),
        Link(String, String),
        Sym(String, String),
        Node(&'static str, tar::EntryType),
        Owned(&'static str, u64, u32),
    }

    /// A tar of `members`, names written raw (the tar crate refuses `..` and absolute names,
    /// which is exactly what these tests need to write).
    pub(crate) fn tar_of(members: &[M]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for m in members {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mode(0o644);
            h.set_size(0);
            let (name, link, data): (&str, Option<&str>, &[u8]) = match m {
                M::Dir(n) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    (n, None, &[])
                }
                M::File(n, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    (n.as_str(), None, d.as_slice())
                }
                M::Link(n, t) => {
                    h.set_entry_type(tar::EntryType::Link);
                    (n.as_str(), Some(t.as_str()), &[])
                }
                M::Sym(n, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    (n.as_str(), Some(t.as_str()), &[])
                }
                M::Node(n, k) => {
                    h.set_entry_type(*k);
                    (n, None, &[])
                }
                M::Owned(n, uid, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_uid(*uid);
                    h.set_gid(*uid);
                    h.set_mode(*mode);
                    (n, None, &[])
                }
            };
            let old = h.as_old_mut();
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                old.linkname = [0; 100];
                old.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A test directory: `layers/`, `sentinel/` (with one file), and the root's parent.
    pub(crate) struct Scene {
        pub dir: PathBuf,
    }

    impl Scene {
        pub(crate) fn new() -> Scene {
            let mut b = [0u8; 6];
            getrandom::getrandom(&mut b).unwrap();
            let dir =
                std::env::temp_dir().join(format!("fabric-rootfs-{}", crate::pki::ca::hex(&b)));
            std::fs::create_dir_all(dir.join("layers")).unwrap();
            std::fs::create_dir_all(dir.join("sentinel")).unwrap();
            std::fs::write(dir.join("sentinel/keep"), b"keep").unwrap();
            Scene { dir }
        }

        pub(crate) fn layers(&self, tars: &[Vec<u8>]) -> Vec<PathBuf> {
            tars.iter()
                .enumerate()
                .map(|(i, t)| {
                    let p = self.dir.join("layers").join(format!("l{i}"));
                    std::fs::write(&p, t).unwrap();
                    p
                })
                .collect()
        }

        pub(crate) fn root(&self) -> PathBuf {
            self.dir.join("root")
        }

        /// The sentinel holds exactly its one file, unchanged.
        pub(crate) fn sentinel_untouched(&self) -> bool {
            let names: Vec<_> = std::fs::read_dir(self.dir.join("sentinel"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            names.len() == 1
                && std::fs::read(self.dir.join("sentinel/keep")).unwrap() == b"keep"
                && std::fs::symlink_metadata(self.dir.join("sentinel/keep"))
                    .unwrap()
                    .uid()
                    == 0
        }

        /// What the scene's directory holds besides `layers`, `sentinel`, `root`.
        pub(crate) fn strays(&self) -> Vec<String> {
            std::fs::read_dir(&self.dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !matches!(n.as_str(), "layers" | "sentinel" | "root"))
                .collect()
        }
    }

    impl Drop for Scene {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const BASE: u32 = crate::control::container_spec::UID_BASE_START;

    fn root() -> bool {
        if crate::io::process::effective_uid() != 0 {
            eprintln!("skipped: unpacking sets owners, which needs root");
            return false;
        }
        true
    }

    fn f(n: &str, d: &str) -> M {
        M::File(n.into(), d.as_bytes().to_vec())
    }

    #[test]
    fn names_are_split_and_checked() {
        assert_eq!(
            components(b"./a//b/").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert!(components(b"./").unwrap().is_empty());
        assert_eq!(components(b"/etc/x"), Err("absolute name"));
        assert_eq!(components(b"a/../../x"), Err("`..` component"));
        assert_eq!(components(b".."), Err("`..` component"));
    }

    #[test]
    fn unpacks_with_owners_shifted_and_modes_kept() {
        if !root() {
            return;
        }
        let s = Scene::new();
        let l = s.layers(&[tar_of(&[
            M::Dir("./"),
            M::Dir("etc/"),
            f("etc/hostname", "h\n"),
            M::Owned("usr/bin/su", 0, 0o4755),
            M::Owned("home/u/file", 1000, 0o640),
            M::Sym("bin".into(), "/usr/bin".into()),
            M::Link("etc/hn".into(), "etc/hostname".into()),
            M::Node("run/fifo", tar::EntryType::Fifo),
        ])]);
        let st = unpack(&l, &s.root(), BASE).unwrap();
        assert_eq!(st.layers, 1);
        assert_eq!(st.entries, 7);
        let r = s.root();
        let md = |p: &str| std::fs::symlink_metadata(r.join(p)).unwrap();
        assert_eq!((md("").uid(), md("").gid()), (BASE, BASE));
        assert_eq!(md("etc/hostname").uid(), BASE);
        assert_eq!(md("etc/hostname").mtime(), 1_700_000_000);
        assert_eq!(md("etc").mtime(), 1_700_000_000, "directory times set last");
        assert_eq!(md("usr/bin/su").permissions().mode() & 0o7777, 0o4755);
        assert_eq!(
            md("usr").uid(),
            BASE,
            "implicit parents belong to root inside"
        );
        assert_eq!(
            (md("home/u/file").uid(), md("home/u/file").gid()),
            (BASE + 1000, BASE + 1000)
        );
        assert_eq!(
            std::fs::read_link(r.join("bin")).unwrap(),
            Path::new("/usr/bin")
        );
        assert_eq!(md("bin").uid(), BASE);
        assert_eq!(md("etc/hn").ino(), md("etc/hostname").ino());
        assert!(md("run/fifo").file_type().is_fifo_like());
        assert!(s.sentinel_untouched());
    }

    trait FifoLike {
        fn is_fifo_like(&self) -> bool;
    }
    impl FifoLike for std::fs::FileType {
        fn is_fifo_like(&self) -> bool {
            std::os::unix::fs::FileTypeExt::is_fifo(self)
        }
    }

    /// Each unsafe layer is refused (naming the entry), leaves no root filesystem and nothing
    /// outside it.
    #[test]
    fn unsafe_layers_are_refused() {
        if !root() {
            return;
        }
        let probe = Scene::new();
        let sentinel = probe.dir.join("sentinel");
        let abs = sentinel.display().to_string();
        let cases: Vec<(&str, Vec<M>, &str)> = vec![
            ("dotdot", vec![f("../x", "x")], "`..`"),
            (
                "nested dotdot",
                vec![M::Dir("a/"), f("a/../../x", "x")],
                "`..`",
            ),
            ("absolute", vec![f("/etc/x", "x")], "absolute"),
            (
                "through a symlink to /",
                vec![M::Sym("a".into(), "/".into()), f("a/etc/passwd", "x")],
                "symbolic link",
            ),
            (
                "through a symlink to the sentinel",
                vec![M::Sym("a".into(), abs.clone()), f("a/evil", "x")],
                "symbolic link",
            ),
            (
                "a .. chain",
                vec![
                    M::Dir("d/"),
                    M::Sym("d/up".into(), "..".into()),
                    M::Sym("d/up2".into(), "up/..".into()),
                    f("d/up2/sentinel/evil", "x"),
                ],
                "symbolic link",
            ),
            (
                "whiteout through a symlink",
                vec![M::Sym("a".into(), abs.clone()), f("a/.wh.keep", "")],
                "symbolic link",
            ),
            (
                "opaque marker through a symlink",
                vec![M::Sym("a".into(), abs.clone()), f("a/.wh..wh..opq", "")],
                "symbolic link",
            ),
            (
                "hard link to /etc/shadow",
                vec![M::Link("shadow".into(), "/etc/shadow".into())],
                "absolute",
            ),
            (
                "hard link up",
                vec![M::Link("keep".into(), "../sentinel/keep".into())],
                "`..`",
            ),
            (
                "hard link through a symlink",
                vec![
                    M::Sym("s".into(), abs.clone()),
                    M::Link("keep".into(), "s/keep".into()),
                ],
                "symbolic link",
            ),
            (
                "char device",
                vec![M::Node("dev/mem", tar::EntryType::Char)],
                "device",
            ),
            (
                "block device",
                vec![M::Node("dev/sda", tar::EntryType::Block)],
                "device",
            ),
            (
                "owner outside the range",
                vec![M::Owned("x", u64::from(UID_RANGE), 0o4755)],
                "outside",
            ),
            (
                "parent is a file",
                vec![f("a", "x"), f("a/b", "y")],
                "not a directory",
            ),
        ];
        for (what, members, why) in cases {
            let s = Scene::new();
            // The symlink-to-sentinel cases point at this scene's own sentinel.
            let abs_s = s.dir.join("sentinel").display().to_string();
            let members: Vec<M> = members
                .into_iter()
                .map(|m| match m {
                    M::Sym(n, t) if t == abs => M::Sym(n, abs_s.clone()),
                    m => m,
                })
                .collect();
            let l = s.layers(&[tar_of(&members)]);
            match unpack(&l, &s.root(), BASE) {
                Err(UnpackError::Refused {
                    why: w,
                    entry,
                    layer,
                }) => {
                    assert!(w.contains(why), "{what}: {w:?} lacks {why:?}");
                    assert_eq!(layer, "l0");
                    assert!(!entry.is_empty());
                    eprintln!("{what}: refused: {entry}: {w}");
                }
                r => panic!("{what}: {r:?}"),
            }
            assert!(!s.root().exists(), "{what}: the partial root was removed");
            assert!(s.sentinel_untouched(), "{what}: sentinel changed");
            assert!(s.strays().is_empty(), "{what}: {:?}", s.strays());
        }
    }

    #[test]
    fn whiteouts_and_opaque_directories_apply_across_layers() {
        if !root() {
            return;
        }
        let s = Scene::new();
        let l = s.layers(&[
            tar_of(&[
                f("a/keep", "1"),
                f("a/gone", "2"),
                M::Dir("b/"),
                f("b/sub/deep", "3"),
                f("c/old", "4"),
                M::Sym("link".into(), "/".into()),
            ]),
            tar_of(&[
                f("a/.wh.gone", ""),
                f("b/.wh.sub", ""),
                M::Dir("c/"),
                f("c/new", "5"),
                f("c/implicit/file", "6"),
                f("c/.wh..wh..opq", ""),
                f(".wh.link", ""),
                f("a/.wh..wh.plnk", ""),
                f("missing/dir/.wh.x", ""),
            ]),
        ]);
        let st = unpack(&l, &s.root(), BASE).unwrap();
        assert_eq!(st.layers, 2);
        assert_eq!(st.whiteouts, 5);
        let r = s.root();
        assert!(r.join("a/keep").exists());
        assert!(!r.join("a/gone").exists());
        assert!(!r.join("a/.wh.gone").exists());
        assert!(r.join("b").is_dir() && !r.join("b/sub").exists());
        assert!(
            !r.join("c/old").exists(),
            "opaque: the lower layer's file is gone"
        );
        assert_eq!(
            std::fs::read(r.join("c/new")).unwrap(),
            b"5",
            "the layer's own stays"
        );
        assert_eq!(std::fs::read(r.join("c/implicit/file")).unwrap(), b"6");
        assert!(std::fs::symlink_metadata(r.join("link")).is_err());
        assert!(s.sentinel_untouched());
    }

    #[test]
    fn a_later_layer_replaces_a_symlink_instead_of_writing_through_it() {
        if !root() {
            return;
        }
        let s = Scene::new();
        let abs = s.dir.join("sentinel/keep").display().to_string();
        let l = s.layers(&[
            tar_of(&[M::Sym("x".into(), abs)]),
            tar_of(&[f("x", "mine")]),
        ]);
        unpack(&l, &s.root(), BASE).unwrap();
        assert_eq!(std::fs::read(s.root().join("x")).unwrap(), b"mine");
        assert!(s.sentinel_untouched());
    }

    #[test]
    fn pax_global_headers_are_skipped() {
        if !root() {
            return;
        }
        let mut b = tar::Builder::new(Vec::new());
        let body = b"52 comment=4b0e1a4ef5d2c0aa6e7fb3bf2c1fa4d5a7b6c5d4e3\n";
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XGlobalHeader);
        h.set_path("pax_global_header").unwrap();
        h.set_size(body.len() as u64);
        h.set_cksum();
        b.append(&h, &body[..]).unwrap();
        let mut t = b.into_inner().unwrap();
        t.truncate(t.len() - 1024); // drop the end marker, then add a file
        t.extend(tar_of(&[f("x", "1")]));
        let s = Scene::new();
        let l = s.layers(&[t]);
        let st = unpack(&l, &s.root(), BASE).unwrap();
        assert_eq!(st.entries, 1);
        assert!(!s.root().join("pax_global_header").exists());
        assert_eq!(std::fs::read(s.root().join("x")).unwrap(), b"1");
    }

    #[test]
    fn existing_target_and_bad_tar() {
        if !root() {
            return;
        }
        let s = Scene::new();
        std::fs::create_dir(s.root()).unwrap();
        assert!(matches!(
            unpack(&[], &s.root(), BASE),
            Err(UnpackError::Exists(_))
        ));
        std::fs::remove_dir(s.root()).unwrap();
        let mut t = tar_of(&[f("a", "hello")]);
        t[100] ^= 0x55; // break the header checksum
        let l = s.layers(&[t]);
        assert!(matches!(
            unpack(&l, &s.root(), BASE),
            Err(UnpackError::BadTar { .. })
        ));
        assert!(!s.root().exists());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = String> {
            let part = prop_oneof![
                Just("a".to_string()),
                Just("b".to_string()),
                Just("..".to_string()),
                Just(".".to_string()),
                Just("".to_string()),
                Just(".wh.a".to_string()),
                Just(".wh..wh..opq".to_string()),
                Just("sentinel".to_string()),
            ];
            (any::<bool>(), proptest::collection::vec(part, 1..4))
                .prop_map(|(abs, p)| format!("{}{}", if abs { "/" } else { "" }, p.join("/")))
        }

        fn member(abs: String) -> impl Strategy<Value = M> {
            let target = prop_oneof![
                name(),
                Just(abs),
                Just("/".to_string()),
                Just("..".to_string()),
                Just("../..".to_string()),
            ];
            prop_oneof![
                name().prop_map(|n| M::File(n, b"data".to_vec())),
                (name(), target.clone()).prop_map(|(n, t)| M::Sym(n, t)),
                (name(), target).prop_map(|(n, t)| M::Link(n, t)),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            /// Any layer either unpacks with everything under the root or is refused; nothing
            /// outside the root is ever created or changed.
            #[test]
            fn never_writes_outside(seed in proptest::collection::vec(
                member("SENTINEL".into()), 1..8)) {
                if !root() {
                    return Ok(());
                }
                let s = Scene::new();
                let abs = s.dir.join("sentinel").display().to_string();
                let members: Vec<M> = seed
                    .into_iter()
                    .map(|m| match m {
                        M::Sym(n, t) if t == "SENTINEL" => M::Sym(n, abs.clone()),
                        M::Link(n, t) if t == "SENTINEL" => M::Link(n, abs.clone()),
                        m => m,
                    })
                    .filter(|m| match m {
                        M::File(n, _) | M::Sym(n, _) | M::Link(n, _) => n.len() < 100,
                        _ => true,
                    })
                    .collect();
                let l = s.layers(&[tar_of(&members)]);
                let r = unpack(&l, &s.root(), BASE);
                prop_assert!(s.sentinel_untouched());
                prop_assert!(s.strays().is_empty());
                match r {
                    Ok(_) => prop_assert!(s.root().is_dir()),
                    Err(_) => prop_assert!(!s.root().exists()),
                }
            }
        }
    }
}
