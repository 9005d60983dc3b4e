//! The agent's side of the mesh (DESIGN §5, issue 9): authenticated control connections to
//! every other node, path health and relay decisions, and the WireGuard keys and endpoints
//! that make the encrypted pod path. Off without a cluster secret (`--mesh-secret-file`, the
//! mounted Secret `weft-mesh`; or `WEFT_MESH_SECRET` outside Kubernetes).
//!
//! Flow: Node objects (the same [`NodeInfo`] channel the overlay follows) → members, their
//! underlay addresses and published identity keys (annotation [`IDENTITY_ANNOTATION`], which
//! this agent writes on its own Node) → one [`weft_mesh::net::MeshNode`] dials every member
//! and accepts them; a peer is admitted only if it proves the cluster secret *and* presents
//! the key its Node publishes. Over each connection: probes every second (path health into a
//! [`PathTable`], hysteresis there), our reachability report (so peers can pick us as a relay),
//! and our WireGuard public key, port and readiness. From that, one [`PeerRoute`] per peer
//! ([`decide_route`], pure) goes to the dataplane on a watch channel, and the WireGuard
//! configuration (peers, endpoints, AllowedIPs incl. relayed podCIDRs) is written for
//! `weft-wg` (which reloads it live) or applied to the kernel module.
//!
//! Mixed mode: every node accepts plain VXLAN and WireGuard; a peer's pods are routed over
//! `wgweft` only when this node's device is ready, the peer advertises its own as ready, and
//! the device has the peer configured; otherwise over `vxweft`. A peer refused by the mesh
//! (wrong cluster secret, a key other than the one its Node publishes) gets an `unreachable`
//! route: its pods are cut off from this node until it authenticates.
//!
//! Layout: the pure route decision ([`decide_route`]) and the snapshot types first, then the
//! loop (`Mesh`: one task owns every peer's state; its handlers share that struct, which is
//! why this file is past 800 lines); the WireGuard device is in `mesh/wireguard.rs`.
//!
//! What it must not touch: nftables (the policy engine judges traffic from `wgweft` like any
//! other forwarded traffic; `wgweft` is deliberately not a `weft…` pod interface), and links
//! and routes (the dataplane programs what [`MeshRouting`] says).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};
use weft_dataplane::ipam::tunnel_address;
use weft_dataplane::overlay::PeerRoute;
use weft_mesh::cluster::Admission;
use weft_mesh::connection::{CloseReason, Misbehaviour, SessionConfig};
use weft_mesh::message::MeshMessage;
use weft_mesh::net::{MeshEvent, MeshNode, NetConfig, PeerLink};
use weft_mesh::path::{Hysteresis, Path as MeshPath, PathTable};
use weft_mesh::tunnel_probe::{TunnelProber, silence};
use weft_mesh::wg::{DeviceConfig, PeerConfig, decode_key, encode_key};
use weft_mesh::wire::RefuseReason;
use weft_mesh::{ClusterKeys, Context, Identity, MeshMetrics, NodeName};

use super::dataplane::NodeInfo;

mod wireguard;
use wireguard::Wireguard;
#[cfg(test)]
use wireguard::clamp;

/// Annotation on a Node: its mesh identity key (Ed25519 public key, base64).
pub const IDENTITY_ANNOTATION: &str = "weft.dev/mesh-identity";
/// Default TCP port of the control connections.
pub const DEFAULT_PORT: u16 = weft_mesh::net::DEFAULT_PORT;
/// How long after the mesh starts a peer that was never reached counts as not probed yet.
const STARTUP_GRACE: Duration = Duration::from_secs(15);
/// How long a peer whose control connection *closed* (its agent exited: kill, upgrade,
/// rolling restart) keeps its last path, report and WireGuard advertisement. Its host, its
/// weft-wg and its routes outlive the agent, so a closed connection says nothing about the
/// data path: rerouting would only break the flows the restart must not touch (issue 8). A
/// peer that is not back within this time is judged by probes again (then relayed or down,
/// with hysteresis). A path that fails while the connection stays open (underlay loss)
/// is judged at once: its probes go unanswered.
const RESTART_GRACE: Duration = Duration::from_secs(10);
/// A peer without a control connection (after `RESTART_GRACE`) is judged by echo probes its
/// kernel answers (through the WireGuard session while its pods are routed into `wgweft`,
/// else to its underlay address): an answer at most this old says its direct path carries
/// packets, however long its agent takes to come back (an upgrade pulling an image, a crash
/// loop). Probes go once a second.
const ECHO_FRESH: Duration = Duration::from_secs(3);
/// How long a reconnected peer's last WireGuard advertisement stands without a new one (a
/// peer with encryption on re-advertises in its first messages).
const ADVERT_WAIT: Duration = Duration::from_secs(3);
/// How long a peer found in the WireGuard configuration a previous run of this agent left
/// behind keeps that key and port without advertising them again (the handoff: a restarted
/// agent carries on with the device as it is, changing nothing, until its peers speak).
const ADOPT_WAIT: Duration = STARTUP_GRACE;
/// How long pod traffic to a peer that advertises WireGuard may go over plain VXLAN while
/// the first session with it forms (a handshake takes milliseconds; WireGuard retries every
/// 5 s). After that, without a live session, the peer is reported (`weft_mesh_wireguard_failing_peers`,
/// an error naming the UDP port) and its pods are routed into the tunnel all the same: a
/// node with encryption on never falls back to plaintext towards a peer that has it on too
/// (its direct path counts as down, so a relay through a third node carries it if one can).
const WG_SESSION_GRACE: Duration = Duration::from_secs(20);
/// How long the echo probes through a peer's WireGuard session ([`TunnelProber`]) may go
/// unanswered while its pods are routed into `wgweft` before the session counts as dead: its
/// direct path is then judged down (as if a control probe had failed), so a third node relays
/// within seconds instead of WireGuard's 180 s expiry. Probes go once a second; 5 s tolerates
/// four lost in a row on a busy tunnel.
const TUNNEL_SILENCE: Duration = Duration::from_secs(5);
/// Default WireGuard UDP port.
pub const DEFAULT_WG_PORT: u16 = weft_mesh::wg::DEFAULT_LISTEN_PORT;

/// How pod traffic is encrypted, when it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireguardBackend {
    /// `weft-wg` (gotatun) owns `wgweft`; the agent writes its configuration file.
    Userspace,
    /// The kernel module: the agent creates `wgweft` and applies the configuration with `wg`.
    Kernel,
}

impl WireguardBackend {
    /// The kernel module where it is loaded, else userspace.
    pub fn detect() -> WireguardBackend {
        if Path::new("/sys/module/wireguard").is_dir() {
            WireguardBackend::Kernel
        } else {
            WireguardBackend::Userspace
        }
    }
}

/// Settings of the mesh.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// This node.
    pub node: String,
    /// The cluster secret.
    pub secret: MeshSecret,
    /// TCP port of the control connections (the same on every node).
    pub port: u16,
    /// Address to listen on (`None`: every address).
    pub listen_ip: Option<IpAddr>,
    /// State dir: `mesh-identity.pk8`, `wg/private.key`, `wg/wgweft.conf`.
    pub state_dir: PathBuf,
    /// Encrypt pod traffic to peers that are ready for it.
    pub encryption: bool,
    /// `--encryption required`: never plain VXLAN; a peer not reachable over WireGuard is
    /// blocked instead.
    pub encryption_required: bool,
    /// WireGuard UDP port (the same on every node).
    pub wg_port: u16,
    /// Userspace or kernel WireGuard.
    pub backend: WireguardBackend,
}

/// Where the cluster secret comes from.
#[derive(Clone)]
pub enum MeshSecret {
    /// A file (`--mesh-secret-file`; a mounted Secret).
    File(PathBuf),
    /// The value (`WEFT_MESH_SECRET`: for agents run outside Kubernetes).
    Value(String),
}

impl std::fmt::Debug for MeshSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MeshSecret::File(p) => write!(f, "file {}", p.display()),
            MeshSecret::Value(_) => f.write_str("WEFT_MESH_SECRET (value hidden)"),
        }
    }
}

