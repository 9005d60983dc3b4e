//! An in-memory backend that behaves like the kernel's nftables transactions.
//!
//! [`FakeBackend::apply`] runs a batch of [`Op`]s on a copy of its table and commits only if every
//! op succeeds, as the kernel does; failures are [`FakeError`]s of the kinds the kernel reports
//! (`NotFound`, `Exists`, `Busy`), with the index of the op. Tests drive the whole engine
//! against it without root; `Display` of the table prints it as `nft list table` would.

use std::fmt;

use crate::diff::Op;
use crate::ruleset::{Chain, Ruleset, Set};

/// Why the fake refused a batch (the kernel's errno in words).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FakeError {
    /// ENOENT: the op refers to an object or element that does not exist.
    #[error("op {index}: {what} does not exist (ENOENT)")]
    NotFound {
        /// Index of the failing op in the batch.
        index: usize,
        /// The missing object.
        what: String,
    },
    /// EEXIST: the object exists with another definition, or the element with other data.
    #[error("op {index}: {what} already exists differently (EEXIST)")]
    Exists {
        /// Index of the failing op in the batch.
        index: usize,
        /// The conflicting object.
        what: String,
    },
    /// EBUSY: the object is still in use.
    #[error("op {index}: {what} is still referenced (EBUSY)")]
    Busy {
        /// Index of the failing op in the batch.
        index: usize,
        /// The busy object.
        what: String,
    },
}

impl FakeError {
    /// Index of the op that failed.
    pub fn index(&self) -> usize {
        match self {
            FakeError::NotFound { index, .. }
            | FakeError::Exists { index, .. }
            | FakeError::Busy { index, .. } => *index,
        }
    }
}

/// How element deletes of absent elements behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeleteMode {
    /// `DESTROYSETELEM` (kernel 6.3+): deleting an absent element is a no-op.
    #[default]
    Destroy,
    /// `DELSETELEM`: deleting an absent element fails the batch (ENOENT).
    Strict,
}

/// The in-memory kernel.
#[derive(Clone, Debug, Default)]
pub struct FakeBackend {
    table: Option<Ruleset>,
    /// How deletes of absent elements behave.
    pub delete_mode: DeleteMode,
    /// The last batch that was committed.
    pub last_batch: Vec<Op>,
    /// Number of batches committed.
    pub commits: usize,
}

impl FakeBackend {
    /// An empty kernel (no table).
    pub fn new() -> FakeBackend {
        FakeBackend::default()
    }

    /// The current table, if any (what a dump would return).
    pub fn dump(&self) -> Option<&Ruleset> {
        self.table.as_ref()
    }

    /// Applies one batch atomically: all ops or none.
    pub fn apply(&mut self, table_name: &str, ops: &[Op]) -> Result<(), FakeError> {
        let next = apply_ops(self.table.clone(), table_name, ops, self.delete_mode)?;
        self.table = next;
        self.last_batch = ops.to_vec();
        self.commits += 1;
        Ok(())
    }

    /// Changes the table behind the engine's back (drift, another tool, a person with `nft`).
    pub fn tamper(&mut self, f: impl FnOnce(&mut Ruleset)) {
        if let Some(t) = self.table.as_mut() {
            f(t);
        }
    }
}

impl fmt::Display for FakeBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.table {
            Some(t) => write!(f, "{t}"),
            None => Ok(()),
        }
    }
}

