use clap::{Parser, Subcommand};

/// fabric: Triton-style overlay networking for containers.
#[derive(Parser, Debug)]
#[command(name = "fabric", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run two in-process hosts and two tenants on loopback and report what the dataplane did.
    Demo,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Demo => anyhow::bail!("demo: not built yet"),
    }
}
