//! Encryption of pod traffic between nodes: the WireGuard side (DESIGN §5).
//!
//! The kernel module is used where it is loaded; where it is not (this project's machines
//! have none), the userspace implementation `gotatun` runs in its own long-lived process,
//! `weft-wg`, which owns the TUN device, so restarting or upgrading the agent never
//! interrupts encrypted traffic. `weft-wg` reads WireGuard's own configuration format (the
//! subset below, as `wg setconf` takes it), so operators read it like any WireGuard config:
//!
//! ```text
//! [Interface]
//! PrivateKey = <base64>
//! ListenPort = 51820
//!
//! [Peer]
//! PublicKey = <base64>
//! Endpoint = 198.18.0.2:51820
//! AllowedIPs = 10.244.2.0/24, fd00:10:244:2::/64
//! PersistentKeepalive = 25
//! ```
//!
//! Parsing is pure and always built; bringing the device up ([`userspace`]) needs the
//! `userspace-wg` feature. Keys are Curve25519 (WireGuard's), not the mesh's Ed25519 identity.

use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use thiserror::Error;

/// Default WireGuard UDP port.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;

/// A configuration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// A line that does not parse, with its number (1-based).
    #[error("line {line}: {why}")]
    Line {
        /// Line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// No `[Interface]` with a `PrivateKey`.
    #[error("no [Interface] PrivateKey")]
    NoPrivateKey,
}

/// One peer of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its Curve25519 public key.
    pub public_key: [u8; 32],
    /// Where to send to it (a peer without one is only answered).
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses routed to it and accepted from it, as (address, prefix length).
    pub allowed_ips: Vec<(IpAddr, u8)>,
    /// Keepalive interval, seconds.
    pub persistent_keepalive: Option<u16>,
}

/// A device's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Curve25519 private key.
    pub private_key: [u8; 32],
    /// UDP port.
    pub listen_port: u16,
    /// Its peers.
    pub peers: Vec<PeerConfig>,
}

/// Decodes a base64 key of 32 bytes.
pub fn decode_key(s: &str) -> Result<[u8; 32], String> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|e| format!("key is not base64: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("key has {} bytes, not 32", b.len()))
}

/// Encodes a key as base64.
pub fn encode_key(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not address/prefix"))?;
    let addr: IpAddr = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
    let len: u8 = len.parse().map_err(|e| format!("{len:?}: {e}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("prefix /{len} too long for {addr}"));
    }
    Ok((addr, len))
}

enum Section {
    None,
    Interface,
    Peer,
}

impl DeviceConfig {
    /// Parses the configuration text. Strict: unknown sections or keys, a second
    /// `[Interface]`, or a peer without a `PublicKey` are errors.
    pub fn parse(text: &str) -> Result<DeviceConfig, ConfigError> {
        let mut private_key = None;
        let mut listen_port = DEFAULT_LISTEN_PORT;
        let mut peers: Vec<PeerConfig> = Vec::new();
        let mut section = Section::None;
        let mut seen_interface = false;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |why: String| ConfigError::Line { line, why };
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            if content.starts_with('[') {
                section = match content {
                    "[Interface]" if !seen_interface => {
                        seen_interface = true;
                        Section::Interface
                    }
                    "[Interface]" => return Err(err("a second [Interface]".into())),
                    "[Peer]" => {
                        peers.push(PeerConfig {
                            public_key: [0; 32],
                            endpoint: None,
                            allowed_ips: Vec::new(),
                            persistent_keepalive: None,
                        });
                        Section::Peer
                    }
                    other => return Err(err(format!("unknown section {other}"))),
                };
                continue;
            }
            let (key, value) = content
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| err(format!("{content:?} is not Key = Value")))?;
            match (&section, key) {
                (Section::Interface, "PrivateKey") => {
                    private_key = Some(decode_key(value).map_err(err)?)
                }
                (Section::Interface, "ListenPort") => {
                    listen_port = value.parse().map_err(|e| err(format!("ListenPort: {e}")))?
                }
                (Section::Peer, k) => {
                    let peer = peers.last_mut().expect("a [Peer] section has a peer");
                    match k {
                        "PublicKey" => peer.public_key = decode_key(value).map_err(err)?,
                        "Endpoint" => {
                            peer.endpoint =
                                Some(value.parse().map_err(|e| err(format!("Endpoint: {e}")))?)
                        }
                        "AllowedIPs" => {
                            for cidr in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                                peer.allowed_ips.push(parse_cidr(cidr).map_err(err)?);
                            }
                        }
                        "PersistentKeepalive" => {
                            peer.persistent_keepalive = match value {
                                "off" | "0" => None,
                                v => Some(
                                    v.parse()
                                        .map_err(|e| err(format!("PersistentKeepalive: {e}")))?,
                                ),
                            }
                        }
                        other => return Err(err(format!("unknown [Peer] key {other}"))),
                    }
                }
                (Section::Interface, other) => {
                    return Err(err(format!("unknown [Interface] key {other}")));
                }
                (Section::None, _) => return Err(err("key outside a section".into())),
            }
        }
        if let Some(i) = peers.iter().position(|p| p.public_key == [0; 32]) {
            return Err(ConfigError::Line {
                line: 0,
                why: format!("peer {} has no PublicKey", i + 1),
            });
        }
        Ok(DeviceConfig {
            private_key: private_key.ok_or(ConfigError::NoPrivateKey)?,
            listen_port,
            peers,
        })
    }

    /// Renders the configuration in the same format (keys included: write it 0600).
    pub fn render(&self) -> String {
        let mut s = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {}\n",
            encode_key(&self.private_key),
            self.listen_port
        );
        for p in &self.peers {
            s.push_str(&format!(
                "\n[Peer]\nPublicKey = {}\n",
                encode_key(&p.public_key)
            ));
            if let Some(e) = p.endpoint {
                s.push_str(&format!("Endpoint = {e}\n"));
            }
            if !p.allowed_ips.is_empty() {
                let ips: Vec<String> = p
                    .allowed_ips
                    .iter()
                    .map(|(a, l)| format!("{a}/{l}"))
                    .collect();
                s.push_str(&format!("AllowedIPs = {}\n", ips.join(", ")));
            }
            if let Some(k) = p.persistent_keepalive {
                s.push_str(&format!("PersistentKeepalive = {k}\n"));
            }
        }
        s
    }
}

