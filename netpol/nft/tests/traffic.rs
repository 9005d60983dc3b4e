//! Real packets through weft's table while it changes (issue 4, "Traffic").
//!
//! A "node" namespace routes between two client pods and a server pod (veths `weftp*`, see
//! `common/lab.rs`) and carries weft's table, written by an [`Engine`] over a hand-built
//! [`Cluster`] through the real backend ([`NftThread`] in that namespace). Probers in the client
//! namespaces send TCP connects and UDP requests to the server, IPv4 and IPv6, each from a
//! new source port (so no conntrack entry ever carries a probe), while the test performs 100
//! rounds of pod relabels, namespace relabels, policy create/update/delete and adopt-restarts
//! (the engine and backend dropped, a new `Engine::from_cluster` + `NftThread`, `resync(dump)`).
//!
//! Judging: every commit is recorded as (sent, acknowledged, expected verdict per pair), the
//! verdicts from `weft_netpol::eval::allowed` over the model. A probe is judged against the
//! last commit the kernel acknowledged before the probe started. A probe whose interval
//! overlaps a commit in flight (from its send to its ack) straddles a commit: it is counted as
//! transitional and printed, not scored. Every scored probe must match: zero wrong results.
//!
//! Bounded: 100 rounds of 300-500 ms, the whole test under 60 s; probes time out after 200 ms.
//! Without root it prints SKIPPED.

mod common;
#[path = "common/lab.rs"]
mod lab;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lab::{Lab, Reach, StopOnDrop};
use weft_netpol::diff::Op;
use weft_netpol::engine::{Change, Engine};
use weft_netpol::eval::{Connection, allowed};
use weft_netpol::model::{
    Cluster, ContainerPort, Namespace, NamespaceScope, ObjectKey, Peer, Pod, PodSelection, Policy,
    PolicyRule, PortSpec, ip_block,
};
use weft_netpol::ruleset::{Protocol, TABLE_NAME};
use weft_netpol::selector::LabelSelector;
use weft_netpol::synth::{Rng, apply_change};
use weft_nft::NftThread;

const NODE: &str = "node-under-test";
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
const ROUNDS: usize = 100;
const BUDGET: Duration = Duration::from_secs(60);

/// Host numbers: client 1, client 2, server.
const HOSTS: [u8; 3] = [11, 12, 13];
const C1: usize = 0;
const C2: usize = 1;
const SRV: usize = 2;

