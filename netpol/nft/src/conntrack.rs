//! Conntrack entries over ctnetlink: list them, delete one by its tuple.
//!
//! Used by `weft flows` (which connections are live, and which rules let them in: the
//! conntrack mark carries the rule ids) and by the agent's opt-in strict mode (delete the
//! entries a tightened policy no longer admits). Only two requests exist here: a dump of the
//! whole table (`IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`) and a delete of one entry by its
//! original tuple plus its kernel id (`IPCTNL_MSG_CT_DELETE` with `CTA_ID`), so a delete can
//! never hit a newer connection that reuses the same addresses and ports. There is no flush.
//!
//! The socket works in the network namespace of the thread that opens it, like the nftables
//! backend. Safe code over `mnl::Socket`; messages are built and parsed by hand
//! (`linux/netfilter/nfnetlink_conntrack.h`).

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::netlink::{self, Attrs, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, align};

/// `NFNL_SUBSYS_CTNETLINK`
pub const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// `IPCTNL_MSG_CT_GET`
const MSG_GET: u16 = 1;
/// `IPCTNL_MSG_CT_DELETE`
const MSG_DELETE: u16 = 2;

/// `enum ctattr_type` values used here.
mod cta {
    pub const TUPLE_ORIG: u16 = 1;
    pub const TUPLE_REPLY: u16 = 2;
    pub const STATUS: u16 = 3;
    pub const PROTOINFO: u16 = 4;
    pub const TIMEOUT: u16 = 7;
    pub const MARK: u16 = 8;
    pub const ID: u16 = 12;
    pub const ZONE: u16 = 18;
    // inside a tuple
    pub const TUPLE_IP: u16 = 1;
    pub const TUPLE_PROTO: u16 = 2;
    // inside TUPLE_IP
    pub const IP_V4_SRC: u16 = 1;
    pub const IP_V4_DST: u16 = 2;
    pub const IP_V6_SRC: u16 = 3;
    pub const IP_V6_DST: u16 = 4;
    // inside TUPLE_PROTO
    pub const PROTO_NUM: u16 = 1;
    pub const PROTO_SRC_PORT: u16 = 2;
    pub const PROTO_DST_PORT: u16 = 3;
    // inside PROTOINFO
    pub const PROTOINFO_TCP: u16 = 1;
    pub const PROTOINFO_TCP_STATE: u16 = 1;
}

/// `NLA_F_NESTED`
const NLA_F_NESTED: u16 = 0x8000;

/// One direction of a connection: addresses, protocol, ports (for TCP, UDP, SCTP, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tuple {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IANA protocol number.
    pub proto: u8,
    /// Source port, for protocols with ports.
    pub sport: Option<u16>,
    /// Destination port, for protocols with ports.
    pub dport: Option<u16>,
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |ip: IpAddr, port: Option<u16>| match (ip, port) {
            (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
            (ip, Some(p)) => format!("{ip}:{p}"),
            (ip, None) => ip.to_string(),
        };
        write!(
            f,
            "{} -> {}",
            at(self.src, self.sport),
            at(self.dst, self.dport)
        )
    }
}

/// One conntrack entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The direction of the first packet (before NAT).
    pub orig: Tuple,
    /// The direction of the answers (after NAT: its source is the real destination).
    pub reply: Tuple,
    /// The conntrack mark.
    pub mark: u32,
    /// The kernel's id of this entry (changes when the tuple is reused by a new connection).
    pub id: u32,
    /// Conntrack zone (0: the default).
    pub zone: u16,
    /// `IPS_*` status bits.
    pub status: u32,
    /// Seconds until it expires, if reported.
    pub timeout: Option<u32>,
    /// TCP state (`TCP_CONNTRACK_*`), for TCP.
    pub tcp_state: Option<u8>,
}

impl Entry {
    /// The connection as policy judges it: the first packet's source, the real destination
    /// (after DNAT, e.g. a Service's backend pod) and its port.
    pub fn judged(&self) -> (IpAddr, IpAddr, u8, Option<u16>) {
        (
            self.orig.src,
            self.reply.src,
            self.orig.proto,
            self.reply.sport,
        )
    }

