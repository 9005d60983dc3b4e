//! `weft-wg`: the long-lived userspace WireGuard process (DESIGN §5). It owns the TUN device
//! and keeps it up across agent restarts and upgrades; the agent writes its configuration and
//! sets the device's addresses and routes.
//!
//! ```text
//! weft-wg run --config /var/lib/weft/wg.conf [--interface wgweft]
//! weft-wg genkey            # a private key, base64
//! weft-wg pubkey < private  # its public key
//! ```

use std::io::Read as _;
use std::process::ExitCode;

use weft_mesh::wg::{DeviceConfig, decode_key, encode_key, userspace};

/// Default TUN device name (not `weft…`: the policy engine treats those as pod interfaces).
const DEFAULT_INTERFACE: &str = "wgweft";

fn usage() -> ExitCode {
    eprintln!("usage: weft-wg run --config FILE [--interface NAME] | genkey | pubkey");
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
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match (a.as_str(), it.next()) {
                    ("--config", Some(v)) => config = Some(v.clone()),
                    ("--interface", Some(v)) => interface = v.clone(),
                    _ => return usage(),
                }
            }
            let Some(config) = config else { return usage() };
            match run(&config, &interface) {
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

fn run(config: &str, interface: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("{config}: {e}"))?;
    let cfg = DeviceConfig::parse(&text).map_err(|e| format!("{config}: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        eprintln!(
            "weft-wg: starting {interface}, port {}, {} peer(s)",
            cfg.listen_port,
            cfg.peers.len()
        );
        userspace::run(&cfg, interface, shutdown)
            .await
            .map_err(|e| e.to_string())
    })
}
