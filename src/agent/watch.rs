//! Supervised watches: one task per kind, restarted on panic and on stall, always visible.
//!
//! Each watch lists (all pages) and then watches from the list's resourceVersion with bookmarks
//! on; a 410 Gone relists. Events go to the controller as [`WatchMsg`]s over a channel; a
//! `Listed` message carries the whole new list, so the controller swaps its store in one step
//! (a restarted watch keeps the old store serving until its new list is complete).
//!
//! kube-runtime's `watcher` hides bookmarks, so it cannot tell a quiet stream from a stalled
//! one within 90 s; this loop sees them. The [`supervise`] loop is the state machine
//! `Running → (panic | stall | ended) → Backoff → Running`, counting every restart in
//! `weft_watch_restarts_total{kind,reason}`.

use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{error, info, warn};

use super::metrics::Metrics;

/// The kinds the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Pods.
    Pods,
    /// Namespaces.
    Namespaces,
    /// NetworkPolicies.
    Policies,
    /// Nodes.
    Nodes,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 4] = [Kind::Pods, Kind::Namespaces, Kind::Policies, Kind::Nodes];

    /// Lower-case name used in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::Policies => "networkpolicies",
            Kind::Nodes => "nodes",
        }
    }
}

/// One object of any watched kind.
#[derive(Clone, Debug)]
pub enum Obj {
    /// A pod.
    Pod(Box<core::Pod>),
    /// A namespace.
    Namespace(Box<core::Namespace>),
    /// A policy.
    Policy(Box<net::NetworkPolicy>),
    /// A node.
    Node(Box<core::Node>),
}

/// What a watch reports.
#[derive(Clone, Debug)]
pub enum WatchBody {
    /// A complete list: the new truth for this kind.
    Listed(Vec<Obj>),
    /// Created or updated.
    Applied(Obj),
    /// Deleted.
    Deleted(Obj),
    /// A bookmark: nothing changed up to this resourceVersion.
    Progress,
    /// Not from the API: CNI ADD attached this pod with these addresses (the API learns
    /// them only after ADD returns, the kernel must have them before).
    CniAttached {
        /// The pod.
        pod: weft_netpol::model::ObjectKey,
        /// Its uid from CNI_ARGS (may be empty).
        uid: String,
        /// The allocated addresses.
        ips: Vec<std::net::IpAddr>,
    },
    /// Not from the API: CNI DEL detached this pod.
    CniReleased {
        /// The pod.
        pod: weft_netpol::model::ObjectKey,
        /// Its uid from CNI_ARGS (may be empty): a pod name can be reused by a new pod before
        /// the old one's DEL arrives.
        uid: String,
    },
    /// Not from the API: an operator's question, answered on the controller thread.
    Query {
        /// The question.
        query: super::query::Query,
        /// Where the answer goes.
        reply: std::sync::mpsc::Sender<Result<super::query::Answer, String>>,
    },
}

/// A message from a watch to the controller.
#[derive(Clone, Debug)]
pub struct WatchMsg {
    /// Which kind.
    pub kind: Kind,
    /// What happened.
    pub body: WatchBody,
    /// The resourceVersion this message brings the kind up to.
    pub resource_version: Option<String>,
    /// When the agent received it (for realization latency).
    pub received: Instant,
}

/// Liveness of one watch, shared with readiness and metrics.
#[derive(Debug)]
pub struct WatchHealth {
    last_event: Mutex<Instant>,
    down_since: Mutex<Option<Instant>>,
    listed_once: AtomicBool,
}

impl Default for WatchHealth {
    fn default() -> Self {
        WatchHealth {
            last_event: Mutex::new(Instant::now()),
            down_since: Mutex::new(Some(Instant::now())),
            listed_once: AtomicBool::new(false),
        }
    }
}

