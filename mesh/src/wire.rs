//! The bytes on a control connection: length-prefixed frames with a hard maximum, and the
//! strict encodings of every message (fixed field sizes, no trailing bytes, validated names).
//! Nothing here keeps state or does crypto; [`crate::connection`] does.
//!
//! A frame is `u32 big-endian length ‖ body`; `body[0]` is the [`Kind`]. The length is checked
//! against the maximum *before* anything is buffered for it ([`FrameDecoder`]).

use std::fmt;

use thiserror::Error;

/// Protocol version carried in both hellos.
pub const VERSION: u8 = 1;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Default largest frame body a peer may send.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;
/// Bytes of an Ed25519 or X25519 public key.
pub const KEY_LEN: usize = 32;
/// Bytes of a hello nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIG_LEN: usize = 64;
/// Bytes of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Bytes of a ChaCha20-Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Bytes of the header of a sealed frame (kind, epoch, counter); the AEAD's associated data.
pub const SEALED_HEADER: usize = 1 + 4 + 8;

/// A frame or message that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The length prefix exceeds the maximum (nothing was allocated for it).
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversize {
        /// Announced length.
        len: usize,
        /// Maximum allowed.
        max: usize,
    },
    /// A frame with no body.
    #[error("empty frame")]
    Empty,
    /// The body ended before a field.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// Bytes after the last field.
    #[error("{0} has trailing bytes")]
    Trailing(&'static str),
    /// Unknown message kind.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A node name that is not a DNS subdomain.
    #[error("invalid node name")]
    BadName,
    /// Any other malformed field.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// A Kubernetes node name (a DNS-1123 subdomain: 1–253 of `a-z 0-9 - .`, alphanumeric at
/// both ends). Peers name themselves with it; it is validated before it is ever logged.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(String);

impl NodeName {
    /// Validates `s`.
    pub fn new(s: &str) -> Result<NodeName, WireError> {
        let b = s.as_bytes();
        let ok_char =
            |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.';
        let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        if b.is_empty()
            || b.len() > 253
            || !b.iter().all(ok_char)
            || !alnum(&b[0])
            || !alnum(&b[b.len() - 1])
        {
            return Err(WireError::BadName);
        }
        Ok(NodeName(s.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The first byte of a frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Handshake message 1.
    ClientHello = 1,
    /// Handshake message 2.
    ServerHello = 2,
    /// Handshake message 3.
    ClientFinish = 3,
    /// Everything after the handshake.
    Sealed = 4,
    /// The responder's plaintext refusal (informative only: it is not authenticated).
    Refused = 5,
}

impl Kind {
    /// The kind of a frame body.
    pub fn of(body: &[u8]) -> Result<Kind, WireError> {
        match body.first() {
            None => Err(WireError::Empty),
            Some(1) => Ok(Kind::ClientHello),
            Some(2) => Ok(Kind::ServerHello),
            Some(3) => Ok(Kind::ClientFinish),
            Some(4) => Ok(Kind::Sealed),
            Some(5) => Ok(Kind::Refused),
            Some(k) => Err(WireError::UnknownKind(*k)),
        }
    }
}

/// Prefixes `body` with its length.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(LEN_PREFIX + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Checks a length prefix against `max` (and against zero).
pub fn check_len(prefix: [u8; LEN_PREFIX], max: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(WireError::Empty);
    }
    if len > max {
        return Err(WireError::Oversize { len, max });
    }
    Ok(len)
}

/// Reassembles frames from a byte stream. It buffers at most one frame (≤ `max`) plus what one
/// read returns: a length prefix over the maximum is an error before any byte of it is kept.
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder for bodies of at most `max` bytes.
    pub fn new(max: usize) -> FrameDecoder {
        FrameDecoder {
            max,
            buf: Vec::new(),
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame body, if there is one.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        if self.buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let mut prefix = [0; LEN_PREFIX];
        prefix.copy_from_slice(&self.buf[..LEN_PREFIX]);
        let len = check_len(prefix, self.max)?;
        if self.buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let body = self.buf[LEN_PREFIX..LEN_PREFIX + len].to_vec();
        self.buf.drain(..LEN_PREFIX + len);
        Ok(Some(body))
    }
}

/// A cursor over a body that refuses short reads and trailing bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads the message `what` from `buf`.
    pub fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, what }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// The next byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    /// The next big-endian u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// The next big-endian u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Ends the message: error if bytes are left.
    pub fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.what))
        }
    }
}

