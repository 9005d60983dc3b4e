//! Anti-spoofing against real packets (issue 4, "Anti-spoofing").
//!
//! The node of `common/lab.rs` (client pods c1 and c2, a server pod) carries weft's table,
//! written by an [`Engine`] through the real backend. The server is isolated by a policy that
//! admits only c2. From raw sockets (`IPPROTO_RAW`, the sender writes the IP header, as any pod
//! with the default CAP_NET_RAW can), c1 sends UDP datagrams with a forged source address,
//! IPv4 and IPv6: c2's address (which the policy would admit) and an address no pod has. c2
//! sends the same datagrams with its own address. The server counts what arrives:
//! every genuine datagram from c2, no forged one; and the anti-spoofing rule's counter (read
//! with `nft -j list ruleset`) grew by exactly the number of forged datagrams, so they were
//! dropped before dispatch. c1's genuine datagrams are dropped by the policy instead (the
//! group chain's counter), not by anti-spoofing. Without root it prints SKIPPED.

mod common;
#[path = "common/lab.rs"]
mod lab;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Netns;
use lab::{Lab, StopOnDrop};
use weft_netpol::engine::Engine;
use weft_netpol::eval::{Connection, allowed};
use weft_netpol::model::{
    Cluster, Namespace, NamespaceScope, ObjectKey, Peer, Pod, PodSelection, Policy, PolicyRule,
    PortSpec,
};
use weft_netpol::ruleset::{Protocol, TABLE_NAME};
use weft_netpol::selector::LabelSelector;
use weft_nft::NftThread;

const NODE: &str = "node-under-test";
const PORT: u16 = 7777;
const COPIES: usize = 3;
const C1: usize = 0;
const C2: usize = 1;
const SRV: usize = 2;

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        acc += u32::from(word);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// A UDP datagram with its IP header, checksums filled in.
fn packet(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = (8 + payload.len()) as u16;
    let mut udp = Vec::with_capacity(udp_len as usize);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    let mut header = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&udp_len.to_be_bytes());
            let total = 20 + udp_len;
            header.extend_from_slice(&[0x45, 0]);
            header.extend_from_slice(&total.to_be_bytes());
            header.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
            header.extend_from_slice(&s.octets());
            header.extend_from_slice(&d.octets());
            let ck = fold(sum16(&header, 0));
            header[10..12].copy_from_slice(&ck.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
            header.extend_from_slice(&[0x60, 0, 0, 0]);
            header.extend_from_slice(&udp_len.to_be_bytes());
            header.extend_from_slice(&[17, 64]);
            header.extend_from_slice(&s.octets());
            header.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    let mut ck = fold(sum16(&udp, sum16(&pseudo, 0)));
    if ck == 0 {
        ck = 0xffff;
    }
    udp[6..8].copy_from_slice(&ck.to_be_bytes());
    header.extend_from_slice(&udp);
    header
}

/// Packets and bytes of the rules of the node's table whose chain and comment match.
fn counter(node: &Netns, chain_prefix: &str, comment_prefix: &str) -> u64 {
    let j = node.nft_json();
    let mut packets = 0;
    let mut rules = 0;
    for o in j["nftables"].as_array().expect("nftables array") {
        let Some(r) = o.get("rule") else { continue };
        if r["table"] != TABLE_NAME
            || !r["chain"].as_str().unwrap_or("").starts_with(chain_prefix)
            || !r["comment"]
                .as_str()
                .unwrap_or("")
                .starts_with(comment_prefix)
        {
            continue;
        }
        for e in r["expr"].as_array().expect("expr array") {
            if let Some(c) = e.get("counter") {
                packets += c["packets"].as_u64().expect("packets");
                rules += 1;
            }
        }
    }
    assert!(
        rules > 0,
        "no counted rule in chain {chain_prefix}* with comment {comment_prefix}*"
    );
    packets
}

