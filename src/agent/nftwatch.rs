//! The agent's eye on its own table: nftables change notifications.
//!
//! A thread subscribes to the kernel's nftables notifications ([`weft_nft::monitor`]) in the
//! agent's network namespace. A transaction that changed table `inet weft` and was not
//! committed by this process (someone ran `nft`, another tool flushed a set) marks the table
//! *suspect*; the controller then compares the kernel's table with the desired one and repairs
//! the difference by a diff (never a rebuild), within about a second. Lost notifications
//! (queue overflow) count as suspect too.
//!
//! The same notifications make the periodic drift check cheap: each carries the ruleset
//! generation it created, so when the kernel's current generation (`GETGEN`, one small request)
//! is the last one the monitor saw and nothing suspect happened, every commit since the last
//! comparison was ours or left our table alone: the table is what we wrote, and the full dump
//! is skipped. Only when that "digest" does not hold is the table dumped and compared.
//!
//! The monitor is a helper, never a dependency: if it cannot subscribe or dies, it is restarted
//! with backoff, logged, and the periodic check falls back to full comparisons.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tracing::{info, warn};
use weft_nft::monitor::{Event, Monitor};

/// No generation seen yet.
const NO_GENERATION: u64 = u64::MAX;

/// What the monitor thread tells the controller.
#[derive(Debug)]
pub struct TableWatch {
    suspect: AtomicBool,
    running: AtomicBool,
    last_generation: AtomicU64,
    /// Transactions by other processes that changed our table.
    pub foreign_commits: AtomicU64,
    /// Times notifications were lost (queue overflow) or the monitor had to restart.
    pub lost: AtomicU64,
    /// Periodic checks skipped because the generation showed nothing foreign happened.
    pub checks_skipped: AtomicU64,
    /// Full comparisons of the kernel's table with the desired one.
    pub checks_compared: AtomicU64,
}

impl Default for TableWatch {
    fn default() -> Self {
        TableWatch {
            suspect: AtomicBool::new(false),
            running: AtomicBool::new(false),
            last_generation: AtomicU64::new(NO_GENERATION),
            foreign_commits: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            checks_skipped: AtomicU64::new(0),
            checks_compared: AtomicU64::new(0),
        }
    }
}

impl TableWatch {
    /// Takes the "someone else changed the table" flag (the caller is about to compare).
    pub fn take_suspect(&self) -> bool {
        self.suspect.swap(false, Ordering::SeqCst)
    }

    /// Puts the flag back (a comparison had to wait).
    pub fn raise_suspect(&self) {
        self.suspect.store(true, Ordering::SeqCst);
    }

    /// Prometheus text for these counters.
    pub fn render(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "# HELP weft_nft_foreign_commits_total Transactions by other processes that changed weft's table (drift, repaired by diff).\n\
             # TYPE weft_nft_foreign_commits_total counter\n\
             weft_nft_foreign_commits_total {}\n\
             # HELP weft_nft_monitor_losses_total nftables notifications lost or monitor restarts (the next check compares the whole table).\n\
             # TYPE weft_nft_monitor_losses_total counter\n\
             weft_nft_monitor_losses_total {}\n\
             # HELP weft_nft_monitor_up 1 while the nftables change monitor is subscribed.\n\
             # TYPE weft_nft_monitor_up gauge\n\
             weft_nft_monitor_up {}\n\
             # HELP weft_ruleset_drift_checks_total Drift checks: compared (table dumped and diffed) or skipped (the generation proved every commit since was ours).\n\
             # TYPE weft_ruleset_drift_checks_total counter\n\
             weft_ruleset_drift_checks_total{{result=\"compared\"}} {}\n\
             weft_ruleset_drift_checks_total{{result=\"skipped\"}} {}\n",
            load(&self.foreign_commits),
            load(&self.lost),
            u8::from(self.running()),
            load(&self.checks_compared),
            load(&self.checks_skipped),
        )
    }

    /// Whether the monitor is subscribed.
    pub fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// True when the kernel's generation `current` proves the table is what this process
    /// last wrote: the monitor is running, has seen every commit up to `current`, and none of
    /// them was a foreign change to the table (or a loss).
    pub fn unchanged_by_others(&self, current: u32) -> bool {
        self.running()
            && !self.suspect.load(Ordering::SeqCst)
            && self.last_generation.load(Ordering::SeqCst) == u64::from(current)
    }

    /// Records what the monitor read. Suspect is raised before the generation moves, so a
    /// reader that sees the new generation also sees the flag.
    pub fn observe(&self, event: &Event) {
        let generation = match event {
            Event::Foreign {
                generation,
                pid,
                process,
                objects,
            } => {
                self.foreign_commits.fetch_add(1, Ordering::Relaxed);
                self.suspect.store(true, Ordering::SeqCst);
                warn!(
                    pid,
                    process = %process,
                    objects,
                    generation,
                    "another process changed weft's nftables table; comparing it with the desired one and repairing by diff"
                );
                *generation
            }
            Event::Own { generation, .. } | Event::Elsewhere { generation } => *generation,
            Event::Lost => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                self.suspect.store(true, Ordering::SeqCst);
                warn!("nftables notifications lost (queue overflow): comparing the whole table");
                return;
            }
        };
        self.last_generation
            .store(u64::from(generation), Ordering::SeqCst);
    }

    /// Commits before a subscription, or while none runs, went unseen: either way the next
    /// check must compare the whole table.
    pub(crate) fn set_running(&self, up: bool) {
        self.suspect.store(true, Ordering::SeqCst);
        if !up {
            self.last_generation.store(NO_GENERATION, Ordering::SeqCst);
        }
        self.running.store(up, Ordering::SeqCst);
    }
}

