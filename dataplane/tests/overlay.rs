//! Three node namespaces on an underlay bridge (its own namespace), VXLAN between them,
//! pods on each: pod ↔ pod ICMP, TCP and UDP, same node and across nodes, IPv4 and IPv6;
//! then a node removed from `sync` loses only its own entries.

mod common;

use std::net::IpAddr;

use common::{EchoServer, Netns, can_run, ping, tcp_echo, udp_echo};
use ipnet::IpNet;
use weft_dataplane::attach::{self, AttachSpec};
use weft_dataplane::ipam::PodCidrs;
use weft_dataplane::overlay::{Overlay, OverlayConfig, RemoteNode, SyncReport};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn remote(i: u8) -> RemoteNode {
    RemoteNode {
        name: format!("n{i}"),
        underlay_ip: ip(&format!("198.18.0.{i}")),
        pod_cidrs: vec![
            format!("10.244.{i}.0/24").parse().expect("net"),
            format!("fd00:10:244:{i}::/64").parse().expect("net"),
        ],
    }
}

struct Node {
    ns: Netns,
    overlay: Option<Overlay>,
}

impl Node {
    fn sync(&mut self, remotes: Vec<RemoteNode>) -> SyncReport {
        let mut ov = self.overlay.take().expect("overlay");
        let (ov, report) = self.ns.netlink(move |h| async move {
            let r = ov.sync(&h, &remotes).await;
            (ov, r)
        });
        self.overlay = Some(ov);
        report
    }
}

fn pod(node: &Node, tag: &str, v4: &str, v6: &str, mtu: u32) -> Netns {
    let p = Netns::new(tag);
    let s = AttachSpec {
        container_id: format!("c-{tag}"),
        ifname: "eth0".into(),
        netns: p.path(),
        ips: vec![ip(v4), ip(v6)],
        mtu,
    };
    node.ns
        .netlink(move |h| async move { attach::attach(&h, &s).await })
        .expect("attach");
    p
}

