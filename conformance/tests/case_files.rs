//! Every case file under `conformance/cases/` parses and passes against the oracle, in both
//! families (IPv4, and the IPv6-only replay mode that fills templates with IPv6 addresses).

use std::path::PathBuf;

use weft_conformance::case;
use weft_conformance::oracle::Oracle;
use weft_conformance::report::Outcome;
use weft_conformance::runner::{self, RunOptions};
use weft_netpol::ruleset::Family;

fn case_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("conformance/cases exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no case files in {}", dir.display());
    files
}

fn run_all(family: Family) {
    let mut failures = Vec::new();
    for path in case_files() {
        let file = case::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let options = RunOptions {
            family,
            ..RunOptions::default()
        };
        let report = runner::run_file(&file, &mut Oracle::new(), &options, &mut |_| {});
        let mut text = Vec::new();
        report.write_text(&mut text, false).expect("in memory");
        let text = String::from_utf8(text).expect("utf-8");
        println!("{} ({family:?}):\n{text}", path.display());
        for case in &report.cases {
            if case.result != Outcome::Passed {
                failures.push(format!(
                    "{} {}: {:?} {:?}",
                    path.display(),
                    case.id,
                    case.result,
                    case.reason
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "cases not passing against the oracle:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_case_file_passes_against_the_oracle_over_ipv4() {
    run_all(Family::V4);
}

#[test]
fn every_case_file_passes_against_the_oracle_in_ipv6_only_mode() {
    run_all(Family::V6);
}

#[test]
fn the_upstream_file_encodes_every_it_once() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cases/upstream-netpol.yaml");
    let file = case::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        file.cases.len(),
        49,
        "v1.37.2 has 49 Its under [Feature:NetworkPolicy]"
    );
    let mut names: Vec<&str> = file
        .cases
        .iter()
        .filter_map(|c| c.name.as_deref())
        .collect();
    assert_eq!(names.len(), 49, "every upstream case names its It");
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 49, "no It is encoded twice");
}
