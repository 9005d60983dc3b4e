//! The mesh's metrics, rendered in the Prometheus text format (the agent appends them to its
//! `/metrics`). Names follow Weave's where users know them (`weft_mesh_connections{state}`,
//! `..._connection_terminations_total`, `..._relayed_peers`), and `weft_<thing>_<unit>`.
//! Plain atomics and small maps: one update per connection event, never per frame.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Every metric the mesh exports.
#[derive(Debug, Default)]
pub struct MeshMetrics {
    /// Connections in the handshake.
    pub handshaking: AtomicU64,
    /// Established connections.
    pub established: AtomicU64,
    /// Ends of established connections, by reason.
    pub terminations: Mutex<BTreeMap<&'static str, u64>>,
    /// Handshakes that failed, by reason (a wrong cluster secret is `cluster_secret_mismatch`).
    pub handshake_failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Peers disconnected for breaking the protocol, by violation.
    pub protocol_violations: Mutex<BTreeMap<&'static str, u64>>,
    /// Inbound handshakes and dials refused by the rate limiter.
    pub rate_limited: AtomicU64,
    /// Completed handshakes.
    pub handshakes: AtomicU64,
    /// Sum of handshake durations, microseconds.
    pub handshake_micros: AtomicU64,
    /// Completed rekeys.
    pub rekeys: AtomicU64,
    /// Peers currently reached through a relay.
    pub relayed_peers: AtomicU64,
}

fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str) {
    *map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default() += 1;
}

fn get(map: &Mutex<BTreeMap<&'static str, u64>>, key: &str) -> u64 {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(key)
        .copied()
        .unwrap_or(0)
}

fn render_map(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    map: &Mutex<BTreeMap<&'static str, u64>>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (k, v) in map.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
    }
}

impl MeshMetrics {
    /// Counts an ended established connection.
    pub fn terminated(&self, reason: &'static str) {
        bump(&self.terminations, reason);
    }

    /// Counts a failed handshake.
    pub fn handshake_failed(&self, reason: &'static str) {
        bump(&self.handshake_failures, reason);
    }

    /// Counts a protocol violation.
    pub fn violation(&self, what: &'static str) {
        bump(&self.protocol_violations, what);
    }

    /// Records a completed handshake.
    pub fn handshake_done(&self, took: Duration) {
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        self.handshake_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Terminations with `reason` so far.
    pub fn terminations_of(&self, reason: &str) -> u64 {
        get(&self.terminations, reason)
    }

    /// Handshake failures with `reason` so far.
    pub fn handshake_failures_of(&self, reason: &str) -> u64 {
        get(&self.handshake_failures, reason)
    }

    /// Violations of kind `what` so far.
    pub fn violations_of(&self, what: &str) -> u64 {
        get(&self.protocol_violations, what)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP weft_mesh_connections Control connections to peers, by state.\n\
             # TYPE weft_mesh_connections gauge\n\
             weft_mesh_connections{{state=\"handshaking\"}} {}\n\
             weft_mesh_connections{{state=\"established\"}} {}",
            g(&self.handshaking),
            g(&self.established)
        );
        render_map(
            &mut out,
            "weft_mesh_connection_terminations_total",
            "Established control connections that ended, by reason.",
            "reason",
            &self.terminations,
        );
        render_map(
            &mut out,
            "weft_mesh_handshake_failures_total",
            "Control handshakes that failed, by reason.",
            "reason",
            &self.handshake_failures,
        );
        render_map(
            &mut out,
            "weft_mesh_protocol_violations_total",
            "Peers disconnected for breaking the control protocol, by violation.",
            "violation",
            &self.protocol_violations,
        );
        let count = g(&self.handshakes);
        let _ = writeln!(
            out,
            "# HELP weft_mesh_handshake_rate_limited_total Handshakes and dials refused by the per-peer rate limit.\n\
             # TYPE weft_mesh_handshake_rate_limited_total counter\n\
             weft_mesh_handshake_rate_limited_total {}\n\
             # HELP weft_mesh_handshake_duration_seconds Time from the first hello to an established connection.\n\
             # TYPE weft_mesh_handshake_duration_seconds summary\n\
             weft_mesh_handshake_duration_seconds_sum {}\n\
             weft_mesh_handshake_duration_seconds_count {count}\n\
             # HELP weft_mesh_rekeys_total Session rekeys completed.\n\
             # TYPE weft_mesh_rekeys_total counter\n\
             weft_mesh_rekeys_total {}\n\
             # HELP weft_mesh_relayed_peers Peers currently reached through another node.\n\
             # TYPE weft_mesh_relayed_peers gauge\n\
             weft_mesh_relayed_peers {}",
            g(&self.rate_limited),
            g(&self.handshake_micros) as f64 / 1e6,
            g(&self.rekeys),
            g(&self.relayed_peers),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text_with_the_weave_style_names() {
        let m = MeshMetrics::default();
        m.established.store(2, Ordering::Relaxed);
        m.terminated("bad_mac");
        m.terminated("peer_closed");
        m.handshake_failed("cluster_secret_mismatch");
        m.violation("oversize");
        m.relayed_peers.store(1, Ordering::Relaxed);
        m.handshake_done(Duration::from_millis(3));
        let text = m.render();
        for line in [
            "weft_mesh_connections{state=\"established\"} 2",
            "weft_mesh_connections{state=\"handshaking\"} 0",
            "weft_mesh_connection_terminations_total{reason=\"bad_mac\"} 1",
            "weft_mesh_connection_terminations_total{reason=\"peer_closed\"} 1",
            "weft_mesh_handshake_failures_total{reason=\"cluster_secret_mismatch\"} 1",
            "weft_mesh_protocol_violations_total{violation=\"oversize\"} 1",
            "weft_mesh_relayed_peers 1",
            "weft_mesh_handshake_duration_seconds_count 1",
            "weft_mesh_handshake_duration_seconds_sum 0.003",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = l.rsplit_once(' ').expect("name value");
            assert!(name.starts_with("weft_mesh_"), "{l}");
            value.parse::<f64>().expect("numeric value");
        }
    }
}
