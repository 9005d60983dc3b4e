//! The one module below the safe `nftnl`/`mnl` API: libnftnl objects ↔ plain Rust data, and
//! the few socket calls `mnl::Socket` does not offer.
//!
//! Why it exists (what nftnl 0.9.4's safe API lacks, each needed by weft):
//! - **sets**: only plain `ipv4_addr`/`ipv6_addr` sets; no flags (interval, map, concat), no
//!   data type (verdict maps), no concatenated key types, no `DESC_CONCAT`, no userdata;
//! - **elements**: key only; no `INTERVAL_END` flag, no `KEY_END`, no verdict or jump data, no
//!   element userdata (nft's open-interval marker); adds always carry `NLM_F_EXCL`, so
//!   re-adding an existing element aborts the whole transaction with EEXIST;
//! - **element deletes**: no `DESTROYSETELEM` (kernel 6.3+);
//! - **rules**: every safe expression hard-codes register 1 (no concatenation lookups), there
//!   is no `fib`, no `meta l4proto`, no lookup flags (`!=`) or `dreg` (vmap), and
//!   `Rule::set_comment` refuses comments over 125 bytes (nft accepts 128);
//! - **tables**: no userdata (the schema comment);
//! - **batches**: `Batch` splits into 128 KiB pages that `mnl::Socket::send_all` sends as
//!   separate datagrams (half-applied transactions), and guesses from `uname` whether the
//!   kernel acks batch boundaries; we build one contiguous buffer ourselves instead;
//! - **listing**: only table names; no parsing of chains, sets, elements, rules.
//!
//! The safe API is still used where it is enough: chains (add and delete), table delete and
//! chain flush, through [`nftnl::NlMsg`]. Everything here is wrapped so that the rest of the
//! crate only sees owned Rust values: every pointer is allocated, used and freed inside one
//! function, every `*_get_*` result is copied out before its object is freed, and every parse
//! function receives a message whose length was checked by [`crate::netlink::messages`].
//!
//! Long (over 800 lines) on purpose: it is all of the crate's unsafe code, kept in one file so
//! it can be audited in one sitting; each function is one libnftnl object in or out.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_void};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;

use crate::dump::RawChain;
use crate::expr::RawExpr;
use crate::netlink::{self, msg};
use crate::set::{RawElem, RawSet};

const NFPROTO_INET: u16 = libc::NFPROTO_INET as u16;

/// Room every message writer gets (libnftnl's largest message: a set element list).
fn max_msg() -> usize {
    nftnl::nft_nlmsg_maxsize() as usize
}

/// A growing buffer of netlink messages, 8-byte aligned, sent with one `sendto`.
pub struct MsgBuf {
    words: Vec<u64>,
    len: usize,
}

impl Default for MsgBuf {
    fn default() -> Self {
        MsgBuf::new()
    }
}

/// What a `GET` request asks for.
pub enum Get<'a> {
    /// `GETGEN`: the ruleset generation (a plain request with an ack, never a dump).
    Gen,
    /// `GETTABLE` of one table (plain request with an ack: ENOENT if absent).
    Table(&'a CStr),
    /// `GETCHAIN` dump (the kernel does not filter chains by table; we do).
    Chains(&'a CStr),
    /// `GETSET` dump of one table.
    Sets(&'a CStr),
    /// `GETSETELEM` dump of one set.
    Elements(&'a CStr, &'a CStr),
    /// `GETRULE` dump of one table.
    Rules(&'a CStr),
}

/// Owned libnftnl objects, freed on drop.
macro_rules! owned {
    ($name:ident, $ty:ident, $alloc:ident, $free:ident) => {
        struct $name(NonNull<sys::$ty>);
        impl $name {
            fn new() -> $name {
                // SAFETY: plain allocation; null (OOM) aborts like nftnl's own `try_alloc!`.
                match NonNull::new(unsafe { sys::$alloc() }) {
                    Some(p) => $name(p),
                    None => std::process::abort(),
                }
            }
            fn ptr(&self) -> *mut sys::$ty {
                self.0.as_ptr()
            }
        }
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: allocated by the matching alloc, freed once.
                unsafe { sys::$free(self.0.as_ptr()) }
            }
        }
    };
}

owned!(TableObj, nftnl_table, nftnl_table_alloc, nftnl_table_free);
owned!(ChainObj, nftnl_chain, nftnl_chain_alloc, nftnl_chain_free);
owned!(SetObj, nftnl_set, nftnl_set_alloc, nftnl_set_free);
owned!(RuleObj, nftnl_rule, nftnl_rule_alloc, nftnl_rule_free);

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))
}

