//! The semantic evaluator (oracle): is a connection allowed, straight from the API rules.
//! Written independently of the compiler; property tests hold the two equal.
//!
//! Flow: [`judge`] asks each direction ([`judge_direction`]) which member pod is the subject,
//! which policies isolate it ([`isolating_policies`]), and whether one of their rules allows
//! the connection ([`rule_allows`] → [`peer_matches`] and [`port_matches`]). [`allowed`] is the
//! one-bit answer; a [`Judgement`] also says which policy and rule decided, for `weft explain`.
//!
//! One function per API field, with the field's documented meaning (paraphrased) above the
//! branch that implements it. Parameters are named by role, not by packet direction: the
//! *subject* is the pod a policy selects (the destination for ingress, the source for egress),
//! the *peer* is the other end, and the *destination* is where named ports resolve.
//!
//! Out of scope: a pod talking to itself, and a pod talking to its own node (the dataplane
//! always allows the latter; the cluster model has no node addresses).

use std::net::IpAddr;

use crate::model::{
    Cluster, Direction, NamespaceScope, ObjectKey, Peer, Pod, PodSelection, Policy, PolicyRule,
    PortSpec,
};
use crate::ruleset::Protocol;

/// A new connection, as its first packet reaches the forward hook (after kube-proxy's DNAT, so
/// `dst` is a pod address, never a Service address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Connection {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
}

impl Connection {
    /// The address of the end a policy of this direction would select: the destination for
    /// ingress, the source for egress.
    pub fn subject_ip(&self, direction: Direction) -> IpAddr {
        match direction {
            Direction::Ingress => self.dst,
            Direction::Egress => self.src,
        }
    }

    /// The address of the other end, which rule peers (`from` / `to`) are matched against.
    pub fn peer_ip(&self, direction: Direction) -> IpAddr {
        match direction {
            Direction::Ingress => self.src,
            Direction::Egress => self.dst,
        }
    }
}

/// The verdict of one direction (ingress of the destination, or egress of the source).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirectionVerdict {
    /// The subject address is no member pod (outside the cluster, host network, terminated):
    /// no policy selects it, so this direction does not restrict.
    NotAPod,
    /// The subject is a member pod that no policy isolates in this direction.
    NotIsolated,
    /// Allowed by this rule (index in the direction's rule list) of this policy; when several
    /// rules allow, the first policy in key order and its first such rule.
    Allowed {
        /// The policy.
        policy: ObjectKey,
        /// Index of the rule in `spec.ingress` / `spec.egress`.
        rule: usize,
    },
    /// The subject is isolated by these policies (in key order) and none of their rules allows.
    Denied {
        /// The policies that select the subject for this direction.
        isolating: Vec<ObjectKey>,
    },
}

impl DirectionVerdict {
    /// Whether this direction lets the connection through.
    pub fn allows(&self) -> bool {
        !matches!(self, DirectionVerdict::Denied { .. })
    }
}

/// The verdict of both directions of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    /// Egress of the source.
    pub egress: DirectionVerdict,
    /// Ingress of the destination.
    pub ingress: DirectionVerdict,
}

impl Judgement {
    /// A connection is allowed only if the source may send it and the destination may receive
    /// it: between two pods, both directions are needed.
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// Whether NetworkPolicy allows the connection.
pub fn allowed(cluster: &Cluster, conn: &Connection) -> bool {
    judge(cluster, conn).allowed()
}

/// Whether one node's table admits the connection: the directions that node enforces are the
/// egress of a source pod and the ingress of a destination pod running on it (the other end's
/// node judges the rest). Strict conntrack mode deletes the entries of which this says no.
pub fn node_admits(cluster: &Cluster, node: &str, conn: &Connection) -> bool {
    let local = |ip: IpAddr| cluster.pod_by_ip(ip).is_some_and(|p| p.node == node);
    let egress = !local(conn.src) || judge_direction(cluster, conn, Direction::Egress).allows();
    let ingress = !local(conn.dst) || judge_direction(cluster, conn, Direction::Ingress).allows();
    egress && ingress
}

/// Judges both directions of a connection.
pub fn judge(cluster: &Cluster, conn: &Connection) -> Judgement {
    Judgement {
        egress: judge_direction(cluster, conn, Direction::Egress),
        ingress: judge_direction(cluster, conn, Direction::Ingress),
    }
}

/// Judges one direction: ingress of the destination pod, or egress of the source pod.
pub fn judge_direction(
    cluster: &Cluster,
    conn: &Connection,
    direction: Direction,
) -> DirectionVerdict {
    // Policies select pods only; an address that is no member pod is selected by none.
    let Some(subject) = cluster.pod_by_ip(conn.subject_ip(direction)) else {
        return DirectionVerdict::NotAPod;
    };
    let isolating: Vec<&Policy> = isolating_policies(cluster, subject, direction).collect();
    // spec.ingress / spec.egress: traffic is allowed if no NetworkPolicy selects the pod for
    // this direction ...
    if isolating.is_empty() {
        return DirectionVerdict::NotIsolated;
    }
    // ... or if it matches at least one rule across all the policies that select the pod:
    // policies are additive, their rules a union.
    for policy in &isolating {
        let rules = policy.rules(direction).unwrap_or_default();
        if let Some(rule) = rules
            .iter()
            .position(|rule| rule_allows(cluster, policy, rule, direction, conn))
        {
            return DirectionVerdict::Allowed {
                policy: policy.key.clone(),
                rule,
            };
        }
    }
    DirectionVerdict::Denied {
        isolating: isolating.iter().map(|p| p.key.clone()).collect(),
    }
}

/// The policies that isolate `subject` in `direction`, in key order: those that select it
/// ([`policy_selects`]) and whose policy types include the direction.
pub fn isolating_policies<'a>(
    cluster: &'a Cluster,
    subject: &'a Pod,
    direction: Direction,
) -> impl Iterator<Item = &'a Policy> + 'a {
    cluster.policies.values().filter(move |policy| {
        // policyTypes: a policy affects a direction if its types name it (defaulted by the API:
        // Ingress always, Egress when egress rules exist); `rules()` is `Some` exactly then,
        // even with no rules, in which case the policy only isolates.
        policy_selects(policy, subject) && policy.rules(direction).is_some()
    })
}

/// `spec.podSelector`: whether the policy applies to `subject`.
pub fn policy_selects(policy: &Policy, subject: &Pod) -> bool {
    // podSelector selects pods in the policy's own namespace, with the usual label selector
    // semantics; an empty podSelector selects every pod of that namespace.
    subject.key.namespace == policy.key.namespace && policy.subject.matches(&subject.labels)
}

/// Whether one rule of `policy` (an ingress rule for `Direction::Ingress`, an egress rule for
/// `Direction::Egress`) allows the connection.
pub fn rule_allows(
    cluster: &Cluster,
    policy: &Policy,
    rule: &PolicyRule,
    direction: Direction,
    conn: &Connection,
) -> bool {
    // A rule matches traffic only if it matches both its peers (`from` / `to`) and its ports.
    let peer_ok = match &rule.peers {
        // from / to empty or missing: the rule matches every peer.
        None => true,
        // Present with items: the peer must match at least one (a logical OR). An empty list
        // here means every listed peer was unusable: fail closed, nothing matches.
        Some(peers) => peers
            .iter()
            .any(|peer| peer_matches(cluster, policy, peer, conn.peer_ip(direction))),
    };
    let ports_ok = match &rule.ports {
        // ports empty or missing: the rule matches every port of every protocol.
        None => true,
        // Present with items: the traffic must match at least one (a logical OR). Named ports
        // resolve on the destination pod: the subject for ingress, the peer for egress.
        Some(ports) => {
            let destination = cluster.pod_by_ip(conn.dst);
            ports
                .iter()
                .any(|spec| port_matches(spec, destination, conn.protocol, conn.port))
        }
    };
    peer_ok && ports_ok
}

/// `NetworkPolicyPeer`: whether the address at the other end of the connection is this peer of
/// a rule of `policy`.
pub fn peer_matches(cluster: &Cluster, policy: &Policy, peer: &Peer, peer_ip: IpAddr) -> bool {
    match peer {
        // ipBlock: addresses in cidr and in none of the except CIDRs. It matches addresses, so
        // it matches a pod's address too, whatever the pod's labels or state.
        Peer::Block(block) => block.contains(peer_ip),
        // podSelector / namespaceSelector: they select pods, so the address must be a member
        // pod's (host-network, terminated and IP-less pods are never selected).
        Peer::Pods(selection) => cluster
            .pod_by_ip(peer_ip)
            .is_some_and(|pod| pod_selection_matches(cluster, policy, selection, pod)),
    }
}

