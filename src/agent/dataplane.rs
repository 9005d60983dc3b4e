//! The agent's dataplane side: the overlay from Node objects, and the CNI socket.
//!
//! Flow: the controller publishes the nodes it knows ([`NodeInfo`]) on a watch channel →
//! [`run`] waits for this node's podCIDRs, then creates the VXLAN device, opens IPAM and the
//! CNI service, and keeps every remote node's FDB/neighbour/route entries in step (only the
//! node that changed is touched). The unix socket serves both the CNI plugin (one JSON request
//! per connection) and `GET /debug/state`.
//!
//! CNI ADD returns only once the pod's addresses are in the kernel: [`AgentGate`] hands the
//! allocated addresses to the controller (which merges them into the pod's model: the API does
//! not know a pod's IP before ADD returns) and waits until a committed transaction holds them.
//!
//! With the mesh on ([`super::mesh`]), each remote node's routes follow the mesh's choice
//! ([`MeshRouting`]: direct, relayed, over `wgweft`, or blocked), re-synced whenever it
//! changes and every 2 s (so `wgweft` appearing late or a failed entry is retried).
//!
//! [`housekeeping`] runs beside it: the masquerade table `inet weft-nat` ([`super::nat`],
//! re-synced every minute), the conflist written once the agent is ready (first adoption done,
//! CNI service up, `weft-cni` installed), and the API-based cleanup of allocations whose pod
//! was deleted long ago.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::RwLock;
use tracing::{error, info, warn};
use weft_dataplane::cni_service::{CniService, PolicyGate, ServiceConfig};
use weft_dataplane::ipam::{Ipam, IpamConfig, PodCidrs, SystemClock};
use weft_dataplane::overlay::{Overlay, OverlayConfig, RemoteNode};
use weft_dataplane::proto::{self, ErrorBody, Operation, PodRef, Response, codes};
use weft_netpol::model::ObjectKey;

use super::controller::Shared;
use super::http::{self, Listener};
use super::mesh::MeshRouting;
use super::watch::{Kind, WatchBody, WatchMsg};

/// What the dataplane needs to know of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// First InternalIP.
    pub internal_ip: Option<IpAddr>,
    /// `spec.podCIDRs`.
    pub pod_cidrs: Vec<IpNet>,
    /// Its mesh identity key as published (annotation `weft.dev/mesh-identity`).
    pub mesh_identity: Option<String>,
}

impl NodeInfo {
    /// From the API object.
    pub fn from_api(node: &k8s_openapi::api::core::v1::Node) -> Option<NodeInfo> {
        let name = node.metadata.name.clone()?;
        let internal_ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse().ok());
        let spec = node.spec.as_ref();
        let mut cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        if cidrs.is_empty()
            && let Some(c) = spec.and_then(|s| s.pod_cidr.clone())
        {
            cidrs.push(c);
        }
        let mesh_identity = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(super::mesh::IDENTITY_ANNOTATION))
            .cloned();
        Some(NodeInfo {
            name,
            internal_ip,
            pod_cidrs: cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
            mesh_identity,
        })
    }
}

/// Settings of the dataplane side.
#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// This node.
    pub node: String,
    /// State directory (IPAM under `ipam/`, CNI release records).
    pub state_dir: PathBuf,
    /// Underlay address; `None`: the node's InternalIP.
    pub underlay_ip: Option<IpAddr>,
    /// How long ADD waits for the pod's policy state.
    pub policy_timeout: Duration,
    /// Cluster CIDRs (pods, Services) never masqueraded; `None`: no masquerade at all
    /// (`--no-masquerade`: a `weft-nat` table left by an earlier run is removed).
    pub masquerade: Option<Vec<IpNet>>,
    /// Where the conflist is written once the agent is ready (`None`: never).
    pub cni_conf_dir: Option<PathBuf>,
    /// Where the runtime finds CNI plugins: `weft-cni` must be there before the conflist is.
    pub cni_bin_dir: PathBuf,
    /// The agent socket the conflist names.
    pub socket: PathBuf,
    /// How often the API-based cleanup runs.
    pub cleanup_interval: Duration,
    /// Allocations younger than this are never freed by the API-based cleanup.
    pub cleanup_min_age: Duration,
    /// `--encryption required`: plain VXLAN from peers is dropped (table `inet weft-guard`,
    /// removed when this is off).
    pub refuse_plain_vxlan: bool,
}

