//! weft's nftables table as plain data, in nft's own words.
//!
//! A [`Ruleset`] is one table (`inet weft`) with its sets, verdict maps and chains. The compiler
//! produces the desired one, the netlink backend dumps the current one from the kernel, and
//! [`crate::diff`] turns the pair into [`Op`]s. Match expressions are typed ([`Match`]), never
//! free text; `Display` renders valid `nft -f` input, the same text `nft list table inet weft`
//! prints, so tests and people read one format.
//!
//! The rule shapes here are the only ones weft emits, and each maps to exactly the bytecode
//! `nft` generates for the same statement (with its implicit `meta nfproto` / `meta l4proto`
//! guards), so `nft list ruleset` always prints our table faithfully.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The name of weft's table (family `inet`).
pub const TABLE_NAME: &str = "weft";

/// Version of the table layout. A process that finds a table with another version replaces it
/// (delete + add in one transaction) instead of diffing against it. The `schema-next` feature
/// (tests only: conformance/lab/handoff-test.sh's upgrade scenario) makes it one higher.
pub const SCHEMA_VERSION: u32 = if cfg!(feature = "schema-next") { 2 } else { 1 };

/// The kernel refuses object names longer than this many bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// `nft` refuses comments longer than this many bytes.
pub const MAX_COMMENT_BYTES: usize = 128;

/// The table comment that carries the schema version, e.g. `weft schema=1`.
pub fn table_comment(schema: u32) -> String {
    format!("weft schema={schema}")
}

/// Reads the schema version back out of a table comment written by [`table_comment`].
pub fn schema_from_comment(comment: &str) -> Option<u32> {
    comment.strip_prefix("weft schema=")?.parse().ok()
}

/// IP family of an address, set or match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4 (`ip`).
    V4,
    /// IPv6 (`ip6`).
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The payload keyword nft uses (`ip` / `ip6`).
    pub fn keyword(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// Suffix used in twin object names (`-v4` / `-v6`).
    pub fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }

    /// The nft address type of this family.
    pub fn addr_type(self) -> KeyField {
        match self {
            Family::V4 => KeyField::Ipv4Addr,
            Family::V6 => KeyField::Ipv6Addr,
        }
    }
}

/// Transport protocols NetworkPolicy can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP (6), the API default.
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
}

impl Protocol {
    /// All protocols, in number order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol with this IANA number, if NetworkPolicy can name it.
    pub fn from_number(n: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }

    /// The lower-case name nft uses (`tcp`).
    pub fn keyword(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// The upper-case name the Kubernetes API uses (`TCP`).
    pub fn api_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// One field of a set key, by its nft type name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyField {
    /// `ipv4_addr`
    Ipv4Addr,
    /// `ipv6_addr`
    Ipv6Addr,
    /// `inet_proto`
    InetProto,
    /// `inet_service`
    InetService,
}

impl KeyField {
    /// The nft type name.
    pub fn nft_name(self) -> &'static str {
        match self {
            KeyField::Ipv4Addr => "ipv4_addr",
            KeyField::Ipv6Addr => "ipv6_addr",
            KeyField::InetProto => "inet_proto",
            KeyField::InetService => "inet_service",
        }
    }
}

/// One field value of a set element key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    /// An IPv4 address.
    V4(Ipv4Addr),
    /// An IPv6 address.
    V6(Ipv6Addr),
    /// A transport protocol number.
    Proto(u8),
    /// A transport port.
    Port(u16),
}

impl Value {
    /// The key field type this value belongs to.
    pub fn field(self) -> KeyField {
        match self {
            Value::V4(_) => KeyField::Ipv4Addr,
            Value::V6(_) => KeyField::Ipv6Addr,
            Value::Proto(_) => KeyField::InetProto,
            Value::Port(_) => KeyField::InetService,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::V4(a) => write!(f, "{a}"),
            Value::V6(a) => write!(f, "{a}"),
            Value::Proto(p) => match Protocol::from_number(*p) {
                Some(proto) => f.write_str(proto.keyword()),
                None => write!(f, "{p}"),
            },
            Value::Port(p) => write!(f, "{p}"),
        }
    }
}

/// The key of one set or map element.
///
/// In a non-interval set `to` is `None`. In an interval set `to` is always `Some`: the last value
/// of the range, inclusive (a single address is the range `a..=a`). Ranges in one set never
/// overlap; the compiler merges them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// The key, or the first value of the range.
    pub from: Vec<Value>,
    /// The last value of the range (interval sets only).
    pub to: Option<Vec<Value>>,
}

