//! Pod attach, check and detach on a real kernel, in namespaces the test creates: one node
//! namespace, two pod namespaces, traffic between the pods through the node.

mod common;

use std::net::IpAddr;

use common::{EchoServer, Netns, can_run, ping, tcp_echo, udp_echo};
use weft_dataplane::attach::{self, AttachSpec};

fn spec(id: &str, pod: &Netns, ips: &[&str]) -> AttachSpec {
    AttachSpec {
        container_id: id.into(),
        ifname: "eth0".into(),
        netns: pod.path(),
        ips: ips.iter().map(|s| s.parse().expect("ip")).collect(),
        mtu: 1450,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn attach_gives_two_pods_on_one_node_working_v4_and_v6_then_check_and_detach_say_what_is_missing() {
    if !can_run() {
        return;
    }
    let node = Netns::new("node");
    node.forwarding();
    let pod_a = Netns::new("pa");
    let pod_b = Netns::new("pb");
    let a = spec("containera", &pod_a, &["10.244.1.2", "fd00:10:244:1::2"]);
    let b = spec("containerb", &pod_b, &["10.244.1.3", "fd00:10:244:1::3"]);
    for s in [a.clone(), b.clone()] {
        let got = node
            .netlink(move |h| async move { attach::attach(&h, &s).await })
            .expect("attach");
        assert!(got.host_ifname.starts_with("weft"));
    }
    // The pod side is eth0 with its /32 and /128, MTU as asked, default routes via the
    // link-local gateways; the host side is up.
    let addrs = pod_a.ip(&["-o", "addr", "show", "dev", "eth0"]);
    assert!(
        addrs.contains("10.244.1.2/32") && addrs.contains("fd00:10:244:1::2/128"),
        "{addrs}"
    );
    let global6 = addrs
        .lines()
        .find(|l| l.contains("fd00:10:244:1::2/128"))
        .expect("v6 line");
    assert!(
        global6.contains("nodad") && !global6.contains("tentative"),
        "no DAD: {global6}"
    );
    assert!(pod_a.ip(&["link", "show", "eth0"]).contains("mtu 1450"));
    assert!(
        pod_a
            .ip(&["route"])
            .contains("default via 169.254.1.1 dev eth0")
    );
    assert!(
        pod_a
            .ip(&["-6", "route"])
            .contains("default via fe80::1 dev eth0")
    );
    assert!(pod_a.ip(&["neigh"]).contains("169.254.1.1 dev eth0 lladdr"));
    let host_name = attach::host_veth_name("containera", "eth0");
    assert!(
        node.ip(&["route"])
            .contains(&format!("10.244.1.2 dev {host_name}"))
    );

    // Traffic right after ADD: ICMP, TCP, UDP, both families, both directions.
    let _server_b = EchoServer::start(&pod_b, 7000);
    let _server_a = EchoServer::start(&pod_a, 7000);
    for (from, to, dst) in [
        (&pod_a, &pod_b, "10.244.1.3"),
        (&pod_a, &pod_b, "fd00:10:244:1::3"),
        (&pod_b, &pod_a, "10.244.1.2"),
        (&pod_b, &pod_a, "fd00:10:244:1::2"),
    ] {
        let _ = to;
        assert!(ping(from, ip(dst)), "ping {dst}");
        assert!(tcp_echo(from, ip(dst), 7000), "tcp {dst}");
        assert!(udp_echo(from, ip(dst), 7000), "udp {dst}");
    }

    // CHECK passes, then names exactly what we break.
    let sa = a.clone();
    let problems = node
        .netlink(move |h| async move { attach::check(&h, &sa).await })
        .expect("check");
    assert!(problems.is_empty(), "{problems:?}");
    pod_a.ip(&["addr", "del", "10.244.1.2/32", "dev", "eth0"]);
    pod_a.ip(&["-6", "route", "del", "default"]);
    node.ip(&["route", "del", "10.244.1.2/32"]);
    let sa = a.clone();
    let problems = node
        .netlink(move |h| async move { attach::check(&h, &sa).await })
        .expect("check");
    // Removing the last IPv4 address also makes the kernel drop the device's IPv4 routes
    // and neighbours: CHECK reports those too.
    assert_eq!(
        problems,
        vec![
            format!("host route 10.244.1.2/32 dev {host_name} is missing"),
            "pod address 10.244.1.2/32 on eth0 is missing".to_string(),
            "pod route 0.0.0.0/0 via 169.254.1.1 dev eth0 is missing".to_string(),
            "pod neighbour 169.254.1.1 on eth0 is missing".to_string(),
            "pod route ::/0 via fe80::1 dev eth0 is missing".to_string(),
        ]
    );

    // ADD again over a half-broken attachment repairs it (the leftover veth is replaced).
    let sa = a.clone();
    node.netlink(move |h| async move { attach::attach(&h, &sa).await })
        .expect("re-attach");
    let sa = a.clone();
    let problems = node
        .netlink(move |h| async move { attach::check(&h, &sa).await })
        .expect("check");
    assert!(problems.is_empty(), "{problems:?}");

    // Detach is idempotent; CHECK then reports the missing host link.
    let name = host_name.clone();
    assert!(
        node.netlink(move |h| async move { attach::detach(&h, &name).await })
            .expect("detach")
    );
    let name = host_name.clone();
    assert!(
        !node
            .netlink(move |h| async move { attach::detach(&h, &name).await })
            .expect("detach again")
    );
    assert!(
        !pod_a.ip(&["link"]).contains("eth0"),
        "pod side went with the pair"
    );
    let sa = a.clone();
    let problems = node
        .netlink(move |h| async move { attach::check(&h, &sa).await })
        .expect("check");
    assert_eq!(problems, vec![format!("host link {host_name} is missing")]);
    assert!(!ping(&pod_b, ip("10.244.1.2")));
}

#[test]
fn attach_into_a_missing_netns_fails_and_leaves_no_link() {
    if !can_run() {
        return;
    }
    let node = Netns::new("node");
    let mut s = AttachSpec {
        container_id: "ghost".into(),
        ifname: "eth0".into(),
        netns: "/var/run/netns/weft-does-not-exist".into(),
        ips: vec![ip("10.244.1.9")],
        mtu: 1450,
    };
    s.mtu = 1400;
    let err = node
        .netlink(move |h| async move { attach::attach(&h, &s).await })
        .expect_err("no netns");
    assert!(err.to_string().contains("weft-does-not-exist"), "{err}");
    let links = node.ip(&["-o", "link"]);
    assert!(!links.contains("weft"), "{links}");
}
