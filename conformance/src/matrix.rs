//! Truth tables: who may connect to whom, for one (port, protocol, family) check.
//!
//! A [`TruthTable`] is square over an ordered list of pods: row = the pod the connection comes
//! from, column = the pod it goes to. Cells are `.` (connected), `X` (blocked) or `?` (not
//! observed). [`TruthTable::compare`] scores an observed table against an expected one; the
//! diagonal (a pod talking to itself) may be left unjudged, as upstream's netpol e2e does,
//! because NetworkPolicy does not define loopback. Tables print the way upstream prints them:
//! a header row starting with `-`, then one row per source pod, tab-separated.

use std::fmt;

use serde::Serialize;

use crate::case::PodRef;

/// One cell of a truth table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cell {
    /// `.`: the connection succeeds (expected) or succeeded (observed).
    Connected,
    /// `X`: the connection is refused or times out.
    Blocked,
    /// `?`: no observation (the probe could not run).
    Unknown,
}

impl Cell {
    /// The character a table shows for this cell.
    pub fn mark(self) -> char {
        match self {
            Cell::Connected => '.',
            Cell::Blocked => 'X',
            Cell::Unknown => '?',
        }
    }

    /// The cell a character of an expected matrix stands for (`?` is not allowed there).
    pub fn from_expected_mark(c: char) -> Option<Cell> {
        match c {
            '.' => Some(Cell::Connected),
            'X' => Some(Cell::Blocked),
            _ => None,
        }
    }

    /// A word for reports (`connected`, `blocked`, `not observed`).
    pub fn word(self) -> &'static str {
        match self {
            Cell::Connected => "connected",
            Cell::Blocked => "blocked",
            Cell::Unknown => "not observed",
        }
    }
}

/// Why an expected matrix does not fit its pods.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MatrixError {
    /// Not one row per pod.
    #[error("matrix has {rows} rows but pod_order has {pods} pods")]
    RowCount {
        /// Rows given.
        rows: usize,
        /// Pods in the order.
        pods: usize,
    },
    /// A row is not one character per pod.
    #[error("matrix row {row} ({from}) is {text:?}: {len} characters, pod_order has {pods} pods")]
    RowLength {
        /// Row index (0-based).
        row: usize,
        /// The source pod of the row.
        from: PodRef,
        /// The row's text.
        text: String,
        /// Its length in characters.
        len: usize,
        /// Pods in the order.
        pods: usize,
    },
    /// A character other than `.` and `X`.
    #[error(
        "matrix row {row} ({from}) has {mark:?} at column {column}: only '.' and 'X' may be expected"
    )]
    Mark {
        /// Row index (0-based).
        row: usize,
        /// The source pod of the row.
        from: PodRef,
        /// Column index (0-based).
        column: usize,
        /// The character.
        mark: char,
    },
}

/// A square table of cells over an ordered list of pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruthTable {
    pods: Vec<PodRef>,
    /// Row-major, `pods.len()` squared.
    cells: Vec<Cell>,
}

impl TruthTable {
    /// A table with every cell set to `fill`.
    pub fn filled(pods: Vec<PodRef>, fill: Cell) -> TruthTable {
        let n = pods.len();
        TruthTable {
            pods,
            cells: vec![fill; n * n],
        }
    }

    /// Parses an expected matrix: one string per source pod, one character per destination.
    pub fn parse_expected(pods: Vec<PodRef>, rows: &[String]) -> Result<TruthTable, MatrixError> {
        let n = pods.len();
        if rows.len() != n {
            return Err(MatrixError::RowCount {
                rows: rows.len(),
                pods: n,
            });
        }
        let mut cells = Vec::with_capacity(n * n);
        for (row, text) in rows.iter().enumerate() {
            let len = text.chars().count();
            if len != n {
                return Err(MatrixError::RowLength {
                    row,
                    from: pods[row].clone(),
                    text: text.clone(),
                    len,
                    pods: n,
                });
            }
            for (column, mark) in text.chars().enumerate() {
                let cell = Cell::from_expected_mark(mark).ok_or_else(|| MatrixError::Mark {
                    row,
                    from: pods[row].clone(),
                    column,
                    mark,
                })?;
                cells.push(cell);
            }
        }
        Ok(TruthTable { pods, cells })
    }

