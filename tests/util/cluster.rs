//! Simulated hosts for cluster tests (DESIGN "Simulated hosts in tests").
//!
//! A [`Cluster`] is an underlay bridge namespace (`br0`, 192.168.78.254/24) and N hosts. Each
//! host is a network namespace joined to the bridge by a veth (`u0`, 192.168.78.N/24) plus a
//! **holder** process that lives in that namespace and owns a private mount namespace with its
//! own tmpfs on `/run` (so `/run/netns` is the host's own: a VM namespace an agent creates there
//! is invisible to the other hosts and to the machine). Fabric processes start inside a host
//! with `nsenter --target HOLDER --net --mount`, so killing one never wipes the host's
//! namespaces. The host namespace itself is named on the machine (`PREFIX-hN`), the bridge
//! namespace too (`PREFIX-u`); every name starts with a per-cluster prefix (pid + counter) and
//! every address lives inside namespaces the cluster created, so tests run in parallel and
//! never touch the machine's interfaces.
//!
//! The test process talks to the hosts' HTTP services from the bridge namespace (sockets made
//! there: [`Cluster::http`]) and reaches a VM's namespace through the holder's view of
//! `/run/netns` (`/proc/HOLDER/root/run/netns/VM`: [`Cluster::vm_netns`]).
//!
//! Dropping the cluster (also on panic, after printing the tails of every log under each
//! host's `logs/`) sends SIGTERM to the processes it spawned, then SIGKILL to every process
//! left in a host's network namespace, mount namespace or VM namespaces (grandchildren
//! included), kills the holders, deletes the namespaces and the temp dir. Holders and spawned
//! processes also get `PR_SET_PDEATHSIG` (SIGKILL), so a killed test run leaves nothing
//! running: create and drop a cluster on one thread.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fabric::io::netlink::Netns;

#[path = "netns.rs"]
pub mod netns;

#[allow(unused_imports)]
pub use netns::{fabric_bin, root_or_skip, Pattern};

/// The underlay's first three octets (distinct from `netns.rs`'s 192.168.77).
pub const UNDERLAY: &str = "192.168.78";
/// The bridge's own address (the test process's source address on the underlay).
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 78, 254);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One simulated host.
#[derive(Debug)]
pub struct SimHost {
    /// Short name, `h1`, `h2`, ...
    pub name: String,
    /// Its network namespace's name on the machine.
    pub ns: String,
    /// Underlay address (on `u0`).
    pub ip: Ipv4Addr,
    /// Its data directory (the `--data DIR` of `fabric up`); logs go to `dir/logs/`.
    pub dir: PathBuf,
    holder: Child,
}

impl SimHost {
    /// Pid of the holder process (the `--target` of `nsenter`).
    pub fn holder_pid(&self) -> u32 {
        self.holder.id()
    }

    /// `nsenter` prefix that enters this host (network + mount namespace).
    pub fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "--target",
            &self.holder.id().to_string(),
            "--net",
            "--mount",
            "--",
        ]);
        c
    }

    /// Log directory of this host.
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
}

