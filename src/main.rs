//! The `fabric` command.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// fabric: Triton-style overlay networking for containers.
///
/// Every container gets an isolated network stack on a per-tenant VXLAN segment; a userspace
/// dataplane on each host encapsulates, answers ARP/NDP itself and resolves destinations
/// through Portolan (SVP).
#[derive(Parser, Debug)]
#[command(name = "fabric", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run this host of a fabric cluster: with --data DIR --underlay IP, the head (control
    /// plane over TLS, the Docker Remote API on port 2376, Portolan, dataplane and agent,
    /// SQLite and the cluster and accounts CAs in DIR); with
    /// --join https://HEAD:8080 --token TOKEN, another host (dataplane and agent) that joins it. Needs root. SIGTERM stops it
    /// cleanly; running it again on the same DIR resumes as the same server.
    Up(fabric::up::UpArgs),
    /// Run two in-process hosts and two tenants that reuse one subnet, on loopback, as an
    /// unprivileged user; check ARP proxying, lookups, ping, TCP and isolation, and print a
    /// report. Exits non-zero if any expectation fails.
    Demo,
    /// Run the per-host dataplane daemon: forwards for TAP vnics that the agent (or `fabric vnic
    /// add`) creates in container namespaces and attaches over the local control socket, VXLAN
    /// over a UDP underlay, lookups and shootdowns through Portolan. Needs root. SIGTERM drains
    /// and closes the TAPs (a TAP nobody else holds disappears).
    Dataplane(fabric::dataplane::daemon::DataplaneArgs),
    /// Add (create in a namespace and attach), remove or list vnics of a running dataplane.
    #[command(subcommand)]
    Vnic(fabric::dataplane::cli::VnicCmd),
    /// Counters of a running dataplane: global, per vnic, per drop reason, resolver.
    Stats {
        #[command(flatten)]
        control: fabric::dataplane::cli::ControlPath,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Firewall rules in Triton's fwrule language.
    #[command(subcommand)]
    Fw(FwCmd),
    /// Run the control plane: a NAPI-compatible REST service (NIC tags, networks and IPAM,
    /// NICs, fabric VLANs and networks, VMAPI-shaped /vms with placement, /servers with
    /// heartbeats and each host's desired state, FWAPI-style /rules, /metrics) over the store Portolan
    /// serves from; every NIC change writes its Portolan mappings and shootdown events in the
    /// same transaction. With --data DIR it is a cluster head (TLS), and with --docker-listen
    /// it serves the Docker Remote API too. `fabric control bench` measures NIC provisions
    /// per second.
    Control(fabric::control::ControlArgs),
    /// Run the per-host agent: read this server's desired state from the control plane
    /// (`GET /servers/:uuid/desired`), make the host match it — a network namespace named by
    /// each VM's UUID, one TAP vnic per NIC (net0, net1, …) with its MAC, address, MTU and
    /// default route, attached to the dataplane, and the firewall state — and follow the
    /// change feed to stay in step. Reports each VM's state (running/failed) and heartbeats.
    /// Never listens. Only touches namespaces it created (remembered in --state-dir). While
    /// the control plane is unreachable it retries and changes nothing; SIGTERM leaves
    /// everything running. Needs root.
    Agent(fabric::agent::AgentArgs),
    /// The keeper of one run of one container (started by the agent; not for people).
    #[command(hide = true)]
    Shim(fabric::agent::runtime::shim::ShimArgs),
    /// Runs a process in a running container (started by the agent for `docker exec`; not for
    /// people).
    #[command(hide = true, name = "ns-exec")]
    NsExec(fabric::agent::runtime::exec::NsExecArgs),
    /// The cluster's servers, through the control API: list them, or remove one for good
    /// (its certificate is refused, its VMs read lost, Portolan and the hosts stop accepting it).
    #[command(subcommand)]
    Server(fabric::control::cli::ServerCmd),
    /// Foreign VXLAN peers (Linux vxlan hosts, illumos varpd) that are members by address,
    /// through the control API: list, add, remove.
    #[command(subcommand)]
    Peer(fabric::control::cli::PeerCmd),
    /// Print the join token of the cluster whose head runs on --data DIR (the CA digest and a
    /// secret); --rotate replaces the secret. Run it on the head.
    Token(fabric::pki::cli::TokenArgs),
    /// Certificates of the cluster CA: `fabric cert admin` writes an operator certificate,
    /// `fabric cert ls` lists them, `fabric cert revoke SERIAL` refuses one.
    #[command(subcommand)]
    Cert(fabric::pki::cli::CertCmd),
    /// Docker accounts (run on the head with --data DIR, or --control https://HEAD:8080
    /// --tls-dir OPERATOR_DIR): `add` creates one and writes its client certificate for the
    /// stock docker CLI, `cert` issues another, `ls` lists, `rm` removes (its certificates are
    /// refused from then on).
    #[command(subcommand)]
    Account(fabric::docker::cli::AccountCmd),
    /// Docker networks shared with every account (run on the head with --data DIR, or
    /// --control https://HEAD:8080 --tls-dir OPERATOR_DIR): `share NAME --subnet CIDR` makes
    /// one (its own VNI; every account lists and uses it, none can remove it), `unshare NAME`
    /// removes it, `shared` lists them.
    #[command(subcommand)]
    Network(fabric::docker::shared::NetworkCmd),
}

