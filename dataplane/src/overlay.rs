//! Between nodes: one VXLAN device per node, `vxweft` (deliberately *not* `weft…`: the policy
//! engine treats `iifname "weft*"` as pod interfaces), and per remote node three kinds of
//! entries, all derived from the Node object (DESIGN §4):
//!
//! ```text
//! bridge fdb  <remote vtep MAC> dev vxweft dst <remote underlay IP> self permanent
//! neigh       <remote tunnel addr (v4, v6)> lladdr <remote vtep MAC> dev vxweft PERMANENT
//! route       <remote podCIDR (v4, v6)> via <remote tunnel addr> dev vxweft onlink
//! ```
//!
//! The tunnel address of a node is the first address of its podCIDR
//! ([`crate::ipam::tunnel_address`]) and its VTEP MAC a pure function of its underlay IP
//! ([`vtep_mac`]), so every node computes every peer's entries from the Node list alone: no
//! learning, no flooding, no gossip. [`Overlay::sync`] applies per-node differences only:
//! a node added, removed or changed touches its own entries and nobody else's, and a node
//! whose entries fail to program is reported and retried without holding up the others.
//!
//! Per-peer route choice (issue 9, from the agent's mesh): each remote node's podCIDRs are
//! routed by one [`PeerRoute`]: directly over `vxweft` (above), through a relay node over
//! `vxweft` (`via <relay's tunnel addr>`: the relay forwards it on its own direct route), over
//! the WireGuard device `wgweft` (`dev wgweft`: which WireGuard peer carries it is decided by
//! the peers' AllowedIPs, relayed ones included), or `unreachable` (a node refused by the mesh:
//! never in plaintext through the default route). The FDB and neighbour entries stay in every
//! case, so switching a peer between them touches its route only (one `replace`, no gap).
//!
//! Defaults: UDP port 4789 (the IANA VXLAN port; configurable for clusters where another
//! VXLAN already holds it), VNI 6784 (an arbitrary id — weave's port number — chosen to stay
//! clear of flannel's VNI 1 if both share the port during a migration), MTU = underlay MTU −
//! 50 (IPv4 underlay: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14) or − 70 (IPv6
//! underlay).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::neighbour::NeighbourFlags;
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::ipam::{PodCidrs, tunnel_address};
use crate::nl::{self, mac_to_string};

/// The node's VXLAN device.
pub const VXLAN_DEVICE: &str = "vxweft";
/// Default VXLAN network identifier.
pub const DEFAULT_VNI: u32 = 6784;
/// Default UDP port (IANA VXLAN).
pub const DEFAULT_PORT: u16 = 4789;

/// The WireGuard device (kernel module or `weft-wg`'s TUN device). Not `weft…`: the policy
/// engine treats those as pod interfaces.
pub const WIREGUARD_DEVICE: &str = "wgweft";

/// Bytes WireGuard adds on an IPv4 underlay (IP 20 + UDP 8 + WireGuard 32).
pub const WIREGUARD_OVERHEAD_V4: u32 = 60;
/// Bytes WireGuard adds on an IPv6 underlay.
pub const WIREGUARD_OVERHEAD_V6: u32 = 80;

/// How traffic to one remote node's pods leaves this node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PeerRoute {
    /// Straight to it over `vxweft`.
    #[default]
    Vxlan,
    /// Over `vxweft` to a relay node (its podCIDRs given: the route goes via its tunnel
    /// address of the same family), which forwards on its own route.
    VxlanVia {
        /// The relay's name (for logs).
        relay: String,
        /// The relay's podCIDRs.
        relay_cidrs: Vec<IpNet>,
    },
    /// Over `wgweft` (direct or relayed: WireGuard's AllowedIPs pick the peer).
    Wireguard,
    /// Not at all: an `unreachable` route (a peer refused by the mesh).
    Blocked,
}

/// Bytes VXLAN adds on an IPv4 underlay.
pub const OVERHEAD_V4: u32 = 50;
/// Bytes VXLAN adds on an IPv6 underlay.
pub const OVERHEAD_V6: u32 = 70;

