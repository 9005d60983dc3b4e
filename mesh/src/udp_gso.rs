//! The UDP side of `weft-wg`: gotatun's socket (recvmmsg, UDP GRO), sending runs of
//! encrypted packets to one peer as one datagram with UDP segmentation offload
//! (`UDP_SEGMENT`).
//!
//! Why: every WireGuard packet crosses the node's output and postrouting hooks (kube-proxy's
//! tables, weft's, conntrack) on the way out and prerouting and input on the way in. A run sent
//! as one `sendmsg` with `UDP_SEGMENT` stays one packet through all of them, on both nodes: the
//! kernel cuts it into datagrams at the last moment (or not at all: a veth passes it whole, and
//! the receiving socket, which asks for UDP GRO, takes it whole and is told the segment size).
//! What reaches the wire is the same datagrams a `sendmmsg` would have sent.
//!
//! A run is consecutive packets of the batch gotatun hands over, to the same peer, all of the
//! first one's length but the last, which may be shorter; at most [`MAX_SEGMENTS`] and
//! [`MAX_RUN_BYTES`]. Others go one by one. A run that fails goes out datagram by datagram; if
//! the kernel refused the offload itself (no checksum offload on the route, say), that counts,
//! and after [`GIVE_UP_AFTER`] refusals `weft-wg` stops trying and says so in its log once.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use gotatun::packet::Packet;
use gotatun::udp::socket::{UdpSocket, UdpSocketFactory};
use gotatun::udp::{UdpSend, UdpTransportFactory, UdpTransportFactoryParams};
use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage};
use tokio::io::Interest;

/// Most datagrams in one send (the kernel's limit is 64 or 128 by version).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes in one send (UDP payload limit with room to spare).
pub const MAX_RUN_BYTES: usize = 65_000;
/// Refused runs after which segmentation offload is no longer tried.
pub const GIVE_UP_AFTER: u64 = 3;

/// What the sending side did since the start (shared, for the log).
#[derive(Debug, Default)]
pub struct SendCounters {
    datagrams: AtomicU64,
    sends: AtomicU64,
    refused: AtomicU64,
    off: AtomicBool,
}

impl SendCounters {
    /// Datagrams sent, system calls they took, runs the kernel refused, and whether
    /// segmentation offload was given up.
    pub fn get(&self) -> (u64, u64, u64, bool) {
        (
            self.datagrams.load(Ordering::Relaxed),
            self.sends.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.off.load(Ordering::Relaxed),
        )
    }
}

/// Binds gotatun's socket; sending goes through [`GsoSend`].
pub struct GsoFactory {
    /// gotatun's factory (buffer sizes).
    pub inner: UdpSocketFactory,
    /// Send runs with `UDP_SEGMENT` (false: one datagram per packet, as gotatun does).
    pub segment: bool,
    /// Shared counters.
    pub counters: Arc<SendCounters>,
}

impl UdpTransportFactory for GsoFactory {
    type Send = GsoSend;
    type Recv = UdpSocket;

    async fn bind(
        &mut self,
        params: &UdpTransportFactoryParams,
    ) -> io::Result<(GsoSend, UdpSocket)> {
        let (send, recv) = self.inner.bind(params).await?;
        if !self.segment {
            self.counters.off.store(true, Ordering::Relaxed);
        }
        Ok((
            GsoSend {
                inner: send,
                counters: self.counters.clone(),
            },
            recv,
        ))
    }
}

/// The sending half.
#[derive(Clone)]
pub struct GsoSend {
    inner: UdpSocket,
    counters: Arc<SendCounters>,
}

/// How many datagrams each run has, in order, for `packets` (each one's length and peer).
pub fn runs(packets: &[(usize, SocketAddr)]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < packets.len() {
        let (size, to) = packets[i];
        let (mut j, mut bytes) = (i + 1, size);
        while j < packets.len()
            && j - i < MAX_SEGMENTS
            && packets[j].1 == to
            && packets[j].0 <= size
            && packets[j].0 > 0
            && bytes + packets[j].0 <= MAX_RUN_BYTES
        {
            bytes += packets[j].0;
            j += 1;
            if packets[j - 1].0 < size {
                break;
            }
        }
        out.push(j - i);
        i = j;
    }
    out
}

/// The errors with which the kernel refuses `UDP_SEGMENT` itself: no checksum offload on the
/// route (`EIO`), a segment over the route's MTU or too many segments (`EINVAL`), no support
/// (`EOPNOTSUPP`, `ENOPROTOOPT`).
fn refuses_offload(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOPROTOOPT)
    )
}

