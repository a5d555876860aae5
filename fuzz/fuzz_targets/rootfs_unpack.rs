//! Fuzz target: a host's unpack of an image layer into a container's root filesystem
//! (`agent::runtime::rootfs::unpack`). Whatever the bytes, it never panics, either makes the
//! root filesystem or leaves none, and never writes outside it: a sentinel directory beside
//! the root (the target of any `..` or absolute path or link the input may name) stays as it
//! was, and nothing else appears beside the root.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fabric::agent::runtime::rootfs::unpack;
use fabric::control::container_spec::UID_BASE_START;
use libfuzzer_sys::fuzz_target;

/// `$TMP/fabric-fuzz-rootfs-PID/` with `sentinel/keep`.
fn scratch() -> &'static Path {
    static S: OnceLock<PathBuf> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fabric-fuzz-rootfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sentinel")).expect("a scratch directory");
        std::fs::write(dir.join("sentinel/keep"), b"keep").expect("the sentinel");
        dir
    })
}

fn names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let layer = dir.join("layer");
    std::fs::write(&layer, data).expect("write the layer");
    let root = dir.join("root");
    let r = unpack(&[layer], &root, UID_BASE_START);
    match r {
        Ok(_) => assert!(root.is_dir(), "an unpack that succeeded made its root"),
        Err(_) => assert!(
            std::fs::symlink_metadata(&root).is_err(),
            "a failed unpack leaves no root behind"
        ),
    }
    assert_eq!(names(&dir.join("sentinel")), ["keep"], "nothing written beside the root");
    assert_eq!(std::fs::read(dir.join("sentinel/keep")).expect("the sentinel"), b"keep");
    let _ = std::fs::remove_dir_all(&root);
    assert_eq!(names(dir), ["layer", "sentinel"], "nothing made outside the root");
});
