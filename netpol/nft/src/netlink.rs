//! Netlink framing in safe Rust: message headers, acks, attributes, the nftables message types.
//!
//! The FFI module (`sys`) builds and parses nftables *objects* through libnftnl; this
//! module reads the *framing* around them (which message, which sequence number, which errno)
//! straight from the bytes, so the ack loop and the dump walker never touch a raw pointer.

/// `NFNL_SUBSYS_NFTABLES`: the high byte of every nftables message type.
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;

/// nftables message types (`enum nf_tables_msg_types`), without the subsystem byte. Each is
/// the kernel's `NFT_MSG_<NAME>`.
#[allow(missing_docs)] // the kernel's names, documented as a group above
pub mod msg {
    pub const NEWTABLE: u16 = 0;
    pub const GETTABLE: u16 = 1;
    pub const DELTABLE: u16 = 2;
    pub const NEWCHAIN: u16 = 3;
    pub const GETCHAIN: u16 = 4;
    pub const DELCHAIN: u16 = 5;
    pub const NEWRULE: u16 = 6;
    pub const GETRULE: u16 = 7;
    pub const DELRULE: u16 = 8;
    pub const NEWSET: u16 = 9;
    pub const GETSET: u16 = 10;
    pub const DELSET: u16 = 11;
    pub const NEWSETELEM: u16 = 12;
    pub const GETSETELEM: u16 = 13;
    pub const DELSETELEM: u16 = 14;
    pub const NEWGEN: u16 = 15;
    pub const GETGEN: u16 = 16;
    /// Kernel 6.3+: like `DELSETELEM`, but an absent element is not an error. Not in `libc`.
    pub const DESTROYSETELEM: u16 = 30;
}

/// `NLMSG_ERROR`: an ack (errno 0) or an error.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a dump.
pub const NLMSG_DONE: u16 = 3;

/// `NLM_F_REQUEST`
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_DUMP_INTR`: the dump was interrupted by a change; its content may be inconsistent.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`)
pub const NLM_F_DUMP: u16 = 0x300;
/// `NLM_F_EXCL`
pub const NLM_F_EXCL: u16 = 0x200;
/// `NLM_F_CREATE`
pub const NLM_F_CREATE: u16 = 0x400;
/// `NLM_F_APPEND`
pub const NLM_F_APPEND: u16 = 0x800;

/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Size of `struct nfgenmsg`, the header every nfnetlink message carries after `nlmsghdr`.
pub const NFGENMSG_LEN: usize = 4;

/// `NFTA_GEN_ID`: the ruleset generation in a `NEWGEN` message.
const NFTA_GEN_ID: u16 = 1;

/// Rounds up to the netlink alignment (4 bytes).
pub fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The fixed header of one netlink message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Total length, header included.
    pub len: u32,
    /// Message type; for nftables `(NFNL_SUBSYS_NFTABLES << 8) | msg::*`.
    pub kind: u16,
    /// `NLM_F_*` flags.
    pub flags: u16,
    /// Sequence number.
    pub seq: u32,
    /// Port id of the sender (0 for the kernel).
    pub pid: u32,
}

impl Header {
    /// Reads a header from the first 16 bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Option<Header> {
        let b = bytes.get(..NLMSG_HDRLEN)?;
        Some(Header {
            len: u32::from_ne_bytes(b[0..4].try_into().ok()?),
            kind: u16::from_ne_bytes(b[4..6].try_into().ok()?),
            flags: u16::from_ne_bytes(b[6..8].try_into().ok()?),
            seq: u32::from_ne_bytes(b[8..12].try_into().ok()?),
            pid: u32::from_ne_bytes(b[12..16].try_into().ok()?),
        })
    }

    /// The nftables message type, if this is an nftables message.
    pub fn nft_msg(&self) -> Option<u16> {
        (self.kind >> 8 == NFNL_SUBSYS_NFTABLES).then_some(self.kind & 0xff)
    }
}

