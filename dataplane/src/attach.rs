//! A pod's attachment: a routed veth pair, no bridge (DESIGN §4).
//!
//! ```text
//!  node netns                                  pod netns
//!  weftXXXXXXXX (up, no address)  <── veth ──>  eth0  10.244.1.5/32, fd00:10:244:1::5/128 (nodad)
//!    route 10.244.1.5/32 dev weftXXXXXXXX         default via 169.254.1.1 dev eth0 onlink
//!    neigh 10.244.1.5 lladdr <eth0> PERMANENT      default via fe80::1 dev eth0 onlink
//!                                                 neigh 169.254.1.1 / fe80::1 lladdr <weftX> PERMANENT
//! ```
//!
//! Every packet a pod sends leaves through its host veth and is routed by the node, so it
//! crosses the forward hook where policy lives; the policy engine matches `iifname "weft*"`,
//! so the host side's name always starts with `weft` (and nothing else of ours does). Both
//! directions use permanent neighbour entries: no proxy-ARP, no ND, no DAD wait, so the pod's
//! addresses work the moment ADD returns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteScope};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::nl::{self, LinkInfo, mac_to_string};
use crate::proto::{AddResult, Interface, IpConfig, RouteConfig};

/// The pod's IPv4 next hop: link-local, never on the wire, resolved by a permanent entry.
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 next hop.
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Prefix of every host-side pod interface (the policy engine's `iifname "weft*"`).
pub const HOST_VETH_PREFIX: &str = "weft";
/// Default pod MTU when the caller has no better number (1500 underlay − 50 VXLAN).
pub const DEFAULT_MTU: u32 = 1450;

/// The host-side name of an attachment: `weft` + 8 hex digits of a hash (FNV-1a 32) of the
/// container id and the pod interface name, so DEL can find it from `CNI_CONTAINERID` and
/// `CNI_IFNAME` alone (the plugin does, with the agent down). 12 bytes, under IFNAMSIZ.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    format!(
        "{HOST_VETH_PREFIX}{:08x}",
        fnv1a32(&[container_id, "/", ifname])
    )
}

fn fnv1a32(parts: &[&str]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in parts {
        for b in part.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// What to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`: the pod-side name (usually `eth0`).
    pub ifname: String,
    /// `CNI_NETNS`: path of the pod's network namespace.
    pub netns: PathBuf,
    /// The pod's addresses (from IPAM), IPv4 first.
    pub ips: Vec<IpAddr>,
    /// MTU of both ends.
    pub mtu: u32,
}

/// What an attach made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Host side name (`weft…`).
    pub host_ifname: String,
    /// Host side MAC.
    pub host_mac: [u8; 6],
    /// Pod side name.
    pub pod_ifname: String,
    /// Pod side MAC.
    pub pod_mac: [u8; 6],
    /// Netns path of the pod.
    pub netns: PathBuf,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// MTU.
    pub mtu: u32,
}

impl Attachment {
    /// The CNI result for it: interfaces (host, pod), /32 and /128 addresses on the pod
    /// interface, default routes via the link-local gateways.
    pub fn to_result(&self) -> AddResult {
        let interfaces = vec![
            Interface {
                name: self.host_ifname.clone(),
                mac: mac_to_string(&self.host_mac),
                mtu: Some(self.mtu),
                sandbox: None,
            },
            Interface {
                name: self.pod_ifname.clone(),
                mac: mac_to_string(&self.pod_mac),
                mtu: Some(self.mtu),
                sandbox: Some(self.netns.display().to_string()),
            },
        ];
        let mut ips = Vec::new();
        let mut routes = Vec::new();
        for ip in &self.ips {
            let (len, gw, default) = match ip {
                IpAddr::V4(_) => (32, IpAddr::V4(POD_GATEWAY_V4), "0.0.0.0/0"),
                IpAddr::V6(_) => (128, IpAddr::V6(POD_GATEWAY_V6), "::/0"),
            };
            ips.push(IpConfig {
                address: format!("{ip}/{len}"),
                gateway: Some(gw.to_string()),
                interface: 1,
            });
            routes.push(RouteConfig {
                dst: default.into(),
                gw: Some(gw.to_string()),
            });
        }
        AddResult {
            interfaces,
            ips,
            routes,
        }
    }
}

