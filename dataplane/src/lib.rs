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
