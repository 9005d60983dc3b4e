//! Waiting until the dataplane has a change: every agent's `/debug/state` (GET over its unix
//! socket) reports, per watched kind, the last resourceVersion whose effects are in its
//! kernel; kube-proxy's nftables tables show a Service's ClusterIP and its endpoints.
//!
//! The realization figure of issue 7 comes from here: for every API write of a kind the agents
//! watch, the time from the write's answer to the poll that first saw every agent report a
//! resourceVersion at least the write's.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::bringup::read_response;

/// A kind the agents watch (the names of `/debug/state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Pods.
    Pods,
    /// Namespaces.
    Namespaces,
    /// NetworkPolicies.
    Policies,
}

impl Kind {
    /// The key in `/debug/state`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::Policies => "networkpolicies",
        }
    }
}

/// One API write not yet seen applied everywhere.
#[derive(Clone, Debug)]
pub struct PendingWrite {
    /// Its kind.
    pub kind: Kind,
    /// The resourceVersion the API answered with.
    pub rv: u64,
    /// When the answer came.
    pub at: Instant,
}

/// Realization samples.
#[derive(Clone, Debug, Default)]
pub struct Realization {
    samples: BTreeMap<Kind, Vec<Duration>>,
}

impl Realization {
    /// Records one.
    pub fn add(&mut self, kind: Kind, d: Duration) {
        self.samples.entry(kind).or_default().push(d);
    }

    /// p50 and p99 of all samples, and their count.
    pub fn percentiles(&self) -> Option<(Duration, Duration, usize)> {
        let all: Vec<Duration> = self.samples.values().flatten().copied().collect();
        percentiles(all)
    }

    /// The figure as printed at the end of a run.
    pub fn summary(&self) -> String {
        let Some((p50, p99, n)) = self.percentiles() else {
            return "realization (API write -> every agent applied): no samples".into();
        };
        let mut text = format!(
            "realization (API write -> every agent applied): p50 {} ms, p99 {} ms over {n} writes",
            p50.as_millis(),
            p99.as_millis()
        );
        let parts: Vec<String> = self
            .samples
            .iter()
            .filter_map(|(k, v)| {
                percentiles(v.clone()).map(|(p50, p99, n)| {
                    format!(
                        "{} p50 {} ms p99 {} ms (n={n})",
                        k.name(),
                        p50.as_millis(),
                        p99.as_millis()
                    )
                })
            })
            .collect();
        if !parts.is_empty() {
            text.push_str(&format!(" [{}]", parts.join("; ")));
        }
        text
    }
}

fn percentiles(mut v: Vec<Duration>) -> Option<(Duration, Duration, usize)> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let at = |q: f64| {
        let i = ((v.len() as f64) * q).ceil() as usize;
        v[i.clamp(1, v.len()) - 1]
    };
    Some((at(0.50), at(0.99), v.len()))
}

