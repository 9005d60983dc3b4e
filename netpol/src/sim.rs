//! The packet simulator: walks a [`crate::Ruleset`] for one packet as the kernel would.
