//! The real-cluster target: `weft conformance run --cases FILE` without `--oracle`.
//!
//! [`run`] brings up a fresh cluster ([`bringup`]: the control plane of
//! `conformance/k8s/cluster.sh`, then per node a Node object, a `weft agent` and a
//! `kube-proxy` in nftables mode, as the lab has them), replays the file on it through
//! [`ClusterTarget`], prints the report, the realization figure and the time, and always
//! tears everything down (also on a failure, a panic or Ctrl-C).
//!
//! [`ClusterTarget`] plays the kubelet. Nodes follow the `PinnedPodIPs` plan of CASES.md: the
//! n-th namespace of a case has its pods on node n, whose podCIDRs are the plan's subnets, and
//! every pod asks for its plan address through the CNI `ips` capability (`runtimeConfig.ips`);
//! the plan's first address (`.1`, `::1`) is weft's tunnel address on the node, so pods get the
//! plan's addresses from the second one on. A pod is: the API object (nodeName, labels,
//! container ports) → a network namespace `weft-cf-p-<ns>_<pod>` → CNI ADD through the real
//! `weft-cni` binary → the status (podIP, podIPs, Ready) → a server thread in its namespace on
//! the case's ports ([`server`]) → the ClusterIP Service `s-<ns>-<pod>` (PreferDualStack),
//! ready once every node's kube-proxy has it ([`settle`]). Namespaces are created once and
//! relabelled to exactly the case's labels by later cases (a namespace deletion takes the
//! namespace controller seconds); pods, Services and policies are deleted after each case.
//!
//! Probes run on the runner's threads, each moving into the client pod's namespace first
//! ([`probe`]); through the destination's Service ClusterIP, as upstream does, or its pod IP,
//! or both (`WEFT_CONFORMANCE_VIA=service|pod|both`; both: a cell is observed only when the
//! two agree). Before each batch of checks, [`ClusterTarget::settle`] waits until every agent
//! reports every write's resourceVersion applied, and records the time it took.

pub mod bringup;
pub mod netns;
pub mod probe;
pub mod server;
pub mod settle;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use weft_netpol::ruleset::{Family, Protocol};

use crate::case::{self, Feature, PodAddresses, PodRef, PodSpec, Server};
use crate::command::{CommandError, RunArgs};
use crate::report::Summary;
use crate::runner::{CaseSetup, ClusterDriver, DriverError, Observation, Prober, RunOptions};
use bringup::{Cluster, PREFIX, node_ip, node_name, progress};
use server::Servers;
use settle::{Kind, Realization, Realizer, ServicePort};

/// How to run on a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Nodes to start (default: the most namespaces any case has).
    pub nodes: Option<usize>,
    /// Leave the cluster running at the end (the pods' servers end with the harness).
    pub keep: bool,
    /// The run directory (default `/tmp/weft-cf`, env `WEFT_CONFORMANCE_DIR`).
    pub dir: PathBuf,
    /// Only cases whose id contains one of these (env `WEFT_CASES_FILTER`, comma-separated).
    pub filter: Vec<String>,
    /// What probes go to.
    pub via: Via,
    /// How long a probe waits for an answer.
    pub probe_timeout: Duration,
}

impl ClusterOptions {
    /// Defaults, with the environment's overrides (`WEFT_CONFORMANCE_DIR`, `WEFT_CASES_FILTER`,
    /// `WEFT_CONFORMANCE_VIA`, `WEFT_PROBE_TIMEOUT_MS`).
    pub fn from_env(nodes: Option<usize>, keep: bool) -> Result<ClusterOptions, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let via = match var("WEFT_CONFORMANCE_VIA").as_deref() {
            None | Some("service") => Via::Service,
            Some("pod") => Via::PodIp,
            Some("both") => Via::Both,
            Some(other) => {
                return Err(format!(
                    "WEFT_CONFORMANCE_VIA={other}: want service, pod or both"
                ));
            }
        };
        let probe_timeout = match var("WEFT_PROBE_TIMEOUT_MS") {
            None => Duration::from_millis(1000),
            Some(ms) => Duration::from_millis(
                ms.parse()
                    .map_err(|_| format!("WEFT_PROBE_TIMEOUT_MS={ms}: not a number"))?,
            ),
        };
        Ok(ClusterOptions {
            nodes,
            keep,
            dir: PathBuf::from(
                var("WEFT_CONFORMANCE_DIR").unwrap_or_else(|| "/tmp/weft-cf".into()),
            ),
            filter: var("WEFT_CASES_FILTER")
                .map(|f| {
                    f.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            via,
            probe_timeout,
        })
    }
}

/// Where a probe goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The destination's Service ClusterIP (upstream's way).
    Service,
    /// The destination pod's address.
    PodIp,
    /// Both; the cell is observed only when they agree.
    Both,
}