/// Sends COPIES datagrams tagged `tag` from pod `sender`'s raw socket, from `forged_src` or
/// the pod's own address.
fn send(lab: &Lab, sender: usize, v6: bool, forged_src: Option<IpAddr>, tag: &str) {
    let src = forged_src.unwrap_or(lab.pods[sender].ip(v6));
    let dst = lab.pods[SRV].ip(v6);
    let tag = tag.to_string();
    lab::spawn_in(&lab.pods[sender].ns, move || {
        let fd = lab::raw_socket(v6).expect("raw socket");
        for i in 0..COPIES {
            let pkt = packet(src, dst, 40_000 + i as u16, PORT, tag.as_bytes());
            lab::send_to(&fd, &pkt, &SocketAddr::new(dst, 0)).expect("send");
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .join()
    .expect("sender");
}

fn pod(lab: &Lab, i: usize, ns: &str, name: &str) -> Pod {
    Pod {
        key: ObjectKey::new(ns, name),
        uid: format!("uid-{name}"),
        labels: [("pod".to_string(), name.to_string())].into(),
        ips: vec![lab.pods[i].ip(false), lab.pods[i].ip(true)],
        node: NODE.into(),
        ports: Vec::new(),
        host_network: false,
        terminated: false,
    }
}

#[test]
fn forged_sources_are_dropped_before_dispatch_and_genuine_ones_pass() {
    need_root!();
    let began = Instant::now();
    let lab = Lab::new(&[11, 12, 13]);
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());

    // The server admits UDP from c2 only.
    let mut cluster = Cluster::default();
    for ns in ["ns-a", "ns-b", "srv"] {
        cluster
            .namespaces
            .insert(ns.into(), Namespace::new(ns, BTreeMap::new()));
    }
    for p in [
        pod(&lab, C1, "ns-a", "c1"),
        pod(&lab, C2, "ns-b", "c2"),
        pod(&lab, SRV, "srv", "server"),
    ] {
        cluster.pods.insert(p.key.clone(), p);
    }
    let policy = Policy {
        key: ObjectKey::new("srv", "only-c2"),
        uid: "uid-only-c2".into(),
        subject: LabelSelector::from_labels([("pod", "server")]),
        ingress: Some(vec![PolicyRule {
            peers: Some(vec![Peer::Pods(PodSelection {
                namespaces: NamespaceScope::Selected(LabelSelector::everything()),
                pods: LabelSelector::from_labels([("pod", "c2")]),
            })]),
            ports: Some(vec![PortSpec::AllPorts(Protocol::Udp)]),
        }]),
        egress: None,
        errors: Vec::new(),
    };
    cluster.policies.insert(policy.key.clone(), policy);
    for v6 in [false, true] {
        let conn = |src: usize| Connection {
            src: lab.pods[src].ip(v6),
            dst: lab.pods[SRV].ip(v6),
            protocol: Protocol::Udp,
            port: PORT,
        };
        assert!(
            allowed(&cluster, &conn(C2)),
            "the policy admits c2's address"
        );
        assert!(!allowed(&cluster, &conn(C1)), "the policy refuses c1");
    }
    let mut engine = Engine::from_cluster(cluster, NODE, TABLE_NAME);
    let nft = NftThread::spawn_in_netns(lab.node.path()).expect("backend in the node namespace");
    let report = nft
        .apply(TABLE_NAME, engine.resync(None))
        .expect("initial sync");
    assert_eq!(report.acks, report.messages);

    // The server counts datagrams by payload.
    let seen: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let (seen, stop) = (seen.clone(), stop.clone());
        lab::spawn_in(&lab.pods[SRV].ns, move || {
            let s = UdpSocket::bind(("::", PORT)).expect("bind the receiver");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    let tag = String::from_utf8_lossy(&buf[..n]).into_owned();
                    *seen.lock().unwrap().entry(tag).or_default() += 1;
                }
            }
        })
    };
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("receiver bound");

    let anti_spoof_before = counter(&lab.node, "egress", "anti-spoofing");
    let policy_drops_before = counter(&lab.node, "grp-", "");

    // (sender pod, forged source or None for its own, tag)
    let unknown_v4 = IpAddr::V4(Ipv4Addr::new(10, 244, 0, 99));
    let unknown_v6 = IpAddr::V6("fd00:10:244::99".parse::<Ipv6Addr>().unwrap());
    let mut sends: Vec<(usize, bool, Option<IpAddr>, &str)> = vec![
        (C2, false, None, "genuine c2 v4"),
        (C2, true, None, "genuine c2 v6"),
        (C1, false, Some(lab.pods[C2].ip(false)), "forged c2 v4"),
        (C1, true, Some(lab.pods[C2].ip(true)), "forged c2 v6"),
        (C1, false, Some(unknown_v4), "forged unknown v4"),
        (C1, true, Some(unknown_v6), "forged unknown v6"),
        (C1, false, None, "genuine c1 v4"),
        (C1, true, None, "genuine c1 v6"),
    ];
    // Genuine c2 datagrams last too: once they arrive, everything before them was judged.
    sends.push((C2, false, None, "genuine c2 v4"));
    sends.push((C2, true, None, "genuine c2 v6"));
    let forged = 4 * COPIES;
    let c1_genuine = 2 * COPIES;
    for (sender, v6, forged_src, tag) in sends.iter().copied() {
        send(&lab, sender, v6, forged_src, tag);
    }

    let want_genuine = 2 * COPIES;
    let wait_until = Instant::now() + Duration::from_secs(3);
    loop {
        let s = seen.lock().unwrap().clone();
        let got = |t: &str| s.get(t).copied().unwrap_or(0);
        if (got("genuine c2 v4") >= want_genuine && got("genuine c2 v6") >= want_genuine)
            || Instant::now() > wait_until
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let seen_now = seen.lock().unwrap().clone();
    let anti_spoof = counter(&lab.node, "egress", "anti-spoofing") - anti_spoof_before;

    let policy_drops = counter(&lab.node, "grp-", "") - policy_drops_before;
    let received = seen_now;
    println!(
        "received by the server: {received:?}; anti-spoofing drops: {anti_spoof} (forged sent: {forged}); policy drops: {policy_drops} (c1 genuine sent: {c1_genuine}); {:.1} s",
        began.elapsed().as_secs_f64()
    );

    for tag in ["genuine c2 v4", "genuine c2 v6"] {
        assert_eq!(
            received.get(tag),
            Some(&want_genuine),
            "{tag}: {received:?}"
        );
    }
    for tag in [
        "forged c2 v4",
        "forged c2 v6",
        "forged unknown v4",
        "forged unknown v6",
        "genuine c1 v4",
        "genuine c1 v6",
    ] {
        assert_eq!(
            received.get(tag),
            None,
            "{tag} reached the server: {received:?}"
        );
    }
    assert_eq!(
        anti_spoof, forged as u64,
        "every forged datagram, and only those, hit the anti-spoofing rule"
    );
    assert_eq!(
        policy_drops, c1_genuine as u64,
        "c1's own datagrams are refused by the policy, after dispatch"
    );

    // Control: without the anti-spoofing rule (deleted by hand), the same forged c2 datagrams
    // reach the server: the raw sockets do forge, and the policy alone would admit them.
    let j = lab.node.nft_json();
    let handle = j["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .find(|r| {
            r["chain"] == "egress"
                && r["comment"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("anti-spoofing"))
        })
        .map(|r| r["handle"].to_string())
        .expect("the anti-spoofing rule");
    lab.node.nft(&[
        "delete", "rule", "inet", TABLE_NAME, "egress", "handle", &handle,
    ]);
    send(
        &lab,
        C1,
        false,
        Some(lab.pods[C2].ip(false)),
        "control forged c2 v4",
    );
    send(
        &lab,
        C1,
        true,
        Some(lab.pods[C2].ip(true)),
        "control forged c2 v6",
    );
    let wait_until = Instant::now() + Duration::from_secs(3);
    let control = loop {
        let s = seen.lock().unwrap().clone();
        let got = |t: &str| s.get(t).copied().unwrap_or(0);
        if (got("control forged c2 v4") >= COPIES && got("control forged c2 v6") >= COPIES)
            || Instant::now() > wait_until
        {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, Ordering::SeqCst);
    server.join().expect("receiver");
    println!("control without the rule: {control:?}");
    for tag in ["control forged c2 v4", "control forged c2 v6"] {
        assert_eq!(control.get(tag), Some(&COPIES), "{tag}: {control:?}");
    }
}
