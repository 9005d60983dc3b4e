//! The operator's tools: `weft status [--drops]`, `weft explain`, `weft audit`, `weft flows`,
//! `weft cleanup`, `weft version`.
//!
//! `status`, `explain` and `audit` ask the node's running agent over its root-only unix socket
//! (plain HTTP GET); `flows`, the counters of `status --drops` and `cleanup` read the kernel
//! directly (conntrack and weft's table), so they answer with the agent down too. Output is
//! for people; every command that prints takes `--json` for scripts. Exit codes: 0 fine, 1 the
//! answer reports a problem (denied connection explained with a mismatch, drift), 2 the
//! question could not be answered (no agent, bad arguments), with one line on stderr saying
//! what to do.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// `println!` that gives up quietly when stdout is closed (`weft flows | head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// One GET over the agent's socket: (status, body).
pub fn get(socket: &Path, path: &str) -> Result<(u16, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the weft agent at {} ({e}): start the agent on this node (the weft DaemonSet pod) or give its socket with --socket",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: weft\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("malformed answer from the agent: {head:?}"))?;
    Ok((status, body.to_string()))
}

fn finish(result: Result<(u16, String), String>) -> ExitCode {
    match result {
        Ok((200, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((409, body)) => {
            print!("{body}");
            ExitCode::from(1)
        }
        Ok((_, body)) => {
            eprint!("weft: {body}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("weft: {e}");
            ExitCode::from(2)
        }
    }
}

/// `weft version [--json]`.
pub fn version(json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "nft_schema": weft_netpol::ruleset::SCHEMA_VERSION,
            })
        );
    } else {
        println!("weft {}", crate::VERSION.as_str());
    }
    ExitCode::SUCCESS
}

/// Prints an agent's text answer as JSON: `{ "problem", "answer" }` plus `extra`.
fn finish_json(
    result: Result<(u16, String), String>,
    extra: impl FnOnce(&str, bool) -> serde_json::Value,
) -> ExitCode {
    match result {
        Ok((code @ (200 | 409), body)) => {
            let problem = code == 409;
            let mut v = extra(&body, problem);
            v["problem"] = problem.into();
            v["answer"] = body.into();
            println!("{v}");
            ExitCode::from(u8::from(problem))
        }
        Ok((_, body)) => {
            eprint!("weft: {body}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("weft: {e}");
            ExitCode::from(2)
        }
    }
}

/// `weft explain SRC DST [PORT/PROTO] [--json]`.
pub fn explain(socket: &Path, src: &str, dst: &str, port_proto: &str, json: bool) -> ExitCode {
    let (port, proto) = port_proto.split_once('/').unwrap_or((port_proto, "tcp"));
    let Ok(port_number) = port.parse::<u16>() else {
        eprintln!("weft explain: {port_proto:?}: expected PORT or PORT/PROTO, e.g. 8080/tcp");
        return ExitCode::from(2);
    };
    let enc = |s: &str| s.replace('/', "%2F");
    let answer = get(
        socket,
        &format!(
            "/explain?src={}&dst={}&port={port}&proto={proto}",
            enc(src),
            enc(dst)
        ),
    );
    if !json {
        return finish(answer);
    }
    finish_json(answer, |body, _| {
        // The first line ends with the verdict (agent/query.rs writes it).
        let first = body.lines().next().unwrap_or("");
        serde_json::json!({
            "src": src,
            "dst": dst,
            "port": port_number,
            "protocol": proto.to_ascii_lowercase(),
            "allowed": first.ends_with(": ALLOWED"),
        })
    })
}

/// `weft audit [--repair] [--json]`.
pub fn audit(socket: &Path, repair: bool, json: bool) -> ExitCode {
    let answer = get(socket, if repair { "/audit?repair=1" } else { "/audit" });
    if !json {
        return finish(answer);
    }
    finish_json(answer, |body, problem| {
        // One op a line, indented, after the heading (agent/query.rs writes it).
        let ops: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("  ")).collect();
        serde_json::json!({
            "clean": !problem,
            "repaired": repair && problem,
            "ops": ops,
        })
    })
}

