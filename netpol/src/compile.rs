//! Cluster → the desired [`Ruleset`] of one node (DESIGN §2, "Ruleset layout").
//!
//! The node compiles only what concerns it: dispatch for its local pods, the chains of the
//! policies that select at least one of them, and the sets those chains use (peer sets hold
//! pods of every node). Names derive from content, so the same logical object has the same
//! name in every process.
//!
//! ```text
//! forward hook ─ egress  (filter - 1): ct established → accept; anti-spoofing; unknown local
//!              │                       pod → drop; ip saddr vmap @egress-dispatch-v4 ─┐
//!              └ ingress (filter):     ct established → accept; unknown local pod → drop;
//!                                      ip daddr vmap @ingress-dispatch-v4 ─┐          │
//!      grp-<h>-in: jump pol-…-in; …; counter drop   ◄──────────────────────┘          │
//!      grp-<h>-eg: jump pol-…-eg; …; counter drop   ◄─────────────────────────────────┘
//!      pol-<h>-<ns>-<name>-in: ip saddr @sel-<h>-v4 tcp dport 80 accept comment "ns/name ingress[0] …"
//! ```
//!
//! [`compile`] builds everything from scratch (start-up, and the reference the incremental
//! [`crate::engine::Engine`] is tested against). The pieces ([`base_ruleset`],
//! [`policy_chain`], [`SetSpec::elements`], [`group_chain`]) are shared by both.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{
    Cluster, Direction, IpBlock, NamespaceScope, Peer, Pod, PodSelection, Policy, PolicyRule,
    PortSpec, family_of,
};
use crate::ruleset::{
    Action, AddrField, BaseHook, Chain, ChainDef, ChainPolicy, ChainType, CtMarkField, CtState,
    Family, Hook, IfaceField, Key, KeyField, LogSpec, MAX_COMMENT_BYTES, MAX_LOG_PREFIX_BYTES,
    MAX_NAME_BYTES, Match, Protocol, Rule, Ruleset, Set, SetDef, Value, Verdict, fit_comment,
    object_name, short_hash,
};

/// Name prefix of the host side of every pod's veth.
pub const POD_IFACE_PREFIX: &str = "weft";

/// Where the ids of the admitting rules go in a connection's conntrack mark.
///
/// Two contiguous fields of `bits` bits each: the ingress rule id at `shift`, the egress rule
/// id just above it. Every other bit of the mark is left as it was (kube-proxy and others use
/// marks too). Id 0 in a field means no rule of this node admitted the connection in that
/// direction: the pod is not isolated for it, the other end's node judged it, or the traffic
/// is between a pod and its own node (which never crosses the forward hook).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MarkLayout {
    /// Bit position of the ingress field; the egress field starts at `shift + bits`.
    pub shift: u32,
    /// Width of each field, 1..=16 bits; ids run from 1 to `2^bits - 1`.
    pub bits: u32,
}

impl Default for MarkLayout {
    /// 12 + 12 bits from bit 8: ingress `0x000fff00`, egress `0xfff00000`.
    fn default() -> MarkLayout {
        MarkLayout { shift: 8, bits: 12 }
    }
}

impl MarkLayout {
    /// A layout, if both fields fit in 32 bits.
    pub fn new(shift: u32, bits: u32) -> Result<MarkLayout, String> {
        if !(1..=16).contains(&bits) || shift + 2 * bits > 32 {
            return Err(format!(
                "conntrack mark layout shift {shift} bits {bits}: two fields of 1..=16 bits must fit in 32 bits"
            ));
        }
        Ok(MarkLayout { shift, bits })
    }

    /// The bits of one direction's field.
    pub fn field(self, direction: Direction) -> u32 {
        let ones = (1u32 << self.bits) - 1;
        match direction {
            Direction::Ingress => ones << self.shift,
            Direction::Egress => ones << (self.shift + self.bits),
        }
    }

    /// The largest id a field holds.
    pub fn max_id(self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// The id one direction's field of `mark` holds (0: none).
    pub fn id(self, mark: u32, direction: Direction) -> u32 {
        let shift = match direction {
            Direction::Ingress => self.shift,
            Direction::Egress => self.shift + self.bits,
        };
        (mark & self.field(direction)) >> shift
    }

    /// The statement that writes `id` into one direction's field.
    pub fn write(self, direction: Direction, id: u32) -> CtMarkField {
        let field = self.field(direction);
        CtMarkField {
            field,
            value: (id << field.trailing_zeros()) & field,
        }
    }
}

/// The rate-limited nflog statement before each group chain's final drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropLog {
    /// nflog group.
    pub group: u16,
    /// Packets per second logged, per group chain.
    pub rate_per_second: u64,
    /// Burst.
    pub burst: u32,
}

/// What the compiled table records about the traffic it judges, besides verdicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Observability {
    /// Conntrack marks naming the admitting rules (`None`: accept rules leave marks alone).
    pub marks: Option<MarkLayout>,
    /// Log denied new connections (`None`: only counted).
    pub drop_log: Option<DropLog>,
}

impl Default for Observability {
    /// Marks on with the default layout, no drop log.
    fn default() -> Observability {
        Observability {
            marks: Some(MarkLayout::default()),
            drop_log: None,
        }
    }
}

static OBSERVABILITY: std::sync::OnceLock<Observability> = std::sync::OnceLock::new();

