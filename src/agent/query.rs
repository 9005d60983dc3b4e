//! Questions an operator asks the running agent: `weft explain` and `weft audit`.
//!
//! Both are answered on the controller thread, from the same model and desired table the
//! kernel is programmed from. `explain` states the API's answer (which policies isolate each
//! side, which rule admits the connection, or that none does) and cross-checks it against the
//! packet simulator walking this node's table; `audit` dumps the kernel's table and diffs it
//! against the desired one, optionally repairing the drift with that diff (never a rebuild).

use std::net::IpAddr;

use weft_netpol::Ruleset;
use weft_netpol::diff::{Op, diff};
use weft_netpol::eval::{self, Connection, DirectionVerdict};
use weft_netpol::model::{Cluster, Direction, ObjectKey, Pod, family_of};
use weft_netpol::ruleset::{Hook, Protocol};
use weft_netpol::sim::{CtInfo, Decision, Packet, simulate};

/// What the operator asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// Why is SRC → DST:PORT/PROTO allowed or denied?
    Explain {
        /// `namespace/name` or an IP address.
        src: String,
        /// `namespace/name` or an IP address.
        dst: String,
        /// Transport protocol.
        protocol: Protocol,
        /// Destination port.
        port: u16,
    },
    /// Compare the kernel's table with the desired one; `repair` applies the difference.
    Audit {
        /// Apply the difference.
        repair: bool,
    },
}

/// An answer: text for people, and whether it reports a problem (drift, a mismatch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The text.
    pub text: String,
    /// True when the answer reports drift or an inconsistency (exit code 1 in the CLI).
    pub problem: bool,
}

/// One end of a connection, resolved.
struct End<'a> {
    ip: IpAddr,
    pod: Option<&'a Pod>,
}

fn resolve<'a>(
    cluster: &'a Cluster,
    what: &str,
    family: Option<IpAddr>,
) -> Result<End<'a>, String> {
    if let Ok(ip) = what.parse::<IpAddr>() {
        return Ok(End {
            ip,
            pod: cluster.pod_by_ip(ip),
        });
    }
    let (ns, name) = what
        .split_once('/')
        .ok_or_else(|| format!("{what:?}: expected namespace/name or an IP address"))?;
    let pod = cluster
        .pods
        .get(&ObjectKey::new(ns, name))
        .ok_or_else(|| format!("no pod {what} in the agent's view of the API"))?;
    if !pod.is_member() {
        return Err(format!(
            "pod {what} takes no part in policy (host network, finished, or no IP yet)"
        ));
    }
    let ip = match family {
        Some(other) => pod.ip(family_of(other)),
        None => pod.ips.first().copied(),
    }
    .ok_or_else(|| format!("pod {what} has no address of the other end's family"))?;
    Ok(End { ip, pod: Some(pod) })
}

fn describe(end: &End<'_>) -> String {
    match end.pod {
        Some(p) => format!("{} ({}, node {})", p.key, end.ip, p.node),
        None => format!("{} (not a pod)", end.ip),
    }
}

fn verdict_text(direction: Direction, who: &str, v: &DirectionVerdict) -> String {
    let dir = direction.api_name();
    match v {
        DirectionVerdict::NotAPod => format!("{dir} of {who}: not a pod, no policy applies"),
        DirectionVerdict::NotIsolated => {
            format!("{dir} of {who}: not isolated (no policy selects it for {dir})")
        }
        DirectionVerdict::Allowed { policy, rule } => {
            format!("{dir} of {who}: allowed by {policy} {dir}[{rule}]")
        }
        DirectionVerdict::Denied { isolating } => {
            let names: Vec<String> = isolating.iter().map(ToString::to_string).collect();
            format!(
                "{dir} of {who}: DENIED: isolated by {}; no rule of theirs admits this",
                names.join(", ")
            )
        }
    }
}