/// `weft status [--json]`.
pub fn status(socket: &Path, json: bool) -> ExitCode {
    let (code, body) = match get(socket, "/debug/state") {
        Ok(x) => x,
        Err(e) => {
            eprintln!("weft: {e}");
            return ExitCode::from(2);
        }
    };
    if json || code != 200 {
        print!("{body}");
        return if code == 200 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        };
    }
    let v: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("weft: the agent's state is not JSON: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "node {}: {}",
        v["node"].as_str().unwrap_or("?"),
        if v["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "NOT READY"
        }
    );
    println!(
        "{:<16} {:>7} {:>9} {:>10} {:>9}  applied resourceVersion",
        "watch", "listed", "restarts", "last event", "down"
    );
    if let Some(kinds) = v["kinds"].as_object() {
        for (kind, k) in kinds {
            println!(
                "{:<16} {:>7} {:>9} {:>9.1}s {:>9}  {}",
                kind,
                k["listed"].as_bool().unwrap_or(false),
                k["restarts"].as_u64().unwrap_or(0),
                k["last_event_age_seconds"].as_f64().unwrap_or(f64::NAN),
                k["down_seconds"]
                    .as_f64()
                    .map_or("-".to_string(), |d| format!("{d:.0}s")),
                k["applied_resource_version"].as_str().unwrap_or("")
            );
        }
    }
    let t = &v["table"];
    println!(
        "table inet weft (schema {}): {} sets/maps, {} elements, {} chains, {} rules",
        weft_netpol::ruleset::SCHEMA_VERSION,
        t["sets"],
        t["elements"],
        t["chains"],
        t["rules"]
    );
    println!("{}", enforced_line(&v["enforced"]));
    match v["object_errors"].as_object() {
        Some(errs) if !errs.is_empty() => {
            println!("objects with problems (enforced fail-closed):");
            for (obj, list) in errs {
                for e in list.as_array().into_iter().flatten() {
                    println!("  {obj}: {}", e.as_str().unwrap_or(""));
                }
            }
        }
        _ => println!("no object errors"),
    }
    println!("{}", modes_line(&v["modes"]));
    for line in mesh_lines(&v["mesh"]) {
        println!("{line}");
    }
    ExitCode::SUCCESS
}

/// `enforcing: …` of `weft status`: policies and pods.
fn enforced_line(e: &serde_json::Value) -> String {
    if e.is_null() {
        return "enforcing: (not reported by this agent)".into();
    }
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    format!(
        "enforcing: {} of {} policies have rules here; {} pods known, local pod addresses {} IPv4 + {} IPv6 ({} isolated for ingress, {} for egress)",
        n(&e["policies_here"]),
        n(&e["policies"]),
        n(&e["pods"]),
        n(&e["local_addresses"][0]),
        n(&e["local_addresses"][1]),
        n(&e["isolated_addresses"][0]),
        n(&e["isolated_addresses"][1]),
    )
}

/// `modes: …` of `weft status`: marks, strict conntrack, drop log.
fn modes_line(m: &serde_json::Value) -> String {
    if m.is_null() {
        return "modes: (not reported by this agent)".into();
    }
    let marks = match m["ct_marks"]
        .as_array()
        .map(|a| (a[0].as_u64(), a[1].as_u64()))
    {
        Some((Some(shift), Some(bits))) => format!(
            "conntrack marks: ingress rule ids in bits {}-{}, egress {}-{} (weft flows)",
            shift,
            shift + bits - 1,
            shift + bits,
            shift + 2 * bits - 1
        ),
        _ => "conntrack marks off".into(),
    };
    let strict = if m["strict_conntrack"].as_bool() == Some(true) {
        "strict conntrack on (flows a tightened policy no longer admits are cut)"
    } else {
        "strict conntrack off (established flows keep going)"
    };
    let drops = match m["log_drops"]
        .as_array()
        .map(|a| (a[0].as_u64(), a[1].as_u64()))
    {
        Some((Some(group), Some(rate))) => {
            format!(
                "drop log on (nflog group {group}, {rate}/s per group chain; weft status --drops)"
            )
        }
        _ => "drop log off".into(),
    };
    format!("modes: {marks}; {strict}; {drops}")
}