/// Sets this process's [`Observability`] once, before anything is compiled (the agent does it
/// from its flags). Everything compiled afterwards, from scratch or incrementally, uses it; a
/// second call is refused so that two parts of one process never disagree about the table.
pub fn configure(o: Observability) -> Result<(), String> {
    OBSERVABILITY
        .set(o)
        .map_err(|_| "the compiler's observability settings were already fixed".to_string())?;
    Ok(())
}

/// This process's [`Observability`] ([`Observability::default`] unless [`configure`]d).
pub fn observability() -> Observability {
    OBSERVABILITY.get().copied().unwrap_or_default()
}

/// The node-local id of one policy rule entry (rule `ri`, peer `pi`, port `qi` of one direction
/// of one policy): 1..=`max_id`, derived from that position alone, so the same entry has the
/// same id in every process and after every restart (adoption sees no difference) and other
/// policies coming and going never move it. Distinct entries may share an id (a field of 12
/// bits holds 4095): `weft flows` then confirms which of them admits the connection.
pub fn rule_id(
    policy: &Policy,
    direction: Direction,
    ri: usize,
    pi: Option<usize>,
    qi: Option<usize>,
    max_id: u32,
) -> u32 {
    let text = format!(
        "{}:{}:{ri}:{}:{}",
        policy.key,
        direction.short(),
        pi.map_or(-1, |i| i as i64),
        qi.map_or(-1, |i| i as i64)
    );
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    1 + (h % u64::from(max_id.max(1))) as u32
}

/// Names of the fixed objects of the table (no prefix inside our own table).
pub mod names {
    /// Base chain judging what local pods send (runs first).
    pub const EGRESS_CHAIN: &str = "egress";
    /// Base chain judging what local pods receive.
    pub const INGRESS_CHAIN: &str = "ingress";

    /// Verdict map: isolated local pod IP → its egress group chain.
    pub fn egress_dispatch(f: crate::ruleset::Family) -> String {
        format!("egress-dispatch-{}", f.suffix())
    }
    /// Verdict map: isolated local pod IP → its ingress group chain.
    pub fn ingress_dispatch(f: crate::ruleset::Family) -> String {
        format!("ingress-dispatch-{}", f.suffix())
    }
    /// Set of the IPs of this node's pods.
    pub fn pods_local(f: crate::ruleset::Family) -> String {
        format!("pods-local-{}", f.suffix())
    }
}

/// The dispatch map of a direction and family.
pub fn dispatch_map(direction: Direction, family: Family) -> String {
    match direction {
        Direction::Ingress => names::ingress_dispatch(family),
        Direction::Egress => names::egress_dispatch(family),
    }
}

/// The tables's skeleton: base chains with their fixed rules, dispatch maps, local pod sets.
/// Identical on every node; only elements differ.
pub fn base_ruleset(table: &str) -> Ruleset {
    let mut rs = Ruleset::new(table);
    for family in Family::ALL {
        let addr = family.addr_type();
        for (name, comment) in [
            (
                names::egress_dispatch(family),
                "isolated local pod -> its egress group chain",
            ),
            (
                names::ingress_dispatch(family),
                "isolated local pod -> its ingress group chain",
            ),
        ] {
            rs.sets.insert(
                name.clone(),
                Set::new(SetDef {
                    name,
                    key: vec![addr],
                    interval: false,
                    verdict_map: true,
                    comment: Some(comment.to_string()),
                }),
            );
        }
        let name = names::pods_local(family);
        rs.sets.insert(
            name.clone(),
            Set::new(SetDef {
                name,
                key: vec![addr],
                interval: false,
                verdict_map: false,
                comment: Some("pods of this node".to_string()),
            }),
        );
    }

    let established = Rule {
        matches: vec![Match::Ct(CtState::EstablishedRelated)],
        counter: false,
        action: Action::Verdict(Verdict::Accept),
        comment: Some("established flows keep going".to_string()),
    };
    let from_pod = Match::IfacePrefix {
        field: IfaceField::Input,
        prefix: POD_IFACE_PREFIX.to_string(),
    };
    let to_pod = Match::IfacePrefix {
        field: IfaceField::Output,
        prefix: POD_IFACE_PREFIX.to_string(),
    };

    // Egress runs first: anti-spoofing must come before any dispatch on the source address.
    let mut egress = vec![
        established.clone(),
        Rule {
            matches: vec![from_pod.clone(), Match::FibSaddrIifMissing],
            counter: true,
            action: Action::Verdict(Verdict::Drop),
            comment: Some("anti-spoofing: source is not the pod behind this interface".into()),
        },
    ];
    let mut ingress = vec![established];
    for family in Family::ALL {
        let unknown = |field, iface: &Match, what: &str| Rule {
            matches: vec![
                iface.clone(),
                Match::AddrInSet {
                    family,
                    field,
                    set: names::pods_local(family),
                    negate: true,
                },
            ],
            counter: true,
            action: Action::Verdict(Verdict::Drop),
            comment: Some(format!("{what} a local pod weft does not know yet")),
        };
        egress.push(unknown(AddrField::Saddr, &from_pod, "fail closed: from"));
        ingress.push(unknown(AddrField::Daddr, &to_pod, "fail closed: to"));
    }
    for family in Family::ALL {
        egress.push(Rule {
            matches: vec![],
            counter: false,
            action: Action::Vmap {
                family,
                field: AddrField::Saddr,
                map: names::egress_dispatch(family),
            },
            comment: Some("isolated pods: judge their egress".into()),
        });
        ingress.push(Rule {
            matches: vec![],
            counter: false,
            action: Action::Vmap {
                family,
                field: AddrField::Daddr,
                map: names::ingress_dispatch(family),
            },
            comment: Some("isolated pods: judge their ingress".into()),
        });
    }
    for (name, priority, rules) in [
        (names::EGRESS_CHAIN, -1, egress),
        (names::INGRESS_CHAIN, 0, ingress),
    ] {
        rs.chains.insert(
            name.to_string(),
            Chain {
                def: ChainDef {
                    name: name.to_string(),
                    base: Some(BaseHook {
                        kind: ChainType::Filter,
                        hook: Hook::Forward,
                        priority,
                        policy: ChainPolicy::Accept,
                    }),
                },
                rules,
            },
        );
    }
    rs
}

