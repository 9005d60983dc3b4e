//! A seeded generator of synthetic clusters and change streams.
//!
//! Used by the property tests (small clusters, many seeds) and by the benchmarks (10,000 pods,
//! 2,000 policies, 500 namespaces). Deterministic: the same [`GenParams`] and seed give the same
//! cluster on every machine, so benchmark figures and failing property cases can be replayed.
//! Policies are produced as API objects and go through [`Policy::from_api`], so validation
//! (defaults, fail-closed drops) is exercised too. `BENCHMARKS.md` documents the parameters.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector as ApiSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::engine::Change;
use crate::model::{Cluster, ContainerPort, Namespace, ObjectKey, Pod, Policy};
use crate::ruleset::Protocol;

/// A small, fast, deterministic PRNG (SplitMix64): no dependency, same stream everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Shape of a synthetic cluster.
#[derive(Clone, Debug)]
pub struct GenParams {
    /// Number of namespaces.
    pub namespaces: usize,
    /// Number of pods (spread over namespaces round-robin).
    pub pods: usize,
    /// Number of policies.
    pub policies: usize,
    /// Number of nodes; pods are spread over them.
    pub nodes: usize,
    /// Pods placed on node `node-0` (the node under test); the rest go to the other nodes.
    pub local_pods: usize,
    /// Distinct values of the `app` label.
    pub apps: usize,
    /// Distinct values of the namespace `team` label.
    pub teams: usize,
    /// Maximum peers per rule.
    pub peers_per_rule: usize,
    /// Maximum rules per direction.
    pub rules_per_policy: usize,
    /// Percent of policies that include a deliberately unusable peer or port (fail closed).
    pub invalid_percent: u64,
}

impl GenParams {
    /// The benchmark cluster of issue 3: 10,000 pods, 2,000 policies, 500 namespaces, 110
    /// pods on the node under test.
    pub fn benchmark() -> GenParams {
        GenParams {
            namespaces: 500,
            pods: 10_000,
            policies: 2_000,
            nodes: 91,
            local_pods: 110,
            apps: 40,
            teams: 25,
            peers_per_rule: 3,
            rules_per_policy: 2,
            invalid_percent: 2,
        }
    }

    /// A small cluster for property tests.
    pub fn small(namespaces: usize, pods: usize, policies: usize) -> GenParams {
        GenParams {
            namespaces,
            pods,
            policies,
            nodes: 2,
            local_pods: pods.div_ceil(2),
            apps: 3,
            teams: 2,
            peers_per_rule: 2,
            rules_per_policy: 2,
            invalid_percent: 10,
        }
    }
}

/// Label values used by the generator.
pub const TIERS: [&str; 4] = ["web", "api", "db", "cache"];
/// Environment label values of namespaces.
pub const ENVS: [&str; 3] = ["prod", "dev", "staging"];
/// Ports a policy may name, with their protocols.
pub const NAMED_PORTS: [(&str, Protocol); 4] = [
    ("http", Protocol::Tcp),
    ("metrics", Protocol::Tcp),
    ("dns", Protocol::Udp),
    ("assoc", Protocol::Sctp),
];
/// Port numbers policies and containers use (small, so random rules and probes meet).
pub const PORTS: [u16; 5] = [53, 80, 81, 8080, 9090];

/// The node name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// Namespace `i`.
pub fn namespace(rng: &mut Rng, p: &GenParams, i: usize) -> Namespace {
    let mut labels = BTreeMap::new();
    labels.insert("team".to_string(), format!("t{}", i % p.teams.max(1)));
    labels.insert("env".to_string(), ENVS[i % ENVS.len()].to_string());
    if rng.chance(30) {
        labels.insert("monitored".to_string(), "true".to_string());
    }
    Namespace::new(&format!("ns-{i}"), labels)
}

/// Random pod labels.
pub fn pod_labels(rng: &mut Rng, p: &GenParams, name: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    labels.insert("pod".to_string(), name.to_string());
    labels.insert("app".to_string(), format!("a{}", rng.below(p.apps.max(1))));
    labels.insert("tier".to_string(), rng.pick(&TIERS).to_string());
    if rng.chance(50) {
        labels.insert("version".to_string(), format!("v{}", rng.below(3)));
    }
    labels
}

