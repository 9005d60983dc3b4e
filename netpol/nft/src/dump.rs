//! A dumped table: [`RawTable`] (netlink objects as the kernel holds them) and [`interpret`],
//! which turns it into weft's [`Ruleset`] plus the list of what is not weft's ([`Foreign`]).
//!
//! # Unrecognised objects
//!
//! weft's types can only say what weft writes. Something else in our table (a rule added by
//! hand, a set with a timeout, a chain on another hook) cannot be represented faithfully, yet
//! `diff(dump, desired)` must replace it. So [`interpret`] puts a *stand-in* in its place that no
//! compiled ruleset ever contains, and lists the original in [`KernelTable::foreign`]:
//!
//! | found | stand-in in the [`Ruleset`] | what `diff` then does |
//! | --- | --- | --- |
//! | a rule weft did not write | a rule with an empty match list, `drop`, and a comment starting with NUL (nft cannot write one) | flushes and refills the chain |
//! | a chain weft cannot describe | a base chain at priority [`FOREIGN_PRIORITY`] with policy drop | deletes it, or deletes and re-adds it |
//! | a set weft cannot describe, or with an element weft cannot read | a set with an empty key and no elements | deletes it, or deletes and re-adds it |
//! | a table with flags, or without weft's comment | table comment `""` | replaces the table |
//!
//! The stand-ins never reach the kernel: they only make the table differ from the desired one.

use std::collections::BTreeMap;
use std::fmt;

use weft_netpol::ruleset::{
    Action, BaseHook, Chain, ChainDef, ChainPolicy, ChainType, Hook, Rule, Ruleset, Set, SetDef,
    Verdict,
};

use crate::expr::{self, RawExpr};
use crate::netlink::udata;
use crate::set::{self, RawElem, RawSet};

/// Priority of the stand-in for a chain weft cannot describe (never a compiled priority).
pub const FOREIGN_PRIORITY: i32 = i32::MIN;

/// `NF_INET_LOCAL_IN`
const HOOK_INPUT: u32 = 1;
/// `NF_INET_FORWARD`
const HOOK_FORWARD: u32 = 2;
/// `NF_INET_POST_ROUTING`
const HOOK_POSTROUTING: u32 = 4;

/// A chain as dumped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawChain {
    /// Table name.
    pub table: String,
    /// Chain name.
    pub name: String,
    /// Base chain: hook number, priority, type, policy.
    pub hook: Option<(u32, i32, String, Option<u32>)>,
    /// Attributes present that weft never writes (devices, flags, userdata).
    pub extra: Vec<&'static str>,
}

/// One rule as dumped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRule {
    /// Kernel handle (differs between two kernels holding the same rule).
    pub handle: u64,
    /// Expressions; `None` if libnftnl could not parse them.
    pub exprs: Option<Vec<RawExpr>>,
    /// Userdata (the comment TLV).
    pub udata: Option<Vec<u8>>,
}

/// One table as the kernel holds it, in netlink terms: what `nft -f` of the same text would
/// produce compares equal (after [`RawTable::without_handles`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawTable {
    /// Table name.
    pub name: String,
    /// `NFT_TABLE_F_*` flags.
    pub flags: u32,
    /// Table userdata (the comment TLV).
    pub udata: Option<Vec<u8>>,
    /// Chains by name.
    pub chains: BTreeMap<String, RawChain>,
    /// Sets and maps by name.
    pub sets: BTreeMap<String, RawSet>,
    /// Elements of each set, sorted.
    pub elements: BTreeMap<String, Vec<RawElem>>,
    /// Rules of each chain, in order.
    pub rules: BTreeMap<String, Vec<RawRule>>,
}

impl RawTable {
    /// The same table with rule handles zeroed, for comparing two kernels.
    pub fn without_handles(&self) -> RawTable {
        let mut t = self.clone();
        for rules in t.rules.values_mut() {
            for r in rules {
                r.handle = 0;
            }
        }
        t
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.values().map(Vec::len).sum()
    }
}

