//! The `weft-cni` binary exec'd exactly as a container runtime does (environment + stdin,
//! inside the node's network namespace) against an in-test agent: a unix socket server that
//! hands each request to `cni_service::CniService::handle` with a fake policy gate. Every
//! verb, the error cases, and DEL with the agent down.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use weft_dataplane::cni_service::{CniService, PolicyGate, ServiceConfig};
use weft_dataplane::ipam::{Ipam, IpamConfig, PodCidrs, SystemClock};
use weft_dataplane::proto::PodRef;
use weft_dataplane::{attach, netns, proto};

fn can_run() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        eprintln!("skipping: needs root for network namespaces");
    }
    root
}

/// A namespace made with `ip netns add`, deleted on drop (also on panic).
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "wcni{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("ip")
                .success()
        );
        Netns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("weft-cni-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("tmp");
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct FakeGate {
    refuse: AtomicBool,
    seen: Mutex<Vec<(PodRef, Vec<IpAddr>)>>,
}

impl PolicyGate for FakeGate {
    fn wait_programmed(
        &self,
        pod: &PodRef,
        ips: &[IpAddr],
        _timeout: Duration,
    ) -> Result<(), String> {
        self.seen
            .lock()
            .expect("lock")
            .push((pod.clone(), ips.to_vec()));
        if self.refuse.load(Ordering::SeqCst) {
            Err("fake gate: pod not in the sets yet".into())
        } else {
            Ok(())
        }
    }
}

/// The in-test agent: serves the socket from a thread inside the node namespace.
struct Agent {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    fn start(node: &Netns, dir: &Path, cidrs: &[&str], gate: Arc<FakeGate>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = node.path();
        let dir = dir.to_owned();
        let nets: Vec<ipnet::IpNet> = cidrs.iter().map(|c| c.parse().expect("cidr")).collect();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            netns::run_in_blocking(&path, move |host| async move {
                let ipam = Ipam::open(
                    IpamConfig {
                        dir: dir.join("ipam"),
                        cidrs: PodCidrs::from_list(&nets).expect("cidrs"),
                        cooldown: Duration::from_secs(60),
                    },
                    Arc::new(SystemClock),
                )
                .expect("ipam");
                let config = ServiceConfig {
                    state_dir: dir.clone(),
                    mtu: 1450,
                    policy_timeout: Duration::from_millis(200),
                    gc_grace: Duration::ZERO,
                };
                let service = Arc::new(CniService::new(ipam, gate, config, host));
                let socket = dir.join("agent.sock");
                let listener = proto::bind(&socket).expect("bind");
                let _ = ready_tx.send(());
                while !flag.load(Ordering::SeqCst) {
                    if let Ok(Ok((stream, _))) =
                        tokio::time::timeout(Duration::from_millis(50), listener.accept()).await
                    {
                        let s = service.clone();
                        tokio::spawn(async move {
                            let _ = proto::serve_connection(
                                stream,
                                Duration::from_secs(5),
                                |req| async move { s.handle(req).await },
                            )
                            .await;
                        });
                    }
                }
                drop(listener);
                let _ = std::fs::remove_file(&socket);
            })
            .expect("agent netns");
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("agent ready");
        Agent {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Outcome {
    ok: bool,
    stdout: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout not JSON ({e}): {:?}", self.stdout))
    }
    fn code(&self) -> u64 {
        assert!(!self.ok, "expected failure, got {}", self.stdout);
        self.json()["code"].as_u64().expect("code")
    }
}

/// Run the plugin in `node` as a runtime would: CNI_* environment, config on stdin.
fn cni(node: &Netns, env: &[(&str, &str)], stdin: &str) -> Outcome {
    let mut cmd = Command::new("timeout");
    cmd.args([
        "30",
        "ip",
        "netns",
        "exec",
        &node.0,
        env!("CARGO_BIN_EXE_weft-cni"),
    ])
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .env("CNI_PATH", "/opt/cni/bin")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn weft-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    }
}

fn conf(dir: &Path, version: &str, extra: Value) -> String {
    let mut c = json!({
        "cniVersion": version,
        "name": "weft",
        "type": "weft-cni",
        "agentSocket": dir.join("agent.sock"),
        "stateDir": dir,
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c.to_string()
}

fn pod_env<'a>(
    cmd: &'a str,
    id: &'a str,
    netns: &'a str,
    args: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
    ]
}

const ARGS_A: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_INFRA_CONTAINER_ID=aaaa;K8S_POD_UID=uid-a";

#[test]
fn every_verb_through_the_binary_against_an_in_test_agent() {
    if !can_run() {
        return;
    }
    let tmp = TempDir::new("verbs");
    let node = Netns::new("node");
    let gate = Arc::new(FakeGate::default());
    let _agent = Agent::start(
        &node,
        &tmp.0,
        &["10.244.1.0/29", "fd00:10:244:1::/64"],
        gate.clone(),
    );
    let c11 = conf(&tmp.0, "1.1.0", json!({}));

    // VERSION
    let v = cni(
        &node,
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"1.1.0"}"#,
    );
    assert!(v.ok);
    assert_eq!(v.json()["supportedVersions"], json!(["1.0.0", "1.1.0"]));

    // ADD
    let pod_a = Netns::new("pa");
    let pa = pod_a.path().display().to_string();
    let add = cni(&node, &pod_env("ADD", "ctr-a", &pa, ARGS_A), &c11);
    assert!(add.ok, "{}", add.stdout);
    let r = add.json();
    assert_eq!(r["cniVersion"], "1.1.0");
    assert_eq!(r["ips"][0]["address"], "10.244.1.2/32");
    assert_eq!(r["ips"][1]["address"], "fd00:10:244:1::2/128");
    assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(r["ips"][0]["interface"], 1);
    assert_eq!(
        r["interfaces"][0]["name"],
        attach::host_veth_name("ctr-a", "eth0")
    );
    assert_eq!(r["interfaces"][1]["name"], "eth0");
    assert_eq!(r["interfaces"][1]["sandbox"], pa.as_str());
    assert_eq!(r["interfaces"][1]["mtu"], 1450);
    assert!(
        pod_a
            .ip(&["-o", "addr", "show", "dev", "eth0"])
            .contains("10.244.1.2/32")
    );
    {
        let seen = gate.seen.lock().expect("lock");
        assert_eq!(
            seen[0].0,
            PodRef {
                namespace: "shop".into(),
                name: "cart".into(),
                uid: "uid-a".into()
            }
        );
        assert_eq!(seen[0].1.len(), 2);
    }

    // ADD again: the same attachment, untouched.
    let again = cni(&node, &pod_env("ADD", "ctr-a", &pa, ARGS_A), &c11);
    assert!(again.ok);
    assert_eq!(again.json(), r);

    // CHECK passes silently, then names what is missing.
    let check = cni(
        &node,
        &pod_env("CHECK", "ctr-a", &pa, ARGS_A),
        &conf(&tmp.0, "1.1.0", json!({"prevResult": r})),
    );
    assert!(check.ok && check.stdout.is_empty(), "{}", check.stdout);
    pod_a.ip(&["-6", "route", "del", "default"]);
    let check = cni(&node, &pod_env("CHECK", "ctr-a", &pa, ARGS_A), &c11);
    assert_eq!(check.code(), 104);
    assert!(
        check.json()["details"]
            .as_str()
            .expect("details")
            .contains("::/0 via fe80::1"),
        "{}",
        check.stdout
    );

    // 1.0.0 config: accepted, answered in 1.0.0 (no interface MTU).
    let pod_b = Netns::new("pb");
    let pb = pod_b.path().display().to_string();
    let add_b = cni(
        &node,
        &pod_env("ADD", "ctr-b", &pb, "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=b"),
        &conf(&tmp.0, "1.0.0", json!({})),
    );
    assert!(add_b.ok, "{}", add_b.stdout);
    assert_eq!(add_b.json()["cniVersion"], "1.0.0");
    assert!(add_b.json()["interfaces"][1].get("mtu").is_none());

    // Pinned address (the `ips` capability), and refusals.
    let pod_c = Netns::new("pc");
    let pc = pod_c.path().display().to_string();
    let pinned = conf(
        &tmp.0,
        "1.1.0",
        json!({"runtimeConfig": {"ips": ["10.244.1.6/29"]}}),
    );
    let add_c = cni(
        &node,
        &pod_env("ADD", "ctr-c", &pc, "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=c"),
        &pinned,
    );
    assert!(add_c.ok, "{}", add_c.stdout);
    assert_eq!(add_c.json()["ips"][0]["address"], "10.244.1.6/32");
    let pod_d = Netns::new("pd");
    let pd = pod_d.path().display().to_string();
    let d_args = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=d";
    let taken = cni(&node, &pod_env("ADD", "ctr-d", &pd, d_args), &pinned);
    assert_eq!(taken.code(), 102);
    assert!(
        taken.json()["details"]
            .as_str()
            .expect("details")
            .contains("in use by ctr-c/eth0")
    );
    let outside = conf(
        &tmp.0,
        "1.1.0",
        json!({"runtimeConfig": {"ips": ["10.9.9.9"]}}),
    );
    assert_eq!(
        cni(&node, &pod_env("ADD", "ctr-d", &pd, d_args), &outside).code(),
        102
    );

    // Policy not programmed in time: retryable failure.
    gate.refuse.store(true, Ordering::SeqCst);
    let refused = cni(&node, &pod_env("ADD", "ctr-d", &pd, d_args), &c11);
    assert_eq!(refused.code(), 11);
    assert!(
        refused.json()["msg"]
            .as_str()
            .expect("msg")
            .contains("shop/d"),
        "{}",
        refused.stdout
    );
    gate.refuse.store(false, Ordering::SeqCst);
    assert!(
        cni(&node, &pod_env("ADD", "ctr-d", &pd, d_args), &c11).ok,
        "retry succeeds"
    );

    // Exhausted range: /29 has .2 … .6; a, b, c (.6), d hold four, e takes the last.
    let pod_e = Netns::new("pe");
    let pe = pod_e.path().display().to_string();
    assert!(
        cni(
            &node,
            &pod_env("ADD", "ctr-e", &pe, "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=e"),
            &c11
        )
        .ok
    );
    let pod_f = Netns::new("pf");
    let pf = pod_f.path().display().to_string();
    let full = cni(
        &node,
        &pod_env("ADD", "ctr-f", &pf, "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=f"),
        &c11,
    );
    assert_eq!(full.code(), 101, "{}", full.stdout);

    // Configuration and environment errors.
    assert_eq!(
        cni(&node, &pod_env("ADD", "ctr-f", &pf, ""), "{not json").code(),
        6
    );
    assert_eq!(
        cni(
            &node,
            &pod_env("ADD", "ctr-f", &pf, ""),
            &conf(&tmp.0, "0.4.0", json!({}))
        )
        .code(),
        1
    );
    assert_eq!(
        cni(
            &node,
            &pod_env("ADD", "ctr-f", &pf, ""),
            &conf(&tmp.0, "2.0.0", json!({}))
        )
        .code(),
        1
    );
    assert_eq!(cni(&node, &[("CNI_CONTAINERID", "x")], &c11).code(), 4);
    assert_eq!(
        cni(
            &node,
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "x"),
                ("CNI_IFNAME", "eth0")
            ],
            &c11
        )
        .code(),
        4
    );
    let bad_ips = conf(
        &tmp.0,
        "1.1.0",
        json!({"runtimeConfig": {"ips": ["nonsense"]}}),
    );
    assert_eq!(
        cni(&node, &pod_env("ADD", "ctr-f", &pf, ""), &bad_ips).code(),
        7
    );

    // STATUS
    let status = cni(&node, &[("CNI_COMMAND", "STATUS")], &c11);
    assert!(status.ok && status.stdout.is_empty());

    // DEL: idempotent, also for containers never seen.
    let del = cni(&node, &pod_env("DEL", "ctr-b", &pb, ""), &c11);
    assert!(del.ok && del.stdout.is_empty(), "{}", del.stdout);
    assert!(
        !node
            .ip(&["-o", "link"])
            .contains(&attach::host_veth_name("ctr-b", "eth0"))
    );
    assert!(cni(&node, &pod_env("DEL", "ctr-b", &pb, ""), &c11).ok);
    assert!(cni(&node, &pod_env("DEL", "never-added", "", ""), &c11).ok);

    // GC: only ctr-a stays.
    let gc = conf(
        &tmp.0,
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"containerID": "ctr-a", "ifname": "eth0"}]}),
    );
    let out = cni(&node, &[("CNI_COMMAND", "GC")], &gc);
    assert!(out.ok && out.stdout.is_empty(), "{}", out.stdout);
    let links = node.ip(&["-o", "link"]);
    assert!(
        links.contains(&attach::host_veth_name("ctr-a", "eth0")),
        "{links}"
    );
    for gone in ["ctr-c", "ctr-d", "ctr-e"] {
        assert!(
            !links.contains(&attach::host_veth_name(gone, "eth0")),
            "{gone} still linked: {links}"
        );
    }
    let state = std::fs::read_to_string(tmp.0.join("ipam/state.json")).expect("state");
    assert!(
        state.contains("ctr-a/eth0") && !state.contains("ctr-c/eth0"),
        "{state}"
    );
}

