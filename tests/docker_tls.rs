//! The Docker API's trust boundary, against a real head (`fabric control --data DIR
//! --docker-listen`) and the stock docker CLI: only certificates of the accounts CA get in;
//! the cluster CA's host and operator certificates, no certificate, and a removed account's
//! certificate are refused (an open connection of a removed account is closed); an account's
//! certificate is refused on the control API; `fabric account` says what is wrong in one line.

#[path = "util/docker_cli.rs"]
mod docker_cli;
#[path = "util/docker_head.rs"]
mod docker_head;
#[path = "util/temp_dir.rs"]
mod temp_dir;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use docker_cli::DockerClient;
use docker_head::DockerHead;
use fabric::control::client::HttpClient;
use fabric::pki::ca::{Ca, CaKind};
use fabric::pki::tls;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A client of `addr` trusting `ca_pem`, with the certificate in `dir` (cert.pem, key.pem).
fn client(addr: std::net::SocketAddr, ca_pem: &str, dir: Option<&Path>) -> HttpClient {
    let name = tls::server_name("127.0.0.1").unwrap();
    let cfg = match dir {
        Some(d) => {
            let read = |n: &str| std::fs::read_to_string(d.join(n)).unwrap();
            tls::client_config_from(ca_pem, &read("cert.pem"), &read("key.pem")).unwrap()
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for c in tls::pem_certs(ca_pem).unwrap() {
                roots.add(c).unwrap();
            }
            Arc::new(
                rustls::ClientConfig::builder_with_provider(tls::provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
    };
    HttpClient::https(addr, name, cfg)
}

/// `docker ARGS` with the stock CLI, as `certs`' account: (exit code, stdout, stderr).
fn docker(head: &DockerHead, certs: &Path, args: &[&str]) -> (i32, String, String) {
    let o = DockerClient::new(&head.docker_host(), certs, None).run(args);
    (o.code, o.stdout, o.stderr)
}

#[test]
fn only_live_account_certificates_reach_the_docker_api() {
    if !docker_cli::docker_cli_present() {
        return;
    }
    let head = DockerHead::start();
    let alice = head.account("alice");
    let accounts_ca = std::fs::read_to_string(head.path("pki/accounts-ca.crt")).unwrap();
    let cluster_ca = Ca::load_kind(head.data(), CaKind::Cluster).unwrap();
    // The accounts CA is not the cluster CA, and docker-tls/ serves from the former.
    assert_ne!(accounts_ca, cluster_ca.ca_pem());
    assert_eq!(
        std::fs::read_to_string(head.path("docker-tls/ca.pem")).unwrap(),
        accounts_ca
    );
    assert_eq!(
        std::fs::read_to_string(alice.join("ca.pem")).unwrap(),
        accounts_ca
    );

    // The stock CLI, unchanged, with the certificate `fabric account add` wrote.
    let (code, out, err) = docker(
        &head,
        &alice,
        &["version", "--format", "{{.Server.APIVersion}}"],
    );
    assert_eq!((code, out.trim()), (0, "1.41"), "docker version: {err}");

    let rt = rt();
    rt.block_on(async {
        // The account's certificate: /_ping answers with the version headers.
        let mut a = client(head.docker, &accounts_ca, Some(&alice));
        let r = a.request("GET", "/_ping", None, b"").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"OK");
        assert_eq!(r.header("api-version"), Some("1.41"));
        assert_eq!(r.header("ostype"), Some("linux"));

        // No certificate: refused in the handshake (the request never gets an answer).
        let mut anon = client(head.docker, &accounts_ca, None);
        let e = anon.request("GET", "/_ping", None, b"").await;
        assert!(
            e.is_err(),
            "no client certificate got {:?}",
            e.map(|r| r.status)
        );

        // The cluster CA's operator and host certificates: refused on the Docker port.
        let cluster_dir = head.path("cluster-certs");
        let (cert, key) = cluster_ca
            .issue_operator("admin", Duration::from_secs(3600))
            .unwrap();
        std::fs::create_dir_all(&cluster_dir).unwrap();
        std::fs::write(cluster_dir.join("cert.pem"), &cert).unwrap();
        std::fs::write(cluster_dir.join("key.pem"), &key).unwrap();
        let mut op = client(head.docker, &accounts_ca, Some(&cluster_dir));
        assert!(
            op.request("GET", "/_ping", None, b"").await.is_err(),
            "an operator certificate reached the Docker API"
        );
        let (cert, key) = cluster_ca
            .issue_host_local(
                "564d0000-0000-4000-8000-000000000001",
                Duration::from_secs(3600),
            )
            .unwrap();
        std::fs::write(cluster_dir.join("cert.pem"), &cert).unwrap();
        std::fs::write(cluster_dir.join("key.pem"), &key).unwrap();
        let mut host = client(head.docker, &accounts_ca, Some(&cluster_dir));
        assert!(
            host.request("GET", "/_ping", None, b"").await.is_err(),
            "a host certificate reached the Docker API"
        );

        // An account's certificate on the control API: refused there.
        let mut on_control = client(head.api, cluster_ca.ca_pem(), Some(&alice));
        assert!(
            on_control.request("GET", "/vms", None, b"").await.is_err(),
            "an account certificate reached the control API"
        );
    });

    // Removing the account: its open connection is closed, new ones are refused, and the CLI
    // fails; another account is unaffected.
    let bob = head.account("bob");
    rt.block_on(async {
        let mut a = client(head.docker, &accounts_ca, Some(&alice));
        assert_eq!(
            a.request("GET", "/_ping", None, b"").await.unwrap().status,
            200
        );
        let t0 = Instant::now();
        let o = head.fabric(&["account", "rm", "alice"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // Refused from the moment `rm` returns, on the open connection too (it is closed).
        let r = a.request("GET", "/_ping", None, b"").await;
        assert!(
            r.is_err(),
            "a removed account's open connection still answered: {:?}",
            r.map(|r| r.status)
        );
        let mut fresh = client(head.docker, &accounts_ca, Some(&alice));
        assert!(fresh.request("GET", "/_ping", None, b"").await.is_err());
        eprintln!(
            "removed account refused {:?} after `fabric account rm` began",
            t0.elapsed()
        );
        let mut b = client(head.docker, &accounts_ca, Some(&bob));
        assert_eq!(
            b.request("GET", "/_ping", None, b"").await.unwrap().status,
            200
        );
    });
    let (code, _, err) = docker(&head, &alice, &["version"]);
    assert_ne!(
        code, 0,
        "docker version with a removed account's certificate succeeded"
    );
    eprintln!(
        "docker CLI with a removed account: exit {code}: {}",
        err.trim()
    );
    let (code, out, err) = docker(
        &head,
        &bob,
        &[
            "info",
            "--format",
            "{{.Swarm.LocalNodeState}} {{.Containers}} {{.Images}}",
        ],
    );
    assert_eq!((code, out.trim()), (0, "inactive 0 0"), "{err}");
}

#[test]
fn account_commands_say_what_is_wrong() {
    let head = DockerHead::start();
    let run = |args: &[&str]| {
        let o = head.fabric(args);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let out = head.path("x");
    let out = out.to_str().unwrap();
    let (c, _, e) = run(&["account", "add", "1bad", "--cert-dir", out]);
    assert_ne!(c, 0);
    assert!(e.contains("login \"1bad\": expected"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    head.account("carol");
    let (c, _, e) = run(&["account", "add", "carol", "--cert-dir", out]);
    assert_ne!(c, 0);
    assert!(e.contains("account carol already exists"), "{e}");
    // A second certificate for an existing account.
    let (c, o, e) = run(&["account", "cert", "carol", "--cert-dir", out]);
    assert_eq!(c, 0, "{e}");
    assert!(o.contains("DOCKER_CERT_PATH="), "{o}");
    let (c, o, _) = run(&["account", "ls"]);
    assert_eq!(c, 0);
    let line = o.lines().find(|l| l.starts_with("carol")).expect(&o);
    assert!(line.contains(" 2 ") && line.ends_with("active"), "{line}");
    let (c, _, e) = run(&["account", "rm", "nosuch"]);
    assert_ne!(c, 0);
    assert!(e.contains("no account nosuch (404"), "{e}");
    let (c, _, _) = run(&["account", "rm", "carol"]);
    assert_eq!(c, 0);
    let (c, _, e) = run(&["account", "rm", "carol"]);
    assert_ne!(c, 0);
    assert!(e.contains("account carol was removed (410"), "{e}");
    let (c, _, e) = run(&["account", "add", "carol", "--cert-dir", out]);
    assert_ne!(c, 0);
    assert!(e.contains("a login is never reused"), "{e}");
    let (c, _, e) = run(&["account", "cert", "carol", "--cert-dir", out]);
    assert_ne!(c, 0);
    assert!(e.contains("was removed"), "{e}");
    // A head that is not running: one line naming the socket.
    let gone = temp_dir::TempDir::new("no-head");
    let o = Command::new(docker_head::fabric_bin())
        .args(["account", "ls", "--data"])
        .arg(&gone.0)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(e.contains("control.sock"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}
