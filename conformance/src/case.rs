//! The case-file format (`shared/CASES.md`), typed and validated.
//!
//! [`parse`] reads YAML into private raw structs that reject unknown fields, then builds a
//! [`CaseFile`] whose every [`Case`] has been checked against the rules of the format: unique
//! ids, declared namespaces, the `pod: <name>` label on every pod at every step, matrices of
//! the right size for their `pod_order`, a `pod_order` that covers exactly the pods present,
//! policies that are valid `networking.k8s.io/v1` objects with well-formed templates, actions
//! that name things that exist. A runner can then replay a case without re-checking any of it.
//!
//! Errors say which case (by id) and, when the YAML parser knows it, which line.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use weft_netpol::ruleset::{Family, Protocol};

use crate::matrix::TruthTable;
use crate::template::{self, TemplateError};

mod validate;

use validate::{RawFile, build_case};

/// The schema versions this crate reads.
pub const SCHEMA_VERSIONS: [u32; 2] = [1, 2];

/// The label every pod of a case carries with its own name; Services select on it.
pub const POD_LABEL: &str = "pod";

/// The label the API server puts on every namespace with its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A pod by namespace and name, written `ns/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
}

impl PodRef {
    /// A reference from its parts.
    pub fn new(namespace: &str, name: &str) -> PodRef {
        PodRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for PodRef {
    type Err = String;

    fn from_str(s: &str) -> Result<PodRef, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(PodRef::new(ns, name))
            }
            _ => Err(format!("{s:?} is not a pod reference `namespace/name`")),
        }
    }
}

impl<'de> Deserialize<'de> for PodRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PodRef, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

impl Serialize for PodRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What a runner must support to run a case (`feature_tags`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    /// `Feature:SCTPConnectivity`: the case has SCTP servers; a runner without SCTP skips it.
    SctpConnectivity,
    /// `Feature:IPv6DualStack`: the case has IPv6 checks; a runner without IPv6 skips those.
    Ipv6DualStack,
    /// `PinnedPodIPs`: pods must get exactly their `ip`/`ipv6`; a runner without it skips the
    /// case.
    PinnedPodIps,
    /// `LinuxOnly`: informative.
    LinuxOnly,
}

impl Feature {
    /// Every feature, in tag order.
    pub const ALL: [Feature; 4] = [
        Feature::SctpConnectivity,
        Feature::Ipv6DualStack,
        Feature::PinnedPodIps,
        Feature::LinuxOnly,
    ];

    /// The tag as case files write it.
    pub fn tag(self) -> &'static str {
        match self {
            Feature::SctpConnectivity => "Feature:SCTPConnectivity",
            Feature::Ipv6DualStack => "Feature:IPv6DualStack",
            Feature::PinnedPodIps => "PinnedPodIPs",
            Feature::LinuxOnly => "LinuxOnly",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.tag())
    }
}

impl FromStr for Feature {
    type Err = String;

    fn from_str(s: &str) -> Result<Feature, String> {
        Feature::ALL
            .into_iter()
            .find(|f| f.tag() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Feature::ALL.iter().map(|f| f.tag()).collect();
                format!("unknown feature tag `{s}` (known: {})", known.join(", "))
            })
    }
}

impl<'de> Deserialize<'de> for Feature {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Feature, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// The API name of a protocol (`TCP`).
pub fn protocol_name(protocol: Protocol) -> &'static str {
    protocol.api_name()
}

/// The case-file name of a family (`IPv4`, `IPv6`).
pub fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    Protocol::ALL
        .into_iter()
        .find(|p| p.api_name() == s)
        .ok_or_else(|| format!("unknown protocol `{s}` (TCP, UDP or SCTP)"))
}

fn de_protocol<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Protocol, D::Error> {
    parse_protocol(&String::deserialize(deserializer)?).map_err(de::Error::custom)
}

fn de_protocols<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Protocol>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|s| parse_protocol(s).map_err(de::Error::custom))
        .collect()
}

