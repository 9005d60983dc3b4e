//! Conntrack in the agent: the flags for marks, strict mode and the drop log, and the strict
//! mode pass itself.
//!
//! **Marks** (on by default): every policy rule that accepts a new connection writes its
//! node-local rule id into a field of the connection's conntrack mark (ingress field at
//! `--ct-mark-shift`, egress field right above it, `--ct-mark-bits` each; other bits are never
//! touched). Id 0 in a field: no rule of this node admitted that direction (not isolated, the
//! other end's node judged it, or traffic between a pod and its own node). `weft flows`
//! decodes marks with the rule comments of the kernel's table (`… id=N`).
//!
//! **Default mode**: established connections keep going after a policy change (DESIGN §2).
//! **Strict mode** (`--strict-conntrack`): after every reconcile that changed the kernel's
//! table, the agent reads the conntrack table, judges each TCP/UDP/SCTP entry that involves a
//! local pod with the policy evaluator (what this node enforces: egress of its source pods,
//! ingress of its destination pods), and deletes, one by one by tuple and kernel id, those the
//! policies no longer admit. Never a flush. Entries of the node's own addresses are left alone
//! (pod ↔ own node is always allowed), as are other protocols (ICMP entries expire in 30 s).
//!
//! **Drop log** (`--log-drops`): a rate-limited `log group N` before each group chain's drop;
//! [`super::drops`] keeps the recent ones for `weft status --drops`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Instant;

use tracing::{info, warn};
use weft_netpol::compile::{DropLog, MarkLayout, Observability};
use weft_netpol::model::Cluster;
use weft_nft::conntrack::{self, Conntrack, Entry};

/// The agent's flags for conntrack marks, strict mode and the drop log.
#[derive(clap::Args, Clone, Debug)]
pub struct FlowArgs {
    /// Bit position of the ingress rule-id field in the conntrack mark; the egress field
    /// starts right above it. Other mark bits are never touched.
    #[arg(long, env = "WEFT_CT_MARK_SHIFT", default_value_t = 8)]
    pub ct_mark_shift: u32,
    /// Bits of each rule-id field (ids 1 to 2^bits - 1); 0: accept rules write no mark.
    #[arg(long, env = "WEFT_CT_MARK_BITS", default_value_t = 12)]
    pub ct_mark_bits: u32,
    /// Strict conntrack mode: after a policy change, delete the conntrack entries the
    /// policies no longer admit (by tuple, never a flush). Default: established flows keep
    /// going.
    #[arg(long, env = "WEFT_STRICT_CONNTRACK")]
    pub strict_conntrack: bool,
    /// Log denied new connections (rate-limited, to an nflog group the agent listens on;
    /// `weft status --drops` shows them).
    #[arg(long, env = "WEFT_LOG_DROPS")]
    pub log_drops: bool,
    /// nflog group of the drop log.
    #[arg(long, env = "WEFT_LOG_DROPS_GROUP", default_value_t = 5)]
    pub log_drops_group: u16,
    /// Denied connections logged per second and group chain (burst: 5).
    #[arg(long, env = "WEFT_LOG_DROPS_RATE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub log_drops_rate: u64,
}

/// The modes in force, as `/debug/state` (and `weft status`) report them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Modes {
    /// Conntrack mark fields `(shift, bits)`: ingress ids from bit `shift`, egress ids right
    /// above; `None`: accept rules write no mark.
    pub ct_marks: Option<(u32, u32)>,
    /// Strict conntrack mode.
    pub strict_conntrack: bool,
    /// The drop log's nflog group and rate (per second and group chain), when on.
    pub log_drops: Option<(u16, u64)>,
}

impl FlowArgs {
    /// The modes these flags select.
    pub fn modes(&self) -> Modes {
        Modes {
            ct_marks: (self.ct_mark_bits > 0).then_some((self.ct_mark_shift, self.ct_mark_bits)),
            strict_conntrack: self.strict_conntrack,
            log_drops: self
                .log_drops
                .then_some((self.log_drops_group, self.log_drops_rate)),
        }
    }

