//! `weft conformance run --cases FILE [--json OUT] [--oracle] [--ipv6] [--verbose]`: load,
//! run, print as each case finishes, write JSON, return the counts.
//!
//! The binary parses its arguments into [`RunArgs`], calls [`run_command`] with stdout, and
//! exits 0 when `summary.failed == 0`, 1 otherwise, 2 on a [`CommandError`].

use std::io::Write;
use std::path::PathBuf;

use weft_netpol::ruleset::Family;

use crate::case::{self, CaseFile, LoadError};
use crate::oracle::Oracle;
use crate::report::Summary;
use crate::runner::{self, ClusterDriver, Prober, RunOptions};

/// Arguments of `weft conformance run`.
#[derive(Clone, Debug)]
pub struct RunArgs {
    /// The case file.
    pub cases: PathBuf,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
    /// Replay against the in-memory oracle instead of a cluster.
    pub oracle: bool,
    /// Replay in IPv6-only mode (templates and unfamilied checks use IPv6).
    pub ipv6: bool,
    /// Print the tables of every check, not only of failed ones.
    pub verbose: bool,
    /// Probes in flight at once.
    pub parallelism: usize,
}

/// Why a run could not be made or reported.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The case file cannot be read or is invalid.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// No cluster target exists yet.
    #[error(
        "no cluster harness in this build yet: pass --oracle to replay the cases against the \
         policy evaluator"
    )]
    NoCluster,
    /// Writing the text report failed.
    #[error("writing the report: {0}")]
    Output(#[source] std::io::Error),
    /// Writing the JSON report failed.
    #[error("writing {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Runs `weft conformance run` with the arguments, printing to `out`.
pub fn run_command(args: &RunArgs, out: &mut dyn Write) -> Result<Summary, CommandError> {
    let file = case::load(&args.cases)?;
    if !args.oracle {
        return Err(CommandError::NoCluster);
    }
    let options = RunOptions {
        family: if args.ipv6 { Family::V6 } else { Family::V4 },
        parallelism: args.parallelism.max(1),
    };
    run_and_report(&file, &mut Oracle::new(), &options, args, out)
}

/// Runs a loaded file on any target, printing each case as it finishes, then the summary line;
/// writes the JSON report if asked. The cluster harness calls this with its own target.
pub fn run_and_report<T>(
    file: &CaseFile,
    target: &mut T,
    options: &RunOptions,
    args: &RunArgs,
    out: &mut dyn Write,
) -> Result<Summary, CommandError>
where
    T: ClusterDriver + Prober + Sync,
{
    let mut printed = Ok(());
    let report = runner::run_file(file, target, options, &mut |case| {
        if printed.is_ok() {
            printed = case.write_text(out, args.verbose);
        }
    });
    printed.map_err(CommandError::Output)?;
    writeln!(out, "{}", report.summary).map_err(CommandError::Output)?;
    if let Some(path) = &args.json {
        let json = report.to_json().map_err(|e| CommandError::Json {
            path: path.clone(),
            source: e.into(),
        })?;
        std::fs::write(path, json).map_err(|source| CommandError::Json {
            path: path.clone(),
            source,
        })?;
    }
    Ok(report.summary)
}