/// Watches the agents in the background: every 5 ms while a write is pending, it asks every
/// agent for its applied resourceVersions and files each write that all of them cover, with
/// the time from the write to that poll.
pub struct Realizer {
    state: Arc<Mutex<RealizerState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct RealizerState {
    pending: Vec<PendingWrite>,
    realization: Realization,
    last: Vec<BTreeMap<String, u64>>,
    error: Option<String>,
}

impl Realizer {
    /// Starts polling these agent sockets.
    pub fn start(sockets: Vec<PathBuf>) -> Realizer {
        let state = Arc::new(Mutex::new(RealizerState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("realizer".into())
            .spawn(move || poll_agents(&sockets, &st, &sp))
            .ok();
        Realizer {
            state,
            stop,
            thread,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RealizerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An API write of `kind` answered now with `rv`.
    pub fn wrote(&self, kind: Kind, rv: u64) {
        self.lock().pending.push(PendingWrite {
            kind,
            rv,
            at: Instant::now(),
        });
    }

    /// Forgets the pending writes (untimed).
    pub fn forget_pending(&self) {
        self.lock().pending.clear();
    }

    /// Waits until no write is pending.
    pub fn wait(&self, timeout: Duration, interrupted: &dyn Fn() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let st = self.lock();
                if st.pending.is_empty() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    let w = &st.pending[0];
                    let seen: Vec<String> = st
                        .last
                        .iter()
                        .map(|s| s.get(w.kind.name()).copied().unwrap_or(0).to_string())
                        .collect();
                    let detail = format!(
                        "{} writes not applied by every agent after {} s, e.g. {} at resourceVersion {} (agents report {}){}",
                        st.pending.len(),
                        timeout.as_secs(),
                        w.kind.name(),
                        w.rv,
                        seen.join(", "),
                        st.error
                            .as_ref()
                            .map(|e| format!("; last error: {e}"))
                            .unwrap_or_default()
                    );
                    drop(st);
                    self.forget_pending();
                    return Err(detail);
                }
            }
            if interrupted() {
                return Err("interrupted".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The samples so far.
    pub fn realization(&self) -> Realization {
        self.lock().realization.clone()
    }
}

impl Drop for Realizer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn poll_agents(sockets: &[PathBuf], state: &Mutex<RealizerState>, stop: &AtomicBool) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(5));
        if lock().pending.is_empty() {
            continue;
        }
        let mut states = Vec::with_capacity(sockets.len());
        let mut error = None;
        for s in sockets {
            match agent_state(s) {
                Ok(st) => states.push(st),
                Err(e) => error = Some(e),
            }
        }
        let now = Instant::now();
        let mut st = lock();
        st.error = error;
        if st.error.is_none() {
            let pending = std::mem::take(&mut st.pending);
            for w in pending {
                if states
                    .iter()
                    .all(|s| s.get(w.kind.name()).is_some_and(|rv| *rv >= w.rv))
                {
                    st.realization.add(w.kind, now - w.at);
                } else {
                    st.pending.push(w);
                }
            }
        }
        st.last = states;
    }
}

/// Per kind, the applied resourceVersion an agent reports.
pub fn agent_state(socket: &Path) -> Result<BTreeMap<String, u64>, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET /debug/state HTTP/1.0\r\nHost: agent\r\n\r\n").map_err(|e| e.to_string())?;
    let (status, body) = read_response(&mut s).map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("/debug/state: HTTP {status}"));
    }
    parse_state(&body)
}

/// The `kinds.<kind>.applied_resource_version` of a `/debug/state` answer.
pub fn parse_state(body: &str) -> Result<BTreeMap<String, u64>, String> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("/debug/state: {e}"))?;
    let kinds = v
        .get("kinds")
        .and_then(|k| k.as_object())
        .ok_or("/debug/state: no kinds")?;
    Ok(kinds
        .iter()
        .map(|(k, v)| {
            let rv = match v.get("applied_resource_version") {
                Some(serde_json::Value::String(s)) => s.parse().unwrap_or(0),
                Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(0),
                _ => 0,
            };
            (k.clone(), rv)
        })
        .collect())
}

/// What kube-proxy must show for one Service port: its ClusterIP in `service-ips`, and the
/// endpoint chain of the pod's address.
#[derive(Clone, Debug)]
pub struct ServicePort {
    /// `ip` or `ip6`.
    pub table: &'static str,
    /// The ClusterIP.
    pub cluster_ip: std::net::IpAddr,
    /// `tcp`, `udp`, `sctp`.
    pub proto: &'static str,
    /// The port.
    pub port: u16,
    /// `ns/service/proto/portname`.
    pub id: String,
    /// The endpoint (the pod's address of the family).
    pub endpoint: std::net::IpAddr,
}

