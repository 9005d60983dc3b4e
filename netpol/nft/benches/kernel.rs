//! Kernel benchmark (issue 4): weft's netlink backend against the full-regeneration baseline,
//! on the real kernel, in network namespaces this binary creates and removes.
//!
//! Cluster: [`GenParams::benchmark`] (10,000 pods, 2,000 policies, 500 namespaces; `node-0`, the
//! node under test, has 110 pods), seed 1, the same as the engine benchmark. Printed side by
//! side, in one run:
//! - **cold full sync**: our one batch (`apply` of `diff(None, desired)`) vs. the same table
//!   rendered as text (`Display` of `Ruleset`) and loaded with `nft -f`; each run into a fresh
//!   namespace.
//! - **one pod relabel to kernel-acknowledged**: `Engine::apply` + `NftBackend::apply` (p50,
//!   p99, messages) vs. what full-sync controllers do: compile the whole table, render it, and
//!   `nft -f` a file holding `delete table inet weft` + the table (one transaction).
//! - **adopt after a restart with nothing changed**: new `Engine::from_cluster` + backend,
//!   `resync(dump)`: time and writes (must be 0).
//!
//! `nft` runs from a thread inside the namespace (no `ip netns exec` in the timing).
//! Needs root (prints SKIPPED otherwise). `WEFT_BENCH_SIZE=small`: a tenth of the cluster (CI).
//! Run: `cargo bench -p weft-nft --bench kernel`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Netns;
use weft_netpol::compile::{addr_value, compile};
use weft_netpol::diff::{Op, diff};
use weft_netpol::engine::{Change, Engine};
use weft_netpol::model::{ObjectKey, Pod};
use weft_netpol::ruleset::{Ruleset, TABLE_NAME};
use weft_netpol::synth::{self, GenParams};
use weft_nft::{ApplyReport, NftThread};

const NODE: &str = "node-0";

fn percentile(sorted: &[Duration], pct: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * pct).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}

/// The pod with its labels replaced on even iterations, restored on odd ones (as in the
/// engine benchmark).
fn relabel(pod: &Pod, i: usize) -> Pod {
    let mut p = pod.clone();
    if i.is_multiple_of(2) {
        p.labels.retain(|k, _| k == "pod");
        p.labels.insert("app".into(), "a-moved".into());
    }
    p
}

/// A remote pod that is a member of some selector set this node uses.
fn remote_peer(engine: &Engine) -> ObjectKey {
    let rs = engine.desired();
    let used: Vec<&String> = rs.sets.keys().filter(|n| n.starts_with("sel-")).collect();
    engine
        .cluster()
        .pods
        .values()
        .filter(|p| p.node != NODE && p.is_member())
        .find(|p| {
            let ip = addr_value(p.ips[0]);
            used.iter()
                .any(|s| rs.sets[*s].elements.keys().any(|k| k.from[0] == ip))
        })
        .map(|p| p.key.clone())
        .expect("some remote pod is a peer of a local policy")
}

/// Moves the calling thread into a network namespace.
fn enter(path: &Path) {
    let f = File::open(path).expect("open the namespace");
    // SAFETY: setns on a valid namespace fd; it affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Runs `f` on a thread inside the namespace at `path`.
fn in_netns<T: Send + 'static>(path: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
    .join()
    .expect("namespace thread")
}

