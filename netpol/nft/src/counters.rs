//! The values of the `counter`s in one table's rules, with each rule's chain and comment.
//!
//! Counter values are state, not content: the dump used for adoption ([`crate::walk`]) reads a
//! `counter` as present or absent, so traffic never makes a diff. This module reads the values
//! for people (`weft status --drops`): one `GETRULE` dump of the table, parsed by hand.

use std::io;

use crate::netlink::{
    self, Attrs, NFNL_SUBSYS_NFTABLES, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, align, msg, udata,
};

/// One rule's counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCounter {
    /// Chain of the rule.
    pub chain: String,
    /// Kernel handle of the rule.
    pub handle: u64,
    /// The rule's comment.
    pub comment: Option<String>,
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

/// Every counting rule of `inet <table>` in the calling thread's network namespace, in chain
/// order. An absent table gives an empty list.
pub fn rule_counters(table: &str) -> io::Result<Vec<RuleCounter>> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let mut name = table.as_bytes().to_vec();
    name.push(0);
    let attr_len = 4 + name.len();
    let len = netlink::NLMSG_HDRLEN + netlink::NFGENMSG_LEN + align(attr_len);
    let seq = 1u32;
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg::GETRULE).to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::NFPROTO_INET as u8, 0, 0, 0]);
    req.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    req.extend_from_slice(&NFTA_RULE_TABLE.to_ne_bytes());
    req.extend_from_slice(&name);
    req.resize(len, 0);
    socket.send(&req)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    for _ in 0..(1 << 20) {
        let n = socket.recv_raw(&mut buf)?;
        let msgs = netlink::messages(&buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        for m in msgs {
            if m.header.kind == NLMSG_DONE {
                return Ok(out);
            }
            match m.errno() {
                Some(errno) if errno == libc::ENOENT => return Ok(Vec::new()),
                Some(0) => continue,
                Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
                None => {}
            }
            if let Some(c) = parse(&m) {
                out.push(c);
            }
        }
    }
    Err(io::Error::other("rule dump did not end"))
}

fn be64(d: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(d.get(..8)?.try_into().ok()?))
}

fn parse(m: &netlink::Message<'_>) -> Option<RuleCounter> {
    let (mut chain, mut handle, mut comment, mut counter) = (None, 0, None, None);
    for a in m.nft_attrs() {
        match a.kind {
            NFTA_RULE_CHAIN => {
                let end = a.data.iter().position(|b| *b == 0).unwrap_or(a.data.len());
                chain = Some(String::from_utf8_lossy(&a.data[..end]).into_owned());
            }
            NFTA_RULE_HANDLE => handle = be64(a.data).unwrap_or(0),
            NFTA_RULE_USERDATA => {
                comment = udata::parse(a.data).and_then(|tlvs| {
                    tlvs.iter()
                        .find(|(k, _)| *k == udata::COMMENT)
                        .and_then(|(_, v)| udata::strz(v))
                });
            }
            NFTA_RULE_EXPRESSIONS => {
                for elem in Attrs::new(a.data).filter(|e| e.kind == NFTA_LIST_ELEM) {
                    let mut is_counter = false;
                    let mut data = None;
                    for x in Attrs::new(elem.data) {
                        match x.kind {
                            NFTA_EXPR_NAME => is_counter = x.data.starts_with(b"counter\0"),
                            NFTA_EXPR_DATA => data = Some(x.data),
                            _ => {}
                        }
                    }
                    if let (true, Some(d)) = (is_counter, data) {
                        let (mut packets, mut bytes) = (0, 0);
                        for c in Attrs::new(d) {
                            match c.kind {
                                NFTA_COUNTER_PACKETS => packets = be64(c.data).unwrap_or(0),
                                NFTA_COUNTER_BYTES => bytes = be64(c.data).unwrap_or(0),
                                _ => {}
                            }
                        }
                        counter = Some((packets, bytes));
                    }
                }
            }
            _ => {}
        }
    }
    let (packets, bytes) = counter?;
    Some(RuleCounter {
        chain: chain?,
        handle,
        comment,
        packets,
        bytes,
    })
}