/// The mesh part of `weft status`: this node's side, then one line per peer.
fn mesh_lines(m: &serde_json::Value) -> Vec<String> {
    if m.is_null() {
        return vec!["mesh: off (no cluster secret)".into()];
    }
    let e = &m["encryption"];
    let encryption = if e["enabled"].as_bool() == Some(true) {
        format!(
            "encryption on ({}, {})",
            e["backend"].as_str().unwrap_or("?"),
            match (e["ready"].as_bool(), e["problem"].as_str()) {
                (Some(true), _) => "ready".to_string(),
                (_, Some(p)) => format!("NOT READY: {p}"),
                _ => "NOT READY".to_string(),
            }
        )
    } else {
        "encryption off".into()
    };
    let mut out = vec![format!(
        "mesh: port {}, identity {}, {encryption}",
        m["port"],
        if m["identity_published"].as_bool() == Some(true) {
            "published on the Node"
        } else {
            "NOT YET PUBLISHED on the Node"
        }
    )];
    let peers = m["peers"].as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        out.push("  no peers".into());
        return out;
    }
    out.push(format!(
        "  {:<20} {:<16} {:<12} {:<16} {:<10} {}",
        "peer", "address", "state", "path", "pods via", "last handshake"
    ));
    for p in peers {
        let state = match p["refused"].as_str() {
            Some(why) => format!("{} ({why})", p["state"].as_str().unwrap_or("?")),
            None => p["state"].as_str().unwrap_or("?").to_string(),
        };
        out.push(format!(
            "  {:<20} {:<16} {:<12} {:<16} {:<10} {}",
            p["name"].as_str().unwrap_or("?"),
            p["address"].as_str().unwrap_or("-"),
            state,
            p["path"].as_str().unwrap_or("?"),
            p["encryption"].as_str().unwrap_or("?"),
            p["last_handshake_age_seconds"]
                .as_f64()
                .map_or("never".to_string(), |s| format!("{s:.1}s ago"))
        ));
        if let Some(problem) = p["wireguard_problem"].as_str() {
            out.push(format!("    WIREGUARD: {problem}"));
        }
    }
    out
}

/// Reads weft's table from the kernel of this node (for the commands that need no agent).
fn kernel_table(table: &str) -> Result<weft_netpol::Ruleset, String> {
    let nft = weft_nft::thread::NftThread::spawn()
        .map_err(|e| format!("cannot read nftables (run as root on the node): {e}"))?;
    nft.dump(table)
        .map_err(|e| format!("reading table inet {table}: {e}"))?
        .ok_or_else(|| {
            format!("no table inet {table} on this node: is the weft agent running here?")
        })
}