/// The VTEP MAC of the node with this underlay address: locally administered, unicast,
/// `0a:58` + the IPv4 address, or `0e:58` + the last 4 bytes of an IPv6 address.
pub fn vtep_mac(underlay: IpAddr) -> [u8; 6] {
    let (first, tail) = match underlay {
        IpAddr::V4(a) => (0x0a, a.octets()),
        IpAddr::V6(a) => {
            let o = a.octets();
            (0x0e, [o[12], o[13], o[14], o[15]])
        }
    };
    [first, 0x58, tail[0], tail[1], tail[2], tail[3]]
}

/// Pod MTU for an underlay of `underlay_mtu` reached over `underlay`'s family.
pub fn pod_mtu(underlay_mtu: u32, underlay: IpAddr) -> u32 {
    underlay_mtu.saturating_sub(if underlay.is_ipv4() {
        OVERHEAD_V4
    } else {
        OVERHEAD_V6
    })
}

/// Turn on IPv4 and IPv6 forwarding in the calling thread's network namespace: every pod
/// packet is routed by the node. Caveat for the agent: with IPv6 forwarding on, a host
/// interface with `accept_ra=1` stops taking router advertisements; nodes that learn their
/// IPv6 default route by RA need `accept_ra=2` on the underlay interface first.
pub fn enable_forwarding() -> std::io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")?;
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", b"1")
}

/// This node's side of the overlay.
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    /// The node's underlay address (its InternalIP).
    pub underlay_ip: IpAddr,
    /// The node's podCIDRs (the tunnel device takes their first addresses).
    pub pod_cidrs: PodCidrs,
    /// VXLAN id.
    pub vni: u32,
    /// VXLAN UDP port.
    pub port: u16,
    /// MTU of `vxweft`; `None`: the underlay link's MTU minus the overhead.
    pub mtu: Option<u32>,
}

impl OverlayConfig {
    /// Defaults for a node.
    pub fn new(underlay_ip: IpAddr, pod_cidrs: PodCidrs) -> Self {
        OverlayConfig {
            underlay_ip,
            pod_cidrs,
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            mtu: None,
        }
    }
}

/// A remote node as the overlay needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    /// Node name (the key of per-node changes).
    pub name: String,
    /// Its underlay address.
    pub underlay_ip: IpAddr,
    /// Its podCIDRs.
    pub pod_cidrs: Vec<IpNet>,
}

/// One kernel object programmed for a remote node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Entry {
    Fdb {
        mac: [u8; 6],
        dst: IpAddr,
    },
    Neighbour {
        ip: IpAddr,
        mac: [u8; 6],
    },
    Route {
        cidr: IpNet,
        via: IpAddr,
    },
    /// `cidr dev wgweft`.
    WgRoute {
        cidr: IpNet,
    },
    /// `unreachable cidr`.
    Unreachable {
        cidr: IpNet,
    },
}

impl Entry {
    /// The destination of a route entry.
    fn route_cidr(&self) -> Option<IpNet> {
        match self {
            Entry::Route { cidr, .. } | Entry::WgRoute { cidr } | Entry::Unreachable { cidr } => {
                Some(*cidr)
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Fdb { mac, dst } => write!(f, "fdb {} dst {dst}", mac_to_string(mac)),
            Entry::Neighbour { ip, mac } => write!(f, "neigh {ip} lladdr {}", mac_to_string(mac)),
            Entry::Route { cidr, via } => write!(f, "route {cidr} via {via} onlink"),
            Entry::WgRoute { cidr } => write!(f, "route {cidr} dev {WIREGUARD_DEVICE}"),
            Entry::Unreachable { cidr } => write!(f, "route unreachable {cidr}"),
        }
    }
}

fn entries_for(node: &RemoteNode, route: &PeerRoute) -> BTreeSet<Entry> {
    let mac = vtep_mac(node.underlay_ip);
    let mut out = BTreeSet::new();
    out.insert(Entry::Fdb {
        mac,
        dst: node.underlay_ip,
    });
    for cidr in &node.pod_cidrs {
        let cidr = cidr.trunc();
        let own = tunnel_address(cidr);
        out.insert(Entry::Neighbour { ip: own, mac });
        let relay_via = |relay_cidrs: &[IpNet]| {
            relay_cidrs
                .iter()
                .find(|r| r.addr().is_ipv4() == cidr.addr().is_ipv4())
                .map(|r| tunnel_address(r.trunc()))
        };
        out.insert(match route {
            PeerRoute::Vxlan => Entry::Route { cidr, via: own },
            // A relay without a podCIDR of this family: the direct route is all there is.
            PeerRoute::VxlanVia { relay_cidrs, .. } => Entry::Route {
                cidr,
                via: relay_via(relay_cidrs).unwrap_or(own),
            },
            PeerRoute::Wireguard => Entry::WgRoute { cidr },
            PeerRoute::Blocked => Entry::Unreachable { cidr },
        });
    }
    out
}

/// What one [`Overlay::sync`] did, by node name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Nodes seen for the first time.
    pub added: Vec<String>,
    /// Nodes gone.
    pub removed: Vec<String>,
    /// Nodes whose entries changed.
    pub changed: Vec<String>,
    /// Nodes left alone.
    pub unchanged: Vec<String>,
    /// Nodes whose entries failed (retried at the next sync), with the first error.
    pub failed: Vec<(String, String)>,
    /// Kernel objects added and deleted in total.
    pub entries_added: usize,
    /// Kernel objects deleted in total.
    pub entries_deleted: usize,
}

