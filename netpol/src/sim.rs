//! The packet simulator: walks a [`crate::Ruleset`] for one packet as the kernel would.
//!
//! [`simulate`] runs one [`Packet`] through every base chain of one [`Hook`] the way
//! `nft_do_chain` does, and returns a [`Trace`]: the final [`Decision`], every step taken
//! (which rule matched or why not, jumps, returns, policies), and the rule that decided.
//! [`Trace::explain`] prints it for people (`weft explain`); property tests hold its verdict
//! equal to the oracle's ([`crate::eval`]). Pure: no kernel, no clock; routing, the one
//! thing a rule asks of the node, comes through the [`Routes`] trait.
//!
//! # What is modelled, as the kernel does it
//!
//! - **Base chains** of the hook run in ascending priority. Ties are broken by chain name,
//!   which is our choice, not the kernel's: it runs hooks of equal priority in registration
//!   order, most recently registered first, and a `Ruleset` does not record that order. The
//!   compiler should never emit two base chains of one hook with equal priority.
//! - **`accept` ends the current base chain only**: the next base chain of the hook still
//!   judges the packet. **`drop` is final.** A base chain that ends without a verdict applies
//!   its policy. After the last base chain the packet is accepted.
//! - **`jump`** runs the target chain; if it ends without a verdict the walk returns to the
//!   caller's next rule. `accept` / `drop` inside a jumped chain act as in the base chain.
//! - **`vmap`**: a key found in the map applies the element's verdict (accept, drop or a jump
//!   that returns to the rule after the vmap); no element means no verdict: next rule.
//! - **Implicit guards** nft adds in an `inet` table: an `ip`/`ip6` address match or vmap
//!   holds only for packets of that family, negated or not (`meta nfproto` fails first);
//!   `tcp dport` holds only for that protocol (`meta l4proto`).
//! - **Sets**: a plain set holds exact keys; an interval set holds ranges, and a
//!   concatenated range is matched field by field (each field within its own bounds), as the
//!   kernel's `pipapo` set type does.
//! - **nat chains** are consulted only for the first packet of a connection
//!   ([`CtInfo::New`]), as `nf_nat` calls them only while a connection has no binding yet.
//!
//! # Faults
//!
//! The kernel validates a table when it is committed and refuses jumps to missing or base
//! chains, jump loops (`ELOOP`), chains nested deeper than [`MAX_JUMP_DEPTH`] (`EMLINK`),
//! lookups in missing sets and verdict maps without verdicts. Such a table never reaches a
//! packet. When the simulator meets one on the packet's path it records a [`Fault`] and drops
//! the packet; [`Trace::fault`] tells a fault from a real drop. Only the path the packet takes
//! is checked: a loop elsewhere in the table goes unnoticed here.

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use crate::ruleset::{
    Action, AddrField, Chain, ChainPolicy, ChainType, CtState, Family, Hook, IfaceField, KeyField,
    Match, Rule, Ruleset, Set, Value, Verdict,
};

/// How many jumps may nest below a base chain: 15.
///
/// The kernel's jump stack holds `NFT_JUMP_STACK_SIZE` (16) entries, but `nft_chain_validate`
/// refuses a table as soon as any chain is reachable at level 16 (the base chain is level 0),
/// so the deepest chain a loaded table can reach is 15 jumps down. A 16th nested jump is a
/// [`Fault::JumpTooDeep`].
pub const MAX_JUMP_DEPTH: usize = 15;

/// One packet, as the forward hook sees it (after DNAT, after conntrack).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Packet {
    /// Input interface name.
    pub iif: String,
    /// Output interface name.
    pub oif: String,
    /// Source address.
    pub src: IpAddr,
    /// Destination address (of the same family as `src`).
    pub dst: IpAddr,
    /// IANA transport protocol number: 6 tcp, 17 udp, 132 sctp, 1 / 58 icmp.
    pub l4proto: u8,
    /// Destination port; `None` for protocols without ports.
    pub dport: Option<u16>,
    /// Connection-tracking state.
    pub ct: CtInfo,
}

impl Packet {
    /// The packet's address family, or `None` if source and destination disagree (no real
    /// packet does; [`simulate`] reports it as [`Fault::MixedFamilies`]).
    pub fn family(&self) -> Option<Family> {
        match (self.src, self.dst) {
            (IpAddr::V4(_), IpAddr::V4(_)) => Some(Family::V4),
            (IpAddr::V6(_), IpAddr::V6(_)) => Some(Family::V6),
            _ => None,
        }
    }
}

impl fmt::Display for Packet {
    /// `10.0.0.1 -> 10.0.0.2 tcp dport 80 ct new iif weft1 oif weft2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {}",
            self.src,
            self.dst,
            Value::Proto(self.l4proto)
        )?;
        if let Some(port) = self.dport {
            write!(f, " dport {port}")?;
        }
        write!(f, " ct {} iif {} oif {}", self.ct, self.iif, self.oif)
    }
}

/// Connection-tracking state of a packet (`ct state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtInfo {
    /// The first packet of a connection.
    New,
    /// A packet of a connection conntrack has seen both ways.
    Established,
    /// A packet related to a known connection (ICMP errors, helper connections).
    Related,
}

impl fmt::Display for CtInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CtInfo::New => "new",
            CtInfo::Established => "established",
            CtInfo::Related => "related",
        })
    }
}

/// The node's routing table, as far as rules ask about it.
pub trait Routes {
    /// The interface the node routes `dst` to, if it has a route.
    ///
    /// `fib saddr . iif oif missing` holds when `route_iface(src)` is not the packet's input
    /// interface: there is no route back to the source through the interface it came in on.
    fn route_iface(&self, dst: IpAddr) -> Option<String>;
}

impl<F> Routes for F
where
    F: Fn(IpAddr) -> Option<String>,
{
    fn route_iface(&self, dst: IpAddr) -> Option<String> {
        self(dst)
    }
}

/// The final fate of a packet in one hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// The packet goes on.
    Accept,
    /// The packet is dropped.
    Drop,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Decision::Accept => "accept",
            Decision::Drop => "drop",
        })
    }
}

/// What [`simulate`] found: the decision, how the packet got there, and who decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// The final decision.
    pub verdict: Decision,
    /// Every step, in order.
    pub steps: Vec<Step>,
    /// The rule behind the decision: `(chain, rule index, the rule's comment)`.
    ///
    /// For a drop, the rule that dropped; `None` if a chain policy dropped or a [`Fault`]
    /// did. For an accept, the last rule whose `accept` the packet took (in an earlier base
    /// chain, if the later ones only let it through by policy); `None` if no rule accepted.
    pub decided_by: Option<(String, usize, Option<String>)>,
    /// The bits the walk's `ct mark set` statements wrote into the connection's mark (which is
    /// taken to start at 0), also when the packet was dropped later.
    pub ct_mark: u32,
}

impl Trace {
    /// The fault that ended the walk, if the ruleset is one the kernel would have refused.
    pub fn fault(&self) -> Option<&Fault> {
        self.steps.iter().find_map(|s| match &s.event {
            Event::Fault(fault) => Some(fault),
            _ => None,
        })
    }

    /// The comment of the deciding rule, if any.
    pub fn decided_by_comment(&self) -> Option<&str> {
        self.decided_by.as_ref()?.2.as_deref()
    }

