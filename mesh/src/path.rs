//! Path health and relay decisions (in progress).