/// Why a cluster run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Loading or reporting.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// Bringing the cluster up (or another run holds it).
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Set by SIGINT/SIGTERM: every wait and probe gives up, the run tears down.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Runs a case file on a fresh cluster and tears it down.
pub fn run(
    args: &RunArgs,
    options: &ClusterOptions,
    out: &mut dyn std::io::Write,
) -> Result<Summary, ClusterError> {
    let started = Instant::now();
    let mut file = case::load(&args.cases).map_err(CommandError::from)?;
    if !options.filter.is_empty() {
        file.cases
            .retain(|c| options.filter.iter().any(|f| c.id.contains(f.as_str())));
        progress(&format!(
            "WEFT_CASES_FILTER: {} of the file's cases",
            file.cases.len()
        ));
    }
    let needed = file
        .cases
        .iter()
        .map(|c| c.namespaces.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let nodes = options.nodes.unwrap_or(needed);
    if nodes < needed {
        return Err(ClusterError::Cluster(format!(
            "--nodes {nodes}: a case has {needed} namespaces, and the n-th namespace's pods go to node n"
        )));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(ClusterError::Cluster(
            "must run as root (network namespaces)".into(),
        ));
    }
    let _lock = lock().map_err(ClusterError::Cluster)?;
    bringup::clean_stale(&options.dir).map_err(ClusterError::Cluster)?;
    watch_signals();
    let cluster = Cluster::up(&options.dir, nodes).map_err(ClusterError::Cluster)?;
    let up_time = started.elapsed();
    let mut target = ClusterTarget::new(cluster, options);
    let run_options = RunOptions {
        family: if args.ipv6 { Family::V6 } else { Family::V4 },
        parallelism: args.parallelism.max(1),
    };
    let result = crate::command::run_and_report(&file, &mut target, &run_options, args, out);
    let _ = writeln!(out, "{}", target.realization().summary());
    let _ = writeln!(
        out,
        "time: {:.0} s in all ({:.0} s cluster bring-up){}",
        started.elapsed().as_secs_f64(),
        up_time.as_secs_f64(),
        if interrupted() { "; INTERRUPTED" } else { "" }
    );
    if options.keep {
        target.keep(&options.dir);
    } else {
        target.teardown();
    }
    if interrupted() {
        return Err(ClusterError::Cluster("interrupted".into()));
    }
    Ok(result?)
}

/// One run at a time on the machine (the namespace names are fixed).
fn lock() -> Result<nix::fcntl::Flock<File>, String> {
    let path = PathBuf::from("/tmp/weft-cf.lock");
    let f = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| format!("another run holds {} ({e})", path.display()))
}

/// Turns SIGINT and SIGTERM into [`INTERRUPTED`] (once per process).
fn watch_signals() {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::SeqCst) {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    INTERRUPTED.store(true, Ordering::SeqCst);
                    progress("interrupted: finishing the current step, then tearing down");
                }
            });
        });
}

/// A pod as the harness made it.
struct LivePod {
    uid: String,
    node: usize,
    netns: String,
    ns_file: Option<File>,
    cni_added: bool,
    addresses: PodAddresses,
    service_ips: BTreeMap<Family, IpAddr>,
    service: Option<String>,
    /// Stopped (joined) when the pod goes.
    servers: Option<Servers>,
}

/// The cluster as a [`ClusterDriver`] and [`Prober`].
pub struct ClusterTarget {
    // Field order is drop order: pods (their server threads) before the cluster.
    pods: BTreeMap<PodRef, LivePod>,
    numbers: BTreeMap<String, usize>,
    namespaces: BTreeSet<String>,
    used: BTreeSet<IpAddr>,
    realizer: Realizer,
    case_started: Option<(String, Instant)>,
    via: Via,
    probe_timeout: Duration,
    cluster: Cluster,
}

type DResult<T> = Result<T, DriverError>;

fn err(what: impl Into<String>, e: impl std::fmt::Display) -> DriverError {
    DriverError::new(what, e.to_string())
}

fn rv_of(meta: &kube::api::ObjectMeta) -> Option<u64> {
    meta.resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
}

/// Deletes an object and returns the deletion's resourceVersion, read from a watch started at
/// the object's last version (the API answers most deletions with a Status, which lacks it).
/// `None` if it was not there.
async fn delete_timed<K>(
    api: &Api<K>,
    name: &str,
    dp: &DeleteParams,
) -> Result<Option<u64>, kube::Error>
where
    K: Clone + std::fmt::Debug + serde::de::DeserializeOwned + kube::Resource + Send + 'static,
{
    use futures::StreamExt;
    let Some(obj) = api.get_opt(name).await? else {
        return Ok(None);
    };
    let rv = obj.meta().resource_version.clone().unwrap_or_default();
    let wp = kube::api::WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(15);
    let mut events = api.watch(&wp, &rv).await?.boxed();
    match api.delete(name, dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
        Err(e) => return Err(e),
    }
    while let Some(event) = events.next().await {
        if let kube::api::WatchEvent::Deleted(gone) = event? {
            return Ok(rv_of(gone.meta()));
        }
    }
    Ok(None)
}