/// The conflist's file name.
pub const CONFLIST_NAME: &str = "10-weft.conflist";

/// The conflist the DaemonSet installs (`manifests/cni/`), naming this agent's socket and
/// state directory.
pub fn conflist(socket: &Path, state_dir: &Path) -> Result<String, String> {
    let mut v: serde_json::Value =
        serde_json::from_str(include_str!("../../manifests/cni/10-weft.conflist"))
            .map_err(|e| format!("manifests/cni/10-weft.conflist: {e}"))?;
    let weft = v["plugins"]
        .as_array_mut()
        .and_then(|p| p.iter_mut().find(|p| p["type"] == "weft-cni"))
        .ok_or("manifests/cni/10-weft.conflist has no weft-cni plugin")?;
    weft["agentSocket"] = socket.display().to_string().into();
    weft["stateDir"] = state_dir.display().to_string().into();
    let mut text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
    text.push('\n');
    Ok(text)
}

/// Writes `dir/10-weft.conflist` atomically (temporary file, fsync, rename, fsync of the
/// directory): a runtime reading the directory sees the old file or the whole new one, and
/// the temporary name ends in neither `.conf` nor `.conflist`. Returns false when the file
/// already had this content (nothing written).
pub fn write_conflist(dir: &Path, text: &str) -> std::io::Result<bool> {
    let path = dir.join(CONFLIST_NAME);
    if std::fs::read_to_string(&path).is_ok_and(|have| have == text) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{CONFLIST_NAME}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(true)
}

/// The policy gate of CNI ADD, answered by the controller.
pub struct AgentGate {
    shared: Arc<Shared>,
    tx: Mutex<mpsc::Sender<WatchMsg>>,
}

impl AgentGate {
    /// A gate feeding the controller's channel.
    pub fn new(shared: Arc<Shared>, tx: mpsc::Sender<WatchMsg>) -> AgentGate {
        AgentGate {
            shared,
            tx: Mutex::new(tx),
        }
    }

    fn send(&self, body: WatchBody) {
        let msg = WatchMsg {
            kind: Kind::Pods,
            body,
            resource_version: None,
            received: Instant::now(),
        };
        let _ = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send(msg);
    }

    /// Tells the controller an attachment is gone.
    pub fn released(&self, pod: &PodRef) {
        self.send(WatchBody::CniReleased {
            pod: ObjectKey::new(&pod.namespace, &pod.name),
            uid: pod.uid.clone(),
        });
    }
}