/// One message in a received datagram: its header and all its bytes (header included).
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    /// The header.
    pub header: Header,
    /// The whole message, header included (`header.len` bytes).
    pub bytes: &'a [u8],
}

impl<'a> Message<'a> {
    /// For `NLMSG_ERROR`: the errno (0 for an ack, positive for an error).
    pub fn errno(&self) -> Option<i32> {
        if self.header.kind != NLMSG_ERROR {
            return None;
        }
        let b = self.bytes.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)?;
        Some(-i32::from_ne_bytes(b.try_into().ok()?))
    }

    /// The attributes after `nfgenmsg`.
    pub fn nft_attrs(&self) -> Attrs<'a> {
        Attrs {
            rest: self
                .bytes
                .get(NLMSG_HDRLEN + NFGENMSG_LEN..)
                .unwrap_or_default(),
        }
    }

    /// For `NEWGEN`: the generation id.
    pub fn gen_id(&self) -> Option<u32> {
        let attr = self.nft_attrs().find(|a| a.kind == NFTA_GEN_ID)?;
        Some(u32::from_be_bytes(attr.data.get(..4)?.try_into().ok()?))
    }
}

/// Why a received datagram could not be split into messages.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink datagram at byte {offset}: {reason}")]
pub struct Malformed {
    /// Offset of the bad message in the datagram.
    pub offset: usize,
    /// What was wrong.
    pub reason: &'static str,
}

/// Splits one received datagram into its messages, checking every length.
pub fn messages(datagram: &[u8]) -> Result<Vec<Message<'_>>, Malformed> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let rest = &datagram[offset..];
        let header = Header::parse(rest).ok_or(Malformed {
            offset,
            reason: "truncated header",
        })?;
        let len = header.len as usize;
        if len < NLMSG_HDRLEN {
            return Err(Malformed {
                offset,
                reason: "length shorter than a header",
            });
        }
        if len > rest.len() {
            return Err(Malformed {
                offset,
                reason: "length past the end of the datagram",
            });
        }
        out.push(Message {
            header,
            bytes: &rest[..len],
        });
        offset += align(len);
    }
    Ok(out)
}

/// One netlink attribute (type with the nested/byte-order bits removed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr<'a> {
    /// Attribute type.
    pub kind: u16,
    /// Payload.
    pub data: &'a [u8],
}