#[test]
fn with_the_agent_down_add_is_retryable_status_unavailable_and_del_still_cleans_up() {
    if !can_run() {
        return;
    }
    let tmp = TempDir::new("down");
    let node = Netns::new("node");
    let gate = Arc::new(FakeGate::default());
    let c11 = conf(&tmp.0, "1.1.0", json!({}));
    let pod = Netns::new("p");
    let pp = pod.path().display().to_string();
    let cidrs = ["10.244.2.0/24"];
    let agent = Agent::start(&node, &tmp.0, &cidrs, gate.clone());
    assert!(cni(&node, &pod_env("ADD", "ctr-x", &pp, ARGS_A), &c11).ok);
    drop(agent);

    let add = cni(&node, &pod_env("ADD", "ctr-y", &pp, ARGS_A), &c11);
    assert_eq!(add.code(), 11);
    assert!(
        add.json()["msg"]
            .as_str()
            .expect("msg")
            .contains("not running")
    );
    assert_eq!(cni(&node, &[("CNI_COMMAND", "STATUS")], &c11).code(), 50);
    assert_eq!(
        cni(&node, &pod_env("CHECK", "ctr-x", &pp, ARGS_A), &c11).code(),
        11
    );

    let host = attach::host_veth_name("ctr-x", "eth0");
    assert!(node.ip(&["-o", "link"]).contains(&host));
    let del = cni(&node, &pod_env("DEL", "ctr-x", &pp, ARGS_A), &c11);
    assert!(del.ok, "{}", del.stdout);
    assert!(
        !node.ip(&["-o", "link"]).contains(&host),
        "plugin removed the host veth itself"
    );
    let records = tmp.0.join("cni-release");
    assert_eq!(std::fs::read_dir(&records).expect("records").count(), 1);
    assert!(cni(&node, &pod_env("DEL", "ctr-unknown", "", ""), &c11).ok);

    // Back up: the first request drains the records and frees the address.
    let _agent = Agent::start(&node, &tmp.0, &cidrs, gate);
    assert!(cni(&node, &[("CNI_COMMAND", "STATUS")], &c11).ok);
    assert_eq!(std::fs::read_dir(&records).expect("records").count(), 0);
    let state = std::fs::read_to_string(tmp.0.join("ipam/state.json")).expect("state");
    assert!(!state.contains("ctr-x/eth0"), "{state}");
}