/// Whose named ports a named-port set holds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortScope {
    /// Pods of a selection (egress to pod peers): ports resolve on the destination.
    Selection(PodSelection),
    /// Every member pod of the cluster (egress to an ipBlock or to anyone).
    AllPods,
    /// This node's pods of a policy's subject selection (ingress): ports resolve on the
    /// destination, which is the local subject pod.
    LocalSubjects(PodSelection),
}

/// A set a policy chain uses, by meaning; its name and elements derive from it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetSpec {
    /// IPs of the pods of a selection.
    Pods(PodSelection),
    /// An ipBlock: disjoint merged ranges (CIDR minus exceptions).
    Block(IpBlock),
    /// (IP, protocol, port) of the pods in scope that declare a named port.
    NamedPort {
        /// Whose ports.
        scope: PortScope,
        /// Port name.
        name: String,
        /// Protocol the container port must have.
        protocol: Protocol,
    },
}

impl SetSpec {
    /// Canonical text of the meaning (hashed into the name, shown in the comment).
    pub fn canonical(&self) -> String {
        match self {
            SetSpec::Pods(sel) => format!("pods {}", sel.canonical()),
            SetSpec::Block(b) => format!("ipblock {}", b.canonical()),
            SetSpec::NamedPort {
                scope,
                name,
                protocol,
            } => {
                let scope = match scope {
                    PortScope::Selection(s) => format!("pods {}", s.canonical()),
                    PortScope::AllPods => "all pods".to_string(),
                    PortScope::LocalSubjects(s) => format!("local pods {}", s.canonical()),
                };
                format!("port {name}/{} of {scope}", protocol.api_name())
            }
        }
    }

    /// The set's name for one family, e.g. `sel-k3j2a9bq-v4`.
    pub fn name(&self, family: Family) -> String {
        let kind = match self {
            SetSpec::Pods(_) => "sel",
            SetSpec::Block(_) => "cidr",
            SetSpec::NamedPort { .. } => "nport",
        };
        format!(
            "{kind}-{}-{}",
            short_hash(&self.canonical()),
            family.suffix()
        )
    }

    /// The set's definition for one family.
    pub fn def(&self, family: Family) -> SetDef {
        let addr = family.addr_type();
        let (key, interval) = match self {
            SetSpec::Pods(_) => (vec![addr], false),
            SetSpec::Block(_) => (vec![addr], true),
            SetSpec::NamedPort { .. } => (
                vec![addr, KeyField::InetProto, KeyField::InetService],
                false,
            ),
        };
        SetDef {
            name: self.name(family),
            key,
            interval,
            verdict_map: false,
            comment: Some(fit_comment(&self.canonical())),
        }
    }

    /// Elements of the set for one family, computed from the whole cluster.
    pub fn elements(&self, cluster: &Cluster, node: &str, family: Family) -> BTreeSet<Key> {
        match self {
            SetSpec::Pods(sel) => cluster
                .select(sel)
                .filter_map(|p| p.ip(family))
                .map(|ip| Key::point(vec![addr_value(ip)]))
                .collect(),
            SetSpec::Block(block) => block_ranges(block)
                .into_iter()
                .filter(|(from, _)| family_of(*from) == family)
                .map(|(from, to)| Key::range(vec![addr_value(from)], vec![addr_value(to)]))
                .collect(),
            SetSpec::NamedPort {
                scope,
                name,
                protocol,
            } => {
                let pods: Box<dyn Iterator<Item = &Pod>> = match scope {
                    PortScope::Selection(sel) => Box::new(cluster.select(sel)),
                    PortScope::AllPods => Box::new(cluster.pods.values().filter(|p| p.is_member())),
                    PortScope::LocalSubjects(sel) => {
                        Box::new(cluster.select(sel).filter(move |p| p.node == node))
                    }
                };
                pods.flat_map(|p| named_port_keys(p, name, *protocol, family))
                    .collect()
            }
        }
    }
}

/// The named-port elements one pod contributes: (its IP, protocol, each matching port).
pub fn named_port_keys(pod: &Pod, name: &str, protocol: Protocol, family: Family) -> Vec<Key> {
    let Some(ip) = pod.ip(family) else {
        return Vec::new();
    };
    pod.named_port(name, protocol)
        .map(|port| {
            Key::point(vec![
                addr_value(ip),
                Value::Proto(protocol.number()),
                Value::Port(port),
            ])
        })
        .collect()
}

/// An address as a set key value.
pub fn addr_value(ip: IpAddr) -> Value {
    match ip {
        IpAddr::V4(a) => Value::V4(a),
        IpAddr::V6(a) => Value::V6(a),
    }
}

