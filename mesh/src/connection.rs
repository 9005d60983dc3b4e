//! One control connection as an explicit state machine: [`Connection`] holds only the data of
//! its current state, and [`Connection::step`] moves it on by one [`Input`] (a frame body from
//! the peer, a message to send, a clock tick, a local close), returning what to do
//! ([`Output`]). No sockets and no clock inside: the driver ([`crate::net`]) reads and writes
//! bytes and passes the time in, so the protocol is tested here without a network.
//!
//! ```text
//!  initiate ─▶ AwaitServerHello ─┐                    ┌─▶ Established ─▶ Closed
//!  accept   ─▶ AwaitClientHello ─▶ AwaitClientFinish ─┘        (any error) ─▶ Closed
//! ```
//!
//! Every violation (a frame that does not parse, a frame out of place, a bad MAC or
//! signature, a replayed or reordered counter) closes the connection with a [`Misbehaviour`].
//! Rekey (initiator side, every `rekey_interval_ms` or `rekey_after_frames`):
//! `RekeyInit(e')` under the old keys → the responder answers `RekeyAck(e'')` as its last
//! frame under the old key and switches its sending key → the initiator switches both keys and
//! sends `RekeyDone` first under the new one → the responder switches its receiving key on it.
//! Each direction's frames carry `(epoch, counter)`; a receiver accepts exactly the next one.

use std::sync::Mutex;

use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;

use crate::cluster::{Admission, ClusterKeys, PeerDirectory, hkdf_fill};
use crate::identity::{Identity, verify};
use crate::replay::{ReplayGuard, Stale, check_skew};
use crate::wire::{
    self, DEFAULT_MAX_FRAME, Hello, Inner, KEY_LEN, Kind, MAC_LEN, NONCE_LEN, NodeName, Reader,
    RefuseReason, SEALED_HEADER, SIG_LEN, TAG_LEN, WireError,
};

const CLIENT_HELLO_MAC: &[u8] = b"weft-mesh/1 client hello";
const SERVER_HELLO_SIG: &[u8] = b"weft-mesh/1 server hello signature";
const SERVER_HELLO_MAC: &[u8] = b"weft-mesh/1 server hello mac";
const CLIENT_FINISH_SIG: &[u8] = b"weft-mesh/1 client finish signature";
const CLIENT_FINISH_MAC: &[u8] = b"weft-mesh/1 client finish mac";
const SESSION_INFO: &[u8] = b"weft-mesh/1 session keys";
const REKEY_INFO: &[u8] = b"weft-mesh/1 rekey";

/// Timing and size limits of a connection.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// A handshake (or a rekey exchange) must finish within this.
    pub handshake_timeout_ms: u64,
    /// Largest accepted distance between a hello's timestamp and the local clock.
    pub timestamp_window_ms: u64,
    /// The initiator rekeys after this long under one key.
    pub rekey_interval_ms: u64,
    /// ... or after sending this many frames under one key.
    pub rekey_after_frames: u64,
    /// Send a keepalive after this long without sending anything.
    pub keepalive_ms: u64,
    /// Close after this long without hearing anything.
    pub dead_after_ms: u64,
    /// Largest frame body accepted or sent.
    pub max_frame: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            handshake_timeout_ms: 10_000,
            timestamp_window_ms: 120_000,
            rekey_interval_ms: 10 * 60_000,
            rekey_after_frames: 1 << 32,
            keepalive_ms: 10_000,
            dead_after_ms: 35_000,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

impl SessionConfig {
    /// Largest application payload that fits one sealed frame.
    pub fn max_payload(&self) -> usize {
        self.max_frame.saturating_sub(SEALED_HEADER + TAG_LEN + 1)
    }
}

/// What every connection of this node shares: who we are, the cluster keys, who may connect,
/// and the hello replay guard.
#[derive(Debug)]
pub struct Context {
    /// This node's name.
    pub node: NodeName,
    /// This node's signing key.
    pub identity: Identity,
    /// Keys from the cluster secret.
    pub cluster: ClusterKeys,
    /// Limits.
    pub config: SessionConfig,
    /// Who may connect.
    pub peers: PeerDirectory,
    replay: Mutex<ReplayGuard>,
    rng: SystemRandom,
}

impl Context {
    /// A context; the replay guard remembers up to 4096 hello nonces.
    pub fn new(
        node: NodeName,
        identity: Identity,
        cluster: ClusterKeys,
        config: SessionConfig,
    ) -> Context {
        Context {
            replay: Mutex::new(ReplayGuard::new(config.timestamp_window_ms, 4096)),
            node,
            identity,
            cluster,
            config,
            peers: PeerDirectory::default(),
            rng: SystemRandom::new(),
        }
    }