/// The rule-id fields of the table's mark writes: `(field bits, "ingress" | "egress")`, and
/// `(field, value) → rule comments` (ids may collide: all of them).
type MarkTable = (Vec<(u32, &'static str)>, BTreeMap<(u32, u32), Vec<String>>);

fn mark_table(rs: &weft_netpol::Ruleset) -> MarkTable {
    use weft_netpol::ruleset::Action;
    let mut fields = Vec::new();
    let mut ids: BTreeMap<(u32, u32), Vec<String>> = BTreeMap::new();
    for chain in rs.chains.values() {
        let direction = if chain.def.name.ends_with("-in") {
            "ingress"
        } else {
            "egress"
        };
        for r in &chain.rules {
            if let Action::MarkAccept(m) = r.action {
                if !fields.iter().any(|(f, _)| *f == m.field) {
                    fields.push((m.field, direction));
                }
                let list = ids.entry((m.field, m.value)).or_default();
                let c = r.comment.clone().unwrap_or_default();
                if !list.contains(&c) {
                    list.push(c);
                }
            }
        }
    }
    // A table may write only one direction's field (e.g. egress isolation without rules):
    // the layout puts egress right above ingress, with fields of the same width.
    if fields.len() == 1 {
        let (f, d) = fields[0];
        let bits = f.count_ones();
        let other = if d == "ingress" {
            (f.checked_shl(bits).unwrap_or(0), "egress")
        } else {
            (f >> bits, "ingress")
        };
        if other.0 != 0 {
            fields.push(other);
        }
    }
    fields.sort_by_key(|(_, d)| *d != "ingress");
    (fields, ids)
}

fn proto_name(p: u8) -> String {
    match weft_netpol::ruleset::Protocol::from_number(p) {
        Some(p) => p.keyword().to_string(),
        None if p == 1 => "icmp".into(),
        None if p == 58 => "icmpv6".into(),
        None => p.to_string(),
    }
}

/// `weft flows [--json] [--all]`: live conntrack entries with the rules that admitted them.
pub fn flows(table: &str, json: bool, all: bool) -> ExitCode {
    let rs = match kernel_table(table) {
        Ok(rs) => rs,
        Err(e) => {
            eprintln!("weft flows: {e}");
            return ExitCode::from(2);
        }
    };
    let entries = match weft_nft::conntrack::Conntrack::open().and_then(|mut ct| ct.dump()) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("weft flows: reading conntrack (run as root on the node): {e}");
            return ExitCode::from(2);
        }
    };
    let (fields, shown, out) = flow_rows(&rs, &entries, all);
    if json {
        outln!(
            "{}",
            serde_json::json!({ "marks": !fields.is_empty(), "flows": out })
        );
        return ExitCode::SUCCESS;
    }
    print_flows(&fields, &shown, &out, all);
    ExitCode::SUCCESS
}

