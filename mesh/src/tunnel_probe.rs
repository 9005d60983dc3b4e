//! Echo probes through the WireGuard tunnel: does a peer's session still carry packets?
//!
//! The control connection (TCP on the underlay) says nothing about WireGuard's UDP: a session
//! can die after it formed (a firewall change closes the port between two nodes) while the
//! control connection stays up, and WireGuard gives up on the session only when it expires
//! (Reject-After-Time, 180 s). So, while a peer's pods are routed into `wgweft`, the agent
//! sends it an ICMP echo request every second, from its own tunnel address to the peer's. The
//! peer's WireGuard AllowedIPs always hold that host address (see the agent's mesh), so the
//! probe takes the direct session even while the peer's pods are relayed through a third node:
//! it measures exactly the session whose silence triggers the relay, and sees it come back.
//! The peer's kernel answers: no agent is needed there (restarting one changes nothing).
//!
//! The same prober sends every other peer an echo request at its underlay address: while a
//! peer's agent is away (its control connection closed: a restart, an upgrade, a crash loop)
//! these answers, not the agent's silence, say whether its direct path still carries packets.
//!
//! One thread per address family owns a raw ICMP socket (`CAP_NET_RAW`), sends the round's
//! requests and reads answers until the next round; an answer counts when its identifier, its
//! payload tag and its source (a target's address) match. Only the time of each target's last
//! answer is kept: judging silence is the caller's (see [`silence`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::gro::{fold, sum};

/// Payload of every request (answers echo it back): tells our answers from other pingers'.
pub const TAG: &[u8] = b"weft-tunnel-probe";

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

/// How long probes to a target may go unanswered before it counts as silent: `since` is when
/// probing it began, `last_answer` its latest answer (of any earlier period too). `None`
/// while it is not probed or not silent that long.
pub fn silence(
    since: Option<Instant>,
    last_answer: Option<Instant>,
    now: Instant,
    limit: Duration,
) -> Option<Duration> {
    let since = since?;
    let quiet_from = last_answer.map_or(since, |a| a.max(since));
    Some(now.saturating_duration_since(quiet_from)).filter(|d| *d >= limit)
}