/// The selector half of `NetworkPolicyPeer`: whether `pod` is among the pods a peer of
/// `policy` selects.
pub fn pod_selection_matches(
    cluster: &Cluster,
    policy: &Policy,
    selection: &PodSelection,
    pod: &Pod,
) -> bool {
    let namespace_ok = match &selection.namespaces {
        // podSelector without namespaceSelector: the pods of the policy's own namespace.
        NamespaceScope::Own(own) => {
            debug_assert_eq!(
                own, &policy.key.namespace,
                "NamespaceScope::Own must name the namespace of its policy {}",
                policy.key
            );
            pod.key.namespace == policy.key.namespace
        }
        // namespaceSelector selects namespaces by their labels (standard semantics; present but
        // empty selects all namespaces). A namespace we have no object for has no labels we
        // could match, so its pods match no namespaceSelector, not even the empty one.
        NamespaceScope::Selected(namespaces) => cluster
            .namespace_labels(&pod.key.namespace)
            .is_some_and(|labels| namespaces.matches(labels)),
    };
    // podSelector selects pods by label within those namespaces; absent or empty, all of them.
    namespace_ok && selection.pods.matches(&pod.labels)
}

/// `NetworkPolicyPort`: whether traffic of `protocol` to `port` matches one port entry.
/// `destination` is the member pod the connection goes to, if any: named ports resolve on it.
pub fn port_matches(
    spec: &PortSpec,
    destination: Option<&Pod>,
    protocol: Protocol,
    port: u16,
) -> bool {
    // protocol: the traffic must have this protocol (TCP when unset, defaulted in `model`).
    if spec.protocol() != protocol {
        return false;
    }
    match spec {
        // port not given: every port (number or name) of the protocol.
        PortSpec::AllPorts(_) => true,
        // port as a number, and endPort: the range port..=endPort, both ends included.
        PortSpec::Numbers { first, last, .. } => (*first..=*last).contains(&port),
        // port as a name: a container port of the destination pod with this name and protocol,
        // whose number is the traffic's port. A name that resolves nowhere matches nothing.
        PortSpec::Named { name, .. } => destination
            .is_some_and(|pod| pod.named_port(name, protocol).any(|number| number == port)),
    }
}

#[cfg(test)]
mod tests {
    //! Table tests. A small dual-stack world (namespaces `prod`, `dev`, `test`, and pods in an
    //! unknown namespace `ghost`); policies go through `Policy::from_api`, so model validation
    //! (defaults, dropped entries, masking) is exercised on the way. Every connection row runs
    //! twice: once with the IPv4 addresses of its ends, once with their IPv6 addresses.

    use std::collections::BTreeMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use k8s_openapi::api::networking::v1 as net;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        LabelSelector as ApiSelector, LabelSelectorRequirement, ObjectMeta,
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::*;
    use crate::model::{ContainerPort, Namespace, ip_block};
    use crate::ruleset::Family;
    use crate::selector::LabelSelector;

    const TCP: Protocol = Protocol::Tcp;
    const UDP: Protocol = Protocol::Udp;
    const SCTP: Protocol = Protocol::Sctp;
    const ALLOW: bool = true;
    const DENY: bool = false;

    /// One end of a test connection.
    #[derive(Clone, Copy, Debug)]
    enum End {
        /// A pod of the cluster by `ns/name` (member or not): its address of the row's family.
        Pod(&'static str),
        /// A literal address: (IPv4, IPv6).
        Addr(&'static str, &'static str),
    }

    // Pods of `world()`.
    const WEB: End = End::Pod("prod/web");
    const DB: End = End::Pod("prod/db");
    const CACHE: End = End::Pod("prod/cache");
    const DEV_WEB: End = End::Pod("dev/web");
    const DEV_TOOL: End = End::Pod("dev/tool");
    const TEST_WEB: End = End::Pod("test/web");
    const GHOST_WEB: End = End::Pod("ghost/web");
    // Pods of `with_non_members()`.
    const OLD_WEB: End = End::Pod("prod/old-web");
    const HOST_WEB: End = End::Pod("prod/host-web");
    const REUSED: End = End::Pod("prod/reused");
    // Addresses of no pod.
    const OUTSIDE: End = End::Addr("192.0.2.10", "2001:db8::10");
    const EXCEPTED: End = End::Addr("192.0.2.200", "2001:db8::c8");
    const ELSEWHERE: End = End::Addr("198.51.100.1", "2001:db8:1::1");
    const POD_RANGE_NO_POD: End = End::Addr("10.244.9.9", "fd00:10:244:9::9");

    /// A connection row: from, to, protocol, destination port, expected verdict.
    type Row = (End, End, Protocol, u16, bool);

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn key(text: &str) -> ObjectKey {
        let (ns, name) = text.split_once('/').expect("keys are written ns/name");
        ObjectKey::new(ns, name)
    }

    /// A running dual-stack pod at 10.244.`x`.`y` and fd00:10:244:`x`::`y`.
    fn make_pod(at: &str, pod_labels: &[(&str, &str)], x: u8, y: u8) -> Pod {
        Pod {
            key: key(at),
            uid: format!("uid-{at}"),
            labels: labels(pod_labels),
            ips: vec![
                IpAddr::V4(Ipv4Addr::new(10, 244, x, y)),
                IpAddr::V6(Ipv6Addr::new(
                    0xfd00,
                    0x10,
                    0x244,
                    x.into(),
                    0,
                    0,
                    0,
                    y.into(),
                )),
            ],
            node: "node-1".to_string(),
            ports: Vec::new(),
            host_network: false,
            terminated: false,
        }
    }

    fn with_ports(mut pod: Pod, ports: &[(&str, Protocol, u16)]) -> Pod {
        pod.ports = ports
            .iter()
            .map(|&(name, protocol, port)| ContainerPort {
                name: Some(name.to_string()),
                port,
                protocol,
            })
            .collect();
        pod
    }

    fn add_pod(cluster: &mut Cluster, pod: Pod) {
        cluster.pods.insert(pod.key.clone(), pod);
    }

    /// The shared fixture, with these policies.
    fn world(policies: Vec<Policy>) -> Cluster {
        let mut cluster = Cluster::default();
        for ns in [
            Namespace::new("prod", labels(&[("env", "prod"), ("team", "a")])),
            Namespace::new("dev", labels(&[("env", "dev")])),
            Namespace::new("test", labels(&[])),
        ] {
            cluster.namespaces.insert(ns.name.clone(), ns);
        }
        for pod in [
            make_pod("prod/web", &[("app", "web"), ("tier", "front")], 1, 10),
            with_ports(
                make_pod("prod/db", &[("app", "db"), ("tier", "back")], 1, 20),
                &[("pg", TCP, 5432), ("metrics", TCP, 9187), ("dns", UDP, 53)],
            ),
            with_ports(
                make_pod("prod/cache", &[("app", "cache")], 1, 30),
                &[("metrics", TCP, 9121), ("redis", TCP, 6379)],
            ),
            make_pod("dev/web", &[("app", "web")], 2, 10),
            make_pod("dev/tool", &[("app", "tool"), ("debug", "true")], 2, 20),
            make_pod("test/web", &[("app", "web")], 3, 10),
            make_pod("ghost/web", &[("app", "web")], 4, 10),
        ] {
            add_pod(&mut cluster, pod);
        }
        for policy in policies {
            cluster.policies.insert(policy.key.clone(), policy);
        }
        cluster
    }

    /// Adds pods labelled `app: web` that are not members: terminated, on the host network,
    /// without IP, and a terminated one whose address a running `app: other` pod now has.
    fn with_non_members(mut cluster: Cluster) -> Cluster {
        let mut old = make_pod("prod/old-web", &[("app", "web")], 1, 40);
        old.terminated = true;
        let mut host = make_pod("prod/host-web", &[("app", "web")], 0, 0);
        host.host_network = true;
        host.ips = vec!["10.0.0.5".parse().unwrap(), "fd00:10::5".parse().unwrap()];
        let mut pending = make_pod("prod/pending-web", &[("app", "web")], 0, 0);
        pending.ips.clear();
        let mut gone = make_pod("prod/gone-web", &[("app", "web")], 1, 50);
        gone.terminated = true;
        let reused = make_pod("prod/reused", &[("app", "other")], 1, 50);
        for pod in [old, host, pending, gone, reused] {
            add_pod(&mut cluster, pod);
        }
        cluster
    }

    // API builders: the shapes a user writes in YAML.