/// Why the overlay could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What, with the object.
        what: String,
        /// The cause.
        source: rtnetlink::Error,
    },
    /// No link carries the underlay address.
    #[error("no link has the underlay address {0}")]
    NoUnderlay(IpAddr),
    /// `vxweft` vanished or lacks something it must have.
    #[error("{0}")]
    Device(String),
}

fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> OverlayError {
    let what = what.into();
    move |source| OverlayError::Netlink { what, source }
}

/// The node's overlay: the device and what was programmed per remote node.
#[derive(Debug)]
pub struct Overlay {
    config: OverlayConfig,
    index: u32,
    mtu: u32,
    underlay_mtu: u32,
    programmed: BTreeMap<String, (RemoteNode, BTreeSet<Entry>)>,
    /// Index of `wgweft` during a sync that routes over it.
    wg_index: Option<u32>,
    /// The `wgweft` our `dev wgweft` routes were added on. A new device (weft-wg restarted:
    /// the kernel dropped the routes with the old one) has another index: those routes are
    /// added again.
    wg_index_programmed: Option<u32>,
    /// Whether the kernel's entries on `vxweft` have been reconciled once (after a restart
    /// the device keeps the previous process's entries, some of them for nodes since gone).
    adopted: bool,
}

impl Overlay {
    /// Create `vxweft` (or adopt it when its VNI and port match; recreate it when not), give
    /// it the VTEP MAC, the MTU and the tunnel addresses, and bring it up.
    pub async fn ensure(
        handle: &rtnetlink::Handle,
        config: OverlayConfig,
    ) -> Result<Self, OverlayError> {
        let (underlay_index, underlay_mtu) = underlay_link(handle, config.underlay_ip).await?;
        let mtu = config
            .mtu
            .unwrap_or_else(|| pod_mtu(underlay_mtu, config.underlay_ip));
        if let Some(existing) = nl::link_by_name(handle, VXLAN_DEVICE)
            .await
            .map_err(nl_err("look up vxweft"))?
        {
            let wanted = (Some(config.vni), Some(config.port));
            if existing.vxlan != Some(wanted) {
                tracing::info!(?existing.vxlan, vni = config.vni, port = config.port, "recreating vxweft");
                handle
                    .link()
                    .del(existing.index)
                    .execute()
                    .await
                    .map_err(nl_err("delete mismatched vxweft"))?;
            }
        }
        if nl::link_by_name(handle, VXLAN_DEVICE)
            .await
            .map_err(nl_err("look up vxweft"))?
            .is_none()
        {
            let builder = LinkVxlan::new(VXLAN_DEVICE, config.vni)
                .port(config.port)
                .learning(false)
                .dev(underlay_index);
            let builder = match config.underlay_ip {
                IpAddr::V4(a) => builder.local(a),
                IpAddr::V6(a) => builder.local6(a),
            };
            handle
                .link()
                .add(builder.build())
                .execute()
                .await
                .map_err(nl_err("create vxweft"))?;
        }
        let link = nl::link_by_name(handle, VXLAN_DEVICE)
            .await
            .map_err(nl_err("look up vxweft"))?
            .ok_or_else(|| OverlayError::Device("vxweft vanished after creation".into()))?;
        // Only touch the MAC when it differs: changing it flushes the device's neighbour
        // table, permanent entries included, which would cut every remote node off until
        // the next sync (seen on 6.18 even for a write of the same address).
        let mac = vtep_mac(config.underlay_ip);
        let mut set = LinkUnspec::new_with_index(link.index).mtu(mtu).up();
        if link.mac != Some(mac) {
            set = set.address(mac.to_vec());
        }
        handle
            .link()
            .set(set.build())
            .execute()
            .await
            .map_err(nl_err("set vxweft MAC, MTU, up"))?;
        add_tunnel_addresses(handle, link.index, &config.pod_cidrs, "vxweft").await?;
        Ok(Overlay {
            config,
            index: link.index,
            mtu,
            underlay_mtu,
            programmed: BTreeMap::new(),
            wg_index: None,
            wg_index_programmed: None,
            adopted: false,
        })
    }