    fn random<const N: usize>(&self) -> [u8; N] {
        let mut b = [0; N];
        self.rng
            .fill(&mut b)
            .expect("the system random generator works");
        b
    }

    fn ephemeral(&self) -> Result<(EphemeralPrivateKey, [u8; KEY_LEN]), Misbehaviour> {
        let key = EphemeralPrivateKey::generate(&X25519, &self.rng)
            .map_err(|_| Misbehaviour::KeyAgreement)?;
        let public = key
            .compute_public_key()
            .map_err(|_| Misbehaviour::KeyAgreement)?;
        let mut p = [0; KEY_LEN];
        p.copy_from_slice(public.as_ref());
        Ok((key, p))
    }
}

/// Something the peer did that ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Misbehaviour {
    /// A frame or message that does not parse (including an oversized length).
    #[error("malformed frame: {0}")]
    Malformed(#[from] WireError),
    /// A well-formed message that has no place in the current state.
    #[error("unexpected {got} while {state}")]
    Unexpected {
        /// The state.
        state: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The peer's handshake MAC does not verify: it does not hold our cluster secret.
    #[error("cluster secret mismatch (the peer's handshake MAC does not verify)")]
    ClusterSecretMismatch,
    /// The transcript signature does not verify with the presented identity key.
    #[error("bad transcript signature")]
    BadSignature,
    /// The hello's timestamp is outside the window.
    #[error("hello timestamp {skew_ms} ms away from our clock")]
    ClockSkew {
        /// Peer time minus our time.
        skew_ms: i64,
    },
    /// A hello nonce seen before.
    #[error("replayed hello")]
    ReplayedHello,
    /// Not a member, or not its published key.
    #[error("{0}")]
    NotAdmitted(Admission),
    /// We dialled one node and another answered.
    #[error("dialled {expected} but {got} answered")]
    WrongPeer {
        /// Dialled.
        expected: NodeName,
        /// Answered.
        got: NodeName,
    },
    /// The peer is this node.
    #[error("connection to ourselves")]
    SelfConnection,
    /// The X25519 agreement failed (an invalid public key).
    #[error("key agreement failed")]
    KeyAgreement,
    /// A sealed frame that does not authenticate.
    #[error("sealed frame fails authentication")]
    BadMac,
    /// A sealed frame whose (epoch, counter) is not the next one.
    #[error(
        "replayed or reordered frame: got {epoch}/{counter}, expected {expected_epoch}/{expected_counter}"
    )]
    Replay {
        /// Received epoch.
        epoch: u32,
        /// Received counter.
        counter: u64,
        /// Expected epoch.
        expected_epoch: u32,
        /// Expected counter.
        expected_counter: u64,
    },
}

impl Misbehaviour {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Misbehaviour::Malformed(WireError::Oversize { .. }) => "oversize",
            Misbehaviour::Malformed(_) => "malformed",
            Misbehaviour::Unexpected { .. } => "unexpected_message",
            Misbehaviour::ClusterSecretMismatch => "cluster_secret_mismatch",
            Misbehaviour::BadSignature => "bad_signature",
            Misbehaviour::ClockSkew { .. } => "clock_skew",
            Misbehaviour::ReplayedHello => "replayed_hello",
            Misbehaviour::NotAdmitted(_) => "not_admitted",
            Misbehaviour::WrongPeer { .. } => "wrong_peer",
            Misbehaviour::SelfConnection => "self_connection",
            Misbehaviour::KeyAgreement => "key_agreement",
            Misbehaviour::BadMac => "bad_mac",
            Misbehaviour::Replay { .. } => "replay",
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CloseReason {
    /// We closed it.
    #[error("closed locally")]
    Local,
    /// The peer closed it in order.
    #[error("closed by the peer")]
    PeerClosed,
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The peer did not answer a rekey in time.
    #[error("rekey timed out")]
    RekeyTimeout,
    /// Nothing heard for too long.
    #[error("peer silent")]
    PeerSilent,
    /// A counter ran out (never in practice: rekeys come first).
    #[error("frame counter exhausted")]
    CounterExhausted,
    /// The responder refused our hello.
    #[error("refused by the peer: {0}")]
    Refused(RefuseReason),
    /// The peer broke the protocol.
    #[error("{0}")]
    Misbehaviour(Misbehaviour),
    /// The TCP connection failed or ended (set by the driver).
    #[error("connection lost: {0}")]
    ConnectionLost(String),
}

impl CloseReason {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::Local => "local",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::RekeyTimeout => "rekey_timeout",
            CloseReason::PeerSilent => "peer_silent",
            CloseReason::CounterExhausted => "counter_exhausted",
            CloseReason::Refused(RefuseReason::ClusterSecret) => "refused_cluster_secret",
            CloseReason::Refused(_) => "refused",
            CloseReason::Misbehaviour(m) => m.label(),
            CloseReason::ConnectionLost(_) => "connection_lost",
        }
    }
}

