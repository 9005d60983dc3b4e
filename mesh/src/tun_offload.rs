//! The TUN device of `weft-wg`, opened with a virtio-net header (`IFF_VNET_HDR`) so that
//! decrypted TCP segments are written merged ([`crate::gro`]): one pass through the node's
//! receive path (netfilter hooks, conntrack, forwarding, the pod's veth and IP stack) per run
//! of segments instead of one per segment.
//!
//! Reading is unchanged in effect: the device is never given checksum or segmentation offloads
//! (`TUNSETOFFLOAD` is not called), so the kernel hands over whole, checksummed packets, each
//! behind a header that says so; a packet that still asks for its checksum is completed here,
//! and a segmentation request (which this device never announces) is dropped and logged.
//!
//! Writing goes through a queue: gotatun hands over decrypted packets one by one; a task takes
//! all that are waiting (up to [`BATCH`]), merges runs and writes the frames in order. Under
//! load the queue fills while a write is under way, so batches grow exactly when merging pays.

use std::io;
use std::iter;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Buf;
use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::tun::{self, AbstractDevice};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use tokio::sync::{mpsc, watch};

use crate::gro::{F_NEEDS_CSUM, GSO_NONE, Gro, GroStats, VNET_HDR_LEN, VnetHdr, complete_checksum};

/// Most packets taken from the queue for one batch.
pub const BATCH: usize = 128;
const QUEUE: usize = 1024;

/// Counters of the writing side, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct Counters {
    packets: AtomicU64,
    frames: AtomicU64,
    merged: AtomicU64,
    write_errors: AtomicU64,
}

impl Counters {
    /// Packets written, frames they became, packets that went into merged frames.
    pub fn stats(&self) -> GroStats {
        GroStats {
            packets: self.packets.load(Ordering::Relaxed),
            frames: self.frames.load(Ordering::Relaxed),
            merged: self.merged.load(Ordering::Relaxed),
        }
    }

    /// Writes the TUN device refused (the packet is lost, as a full queue would lose it).
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }
}

/// Aborts the writer task when the last sender goes.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The sending half: what gotatun writes decrypted packets to.
#[derive(Clone)]
pub struct VnetSend {
    tx: mpsc::Sender<Packet<Ip>>,
    /// The errno that stopped the writer (0 while it runs).
    failed: Arc<AtomicI32>,
    _writer: Arc<Abort>,
}

/// The receiving half: what gotatun reads packets to encrypt from.
pub struct VnetRecv {
    dev: Arc<tun::AsyncDevice>,
    mtu: MtuWatcher,
    _mtu_poll: Arc<Abort>,
}

/// Opens (or creates) TUN device `name` with a virtio-net header; both halves, and the
/// writer's counters. With `merge` false every packet is written alone (for comparisons).
/// Must run inside a tokio runtime.
pub fn open(name: &str, merge: bool) -> io::Result<(VnetSend, VnetRecv, Arc<Counters>)> {
    let mut config = tun::Configuration::default();
    config.tun_name(name);
    config.platform_config(|p| {
        p.vnet_hdr(true);
    });
    let dev = Arc::new(tun::create_as_async(&config).map_err(io::Error::other)?);
    let mtu0 = dev.mtu().map_err(io::Error::other)?;
    let (mtu_tx, mtu_rx) = watch::channel(mtu0);
    let weak = Arc::downgrade(&dev);
    // gotatun pads to the MTU and sizes its buffers by it: follow changes (the agent sets it).
    let mtu_poll = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let Some(dev) = weak.upgrade() else { return };
            if let Ok(m) = dev.mtu()
                && m != *mtu_tx.borrow()
                && mtu_tx.send(m).is_err()
            {
                return;
            }
        }
    });
    let counters = Arc::new(Counters::default());
    let failed = Arc::new(AtomicI32::new(0));
    let (tx, rx) = mpsc::channel(QUEUE);
    let writer = tokio::spawn(write_loop(
        dev.clone(),
        rx,
        merge,
        counters.clone(),
        failed.clone(),
    ));
    Ok((
        VnetSend {
            tx,
            failed,
            _writer: Arc::new(Abort(writer)),
        },
        VnetRecv {
            dev,
            mtu: mtu_rx.into(),
            _mtu_poll: Arc::new(Abort(mtu_poll)),
        },
        counters,
    ))
}

/// The device is gone: the writer stops and gotatun is told (it ends the device).
fn fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF) | Some(libc::EBADFD) | Some(libc::ENODEV)
    )
}

async fn write_loop(
    dev: Arc<tun::AsyncDevice>,
    mut rx: mpsc::Receiver<Packet<Ip>>,
    merge: bool,
    counters: Arc<Counters>,
    failed: Arc<AtomicI32>,
) {
    let mut gro = Gro::new(merge);
    let mut batch = Vec::with_capacity(BATCH);
    let warn = Once::new();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        for p in batch.drain(..) {
            gro.push(p.into_bytes().as_ref());
        }
        for frame in gro.finish() {
            if let Err(e) = dev.send(frame).await {
                if fatal(&e) {
                    tracing::error!("TUN device gone: {e}");
                    failed.store(e.raw_os_error().unwrap_or(libc::ENODEV), Ordering::Relaxed);
                    return;
                }
                counters.write_errors.fetch_add(1, Ordering::Relaxed);
                warn.call_once(|| {
                    tracing::warn!("TUN write failed (counted, logged once): {e}");
                });
            }
        }
        gro.clear();
        let s = gro.stats;
        counters.packets.store(s.packets, Ordering::Relaxed);
        counters.frames.store(s.frames, Ordering::Relaxed);
        counters.merged.store(s.merged, Ordering::Relaxed);
    }
}

impl IpSend for VnetSend {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        if self.tx.send(packet).await.is_err() {
            let errno = self.failed.load(Ordering::Relaxed);
            return Err(if errno != 0 {
                io::Error::from_raw_os_error(errno)
            } else {
                io::Error::new(io::ErrorKind::BrokenPipe, "TUN writer stopped")
            });
        }
        Ok(())
    }
}

impl IpRecv for VnetRecv {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        static GSO_WARN: Once = Once::new();
        loop {
            let mut packet = pool.get();
            let n = self.dev.recv(&mut packet).await?;
            let Some(hdr) = VnetHdr::parse(&packet[..n]) else {
                continue;
            };
            packet.truncate(n);
            packet.buf_mut().advance(VNET_HDR_LEN);
            if hdr.gso_type != GSO_NONE {
                GSO_WARN.call_once(|| {
                    tracing::warn!(
                        "TUN handed over a segmentation request (type {}) it was never offered; dropped (logged once)",
                        hdr.gso_type
                    );
                });
                continue;
            }
            if hdr.flags & F_NEEDS_CSUM != 0 && !complete_checksum(&mut packet[..], &hdr) {
                continue;
            }
            return match packet.try_into_ip() {
                Ok(p) => Ok(iter::once(p)),
                Err(e) => Err(io::Error::other(e.to_string())),
            };
        }
    }

    fn mtu(&self) -> MtuWatcher {
        self.mtu.clone()
    }
}