/// Why an attach or detach failed; names the interface or namespace concerned.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What we were doing, with the object.
        what: String,
        /// The cause.
        source: rtnetlink::Error,
    },
    /// The pod's namespace could not be entered or opened.
    #[error("pod netns: {0}")]
    Netns(#[from] crate::netns::NetnsError),
    /// Something we just created is not there.
    #[error("{0}")]
    Missing(String),
}

fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> AttachError {
    let what = what.into();
    move |source| AttachError::Netlink { what, source }
}

/// Create the attachment. A leftover host veth of the same attachment (an earlier ADD that
/// failed half-way) is deleted first, so attach can be retried.
pub async fn attach(
    host: &rtnetlink::Handle,
    spec: &AttachSpec,
) -> Result<Attachment, AttachError> {
    let host_name = host_veth_name(&spec.container_id, &spec.ifname);
    for stale in [&host_name] {
        if let Some(link) = nl::link_by_name(host, stale)
            .await
            .map_err(nl_err(format!("look up {stale}")))?
        {
            delete_index(host, link.index, stale).await?;
        }
    }
    let netns_file = std::fs::File::open(&spec.netns).map_err(|e| {
        AttachError::Netns(crate::netns::NetnsError::Open {
            path: spec.netns.clone(),
            source: e,
        })
    })?;
    // The pod end is created directly inside the pod's namespace under its final name
    // (IFLA_NET_NS_FD on the peer): moving a device between namespaces afterwards costs
    // ~10 ms of RCU grace periods per pod, about half of an ADD.
    let peer = LinkUnspec::new_with_name(&spec.ifname)
        .mtu(spec.mtu)
        .setns_by_fd(netns_file.as_raw_fd())
        .build();
    let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.clone())
        .mtu(spec.mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.link()
        .add(veth)
        .execute()
        .await
        .map_err(nl_err(format!(
            "create veth {host_name} with peer {} in {}",
            spec.ifname,
            spec.netns.display()
        )))?;
    let result = finish_attach(host, spec, &host_name).await;
    if result.is_err() {
        // Leave nothing half-made: deleting the host end deletes the pair.
        if let Ok(Some(link)) = nl::link_by_name(host, &host_name).await {
            let _ = delete_index(host, link.index, &host_name).await;
        }
    }
    result
}

async fn finish_attach(
    host: &rtnetlink::Handle,
    spec: &AttachSpec,
    host_name: &str,
) -> Result<Attachment, AttachError> {
    let host_link = require_link(host, host_name).await?;
    let host_mac = host_link
        .mac
        .ok_or_else(|| AttachError::Missing(format!("{host_name} has no MAC")))?;
    host.link()
        .set(LinkUnspec::new_with_index(host_link.index).up().build())
        .execute()
        .await
        .map_err(nl_err(format!("set {host_name} up")))?;

    let pod_side = PodSide {
        ifname: spec.ifname.clone(),
        ips: spec.ips.clone(),
        host_mac,
    };
    let pod_mac = crate::netns::run_in(&spec.netns, move |pod| async move {
        pod_side.configure(&pod).await
    })
    .await??;

    for ip in &spec.ips {
        host_route_to_pod(host, host_link.index, *ip, host_name).await?;
        let mut neigh = host
            .neighbours()
            .add(host_link.index, *ip)
            .link_layer_address(&pod_mac)
            .replace();
        neigh.message_mut().header.state = NeighbourState::Permanent;
        neigh
            .execute()
            .await
            .map_err(nl_err(format!("neighbour {ip} on {host_name}")))?;
    }
    Ok(Attachment {
        host_ifname: host_name.to_string(),
        host_mac,
        pod_ifname: spec.ifname.clone(),
        pod_mac,
        netns: spec.netns.clone(),
        ips: spec.ips.clone(),
        mtu: spec.mtu,
    })
}

