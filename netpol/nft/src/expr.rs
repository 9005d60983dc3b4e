//! Rules as nftables bytecode: [`RawExpr`] (plain data), [`lower`] and [`raise`].
//!
//! [`lower`] turns one typed [`Rule`] into exactly the expression sequence `nft` 1.0.6 generates
//! for the same statement in an `inet` table (checked with `nft --debug=netlink add rule …`, the
//! expected sequences are pinned in the tests below): the `meta nfproto` / `meta l4proto` guards
//! nft adds itself, payload offsets and lengths, nft's register allocation for concatenations,
//! `cmp gte`+`cmp lte` for port ranges, `lookup` with `NFT_LOOKUP_F_INV` for `!=` and with
//! `dreg 0` for a verdict map, a bare `masq` for `masquerade` (table `inet weft-nat`).
//!
//! [`raise`] is its inverse on what the kernel dumps back: it recognises the sequences [`lower`]
//! emits and nothing else. It parses loosely, then lowers its own result and requires the very
//! same expressions, so a rule is either exactly one of ours or unrecognised (`None`).

use std::fmt;

use weft_netpol::ruleset::{
    Action, AddrField, CtMarkField, CtState, Family, IfaceField, LogSpec, Match, Protocol, Rule,
    Verdict,
};

use crate::netlink::udata;

/// `NFT_REG_VERDICT`
pub const REG_VERDICT: u32 = 0;
/// `NFT_REG_1`: the first 128-bit register.
pub const REG_1: u32 = 1;

/// `enum nft_meta_keys` values we use.
pub mod meta_key {
    /// `NFT_META_IIFNAME`
    pub const IIFNAME: u32 = 6;
    /// `NFT_META_OIFNAME`
    pub const OIFNAME: u32 = 7;
    /// `NFT_META_NFPROTO`
    pub const NFPROTO: u32 = 15;
    /// `NFT_META_L4PROTO`
    pub const L4PROTO: u32 = 16;
}

/// `enum nft_payload_bases`
pub mod payload_base {
    /// `NFT_PAYLOAD_NETWORK_HEADER`
    pub const NETWORK: u32 = 1;
    /// `NFT_PAYLOAD_TRANSPORT_HEADER`
    pub const TRANSPORT: u32 = 2;
}

/// `enum nft_cmp_ops`
pub mod cmp_op {
    /// `NFT_CMP_EQ`
    pub const EQ: u32 = 0;
    /// `NFT_CMP_NEQ`
    pub const NEQ: u32 = 1;
    /// `NFT_CMP_LTE`
    pub const LTE: u32 = 3;
    /// `NFT_CMP_GTE`
    pub const GTE: u32 = 5;
}

/// `NFT_CT_STATE`
pub const CT_STATE: u32 = 0;
/// `NFT_CT_MARK`
pub const CT_MARK: u32 = 3;
/// `limit` unit of `N/second`: one second.
pub const LIMIT_UNIT_SECOND: u64 = 1;
/// `NFT_LIMIT_PKTS`
pub const LIMIT_PKTS: u32 = 0;
/// `NF_CT_STATE_BIT(IP_CT_ESTABLISHED) | NF_CT_STATE_BIT(IP_CT_RELATED)`
pub const CT_ESTABLISHED_RELATED: u32 = 0x2 | 0x4;
/// `NFT_LOOKUP_F_INV`
pub const LOOKUP_F_INV: u32 = 1;
/// `NFTA_FIB_F_SADDR | NFTA_FIB_F_IIF | NFTA_FIB_F_PRESENT`: `fib saddr . iif oif missing`.
pub const FIB_SADDR_IIF_PRESENT: u32 = 0x1 | 0x8 | 0x20;
/// `NFT_FIB_RESULT_OIF`
pub const FIB_RESULT_OIF: u32 = 1;

/// `NF_DROP`
pub const VERDICT_DROP: i32 = 0;
/// `NF_ACCEPT`
pub const VERDICT_ACCEPT: i32 = 1;
/// `NFT_JUMP`
pub const VERDICT_JUMP: i32 = -3;

/// The longest interface-name prefix (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_PREFIX: usize = 15;

