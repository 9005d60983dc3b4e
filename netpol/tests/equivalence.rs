//! The compiled ruleset means what the API means.
//!
//! For random clusters (every policy feature, fail-closed entries included) and random change
//! sequences applied through the incremental engine of every node, each packet that can cross
//! the cluster — pod to pod on one node and across nodes, outside to pod, pod to outside, IPv4
//! and IPv6, TCP/UDP/SCTP on a spread of ports — gets the same verdict from the packet simulator
//! walking the nodes' desired tables as from the semantic evaluator reading the policies.
//! A failure prints the seed (proptest keeps it in `proptest-regressions/`), the packet, the
//! simulator's trace and the evaluator's judgement.

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;
use weft_netpol::compile::MarkLayout;
use weft_netpol::engine::Engine;
use weft_netpol::eval::{self, Connection};
use weft_netpol::model::{Cluster, Direction, ObjectKey, Pod};
use weft_netpol::ruleset::{Action, Hook, Protocol};
use weft_netpol::sim::{CtInfo, Decision, Packet, simulate};
use weft_netpol::synth::{self, GenParams, Rng};

const TABLE: &str = "weft";
/// The node's tunnel device: must not start with the pod interface prefix `weft`.
const TUNNEL: &str = "vxweft";
const UPLINK: &str = "eth0";
/// Probe ports: the ones policies and containers use, range edges, and one nobody names.
const PROBE_PORTS: [u16; 7] = [53, 79, 80, 81, 8080, 9090, 5000];

/// Where an address lives, seen from one node.
fn route(cluster: &Cluster, node: &str, ip: IpAddr) -> Option<String> {
    match member_pod(cluster, ip) {
        Some(p) if p.node == node => Some(veth(p)),
        Some(_) => Some(TUNNEL.to_string()),
        None => Some(UPLINK.to_string()),
    }
}

fn member_pod(cluster: &Cluster, ip: IpAddr) -> Option<&Pod> {
    cluster.pod_by_ip(ip)
}

/// Host-side veth name of a pod (the CNI names it `weft<hash>`).
fn veth(p: &Pod) -> String {
    format!(
        "weft{}",
        &weft_netpol::ruleset::short_hash(&p.key.to_string())[..6]
    )
}

/// Runs one new connection's first packet through every node it crosses.
fn simulated(
    cluster: &Cluster,
    engines: &BTreeMap<String, Engine>,
    conn: &Connection,
) -> (bool, String) {
    let (allowed, log, marks) = simulated_with_marks(cluster, engines, conn);
    match marks {
        Ok(()) => (allowed, log),
        Err(e) => (!allowed, format!("{log}\nWRONG CONNTRACK MARK: {e}")),
    }
}

/// The conntrack mark an accepted first packet leaves must name, per direction this node
/// enforces, a rule that admits the connection (id 0 when the pod is not isolated for it).
fn check_marks(
    cluster: &Cluster,
    rs: &weft_netpol::Ruleset,
    node: &str,
    conn: &Connection,
    mark: u32,
) -> Result<(), String> {
    let layout = MarkLayout::default();
    for direction in Direction::ALL {
        let subject = match direction {
            Direction::Ingress => conn.dst,
            Direction::Egress => conn.src,
        };
        let Some(pod) = member_pod(cluster, subject).filter(|p| p.node == node) else {
            continue; // another node writes this field
        };
        let id = layout.id(mark, direction);
        let isolated = eval::isolating_policies(cluster, pod, direction)
            .next()
            .is_some();
        if !isolated {
            if id != 0 {
                return Err(format!("{} not isolated but id {id}", direction.api_name()));
            }
            continue;
        }
        let want = layout.write(direction, id);
        let comments: Vec<&str> = rs
            .chains
            .values()
            .flat_map(|c| &c.rules)
            .filter(|r| r.action == Action::MarkAccept(want))
            .filter_map(|r| r.comment.as_deref())
            .collect();
        if id == 0 || comments.is_empty() {
            return Err(format!(
                "{} admitted but the mark {mark:#010x} names no rule",
                direction.api_name()
            ));
        }
        let admits = |comment: &str| -> bool {
            if comment.contains("...") {
                return true; // a cut name: cannot tell, accept
            }
            let mut words = comment.split_whitespace();
            let (Some(key), Some(rule)) = (words.next(), words.next()) else {
                return false;
            };
            let Some((ns, name)) = key.split_once('/') else {
                return false;
            };
            let Some(index) = rule
                .strip_prefix(direction.api_name())
                .and_then(|r| r.strip_prefix('['))
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|r| r.parse::<usize>().ok())
            else {
                return false;
            };
            let Some(policy) = cluster.policies.get(&ObjectKey::new(ns, name)) else {
                return false;
            };
            let Some(r) = policy.rules(direction).and_then(|rules| rules.get(index)) else {
                return false;
            };
            eval::policy_selects(policy, pod)
                && eval::rule_allows(cluster, policy, r, direction, conn)
        };
        if !comments.iter().any(|c| admits(c)) {
            return Err(format!(
                "{} id {id} names {comments:?}, none of which admits the connection",
                direction.api_name()
            ));
        }
    }
    Ok(())
}

