//! Pseudo-terminals and sessions for container processes (`crate::agent::runtime`): a pty
//! pair, its window size, and children that start their own session (optionally with a
//! terminal as their controlling terminal).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Opens a pty pair of `rows` × `cols`: (master, slave), both close-on-exec.
pub fn openpty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut m = -1;
    let mut s = -1;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: the out-pointers are valid; a null name and termios are allowed.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty returned two fresh descriptors that nothing else owns.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    for fd in [&m, &s] {
        // SAFETY: a valid descriptor; F_SETFD takes an int flag.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((m, s))
}

/// Sets a pty's window size (the kernel then sends SIGWINCH to its foreground process group).
pub fn set_winsize(fd: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: a valid descriptor and a valid winsize for TIOCSWINSZ.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the child start a new session (so it outlives its parent's session and gets no
/// signals meant for it); with `ctty`, its stdin (a pty slave) becomes its controlling
/// terminal.
pub fn new_session(cmd: &mut Command, ctty: bool) {
    // SAFETY: setsid and ioctl are async-signal-safe and the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if ctty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_pty_carries_bytes_and_sizes() {
        let (m, s) = openpty(24, 80).unwrap();
        set_winsize(&m, 40, 120).unwrap();
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: valid descriptor and out-pointer.
        assert_eq!(
            unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) },
            0
        );
        assert_eq!((ws.ws_row, ws.ws_col), (40, 120));
        let mut mw = std::fs::File::from(m.try_clone().unwrap());
        mw.write_all(b"hi\n").unwrap();
        let mut sr = std::fs::File::from(s);
        let mut b = [0u8; 3];
        sr.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi\n");
    }
}
