//! What a run found: per case, per check, per cell; as text (upstream's truth tables) or JSON.
//!
//! Text: one line per case (`PASS`, `FAIL`, `SKIP` with the reason); for a failed check the
//! expected, observed and comparison tables; at the end `N passed, M failed, K skipped`. JSON
//! (`--json OUT`) carries the same, with every cell of every check.

use std::fmt;
use std::io::{self, Write};

use serde::Serialize;
use weft_netpol::ruleset::Family;

use crate::case::{Case, Expectation, PodRef, family_name, protocol_name};
use crate::matrix::{Comparison, TruthTable};

/// The result of a case or a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every judged cell as expected.
    Passed,
    /// Some judged cell not as expected (after the re-probe), or the case could not run.
    Failed,
    /// Not run, with a reason (a feature the runner lacks).
    Skipped,
    /// A check after an error that stopped its case.
    NotRun,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Passed => "PASS",
            Outcome::Failed => "FAIL",
            Outcome::Skipped => "SKIP",
            Outcome::NotRun => "NOT RUN",
        }
    }
}

/// Cases passed, failed and skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Passed cases.
    pub passed: usize,
    /// Failed cases.
    pub failed: usize,
    /// Skipped cases.
    pub skipped: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// One cell of a judged check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CellReport {
    /// Source pod.
    pub from: PodRef,
    /// Destination pod.
    pub to: PodRef,
    /// `connected` or `blocked`.
    pub expected: &'static str,
    /// `connected`, `blocked` or `not observed` (in the judged table).
    pub observed: &'static str,
    /// `false` for loopback cells of an `ignore_loopback` case.
    pub judged: bool,
    /// Judged and as expected, or not judged.
    pub ok: bool,
}

/// One check of a case.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// `None`: the initial state; `Some(i)`: after `steps[i]`.
    pub step: Option<usize>,
    /// The step's description.
    pub description: Option<String>,
    /// Port.
    pub port: u16,
    /// `TCP`, `UDP`, `SCTP`.
    pub protocol: &'static str,
    /// `IPv4`, `IPv6`.
    pub family: &'static str,
    /// Passed, failed, skipped, not run.
    pub result: Outcome,
    /// Why skipped or not run.
    pub reason: Option<String>,
    /// Probe rounds: 1, or 2 after a mismatch (0 when not probed).
    pub tries: u8,
    /// Row and column order.
    pub pod_order: Vec<PodRef>,
    /// Expected rows.
    pub expected: TruthTable,
    /// The judged table (the second one after a re-probe).
    pub observed: Option<TruthTable>,
    /// The first table, when it did not match and the matrix was probed again.
    pub first_observed: Option<TruthTable>,
    /// Judged cells as expected.
    pub correct: usize,
    /// Judged cells not as expected or not observed.
    pub wrong: usize,
    /// Loopback cells not judged.
    pub ignored: usize,
    /// Why some cells could not be observed (a few).
    pub notes: Vec<String>,
    /// Every cell of the judged table.
    pub cells: Vec<CellReport>,
    #[serde(skip)]
    comparison: Option<Comparison>,
}

impl CheckReport {
    fn base(
        case: &Case,
        step: Option<usize>,
        expectation: &Expectation,
        family: Family,
        result: Outcome,
    ) -> CheckReport {
        CheckReport {
            step,
            description: step.map(|i| case.steps[i].description.clone()),
            port: expectation.port,
            protocol: protocol_name(expectation.protocol),
            family: family_name(family),
            result,
            reason: None,
            tries: 0,
            pod_order: expectation.expected.pods().to_vec(),
            expected: expectation.expected.clone(),
            observed: None,
            first_observed: None,
            correct: 0,
            wrong: 0,
            ignored: 0,
            notes: Vec::new(),
            cells: Vec::new(),
            comparison: None,
        }
    }

    /// A check the runner cannot make.
    pub fn skipped(
        case: &Case,
        step: Option<usize>,
        expectation: &Expectation,
        family: Family,
        reason: String,
    ) -> CheckReport {
        let mut report = CheckReport::base(case, step, expectation, family, Outcome::Skipped);
        report.reason = Some(reason);
        report
    }

    /// A check left behind by an error earlier in its case.
    pub fn not_run(
        case: &Case,
        step: Option<usize>,
        expectation: &Expectation,
        run_family: Family,
    ) -> CheckReport {
        let family = expectation.family.unwrap_or(run_family);
        let mut report = CheckReport::base(case, step, expectation, family, Outcome::NotRun);
        report.reason = Some("an earlier error stopped the case".to_string());
        report
    }

    /// A probed check, judged on `observed`; `first` is the table of a first round that did
    /// not match.
    pub fn judged(
        case: &Case,
        step: Option<usize>,
        expectation: &Expectation,
        family: Family,
        observed: TruthTable,
        first: Option<TruthTable>,
        notes: Vec<String>,
    ) -> CheckReport {
        let comparison = expectation
            .expected
            .compare(&observed, case.ignore_loopback);
        let result = if comparison.passed() {
            Outcome::Passed
        } else {
            Outcome::Failed
        };
        let mut report = CheckReport::base(case, step, expectation, family, result);
        let pods = expectation.expected.pods();
        for (from, from_pod) in pods.iter().enumerate() {
            for (to, to_pod) in pods.iter().enumerate() {
                let verdict = comparison.get(from, to);
                report.cells.push(CellReport {
                    from: from_pod.clone(),
                    to: to_pod.clone(),
                    expected: expectation.expected.get(from, to).word(),
                    observed: observed.get(from, to).word(),
                    judged: verdict != crate::matrix::Verdict::NotJudged,
                    ok: !verdict.is_wrong(),
                });
            }
        }
        report.tries = if first.is_some() { 2 } else { 1 };
        report.correct = comparison.correct;
        report.wrong = comparison.wrong;
        report.ignored = comparison.ignored;
        report.observed = Some(observed);
        report.first_observed = first;
        report.notes = notes;
        report.comparison = Some(comparison);
        report
    }

