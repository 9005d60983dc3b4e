//! Per-node IPAM over the node's podCIDRs (one IPv4 and/or one IPv6), shared on disk by every
//! process of the node (agent, plugin, tests) through an exclusive file lock.
//!
//! Every operation is one critical section: `flock(lock)` → read `state.json` → change →
//! write `state.json.tmp`, fsync, rename over `state.json`, fsync the directory → unlock. A
//! process killed at any point leaves either the old or the new state, never a mix, and the
//! kernel drops its lock; so two processes never hand out one address twice.
//!
//! Address choice, per family: never the network address, the first address (the node's
//! tunnel device, see [`tunnel_address`]) or the last (broadcast-like). Fresh addresses first
//! (a cursor walks the range); then released addresses, least recently released first, and
//! only once they have rested [`DEFAULT_COOLDOWN`] (a conntrack entry or a peer's cached
//! policy can still name a just-freed address). The state records the podCIDRs it was made
//! from: opening it with others is [`IpamError::PodCidrChanged`], never a silent reuse.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::proto::{AttachmentKey, PodRef};

/// Where the node's allocations live.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/weft/ipam";
/// How long a released address rests before it is handed out again.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);
/// Released addresses remembered per family beyond which the oldest rested ones are
/// forgotten (they become fresh again), so the state file stays small on IPv6 ranges.
const MAX_RELEASED_PER_FAMILY: usize = 4096;
/// Most addresses the fresh-address cursor inspects per allocation.
const SCAN_LIMIT: u128 = 1 << 17;
const STATE_FILE: &str = "state.json";
const STATE_TMP: &str = "state.json.tmp";
const LOCK_FILE: &str = "lock";
const FORMAT: u32 = 1;

/// Milliseconds since the Unix epoch, from a clock tests can drive.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, in ms since the epoch.
    fn now_ms(&self) -> u64;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told.
#[derive(Debug, Default)]
pub struct FakeClock(AtomicU64);

impl FakeClock {
    /// Starting at `ms`.
    pub fn new(ms: u64) -> Self {
        FakeClock(AtomicU64::new(ms))
    }
    /// Move forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The node's podCIDRs, at most one per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PodCidrs {
    /// IPv4 podCIDR.
    pub v4: Option<Ipv4Net>,
    /// IPv6 podCIDR.
    pub v6: Option<Ipv6Net>,
}

impl PodCidrs {
    /// From `Node.spec.podCIDRs`: at most one per family, each big enough for a pod after
    /// the reserved addresses, host bits cleared.
    pub fn from_list(list: &[IpNet]) -> Result<Self, IpamError> {
        let mut out = PodCidrs::default();
        for net in list {
            let bad = |why: &str| IpamError::InvalidCidr {
                cidr: net.to_string(),
                reason: why.to_string(),
            };
            match net.trunc() {
                IpNet::V4(n) => {
                    if out.v4.is_some() {
                        return Err(bad("two IPv4 podCIDRs"));
                    }
                    if n.prefix_len() > 30 {
                        return Err(bad("IPv4 podCIDR must be /30 or larger"));
                    }
                    out.v4 = Some(n);
                }
                IpNet::V6(n) => {
                    if out.v6.is_some() {
                        return Err(bad("two IPv6 podCIDRs"));
                    }
                    if n.prefix_len() > 126 {
                        return Err(bad("IPv6 podCIDR must be /126 or larger"));
                    }
                    out.v6 = Some(n);
                }
            }
        }
        if out.v4.is_none() && out.v6.is_none() {
            return Err(IpamError::InvalidCidr {
                cidr: String::new(),
                reason: "no podCIDR".into(),
            });
        }
        Ok(out)
    }

    /// The CIDRs as a list (v4 first).
    pub fn to_list(&self) -> Vec<IpNet> {
        self.v4
            .map(IpNet::V4)
            .into_iter()
            .chain(self.v6.map(IpNet::V6))
            .collect()
    }

    fn for_family(&self, v6: bool) -> Option<IpNet> {
        if v6 {
            self.v6.map(IpNet::V6)
        } else {
            self.v4.map(IpNet::V4)
        }
    }
}