/// A process started inside a host by [`Cluster::spawn`].
#[derive(Debug)]
struct Proc {
    /// The host, or `None` for the bridge namespace.
    host: Option<usize>,
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

/// Handle of a spawned process (index into the cluster's process list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId(usize);

/// A bridge and simulated hosts; see the module docs.
pub struct Cluster {
    /// Prefix of every namespace name.
    pub prefix: String,
    /// Private temp dir (one sub-dir per host).
    pub dir: PathBuf,
    /// The underlay bridge namespace.
    pub bridge_ns: String,
    /// Hosts; index 0 is 192.168.78.1.
    pub hosts: Vec<SimHost>,
    procs: Vec<Proc>,
    bridge: Netns,
    /// Credentials [`Cluster::http`] uses (an operator's, once the head made its CA): with
    /// them it speaks https.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Sets `PR_SET_PDEATHSIG` = SIGKILL in the child, so it dies with the thread that spawned it.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `ip ARGS`, panicking with stderr on failure.
fn ip(args: &[&str]) {
    if let Err(e) = netns::run(Command::new("ip").args(args)) {
        panic!("{e}");
    }
}

impl Cluster {
    /// A bridge and `n` hosts (each with its holder running, nothing else).
    pub fn new(n: usize) -> Cluster {
        assert!((1..=250).contains(&n), "1..=250 hosts, not {n}");
        let k = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("fcl{}x{k}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster's temp dir");
        let bridge_ns = format!("{prefix}-u");
        let bridge =
            Netns::create(&bridge_ns).unwrap_or_else(|e| panic!("create netns {bridge_ns}: {e}"));
        let mut c = Cluster {
            prefix,
            dir,
            bridge_ns: bridge_ns.clone(),
            hosts: Vec::new(),
            procs: Vec::new(),
            bridge,
            tls: None,
        };
        ip(&["-n", &bridge_ns, "link", "set", "lo", "up"]);
        // A fixed MAC: otherwise the bridge takes its lowest port's MAC, which changes as
        // hosts join, under hosts that already resolved the bridge's address.
        ip(&[
            "-n",
            &bridge_ns,
            "link",
            "add",
            "br0",
            "address",
            "02:00:c0:a8:4e:fe",
            "type",
            "bridge",
        ]);
        ip(&[
            "-n",
            &bridge_ns,
            "addr",
            "add",
            &format!("{BRIDGE_IP}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &bridge_ns, "link", "set", "br0", "up"]);
        for _ in 0..n {
            c.add_host();
        }
        c
    }

    /// Adds a host: namespace, veth to the bridge, address, holder. Returns its index.
    pub fn add_host(&mut self) -> usize {
        let i = self.hosts.len();
        let name = format!("h{}", i + 1);
        let ns = format!("{}-{name}", self.prefix);
        let hip = Ipv4Addr::new(192, 168, 78, (i + 1) as u8);
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(dir.join("logs")).expect("host data dir");
        drop(Netns::create(&ns).unwrap_or_else(|e| panic!("create netns {ns}: {e}")));
        // Registered before anything can fail, so Drop deletes the namespace.
        let peer = format!("vh{}", i + 1);
        let holder = {
            // The holder: in the host's netns, a private mount namespace with its own /run.
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}"))
                .args(["--", "unshare", "--mount", "--propagation", "private", "--"])
                .args([
                    "sh",
                    "-c",
                    "mount -t tmpfs -o mode=0755 fabric-host-run /run && mkdir -p /run/netns \
                     && echo ready && exec sleep infinity",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            die_with_parent(&mut cmd);
            cmd.spawn().expect("spawn the host's holder")
        };
        self.hosts.push(SimHost {
            name,
            ns: ns.clone(),
            ip: hip,
            dir,
            holder,
        });
        let h = self.hosts.last_mut().expect("just pushed");
        let mut line = String::new();
        let out = h.holder.stdout.take().expect("holder stdout");
        BufReader::new(out)
            .read_line(&mut line)
            .expect("read the holder's ready line");
        assert_eq!(line.trim(), "ready", "holder of {ns} did not start");
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let br = self.bridge_ns.clone();
        ip(&[
            "-n", &br, "link", "add", &peer, "type", "veth", "peer", "name", "u0", "netns", &ns,
        ]);
        ip(&["-n", &br, "link", "set", &peer, "master", "br0", "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{hip}/24"), "dev", "u0"]);
        ip(&["-n", &ns, "link", "set", "u0", "up"]);
        i
    }

    /// Starts `argv` inside host `host` (its network and mount namespace), stdout and stderr
    /// appended to `logs/NAME.log` of the host. Returns a handle for [`Cluster::signal`] etc.
    pub fn spawn(&mut self, host: usize, name: &str, argv: &[&str]) -> ProcId {
        self.spawn_env(host, name, argv, &[])
    }

    /// [`Cluster::spawn`] with extra environment variables.
    pub fn spawn_env(
        &mut self,
        host: usize,
        name: &str,
        argv: &[&str],
        env: &[(&str, &str)],
    ) -> ProcId {
        let h = &self.hosts[host];
        let (log, cmd) = (h.logs().join(format!("{name}.log")), h.nsenter());
        self.spawn_cmd(Some(host), cmd, name, log, argv, env)
    }

    /// Starts `argv` in the bridge namespace (a service every host reaches at [`BRIDGE_IP`]),
    /// logging to `DIR/bridge/logs/NAME.log`; stopped and swept on drop like host processes.
    pub fn spawn_bridge(&mut self, name: &str, argv: &[&str], env: &[(&str, &str)]) -> ProcId {
        let logs = self.bridge_logs();
        std::fs::create_dir_all(&logs).expect("bridge log dir");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.bridge_ns))
            .arg("--");
        self.spawn_cmd(None, cmd, name, logs.join(format!("{name}.log")), argv, env)
    }

    /// Log directory of the bridge namespace's processes.
    pub fn bridge_logs(&self) -> PathBuf {
        self.dir.join("bridge").join("logs")
    }

    fn spawn_cmd(
        &mut self,
        host: Option<usize>,
        mut cmd: Command,
        name: &str,
        log: PathBuf,
        argv: &[&str],
        env: &[(&str, &str)],
    ) -> ProcId {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the process log");
        cmd.args(argv)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log fd"))
            .stderr(f);
        for (k, v) in env {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?} ({name}): {e}"));
        self.procs.push(Proc {
            host,
            name: name.to_owned(),
            child: Some(child),
            log,
        });
        ProcId(self.procs.len() - 1)
    }

    /// Pid of a spawned process (nsenter execs, so it is the program's own pid).
    pub fn pid(&self, p: ProcId) -> Option<u32> {
        self.procs[p.0].child.as_ref().map(Child::id)
    }

    /// Whether a spawned process is still running.
    pub fn alive(&mut self, p: ProcId) -> bool {
        self.procs[p.0]
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends `sig` to a spawned process.
    pub fn signal(&self, p: ProcId, sig: i32) {
        if let Some(pid) = self.pid(p) {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    }

    /// Waits up to `within` for a spawned process to exit; returns its status.
    pub fn wait_exit(&mut self, p: ProcId, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let c = self.procs[p.0].child.as_mut()?;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops a spawned process: SIGTERM, SIGKILL after `grace`. Returns its status.
    pub fn stop(&mut self, p: ProcId, grace: Duration) -> Option<std::process::ExitStatus> {
        self.signal(p, libc::SIGTERM);
        if let Some(st) = self.wait_exit(p, grace) {
            return Some(st);
        }
        self.signal(p, libc::SIGKILL);
        self.wait_exit(p, Duration::from_secs(5))
    }

    /// The log file of a spawned process.
    pub fn log_of(&self, p: ProcId) -> &Path {
        &self.procs[p.0].log
    }

    /// Runs `argv` inside host `host` and returns its stdout (error: status, stdout, stderr).
    pub fn exec(&self, host: usize, argv: &[&str]) -> Result<String, String> {
        netns::run(self.hosts[host].nsenter().args(argv))
    }

    /// Runs `argv` inside VM namespace `vm` of host `host` (`ip netns exec`, which remounts
    /// `/sys` in a mount namespace of its own: fine for ping and ip).
    pub fn vm_exec(&self, host: usize, vm: &str, argv: &[&str]) -> Result<String, String> {
        netns::run(
            self.hosts[host]
                .nsenter()
                .args(["ip", "netns", "exec", vm])
                .args(argv),
        )
    }

    /// Names under host `host`'s private `/run/netns`.
    pub fn host_netns_names(&self, host: usize) -> Vec<String> {
        let d = self.netns_dir(host);
        let mut v: Vec<String> = std::fs::read_dir(&d)
            .map(|r| {
                r.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Host `host`'s `/run/netns`, seen through its holder.
    pub fn netns_dir(&self, host: usize) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/run/netns",
            self.hosts[host].holder.id()
        ))
    }

    /// Opens VM namespace `vm` of host `host` (for sockets made inside it).
    pub fn vm_netns(&self, host: usize, vm: &str) -> Result<Netns, String> {
        let p = self.netns_dir(host).join(vm);
        Netns::open_path(&p).map_err(|e| format!("open {}: {e}", p.display()))
    }

    /// Opens host `host`'s own network namespace.
    pub fn host_netns(&self, host: usize) -> Netns {
        Netns::open(&self.hosts[host].ns).expect("host netns")
    }

    /// One HTTP/1.1 request from the bridge namespace to `addr` (a host's service), JSON in
    /// and out: returns (status, body as JSON, `Null` when empty). `Connection: close`. Over
    /// TLS with [`Cluster::tls`] when set.
    pub fn http(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), String> {
        match &self.tls {
            Some(t) => self.https(addr, t.clone(), method, path, body),
            None => {
                let s = self.connect(addr)?;
                http_on(s, addr, method, path, body)
            }
        }
    }

    fn connect(&self, addr: SocketAddr) -> Result<TcpStream, String> {
        self.bridge
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("connect {addr}: {e}"))
            .and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(70)))
                    .map_err(|e| e.to_string())?;
                Ok(s)
            })
    }