impl From<Misbehaviour> for CloseReason {
    fn from(m: Misbehaviour) -> Self {
        CloseReason::Misbehaviour(m)
    }
}

/// The authenticated peer of an established connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its node name.
    pub name: NodeName,
    /// Its Ed25519 identity key.
    pub identity: [u8; KEY_LEN],
    /// Whether we dialled it.
    pub we_initiated: bool,
}

/// What moves a connection on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A frame body from the peer (length prefix already checked and removed).
    Frame(Vec<u8>),
    /// An application message to send.
    Send(Vec<u8>),
    /// The clock moved (rekey, keepalive, timeouts).
    Tick,
    /// Close in order.
    Close,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write these bytes (a whole frame, with its length prefix).
    Transmit(Vec<u8>),
    /// The handshake finished.
    Established(PeerInfo),
    /// An application message arrived.
    Deliver(Vec<u8>),
    /// New keys are in use.
    Rekeyed {
        /// The new epoch.
        epoch: u32,
    },
    /// An application message was not sent.
    Dropped {
        /// Its length.
        len: usize,
        /// Why.
        why: &'static str,
    },
    /// The connection is over; close the socket.
    Closed(CloseReason),
}

/// The initiator's state while waiting for the ServerHello.
#[derive(Debug)]
pub struct InitiatorWait {
    peer: NodeName,
    ephemeral: EphemeralPrivateKey,
    client_hello: Vec<u8>,
    started_ms: u64,
}

/// The responder's state while waiting for the ClientFinish (keys already agreed).
#[derive(Debug)]
pub struct ResponderWait {
    peer: PeerInfo,
    transcript: [u8; 32],
    keys: Keys,
    started_ms: u64,
}

/// A control connection.
#[derive(Debug)]
pub enum Connection {
    /// Initiator: ClientHello sent.
    AwaitServerHello(InitiatorWait),
    /// Responder: nothing received yet.
    AwaitClientHello {
        /// When the TCP connection was accepted.
        started_ms: u64,
    },
    /// Responder: ServerHello sent.
    AwaitClientFinish(ResponderWait),
    /// Handshake done; sealed frames both ways.
    Established(Box<Session>),
    /// Over.
    Closed(CloseReason),
}

/// Key material of one agreement.
#[derive(Debug)]
struct Keys {
    chaining: [u8; 32],
    initiator_to_responder: [u8; 32],
    responder_to_initiator: [u8; 32],
}

fn derive(salt: &[u8], shared: &[u8], psk: &[u8], info: &[&[u8]]) -> Keys {
    let mut okm = [0u8; 96];
    hkdf_fill(salt, &[shared, psk].concat(), &info.concat(), &mut okm);
    let mut k = Keys {
        chaining: [0; 32],
        initiator_to_responder: [0; 32],
        responder_to_initiator: [0; 32],
    };
    k.chaining.copy_from_slice(&okm[..32]);
    k.initiator_to_responder.copy_from_slice(&okm[32..64]);
    k.responder_to_initiator.copy_from_slice(&okm[64..]);
    k
}