/// The flows to show (local pods' unless `all`), each as JSON with, per direction, the rule
/// that admitted it or why none did; also the mark fields and the entries shown.
fn flow_rows<'a>(
    rs: &weft_netpol::Ruleset,
    entries: &'a [weft_nft::conntrack::Entry],
    all: bool,
) -> (
    Vec<(u32, &'static str)>,
    Vec<&'a weft_nft::conntrack::Entry>,
    Vec<serde_json::Value>,
) {
    let local: BTreeSet<IpAddr> = weft_netpol::ruleset::Family::ALL
        .into_iter()
        .filter_map(|f| rs.sets.get(&weft_netpol::compile::names::pods_local(f)))
        .flat_map(|s| s.elements.keys())
        .filter_map(|k| match k.from.first() {
            Some(weft_netpol::ruleset::Value::V4(a)) => Some(IpAddr::V4(*a)),
            Some(weft_netpol::ruleset::Value::V6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        })
        .collect();
    let (fields, ids) = mark_table(rs);
    // Isolated local pods: the keys of the dispatch maps, per direction.
    let isolated = |direction: &str, ip: IpAddr| -> bool {
        use weft_netpol::model::Direction;
        let d = if direction == "ingress" {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let f = weft_netpol::model::family_of(ip);
        let key = weft_netpol::ruleset::Key::point(vec![weft_netpol::compile::addr_value(ip)]);
        rs.sets
            .get(&weft_netpol::compile::dispatch_map(d, f))
            .is_some_and(|m| m.elements.contains_key(&key))
    };
    let mut out = Vec::new();
    let mut shown = Vec::new();
    for e in entries {
        let (src, dst, _, _) = e.judged();
        if !all && !local.contains(&src) && !local.contains(&dst) {
            continue;
        }
        shown.push(e);
        let mut admitted = serde_json::Map::new();
        for (field, direction) in &fields {
            let value = e.mark & field;
            // Whose direction this is: the destination's ingress, the source's egress.
            let subject = if *direction == "ingress" { dst } else { src };
            let v = if value == 0 {
                let why = if !local.contains(&subject) {
                    "not a pod of this node: its own node judges it"
                } else if isolated(direction, subject) {
                    "admitted before the pod was isolated; kept since (default mode; --strict-conntrack cuts what the policies no longer admit)"
                } else {
                    "not isolated"
                };
                serde_json::json!({ "id": 0, "rules": [], "why": why })
            } else {
                serde_json::json!({
                    "id": value >> field.trailing_zeros(),
                    "rules": ids.get(&(*field, value)).cloned().unwrap_or_default(),
                })
            };
            admitted.insert((*direction).to_string(), v);
        }
        out.push(serde_json::json!({
            "protocol": proto_name(e.orig.proto),
            "state": e.tcp_state_name(),
            "src": e.orig.src.to_string(),
            "sport": e.orig.sport,
            "dst": e.orig.dst.to_string(),
            "dport": e.orig.dport,
            "translated_dst": (e.reply.src != e.orig.dst).then(|| e.reply.src.to_string()),
            "translated_dport": (e.reply.src != e.orig.dst).then_some(e.reply.sport).flatten(),
            "mark": e.mark,
            "timeout_seconds": e.timeout,
            "admitted_by": admitted,
        }));
    }
    (fields, shown, out)
}

fn print_flows(
    fields: &[(u32, &'static str)],
    shown: &[&weft_nft::conntrack::Entry],
    out: &[serde_json::Value],
    all: bool,
) {
    if fields.is_empty() {
        outln!(
            "note: this table writes no conntrack marks (agent flag --ct-mark-bits 0): flows are listed without their rules"
        );
    }
    outln!(
        "{} flow(s){}; per direction, the rule of this node that admitted it (- when none did, and why)",
        out.len(),
        if all { "" } else { " of local pods" }
    );
    for (f, e) in out.iter().zip(shown) {
        let nat = match (&f["translated_dst"], e.reply.sport) {
            (serde_json::Value::String(d), Some(p)) => format!(" (to {d}:{p})"),
            (serde_json::Value::String(d), None) => format!(" (to {d})"),
            _ => String::new(),
        };
        outln!(
            "{:<6} {:<12} {}{nat}",
            proto_name(e.orig.proto),
            e.tcp_state_name().unwrap_or("-"),
            e.orig
        );
        for (_, direction) in fields {
            let v = &f["admitted_by"][*direction];
            let line = match v["why"].as_str() {
                Some(why) => format!("- ({why})"),
                None => {
                    let rules: Vec<String> = v["rules"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r.as_str().map(str::to_string))
                        .collect();
                    match rules.len() {
                        0 => format!("rule id {} (no such rule any more)", v["id"]),
                        1 => rules[0].clone(),
                        _ => format!("one of: {}", rules.join(" | ")),
                    }
                }
            };
            outln!("         {direction:<8} {line}");
        }
    }
}

/// `weft status --drops [--json]`: the drop log's recent entries and the per-rule counters,
/// with the isolating policies.
pub fn drops(socket: &Path, table: &str, json: bool) -> ExitCode {
    use crate::agent::drops::{DropFile, file_for};
    // The drop log is the agent's: say so clearly when it is not there.
    if let Err(e) = get(socket, "/healthz") {
        eprintln!("weft status --drops: {e}");
        return ExitCode::from(2);
    }
    let rs = match kernel_table(table) {
        Ok(rs) => rs,
        Err(e) => {
            eprintln!("weft status --drops: {e}");
            return ExitCode::from(2);
        }
    };
    let counters = match weft_nft::counters::rule_counters(table) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weft status --drops: reading the rule counters (run as root): {e}");
            return ExitCode::from(2);
        }
    };
    let path = file_for(socket);
    let log: Option<DropFile> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    // group chain → its drop rule's comment ("ingress isolated by ns/a, ns/b: no rule allows").
    let isolating = |chain: &str| -> String {
        rs.chains
            .get(chain)
            .and_then(|c| c.rules.last())
            .and_then(|r| r.comment.clone())
            .unwrap_or_else(|| format!("{chain} (gone from the table)"))
    };
    let drop_counters: Vec<_> = counters
        .iter()
        .filter(|c| c.chain.starts_with("grp-"))
        .collect();
    let accept_counters: Vec<_> = counters
        .iter()
        .filter(|c| c.chain.starts_with("pol-"))
        .collect();
    let base_counters: Vec<_> = counters
        .iter()
        .filter(|c| !c.chain.starts_with("grp-") && !c.chain.starts_with("pol-"))
        .collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if json {
        let counter = |c: &&weft_nft::counters::RuleCounter| {
            serde_json::json!({
                "chain": c.chain, "comment": c.comment, "packets": c.packets, "bytes": c.bytes,
            })
        };
        let recent: Vec<serde_json::Value> = log
            .iter()
            .flat_map(|l| &l.recent)
            .map(|r| {
                serde_json::json!({
                    "at_ms": r.at_ms, "group_chain": r.group_chain,
                    "isolated_by": isolating(&r.group_chain),
                    "protocol": proto_name(r.proto), "src": r.src, "sport": r.sport,
                    "dst": r.dst, "dport": r.dport,
                })
            })
            .collect();
        outln!(
            "{}",
            serde_json::json!({
                "drop_log": log.as_ref().map(|l| serde_json::json!({
                    "group": l.group, "total": l.total, "recent": recent,
                })),
                "group_drops": drop_counters.iter().map(counter).collect::<Vec<_>>(),
                "policy_accepts": accept_counters.iter().map(counter).collect::<Vec<_>>(),
                "base_chain_counters": base_counters.iter().map(counter).collect::<Vec<_>>(),
            })
        );
        return ExitCode::SUCCESS;
    }
    match &log {
        None => outln!(
            "no drop log at {} (start the agent with --log-drops to record denied connections)",
            path.display()
        ),
        Some(l) => {
            outln!(
                "denied new connections: {} since the agent started (nflog group {}, rate-limited), the last {}:",
                l.total,
                l.group,
                l.recent.len()
            );
            for r in &l.recent {
                let at = |a: &str, p: Option<u16>| match p {
                    Some(p) if a.contains(':') => format!("[{a}]:{p}"),
                    Some(p) => format!("{a}:{p}"),
                    None => a.to_string(),
                };
                outln!(
                    "  {:>7.1}s ago  {:<5} {} -> {}  {}",
                    now_ms.saturating_sub(r.at_ms) as f64 / 1000.0,
                    proto_name(r.proto),
                    at(&r.src, r.sport),
                    at(&r.dst, r.dport),
                    isolating(&r.group_chain)
                );
            }
        }
    }
    outln!("drops per group chain (packets, bytes):");
    for c in &drop_counters {
        outln!(
            "  {:>10} {:>12}  {}  [{}]",
            c.packets,
            c.bytes,
            c.comment.as_deref().unwrap_or(""),
            c.chain
        );
    }
    outln!("accepts per policy rule (packets, bytes):");
    for c in &accept_counters {
        outln!(
            "  {:>10} {:>12}  {}",
            c.packets,
            c.bytes,
            c.comment.as_deref().unwrap_or(&c.chain)
        );
    }
    outln!("base chains (packets, bytes):");
    for c in &base_counters {
        outln!(
            "  {:>10} {:>12}  {}: {}",
            c.packets,
            c.bytes,
            c.chain,
            c.comment.as_deref().unwrap_or("")
        );
    }
    ExitCode::SUCCESS
}

/// `weft cleanup`: uninstall from this node: weft's tables, the tunnel, pod links, state.
pub fn cleanup(table: &str, state_dir: Option<&Path>, json: bool) -> ExitCode {
    let mut done: Vec<String> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    match weft_nft::thread::NftThread::spawn() {
        Ok(nft) => {
            for t in [
                table,
                crate::agent::nat::NAT_TABLE,
                crate::agent::guard::GUARD_TABLE,
            ] {
                match nft.dump(t) {
                    Ok(Some(_)) => match nft.apply(t, vec![weft_netpol::diff::Op::DeleteTable]) {
                        Ok(_) => done.push(format!("deleted table inet {t}")),
                        Err(e) => errors.push(format!("deleting table inet {t}: {e}")),
                    },
                    Ok(None) => done.push(format!("no table inet {t}")),
                    Err(e) => errors.push(format!("reading table inet {t}: {e}")),
                }
            }
        }
        Err(e) => errors.push(format!("netlink: {e}")),
    }
    let links = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                let mut names = weft_dataplane::attach::list_host_veths(&handle)
                    .await
                    .map_err(|e| e.to_string())?;
                names.push("vxweft".to_string());
                let mut removed = Vec::new();
                for n in names {
                    if weft_dataplane::attach::detach(&handle, &n)
                        .await
                        .map_err(|e| e.to_string())?
                    {
                        removed.push(n);
                    }
                }
                Ok::<_, String>(removed)
            })
        });
    match links {
        Ok(removed) if removed.is_empty() => done.push("no weft links".into()),
        Ok(removed) => done.push(format!("deleted links: {}", removed.join(" "))),
        Err(e) => errors.push(format!("links: {e}")),
    }
    if let Some(dir) = state_dir {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => done.push(format!("deleted {}", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("{}: {e}", dir.display())),
        }
    }
    if json {
        outln!(
            "{}",
            serde_json::json!({ "done": done, "errors": errors, "ok": errors.is_empty() })
        );
    } else {
        for line in &done {
            outln!("{line}");
        }
        for e in &errors {
            eprintln!("weft cleanup: {e}");
        }
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn status_names_the_modes_and_every_mesh_peer() {
        use crate::agent::conntrack::Modes;
        use crate::agent::mesh::{MeshSnapshot, PeerSnapshot};
        let m = serde_json::to_value(Modes {
            ct_marks: Some((8, 12)),
            strict_conntrack: true,
            log_drops: Some((5, 10)),
        })
        .unwrap();
        let line = modes_line(&m);
        assert!(
            line.contains("ingress rule ids in bits 8-19, egress 20-31"),
            "{line}"
        );
        assert!(line.contains("strict conntrack on"), "{line}");
        assert!(line.contains("nflog group 5, 10/s"), "{line}");
        let off = modes_line(&serde_json::to_value(Modes::default()).unwrap());
        assert!(
            off.contains("conntrack marks off") && off.contains("drop log off"),
            "{off}"
        );

        assert_eq!(
            mesh_lines(&serde_json::Value::Null),
            vec!["mesh: off (no cluster secret)"]
        );
        let snap = MeshSnapshot {
            node: "n1".into(),
            port: 6783,
            identity_published: true,
            peers: vec![
                PeerSnapshot {
                    name: "n2".into(),
                    address: Some("198.18.0.12".parse().unwrap()),
                    state: "established".into(),
                    path: "via n3".into(),
                    encryption: "plain".into(),
                    last_handshake_age_seconds: Some(2.5),
                    ..Default::default()
                },
                PeerSnapshot {
                    name: "rogue".into(),
                    state: "refused".into(),
                    refused: Some("wrong cluster secret".into()),
                    path: "down".into(),
                    encryption: "blocked".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let lines = mesh_lines(&serde_json::to_value(&snap).unwrap());
        assert!(
            lines[0].starts_with("mesh: port 6783, identity published"),
            "{lines:?}"
        );
        assert!(lines[0].contains("encryption off"), "{lines:?}");
        let n2 = lines.iter().find(|l| l.contains("n2")).expect("peer n2");
        assert!(
            n2.contains("198.18.0.12") && n2.contains("via n3") && n2.contains("2.5s ago"),
            "{n2}"
        );
        let rogue = lines
            .iter()
            .find(|l| l.contains("rogue"))
            .expect("peer rogue");
        assert!(
            rogue.contains("refused (wrong cluster secret)") && rogue.contains("never"),
            "{rogue}"
        );
    }

    use super::*;
    use weft_netpol::compile::{MarkLayout, compile};
    use weft_netpol::model::{
        Cluster, Direction, Namespace, NamespaceScope, ObjectKey, Peer, Pod, PodSelection, Policy,
        PolicyRule,
    };
    use weft_netpol::selector::LabelSelector;

    /// app/a (10.244.0.2) and app/s (10.244.0.3) on node `n`; `app/p` admits a to s and lets
    /// s send anywhere.
    fn two_pods() -> Cluster {
        let mut c = Cluster::default();
        c.namespaces
            .insert("app".into(), Namespace::new("app", BTreeMap::new()));
        for (i, role) in ["a", "s"].into_iter().enumerate() {
            let p = Pod {
                key: ObjectKey::new("app", role),
                uid: role.into(),
                labels: [("role".to_string(), role.to_string())].into(),
                ips: vec![format!("10.244.0.{}", i + 2).parse().unwrap()],
                node: "n".into(),
                ports: vec![],
                host_network: false,
                terminated: false,
            };
            c.pods.insert(p.key.clone(), p);
        }
        let peer = Peer::Pods(PodSelection {
            namespaces: NamespaceScope::Own("app".into()),
            pods: LabelSelector::from_labels([("role", "a")]),
        });
        let p = Policy {
            key: ObjectKey::new("app", "p"),
            uid: "p".into(),
            subject: LabelSelector::from_labels([("role", "s")]),
            ingress: Some(vec![PolicyRule {
                peers: Some(vec![peer]),
                ports: None,
            }]),
            egress: Some(vec![PolicyRule {
                peers: None,
                ports: None,
            }]),
            errors: vec![],
        };
        c.policies.insert(p.key.clone(), p);
        c
    }

    #[test]
    fn marks_decode_to_the_rule_comments_of_their_direction() {
        let rs = compile(&two_pods(), "n", "weft");
        let (fields, ids) = mark_table(&rs);
        let l = MarkLayout::default();
        assert_eq!(
            fields,
            vec![
                (l.field(Direction::Ingress), "ingress"),
                (l.field(Direction::Egress), "egress")
            ]
        );
        // Every written (field, value) decodes to exactly its rule's comment.
        assert_eq!(ids.len(), 2);
        for ((field, value), comments) in &ids {
            assert_eq!(comments.len(), 1, "{comments:?}");
            let id = weft_netpol::ruleset::rule_id_from_comment(&comments[0]).unwrap();
            assert_eq!(value >> field.trailing_zeros(), id);
            let want = if *field == l.field(Direction::Ingress) {
                "app/p ingress[0] from[0]"
            } else {
                "app/p egress[0]"
            };
            assert!(comments[0].starts_with(want), "{comments:?}");
        }
        // A table that writes only the ingress field still shows the egress one.
        let mut only_in = rs.clone();
        only_in.chains.retain(|name, _| !name.ends_with("-eg"));
        assert_eq!(mark_table(&only_in).0, fields);
    }

    #[test]
    fn flows_name_the_admitting_rule_or_why_none_did() {
        use weft_nft::conntrack::{Entry, Tuple};
        let rs = compile(&two_pods(), "n", "weft");
        let l = MarkLayout::default();
        let (_, ids) = mark_table(&rs);
        let (&(_, value), comments) = ids
            .iter()
            .find(|((f, _), _)| *f == l.field(Direction::Ingress))
            .unwrap();
        let entry = |src: &str, dst: &str, mark: u32| {
            let (src, dst) = (src.parse().unwrap(), dst.parse().unwrap());
            let t = Tuple {
                src,
                dst,
                proto: 6,
                sport: Some(40000),
                dport: Some(80),
            };
            Entry {
                orig: t,
                reply: Tuple {
                    src: dst,
                    dst: src,
                    sport: t.dport,
                    dport: t.sport,
                    ..t
                },
                mark,
                id: 1,
                zone: 0,
                status: 0,
                timeout: None,
                tcp_state: Some(3),
            }
        };
        let entries = vec![
            entry("10.244.0.2", "10.244.0.3", value | 0xff),
            entry("10.244.0.2", "10.244.0.3", 0),
            entry("10.244.9.9", "10.244.0.3", 0),
            entry("192.0.2.1", "192.0.2.2", 0),
        ];
        let (_, shown, rows) = flow_rows(&rs, &entries, false);
        assert_eq!(shown.len(), 3, "the flow of no local pod is left out");
        assert_eq!(rows[0]["admitted_by"]["ingress"]["rules"][0], comments[0]);
        assert_eq!(rows[0]["admitted_by"]["egress"]["why"], "not isolated");
        let why = rows[1]["admitted_by"]["ingress"]["why"].as_str().unwrap();
        assert!(
            why.starts_with("admitted before the pod was isolated"),
            "{why}"
        );
        assert_eq!(
            rows[2]["admitted_by"]["egress"]["why"],
            "not a pod of this node: its own node judges it"
        );
        assert_eq!(flow_rows(&rs, &entries, true).1.len(), 4);
    }
}
