//! `RLIMIT_NOFILE`: daemons raise their soft limit to the hard limit at start (DESIGN), and the
//! HTTP layer sizes its connection cap from what is left.

use std::io;

/// The file-descriptor limits of this process: `(soft, hard)`.
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit for the duration of the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit now in force.
pub fn raise_nofile() -> io::Result<u64> {
    let (soft, hard) = nofile()?;
    if soft >= hard {
        return Ok(soft);
    }
    let r = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: `r` is a valid rlimit read by the kernel during the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_reaches_the_hard_limit() {
        let soft = raise_nofile().unwrap();
        let (now, hard) = nofile().unwrap();
        assert_eq!(soft, now);
        assert_eq!(now, hard);
    }
}