/// A digest of a configuration text (FNV-1a, 64 bits, hex): `weft-wg` reports the digest of
/// the configuration it applied, so the agent knows its last write is live. Not a MAC: it
/// only tells versions apart.
pub fn config_digest(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// One peer in [`DeviceStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its public key.
    pub public_key: [u8; 32],
    /// Milliseconds since the last completed WireGuard handshake (`None`: never).
    pub handshake_age_ms: Option<u64>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// What `weft-wg` reports in its status file (`<config>.status`, rewritten atomically after
/// every apply and every few seconds):
///
/// ```text
/// public_key = <base64>
/// listen_port = 51820
/// applied = <config_digest of the applied configuration>
/// peer = <base64> <handshake age ms or -> <rx bytes> <tx bytes>
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// The device's public key.
    pub public_key: [u8; 32],
    /// Its UDP port.
    pub listen_port: u16,
    /// Digest of the configuration text last applied.
    pub applied: String,
    /// Its peers.
    pub peers: Vec<PeerStatus>,
}

impl DeviceStatus {
    /// The status file's text.
    pub fn render(&self) -> String {
        let mut s = format!(
            "public_key = {}\nlisten_port = {}\napplied = {}\n",
            encode_key(&self.public_key),
            self.listen_port,
            self.applied
        );
        for p in &self.peers {
            let age = p
                .handshake_age_ms
                .map_or_else(|| "-".to_string(), |a| a.to_string());
            s.push_str(&format!(
                "peer = {} {age} {} {}\n",
                encode_key(&p.public_key),
                p.rx_bytes,
                p.tx_bytes
            ));
        }
        s
    }

    /// Parses a status file (strict, like the configuration).
    pub fn parse(text: &str) -> Result<DeviceStatus, String> {
        let (mut public_key, mut listen_port, mut applied) = (None, None, None);
        let mut peers = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| format!("line {}: not key = value", i + 1))?;
            match k {
                "public_key" => public_key = Some(decode_key(v)?),
                "listen_port" => {
                    listen_port = Some(v.parse::<u16>().map_err(|e| format!("listen_port: {e}"))?)
                }
                "applied" => applied = Some(v.to_string()),
                "peer" => {
                    let f: Vec<&str> = v.split_whitespace().collect();
                    let [key, age, rx, tx] = f[..] else {
                        return Err(format!("line {}: peer needs 4 fields", i + 1));
                    };
                    let num =
                        |s: &str| s.parse::<u64>().map_err(|e| format!("line {}: {e}", i + 1));
                    peers.push(PeerStatus {
                        public_key: decode_key(key)?,
                        handshake_age_ms: if age == "-" { None } else { Some(num(age)?) },
                        rx_bytes: num(rx)?,
                        tx_bytes: num(tx)?,
                    });
                }
                other => return Err(format!("line {}: unknown key {other}", i + 1)),
            }
        }
        Ok(DeviceStatus {
            public_key: public_key.ok_or("no public_key")?,
            listen_port: listen_port.ok_or("no listen_port")?,
            applied: applied.ok_or("no applied")?,
            peers,
        })
    }
}

