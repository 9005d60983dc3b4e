//! The plugin↔agent protocol: one JSON request, one JSON response per connection on the
//! agent's unix socket ([`DEFAULT_SOCKET`], mode 0600).
//!
//! Framing: the client writes one JSON [`Request`] and shuts down its write half; the server
//! reads to end of stream (at most [`MAX_MESSAGE_BYTES`]), writes one JSON [`Response`] and
//! closes. Every message carries `version`.
//!
//! Versioning: the agent accepts [`PROTOCOL_VERSION`] and the one before it
//! ([`PREVIOUS_VERSION`]) and answers in the version it was asked in, so a node can run a
//! plugin binary one release older or newer than its agent during an upgrade. What changed
//! from 1 to 2: version 2 added `pinned_ips` (the CNI `ips` capability) and `mtu` in results;
//! a version-1 request simply has no pinned addresses (`#[serde(default)]`).

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the agent listens.
pub const DEFAULT_SOCKET: &str = "/run/weft/agent.sock";
/// The version this build speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// The older version the agent still accepts.
pub const PREVIOUS_VERSION: u32 = 1;
/// Upper bound on one message (a result is a few hundred bytes; a GC list of 10,000
/// attachments is about 1 MiB).
pub const MAX_MESSAGE_BYTES: u64 = 8 << 20;

/// A pod, as the runtime names it in `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID` (may be empty with old runtimes).
    #[serde(default)]
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One attachment of a container to our network: CNI's (container id, interface) pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    /// `CNI_CONTAINERID`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME`.
    #[serde(rename = "ifname")]
    pub ifname: String,
}

impl std::fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// The arguments of ADD, DEL and CHECK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentArgs {
    /// Which attachment.
    pub key: AttachmentKey,
    /// `CNI_NETNS`: path of the pod's network namespace (may be empty on DEL).
    #[serde(default)]
    pub netns: String,
    /// The pod, from `CNI_ARGS`.
    #[serde(default)]
    pub pod: PodRef,
    /// Addresses the runtime pins (`runtimeConfig.ips`); protocol version 2.
    #[serde(default)]
    pub pinned_ips: Vec<IpAddr>,
}

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Operation {
    /// CNI ADD.
    Add(AttachmentArgs),
    /// CNI DEL.
    Del(AttachmentArgs),
    /// CNI CHECK.
    Check(AttachmentArgs),
    /// CNI GC: everything not in `valid` may go.
    Gc {
        /// `cni.dev/valid-attachments`.
        valid: Vec<AttachmentKey>,
    },
    /// CNI STATUS.
    Status,
}

/// One request on the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version of the sender.
    pub version: u32,
    /// The operation.
    #[serde(flatten)]
    pub op: Operation,
}

impl Request {
    /// A request in this build's version.
    pub fn new(op: Operation) -> Self {
        Request {
            version: PROTOCOL_VERSION,
            op,
        }
    }
}

/// One interface in a result (CNI result `interfaces[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// MAC address, `aa:bb:…`.
    pub mac: String,
    /// MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Netns path for interfaces inside the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// One address in a result (CNI result `ips[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `10.244.1.5/32`.
    pub address: String,
    /// The pod's next hop (`169.254.1.1`, `fe80::1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    pub interface: usize,
}

/// One route in a result (CNI result `routes[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    /// Destination prefix.
    pub dst: String,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// The success result of ADD: the CNI result without `cniVersion` (the plugin adds it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AddResult {
    /// Interfaces, host side first, pod side second.
    pub interfaces: Vec<Interface>,
    /// Pod addresses.
    pub ips: Vec<IpConfig>,
    /// Pod routes.
    pub routes: Vec<RouteConfig>,
}

/// Well-known CNI error codes (spec "Well-known Error Codes") and ours (100+).
pub mod codes {
    /// The config's CNI version is not one we support.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A field in the network config is not supported.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// The container is unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// A required environment variable is missing or invalid.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Content could not be decoded.
    pub const DECODE_FAILURE: u32 = 6;
    /// The network config is invalid.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: transient, the runtime should retry.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Internal failure in the dataplane (links, addresses, routes).
    pub const DATAPLANE: u32 = 100;
    /// No free address in the podCIDR.
    pub const IPAM_EXHAUSTED: u32 = 101;
    /// A pinned address is outside the podCIDR, reserved or in use.
    pub const IPAM_CONFLICT: u32 = 102;
    /// The node's podCIDR differs from the one the allocations were made from.
    pub const PODCIDR_CHANGED: u32 = 103;
    /// CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 104;
    /// The agent does not speak the plugin's protocol version.
    pub const PROTOCOL_VERSION: u32 = 105;
}

/// An error answer, in CNI terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg} (code {code}){}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct ErrorBody {
    /// CNI error code ([`codes`]).
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation.
    #[serde(default)]
    pub details: String,
}

impl ErrorBody {
    /// Build one.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        ErrorBody {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// What a successful operation returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Outcome {
    /// ADD: the attachment.
    Added(AddResult),
    /// DEL, CHECK, GC, STATUS: nothing to print.
    Done,
}

/// One response on the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version of the answer (the request's).
    pub version: u32,
    /// Success or a CNI error.
    pub result: Result<Outcome, ErrorBody>,
}

/// Whether the agent accepts a request of this version.
pub fn accepts(version: u32) -> bool {
    version == PROTOCOL_VERSION || version == PREVIOUS_VERSION
}