impl MsgBuf {
    /// An empty buffer.
    pub fn new() -> MsgBuf {
        MsgBuf {
            words: Vec::new(),
            len: 0,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The messages, ready to send.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no alignment needs.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    /// Room for one more message at the end; returns where it starts. (libmnl writes every
    /// header, attribute and padding byte it uses, so the room need not be zeroed.)
    fn reserve(&mut self) -> *mut c_char {
        let need_words = (self.len + max_msg()).div_ceil(8);
        if self.words.len() < need_words {
            self.words.resize(need_words, 0);
        }
        // SAFETY: `len` is within the (just grown) allocation.
        unsafe { self.words.as_mut_ptr().cast::<u8>().add(self.len).cast() }
    }

    /// Takes the message just written at the end into the buffer.
    fn commit(&mut self) {
        let written = netlink::Header::parse(&self.as_bytes_upto(self.len + 16)[self.len..])
            .map_or(0, |h| h.len as usize);
        assert!(
            (16..=max_msg()).contains(&written),
            "libnftnl wrote a message of {written} bytes"
        );
        self.len += netlink::align(written);
    }

    fn as_bytes_upto(&self, n: usize) -> &[u8] {
        // SAFETY: callers only ask within the reserved (initialised) words.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), n) }
    }

    /// `NFNL_MSG_BATCH_BEGIN` (without `NLM_F_ACK`: kernels before 6.10 never ack it, so we
    /// never ask, and expect acks for the messages in between only).
    pub fn batch_begin(&mut self, seq: u32) {
        let p = self.reserve();
        // SAFETY: `p` has room for a full message.
        unsafe { sys::nftnl_batch_begin(p, seq) };
        self.commit();
    }

    /// `NFNL_MSG_BATCH_END` (without `NLM_F_ACK`, see [`MsgBuf::batch_begin`]).
    pub fn batch_end(&mut self, seq: u32) {
        let p = self.reserve();
        // SAFETY: as above.
        unsafe { sys::nftnl_batch_end(p, seq) };
        self.commit();
    }

    /// A message of the safe nftnl API (chains, table delete, chain flush).
    pub fn nlmsg<T: nftnl::NlMsg>(&mut self, obj: &T, seq: u32, kind: nftnl::MsgType) {
        let p = self.reserve();
        // SAFETY: `p` has room for `nft_nlmsg_maxsize()` bytes, as `NlMsg::write` requires.
        unsafe { obj.write(p.cast::<c_void>(), seq, kind) };
        self.commit();
    }

    fn header(&mut self, kind: u16, family: u16, flags: u16, seq: u32) -> *mut libc::nlmsghdr {
        let p = self.reserve();
        // SAFETY: `p` has room for a full message; libnftnl adds the subsystem byte.
        unsafe { sys::nftnl_nlmsg_build_hdr(p, kind, family, flags, seq) }
    }

    /// `NEWTABLE` with the table comment as nft writes it (`NFTNL_UDATA_TABLE_COMMENT`).
    pub fn table_add(&mut self, seq: u32, name: &str, udata: &[u8]) -> io::Result<()> {
        let name = cstring(name)?;
        let t = TableObj::new();
        // SAFETY: `t` is a live table; strings and data are copied by libnftnl.
        unsafe {
            sys::nftnl_table_set_u32(
                t.ptr(),
                sys::NFTNL_TABLE_FAMILY as u16,
                u32::from(NFPROTO_INET),
            );
            sys::nftnl_table_set_str(t.ptr(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
            sys::nftnl_table_set_u32(t.ptr(), sys::NFTNL_TABLE_FLAGS as u16, 0);
            sys::nftnl_table_set_data(
                t.ptr(),
                sys::NFTNL_TABLE_USERDATA as u16,
                udata.as_ptr().cast(),
                udata.len() as u32,
            );
        }
        let flags = netlink::NLM_F_CREATE | netlink::NLM_F_ACK;
        let nlh = self.header(msg::NEWTABLE, NFPROTO_INET, flags, seq);
        // SAFETY: `nlh` heads a reserved message; `t` is live.
        unsafe { sys::nftnl_table_nlmsg_build_payload(nlh, t.ptr()) };
        self.commit();
        Ok(())
    }

    /// `NEWSET`, exactly the attributes nft sends (no `NLM_F_EXCL`: an identical set is a no-op).
    pub fn set_add(&mut self, seq: u32, table: &str, set: &RawSet, id: u32) -> io::Result<()> {
        let (table, name) = (cstring(table)?, cstring(&set.name)?);
        let s = SetObj::new();
        let concat: Vec<u8> = set.concat.iter().map(|l| *l as u8).collect();
        // SAFETY: `s` is live; libnftnl copies strings and data.
        unsafe {
            let p = s.ptr();
            sys::nftnl_set_set_str(p, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(p, sys::NFTNL_SET_NAME as u16, name.as_ptr());
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FAMILY as u16, u32::from(NFPROTO_INET));
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FLAGS as u16, set.flags);
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_TYPE as u16, set.key_type);
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_LEN as u16, set.key_len);
            if let (Some(t), Some(l)) = (set.data_type, set.data_len) {
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_DATA_TYPE as u16, t);
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_DATA_LEN as u16, l);
            }
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_ID as u16, id);
            if !concat.is_empty() {
                sys::nftnl_set_set_data(
                    p,
                    sys::NFTNL_SET_DESC_CONCAT as u16,
                    concat.as_ptr().cast(),
                    concat.len() as u32,
                );
            }
            sys::nftnl_set_set_data(
                p,
                sys::NFTNL_SET_USERDATA as u16,
                set.udata.as_ptr().cast(),
                set.udata.len() as u32,
            );
        }
        let flags = netlink::NLM_F_CREATE | netlink::NLM_F_ACK;
        let nlh = self.header(msg::NEWSET, NFPROTO_INET, flags, seq);
        // SAFETY: as above.
        unsafe { sys::nftnl_set_nlmsg_build_payload(nlh, s.ptr()) };
        self.commit();
        Ok(())
    }

    /// `DELSET`.
    pub fn set_delete(&mut self, seq: u32, table: &str, name: &str) -> io::Result<()> {
        let (table, name) = (cstring(table)?, cstring(name)?);
        let s = SetObj::new();
        // SAFETY: as above.
        unsafe {
            sys::nftnl_set_set_str(s.ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(s.ptr(), sys::NFTNL_SET_NAME as u16, name.as_ptr());
        }
        let nlh = self.header(msg::DELSET, NFPROTO_INET, netlink::NLM_F_ACK, seq);
        // SAFETY: as above.
        unsafe { sys::nftnl_set_nlmsg_build_payload(nlh, s.ptr()) };
        self.commit();
        Ok(())
    }

    /// One `NEWSETELEM` (`NLM_F_CREATE` without `NLM_F_EXCL`: re-adding an identical element
    /// is a no-op), `DELSETELEM` or `DESTROYSETELEM` message with these elements. The caller
    /// keeps each message under the 64 KiB attribute limit.
    pub fn elements(
        &mut self,
        seq: u32,
        kind: u16,
        table: &str,
        set: &str,
        elems: &[RawElem],
    ) -> io::Result<()> {
        let (table, name) = (cstring(table)?, cstring(set)?);
        let chains: Vec<Option<CString>> = elems
            .iter()
            .map(|e| {
                e.verdict
                    .as_ref()
                    .and_then(|v| v.1.as_deref())
                    .map(cstring)
                    .transpose()
            })
            .collect::<io::Result<_>>()?;
        let s = SetObj::new();
        // SAFETY: `s` is live; each element is handed over to `s` by `nftnl_set_elem_add`,
        // which frees it with the set; all data is copied.
        unsafe {
            sys::nftnl_set_set_str(s.ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(s.ptr(), sys::NFTNL_SET_NAME as u16, name.as_ptr());
            sys::nftnl_set_set_u32(
                s.ptr(),
                sys::NFTNL_SET_FAMILY as u16,
                u32::from(NFPROTO_INET),
            );
            for (e, chain) in elems.iter().zip(&chains) {
                let el = match NonNull::new(sys::nftnl_set_elem_alloc()) {
                    Some(p) => p.as_ptr(),
                    None => std::process::abort(),
                };
                let set_data = |attr: u32, data: &[u8]| {
                    sys::nftnl_set_elem_set(
                        el,
                        attr as u16,
                        data.as_ptr().cast(),
                        data.len() as u32,
                    );
                };
                set_data(sys::NFTNL_SET_ELEM_KEY, &e.key);
                if let Some(end) = &e.key_end {
                    set_data(sys::NFTNL_SET_ELEM_KEY_END, end);
                }
                if e.flags != 0 {
                    sys::nftnl_set_elem_set_u32(el, sys::NFTNL_SET_ELEM_FLAGS as u16, e.flags);
                }
                if let Some((code, _)) = &e.verdict {
                    sys::nftnl_set_elem_set_u32(
                        el,
                        sys::NFTNL_SET_ELEM_VERDICT as u16,
                        *code as u32,
                    );
                }
                if let Some(c) = chain {
                    sys::nftnl_set_elem_set_str(el, sys::NFTNL_SET_ELEM_CHAIN as u16, c.as_ptr());
                }
                if let Some(u) = &e.udata {
                    set_data(sys::NFTNL_SET_ELEM_USERDATA, u);
                }
                sys::nftnl_set_elem_add(s.ptr(), el);
            }
        }
        let flags = if kind == msg::NEWSETELEM {
            netlink::NLM_F_CREATE | netlink::NLM_F_ACK
        } else {
            netlink::NLM_F_ACK
        };
        let nlh = self.header(kind, NFPROTO_INET, flags, seq);
        // SAFETY: as above.
        unsafe { sys::nftnl_set_elems_nlmsg_build_payload(nlh, s.ptr()) };
        self.commit();
        Ok(())
    }

    /// `NEWRULE` appended to `chain`, with these expressions and userdata (the comment), with
    /// the flags nft uses (`NLM_F_CREATE | NLM_F_APPEND`).
    pub fn rule_add(
        &mut self,
        seq: u32,
        table: &str,
        chain: &str,
        exprs: &[RawExpr],
        udata: Option<&[u8]>,
    ) -> io::Result<()> {
        let (table, chain) = (cstring(table)?, cstring(chain)?);
        let r = RuleObj::new();
        // SAFETY: `r` is live; `nftnl_rule_add_expr` takes ownership of each expression.
        unsafe {
            sys::nftnl_rule_set_u32(
                r.ptr(),
                sys::NFTNL_RULE_FAMILY as u16,
                u32::from(NFPROTO_INET),
            );
            sys::nftnl_rule_set_str(r.ptr(), sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
            sys::nftnl_rule_set_str(r.ptr(), sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
            for e in exprs {
                sys::nftnl_rule_add_expr(r.ptr(), build_expr(e)?.as_ptr());
            }
            if let Some(u) = udata {
                sys::nftnl_rule_set_data(
                    r.ptr(),
                    sys::NFTNL_RULE_USERDATA as u16,
                    u.as_ptr().cast(),
                    u.len() as u32,
                );
            }
        }
        let flags = netlink::NLM_F_CREATE | netlink::NLM_F_APPEND | netlink::NLM_F_ACK;
        let nlh = self.header(msg::NEWRULE, NFPROTO_INET, flags, seq);
        // SAFETY: as above.
        unsafe { sys::nftnl_rule_nlmsg_build_payload(nlh, r.ptr()) };
        self.commit();
        Ok(())
    }

    /// A `GET` request.
    pub fn get(&mut self, seq: u32, what: Get<'_>) {
        let plain = netlink::NLM_F_ACK;
        let dump = netlink::NLM_F_DUMP;
        match what {
            Get::Gen => {
                self.header(msg::GETGEN, libc::AF_UNSPEC as u16, plain, seq);
            }
            Get::Table(name) => {
                let t = TableObj::new();
                let nlh = self.header(msg::GETTABLE, NFPROTO_INET, plain, seq);
                // SAFETY: `t` is live, `nlh` heads a reserved message.
                unsafe {
                    sys::nftnl_table_set_str(t.ptr(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
                    sys::nftnl_table_nlmsg_build_payload(nlh, t.ptr());
                }
            }
            Get::Chains(table) => {
                let c = ChainObj::new();
                let nlh = self.header(msg::GETCHAIN, NFPROTO_INET, dump, seq);
                // SAFETY: as above.
                unsafe {
                    sys::nftnl_chain_set_str(
                        c.ptr(),
                        sys::NFTNL_CHAIN_TABLE as u16,
                        table.as_ptr(),
                    );
                    sys::nftnl_chain_nlmsg_build_payload(nlh, c.ptr());
                }
            }
            Get::Sets(table) => {
                let s = SetObj::new();
                let nlh = self.header(msg::GETSET, NFPROTO_INET, dump, seq);
                // SAFETY: as above.
                unsafe {
                    sys::nftnl_set_set_str(s.ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
                    sys::nftnl_set_nlmsg_build_payload(nlh, s.ptr());
                }
            }
            Get::Elements(table, set) => {
                let s = SetObj::new();
                let nlh = self.header(msg::GETSETELEM, NFPROTO_INET, dump, seq);
                // SAFETY: as above.
                unsafe {
                    sys::nftnl_set_set_str(s.ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
                    sys::nftnl_set_set_str(s.ptr(), sys::NFTNL_SET_NAME as u16, set.as_ptr());
                    sys::nftnl_set_elems_nlmsg_build_payload(nlh, s.ptr());
                }
            }
            Get::Rules(table) => {
                let r = RuleObj::new();
                let nlh = self.header(msg::GETRULE, NFPROTO_INET, dump, seq);
                // SAFETY: as above.
                unsafe {
                    sys::nftnl_rule_set_str(r.ptr(), sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
                    sys::nftnl_rule_nlmsg_build_payload(nlh, r.ptr());
                }
            }
        }
        self.commit();
    }
}

/// Allocates the libnftnl expression for one [`RawExpr`]. The caller owns it.
///
/// # Safety
/// The returned pointer must be handed to `nftnl_rule_add_expr` or freed.
unsafe fn build_expr(e: &RawExpr) -> io::Result<NonNull<sys::nftnl_expr>> {
    let name: &CStr = match e {
        RawExpr::Meta { .. } => c"meta",
        RawExpr::Payload { .. } => c"payload",
        RawExpr::Cmp { .. } => c"cmp",
        RawExpr::Bitwise { .. } => c"bitwise",
        RawExpr::Ct { .. } | RawExpr::CtSet { .. } => c"ct",
        RawExpr::Limit { .. } => c"limit",
        RawExpr::Log { .. } => c"log",
        RawExpr::Fib { .. } => c"fib",
        RawExpr::Lookup { .. } => c"lookup",
        RawExpr::Counter => c"counter",
        RawExpr::Verdict { .. } => c"immediate",
        RawExpr::Masquerade => c"masq",
        RawExpr::Other { name, .. } => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot write foreign expression {name}"),
            ));
        }
    };
    // Names first, so that a name with NUL fails before anything is allocated.
    let name_arg = match e {
        RawExpr::Lookup { set, .. } => Some(cstring(set)?),
        RawExpr::Verdict { chain: Some(c), .. } => Some(cstring(c)?),
        RawExpr::Log { prefix, .. } => Some(cstring(prefix)?),
        _ => None,
    };
    // SAFETY: known expression names; attributes below are the ones each type defines.
    unsafe {
        let Some(x) = NonNull::new(sys::nftnl_expr_alloc(name.as_ptr())) else {
            std::process::abort();
        };
        let p = x.as_ptr();
        let u32_ = |attr: u32, v: u32| sys::nftnl_expr_set_u32(p, attr as u16, v);
        let data = |attr: u32, d: &[u8]| {
            sys::nftnl_expr_set(p, attr as u16, d.as_ptr().cast(), d.len() as u32);
        };
        match e {
            RawExpr::Meta { key, dreg } => {
                u32_(sys::NFTNL_EXPR_META_KEY, *key);
                u32_(sys::NFTNL_EXPR_META_DREG, *dreg);
            }
            RawExpr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                u32_(sys::NFTNL_EXPR_PAYLOAD_BASE, *base);
                u32_(sys::NFTNL_EXPR_PAYLOAD_OFFSET, *offset);
                u32_(sys::NFTNL_EXPR_PAYLOAD_LEN, *len);
                u32_(sys::NFTNL_EXPR_PAYLOAD_DREG, *dreg);
            }
            RawExpr::Cmp { sreg, op, data: d } => {
                u32_(sys::NFTNL_EXPR_CMP_SREG, *sreg);
                u32_(sys::NFTNL_EXPR_CMP_OP, *op);
                data(sys::NFTNL_EXPR_CMP_DATA, d);
            }
            RawExpr::Bitwise {
                sreg,
                dreg,
                len,
                mask,
                xor,
            } => {
                u32_(sys::NFTNL_EXPR_BITWISE_SREG, *sreg);
                u32_(sys::NFTNL_EXPR_BITWISE_DREG, *dreg);
                u32_(sys::NFTNL_EXPR_BITWISE_LEN, *len);
                data(sys::NFTNL_EXPR_BITWISE_MASK, mask);
                data(sys::NFTNL_EXPR_BITWISE_XOR, xor);
            }
            RawExpr::Ct { key, dreg } => {
                u32_(sys::NFTNL_EXPR_CT_KEY, *key);
                u32_(sys::NFTNL_EXPR_CT_DREG, *dreg);
            }
            RawExpr::CtSet { key, sreg } => {
                u32_(sys::NFTNL_EXPR_CT_KEY, *key);
                u32_(sys::NFTNL_EXPR_CT_SREG, *sreg);
            }
            RawExpr::Limit {
                rate,
                unit,
                burst,
                kind,
                flags,
            } => {
                sys::nftnl_expr_set_u64(p, sys::NFTNL_EXPR_LIMIT_RATE as u16, *rate);
                sys::nftnl_expr_set_u64(p, sys::NFTNL_EXPR_LIMIT_UNIT as u16, *unit);
                u32_(sys::NFTNL_EXPR_LIMIT_BURST, *burst);
                u32_(sys::NFTNL_EXPR_LIMIT_TYPE, *kind);
                u32_(sys::NFTNL_EXPR_LIMIT_FLAGS, *flags);
            }
            RawExpr::Log { group, .. } => {
                if let Some(prefix) = &name_arg {
                    sys::nftnl_expr_set_str(p, sys::NFTNL_EXPR_LOG_PREFIX as u16, prefix.as_ptr());
                }
                sys::nftnl_expr_set_u16(p, sys::NFTNL_EXPR_LOG_GROUP as u16, *group);
            }
            RawExpr::Fib {
                flags,
                result,
                dreg,
            } => {
                u32_(sys::NFTNL_EXPR_FIB_FLAGS, *flags);
                u32_(sys::NFTNL_EXPR_FIB_RESULT, *result);
                u32_(sys::NFTNL_EXPR_FIB_DREG, *dreg);
            }
            RawExpr::Lookup {
                sreg, dreg, flags, ..
            } => {
                if let Some(set) = &name_arg {
                    sys::nftnl_expr_set_str(p, sys::NFTNL_EXPR_LOOKUP_SET as u16, set.as_ptr());
                }
                u32_(sys::NFTNL_EXPR_LOOKUP_SREG, *sreg);
                if let Some(d) = dreg {
                    u32_(sys::NFTNL_EXPR_LOOKUP_DREG, *d);
                }
                if *flags != 0 {
                    u32_(sys::NFTNL_EXPR_LOOKUP_FLAGS, *flags);
                }
            }
            RawExpr::Counter | RawExpr::Masquerade => {}
            RawExpr::Verdict { code, .. } => {
                u32_(sys::NFTNL_EXPR_IMM_DREG, crate::expr::REG_VERDICT);
                u32_(sys::NFTNL_EXPR_IMM_VERDICT, *code as u32);
                if let Some(c) = &name_arg {
                    sys::nftnl_expr_set_str(p, sys::NFTNL_EXPR_IMM_CHAIN as u16, c.as_ptr());
                }
            }
            RawExpr::Other { .. } => unreachable!("refused above"),
        }
        Ok(x)
    }
}

/// A table as dumped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedTable {
    /// Name.
    pub name: String,
    /// `NFT_TABLE_F_*` flags.
    pub flags: u32,
    /// Userdata.
    pub udata: Option<Vec<u8>>,
}

/// A rule as dumped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedRule {
    /// Table name.
    pub table: String,
    /// Chain name.
    pub chain: String,
    /// Kernel handle.
    pub handle: u64,
    /// Expressions.
    pub exprs: Vec<RawExpr>,
    /// Userdata (the comment).
    pub udata: Option<Vec<u8>>,
}

/// Copies a message into 4-byte aligned storage if it is not aligned already, so libnftnl can
/// read `struct nlmsghdr` through a pointer.
fn with_aligned<T>(bytes: &[u8], f: impl FnOnce(*const libc::nlmsghdr) -> T) -> T {
    if (bytes.as_ptr() as usize).is_multiple_of(4) {
        f(bytes.as_ptr().cast())
    } else {
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        // SAFETY: `words` has at least `bytes.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast(), bytes.len())
        };
        f(words.as_ptr().cast())
    }
}

/// Copies a C string out; `None` for null.
///
/// # Safety
/// `p` is null or a valid NUL-terminated string.
unsafe fn string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: per the contract.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Copies a data attribute out.
///
/// # Safety
/// `p` is null or points to `len` readable bytes.
unsafe fn copy_bytes(p: *const c_void, len: u32) -> Option<Vec<u8>> {
    if p.is_null() {
        return None;
    }
    // SAFETY: per the contract.
    Some(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize) }.to_vec())
}

