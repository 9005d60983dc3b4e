//! The agent's metrics, rendered in the Prometheus text format on `/metrics`.
//!
//! Plain atomics and a few small maps behind a mutex: no metrics crate, nothing on a hot path
//! (one update per watch event, per reconcile, per restart). Every name is `weft_<thing>_<unit>`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A histogram with fixed buckets (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Buckets for durations from 100 µs to 30 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

impl Histogram {
    /// An empty histogram over `bounds` (ascending upper bounds, seconds).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in self.bounds.iter().enumerate() {
            if secs <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.bounds.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    /// Watch restarts by (kind, reason).
    pub watch_restarts: Mutex<BTreeMap<(String, String), u64>>,
    /// Watch stream errors by kind.
    pub watch_errors: Mutex<BTreeMap<String, u64>>,
    /// Relists forced by 410 Gone, by kind.
    pub watch_relists: Mutex<BTreeMap<String, u64>>,
    /// Seconds since the last event or bookmark, by kind (filled at render time).
    pub watch_last_event_age: Mutex<BTreeMap<String, f64>>,
    /// Duration of each reconcile (engine + kernel transaction).
    pub reconcile_duration: Histogram,
    /// Reconciles whose transaction failed.
    pub reconcile_errors: AtomicU64,
    /// Panics caught in reconcile.
    pub reconcile_panics: AtomicU64,
    /// Objects refused or partly dropped (fail closed), counted per occurrence.
    pub policy_errors: AtomicU64,
    /// nftables ops sent to the kernel.
    pub nft_ops: AtomicU64,
    /// From receiving a watch event to the kernel acknowledging its effect.
    pub policy_realization: Histogram,
    /// 1 when ready.
    pub ready: AtomicU64,
    /// Drift between the kernel and the desired table repaired by a diff.
    pub drift_repairs: AtomicU64,
    /// Conntrack entries strict mode deleted (flows a tightened policy no longer admits).
    pub conntrack_flows_cut: AtomicU64,
    /// Strict-mode passes that failed (those flows keep going until a pass succeeds).
    pub conntrack_pass_failures: AtomicU64,
    /// Denied new connections the drop log received.
    pub drops_logged: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            watch_restarts: Mutex::default(),
            watch_errors: Mutex::default(),
            watch_relists: Mutex::default(),
            watch_last_event_age: Mutex::default(),
            reconcile_duration: Histogram::new(DURATION_BUCKETS),
            reconcile_errors: AtomicU64::new(0),
            reconcile_panics: AtomicU64::new(0),
            policy_errors: AtomicU64::new(0),
            nft_ops: AtomicU64::new(0),
            policy_realization: Histogram::new(DURATION_BUCKETS),
            ready: AtomicU64::new(0),
            drift_repairs: AtomicU64::new(0),
            conntrack_flows_cut: AtomicU64::new(0),
            conntrack_pass_failures: AtomicU64::new(0),
            drops_logged: AtomicU64::new(0),
        }
    }
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    *m.entry(key.to_string()).or_default() += 1;
}

impl Metrics {
    /// Counts a watch restart.
    pub fn watch_restarted(&self, kind: &str, reason: &str) {
        let mut m = self
            .watch_restarts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *m.entry((kind.to_string(), reason.to_string())).or_default() += 1;
    }

    /// Counts a watch stream error.
    pub fn watch_error(&self, kind: &str) {
        bump(&self.watch_errors, kind);
    }

    /// Counts a relist after 410 Gone.
    pub fn watch_relisted(&self, kind: &str) {
        bump(&self.watch_relists, kind);
    }

    /// Total restarts of one kind (all reasons), for tests and status.
    pub fn restarts_of(&self, kind: &str) -> u64 {
        let m = self
            .watch_restarts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter(|((k, _), _)| k == kind)
            .map(|(_, v)| v)
            .sum()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP weft_watch_restarts_total Watch restarts by the supervisor.\n# TYPE weft_watch_restarts_total counter"
        );
        for ((kind, reason), v) in self
            .watch_restarts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "weft_watch_restarts_total{{kind=\"{kind}\",reason=\"{reason}\"}} {v}"
            );
        }
        for (name, help, map) in [
            (
                "weft_watch_errors_total",
                "Errors seen on watch streams.",
                &self.watch_errors,
            ),
            (
                "weft_watch_relists_total",
                "Relists forced by 410 Gone.",
                &self.watch_relists,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (kind, v) in map.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP weft_watch_last_event_age_seconds Seconds since the last event or bookmark.\n# TYPE weft_watch_last_event_age_seconds gauge"
        );
        for (kind, v) in self
            .watch_last_event_age
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "weft_watch_last_event_age_seconds{{kind=\"{kind}\"}} {v:.3}"
            );
        }
        self.reconcile_duration.render(
            &mut out,
            "weft_reconcile_duration_seconds",
            "Engine update plus kernel transaction.",
        );
        self.policy_realization.render(
            &mut out,
            "weft_policy_realization_seconds",
            "Watch event received to kernel acknowledged.",
        );
        for (name, help, kind, v) in [
            (
                "weft_reconcile_errors_total",
                "Reconciles whose transaction failed.",
                "counter",
                load(&self.reconcile_errors),
            ),
            (
                "weft_reconcile_panics_total",
                "Panics caught in reconcile.",
                "counter",
                load(&self.reconcile_panics),
            ),
            (
                "weft_policy_errors_total",
                "Policy entries refused or dropped (fail closed).",
                "counter",
                load(&self.policy_errors),
            ),
            (
                "weft_nft_ops_total",
                "nftables operations sent to the kernel.",
                "counter",
                load(&self.nft_ops),
            ),
            (
                "weft_ready",
                "1 when the agent is ready.",
                "gauge",
                load(&self.ready),
            ),
            (
                "weft_ruleset_drift_repairs_total",
                "Drift of the kernel's table repaired by a diff.",
                "counter",
                load(&self.drift_repairs),
            ),
            (
                "weft_conntrack_flows_cut_total",
                "Conntrack entries strict mode deleted because the policies no longer admit them.",
                "counter",
                load(&self.conntrack_flows_cut),
            ),
            (
                "weft_conntrack_strict_pass_failures_total",
                "Strict-mode passes that failed (the flows keep going until a later pass).",
                "counter",
                load(&self.conntrack_pass_failures),
            ),
            (
                "weft_drops_logged_total",
                "Denied new connections received from the drop log (rate-limited per group chain).",
                "counter",
                load(&self.drops_logged),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_names_every_metric_with_its_labels() {
        let m = Metrics::default();
        m.watch_restarted("pods", "stall");
        m.watch_restarted("pods", "stall");
        m.watch_error("nodes");
        m.reconcile_duration.observe(Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains("weft_watch_restarts_total{kind=\"pods\",reason=\"stall\"} 2"));
        assert!(text.contains("weft_watch_errors_total{kind=\"nodes\"} 1"));
        assert!(text.contains("weft_reconcile_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("weft_reconcile_duration_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("weft_reconcile_duration_seconds_count 1"));
        assert_eq!(m.restarts_of("pods"), 2);
        assert!(text.contains("weft_ruleset_drift_repairs_total 0"));
    }
}