impl Key {
    /// A plain key.
    pub fn point(values: Vec<Value>) -> Key {
        Key {
            from: values,
            to: None,
        }
    }

    /// An inclusive range, for interval sets.
    pub fn range(from: Vec<Value>, to: Vec<Value>) -> Key {
        Key { from, to: Some(to) }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.from.iter().enumerate() {
            if i > 0 {
                f.write_str(" . ")?;
            }
            match self.to.as_ref().map(|to| to[i]) {
                None => write!(f, "{v}")?,
                Some(end) if end == *v => write!(f, "{v}")?,
                Some(end) => match prefix_len(*v, end) {
                    Some(len) => write!(f, "{v}/{len}")?,
                    None => write!(f, "{v}-{end}")?,
                },
            }
        }
        Ok(())
    }
}

/// If `from..=to` is exactly one CIDR prefix, its length (nft prints such ranges as prefixes).
fn prefix_len(from: Value, to: Value) -> Option<u8> {
    let (lo, hi, bits) = match (from, to) {
        (Value::V4(a), Value::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (Value::V6(a), Value::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return None,
    };
    let span = hi.checked_sub(lo)?;
    let size = span.checked_add(1);
    match size {
        None => (lo == 0).then_some(0), // the whole IPv6 space
        Some(size) if size.is_power_of_two() && lo % size == 0 => {
            Some(bits - u8::try_from(size.trailing_zeros()).ok()?)
        }
        _ => None,
    }
}

/// A verdict, as a rule's action or a verdict-map element's data.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// `accept`
    Accept,
    /// `drop`
    Drop,
    /// `jump <chain>`
    Jump(String),
}

impl Verdict {
    /// The chain this verdict jumps to, if any.
    pub fn target(&self) -> Option<&str> {
        match self {
            Verdict::Jump(c) => Some(c),
            _ => None,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
        }
    }
}

/// The definition of a named set or verdict map (everything but its elements).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SetDef {
    /// Name, unique among the table's sets and maps.
    pub name: String,
    /// Key type: one field, or a concatenation.
    pub key: Vec<KeyField>,
    /// `flags interval`: elements are ranges.
    pub interval: bool,
    /// `: verdict`: this is a verdict map.
    pub verdict_map: bool,
    /// What the set holds, for people (at most [`MAX_COMMENT_BYTES`]).
    pub comment: Option<String>,
}

/// A named set or verdict map with its elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    /// The definition.
    pub def: SetDef,
    /// Elements; the value is the verdict for maps and `None` for sets.
    pub elements: BTreeMap<Key, Option<Verdict>>,
}

impl Set {
    /// An empty set or map.
    pub fn new(def: SetDef) -> Set {
        Set {
            def,
            elements: BTreeMap::new(),
        }
    }
}

/// Netfilter hooks weft attaches base chains to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `forward`: routed traffic, after DNAT: where policy is enforced.
    Forward,
    /// `postrouting` (masquerade).
    Postrouting,
    /// `input`: traffic to the node itself (the `--encryption required` guard).
    Input,
}

impl Hook {
    /// nft keyword.
    pub fn keyword(self) -> &'static str {
        match self {
            Hook::Forward => "forward",
            Hook::Postrouting => "postrouting",
            Hook::Input => "input",
        }
    }
}

/// Chain type of a base chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChainType {
    /// `filter`
    Filter,
    /// `nat`
    Nat,
}

/// What a base chain does with a packet no rule decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChainPolicy {
    /// `policy accept`
    Accept,
    /// `policy drop`
    Drop,
}

/// The hook a base chain is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BaseHook {
    /// Chain type.
    pub kind: ChainType,
    /// Hook.
    pub hook: Hook,
    /// Priority (0 = `filter`); lower runs first.
    pub priority: i32,
    /// Default policy.
    pub policy: ChainPolicy,
}

/// The definition of a chain (everything but its rules).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChainDef {
    /// Name, unique in the table.
    pub name: String,
    /// `Some` for a base chain.
    pub base: Option<BaseHook>,
}

/// Connection-tracking states weft matches on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtState {
    /// `ct state established,related`
    EstablishedRelated,
}

/// Source or destination address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddrField {
    /// `saddr`
    Saddr,
    /// `daddr`
    Daddr,
}