/// The fields both hellos carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The sender's node name.
    pub name: NodeName,
    /// The sender's Ed25519 public key.
    pub identity: [u8; KEY_LEN],
    /// The sender's ephemeral X25519 public key.
    pub ephemeral: [u8; KEY_LEN],
    /// A fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The sender's clock, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

impl Hello {
    /// Appends `kind ‖ version ‖ fields`.
    pub fn encode(&self, kind: Kind, out: &mut Vec<u8>) {
        out.push(kind as u8);
        out.push(VERSION);
        out.push(self.name.0.len() as u8);
        out.extend_from_slice(self.name.0.as_bytes());
        out.extend_from_slice(&self.identity);
        out.extend_from_slice(&self.ephemeral);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
    }

    /// Reads `kind ‖ version ‖ fields` (the caller has checked the kind).
    pub fn decode(r: &mut Reader<'_>) -> Result<Hello, WireError> {
        r.u8()?;
        let version = r.u8()?;
        if version != VERSION {
            return Err(WireError::Malformed("version"));
        }
        let name_len = r.u8()? as usize;
        let name = std::str::from_utf8(r.take(name_len)?).map_err(|_| WireError::BadName)?;
        Ok(Hello {
            name: NodeName::new(name)?,
            identity: r.array()?,
            ephemeral: r.array()?,
            nonce: r.array()?,
            timestamp_ms: r.u64()?,
        })
    }
}

/// Why a responder refused a hello (sent in plaintext so that the other side can log it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseReason {
    /// The hello's HMAC does not verify: the nodes hold different cluster secrets.
    ClusterSecret = 1,
    /// The timestamp is outside the window: the clocks disagree.
    ClockSkew = 2,
    /// The node name is not a member, or its identity key is not the one published.
    UnknownPeer = 3,
    /// Any other reason.
    Other = 4,
}

impl RefuseReason {
    /// Encodes a refusal frame body.
    pub fn encode(self) -> Vec<u8> {
        vec![Kind::Refused as u8, self as u8]
    }

    /// Decodes a refusal frame body.
    pub fn decode(body: &[u8]) -> Result<RefuseReason, WireError> {
        let mut r = Reader::new(body, "refusal");
        r.u8()?;
        let reason = match r.u8()? {
            1 => RefuseReason::ClusterSecret,
            2 => RefuseReason::ClockSkew,
            3 => RefuseReason::UnknownPeer,
            _ => RefuseReason::Other,
        };
        r.finish()?;
        Ok(reason)
    }
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefuseReason::ClusterSecret => "cluster secret mismatch",
            RefuseReason::ClockSkew => "clock skew beyond the handshake window",
            RefuseReason::UnknownPeer => "unknown node or identity key",
            RefuseReason::Other => "refused",
        })
    }
}

/// What a sealed frame carries once opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inner {
    /// An application message ([`crate::message::MeshMessage`]).
    Data(Vec<u8>),
    /// Initiator: a new ephemeral key for a rekey.
    RekeyInit([u8; KEY_LEN]),
    /// Responder: its new ephemeral key; the last frame it seals under the old key.
    RekeyAck([u8; KEY_LEN]),
    /// Initiator: the first frame under the new key.
    RekeyDone,
    /// Orderly close.
    Close,
    /// Nothing, to keep the connection alive.
    Keepalive,
}

