//! weft's node mesh (DESIGN §5): authenticated control connections between nodes, the
//! per-peer path health that decides between direct and relayed paths, and the WireGuard side
//! of pod-traffic encryption ([`wg`]: configuration, and with feature `userspace-wg` the
//! userspace device that the long-lived process `weft-wg` runs).
//!
//! The agent drives it (`src/agent/mesh.rs`): Node objects → [`PeerDirectory`] (members and
//! their published identity keys) and dials; probes ([`message::MeshMessage::Probe`]) and
//! reachability reports → [`path::PathTable`] → one route per peer, programmed by the
//! dataplane; WireGuard keys and endpoints exchanged as [`message::MeshMessage::Wireguard`]
//! (mixed mode) → the configuration `weft-wg` reloads live. The agent depends on this crate
//! with `default-features = false` (gotatun needs Rust 1.95 and adds a second, RustCrypto,
//! handshake stack next to ring); the kernel WireGuard path lives in the agent (`wg`).
//!
//! What it owns: the control protocol on its TCP port, the node's long-term Ed25519 identity
//! (one file in the state dir), and the decisions about which path each peer's traffic takes.
//! What it must not touch: nftables, routes and links (the dataplane programs what [`path`]
//! decides), and the Kubernetes API (membership comes in as plain data: [`PeerDirectory`]).
//!
//! Flow: [`net::MeshNode`] accepts or dials a TCP connection → every frame goes through the pure
//! state machine [`connection::Connection::step`] (handshake, sealed frames, rekey) → the
//! application messages it delivers ([`message::MeshMessage`]) feed [`path::PathTable`].
//!
//! The handshake, in three messages (all framed by [`wire`]):
//!
//! ```text
//! initiator → responder  ClientHello  name, identity key, ephemeral X25519, nonce, time; HMAC(cluster)
//! responder → initiator  ServerHello  the same fields; Ed25519 sig over the transcript; HMAC(cluster)
//! initiator → responder  ClientFinish Ed25519 sig over the whole transcript; HMAC(cluster)
//! ```
//!
//! after which both sides hold ChaCha20-Poly1305 keys from HKDF(X25519 shared secret ‖ a key
//! derived from the cluster secret, salted with the transcript hash), one per direction, with
//! strict per-direction counters; the initiator rekeys periodically with a fresh agreement on
//! the live connection.

pub mod cluster;
pub mod connection;
pub mod gro;
pub mod identity;
pub mod message;
pub mod metrics;
pub mod net;
pub mod path;
pub mod replay;
#[cfg(feature = "userspace-wg")]
pub mod tun_offload;
pub mod tunnel_probe;
#[cfg(feature = "userspace-wg")]
pub mod udp_gso;
pub mod wg;
pub mod wire;

pub use cluster::{ClusterKeys, PeerDirectory};
pub use connection::{
    CloseReason, Connection, Context, Input, Misbehaviour, Output, SessionConfig,
};
pub use identity::Identity;
pub use metrics::MeshMetrics;

pub use wire::NodeName;
