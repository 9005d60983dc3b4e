//! Reading a table back: one request at a time over the backend's socket, and the dump
//! walker behind [`NftBackend::dump_raw`].
//!
//! A dump is `GETTABLE` (a plain request: ENOENT means no table), then `GETCHAIN`, `GETSET`,
//! `GETSETELEM` per set and `GETRULE` (each `NLM_F_DUMP`, read until `NLMSG_DONE`), between two
//! `GETGEN`s. `GETGEN` is a plain request with an ack: sent as a dump it gets one `NEWGEN` and
//! no `NLMSG_DONE`, and a reader waiting for `DONE` hangs. A reply flagged `NLM_F_DUMP_INTR`, or
//! a generation that moved, means the ruleset changed while we read: the whole dump is retried.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::time::Instant;

use weft_netpol::ruleset::Ruleset;

use crate::backend::{DUMP_ATTEMPTS, NftBackend, REPLY_TIMEOUT, socket_err};
use crate::dump::{KernelTable, RawRule, RawTable, interpret};
use crate::error::NftError;
use crate::netlink::{self, Message, msg};
use crate::set::RawElem;
use crate::sys::{self, Get, MsgBuf};

impl NftBackend {
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