/// An ICMP echo request (IPv4: with its checksum; IPv6: the kernel fills it in for raw
/// ICMPv6 sockets, over the pseudo-header it alone knows).
pub fn echo_request(v6: bool, ident: u16, seq: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + TAG.len());
    p.extend([if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 }, 0, 0, 0]);
    p.extend(ident.to_be_bytes());
    p.extend(seq.to_be_bytes());
    p.extend(TAG);
    if !v6 {
        let c = !fold(sum(&p, 0));
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// The source and sequence number of an answer to one of our requests (identifier `ident`),
/// from a datagram as a raw socket of that family reads it: IPv4 with its IP header, IPv6
/// without (`from` is then the source). `None` for anything else.
pub fn parse_answer(v6: bool, datagram: &[u8], from: IpAddr, ident: u16) -> Option<(IpAddr, u16)> {
    let (icmp, src) = if v6 {
        (datagram, from)
    } else {
        let first = *datagram.first()?;
        let ihl = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || ihl < 20 || datagram.len() < ihl || datagram[9] != 1 {
            return None;
        }
        let src: [u8; 4] = datagram[12..16].try_into().ok()?;
        (&datagram[ihl..], IpAddr::from(src))
    };
    let reply = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
    if icmp.len() < 8 + TAG.len()
        || icmp[0] != reply
        || icmp[1] != 0
        || icmp[4..6] != ident.to_be_bytes()
        || &icmp[8..8 + TAG.len()] != TAG
    {
        return None;
    }
    // IPv4's checksum covers the ICMP message alone; IPv6's was checked by the kernel.
    if !v6 && fold(sum(icmp, 0)) != 0xffff {
        return None;
    }
    Some((src, u16::from_be_bytes([icmp[6], icmp[7]])))
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Peer name → the address it is probed at.
    targets: Mutex<BTreeMap<String, IpAddr>>,
    /// Peer name → its latest answer.
    answers: Mutex<BTreeMap<String, Instant>>,
    sent: AtomicU64,
    answered: AtomicU64,
    send_errors: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The probing threads; they stop (within one interval) when this is dropped.
pub struct TunnelProber {
    shared: Arc<Shared>,
    v4: bool,
    v6: bool,
}

impl TunnelProber {
    /// Opens a raw ICMP socket per family and starts probing every `interval` (nothing to
    /// probe until [`TunnelProber::set_targets`]). A family whose socket cannot be opened is
    /// left out ([`TunnelProber::supports`]); an error only when neither can.
    pub fn start(interval: Duration) -> io::Result<TunnelProber> {
        let shared = Arc::new(Shared::default());
        let ident = (std::process::id() & 0xffff) as u16;
        let mut opened = [false; 2];
        let mut first_error = None;
        for (i, v6) in [false, true].into_iter().enumerate() {
            let socket = if v6 {
                Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
            } else {
                Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
            };
            match socket {
                Ok(s) => {
                    let socket = UdpSocket::from(s);
                    let shared = shared.clone();
                    std::thread::Builder::new()
                        .name(format!("weft-tunnel-probe-v{}", if v6 { 6 } else { 4 }))
                        .spawn(move || run(v6, socket, &shared, ident, interval))?;
                    opened[i] = true;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if opened == [false, false] {
            return Err(first_error.unwrap_or_else(|| io::Error::other("no raw ICMP socket")));
        }
        Ok(TunnelProber {
            shared,
            v4: opened[0],
            v6: opened[1],
        })
    }

    /// Whether addresses of `ip`'s family can be probed.
    pub fn supports(&self, ip: &IpAddr) -> bool {
        match ip {
            IpAddr::V4(_) => self.v4,
            IpAddr::V6(_) => self.v6,
        }
    }

    /// The peers to probe from the next round on, each at its address.
    /// A peer probed at another address than before keeps no answer of the old one.
    pub fn set_targets(&self, targets: BTreeMap<String, IpAddr>) {
        let mut answers = lock(&self.shared.answers);
        let mut current = lock(&self.shared.targets);
        answers.retain(|peer, _| {
            targets
                .get(peer)
                .is_some_and(|a| current.get(peer) == Some(a))
        });
        *current = targets;
    }

    /// When `peer` last answered (while it was a target).
    pub fn last_answer(&self, peer: &str) -> Option<Instant> {
        lock(&self.shared.answers).get(peer).copied()
    }

    /// Requests sent, answers matched, sends refused (no route, …) so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.shared.sent.load(Ordering::Relaxed),
            self.shared.answered.load(Ordering::Relaxed),
            self.shared.send_errors.load(Ordering::Relaxed),
        )
    }
}

impl Drop for TunnelProber {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// One family's loop: a round of requests every `interval`, answers read in between.
fn run(v6: bool, socket: UdpSocket, shared: &Shared, ident: u16, interval: Duration) {
    let mut seq: u16 = 0;
    let mut buf = [0u8; 2048];
    let mut next_round = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next_round {
            seq = seq.wrapping_add(1);
            let request = echo_request(v6, ident, seq);
            let addrs: BTreeSet<IpAddr> = lock(&shared.targets)
                .values()
                .filter(|a| a.is_ipv6() == v6)
                .copied()
                .collect();
            for addr in addrs {
                match socket.send_to(&request, SocketAddr::new(addr, 0)) {
                    Ok(_) => shared.sent.fetch_add(1, Ordering::Relaxed),
                    Err(_) => shared.send_errors.fetch_add(1, Ordering::Relaxed),
                };
            }
            next_round = now + interval;
        }
        let wait = next_round
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if socket.set_read_timeout(Some(wait)).is_err() {
            std::thread::sleep(wait);
            continue;
        }
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Some((src, _seq)) = parse_answer(v6, &buf[..n], from.ip(), ident) else {
            continue;
        };
        let at = Instant::now();
        let peers: Vec<String> = lock(&shared.targets)
            .iter()
            .filter(|(_, a)| **a == src)
            .map(|(p, _)| p.clone())
            .collect();
        if peers.is_empty() {
            continue;
        }
        shared.answered.fetch_add(1, Ordering::Relaxed);
        let mut answers = lock(&shared.answers);
        for p in peers {
            answers.insert(p, at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the peer's kernel sends back for `request`: an echo reply with the same
    /// identifier, sequence and payload (IPv4: behind an IP header from `src`).
    fn answer_to(request: &[u8], v6: bool, src: [u8; 4]) -> Vec<u8> {
        let mut icmp = request.to_vec();
        icmp[0] = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
        if v6 {
            return icmp;
        }
        icmp[2..4].fill(0);
        let c = !fold(sum(&icmp, 0));
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
        ip.extend(src);
        ip.extend([198, 19, 0, 1]);
        ip.extend(icmp);
        ip
    }

    #[test]
    fn a_request_carries_identifier_sequence_tag_and_a_valid_ipv4_checksum() {
        let r = echo_request(false, 0x1234, 7);
        assert_eq!(r[0], ECHO_REQUEST_V4);
        assert_eq!(&r[4..8], &[0x12, 0x34, 0, 7]);
        assert_eq!(&r[8..], TAG);
        assert_eq!(fold(sum(&r, 0)), 0xffff, "checksum verifies");
        let r6 = echo_request(true, 0x1234, 7);
        assert_eq!((r6[0], &r6[2..4]), (ECHO_REQUEST_V6, &[0u8, 0][..]));
    }

    #[test]
    fn only_answers_to_our_requests_count() {
        let from: IpAddr = "198.19.0.2".parse().unwrap();
        let req = echo_request(false, 99, 3);
        let ok = answer_to(&req, false, [198, 19, 0, 2]);
        assert_eq!(parse_answer(false, &ok, from, 99), Some((from, 3)));
        // Another process's identifier, a request (not an answer), a corrupted byte, a
        // foreign payload, a truncated message, a non-ICMP protocol: none count.
        assert_eq!(parse_answer(false, &ok, from, 98), None);
        let mut request_in = ok.clone();
        request_in[20] = ECHO_REQUEST_V4;
        assert_eq!(parse_answer(false, &request_in, from, 99), None);
        let mut corrupt = ok.clone();
        corrupt[27] ^= 1;
        assert_eq!(parse_answer(false, &corrupt, from, 99), None);
        let mut foreign = echo_request(false, 99, 3);
        foreign[8..].copy_from_slice(b"something-else-!!");
        let foreign = answer_to(&foreign, false, [198, 19, 0, 2]);
        assert_eq!(parse_answer(false, &foreign, from, 99), None);
        assert_eq!(parse_answer(false, &ok[..30], from, 99), None);
        let mut udp = ok.clone();
        udp[9] = 17;
        assert_eq!(parse_answer(false, &udp, from, 99), None);
        assert_eq!(parse_answer(false, &[], from, 99), None);
        // The source is the IP header's (the peer's tunnel address).
        let other = answer_to(&req, false, [198, 19, 0, 3]);
        assert_eq!(
            parse_answer(false, &other, from, 99),
            Some(("198.19.0.3".parse().unwrap(), 3))
        );

        let from6: IpAddr = "fd00:10:244:ff::2".parse().unwrap();
        let req6 = echo_request(true, 99, 4);
        let ok6 = answer_to(&req6, true, [0; 4]);
        assert_eq!(parse_answer(true, &ok6, from6, 99), Some((from6, 4)));
        assert_eq!(parse_answer(true, &req6, from6, 99), None, "a request");
        assert_eq!(parse_answer(true, &ok6, from6, 1), None);
        // An IPv4 answer read as IPv6 (no header expected): refused.
        assert_eq!(parse_answer(true, &ok, from6, 99), None);
    }

    #[test]
    fn silence_counts_from_the_later_of_the_start_and_the_last_answer() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let limit = Duration::from_secs(5);
        // Not probed: never silent.
        assert_eq!(silence(None, Some(t0), s(100), limit), None);
        // Probed since t0, never answered: silent from t0 + 5 s on.
        assert_eq!(silence(Some(t0), None, s(4), limit), None);
        assert_eq!(
            silence(Some(t0), None, s(5), limit),
            Some(Duration::from_secs(5))
        );
        // An answer resets it.
        assert_eq!(silence(Some(t0), Some(s(3)), s(7), limit), None);
        assert_eq!(
            silence(Some(t0), Some(s(3)), s(9), limit),
            Some(Duration::from_secs(6))
        );
        // An answer from before this probing period does not make it older.
        assert_eq!(silence(Some(s(10)), Some(s(2)), s(12), limit), None);
        assert_eq!(
            silence(Some(s(10)), Some(s(2)), s(16), limit),
            Some(Duration::from_secs(6))
        );
    }
}
