//! `weft demo`: the engine on a small shop, no kernel and no cluster needed.
//!
//! Compiles a readable example (two namespaces, five pods on two nodes, three policies with a
//! named port, a namespace selector, an ipBlock with an exception, and a default-deny egress),
//! prints each node's ruleset as `nft` would list it, then the connectivity truth table, each
//! cell computed twice: by walking the compiled rules with the packet simulator, and by the
//! evaluator reading the policies. Any disagreement is reported and fails the command.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use weft_netpol::compile::compile;
use weft_netpol::eval::{self, Connection};
use weft_netpol::model::{
    Cluster, ContainerPort, IpBlock, NamespaceScope, ObjectKey, Peer, Pod, PodSelection, Policy,
    PolicyRule, PortSpec, ip_block,
};
use weft_netpol::model::{Direction, Namespace};
use weft_netpol::ruleset::{Hook, Protocol, Ruleset};
use weft_netpol::selector::LabelSelector;
use weft_netpol::sim::{CtInfo, Decision, Packet, simulate};

const TABLE: &str = "weft";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(key: &str, node: &str, ips: [&str; 2], l: &[(&str, &str)], ports: &[(&str, u16)]) -> Pod {
    let (ns, name) = key.split_once('/').expect("demo pods are ns/name");
    Pod {
        key: ObjectKey::new(ns, name),
        uid: format!("demo-{name}"),
        labels: labels(l),
        ips: ips
            .iter()
            .map(|s| s.parse().expect("demo address"))
            .collect(),
        node: node.into(),
        ports: ports
            .iter()
            .map(|(n, p)| ContainerPort {
                name: Some((*n).into()),
                port: *p,
                protocol: Protocol::Tcp,
            })
            .collect(),
        host_network: false,
        terminated: false,
    }
}

fn block(cidr: &str, except: &[&str]) -> IpBlock {
    let except: Vec<String> = except.iter().map(|s| s.to_string()).collect();
    ip_block(cidr, &except).expect("demo ipBlock is valid")
}

/// The demo cluster.
pub fn shop() -> Cluster {
    let mut c = Cluster::default();
    for (ns, team) in [("shop", "payments"), ("clients", "web")] {
        c.namespaces
            .insert(ns.into(), Namespace::new(ns, labels(&[("team", team)])));
    }
    for p in [
        pod(
            "shop/api",
            "node-1",
            ["10.244.1.10", "fd00:10:244:1::10"],
            &[("app", "api")],
            &[("http", 8080)],
        ),
        pod(
            "shop/db",
            "node-1",
            ["10.244.1.11", "fd00:10:244:1::11"],
            &[("app", "db")],
            &[("pg", 5432)],
        ),
        pod(
            "clients/ui",
            "node-2",
            ["10.244.2.20", "fd00:10:244:2::20"],
            &[("app", "ui")],
            &[("http", 8080)],
        ),
        pod(
            "clients/batch",
            "node-2",
            ["10.244.2.21", "fd00:10:244:2::21"],
            &[("app", "batch")],
            &[],
        ),
        pod(
            "shop/admin",
            "node-2",
            ["10.244.2.30", "fd00:10:244:2::30"],
            &[("app", "admin")],
            &[],
        ),
    ] {
        c.pods.insert(p.key.clone(), p);
    }
    let ui_from_web_team = Peer::Pods(PodSelection {
        namespaces: NamespaceScope::Selected(LabelSelector::from_labels([("team", "web")])),
        pods: LabelSelector::from_labels([("app", "ui")]),
    });
    let policies = [
        Policy {
            key: ObjectKey::new("shop", "api-from-ui"),
            uid: String::new(),
            subject: LabelSelector::from_labels([("app", "api")]),
            ingress: Some(vec![
                PolicyRule {
                    peers: Some(vec![ui_from_web_team]),
                    ports: Some(vec![PortSpec::Named {
                        protocol: Protocol::Tcp,
                        name: "http".into(),
                    }]),
                },
                PolicyRule {
                    // node-2's /24 except the /30 holding admin: "everything on node-2 but admin".
                    peers: Some(vec![Peer::Block(block(
                        "10.244.2.0/24",
                        &["10.244.2.28/30"],
                    ))]),
                    ports: Some(vec![PortSpec::Numbers {
                        protocol: Protocol::Tcp,
                        first: 8080,
                        last: 8089,
                    }]),
                },
            ]),
            egress: None,
            errors: vec![],
        },
        Policy {
            key: ObjectKey::new("shop", "db-from-api"),
            uid: String::new(),
            subject: LabelSelector::from_labels([("app", "db")]),
            ingress: Some(vec![PolicyRule {
                peers: Some(vec![Peer::Pods(PodSelection {
                    namespaces: NamespaceScope::Own("shop".into()),
                    pods: LabelSelector::from_labels([("app", "api")]),
                })]),
                ports: Some(vec![PortSpec::Named {
                    protocol: Protocol::Tcp,
                    name: "pg".into(),
                }]),
            }]),
            egress: Some(vec![]),
            errors: vec![],
        },
        Policy {
            key: ObjectKey::new("clients", "batch-egress-only-api"),
            uid: String::new(),
            subject: LabelSelector::from_labels([("app", "batch")]),
            ingress: None,
            egress: Some(vec![PolicyRule {
                peers: Some(vec![Peer::Pods(PodSelection {
                    namespaces: NamespaceScope::Selected(LabelSelector::everything()),
                    pods: LabelSelector::from_labels([("app", "api")]),
                })]),
                ports: None,
            }]),
            errors: vec![],
        },
    ];
    for p in policies {
        c.policies.insert(p.key.clone(), p);
    }
    c
}