    /// [`Cluster::http`] over TLS with `config` (its certificate, or none), verifying the
    /// server as `addr`'s IP. A refused handshake is an `Err` naming TLS.
    pub fn https(
        &self,
        addr: SocketAddr,
        config: std::sync::Arc<rustls::ClientConfig>,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), String> {
        let mut c = (*config).clone();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = rustls::pki_types::ServerName::from(addr.ip());
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(c), name)
            .map_err(|e| format!("TLS: {e}"))?;
        let mut s = rustls::StreamOwned::new(conn, self.connect(addr)?);
        // The handshake first, so a refusal reads as one.
        while s.conn.is_handshaking() {
            s.conn
                .complete_io(&mut s.sock)
                .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        }
        http_on(s, addr, method, path, body)
    }

    /// Waits until `addr` accepts TCP connections from the bridge, up to `within`.
    pub fn wait_listening(&self, addr: SocketAddr, within: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            let ok = self
                .bridge
                .run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
                .unwrap_or(false);
            if ok {
                return Ok(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "{addr} did not accept connections within {within:?}"
        ))
    }

    /// Pings `to` from VM `vm` on host `host` (one packet, 1 s wait); Ok when answered.
    pub fn ping_once(&self, host: usize, vm: &str, to: Ipv4Addr) -> Result<(), String> {
        self.vm_exec(
            host,
            vm,
            &["ping", "-n", "-q", "-c", "1", "-W", "1", &to.to_string()],
        )
        .map(|_| ())
    }

