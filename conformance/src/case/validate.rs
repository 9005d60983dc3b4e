//! Raw shapes of a case file as written, and their validation into a [`Case`].
//!
//! Every raw struct rejects fields it does not know. [`build_case`] walks a case in order
//! (namespaces, pods, `pod_order`, policies, checks, then each step's actions and checks),
//! keeping the pods, labels and policies in force, so that every rule of CASES.md is checked
//! against the state it applies to.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use weft_netpol::ruleset::{Family, Protocol};

use super::{
    Action, Case, ContainerPortSpec, Expectation, Feature, NAMESPACE_NAME_LABEL, NamespaceSpec,
    POD_LABEL, ParseError, PodRef, PodSpec, PolicyTemplate, Server, Step, de_family, de_protocol,
    pinned_subnets,
};
use crate::matrix::TruthTable;

/// The whole file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) schema_version: u32,
    #[serde(default)]
    pub(super) model: Option<RawModel>,
    pub(super) cases: Vec<RawCase>,
}

/// `model:`, informative except for the version-1 default order.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    #[serde(default)]
    pub(super) pod_order: Option<Vec<PodRef>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCase {
    pub(super) id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    gist: Option<String>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    feature_tags: Vec<Feature>,
    server: Server,
    namespaces: Ordered<RawNamespace>,
    pods: Ordered<RawPod>,
    #[serde(default)]
    pod_order: Option<Vec<PodRef>>,
    #[serde(default)]
    ignore_loopback: bool,
    #[serde(default)]
    policies: Vec<serde_saphyr::Spanned<Value>>,
    #[serde(default)]
    expectations: Vec<RawExpectation>,
    #[serde(default)]
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPod {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<ContainerPortSpec>,
    #[serde(default)]
    ip: Option<Ipv4Addr>,
    #[serde(default)]
    ipv6: Option<Ipv6Addr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpectation {
    port: u16,
    #[serde(deserialize_with = "de_protocol")]
    protocol: Protocol,
    #[serde(default, deserialize_with = "de_family")]
    family: Option<Family>,
    matrix: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    actions: Vec<RawAction>,
    #[serde(default)]
    expectations: Vec<RawExpectation>,
    #[serde(default)]
    pod_order: Option<Vec<PodRef>>,
}

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
enum RawAction {
    CreatePolicy {
        policy: Value,
    },
    UpdatePolicy {
        policy: Value,
    },
    DeletePolicy {
        namespace: String,
        name: String,
    },
    DeleteAllPolicies,
    AddNamespaceLabels {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    AddPodLabels {
        pod: PodRef,
        labels: BTreeMap<String, String>,
    },
    SetPodLabels {
        pod: PodRef,
        labels: BTreeMap<String, String>,
    },
    CreatePod {
        pod: PodRef,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        #[serde(default)]
        ports: Vec<ContainerPortSpec>,
        #[serde(default)]
        ip: Option<Ipv4Addr>,
        #[serde(default)]
        ipv6: Option<Ipv6Addr>,
    },
    DeletePod {
        pod: PodRef,
    },
}

impl RawAction {
    fn name(&self) -> &'static str {
        match self {
            RawAction::CreatePolicy { .. } => "create_policy",
            RawAction::UpdatePolicy { .. } => "update_policy",
            RawAction::DeletePolicy { .. } => "delete_policy",
            RawAction::DeleteAllPolicies => "delete_all_policies",
            RawAction::AddNamespaceLabels { .. } => "add_namespace_labels",
            RawAction::AddPodLabels { .. } => "add_pod_labels",
            RawAction::SetPodLabels { .. } => "set_pod_labels",
            RawAction::CreatePod { .. } => "create_pod",
            RawAction::DeletePod { .. } => "delete_pod",
        }
    }
}

/// A YAML mapping read in file order, duplicate keys refused.
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OrderedVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for OrderedVisitor<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered<V>, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, V>()? {
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format!("duplicate key `{key}`")));
                    }
                    entries.push((key, value));
                }
                Ok(Ordered(entries))
            }
        }
        deserializer.deserialize_map(OrderedVisitor(PhantomData))
    }
}

