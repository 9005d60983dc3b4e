//! `weft-cni`: the CNI 1.1 plugin the container runtime executes, a thin client of the weft
//! agent (DESIGN §6).
//!
//! Input: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`
//! (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`), `CNI_PATH`, and the network config
//! on stdin (`cniVersion` 1.1.0 or 1.0.0; older ones get error code 1). Output: the spec's
//! result JSON on ADD, nothing on DEL/CHECK/GC/STATUS success, the spec's error JSON and exit
//! status 1 on failure.
//!
//! Flow: ADD, CHECK, GC and STATUS are forwarded to the agent's socket with the versioned
//! protocol of `weft_dataplane::proto`; an agent that is not running is CNI code 11 (try
//! again later; 50 for STATUS). DEL also works with the agent down: the plugin deletes the
//! host veth itself (its name follows from the container id) and leaves a release record for
//! the agent. DEL of an unknown container succeeds.
//!
//! Plugin config keys beyond the spec's: `agentSocket` (default `/run/weft/agent.sock`),
//! `stateDir` (default `/var/lib/weft`), `timeoutSeconds` (agent answer, default 30).

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use weft_dataplane::attach;
use weft_dataplane::cni_service::{DEFAULT_STATE_DIR, write_release_record};
use weft_dataplane::proto::{
    self, AddResult, AttachmentArgs, AttachmentKey, CallError, ErrorBody, Operation, Outcome,
    PodRef, Request, codes,
};

/// CNI versions this plugin speaks, oldest first.
const SUPPORTED: [&str; 2] = ["1.0.0", "1.1.0"];
const NEWEST: &str = "1.1.0";

/// The network config fields we read; unknown fields are ignored (the spec allows that).
#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    #[serde(rename = "agentSocket")]
    agent_socket: Option<PathBuf>,
    #[serde(rename = "stateDir")]
    state_dir: Option<PathBuf>,
    #[serde(rename = "timeoutSeconds")]
    timeout_seconds: Option<u64>,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: RuntimeConfig,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<AttachmentKey>>,
    /// The name an early draft of the spec used; libcni sends both.
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<AttachmentKey>>,
}

#[derive(Debug, Default, Deserialize)]
struct RuntimeConfig {
    /// The `ips` capability: `["10.244.1.7/24", "fd00::7"]`.
    #[serde(default)]
    ips: Vec<String>,
}

/// A failure in CNI terms, with the version to report it in.
struct Failure {
    version: String,
    body: ErrorBody,
}

impl Failure {
    fn new(version: &str, code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Failure {
            version: version.to_string(),
            body: ErrorBody::new(code, msg, details),
        }
    }
}

fn main() -> ExitCode {
    let mut stdin = String::new();
    let read = std::io::stdin().read_to_string(&mut stdin);
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let outcome = match read {
        Ok(_) => run(&env, &stdin),
        Err(e) => Err(Failure::new(
            NEWEST,
            codes::IO_FAILURE,
            "cannot read stdin",
            e.to_string(),
        )),
    };
    match outcome {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(f) => {
            let mut err = json!({"cniVersion": f.version, "code": f.body.code, "msg": f.body.msg});
            if !f.body.details.is_empty() {
                err["details"] = Value::String(f.body.details.clone());
            }
            println!("{err}");
            eprintln!("weft-cni: {}", f.body);
            ExitCode::FAILURE
        }
    }
}