/// Parses a `NEWTABLE` message. `bytes` is one whole, length-checked message.
pub fn parse_table(bytes: &[u8]) -> Option<ParsedTable> {
    let t = TableObj::new();
    // SAFETY: the message is complete; getters return copies or data owned by `t`.
    unsafe {
        if with_aligned(bytes, |nlh| sys::nftnl_table_nlmsg_parse(nlh, t.ptr())) < 0 {
            return None;
        }
        let p = t.ptr();
        let udata = if sys::nftnl_table_is_set(p, sys::NFTNL_TABLE_USERDATA as u16) {
            let mut len = 0;
            let d = sys::nftnl_table_get_data(p, sys::NFTNL_TABLE_USERDATA as u16, &mut len);
            copy_bytes(d, len)
        } else {
            None
        };
        Some(ParsedTable {
            name: string(sys::nftnl_table_get_str(p, sys::NFTNL_TABLE_NAME as u16))?,
            flags: sys::nftnl_table_get_u32(p, sys::NFTNL_TABLE_FLAGS as u16),
            udata,
        })
    }
}

/// Parses a `NEWCHAIN` message.
pub fn parse_chain(bytes: &[u8]) -> Option<RawChain> {
    let c = ChainObj::new();
    // SAFETY: as in `parse_table`.
    unsafe {
        if with_aligned(bytes, |nlh| sys::nftnl_chain_nlmsg_parse(nlh, c.ptr())) < 0 {
            return None;
        }
        let p = c.ptr();
        let is = |a: u32| sys::nftnl_chain_is_set(p, a as u16);
        let hook = if is(sys::NFTNL_CHAIN_HOOKNUM) {
            Some((
                sys::nftnl_chain_get_u32(p, sys::NFTNL_CHAIN_HOOKNUM as u16),
                sys::nftnl_chain_get_s32(p, sys::NFTNL_CHAIN_PRIO as u16),
                string(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_TYPE as u16))
                    .unwrap_or_default(),
                is(sys::NFTNL_CHAIN_POLICY)
                    .then(|| sys::nftnl_chain_get_u32(p, sys::NFTNL_CHAIN_POLICY as u16)),
            ))
        } else {
            None
        };
        let mut extra = Vec::new();
        if is(sys::NFTNL_CHAIN_DEV) || is(sys::NFTNL_CHAIN_DEVICES) {
            extra.push("devices");
        }
        if is(sys::NFTNL_CHAIN_FLAGS)
            && sys::nftnl_chain_get_u32(p, sys::NFTNL_CHAIN_FLAGS as u16) & !1 != 0
        {
            // NFT_CHAIN_BASE (1) is implied by the hook; anything else (offload, binding) is not ours.
            extra.push("flags");
        }
        if is(sys::NFTNL_CHAIN_USERDATA) {
            extra.push("comment");
        }
        Some(RawChain {
            table: string(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_TABLE as u16))?,
            name: string(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_NAME as u16))?,
            hook,
            extra,
        })
    }
}