    fn sel(pairs: &[(&str, &str)]) -> ApiSelector {
        ApiSelector {
            match_labels: Some(labels(pairs)),
            match_expressions: None,
        }
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> ApiSelector {
        ApiSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.to_string(),
                operator: operator.to_string(),
                values: (!values.is_empty())
                    .then(|| values.iter().map(|v| v.to_string()).collect()),
            }]),
        }
    }

    /// `{}`.
    fn all() -> ApiSelector {
        ApiSelector::default()
    }

    fn pods(pod_selector: ApiSelector) -> net::NetworkPolicyPeer {
        net::NetworkPolicyPeer {
            pod_selector: Some(pod_selector),
            ..Default::default()
        }
    }

    fn namespaces(namespace_selector: ApiSelector) -> net::NetworkPolicyPeer {
        net::NetworkPolicyPeer {
            namespace_selector: Some(namespace_selector),
            ..Default::default()
        }
    }

    fn pods_in(
        namespace_selector: ApiSelector,
        pod_selector: ApiSelector,
    ) -> net::NetworkPolicyPeer {
        net::NetworkPolicyPeer {
            namespace_selector: Some(namespace_selector),
            pod_selector: Some(pod_selector),
            ..Default::default()
        }
    }

    fn block(cidr: &str, except: &[&str]) -> net::NetworkPolicyPeer {
        net::NetworkPolicyPeer {
            ip_block: Some(net::IPBlock {
                cidr: cidr.to_string(),
                except: (!except.is_empty())
                    .then(|| except.iter().map(|e| e.to_string()).collect()),
            }),
            ..Default::default()
        }
    }

    fn port(protocol: Option<&str>, number: i32) -> net::NetworkPolicyPort {
        net::NetworkPolicyPort {
            protocol: protocol.map(str::to_string),
            port: Some(IntOrString::Int(number)),
            end_port: None,
        }
    }

    fn range(protocol: Option<&str>, first: i32, end: i32) -> net::NetworkPolicyPort {
        net::NetworkPolicyPort {
            end_port: Some(end),
            ..port(protocol, first)
        }
    }

    fn named(protocol: Option<&str>, name: &str) -> net::NetworkPolicyPort {
        net::NetworkPolicyPort {
            protocol: protocol.map(str::to_string),
            port: Some(IntOrString::String(name.to_string())),
            end_port: None,
        }
    }

    fn every_port(protocol: Option<&str>) -> net::NetworkPolicyPort {
        net::NetworkPolicyPort {
            protocol: protocol.map(str::to_string),
            port: None,
            end_port: None,
        }
    }

    fn from(
        peers: Vec<net::NetworkPolicyPeer>,
        ports: Vec<net::NetworkPolicyPort>,
    ) -> net::NetworkPolicyIngressRule {
        net::NetworkPolicyIngressRule {
            from: Some(peers),
            ports: Some(ports),
        }
    }

    fn to(
        peers: Vec<net::NetworkPolicyPeer>,
        ports: Vec<net::NetworkPolicyPort>,
    ) -> net::NetworkPolicyEgressRule {
        net::NetworkPolicyEgressRule {
            to: Some(peers),
            ports: Some(ports),
        }
    }

    fn types(list: &[&str]) -> Option<Vec<String>> {
        Some(list.iter().map(|t| t.to_string()).collect())
    }

    /// A spec selecting `subject`, no policyTypes, no rules: fill the rest with `..`.
    fn spec(subject: ApiSelector) -> net::NetworkPolicySpec {
        net::NetworkPolicySpec {
            pod_selector: Some(subject),
            ..Default::default()
        }
    }

    /// Validates an API NetworkPolicy `ns/name` through the model.
    fn make_policy(at: &str, spec: net::NetworkPolicySpec) -> Policy {
        let at = key(at);
        let np = net::NetworkPolicy {
            metadata: ObjectMeta {
                namespace: Some(at.namespace.clone()),
                name: Some(at.name.clone()),
                uid: Some(format!("uid-{at}")),
                ..Default::default()
            },
            spec: Some(spec),
        };
        Policy::from_api(&np).expect("test policies have a valid podSelector")
    }

    fn ip(cluster: &Cluster, end: End, family: Family) -> IpAddr {
        match end {
            End::Pod(at) => cluster.pods[&key(at)]
                .ip(family)
                .expect("fixture pods with addresses are dual-stack"),
            End::Addr(v4, v6) => match family {
                Family::V4 => v4.parse().expect("valid IPv4 literal"),
                Family::V6 => v6.parse().expect("valid IPv6 literal"),
            },
        }
    }

    fn connection(cluster: &Cluster, row: &Row, family: Family) -> Connection {
        let &(src, dst, protocol, port, _) = row;
        Connection {
            src: ip(cluster, src, family),
            dst: ip(cluster, dst, family),
            protocol,
            port,
        }
    }

    /// Asserts every row's verdict, with IPv4 addresses and with IPv6 addresses.
    #[track_caller]
    fn check(cluster: &Cluster, rows: &[Row]) {
        for family in Family::ALL {
            for (i, row) in rows.iter().enumerate() {
                let conn = connection(cluster, row, family);
                let judgement = judge(cluster, &conn);
                assert_eq!(
                    judgement.allowed(),
                    row.4,
                    "row {i} {family:?}: {:?} -> {:?} {:?}/{}: {judgement:?}",
                    row.0,
                    row.1,
                    row.2,
                    row.3,
                );
                assert_eq!(allowed(cluster, &conn), row.4, "row {i} {family:?}");
            }
        }
    }

    // ---- Whole-engine tables, one API rule each ----

    #[test]
    fn a_pod_selector_with_match_labels_selects_peers_in_the_policy_namespace() {
        let cluster = world(vec![make_policy(
            "prod/db-from-web",
            net::NetworkPolicySpec {
                ingress: Some(vec![from(vec![pods(sel(&[("app", "web")]))], vec![])]),
                ..spec(sel(&[("app", "db")]))
            },
        )]);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 5432, ALLOW),
                // No ports: every port of every protocol.
                (WEB, DB, UDP, 53, ALLOW),
                (WEB, DB, SCTP, 1, ALLOW),
                (CACHE, DB, TCP, 5432, DENY),
                (DEV_WEB, DB, TCP, 5432, DENY),
                (TEST_WEB, DB, TCP, 5432, DENY),
                (OUTSIDE, DB, TCP, 5432, DENY),
                // Pods the policy does not select stay open.
                (DEV_WEB, CACHE, TCP, 6379, ALLOW),
                (OUTSIDE, WEB, TCP, 80, ALLOW),
            ],
        );
    }

    #[test]
    fn match_expression_operators_select_pods_and_namespaces_as_the_api_says() {
        // One rule per operator, told apart by port.
        let rule = |peer, number| from(vec![peer], vec![port(None, number)]);
        let cluster = world(vec![make_policy(
            "prod/db-operators",
            net::NetworkPolicySpec {
                ingress: Some(vec![
                    rule(pods(expr("app", "In", &["web", "cache"])), 1000),
                    rule(pods(expr("tier", "NotIn", &["front"])), 1001),
                    rule(pods_in(all(), expr("debug", "Exists", &[])), 1002),
                    rule(namespaces(expr("env", "DoesNotExist", &[])), 1003),
                    rule(namespaces(expr("env", "In", &["dev", "test"])), 1004),
                    rule(namespaces(expr("env", "NotIn", &["prod"])), 1005),
                    rule(namespaces(expr("team", "Exists", &[])), 1006),
                    rule(pods(expr("debug", "DoesNotExist", &[])), 1007),
                ]),
                ..spec(expr("app", "In", &["db"]))
            },
        )]);
        check(
            &cluster,
            &[
                // podSelector In, own namespace only.
                (WEB, DB, TCP, 1000, ALLOW),
                (CACHE, DB, TCP, 1000, ALLOW),
                (DEV_WEB, DB, TCP, 1000, DENY),
                (DEV_TOOL, DB, TCP, 1000, DENY),
                // podSelector NotIn: an absent label is "not in".
                (WEB, DB, TCP, 1001, DENY),
                (CACHE, DB, TCP, 1001, ALLOW),
                (DEV_TOOL, DB, TCP, 1001, DENY),
                // podSelector Exists, in every namespace.
                (DEV_TOOL, DB, TCP, 1002, ALLOW),
                (DEV_WEB, DB, TCP, 1002, DENY),
                (WEB, DB, TCP, 1002, DENY),
                // namespaceSelector DoesNotExist: `test` has no env label; unknown `ghost` no.
                (TEST_WEB, DB, TCP, 1003, ALLOW),
                (DEV_WEB, DB, TCP, 1003, DENY),
                (WEB, DB, TCP, 1003, DENY),
                (GHOST_WEB, DB, TCP, 1003, DENY),
                // namespaceSelector In: a namespace without the label is not in.
                (DEV_WEB, DB, TCP, 1004, ALLOW),
                (DEV_TOOL, DB, TCP, 1004, ALLOW),
                (TEST_WEB, DB, TCP, 1004, DENY),
                (WEB, DB, TCP, 1004, DENY),
                // namespaceSelector NotIn: a namespace without the label is not in.
                (DEV_WEB, DB, TCP, 1005, ALLOW),
                (TEST_WEB, DB, TCP, 1005, ALLOW),
                (WEB, DB, TCP, 1005, DENY),
                (GHOST_WEB, DB, TCP, 1005, DENY),
                // namespaceSelector Exists.
                (WEB, DB, TCP, 1006, ALLOW),
                (DEV_WEB, DB, TCP, 1006, DENY),
                (TEST_WEB, DB, TCP, 1006, DENY),
                // podSelector DoesNotExist, own namespace.
                (WEB, DB, TCP, 1007, ALLOW),
                (CACHE, DB, TCP, 1007, ALLOW),
                (DEV_TOOL, DB, TCP, 1007, DENY),
                // A port no rule lists.
                (WEB, DB, TCP, 999, DENY),
            ],
        );
    }

    #[test]
    fn pod_and_namespace_selectors_in_one_peer_are_anded_and_in_two_peers_ored() {
        let cluster = world(vec![
            make_policy(
                "prod/db-and",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(
                        vec![pods_in(sel(&[("env", "dev")]), sel(&[("app", "web")]))],
                        vec![],
                    )]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            make_policy(
                "prod/cache-or",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(
                        vec![
                            namespaces(sel(&[("env", "dev")])),
                            pods(sel(&[("app", "web")])),
                        ],
                        vec![],
                    )]),
                    ..spec(sel(&[("app", "cache")]))
                },
            ),
        ]);
        check(
            &cluster,
            &[
                (DEV_WEB, DB, TCP, 5432, ALLOW),
                (DEV_TOOL, DB, TCP, 5432, DENY),
                (WEB, DB, TCP, 5432, DENY),
                (TEST_WEB, DB, TCP, 5432, DENY),
                (DEV_WEB, CACHE, TCP, 6379, ALLOW),
                (DEV_TOOL, CACHE, TCP, 6379, ALLOW),
                (WEB, CACHE, TCP, 6379, ALLOW),
                (TEST_WEB, CACHE, TCP, 6379, DENY),
                (DB, CACHE, TCP, 6379, DENY),
            ],
        );
    }

    #[test]
    fn an_empty_namespace_selector_selects_every_known_namespace() {
        let cluster = world(vec![
            make_policy(
                "prod/db-any-namespace",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(vec![namespaces(all())], vec![])]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            make_policy(
                "prod/cache-from-dev-by-name",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(
                        vec![namespaces(sel(&[("kubernetes.io/metadata.name", "dev")]))],
                        vec![],
                    )]),
                    ..spec(sel(&[("app", "cache")]))
                },
            ),
        ]);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 5432, ALLOW),
                (DEV_TOOL, DB, TCP, 5432, ALLOW),
                (TEST_WEB, DB, TCP, 5432, ALLOW),
                (GHOST_WEB, DB, TCP, 5432, DENY),
                (OUTSIDE, DB, TCP, 5432, DENY),
                (DEV_WEB, CACHE, TCP, 6379, ALLOW),
                (DEV_TOOL, CACHE, TCP, 6379, ALLOW),
                (WEB, CACHE, TCP, 6379, DENY),
                (TEST_WEB, CACHE, TCP, 6379, DENY),
            ],
        );
    }

    #[test]
    fn an_empty_pod_selector_selects_every_pod_of_the_policy_namespace_only() {
        let cluster = world(vec![make_policy(
            "prod/db-same-namespace",
            net::NetworkPolicySpec {
                ingress: Some(vec![from(vec![pods(all())], vec![])]),
                ..spec(sel(&[("app", "db")]))
            },
        )]);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 5432, ALLOW),
                (CACHE, DB, TCP, 5432, ALLOW),
                (DEV_WEB, DB, TCP, 5432, DENY),
                (TEST_WEB, DB, TCP, 5432, DENY),
                (GHOST_WEB, DB, TCP, 5432, DENY),
                (OUTSIDE, DB, TCP, 5432, DENY),
            ],
        );
    }

    #[test]
    fn an_ip_block_matches_its_cidr_minus_except_in_both_families() {
        let cluster = world(vec![
            make_policy(
                "prod/db-from-pod-range",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(
                        vec![
                            block("10.244.0.0/16", &["10.244.2.0/24"]),
                            block("fd00:10:244::/48", &["fd00:10:244:2::/64"]),
                        ],
                        vec![],
                    )]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            make_policy(
                "prod/web-to-documentation-range",
                net::NetworkPolicySpec {
                    policy_types: types(&["Egress"]),
                    egress: Some(vec![to(
                        vec![
                            block("192.0.2.0/24", &["192.0.2.128/25"]),
                            block("2001:db8::/120", &["2001:db8::80/121"]),
                        ],
                        vec![],
                    )]),
                    ..spec(sel(&[("app", "web")]))
                },
            ),
        ]);
        // Edges of the CIDR and of the exception.
        let cidr_first = End::Addr("10.244.0.0", "fd00:10:244::");
        let cidr_last = End::Addr("10.244.255.255", "fd00:10:244:ffff:ffff:ffff:ffff:ffff");
        let before_cidr = End::Addr("10.243.255.255", "fd00:10:243:ffff:ffff:ffff:ffff:ffff");
        let after_cidr = End::Addr("10.245.0.0", "fd00:10:245::");
        let before_except = End::Addr("10.244.1.255", "fd00:10:244:1:ffff:ffff:ffff:ffff");
        let except_first = End::Addr("10.244.2.0", "fd00:10:244:2::");
        let except_last = End::Addr("10.244.2.255", "fd00:10:244:2:ffff:ffff:ffff:ffff");
        let after_except = End::Addr("10.244.3.0", "fd00:10:244:3::");
        check(
            &cluster,
            &[
                // web is egress-isolated below: cache is the pod source here.
                (CACHE, DB, TCP, 5432, ALLOW),
                (TEST_WEB, DB, TCP, 5432, ALLOW),
                // ipBlock ignores namespaces, known or not.
                (GHOST_WEB, DB, TCP, 5432, ALLOW),
                (DEV_WEB, DB, TCP, 5432, DENY),
                (DEV_TOOL, DB, TCP, 5432, DENY),
                (POD_RANGE_NO_POD, DB, TCP, 5432, ALLOW),
                (OUTSIDE, DB, TCP, 5432, DENY),
                (cidr_first, DB, TCP, 1, ALLOW),
                (cidr_last, DB, TCP, 1, ALLOW),
                (before_cidr, DB, TCP, 1, DENY),
                (after_cidr, DB, TCP, 1, DENY),
                (before_except, DB, TCP, 1, ALLOW),
                (except_first, DB, TCP, 1, DENY),
                (except_last, DB, TCP, 1, DENY),
                (after_except, DB, TCP, 1, ALLOW),
                // Egress to addresses.
                (WEB, OUTSIDE, TCP, 443, ALLOW),
                (WEB, EXCEPTED, TCP, 443, DENY),
                (WEB, ELSEWHERE, TCP, 443, DENY),
                (WEB, CACHE, TCP, 6379, DENY),
            ],
        );
    }

    #[test]
    fn an_ip_block_matches_pod_addresses_whatever_their_labels() {
        let cluster = world(vec![make_policy(
            "prod/cache-from-db-address",
            net::NetworkPolicySpec {
                ingress: Some(vec![from(
                    vec![
                        block("10.244.1.20/32", &[]),
                        block("fd00:10:244:1::14/128", &[]),
                    ],
                    vec![],
                )]),
                ..spec(sel(&[("app", "cache")]))
            },
        )]);
        check(
            &cluster,
            &[
                (DB, CACHE, TCP, 6379, ALLOW),
                (WEB, CACHE, TCP, 6379, DENY),
                (OUTSIDE, CACHE, TCP, 6379, DENY),
            ],
        );
    }

    #[test]
    fn numbered_ports_match_their_protocol_and_number_and_tcp_is_the_default() {
        let cluster = world(vec![make_policy(
            "prod/db-ports",
            net::NetworkPolicySpec {
                ingress: Some(vec![from(
                    vec![],
                    vec![
                        port(None, 5432),
                        port(Some("UDP"), 53),
                        port(Some("SCTP"), 9000),
                        port(Some("TCP"), 443),
                    ],
                )]),
                ..spec(sel(&[("app", "db")]))
            },
        )]);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 5432, ALLOW),
                (OUTSIDE, DB, TCP, 5432, ALLOW),
                (WEB, DB, UDP, 5432, DENY),
                (WEB, DB, SCTP, 5432, DENY),
                (WEB, DB, TCP, 5431, DENY),
                (WEB, DB, TCP, 5433, DENY),
                (WEB, DB, UDP, 53, ALLOW),
                (WEB, DB, TCP, 53, DENY),
                (WEB, DB, SCTP, 9000, ALLOW),
                (WEB, DB, TCP, 9000, DENY),
                (WEB, DB, UDP, 9000, DENY),
                (WEB, DB, TCP, 443, ALLOW),
                (WEB, DB, UDP, 443, DENY),
            ],
        );
    }

    #[test]
    fn a_port_entry_without_a_number_matches_every_port_of_its_protocol() {
        let cluster = world(vec![make_policy(
            "prod/db-every-port",
            net::NetworkPolicySpec {
                ingress: Some(vec![
                    from(vec![], vec![every_port(Some("UDP"))]),
                    from(vec![pods(sel(&[("app", "web")]))], vec![every_port(None)]),
                ]),
                ..spec(sel(&[("app", "db")]))
            },
        )]);
        check(
            &cluster,
            &[
                (OUTSIDE, DB, UDP, 1, ALLOW),
                (OUTSIDE, DB, UDP, 65535, ALLOW),
                (OUTSIDE, DB, TCP, 80, DENY),
                (WEB, DB, TCP, 1, ALLOW),
                (WEB, DB, TCP, 65535, ALLOW),
                (WEB, DB, SCTP, 80, DENY),
                (CACHE, DB, TCP, 80, DENY),
            ],
        );
    }

    #[test]
    fn end_port_ranges_include_both_ends() {
        let cluster = world(vec![make_policy(
            "prod/db-ranges",
            net::NetworkPolicySpec {
                ingress: Some(vec![from(
                    vec![],
                    vec![
                        range(None, 8000, 8080),
                        range(Some("UDP"), 1, 1),
                        range(Some("SCTP"), 65000, 65535),
                        range(Some("TCP"), 9000, 9000),
                    ],
                )]),
                ..spec(sel(&[("app", "db")]))
            },
        )]);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 7999, DENY),
                (WEB, DB, TCP, 8000, ALLOW),
                (WEB, DB, TCP, 8040, ALLOW),
                (WEB, DB, TCP, 8080, ALLOW),
                (WEB, DB, TCP, 8081, DENY),
                (WEB, DB, UDP, 8000, DENY),
                (WEB, DB, UDP, 1, ALLOW),
                (WEB, DB, UDP, 2, DENY),
                (WEB, DB, SCTP, 64999, DENY),
                (WEB, DB, SCTP, 65000, ALLOW),
                (WEB, DB, SCTP, 65535, ALLOW),
                (WEB, DB, TCP, 65535, DENY),
                (WEB, DB, TCP, 8999, DENY),
                (WEB, DB, TCP, 9000, ALLOW),
                (WEB, DB, TCP, 9001, DENY),
            ],
        );
    }

    #[test]
    fn named_ports_of_an_ingress_rule_resolve_on_the_subject_pod() {
        // db declares metrics=9187, cache metrics=9121.
        let cluster = world(vec![make_policy(
            "prod/metrics-in",
            net::NetworkPolicySpec {
                ingress: Some(vec![from(vec![], vec![named(None, "metrics")])]),
                ..spec(expr("app", "In", &["db", "cache"]))
            },
        )]);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 9187, ALLOW),
                (OUTSIDE, DB, TCP, 9187, ALLOW),
                (WEB, DB, TCP, 9121, DENY),
                (WEB, CACHE, TCP, 9121, ALLOW),
                (WEB, CACHE, TCP, 9187, DENY),
                (WEB, DB, UDP, 9187, DENY),
                (WEB, DB, TCP, 5432, DENY),
            ],
        );
    }

    #[test]
    fn named_ports_of_an_egress_rule_resolve_on_the_destination_pod() {
        let cluster = with_non_members(world(vec![make_policy(
            "prod/web-metrics-out",
            net::NetworkPolicySpec {
                policy_types: types(&["Egress"]),
                egress: Some(vec![to(vec![], vec![named(None, "metrics")])]),
                ..spec(sel(&[("app", "web")]))
            },
        )]));
        let mut cluster = cluster;
        // A terminated pod declaring the name: it is no destination pod any more.
        let mut old_metrics = with_ports(
            make_pod("prod/old-metrics", &[("app", "x")], 1, 60),
            &[("metrics", TCP, 9187)],
        );
        old_metrics.terminated = true;
        add_pod(&mut cluster, old_metrics);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 9187, ALLOW),
                (WEB, DB, TCP, 9121, DENY),
                (WEB, CACHE, TCP, 9121, ALLOW),
                (WEB, CACHE, TCP, 9187, DENY),
                (WEB, DB, TCP, 5432, DENY),
                // A name resolves on pods only: outside addresses and pods without it, nothing.
                (WEB, OUTSIDE, TCP, 9187, DENY),
                (WEB, DEV_TOOL, TCP, 9187, DENY),
                (WEB, End::Pod("prod/old-metrics"), TCP, 9187, DENY),
            ],
        );
    }

    #[test]
    fn a_named_port_that_resolves_nowhere_or_under_another_protocol_matches_nothing() {
        // db declares pg/TCP 5432, metrics/TCP 9187, dns/UDP 53.
        let cluster = world(vec![make_policy(
            "prod/db-names",
            net::NetworkPolicySpec {
                ingress: Some(vec![
                    from(
                        vec![],
                        vec![
                            named(Some("UDP"), "pg"),
                            named(Some("TCP"), "dns"),
                            named(Some("SCTP"), "metrics"),
                            named(None, "nope"),
                        ],
                    ),
                    from(
                        vec![pods(sel(&[("app", "cache")]))],
                        vec![named(Some("UDP"), "dns")],
                    ),
                ]),
                ..spec(sel(&[("app", "db")]))
            },
        )]);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 5432, DENY),
                (WEB, DB, UDP, 5432, DENY),
                (WEB, DB, TCP, 53, DENY),
                (WEB, DB, UDP, 53, DENY),
                (WEB, DB, SCTP, 9187, DENY),
                (WEB, DB, TCP, 9187, DENY),
                // The same name with the protocol it is declared with does resolve.
                (CACHE, DB, UDP, 53, ALLOW),
                (CACHE, DB, TCP, 53, DENY),
            ],
        );
    }

    #[test]
    fn an_empty_rule_allows_everything_in_its_direction() {
        let cluster = world(vec![
            // `ingress: [{from: [], ports: []}]`: empty lists mean "not restricted".
            make_policy(
                "prod/db-any-in",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(vec![], vec![])]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            // `ingress: [{}]`.
            make_policy(
                "prod/cache-any-in",
                net::NetworkPolicySpec {
                    ingress: Some(vec![net::NetworkPolicyIngressRule::default()]),
                    ..spec(sel(&[("app", "cache")]))
                },
            ),
            // `egress: [{}]`.
            make_policy(
                "prod/web-any-out",
                net::NetworkPolicySpec {
                    policy_types: types(&["Egress"]),
                    egress: Some(vec![net::NetworkPolicyEgressRule::default()]),
                    ..spec(sel(&[("app", "web")]))
                },
            ),
        ]);
        check(
            &cluster,
            &[
                (OUTSIDE, DB, SCTP, 1, ALLOW),
                (GHOST_WEB, DB, UDP, 53, ALLOW),
                (OUTSIDE, CACHE, TCP, 65535, ALLOW),
                (WEB, CACHE, TCP, 6379, ALLOW),
                (WEB, OUTSIDE, UDP, 9, ALLOW),
                (WEB, DEV_TOOL, SCTP, 9, ALLOW),
            ],
        );
    }

    #[test]
    fn an_empty_rule_list_denies_everything_in_its_direction() {
        let cluster = world(vec![make_policy(
            "prod/deny-all",
            net::NetworkPolicySpec {
                policy_types: types(&["Ingress", "Egress"]),
                ..spec(all())
            },
        )]);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 5432, DENY),
                (OUTSIDE, DB, TCP, 5432, DENY),
                (DB, OUTSIDE, UDP, 53, DENY),
                (DEV_WEB, WEB, TCP, 80, DENY),
                (WEB, DEV_WEB, TCP, 80, DENY),
                // Other namespaces are untouched.
                (DEV_WEB, DEV_TOOL, TCP, 80, ALLOW),
                (DEV_WEB, OUTSIDE, TCP, 80, ALLOW),
                (OUTSIDE, TEST_WEB, TCP, 80, ALLOW),
            ],
        );
    }

    #[test]
    fn policy_types_default_to_ingress_plus_egress_when_egress_rules_exist() {
        let cluster = world(vec![
            // No types, no rules: ingress only.
            make_policy("prod/db-default", spec(sel(&[("app", "db")]))),
            // No types, egress rules: both.
            make_policy(
                "prod/cache-default",
                net::NetworkPolicySpec {
                    egress: Some(vec![to(vec![pods(sel(&[("app", "db")]))], vec![])]),
                    ..spec(sel(&[("app", "cache")]))
                },
            ),
            // Types [Ingress]: egress rules present but ignored.
            make_policy(
                "prod/web-ingress-type",
                net::NetworkPolicySpec {
                    policy_types: types(&["Ingress"]),
                    egress: Some(vec![to(vec![block("192.0.2.0/24", &[])], vec![])]),
                    ..spec(sel(&[("app", "web")]))
                },
            ),
            // No types, an empty egress list: no egress section, so ingress only.
            make_policy(
                "test/empty-egress",
                net::NetworkPolicySpec {
                    egress: Some(vec![]),
                    ..spec(all())
                },
            ),
        ]);
        check(
            &cluster,
            &[
                (OUTSIDE, DB, TCP, 5432, DENY),
                (DB, OUTSIDE, TCP, 443, ALLOW),
                (CACHE, DB, TCP, 5432, DENY),
                (OUTSIDE, CACHE, TCP, 6379, DENY),
                (CACHE, OUTSIDE, TCP, 443, DENY),
                (CACHE, WEB, TCP, 80, DENY),
                (OUTSIDE, WEB, TCP, 80, DENY),
                (WEB, OUTSIDE, TCP, 443, ALLOW),
                (WEB, ELSEWHERE, TCP, 443, ALLOW),
                (OUTSIDE, TEST_WEB, TCP, 80, DENY),
                (TEST_WEB, OUTSIDE, TCP, 443, ALLOW),
            ],
        );
    }

    #[test]
    fn an_egress_only_policy_leaves_ingress_open() {
        let cluster = world(vec![make_policy(
            "prod/db-egress-only",
            net::NetworkPolicySpec {
                policy_types: types(&["Egress"]),
                // Ingress rules of an egress-only policy are ignored: they do not isolate.
                ingress: Some(vec![from(vec![pods(sel(&[("app", "cache")]))], vec![])]),
                egress: Some(vec![to(
                    vec![pods(sel(&[("app", "cache")]))],
                    vec![port(None, 6379)],
                )]),
                ..spec(sel(&[("app", "db")]))
            },
        )]);
        check(
            &cluster,
            &[
                (OUTSIDE, DB, TCP, 5432, ALLOW),
                (WEB, DB, TCP, 5432, ALLOW),
                (DEV_TOOL, DB, UDP, 53, ALLOW),
                (DB, CACHE, TCP, 6379, ALLOW),
                (DB, CACHE, TCP, 6380, DENY),
                (DB, WEB, TCP, 6379, DENY),
                (DB, OUTSIDE, TCP, 6379, DENY),
            ],
        );
    }

    #[test]
    fn several_policies_selecting_a_pod_allow_the_union_of_their_rules() {
        let cluster = world(vec![
            make_policy(
                "prod/db-pg-from-web",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(
                        vec![pods(sel(&[("app", "web")]))],
                        vec![port(None, 5432)],
                    )]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            make_policy(
                "prod/db-metrics-from-dev",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(
                        vec![namespaces(sel(&[("env", "dev")]))],
                        vec![port(None, 9187)],
                    )]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            make_policy("prod/deny-ingress", spec(all())),
            make_policy(
                "prod/web-deny-egress",
                net::NetworkPolicySpec {
                    policy_types: types(&["Egress"]),
                    ..spec(sel(&[("app", "web")]))
                },
            ),
            make_policy(
                "prod/web-allow-egress",
                net::NetworkPolicySpec {
                    policy_types: types(&["Egress"]),
                    egress: Some(vec![to(vec![], vec![])]),
                    ..spec(sel(&[("app", "web")]))
                },
            ),
        ]);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 5432, ALLOW),
                (WEB, DB, TCP, 9187, DENY),
                (DEV_WEB, DB, TCP, 9187, ALLOW),
                (DEV_WEB, DB, TCP, 5432, DENY),
                (CACHE, DB, TCP, 5432, DENY),
                (WEB, OUTSIDE, TCP, 443, ALLOW),
                (OUTSIDE, WEB, TCP, 80, DENY),
            ],
        );
    }

    #[test]
    fn pod_to_pod_needs_the_egress_of_the_source_and_the_ingress_of_the_destination() {
        let web_to_db = make_policy(
            "prod/web-to-db",
            net::NetworkPolicySpec {
                policy_types: types(&["Egress"]),
                egress: Some(vec![to(vec![pods(sel(&[("app", "db")]))], vec![])]),
                ..spec(sel(&[("app", "web")]))
            },
        );
        let db_from_cache = make_policy(
            "prod/db-from-cache",
            net::NetworkPolicySpec {
                ingress: Some(vec![from(
                    vec![pods(sel(&[("app", "cache")]))],
                    vec![port(None, 5432)],
                )]),
                ..spec(sel(&[("app", "db")]))
            },
        );
        let db_from_web = make_policy(
            "prod/db-from-web",
            net::NetworkPolicySpec {
                ingress: Some(vec![from(
                    vec![pods(sel(&[("app", "web")]))],
                    vec![port(None, 5432)],
                )]),
                ..spec(sel(&[("app", "db")]))
            },
        );
        let cluster = world(vec![web_to_db.clone(), db_from_cache.clone()]);
        check(
            &cluster,
            &[
                // Egress of web allows, ingress of db does not.
                (WEB, DB, TCP, 5432, DENY),
                // cache is not egress-isolated, db's ingress allows.
                (CACHE, DB, TCP, 5432, ALLOW),
                (CACHE, DB, TCP, 5433, DENY),
                // cache is not ingress-isolated, web's egress does not allow.
                (WEB, CACHE, TCP, 6379, DENY),
            ],
        );
        let cluster = world(vec![web_to_db, db_from_cache, db_from_web]);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 5432, ALLOW),
                (WEB, DB, TCP, 5433, DENY),
                (CACHE, DB, TCP, 5432, ALLOW),
            ],
        );
    }

    #[test]
    fn pods_that_are_not_members_match_no_selector_but_ip_blocks_match_their_addresses() {
        let cluster = with_non_members(world(vec![
            make_policy(
                "prod/db-from-web",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(vec![pods(sel(&[("app", "web")]))], vec![])]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            make_policy(
                "prod/cache-from-private",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(
                        vec![block("10.0.0.0/8", &[]), block("fd00::/8", &[])],
                        vec![],
                    )]),
                    ..spec(sel(&[("app", "cache")]))
                },
            ),
            // Selects every app=web pod; only the member one is isolated.
            make_policy("prod/web-deny-ingress", spec(sel(&[("app", "web")]))),
        ]));
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 5432, ALLOW),
                (OLD_WEB, DB, TCP, 5432, DENY),
                (HOST_WEB, DB, TCP, 5432, DENY),
                // The address of a terminated app=web pod now belongs to an app=other pod.
                (REUSED, DB, TCP, 5432, DENY),
                (OLD_WEB, CACHE, TCP, 6379, ALLOW),
                (HOST_WEB, CACHE, TCP, 6379, ALLOW),
                (REUSED, CACHE, TCP, 6379, ALLOW),
                // Non-members are no subjects.
                (OUTSIDE, OLD_WEB, TCP, 80, ALLOW),
                (OUTSIDE, HOST_WEB, TCP, 80, ALLOW),
                (OUTSIDE, WEB, TCP, 80, DENY),
                // The pod without IP lends its labels to no address.
                (OUTSIDE, DB, TCP, 5432, DENY),
            ],
        );
    }

    #[test]
    fn unusable_peers_and_ports_allow_nothing_but_still_isolate() {
        let bad_named_range = net::NetworkPolicyPort {
            end_port: Some(9200),
            ..named(None, "metrics")
        };
        let policies = vec![
            make_policy(
                "prod/db-bad-peers",
                net::NetworkPolicySpec {
                    ingress: Some(vec![
                        from(vec![block("not-a-cidr", &[])], vec![]),
                        from(
                            vec![
                                block("10.244.0.0/16", &["10.245.0.0/24"]),
                                block("fd00:10:244::/48", &["fd00:10:245::/64"]),
                            ],
                            vec![],
                        ),
                        from(vec![pods(expr("app", "Near", &["web"]))], vec![]),
                        from(vec![pods_in(expr("env", "In", &[]), all())], vec![]),
                    ]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            make_policy(
                "prod/cache-bad-ports",
                net::NetworkPolicySpec {
                    ingress: Some(vec![
                        from(vec![], vec![range(None, 9200, 9100)]),
                        from(vec![], vec![bad_named_range]),
                        from(vec![], vec![port(Some("ICMP"), 1)]),
                        from(vec![], vec![port(None, 0)]),
                    ]),
                    ..spec(sel(&[("app", "cache")]))
                },
            ),
            make_policy(
                "prod/web-bad-egress",
                net::NetworkPolicySpec {
                    policy_types: types(&["Egress"]),
                    egress: Some(vec![to(
                        vec![block("192.0.2.0/24", &["192.0.3.0/25"])],
                        vec![],
                    )]),
                    ..spec(sel(&[("app", "web")]))
                },
            ),
        ];
        // Every entry was dropped, reported, and its list left empty: fail closed.
        for policy in &policies {
            let (rules, errors) = match policy.key.name.as_str() {
                "db-bad-peers" => (policy.ingress.as_deref(), 5),
                "cache-bad-ports" => (policy.ingress.as_deref(), 4),
                _ => (policy.egress.as_deref(), 1),
            };
            assert_eq!(
                policy.errors.len(),
                errors,
                "{}: {:?}",
                policy.key,
                policy.errors
            );
            for rule in rules.expect("the policy isolates") {
                let emptied = rule.peers.as_ref().is_some_and(Vec::is_empty)
                    || rule.ports.as_ref().is_some_and(Vec::is_empty);
                assert!(emptied, "{}: {rule:?}", policy.key);
            }
        }
        let cluster = world(policies);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 5432, DENY),
                (DEV_WEB, DB, TCP, 5432, DENY),
                (OUTSIDE, DB, TCP, 5432, DENY),
                (WEB, CACHE, TCP, 9100, DENY),
                (WEB, CACHE, TCP, 9150, DENY),
                (WEB, CACHE, TCP, 9121, DENY),
                (WEB, CACHE, TCP, 1, DENY),
                (WEB, OUTSIDE, TCP, 443, DENY),
                // Egress of db and cache is not isolated; other namespaces are untouched.
                (DB, OUTSIDE, TCP, 443, ALLOW),
                (DEV_WEB, DEV_TOOL, TCP, 80, ALLOW),
            ],
        );
    }

    #[test]
    fn host_bits_in_an_ip_block_are_masked() {
        let policies = vec![
            make_policy(
                "prod/db-legacy-cidr",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(
                        vec![
                            block("10.244.1.7/24", &[]),
                            block("fd00:10:244:1::7/64", &[]),
                        ],
                        vec![],
                    )]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            make_policy(
                "prod/cache-legacy-except",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(
                        vec![
                            block("10.244.0.1/16", &["10.244.2.9/24"]),
                            block("fd00:10:244::1/48", &["fd00:10:244:2::9/64"]),
                        ],
                        vec![],
                    )]),
                    ..spec(sel(&[("app", "cache")]))
                },
            ),
        ];
        for policy in &policies {
            assert!(policy.errors.is_empty(), "{:?}", policy.errors);
        }
        let cluster = world(policies);
        check(
            &cluster,
            &[
                (WEB, DB, TCP, 5432, ALLOW),
                (CACHE, DB, TCP, 5432, ALLOW),
                (DEV_WEB, DB, TCP, 5432, DENY),
                (WEB, CACHE, TCP, 6379, ALLOW),
                (TEST_WEB, CACHE, TCP, 6379, ALLOW),
                (DEV_WEB, CACHE, TCP, 6379, DENY),
                (DEV_TOOL, CACHE, TCP, 6379, DENY),
            ],
        );
    }

    #[test]
    fn pods_in_an_unknown_namespace_match_no_namespace_selector() {
        let mut cluster = world(vec![
            make_policy(
                "prod/db-any-namespace",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(vec![namespaces(all())], vec![])]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            // A policy in the unknown namespace still selects its pods, and its podSelector
            // peers (own namespace, no namespace labels needed) still match.
            make_policy(
                "ghost/db-same-namespace",
                net::NetworkPolicySpec {
                    ingress: Some(vec![from(vec![pods(all())], vec![])]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
        ]);
        add_pod(&mut cluster, make_pod("ghost/db", &[("app", "db")], 4, 20));
        let ghost_db = End::Pod("ghost/db");
        check(
            &cluster,
            &[
                (GHOST_WEB, DB, TCP, 5432, DENY),
                (DEV_WEB, DB, TCP, 5432, ALLOW),
                (GHOST_WEB, ghost_db, TCP, 5432, ALLOW),
                (WEB, ghost_db, TCP, 5432, DENY),
                (OUTSIDE, ghost_db, TCP, 5432, DENY),
            ],
        );
    }

    #[test]
    fn a_judgement_names_the_deciding_policy_and_rule_or_the_isolating_policies() {
        let cluster = world(vec![
            make_policy(
                "prod/db-in",
                net::NetworkPolicySpec {
                    ingress: Some(vec![
                        from(vec![pods(sel(&[("app", "cache")]))], vec![]),
                        from(vec![pods(sel(&[("app", "web")]))], vec![port(None, 5432)]),
                    ]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            make_policy("prod/deny-in", spec(all())),
            make_policy(
                "prod/web-out",
                net::NetworkPolicySpec {
                    policy_types: types(&["Egress"]),
                    egress: Some(vec![to(vec![pods(sel(&[("app", "db")]))], vec![])]),
                    ..spec(sel(&[("app", "web")]))
                },
            ),
        ]);
        let allowed_by = |policy: &str, rule| DirectionVerdict::Allowed {
            policy: key(policy),
            rule,
        };
        let denied_by = |keys: &[&str]| DirectionVerdict::Denied {
            isolating: keys.iter().map(|k| key(k)).collect(),
        };
        let web_out = allowed_by("prod/web-out", 0);
        let db_in_0 = allowed_by("prod/db-in", 0);
        let db_in_1 = allowed_by("prod/db-in", 1);
        let db_isolated = denied_by(&["prod/db-in", "prod/deny-in"]);
        let web_isolated_in = denied_by(&["prod/deny-in"]);
        let web_isolated_out = denied_by(&["prod/web-out"]);
        let open = DirectionVerdict::NotIsolated;
        let no_pod = DirectionVerdict::NotAPod;
        // (connection, egress verdict, ingress verdict)
        let rows = [
            ((WEB, DB, TCP, 5432, ALLOW), &web_out, &db_in_1),
            ((CACHE, DB, TCP, 5432, ALLOW), &open, &db_in_0),
            ((WEB, DB, TCP, 80, DENY), &web_out, &db_isolated),
            ((OUTSIDE, DB, TCP, 5432, DENY), &no_pod, &db_isolated),
            ((WEB, OUTSIDE, TCP, 80, DENY), &web_isolated_out, &no_pod),
            ((CACHE, WEB, TCP, 80, DENY), &open, &web_isolated_in),
            ((DEV_WEB, DEV_TOOL, TCP, 80, ALLOW), &open, &open),
        ];
        for family in Family::ALL {
            for (i, (row, egress, ingress)) in rows.iter().enumerate() {
                let conn = connection(&cluster, row, family);
                let want = Judgement {
                    egress: (*egress).clone(),
                    ingress: (*ingress).clone(),
                };
                let got = judge(&cluster, &conn);
                assert_eq!(got, want, "row {i} {family:?}: {conn:?}");
                assert_eq!(got.allowed(), row.4, "row {i} {family:?}");
            }
        }
    }

    // ---- One table per function ----

    #[test]
    fn isolating_policies_are_those_selecting_the_subject_for_the_direction() {
        let cluster = world(vec![
            make_policy("prod/deny-in", spec(all())),
            make_policy(
                "prod/db-out",
                net::NetworkPolicySpec {
                    policy_types: types(&["Egress"]),
                    ..spec(sel(&[("app", "db")]))
                },
            ),
            make_policy("prod/web-in", spec(expr("app", "In", &["web"]))),
            make_policy("dev/all-in", spec(all())),
            make_policy(
                "dev/debug-both",
                net::NetworkPolicySpec {
                    policy_types: types(&["Egress", "Ingress"]),
                    ..spec(expr("debug", "Exists", &[]))
                },
            ),
        ]);
        use Direction::{Egress, Ingress};
        let rows: &[(&str, Direction, &[&str])] = &[
            ("prod/db", Ingress, &["prod/deny-in"]),
            ("prod/db", Egress, &["prod/db-out"]),
            ("prod/web", Ingress, &["prod/deny-in", "prod/web-in"]),
            ("prod/web", Egress, &[]),
            ("prod/cache", Egress, &[]),
            ("dev/web", Ingress, &["dev/all-in"]),
            ("dev/tool", Ingress, &["dev/all-in", "dev/debug-both"]),
            ("dev/tool", Egress, &["dev/debug-both"]),
            ("test/web", Ingress, &[]),
            // A policy never selects pods of another namespace, even with `{}`.
            ("ghost/web", Ingress, &[]),
        ];
        for (i, (subject, direction, want)) in rows.iter().enumerate() {
            let subject = &cluster.pods[&key(subject)];
            let got: Vec<String> = isolating_policies(&cluster, subject, *direction)
                .map(|p| p.key.to_string())
                .collect();
            assert_eq!(got, *want, "row {i}: {} {direction:?}", subject.key);
        }
    }

    fn model_policy(at: &str) -> Policy {
        Policy {
            key: key(at),
            uid: String::new(),
            subject: LabelSelector::everything(),
            ingress: None,
            egress: None,
            errors: Vec::new(),
        }
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelector {
        let values = values.iter().map(|v| v.to_string()).collect();
        LabelSelector::new(&BTreeMap::new(), &[(key.into(), operator.into(), values)])
            .expect("test selectors are valid")
    }

    fn own(pods: LabelSelector) -> Peer {
        Peer::Pods(PodSelection {
            namespaces: NamespaceScope::Own("prod".to_string()),
            pods,
        })
    }

    fn selected(namespaces: LabelSelector, pods: LabelSelector) -> Peer {
        Peer::Pods(PodSelection {
            namespaces: NamespaceScope::Selected(namespaces),
            pods,
        })
    }

    /// An ipBlock of the family: `(cidr, except)` for IPv4 and for IPv6.
    fn dual_block(family: Family, v4: (&str, &[&str]), v6: (&str, &[&str])) -> Peer {
        let (cidr, except) = match family {
            Family::V4 => v4,
            Family::V6 => v6,
        };
        let except: Vec<String> = except.iter().map(|e| e.to_string()).collect();
        Peer::Block(ip_block(cidr, &except).expect("test blocks are valid"))
    }

    #[test]
    fn peers_match_member_pods_by_selector_and_any_address_by_block() {
        let cluster = with_non_members(world(vec![]));
        let policy = model_policy("prod/p");
        let everything = LabelSelector::everything;
        let web = own(LabelSelector::from_labels([("app", "web")]));
        let own_all = own(everything());
        let all_all = selected(everything(), everything());
        let dev_not_tool = selected(
            expression("env", "In", &["dev"]),
            expression("app", "NotIn", &["tool"]),
        );
        let env_set = selected(expression("env", "Exists", &[]), everything());
        let env_unset = selected(expression("env", "DoesNotExist", &[]), everything());
        for family in Family::ALL {
            let prod_range =
                dual_block(family, ("10.244.1.0/24", &[]), ("fd00:10:244:1::/64", &[]));
            let not_pods = dual_block(
                family,
                ("10.0.0.0/8", &["10.244.0.0/16"]),
                ("fd00::/8", &["fd00:10:244::/48"]),
            );
            let rows: &[(&Peer, End, bool)] = &[
                (&web, WEB, true),
                (&web, DEV_WEB, false),
                (&web, OLD_WEB, false),
                (&web, HOST_WEB, false),
                (&web, REUSED, false),
                (&own_all, CACHE, true),
                (&own_all, OUTSIDE, false),
                (&all_all, TEST_WEB, true),
                (&all_all, GHOST_WEB, false),
                (&all_all, OUTSIDE, false),
                (&dev_not_tool, DEV_WEB, true),
                (&dev_not_tool, DEV_TOOL, false),
                (&dev_not_tool, WEB, false),
                (&env_set, TEST_WEB, false),
                (&env_set, DEV_TOOL, true),
                (&env_unset, TEST_WEB, true),
                (&env_unset, GHOST_WEB, false),
                (&prod_range, WEB, true),
                (&prod_range, OLD_WEB, true),
                (&prod_range, DEV_WEB, false),
                (&prod_range, OUTSIDE, false),
                (&not_pods, HOST_WEB, true),
                (&not_pods, WEB, false),
                (&not_pods, POD_RANGE_NO_POD, false),
            ];
            for (i, &(peer, end, want)) in rows.iter().enumerate() {
                let peer_ip = ip(&cluster, end, family);
                assert_eq!(
                    peer_matches(&cluster, &policy, peer, peer_ip),
                    want,
                    "row {i} {family:?}: {peer:?} vs {end:?}"
                );
            }
        }
        // A block of one family never matches an address of the other.
        let any_v4 = dual_block(Family::V4, ("0.0.0.0/0", &[]), ("::/0", &[]));
        let any_v6 = dual_block(Family::V6, ("0.0.0.0/0", &[]), ("::/0", &[]));
        let web_v4 = ip(&cluster, WEB, Family::V4);
        let web_v6 = ip(&cluster, WEB, Family::V6);
        assert!(!peer_matches(&cluster, &policy, &any_v4, web_v6));
        assert!(!peer_matches(&cluster, &policy, &any_v6, web_v4));
        assert!(peer_matches(&cluster, &policy, &any_v4, web_v4));
        assert!(peer_matches(&cluster, &policy, &any_v6, web_v6));
    }

    #[test]
    fn ports_match_by_protocol_and_number_or_by_name_on_the_destination() {
        let cluster = world(vec![]);
        let db = Some(&cluster.pods[&key("prod/db")]);
        let numbers = |protocol, first, last| PortSpec::Numbers {
            protocol,
            first,
            last,
        };
        let name = |protocol, name: &str| PortSpec::Named {
            protocol,
            name: name.to_string(),
        };
        let rows: Vec<(PortSpec, Option<&Pod>, Protocol, u16, bool)> = vec![
            (PortSpec::AllPorts(TCP), None, TCP, 1, true),
            (PortSpec::AllPorts(TCP), None, UDP, 1, false),
            (PortSpec::AllPorts(SCTP), db, SCTP, 65535, true),
            (numbers(TCP, 80, 80), None, TCP, 80, true),
            (numbers(TCP, 80, 80), None, TCP, 81, false),
            (numbers(TCP, 80, 80), None, UDP, 80, false),
            (numbers(UDP, 1000, 2000), None, UDP, 999, false),
            (numbers(UDP, 1000, 2000), None, UDP, 1000, true),
            (numbers(UDP, 1000, 2000), None, UDP, 2000, true),
            (numbers(UDP, 1000, 2000), None, UDP, 2001, false),
            (name(TCP, "pg"), db, TCP, 5432, true),
            (name(TCP, "pg"), db, TCP, 5433, false),
            (name(TCP, "pg"), None, TCP, 5432, false),
            (name(UDP, "pg"), db, UDP, 5432, false),
            (name(TCP, "pg"), db, UDP, 5432, false),
            (name(UDP, "dns"), db, UDP, 53, true),
            (name(TCP, "dns"), db, TCP, 53, false),
            (name(TCP, "nope"), db, TCP, 5432, false),
        ];
        for (i, (spec, destination, protocol, port, want)) in rows.iter().enumerate() {
            assert_eq!(
                port_matches(spec, *destination, *protocol, *port),
                *want,
                "row {i}: {spec:?} {protocol:?}/{port}"
            );
        }
    }

    #[test]
    fn a_rule_needs_a_matching_peer_and_a_matching_port_and_empty_lists_match_nothing() {
        let cluster = world(vec![]);
        let policy = model_policy("prod/p");
        let rule = |peers, ports| PolicyRule { peers, ports };
        let web = || own(LabelSelector::from_labels([("app", "web")]));
        let db = || own(LabelSelector::from_labels([("app", "db")]));
        let http = || PortSpec::Numbers {
            protocol: TCP,
            first: 80,
            last: 80,
        };
        let pg = || PortSpec::Named {
            protocol: TCP,
            name: "pg".to_string(),
        };
        let anything = rule(None, None);
        let no_peer = rule(Some(vec![]), None);
        let no_port = rule(None, Some(vec![]));
        let neither = rule(Some(vec![]), Some(vec![]));
        let web_http = rule(Some(vec![web()]), Some(vec![http()]));
        let web_any = rule(Some(vec![web()]), None);
        let db_any = rule(Some(vec![db()]), None);
        let any_pg = rule(None, Some(vec![pg()]));
        let db_pg = rule(Some(vec![db()]), Some(vec![pg()]));
        let web_pg = rule(Some(vec![web()]), Some(vec![pg()]));
        use Direction::{Egress, Ingress};
        let rows: &[(&PolicyRule, Direction, Row)] = &[
            (&anything, Ingress, (OUTSIDE, DB, UDP, 9, ALLOW)),
            (&anything, Egress, (DB, OUTSIDE, SCTP, 9, ALLOW)),
            // Fail closed: an emptied list matches nothing.
            (&no_peer, Ingress, (WEB, DB, TCP, 80, DENY)),
            (&no_port, Ingress, (WEB, DB, TCP, 80, DENY)),
            (&no_port, Egress, (WEB, DB, TCP, 80, DENY)),
            (&neither, Egress, (WEB, DB, TCP, 80, DENY)),
            (&web_http, Ingress, (WEB, DB, TCP, 80, ALLOW)),
            (&web_http, Ingress, (CACHE, DB, TCP, 80, DENY)),
            (&web_http, Ingress, (WEB, DB, TCP, 81, DENY)),
            (&web_http, Ingress, (WEB, DB, UDP, 80, DENY)),
            // Peers are the other end: for egress, the destination.
            (&web_any, Egress, (WEB, DB, TCP, 80, DENY)),
            (&db_any, Egress, (WEB, DB, TCP, 80, ALLOW)),
            // Named ports resolve on the destination, whichever end the subject is.
            (&any_pg, Ingress, (WEB, DB, TCP, 5432, ALLOW)),
            (&any_pg, Ingress, (DB, WEB, TCP, 5432, DENY)),
            (&db_pg, Egress, (WEB, DB, TCP, 5432, ALLOW)),
            (&web_pg, Egress, (DB, WEB, TCP, 5432, DENY)),
        ];
        for family in Family::ALL {
            for (i, &(rule, direction, row)) in rows.iter().enumerate() {
                let conn = connection(&cluster, &row, family);
                assert_eq!(
                    rule_allows(&cluster, &policy, rule, direction, &conn),
                    row.4,
                    "row {i} {family:?} {direction:?}: {rule:?} {conn:?}"
                );
            }
        }
    }

    #[test]
    fn a_connection_names_its_ends_by_role() {
        let conn = Connection {
            src: "10.244.1.10".parse().unwrap(),
            dst: "10.244.1.20".parse().unwrap(),
            protocol: TCP,
            port: 80,
        };
        assert_eq!(conn.subject_ip(Direction::Ingress), conn.dst);
        assert_eq!(conn.peer_ip(Direction::Ingress), conn.src);
        assert_eq!(conn.subject_ip(Direction::Egress), conn.src);
        assert_eq!(conn.peer_ip(Direction::Egress), conn.dst);
    }
}
