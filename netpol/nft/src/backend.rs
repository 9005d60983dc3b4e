//! [`NftBackend`]: one netlink socket, one transaction per [`NftBackend::apply`], dumps.
//!
//! `apply` encodes every op into one contiguous batch (`BATCH_BEGIN`, the messages,
//! `BATCH_END`), sizes the socket buffers for it, sends it with one `sendto`, and reads an ack
//! for every message, matched by sequence number to the op it came from. nfnetlink runs the
//! whole batch inside `sendto`, so every ack is queued when it returns; the loop reads until
//! each message is accounted for, then drains with non-blocking reads. Lost acks (`ENOBUFS`)
//! or a timeout mean the outcome is unknown: the error says so, the socket is replaced before
//! its next use, and the caller re-dumps.
//!
//! Reading the table back (`dump`, `dump_raw`) is in [`crate::walk`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use weft_netpol::diff::Op;
use weft_netpol::ruleset::{ChainDef, ChainPolicy, ChainType, Hook};

use crate::error::NftError;
use crate::expr;
use crate::netlink::{self, msg, udata};
use crate::set::{self, RawElem};
use crate::sys::{self, MsgBuf, RecvBuf};

/// Oldest kernel weft supports.
pub const MIN_KERNEL: (u32, u32) = (5, 15);
/// First kernel with `NFT_MSG_DESTROYSETELEM`.
pub const DESTROY_KERNEL: (u32, u32) = (6, 3);

/// Element bytes per `NEWSETELEM` message: well under the 64 KiB limit of one netlink attribute
/// (the element list is one nested attribute whose length is 16 bits).
const ELEMENT_BYTES_PER_MESSAGE: usize = 32 * 1024;
/// How long to wait for acks or dump replies before declaring the outcome unknown. nfnetlink
/// answers inside `sendto`, so this is only reached when something is badly wrong.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Dump attempts before giving up on a ruleset that keeps changing.
pub(crate) const DUMP_ATTEMPTS: usize = 5;
/// Receive buffer for one datagram (dumps send up to 32 KiB per datagram, acks far less).
const RECV_BUFFER: usize = 256 * 1024;

const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;

/// The running kernel's version, as `uname` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelVersion {
    /// The release string, e.g. `6.18.44-fc-v595`.
    pub release: String,
    /// Major and minor number.
    pub version: (u32, u32),
}

impl KernelVersion {
    /// Parses `uname -r` output.
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(KernelVersion {
            release: release.to_string(),
            version: (major, minor),
        })
    }

    /// Whether element deletes can use `DESTROYSETELEM` (absent elements are no error).
    pub fn has_destroy(&self) -> bool {
        self.version >= DESTROY_KERNEL
    }
}

/// Tuning knobs, for tests of the failure paths.
#[derive(Clone, Debug, Default)]
pub struct NftOptions {
    /// A fixed receive buffer (bytes, as passed to `SO_RCVBUF`) instead of one sized for the
    /// acks of each batch. Only tests use it, to provoke `ENOBUFS`.
    pub fixed_rcvbuf: Option<usize>,
    /// Use `DELSETELEM` even where `DESTROYSETELEM` exists (to test the older kernels' path).
    pub no_destroy: bool,
}

/// What one [`NftBackend::apply`] sent and read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Ops in the transaction.
    pub ops: usize,
    /// Messages between `BATCH_BEGIN` and `BATCH_END`.
    pub messages: usize,
    /// Of which element messages (`NEWSETELEM`, `DELSETELEM`, `DESTROYSETELEM`).
    pub element_messages: usize,
    /// Of which all others (tables, sets, chains, rules).
    pub other_messages: usize,
    /// Keys added or deleted by the element ops.
    pub elements: usize,
    /// Bytes sent.
    pub bytes: usize,
    /// Acks read (equal to `messages` after a commit).
    pub acks: usize,
    /// Time spent encoding the ops into netlink messages.
    pub encoding: Duration,
    /// Time from encoding to the last ack (encoding included).
    pub elapsed: Duration,
}

