//! `weft-wg` for real: two network namespaces joined by a veth "underlay", one `weft-wg` in
//! each, TCP through the tunnel, and a capture on the underlay that must not contain the
//! payload (while a capture on the tunnel device, as a control, does). Needs root, /dev/net/tun,
//! `ip`, `socat` and `tcpdump` (scripts/setup.sh installs them); otherwise it says why and
//! skips. Namespaces are `<prefix>-<pid>-<tag>-{a,b}` (prefix `$WEFT_NETNS_PREFIX`, default
//! `weft-mesh-t`) and are always removed; nothing touches the root namespace.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_mesh::tunnel_probe::TunnelProber;
use weft_mesh::wg::{DeviceConfig, PeerConfig, userspace};

const WG: &str = env!("CARGO_BIN_EXE_weft-wg");
const MARKER: &str = "WEFT-PLAINTEXT-MARKER-5f3a";

fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    for tool in ["ip", "socat", "tcpdump"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("no {tool} (scripts/setup.sh installs it)"));
        }
    }
    None
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces, the processes started in them, and a scratch dir; all removed on drop.
struct Lab {
    a: String,
    b: String,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    /// Starts a one-connection TCP server on `ns`'s tunnel address, port 7000, that writes what
    /// it receives to `file`; returns its index in `children` (wait on it for the end).
    fn receive_into(&mut self, ns: &str, file: &Path) -> usize {
        self.receive_on(ns, "TCP-LISTEN:7000,bind=198.19.0.2,reuseaddr", file)
    }

    /// As [`Lab::receive_into`], listening as `listen` says (a socat address).
    fn receive_on(&mut self, ns: &str, listen: &str, file: &Path) -> usize {
        let server = Command::new("ip")
            .args(["netns", "exec", ns, "socat", "-u", listen])
            .arg(format!("OPEN:{},creat,trunc", file.display()))
            .spawn()
            .expect("socat server");
        self.children.push(server);
        std::thread::sleep(Duration::from_millis(300));
        self.children.len() - 1
    }

    /// Namespaces a (198.18.0.1) and b (198.18.0.2) on a veth; weft-wg in each; tunnel
    /// addresses 198.19.0.1 and 198.19.0.2, fd00:10:244:ff::1 and ::2 on `wgweft` (MTU 1420).
    fn new(tag: &str) -> Lab {
        Lab::with(tag, false)
    }

