//! Entering a running container to run one more process in it (`docker exec`), the syscalls.
//!
//! Debian's runc 1.1.5 cannot do it for our containers: its `exec` joins the container's user
//! namespace first and then fails to join the network namespace, which the agent made and the
//! host's user namespace owns (`setns … Operation not permitted`). So the order here is the one
//! that works (as util-linux `nsenter` does): as root of the host, join the container's cgroups,
//! then its network, IPC, UTS, PID and mount namespaces, its user namespace last; then a child
//! (so the PID namespace applies) takes the container's root directory, working directory,
//! user and groups, drops to the container's capability set, sets `no_new_privs` and execs.
//! The parent waits and exits with the child's status (128 + signal for a signalled one).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// What to run, and as whom, in the container whose init is `pid`.
#[derive(Debug, Clone)]
pub struct Target {
    /// The container's init process on the host.
    pub pid: i32,
    /// Absolute path of the program inside the container.
    pub program: String,
    /// argv (argv[0] included).
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside.
    pub cwd: String,
    /// uid inside.
    pub uid: u32,
    /// gid inside.
    pub gid: u32,
    /// Capability numbers the process keeps (bounding set; also effective/permitted for uid 0).
    pub caps: Vec<u32>,
}

/// Capability numbers by name (`CAP_` prefix optional), as in `linux/capability.h`.
pub fn cap_number(name: &str) -> Option<u32> {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let n = name.strip_prefix("CAP_").unwrap_or(name);
    NAMES.iter().position(|x| *x == n).map(|i| i as u32)
}

/// Moves this process into the cgroups of `pid` (every hierarchy it can write; best effort:
/// the caller is not refused a process because a controller is missing).
fn join_cgroups(pid: i32) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return;
    };
    let me = std::process::id().to_string();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrl, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let dir = match ctrl {
            "" => "unified".to_string(),
            c => c.strip_prefix("name=").unwrap_or(c).to_string(),
        };
        let f = Path::new("/sys/fs/cgroup")
            .join(dir)
            .join(path.trim_start_matches('/'))
            .join("cgroup.procs");
        let _ = std::fs::write(f, &me);
    }
}

/// A namespace of the container to join, or `None` when this process is in it already (a
/// container without that namespace of its own: joining one's own user namespace is EINVAL).
/// Decided before any join: once in the container's mount namespace, `/proc/self` is another
/// PID namespace's procfs.
fn open_ns(pid: i32, name: &str) -> io::Result<Option<File>> {
    use std::os::unix::fs::MetadataExt;
    let f = File::open(format!("/proc/{pid}/ns/{name}")).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("container init {pid} ({name} namespace): {e}"),
        )
    })?;
    let ours = std::fs::metadata(format!("/proc/self/ns/{name}"))?;
    let theirs = f.metadata()?;
    Ok((theirs.ino() != ours.ino() || theirs.dev() != ours.dev()).then_some(f))
}

fn setns(f: &Option<File>, kind: libc::c_int, what: &str) -> io::Result<()> {
    let Some(f) = f else {
        return Ok(());
    };
    // SAFETY: a valid namespace descriptor and one of the CLONE_NEW* flags.
    if unsafe { libc::setns(f.as_raw_fd(), kind) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("joining the container's {what} namespace: {e}"),
        ));
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;
const LAST_CAP: u32 = 63;

/// Runs `t` in the container; returns the exit code to exit with. Call it from a
/// single-threaded process (joining a user namespace requires it).
pub fn run(t: &Target) -> io::Result<i32> {
    let ns = |n: &str| open_ns(t.pid, n);
    let (net, ipc, uts, pidns, mnt, user) = (
        ns("net")?,
        ns("ipc")?,
        ns("uts")?,
        ns("pid")?,
        ns("mnt")?,
        ns("user")?,
    );
    let root = File::open(format!("/proc/{}/root", t.pid))?;
    join_cgroups(t.pid);
    setns(&net, libc::CLONE_NEWNET, "network")?;
    setns(&ipc, libc::CLONE_NEWIPC, "IPC")?;
    setns(&uts, libc::CLONE_NEWUTS, "UTS")?;
    setns(&pidns, libc::CLONE_NEWPID, "PID")?;
    setns(&mnt, libc::CLONE_NEWNS, "mount")?;
    setns(&user, libc::CLONE_NEWUSER, "user")?;

    let mut cmd = Command::new(&t.program);
    cmd.arg0(t.argv.first().map(String::as_str).unwrap_or(&t.program))
        .args(t.argv.iter().skip(1))
        .env_clear()
        .envs(t.env.iter().map(|(k, v)| (k, v)));
    let root_fd = root.as_raw_fd();
    let cwd = CString::new(t.cwd.clone()).map_err(|_| io::Error::other("cwd contains NUL"))?;
    let (uid, gid) = (t.uid, t.gid);
    let mut keep: u64 = 0;
    for c in &t.caps {
        if *c <= LAST_CAP {
            keep |= 1 << c;
        }
    }
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls on values prepared above (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0
                || libc::fchdir(root_fd) < 0
                || libc::chroot(c".".as_ptr()) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::chdir(cwd.as_ptr()) < 0 && libc::chdir(c"/".as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            // The bounding set first (needs CAP_SETPCAP, which root of the namespace has).
            let mut cap = 0;
            while cap <= LAST_CAP {
                if keep & (1 << cap) == 0 {
                    let r = libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
                    if r < 0 && *libc::__errno_location() != libc::EINVAL {
                        return Err(io::Error::last_os_error());
                    }
                }
                cap += 1;
            }
            if libc::setgroups(0, std::ptr::null()) < 0
                || libc::setresgid(gid, gid, gid) < 0
                || libc::setresuid(uid, uid, uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // uid 0 keeps exactly the container's set; another uid has none left (setresuid
            // cleared them), as with Docker.
            let set = if uid == 0 { keep } else { 0 };
            let mut hdr = CapHeader {
                version: CAP_V3,
                pid: 0,
            };
            let data = [
                CapData {
                    effective: set as u32,
                    permitted: set as u32,
                    inheritable: 0,
                },
                CapData {
                    effective: (set >> 32) as u32,
                    permitted: (set >> 32) as u32,
                    inheritable: 0,
                },
            ];
            if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("starting {} in the container: {e}", t.program),
        )
    })?;
    let st = child.wait()?;
    use std::os::unix::process::ExitStatusExt;
    Ok(st
        .code()
        .or_else(|| st.signal().map(|s| 128 + s))
        .unwrap_or(255))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names() {
        assert_eq!(cap_number("CAP_CHOWN"), Some(0));
        assert_eq!(cap_number("NET_RAW"), Some(13));
        assert_eq!(cap_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(cap_number("CAP_SETFCAP"), Some(31));
        assert_eq!(cap_number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(cap_number("CAP_NOPE"), None);
    }
}
