//! `weft-wg`: the long-lived userspace WireGuard process (DESIGN §5). It owns the TUN device
//! and keeps it up across agent restarts and upgrades; the agent writes its configuration and
//! sets the device's addresses and routes.
//!
//! ```text
//! weft-wg run --config /var/lib/weft/wg/wgweft.conf [--interface wgweft] [--offload on|off]
//! weft-wg genkey            # a private key, base64
//! weft-wg pubkey < private  # its public key
//! ```
//!
//! Live reload: the configuration file is re-read on SIGHUP and whenever its content changes
//! (checked every 250 ms), and applied to the running device (peers added, updated or
//! removed; the TUN device and unchanged peers' sessions stay up). A configuration that does
//! not parse is logged and ignored: the device keeps the last good one. Until the file exists
//! (the agent writes it), `weft-wg` waits. After every apply and every 2 s it writes
//! `<config>.status` ([`weft_mesh::wg::DeviceStatus`]): its public key, port, the digest of
//! the configuration applied, and per peer the age of the last handshake.
//!
//! `--offload` (default on): runs of decrypted TCP segments are written to the TUN device as one
//! packet (`weft_mesh::gro`) and runs of encrypted datagrams to one peer are sent with UDP
//! segmentation offload (`weft_mesh::udp_gso`); `off` writes and sends each packet alone, as
//! gotatun does, for comparisons.

use std::io::Read as _;
use std::process::ExitCode;

use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_mesh::wg::{DeviceConfig, config_digest, decode_key, encode_key, userspace};

/// Default TUN device name (not `weft…`: the policy engine treats those as pod interfaces).
const DEFAULT_INTERFACE: &str = "wgweft";

fn usage() -> ExitCode {
    eprintln!(
        "usage: weft-wg run --config FILE [--interface NAME] [--offload on|off] | genkey | pubkey"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("genkey") => {
            println!(
                "{}",
                encode_key(&userspace::generate_private_key(
                    &ring::rand::SystemRandom::new()
                ))
            );
            ExitCode::SUCCESS
        }
        Some("pubkey") => {
            let mut s = String::new();
            if std::io::stdin().read_to_string(&mut s).is_err() {
                return usage();
            }
            match decode_key(&s) {
                Ok(k) => {
                    println!("{}", encode_key(&userspace::public_key(&k)));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("weft-wg: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("run") => {
            let mut config = None;
            let mut interface = DEFAULT_INTERFACE.to_string();
            let mut offload = true;
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match (a.as_str(), it.next().map(String::as_str)) {
                    ("--config", Some(v)) => config = Some(v.to_string()),
                    ("--interface", Some(v)) => interface = v.to_string(),
                    ("--offload", Some("on")) => offload = true,
                    ("--offload", Some("off")) => offload = false,
                    _ => return usage(),
                }
            }
            let Some(config) = config else { return usage() };
            match run(&config, &interface, offload) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("weft-wg: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => usage(),
    }
}

fn log(msg: &str) {
    eprintln!("weft-wg: {msg}");
}

/// Writes `path` atomically (temporary file in the same directory, then rename).
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("status.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn run(config: &str, interface: &str, offload: bool) -> Result<(), String> {
    let config = PathBuf::from(config);
    let status_path = PathBuf::from(format!("{}.status", config.display()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int, mut hup) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(t), Ok(i), Ok(h)) => (t, i, h),
            _ => return Err("cannot install signal handlers".to_string()),
        };
        // Wait for the first configuration (the agent writes it).
        let mut waited = 0u64;
        let (text, cfg) = loop {
            match std::fs::read_to_string(&config) {
                Ok(text) => match DeviceConfig::parse(&text) {
                    Ok(cfg) => break (text, cfg),
                    Err(e) => return Err(format!("{}: {e}", config.display())),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if waited.is_multiple_of(60_000) {
                        log(&format!("waiting for {} (the agent writes it)", config.display()));
                    }
                }
                Err(e) => return Err(format!("{}: {e}", config.display())),
            }
            tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                () = tokio::time::sleep(Duration::from_millis(250)) => waited += 250,
            }
        };
        log(&format!(
            "starting {interface}, port {}, {} peer(s), offloads {}",
            cfg.listen_port,
            cfg.peers.len(),
            if offload { "on" } else { "off" }
        ));
        let mut running = userspace::Running::start(&cfg, interface, offload)
            .await
            .map_err(|e| e.to_string())?;
        let mut applied_text = text;
        let mut applied = config_digest(&applied_text);
        let mut poll = tokio::time::interval(Duration::from_millis(250));
        let mut report = tokio::time::interval(Duration::from_secs(2));
        let mut status_dirty = true;
        let result = loop {
            let mut check = false;
            tokio::select! {
                _ = term.recv() => break Ok(()),
                _ = int.recv() => break Ok(()),
                () = running.failed() => break Err("the WireGuard device failed".to_string()),
                _ = hup.recv() => { log("SIGHUP: reloading"); check = true; }
                _ = poll.tick() => check = true,
                _ = report.tick() => status_dirty = true,
            }
            if check {
                match std::fs::read_to_string(&config) {
                    Ok(text) if text != applied_text => {
                        // Each text is tried once: a bad one is reported once, not every 250 ms.
                        applied_text.clone_from(&text);
                        match DeviceConfig::parse(&text) {
                            Ok(cfg) => match running.apply(&cfg).await {
                                Ok(n) => {
                                    log(&format!(
                                        "configuration reloaded: {} peer(s), {n} added, changed or removed",
                                        cfg.peers.len()
                                    ));
                                    applied = config_digest(&text);
                                    status_dirty = true;
                                }
                                Err(e) => log(&format!(
                                    "reload failed, keeping the previous configuration: {e}"
                                )),
                            },
                            Err(e) => log(&format!(
                                "{}: {e}; keeping the previous configuration",
                                config.display()
                            )),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => log(&format!(
                        "{}: {e}; keeping the previous configuration",
                        config.display()
                    )),
                }
            }
            if status_dirty {
                status_dirty = false;
                let st = running.status(&applied).await;
                if let Err(e) = write_atomically(&status_path, &st.render()) {
                    log(&format!("{}: {e}", status_path.display()));
                }
            }
        };
        let _ = std::fs::remove_file(&status_path);
        log(&format!("stopping: {}", running.offload_report()));
        running.stop().await;
        result
    })
}