fn agree(
    ours: EphemeralPrivateKey,
    theirs: &[u8; KEY_LEN],
    salt: &[u8],
    psk: &[u8],
    info: &[&[u8]],
) -> Result<Keys, Misbehaviour> {
    agreement::agree_ephemeral(ours, &UnparsedPublicKey::new(&X25519, theirs), |shared| {
        derive(salt, shared, psk, info)
    })
    .map_err(|_| Misbehaviour::KeyAgreement)
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// One direction's key with its epoch and next counter.
#[derive(Debug)]
struct DirectionKey {
    key: LessSafeKey,
    epoch: u32,
    counter: u64,
}

impl DirectionKey {
    fn new(bytes: &[u8; 32], epoch: u32) -> DirectionKey {
        let key =
            UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("32-byte ChaCha20-Poly1305 key");
        DirectionKey {
            key: LessSafeKey::new(key),
            epoch,
            counter: 0,
        }
    }

    fn nonce(&self) -> Nonce {
        let mut n = [0; aead::NONCE_LEN];
        n[..4].copy_from_slice(&self.epoch.to_be_bytes());
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }

    fn header(&self) -> [u8; SEALED_HEADER] {
        let mut h = [0; SEALED_HEADER];
        h[0] = Kind::Sealed as u8;
        h[1..5].copy_from_slice(&self.epoch.to_be_bytes());
        h[5..].copy_from_slice(&self.counter.to_be_bytes());
        h
    }
}

/// The initiator's rekey progress.
#[derive(Debug)]
enum Rekey {
    /// Current keys in use since `since_ms`.
    Idle { since_ms: u64 },
    /// RekeyInit sent.
    Awaiting {
        ephemeral: EphemeralPrivateKey,
        sent_ms: u64,
    },
}

/// An established connection's keys, counters and timers.
#[derive(Debug)]
pub struct Session {
    peer: PeerInfo,
    chaining: [u8; 32],
    send: DirectionKey,
    recv: DirectionKey,
    /// Responder after a RekeyAck: the key the initiator switches to with RekeyDone.
    recv_next: Option<DirectionKey>,
    rekey: Rekey,
    last_sent_ms: u64,
    last_heard_ms: u64,
}

impl Session {
    fn new(peer: PeerInfo, keys: &Keys, now_ms: u64) -> Session {
        let (send, recv) = if peer.we_initiated {
            (&keys.initiator_to_responder, &keys.responder_to_initiator)
        } else {
            (&keys.responder_to_initiator, &keys.initiator_to_responder)
        };
        Session {
            peer,
            chaining: keys.chaining,
            send: DirectionKey::new(send, 0),
            recv: DirectionKey::new(recv, 0),
            recv_next: None,
            rekey: Rekey::Idle { since_ms: now_ms },
            last_sent_ms: now_ms,
            last_heard_ms: now_ms,
        }
    }

    /// The authenticated peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// The epoch of the sending key.
    pub fn epoch(&self) -> u32 {
        self.send.epoch
    }

    fn seal(&mut self, inner: &Inner, now_ms: u64) -> Result<Vec<u8>, CloseReason> {
        if self.send.counter == u64::MAX {
            return Err(CloseReason::CounterExhausted);
        }
        let header = self.send.header();
        let mut buf = inner.encode();
        self.send
            .key
            .seal_in_place_append_tag(self.send.nonce(), Aad::from(header), &mut buf)
            .map_err(|_| CloseReason::CounterExhausted)?;
        self.send.counter += 1;
        self.last_sent_ms = now_ms;
        Ok(wire::frame(&[&header[..], &buf].concat()))
    }

    /// Opens a sealed frame; `true` if it was the first under the pending receive key.
    fn open(&mut self, body: &[u8]) -> Result<(Inner, bool), Misbehaviour> {
        let mut r = Reader::new(body, "sealed frame");
        r.u8()?;
        let epoch = r.u32()?;
        let counter = r.u64()?;
        let ciphertext = r.rest();
        if ciphertext.len() < TAG_LEN + 1 {
            return Err(WireError::Truncated("sealed frame").into());
        }
        let switching = match &self.recv_next {
            _ if epoch == self.recv.epoch && counter == self.recv.counter => false,
            Some(next) if epoch == next.epoch && counter == 0 => true,
            _ => {
                return Err(Misbehaviour::Replay {
                    epoch,
                    counter,
                    expected_epoch: self.recv.epoch,
                    expected_counter: self.recv.counter,
                });
            }
        };
        let key = if switching {
            self.recv_next.as_ref().expect("checked above")
        } else {
            &self.recv
        };
        let mut buf = ciphertext.to_vec();
        let plain = key
            .key
            .open_in_place(key.nonce(), Aad::from(&body[..SEALED_HEADER]), &mut buf)
            .map_err(|_| Misbehaviour::BadMac)?;
        let inner = Inner::decode(plain)?;
        if switching {
            self.recv = self.recv_next.take().expect("checked above");
        }
        self.recv.counter += 1;
        Ok((inner, switching))
    }
}

fn closed(reason: impl Into<CloseReason>, mut outputs: Vec<Output>) -> (Connection, Vec<Output>) {
    let reason = reason.into();
    outputs.push(Output::Closed(reason.clone()));
    (Connection::Closed(reason), outputs)
}

fn kind_name(body: &[u8]) -> &'static str {
    match Kind::of(body) {
        Ok(Kind::ClientHello) => "ClientHello",
        Ok(Kind::ServerHello) => "ServerHello",
        Ok(Kind::ClientFinish) => "ClientFinish",
        Ok(Kind::Sealed) => "sealed frame",
        Ok(Kind::Refused) => "refusal",
        Err(_) => "unknown kind",
    }
}

