//! The `weft` binary: the node agent and the operator's tools, one CLI.
//!
//! Subcommands grow with the issues that bring them: `agent` (the node process), `demo` (the
//! engine on a small example, no kernel or cluster needed), `version`.

mod agent;
mod cli;
mod demo;

use std::process::ExitCode;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// weft: a Kubernetes CNI with an incremental nftables NetworkPolicy engine.
#[derive(Parser, Debug)]
#[command(name = "weft", version = VERSION.as_str(), about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the version and the nft schema version.
    Version {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compile a small example cluster, print every node's ruleset and the connectivity table
    /// (simulated ruleset, cross-checked against the policy evaluator).
    Demo,
    /// Run the node agent: watch the API, enforce NetworkPolicy in this network namespace.
    Agent(Box<AgentArgs>),
    /// The lab: a local multi-node cluster in network namespaces (`up`, `table`, `status`,
    /// `down`); runs the repository's conformance/lab/lab.sh (root, Debian).
    Lab {
        /// up [NODES] | table | status | down
        #[arg(default_value = "up", num_args = 0..)]
        args: Vec<String>,
    },
    /// This node's agent: watches, readiness, table size, objects with problems.
    Status {
        /// The agent's socket.
        #[arg(long, default_value = "/run/weft/agent.sock")]
        socket: PathBuf,
        /// The raw JSON state.
        #[arg(long)]
        json: bool,
        /// Recent denied new connections (with --log-drops) and the per-rule counters, with
        /// the isolating policies.
        #[arg(long)]
        drops: bool,
    },
    /// Live connections through this node's policy, with the rules that let them in (from
    /// the conntrack mark and the kernel's rule comments; no agent needed).
    Flows {
        /// As JSON.
        #[arg(long)]
        json: bool,
        /// Also connections no local pod takes part in.
        #[arg(long)]
        all: bool,
        /// Table name.
        #[arg(long, default_value = "weft")]
        table: String,
    },
    /// Why is a connection allowed or denied? SRC and DST are namespace/name or IPs.
    Explain {
        /// Client: namespace/name or an IP.
        src: String,
        /// Server: namespace/name or an IP.
        dst: String,
        /// PORT or PORT/PROTO (tcp, udp, sctp).
        #[arg(default_value = "80/tcp")]
        port: String,
        /// The agent's socket.
        #[arg(long, default_value = "/run/weft/agent.sock")]
        socket: PathBuf,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare the kernel's table with the desired one; exit 1 on drift.
    Audit {
        /// Apply the difference (a diff, never a rebuild).
        #[arg(long)]
        repair: bool,
        /// The agent's socket.
        #[arg(long, default_value = "/run/weft/agent.sock")]
        socket: PathBuf,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Uninstall from this node: weft's nft tables, the tunnel and pod links, the state dir.
    Cleanup {
        /// Table name.
        #[arg(long, default_value = "weft")]
        table: String,
        /// Also delete this state directory (IPAM allocations).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// NetworkPolicy case files (conformance/CASES.md format).
    Conformance {
        #[command(subcommand)]
        command: ConformanceCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConformanceCommand {
    /// Replay a case file and report per case and per cell.
    Run {
        /// The case file.
        #[arg(long)]
        cases: PathBuf,
        /// Also write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Judge with the in-memory policy evaluator instead of a cluster.
        #[arg(long)]
        oracle: bool,
        /// Replay in IPv6-only mode.
        #[arg(long)]
        ipv6: bool,
        /// Print every check's tables, not only failed ones.
        #[arg(long)]
        verbose: bool,
        /// Cluster nodes (default: the most namespaces any case has).
        #[arg(long, conflicts_with = "oracle")]
        nodes: Option<usize>,
        /// Leave the cluster running at the end.
        #[arg(long, conflicts_with = "oracle")]
        keep: bool,
    },
}

#[derive(Args, Debug)]
// A flag given twice: the later wins (the lab appends test knobs to the manifest's args).
#[command(args_override_self = true)]
struct AgentArgs {
    /// This node's name.
    #[arg(long, env = "WEFT_NODE_NAME")]
    node: String,
    /// Kubeconfig (default: in-cluster, then $KUBECONFIG / ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:6784")]
    metrics_addr: String,
    /// Local unix socket (CNI plugin, /debug/state).
    #[arg(long, default_value = "/run/weft/agent.sock")]
    socket: PathBuf,
    /// nftables table name (family inet).
    #[arg(long, default_value = "weft")]
    table: String,
    /// Seconds without any event or bookmark before a watch counts as stalled (>= 90).
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u64).range(90..))]
    stall_timeout: u64,
    /// Program an in-memory table instead of the kernel (try the agent without root).
    #[arg(long)]
    dry_run: bool,
    /// State directory: IPAM allocations, CNI release records.
    #[arg(long, default_value = "/var/lib/weft")]
    state_dir: PathBuf,
    /// Underlay address of this node for the VXLAN overlay (default: the Node's InternalIP).
    #[arg(long)]
    underlay_ip: Option<std::net::IpAddr>,
    /// Policy enforcement only: no overlay, no CNI service.
    #[arg(long)]
    no_dataplane: bool,
    /// Seconds between comparisons of the kernel's table with the desired one; drift is
    /// repaired by a diff and counted (0: off).
    #[arg(long, default_value_t = 60)]
    drift_check_seconds: u64,
    /// Cluster CIDRs, comma-separated: pod and Service ranges. Pods' traffic to anything
    /// outside them is masqueraded (table inet weft-nat); inside, sources are kept.
    #[arg(long, default_value = agent::nat::DEFAULT_CLUSTER_CIDRS)]
    cluster_cidrs: String,
    /// No masquerade (and remove a weft-nat table an earlier run left).
    #[arg(long)]
    no_masquerade: bool,
    /// Where the CNI conflist (10-weft.conflist) is written once the agent is ready.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Where the runtime finds CNI plugins (weft-cni must be there before the conflist is).
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// API-based IPAM cleanup frees an allocation whose pod UID the API no longer has only
    /// once it is at least this many seconds old.
    #[arg(long, default_value_t = 300)]
    cleanup_min_age: u64,
    /// The node mesh: authenticated control connections to every node, path health and
    /// relay, WireGuard keys. The file holds the cluster secret (every node the same); the
    /// DaemonSet mounts the optional Secret `kube-system/weft-mesh` and names its file here.
    /// Read once at start. The file absent: the mesh is off (a warning), or with
    /// `--encryption on` or `required` the agent refuses to start (exit 2); empty or
    /// unreadable: refuses.
    /// Not given (or given empty): the mesh is off.
    #[arg(long, env = "WEFT_MESH_SECRET_FILE")]
    mesh_secret_file: Option<PathBuf>,
    /// The cluster secret itself, from the environment only: for an agent run outside
    /// Kubernetes (a systemd unit's EnvironmentFile and the like). The DaemonSet does not use
    /// it: a mounted file keeps the value out of the pod spec and the process environment.
    /// `--mesh-secret-file` wins when both are given. Empty: not given.
    #[arg(skip = std::env::var("WEFT_MESH_SECRET").ok().filter(|s| !s.is_empty()))]
    mesh_secret: Option<String>,
    /// TCP port of the mesh's control connections (the same on every node).
    #[arg(long, env = "WEFT_MESH_PORT", default_value_t = agent::mesh::DEFAULT_PORT)]
    mesh_port: u16,
    /// Encrypt pod traffic between nodes with WireGuard (needs the mesh). `on`, mixed mode:
    /// sent encrypted only to nodes that advertise WireGuard ready, plain VXLAN to the others
    /// (switching encryption on or off is a rolling restart without a partition). `required`:
    /// never plaintext from this node: a node it cannot reach over WireGuard (encryption off
    /// there, no session yet, or this node's own WireGuard not ready) gets an `unreachable`
    /// route instead of VXLAN. Set it on every node once all run with encryption: then no pod
    /// traffic crosses the underlay in plaintext.
    #[arg(long, env = "WEFT_ENCRYPTION", default_value = "off", value_parser = ["on", "off", "required"])]
    encryption: String,
    /// WireGuard UDP port (the same on every node).
    #[arg(long, env = "WEFT_WIREGUARD_PORT", default_value_t = agent::mesh::DEFAULT_WG_PORT)]
    wireguard_port: u16,
    /// WireGuard implementation: `auto` (the kernel module where it is loaded, else the
    /// userspace `weft-wg`), `userspace`, or `kernel`.
    #[arg(long, env = "WEFT_WIREGUARD", default_value = "auto", value_parser = ["auto", "userspace", "kernel"])]
    wireguard: String,
    /// Conntrack marks, strict conntrack mode, the drop log.
    #[command(flatten)]
    flows: agent::conntrack::FlowArgs,
    /// Test-only fault injection: `panic-policy=NAME` or `panic-watch=KIND`.
    #[arg(long, env = "WEFT_FAULT_INJECT", hide = true)]
    inject: Option<String>,
}

/// `0.1.0 (nft schema 1)`: the schema decides whether a restart adopts the kernel's table or
/// replaces it. Made from `SCHEMA_VERSION`, so a build says the schema it writes (the
/// `schema-next` test build says 2).
pub static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (nft schema {})",
        env!("CARGO_PKG_VERSION"),
        weft_netpol::ruleset::SCHEMA_VERSION
    )
});

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => cli::version(false),
        Some(Command::Version { json }) => cli::version(json),
        Some(Command::Flows { json, all, table }) => cli::flows(&table, json, all),
        Some(Command::Agent(args)) => run_agent(*args),
        Some(Command::Lab { args }) => run_lab(&args),
        Some(Command::Status {
            socket,
            json,
            drops,
        }) => {
            if drops {
                cli::drops(&socket, "weft", json)
            } else {
                cli::status(&socket, json)
            }
        }
        Some(Command::Explain {
            src,
            dst,
            port,
            socket,
            json,
        }) => cli::explain(&socket, &src, &dst, &port, json),
        Some(Command::Audit {
            repair,
            socket,
            json,
        }) => cli::audit(&socket, repair, json),
        Some(Command::Cleanup {
            table,
            state_dir,
            json,
        }) => cli::cleanup(&table, state_dir.as_deref(), json),
        Some(Command::Conformance {
            command:
                ConformanceCommand::Run {
                    cases,
                    json,
                    oracle,
                    ipv6,
                    verbose,
                    nodes,
                    keep,
                },
        }) => {
            use weft_conformance::{cluster, command};
            let args = command::RunArgs {
                cases,
                json,
                oracle,
                ipv6,
                verbose,
                // cluster probes mostly wait (a blocked one waits out its timeout)
                parallelism: if oracle { 8 } else { 96 },
            };
            let result = if oracle {
                command::run_command(&args, &mut std::io::stdout()).map_err(|e| e.to_string())
            } else {
                cluster::ClusterOptions::from_env(nodes, keep).and_then(|options| {
                    cluster::run(&args, &options, &mut std::io::stdout()).map_err(|e| e.to_string())
                })
            };
            match result {
                Ok(summary) if summary.failed == 0 => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("weft conformance: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Some(Command::Demo) => match demo::run() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(text) => {
                eprint!("{text}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The lab lives in the source tree (it drives shell-level tools: ip, nft, kubectl).
fn run_lab(args: &[String]) -> ExitCode {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance/lab/lab.sh");
    if !std::path::Path::new(script).exists() {
        eprintln!("weft lab: {script} not found: run it from a weft source checkout");
        return ExitCode::FAILURE;
    }
    match std::process::Command::new("bash")
        .arg(script)
        .args(args)
        .status()
    {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("weft lab: cannot run {script}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_agent(args: AgentArgs) -> ExitCode {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    if let Err(e) = args
        .flows
        .observability()
        .and_then(weft_netpol::compile::configure)
    {
        eprintln!("weft agent: --ct-mark-shift/--ct-mark-bits: {e}");
        return ExitCode::from(2);
    }
    let mut watch = agent::watch::WatchConfig {
        stall_timeout: Duration::from_secs(args.stall_timeout),
        ..Default::default()
    };
    let mut inject_panic_policy = None;
    if let Some(spec) = &args.inject {
        match spec.split_once('=') {
            Some(("panic-policy", name)) => inject_panic_policy = Some(name.to_string()),
            Some(("panic-watch", kind)) => {
                watch.inject_panic = agent::watch::Kind::ALL
                    .into_iter()
                    .find(|k| k.name() == kind)
            }
            _ => {
                eprintln!("weft agent: unknown fault injection {spec:?}");
                return ExitCode::from(2);
            }
        }
        tracing::warn!(fault = %spec, "TEST-ONLY fault injection is on");
    }
    let masquerade = if args.no_masquerade {
        None
    } else {
        match agent::nat::parse_cidrs(&args.cluster_cidrs) {
            Ok(cidrs) => Some(cidrs),
            Err(e) => {
                eprintln!("weft agent: --cluster-cidrs: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let mesh = match mesh_config(&args) {
        Ok(mesh) => mesh,
        Err(code) => return code,
    };
    let cfg = agent::AgentConfig {
        node: args.node,
        kubeconfig: args.kubeconfig,
        metrics_addr: args.metrics_addr,
        socket: args.socket,
        table: args.table,
        watch,
        dry_run: args.dry_run,
        inject_panic_policy,
        state_dir: args.state_dir,
        underlay_ip: args.underlay_ip,
        no_dataplane: args.no_dataplane || args.dry_run,
        drift_check_interval: Duration::from_secs(args.drift_check_seconds),
        masquerade,
        cni_conf_dir: Some(args.cni_conf_dir),
        cni_bin_dir: args.cni_bin_dir,
        cleanup_min_age: Duration::from_secs(args.cleanup_min_age),
        mesh,
        flows: args.flows,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("weft agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The mesh's settings, from where the cluster secret is ([`mesh_start`] decides): `None`
/// when it is off (logged if it was asked for), `Err` with the exit code when the agent must
/// not start (the reason printed).
fn mesh_config(args: &AgentArgs) -> Result<Option<agent::mesh::MeshConfig>, ExitCode> {
    let encryption = Some(args.encryption.as_str()).filter(|m| *m != "off");
    let source = match args
        .mesh_secret_file
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
    {
        Some(file) => {
            let read = std::fs::read(&file);
            judge_secret_file(file, read)
        }
        None => match args.mesh_secret.clone() {
            Some(value) => SecretSource::Value(value),
            None => SecretSource::NotGiven,
        },
    };
    let secret = match mesh_start(source, encryption) {
        MeshStart::On(secret) => {
            if let agent::mesh::MeshSecret::File(file) = &secret {
                tracing::info!(file = %file.display(), "mesh: the cluster secret is read from the file");
            }
            secret
        }
        MeshStart::Off => return Ok(None),
        MeshStart::OffWithoutSecret(file) => {
            tracing::warn!(
                file = %file.display(),
                "mesh off: the cluster secret file {} does not exist (the DaemonSet mounts the optional Secret kube-system/weft-mesh there): create it with `{CREATE_SECRET}`, then restart the agents (`kubectl -n kube-system rollout restart daemonset weft`)",
                file.display()
            );
            return Ok(None);
        }
        MeshStart::Refuse(why) => {
            eprintln!("weft agent: {why}");
            return Err(ExitCode::from(2));
        }
    };
    Ok(Some(agent::mesh::MeshConfig {
        node: args.node.clone(),
        secret,
        port: args.mesh_port,
        listen_ip: args.underlay_ip,
        state_dir: args.state_dir.clone(),
        encryption: encryption.is_some(),
        encryption_required: args.encryption == "required",
        wg_port: args.wireguard_port,
        backend: match args.wireguard.as_str() {
            "userspace" => agent::mesh::WireguardBackend::Userspace,
            "kernel" => agent::mesh::WireguardBackend::Kernel,
            _ => agent::mesh::WireguardBackend::detect(),
        },
    }))
}

/// How to create the cluster secret in a cluster (the DaemonSet mounts it as a file).
const CREATE_SECRET: &str = "kubectl -n kube-system create secret generic weft-mesh --from-literal=secret=\"$(head -c 32 /dev/urandom | base64)\"";

/// Where the agent found the cluster secret, read once at start-up (a Secret created later
/// takes effect when the agents restart).
#[derive(PartialEq, Eq)]
enum SecretSource {
    /// Neither `--mesh-secret-file` nor `WEFT_MESH_SECRET`.
    NotGiven,
    /// `--mesh-secret-file` names no file: in Kubernetes, the optional Secret is not created.
    Absent(PathBuf),
    /// The file is there but holds no usable secret (unreadable, a directory, empty).
    Unusable { file: PathBuf, why: String },
    /// A readable file with a secret in it.
    File(PathBuf),
    /// `WEFT_MESH_SECRET`.
    Value(String),
}

/// The secret's value never appears in a test failure or a log.
impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::NotGiven => f.write_str("NotGiven"),
            SecretSource::Absent(p) => write!(f, "Absent({})", p.display()),
            SecretSource::Unusable { file, why } => {
                write!(f, "Unusable({}: {why})", file.display())
            }
            SecretSource::File(p) => write!(f, "File({})", p.display()),
            SecretSource::Value(_) => f.write_str("Value(hidden)"),
        }
    }
}

/// Judges what reading `--mesh-secret-file` gave: `NotFound` is the Secret not created;
/// another error, or a secret the mesh would refuse as empty, is a file that cannot serve.
fn judge_secret_file(file: PathBuf, read: std::io::Result<Vec<u8>>) -> SecretSource {
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => SecretSource::Absent(file),
        Err(e) => SecretSource::Unusable {
            file,
            why: e.to_string(),
        },
        // The mesh's own rule (one trailing newline ignored, nothing left refused); the keys
        // are derived once, by the mesh when it starts.
        Ok(bytes) => match weft_mesh::ClusterKeys::usable_secret(&bytes) {
            Ok(_) => SecretSource::File(file),
            Err(e) => SecretSource::Unusable {
                file,
                why: e.to_string(),
            },
        },
    }
}

/// What the agent does about the mesh at start-up.
#[derive(Debug)]
enum MeshStart {
    /// The mesh runs with this secret.
    On(agent::mesh::MeshSecret),
    /// Not asked for.
    Off,
    /// Asked for, but the secret's file does not exist: off, with a warning naming the file.
    OffWithoutSecret(PathBuf),
    /// The agent must not start: exit 2 with this line.
    Refuse(String),
}

/// The mesh on, off or a refusal, from where the secret was found and `--encryption` (the
/// mode asked for; `None`: off). Encryption needs the mesh: without a secret the agent
/// refuses rather than sending pod traffic in the clear that the operator asked to encrypt.
fn mesh_start(source: SecretSource, encryption: Option<&str>) -> MeshStart {
    use agent::mesh::MeshSecret;
    match (source, encryption) {
        (SecretSource::File(file), _) => MeshStart::On(MeshSecret::File(file)),
        (SecretSource::Value(value), _) => MeshStart::On(MeshSecret::Value(value)),
        // There but broken: a configuration to fix, not the optional Secret left out.
        (SecretSource::Unusable { file, why }, _) => MeshStart::Refuse(format!(
            "the cluster secret file {} cannot be used ({why}): it must be readable and hold the secret, 32 random bytes (in Kubernetes: the key `secret` of the Secret kube-system/weft-mesh; delete it and create it again with `{CREATE_SECRET}`)",
            file.display()
        )),
        (SecretSource::Absent(file), Some(mode)) => MeshStart::Refuse(format!(
            "--encryption {mode} needs the mesh, and the cluster secret file {} does not exist: create the Secret with `{CREATE_SECRET}` (the DaemonSet mounts kube-system/weft-mesh there), or set encryption off",
            file.display()
        )),
        (SecretSource::Absent(file), None) => MeshStart::OffWithoutSecret(file),
        (SecretSource::NotGiven, Some(mode)) => MeshStart::Refuse(format!(
            "--encryption {mode} needs the mesh: give --mesh-secret-file (or WEFT_MESH_SECRET)"
        )),
        (SecretSource::NotGiven, None) => MeshStart::Off,
    }
}

#[cfg(test)]
mod tests {
    use super::{MeshStart, SecretSource, judge_secret_file, mesh_start};
    use std::io::{Error, ErrorKind};
    use std::path::PathBuf;

    #[test]
    fn the_version_names_the_current_schema() {
        use clap::CommandFactory as _;
        // What `weft --version` prints (schema-next builds too: see handoff-test scenario 3).
        let want = format!("(nft schema {})", weft_netpol::ruleset::SCHEMA_VERSION);
        let shown = super::Cli::command()
            .get_version()
            .unwrap_or_default()
            .to_string();
        assert!(shown.ends_with(&want), "{shown}");
        assert_eq!(shown, super::VERSION.as_str());
    }

    const FILE: &str = "/etc/weft/mesh/secret";

    fn judged(read: std::io::Result<&[u8]>) -> SecretSource {
        judge_secret_file(PathBuf::from(FILE), read.map(<[u8]>::to_vec))
    }

    #[test]
    fn the_secret_file_is_judged_by_what_reading_it_gave() {
        assert_eq!(
            judged(Ok(b"c2VjcmV0LXNlY3JldC1zZWNyZXQK\n")),
            SecretSource::File(FILE.into())
        );
        assert_eq!(
            judged(Err(Error::from(ErrorKind::NotFound))),
            SecretSource::Absent(FILE.into())
        );
        for (read, why) in [
            (Ok(&b""[..]), "empty"),
            (Ok(&b"\n"[..]), "empty"),
            (Err(Error::from(ErrorKind::PermissionDenied)), "denied"),
            (Err(Error::from(ErrorKind::IsADirectory)), "directory"),
        ] {
            match judged(read) {
                SecretSource::Unusable { file, why: got } => {
                    assert_eq!(file, PathBuf::from(FILE));
                    assert!(got.contains(why), "{got:?} should say {why:?}");
                }
                other => panic!("{other:?} for {why}"),
            }
        }
    }

    /// (source, encryption) -> what the agent does; the refusals say what to do.
    #[test]
    fn the_mesh_starts_stays_off_or_the_agent_refuses() {
        let absent = || SecretSource::Absent(FILE.into());
        let empty = || SecretSource::Unusable {
            file: FILE.into(),
            why: "the cluster secret is empty".into(),
        };
        for encryption in [None, Some("on"), Some("required")] {
            let on = mesh_start(SecretSource::File(FILE.into()), encryption);
            assert!(
                matches!(&on, MeshStart::On(super::agent::mesh::MeshSecret::File(f)) if f.as_os_str() == FILE),
                "{on:?}"
            );
            let on = mesh_start(SecretSource::Value("s3cret".into()), encryption);
            assert!(
                matches!(&on, MeshStart::On(super::agent::mesh::MeshSecret::Value(v)) if v == "s3cret"),
                "{on:?}"
            );
            match mesh_start(empty(), encryption) {
                MeshStart::Refuse(line) => {
                    assert!(line.contains(FILE) && line.contains("empty"), "{line}");
                    assert!(line.contains("create secret generic weft-mesh"), "{line}");
                    assert!(!line.contains('\n'), "one line: {line}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            mesh_start(SecretSource::NotGiven, None),
            MeshStart::Off
        ));
        assert!(matches!(
            mesh_start(absent(), None),
            MeshStart::OffWithoutSecret(f) if f.as_os_str() == FILE
        ));
        for mode in ["on", "required"] {
            match mesh_start(absent(), Some(mode)) {
                MeshStart::Refuse(line) => {
                    assert!(line.starts_with(&format!("--encryption {mode} ")), "{line}");
                    assert!(line.contains(FILE), "{line}");
                    assert!(
                        line.contains("kubectl -n kube-system create secret generic weft-mesh"),
                        "{line}"
                    );
                    assert!(!line.contains('\n'), "one line: {line}");
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                mesh_start(SecretSource::NotGiven, Some(mode)),
                MeshStart::Refuse(line) if line.contains("--mesh-secret-file") && line.starts_with(&format!("--encryption {mode} "))
            ));
        }
    }

    #[test]
    fn a_secret_given_as_a_value_is_not_shown_in_debug_output() {
        let shown = format!("{:?}", SecretSource::Value("s3cret".into()));
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