impl PolicyGate for AgentGate {
    fn wait_programmed(
        &self,
        pod: &PodRef,
        ips: &[IpAddr],
        timeout: Duration,
    ) -> Result<(), String> {
        self.send(WatchBody::CniAttached {
            pod: ObjectKey::new(&pod.namespace, &pod.name),
            uid: pod.uid.clone(),
            ips: ips.to_vec(),
        });
        let deadline = Instant::now() + timeout;
        let mut have = self
            .shared
            .local_ips
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            if ips.iter().all(|ip| have.contains(ip)) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "{pod}: addresses {ips:?} not in this node's table yet (is the pod in the API with spec.nodeName = this node?)"
                ));
            }
            // Woken by the controller's commit (no polling delay on the ADD path).
            have = self
                .shared
                .local_ips_changed
                .wait_timeout(have, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// How long the overlay routes wait for the mesh's first route choices (see
/// [`MeshRouting::decided`]) before the plain overlay is programmed anyway.
const MESH_DECISION_WAIT: Duration = Duration::from_secs(10);

/// The CNI service once this node's podCIDRs are known.
pub type ServiceSlot = Arc<RwLock<Option<Arc<CniService>>>>;

/// Waits for this node's podCIDRs, sets up overlay, IPAM and the CNI service, then follows
/// node changes (and the mesh's route choices, when the mesh is on) for the overlay. Runs
/// forever.
pub async fn run(
    cfg: DataplaneConfig,
    mut nodes: tokio::sync::watch::Receiver<Vec<NodeInfo>>,
    mut mesh: Option<tokio::sync::watch::Receiver<MeshRouting>>,
    gate: Arc<AgentGate>,
    slot: ServiceSlot,
) {
    tokio::spawn(housekeeping(cfg.clone(), gate.shared.clone(), slot.clone()));
    let mut state: Option<(rtnetlink::Handle, Overlay, PodCidrs)> = None;
    let mut wg_warned: Option<Instant> = None;
    let started = Instant::now();
    let mut waiting_logged = false;
    loop {
        let snapshot = nodes.borrow_and_update().clone();
        let routing = mesh
            .as_mut()
            .map(|m| m.borrow_and_update().clone())
            .unwrap_or_default();
        if let Some(me) = snapshot.iter().find(|n| n.name == cfg.node) {
            if state.is_none() {
                match setup(&cfg, me, routing.encryption, gate.clone()).await {
                    Ok((handle, overlay, cidrs, service)) => {
                        // DELs the plugin did alone while no agent ran: their addresses are
                        // freed now, not at the next CNI request.
                        let drained = service.drain_release_records().await;
                        if drained > 0 {
                            info!(
                                drained,
                                "released the addresses of pods deleted while the agent was down"
                            );
                        }
                        *slot.write().await = Some(Arc::new(service));
                        info!(cidrs = ?cidrs, mtu = overlay.mtu(), "dataplane ready: overlay up, CNI served");
                        state = Some((handle, overlay, cidrs));
                    }
                    Err(e) => {
                        warn!(error = %e, "dataplane not ready yet; retrying on the next node update")
                    }
                }
            }
            if let Some((handle, overlay, cidrs)) = state.as_mut() {
                if let Ok(now) = PodCidrs::from_list(&me.pod_cidrs)
                    && now != *cidrs
                {
                    error!(old = ?cidrs, new = ?now, "this node's podCIDRs changed: allocations stay on the old range; restart the node's pods");
                }
                let remotes: Vec<RemoteNode> = snapshot
                    .iter()
                    .filter(|n| n.name != cfg.node && !n.pod_cidrs.is_empty())
                    .filter_map(|n| {
                        Some(RemoteNode {
                            name: n.name.clone(),
                            underlay_ip: n.internal_ip?,
                            pod_cidrs: n.pod_cidrs.clone(),
                        })
                    })
                    .collect();
                if routing.encryption {
                    match overlay
                        .ensure_wireguard_device(handle, overlay.wireguard_mtu())
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => {
                            if wg_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                                warn!(
                                    device = weft_dataplane::overlay::WIREGUARD_DEVICE,
                                    "encryption on but no WireGuard device yet (weft-wg not running?): pods are reached over plain VXLAN"
                                );
                                wg_warned = Some(Instant::now());
                            }
                        }
                        Err(e) => warn!(error = %e, "WireGuard device not configured; retried"),
                    }
                }
                // With the mesh on, the routes wait for its first choices (normally a few ms;
                // at most MESH_DECISION_WAIT, then the plain overlay is programmed): until
                // then the kernel keeps what a previous run left (issue 8's handoff).
                if mesh.is_some() && !routing.decided && started.elapsed() < MESH_DECISION_WAIT {
                    if !waiting_logged {
                        info!("overlay routes: waiting for the mesh's first route choices");
                        waiting_logged = true;
                    }
                } else {
                    let report = overlay.sync_routes(handle, &remotes, &routing.routes).await;
                    if !report.added.is_empty()
                        || !report.removed.is_empty()
                        || !report.changed.is_empty()
                    {
                        info!(added = ?report.added, removed = ?report.removed, changed = ?report.changed, "overlay synced");
                    }
                    for (node, e) in &report.failed {
                        warn!(%node, error = %e, "overlay entries failed; retried at the next sync");
                    }
                }
            }
        }
        match &mut mesh {
            None => {
                if nodes.changed().await.is_err() {
                    return;
                }
            }
            Some(m) => tokio::select! {
                r = nodes.changed() => if r.is_err() { return },
                _ = m.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            },
        }
    }
}

