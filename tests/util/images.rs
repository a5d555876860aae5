//! Test images made in the test, without a registry or network: a busybox root filesystem tar
//! (the input of `docker import`) from Debian's busybox-static, and a `docker save` archive of
//! it in docker 20.10's layout (the input of `docker load`). Everything is deterministic (fixed
//! mtimes, owners and order), so the digests are the same on every run and machine with the
//! same busybox.
//!
//! Include it as `#[path = "util/images.rs"] mod images;` (uses `ring` and `serde_json`).

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

/// The mtime of every entry (2024-01-01T00:00:00Z): the digests do not change between runs.
pub const MTIME: u64 = 1_704_067_200;
/// `created` of the configs written here, the same instant as [`MTIME`].
pub const CREATED: &str = "2024-01-01T00:00:00Z";

/// A minimal ustar writer: directories, regular files and symlinks, owner root, fixed mtime.
/// Names up to 100 bytes (or 255 split at a `/` into prefix and name).
pub struct TarWriter<W: Write> {
    w: W,
}

impl<W: Write> TarWriter<W> {
    /// Writes entries to `w`.
    pub fn new(w: W) -> Self {
        TarWriter { w }
    }

    fn header(&mut self, name: &str, mode: u32, size: u64, kind: u8, link: &str) {
        let mut h = [0u8; 512];
        let (prefix, name) = if name.len() <= 100 {
            ("", name)
        } else {
            let cut = name[..name.len().min(156)]
                .rfind('/')
                .filter(|&i| name.len() - i - 1 <= 100)
                .unwrap_or_else(|| panic!("tar name too long for ustar: {name}"));
            (&name[..cut], &name[cut + 1..])
        };
        assert!(link.len() <= 100, "tar link target too long: {link}");
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
            let s = format!("{v:0w$o}", w = len - 1);
            assert!(s.len() < len, "tar field overflow: {v}");
            h[at..at + s.len()].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, u64::from(mode));
        octal(&mut h, 108, 8, 0); // uid
        octal(&mut h, 116, 8, 0); // gid
        octal(&mut h, 124, 12, size);
        octal(&mut h, 136, 12, MTIME);
        h[148..156].copy_from_slice(b"        ");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        octal(&mut h, 329, 8, 0); // devmajor
        octal(&mut h, 337, 8, 0); // devminor
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        self.w.write_all(&h).expect("write tar header");
    }

    /// A directory (`name` without a trailing slash; one is added).
    pub fn dir(&mut self, name: &str, mode: u32) {
        self.header(
            &format!("{}/", name.trim_end_matches('/')),
            mode,
            0,
            b'5',
            "",
        );
    }

    /// A regular file with `data`.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.header(name, mode, data.len() as u64, b'0', "");
        self.w.write_all(data).expect("write tar data");
        let pad = (512 - data.len() % 512) % 512;
        self.w.write_all(&[0u8; 512][..pad]).expect("write tar pad");
    }

    /// A symbolic link `name` -> `target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.header(name, 0o777, 0, b'2', target);
    }

    /// Writes the two zero blocks that end an archive and returns the writer.
    pub fn finish(mut self) -> W {
        self.w.write_all(&[0u8; 1024]).expect("write tar end");
        self.w
    }
}

/// The static busybox: `$FABRIC_BUSYBOX`, else `/bin/busybox` (Debian's busybox-static).
pub fn busybox() -> PathBuf {
    std::env::var_os("FABRIC_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"))
}

/// The applets of [`busybox`] (`busybox --list`), sorted, without `busybox` itself.
pub fn busybox_applets() -> Vec<String> {
    let out = std::process::Command::new(busybox())
        .arg("--list")
        .output()
        .unwrap_or_else(|e| panic!("run {} --list: {e}", busybox().display()));
    assert!(
        out.status.success(),
        "busybox --list failed: {}",
        out.status
    );
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_owned)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The bytes of a busybox root filesystem tar: `bin/busybox` and `bin/<applet> -> busybox` for
/// every applet, `etc/{passwd,group,hostname}`, `tmp` (1777), `root`, empty `proc`, `sys`,
/// `dev`. Uncompressed, entries in a fixed order.
pub fn busybox_rootfs() -> Vec<u8> {
    let bb = std::fs::read(busybox())
        .unwrap_or_else(|e| panic!("read {}: {e} (install busybox-static)", busybox().display()));
    let mut t = TarWriter::new(Vec::with_capacity(bb.len() + 512 * 600));
    t.dir("bin", 0o755);
    t.file("bin/busybox", 0o755, &bb);
    for a in busybox_applets() {
        t.symlink(&format!("bin/{a}"), "busybox");
    }
    t.dir("dev", 0o755);
    t.dir("etc", 0o755);
    t.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n");
    t.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    );
    t.dir("proc", 0o555);
    t.dir("root", 0o700);
    t.dir("sys", 0o555);
    t.dir("tmp", 0o1777);
    t.finish()
}