impl WatchHealth {
    /// Something arrived from the API server: the stream is alive.
    pub fn touch(&self) {
        *self.last_event.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        *self.down_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Restarts the stall clock without declaring the watch healthy (a new task starts).
    pub fn restart_clock(&self) {
        *self.last_event.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// The stream failed or was restarted.
    pub fn mark_down(&self) {
        let mut d = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        if d.is_none() {
            *d = Some(Instant::now());
        }
    }

    /// Time since the last event or bookmark.
    pub fn age(&self) -> Duration {
        self.last_event
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// How long the watch has been down, if it is.
    pub fn down_for(&self) -> Option<Duration> {
        self.down_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }

    /// Whether a complete list has been delivered at least once.
    pub fn listed_once(&self) -> bool {
        self.listed_once.load(Ordering::Relaxed)
    }
}

/// Supervision settings.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// No event or bookmark for this long: the stream is stalled and restarted.
    pub stall_timeout: Duration,
    /// First restart delay; doubles up to `max_backoff`, with jitter.
    pub min_backoff: Duration,
    /// Longest restart delay.
    pub max_backoff: Duration,
    /// Server-side watch timeout (the server ends the stream; we re-watch from the last
    /// resourceVersion).
    pub server_timeout: u32,
    /// Test-only: panic once inside this kind's watch task on its first event.
    pub inject_panic: Option<Kind>,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            stall_timeout: Duration::from_secs(150),
            min_backoff: Duration::from_millis(500),
            // Short enough that a watch is back within seconds of the API server's return.
            max_backoff: Duration::from_secs(10),
            server_timeout: 290,
            inject_panic: None,
        }
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
    seed: u64,
}

impl Backoff {
    /// A backoff between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let seed = Instant::now().elapsed().as_nanos() as u64 ^ u64::from(std::process::id());
        Backoff {
            next: min,
            min,
            max,
            seed: seed | 1,
        }
    }

    /// The next delay: a random point in `[next/2, next]`, then `next` doubles.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift: jitter needs no quality, only spread.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = base / 2;
        half + Duration::from_nanos(self.seed % (half.as_nanos() as u64).max(1))
    }

    /// After success: start again from the minimum.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

static INJECTED: AtomicBool = AtomicBool::new(false);

fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
}

/// Lists every page of a kind; returns the objects and the list's resourceVersion.
async fn list_all<K>(api: &Api<K>) -> Result<(Vec<K>, String), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut items = Vec::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = api.list(&lp).await?;
        let rv = page.metadata.resource_version.clone().unwrap_or_default();
        items.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => return Ok((items, rv)),
        }
    }
}

