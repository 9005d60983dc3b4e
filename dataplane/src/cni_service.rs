//! The agent side of the CNI: what the agent does with one plugin request.
//!
//! ADD: IPAM allocate (idempotent per container id + interface) → attach (or, when the
//! attachment is already whole, answer with it untouched) → wait until the policy engine has
//! the pod's addresses in the kernel ([`PolicyGate`]) → result. If the gate does not open in
//! time, ADD fails with CNI code 11 (try again later): a pod never runs unprotected, and
//! never waits forever. The runtime then DELs and retries.
//! DEL: release + detach, both idempotent. CHECK: the allocation exists and the kernel still
//! has every link, address, route and neighbour ADD made. GC: release and detach everything
//! not in `cni.dev/valid-attachments`, and delete `weft…` links nobody owns. STATUS: IPAM is
//! readable.
//!
//! Release records: a DEL while the agent is down is done by the plugin (it deletes the host
//! veth) and leaves a record in [`release_record_dir`]; the agent releases those addresses
//! when it starts and again before serving each request ([`CniService::drain_release_records`]).

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::attach::{self, AttachSpec};
use crate::ipam::{Ipam, IpamError};
use crate::proto::{
    AttachmentArgs, AttachmentKey, ErrorBody, Operation, Outcome, PodRef, Request, Response, codes,
};

/// The agent's answer to "is this pod's policy in the kernel yet?".
pub trait PolicyGate: Send + Sync {
    /// Return when the pod with these addresses is in the right sets and dispatch maps, or
    /// an explanation once `timeout` has passed.
    fn wait_programmed(
        &self,
        pod: &PodRef,
        ips: &[IpAddr],
        timeout: Duration,
    ) -> Result<(), String>;
}

/// Where the weft state lives by default (IPAM is in `ipam/` below it).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/weft";

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The state directory (release records in `cni-release/` below it).
    pub state_dir: PathBuf,
    /// MTU of pod interfaces (the overlay's).
    pub mtu: u32,
    /// Longest wait for the policy gate before ADD fails with "try again later".
    pub policy_timeout: Duration,
    /// GC leaves allocations younger than this alone (an ADD racing the runtime's list).
    pub gc_grace: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            mtu: attach::DEFAULT_MTU,
            policy_timeout: Duration::from_secs(10),
            gc_grace: Duration::from_secs(30),
        }
    }
}

/// The directory of release records under a state dir.
pub fn release_record_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cni-release")
}

