//! Desired vs. current ruleset → the minimal ordered [`Op`]s of one atomic transaction.
//!
//! `diff(current, desired)` never rebuilds: unchanged sets keep their elements, unchanged chains
//! keep their rules. A chain whose rules differ is replaced inside the same transaction (flush +
//! add). The order of the ops is the order the kernel needs: objects exist before anything
//! refers to them, and references are gone before what they refer to is deleted.
//!
//! One kernel rule shapes the output: on kernels before 6.2 a chain that a verdict-map element
//! referenced cannot be deleted in the transaction that deletes the element. So a chain still
//! referenced by a map element of `current` is kept (with its rules, and the sets those rules use)
//! for one more reconcile: [`Diff::deferred`] says so, and the next `diff` deletes it.

use std::collections::BTreeSet;

use crate::ruleset::{ChainDef, Key, Rule, Ruleset, SetDef, Verdict};

/// One operation of a transaction on weft's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Delete the whole table (only to replace a table of another schema version).
    DeleteTable,
    /// Create the table with this comment.
    AddTable {
        /// The table comment (schema version).
        comment: String,
    },
    /// Create an empty set or verdict map.
    AddSet(SetDef),
    /// Delete a set or map (nothing refers to it any more).
    DeleteSet(String),
    /// Add elements; adding an identical element is a no-op.
    AddElements {
        /// Set or map name.
        set: String,
        /// Keys with their verdict (maps) or `None` (sets).
        elements: Vec<(Key, Option<Verdict>)>,
    },
    /// Delete elements (present in the current state).
    DeleteElements {
        /// Set or map name.
        set: String,
        /// Keys to delete.
        keys: Vec<Key>,
    },
    /// Create an empty chain.
    AddChain(ChainDef),
    /// Remove every rule of a chain.
    FlushChain(String),
    /// Delete an empty, unreferenced chain.
    DeleteChain(String),
    /// Append a rule to a chain.
    AddRule {
        /// Chain name.
        chain: String,
        /// The rule.
        rule: Rule,
    },
}

impl Op {
    /// True for ops that only touch set or map elements.
    pub fn is_element_op(&self) -> bool {
        matches!(self, Op::AddElements { .. } | Op::DeleteElements { .. })
    }

    /// Number of elements, rules or objects this op carries (for metrics and benchmarks).
    pub fn weight(&self) -> usize {
        match self {
            Op::AddElements { elements, .. } => elements.len(),
            Op::DeleteElements { keys, .. } => keys.len(),
            _ => 1,
        }
    }
}

impl std::fmt::Display for Op {
    /// The op in `nft` words (without the table), for logs, `weft audit` and people.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = |ks: &mut dyn Iterator<Item = String>| ks.collect::<Vec<_>>().join(", ");
        match self {
            Op::DeleteTable => f.write_str("delete table"),
            Op::AddTable { comment } => write!(f, "add table comment \"{comment}\""),
            Op::AddSet(def) => write!(
                f,
                "add {} {}",
                if def.verdict_map { "map" } else { "set" },
                def.name
            ),
            Op::DeleteSet(name) => write!(f, "delete set {name}"),
            Op::AddElements { set, elements } => write!(
                f,
                "add element {set} {{ {} }}",
                keys(&mut elements.iter().map(|(k, v)| match v {
                    Some(v) => format!("{k} : {v}"),
                    None => k.to_string(),
                }))
            ),
            Op::DeleteElements { set, keys: ks } => write!(
                f,
                "delete element {set} {{ {} }}",
                keys(&mut ks.iter().map(ToString::to_string))
            ),
            Op::AddChain(def) => write!(f, "add chain {}", def.name),
            Op::FlushChain(name) => write!(f, "flush chain {name}"),
            Op::DeleteChain(name) => write!(f, "delete chain {name}"),
            Op::AddRule { chain, rule } => write!(f, "add rule {chain} {rule}"),
        }
    }
}

/// The result of [`diff`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Ops in transaction order.
    pub ops: Vec<Op>,
    /// Chains and sets that are no longer desired but must outlive this transaction (see the
    /// module docs); the next diff deletes them.
    pub deferred: BTreeSet<String>,
}