impl Connection {
    /// Starts a connection to `peer`: the ClientHello to write.
    pub fn initiate(ctx: &Context, peer: NodeName, now_ms: u64) -> (Connection, Vec<Output>) {
        let (ephemeral, public) = match ctx.ephemeral() {
            Ok(k) => k,
            Err(m) => return closed(m, Vec::new()),
        };
        let hello = Hello {
            name: ctx.node.clone(),
            identity: ctx.identity.public_key(),
            ephemeral: public,
            nonce: ctx.random::<NONCE_LEN>(),
            timestamp_ms: now_ms,
        };
        let mut body = Vec::new();
        hello.encode(Kind::ClientHello, &mut body);
        let mac = ctx.cluster.mac(&[CLIENT_HELLO_MAC, &body]);
        body.extend_from_slice(&mac);
        let out = vec![Output::Transmit(wire::frame(&body))];
        let wait = InitiatorWait {
            peer,
            ephemeral,
            client_hello: body,
            started_ms: now_ms,
        };
        (Connection::AwaitServerHello(wait), out)
    }

    /// A connection just accepted.
    pub fn accept(now_ms: u64) -> Connection {
        Connection::AwaitClientHello { started_ms: now_ms }
    }

    /// The state's name (logs, metrics).
    pub fn state(&self) -> &'static str {
        match self {
            Connection::AwaitServerHello(_) => "awaiting ServerHello",
            Connection::AwaitClientHello { .. } => "awaiting ClientHello",
            Connection::AwaitClientFinish(_) => "awaiting ClientFinish",
            Connection::Established(_) => "established",
            Connection::Closed(_) => "closed",
        }
    }

    /// The session, once established.
    pub fn session(&self) -> Option<&Session> {
        match self {
            Connection::Established(s) => Some(s),
            _ => None,
        }
    }

    /// Moves the connection on by one input at local time `now_ms`.
    pub fn step(self, ctx: &Context, now_ms: u64, input: Input) -> (Connection, Vec<Output>) {
        let state = self.state();
        match (self, input) {
            (Connection::Closed(r), _) => (Connection::Closed(r), Vec::new()),
            (Connection::Established(s), input) => established(*s, ctx, now_ms, input),
            (_, Input::Close) => closed(CloseReason::Local, Vec::new()),
            (c, Input::Send(d)) => {
                let out = vec![Output::Dropped {
                    len: d.len(),
                    why: "handshake not finished",
                }];
                (c, out)
            }
            (c, Input::Tick) => {
                let started = match &c {
                    Connection::AwaitServerHello(w) => w.started_ms,
                    Connection::AwaitClientHello { started_ms } => *started_ms,
                    Connection::AwaitClientFinish(w) => w.started_ms,
                    _ => now_ms,
                };
                if now_ms.saturating_sub(started) > ctx.config.handshake_timeout_ms {
                    closed(CloseReason::HandshakeTimeout, Vec::new())
                } else {
                    (c, Vec::new())
                }
            }
            (Connection::AwaitClientHello { .. }, Input::Frame(body)) => match Kind::of(&body) {
                Ok(Kind::ClientHello) => on_client_hello(ctx, now_ms, &body),
                Ok(_) => closed(
                    Misbehaviour::Unexpected {
                        state,
                        got: kind_name(&body),
                    },
                    Vec::new(),
                ),
                Err(e) => closed(Misbehaviour::from(e), Vec::new()),
            },
            (Connection::AwaitServerHello(w), Input::Frame(body)) => match Kind::of(&body) {
                Ok(Kind::ServerHello) => on_server_hello(ctx, now_ms, w, &body),
                Ok(Kind::Refused) => match RefuseReason::decode(&body) {
                    Ok(r) => closed(CloseReason::Refused(r), Vec::new()),
                    Err(e) => closed(Misbehaviour::from(e), Vec::new()),
                },
                Ok(_) => closed(
                    Misbehaviour::Unexpected {
                        state,
                        got: kind_name(&body),
                    },
                    Vec::new(),
                ),
                Err(e) => closed(Misbehaviour::from(e), Vec::new()),
            },
            (Connection::AwaitClientFinish(w), Input::Frame(body)) => match Kind::of(&body) {
                Ok(Kind::ClientFinish) => on_client_finish(ctx, now_ms, w, &body),
                Ok(_) => closed(
                    Misbehaviour::Unexpected {
                        state,
                        got: kind_name(&body),
                    },
                    Vec::new(),
                ),
                Err(e) => closed(Misbehaviour::from(e), Vec::new()),
            },
        }
    }
}

/// The responder refuses a hello: tell the peer why (plaintext), then close.
fn refuse(reason: RefuseReason, why: Misbehaviour) -> (Connection, Vec<Output>) {
    closed(why, vec![Output::Transmit(wire::frame(&reason.encode()))])
}