impl AddrField {
    /// nft keyword.
    pub fn keyword(self) -> &'static str {
        match self {
            AddrField::Saddr => "saddr",
            AddrField::Daddr => "daddr",
        }
    }
}

/// Interface direction for name matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IfaceField {
    /// `iifname`
    Input,
    /// `oifname`
    Output,
}

/// One match expression of a rule. Each is rendered by nft as written in its doc.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Match {
    /// `ct state established,related`
    Ct(CtState),
    /// `iifname "weft*"` / `oifname "weft*"`: interface name starts with the prefix.
    IfacePrefix {
        /// Input or output interface.
        field: IfaceField,
        /// The name prefix (without `*`).
        prefix: String,
    },
    /// `fib saddr . iif oif missing`: no route back to the source through the input interface.
    FibSaddrIifMissing,
    /// `ip saddr @set` (or `!= @set`): the address is (not) in a named set of that family.
    AddrInSet {
        /// Address family of the match and the set.
        family: Family,
        /// Which address.
        field: AddrField,
        /// The set's name.
        set: String,
        /// `!=`: matches when the address is not in the set.
        negate: bool,
    },
    /// `ip daddr . meta l4proto . th dport @set`: destination (address, protocol, port) in a
    /// named concatenated set (named ports).
    DestPortInSet {
        /// Address family of the match and the set.
        family: Family,
        /// The set's name.
        set: String,
    },
    /// `meta l4proto tcp`: the transport protocol, any port.
    L4Proto(Protocol),
    /// `tcp dport 80` or `tcp dport 1000-2000`: destination port in an inclusive range.
    DestPort {
        /// Transport protocol.
        protocol: Protocol,
        /// First port.
        first: u16,
        /// Last port (equal to `first` for one port).
        last: u16,
    },
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::Ct(CtState::EstablishedRelated) => f.write_str("ct state established,related"),
            Match::IfacePrefix { field, prefix } => {
                let kw = match field {
                    IfaceField::Input => "iifname",
                    IfaceField::Output => "oifname",
                };
                write!(f, "{kw} \"{prefix}*\"")
            }
            Match::FibSaddrIifMissing => f.write_str("fib saddr . iif oif missing"),
            Match::AddrInSet {
                family,
                field,
                set,
                negate,
            } => {
                let op = if *negate { "!= " } else { "" };
                write!(f, "{} {} {op}@{set}", family.keyword(), field.keyword())
            }
            Match::DestPortInSet { family, set } => write!(
                f,
                "{} daddr . meta l4proto . th dport @{set}",
                family.keyword()
            ),
            Match::L4Proto(p) => write!(f, "meta l4proto {}", p.keyword()),
            Match::DestPort {
                protocol,
                first,
                last,
            } => {
                if first == last {
                    write!(f, "{} dport {first}", protocol.keyword())
                } else {
                    write!(f, "{} dport {first}-{last}", protocol.keyword())
                }
            }
        }
    }
}

/// What a rule does when all its matches hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A verdict.
    Verdict(Verdict),
    /// `ip saddr vmap @map`: look the address up in a verdict map; no element, no verdict.
    Vmap {
        /// Address family of the lookup and the map.
        family: Family,
        /// Which address is the key.
        field: AddrField,
        /// The map's name.
        map: String,
    },
    /// `masquerade`: source NAT to the address of the outgoing interface (only in a `nat`
    /// chain on the `postrouting` hook; the table `inet weft-nat`, never the policy table).
    Masquerade,
    /// `ct mark set ct mark & … | … accept`: write one rule id into its field of the
    /// connection's mark, leave every other bit as it was, and accept.
    MarkAccept(CtMarkField),
    /// `limit rate N/second burst B packets log prefix "…" group G`: no verdict; a packet
    /// under the rate is sent to an nflog group, every packet goes on to the next rule.
    LogLimited(LogSpec),
}

/// One rule id written into its bit field of the conntrack mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtMarkField {
    /// The bits of the field (contiguous); the rest of the mark is left untouched.
    pub field: u32,
    /// The value written, already shifted into the field (`value & !field == 0`).
    pub value: u32,
}

impl CtMarkField {
    /// The mark after writing this field into `mark`.
    pub fn apply(self, mark: u32) -> u32 {
        (mark & !self.field) | self.value
    }

    /// The bitwise `(mark & mask) ^ xor` the kernel runs: `mask = !field`, `xor = value`.
    pub fn mask_xor(self) -> (u32, u32) {
        (!self.field, self.value)
    }
}