    /// Gives `wgweft` (created by `weft-wg` or the kernel module path) this node's tunnel
    /// addresses, `mtu`, and brings it up. `Ok(false)`: the device does not exist (yet).
    pub async fn ensure_wireguard_device(
        &self,
        handle: &rtnetlink::Handle,
        mtu: u32,
    ) -> Result<bool, OverlayError> {
        let Some(link) = nl::link_by_name(handle, WIREGUARD_DEVICE)
            .await
            .map_err(nl_err("look up wgweft"))?
        else {
            return Ok(false);
        };
        if link.mtu != Some(mtu) || !link.up {
            handle
                .link()
                .set(LinkUnspec::new_with_index(link.index).mtu(mtu).up().build())
                .execute()
                .await
                .map_err(nl_err("set wgweft MTU, up"))?;
        }
        add_tunnel_addresses(handle, link.index, &self.config.pod_cidrs, WIREGUARD_DEVICE).await?;
        Ok(true)
    }

    /// Pod MTU when pod traffic may go over WireGuard: the underlay's MTU minus WireGuard's
    /// overhead, never above `vxweft`'s.
    pub fn wireguard_mtu(&self) -> u32 {
        let overhead = if self.config.underlay_ip.is_ipv4() {
            WIREGUARD_OVERHEAD_V4
        } else {
            WIREGUARD_OVERHEAD_V6
        };
        (self.underlay_mtu.saturating_sub(overhead)).min(self.mtu)
    }