impl MeshSecret {
    fn load(&self) -> anyhow::Result<ClusterKeys> {
        match self {
            MeshSecret::File(p) => ClusterKeys::load(p)
                .with_context(|| "mesh: the cluster secret (--mesh-secret-file)".to_string()),
            MeshSecret::Value(v) => ClusterKeys::from_secret(v.as_bytes())
                .with_context(|| "mesh: the cluster secret (WEFT_MESH_SECRET)".to_string()),
        }
    }
}

/// What the dataplane programs: one route choice per peer, and whether `wgweft` is ours.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshRouting {
    /// Route per peer node name.
    pub routes: BTreeMap<String, PeerRoute>,
    /// Encryption on: the dataplane gives `wgweft` its addresses, MTU and brings it up.
    pub encryption: bool,
    /// The mesh has made its first choices. Until then (a few ms after start, at most until
    /// the dataplane's own deadline) the dataplane leaves the overlay routes the kernel
    /// has as they are: a restarted agent must not move peers to plain VXLAN and back.
    pub decided: bool,
}

/// This node's mesh, as `GET /debug/mesh` shows it (and `weft status`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MeshSnapshot {
    /// This node.
    pub node: String,
    /// Control port.
    pub port: u16,
    /// This node's identity key (base64), as published on its Node.
    pub identity: String,
    /// Whether the Node object publishes that key yet.
    pub identity_published: bool,
    /// Encryption of pod traffic.
    pub encryption: EncryptionSnapshot,
    /// One entry per peer node.
    pub peers: Vec<PeerSnapshot>,
    /// Why the mesh is not running, if it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// This node's WireGuard side.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EncryptionSnapshot {
    /// `--encryption on` (or `required`).
    pub enabled: bool,
    /// `--encryption required`: never plain VXLAN from this node.
    #[serde(default)]
    pub required: bool,
    /// `userspace` or `kernel` (when enabled).
    pub backend: Option<WireguardBackend>,
    /// The device is up and configured: peers may send to us encrypted.
    pub ready: bool,
    /// Its public key (base64).
    pub public_key: Option<String>,
    /// Its UDP port.
    pub port: u16,
    /// Why it is not ready, if it is not.
    pub problem: Option<String>,
}

/// One peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerSnapshot {
    /// Node name.
    pub name: String,
    /// Its underlay address.
    pub address: Option<IpAddr>,
    /// `established`, `connecting`, or `refused`.
    pub state: String,
    /// Why it was refused (when `state` is `refused`).
    pub refused: Option<String>,
    /// `direct`, `via <node>`, or `down`.
    pub path: String,
    /// How its pods are reached: `wireguard`, `plain` (VXLAN), or `blocked`.
    pub encryption: String,
    /// It advertises a ready WireGuard device.
    pub wireguard_ready: bool,
    /// Seconds since the last completed control handshake with it.
    pub last_handshake_age_seconds: Option<f64>,
    /// Seconds since its last WireGuard handshake (userspace backend).
    pub wireguard_handshake_age_seconds: Option<f64>,
    /// Round trip of the last answered probe, milliseconds.
    pub probe_rtt_ms: Option<f64>,
    /// Both sides have WireGuard ready but no session has formed (or the last one expired),
    /// or the session no longer answers echo probes through the tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_problem: Option<String>,
    /// Where its WireGuard session is probed (its tunnel address), while its pods are routed
    /// into `wgweft`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_probe_target: Option<IpAddr>,
    /// Seconds since the session last answered a probe (`None`: not yet in this period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_answer_age_seconds: Option<f64>,
    /// Where its kernel is sent echo requests (the tunnel target, else its underlay address):
    /// how its path is judged while its agent is away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_target: Option<IpAddr>,
    /// Seconds since its kernel last answered one (`None`: not since it was probed there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_answer_age_seconds: Option<f64>,
}

/// What `/metrics` and `/debug/mesh` read (set once when the mesh starts).
#[derive(Debug, Default)]
pub struct MeshShared {
    /// The crate's connection metrics.
    pub metrics: Arc<MeshMetrics>,
    /// Application messages refused (did not decode), by reason.
    pub messages_refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Peers currently refused (their pods blocked).
    pub refused_peers: AtomicU64,
    /// Our WireGuard device is ready (0/1).
    pub wireguard_ready: AtomicU64,
    /// Peers whose pods are reached over WireGuard.
    pub encrypted_peers: AtomicU64,
    /// Peers with WireGuard ready on both sides but no live session past the grace.
    pub wireguard_failing_peers: AtomicU64,
    /// Peers whose WireGuard session has not answered an echo probe for `TUNNEL_SILENCE`.
    pub wireguard_silent_peers: AtomicU64,
    /// The echo prober's requests sent, replies matched, sends refused (copied each tick).
    pub echo_counts: [AtomicU64; 3],
    /// The latest snapshot.
    pub snapshot: Mutex<MeshSnapshot>,
}

static SHARED: OnceLock<Arc<MeshShared>> = OnceLock::new();

/// `GET /debug/mesh`: the snapshot as JSON; `None` when the mesh is off.
pub fn debug_json() -> Option<String> {
    let shared = SHARED.get()?;
    let snap = shared
        .snapshot
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    serde_json::to_string_pretty(&snap).ok()
}

/// The mesh's part of `/metrics` (empty when the mesh is off).
pub fn render_metrics() -> String {
    use std::fmt::Write as _;
    let Some(s) = SHARED.get() else {
        return String::new();
    };
    let mut out = s.metrics.render();
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP weft_mesh_messages_refused_total Control messages from authenticated peers that did not decode (the peer is disconnected).\n\
         # TYPE weft_mesh_messages_refused_total counter"
    );
    for (k, v) in s
        .messages_refused
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "weft_mesh_messages_refused_total{{reason=\"{k}\"}} {v}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP weft_mesh_refused_peers Peers refused by the mesh (wrong secret or key): their pods are unreachable.\n\
         # TYPE weft_mesh_refused_peers gauge\nweft_mesh_refused_peers {}\n\
         # HELP weft_mesh_wireguard_ready This node's WireGuard device is up and configured.\n\
         # TYPE weft_mesh_wireguard_ready gauge\nweft_mesh_wireguard_ready {}\n\
         # HELP weft_mesh_encrypted_peers Peers whose pods are reached over WireGuard.\n\
         # TYPE weft_mesh_encrypted_peers gauge\nweft_mesh_encrypted_peers {}\n\
         # HELP weft_mesh_wireguard_failing_peers Peers with WireGuard ready on both sides but no session (UDP port blocked?): their pods are not reached in plaintext.\n\
         # TYPE weft_mesh_wireguard_failing_peers gauge\nweft_mesh_wireguard_failing_peers {}\n\
         # HELP weft_mesh_wireguard_silent_peers Peers whose WireGuard session no longer answers echo probes through the tunnel (UDP port blocked after it formed?): relayed if a third node can.\n\
         # TYPE weft_mesh_wireguard_silent_peers gauge\nweft_mesh_wireguard_silent_peers {}\n\
         # HELP weft_mesh_echo_requests_total Echo requests sent to peers' kernels (through the tunnel, else to their underlay address), one per peer per second.\n\
         # TYPE weft_mesh_echo_requests_total counter\nweft_mesh_echo_requests_total {}\n\
         # HELP weft_mesh_echo_replies_total Echo replies from peers' kernels matched to our requests.\n\
         # TYPE weft_mesh_echo_replies_total counter\nweft_mesh_echo_replies_total {}\n\
         # HELP weft_mesh_echo_send_errors_total Echo requests the kernel refused to send (no route, …).\n\
         # TYPE weft_mesh_echo_send_errors_total counter\nweft_mesh_echo_send_errors_total {}",
        g(&s.refused_peers),
        g(&s.wireguard_ready),
        g(&s.encrypted_peers),
        g(&s.wireguard_failing_peers),
        g(&s.wireguard_silent_peers),
        g(&s.echo_counts[0]),
        g(&s.echo_counts[1]),
        g(&s.echo_counts[2])
    );
    out
}

/// A peer's WireGuard advertisement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WgAdvert {
    public_key: [u8; 32],
    port: u16,
    ready: bool,
}

/// What decides a peer's route, per peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInputs<'a> {
    /// The peer is refused by the mesh.
    pub refused: bool,
    /// Its path ([`PathTable`]); `None`: not probed yet.
    pub path: Option<&'a MeshPath>,
    /// `--encryption required`: blocked rather than plain VXLAN.
    pub encryption_required: bool,
}

