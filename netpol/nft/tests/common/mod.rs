//! Throwaway network namespaces for kernel tests.
//!
//! [`Netns::new`] creates `weft-t-<pid>-<n>` (or another prefix, [`use_prefix`]) with `ip netns add` and removes it on drop, also
//! when the test panics. Namespaces left by a test process that was killed (its pid is gone)
//! are removed by the next run. Tests that need root skip with a printed reason instead.
//! The root namespace's firewall is never touched: every `nft` runs under `ip netns exec`.

#![allow(dead_code)] // each test binary uses a part of it

pub mod shapes;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);
static PREFIX: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Makes this test binary name its namespaces `<prefix>-<pid>-<n>` instead of `weft-t-…`
/// (call it before the first [`Netns::new`]; later calls are ignored).
pub fn use_prefix(prefix: &'static str) {
    let _ = PREFIX.set(prefix);
}

/// The namespace name prefix: [`use_prefix`], else `$WEFT_NETNS_PREFIX` (e.g. to run the
/// kernel benchmark under another prefix), else `weft-t`.
fn prefix() -> &'static str {
    PREFIX.get_or_init(|| match std::env::var("WEFT_NETNS_PREFIX") {
        Ok(p) if !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
            Box::leak(p.into_boxed_str())
        }
        _ => "weft-t",
    })
}

/// Why kernel tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Some(format!(
            "needs root to create network namespaces (euid {euid})"
        ));
    }
    for tool in ["ip", "nft"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// Skips the calling test (returns from it) with a printed reason when kernel tests cannot run.
#[macro_export]
macro_rules! need_root {
    () => {
        if let Some(reason) = common::skip_reason() {
            println!("SKIPPED: {reason}");
            return;
        }
    };
}

/// A network namespace that exists while this value lives.
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

fn pid_alive(pid: &str) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces of earlier test processes that died before their guards ran.
fn remove_orphans() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix(prefix())
            .and_then(|r| r.strip_prefix('-'))
        else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !pid_alive(pid) {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

impl Netns {
    /// Creates a fresh namespace.
    pub fn new() -> Netns {
        remove_orphans();
        let name = format!(
            "{}-{}-{}",
            prefix(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(status.success(), "ip netns add {name} failed");
        Netns { name }
    }

    /// `/run/netns/NAME`, for `NftThread::spawn_in_netns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `nft ARGS` inside the namespace.
    pub fn nft_output(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "nft"])
            .args(args)
            .output()
            .expect("run nft")
    }

    /// Runs `nft ARGS` inside the namespace and returns stdout; panics on failure.
    pub fn nft(&self, args: &[&str]) -> String {
        let out = self.nft_output(args);
        assert!(
            out.status.success(),
            "nft {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("nft prints UTF-8")
    }

    /// Loads `text` with `nft -f -` inside the namespace; panics on failure.
    pub fn nft_file(&self, text: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nft -f");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write nft input");
        let out = child.wait_with_output().expect("wait for nft");
        assert!(
            out.status.success(),
            "nft -f failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `nft -j list ruleset` inside the namespace, parsed.
    pub fn nft_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.nft(&["-j", "list", "ruleset"])).expect("nft prints JSON")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
