//! Small rtnetlink helpers shared by `attach` and `overlay`: errno classification and link
//! lookups. Kept private: callers see typed errors, never raw netlink messages.

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{self, LinkAttribute, LinkFlags, LinkMessage};

/// The positive errno carried by a netlink error, if any.
pub(crate) fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}

/// Whether the error says "no such object" (ENOENT, ENODEV, ESRCH).
pub(crate) fn is_not_found(err: &rtnetlink::Error) -> bool {
    matches!(errno(err), Some(libc::ENOENT | libc::ENODEV | libc::ESRCH))
}

/// Puts `ip` on link `index` host-length (/32, /128), without duplicate address detection (it
/// must work at once, and it is unique by construction), replacing what is there.
pub(crate) async fn add_host_address_nodad(
    handle: &rtnetlink::Handle,
    index: u32,
    ip: std::net::IpAddr,
) -> Result<(), rtnetlink::Error> {
    use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
    let len = if ip.is_ipv4() { 32 } else { 128 };
    let mut add = handle.address().add(index, ip, len).replace();
    add.message_mut().header.flags = AddressHeaderFlags::Nodad;
    add.message_mut()
        .attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    add.execute().await
}

/// What we need to know about a link.
#[derive(Debug, Clone)]
pub(crate) struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// VXLAN id and UDP port, for VXLAN links.
    pub vxlan: Option<(Option<u32>, Option<u16>)>,
}

impl LinkInfo {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut info = LinkInfo {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            vxlan: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => info.name = n.clone(),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(a);
                    info.mac = Some(mac);
                }
                LinkAttribute::Mtu(m) => info.mtu = Some(*m),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let link::LinkInfo::Data(link::InfoData::Vxlan(v)) = i {
                            let mut id = None;
                            let mut port = None;
                            for x in v {
                                match x {
                                    link::InfoVxlan::Id(n) => id = Some(*n),
                                    link::InfoVxlan::Port(p) => port = Some(*p),
                                    _ => {}
                                }
                            }
                            info.vxlan = Some((id, port));
                        }
                    }
                }
                _ => {}
            }
        }
        info
    }
}

/// Look a link up by name; `Ok(None)` when it does not exist.
pub(crate) async fn link_by_name(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<LinkInfo>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(LinkInfo::from_message(&msg))),
        Ok(None) => Ok(None),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every link in the namespace.
pub(crate) async fn all_links(
    handle: &rtnetlink::Handle,
) -> Result<Vec<LinkInfo>, rtnetlink::Error> {
    let mut out = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await? {
        out.push(LinkInfo::from_message(&msg));
    }
    Ok(out)
}

/// `aa:bb:cc:dd:ee:ff`.
pub(crate) fn mac_to_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