/// Answers `explain` from the model and this node's desired table.
pub fn explain(
    cluster: &Cluster,
    node: &str,
    table: &Ruleset,
    src: &str,
    dst: &str,
    protocol: Protocol,
    port: u16,
) -> Result<Answer, String> {
    // Resolve names first, then pick addresses of one family for both ends.
    let src_end = resolve(cluster, src, dst.parse().ok())?;
    let dst_end = resolve(cluster, dst, Some(src_end.ip))?;
    if family_of(src_end.ip) != family_of(dst_end.ip) {
        return Err("the two ends have no address family in common".into());
    }
    let conn = Connection {
        src: src_end.ip,
        dst: dst_end.ip,
        protocol,
        port,
    };
    let judgement = eval::judge(cluster, &conn);
    let allowed = judgement.allowed();
    let mut text = format!(
        "{} -> {} {}/{port}: {}\n",
        describe(&src_end),
        describe(&dst_end),
        protocol.keyword(),
        if allowed { "ALLOWED" } else { "DENIED" }
    );
    text.push_str(&format!(
        "  {}\n  {}\n",
        verdict_text(Direction::Egress, &describe(&src_end), &judgement.egress),
        verdict_text(Direction::Ingress, &describe(&dst_end), &judgement.ingress)
    ));
    // Cross-check with this node's table, for the side(s) this node enforces.
    let local = |e: &End<'_>| e.pod.is_some_and(|p| p.node == node);
    let (src_local, dst_local) = (local(&src_end), local(&dst_end));
    let mut problem = false;
    if src_local || dst_local {
        let iface = |e: &End<'_>| {
            if local(e) {
                format!("weft-{}", e.ip)
            } else if e.pod.is_some() {
                "vxweft".to_string()
            } else {
                "uplink".to_string()
            }
        };
        let pkt = Packet {
            iif: iface(&src_end),
            oif: iface(&dst_end),
            src: conn.src,
            dst: conn.dst,
            l4proto: protocol.number(),
            dport: Some(port),
            ct: CtInfo::New,
        };
        let routes = |ip: IpAddr| -> Option<String> {
            Some(match cluster.pod_by_ip(ip) {
                Some(p) if p.node == node => format!("weft-{ip}"),
                Some(_) => "vxweft".to_string(),
                None => "uplink".to_string(),
            })
        };
        let trace = simulate(table, Hook::Forward, &pkt, &routes);
        let sim_allows = trace.verdict == Decision::Accept;
        let expected = match (src_local, dst_local) {
            (true, true) => allowed,
            (true, false) => judgement.egress.allows(),
            _ => judgement.ingress.allows(),
        };
        let by = trace
            .decided_by_comment()
            .map(|c| format!(" by the rule \"{c}\""))
            .unwrap_or_default();
        if sim_allows == expected {
            text.push_str(&format!(
                "  this node ({node}) enforces the same: the ruleset {}{by}\n",
                if sim_allows { "accepts" } else { "drops" }
            ));
        } else {
            problem = true;
            text.push_str(&format!(
                "  MISMATCH on {node}: the ruleset {}{by} but the policies say {}: please report this\n",
                if sim_allows { "accepts" } else { "drops" },
                if expected { "allow" } else { "deny" }
            ));
        }
        text.push_str("  walk through this node's table:\n");
        for line in trace.explain().lines() {
            text.push_str(&format!("    {line}\n"));
        }
    } else {
        text.push_str(&format!(
            "  neither end is on this node ({node}): ask the agent of {} or {}\n",
            src_end.pod.map_or("-", |p| p.node.as_str()),
            dst_end.pod.map_or("-", |p| p.node.as_str())
        ));
    }
    Ok(Answer { text, problem })
}

/// The drift between the kernel's table and the desired one, as ops that would repair it.
pub fn audit_ops(kernel: Option<&Ruleset>, desired: &Ruleset) -> Vec<Op> {
    diff(kernel, desired).ops
}

