//! Passing file descriptors (TAP queues) between processes over a Unix stream socket with
//! `SCM_RIGHTS`, so the agent can create and configure a vnic and hand its TAP to the dataplane.
//!
//! The functions take any `AsFd` stream (std's or tokio's `UnixStream`); on a nonblocking
//! socket they return `ErrorKind::WouldBlock` like a plain read or write. Each message carries at
//! least one data byte (stream sockets cannot carry ancillary data alone) and at most
//! [`MAX_FDS`] descriptors. Received descriptors are `O_CLOEXEC` (`MSG_CMSG_CLOEXEC`). Rebuild a
//! [`super::tap::Tap`] from a received fd with [`super::tap::Tap::from_fd`].

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::sys;

/// Most descriptors one message carries (one per TAP queue).
pub const MAX_FDS: usize = 16;

/// Control buffer for `MAX_FDS` descriptors, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct FdCmsg([u8; 16 + MAX_FDS * size_of::<RawFd>()]);

/// Sends `data` (non-empty) with `fds` attached; returns the data bytes sent.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if data.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "send_with_fds: need 1+ data bytes and at most {MAX_FDS} fds, got {} bytes, {} fds",
                data.len(),
                fds.len()
            ),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    let mut ctl = FdCmsg([0; 16 + MAX_FDS * size_of::<RawFd>()]);
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = fds.len() * size_of::<RawFd>();
        // SAFETY: CMSG_SPACE/CMSG_LEN are arithmetic; the control buffer (16 + 4*MAX_FDS bytes,
        // 8-aligned) holds a cmsghdr plus `payload` bytes; CMSG_FIRSTHDR points into it because
        // msg_controllen is set first.
        unsafe {
            msg.msg_control = ctl.0.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(payload as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            let dst = libc::CMSG_DATA(c) as *mut RawFd;
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(dst.add(i), fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (the caller's data) and `ctl`, both alive for the call.
        let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        match sys::cvt_size(rc) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            other => return other,
        }
    }
}

/// Receives data into `buf` and up to [`MAX_FDS`] descriptors, appended to `fds`. Returns the
/// data bytes received (0 at end of stream). Fails with `InvalidData` (closing whatever arrived)
/// when the sender attached more descriptors than fit.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut ctl = FdCmsg([0; 16 + MAX_FDS * size_of::<RawFd>()]);
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.0.as_mut_ptr().cast();
    msg.msg_controllen = ctl.0.len() as _;
    let n = loop {
        // SAFETY: `msg` points at `buf` and `ctl`, writable for their full lengths.
        let rc = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match sys::cvt_size(rc) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            other => break other?,
        }
    };
    let start = fds.len();
    // SAFETY: the kernel filled `msg_controllen` bytes of `ctl` with well-formed cmsgs; the
    // CMSG_* macros stay within them. Every SCM_RIGHTS fd is a new descriptor we now own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data_len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..data_len / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        fds.truncate(start);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "recv_with_fds: more than {MAX_FDS} descriptors attached; extra ones were dropped"
            ),
        ));
    }
    Ok(n)
}

/// Convenience for `AsFd` sockets.
pub fn send_fds(sock: &impl AsFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    send_with_fds(sock.as_fd(), data, fds)
}

/// Convenience for `AsFd` sockets.
pub fn recv_fds(sock: &impl AsFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    recv_with_fds(sock.as_fd(), buf, fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn pass_files_over_socketpair() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f1 = tempfile_with(b"one");
        let f2 = tempfile_with(b"two");
        let n = send_fds(&a, b"hello", &[f1.as_fd(), f2.as_fd()]).unwrap();
        assert_eq!(n, 5);
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv_fds(&b, &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 2);
        // The received fd is the same open file: a write through it shows up in f1.
        let mut g = std::fs::File::from(fds.remove(0));
        g.write_all(b"+").unwrap();
        let mut s = String::new();
        f1.rewind().unwrap();
        f1.read_to_string(&mut s).unwrap();
        assert_eq!(s, "one+");
        // Plain data without fds works too; an empty message is refused.
        send_fds(&a, b"x", &[]).unwrap();
        let mut more = Vec::new();
        assert_eq!(recv_fds(&b, &mut buf, &mut more).unwrap(), 1);
        assert!(more.is_empty());
        assert!(send_fds(&a, b"", &[]).is_err());
        drop(a);
        assert_eq!(recv_fds(&b, &mut buf, &mut more).unwrap(), 0);
    }

    fn tempfile_with(content: &[u8]) -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "fabric-fdpass-{}-{}",
            std::process::id(),
            content.iter().map(|&b| b as u32).sum::<u32>()
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(content).unwrap();
        f
    }
}