    /// What the compiler writes, from the flags.
    pub fn observability(&self) -> Result<Observability, String> {
        let marks = match self.ct_mark_bits {
            0 => None,
            bits => Some(MarkLayout::new(self.ct_mark_shift, bits)?),
        };
        Ok(Observability {
            marks,
            drop_log: self.log_drops.then_some(DropLog {
                group: self.log_drops_group,
                rate_per_second: self.log_drops_rate,
                burst: weft_netpol::ruleset::DEFAULT_LIMIT_BURST,
            }),
        })
    }
}

/// The node's own addresses (pod ↔ own node traffic never crosses the forward hook and is
/// always allowed): IPv4 from `/proc/net/fib_trie` (`/32 host LOCAL`), IPv6 from
/// `/proc/net/if_inet6`.
pub fn node_addresses() -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    if let Ok(trie) = std::fs::read_to_string("/proc/net/fib_trie") {
        let mut last: Option<IpAddr> = None;
        for line in trie.lines() {
            let t = line.trim_start();
            if let Some(addr) = t.strip_prefix("|-- ").or_else(|| t.strip_prefix("+-- ")) {
                last = addr.split('/').next().and_then(|a| a.parse().ok());
            } else if t.starts_with("/32 host LOCAL")
                && let Some(a) = last
            {
                out.insert(a);
            }
        }
    }
    if let Ok(v6) = std::fs::read_to_string("/proc/net/if_inet6") {
        for line in v6.lines() {
            let hex = line.split_whitespace().next().unwrap_or("");
            if let Ok(n) = u128::from_str_radix(hex, 16)
                && hex.len() == 32
            {
                out.insert(IpAddr::V6(Ipv6Addr::from(n)));
            }
        }
    }
    out
}

/// Whether this node's policies still admit a conntrack entry (weft-nft's strict-mode judge);
/// `None`: not for strict mode to judge (another protocol, the node's own traffic).
pub fn judge(cluster: &Cluster, node: &str, own: &BTreeSet<IpAddr>, e: &Entry) -> Option<bool> {
    conntrack::node_admits_entry(cluster, node, own, e)
}

/// Strict mode: one purge pass after each reconcile that changed the kernel.
#[derive(Debug, Default)]
pub struct Strict {
    /// Passes that failed in a row (logged once per streak).
    failing: u32,
}

impl Strict {
    /// Strict mode on.
    pub fn new() -> Strict {
        Strict::default()
    }