fn on_client_hello(ctx: &Context, now_ms: u64, body: &[u8]) -> (Connection, Vec<Output>) {
    let Some(split) = body.len().checked_sub(MAC_LEN) else {
        return closed(
            Misbehaviour::from(WireError::Truncated("ClientHello")),
            Vec::new(),
        );
    };
    let (signed, mac) = body.split_at(split);
    let mac: [u8; MAC_LEN] = mac.try_into().expect("split at MAC_LEN");
    if !ctx.cluster.verify(&[CLIENT_HELLO_MAC, signed], &mac) {
        return refuse(
            RefuseReason::ClusterSecret,
            Misbehaviour::ClusterSecretMismatch,
        );
    }
    let mut r = Reader::new(signed, "ClientHello");
    let hello = match Hello::decode(&mut r).and_then(|h| r.finish().map(|()| h)) {
        Ok(h) => h,
        Err(e) => return closed(Misbehaviour::from(e), Vec::new()),
    };
    let fresh = ctx.replay.lock().unwrap_or_else(|e| e.into_inner()).admit(
        hello.nonce,
        hello.timestamp_ms,
        now_ms,
    );
    match fresh {
        Ok(()) => {}
        Err(Stale::Skew { skew_ms }) => {
            return refuse(RefuseReason::ClockSkew, Misbehaviour::ClockSkew { skew_ms });
        }
        Err(Stale::Replayed) => return refuse(RefuseReason::Other, Misbehaviour::ReplayedHello),
    }
    if hello.name == ctx.node || hello.identity == ctx.identity.public_key() {
        return refuse(RefuseReason::Other, Misbehaviour::SelfConnection);
    }
    if let Err(a) = ctx.peers.admit(&hello.name, &hello.identity) {
        return refuse(RefuseReason::UnknownPeer, Misbehaviour::NotAdmitted(a));
    }
    let (ephemeral, public) = match ctx.ephemeral() {
        Ok(k) => k,
        Err(m) => return closed(m, Vec::new()),
    };
    let ours = Hello {
        name: ctx.node.clone(),
        identity: ctx.identity.public_key(),
        ephemeral: public,
        nonce: ctx.random::<NONCE_LEN>(),
        timestamp_ms: now_ms,
    };
    let client_hash = sha256(&[body]);
    let mut reply = Vec::new();
    ours.encode(Kind::ServerHello, &mut reply);
    let sig = ctx
        .identity
        .sign(&[SERVER_HELLO_SIG, &client_hash, &reply].concat());
    let mac = ctx
        .cluster
        .mac(&[SERVER_HELLO_MAC, &client_hash, &reply, &sig]);
    reply.extend_from_slice(&sig);
    reply.extend_from_slice(&mac);
    let transcript = sha256(&[body, &reply]);
    let keys = match agree(
        ephemeral,
        &hello.ephemeral,
        &transcript,
        ctx.cluster.psk(),
        &[SESSION_INFO],
    ) {
        Ok(k) => k,
        Err(m) => return closed(m, Vec::new()),
    };
    let peer = PeerInfo {
        name: hello.name,
        identity: hello.identity,
        we_initiated: false,
    };
    let wait = ResponderWait {
        peer,
        transcript,
        keys,
        started_ms: now_ms,
    };
    (
        Connection::AwaitClientFinish(wait),
        vec![Output::Transmit(wire::frame(&reply))],
    )
}