fn simulated_with_marks(
    cluster: &Cluster,
    engines: &BTreeMap<String, Engine>,
    conn: &Connection,
) -> (bool, String, Result<(), String>) {
    let src_pod = member_pod(cluster, conn.src);
    let dst_pod = member_pod(cluster, conn.dst);
    // (node, iif, oif) for each node the packet is forwarded by.
    let mut hops: Vec<(String, String, String)> = Vec::new();
    match (src_pod, dst_pod) {
        (Some(a), Some(b)) if a.node == b.node => hops.push((a.node.clone(), veth(a), veth(b))),
        (Some(a), Some(b)) => {
            hops.push((a.node.clone(), veth(a), TUNNEL.into()));
            hops.push((b.node.clone(), TUNNEL.into(), veth(b)));
        }
        (Some(a), None) => hops.push((a.node.clone(), veth(a), UPLINK.into())),
        (None, Some(b)) => hops.push((b.node.clone(), UPLINK.into(), veth(b))),
        (None, None) => return (true, "not forwarded by any node".into(), Ok(())),
    }
    let mut log = String::new();
    for (node, iif, oif) in hops {
        let pkt = Packet {
            iif,
            oif,
            src: conn.src,
            dst: conn.dst,
            l4proto: conn.protocol.number(),
            dport: Some(conn.port),
            ct: CtInfo::New,
        };
        let rs = engines[&node].desired();
        let routes = |ip: IpAddr| route(cluster, &node, ip);
        let trace = simulate(rs, Hook::Forward, &pkt, &routes);
        log.push_str(&format!("on {node}: {pkt}\n{}\n", trace.explain()));
        if trace.fault().is_some() || trace.verdict != Decision::Accept {
            return (false, log, Ok(()));
        }
        if let Err(e) = check_marks(cluster, rs, &node, conn, trace.ct_mark) {
            return (true, log, Err(format!("on {node}: {e}")));
        }
    }
    (true, log, Ok(()))
}

fn check_all(cluster: &Cluster, engines: &BTreeMap<String, Engine>) -> Result<usize, String> {
    let mut endpoints: Vec<IpAddr> = cluster
        .pods
        .values()
        .filter(|p| p.is_member())
        .flat_map(|p| p.ips.clone())
        .collect();
    // Outside addresses: inside and outside the generator's ipBlocks and their exceptions.
    for s in [
        "10.244.4.9",
        "10.244.0.252",
        "192.0.2.1",
        "fd00:10:244:1::9",
        "fd00:10:244:2::9",
        "2001:db8::1",
    ] {
        endpoints.push(s.parse().expect("literal address"));
    }
    let mut checked = 0;
    for &src in &endpoints {
        for &dst in &endpoints {
            let same_family = matches!(
                (src, dst),
                (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_))
            );
            if src == dst || !same_family {
                continue;
            }
            // A pod talking to itself never crosses the forward hook.
            if let (Some(a), Some(b)) = (member_pod(cluster, src), member_pod(cluster, dst))
                && a.key == b.key
            {
                continue;
            }
            for protocol in Protocol::ALL {
                for port in PROBE_PORTS {
                    let conn = Connection {
                        src,
                        dst,
                        protocol,
                        port,
                    };
                    let want = eval::allowed(cluster, &conn);
                    let (got, log) = simulated(cluster, engines, &conn);
                    if want != got {
                        return Err(format!(
                            "{src} -> {dst} {} {port}: evaluator says {}, ruleset says {}\n{:?}\n{log}",
                            protocol.keyword(),
                            if want { "allowed" } else { "denied" },
                            if got { "allowed" } else { "denied" },
                            eval::judge(cluster, &conn),
                        ));
                    }
                    checked += 1;
                }
            }
        }
    }
    Ok(checked)
}

fn engines_for(cluster: &Cluster, p: &GenParams) -> BTreeMap<String, Engine> {
    (0..p.nodes)
        .map(|i| {
            let node = synth::node_name(i);
            (
                node.clone(),
                Engine::from_cluster(cluster.clone(), &node, TABLE),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn simulator_over_compiled_rules_agrees_with_the_evaluator(
        seed in any::<u64>(), ns in 1usize..4, pods in 2usize..10, pols in 0usize..10, steps in 0usize..12,
    ) {
        let p = GenParams::small(ns, pods, pols);
        let mut cluster = synth::cluster(&p, seed);
        let mut engines = engines_for(&cluster, &p);
        check_all(&cluster, &engines).map_err(|e| TestCaseError::fail(format!("before changes: {e}")))?;
        let mut rng = Rng::new(seed.rotate_left(17));
        for step in 0..steps {
            let change = synth::change(&mut rng, &p, &cluster, step);
            synth::apply_change(&mut cluster, &change);
            for engine in engines.values_mut() {
                engine.apply(change.clone());
            }
        }
        check_all(&cluster, &engines).map_err(|e| TestCaseError::fail(format!("after {steps} changes: {e}")))?;
    }
}

#[test]
fn the_equivalence_check_catches_a_wrong_ruleset() {
    // The check must be able to fail: give every node the table of a node that knows no
    // policies (an engine over the cluster without them) and the evaluator must disagree
    // somewhere, in some seed.
    let p = GenParams::small(2, 8, 6);
    let found = (0..50).any(|seed| {
        let cluster = synth::cluster(&p, seed);
        assert!(
            check_all(&cluster, &engines_for(&cluster, &p)).is_ok(),
            "seed {seed}"
        );
        let mut without_policies = cluster.clone();
        without_policies.policies.clear();
        check_all(&cluster, &engines_for(&without_policies, &p)).is_err()
    });
    assert!(found, "no seed produced a detectable difference");
}