/// Iterator over a run of netlink attributes; stops at the first malformed one.
#[derive(Clone, Debug)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    /// Attributes in `bytes` (e.g. the payload of a nested attribute).
    pub fn new(bytes: &'a [u8]) -> Attrs<'a> {
        Attrs { rest: bytes }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Attr<'a>;

    fn next(&mut self) -> Option<Attr<'a>> {
        let len = usize::from(u16::from_ne_bytes(self.rest.get(0..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(self.rest.get(2..4)?.try_into().ok()?) & 0x3fff;
        if len < 4 || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let data = &self.rest[4..len];
        self.rest = self.rest.get(align(len)..).unwrap_or_default();
        Some(Attr { kind, data })
    }
}

/// Userdata TLVs (`libnftnl/udata.h`): one byte type, one byte length, the value. nft stores
/// comments and set metadata this way; we write and read them byte for byte as nft does.
pub mod udata {
    /// `NFTNL_UDATA_TABLE_COMMENT`, `NFTNL_UDATA_RULE_COMMENT`
    pub const COMMENT: u8 = 0;
    /// `NFTNL_UDATA_SET_KEYBYTEORDER`
    pub const SET_KEYBYTEORDER: u8 = 0;
    /// `NFTNL_UDATA_SET_DATABYTEORDER`
    pub const SET_DATABYTEORDER: u8 = 1;
    /// `NFTNL_UDATA_SET_KEY_TYPEOF`
    pub const SET_KEY_TYPEOF: u8 = 3;
    /// `NFTNL_UDATA_SET_DATA_INTERVAL`
    pub const SET_DATA_INTERVAL: u8 = 6;
    /// `NFTNL_UDATA_SET_COMMENT`
    pub const SET_COMMENT: u8 = 7;
    /// `NFTNL_UDATA_SET_ELEM_FLAGS`
    pub const SET_ELEM_FLAGS: u8 = 1;
    /// `NFTNL_SET_ELEM_F_INTERVAL_OPEN`: an interval without end element (reaches the maximum).
    pub const SET_ELEM_F_INTERVAL_OPEN: u32 = 1;

    /// Appends one TLV. `None` if the value does not fit the one-byte length.
    pub fn put(buf: &mut Vec<u8>, kind: u8, value: &[u8]) -> Option<()> {
        let len = u8::try_from(value.len()).ok()?;
        buf.push(kind);
        buf.push(len);
        buf.extend_from_slice(value);
        Some(())
    }

    /// Appends a NUL-terminated string TLV (`nftnl_udata_put_strz`).
    pub fn put_strz(buf: &mut Vec<u8>, kind: u8, s: &str) -> Option<()> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        put(buf, kind, &v)
    }

    /// Appends a host-order u32 TLV (`nftnl_udata_put_u32`).
    pub fn put_u32(buf: &mut Vec<u8>, kind: u8, value: u32) {
        // Four bytes always fit.
        let _ = put(buf, kind, &value.to_ne_bytes());
    }

    /// Splits userdata into TLVs; `None` if malformed.
    pub fn parse(buf: &[u8]) -> Option<Vec<(u8, &[u8])>> {
        let mut out = Vec::new();
        let mut rest = buf;
        while !rest.is_empty() {
            let kind = *rest.first()?;
            let len = usize::from(*rest.get(1)?);
            out.push((kind, rest.get(2..2 + len)?));
            rest = &rest[2 + len..];
        }
        Some(out)
    }

    /// Reads a NUL-terminated string TLV value.
    pub fn strz(value: &[u8]) -> Option<String> {
        let (last, s) = value.split_last()?;
        (*last == 0 && !s.contains(&0))
            .then(|| String::from_utf8(s.to_vec()).ok())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&36u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&(-errno).to_ne_bytes());
        b.extend_from_slice(&[0; 16]);
        b
    }

    #[test]
    fn acks_are_split_and_carry_their_errno() {
        let mut d = ack(7, 0);
        d.extend(ack(8, 17));
        let msgs = messages(&d).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].header.seq, msgs[0].errno()), (7, Some(0)));
        assert_eq!((msgs[1].header.seq, msgs[1].errno()), (8, Some(17)));
    }

    #[test]
    fn a_length_past_the_datagram_is_malformed() {
        let mut d = ack(1, 0);
        d[0] = 200;
        assert!(messages(&d).is_err());
        let mut d = ack(1, 0);
        d[0] = 3;
        assert!(messages(&d).is_err());
    }

    #[test]
    fn udata_round_trips_as_nft_writes_it() {
        // Rule comment "hello" as nft 1.0.6 writes it: `\x00\x06hello\x00`.
        let mut b = Vec::new();
        udata::put_strz(&mut b, udata::COMMENT, "hello").unwrap();
        assert_eq!(b, b"\x00\x06hello\x00");
        let tlvs = udata::parse(&b).unwrap();
        assert_eq!(udata::strz(tlvs[0].1).as_deref(), Some("hello"));
        assert!(udata::parse(b"\x00\x09ab").is_none());
        assert!(udata::put_strz(&mut Vec::new(), 0, &"x".repeat(255)).is_none());
    }

    #[test]
    fn attributes_are_walked_with_padding() {
        // Two attributes: type 1 with 3 bytes (padded to 8), type 2 with 4 bytes.
        let mut b = vec![7, 0, 1, 0, b'a', b'b', b'c', 0];
        b.extend_from_slice(&[8, 0, 2, 0, 1, 2, 3, 4]);
        let attrs: Vec<Attr> = Attrs::new(&b).collect();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0].data, b"abc");
        assert_eq!((attrs[1].kind, attrs[1].data), (2, &[1u8, 2, 3, 4][..]));
    }
}