    /// The pods, in row (and column) order.
    pub fn pods(&self) -> &[PodRef] {
        &self.pods
    }

    /// The cell from pod `from` to pod `to` (indices into [`TruthTable::pods`]).
    pub fn get(&self, from: usize, to: usize) -> Cell {
        self.cells[from * self.pods.len() + to]
    }

    /// Sets the cell from pod `from` to pod `to`.
    pub fn set(&mut self, from: usize, to: usize, cell: Cell) {
        let n = self.pods.len();
        self.cells[from * n + to] = cell;
    }

    /// The rows as strings of marks, as a case file writes them.
    pub fn rows(&self) -> Vec<String> {
        let n = self.pods.len();
        (0..n)
            .map(|from| (0..n).map(|to| self.get(from, to).mark()).collect())
            .collect()
    }

    /// Scores `observed` against this (expected) table. Both must be over the same pods.
    pub fn compare(&self, observed: &TruthTable, ignore_loopback: bool) -> Comparison {
        assert_eq!(
            self.pods, observed.pods,
            "expected and observed tables must have the same pods in the same order"
        );
        let n = self.pods.len();
        let mut verdicts = Vec::with_capacity(n * n);
        let (mut correct, mut wrong, mut ignored) = (0, 0, 0);
        for from in 0..n {
            for to in 0..n {
                let verdict = if ignore_loopback && from == to {
                    ignored += 1;
                    Verdict::NotJudged
                } else if observed.get(from, to) == Cell::Unknown {
                    wrong += 1;
                    Verdict::NotObserved
                } else if observed.get(from, to) == self.get(from, to) {
                    correct += 1;
                    Verdict::Agree
                } else {
                    wrong += 1;
                    Verdict::Differ
                };
                verdicts.push(verdict);
            }
        }
        Comparison {
            pods: self.pods.clone(),
            verdicts,
            correct,
            wrong,
            ignored,
        }
    }

    /// The table as upstream prints it, every line prefixed by `indent`.
    pub fn pretty(&self, indent: &str) -> String {
        pretty_table(&self.pods, indent, |from, to| self.get(from, to).mark())
    }
}

impl fmt::Display for TruthTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pretty(""))
    }
}

impl Serialize for TruthTable {
    /// As the rows a case file would write (`[".X", ".."]`); the pods are listed beside it.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.rows().serialize(serializer)
    }
}

/// How one cell of an observed table compares with the expectation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// `.`: as expected.
    Agree,
    /// `X`: the opposite of the expectation.
    Differ,
    /// `?`: no observation; counts as wrong.
    NotObserved,
    /// `-`: loopback, not scored.
    NotJudged,
}

impl Verdict {
    /// The character the comparison table shows.
    pub fn mark(self) -> char {
        match self {
            Verdict::Agree => '.',
            Verdict::Differ => 'X',
            Verdict::NotObserved => '?',
            Verdict::NotJudged => '-',
        }
    }

    /// Whether the cell counts against the check.
    pub fn is_wrong(self) -> bool {
        matches!(self, Verdict::Differ | Verdict::NotObserved)
    }
}

/// The cell-by-cell comparison of an observed table with an expected one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comparison {
    pods: Vec<PodRef>,
    verdicts: Vec<Verdict>,
    /// Judged cells that agree.
    pub correct: usize,
    /// Judged cells that differ or were not observed.
    pub wrong: usize,
    /// Loopback cells left unjudged.
    pub ignored: usize,
}

impl Comparison {
    /// Whether every judged cell agrees.
    pub fn passed(&self) -> bool {
        self.wrong == 0
    }

    /// The verdict of one cell.
    pub fn get(&self, from: usize, to: usize) -> Verdict {
        self.verdicts[from * self.pods.len() + to]
    }

    /// The pods, in row (and column) order.
    pub fn pods(&self) -> &[PodRef] {
        &self.pods
    }

    /// The comparison table (`.` agree, `X` differ, `?` not observed, `-` not judged).
    pub fn pretty(&self, indent: &str) -> String {
        pretty_table(&self.pods, indent, |from, to| self.get(from, to).mark())
    }