/// The userspace device (gotatun).
#[cfg(feature = "userspace-wg")]
pub mod userspace {
    use std::future::Future;
    use std::sync::Arc;

    use gotatun::device::{Device, DeviceBuilder, Peer};
    use gotatun::udp::socket::UdpSocketFactory;
    use gotatun::x25519::{PublicKey, StaticSecret};
    use ipnetwork::IpNetwork;
    use ring::rand::SecureRandom;
    use thiserror::Error;

    use super::DeviceConfig;
    use crate::tun_offload::{self, Counters, VnetRecv, VnetSend};
    use crate::udp_gso::{GsoFactory, SendCounters};

    /// `SO_RCVBUF`/`SO_SNDBUF` asked for on the WireGuard UDP socket (the kernel caps it at
    /// `net.core.rmem_max`/`wmem_max`). With the default (208 KiB) the receiving `weft-wg`
    /// overflowed its socket under one TCP stream (lab: `UdpRcvbufErrors` equal to the
    /// sender's retransmissions, ~32k in 6 s) and the encrypted path ran at half speed.
    pub const UDP_BUFFER: usize = 4 << 20;

    /// The device did not come up or failed.
    #[derive(Debug, Error)]
    pub enum DeviceError {
        /// gotatun refused the configuration or could not open the TUN device.
        #[error("wireguard device: {0}")]
        Device(String),
        /// An allowed IP gotatun does not accept.
        #[error("allowed IP {0}: {1}")]
        AllowedIp(String, String),
        /// The device stopped with an unrecoverable error.
        #[error("wireguard device failed")]
        Fatal,
    }

    /// A fresh private key.
    pub fn generate_private_key(rng: &dyn SecureRandom) -> [u8; 32] {
        let mut k = [0; 32];
        rng.fill(&mut k).expect("the system random generator works");
        StaticSecret::from(k).to_bytes()
    }