    /// MTU of `vxweft` (what pods should use).
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Bring the per-node entries in line with `remotes` (the other nodes; this node, if
    /// present, is skipped), touching only nodes that were added, removed or changed; every
    /// node's pods are routed directly over `vxweft`.
    pub async fn sync(&mut self, handle: &rtnetlink::Handle, remotes: &[RemoteNode]) -> SyncReport {
        self.sync_routes(handle, remotes, &BTreeMap::new()).await
    }

    /// [`Overlay::sync`] with a route choice per node name (missing: [`PeerRoute::Vxlan`]).
    /// A node whose choice changed has only its routes replaced.
    pub async fn sync_routes(
        &mut self,
        handle: &rtnetlink::Handle,
        remotes: &[RemoteNode],
        routes: &BTreeMap<String, PeerRoute>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let default_route = PeerRoute::default();
        let route_of = |name: &str| routes.get(name).unwrap_or(&default_route);
        self.wg_index = if routes.values().any(|r| *r == PeerRoute::Wireguard) {
            nl::link_by_name(handle, WIREGUARD_DEVICE)
                .await
                .ok()
                .flatten()
                .map(|l| l.index)
        } else {
            None
        };
        if let Some(now) = self.wg_index
            && self.wg_index_programmed.is_some_and(|was| was != now)
        {
            let again: Vec<String> = self
                .programmed
                .iter()
                .filter(|(_, (_, e))| e.iter().any(|e| matches!(e, Entry::WgRoute { .. })))
                .map(|(n, _)| n.clone())
                .collect();
            tracing::info!(nodes = ?again, "overlay: {WIREGUARD_DEVICE} was created anew (weft-wg restarted): its routes are added again");
            for n in again {
                self.programmed.remove(&n);
            }
        }
        if self.wg_index.is_some() {
            self.wg_index_programmed = self.wg_index;
        }
        let wanted: BTreeMap<&str, &RemoteNode> = remotes
            .iter()
            .filter(|n| n.underlay_ip != self.config.underlay_ip)
            .map(|n| (n.name.as_str(), n))
            .collect();
        if !self.adopted {
            let desired: BTreeSet<Entry> = wanted
                .values()
                .flat_map(|n| entries_for(n, route_of(&n.name)))
                .collect();
            match self.delete_strays(handle, &desired).await {
                Ok(n) => {
                    report.entries_deleted += n;
                    self.adopted = true;
                }
                Err(e) => tracing::warn!(error = %e, "overlay: could not read back vxweft entries"),
            }
        }
        let gone: Vec<String> = self
            .programmed
            .keys()
            .filter(|name| !wanted.contains_key(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            let Some((_, old)) = self.programmed.get(&name).cloned() else {
                continue;
            };
            match self
                .apply(handle, &old, &BTreeSet::new(), &mut report)
                .await
            {
                Ok(()) => {
                    self.programmed.remove(&name);
                    report.removed.push(name);
                }
                Err(e) => report.failed.push((name, e.to_string())),
            }
        }
        for (name, node) in wanted {
            let new = entries_for(node, route_of(name));
            let old = self.programmed.get(name).map(|(_, e)| e.clone());
            if old.as_ref() == Some(&new) {
                report.unchanged.push(name.to_string());
                continue;
            }
            let before = old.clone().unwrap_or_default();
            match self.apply(handle, &before, &new, &mut report).await {
                Ok(()) => {
                    self.programmed
                        .insert(name.to_string(), ((*node).clone(), new));
                    if old.is_some() {
                        report.changed.push(name.to_string());
                    } else {
                        report.added.push(name.to_string());
                    }
                }
                Err(e) => {
                    // Forget what we think we programmed so the next sync redoes it whole.
                    self.programmed.remove(name);
                    report.failed.push((name.to_string(), e.to_string()));
                }
            }
        }
        if !report.failed.is_empty() {
            tracing::warn!(failed = ?report.failed, "overlay sync: some nodes not programmed");
        }
        report
    }

    /// First sync after `ensure`: delete every entry on `vxweft` that no wanted node
    /// accounts for (left by a previous process for nodes that went away meanwhile). Entries
    /// that are wanted stay untouched; the adds of this sync replace them in place.
    async fn delete_strays(
        &self,
        handle: &rtnetlink::Handle,
        desired: &BTreeSet<Entry>,
    ) -> Result<usize, OverlayError> {
        let found = self.read_back(handle).await?;
        let mut deleted = 0;
        for stray in found.difference(desired) {
            self.delete_entry(handle, stray).await?;
            deleted += 1;
        }
        if deleted > 0 {
            tracing::info!(
                deleted,
                "overlay: removed entries of nodes no longer present"
            );
        }
        Ok(deleted)
    }

    /// The FDB, neighbour and gatewayed route entries the kernel has on `vxweft`.
    async fn read_back(&self, handle: &rtnetlink::Handle) -> Result<BTreeSet<Entry>, OverlayError> {
        use rtnetlink::packet_route::AddressFamily;
        use rtnetlink::packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourState,
        };
        let mut out = BTreeSet::new();
        let routes = crate::attach::routes_via(handle, self.index)
            .await
            .map_err(|e| OverlayError::Device(format!("read vxweft routes: {e}")))?;
        for (dst, len, gw) in routes {
            if let (Some(via), Ok(cidr)) = (gw, IpNet::new(dst, len)) {
                out.insert(Entry::Route { cidr, via });
            }
        }
        for family in [
            AddressFamily::Inet,
            AddressFamily::Inet6,
            AddressFamily::Bridge,
        ] {
            let mut dump = handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            while let Some(msg) = dump.try_next().await.map_err(nl_err("dump neighbours"))? {
                if msg.header.ifindex != self.index {
                    continue;
                }
                let mut ip = None;
                let mut mac = None;
                for attr in &msg.attributes {
                    match attr {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                            ip = Some(IpAddr::V4(*a))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                            ip = Some(IpAddr::V6(*a))
                        }
                        // FDB entries (family AF_BRIDGE) carry the VTEP address unparsed.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                            ip = match b.len() {
                                4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                                16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                                _ => None,
                            }
                        }
                        NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                            let mut m = [0u8; 6];
                            m.copy_from_slice(l);
                            mac = Some(m);
                        }
                        _ => {}
                    }
                }
                let (Some(ip), Some(mac)) = (ip, mac) else {
                    continue;
                };
                if family == AddressFamily::Bridge {
                    out.insert(Entry::Fdb { mac, dst: ip });
                } else if msg.header.state == NeighbourState::Permanent {
                    out.insert(Entry::Neighbour { ip, mac });
                }
            }
        }
        Ok(out)
    }

    /// Delete `old − new`, then add `new − old` (adds replace, so an entry the kernel already
    /// has, e.g. after an agent restart, is adopted).
    async fn apply(
        &self,
        handle: &rtnetlink::Handle,
        old: &BTreeSet<Entry>,
        new: &BTreeSet<Entry>,
        report: &mut SyncReport,
    ) -> Result<(), OverlayError> {
        // Routes before neighbours before FDB on delete; the reverse on add. A route whose
        // destination stays routed (another kind, another next hop) is not deleted: the add
        // replaces it in place, so the peer's traffic never falls through to the default route.
        let kept: BTreeSet<IpNet> = new.iter().filter_map(Entry::route_cidr).collect();
        let mut deletes: Vec<&Entry> = old
            .difference(new)
            .filter(|e| e.route_cidr().is_none_or(|c| !kept.contains(&c)))
            .collect();
        deletes.sort_by_key(|e| match e {
            Entry::Route { .. } | Entry::WgRoute { .. } | Entry::Unreachable { .. } => 0,
            Entry::Neighbour { .. } => 1,
            Entry::Fdb { .. } => 2,
        });
        for e in deletes {
            self.delete_entry(handle, e).await?;
            report.entries_deleted += 1;
        }
        let mut adds: Vec<&Entry> = new.difference(old).collect();
        adds.sort_by_key(|e| match e {
            Entry::Fdb { .. } => 0,
            Entry::Neighbour { .. } => 1,
            Entry::Route { .. } | Entry::WgRoute { .. } | Entry::Unreachable { .. } => 2,
        });
        for e in adds {
            self.add_entry(handle, e).await?;
            report.entries_added += 1;
        }
        Ok(())
    }

    async fn add_entry(
        &self,
        handle: &rtnetlink::Handle,
        entry: &Entry,
    ) -> Result<(), OverlayError> {
        let what = format!("add {entry}");
        match entry {
            Entry::Fdb { mac, dst } => handle
                .neighbours()
                .add_bridge(self.index, mac)
                .destination(*dst)
                .flags(NeighbourFlags::Own)
                .replace()
                .execute()
                .await
                .map_err(nl_err(what)),
            Entry::Neighbour { ip, mac } => handle
                .neighbours()
                .add(self.index, *ip)
                .link_layer_address(mac)
                .replace()
                .execute()
                .await
                .map_err(nl_err(what)),
            Entry::Route { cidr, via } => {
                let add = || {
                    handle
                        .route()
                        .add(self.route_message(*cidr, *via))
                        .replace()
                        .execute()
                };
                match add().await {
                    // IPv6 checks an onlink gateway against the table as it is: while the
                    // CIDR is still routed through another device (`dev wgweft`, a peer
                    // leaving WireGuard), the gateway (inside that CIDR) resolves there and
                    // the kernel refuses with EINVAL. The old route goes first, then; the
                    // prefix is unrouted for one netlink round trip.
                    Err(e) if cidr.addr().is_ipv6() && nl::errno(&e) == Some(libc::EINVAL) => {
                        match handle.route().del(prefix_message(*cidr)).execute().await {
                            Ok(()) => {}
                            Err(e) if nl::is_not_found(&e) => {}
                            Err(e) => return Err(nl_err(format!("{what} (old route first)"))(e)),
                        }
                        add().await.map_err(nl_err(what))
                    }
                    other => other.map_err(nl_err(what)),
                }
            }
            Entry::WgRoute { .. } | Entry::Unreachable { .. } => handle
                .route()
                .add(self.other_route_message(entry)?)
                .replace()
                .execute()
                .await
                .map_err(nl_err(what)),
        }
    }

    /// The message of a `dev wgweft` or `unreachable` route.
    fn other_route_message(
        &self,
        entry: &Entry,
    ) -> Result<rtnetlink::packet_route::route::RouteMessage, OverlayError> {
        use rtnetlink::packet_route::route::{RouteScope, RouteType};
        let (cidr, wg) = match entry {
            Entry::WgRoute { cidr } => (*cidr, true),
            Entry::Unreachable { cidr } => (*cidr, false),
            _ => unreachable!("only wgweft and unreachable routes"),
        };
        let mut msg = prefix_message(cidr);
        if wg {
            let index = self.wg_index.ok_or_else(|| {
                OverlayError::Device(format!(
                    "{WIREGUARD_DEVICE} does not exist (is weft-wg running?)"
                ))
            })?;
            msg.header.scope = RouteScope::Link;
            msg.attributes
                .push(rtnetlink::packet_route::route::RouteAttribute::Oif(index));
        } else {
            msg.header.kind = RouteType::Unreachable;
            msg.header.scope = RouteScope::Universe;
        }
        Ok(msg)
    }

    async fn delete_entry(
        &self,
        handle: &rtnetlink::Handle,
        entry: &Entry,
    ) -> Result<(), OverlayError> {
        let result = match entry {
            Entry::Fdb { mac, dst } => {
                let mut req = handle
                    .neighbours()
                    .add_bridge(self.index, mac)
                    .destination(*dst)
                    .flags(NeighbourFlags::Own);
                let msg = req.message_mut().clone();
                handle.neighbours().del(msg).execute().await
            }
            Entry::Neighbour { ip, mac } => {
                let mut req = handle
                    .neighbours()
                    .add(self.index, *ip)
                    .link_layer_address(mac);
                let msg = req.message_mut().clone();
                handle.neighbours().del(msg).execute().await
            }
            Entry::Route { cidr, via } => {
                handle
                    .route()
                    .del(self.route_message(*cidr, *via))
                    .execute()
                    .await
            }
            Entry::WgRoute { .. } | Entry::Unreachable { .. } => {
                let Ok(msg) = self.other_route_message(entry) else {
                    // wgweft is gone, and its routes with it.
                    return Ok(());
                };
                handle.route().del(msg).execute().await
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if nl::is_not_found(&e) => Ok(()),
            Err(e) => Err(nl_err(format!("delete {entry}"))(e)),
        }
    }

    fn route_message(
        &self,
        cidr: IpNet,
        via: IpAddr,
    ) -> rtnetlink::packet_route::route::RouteMessage {
        match (cidr, via) {
            (IpNet::V4(n), IpAddr::V4(g)) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .gateway(g)
                .output_interface(self.index)
                .onlink()
                .build(),
            (IpNet::V6(n), IpAddr::V6(g)) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .gateway(g)
                .output_interface(self.index)
                .onlink()
                .build(),
            // tunnel_address keeps the family of its CIDR
            _ => unreachable!("route family mismatch {cidr} via {via}"),
        }
    }
}

