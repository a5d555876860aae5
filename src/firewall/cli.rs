//! `fabric fw parse`: parse fwrule rules without a daemon.
//!
//! For each RULE argument, prints the canonical text; with `--json`, one JSON object per line,
//! `{"parse": <tree in fwrule's parse() shape>, "canonical": "…"}`, or for a rejected rule
//! `{"error": {"class": "syntax|value|version|model", "message": "…"}}` (plain mode prints
//! `error (<class>): <message>`). Returns `Ok(false)` if any rule was rejected, so the caller
//! exits non-zero. `--max-version` and `--enforce-subnet-mask` mean what fwrule's
//! `maxVersion` and `enforceSubnetMask` mean.
//!
//! Wiring into `src/main.rs` (a subcommand enum with a `Fw { #[command(subcommand)] cmd }`
//! holding `Parse(FwParseArgs)`):
//! ```ignore
//! FwCmd::Parse(args) => {
//!     let ok = fabric::firewall::cli::run_parse(&args, &mut std::io::stdout().lock())?;
//!     std::process::exit(if ok { 0 } else { 1 });
//! }
//! ```

use std::io::Write;

use serde_json::json;

use super::rule::{parse_tree, FwRule, ParseOptions};

/// Arguments of `fabric fw parse`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FwParseArgs {
    /// Print `{"parse": …, "canonical": …}` (or `{"error": …}`) per rule, one JSON per line.
    #[arg(long)]
    pub json: bool,
    /// Newest fwrule language version to accept (1–4; fwrule's `maxVersion`; 0 means current).
    #[arg(long = "max-version", value_name = "N")]
    pub max_version: Option<u32>,
    /// Reject subnets with bits set right of the mask (fwrule's `enforceSubnetMask`).
    #[arg(long = "enforce-subnet-mask")]
    pub enforce_subnet_mask: bool,
    /// Rules to parse (quote each one).
    #[arg(value_name = "RULE", required = true)]
    pub rules: Vec<String>,
}

/// Parses every rule of `args`, printing one result per rule to `out`; `Ok(false)` if any
/// rule was rejected. Errors are only I/O errors on `out`.
pub fn run_parse(args: &FwParseArgs, out: &mut impl Write) -> anyhow::Result<bool> {
    let opts = ParseOptions {
        max_version: args.max_version,
        enforce_subnet_mask: args.enforce_subnet_mask,
    };
    let mut all_ok = true;
    for text in &args.rules {
        let result = FwRule::create(text, &opts)
            .and_then(|rule| parse_tree(text, &opts).map(|tree| (tree, rule.text())));
        match (result, args.json) {
            (Ok((tree, canonical)), true) => {
                // Written by hand to keep the documented key order (parse, then canonical) and
                // the tree's own order (from, to, action, protocol, priority).
                writeln!(
                    out,
                    "{{\"parse\":{},\"canonical\":{}}}",
                    serde_json::to_string(&tree)?,
                    serde_json::to_string(&canonical)?
                )?
            }
            (Ok((_, canonical)), false) => writeln!(out, "{canonical}")?,
            (Err(e), json_mode) => {
                all_ok = false;
                if json_mode {
                    writeln!(
                        out,
                        "{}",
                        json!({"error": {"class": e.class(), "message": e.to_string()}})
                    )?;
                } else {
                    writeln!(out, "error ({}): {e}", e.class())?;
                }
            }
        }
    }
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FwParseArgs,
    }

    fn run(argv: &[&str]) -> (bool, String) {
        let cli = Cli::try_parse_from(std::iter::once("fw-parse").chain(argv.iter().copied()))
            .expect("arguments parse");
        let mut out = Vec::new();
        let ok = run_parse(&cli.args, &mut out).expect("writes");
        (ok, String::from_utf8(out).expect("utf-8"))
    }

    #[test]
    fn canonical_and_json_output() {
        let (ok, out) = run(&["from any to all vms allow tcp ports 443, 80"]);
        assert!(ok);
        assert_eq!(
            out,
            "FROM any TO all vms ALLOW tcp (PORT 80 AND PORT 443)\n"
        );
        let (ok, out) = run(&["--json", "FROM any TO all vms ALLOW tcp PORT 22 PRIORITY 3"]);
        assert!(ok);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(
            v["canonical"],
            "FROM any TO all vms ALLOW tcp PORT 22 PRIORITY 3"
        );
        assert_eq!(v["parse"]["protocol"]["targets"][0], 22);
        assert_eq!(v["parse"]["priority"], 3);
        assert!(
            out.starts_with(r#"{"parse":{"from":[["wildcard","any"]],"to":[["wildcard","vmall"]],"action":"allow","#),
            "{out}"
        );
    }

    #[test]
    fn errors_and_options() {
        let (ok, out) = run(&[
            "--json",
            "--max-version",
            "1",
            "FROM any TO all vms ALLOW tcp PORT 22",
            "FROM any TO all vms ALLOW tcp PORTS 1-2",
            "FROM any TO any ALLOW tcp PORT 1",
        ]);
        assert!(!ok);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0]["canonical"].is_string());
        assert_eq!(lines[1]["error"]["class"], "version");
        assert_eq!(lines[2]["error"]["class"], "model");
        let (ok, out) = run(&[
            "--enforce-subnet-mask",
            "FROM subnet 10.8.0.0/5 TO all vms ALLOW tcp PORT 1",
        ]);
        assert!(!ok);
        assert!(
            out.starts_with(
                "error (value): Subnet \"10.8.0.0/5\" is invalid (bits set to right of mask)"
            ),
            "{out}"
        );
        let (ok, out) = run(&["FROM any TO all vms DENY tcp PORT 1"]);
        assert!(!ok);
        assert!(
            out.starts_with("error (syntax): syntax error at character 20: unexpected 'DENY'"),
            "{out}"
        );
    }
}
