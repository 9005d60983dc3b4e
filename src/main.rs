//! The `weft` binary: the node agent and the operator's tools, one CLI.

use clap::{Parser, Subcommand};

/// weft: a Kubernetes CNI with an incremental nftables NetworkPolicy engine.
#[derive(Parser, Debug)]
#[command(name = "weft", version = version_text(), about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the version and the nft schema version.
    Version,
}

fn version_text() -> &'static str {
    concat!(env!("CARGO_PKG_VERSION"), " (nft schema ", "1", ")")
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Version) | None => {
            println!("weft {}", version_text());
        }
    }
}