/// Pod number `i`: namespace round-robin, node by position, unique dual-stack addresses.
pub fn pod(rng: &mut Rng, p: &GenParams, i: usize) -> Pod {
    let ns = format!("ns-{}", i % p.namespaces.max(1));
    let name = format!("p-{i}");
    let node = if i < p.local_pods || p.nodes <= 1 {
        0
    } else {
        1 + (i - p.local_pods) % (p.nodes - 1)
    };
    let (hi, lo) = ((i / 250) as u8, (i % 250 + 2) as u8);
    let v4 = IpAddr::V4(Ipv4Addr::new(10, 244, hi, lo));
    let v6 = IpAddr::V6(Ipv6Addr::new(
        0xfd00,
        0x10,
        0x244,
        hi.into(),
        0,
        0,
        0,
        lo.into(),
    ));
    let ips = match rng.below(10) {
        0 => vec![v4],
        1 => vec![v6],
        _ => vec![v4, v6],
    };
    let mut ports = Vec::new();
    for (pname, proto) in NAMED_PORTS {
        if rng.chance(50) {
            ports.push(ContainerPort {
                name: Some(pname.to_string()),
                port: *rng.pick(&PORTS),
                protocol: proto,
            });
        }
    }
    Pod {
        key: ObjectKey::new(&ns, &name),
        uid: format!("uid-{i}"),
        labels: pod_labels(rng, p, &name),
        ips,
        node: node_name(node),
        ports,
        host_network: rng.chance(2),
        terminated: rng.chance(2),
    }
}

fn api_selector(rng: &mut Rng, p: &GenParams, for_namespaces: bool) -> ApiSelector {
    let mut sel = ApiSelector::default();
    let req = |key: &str, op: &str, values: Vec<String>| LabelSelectorRequirement {
        key: key.to_string(),
        operator: op.to_string(),
        values: (!values.is_empty()).then_some(values),
    };
    if for_namespaces {
        match rng.below(5) {
            0 => {}
            1 => {
                sel.match_labels = Some(BTreeMap::from([(
                    "team".to_string(),
                    format!("t{}", rng.below(p.teams.max(1))),
                )]))
            }
            2 => {
                sel.match_expressions = Some(vec![req(
                    "env",
                    "In",
                    vec![rng.pick(&ENVS).to_string(), rng.pick(&ENVS).to_string()],
                )])
            }
            3 => sel.match_expressions = Some(vec![req("monitored", "Exists", vec![])]),
            _ => {
                sel.match_labels = Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    format!("ns-{}", rng.below(p.namespaces.max(1))),
                )]))
            }
        }
        return sel;
    }
    match rng.below(7) {
        0 => {}
        1 | 2 => {
            sel.match_labels = Some(BTreeMap::from([(
                "app".to_string(),
                format!("a{}", rng.below(p.apps.max(1))),
            )]))
        }
        3 => {
            sel.match_expressions = Some(vec![req(
                "tier",
                "In",
                vec![rng.pick(&TIERS).to_string(), rng.pick(&TIERS).to_string()],
            )])
        }
        4 => {
            sel.match_expressions = Some(vec![req(
                "tier",
                "NotIn",
                vec![rng.pick(&TIERS).to_string()],
            )])
        }
        5 => sel.match_expressions = Some(vec![req("version", "Exists", vec![])]),
        _ => {
            sel.match_labels = Some(BTreeMap::from([(
                "tier".to_string(),
                rng.pick(&TIERS).to_string(),
            )]));
            sel.match_expressions = Some(vec![req("version", "DoesNotExist", vec![])]);
        }
    }
    sel
}

