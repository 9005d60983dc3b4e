//! `weft agent`: the per-node process that enforces NetworkPolicy.
//!
//! Flow: [`watch::supervise`] runs one supervised watch per kind (pods, namespaces, policies,
//! nodes) → messages over a channel → [`controller::Controller`] on its own thread (engine +
//! one nftables transaction per reconcile) → the kernel. [`http`] serves health, readiness and
//! metrics on TCP and the debug state on the unix socket.
//!
//! SIGTERM and SIGINT stop the process and leave every rule in place: the next process adopts
//! the table without a flush. Only `weft cleanup` (later) removes rules.

pub mod backend;
pub mod conntrack;
pub mod controller;
pub mod dataplane;
pub mod drops;
pub mod guard;
pub mod http;
pub mod mesh;
pub mod metrics;
pub mod nat;
pub mod nftwatch;
pub mod query;
pub mod watch;

use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::{info, warn};

use controller::{Controller, ControllerConfig, ObjectEvent, Shared};
use metrics::Metrics;
use watch::{Kind, WatchConfig};

/// Settings of the agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name (`spec.nodeName` of its pods).
    pub node: String,
    /// Kubeconfig path; `None`: in-cluster or the default discovery.
    pub kubeconfig: Option<PathBuf>,
    /// TCP address for /healthz, /readyz, /metrics.
    pub metrics_addr: String,
    /// Unix socket for /debug/state (root only, 0600).
    pub socket: PathBuf,
    /// nft table name.
    pub table: String,
    /// Watch supervision.
    pub watch: WatchConfig,
    /// Use the in-memory kernel instead of netlink.
    pub dry_run: bool,
    /// Test-only fault: panic once while handling the policy of this name.
    pub inject_panic_policy: Option<String>,
    /// State directory (IPAM, CNI release records).
    pub state_dir: PathBuf,
    /// Underlay address for the overlay (`None`: the Node's InternalIP).
    pub underlay_ip: Option<std::net::IpAddr>,
    /// Run without the dataplane (no overlay, no CNI): policy enforcement only.
    pub no_dataplane: bool,
    /// How often the kernel's table is compared with the desired one (zero: never).
    pub drift_check_interval: Duration,
    /// Cluster CIDRs (pods, Services) never masqueraded; `None`: no masquerade.
    pub masquerade: Option<Vec<ipnet::IpNet>>,
    /// Where the conflist goes once the agent is ready (`None`: never).
    pub cni_conf_dir: Option<PathBuf>,
    /// Where the runtime finds CNI plugins.
    pub cni_bin_dir: PathBuf,
    /// API-based cleanup: only allocations at least this old whose pod UID is gone.
    pub cleanup_min_age: Duration,
    /// The node mesh and encryption (`None`: off, `--mesh-secret-file` not given).
    pub mesh: Option<mesh::MeshConfig>,
    /// Conntrack marks, strict mode, drop log.
    pub flows: conntrack::FlowArgs,
}