impl std::fmt::Display for PodCidrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.to_list().iter().map(|n| n.to_string()).collect();
        write!(f, "[{}]", list.join(", "))
    }
}

/// The node's tunnel address in a podCIDR: its first address after the network address.
/// IPAM never hands it out; the overlay puts it on `vxweft`.
pub fn tunnel_address(net: IpNet) -> IpAddr {
    from_u128(net.network(), to_u128(net.network()) + 1)
}

/// What went wrong; every variant names the attachment, address or CIDR concerned.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// A podCIDR is unusable.
    #[error("invalid podCIDR {cidr}: {reason}")]
    InvalidCidr {
        /// The CIDR as given.
        cidr: String,
        /// Why.
        reason: String,
    },
    /// The node's podCIDRs are not the ones the stored allocations were made from.
    #[error(
        "node podCIDR changed from {old} to {new}: allocations from {old} are still on disk; drain the node and clear the IPAM state to adopt the new range"
    )]
    PodCidrChanged {
        /// What the state was made from.
        old: PodCidrs,
        /// What the node has now.
        new: PodCidrs,
    },
    /// No address can be handed out now.
    #[error("no free address in {cidr} for {key} ({cooling} released addresses still resting)")]
    Exhausted {
        /// The range.
        cidr: IpNet,
        /// Who asked.
        key: AttachmentKey,
        /// Released addresses not yet reusable (if > 0, retrying later can succeed).
        cooling: usize,
    },
    /// A pinned address cannot be given.
    #[error("pinned address {ip} for {key}: {reason}")]
    PinnedRefused {
        /// The address asked for.
        ip: IpAddr,
        /// Who asked.
        key: AttachmentKey,
        /// Why not.
        reason: String,
    },
    /// Reading or writing the state failed.
    #[error("IPAM state in {dir}: {source}")]
    Io {
        /// The state directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state file does not decode.
    #[error("IPAM state {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One attachment's addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Container id and interface.
    pub key: AttachmentKey,
    /// The pod it was made for.
    pub pod: PodRef,
    /// Its addresses, IPv4 first.
    pub ips: Vec<IpAddr>,
    /// When (ms since epoch).
    pub allocated_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Released {
    ip: IpAddr,
    at_ms: u64,
}

/// The file's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    format: u32,
    cidrs: PodCidrs,
    /// Keyed by `container/ifname` so the file reads well.
    allocations: BTreeMap<String, Allocation>,
    /// Released and not handed out since, oldest first.
    released: Vec<Released>,
    cursor_v4: Option<Ipv4Addr>,
    cursor_v6: Option<Ipv6Addr>,
}

impl State {
    fn new(cidrs: PodCidrs) -> Self {
        State {
            format: FORMAT,
            cidrs,
            allocations: BTreeMap::new(),
            released: Vec::new(),
            cursor_v4: None,
            cursor_v6: None,
        }
    }

    fn owners(&self) -> HashMap<IpAddr, &AttachmentKey> {
        self.allocations
            .values()
            .flat_map(|a| a.ips.iter().map(move |ip| (*ip, &a.key)))
            .collect()
    }
}

/// Settings of one node's IPAM.
#[derive(Debug, Clone)]
pub struct IpamConfig {
    /// State directory (default [`DEFAULT_STATE_DIR`]).
    pub dir: PathBuf,
    /// The node's podCIDRs.
    pub cidrs: PodCidrs,
    /// Rest period of released addresses (default [`DEFAULT_COOLDOWN`]).
    pub cooldown: Duration,
}

impl IpamConfig {
    /// Defaults for the given podCIDRs.
    pub fn new(cidrs: PodCidrs) -> Self {
        IpamConfig {
            dir: PathBuf::from(DEFAULT_STATE_DIR),
            cidrs,
            cooldown: DEFAULT_COOLDOWN,
        }
    }
}

/// A handle on the node's IPAM state. Cheap; holds no lock between calls.
#[derive(Debug, Clone)]
pub struct Ipam {
    config: IpamConfig,
    clock: Arc<dyn Clock>,
}