async fn setup(
    cfg: &DataplaneConfig,
    me: &NodeInfo,
    encryption: bool,
    gate: Arc<AgentGate>,
) -> Result<(rtnetlink::Handle, Overlay, PodCidrs, CniService), String> {
    let cidrs = PodCidrs::from_list(&me.pod_cidrs).map_err(|e| e.to_string())?;
    if me.pod_cidrs.is_empty() {
        return Err(format!("node {} has no podCIDRs yet", me.name));
    }
    let underlay = cfg.underlay_ip.or(me.internal_ip).ok_or_else(|| {
        format!(
            "node {} has no InternalIP and --underlay-ip is not set",
            me.name
        )
    })?;
    // Pods are routed: the node forwards their traffic (in its own network namespace only).
    weft_dataplane::overlay::enable_forwarding()
        .map_err(|e| format!("enabling forwarding: {e}"))?;
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let overlay = Overlay::ensure(&handle, OverlayConfig::new(underlay, cidrs))
        .await
        .map_err(|e| e.to_string())?;
    let ipam = Ipam::open(
        IpamConfig {
            dir: cfg.state_dir.join("ipam"),
            ..IpamConfig::new(cidrs)
        },
        Arc::new(SystemClock),
    )
    .map_err(|e| e.to_string())?;
    let service = CniService::new(
        ipam,
        gate,
        ServiceConfig {
            state_dir: cfg.state_dir.clone(),
            // Pods may be reached over WireGuard: its larger overhead sets their MTU.
            mtu: if encryption {
                overlay.wireguard_mtu()
            } else {
                overlay.mtu()
            },
            policy_timeout: cfg.policy_timeout,
            ..ServiceConfig::default()
        },
        handle.clone(),
    );
    Ok((handle, overlay, cidrs, service))
}

/// Serves the unix socket: `GET /…` is the debug HTTP surface, anything else one CNI request.
pub async fn serve_socket(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
    slot: ServiceSlot,
    gate: Arc<AgentGate>,
) {
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "unix accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (shared, slot, gate) = (shared.clone(), slot.clone(), gate.clone());
        tokio::spawn(async move {
            let mut head = [0u8; 4];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            if &head[..n] == b"GET " || (n < 4 && b"GET ".starts_with(&head[..n]) && n > 0) {
                http::serve_conn_with_prefix(stream, shared, Listener::Unix, head[..n].to_vec())
                    .await;
                return;
            }
            let mut buf = head[..n].to_vec();
            let read = tokio::time::timeout(
                Duration::from_secs(30),
                (&mut stream)
                    .take(proto::MAX_MESSAGE_BYTES)
                    .read_to_end(&mut buf),
            )
            .await;
            if !matches!(read, Ok(Ok(_))) {
                return;
            }
            let response = match proto::decode_request(&buf) {
                Err(r) => r,
                Ok(request) => {
                    let service = slot.read().await.clone();
                    match service {
                        None => Response {
                            version: request.version,
                            result: Err(ErrorBody::new(
                                codes::TRY_AGAIN_LATER,
                                "weft agent is starting",
                                "this node's podCIDRs or the API are not known yet",
                            )),
                        },
                        Some(service) => {
                            let released = match &request.op {
                                Operation::Del(args) => Some(args.pod.clone()),
                                _ => None,
                            };
                            let r = service.handle(request).await;
                            if let Some(pod) = released {
                                gate.released(&pod);
                            }
                            r
                        }
                    }
                }
            };
            if let Ok(body) = serde_json::to_vec(&response) {
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            }
        });
    }
}