// ---- the cluster -------------------------------------------------------------------------

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(lab: &Lab, i: usize, ns: &str, name: &str, role: &str) -> Pod {
    let ports = if i == SRV {
        vec![
            ContainerPort {
                name: Some("web".into()),
                port: TCP_PORT,
                protocol: Protocol::Tcp,
            },
            ContainerPort {
                name: Some("dns".into()),
                port: UDP_PORT,
                protocol: Protocol::Udp,
            },
        ]
    } else {
        Vec::new()
    };
    Pod {
        key: ObjectKey::new(ns, name),
        uid: format!("uid-{name}"),
        labels: labels(&[("pod", name), ("role", role)]),
        ips: vec![lab.pods[i].ip(false), lab.pods[i].ip(true)],
        node: NODE.into(),
        ports,
        host_network: false,
        terminated: false,
    }
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

fn anywhere(pods: LabelSelector) -> Peer {
    Peer::Pods(PodSelection {
        namespaces: NamespaceScope::Selected(LabelSelector::everything()),
        pods,
    })
}

fn policy(ns: &str, name: &str, subject: (&str, &str)) -> Policy {
    Policy {
        key: key(ns, name),
        uid: format!("uid-{ns}-{name}"),
        subject: LabelSelector::from_labels([subject]),
        ingress: None,
        egress: None,
        errors: Vec::new(),
    }
}

fn tcp(first: u16, last: u16) -> PortSpec {
    PortSpec::Numbers {
        protocol: Protocol::Tcp,
        first,
        last,
    }
}

fn udp(port: u16) -> PortSpec {
    PortSpec::Numbers {
        protocol: Protocol::Udp,
        first: port,
        last: port,
    }
}

const ALLOW_IN_VARIANTS: usize = 6;

/// `srv/allow-in`, selecting the server, in one of its variants.
fn allow_in(variant: usize) -> Policy {
    let mut p = policy("srv", "allow-in", ("app", "server"));
    let friends = anywhere(LabelSelector::from_labels([("role", "allowed")]));
    let rule = match variant {
        // role=allowed from any namespace, TCP 8080 and UDP 5353.
        0 => PolicyRule {
            peers: Some(vec![friends]),
            ports: Some(vec![tcp(TCP_PORT, TCP_PORT), udp(UDP_PORT)]),
        },
        // The same peers, TCP by the named port "web" only.
        1 => PolicyRule {
            peers: Some(vec![friends]),
            ports: Some(vec![PortSpec::Named {
                protocol: Protocol::Tcp,
                name: "web".into(),
            }]),
        },
        // UDP by the named port "dns", and a TCP range that misses 8080.
        2 => PolicyRule {
            peers: Some(vec![friends]),
            ports: Some(vec![
                PortSpec::Named {
                    protocol: Protocol::Udp,
                    name: "dns".into(),
                },
                tcp(9000, 9100),
            ]),
        },
        // ipBlocks: IPv4 without client 2, IPv6 without client 1; every port.
        3 => PolicyRule {
            peers: Some(vec![
                Peer::Block(ip_block("10.244.0.0/16", &["10.244.0.12/32".into()]).unwrap()),
                Peer::Block(ip_block("fd00:10:244::/48", &["fd00:10:244::b/128".into()]).unwrap()),
            ]),
            ports: None,
        },
        // Every pod of a namespace labelled team=blue, any TCP or UDP port.
        4 => PolicyRule {
            peers: Some(vec![Peer::Pods(PodSelection {
                namespaces: NamespaceScope::Selected(LabelSelector::from_labels([(
                    "team", "blue",
                )])),
                pods: LabelSelector::everything(),
            })]),
            ports: Some(vec![
                PortSpec::AllPorts(Protocol::Tcp),
                PortSpec::AllPorts(Protocol::Udp),
            ]),
        },
        // Isolated, nothing allowed.
        _ => {
            p.ingress = Some(Vec::new());
            return p;
        }
    };
    p.ingress = Some(vec![rule]);
    p
}

const C1_EGRESS_VARIANTS: usize = 3;

/// `ns-a/c1-egress`, selecting client 1.
fn c1_egress(variant: usize) -> Policy {
    let mut p = policy("ns-a", "c1-egress", ("pod", "c1"));
    let rule = match variant {
        // To the server, UDP only.
        0 => PolicyRule {
            peers: Some(vec![anywhere(LabelSelector::from_labels([(
                "app", "server",
            )]))]),
            ports: Some(vec![udp(UDP_PORT)]),
        },
        // To the server's IPv4 address, TCP 8080 only.
        1 => PolicyRule {
            peers: Some(vec![Peer::Block(ip_block("10.244.0.13/32", &[]).unwrap())]),
            ports: Some(vec![tcp(TCP_PORT, TCP_PORT)]),
        },
        // Anywhere, any TCP port.
        _ => PolicyRule {
            peers: None,
            ports: Some(vec![PortSpec::AllPorts(Protocol::Tcp)]),
        },
    };
    p.egress = Some(vec![rule]);
    p
}

/// `ns-b/c2-deny`: client 2 may send nothing.
fn c2_deny() -> Policy {
    let mut p = policy("ns-b", "c2-deny", ("pod", "c2"));
    p.egress = Some(Vec::new());
    p
}

fn namespace(name: &str, team: &str) -> Namespace {
    Namespace::new(name, labels(&[("team", team)]))
}

fn initial_cluster(lab: &Lab) -> Cluster {
    let mut c = Cluster::default();
    for ns in [
        namespace("ns-a", "blue"),
        namespace("ns-b", "red"),
        namespace("srv", "green"),
    ] {
        c.namespaces.insert(ns.name.clone(), ns);
    }
    for p in [
        pod(lab, C1, "ns-a", "c1", "allowed"),
        pod(lab, C2, "ns-b", "c2", "other"),
        pod(lab, SRV, "srv", "server", "server"),
    ] {
        let mut p = p;
        if p.key.name == "server" {
            p.labels.insert("app".into(), "server".into());
        }
        c.pods.insert(p.key.clone(), p);
    }
    let p = allow_in(0);
    c.policies.insert(p.key.clone(), p);
    c
}

/// One change of a round, from the current model.
fn mutation(kind: usize, rng: &mut Rng, c: &Cluster) -> (Change, String) {
    let flip = |name: &str, ns: &str| {
        let mut p = c.pods[&key(ns, name)].clone();
        let role = if p.labels["role"] == "allowed" {
            "other"
        } else {
            "allowed"
        };
        p.labels.insert("role".into(), role.into());
        (Change::UpsertPod(p), format!("relabel {name} role={role}"))
    };
    let allow_in_key = key("srv", "allow-in");
    match kind {
        0 => flip("c1", "ns-a"),
        1 => flip("c2", "ns-b"),
        2 => {
            let v = rng.below(ALLOW_IN_VARIANTS);
            (
                Change::UpsertPolicy(allow_in(v)),
                format!("update srv/allow-in to variant {v}"),
            )
        }
        3 => {
            let k = key("ns-b", "c2-deny");
            if c.policies.contains_key(&k) {
                (Change::DeletePolicy(k), "delete ns-b/c2-deny".into())
            } else {
                (
                    Change::UpsertPolicy(c2_deny()),
                    "create ns-b/c2-deny".into(),
                )
            }
        }
        4 => {
            if c.policies.contains_key(&allow_in_key) {
                (
                    Change::DeletePolicy(allow_in_key),
                    "delete srv/allow-in".into(),
                )
            } else {
                let v = rng.below(ALLOW_IN_VARIANTS);
                (
                    Change::UpsertPolicy(allow_in(v)),
                    format!("create srv/allow-in variant {v}"),
                )
            }
        }
        5 => {
            let team = if c.namespaces["ns-b"].labels["team"] == "blue" {
                "red"
            } else {
                "blue"
            };
            (
                Change::UpsertNamespace(namespace("ns-b", team)),
                format!("relabel namespace ns-b team={team}"),
            )
        }
        _ => {
            let k = key("ns-a", "c1-egress");
            let v = rng.below(C1_EGRESS_VARIANTS + 1);
            if v == C1_EGRESS_VARIANTS && c.policies.contains_key(&k) {
                (Change::DeletePolicy(k), "delete ns-a/c1-egress".into())
            } else {
                let v = v % C1_EGRESS_VARIANTS;
                (
                    Change::UpsertPolicy(c1_egress(v)),
                    format!("upsert ns-a/c1-egress variant {v}"),
                )
            }
        }
    }
}

// ---- probes and judging ----------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Pair {
    client: usize,
    protocol: Protocol,
    v6: bool,
}

