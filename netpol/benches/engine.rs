//! Engine benchmark (issue 3): cost of one change on a large synthetic cluster.
//!
//! Builds the seeded cluster of [`GenParams::benchmark`] (10,000 pods, 2,000 policies, 500
//! namespaces, 110 pods on the node under test), then measures, each change on its own:
//! cold compile; one pod relabel (remote peer, and local pod); one pod added; one policy added;
//! one namespace relabel. For each: median and p99 over many iterations, and the ops the
//! change produces. Baseline, in the same run: what a full-sync controller does for the same
//! relabel (compile everything again and diff whole tables).
//!
//! `WEFT_BENCH_SIZE=small` runs a tenth of the cluster (CI); the default is the full size.
//! Figures go to `BENCHMARKS.md` by hand; `WEFT_BENCH_JSON=path` also writes them as JSON.
//! After the table, criterion measures cold compile and the remote relabel once more.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use weft_netpol::compile::compile;
use weft_netpol::diff::{Op, diff, op_summary};
use weft_netpol::engine::{Change, Engine};
use weft_netpol::model::{Cluster, ObjectKey, Pod};
use weft_netpol::synth::{self, GenParams, Rng};

const NODE: &str = "node-0";
const TABLE: &str = "weft";

struct Figures {
    name: &'static str,
    median: Duration,
    p99: Duration,
    ops: usize,
    elements: usize,
    other_ops: usize,
    iterations: usize,
}

fn percentile(sorted: &[Duration], pct: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * pct).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Times `iterations` runs of `step`, which returns the ops of the change it made.
fn measure(
    name: &'static str,
    iterations: usize,
    mut step: impl FnMut(usize) -> Vec<Op>,
) -> Figures {
    let mut times = Vec::with_capacity(iterations);
    let mut first_ops = Vec::new();
    for i in 0..iterations {
        let start = Instant::now();
        let ops = black_box(step(i));
        times.push(start.elapsed());
        if i == 0 {
            first_ops = ops;
        }
    }
    times.sort();
    let (element_ops, elements, other) = op_summary(&first_ops);
    Figures {
        name,
        median: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
        ops: element_ops + other,
        elements,
        other_ops: other,
        iterations,
    }
}

/// The pod with its labels replaced: on even iterations only its `pod` label is left (it leaves
/// every label-based selection), on odd ones the original labels come back.
fn relabel(pod: &Pod, i: usize) -> Pod {
    let mut p = pod.clone();
    if i.is_multiple_of(2) {
        p.labels.retain(|k, _| k == "pod");
        p.labels.insert("app".into(), "a-moved".into());
    }
    p
}

/// A remote pod that is a member of at least one set this node uses (so the relabel matters).
fn remote_peer(engine: &Engine) -> ObjectKey {
    let used: Vec<&String> = engine
        .desired()
        .sets
        .keys()
        .filter(|n| n.starts_with("sel-"))
        .collect();
    engine
        .cluster()
        .pods
        .values()
        .filter(|p| p.node != NODE && p.is_member())
        .find(|p| {
            let ip = weft_netpol::compile::addr_value(p.ips[0]);
            used.iter().any(|s| {
                engine.desired().sets[*s]
                    .elements
                    .keys()
                    .any(|k| k.from[0] == ip)
            })
        })
        .map(|p| p.key.clone())
        .expect("some remote pod is a peer of a local policy")
}

