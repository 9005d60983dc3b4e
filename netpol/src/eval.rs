//! The semantic evaluator (oracle): is a connection allowed, straight from the API rules.
//! Written independently of the compiler; property tests hold the two equal.
