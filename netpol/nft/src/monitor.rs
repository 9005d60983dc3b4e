//! Change notifications for one table: who committed what, as the kernel announces it.
//!
//! The kernel multicasts every committed nftables change to the netlink group
//! `NFNLGRP_NFTABLES` (what `nft monitor` reads): one message per changed object (table,
//! chain, rule, set, element, object), then one `NEWGEN` per transaction naming the new
//! generation and the committing task (`NFTA_GEN_PROC_PID`, `NFTA_GEN_PROC_NAME`). A
//! [`Monitor`] reads them in the calling thread's network namespace and reports each
//! transaction as one [`Event`]: did it touch our table, and was it ours?
//!
//! "Ours" = the committing task is a thread of this process (`/proc/self/task/<pid>`), or,
//! where the kernel's pid is not visible here (the agent in its own pid namespace), the
//! committing thread carries the backend thread's name ([`crate::thread::NftThread`] names it
//! `weft-nft`). Anything else that changed our table (`nft`, another tool) is foreign: drift.
//!
//! Notifications are lossy by design: a receive queue that overflows gives `ENOBUFS` and the
//! lost messages are gone. That is reported as [`Event::Lost`]: the reader must assume anything
//! may have changed (compare the whole table).

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend::socket_err;
use crate::error::NftError;
use crate::netlink::{self, msg};
use crate::sys::{self, RecvBuf};

/// `NFNLGRP_NFTABLES`: the multicast group of nftables change notifications.
const NFNLGRP_NFTABLES: i32 = 7;
/// `NFTA_GEN_PROC_PID`, `NFTA_GEN_PROC_NAME`: the committing task, in a `NEWGEN`.
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;
/// The table's name is attribute 1 of every object message (`NFTA_TABLE_NAME`,
/// `NFTA_CHAIN_TABLE`, `NFTA_RULE_TABLE`, `NFTA_SET_TABLE`, `NFTA_SET_ELEM_LIST_TABLE`,
/// `NFTA_OBJ_TABLE`, `NFTA_FLOWTABLE_TABLE`).
const NFTA_OBJECT_TABLE: u16 = 1;
/// `NFPROTO_INET`: weft's tables are `inet`.
const NFPROTO_INET: u8 = 1;
/// Receive queue asked for: large, so a big transaction of someone else's rarely overflows it.
const RCVBUF: i32 = 8 << 20;
/// The name [`crate::thread::NftThread`] gives its thread (the kernel reports it per commit).
pub const BACKEND_THREAD_NAME: &str = "weft-nft";

/// One committed transaction, as it concerns the watched table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Another process changed the table.
    Foreign {
        /// The ruleset generation the transaction created.
        generation: u32,
        /// The committing task's pid (as the kernel numbers it).
        pid: u32,
        /// Its name (`comm`), e.g. `nft`.
        process: String,
        /// How many objects of the table it changed.
        objects: usize,
    },
    /// This process changed the table.
    Own {
        /// The ruleset generation the transaction created.
        generation: u32,
        /// How many objects of the table it changed.
        objects: usize,
    },
    /// A transaction that left the table alone (another table, e.g. kube-proxy's).
    Elsewhere {
        /// The ruleset generation the transaction created.
        generation: u32,
    },
    /// Notifications were lost (the receive queue overflowed): anything may have changed.
    Lost,
}

/// A reader of change notifications for one `inet` table, in the network namespace of the
/// thread that opened it (the socket is not `Send`: read it on that thread).
pub struct Monitor {
    socket: mnl::Socket,
    recv: RecvBuf,
    decoder: Decoder,
}

/// Turns notification datagrams into [`Event`]s (pure; the socket side is [`Monitor`]).
#[derive(Clone, Debug)]
pub struct Decoder {
    table: Vec<u8>,
    /// Objects of the table changed since the last `NEWGEN`.
    touched: usize,
}

impl Monitor {
    /// Subscribes to the notifications of table `inet <table>`.
    pub fn open(table: &str) -> Result<Monitor, NftError> {
        let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(socket_err("open"))?;
        let fd = socket.as_raw_fd();
        sys::set_int_option(
            fd,
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            NFNLGRP_NFTABLES,
        )
        .map_err(socket_err("join the nftables notification group"))?;
        // Ask for a big queue; without CAP_NET_ADMIN's FORCE variant the kernel caps it.
        sys::set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF)
            .or_else(|_| sys::set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF))
            .map_err(socket_err("size the notification queue"))?;
        Ok(Monitor {
            socket,
            recv: RecvBuf::new(1 << 16),
            decoder: Decoder::new(table),
        })
    }

    /// The transactions committed since the last call, waiting up to `timeout` for the first.
    /// Returns as soon as at least one transaction (or a loss) was seen, or empty on timeout.
    pub fn next(&mut self, timeout: Duration) -> Result<Vec<Event>, NftError> {
        let fd = self.socket.as_raw_fd();
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        loop {
            match sys::recv_nonblocking(fd, &mut self.recv) {
                Ok(Some(n)) => {
                    let datagram = self.recv.bytes(n).to_vec();
                    self.decoder.read(&datagram, &mut events);
                    continue; // drain whatever else is queued
                }
                Ok(None) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.decoder.lost(&mut events);
                    continue;
                }
                Err(e) => return Err(socket_err("receive notifications")(e)),
            }
            if !events.is_empty() {
                return Ok(events);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(events);
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            sys::poll_readable(fd, ms).map_err(socket_err("wait for notifications"))?;
        }
    }
}

impl Decoder {
    /// A decoder for table `inet <table>`.
    pub fn new(table: &str) -> Decoder {
        Decoder {
            table: table.as_bytes().to_vec(),
            touched: 0,
        }
    }