    /// The walk for people, one step a line, jumped chains indented below their caller.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        let mut depth = 0;
        for step in &self.steps {
            let indent = "  ".repeat(depth + 1);
            // `write!` into a String cannot fail.
            let _ = match (&step.event, step.rule) {
                (Event::EnterBase { priority }, _) => {
                    depth = 0;
                    writeln!(out, "chain {} (priority {priority})", step.chain)
                }
                (Event::SkipNat, _) => writeln!(out, "chain {}: {}", step.chain, step.event),
                (event, Some(rule)) => writeln!(out, "{indent}{}[{rule}] {event}", step.chain),
                (event, None) if step.chain.is_empty() => writeln!(out, "{event}"),
                (event, None) => writeln!(out, "{indent}{}: {event}", step.chain),
            };
            match &step.event {
                Event::Verdict {
                    verdict: Verdict::Jump(_),
                    ..
                }
                | Event::MapHit {
                    verdict: Verdict::Jump(_),
                    ..
                } => depth += 1,
                Event::Return { .. } => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        let _ = write!(out, "verdict: {}", self.verdict);
        let _ = match (&self.decided_by, self.fault()) {
            (_, Some(_)) => writeln!(out, " (fault)"),
            (Some((chain, rule, Some(comment))), _) => {
                writeln!(out, " by {chain}[{rule}] \"{comment}\"")
            }
            (Some((chain, rule, None)), _) => writeln!(out, " by {chain}[{rule}]"),
            (None, _) => writeln!(out, " (no rule decided)"),
        };
        out
    }
}

/// One step of the walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// The chain being walked (empty for a fault about the packet itself).
    pub chain: String,
    /// The rule's index in its chain, for steps about one rule.
    pub rule: Option<usize>,
    /// What happened.
    pub event: Event,
}

/// What happened in one [`Step`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A base chain of the hook starts judging the packet.
    EnterBase {
        /// The chain's hook priority.
        priority: i32,
    },
    /// A nat base chain was passed over: the packet is not the first of its connection.
    SkipNat,
    /// The rule did not match; the walk goes on with the next rule.
    NoMatch {
        /// The first expression that did not hold.
        failed: Failure,
    },
    /// The rule matched and gave its verdict.
    Verdict {
        /// The verdict.
        verdict: Verdict,
        /// The rule's comment.
        comment: Option<String>,
    },
    /// The rule matched and its verdict map has an element for the key.
    MapHit {
        /// The map.
        map: String,
        /// The key looked up.
        key: Value,
        /// The element's verdict, now applied.
        verdict: Verdict,
        /// The rule's comment.
        comment: Option<String>,
    },
    /// The rule matched but its verdict map has no element for the key: next rule.
    MapMiss {
        /// The map.
        map: String,
        /// The key looked up.
        key: Value,
    },
    /// A jumped-to chain ended without a verdict: back to the caller's next rule.
    Return {
        /// The caller.
        to: String,
    },
    /// A base chain ended without a verdict: its policy applies.
    Policy(ChainPolicy),
    /// The walk cannot go on; the packet is dropped.
    Fault(Fault),
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let comment = |f: &mut fmt::Formatter<'_>, c: &Option<String>| match c {
            Some(c) => write!(f, " comment \"{c}\""),
            None => Ok(()),
        };
        match self {
            Event::EnterBase { priority } => write!(f, "base chain, priority {priority}"),
            Event::SkipNat => {
                f.write_str("skipped: nat chains see only a connection's first packet")
            }
            Event::NoMatch { failed } => write!(f, "no match: {failed}"),
            Event::Verdict {
                verdict,
                comment: c,
            } => {
                write!(f, "{verdict}")?;
                comment(f, c)
            }
            Event::MapHit {
                map,
                key,
                verdict,
                comment: c,
            } => {
                write!(f, "@{map}[{key}]: {verdict}")?;
                comment(f, c)
            }
            Event::MapMiss { map, key } => write!(f, "@{map}[{key}]: no element, next rule"),
            Event::Return { to } => write!(f, "end of chain, back to {to}"),
            Event::Policy(ChainPolicy::Accept) => f.write_str("end of chain: policy accept"),
            Event::Policy(ChainPolicy::Drop) => f.write_str("end of chain: policy drop"),
            Event::Fault(fault) => write!(f, "fault: {fault}"),
        }
    }
}

/// Why a rule did not match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The implicit `meta nfproto` guard: the packet is not of this family.
    Family(Family),
    /// The expression itself did not hold.
    Match(Match),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Family(Family::V4) => f.write_str("meta nfproto ipv4"),
            Failure::Family(Family::V6) => f.write_str("meta nfproto ipv6"),
            Failure::Match(m) => write!(f, "{m}"),
        }
    }
}

/// A ruleset (or packet) the kernel would never have let a packet meet. Every fault drops.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// Source and destination addresses are of different families.
    #[error("packet {src} -> {dst} mixes address families")]
    MixedFamilies {
        /// Source address.
        src: IpAddr,
        /// Destination address.
        dst: IpAddr,
    },
    /// A jump to a chain that does not exist (the kernel refuses the rule: ENOENT).
    #[error("jump to chain {chain}, which does not exist")]
    UnknownChain {
        /// The missing chain.
        chain: String,
    },
    /// A jump to a base chain (the kernel refuses it).
    #[error("jump to base chain {chain}")]
    JumpToBaseChain {
        /// The base chain.
        chain: String,
    },
    /// A jump to a chain already being walked (the kernel refuses the table: ELOOP).
    #[error("jump loop: chain {chain} is already on the jump stack")]
    JumpLoop {
        /// The chain jumped to again.
        chain: String,
    },
    /// A jump nesting deeper than [`MAX_JUMP_DEPTH`] (the kernel refuses the table: EMLINK).
    #[error("jump to chain {chain} would nest {depth} jumps deep (at most {MAX_JUMP_DEPTH})")]
    JumpTooDeep {
        /// The chain jumped to.
        chain: String,
        /// Its nesting level (the base chain is 0).
        depth: usize,
    },
    /// A lookup in a set or map that does not exist (the kernel refuses the rule: ENOENT).
    #[error("set or map @{set} does not exist")]
    UnknownSet {
        /// The missing set.
        set: String,
    },
    /// A `vmap` on a set that is not a verdict map (the kernel refuses the rule: EINVAL).
    #[error("@{set} is not a verdict map")]
    NotAVerdictMap {
        /// The set.
        set: String,
    },
    /// A lookup whose key type differs from the set's.
    #[error("@{set} has key type {}, the rule looks up {}", key_type(.set_key), key_type(.lookup))]
    KeyTypeMismatch {
        /// The set.
        set: String,
        /// The set's key type.
        set_key: Vec<KeyField>,
        /// The type of the key the rule looks up.
        lookup: Vec<KeyField>,
    },
    /// A verdict-map element without a verdict.
    #[error("element {key} of verdict map @{map} has no verdict")]
    ElementWithoutVerdict {
        /// The map.
        map: String,
        /// The element's key.
        key: Value,
    },
}

/// `ipv4_addr . inet_proto . inet_service`.
fn key_type(fields: &[KeyField]) -> String {
    let names: Vec<&str> = fields.iter().map(|k| k.nft_name()).collect();
    names.join(" . ")
}

/// Runs `pkt` through every base chain of `hook` in `ruleset`, as `nf_tables` would.
///
/// See the [module docs](self) for the semantics. A [`Fault`] drops the packet and is
/// recorded in the trace.
pub fn simulate(ruleset: &Ruleset, hook: Hook, pkt: &Packet, routes: &dyn Routes) -> Trace {
    let mut walk = Walk {
        ruleset,
        pkt,
        routes,
        steps: Vec::new(),
        last_verdict: None,
        ct_mark: 0,
    };
    let (verdict, by_rule) = walk.run(hook);
    Trace {
        verdict,
        steps: walk.steps,
        decided_by: if by_rule { walk.last_verdict } else { None },
        ct_mark: walk.ct_mark,
    }
}

/// How the walk of one base chain (with the chains it jumped to) ended.
enum End {
    /// A rule accepted: on to the next base chain.
    Accept,
    /// A rule dropped: final.
    Drop,
    /// No verdict: the chain's policy applies.
    Fall,
    /// A fault: final drop.
    Fault,
}

/// What one rule did.
enum Outcome {
    /// No verdict (no match, or a map miss): next rule.
    Continue,
    /// A verdict to apply.
    Verdict(Verdict),
    /// A fault: stop.
    Fault,
}