    /// The TCP state by its conntrack name (`ESTABLISHED`, `TIME_WAIT`, …).
    pub fn tcp_state_name(&self) -> Option<&'static str> {
        const NAMES: [&str; 10] = [
            "NONE",
            "SYN_SENT",
            "SYN_RECV",
            "ESTABLISHED",
            "FIN_WAIT",
            "CLOSE_WAIT",
            "LAST_ACK",
            "TIME_WAIT",
            "CLOSE",
            "SYN_SENT2",
        ];
        self.tcp_state
            .map(|s| NAMES.get(usize::from(s)).copied().unwrap_or("?"))
    }
}

/// A ctnetlink socket in the calling thread's network namespace.
pub struct Conntrack {
    socket: mnl::Socket,
    seq: u32,
}

fn nl_err(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("ctnetlink {what}: {e}"))
}

impl Conntrack {
    /// Opens the socket (needs CAP_NET_ADMIN).
    pub fn open() -> io::Result<Conntrack> {
        let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(|e| nl_err("socket", e))?;
        Ok(Conntrack { socket, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Every entry of every family.
    pub fn dump(&mut self) -> io::Result<Vec<Entry>> {
        let seq = self.next_seq();
        let msg = build(MSG_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, &[]);
        self.socket
            .send(&msg)
            .map_err(|e| nl_err("dump request", e))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        // Bounded: a dump ends with DONE; a runaway table still stops at 4 million entries.
        for _ in 0..(1 << 22) {
            let n = self
                .socket
                .recv_raw(&mut buf)
                .map_err(|e| nl_err("dump", e))?;
            let msgs = netlink::messages(&buf[..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            for m in msgs {
                if m.header.seq != seq {
                    continue;
                }
                if m.header.kind == NLMSG_DONE {
                    return Ok(out);
                }
                if let Some(errno) = m.errno() {
                    if errno != 0 {
                        return Err(nl_err("dump", io::Error::from_raw_os_error(errno)));
                    }
                    continue;
                }
                if m.header.kind >> 8 == NFNL_SUBSYS_CTNETLINK
                    && let Some(e) = parse_entry(m.bytes)
                {
                    out.push(e);
                }
            }
        }
        Err(io::Error::other("ctnetlink dump did not end"))
    }

    /// Deletes one entry, named by its original tuple, zone and id. `Ok(false)` when it is
    /// already gone (expired, or its tuple now belongs to another connection).
    pub fn delete(&mut self, e: &Entry) -> io::Result<bool> {
        let seq = self.next_seq();
        let family = match e.orig.src {
            IpAddr::V4(_) => libc::AF_INET as u8,
            IpAddr::V6(_) => libc::AF_INET6 as u8,
        };
        let mut attrs = Vec::new();
        put_nested(&mut attrs, cta::TUPLE_ORIG, &tuple_attrs(&e.orig));
        put(&mut attrs, cta::ID, &e.id.to_be_bytes());
        if e.zone != 0 {
            put(&mut attrs, cta::ZONE, &e.zone.to_be_bytes());
        }
        let msg = build(MSG_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, family, &attrs);
        self.socket.send(&msg).map_err(|e| nl_err("delete", e))?;
        let mut buf = vec![0u8; 8192];
        for _ in 0..64 {
            let n = self
                .socket
                .recv_raw(&mut buf)
                .map_err(|e| nl_err("delete", e))?;
            let msgs = netlink::messages(&buf[..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            for m in msgs {
                if m.header.seq != seq {
                    continue;
                }
                match m.errno() {
                    Some(0) => return Ok(true),
                    Some(errno) if errno == libc::ENOENT => return Ok(false),
                    Some(errno) => {
                        return Err(nl_err(
                            &format!("delete {}", e.orig),
                            io::Error::from_raw_os_error(errno),
                        ));
                    }
                    None => {}
                }
            }
        }
        Err(io::Error::other("ctnetlink delete: no acknowledgement"))
    }
}

/// What one strict-mode pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Purge {
    /// Entries read.
    pub seen: usize,
    /// Entries judged (the others were not ours to judge: see [`purge`]).
    pub judged: usize,
    /// Entries deleted, by original tuple.
    pub deleted: Vec<Tuple>,
    /// Entries already gone when deleted (expired, or their tuple reused).
    pub gone: usize,
}

/// Strict mode's judge: whether `node`'s policies in `cluster` still admit the connection of
/// `e`; `None` when it is not for strict mode to judge (a protocol without ports, or traffic
/// of the node's own addresses `own`: kubelet probes and the like are always allowed).
pub fn node_admits_entry(
    cluster: &weft_netpol::model::Cluster,
    node: &str,
    own: &std::collections::BTreeSet<IpAddr>,
    e: &Entry,
) -> Option<bool> {
    let (src, dst, proto, port) = e.judged();
    let protocol = weft_netpol::ruleset::Protocol::from_number(proto)?;
    if own.contains(&src) || own.contains(&dst) {
        return None;
    }
    let conn = weft_netpol::eval::Connection {
        src,
        dst,
        protocol,
        port: port?,
    };
    Some(weft_netpol::eval::node_admits(cluster, node, &conn))
}

/// Deletes, one by one, every entry `judge` says is no longer admitted (`Some(false)`);
/// `None` means "not for us to judge" (another protocol, the node's own traffic, …).
/// Targeted: never a flush; each delete names the entry's tuple and kernel id.
pub fn purge(ct: &mut Conntrack, judge: impl Fn(&Entry) -> Option<bool>) -> io::Result<Purge> {
    let mut report = Purge::default();
    for e in ct.dump()? {
        report.seen += 1;
        match judge(&e) {
            None => continue,
            Some(true) => report.judged += 1,
            Some(false) => {
                report.judged += 1;
                if ct.delete(&e)? {
                    report.deleted.push(e.orig);
                } else {
                    report.gone += 1;
                }
            }
        }
    }
    Ok(report)
}

fn put(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + align(len) - len, 0);
}

fn put_nested(out: &mut Vec<u8>, kind: u16, inner: &[u8]) {
    put(out, kind | NLA_F_NESTED, inner);
}

fn tuple_attrs(t: &Tuple) -> Vec<u8> {
    let mut ip = Vec::new();
    match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            put(&mut ip, cta::IP_V4_SRC, &s.octets());
            put(&mut ip, cta::IP_V4_DST, &d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            put(&mut ip, cta::IP_V6_SRC, &v6(s));
            put(&mut ip, cta::IP_V6_DST, &v6(d));
        }
    }
    let mut proto = Vec::new();
    put(&mut proto, cta::PROTO_NUM, &[t.proto]);
    if let Some(p) = t.sport {
        put(&mut proto, cta::PROTO_SRC_PORT, &p.to_be_bytes());
    }
    if let Some(p) = t.dport {
        put(&mut proto, cta::PROTO_DST_PORT, &p.to_be_bytes());
    }
    let mut out = Vec::new();
    put_nested(&mut out, cta::TUPLE_IP, &ip);
    put_nested(&mut out, cta::TUPLE_PROTO, &proto);
    out
}

/// One ctnetlink request: header, `nfgenmsg`, attributes.
fn build(msg: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = netlink::NLMSG_HDRLEN + netlink::NFGENMSG_LEN + attrs.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version 0, res_id 0
    out.extend_from_slice(attrs);
    out
}

fn be16(d: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(d.get(..2)?.try_into().ok()?))
}

fn be32(d: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(d.get(..4)?.try_into().ok()?))
}

fn parse_tuple(data: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for a in Attrs::new(data) {
        match a.kind {
            cta::TUPLE_IP => {
                for ip in Attrs::new(a.data) {
                    let v4 = |d: &[u8]| -> Option<IpAddr> {
                        Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(d).ok()?)))
                    };
                    let v6 = |d: &[u8]| -> Option<IpAddr> {
                        Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(d).ok()?)))
                    };
                    match ip.kind {
                        cta::IP_V4_SRC => src = v4(ip.data),
                        cta::IP_V4_DST => dst = v4(ip.data),
                        cta::IP_V6_SRC => src = v6(ip.data),
                        cta::IP_V6_DST => dst = v6(ip.data),
                        _ => {}
                    }
                }
            }
            cta::TUPLE_PROTO => {
                for p in Attrs::new(a.data) {
                    match p.kind {
                        cta::PROTO_NUM => proto = p.data.first().copied(),
                        cta::PROTO_SRC_PORT => sport = be16(p.data),
                        cta::PROTO_DST_PORT => dport = be16(p.data),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        proto: proto?,
        sport,
        dport,
    })
}

