// The root check every privileged integration test starts with. Included by `netns.rs` and
// used directly (`#[path = "util/root.rs"] mod root;`) by the `io_*` tests.

/// True when running as root; otherwise prints why and returns false, except under CI=true,
/// where skipping is a failure (CI runs as root: a skip there would hide a broken test).
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and CI=true forbids skipping");
    }
    eprintln!("skipping {test}: not root, cannot create network namespaces or TAP devices");
    false
}