#[test]
fn pods_on_three_nodes_talk_over_vxlan_and_removing_a_node_removes_only_its_routes() {
    if !can_run() {
        return;
    }
    let underlay = Netns::new("ul");
    underlay.ip(&["link", "add", "br0", "type", "bridge"]);
    underlay.ip(&["link", "set", "br0", "up"]);
    let mut nodes = Vec::new();
    for i in 1..=3u8 {
        let ns = Netns::new(&format!("n{i}"));
        let port = format!("u{i}");
        underlay.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        underlay.ip(&["link", "set", &port, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("198.18.0.{i}/15"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.forwarding();
        let cidrs: Vec<IpNet> = remote(i).pod_cidrs;
        let config = OverlayConfig::new(
            remote(i).underlay_ip,
            PodCidrs::from_list(&cidrs).expect("cidrs"),
        );
        let overlay = ns
            .netlink(move |h| async move { Overlay::ensure(&h, config).await })
            .expect("overlay");
        assert_eq!(overlay.mtu(), 1450);
        nodes.push(Node {
            ns,
            overlay: Some(overlay),
        });
    }
    let all: Vec<RemoteNode> = (1..=3).map(remote).collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        let report = node.sync(all.clone());
        assert_eq!(report.added.len(), 2, "node {}: {report:?}", i + 1);
        assert!(report.failed.is_empty(), "{report:?}");
        assert_eq!(report.entries_added, 10);
    }
    let again = nodes[0].sync(all.clone());
    assert_eq!(again.unchanged, vec!["n2", "n3"]);
    assert_eq!(again.entries_added + again.entries_deleted, 0);

    let dev = nodes[0].ns.ip(&["-d", "link", "show", "vxweft"]);
    assert!(
        dev.contains("vxlan id 6784") && dev.contains("dstport 4789") && dev.contains("nolearning"),
        "{dev}"
    );
    assert!(dev.contains("0a:58:c6:12:00:01"), "{dev}");
    let fdb = nodes[0]
        .ns
        .exec(&["bridge", "fdb", "show", "dev", "vxweft"]);
    assert!(fdb.contains("0a:58:c6:12:00:02 dst 198.18.0.2"), "{fdb}");

    let p1a = pod(&nodes[0], "p1a", "10.244.1.2", "fd00:10:244:1::2", 1450);
    let p1b = pod(&nodes[0], "p1b", "10.244.1.3", "fd00:10:244:1::3", 1450);
    let p2 = pod(&nodes[1], "p2", "10.244.2.2", "fd00:10:244:2::2", 1450);
    let p3 = pod(&nodes[2], "p3", "10.244.3.2", "fd00:10:244:3::2", 1450);
    let _servers: Vec<EchoServer> = [&p1a, &p1b, &p2, &p3]
        .iter()
        .map(|p| EchoServer::start(p, 7000))
        .collect();
    let cases = [
        (&p1a, "10.244.1.3", "same node v4"),
        (&p1a, "fd00:10:244:1::3", "same node v6"),
        (&p1a, "10.244.2.2", "n1 -> n2 v4"),
        (&p1a, "fd00:10:244:2::2", "n1 -> n2 v6"),
        (&p1a, "10.244.3.2", "n1 -> n3 v4"),
        (&p1a, "fd00:10:244:3::2", "n1 -> n3 v6"),
        (&p3, "10.244.2.2", "n3 -> n2 v4"),
        (&p3, "fd00:10:244:1::2", "n3 -> n1 v6"),
    ];
    for (from, dst, what) in cases {
        assert!(ping(from, ip(dst)), "ICMP {what}");
        assert!(tcp_echo(from, ip(dst), 7000), "TCP {what}");
        assert!(udp_echo(from, ip(dst), 7000), "UDP {what}");
    }

    // Node 3 leaves node 1's view: only its entries go.
    let route_to_n2 = nodes[0].ns.ip(&["route", "show", "10.244.2.0/24"]);
    let report = nodes[0].sync(vec![remote(1), remote(2)]);
    assert_eq!(report.removed, vec!["n3"]);
    assert_eq!(report.unchanged, vec!["n2"]);
    assert_eq!((report.entries_added, report.entries_deleted), (0, 5));
    let routes = nodes[0].ns.ip(&["route"]) + &nodes[0].ns.ip(&["-6", "route"]);
    assert!(
        !routes.contains("10.244.3.0/24") && !routes.contains("fd00:10:244:3::/64"),
        "{routes}"
    );
    assert_eq!(
        nodes[0].ns.ip(&["route", "show", "10.244.2.0/24"]),
        route_to_n2
    );
    let fdb = nodes[0]
        .ns
        .exec(&["bridge", "fdb", "show", "dev", "vxweft"]);
    assert!(
        !fdb.contains("198.18.0.3") && fdb.contains("198.18.0.2"),
        "{fdb}"
    );
    assert!(ping(&p1a, ip("10.244.2.2")) && tcp_echo(&p1a, ip("fd00:10:244:2::2"), 7000));
    assert!(
        !ping(&p1a, ip("10.244.3.2")),
        "node 3 is gone from node 1's routes"
    );

    // Node 2 loses its IPv6 podCIDR: node 2's v6 route goes, nothing else moves.
    let mut n2 = remote(2);
    n2.pod_cidrs.truncate(1);
    let report = nodes[0].sync(vec![remote(1), n2]);
    assert_eq!(report.changed, vec!["n2"]);
    assert_eq!((report.entries_added, report.entries_deleted), (0, 2));
    assert!(
        !nodes[0]
            .ns
            .ip(&["-6", "route"])
            .contains("fd00:10:244:2::/64")
    );
    assert!(ping(&p1a, ip("10.244.2.2")));

    // Agent restart while node 2 left and node 3 came back: the new process adopts vxweft,
    // deletes node 2's leftovers (fdb, v4 neighbour, v4 route) and programs node 3.
    let cidrs: Vec<IpNet> = remote(1).pod_cidrs;
    let config = OverlayConfig::new(
        remote(1).underlay_ip,
        PodCidrs::from_list(&cidrs).expect("cidrs"),
    );
    let restarted = nodes[0]
        .ns
        .netlink(move |h| async move { Overlay::ensure(&h, config).await })
        .expect("adopt vxweft");
    nodes[0].overlay = Some(restarted);
    let report = nodes[0].sync(vec![remote(1), remote(3)]);
    assert_eq!(report.added, vec!["n3"]);
    assert_eq!(
        (report.entries_added, report.entries_deleted),
        (5, 3),
        "{report:?}"
    );
    let routes = nodes[0].ns.ip(&["route"]);
    assert!(
        routes.contains("10.244.3.0/24") && !routes.contains("10.244.2.0/24"),
        "{routes}"
    );
    assert!(ping(&p1a, ip("10.244.3.2")) && udp_echo(&p1a, ip("fd00:10:244:3::2"), 7000));
}

/// A peer moving between `wgweft` and VXLAN (encryption switched off on its side, or a relay
/// over plain VXLAN): the routes of both families follow, read back with `ip -j`. IPv6 checks
/// an onlink gateway against the routes in place (the gateway sits inside the CIDR still
/// routed through `wgweft`), which the overlay has to handle. Then `wgweft` recreated (weft-wg
/// restarted): its routes come back.
#[test]
fn a_peer_moves_from_wireguard_to_vxlan_and_back_in_both_families() {
    use std::collections::BTreeMap;
    use weft_dataplane::overlay::PeerRoute;
    if !can_run() {
        return;
    }
    let ns = Netns::new("wgsw");
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    ns.ip(&["link", "set", "eth0p", "up"]);
    ns.ip(&["addr", "add", "198.18.0.1/15", "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    // A TUN device in place of weft-wg's (no process behind it: only its name and index
    // matter to the routes).
    ns.ip(&["tuntap", "add", "dev", "wgweft", "mode", "tun"]);
    ns.ip(&["link", "set", "wgweft", "up"]);
    let cidrs: Vec<IpNet> = remote(1).pod_cidrs;
    let config = OverlayConfig::new(
        remote(1).underlay_ip,
        PodCidrs::from_list(&cidrs).expect("cidrs"),
    );
    let overlay = ns
        .netlink(move |h| async move { Overlay::ensure(&h, config).await })
        .expect("overlay");
    let mut node = Node {
        ns,
        overlay: Some(overlay),
    };
    let routes_of = |node: &Node| -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for fam in ["-4", "-6"] {
            let text = node.ns.ip(&[fam, "-j", "route", "show"]);
            let v: serde_json::Value = serde_json::from_str(&text).expect("ip -j route");
            for r in v.as_array().expect("array") {
                let dst = r["dst"].as_str().unwrap_or("").to_string();
                if dst.starts_with("10.244.2.") || dst.starts_with("fd00:10:244:2::") {
                    out.push((
                        dst,
                        r["dev"].as_str().unwrap_or("").to_string(),
                        r["gateway"].as_str().unwrap_or("").to_string(),
                    ));
                }
            }
        }
        out.sort();
        out
    };
    let sync = |node: &mut Node, route: PeerRoute| -> SyncReport {
        let routes: BTreeMap<String, PeerRoute> = [("n2".to_string(), route)].into();
        let mut ov = node.overlay.take().expect("overlay");
        let (ov, report) = node.ns.netlink(move |h| async move {
            let r = ov.sync_routes(&h, &[remote(2)], &routes).await;
            (ov, r)
        });
        node.overlay = Some(ov);
        report
    };
    let over_wg = vec![
        (
            "10.244.2.0/24".to_string(),
            "wgweft".to_string(),
            String::new(),
        ),
        (
            "fd00:10:244:2::/64".to_string(),
            "wgweft".to_string(),
            String::new(),
        ),
    ];
    let over_vxlan = vec![
        (
            "10.244.2.0/24".to_string(),
            "vxweft".to_string(),
            "10.244.2.1".to_string(),
        ),
        (
            "fd00:10:244:2::/64".to_string(),
            "vxweft".to_string(),
            "fd00:10:244:2::1".to_string(),
        ),
    ];
    for (step, route, want) in [
        ("start on WireGuard", PeerRoute::Wireguard, &over_wg),
        ("to VXLAN", PeerRoute::Vxlan, &over_vxlan),
        ("back to WireGuard", PeerRoute::Wireguard, &over_wg),
        ("to VXLAN again", PeerRoute::Vxlan, &over_vxlan),
    ] {
        let report = sync(&mut node, route);
        assert!(report.failed.is_empty(), "{step}: {report:?}");
        assert_eq!(&routes_of(&node), want, "{step}");
    }
    // weft-wg restarted: its device goes (the kernel drops its routes) and comes back with
    // another index; the next sync puts the routes back although nothing else changed.
    sync(&mut node, PeerRoute::Wireguard);
    assert_eq!(
        routes_of(&node),
        over_wg,
        "on WireGuard before the device goes"
    );
    node.ns.ip(&["link", "del", "wgweft"]);
    assert!(
        routes_of(&node).is_empty(),
        "the kernel dropped them with the device"
    );
    node.ns
        .ip(&["tuntap", "add", "dev", "wgweft", "mode", "tun"]);
    node.ns.ip(&["link", "set", "wgweft", "up"]);
    let report = sync(&mut node, PeerRoute::Wireguard);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(routes_of(&node), over_wg, "routes back on the new wgweft");
}
