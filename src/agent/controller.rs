//! The controller: watch messages in, one kernel transaction per reconcile out.
//!
//! It runs on its own OS thread (the netlink backend is blocking and single-threaded), as a
//! state machine: [`Phase::Syncing`] collects every kind's first complete list into a plain
//! store and never touches the kernel (an unsynced store would delete every element); once all
//! kinds have listed, [`Phase::Running`] adopts the kernel's table (dump → diff → apply only the
//! difference) and then feeds each change to the incremental engine. Bursts are coalesced:
//! everything queued is applied to the engine, then one transaction goes out.
//!
//! A failed transaction leaves the kernel as it was; the next reconcile re-dumps and diffs
//! (`needs_resync`). A panic while reconciling is caught, counted, and followed by a rebuild of
//! the engine from its store and a resync; the kernel keeps the last applied state meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, info_span, warn};
use weft_netpol::diff::op_summary;
use weft_netpol::engine::{Change, Engine};
use weft_netpol::model::{Cluster, Namespace, ObjectKey, Pod, Policy};

use super::backend::Backend;
use super::metrics::Metrics;
use super::watch::{Kind, Obj, WatchBody, WatchHealth, WatchMsg};

/// A Kubernetes Event the controller wants published on an object.
#[derive(Clone, Debug)]
pub struct ObjectEvent {
    /// The object (a NetworkPolicy today).
    pub policy: ObjectKey,
    /// `PascalCase` reason.
    pub reason: String,
    /// The human message.
    pub note: String,
}

/// What the HTTP endpoints and the debug socket read.
#[derive(Debug)]
pub struct Shared {
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Health of each watch.
    pub health: BTreeMap<Kind, Arc<WatchHealth>>,
    /// Per kind: the last resourceVersion whose effects are in the kernel.
    pub applied: Mutex<BTreeMap<Kind, String>>,
    /// The first adoption succeeded.
    pub adopted: AtomicBool,
    /// The controller loop's last turn (for /healthz).
    pub heartbeat: Mutex<Instant>,
    /// Objects refused or partly dropped, with why (for status and /debug/state).
    pub object_errors: Mutex<BTreeMap<ObjectKey, Vec<String>>>,
    /// Size of the desired table: (sets, elements, chains, rules).
    pub table_size: Mutex<(usize, usize, usize, usize)>,
    /// Node name.
    pub node: String,
    /// Local pod addresses in the last committed table (CNI ADD waits for its pod's).
    pub local_ips: Mutex<BTreeSet<std::net::IpAddr>>,
    /// Notified each time `local_ips` is replaced (a waiting CNI ADD wakes at once).
    pub local_ips_changed: std::sync::Condvar,
    /// Where operator queries go (the controller's channel).
    pub queries: Mutex<Option<mpsc::Sender<WatchMsg>>>,
    /// UIDs of every pod the API has (any node), from a synced store; `None` until the first
    /// sync. At most [`UID_PUBLISH_INTERVAL`] old: API-based IPAM cleanup reads it.
    pub live_pod_uids: Mutex<Option<Arc<std::collections::HashSet<String>>>>,
    /// What the nftables monitor saw: foreign commits to our table, generations.
    pub table_watch: Arc<super::nftwatch::TableWatch>,
    /// Conntrack marks, strict mode, drop log: what is in force (set at start).
    pub modes: Mutex<super::conntrack::Modes>,
    /// What the last committed table enforces (for status).
    pub enforced: Mutex<Enforced>,
}

/// What this node's table enforces, counted after every commit (for `weft status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Enforced {
    /// NetworkPolicies the agent knows (cluster-wide).
    pub policies: usize,
    /// Of those, the ones with rules in this node's table (they select a local pod).
    pub policies_here: usize,
    /// Pods the agent knows (cluster-wide).
    pub pods: usize,
    /// Local pod addresses (IPv4, IPv6).
    pub local_addresses: (usize, usize),
    /// Local pod addresses isolated for ingress, for egress (IPv4 + IPv6).
    pub isolated_addresses: (usize, usize),
}

impl Enforced {
    /// Counts from the model and the desired table (O(sets + chains), not O(pods)).
    pub fn of(cluster: &weft_netpol::model::Cluster, rs: &weft_netpol::Ruleset) -> Enforced {
        let len = |name: &str| rs.sets.get(name).map_or(0, |s| s.elements.len());
        let policies_here: BTreeSet<&str> = rs
            .chains
            .keys()
            .filter(|c| c.starts_with("pol-"))
            .map(|c| {
                c.strip_suffix("-in")
                    .or_else(|| c.strip_suffix("-eg"))
                    .unwrap_or(c)
            })
            .collect();
        Enforced {
            policies: cluster.policies.len(),
            policies_here: policies_here.len(),
            pods: cluster.pods.len(),
            local_addresses: (len("pods-local-v4"), len("pods-local-v6")),
            isolated_addresses: (
                len("ingress-dispatch-v4") + len("ingress-dispatch-v6"),
                len("egress-dispatch-v4") + len("egress-dispatch-v6"),
            ),
        }
    }
}

/// How often, at most, the controller republishes [`Shared::live_pod_uids`] after pod changes.
pub const UID_PUBLISH_INTERVAL: Duration = Duration::from_secs(5);

impl Shared {
    /// A fresh shared state for `node`.
    pub fn new(node: &str, metrics: Arc<Metrics>) -> Shared {
        Shared {
            metrics,
            health: Kind::ALL
                .into_iter()
                .map(|k| (k, Arc::new(WatchHealth::default())))
                .collect(),
            applied: Mutex::default(),
            adopted: AtomicBool::new(false),
            heartbeat: Mutex::new(Instant::now()),
            object_errors: Mutex::default(),
            table_size: Mutex::default(),
            node: node.to_string(),
            local_ips: Mutex::default(),
            local_ips_changed: std::sync::Condvar::new(),
            queries: Mutex::default(),
            live_pod_uids: Mutex::default(),
            table_watch: Arc::default(),
            modes: Mutex::default(),
            enforced: Mutex::default(),
        }
    }