impl GsoSend {
    /// One run as one datagram train; Err if the kernel refused it.
    async fn send_run(&self, run: &[(Packet, SocketAddr)]) -> io::Result<()> {
        let socket = self.inner.socket();
        let fd = socket.as_raw_fd();
        let iov: Vec<IoSlice<'_>> = run.iter().map(|(p, _)| IoSlice::new(&p[..])).collect();
        let segment = run[0].0.len() as u16;
        let to = SockaddrStorage::from(run[0].1);
        socket
            .async_io(Interest::WRITABLE, || {
                nix::sys::socket::sendmsg(
                    fd,
                    &iov,
                    &[ControlMessage::UdpGsoSegments(&segment)],
                    MsgFlags::MSG_DONTWAIT,
                    Some(&to),
                )
                .map_err(io::Error::from)
            })
            .await
            .map(|_| ())
    }
}

impl UdpSend for GsoSend {
    type SendManyBuf = <UdpSocket as UdpSend>::SendManyBuf;

    async fn send_to(&self, packet: Packet, destination: SocketAddr) -> io::Result<()> {
        self.counters.datagrams.fetch_add(1, Ordering::Relaxed);
        self.counters.sends.fetch_add(1, Ordering::Relaxed);
        self.inner.send_to(packet, destination).await
    }

    fn max_number_of_packets_to_send(&self) -> usize {
        self.inner.max_number_of_packets_to_send()
    }

    async fn send_many_to(
        &self,
        buf: &mut Self::SendManyBuf,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        let c = &self.counters;
        if c.off.load(Ordering::Relaxed) {
            c.datagrams
                .fetch_add(packets.len() as u64, Ordering::Relaxed);
            c.sends.fetch_add(1, Ordering::Relaxed);
            return self.inner.send_many_to(buf, packets).await;
        }
        let sizes: Vec<(usize, SocketAddr)> = packets.iter().map(|(p, a)| (p.len(), *a)).collect();
        let mut at = 0;
        let mut result = Ok(());
        for n in runs(&sizes) {
            let run = &packets[at..at + n];
            at += n;
            c.datagrams.fetch_add(n as u64, Ordering::Relaxed);
            c.sends.fetch_add(1, Ordering::Relaxed);
            if n > 1 {
                match self.send_run(run).await {
                    Ok(()) => continue,
                    // Only a refusal of the offload itself counts towards giving it up; a
                    // route or filter error (a link down, say) would fail datagram by
                    // datagram just the same.
                    Err(e) if refuses_offload(&e) => {
                        let refused = c.refused.fetch_add(1, Ordering::Relaxed) + 1;
                        if refused >= GIVE_UP_AFTER && !c.off.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                "UDP segmentation offload refused {refused} times (last: {e}); sending one datagram per packet from now on"
                            );
                        }
                    }
                    Err(_) => {}
                }
            }
            // Alone, or a refused run: datagram by datagram.
            for (p, to) in run {
                if let Err(e) = self.inner.socket().send_to(&p[..], *to).await {
                    result = Err(e);
                }
            }
        }
        packets.clear();
        result
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        UdpSend::local_addr(&self.inner)
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        self.inner.set_fwmark(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 2], port))
    }

    #[test]
    fn runs_are_same_peer_same_length_with_a_shorter_last() {
        let (a, b) = (at(1), at(2));
        let p = |n: usize, to| (n, to);
        assert_eq!(runs(&[]), Vec::<usize>::new());
        assert_eq!(runs(&[p(1500, a)]), vec![1]);
        // a a a(short) a | b b | a(longer than b's? new peer) a
        let sizes = [
            p(1500, a),
            p(1500, a),
            p(600, a),
            p(1500, a),
            p(1500, b),
            p(1500, b),
            p(1500, a),
            p(1600, a),
        ];
        assert_eq!(runs(&sizes), vec![3, 1, 2, 1, 1]);
    }

    #[test]
    fn runs_stop_at_the_segment_and_byte_limits() {
        let a = at(1);
        let many: Vec<(usize, SocketAddr)> = (0..150).map(|_| (100, a)).collect();
        assert_eq!(runs(&many), vec![64, 64, 22]);
        let big: Vec<(usize, SocketAddr)> = (0..100).map(|_| (1500, a)).collect();
        let r = runs(&big);
        assert!(r.iter().all(|&n| n * 1500 <= MAX_RUN_BYTES), "{r:?}");
        assert_eq!(r.iter().sum::<usize>(), 100);
        assert_eq!(r[0], MAX_RUN_BYTES / 1500);
    }
}