fn main() {
    let small = std::env::var("WEFT_BENCH_SIZE").is_ok_and(|v| v == "small");
    let mut params = GenParams::benchmark();
    if small {
        params.namespaces /= 10;
        params.pods /= 10;
        params.policies /= 10;
        params.nodes = 10;
        params.local_pods = 11;
    }
    let iterations = if small { 200 } else { 1000 };
    println!(
        "weft-netpol engine benchmark: {} pods ({} on {NODE}), {} policies, {} namespaces, seed 1",
        params.pods, params.local_pods, params.policies, params.namespaces
    );
    let t = Instant::now();
    let cluster: Cluster = synth::cluster(&params, 1);
    println!("generated the cluster in {:?}", t.elapsed());

    let mut rows = Vec::new();
    rows.push(measure("cold compile (from scratch)", 10, |_| {
        let rs = compile(&cluster, NODE, TABLE);
        diff(None, &rs).ops
    }));
    rows.push(measure(
        "cold engine start (compile + bookkeeping)",
        10,
        |_| {
            let e = Engine::from_cluster(cluster.clone(), NODE, TABLE);
            diff(None, e.desired()).ops
        },
    ));

    let mut engine = Engine::from_cluster(cluster.clone(), NODE, TABLE);
    let rs = engine.desired();
    println!(
        "desired table on {NODE}: {} sets/maps, {} elements, {} chains, {} rules",
        rs.sets.len(),
        rs.element_count(),
        rs.chains.len(),
        rs.rule_count()
    );

    let peer = remote_peer(&engine);
    let peer_pod = engine.cluster().pods[&peer].clone();
    rows.push(measure("pod relabel (remote peer)", iterations, |i| {
        let mut ops = engine.apply(Change::UpsertPod(relabel(&peer_pod, i)));
        ops.extend(engine.pending_ops());
        ops
    }));

    let local = engine
        .cluster()
        .pods
        .values()
        .find(|p| p.node == NODE && p.is_member())
        .cloned()
        .expect("the node under test has pods");
    rows.push(measure("pod relabel (local pod)", iterations, |i| {
        let mut ops = engine.apply(Change::UpsertPod(relabel(&local, i)));
        ops.extend(engine.pending_ops());
        ops
    }));

    let mut rng = Rng::new(99);
    let mut serial = 0usize;
    rows.push(measure("pod added (local)", iterations, |_| {
        serial += 1;
        let mut p = synth::pod(&mut rng, &params, params.pods + serial);
        p.node = NODE.into();
        p.host_network = false;
        p.terminated = false;
        let key = p.key.clone();
        let ops = engine.apply(Change::UpsertPod(p));
        // Undo outside the measured change's ops (still inside the timing, so it counts
        // against us, not for us).
        engine.apply(Change::DeletePod(key));
        engine.pending_ops();
        ops
    }));

    let ns_with_local = local.key.namespace.clone();
    rows.push(measure(
        "policy added (selects local pods)",
        iterations / 4,
        |i| {
            let mut np =
                synth::api_policy(&mut rng, &params, &ns_with_local, &format!("bench-{i}"));
            // Make sure it selects the local pod, so the node has to compile it.
            if let Some(spec) = np.spec.as_mut() {
                spec.pod_selector = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                        match_labels: Some([("pod".to_string(), local.key.name.clone())].into()),
                        ..Default::default()
                    },
                );
                spec.policy_types = Some(vec!["Ingress".into(), "Egress".into()]);
            }
            let pol =
                weft_netpol::model::Policy::from_api(&np).expect("generated policies are valid");
            let key = pol.key.clone();
            let ops = engine.apply(Change::UpsertPolicy(pol));
            engine.apply(Change::DeletePolicy(key));
            engine.pending_ops();
            ops
        },
    ));

    let ns = engine.cluster().namespaces[&peer.namespace].clone();
    rows.push(measure("namespace relabel", iterations / 4, |i| {
        let mut n = ns.clone();
        n.labels.insert(
            "team".into(),
            if i % 2 == 0 {
                "t-moved".into()
            } else {
                "t0".into()
            },
        );
        let mut ops = engine.apply(Change::UpsertNamespace(n));
        ops.extend(engine.pending_ops());
        ops
    }));

    // Baseline: full regeneration for the same remote relabel.
    let mut base_cluster = cluster.clone();
    let mut current = compile(&base_cluster, NODE, TABLE);
    rows.push(measure(
        "BASELINE pod relabel by full compile + diff",
        if small { 20 } else { 10 },
        |i| {
            base_cluster
                .pods
                .insert(peer.clone(), relabel(&peer_pod, i));
            let desired = compile(&base_cluster, NODE, TABLE);
            let d = diff(Some(&current), &desired);
            current = desired;
            d.ops
        },
    ));

    println!();
    println!("| change | median | p99 | ops (element ops + other) | elements | iterations |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} µs | {:.1} µs | {} ({} + {}) | {} | {} |",
            r.name,
            r.median.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.ops,
            r.ops - r.other_ops,
            r.other_ops,
            r.elements,
            r.iterations
        );
    }
    let headline = rows.iter().find(|r| r.name == "pod relabel (remote peer)");
    let baseline = rows.iter().find(|r| r.name.starts_with("BASELINE"));
    if let (Some(r), Some(b)) = (headline, baseline) {
        println!(
            "\nremote relabel: {:.0}x faster than the full-regeneration baseline (medians)",
            b.median.as_secs_f64() / r.median.as_secs_f64()
        );
    }
    if let Ok(path) = std::env::var("WEFT_BENCH_JSON") {
        let body: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"change\":\"{}\",\"median_us\":{:.2},\"p99_us\":{:.2},\"ops\":{},\"elements\":{}}}",
                    r.name,
                    r.median.as_secs_f64() * 1e6,
                    r.p99.as_secs_f64() * 1e6,
                    r.ops,
                    r.elements
                )
            })
            .collect();
        std::fs::write(&path, format!("[{}]\n", body.join(",\n")))
            .expect("WEFT_BENCH_JSON is writable");
    }

    // criterion's own statistics for the two headline figures.
    if std::env::var_os("WEFT_BENCH_NO_CRITERION").is_none() {
        let mut c = Criterion::default()
            .sample_size(10)
            .measurement_time(Duration::from_secs(if small { 2 } else { 5 }))
            .warm_up_time(Duration::from_secs(1))
            .configure_from_args();
        c.bench_function("cold compile", |b| {
            b.iter(|| compile(black_box(&cluster), NODE, TABLE))
        });
        let mut i = 0;
        c.bench_function("pod relabel (remote peer)", |b| {
            b.iter(|| {
                i += 1;
                engine.apply(Change::UpsertPod(relabel(&peer_pod, i)))
            })
        });
        c.final_summary();
    }
}
