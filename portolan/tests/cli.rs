//! The `portolan` command as a new user runs it: serve, import, query, stop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_portolan");

struct Served {
    child: Child,
    addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(store: &str) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--store", store])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("listening on ") {
                let _ = tx.send(a.to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("portolan serve did not print its address");
    Served { child, addr }
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp(name: &str) -> std::path::PathBuf {
    let mut rnd = [0u8; 6];
    getrandom::getrandom(&mut rnd).unwrap();
    let tag: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    std::env::temp_dir().join(format!("portolan-cli-{tag}-{name}"))
}

#[test]
fn serve_import_and_query() {
    let db = temp("store.db");
    let store = format!("sqlite:{}", db.display());
    let file = temp("mappings.json");
    std::fs::write(
        &file,
        r#"{"underlay":[{"cn_uuid":"564d1a4c-0000-4000-8000-000000000001","ip":"192.168.1.1","port":4789}],
            "overlay":[{"vnet_id":12340,"ip":"10.0.0.1","mac":"00:0a:95:9d:68:16","cn_uuid":"564d1a4c-0000-4000-8000-000000000001"}]}"#,
    )
    .unwrap();

    let srv = serve(&store);
    let (ok, out, err) = run(&["import", "--store", &store, file.to_str().unwrap()]);
    assert!(ok, "import failed: {err}");
    assert!(out.contains("1 overlay created"), "{out}");

    let (ok, out, err) = run(&[
        "vl3", "--server", &srv.addr, "--ip", "10.0.0.1", "--vnet", "12340",
    ]);
    assert!(ok, "vl3 failed: {err}");
    assert_eq!(
        out.trim(),
        "10.0.0.1 on vnet 12340: mac 00:0a:95:9d:68:16 underlay 192.168.1.1:4789"
    );
    let (ok, out, _) = run(&[
        "vl3", "-s", &srv.addr, "--ip", "10.0.0.2", "--vnet", "12340", "--json",
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "NOTFOUND");
    let (ok, out, _) = run(&[
        "vl2",
        "-s",
        &srv.addr,
        "--mac",
        "00:0a:95:9d:68:16",
        "--vnet",
        "12340",
        "--json",
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["underlay_ip"], "192.168.1.1");
    assert_eq!(v["underlay_port"], 4789);
    let (ok, out, _) = run(&["ping", "-s", &srv.addr]);
    assert!(ok && out.starts_with("PONG"), "{out}");

    // The import wrote a VL3 event for host 1: read it, remove it.
    let (ok, out, _) = run(&[
        "log",
        "-s",
        &srv.addr,
        "--underlay-ip",
        "192.168.1.1",
        "--json",
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let entries = v.as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["type"], "VL3");
    assert_eq!(entries[0]["ip"], "10.0.0.1");
    let id = entries[0]["id"].as_str().unwrap();
    let (ok, _, err) = run(&["log-rm", "-s", &srv.addr, id]);
    assert!(ok, "{err}");
    let (ok, out, _) = run(&["log", "-s", &srv.addr, "--underlay-ip", "192.168.1.1"]);
    assert!(ok);
    assert!(out.starts_with("0 log entries"), "{out}");

    // Bad input is reported, with what was expected.
    let (ok, _, err) = run(&["vl2", "-s", &srv.addr, "--mac", "zz", "--vnet", "1"]);
    assert!(!ok);
    assert!(err.contains("invalid MAC address"), "{err}");
    let bad = temp("bad.json");
    std::fs::write(&bad, r#"{"overlay":[{"vnet_id":1,"ip":"10.0.0.1","mac":"00:0a:95:9d:68:16","cn_uuid":"564d1a4c-0000-4000-8000-000000000001","owner":"x"}]}"#).unwrap();
    let (ok, _, err) = run(&["import", "--store", &store, bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("overlay[0]") && err.contains("owner"), "{err}");

    // SIGTERM stops the server cleanly.
    let mut srv = srv;
    let pid = srv.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    loop {
        if let Some(status) = srv.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "server ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, _, err) = run(&["ping", "-s", &srv.addr, "--timeout", "2"]);
    assert!(!ok);
    assert!(
        err.contains("cannot reach") || err.contains("no reply"),
        "{err}"
    );

    for f in [&file, &bad] {
        let _ = std::fs::remove_file(f);
    }
    for s in ["", "-wal", "-shm"] {
        let mut p = db.clone().into_os_string();
        p.push(s);
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn help_explains_the_commands() {
    let (ok, out, _) = run(&["--help"]);
    assert!(ok);
    for word in [
        "serve",
        "import",
        "vl2",
        "vl3",
        "log",
        "log-rm",
        "bench",
        "sqlite:PATH",
    ] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
    let (ok, out, _) = run(&["import", "--help"]);
    assert!(ok);
    assert!(
        out.contains("cn_uuid") && out.contains("Unknown fields"),
        "{out}"
    );
}
