//! Named network namespaces (`/run/netns/NAME`, as `ip netns` makes them) and moving the
//! calling thread into one. `setns(2)` moves only the calling thread; sockets belong to the
//! namespace of the thread that creates them.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;

use nix::sched::CloneFlags;

/// The path of a named namespace.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{name}"))
}

/// Opens a named namespace (keep the file to enter it cheaply many times).
pub fn open(name: &str) -> std::io::Result<File> {
    File::open(path(name))
}

/// Moves the calling thread into the namespace.
pub fn enter(ns: &File) -> std::io::Result<()> {
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

/// The calling thread's current namespace (to come back to).
pub fn current() -> std::io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

/// Runs `ip ARGS`, returning stderr on failure.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates a namespace with loopback up.
pub fn add(name: &str) -> Result<(), String> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Deletes a namespace if it exists.
pub fn delete(name: &str) -> Result<(), String> {
    if !path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name])
}

/// Names of the existing namespaces that start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}
