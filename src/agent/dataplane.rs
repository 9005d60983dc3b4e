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

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
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
        Some(NodeInfo {
            name,
            internal_ip,
            pod_cidrs: cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
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
        loop {
            {
                let have = self
                    .shared
                    .local_ips
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if ips.iter().all(|ip| have.contains(ip)) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{pod}: addresses {ips:?} not in this node's table yet (is the pod in the API with spec.nodeName = this node?)"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The CNI service once this node's podCIDRs are known.
pub type ServiceSlot = Arc<RwLock<Option<Arc<CniService>>>>;

/// Waits for this node's podCIDRs, sets up overlay, IPAM and the CNI service, then follows
/// node changes for the overlay. Runs forever.
pub async fn run(
    cfg: DataplaneConfig,
    mut nodes: tokio::sync::watch::Receiver<Vec<NodeInfo>>,
    gate: Arc<AgentGate>,
    slot: ServiceSlot,
) {
    let mut state: Option<(rtnetlink::Handle, Overlay, PodCidrs)> = None;
    loop {
        let snapshot = nodes.borrow_and_update().clone();
        if let Some(me) = snapshot.iter().find(|n| n.name == cfg.node) {
            if state.is_none() {
                match setup(&cfg, me, gate.clone()).await {
                    Ok((handle, overlay, cidrs, service)) => {
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
                let report = overlay.sync(handle, &remotes).await;
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
        if nodes.changed().await.is_err() {
            return;
        }
    }
}

async fn setup(
    cfg: &DataplaneConfig,
    me: &NodeInfo,
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
            mtu: overlay.mtu(),
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