    /// Notifications were lost: the half-seen transaction is meaningless.
    pub fn lost(&mut self, events: &mut Vec<Event>) {
        self.touched = 0;
        if events.last() != Some(&Event::Lost) {
            events.push(Event::Lost);
        }
    }

    /// Appends the transactions `datagram` completes to `events`.
    pub fn read(&mut self, datagram: &[u8], events: &mut Vec<Event>) {
        let Ok(msgs) = netlink::messages(datagram) else {
            // Cannot tell what changed: treat it as a loss.
            self.lost(events);
            return;
        };
        for m in msgs {
            let Some(kind) = m.header.nft_msg() else {
                continue;
            };
            if kind == msg::NEWGEN {
                let generation = m.gen_id().unwrap_or(0);
                let attr = |k: u16| m.nft_attrs().find(|a| a.kind == k).map(|a| a.data);
                let pid = attr(NFTA_GEN_PROC_PID)
                    .and_then(|d| d.get(..4))
                    .and_then(|d| d.try_into().ok())
                    .map(u32::from_be_bytes)
                    .unwrap_or(0);
                let process = attr(NFTA_GEN_PROC_NAME)
                    .map(|d| String::from_utf8_lossy(d.split(|&b| b == 0).next().unwrap_or(d)))
                    .unwrap_or_default()
                    .into_owned();
                let objects = std::mem::take(&mut self.touched);
                events.push(if objects == 0 {
                    Event::Elsewhere { generation }
                } else if is_own(pid, &process) {
                    Event::Own {
                        generation,
                        objects,
                    }
                } else {
                    Event::Foreign {
                        generation,
                        pid,
                        process,
                        objects,
                    }
                });
                continue;
            }
            let family = m.bytes.get(netlink::NLMSG_HDRLEN).copied();
            let table = m
                .nft_attrs()
                .find(|a| a.kind == NFTA_OBJECT_TABLE)
                .map(|a| a.data.split(|&b| b == 0).next().unwrap_or(a.data));
            if family == Some(NFPROTO_INET) && table == Some(self.table.as_slice()) {
                self.touched += 1;
            }
        }
    }
}

/// Whether the committing task is this process (see the module's documentation).
fn is_own(pid: u32, process: &str) -> bool {
    (pid != 0 && Path::new("/proc/self/task").join(pid.to_string()).exists())
        || process == BACKEND_THREAD_NAME
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(kind: u16, family: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        for (k, data) in attrs {
            let len = 4 + data.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&k.to_ne_bytes());
            body.extend_from_slice(data);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        }
        let mut m = Vec::new();
        let len = (16 + body.len()) as u32;
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&((10u16 << 8) | kind).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&body);
        m
    }

    fn newgen(generation: u32, pid: u32, name: &str) -> Vec<u8> {
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        nlmsg(
            msg::NEWGEN,
            0,
            &[
                (1, &generation.to_be_bytes()),
                (NFTA_GEN_PROC_PID, &pid.to_be_bytes()),
                (NFTA_GEN_PROC_NAME, &n),
            ],
        )
    }

    #[test]
    fn a_transaction_is_judged_by_its_objects_and_its_committer() {
        let mut m = Decoder::new("weft");
        let mut d = nlmsg(
            msg::NEWSETELEM,
            NFPROTO_INET,
            &[(1, b"weft\0"), (2, b"sel-x\0")],
        );
        d.extend(nlmsg(msg::NEWSETELEM, NFPROTO_INET, &[(1, b"weft\0")]));
        // Same name, other family; other table of the same family: not ours.
        d.extend(nlmsg(msg::NEWSETELEM, 2, &[(1, b"weft\0")]));
        d.extend(nlmsg(msg::NEWRULE, NFPROTO_INET, &[(1, b"weft-nat\0")]));
        d.extend(newgen(41, 999_999_999, "nft"));
        d.extend(nlmsg(msg::NEWRULE, NFPROTO_INET, &[(1, b"kube-proxy\0")]));
        d.extend(newgen(42, 7, "kube-proxy"));
        d.extend(nlmsg(msg::DELCHAIN, NFPROTO_INET, &[(1, b"weft\0")]));
        d.extend(newgen(43, std::process::id(), "whatever"));
        d.extend(nlmsg(msg::NEWSET, NFPROTO_INET, &[(1, b"weft\0")]));
        d.extend(newgen(44, 0, BACKEND_THREAD_NAME));
        let mut events = Vec::new();
        m.read(&d, &mut events);
        assert_eq!(
            events,
            vec![
                Event::Foreign {
                    generation: 41,
                    pid: 999_999_999,
                    process: "nft".into(),
                    objects: 2
                },
                Event::Elsewhere { generation: 42 },
                Event::Own {
                    generation: 43,
                    objects: 1
                },
                Event::Own {
                    generation: 44,
                    objects: 1
                },
            ]
        );
    }

    #[test]
    fn a_malformed_datagram_is_a_loss_not_a_guess() {
        let mut m = Decoder::new("weft");
        let mut d = nlmsg(msg::NEWSETELEM, NFPROTO_INET, &[(1, b"weft\0")]);
        d.truncate(d.len() - 3);
        let mut events = Vec::new();
        m.read(&d, &mut events);
        assert_eq!(events, vec![Event::Lost]);
        // The half-seen transaction does not leak into the next one.
        let mut events = Vec::new();
        m.read(&newgen(5, 1, "nft"), &mut events);
        assert_eq!(events, vec![Event::Elsewhere { generation: 5 }]);
    }
}