fn de_family<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Family>, D::Error> {
    match Option::<String>::deserialize(deserializer)?.as_deref() {
        None => Ok(None),
        Some("IPv4") => Ok(Some(Family::V4)),
        Some("IPv6") => Ok(Some(Family::V6)),
        Some(other) => Err(de::Error::custom(format!(
            "unknown family `{other}` (IPv4 or IPv6)"
        ))),
    }
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

/// What every pod of a case serves: the cross product of ports and protocols.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Ports.
    pub ports: Vec<u16>,
    /// Protocols.
    #[serde(deserialize_with = "de_protocols")]
    pub protocols: Vec<Protocol>,
}

impl Server {
    /// Every (port, protocol) served, ports first.
    pub fn endpoints(&self) -> Vec<(u16, Protocol)> {
        self.ports
            .iter()
            .flat_map(|port| self.protocols.iter().map(move |p| (*port, *p)))
            .collect()
    }
}

/// A namespace of a case, with exactly these labels (plus the name label the API server adds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceSpec {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A container port a pod declares (named ports resolve against these).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerPortSpec {
    /// Port name, if any.
    #[serde(default)]
    pub name: Option<String>,
    /// Port number.
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    /// Protocol (TCP when unset).
    #[serde(default = "tcp", deserialize_with = "de_protocol")]
    pub protocol: Protocol,
}

/// A pod of a case: at the start, or created by a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// Namespace and name.
    pub pod: PodRef,
    /// Labels, always including `pod: <name>`.
    pub labels: BTreeMap<String, String>,
    /// Declared container ports.
    pub ports: Vec<ContainerPortSpec>,
    /// Pinned IPv4 address (with `PinnedPodIPs`).
    pub ip: Option<Ipv4Addr>,
    /// Pinned IPv6 address (with `PinnedPodIPs`).
    pub ipv6: Option<Ipv6Addr>,
}

/// A pod's addresses, at most one per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodAddresses {
    /// IPv4.
    pub ipv4: Option<Ipv4Addr>,
    /// IPv6.
    pub ipv6: Option<Ipv6Addr>,
}

impl PodAddresses {
    /// The address of one family.
    pub fn get(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.ipv4.map(IpAddr::V4),
            Family::V6 => self.ipv6.map(IpAddr::V6),
        }
    }
}

/// The `PinnedPodIPs` plan's subnets of the `number`-th namespace of a case (1-based, file
/// order): `10.244.(128+n).0/24` and `fd00:10:244:<hex(0x80+n)>::/64`, the podCIDRs of node n.
/// `None` past the 127th namespace.
pub fn pinned_subnets(number: usize) -> Option<(Ipv4Net, Ipv6Net)> {
    let third = u8::try_from(128 + number).ok().filter(|_| number >= 1)?;
    let v4 = Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).expect("24 is a valid prefix");
    let v6 = Ipv6Net::new(
        Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(third), 0, 0, 0, 0),
        64,
    )
    .expect("64 is a valid prefix");
    Some((v4, v6))
}

/// The plan's addresses of the `k`-th pod (1-based) of the `number`-th namespace:
/// `10.244.(128+n).k` and `fd00:10:244:<hex(0x80+n)>::<hex(k)>`. `None` out of range.
pub fn pinned_addresses(number: usize, k: usize) -> Option<PodAddresses> {
    let (v4, v6) = pinned_subnets(number)?;
    let k8 = u8::try_from(k).ok().filter(|k| (1..=254).contains(k))?;
    let o = v4.network().octets();
    let s = v6.network().segments();
    Some(PodAddresses {
        ipv4: Some(Ipv4Addr::new(o[0], o[1], o[2], k8)),
        ipv6: Some(Ipv6Addr::new(
            s[0],
            s[1],
            s[2],
            s[3],
            0,
            0,
            0,
            u16::from(k8),
        )),
    })
}

/// The first plan index a runner fills an open address from, for every target alike (so the
/// oracle's report names the same addresses as the cluster's): k = 1 (`.1`, `::1`) is the
/// node's own address in weft (its tunnel address, first of the podCIDR), never a pod's.
pub const FIRST_POD_K: usize = 2;

