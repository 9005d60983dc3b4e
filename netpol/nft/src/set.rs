//! Sets, maps and their elements as nftables stores them: [`RawSet`], [`RawElem`], and the
//! translation to and from weft's [`SetDef`] and [`Key`].
//!
//! Everything here is what `nft` 1.0.6 sends for the same `nft -f` text (pinned in the tests):
//! - key type ids (`ipv4_addr` 7, `ipv6_addr` 8, `inet_proto` 12, `inet_service` 13), a
//!   concatenation as `(t1 << 6 | t2) << 6 | t3` with every field padded to 4 bytes;
//! - set userdata: key byte order, for concatenations a `typeof` marker, for maps the data byte
//!   order and data-interval flag, then the comment;
//! - interval sets (one field): a start element and an end element (`last + 1`, flag
//!   `INTERVAL_END`), none when the range reaches the top of the type, which nft marks with the
//!   element userdata `INTERVAL_OPEN`; a fresh set whose lowest range does not start at zero
//!   first gets nft's `0 [end]` element;
//! - concatenated interval sets: one element with `KEY` and `KEY_END`, `NFT_SET_CONCAT` and the
//!   field lengths (`DESC_CONCAT`).
//!
//! One deviation, invisible to lookups and to [`decode_elements`]: nft also sends the leading
//! `0 [end]` when it fills a set that already exists but is empty; we only know a set is empty
//! when it was created in the same transaction, so a set created empty and filled later has no
//! such element (the kernel's interval lookup does not need it).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use weft_netpol::ruleset::{Key, KeyField, SetDef, Value, Verdict};

use crate::expr::{raise_verdict, verdict_code};
use crate::netlink::udata;

/// `NFT_SET_INTERVAL`
pub const SET_INTERVAL: u32 = 0x4;
/// `NFT_SET_MAP`
pub const SET_MAP: u32 = 0x8;
/// `NFT_SET_CONCAT`
pub const SET_CONCAT: u32 = 0x80;
/// `NFT_DATA_VERDICT`: the data type of a verdict map.
pub const DATA_VERDICT: u32 = 0xffff_ff00;
/// Data length the kernel reports for a verdict map (`sizeof(struct nft_verdict)`).
pub const KERNEL_VERDICT_LEN: u32 = 16;
/// `NFT_SET_ELEM_INTERVAL_END`
pub const ELEM_INTERVAL_END: u32 = 0x1;

/// nft's `TYPE_BITS`: width of one field's type id in a concatenated key type.
const TYPE_BITS: u32 = 6;
/// nft's `BYTEORDER_BIG_ENDIAN`, as stored in set userdata.
const BYTEORDER_BIG_ENDIAN: u32 = 2;
/// nft's `EXPR_CONCAT`, the `typeof` marker of a concatenated `type` key.
const EXPR_CONCAT: u32 = 13;

/// A set or map as nftables describes it (what `NEWSET` carries and a dump returns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSet {
    /// Name.
    pub name: String,
    /// `NFT_SET_*` flags.
    pub flags: u32,
    /// Key type id.
    pub key_type: u32,
    /// Key length in bytes.
    pub key_len: u32,
    /// Data type id (maps only).
    pub data_type: Option<u32>,
    /// Data length (maps only).
    pub data_len: Option<u32>,
    /// Field lengths of a concatenation (`NFTA_SET_DESC_CONCAT`), if sent.
    pub concat: Vec<u32>,
    /// Userdata bytes.
    pub udata: Vec<u8>,
    /// Attributes present that weft never writes (timeout, size, policy, expressions, …).
    pub extra: Vec<&'static str>,
}

