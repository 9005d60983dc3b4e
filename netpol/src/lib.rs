//! weft's NetworkPolicy engine, pure: no kernel, no cluster.
//!
//! Flow: [`model`] validates Kubernetes objects into plain types → [`index`] keeps, per distinct
//! selector, the pods it matches → [`compile`] turns the cluster into the desired [`Ruleset`]
//! for one node → [`diff`] turns (current, desired) into the ops of one atomic transaction.
//! Effects live elsewhere: the netlink backend applies ops to the kernel; [`fake`] applies them
//! in memory for tests. [`sim`] walks a ruleset for one packet as the kernel would, and [`eval`]
//! answers the same question straight from the API semantics: property tests hold them equal.
//!
//! Newcomers: start with [`compile::compile`] and [`ruleset::Ruleset`].

pub mod compile;
pub mod diff;
pub mod engine;
pub mod eval;
pub mod fake;
pub mod model;
pub mod ruleset;
pub mod selector;
pub mod sim;
pub mod synth;

pub use diff::{Diff, Op, diff};
pub use ruleset::Ruleset;
