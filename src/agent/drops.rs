//! The drop log's listener: recent denied new connections, for `weft status --drops`.
//!
//! With `--log-drops`, each group chain logs the new connections it denies (rate-limited,
//! prefix `weft-drop <group chain> `) to one nflog group. A thread of the agent binds that
//! group and keeps the last [`RING`] drops; it writes them, at most once a second and only
//! when something changed, to `drops.json` next to the agent's socket (root-only directory),
//! where `weft status --drops` reads them. The group chain names the isolating policies (its
//! drop rule's comment), which the CLI reads from the kernel's table.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use weft_nft::nflog::{Logged, NflogGroup};

/// How many recent drops are kept.
pub const RING: usize = 256;

/// The prefix weft's drop log statements start with (`weft-drop <group chain> `).
pub const PREFIX: &str = "weft-drop ";

/// One denied new connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropRecord {
    /// When the agent received it (Unix time, milliseconds).
    pub at_ms: u64,
    /// The group chain that denied it.
    pub group_chain: String,
    /// Source address.
    pub src: String,
    /// Destination address.
    pub dst: String,
    /// Protocol number.
    pub proto: u8,
    /// Source port.
    pub sport: Option<u16>,
    /// Destination port.
    pub dport: Option<u16>,
}

impl DropRecord {
    fn from_logged(l: &Logged, at_ms: u64) -> Option<DropRecord> {
        let chain = l.prefix.strip_prefix(PREFIX)?.trim_end().to_string();
        Some(DropRecord {
            at_ms,
            group_chain: chain,
            src: l.src.to_string(),
            dst: l.dst.to_string(),
            proto: l.proto,
            sport: l.sport,
            dport: l.dport,
        })
    }
}

/// What `drops.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropFile {
    /// The nflog group listened on.
    pub group: u16,
    /// Drops received since the agent started (also those the ring has let go).
    pub total: u64,
    /// The most recent drops, oldest first.
    pub recent: Vec<DropRecord>,
}

/// Where the drop file lives, given the agent's socket.
pub fn file_for(socket: &Path) -> PathBuf {
    socket.with_file_name("drops.json")
}

fn write_atomically(path: &Path, f: &DropFile) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(f).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

/// Starts the listener thread. Binding errors (e.g. another listener holds the group) are
/// returned; later receive errors are logged and retried after a pause.
pub fn spawn(
    group: u16,
    path: PathBuf,
    metrics: std::sync::Arc<super::metrics::Metrics>,
) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("weft-drops".into())
        .spawn(move || {
            let mut nflog = match NflogGroup::bind(group) {
                Ok(g) => {
                    let _ = tx.send(Ok(()));
                    g
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            info!(group, file = %path.display(), "drop log: listening");
            let mut file = DropFile {
                group,
                ..Default::default()
            };
            let mut ring: VecDeque<DropRecord> = VecDeque::with_capacity(RING);
            let mut dirty = true;
            let mut written: Option<Instant> = None;
            loop {
                match nflog.next(Duration::from_millis(500)) {
                    Ok(batch) => {
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map(|d| d.as_millis() as u64)
                            .unwrap_or(0);
                        for l in &batch {
                            let Some(r) = DropRecord::from_logged(l, now) else {
                                continue;
                            };
                            file.total += 1;
                            metrics
                                .drops_logged
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if ring.len() == RING {
                                ring.pop_front();
                            }
                            ring.push_back(r);
                            dirty = true;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "drop log: receive failed; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                if dirty && written.is_none_or(|w| w.elapsed() >= Duration::from_secs(1)) {
                    file.recent = ring.iter().cloned().collect();
                    match write_atomically(&path, &file) {
                        Ok(()) => dirty = false,
                        Err(e) => {
                            warn!(error = %e, file = %path.display(), "drop log: cannot write")
                        }
                    }
                    written = Some(Instant::now());
                }
            }
        })?;
    rx.recv_timeout(Duration::from_secs(10))
        .map_err(|_| std::io::Error::other("the drop log thread did not start"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_weft_prefixes_become_records() {
        let l = Logged {
            prefix: "weft-drop grp-abc-in ".into(),
            src: "10.244.0.2".parse().unwrap(),
            dst: "10.244.0.3".parse().unwrap(),
            proto: 6,
            sport: Some(4000),
            dport: Some(80),
            indev: 0,
            outdev: 0,
        };
        let r = DropRecord::from_logged(&l, 5).unwrap();
        assert_eq!(r.group_chain, "grp-abc-in");
        let other = Logged {
            prefix: "someone else ".into(),
            ..l
        };
        assert_eq!(DropRecord::from_logged(&other, 5), None);
    }
}
