//! Label selectors in a canonical, validated form.
//!
//! Two selectors that mean the same thing (`matchLabels: {a: x}` and `matchExpressions:
//! [{key: a, operator: In, values: [x]}]`, or values in another order) have the same
//! [`LabelSelector::canonical`] text, so the index keeps one member set for both and the
//! compiler gives them one nft set with one name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A requirement on one label key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    /// The label is present with one of these values.
    In(BTreeSet<String>),
    /// The label is absent, or present with none of these values.
    NotIn(BTreeSet<String>),
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// A validated label selector: a conjunction of requirements, sorted, one list per key.
///
/// The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSelector {
    /// Requirements, sorted by key then operator (matchLabels become `In` with one value).
    pub requirements: Vec<(String, Operator)>,
}

/// Why a selector from the API cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// An operator the API does not define.
    #[error("matchExpressions key {key:?}: unknown operator {operator:?}")]
    UnknownOperator {
        /// The label key.
        key: String,
        /// The operator as written.
        operator: String,
    },
    /// `In`/`NotIn` without values, or `Exists`/`DoesNotExist` with values.
    #[error("matchExpressions key {key:?}: operator {operator} {problem}")]
    BadValues {
        /// The label key.
        key: String,
        /// The operator.
        operator: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// An empty label key.
    #[error("empty label key")]
    EmptyKey,
}

impl LabelSelector {
    /// The selector that matches every object.
    pub fn everything() -> LabelSelector {
        LabelSelector::default()
    }

    /// Builds a selector from `matchLabels` and `matchExpressions` (key, operator, values).
    pub fn new(
        match_labels: &BTreeMap<String, String>,
        match_expressions: &[(String, String, Vec<String>)],
    ) -> Result<LabelSelector, SelectorError> {
        let mut reqs = BTreeSet::new();
        for (k, v) in match_labels {
            if k.is_empty() {
                return Err(SelectorError::EmptyKey);
            }
            reqs.insert((k.clone(), Operator::In(BTreeSet::from([v.clone()]))));
        }
        for (key, op, values) in match_expressions {
            if key.is_empty() {
                return Err(SelectorError::EmptyKey);
            }
            let vals: BTreeSet<String> = values.iter().cloned().collect();
            let bad = |problem| SelectorError::BadValues {
                key: key.clone(),
                operator: op.clone(),
                problem,
            };
            let operator = match op.as_str() {
                "In" if vals.is_empty() => return Err(bad("needs at least one value")),
                "NotIn" if vals.is_empty() => return Err(bad("needs at least one value")),
                "Exists" | "DoesNotExist" if !vals.is_empty() => {
                    return Err(bad("takes no values"));
                }
                "In" => Operator::In(vals),
                "NotIn" => Operator::NotIn(vals),
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(SelectorError::UnknownOperator {
                        key: key.clone(),
                        operator: other.to_string(),
                    });
                }
            };
            reqs.insert((key.clone(), operator));
        }
        Ok(LabelSelector {
            requirements: reqs.into_iter().collect(),
        })
    }

    /// A selector of `matchLabels` only (tests and generators).
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> LabelSelector {
        let map: BTreeMap<String, String> = labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LabelSelector::new(&map, &[]).expect("matchLabels with non-empty keys are always valid")
    }

    /// True if the selector matches every object.
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|(key, op)| {
            let value = labels.get(key);
            match op {
                Operator::In(vals) => value.is_some_and(|v| vals.contains(v)),
                Operator::NotIn(vals) => value.is_none_or(|v| !vals.contains(v)),
                Operator::Exists => value.is_some(),
                Operator::DoesNotExist => value.is_none(),
            }
        })
    }

    /// The label keys this selector looks at (a relabel of other keys cannot change its result).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.requirements.iter().map(|(k, _)| k.as_str())
    }

    /// Canonical text: equal for selectors that mean the same, used for hashing names.
    pub fn canonical(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        for (i, (key, op)) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let join = |v: &BTreeSet<String>| v.iter().cloned().collect::<Vec<_>>().join("|");
            match op {
                Operator::In(v) if v.len() == 1 => write!(f, "{key}={}", join(v))?,
                Operator::In(v) => write!(f, "{key} in ({})", join(v))?,
                Operator::NotIn(v) => write!(f, "{key} notin ({})", join(v))?,
                Operator::Exists => write!(f, "{key}")?,
                Operator::DoesNotExist => write!(f, "!{key}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> (String, String, Vec<String>) {
        (
            key.into(),
            op.into(),
            values.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn every_operator_matches_as_the_api_says() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        type Expr = (String, String, Vec<String>);
        let cases: &[(&[Expr], bool)] = &[
            (&[expr("app", "In", &["web", "db"])], true),
            (&[expr("app", "In", &["db"])], false),
            (&[expr("app", "NotIn", &["db"])], true),
            (&[expr("app", "NotIn", &["web"])], false),
            (&[expr("missing", "NotIn", &["x"])], true),
            (&[expr("tier", "Exists", &[])], true),
            (&[expr("missing", "Exists", &[])], false),
            (&[expr("missing", "DoesNotExist", &[])], true),
            (&[expr("app", "DoesNotExist", &[])], false),
            (
                &[expr("app", "In", &["web"]), expr("tier", "In", &["back"])],
                false,
            ),
        ];
        for (exprs, want) in cases {
            let s = LabelSelector::new(&BTreeMap::new(), exprs).unwrap();
            assert_eq!(s.matches(&l), *want, "{s}");
        }
    }

    #[test]
    fn the_empty_selector_matches_everything() {
        assert!(LabelSelector::everything().matches(&BTreeMap::new()));
        assert!(LabelSelector::everything().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s =
            LabelSelector::new(&labels(&[("app", "web")]), &[expr("tier", "Exists", &[])]).unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "x")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
    }

    #[test]
    fn equivalent_selectors_have_one_canonical_form() {
        let a = LabelSelector::new(&labels(&[("a", "x")]), &[]).unwrap();
        let b = LabelSelector::new(&BTreeMap::new(), &[expr("a", "In", &["x"])]).unwrap();
        assert_eq!(a.canonical(), b.canonical());
        let c = LabelSelector::new(&BTreeMap::new(), &[expr("a", "In", &["y", "x"])]).unwrap();
        let d = LabelSelector::new(&BTreeMap::new(), &[expr("a", "In", &["x", "y"])]).unwrap();
        assert_eq!(c, d);
        assert_eq!(c.canonical(), "a in (x|y)");
    }

    #[test]
    fn malformed_expressions_are_errors() {
        assert!(matches!(
            LabelSelector::new(&BTreeMap::new(), &[expr("a", "In", &[])]),
            Err(SelectorError::BadValues { .. })
        ));
        assert!(matches!(
            LabelSelector::new(&BTreeMap::new(), &[expr("a", "Exists", &["x"])]),
            Err(SelectorError::BadValues { .. })
        ));
        assert!(matches!(
            LabelSelector::new(&BTreeMap::new(), &[expr("a", "Near", &["x"])]),
            Err(SelectorError::UnknownOperator { .. })
        ));
    }
}