/// Renders an audit: clean, or every op of the repair in nft words.
pub fn audit_text(ops: &[Op], repaired: bool) -> Answer {
    if ops.is_empty() {
        return Answer {
            text: "clean: the kernel's table is exactly the desired one\n".into(),
            problem: false,
        };
    }
    let mut text = format!(
        "DRIFT: {} op(s) {} the kernel's table to the desired one:\n",
        ops.len(),
        if repaired { "brought" } else { "would bring" }
    );
    for op in ops {
        text.push_str(&format!("  {op}\n"));
    }
    Answer {
        text,
        problem: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_netpol::compile::compile;
    use weft_netpol::model::{ContainerPort, Namespace, Policy, PolicyRule};
    use weft_netpol::selector::LabelSelector;

    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        c.namespaces
            .insert("a".into(), Namespace::new("a", Default::default()));
        for (name, ip, node, app) in [
            ("web", "10.244.0.2", "n1", "web"),
            ("db", "10.244.0.3", "n1", "db"),
            ("far", "10.244.1.2", "n2", "web"),
        ] {
            let p = Pod {
                key: ObjectKey::new("a", name),
                uid: name.into(),
                labels: [("app".to_string(), app.to_string())].into(),
                ips: vec![ip.parse().unwrap()],
                node: node.into(),
                ports: vec![ContainerPort {
                    name: Some("pg".into()),
                    port: 5432,
                    protocol: Protocol::Tcp,
                }],
                host_network: false,
                terminated: false,
            };
            c.pods.insert(p.key.clone(), p);
        }
        let pol = Policy {
            key: ObjectKey::new("a", "db-from-web"),
            uid: String::new(),
            subject: LabelSelector::from_labels([("app", "db")]),
            ingress: Some(vec![PolicyRule {
                peers: Some(vec![weft_netpol::model::Peer::Pods(
                    weft_netpol::model::PodSelection {
                        namespaces: weft_netpol::model::NamespaceScope::Own("a".into()),
                        pods: LabelSelector::from_labels([("app", "web")]),
                    },
                )]),
                ports: Some(vec![weft_netpol::model::PortSpec::Named {
                    protocol: Protocol::Tcp,
                    name: "pg".into(),
                }]),
            }]),
            egress: None,
            errors: vec![],
        };
        c.policies.insert(pol.key.clone(), pol);
        c
    }

    #[test]
    fn explain_names_the_admitting_rule_and_the_isolating_policy_and_agrees_with_the_table() {
        let c = cluster();
        let table = compile(&c, "n1", "weft");
        let a = explain(&c, "n1", &table, "a/web", "a/db", Protocol::Tcp, 5432).unwrap();
        assert!(a.text.contains("ALLOWED"), "{}", a.text);
        assert!(
            a.text.contains("allowed by a/db-from-web ingress[0]"),
            "{}",
            a.text
        );
        assert!(
            a.text.contains("enforces the same: the ruleset accepts"),
            "{}",
            a.text
        );
        assert!(!a.problem);
        let d = explain(&c, "n1", &table, "a/db", "a/db", Protocol::Tcp, 80);
        assert!(d.is_ok());
        let d = explain(&c, "n1", &table, "10.244.1.2", "a/db", Protocol::Tcp, 80).unwrap();
        assert!(
            d.text.contains("DENIED: isolated by a/db-from-web"),
            "{}",
            d.text
        );
        assert!(d.text.contains("the ruleset drops"), "{}", d.text);
        assert!(!d.problem);
    }

    #[test]
    fn explain_reports_a_table_that_disagrees_with_the_policies() {
        let c = cluster();
        // A table compiled without the policy: the node would let everything through.
        let mut open = c.clone();
        open.policies.clear();
        let table = compile(&open, "n1", "weft");
        let a = explain(&c, "n1", &table, "a/far", "a/db", Protocol::Tcp, 80).unwrap();
        assert!(a.problem, "{}", a.text);
        assert!(a.text.contains("MISMATCH"));
    }

    #[test]
    fn audit_lists_the_repair_in_nft_words() {
        let c = cluster();
        let desired = compile(&c, "n1", "weft");
        let mut kernel = desired.clone();
        let set = kernel
            .sets
            .values_mut()
            .find(|s| s.def.name.starts_with("sel-"))
            .unwrap();
        set.elements.clear();
        let ops = audit_ops(Some(&kernel), &desired);
        let a = audit_text(&ops, false);
        assert!(a.problem);
        assert!(a.text.contains("add element sel-"), "{}", a.text);
        assert!(!audit_text(&audit_ops(Some(&desired), &desired), false).problem);
    }
}