/// Parses a `NEWSET` message into (table, set).
pub fn parse_set(bytes: &[u8]) -> Option<(String, RawSet)> {
    let s = SetObj::new();
    // SAFETY: as in `parse_table`.
    unsafe {
        if with_aligned(bytes, |nlh| sys::nftnl_set_nlmsg_parse(nlh, s.ptr())) < 0 {
            return None;
        }
        let p = s.ptr();
        let is = |a: u32| sys::nftnl_set_is_set(p, a as u16);
        let get = |a: u32| sys::nftnl_set_get_u32(p, a as u16);
        let data = |a: u32| {
            let mut len = 0;
            copy_bytes(sys::nftnl_set_get_data(p, a as u16, &mut len), len)
        };
        let mut extra = Vec::new();
        for (attr, what) in [
            (sys::NFTNL_SET_TIMEOUT, "a timeout"),
            (sys::NFTNL_SET_GC_INTERVAL, "a gc interval"),
            (sys::NFTNL_SET_DESC_SIZE, "a size"),
            (sys::NFTNL_SET_OBJ_TYPE, "an object type"),
            (sys::NFTNL_SET_EXPR, "an expression"),
            (sys::NFTNL_SET_EXPRESSIONS, "expressions"),
        ] {
            if is(attr) {
                extra.push(what);
            }
        }
        if is(sys::NFTNL_SET_POLICY) && get(sys::NFTNL_SET_POLICY) != 0 {
            extra.push("a memory policy");
        }
        let concat = if is(sys::NFTNL_SET_DESC_CONCAT) {
            data(sys::NFTNL_SET_DESC_CONCAT)
                .unwrap_or_default()
                .into_iter()
                .map(u32::from)
                .collect()
        } else {
            Vec::new()
        };
        let set = RawSet {
            name: string(sys::nftnl_set_get_str(p, sys::NFTNL_SET_NAME as u16))?,
            flags: get(sys::NFTNL_SET_FLAGS),
            key_type: get(sys::NFTNL_SET_KEY_TYPE),
            key_len: get(sys::NFTNL_SET_KEY_LEN),
            data_type: is(sys::NFTNL_SET_DATA_TYPE).then(|| get(sys::NFTNL_SET_DATA_TYPE)),
            data_len: is(sys::NFTNL_SET_DATA_LEN).then(|| get(sys::NFTNL_SET_DATA_LEN)),
            concat,
            udata: if is(sys::NFTNL_SET_USERDATA) {
                data(sys::NFTNL_SET_USERDATA).unwrap_or_default()
            } else {
                Vec::new()
            },
            extra,
        };
        let table = string(sys::nftnl_set_get_str(p, sys::NFTNL_SET_TABLE as u16))?;
        Some((table, set))
    }
}