impl Ipam {
    /// Open (or create) the state, refusing podCIDRs other than the stored ones.
    pub fn open(config: IpamConfig, clock: Arc<dyn Clock>) -> Result<Self, IpamError> {
        std::fs::create_dir_all(&config.dir).map_err(|source| IpamError::Io {
            dir: config.dir.clone(),
            source,
        })?;
        let ipam = Ipam { config, clock };
        ipam.transact(|_| Ok(((), false)))?;
        Ok(ipam)
    }

    /// The podCIDRs this handle allocates from.
    pub fn cidrs(&self) -> PodCidrs {
        self.config.cidrs
    }

    /// Addresses for `key`: the existing allocation if there is one (ADD is idempotent),
    /// else one address per configured family, `pinned` ones where given (at most one per
    /// family, inside the podCIDR, not reserved, not held by another attachment).
    pub fn allocate(
        &self,
        key: &AttachmentKey,
        pod: &PodRef,
        pinned: &[IpAddr],
    ) -> Result<Allocation, IpamError> {
        let now = self.clock.now_ms();
        let cooldown = self.config.cooldown.as_millis() as u64;
        self.transact(|state| {
            if let Some(existing) = state.allocations.get(&key.to_string()) {
                if let Some(ip) = pinned.iter().find(|ip| !existing.ips.contains(ip)) {
                    return Err(IpamError::PinnedRefused {
                        ip: *ip,
                        key: key.clone(),
                        reason: format!("the attachment already holds {}", join_ips(&existing.ips)),
                    });
                }
                return Ok((existing.clone(), false));
            }
            let mut ips = Vec::new();
            for v6 in [false, true] {
                let Some(cidr) = state.cidrs.for_family(v6) else {
                    continue;
                };
                let mut wanted = pinned.iter().filter(|ip| ip.is_ipv6() == v6);
                let ip = match (wanted.next(), wanted.next()) {
                    (Some(_), Some(second)) => {
                        return Err(IpamError::PinnedRefused {
                            ip: *second,
                            key: key.clone(),
                            reason: "more than one pinned address of one family".into(),
                        });
                    }
                    (Some(ip), None) => check_pinned(state, cidr, key, *ip)?,
                    (None, None) => pick(state, cidr, key, now, cooldown)?,
                    (None, Some(_)) => unreachable!("iterator yields in order"),
                };
                state.released.retain(|r| r.ip != ip);
                ips.push(ip);
            }
            if let Some(ip) = pinned
                .iter()
                .find(|ip| state.cidrs.for_family(ip.is_ipv6()).is_none())
            {
                return Err(IpamError::PinnedRefused {
                    ip: *ip,
                    key: key.clone(),
                    reason: format!("the node has no podCIDR of its family ({})", state.cidrs),
                });
            }
            let allocation = Allocation {
                key: key.clone(),
                pod: pod.clone(),
                ips,
                allocated_at_ms: now,
            };
            state
                .allocations
                .insert(key.to_string(), allocation.clone());
            Ok((allocation, true))
        })
    }

    /// Free `key`'s addresses; `Ok(None)` if it had none (DEL is idempotent).
    pub fn release(&self, key: &AttachmentKey) -> Result<Option<Allocation>, IpamError> {
        let now = self.clock.now_ms();
        self.transact(|state| {
            let Some(gone) = state.allocations.remove(&key.to_string()) else {
                return Ok((None, false));
            };
            remember_released(state, &gone.ips, now, self.config.cooldown);
            Ok((Some(gone), true))
        })
    }

    /// The allocation of `key`, if any.
    pub fn get(&self, key: &AttachmentKey) -> Result<Option<Allocation>, IpamError> {
        self.transact(|state| Ok((state.allocations.get(&key.to_string()).cloned(), false)))
    }

    /// Every allocation.
    pub fn list(&self) -> Result<Vec<Allocation>, IpamError> {
        self.transact(|state| Ok((state.allocations.values().cloned().collect(), false)))
    }