/// What exists at a point of a case, as validation walks it.
struct World<'c> {
    case: &'c str,
    feature_tags: &'c [Feature],
    namespaces: Vec<String>,
    /// Pods present, with their labels.
    pods: BTreeMap<PodRef, BTreeMap<String, String>>,
    /// Declared container ports of every pod present.
    ports: BTreeMap<PodRef, Vec<ContainerPortSpec>>,
    /// Policies present, by (namespace, name).
    policies: BTreeSet<(String, String)>,
    server: &'c Server,
}

impl World<'_> {
    fn error(&self, message: impl Into<String>) -> ParseError {
        ParseError::in_case(self.case, message)
    }

    fn check_namespace(&self, namespace: &str, what: &str) -> Result<(), ParseError> {
        if self.namespaces.iter().any(|n| n == namespace) {
            Ok(())
        } else {
            Err(self.error(format!(
                "{what}: namespace `{namespace}` is not among the case's namespaces"
            )))
        }
    }

    fn check_pod(&self, pod: &PodRef, what: &str) -> Result<(), ParseError> {
        if self.pods.contains_key(pod) {
            Ok(())
        } else {
            Err(self.error(format!("{what}: pod {pod} does not exist at this point")))
        }
    }

    /// A pod must keep `pod: <name>`: present with that value, or (when `may_be_absent`)
    /// absent.
    fn check_pod_label(
        &self,
        pod: &PodRef,
        labels: &BTreeMap<String, String>,
        what: &str,
        may_be_absent: bool,
    ) -> Result<(), ParseError> {
        match labels.get(POD_LABEL) {
            Some(v) if *v == pod.name => Ok(()),
            None if may_be_absent => Ok(()),
            Some(v) => Err(self.error(format!(
                "{what}: pod {pod} must keep the label `{POD_LABEL}: {}` (found `{POD_LABEL}: {v}`)",
                pod.name
            ))),
            None => Err(self.error(format!(
                "{what}: pod {pod} lacks the label `{POD_LABEL}: {}` (its Service selects on it)",
                pod.name
            ))),
        }
    }

    fn pod_spec(
        &self,
        pod: PodRef,
        labels: BTreeMap<String, String>,
        ports: Vec<ContainerPortSpec>,
        ip: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
        what: &str,
    ) -> Result<PodSpec, ParseError> {
        self.check_namespace(&pod.namespace, what)?;
        self.check_pod_label(&pod, &labels, what, false)?;
        if ip.is_some() || ipv6.is_some() {
            self.check_pinned(&pod, ip, ipv6, what)?;
        }
        if ports.iter().any(|p| p.container_port == 0) {
            return Err(self.error(format!("{what}: pod {pod} declares containerPort 0")));
        }
        Ok(PodSpec {
            pod,
            labels,
            ports,
            ip,
            ipv6,
        })
    }

    /// Pinned addresses need the tag, and must lie in the podCIDRs of their namespace's node.
    fn check_pinned(
        &self,
        pod: &PodRef,
        ip: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
        what: &str,
    ) -> Result<(), ParseError> {
        if !self.feature_tags.contains(&Feature::PinnedPodIps) {
            return Err(self.error(format!(
                "{what}: pod {pod} has a pinned address but the case lacks the feature tag \
                 `PinnedPodIPs`"
            )));
        }
        let number = 1 + self
            .namespaces
            .iter()
            .position(|n| *n == pod.namespace)
            .expect("the namespace was checked before");
        let Some((net4, net6)) = pinned_subnets(number) else {
            return Err(self.error(format!(
                "{what}: namespace #{number} is past the PinnedPodIPs plan (at most 127)"
            )));
        };
        let outside = |family: &str, ip: String, net: String| {
            self.error(format!(
                "{what}: pod {pod} {family} {ip} is outside {net}, the podCIDR of node {number} \
                 where namespace `{}` runs under the PinnedPodIPs plan",
                pod.namespace
            ))
        };
        if let Some(ip) = ip.filter(|ip| !net4.contains(ip)) {
            return Err(outside("ip", ip.to_string(), net4.to_string()));
        }
        if let Some(ip) = ipv6.filter(|ip| !net6.contains(ip)) {
            return Err(outside("ipv6", ip.to_string(), net6.to_string()));
        }
        Ok(())
    }

    fn add_pod(&mut self, spec: &PodSpec) {
        self.pods.insert(spec.pod.clone(), spec.labels.clone());
        self.ports.insert(spec.pod.clone(), spec.ports.clone());
    }

    fn policy(
        &self,
        raw: Value,
        line: Option<u64>,
        what: &str,
    ) -> Result<PolicyTemplate, ParseError> {
        let policy = PolicyTemplate::from_raw(raw, line)
            .map_err(|m| self.error(format!("{what}: {m}")).at_line(line))?;
        let what = format!("{what} ({}/{})", policy.namespace, policy.name);
        self.check_namespace(&policy.namespace, &what)
            .map_err(|e| e.at_line(line))?;
        for pod in policy.referenced_pods() {
            self.check_pod(&pod, &format!("{what}: template"))
                .map_err(|e| e.at_line(line))?;
        }
        Ok(policy)
    }

    /// `pod_order` must list every pod present exactly once.
    fn check_order(&self, order: &[PodRef], what: &str) -> Result<(), ParseError> {
        let mut seen = BTreeSet::new();
        for pod in order {
            if !seen.insert(pod) {
                return Err(self.error(format!("{what}: pod {pod} is listed twice")));
            }
            if !self.pods.contains_key(pod) {
                return Err(self.error(format!(
                    "{what}: pod {pod} is not among the case's pods at this point"
                )));
            }
        }
        if let Some(missing) = self.pods.keys().find(|p| !seen.contains(p)) {
            return Err(self.error(format!("{what}: pod {missing} is missing")));
        }
        Ok(())
    }

    fn expectations(
        &self,
        raw: Vec<RawExpectation>,
        order: &[PodRef],
        what: &str,
    ) -> Result<Vec<Expectation>, ParseError> {
        raw.into_iter()
            .enumerate()
            .map(|(i, e)| {
                let what = format!(
                    "{what}{}expectations[{i}] ({}/{})",
                    if what.is_empty() { "" } else { " " },
                    e.protocol.api_name(),
                    e.port
                );
                let served = self.server.endpoints().contains(&(e.port, e.protocol))
                    || self
                        .ports
                        .values()
                        .flatten()
                        .any(|p| p.container_port == e.port && p.protocol == e.protocol);
                if !served {
                    return Err(self.error(format!(
                        "{what}: no pod serves {} port {}: add it to `server`",
                        e.protocol.api_name(),
                        e.port
                    )));
                }
                if e.family == Some(Family::V6)
                    && !self.feature_tags.contains(&Feature::Ipv6DualStack)
                {
                    return Err(self.error(format!(
                        "{what}: an IPv6 check needs the feature tag `Feature:IPv6DualStack`"
                    )));
                }
                let expected = TruthTable::parse_expected(order.to_vec(), &e.matrix)
                    .map_err(|m| self.error(format!("{what}: {m}")))?;
                Ok(Expectation {
                    port: e.port,
                    protocol: e.protocol,
                    family: e.family,
                    expected,
                })
            })
            .collect()
    }

    fn labels_ok(&self, labels: &BTreeMap<String, String>, what: &str) -> Result<(), ParseError> {
        if labels.keys().any(String::is_empty) {
            return Err(self.error(format!("{what}: empty label key")));
        }
        Ok(())
    }

    /// Checks one action against the state in force, and applies it to that state.
    fn action(&mut self, raw: RawAction, what: &str) -> Result<Action, ParseError> {
        let what = format!("{what} ({})", raw.name());
        Ok(match raw {
            RawAction::CreatePolicy { policy } => {
                let policy = self.policy(policy, None, &what)?;
                if !self.policies.insert(policy.key()) {
                    return Err(self.error(format!(
                        "{what}: policy {}/{} exists already (use update_policy)",
                        policy.namespace, policy.name
                    )));
                }
                Action::CreatePolicy(policy)
            }
            RawAction::UpdatePolicy { policy } => {
                let policy = self.policy(policy, None, &what)?;
                if !self.policies.contains(&policy.key()) {
                    return Err(self.error(format!(
                        "{what}: policy {}/{} does not exist at this point (use create_policy)",
                        policy.namespace, policy.name
                    )));
                }
                Action::UpdatePolicy(policy)
            }
            RawAction::DeletePolicy { namespace, name } => {
                if !self.policies.remove(&(namespace.clone(), name.clone())) {
                    return Err(self.error(format!(
                        "{what}: policy {namespace}/{name} does not exist at this point"
                    )));
                }
                Action::DeletePolicy { namespace, name }
            }
            RawAction::DeleteAllPolicies => {
                self.policies.clear();
                Action::DeleteAllPolicies
            }
            RawAction::AddNamespaceLabels { namespace, labels } => {
                self.check_namespace(&namespace, &what)?;
                self.labels_ok(&labels, &what)?;
                if labels
                    .get(NAMESPACE_NAME_LABEL)
                    .is_some_and(|v| *v != namespace)
                {
                    return Err(self.error(format!(
                        "{what}: `{NAMESPACE_NAME_LABEL}` is set by the API server to the \
                         namespace's name"
                    )));
                }
                Action::AddNamespaceLabels { namespace, labels }
            }
            RawAction::AddPodLabels { pod, labels } => {
                self.check_pod(&pod, &what)?;
                self.labels_ok(&labels, &what)?;
                self.check_pod_label(&pod, &labels, &what, true)?;
                let current = self.pods.get_mut(&pod).expect("the pod was checked above");
                current.extend(labels.clone());
                Action::AddPodLabels { pod, labels }
            }
            RawAction::SetPodLabels { pod, mut labels } => {
                self.check_pod(&pod, &what)?;
                self.labels_ok(&labels, &what)?;
                self.check_pod_label(&pod, &labels, &what, true)?;
                labels.insert(POD_LABEL.to_string(), pod.name.clone());
                self.pods.insert(pod.clone(), labels.clone());
                Action::SetPodLabels { pod, labels }
            }
            RawAction::CreatePod {
                pod,
                labels,
                ports,
                ip,
                ipv6,
            } => {
                if self.pods.contains_key(&pod) {
                    return Err(self.error(format!("{what}: pod {pod} exists already")));
                }
                self.labels_ok(&labels, &what)?;
                let spec = self.pod_spec(pod, labels, ports, ip, ipv6, &what)?;
                self.add_pod(&spec);
                Action::CreatePod(spec)
            }
            RawAction::DeletePod { pod } => {
                self.check_pod(&pod, &what)?;
                self.pods.remove(&pod);
                self.ports.remove(&pod);
                Action::DeletePod(pod)
            }
        })
    }
}