/// The state of one simulation.
struct Walk<'a> {
    ruleset: &'a Ruleset,
    pkt: &'a Packet,
    routes: &'a dyn Routes,
    steps: Vec<Step>,
    /// The last rule that accepted or dropped.
    last_verdict: Option<(String, usize, Option<String>)>,
    /// The connection's mark as the rules taken so far left it.
    ct_mark: u32,
}

impl<'a> Walk<'a> {
    /// Walks the hook; returns the decision and whether a rule (not a policy or fault) made it.
    fn run(&mut self, hook: Hook) -> (Decision, bool) {
        let Some(family) = self.pkt.family() else {
            let fault = Fault::MixedFamilies {
                src: self.pkt.src,
                dst: self.pkt.dst,
            };
            self.record("", None, Event::Fault(fault));
            return (Decision::Drop, false);
        };
        let mut bases: Vec<(&Chain, i32, ChainType, ChainPolicy)> = self
            .ruleset
            .chains
            .values()
            .filter_map(|c| {
                let b = c.def.base.filter(|b| b.hook == hook)?;
                Some((c, b.priority, b.kind, b.policy))
            })
            .collect();
        // Ties by name: the kernel's order for equal priorities is not in the data.
        bases.sort_by(|a, b| (a.1, &a.0.def.name).cmp(&(b.1, &b.0.def.name)));
        for (chain, priority, kind, policy) in bases {
            let name = chain.def.name.as_str();
            if kind == ChainType::Nat && self.pkt.ct != CtInfo::New {
                self.record(name, None, Event::SkipNat);
                continue;
            }
            self.record(name, None, Event::EnterBase { priority });
            match self.walk_base(chain, family) {
                End::Accept => {}
                End::Drop => return (Decision::Drop, true),
                End::Fault => return (Decision::Drop, false),
                End::Fall => {
                    self.record(name, None, Event::Policy(policy));
                    if policy == ChainPolicy::Drop {
                        return (Decision::Drop, false);
                    }
                }
            }
        }
        (Decision::Accept, self.last_verdict.is_some())
    }