    /// As [`Lab::new`]; with `start_empty`, each weft-wg starts from a configuration without
    /// peers and gets its peer by a live reload (the file rewritten), as the agent does it.
    fn with(tag: &str, start_empty: bool) -> Lab {
        let prefix = std::env::var("WEFT_NETNS_PREFIX").unwrap_or_else(|_| "weft-mesh-t".into());
        let base = format!("{prefix}-{}-{tag}", std::process::id());
        let dir = std::env::temp_dir().join(&base);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let mut lab = Lab {
            a: format!("{base}-a"),
            b: format!("{base}-b"),
            dir,
            children: Vec::new(),
        };
        let (a, b) = (lab.a.clone(), lab.b.clone());
        run(&["ip", "netns", "add", &a]);
        run(&["ip", "netns", "add", &b]);
        run(&[
            "ip", "-n", &a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &b,
        ]);
        for (ns, dev, addr) in [(&a, "va", "198.18.0.1/24"), (&b, "vb", "198.18.0.2/24")] {
            run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let rng = ring::rand::SystemRandom::new();
        let (ka, kb) = (
            userspace::generate_private_key(&rng),
            userspace::generate_private_key(&rng),
        );
        let config =
            |own: [u8; 32], peer: [u8; 32], endpoint: &str, allowed: [&str; 2]| DeviceConfig {
                private_key: own,
                listen_port: 51820,
                peers: vec![PeerConfig {
                    public_key: userspace::public_key(&peer),
                    endpoint: Some(endpoint.parse().expect("endpoint")),
                    allowed_ips: vec![
                        (allowed[0].parse().expect("ip"), 32),
                        (allowed[1].parse().expect("ip"), 128),
                    ],
                    persistent_keepalive: None,
                }],
            };
        for (ns, cfg, tunnel) in [
            (
                &a,
                config(
                    ka,
                    kb,
                    "198.18.0.2:51820",
                    ["198.19.0.2", "fd00:10:244:ff::2"],
                ),
                ["198.19.0.1/24", "fd00:10:244:ff::1/64"],
            ),
            (
                &b,
                config(
                    kb,
                    ka,
                    "198.18.0.1:51820",
                    ["198.19.0.1", "fd00:10:244:ff::1"],
                ),
                ["198.19.0.2/24", "fd00:10:244:ff::2/64"],
            ),
        ] {
            let path = lab.dir.join(format!("{ns}.conf"));
            let first = if start_empty {
                DeviceConfig {
                    peers: Vec::new(),
                    ..cfg.clone()
                }
            } else {
                cfg.clone()
            };
            std::fs::write(&path, first.render()).expect("config");
            let log = std::fs::File::create(lab.dir.join(format!("{ns}.log"))).expect("log");
            let child = Command::new("ip")
                .args(["netns", "exec", ns, WG, "run", "--config"])
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("weft-wg");
            lab.children.push(child);
            lab.wait_for(&format!("wgweft in {ns}"), || {
                Command::new("ip")
                    .args(["-n", ns, "link", "show", "wgweft"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
            run(&["ip", "-n", ns, "addr", "add", tunnel[0], "dev", "wgweft"]);
            run(&[
                "ip", "-n", ns, "addr", "add", tunnel[1], "dev", "wgweft", "nodad",
            ]);
            run(&["ip", "-n", ns, "link", "set", "wgweft", "mtu", "1420", "up"]);
            if start_empty {
                std::fs::write(&path, cfg.render()).expect("config");
                let status = PathBuf::from(format!("{}.status", path.display()));
                lab.wait_for(&format!("weft-wg in {ns} reloaded with its peer"), || {
                    std::fs::read_to_string(&status).is_ok_and(|t| t.contains("peer = "))
                });
            }
        }
        lab
    }

    fn wait_for(&self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready() {
            assert!(Instant::now() < deadline, "{what} not ready in 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts tcpdump in `ns` on `dev`, writing `file`; returns once it captures.
    fn capture(&mut self, ns: &str, dev: &str, file: &Path) -> usize {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "tcpdump",
                "--immediate-mode",
                "-i",
                dev,
                "-U",
                "-n",
                "-w",
            ])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        self.children.push(child);
        self.wait_for("tcpdump", || file.exists());
        std::thread::sleep(Duration::from_millis(300));
        self.children.len() - 1
    }

    /// Stops a capture (SIGINT, so that tcpdump flushes) and returns the file's bytes.
    fn stop_capture(&mut self, index: usize, file: &Path) -> Vec<u8> {
        // Immediate mode hands every packet over at once; a short pause lets the last ones
        // reach the file before the interrupt.
        std::thread::sleep(Duration::from_millis(200));
        let pid = self.children[index].id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let _ = self.children[index].wait();
        std::fs::read(file).expect("capture file")
    }
}

/// Sends `file` from namespace `ns` to the socat address `connect` (bounded to 60 s).
/// Runs an nft script in `ns` (`nft -f -`).
fn nft_in(ns: &str, script: &str) {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("nft script");
    assert!(
        child.wait().expect("nft").success(),
        "nft in {ns}: {script}"
    );
}

fn send_file(ns: &str, file: &Path, connect: &str) {
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "timeout",
        "60",
        "socat",
        "-u",
        &format!("OPEN:{}", file.display()),
        connect,
    ]);
}

/// A capture file as tcpdump prints it (`-n`).
fn capture_text(file: &Path) -> String {
    let out = Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(file)
        .output()
        .expect("tcpdump -r");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that the capture `file` has a line containing `marker` whose "length N" is over
/// `over` (and prints the longest).
fn assert_longest(file: &Path, marker: &str, over: usize, what: &str) {
    let text = capture_text(file);
    let longest = text
        .lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| l.rsplit("length ").next()?.trim().parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    eprintln!("{what}: longest {longest} bytes");
    assert!(
        longest > over,
        "{what}: none longer than {over} bytes (longest {longest}):\n{}",
        text.lines().take(20).collect::<Vec<_>>().join("\n")
    );
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn tcp_crosses_the_tunnel_and_the_underlay_carries_no_plaintext() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut lab = Lab::new("tcp");
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let underlay = lab.dir.join("underlay.pcap");
    let inner = lab.dir.join("inner.pcap");
    let cap_underlay = lab.capture(&a, "va", &underlay);
    let cap_inner = lab.capture(&a, "wgweft", &inner);

    let received = lab.dir.join("received");
    let server_index = lab.receive_into(&b, &received);
    let payload: String = (0..200).map(|i| format!("{MARKER} line {i}\n")).collect();
    let sent = lab.dir.join("sent");
    std::fs::write(&sent, &payload).expect("payload");
    let started = Instant::now();
    send_file(&a, &sent, "TCP:198.19.0.2:7000,connect-timeout=10");
    let _ = lab.children[server_index].wait();
    eprintln!(
        "first TCP exchange through the tunnel (incl. WireGuard handshake): {:?}",
        started.elapsed()
    );
    assert_eq!(
        std::fs::read_to_string(&received).expect("received"),
        payload
    );

    let on_underlay = lab.stop_capture(cap_underlay, &underlay);
    let on_tunnel = lab.stop_capture(cap_inner, &inner);
    assert!(
        contains(&on_tunnel, MARKER),
        "control: the inner capture sees the payload; it has {} bytes:\n{}",
        on_tunnel.len(),
        capture_text(&inner)
    );
    assert!(
        !contains(&on_underlay, MARKER),
        "plaintext payload on the underlay"
    );
    let text = capture_text(&underlay);
    // Runs of datagrams may be one segmented send each: count bytes, not lines.
    let wg_bytes: usize = text
        .lines()
        .filter(|l| l.contains(".51820 > ") && l.contains("UDP"))
        .filter_map(|l| l.rsplit("length ").next()?.trim().parse::<usize>().ok())
        .sum();
    assert!(
        wg_bytes >= payload.len(),
        "expected at least the payload's {} bytes as WireGuard UDP on the underlay, got {wg_bytes}:\n{text}",
        payload.len()
    );
    assert!(
        !text.contains("198.19.0."),
        "inner addresses visible on the underlay:\n{text}"
    );
}

#[test]
fn a_device_started_without_peers_carries_traffic_after_a_live_reload() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut lab = Lab::with("reload", true);
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let received = lab.dir.join("received");
    let server_index = lab.receive_into(&b, &received);
    let sent = lab.dir.join("sent");
    std::fs::write(&sent, format!("{MARKER} after reload\n")).expect("payload");
    send_file(&a, &sent, "TCP:198.19.0.2:7000,connect-timeout=10");
    let _ = lab.children[server_index].wait();
    assert_eq!(
        std::fs::read_to_string(&received).expect("received"),
        format!("{MARKER} after reload\n")
    );
    let log = std::fs::read_to_string(lab.dir.join(format!("{a}.log"))).expect("log");
    assert!(
        log.contains("configuration reloaded: 1 peer(s)"),
        "weft-wg reports the reload:\n{log}"
    );
}

/// A bulk TCP transfer through the tunnel, IPv4 then IPv6: every byte arrives in order; the
/// sending `weft-wg` sent runs of datagrams with UDP segmentation offload (`udp_gso`): a
/// capture on the receiving side's underlay veth sees UDP packets longer than any datagram;
/// the receiving `weft-wg` wrote runs of segments merged (`gro`): a capture on its `wgweft`
/// sees TCP packets longer than the device's MTU (tcpdump, an independent reader); and both
/// processes count what they did when they stop.
#[test]
fn a_bulk_transfer_arrives_intact_sent_segmented_and_written_merged_in_both_families() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut lab = Lab::new("bulk");
    let (a, b) = (lab.a.clone(), lab.b.clone());
    // 8 MiB that no shifted or dropped range could reproduce.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let payload: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let sent = lab.dir.join("sent");
    std::fs::write(&sent, &payload).expect("payload");
    for (family, listen, connect) in [
        (
            "IPv4",
            "TCP-LISTEN:7000,bind=198.19.0.2,reuseaddr",
            "TCP:198.19.0.2:7000,connect-timeout=10",
        ),
        (
            "IPv6",
            "TCP6-LISTEN:7000,bind=[fd00:10:244:ff::2],reuseaddr",
            "TCP6:[fd00:10:244:ff::2]:7000,connect-timeout=10",
        ),
    ] {
        let pcap = lab.dir.join(format!("inner-{family}.pcap"));
        let cap = lab.capture(&b, "wgweft", &pcap);
        let outer = lab.dir.join(format!("underlay-{family}.pcap"));
        let cap_outer = lab.capture(&b, "vb", &outer);
        let received = lab.dir.join(format!("received-{family}"));
        let server = lab.receive_on(&b, listen, &received);
        send_file(&a, &sent, connect);
        let _ = lab.children[server].wait();
        let got = std::fs::read(&received).expect("received");
        assert!(
            got == payload,
            "{family}: {} of {} bytes, or not in order",
            got.len(),
            payload.len()
        );
        lab.stop_capture(cap, &pcap);
        lab.stop_capture(cap_outer, &outer);
        // The underlay veth passes a segmented send whole: tcpdump sees one UDP packet
        // longer than any datagram ("... > 198.18.0.2.51820: UDP, length 29088").
        assert_longest(
            &outer,
            ".51820: UDP",
            1500,
            &format!("{family}: segmented UDP send on b's underlay veth"),
        );
        // "... Flags [.], seq 1:2777, ack 1, win 502, options [...], length 2776"
        assert_longest(
            &pcap,
            ".7000: Flags",
            1420,
            &format!("{family}: merged TCP write on b's wgweft"),
        );
    }
    // SIGTERM (a clean stop) so that each weft-wg logs its counters:
    // "stopping: P packet(s) written to the TUN device in W write(s) (M merged, E write
    // error(s)); D datagram(s) sent in S send(s) (segmentation offload on)".
    let mut logs = Vec::new();
    for (i, ns) in [(0, &a), (1, &b)] {
        let pid = lab.children[i].id().to_string();
        run(&["kill", "-TERM", &pid]);
        let _ = lab.children[i].wait();
        logs.push(std::fs::read_to_string(lab.dir.join(format!("{ns}.log"))).expect("log"));
    }
    let number_before = |log: &str, what: &str| -> u64 {
        log.split(what)
            .next()
            .and_then(|l| l.rsplit([' ', '(']).next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let merged = number_before(&logs[1], " merged");
    assert!(
        merged > 1000,
        "b's weft-wg counts merged packets when it stops:\n{}",
        logs[1]
    );
    let (datagrams, sends) = (
        number_before(&logs[0], " datagram(s) sent"),
        number_before(&logs[0], " send(s)"),
    );
    assert!(
        datagrams > 1000 && sends * 2 < datagrams && logs[0].contains("segmentation offload on"),
        "a's weft-wg sent runs of datagrams in one send each ({datagrams} datagrams, {sends} sends):\n{}",
        logs[0]
    );
}

/// Echo probes through the tunnel (`tunnel_probe`: how the agent's mesh notices a WireGuard
/// session that carries nothing while the control connection is fine). Run in a's namespace
/// against b's tunnel addresses (IPv4 and IPv6): answered. With WireGuard's UDP port dropped
/// in b (an nft table in b's namespace, whose counter shows the drops: nft is the independent
/// reader): silent. The drop removed: answered again. The prober runs as a child test process
/// in a's namespace (`ip netns exec a <this test binary> --exact tunnel_probe_child`).
#[test]
fn echo_probes_through_the_tunnel_are_answered_and_fall_silent_when_wireguards_port_is_dropped() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new("probe");
    let exe = std::env::current_exe().expect("test binary");
    let child = |expect: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.a])
            .arg(&exe)
            .args(["--exact", "tunnel_probe_child", "--ignored", "--nocapture"])
            .env("WEFT_PROBE_EXPECT", expect)
            .env("WEFT_PROBE_TARGETS", "198.19.0.2,fd00:10:244:ff::2")
            .output()
            .expect("child test");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("1 passed"),
            "probes expected {expect}:\n{text}"
        );
    };
    child("answered");
    let b = lab.b.clone();
    nft_in(
        &b,
        "table inet probe-block {\n chain in { type filter hook input priority -300; udp dport 51820 counter drop; }\n}\n",
    );
    child("silent");
    let listed = Command::new("ip")
        .args([
            "netns",
            "exec",
            &b,
            "nft",
            "-j",
            "list",
            "table",
            "inet",
            "probe-block",
        ])
        .output()
        .expect("nft");
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("nft -j");
    let dropped = json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum::<u64>();
    assert!(dropped >= 2, "WireGuard datagrams dropped in b: {dropped}");
    nft_in(&b, "delete table inet probe-block");
    child("answered");
}