/// Fills the addresses a pod spec leaves open with the first plan addresses (index `first_k`
/// on) that no other pod uses; `None` when the plan is exhausted.
pub fn fill_from_plan(
    number: usize,
    requested: PodAddresses,
    first_k: usize,
    used: &std::collections::BTreeSet<std::net::IpAddr>,
) -> Option<PodAddresses> {
    if requested.ipv4.is_some() && requested.ipv6.is_some() {
        return Some(requested);
    }
    let planned = (first_k..=254)
        .filter_map(|k| pinned_addresses(number, k))
        .find(|p| {
            Family::ALL
                .iter()
                .all(|f| p.get(*f).is_none_or(|ip| !used.contains(&ip)))
        })?;
    Some(PodAddresses {
        ipv4: requested.ipv4.or(planned.ipv4),
        ipv6: requested.ipv6.or(planned.ipv6),
    })
}

/// A pod's addresses in a run, the same for every target: what its spec pins, the rest from
/// the plan (from [`FIRST_POD_K`], skipping `used`). Errs when the plan is exhausted or a
/// pinned address belongs to another pod.
pub fn assign_addresses(
    number: usize,
    requested: PodAddresses,
    used: &std::collections::BTreeSet<std::net::IpAddr>,
) -> Result<PodAddresses, String> {
    let a = fill_from_plan(number, requested, FIRST_POD_K, used)
        .ok_or_else(|| "no free address in the plan".to_string())?;
    match Family::ALL
        .iter()
        .filter_map(|f| a.get(*f))
        .find(|ip| used.contains(ip))
    {
        Some(ip) => Err(format!("address {ip} is taken")),
        None => Ok(a),
    }
}

/// A NetworkPolicy as the case writes it, templates unfilled. Parsed and checked at load time;
/// [`PolicyTemplate::render`] fills the templates once pods have addresses.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyTemplate {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// Line in the case file, when known.
    pub line: Option<u64>,
    raw: Value,
}

/// A template of a policy could not be filled.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// See [`TemplateError`].
    #[error("NetworkPolicy {namespace}/{name}: {source}")]
    Template {
        /// Policy namespace.
        namespace: String,
        /// Policy name.
        name: String,
        /// The template problem.
        #[source]
        source: Box<TemplateError>,
    },
    /// The filled object is no NetworkPolicy (a template produced something unparseable).
    #[error("NetworkPolicy {namespace}/{name} after filling templates: {source}")]
    Object {
        /// Policy namespace.
        namespace: String,
        /// Policy name.
        name: String,
        /// The deserialization problem.
        #[source]
        source: serde_json::Error,
    },
}