/// Which nodes forward a packet from `src` to `dst`, with (node, iif, oif).
fn hops(cluster: &Cluster, src: &Pod, dst: &Pod) -> Vec<(String, String, String)> {
    let veth = |p: &Pod| {
        format!(
            "weft{}",
            &weft_netpol::ruleset::short_hash(&p.key.to_string())[..6]
        )
    };
    if src.node == dst.node {
        vec![(src.node.clone(), veth(src), veth(dst))]
    } else {
        let _ = cluster;
        vec![
            (src.node.clone(), veth(src), "vxweft".into()),
            (dst.node.clone(), "vxweft".into(), veth(dst)),
        ]
    }
}

/// Simulated verdict of a new TCP connection from `src` to `dst:port`.
fn simulated(
    cluster: &Cluster,
    tables: &BTreeMap<String, Ruleset>,
    src: &Pod,
    dst: &Pod,
    port: u16,
) -> bool {
    let veth = |p: &Pod| {
        format!(
            "weft{}",
            &weft_netpol::ruleset::short_hash(&p.key.to_string())[..6]
        )
    };
    hops(cluster, src, dst).into_iter().all(|(node, iif, oif)| {
        let pkt = Packet {
            iif,
            oif,
            src: src.ips[0],
            dst: dst.ips[0],
            l4proto: Protocol::Tcp.number(),
            dport: Some(port),
            ct: CtInfo::New,
        };
        let routes = |ip: IpAddr| {
            cluster.pod_by_ip(ip).map(|p| {
                if p.node == node {
                    veth(p)
                } else {
                    "vxweft".to_string()
                }
            })
        };
        simulate(&tables[&node], Hook::Forward, &pkt, &routes).verdict == Decision::Accept
    })
}

