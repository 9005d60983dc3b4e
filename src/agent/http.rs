//! The agent's small HTTP surface: `/healthz`, `/readyz`, `/metrics` on TCP (:6784), and
//! `/debug/state` only on the root-only unix socket.
//!
//! A dozen lines of HTTP/1.0-style request parsing instead of a server framework: three GET
//! endpoints, one request per connection, bounded reads and a timeout per connection.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use super::controller::Shared;
use super::watch::Kind;

/// Which listener a request came in on (the debug state is not for the network).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The TCP metrics/health port.
    Tcp,
    /// The local unix socket.
    Unix,
}

/// Readiness grace for a watch that is down.
pub const WATCH_GRACE: Duration = Duration::from_secs(60);

/// Answers one request line; returns (status, content type, body).
pub fn respond(shared: &Shared, listener: Listener, path: &str) -> (u16, &'static str, String) {
    match path {
        "/healthz" => {
            let age = shared
                .heartbeat
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed();
            if age < Duration::from_secs(30) {
                (200, "text/plain", "ok\n".into())
            } else {
                (
                    500,
                    "text/plain",
                    format!("controller loop stuck for {}s\n", age.as_secs()),
                )
            }
        }
        "/readyz" => match shared.ready(WATCH_GRACE) {
            Ok(()) => (200, "text/plain", "ok\n".into()),
            Err(why) => (503, "text/plain", format!("not ready: {why}\n")),
        },
        "/metrics" => {
            {
                let mut ages = shared
                    .metrics
                    .watch_last_event_age
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                for (kind, h) in &shared.health {
                    ages.insert(kind.name().to_string(), h.age().as_secs_f64());
                }
            }
            shared.metrics.ready.store(
                u64::from(shared.ready(WATCH_GRACE).is_ok()),
                std::sync::atomic::Ordering::Relaxed,
            );
            let mut text = shared.metrics.render();
            text.push_str(&super::mesh::render_metrics());
            text.push_str(&shared.table_watch.render());
            (200, "text/plain; version=0.0.4", text)
        }
        "/debug/mesh" => match super::mesh::debug_json() {
            Some(json) => (200, "application/json", json),
            None => (
                404,
                "text/plain",
                "mesh off (no cluster secret: --mesh-secret-file absent or not given)\n".into(),
            ),
        },
        "/debug/state" if listener == Listener::Unix => {
            (200, "application/json", debug_state(shared))
        }
        _ => (404, "text/plain", "not found\n".into()),
    }
}

/// The value of one query-string parameter (`%2F` and `+` decoded).
fn param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.replace("%2F", "/").replace("%2f", "/").replace('+', " "))
    })
}

/// `/explain?src=&dst=&port=&proto=` and `/audit?repair=1`: 200 with the answer, 409 when the
/// answer reports a problem (drift, a mismatch), 400 for a bad question, 503 when the agent
/// cannot answer yet.
pub fn respond_query(shared: &Shared, path: &str) -> (u16, &'static str, String) {
    use super::query::Query;
    let query = if path.starts_with("/audit") {
        Query::Audit {
            repair: param(path, "repair").is_some_and(|v| v == "1" || v == "true"),
        }
    } else {
        let (Some(src), Some(dst)) = (param(path, "src"), param(path, "dst")) else {
            return (400, "text/plain", "explain needs src and dst\n".into());
        };
        let protocol = match param(path, "proto").as_deref().unwrap_or("tcp") {
            "tcp" | "TCP" => weft_netpol::ruleset::Protocol::Tcp,
            "udp" | "UDP" => weft_netpol::ruleset::Protocol::Udp,
            "sctp" | "SCTP" => weft_netpol::ruleset::Protocol::Sctp,
            other => return (400, "text/plain", format!("unknown protocol {other:?}\n")),
        };
        let Some(port) = param(path, "port")
            .unwrap_or_else(|| "80".into())
            .parse()
            .ok()
        else {
            return (400, "text/plain", "port must be a number\n".into());
        };
        Query::Explain {
            src,
            dst,
            protocol,
            port,
        }
    };
    let Some(tx) = shared
        .queries
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    else {
        return (503, "text/plain", "the controller is not running\n".into());
    };
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    let msg = super::watch::WatchMsg {
        kind: super::watch::Kind::Policies,
        body: super::watch::WatchBody::Query {
            query,
            reply: reply_tx,
        },
        resource_version: None,
        received: std::time::Instant::now(),
    };
    if tx.send(msg).is_err() {
        return (503, "text/plain", "the controller is not running\n".into());
    }
    match reply_rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(answer)) => (
            if answer.problem { 409 } else { 200 },
            "text/plain",
            answer.text,
        ),
        Ok(Err(e)) => (503, "text/plain", format!("{e}\n")),
        Err(_) => (
            503,
            "text/plain",
            "the controller did not answer in 20 s\n".into(),
        ),
    }
}