async fn host_route_to_pod(
    host: &rtnetlink::Handle,
    index: u32,
    ip: IpAddr,
    host_name: &str,
) -> Result<(), AttachError> {
    let msg = match ip {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .output_interface(index)
            .build(),
    };
    host.route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(nl_err(format!("route {ip} dev {host_name}")))
}

async fn require_link(handle: &rtnetlink::Handle, name: &str) -> Result<LinkInfo, AttachError> {
    nl::link_by_name(handle, name)
        .await
        .map_err(nl_err(format!("look up {name}")))?
        .ok_or_else(|| AttachError::Missing(format!("link {name} vanished")))
}

async fn delete_index(
    handle: &rtnetlink::Handle,
    index: u32,
    name: &str,
) -> Result<(), AttachError> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if nl::is_not_found(&e) => Ok(()),
        Err(e) => Err(nl_err(format!("delete {name}"))(e)),
    }
}

/// The pod-side work, run inside the pod's namespace.
struct PodSide {
    ifname: String,
    ips: Vec<IpAddr>,
    host_mac: [u8; 6],
}

impl PodSide {
    async fn configure(self, pod: &rtnetlink::Handle) -> Result<[u8; 6], AttachError> {
        let link = require_link(pod, &self.ifname).await?;
        pod.link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(nl_err(format!("set {} up", self.ifname)))?;
        let mac = link
            .mac
            .ok_or_else(|| AttachError::Missing(format!("{} has no MAC", self.ifname)))?;
        for ip in &self.ips {
            // No DAD: the address must work when ADD returns, and the pod's /128 is unique
            // by IPAM's construction.
            nl::add_host_address_nodad(pod, link.index, *ip)
                .await
                .map_err(nl_err(format!("address {ip} on {}", self.ifname)))?;
        }
        let has_v4 = self.ips.iter().any(IpAddr::is_ipv4);
        let has_v6 = self.ips.iter().any(IpAddr::is_ipv6);
        let gateways = [
            (has_v4, IpAddr::V4(POD_GATEWAY_V4)),
            (has_v6, IpAddr::V6(POD_GATEWAY_V6)),
        ];
        for (wanted, gw) in gateways {
            if !wanted {
                continue;
            }
            let mut neigh = pod
                .neighbours()
                .add(link.index, gw)
                .link_layer_address(&self.host_mac)
                .replace();
            neigh.message_mut().header.state = NeighbourState::Permanent;
            neigh
                .execute()
                .await
                .map_err(nl_err(format!("neighbour {gw} on {}", self.ifname)))?;
            let route = match gw {
                IpAddr::V4(g) => RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(g)
                    .output_interface(link.index)
                    .onlink()
                    .build(),
                IpAddr::V6(g) => RouteMessageBuilder::<Ipv6Addr>::new()
                    .gateway(g)
                    .output_interface(link.index)
                    .onlink()
                    .build(),
            };
            pod.route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(nl_err(format!("default route via {gw} on {}", self.ifname)))?;
        }
        Ok(mac)
    }
}

