//! A subscriber to one nflog group (`NFNL_SUBSYS_ULOG`): the packets weft's rate-limited
//! `log … group N` statement sends, with their prefix.
//!
//! The agent binds the group its drop log writes to and keeps the recent drops in a ring
//! (`weft status --drops`). Only the first 128 bytes of each packet are copied to us: enough
//! for the addresses and ports. The kernel allows one listener per group and namespace: a
//! second `bind` fails with `EBUSY`, which is reported as such.
//!
//! Safe code over `mnl::Socket`; messages built and parsed by hand
//! (`linux/netfilter/nfnetlink_log.h`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::netlink::{self, Attrs, NLM_F_ACK, NLM_F_REQUEST, align};
use crate::sys;

/// `NFNL_SUBSYS_ULOG`
pub const NFNL_SUBSYS_ULOG: u16 = 4;
/// `NFULNL_MSG_PACKET`
const MSG_PACKET: u16 = 0;
/// `NFULNL_MSG_CONFIG`
const MSG_CONFIG: u16 = 1;
/// `NFULA_CFG_CMD`
const CFG_CMD: u16 = 1;
/// `NFULA_CFG_MODE`
const CFG_MODE: u16 = 2;
/// `NFULA_CFG_TIMEOUT`: flush interval, in 1/100 s.
const CFG_TIMEOUT: u16 = 3;
/// `NFULA_CFG_QTHRESH`: packets batched before a flush.
const CFG_QTHRESH: u16 = 4;
/// `NFULNL_CFG_CMD_BIND`
const CMD_BIND: u8 = 1;
/// `NFULNL_COPY_PACKET`
const COPY_PACKET: u8 = 2;
/// Bytes of each packet copied to us.
const COPY_RANGE: u32 = 128;
/// `NFULA_PAYLOAD`
const ATTR_PAYLOAD: u16 = 9;
/// `NFULA_PREFIX`
const ATTR_PREFIX: u16 = 10;
/// `NFULA_IFINDEX_INDEV`
const ATTR_INDEV: u16 = 4;
/// `NFULA_IFINDEX_OUTDEV`
const ATTR_OUTDEV: u16 = 5;

/// One logged packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    /// The log statement's prefix.
    pub prefix: String,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IANA protocol number.
    pub proto: u8,
    /// Source port (TCP, UDP, SCTP).
    pub sport: Option<u16>,
    /// Destination port (TCP, UDP, SCTP).
    pub dport: Option<u16>,
    /// Input interface index (0: none).
    pub indev: u32,
    /// Output interface index (0: none).
    pub outdev: u32,
}

/// A bound nflog group in the calling thread's network namespace.
pub struct NflogGroup {
    socket: mnl::Socket,
    buf: sys::RecvBuf,
    group: u16,
}