#[derive(Subcommand, Debug)]
enum FwCmd {
    /// Parse and validate fwrule rules (no daemon needed): print each rule's canonical text, or
    /// with --json its parse tree, or the error with its class (syntax, value, version, model).
    /// Exits 1 if any rule was rejected.
    Parse(fabric::firewall::cli::FwParseArgs),
    /// Send the whole firewall state (VM directory + rules, JSON) to a running dataplane. It is
    /// validated and compiled as a whole: any bad rule rejects it (the error names the rule's
    /// uuid) and the old state stays. Established flows survive unless the new rules deny them.
    Apply(fabric::dataplane::cli::FwApplyArgs),
    /// Show a vnic's compiled rule set in evaluation order, canonical text, with hit counters.
    Ls(fabric::dataplane::cli::FwLsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `fabric up` says where each part listens (info) unless RUST_LOG says otherwise.
    let default = if matches!(cli.cmd, Cmd::Up(_)) {
        tracing_subscriber::filter::LevelFilter::INFO
    } else {
        tracing_subscriber::filter::LevelFilter::ERROR
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::builder()
                .with_default_directive(default.into())
                .from_env_lossy(),
        )
        .with_writer(std::io::stderr)
        // No colour codes in log files (`fabric up` sends its children's stderr to files).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.cmd {
        Cmd::Up(args) => edge("fabric up", fabric::up::run(args)),
        Cmd::Demo => match fabric::dataplane::demo::run() {
            Ok(report) => {
                print!("{}", report.render());
                if report.ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("fabric demo: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Control(args) => match fabric::control::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fabric control: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Agent(args) => edge("fabric agent", fabric::agent::run(args)),
        Cmd::Shim(args) => edge("fabric shim", fabric::agent::runtime::shim::run(args)),
        Cmd::NsExec(args) => match fabric::agent::runtime::exec::ns_exec_main(args) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("{e:#}");
                std::process::exit(126)
            }
        },
        Cmd::Server(cmd) => printed("fabric server", fabric::control::cli::server(cmd)),
        Cmd::Peer(cmd) => printed("fabric peer", fabric::control::cli::peer(cmd)),
        Cmd::Token(args) => edge("fabric token", fabric::pki::cli::token(&args)),
        Cmd::Cert(cmd) => edge("fabric cert", fabric::pki::cli::cert(&cmd)),
        Cmd::Account(cmd) => printed("fabric account", fabric::docker::cli::account(cmd)),
        Cmd::Network(cmd) => printed("fabric network", fabric::docker::shared::network(cmd)),
        Cmd::Dataplane(args) => edge("fabric dataplane", fabric::dataplane::daemon::run(args)),
        Cmd::Vnic(cmd) => edge("fabric vnic", fabric::dataplane::cli::vnic(cmd)),
        Cmd::Stats { control, json } => {
            edge("fabric stats", fabric::dataplane::cli::stats(control, json))
        }
        Cmd::Fw(FwCmd::Apply(args)) => {
            edge("fabric fw apply", fabric::dataplane::cli::fw_apply(args))
        }
        Cmd::Fw(FwCmd::Ls(args)) => edge("fabric fw ls", fabric::dataplane::cli::fw_ls(args)),
        Cmd::Fw(FwCmd::Parse(args)) => {
            match fabric::firewall::cli::run_parse(&args, &mut std::io::stdout().lock()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("fabric fw parse: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Print a subcommand's output, or its error chain, and pick the exit code.
fn printed(what: &str, r: anyhow::Result<String>) -> ExitCode {
    edge(what, r.map(|out| print!("{out}")))
}

/// Print an error chain for a failed subcommand and pick the exit code.
fn edge(what: &str, r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