impl Diff {
    /// No op at all: the kernel already holds the desired state.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Computes the ops that turn `current` into `desired` (`current = None`: no table yet).
///
/// A table of another schema version is replaced whole, in the same transaction.
pub fn diff(current: Option<&Ruleset>, desired: &Ruleset) -> Diff {
    let empty;
    let mut ops = Vec::new();
    let current = match current {
        Some(cur) if cur.schema() == desired.schema() && cur.comment == desired.comment => cur,
        Some(_) => {
            ops.push(Op::DeleteTable);
            ops.push(Op::AddTable {
                comment: desired.comment.clone(),
            });
            empty = Ruleset {
                comment: desired.comment.clone(),
                ..Ruleset::new(&desired.table)
            };
            &empty
        }
        None => {
            ops.push(Op::AddTable {
                comment: desired.comment.clone(),
            });
            empty = Ruleset {
                comment: desired.comment.clone(),
                ..Ruleset::new(&desired.table)
            };
            &empty
        }
    };

    let deferred = deferred_objects(current, desired);

    // 1. New sets and maps (a set whose definition changed is replaced: delete later, add now
    //    under the same name is impossible, so it is deleted first in step 0 below).
    let mut replaced_sets = BTreeSet::new();
    for (name, want) in &desired.sets {
        match current.sets.get(name) {
            Some(have) if have.def == want.def => {}
            Some(_) => {
                replaced_sets.insert(name.clone());
            }
            None => ops.push(Op::AddSet(want.def.clone())),
        }
    }

    // 2. New chains, empty (rules and map elements may refer to them).
    let mut replaced_chains = BTreeSet::new();
    for (name, want) in &desired.chains {
        match current.chains.get(name) {
            Some(have) if have.def == want.def => {}
            Some(_) => {
                replaced_chains.insert(name.clone());
            }
            None => ops.push(Op::AddChain(want.def.clone())),
        }
    }

    // A set or chain whose definition changed (never happens within one schema version, but
    // a hand-edited kernel may hold one): flush references by rewriting every chain, delete
    // it, add it again. Rare, so done the simple way.
    let rewrite_all = !replaced_sets.is_empty() || !replaced_chains.is_empty();
    if rewrite_all {
        for name in current.chains.keys() {
            ops.push(Op::FlushChain(name.clone()));
        }
        for name in &replaced_sets {
            ops.push(Op::DeleteSet(name.clone()));
            ops.push(Op::AddSet(desired.sets[name].def.clone()));
        }
        for name in &replaced_chains {
            ops.push(Op::DeleteChain(name.clone()));
            ops.push(Op::AddChain(desired.chains[name].def.clone()));
        }
    }

    // 3. Set elements (plain sets: before the rules that use them, so a new rule never sees
    //    a half-filled set).
    for (name, want) in &desired.sets {
        if want.def.verdict_map {
            continue;
        }
        let have = current
            .sets
            .get(name)
            .filter(|_| !replaced_sets.contains(name));
        let add: Vec<(Key, Option<Verdict>)> = want
            .elements
            .iter()
            .filter(|(k, v)| have.and_then(|h| h.elements.get(*k)) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !add.is_empty() {
            ops.push(Op::AddElements {
                set: name.clone(),
                elements: add,
            });
        }
    }

    // 4. Chains whose rules differ: flush and refill in this transaction.
    for (name, want) in &desired.chains {
        let same = !rewrite_all
            && current
                .chains
                .get(name)
                .is_some_and(|have| have.rules == want.rules);
        if same {
            continue;
        }
        let existed = current.chains.contains_key(name);
        if existed && !rewrite_all && !replaced_chains.contains(name) {
            ops.push(Op::FlushChain(name.clone()));
        }
        for rule in &want.rules {
            ops.push(Op::AddRule {
                chain: name.clone(),
                rule: rule.clone(),
            });
        }
    }

    // 5. Verdict-map elements: a changed verdict is delete + add (re-adding with other data is
    //    EEXIST in the kernel).
    for (name, want) in &desired.sets {
        if !want.def.verdict_map {
            continue;
        }
        let have = current
            .sets
            .get(name)
            .filter(|_| !replaced_sets.contains(name));
        let mut delete = Vec::new();
        let mut add = Vec::new();
        if let Some(have) = have {
            for (k, v) in &have.elements {
                match want.elements.get(k) {
                    Some(w) if w == v => {}
                    _ => delete.push(k.clone()),
                }
            }
        }
        for (k, v) in &want.elements {
            if have.and_then(|h| h.elements.get(k)) != Some(v) {
                add.push((k.clone(), v.clone()));
            }
        }
        if !delete.is_empty() {
            ops.push(Op::DeleteElements {
                set: name.clone(),
                keys: delete,
            });
        }
        if !add.is_empty() {
            ops.push(Op::AddElements {
                set: name.clone(),
                elements: add,
            });
        }
    }

    // 6. Elements gone from plain sets.
    for (name, want) in &desired.sets {
        if want.def.verdict_map || replaced_sets.contains(name) {
            continue;
        }
        if let Some(have) = current.sets.get(name) {
            let keys: Vec<Key> = have
                .elements
                .keys()
                .filter(|k| !want.elements.contains_key(*k))
                .cloned()
                .collect();
            if !keys.is_empty() {
                ops.push(Op::DeleteElements {
                    set: name.clone(),
                    keys,
                });
            }
        }
    }

    // 7. Chains no longer desired: flush (drops their references), then delete.
    let gone_chains: Vec<&String> = current
        .chains
        .keys()
        .filter(|n| !desired.chains.contains_key(*n) && !deferred.contains(*n))
        .collect();
    for name in &gone_chains {
        if !rewrite_all && !current.chains[*name].rules.is_empty() {
            ops.push(Op::FlushChain((*name).clone()));
        }
    }
    for name in gone_chains {
        ops.push(Op::DeleteChain(name.clone()));
    }

    // 8. Sets and maps no longer desired (every rule using them is gone by now).
    for name in current.sets.keys() {
        if !desired.sets.contains_key(name) && !deferred.contains(name) {
            ops.push(Op::DeleteSet(name.clone()));
        }
    }

    Diff { ops, deferred }
}

/// Chains and sets not desired that must survive this transaction: chains referenced by a
/// verdict-map element of `current`, everything such a chain's rules refer to, transitively.
fn deferred_objects(current: &Ruleset, desired: &Ruleset) -> BTreeSet<String> {
    let mut deferred = BTreeSet::new();
    let mut todo: Vec<String> = current
        .sets
        .values()
        .filter(|s| s.def.verdict_map)
        .flat_map(|s| s.elements.values().flatten())
        .filter_map(|v| v.target().map(str::to_string))
        .filter(|c| !desired.chains.contains_key(c))
        .collect();
    while let Some(name) = todo.pop() {
        if !deferred.insert(name.clone()) {
            continue;
        }
        let Some(chain) = current.chains.get(&name) else {
            continue;
        };
        for rule in &chain.rules {
            if let Some(target) = rule.jump_target()
                && !desired.chains.contains_key(target)
            {
                todo.push(target.to_string());
            }
            for set in rule.set_refs() {
                if !desired.sets.contains_key(set) {
                    deferred.insert(set.to_string());
                }
            }
        }
    }
    deferred
}

/// Counts ops by kind, for logs and benchmarks: (element ops, elements carried, other ops).
pub fn op_summary(ops: &[Op]) -> (usize, usize, usize) {
    let (mut element_ops, mut elements, mut other) = (0, 0, 0);
    for op in ops {
        if op.is_element_op() {
            element_ops += 1;
            elements += op.weight();
        } else {
            other += 1;
        }
    }
    (element_ops, elements, other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::fake::{DeleteMode, FakeBackend};
    use crate::synth::{self, GenParams};
    use proptest::prelude::*;

    /// Two random tables of the same node: one before, one after an arbitrary amount of change.
    fn pair(seed_a: u64, seed_b: u64, size: usize) -> (Ruleset, Ruleset) {
        let p = GenParams::small(3, size, size / 2 + 1);
        let a = compile(&synth::cluster(&p, seed_a), "node-0", "weft");
        let b = compile(&synth::cluster(&p, seed_b), "node-0", "weft");
        (a, b)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn applying_the_diff_of_two_rulesets_gives_the_second_within_two_transactions(
            seed_a in any::<u64>(), seed_b in any::<u64>(), size in 0usize..16,
        ) {
            let (a, b) = pair(seed_a, seed_b, size);
            // Strict deletes (kernels before 6.3): the diff may only delete what exists.
            let mut kernel = FakeBackend::new();
            kernel.delete_mode = DeleteMode::Strict;
            kernel.apply("weft", &diff(None, &a).ops).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(kernel.dump(), Some(&a));
            let d = diff(Some(&a), &b);
            kernel.apply("weft", &d.ops).map_err(|e| TestCaseError::fail(format!("{e}: {:#?}", d.ops)))?;
            let after = kernel.dump().cloned().expect("table exists");
            // Everything but the deferred objects is already `b`.
            let mut trimmed = after.clone();
            for name in &d.deferred {
                trimmed.chains.remove(name);
                trimmed.sets.remove(name);
            }
            prop_assert!(trimmed == b, "first transaction: differs beyond deferred {:?}", d.deferred);
            let d2 = diff(Some(&after), &b);
            prop_assert!(d2.deferred.is_empty());
            kernel.apply("weft", &d2.ops).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(kernel.dump(), Some(&b));
            // And then nothing is left to do.
            prop_assert!(diff(kernel.dump(), &b).is_empty());
        }
    }

    #[test]
    fn a_table_of_another_schema_is_replaced_in_one_transaction() {
        let (a, b) = pair(1, 2, 8);
        let mut old = a.clone();
        old.comment = crate::ruleset::table_comment(0);
        let d = diff(Some(&old), &b);
        assert_eq!(d.ops[0], Op::DeleteTable);
        assert!(matches!(d.ops[1], Op::AddTable { .. }));
        let mut kernel = FakeBackend::new();
        kernel
            .apply(
                "weft",
                &[Op::AddTable {
                    comment: old.comment.clone(),
                }],
            )
            .unwrap();
        kernel.apply("weft", &d.ops).unwrap();
        assert_eq!(kernel.dump(), Some(&b));
    }

    #[test]
    fn an_unchanged_table_needs_no_op() {
        let (a, _) = pair(5, 6, 10);
        assert!(diff(Some(&a), &a).is_empty());
    }
}
