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
            (200, "text/plain; version=0.0.4", shared.metrics.render())
        }
        "/debug/state" if listener == Listener::Unix => {
            (200, "application/json", debug_state(shared))
        }
        _ => (404, "text/plain", "not found\n".into()),
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
    format!(
        "{{\"node\":{},\"ready\":{},\"kinds\":{{{}}},\"table\":{{\"sets\":{sets},\"elements\":{elements},\"chains\":{chains},\"rules\":{rules}}},\"object_errors\":{{{errs}}}}}\n",
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
    let (status, ctype, body) = if method == "GET" {
        respond(&shared, listener, path.split('?').next().unwrap_or(""))
    } else {
        (405, "text/plain", "only GET\n".to_string())
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
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