    /// Pings from VM `vm` until one reply arrives or `within` passes; returns the time taken.
    pub fn ping_until(
        &self,
        host: usize,
        vm: &str,
        to: Ipv4Addr,
        within: Duration,
    ) -> Result<Duration, String> {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < within {
            match self.ping_once(host, vm, to) {
                Ok(()) => return Ok(t0.elapsed()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "no ping reply from {to} in {vm} on h{} within {within:?}: {last}",
            host + 1
        ))
    }

    /// Prints the tail of every log of every host (for a failing test).
    pub fn dump_logs(&self) {
        for (name, dir) in self.log_dirs() {
            let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
                .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default();
            logs.sort();
            for l in logs {
                eprintln!("--- {name} {}:\n{}", l.display(), tail(&l, 60));
            }
        }
    }

    /// (name, log dir) of the bridge and of every host.
    fn log_dirs(&self) -> Vec<(String, PathBuf)> {
        let mut v = vec![("bridge".to_string(), self.bridge_logs())];
        v.extend(self.hosts.iter().map(|h| (h.name.clone(), h.logs())));
        v
    }

    /// Forwards TCP connections made to `listen` inside host `host` to `to` as seen from the
    /// machine (e.g. the PostgreSQL server on the machine's loopback), until the returned
    /// guard is dropped.
    pub fn forward(&self, host: usize, listen: SocketAddr, to: SocketAddr) -> Forward {
        let l = self
            .host_netns(host)
            .run(|| TcpListener::bind(listen))
            .expect("enter the host's namespace")
            .unwrap_or_else(|e| panic!("bind {listen} in h{}: {e}", host + 1));
        l.set_nonblocking(true).expect("nonblocking listener");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let (a, _) = match l.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let _ = a.set_nonblocking(false);
                let Ok(b) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
                    continue;
                };
                for (mut r, mut w) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut r, &mut w);
                        let _ = w.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Forward { stop }
    }

    /// Every pid (other than ours) that is in the bridge's or a host's network namespace, a
    /// host's mount namespace, or a VM namespace of a host.
    fn leftover_pids(&self) -> Vec<i32> {
        let mut nets: HashSet<(u64, u64)> = HashSet::new();
        let mut mnts: HashSet<(u64, u64)> = HashSet::new();
        let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
        nets.extend(id(Path::new(&format!("/run/netns/{}", self.bridge_ns))));
        for (i, h) in self.hosts.iter().enumerate() {
            let hp = h.holder.id();
            nets.extend(id(Path::new(&format!("/run/netns/{}", h.ns))));
            mnts.extend(id(Path::new(&format!("/proc/{hp}/ns/mnt"))));
            for vm in self.host_netns_names(i) {
                nets.extend(id(&self.netns_dir(i).join(vm)));
            }
        }
        let me = std::process::id() as i32;
        let holders: HashSet<i32> = self.hosts.iter().map(|h| h.holder.id() as i32).collect();
        std::fs::read_dir("/proc")
            .map(|r| {
                r.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|&pid| pid != me && !holders.contains(&pid))
                    .filter(|pid| {
                        let net = id(Path::new(&format!("/proc/{pid}/ns/net")));
                        let mnt = id(Path::new(&format!("/proc/{pid}/ns/mnt")));
                        net.is_some_and(|n| nets.contains(&n))
                            || mnt.is_some_and(|m| mnts.contains(&m))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn tail(p: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
            let keep = std::env::temp_dir().join(format!("{}-failed-logs", self.prefix));
            for (name, dir) in self.log_dirs() {
                let to = keep.join(&name);
                if std::fs::create_dir_all(&to).is_ok() {
                    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                        let _ = std::fs::copy(e.path(), to.join(e.file_name()));
                    }
                }
            }
            eprintln!("--- full logs kept in {}", keep.display());
        }
        // SIGTERM to what we started (all at once), then up to 6 s for them to finish.
        for p in &self.procs {
            if let Some(c) = &p.child {
                // SAFETY: kill(2) on a child we spawned and have not reaped.
                unsafe {
                    libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(6);
        for p in &mut self.procs {
            if let Some(c) = p.child.as_mut() {
                while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        // Whatever is left in the hosts' namespaces (grandchildren too): SIGKILL.
        for _ in 0..50 {
            let left = self.leftover_pids();
            if left.is_empty() {
                break;
            }
            for pid in left {
                // SAFETY: kill(2); the pid was just seen in one of our namespaces.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for h in &mut self.hosts {
            let _ = h.holder.kill();
            let _ = h.holder.wait();
        }
        for h in self.hosts.iter().rev() {
            if let Err(e) = Netns::delete(&h.ns) {
                eprintln!("cleanup: delete netns {}: {e}", h.ns);
            }
        }
        if let Err(e) = Netns::delete(&self.bridge_ns) {
            eprintln!("cleanup: delete netns {}: {e}", self.bridge_ns);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops a [`Cluster::forward`] listener when dropped (open connections end with their peers).
pub struct Forward {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Drops the cluster and asserts nothing it made is left: namespaces, processes, temp dir.
pub fn teardown(c: Cluster) {
    let prefix = c.prefix.clone();
    let dir = c.dir.clone();
    let holders: Vec<u32> = c.hosts.iter().map(|h| h.holder.id()).collect();
    drop(c);
    let left = netns::leftover_namespaces(&prefix);
    assert!(left.is_empty(), "namespaces left after teardown: {left:?}");
    assert!(!dir.exists(), "temp dir {} left", dir.display());
    for pid in holders {
        assert!(gone(pid), "holder {pid} still running");
    }
}

/// Whether process `pid` is gone (or a zombie: killed, not yet reaped by whoever inherited
/// it), waiting up to 2 s.
pub fn gone(pid: u32) -> bool {
    let t0 = Instant::now();
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            // The state follows the command name's closing parenthesis.
            Ok(s)
                if s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z')) =>
            {
                return true
            }
            Ok(_) if t0.elapsed() > Duration::from_secs(2) => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// One HTTP/1.1 request on an open connection (closed after the answer).
pub fn http_on<S: Read + Write>(
    mut s: S,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), String> {
    let b = body.map(|v| v.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        b.len()
    );
    if body.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(&b);
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{method} {path}: send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("{method} {path}: read: {e}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{method} {path}: no header end in {raw:?}"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: bad status line in {head:?}"))?;
    let mut payload = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = dechunk(&payload);
    }
    let json = if payload.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&payload).map_err(|e| {
            format!(
                "{method} {path}: body is not JSON ({e}): {}",
                String::from_utf8_lossy(&payload)
            )
        })?
    };
    Ok((status, json))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < eol + 2 + n {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
    out
}

/// Sends `bytes` of [`Pattern`] over TCP from namespace `client` to a listener in `server` on
/// `ip:port` and verifies every byte (tests/util/netns.rs's transfer); returns the time taken.
pub fn tcp_transfer(
    client: &Netns,
    server: &Netns,
    ip: Ipv4Addr,
    port: u16,
    bytes: u64,
) -> Result<Duration, String> {
    netns::tcp_transfer_in((client, "client"), (server, "server"), ip, port, bytes)
        .map(|t| t.elapsed)
}

/// Whether a TCP connection from `client` to `ip:port` (a listener in `server`) is refused or
/// dropped (`Ok(false)`) or gets through and is accepted (`Ok(true)`), waiting at most `wait`.
pub fn tcp_connects(
    client: &Netns,
    server: &Netns,
    ip: Ipv4Addr,
    port: u16,
    wait: Duration,
) -> Result<bool, String> {
    let addr = SocketAddr::from((ip, port));
    let listener = server
        .run(|| TcpListener::bind(addr))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let r = client
        .run(|| TcpStream::connect_timeout(&addr, wait))
        .map_err(|e| e.to_string())?;
    drop(listener);
    Ok(r.is_ok())
}