/// Leave a release record for `key` (the plugin, on DEL with the agent down). Atomic: a
/// record is either whole or absent.
pub fn write_release_record(state_dir: &Path, key: &AttachmentKey) -> std::io::Result<PathBuf> {
    let dir = release_record_dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    let safe: String = format!("{}_{}", key.container_id, key.ifname)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '%'
            }
        })
        .collect();
    let path = dir.join(format!("{safe}.json"));
    let tmp = dir.join(format!(".{safe}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(key).map_err(std::io::Error::other)?,
    )?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The agent's CNI handler.
pub struct CniService {
    ipam: Ipam,
    gate: Arc<dyn PolicyGate>,
    config: ServiceConfig,
    host: rtnetlink::Handle,
}

impl std::fmt::Debug for CniService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CniService")
            .field("ipam", &self.ipam)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn ipam_error(e: IpamError) -> ErrorBody {
    let code = match &e {
        IpamError::Exhausted { cooling, .. } if *cooling > 0 => codes::TRY_AGAIN_LATER,
        IpamError::Exhausted { .. } => codes::IPAM_EXHAUSTED,
        IpamError::PinnedRefused { .. } => codes::IPAM_CONFLICT,
        IpamError::PodCidrChanged { .. } => codes::PODCIDR_CHANGED,
        IpamError::InvalidCidr { .. } => codes::INVALID_CONFIG,
        IpamError::Io { .. } | IpamError::Corrupt { .. } => codes::IO_FAILURE,
    };
    let msg = match code {
        codes::TRY_AGAIN_LATER | codes::IPAM_EXHAUSTED => "no free pod address",
        codes::IPAM_CONFLICT => "pinned address refused",
        codes::PODCIDR_CHANGED => "node podCIDR changed",
        _ => "IPAM failure",
    };
    ErrorBody::new(code, msg, e.to_string())
}

fn dataplane_error(what: &str, e: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(codes::DATAPLANE, what, e.to_string())
}

impl CniService {
    /// A service over the node's IPAM, acting on links through `host` (a handle in the
    /// node's namespace).
    pub fn new(
        ipam: Ipam,
        gate: Arc<dyn PolicyGate>,
        config: ServiceConfig,
        host: rtnetlink::Handle,
    ) -> Self {
        CniService {
            ipam,
            gate,
            config,
            host,
        }
    }

    /// Answer one request (the version it came in is the version of the answer).
    pub async fn handle(&self, request: Request) -> Response {
        let version = request.version;
        self.drain_release_records().await;
        let result = match request.op {
            Operation::Add(args) => self.add(args).await,
            Operation::Del(args) => self.del(args).await,
            Operation::Check(args) => self.check(args).await,
            Operation::Gc { valid } => self.gc(valid).await,
            Operation::Status => self.status(),
        };
        let result = match result {
            // Version 1 results had no MTU.
            Ok(Outcome::Added(mut r)) if version < 2 => {
                r.interfaces.iter_mut().for_each(|i| i.mtu = None);
                Ok(Outcome::Added(r))
            }
            other => other,
        };
        if let Err(e) = &result {
            tracing::warn!(code = e.code, msg = %e.msg, details = %e.details, "CNI request failed");
        }
        Response { version, result }
    }

    fn spec(&self, args: &AttachmentArgs, ips: Vec<IpAddr>) -> AttachSpec {
        AttachSpec {
            container_id: args.key.container_id.clone(),
            ifname: args.key.ifname.clone(),
            netns: PathBuf::from(&args.netns),
            ips,
            mtu: self.config.mtu,
        }
    }

    fn validate(args: &AttachmentArgs, need_netns: bool) -> Result<(), ErrorBody> {
        if args.key.container_id.is_empty() || args.key.ifname.is_empty() {
            return Err(ErrorBody::new(
                codes::INVALID_ENV,
                "CNI_CONTAINERID and CNI_IFNAME are required",
                "",
            ));
        }
        if need_netns && args.netns.is_empty() {
            return Err(ErrorBody::new(
                codes::INVALID_ENV,
                "CNI_NETNS is required",
                "",
            ));
        }
        Ok(())
    }

    async fn add(&self, args: AttachmentArgs) -> Result<Outcome, ErrorBody> {
        Self::validate(&args, true)?;
        if !Path::new(&args.netns).exists() {
            return Err(ErrorBody::new(
                codes::UNKNOWN_CONTAINER,
                "pod network namespace does not exist",
                args.netns.clone(),
            ));
        }
        let host_name = attach::host_veth_name(&args.key.container_id, &args.key.ifname);
        let all = self.ipam.list().map_err(ipam_error)?;
        let existed = all.iter().any(|a| a.key == args.key);
        // 32 hash bits name the host veth: a clash with another live attachment is refused
        // rather than "repaired" by deleting the other pod's link.
        if let Some(other) = all.iter().find(|a| {
            a.key != args.key
                && attach::host_veth_name(&a.key.container_id, &a.key.ifname) == host_name
        }) {
            return Err(ErrorBody::new(
                codes::DATAPLANE,
                format!("host interface name {host_name} is taken"),
                format!("{} and {} hash to the same name", args.key, other.key),
            ));
        }
        let allocation = self
            .ipam
            .allocate(&args.key, &args.pod, &args.pinned_ips)
            .map_err(ipam_error)?;
        let spec = self.spec(&args, allocation.ips.clone());
        // Only a repeated ADD can find a whole attachment; a first one goes straight to
        // attach (which clears leftovers of an earlier failed try itself).
        let whole = if existed {
            attach::inspect(&self.host, &spec)
                .await
                .map_err(|e| dataplane_error("inspect attachment", e))?
                .attachment
        } else {
            None
        };
        let attachment = match whole {
            Some(whole) => whole,
            None => attach::attach(&self.host, &spec)
                .await
                .map_err(|e| dataplane_error("attach pod", e))?,
        };
        let gate = self.gate.clone();
        let pod = args.pod.clone();
        let ips = allocation.ips.clone();
        let timeout = self.config.policy_timeout;
        let gate_result =
            tokio::task::spawn_blocking(move || gate.wait_programmed(&pod, &ips, timeout))
                .await
                .unwrap_or_else(|e| Err(format!("policy gate panicked: {e}")));
        if let Err(why) = gate_result {
            return Err(ErrorBody::new(
                codes::TRY_AGAIN_LATER,
                format!("policy for pod {} not in place in time", args.pod),
                format!("waited {:?}: {why}", timeout),
            ));
        }
        Ok(Outcome::Added(attachment.to_result()))
    }

    async fn del(&self, args: AttachmentArgs) -> Result<Outcome, ErrorBody> {
        Self::validate(&args, false)?;
        self.ipam.release(&args.key).map_err(ipam_error)?;
        let name = attach::host_veth_name(&args.key.container_id, &args.key.ifname);
        attach::detach(&self.host, &name)
            .await
            .map_err(|e| dataplane_error("detach pod", e))?;
        Ok(Outcome::Done)
    }

    async fn check(&self, args: AttachmentArgs) -> Result<Outcome, ErrorBody> {
        Self::validate(&args, true)?;
        let Some(allocation) = self.ipam.get(&args.key).map_err(ipam_error)? else {
            return Err(ErrorBody::new(
                codes::UNKNOWN_CONTAINER,
                format!("no weft attachment for {}", args.key),
                "",
            ));
        };
        let problems = attach::check(&self.host, &self.spec(&args, allocation.ips))
            .await
            .map_err(|e| dataplane_error("check attachment", e))?;
        if problems.is_empty() {
            Ok(Outcome::Done)
        } else {
            Err(ErrorBody::new(
                codes::CHECK_FAILED,
                format!("attachment {} is not as ADD left it", args.key),
                problems.join("; "),
            ))
        }
    }

    async fn gc(&self, valid: Vec<AttachmentKey>) -> Result<Outcome, ErrorBody> {
        let valid: HashSet<AttachmentKey> = valid.into_iter().collect();
        let gone = self
            .ipam
            .gc(&valid, self.config.gc_grace)
            .map_err(ipam_error)?;
        let mut errors = Vec::new();
        for a in &gone {
            let name = attach::host_veth_name(&a.key.container_id, &a.key.ifname);
            if let Err(e) = attach::detach(&self.host, &name).await {
                errors.push(e.to_string());
            }
        }
        // Host veths nobody owns any more (a crash between attach and allocation record
        // cannot happen — allocation comes first — but a lost DEL can leave one).
        let owned: HashSet<String> = self
            .ipam
            .list()
            .map_err(ipam_error)?
            .iter()
            .map(|a| attach::host_veth_name(&a.key.container_id, &a.key.ifname))
            .chain(
                valid
                    .iter()
                    .map(|k| attach::host_veth_name(&k.container_id, &k.ifname)),
            )
            .collect();
        let links = attach::list_host_veths(&self.host)
            .await
            .map_err(|e| dataplane_error("list host veths", e))?;
        for name in links.into_iter().filter(|n| !owned.contains(n)) {
            if let Err(e) = attach::detach(&self.host, &name).await {
                errors.push(e.to_string());
            }
        }
        tracing::info!(released = gone.len(), "CNI GC");
        if errors.is_empty() {
            Ok(Outcome::Done)
        } else {
            Err(ErrorBody::new(
                codes::DATAPLANE,
                "GC left some links",
                errors.join("; "),
            ))
        }
    }

    fn status(&self) -> Result<Outcome, ErrorBody> {
        self.ipam.list().map(|_| Outcome::Done).map_err(|e| {
            ErrorBody::new(
                codes::PLUGIN_NOT_AVAILABLE,
                "IPAM not usable",
                e.to_string(),
            )
        })
    }

    /// API-based cleanup for the agent: release and detach the attachments of pods whose UID
    /// the API server no longer has, once they are at least `min_age` old (DESIGN §4: never
    /// racing a fresh ADD). Returns how many went.
    pub async fn release_deleted_pods(
        &self,
        live_uids: &HashSet<String>,
        min_age: Duration,
    ) -> Result<usize, ErrorBody> {
        let gone = self
            .ipam
            .release_deleted_pods(live_uids, min_age)
            .map_err(ipam_error)?;
        for a in &gone {
            let name = attach::host_veth_name(&a.key.container_id, &a.key.ifname);
            if let Err(e) = attach::detach(&self.host, &name).await {
                tracing::warn!(key = %a.key, error = %e, "cleanup of a deleted pod left its link");
            }
        }
        Ok(gone.len())
    }

    /// Release the addresses of DELs the plugin did alone (agent down), and the host veths
    /// if still there. Returns how many records were processed.
    pub async fn drain_release_records(&self) -> usize {
        let dir = release_record_dir(&self.config.state_dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return 0;
        };
        let mut done = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let key: AttachmentKey = match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(k) => k,
                None => {
                    tracing::warn!(path = %path.display(), "unreadable release record removed");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            if let Err(e) = self.ipam.release(&key) {
                tracing::warn!(%key, error = %e, "release record kept for later");
                continue;
            }
            let name = attach::host_veth_name(&key.container_id, &key.ifname);
            let _ = attach::detach(&self.host, &name).await;
            let _ = std::fs::remove_file(&path);
            done += 1;
        }
        done
    }
}