/// The watch loop of one kind: list, watch, relist on 410; runs until the channel closes.
async fn watch_loop<K>(
    api: Api<K>,
    kind: Kind,
    wrap: fn(K) -> Obj,
    tx: mpsc::Sender<WatchMsg>,
    health: Arc<WatchHealth>,
    metrics: Arc<Metrics>,
    cfg: WatchConfig,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut backoff = Backoff::new(cfg.min_backoff, cfg.max_backoff);
    let send = |body: WatchBody, rv: Option<String>| {
        tx.send(WatchMsg {
            kind,
            body,
            resource_version: rv,
            received: Instant::now(),
        })
        .is_ok()
    };
    'relist: loop {
        let (items, mut rv) = match list_all(&api).await {
            Ok(x) => x,
            Err(e) => {
                metrics.watch_error(kind.name());
                health.mark_down();
                warn!(kind = kind.name(), error = %e, "list failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        health.touch();
        backoff.reset();
        health.listed_once.store(true, Ordering::Relaxed);
        info!(kind = kind.name(), objects = items.len(), resource_version = %rv, "listed");
        if !send(
            WatchBody::Listed(items.into_iter().map(wrap).collect()),
            Some(rv.clone()),
        ) {
            return;
        }
        loop {
            // Bookmarks are on by default: a quiet stream still shows it is alive.
            let wp = WatchParams::default().timeout(cfg.server_timeout);
            let stream = match api.watch(&wp, &rv).await {
                Ok(s) => s,
                Err(e) if is_gone(&e) => {
                    metrics.watch_relisted(kind.name());
                    info!(
                        kind = kind.name(),
                        "resourceVersion too old (410): relisting"
                    );
                    continue 'relist;
                }
                Err(e) => {
                    metrics.watch_error(kind.name());
                    health.mark_down();
                    warn!(kind = kind.name(), error = %e, "watch failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            health.touch();
            let mut stream = std::pin::pin!(stream.into_stream());
            loop {
                let ev = match stream.try_next().await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break, // server-side timeout: watch again from `rv`
                    Err(e) => {
                        metrics.watch_error(kind.name());
                        health.mark_down();
                        warn!(kind = kind.name(), error = %e, "watch stream error");
                        tokio::time::sleep(backoff.next_delay()).await;
                        break;
                    }
                };
                health.touch();
                backoff.reset();
                if cfg.inject_panic == Some(kind) && !INJECTED.swap(true, Ordering::SeqCst) {
                    panic!("injected fault: panic in the {} watch", kind.name());
                }
                let ok = match ev {
                    WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                        rv = o.resource_version().unwrap_or_default();
                        send(WatchBody::Applied(wrap(o)), Some(rv.clone()))
                    }
                    WatchEvent::Deleted(o) => {
                        rv = o.resource_version().unwrap_or_default();
                        send(WatchBody::Deleted(wrap(o)), Some(rv.clone()))
                    }
                    WatchEvent::Bookmark(b) => {
                        rv = b.metadata.resource_version;
                        send(WatchBody::Progress, Some(rv.clone()))
                    }
                    WatchEvent::Error(s) if s.code == 410 => {
                        metrics.watch_relisted(kind.name());
                        info!(kind = kind.name(), "watch expired (410): relisting");
                        continue 'relist;
                    }
                    WatchEvent::Error(s) => {
                        metrics.watch_error(kind.name());
                        warn!(kind = kind.name(), status = ?s, "watch error event");
                        break;
                    }
                };
                if !ok {
                    return;
                }
            }
        }
    }
}

/// Spawns the watch task of one kind.
pub fn spawn_watch(
    client: Client,
    kind: Kind,
    tx: mpsc::Sender<WatchMsg>,
    health: Arc<WatchHealth>,
    metrics: Arc<Metrics>,
    cfg: WatchConfig,
) -> tokio::task::JoinHandle<()> {
    // One typed watch loop per kind; the arms differ only in the API type and its wrapper.
    macro_rules! watch {
        ($ty:ty, $variant:ident) => {
            tokio::spawn(watch_loop(
                Api::<$ty>::all(client),
                kind,
                |o| Obj::$variant(Box::new(o)),
                tx,
                health,
                metrics,
                cfg,
            ))
        };
    }
    match kind {
        Kind::Pods => watch!(core::Pod, Pod),
        Kind::Namespaces => watch!(core::Namespace, Namespace),
        Kind::Policies => watch!(net::NetworkPolicy, Policy),
        Kind::Nodes => watch!(core::Node, Node),
    }
}

/// Why a watch task was restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// The task panicked.
    Panic,
    /// No event or bookmark within the stall timeout.
    Stall,
    /// The task ended on its own (the controller's channel closed, or a bug).
    Ended,
}

impl Restart {
    /// Label value for the restart metric.
    pub fn reason(self) -> &'static str {
        match self {
            Restart::Panic => "panic",
            Restart::Stall => "stall",
            Restart::Ended => "ended",
        }
    }
}

/// Runs one kind's watch forever: restarts it on panic, stall or end, with backoff and jitter;
/// logs and counts every restart. Enforcement goes on from the last known state meanwhile.
pub async fn supervise(
    client: Client,
    kind: Kind,
    tx: mpsc::Sender<WatchMsg>,
    health: Arc<WatchHealth>,
    metrics: Arc<Metrics>,
    cfg: WatchConfig,
) {
    let mut backoff = Backoff::new(cfg.min_backoff, cfg.max_backoff);
    let check = (cfg.stall_timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let started = Instant::now();
        health.restart_clock();
        let mut task = spawn_watch(
            client.clone(),
            kind,
            tx.clone(),
            health.clone(),
            metrics.clone(),
            cfg.clone(),
        );
        let why = loop {
            tokio::select! {
                res = &mut task => break match res {
                    Err(e) if e.is_panic() => Restart::Panic,
                    _ => Restart::Ended,
                },
                _ = tokio::time::sleep(check) => {
                    if health.age() > cfg.stall_timeout {
                        task.abort();
                        break Restart::Stall;
                    }
                }
            }
        };
        health.mark_down();
        metrics.watch_restarted(kind.name(), why.reason());
        if tx.send(probe_msg(kind)).is_err() {
            info!(
                kind = kind.name(),
                "controller gone; watch supervisor exits"
            );
            return;
        }
        if started.elapsed() > cfg.max_backoff * 4 {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        error!(
            kind = kind.name(),
            reason = why.reason(),
            restart_in_ms = delay.as_millis() as u64,
            "watch restarted by the supervisor; enforcement continues from the last known state"
        );
        tokio::time::sleep(delay).await;
    }
}

/// A no-op message used to find out whether the controller still listens.
fn probe_msg(kind: Kind) -> WatchMsg {
    WatchMsg {
        kind,
        body: WatchBody::Progress,
        resource_version: None,
        received: Instant::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        for _ in 0..10 {
            b.next_delay();
        }
        let capped = b.next_delay();
        assert!(capped <= Duration::from_secs(2) && capped >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn health_tracks_down_time_until_the_next_event() {
        let h = WatchHealth::default();
        assert!(h.down_for().is_some(), "down until the first event");
        h.touch();
        assert!(h.down_for().is_none());
        h.mark_down();
        std::thread::sleep(Duration::from_millis(5));
        assert!(h.down_for().unwrap() >= Duration::from_millis(5));
        h.touch();
        assert!(h.down_for().is_none());
    }
}