/// Something in our table that weft did not write (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Foreign {
    /// The table itself (flags, or not weft's comment).
    Table {
        /// Why.
        reason: String,
    },
    /// A chain weft cannot describe.
    Chain {
        /// Chain name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A set weft cannot describe, or one of its elements.
    Set {
        /// Set name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A rule that is not one weft writes.
    Rule {
        /// Its chain.
        chain: String,
        /// Its kernel handle.
        handle: u64,
        /// Its expressions as libnftnl prints them.
        text: String,
    },
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Foreign::Table { reason } => write!(f, "table: {reason}"),
            Foreign::Chain { name, reason } => write!(f, "chain {name}: {reason}"),
            Foreign::Set { name, reason } => write!(f, "set {name}: {reason}"),
            Foreign::Rule {
                chain,
                handle,
                text,
            } => write!(f, "rule handle {handle} in chain {chain}: {text}"),
        }
    }
}

/// A dumped table as weft's [`Ruleset`], and what in it is not weft's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelTable {
    /// The table, with stand-ins for foreign objects.
    pub ruleset: Ruleset,
    /// What the stand-ins replace.
    pub foreign: Vec<Foreign>,
}

/// The stand-in for a rule weft did not write.
pub fn foreign_rule(handle: u64) -> Rule {
    Rule {
        matches: Vec::new(),
        counter: false,
        action: Action::Verdict(Verdict::Drop),
        comment: Some(format!("\0foreign rule, handle {handle}")),
    }
}

fn chain_def(c: &RawChain) -> Result<ChainDef, String> {
    if let Some(extra) = c.extra.first() {
        return Err(format!("has {extra}, which weft never sets"));
    }
    let Some((hooknum, priority, kind, policy)) = &c.hook else {
        return Ok(ChainDef {
            name: c.name.clone(),
            base: None,
        });
    };
    let hook = match *hooknum {
        HOOK_FORWARD => Hook::Forward,
        HOOK_POSTROUTING => Hook::Postrouting,
        HOOK_INPUT => Hook::Input,
        other => return Err(format!("hook {other}")),
    };
    let kind = match kind.as_str() {
        "filter" => ChainType::Filter,
        "nat" => ChainType::Nat,
        other => return Err(format!("type {other}")),
    };
    let policy = match policy {
        Some(1) => ChainPolicy::Accept,
        Some(0) => ChainPolicy::Drop,
        other => return Err(format!("policy {other:?}")),
    };
    if *priority == FOREIGN_PRIORITY {
        return Err("the stand-in priority".into());
    }
    Ok(ChainDef {
        name: c.name.clone(),
        base: Some(BaseHook {
            kind,
            hook,
            priority: *priority,
            policy,
        }),
    })
}

fn table_comment(raw: &RawTable) -> Result<String, String> {
    if raw.flags != 0 {
        return Err(format!("flags {:#x}", raw.flags));
    }
    let ud = raw.udata.as_deref().ok_or("no comment")?;
    match udata::parse(ud).as_deref() {
        Some([(udata::COMMENT, v)]) => udata::strz(v).ok_or_else(|| "malformed comment".into()),
        _ => Err("userdata other than one comment".into()),
    }
}