fn on_server_hello(
    ctx: &Context,
    now_ms: u64,
    w: InitiatorWait,
    body: &[u8],
) -> (Connection, Vec<Output>) {
    let Some(split) = body.len().checked_sub(SIG_LEN + MAC_LEN) else {
        return closed(
            Misbehaviour::from(WireError::Truncated("ServerHello")),
            Vec::new(),
        );
    };
    let (fields, tail) = body.split_at(split);
    let sig: [u8; SIG_LEN] = tail[..SIG_LEN].try_into().expect("split");
    let mac: [u8; MAC_LEN] = tail[SIG_LEN..].try_into().expect("split");
    let client_hash = sha256(&[&w.client_hello]);
    if !ctx
        .cluster
        .verify(&[SERVER_HELLO_MAC, &client_hash, fields, &sig], &mac)
    {
        return closed(Misbehaviour::ClusterSecretMismatch, Vec::new());
    }
    let mut r = Reader::new(fields, "ServerHello");
    let hello = match Hello::decode(&mut r).and_then(|h| r.finish().map(|()| h)) {
        Ok(h) => h,
        Err(e) => return closed(Misbehaviour::from(e), Vec::new()),
    };
    if hello.name != w.peer {
        return closed(
            Misbehaviour::WrongPeer {
                expected: w.peer,
                got: hello.name,
            },
            Vec::new(),
        );
    }
    if hello.name == ctx.node || hello.identity == ctx.identity.public_key() {
        return closed(Misbehaviour::SelfConnection, Vec::new());
    }
    if let Err(a) = ctx.peers.admit(&hello.name, &hello.identity) {
        return closed(Misbehaviour::NotAdmitted(a), Vec::new());
    }
    if !verify(
        &hello.identity,
        &[SERVER_HELLO_SIG, &client_hash, fields].concat(),
        &sig,
    ) {
        return closed(Misbehaviour::BadSignature, Vec::new());
    }
    if let Err(Stale::Skew { skew_ms }) =
        check_skew(hello.timestamp_ms, now_ms, ctx.config.timestamp_window_ms)
    {
        return closed(Misbehaviour::ClockSkew { skew_ms }, Vec::new());
    }
    let transcript = sha256(&[&w.client_hello, body]);
    let keys = match agree(
        w.ephemeral,
        &hello.ephemeral,
        &transcript,
        ctx.cluster.psk(),
        &[SESSION_INFO],
    ) {
        Ok(k) => k,
        Err(m) => return closed(m, Vec::new()),
    };
    let sig = ctx
        .identity
        .sign(&[CLIENT_FINISH_SIG, &transcript[..]].concat());
    let mac = ctx.cluster.mac(&[CLIENT_FINISH_MAC, &transcript, &sig]);
    let finish = [&[Kind::ClientFinish as u8][..], &sig, &mac].concat();
    let peer = PeerInfo {
        name: hello.name,
        identity: hello.identity,
        we_initiated: true,
    };
    let out = vec![
        Output::Transmit(wire::frame(&finish)),
        Output::Established(peer.clone()),
    ];
    (
        Connection::Established(Box::new(Session::new(peer, &keys, now_ms))),
        out,
    )
}

fn on_client_finish(
    ctx: &Context,
    now_ms: u64,
    w: ResponderWait,
    body: &[u8],
) -> (Connection, Vec<Output>) {
    let mut r = Reader::new(body, "ClientFinish");
    let parsed = (|| {
        r.u8()?;
        let sig: [u8; SIG_LEN] = r.array()?;
        let mac: [u8; MAC_LEN] = r.array()?;
        Ok::<_, WireError>((sig, mac))
    })();
    let (sig, mac) = match parsed.and_then(|v| r.finish().map(|()| v)) {
        Ok(v) => v,
        Err(e) => return closed(Misbehaviour::from(e), Vec::new()),
    };
    if !ctx
        .cluster
        .verify(&[CLIENT_FINISH_MAC, &w.transcript, &sig], &mac)
    {
        return closed(Misbehaviour::ClusterSecretMismatch, Vec::new());
    }
    if !verify(
        &w.peer.identity,
        &[CLIENT_FINISH_SIG, &w.transcript[..]].concat(),
        &sig,
    ) {
        return closed(Misbehaviour::BadSignature, Vec::new());
    }
    let out = vec![Output::Established(w.peer.clone())];
    (
        Connection::Established(Box::new(Session::new(w.peer, &w.keys, now_ms))),
        out,
    )
}

/// Seals `inner` into `out`, or closes.
macro_rules! seal_or_close {
    ($s:expr, $inner:expr, $now:expr, $out:expr) => {
        match $s.seal(&$inner, $now) {
            Ok(f) => $out.push(Output::Transmit(f)),
            Err(r) => return closed(r, $out),
        }
    };
}