/// CIDR minus exceptions as disjoint, merged, inclusive ranges in ascending order.
pub fn block_ranges(block: &IpBlock) -> Vec<(IpAddr, IpAddr)> {
    let to_u128 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    let v4 = matches!(block.cidr.addr(), IpAddr::V4(_));
    let from_u128 = |n: u128| -> IpAddr {
        if v4 {
            IpAddr::V4(
                u32::try_from(n)
                    .expect("IPv4 range stays within u32")
                    .into(),
            )
        } else {
            IpAddr::V6(n.into())
        }
    };
    let mut ranges = vec![(
        to_u128(block.cidr.network()),
        to_u128(block.cidr.broadcast()),
    )];
    let mut excepts: Vec<(u128, u128)> = block
        .except
        .iter()
        .map(|e| (to_u128(e.network()), to_u128(e.broadcast())))
        .collect();
    excepts.sort();
    for (elo, ehi) in excepts {
        let mut next = Vec::new();
        for (lo, hi) in ranges {
            if ehi < lo || elo > hi {
                next.push((lo, hi));
                continue;
            }
            if elo > lo {
                next.push((lo, elo - 1));
            }
            if ehi < hi {
                next.push((ehi + 1, hi));
            }
        }
        ranges = next;
    }
    ranges.sort();
    // Merge touching ranges (exceptions never create overlaps, but keep the invariant local).
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (lo, hi) in ranges {
        match merged.last_mut() {
            Some(last) if last.1.checked_add(1) == Some(lo) || last.1 >= lo => {
                last.1 = last.1.max(hi)
            }
            _ => merged.push((lo, hi)),
        }
    }
    merged
        .into_iter()
        .map(|(lo, hi)| (from_u128(lo), from_u128(hi)))
        .collect()
}

/// Name of a policy's chain for one direction: `pol-<hash>-<ns>-<name>-in`.
pub fn policy_chain_name(policy: &Policy, direction: Direction) -> String {
    let hash = short_hash(&format!("{}:{}", policy.key, direction.short()));
    let suffix = format!("-{}", direction.short());
    let mut name = object_name(
        "pol",
        &hash,
        &format!("{}-{}", policy.key.namespace, policy.key.name),
    );
    name.truncate(MAX_NAME_BYTES - suffix.len());
    name + &suffix
}

/// Name of the group chain for a set of policy chains: `grp-<hash>-in`.
pub fn group_chain_name(policy_chains: &[String], direction: Direction) -> String {
    format!(
        "grp-{}-{}",
        short_hash(&policy_chains.join(",")),
        direction.short()
    )
}

/// A group chain: tries each policy's chain in order, drops what none accepted.
pub fn group_chain(
    name: &str,
    policy_chains: &[String],
    policies: &[&Policy],
    direction: Direction,
) -> Chain {
    group_chain_with(name, policy_chains, policies, direction, observability())
}

/// [`group_chain`] with explicit [`Observability`] settings.
pub fn group_chain_with(
    name: &str,
    policy_chains: &[String],
    policies: &[&Policy],
    direction: Direction,
    obs: Observability,
) -> Chain {
    let mut rules: Vec<Rule> = policy_chains
        .iter()
        .map(|c| Rule {
            matches: vec![],
            counter: false,
            action: Action::Verdict(Verdict::Jump(c.clone())),
            comment: None,
        })
        .collect();
    let who: Vec<String> = policies.iter().map(|p| p.key.to_string()).collect();
    if let Some(log) = obs.drop_log {
        let mut prefix = format!("weft-drop {name} ");
        prefix.truncate(MAX_LOG_PREFIX_BYTES);
        rules.push(Rule {
            matches: vec![],
            counter: false,
            action: Action::LogLimited(LogSpec {
                rate_per_second: log.rate_per_second,
                burst: log.burst,
                group: log.group,
                prefix,
            }),
            comment: Some(fit_comment(&format!(
                "log denied new {} connections (rate-limited)",
                direction.api_name()
            ))),
        });
    }
    rules.push(Rule {
        matches: vec![],
        counter: true,
        action: Action::Verdict(Verdict::Drop),
        comment: Some(fit_comment(&format!(
            "{} isolated by {}: no rule allows",
            direction.api_name(),
            who.join(", ")
        ))),
    });
    Chain {
        def: ChainDef {
            name: name.to_string(),
            base: None,
        },
        rules,
    }
}

/// One policy's chain for one direction, and the sets its rules use.
///
/// Each (rule, peer, port) becomes one nft rule per family it concerns; a rule that allows
/// from anyone on a numbered port is family-independent and written once. A rule whose peers or
/// ports were all unusable writes nothing (fail closed).
pub fn policy_chain(policy: &Policy, direction: Direction) -> (Chain, BTreeSet<(SetSpec, Family)>) {
    policy_chain_with(policy, direction, observability())
}

/// [`policy_chain`] with explicit [`Observability`] settings.
pub fn policy_chain_with(
    policy: &Policy,
    direction: Direction,
    obs: Observability,
) -> (Chain, BTreeSet<(SetSpec, Family)>) {
    let mut rules = Vec::new();
    let mut refs = BTreeSet::new();
    let subject = policy.subject_selection();
    for (ri, rule) in policy
        .rules(direction)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        emit_rule(
            policy,
            direction,
            obs.marks,
            (ri, rule),
            &subject,
            &mut rules,
            &mut refs,
        );
    }
    let chain = Chain {
        def: ChainDef {
            name: policy_chain_name(policy, direction),
            base: None,
        },
        rules,
    };
    (chain, refs)
}

