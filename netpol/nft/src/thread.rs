//! [`NftThread`]: an [`NftBackend`] on a dedicated OS thread, driven over a channel.
//!
//! The backend's netlink socket (`mnl::Socket`) is `!Send`, and a socket belongs to the network
//! namespace of the thread that opened it. The thread is created, optionally moved into a
//! named network namespace with `setns`, and only then opens the socket; every request runs on
//! it, one at a time, in order. Dropping the handle stops the thread after its last request.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use weft_netpol::diff::{Diff, Op};
use weft_netpol::ruleset::Ruleset;

use crate::backend::{ApplyReport, NftBackend, NftOptions};
use crate::error::NftError;

type Job = Box<dyn FnOnce(&mut NftBackend) + Send>;

/// A handle to an [`NftBackend`] running on its own thread. `Send` and cheap to call.
pub struct NftThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl NftThread {
    /// A backend in this process's current network namespace.
    pub fn spawn() -> Result<NftThread, NftError> {
        NftThread::start(None, NftOptions::default())
    }

    /// A backend inside the network namespace at `path` (e.g. `/run/netns/NAME`).
    pub fn spawn_in_netns(path: impl AsRef<Path>) -> Result<NftThread, NftError> {
        NftThread::start(Some(path.as_ref().to_path_buf()), NftOptions::default())
    }

    /// Either of the above, with tuning knobs.
    pub fn start(netns: Option<PathBuf>, options: NftOptions) -> Result<NftThread, NftError> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), NftError>>(1);
        let thread = std::thread::Builder::new()
            .name("weft-nft".into())
            .spawn(move || {
                let setup = || -> Result<NftBackend, NftError> {
                    if let Some(path) = &netns {
                        let enter = File::open(path).and_then(|f| crate::sys::setns_net(&f));
                        enter.map_err(|source| NftError::Netns {
                            path: path.clone(),
                            source,
                        })?;
                    }
                    NftBackend::with_options(options)
                };
                let mut backend = match setup() {
                    Ok(b) => {
                        let _ = ready_tx.send(Ok(()));
                        b
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for job in jobs_rx {
                    job(&mut backend);
                }
            })
            .map_err(|source| NftError::Socket {
                step: "spawn the nftables thread",
                source,
            })?;
        ready_rx.recv().map_err(|_| NftError::ThreadGone)??;
        Ok(NftThread {
            jobs: Some(jobs_tx),
            thread: Some(thread),
        })
    }

    /// Runs `f` with the backend on its thread and returns its result.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut NftBackend) -> R + Send + 'static,
    ) -> Result<R, NftError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |b| {
            let _ = tx.send(f(b));
        });
        self.jobs
            .as_ref()
            .ok_or(NftError::ThreadGone)?
            .send(job)
            .map_err(|_| NftError::ThreadGone)?;
        rx.recv().map_err(|_| NftError::ThreadGone)
    }

    /// [`NftBackend::apply`] on the backend's thread.
    pub fn apply(&self, table: &str, ops: Vec<Op>) -> Result<ApplyReport, NftError> {
        let table = table.to_string();
        self.run(move |b| b.apply(&table, &ops))?
    }

    /// [`NftBackend::dump`] on the backend's thread.
    pub fn dump(&self, table: &str) -> Result<Option<Ruleset>, NftError> {
        let table = table.to_string();
        self.run(move |b| b.dump(&table))?
    }

    /// [`crate::sync`] on the backend's thread.
    pub fn sync(&self, desired: Ruleset) -> Result<(Diff, ApplyReport), NftError> {
        self.run(move |b| crate::sync(b, &desired))?
    }
}

impl Drop for NftThread {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