/// Applies ops in order to `table` (None: no table), with the kernel's checks. Pure: the input
/// is not modified; on error nothing is returned but the error.
pub fn apply_ops(
    table: Option<Ruleset>,
    table_name: &str,
    ops: &[Op],
    delete_mode: DeleteMode,
) -> Result<Option<Ruleset>, FakeError> {
    let mut table = table;
    for (index, op) in ops.iter().enumerate() {
        let not_found = |what: String| FakeError::NotFound { index, what };
        let exists = |what: String| FakeError::Exists { index, what };
        let busy = |what: String| FakeError::Busy { index, what };
        if let Op::AddTable { comment } = op {
            match &table {
                Some(t) if t.comment != *comment => {
                    return Err(exists(format!("table {table_name}")));
                }
                Some(_) => {}
                None => {
                    table = Some(Ruleset {
                        comment: comment.clone(),
                        ..Ruleset::new(table_name)
                    })
                }
            }
            continue;
        }
        if let Op::DeleteTable = op {
            if table.take().is_none() {
                return Err(not_found(format!("table {table_name}")));
            }
            continue;
        }
        let Some(t) = table.as_mut() else {
            return Err(not_found(format!("table {table_name}")));
        };
        match op {
            Op::AddTable { .. } | Op::DeleteTable => unreachable!("handled above"),
            Op::AddSet(def) => match t.sets.get(&def.name) {
                Some(have) if have.def != *def => return Err(exists(format!("set {}", def.name))),
                Some(_) => {}
                None => {
                    t.sets.insert(def.name.clone(), Set::new(def.clone()));
                }
            },
            Op::DeleteSet(name) => {
                if !t.sets.contains_key(name) {
                    return Err(not_found(format!("set {name}")));
                }
                let used = t
                    .chains
                    .values()
                    .flat_map(|c| &c.rules)
                    .any(|r| r.set_refs().any(|s| s == name));
                if used {
                    return Err(busy(format!("set {name}")));
                }
                t.sets.remove(name);
            }
            Op::AddElements { set, elements } => {
                let s = t
                    .sets
                    .get_mut(set)
                    .ok_or_else(|| not_found(format!("set {set}")))?;
                for (key, data) in elements {
                    if data.is_some() != s.def.verdict_map || key.to.is_some() != s.def.interval {
                        return Err(exists(format!("element {key} of {set} (wrong shape)")));
                    }
                    if let Some(target) = data.as_ref().and_then(|v| v.target())
                        && !t.chains.contains_key(target)
                    {
                        return Err(not_found(format!("chain {target}")));
                    }
                    match s.elements.get(key) {
                        Some(have) if have != data => {
                            return Err(exists(format!("element {key} of {set}")));
                        }
                        Some(_) => {}
                        None => {
                            if s.def.interval && overlaps(s, key) {
                                return Err(exists(format!("interval {key} overlaps in {set}")));
                            }
                            s.elements.insert(key.clone(), data.clone());
                        }
                    }
                }
            }
            Op::DeleteElements { set, keys } => {
                let s = t
                    .sets
                    .get_mut(set)
                    .ok_or_else(|| not_found(format!("set {set}")))?;
                for key in keys {
                    if s.elements.remove(key).is_none() && delete_mode == DeleteMode::Strict {
                        return Err(not_found(format!("element {key} of {set}")));
                    }
                }
            }
            Op::AddChain(def) => match t.chains.get(&def.name) {
                Some(have) if have.def != *def => {
                    return Err(exists(format!("chain {}", def.name)));
                }
                Some(_) => {}
                None => {
                    t.chains.insert(
                        def.name.clone(),
                        Chain {
                            def: def.clone(),
                            rules: Vec::new(),
                        },
                    );
                }
            },
            Op::FlushChain(name) => {
                t.chains
                    .get_mut(name)
                    .ok_or_else(|| not_found(format!("chain {name}")))?
                    .rules
                    .clear();
            }
            Op::DeleteChain(name) => {
                let chain = t
                    .chains
                    .get(name)
                    .ok_or_else(|| not_found(format!("chain {name}")))?;
                if !chain.rules.is_empty() || t.referenced_chains().contains(name.as_str()) {
                    return Err(busy(format!("chain {name}")));
                }
                t.chains.remove(name);
            }
            Op::AddRule { chain, rule } => {
                if let Some(target) = rule.jump_target()
                    && !t.chains.contains_key(target)
                {
                    return Err(not_found(format!("chain {target}")));
                }
                if let Some(missing) = rule.set_refs().find(|s| !t.sets.contains_key(*s)) {
                    return Err(not_found(format!("set {missing}")));
                }
                t.chains
                    .get_mut(chain)
                    .ok_or_else(|| not_found(format!("chain {chain}")))?
                    .rules
                    .push(rule.clone());
            }
        }
    }
    Ok(table)
}