/// Why a call to the agent failed before it could answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody listens: no socket file, or connection refused (the agent is not running).
    #[error("weft agent is not running (socket {socket}): {source}")]
    AgentDown {
        /// The socket path.
        socket: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The conversation broke off or timed out.
    #[error("talking to the weft agent at {socket}: {source}")]
    Io {
        /// The socket path.
        socket: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The answer was not a response.
    #[error("undecodable answer from the weft agent: {0}")]
    Decode(serde_json::Error),
}

/// Send one request and wait (at most `timeout` per read/write) for the response.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, CallError> {
    let name = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        use std::io::ErrorKind::*;
        match source.kind() {
            NotFound | ConnectionRefused => CallError::AgentDown {
                socket: name.clone(),
                source,
            },
            _ => CallError::Io {
                socket: name.clone(),
                source,
            },
        }
    })?;
    let io = |source| CallError::Io {
        socket: name.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let body = serde_json::to_vec(request).map_err(CallError::Decode)?;
    stream.write_all(&body).map_err(io)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(io)?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_MESSAGE_BYTES)
        .read_to_end(&mut answer)
        .map_err(io)?;
    serde_json::from_slice(&answer).map_err(CallError::Decode)
}

/// Decode a request the server read; a request of an unsupported version or that does not
/// decode becomes the error response to send back.
pub fn decode_request(bytes: &[u8]) -> Result<Request, Response> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| Response {
        version: PROTOCOL_VERSION,
        result: Err(ErrorBody::new(
            codes::DECODE_FAILURE,
            "undecodable request",
            e.to_string(),
        )),
    })?;
    let version = value
        .get("version")
        .and_then(|v| v.as_u64())
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0);
    if !accepts(version) {
        return Err(Response {
            version: PROTOCOL_VERSION,
            result: Err(ErrorBody::new(
                codes::PROTOCOL_VERSION,
                format!(
                    "agent speaks protocol {PREVIOUS_VERSION} and {PROTOCOL_VERSION}, not {version}"
                ),
                "upgrade the weft-cni binary together with the agent",
            )),
        });
    }
    serde_json::from_value(value).map_err(|e| Response {
        version,
        result: Err(ErrorBody::new(
            codes::DECODE_FAILURE,
            "undecodable request",
            e.to_string(),
        )),
    })
}

/// Bind the agent's socket: create the parent directory, and make the socket root-only
/// (0600) before anyone can connect to it: bound under a temporary name, restricted, then
/// renamed over the real path (which also replaces a stale socket atomically).
pub fn bind(socket: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let dir = socket.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "agent.sock".into());
    let staging = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let std_listener = std::os::unix::net::UnixListener::bind(&staging)?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&staging, socket)?;
    std_listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(std_listener)
}

/// Serve one accepted connection: read one request (bounded in size and time), hand it to
/// `handler`, write its response.
pub async fn serve_connection<H, Fut>(
    mut stream: tokio::net::UnixStream,
    read_timeout: Duration,
    handler: H,
) -> std::io::Result<()>
where
    H: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        read_timeout,
        (&mut stream).take(MAX_MESSAGE_BYTES).read_to_end(&mut buf),
    )
    .await;
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request not received in time",
            ));
        }
    }
    let response = match decode_request(&buf) {
        Ok(request) => handler(request).await,
        Err(response) => response,
    };
    let body = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_one_request_without_pinned_ips_is_accepted() {
        let v1 = br#"{"version":1,"op":"add","key":{"containerID":"c1","ifname":"eth0"},"netns":"/x","pod":{"namespace":"ns","name":"p"}}"#;
        let req = decode_request(v1).expect("v1 accepted");
        match req.op {
            Operation::Add(args) => {
                assert!(args.pinned_ips.is_empty());
                assert_eq!(args.pod.uid, "");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn an_unknown_version_is_refused_with_a_protocol_error() {
        let err = decode_request(br#"{"version":9,"op":"status"}"#).expect_err("refused");
        assert_eq!(err.result.expect_err("error").code, codes::PROTOCOL_VERSION);
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let req = Request::new(Operation::Gc {
            valid: vec![AttachmentKey {
                container_id: "c".into(),
                ifname: "eth0".into(),
            }],
        });
        let text = serde_json::to_string(&req).expect("encode");
        assert_eq!(decode_request(text.as_bytes()).expect("decode"), req);
        let resp = Response {
            version: 2,
            result: Err(ErrorBody::new(11, "later", "")),
        };
        let text = serde_json::to_string(&resp).expect("encode");
        assert_eq!(
            serde_json::from_str::<Response>(&text).expect("decode"),
            resp
        );
    }

    #[test]
    fn the_socket_is_root_only_and_a_call_gets_one_answer() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weft-proto-{}", std::process::id()));
        let socket = dir.join("agent.sock");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(&socket, b"stale").expect("stale file");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime.block_on(async { bind(&socket) }).expect("bind");
        let mode = std::fs::metadata(&socket)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let client_socket = socket.clone();
        let client = std::thread::spawn(move || {
            call(
                &client_socket,
                &Request::new(Operation::Status),
                Duration::from_secs(5),
            )
        });
        runtime.block_on(async {
            let (stream, _) = listener.accept().await.expect("accept");
            serve_connection(stream, Duration::from_secs(5), |req| async move {
                assert_eq!(req.op, Operation::Status);
                Response {
                    version: req.version,
                    result: Ok(Outcome::Done),
                }
            })
            .await
            .expect("serve");
        });
        let answer = client.join().expect("client").expect("call");
        assert_eq!(answer.result, Ok(Outcome::Done));
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
        let err = call(
            &socket,
            &Request::new(Operation::Status),
            Duration::from_secs(1),
        )
        .expect_err("nobody listens");
        assert!(matches!(err, CallError::AgentDown { .. }), "{err}");
    }
}
