//! A fresh cluster for one run: the control plane of `conformance/k8s/cluster.sh` (etcd,
//! kube-apiserver, kube-controller-manager in `weft-cf-host`), then per node namespace a Node
//! object (podCIDRs of the `PinnedPodIPs` plan set at creation), a `weft agent` and a
//! `kube-proxy` (nftables mode), as `conformance/lab/lab.sh` starts them.
//!
//! The harness's own API client runs in `weft-cf-host`: the thread that owns the [`Cluster`]
//! moves there once the control plane is up (and back before tearing it down), so every socket
//! it opens (the API, the agents' and kube-proxies' HTTP ports on the underlay) is there, and
//! nothing is ever opened in the root namespace.
//!
//! Every pod namespace the harness makes is also appended to the control plane's record of its
//! namespaces (`DIR/cluster/state/netns`), so `cluster.sh down DIR/cluster` removes all of it
//! even after the harness was killed; the next run does that first when it finds such a record.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::netns;
use crate::case::pinned_subnets;

/// Namespace prefix of everything a run creates.
pub const PREFIX: &str = "weft-cf";

/// The source tree's `conformance/` directory (scripts are run from there).
pub fn conformance_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Node i's name (and namespace).
pub fn node_name(i: usize) -> String {
    format!("{PREFIX}-node{i}")
}

/// Node i's underlay address.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, u8::try_from(10 + i).unwrap_or(255))
}

/// The running cluster: control plane, node processes, the API client.
pub struct Cluster {
    /// The run directory (`cluster/` inside is cluster.sh's).
    pub dir: PathBuf,
    /// Number of nodes.
    pub nodes: usize,
    /// The `weft-cni` binary.
    pub cni: PathBuf,
    /// A current-thread runtime for the API client (driven from the owning thread only).
    pub rt: tokio::runtime::Runtime,
    /// Admin client of the apiserver.
    pub client: kube::Client,
    children: Vec<(String, Child)>,
    root_ns: Option<File>,
    up: bool,
}

/// Progress on stderr.
pub fn progress(msg: &str) {
    eprintln!("[conformance {}] {msg}", clock());
}