/// Local pod addresses present in a committed table (what the gate waits for).
pub fn local_ips(rs: &weft_netpol::Ruleset) -> BTreeSet<IpAddr> {
    use weft_netpol::ruleset::{Family, Value};
    let mut out = BTreeSet::new();
    for f in Family::ALL {
        if let Some(set) = rs.sets.get(&weft_netpol::compile::names::pods_local(f)) {
            for k in set.elements.keys() {
                match k.from.first() {
                    Some(Value::V4(a)) => {
                        out.insert(IpAddr::V4(*a));
                    }
                    Some(Value::V6(a)) => {
                        out.insert(IpAddr::V6(*a));
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// One of weft's own small tables brought to `desired` on a blocking thread (`nat::sync`):
/// the ops applied, or why not.
async fn sync_own_table(
    nft: &Arc<weft_nft::NftThread>,
    table: &'static str,
    desired: &Option<weft_netpol::Ruleset>,
) -> Result<usize, String> {
    let (nft, desired) = (nft.clone(), desired.clone());
    tokio::task::spawn_blocking(move || super::nat::sync(&nft, table, desired.as_ref()))
        .await
        .map_err(|e| format!("the sync task failed: {e}"))?
        .map_err(|e| e.to_string())
}

/// Masquerade table, conflist, API-based cleanup (see the module docs). Runs forever; every
/// step is retried on its own schedule, none blocks another.
pub async fn housekeeping(cfg: DataplaneConfig, shared: Arc<Shared>, slot: ServiceSlot) {
    let desired_nat = cfg.masquerade.as_deref().map(super::nat::ruleset);
    let desired_guard = cfg
        .refuse_plain_vxlan
        .then(|| super::guard::ruleset(weft_dataplane::overlay::DEFAULT_PORT));
    let mut nft: Option<Arc<weft_nft::NftThread>> = None;
    let mut next_own_tables = Instant::now();
    let mut conflist_done = cfg.cni_conf_dir.is_none();
    let mut bin_warned: Option<Instant> = None;
    let mut next_cleanup = Instant::now() + cfg.cleanup_interval;
    loop {
        let now = Instant::now();
        if now >= next_own_tables {
            next_own_tables = now + Duration::from_secs(60);
            if nft.is_none() {
                match weft_nft::NftThread::spawn() {
                    Ok(t) => nft = Some(Arc::new(t)),
                    Err(e) => {
                        error!(error = %e, "masquerade: no netlink backend; retrying in 5 s");
                        next_own_tables = now + Duration::from_secs(5);
                    }
                }
            }
            if let Some(t) = nft.clone() {
                match sync_own_table(&t, super::nat::NAT_TABLE, &desired_nat).await {
                    Ok(0) => {}
                    Ok(ops) => match &cfg.masquerade {
                        Some(cidrs) => {
                            info!(ops, cluster_cidrs = ?cidrs, "masquerade: table inet weft-nat in place")
                        }
                        None => info!("masquerade off: table inet weft-nat removed"),
                    },
                    Err(e) => {
                        error!(error = %e, "masquerade: table inet weft-nat not applied; retrying in 5 s");
                        next_own_tables = now + Duration::from_secs(5);
                    }
                }
                match sync_own_table(&t, super::guard::GUARD_TABLE, &desired_guard).await {
                    Ok(0) => {}
                    Ok(ops) if cfg.refuse_plain_vxlan => {
                        info!(
                            ops,
                            port = weft_dataplane::overlay::DEFAULT_PORT,
                            "encryption required: table inet weft-guard in place, plain VXLAN from peers is dropped"
                        )
                    }
                    Ok(_) => {
                        info!(
                            "encryption not required: table inet weft-guard removed, plain VXLAN from peers accepted"
                        )
                    }
                    Err(e) => {
                        error!(error = %e, "encryption required, but table inet weft-guard not applied (plain VXLAN from peers still accepted); retrying in 5 s");
                        next_own_tables = now + Duration::from_secs(5);
                    }
                }
            }
        }
        if !conflist_done
            && shared.adopted.load(std::sync::atomic::Ordering::Relaxed)
            && slot.read().await.is_some()
            && let Some(dir) = &cfg.cni_conf_dir
        {
            let plugin = cfg.cni_bin_dir.join("weft-cni");
            if !plugin.exists() {
                if bin_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    warn!(plugin = %plugin.display(), "ready, but the CNI plugin is not installed: conflist not written yet");
                    bin_warned = Some(Instant::now());
                }
            } else {
                match conflist(&cfg.socket, &cfg.state_dir)
                    .and_then(|text| write_conflist(dir, &text).map_err(|e| e.to_string()))
                {
                    Ok(written) => {
                        conflist_done = true;
                        info!(path = %dir.join(CONFLIST_NAME).display(), written, "ready: CNI conflist in place");
                    }
                    Err(e) => {
                        error!(dir = %dir.display(), error = %e, "cannot write the CNI conflist; retrying")
                    }
                }
            }
        }
        if now >= next_cleanup {
            next_cleanup = now + cfg.cleanup_interval;
            let service = slot.read().await.clone();
            let uids = shared
                .live_pod_uids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let (Some(service), Some(uids)) = (service, uids) {
                match service
                    .release_deleted_pods(&uids, cfg.cleanup_min_age)
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => info!(
                        released = n,
                        min_age_s = cfg.cleanup_min_age.as_secs(),
                        "API-based cleanup: allocations of deleted pods released"
                    ),
                    Err(e) => {
                        warn!(code = e.code, msg = %e.msg, details = %e.details, "API-based cleanup failed; retried next round")
                    }
                }
            }
        }
        let pause = if conflist_done { 1000 } else { 100 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conflist_is_the_manifest_with_this_agents_paths() {
        let text = conflist(Path::new("/run/x/agent.sock"), Path::new("/var/lib/x")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["plugins"][0]["type"], "weft-cni");
        assert_eq!(v["plugins"][0]["agentSocket"], "/run/x/agent.sock");
        assert_eq!(v["plugins"][0]["stateDir"], "/var/lib/x");
        assert_eq!(v["plugins"][0]["capabilities"]["ips"], true);
        assert_eq!(v["plugins"][1]["type"], "portmap");
    }

    #[test]
    fn the_conflist_is_replaced_atomically_and_only_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("weft-conflist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(write_conflist(&dir, "{}\n").unwrap());
        assert!(
            !write_conflist(&dir, "{}\n").unwrap(),
            "same content: untouched"
        );
        assert!(write_conflist(&dir, "{\"a\":1}\n").unwrap());
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [CONFLIST_NAME], "no temporary file left");
        assert_eq!(
            std::fs::read_to_string(dir.join(CONFLIST_NAME)).unwrap(),
            "{\"a\":1}\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_waiting_add_wakes_when_the_commit_publishes_its_addresses() {
        use super::super::metrics::Metrics;
        let shared = Arc::new(Shared::new("n1", Arc::new(Metrics::default())));
        let (tx, rx) = mpsc::channel();
        let gate = AgentGate::new(shared.clone(), tx);
        let pod = PodRef {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
        };
        let ip: IpAddr = "10.244.1.7".parse().unwrap();
        // Not there: the wait ends at its timeout with the pod named.
        let err = gate
            .wait_programmed(&pod, &[ip], Duration::from_millis(30))
            .unwrap_err();
        assert!(err.contains("ns/p"), "{err}");
        assert!(
            rx.try_recv().is_ok(),
            "the controller was told of the attachment"
        );
        // Published by a "commit" 50 ms into a 10 s wait: it returns right after.
        let committer = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                shared.local_ips.lock().unwrap().insert(ip);
                shared.local_ips_changed.notify_all();
            })
        };
        let started = Instant::now();
        gate.wait_programmed(&pod, &[ip], Duration::from_secs(10))
            .unwrap();
        let waited = started.elapsed();
        committer.join().unwrap();
        assert!(
            waited >= Duration::from_millis(50) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }
}