impl fmt::Display for CtMarkField {
    /// As nft prints it: the mask shown with the written bits folded in.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ct mark set ct mark & 0x{:08x} | 0x{:08x}",
            !self.field | self.value,
            self.value
        )
    }
}

/// A rate-limited nflog statement (the kernel's `log` expression with a group).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogSpec {
    /// Packets per second let through to the log.
    pub rate_per_second: u64,
    /// Burst, in packets.
    pub burst: u32,
    /// nflog group the agent listens on.
    pub group: u16,
    /// Prefix carried with every logged packet (at most [`MAX_LOG_PREFIX_BYTES`]).
    pub prefix: String,
}

/// The kernel keeps log prefixes of at most this many bytes (`NF_LOG_PREFIXLEN - 1`).
pub const MAX_LOG_PREFIX_BYTES: usize = 127;

/// nft's default `limit` burst (it omits `burst 5 packets` when printing).
pub const DEFAULT_LIMIT_BURST: u32 = 5;

impl fmt::Display for LogSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "limit rate {}/second ", self.rate_per_second)?;
        if self.burst != DEFAULT_LIMIT_BURST {
            write!(f, "burst {} packets ", self.burst)?;
        }
        write!(
            f,
            "log prefix \"{}\" group {}",
            escape_comment(&self.prefix),
            self.group
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Verdict(v) => write!(f, "{v}"),
            Action::Vmap { family, field, map } => {
                write!(f, "{} {} vmap @{map}", family.keyword(), field.keyword())
            }
            Action::Masquerade => f.write_str("masquerade"),
            Action::MarkAccept(m) => write!(f, "{m} accept"),
            Action::LogLimited(l) => write!(f, "{l}"),
        }
    }
}

/// One rule: matches (all must hold), an optional counter, an action, a comment.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Match expressions, in order.
    pub matches: Vec<Match>,
    /// `counter` before the action.
    pub counter: bool,
    /// The action.
    pub action: Action,
    /// Which policy and rule this comes from (at most [`MAX_COMMENT_BYTES`]).
    pub comment: Option<String>,
}

impl Rule {
    /// The chain this rule jumps to, if any.
    pub fn jump_target(&self) -> Option<&str> {
        match &self.action {
            Action::Verdict(v) => v.target(),
            Action::Vmap { .. }
            | Action::Masquerade
            | Action::MarkAccept(_)
            | Action::LogLimited(_) => None,
        }
    }

    /// Every named set or map this rule refers to.
    pub fn set_refs(&self) -> impl Iterator<Item = &str> {
        let from_matches = self.matches.iter().filter_map(|m| match m {
            Match::AddrInSet { set, .. } | Match::DestPortInSet { set, .. } => Some(set.as_str()),
            _ => None,
        });
        let from_action = match &self.action {
            Action::Vmap { map, .. } => Some(map.as_str()),
            Action::Verdict(_)
            | Action::Masquerade
            | Action::MarkAccept(_)
            | Action::LogLimited(_) => None,
        };
        from_matches.chain(from_action)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.matches {
            write!(f, "{m} ")?;
        }
        if self.counter {
            f.write_str("counter ")?;
        }
        write!(f, "{}", self.action)?;
        if let Some(c) = &self.comment {
            write!(f, " comment \"{}\"", escape_comment(c))?;
        }
        Ok(())
    }
}

/// A chain with its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The definition.
    pub def: ChainDef,
    /// Rules, in order.
    pub rules: Vec<Rule>,
}

impl Chain {
    /// A base chain `name` on `hook` with these rules.
    pub fn base(name: &str, hook: BaseHook, rules: Vec<Rule>) -> Chain {
        Chain {
            def: ChainDef {
                name: name.into(),
                base: Some(hook),
            },
            rules,
        }
    }
}

/// weft's table: its sets and maps (one name space, as in the kernel) and its chains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    /// Table name (family is always `inet`).
    pub table: String,
    /// Table comment; carries the schema version.
    pub comment: String,
    /// Sets and verdict maps by name.
    pub sets: BTreeMap<String, Set>,
    /// Chains by name.
    pub chains: BTreeMap<String, Chain>,
}

impl Ruleset {
    /// An empty table of the current schema.
    pub fn new(table: &str) -> Ruleset {
        Ruleset {
            table: table.to_string(),
            comment: table_comment(SCHEMA_VERSION),
            sets: BTreeMap::new(),
            chains: BTreeMap::new(),
        }
    }