/// Interprets a dumped table (pure: no kernel). See the module docs for foreign objects.
pub fn interpret(raw: &RawTable) -> KernelTable {
    let mut foreign = Vec::new();
    let comment = table_comment(raw).unwrap_or_else(|reason| {
        foreign.push(Foreign::Table { reason });
        String::new()
    });
    let mut ruleset = Ruleset {
        table: raw.name.clone(),
        comment,
        sets: BTreeMap::new(),
        chains: BTreeMap::new(),
    };
    for (name, rs) in &raw.sets {
        let elems = raw
            .elements
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let decoded = set::decode_def(rs).and_then(|def| {
            let elements = set::decode_elements(&def, elems)?;
            Ok(Set { def, elements })
        });
        let s = decoded.unwrap_or_else(|reason| {
            foreign.push(Foreign::Set {
                name: name.clone(),
                reason,
            });
            Set::new(SetDef {
                name: name.clone(),
                key: Vec::new(),
                interval: false,
                verdict_map: false,
                comment: None,
            })
        });
        ruleset.sets.insert(name.clone(), s);
    }
    for (name, pc) in &raw.chains {
        let def = chain_def(pc).unwrap_or_else(|reason| {
            foreign.push(Foreign::Chain {
                name: name.clone(),
                reason,
            });
            ChainDef {
                name: name.clone(),
                base: Some(BaseHook {
                    kind: ChainType::Filter,
                    hook: Hook::Forward,
                    priority: FOREIGN_PRIORITY,
                    policy: ChainPolicy::Drop,
                }),
            }
        });
        let mut rules = Vec::new();
        for r in raw.rules.get(name).map(Vec::as_slice).unwrap_or_default() {
            let ours = r
                .exprs
                .as_deref()
                .and_then(|e| expr::raise(e, r.udata.as_deref()));
            rules.push(ours.unwrap_or_else(|| {
                let text = match &r.exprs {
                    Some(e) => e
                        .iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                    None => "(expressions libnftnl cannot parse)".into(),
                };
                foreign.push(Foreign::Rule {
                    chain: name.clone(),
                    handle: r.handle,
                    text,
                });
                foreign_rule(r.handle)
            }));
        }
        ruleset.chains.insert(name.clone(), Chain { def, rules });
    }
    KernelTable { ruleset, foreign }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_netpol::diff::{Op, diff};
    use weft_netpol::ruleset::{KeyField, Match, Protocol};

    fn raw_table() -> RawTable {
        let mut ud = Vec::new();
        udata::put_strz(&mut ud, udata::COMMENT, "weft schema=1").unwrap();
        RawTable {
            name: "weft".into(),
            flags: 0,
            udata: Some(ud),
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
            elements: BTreeMap::new(),
            rules: BTreeMap::new(),
        }
    }

    fn chain(name: &str) -> RawChain {
        RawChain {
            table: "weft".into(),
            name: name.into(),
            hook: None,
            extra: Vec::new(),
        }
    }

    fn ours() -> Rule {
        Rule {
            matches: vec![Match::L4Proto(Protocol::Tcp)],
            counter: false,
            action: Action::Verdict(Verdict::Accept),
            comment: Some("ns/p".into()),
        }
    }

    #[test]
    fn a_foreign_rule_makes_diff_refill_its_chain() {
        let mut raw = raw_table();
        raw.chains.insert("c".into(), chain("c"));
        let good = RawRule {
            handle: 4,
            exprs: Some(expr::lower(&ours()).unwrap()),
            udata: expr::rule_udata(Some("ns/p")).unwrap(),
        };
        let log = RawRule {
            handle: 5,
            exprs: Some(vec![RawExpr::Other {
                name: "log".into(),
                text: "log".into(),
            }]),
            udata: None,
        };
        raw.rules.insert("c".into(), vec![good, log]);
        let kt = interpret(&raw);
        assert_eq!(kt.foreign.len(), 1);
        assert!(matches!(&kt.foreign[0], Foreign::Rule { handle: 5, .. }));

        let mut desired = Ruleset::new("weft");
        desired.chains.insert(
            "c".into(),
            Chain {
                def: ChainDef {
                    name: "c".into(),
                    base: None,
                },
                rules: vec![ours()],
            },
        );
        let d = diff(Some(&kt.ruleset), &desired);
        assert_eq!(
            d.ops,
            vec![
                Op::FlushChain("c".into()),
                Op::AddRule {
                    chain: "c".into(),
                    rule: ours()
                }
            ]
        );
    }

    #[test]
    fn a_foreign_set_or_chain_is_replaced_and_a_foreign_table_too() {
        let mut raw = raw_table();
        let mut s = set::encode_def(&SetDef {
            name: "s".into(),
            key: vec![KeyField::Ipv4Addr],
            interval: false,
            verdict_map: false,
            comment: None,
        })
        .unwrap();
        s.flags |= 0x10; // timeout
        raw.sets.insert("s".into(), s);
        raw.elements.insert("s".into(), Vec::new());
        let mut output = chain("out");
        output.hook = Some((3, 0, "filter".into(), Some(1))); // NF_INET_LOCAL_OUT
        raw.chains.insert("out".into(), output);
        let kt = interpret(&raw);
        assert_eq!(kt.foreign.len(), 2, "{:?}", kt.foreign);
        assert!(kt.ruleset.sets["s"].def.key.is_empty());
        assert_eq!(
            kt.ruleset.chains["out"].def.base.unwrap().priority,
            FOREIGN_PRIORITY
        );
        // Desired has neither: both go.
        let d = diff(Some(&kt.ruleset), &Ruleset::new("weft"));
        assert!(d.ops.contains(&Op::DeleteSet("s".into())));
        assert!(d.ops.contains(&Op::DeleteChain("out".into())));

        let mut dormant = raw_table();
        dormant.flags = 1;
        let kt = interpret(&dormant);
        assert_eq!(kt.ruleset.comment, "");
        let d = diff(Some(&kt.ruleset), &Ruleset::new("weft"));
        assert_eq!(d.ops[0], Op::DeleteTable);
    }
}
