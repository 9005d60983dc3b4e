//! Where the controller's transactions go: the kernel (through `weft-nft`) or, in tests, the
//! in-memory kernel of `weft-netpol`.

use weft_netpol::Ruleset;
use weft_netpol::diff::Op;
use weft_netpol::fake::FakeBackend;

/// A kernel-like target for transactions.
pub trait Backend: Send {
    /// Reads weft's table back (`None`: there is none).
    fn dump(&mut self) -> Result<Option<Ruleset>, String>;
    /// Applies ops as one atomic transaction.
    fn apply(&mut self, ops: &[Op]) -> Result<(), String>;
    /// A line for the start-up log: what this backend is.
    fn describe(&self) -> String;
    /// The ruleset generation (`None`: this backend has none).
    fn generation(&mut self) -> Result<Option<u32>, String> {
        Ok(None)
    }
}

/// The real kernel, on the netlink thread of `weft-nft`.
pub struct Kernel {
    table: String,
    thread: weft_nft::thread::NftThread,
}

impl Kernel {
    /// Opens netlink in the current network namespace.
    pub fn open(table: &str) -> Result<Kernel, String> {
        let thread = weft_nft::thread::NftThread::spawn().map_err(|e| e.to_string())?;
        Ok(Kernel {
            table: table.to_string(),
            thread,
        })
    }
}

impl Backend for Kernel {
    fn dump(&mut self) -> Result<Option<Ruleset>, String> {
        self.thread.dump(&self.table).map_err(|e| e.to_string())
    }

    fn apply(&mut self, ops: &[Op]) -> Result<(), String> {
        self.thread
            .apply(&self.table, ops.to_vec())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn describe(&self) -> String {
        format!("nftables over netlink, table inet {}", self.table)
    }

    fn generation(&mut self) -> Result<Option<u32>, String> {
        self.thread
            .run(|b| b.generation())
            .map_err(|e| e.to_string())?
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

/// The in-memory kernel (tests, and `weft agent --dry-run`).
pub struct Memory {
    table: String,
    /// The fake kernel (shared, so tests can change it behind the controller's back).
    pub fake: std::sync::Arc<std::sync::Mutex<FakeBackend>>,
}

impl Memory {
    /// An empty in-memory kernel.
    pub fn new(table: &str) -> Memory {
        Memory {
            table: table.to_string(),
            fake: Default::default(),
        }
    }
}

impl Memory {
    fn kernel(&self) -> std::sync::MutexGuard<'_, FakeBackend> {
        self.fake.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for Memory {
    fn dump(&mut self) -> Result<Option<Ruleset>, String> {
        Ok(self.kernel().dump().cloned())
    }

    fn apply(&mut self, ops: &[Op]) -> Result<(), String> {
        let table = self.table.clone();
        self.kernel().apply(&table, ops).map_err(|e| e.to_string())
    }

    fn describe(&self) -> String {
        "in-memory kernel (dry run)".to_string()
    }
}