/// Parses a `NEWSETELEM` message into (table, set, elements).
pub fn parse_elements(bytes: &[u8]) -> Option<(String, String, Vec<RawElem>)> {
    let s = SetObj::new();
    // SAFETY: as in `parse_table`; the iterator is destroyed before the set.
    unsafe {
        if with_aligned(bytes, |nlh| sys::nftnl_set_elems_nlmsg_parse(nlh, s.ptr())) < 0 {
            return None;
        }
        let table = string(sys::nftnl_set_get_str(s.ptr(), sys::NFTNL_SET_TABLE as u16))?;
        let name = string(sys::nftnl_set_get_str(s.ptr(), sys::NFTNL_SET_NAME as u16))?;
        let iter = sys::nftnl_set_elems_iter_create(s.ptr());
        if iter.is_null() {
            std::process::abort();
        }
        let mut out = Vec::new();
        loop {
            let e = sys::nftnl_set_elems_iter_next(iter);
            if e.is_null() {
                break;
            }
            let is = |a: u32| sys::nftnl_set_elem_is_set(e, a as u16);
            let data = |a: u32| {
                let mut len = 0;
                copy_bytes(sys::nftnl_set_elem_get(e, a as u16, &mut len), len)
            };
            let mut extra = Vec::new();
            for (attr, what) in [
                (sys::NFTNL_SET_ELEM_TIMEOUT, "a timeout"),
                (sys::NFTNL_SET_ELEM_EXPIRATION, "an expiration"),
                (sys::NFTNL_SET_ELEM_EXPR, "an expression"),
                (sys::NFTNL_SET_ELEM_EXPRESSIONS, "expressions"),
                (sys::NFTNL_SET_ELEM_OBJREF, "an object reference"),
                (sys::NFTNL_SET_ELEM_DATA, "value data"),
            ] {
                if is(attr) {
                    extra.push(what);
                }
            }
            let verdict = is(sys::NFTNL_SET_ELEM_VERDICT).then(|| {
                let code = sys::nftnl_set_elem_get_u32(e, sys::NFTNL_SET_ELEM_VERDICT as u16);
                let chain = if is(sys::NFTNL_SET_ELEM_CHAIN) {
                    string(sys::nftnl_set_elem_get_str(
                        e,
                        sys::NFTNL_SET_ELEM_CHAIN as u16,
                    ))
                } else {
                    None
                };
                (code as i32, chain)
            });
            out.push(RawElem {
                key: data(sys::NFTNL_SET_ELEM_KEY).unwrap_or_default(),
                key_end: if is(sys::NFTNL_SET_ELEM_KEY_END) {
                    data(sys::NFTNL_SET_ELEM_KEY_END)
                } else {
                    None
                },
                flags: if is(sys::NFTNL_SET_ELEM_FLAGS) {
                    sys::nftnl_set_elem_get_u32(e, sys::NFTNL_SET_ELEM_FLAGS as u16)
                } else {
                    0
                },
                verdict,
                udata: if is(sys::NFTNL_SET_ELEM_USERDATA) {
                    data(sys::NFTNL_SET_ELEM_USERDATA)
                } else {
                    None
                },
                extra,
            });
        }
        sys::nftnl_set_elems_iter_destroy(iter);
        Some((table, name, out))
    }
}

