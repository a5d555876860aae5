//! Images through the Docker API with the real clients: the stock docker CLI (`import`, `load`,
//! `images`, `image inspect`, `tag`, `rmi`, `pull`) and docker-py, over TLS with `fabric account
//! add` certificates; two accounts never see each other's images.

#[path = "util/docker_cli.rs"]
mod docker_cli;
#[path = "util/docker_head.rs"]
mod docker_head;
#[path = "util/images.rs"]
mod images;
#[path = "util/temp_dir.rs"]
mod temp_dir;

use docker_cli::{docker_py, DockerClient};
use docker_head::DockerHead;

#[test]
fn import_load_list_tag_remove_per_account() {
    let head = DockerHead::start();
    let alice = DockerClient::new(&head.docker_host(), &head.account("alice"), None);
    let bob = DockerClient::new(&head.docker_host(), &head.account("bob"), None);
    let work = temp_dir::TempDir::new("image-cli");
    let rootfs = work.0.join("rootfs.tar");
    images::busybox_rootfs_tar(&rootfs);
    let rootfs = rootfs.to_str().unwrap();

    // docker import FILE NAME, with a Dockerfile change.
    let out = alice.run(&[
        "import",
        "--change",
        "CMD [\"sh\"]",
        "--message",
        "from the test",
        rootfs,
        "bb:1",
    ]);
    let id = out.ok("docker import").trim().to_string();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
    // From stdin too (`docker import - NAME`), gzip-compressed.
    let gz = std::process::Command::new("gzip")
        .args(["-c", rootfs])
        .output()
        .expect("gzip");
    let out = alice.run_stdin(&["import", "-", "bb:gz"], &gz.stdout);
    out.ok("docker import - (gzip)");
    let out = alice.run(&["images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"]);
    let listed = out.ok("docker images");
    assert!(listed.contains(&format!("bb:1 {}", &id[7..19])), "{listed}");
    assert!(listed.contains("bb:gz "), "{listed}");
    let out = alice.run(&[
        "image",
        "inspect",
        "--format",
        "{{.Os}} {{.Architecture}} {{json .Config.Cmd}} {{.Comment}} {{len .RootFS.Layers}}",
        "bb:1",
    ]);
    assert_eq!(
        out.ok("image inspect").trim(),
        "linux amd64 [\"sh\"] from the test 1"
    );

    // The other account sees none of it: the same names are "No such image".
    let out = bob.run(&["images", "-q"]);
    assert_eq!(out.ok("bob: docker images"), "");
    let out = bob.run(&["image", "inspect", "bb:1"]);
    assert_eq!(out.code, 1, "{}", out.summary());
    assert!(
        out.stderr.contains("No such image: bb:1"),
        "{}",
        out.summary()
    );
    let out = bob.run(&["rmi", &id]);
    assert!(out.stderr.contains("No such image"), "{}", out.summary());

    // docker load of a `docker save` archive.
    let saved = work.0.join("saved.tar");
    images::save_archive(std::path::Path::new(rootfs), "busybox", &saved);
    let out = bob.run(&["load", "-i", saved.to_str().unwrap()]);
    assert_eq!(out.ok("docker load").trim(), "Loaded image: busybox:latest");
    let out = bob.run(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert_eq!(out.ok("bob: images").trim(), "busybox:latest");

    // tag, rmi of a tag, rmi of the last tag deletes.
    alice.run(&["tag", "bb:1", "bb:2"]).ok("docker tag");
    let out = alice.run(&["rmi", "bb:2"]);
    assert_eq!(out.ok("rmi bb:2").trim(), "Untagged: bb:2");
    let out = alice.run(&["rmi", "bb:1"]);
    let printed = out.ok("rmi bb:1");
    assert!(
        printed.starts_with("Untagged: bb:1\nDeleted: sha256:"),
        "{printed}"
    );
    let out = alice.run(&["rmi", "nosuch"]);
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr.trim(),
        "Error response from daemon: No such image: nosuch:latest"
    );

    // No registry: pull says what to do instead, and `docker run` of a missing image too.
    let out = alice.run(&["pull", "busybox"]);
    assert_eq!(out.code, 1, "{}", out.summary());
    assert!(
        out.stderr.contains("fabric has no registry") && out.stderr.contains("docker load"),
        "{}",
        out.summary()
    );

    // No server is registered here: `docker run` of an image the account has cannot place
    // the container and says so (a 409, never a 404 that would send the CLI pulling), and
    // `docker ps` lists none.
    let out = alice.run(&["run", "--rm", "bb:gz", "true"]);
    assert_eq!(out.code, 125, "{}", out.summary());
    assert!(
        out.stderr.contains("cannot place the VM") && !out.stderr.contains("Unable to find image"),
        "{}",
        out.summary()
    );
    let out = alice.run(&["ps", "-a", "-q"]);
    assert_eq!(out.ok("docker ps"), "");

    // A bad upload is a clear 400 and leaves no image.
    let out = alice.run_stdin(
        &["import", "-", "junk:1"],
        b"this is not a tar archive at all",
    );
    assert_eq!(out.code, 1, "{}", out.summary());
    assert!(
        out.stderr.starts_with("Error response from daemon: "),
        "{}",
        out.summary()
    );
    let out = alice.run(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert_eq!(out.ok("images").trim(), "bb:gz");

    // The head counts what it answered and every upload's outcome.
    let metrics = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut c = fabric::control::client::HttpClient::unix(head.path("control.sock"));
            c.request("GET", "/metrics", None, b"").await.unwrap()
        });
    let text = String::from_utf8_lossy(&metrics.body);
    for line in [
        "fabric_docker_uploads_total{kind=\"import\",outcome=\"ok\"} 2",
        "fabric_docker_uploads_total{kind=\"import\",outcome=\"refused\"} 1",
        "fabric_docker_uploads_total{kind=\"load\",outcome=\"ok\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "/metrics lacks {line}:\n{text}"
        );
    }
    let client_errors: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fabric_docker_requests_total{class=\"client_error\"} "))
        .and_then(|v| v.parse().ok())
        .expect("a client_error counter");
    assert!(client_errors >= 5, "{client_errors} 4xx answers counted");

    // docker-py reads the same.
    if docker_py().is_none() {
        return;
    }
    let out = bob.py("import docker\n\
         c = docker.from_env()\n\
         imgs = c.images.list()\n\
         assert [t for i in imgs for t in i.tags] == ['busybox:latest'], imgs\n\
         i = c.images.get('busybox')\n\
         assert i.attrs['Os'] == 'linux'\n\
         try:\n\
         \x20   c.images.get('bb:gz')\n\
         \x20   raise SystemExit('another account\\'s image was visible')\n\
         except docker.errors.ImageNotFound:\n\
         \x20   pass\n\
         c.images.remove('busybox')\n\
         assert c.images.list() == []\n\
         print('ok')\n");
    assert_eq!(out.ok("docker-py images").trim(), "ok");
}