/// Checks the case-level fields that need no walk: id, server, namespaces.
fn check_header(raw: &RawCase) -> Result<Vec<NamespaceSpec>, ParseError> {
    let fail = |message: String| ParseError::in_case(&raw.id, message);
    if raw.id.trim().is_empty() {
        return Err(ParseError {
            case: None,
            position: None,
            message: "a case has an empty id".to_string(),
            snippet: None,
        });
    }
    if raw.server.ports.is_empty() || raw.server.protocols.is_empty() {
        return Err(fail(
            "server needs at least one port and one protocol".into(),
        ));
    }
    if raw.server.ports.contains(&0) {
        return Err(fail("server port 0".into()));
    }
    if raw.server.protocols.contains(&Protocol::Sctp)
        && !raw.feature_tags.contains(&Feature::SctpConnectivity)
    {
        return Err(fail(
            "SCTP servers need the feature tag `Feature:SCTPConnectivity`".into(),
        ));
    }
    let mut namespaces = Vec::new();
    for (name, ns) in &raw.namespaces.0 {
        if name.is_empty() || name.contains('/') {
            return Err(fail(format!("namespace name {name:?} is not valid")));
        }
        if let Some(v) = ns.labels.get(NAMESPACE_NAME_LABEL).filter(|v| *v != name) {
            return Err(fail(format!(
                "namespace `{name}`: label `{NAMESPACE_NAME_LABEL}: {v}` must be the namespace's \
                 own name"
            )));
        }
        namespaces.push(NamespaceSpec {
            name: name.clone(),
            labels: ns.labels.clone(),
        });
    }
    Ok(namespaces)
}