/// libnftnl's text for one expression (as `nft --debug=netlink` prints it).
///
/// # Safety
/// `e` is a live expression.
unsafe fn expr_text(e: *const sys::nftnl_expr) -> String {
    let mut buf = vec![0u8; 512];
    // SAFETY: `buf` is writable for its length; snprintf NUL-terminates within it.
    unsafe {
        sys::nftnl_expr_snprintf(
            buf.as_mut_ptr().cast(),
            buf.len(),
            e,
            sys::NFTNL_OUTPUT_DEFAULT,
            0,
        );
        string(buf.as_ptr().cast()).unwrap_or_default()
    }
}

/// Reads one libnftnl expression into a [`RawExpr`]; anything with attributes weft never
/// writes becomes [`RawExpr::Other`].
///
/// # Safety
/// `e` is a live expression.
unsafe fn parse_expr(e: *const sys::nftnl_expr) -> RawExpr {
    // SAFETY: getters on a live expression; data is copied out.
    unsafe {
        let name =
            string(sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_NAME as u16)).unwrap_or_default();
        let is = |a: u32| sys::nftnl_expr_is_set(e, a as u16);
        let get = |a: u32| sys::nftnl_expr_get_u32(e, a as u16);
        let data = |a: u32| {
            let mut len = 0;
            copy_bytes(sys::nftnl_expr_get(e, a as u16, &mut len), len).unwrap_or_default()
        };
        // Every attribute set must be one this kind allows (libnftnl numbers them from 1).
        let only = |allowed: &[u32]| (1..32).all(|a| !is(a) || allowed.contains(&a));
        let other = || RawExpr::Other {
            name: name.clone(),
            text: expr_text(e),
        };
        match name.as_str() {
            "meta" if only(&[sys::NFTNL_EXPR_META_KEY, sys::NFTNL_EXPR_META_DREG]) => {
                RawExpr::Meta {
                    key: get(sys::NFTNL_EXPR_META_KEY),
                    dreg: get(sys::NFTNL_EXPR_META_DREG),
                }
            }
            "payload"
                if only(&[
                    sys::NFTNL_EXPR_PAYLOAD_DREG,
                    sys::NFTNL_EXPR_PAYLOAD_BASE,
                    sys::NFTNL_EXPR_PAYLOAD_OFFSET,
                    sys::NFTNL_EXPR_PAYLOAD_LEN,
                ]) =>
            {
                RawExpr::Payload {
                    base: get(sys::NFTNL_EXPR_PAYLOAD_BASE),
                    offset: get(sys::NFTNL_EXPR_PAYLOAD_OFFSET),
                    len: get(sys::NFTNL_EXPR_PAYLOAD_LEN),
                    dreg: get(sys::NFTNL_EXPR_PAYLOAD_DREG),
                }
            }
            "cmp"
                if only(&[
                    sys::NFTNL_EXPR_CMP_SREG,
                    sys::NFTNL_EXPR_CMP_OP,
                    sys::NFTNL_EXPR_CMP_DATA,
                ]) =>
            {
                RawExpr::Cmp {
                    sreg: get(sys::NFTNL_EXPR_CMP_SREG),
                    op: get(sys::NFTNL_EXPR_CMP_OP),
                    data: data(sys::NFTNL_EXPR_CMP_DATA),
                }
            }
            "bitwise"
                if only(&[
                    sys::NFTNL_EXPR_BITWISE_SREG,
                    sys::NFTNL_EXPR_BITWISE_DREG,
                    sys::NFTNL_EXPR_BITWISE_LEN,
                    sys::NFTNL_EXPR_BITWISE_MASK,
                    sys::NFTNL_EXPR_BITWISE_XOR,
                    sys::NFTNL_EXPR_BITWISE_OP,
                ]) && get(sys::NFTNL_EXPR_BITWISE_OP) == 0 =>
            {
                RawExpr::Bitwise {
                    sreg: get(sys::NFTNL_EXPR_BITWISE_SREG),
                    dreg: get(sys::NFTNL_EXPR_BITWISE_DREG),
                    len: get(sys::NFTNL_EXPR_BITWISE_LEN),
                    mask: data(sys::NFTNL_EXPR_BITWISE_MASK),
                    xor: data(sys::NFTNL_EXPR_BITWISE_XOR),
                }
            }
            "ct" if only(&[sys::NFTNL_EXPR_CT_KEY, sys::NFTNL_EXPR_CT_SREG])
                && is(sys::NFTNL_EXPR_CT_SREG) =>
            {
                RawExpr::CtSet {
                    key: get(sys::NFTNL_EXPR_CT_KEY),
                    sreg: get(sys::NFTNL_EXPR_CT_SREG),
                }
            }
            "limit"
                if only(&[
                    sys::NFTNL_EXPR_LIMIT_RATE,
                    sys::NFTNL_EXPR_LIMIT_UNIT,
                    sys::NFTNL_EXPR_LIMIT_BURST,
                    sys::NFTNL_EXPR_LIMIT_TYPE,
                    sys::NFTNL_EXPR_LIMIT_FLAGS,
                ]) =>
            {
                let u64_ = |a: u32| sys::nftnl_expr_get_u64(e, a as u16);
                RawExpr::Limit {
                    rate: u64_(sys::NFTNL_EXPR_LIMIT_RATE),
                    unit: u64_(sys::NFTNL_EXPR_LIMIT_UNIT),
                    burst: get(sys::NFTNL_EXPR_LIMIT_BURST),
                    kind: get(sys::NFTNL_EXPR_LIMIT_TYPE),
                    flags: get(sys::NFTNL_EXPR_LIMIT_FLAGS),
                }
            }
            "log"
                if only(&[sys::NFTNL_EXPR_LOG_PREFIX, sys::NFTNL_EXPR_LOG_GROUP])
                    && is(sys::NFTNL_EXPR_LOG_GROUP) =>
            {
                RawExpr::Log {
                    prefix: string(sys::nftnl_expr_get_str(
                        e,
                        sys::NFTNL_EXPR_LOG_PREFIX as u16,
                    ))
                    .unwrap_or_default(),
                    group: sys::nftnl_expr_get_u16(e, sys::NFTNL_EXPR_LOG_GROUP as u16),
                }
            }
            "ct" if only(&[sys::NFTNL_EXPR_CT_KEY, sys::NFTNL_EXPR_CT_DREG]) => RawExpr::Ct {
                key: get(sys::NFTNL_EXPR_CT_KEY),
                dreg: get(sys::NFTNL_EXPR_CT_DREG),
            },
            "fib"
                if only(&[
                    sys::NFTNL_EXPR_FIB_DREG,
                    sys::NFTNL_EXPR_FIB_RESULT,
                    sys::NFTNL_EXPR_FIB_FLAGS,
                ]) =>
            {
                RawExpr::Fib {
                    flags: get(sys::NFTNL_EXPR_FIB_FLAGS),
                    result: get(sys::NFTNL_EXPR_FIB_RESULT),
                    dreg: get(sys::NFTNL_EXPR_FIB_DREG),
                }
            }
            "lookup"
                if only(&[
                    sys::NFTNL_EXPR_LOOKUP_SREG,
                    sys::NFTNL_EXPR_LOOKUP_DREG,
                    sys::NFTNL_EXPR_LOOKUP_SET,
                    sys::NFTNL_EXPR_LOOKUP_SET_ID,
                    sys::NFTNL_EXPR_LOOKUP_FLAGS,
                ]) =>
            {
                RawExpr::Lookup {
                    set: string(sys::nftnl_expr_get_str(
                        e,
                        sys::NFTNL_EXPR_LOOKUP_SET as u16,
                    ))
                    .unwrap_or_default(),
                    sreg: get(sys::NFTNL_EXPR_LOOKUP_SREG),
                    dreg: is(sys::NFTNL_EXPR_LOOKUP_DREG).then(|| get(sys::NFTNL_EXPR_LOOKUP_DREG)),
                    flags: if is(sys::NFTNL_EXPR_LOOKUP_FLAGS) {
                        get(sys::NFTNL_EXPR_LOOKUP_FLAGS)
                    } else {
                        0
                    },
                }
            }
            "counter" if only(&[sys::NFTNL_EXPR_CTR_PACKETS, sys::NFTNL_EXPR_CTR_BYTES]) => {
                RawExpr::Counter
            }
            // Plain `masquerade`: no flags (random, persistent), no port range registers.
            "masq" if only(&[]) => RawExpr::Masquerade,
            "immediate"
                if only(&[
                    sys::NFTNL_EXPR_IMM_DREG,
                    sys::NFTNL_EXPR_IMM_VERDICT,
                    sys::NFTNL_EXPR_IMM_CHAIN,
                ]) && is(sys::NFTNL_EXPR_IMM_VERDICT)
                    && get(sys::NFTNL_EXPR_IMM_DREG) == crate::expr::REG_VERDICT =>
            {
                RawExpr::Verdict {
                    code: get(sys::NFTNL_EXPR_IMM_VERDICT) as i32,
                    chain: if is(sys::NFTNL_EXPR_IMM_CHAIN) {
                        string(sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_IMM_CHAIN as u16))
                    } else {
                        None
                    },
                }
            }
            _ => other(),
        }
    }
}

