//! What nodes tell each other over an established control connection (the payload of a
//! sealed `Data` frame). Each message is small, strictly encoded and validated like the
//! handshake: fixed sizes, bounded counts, no duplicates, no trailing bytes.

use std::collections::BTreeSet;

use crate::wire::{KEY_LEN, NodeName, Reader, WireError};

/// Most peers one reachability report may list.
pub const MAX_REPORTED_PEERS: usize = 5_000;

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshMessage {
    /// The sender's direct-path health to each peer it probes (after hysteresis): what a node
    /// needs to pick the sender as a relay ([`crate::path`]).
    Reachability(Vec<(NodeName, bool)>),
    /// The sender's WireGuard side, for mixed mode: its public key and port, and whether its
    /// device is up (peers send encrypted only to nodes that advertise `ready`).
    Wireguard {
        /// Curve25519 public key.
        public_key: [u8; KEY_LEN],
        /// UDP listen port.
        port: u16,
        /// The device is up and configured.
        ready: bool,
    },
    /// A path probe (heartbeat): the receiver answers with [`MeshMessage::ProbeAck`] of the
    /// same sequence number; the sender's [`crate::path::PathTable`] counts the answer.
    Probe(u64),
    /// The answer to [`MeshMessage::Probe`].
    ProbeAck(u64),
}

impl MeshMessage {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            MeshMessage::Reachability(peers) => {
                out.push(1);
                out.extend_from_slice(&(peers.len() as u16).to_be_bytes());
                for (name, up) in peers {
                    out.push(name.as_str().len() as u8);
                    out.extend_from_slice(name.as_str().as_bytes());
                    out.push(u8::from(*up));
                }
            }
            MeshMessage::Wireguard {
                public_key,
                port,
                ready,
            } => {
                out.push(2);
                out.extend_from_slice(public_key);
                out.extend_from_slice(&port.to_be_bytes());
                out.push(u8::from(*ready));
            }
            MeshMessage::Probe(seq) => {
                out.push(3);
                out.extend_from_slice(&seq.to_be_bytes());
            }
            MeshMessage::ProbeAck(seq) => {
                out.push(4);
                out.extend_from_slice(&seq.to_be_bytes());
            }
        }
        out
    }

    /// Decodes and validates a message.
    pub fn decode(buf: &[u8]) -> Result<MeshMessage, WireError> {
        let mut r = Reader::new(buf, "mesh message");
        let bool_of = |b: u8| match b {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed("boolean")),
        };
        let msg = match r.u8()? {
            1 => {
                let count = u16::from_be_bytes(r.array()?) as usize;
                if count > MAX_REPORTED_PEERS {
                    return Err(WireError::Malformed("peer count"));
                }
                let mut seen = BTreeSet::new();
                let mut peers = Vec::with_capacity(count);
                for _ in 0..count {
                    let len = r.u8()? as usize;
                    let name = std::str::from_utf8(r.take(len)?).map_err(|_| WireError::BadName)?;
                    let name = NodeName::new(name)?;
                    if !seen.insert(name.clone()) {
                        return Err(WireError::Malformed("duplicate peer"));
                    }
                    peers.push((name, bool_of(r.u8()?)?));
                }
                MeshMessage::Reachability(peers)
            }
            2 => MeshMessage::Wireguard {
                public_key: r.array()?,
                port: u16::from_be_bytes(r.array()?),
                ready: bool_of(r.u8()?)?,
            },
            3 => MeshMessage::Probe(u64::from_be_bytes(r.array()?)),
            4 => MeshMessage::ProbeAck(u64::from_be_bytes(r.array()?)),
            k => return Err(WireError::UnknownKind(k)),
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> NodeName {
        NodeName::new(s).expect("name")
    }

    #[test]
    fn messages_round_trip() {
        for m in [
            MeshMessage::Reachability(vec![]),
            MeshMessage::Reachability(vec![(name("a"), true), (name("b"), false)]),
            MeshMessage::Wireguard {
                public_key: [3; 32],
                port: 51820,
                ready: true,
            },
            MeshMessage::Probe(7),
            MeshMessage::ProbeAck(u64::MAX),
        ] {
            assert_eq!(MeshMessage::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn invalid_messages_are_refused() {
        let dup = MeshMessage::Reachability(vec![(name("a"), true), (name("a"), false)]).encode();
        assert_eq!(
            MeshMessage::decode(&dup),
            Err(WireError::Malformed("duplicate peer"))
        );
        let mut bad_bool = MeshMessage::Reachability(vec![(name("a"), true)]).encode();
        *bad_bool.last_mut().expect("byte") = 2;
        assert_eq!(
            MeshMessage::decode(&bad_bool),
            Err(WireError::Malformed("boolean"))
        );
        let mut trailing = MeshMessage::Wireguard {
            public_key: [0; 32],
            port: 1,
            ready: false,
        }
        .encode();
        trailing.push(0);
        assert!(MeshMessage::decode(&trailing).is_err());
        assert_eq!(
            MeshMessage::decode(&[1, 0xff, 0xff]),
            Err(WireError::Malformed("peer count"))
        );
        assert_eq!(
            MeshMessage::decode(&[1, 0, 5]),
            Err(WireError::Truncated("mesh message"))
        );
        assert_eq!(
            MeshMessage::decode(&[1, 0, 1, 1, b'A', 1]),
            Err(WireError::BadName)
        );
        assert_eq!(MeshMessage::decode(&[7]), Err(WireError::UnknownKind(7)));
        assert_eq!(
            MeshMessage::decode(&[3, 0, 0, 0]),
            Err(WireError::Truncated("mesh message"))
        );
        assert!(MeshMessage::decode(&[4, 0, 0, 0, 0, 0, 0, 0, 1, 9]).is_err());
    }
}