impl Pair {
    fn name(&self) -> String {
        format!(
            "c{} -> server {} {}",
            self.client + 1,
            self.protocol.keyword(),
            if self.v6 { "v6" } else { "v4" }
        )
    }
}

fn pairs() -> Vec<Pair> {
    let mut v = Vec::new();
    for client in [C1, C2] {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            for v6 in [false, true] {
                v.push(Pair {
                    client,
                    protocol,
                    v6,
                });
            }
        }
    }
    v
}

struct Commit {
    sent: Instant,
    acked: Instant,
    verdicts: Vec<bool>,
    what: String,
}

struct Probe {
    pair: usize,
    start: Instant,
    end: Instant,
    reach: Reach,
}

/// Runs probes of one pair, one after another, each from a new source port, until `stop`.
fn prober(
    lab: &Lab,
    pair_index: usize,
    pair: Pair,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> std::thread::JoinHandle<Vec<Probe>> {
    let src_ip = lab.pods[pair.client].ip(pair.v6);
    let dst_ip = lab.pods[SRV].ip(pair.v6);
    lab::spawn_in(&lab.pods[pair.client].ns, move || {
        let mut out = Vec::new();
        let mut rng = Rng::new(pair_index as u64 + 1);
        for port in 10_000u16..65_000 {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let src = SocketAddr::new(src_ip, port);
            let start = Instant::now();
            let reach = match pair.protocol {
                Protocol::Tcp => {
                    lab::tcp_probe(src, SocketAddr::new(dst_ip, TCP_PORT), PROBE_TIMEOUT)
                }
                _ => lab::udp_probe(src, SocketAddr::new(dst_ip, UDP_PORT), PROBE_TIMEOUT),
            };
            let end = Instant::now();
            match reach {
                Ok(reach) => out.push(Probe {
                    pair: pair_index,
                    start,
                    end,
                    reach,
                }),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("probe {}: {e}", pair.name()),
            }
            std::thread::sleep(Duration::from_millis(2 + rng.below(4) as u64));
        }
        out
    })
}

/// Before weft's table exists: every pair answers (neighbours resolved, servers up).
fn wait_until_routed(lab: &Lab) {
    let mut checks = Vec::new();
    for client in [C1, C2] {
        for v6 in [false, true] {
            let src_ip = lab.pods[client].ip(v6);
            let dst = SocketAddr::new(lab.pods[SRV].ip(v6), UDP_PORT);
            checks.push(lab::spawn_in(&lab.pods[client].ns, move || {
                for attempt in 0..50u16 {
                    let src = SocketAddr::new(src_ip, 9000 + attempt);
                    if lab::udp_probe(src, dst, Duration::from_millis(100)).unwrap()
                        == Reach::Reached
                    {
                        return true;
                    }
                }
                false
            }));
        }
    }
    for c in checks {
        assert!(c.join().unwrap(), "the lab does not route between pods");
    }
}

// ---- the driver -------------------------------------------------------------------------------

#[derive(Default)]
struct Stats {
    rounds: BTreeMap<&'static str, usize>,
    commits: usize,
    unchanged_rounds: usize,
    messages: usize,
    element_messages: usize,
    adopts_clean: usize,
    adopts_after_drift: usize,
    drift_messages: usize,
}

struct Driver {
    netns: PathBuf,
    cluster: Cluster,
    engine: Option<Engine>,
    nft: Option<NftThread>,
    conns: Vec<Connection>,
    timeline: Vec<Commit>,
    stats: Stats,
}

impl Driver {
    fn expected(&self) -> Vec<bool> {
        self.conns
            .iter()
            .map(|c| allowed(&self.cluster, c))
            .collect()
    }

    fn engine(&mut self) -> &mut Engine {
        self.engine.as_mut().expect("engine running")
    }

    /// Applies ops in one transaction and records the commit. Returns messages sent.
    fn commit(&mut self, ops: Vec<Op>, what: &str) -> usize {
        if ops.is_empty() {
            return 0;
        }
        let verdicts = self.expected();
        let nft = self.nft.as_ref().expect("backend running");
        let sent = Instant::now();
        let report = nft
            .apply(TABLE_NAME, ops)
            .unwrap_or_else(|e| panic!("{what}: the kernel refused the batch: {e}"));
        let acked = Instant::now();
        assert_eq!(report.acks, report.messages, "{what}");
        self.stats.commits += 1;
        self.stats.messages += report.messages;
        self.stats.element_messages += report.element_messages;
        self.timeline.push(Commit {
            sent,
            acked,
            verdicts,
            what: what.to_string(),
        });
        report.messages
    }

    /// One change to the model, the engine and the kernel; pending deletes in a second batch.
    fn change(&mut self, change: Change, what: &str) {
        apply_change(&mut self.cluster, &change);
        let ops = self.engine().apply(change);
        self.commit(ops, what);
        let ops = self.engine().pending_ops();
        self.commit(ops, &format!("{what} (pending deletes)"));
    }

    /// Drops engine and backend, starts new ones over the model, adopts the kernel's table.
    /// Returns the messages the adoption wrote.
    fn restart(&mut self, what: &str) -> usize {
        drop(self.nft.take());
        drop(self.engine.take());
        let mut engine = Engine::from_cluster(self.cluster.clone(), NODE, TABLE_NAME);
        let nft = NftThread::spawn_in_netns(&self.netns).expect("backend in the node namespace");
        let current = nft.dump(TABLE_NAME).expect("dump");
        let ops = engine.resync(current.as_ref());
        self.engine = Some(engine);
        self.nft = Some(nft);
        let mut written = self.commit(ops, what);
        let ops = self.engine().pending_ops();
        written += self.commit(ops, &format!("{what} (pending deletes)"));
        written
    }

    /// The kernel holds exactly the desired table (checked over netlink).
    fn check_kernel(&mut self, round: usize) {
        let engine = self.engine.as_ref().expect("engine running");
        assert!(engine.pending().chains.is_empty() && engine.pending().sets.is_empty());
        let got = self
            .nft
            .as_ref()
            .expect("backend running")
            .dump(TABLE_NAME)
            .expect("dump");
        assert!(
            got.as_ref() == Some(engine.desired()),
            "round {round}: the kernel differs from the desired table"
        );
    }
}

#[test]
fn probes_match_the_last_acknowledged_state_through_100_rounds_of_changes() {
    need_root!();
    let began = Instant::now();
    let deadline = began + BUDGET;
    let lab = Lab::new(&HOSTS);
    let stop = Arc::new(AtomicBool::new(false));
    // Dropped before `lab` (reverse order): servers and probers stop, also on a panic.
    let _stop_guard = StopOnDrop(stop.clone());
    let servers = lab::start_servers(&lab.pods[SRV].ns, TCP_PORT, UDP_PORT, stop.clone());
    wait_until_routed(&lab);

    let pairs = pairs();
    let cluster = initial_cluster(&lab);
    let conns: Vec<Connection> = pairs
        .iter()
        .map(|p| Connection {
            src: lab.pods[p.client].ip(p.v6),
            dst: lab.pods[SRV].ip(p.v6),
            protocol: p.protocol,
            port: if p.protocol == Protocol::Tcp {
                TCP_PORT
            } else {
                UDP_PORT
            },
        })
        .collect();
    let mut d = Driver {
        netns: lab.node.path(),
        cluster,
        engine: None,
        nft: None,
        conns,
        timeline: Vec::new(),
        stats: Stats::default(),
    };
    let written = d.restart("initial sync");
    assert!(written > 0, "the initial sync writes the table");
    d.check_kernel(0);

    let probers: Vec<_> = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| prober(&lab, i, *p, stop.clone(), deadline))
        .collect();

    let mut rng = Rng::new(0x07ea_1f1c);
    let kinds: [&str; 9] = [
        "relabel c1",
        "relabel c2",
        "update srv/allow-in",
        "create/delete ns-b/c2-deny",
        "create/delete srv/allow-in",
        "relabel namespace ns-b",
        "create/update/delete ns-a/c1-egress",
        "adopt-restart, nothing changed",
        "adopt-restart after a change while down",
    ];
    std::thread::sleep(Duration::from_millis(300));
    for round in 1..=ROUNDS {
        assert!(
            Instant::now() + Duration::from_secs(2) < deadline,
            "round {round}: out of the {BUDGET:?} budget"
        );
        let kind = (round - 1) % kinds.len();
        *d.stats.rounds.entry(kinds[kind]).or_default() += 1;
        match kind {
            7 => {
                let written = d.restart(&format!("round {round}: adopt-restart"));
                assert_eq!(
                    written, 0,
                    "round {round}: adopting an unchanged kernel must write nothing"
                );
                d.stats.adopts_clean += 1;
            }
            8 => {
                drop(d.nft.take());
                drop(d.engine.take());
                let (change, what) = mutation(rng.below(7), &mut rng, &d.cluster);
                apply_change(&mut d.cluster, &change);
                let written = d.restart(&format!("round {round}: adopt after '{what}'"));
                d.stats.adopts_after_drift += 1;
                d.stats.drift_messages += written;
            }
            _ => {
                let (change, what) = mutation(kind, &mut rng, &d.cluster);
                let before = d.stats.commits;
                d.change(change, &format!("round {round}: {what}"));
                if d.stats.commits == before {
                    d.stats.unchanged_rounds += 1;
                }
            }
        }
        d.check_kernel(round);
        std::thread::sleep(Duration::from_millis(300 + rng.below(200) as u64));
    }
    stop.store(true, Ordering::SeqCst);
    let probes: Vec<Probe> = probers
        .into_iter()
        .flat_map(|h| h.join().expect("prober"))
        .collect();
    for s in servers {
        s.join().expect("server");
    }

    // Judge.
    let t0 = began;
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    let (mut allowed_ok, mut denied_ok, mut transitional, mut errors) = (0, 0, 0, 0);
    let mut wrong = Vec::new();
    let mut per_pair = vec![[0usize; 3]; pairs.len()];
    let mut transitional_lines = Vec::new();
    for p in &probes {
        if let Reach::Error(_) = p.reach {
            errors += 1;
        }
        let reached = p.reach == Reach::Reached;
        let straddled: Vec<&Commit> = d
            .timeline
            .iter()
            .filter(|c| c.sent <= p.end && c.acked >= p.start)
            .collect();
        if !straddled.is_empty() {
            transitional += 1;
            per_pair[p.pair][2] += 1;
            transitional_lines.push(format!(
                "  {:>9.1}-{:>9.1} ms {:<22} {:<9} straddles {}",
                ms(p.start),
                ms(p.end),
                pairs[p.pair].name(),
                if reached { "reached" } else { "blocked" },
                straddled
                    .iter()
                    .map(|c| c.what.as_str())
                    .collect::<Vec<_>>()
                    .join(" + ")
            ));
            continue;
        }
        let base = d
            .timeline
            .iter()
            .rev()
            .find(|c| c.acked < p.start)
            .expect("probes start after the initial sync");
        let expected = base.verdicts[p.pair];
        if expected == reached {
            if expected {
                allowed_ok += 1;
                per_pair[p.pair][0] += 1;
            } else {
                denied_ok += 1;
                per_pair[p.pair][1] += 1;
            }
        } else {
            wrong.push(format!(
                "  {:>9.1}-{:>9.1} ms {}: expected {}, got {:?}; last ack: {} at {:.1} ms",
                ms(p.start),
                ms(p.end),
                pairs[p.pair].name(),
                if expected { "allowed" } else { "denied" },
                p.reach,
                base.what,
                ms(base.acked)
            ));
        }
    }

    println!("rounds: {:?}", d.stats.rounds);
    println!(
        "commits: {} ({} messages, {} element messages; {} changes needed no kernel write); adopt-restarts: {} with nothing changed (0 writes each), {} after a change while down ({} messages)",
        d.stats.commits,
        d.stats.messages,
        d.stats.element_messages,
        d.stats.unchanged_rounds,
        d.stats.adopts_clean,
        d.stats.adopts_after_drift,
        d.stats.drift_messages
    );
    println!("transitional probes (not scored):");
    for l in &transitional_lines {
        println!("{l}");
    }
    println!("per pair (scored allowed ok, scored denied ok, transitional):");
    for (i, p) in pairs.iter().enumerate() {
        println!("  {:<22} {:?}", p.name(), per_pair[i]);
    }
    println!(
        "probes: {}; scored allowed ok: {allowed_ok}, scored denied ok: {denied_ok}, transitional: {transitional}, wrong: {}; probe errors (not timeouts): {errors}; {:.1} s",
        probes.len(),
        wrong.len(),
        began.elapsed().as_secs_f64()
    );
    for w in &wrong {
        println!("WRONG {w}");
    }
    assert!(wrong.is_empty(), "{} wrong probe results", wrong.len());
    assert!(
        allowed_ok > 100 && denied_ok > 100,
        "too few scored probes to mean anything"
    );
    for (i, p) in pairs.iter().enumerate() {
        assert!(
            per_pair[i][0] > 0 && per_pair[i][1] > 0,
            "{} was never scored both allowed and denied",
            p.name()
        );
    }
    assert!(began.elapsed() < BUDGET, "over budget");
}