impl NflogGroup {
    /// Binds `group` and asks for packet copies (needs CAP_NET_ADMIN).
    pub fn bind(group: u16) -> io::Result<NflogGroup> {
        let err = |what: &'static str| {
            move |e: io::Error| {
                io::Error::new(e.kind(), format!("nflog group {group}: {what}: {e}"))
            }
        };
        let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(err("socket"))?;
        let _ = sys::set_int_option(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            1 << 20,
        );
        let mut attrs = Vec::new();
        put(&mut attrs, CFG_CMD, &[CMD_BIND]);
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend_from_slice(&[COPY_PACKET, 0]);
        put(&mut attrs, CFG_MODE, &mode);
        // Each packet as it comes (the kernel's default batches 100 packets or 1 s).
        put(&mut attrs, CFG_QTHRESH, &1u32.to_be_bytes());
        put(&mut attrs, CFG_TIMEOUT, &1u32.to_be_bytes());
        let msg = build(MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, 1, group, &attrs);
        socket.send(&msg).map_err(err("bind"))?;
        let mut me = NflogGroup {
            socket,
            buf: sys::RecvBuf::new(1 << 16),
            group,
        };
        // The ack of the bind (an error such as EBUSY: another listener has the group).
        for _ in 0..50 {
            if !sys::poll_readable(me.socket.as_raw_fd(), 100).map_err(err("bind"))? {
                continue;
            }
            let Some(n) =
                sys::recv_nonblocking(me.socket.as_raw_fd(), &mut me.buf).map_err(err("bind"))?
            else {
                continue;
            };
            let data = me.buf.bytes(n).to_vec();
            for m in netlink::messages(&data).map_err(|e| err("bind")(io::Error::other(e)))? {
                match m.errno() {
                    Some(0) => return Ok(me),
                    Some(errno) => return Err(err("bind")(io::Error::from_raw_os_error(errno))),
                    None => {}
                }
            }
        }
        Err(err("bind")(io::Error::other("no acknowledgement")))
    }

    /// The group.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Packets logged since the last call, waiting up to `timeout` for the first.
    pub fn next(&mut self, timeout: Duration) -> io::Result<Vec<Logged>> {
        let fd = self.socket.as_raw_fd();
        let mut out = Vec::new();
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        if !sys::poll_readable(fd, ms)? {
            return Ok(out);
        }
        loop {
            match sys::recv_nonblocking(fd, &mut self.buf) {
                Ok(Some(n)) => {
                    let data = self.buf.bytes(n).to_vec();
                    let Ok(msgs) = netlink::messages(&data) else {
                        continue;
                    };
                    out.extend(msgs.iter().filter_map(|m| parse_packet(m.bytes)));
                }
                Ok(None) => return Ok(out),
                // Queue overflow: some log messages were lost; what follows is still good.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn put(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + align(len) - len, 0);
}

fn build(msg: u16, flags: u16, seq: u32, group: u16, attrs: &[u8]) -> Vec<u8> {
    let len = netlink::NLMSG_HDRLEN + netlink::NFGENMSG_LEN + attrs.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | msg).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(libc::AF_UNSPEC as u8);
    out.push(0);
    out.extend_from_slice(&group.to_be_bytes()); // res_id: the group, big-endian
    out.extend_from_slice(attrs);
    out
}

/// Parses one `NFULNL_MSG_PACKET`; `None` for anything else or a packet we cannot read.
pub fn parse_packet(msg: &[u8]) -> Option<Logged> {
    let header = netlink::Header::parse(msg)?;
    if header.kind != (NFNL_SUBSYS_ULOG << 8) | MSG_PACKET {
        return None;
    }
    let attrs = Attrs::new(msg.get(netlink::NLMSG_HDRLEN + netlink::NFGENMSG_LEN..)?);
    let (mut prefix, mut payload, mut indev, mut outdev) = (String::new(), None, 0, 0);
    for a in attrs {
        match a.kind {
            ATTR_PREFIX => {
                let end = a.data.iter().position(|b| *b == 0).unwrap_or(a.data.len());
                prefix = String::from_utf8_lossy(&a.data[..end]).into_owned();
            }
            ATTR_PAYLOAD => payload = Some(a.data),
            ATTR_INDEV => indev = u32::from_be_bytes(a.data.get(..4)?.try_into().ok()?),
            ATTR_OUTDEV => outdev = u32::from_be_bytes(a.data.get(..4)?.try_into().ok()?),
            _ => {}
        }
    }
    let (src, dst, proto, l4) = parse_ip(payload?)?;
    let port = |at: usize| {
        matches!(proto, 6 | 17 | 132)
            .then(|| Some(u16::from_be_bytes(l4.get(at..at + 2)?.try_into().ok()?)))
            .flatten()
    };
    Some(Logged {
        prefix,
        src,
        dst,
        proto,
        sport: port(0),
        dport: port(2),
        indev,
        outdev,
    })
}

/// Addresses, protocol and transport header of an IPv4 or IPv6 packet (no extension headers).
fn parse_ip(p: &[u8]) -> Option<(IpAddr, IpAddr, u8, &[u8])> {
    match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let src = Ipv4Addr::from(<[u8; 4]>::try_from(p.get(12..16)?).ok()?);
            let dst = Ipv4Addr::from(<[u8; 4]>::try_from(p.get(16..20)?).ok()?);
            Some((src.into(), dst.into(), *p.get(9)?, p.get(ihl..)?))
        }
        6 => {
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(p.get(8..24)?).ok()?);
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(p.get(24..40)?).ok()?);
            Some((src.into(), dst.into(), *p.get(6)?, p.get(40..)?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_tcp_syn_parses() {
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&[10, 244, 0, 2, 10, 244, 0, 3]);
        ip.extend_from_slice(&40000u16.to_be_bytes());
        ip.extend_from_slice(&8080u16.to_be_bytes());
        ip.extend_from_slice(&[0; 16]);
        let mut attrs = Vec::new();
        put(&mut attrs, ATTR_PREFIX, b"weft-drop grp-x-in \0");
        put(&mut attrs, ATTR_INDEV, &7u32.to_be_bytes());
        put(&mut attrs, ATTR_PAYLOAD, &ip);
        let msg = build(MSG_PACKET, 0, 0, 7, &attrs);
        let l = parse_packet(&msg).unwrap();
        assert_eq!(l.prefix, "weft-drop grp-x-in ");
        assert_eq!(l.src, "10.244.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(l.dst, "10.244.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            (l.proto, l.sport, l.dport, l.indev),
            (6, Some(40000), Some(8080), 7)
        );
        // Not a packet message: nothing.
        assert_eq!(parse_packet(&build(MSG_CONFIG, 0, 0, 7, &attrs)), None);
    }
}