/// Runs the demo; returns the text to print, or an error if simulator and evaluator disagree.
pub fn run() -> Result<String, String> {
    let cluster = shop();
    let mut out = String::new();
    let nodes: Vec<String> = {
        let mut n: Vec<String> = cluster.pods.values().map(|p| p.node.clone()).collect();
        n.sort();
        n.dedup();
        n
    };
    let tables: BTreeMap<String, Ruleset> = nodes
        .iter()
        .map(|n| (n.clone(), compile(&cluster, n, TABLE)))
        .collect();
    let _ = writeln!(
        out,
        "weft demo: {} pods on {} nodes, {} policies",
        cluster.pods.len(),
        nodes.len(),
        cluster.policies.len()
    );
    for p in cluster.policies.values() {
        let dirs: Vec<&str> = Direction::ALL
            .into_iter()
            .filter(|d| p.rules(*d).is_some())
            .map(|d| d.api_name())
            .collect();
        let _ = writeln!(
            out,
            "  policy {} selects {{{}}}, isolates {}",
            p.key,
            p.subject,
            dirs.join("+")
        );
    }
    for (node, rs) in &tables {
        let _ = writeln!(out, "\n# nft list table inet {TABLE}   (on {node})\n{rs}");
    }
    let pods: Vec<&Pod> = cluster.pods.values().collect();
    let mut disagreements = Vec::new();
    for port in [8080u16, 5432] {
        let _ = writeln!(
            out,
            "connectivity, TCP port {port} ('.' connects, 'X' blocked; rows are clients):"
        );
        let width = pods
            .iter()
            .map(|p| p.key.to_string().len())
            .max()
            .unwrap_or(0);
        let _ = write!(out, "{:width$}", "");
        for (i, _) in pods.iter().enumerate() {
            let _ = write!(out, " {i}");
        }
        let _ = writeln!(out);
        for (i, src) in pods.iter().enumerate() {
            let _ = write!(out, "{:width$}", src.key.to_string());
            for dst in &pods {
                if src.key == dst.key {
                    let _ = write!(out, " -");
                    continue;
                }
                let sim = simulated(&cluster, &tables, src, dst, port);
                let conn = Connection {
                    src: src.ips[0],
                    dst: dst.ips[0],
                    protocol: Protocol::Tcp,
                    port,
                };
                if sim != eval::allowed(&cluster, &conn) {
                    disagreements.push(format!("{} -> {}:{port}", src.key, dst.key));
                }
                let _ = write!(out, " {}", if sim { '.' } else { 'X' });
            }
            let _ = writeln!(out, "   {i}");
        }
        let _ = writeln!(out);
    }
    if disagreements.is_empty() {
        let _ = writeln!(
            out,
            "every cell: the simulated ruleset agrees with the policy evaluator."
        );
        Ok(out)
    } else {
        Err(format!(
            "{out}\nsimulator and evaluator disagree on: {}",
            disagreements.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_agrees_with_the_evaluator_and_shows_what_the_policies_mean() {
        let text = run().expect("demo must be self-consistent");
        assert!(text.contains("chain pol-"), "prints the ruleset");
        let cluster = shop();
        let ip = |k: &str| {
            cluster.pods
                [&ObjectKey::new(k.split('/').next().unwrap(), k.split('/').nth(1).unwrap())]
                .ips[0]
        };
        let allowed = |a: &str, b: &str, port| {
            eval::allowed(
                &cluster,
                &Connection {
                    src: ip(a),
                    dst: ip(b),
                    protocol: Protocol::Tcp,
                    port,
                },
            )
        };
        assert!(
            allowed("clients/ui", "shop/api", 8080),
            "named port http from ui"
        );
        assert!(
            !allowed("shop/admin", "shop/api", 8080),
            "admin is in the except"
        );
        assert!(
            allowed("shop/api", "shop/db", 5432),
            "named port pg from api"
        );
        assert!(
            !allowed("shop/db", "shop/api", 8080),
            "db has default-deny egress"
        );
        assert!(
            !allowed("clients/batch", "clients/ui", 8080),
            "batch may only reach api"
        );
        assert!(
            allowed("clients/batch", "shop/api", 8080),
            "batch reaches api from node-2's /24"
        );
    }
}
