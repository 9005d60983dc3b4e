//! weft's node dataplane: everything the agent (and the `weft-cni` plugin) does to a node's
//! links, addresses, routes and neighbour tables, plus the address bookkeeping behind it.
//!
//! What it owns (DESIGN §4, §6):
//! - [`ipam`]: per-node addresses from the node's podCIDRs, persisted and locked on disk;
//! - [`attach`]: a pod's routed veth pair (no bridge) and its addresses, routes and neighbours;
//! - [`overlay`]: the node's VXLAN device `vxweft` and one FDB + neighbour + route set per
//!   remote node;
//! - [`cni_service`]: the agent-side handler of plugin requests (IPAM + attach + policy gate);
//! - [`proto`]: the versioned plugin↔agent protocol over the agent's unix socket.
//!
//! What it must not touch: nftables (the policy engine in `weft-netpol` owns table
//! `inet weft`), links it did not create (host veths all start with `weft`, the tunnel is
//! `vxweft`), and the Kubernetes API (membership comes in as plain data).
//!
//! Flow of a pod ADD: plugin → [`proto`] → [`cni_service::CniService::handle`] →
//! [`ipam::Ipam::allocate`] → [`attach::attach`] → [`cni_service::PolicyGate`] → result.
//!
//! Unsafe code is denied everywhere except in [`netns`], which needs `setns(2)`.
//!
//! How the agent serves the plugin (its policy engine implements [`cni_service::PolicyGate`]):
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use weft_dataplane::cni_service::{CniService, PolicyGate, ServiceConfig};
//! use weft_dataplane::ipam::{Ipam, IpamConfig, PodCidrs, SystemClock};
//! use weft_dataplane::{proto, rtnetlink};
//!
//! struct Engine;
//! impl PolicyGate for Engine {
//!     fn wait_programmed(&self, _: &proto::PodRef, _: &[std::net::IpAddr], _: Duration) -> Result<(), String> {
//!         Ok(()) // the real one waits until the pod's IPs are in the kernel's sets and maps
//!     }
//! }
//!
//! # async fn agent() -> Result<(), Box<dyn std::error::Error>> {
//! let cidrs = PodCidrs::from_list(&["10.244.1.0/24".parse()?, "fd00:10:244:1::/64".parse()?])?;
//! let ipam = Ipam::open(IpamConfig::new(cidrs), Arc::new(SystemClock))?;
//! let (connection, handle, _) = rtnetlink::new_connection()?;
//! tokio::spawn(connection);
//! let service = Arc::new(CniService::new(ipam, Arc::new(Engine), ServiceConfig::default(), handle));
//! let listener = proto::bind(std::path::Path::new(proto::DEFAULT_SOCKET))?;
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     let service = service.clone();
//!     tokio::spawn(async move {
//!         let _ = proto::serve_connection(stream, Duration::from_secs(5), |request| async move {
//!             service.handle(request).await
//!         })
//!         .await;
//!     });
//! }
//! # }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod attach;
pub mod cni_service;
pub mod ipam;
#[allow(unsafe_code)]
pub mod netns;
pub mod overlay;
pub mod proto;

mod nl;

/// The rtnetlink crate this one is built on, so callers make handles of the same version.
pub use rtnetlink;