/// Writes `text` to `file` and loads it with `nft -f` (in the calling thread's namespace).
fn nft_load(file: &Path, text: &str) {
    std::fs::write(file, text).expect("write the nft file");
    let out = Command::new("nft")
        .arg("-f")
        .arg(file)
        .output()
        .expect("run nft");
    assert!(
        out.status.success(),
        "nft -f failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Row {
    what: String,
    ours: String,
    baseline: String,
    ratio: String,
}

fn ops_with_pending(engine: &mut Engine, change: Change) -> (Vec<Op>, Vec<Op>) {
    let ops = engine.apply(change);
    let pending = engine.pending_ops();
    (ops, pending)
}

/// Applies a relabel's ops (and pending deletes, as a second batch); returns messages sent.
fn apply_both(nft: &NftThread, ops: Vec<Op>, pending: Vec<Op>) -> usize {
    let mut messages = 0;
    for batch in [ops, pending] {
        if !batch.is_empty() {
            let r: ApplyReport = nft.apply(TABLE_NAME, batch).expect("relabel batch");
            assert_eq!(r.acks, r.messages);
            messages += r.messages;
        }
    }
    messages
}

fn main() {
    if let Some(reason) = common::skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    let small = std::env::var("WEFT_BENCH_SIZE").is_ok_and(|v| v == "small");
    let mut params = GenParams::benchmark();
    if small {
        params.namespaces /= 10;
        params.pods /= 10;
        params.policies /= 10;
        params.nodes = 10;
        params.local_pods = 11;
    }
    let (cold_runs, relabels, baseline_runs, adopt_runs) = if small {
        (5, 200, 20, 5)
    } else {
        (3, 1000, 10, 3)
    };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let nft_version = Command::new("nft")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "weft-nft kernel benchmark: {} pods ({} on {NODE}), {} policies, {} namespaces, seed 1; kernel {}, {nft_version}, {} CPUs",
        params.pods,
        params.local_pods,
        params.policies,
        params.namespaces,
        release.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let cluster = synth::cluster(&params, 1);
    let mut engine = Engine::from_cluster(cluster.clone(), NODE, TABLE_NAME);
    let desired: Ruleset = engine.desired().clone();
    let text = desired.to_string();
    println!(
        "table on {NODE}: {} sets/maps, {} elements, {} chains, {} rules; as nft text {} KiB",
        desired.sets.len(),
        desired.element_count(),
        desired.chains.len(),
        desired.rule_count(),
        text.len() / 1024
    );
    let tmp = std::env::temp_dir().join(format!("weft-bench-{}.nft", std::process::id()));
    let mut rows = Vec::new();

    // ---- cold full sync ------------------------------------------------------------------
    let mut ours_cold = Vec::new();
    let mut cold_report = ApplyReport::default();
    let mut ours_ns: Option<Netns> = None;
    for _ in 0..cold_runs {
        let ns = Netns::new();
        let nft = NftThread::spawn_in_netns(ns.path()).expect("backend");
        let t = Instant::now();
        let ops = diff(None, &desired).ops;
        let report = nft.apply(TABLE_NAME, ops).expect("cold sync");
        ours_cold.push(t.elapsed());
        assert_eq!(report.acks, report.messages);
        cold_report = report;
        ours_ns = Some(ns);
    }
    let ours_ns = ours_ns.expect("at least one run");
    let mut nft_cold = Vec::new();
    for _ in 0..cold_runs {
        let ns = Netns::new();
        let (rendered, tmp) = (desired.clone(), tmp.clone());
        nft_cold.push(in_netns(ns.path(), move || {
            let t = Instant::now();
            nft_load(&tmp, &rendered.to_string());
            t.elapsed()
        }));
        // The text gives the same table.
        let check = NftThread::spawn_in_netns(ns.path()).expect("backend");
        let loaded = check.dump(TABLE_NAME).expect("dump");
        assert!(
            loaded.as_ref() == Some(&desired),
            "nft -f of the rendered text gives another table"
        );
    }
    ours_cold.sort();
    nft_cold.sort();
    let (oc, nc) = (percentile(&ours_cold, 0.5), percentile(&nft_cold, 0.5));
    rows.push(Row {
        what: format!("cold full sync (median of {cold_runs}, fresh netns each)"),
        ours: format!(
            "{} ({} messages, {} KiB, one batch)",
            ms(oc),
            cold_report.messages,
            cold_report.bytes / 1024
        ),
        baseline: format!("{} (render + `nft -f`)", ms(nc)),
        ratio: format!("{:.1}×", nc.as_secs_f64() / oc.as_secs_f64()),
    });

    // ---- one pod relabel to kernel-acknowledged ------------------------------------------
    let nft = NftThread::spawn_in_netns(ours_ns.path()).expect("backend");
    let peer = remote_peer(&engine);
    let peer_pod = engine.cluster().pods[&peer].clone();
    let local = engine
        .cluster()
        .pods
        .values()
        .find(|p| p.node == NODE && p.is_member())
        .cloned()
        .expect("the node under test has pods");
    let mut relabel_rows = Vec::new();
    for (name, pod) in [("remote peer", &peer_pod), ("local pod", &local)] {
        let mut times = Vec::with_capacity(relabels);
        let mut messages = Vec::with_capacity(relabels);
        for i in 0..relabels {
            let t = Instant::now();
            let (ops, pending) = ops_with_pending(&mut engine, Change::UpsertPod(relabel(pod, i)));
            let m = apply_both(&nft, ops, pending);
            times.push(t.elapsed());
            messages.push(m);
        }
        times.sort();
        messages.sort();
        relabel_rows.push((
            name,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            messages[0],
            messages[messages.len() - 1],
        ));
    }
    let kernel = nft.dump(TABLE_NAME).expect("dump");
    assert!(
        kernel.as_ref() == Some(engine.desired()),
        "after the relabels the kernel differs from the desired table"
    );
    drop(nft);

    let base_ns = Netns::new();
    let baseline: Vec<Duration> = {
        let mut base_cluster = cluster.clone();
        let (peer, peer_pod, tmp, text) = (peer.clone(), peer_pod.clone(), tmp.clone(), text);
        in_netns(base_ns.path(), move || {
            nft_load(&tmp, &text);
            let mut times = Vec::new();
            for i in 0..baseline_runs {
                base_cluster
                    .pods
                    .insert(peer.clone(), relabel(&peer_pod, i));
                let t = Instant::now();
                let desired = compile(&base_cluster, NODE, TABLE_NAME);
                let file = format!("delete table inet {TABLE_NAME}\n{desired}");
                nft_load(&tmp, &file);
                times.push(t.elapsed());
            }
            times.sort();
            times
        })
    };
    let _ = std::fs::remove_file(&tmp);
    let (b50, b99) = (percentile(&baseline, 0.5), percentile(&baseline, 0.99));
    let (name, r50, r99, mmin, mmax) = relabel_rows[0];
    rows.push(Row {
        what: format!("pod relabel ({name}) → kernel ack, p50"),
        ours: format!("{} ({relabels} relabels)", ms(r50)),
        baseline: format!("{} ({baseline_runs} runs)", ms(b50)),
        ratio: format!("{:.0}×", b50.as_secs_f64() / r50.as_secs_f64()),
    });
    rows.push(Row {
        what: format!("pod relabel ({name}) → kernel ack, p99"),
        ours: ms(r99),
        baseline: format!("{} (max of {baseline_runs})", ms(b99)),
        ratio: format!("{:.0}×", b99.as_secs_f64() / r99.as_secs_f64()),
    });
    rows.push(Row {
        what: format!("messages per relabel ({name})"),
        ours: if mmin == mmax {
            format!("{mmin}")
        } else {
            format!("{mmin}-{mmax}")
        },
        baseline: format!(
            "the whole table: {} sets/maps, {} elements, {} chains, {} rules",
            desired.sets.len(),
            desired.element_count(),
            desired.chains.len(),
            desired.rule_count()
        ),
        ratio: String::new(),
    });
    let (lname, l50, l99, lmin, lmax) = relabel_rows[1];
    rows.push(Row {
        what: format!("pod relabel ({lname}) → kernel ack, p50 / p99"),
        ours: format!(
            "{} / {} ({} messages)",
            ms(l50),
            ms(l99),
            if lmin == lmax {
                format!("{lmin}")
            } else {
                format!("{lmin}-{lmax}")
            }
        ),
        baseline: "same as above (whole table)".into(),
        ratio: format!("{:.0}×", b50.as_secs_f64() / l50.as_secs_f64()),
    });

    // ---- adopt after a restart with nothing changed ----------------------------------------
    let mut adopt = Vec::new();
    let mut writes = 0;
    for _ in 0..adopt_runs {
        let model = engine.cluster().clone();
        let t = Instant::now();
        let mut fresh = Engine::from_cluster(model, NODE, TABLE_NAME);
        let t_engine = t.elapsed();
        let nft = NftThread::spawn_in_netns(ours_ns.path()).expect("backend");
        let current = nft.dump(TABLE_NAME).expect("dump");
        let t_dump = t.elapsed();
        let ops = fresh.resync(current.as_ref());
        let total = t.elapsed();
        writes += ops.len();
        if !ops.is_empty() {
            nft.apply(TABLE_NAME, ops).expect("adopt writes");
        }
        adopt.push((total, t_engine, t_dump - t_engine, total - t_dump));
    }
    adopt.sort();
    let (a50, a_engine, a_dump, a_diff) = adopt[(adopt.len() - 1) / 2];
    rows.push(Row {
        what: format!("adopt after restart, nothing changed (median of {adopt_runs})"),
        ours: format!(
            "{} (engine start {}, backend start + dump {}, diff {}); writes: {writes}",
            ms(a50),
            ms(a_engine),
            ms(a_dump),
            ms(a_diff)
        ),
        baseline: "—".into(),
        ratio: String::new(),
    });
    // ---- the agent's periodic drift check: generation proof vs full comparison ------------
    // With the nftables monitor running, a check whose GETGEN matches the last generation the
    // monitor saw (every commit since was ours) skips the dump; otherwise it dumps and diffs.
    let nft = NftThread::spawn_in_netns(ours_ns.path()).expect("backend");
    let mut gens = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        nft.run(|b| b.generation())
            .expect("thread")
            .expect("GETGEN");
        gens.push(t.elapsed());
    }
    gens.sort();
    let mut compares = Vec::new();
    for _ in 0..adopt_runs {
        let t = Instant::now();
        let current = nft.dump(TABLE_NAME).expect("dump");
        let d = weft_netpol::diff::diff(current.as_ref(), &desired);
        assert!(d.ops.is_empty(), "the kernel holds the desired table");
        compares.push(t.elapsed());
    }
    compares.sort();
    let (g50, c50) = (percentile(&gens, 0.5), percentile(&compares, 0.5));
    rows.push(Row {
        what: "periodic drift check, nothing changed: generation proof (p50 of 200)".into(),
        ours: ms(g50),
        baseline: format!(
            "dump + diff of the whole table: {} (median of {adopt_runs})",
            ms(c50)
        ),
        ratio: format!("{:.0}×", c50.as_secs_f64() / g50.as_secs_f64()),
    });
    drop(nft);
    drop(base_ns);
    drop(ours_ns);

    println!();
    println!(
        "| measurement | weft-nft (one netlink batch) | baseline (`nft -f` of rendered text) | baseline / weft |"
    );
    println!("|---|---|---|---|");
    for r in &rows {
        println!("| {} | {} | {} | {} |", r.what, r.ours, r.baseline, r.ratio);
    }
    println!();
    let goal = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "goals: relabel p99 ≤ 10 ms: {} ({}); ≥ 50× faster than the baseline: {} ({:.0}× at p50); cold sync ≤ 2 s: {} ({})",
        goal(r99 <= Duration::from_millis(10)),
        ms(r99),
        goal(b50.as_secs_f64() / r50.as_secs_f64() >= 50.0),
        b50.as_secs_f64() / r50.as_secs_f64(),
        goal(oc <= Duration::from_secs(2)),
        ms(oc)
    );
    assert_eq!(writes, 0, "adopting an unchanged kernel must write nothing");
}