fn established(
    mut s: Session,
    ctx: &Context,
    now_ms: u64,
    input: Input,
) -> (Connection, Vec<Output>) {
    let mut out = Vec::new();
    match input {
        Input::Send(d) => {
            if d.len() > ctx.config.max_payload() {
                out.push(Output::Dropped {
                    len: d.len(),
                    why: "larger than a frame",
                });
            } else {
                seal_or_close!(s, Inner::Data(d), now_ms, out);
            }
        }
        Input::Close => {
            if let Ok(f) = s.seal(&Inner::Close, now_ms) {
                out.push(Output::Transmit(f));
            }
            return closed(CloseReason::Local, out);
        }
        Input::Tick => return tick(s, ctx, now_ms),
        Input::Frame(body) => {
            if Kind::of(&body) != Ok(Kind::Sealed) {
                let got = kind_name(&body);
                return closed(
                    Misbehaviour::Unexpected {
                        state: "established",
                        got,
                    },
                    out,
                );
            }
            let (inner, switched) = match s.open(&body) {
                Ok(v) => v,
                Err(m) => return closed(m, out),
            };
            s.last_heard_ms = now_ms;
            if switched != (inner == Inner::RekeyDone) {
                let got = if switched {
                    "new-key frame before RekeyDone"
                } else {
                    "RekeyDone"
                };
                return closed(
                    Misbehaviour::Unexpected {
                        state: "established",
                        got,
                    },
                    out,
                );
            }
            match inner {
                Inner::Data(d) => out.push(Output::Deliver(d)),
                Inner::Keepalive => {}
                Inner::RekeyDone => out.push(Output::Rekeyed {
                    epoch: s.recv.epoch,
                }),
                Inner::Close => return closed(CloseReason::PeerClosed, out),
                Inner::RekeyInit(theirs) => {
                    if s.peer.we_initiated || s.recv_next.is_some() {
                        return closed(
                            Misbehaviour::Unexpected {
                                state: "established",
                                got: "RekeyInit",
                            },
                            out,
                        );
                    }
                    let (ephemeral, public) = match ctx.ephemeral() {
                        Ok(k) => k,
                        Err(m) => return closed(m, out),
                    };
                    let epoch = s.send.epoch.wrapping_add(1);
                    if epoch == 0 {
                        return closed(CloseReason::CounterExhausted, out);
                    }
                    let keys = match agree(
                        ephemeral,
                        &theirs,
                        &s.chaining,
                        ctx.cluster.psk(),
                        &[REKEY_INFO, &epoch.to_be_bytes()],
                    ) {
                        Ok(k) => k,
                        Err(m) => return closed(m, out),
                    };
                    seal_or_close!(s, Inner::RekeyAck(public), now_ms, out);
                    s.chaining = keys.chaining;
                    s.send = DirectionKey::new(&keys.responder_to_initiator, epoch);
                    s.recv_next = Some(DirectionKey::new(&keys.initiator_to_responder, epoch));
                }
                Inner::RekeyAck(theirs) => {
                    let Rekey::Awaiting { .. } = s.rekey else {
                        return closed(
                            Misbehaviour::Unexpected {
                                state: "established",
                                got: "RekeyAck",
                            },
                            out,
                        );
                    };
                    let Rekey::Awaiting { ephemeral, .. } =
                        std::mem::replace(&mut s.rekey, Rekey::Idle { since_ms: now_ms })
                    else {
                        unreachable!("matched above");
                    };
                    let epoch = s.send.epoch + 1;
                    let keys = match agree(
                        ephemeral,
                        &theirs,
                        &s.chaining,
                        ctx.cluster.psk(),
                        &[REKEY_INFO, &epoch.to_be_bytes()],
                    ) {
                        Ok(k) => k,
                        Err(m) => return closed(m, out),
                    };
                    s.chaining = keys.chaining;
                    s.send = DirectionKey::new(&keys.initiator_to_responder, epoch);
                    s.recv = DirectionKey::new(&keys.responder_to_initiator, epoch);
                    seal_or_close!(s, Inner::RekeyDone, now_ms, out);
                    out.push(Output::Rekeyed { epoch });
                }
            }
        }
    }
    (Connection::Established(Box::new(s)), out)
}

fn tick(mut s: Session, ctx: &Context, now_ms: u64) -> (Connection, Vec<Output>) {
    let cfg = &ctx.config;
    let mut out = Vec::new();
    if now_ms.saturating_sub(s.last_heard_ms) > cfg.dead_after_ms {
        return closed(CloseReason::PeerSilent, out);
    }
    match &s.rekey {
        Rekey::Awaiting { sent_ms, .. }
            if now_ms.saturating_sub(*sent_ms) > cfg.handshake_timeout_ms =>
        {
            return closed(CloseReason::RekeyTimeout, out);
        }
        Rekey::Idle { since_ms }
            if s.peer.we_initiated
                && s.send.epoch < u32::MAX
                && (now_ms.saturating_sub(*since_ms) >= cfg.rekey_interval_ms
                    || s.send.counter >= cfg.rekey_after_frames) =>
        {
            let (ephemeral, public) = match ctx.ephemeral() {
                Ok(k) => k,
                Err(m) => return closed(m, out),
            };
            seal_or_close!(s, Inner::RekeyInit(public), now_ms, out);
            s.rekey = Rekey::Awaiting {
                ephemeral,
                sent_ms: now_ms,
            };
        }
        _ => {}
    }
    if out.is_empty() && now_ms.saturating_sub(s.last_sent_ms) >= cfg.keepalive_ms {
        seal_or_close!(s, Inner::Keepalive, now_ms, out);
    }
    (Connection::Established(Box::new(s)), out)
}

#[cfg(test)]
mod tests;
