//! Images end to end below the HTTP layer, with real parts: a root filesystem made of Debian's
//! busybox-static packed by GNU tar and gzip, a `docker save`-layout archive packed by GNU tar,
//! the layer store on disk and the image tables in a real SQLite file (reopened to check they
//! persist): import, load, list, inspect, tag, rmi across two accounts, layer refcounts and
//! removal of unreferenced blobs. The fuzz seeds (made by Python's tarfile) must load too.

use std::path::Path;
use std::process::Command;

use fabric::control::db::Db;
use fabric::docker::archive::{self, ImportOpts};
use fabric::docker::images::{self, Filters, ImageError};
use fabric::docker::layers::{sha256_digest, LayerStore};
use portolan::store::{self, Store};
use serde_json::{json, Value};

#[path = "util/temp_db.rs"]
mod temp_db;
#[path = "util/temp_dir.rs"]
mod temp_dir;

const ALICE: &str = "a11ce000-0000-4000-8000-000000000001";
const BOB: &str = "b0b00000-0000-4000-8000-000000000002";

fn run<R>(
    s: &dyn Store,
    f: impl FnOnce(&mut Db<'_>) -> Result<R, ImageError>,
) -> Result<R, ImageError> {
    store::with_txn(s, |tx| f(&mut Db::from(tx.raw())))
}

/// `tar -C DIR -cf OUT .` (GNU tar: a real packer, not ours).
fn tar_dir(dir: &std::path::Path, out: &std::path::Path) {
    sh(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg("."));
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("run a packing tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A busybox root filesystem (the real static binary, applet symlinks, a hard link).
fn busybox_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    for applet in ["sh", "ls", "echo", "cat"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    std::fs::hard_link(dir.join("bin/busybox"), dir.join("bin/bb")).unwrap();
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
}

fn blob_count(data: &Path) -> usize {
    std::fs::read_dir(data.join("images/sha256"))
        .unwrap()
        .count()
}

#[test]
fn import_load_list_rmi_with_real_tars_and_a_sqlite_file() {
    if !Path::new("/bin/busybox").exists() {
        eprintln!("skipped: /bin/busybox (busybox-static) is not installed");
        return;
    }
    let tmp = temp_dir::TempDir::new("docker-images");
    let db = temp_db::TempDb::new("docker-images");
    let data = tmp.0.join("data");
    let blobs = LayerStore::open(&data).unwrap();
    let s = store::open(&db.url()).unwrap();
    run(&*s, images::create_schema).unwrap();

    // docker import busybox.tar.gz busybox:latest --change 'CMD ["sh"]'
    let root = tmp.0.join("rootfs");
    busybox_rootfs(&root);
    let layer_tar = tmp.0.join("layer.tar");
    tar_dir(&root, &layer_tar);
    sh(Command::new("gzip").arg("-k").arg(&layer_tar));
    let layer = std::fs::read(&layer_tar).unwrap();
    let gz = std::fs::File::open(tmp.0.join("layer.tar.gz")).unwrap();
    let repo_tag = images::import_reference("busybox", "").unwrap();
    let imported = archive::import(
        &blobs,
        gz,
        &ImportOpts {
            changes: vec![r#"CMD ["sh"]"#.into(), "ENV PATH=/bin".into()],
            message: None,
            repo_tag,
        },
    )
    .unwrap();
    assert_eq!(imported.layers[0].digest, sha256_digest(&layer));
    assert_eq!(
        std::fs::read(blobs.path(&imported.layers[0].digest).unwrap()).unwrap(),
        layer,
        "the stored layer is the uncompressed tar"
    );
    let busybox_size = std::fs::metadata("/bin/busybox").unwrap().len();
    assert!(
        imported.size >= busybox_size,
        "{} < {busybox_size}",
        imported.size
    );
    run(&*s, |db| images::insert(db, ALICE, &imported, Some(&blobs))).unwrap();

    // docker load of a save archive holding the same layer under another tag.
    let save = tmp.0.join("save");
    let layer_dir = &sha256_digest(b"layer dir")[7..];
    std::fs::create_dir_all(save.join(layer_dir)).unwrap();
    std::fs::copy(&layer_tar, save.join(layer_dir).join("layer.tar")).unwrap();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "created": "2024-05-06T07:08:09.5Z",
        "config": {"Cmd": ["sh"], "Labels": {"from": "save"}},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&layer)]},
        "history": [{"created": "2024-05-06T07:08:09.5Z"}],
    }))
    .unwrap();
    let config_name = format!("{}.json", &sha256_digest(&config)[7..]);
    std::fs::write(save.join(&config_name), &config).unwrap();
    std::fs::write(
        save.join("manifest.json"),
        serde_json::to_vec(&json!([{
            "Config": config_name,
            "RepoTags": ["docker.io/library/saved:1.0"],
            "Layers": [format!("{layer_dir}/layer.tar")],
        }]))
        .unwrap(),
    )
    .unwrap();
    let save_tar = tmp.0.join("save.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&save)
        .arg("-cf")
        .arg(&save_tar)
        .arg("manifest.json")
        .arg(&config_name)
        .arg(layer_dir));
    let loaded = archive::load(&blobs, std::fs::File::open(&save_tar).unwrap()).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].id, sha256_digest(&config));
    assert_eq!(loaded[0].repo_tags, ["saved:1.0"]);
    assert_eq!(loaded[0].layers, imported.layers, "same layer, same blob");
    assert_eq!(blob_count(&data), 1);
    for who in [ALICE, BOB] {
        run(&*s, |db| images::insert(db, who, &loaded[0], Some(&blobs))).unwrap();
    }

    // The store persists: reopen the SQLite file.
    drop(s);
    let s = store::open(&db.url()).unwrap();

    let list = run(&*s, |db| images::list(db, ALICE, false, &Filters::new())).unwrap();
    let tags: Vec<Value> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["RepoTags"].clone())
        .collect();
    // Newest first: the import (now) before the 2024 save.
    assert_eq!(tags, [json!(["busybox:latest"]), json!(["saved:1.0"])]);
    assert_eq!(list[1]["Created"], 1_714_979_289);
    let bob = run(&*s, |db| images::list(db, BOB, false, &Filters::new())).unwrap();
    assert_eq!(bob.as_array().unwrap().len(), 1);
    let e = run(&*s, |db| images::inspect(db, BOB, "busybox")).unwrap_err();
    assert_eq!(
        (e.status(), e.to_string()),
        (404, "No such image: busybox:latest".into())
    );

    let i = run(&*s, |db| images::inspect(db, ALICE, "busybox")).unwrap();
    assert_eq!(i["Config"]["Cmd"], json!(["sh"]));
    assert_eq!(i["Config"]["Env"], json!(["PATH=/bin"]));
    assert_eq!(i["RootFS"]["Layers"], json!([imported.layers[0].digest]));
    let by_prefix = &loaded[0].id[7..19];
    let i = run(&*s, |db| images::inspect(db, ALICE, by_prefix)).unwrap();
    assert_eq!(i["Config"]["Labels"], json!({"from": "save"}));

    // docker tag + docker rmi.
    run(&*s, |db| images::tag(db, ALICE, "saved:1.0", "mine", "x")).unwrap();
    let r = run(&*s, |db| images::remove(db, ALICE, "mine:x", false)).unwrap();
    assert_eq!(r.items, vec![json!({"Untagged": "mine:x"})]);
    // Alice removes both images; Bob still uses the layer, so it stays on disk.
    for name in ["busybox", "saved:1.0"] {
        let r = run(&*s, |db| images::remove(db, ALICE, name, false)).unwrap();
        assert!(r.unreferenced.is_empty(), "{name}: {:?}", r.unreferenced);
    }
    assert_eq!(run(&*s, |db| images::count_images(db, ALICE)).unwrap(), 0);
    assert_eq!(blob_count(&data), 1);
    let r = run(&*s, |db| images::remove(db, BOB, &loaded[0].id, false)).unwrap();
    assert_eq!(r.unreferenced, [imported.layers[0].digest.clone()]);
    let gone = run(&*s, |db| images::gc_layers(db, &blobs, &r.unreferenced)).unwrap();
    assert_eq!(gone, r.unreferenced);
    assert_eq!(blob_count(&data), 0);
    assert_eq!(
        std::fs::read_dir(data.join("images/tmp")).unwrap().count(),
        0
    );
}

