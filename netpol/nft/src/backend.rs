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
//! `dump_raw` reads one table with `GETTABLE`, `GETCHAIN`, `GETSET`, `GETSETELEM` per set and
//! `GETRULE`, between two `GETGEN`s; a dump flagged `NLM_F_DUMP_INTR` or a generation that
//! moved is retried (a bounded number of times).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use weft_netpol::diff::Op;
use weft_netpol::ruleset::{ChainDef, ChainPolicy, ChainType, Hook, Ruleset};

use crate::dump::{KernelTable, RawRule, RawTable, interpret};
use crate::error::NftError;
use crate::expr;
use crate::netlink::{self, Message, msg, udata};
use crate::set::{self, RawElem};
use crate::sys::{self, Get, MsgBuf, RecvBuf};

/// Oldest kernel weft supports.
pub const MIN_KERNEL: (u32, u32) = (5, 15);
/// First kernel with `NFT_MSG_DESTROYSETELEM`.
pub const DESTROY_KERNEL: (u32, u32) = (6, 3);

/// Element bytes per `NEWSETELEM` message: well under the 64 KiB limit of one netlink attribute
/// (the element list is one nested attribute whose length is 16 bits).
const ELEMENT_BYTES_PER_MESSAGE: usize = 32 * 1024;
/// How long to wait for acks or dump replies before declaring the outcome unknown. nfnetlink
/// answers inside `sendto`, so this is only reached when something is badly wrong.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Dump attempts before giving up on a ruleset that keeps changing.
const DUMP_ATTEMPTS: usize = 5;
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
    /// Time from encoding to the last ack.
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
    socket: mnl::Socket,
    portid: u32,
    seq: u32,
    kernel: KernelVersion,
    options: NftOptions,
    /// Buffer sizes already forced on the socket.
    sndbuf: usize,
    rcvbuf: usize,
    /// Set when replies may be left unread: the socket is replaced before its next use.
    dirty: bool,
    recv: RecvBuf,
}

