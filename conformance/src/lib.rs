//! weft's NetworkPolicy case files and their runner (DESIGN.md §7, format in CASES.md).
//!
//! This crate owns the case-file format, truth tables, the replay rule and the reports. That
//! logic never touches a cluster or the kernel: targets do, through the
//! [`runner::ClusterDriver`] and [`runner::Prober`] traits. [`oracle::Oracle`] is the in-memory
//! target, backed by the policy evaluator of weft-netpol; [`cluster`] is the real one (a
//! cluster in network namespaces, pods attached through libcni and weft-cni).
//!
//! Flow: [`case::parse`] turns YAML into checked [`case::CaseFile`]s → [`runner::run_file`]
//! sets each case up on a target, fills policy templates ([`template`]), applies steps, probes
//! whole matrices and judges them ([`matrix`]) → [`report`] prints upstream-style truth tables,
//! the `N passed, M failed, K skipped` line, and JSON. [`command::run_command`] is
//! `weft conformance run`.
//!
//! ```
//! use weft_conformance::{case, oracle::Oracle, runner};
//!
//! let file = case::parse(r#"
//! schema_version: 2
//! cases:
//! - id: open-namespace
//!   server: {ports: [80], protocols: [TCP]}
//!   namespaces: {x: {labels: {}}}
//!   pods:
//!     x/a: {labels: {pod: a}}
//!     x/b: {labels: {pod: b}}
//!   pod_order: [x/a, x/b]
//!   ignore_loopback: true
//!   expectations:
//!   - {port: 80, protocol: TCP, matrix: ['..', '..']}
//! "#).expect("a valid case file");
//! let report = runner::run_file(&file, &mut Oracle::new(), &runner::RunOptions::default(), &mut |_| {});
//! assert_eq!(report.summary.to_string(), "1 passed, 0 failed, 0 skipped");
//! ```

pub mod case;
pub mod cluster;
pub mod command;
pub mod matrix;
pub mod oracle;
pub mod report;
pub mod runner;
pub mod template;