fn protocol_api(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

fn protocol_nft(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn pod_netns(pod: &PodRef) -> String {
    // '_' cannot be in a Kubernetes name: unique per (namespace, name)
    format!("{PREFIX}-p-{}_{}", pod.namespace, pod.name)
}

fn service_name(pod: &PodRef) -> String {
    format!("s-{}-{}", pod.namespace, pod.name)
}

impl ClusterTarget {
    /// A target on a running cluster.
    pub fn new(cluster: Cluster, options: &ClusterOptions) -> ClusterTarget {
        ClusterTarget {
            pods: BTreeMap::new(),
            numbers: BTreeMap::new(),
            namespaces: BTreeSet::new(),
            used: BTreeSet::new(),
            realizer: Realizer::start(
                (1..=cluster.nodes)
                    .map(|i| cluster.agent_socket(i))
                    .collect(),
            ),
            case_started: None,
            via: options.via,
            probe_timeout: options.probe_timeout,
            cluster,
        }
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.cluster.rt.block_on(f)
    }

    fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.cluster.client.clone(), namespace)
    }

    fn check_interrupt(&self, what: &str) -> DResult<()> {
        if interrupted() {
            Err(DriverError::new(what, "interrupted"))
        } else {
            Ok(())
        }
    }

    fn wrote(&mut self, kind: Kind, meta: &kube::api::ObjectMeta) {
        self.wrote_rv(kind, rv_of(meta));
    }

    fn wrote_rv(&mut self, kind: Kind, rv: Option<u64>) {
        if let Some(rv) = rv {
            self.realizer.wrote(kind, rv);
        }
    }

    /// The realization samples so far.
    pub fn realization(&self) -> Realization {
        self.realizer.realization()
    }

    /// Namespaces with exactly these labels (created, or relabelled if an earlier case made
    /// them).
    fn ensure_namespace(&mut self, name: &str, labels: &BTreeMap<String, String>) -> DResult<()> {
        let what = format!("namespace {name}");
        let api: Api<Namespace> = Api::all(self.cluster.client.clone());
        let mut want = labels.clone();
        want.insert(case::NAMESPACE_NAME_LABEL.into(), name.into());
        let existing = self.block(api.get_opt(name)).map_err(|e| err(&what, e))?;
        let written = match existing {
            None => {
                let ns: Namespace =
                    serde_json::from_value(json!({"metadata": {"name": name, "labels": want}}))
                        .map_err(|e| err(&what, e))?;
                let made = self
                    .block(api.create(&PostParams::default(), &ns))
                    .map_err(|e| err(&what, e))?;
                // Pods are admitted once the namespace's default ServiceAccount exists.
                let sa: Api<ServiceAccount> = self.api(name);
                let deadline = Instant::now() + Duration::from_secs(30);
                while self
                    .block(sa.get_opt("default"))
                    .map_err(|e| err(&what, e))?
                    .is_none()
                {
                    if Instant::now() >= deadline {
                        return Err(DriverError::new(
                            what,
                            "no default ServiceAccount after 30 s",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                made
            }
            Some(mut ns) if ns.metadata.labels.as_ref() != Some(&want) => {
                ns.metadata.labels = Some(want);
                self.block(api.replace(name, &PostParams::default(), &ns))
                    .map_err(|e| err(&what, e))?
            }
            Some(ns) => {
                self.namespaces.insert(name.into());
                let _ = ns;
                return Ok(());
            }
        };
        self.wrote(Kind::Namespaces, &written.metadata);
        self.namespaces.insert(name.into());
        Ok(())
    }

    fn addresses_for(&self, spec: &PodSpec) -> DResult<(usize, PodAddresses)> {
        let what = || format!("create pod {}", spec.pod);
        let number = *self
            .numbers
            .get(&spec.pod.namespace)
            .ok_or_else(|| DriverError::new(what(), "its namespace is not in the case"))?;
        let requested = PodAddresses {
            ipv4: spec.ip,
            ipv6: spec.ipv6,
        };
        let a = crate::case::assign_addresses(number, requested, &self.used)
            .map_err(|why| DriverError::new(what(), why))?;
        Ok((number, a))
    }

    /// Creates pods (API, netns, CNI, status, servers, Services) and waits until every node's
    /// kube-proxy has their Services.
    fn create_pods(&mut self, specs: &[PodSpec], server: &Server) -> DResult<Vec<PodAddresses>> {
        self.check_interrupt("create pods")?;
        // 1. API objects and namespaces, in order.
        for spec in specs {
            let what = format!("create pod {}", spec.pod);
            if self.pods.contains_key(&spec.pod) {
                return Err(DriverError::new(what, "already exists"));
            }
            let (number, addresses) = self.addresses_for(spec)?;
            let mut labels = spec.labels.clone();
            labels.insert(case::POD_LABEL.into(), spec.pod.name.clone());
            let ports: Vec<serde_json::Value> = spec
                .ports
                .iter()
                .map(|p| {
                    let mut v = json!({"containerPort": p.container_port, "protocol": protocol_api(p.protocol)});
                    if let Some(n) = &p.name {
                        v["name"] = json!(n);
                    }
                    v
                })
                .collect();
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"namespace": spec.pod.namespace, "name": spec.pod.name, "labels": labels},
                "spec": {
                    "nodeName": node_name(number),
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "main", "image": "weft.invalid/none", "ports": ports}],
                },
            }))
            .map_err(|e| err(&what, e))?;
            let api: Api<Pod> = self.api(&spec.pod.namespace);
            let made = self
                .block(api.create(&PostParams::default(), &pod))
                .map_err(|e| err(&what, e))?;
            self.wrote(Kind::Pods, &made.metadata);
            for f in Family::ALL {
                if let Some(ip) = addresses.get(f) {
                    self.used.insert(ip);
                }
            }
            let name = pod_netns(&spec.pod);
            self.cluster
                .record_netns(&name)
                .map_err(|e| err(&what, e))?;
            self.pods.insert(
                spec.pod.clone(),
                LivePod {
                    uid: made.metadata.uid.clone().unwrap_or_default(),
                    node: number,
                    netns: name.clone(),
                    ns_file: None,
                    cni_added: false,
                    addresses,
                    service_ips: BTreeMap::new(),
                    service: None,
                    servers: None,
                },
            );
            netns::add(&name).map_err(|e| err(&what, e))?;
            let file = netns::open(&name).map_err(|e| err(&what, e))?;
            if let Some(p) = self.pods.get_mut(&spec.pod) {
                p.ns_file = Some(file);
            }
        }
        // 2. CNI ADD, in parallel (the plugin waits until the addresses are in the table).
        let jobs: Vec<(PodRef, CniCall)> = specs
            .iter()
            .filter_map(|s| {
                self.pods
                    .get(&s.pod)
                    .map(|p| (s.pod.clone(), self.cni_call(&s.pod, p)))
            })
            .collect();
        let results: Vec<(PodRef, Result<Vec<IpAddr>, String>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|(pod, call)| (pod.clone(), scope.spawn(move || call.add())))
                .collect();
            handles
                .into_iter()
                .map(|(pod, h)| {
                    (
                        pod,
                        h.join()
                            .unwrap_or_else(|_| Err("CNI thread panicked".into())),
                    )
                })
                .collect()
        });
        let mut failure = None;
        for (pod, result) in results {
            match result {
                Ok(ips) => {
                    let live = self.pods.get_mut(&pod).expect("created above");
                    live.cni_added = true;
                    let want: Vec<IpAddr> = Family::ALL
                        .iter()
                        .filter_map(|f| live.addresses.get(*f))
                        .collect();
                    if !want.iter().all(|ip| ips.contains(ip)) {
                        failure.get_or_insert(DriverError::new(
                            format!("CNI ADD {pod}"),
                            format!("asked for {want:?}, got {ips:?}"),
                        ));
                    }
                }
                Err(e) => {
                    failure.get_or_insert(DriverError::new(format!("CNI ADD {pod}"), e));
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        // 3. Status, servers, Services.
        let mut ports = Vec::new();
        for spec in specs {
            let what = format!("start pod {}", spec.pod);
            self.check_interrupt(&what)?;
            let (node, addresses) = {
                let p = &self.pods[&spec.pod];
                (p.node, p.addresses)
            };
            let ips: Vec<IpAddr> = Family::ALL
                .iter()
                .filter_map(|f| addresses.get(*f))
                .collect();
            let host = node_ip(node).to_string();
            let status = json!({"status": {
                "phase": "Running",
                "podIP": ips[0].to_string(),
                "podIPs": ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
                "hostIP": host,
                "hostIPs": [{"ip": host}],
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                ],
            }});
            let api: Api<Pod> = self.api(&spec.pod.namespace);
            let patched = self
                .block(api.patch_status(
                    &spec.pod.name,
                    &PatchParams::default(),
                    &Patch::Merge(status),
                ))
                .map_err(|e| err(&what, e))?;
            self.wrote(Kind::Pods, &patched.metadata);
            let endpoints: BTreeSet<(u16, Protocol)> = server
                .endpoints()
                .into_iter()
                .chain(spec.ports.iter().map(|p| (p.container_port, p.protocol)))
                .collect();
            let endpoints: Vec<(u16, Protocol)> = endpoints.into_iter().collect();
            let servers = {
                let p = &self.pods[&spec.pod];
                let file = p
                    .ns_file
                    .as_ref()
                    .ok_or_else(|| DriverError::new(&what, "no netns"))?;
                Servers::start(file, &endpoints, &p.netns).map_err(|e| err(&what, e))?
            };
            let svc_name = service_name(&spec.pod);
            let svc_ports: Vec<serde_json::Value> = endpoints
                .iter()
                .map(|(port, proto)| {
                    json!({
                        "name": format!("p{port}-{}", protocol_nft(*proto)),
                        "port": port,
                        "targetPort": port,
                        "protocol": protocol_api(*proto),
                    })
                })
                .collect();
            let svc: Service = serde_json::from_value(json!({
                "metadata": {"namespace": spec.pod.namespace, "name": svc_name},
                "spec": {
                    "ipFamilyPolicy": "PreferDualStack",
                    "selector": {case::POD_LABEL: spec.pod.name},
                    "ports": svc_ports,
                },
            }))
            .map_err(|e| err(&what, e))?;
            let sapi: Api<Service> = self.api(&spec.pod.namespace);
            {
                let p = self.pods.get_mut(&spec.pod).expect("created above");
                p.servers = Some(servers);
                p.service = Some(svc_name.clone());
            }
            let made = self
                .block(sapi.create(&PostParams::default(), &svc))
                .map_err(|e| {
                    err(
                        format!("create Service {}/{svc_name}", spec.pod.namespace),
                        e,
                    )
                })?;
            let cluster_ips: Vec<IpAddr> = made
                .spec
                .as_ref()
                .and_then(|s| s.cluster_ips.clone())
                .unwrap_or_default()
                .iter()
                .filter_map(|ip| ip.parse().ok())
                .collect();
            let p = self.pods.get_mut(&spec.pod).expect("created above");
            for ip in &cluster_ips {
                let family = if ip.is_ipv4() { Family::V4 } else { Family::V6 };
                p.service_ips.insert(family, *ip);
                let Some(endpoint) = addresses.get(family) else {
                    continue;
                };
                for (port, proto) in &endpoints {
                    ports.push(ServicePort {
                        table: if ip.is_ipv4() { "ip" } else { "ip6" },
                        cluster_ip: *ip,
                        proto: protocol_nft(*proto),
                        port: *port,
                        id: format!(
                            "{}/{svc_name}/{}/p{port}-{}",
                            spec.pod.namespace,
                            protocol_nft(*proto),
                            protocol_nft(*proto)
                        ),
                        endpoint,
                    });
                }
            }
        }
        // 4. Every node's kube-proxy has the Services and their endpoints.
        let deadline = Instant::now() + Duration::from_secs(60);
        for node in 1..=self.cluster.nodes {
            let ns = node_name(node);
            loop {
                self.check_interrupt("wait for kube-proxy")?;
                let missing = settle::missing_in_kube_proxy(&ns, &ports);
                if missing.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(DriverError::new(
                        format!("kube-proxy on {ns}"),
                        format!(
                            "after 60 s still lacks {} Service ports, e.g. {} {} {}/{} -> {}",
                            missing.len(),
                            missing[0].table,
                            missing[0].cluster_ip,
                            missing[0].port,
                            missing[0].proto,
                            missing[0].endpoint
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(specs.iter().map(|s| self.pods[&s.pod].addresses).collect())
    }

    fn cni_call(&self, pod: &PodRef, live: &LivePod) -> CniCall {
        let node = live.node;
        let ips: Vec<String> = Family::ALL
            .iter()
            .filter_map(|f| live.addresses.get(*f))
            .map(|ip| match ip {
                IpAddr::V4(a) => format!("{a}/24"),
                IpAddr::V6(a) => format!("{a}/64"),
            })
            .collect();
        // Through libcni when cnitool is there (as a container runtime calls plugins): the
        // network is a conflist in a per-node directory, the pinned addresses go in CAP_ARGS.
        let netconf_dir = self.cluster.dir.join(format!("cni/node{node}"));
        let conflist = json!({
            "cniVersion": "1.1.0",
            "name": "weft",
            "plugins": [{
                "type": "weft-cni",
                "agentSocket": self.cluster.agent_socket(node),
                "stateDir": self.cluster.dir.join(format!("run/node{node}")),
                "capabilities": {"ips": true},
            }],
        });
        let _ = std::fs::create_dir_all(&netconf_dir)
            .and_then(|()| std::fs::write(netconf_dir.join("weft.conflist"), conflist.to_string()));
        CniCall {
            plugin: self.cluster.cni.clone(),
            cnitool: cnitool(),
            netconf_dir,
            cap_args: json!({"ips": ips}).to_string(),
            node_ns: node_name(node),
            netns: netns::path(&live.netns),
            container_id: format!("cf-{}", live.uid),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                pod.namespace, pod.name, live.uid
            ),
            config: json!({
                "cniVersion": "1.1.0",
                "name": "weft",
                "type": "weft-cni",
                "agentSocket": self.cluster.agent_socket(node),
                "stateDir": self.cluster.dir.join(format!("run/node{node}")),
                "runtimeConfig": {"ips": ips},
            })
            .to_string(),
        }
    }

    /// Stops, detaches and deletes pods (best effort for all, the first error returned).
    fn remove_pods(&mut self, pods: &[PodRef]) -> DResult<()> {
        let mut first: Option<DriverError> = None;
        let mut live: Vec<(PodRef, LivePod)> = pods
            .iter()
            .filter_map(|p| self.pods.remove(p).map(|l| (p.clone(), l)))
            .collect();
        for (_, l) in &mut live {
            l.servers = None; // joins the thread: its sockets close
        }
        let calls: Vec<(PodRef, CniCall)> = live
            .iter()
            .filter(|(_, l)| l.cni_added)
            .map(|(p, l)| (p.clone(), self.cni_call(p, l)))
            .collect();
        let dels: Vec<(PodRef, Result<(), String>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = calls
                .iter()
                .map(|(p, c)| (p.clone(), scope.spawn(move || c.del())))
                .collect();
            handles
                .into_iter()
                .map(|(p, h)| {
                    (
                        p,
                        h.join()
                            .unwrap_or_else(|_| Err("CNI thread panicked".into())),
                    )
                })
                .collect()
        });
        for (p, r) in dels {
            if let Err(e) = r {
                first.get_or_insert(DriverError::new(format!("CNI DEL {p}"), e));
            }
        }
        for (pod, mut l) in live {
            l.ns_file = None;
            if let Err(e) = netns::delete(&l.netns) {
                first.get_or_insert(DriverError::new(format!("delete netns of {pod}"), e));
            }
            for f in Family::ALL {
                if let Some(ip) = l.addresses.get(f) {
                    self.used.remove(&ip);
                }
            }
            let api: Api<Pod> = self.api(&pod.namespace);
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            match self.block(delete_timed(&api, &pod.name, &dp)) {
                Ok(rv) => self.wrote_rv(Kind::Pods, rv),
                Err(e) => {
                    first.get_or_insert(err(format!("delete pod {pod}"), e));
                }
            }
            if let Some(svc) = &l.service {
                let sapi: Api<Service> = self.api(&pod.namespace);
                match self.block(sapi.delete(svc, &DeleteParams::default())) {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        first.get_or_insert(err(
                            format!("delete Service {}/{svc}", pod.namespace),
                            e,
                        ));
                    }
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn delete_policies_in(&mut self, namespaces: &[String]) -> DResult<()> {
        for ns in namespaces {
            if !self.namespaces.contains(ns) {
                continue;
            }
            let api: Api<NetworkPolicy> = self.api(ns);
            let list = self
                .block(api.list(&ListParams::default()))
                .map_err(|e| err(format!("list NetworkPolicies in {ns}"), e))?;
            for p in list.items {
                let name = p.metadata.name.clone().unwrap_or_default();
                self.delete_policy(ns, &name)?;
            }
        }
        Ok(())
    }

    /// The pod (its namespace file and addresses), for a probe.
    fn probe_once(
        &self,
        src: &LivePod,
        dst: IpAddr,
        port: u16,
        protocol: Protocol,
        family: Family,
    ) -> Observation {
        let to = SocketAddr::new(dst, port);
        match protocol {
            Protocol::Tcp => probe::tcp(to, self.probe_timeout),
            Protocol::Udp => probe::udp(to, self.probe_timeout),
            Protocol::Sctp => match src.addresses.get(family) {
                Some(own) => probe::sctp(own, to, self.probe_timeout),
                None => Observation::NotObserved("the client has no address of the family".into()),
            },
        }
    }

    /// Waits until every agent reports every pending write applied.
    fn wait_applied(&mut self) -> DResult<()> {
        self.realizer
            .wait(Duration::from_secs(60), &interrupted)
            .map_err(|e| DriverError::new("wait for the agents", e))
    }

    /// Removes every pod (CNI DEL included), then the cluster.
    pub fn teardown(&mut self) {
        let pods: Vec<PodRef> = self.pods.keys().cloned().collect();
        if let Err(e) = self.remove_pods(&pods) {
            progress(&format!("teardown: {e}"));
        }
        if let Err(e) = self.cluster.down() {
            progress(&format!("teardown: {e}"));
        }
    }

    /// Leaves the cluster running and says how to remove it.
    pub fn keep(&mut self, dir: &Path) {
        self.cluster.keep();
        progress(&format!(
            "--keep: the cluster runs on (the pods' servers ended with this process); kubectl: bash {}/k8s/cluster.sh kubectl {}/cluster ...; remove it all: bash {}/k8s/cluster.sh down {}/cluster",
            bringup::conformance_dir().display(),
            dir.display(),
            bringup::conformance_dir().display(),
            dir.display()
        ));
    }
}

/// libcni's cnitool (`conformance/cni/install-cnitool.sh` builds it): `$WEFT_CNITOOL`, else
/// the cache path of the pinned version, if present.
fn cnitool() -> Option<PathBuf> {
    let path = std::env::var_os("WEFT_CNITOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("WEFT_CACHE")
                .map_or_else(|| PathBuf::from("/var/cache/weft"), PathBuf::from);
            cache.join("cnitool-v1.3.0/cnitool")
        });
    path.is_file().then_some(path)
}

/// Whether a failed call is CNI's "try again later" (code 11): the JSON error when the plugin
/// runs directly, libcni's message (which keeps only `msg`) through cnitool.
fn try_again_later(error: &str) -> bool {
    error.contains("\"code\":11")
        || error.contains("\"code\": 11")
        || error.contains("not in place in time")
}

/// One call of the plugin, prepared on the driver's thread and run on another.
struct CniCall {
    plugin: PathBuf,
    /// libcni's runtime; `None`: exec the plugin directly with the CNI environment.
    cnitool: Option<PathBuf>,
    /// Directory holding `weft.conflist` for cnitool.
    netconf_dir: PathBuf,
    /// `CAP_ARGS` for cnitool (runtimeConfig: the pinned addresses).
    cap_args: String,
    node_ns: String,
    netns: PathBuf,
    container_id: String,
    args: String,
    config: String,
}

impl CniCall {
    fn run(&self, command: &str) -> Result<String, String> {
        let cni_path = self.plugin.parent().unwrap_or(Path::new(".")).to_path_buf();
        if let Some(tool) = &self.cnitool {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.node_ns])
                .arg(tool)
                .arg(command.to_lowercase())
                .arg("weft")
                .arg(&self.netns)
                .env("NETCONFPATH", &self.netconf_dir)
                .env("CNI_PATH", &cni_path)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_ARGS", &self.args)
                .env("CAP_ARGS", &self.cap_args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cnitool: {e}"))?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            return if out.status.success() {
                Ok(stdout)
            } else {
                Err(format!(
                    "cnitool {command} failed ({}): {} {}",
                    out.status,
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            };
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns])
            .arg(&self.plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_path)
            .env("CNI_ARGS", &self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("weft-cni: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.config.as_bytes())
                .map_err(|e| format!("weft-cni stdin: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("weft-cni: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{command} failed ({}): {} {}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// ADD as the kubelet does it: a "try again later" answer (CNI code 11: the agent had not
    /// got the pod's policy into the kernel within its bounded wait) is followed by DEL and a
    /// new ADD, at most three times.
    fn add(&self) -> Result<Vec<IpAddr>, String> {
        let mut attempt = 0;
        let out = loop {
            attempt += 1;
            match self.run("ADD") {
                Ok(out) => break out,
                Err(e) if attempt < 3 && try_again_later(&e) => {
                    eprintln!(
                        "[conformance] CNI ADD attempt {attempt}: {e}; DEL and retry, as a runtime does"
                    );
                    let _ = self.run("DEL");
                }
                Err(e) => return Err(e),
            }
        };
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("ADD result {out:?}: {e}"))?;
        Ok(v.get("ips")
            .and_then(|i| i.as_array())
            .map(|ips| {
                ips.iter()
                    .filter_map(|i| i.get("address").and_then(|a| a.as_str()))
                    .filter_map(|a| a.split('/').next().and_then(|a| a.parse().ok()))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn del(&self) -> Result<(), String> {
        self.run("DEL").map(drop)
    }
}

impl ClusterDriver for ClusterTarget {
    fn supports(&self, feature: Feature) -> bool {
        matches!(
            feature,
            Feature::SctpConnectivity
                | Feature::Ipv6DualStack
                | Feature::PinnedPodIps
                | Feature::LinuxOnly
        )
    }

    fn create_case(
        &mut self,
        setup: &CaseSetup<'_>,
    ) -> Result<BTreeMap<PodRef, PodAddresses>, DriverError> {
        self.check_interrupt("create the namespaces")?;
        progress(&format!(
            "case {}: {} namespaces, {} pods",
            setup.case_id,
            setup.namespaces.len(),
            setup.pods.len()
        ));
        self.case_started = Some((setup.case_id.to_string(), Instant::now()));
        self.numbers.clear();
        for (i, ns) in setup.namespaces.iter().enumerate() {
            if i + 1 > self.cluster.nodes {
                return Err(DriverError::new(
                    format!("namespace {}", ns.name),
                    format!(
                        "the case has more namespaces than the {} nodes",
                        self.cluster.nodes
                    ),
                ));
            }
            self.numbers.insert(ns.name.clone(), i + 1);
            self.ensure_namespace(&ns.name, &ns.labels)?;
        }
        let addresses = self.create_pods(setup.pods, setup.server)?;
        Ok(setup
            .pods
            .iter()
            .map(|p| p.pod.clone())
            .zip(addresses)
            .collect())
    }

    fn create_policy(&mut self, policy: &NetworkPolicy) -> Result<(), DriverError> {
        let ns = policy.metadata.namespace.clone().unwrap_or_default();
        let what = format!(
            "create NetworkPolicy {ns}/{}",
            policy.metadata.name.as_deref().unwrap_or_default()
        );
        self.check_interrupt(&what)?;
        let api: Api<NetworkPolicy> = self.api(&ns);
        let made = self
            .block(api.create(&PostParams::default(), policy))
            .map_err(|e| err(&what, e))?;
        self.wrote(Kind::Policies, &made.metadata);
        Ok(())
    }

    fn update_policy(&mut self, policy: &NetworkPolicy) -> Result<(), DriverError> {
        let ns = policy.metadata.namespace.clone().unwrap_or_default();
        let name = policy.metadata.name.clone().unwrap_or_default();
        let what = format!("update NetworkPolicy {ns}/{name}");
        self.check_interrupt(&what)?;
        let api: Api<NetworkPolicy> = self.api(&ns);
        let current = self.block(api.get(&name)).map_err(|e| err(&what, e))?;
        let mut next = policy.clone();
        next.metadata.resource_version = current.metadata.resource_version;
        let made = self
            .block(api.replace(&name, &PostParams::default(), &next))
            .map_err(|e| err(&what, e))?;
        self.wrote(Kind::Policies, &made.metadata);
        Ok(())
    }

    fn delete_policy(&mut self, namespace: &str, name: &str) -> Result<(), DriverError> {
        let what = format!("delete NetworkPolicy {namespace}/{name}");
        self.check_interrupt(&what)?;
        let api: Api<NetworkPolicy> = self.api(namespace);
        match self
            .block(delete_timed(&api, name, &DeleteParams::default()))
            .map_err(|e| err(&what, e))?
        {
            Some(rv) => {
                self.wrote_rv(Kind::Policies, Some(rv));
                Ok(())
            }
            None => Err(DriverError::new(what, "not found")),
        }
    }

    fn delete_all_policies(&mut self, namespaces: &[String]) -> Result<(), DriverError> {
        self.check_interrupt("delete all policies")?;
        self.delete_policies_in(namespaces)
    }

    fn add_namespace_labels(
        &mut self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let what = format!("label namespace {namespace}");
        self.check_interrupt(&what)?;
        let api: Api<Namespace> = Api::all(self.cluster.client.clone());
        let patched = self
            .block(api.patch(
                namespace,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            ))
            .map_err(|e| err(&what, e))?;
        self.wrote(Kind::Namespaces, &patched.metadata);
        Ok(())
    }

    fn add_pod_labels(
        &mut self,
        pod: &PodRef,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let what = format!("label pod {pod}");
        self.check_interrupt(&what)?;
        let api: Api<Pod> = self.api(&pod.namespace);
        let patched = self
            .block(api.patch(
                &pod.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            ))
            .map_err(|e| err(&what, e))?;
        self.wrote(Kind::Pods, &patched.metadata);
        Ok(())
    }

    fn set_pod_labels(
        &mut self,
        pod: &PodRef,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let what = format!("relabel pod {pod}");
        self.check_interrupt(&what)?;
        let api: Api<Pod> = self.api(&pod.namespace);
        let current = self.block(api.get(&pod.name)).map_err(|e| err(&what, e))?;
        let mut patch = serde_json::Map::new();
        for k in current.metadata.labels.unwrap_or_default().keys() {
            patch.insert(k.clone(), serde_json::Value::Null);
        }
        for (k, v) in labels {
            patch.insert(k.clone(), json!(v));
        }
        patch.insert(case::POD_LABEL.into(), json!(pod.name));
        let patched = self
            .block(api.patch(
                &pod.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": patch}})),
            ))
            .map_err(|e| err(&what, e))?;
        self.wrote(Kind::Pods, &patched.metadata);
        Ok(())
    }

    fn create_pod(&mut self, pod: &PodSpec, server: &Server) -> Result<PodAddresses, DriverError> {
        let mut addresses = self.create_pods(std::slice::from_ref(pod), server)?;
        addresses
            .pop()
            .ok_or_else(|| DriverError::new(format!("create pod {}", pod.pod), "no addresses"))
    }

    fn delete_pod(&mut self, pod: &PodRef) -> Result<(), DriverError> {
        let what = format!("delete pod {pod}");
        if !self.pods.contains_key(pod) {
            return Err(DriverError::new(what, "no such pod"));
        }
        self.remove_pods(std::slice::from_ref(pod))?;
        let api: Api<Pod> = self.api(&pod.namespace);
        let sapi: Api<Service> = self.api(&pod.namespace);
        let svc = service_name(pod);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pod_left = self
                .block(api.get_opt(&pod.name))
                .map_err(|e| err(&what, e))?;
            let svc_left = self.block(sapi.get_opt(&svc)).map_err(|e| err(&what, e))?;
            if pod_left.is_none() && svc_left.is_none() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DriverError::new(what, "still in the API after 30 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn settle(&mut self) -> Result<(), DriverError> {
        self.wait_applied()
    }

    fn delete_case(&mut self, setup: &CaseSetup<'_>) -> Result<(), DriverError> {
        let pods: Vec<PodRef> = self.pods.keys().cloned().collect();
        let removed = self.remove_pods(&pods);
        let names: Vec<String> = setup.namespaces.iter().map(|n| n.name.clone()).collect();
        let policies = self.delete_policies_in(&names);
        if let Some((id, at)) = self.case_started.take() {
            progress(&format!("case {id}: {:.1} s", at.elapsed().as_secs_f64()));
        }
        // The deletions are timed too; the next case's settle waits for them.
        removed.and(policies)
    }
}

impl Prober for ClusterTarget {
    fn probe(
        &self,
        from: &PodRef,
        to: &PodRef,
        port: u16,
        protocol: Protocol,
        family: Family,
    ) -> Observation {
        if interrupted() {
            return Observation::NotObserved("interrupted".into());
        }
        let (Some(src), Some(dst)) = (self.pods.get(from), self.pods.get(to)) else {
            return Observation::NotObserved("no such pod".into());
        };
        let Some(ns) = &src.ns_file else {
            return Observation::NotObserved("the client has no namespace".into());
        };
        if let Err(e) = netns::enter(ns) {
            return Observation::NotObserved(format!("setns into {}: {e}", src.netns));
        }
        let service = || match dst.service_ips.get(&family) {
            Some(ip) => self.probe_once(src, *ip, port, protocol, family),
            None => Observation::NotObserved("the Service has no ClusterIP of the family".into()),
        };
        let pod = || match dst.addresses.get(family) {
            Some(ip) => self.probe_once(src, ip, port, protocol, family),
            None => Observation::NotObserved("the pod has no address of the family".into()),
        };
        match self.via {
            Via::Service => service(),
            Via::PodIp => pod(),
            Via::Both => {
                let (s, p) = (service(), pod());
                if s == p {
                    s
                } else {
                    Observation::NotObserved(format!(
                        "through the Service {s:?}, to the pod IP {p:?}"
                    ))
                }
            }
        }
    }
}
