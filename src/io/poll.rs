//! Readiness waiting for the hot-path threads: a thin level-triggered `epoll` wrapper and an
//! `eventfd` [`Waker`] to interrupt a waiting thread (shutdown, new vnic).
//!
//! The dataplane crate forbids `unsafe`, so it waits on TAP and underlay fds through this. The
//! event buffer is allocated once ([`Events::with_capacity`]); [`Poller::wait`] allocates nothing.

use std::io;
use std::mem::zeroed;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::sys;

/// Failure of an epoll or eventfd call, naming the syscall.
#[derive(Debug, thiserror::Error)]
#[error("{op} (fd {fd}): {source}")]
pub struct PollError {
    /// The syscall, e.g. `epoll_ctl(ADD)`.
    pub op: &'static str,
    /// The fd concerned (-1 when none).
    pub fd: RawFd,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// Which readiness to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Readable.
    Read,
    /// Writable.
    Write,
    /// Either.
    Both,
}

impl Interest {
    fn bits(self) -> u32 {
        match self {
            Self::Read => libc::EPOLLIN as u32,
            Self::Write => libc::EPOLLOUT as u32,
            Self::Both => (libc::EPOLLIN | libc::EPOLLOUT) as u32,
        }
    }
}

/// One readiness report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The token given at registration.
    pub token: u64,
    /// Readable (or error/hang-up, which a read will report).
    pub readable: bool,
    /// Writable.
    pub writable: bool,
}

/// A reusable buffer of readiness events.
pub struct Events {
    buf: Vec<libc::epoll_event>,
    len: usize,
}

impl Events {
    /// Room for `n` events per wait (at least 1).
    pub fn with_capacity(n: usize) -> Self {
        // SAFETY: epoll_event is plain data; all-zero is valid.
        let zero: libc::epoll_event = unsafe { zeroed() };
        Self {
            buf: vec![zero; n.max(1)],
            len: 0,
        }
    }

    /// The events of the last wait.
    pub fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        self.buf[..self.len].iter().map(|e| {
            let ev = e.events;
            let err = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
            Event {
                token: e.u64,
                readable: ev & (libc::EPOLLIN as u32 | err) != 0,
                writable: ev & libc::EPOLLOUT as u32 != 0,
            }
        })
    }

    /// Number of events of the last wait.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the last wait returned no event.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A level-triggered epoll instance.
#[derive(Debug)]
pub struct Poller {
    ep: OwnedFd,
}

impl Poller {
    /// Creates an epoll instance (`EPOLL_CLOEXEC`).
    pub fn new() -> Result<Self, PollError> {
        // SAFETY: epoll_create1 takes only flags.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        let fd = sys::cvt(fd).map_err(|source| PollError {
            op: "epoll_create1",
            fd: -1,
            source,
        })?;
        // SAFETY: fresh descriptor owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { ep: owned })
    }

    /// Registers `fd` with `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64, interest: Interest) -> Result<(), PollError> {
        self.ctl(
            libc::EPOLL_CTL_ADD,
            "epoll_ctl(ADD)",
            fd.as_raw_fd(),
            token,
            interest,
        )
    }

    /// Changes the token or interest of a registered `fd`.
    pub fn modify(
        &self,
        fd: BorrowedFd<'_>,
        token: u64,
        interest: Interest,
    ) -> Result<(), PollError> {
        self.ctl(
            libc::EPOLL_CTL_MOD,
            "epoll_ctl(MOD)",
            fd.as_raw_fd(),
            token,
            interest,
        )
    }

    /// Unregisters `fd` (closing an fd unregisters it too).
    pub fn delete(&self, fd: BorrowedFd<'_>) -> Result<(), PollError> {
        self.ctl(
            libc::EPOLL_CTL_DEL,
            "epoll_ctl(DEL)",
            fd.as_raw_fd(),
            0,
            Interest::Read,
        )
    }

    fn ctl(
        &self,
        op: i32,
        name: &'static str,
        fd: RawFd,
        token: u64,
        i: Interest,
    ) -> Result<(), PollError> {
        let mut ev = libc::epoll_event {
            events: i.bits(),
            u64: token,
        };
        // SAFETY: `ev` is a live epoll_event; the kernel copies it.
        let rc = unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev) };
        sys::cvt(rc).map(|_| ()).map_err(|source| PollError {
            op: name,
            fd,
            source,
        })
    }

    /// Waits for readiness at most `timeout` (`None`: forever); fills `events`, returns the count.
    /// An interrupted wait (`EINTR`) returns 0.
    pub fn wait(&self, events: &mut Events, timeout: Option<Duration>) -> Result<usize, PollError> {
        let ms = match timeout {
            None => -1,
            Some(t) => t.as_millis().min(i32::MAX as u128) as i32,
        };
        let cap = events.buf.len().min(i32::MAX as usize) as i32;
        // SAFETY: `events.buf` has room for `cap` epoll_events.
        let rc = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), events.buf.as_mut_ptr(), cap, ms) };
        match sys::cvt(rc) {
            Ok(n) => {
                events.len = n as usize;
                Ok(n as usize)
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                events.len = 0;
                Ok(0)
            }
            Err(source) => Err(PollError {
                op: "epoll_wait",
                fd: self.ep.as_raw_fd(),
                source,
            }),
        }
    }
}

/// An `eventfd` that makes a [`Poller`] wait return; cheap to signal from any thread.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// Creates a nonblocking eventfd.
    pub fn new() -> Result<Self, PollError> {
        // SAFETY: eventfd takes only an initial value and flags.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        let fd = sys::cvt(fd).map_err(|source| PollError {
            op: "eventfd",
            fd: -1,
            source,
        })?;
        // SAFETY: fresh descriptor owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd: owned })
    }

    /// Makes the fd readable until [`Self::reset`].
    pub fn wake(&self) -> Result<(), PollError> {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of a live u64.
        let rc = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        match sys::cvt_size(rc) {
            Ok(_) => Ok(()),
            // Counter saturated: it is readable anyway.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()),
            Err(source) => Err(PollError {
                op: "write(eventfd)",
                fd: self.fd.as_raw_fd(),
                source,
            }),
        }
    }

    /// Clears the readable state.
    pub fn reset(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing pending) is fine to ignore.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waker_wakes_poller() {
        let p = Poller::new().unwrap();
        let w = Waker::new().unwrap();
        p.add(w.as_fd(), 7, Interest::Read).unwrap();
        let mut ev = Events::with_capacity(4);
        assert_eq!(p.wait(&mut ev, Some(Duration::from_millis(0))).unwrap(), 0);
        w.wake().unwrap();
        assert_eq!(
            p.wait(&mut ev, Some(Duration::from_millis(1000))).unwrap(),
            1
        );
        let e = ev.iter().next().unwrap();
        assert_eq!((e.token, e.readable), (7, true));
        w.reset();
        assert_eq!(p.wait(&mut ev, Some(Duration::from_millis(0))).unwrap(), 0);
        p.delete(w.as_fd()).unwrap();
    }
}