/// Not run by default (`cargo test -p weft-cni -- --ignored --nocapture`): ADD latency as
/// the runtime sees it, plugin exec through `ip netns exec` included, fake gate (no policy).
#[test]
#[ignore]
fn add_latency_over_100_pods() {
    if !can_run() {
        return;
    }
    let tmp = TempDir::new("latency");
    let node = Netns::new("node");
    let _agent = Agent::start(
        &node,
        &tmp.0,
        &["10.244.3.0/24", "fd00:10:244:3::/64"],
        Arc::new(FakeGate::default()),
    );
    let c11 = conf(&tmp.0, "1.1.0", json!({}));
    let pods: Vec<Netns> = (0..100).map(|i| Netns::new(&format!("l{i}"))).collect();
    let mut times = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let path = p.path().display().to_string();
        let id = format!("lat-{i}");
        let started = std::time::Instant::now();
        let out = cni(
            &node,
            &pod_env("ADD", &id, &path, "K8S_POD_NAMESPACE=l;K8S_POD_NAME=p"),
            &c11,
        );
        times.push(started.elapsed());
        assert!(out.ok, "{}", out.stdout);
    }
    let baseline = {
        let started = std::time::Instant::now();
        let _ = cni(&node, &[("CNI_COMMAND", "VERSION")], "{}");
        started.elapsed()
    };
    times.sort();
    eprintln!(
        "ADD over 100 pods: p50 {:?}, p99 {:?}, max {:?} (one VERSION exec through ip netns exec: {:?})",
        times[49], times[98], times[99], baseline
    );
}