/// Which op a message came from, for error reports.
#[derive(Clone, Debug)]
struct Sent {
    index: usize,
    object: String,
}

/// An encoded transaction.
struct Batch {
    buf: MsgBuf,
    begin: u32,
    end: u32,
    sent: BTreeMap<u32, Sent>,
    element_messages: usize,
    elements: usize,
}

/// nftables over netlink for one network namespace.
///
/// Owns a netlink socket in the network namespace of the thread that created it. `mnl::Socket`
/// is `!Send`, and so is this type: a backend lives and dies on one OS thread. To use it from
/// elsewhere (an async runtime, another namespace) run it on its own thread with
/// [`crate::NftThread`].
pub struct NftBackend {
    pub(crate) socket: mnl::Socket,
    pub(crate) portid: u32,
    pub(crate) seq: u32,
    kernel: KernelVersion,
    options: NftOptions,
    /// Buffer sizes already forced on the socket.
    sndbuf: usize,
    rcvbuf: usize,
    /// Set when replies may be left unread: the socket is replaced before its next use.
    pub(crate) dirty: bool,
    pub(crate) recv: RecvBuf,
}

pub(crate) fn socket_err(step: &'static str) -> impl FnOnce(std::io::Error) -> NftError {
    move |source| NftError::Socket { step, source }
}

fn open_socket() -> Result<(mnl::Socket, u32), NftError> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(socket_err("open"))?;
    // Error acks carry only the failing message's header, not a copy of the whole message.
    sys::set_int_option(socket.as_raw_fd(), SOL_NETLINK, NETLINK_CAP_ACK, 1)
        .map_err(socket_err("set NETLINK_CAP_ACK"))?;
    let portid = socket.portid();
    Ok((socket, portid))
}

impl NftBackend {
    /// A backend in the calling thread's network namespace.
    pub fn new() -> Result<NftBackend, NftError> {
        NftBackend::with_options(NftOptions::default())
    }

    /// A backend with tuning knobs (see [`NftOptions`]).
    pub fn with_options(options: NftOptions) -> Result<NftBackend, NftError> {
        let release = sys::kernel_release().map_err(socket_err("uname"))?;
        let kernel = KernelVersion::parse(&release).ok_or_else(|| NftError::KernelTooOld {
            release: release.clone(),
        })?;
        if kernel.version < MIN_KERNEL {
            return Err(NftError::KernelTooOld { release });
        }
        let (socket, portid) = open_socket()?;
        let destroy = kernel.has_destroy() && !options.no_destroy;
        tracing::info!(
            kernel = %kernel.release,
            element_deletes = if destroy { "DESTROYSETELEM" } else { "DELSETELEM" },
            "nftables netlink backend ready"
        );
        Ok(NftBackend {
            socket,
            portid,
            seq: 0,
            kernel,
            options,
            sndbuf: 0,
            rcvbuf: 0,
            dirty: false,
            recv: RecvBuf::new(RECV_BUFFER),
        })
    }

    /// The kernel this backend talks to.
    pub fn kernel(&self) -> &KernelVersion {
        &self.kernel
    }

    pub(crate) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Replaces a socket that may hold unread replies: never read stale acks as new ones.
    pub(crate) fn ensure_clean(&mut self) -> Result<(), NftError> {
        if self.dirty {
            tracing::warn!("replacing a netlink socket that may hold unread replies");
            let (socket, portid) = open_socket()?;
            self.socket = socket;
            self.portid = portid;
            self.sndbuf = 0;
            self.rcvbuf = 0;
            self.dirty = false;
        }
        Ok(())
    }

