//! Conntrack marks, the flows reader, strict mode and the drop log, with real traffic
//! (issue 10, "Established flows" and "Drops are observable").
//!
//! A node namespace routes between client pods A and B and a server pod S (`common/lab.rs`,
//! namespaces `weft-ct-<pid>-<n>`) and carries weft's table, written by an [`Engine`] through
//! the real backend; S runs a TCP echo server. With no policy, A and B each open a long-lived
//! connection to S. Then a policy isolates S and admits only B:
//!
//! - **default mode**: the established A→S connection keeps echoing; a new A→S connection is
//!   refused (and counted by the group chain's drop, and logged to the nflog group once
//!   per rate); a new B→S connection is admitted and its conntrack entry carries the admitting
//!   rule's id in the ingress field of its mark, the id the rule's comment names (checked over
//!   ctnetlink and, independently, in `/proc/net/nf_conntrack`); the accept rule's counter
//!   moved (checked over netlink and with `nft -j`); adoption by a new process after all that
//!   traffic writes nothing (counter values are not content).
//! - **strict mode** (one purge pass, as the agent runs after a reconcile): the A→S entry is
//!   deleted by tuple and the connection stops echoing; both B→S connections survive.
//!
//! Bounded: every connect and read has a timeout; the whole test takes a few seconds.
//! Without root it prints SKIPPED.

mod common;
#[path = "common/lab.rs"]
mod lab;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Netns;
use lab::{Lab, StopOnDrop};
use weft_netpol::compile::{self, DropLog, MarkLayout, Observability};
use weft_netpol::engine::{Change, Engine};
use weft_netpol::model::{
    Cluster, Direction, Namespace, NamespaceScope, ObjectKey, Peer, Pod, PodSelection, Policy,
    PolicyRule, PortSpec,
};
use weft_netpol::ruleset::{Action, Protocol, Ruleset, TABLE_NAME, rule_id_from_comment};
use weft_netpol::selector::LabelSelector;
use weft_nft::NftThread;
use weft_nft::conntrack::{self, Conntrack, Entry};
use weft_nft::nflog::NflogGroup;

const NODE: &str = "node-0";
const PORT: u16 = 8080;
const HOSTS: [u8; 3] = [21, 22, 23];
const A: usize = 0;
const B: usize = 1;
const S: usize = 2;
const LOG_GROUP: u16 = 7;
const LOG_RATE: u64 = 10;
const LOG_BURST: u32 = 5;
const ECHO_WAIT: Duration = Duration::from_millis(1500);