/// Delete the host side of an attachment (which deletes the pair). `Ok(false)` if it was
/// already gone: DEL is idempotent.
pub async fn detach(host: &rtnetlink::Handle, host_ifname: &str) -> Result<bool, AttachError> {
    match nl::link_by_name(host, host_ifname)
        .await
        .map_err(nl_err(format!("look up {host_ifname}")))?
    {
        Some(link) => {
            delete_index(host, link.index, host_ifname).await?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The host-side links that look like ours (`weft` + 8 hex digits).
pub async fn list_host_veths(host: &rtnetlink::Handle) -> Result<Vec<String>, AttachError> {
    let links = nl::all_links(host).await.map_err(nl_err("list links"))?;
    Ok(links
        .into_iter()
        .map(|l| l.name)
        .filter(|n| {
            n.len() == HOST_VETH_PREFIX.len() + 8
                && n.starts_with(HOST_VETH_PREFIX)
                && n[HOST_VETH_PREFIX.len()..]
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit())
        })
        .collect())
}

/// Verify an attachment is as [`attach`] left it. `Ok(problems)`: empty when all is well,
/// else one line per missing link, address, route or neighbour.
pub async fn check(
    host: &rtnetlink::Handle,
    spec: &AttachSpec,
) -> Result<Vec<String>, AttachError> {
    Ok(inspect(host, spec).await?.problems)
}

/// What [`inspect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// One line per thing missing; empty when the attachment is whole.
    pub problems: Vec<String>,
    /// The attachment as found, when it is whole.
    pub attachment: Option<Attachment>,
}

/// Read an attachment back from the kernel: what is missing, and the attachment itself
/// (MACs included) when nothing is, so a repeated ADD can answer without touching it.
pub async fn inspect(
    host: &rtnetlink::Handle,
    spec: &AttachSpec,
) -> Result<Inspection, AttachError> {
    let mut problems = Vec::new();
    let host_name = host_veth_name(&spec.container_id, &spec.ifname);
    let Some(host_link) = nl::link_by_name(host, &host_name)
        .await
        .map_err(nl_err(format!("look up {host_name}")))?
    else {
        problems.push(format!("host link {host_name} is missing"));
        return Ok(Inspection {
            problems,
            attachment: None,
        });
    };
    if !host_link.up {
        problems.push(format!("host link {host_name} is down"));
    }
    let host_routes = routes_via(host, host_link.index).await?;
    for ip in &spec.ips {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        if !host_routes.iter().any(|(dst, l, _)| dst == ip && *l == len) {
            problems.push(format!("host route {ip}/{len} dev {host_name} is missing"));
        }
    }
    if !Path::new(&spec.netns).exists() {
        problems.push(format!("pod netns {} is missing", spec.netns.display()));
        return Ok(Inspection {
            problems,
            attachment: None,
        });
    }
    let ifname = spec.ifname.clone();
    let ips = spec.ips.clone();
    let (pod_problems, pod_mac) = crate::netns::run_in(&spec.netns, move |pod| async move {
        check_pod_side(&pod, &ifname, &ips).await
    })
    .await??;
    problems.extend(pod_problems);
    let attachment = match (problems.is_empty(), host_link.mac, pod_mac) {
        (true, Some(host_mac), Some(pod_mac)) => Some(Attachment {
            host_ifname: host_name,
            host_mac,
            pod_ifname: spec.ifname.clone(),
            pod_mac,
            netns: spec.netns.clone(),
            ips: spec.ips.clone(),
            mtu: host_link.mtu.unwrap_or(spec.mtu),
        }),
        _ => None,
    };
    Ok(Inspection {
        problems,
        attachment,
    })
}

async fn check_pod_side(
    pod: &rtnetlink::Handle,
    ifname: &str,
    ips: &[IpAddr],
) -> Result<(Vec<String>, Option<[u8; 6]>), AttachError> {
    let mut problems = Vec::new();
    let Some(link) = nl::link_by_name(pod, ifname)
        .await
        .map_err(nl_err(format!("look up {ifname} in pod")))?
    else {
        problems.push(format!("pod link {ifname} is missing"));
        return Ok((problems, None));
    };
    if !link.up {
        problems.push(format!("pod link {ifname} is down"));
    }
    let mut have = Vec::new();
    let mut addrs = pod
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute();
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(nl_err("list pod addresses"))?
    {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(a) = attr {
                have.push((*a, msg.header.prefix_len));
            }
        }
    }
    for ip in ips {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        if !have.contains(&(*ip, len)) {
            problems.push(format!("pod address {ip}/{len} on {ifname} is missing"));
        }
    }
    let routes = routes_via(pod, link.index).await?;
    let neighbours = permanent_neighbours(pod, link.index).await?;
    for (wanted, gw, dflt) in [
        (
            ips.iter().any(IpAddr::is_ipv4),
            IpAddr::V4(POD_GATEWAY_V4),
            "0.0.0.0/0",
        ),
        (
            ips.iter().any(IpAddr::is_ipv6),
            IpAddr::V6(POD_GATEWAY_V6),
            "::/0",
        ),
    ] {
        if !wanted {
            continue;
        }
        if !routes.iter().any(|(_, len, g)| *len == 0 && *g == Some(gw)) {
            problems.push(format!("pod route {dflt} via {gw} dev {ifname} is missing"));
        }
        if !neighbours.contains(&gw) {
            problems.push(format!("pod neighbour {gw} on {ifname} is missing"));
        }
    }
    Ok((problems, link.mac))
}