/// One element as nftables stores it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RawElem {
    /// Key bytes.
    pub key: Vec<u8>,
    /// End of the range (concatenated interval sets).
    pub key_end: Option<Vec<u8>>,
    /// `NFT_SET_ELEM_*` flags (0: none sent).
    pub flags: u32,
    /// Verdict data: code and chain.
    pub verdict: Option<(i32, Option<String>)>,
    /// Element userdata.
    pub udata: Option<Vec<u8>>,
    /// Attributes present that weft never writes (timeout, expiration, expressions, …).
    pub extra: Vec<&'static str>,
}

impl RawElem {
    fn key(key: Vec<u8>) -> RawElem {
        RawElem {
            key,
            key_end: None,
            flags: 0,
            verdict: None,
            udata: None,
            extra: Vec::new(),
        }
    }
}

/// Why elements cannot be encoded for a set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A key whose shape does not fit itself (range fields of different types, …).
    #[error("element {0}: {1}")]
    Key(String, &'static str),
    /// A set comment nft could not print back.
    #[error("comment {0:?} is longer than 128 bytes or contains '\"' or NUL")]
    Comment(String),
    /// A set definition nft cannot express.
    #[error("set definition: {0}")]
    Def(&'static str),
}

/// nft's type id of a key field.
pub fn type_id(f: KeyField) -> u32 {
    match f {
        KeyField::Ipv4Addr => 7,
        KeyField::Ipv6Addr => 8,
        KeyField::InetProto => 12,
        KeyField::InetService => 13,
    }
}

fn field_from_id(id: u32) -> Option<KeyField> {
    match id {
        7 => Some(KeyField::Ipv4Addr),
        8 => Some(KeyField::Ipv6Addr),
        12 => Some(KeyField::InetProto),
        13 => Some(KeyField::InetService),
        _ => None,
    }
}

/// Bytes of one field value (unpadded).
pub fn field_len(f: KeyField) -> u32 {
    match f {
        KeyField::Ipv4Addr => 4,
        KeyField::Ipv6Addr => 16,
        KeyField::InetProto => 1,
        KeyField::InetService => 2,
    }
}

/// Key type id of a (possibly concatenated) key.
pub fn key_type(key: &[KeyField]) -> u32 {
    key.iter()
        .fold(0, |acc, f| (acc << TYPE_BITS) | type_id(*f))
}

/// Key length: one field unpadded, a concatenation with every field padded to 4 bytes.
pub fn key_len(key: &[KeyField]) -> u32 {
    match key {
        [one] => field_len(*one),
        many => many.iter().map(|f| field_len(*f).next_multiple_of(4)).sum(),
    }
}

/// The fields of a key type id, if every one is a type weft knows.
pub fn fields_of(mut id: u32) -> Option<Vec<KeyField>> {
    let mut out = Vec::new();
    while id != 0 {
        out.push(field_from_id(id & ((1 << TYPE_BITS) - 1))?);
        id >>= TYPE_BITS;
    }
    out.reverse();
    (!out.is_empty()).then_some(out)
}

/// The set userdata nft 1.0.6 writes for this definition.
fn set_udata(def: &SetDef) -> Result<Vec<u8>, EncodeError> {
    let mut buf = Vec::new();
    let key_order = match def.key.as_slice() {
        [KeyField::InetProto] | [] => 0,
        [_] => BYTEORDER_BIG_ENDIAN,
        _ => 0,
    };
    udata::put_u32(&mut buf, udata::SET_KEYBYTEORDER, key_order);
    if def.verdict_map {
        udata::put_u32(&mut buf, udata::SET_DATABYTEORDER, 0);
    }
    if def.key.len() > 1 {
        // Nested: NFTNL_UDATA_SET_TYPEOF_EXPR = EXPR_CONCAT, NFTNL_UDATA_SET_TYPEOF_DATA = {}.
        let mut typeof_ = Vec::new();
        udata::put_u32(&mut typeof_, 0, EXPR_CONCAT);
        let _ = udata::put(&mut typeof_, 1, &[]);
        let _ = udata::put(&mut buf, udata::SET_KEY_TYPEOF, &typeof_);
    }
    if def.verdict_map {
        udata::put_u32(&mut buf, udata::SET_DATA_INTERVAL, 0);
    }
    if let Some(c) = &def.comment {
        crate::expr::check_comment(c).map_err(|_| EncodeError::Comment(c.clone()))?;
        udata::put_strz(&mut buf, udata::SET_COMMENT, c)
            .ok_or_else(|| EncodeError::Comment(c.clone()))?;
    }
    Ok(buf)
}

/// The `NEWSET` description of a set definition, as nft sends it.
pub fn encode_def(def: &SetDef) -> Result<RawSet, EncodeError> {
    if def.key.is_empty() {
        return Err(EncodeError::Def("empty key"));
    }
    let concat_interval = def.interval && def.key.len() > 1;
    let mut flags = 0;
    if def.interval {
        flags |= SET_INTERVAL;
    }
    if def.verdict_map {
        flags |= SET_MAP;
    }
    if concat_interval {
        flags |= SET_CONCAT;
    }
    Ok(RawSet {
        name: def.name.clone(),
        flags,
        key_type: key_type(&def.key),
        key_len: key_len(&def.key),
        data_type: def.verdict_map.then_some(DATA_VERDICT),
        data_len: def.verdict_map.then_some(0),
        concat: if concat_interval {
            def.key.iter().map(|f| field_len(*f)).collect()
        } else {
            Vec::new()
        },
        udata: set_udata(def)?,
        extra: Vec::new(),
    })
}

/// Reads a set definition back; `Err(reason)` if it is not exactly one weft writes.
pub fn decode_def(raw: &RawSet) -> Result<SetDef, String> {
    if let Some(extra) = raw.extra.first() {
        return Err(format!("has {extra}, which weft never sets"));
    }
    let key = fields_of(raw.key_type).ok_or_else(|| format!("key type {}", raw.key_type))?;
    let comment = udata::parse(&raw.udata)
        .ok_or("malformed userdata")?
        .iter()
        .find(|(k, _)| *k == udata::SET_COMMENT)
        .map(|(_, v)| udata::strz(v).ok_or("malformed comment"))
        .transpose()?;
    let def = SetDef {
        name: raw.name.clone(),
        key,
        interval: raw.flags & SET_INTERVAL != 0,
        verdict_map: raw.flags & SET_MAP != 0,
        comment,
    };
    let mut want = encode_def(&def).map_err(|e| e.to_string())?;
    if def.verdict_map {
        // nft sends data length 0 for a verdict map; the kernel stores and reports
        // `sizeof(struct nft_verdict)`.
        want.data_len = Some(KERNEL_VERDICT_LEN);
    }
    if want != *raw {
        return Err(format!(
            "definition differs from weft's (flags {:#x}, key {}/{}, data {:?}/{:?}, concat {:?})",
            raw.flags, raw.key_type, raw.key_len, raw.data_type, raw.data_len, raw.concat
        ));
    }
    Ok(def)
}

/// Bytes of one value, unpadded.
fn value_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::V4(a) => a.octets().to_vec(),
        Value::V6(a) => a.octets().to_vec(),
        Value::Proto(p) => vec![*p],
        Value::Port(p) => p.to_be_bytes().to_vec(),
    }
}