impl PolicyTemplate {
    /// Checks a policy object: a valid NetworkPolicy with a namespace and a name, no field the
    /// API does not know, well-formed templates.
    fn from_raw(raw: Value, line: Option<u64>) -> Result<PolicyTemplate, String> {
        template::referenced_pods(&raw).map_err(|e| e.to_string())?;
        let parsed: NetworkPolicy =
            serde_json::from_value(raw.clone()).map_err(|e| format!("not a NetworkPolicy: {e}"))?;
        let known = serde_json::to_value(&parsed).map_err(|e| e.to_string())?;
        let mut unknown = Vec::new();
        unknown_fields(&raw, &known, "", &mut unknown);
        if let Some(field) = unknown.first() {
            return Err(format!("NetworkPolicy has unknown field `{field}`"));
        }
        let namespace = parsed.metadata.namespace.clone().filter(|s| !s.is_empty());
        let name = parsed.metadata.name.clone().filter(|s| !s.is_empty());
        let (Some(namespace), Some(name)) = (namespace, name) else {
            return Err("NetworkPolicy needs metadata.namespace and metadata.name".to_string());
        };
        Ok(PolicyTemplate {
            namespace,
            name,
            line,
            raw,
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    /// The pods its templates refer to.
    pub fn referenced_pods(&self) -> Vec<PodRef> {
        template::referenced_pods(&self.raw).expect("templates were checked at load time")
    }

    /// The object with every template filled for `family`.
    pub fn render(
        &self,
        family: Family,
        address_of: &dyn Fn(&PodRef) -> Option<IpAddr>,
    ) -> Result<NetworkPolicy, RenderError> {
        let filled = template::render(&self.raw, family, address_of).map_err(|source| {
            RenderError::Template {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                source: Box::new(source),
            }
        })?;
        serde_json::from_value(filled).map_err(|source| RenderError::Object {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        })
    }
}

/// Paths of `raw` (ignoring nulls) that `known` (the same object after a round trip through the
/// API type) lacks: the fields the API type does not know.
fn unknown_fields(raw: &Value, known: &Value, path: &str, out: &mut Vec<String>) {
    match (raw, known) {
        (Value::Object(r), Value::Object(k)) => {
            for (key, value) in r {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match k.get(key) {
                    _ if value.is_null() => {}
                    None => out.push(here),
                    Some(kv) => unknown_fields(value, kv, &here, out),
                }
            }
        }
        (Value::Array(r), Value::Array(k)) => {
            for (i, (rv, kv)) in r.iter().zip(k).enumerate() {
                unknown_fields(rv, kv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// One check: probe every ordered pair of pods on this port, protocol and family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expectation {
    /// Destination port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// `None`: the run's family (IPv4 unless the runner replays the file in IPv6-only mode).
    pub family: Option<Family>,
    /// Expected connectivity over the pod order in force.
    pub expected: TruthTable,
}

/// A change to the cluster, applied by a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create a policy.
    CreatePolicy(PolicyTemplate),
    /// Replace the policy with the same namespace/name.
    UpdatePolicy(PolicyTemplate),
    /// Delete one policy.
    DeletePolicy {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Delete every policy in the case's namespaces.
    DeleteAllPolicies,
    /// Merge labels into a namespace's.
    AddNamespaceLabels {
        /// Namespace.
        namespace: String,
        /// Labels to add or overwrite.
        labels: BTreeMap<String, String>,
    },
    /// Merge labels into a pod's.
    AddPodLabels {
        /// The pod.
        pod: PodRef,
        /// Labels to add or overwrite.
        labels: BTreeMap<String, String>,
    },
    /// Replace a pod's labels (`pod: <name>` is kept: it is added here if absent).
    SetPodLabels {
        /// The pod.
        pod: PodRef,
        /// The new labels, including `pod: <name>`.
        labels: BTreeMap<String, String>,
    },
    /// Create a pod and its Service, and wait until it serves.
    CreatePod(PodSpec),
    /// Delete a pod and its Service, and wait until both are gone.
    DeletePod(PodRef),
}

impl Action {
    /// The action's name in case files.
    pub fn name(&self) -> &'static str {
        match self {
            Action::CreatePolicy(_) => "create_policy",
            Action::UpdatePolicy(_) => "update_policy",
            Action::DeletePolicy { .. } => "delete_policy",
            Action::DeleteAllPolicies => "delete_all_policies",
            Action::AddNamespaceLabels { .. } => "add_namespace_labels",
            Action::AddPodLabels { .. } => "add_pod_labels",
            Action::SetPodLabels { .. } => "set_pod_labels",
            Action::CreatePod(_) => "create_pod",
            Action::DeletePod(_) => "delete_pod",
        }
    }
}

/// Changes, then checks of the state after them.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// What the step does, for people.
    pub description: String,
    /// Applied in order.
    pub actions: Vec<Action>,
    /// Checks after the actions.
    pub expectations: Vec<Expectation>,
    /// The matrix order in force from this step on.
    pub pod_order: Vec<PodRef>,
}

/// One case: a cluster state, policies, checks, and steps that change it.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// Unique key.
    pub id: String,
    /// Free text (upstream cases: the `It` they encode).
    pub name: Option<String>,
    /// Free text.
    pub gist: Option<String>,
    /// Free text.
    pub comment: Option<String>,
    /// Free text.
    pub context: Option<String>,
    /// What the case exercises.
    pub tags: Vec<String>,
    /// What a runner must support.
    pub feature_tags: Vec<Feature>,
    /// What every pod serves.
    pub server: Server,
    /// Namespaces, in file order (the n-th gets node n under `PinnedPodIPs`).
    pub namespaces: Vec<NamespaceSpec>,
    /// Pods at the start, in file order.
    pub pods: Vec<PodSpec>,
    /// Matrix order of the initial checks.
    pub pod_order: Vec<PodRef>,
    /// The diagonal is not scored.
    pub ignore_loopback: bool,
    /// Created in order before the first check.
    pub policies: Vec<PolicyTemplate>,
    /// Checks of the initial state.
    pub expectations: Vec<Expectation>,
    /// Applied in order.
    pub steps: Vec<Step>,
}

impl Case {
    /// Whether the case needs a feature.
    pub fn needs(&self, feature: Feature) -> bool {
        self.feature_tags.contains(&feature)
    }

    /// The 1-based file-order number of a namespace (its node under `PinnedPodIPs`).
    pub fn namespace_number(&self, namespace: &str) -> Option<usize> {
        self.namespaces
            .iter()
            .position(|n| n.name == namespace)
            .map(|i| i + 1)
    }

    /// Every check of the case with its step (`None`: the initial state), in run order.
    pub fn checks(&self) -> impl Iterator<Item = (Option<usize>, &Expectation)> {
        self.expectations.iter().map(|e| (None, e)).chain(
            self.steps
                .iter()
                .enumerate()
                .flat_map(|(i, s)| s.expectations.iter().map(move |e| (Some(i), e))),
        )
    }
}

/// A parsed, validated case file.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseFile {
    /// 1 or 2.
    pub schema_version: u32,
    /// The cases, in file order.
    pub cases: Vec<Case>,
}

/// A case file that cannot be used, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ParseError {
    /// The case, by id (or `#index` when it has none), if the problem is inside one.
    pub case: Option<String>,
    /// Line and column, when the YAML parser knows them.
    pub position: Option<(u64, u64)>,
    /// What is wrong.
    pub message: String,
    /// The YAML around the problem, as the parser shows it.
    pub snippet: Option<String>,
}

impl ParseError {
    fn in_case(case: &str, message: impl Into<String>) -> ParseError {
        ParseError {
            case: Some(case.to_string()),
            position: None,
            message: message.into(),
            snippet: None,
        }
    }

    fn at_line(mut self, line: Option<u64>) -> ParseError {
        if let Some(line) = line.filter(|l| *l > 0) {
            self.position = Some((line, 0));
        }
        self
    }

    fn render(&self) -> String {
        let mut place = Vec::new();
        if let Some(case) = &self.case {
            place.push(format!("case `{case}`"));
        }
        match self.position {
            Some((line, 0)) => place.push(format!("line {line}")),
            Some((line, column)) => place.push(format!("line {line} column {column}")),
            None => {}
        }
        let mut text = if place.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", place.join(", "), self.message)
        };
        if let Some(snippet) = &self.snippet {
            text.push('\n');
            text.push_str(snippet);
        }
        text
    }
}

/// A case file that cannot be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The content is not a valid case file.
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The problem.
        #[source]
        source: ParseError,
    },
}