    /// CNI GC: release every allocation not in `valid` that is at least `min_age` old (a
    /// grace period so an ADD racing the runtime's list is not freed). Returns what went.
    pub fn gc(
        &self,
        valid: &HashSet<AttachmentKey>,
        min_age: Duration,
    ) -> Result<Vec<Allocation>, IpamError> {
        let now = self.clock.now_ms();
        let min_age = min_age.as_millis() as u64;
        self.transact(|state| {
            let stale: Vec<String> = state
                .allocations
                .iter()
                .filter(|(_, a)| {
                    !valid.contains(&a.key) && now.saturating_sub(a.allocated_at_ms) >= min_age
                })
                .map(|(k, _)| k.clone())
                .collect();
            let mut gone = Vec::new();
            for k in stale {
                if let Some(a) = state.allocations.remove(&k) {
                    remember_released(state, &a.ips, now, self.config.cooldown);
                    gone.push(a);
                }
            }
            let changed = !gone.is_empty();
            Ok((gone, changed))
        })
    }

    /// API-based cleanup: release allocations of pods whose UID is not in `live_uids` (the
    /// pods the API server still has) and that are at least `min_age` old, so a fresh ADD
    /// whose pod the watch has not shown yet is never freed. Allocations without a UID (old
    /// runtimes) are left to CNI GC.
    pub fn release_deleted_pods(
        &self,
        live_uids: &HashSet<String>,
        min_age: Duration,
    ) -> Result<Vec<Allocation>, IpamError> {
        let now = self.clock.now_ms();
        let min_age = min_age.as_millis() as u64;
        self.transact(|state| {
            let stale: Vec<String> = state
                .allocations
                .iter()
                .filter(|(_, a)| {
                    !a.pod.uid.is_empty()
                        && !live_uids.contains(&a.pod.uid)
                        && now.saturating_sub(a.allocated_at_ms) >= min_age
                })
                .map(|(k, _)| k.clone())
                .collect();
            let mut gone = Vec::new();
            for k in stale {
                if let Some(a) = state.allocations.remove(&k) {
                    remember_released(state, &a.ips, now, self.config.cooldown);
                    gone.push(a);
                }
            }
            let changed = !gone.is_empty();
            Ok((gone, changed))
        })
    }

    /// One critical section: lock, read, run `change` (which says whether it changed the
    /// state), write back if so.
    fn transact<T>(
        &self,
        change: impl FnOnce(&mut State) -> Result<(T, bool), IpamError>,
    ) -> Result<T, IpamError> {
        let dir = &self.config.dir;
        let io = |source| IpamError::Io {
            dir: dir.clone(),
            source,
        };
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        lock.lock().map_err(io)?;
        let (mut state, fresh) = match read_state(dir)? {
            Some(state) => (state, false),
            None => (State::new(self.config.cidrs), true),
        };
        if state.cidrs != self.config.cidrs {
            return Err(IpamError::PodCidrChanged {
                old: state.cidrs,
                new: self.config.cidrs,
            });
        }
        let (out, changed) = change(&mut state)?;
        if changed || fresh {
            write_state(dir, &state)?;
        }
        drop(lock); // closing the file releases the flock
        Ok(out)
    }
}

