//! The mesh on real sockets: accepts and dials TCP control connections and drives each one's
//! [`Connection`] with bytes, application messages and clock ticks, one task per connection.
//! Everything protocol lives in [`crate::connection`]; this file only moves bytes, applies
//! the rate limits, and counts and logs how connections end.
//!
//! Rate limits (`governor`, keyed): inbound handshakes per source IP, dials per peer name.
//! A limited inbound connection is closed before a byte is read; a limited dial returns
//! [`DialError::RateLimited`], and [`MeshNode::maintain`] waits (with jitter) instead.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use governor::{DefaultKeyedRateLimiter, Jitter, Quota, RateLimiter};
use thiserror::Error;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::connection::{CloseReason, Connection, Context, Input, Misbehaviour, Output, PeerInfo};
use crate::metrics::MeshMetrics;
use crate::wire::{FrameDecoder, NodeName, RefuseReason};

/// Default TCP port of the control connections (next to Weave's 6783, not on it, so both can
/// run during a migration).
pub const DEFAULT_PORT: u16 = 6786;

/// Socket-side settings.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// How often connections get [`Input::Tick`].
    pub tick: Duration,
    /// Dial timeout.
    pub connect_timeout: Duration,
    /// Largest time one frame write may take before the peer is considered lost.
    pub write_timeout: Duration,
    /// Handshakes per minute and per peer (inbound: per source IP; dials: per node name).
    pub handshakes_per_minute: NonZeroU32,
    /// Burst allowed above that rate.
    pub handshake_burst: NonZeroU32,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            tick: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            handshakes_per_minute: NonZeroU32::new(30).expect("non-zero"),
            handshake_burst: NonZeroU32::new(5).expect("non-zero"),
        }
    }
}

/// What the mesh tells its owner.
#[derive(Debug)]
pub enum MeshEvent {
    /// A connection finished its handshake.
    Up {
        /// The authenticated peer.
        peer: PeerInfo,
        /// Where to send messages to it.
        link: PeerLink,
    },
    /// An application message from a peer.
    Message {
        /// Sender.
        peer: NodeName,
        /// Payload (see [`crate::message`]).
        payload: Vec<u8>,
    },
    /// A connection ended (before or after its handshake).
    Down {
        /// The peer, if it was authenticated or dialled by name.
        peer: Option<NodeName>,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        reason: CloseReason,
    },
}

/// Sends to one established connection.
#[derive(Debug, Clone)]
pub struct PeerLink {
    tx: mpsc::Sender<Input>,
}

impl PeerLink {
    /// Queues an application message; `false` if the connection is gone.
    pub async fn send(&self, payload: Vec<u8>) -> bool {
        self.tx.send(Input::Send(payload)).await.is_ok()
    }

    /// Whether the connection's task has ended (its link can be dropped).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Queues an application message without waiting; `false` if the connection is gone or
    /// its queue is full (the message is dropped: probes and reports are resent anyway).
    pub fn try_send(&self, payload: Vec<u8>) -> bool {
        self.tx.try_send(Input::Send(payload)).is_ok()
    }

    /// Closes the connection in order.
    pub async fn close(&self) {
        let _ = self.tx.send(Input::Close).await;
    }
}

/// A dial that did not start.
#[derive(Debug, Error)]
pub enum DialError {
    /// Too many attempts to this peer.
    #[error("dials to {peer} rate-limited; retry in {retry_after:?}")]
    RateLimited {
        /// The peer.
        peer: NodeName,
        /// Earliest retry.
        retry_after: Duration,
    },
    /// TCP connect failed or timed out.
    #[error("connecting to {peer} at {addr}: {cause}")]
    Connect {
        /// The peer.
        peer: NodeName,
        /// Its address.
        addr: SocketAddr,
        /// The cause.
        cause: String,
    },
}

/// One node's side of the mesh.
#[derive(Debug)]
pub struct MeshNode {
    ctx: Arc<Context>,
    net: NetConfig,
    metrics: Arc<MeshMetrics>,
    inbound: DefaultKeyedRateLimiter<IpAddr>,
    dials: DefaultKeyedRateLimiter<NodeName>,
    events: mpsc::Sender<MeshEvent>,
}