/// The prober's side of the test above; does nothing unless that test runs it.
#[test]
#[ignore = "run by echo_probes_through_the_tunnel_are_answered_and_fall_silent_when_wireguards_port_is_dropped"]
fn tunnel_probe_child() {
    let Ok(expect) = std::env::var("WEFT_PROBE_EXPECT") else {
        return;
    };
    let targets: BTreeMap<String, IpAddr> = std::env::var("WEFT_PROBE_TARGETS")
        .expect("targets")
        .split(',')
        .map(|a| (format!("peer-{a}"), a.parse().expect("address")))
        .collect();
    let prober = TunnelProber::start(Duration::from_millis(200)).expect("raw ICMP sockets");
    for a in targets.values() {
        assert!(prober.supports(a), "{a}: no raw socket of its family");
    }
    prober.set_targets(targets.clone());
    let answered = |p: &TunnelProber| {
        targets
            .keys()
            .filter(|t| p.last_answer(t).is_some())
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while answered(&prober) < targets.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if expect == "silent" {
        // The whole 5 s passed without an answer.
        std::thread::sleep(Duration::from_millis(200));
    }
    let (sent, matched, errors) = prober.counts();
    println!("probes: sent {sent}, answers matched {matched}, send errors {errors}");
    match expect.as_str() {
        "answered" => assert_eq!(answered(&prober), targets.len(), "every target answered"),
        "silent" => {
            assert_eq!(answered(&prober), 0, "no target answered");
            assert!(sent >= 2 * 20, "requests went out all along: {sent}");
        }
        other => panic!("WEFT_PROBE_EXPECT={other}"),
    }
}

/// `cargo test --release -p weft-mesh --test wg_netns -- --ignored --nocapture`: iperf3
/// through the bare weft-wg tunnel, 5 runs of 3 s, median (the ceiling for userspace
/// WireGuard on this machine).
#[test]
#[ignore = "benchmark: needs iperf3 and a release build"]
fn bare_tunnel_throughput_median_of_5() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut lab = Lab::new("bench");
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let server = Command::new("ip")
        .args(["netns", "exec", &b, "iperf3", "-s", "-B", "198.19.0.2"])
        .stdout(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    lab.children.push(server);
    std::thread::sleep(Duration::from_millis(500));
    let mut mbps = Vec::new();
    for _ in 0..5 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &a,
                "iperf3",
                "-c",
                "198.19.0.2",
                "-t",
                "3",
                "-J",
            ])
            .output()
            .expect("iperf3");
        let json = String::from_utf8_lossy(&out.stdout);
        let bps = json
            .split("\"sum_received\"")
            .nth(1)
            .and_then(|s| s.split("\"bits_per_second\":").nth(1))
            .and_then(|s| s.split([',', '}']).next())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .expect("iperf3 JSON with sum_received");
        mbps.push(bps / 1e6);
    }
    mbps.sort_by(f64::total_cmp);
    eprintln!(
        "bare weft-wg tunnel, iperf3 TCP, 5 × 3 s: {mbps:.0?} Mbit/s, median {:.0}",
        mbps[2]
    );
}