/// Key bytes: one value unpadded, a concatenation with every field padded to 4 bytes.
fn key_bytes(values: &[Value]) -> Vec<u8> {
    match values {
        [one] => value_bytes(one),
        many => {
            let mut out = Vec::new();
            for v in many {
                let mut b = value_bytes(v);
                b.resize(b.len().next_multiple_of(4), 0);
                out.extend(b);
            }
            out
        }
    }
}

/// The value after `v` in its type, `None` at the top (an open interval).
fn successor(v: &Value) -> Option<Value> {
    Some(match v {
        Value::V4(a) => Value::V4(Ipv4Addr::from(u32::from(*a).checked_add(1)?)),
        Value::V6(a) => Value::V6(Ipv6Addr::from(u128::from(*a).checked_add(1)?)),
        Value::Proto(p) => Value::Proto(p.checked_add(1)?),
        Value::Port(p) => Value::Port(p.checked_add(1)?),
    })
}

fn predecessor(v: &Value) -> Option<Value> {
    Some(match v {
        Value::V4(a) => Value::V4(Ipv4Addr::from(u32::from(*a).checked_sub(1)?)),
        Value::V6(a) => Value::V6(Ipv6Addr::from(u128::from(*a).checked_sub(1)?)),
        Value::Proto(p) => Value::Proto(p.checked_sub(1)?),
        Value::Port(p) => Value::Port(p.checked_sub(1)?),
    })
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::V4(a) => a.is_unspecified(),
        Value::V6(a) => a.is_unspecified(),
        Value::Proto(p) => *p == 0,
        Value::Port(p) => *p == 0,
    }
}