fn socket_err(step: &'static str) -> impl FnOnce(std::io::Error) -> NftError {
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

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Replaces a socket that may hold unread replies: never read stale acks as new ones.
    fn ensure_clean(&mut self) -> Result<(), NftError> {
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
        loop {
            if pending.is_empty() || batch_error.is_some() {
                // Everything accounted for: drain whatever else is queued, without waiting.
                draining = true;
            }
            let got = match sys::recv_nonblocking(fd, &mut self.recv) {
                Ok(got) => got,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.dirty = true;
                    return Err(NftError::OutcomeUnknown {
                        reason: format!(
                            "ENOBUFS: {} of {} acks lost; the transaction may or may not have been committed",
                            pending.len(),
                            batch.sent.len()
                        ),
                    });
                }
                Err(source) => {
                    self.dirty = true;
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
                    self.dirty = true;
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
            let msgs = netlink::messages(datagram).map_err(|e| {
                self.dirty = true;
                NftError::Socket {
                    step: "parse acks",
                    source: std::io::Error::other(e),
                }
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

    /// Sends one request and hands every reply message to `on_msg` until the dump ends
    /// (`NLMSG_DONE`) or, for a plain request, its ack arrives. Returns whether a reply was
    /// flagged `NLM_F_DUMP_INTR`. An error ack ends the request with `Err(errno)` inside `Ok`.
    fn request(
        &mut self,
        what: Get<'_>,
        mut on_msg: impl FnMut(&Message<'_>) -> Result<(), NftError>,
    ) -> Result<Result<bool, i32>, NftError> {
        let seq = self.next_seq();
        let mut buf = MsgBuf::new();
        buf.get(seq, what);
        let fd = self.socket.as_raw_fd();
        self.dirty = true; // until the last reply is read
        self.socket
            .send(buf.as_bytes())
            .map_err(socket_err("send a request"))?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut interrupted = false;
        loop {
            let Some(n) =
                sys::recv_nonblocking(fd, &mut self.recv).map_err(socket_err("receive"))?
            else {
                let left = deadline.saturating_duration_since(Instant::now());
                let ready = sys::poll_readable(fd, left.as_millis().min(i32::MAX as u128) as i32)
                    .map_err(socket_err("wait for a reply"))?;
                if !ready {
                    return Err(NftError::Socket {
                        step: "wait for a reply",
                        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                    });
                }
                continue;
            };
            let datagram = self.recv.bytes(n).to_vec();
            let msgs = netlink::messages(&datagram).map_err(|e| NftError::Socket {
                step: "parse a reply",
                source: std::io::Error::other(e),
            })?;
            for m in &msgs {
                if m.header.seq != seq {
                    continue;
                }
                if m.header.flags & netlink::NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match m.header.kind {
                    netlink::NLMSG_DONE => {
                        self.dirty = false;
                        return Ok(Ok(interrupted));
                    }
                    netlink::NLMSG_ERROR => {
                        self.dirty = false;
                        return Ok(match m.errno() {
                            Some(0) => Ok(interrupted),
                            Some(errno) => Err(errno),
                            None => Err(libc::EPROTO),
                        });
                    }
                    _ => on_msg(m)?,
                }
            }
        }
    }

    /// The ruleset generation (`GETGEN`; a plain request answered by `NEWGEN` and an ack).
    pub fn generation(&mut self) -> Result<u32, NftError> {
        self.ensure_clean()?;
        let mut gen_id = None;
        let res = self.request(Get::Gen, |m| {
            if m.header.nft_msg() == Some(msg::NEWGEN) {
                gen_id = m.gen_id();
            }
            Ok(())
        })?;
        let dump_err = |reason: String| NftError::Dump {
            table: String::new(),
            reason,
        };
        res.map_err(|errno| dump_err(format!("GETGEN: errno {errno}")))?;
        gen_id.ok_or_else(|| dump_err("GETGEN: no generation in the reply".into()))
    }

    /// Reads table `table` (family `inet`) as the kernel holds it, as netlink objects; `None`
    /// if there is no such table. Retries while the ruleset changes underneath.
    pub fn dump_raw(&mut self, table: &str) -> Result<Option<RawTable>, NftError> {
        for attempt in 1..=DUMP_ATTEMPTS {
            self.ensure_clean()?;
            let before = self.generation()?;
            let Some(dumped) = self.dump_once(table)? else {
                tracing::debug!(table, attempt, "dump interrupted, retrying");
                continue;
            };
            let after = self.generation()?;
            if before == after {
                return Ok(dumped);
            }
            tracing::debug!(
                table,
                before,
                after,
                attempt,
                "generation moved during dump, retrying"
            );
        }
        Err(NftError::Dump {
            table: table.to_string(),
            reason: format!("the ruleset changed during each of {DUMP_ATTEMPTS} attempts"),
        })
    }

    /// One pass; `Ok(None)` if a reply was flagged `NLM_F_DUMP_INTR`.
    #[allow(clippy::type_complexity)] // Option<Option<_>>: interrupted vs. no table.
    fn dump_once(&mut self, table: &str) -> Result<Option<Option<RawTable>>, NftError> {
        let fail = |reason: String| NftError::Dump {
            table: table.to_string(),
            reason,
        };
        let table_c = CString::new(table).map_err(|_| fail("name contains NUL".into()))?;
        let mut parsed_table = None;
        let res = self.request(Get::Table(&table_c), |m| {
            if m.header.nft_msg() == Some(msg::NEWTABLE) {
                parsed_table = sys::parse_table(m.bytes);
            }
            Ok(())
        })?;
        match res {
            Err(libc::ENOENT) => return Ok(Some(None)),
            Err(errno) => return Err(fail(format!("GETTABLE: errno {errno}"))),
            Ok(true) => return Ok(None),
            Ok(false) => {}
        }
        let t = parsed_table.ok_or_else(|| fail("GETTABLE: unparseable reply".into()))?;
        let mut raw = RawTable {
            name: t.name,
            flags: t.flags,
            udata: t.udata,
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
            elements: BTreeMap::new(),
            rules: BTreeMap::new(),
        };

        let mut chains = Vec::new();
        let mut bad = None;
        let res = self.request(Get::Chains(&table_c), |m| {
            match sys::parse_chain(m.bytes) {
                Some(c) if c.table == table => chains.push(c),
                Some(_) => {}
                None => bad = Some("unparseable chain"),
            }
            Ok(())
        })?;
        if dump_step(res, bad, &fail)? {
            return Ok(None);
        }
        for c in chains {
            raw.rules.entry(c.name.clone()).or_default();
            raw.chains.insert(c.name.clone(), c);
        }

        let mut sets = Vec::new();
        let res = self.request(Get::Sets(&table_c), |m| {
            match sys::parse_set(m.bytes) {
                Some((t, s)) if t == table => sets.push(s),
                Some(_) => {}
                None => bad = Some("unparseable set"),
            }
            Ok(())
        })?;
        if dump_step(res, bad, &fail)? {
            return Ok(None);
        }
        for s in sets {
            let name_c =
                CString::new(s.name.as_str()).map_err(|_| fail("NUL in a set name".into()))?;
            let mut elems: Vec<RawElem> = Vec::new();
            let res = self.request(Get::Elements(&table_c, &name_c), |m| {
                match sys::parse_elements(m.bytes) {
                    Some((_, _, e)) => elems.extend(e),
                    None => bad = Some("unparseable set elements"),
                }
                Ok(())
            })?;
            if dump_step(res, bad, &fail)? {
                return Ok(None);
            }
            elems.sort();
            raw.elements.insert(s.name.clone(), elems);
            raw.sets.insert(s.name.clone(), s);
        }

        let mut rules: Vec<(String, RawRule)> = Vec::new();
        let res = self.request(Get::Rules(&table_c), |m| {
            match sys::parse_rule(m.bytes) {
                Some(r) if r.table == table => rules.push((
                    r.chain,
                    RawRule {
                        handle: r.handle,
                        exprs: Some(r.exprs),
                        udata: r.udata,
                    },
                )),
                Some(_) => {}
                // libnftnl could not parse it (an expression it does not know): keep the rule
                // as unrecognised, found by its attributes.
                None => {
                    if let Some((t, chain, handle)) = rule_identity(m)
                        && t == table
                    {
                        rules.push((
                            chain,
                            RawRule {
                                handle,
                                exprs: None,
                                udata: None,
                            },
                        ));
                    }
                }
            }
            Ok(())
        })?;
        if dump_step(res, bad, &fail)? {
            return Ok(None);
        }
        for (chain, rule) in rules {
            raw.rules.entry(chain).or_default().push(rule);
        }
        Ok(Some(Some(raw)))
    }

    /// Reads table `table` and interprets it as weft's [`Ruleset`], with what could not be
    /// interpreted listed (see [`crate::dump`]).
    pub fn dump_table(&mut self, table: &str) -> Result<Option<KernelTable>, NftError> {
        let Some(raw) = self.dump_raw(table)? else {
            return Ok(None);
        };
        let kt = interpret(&raw);
        for f in &kt.foreign {
            tracing::warn!(table, object = %f, "not weft's: will be replaced");
        }
        Ok(Some(kt))
    }

    /// Reads table `table` back as the [`Ruleset`] the compiler would produce for that state.
    /// Objects weft did not write appear in a form no desired ruleset has, so
    /// `weft_netpol::diff` replaces them (see [`crate::dump`]).
    pub fn dump(&mut self, table: &str) -> Result<Option<Ruleset>, NftError> {
        Ok(self.dump_table(table)?.map(|kt| kt.ruleset))
    }
}

/// Result of one dump request: `Ok(true)` if interrupted.
fn dump_step(
    res: Result<bool, i32>,
    bad: Option<&'static str>,
    fail: &impl Fn(String) -> NftError,
) -> Result<bool, NftError> {
    if let Some(reason) = bad {
        return Err(fail(reason.to_string()));
    }
    res.map_err(|errno| fail(format!("errno {errno}")))
}

/// Table, chain and handle of a `NEWRULE` message, read straight from its attributes.
fn rule_identity(m: &Message<'_>) -> Option<(String, String, u64)> {
    let (mut table, mut chain, mut handle) = (None, None, None);
    let text = |d: &[u8]| String::from_utf8(d.split(|b| *b == 0).next()?.to_vec()).ok();
    for a in m.nft_attrs() {
        match a.kind {
            1 => table = text(a.data),
            2 => chain = text(a.data),
            3 => handle = Some(u64::from_be_bytes(a.data.get(..8)?.try_into().ok()?)),
            _ => {}
        }
    }
    Some((table?, chain?, handle?))
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
