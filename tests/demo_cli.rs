//! `fabric demo` as a user runs it: the binary exits 0 and prints a passing report.

use std::process::Command;

#[test]
fn demo_runs_and_passes() {
    let out = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .arg("demo")
        .output()
        .expect("run fabric demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PASS 11/11 expectations met"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    for needle in [
        "ARP answered locally",
        "0 ARP and 0 broadcast frames on the underlay",
        "isolation: red-a -> 10.0.0.3",
        "content verified",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

#[test]
fn help_explains_the_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .arg("--help")
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(s.contains("demo"), "{s}");
}
