//! Process plumbing for supervisors (`fabric up`): signals, the effective UID, and children that
//! die with their supervisor.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sends signal `sig` (e.g. `libc::SIGTERM`) to process `pid`.
pub fn signal(pid: u32, sig: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pid {pid} out of range"),
        )
    })?;
    // SAFETY: kill(2) takes plain integers; a bad pid or signal is reported through errno.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the child started by `cmd` receive SIGKILL when the thread that spawns it exits
/// (`PR_SET_PDEATHSIG`): spawn from a thread that lives as long as the supervisor, so a
/// supervisor killed with SIGKILL leaves no orphan holding its sockets and devices.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_zero_probes_existence() {
        signal(std::process::id(), 0).expect("this process exists");
        assert!(signal(u32::MAX, 0).is_err());
    }

    #[test]
    fn child_dies_with_its_spawning_thread() {
        let pid = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            die_with_parent(&mut cmd);
            let child = cmd.spawn().expect("spawn sleep");
            let pid = child.id();
            std::mem::forget(child);
            pid
        })
        .join()
        .unwrap();
        // The thread is gone: the child gets SIGKILL; it stays a zombie of ours until reaped.
        let mut status = 0;
        // SAFETY: waitpid on our own child's pid with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        assert_eq!(rc, pid as libc::pid_t);
        assert!(libc::WIFSIGNALED(status));
        assert_eq!(libc::WTERMSIG(status), libc::SIGKILL);
    }
}