    /// The public key of `private`.
    pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
        PublicKey::from(&StaticSecret::from(*private)).to_bytes()
    }

    fn peer_of(p: &super::PeerConfig) -> Result<Peer, DeviceError> {
        let mut peer = Peer::new(PublicKey::from(p.public_key));
        for (addr, len) in &p.allowed_ips {
            let net = IpNetwork::new(*addr, *len)
                .map_err(|e| DeviceError::AllowedIp(format!("{addr}/{len}"), e.to_string()))?;
            peer = peer.with_allowed_ip(net);
        }
        if let Some(e) = p.endpoint {
            peer = peer.with_endpoint(e);
        }
        peer.keepalive = p.persistent_keepalive;
        Ok(peer)
    }

    /// A running device.
    pub struct Running {
        device: Device<(GsoFactory, VnetSend, VnetRecv)>,
        /// What the TUN writer merged (see [`crate::gro`]).
        tun: Arc<Counters>,
        /// What the UDP side sent (see [`crate::udp_gso`]).
        udp: Arc<SendCounters>,
        current: DeviceConfig,
        /// Started without peers: gotatun opens its socket and reads the TUN device only
        /// once the device has peers, so it starts suspended and is resumed at the first
        /// configuration that has some.
        suspended: bool,
    }

    impl Running {
        /// Brings up the device on TUN `interface` (the caller configures the interface's
        /// addresses and routes); `offload`: write runs of TCP segments merged to the TUN
        /// device ([`crate::gro`]) and send runs of datagrams with UDP segmentation offload
        /// ([`crate::udp_gso`]); false: one write and one datagram per packet, as gotatun does.
        pub async fn start(
            cfg: &DeviceConfig,
            interface: &str,
            offload: bool,
        ) -> Result<Running, DeviceError> {
            let peers = cfg
                .peers
                .iter()
                .map(peer_of)
                .collect::<Result<Vec<_>, _>>()?;
            let (tun_tx, tun_rx, tun) = tun_offload::open(interface, offload)
                .map_err(|e| DeviceError::Device(format!("TUN device {interface}: {e}")))?;
            let udp = Arc::new(SendCounters::default());
            let device = DeviceBuilder::new()
                .with_udp(GsoFactory {
                    inner: UdpSocketFactory {
                        recv_buffer_size: Some(UDP_BUFFER),
                        send_buffer_size: Some(UDP_BUFFER),
                    },
                    segment: offload,
                    counters: udp.clone(),
                })
                .with_ip_pair(tun_tx, tun_rx)
                .with_private_key(StaticSecret::from(cfg.private_key))
                .with_listen_port(cfg.listen_port)
                .with_peers(peers)
                .suspended(cfg.peers.is_empty())
                .build()
                .await
                .map_err(|e| DeviceError::Device(e.to_string()))?;
            let running = Running {
                device,
                tun,
                udp,
                current: cfg.clone(),
                suspended: cfg.peers.is_empty(),
            };
            let all: Vec<[u8; 32]> = cfg
                .peers
                .iter()
                .filter(|p| p.endpoint.is_some())
                .map(|p| p.public_key)
                .collect();
            running.initiate(&all).await;
            Ok(running)
        }

        /// Applies a new configuration live: peers gone are removed, new or changed peers
        /// added or updated in place (sessions of unchanged peers are kept), the port and key
        /// changed if they differ. The TUN device stays up throughout.
        pub async fn apply(&mut self, cfg: &DeviceConfig) -> Result<usize, DeviceError> {
            let peers = cfg
                .peers
                .iter()
                .map(peer_of)
                .collect::<Result<Vec<_>, _>>()?;
            let wanted: std::collections::BTreeSet<[u8; 32]> =
                cfg.peers.iter().map(|p| p.public_key).collect();
            let old = &self.current;
            let gone: Vec<[u8; 32]> = old
                .peers
                .iter()
                .map(|p| p.public_key)
                .filter(|k| !wanted.contains(k))
                .collect();
            let changed: Vec<Peer> = cfg
                .peers
                .iter()
                .zip(peers)
                .filter(|(p, _)| !old.peers.contains(p))
                .map(|(_, peer)| peer)
                .collect();
            // Handshakes start with every new or changed peer now rather than at its first
            // packet: the agent routes pods over the tunnel only to peers with a completed
            // handshake (proof that both ends have each other configured).
            let fresh: Vec<[u8; 32]> = cfg
                .peers
                .iter()
                .filter(|p| p.endpoint.is_some() && !old.peers.contains(p))
                .map(|p| p.public_key)
                .collect();
            let n = gone.len() + changed.len();
            let (key, port) = (cfg.private_key, cfg.listen_port);
            let (key_changed, port_changed) = (key != old.private_key, port != old.listen_port);
            self.device
                .write(async |w| {
                    for k in &gone {
                        w.remove_peer(&PublicKey::from(*k)).await;
                    }
                    w.add_or_update_peers(changed).await;
                    if port_changed {
                        w.set_listen_port(port);
                    }
                    if key_changed {
                        w.set_private_key(StaticSecret::from(key)).await;
                    }
                })
                .await
                .map_err(|e| DeviceError::Device(e.to_string()))?;
            if self.suspended && !cfg.peers.is_empty() {
                self.device
                    .resume()
                    .await
                    .map_err(|e| DeviceError::Device(e.to_string()))?;
                self.suspended = false;
            }
            self.current = cfg.clone();
            self.initiate(&fresh).await;
            Ok(n)
        }

        /// Sends a handshake initiation to each of `peers` (without waiting for the answer:
        /// the device's own tasks complete it).
        async fn initiate(&self, peers: &[[u8; 32]]) {
            for k in peers {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_millis(20),
                    self.device.force_handshake(&PublicKey::from(*k)),
                )
                .await;
            }
        }

        /// The device's status (for the status file).
        pub async fn status(&self, applied: &str) -> super::DeviceStatus {
            let peers = self.device.peers().await;
            super::DeviceStatus {
                public_key: public_key(&self.current.private_key),
                listen_port: self.current.listen_port,
                applied: applied.to_string(),
                peers: peers
                    .into_iter()
                    .map(|p| super::PeerStatus {
                        public_key: p.peer.public_key.to_bytes(),
                        handshake_age_ms: p.stats.last_handshake.map(|d| d.as_millis() as u64),
                        rx_bytes: p.stats.rx_bytes as u64,
                        tx_bytes: p.stats.tx_bytes as u64,
                    })
                    .collect(),
            }
        }

        /// Waits until the device fails.
        pub async fn failed(&mut self) {
            self.device.wait().await
        }

        /// What the offloads did since the start, as one log line: packets written to the
        /// TUN device and the writes they took, datagrams sent and the sends they took.
        pub fn offload_report(&self) -> String {
            let (t, errors) = (self.tun.stats(), self.tun.write_errors());
            let (datagrams, sends, refused, off) = self.udp.get();
            format!(
                "{} packet(s) written to the TUN device in {} write(s) ({} merged, {errors} write error(s)); {datagrams} datagram(s) sent in {sends} send(s) (segmentation offload {}{})",
                t.packets,
                t.frames,
                t.merged,
                if off { "off" } else { "on" },
                if refused > 0 {
                    format!(", refused {refused} time(s)")
                } else {
                    String::new()
                }
            )
        }

        /// Stops the device (the TUN device goes away with it).
        pub async fn stop(self) {
            self.device.stop().await
        }
    }

    /// Brings up the device on TUN `interface` and runs it until `shutdown` completes (or
    /// the device fails). The caller configures the interface's addresses and routes.
    pub async fn run(
        cfg: &DeviceConfig,
        interface: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DeviceError> {
        let mut running = Running::start(cfg, interface, true).await?;
        tokio::select! {
            () = running.failed() => {
                running.stop().await;
                Err(DeviceError::Fatal)
            }
            () = shutdown => {
                running.stop().await;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "YGU0T3Ng5Dq6rM1vUMh7Jgd1qFmLkG4j8cS7yZcPj3o=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    #[test]
    fn a_wireguard_config_parses_and_renders_back() {
        let text = format!(
            "# weft-wg\n[Interface]\nPrivateKey = {KEY_A}\nListenPort = 51821\n\n[Peer]\nPublicKey = {KEY_B}\n\
             Endpoint = 198.18.0.2:51820\nAllowedIPs = 10.244.2.0/24, fd00:10:244:2::/64\nPersistentKeepalive = 25\n\
             [Peer]\nPublicKey = {KEY_A} # no endpoint\n"
        );
        let cfg = DeviceConfig::parse(&text).expect("parses");
        assert_eq!(cfg.listen_port, 51821);
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(
            cfg.peers[0].endpoint,
            Some("198.18.0.2:51820".parse().expect("addr"))
        );
        assert_eq!(
            cfg.peers[0].allowed_ips,
            vec![
                ("10.244.2.0".parse().expect("ip"), 24),
                ("fd00:10:244:2::".parse().expect("ip"), 64)
            ]
        );
        assert_eq!(cfg.peers[0].persistent_keepalive, Some(25));
        assert_eq!(cfg.peers[1].endpoint, None);
        assert_eq!(DeviceConfig::parse(&cfg.render()), Ok(cfg));
    }

    #[test]
    fn invalid_configs_say_which_line() {
        let bad = [
            ("[Peer]\nPublicKey = x\n", 2),
            (
                &*format!("[Interface]\nPrivateKey = {KEY_A}\nMtu = 1400\n"),
                3,
            ),
            (
                &*format!(
                    "[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 10.0.0.0/33\n"
                ),
                5,
            ),
            (
                &*format!("[Interface]\nPrivateKey = {KEY_A}\n[Interface]\n"),
                3,
            ),
            ("ListenPort = 1\n", 1),
            ("[Wat]\n", 1),
            (&*format!("[Interface]\nPrivateKey = {}\n", &KEY_A[..20]), 2),
        ];
        for (text, line) in bad {
            match DeviceConfig::parse(text) {
                Err(ConfigError::Line { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert_eq!(
            DeviceConfig::parse("[Interface]\nListenPort = 1\n"),
            Err(ConfigError::NoPrivateKey)
        );
        assert!(matches!(
            DeviceConfig::parse(&format!(
                "[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nEndpoint = 1.2.3.4:5\n"
            )),
            Err(ConfigError::Line { line: 0, .. })
        ));
    }

    #[test]
    fn status_files_round_trip_and_digests_tell_versions_apart() {
        let st = DeviceStatus {
            public_key: decode_key(KEY_A).expect("key"),
            listen_port: 51820,
            applied: config_digest("x"),
            peers: vec![
                PeerStatus {
                    public_key: decode_key(KEY_B).expect("key"),
                    handshake_age_ms: Some(1200),
                    rx_bytes: 3,
                    tx_bytes: 4,
                },
                PeerStatus {
                    public_key: decode_key(KEY_A).expect("key"),
                    handshake_age_ms: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
            ],
        };
        assert_eq!(DeviceStatus::parse(&st.render()), Ok(st));
        assert_ne!(config_digest("a"), config_digest("b"));
        assert_eq!(config_digest("a").len(), 16);
        assert!(DeviceStatus::parse("listen_port = 1\n").is_err());
        assert!(DeviceStatus::parse("public_key = x\n").is_err());
    }

    #[cfg(feature = "userspace-wg")]
    #[test]
    fn public_keys_match_wireguards_derivation() {
        // RFC 7748 §6.1 test vector (Alice).
        let private: [u8; 32] = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let public = userspace::public_key(&private);
        assert_eq!(
            encode_key(&public),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
    }
}