fn join_ips(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn remember_released(state: &mut State, ips: &[IpAddr], now: u64, cooldown: Duration) {
    for ip in ips {
        state.released.retain(|r| r.ip != *ip);
        state.released.push(Released {
            ip: *ip,
            at_ms: now,
        });
    }
    // Bound the memory per family: forget the oldest rested entries first.
    let cooldown = cooldown.as_millis() as u64;
    for v6 in [false, true] {
        let mut count = state
            .released
            .iter()
            .filter(|r| r.ip.is_ipv6() == v6)
            .count();
        state.released.retain(|r| {
            if count > MAX_RELEASED_PER_FAMILY
                && r.ip.is_ipv6() == v6
                && now.saturating_sub(r.at_ms) >= cooldown
            {
                count -= 1;
                false
            } else {
                true
            }
        });
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(family_of: IpAddr, n: u128) -> IpAddr {
    match family_of {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// Addresses of `cidr` IPAM may hand out, as offsets from the network address: the network
/// address (0), the tunnel address (1) and the last address are excluded.
fn usable_offsets(cidr: IpNet) -> (u128, u128) {
    let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    let size: u128 = if host_bits >= 128 {
        u128::MAX
    } else {
        1u128 << host_bits
    };
    (2, size - 2)
}

/// Whether `ip` is one of the addresses IPAM never hands out.
pub fn is_reserved(cidr: IpNet, ip: IpAddr) -> bool {
    let (first, last) = usable_offsets(cidr);
    let offset = to_u128(ip).wrapping_sub(to_u128(cidr.network()));
    !cidr.contains(&ip) || offset < first || offset > last
}

fn check_pinned(
    state: &State,
    cidr: IpNet,
    key: &AttachmentKey,
    ip: IpAddr,
) -> Result<IpAddr, IpamError> {
    let refuse = |reason: String| IpamError::PinnedRefused {
        ip,
        key: key.clone(),
        reason,
    };
    if !cidr.contains(&ip) {
        return Err(refuse(format!("outside the node's podCIDR {cidr}")));
    }
    if is_reserved(cidr, ip) {
        return Err(refuse(format!(
            "reserved in {cidr} (network, tunnel or last address)"
        )));
    }
    if let Some(owner) = state.owners().get(&ip) {
        return Err(refuse(format!("in use by {owner}")));
    }
    Ok(ip)
}

/// The next address to hand out in `cidr`: fresh first (cursor), then the least recently
/// released that has rested long enough.
fn pick(
    state: &mut State,
    cidr: IpNet,
    key: &AttachmentKey,
    now: u64,
    cooldown: u64,
) -> Result<IpAddr, IpamError> {
    let owners = state.owners();
    let released: HashSet<IpAddr> = state.released.iter().map(|r| r.ip).collect();
    let (first, last) = usable_offsets(cidr);
    let base = to_u128(cidr.network());
    let cursor = match cidr {
        IpNet::V4(_) => state.cursor_v4.map(IpAddr::V4),
        IpNet::V6(_) => state.cursor_v6.map(IpAddr::V6),
    };
    let mut offset = cursor
        .filter(|c| cidr.contains(c))
        .map(|c| to_u128(c) - base)
        .filter(|o| (first..=last).contains(o))
        .unwrap_or(first);
    let span = (last - first).saturating_add(1);
    for _ in 0..span.min(SCAN_LIMIT) {
        let ip = from_u128(cidr.network(), base + offset);
        offset = if offset >= last { first } else { offset + 1 };
        if !owners.contains_key(&ip) && !released.contains(&ip) {
            let next = from_u128(cidr.network(), base + offset);
            match next {
                IpAddr::V4(a) => state.cursor_v4 = Some(a),
                IpAddr::V6(a) => state.cursor_v6 = Some(a),
            }
            return Ok(ip);
        }
    }
    let family_v6 = cidr.network().is_ipv6();
    let mut cooling = 0;
    for r in &state.released {
        if r.ip.is_ipv6() != family_v6 || owners.contains_key(&r.ip) || !cidr.contains(&r.ip) {
            continue;
        }
        if now.saturating_sub(r.at_ms) >= cooldown {
            return Ok(r.ip); // `released` is oldest first
        }
        cooling += 1;
    }
    Err(IpamError::Exhausted {
        cidr,
        key: key.clone(),
        cooling,
    })
}

fn read_state(dir: &Path) -> Result<Option<State>, IpamError> {
    let path = dir.join(STATE_FILE);
    let mut text = String::new();
    match File::open(&path) {
        Ok(mut f) => f
            .read_to_string(&mut text)
            .map_err(|source| IpamError::Io {
                dir: dir.to_owned(),
                source,
            })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(IpamError::Io {
                dir: dir.to_owned(),
                source,
            });
        }
    };
    let state: State = serde_json::from_str(&text).map_err(|e| IpamError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if state.format != FORMAT {
        return Err(IpamError::Corrupt {
            path,
            reason: format!("format {} (this build reads {FORMAT})", state.format),
        });
    }
    Ok(Some(state))
}

/// tmp + fsync + rename + fsync(dir): the rename is the commit point.
fn write_state(dir: &Path, state: &State) -> Result<(), IpamError> {
    let io = |source| IpamError::Io {
        dir: dir.to_owned(),
        source,
    };
    let body = serde_json::to_vec_pretty(state).map_err(|e| io(std::io::Error::other(e)))?;
    let tmp = dir.join(STATE_TMP);
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&body).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests;