fn zero_of(v: &Value) -> Value {
    match v {
        Value::V4(_) => Value::V4(Ipv4Addr::UNSPECIFIED),
        Value::V6(_) => Value::V6(Ipv6Addr::UNSPECIFIED),
        Value::Proto(_) => Value::Proto(0),
        Value::Port(_) => Value::Port(0),
    }
}

fn open_udata() -> Vec<u8> {
    let mut b = Vec::new();
    udata::put_u32(
        &mut b,
        udata::SET_ELEM_FLAGS,
        udata::SET_ELEM_F_INTERVAL_OPEN,
    );
    b
}

fn check_key(key: &Key) -> Result<(), EncodeError> {
    let bad = |why| Err(EncodeError::Key(key.to_string(), why));
    if key.from.is_empty() {
        return bad("empty key");
    }
    if let Some(to) = &key.to {
        if to.len() != key.from.len() {
            return bad("range ends have different lengths");
        }
        for (a, b) in key.from.iter().zip(to) {
            if a.field() != b.field() {
                return bad("range ends of different types");
            }
            if a > b {
                return bad("range starts after its end");
            }
        }
    }
    Ok(())
}

/// Elements to add, as nft sends them (sorted by key; interval sets as start/end pairs).
/// `fresh`: the set was created in this transaction and has no element yet, so nft's leading
/// `0 [end]` element is due if the lowest range does not start at zero.
pub fn encode_add(
    elements: &[(Key, Option<Verdict>)],
    fresh: bool,
) -> Result<Vec<RawElem>, EncodeError> {
    let mut sorted: Vec<&(Key, Option<Verdict>)> = elements.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    for (i, (key, data)) in sorted.into_iter().enumerate() {
        check_key(key)?;
        let verdict = data
            .as_ref()
            .map(|v| verdict_code(v))
            .map(|(c, ch)| (c, ch.map(str::to_string)));
        match (&key.to, key.from.as_slice()) {
            (None, values) => out.push(RawElem {
                verdict,
                ..RawElem::key(key_bytes(values))
            }),
            (Some(to), [from]) => {
                if i == 0 && fresh && !is_zero(from) {
                    out.push(RawElem {
                        flags: ELEM_INTERVAL_END,
                        ..RawElem::key(key_bytes(&[zero_of(from)]))
                    });
                }
                let end = successor(&to[0]);
                out.push(RawElem {
                    verdict,
                    udata: end.is_none().then(open_udata),
                    ..RawElem::key(key_bytes(&[*from]))
                });
                if let Some(end) = end {
                    out.push(RawElem {
                        flags: ELEM_INTERVAL_END,
                        ..RawElem::key(key_bytes(&[end]))
                    });
                }
            }
            (Some(to), from) => out.push(RawElem {
                key_end: Some(key_bytes(to)),
                verdict,
                ..RawElem::key(key_bytes(from))
            }),
        }
    }
    Ok(out)
}

