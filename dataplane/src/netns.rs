//! Run netlink work inside another network namespace.
//!
//! Why a dedicated OS thread: a netlink socket belongs to the network namespace of the thread
//! that created it, and `setns(2)` changes the namespace of the calling *thread* only. Doing
//! that on a tokio worker would leave a pooled thread in a foreign namespace for whatever task
//! runs there next. rtnetlink's own `NetworkNamespace::add` forks, which is unsafe in a
//! multi-threaded process (only async-signal-safe calls are allowed between fork and exec). So
//! each call here starts a fresh thread, moves it with `setns(fd, CLONE_NEWNET)`, builds a
//! current-thread tokio runtime and an rtnetlink connection there, runs the closure, and lets
//! the thread end: a thread that changed namespace is never reused.
//!
//! This is the only module allowed `unsafe` (one `libc::setns` call).

use std::fs::File;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Why work inside a namespace could not run.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace path could not be opened (it does not exist, or is not a netns).
    #[error("open netns {path}: {source}")]
    Open {
        /// The namespace path given by the caller.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `setns(2)` refused.
    #[error("setns into {path}: {source}")]
    Setns {
        /// The namespace path given by the caller.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The runtime or the netlink socket could not be created in the namespace.
    #[error("netlink in netns {path}: {source}")]
    Netlink {
        /// The namespace path given by the caller.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The worker thread panicked or could not be spawned.
    #[error("netns worker thread for {path} failed: {reason}")]
    Thread {
        /// The namespace path given by the caller.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
}

/// Move the calling thread into the network namespace at `path`.
///
/// Only for threads that are never reused afterwards (see the module docs).
fn enter(path: &Path) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })?;
    // SAFETY: `setns` only reads the fd, which stays open for the duration of the call (the
    // File lives until the end of this function); CLONE_NEWNET affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Setns {
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Run `work` with an rtnetlink [`rtnetlink::Handle`] bound to the namespace at `path`, on a
/// dedicated thread, and wait for it without blocking the caller's runtime.
pub async fn run_in<F, Fut, T>(path: &Path, work: F) -> Result<T, NetnsError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let (tx, rx) = futures::channel::oneshot::channel();
    let owned = path.to_owned();
    let spawned = std::thread::Builder::new()
        .name("weft-netns".into())
        .spawn(move || {
            let _ = tx.send(run_here(&owned, work));
        });
    if let Err(e) = spawned {
        return Err(NetnsError::Thread {
            path: path.to_owned(),
            reason: e.to_string(),
        });
    }
    match rx.await {
        Ok(result) => result,
        Err(_) => Err(NetnsError::Thread {
            path: path.to_owned(),
            reason: "worker ended without an answer (panic)".into(),
        }),
    }
}

/// Blocking twin of [`run_in`], for callers without a runtime (the plugin, tests).
pub fn run_in_blocking<F, Fut, T>(path: &Path, work: F) -> Result<T, NetnsError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let owned = path.to_owned();
    std::thread::Builder::new()
        .name("weft-netns".into())
        .spawn(move || run_here(&owned, work))
        .map_err(|e| NetnsError::Thread {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
        .join()
        .map_err(|_| NetnsError::Thread {
            path: path.to_owned(),
            reason: "worker panicked".into(),
        })?
}

fn run_here<F, Fut, T>(path: &Path, work: F) -> Result<T, NetnsError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: Future<Output = T>,
{
    enter(path)?;
    let netlink_err = |source| NetnsError::Netlink {
        path: path.to_owned(),
        source,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(netlink_err)?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(netlink_err)?;
        tokio::spawn(connection);
        Ok(work(handle).await)
    })
}

/// Run `work` with a handle in the caller's own namespace on a fresh current-thread runtime
/// (for synchronous callers such as the plugin).
pub fn run_here_blocking<F, Fut, T>(work: F) -> std::io::Result<T>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: Future<Output = T>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(work(handle).await)
    })
}

/// Run plain blocking `work` (sockets, files) on a new thread inside the namespace at
/// `path`; the thread ends with the work. Used by tests to run echo servers in pods.
pub fn spawn_in<F, T>(
    path: &Path,
    work: F,
) -> std::io::Result<std::thread::JoinHandle<Result<T, NetnsError>>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let owned = path.to_owned();
    std::thread::Builder::new()
        .name("weft-netns".into())
        .spawn(move || {
            enter(&owned)?;
            Ok(work())
        })
}