    /// `initial state` or `after step 2 (description)`.
    pub fn when(&self) -> String {
        match (self.step, self.description.as_deref()) {
            (None, _) => "initial state".to_string(),
            (Some(i), Some(d)) if !d.is_empty() => format!("after step {} ({d})", i + 1),
            (Some(i), _) => format!("after step {}", i + 1),
        }
    }
}

/// One case.
#[derive(Clone, Debug, Serialize)]
pub struct CaseReport {
    /// Case id.
    pub id: String,
    /// Case name.
    pub name: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Passed, failed, skipped.
    pub result: Outcome,
    /// Why failed or skipped.
    pub reason: Option<String>,
    /// Every check, in run order.
    pub checks: Vec<CheckReport>,
}

impl CaseReport {
    /// A case the runner cannot run.
    pub fn skipped(case: &Case, reason: String) -> CaseReport {
        CaseReport {
            id: case.id.clone(),
            name: case.name.clone(),
            tags: case.tags.clone(),
            result: Outcome::Skipped,
            reason: Some(reason),
            checks: Vec::new(),
        }
    }

    /// A case that ran, from its checks and the errors that stopped it or its teardown.
    pub fn finish(case: &Case, checks: Vec<CheckReport>, errors: Vec<String>) -> CaseReport {
        let (result, reason) = crate::runner::case_outcome(&checks, &errors);
        CaseReport {
            id: case.id.clone(),
            name: case.name.clone(),
            tags: case.tags.clone(),
            result,
            reason,
            checks,
        }
    }

    /// Writes the case as text: its line, and the tables of each failed check (of every
    /// check with `verbose`).
    pub fn write_text(&self, out: &mut dyn Write, verbose: bool) -> io::Result<()> {
        let mut line = format!("{} {}", self.result.word(), self.id);
        if let Some(name) = &self.name {
            line.push_str(&format!(" ({name})"));
        }
        match (&self.reason, self.result) {
            (Some(reason), _) => line.push_str(&format!(": {reason}")),
            (None, Outcome::Passed) => {
                let n = self.checks.len();
                line.push_str(&format!(": {n} check{}", if n == 1 { "" } else { "s" }));
            }
            _ => {}
        }
        writeln!(out, "{line}")?;
        let total = self.checks.len();
        for (i, check) in self.checks.iter().enumerate() {
            let show = verbose || check.result == Outcome::Failed;
            if check.result == Outcome::Skipped || check.result == Outcome::NotRun {
                if verbose || self.result == Outcome::Failed {
                    writeln!(
                        out,
                        "  check {}/{total}, {}, {} port {} {}: {} ({})",
                        i + 1,
                        check.when(),
                        check.protocol,
                        check.port,
                        check.family,
                        check.result.word(),
                        check.reason.as_deref().unwrap_or_default()
                    )?;
                }
                continue;
            }
            if !show {
                continue;
            }
            let comparison = check
                .comparison
                .as_ref()
                .expect("a probed check keeps its comparison");
            writeln!(
                out,
                "  check {}/{total}, {}, {} port {} {}: {} {}{}",
                i + 1,
                check.when(),
                check.protocol,
                check.port,
                check.family,
                check.result.word(),
                comparison.summary(),
                if check.tries == 2 {
                    " (after re-probing the whole matrix)"
                } else {
                    ""
                }
            )?;
            writeln!(out, "    expected:\n{}", check.expected.pretty("    "))?;
            if let Some(observed) = &check.observed {
                writeln!(out, "    observed:\n{}", observed.pretty("    "))?;
            }
            writeln!(
                out,
                "    comparison (. as expected, X not, ? not observed, - loopback not judged):\n{}",
                comparison.pretty("    ")
            )?;
            for note in &check.notes {
                writeln!(out, "    not observed: {note}")?;
            }
        }
        Ok(())
    }
}

/// Every case of a run.
#[derive(Clone, Debug, Serialize)]
pub struct FileReport {
    /// Counts.
    pub summary: Summary,
    /// The cases, in run order.
    pub cases: Vec<CaseReport>,
}

impl FileReport {
    /// Counts the outcomes.
    pub fn new(cases: Vec<CaseReport>) -> FileReport {
        let mut summary = Summary::default();
        for case in &cases {
            match case.result {
                Outcome::Passed => summary.passed += 1,
                Outcome::Skipped => summary.skipped += 1,
                Outcome::Failed | Outcome::NotRun => summary.failed += 1,
            }
        }
        FileReport { summary, cases }
    }

    /// Writes every case, then the summary line.
    pub fn write_text(&self, out: &mut dyn Write, verbose: bool) -> io::Result<()> {
        for case in &self.cases {
            case.write_text(out, verbose)?;
        }
        writeln!(out, "{}", self.summary)
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }
}