/// One nftables expression with every attribute the kernel dumps back for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RawExpr {
    /// `meta load <key> => reg <dreg>`
    Meta {
        /// `NFT_META_*`
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `payload load <len>b @ <base> + <offset> => reg <dreg>`
    Payload {
        /// `NFT_PAYLOAD_*_HEADER`
        base: u32,
        /// Byte offset in that header.
        offset: u32,
        /// Bytes loaded.
        len: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `cmp <op> reg <sreg> <data>`
    Cmp {
        /// Source register.
        sreg: u32,
        /// `NFT_CMP_*`
        op: u32,
        /// Compared bytes (their length is the compared length).
        data: Vec<u8>,
    },
    /// `bitwise reg <dreg> = (reg <sreg> & <mask>) ^ <xor>`
    Bitwise {
        /// Source register.
        sreg: u32,
        /// Destination register.
        dreg: u32,
        /// Length in bytes.
        len: u32,
        /// Mask bytes.
        mask: Vec<u8>,
        /// Xor bytes.
        xor: Vec<u8>,
    },
    /// `ct load <key> => reg <dreg>`
    Ct {
        /// `NFT_CT_*`
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `ct set <key> with reg <sreg>`
    CtSet {
        /// `NFT_CT_*`
        key: u32,
        /// Source register.
        sreg: u32,
    },
    /// `limit rate <rate>/<unit> burst <burst> type <kind> flags <flags>`
    Limit {
        /// Tokens per unit.
        rate: u64,
        /// Unit, in seconds.
        unit: u64,
        /// Burst.
        burst: u32,
        /// `NFT_LIMIT_PKTS` or `NFT_LIMIT_PKT_BYTES`.
        kind: u32,
        /// `NFT_LIMIT_F_INV`
        flags: u32,
    },
    /// `log prefix <prefix> group <group>` (nflog; no snaplen, no queue threshold).
    Log {
        /// Prefix.
        prefix: String,
        /// nflog group.
        group: u16,
    },
    /// `fib <flags> <result> => reg <dreg>`
    Fib {
        /// `NFTA_FIB_F_*`
        flags: u32,
        /// `NFT_FIB_RESULT_*`
        result: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `lookup reg <sreg> set <set> [dreg <dreg>] [flags]`
    Lookup {
        /// Set name.
        set: String,
        /// Source register (the key).
        sreg: u32,
        /// Destination register for maps (`Some(0)`: verdict map).
        dreg: Option<u32>,
        /// `NFT_LOOKUP_F_*`
        flags: u32,
    },
    /// `counter` (packet and byte values are not part of the rule's identity).
    Counter,
    /// `immediate reg 0 <verdict>`
    Verdict {
        /// `NF_ACCEPT`, `NF_DROP`, `NFT_JUMP`, …
        code: i32,
        /// Target chain of a jump or goto.
        chain: Option<String>,
    },
    /// `masq`: plain `masquerade` (no flags, no port range).
    Masquerade,
    /// Anything else, with libnftnl's rendering of it (never emitted by weft).
    Other {
        /// Expression name.
        name: String,
        /// libnftnl's text for it.
        text: String,
    },
}

impl fmt::Display for RawExpr {
    /// The rendering of `nft --debug=netlink` (libnftnl's), for errors and foreign-rule reports.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = |b: u32| match b {
            0 => "link",
            payload_base::NETWORK => "network",
            payload_base::TRANSPORT => "transport",
            _ => "unknown",
        };
        let words = |data: &[u8]| {
            data.chunks(4)
                .map(|c| {
                    let mut w = [0u8; 4];
                    w[..c.len()].copy_from_slice(c);
                    format!("0x{:08x}", u32::from_ne_bytes(w))
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        match self {
            RawExpr::Meta { key, dreg } => write!(f, "[ meta load {key} => reg {dreg} ]"),
            RawExpr::Payload {
                base: b,
                offset,
                len,
                dreg,
            } => write!(
                f,
                "[ payload load {len}b @ {} header + {offset} => reg {dreg} ]",
                base(*b)
            ),
            RawExpr::Cmp { sreg, op, data } => {
                write!(f, "[ cmp op{op} reg {sreg} {} ]", words(data))
            }
            RawExpr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
                ..
            } => write!(
                f,
                "[ bitwise reg {dreg} = ( reg {sreg} & {} ) ^ {} ]",
                words(mask),
                words(xor)
            ),
            RawExpr::Ct { key, dreg } => write!(f, "[ ct load {key} => reg {dreg} ]"),
            RawExpr::CtSet { key, sreg } => write!(f, "[ ct set {key} with reg {sreg} ]"),
            RawExpr::Limit {
                rate,
                unit,
                burst,
                kind,
                flags,
            } => write!(
                f,
                "[ limit rate {rate}/{unit} burst {burst} type {kind} flags 0x{flags:x} ]"
            ),
            RawExpr::Log { prefix, group } => {
                write!(f, "[ log prefix {prefix} group {group} ]")
            }
            RawExpr::Fib {
                flags,
                result,
                dreg,
            } => write!(f, "[ fib flags 0x{flags:x} result {result} => reg {dreg} ]"),
            RawExpr::Lookup {
                set,
                sreg,
                dreg,
                flags,
            } => {
                write!(f, "[ lookup reg {sreg} set {set}")?;
                if let Some(d) = dreg {
                    write!(f, " dreg {d}")?;
                }
                if *flags != 0 {
                    write!(f, " 0x{flags:x}")?;
                }
                f.write_str(" ]")
            }
            RawExpr::Counter => f.write_str("[ counter ]"),
            RawExpr::Masquerade => f.write_str("[ masq ]"),
            RawExpr::Verdict { code, chain } => match chain {
                Some(c) => write!(f, "[ immediate reg 0 verdict {code} -> {c} ]"),
                None => write!(f, "[ immediate reg 0 verdict {code} ]"),
            },
            RawExpr::Other { text, .. } => write!(f, "[ {text} ]"),
        }
    }
}

/// Why a typed rule cannot be written (the compiler produced something nft would refuse).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LowerError {
    /// An interface prefix that is empty, too long, or contains NUL.
    #[error("interface prefix {0:?} must be 1 to 15 bytes without NUL")]
    IfacePrefix(String),
    /// A port range whose first port is after its last.
    #[error("port range {first}-{last} is empty")]
    PortRange {
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// A conntrack mark write whose value lies outside its field (or an empty field).
    #[error("ct mark value {:#010x} is not inside the field {:#010x}", .0.value, .0.field)]
    MarkField(CtMarkField),
    /// A log statement nft would refuse or print differently.
    #[error("log prefix {:?} must be at most 127 bytes without '\"' or NUL, rate above 0", .0.prefix)]
    Log(LogSpec),
    /// A comment nft could not print back (too long, a `"`, or a NUL).
    #[error("comment {0:?} is longer than 128 bytes or contains '\"' or NUL")]
    Comment(String),
}

/// Register holding the concatenation field that starts `words` 32-bit words into the key:
/// nft uses a 128-bit register (`NFT_REG_1 + n`) when the offset is a multiple of 16 bytes and
/// a 32-bit one (`NFT_REG32_00 + n`) otherwise (nft's `netlink_put_register`).
pub fn concat_register(words: u32) -> u32 {
    if words.is_multiple_of(4) {
        REG_1 + words / 4
    } else {
        8 + words
    }
}

fn nfproto_guard(family: Family) -> [RawExpr; 2] {
    let proto = match family {
        Family::V4 => libc::NFPROTO_IPV4,
        Family::V6 => libc::NFPROTO_IPV6,
    };
    [
        RawExpr::Meta {
            key: meta_key::NFPROTO,
            dreg: REG_1,
        },
        RawExpr::Cmp {
            sreg: REG_1,
            op: cmp_op::EQ,
            data: vec![proto as u8],
        },
    ]
}

fn l4proto_guard(protocol: Protocol) -> [RawExpr; 2] {
    [
        RawExpr::Meta {
            key: meta_key::L4PROTO,
            dreg: REG_1,
        },
        RawExpr::Cmp {
            sreg: REG_1,
            op: cmp_op::EQ,
            data: vec![protocol.number()],
        },
    ]
}

/// `ip saddr`, `ip6 daddr`, …: offset and length in the network header.
fn addr_payload(family: Family, field: AddrField, dreg: u32) -> RawExpr {
    let (offset, len) = match (family, field) {
        (Family::V4, AddrField::Saddr) => (12, 4),
        (Family::V4, AddrField::Daddr) => (16, 4),
        (Family::V6, AddrField::Saddr) => (8, 16),
        (Family::V6, AddrField::Daddr) => (24, 16),
    };
    RawExpr::Payload {
        base: payload_base::NETWORK,
        offset,
        len,
        dreg,
    }
}

/// `th dport`: the destination port of TCP, UDP and SCTP alike.
fn dport_payload(dreg: u32) -> RawExpr {
    RawExpr::Payload {
        base: payload_base::TRANSPORT,
        offset: 2,
        len: 2,
        dreg,
    }
}

/// Emits the `meta nfproto` guard of `family` unless an earlier part of the same rule already
/// did: nft adds the guard once per rule, when its protocol context does not know the family
/// yet (`ip saddr @a ip daddr . meta l4proto . th dport @b` has one guard, not two).
fn guard_once(family: Family, known: &mut Option<Family>, out: &mut Vec<RawExpr>) {
    if *known != Some(family) {
        out.extend(nfproto_guard(family));
        *known = Some(family);
    }
}

fn lower_match(
    m: &Match,
    known: &mut Option<Family>,
    out: &mut Vec<RawExpr>,
) -> Result<(), LowerError> {
    match m {
        Match::Ct(CtState::EstablishedRelated) => out.extend([
            RawExpr::Ct {
                key: CT_STATE,
                dreg: REG_1,
            },
            RawExpr::Bitwise {
                sreg: REG_1,
                dreg: REG_1,
                len: 4,
                mask: CT_ESTABLISHED_RELATED.to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            },
            RawExpr::Cmp {
                sreg: REG_1,
                op: cmp_op::NEQ,
                data: vec![0; 4],
            },
        ]),
        Match::IfacePrefix { field, prefix } => {
            if prefix.is_empty() || prefix.len() > MAX_IFNAME_PREFIX || prefix.contains('\0') {
                return Err(LowerError::IfacePrefix(prefix.clone()));
            }
            let key = match field {
                IfaceField::Input => meta_key::IIFNAME,
                IfaceField::Output => meta_key::OIFNAME,
            };
            out.extend([
                RawExpr::Meta { key, dreg: REG_1 },
                RawExpr::Cmp {
                    sreg: REG_1,
                    op: cmp_op::EQ,
                    data: prefix.as_bytes().to_vec(),
                },
            ]);
        }
        Match::FibSaddrIifMissing => out.extend([
            RawExpr::Fib {
                flags: FIB_SADDR_IIF_PRESENT,
                result: FIB_RESULT_OIF,
                dreg: REG_1,
            },
            RawExpr::Cmp {
                sreg: REG_1,
                op: cmp_op::EQ,
                data: vec![0; 4],
            },
        ]),
        Match::AddrInSet {
            family,
            field,
            set,
            negate,
        } => {
            guard_once(*family, known, out);
            out.push(addr_payload(*family, *field, REG_1));
            out.push(RawExpr::Lookup {
                set: set.clone(),
                sreg: REG_1,
                dreg: None,
                flags: if *negate { LOOKUP_F_INV } else { 0 },
            });
        }
        Match::DestPortInSet { family, set } => {
            // `ip daddr . meta l4proto . th dport`: each field padded to 32 bits.
            let addr_words = match family {
                Family::V4 => 1,
                Family::V6 => 4,
            };
            guard_once(*family, known, out);
            out.push(addr_payload(*family, AddrField::Daddr, REG_1));
            out.push(RawExpr::Meta {
                key: meta_key::L4PROTO,
                dreg: concat_register(addr_words),
            });
            out.push(dport_payload(concat_register(addr_words + 1)));
            out.push(RawExpr::Lookup {
                set: set.clone(),
                sreg: REG_1,
                dreg: None,
                flags: 0,
            });
        }
        Match::L4Proto(p) => out.extend(l4proto_guard(*p)),
        Match::DestPort {
            protocol,
            first,
            last,
        } => {
            if first > last {
                return Err(LowerError::PortRange {
                    first: *first,
                    last: *last,
                });
            }
            out.extend(l4proto_guard(*protocol));
            out.push(dport_payload(REG_1));
            if first == last {
                out.push(RawExpr::Cmp {
                    sreg: REG_1,
                    op: cmp_op::EQ,
                    data: first.to_be_bytes().to_vec(),
                });
            } else {
                out.push(RawExpr::Cmp {
                    sreg: REG_1,
                    op: cmp_op::GTE,
                    data: first.to_be_bytes().to_vec(),
                });
                out.push(RawExpr::Cmp {
                    sreg: REG_1,
                    op: cmp_op::LTE,
                    data: last.to_be_bytes().to_vec(),
                });
            }
        }
    }
    Ok(())
}

fn lower_verdict(v: &Verdict) -> RawExpr {
    match v {
        Verdict::Accept => RawExpr::Verdict {
            code: VERDICT_ACCEPT,
            chain: None,
        },
        Verdict::Drop => RawExpr::Verdict {
            code: VERDICT_DROP,
            chain: None,
        },
        Verdict::Jump(c) => RawExpr::Verdict {
            code: VERDICT_JUMP,
            chain: Some(c.clone()),
        },
    }
}

/// The verdict a raw verdict expression or map element stands for, if weft can say it.
pub fn raise_verdict(code: i32, chain: Option<&str>) -> Option<Verdict> {
    match (code, chain) {
        (VERDICT_ACCEPT, None) => Some(Verdict::Accept),
        (VERDICT_DROP, None) => Some(Verdict::Drop),
        (VERDICT_JUMP, Some(c)) => Some(Verdict::Jump(c.to_string())),
        _ => None,
    }
}

/// The verdict as (code, chain), for map elements.
pub fn verdict_code(v: &Verdict) -> (i32, Option<&str>) {
    match v {
        Verdict::Accept => (VERDICT_ACCEPT, None),
        Verdict::Drop => (VERDICT_DROP, None),
        Verdict::Jump(c) => (VERDICT_JUMP, Some(c)),
    }
}

/// A rule comment as nft stores it: one `NFTNL_UDATA_RULE_COMMENT` TLV.
pub fn rule_udata(comment: Option<&str>) -> Result<Option<Vec<u8>>, LowerError> {
    let Some(c) = comment else {
        return Ok(None);
    };
    check_comment(c)?;
    let mut buf = Vec::new();
    udata::put_strz(&mut buf, udata::COMMENT, c).ok_or_else(|| LowerError::Comment(c.into()))?;
    Ok(Some(buf))
}

/// nft refuses comments over 128 bytes and cannot print back a `"` inside one.
pub fn check_comment(c: &str) -> Result<(), LowerError> {
    if c.len() > weft_netpol::ruleset::MAX_COMMENT_BYTES || c.contains('"') || c.contains('\0') {
        return Err(LowerError::Comment(c.to_string()));
    }
    Ok(())
}

/// The expressions nft generates for `rule` (matches, `counter`, action), in order.
pub fn lower(rule: &Rule) -> Result<Vec<RawExpr>, LowerError> {
    let mut out = Vec::new();
    let mut known = None;
    for m in &rule.matches {
        lower_match(m, &mut known, &mut out)?;
    }
    if rule.counter {
        out.push(RawExpr::Counter);
    }
    match &rule.action {
        Action::Verdict(v) => out.push(lower_verdict(v)),
        Action::Vmap { family, field, map } => {
            guard_once(*family, &mut known, &mut out);
            out.push(addr_payload(*family, *field, REG_1));
            out.push(RawExpr::Lookup {
                set: map.clone(),
                sreg: REG_1,
                dreg: Some(REG_VERDICT),
                flags: 0,
            });
        }
        Action::Masquerade => out.push(RawExpr::Masquerade),
        Action::MarkAccept(mark) => {
            if mark.value & !mark.field != 0 || mark.field == 0 {
                return Err(LowerError::MarkField(*mark));
            }
            let (mask, xor) = mark.mask_xor();
            out.extend([
                RawExpr::Ct {
                    key: CT_MARK,
                    dreg: REG_1,
                },
                RawExpr::Bitwise {
                    sreg: REG_1,
                    dreg: REG_1,
                    len: 4,
                    mask: mask.to_ne_bytes().to_vec(),
                    xor: xor.to_ne_bytes().to_vec(),
                },
                RawExpr::CtSet {
                    key: CT_MARK,
                    sreg: REG_1,
                },
                lower_verdict(&Verdict::Accept),
            ]);
        }
        Action::LogLimited(log) => {
            if log.prefix.len() > weft_netpol::ruleset::MAX_LOG_PREFIX_BYTES
                || log.prefix.contains(['"', '\0'])
                || log.rate_per_second == 0
            {
                return Err(LowerError::Log(log.clone()));
            }
            out.extend([
                RawExpr::Limit {
                    rate: log.rate_per_second,
                    unit: LIMIT_UNIT_SECOND,
                    burst: log.burst,
                    kind: LIMIT_PKTS,
                    flags: 0,
                },
                RawExpr::Log {
                    prefix: log.prefix.clone(),
                    group: log.group,
                },
            ]);
        }
    }
    Ok(out)
}

/// Reads the family and field of an address payload loaded into `REG_1`.
fn raise_addr(e: &RawExpr) -> Option<(Family, AddrField)> {
    let RawExpr::Payload {
        base: payload_base::NETWORK,
        offset,
        dreg: REG_1,
        ..
    } = e
    else {
        return None;
    };
    match offset {
        12 => Some((Family::V4, AddrField::Saddr)),
        16 => Some((Family::V4, AddrField::Daddr)),
        8 => Some((Family::V6, AddrField::Saddr)),
        24 => Some((Family::V6, AddrField::Daddr)),
        _ => None,
    }
}

fn cmp_data(e: &RawExpr, want_op: u32) -> Option<&[u8]> {
    match e {
        RawExpr::Cmp {
            sreg: REG_1,
            op,
            data,
        } if *op == want_op => Some(data),
        _ => None,
    }
}

fn port(data: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(data.try_into().ok()?))
}

/// An address lookup (`ip saddr @s`) or a named-port lookup (`ip daddr . meta l4proto . th
/// dport @s`) starting with its address payload, the `meta nfproto` guard already consumed.
fn raise_addr_match(e: &[RawExpr]) -> Option<(Match, usize)> {
    let (family, field) = raise_addr(e.first()?)?;
    match e.get(1)? {
        RawExpr::Lookup {
            set,
            dreg: None,
            flags,
            ..
        } => Some((
            Match::AddrInSet {
                family,
                field,
                set: set.clone(),
                negate: *flags == LOOKUP_F_INV,
            },
            2,
        )),
        RawExpr::Meta {
            key: meta_key::L4PROTO,
            ..
        } => match e.get(3)? {
            RawExpr::Lookup { set, .. } => Some((
                Match::DestPortInSet {
                    family,
                    set: set.clone(),
                },
                4,
            )),
            _ => None,
        },
        // A lookup with a dreg is the vmap action, not a match.
        _ => None,
    }
}

/// Recognises one match at the start of `e`: the match and how many expressions it used.
/// Loose on purpose; [`raise`] checks the result by lowering it again.
fn raise_match(e: &[RawExpr]) -> Option<(Match, usize)> {
    match e.first()? {
        RawExpr::Ct { key: CT_STATE, .. } => {
            Some((Match::Ct(CtState::EstablishedRelated), 3)).filter(|_| e.len() >= 3)
        }
        RawExpr::Meta { key, .. } if *key == meta_key::IIFNAME || *key == meta_key::OIFNAME => {
            let field = if *key == meta_key::IIFNAME {
                IfaceField::Input
            } else {
                IfaceField::Output
            };
            let prefix = String::from_utf8(cmp_data(e.get(1)?, cmp_op::EQ)?.to_vec()).ok()?;
            Some((Match::IfacePrefix { field, prefix }, 2))
        }
        RawExpr::Fib { .. } => Some((Match::FibSaddrIifMissing, 2)).filter(|_| e.len() >= 2),
        RawExpr::Meta {
            key: meta_key::NFPROTO,
            ..
        } => raise_addr_match(e.get(2..)?).map(|(m, used)| (m, used + 2)),
        // An address match after another of the same family: its guard was not repeated.
        RawExpr::Payload {
            base: payload_base::NETWORK,
            ..
        } => raise_addr_match(e),
        RawExpr::Meta {
            key: meta_key::L4PROTO,
            ..
        } => {
            let protocol = Protocol::from_number(*cmp_data(e.get(1)?, cmp_op::EQ)?.first()?)?;
            if !matches!(
                e.get(2),
                Some(RawExpr::Payload {
                    base: payload_base::TRANSPORT,
                    ..
                })
            ) {
                return Some((Match::L4Proto(protocol), 2));
            }
            if let Some(p) = e.get(3).and_then(|c| cmp_data(c, cmp_op::EQ)) {
                let p = port(p)?;
                return Some((
                    Match::DestPort {
                        protocol,
                        first: p,
                        last: p,
                    },
                    4,
                ));
            }
            let first = port(cmp_data(e.get(3)?, cmp_op::GTE)?)?;
            let last = port(cmp_data(e.get(4)?, cmp_op::LTE)?)?;
            Some((
                Match::DestPort {
                    protocol,
                    first,
                    last,
                },
                5,
            ))
        }
        _ => None,
    }
}

/// Recognises a rule weft wrote: its expressions and userdata as the kernel dumps them.
/// `None` unless [`lower`] of the result gives back exactly `exprs` and `udata`.
pub fn raise(exprs: &[RawExpr], udata_bytes: Option<&[u8]>) -> Option<Rule> {
    let mut i = 0;
    let mut matches = Vec::new();
    while let Some((m, used)) = raise_match(&exprs[i..]) {
        matches.push(m);
        i += used;
    }
    let counter = exprs.get(i) == Some(&RawExpr::Counter);
    if counter {
        i += 1;
    }
    let action = match &exprs[i..] {
        [RawExpr::Verdict { code, chain }] => {
            Action::Verdict(raise_verdict(*code, chain.as_deref())?)
        }
        [RawExpr::Masquerade] => Action::Masquerade,
        [
            RawExpr::Ct { key: CT_MARK, .. },
            RawExpr::Bitwise { mask, xor, .. },
            RawExpr::CtSet { .. },
            RawExpr::Verdict { .. },
        ] => {
            let word = |b: &[u8]| Some(u32::from_ne_bytes(b.try_into().ok()?));
            Action::MarkAccept(CtMarkField {
                field: !word(mask)?,
                value: word(xor)?,
            })
        }
        [
            RawExpr::Limit { rate, burst, .. },
            RawExpr::Log { prefix, group },
        ] => Action::LogLimited(LogSpec {
            rate_per_second: *rate,
            burst: *burst,
            group: *group,
            prefix: prefix.clone(),
        }),
        [_, _, payload, RawExpr::Lookup { set, .. }] | [payload, RawExpr::Lookup { set, .. }] => {
            let (family, field) = raise_addr(payload)?;
            Action::Vmap {
                family,
                field,
                map: set.clone(),
            }
        }
        _ => return None,
    };
    let comment = match udata_bytes {
        None => None,
        Some(b) => match udata::parse(b)?.as_slice() {
            [(udata::COMMENT, value)] => Some(udata::strz(value)?),
            _ => return None,
        },
    };
    let rule = Rule {
        matches,
        counter,
        action,
        comment,
    };
    let same_exprs = lower(&rule).ok()? == exprs;
    let same_udata = rule_udata(rule.comment.as_deref()).ok()?.as_deref() == udata_bytes;
    (same_exprs && same_udata).then_some(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(matches: Vec<Match>, action: Action) -> Rule {
        Rule {
            matches,
            counter: false,
            action,
            comment: None,
        }
    }

    fn accept() -> Action {
        Action::Verdict(Verdict::Accept)
    }

    /// What `nft --debug=netlink` 1.0.6 printed for each statement (in an `inet` table), in
    /// this crate's rendering of the same expressions.
    #[test]
    fn lowering_matches_the_bytecode_nft_generates() {
        let cases: Vec<(Rule, &str)> = vec![
            (
                rule(vec![Match::Ct(CtState::EstablishedRelated)], accept()),
                // [ ct load state => reg 1 ] [ bitwise reg 1 = ( reg 1 & 0x00000006 ) ^ 0x00000000 ]
                // [ cmp neq reg 1 0x00000000 ] [ immediate reg 0 accept ]
                "[ ct load 0 => reg 1 ] [ bitwise reg 1 = ( reg 1 & 0x00000006 ) ^ 0x00000000 ] \
                 [ cmp op1 reg 1 0x00000000 ] [ immediate reg 0 verdict 1 ]",
            ),
            (
                rule(
                    vec![
                        Match::IfacePrefix {
                            field: IfaceField::Input,
                            prefix: "weft".into(),
                        },
                        Match::FibSaddrIifMissing,
                    ],
                    Action::Verdict(Verdict::Drop),
                ),
                // [ meta load iifname => reg 1 ] [ cmp eq reg 1 0x74666577 ]
                // [ fib saddr . iif oif present => reg 1 ] [ cmp eq reg 1 0x00000000 ]
                "[ meta load 6 => reg 1 ] [ cmp op0 reg 1 0x74666577 ] \
                 [ fib flags 0x29 result 1 => reg 1 ] [ cmp op0 reg 1 0x00000000 ] \
                 [ immediate reg 0 verdict 0 ]",
            ),
            (
                rule(
                    vec![Match::AddrInSet {
                        family: Family::V4,
                        field: AddrField::Saddr,
                        set: "s4".into(),
                        negate: true,
                    }],
                    Action::Verdict(Verdict::Jump("g".into())),
                ),
                // [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x00000002 ]
                // [ payload load 4b @ network header + 12 => reg 1 ] [ lookup reg 1 set s4 0x1 ]
                "[ meta load 15 => reg 1 ] [ cmp op0 reg 1 0x00000002 ] \
                 [ payload load 4b @ network header + 12 => reg 1 ] \
                 [ lookup reg 1 set s4 0x1 ] [ immediate reg 0 verdict -3 -> g ]",
            ),
            (
                rule(
                    vec![Match::DestPortInSet {
                        family: Family::V4,
                        set: "np4".into(),
                    }],
                    accept(),
                ),
                // ... [ payload load 4b @ network header + 16 => reg 1 ]
                // [ meta load l4proto => reg 9 ] [ payload load 2b @ transport header + 2 => reg 10 ]
                "[ meta load 15 => reg 1 ] [ cmp op0 reg 1 0x00000002 ] \
                 [ payload load 4b @ network header + 16 => reg 1 ] [ meta load 16 => reg 9 ] \
                 [ payload load 2b @ transport header + 2 => reg 10 ] [ lookup reg 1 set np4 ] \
                 [ immediate reg 0 verdict 1 ]",
            ),
            (
                rule(
                    vec![Match::DestPortInSet {
                        family: Family::V6,
                        set: "np6".into(),
                    }],
                    accept(),
                ),
                // [ payload load 16b @ network header + 24 => reg 1 ]
                // [ meta load l4proto => reg 2 ] [ payload load 2b @ transport header + 2 => reg 13 ]
                "[ meta load 15 => reg 1 ] [ cmp op0 reg 1 0x0000000a ] \
                 [ payload load 16b @ network header + 24 => reg 1 ] [ meta load 16 => reg 2 ] \
                 [ payload load 2b @ transport header + 2 => reg 13 ] [ lookup reg 1 set np6 ] \
                 [ immediate reg 0 verdict 1 ]",
            ),
            (
                // A peer and a named port in one rule: one nfproto guard, as nft writes it.
                rule(
                    vec![
                        Match::AddrInSet {
                            family: Family::V4,
                            field: AddrField::Saddr,
                            set: "s4".into(),
                            negate: false,
                        },
                        Match::DestPortInSet {
                            family: Family::V4,
                            set: "np4".into(),
                        },
                    ],
                    accept(),
                ),
                // [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x00000002 ]
                // [ payload load 4b @ network header + 12 => reg 1 ] [ lookup reg 1 set s4 ]
                // [ payload load 4b @ network header + 16 => reg 1 ] [ meta load l4proto => reg 9 ]
                // [ payload load 2b @ transport header + 2 => reg 10 ] [ lookup reg 1 set np4 ]
                "[ meta load 15 => reg 1 ] [ cmp op0 reg 1 0x00000002 ] \
                 [ payload load 4b @ network header + 12 => reg 1 ] [ lookup reg 1 set s4 ] \
                 [ payload load 4b @ network header + 16 => reg 1 ] [ meta load 16 => reg 9 ] \
                 [ payload load 2b @ transport header + 2 => reg 10 ] [ lookup reg 1 set np4 ] \
                 [ immediate reg 0 verdict 1 ]",
            ),
            (
                rule(
                    vec![Match::DestPort {
                        protocol: Protocol::Udp,
                        first: 1000,
                        last: 2000,
                    }],
                    accept(),
                ),
                // [ meta load l4proto => reg 1 ] [ cmp eq reg 1 0x00000011 ]
                // [ payload load 2b @ transport header + 2 => reg 1 ]
                // [ cmp gte reg 1 0x0000e803 ] [ cmp lte reg 1 0x0000d007 ]
                "[ meta load 16 => reg 1 ] [ cmp op0 reg 1 0x00000011 ] \
                 [ payload load 2b @ transport header + 2 => reg 1 ] \
                 [ cmp op5 reg 1 0x0000e803 ] [ cmp op3 reg 1 0x0000d007 ] \
                 [ immediate reg 0 verdict 1 ]",
            ),
            (
                rule(
                    vec![],
                    Action::Vmap {
                        family: Family::V6,
                        field: AddrField::Daddr,
                        map: "m6".into(),
                    },
                ),
                // [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x0000000a ]
                // [ payload load 16b @ network header + 24 => reg 1 ] [ lookup reg 1 set m6 dreg 0 ]
                "[ meta load 15 => reg 1 ] [ cmp op0 reg 1 0x0000000a ] \
                 [ payload load 16b @ network header + 24 => reg 1 ] \
                 [ lookup reg 1 set m6 dreg 0 ]",
            ),
            (
                // `ip saddr @cluster-v4 ip daddr != @cluster-v4 masquerade` (table weft-nat)
                rule(
                    vec![
                        Match::AddrInSet {
                            family: Family::V4,
                            field: AddrField::Saddr,
                            set: "cluster-v4".into(),
                            negate: false,
                        },
                        Match::AddrInSet {
                            family: Family::V4,
                            field: AddrField::Daddr,
                            set: "cluster-v4".into(),
                            negate: true,
                        },
                    ],
                    Action::Masquerade,
                ),
                // [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x00000002 ]
                // [ payload load 4b @ network header + 12 => reg 1 ] [ lookup reg 1 set cluster-v4 ]
                // [ payload load 4b @ network header + 16 => reg 1 ] [ lookup reg 1 set cluster-v4 0x1 ]
                // [ masq ]
                "[ meta load 15 => reg 1 ] [ cmp op0 reg 1 0x00000002 ] \
                 [ payload load 4b @ network header + 12 => reg 1 ] \
                 [ lookup reg 1 set cluster-v4 ] \
                 [ payload load 4b @ network header + 16 => reg 1 ] \
                 [ lookup reg 1 set cluster-v4 0x1 ] [ masq ]",
            ),
            (
                // `ip6 saddr @cluster-v6 ip6 daddr != @cluster-v6 counter masquerade`
                Rule {
                    counter: true,
                    ..rule(
                        vec![
                            Match::AddrInSet {
                                family: Family::V6,
                                field: AddrField::Saddr,
                                set: "cluster-v6".into(),
                                negate: false,
                            },
                            Match::AddrInSet {
                                family: Family::V6,
                                field: AddrField::Daddr,
                                set: "cluster-v6".into(),
                                negate: true,
                            },
                        ],
                        Action::Masquerade,
                    )
                },
                // [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x0000000a ]
                // [ payload load 16b @ network header + 8 => reg 1 ] [ lookup reg 1 set cluster-v6 ]
                // [ payload load 16b @ network header + 24 => reg 1 ] [ lookup reg 1 set cluster-v6 0x1 ]
                // [ counter pkts 0 bytes 0 ] [ masq ]
                "[ meta load 15 => reg 1 ] [ cmp op0 reg 1 0x0000000a ] \
                 [ payload load 16b @ network header + 8 => reg 1 ] \
                 [ lookup reg 1 set cluster-v6 ] \
                 [ payload load 16b @ network header + 24 => reg 1 ] \
                 [ lookup reg 1 set cluster-v6 0x1 ] [ counter ] [ masq ]",
            ),
            (
                // `ip saddr 10.0.0.1 counter ct mark set ct mark and 0xff0000ff or 0x00001100
                // accept`, here with a set lookup instead of the address.
                Rule {
                    counter: true,
                    ..rule(
                        vec![Match::AddrInSet {
                            family: Family::V4,
                            field: AddrField::Saddr,
                            set: "s4".into(),
                            negate: false,
                        }],
                        Action::MarkAccept(CtMarkField {
                            field: 0x00ffff00,
                            value: 0x00001100,
                        }),
                    )
                },
                // [ counter pkts 0 bytes 0 ] [ ct load mark => reg 1 ]
                // [ bitwise reg 1 = ( reg 1 & 0xff0000ff ) ^ 0x00001100 ]
                // [ ct set mark with reg 1 ] [ immediate reg 0 accept ]
                "[ meta load 15 => reg 1 ] [ cmp op0 reg 1 0x00000002 ] \
                 [ payload load 4b @ network header + 12 => reg 1 ] [ lookup reg 1 set s4 ] \
                 [ counter ] [ ct load 3 => reg 1 ] \
                 [ bitwise reg 1 = ( reg 1 & 0xff0000ff ) ^ 0x00001100 ] \
                 [ ct set 3 with reg 1 ] [ immediate reg 0 verdict 1 ]",
            ),
            (
                // `limit rate 10/second burst 5 packets log prefix "weft-drop grp-abc-in " group 7`
                rule(
                    vec![],
                    Action::LogLimited(LogSpec {
                        rate_per_second: 10,
                        burst: 5,
                        group: 7,
                        prefix: "weft-drop grp-abc-in ".into(),
                    }),
                ),
                // [ limit rate 10/second burst 5 type packets flags 0x0 ]
                // [ log prefix weft-drop grp-abc-in  group 7 snaplen 0 qthreshold 0 ]
                "[ limit rate 10/1 burst 5 type 0 flags 0x0 ] \
                 [ log prefix weft-drop grp-abc-in  group 7 ]",
            ),
        ];
        for (rule, want) in cases {
            let got: Vec<String> = lower(&rule)
                .unwrap()
                .iter()
                .map(|e| e.to_string())
                .collect();
            let want: Vec<&str> = want.split("] ").collect();
            let got = got.join(" ");
            assert_eq!(got, want.join("] "), "rule `{rule}`");
        }
    }

    fn every_shape() -> Vec<Rule> {
        let mut rules = Vec::new();
        for family in Family::ALL {
            for field in [AddrField::Saddr, AddrField::Daddr] {
                for negate in [false, true] {
                    rules.push(rule(
                        vec![Match::AddrInSet {
                            family,
                            field,
                            set: "s".into(),
                            negate,
                        }],
                        accept(),
                    ));
                }
                rules.push(rule(
                    vec![],
                    Action::Vmap {
                        family,
                        field,
                        map: "m".into(),
                    },
                ));
            }
            rules.push(rule(
                vec![Match::DestPortInSet {
                    family,
                    set: "np".into(),
                }],
                Action::Verdict(Verdict::Drop),
            ));
            // Masquerade, bare and after the cluster-CIDR matches, with counter and comment.
            rules.push(rule(vec![], Action::Masquerade));
            rules.push(Rule {
                counter: true,
                comment: Some("pods to the outside".into()),
                ..rule(
                    vec![
                        Match::AddrInSet {
                            family,
                            field: AddrField::Saddr,
                            set: "cluster".into(),
                            negate: false,
                        },
                        Match::AddrInSet {
                            family,
                            field: AddrField::Daddr,
                            set: "cluster".into(),
                            negate: true,
                        },
                    ],
                    Action::Masquerade,
                )
            });
            // Matches and a vmap of one family share one guard.
            rules.push(rule(
                vec![
                    Match::AddrInSet {
                        family,
                        field: AddrField::Daddr,
                        set: "s".into(),
                        negate: true,
                    },
                    Match::DestPortInSet {
                        family,
                        set: "np".into(),
                    },
                    Match::AddrInSet {
                        family,
                        field: AddrField::Saddr,
                        set: "s".into(),
                        negate: false,
                    },
                ],
                Action::Vmap {
                    family,
                    field: AddrField::Saddr,
                    map: "m".into(),
                },
            ));
        }
        for protocol in Protocol::ALL {
            rules.push(rule(vec![Match::L4Proto(protocol)], accept()));
            for (first, last) in [(80, 80), (1000, 2000), (0, 65535)] {
                rules.push(Rule {
                    counter: true,
                    comment: Some(format!("{first}-{last}")),
                    ..rule(
                        vec![
                            Match::L4Proto(protocol),
                            Match::DestPort {
                                protocol,
                                first,
                                last,
                            },
                        ],
                        accept(),
                    )
                });
            }
        }
        for (field, value) in [(0x000fff00, 0x000fe600), (0xfff00000, 0x00100000)] {
            rules.push(Rule {
                counter: true,
                comment: Some("ns/p ingress[0] from[0] id=4070".into()),
                ..rule(
                    vec![Match::L4Proto(Protocol::Udp)],
                    Action::MarkAccept(CtMarkField { field, value }),
                )
            });
        }
        rules.push(Rule {
            comment: Some("log denied".into()),
            ..rule(
                vec![],
                Action::LogLimited(LogSpec {
                    rate_per_second: 20,
                    burst: 9,
                    group: 0,
                    prefix: "weft-drop grp-x-in ".into(),
                }),
            )
        });
        rules.push(rule(
            vec![
                Match::IfacePrefix {
                    field: IfaceField::Output,
                    prefix: "weft".into(),
                },
                Match::Ct(CtState::EstablishedRelated),
                Match::FibSaddrIifMissing,
            ],
            Action::Verdict(Verdict::Jump("chain-x".into())),
        ));
        rules
    }

    #[test]
    fn every_rule_shape_is_recognised_back() {
        for r in every_shape() {
            let exprs = lower(&r).unwrap();
            let udata = rule_udata(r.comment.as_deref()).unwrap();
            assert_eq!(
                raise(&exprs, udata.as_deref()),
                Some(r.clone()),
                "rule `{r}`"
            );
        }
    }

    #[test]
    fn anything_but_our_exact_sequence_is_unrecognised() {
        let r = rule(
            vec![Match::DestPort {
                protocol: Protocol::Tcp,
                first: 80,
                last: 80,
            }],
            accept(),
        );
        let good = lower(&r).unwrap();
        // A register changed, a length changed, an extra expression, a missing guard.
        let mut other_reg = good.clone();
        other_reg[2] = dport_payload(2);
        let mut other_len = good.clone();
        other_len[3] = RawExpr::Cmp {
            sreg: REG_1,
            op: cmp_op::EQ,
            data: vec![0, 0, 0, 80],
        };
        let mut extra = good.clone();
        extra.insert(
            4,
            RawExpr::Other {
                name: "log".into(),
                text: "log".into(),
            },
        );
        let no_guard = good[2..].to_vec();
        for exprs in [other_reg, other_len, extra, no_guard] {
            assert_eq!(raise(&exprs, None), None, "{exprs:?}");
        }
        // Unknown userdata TLVs are not ours either.
        assert_eq!(raise(&good, Some(b"\x01\x02ab")), None);
        assert_eq!(raise(&good, None), Some(r));
    }

    #[test]
    fn only_a_bare_final_masq_is_our_masquerade() {
        let masq = rule(vec![], Action::Masquerade);
        assert_eq!(raise(&[RawExpr::Masquerade], None), Some(masq));
        // Something after it, or a masq with flags (read back as a foreign expression).
        let after = [RawExpr::Masquerade, lower_verdict(&Verdict::Accept)];
        let flagged = [RawExpr::Other {
            name: "masq".into(),
            text: "masq flags 0x4".into(),
        }];
        assert_eq!(raise(&after, None), None);
        assert_eq!(raise(&flagged, None), None);
    }

    #[test]
    fn nft_refusals_are_caught_before_the_kernel() {
        let bad_prefix = rule(
            vec![Match::IfacePrefix {
                field: IfaceField::Input,
                prefix: "x".repeat(16),
            }],
            accept(),
        );
        assert!(matches!(
            lower(&bad_prefix),
            Err(LowerError::IfacePrefix(_))
        ));
        assert!(rule_udata(Some("a\"b")).is_err());
        assert!(rule_udata(Some(&"c".repeat(129))).is_err());
        assert_eq!(
            rule_udata(Some(&"c".repeat(128))).unwrap().unwrap().len(),
            131
        );
    }

    #[test]
    fn concat_registers_follow_nft() {
        assert_eq!(
            [0, 1, 2, 4, 5].map(concat_register),
            [1, 9, 10, 2, 13],
            "ipv4 . proto . port uses 1, 9, 10; ipv6 . proto . port uses 1, 2, 13"
        );
    }
}