    /// The schema version recorded in the table comment.
    pub fn schema(&self) -> Option<u32> {
        schema_from_comment(&self.comment)
    }

    /// Number of set and map elements in the table.
    pub fn element_count(&self) -> usize {
        self.sets.values().map(|s| s.elements.len()).sum()
    }

    /// Number of rules in the table.
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(|c| c.rules.len()).sum()
    }

    /// Chains referenced (by `jump`) from any rule or verdict-map element.
    pub fn referenced_chains(&self) -> std::collections::BTreeSet<&str> {
        let mut out = std::collections::BTreeSet::new();
        for chain in self.chains.values() {
            out.extend(chain.rules.iter().filter_map(Rule::jump_target));
        }
        for set in self.sets.values() {
            out.extend(set.elements.values().flatten().filter_map(Verdict::target));
        }
        out
    }
}

/// The node-local rule id a policy rule's comment carries (`… id=17`), if any.
pub fn rule_id_from_comment(comment: &str) -> Option<u32> {
    let (_, tail) = comment.rsplit_once(" id=")?;
    tail.parse().ok()
}

/// Comments are free text from Kubernetes names; `"` would end nft's string early.
fn escape_comment(c: &str) -> String {
    c.replace('"', "'")
}

impl fmt::Display for SetDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key: Vec<&str> = self.key.iter().map(|k| k.nft_name()).collect();
        write!(f, "\t\ttype {}", key.join(" . "))?;
        if self.verdict_map {
            f.write_str(" : verdict")?;
        }
        f.write_str("\n")?;
        if self.interval {
            f.write_str("\t\tflags interval\n")?;
        }
        if let Some(c) = &self.comment {
            writeln!(f, "\t\tcomment \"{}\"", escape_comment(c))?;
        }
        Ok(())
    }
}

impl fmt::Display for Ruleset {
    /// Renders the table as `nft -f` input, in the order `nft list table` prints it: sets and
    /// maps (by name), then chains (by name).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table inet {} {{", self.table)?;
        writeln!(f, "\tcomment \"{}\"", escape_comment(&self.comment))?;
        for set in self.sets.values() {
            let kind = if set.def.verdict_map { "map" } else { "set" };
            writeln!(f, "\n\t{kind} {} {{", set.def.name)?;
            write!(f, "{}", set.def)?;
            if !set.elements.is_empty() {
                f.write_str("\t\telements = { ")?;
                for (i, (key, data)) in set.elements.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",\n\t\t\t     ")?;
                    }
                    write!(f, "{key}")?;
                    if let Some(v) = data {
                        write!(f, " : {v}")?;
                    }
                }
                f.write_str(" }\n")?;
            }
            f.write_str("\t}\n")?;
        }
        for chain in self.chains.values() {
            writeln!(f, "\n\tchain {} {{", chain.def.name)?;
            if let Some(b) = &chain.def.base {
                let kind = match b.kind {
                    ChainType::Filter => "filter",
                    ChainType::Nat => "nat",
                };
                let policy = match b.policy {
                    ChainPolicy::Accept => "accept",
                    ChainPolicy::Drop => "drop",
                };
                writeln!(
                    f,
                    "\t\ttype {kind} hook {} priority {}; policy {policy};",
                    b.hook.keyword(),
                    priority_name(b.kind, b.priority)
                )?;
            }
            for rule in &chain.rules {
                writeln!(f, "\t\t{rule}")?;
            }
            f.write_str("\t}\n")?;
        }
        f.write_str("}\n")
    }
}

/// nft prints filter-type priorities relative to `filter` (0) and nat ones relative to
/// `srcnat` (100): `filter - 1`, `srcnat`.
fn priority_name(kind: ChainType, priority: i32) -> String {
    let (name, base) = match kind {
        ChainType::Filter => ("filter", 0),
        ChainType::Nat => ("srcnat", 100),
    };
    match priority - base {
        0 => name.to_string(),
        d if d > 0 => format!("{name} + {d}"),
        d => format!("{name} - {}", -d),
    }
}

/// Builds an object name `<kind>-<hash>-<readable>` that fits the kernel's limit and nft's
/// identifier syntax: characters outside `[A-Za-z0-9_-]` in the readable part become `_`.
pub fn object_name(kind: &str, hash: &str, readable: &str) -> String {
    let mut name = format!("{kind}-{hash}");
    if !readable.is_empty() {
        name.push('-');
        for c in readable.chars() {
            if name.len() >= MAX_NAME_BYTES {
                break;
            }
            name.push(if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            });
        }
    }
    name
}