    /// Forces the socket buffers up to what this batch needs: the whole batch in one datagram
    /// (else `EMSGSIZE`) and every ack queued at once (else `ENOBUFS`, acks lost).
    fn size_buffers(&mut self, bytes: usize, messages: usize) -> Result<(), NftError> {
        let fd = self.socket.as_raw_fd();
        let snd = bytes + 64 * 1024;
        if snd > self.sndbuf {
            let v = i32::try_from(snd).unwrap_or(i32::MAX);
            sys::set_int_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, v)
                .or_else(|_| sys::set_int_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, v))
                .map_err(socket_err("size the send buffer"))?;
            self.sndbuf = snd;
        }
        let (rcv, force) = match self.options.fixed_rcvbuf {
            Some(fixed) => (fixed, fixed != self.rcvbuf),
            None => {
                let want = (messages * 2048).max(256 * 1024);
                (want, want > self.rcvbuf)
            }
        };
        if force {
            let v = i32::try_from(rcv).unwrap_or(i32::MAX);
            sys::set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, v)
                .or_else(|_| sys::set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, v))
                .map_err(socket_err("size the receive buffer"))?;
            self.rcvbuf = rcv;
        }
        Ok(())
    }

    /// Applies `ops` to table `table` (family `inet`) as one transaction: all or nothing.
    ///
    /// Adds never carry `NLM_F_EXCL` (re-adding an identical object or element is a no-op);
    /// element deletes use `DESTROYSETELEM` on kernels 6.3+ and `DELSETELEM` before, where the
    /// caller must only delete elements a fresh dump showed. On [`NftError::Rejected`] the
    /// kernel is unchanged; on [`NftError::OutcomeUnknown`] dump before trying again.
    pub fn apply(&mut self, table: &str, ops: &[Op]) -> Result<ApplyReport, NftError> {
        let started = Instant::now();
        if ops.is_empty() {
            return Ok(ApplyReport::default());
        }
        self.ensure_clean()?;
        let batch = self.encode(table, ops)?;
        let encoding = started.elapsed();
        let messages = batch.sent.len();
        self.size_buffers(batch.buf.len(), messages)?;
        let bytes = batch.buf.as_bytes();
        let n = self.socket.send(bytes).map_err(|source| {
            // Whether anything ran is unknown only if part of it went out; sendto is all or
            // nothing for netlink, so the transaction did not run.
            NftError::Socket {
                step: "send the transaction",
                source,
            }
        })?;
        if n != bytes.len() {
            self.dirty = true;
            return Err(NftError::OutcomeUnknown {
                reason: format!("sent {n} of {} bytes", bytes.len()),
            });
        }
        let acks = self.read_acks(&batch)?;
        let report = ApplyReport {
            ops: ops.len(),
            messages,
            element_messages: batch.element_messages,
            other_messages: messages - batch.element_messages,
            elements: batch.elements,
            bytes: batch.buf.len(),
            acks,
            encoding,
            elapsed: started.elapsed(),
        };
        tracing::debug!(
            table,
            ops = report.ops,
            messages = report.messages,
            element_messages = report.element_messages,
            bytes = report.bytes,
            elapsed_us = report.elapsed.as_micros() as u64,
            "nftables transaction committed"
        );
        Ok(report)
    }

    fn encode(&mut self, table: &str, ops: &[Op]) -> Result<Batch, NftError> {
        let table_c = CString::new(table).map_err(|_| NftError::Encode {
            index: 0,
            object: format!("table {table:?}"),
            reason: "name contains NUL".into(),
        })?;
        let nft_table = nftnl::Table::new(&table_c, nftnl::ProtoFamily::Inet);
        let destroy = self.kernel.has_destroy() && !self.options.no_destroy;
        let mut batch = Batch {
            buf: MsgBuf::new(),
            begin: self.next_seq(),
            end: 0,
            sent: BTreeMap::new(),
            element_messages: 0,
            elements: 0,
        };
        batch.buf.batch_begin(batch.begin);
        // Sets created in this batch that have no element yet (nft's leading `0 [end]`).
        let mut fresh: BTreeSet<&str> = BTreeSet::new();
        let mut set_id = 0;
        for (index, op) in ops.iter().enumerate() {
            let object = describe(op);
            let fail = |reason: String| NftError::Encode {
                index,
                object: object.clone(),
                reason,
            };
            let io_fail = |e: std::io::Error| fail(e.to_string());
            let send = |batch: &mut Batch, seq: u32, element: bool| {
                batch.sent.insert(
                    seq,
                    Sent {
                        index,
                        object: object.clone(),
                    },
                );
                if element {
                    batch.element_messages += 1;
                }
            };
            match op {
                Op::DeleteTable => {
                    let seq = self.next_seq();
                    batch.buf.nlmsg(&nft_table, seq, nftnl::MsgType::Del);
                    send(&mut batch, seq, false);
                }
                Op::AddTable { comment } => {
                    expr::check_comment(comment).map_err(|e| fail(e.to_string()))?;
                    let mut ud = Vec::new();
                    udata::put_strz(&mut ud, udata::COMMENT, comment)
                        .ok_or_else(|| fail("comment too long".into()))?;
                    let seq = self.next_seq();
                    batch.buf.table_add(seq, table, &ud).map_err(io_fail)?;
                    send(&mut batch, seq, false);
                }
                Op::AddSet(def) => {
                    let raw = set::encode_def(def).map_err(|e| fail(e.to_string()))?;
                    set_id += 1;
                    let seq = self.next_seq();
                    batch
                        .buf
                        .set_add(seq, table, &raw, set_id)
                        .map_err(io_fail)?;
                    send(&mut batch, seq, false);
                    fresh.insert(&def.name);
                }
                Op::DeleteSet(name) => {
                    let seq = self.next_seq();
                    batch.buf.set_delete(seq, table, name).map_err(io_fail)?;
                    send(&mut batch, seq, false);
                    fresh.remove(name.as_str());
                }
                Op::AddElements {
                    set: name,
                    elements,
                } => {
                    let is_fresh = fresh.remove(name.as_str());
                    let raw =
                        set::encode_add(elements, is_fresh).map_err(|e| fail(e.to_string()))?;
                    batch.elements += elements.len();
                    for chunk in chunks(&raw) {
                        let seq = self.next_seq();
                        batch
                            .buf
                            .elements(seq, msg::NEWSETELEM, table, name, chunk)
                            .map_err(io_fail)?;
                        send(&mut batch, seq, true);
                    }
                }
                Op::DeleteElements { set: name, keys } => {
                    let raw = set::encode_delete(keys).map_err(|e| fail(e.to_string()))?;
                    batch.elements += keys.len();
                    let kind = if destroy {
                        msg::DESTROYSETELEM
                    } else {
                        msg::DELSETELEM
                    };
                    for chunk in chunks(&raw) {
                        let seq = self.next_seq();
                        batch
                            .buf
                            .elements(seq, kind, table, name, chunk)
                            .map_err(io_fail)?;
                        send(&mut batch, seq, true);
                    }
                }
                Op::AddChain(def) => {
                    let chain = build_chain(&nft_table, def).map_err(|e| fail(e.to_string()))?;
                    let seq = self.next_seq();
                    batch.buf.nlmsg(&chain, seq, nftnl::MsgType::Add);
                    send(&mut batch, seq, false);
                }
                Op::FlushChain(name) | Op::DeleteChain(name) => {
                    let name_c =
                        CString::new(name.as_str()).map_err(|_| fail("NUL in name".into()))?;
                    let chain = nftnl::Chain::new(&name_c, &nft_table);
                    let seq = self.next_seq();
                    if matches!(op, Op::FlushChain(_)) {
                        // DELRULE naming only the chain: every rule of it (nft's `flush chain`).
                        let all_rules = nftnl::Rule::new(&chain);
                        batch.buf.nlmsg(&all_rules, seq, nftnl::MsgType::Del);
                    } else {
                        batch.buf.nlmsg(&chain, seq, nftnl::MsgType::Del);
                    }
                    send(&mut batch, seq, false);
                }
                Op::AddRule { chain, rule } => {
                    let exprs = expr::lower(rule).map_err(|e| fail(e.to_string()))?;
                    let ud = expr::rule_udata(rule.comment.as_deref())
                        .map_err(|e| fail(e.to_string()))?;
                    let seq = self.next_seq();
                    batch
                        .buf
                        .rule_add(seq, table, chain, &exprs, ud.as_deref())
                        .map_err(io_fail)?;
                    send(&mut batch, seq, false);
                }
            }
        }
        batch.end = self.next_seq();
        batch.buf.batch_end(batch.end);
        Ok(batch)
    }

    /// Reads the ack of every message of `batch`; returns how many were read.
    fn read_acks(&mut self, batch: &Batch) -> Result<usize, NftError> {
        let fd = self.socket.as_raw_fd();
        let mut pending: BTreeSet<u32> = batch.sent.keys().copied().collect();
        let mut errors: BTreeMap<u32, i32> = BTreeMap::new();
        let mut batch_error: Option<i32> = None;
        let mut acks = 0;
        let mut stale = 0;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut draining = false;
        // Every early return below leaves replies unread: the socket is replaced before reuse.
        self.dirty = true;
        loop {
            if pending.is_empty() || batch_error.is_some() {
                // Everything accounted for: drain whatever else is queued, without waiting.
                draining = true;
            }
            let got = match sys::recv_nonblocking(fd, &mut self.recv) {
                Ok(got) => got,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(NftError::OutcomeUnknown {
                        reason: format!(
                            "ENOBUFS: acks lost, {} of {} unread; the transaction may or may not have been committed",
                            pending.len(),
                            batch.sent.len()
                        ),
                    });
                }
                Err(source) => {
                    return Err(NftError::Socket {
                        step: "receive acks",
                        source,
                    });
                }
            };
            let Some(n) = got else {
                if draining {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let ready = sys::poll_readable(fd, left.as_millis().min(i32::MAX as u128) as i32)
                    .map_err(socket_err("wait for acks"))?;
                if !ready {
                    return Err(NftError::OutcomeUnknown {
                        reason: format!(
                            "{} of {} acks missing after {REPLY_TIMEOUT:?}",
                            pending.len(),
                            batch.sent.len()
                        ),
                    });
                }
                continue;
            };
            let datagram = self.recv.bytes(n);
            let msgs = netlink::messages(datagram).map_err(|e| NftError::Socket {
                step: "parse acks",
                source: std::io::Error::other(e),
            })?;
            for m in msgs {
                let Some(errno) = m.errno() else {
                    continue;
                };
                let seq = m.header.seq;
                if (seq == batch.begin || seq == batch.end) && errno != 0 {
                    // The batch as a whole was refused (e.g. ENOMEM while queueing errors).
                    batch_error = Some(errno);
                } else if pending.remove(&seq) {
                    acks += 1;
                    if errno != 0 {
                        errors.insert(seq, errno);
                    }
                } else {
                    stale += 1;
                }
            }
        }
        // Every message accounted for and the socket drained.
        self.dirty = false;
        if stale > 0 {
            tracing::warn!(
                stale,
                "ignored acks that belong to no message of this batch"
            );
        }
        if let Some((seq, errno)) = errors.iter().next() {
            let sent = &batch.sent[seq];
            return Err(NftError::Rejected {
                index: sent.index,
                object: sent.object.clone(),
                source: std::io::Error::from_raw_os_error(*errno),
                errors: errors.len(),
            });
        }
        if let Some(errno) = batch_error {
            return Err(NftError::BatchRejected {
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        Ok(acks)
    }
}

/// Splits raw elements into groups that fit one message.
fn chunks(elems: &[RawElem]) -> Vec<&[RawElem]> {
    let size = |e: &RawElem| {
        let key = |k: &Vec<u8>| 8 + netlink::align(k.len()) + 4;
        let mut n = 4 + key(&e.key) + 8;
        if let Some(k) = &e.key_end {
            n += key(k);
        }
        if let Some((_, chain)) = &e.verdict {
            n += 24
                + chain
                    .as_ref()
                    .map_or(0, |c| 4 + netlink::align(c.len() + 1));
        }
        if let Some(u) = &e.udata {
            n += 4 + netlink::align(u.len());
        }
        n
    };
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, e) in elems.iter().enumerate() {
        let s = size(e);
        if bytes + s > ELEMENT_BYTES_PER_MESSAGE && i > start {
            out.push(&elems[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += s;
    }
    if start < elems.len() {
        out.push(&elems[start..]);
    }
    out
}

fn build_chain<'a>(
    table: &'a nftnl::Table,
    def: &ChainDef,
) -> Result<nftnl::Chain<'a>, &'static str> {
    let name = CString::new(def.name.as_str()).map_err(|_| "NUL in chain name")?;
    let mut chain = nftnl::Chain::new(&name, table);
    if let Some(b) = &def.base {
        let hook = match b.hook {
            Hook::Forward => nftnl::Hook::Forward,
            Hook::Postrouting => nftnl::Hook::PostRouting,
            Hook::Input => nftnl::Hook::In,
        };
        chain.set_hook(hook, b.priority);
        chain.set_type(match b.kind {
            ChainType::Filter => nftnl::ChainType::Filter,
            ChainType::Nat => nftnl::ChainType::Nat,
        });
        chain.set_policy(match b.policy {
            ChainPolicy::Accept => nftnl::Policy::Accept,
            ChainPolicy::Drop => nftnl::Policy::Drop,
        });
    }
    Ok(chain)
}

/// How an op is named in errors.
fn describe(op: &Op) -> String {
    match op {
        Op::DeleteTable => "delete table".into(),
        Op::AddTable { .. } => "add table".into(),
        Op::AddSet(def) => format!("add set {}", def.name),
        Op::DeleteSet(name) => format!("delete set {name}"),
        Op::AddElements { set, elements } => {
            format!("add {} elements to set {set}", elements.len())
        }
        Op::DeleteElements { set, keys } => {
            format!("delete {} elements from set {set}", keys.len())
        }
        Op::AddChain(def) => format!("add chain {}", def.name),
        Op::FlushChain(name) => format!("flush chain {name}"),
        Op::DeleteChain(name) => format!("delete chain {name}"),
        Op::AddRule { chain, rule } => format!("add rule to chain {chain}: {rule}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_read_from_uname() {
        let k = KernelVersion::parse("6.18.44-fc-v595").unwrap();
        assert_eq!(k.version, (6, 18));
        assert!(k.has_destroy());
        let old = KernelVersion::parse("5.15.0-91-generic").unwrap();
        assert_eq!(old.version, (5, 15));
        assert!(!old.has_destroy());
        assert!(KernelVersion::parse("6.2").unwrap().version < DESTROY_KERNEL);
        assert!(KernelVersion::parse("garbage").is_none());
    }

    #[test]
    fn element_messages_stay_under_the_attribute_limit() {
        let elems: Vec<RawElem> = (0..20_000u32)
            .map(|i| RawElem {
                key: i.to_be_bytes().to_vec(),
                key_end: None,
                flags: 0,
                verdict: Some((-3, Some("x".repeat(200)))),
                udata: None,
                extra: Vec::new(),
            })
            .collect();
        let parts = chunks(&elems);
        assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), 20_000);
        assert!(parts.len() > 100);
        // Encode the largest chunk for real and check the element list's 16-bit length.
        let mut buf = MsgBuf::new();
        let biggest = parts.iter().max_by_key(|p| p.len()).unwrap();
        buf.elements(1, msg::NEWSETELEM, "weft", "m", biggest)
            .unwrap();
        assert!(buf.len() < 60 * 1024, "{} bytes", buf.len());
    }
}