/// The route of one peer (pure): refused → blocked; relayed through B → over WireGuard if
/// `wg_ready(B)` else VXLAN via B; otherwise over WireGuard if `wg_ready(peer)` else VXLAN.
/// With `--encryption required`, blocked wherever that would say VXLAN. `Unreachable` keeps
/// the direct route: nothing better is known.
pub fn decide_route(
    peer: &str,
    inputs: RouteInputs<'_>,
    wg_ready: impl Fn(&str) -> bool,
    cidrs_of: impl Fn(&str) -> Vec<IpNet>,
) -> PeerRoute {
    if inputs.refused {
        return PeerRoute::Blocked;
    }
    match inputs.path {
        Some(MeshPath::Relay { via }) => {
            if wg_ready(via.as_str()) {
                PeerRoute::Wireguard
            } else if inputs.encryption_required {
                PeerRoute::Blocked
            } else {
                PeerRoute::VxlanVia {
                    relay: via.to_string(),
                    relay_cidrs: cidrs_of(via.as_str()),
                }
            }
        }
        _ if wg_ready(peer) => PeerRoute::Wireguard,
        _ if inputs.encryption_required => PeerRoute::Blocked,
        _ => PeerRoute::Vxlan,
    }
}

/// Whether a connection's end is evidence against the peer (not a passing condition): it
/// does not hold the cluster secret, or presents a key other than its Node's.
fn refusal(reason: &CloseReason) -> Option<&'static str> {
    match reason {
        CloseReason::Misbehaviour(Misbehaviour::ClusterSecretMismatch)
        | CloseReason::Refused(RefuseReason::ClusterSecret) => Some("cluster secret mismatch"),
        CloseReason::Misbehaviour(Misbehaviour::NotAdmitted(Admission::KeyMismatch(_))) => {
            Some("identity key differs from its Node's annotation")
        }
        CloseReason::Misbehaviour(Misbehaviour::BadSignature) => Some("bad transcript signature"),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    addr: IpAddr,
    pod_cidrs: Vec<IpNet>,
}

#[derive(Debug, Default)]
struct PeerState {
    links: Vec<PeerLink>,
    refused: Option<&'static str>,
    last_up: Option<Instant>,
    sent_seq: u64,
    sent_at: Option<Instant>,
    acked_seq: u64,
    rtt: Option<Duration>,
    wg: Option<WgAdvert>,
    /// When its last connection closed (its agent gone); cleared once it is back or judged.
    closed_at: Option<Instant>,
    /// Reconnected after a full disconnect: its old advertisement stands until it advertises
    /// again (at once, when its encryption is on) or this deadline passes (it is off).
    advert_due: Option<Instant>,
    dialer: Option<watch::Sender<bool>>,
    dial_addr: Option<SocketAddr>,
    /// Since when both sides have WireGuard ready without a live session (see
    /// `WG_SESSION_GRACE`); `None` while there is one or either side is not ready.
    wg_waiting_since: Option<Instant>,
    /// The failure was logged (logged again when it clears).
    wg_failing_logged: bool,
    /// The tunnel address its WireGuard session is probed at, and since when (its pods are
    /// routed into `wgweft`); `None`: not probed through the tunnel.
    tunnel_target: Option<(IpAddr, Instant)>,
    /// Where its kernel is sent echo requests: the tunnel target, else its underlay address.
    echo_target: Option<IpAddr>,
    /// Its session's silence was logged (logged again when it ends).
    tunnel_silent_logged: bool,
}

impl PeerState {
    fn live_link(&mut self) -> Option<&PeerLink> {
        self.links.retain(|l| !l.is_closed());
        self.links.last()
    }

    /// How long both sides have had WireGuard ready without a session, once that is past
    /// `WG_SESSION_GRACE` (the peer is then failing); `None` otherwise.
    fn wg_failing_for(&self) -> Option<Duration> {
        self.wg_waiting_since
            .map(|t| t.elapsed())
            .filter(|waited| *waited >= WG_SESSION_GRACE)
    }

    /// How long its WireGuard session has not answered the probes through the tunnel, once
    /// that reaches `TUNNEL_SILENCE`; `None` while it answers or is not probed.
    fn tunnel_silent_for(&self, prober: Option<&TunnelProber>, name: &str) -> Option<Duration> {
        let prober = prober?;
        silence(
            self.tunnel_target.map(|(_, since)| since),
            prober.last_answer(name),
            Instant::now(),
            TUNNEL_SILENCE,
        )
    }
}

/// Where a peer's WireGuard session is probed: the tunnel address of its first IPv4 podCIDR
/// (else of its first IPv6 one) that the prober can reach.
fn tunnel_probe_target(cidrs: &[IpNet], supports: impl Fn(&IpAddr) -> bool) -> Option<IpAddr> {
    let addrs: Vec<IpAddr> = cidrs.iter().map(|c| tunnel_address(c.trunc())).collect();
    let usable = |a: &&IpAddr| supports(a);
    (addrs.iter().filter(|a| a.is_ipv4()).find(usable))
        .or_else(|| addrs.iter().find(usable))
        .copied()
}

/// What the mesh saw of one peer in one tick, for [`direct_observation`].
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// A control connection is up.
    live: bool,
    /// A probe was sent on it (a fresh connection has not probed yet).
    probed: bool,
    /// That probe was answered within the interval.
    acked: bool,
    /// Never reached yet, in the mesh's first seconds.
    starting: bool,
    /// Its connection closed less than `RESTART_GRACE` ago.
    restarting: bool,
    /// Its kernel answered an echo probe within `ECHO_FRESH`; `None`: no prober.
    echo_answered: Option<bool>,
    /// Its WireGuard session cannot form, or carries nothing.
    wireguard_broken: bool,
}

/// Whether one tick counts as a success or a failure of a peer's direct path, or says
/// nothing (pure). Over a control connection: its probe's answer. Without one: the echo its
/// kernel answers: an agent that is away (restarting, upgrading, crashing) says nothing
/// about the data path, which its host, `weft-wg` and routes keep carrying; with no prober,
/// a peer that is away counts as a failure (the only evidence left). A WireGuard session
/// that cannot form or carries nothing is a failure either way.
fn direct_observation(s: Seen) -> Option<bool> {
    if s.live {
        return s.probed.then_some(s.acked && !s.wireguard_broken);
    }
    if s.starting || s.restarting {
        return None;
    }
    Some(s.echo_answered == Some(true) && !s.wireguard_broken)
}