fn api_peer(rng: &mut Rng, p: &GenParams, invalid: bool) -> net::NetworkPolicyPeer {
    let mut peer = net::NetworkPolicyPeer::default();
    if invalid {
        peer.ip_block = Some(net::IPBlock {
            cidr: "10.244.0.0/16".into(),
            except: Some(vec!["192.168.0.0/24".into()]),
        });
        return peer;
    }
    match rng.below(6) {
        0 | 1 => peer.pod_selector = Some(api_selector(rng, p, false)),
        2 => peer.namespace_selector = Some(api_selector(rng, p, true)),
        3 => {
            peer.pod_selector = Some(api_selector(rng, p, false));
            peer.namespace_selector = Some(api_selector(rng, p, true));
        }
        4 => {
            let hi = rng.below(4);
            peer.ip_block = Some(net::IPBlock {
                cidr: format!("10.244.{}.0/22", hi * 4),
                except: rng
                    .chance(50)
                    .then(|| vec![format!("10.244.{}.0/26", hi * 4)]),
            });
        }
        _ => {
            peer.ip_block = Some(net::IPBlock {
                cidr: "fd00:10:244::/52".into(),
                except: rng.chance(50).then(|| vec!["fd00:10:244:1::/64".into()]),
            });
        }
    }
    peer
}

fn api_port(rng: &mut Rng, invalid: bool) -> net::NetworkPolicyPort {
    let proto = |p: Protocol| Some(p.api_name().to_string());
    if invalid {
        return net::NetworkPolicyPort {
            port: Some(IntOrString::Int(90)),
            end_port: Some(80),
            protocol: None,
        };
    }
    match rng.below(6) {
        0 | 1 => net::NetworkPolicyPort {
            port: Some(IntOrString::Int(i32::from(*rng.pick(&PORTS)))),
            end_port: None,
            protocol: rng.chance(70).then(|| "TCP".to_string()),
        },
        2 => net::NetworkPolicyPort {
            port: Some(IntOrString::Int(80)),
            end_port: Some(if rng.chance(50) { 81 } else { 8080 }),
            protocol: None,
        },
        3 | 4 => {
            let (name, p) = *rng.pick(&NAMED_PORTS);
            net::NetworkPolicyPort {
                port: Some(IntOrString::String(name.to_string())),
                end_port: None,
                protocol: proto(p),
            }
        }
        _ => net::NetworkPolicyPort {
            port: None,
            end_port: None,
            protocol: proto(*rng.pick(&Protocol::ALL)),
        },
    }
}

/// A random NetworkPolicy API object in `ns` named `name`.
pub fn api_policy(rng: &mut Rng, p: &GenParams, ns: &str, name: &str) -> net::NetworkPolicy {
    let invalid = rng.chance(p.invalid_percent);
    let rules = |rng: &mut Rng| -> Vec<(Vec<net::NetworkPolicyPeer>, Vec<net::NetworkPolicyPort>)> {
        let n = rng.below(p.rules_per_policy + 1);
        (0..n)
            .map(|_| {
                let peers = (0..rng.below(p.peers_per_rule + 1))
                    .map(|i| api_peer(rng, p, invalid && i == 0))
                    .collect();
                let ports = (0..rng.below(3))
                    .map(|i| api_port(rng, invalid && i == 1))
                    .collect();
                (peers, ports)
            })
            .collect()
    };
    let ingress = rules(rng);
    let egress = rules(rng);
    let policy_types = match rng.below(4) {
        0 => None,
        1 => Some(vec!["Ingress".to_string()]),
        2 => Some(vec!["Egress".to_string()]),
        _ => Some(vec!["Ingress".to_string(), "Egress".to_string()]),
    };
    let spec = net::NetworkPolicySpec {
        pod_selector: Some(api_selector(rng, p, false)),
        policy_types,
        ingress: Some(
            ingress
                .into_iter()
                .map(|(from, ports)| net::NetworkPolicyIngressRule {
                    from: (!from.is_empty()).then_some(from),
                    ports: (!ports.is_empty()).then_some(ports),
                })
                .collect(),
        ),
        egress: Some(
            egress
                .into_iter()
                .map(|(to, ports)| net::NetworkPolicyEgressRule {
                    to: (!to.is_empty()).then_some(to),
                    ports: (!ports.is_empty()).then_some(ports),
                })
                .collect(),
        ),
    };
    net::NetworkPolicy {
        metadata: ObjectMeta {
            namespace: Some(ns.to_string()),
            name: Some(name.to_string()),
            uid: Some(format!("uid-{ns}-{name}")),
            ..Default::default()
        },
        spec: Some(spec),
    }
}