/// JSON for the harness: per kind, the last resourceVersion whose effects are in the kernel.
pub fn debug_state(shared: &Shared) -> String {
    let applied = shared.applied.lock().unwrap_or_else(|e| e.into_inner());
    let mut kinds = Vec::new();
    for kind in Kind::ALL {
        let h = &shared.health[&kind];
        kinds.push(format!(
            "\"{}\":{{\"applied_resource_version\":{},\"listed\":{},\"down_seconds\":{},\"last_event_age_seconds\":{:.3},\"restarts\":{}}}",
            kind.name(),
            serde_json::Value::from(applied.get(&kind).cloned().unwrap_or_default()),
            h.listed_once(),
            h.down_for().map_or("null".to_string(), |d| format!("{:.3}", d.as_secs_f64())),
            h.age().as_secs_f64(),
            shared.metrics.restarts_of(kind.name()),
        ));
    }
    let (sets, elements, chains, rules) =
        *shared.table_size.lock().unwrap_or_else(|e| e.into_inner());
    let errors = shared
        .object_errors
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut errs = String::new();
    for (i, (k, v)) in errors.iter().enumerate() {
        let _ = write!(
            errs,
            "{}{}:{}",
            if i > 0 { "," } else { "" },
            serde_json::Value::from(k.to_string()),
            serde_json::Value::from(v.clone())
        );
    }
    let enforced =
        serde_json::to_string(&*shared.enforced.lock().unwrap_or_else(|e| e.into_inner()))
            .unwrap_or_else(|_| "null".into());
    let modes = serde_json::to_string(&*shared.modes.lock().unwrap_or_else(|e| e.into_inner()))
        .unwrap_or_else(|_| "null".into());
    // The mesh's snapshot (null when the mesh is off): peers for `weft status`.
    let mesh = super::mesh::debug_json().unwrap_or_else(|| "null".into());
    format!(
        "{{\"node\":{},\"ready\":{},\"kinds\":{{{}}},\"table\":{{\"sets\":{sets},\"elements\":{elements},\"chains\":{chains},\"rules\":{rules}}},\"object_errors\":{{{errs}}},\"enforced\":{enforced},\"modes\":{modes},\"mesh\":{mesh}}}\n",
        serde_json::Value::from(shared.node.clone()),
        shared.ready(WATCH_GRACE).is_ok(),
        kinds.join(",")
    )
}

/// Serves one connection.
pub async fn serve_conn<S>(stream: S, shared: Arc<Shared>, listener: Listener)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    serve_conn_with_prefix(stream, shared, listener, Vec::new()).await;
}

/// Serves one connection whose first bytes were already read (the unix socket peeks to tell
/// HTTP from a CNI request).
pub async fn serve_conn_with_prefix<S>(
    mut stream: S,
    shared: Arc<Shared>,
    listener: Listener,
    prefix: Vec<u8>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 4096];
    let mut len = prefix.len().min(buf.len());
    buf[..len].copy_from_slice(&prefix[..len]);
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while len < buf.len() {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || buf[..len].contains(&b'\n') {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        debug!("http: slow or broken client dropped");
        return;
    }
    let text = String::from_utf8_lossy(&buf[..len]);
    let mut parts = text.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let route = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = if method == "GET"
        && listener == Listener::Unix
        && matches!(route, "/explain" | "/audit")
    {
        // Answered on the controller thread: wait for it off the async workers.
        let (shared, path) = (shared.clone(), path.to_string());
        tokio::task::spawn_blocking(move || respond_query(&shared, &path))
            .await
            .unwrap_or((500, "text/plain", "query panicked\n".into()))
    } else if method == "GET" {
        respond(&shared, listener, route)
    } else {
        (405, "text/plain", "only GET\n".to_string())
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        400 => "Bad Request",
        409 => "Conflict",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if let Err(e) = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    }
    .await
    {
        debug!(error = %e, "http: write failed");
    }
}

/// Accepts on the TCP port forever.
pub async fn serve_tcp(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve_conn(s, shared.clone(), Listener::Tcp));
            }
            Err(e) => {
                warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::metrics::Metrics;

    #[test]
    fn readiness_waits_for_lists_and_adoption_and_debug_state_stays_local() {
        let shared = Shared::new("n1", Arc::new(Metrics::default()));
        let (code, _, body) = respond(&shared, Listener::Tcp, "/readyz");
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("initial sync"));
        shared
            .adopted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let (code, _, body) = respond(&shared, Listener::Tcp, "/readyz");
        assert_eq!(code, 503);
        assert!(body.contains("never listed"), "{body}");
        assert_eq!(respond(&shared, Listener::Tcp, "/debug/state").0, 404);
        let (code, _, body) = respond(&shared, Listener::Unix, "/debug/state");
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(v["node"], "n1");
        assert_eq!(v["kinds"]["pods"]["listed"], false);
        assert_eq!(respond(&shared, Listener::Tcp, "/healthz").0, 200);
        let (_, _, metrics) = respond(&shared, Listener::Tcp, "/metrics");
        assert!(metrics.contains("weft_watch_last_event_age_seconds{kind=\"pods\"}"));
        assert!(metrics.contains("weft_ready 0"));
    }
}