/// Whether an interval key overlaps a range already in the set (the kernel refuses it).
fn overlaps(set: &Set, key: &crate::ruleset::Key) -> bool {
    let (Some(to), 1) = (&key.to, key.from.len()) else {
        return false;
    };
    set.elements.keys().any(|k| match &k.to {
        Some(kto) => k.from[0] <= to[0] && key.from[0] <= kto[0],
        None => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::{ChainDef, Key, KeyField, SetDef, Value, Verdict};

    fn set_def(name: &str) -> SetDef {
        SetDef {
            name: name.into(),
            key: vec![KeyField::Ipv4Addr],
            interval: false,
            verdict_map: false,
            comment: None,
        }
    }

    fn v4(s: &str) -> Key {
        Key::point(vec![Value::V4(s.parse().unwrap())])
    }

    #[test]
    fn a_failing_batch_changes_nothing() {
        let mut fake = FakeBackend::new();
        fake.apply(
            "weft",
            &[
                Op::AddTable {
                    comment: "weft schema=1".into(),
                },
                Op::AddSet(set_def("a")),
            ],
        )
        .unwrap();
        let before = fake.dump().cloned();
        let err = fake
            .apply(
                "weft",
                &[
                    Op::AddElements {
                        set: "a".into(),
                        elements: vec![(v4("10.0.0.1"), None)],
                    },
                    Op::DeleteChain("nope".into()),
                ],
            )
            .unwrap_err();
        assert_eq!(err.index(), 1);
        assert_eq!(fake.dump().cloned(), before);
        assert_eq!(fake.commits, 1);
    }

    #[test]
    fn a_map_element_with_another_verdict_is_eexist() {
        let mut fake = FakeBackend::new();
        let map = SetDef {
            verdict_map: true,
            ..set_def("m")
        };
        let setup = [
            Op::AddTable {
                comment: "weft schema=1".into(),
            },
            Op::AddSet(map),
            Op::AddChain(ChainDef {
                name: "a".into(),
                base: None,
            }),
            Op::AddChain(ChainDef {
                name: "b".into(),
                base: None,
            }),
            Op::AddElements {
                set: "m".into(),
                elements: vec![(v4("10.0.0.1"), Some(Verdict::Jump("a".into())))],
            },
        ];
        fake.apply("weft", &setup).unwrap();
        let readd = Op::AddElements {
            set: "m".into(),
            elements: vec![(v4("10.0.0.1"), Some(Verdict::Jump("b".into())))],
        };
        assert!(matches!(
            fake.apply("weft", std::slice::from_ref(&readd)),
            Err(FakeError::Exists { .. })
        ));
        // Delete + add in one batch is how a verdict changes.
        let del = Op::DeleteElements {
            set: "m".into(),
            keys: vec![v4("10.0.0.1")],
        };
        fake.apply("weft", &[del, readd]).unwrap();
        // Chain `a` is unreferenced now and can go; `b` is still referenced.
        assert!(matches!(
            fake.apply("weft", &[Op::DeleteChain("b".into())]),
            Err(FakeError::Busy { .. })
        ));
        fake.apply("weft", &[Op::DeleteChain("a".into())]).unwrap();
    }

    #[test]
    fn strict_mode_refuses_deleting_an_absent_element() {
        let mut fake = FakeBackend {
            delete_mode: DeleteMode::Strict,
            ..FakeBackend::new()
        };
        fake.apply(
            "weft",
            &[
                Op::AddTable {
                    comment: "weft schema=1".into(),
                },
                Op::AddSet(set_def("a")),
            ],
        )
        .unwrap();
        let del = [Op::DeleteElements {
            set: "a".into(),
            keys: vec![v4("10.0.0.9")],
        }];
        assert!(matches!(
            fake.apply("weft", &del),
            Err(FakeError::NotFound { .. })
        ));
        fake.delete_mode = DeleteMode::Destroy;
        fake.apply("weft", &del).unwrap();
    }

    #[test]
    fn overlapping_intervals_are_refused() {
        let mut fake = FakeBackend::new();
        let def = SetDef {
            interval: true,
            ..set_def("c")
        };
        let r = |a: &str, b: &str| {
            Key::range(
                vec![Value::V4(a.parse().unwrap())],
                vec![Value::V4(b.parse().unwrap())],
            )
        };
        let res = fake.apply(
            "weft",
            &[
                Op::AddTable {
                    comment: "weft schema=1".into(),
                },
                Op::AddSet(def),
                Op::AddElements {
                    set: "c".into(),
                    elements: vec![
                        (r("10.0.0.0", "10.0.0.255"), None),
                        (r("10.0.0.128", "10.0.1.0"), None),
                    ],
                },
            ],
        );
        assert!(matches!(res, Err(FakeError::Exists { index: 2, .. })));
        assert!(fake.dump().is_none());
    }
}