    /// Deletes the entries `cluster`'s policies no longer admit on `node`. Failures are
    /// logged and leave enforcement alone: only established flows outlive their policy.
    /// The ctnetlink socket is opened per pass (it is not `Send`; the controller moves).
    pub fn after_apply(&mut self, cluster: &Cluster, node: &str) -> Result<usize, ()> {
        let started = Instant::now();
        let own = node_addresses();
        let result = Conntrack::open()
            .and_then(|mut ct| conntrack::purge(&mut ct, |e| judge(cluster, node, &own, e)));
        match result {
            Ok(report) => {
                self.failing = 0;
                for t in &report.deleted {
                    info!(flow = %t, proto = t.proto, "strict conntrack: deleted a flow the policies no longer admit");
                }
                if !report.deleted.is_empty() || report.gone > 0 {
                    info!(
                        seen = report.seen,
                        judged = report.judged,
                        deleted = report.deleted.len(),
                        already_gone = report.gone,
                        ms = started.elapsed().as_millis() as u64,
                        "strict conntrack pass"
                    );
                }
                Ok(report.deleted.len())
            }
            Err(e) => {
                if self.failing == 0 {
                    warn!(error = %e, "strict conntrack pass failed: flows of tightened policies keep going until a later pass succeeds (runs after every change)");
                }
                self.failing += 1;
                Err(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_make_the_documented_layout_and_refuse_what_does_not_fit() {
        let args = |shift, bits, log| FlowArgs {
            ct_mark_shift: shift,
            ct_mark_bits: bits,
            strict_conntrack: false,
            log_drops: log,
            log_drops_group: 5,
            log_drops_rate: 10,
        };
        let o = args(8, 12, false).observability().unwrap();
        assert_eq!(o, Observability::default());
        assert_eq!(args(0, 0, false).observability().unwrap().marks, None);
        assert!(args(20, 8, false).observability().is_err());
        let log = args(8, 12, true).observability().unwrap().drop_log.unwrap();
        assert_eq!((log.group, log.rate_per_second, log.burst), (5, 10, 5));
    }

    #[test]
    fn strict_mode_judges_only_pod_flows_of_port_protocols() {
        use std::collections::BTreeMap;
        use weft_netpol::model::{Namespace, ObjectKey, Pod, Policy, PolicyRule};
        use weft_netpol::selector::LabelSelector;
        use weft_nft::conntrack::Tuple;
        let mut c = Cluster::default();
        c.namespaces
            .insert("app".into(), Namespace::new("app", BTreeMap::new()));
        for (name, ip, node) in [("a", "10.244.0.2", "n1"), ("s", "10.244.0.3", "n1")] {
            let p = Pod {
                key: ObjectKey::new("app", name),
                uid: name.into(),
                labels: [("role".to_string(), name.to_string())].into(),
                ips: vec![ip.parse().unwrap()],
                node: node.into(),
                ports: vec![],
                host_network: false,
                terminated: false,
            };
            c.pods.insert(p.key.clone(), p);
        }
        // s isolated for ingress, nothing allowed.
        let deny = Policy {
            key: ObjectKey::new("app", "deny"),
            uid: "d".into(),
            subject: LabelSelector::from_labels([("role", "s")]),
            ingress: Some(Vec::<PolicyRule>::new()),
            egress: None,
            errors: vec![],
        };
        c.policies.insert(deny.key.clone(), deny);
        let entry = |src: &str, dst: &str, proto: u8, dport: Option<u16>| {
            let (src, dst) = (src.parse().unwrap(), dst.parse().unwrap());
            let orig = Tuple {
                src,
                dst,
                proto,
                sport: dport.map(|_| 40000),
                dport,
            };
            Entry {
                orig,
                reply: Tuple {
                    src: dst,
                    dst: src,
                    proto,
                    sport: dport,
                    dport: orig.sport,
                },
                mark: 0,
                id: 1,
                zone: 0,
                status: 0,
                timeout: None,
                tcp_state: None,
            }
        };
        let own: BTreeSet<IpAddr> = ["10.244.0.1".parse().unwrap()].into();
        let a_to_s = entry("10.244.0.2", "10.244.0.3", 6, Some(80));
        let s_to_a = entry("10.244.0.3", "10.244.0.2", 17, Some(53));
        let node_to_s = entry("10.244.0.1", "10.244.0.3", 6, Some(80));
        let icmp = entry("10.244.0.2", "10.244.0.3", 1, None);
        assert_eq!(
            judge(&c, "n1", &own, &a_to_s),
            Some(false),
            "tightened: cut"
        );
        assert_eq!(
            judge(&c, "n1", &own, &s_to_a),
            Some(true),
            "a is not isolated"
        );
        assert_eq!(
            judge(&c, "n1", &own, &node_to_s),
            None,
            "kubelet probes stay"
        );
        assert_eq!(judge(&c, "n1", &own, &icmp), None, "no ports: not judged");
        // Another node does not enforce s's ingress.
        assert_eq!(judge(&c, "n2", &own, &a_to_s), Some(true));
    }

    #[test]
    fn the_node_has_a_loopback_address() {
        let own = node_addresses();
        assert!(own.contains(&"127.0.0.1".parse().unwrap()), "{own:?}");
    }
}
