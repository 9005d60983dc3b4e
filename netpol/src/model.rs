//! The typed, validated view of the cluster objects the engine needs.
//!
//! Kubernetes objects (`k8s-openapi` types) come in; [`Pod`], [`Namespace`] and [`Policy`] go
//! out. Validation **fails closed**: a peer or port that cannot be used is dropped from its rule
//! (so it allows nothing) and recorded in [`Policy::errors`], but the policy still isolates the
//! pods it selects, and every other policy is untouched. Only a policy whose own `podSelector`
//! is unusable is refused whole ([`PolicyError`]); the caller keeps enforcing its last valid
//! version.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as ApiSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::ruleset::{Family, Protocol};
use crate::selector::{LabelSelector, SelectorError};

/// The label every namespace carries with its own name (set by the API server).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A port a container declares, as named ports resolve against it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    /// The port's name (`http`), if it has one.
    pub name: Option<String>,
    /// The port number.
    pub port: u16,
    /// Its protocol (TCP when unset).
    pub protocol: Protocol,
}

/// A pod as the engine sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Namespace and name.
    pub key: ObjectKey,
    /// `metadata.uid`.
    pub uid: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Pod IPs (at most one per family).
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName` (empty while unscheduled).
    pub node: String,
    /// Declared container ports, for named ports.
    pub ports: Vec<ContainerPort>,
    /// `spec.hostNetwork`: such a pod uses its node's address and is never a set member.
    pub host_network: bool,
    /// Phase Succeeded or Failed: its IP may already belong to another pod.
    pub terminated: bool,
}

impl Pod {
    /// Whether the pod takes part in policy (gets set memberships, dispatch, named ports):
    /// running or pending with an IP, and not on the host network.
    pub fn is_member(&self) -> bool {
        !self.host_network && !self.terminated && !self.ips.is_empty()
    }

    /// The pod's IP of one family.
    pub fn ip(&self, family: Family) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| family_of(*ip) == family)
    }

    /// The port numbers a named port resolves to on this pod, for one protocol.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> impl Iterator<Item = u16> + '_ {
        let name = name.to_string();
        self.ports
            .iter()
            .filter(move |p| p.protocol == protocol && p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.port)
    }
}

/// The family of an address.
pub fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// A namespace: its labels (always including [`NAMESPACE_NAME_LABEL`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels, including `kubernetes.io/metadata.name: <name>`.
    pub labels: BTreeMap<String, String>,
}

impl Namespace {
    /// A namespace with these labels plus its name label.
    pub fn new(name: &str, labels: BTreeMap<String, String>) -> Namespace {
        let mut labels = labels;
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
        Namespace {
            name: name.to_string(),
            labels,
        }
    }
}

/// Which namespaces a pod peer looks in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NamespaceScope {
    /// Only the policy's own namespace (a `podSelector` without `namespaceSelector`).
    Own(String),
    /// Every namespace matching the selector.
    Selected(LabelSelector),
}

/// A set of pods: those matching `pods` in the namespaces of `namespaces`. Deduplicated by
/// value in the index; one nft set per distinct selection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodSelection {
    /// Namespace scope.
    pub namespaces: NamespaceScope,
    /// Pod label selector within those namespaces.
    pub pods: LabelSelector,
}

impl PodSelection {
    /// Canonical text (stable across processes): the basis of the set's name.
    pub fn canonical(&self) -> String {
        match &self.namespaces {
            NamespaceScope::Own(ns) => format!("ns={ns};pods={}", self.pods.canonical()),
            NamespaceScope::Selected(s) => {
                format!("nssel={};pods={}", s.canonical(), self.pods.canonical())
            }
        }
    }

    /// Whether a pod in a namespace with these labels is selected.
    pub fn matches(&self, pod: &Pod, namespace_labels: Option<&BTreeMap<String, String>>) -> bool {
        let ns_ok = match &self.namespaces {
            NamespaceScope::Own(ns) => pod.key.namespace == *ns,
            NamespaceScope::Selected(sel) => namespace_labels.is_some_and(|l| sel.matches(l)),
        };
        ns_ok && self.pods.matches(&pod.labels)
    }
}

/// An `ipBlock`: a CIDR minus exceptions, all of one family, masked to their prefixes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpBlock {
    /// The CIDR (host bits cleared).
    pub cidr: IpNet,
    /// Exceptions, each strictly inside `cidr` (host bits cleared).
    pub except: Vec<IpNet>,
}

impl IpBlock {
    /// The family of the block.
    pub fn family(&self) -> Family {
        family_of(self.cidr.addr())
    }

    /// Whether the address is in the CIDR and in none of the exceptions.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }

    /// Canonical text (stable): the basis of the set's name.
    pub fn canonical(&self) -> String {
        let except: Vec<String> = self.except.iter().map(ToString::to_string).collect();
        format!("{} except {}", self.cidr, except.join(","))
    }
}

/// One peer of a rule (`from` / `to` entry).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Pods chosen by label.
    Pods(PodSelection),
    /// Addresses.
    Block(IpBlock),
}

/// One port entry of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSpec {
    /// Every port of a protocol (`port` omitted).
    AllPorts(Protocol),
    /// A port number, or a range with `endPort` (inclusive).
    Numbers {
        /// Protocol.
        protocol: Protocol,
        /// First port.
        first: u16,
        /// Last port (equal to `first` without endPort).
        last: u16,
    },
    /// A named port, resolved on the destination pod.
    Named {
        /// Protocol the container port must have.
        protocol: Protocol,
        /// The name.
        name: String,
    },
}

impl PortSpec {
    /// The protocol of this entry.
    pub fn protocol(&self) -> Protocol {
        match self {
            PortSpec::AllPorts(p) => *p,
            PortSpec::Numbers { protocol, .. } | PortSpec::Named { protocol, .. } => *protocol,
        }
    }
}

/// One ingress or egress rule: traffic is allowed if some peer matches and some port matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolicyRule {
    /// `None`: every peer (the list was empty or absent). `Some(v)`: only these; an empty `v`
    /// means every listed peer was unusable, so the rule allows nothing.
    pub peers: Option<Vec<Peer>>,
    /// `None`: every port and protocol. `Some(v)`: only these; empty `v` allows nothing.
    pub ports: Option<Vec<PortSpec>>,
}

/// A validated NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Namespace and name.
    pub key: ObjectKey,
    /// `metadata.uid` (may be empty in tests).
    pub uid: String,
    /// Pods the policy applies to, in its namespace.
    pub subject: LabelSelector,
    /// `Some` if the policy isolates ingress (its rules, maybe none).
    pub ingress: Option<Vec<PolicyRule>>,
    /// `Some` if the policy isolates egress.
    pub egress: Option<Vec<PolicyRule>>,
    /// Peers and ports dropped because they cannot be used (fail closed).
    pub errors: Vec<RuleError>,
}

impl Policy {
    /// The subject selection: pods matching `subject` in the policy's namespace.
    pub fn subject_selection(&self) -> PodSelection {
        PodSelection {
            namespaces: NamespaceScope::Own(self.key.namespace.clone()),
            pods: self.subject.clone(),
        }
    }

    /// The rules of one direction, if the policy isolates it.
    pub fn rules(&self, direction: Direction) -> Option<&[PolicyRule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// Traffic direction relative to the selected (subject) pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Towards the subject pod.
    Ingress,
    /// From the subject pod.
    Egress,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// Short name used in chain names and comments.
    pub fn short(self) -> &'static str {
        match self {
            Direction::Ingress => "in",
            Direction::Egress => "eg",
        }
    }

    /// The API's word.
    pub fn api_name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// A peer or port of a policy that was dropped, and why. The policy is still enforced.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{policy}: {}: {reason}", self.location())]
pub struct RuleError {
    /// The policy.
    pub policy: ObjectKey,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// Rule index.
    pub rule: usize,
    /// Which entry, e.g. `from[1]`, `ports[0]`, `policyTypes[2]`.
    pub place: String,
    /// Why it cannot be used.
    pub reason: String,
}

impl RuleError {
    /// Where in the object: `ingress[0] from[1]`, or `spec.policyTypes[2]`.
    pub fn location(&self) -> String {
        if self.direction == "spec" {
            format!("spec.{}", self.place)
        } else {
            format!("{}[{}] {}", self.direction, self.rule, self.place)
        }
    }
}

/// A policy that cannot be enforced at all (its own pod selector is unusable). The engine keeps
/// the previous valid version of the object, if any.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// `spec.podSelector` is malformed.
    #[error("{policy}: spec.podSelector: {source}")]
    Subject {
        /// The policy.
        policy: ObjectKey,
        /// The selector problem.
        #[source]
        source: SelectorError,
    },
    /// The object has no namespace or name.
    #[error("NetworkPolicy without namespace or name")]
    Unnamed,
}

fn labels_of(meta_labels: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    meta_labels.clone().unwrap_or_default()
}

/// Converts an API label selector; `None` (absent) is the empty selector.
pub fn selector_from_api(sel: Option<&ApiSelector>) -> Result<LabelSelector, SelectorError> {
    let Some(sel) = sel else {
        return Ok(LabelSelector::everything());
    };
    let labels = sel.match_labels.clone().unwrap_or_default();
    let exprs: Vec<(String, String, Vec<String>)> = sel
        .match_expressions
        .iter()
        .flatten()
        .map(|e| {
            (
                e.key.clone(),
                e.operator.clone(),
                e.values.clone().unwrap_or_default(),
            )
        })
        .collect();
    LabelSelector::new(&labels, &exprs)
}

/// Parses an API protocol string (`None` = TCP).
pub fn protocol_from_api(p: Option<&str>) -> Result<Protocol, String> {
    match p {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(format!("unknown protocol {other:?}")),
    }
}

impl Pod {
    /// Converts an API pod. Returns `None` for objects without namespace or name.
    pub fn from_api(pod: &core::Pod) -> Option<Pod> {
        let meta = &pod.metadata;
        let key = ObjectKey::new(meta.namespace.as_deref()?, meta.name.as_deref()?);
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = Vec::new();
        let listed = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|p| p.ip.as_str());
        let single = status.and_then(|s| s.pod_ip.as_deref());
        for text in listed.chain(single) {
            if let Ok(ip) = text.parse::<IpAddr>() {
                let ip = canonical_ip(ip);
                if !ips.iter().any(|have| family_of(*have) == family_of(ip)) {
                    ips.push(ip);
                }
            }
        }
        let ports = spec
            .map(|s| s.containers.as_slice())
            .unwrap_or_default()
            .iter()
            .chain(
                // Sidecars (init containers that keep running) serve ports too; the others
                // exit before the pod runs.
                spec.and_then(|s| s.init_containers.as_ref())
                    .into_iter()
                    .flatten()
                    .filter(|c| c.restart_policy.as_deref() == Some("Always")),
            )
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some(ContainerPort {
                    name: p.name.clone(),
                    port: u16::try_from(p.container_port).ok().filter(|n| *n > 0)?,
                    protocol: protocol_from_api(p.protocol.as_deref()).ok()?,
                })
            })
            .collect();
        let phase = status.and_then(|s| s.phase.as_deref());
        Some(Pod {
            key,
            uid: meta.uid.clone().unwrap_or_default(),
            labels: labels_of(&meta.labels),
            ips,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ports,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminated: matches!(phase, Some("Succeeded" | "Failed")),
        })
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the IPv4 address it carries.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

impl Namespace {
    /// Converts an API namespace. Returns `None` without a name.
    pub fn from_api(ns: &core::Namespace) -> Option<Namespace> {
        let name = ns.metadata.name.as_deref()?;
        Some(Namespace::new(name, labels_of(&ns.metadata.labels)))
    }
}

impl Policy {
    /// Validates an API NetworkPolicy. Unusable peers and ports are dropped and listed in
    /// `errors`; an unusable `podSelector` refuses the whole object.
    pub fn from_api(np: &net::NetworkPolicy) -> Result<Policy, PolicyError> {
        let meta = &np.metadata;
        let key = ObjectKey::new(
            meta.namespace.as_deref().ok_or(PolicyError::Unnamed)?,
            meta.name.as_deref().ok_or(PolicyError::Unnamed)?,
        );
        let default_spec = net::NetworkPolicySpec::default();
        let spec = np.spec.as_ref().unwrap_or(&default_spec);
        let subject = selector_from_api(spec.pod_selector.as_ref()).map_err(|source| {
            PolicyError::Subject {
                policy: key.clone(),
                source,
            }
        })?;
        let mut errors = Vec::new();

        let has_egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        let (mut isolate_in, mut isolate_eg) = (false, false);
        match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
            // The API's default: Ingress always, Egress when egress rules are present.
            None => {
                isolate_in = true;
                isolate_eg = has_egress_rules;
            }
            Some(types) => {
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => isolate_in = true,
                        "Egress" => isolate_eg = true,
                        other => errors.push(RuleError {
                            policy: key.clone(),
                            direction: "spec",
                            rule: 0,
                            place: format!("policyTypes[{i}]"),
                            reason: format!("unknown policy type {other:?}, ignored"),
                        }),
                    }
                }
            }
        }

        let ingress = isolate_in.then(|| {
            spec.ingress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| {
                    let mut ctx = RuleCtx::new(&key, Direction::Ingress, i, &mut errors);
                    PolicyRule {
                        peers: ctx.peers(r.from.as_deref(), "from"),
                        ports: ctx.ports(r.ports.as_deref()),
                    }
                })
                .collect()
        });
        let egress = isolate_eg.then(|| {
            spec.egress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| {
                    let mut ctx = RuleCtx::new(&key, Direction::Egress, i, &mut errors);
                    PolicyRule {
                        peers: ctx.peers(r.to.as_deref(), "to"),
                        ports: ctx.ports(r.ports.as_deref()),
                    }
                })
                .collect()
        });
        Ok(Policy {
            key,
            uid: meta.uid.clone().unwrap_or_default(),
            subject,
            ingress,
            egress,
            errors,
        })
    }
}

/// Validation context of one rule: knows where it is, collects errors.
struct RuleCtx<'a> {
    policy: &'a ObjectKey,
    direction: Direction,
    rule: usize,
    errors: &'a mut Vec<RuleError>,
}

impl<'a> RuleCtx<'a> {
    fn new(
        policy: &'a ObjectKey,
        direction: Direction,
        rule: usize,
        errors: &'a mut Vec<RuleError>,
    ) -> Self {
        RuleCtx {
            policy,
            direction,
            rule,
            errors,
        }
    }

    fn error(&mut self, place: String, reason: String) {
        self.errors.push(RuleError {
            policy: self.policy.clone(),
            direction: self.direction.api_name(),
            rule: self.rule,
            place,
            reason,
        });
    }

    fn peers(&mut self, list: Option<&[net::NetworkPolicyPeer]>, word: &str) -> Option<Vec<Peer>> {
        let list = list.filter(|l| !l.is_empty())?;
        let mut out = Vec::new();
        for (i, p) in list.iter().enumerate() {
            match self.peer(p) {
                Ok(peer) => out.push(peer),
                Err(reason) => self.error(format!("{word}[{i}]"), format!("{reason}; skipped")),
            }
        }
        Some(out)
    }

    fn peer(&mut self, p: &net::NetworkPolicyPeer) -> Result<Peer, String> {
        // From the API: "Exactly one of the selector pointers must be set" for ipBlock versus
        // the selectors; podSelector and namespaceSelector together select pods matching
        // podSelector in namespaces matching namespaceSelector.
        match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                Err("ipBlock cannot be combined with a selector".to_string())
            }
            (Some(b), None, None) => {
                ip_block(&b.cidr, b.except.as_deref().unwrap_or_default()).map(Peer::Block)
            }
            (None, None, None) => Err("peer has no selector and no ipBlock".to_string()),
            (None, pods, nss) => {
                let pods =
                    selector_from_api(pods.as_ref()).map_err(|e| format!("podSelector: {e}"))?;
                let namespaces = match nss {
                    None => NamespaceScope::Own(self.policy.namespace.clone()),
                    Some(s) => NamespaceScope::Selected(
                        selector_from_api(Some(s))
                            .map_err(|e| format!("namespaceSelector: {e}"))?,
                    ),
                };
                Ok(Peer::Pods(PodSelection { namespaces, pods }))
            }
        }
    }

    fn ports(&mut self, list: Option<&[net::NetworkPolicyPort]>) -> Option<Vec<PortSpec>> {
        let list = list.filter(|l| !l.is_empty())?;
        let mut out = Vec::new();
        for (i, p) in list.iter().enumerate() {
            match port_spec(p) {
                Ok(spec) => out.push(spec),
                Err(reason) => self.error(format!("ports[{i}]"), format!("{reason}; skipped")),
            }
        }
        Some(out)
    }
}

/// Validates an ipBlock: the CIDR is masked (legacy host bits), every `except` must be a
/// strict subset of it, of the same family.
pub fn ip_block(cidr: &str, except: &[String]) -> Result<IpBlock, String> {
    let parse = |s: &str| -> Result<IpNet, String> {
        let net = s
            .trim()
            .parse::<IpNet>()
            .map_err(|_| format!("invalid CIDR {s:?}"))?;
        Ok(unmap_v4(net).trunc())
    };
    let cidr = parse(cidr)?;
    let mut out = Vec::new();
    for e in except {
        let net = parse(e)?;
        let inside = family_of(net.addr()) == family_of(cidr.addr())
            && cidr.contains(&net)
            && net.prefix_len() > cidr.prefix_len();
        if !inside {
            return Err(format!("except {net} is not strictly inside {cidr}"));
        }
        out.push(net);
    }
    out.sort();
    out.dedup();
    Ok(IpBlock { cidr, except: out })
}

/// An IPv4-mapped IPv6 CIDR (`::ffff:10.0.0.0/104`) means the IPv4 CIDR it carries
/// (`10.0.0.0/8`): pod traffic is IPv4, so only the IPv4 form can ever match (the API warns
/// and suggests the same rewrite).
fn unmap_v4(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

/// Validates one port entry.
pub fn port_spec(p: &net::NetworkPolicyPort) -> Result<PortSpec, String> {
    let protocol = protocol_from_api(p.protocol.as_deref())?;
    let number = |n: i32, what: &str| -> Result<u16, String> {
        u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{what} {n} is not in 1..65535"))
    };
    match (&p.port, p.end_port) {
        (None, None) => Ok(PortSpec::AllPorts(protocol)),
        (None, Some(_)) => Err("endPort without port".to_string()),
        (Some(IntOrString::String(name)), None) => {
            if name.is_empty() {
                return Err("empty port name".to_string());
            }
            match name.parse::<i32>() {
                // A number written as a string is still a number to the API.
                Ok(n) => {
                    let n = number(n, "port")?;
                    Ok(PortSpec::Numbers {
                        protocol,
                        first: n,
                        last: n,
                    })
                }
                Err(_) => Ok(PortSpec::Named {
                    protocol,
                    name: name.clone(),
                }),
            }
        }
        (Some(IntOrString::String(_)), Some(_)) => {
            Err("endPort cannot be used with a named port".to_string())
        }
        (Some(IntOrString::Int(n)), end) => {
            let first = number(*n, "port")?;
            let last = match end {
                None => first,
                Some(e) => number(e, "endPort")?,
            };
            if last < first {
                return Err(format!("endPort {last} is below port {first}"));
            }
            Ok(PortSpec::Numbers {
                protocol,
                first,
                last,
            })
        }
    }
}

/// Everything the engine knows about the cluster: the input of compile and of the evaluator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods by key.
    pub pods: BTreeMap<ObjectKey, Pod>,
    /// Policies by key.
    pub policies: BTreeMap<ObjectKey, Policy>,
}

impl Cluster {
    /// Labels of a namespace, if it is known.
    pub fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(ns).map(|n| &n.labels)
    }

    /// Member pods (see [`Pod::is_member`]) matching a selection. Visits only the namespaces
    /// the selection's scope can include.
    pub fn select<'a>(&'a self, sel: &'a PodSelection) -> Box<dyn Iterator<Item = &'a Pod> + 'a> {
        let matching = move |p: &&Pod| {
            p.is_member() && sel.matches(p, self.namespace_labels(&p.key.namespace))
        };
        match &sel.namespaces {
            NamespaceScope::Own(ns) => Box::new(self.pods_in_namespace(ns).filter(matching)),
            NamespaceScope::Selected(s) if !s.is_everything() => Box::new(
                self.namespaces
                    .values()
                    .filter(move |n| s.matches(&n.labels))
                    .flat_map(move |n| self.pods_in_namespace(&n.name))
                    .filter(matching),
            ),
            NamespaceScope::Selected(_) => Box::new(self.pods.values().filter(matching)),
        }
    }

    /// Pods of one namespace (a range of the pod map, ordered by name).
    pub fn pods_in_namespace<'a>(&'a self, ns: &str) -> impl Iterator<Item = &'a Pod> + 'a {
        let start = ObjectKey::new(ns, "");
        let ns = ns.to_string();
        self.pods
            .range(start..)
            .take_while(move |(k, _)| k.namespace == ns)
            .map(|(_, p)| p)
    }

    /// Policies of one namespace.
    pub fn policies_in_namespace<'a>(&'a self, ns: &str) -> impl Iterator<Item = &'a Policy> + 'a {
        let start = ObjectKey::new(ns, "");
        let ns = ns.to_string();
        self.policies
            .range(start..)
            .take_while(move |(k, _)| k.namespace == ns)
            .map(|(_, p)| p)
    }

    /// The member pod that owns an address, if any.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods
            .values()
            .find(|p| p.is_member() && p.ips.contains(&ip))
    }

    /// Names of namespaces referenced by pods but unknown: their pods match no namespaceSelector.
    pub fn unknown_namespaces(&self) -> BTreeSet<&str> {
        self.pods
            .values()
            .map(|p| p.key.namespace.as_str())
            .filter(|ns| !self.namespaces.contains_key(*ns))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_ip_blocks_mean_their_ipv4_cidr() {
        let b = ip_block("::ffff:10.244.0.0/112", &["::ffff:10.244.1.0/120".into()]).unwrap();
        assert_eq!(b.cidr.to_string(), "10.244.0.0/16");
        assert_eq!(b.except[0].to_string(), "10.244.1.0/24");
        assert!(b.contains("10.244.0.9".parse().unwrap()));
        assert!(!b.contains("10.244.1.9".parse().unwrap()));
        // A plain IPv6 block stays IPv6; host bits are masked.
        let v6 = ip_block("fd00:10:244::1/48", &[]).unwrap();
        assert_eq!(v6.cidr.to_string(), "fd00:10:244::/48");
    }
}