/// Parses one `IPCTNL_MSG_CT_NEW` message (a dump reply); `None` if it lacks a tuple.
pub fn parse_entry(msg: &[u8]) -> Option<Entry> {
    let attrs = Attrs::new(msg.get(netlink::NLMSG_HDRLEN + netlink::NFGENMSG_LEN..)?);
    let (mut orig, mut reply) = (None, None);
    let mut e = Entry {
        orig: Tuple {
            src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            proto: 0,
            sport: None,
            dport: None,
        },
        reply: Tuple {
            src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            proto: 0,
            sport: None,
            dport: None,
        },
        mark: 0,
        id: 0,
        zone: 0,
        status: 0,
        timeout: None,
        tcp_state: None,
    };
    for a in attrs {
        match a.kind {
            cta::TUPLE_ORIG => orig = parse_tuple(a.data),
            cta::TUPLE_REPLY => reply = parse_tuple(a.data),
            cta::STATUS => e.status = be32(a.data).unwrap_or(0),
            cta::TIMEOUT => e.timeout = be32(a.data),
            cta::MARK => e.mark = be32(a.data).unwrap_or(0),
            cta::ID => e.id = be32(a.data).unwrap_or(0),
            cta::ZONE => e.zone = be16(a.data).unwrap_or(0),
            cta::PROTOINFO => {
                for p in Attrs::new(a.data) {
                    if p.kind == cta::PROTOINFO_TCP {
                        e.tcp_state = Attrs::new(p.data)
                            .find(|t| t.kind == cta::PROTOINFO_TCP_STATE)
                            .and_then(|t| t.data.first().copied());
                    }
                }
            }
            _ => {}
        }
    }
    e.orig = orig?;
    e.reply = reply?;
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delete_request_parses_back_to_its_tuple() {
        let t = Tuple {
            src: "10.244.0.2".parse().unwrap(),
            dst: "10.244.0.3".parse().unwrap(),
            proto: 6,
            sport: Some(40000),
            dport: Some(8080),
        };
        let mut attrs = Vec::new();
        put_nested(&mut attrs, cta::TUPLE_ORIG, &tuple_attrs(&t));
        let reply = Tuple {
            src: t.dst,
            dst: t.src,
            sport: t.dport,
            dport: t.sport,
            ..t
        };
        put_nested(&mut attrs, cta::TUPLE_REPLY, &tuple_attrs(&reply));
        put(&mut attrs, cta::MARK, &0x0010_0100u32.to_be_bytes());
        put(&mut attrs, cta::ID, &77u32.to_be_bytes());
        let msg = build(0, 0, 1, libc::AF_INET as u8, &attrs);
        let e = parse_entry(&msg).unwrap();
        assert_eq!(e.orig, t);
        assert_eq!(e.reply, reply);
        assert_eq!((e.mark, e.id, e.zone), (0x0010_0100, 77, 0));
        assert_eq!(e.judged(), (t.src, t.dst, 6, Some(8080)));
        assert_eq!(t.to_string(), "10.244.0.2:40000 -> 10.244.0.3:8080");
    }
}