    /// Walks one base chain and the chains it jumps to, with a jump stack as the kernel's.
    fn walk_base(&mut self, base: &'a Chain, family: Family) -> End {
        let mut stack: Vec<(&'a Chain, usize)> = Vec::new();
        let (mut chain, mut next) = (base, 0);
        loop {
            let Some(rule) = chain.rules.get(next) else {
                let Some((caller, resume)) = stack.pop() else {
                    return End::Fall;
                };
                let to = caller.def.name.clone();
                self.record(&chain.def.name, None, Event::Return { to });
                (chain, next) = (caller, resume);
                continue;
            };
            let index = next;
            next += 1;
            match self.eval_rule(chain, index, rule, family) {
                Outcome::Continue => {}
                Outcome::Fault => return End::Fault,
                Outcome::Verdict(Verdict::Accept) => return End::Accept,
                Outcome::Verdict(Verdict::Drop) => return End::Drop,
                Outcome::Verdict(Verdict::Jump(target)) => {
                    match self.callee(&stack, chain, &target) {
                        Ok(callee) => {
                            stack.push((chain, next));
                            (chain, next) = (callee, 0);
                        }
                        Err(fault) => {
                            self.record(&chain.def.name, Some(index), Event::Fault(fault));
                            return End::Fault;
                        }
                    }
                }
            }
        }
    }

    /// The chain a jump from `current` (called through `stack`) enters, or why it cannot.
    fn callee(
        &self,
        stack: &[(&'a Chain, usize)],
        current: &Chain,
        target: &str,
    ) -> Result<&'a Chain, Fault> {
        let chain = target.to_string();
        let Some(callee) = self.ruleset.chains.get(target) else {
            return Err(Fault::UnknownChain { chain });
        };
        if callee.def.base.is_some() {
            return Err(Fault::JumpToBaseChain { chain });
        }
        let on_stack = stack.iter().any(|(c, _)| c.def.name == target);
        if on_stack || current.def.name == target {
            return Err(Fault::JumpLoop { chain });
        }
        let depth = stack.len() + 1;
        if depth > MAX_JUMP_DEPTH {
            return Err(Fault::JumpTooDeep { chain, depth });
        }
        Ok(callee)
    }

    /// Evaluates one rule: its matches in order, then its action.
    fn eval_rule(&mut self, chain: &Chain, index: usize, rule: &Rule, family: Family) -> Outcome {
        let name = chain.def.name.as_str();
        for m in &rule.matches {
            match self.holds(m, family) {
                Ok(true) => {}
                Ok(false) => {
                    let failed = match m {
                        Match::AddrInSet { family: f, .. }
                        | Match::DestPortInSet { family: f, .. }
                            if *f != family =>
                        {
                            Failure::Family(*f)
                        }
                        _ => Failure::Match(m.clone()),
                    };
                    self.record(name, Some(index), Event::NoMatch { failed });
                    return Outcome::Continue;
                }
                Err(fault) => {
                    self.record(name, Some(index), Event::Fault(fault));
                    return Outcome::Fault;
                }
            }
        }
        let comment = rule.comment.clone();
        let (map, field) = match &rule.action {
            Action::MarkAccept(mark) => {
                self.ct_mark = mark.apply(self.ct_mark);
                let verdict = Verdict::Accept;
                self.note_verdict(name, index, rule, &verdict);
                let event = Event::Verdict {
                    verdict: verdict.clone(),
                    comment,
                };
                self.record(name, Some(index), event);
                return Outcome::Verdict(verdict);
            }
            // Logging decides nothing: next rule.
            Action::LogLimited(_) => return Outcome::Continue,
            Action::Verdict(verdict) => {
                self.note_verdict(name, index, rule, verdict);
                let event = Event::Verdict {
                    verdict: verdict.clone(),
                    comment,
                };
                self.record(name, Some(index), event);
                return Outcome::Verdict(verdict.clone());
            }
            Action::Vmap { family: f, .. } if *f != family => {
                let failed = Failure::Family(*f);
                self.record(name, Some(index), Event::NoMatch { failed });
                return Outcome::Continue;
            }
            Action::Vmap { map, field, .. } => (map, *field),
            // Address translation decides nothing about filtering (nat base chains are passed
            // over anyway): no verdict, next rule.
            Action::Masquerade => return Outcome::Continue,
        };
        let key = addr_value(self.addr(field));
        let element = match self.lookup(map, &[key], true) {
            Ok(element) => element,
            Err(fault) => {
                self.record(name, Some(index), Event::Fault(fault));
                return Outcome::Fault;
            }
        };
        let map = map.clone();
        match element {
            None => {
                self.record(name, Some(index), Event::MapMiss { map, key });
                Outcome::Continue
            }
            Some(None) => {
                let fault = Fault::ElementWithoutVerdict { map, key };
                self.record(name, Some(index), Event::Fault(fault));
                Outcome::Fault
            }
            Some(Some(verdict)) => {
                self.note_verdict(name, index, rule, verdict);
                let event = Event::MapHit {
                    map,
                    key,
                    verdict: verdict.clone(),
                    comment,
                };
                self.record(name, Some(index), event);
                Outcome::Verdict(verdict.clone())
            }
        }
    }

    /// Whether one match expression holds for the packet (guards included).
    fn holds(&self, m: &Match, family: Family) -> Result<bool, Fault> {
        let pkt = self.pkt;
        Ok(match m {
            Match::Ct(CtState::EstablishedRelated) => {
                matches!(pkt.ct, CtInfo::Established | CtInfo::Related)
            }
            Match::IfacePrefix { field, prefix } => match field {
                IfaceField::Input => pkt.iif.starts_with(prefix.as_str()),
                IfaceField::Output => pkt.oif.starts_with(prefix.as_str()),
            },
            Match::FibSaddrIifMissing => {
                self.routes.route_iface(pkt.src).as_deref() != Some(pkt.iif.as_str())
            }
            Match::AddrInSet {
                family: f,
                field,
                set,
                negate,
            } => {
                if *f != family {
                    return Ok(false); // `meta nfproto` guard, before any negation
                }
                let key = addr_value(self.addr(*field));
                self.lookup(set, &[key], false)?.is_some() != *negate
            }
            Match::DestPortInSet { family: f, set } => {
                // `th dport` loads whatever sits at the port offset; the key also carries
                // `meta l4proto`, and elements only name protocols with ports, so a packet
                // without a port can never equal an element.
                let Some(port) = pkt.dport.filter(|_| *f == family) else {
                    return Ok(false);
                };
                let key = [
                    addr_value(pkt.dst),
                    Value::Proto(pkt.l4proto),
                    Value::Port(port),
                ];
                self.lookup(set, &key, false)?.is_some()
            }
            Match::L4Proto(p) => pkt.l4proto == p.number(),
            Match::DestPort {
                protocol,
                first,
                last,
            } => {
                pkt.l4proto == protocol.number()
                    && pkt.dport.is_some_and(|p| (*first..=*last).contains(&p))
            }
        })
    }

    /// Looks `key` up in the named set or map: `Some(data)` if an element holds it.
    fn lookup(
        &self,
        name: &str,
        key: &[Value],
        want_map: bool,
    ) -> Result<Option<&'a Option<Verdict>>, Fault> {
        let set: &'a Set = self
            .ruleset
            .sets
            .get(name)
            .ok_or_else(|| Fault::UnknownSet { set: name.into() })?;
        if want_map && !set.def.verdict_map {
            return Err(Fault::NotAVerdictMap { set: name.into() });
        }
        let lookup: Vec<KeyField> = key.iter().map(|v| v.field()).collect();
        if lookup != set.def.key {
            return Err(Fault::KeyTypeMismatch {
                set: name.into(),
                set_key: set.def.key.clone(),
                lookup,
            });
        }
        if !set.def.interval {
            let point = crate::ruleset::Key::point(key.to_vec());
            return Ok(set.elements.get(&point));
        }
        // Interval set: each field within its own bounds (pipapo semantics for
        // concatenations; for one field, the plain range).
        let found = set.elements.iter().find(|(k, _)| match &k.to {
            None => k.from == key,
            Some(to) => {
                k.from.len() == key.len()
                    && to.len() == key.len()
                    && (key.iter().zip(&k.from).zip(to)).all(|((v, lo), hi)| lo <= v && v <= hi)
            }
        });
        Ok(found.map(|(_, data)| data))
    }

    /// The packet's source or destination address.
    fn addr(&self, field: AddrField) -> IpAddr {
        match field {
            AddrField::Saddr => self.pkt.src,
            AddrField::Daddr => self.pkt.dst,
        }
    }

    /// Remembers the rule behind an accept or drop (not a jump) for `Trace::decided_by`.
    fn note_verdict(&mut self, chain: &str, index: usize, rule: &Rule, verdict: &Verdict) {
        if matches!(verdict, Verdict::Accept | Verdict::Drop) {
            self.last_verdict = Some((chain.to_string(), index, rule.comment.clone()));
        }
    }

    fn record(&mut self, chain: &str, rule: Option<usize>, event: Event) {
        self.steps.push(Step {
            chain: chain.to_string(),
            rule,
            event,
        });
    }
}

/// An address as a set key value.
fn addr_value(addr: IpAddr) -> Value {
    match addr {
        IpAddr::V4(a) => Value::V4(a),
        IpAddr::V6(a) => Value::V6(a),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ruleset::{BaseHook, ChainDef, Key, Protocol, SetDef};

    // ---- a tiny builder for hand-made tables ----

    /// A table under construction.
    struct Table(Ruleset);

    impl Table {
        fn new() -> Table {
            Table(Ruleset::new("weft"))
        }

        fn base(self, name: &str, priority: i32, policy: ChainPolicy, rules: Vec<Rule>) -> Table {
            let base = BaseHook {
                kind: ChainType::Filter,
                hook: Hook::Forward,
                priority,
                policy,
            };
            self.with_chain(name, Some(base), rules)
        }

        fn nat(self, name: &str, rules: Vec<Rule>) -> Table {
            let base = BaseHook {
                kind: ChainType::Nat,
                hook: Hook::Postrouting,
                priority: 100,
                policy: ChainPolicy::Accept,
            };
            self.with_chain(name, Some(base), rules)
        }

        fn chain(self, name: &str, rules: Vec<Rule>) -> Table {
            self.with_chain(name, None, rules)
        }

        fn with_chain(mut self, name: &str, base: Option<BaseHook>, rules: Vec<Rule>) -> Table {
            let def = ChainDef {
                name: name.into(),
                base,
            };
            self.0.chains.insert(name.into(), Chain { def, rules });
            self
        }

        fn set(self, name: &str, key: Vec<KeyField>, interval: bool, elements: Vec<Key>) -> Table {
            let elements = elements.into_iter().map(|k| (k, None)).collect();
            self.with_set(name, key, interval, false, elements)
        }

        fn map(self, name: &str, family: Family, elements: Vec<(Key, Verdict)>) -> Table {
            let elements = elements.into_iter().map(|(k, v)| (k, Some(v))).collect();
            self.with_set(name, vec![family.addr_type()], false, true, elements)
        }

        fn with_set(
            mut self,
            name: &str,
            key: Vec<KeyField>,
            interval: bool,
            verdict_map: bool,
            elements: BTreeMap<Key, Option<Verdict>>,
        ) -> Table {
            let def = SetDef {
                name: name.into(),
                key,
                interval,
                verdict_map,
                comment: None,
            };
            self.0.sets.insert(name.into(), Set { def, elements });
            self
        }
    }

    fn rule(matches: Vec<Match>, verdict: Verdict, comment: &str) -> Rule {
        Rule {
            matches,
            counter: false,
            action: Action::Verdict(verdict),
            comment: (!comment.is_empty()).then(|| comment.to_string()),
        }
    }

    fn vmap(family: Family, field: AddrField, map: &str) -> Rule {
        Rule {
            matches: vec![],
            counter: false,
            action: Action::Vmap {
                family,
                field,
                map: map.into(),
            },
            comment: None,
        }
    }

    fn jump(chain: &str) -> Verdict {
        Verdict::Jump(chain.into())
    }

    fn in_set(family: Family, field: AddrField, set: &str) -> Match {
        Match::AddrInSet {
            family,
            field,
            set: set.into(),
            negate: false,
        }
    }

    fn not_in_set(family: Family, field: AddrField, set: &str) -> Match {
        Match::AddrInSet {
            family,
            field,
            set: set.into(),
            negate: true,
        }
    }

    fn ip(s: &str) -> Value {
        addr_value(s.parse().unwrap())
    }

    fn point(s: &str) -> Key {
        Key::point(vec![ip(s)])
    }

    fn range(from: &str, to: &str) -> Key {
        Key::range(vec![ip(from)], vec![ip(to)])
    }

    /// A new TCP packet to port 80 from one pod interface to another.
    fn tcp(src: &str, dst: &str, port: u16) -> Packet {
        Packet {
            iif: "weft-src".into(),
            oif: "weft-dst".into(),
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            l4proto: 6,
            dport: Some(port),
            ct: CtInfo::New,
        }
    }

    fn no_routes(_: IpAddr) -> Option<String> {
        None
    }

    fn run(table: &Table, pkt: &Packet) -> Trace {
        simulate(&table.0, Hook::Forward, pkt, &no_routes)
    }

    fn decided(trace: &Trace) -> (Decision, Option<&str>) {
        (trace.verdict, trace.decided_by_comment())
    }

    const ACCEPT: ChainPolicy = ChainPolicy::Accept;
    const DROP: ChainPolicy = ChainPolicy::Drop;
    const V4: Family = Family::V4;
    const V6: Family = Family::V6;
    const SADDR: AddrField = AddrField::Saddr;
    const DADDR: AddrField = AddrField::Daddr;

    // ---- chains and verdicts ----

    #[test]
    fn accept_in_one_base_chain_does_not_skip_a_later_base_chain() {
        let t = Table::new()
            .base("a", -1, ACCEPT, vec![rule(vec![], Verdict::Accept, "a ok")])
            .base("b", 0, ACCEPT, vec![rule(vec![], Verdict::Drop, "b no")]);
        let trace = run(&t, &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Drop, Some("b no")));
        assert_eq!(trace.decided_by, Some(("b".into(), 0, Some("b no".into()))));
    }

    #[test]
    fn drop_is_final_and_later_base_chains_never_see_the_packet() {
        let t = Table::new()
            .base("a", -1, ACCEPT, vec![rule(vec![], Verdict::Drop, "a no")])
            .base("b", 0, ACCEPT, vec![rule(vec![], Verdict::Accept, "b ok")]);
        let trace = run(&t, &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Drop, Some("a no")));
        assert!(trace.steps.iter().all(|s| s.chain == "a"));
    }