/// Parses a `NEWRULE` message. `None` if libnftnl cannot (e.g. an expression it does not know).
pub fn parse_rule(bytes: &[u8]) -> Option<ParsedRule> {
    let r = RuleObj::new();
    // SAFETY: as in `parse_table`; the iterator is destroyed before the rule.
    unsafe {
        if with_aligned(bytes, |nlh| sys::nftnl_rule_nlmsg_parse(nlh, r.ptr())) < 0 {
            return None;
        }
        let p = r.ptr();
        let iter = sys::nftnl_expr_iter_create(p);
        if iter.is_null() {
            std::process::abort();
        }
        let mut exprs = Vec::new();
        loop {
            let e = sys::nftnl_expr_iter_next(iter);
            if e.is_null() {
                break;
            }
            exprs.push(parse_expr(e));
        }
        sys::nftnl_expr_iter_destroy(iter);
        let udata = if sys::nftnl_rule_is_set(p, sys::NFTNL_RULE_USERDATA as u16) {
            let mut len = 0;
            copy_bytes(
                sys::nftnl_rule_get_data(p, sys::NFTNL_RULE_USERDATA as u16, &mut len),
                len,
            )
        } else {
            None
        };
        Some(ParsedRule {
            table: string(sys::nftnl_rule_get_str(p, sys::NFTNL_RULE_TABLE as u16))?,
            chain: string(sys::nftnl_rule_get_str(p, sys::NFTNL_RULE_CHAIN as u16))?,
            handle: sys::nftnl_rule_get_u64(p, sys::NFTNL_RULE_HANDLE as u16),
            exprs,
            udata,
        })
    }
}