/// One invocation: `Ok(Some(json))` to print, `Ok(None)` for silent success.
fn run(env: &dyn Fn(&str) -> Option<String>, stdin: &str) -> Result<Option<String>, Failure> {
    let Some(command) = env("CNI_COMMAND") else {
        return Err(Failure::new(
            NEWEST,
            codes::INVALID_ENV,
            "CNI_COMMAND is not set",
            "",
        ));
    };
    if command == "VERSION" {
        return Ok(Some(
            json!({"cniVersion": NEWEST, "supportedVersions": SUPPORTED}).to_string(),
        ));
    }
    let conf: NetConf = serde_json::from_str(stdin).map_err(|e| {
        Failure::new(
            NEWEST,
            codes::DECODE_FAILURE,
            "cannot decode the network config",
            e.to_string(),
        )
    })?;
    let version = match conf.cni_version.as_deref() {
        None => {
            return Err(Failure::new(
                NEWEST,
                codes::INVALID_CONFIG,
                "network config has no cniVersion",
                "",
            ));
        }
        Some(v) if SUPPORTED.contains(&v) => v.to_string(),
        Some(v) => {
            return Err(Failure::new(
                NEWEST,
                codes::INCOMPATIBLE_VERSION,
                format!("incompatible CNI version {v}"),
                format!("weft-cni supports {}", SUPPORTED.join(", ")),
            ));
        }
    };
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(proto::DEFAULT_SOCKET));
    let state_dir = conf
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let timeout = Duration::from_secs(conf.timeout_seconds.unwrap_or(30));
    let fail = |code, msg: String, details: String| Failure::new(&version, code, msg, details);

    let op = match command.as_str() {
        "ADD" | "DEL" | "CHECK" => {
            let args = attachment_args(env, &conf, command != "DEL")
                .map_err(|(c, m)| fail(c, m, String::new()))?;
            match command.as_str() {
                "ADD" => Operation::Add(args),
                "CHECK" => Operation::Check(args),
                _ => Operation::Del(args),
            }
        }
        "GC" => Operation::Gc {
            valid: conf
                .valid_attachments
                .clone()
                .or_else(|| conf.attachments.clone())
                .unwrap_or_default(),
        },
        "STATUS" => Operation::Status,
        other => {
            return Err(fail(
                codes::INVALID_ENV,
                format!("unknown CNI_COMMAND {other}"),
                String::new(),
            ));
        }
    };
    let response = match proto::call(&socket, &Request::new(op.clone()), timeout) {
        Ok(r) => r,
        Err(CallError::AgentDown { socket, source }) => {
            return match op {
                Operation::Del(args) => del_without_agent(&args, &state_dir)
                    .map(|()| None)
                    .map_err(|e| fail(codes::IO_FAILURE, "DEL without agent failed".into(), e)),
                Operation::Status => Err(fail(
                    codes::PLUGIN_NOT_AVAILABLE,
                    "weft agent is not running".into(),
                    format!("no agent at {socket}: {source}"),
                )),
                _ => Err(fail(
                    codes::TRY_AGAIN_LATER,
                    "weft agent is not running".into(),
                    format!("no agent at {socket}: {source}"),
                )),
            };
        }
        Err(e) => {
            return Err(fail(
                codes::TRY_AGAIN_LATER,
                "weft agent did not answer".into(),
                e.to_string(),
            ));
        }
    };
    match response.result {
        Ok(Outcome::Added(result)) => Ok(Some(render_result(&version, result))),
        Ok(Outcome::Done) => Ok(None),
        Err(body) => Err(Failure { version, body }),
    }
}

/// The attachment arguments from the environment and `runtimeConfig`.
fn attachment_args(
    env: &dyn Fn(&str) -> Option<String>,
    conf: &NetConf,
    need_netns: bool,
) -> Result<AttachmentArgs, (u32, String)> {
    let required = |k: &str| env(k).ok_or((codes::INVALID_ENV, format!("{k} is not set")));
    let container_id = required("CNI_CONTAINERID")?;
    let ifname = required("CNI_IFNAME")?;
    let netns = if need_netns {
        required("CNI_NETNS")?
    } else {
        env("CNI_NETNS").unwrap_or_default()
    };
    let mut pod = PodRef::default();
    for pair in env("CNI_ARGS").unwrap_or_default().split(';') {
        match pair.split_once('=') {
            Some(("K8S_POD_NAMESPACE", v)) => pod.namespace = v.to_string(),
            Some(("K8S_POD_NAME", v)) => pod.name = v.to_string(),
            Some(("K8S_POD_UID", v)) => pod.uid = v.to_string(),
            _ => {}
        }
    }
    let mut pinned_ips = Vec::new();
    for s in &conf.runtime_config.ips {
        let addr = s.split('/').next().unwrap_or_default();
        let ip: IpAddr = addr.parse().map_err(|_| {
            (
                codes::INVALID_CONFIG,
                format!("runtimeConfig.ips: {s:?} is not an address"),
            )
        })?;
        pinned_ips.push(ip);
    }
    Ok(AttachmentArgs {
        key: AttachmentKey {
            container_id,
            ifname,
        },
        netns,
        pod,
        pinned_ips,
    })
}

/// DEL with the agent down: delete the host veth here (it is named after the container id)
/// and leave a release record so the agent frees the addresses when it is back.
fn del_without_agent(args: &AttachmentArgs, state_dir: &Path) -> Result<(), String> {
    let name = attach::host_veth_name(&args.key.container_id, &args.key.ifname);
    weft_dataplane::netns::run_here_blocking(|h| async move { attach::detach(&h, &name).await })
        .map_err(|e| format!("netlink: {e}"))?
        .map_err(|e| e.to_string())?;
    write_release_record(state_dir, &args.key)
        .map_err(|e| format!("release record in {}: {e}", state_dir.display()))?;
    Ok(())
}

/// The spec's result JSON in `version` (1.0.0 has no interface MTU).
fn render_result(version: &str, mut result: AddResult) -> String {
    if version == "1.0.0" {
        result.interfaces.iter_mut().for_each(|i| i.mtu = None);
    }
    let mut out = serde_json::to_value(&result).unwrap_or_else(|_| json!({}));
    out["cniVersion"] = Value::String(version.to_string());
    out["dns"] = json!({});
    out.to_string()
}