    /// Upstream's one-line summary: `correct:N, incorrect:M, ignored:K, result=BOOL`.
    pub fn summary(&self) -> String {
        format!(
            "correct:{}, incorrect:{}, ignored:{}, result={}",
            self.correct,
            self.wrong,
            self.ignored,
            self.passed()
        )
    }
}

/// Header `-` then the destination pods; one row per source pod; tab-separated.
fn pretty_table(pods: &[PodRef], indent: &str, mark: impl Fn(usize, usize) -> char) -> String {
    let mut lines = Vec::with_capacity(pods.len() + 1);
    let header: Vec<String> = std::iter::once("-".to_string())
        .chain(pods.iter().map(ToString::to_string))
        .collect();
    lines.push(format!("{indent}{}", header.join("\t")));
    for (from, pod) in pods.iter().enumerate() {
        let row: Vec<String> = std::iter::once(pod.to_string())
            .chain((0..pods.len()).map(|to| mark(from, to).to_string()))
            .collect();
        lines.push(format!("{indent}{}", row.join("\t")));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(names: &[&str]) -> Vec<PodRef> {
        names
            .iter()
            .map(|n| n.parse().expect("valid pod ref"))
            .collect()
    }

    fn rows(text: &[&str]) -> Vec<String> {
        text.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn prints_like_upstream_truth_tables() {
        let table =
            TruthTable::parse_expected(pods(&["x/a", "x/b", "y/a"]), &rows(&["X.X", "..X", "..."]))
                .expect("valid matrix");
        assert_eq!(
            table.pretty(""),
            "-\tx/a\tx/b\ty/a\nx/a\tX\t.\tX\nx/b\t.\t.\tX\ny/a\t.\t.\t."
        );
        assert_eq!(
            table.pretty("  ").lines().next(),
            Some("  -\tx/a\tx/b\ty/a")
        );
        assert_eq!(table.rows(), rows(&["X.X", "..X", "..."]));
    }

    #[test]
    fn unobserved_cells_print_as_question_marks_and_count_as_wrong() {
        let expected = TruthTable::filled(pods(&["x/a", "x/b"]), Cell::Connected);
        let mut observed = TruthTable::filled(pods(&["x/a", "x/b"]), Cell::Unknown);
        observed.set(0, 1, Cell::Connected);
        assert_eq!(observed.pretty(""), "-\tx/a\tx/b\nx/a\t?\t.\nx/b\t?\t?");
        let cmp = expected.compare(&observed, true);
        assert_eq!((cmp.correct, cmp.wrong, cmp.ignored), (1, 1, 2));
        assert_eq!(cmp.pretty(""), "-\tx/a\tx/b\nx/a\t-\t.\nx/b\t?\t-");
    }

    #[test]
    fn loopback_is_not_judged_when_ignored() {
        let p = pods(&["x/a", "x/b"]);
        let expected = TruthTable::parse_expected(p.clone(), &rows(&["X.", ".X"])).expect("valid");
        let observed = TruthTable::filled(p, Cell::Connected);
        let ignoring = expected.compare(&observed, true);
        assert!(ignoring.passed());
        assert_eq!(
            ignoring.summary(),
            "correct:2, incorrect:0, ignored:2, result=true"
        );
        let judging = expected.compare(&observed, false);
        assert!(!judging.passed());
        assert_eq!(judging.pretty(""), "-\tx/a\tx/b\nx/a\tX\t.\nx/b\t.\tX");
    }

    #[test]
    fn bad_matrices_say_what_is_wrong() {
        let p = pods(&["x/a", "x/b"]);
        assert_eq!(
            TruthTable::parse_expected(p.clone(), &rows(&[".."])),
            Err(MatrixError::RowCount { rows: 1, pods: 2 })
        );
        let err = TruthTable::parse_expected(p.clone(), &rows(&["..", "..."])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "matrix row 1 (x/b) is \"...\": 3 characters, pod_order has 2 pods"
        );
        let err = TruthTable::parse_expected(p, &rows(&["..", ".?"])).unwrap_err();
        assert!(matches!(
            err,
            MatrixError::Mark {
                row: 1,
                column: 1,
                mark: '?',
                ..
            }
        ));
    }
}
