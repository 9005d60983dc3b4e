//! Engine benchmarks (written next).
fn main() {}