/// Reads and parses a case file.
pub fn load(path: &Path) -> Result<CaseFile, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|source| LoadError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses and validates a case file.
pub fn parse(text: &str) -> Result<CaseFile, ParseError> {
    let raw: RawFile = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| yaml_error(text, &e))?;
    if !SCHEMA_VERSIONS.contains(&raw.schema_version) {
        return Err(ParseError {
            case: None,
            position: None,
            message: format!(
                "schema_version {} is not supported (1 or 2)",
                raw.schema_version
            ),
            snippet: None,
        });
    }
    let default_order = match raw.schema_version {
        1 => raw.model.and_then(|m| m.pod_order),
        _ => None,
    };
    let mut seen = BTreeSet::new();
    let mut cases = Vec::with_capacity(raw.cases.len());
    for raw_case in raw.cases {
        if !seen.insert(raw_case.id.clone()) {
            return Err(ParseError::in_case(
                &raw_case.id,
                "duplicate case id (ids must be unique in a file)",
            ));
        }
        cases.push(build_case(raw_case, default_order.as_deref())?);
    }
    Ok(CaseFile {
        schema_version: raw.schema_version,
        cases,
    })
}

/// YAML 1.2 booleans only: in YAML 1.1 a namespace named `y` (or `n`, `on`, `yes`) would read
/// as a boolean wherever the parser infers types (policies, tagged actions).
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { strict_booleans: true }
}