/// (destination, prefix length, gateway) of the main-table routes out of `index`.
pub(crate) async fn routes_via(
    handle: &rtnetlink::Handle,
    index: u32,
) -> Result<Vec<(IpAddr, u8, Option<IpAddr>)>, AttachError> {
    let mut out = Vec::new();
    for family in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let v6 = family.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6;
        let mut routes = handle.route().get(family).execute();
        while let Some(msg) = routes.try_next().await.map_err(nl_err("list routes"))? {
            let mut oif = None;
            let mut dst = None;
            let mut gw = None;
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Destination(a) => dst = route_ip(a),
                    RouteAttribute::Gateway(a) => gw = route_ip(a),
                    _ => {}
                }
            }
            if oif != Some(index) {
                continue;
            }
            let dst = dst.unwrap_or(if v6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            });
            out.push((dst, msg.header.destination_prefix_length, gw));
        }
    }
    Ok(out)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Addresses with a permanent neighbour entry on `index`.
pub(crate) async fn permanent_neighbours(
    handle: &rtnetlink::Handle,
    index: u32,
) -> Result<Vec<IpAddr>, AttachError> {
    let mut out = Vec::new();
    let mut neighbours = handle.neighbours().get().execute();
    while let Some(msg) = neighbours
        .try_next()
        .await
        .map_err(nl_err("list neighbours"))?
    {
        if msg.header.ifindex != index || msg.header.state != NeighbourState::Permanent {
            continue;
        }
        for attr in &msg.attributes {
            if let NeighbourAttribute::Destination(d) = attr {
                match d {
                    NeighbourAddress::Inet(a) => out.push(IpAddr::V4(*a)),
                    NeighbourAddress::Inet6(a) => out.push(IpAddr::V6(*a)),
                    _ => {}
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_start_with_weft_and_fit_ifnamsiz() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        assert!(a.starts_with("weft") && a.len() == 12, "{a}");
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"), "stable");
        assert_ne!(a, host_veth_name("0123456789abcdef", "net1"));
        assert_ne!(a, host_veth_name("0123456789abcdee", "eth0"));
    }

    #[test]
    fn the_result_lists_host_then_pod_interface_with_host_routes() {
        let a = Attachment {
            host_ifname: "weft00000001".into(),
            host_mac: [2, 0, 0, 0, 0, 1],
            pod_ifname: "eth0".into(),
            pod_mac: [2, 0, 0, 0, 0, 2],
            netns: "/var/run/netns/p".into(),
            ips: vec![
                "10.244.1.5".parse().expect("ip"),
                "fd00::5".parse().expect("ip"),
            ],
            mtu: 1450,
        };
        let r = a.to_result();
        assert_eq!(r.interfaces[1].sandbox.as_deref(), Some("/var/run/netns/p"));
        assert_eq!(r.ips[0].address, "10.244.1.5/32");
        assert_eq!(r.ips[1].address, "fd00::5/128");
        assert_eq!(r.ips[1].gateway.as_deref(), Some("fe80::1"));
        assert_eq!(r.routes[0].dst, "0.0.0.0/0");
    }
}