    #[test]
    fn base_chains_run_in_priority_order_then_by_name() {
        // Names sort against priority order on purpose.
        let t = Table::new()
            .base(
                "a-late",
                10,
                ACCEPT,
                vec![rule(vec![], Verdict::Drop, "late")],
            )
            .base(
                "z-early",
                -10,
                ACCEPT,
                vec![rule(vec![], Verdict::Drop, "early")],
            );
        assert_eq!(
            run(&t, &tcp("10.0.0.1", "10.0.0.2", 80)).decided_by_comment(),
            Some("early")
        );
        let t = Table::new()
            .base("b", 0, ACCEPT, vec![rule(vec![], Verdict::Drop, "b")])
            .base("a", 0, ACCEPT, vec![rule(vec![], Verdict::Drop, "a")]);
        assert_eq!(
            run(&t, &tcp("10.0.0.1", "10.0.0.2", 80)).decided_by_comment(),
            Some("a")
        );
    }

    #[test]
    fn a_chain_policy_judges_packets_no_rule_decided() {
        let udp_only = rule(vec![Match::L4Proto(Protocol::Udp)], Verdict::Accept, "udp");
        let t = Table::new().base("a", 0, DROP, vec![udp_only]);
        let trace = run(&t, &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Drop, None));
        assert_eq!(trace.steps.last().unwrap().event, Event::Policy(DROP));
        assert!(trace.fault().is_none());
        let mut udp = tcp("10.0.0.1", "10.0.0.2", 53);
        udp.l4proto = 17;
        assert_eq!(decided(&run(&t, &udp)), (Decision::Accept, Some("udp")));
    }

    #[test]
    fn a_policy_drop_in_a_later_chain_overrides_an_earlier_accepting_rule() {
        let t = Table::new()
            .base("a", -1, ACCEPT, vec![rule(vec![], Verdict::Accept, "a ok")])
            .base("b", 0, DROP, vec![]);
        assert_eq!(
            decided(&run(&t, &tcp("10.0.0.1", "10.0.0.2", 80))),
            (Decision::Drop, None)
        );
    }

    #[test]
    fn a_hook_without_base_chains_accepts() {
        let t = Table::new().base("a", 0, DROP, vec![]);
        let trace = simulate(
            &t.0,
            Hook::Postrouting,
            &tcp("10.0.0.1", "10.0.0.2", 80),
            &no_routes,
        );
        assert_eq!(decided(&trace), (Decision::Accept, None));
        assert!(trace.steps.is_empty());
    }

    #[test]
    fn a_jumped_chain_without_verdict_returns_to_the_next_rule_of_its_caller() {
        let t = Table::new()
            .base(
                "a",
                0,
                ACCEPT,
                vec![
                    rule(vec![], jump("sub"), ""),
                    rule(vec![], Verdict::Drop, "after return"),
                ],
            )
            .chain(
                "sub",
                vec![rule(
                    vec![Match::L4Proto(Protocol::Udp)],
                    Verdict::Accept,
                    "",
                )],
            );
        let trace = run(&t, &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Drop, Some("after return")));
        let ret = Event::Return { to: "a".into() };
        assert!(
            trace
                .steps
                .iter()
                .any(|s| s.chain == "sub" && s.event == ret)
        );
    }

    #[test]
    fn accept_in_a_jumped_chain_ends_its_base_chain_but_not_the_hook() {
        let t = Table::new()
            .base(
                "a",
                -1,
                ACCEPT,
                vec![
                    rule(vec![], jump("sub"), ""),
                    rule(vec![], Verdict::Drop, "never"),
                ],
            )
            .chain("sub", vec![rule(vec![], Verdict::Accept, "sub ok")])
            .base("b", 0, ACCEPT, vec![rule(vec![], Verdict::Drop, "b no")]);
        let trace = run(&t, &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Drop, Some("b no")));
        assert!(
            !trace
                .steps
                .iter()
                .any(|s| s.chain == "a" && s.rule == Some(1))
        );
    }

    #[test]
    fn drop_in_a_jumped_chain_is_final() {
        let t = Table::new()
            .base("a", -1, ACCEPT, vec![rule(vec![], jump("sub"), "")])
            .chain("sub", vec![rule(vec![], Verdict::Drop, "sub no")])
            .base("b", 0, ACCEPT, vec![rule(vec![], Verdict::Accept, "b ok")]);
        let trace = run(&t, &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Drop, Some("sub no")));
        assert_eq!(trace.decided_by.unwrap().0, "sub");
    }

    // ---- verdict maps ----

    fn dispatch_table() -> Table {
        Table::new()
            .map(
                "dispatch-v4",
                V4,
                vec![
                    (point("10.0.0.1"), jump("group")),
                    (point("10.0.0.9"), Verdict::Drop),
                ],
            )
            .base(
                "a",
                0,
                ACCEPT,
                vec![
                    vmap(V4, SADDR, "dispatch-v4"),
                    rule(vec![], Verdict::Accept, "after vmap"),
                ],
            )
            .chain(
                "group",
                vec![rule(
                    vec![Match::L4Proto(Protocol::Udp)],
                    Verdict::Accept,
                    "",
                )],
            )
    }

    #[test]
    fn a_vmap_hit_applies_the_element_verdict_and_a_jump_returns_after_the_vmap() {
        let t = dispatch_table();
        let trace = run(&t, &tcp("10.0.0.9", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Drop, None));
        assert_eq!(trace.decided_by.as_ref().unwrap().0, "a");
        let trace = run(&t, &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Accept, Some("after vmap")));
        let hit = &trace.steps[1].event;
        assert!(matches!(hit, Event::MapHit { verdict: Verdict::Jump(c), .. } if c == "group"));
    }

    #[test]
    fn a_vmap_miss_continues_with_the_next_rule() {
        let trace = run(&dispatch_table(), &tcp("10.0.0.5", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Accept, Some("after vmap")));
        let miss = Event::MapMiss {
            map: "dispatch-v4".into(),
            key: ip("10.0.0.5"),
        };
        assert_eq!(trace.steps[1].event, miss);
    }

    #[test]
    fn a_vmap_of_the_other_family_skips_its_rule() {
        let t = Table::new()
            .map("d6", V6, vec![(point("fd00::1"), Verdict::Drop)])
            .base("a", 0, ACCEPT, vec![vmap(V6, SADDR, "d6")]);
        let trace = run(&t, &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Accept, None));
        let skipped = Event::NoMatch {
            failed: Failure::Family(V6),
        };
        assert_eq!(trace.steps[1].event, skipped);
        assert_eq!(
            run(&t, &tcp("fd00::1", "fd00::2", 80)).verdict,
            Decision::Drop
        );
    }

    // ---- matches ----

    #[test]
    fn an_ipv4_packet_never_matches_an_ip6_set_match_even_negated() {
        let t = Table::new()
            .set(
                "s6",
                vec![KeyField::Ipv6Addr],
                false,
                vec![point("fd00::1")],
            )
            .base(
                "a",
                0,
                ACCEPT,
                vec![
                    rule(vec![in_set(V6, SADDR, "s6")], Verdict::Drop, "in"),
                    rule(vec![not_in_set(V6, SADDR, "s6")], Verdict::Drop, "not in"),
                ],
            );
        let trace = run(&t, &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Accept, None));
        let guard = Failure::Family(V6);
        let failures: Vec<_> = (trace.steps.iter())
            .filter_map(|s| match &s.event {
                Event::NoMatch { failed } => Some(failed),
                _ => None,
            })
            .collect();
        assert_eq!(failures, vec![&guard, &guard]);
        // The same matches do work on IPv6 packets.
        assert_eq!(
            run(&t, &tcp("fd00::1", "fd00::2", 80)).decided_by_comment(),
            Some("in")
        );
        assert_eq!(
            run(&t, &tcp("fd00::3", "fd00::2", 80)).decided_by_comment(),
            Some("not in")
        );
    }

    #[test]
    fn a_negated_set_match_holds_for_addresses_outside_the_set() {
        let t = Table::new()
            .set(
                "s",
                vec![KeyField::Ipv4Addr],
                false,
                vec![point("10.0.0.1")],
            )
            .base(
                "a",
                0,
                ACCEPT,
                vec![rule(vec![not_in_set(V4, DADDR, "s")], Verdict::Drop, "x")],
            );
        assert_eq!(
            run(&t, &tcp("10.0.0.2", "10.0.0.1", 80)).verdict,
            Decision::Accept
        );
        assert_eq!(
            run(&t, &tcp("10.0.0.1", "10.0.0.3", 80)).verdict,
            Decision::Drop
        );
    }

    #[test]
    fn interval_sets_match_ranges_and_prefixes_inclusively() {
        let t = Table::new()
            .set(
                "cidr",
                vec![KeyField::Ipv4Addr],
                true,
                vec![
                    range("10.0.0.0", "10.0.255.255"), // 10.0.0.0/16
                    range("192.168.1.5", "192.168.1.9"),
                    range("172.16.0.7", "172.16.0.7"), // one address
                ],
            )
            .base(
                "a",
                0,
                ACCEPT,
                vec![rule(vec![in_set(V4, DADDR, "cidr")], Verdict::Drop, "in")],
            );
        let verdict = |dst: &str| run(&t, &tcp("1.1.1.1", dst, 80)).verdict;
        for inside in [
            "10.0.0.0",
            "10.0.128.1",
            "10.0.255.255",
            "192.168.1.5",
            "192.168.1.9",
        ] {
            assert_eq!(verdict(inside), Decision::Drop, "{inside}");
        }
        assert_eq!(verdict("172.16.0.7"), Decision::Drop);
        for outside in [
            "9.255.255.255",
            "10.1.0.0",
            "192.168.1.4",
            "192.168.1.10",
            "172.16.0.8",
        ] {
            assert_eq!(verdict(outside), Decision::Accept, "{outside}");
        }
    }

    #[test]
    fn ipv6_interval_sets_match_prefixes() {
        let t = Table::new()
            .set(
                "c6",
                vec![KeyField::Ipv6Addr],
                true,
                vec![range("fd00::", "fd00::ffff")],
            )
            .base(
                "a",
                0,
                ACCEPT,
                vec![rule(vec![in_set(V6, SADDR, "c6")], Verdict::Drop, "in")],
            );
        assert_eq!(
            run(&t, &tcp("fd00::ffff", "fd01::1", 80)).verdict,
            Decision::Drop
        );
        assert_eq!(
            run(&t, &tcp("fd00::1:0", "fd01::1", 80)).verdict,
            Decision::Accept
        );
    }

    fn named_port_table() -> Table {
        let key = |a: &str, proto: u8, port: u16| {
            Key::point(vec![ip(a), Value::Proto(proto), Value::Port(port)])
        };
        let nport = Match::DestPortInSet {
            family: V4,
            set: "nport".into(),
        };
        Table::new()
            .set(
                "nport",
                vec![
                    KeyField::Ipv4Addr,
                    KeyField::InetProto,
                    KeyField::InetService,
                ],
                false,
                vec![key("10.0.0.2", 6, 8080), key("10.0.0.2", 17, 5353)],
            )
            .base(
                "a",
                0,
                DROP,
                vec![rule(vec![nport], Verdict::Accept, "named port")],
            )
    }

    #[test]
    fn named_port_sets_match_address_protocol_and_port_together() {
        let t = named_port_table();
        assert_eq!(
            run(&t, &tcp("10.0.0.1", "10.0.0.2", 8080)).verdict,
            Decision::Accept
        );
        assert_eq!(
            run(&t, &tcp("10.0.0.1", "10.0.0.2", 5353)).verdict,
            Decision::Drop
        );
        assert_eq!(
            run(&t, &tcp("10.0.0.1", "10.0.0.3", 8080)).verdict,
            Decision::Drop
        );
        let mut udp = tcp("10.0.0.1", "10.0.0.2", 5353);
        udp.l4proto = 17;
        assert_eq!(run(&t, &udp).verdict, Decision::Accept);
        assert_eq!(
            run(&t, &tcp("fd00::1", "fd00::2", 8080)).verdict,
            Decision::Drop
        );
    }

    #[test]
    fn packets_without_a_port_never_match_a_named_port_set() {
        let mut icmp = tcp("10.0.0.1", "10.0.0.2", 0);
        (icmp.l4proto, icmp.dport) = (1, None);
        assert_eq!(run(&named_port_table(), &icmp).verdict, Decision::Drop);
    }

    #[test]
    fn port_ranges_include_both_edges_and_require_their_protocol() {
        let range = Match::DestPort {
            protocol: Protocol::Tcp,
            first: 1000,
            last: 2000,
        };
        let t = Table::new().base("a", 0, DROP, vec![rule(vec![range], Verdict::Accept, "")]);
        let verdict = |port| run(&t, &tcp("10.0.0.1", "10.0.0.2", port)).verdict;
        assert_eq!(verdict(999), Decision::Drop);
        assert_eq!(verdict(1000), Decision::Accept);
        assert_eq!(verdict(2000), Decision::Accept);
        assert_eq!(verdict(2001), Decision::Drop);
        let mut udp = tcp("10.0.0.1", "10.0.0.2", 1500);
        udp.l4proto = 17;
        assert_eq!(run(&t, &udp).verdict, Decision::Drop);
        let mut sctp = udp.clone();
        sctp.l4proto = 132;
        assert_eq!(run(&t, &sctp).verdict, Decision::Drop);
    }

    #[test]
    fn a_single_port_match_holds_for_that_port_only() {
        let port = Match::DestPort {
            protocol: Protocol::Sctp,
            first: 9,
            last: 9,
        };
        let t = Table::new().base("a", 0, DROP, vec![rule(vec![port], Verdict::Accept, "")]);
        let mut sctp = tcp("10.0.0.1", "10.0.0.2", 9);
        sctp.l4proto = 132;
        assert_eq!(run(&t, &sctp).verdict, Decision::Accept);
        sctp.dport = Some(10);
        assert_eq!(run(&t, &sctp).verdict, Decision::Drop);
    }

    #[test]
    fn established_and_related_packets_bypass_policy() {
        let ct = Match::Ct(CtState::EstablishedRelated);
        let t = Table::new().base(
            "a",
            0,
            ACCEPT,
            vec![
                rule(vec![ct], Verdict::Accept, "est"),
                rule(vec![], Verdict::Drop, "deny"),
            ],
        );
        let mut pkt = tcp("10.0.0.1", "10.0.0.2", 80);
        assert_eq!(decided(&run(&t, &pkt)), (Decision::Drop, Some("deny")));
        pkt.ct = CtInfo::Established;
        assert_eq!(decided(&run(&t, &pkt)), (Decision::Accept, Some("est")));
        pkt.ct = CtInfo::Related;
        assert_eq!(decided(&run(&t, &pkt)), (Decision::Accept, Some("est")));
    }

    #[test]
    fn anti_spoofing_drops_pod_packets_without_a_route_back_through_their_interface() {
        let from_pod = Match::IfacePrefix {
            field: IfaceField::Input,
            prefix: "weft".into(),
        };
        let spoof = rule(
            vec![from_pod, Match::FibSaddrIifMissing],
            Verdict::Drop,
            "spoof",
        );
        let t = Table::new().base("a", 0, ACCEPT, vec![spoof]);
        let routes = |a: IpAddr| match a.to_string().as_str() {
            "10.0.0.1" => Some("weft-src".to_string()),
            "10.0.0.7" => Some("weft-other".to_string()),
            _ => Some("eth0".to_string()),
        };
        let verdict = |pkt: &Packet| simulate(&t.0, Hook::Forward, pkt, &routes).verdict;
        assert_eq!(verdict(&tcp("10.0.0.1", "10.0.0.2", 80)), Decision::Accept);
        assert_eq!(verdict(&tcp("10.0.0.7", "10.0.0.2", 80)), Decision::Drop); // another pod's
        assert_eq!(verdict(&tcp("8.8.8.8", "10.0.0.2", 80)), Decision::Drop); // off-node
        let unrouted = simulate(
            &t.0,
            Hook::Forward,
            &tcp("10.0.0.1", "10.0.0.2", 80),
            &no_routes,
        );
        assert_eq!(unrouted.verdict, Decision::Drop);
        // Not from a pod interface: the fib check is never reached.
        let mut from_uplink = tcp("8.8.8.8", "10.0.0.2", 80);
        from_uplink.iif = "eth0".into();
        assert_eq!(verdict(&from_uplink), Decision::Accept);
    }

    #[test]
    fn interface_prefixes_match_input_and_output_names() {
        let to_pod = Match::IfacePrefix {
            field: IfaceField::Output,
            prefix: "weft".into(),
        };
        let t = Table::new().base("a", 0, ACCEPT, vec![rule(vec![to_pod], Verdict::Drop, "")]);
        let mut pkt = tcp("10.0.0.1", "10.0.0.2", 80);
        assert_eq!(run(&t, &pkt).verdict, Decision::Drop);
        pkt.oif = "eth0".into();
        assert_eq!(run(&t, &pkt).verdict, Decision::Accept);
        pkt.oif = "wef".into();
        assert_eq!(run(&t, &pkt).verdict, Decision::Accept);
    }

    // ---- faults ----

    /// A base chain jumping down a line of `n` chains; the last one drops.
    fn jump_line(n: usize) -> Table {
        let mut t = Table::new().base("base", 0, ACCEPT, vec![rule(vec![], jump("c1"), "")]);
        for i in 1..=n {
            let last = rule(vec![], Verdict::Drop, "bottom");
            let r = if i == n {
                last
            } else {
                rule(vec![], jump(&format!("c{}", i + 1)), "")
            };
            t = t.chain(&format!("c{i}"), vec![r]);
        }
        t
    }

    #[test]
    fn jumps_nest_down_to_the_kernel_limit_and_no_deeper() {
        let trace = run(&jump_line(MAX_JUMP_DEPTH), &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(decided(&trace), (Decision::Drop, Some("bottom")));
        assert!(trace.fault().is_none());
        let trace = run(
            &jump_line(MAX_JUMP_DEPTH + 1),
            &tcp("10.0.0.1", "10.0.0.2", 80),
        );
        assert_eq!(decided(&trace), (Decision::Drop, None));
        let too_deep = Fault::JumpTooDeep {
            chain: "c16".into(),
            depth: 16,
        };
        assert_eq!(trace.fault(), Some(&too_deep));
    }

    #[test]
    fn a_jump_loop_is_a_fault_not_a_hang() {
        let t = Table::new()
            .base("base", 0, ACCEPT, vec![rule(vec![], jump("x"), "")])
            .chain("x", vec![rule(vec![], jump("y"), "")])
            .chain("y", vec![rule(vec![], jump("x"), "")]);
        let trace = run(&t, &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(trace.verdict, Decision::Drop);
        assert_eq!(trace.fault(), Some(&Fault::JumpLoop { chain: "x".into() }));
        let t = Table::new()
            .base("base", 0, ACCEPT, vec![rule(vec![], jump("x"), "")])
            .chain("x", vec![rule(vec![], jump("x"), "")]);
        assert!(matches!(
            run(&t, &tcp("10.0.0.1", "10.0.0.2", 80)).fault(),
            Some(Fault::JumpLoop { .. })
        ));
    }

    #[test]
    fn a_chain_called_twice_in_sequence_is_no_loop() {
        let t = Table::new()
            .base(
                "base",
                0,
                DROP,
                vec![rule(vec![], jump("x"), ""), rule(vec![], jump("x"), "")],
            )
            .chain("x", vec![]);
        let trace = run(&t, &tcp("10.0.0.1", "10.0.0.2", 80));
        assert_eq!(trace.fault(), None);
        assert_eq!(trace.steps.last().unwrap().event, Event::Policy(DROP));
    }

    #[test]
    fn references_the_kernel_would_refuse_are_faults_that_drop() {
        let pkt = tcp("10.0.0.1", "10.0.0.2", 80);
        let fault = |t: Table| run(&t, &pkt).fault().cloned();
        let base = |rules| Table::new().base("base", 0, ACCEPT, rules);
        assert_eq!(
            fault(base(vec![rule(vec![], jump("nowhere"), "")])),
            Some(Fault::UnknownChain {
                chain: "nowhere".into()
            })
        );
        let to_base = base(vec![rule(vec![], jump("other"), "")]).base("other", 5, ACCEPT, vec![]);
        assert_eq!(
            fault(to_base),
            Some(Fault::JumpToBaseChain {
                chain: "other".into()
            })
        );
        assert_eq!(
            fault(base(vec![rule(
                vec![in_set(V4, SADDR, "none")],
                Verdict::Drop,
                ""
            )])),
            Some(Fault::UnknownSet { set: "none".into() })
        );
        let plain =
            base(vec![vmap(V4, SADDR, "s")]).set("s", vec![KeyField::Ipv4Addr], false, vec![]);
        assert_eq!(
            fault(plain),
            Some(Fault::NotAVerdictMap { set: "s".into() })
        );
        let v6_set = base(vec![rule(vec![in_set(V4, SADDR, "s")], Verdict::Drop, "")]).set(
            "s",
            vec![KeyField::Ipv6Addr],
            false,
            vec![],
        );
        assert!(matches!(fault(v6_set), Some(Fault::KeyTypeMismatch { .. })));
        let mut mixed = pkt.clone();
        mixed.dst = "fd00::1".parse().unwrap();
        let trace = run(&base(vec![]), &mixed);
        assert_eq!(trace.verdict, Decision::Drop);
        assert!(matches!(trace.fault(), Some(Fault::MixedFamilies { .. })));
    }

    #[test]
    fn nat_chains_see_only_the_first_packet_of_a_connection() {
        let t = Table::new().nat("nat", vec![rule(vec![], Verdict::Drop, "nat")]);
        let mut pkt = tcp("10.0.0.1", "10.0.0.2", 80);
        let trace = simulate(&t.0, Hook::Postrouting, &pkt, &no_routes);
        assert_eq!(decided(&trace), (Decision::Drop, Some("nat")));
        pkt.ct = CtInfo::Established;
        let trace = simulate(&t.0, Hook::Postrouting, &pkt, &no_routes);
        assert_eq!(trace.verdict, Decision::Accept);
        assert_eq!(trace.steps[0].event, Event::SkipNat);
    }

    // ---- the DESIGN §2 layout ----

    const POD_A: &str = "10.244.1.2"; // isolated for egress: may reach B:8080 and DNS in 10/8
    const POD_B: &str = "10.244.1.3"; // isolated for ingress: only from A, to its named port
    const POD_C: &str = "10.244.1.4"; // not isolated

    /// The table of DESIGN §2, for pods A, B, C on this node.
    fn design_table() -> Table {
        let egress = vec![
            rule(
                vec![Match::Ct(CtState::EstablishedRelated)],
                Verdict::Accept,
                "established",
            ),
            rule(
                vec![
                    Match::IfacePrefix {
                        field: IfaceField::Input,
                        prefix: "weft".into(),
                    },
                    Match::FibSaddrIifMissing,
                ],
                Verdict::Drop,
                "anti-spoofing",
            ),
            vmap(V4, SADDR, "egress-dispatch"),
        ];
        let ingress = vec![
            rule(
                vec![Match::Ct(CtState::EstablishedRelated)],
                Verdict::Accept,
                "established",
            ),
            vmap(V4, DADDR, "ingress-dispatch"),
        ];
        let counter_drop = |comment: &str| Rule {
            counter: true,
            ..rule(vec![], Verdict::Drop, comment)
        };
        let dns = Match::DestPort {
            protocol: Protocol::Udp,
            first: 53,
            last: 53,
        };
        let to_b = Match::DestPort {
            protocol: Protocol::Tcp,
            first: 8080,
            last: 8080,
        };
        let nport = Match::DestPortInSet {
            family: V4,
            set: "nport-b".into(),
        };
        let nport_key = Key::point(vec![ip(POD_B), Value::Proto(6), Value::Port(8080)]);
        Table::new()
            .set("sel-a", vec![KeyField::Ipv4Addr], false, vec![point(POD_A)])
            .set("sel-b", vec![KeyField::Ipv4Addr], false, vec![point(POD_B)])
            .set(
                "cidr-dns",
                vec![KeyField::Ipv4Addr],
                true,
                vec![range("10.96.0.0", "10.96.255.255")],
            )
            .set(
                "nport-b",
                vec![
                    KeyField::Ipv4Addr,
                    KeyField::InetProto,
                    KeyField::InetService,
                ],
                false,
                vec![nport_key],
            )
            .map("egress-dispatch", V4, vec![(point(POD_A), jump("group-a"))])
            .map(
                "ingress-dispatch",
                V4,
                vec![(point(POD_B), jump("group-b"))],
            )
            .base("egress", -1, ACCEPT, egress)
            .base("ingress", 0, ACCEPT, ingress)
            .chain(
                "group-a",
                vec![
                    rule(vec![], jump("pol-a-out"), ""),
                    counter_drop("group-a deny"),
                ],
            )
            .chain(
                "pol-a-out",
                vec![
                    rule(
                        vec![in_set(V4, DADDR, "sel-b"), to_b],
                        Verdict::Accept,
                        "ns/a egress[0]",
                    ),
                    rule(
                        vec![in_set(V4, DADDR, "cidr-dns"), dns],
                        Verdict::Accept,
                        "ns/a egress[1]",
                    ),
                ],
            )
            .chain(
                "group-b",
                vec![
                    rule(vec![], jump("pol-b-in"), ""),
                    counter_drop("group-b deny"),
                ],
            )
            .chain(
                "pol-b-in",
                vec![rule(
                    vec![in_set(V4, SADDR, "sel-a"), nport],
                    Verdict::Accept,
                    "ns/b ingress[0]",
                )],
            )
    }

    /// Each pod is routed through its own veth; everything else through the uplink.
    fn node_routes(addr: IpAddr) -> Option<String> {
        let iface = match addr.to_string().as_str() {
            POD_A => "weft-a",
            POD_B => "weft-b",
            POD_C => "weft-c",
            _ => "eth0",
        };
        Some(iface.to_string())
    }

    fn pod_packet(src: &str, dst: &str, l4proto: u8, port: u16) -> Packet {
        let iface = |a: &str| node_routes(a.parse().unwrap()).unwrap();
        Packet {
            iif: iface(src),
            oif: iface(dst),
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            l4proto,
            dport: Some(port),
            ct: CtInfo::New,
        }
    }

    #[test]
    fn the_design_layout_judges_packets_in_both_directions() {
        let t = design_table();
        let judge = |pkt: &Packet| {
            let trace = simulate(&t.0, Hook::Forward, pkt, &node_routes);
            assert_eq!(trace.fault(), None, "{}", trace.explain());
            (
                trace.verdict,
                trace.decided_by_comment().map(str::to_string),
            )
        };
        let said = |d: Decision, c: &str| (d, Some(c.to_string()));
        // Allowed both by A's egress and by B's ingress: the last accept (ingress) is named.
        assert_eq!(
            judge(&pod_packet(POD_A, POD_B, 6, 8080)),
            said(Decision::Accept, "ns/b ingress[0]")
        );
        // A may not send to B:9090: A's group chain ends in `counter drop`.
        assert_eq!(
            judge(&pod_packet(POD_A, POD_B, 6, 9090)),
            said(Decision::Drop, "group-a deny")
        );
        // C is not isolated for egress, but B does not accept from C.
        assert_eq!(
            judge(&pod_packet(POD_C, POD_B, 6, 8080)),
            said(Decision::Drop, "group-b deny")
        );
        // A may reach DNS outside the cluster; nobody isolates that destination for ingress.
        assert_eq!(
            judge(&pod_packet(POD_A, "10.96.0.10", 17, 53)),
            said(Decision::Accept, "ns/a egress[1]")
        );
        // C to A: neither direction isolated, only the policies of the chains speak.
        assert_eq!(
            judge(&pod_packet(POD_C, POD_A, 6, 80)),
            (Decision::Accept, None)
        );
        // Replies of an established flow pass before any dispatch.
        let mut reply = pod_packet(POD_B, POD_A, 6, 40000);
        reply.ct = CtInfo::Established;
        assert_eq!(judge(&reply), said(Decision::Accept, "established"));
        // C forging A's address, to reach B as A: dropped before dispatch.
        let mut forged = pod_packet(POD_A, POD_B, 6, 8080);
        forged.iif = "weft-c".into();
        assert_eq!(judge(&forged), said(Decision::Drop, "anti-spoofing"));
        // IPv6 traffic is not dispatched by the IPv4 maps.
        let mut v6 = pod_packet(POD_A, POD_B, 6, 8080);
        (v6.src, v6.dst) = ("fd00::2".parse().unwrap(), "fd00::3".parse().unwrap());
        v6.iif = "eth0".into();
        assert_eq!(judge(&v6), (Decision::Accept, None));
    }

    #[test]
    fn explain_prints_every_step_with_jumped_chains_indented() {
        let t = design_table();
        let trace = simulate(
            &t.0,
            Hook::Forward,
            &pod_packet(POD_A, POD_B, 6, 9090),
            &node_routes,
        );
        let expected = "\
chain egress (priority -1)
  egress[0] no match: ct state established,related
  egress[1] no match: fib saddr . iif oif missing
  egress[2] @egress-dispatch[10.244.1.2]: jump group-a
    group-a[0] jump pol-a-out
      pol-a-out[0] no match: tcp dport 8080
      pol-a-out[1] no match: ip daddr @cidr-dns
      pol-a-out: end of chain, back to group-a
    group-a[1] drop comment \"group-a deny\"
verdict: drop by group-a[1] \"group-a deny\"
";
        assert_eq!(trace.explain(), expected);
        let trace = simulate(
            &t.0,
            Hook::Forward,
            &pod_packet(POD_C, POD_A, 6, 80),
            &node_routes,
        );
        assert!(
            trace
                .explain()
                .contains("  ingress: end of chain: policy accept\n")
        );
        assert!(
            trace
                .explain()
                .ends_with("verdict: accept (no rule decided)\n")
        );
    }
}