/// Starts the monitor thread for `inet <table>` in the current network namespace. It runs
/// for the life of the process; it resubscribes with backoff (1 s doubling to 30 s) after
/// errors or panics.
pub fn spawn(table: String, watch: Arc<TableWatch>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("weft-nft-monitor".into())
        .spawn(move || {
            let mut backoff = Duration::from_secs(1);
            loop {
                let w = watch.clone();
                let t = table.clone();
                let outcome = catch_unwind(AssertUnwindSafe(move || watch_once(&t, &w)));
                watch.set_running(false);
                watch.lost.fetch_add(1, Ordering::Relaxed);
                match outcome {
                    Ok(Ok(())) => backoff = Duration::from_secs(1),
                    Ok(Err(e)) => {
                        warn!(error = %e, retry_in = ?backoff, "nftables monitor stopped; periodic drift checks compare the whole table meanwhile")
                    }
                    Err(_) => {
                        warn!(retry_in = ?backoff, "nftables monitor panicked; restarting it")
                    }
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        })
        .map(drop)
}

/// Subscribes and reads until an error. `Ok` only after a long healthy run (resets backoff).
fn watch_once(table: &str, watch: &TableWatch) -> Result<(), String> {
    let mut monitor = Monitor::open(table).map_err(|e| e.to_string())?;
    watch.set_running(true);
    info!(table = %table, "watching nftables notifications for drift");
    loop {
        let events = monitor
            .next(Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        for e in &events {
            watch.observe(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generation_digest_holds_only_while_every_commit_was_ours() {
        let w = TableWatch::default();
        assert!(!w.unchanged_by_others(3), "not running: never proven");
        w.set_running(true);
        assert!(w.take_suspect(), "a restart is suspect");
        w.observe(&Event::Own {
            generation: 3,
            objects: 2,
        });
        assert!(w.unchanged_by_others(3));
        assert!(
            !w.unchanged_by_others(4),
            "a commit the monitor has not seen yet"
        );
        w.observe(&Event::Elsewhere { generation: 4 });
        assert!(
            w.unchanged_by_others(4),
            "kube-proxy's commit leaves our table alone"
        );
        w.observe(&Event::Foreign {
            generation: 5,
            pid: 1,
            process: "nft".into(),
            objects: 1,
        });
        assert!(!w.unchanged_by_others(5));
        assert_eq!(w.foreign_commits.load(Ordering::Relaxed), 1);
        assert!(w.take_suspect());
        assert!(
            w.unchanged_by_others(5),
            "compared after the foreign commit"
        );
        w.observe(&Event::Lost);
        assert!(!w.unchanged_by_others(5));
        assert!(w.take_suspect());
        w.set_running(false);
        assert!(!w.unchanged_by_others(5));
        assert!(
            w.take_suspect(),
            "a stopped monitor may have missed commits"
        );
    }
}