fn observability() -> Observability {
    Observability {
        marks: Some(MarkLayout::default()),
        drop_log: Some(DropLog {
            group: LOG_GROUP,
            rate_per_second: LOG_RATE,
            burst: LOG_BURST,
        }),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn cluster(lab: &Lab) -> Cluster {
    let mut c = Cluster::default();
    c.namespaces
        .insert("app".into(), Namespace::new("app", labels(&[])));
    for (i, name) in [(A, "a"), (B, "b"), (S, "s")] {
        let p = Pod {
            key: ObjectKey::new("app", name),
            uid: format!("uid-{name}"),
            labels: labels(&[("role", name)]),
            ips: vec![lab.pods[i].ip(false), lab.pods[i].ip(true)],
            node: NODE.into(),
            ports: vec![],
            host_network: false,
            terminated: false,
        };
        c.pods.insert(p.key.clone(), p);
    }
    c
}

/// `app/only-b`: S admits TCP 8080 from B only.
fn only_b() -> Policy {
    Policy {
        key: ObjectKey::new("app", "only-b"),
        uid: "uid-only-b".into(),
        subject: LabelSelector::from_labels([("role", "s")]),
        ingress: Some(vec![PolicyRule {
            peers: Some(vec![Peer::Pods(PodSelection {
                namespaces: NamespaceScope::Own("app".into()),
                pods: LabelSelector::from_labels([("role", "b")]),
            })]),
            ports: Some(vec![PortSpec::Numbers {
                protocol: Protocol::Tcp,
                first: PORT,
                last: PORT,
            }]),
        }]),
        egress: None,
        errors: vec![],
    }
}

/// A TCP echo server in `ns` on `[::]:PORT` until `stop`.
fn echo_server(ns: &Netns, stop: Arc<AtomicBool>) {
    let (tx, rx) = std::sync::mpsc::channel();
    lab::spawn_in(ns, move || {
        let l = TcpListener::bind(("::", PORT)).expect("bind the echo server");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_millis(100)))
                            .unwrap();
                        let mut buf = [0u8; 256];
                        while !stop.load(Ordering::Relaxed) {
                            match s.read(&mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("echo server bound");
}

/// A TCP connection from pod `from` to S, opened inside the pod's namespace.
fn connect(lab: &Lab, from: usize, timeout: Duration) -> io::Result<TcpStream> {
    connect_family(lab, from, false, timeout)
}

/// [`connect`] over IPv4 or IPv6.
fn connect_family(lab: &Lab, from: usize, v6: bool, timeout: Duration) -> io::Result<TcpStream> {
    let dst = SocketAddr::new(lab.pods[S].ip(v6), PORT);
    lab::spawn_in(&lab.pods[from].ns, move || {
        TcpStream::connect_timeout(&dst, timeout)
    })
    .join()
    .expect("connect thread")
}

/// Whether the connection still carries data both ways: one message echoed within the wait.
fn echoes(s: &mut TcpStream, tag: &str) -> bool {
    s.set_read_timeout(Some(ECHO_WAIT)).unwrap();
    if s.write_all(tag.as_bytes()).is_err() {
        return false;
    }
    let mut got = vec![0u8; tag.len()];
    s.read_exact(&mut got).is_ok() && got == tag.as_bytes()
}

/// Runs `f` with a ctnetlink socket in the node namespace.
fn in_node<T: Send + 'static>(
    lab: &Lab,
    f: impl FnOnce(&mut Conntrack) -> T + Send + 'static,
) -> T {
    lab::spawn_in(&lab.node, move || {
        let mut ct = Conntrack::open().expect("ctnetlink socket in the node namespace");
        f(&mut ct)
    })
    .join()
    .expect("conntrack thread")
}

/// The node's conntrack entry of a client's connection, by its local (source) port.
fn entry_of(lab: &Lab, s: &TcpStream) -> Entry {
    let sport = s.local_addr().unwrap().port();
    let src = s.local_addr().unwrap().ip();
    in_node(lab, move |ct| {
        ct.dump()
            .unwrap()
            .into_iter()
            .find(|e| e.orig.src == src && e.orig.sport == Some(sport))
            .expect("the connection has a conntrack entry on the node")
    })
}

/// `mark=` of the connection from source port `sport` in `/proc/net/nf_conntrack` of `ns`.
fn proc_mark(ns: &Netns, sport: u16) -> Option<u32> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "cat", "/proc/net/nf_conntrack"])
        .output()
        .expect("read /proc/net/nf_conntrack");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("sport={sport} dport={PORT}")))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("mark="))
        .and_then(|m| m.parse().ok())
}

/// Commits one change to the engine and the kernel.
fn change(engine: &mut Engine, nft: &NftThread, c: Change) {
    let ops = engine.apply(c);
    nft.apply(TABLE_NAME, ops).expect("commit");
    let ops = engine.pending_ops();
    if !ops.is_empty() {
        nft.apply(TABLE_NAME, ops).expect("commit pending deletes");
    }
}

