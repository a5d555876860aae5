//! Fuzz target: what `docker load` and `docker import` parse from an upload before anything is
//! stored: the `docker save` archive's index, `manifest.json` and configs
//! (`archive::parse_saved`), the whole `archive::load` into a scratch layer store, and one layer
//! tar's member checks (`archive::scan_layer`). Nothing panics; a bad archive is a 400, never a
//! 500, and a refused archive leaves no blob behind.
#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use fabric::docker::archive;
use fabric::docker::layers::LayerStore;
use libfuzzer_sys::fuzz_target;

fn store() -> &'static LayerStore {
    static S: OnceLock<LayerStore> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fabric-fuzz-images-{}", std::process::id()));
        LayerStore::open(&dir)
            .expect("a layer store for the fuzzer")
            .with_max_blob(1 << 20)
    })
}

fn blobs(s: &LayerStore) -> usize {
    std::fs::read_dir(s.root().join("sha256")).map_or(0, |d| d.count())
}

fuzz_target!(|data: &[u8]| {
    let _ = archive::parse_saved(&mut Cursor::new(data));
    let s = store();
    let before = blobs(s);
    match archive::load(s, Cursor::new(data)) {
        Ok(images) => {
            for img in images {
                for l in &img.layers {
                    assert!(s.has(&l.digest), "a loaded layer must be stored");
                }
            }
        }
        Err(e) => {
            assert_eq!(e.status(), 400, "a bad archive must be the uploader's error, not {e}");
            assert_eq!(blobs(s), before, "a refused archive must store nothing");
        }
    }
    if let Err(e) = archive::import(s, data, &archive::ImportOpts::default()) {
        assert_eq!(e.status(), 400, "a bad layer must be the uploader's error, not {e}");
    }
    let _ = archive::scan_layer(data);
});