impl ServicePort {
    /// In kube-proxy 1.37's table: the `service-ips` element (present only while the
    /// Service has endpoints) and the DNAT to the pod's address.
    fn in_table(&self, text: &str) -> bool {
        let element = format!(
            "{} . {} . {} : goto service-",
            self.cluster_ip, self.proto, self.port
        );
        let dnat = match self.endpoint {
            std::net::IpAddr::V4(a) => format!("dnat to {a}:{}", self.port),
            std::net::IpAddr::V6(a) => format!("dnat to [{a}]:{}", self.port),
        };
        text.lines()
            .any(|l| l.contains(&element) && l.contains(&format!("-{}", self.id)))
            && text.contains(&dnat)
    }
}

/// The text of kube-proxy's table of one family in a node namespace.
pub fn kube_proxy_table(node_ns: &str, table: &str) -> String {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            node_ns,
            "nft",
            "list",
            "table",
            table,
            "kube-proxy",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The Service ports that node's kube-proxy does not show yet.
pub fn missing_in_kube_proxy<'a>(node_ns: &str, ports: &'a [ServicePort]) -> Vec<&'a ServicePort> {
    let mut tables = BTreeMap::new();
    ports
        .iter()
        .filter(|p| {
            let text = tables
                .entry(p.table)
                .or_insert_with(|| kube_proxy_table(node_ns, p.table));
            !p.in_table(text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            percentiles(ms(&[5, 1, 3, 2, 4])),
            Some((Duration::from_millis(3), Duration::from_millis(5), 5))
        );
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(
            percentiles(ms(&hundred)),
            Some((Duration::from_millis(50), Duration::from_millis(99), 100))
        );
        assert_eq!(percentiles(Vec::new()), None);
    }

    #[test]
    fn kube_proxy_tables_are_read_as_1_37_writes_them() {
        let text = "\tmap service-ips {\n\t\telements = { 10.96.75.11 . tcp . 80 : goto service-MT2AMXPU-y/s-y-b/tcp/p80-tcp,\n\t\t\t     10.96.103.14 . tcp . 80 : goto service-4L4DRMIH-x/s-x-a/tcp/p80-tcp }\n\t}\n\tchain service-4L4DRMIH-x/s-x-a/tcp/p80-tcp {\n\t\tmeta l4proto tcp dnat to 10.244.129.2:80\n\t}\n";
        let port = |cluster_ip: &str, id: &str, endpoint: &str| ServicePort {
            table: "ip",
            cluster_ip: cluster_ip.parse().expect("ip"),
            proto: "tcp",
            port: 80,
            id: id.into(),
            endpoint: endpoint.parse().expect("ip"),
        };
        assert!(port("10.96.103.14", "x/s-x-a/tcp/p80-tcp", "10.244.129.2").in_table(text));
        assert!(!port("10.96.103.15", "x/s-x-a/tcp/p80-tcp", "10.244.129.2").in_table(text));
        assert!(!port("10.96.103.14", "x/s-x-a/tcp/p80-tcp", "10.244.129.3").in_table(text));
        assert!(!port("10.96.103.14", "x/s-x-b/tcp/p80-tcp", "10.244.129.2").in_table(text));
        let v6 = "elements = { fd00:10:96::a . udp . 81 : goto service-AB-x/s-x-a/udp/p81-udp }\nmeta l4proto udp dnat to [fd00:10:244:81::2]:81";
        let mut p6 = port("fd00:10:96::a", "x/s-x-a/udp/p81-udp", "fd00:10:244:81::2");
        (p6.table, p6.proto, p6.port) = ("ip6", "udp", 81);
        assert!(p6.in_table(v6));
    }

    #[test]
    fn debug_state_gives_applied_versions() {
        let body = r#"{"node":"n","ready":true,"kinds":{"pods":{"applied_resource_version":"1234","listed":true},"networkpolicies":{"applied_resource_version":"","listed":false}},"table":{}}"#;
        let state = parse_state(body).expect("valid");
        assert_eq!(state.get("pods"), Some(&1234));
        assert_eq!(state.get("networkpolicies"), Some(&0));
    }
}