/// Elements to delete: the same keys (and end elements) as [`encode_add`], without data.
pub fn encode_delete(keys: &[Key]) -> Result<Vec<RawElem>, EncodeError> {
    let mut out = Vec::new();
    for key in keys {
        check_key(key)?;
        match (&key.to, key.from.as_slice()) {
            (None, values) => out.push(RawElem::key(key_bytes(values))),
            (Some(to), [from]) => {
                out.push(RawElem::key(key_bytes(&[*from])));
                if let Some(end) = successor(&to[0]) {
                    out.push(RawElem {
                        flags: ELEM_INTERVAL_END,
                        ..RawElem::key(key_bytes(&[end]))
                    });
                }
            }
            (Some(to), from) => out.push(RawElem {
                key_end: Some(key_bytes(to)),
                ..RawElem::key(key_bytes(from))
            }),
        }
    }
    Ok(out)
}

/// Reads the values of key bytes for these fields; `None` if the length does not fit.
fn decode_key(fields: &[KeyField], bytes: &[u8]) -> Option<Vec<Value>> {
    let padded = fields.len() > 1;
    let mut out = Vec::new();
    let mut rest = bytes;
    for f in fields {
        let len = field_len(*f) as usize;
        let step = if padded { len.next_multiple_of(4) } else { len };
        let b = rest.get(..len)?;
        if rest.get(len..step)?.iter().any(|x| *x != 0) {
            return None;
        }
        out.push(match f {
            KeyField::Ipv4Addr => Value::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?)),
            KeyField::Ipv6Addr => Value::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?)),
            KeyField::InetProto => Value::Proto(b[0]),
            KeyField::InetService => Value::Port(u16::from_be_bytes(b.try_into().ok()?)),
        });
        rest = &rest[step..];
    }
    rest.is_empty().then_some(out)
}

fn top_of(v: &Value) -> Value {
    match v {
        Value::V4(_) => Value::V4(Ipv4Addr::from(u32::MAX)),
        Value::V6(_) => Value::V6(Ipv6Addr::from(u128::MAX)),
        Value::Proto(_) => Value::Proto(u8::MAX),
        Value::Port(_) => Value::Port(u16::MAX),
    }
}