async fn client(cfg: &AgentConfig) -> anyhow::Result<Client> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .context("kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("finding the API server")?,
    };
    Client::try_from(config).context("building the API client")
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    info!(node = %cfg.node, version = crate::VERSION.as_str(), "weft agent starting");
    let client = client(&cfg).await?;
    let metrics = Arc::new(Metrics::default());
    let shared = Arc::new(Shared::new(&cfg.node, metrics.clone()));

    let backend: Box<dyn backend::Backend> = if cfg.dry_run {
        Box::new(backend::Memory::new(&cfg.table))
    } else {
        Box::new(backend::Kernel::open(&cfg.table).map_err(|e| anyhow::anyhow!("netlink: {e}"))?)
    };
    info!(backend = %backend.describe(), "kernel backend ready");
    if !cfg.dry_run {
        // Drift is noticed as it happens (someone else's commit to our table), not only by
        // the periodic comparison.
        nftwatch::spawn(cfg.table.clone(), shared.table_watch.clone())
            .context("starting the nftables monitor thread")?;
    }

    // Kubernetes Events on objects with problems, published off the controller thread.
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<ObjectEvent>();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "weft-agent".into(),
            instance: Some(cfg.node.clone()),
        },
    );
    tokio::spawn(async move {
        while let Some(ev) = ev_rx.recv().await {
            let reference = ObjectReference {
                api_version: Some("networking.k8s.io/v1".into()),
                kind: Some("NetworkPolicy".into()),
                namespace: Some(ev.policy.namespace.clone()),
                name: Some(ev.policy.name.clone()),
                ..Default::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: ev.reason.clone(),
                note: Some(ev.note.chars().take(1000).collect()),
                action: "Enforce".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(policy = %ev.policy, error = %e, "could not publish event");
            }
        }
    });

    let (tx, rx) = mpsc::channel();
    let (nodes_tx, nodes_rx) = tokio::sync::watch::channel(Vec::new());
    let controller = Controller::new(
        ControllerConfig {
            node: cfg.node.clone(),
            table: cfg.table.clone(),
            inject_panic_policy: cfg.inject_panic_policy.clone(),
            max_reconciles_per_second: 50,
            drift_check_interval: cfg.drift_check_interval,
        },
        backend,
        shared.clone(),
        Some(ev_tx),
    )
    .with_nodes_channel(nodes_tx);
    *shared.modes.lock().unwrap_or_else(|e| e.into_inner()) = cfg.flows.modes();
    let controller = if cfg.flows.strict_conntrack && !cfg.dry_run {
        info!("strict conntrack mode: flows the policies no longer admit are cut");
        controller.with_strict_conntrack()
    } else {
        controller
    };
    if cfg.flows.log_drops && !cfg.dry_run {
        // Observability only: enforcement goes on without it.
        if let Err(e) = drops::spawn(
            cfg.flows.log_drops_group,
            drops::file_for(&cfg.socket),
            metrics.clone(),
        ) {
            warn!(error = %e, group = cfg.flows.log_drops_group, "drop log: not listening (denied connections are still counted; is another process bound to this nflog group? pick another with --log-drops-group)");
        }
    }
    *shared.queries.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
    let gate = Arc::new(dataplane::AgentGate::new(shared.clone(), tx.clone()));
    let slot: dataplane::ServiceSlot = Arc::default();
    let routing = match &cfg.mesh {
        Some(m) => Some(mesh::start(m.clone(), client.clone(), nodes_rx.clone()).await?),
        None => None,
    };
    if !cfg.no_dataplane {
        tokio::spawn(dataplane::run(
            dataplane::DataplaneConfig {
                node: cfg.node.clone(),
                state_dir: cfg.state_dir.clone(),
                underlay_ip: cfg.underlay_ip,
                policy_timeout: Duration::from_secs(10),
                masquerade: cfg.masquerade.clone(),
                cni_conf_dir: cfg.cni_conf_dir.clone(),
                cni_bin_dir: cfg.cni_bin_dir.clone(),
                socket: cfg.socket.clone(),
                cleanup_interval: Duration::from_secs(60),
                cleanup_min_age: cfg.cleanup_min_age,
                refuse_plain_vxlan: cfg.mesh.as_ref().is_some_and(|m| m.encryption_required),
            },
            nodes_rx,
            routing,
            gate.clone(),
            slot.clone(),
        ));
    }
    let controller_thread = std::thread::Builder::new()
        .name("weft-controller".into())
        .spawn(move || controller.run(rx))
        .context("starting the controller thread")?;

    for kind in Kind::ALL {
        tokio::spawn(watch::supervise(
            client.clone(),
            kind,
            tx.clone(),
            shared.health[&kind].clone(),
            metrics.clone(),
            cfg.watch.clone(),
        ));
    }
    drop(tx);

    let tcp = tokio::net::TcpListener::bind(&cfg.metrics_addr)
        .await
        .with_context(|| format!("binding {}", cfg.metrics_addr))?;
    tokio::spawn(http::serve_tcp(tcp, shared.clone()));
    // Root-only (0600) before it is visible; replaces a stale socket atomically.
    let unix = weft_dataplane::proto::bind(&cfg.socket)
        .with_context(|| format!("binding {}", cfg.socket.display()))?;
    tokio::spawn(dataplane::serve_socket(unix, shared.clone(), slot, gate));
    info!(metrics = %cfg.metrics_addr, socket = %cfg.socket.display(), "serving health, readiness and metrics");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: exiting; every rule stays in the kernel for the next process to adopt"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: exiting; every rule stays in the kernel"),
    }
    let _ = std::fs::remove_file(&cfg.socket);
    // The controller thread ends when the watches' senders are dropped with the runtime.
    drop(controller_thread);
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