#[allow(clippy::too_many_arguments)] // the rule's full context: direction, indices, outputs
fn emit_rule(
    policy: &Policy,
    direction: Direction,
    marks: Option<MarkLayout>,
    (ri, rule): (usize, &PolicyRule),
    subject: &PodSelection,
    rules: &mut Vec<Rule>,
    refs: &mut BTreeSet<(SetSpec, Family)>,
) {
    let peer_word = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    // (index for the comment, peer); None = any peer.
    let peers: Vec<(Option<usize>, Option<&Peer>)> = match &rule.peers {
        None => vec![(None, None)],
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, p)| (Some(i), Some(p)))
            .collect(),
    };
    let ports: Vec<(Option<usize>, Option<&PortSpec>)> = match &rule.ports {
        None => vec![(None, None)],
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, p)| (Some(i), Some(p)))
            .collect(),
    };
    let peer_field = match direction {
        Direction::Ingress => AddrField::Saddr,
        Direction::Egress => AddrField::Daddr,
    };
    for (pi, peer) in &peers {
        for (qi, port) in &ports {
            let mut comment = format!("{} {}[{ri}]", policy.key, direction.api_name());
            if let Some(pi) = pi {
                comment.push_str(&format!(" {peer_word}[{pi}]"));
            }
            if let Some(qi) = qi {
                comment.push_str(&format!(" ports[{qi}]"));
            }
            let (comment, accept) = match marks {
                Some(layout) => {
                    let id = rule_id(policy, direction, ri, *pi, *qi, layout.max_id());
                    (
                        Some(comment_with_id(&comment, id)),
                        Action::MarkAccept(layout.write(direction, id)),
                    )
                }
                None => (
                    Some(fit_comment(&comment)),
                    Action::Verdict(Verdict::Accept),
                ),
            };
            let families: Vec<Family> = match (peer, port) {
                (Some(Peer::Block(b)), _) => vec![b.family()],
                (Some(Peer::Pods(_)), _) | (_, Some(PortSpec::Named { .. })) => {
                    Family::ALL.to_vec()
                }
                (None, _) => vec![],
            };
            if families.is_empty() {
                // Any peer, numbered or no port: one family-independent rule.
                rules.push(Rule {
                    matches: port.map(port_match).into_iter().flatten().collect(),
                    counter: true,
                    action: accept.clone(),
                    comment: comment.clone(),
                });
                continue;
            }
            for family in families {
                let mut matches = Vec::new();
                // Egress to pods on a named port: the named-port set already holds exactly the
                // peer pods' (IP, protocol, port), so no separate peer match is needed.
                let named_egress_to_pods = direction == Direction::Egress
                    && matches!(port, Some(PortSpec::Named { .. }))
                    && matches!(peer, Some(Peer::Pods(_)));
                match peer {
                    Some(Peer::Pods(sel)) if !named_egress_to_pods => {
                        let spec = SetSpec::Pods(sel.clone());
                        matches.push(Match::AddrInSet {
                            family,
                            field: peer_field,
                            set: spec.name(family),
                            negate: false,
                        });
                        refs.insert((spec, family));
                    }
                    Some(Peer::Block(b)) => {
                        let spec = SetSpec::Block(b.clone());
                        matches.push(Match::AddrInSet {
                            family,
                            field: peer_field,
                            set: spec.name(family),
                            negate: false,
                        });
                        refs.insert((spec, family));
                    }
                    _ => {}
                }
                match port {
                    Some(PortSpec::Named { protocol, name }) => {
                        let scope = match (direction, peer) {
                            (Direction::Ingress, _) => PortScope::LocalSubjects(subject.clone()),
                            (Direction::Egress, Some(Peer::Pods(sel))) => {
                                PortScope::Selection(sel.clone())
                            }
                            (Direction::Egress, _) => PortScope::AllPods,
                        };
                        let spec = SetSpec::NamedPort {
                            scope,
                            name: name.clone(),
                            protocol: *protocol,
                        };
                        matches.push(Match::DestPortInSet {
                            family,
                            set: spec.name(family),
                        });
                        refs.insert((spec, family));
                    }
                    Some(other) => matches.extend(port_match(other)),
                    None => {}
                }
                rules.push(Rule {
                    matches,
                    counter: true,
                    action: accept.clone(),
                    comment: comment.clone(),
                });
            }
        }
    }
}

/// `text id=N`, the readable part cut so that the id always survives the comment limit.
fn comment_with_id(text: &str, id: u32) -> String {
    let suffix = format!(" id={id}");
    let room = MAX_COMMENT_BYTES - suffix.len();
    let mut head = text.to_string();
    if head.len() > room {
        let mut end = room - 3;
        while !head.is_char_boundary(end) {
            end -= 1;
        }
        head.truncate(end);
        head.push_str("...");
    }
    head + &suffix
}

/// The match of a numbered or protocol-only port entry (named ports use sets).
fn port_match(port: &PortSpec) -> Option<Match> {
    match port {
        PortSpec::AllPorts(p) => Some(Match::L4Proto(*p)),
        PortSpec::Numbers {
            protocol,
            first,
            last,
        } => Some(Match::DestPort {
            protocol: *protocol,
            first: *first,
            last: *last,
        }),
        PortSpec::Named { .. } => None,
    }
}

