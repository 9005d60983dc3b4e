//! The operator's tools: `weft status`, `weft explain`, `weft audit`, `weft cleanup`.
//!
//! The first three ask the node's running agent over its root-only unix socket (plain HTTP
//! GET); `cleanup` works without an agent, straight on the kernel. Output is for people;
//! `--json` where the answer has a machine form. Exit codes: 0 fine, 1 the answer reports a
//! problem (denied connection explained with a mismatch, drift), 2 the question could not be
//! answered (no agent, bad arguments).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// One GET over the agent's socket: (status, body).
pub fn get(socket: &Path, path: &str) -> Result<(u16, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the weft agent at {} ({e}): is it running on this node?",
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

/// `weft explain SRC DST [PORT/PROTO]`.
pub fn explain(socket: &Path, src: &str, dst: &str, port_proto: &str) -> ExitCode {
    let (port, proto) = port_proto.split_once('/').unwrap_or((port_proto, "tcp"));
    if port.parse::<u16>().is_err() {
        eprintln!("weft explain: {port_proto:?}: expected PORT or PORT/PROTO, e.g. 8080/tcp");
        return ExitCode::from(2);
    }
    let enc = |s: &str| s.replace('/', "%2F");
    finish(get(
        socket,
        &format!(
            "/explain?src={}&dst={}&port={port}&proto={proto}",
            enc(src),
            enc(dst)
        ),
    ))
}

/// `weft audit [--repair]`.
pub fn audit(socket: &Path, repair: bool) -> ExitCode {
    finish(get(
        socket,
        if repair { "/audit?repair=1" } else { "/audit" },
    ))
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
    ExitCode::SUCCESS
}

/// `weft cleanup`: uninstall from this node: weft's tables, the tunnel, pod links, state.
pub fn cleanup(table: &str, state_dir: Option<&Path>) -> ExitCode {
    let mut failed = false;
    match weft_nft::thread::NftThread::spawn() {
        Ok(nft) => {
            for t in [table, "weft-nat"] {
                match nft.dump(t) {
                    Ok(Some(_)) => match nft.apply(t, vec![weft_netpol::diff::Op::DeleteTable]) {
                        Ok(_) => println!("deleted table inet {t}"),
                        Err(e) => {
                            eprintln!("weft cleanup: deleting table inet {t}: {e}");
                            failed = true;
                        }
                    },
                    Ok(None) => println!("no table inet {t}"),
                    Err(e) => {
                        eprintln!("weft cleanup: reading table inet {t}: {e}");
                        failed = true;
                    }
                }
            }
        }
        Err(e) => {
            eprintln!("weft cleanup: netlink: {e}");
            failed = true;
        }
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
        Ok(removed) if removed.is_empty() => println!("no weft links"),
        Ok(removed) => println!("deleted links: {}", removed.join(" ")),
        Err(e) => {
            eprintln!("weft cleanup: links: {e}");
            failed = true;
        }
    }
    if let Some(dir) = state_dir {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => println!("deleted {}", dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                eprintln!("weft cleanup: {}: {e}", dir.display());
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}
