//! This node's WireGuard device as the agent drives it: its key pair (state dir, 0600), the
//! configuration it writes (WireGuard's own format), and readiness: from `weft-wg`'s status
//! file (userspace) or from `wg` (the kernel module path, built but exercised only where the
//! module exists).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tracing::{error, info, warn};
use weft_mesh::wg::{DeviceConfig, DeviceStatus, decode_key, encode_key};

use super::WireguardBackend;

/// WireGuard's Reject-After-Time: a session this old carries no more data.
const REJECT_AFTER_MS: u64 = 180_000;

/// This node's WireGuard device, as the agent drives it.
pub(super) struct Wireguard {
    pub(super) backend: WireguardBackend,
    pub(super) private_key: [u8; 32],
    pub(super) config_path: PathBuf,
    pub(super) port: u16,
    pub(super) written: Option<String>,
    pub(super) public_key: Option<[u8; 32]>,
    pub(super) status: Option<DeviceStatus>,
    pub(super) problem: Option<String>,
}

pub(super) fn clamp(mut k: [u8; 32]) -> [u8; 32] {
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    k
}

impl Wireguard {
    /// Loads `dir/private.key` or creates it (0600).
    pub(super) fn open(
        dir: &Path,
        backend: WireguardBackend,
        port: u16,
    ) -> anyhow::Result<Wireguard> {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key_path = dir.join("private.key");
        let private_key = match std::fs::read_to_string(&key_path) {
            Ok(text) => {
                decode_key(&text).map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
                    .map_err(|_| anyhow::anyhow!("no randomness for the WireGuard key"))?;
                let k = clamp(k);
                let tmp = dir.join(".private.key.tmp");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .with_context(|| format!("writing {}", tmp.display()))?;
                std::io::Write::write_all(&mut f, format!("{}\n", encode_key(&k)).as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &key_path)?;
                info!(path = %key_path.display(), "generated this node's WireGuard key");
                k
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", key_path.display())),
        };
        Ok(Wireguard {
            backend,
            private_key,
            config_path: dir.join("wgweft.conf"),
            port,
            written: None,
            public_key: None,
            status: None,
            problem: Some("not started yet".into()),
        })
    }

    /// Takes over the configuration a previous run wrote, if it is this device's (same
    /// private key): it counts as written (an identical one is not written again) and its
    /// peers are returned. Anything else is left to be replaced by the first write.
    pub(super) fn adopt(&mut self) -> Vec<weft_mesh::wg::PeerConfig> {
        let text = match std::fs::read_to_string(&self.config_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                warn!(path = %self.config_path.display(), error = %e, "cannot read the previous WireGuard configuration; it is replaced");
                return Vec::new();
            }
        };
        match DeviceConfig::parse(&text) {
            Ok(cfg) if cfg.private_key == self.private_key && cfg.listen_port == self.port => {
                info!(path = %self.config_path.display(), peers = cfg.peers.len(), "WireGuard configuration of the previous run adopted");
                self.written = Some(text);
                cfg.peers
            }
            Ok(_) => {
                info!(path = %self.config_path.display(), "previous WireGuard configuration has another key or port; it is replaced");
                Vec::new()
            }
            Err(e) => {
                warn!(path = %self.config_path.display(), error = %e, "previous WireGuard configuration unreadable; it is replaced");
                Vec::new()
            }
        }
    }

    /// Writes the configuration (if it changed) and applies it (kernel) or lets `weft-wg`
    /// pick it up (userspace: it watches the file).
    pub(super) fn write(&mut self, cfg: &DeviceConfig) {
        let text = format!(
            "# written by the weft agent; weft-wg reloads it on change\n{}",
            cfg.render()
        );
        if self.written.as_deref() == Some(text.as_str()) {
            return;
        }
        if let Err(e) = write_private(&self.config_path, &text) {
            error!(path = %self.config_path.display(), error = %e, "cannot write the WireGuard configuration");
            return;
        }
        if self.backend == WireguardBackend::Kernel
            && let Err(e) = kernel::apply(&self.config_path)
        {
            error!(error = %e, "kernel WireGuard: configuration not applied");
            self.problem = Some(e);
            return;
        }
        self.written = Some(text);
    }