#[test]
fn a_tampered_save_archive_stores_nothing() {
    let tmp = temp_dir::TempDir::new("docker-images");
    let root = tmp.0.join("rootfs");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "a\n").unwrap();
    let layer_tar = tmp.0.join("layer.tar");
    tar_dir(&root, &layer_tar);
    let layer = std::fs::read(&layer_tar).unwrap();
    // The config promises other content than the layer holds.
    let save = tmp.0.join("save");
    std::fs::create_dir_all(save.join("l")).unwrap();
    std::fs::write(root.join("etc/hostname"), "b\n").unwrap();
    tar_dir(&root, &save.join("l/layer.tar"));
    let config = serde_json::to_vec(&json!({
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&layer)]}
    }))
    .unwrap();
    std::fs::write(save.join("c.json"), &config).unwrap();
    std::fs::write(
        save.join("manifest.json"),
        br#"[{"Config":"c.json","RepoTags":["t:1"],"Layers":["l/layer.tar"]}]"#,
    )
    .unwrap();
    let save_tar = tmp.0.join("save.tar");
    tar_dir(&save, &save_tar);
    let data = tmp.0.join("data");
    let blobs = LayerStore::open(&data).unwrap();
    let e = archive::load(&blobs, std::fs::File::open(&save_tar).unwrap()).unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(
        e.to_string()
            .starts_with("layer \"l/layer.tar\": its content's digest sha256:"),
        "{e}"
    );
    assert_eq!(blob_count(&data), 0);
    assert_eq!(
        std::fs::read_dir(data.join("images/tmp")).unwrap().count(),
        0
    );
}

#[test]
fn the_fuzz_seeds_are_valid_images() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/docker_archive");
    let tmp = temp_dir::TempDir::new("docker-images");
    let blobs = LayerStore::open(&tmp.0).unwrap();
    let (mut saves, mut layers) = (0, 0);
    for e in std::fs::read_dir(&seeds).unwrap() {
        let p = e.unwrap().path();
        match archive::load(&blobs, std::fs::File::open(&p).unwrap()) {
            Ok(imgs) => {
                assert!(!imgs.is_empty());
                saves += 1;
            }
            Err(_) => {
                let img = archive::import(
                    &blobs,
                    std::fs::File::open(&p).unwrap(),
                    &ImportOpts::default(),
                )
                .unwrap_or_else(|e| {
                    panic!("{}: neither a save archive nor a layer: {e}", p.display())
                });
                assert_eq!(img.layers.len(), 1);
                layers += 1;
            }
        }
    }
    assert_eq!(
        (saves, layers),
        (2, 2),
        "a moby 20.10 and an OCI save, a plain and a gzip layer"
    );
}