impl Inner {
    /// Encodes the plaintext.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Inner::Data(d) => {
                let mut v = Vec::with_capacity(1 + d.len());
                v.push(1);
                v.extend_from_slice(d);
                v
            }
            Inner::RekeyInit(k) => [&[2u8][..], k].concat(),
            Inner::RekeyAck(k) => [&[3u8][..], k].concat(),
            Inner::RekeyDone => vec![4],
            Inner::Close => vec![5],
            Inner::Keepalive => vec![6],
        }
    }

    /// Decodes the plaintext.
    pub fn decode(buf: &[u8]) -> Result<Inner, WireError> {
        let mut r = Reader::new(buf, "sealed message");
        let inner = match r.u8()? {
            1 => Inner::Data(r.rest().to_vec()),
            2 => Inner::RekeyInit(r.array()?),
            3 => Inner::RekeyAck(r.array()?),
            4 => Inner::RekeyDone,
            5 => Inner::Close,
            6 => Inner::Keepalive,
            k => return Err(WireError::UnknownKind(k)),
        };
        r.finish()?;
        Ok(inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            name: NodeName::new("node-a.example").expect("name"),
            identity: [1; 32],
            ephemeral: [2; 32],
            nonce: [3; 32],
            timestamp_ms: 42,
        }
    }

    #[test]
    fn node_names_follow_dns_subdomain_rules() {
        for ok in ["a", "node-1", "ip-10-0-0-1.ec2.internal", &"a".repeat(253)] {
            assert!(NodeName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a b",
            "é",
            &"a".repeat(254),
            "a\n",
        ] {
            assert_eq!(NodeName::new(bad), Err(WireError::BadName), "{bad:?}");
        }
    }

    #[test]
    fn hello_round_trips_and_refuses_trailing_or_short_input() {
        let mut body = Vec::new();
        hello().encode(Kind::ClientHello, &mut body);
        let mut r = Reader::new(&body, "hello");
        assert_eq!(Hello::decode(&mut r), Ok(hello()));
        assert!(r.finish().is_ok());

        let mut longer = body.clone();
        longer.push(0);
        let mut r = Reader::new(&longer, "hello");
        Hello::decode(&mut r).expect("fields");
        assert_eq!(r.finish(), Err(WireError::Trailing("hello")));

        for cut in 0..body.len() {
            let mut r = Reader::new(&body[..cut], "hello");
            assert!(Hello::decode(&mut r).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn hello_with_another_version_is_refused() {
        let mut body = Vec::new();
        hello().encode(Kind::ClientHello, &mut body);
        body[1] = 9;
        assert_eq!(
            Hello::decode(&mut Reader::new(&body, "hello")),
            Err(WireError::Malformed("version"))
        );
    }

    #[test]
    fn decoder_splits_frames_across_arbitrary_reads() {
        let stream = [frame(b"\x04abc"), frame(b"\x04"), frame(&[4; 300])].concat();
        for chunk in [1, 2, 3, 7, 1000] {
            let mut d = FrameDecoder::new(1024);
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame().expect("valid") {
                    got.push(f.len());
                }
            }
            assert_eq!(got, vec![4, 1, 300], "chunk {chunk}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn decoder_refuses_an_oversized_length_before_its_bytes_arrive() {
        let mut d = FrameDecoder::new(1024);
        d.push(&u32::MAX.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(WireError::Oversize {
                len: u32::MAX as usize,
                max: 1024
            })
        );
        assert!(d.buffered() <= LEN_PREFIX);
        let mut d = FrameDecoder::new(1024);
        d.push(&[0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(WireError::Empty));
    }

    #[test]
    fn inner_messages_round_trip_and_unknown_kinds_are_refused() {
        for m in [
            Inner::Data(b"x".to_vec()),
            Inner::Data(Vec::new()),
            Inner::RekeyInit([7; 32]),
            Inner::RekeyAck([8; 32]),
            Inner::RekeyDone,
            Inner::Close,
            Inner::Keepalive,
        ] {
            assert_eq!(Inner::decode(&m.encode()), Ok(m));
        }
        assert_eq!(Inner::decode(&[9]), Err(WireError::UnknownKind(9)));
        assert!(Inner::decode(&[2, 1, 2]).is_err());
        assert!(Inner::decode(&[4, 0]).is_err());
        assert!(Inner::decode(&[]).is_err());
    }

    #[test]
    fn refusals_round_trip() {
        for r in [
            RefuseReason::ClusterSecret,
            RefuseReason::ClockSkew,
            RefuseReason::UnknownPeer,
            RefuseReason::Other,
        ] {
            assert_eq!(RefuseReason::decode(&r.encode()), Ok(r));
        }
    }
}