    /// Ready: every watch listed, the kernel adopted, no watch down longer than `grace`.
    pub fn ready(&self, grace: Duration) -> Result<(), String> {
        if !self.adopted.load(Ordering::Relaxed) {
            return Err("initial sync not applied to the kernel yet".into());
        }
        for (kind, h) in &self.health {
            if !h.listed_once() {
                return Err(format!("{} never listed", kind.name()));
            }
            if let Some(d) = h.down_for().filter(|d| *d > grace) {
                return Err(format!("{} watch down for {}s", kind.name(), d.as_secs()));
            }
        }
        Ok(())
    }
}

/// The deletions a fresh list implies: every key the store has that the list lacks.
fn vanished<K: Ord + Clone, V>(
    have: &BTreeMap<K, V>,
    listed: impl Iterator<Item = K>,
    gone: impl Fn(K) -> Change,
) -> Vec<Change> {
    let listed: BTreeSet<K> = listed.collect();
    have.keys()
        .filter(|k| !listed.contains(*k))
        .cloned()
        .map(gone)
        .collect()
}

/// A policy's namespace/name (`None` for an object without both).
fn policy_key(p: &k8s_openapi::api::networking::v1::NetworkPolicy) -> Option<ObjectKey> {
    Some(ObjectKey::new(
        p.metadata.namespace.as_deref()?,
        p.metadata.name.as_deref()?,
    ))
}

/// Whether two uids can be the same pod (an empty uid, from an old runtime, matches any).
fn same_pod(a: &str, b: &str) -> bool {
    a.is_empty() || b.is_empty() || a == b
}

/// The controller's state machine.
enum Phase {
    /// Collecting first lists; the kernel is left exactly as the previous process left it.
    Syncing {
        store: Cluster,
        listed: BTreeSet<Kind>,
    },
    /// Enforcing through the incremental engine.
    Running { engine: Box<Engine> },
}

/// Least time between two comparisons triggered by foreign commits (a tool that rewrites the
/// table in a loop must not make the agent dump it in a loop).
const FOREIGN_CHECK_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// This node.
    pub node: String,
    /// nft table name.
    pub table: String,
    /// Test-only: panic once while handling the policy of this name.
    pub inject_panic_policy: Option<String>,
    /// Most transactions per second (a storm cannot melt the node).
    pub max_reconciles_per_second: u32,
    /// How often the kernel's table is compared with the desired one (zero: never).
    pub drift_check_interval: Duration,
}

/// The controller.
pub struct Controller {
    cfg: ControllerConfig,
    phase: Phase,
    nodes: BTreeMap<String, k8s_openapi::api::core::v1::Node>,
    backend: Box<dyn Backend>,
    shared: Arc<Shared>,
    events: Option<tokio::sync::mpsc::UnboundedSender<ObjectEvent>>,
    /// Latest resourceVersion received per kind.
    seen: BTreeMap<Kind, String>,
    /// Oldest receipt time of a change not yet in the kernel.
    unapplied_since: Option<Instant>,
    needs_resync: bool,
    /// The last valid version of policies, for objects that became invalid.
    injected: bool,
    last_reconcile: Option<Instant>,
    /// Addresses CNI ADD gave pods the API does not show yet: pod → (uid, addresses).
    cni_ips: BTreeMap<ObjectKey, (String, Vec<std::net::IpAddr>)>,
    last_drift_check: Instant,
    /// Where the dataplane learns the nodes.
    nodes_tx: Option<tokio::sync::watch::Sender<Vec<super::dataplane::NodeInfo>>>,
    /// Pods changed since [`Shared::live_pod_uids`] was last published, and when that was.
    uids_dirty: bool,
    uids_published: Option<Instant>,
    /// Strict conntrack mode: a purge pass after each committed change (`None`: off).
    strict: Option<super::conntrack::Strict>,
}

impl Controller {
    /// A controller in the syncing phase.
    pub fn new(
        cfg: ControllerConfig,
        backend: Box<dyn Backend>,
        shared: Arc<Shared>,
        events: Option<tokio::sync::mpsc::UnboundedSender<ObjectEvent>>,
    ) -> Controller {
        Controller {
            cfg,
            phase: Phase::Syncing {
                store: Cluster::default(),
                listed: BTreeSet::new(),
            },
            nodes: BTreeMap::new(),
            backend,
            shared,
            events,
            seen: BTreeMap::new(),
            unapplied_since: None,
            needs_resync: true,
            injected: false,
            last_reconcile: None,
            cni_ips: BTreeMap::new(),
            last_drift_check: Instant::now(),
            nodes_tx: None,
            uids_dirty: true,
            uids_published: None,
            strict: None,
        }
    }

    /// Strict conntrack mode: after each committed change, delete the conntrack entries the
    /// policies no longer admit.
    pub fn with_strict_conntrack(mut self) -> Controller {
        self.strict = Some(super::conntrack::Strict::new());
        self
    }

    /// Publishes every node change to the dataplane.
    pub fn with_nodes_channel(
        mut self,
        tx: tokio::sync::watch::Sender<Vec<super::dataplane::NodeInfo>>,
    ) -> Controller {
        self.nodes_tx = Some(tx);
        self
    }

    /// The engine, once running.
    #[cfg(test)]
    pub fn engine(&self) -> Option<&Engine> {
        match &self.phase {
            Phase::Running { engine } => Some(engine),
            Phase::Syncing { .. } => None,
        }
    }

