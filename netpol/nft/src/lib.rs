//! weft's nftables backend: applies [`weft_netpol::Op`]s to the kernel as one netlink
//! transaction, and reads weft's table back as a [`weft_netpol::Ruleset`].
//!
//! **What it owns**: one table of family `inet` (by default `weft`), in one network namespace.
//! It never names another table: kube-proxy's, the host firewall's and anyone else's are not
//! touched. It never flushes the table: changes are the ops `weft_netpol::diff` computed.
//!
//! **The flow**:
//! 1. [`NftBackend::dump`] reads the table over netlink ([`walk`]: `GETGEN`, `GETTABLE`,
//!    `GETCHAIN`, `GETSET`, `GETSETELEM`, `GETRULE`, `GETGEN`) and interprets it
//!    ([`dump::interpret`]):
//!    the same `Ruleset` the compiler produces for that state, rules recognised back from
//!    their exact bytecode ([`expr::raise`]), interval sets reassembled into ranges.
//! 2. `weft_netpol::diff(current, desired)` gives the ops.
//! 3. [`NftBackend::apply`] writes them as one batch, one `sendto`, and reads an ack for every
//!    message: committed whole, or refused whole with the failing op named, or "outcome
//!    unknown, dump again" when acks were lost.
//!
//! [`sync`] is the three steps in one call; over an unchanged kernel it sends nothing.
//!
//! **Fidelity**: every rule, set and element is written exactly as `nft` 1.0.6 writes the
//! same `nft -f` text ([`expr`], [`set`]), so `nft list ruleset` prints our table faithfully and
//! its output, loaded with `nft -f`, gives back the same netlink objects.
//!
//! **Threads**: the netlink socket is `!Send`; a backend lives on one OS thread, in the network
//! namespace that thread was in when it created the backend. [`NftThread`] runs one on a
//! dedicated thread (optionally inside a named namespace) and takes requests over a channel.
//!
//! **Why FFI**: the safe `nftnl` API cannot express sets with flags or verdict data, interval
//! and concatenated elements, concatenation and vmap lookups, comments on tables and sets,
//! element destroys, adds without `NLM_F_EXCL`, or listing; and its batches split into pages
//! that are sent as separate datagrams. The one module that goes below it, `sys`, says which
//! call covers which gap; everything else in this crate is safe code (`#![deny(unsafe_code)]`).
//!
//! Newcomers: start with [`sync`] and [`NftBackend`].
//!
//! ```no_run
//! use weft_netpol::Ruleset;
//! use weft_nft::NftThread;
//!
//! # fn main() -> Result<(), weft_nft::NftError> {
//! // The backend of one node, in that node's network namespace.
//! let nft = NftThread::spawn_in_netns("/run/netns/node-1")?;
//! let desired = Ruleset::new("weft"); // what the compiler produced
//! let (diff, report) = nft.sync(desired)?;
//! println!("{} ops in {} messages, {:?}", diff.ops.len(), report.messages, report.elapsed);
//! # Ok(())
//! # }
//! ```

#![deny(unsafe_code)]

pub mod backend;
pub mod conntrack;
pub mod counters;
pub mod dump;
pub mod error;
pub mod expr;
pub mod monitor;
pub mod netlink;
pub mod nflog;
pub mod set;
mod sys;
pub mod thread;
pub mod walk;

pub use backend::{ApplyReport, KernelVersion, NftBackend, NftOptions};
pub use dump::{Foreign, KernelTable, RawTable};
pub use error::NftError;
pub use thread::NftThread;

use weft_netpol::diff::Diff;
use weft_netpol::ruleset::Ruleset;

/// Brings the kernel's copy of `desired.table` to `desired`: dump, diff, apply the difference
/// in one transaction. Over a kernel that already holds `desired`, nothing is sent (the report
/// is empty). A table of another schema version is replaced in the same transaction; anything
/// in the table weft did not write is replaced too (see [`dump`]).
pub fn sync(backend: &mut NftBackend, desired: &Ruleset) -> Result<(Diff, ApplyReport), NftError> {
    let current = backend.dump(&desired.table)?;
    let diff = weft_netpol::diff(current.as_ref(), desired);
    if diff.is_empty() {
        return Ok((diff, ApplyReport::default()));
    }
    let report = backend.apply(&desired.table, &diff.ops)?;
    Ok((diff, report))
}