/// A YAML or shape error, attributed to the case whose text holds it.
fn yaml_error(text: &str, error: &serde_saphyr::Error) -> ParseError {
    let shown = error.to_string();
    let mut lines = shown.lines();
    let first = lines.next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    // The first line repeats the position ("line 13 column 3: ..."); we print our own.
    let message = match first.split_once(": ") {
        Some((place, rest)) if place.starts_with("line ") => rest,
        _ => first,
    };
    let snippet: Vec<&str> = lines.collect();
    let position = error
        .location()
        .map(|l| (l.line(), l.column()))
        .filter(|(line, _)| *line > 0);
    ParseError {
        case: position.and_then(|(line, _)| case_at_line(text, line)),
        position,
        message: message.to_string(),
        snippet: (!snippet.is_empty()).then(|| snippet.join("\n")),
    }
}

/// The id of the case whose text holds `line`, by a lenient second pass over the file.
fn case_at_line(text: &str, line: u64) -> Option<String> {
    #[derive(Deserialize)]
    struct Outline {
        #[serde(default)]
        cases: Vec<serde_saphyr::Spanned<CaseOutline>>,
    }
    #[derive(Deserialize)]
    struct CaseOutline {
        #[serde(default)]
        id: Option<Value>,
    }
    let outline: Outline = serde_saphyr::from_str_with_options(text, yaml_options()).ok()?;
    let (index, case) = outline
        .cases
        .iter()
        .enumerate()
        .rfind(|(_, c)| c.referenced.line() <= line)?;
    Some(match case.value.id.as_ref().and_then(Value::as_str) {
        Some(id) => id.to_string(),
        None => format!("#{}", index + 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of CASES.md, with `{EXTRA}` replaced by one more line of the case.
    const EXAMPLE: &str = r#"schema_version: 2
cases:
- id: web-only-from-frontend
  server: {ports: [8080], protocols: [TCP]}
  namespaces:
    shop: {labels: {kubernetes.io/metadata.name: shop}}
  pods:
    shop/api: {labels: {pod: api, role: api}, ports: [{name: http, containerPort: 8080, protocol: TCP}]}
    shop/ui:  {labels: {pod: ui, role: frontend}, ports: [{name: http, containerPort: 8080, protocol: TCP}]}
  pod_order: [shop/api, shop/ui]
  ignore_loopback: true
  policies:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {namespace: shop, name: api-from-frontend}
    spec:
      podSelector: {matchLabels: {role: api}}
      ingress:
      - from: [{podSelector: {matchLabels: {role: frontend}}}]
        ports: [{port: http}]
  expectations:
  - port: 8080
    protocol: TCP
    matrix:
    - 'X.'
    - '..'
"#;

    fn with(replace: &str, by: &str) -> String {
        assert!(EXAMPLE.contains(replace), "fixture lacks {replace:?}");
        EXAMPLE.replacen(replace, by, 1)
    }

    #[test]
    fn the_cases_md_example_parses() {
        let file = parse(EXAMPLE).expect("the documented example is valid");
        let case = &file.cases[0];
        assert_eq!(case.id, "web-only-from-frontend");
        assert_eq!(
            case.pod_order,
            vec![PodRef::new("shop", "api"), PodRef::new("shop", "ui")]
        );
        assert_eq!(
            case.policies[0].key(),
            ("shop".into(), "api-from-frontend".into())
        );
        assert_eq!(case.expectations[0].expected.rows(), vec!["X.", ".."]);
        assert_eq!(case.pods[0].ports[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn an_unknown_case_field_names_the_field_and_the_case() {
        let err = parse(&with(
            "  ignore_loopback: true\n",
            "  ignore_loopback: true\n  ignore_lopback: true\n",
        ))
        .unwrap_err();
        assert_eq!(err.case.as_deref(), Some("web-only-from-frontend"));
        assert!(
            err.message.contains("unknown field `ignore_lopback`"),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("case `web-only-from-frontend`, line 12 column 3: "),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_field_in_an_expectation_or_a_policy_is_refused() {
        let err = parse(&with(
            "    protocol: TCP\n    matrix:",
            "    protocol: TCP\n    famly: IPv6\n    matrix:",
        ))
        .unwrap_err();
        assert!(err.message.contains("unknown field `famly`"), "{err}");
        assert_eq!(err.case.as_deref(), Some("web-only-from-frontend"));
        let err = parse(&with(
            "      ingress:\n",
            "      ingres: []\n      ingress:\n",
        ))
        .unwrap_err();
        assert!(err.message.contains("unknown field `spec.ingres`"), "{err}");
        assert_eq!(err.case.as_deref(), Some("web-only-from-frontend"));
        assert_eq!(err.position, Some((13, 0)));
    }

    #[test]
    fn a_matrix_of_the_wrong_size_is_refused() {
        let err = parse(&with("    - '..'\n", "    - '...'\n")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "case `web-only-from-frontend`: expectations[0] (TCP/8080): matrix row 1 (shop/ui) is \
             \"...\": 3 characters, pod_order has 2 pods"
        );
        let err = parse(&with("    - '..'\n", "")).unwrap_err();
        assert!(
            err.message
                .contains("matrix has 1 rows but pod_order has 2 pods"),
            "{err}"
        );
    }

    #[test]
    fn a_pod_without_its_pod_label_is_refused() {
        let err = parse(&with("{pod: ui, role: frontend}", "{role: frontend}")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "case `web-only-from-frontend`: pods: pod shop/ui lacks the label `pod: ui` (its \
             Service selects on it)"
        );
    }

    #[test]
    fn pod_order_must_cover_exactly_the_pods() {
        let err = parse(&with(
            "pod_order: [shop/api, shop/ui]",
            "pod_order: [shop/api]",
        ))
        .unwrap_err();
        assert!(err.message.contains("pod shop/ui is missing"), "{err}");
        let err = parse(&with(
            "pod_order: [shop/api, shop/ui]",
            "pod_order: [shop/api, shop/ui, shop/db]",
        ))
        .unwrap_err();
        assert!(err.message.contains("shop/db is not among"), "{err}");
    }

    #[test]
    fn duplicate_ids_and_unknown_feature_tags_are_refused() {
        let twice = format!(
            "{EXAMPLE}{}",
            &EXAMPLE[EXAMPLE.find("- id:").expect("has a case")..]
        );
        assert!(
            parse(&twice)
                .unwrap_err()
                .message
                .contains("duplicate case id")
        );
        let err = parse(&with(
            "  ignore_loopback",
            "  feature_tags: [Feature:Teleport]\n  ignore_loopback",
        ))
        .unwrap_err();
        assert!(
            err.message
                .contains("unknown feature tag `Feature:Teleport`"),
            "{err}"
        );
    }

    #[test]
    fn steps_track_pods_policies_and_labels() {
        let steps = "  steps:\n  - description: relabel and delete\n    actions:\n    - {action: set_pod_labels, pod: shop/ui, labels: {role: other}}\n    - {action: delete_policy, namespace: shop, name: api-from-frontend}\n    - {action: delete_pod, pod: shop/api}\n    pod_order: [shop/ui]\n    expectations:\n    - {port: 8080, protocol: TCP, matrix: ['.']}\n";
        let file = parse(&format!("{EXAMPLE}{steps}")).expect("valid steps");
        let step = &file.cases[0].steps[0];
        assert_eq!(step.pod_order, vec![PodRef::new("shop", "ui")]);
        match &step.actions[0] {
            Action::SetPodLabels { labels, .. } => {
                assert_eq!(labels.get("pod").map(String::as_str), Some("ui"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let no_order = steps.replace("    pod_order: [shop/ui]\n", "");
        let err = parse(&format!("{EXAMPLE}{no_order}")).unwrap_err();
        assert!(err.message.contains("needs its own pod_order"), "{err}");
        let gone = steps.replace("name: api-from-frontend", "name: nothing");
        assert!(
            parse(&format!("{EXAMPLE}{gone}"))
                .unwrap_err()
                .message
                .contains("does not exist")
        );
        let unknown = steps.replace("action: delete_pod, pod", "action: delete_pod, pods");
        let err = parse(&format!("{EXAMPLE}{unknown}")).unwrap_err();
        assert!(err.message.contains("pods"), "{err}");
        let stolen = steps.replace("labels: {role: other}", "labels: {pod: api}");
        assert!(
            parse(&format!("{EXAMPLE}{stolen}"))
                .unwrap_err()
                .message
                .contains("must keep")
        );
    }

    #[test]
    fn templates_are_checked_at_load_time() {
        let policy =
            "      ingress:\n      - from: [{ipBlock: {cidr: '{{ip shop/db}}/{{hostbits}}'}}]\n";
        let err = parse(&with(
            "      ingress:\n",
            &format!("      egress: []\n{policy}"),
        ))
        .unwrap_err();
        assert!(err.message.contains("pod shop/db does not exist"), "{err}");
        let bad = "      ingress:\n      - from: [{ipBlock: {cidr: '{{ipp shop/ui}}'}}]\n";
        let err = parse(&with(
            "      ingress:\n",
            &format!("      egress: []\n{bad}"),
        ))
        .unwrap_err();
        assert!(err.message.contains("unknown template"), "{err}");
    }

    #[test]
    fn pinned_addresses_follow_the_plan() {
        let a = pinned_addresses(1, 2).expect("in range");
        assert_eq!(a.ipv4, Some(Ipv4Addr::new(10, 244, 129, 2)));
        assert_eq!(a.ipv6, Some("fd00:10:244:81::2".parse().expect("literal")));
        assert_eq!(
            pinned_addresses(3, 10).and_then(|a| a.ipv6),
            Some("fd00:10:244:83::a".parse().expect("literal"))
        );
        assert_eq!(pinned_addresses(128, 1), None);
        let pinned = with(
            "{pod: ui, role: frontend}, ports",
            "{pod: ui, role: frontend}, ip: 10.244.129.7, ports",
        );
        assert!(parse(&pinned).unwrap_err().message.contains("PinnedPodIPs"));
        let tagged = pinned.replace(
            "  ignore_loopback",
            "  feature_tags: [PinnedPodIPs]\n  ignore_loopback",
        );
        assert!(parse(&tagged).is_ok());
        let outside = tagged.replace("10.244.129.7", "10.244.130.7");
        assert!(
            parse(&outside)
                .unwrap_err()
                .message
                .contains("outside 10.244.129.0/24")
        );
    }

    #[test]
    fn schema_one_takes_the_model_pod_order() {
        let v1 = with(
            "schema_version: 2\n",
            "schema_version: 1\nmodel: {pod_order: [shop/ui, shop/api]}\n",
        )
        .replace("  pod_order: [shop/api, shop/ui]\n", "");
        let file = parse(&v1).expect("version 1 with a model order");
        assert_eq!(file.cases[0].pod_order[0], PodRef::new("shop", "ui"));
        let v2 = with("  pod_order: [shop/api, shop/ui]\n", "");
        assert!(parse(&v2).unwrap_err().message.contains("no pod_order"));
    }
}