    /// Runs until every sender of `rx` is gone.
    pub fn run(mut self, rx: mpsc::Receiver<WatchMsg>) {
        loop {
            *self
                .shared
                .heartbeat
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Instant::now();
            let mut batch = Vec::new();
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => batch.push(m),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            // Rate limit: wait out the minimum interval, coalescing whatever arrives.
            if let Some(last) = self.last_reconcile {
                let min = Duration::from_secs(1) / self.cfg.max_reconciles_per_second.max(1);
                if let Some(wait) = min.checked_sub(last.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
                if batch.len() >= 50_000 {
                    break;
                }
            }
            self.step_guarded(batch);
            let _ = catch_unwind(AssertUnwindSafe(|| self.drift_turn()));
        }
    }

    /// Compares the kernel's table with the desired one when someone else changed it (the
    /// nftables monitor saw a foreign commit: at most once a second), and periodically unless
    /// the ruleset generation proves every commit since was ours (see [`super::nftwatch`]).
    fn drift_turn(&mut self) {
        let watch = self.shared.table_watch.clone();
        let since = self.last_drift_check.elapsed();
        let interval = self.cfg.drift_check_interval;
        let periodic = !interval.is_zero() && since >= interval;
        let suspect =
            watch.running() && since >= FOREIGN_CHECK_MIN_INTERVAL && watch.take_suspect();
        if (!suspect && !periodic) || !self.can_compare() {
            if suspect {
                watch.raise_suspect(); // compare once the state allows it
            }
            return;
        }
        self.last_drift_check = Instant::now();
        if !suspect {
            if let Ok(Some(generation)) = self.backend.generation()
                && watch.unchanged_by_others(generation)
            {
                watch.checks_skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            watch.take_suspect();
        }
        watch.checks_compared.fetch_add(1, Ordering::Relaxed);
        self.check_drift();
    }

    /// Whether the kernel's table can be compared with the desired one now: running, and no
    /// resync or deferred deletes under way (the kernel legitimately differs meanwhile).
    fn can_compare(&self) -> bool {
        match &self.phase {
            Phase::Running { engine } => {
                !self.needs_resync
                    && engine.pending().chains.is_empty()
                    && engine.pending().sets.is_empty()
            }
            Phase::Syncing { .. } => false,
        }
    }

    /// Compares the kernel's table with the desired one and repairs any drift by a diff
    /// (someone ran `nft`, another tool flushed a set). Returns the ops it applied.
    pub fn check_drift(&mut self) -> usize {
        if !self.can_compare() {
            return 0;
        }
        let Phase::Running { engine } = &self.phase else {
            return 0;
        };
        let kernel = match self.backend.dump() {
            Ok(k) => k,
            Err(e) => {
                warn!(error = %e, "drift check: cannot read the kernel's table");
                return 0;
            }
        };
        let ops = super::query::audit_ops(kernel.as_ref(), engine.desired());
        if ops.is_empty() {
            return 0;
        }
        let shown: Vec<String> = ops.iter().take(5).map(ToString::to_string).collect();
        warn!(ops = ops.len(), first = ?shown, "drift: the kernel's table differs from the desired one; repairing by diff");
        if self.transaction(&ops) {
            self.shared
                .metrics
                .drift_repairs
                .fetch_add(1, Ordering::Relaxed);
            ops.len()
        } else {
            self.needs_resync = true;
            0
        }
    }

    /// One turn, with panics caught: the kernel keeps its last state, the engine is rebuilt,
    /// and the batch is retried, so no change is lost to a panic (the messages are gone from
    /// the channel: nothing would deliver them again until the object changes or a relist).
    /// If the batch panics again, its messages are retried one by one and only those that
    /// still panic are dropped (logged), so one poisonous object cannot hold back the rest.
    pub fn step_guarded(&mut self, batch: Vec<WatchMsg>) {
        let retry = batch.clone();
        if self.try_step(batch) || self.try_step(retry.clone()) {
            return;
        }
        for msg in retry {
            let what = format!("{} {:?}", msg.kind.name(), msg.resource_version);
            if !self.try_step(vec![msg]) {
                error!(message = %what, "a watch message panics the controller every time: dropped");
            }
        }
    }

    /// [`Controller::step`] with a panic caught, counted and recovered from; false if it panicked.
    fn try_step(&mut self, batch: Vec<WatchMsg>) -> bool {
        let result = catch_unwind(AssertUnwindSafe(|| self.step(batch)));
        if result.is_err() {
            self.shared
                .metrics
                .reconcile_panics
                .fetch_add(1, Ordering::Relaxed);
            error!(
                "panic while reconciling: rebuilding the engine from its store and resyncing; the kernel keeps enforcing the last applied state"
            );
            let rebuilt = catch_unwind(AssertUnwindSafe(|| {
                if let Phase::Running { engine } = &mut self.phase {
                    let cluster = engine.cluster().clone();
                    **engine = Engine::from_cluster(cluster, &self.cfg.node, &self.cfg.table);
                }
            }));
            if rebuilt.is_err() {
                error!("rebuilding the engine panicked too; will retry");
            }
            self.needs_resync = true;
        }
        result.is_ok()
    }

    /// Applies a batch of watch messages and reconciles.
    pub fn step(&mut self, batch: Vec<WatchMsg>) {
        let started = Instant::now();
        let mut changes = Vec::new();
        let mut nodes_changed = false;
        for msg in batch {
            if let Some(rv) = &msg.resource_version {
                self.seen.insert(msg.kind, rv.clone());
            }
            if !matches!(msg.body, WatchBody::Progress | WatchBody::Query { .. }) {
                self.unapplied_since.get_or_insert(msg.received);
            }
            let node_msg = msg.kind == Kind::Nodes;
            self.translate(msg, &mut changes);
            nodes_changed |= node_msg;
        }
        // Translation reads the store as it was before this batch, so a pod that the API
        // (re)created earlier in the batch than its CNI ADD arrived has not got ADD's addresses
        // yet: give every upsert still without addresses the ones ADD gave its uid.
        for change in &mut changes {
            if let Change::UpsertPod(p) = change
                && p.ips.is_empty()
                && let Some((uid, ips)) = self.cni_ips.get(&p.key)
                && same_pod(uid, &p.uid)
            {
                p.ips = ips.clone();
            }
        }
        self.uids_dirty |= changes
            .iter()
            .any(|c| matches!(c, Change::UpsertPod(_) | Change::DeletePod(_)));
        if nodes_changed && let Some(tx) = &self.nodes_tx {
            let infos: Vec<super::dataplane::NodeInfo> = self
                .nodes
                .values()
                .filter_map(super::dataplane::NodeInfo::from_api)
                .collect();
            tx.send_if_modified(|have| {
                let changed = *have != infos;
                if changed {
                    *have = infos;
                }
                changed
            });
        }
        let mut ops = Vec::new();
        match &mut self.phase {
            Phase::Syncing { store, .. } => {
                for c in &changes {
                    weft_netpol::synth::apply_change(store, c);
                }
            }
            Phase::Running { engine } => {
                // One diff for the whole burst: each element moves at most once per transaction.
                ops.extend(engine.apply_all(changes));
            }
        }
        if let Phase::Syncing { store, listed } = &self.phase
            && listed.len() == Kind::ALL.len()
        {
            info!(
                pods = store.pods.len(),
                namespaces = store.namespaces.len(),
                policies = store.policies.len(),
                "every watch has listed: adopting the kernel's table"
            );
            let engine = Engine::from_cluster(store.clone(), &self.cfg.node, &self.cfg.table);
            self.phase = Phase::Running {
                engine: Box::new(engine),
            };
            self.needs_resync = true;
        }
        let Phase::Running { engine } = &mut self.phase else {
            return;
        };
        let span = info_span!("reconcile", node = %self.cfg.node);
        let _enter = span.enter();
        if self.needs_resync {
            match self.backend.dump() {
                Ok(current) => {
                    ops = engine.resync(current.as_ref());
                    info!(
                        ops = ops.len(),
                        "resync: diff of the kernel's table against the desired one"
                    );
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the kernel's table; retrying");
                    self.shared
                        .metrics
                        .reconcile_errors
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let mut ok = true;
        if !ops.is_empty() {
            ok = self.transaction(&ops);
        }
        if ok {
            let Phase::Running { engine } = &mut self.phase else {
                return;
            };
            let pending = engine.pending_ops();
            if !pending.is_empty() {
                ok = self.transaction(&pending);
            }
        }
        if !ok {
            self.needs_resync = true;
            return;
        }
        if self.needs_resync {
            self.needs_resync = false;
            if !self.shared.adopted.swap(true, Ordering::Relaxed) {
                info!("initial sync applied: ready");
            }
        }
        *self
            .shared
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.seen.clone();
        if let Some(t) = self.unapplied_since.take() {
            self.shared.metrics.policy_realization.observe(t.elapsed());
        }
        self.shared
            .metrics
            .reconcile_duration
            .observe(started.elapsed());
        self.last_reconcile = Some(Instant::now());
        if let Phase::Running { engine } = &self.phase {
            *self
                .shared
                .local_ips
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = super::dataplane::local_ips(engine.desired());
            self.shared.local_ips_changed.notify_all();
            if self.uids_dirty
                && self
                    .uids_published
                    .is_none_or(|t| t.elapsed() >= UID_PUBLISH_INTERVAL)
            {
                let uids = engine
                    .cluster()
                    .pods
                    .values()
                    .filter(|p| !p.uid.is_empty())
                    .map(|p| p.uid.clone())
                    .collect();
                *self
                    .shared
                    .live_pod_uids
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(uids));
                self.uids_dirty = false;
                self.uids_published = Some(Instant::now());
            }
            let rs = engine.desired();
            *self
                .shared
                .table_size
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = (
                rs.sets.len(),
                rs.element_count(),
                rs.chains.len(),
                rs.rule_count(),
            );
            *self
                .shared
                .enforced
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Enforced::of(engine.cluster(), rs);
        }
    }

    /// Sends one transaction; logs and counts.
    fn transaction(&mut self, ops: &[weft_netpol::diff::Op]) -> bool {
        let (element_ops, elements, other) = op_summary(ops);
        match self.backend.apply(ops) {
            Ok(()) => {
                self.shared
                    .metrics
                    .nft_ops
                    .fetch_add(ops.len() as u64, Ordering::Relaxed);
                debug!(element_ops, elements, other, "transaction committed");
                if let (Some(strict), Phase::Running { engine }) = (&mut self.strict, &self.phase) {
                    let m = &self.shared.metrics;
                    match strict.after_apply(engine.cluster(), &self.cfg.node) {
                        Ok(cut) => m
                            .conntrack_flows_cut
                            .fetch_add(cut as u64, Ordering::Relaxed),
                        Err(()) => m.conntrack_pass_failures.fetch_add(1, Ordering::Relaxed),
                    };
                }
                true
            }
            Err(e) => {
                self.shared
                    .metrics
                    .reconcile_errors
                    .fetch_add(1, Ordering::Relaxed);
                error!(error = %e, ops = ops.len(), "transaction refused; the kernel is unchanged, resyncing");
                false
            }
        }
    }

    fn current(&self) -> &Cluster {
        match &self.phase {
            Phase::Syncing { store, .. } => store,
            Phase::Running { engine } => engine.cluster(),
        }
    }

    /// Turns one watch message into engine changes.
    fn translate(&mut self, msg: WatchMsg, out: &mut Vec<Change>) {
        match msg.body {
            WatchBody::Progress => {}
            WatchBody::Query { query, reply } => {
                let _ = reply.send(self.answer(query));
            }
            WatchBody::CniAttached { pod, uid, ips } => {
                // The API will show these addresses only after ADD returns; enforce now.
                self.cni_ips.insert(pod.clone(), (uid.clone(), ips.clone()));
                if let Some(known) = self.current().pods.get(&pod)
                    && known.ips.is_empty()
                    && (uid.is_empty() || known.uid.is_empty() || known.uid == uid)
                {
                    let mut p = known.clone();
                    p.ips = ips;
                    out.push(Change::UpsertPod(p));
                }
            }
            WatchBody::CniReleased { pod, uid } => {
                // Names are reused: only forget what belongs to this uid (an old pod's DEL may
                // arrive after its successor's ADD).
                if self
                    .cni_ips
                    .get(&pod)
                    .is_some_and(|(have, _)| same_pod(have, &uid))
                {
                    self.cni_ips.remove(&pod);
                }
                if !uid.is_empty()
                    && let Some(known) = self.current().pods.get(&pod)
                    && known.uid == uid
                    && !known.ips.is_empty()
                {
                    // Still in the API (being deleted): its addresses are free again.
                    let mut p = known.clone();
                    p.ips.clear();
                    out.push(Change::UpsertPod(p));
                }
            }
            WatchBody::Applied(obj) => self.upsert(obj, out),
            WatchBody::Deleted(obj) => match obj {
                Obj::Pod(p) => {
                    if let Some(pod) = Pod::from_api(&p) {
                        // The deleted pod's addresses, not a successor's of the same name.
                        if self
                            .cni_ips
                            .get(&pod.key)
                            .is_some_and(|(have, _)| same_pod(have, &pod.uid))
                        {
                            self.cni_ips.remove(&pod.key);
                        }
                        out.push(Change::DeletePod(pod.key));
                    }
                }
                Obj::Namespace(n) => {
                    if let Some(name) = n.metadata.name {
                        out.push(Change::DeleteNamespace(name));
                    }
                }
                Obj::Policy(p) => {
                    if let Some(key) = policy_key(&p) {
                        self.forget_errors(&key);
                        out.push(Change::DeletePolicy(key));
                    }
                }
                Obj::Node(n) => {
                    if let Some(name) = n.metadata.name {
                        self.nodes.remove(&name);
                    }
                }
            },
            WatchBody::Listed(objs) => {
                // The new list is the truth: upsert all, delete what it lacks.
                let current = self.current();
                let deletes: Vec<Change> = match msg.kind {
                    Kind::Pods => vanished(
                        &current.pods,
                        objs.iter().filter_map(|o| match o {
                            Obj::Pod(p) => Pod::from_api(p).map(|p| p.key),
                            _ => None,
                        }),
                        Change::DeletePod,
                    ),
                    Kind::Namespaces => vanished(
                        &current.namespaces,
                        objs.iter().filter_map(|o| match o {
                            Obj::Namespace(n) => n.metadata.name.clone(),
                            _ => None,
                        }),
                        Change::DeleteNamespace,
                    ),
                    Kind::Policies => vanished(
                        &current.policies,
                        objs.iter().filter_map(|o| match o {
                            Obj::Policy(p) => policy_key(p),
                            _ => None,
                        }),
                        Change::DeletePolicy,
                    ),
                    Kind::Nodes => {
                        self.nodes.clear();
                        Vec::new()
                    }
                };
                out.extend(deletes);
                for obj in objs {
                    self.upsert(obj, out);
                }
                if let Phase::Syncing { listed, .. } = &mut self.phase {
                    listed.insert(msg.kind);
                }
            }
        }
    }

    fn upsert(&mut self, obj: Obj, out: &mut Vec<Change>) {
        match obj {
            Obj::Pod(p) => {
                if let Some(mut pod) = Pod::from_api(&p) {
                    if pod.ips.is_empty()
                        && let Some((uid, ips)) = self.cni_ips.get(&pod.key)
                        && (uid.is_empty() || pod.uid.is_empty() || *uid == pod.uid)
                    {
                        pod.ips = ips.clone();
                    }
                    out.push(Change::UpsertPod(pod));
                }
            }
            Obj::Namespace(n) => {
                if let Some(ns) = Namespace::from_api(&n) {
                    out.push(Change::UpsertNamespace(ns));
                }
            }
            Obj::Node(n) => {
                if let Some(name) = n.metadata.name.clone() {
                    self.nodes.insert(name, *n);
                }
            }
            Obj::Policy(p) => {
                if let Some(name) = &self.cfg.inject_panic_policy
                    && p.metadata.name.as_deref() == Some(name.as_str())
                    && !self.injected
                {
                    self.injected = true;
                    panic!("injected fault: panic while handling policy {name}");
                }
                match Policy::from_api(&p) {
                    Ok(policy) => {
                        let errors: Vec<String> =
                            policy.errors.iter().map(ToString::to_string).collect();
                        self.report_errors(&policy.key, errors);
                        out.push(Change::UpsertPolicy(policy));
                    }
                    Err(e) => {
                        // Keep enforcing the last valid version (or nothing, for a new object).
                        let key = ObjectKey::new(
                            p.metadata.namespace.as_deref().unwrap_or_default(),
                            p.metadata.name.as_deref().unwrap_or_default(),
                        );
                        warn!(policy = %key, error = %e, "policy refused; its last valid version stays enforced");
                        self.report_errors(&key, vec![e.to_string()]);
                    }
                }
            }
        }
    }

    /// Answers an operator's question from the engine and the kernel.
    fn answer(&mut self, query: super::query::Query) -> Result<super::query::Answer, String> {
        use super::query::{self as q, Query};
        let Phase::Running { engine } = &self.phase else {
            return Err("the agent has not synced with the API yet".into());
        };
        match query {
            Query::Explain {
                src,
                dst,
                protocol,
                port,
            } => q::explain(
                engine.cluster(),
                &self.cfg.node,
                engine.desired(),
                &src,
                &dst,
                protocol,
                port,
            ),
            Query::Audit { repair } => {
                let kernel = self.backend.dump()?;
                let ops = q::audit_ops(kernel.as_ref(), engine.desired());
                if repair && !ops.is_empty() {
                    self.backend.apply(&ops)?;
                    self.shared
                        .metrics
                        .drift_repairs
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(ops = ops.len(), "drift repaired on request");
                }
                Ok(q::audit_text(&ops, repair))
            }
        }
    }

    /// Records an object's errors; new ones are logged, counted and published as Events.
    fn report_errors(&mut self, key: &ObjectKey, errors: Vec<String>) {
        let mut map = self
            .shared
            .object_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if errors.is_empty() {
            map.remove(key);
            return;
        }
        if map.get(key) == Some(&errors) {
            return;
        }
        for e in &errors {
            warn!(policy = %key, "{e}");
            self.shared
                .metrics
                .policy_errors
                .fetch_add(1, Ordering::Relaxed);
            if let Some(tx) = &self.events {
                let _ = tx.send(ObjectEvent {
                    policy: key.clone(),
                    reason: "PolicyEntryIgnored".into(),
                    note: e.clone(),
                });
            }
        }
        map.insert(key.clone(), errors);
    }

    fn forget_errors(&mut self, key: &ObjectKey) {
        self.shared
            .object_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::backend::Memory;
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::networking::v1 as net;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

    fn meta(ns: Option<&str>, name: &str, rv: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: ns.map(Into::into),
            name: Some(name.into()),
            resource_version: Some(rv.into()),
            ..Default::default()
        }
    }

    fn pod(name: &str, ip: &str, node: &str) -> Obj {
        Obj::Pod(Box::new(core::Pod {
            metadata: ObjectMeta {
                labels: Some([("app".to_string(), name.to_string())].into()),
                ..meta(Some("default"), name, "1")
            },
            spec: Some(core::PodSpec {
                node_name: Some(node.into()),
                ..Default::default()
            }),
            status: Some(core::PodStatus {
                pod_ip: Some(ip.into()),
                phase: Some("Running".into()),
                ..Default::default()
            }),
        }))
    }

    fn deny_all(name: &str) -> Obj {
        Obj::Policy(Box::new(net::NetworkPolicy {
            metadata: meta(Some("default"), name, "2"),
            spec: Some(net::NetworkPolicySpec {
                pod_selector: Some(LabelSelector::default()),
                ..Default::default()
            }),
        }))
    }

    fn msg(kind: Kind, body: WatchBody, rv: &str) -> WatchMsg {
        WatchMsg {
            kind,
            body,
            resource_version: Some(rv.into()),
            received: Instant::now(),
        }
    }

    /// Node n1's settings in these tests.
    fn config(drift_check_interval: Duration) -> ControllerConfig {
        ControllerConfig {
            node: "n1".into(),
            table: "weft".into(),
            inject_panic_policy: None,
            max_reconciles_per_second: 1000,
            drift_check_interval,
        }
    }

    fn controller(inject: Option<&str>) -> (Controller, Arc<Shared>) {
        let shared = Arc::new(Shared::new("n1", Arc::new(Metrics::default())));
        let cfg = ControllerConfig {
            inject_panic_policy: inject.map(Into::into),
            ..config(Duration::ZERO)
        };
        (
            Controller::new(cfg, Box::new(Memory::new("weft")), shared.clone(), None),
            shared,
        )
    }

    fn list_all(c: &mut Controller, pods: Vec<Obj>, policies: Vec<Obj>) {
        c.step(vec![
            msg(Kind::Pods, WatchBody::Listed(pods), "10"),
            msg(
                Kind::Namespaces,
                WatchBody::Listed(vec![Obj::Namespace(Box::new(core::Namespace {
                    metadata: meta(None, "default", "3"),
                    ..Default::default()
                }))]),
                "10",
            ),
            msg(Kind::Policies, WatchBody::Listed(policies), "10"),
        ]);
    }

    #[test]
    fn addresses_from_cni_add_are_enforced_before_the_api_knows_them() {
        let (mut c, shared) = controller(None);
        // The API has the pod (scheduled here) but no IP yet: the kubelet writes it after ADD.
        let mut fresh = pod("new", "10.244.1.9", "n1");
        if let Obj::Pod(p) = &mut fresh {
            p.status = None;
            p.metadata.uid = Some("u1".into());
        }
        list_all(&mut c, vec![fresh], vec![deny_all("deny")]);
        c.step(vec![msg(Kind::Nodes, WatchBody::Listed(vec![]), "10")]);
        assert!(shared.local_ips.lock().unwrap().is_empty());
        let key = ObjectKey::new("default", "new");
        let ip: std::net::IpAddr = "10.244.1.9".parse().unwrap();
        c.step(vec![WatchMsg {
            kind: Kind::Pods,
            body: WatchBody::CniAttached {
                pod: key.clone(),
                uid: "u1".into(),
                ips: vec![ip],
            },
            resource_version: None,
            received: Instant::now(),
        }]);
        assert!(
            shared.local_ips.lock().unwrap().contains(&ip),
            "ADD may return now"
        );
        let engine = c.engine().unwrap();
        assert_eq!(
            engine.desired().sets["ingress-dispatch-v4"].elements.len(),
            1,
            "isolated by the deny-all policy from its first packet"
        );
        // A later API update without the IP (status not written yet) keeps the CNI addresses.
        let mut again = pod("new", "10.244.1.9", "n1");
        if let Obj::Pod(p) = &mut again {
            p.status = None;
            p.metadata.uid = Some("u1".into());
        }
        c.step(vec![msg(Kind::Pods, WatchBody::Applied(again), "50")]);
        assert!(shared.local_ips.lock().unwrap().contains(&ip));
        // CNI DEL: the addresses go.
        c.step(vec![WatchMsg {
            kind: Kind::Pods,
            body: WatchBody::CniReleased {
                pod: key,
                uid: "u1".into(),
            },
            resource_version: None,
            received: Instant::now(),
        }]);
        assert!(shared.local_ips.lock().unwrap().is_empty());
    }

    #[test]
    fn live_pod_uids_are_published_only_from_a_synced_store() {
        let (mut c, shared) = controller(None);
        let with_uid = |name: &str, ip: &str, node: &str, uid: &str| {
            let mut p = pod(name, ip, node);
            if let Obj::Pod(p) = &mut p {
                p.metadata.uid = Some(uid.into());
            }
            p
        };
        list_all(
            &mut c,
            vec![
                with_uid("a", "10.244.1.2", "n1", "ua"),
                with_uid("b", "10.244.2.2", "n2", "ub"),
            ],
            vec![],
        );
        assert!(shared.live_pod_uids.lock().unwrap().is_none(), "not synced");
        c.step(vec![msg(Kind::Nodes, WatchBody::Listed(vec![]), "10")]);
        let uids = shared.live_pod_uids.lock().unwrap().clone().unwrap();
        assert_eq!(uids.len(), 2, "every node's pods");
        // A deletion is published once the interval has passed (cheap under pod churn).
        c.step(vec![msg(
            Kind::Pods,
            WatchBody::Deleted(with_uid("b", "10.244.2.2", "n2", "ub")),
            "11",
        )]);
        assert!(
            shared
                .live_pod_uids
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .contains("ub")
        );
        c.uids_published = Some(Instant::now() - UID_PUBLISH_INTERVAL);
        c.step(vec![]);
        let uids = shared.live_pod_uids.lock().unwrap().clone().unwrap();
        assert_eq!(uids.iter().collect::<Vec<_>>(), ["ua"]);
    }

    #[test]
    fn drift_made_behind_the_agents_back_is_repaired_by_a_diff() {
        let shared = Arc::new(Shared::new("n1", Arc::new(Metrics::default())));
        let memory = Memory::new("weft");
        let kernel = memory.fake.clone();
        let mut c = Controller::new(
            config(Duration::ZERO),
            Box::new(memory),
            shared.clone(),
            None,
        );
        list_all(
            &mut c,
            vec![pod("a", "10.244.1.2", "n1")],
            vec![deny_all("deny")],
        );
        c.step(vec![msg(Kind::Nodes, WatchBody::Listed(vec![]), "10")]);
        assert_eq!(c.check_drift(), 0, "no drift yet");
        kernel.lock().unwrap().tamper(|t| {
            t.sets
                .get_mut("ingress-dispatch-v4")
                .unwrap()
                .elements
                .clear();
        });
        assert_eq!(
            c.check_drift(),
            1,
            "one element op puts the dispatch element back"
        );
        assert_eq!(shared.metrics.drift_repairs.load(Ordering::Relaxed), 1);
        assert_eq!(
            kernel.lock().unwrap().dump(),
            Some(c.engine().unwrap().desired())
        );
    }

    use crate::agent::backend::Backend;

    #[test]
    fn status_counts_what_the_committed_table_enforces() {
        let (mut c, shared) = controller(None);
        list_all(
            &mut c,
            vec![pod("a", "10.244.1.2", "n1"), pod("b", "10.244.2.2", "n2")],
            vec![deny_all("deny")],
        );
        c.step(vec![msg(Kind::Nodes, WatchBody::Listed(vec![]), "10")]);
        assert_eq!(
            *shared.enforced.lock().unwrap(),
            Enforced {
                policies: 1,
                policies_here: 1,
                pods: 2,
                local_addresses: (1, 0),
                isolated_addresses: (1, 0),
            }
        );
    }

    /// The in-memory kernel with a ruleset generation the test moves by hand.
    struct WithGeneration(Memory, Arc<std::sync::atomic::AtomicU32>);

    impl Backend for WithGeneration {
        fn dump(&mut self) -> Result<Option<weft_netpol::Ruleset>, String> {
            self.0.dump()
        }
        fn apply(&mut self, ops: &[weft_netpol::diff::Op]) -> Result<(), String> {
            self.0.apply(ops)
        }
        fn describe(&self) -> String {
            "memory with a generation".into()
        }
        fn generation(&mut self) -> Result<Option<u32>, String> {
            Ok(Some(self.1.load(Ordering::SeqCst)))
        }
    }

    #[test]
    fn foreign_commits_trigger_a_comparison_and_the_generation_spares_the_periodic_one() {
        use weft_nft::monitor::Event;
        let shared = Arc::new(Shared::new("n1", Arc::new(Metrics::default())));
        let memory = Memory::new("weft");
        let kernel = memory.fake.clone();
        let generation = Arc::new(std::sync::atomic::AtomicU32::new(7));
        let backend = WithGeneration(memory, generation.clone());
        let mut c = Controller::new(
            config(Duration::from_millis(1)),
            Box::new(backend),
            shared.clone(),
            None,
        );
        list_all(
            &mut c,
            vec![pod("a", "10.244.1.2", "n1")],
            vec![deny_all("deny")],
        );
        c.step(vec![msg(Kind::Nodes, WatchBody::Listed(vec![]), "10")]);
        let watch = shared.table_watch.clone();
        let repairs = || shared.metrics.drift_repairs.load(Ordering::Relaxed);
        let counts = || {
            (
                watch.checks_compared.load(Ordering::Relaxed),
                watch.checks_skipped.load(Ordering::Relaxed),
            )
        };
        let tamper = || {
            kernel.lock().unwrap().tamper(|t| {
                t.sets
                    .get_mut("ingress-dispatch-v4")
                    .unwrap()
                    .elements
                    .clear();
            })
        };
        let age = |c: &mut Controller| c.last_drift_check = Instant::now() - Duration::from_secs(2);

        // A fresh subscription is suspect: the first turn compares (nothing to repair).
        watch.set_running(true);
        age(&mut c);
        c.drift_turn();
        assert_eq!((counts(), repairs()), ((1, 0), 0));
        // Every commit since was ours (the monitor saw generation 7): the periodic turn skips.
        watch.observe(&Event::Own {
            generation: 7,
            objects: 3,
        });
        age(&mut c);
        c.drift_turn();
        assert_eq!((counts(), repairs()), ((1, 1), 0));
        // `nft` empties the dispatch map: the monitor reports it, the next turn repairs.
        tamper();
        generation.store(8, Ordering::SeqCst);
        watch.observe(&Event::Foreign {
            generation: 8,
            pid: 4242,
            process: "nft".into(),
            objects: 1,
        });
        age(&mut c);
        c.drift_turn();
        assert_eq!((counts(), repairs()), ((2, 1), 1));
        assert_eq!(
            kernel.lock().unwrap().dump(),
            Some(c.engine().unwrap().desired())
        );
        // A change the monitor never reported still shows in the generation: compared, repaired.
        tamper();
        generation.store(9, Ordering::SeqCst);
        age(&mut c);
        c.drift_turn();
        assert_eq!((counts(), repairs()), ((3, 1), 2));
        // Suspect but too soon after the last check: waits (a tool rewriting the table in a
        // loop cannot make the agent dump it in a loop), the flag kept for later.
        watch.raise_suspect();
        c.last_drift_check = Instant::now();
        c.cfg.drift_check_interval = Duration::from_secs(3600);
        c.drift_turn();
        assert_eq!(counts(), (3, 1));
        assert!(watch.take_suspect());
    }

    #[test]
    fn a_reused_pod_name_keeps_the_new_pods_cni_addresses() {
        // Regression (upstream suite, y/a recreated between cases): the old pod's deletion
        // and DEL arrived after the new pod's ADD and wiped the new pod's addresses, so ADD
        // waited in vain.
        let (mut c, shared) = controller(None);
        let mut old = pod("a", "10.244.1.2", "n1");
        if let Obj::Pod(p) = &mut old {
            p.metadata.uid = Some("old".into());
        }
        list_all(&mut c, vec![old.clone()], vec![]);
        c.step(vec![msg(Kind::Nodes, WatchBody::Listed(vec![]), "10")]);
        let key = ObjectKey::new("default", "a");
        let new_ip: std::net::IpAddr = "10.244.1.7".parse().unwrap();
        let cni = |body| WatchMsg {
            kind: Kind::Pods,
            body,
            resource_version: None,
            received: Instant::now(),
        };
        // The new pod's ADD comes first, then the old pod's DEL and deletion event, then the
        // new pod from the API without an IP.
        c.step(vec![cni(WatchBody::CniAttached {
            pod: key.clone(),
            uid: "new".into(),
            ips: vec![new_ip],
        })]);
        c.step(vec![cni(WatchBody::CniReleased {
            pod: key.clone(),
            uid: "old".into(),
        })]);
        c.step(vec![msg(Kind::Pods, WatchBody::Deleted(old), "20")]);
        let mut fresh = pod("a", "10.244.1.7", "n1");
        if let Obj::Pod(p) = &mut fresh {
            p.status = None;
            p.metadata.uid = Some("new".into());
        }
        c.step(vec![msg(Kind::Pods, WatchBody::Applied(fresh), "21")]);
        assert!(
            shared.local_ips.lock().unwrap().contains(&new_ip),
            "the new pod's addresses are enforced"
        );
    }

    #[test]
    fn a_recreated_pod_and_its_cni_add_in_one_batch_get_its_addresses() {
        // Regression (upstream suite, y/a recreated): deletion of the old pod, creation of the
        // new one and the new pod's CNI ADD coalesced into one batch, ADD last.
        let (mut c, shared) = controller(None);
        let mut old = pod("a", "10.244.1.2", "n1");
        if let Obj::Pod(p) = &mut old {
            p.metadata.uid = Some("old".into());
        }
        list_all(&mut c, vec![old.clone()], vec![]);
        c.step(vec![msg(Kind::Nodes, WatchBody::Listed(vec![]), "10")]);
        let mut fresh = pod("a", "10.244.1.2", "n1");
        if let Obj::Pod(p) = &mut fresh {
            p.status = None;
            p.metadata.uid = Some("new".into());
        }
        let ip: std::net::IpAddr = "10.244.1.2".parse().unwrap();
        c.step(vec![
            msg(Kind::Pods, WatchBody::Deleted(old), "20"),
            msg(Kind::Pods, WatchBody::Applied(fresh), "21"),
            WatchMsg {
                kind: Kind::Pods,
                body: WatchBody::CniAttached {
                    pod: ObjectKey::new("default", "a"),
                    uid: "new".into(),
                    ips: vec![ip],
                },
                resource_version: None,
                received: Instant::now(),
            },
        ]);
        assert!(shared.local_ips.lock().unwrap().contains(&ip));
    }

    #[test]
    fn nothing_reaches_the_kernel_before_every_kind_has_listed() {
        let (mut c, shared) = controller(None);
        list_all(&mut c, vec![pod("a", "10.244.1.2", "n1")], vec![]);
        assert!(c.engine().is_none(), "nodes have not listed");
        assert!(!shared.adopted.load(Ordering::Relaxed));
        c.step(vec![msg(Kind::Nodes, WatchBody::Listed(vec![]), "10")]);
        let engine = c.engine().expect("running");
        assert_eq!(engine.desired().sets["pods-local-v4"].elements.len(), 1);
        assert!(shared.adopted.load(Ordering::Relaxed));
        assert_eq!(shared.applied.lock().unwrap()[&Kind::Pods], "10");
    }

    #[test]
    fn a_relist_deletes_what_the_new_list_lacks() {
        let (mut c, _) = controller(None);
        list_all(
            &mut c,
            vec![pod("a", "10.244.1.2", "n1"), pod("b", "10.244.1.3", "n1")],
            vec![deny_all("deny")],
        );
        c.step(vec![msg(Kind::Nodes, WatchBody::Listed(vec![]), "10")]);
        assert_eq!(c.engine().unwrap().cluster().pods.len(), 2);
        c.step(vec![msg(
            Kind::Pods,
            WatchBody::Listed(vec![pod("b", "10.244.1.3", "n1")]),
            "20",
        )]);
        let cluster = c.engine().unwrap().cluster();
        assert_eq!(cluster.pods.len(), 1);
        assert!(cluster.pods.contains_key(&ObjectKey::new("default", "b")));
    }

    #[test]
    fn a_panic_in_reconcile_is_caught_counted_and_the_change_still_enforced() {
        let (mut c, shared) = controller(Some("boom"));
        list_all(&mut c, vec![pod("a", "10.244.1.2", "n1")], vec![]);
        c.step(vec![msg(Kind::Nodes, WatchBody::Listed(vec![]), "10")]);
        c.step_guarded(vec![
            msg(
                Kind::Pods,
                WatchBody::Applied(pod("b", "10.244.1.3", "n1")),
                "29",
            ),
            msg(Kind::Policies, WatchBody::Applied(deny_all("boom")), "30"),
        ]);
        assert_eq!(shared.metrics.reconcile_panics.load(Ordering::Relaxed), 1);
        // Nothing delivers these messages again: the retry after the panic must enforce them.
        let engine = c.engine().unwrap();
        assert_eq!(engine.cluster().policies.len(), 1);
        assert_eq!(engine.cluster().pods.len(), 2);
        assert_eq!(
            engine.desired().sets["ingress-dispatch-v4"].elements.len(),
            2,
            "pods a and b are isolated by the policy"
        );
        assert_eq!(shared.applied.lock().unwrap()[&Kind::Policies], "30");
        // The same object again (as a relist would deliver it) changes nothing.
        c.step_guarded(vec![msg(
            Kind::Policies,
            WatchBody::Applied(deny_all("boom")),
            "31",
        )]);
        assert_eq!(shared.metrics.reconcile_panics.load(Ordering::Relaxed), 1);
        assert_eq!(c.engine().unwrap().cluster().policies.len(), 1);
    }

    #[test]
    fn an_invalid_policy_keeps_its_last_valid_version_and_reports() {
        let (mut c, shared) = controller(None);
        list_all(
            &mut c,
            vec![pod("a", "10.244.1.2", "n1")],
            vec![deny_all("p")],
        );
        c.step(vec![msg(Kind::Nodes, WatchBody::Listed(vec![]), "10")]);
        let mut bad = net::NetworkPolicy {
            metadata: meta(Some("default"), "p", "40"),
            spec: Some(net::NetworkPolicySpec::default()),
        };
        bad.spec.as_mut().unwrap().pod_selector = Some(LabelSelector {
            match_expressions: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                    key: "x".into(),
                    operator: "Sometimes".into(),
                    values: None,
                },
            ]),
            ..Default::default()
        });
        c.step(vec![msg(
            Kind::Policies,
            WatchBody::Applied(Obj::Policy(Box::new(bad))),
            "40",
        )]);
        let engine = c.engine().unwrap();
        assert_eq!(
            engine.desired().sets["ingress-dispatch-v4"].elements.len(),
            1,
            "the last valid version still isolates pod a"
        );
        assert_eq!(shared.metrics.policy_errors.load(Ordering::Relaxed), 1);
        assert!(
            shared.object_errors.lock().unwrap()[&ObjectKey::new("default", "p")][0]
                .contains("Sometimes")
        );
    }
}
