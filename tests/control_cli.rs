//! The `fabric control` command line: help, argument errors, and a small run of the bench.

use std::process::Command;

fn fabric(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_explains_the_service() {
    let out = fabric(&["control", "--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--listen",
        "--store",
        "sqlite:PATH",
        "postgres://",
        "bench",
        "--overlay-nic-tag",
    ] {
        assert!(text.contains(want), "--help lacks {want}:\n{text}");
    }
}

#[test]
fn bad_arguments_name_the_flag() {
    let out = fabric(&["control", "--mac-oui", "01zz00", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mac-oui"));
    let out = fabric(&["control", "--store", "mysql://x", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected sqlite:PATH or postgres://"), "{err}");
}

#[test]
fn bench_runs_and_reports_rates() {
    let out = fabric(&[
        "control",
        "bench",
        "--sequential",
        "60",
        "--concurrent",
        "60",
        "--concurrency",
        "4",
        "--tenants",
        "2",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rates: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_suffix(" provisions/s"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(rates.len(), 2, "{text}");
    assert!(rates.iter().all(|r| *r > 0.0), "{text}");
}