/// The policies isolating a local pod in one direction, ordered by their chain names.
pub fn isolating<'a>(cluster: &'a Cluster, pod: &Pod, direction: Direction) -> Vec<&'a Policy> {
    let mut out: Vec<&Policy> = cluster
        .policies_in_namespace(&pod.key.namespace)
        .filter(|p| p.rules(direction).is_some() && p.subject.matches(&pod.labels))
        .collect();
    out.sort_by_key(|p| policy_chain_name(p, direction));
    out
}

/// Compiles the whole desired table of `node` from scratch.
pub fn compile(cluster: &Cluster, node: &str, table: &str) -> Ruleset {
    let mut rs = base_ruleset(table);
    let local: Vec<&Pod> = cluster
        .pods
        .values()
        .filter(|p| p.is_member() && p.node == node)
        .collect();

    let mut needed: BTreeSet<(SetSpec, Family)> = BTreeSet::new();
    let mut policy_chains: BTreeMap<String, Chain> = BTreeMap::new();
    for pod in &local {
        for family in Family::ALL {
            if let Some(ip) = pod.ip(family) {
                insert_elem(
                    &mut rs,
                    &names::pods_local(family),
                    Key::point(vec![addr_value(ip)]),
                    None,
                );
            }
        }
        for direction in Direction::ALL {
            let policies = isolating(cluster, pod, direction);
            if policies.is_empty() {
                continue;
            }
            let chain_names: Vec<String> = policies
                .iter()
                .map(|p| policy_chain_name(p, direction))
                .collect();
            for p in &policies {
                let name = policy_chain_name(p, direction);
                if let std::collections::btree_map::Entry::Vacant(slot) = policy_chains.entry(name)
                {
                    let (chain, refs) = policy_chain(p, direction);
                    needed.extend(refs);
                    slot.insert(chain);
                }
            }
            let group = group_chain_name(&chain_names, direction);
            if !rs.chains.contains_key(&group) {
                let chain = group_chain(&group, &chain_names, &policies, direction);
                rs.chains.insert(group.clone(), chain);
            }
            for family in Family::ALL {
                if let Some(ip) = pod.ip(family) {
                    insert_elem(
                        &mut rs,
                        &dispatch_map(direction, family),
                        Key::point(vec![addr_value(ip)]),
                        Some(Verdict::Jump(group.clone())),
                    );
                }
            }
        }
    }
    rs.chains.extend(policy_chains);
    for (spec, family) in needed {
        let mut set = Set::new(spec.def(family));
        set.elements = spec
            .elements(cluster, node, family)
            .into_iter()
            .map(|k| (k, None))
            .collect();
        rs.sets.insert(set.def.name.clone(), set);
    }
    rs
}

fn insert_elem(rs: &mut Ruleset, set: &str, key: Key, data: Option<Verdict>) {
    rs.sets
        .get_mut(set)
        .expect("base_ruleset creates every fixed set")
        .elements
        .insert(key, data);
}