/// A receive buffer, 8-byte aligned so libnftnl can read headers in place.
pub struct RecvBuf {
    words: Vec<u64>,
}

impl RecvBuf {
    /// A buffer of `bytes` bytes.
    pub fn new(bytes: usize) -> RecvBuf {
        RecvBuf {
            words: vec![0; bytes.div_ceil(8)],
        }
    }

    /// The first `n` bytes.
    pub fn bytes(&self, n: usize) -> &[u8] {
        let n = n.min(self.words.len() * 8);
        // SAFETY: within the initialised allocation.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), n) }
    }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Waits up to `timeout_ms` (0: just looks) for the socket to become readable.
pub fn poll_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        match cvt(unsafe { libc::poll(&mut pfd, 1, timeout_ms) }) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// One datagram without blocking: `Ok(None)` when nothing is queued. A datagram larger than
/// the buffer is an error (`MSG_TRUNC` reports its real size), never silently cut.
pub fn recv_nonblocking(fd: RawFd, buf: &mut RecvBuf) -> io::Result<Option<usize>> {
    let cap = buf.words.len() * 8;
    loop {
        // SAFETY: `buf` is writable for `cap` bytes.
        let n = unsafe {
            libc::recv(
                fd,
                buf.words.as_mut_ptr().cast(),
                cap,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        let n = n as usize;
        if n > cap {
            return Err(io::Error::other(format!(
                "netlink datagram of {n} bytes does not fit the {cap}-byte receive buffer"
            )));
        }
        return Ok(Some(n));
    }
}

/// `setsockopt` with an `int` value.
pub fn set_int_option(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: a valid pointer to an int of the given size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Moves the calling thread into the network namespace of `ns` (a `/run/netns/NAME` file).
/// Only this thread moves; sockets it opens afterwards belong to that namespace.
pub fn setns_net(ns: &File) -> io::Result<()> {
    // SAFETY: a valid open fd; CLONE_NEWNET is allowed in multi-threaded processes.
    cvt(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}

/// The kernel release (`uname -r`).
pub fn kernel_release() -> io::Result<String> {
    // SAFETY: utsname is plain data; uname fills it with NUL-terminated strings.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        cvt(libc::uname(&mut u))?;
        Ok(string(u.release.as_ptr()).unwrap_or_default())
    }
}