/// Seconds since the epoch, mod a day, as HH:MM:SS (UTC).
fn clock() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
        % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn run_script(script: &Path, args: &[&str], env: &[(&str, String)]) -> Result<String, String> {
    let mut cmd = Command::new("bash");
    cmd.arg(script).args(args).stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("bash {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({})",
            script.display(),
            args.join(" "),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes what an earlier run in `dir` left (its control plane and every namespace it
/// recorded), and any `weft-cf-` namespace left besides (only one run at a time holds the
/// lock, see [`super::run`], so such a namespace is an earlier run's).
pub fn clean_stale(dir: &Path) -> Result<(), String> {
    let cluster = dir.join("cluster");
    if cluster.join("state").exists() {
        progress(&format!(
            "removing what an earlier run left in {}",
            dir.display()
        ));
        let script = conformance_dir().join("k8s/cluster.sh");
        run_script(&script, &["down", &cluster.to_string_lossy()], &[])?;
    }
    remove_leftover_namespaces()?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("rm {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Deletes every `weft-cf-` namespace that still exists, after killing what runs in it.
pub fn remove_leftover_namespaces() -> Result<(), String> {
    let left = netns::list(&format!("{PREFIX}-"));
    for name in &left {
        progress(&format!("removing leftover namespace {name}"));
        if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        netns::delete(name)?;
    }
    Ok(())
}

impl Cluster {
    /// Brings up the control plane and `nodes` nodes. On failure, what was started is removed
    /// (by dropping the partly built cluster).
    pub fn up(dir: &Path, nodes: usize) -> Result<Cluster, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
        let bin = exe.parent().unwrap_or(Path::new("."));
        let cni = bin.join("weft-cni");
        if !cni.exists() {
            return Err(format!(
                "{} missing: build it (cargo build -p weft-cni)",
                cni.display()
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        progress("Kubernetes components (built once, cached)");
        let k8s = conformance_dir().join("k8s");
        let out = run_script(&k8s.join("install.sh"), &[], &[])?;
        let k8s_bin = PathBuf::from(out.lines().last().unwrap_or_default().trim());
        let cluster_dir = dir.join("cluster");
        progress(&format!("control plane + {nodes} node namespaces"));
        // From here on, a failure tears down what was started: `down` reads cluster.sh's state.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let up = run_script(
            &k8s.join("cluster.sh"),
            &["up", &cluster_dir.to_string_lossy()],
            &[
                ("WEFT_NS_PREFIX", PREFIX.to_string()),
                ("WEFT_NODES", nodes.to_string()),
            ],
        );
        // cluster.sh tears down on its own failure.
        up?;
        let root_ns = netns::current().map_err(|e| format!("own netns: {e}"))?;
        let host =
            netns::open(&format!("{PREFIX}-host")).map_err(|e| format!("host netns: {e}"))?;
        netns::enter(&host).map_err(|e| format!("setns host: {e}"))?;
        let client = match rt.block_on(client(&cluster_dir.join("kubeconfig/admin.kubeconfig"))) {
            Ok(c) => c,
            Err(e) => {
                let _ = netns::enter(&root_ns);
                let _ = run_script(
                    &k8s.join("cluster.sh"),
                    &["down", &cluster_dir.to_string_lossy()],
                    &[],
                );
                return Err(e);
            }
        };
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            nodes,
            cni,
            rt,
            client,
            children: Vec::new(),
            root_ns: Some(root_ns),
            up: true,
        };
        cluster.start_nodes(&exe, &k8s_bin)?;
        Ok(cluster)
    }

    fn start_nodes(&mut self, exe: &Path, k8s_bin: &Path) -> Result<(), String> {
        let cluster_dir = self.dir.join("cluster");
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| format!("mkdir logs: {e}"))?;
        let cni_bin = self.cni.parent().unwrap_or(Path::new(".")).to_path_buf();
        for i in 1..=self.nodes {
            let name = node_name(i);
            let ip = node_ip(i);
            let (v4, v6) = pinned_subnets(i).ok_or("too many nodes for the pinned plan")?;
            let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
                "spec": {"podCIDR": v4.to_string(), "podCIDRs": [v4.to_string(), v6.to_string()]},
            }))
            .map_err(|e| e.to_string())?;
            let api: kube::Api<k8s_openapi::api::core::v1::Node> =
                kube::Api::all(self.client.clone());
            self.rt
                .block_on(api.create(&kube::api::PostParams::default(), &node))
                .map_err(|e| format!("create Node {name}: {e}"))?;
            let status = serde_json::json!({"status": {"addresses": [
                {"type": "InternalIP", "address": ip.to_string()},
                {"type": "Hostname", "address": name},
            ]}});
            self.rt
                .block_on(api.patch_status(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(status),
                ))
                .map_err(|e| format!("Node {name} status: {e}"))?;
            netns::ip(&[
                "netns",
                "exec",
                &name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ])
            .or_else(|_| {
                // `ip netns exec` runs any command; sysctl's quiet flag differs by version
                netns::ip(&[
                    "netns",
                    "exec",
                    &name,
                    "sysctl",
                    "-w",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                ])
            })?;
            let run = self.dir.join(format!("run/node{i}"));
            std::fs::create_dir_all(&run).map_err(|e| format!("mkdir {}: {e}", run.display()))?;
            let agent_args: Vec<String> = vec![
                "agent".into(),
                "--node".into(),
                name.clone(),
                "--kubeconfig".into(),
                cluster_dir
                    .join(format!("kubeconfig/node{i}.kubeconfig"))
                    .to_string_lossy()
                    .into(),
                "--metrics-addr".into(),
                format!("{ip}:6784"),
                "--socket".into(),
                run.join("agent.sock").to_string_lossy().into(),
                "--state-dir".into(),
                run.to_string_lossy().into(),
                "--underlay-ip".into(),
                ip.to_string(),
                "--cluster-cidrs".into(),
                "10.244.0.0/16,fd00:10:244::/48,10.96.0.0/16,fd00:10:96::/112".into(),
                "--cni-conf-dir".into(),
                run.join("net.d").to_string_lossy().into(),
                "--cni-bin-dir".into(),
                cni_bin.to_string_lossy().into(),
            ];
            self.spawn(&format!("agent-node{i}"), &name, exe, &agent_args)?;
            let proxy_args: Vec<String> = vec![
                "--kubeconfig".into(),
                cluster_dir
                    .join("kubeconfig/kube-proxy.kubeconfig")
                    .to_string_lossy()
                    .into(),
                "--proxy-mode".into(),
                "nftables".into(),
                "--hostname-override".into(),
                name.clone(),
                "--cluster-cidr".into(),
                "10.244.0.0/16,fd00:10:244::/48".into(),
                "--conntrack-max-per-core".into(),
                "0".into(),
                "--conntrack-min".into(),
                "0".into(),
                "--metrics-bind-address".into(),
                format!("{ip}:10249"),
                "--healthz-bind-address".into(),
                format!("{ip}:10256"),
            ];
            self.spawn(
                &format!("kube-proxy-node{i}"),
                &name,
                &k8s_bin.join("kube-proxy"),
                &proxy_args,
            )?;
        }
        for i in 1..=self.nodes {
            let ip = node_ip(i);
            self.wait_http(
                &format!("weft agent on node{i}"),
                SocketAddr::from((ip, 6784)),
                "/readyz",
                90,
            )?;
            let conflist = self.dir.join(format!("run/node{i}/net.d/10-weft.conflist"));
            wait_until(&format!("the conflist of node{i}"), 30, || {
                conflist.exists()
            })?;
            self.wait_http(
                &format!("kube-proxy on node{i}"),
                SocketAddr::from((ip, 10256)),
                "/healthz",
                60,
            )?;
        }
        progress(&format!(
            "cluster up: {} nodes, agents and kube-proxies ready",
            self.nodes
        ));
        Ok(())
    }

    fn spawn(
        &mut self,
        label: &str,
        ns: &str,
        program: &Path,
        args: &[String],
    ) -> Result<(), String> {
        let log_path = self.dir.join(format!("logs/{label}.log"));
        let log_file =
            File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let err_file = log_file.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            // its own process group: a Ctrl-C at the terminal reaches the harness, which tears
            // down in order, not every daemon at once
            .process_group(0)
            .spawn()
            .map_err(|e| format!("start {label}: {e}"))?;
        self.children.push((label.to_string(), child));
        Ok(())
    }

    fn wait_http(
        &mut self,
        what: &str,
        addr: SocketAddr,
        path: &str,
        secs: u64,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok((200, _)) = http_get(addr, path) {
                return Ok(());
            }
            for (label, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "{label} exited ({status}) while waiting for {what}: see {}",
                        self.dir.join(format!("logs/{label}.log")).display()
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("timed out after {secs}s waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Appends a pod namespace to the control plane's namespace record (see the module docs).
    pub fn record_netns(&self, name: &str) -> Result<(), String> {
        let path = self.dir.join("cluster/state/netns");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        writeln!(f, "{name}").map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The agent socket of node i.
    pub fn agent_socket(&self, i: usize) -> PathBuf {
        self.dir.join(format!("run/node{i}/agent.sock"))
    }

    /// Stops the node processes and the control plane, and deletes every namespace of the run.
    pub fn down(&mut self) -> Result<(), String> {
        if !self.up {
            return Ok(());
        }
        self.up = false;
        for (_, child) in &self.children {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (label, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        progress(&format!("{label} ignored SIGTERM: killing it"));
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.children.clear();
        if let Some(root) = self.root_ns.take() {
            netns::enter(&root).map_err(|e| format!("setns back: {e}"))?;
        }
        let script = conformance_dir().join("k8s/cluster.sh");
        let down = run_script(
            &script,
            &["down", &self.dir.join("cluster").to_string_lossy()],
            &[],
        );
        // whatever `down` missed (it keeps its record then; the next run also looks)
        let left = remove_leftover_namespaces();
        down.map(drop).and(left)
    }

    /// Leaves everything running (`--keep`), moving this thread back to its namespace.
    pub fn keep(&mut self) {
        self.up = false;
        // not waited for any more: `cluster.sh down` kills what runs in its namespaces
        self.children.clear();
        if let Some(root) = self.root_ns.take() {
            let _ = netns::enter(&root);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            progress(&format!("teardown: {e}"));
        }
    }
}

async fn client(kubeconfig: &Path) -> Result<kube::Client, String> {
    let kc =
        kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| format!("kubeconfig: {e}"))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| format!("kubeconfig: {e}"))?;
    config.read_timeout = Some(Duration::from_secs(30));
    kube::Client::try_from(config).map_err(|e| format!("client: {e}"))
}

/// Polls `ok` every 100 ms for up to `secs`.
pub fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        if Instant::now() >= deadline {
            return Err(format!("timed out after {secs}s waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A plain HTTP/1.0 GET; (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    read_response(&mut s)
}

/// Reads an HTTP/1.0 response to the end; (status, body).
pub fn read_response(s: &mut impl Read) -> std::io::Result<(u16, String)> {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok((status, body.to_string()))
}
