//! The `weft` binary: the node agent and the operator's tools, one CLI.
//!
//! Subcommands grow with the issues that bring them; today: `version` and `demo` (the engine on
//! a small example, no kernel or cluster needed).

mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// weft: a Kubernetes CNI with an incremental nftables NetworkPolicy engine.
#[derive(Parser, Debug)]
#[command(name = "weft", version = VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the version and the nft schema version.
    Version,
    /// Compile a small example cluster, print every node's ruleset and the connectivity table
    /// (simulated ruleset, cross-checked against the policy evaluator).
    Demo,
}

/// `0.1.0 (nft schema 1)`: the schema decides whether a restart adopts the kernel's table or
/// replaces it. A test keeps the literal in step with `SCHEMA_VERSION`.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (nft schema 1)");

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None | Some(Command::Version) => {
            println!("weft {VERSION}");
            ExitCode::SUCCESS
        }
        Some(Command::Demo) => match demo::run() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(text) => {
                eprint!("{text}");
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_names_the_current_schema() {
        let want = format!("(nft schema {})", weft_netpol::ruleset::SCHEMA_VERSION);
        assert!(super::VERSION.ends_with(&want), "{}", super::VERSION);
    }
}