/// A random validated policy.
pub fn policy(rng: &mut Rng, p: &GenParams, i: usize) -> Policy {
    let ns = format!("ns-{}", rng.below(p.namespaces.max(1)));
    Policy::from_api(&api_policy(rng, p, &ns, &format!("np-{i}")))
        .expect("generated selectors are always valid")
}

/// A whole synthetic cluster.
pub fn cluster(p: &GenParams, seed: u64) -> Cluster {
    let mut rng = Rng::new(seed);
    let mut c = Cluster::default();
    for i in 0..p.namespaces {
        let ns = namespace(&mut rng, p, i);
        c.namespaces.insert(ns.name.clone(), ns);
    }
    for i in 0..p.pods {
        let pod = pod(&mut rng, p, i);
        c.pods.insert(pod.key.clone(), pod);
    }
    for i in 0..p.policies {
        let pol = policy(&mut rng, p, i);
        c.policies.insert(pol.key.clone(), pol);
    }
    c
}

/// A random change to the cluster: relabel, add or delete pods, namespaces and policies.
pub fn change(rng: &mut Rng, p: &GenParams, c: &Cluster, serial: usize) -> Change {
    let pick_pod = |rng: &mut Rng| -> Option<Pod> {
        (!c.pods.is_empty()).then(|| c.pods.values().nth(rng.below(c.pods.len())).cloned())?
    };
    match rng.below(10) {
        0..=2 => match pick_pod(rng) {
            Some(mut pod) => {
                let name = pod.key.name.clone();
                pod.labels = pod_labels(rng, p, &name);
                Change::UpsertPod(pod)
            }
            None => Change::UpsertPod(pod(rng, p, serial)),
        },
        3 => Change::UpsertPod(pod(rng, p, p.pods + serial)),
        4 => match pick_pod(rng) {
            Some(pod) => Change::DeletePod(pod.key),
            None => Change::UpsertPod(pod(rng, p, serial)),
        },
        5 => {
            let i = rng.below(p.namespaces.max(1) + 1);
            Change::UpsertNamespace(namespace(rng, p, i))
        }
        6 => Change::UpsertPolicy(policy(rng, p, p.policies + serial)),
        7 if !c.policies.is_empty() => {
            let key = c.policies.keys().nth(rng.below(c.policies.len())).cloned();
            Change::DeletePolicy(key.expect("index within len"))
        }
        8 if !c.policies.is_empty() => {
            // Update an existing policy in place (same name, new content).
            let key = c
                .policies
                .keys()
                .nth(rng.below(c.policies.len()))
                .cloned()
                .expect("index within len");
            let np = api_policy(rng, p, &key.namespace, &key.name);
            Change::UpsertPolicy(Policy::from_api(&np).expect("generated selectors are valid"))
        }
        _ => match pick_pod(rng) {
            Some(mut pod) => {
                // A pod's phase or IPs change (terminated, or restarted with new ports).
                pod.terminated = !pod.terminated;
                Change::UpsertPod(pod)
            }
            None => Change::DeleteNamespace(format!("ns-{}", rng.below(p.namespaces.max(1)))),
        },
    }
}

/// Applies a change to a plain cluster (the reference for the engine's own bookkeeping).
pub fn apply_change(c: &mut Cluster, change: &Change) {
    match change {
        Change::UpsertPod(p) => {
            c.pods.insert(p.key.clone(), p.clone());
        }
        Change::DeletePod(k) => {
            c.pods.remove(k);
        }
        Change::UpsertNamespace(n) => {
            c.namespaces.insert(n.name.clone(), n.clone());
        }
        Change::DeleteNamespace(n) => {
            c.namespaces.remove(n);
        }
        Change::UpsertPolicy(p) => {
            c.policies.insert(p.key.clone(), p.clone());
        }
        Change::DeletePolicy(k) => {
            c.policies.remove(k);
        }
    }
}
