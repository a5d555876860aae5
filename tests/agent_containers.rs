//! Containers run by the agent's runtime on a real host: `fabric shim` under runc 1.1.5, a
//! busybox root filesystem built here, a bundle in a network namespace the test creates.
//! Output from the first byte, exit codes, stop with a grace period, signals, attach with
//! stdin, exec with and without a terminal, logs (tail, timestamps, follow), an agent
//! restart that finds the running container instead of starting it again, removal.
//!
//! Each test has its own data directory, runc root and namespace, removed also on failure.

#[path = "util/root.rs"]
mod root;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fabric::agent::api::VmState;
use fabric::agent::runtime::exec::{self, ExecSpec};
use fabric::agent::runtime::logs::{self, LogFollower, LogQuery, Stream};
use fabric::agent::runtime::shim::{ShimClient, ShimRequest, ShimState};
use fabric::agent::runtime::streams::Streams;
use fabric::agent::runtime::{Phase, Preparer, Runtime};
use fabric::agent::tunnel::Handler;
use fabric::agent::Containers;
use fabric::control::container_spec::ContainerSpec;
use fabric::control::tunnel::proto::{Frame, OpenRequest, StreamOp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

static N: AtomicU32 = AtomicU32::new(0);

/// A data directory, a network namespace and the containers made in them; all removed on drop.
struct Fixture {
    data: PathBuf,
    netns: String,
    rt: Runtime,
    vms: Vec<String>,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let data = std::env::temp_dir().join(format!("fabric-ct-{tag}-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).unwrap();
        let netns = format!("fabct{pid}x{n}");
        let out = Command::new("ip")
            .args(["netns", "add", &netns])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add: {out:?}");
        let rt = Runtime::new(&data, Path::new(env!("CARGO_BIN_EXE_fabric")));
        Fixture {
            data,
            netns,
            rt,
            vms: Vec::new(),
        }
    }

    /// A prepared container running `argv` in a busybox root filesystem.
    fn container(&mut self, argv: &[&str], tty: bool, stdin: bool) -> (String, ContainerSpec) {
        let n = N.fetch_add(1, Ordering::SeqCst);
        let vm = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), n);
        let dir = self.rt.create_dir(&vm).unwrap();
        write_bundle(&dir.join("bundle"), argv, tty, &self.netns);
        self.rt.mark_prepared(&vm).unwrap();
        self.vms.push(vm.clone());
        let spec = ContainerSpec {
            id: format!("{}{}", vm.replace('-', ""), "0".repeat(32)),
            cmd: argv.iter().map(|s| s.to_string()).collect(),
            tty,
            open_stdin: stdin,
            stdin_once: stdin,
            stop_signal: "SIGTERM".into(),
            ..Default::default()
        };
        (vm, spec)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Every container under the data directory, also those another Runtime made.
        for vm in self.vms.iter().cloned().chain(self.rt.list()) {
            let _ = self.rt.remove(&vm);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// A busybox root filesystem and runc's default config running `argv` in netns `netns`.
fn write_bundle(bundle: &Path, argv: &[&str], tty: bool, netns: &str) {
    busybox_rootfs(&bundle.join("rootfs"));
    let out = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(bundle)
        .output()
        .unwrap();
    assert!(out.status.success(), "runc spec: {out:?}");
    let p = bundle.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    c["process"]["args"] = serde_json::json!(argv);
    c["process"]["terminal"] = serde_json::json!(tty);
    c["root"]["readonly"] = serde_json::json!(false);
    c["hostname"] = serde_json::json!("ct");
    for ns in c["linux"]["namespaces"].as_array_mut().unwrap() {
        if ns["type"] == "network" {
            ns["path"] = serde_json::json!(format!("/run/netns/{netns}"));
        }
    }
    std::fs::write(&p, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
}

/// `/bin/busybox` and a symlink per applet.
fn busybox_rootfs(root: &Path) {
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
}

/// Polls until the container's process has ended (at most `limit`).
fn wait_exit(rt: &Runtime, vm: &str, limit: Duration) -> ShimState {
    let t = Instant::now();
    loop {
        match rt.phase(vm) {
            Phase::Exited { state } => return state,
            p if t.elapsed() > limit => panic!("{vm} did not end within {limit:?}: {p:?}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Polls until the shim answers on its socket.
async fn wait_running(rt: &Runtime, vm: &str) -> ShimState {
    let t = Instant::now();
    loop {
        if let Ok(r) = ShimClient::new(&rt.dir(vm))
            .call(&ShimRequest::Status)
            .await
        {
            let st = r.state.unwrap();
            // runc has written the init pid: the container exists (exec can find it).
            if st.pid.is_some() {
                return st;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{vm}: no shim answered with a started process"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log_text(rt: &Runtime, vm: &str) -> String {
    let all = logs::read_all(&rt.dir(vm)).unwrap();
    all.iter()
        .map(|r| String::from_utf8_lossy(&r.data).into_owned())
        .collect()
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn output_from_the_first_byte_and_exit_codes() {
    if !root::root_or_skip("output_from_the_first_byte_and_exit_codes") {
        return;
    }
    let mut f = Fixture::new("exit");
    let (hi, spec) = f.container(&["echo", "hi"], false, false);
    f.rt.start(&hi, &spec, 1).unwrap();
    let st = wait_exit(&f.rt, &hi, Duration::from_secs(20));
    assert_eq!(st.exit_status, Some(0));
    assert_eq!(st.generation, 1);
    assert!(
        st.started_ms.is_some() && st.finished_ms >= st.started_ms,
        "{st:?}"
    );
    assert_eq!(log_text(&f.rt, &hi), "hi\n");
    // The generation never runs twice.
    let e = f.rt.start(&hi, &spec, 1).unwrap_err().to_string();
    assert!(e.contains("already started"), "{e}");

    let (three, spec) = f.container(
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        false,
        false,
    );
    f.rt.start(&three, &spec, 1).unwrap();
    let st = wait_exit(&f.rt, &three, Duration::from_secs(20));
    assert_eq!(st.exit_status, Some(3));
    let all = logs::read_all(&f.rt.dir(&three)).unwrap();
    assert!(
        all.iter()
            .any(|r| r.stream == Stream::Stderr && r.data == b"err\n"),
        "{all:?}"
    );
    assert!(
        all.iter()
            .any(|r| r.stream == Stream::Stdout && r.data == b"out\n"),
        "{all:?}"
    );
    // The next generation of the same container runs again (a restart), its output appended,
    // once the last run's shim has gone.
    let t = Instant::now();
    while fabric::agent::runtime::shim_alive(&f.rt.dir(&three)) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the shim did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    f.rt.start(&three, &spec, 2).unwrap();
    let st = wait_exit(&f.rt, &three, Duration::from_secs(20));
    assert_eq!((st.generation, st.exit_status), (2, Some(3)));
    assert_eq!(log_text(&f.rt, &three).matches("out\n").count(), 2);
}

#[test]
fn stop_kill_and_signal() {
    if !root::root_or_skip("stop_kill_and_signal") {
        return;
    }
    let rt_ = tokio_rt();
    let mut f = Fixture::new("stop");
    // busybox sleep as PID 1 ignores SIGTERM: stop waits out its 1 s, then SIGKILL.
    let (sleeper, spec) = f.container(&["sleep", "100"], false, false);
    f.rt.start(&sleeper, &spec, 1).unwrap();
    rt_.block_on(wait_running(&f.rt, &sleeper));
    let t = Instant::now();
    rt_.block_on(f.rt.stop(&sleeper, 1)).unwrap();
    let st = wait_exit(&f.rt, &sleeper, Duration::from_secs(15));
    let took = t.elapsed();
    println!("stop -t 1 of a SIGTERM-ignoring PID 1 took {took:?}");
    assert_eq!(st.exit_status, Some(137), "{st:?}");
    assert!(
        took >= Duration::from_millis(900),
        "{took:?}: the grace period was not given"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");

    // A signal the process handles: the shell's trap sees SIGUSR1 and exits 42.
    let (trap, spec) = f.container(
        &[
            "sh",
            "-c",
            "trap 'echo got usr1; exit 42' USR1; echo ready; while true; do sleep 0.1; done",
        ],
        false,
        false,
    );
    f.rt.start(&trap, &spec, 1).unwrap();
    rt_.block_on(wait_running(&f.rt, &trap));
    let t = Instant::now();
    while !log_text(&f.rt, &trap).contains("ready") {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    rt_.block_on(f.rt.signal(&trap, "USR1")).unwrap();
    let st = wait_exit(&f.rt, &trap, Duration::from_secs(10));
    assert_eq!(st.exit_status, Some(42));
    assert!(log_text(&f.rt, &trap).contains("got usr1"));
    // A bad signal name is refused, and SIGKILL reads as 137.
    let (k, spec) = f.container(&["sleep", "100"], false, false);
    f.rt.start(&k, &spec, 1).unwrap();
    rt_.block_on(wait_running(&f.rt, &k));
    let e = rt_
        .block_on(f.rt.signal(&k, "SIGNOPE"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a signal"), "{e}");
    rt_.block_on(f.rt.signal(&k, "KILL")).unwrap();
    assert_eq!(
        wait_exit(&f.rt, &k, Duration::from_secs(10)).exit_status,
        Some(137)
    );
}

async fn read_frames(
    c: &mut tokio::net::UnixStream,
    until: impl Fn(&[Frame]) -> bool,
) -> Vec<Frame> {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = vec![0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(15);
    while !until(&frames) {
        let n = tokio::time::timeout_at(deadline.into(), c.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no frames in time; so far {frames:?}"))
            .unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some((f, used)) = Frame::decode(&buf).unwrap() {
            buf.drain(..used);
            frames.push(f);
        }
    }
    frames
}

fn stdout_of(frames: &[Frame]) -> String {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Stdout(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}

#[test]
fn attach_with_stdin_and_from_the_start() {
    if !root::root_or_skip("attach_with_stdin_and_from_the_start") {
        return;
    }
    let rt_ = tokio_rt();
    let mut f = Fixture::new("attach");
    let (cat, spec) = f.container(&["sh", "-c", "echo first; cat; echo done"], false, true);
    f.rt.start(&cat, &spec, 1).unwrap();
    rt_.block_on(async {
        wait_running(&f.rt, &cat).await;
        let (_, mut c) = ShimClient::new(&f.rt.dir(&cat))
            .request(&ShimRequest::Attach {
                stdin: true,
                stdout: true,
                stderr: true,
                from_start: true,
            })
            .await
            .unwrap();
        // Everything since the start, though the attach came after "first" was written.
        let got = read_frames(&mut c, |fr| stdout_of(fr).contains("first\n")).await;
        assert!(stdout_of(&got).starts_with("first\n"), "{got:?}");
        let mut b = Vec::new();
        Frame::Stdin(b"ping\n".to_vec()).encode(&mut b);
        c.write_all(&b).await.unwrap();
        let got = read_frames(&mut c, |fr| stdout_of(fr).contains("ping\n")).await;
        assert!(stdout_of(&got).contains("ping\n"), "{got:?}");
        // Closing stdin ends cat; the attach sees the rest and the exit.
        b.clear();
        Frame::StdinEof.encode(&mut b);
        c.write_all(&b).await.unwrap();
        let got = read_frames(&mut c, |fr| {
            fr.iter().any(|x| matches!(x, Frame::Exit { .. }))
        })
        .await;
        assert!(stdout_of(&got).contains("done\n"), "{got:?}");
        assert_eq!(got.last(), Some(&Frame::Exit { code: 0 }));
    });
    let st = wait_exit(&f.rt, &cat, Duration::from_secs(10));
    assert_eq!(st.exit_status, Some(0));
    assert_eq!(log_text(&f.rt, &cat), "first\nping\ndone\n");

    // A terminal: output comes through the pty, resize reaches it.
    let (t, spec) = f.container(
        &[
            "sh",
            "-c",
            "sleep 0.5; stty size; read x; stty size; echo bye",
        ],
        true,
        true,
    );
    f.rt.start(&t, &spec, 1).unwrap();
    rt_.block_on(async {
        wait_running(&f.rt, &t).await;
        let (_, mut c) = ShimClient::new(&f.rt.dir(&t))
            .request(&ShimRequest::Attach {
                stdin: true,
                stdout: true,
                stderr: true,
                from_start: true,
            })
            .await
            .unwrap();
        let got = read_frames(&mut c, |fr| stdout_of(fr).contains("24 80")).await;
        assert!(stdout_of(&got).contains("24 80"), "{got:?}");
        ShimClient::new(&f.rt.dir(&t))
            .call(&ShimRequest::Resize {
                height: 33,
                width: 101,
            })
            .await
            .unwrap();
        // runc follows the size on SIGWINCH; give it a moment before the shell asks again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut b = Vec::new();
        Frame::Stdin(b"go\r".to_vec()).encode(&mut b);
        c.write_all(&b).await.unwrap();
        let got = read_frames(&mut c, |fr| stdout_of(fr).contains("bye")).await;
        assert!(stdout_of(&got).contains("33 101"), "{got:?}");
    });
    assert_eq!(
        wait_exit(&f.rt, &t, Duration::from_secs(10)).exit_status,
        Some(0)
    );
}

async fn exec_collect(
    rt: &Runtime,
    vm: &str,
    spec: ExecSpec,
    stdin: Option<&[u8]>,
) -> (i32, Vec<Frame>) {
    let (in_tx, in_rx) = mpsc::channel(16);
    let (out_tx, mut out_rx) = mpsc::channel(64);
    if let Some(b) = stdin {
        in_tx.send(Frame::Stdin(b.to_vec())).await.unwrap();
        in_tx.send(Frame::StdinEof).await.unwrap();
    }
    let code = exec::run(rt, vm, &spec, in_rx, out_tx).await.unwrap();
    drop(in_tx);
    let mut frames = Vec::new();
    while let Some(f) = out_rx.recv().await {
        frames.push(f);
    }
    (code, frames)
}

#[test]
fn exec_with_and_without_a_terminal() {
    if !root::root_or_skip("exec_with_and_without_a_terminal") {
        return;
    }
    let rt_ = tokio_rt();
    let mut f = Fixture::new("exec");
    let (vm, spec) = f.container(&["sleep", "100"], false, false);
    f.rt.start(&vm, &spec, 1).unwrap();
    rt_.block_on(async {
        wait_running(&f.rt, &vm).await;
        let (code, fr) = exec_collect(
            &f.rt,
            &vm,
            ExecSpec {
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo $A; pwd; echo e >&2; exit 5".into(),
                ],
                env: vec!["A=hello".into()],
                working_dir: "/tmp".into(),
                ..Default::default()
            },
            None,
        )
        .await;
        assert_eq!(code, 5, "{fr:?}");
        assert!(
            matches!(fr.first(), Some(Frame::Started { pid: Some(_) })),
            "{fr:?}"
        );
        assert_eq!(stdout_of(&fr), "hello\n/tmp\n");
        assert!(fr.contains(&Frame::Stderr(b"e\n".to_vec())), "{fr:?}");
        assert_eq!(fr.last(), Some(&Frame::Exit { code: 5 }));
        // stdin reaches the process.
        let (code, fr) = exec_collect(
            &f.rt,
            &vm,
            ExecSpec {
                cmd: vec!["cat".into()],
                stdin: true,
                ..Default::default()
            },
            Some(b"through\n"),
        )
        .await;
        assert_eq!((code, stdout_of(&fr).as_str()), (0, "through\n"));
        // With a terminal: one output stream, the tty seen inside.
        let (code, fr) = exec_collect(
            &f.rt,
            &vm,
            ExecSpec {
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "test -t 1 && echo tty; exit 7".into(),
                ],
                tty: true,
                ..Default::default()
            },
            None,
        )
        .await;
        assert_eq!(code, 7);
        assert!(stdout_of(&fr).contains("tty"), "{fr:?}");
        assert!(!fr.iter().any(|x| matches!(x, Frame::Stderr(_))));
        // Refused before anything runs.
        let (_i, in_rx) = mpsc::channel(1);
        let (out_tx, _o) = mpsc::channel(1);
        let e = exec::run(
            &f.rt,
            &vm,
            &ExecSpec {
                cmd: vec!["id".into()],
                user: "root".into(),
                ..Default::default()
            },
            in_rx,
            out_tx,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("numeric"), "{e}");
    });
    // The container's own log has none of the exec's output.
    assert_eq!(log_text(&f.rt, &vm), "");
}

#[test]
fn logs_tail_timestamps_and_follow() {
    if !root::root_or_skip("logs_tail_timestamps_and_follow") {
        return;
    }
    let rt_ = tokio_rt();
    let mut f = Fixture::new("logs");
    let (vm, spec) = f.container(
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo line$i; done; read x; echo late; sleep 0.3; echo last",
        ],
        false,
        true,
    );
    let before = logs::now_ns();
    f.rt.start(&vm, &spec, 1).unwrap();
    rt_.block_on(wait_running(&f.rt, &vm));
    let dir = f.rt.dir(&vm);
    let t = Instant::now();
    while !log_text(&f.rt, &vm).contains("line5") {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let q = LogQuery {
        stdout: true,
        stderr: true,
        tail: Some(2),
        ..Default::default()
    };
    let tail: Vec<Vec<u8>> = q
        .select(logs::read_all(&dir).unwrap())
        .iter()
        .map(|r| r.render(false))
        .collect();
    assert_eq!(tail, vec![b"line4\n".to_vec(), b"line5\n".to_vec()]);
    let all = logs::read_all(&dir).unwrap();
    assert!(all
        .iter()
        .all(|r| r.time_ns >= before && r.time_ns <= logs::now_ns()));
    let stamped = String::from_utf8(all[0].render(true)).unwrap();
    let (ts, rest) = stamped.split_once(' ').unwrap();
    assert!(
        ts.ends_with('Z') && ts.contains('T') && rest == "line1\n",
        "{stamped}"
    );
    // since: nothing from before a time after everything so far.
    let q = LogQuery {
        stdout: true,
        stderr: true,
        since_ns: Some(logs::now_ns()),
        ..Default::default()
    };
    assert!(q.select(logs::read_all(&dir).unwrap()).is_empty());
    // follow: the follower sees the late output, until the process has ended.
    let (first, mut fol) = LogFollower::open(&dir).unwrap();
    assert_eq!(first.len(), 5);
    rt_.block_on(async {
        let (_, mut c) = ShimClient::new(&dir)
            .request(&ShimRequest::Attach {
                stdin: true,
                stdout: false,
                stderr: false,
                from_start: false,
            })
            .await
            .unwrap();
        let mut b = Vec::new();
        Frame::Stdin(b"x\n".to_vec()).encode(&mut b);
        c.write_all(&b).await.unwrap();
        let mut seen = Vec::new();
        let t = Instant::now();
        while !matches!(f.rt.phase(&vm), Phase::Exited { .. }) || seen.len() < 2 {
            seen.extend(fol.poll().unwrap());
            assert!(t.elapsed() < Duration::from_secs(10), "{seen:?}");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let text: String = seen
            .iter()
            .map(|r| String::from_utf8_lossy(&r.data).into_owned())
            .collect();
        assert_eq!(text, "late\nlast\n");
    });
}

#[test]
fn a_restarted_agent_finds_the_running_container() {
    if !root::root_or_skip("a_restarted_agent_finds_the_running_container") {
        return;
    }
    let rt_ = tokio_rt();
    let mut f = Fixture::new("restart");
    let (vm, spec) = f.container(&["sh", "-c", "echo up; sleep 100"], false, false);
    f.rt.start(&vm, &spec, 4).unwrap();
    let st = rt_.block_on(wait_running(&f.rt, &vm));
    assert_eq!(st.generation, 4);
    // The shim is its own session: not in the test's process group.
    let shim_pid: i32 = std::fs::read_to_string(f.rt.dir(&vm).join("shim.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let sid = std::fs::read_to_string(format!("/proc/{shim_pid}/stat")).unwrap();
    let sid: i32 = sid
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(sid, shim_pid, "the shim leads its own session");
    // A new runtime over the same directory (the agent restarted).
    let again = Runtime::new(&f.data, Path::new(env!("CARGO_BIN_EXE_fabric")));
    let t = Instant::now();
    let pid = loop {
        match again.phase(&vm) {
            Phase::Running { state } if state.pid.is_some() => break state.pid.unwrap(),
            Phase::Running { .. } if t.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            p => panic!("{p:?}"),
        }
    };
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let e = again.start(&vm, &spec, 4).unwrap_err().to_string();
    assert!(e.contains("already started"), "{e}");
    // Even a newer generation waits for the running one to end.
    assert!(again.start(&vm, &spec, 5).is_err());
    // The restarted agent is told when it ends.
    let exits = again.exits();
    rt_.block_on(async {
        let woken = exits.notified();
        again.adopt(&vm);
        tokio::time::sleep(Duration::from_millis(100)).await;
        again.stop(&vm, 0).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), woken)
            .await
            .expect("exit noticed");
    });
    let st = wait_exit(&again, &vm, Duration::from_secs(10));
    assert_eq!(st.exit_status, Some(137));
    // Removal: runc forgets it and the directory goes.
    again.remove(&vm).unwrap();
    assert!(!f.rt.dir(&vm).exists());
    let list = Command::new("runc")
        .arg("--root")
        .arg(again.runc_root())
        .arg("list")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&vm));
    assert_eq!(again.phase(&vm), Phase::Absent);
}

async fn handler_collect(h: &Streams, vm: &str, op: StreamOp, input: Vec<Frame>) -> Vec<Frame> {
    let (in_tx, in_rx) = mpsc::channel(16);
    let (out_tx, mut out_rx) = mpsc::channel(64);
    for f in input {
        in_tx.send(f).await.unwrap();
    }
    let req = OpenRequest {
        id: "s1".into(),
        vm: vm.into(),
        op,
    };
    let serve = h.serve(req, in_rx, out_tx);
    let collect = async {
        let mut v = Vec::new();
        while let Some(f) = out_rx.recv().await {
            v.push(f);
        }
        v
    };
    let (_, frames) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(serve, collect)
    })
    .await
    .expect("the sub-stream ended");
    drop(in_tx);
    frames
}

#[test]
fn the_tunnel_handler_serves_attach_logs_and_exec() {
    if !root::root_or_skip("the_tunnel_handler_serves_attach_logs_and_exec") {
        return;
    }
    let rt_ = tokio_rt();
    let mut f = Fixture::new("handler");
    let h = Streams::new(std::sync::Arc::new(Runtime::new(
        &f.data,
        Path::new(env!("CARGO_BIN_EXE_fabric")),
    )));
    // `docker run`: attach first, then start; a process that exits at once.
    let (hi, spec) = f.container(&["sh", "-c", "echo hi; echo oops >&2"], false, false);
    rt_.block_on(async {
        let attach = StreamOp::Attach {
            stdin: false,
            stdout: true,
            stderr: true,
            logs: false,
        };
        let h2 = h.clone();
        let vm = hi.clone();
        let t = tokio::spawn(async move { handler_collect(&h2, &vm, attach, vec![]).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        f.rt.start(&hi, &spec, 1).unwrap();
        let fr = t.await.unwrap();
        assert_eq!(stdout_of(&fr), "hi\n", "{fr:?}");
        assert!(fr.contains(&Frame::Stderr(b"oops\n".to_vec())), "{fr:?}");
        assert_eq!(fr.last(), Some(&Frame::Exit { code: 0 }));
    });
    // logs: all, with timestamps, then tail 1 of stdout only.
    rt_.block_on(async {
        let fr = handler_collect(
            &h,
            &hi,
            StreamOp::Logs {
                follow: false,
                tail: None,
                since_ns: None,
                until_ns: None,
                timestamps: true,
                stdout: true,
                stderr: true,
            },
            vec![],
        )
        .await;
        let out = stdout_of(&fr);
        assert!(out.ends_with("Z hi\n") && out.starts_with("20"), "{out}");
        assert_eq!(fr.last(), Some(&Frame::Exit { code: 0 }));
        let fr = handler_collect(
            &h,
            &hi,
            StreamOp::Logs {
                follow: true,
                tail: Some(1),
                since_ns: None,
                until_ns: None,
                timestamps: false,
                stdout: true,
                stderr: false,
            },
            vec![],
        )
        .await;
        assert_eq!(stdout_of(&fr), "hi\n");
        // exec into a container that is not running: refused with a reason.
        let fr = handler_collect(
            &h,
            &hi,
            StreamOp::Exec {
                cmd: vec!["true".into()],
                env: vec![],
                user: String::new(),
                working_dir: String::new(),
                tty: false,
                stdin: false,
            },
            vec![],
        )
        .await;
        assert!(
            matches!(&fr[..], [Frame::Error(e)] if e.contains("not running")),
            "{fr:?}"
        );
        // A container that is not on this host.
        let fr = handler_collect(
            &h,
            "00000000-0000-4000-8000-00000000dead",
            StreamOp::Resize {
                height: 1,
                width: 1,
            },
            vec![],
        )
        .await;
        assert!(
            matches!(&fr[..], [Frame::Error(e)] if e.contains("not on this host")),
            "{fr:?}"
        );
    });
    // logs --follow of a running container ends when it does; exec through the handler.
    let (slow, spec) = f.container(&["sh", "-c", "echo a; sleep 1; echo b"], false, false);
    f.rt.start(&slow, &spec, 1).unwrap();
    rt_.block_on(async {
        wait_running(&f.rt, &slow).await;
        let ex = handler_collect(
            &h,
            &slow,
            StreamOp::Exec {
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "read l; echo got $l; exit 2".into(),
                ],
                env: vec![],
                user: String::new(),
                working_dir: String::new(),
                tty: false,
                stdin: true,
            },
            vec![Frame::Stdin(b"x\n".to_vec()), Frame::StdinEof],
        )
        .await;
        assert_eq!(stdout_of(&ex), "got x\n", "{ex:?}");
        assert_eq!(ex.last(), Some(&Frame::Exit { code: 2 }));
        let fr = handler_collect(
            &h,
            &slow,
            StreamOp::Logs {
                follow: true,
                tail: None,
                since_ns: None,
                until_ns: None,
                timestamps: false,
                stdout: true,
                stderr: true,
            },
            vec![],
        )
        .await;
        assert_eq!(stdout_of(&fr), "a\nb\n", "{fr:?}");
    });
}

/// Writes the busybox bundle of `container` (what img's layers/rootfs/bundle do on a real host).
struct TestPreparer {
    netns: String,
}

impl Preparer for TestPreparer {
    fn prepare<'a>(
        &'a self,
        vm: &'a fabric::agent::api::Vm,
        bundle: &'a Path,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let spec = vm.container.as_ref().ok_or("no container")?;
            let argv = spec.argv();
            let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
            write_bundle(bundle, &argv, false, &self.netns);
            Ok(())
        })
    }
}

fn vm_of(uuid: &str, argv: &[&str], desired: &str, generation: u64) -> fabric::agent::api::Vm {
    serde_json::from_value(serde_json::json!({
        "uuid": uuid,
        "owner_uuid": "o",
        "state": "stopped",
        "desired_state": desired,
        "generation": generation,
        "container": {
            "id": format!("{}{}", uuid.replace('-', ""), "0".repeat(32)),
            "cmd": argv,
            "working_dir": "/",
            "stop_signal": "SIGTERM",
            "stop_timeout": 1,
            "uid_base": fabric::control::container_spec::UID_BASE_START,
        }
    }))
    .unwrap()
}

#[test]
fn the_agent_step_runs_reports_and_removes_containers() {
    if !root::root_or_skip("the_agent_step_runs_reports_and_removes_containers") {
        return;
    }
    let rt_ = tokio_rt();
    let f = Fixture::new("step");
    // The agent steps only VMs whose namespace is in place: the VM is named like the netns.
    let n = N.fetch_add(1, Ordering::SeqCst);
    let uuid = format!("{:08x}-1111-4000-8000-{:012x}", std::process::id(), n);
    let ns = Netns(uuid.clone());
    let out = Command::new("ip")
        .args(["netns", "add", &uuid])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rt = std::sync::Arc::new(Runtime::new(
        &f.data,
        Path::new(env!("CARGO_BIN_EXE_fabric")),
    ));
    let step = Containers::new(
        rt.clone(),
        std::sync::Arc::new(TestPreparer {
            netns: uuid.clone(),
        }),
    );
    let mut last = std::collections::BTreeMap::new();
    rt_.block_on(async {
        // Created (generation 0, desired stopped): prepared, reported stopped, not started.
        let mut vm = vm_of(&uuid, &["sh", "-c", "echo run; exit 4"], "stopped", 0);
        let (reps, failed) = step.reconcile(std::slice::from_ref(&vm), &last).await;
        assert_eq!(failed, 0);
        assert_eq!(reps.len(), 1, "{reps:?}");
        assert_eq!(reps[0].state, VmState::Stopped);
        assert_eq!(reps[0].generation, None);
        assert_eq!(rt.phase(&uuid), Phase::Prepared);
        last.insert(uuid.clone(), reps[0].clone());
        // Started: generation 1 runs, ends with 4, reported stopped with its exit status.
        vm.desired_state = "running".into();
        vm.generation = 1;
        let (reps, _) = step.reconcile(std::slice::from_ref(&vm), &last).await;
        assert!(reps.iter().all(|r| r.state != VmState::Failed), "{reps:?}");
        wait_exit(&rt, &uuid, Duration::from_secs(20));
        let (reps, _) = step.reconcile(std::slice::from_ref(&vm), &last).await;
        assert_eq!(reps.len(), 1, "{reps:?}");
        let r = &reps[0];
        assert_eq!(
            (r.state, r.exit_status, r.generation),
            (VmState::Stopped, Some(4), Some(1))
        );
        assert!(
            r.started_at.is_some() && r.finished_at >= r.started_at,
            "{r:?}"
        );
        last.insert(uuid.clone(), r.clone());
        vm.state = "stopped".into();
        vm.run_generation = Some(1);
        // Desired still running, but generation 1 ended: never started again.
        let (reps, _) = step.reconcile(std::slice::from_ref(&vm), &last).await;
        assert!(reps.is_empty(), "{reps:?}");
        assert_eq!(log_text(&rt, &uuid), "run\n");
        // `docker start` again: generation 2, at once after the last run (its shim may still
        // be finishing).
        let mut again = vm.clone();
        again.generation = 2;
        let (reps, failed) = step.reconcile(std::slice::from_ref(&again), &last).await;
        assert_eq!(failed, 0, "{reps:?}");
        let st = wait_exit(&rt, &uuid, Duration::from_secs(20));
        assert_eq!((st.generation, st.exit_status), (2, Some(4)));
        assert_eq!(log_text(&rt, &uuid), "run\nrun\n");
        // A bad spec is refused by the agent's re-check, with the reason.
        let mut bad = vm.clone();
        bad.generation = 3;
        bad.container.as_mut().unwrap().user = "root".into();
        let (reps, failed) = step.reconcile(std::slice::from_ref(&bad), &last).await;
        assert_eq!(failed, 1);
        assert_eq!(reps[0].state, VmState::Failed);
        assert!(
            reps[0].reason.as_deref().unwrap().contains("numeric"),
            "{reps:?}"
        );
        assert_eq!(log_text(&rt, &uuid), "run\nrun\n");
        // The VM gone from the snapshot: its container is removed.
        let (reps, _) = step.reconcile(&[], &last).await;
        assert!(reps.is_empty());
        assert_eq!(rt.phase(&uuid), Phase::Absent);
        assert!(!rt.dir(&uuid).exists());
    });
    drop(ns);
}

/// Deletes the named netns on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