/// Writes [`busybox_rootfs`] to `path`.
pub fn busybox_rootfs_tar(path: &Path) {
    std::fs::write(path, busybox_rootfs())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What [`save_archive`] wrote: the identities a daemon must report after `docker load`.
#[derive(Debug, Clone)]
pub struct SavedImage {
    /// The image ID, `sha256:<hex of the config bytes>`.
    pub id: String,
    /// The exact config JSON bytes (`<hex>.json` in the archive).
    pub config: Vec<u8>,
    /// `sha256:<hex of layer.tar>`, the config's only `rootfs.diff_ids` entry.
    pub diff_id: String,
    /// The v1 layer directory name (64 hex).
    pub layer_id: String,
    /// `repo:tag` as written in `manifest.json` (`:latest` added when missing).
    pub repo_tag: String,
}

/// Splits `repo[:tag]` (a `:` after the last `/`) into repository and tag, `latest` default.
pub fn split_repo_tag(s: &str) -> (String, String) {
    let slash = s.rfind('/').map_or(0, |i| i + 1);
    match s[slash..].rfind(':') {
        Some(i) => (s[..slash + i].to_owned(), s[slash + i + 1..].to_owned()),
        None => (s.to_owned(), "latest".to_owned()),
    }
}

/// The config of a one-layer image with `diff_id`: amd64/linux, `Cmd ["sh"]`, the PATH
/// docker gives, fixed `created`. Serialised compactly, keys sorted (serde_json's map order).
pub fn image_config(diff_id: &str) -> Vec<u8> {
    let cfg = serde_json::json!({
        "architecture": "amd64",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
        },
        "created": CREATED,
        "history": [{"created": CREATED, "created_by": "fabric tests: busybox rootfs"}],
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    serde_json::to_vec(&cfg).expect("serialise config")
}

/// The bytes of a `docker save` archive (docker 20.10's layout) of the one-layer image whose
/// layer is `layer_tar`, tagged `repo_tag`:
/// `<layerid>/{VERSION,json,layer.tar}`, `<config hex>.json`, `manifest.json`, `repositories`.
pub fn save_archive_bytes(layer_tar: &[u8], repo_tag: &str) -> (Vec<u8>, SavedImage) {
    let diff_id = format!("sha256:{}", sha256_hex(layer_tar));
    let config = image_config(&diff_id);
    let config_hex = sha256_hex(&config);
    // The v1 ID docker derives is a digest over the v1 JSON; any stable 64-hex name loads.
    let layer_id = sha256_hex(format!("fabric-v1-layer {diff_id}").as_bytes());
    let (repo, tag) = split_repo_tag(repo_tag);
    let repo_tag = format!("{repo}:{tag}");
    let v1 = serde_json::json!({
        "id": layer_id,
        "created": CREATED,
        "container_config": {"Cmd": null},
        "config": {"Cmd": ["sh"]},
        "architecture": "amd64",
        "os": "linux",
    });
    let manifest = serde_json::json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": [repo_tag],
        "Layers": [format!("{layer_id}/layer.tar")],
    }]);
    let repositories = serde_json::json!({ repo: { tag: layer_id } });
    let mut t = TarWriter::new(Vec::with_capacity(layer_tar.len() + 8192));
    t.file(&format!("{config_hex}.json"), 0o644, &config);
    t.dir(&layer_id, 0o755);
    t.file(&format!("{layer_id}/VERSION"), 0o644, b"1.0");
    t.file(
        &format!("{layer_id}/json"),
        0o644,
        &serde_json::to_vec(&v1).expect("v1 json"),
    );
    t.file(&format!("{layer_id}/layer.tar"), 0o644, layer_tar);
    t.file(
        "manifest.json",
        0o644,
        &serde_json::to_vec(&manifest).expect("manifest"),
    );
    t.file(
        "repositories",
        0o644,
        &serde_json::to_vec(&repositories).expect("repositories"),
    );
    let saved = SavedImage {
        id: format!("sha256:{config_hex}"),
        config,
        diff_id,
        layer_id,
        repo_tag,
    };
    (t.finish(), saved)
}

/// Writes a `docker save` archive of the layer in the file `rootfs_tar`, tagged `repo_tag`, to
/// `path` (see [`save_archive_bytes`]).
pub fn save_archive(rootfs_tar: &Path, repo_tag: &str, path: &Path) -> SavedImage {
    let layer =
        std::fs::read(rootfs_tar).unwrap_or_else(|e| panic!("read {}: {e}", rootfs_tar.display()));
    let (bytes, saved) = save_archive_bytes(&layer, repo_tag);
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    saved
}