/// Whether a selection's namespace scope could include the namespace `ns`.
pub fn scope_mentions(sel: &PodSelection, ns: &str) -> bool {
    match &sel.namespaces {
        NamespaceScope::Own(own) => own == ns,
        NamespaceScope::Selected(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerPort, Namespace, ObjectKey, PolicyRule, ip_block};
    use crate::selector::LabelSelector;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(ns: &str, name: &str, node: &str, ips: &[&str], l: &[(&str, &str)]) -> Pod {
        Pod {
            key: ObjectKey::new(ns, name),
            uid: format!("uid-{name}"),
            labels: labels(l),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            node: node.into(),
            ports: vec![ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            host_network: false,
            terminated: false,
        }
    }

    /// Two namespaces, three pods (two on this node), an ingress policy with a named port, a
    /// namespace selector and an ipBlock with an exception, and a default-deny egress.
    fn shop() -> Cluster {
        let mut c = Cluster::default();
        for (ns, team) in [("shop", "a"), ("clients", "b")] {
            c.namespaces
                .insert(ns.into(), Namespace::new(ns, labels(&[("team", team)])));
        }
        for p in [
            pod(
                "shop",
                "api",
                "node-0",
                &["10.244.0.5", "fd00:10:244::5"],
                &[("app", "api")],
            ),
            pod("shop", "db", "node-0", &["10.244.0.6"], &[("app", "db")]),
            pod(
                "clients",
                "ui",
                "node-1",
                &["10.244.1.7", "fd00:10:244:1::7"],
                &[("app", "ui")],
            ),
        ] {
            c.pods.insert(p.key.clone(), p);
        }
        let api_ingress = Policy {
            key: ObjectKey::new("shop", "api-ingress"),
            uid: String::new(),
            subject: LabelSelector::from_labels([("app", "api")]),
            ingress: Some(vec![
                PolicyRule {
                    peers: Some(vec![Peer::Pods(PodSelection {
                        namespaces: NamespaceScope::Selected(LabelSelector::from_labels([(
                            "team", "b",
                        )])),
                        pods: LabelSelector::from_labels([("app", "ui")]),
                    })]),
                    ports: Some(vec![PortSpec::Named {
                        protocol: Protocol::Tcp,
                        name: "http".into(),
                    }]),
                },
                PolicyRule {
                    peers: Some(vec![Peer::Block(
                        ip_block("10.0.0.0/8", &["10.244.0.0/16".into()]).unwrap(),
                    )]),
                    ports: Some(vec![PortSpec::Numbers {
                        protocol: Protocol::Tcp,
                        first: 8000,
                        last: 8100,
                    }]),
                },
            ]),
            egress: None,
            errors: vec![],
        };
        let deny_egress = Policy {
            key: ObjectKey::new("shop", "default-deny-egress"),
            uid: String::new(),
            subject: LabelSelector::everything(),
            ingress: None,
            egress: Some(vec![PolicyRule {
                peers: None,
                ports: Some(vec![PortSpec::Numbers {
                    protocol: Protocol::Udp,
                    first: 53,
                    last: 53,
                }]),
            }]),
            errors: vec![],
        };
        for p in [api_ingress, deny_egress] {
            c.policies.insert(p.key.clone(), p);
        }
        c
    }

    /// Compares with a golden file; `WEFT_UPDATE_GOLDEN=1` rewrites it.
    fn golden(name: &str, got: &str) {
        let path = format!("{}/src/golden/{name}", env!("CARGO_MANIFEST_DIR"));
        if std::env::var_os("WEFT_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, got).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e} (run with WEFT_UPDATE_GOLDEN=1 once)"));
        if want != got {
            let first = want
                .lines()
                .zip(got.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(want.lines().count().min(got.lines().count()));
            panic!(
                "{path} differs from the compiled ruleset at line {}:\n--- golden\n{}\n--- compiled\n{}",
                first + 1,
                want.lines().nth(first).unwrap_or("<end>"),
                got.lines().nth(first).unwrap_or("<end>")
            );
        }
    }

    #[test]
    fn golden_shop_on_the_node_with_the_api() {
        golden(
            "shop-node-0.nft",
            &compile(&shop(), "node-0", "weft").to_string(),
        );
    }

    #[test]
    fn golden_shop_on_a_node_without_isolated_pods() {
        // node-1 holds only `clients/ui`, which no policy selects: the skeleton and its pod.
        golden(
            "shop-node-1.nft",
            &compile(&shop(), "node-1", "weft").to_string(),
        );
    }

    #[test]
    fn golden_empty_cluster() {
        golden(
            "empty.nft",
            &compile(&Cluster::default(), "node-0", "weft").to_string(),
        );
    }

    #[test]
    fn pods_sharing_policies_share_one_group_chain() {
        let mut c = shop();
        let mut twin = c.pods[&ObjectKey::new("shop", "api")].clone();
        twin.key.name = "api-2".into();
        twin.ips = vec!["10.244.0.9".parse().unwrap()];
        c.pods.insert(twin.key.clone(), twin);
        let rs = compile(&c, "node-0", "weft");
        let groups: Vec<&String> = rs.chains.keys().filter(|n| n.starts_with("grp-")).collect();
        // api+api-2 share (api-ingress) in and (deny-egress) out; db has only deny-egress out.
        assert_eq!(groups.len(), 2, "{groups:?}");
        let map = &rs.sets[&names::ingress_dispatch(Family::V4)].elements;
        assert_eq!(map.len(), 2);
        let verdicts: BTreeSet<_> = map.values().collect();
        assert_eq!(verdicts.len(), 1);
    }

    #[test]
    fn block_ranges_subtract_exceptions_into_disjoint_ranges() {
        let b = ip_block("10.0.0.0/8", &["10.1.0.0/16".into(), "10.0.0.0/24".into()]).unwrap();
        let r: Vec<String> = block_ranges(&b)
            .into_iter()
            .map(|(a, z)| format!("{a}-{z}"))
            .collect();
        assert_eq!(r, vec!["10.0.1.0-10.0.255.255", "10.2.0.0-10.255.255.255"]);
        let all6 = ip_block("::/0", &[]).unwrap();
        assert_eq!(block_ranges(&all6).len(), 1);
    }

    #[test]
    fn a_rule_whose_peers_were_all_unusable_allows_nothing_but_still_isolates() {
        let mut c = shop();
        let p = c
            .policies
            .get_mut(&ObjectKey::new("shop", "api-ingress"))
            .unwrap();
        p.ingress = Some(vec![PolicyRule {
            peers: Some(vec![]),
            ports: None,
        }]);
        let name = policy_chain_name(p, Direction::Ingress);
        let rs = compile(&c, "node-0", "weft");
        assert!(rs.chains[&name].rules.is_empty());
        assert_eq!(
            rs.sets[&names::ingress_dispatch(Family::V4)].elements.len(),
            1
        );
    }

    #[test]
    fn accept_rules_count_and_write_their_id_into_the_mark_field_of_their_direction() {
        let layout = MarkLayout::default();
        let rs = compile(&shop(), "node-0", "weft");
        let mut seen = 0;
        for chain in rs
            .chains
            .values()
            .filter(|c| c.def.name.starts_with("pol-"))
        {
            let direction = if chain.def.name.ends_with("-in") {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            for r in &chain.rules {
                let Action::MarkAccept(mark) = r.action else {
                    panic!("{r}: policy rules accept with a mark");
                };
                assert!(r.counter, "{r}");
                let id = crate::ruleset::rule_id_from_comment(r.comment.as_deref().unwrap())
                    .expect("the comment carries the id");
                assert!((1..=layout.max_id()).contains(&id));
                assert_eq!(mark, layout.write(direction, id), "{r}");
                assert_eq!(layout.id(mark.apply(0x0000_00ab), direction), id);
                // The other direction's field and the bits outside both are left alone.
                let other = match direction {
                    Direction::Ingress => Direction::Egress,
                    Direction::Egress => Direction::Ingress,
                };
                let before = 0x0000_00ab | layout.write(other, 77).value;
                assert_eq!(mark.apply(before) & !mark.field, before & !mark.field);
                seen += 1;
            }
        }
        assert_eq!(seen, 4);
    }

    #[test]
    fn rule_ids_are_pinned_to_the_rule_position_not_to_the_rest_of_the_cluster() {
        // Pinned: a change here renumbers every connection mark across an upgrade.
        let c = shop();
        let api = &c.policies[&ObjectKey::new("shop", "api-ingress")];
        assert_eq!(
            rule_id(api, Direction::Ingress, 0, Some(0), Some(0), 4095),
            4070
        );
        assert_eq!(
            rule_id(api, Direction::Ingress, 1, Some(0), Some(0), 4095),
            2949
        );
        // Another policy appearing does not move them.
        let mut more = c.clone();
        let mut other = api.clone();
        other.key.name = "zzz".into();
        more.policies.insert(other.key.clone(), other);
        let a = compile(&c, "node-0", "weft");
        let b = compile(&more, "node-0", "weft");
        let name = policy_chain_name(api, Direction::Ingress);
        assert_eq!(a.chains[&name], b.chains[&name]);
        // Every id fits its field, for narrow fields too.
        for bits in [1, 3, 12, 16] {
            let l = MarkLayout::new(0, bits).unwrap();
            for ri in 0..50 {
                let id = rule_id(api, Direction::Egress, ri, None, Some(1), l.max_id());
                assert!((1..=l.max_id()).contains(&id));
                assert_eq!(
                    l.id(l.write(Direction::Egress, id).apply(0), Direction::Egress),
                    id
                );
            }
        }
    }

    #[test]
    fn mark_layouts_must_fit_in_32_bits() {
        assert!(MarkLayout::new(8, 12).is_ok());
        assert!(MarkLayout::new(0, 16).is_ok());
        assert!(MarkLayout::new(9, 12).is_err());
        assert!(MarkLayout::new(0, 0).is_err());
        let l = MarkLayout::default();
        assert_eq!(l.field(Direction::Ingress), 0x000f_ff00);
        assert_eq!(l.field(Direction::Egress), 0xfff0_0000);
    }

    #[test]
    fn without_marks_policy_rules_accept_plainly_and_carry_no_id() {
        let c = shop();
        let api = &c.policies[&ObjectKey::new("shop", "api-ingress")];
        let obs = Observability {
            marks: None,
            drop_log: None,
        };
        let (chain, _) = policy_chain_with(api, Direction::Ingress, obs);
        for r in &chain.rules {
            assert_eq!(r.action, Action::Verdict(Verdict::Accept));
            assert!(r.counter);
            assert_eq!(
                crate::ruleset::rule_id_from_comment(r.comment.as_deref().unwrap()),
                None
            );
        }
    }

    #[test]
    fn the_drop_log_comes_right_before_the_counted_drop() {
        let c = shop();
        let api = &c.policies[&ObjectKey::new("shop", "api-ingress")];
        let chains = vec![policy_chain_name(api, Direction::Ingress)];
        let name = group_chain_name(&chains, Direction::Ingress);
        let obs = Observability {
            marks: Some(MarkLayout::default()),
            drop_log: Some(DropLog {
                group: 7,
                rate_per_second: 10,
                burst: 5,
            }),
        };
        let chain = group_chain_with(&name, &chains, &[api], Direction::Ingress, obs);
        let n = chain.rules.len();
        assert_eq!(
            chain.rules[n - 2].to_string(),
            format!(
                "limit rate 10/second log prefix \"weft-drop {name} \" group 7 comment \"log denied new ingress connections (rate-limited)\""
            )
        );
        assert_eq!(chain.rules[n - 1].action, Action::Verdict(Verdict::Drop));
        assert!(chain.rules[n - 1].counter);
        let plain = group_chain(&name, &chains, &[api], Direction::Ingress);
        assert_eq!(plain.rules.len(), n - 1);
    }

    #[test]
    fn long_names_keep_their_rule_id_in_the_comment() {
        let c = comment_with_id(&"é".repeat(100), 4095);
        assert!(c.len() <= MAX_COMMENT_BYTES);
        assert!(c.ends_with("... id=4095"), "{c}");
        assert_eq!(crate::ruleset::rule_id_from_comment(&c), Some(4095));
        assert_eq!(
            comment_with_id("ns/p ingress[0]", 3),
            "ns/p ingress[0] id=3"
        );
    }

    #[test]
    fn names_and_comments_fit_the_kernel() {
        let mut c = shop();
        let long = "n".repeat(253);
        let mut p = c.policies[&ObjectKey::new("shop", "api-ingress")].clone();
        p.key.name = long;
        c.policies.insert(p.key.clone(), p);
        let rs = compile(&c, "node-0", "weft");
        for (name, chain) in &rs.chains {
            assert!(name.len() <= crate::ruleset::MAX_NAME_BYTES, "{name}");
            for r in &chain.rules {
                let len = r.comment.as_deref().map_or(0, str::len);
                assert!(len <= crate::ruleset::MAX_COMMENT_BYTES, "{r}");
            }
        }
    }
}