/// Reassembles a set's elements from a dump into weft's keys; `Err(reason)` if some element is
/// not one weft writes. Interval sets come back as raw boundaries in any order: a start element
/// and the end element after it (`last + 1`) become one inclusive range; a start without end
/// reaches the top; an end that closes nothing (nft's leading `0 [end]`) is dropped.
pub fn decode_elements(
    def: &SetDef,
    raw: &[RawElem],
) -> Result<BTreeMap<Key, Option<Verdict>>, String> {
    let mut out = BTreeMap::new();
    let data_of = |e: &RawElem| -> Result<Option<Verdict>, String> {
        match (&e.verdict, def.verdict_map) {
            (None, false) => Ok(None),
            (Some((code, chain)), true) => raise_verdict(*code, chain.as_deref())
                .map(Some)
                .ok_or_else(|| format!("verdict {code} is not one weft writes")),
            _ => Err("element data does not fit the set".into()),
        }
    };
    let key_of = |bytes: &[u8]| {
        decode_key(&def.key, bytes).ok_or_else(|| format!("key {bytes:02x?} does not fit"))
    };
    for e in raw {
        if let Some(extra) = e.extra.first() {
            return Err(format!("element has {extra}, which weft never sets"));
        }
        if e.flags & !ELEM_INTERVAL_END != 0 {
            return Err(format!("element flags {:#x}", e.flags));
        }
    }
    if !def.interval || def.key.len() > 1 {
        for e in raw {
            if e.flags != 0 || e.udata.is_some() || e.key_end.is_some() != def.interval {
                return Err("element shape does not fit the set".into());
            }
            let from = key_of(&e.key)?;
            let key = match &e.key_end {
                None => Key::point(from),
                Some(end) => Key::range(from, key_of(end)?),
            };
            out.insert(key, data_of(e)?);
        }
        return Ok(out);
    }
    // One-field interval set: sort boundaries, ends before starts at the same value.
    let mut bounds = Vec::new();
    for e in raw {
        let v = key_of(&e.key)?[0];
        let is_end = e.flags & ELEM_INTERVAL_END != 0;
        if e.key_end.is_some() || (is_end && (e.verdict.is_some() || e.udata.is_some())) {
            return Err("interval element shape does not fit the set".into());
        }
        bounds.push((v, !is_end, e));
    }
    bounds.sort_by_key(|b| (b.0, b.1));
    let mut open: Option<(Value, &RawElem)> = None;
    for (v, is_start, e) in bounds {
        match (is_start, open.take()) {
            (true, None) => open = Some((v, e)),
            (true, Some(_)) => return Err(format!("interval start {v} inside another range")),
            (false, None) => {
                if !is_zero(&v) {
                    return Err(format!("interval end {v} closes nothing"));
                }
            }
            (false, Some((start, se))) => {
                if se.udata.is_some() {
                    return Err("closed interval marked open".into());
                }
                let last = predecessor(&v).ok_or("interval end at zero after a start")?;
                out.insert(Key::range(vec![start], vec![last]), data_of(se)?);
            }
        }
    }
    if let Some((start, se)) = open {
        if se.udata.as_deref() != Some(&open_udata()[..]) {
            return Err(format!("interval from {start} has no end"));
        }
        out.insert(Key::range(vec![start], vec![top_of(&start)]), data_of(se)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(key: Vec<KeyField>, interval: bool, verdict_map: bool) -> SetDef {
        SetDef {
            name: "s".into(),
            key,
            interval,
            verdict_map,
            comment: None,
        }
    }

    fn v4(s: &str) -> Value {
        Value::V4(s.parse().unwrap())
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn set_definitions_are_what_nft_sends() {
        use KeyField::*;
        // (key, interval, map, comment) → (flags, key type, key len, udata) from nft --debug=mnl.
        let cases = [
            (
                vec![Ipv4Addr],
                false,
                false,
                Some("pods"),
                0,
                7,
                4,
                "0004020000000705706f647300",
            ),
            (vec![Ipv6Addr], true, false, None, 4, 8, 16, "000402000000"),
            (
                vec![InetService],
                false,
                false,
                None,
                0,
                13,
                2,
                "000402000000",
            ),
            (
                vec![InetProto],
                false,
                false,
                None,
                0,
                12,
                1,
                "000400000000",
            ),
            (
                vec![Ipv4Addr, InetProto, InetService],
                false,
                false,
                None,
                0,
                29453,
                12,
                "000400000000030800040d0000000100",
            ),
            (
                vec![Ipv6Addr, InetProto, InetService],
                false,
                false,
                None,
                0,
                0x830d,
                24,
                "000400000000030800040d0000000100",
            ),
            (
                vec![InetProto, InetService],
                true,
                false,
                None,
                0x84,
                0x30d,
                8,
                "000400000000030800040d0000000100",
            ),
            (
                vec![Ipv4Addr],
                false,
                true,
                Some("disp"),
                8,
                7,
                4,
                "00040200000001040000000006040000000007056469737000",
            ),
            (
                vec![Ipv4Addr, InetProto],
                false,
                true,
                None,
                8,
                0x1cc,
                8,
                "000400000000010400000000030800040d0000000100060400000000",
            ),
        ];
        for (key, interval, map, comment, flags, ktype, klen, ud) in cases {
            let d = SetDef {
                comment: comment.map(String::from),
                ..def(key.clone(), interval, map)
            };
            let raw = encode_def(&d).unwrap();
            assert_eq!(
                (raw.flags, raw.key_type, raw.key_len, hex(&raw.udata)),
                (flags, ktype, klen, ud.to_string()),
                "{key:?}"
            );
            assert_eq!(raw.data_type, map.then_some(DATA_VERDICT));
            let mut dumped = raw.clone();
            if map {
                assert_eq!(raw.data_len, Some(0), "nft sends 0");
                dumped.data_len = Some(KERNEL_VERDICT_LEN);
            }
            assert_eq!(decode_def(&dumped), Ok(d));
        }
        let pr = encode_def(&def(vec![InetProto, InetService], true, false)).unwrap();
        assert_eq!(pr.concat, vec![1, 2]);
    }

    #[test]
    fn a_set_with_anything_extra_is_not_ours() {
        let mut raw = encode_def(&def(vec![KeyField::Ipv4Addr], false, false)).unwrap();
        raw.flags |= 0x10; // timeout
        assert!(decode_def(&raw).is_err());
        let mut raw = encode_def(&def(vec![KeyField::Ipv4Addr], false, false)).unwrap();
        raw.extra.push("size");
        assert!(decode_def(&raw).is_err());
        let mut raw = encode_def(&def(vec![KeyField::Ipv4Addr], false, false)).unwrap();
        raw.key_type = 9; // ether_addr
        assert!(decode_def(&raw).is_err());
    }

    fn range(a: &str, b: &str) -> Key {
        Key::range(vec![v4(a)], vec![v4(b)])
    }

    #[test]
    fn interval_elements_are_sent_as_nft_sends_them() {
        // `add element c4 { 10.9.0.0/16, 10.10.0.5, 10.11.0.1-10.11.0.3, 255.255.255.0/24 }`
        // into a fresh set: nft sends 0.0.0.0 [end] first, and nothing after the last range
        // but the open-interval userdata.
        let els = vec![
            (range("255.255.255.0", "255.255.255.255"), None),
            (range("10.9.0.0", "10.9.255.255"), None),
            (range("10.10.0.5", "10.10.0.5"), None),
            (range("10.11.0.1", "10.11.0.3"), None),
        ];
        let raw = encode_add(&els, true).unwrap();
        let got: Vec<String> = raw
            .iter()
            .map(|e| {
                format!(
                    "{}{}{}",
                    hex(&e.key),
                    if e.flags == 1 { " end" } else { "" },
                    if e.udata.is_some() { " open" } else { "" }
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                "00000000 end",
                "0a090000",
                "0a0a0000 end",
                "0a0a0005",
                "0a0a0006 end",
                "0a0b0001",
                "0a0b0004 end",
                "ffffff00 open"
            ]
        );
        // Into a set that already has elements: no leading marker.
        assert_eq!(encode_add(&els, false).unwrap().len(), 7);
        // A range starting at zero needs no marker either.
        let zero = encode_add(&[(range("0.0.0.0", "0.255.255.255"), None)], true).unwrap();
        assert_eq!(zero.len(), 2);
        // Reassembly (in the kernel's reverse order) drops the marker and closes the ranges.
        let mut rev = raw.clone();
        rev.reverse();
        let d = def(vec![KeyField::Ipv4Addr], true, false);
        let back = decode_elements(&d, &rev).unwrap();
        let want: BTreeMap<Key, Option<Verdict>> = els.into_iter().collect();
        assert_eq!(back, want);
    }

    #[test]
    fn deletes_name_the_same_boundaries() {
        let del = encode_delete(&[range("10.9.0.0", "10.9.255.255")]).unwrap();
        assert_eq!(del.len(), 2);
        assert_eq!((hex(&del[1].key), del[1].flags), ("0a0a0000".into(), 1));
    }

    #[test]
    fn adjacent_ranges_reassemble_separately() {
        let d = def(vec![KeyField::Ipv4Addr], true, false);
        let els = vec![
            (range("10.0.0.0", "10.0.0.255"), None),
            (range("10.0.1.0", "10.0.1.255"), None),
        ];
        let raw = encode_add(&els, true).unwrap();
        assert_eq!(
            decode_elements(&d, &raw).unwrap(),
            els.into_iter().collect()
        );
    }

    #[test]
    fn concatenated_keys_are_padded_and_ranges_use_key_end() {
        let key = Key::point(vec![v4("10.0.0.1"), Value::Proto(6), Value::Port(80)]);
        let raw = encode_add(&[(key.clone(), None)], true).unwrap();
        assert_eq!(
            hex(&raw[0].key),
            "0a000001060000000050".to_string() + "0000"
        );
        let d = def(
            vec![
                KeyField::Ipv4Addr,
                KeyField::InetProto,
                KeyField::InetService,
            ],
            false,
            false,
        );
        assert_eq!(
            decode_elements(&d, &raw).unwrap().into_keys().next(),
            Some(key)
        );

        let pr = Key::range(
            vec![Value::Proto(6), Value::Port(1000)],
            vec![Value::Proto(6), Value::Port(2000)],
        );
        let raw = encode_add(&[(pr.clone(), None)], true).unwrap();
        assert_eq!(raw.len(), 1);
        assert_eq!(hex(&raw[0].key), "0600000003e80000");
        assert_eq!(hex(raw[0].key_end.as_ref().unwrap()), "0600000007d00000");
        let d = def(
            vec![KeyField::InetProto, KeyField::InetService],
            true,
            false,
        );
        assert_eq!(
            decode_elements(&d, &raw).unwrap().into_keys().next(),
            Some(pr)
        );
    }

    #[test]
    fn verdict_map_elements_carry_the_verdict_on_starts_only() {
        let d = def(vec![KeyField::Ipv4Addr], true, true);
        let els = vec![
            (
                range("10.0.0.0", "10.255.255.255"),
                Some(Verdict::Jump("j".into())),
            ),
            (range("11.0.0.1", "11.0.0.1"), Some(Verdict::Accept)),
        ];
        let raw = encode_add(&els, true).unwrap();
        let with_data: Vec<bool> = raw.iter().map(|e| e.verdict.is_some()).collect();
        assert_eq!(with_data, [false, true, false, true, false]);
        assert_eq!(
            decode_elements(&d, &raw).unwrap(),
            els.into_iter().collect()
        );
        // A goto is not a verdict weft writes.
        let mut bad = raw.clone();
        bad[1].verdict = Some((-4, Some("j".into())));
        assert!(decode_elements(&d, &bad).is_err());
    }

    #[test]
    fn whole_ipv6_space_is_one_open_element() {
        let d = def(vec![KeyField::Ipv6Addr], true, false);
        let all = Key::range(
            vec![Value::V6(Ipv6Addr::UNSPECIFIED)],
            vec![Value::V6(Ipv6Addr::from(u128::MAX))],
        );
        let raw = encode_add(&[(all.clone(), None)], true).unwrap();
        assert_eq!(raw.len(), 1);
        assert_eq!(hex(raw[0].udata.as_ref().unwrap()), "010401000000");
        assert_eq!(
            decode_elements(&d, &raw).unwrap().into_keys().next(),
            Some(all)
        );
    }

    #[test]
    fn malformed_element_layouts_are_refused() {
        let d = def(vec![KeyField::Ipv4Addr], true, false);
        let start = RawElem::key(vec![10, 0, 0, 0]);
        // A start without end and without the open marker.
        assert!(decode_elements(&d, std::slice::from_ref(&start)).is_err());
        // An end that is not zero and closes nothing.
        let end = RawElem {
            flags: ELEM_INTERVAL_END,
            ..RawElem::key(vec![10, 0, 0, 0])
        };
        assert!(decode_elements(&d, &[end]).is_err());
        // A key of the wrong length.
        let plain = def(vec![KeyField::Ipv4Addr], false, false);
        assert!(decode_elements(&plain, &[RawElem::key(vec![1, 2, 3])]).is_err());
    }
}
