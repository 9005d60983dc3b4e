//! [`NftError`]: every way talking to nftables can fail, and what the caller should do.

use std::io;
use std::path::PathBuf;

/// Why an nftables operation failed.
///
/// Retrying: after [`NftError::Rejected`] and [`NftError::BatchRejected`] the kernel is exactly
/// as before (the transaction was refused whole); after [`NftError::OutcomeUnknown`] it may or
/// may not hold the transaction, so dump before diffing again. [`NftError::Encode`] is a bug in
/// what was asked (retrying the same ops fails the same way).
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The kernel is older than weft supports (5.15), or its version cannot be read.
    #[error("kernel {release} is older than 5.15, the oldest weft supports")]
    KernelTooOld {
        /// `uname -r`.
        release: String,
    },
    /// A socket call failed.
    #[error("netlink: {step}: {source}")]
    Socket {
        /// What we were doing.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An op cannot be written as nftables messages (nothing was sent).
    #[error("op {index} ({object}) cannot be written: {reason}")]
    Encode {
        /// Index of the op in the batch.
        index: usize,
        /// The op, in words.
        object: String,
        /// Why.
        reason: String,
    },
    /// The kernel refused the transaction; nothing of it was applied. Names the first op
    /// (in batch order) whose message failed.
    #[error(
        "transaction rejected at op {index} ({object}): {source}; {errors} message(s) failed, nothing was applied"
    )]
    Rejected {
        /// Index of the op in the batch.
        index: usize,
        /// The op, in words.
        object: String,
        /// The kernel's errno.
        #[source]
        source: io::Error,
        /// How many messages of the batch failed in all.
        errors: usize,
    },
    /// The kernel refused the batch as a whole (not one message of it); nothing was applied.
    #[error("transaction rejected as a whole: {source}; nothing was applied")]
    BatchRejected {
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// Acks were lost (`ENOBUFS`) or never came: the transaction may or may not have been
    /// committed. Dump and diff again.
    #[error("outcome unknown ({reason}): dump the table and diff again")]
    OutcomeUnknown {
        /// What happened.
        reason: String,
    },
    /// A dump could not be read consistently.
    #[error("dump of table {table:?}: {reason}")]
    Dump {
        /// Table name.
        table: String,
        /// Why.
        reason: String,
    },
    /// The network namespace to run in could not be entered.
    #[error("network namespace {path}: {source}")]
    Netns {
        /// Its path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The [`crate::NftThread`] is gone (it panicked or was stopped).
    #[error("the nftables thread has stopped")]
    ThreadGone,
}

impl NftError {
    /// The errno the kernel answered, for [`NftError::Rejected`] and [`NftError::BatchRejected`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            NftError::Rejected { source, .. } | NftError::BatchRejected { source } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    /// Whether the kernel may hold the transaction or not: the caller must dump before
    /// trusting any state it remembers.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, NftError::OutcomeUnknown { .. })
    }
}