/// Checks one case, walking its steps with the set of pods, labels and policies in force.
/// Long because it is the one place that knows the order of a case's parts.
pub(super) fn build_case(
    raw: RawCase,
    default_order: Option<&[PodRef]>,
) -> Result<Case, ParseError> {
    let namespaces = check_header(&raw)?;
    let id = raw.id;
    let fail = |message: String| ParseError::in_case(&id, message);
    let mut world = World {
        case: &id,
        feature_tags: &raw.feature_tags,
        namespaces: namespaces.iter().map(|n| n.name.clone()).collect(),
        pods: BTreeMap::new(),
        ports: BTreeMap::new(),
        policies: BTreeSet::new(),
        server: &raw.server,
    };
    let mut pods = Vec::new();
    for (key, pod) in raw.pods.0 {
        let pod_ref: PodRef = key
            .parse()
            .map_err(|m: String| fail(format!("pods: {m}")))?;
        world.labels_ok(&pod.labels, "pods")?;
        let spec = world.pod_spec(pod_ref, pod.labels, pod.ports, pod.ip, pod.ipv6, "pods")?;
        world.add_pod(&spec);
        pods.push(spec);
    }
    let Some(pod_order) = raw
        .pod_order
        .or_else(|| default_order.map(<[PodRef]>::to_vec))
    else {
        return Err(fail(
            "no pod_order (schema_version 2 needs one per case; version 1 may give \
             model.pod_order)"
                .into(),
        ));
    };
    world.check_order(&pod_order, "pod_order")?;

    let mut policies = Vec::new();
    for (i, spanned) in raw.policies.into_iter().enumerate() {
        let line = Some(spanned.referenced.line());
        let policy = world.policy(spanned.value, line, &format!("policies[{i}]"))?;
        if !world.policies.insert(policy.key()) {
            return Err(fail(format!(
                "policies[{i}]: policy {}/{} is given twice",
                policy.namespace, policy.name
            ))
            .at_line(line));
        }
        policies.push(policy);
    }
    let expectations = world.expectations(raw.expectations, &pod_order, "")?;

    let mut steps = Vec::new();
    let mut order = pod_order.clone();
    for (i, raw_step) in raw.steps.into_iter().enumerate() {
        let what = format!("steps[{i}]");
        let pods_before: BTreeSet<PodRef> = world.pods.keys().cloned().collect();
        let actions = raw_step
            .actions
            .into_iter()
            .enumerate()
            .map(|(j, a)| world.action(a, &format!("{what} actions[{j}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let pods_after: BTreeSet<PodRef> = world.pods.keys().cloned().collect();
        match raw_step.pod_order {
            Some(step_order) => {
                world.check_order(&step_order, &format!("{what} pod_order"))?;
                order = step_order;
            }
            None if pods_before != pods_after => {
                return Err(fail(format!(
                    "{what} changes the set of pods, so it needs its own pod_order"
                )));
            }
            None => {}
        }
        let expectations = world.expectations(raw_step.expectations, &order, &what)?;
        steps.push(Step {
            description: raw_step.description.unwrap_or_default(),
            actions,
            expectations,
            pod_order: order.clone(),
        });
    }

    Ok(Case {
        id: id.clone(),
        name: raw.name,
        gist: raw.gist,
        comment: raw.comment,
        context: raw.context,
        tags: raw.tags,
        feature_tags: raw.feature_tags,
        server: raw.server,
        namespaces,
        pods,
        pod_order,
        ignore_loopback: raw.ignore_loopback,
        policies,
        expectations,
        steps,
    })
}