/// Starts the mesh in the background and returns the routing the dataplane must follow. If
/// it cannot start (no secret, an unreadable identity, the port taken), that is logged as an
/// error, shown in `/debug/mesh`, and retried every 30 s: policy enforcement and the plain
/// overlay go on meanwhile (nothing is encrypted, no peer is refused).
pub async fn start(
    cfg: MeshConfig,
    client: kube::Client,
    nodes: watch::Receiver<Vec<NodeInfo>>,
) -> anyhow::Result<watch::Receiver<MeshRouting>> {
    let shared = Arc::new(MeshShared::default());
    let _ = SHARED.set(shared.clone());
    // The encryption intent is known now: the dataplane sizes pod MTUs by it.
    let (routing_tx, routing_rx) = watch::channel(MeshRouting {
        routes: BTreeMap::new(),
        encryption: cfg.encryption,
        decided: false,
    });
    tokio::spawn(async move {
        loop {
            match bring_up(&cfg, client.clone(), &shared, &routing_tx).await {
                Ok((mesh, events)) => {
                    mesh.run(nodes, events).await;
                    return;
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    error!(error = %why, "mesh not started: pods on other nodes are reached over plain VXLAN and nothing is encrypted; retrying in 30 s");
                    shared
                        .snapshot
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .problem = Some(why);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
        }
    });
    Ok(routing_rx)
}

/// Loads the secret and the identity, listens: the mesh's loop, ready to run.
async fn bring_up(
    cfg: &MeshConfig,
    client: kube::Client,
    shared: &Arc<MeshShared>,
    routing: &watch::Sender<MeshRouting>,
) -> anyhow::Result<(Mesh, mpsc::Receiver<MeshEvent>)> {
    let cluster = cfg.secret.load()?;
    let identity = Identity::load_or_generate(&cfg.state_dir, &ring::rand::SystemRandom::new())
        .context("mesh: this node's identity key")?;
    let me = NodeName::new(&cfg.node)
        .map_err(|e| anyhow::anyhow!("mesh: node name {:?}: {e}", cfg.node))?;
    let session = SessionConfig {
        keepalive_ms: 2_000,
        dead_after_ms: 8_000,
        ..SessionConfig::default()
    };
    let ctx = Context::new(me.clone(), identity, cluster, session);
    ctx.peers.require_published_keys(true);
    let (node, events) = MeshNode::new(ctx, NetConfig::default(), shared.metrics.clone());
    let bind = SocketAddr::new(
        cfg.listen_ip
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        cfg.port,
    );
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("mesh: listening on {bind}"))?;
    let mut wireguard = if cfg.encryption {
        Some(Wireguard::open(
            &cfg.state_dir.join("wg"),
            cfg.backend,
            cfg.wg_port,
        )?)
    } else {
        None
    };
    // What a previous run left on the device: kept as it is (see `ADOPT_WAIT`), and its
    // readiness read now, so the first route choices already see the live sessions.
    let adopted = match &mut wireguard {
        Some(wg) => {
            let peers = wg.adopt();
            wg.refresh();
            peers
        }
        None => Vec::new(),
    };
    let prober = match TunnelProber::start(Duration::from_secs(1)) {
        Ok(p) => Some(p),
        Err(e) => {
            warn!(error = %e, "mesh: no echo probes (a raw ICMP socket needs CAP_NET_RAW): a peer whose agent is away longer than the restart grace counts as unreachable, and a WireGuard session that dies after it formed is noticed only when WireGuard expires it (about 200 s)");
            None
        }
    };
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(node.clone().serve(listener, shutdown.clone()));
    let identity_b64 = encode_key(&node.context().identity.public_key());
    info!(%bind, identity = %identity_b64, encryption = cfg.encryption, backend = ?wireguard.as_ref().map(|w| w.backend), "mesh listening");
    let mesh = Mesh {
        table: PathTable::new(me.clone(), Hysteresis::default()),
        me,
        identity_b64,
        identity_published: false,
        last_patch: None,
        members: BTreeMap::new(),
        peers: BTreeMap::new(),
        node,
        shared: shared.clone(),
        wireguard,
        prober,
        adopted,
        seen_self: false,
        advertised: None,
        last_advert: Instant::now(),
        started: Instant::now(),
        routing: routing.clone(),
        client,
        cfg: cfg.clone(),
        _shutdown: shutdown_tx,
    };
    Ok((mesh, events))
}

/// The loop's state (one task owns it: no locks on the hot path).
struct Mesh {
    cfg: MeshConfig,
    me: NodeName,
    identity_b64: String,
    identity_published: bool,
    last_patch: Option<Instant>,
    members: BTreeMap<NodeName, Member>,
    peers: BTreeMap<NodeName, PeerState>,
    table: PathTable,
    node: Arc<MeshNode>,
    shared: Arc<MeshShared>,
    wireguard: Option<Wireguard>,
    /// Echo probes through each peer's WireGuard session (with encryption on; `None` also when
    /// no raw ICMP socket could be opened: then a dead session is noticed only at its expiry).
    prober: Option<TunnelProber>,
    /// Peers of the WireGuard configuration a previous run left, not matched to a member
    /// yet (by endpoint address); dropped after `ADOPT_WAIT`.
    adopted: Vec<PeerConfig>,
    /// The node list has shown our own Node: the members (and so the routes) are known.
    seen_self: bool,
    advertised: Option<WgAdvert>,
    last_advert: Instant,
    started: Instant,
    routing: watch::Sender<MeshRouting>,
    client: kube::Client,
    _shutdown: watch::Sender<bool>,
}

impl Mesh {
    async fn run(
        mut self,
        mut nodes: watch::Receiver<Vec<NodeInfo>>,
        mut events: mpsc::Receiver<MeshEvent>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.on_nodes(&nodes.borrow_and_update().clone());
        loop {
            tokio::select! {
                changed = nodes.changed() => {
                    if changed.is_err() { return }
                    let snapshot = nodes.borrow_and_update().clone();
                    self.on_nodes(&snapshot);
                }
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => return,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn on_nodes(&mut self, nodes: &[NodeInfo]) {
        let mut members = BTreeMap::new();
        let mut keys = Vec::new();
        let mut names = Vec::new();
        for n in nodes {
            let name = match NodeName::new(&n.name) {
                Ok(name) => name,
                Err(e) => {
                    warn!(node = %n.name, error = %e, "mesh: node name not usable; that node is left out of the mesh");
                    continue;
                }
            };
            names.push(name.clone());
            if name == self.me {
                self.seen_self = true;
                let published = n.mesh_identity.as_deref() == Some(self.identity_b64.as_str());
                if published && !self.identity_published {
                    info!("mesh: our identity key is published on our Node");
                }
                self.identity_published = published;
                continue;
            }
            match n.mesh_identity.as_deref().map(decode_key) {
                Some(Ok(k)) => keys.push((name.clone(), k)),
                Some(Err(e)) => {
                    warn!(node = %n.name, annotation = IDENTITY_ANNOTATION, error = %e, "mesh: the Node's identity annotation is invalid; it is refused until fixed")
                }
                None => {}
            }
            if let Some(addr) = n.internal_ip {
                members.insert(
                    name,
                    Member {
                        addr,
                        pod_cidrs: n.pod_cidrs.clone(),
                    },
                );
            }
        }
        self.node.context().peers.set_members(names);
        self.node.context().peers.replace_keys(keys);
        for change in self.table.set_peers(members.keys().cloned()) {
            info!(peer = %change.peer, from = ?change.from, to = ?change.to, "mesh: path changed");
        }
        let gone: Vec<NodeName> = self
            .peers
            .keys()
            .filter(|p| !members.contains_key(*p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(st) = self.peers.remove(&p) {
                if let Some(stop) = st.dialer {
                    let _ = stop.send(true);
                }
                for l in st.links {
                    tokio::spawn(async move { l.close().await });
                }
                info!(peer = %p, "mesh: node left the cluster; connection closed");
            }
        }
        for (name, m) in &members {
            let addr = SocketAddr::new(m.addr, self.cfg.port);
            let st = self.peers.entry(name.clone()).or_default();
            if st.dial_addr != Some(addr) {
                if let Some(stop) = st.dialer.take() {
                    let _ = stop.send(true);
                }
                let (stop, stopped) = watch::channel(false);
                tokio::spawn(self.node.clone().maintain(name.clone(), addr, stopped));
                st.dialer = Some(stop);
                st.dial_addr = Some(addr);
            }
        }
        self.members = members;
        self.adopt_adverts();
        self.publish_identity();
        self.update();
    }

    /// Gives each member found in the previous run's WireGuard configuration that key and
    /// port as its advertisement until it advertises again or `ADOPT_WAIT` passes.
    fn adopt_adverts(&mut self) {
        if self.adopted.is_empty() {
            return;
        }
        let deadline = self.started + ADOPT_WAIT;
        let mut kept = Vec::new();
        for pc in std::mem::take(&mut self.adopted) {
            let Some(endpoint) = pc.endpoint else {
                continue;
            };
            let Some(name) = self.peer_by_addr(endpoint.ip()) else {
                kept.push(pc);
                continue;
            };
            let Some(st) = self.peers.get_mut(&name) else {
                continue;
            };
            if st.wg.is_none() {
                info!(peer = %name, key = %encode_key(&pc.public_key), "mesh: WireGuard peer kept from the previous run until it advertises again");
                st.wg = Some(WgAdvert {
                    public_key: pc.public_key,
                    port: endpoint.port(),
                    ready: true,
                });
                st.advert_due = Some(deadline);
            }
        }
        self.adopted = kept;
    }

    /// Writes our identity key on our Node (merge patch of one annotation), at most every 5 s
    /// while the Node does not show it.
    fn publish_identity(&mut self) {
        if self.identity_published
            || self
                .last_patch
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.last_patch = Some(Instant::now());
        let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(self.client.clone());
        let name = self.cfg.node.clone();
        let patch = serde_json::json!({"metadata": {"annotations": {IDENTITY_ANNOTATION: self.identity_b64}}});
        tokio::spawn(async move {
            match api
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    info!(node = %name, annotation = IDENTITY_ANNOTATION, "mesh: identity key written on our Node")
                }
                Err(e) => {
                    error!(node = %name, error = %e, "mesh: cannot write our identity key on our Node (RBAC: patch nodes?); peers refuse us until it is there; retrying")
                }
            }
        });
    }

    fn peer_by_addr(&self, ip: IpAddr) -> Option<NodeName> {
        self.members
            .iter()
            .find(|(_, m)| m.addr == ip)
            .map(|(n, _)| n.clone())
    }

    fn on_event(&mut self, ev: MeshEvent) {
        match ev {
            MeshEvent::Up { peer, link } => {
                let name = peer.name.clone();
                let Some(st) = self.peers.get_mut(&name) else {
                    // Admitted before its Node left our list: nothing to do with it.
                    tokio::spawn(async move { link.close().await });
                    return;
                };
                if let Some(why) = st.refused.take() {
                    info!(peer = %name, was = why, "mesh: peer authenticated again; its pods are reachable");
                }
                st.last_up = Some(Instant::now());
                st.closed_at = None;
                if st.live_link().is_none() {
                    // Fully disconnected before: it re-advertises on this connection (a
                    // restart with encryption off replaces the advertisement); until then
                    // its last advertisement stands, as its weft-wg kept running.
                    st.sent_seq = 0;
                    st.acked_seq = 0;
                    if st.wg.is_some() {
                        st.advert_due = Some(Instant::now() + ADVERT_WAIT);
                    }
                }
                st.links.push(link.clone());
                let mut first = vec![MeshMessage::Reachability(self.table.my_report()).encode()];
                if let Some(adv) = self.advertised {
                    first.push(
                        MeshMessage::Wireguard {
                            public_key: adv.public_key,
                            port: adv.port,
                            ready: adv.ready,
                        }
                        .encode(),
                    );
                }
                for m in first {
                    link.try_send(m);
                }
                self.update();
            }
            MeshEvent::Message { peer, payload } => self.on_message(peer, &payload),
            MeshEvent::Down { peer, addr, reason } => {
                let name = peer.or_else(|| self.peer_by_addr(addr.ip()));
                let Some(name) = name else { return };
                let Some(st) = self.peers.get_mut(&name) else {
                    return;
                };
                st.links.retain(|l| !l.is_closed());
                if let Some(why) = refusal(&reason)
                    && st.refused.is_none()
                {
                    error!(peer = %name, %addr, reason = why, "mesh: peer refused; its pods are unreachable from this node until it authenticates (check the weft-mesh secret on that node)");
                    st.refused = Some(why);
                }
                if st.links.is_empty() && st.refused.is_none() {
                    // Its report and path stand for RESTART_GRACE (on_tick forgets them).
                    info!(peer = %name, grace_seconds = RESTART_GRACE.as_secs(), "mesh: peer's control connection closed (agent restarting?): its routes stay as they are meanwhile");
                    st.closed_at.get_or_insert_with(Instant::now);
                } else if st.links.is_empty() {
                    for c in self.table.forget_report(&name) {
                        info!(peer = %c.peer, from = ?c.from, to = ?c.to, "mesh: path changed");
                    }
                }
                self.update();
            }
        }
    }

    fn on_message(&mut self, peer: NodeName, payload: &[u8]) {
        let msg = match MeshMessage::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                let label = match e {
                    weft_mesh::wire::WireError::UnknownKind(_) => "unknown_kind",
                    weft_mesh::wire::WireError::Truncated(_) => "truncated",
                    _ => "malformed",
                };
                *self
                    .shared
                    .messages_refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(label)
                    .or_default() += 1;
                warn!(%peer, error = %e, bytes = payload.len(), "mesh: control message refused; disconnecting the peer");
                if let Some(st) = self.peers.get_mut(&peer) {
                    for l in st.links.drain(..) {
                        tokio::spawn(async move { l.close().await });
                    }
                }
                return;
            }
        };
        let Some(st) = self.peers.get_mut(&peer) else {
            return;
        };
        match msg {
            MeshMessage::Probe(seq) => {
                if let Some(l) = st.live_link() {
                    l.try_send(MeshMessage::ProbeAck(seq).encode());
                }
            }
            MeshMessage::ProbeAck(seq) => {
                if seq == st.sent_seq {
                    st.acked_seq = seq;
                    st.rtt = st.sent_at.map(|t| t.elapsed());
                }
            }
            MeshMessage::Reachability(report) => {
                for c in self.table.report(&peer, &report) {
                    info!(peer = %c.peer, from = ?c.from, to = ?c.to, reporter = %peer, "mesh: path changed");
                }
                self.update();
            }
            MeshMessage::Wireguard {
                public_key,
                port,
                ready,
            } => {
                let adv = WgAdvert {
                    public_key,
                    port,
                    ready,
                };
                st.advert_due = None; // advertised again (same or new)
                if st.wg != Some(adv) {
                    info!(%peer, ready, port, key = %encode_key(&public_key), "mesh: peer's WireGuard side");
                    st.wg = Some(adv);
                    self.update();
                }
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let mut probes = Vec::new();
        let mut expired = Vec::new();
        let mut silent_peers = 0u64;
        for (name, st) in &mut self.peers {
            let silent = st.tunnel_silent_for(self.prober.as_ref(), name.as_str());
            match (silent, st.tunnel_silent_logged) {
                (Some(quiet), false) => {
                    let port = st.wg.map_or(0, |a| a.port);
                    error!(peer = %name, udp_port = port, silent_s = quiet.as_secs(), target = ?st.tunnel_target.map(|(a, _)| a), "mesh: the WireGuard session with the peer carries nothing: no answer to echo probes through the tunnel for {} s. Is UDP port {port} blocked between the nodes? Its pods are relayed through a third node if one can, otherwise unreachable from here (never plaintext)", quiet.as_secs());
                    st.tunnel_silent_logged = true;
                }
                (None, true) => {
                    if st.tunnel_target.is_some() {
                        info!(peer = %name, "mesh: the WireGuard session with the peer answers through the tunnel again");
                    }
                    st.tunnel_silent_logged = false;
                }
                _ => {}
            }
            silent_peers += u64::from(silent.is_some());
            // The previous probe answered within the interval, over a live connection (a
            // connection that has not probed yet is no observation).
            let live = st.live_link().is_some();
            // A peer never reached yet, in the mesh's first seconds, is no observation either
            // (every agent starts at its own time: no relay detours at start-up).
            let starting = st.last_up.is_none() && self.started.elapsed() < STARTUP_GRACE;
            // A peer whose agent is restarting is no observation either, for a while.
            let restarting = !live && st.closed_at.is_some_and(|t| t.elapsed() < RESTART_GRACE);
            let echo_answered = self.prober.as_ref().map(|p| {
                st.echo_target.is_some()
                    && p.last_answer(name.as_str())
                        .is_some_and(|t| t.elapsed() < ECHO_FRESH)
            });
            if !live && !restarting && st.closed_at.take().is_some() {
                expired.push((name.clone(), echo_answered));
            }
            let seen = Seen {
                live,
                probed: st.sent_seq > 0,
                acked: st.acked_seq == st.sent_seq,
                starting,
                restarting,
                echo_answered,
                wireguard_broken: st.wg_failing_for().is_some() || silent.is_some(),
            };
            if let Some(ok) = direct_observation(seen) {
                probes.push((name.clone(), ok));
            }
            if let Some(l) = st.live_link().cloned() {
                st.sent_seq += 1;
                st.sent_at = Some(now);
                l.try_send(MeshMessage::Probe(st.sent_seq).encode());
            }
        }
        self.shared
            .wireguard_silent_peers
            .store(silent_peers, Ordering::Relaxed);
        if let Some(p) = &self.prober {
            let (sent, answered, errors) = p.counts();
            for (a, v) in self.shared.echo_counts.iter().zip([sent, answered, errors]) {
                a.store(v, Ordering::Relaxed);
            }
        }
        if !self.adopted.is_empty() && self.started.elapsed() >= ADOPT_WAIT {
            info!(
                peers = self.adopted.len(),
                "mesh: WireGuard peers from the previous run that match no Node: dropped"
            );
            self.adopted.clear();
        }
        let mut advert_gone = false;
        for (name, st) in &mut self.peers {
            if st.advert_due.is_some_and(|t| now >= t) {
                info!(peer = %name, "mesh: peer back without WireGuard: its pods go over plain VXLAN");
                st.advert_due = None;
                st.wg = None;
                advert_gone = true;
            }
        }
        if advert_gone {
            self.update();
        }
        for (name, echo_answered) in expired {
            match echo_answered {
                Some(true) => {
                    warn!(peer = %name, grace_seconds = RESTART_GRACE.as_secs(), "mesh: peer's agent not back within the restart grace; its node answers echo probes, so its path is judged by them until the agent is back")
                }
                Some(false) => {
                    warn!(peer = %name, grace_seconds = RESTART_GRACE.as_secs(), "mesh: peer's agent not back within the restart grace and its node does not answer echo probes: its path counts as failing (relayed if a third node reaches it)")
                }
                None => {
                    warn!(peer = %name, grace_seconds = RESTART_GRACE.as_secs(), "mesh: peer not back within the restart grace: its path counts as failing (no echo probes without a raw socket)")
                }
            }
            for c in self.table.forget_report(&name) {
                info!(peer = %c.peer, from = ?c.from, to = ?c.to, "mesh: path changed");
            }
        }
        for (name, ok) in probes {
            for c in self.table.probe(&name, ok) {
                info!(peer = %c.peer, from = ?c.from, to = ?c.to, "mesh: path changed");
            }
        }
        let report = MeshMessage::Reachability(self.table.my_report()).encode();
        for st in self.peers.values_mut() {
            if let Some(l) = st.live_link() {
                l.try_send(report.clone());
            }
        }
        self.watch_wireguard_sessions(now);
        if let Some(wg) = &mut self.wireguard {
            wg.refresh();
            let adv = wg.public_key.map(|public_key| WgAdvert {
                public_key,
                port: wg.port,
                ready: wg.ready(),
            });
            if adv != self.advertised || self.last_advert.elapsed() >= Duration::from_secs(10) {
                if adv.map(|a| a.ready) != self.advertised.map(|a| a.ready) {
                    match &wg.problem {
                        None => info!("mesh: WireGuard ready; advertising it to peers"),
                        Some(p) => {
                            warn!(problem = %p, "mesh: WireGuard not ready; peers send to us in plain VXLAN")
                        }
                    }
                }
                self.advertised = adv;
                self.last_advert = now;
                if let Some(a) = adv {
                    let msg = MeshMessage::Wireguard {
                        public_key: a.public_key,
                        port: a.port,
                        ready: a.ready,
                    }
                    .encode();
                    for st in self.peers.values_mut() {
                        if let Some(l) = st.live_link() {
                            l.try_send(msg.clone());
                        }
                    }
                }
            }
        }
        self.publish_identity();
        self.update();
    }

    /// Follows each peer's WireGuard session: starts the grace when both sides are ready
    /// without one, reports a peer past it (once), and its recovery.
    fn watch_wireguard_sessions(&mut self, now: Instant) {
        let Some(wg) = &self.wireguard else {
            return;
        };
        let mut failing = 0u64;
        for (name, st) in &mut self.peers {
            let both_ready = wg.ready() && st.refused.is_none() && st.wg.is_some_and(|a| a.ready);
            let live = st.wg.is_some_and(|a| wg.peer_ready(&a.public_key));
            if !both_ready || live {
                if st.wg_failing_logged && live {
                    info!(peer = %name, "mesh: WireGuard session with the peer established; its pods are reached encrypted again");
                }
                st.wg_waiting_since = None;
                st.wg_failing_logged = false;
                continue;
            }
            st.wg_waiting_since.get_or_insert(now);
            if let Some(waited) = st.wg_failing_for() {
                failing += 1;
                if !st.wg_failing_logged {
                    let port = st.wg.map_or(0, |a| a.port);
                    error!(peer = %name, udp_port = port, waited_s = waited.as_secs(), "mesh: no WireGuard session with the peer although both sides have encryption ready: is UDP port {port} open between the nodes? Its pods are not reached in plaintext; a relay carries them if one can, otherwise they are unreachable from here");
                    st.wg_failing_logged = true;
                }
            }
        }
        self.shared
            .wireguard_failing_peers
            .store(failing, Ordering::Relaxed);
    }

    /// Whether this node sends to `peer` over WireGuard (mixed mode: both ready, and the
    /// device has a live session with it; or, past `WG_SESSION_GRACE` without one, still
    /// the tunnel: never plaintext to a peer that has encryption on).
    fn wg_ready(&self, peer: &str) -> bool {
        let Some(wg) = &self.wireguard else {
            return false;
        };
        let Some(st) = self.peer_state(peer) else {
            return false;
        };
        let Some(adv) = st.wg else { return false };
        let session = wg.peer_ready(&adv.public_key) || st.wg_failing_for().is_some();
        wg.ready() && adv.ready && st.refused.is_none() && session
    }

    /// The state of the peer named `name` (a route's key), if it is one.
    fn peer_state(&self, name: &str) -> Option<&PeerState> {
        NodeName::new(name).ok().and_then(|p| self.peers.get(&p))
    }

    fn routes(&self) -> BTreeMap<String, PeerRoute> {
        self.members
            .keys()
            .map(|name| {
                let refused = self.peers.get(name).is_some_and(|s| s.refused.is_some());
                let route = decide_route(
                    name.as_str(),
                    RouteInputs {
                        refused,
                        path: self.table.path(name),
                        encryption_required: self.cfg.encryption_required,
                    },
                    |p| self.wg_ready(p),
                    |p| {
                        NodeName::new(p)
                            .ok()
                            .and_then(|n| self.members.get(&n))
                            .map(|m| m.pod_cidrs.clone())
                            .unwrap_or_default()
                    },
                );
                (name.to_string(), route)
            })
            .collect()
    }

    /// The WireGuard peers: every member advertising a key, not refused; a peer relayed
    /// through B has its podCIDRs in B's AllowedIPs instead of its own.
    fn device_config(&self, routes: &BTreeMap<String, PeerRoute>) -> Option<DeviceConfig> {
        let wg = self.wireguard.as_ref()?;
        let mut allowed: BTreeMap<NodeName, Vec<IpNet>> = BTreeMap::new();
        for (name, m) in &self.members {
            let carrier = match self.table.path(name) {
                Some(MeshPath::Relay { via })
                    if routes.get(name.as_str()) == Some(&PeerRoute::Wireguard) =>
                {
                    via.clone()
                }
                _ => name.clone(),
            };
            allowed
                .entry(carrier)
                .or_default()
                .extend(m.pod_cidrs.iter().map(|c| c.trunc()));
        }
        let mut peers = Vec::new();
        for (name, m) in &self.members {
            let Some(st) = self.peers.get(name) else {
                continue;
            };
            let (Some(adv), None) = (st.wg, st.refused) else {
                continue;
            };
            let mut ips: BTreeSet<IpNet> =
                allowed.get(name).into_iter().flatten().copied().collect();
            // Its tunnel addresses always take its own session, even while its pods are
            // relayed: the echo probes judge exactly the direct session.
            ips.extend(
                m.pod_cidrs
                    .iter()
                    .map(|c| IpNet::from(tunnel_address(c.trunc()))),
            );
            peers.push(PeerConfig {
                public_key: adv.public_key,
                endpoint: Some(SocketAddr::new(m.addr, adv.port)),
                allowed_ips: ips.iter().map(|n| (n.addr(), n.prefix_len())).collect(),
                // Keeps a session (and a fresh handshake age) with every peer while idle.
                persistent_keepalive: Some(25),
            });
        }
        Some(DeviceConfig {
            private_key: wg.private_key,
            listen_port: wg.port,
            peers,
        })
    }

    /// Probes, through the tunnel, every peer whose pods are routed into `wgweft` (directly or
    /// relayed), at its tunnel address; a peer that starts being probed there starts a new
    /// period. Every other peer is probed at its underlay address (`ECHO_FRESH`).
    fn retarget_echo_probes(&mut self, routes: &BTreeMap<String, PeerRoute>) {
        let Some(prober) = &self.prober else {
            return;
        };
        let now = Instant::now();
        let mut targets = BTreeMap::new();
        for (name, st) in &mut self.peers {
            let target = self
                .members
                .get(name)
                .filter(|_| routes.get(name.as_str()) == Some(&PeerRoute::Wireguard))
                .and_then(|m| tunnel_probe_target(&m.pod_cidrs, |a| prober.supports(a)));
            if target != st.tunnel_target.map(|(a, _)| a) {
                st.tunnel_target = target.map(|a| (a, now));
            }
            st.echo_target = target.or_else(|| {
                let addr = self.members.get(name)?.addr;
                prober.supports(&addr).then_some(addr)
            });
            if let Some(a) = st.echo_target {
                targets.insert(name.to_string(), a);
            }
        }
        prober.set_targets(targets);
    }

    /// Recomputes routes, the WireGuard configuration, metrics and the snapshot.
    fn update(&mut self) {
        let routes = self.routes();
        self.retarget_echo_probes(&routes);
        // Not before the node list is known: a configuration computed without members
        // would drop every peer from the device (and their sessions) for nothing.
        if self.seen_self
            && let Some(cfg) = self.device_config(&routes)
            && let Some(wg) = &mut self.wireguard
        {
            wg.write(&cfg);
        }
        let relayed = routes
            .iter()
            .filter(|(n, _)| {
                NodeName::new(n)
                    .ok()
                    .and_then(|n| self.table.path(&n).cloned())
                    .is_some_and(|p| matches!(p, MeshPath::Relay { .. }))
            })
            .count();
        let m = &self.shared;
        m.metrics
            .relayed_peers
            .store(relayed as u64, Ordering::Relaxed);
        m.refused_peers.store(
            self.peers.values().filter(|s| s.refused.is_some()).count() as u64,
            Ordering::Relaxed,
        );
        m.encrypted_peers.store(
            routes
                .values()
                .filter(|r| **r == PeerRoute::Wireguard)
                .count() as u64,
            Ordering::Relaxed,
        );
        m.wireguard_ready.store(
            u64::from(self.wireguard.as_ref().is_some_and(Wireguard::ready)),
            Ordering::Relaxed,
        );
        let snapshot = self.snapshot(&routes);
        *m.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
        let routing = MeshRouting {
            routes,
            encryption: self.wireguard.is_some(),
            decided: self.seen_self,
        };
        let required = self.cfg.encryption_required;
        let refused = |peer: &str| self.peer_state(peer).is_some_and(|s| s.refused.is_some());
        self.routing.send_if_modified(|have| {
            let changed = *have != routing;
            if changed {
                for (peer, r) in &routing.routes {
                    if have.routes.get(peer) != Some(r) {
                        info!(%peer, route = ?r, "mesh: route choice");
                        if required && *r == PeerRoute::Blocked && !refused(peer) {
                            warn!(%peer, "mesh: encryption is required and the peer cannot be reached over WireGuard (encryption off there, no session yet, or our own WireGuard not ready): its pods are unreachable from here, never sent in plaintext");
                        }
                    }
                }
                *have = routing;
            }
            changed
        });
    }

    fn snapshot(&self, routes: &BTreeMap<String, PeerRoute>) -> MeshSnapshot {
        let wg = self.wireguard.as_ref();
        let peers = self
            .members
            .iter()
            .map(|(name, m)| {
                let st = self.peers.get(name);
                let established = st.is_some_and(|s| s.links.iter().any(|l| !l.is_closed()));
                let refused = st.and_then(|s| s.refused);
                let path = match self.table.path(name) {
                    Some(MeshPath::Direct) | None => "direct".to_string(),
                    Some(MeshPath::Relay { via }) => format!("via {via}"),
                    Some(MeshPath::Unreachable) => "down".to_string(),
                };
                let encryption = match routes.get(name.as_str()) {
                    Some(PeerRoute::Wireguard) => "wireguard",
                    Some(PeerRoute::Blocked) => "blocked",
                    _ => "plain",
                };
                let adv = st.and_then(|s| s.wg);
                // Seconds since its kernel last answered an echo where it is probed now.
                let echo_age = st
                    .and_then(|s| s.echo_target)
                    .and_then(|_| self.prober.as_ref()?.last_answer(name.as_str()))
                    .map(|t| t.elapsed().as_secs_f64());
                PeerSnapshot {
                    name: name.to_string(),
                    address: Some(m.addr),
                    state: if refused.is_some() {
                        "refused"
                    } else if established {
                        "established"
                    } else {
                        "connecting"
                    }
                    .to_string(),
                    refused: refused.map(str::to_string),
                    path,
                    encryption: encryption.to_string(),
                    wireguard_ready: adv.is_some_and(|a| a.ready),
                    last_handshake_age_seconds: st
                        .and_then(|s| s.last_up)
                        .map(|t| t.elapsed().as_secs_f64()),
                    wireguard_handshake_age_seconds: adv
                        .and_then(|a| wg.and_then(|w| w.handshake_age(&a.public_key))),
                    probe_rtt_ms: st.and_then(|s| s.rtt).map(|d| d.as_secs_f64() * 1000.0),
                    wireguard_problem: st.and_then(|s| {
                        let port = adv.map_or(0, |a| a.port);
                        if let Some(waited) = s.wg_failing_for() {
                            return Some(format!(
                                "no WireGuard session for {} s (UDP port {port} blocked?)",
                                waited.as_secs()
                            ));
                        }
                        s.tunnel_silent_for(self.prober.as_ref(), name.as_str()).map(|quiet| {
                            format!(
                                "no answer through the WireGuard session for {} s (UDP port {port} blocked?)",
                                quiet.as_secs()
                            )
                        })
                    }),
                    tunnel_probe_target: st.and_then(|s| s.tunnel_target).map(|(a, _)| a),
                    // The tunnel target is the echo target when there is one: one reading.
                    tunnel_answer_age_seconds: echo_age
                        .filter(|_| st.is_some_and(|s| s.tunnel_target.is_some())),
                    echo_target: st.and_then(|s| s.echo_target),
                    echo_answer_age_seconds: echo_age,
                }
            })
            .collect();
        MeshSnapshot {
            node: self.me.to_string(),
            port: self.cfg.port,
            identity: self.identity_b64.clone(),
            identity_published: self.identity_published,
            encryption: EncryptionSnapshot {
                enabled: wg.is_some(),
                required: self.cfg.encryption_required,
                backend: wg.map(|w| w.backend),
                ready: wg.is_some_and(Wireguard::ready),
                public_key: wg.and_then(|w| w.public_key).map(|k| encode_key(&k)),
                port: wg.map_or(0, |w| w.port),
                problem: wg.and_then(|w| w.problem.clone()),
            },
            peers,
            problem: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_mesh::wg::config_digest;

    fn n(s: &str) -> NodeName {
        NodeName::new(s).expect("name")
    }

    fn cidrs(p: &str) -> Vec<IpNet> {
        match p {
            "b" => vec!["10.244.2.0/24".parse().expect("net")],
            _ => vec![],
        }
    }

    #[test]
    fn routes_follow_refusal_path_and_mixed_mode_readiness() {
        let direct = MeshPath::Direct;
        let via_b = MeshPath::Relay { via: n("b") };
        let down = MeshPath::Unreachable;
        type Case<'a> = (
            &'a str,
            bool,
            Option<&'a MeshPath>,
            &'a [&'a str],
            PeerRoute,
        );
        let relay_plain = PeerRoute::VxlanVia {
            relay: "b".into(),
            relay_cidrs: cidrs("b"),
        };
        let cases: &[Case<'_>] = &[
            (
                "refused wins over everything",
                true,
                Some(&direct),
                &["c"],
                PeerRoute::Blocked,
            ),
            (
                "not probed yet: direct, plain",
                false,
                None,
                &[],
                PeerRoute::Vxlan,
            ),
            (
                "direct, peer not ready: plain",
                false,
                Some(&direct),
                &["b"],
                PeerRoute::Vxlan,
            ),
            (
                "direct, both ready: wireguard",
                false,
                Some(&direct),
                &["c"],
                PeerRoute::Wireguard,
            ),
            (
                "down keeps the direct route",
                false,
                Some(&down),
                &[],
                PeerRoute::Vxlan,
            ),
            (
                "relayed through b, b not ready: vxlan via b",
                false,
                Some(&via_b),
                &["c"],
                relay_plain,
            ),
            (
                "relayed through a ready b: wireguard",
                false,
                Some(&via_b),
                &["b"],
                PeerRoute::Wireguard,
            ),
        ];
        // `--encryption required`: the same, but never VXLAN: blocked instead.
        for required in [false, true] {
            for (what, refused, path, ready, want) in cases.iter() {
                let got = decide_route(
                    "c",
                    RouteInputs {
                        refused: *refused,
                        path: *path,
                        encryption_required: required,
                    },
                    |p| ready.contains(&p),
                    cidrs,
                );
                let want = match want {
                    PeerRoute::Vxlan | PeerRoute::VxlanVia { .. } if required => {
                        &PeerRoute::Blocked
                    }
                    w => w,
                };
                assert_eq!(&got, want, "{what} (encryption required: {required})");
            }
        }
    }

    #[test]
    fn only_evidence_against_a_peer_refuses_it() {
        assert!(
            refusal(&CloseReason::Misbehaviour(
                Misbehaviour::ClusterSecretMismatch
            ))
            .is_some()
        );
        assert!(refusal(&CloseReason::Refused(RefuseReason::ClusterSecret)).is_some());
        assert!(
            refusal(&CloseReason::Misbehaviour(Misbehaviour::NotAdmitted(
                Admission::KeyMismatch(n("x"))
            )))
            .is_some()
        );
        // Passing conditions: a key not published yet, a lost connection, a refusal of us
        // by a peer that has not seen our key yet.
        assert!(
            refusal(&CloseReason::Misbehaviour(Misbehaviour::NotAdmitted(
                Admission::NoPublishedKey(n("x"))
            )))
            .is_none()
        );
        assert!(refusal(&CloseReason::ConnectionLost("reset".into())).is_none());
        assert!(refusal(&CloseReason::Refused(RefuseReason::UnknownPeer)).is_none());
        assert!(refusal(&CloseReason::PeerSilent).is_none());
    }

    #[test]
    fn an_away_agent_is_judged_by_its_kernels_echo_not_by_its_silence() {
        let live = Seen {
            live: true,
            probed: true,
            acked: true,
            ..Seen::default()
        };
        // Over a control connection: the probe's answer, and a broken WireGuard session.
        assert_eq!(direct_observation(live), Some(true));
        assert_eq!(
            direct_observation(Seen {
                acked: false,
                ..live
            }),
            Some(false)
        );
        let broken = Seen {
            wireguard_broken: true,
            ..live
        };
        assert_eq!(direct_observation(broken), Some(false));
        // A fresh connection that has not probed yet is no observation.
        assert_eq!(
            direct_observation(Seen {
                probed: false,
                ..live
            }),
            None
        );
        let away = Seen {
            echo_answered: Some(true),
            ..Seen::default()
        };
        // Within the start-up or restart grace: no observation, whatever the echo says.
        for s in [
            Seen {
                starting: true,
                ..away
            },
            Seen {
                restarting: true,
                echo_answered: Some(false),
                ..away
            },
        ] {
            assert_eq!(direct_observation(s), None, "{s:?}");
        }
        // After it: the kernel's answers decide, however long the agent stays away.
        assert_eq!(direct_observation(away), Some(true));
        let silent_host = Seen {
            echo_answered: Some(false),
            ..away
        };
        assert_eq!(direct_observation(silent_host), Some(false));
        let broken_tunnel = Seen {
            wireguard_broken: true,
            ..away
        };
        assert_eq!(direct_observation(broken_tunnel), Some(false));
        // Without a prober the agent's absence is the only evidence left.
        let no_prober = Seen {
            echo_answered: None,
            ..away
        };
        assert_eq!(direct_observation(no_prober), Some(false));
    }

    #[test]
    fn the_snapshot_is_json_with_stable_field_names() {
        let snap = MeshSnapshot {
            node: "n1".into(),
            port: 6786,
            peers: vec![PeerSnapshot {
                name: "n2".into(),
                state: "established".into(),
                path: "via n3".into(),
                encryption: "wireguard".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&snap).expect("json")).expect("parse");
        assert_eq!(v["peers"][0]["path"], "via n3");
        assert_eq!(v["peers"][0]["encryption"], "wireguard");
        assert_eq!(v["encryption"]["enabled"], false);
        let back: MeshSnapshot = serde_json::from_value(v).expect("back");
        assert_eq!(back, snap);
    }

    #[test]
    fn a_peer_is_probed_at_its_first_reachable_tunnel_address_ipv4_first() {
        let nets =
            |s: &str| -> Vec<IpNet> { s.split(',').map(|c| c.parse().expect("net")).collect() };
        let dual = nets("fd00:10:244:3::/64,10.244.3.0/24");
        let all = |_: &IpAddr| true;
        assert_eq!(
            tunnel_probe_target(&dual, all),
            Some("10.244.3.1".parse().unwrap())
        );
        // No IPv4 socket: its IPv6 tunnel address; neither family: not probed.
        assert_eq!(
            tunnel_probe_target(&dual, |a: &IpAddr| a.is_ipv6()),
            Some("fd00:10:244:3::1".parse().unwrap())
        );
        assert_eq!(tunnel_probe_target(&dual, |_: &IpAddr| false), None);
        assert_eq!(tunnel_probe_target(&[], all), None);
        // Host bits of a podCIDR as written do not move the address.
        assert_eq!(
            tunnel_probe_target(&nets("10.244.7.9/24"), all),
            Some("10.244.7.1".parse().unwrap())
        );
    }

    #[test]
    fn generated_wireguard_keys_are_clamped() {
        let k = clamp([0xff; 32]);
        assert_eq!(k[0] & 7, 0);
        assert_eq!(k[31] & 0x80, 0);
        assert_eq!(k[31] & 0x40, 0x40);
    }

    #[test]
    fn config_digest_changes_with_the_peers() {
        let a = DeviceConfig {
            private_key: [1; 32],
            listen_port: 51820,
            peers: vec![],
        };
        let mut b = a.clone();
        b.peers.push(PeerConfig {
            public_key: [2; 32],
            endpoint: None,
            allowed_ips: vec![],
            persistent_keepalive: None,
        });
        assert_ne!(config_digest(&a.render()), config_digest(&b.render()));
    }

    #[test]
    fn a_restarted_agent_adopts_its_own_wireguard_configuration_only() {
        let dir = std::env::temp_dir().join(format!("weft-mesh-adopt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // First run: a key is generated, a configuration with one peer written.
        let mut first = Wireguard::open(&dir, WireguardBackend::Userspace, 51820).expect("open");
        assert!(first.adopt().is_empty(), "nothing to adopt on a fresh node");
        let peer = PeerConfig {
            public_key: [7; 32],
            endpoint: Some("198.18.0.12:51820".parse().expect("addr")),
            allowed_ips: vec![("10.244.1.0".parse().expect("ip"), 24)],
            persistent_keepalive: Some(25),
        };
        let cfg = DeviceConfig {
            private_key: first.private_key,
            listen_port: 51820,
            peers: vec![peer.clone()],
        };
        first.write(&cfg);
        let on_disk = std::fs::read_to_string(&first.config_path).expect("written");
        // Second run, same key and port: the peers come back, and writing the same
        // configuration again does not touch the file.
        let mut second = Wireguard::open(&dir, WireguardBackend::Userspace, 51820).expect("open");
        assert_eq!(second.private_key, first.private_key);
        assert_eq!(second.adopt(), vec![peer]);
        std::fs::write(&second.config_path, format!("{on_disk}# marker\n")).expect("mark");
        second.write(&cfg);
        let after = std::fs::read_to_string(&second.config_path).expect("read");
        assert!(
            after.ends_with("# marker\n"),
            "an unchanged configuration was rewritten"
        );
        // Another port: not ours to adopt.
        let mut other = Wireguard::open(&dir, WireguardBackend::Userspace, 51821).expect("open");
        assert!(other.adopt().is_empty());
        assert!(other.written.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
