//! The responder's defence against a replayed ClientHello: a hello must carry a timestamp
//! within a window of the local clock, and a nonce not seen inside that window. Memory is
//! bounded: when the guard is full it forgets the oldest nonce and from then on refuses every
//! hello not newer than it (a floor), so a forgotten nonce can never be replayed.

use std::collections::{BTreeSet, HashSet};

use crate::wire::NONCE_LEN;

/// Why a hello's freshness was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// The timestamp is more than the window away from the local clock.
    Skew {
        /// Hello time minus local time, milliseconds.
        skew_ms: i64,
    },
    /// The nonce was seen before, or the hello is not newer than the forgotten ones.
    Replayed,
}

/// Recently seen hello nonces.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: u64,
    capacity: usize,
    by_time: BTreeSet<(u64, [u8; NONCE_LEN])>,
    seen: HashSet<[u8; NONCE_LEN]>,
    floor_ms: u64,
}

/// Whether `timestamp_ms` is within `window_ms` of `now_ms`; the skew if not.
pub fn check_skew(timestamp_ms: u64, now_ms: u64, window_ms: u64) -> Result<(), Stale> {
    let skew_ms = timestamp_ms as i64 - now_ms as i64;
    if skew_ms.unsigned_abs() > window_ms {
        Err(Stale::Skew { skew_ms })
    } else {
        Ok(())
    }
}

impl ReplayGuard {
    /// A guard accepting timestamps within `window_ms` of now and remembering at most
    /// `capacity` nonces.
    pub fn new(window_ms: u64, capacity: usize) -> ReplayGuard {
        ReplayGuard {
            window_ms,
            capacity: capacity.max(1),
            by_time: BTreeSet::new(),
            seen: HashSet::new(),
            floor_ms: 0,
        }
    }

    /// Admits a hello's `(nonce, timestamp)` at local time `now_ms`, remembering the nonce.
    pub fn admit(
        &mut self,
        nonce: [u8; NONCE_LEN],
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), Stale> {
        check_skew(timestamp_ms, now_ms, self.window_ms)?;
        // Nonces older than the window can no longer pass the skew check: forget them.
        let horizon = now_ms.saturating_sub(self.window_ms);
        while let Some(&(t, n)) = self.by_time.first() {
            if t >= horizon {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&n);
        }
        if timestamp_ms <= self.floor_ms || self.seen.contains(&nonce) {
            return Err(Stale::Replayed);
        }
        if self.seen.len() >= self.capacity
            && let Some((t, n)) = self.by_time.pop_first()
        {
            self.seen.remove(&n);
            self.floor_ms = self.floor_ms.max(t);
            if timestamp_ms <= self.floor_ms {
                return Err(Stale::Replayed);
            }
        }
        self.by_time.insert((timestamp_ms, nonce));
        self.seen.insert(nonce);
        Ok(())
    }

    /// Nonces remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_accepted_once_within_the_window() {
        let mut g = ReplayGuard::new(1_000, 16);
        assert_eq!(g.admit([1; 32], 10_000, 10_000), Ok(()));
        assert_eq!(g.admit([1; 32], 10_000, 10_500), Err(Stale::Replayed));
        assert_eq!(g.admit([2; 32], 10_000, 10_500), Ok(()));
    }

    #[test]
    fn timestamps_outside_the_window_are_skew_not_replay() {
        let mut g = ReplayGuard::new(1_000, 16);
        assert_eq!(
            g.admit([1; 32], 8_000, 10_000),
            Err(Stale::Skew { skew_ms: -2_000 })
        );
        assert_eq!(
            g.admit([1; 32], 11_500, 10_000),
            Err(Stale::Skew { skew_ms: 1_500 })
        );
        // After the window, the old hello fails on its timestamp and its nonce is forgotten.
        assert_eq!(g.admit([3; 32], 10_000, 10_000), Ok(()));
        assert_eq!(
            g.admit([3; 32], 10_000, 11_001),
            Err(Stale::Skew { skew_ms: -1_001 })
        );
        assert_eq!(g.admit([4; 32], 11_001, 11_001), Ok(()));
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn a_full_guard_forgets_the_oldest_and_refuses_anything_not_newer() {
        let mut g = ReplayGuard::new(10_000, 2);
        assert_eq!(g.admit([1; 32], 100, 100), Ok(()));
        assert_eq!(g.admit([2; 32], 200, 200), Ok(()));
        assert_eq!(g.admit([3; 32], 300, 300), Ok(()));
        assert_eq!(g.len(), 2);
        // Nonce 1 was forgotten, but its timestamp is at the floor: still refused.
        assert_eq!(g.admit([1; 32], 100, 300), Err(Stale::Replayed));
        assert_eq!(g.admit([9; 32], 150, 300), Err(Stale::Replayed));
        assert_eq!(g.admit([9; 32], 301, 301), Ok(()));
    }
}