/// The id and comment of the one mark-writing rule whose comment starts with `prefix`.
fn rule_id(rs: &Ruleset, prefix: &str) -> (u32, String) {
    let mut found: Vec<(u32, String)> = rs
        .chains
        .values()
        .flat_map(|c| &c.rules)
        .filter(|r| matches!(r.action, Action::MarkAccept(_)))
        .filter_map(|r| r.comment.clone())
        .filter(|c| c.starts_with(prefix))
        .map(|c| (rule_id_from_comment(&c).expect("id in the comment"), c))
        .collect();
    // The IPv4 and IPv6 twins of one entry share it.
    found.dedup();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

/// The strict-mode judge the agent uses (`weft_nft::conntrack::node_admits_entry`).
fn strict_judge(cluster: Cluster, node_addrs: Vec<IpAddr>) -> impl Fn(&Entry) -> Option<bool> {
    let own: std::collections::BTreeSet<IpAddr> = node_addrs.into_iter().collect();
    move |e: &Entry| weft_nft::conntrack::node_admits_entry(&cluster, NODE, &own, e)
}

#[test]
fn marks_name_the_admitting_rule_default_mode_keeps_flows_strict_mode_cuts_them() {
    need_root!();
    common::use_prefix("weft-ct");
    compile::configure(observability()).ok();
    assert_eq!(compile::observability(), observability());
    let lab = Lab::new(&HOSTS);
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    echo_server(&lab.pods[S].ns, stop.clone());

    let mut model = cluster(&lab);
    let mut engine = Engine::from_cluster(model.clone(), NODE, TABLE_NAME);
    let nft = NftThread::spawn_in_netns(lab.node.path()).expect("backend in the node namespace");
    nft.sync(engine.desired().clone()).expect("first sync");

    // No policy: both clients connect; nothing isolates S, so no rule id is written (0).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn_a = loop {
        match connect(&lab, A, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                println!("waiting for the lab to route: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("A cannot reach S without any policy: {e}"),
        }
    };
    let mut conn_b_old = connect(&lab, B, Duration::from_secs(2)).expect("B reaches S");
    let mut conn_a6 = connect_family(&lab, A, true, Duration::from_secs(2)).expect("A over IPv6");
    assert!(echoes(&mut conn_a6, "a6-1"));
    assert!(echoes(&mut conn_a, "a1"));
    assert!(echoes(&mut conn_b_old, "b1"));
    let layout = MarkLayout::default();
    let e = entry_of(&lab, &conn_a);
    assert_eq!(layout.id(e.mark, Direction::Ingress), 0, "{e:?}");
    assert_eq!(
        proc_mark(&lab.node, conn_a.local_addr().unwrap().port()),
        Some(e.mark)
    );

    // Tighten: S admits only B. Default mode: the established A→S flow keeps going.
    let policy = only_b();
    model.policies.insert(policy.key.clone(), policy.clone());
    change(&mut engine, &nft, Change::UpsertPolicy(policy));
    assert!(
        echoes(&mut conn_a, "a2"),
        "default mode: an established flow survives a tightening"
    );
    assert!(echoes(&mut conn_b_old, "b2"));
    assert!(echoes(&mut conn_a6, "a6-2"), "the same over IPv6");
    let refused = connect(&lab, A, Duration::from_millis(300));
    assert!(refused.is_err(), "a new A->S connection must be refused");

    // A new B→S connection carries the admitting rule's id, as its comment says.
    let mut conn_b_new = connect(&lab, B, Duration::from_secs(2)).expect("B is admitted");
    assert!(echoes(&mut conn_b_new, "b3"));
    let (id, comment) = rule_id(engine.desired(), "app/only-b ingress[0] from[0] ports[0]");
    let e = entry_of(&lab, &conn_b_new);
    assert_eq!(
        layout.id(e.mark, Direction::Ingress),
        id,
        "{comment}: {e:?}"
    );
    assert_eq!(layout.id(e.mark, Direction::Egress), 0, "B is not isolated");
    assert_eq!(
        proc_mark(&lab.node, conn_b_new.local_addr().unwrap().port()),
        Some(e.mark),
        "/proc/net/nf_conntrack agrees"
    );
    println!(
        "B->S admitted by \"{comment}\": mark {:#010x}, tcp {}",
        e.mark,
        e.tcp_state_name().unwrap_or("?")
    );

    // Counters: the accept rule counted B's packets, the group's drop counted A's SYN.
    let counters = lab::spawn_in(&lab.node, || {
        weft_nft::counters::rule_counters(TABLE_NAME).expect("counters")
    })
    .join()
    .unwrap();
    let accept = counters
        .iter()
        .find(|c| c.comment.as_deref() == Some(comment.as_str()))
        .expect("the accept rule counts");
    assert!(accept.packets >= 1, "{accept:?}");
    let dropped = counters
        .iter()
        .find(|c| {
            c.chain.starts_with("grp-")
                && c.comment
                    .as_deref()
                    .is_some_and(|t| t.contains("isolated by app/only-b"))
        })
        .expect("the group's drop counts");
    assert!(dropped.packets >= 1, "{dropped:?}");
    let json = lab.node.nft_json().to_string();
    assert!(
        json.contains(&format!("\"packets\": {}", accept.packets))
            || json.contains(&format!("\"packets\":{}", accept.packets)),
        "nft -j shows the same count"
    );

    // A new process adopts the table after all that traffic: nothing to write.
    drop(nft);
    let mut restarted = Engine::from_cluster(model.clone(), NODE, TABLE_NAME);
    let nft = NftThread::spawn_in_netns(lab.node.path()).expect("backend");
    let current = nft.dump(TABLE_NAME).expect("dump");
    let ops = restarted.resync(current.as_ref());
    assert!(ops.is_empty(), "adoption after traffic: {ops:?}");

    // Strict mode: one purge pass deletes exactly what the policy no longer admits.
    let a_tuple = entry_of(&lab, &conn_a).orig;
    let a6_tuple = entry_of(&lab, &conn_a6).orig;
    let node_addrs: Vec<IpAddr> = vec!["10.244.0.1".parse().unwrap(), "fe80::1".parse().unwrap()];
    let judge = strict_judge(model.clone(), node_addrs);
    let report = in_node(&lab, move |ct| conntrack::purge(ct, judge).expect("purge"));
    println!("strict pass: {report:?}");
    let mut deleted = report.deleted.clone();
    deleted.sort();
    let mut want = vec![a_tuple, a6_tuple];
    want.sort();
    assert_eq!(deleted, want, "only A->S (IPv4 and IPv6) is deleted");
    assert!(report.judged >= 4);
    assert!(
        !echoes(&mut conn_a, "a3"),
        "strict mode: the flow the policy no longer admits is cut"
    );
    assert!(!echoes(&mut conn_a6, "a6-3"), "and its IPv6 twin");
    assert!(echoes(&mut conn_b_old, "b4"), "an admitted flow survives");
    assert!(echoes(&mut conn_b_new, "b5"), "an admitted flow survives");
    // The cut flow's packets are new again, judged and dropped: no established entry for it.
    let a_port = conn_a.local_addr().unwrap().port();
    let back = in_node(&lab, move |ct| {
        ct.dump()
            .unwrap()
            .into_iter()
            .filter(|e| e.orig.sport == Some(a_port) && e.tcp_state_name() == Some("ESTABLISHED"))
            .filter(|e| e.status & 0x4 != 0) // IPS_CONFIRMED: it passed every hook
            .count()
    });
    assert_eq!(back, 0);
    drop(nft);
}

#[test]
fn denied_new_connections_reach_the_nflog_group_at_the_configured_rate() {
    need_root!();
    common::use_prefix("weft-ct");
    compile::configure(observability()).ok();
    assert_eq!(compile::observability(), observability());
    let lab = Lab::new(&[31, 32, 33]);
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    echo_server(&lab.pods[S].ns, stop.clone());
    let mut model = cluster(&lab);
    model.policies.insert(only_b().key, only_b());
    let engine = Engine::from_cluster(model, NODE, TABLE_NAME);
    let nft = NftThread::spawn_in_netns(lab.node.path()).expect("backend");
    nft.sync(engine.desired().clone()).expect("sync");
    let group_chain = engine
        .desired()
        .chains
        .keys()
        .find(|n| n.starts_with("grp-") && n.ends_with("-in"))
        .expect("S's ingress group")
        .clone();
    // The kernel lists the log statement as weft wrote it.
    let text = lab
        .node
        .nft(&["list", "chain", "inet", TABLE_NAME, &group_chain]);
    assert!(
        text.contains(&format!(
            "limit rate {LOG_RATE}/second log prefix \"weft-drop {group_chain} \" group {LOG_GROUP}"
        )),
        "{text}"
    );

    let (tx, rx) = std::sync::mpsc::channel();
    let listen_stop = stop.clone();
    let listener = lab::spawn_in(&lab.node, move || {
        let mut g = NflogGroup::bind(LOG_GROUP).expect("bind the nflog group");
        tx.send(()).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !listen_stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            got.extend(g.next(Duration::from_millis(100)).expect("nflog"));
        }
        got
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("nflog bound");
    // Let B's admitted connection through (not logged), then 3 denied attempts from A over
    // IPv6 and 40 over IPv4, in well under a second (each a fresh source port: a new
    // connection).
    let mut b = connect(&lab, B, Duration::from_secs(2)).expect("B admitted");
    assert!(echoes(&mut b, "b"));
    let started = Instant::now();
    let attempts = 43;
    for i in 0..attempts {
        let v6 = i < 3;
        assert!(connect_family(&lab, A, v6, Duration::from_millis(10)).is_err());
    }
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let logged = listener.join().unwrap();
    println!(
        "{} of {attempts} denied SYNs logged in {elapsed:?}",
        logged.len()
    );
    assert!(!logged.is_empty(), "denied connections are logged");
    for l in &logged {
        let v6 = l.src.is_ipv6();
        assert_eq!(l.prefix, format!("weft-drop {group_chain} "));
        assert_eq!(
            (l.src, l.dst),
            (lab.pods[A].ip(v6), lab.pods[S].ip(v6)),
            "{l:?}"
        );
        assert_eq!((l.proto, l.dport), (6, Some(PORT)));
    }
    // The first attempts fit in the burst: the IPv6 ones are there.
    assert!(logged.iter().any(|l| l.src.is_ipv6()), "{logged:?}");
    // Rate-limited: the burst plus the rate over the time the attempts took (+1 for rounding).
    let ceiling = LOG_BURST as f64 + LOG_RATE as f64 * (elapsed.as_secs_f64() + 0.3) + 1.0;
    assert!(
        (logged.len() as f64) <= ceiling && logged.len() < attempts,
        "{} logged, ceiling {ceiling}",
        logged.len()
    );
}

/// The cost of one strict-mode pass (dump, judge every entry, delete what is no longer
/// admitted) over many entries: 20,000 UDP flows from A to S, judged once with nothing to cut
/// (the baseline: dump and judge only) and once after S is isolated (every flow deleted).
/// Prints the figures (BENCHMARKS.md); asserts only what the pass did, not how fast.
/// Run: `cargo test --release -p weft-nft --test conntrack -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: prints figures"]
fn strict_pass_cost_over_many_entries() {
    need_root!();
    common::use_prefix("weft-ct");
    compile::configure(observability()).ok();
    const FLOWS: usize = 20_000;
    let lab = Lab::new(&[41, 42, 43]);
    let mut model = cluster(&lab);
    let engine = Engine::from_cluster(model.clone(), NODE, TABLE_NAME);
    let nft = NftThread::spawn_in_netns(lab.node.path()).expect("backend");
    nft.sync(engine.desired().clone()).expect("sync");
    lab::sysctl(&lab.node, &["net.netfilter.nf_conntrack_max=262144"]);
    let dst = SocketAddr::new(lab.pods[S].ip(false), 5353);
    let src_ip = lab.pods[A].ip(false);
    let sent = lab::spawn_in(&lab.pods[A].ns, move || {
        let started = Instant::now();
        for i in 0..FLOWS {
            // A distinct source port per flow (ephemeral ports would be reused).
            let port = 20_000 + i as u16;
            let s = std::net::UdpSocket::bind(SocketAddr::new(src_ip, port)).expect("bind");
            s.send_to(format!("{i}").as_bytes(), dst).expect("send");
        }
        started.elapsed()
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let node_addrs: Vec<IpAddr> = vec!["10.244.0.1".parse().unwrap(), "fe80::1".parse().unwrap()];
    let pass = |model: Cluster| {
        let judge = strict_judge(model, node_addrs.clone());
        in_node(&lab, move |ct| {
            let t = Instant::now();
            let n = ct.dump().expect("dump").len();
            let dump = t.elapsed();
            let t = Instant::now();
            let report = conntrack::purge(ct, judge).expect("purge");
            (n, dump, t.elapsed(), report)
        })
    };
    let (n0, dump0, keep_all, r0) = pass(model.clone());
    model.policies.insert(only_b().key, only_b());
    let (n1, dump1, cut_all, r1) = pass(model);
    let udp = |r: &conntrack::Purge| r.deleted.iter().filter(|t| t.proto == 17).count();
    println!("{FLOWS} UDP flows sent in {sent:?}; conntrack entries on the node: {n0}");
    println!(
        "nothing to cut: dump {dump0:?}, pass (dump + judge {} entries) {keep_all:?}",
        r0.judged
    );
    println!(
        "S isolated: dump {dump1:?} ({n1} entries), pass {cut_all:?}: {} deleted ({:.1} µs per deleted entry)",
        r1.deleted.len(),
        cut_all.as_secs_f64() * 1e6 / r1.deleted.len().max(1) as f64
    );
    assert!(n0 >= FLOWS, "{n0} entries");
    assert!(r0.deleted.is_empty());
    assert_eq!(udp(&r1), FLOWS);
}