    /// Refreshes readiness from the device.
    pub(super) fn refresh(&mut self) {
        match self.backend {
            WireguardBackend::Userspace => {
                let path = PathBuf::from(format!("{}.status", self.config_path.display()));
                let fresh = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age < Duration::from_secs(10));
                let status = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| DeviceStatus::parse(&t).ok());
                let link = Path::new("/sys/class/net/wgweft").exists();
                match (status, fresh, link) {
                    (Some(st), true, true) => {
                        self.public_key = Some(st.public_key);
                        self.problem = None;
                        self.status = Some(st);
                    }
                    (_, _, false) => {
                        self.status = None;
                        self.problem = Some(format!(
                            "no wgweft device: is weft-wg running with --config {}?",
                            self.config_path.display()
                        ));
                    }
                    _ => {
                        self.status = None;
                        self.problem = Some(format!(
                            "weft-wg's status ({}) is missing or older than 10 s",
                            path.display()
                        ));
                    }
                }
            }
            WireguardBackend::Kernel => match kernel::public_key() {
                Ok(k) => {
                    self.public_key = Some(k);
                    self.problem = None;
                }
                Err(e) => {
                    self.problem = Some(e);
                    if let Err(e) = kernel::ensure_link() {
                        self.problem = Some(e);
                    }
                }
            },
        }
    }

    pub(super) fn ready(&self) -> bool {
        self.problem.is_none() && self.public_key.is_some() && self.written.is_some()
    }

    /// Whether pods may be routed to the peer with `key` over the tunnel: the device has it
    /// and has completed a handshake with it (so the peer has us configured too; weft-wg
    /// starts handshakes as soon as it gets a peer). Kernel path: whatever was applied.
    pub(super) fn peer_ready(&self, key: &[u8; 32]) -> bool {
        match self.backend {
            WireguardBackend::Kernel => self.ready(),
            // A session is usable until WireGuard's Reject-After-Time (180 s after its
            // handshake); a healthy peer rekeys every 2 minutes (keepalives every 25 s).
            WireguardBackend::Userspace => self.status.as_ref().is_some_and(|s| {
                s.peers.iter().any(|p| {
                    &p.public_key == key
                        && p.handshake_age_ms.is_some_and(|ms| ms < REJECT_AFTER_MS)
                })
            }),
        }
    }

    pub(super) fn handshake_age(&self, key: &[u8; 32]) -> Option<f64> {
        self.status
            .as_ref()?
            .peers
            .iter()
            .find(|p| &p.public_key == key)?
            .handshake_age_ms
            .map(|ms| ms as f64 / 1000.0)
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("conf.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The kernel module path: `wgweft` as a `wireguard` link, configured with `wg syncconf`
/// (the configuration file is in `wg`'s own format). Runs only where the module is loaded;
/// this project's machines have none, so it is built but not exercised by its tests.
mod kernel {
    use std::path::Path;
    use std::process::Command;

    use weft_mesh::wg::decode_key;

    fn run(args: &[&str]) -> Result<String, String> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .map_err(|e| format!("{}: {e}", args[0]))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Creates `wgweft` (type wireguard) if it does not exist.
    pub fn ensure_link() -> Result<(), String> {
        if Path::new("/sys/class/net/wgweft").exists() {
            return Ok(());
        }
        run(&["ip", "link", "add", "wgweft", "type", "wireguard"]).map(|_| ())
    }

    /// Applies the configuration file.
    pub fn apply(path: &Path) -> Result<(), String> {
        ensure_link()?;
        let path = path.display().to_string();
        run(&["wg", "syncconf", "wgweft", &path]).map(|_| ())
    }

    /// The device's public key.
    pub fn public_key() -> Result<[u8; 32], String> {
        decode_key(&run(&["wg", "show", "wgweft", "public-key"])?)
    }
}