/// Cuts a comment to at most [`MAX_COMMENT_BYTES`] bytes on a character boundary, marking the cut.
pub fn fit_comment(text: &str) -> String {
    if text.len() <= MAX_COMMENT_BYTES {
        return text.to_string();
    }
    let mut end = MAX_COMMENT_BYTES - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A stable 64-bit FNV-1a hash, rendered as 8 lower-case base-32 characters (40 bits).
/// Stable across processes, versions and machines, unlike `std`'s hasher: names derived from
/// it survive restarts and upgrades.
pub fn short_hash(content: &str) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in content.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0..8)
        .map(|i| char::from(ALPHABET[((h >> (i * 5)) & 31) as usize]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_that_are_prefixes_print_as_prefixes() {
        let k = Key::range(
            vec![Value::V4("10.0.0.0".parse().unwrap())],
            vec![Value::V4("10.0.255.255".parse().unwrap())],
        );
        assert_eq!(k.to_string(), "10.0.0.0/16");
        let k = Key::range(
            vec![Value::V4("10.0.0.1".parse().unwrap())],
            vec![Value::V4("10.0.0.5".parse().unwrap())],
        );
        assert_eq!(k.to_string(), "10.0.0.1-10.0.0.5");
        let k = Key::range(
            vec![Value::V6(Ipv6Addr::UNSPECIFIED)],
            vec![Value::V6(Ipv6Addr::from(u128::MAX))],
        );
        assert_eq!(k.to_string(), "::/0");
    }

    #[test]
    fn concatenated_keys_print_with_dots_and_protocol_names() {
        let k = Key::point(vec![
            Value::V4("10.244.1.2".parse().unwrap()),
            Value::Proto(6),
            Value::Port(8080),
        ]);
        assert_eq!(k.to_string(), "10.244.1.2 . tcp . 8080");
    }

    #[test]
    fn object_names_fit_the_kernel_and_nft_syntax() {
        let long = "x".repeat(400);
        let n = object_name("pol", "abcdefgh", &format!("ns/{long}.y"));
        assert!(n.len() <= MAX_NAME_BYTES);
        assert!(n.starts_with("pol-abcdefgh-ns_xxx"));
        assert!(
            n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[test]
    fn comments_are_cut_on_a_char_boundary() {
        let c = fit_comment(&"é".repeat(100));
        assert!(c.len() <= MAX_COMMENT_BYTES);
        assert!(c.ends_with("..."));
        assert_eq!(fit_comment("short"), "short");
    }

    #[test]
    fn short_hash_is_stable() {
        // Pinned: names derived from it must never change between releases, or a restart
        // would see every set and chain as new.
        assert_eq!(short_hash(""), short_hash(""));
        assert_eq!(short_hash("sel:ns=x:role=web").len(), 8);
        assert_ne!(short_hash("a"), short_hash("b"));
        assert_eq!(short_hash("weft"), "lenm7my6");
    }

    #[test]
    fn schema_round_trips_through_the_table_comment() {
        assert_eq!(schema_from_comment(&table_comment(7)), Some(7));
        assert_eq!(schema_from_comment("something else"), None);
    }

    #[test]
    fn masquerade_prints_as_nft_writes_it() {
        let r = Rule {
            matches: vec![
                Match::AddrInSet {
                    family: Family::V4,
                    field: AddrField::Saddr,
                    set: "cluster-v4".into(),
                    negate: false,
                },
                Match::AddrInSet {
                    family: Family::V4,
                    field: AddrField::Daddr,
                    set: "cluster-v4".into(),
                    negate: true,
                },
            ],
            counter: true,
            action: Action::Masquerade,
            comment: Some("pods to the outside".into()),
        };
        assert_eq!(
            r.to_string(),
            "ip saddr @cluster-v4 ip daddr != @cluster-v4 counter masquerade comment \"pods to the outside\""
        );
        assert_eq!(r.jump_target(), None);
        assert_eq!(
            r.set_refs().collect::<Vec<_>>(),
            ["cluster-v4", "cluster-v4"]
        );
    }

    #[test]
    fn priorities_print_relative_to_their_keyword() {
        assert_eq!(priority_name(ChainType::Filter, -1), "filter - 1");
        assert_eq!(priority_name(ChainType::Filter, 0), "filter");
        assert_eq!(priority_name(ChainType::Nat, 100), "srcnat");
    }
}