/// A route message naming only `cidr` (the kind, device and next hop are filled in by the
/// caller; a delete with nothing else removes the prefix's route whatever it is).
fn prefix_message(cidr: IpNet) -> rtnetlink::packet_route::route::RouteMessage {
    match cidr {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .build(),
    }
}

/// Gives device `index` (named `dev` in errors) this node's tunnel address of every podCIDR,
/// host-length, without duplicate address detection (replacing what is there).
async fn add_tunnel_addresses(
    handle: &rtnetlink::Handle,
    index: u32,
    pod_cidrs: &PodCidrs,
    dev: &str,
) -> Result<(), OverlayError> {
    for cidr in pod_cidrs.to_list() {
        let ip = tunnel_address(cidr);
        nl::add_host_address_nodad(handle, index, ip)
            .await
            .map_err(nl_err(format!("tunnel address {ip} on {dev}")))?;
    }
    Ok(())
}

/// Index and MTU of the link that carries `ip`.
async fn underlay_link(handle: &rtnetlink::Handle, ip: IpAddr) -> Result<(u32, u32), OverlayError> {
    let mut addrs = handle.address().get().set_address_filter(ip).execute();
    let mut index = None;
    while let Some(msg) = addrs.try_next().await.map_err(nl_err("list addresses"))? {
        if msg.attributes.iter().any(
            |a| matches!(a, AddressAttribute::Address(x) | AddressAttribute::Local(x) if *x == ip),
        ) {
            index = Some(msg.header.index);
        }
    }
    let index = index.ok_or(OverlayError::NoUnderlay(ip))?;
    let links = nl::all_links(handle).await.map_err(nl_err("list links"))?;
    let link = links
        .into_iter()
        .find(|l| l.index == index)
        .ok_or(OverlayError::NoUnderlay(ip))?;
    Ok((index, link.mtu.unwrap_or(1500)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_macs_are_local_unicast_and_derived_from_the_underlay_address() {
        let m = vtep_mac("198.18.0.7".parse().expect("ip"));
        assert_eq!(m, [0x0a, 0x58, 198, 18, 0, 7]);
        assert_eq!(m[0] & 0x01, 0, "unicast");
        assert_eq!(m[0] & 0x02, 0x02, "locally administered");
        let m6 = vtep_mac("2001:db8::c612:7".parse().expect("ip"));
        assert_eq!(m6, [0x0e, 0x58, 0xc6, 0x12, 0, 7]);
    }

    #[test]
    fn mtu_subtracts_the_vxlan_overhead_per_underlay_family() {
        assert_eq!(pod_mtu(1500, "198.18.0.1".parse().expect("ip")), 1450);
        assert_eq!(pod_mtu(9000, "2001:db8::1".parse().expect("ip")), 8930);
    }

    #[test]
    fn a_node_has_one_fdb_and_a_neighbour_and_route_per_podcidr() {
        let node = RemoteNode {
            name: "n2".into(),
            underlay_ip: "198.18.0.2".parse().expect("ip"),
            pod_cidrs: vec![
                "10.244.2.0/24".parse().expect("net"),
                "fd00:10:244:2::/64".parse().expect("net"),
            ],
        };
        let e: Vec<String> = entries_for(&node, &PeerRoute::Vxlan)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            e,
            vec![
                "fdb 0a:58:c6:12:00:02 dst 198.18.0.2",
                "neigh 10.244.2.1 lladdr 0a:58:c6:12:00:02",
                "neigh fd00:10:244:2::1 lladdr 0a:58:c6:12:00:02",
                "route 10.244.2.0/24 via 10.244.2.1 onlink",
                "route fd00:10:244:2::/64 via fd00:10:244:2::1 onlink",
            ]
        );
    }

    #[test]
    fn a_peer_route_changes_only_the_routes_of_its_node() {
        let node = RemoteNode {
            name: "n3".into(),
            underlay_ip: "198.18.0.3".parse().expect("ip"),
            pod_cidrs: vec![
                "10.244.3.0/24".parse().expect("net"),
                "fd00:10:244:3::/64".parse().expect("net"),
            ],
        };
        let routes = |r: PeerRoute| -> Vec<String> {
            entries_for(&node, &r)
                .iter()
                .filter(|e| e.route_cidr().is_some())
                .map(|e| e.to_string())
                .collect()
        };
        let relay = PeerRoute::VxlanVia {
            relay: "n2".into(),
            relay_cidrs: vec![
                "10.244.2.0/24".parse().expect("net"),
                "fd00:10:244:2::/64".parse().expect("net"),
            ],
        };
        assert_eq!(
            routes(relay),
            [
                "route 10.244.3.0/24 via 10.244.2.1 onlink",
                "route fd00:10:244:3::/64 via fd00:10:244:2::1 onlink"
            ]
        );
        assert_eq!(
            routes(PeerRoute::Wireguard),
            [
                "route 10.244.3.0/24 dev wgweft",
                "route fd00:10:244:3::/64 dev wgweft"
            ]
        );
        assert_eq!(
            routes(PeerRoute::Blocked),
            [
                "route unreachable 10.244.3.0/24",
                "route unreachable fd00:10:244:3::/64"
            ]
        );
        let fixed = |r: PeerRoute| -> BTreeSet<Entry> {
            entries_for(&node, &r)
                .into_iter()
                .filter(|e| e.route_cidr().is_none())
                .collect()
        };
        assert_eq!(fixed(PeerRoute::Vxlan), fixed(PeerRoute::Wireguard));
        assert_eq!(fixed(PeerRoute::Vxlan), fixed(PeerRoute::Blocked));
    }
}