/// Milliseconds since the Unix epoch (the clock handshake timestamps are judged by).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl MeshNode {
    /// A node; its events arrive on the returned receiver (keep draining it: connections wait
    /// when it is full).
    pub fn new(
        ctx: Context,
        net: NetConfig,
        metrics: Arc<MeshMetrics>,
    ) -> (Arc<MeshNode>, mpsc::Receiver<MeshEvent>) {
        let quota = Quota::per_minute(net.handshakes_per_minute).allow_burst(net.handshake_burst);
        let (events, rx) = mpsc::channel(256);
        let node = MeshNode {
            ctx: Arc::new(ctx),
            inbound: RateLimiter::keyed(quota),
            dials: RateLimiter::keyed(quota),
            net,
            metrics,
            events,
        };
        (Arc::new(node), rx)
    }

    /// The shared context (identity, peer directory).
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Accepts connections until `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = shutdown.changed() => if *shutdown.borrow() { return },
                _ = housekeeping.tick() => {
                    self.inbound.retain_recent();
                    self.dials.retain_recent();
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        if self.inbound.check_key(&addr.ip()).is_err() {
                            self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%addr, "mesh handshake rate-limited; closing");
                            continue;
                        }
                        let now = now_ms();
                        tokio::spawn(self.clone().drive(stream, addr, None, Connection::accept(now), Vec::new()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "mesh accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    /// Dials `peer` at `addr` once (rate-limited); the connection runs in its own task, whose
    /// handle yields why it ended.
    pub async fn connect(
        self: &Arc<Self>,
        peer: NodeName,
        addr: SocketAddr,
    ) -> Result<JoinHandle<CloseReason>, DialError> {
        if let Err(not_until) = self.dials.check_key(&peer) {
            self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
            let retry_after = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            return Err(DialError::RateLimited { peer, retry_after });
        }
        self.dial_now(peer, addr).await
    }

    async fn dial_now(
        self: &Arc<Self>,
        peer: NodeName,
        addr: SocketAddr,
    ) -> Result<JoinHandle<CloseReason>, DialError> {
        let stream =
            match tokio::time::timeout(self.net.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(DialError::Connect {
                        peer,
                        addr,
                        cause: e.to_string(),
                    });
                }
                Err(_) => {
                    return Err(DialError::Connect {
                        peer,
                        addr,
                        cause: "timed out".into(),
                    });
                }
            };
        let (conn, first) = Connection::initiate(&self.ctx, peer.clone(), now_ms());
        Ok(tokio::spawn(self.clone().drive(
            stream,
            addr,
            Some(peer),
            conn,
            first,
        )))
    }

    /// Keeps a connection to `peer` up until `shutdown`: redials whenever it ends, no faster
    /// than the per-peer rate limit (with up to 1 s of jitter, so that a cluster-wide outage
    /// does not end in synchronised reconnects).
    pub async fn maintain(
        self: Arc<Self>,
        peer: NodeName,
        addr: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // A peer that stays unreachable is logged once a minute, not at every attempt.
        let mut failing_since: Option<Instant> = None;
        let mut last_logged: Option<Instant> = None;
        loop {
            let attempt = async {
                self.dials
                    .until_key_ready_with_jitter(&peer, Jitter::up_to(Duration::from_secs(1)))
                    .await;
                match self.dial_now(peer.clone(), addr).await {
                    Ok(task) => {
                        if let Some(t) = failing_since.take() {
                            tracing::info!(peer = %peer, %addr, failing_s = t.elapsed().as_secs(), "mesh dial succeeded again");
                        }
                        last_logged = None;
                        let _ = task.await;
                    }
                    Err(e) => {
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        if last_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            tracing::info!(error = %e, failing_s = since.elapsed().as_secs(), "mesh dial failed; retrying (logged once a minute while it fails)");
                            last_logged = Some(Instant::now());
                        } else {
                            tracing::debug!(error = %e, "mesh dial failed");
                        }
                    }
                }
            };
            tokio::select! {
                _ = shutdown.changed() => if *shutdown.borrow() { return },
                () = attempt => {}
            }
        }
    }

    /// Runs one connection to its end (the loop ends when the state machine closes, the
    /// socket fails, or the peer is silent past `dead_after_ms`, which ticks enforce).
    async fn drive(
        self: Arc<Self>,
        stream: TcpStream,
        addr: SocketAddr,
        mut peer: Option<NodeName>,
        mut conn: Connection,
        mut pending: Vec<Output>,
    ) -> CloseReason {
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Input>(64);
        let mut decoder = FrameDecoder::new(self.ctx.config.max_frame);
        let mut buf = vec![0u8; 16 * 1024];
        let mut ticker = tokio::time::interval(self.net.tick);
        let started = Instant::now();
        let mut established = false;
        self.metrics.handshaking.fetch_add(1, Ordering::Relaxed);
        let reason = 'conn: loop {
            for output in std::mem::take(&mut pending) {
                match output {
                    Output::Transmit(bytes) => {
                        match tokio::time::timeout(self.net.write_timeout, wr.write_all(&bytes))
                            .await
                        {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => break 'conn CloseReason::ConnectionLost(e.to_string()),
                            Err(_) => {
                                break 'conn CloseReason::ConnectionLost("write timed out".into());
                            }
                        }
                    }
                    Output::Established(info) => {
                        established = true;
                        self.metrics.handshaking.fetch_sub(1, Ordering::Relaxed);
                        self.metrics.established.fetch_add(1, Ordering::Relaxed);
                        self.metrics.handshake_done(started.elapsed());
                        tracing::info!(peer = %info.name, %addr, took_us = started.elapsed().as_micros() as u64, "mesh connection established");
                        peer = Some(info.name.clone());
                        let link = PeerLink { tx: tx.clone() };
                        let _ = self.events.send(MeshEvent::Up { peer: info, link }).await;
                    }
                    Output::Deliver(payload) => {
                        let from = peer.clone().expect("delivered only when established");
                        let _ = self
                            .events
                            .send(MeshEvent::Message {
                                peer: from,
                                payload,
                            })
                            .await;
                    }
                    Output::Rekeyed { epoch } => {
                        self.metrics.rekeys.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = ?peer, epoch, "mesh connection rekeyed");
                    }
                    Output::Dropped { len, why } => {
                        tracing::warn!(peer = ?peer, len, why, "mesh message not sent")
                    }
                    Output::Closed(r) => {
                        // Flush what was queued before the close (a refusal, a Close frame).
                        let _ = wr.flush().await;
                        break 'conn r;
                    }
                }
            }
            let mut inputs = Vec::new();
            tokio::select! {
                read = rd.read(&mut buf) => match read {
                    Ok(0) => break 'conn CloseReason::ConnectionLost("peer closed the TCP connection".into()),
                    Err(e) => break 'conn CloseReason::ConnectionLost(e.to_string()),
                    Ok(n) => {
                        decoder.push(&buf[..n]);
                        loop {
                            match decoder.next_frame() {
                                Ok(Some(body)) => inputs.push(Input::Frame(body)),
                                Ok(None) => break,
                                Err(e) => break 'conn CloseReason::Misbehaviour(Misbehaviour::Malformed(e)),
                            }
                        }
                    }
                },
                Some(cmd) = rx.recv(), if established => inputs.push(cmd),
                _ = ticker.tick() => inputs.push(Input::Tick),
            }
            let now = now_ms();
            for input in inputs {
                let (next, out) = conn.step(&self.ctx, now, input);
                conn = next;
                let closing = matches!(conn, Connection::Closed(_));
                pending.extend(out);
                if closing {
                    break;
                }
            }
        };
        drop(wr);
        self.account(&reason, established, peer.as_ref(), addr);
        let _ = self
            .events
            .send(MeshEvent::Down {
                peer,
                addr,
                reason: reason.clone(),
            })
            .await;
        reason
    }

    fn account(
        &self,
        reason: &CloseReason,
        established: bool,
        peer: Option<&NodeName>,
        addr: SocketAddr,
    ) {
        let m = &self.metrics;
        if established {
            m.established.fetch_sub(1, Ordering::Relaxed);
            m.terminated(reason.label());
        } else {
            m.handshaking.fetch_sub(1, Ordering::Relaxed);
            m.handshake_failed(reason.label());
        }
        let peer = peer.map(NodeName::as_str).unwrap_or("?");
        match reason {
            CloseReason::Misbehaviour(Misbehaviour::ClusterSecretMismatch) => tracing::warn!(
                peer, %addr,
                "mesh peer refused: cluster secret mismatch (it does not hold this cluster's mesh secret)"
            ),
            CloseReason::Refused(RefuseReason::ClusterSecret) => tracing::error!(
                peer, %addr,
                "mesh peer refused us: cluster secret mismatch (this node's mesh secret differs from the cluster's)"
            ),
            // Not a violation: the peer's Node has not published its key yet (it does so
            // right after it starts); its dials succeed once our watch sees the annotation.
            CloseReason::Misbehaviour(Misbehaviour::NotAdmitted(
                crate::cluster::Admission::NoPublishedKey(node),
            )) => tracing::info!(
                peer = node.as_str(), %addr,
                "mesh peer not admitted yet: its Node publishes no identity key (yet); it will retry"
            ),
            CloseReason::Misbehaviour(v) => {
                m.violation(v.label());
                tracing::warn!(peer, %addr, violation = v.label(), "mesh peer disconnected: {v}");
            }
            // Usually transient: the peer has not seen our Node's published key yet.
            CloseReason::Refused(RefuseReason::UnknownPeer) => tracing::info!(
                peer, %addr,
                "mesh peer does not admit us yet (it may not have seen our Node's identity key); retrying"
            ),
            CloseReason::Refused(r) => tracing::warn!(peer, %addr, "mesh peer refused us: {r}"),
            other => {
                tracing::info!(peer, %addr, reason = other.label(), "mesh connection ended: {other}")
            }
        }
    }
}

#[cfg(test)]
mod tests;
