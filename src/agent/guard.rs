//! With `--encryption required`, plain VXLAN from peers is refused too: table `inet weft-guard`.
//!
//! ```text
//! table inet weft-guard {
//!   chain input {
//!     type filter hook input priority filter; policy accept;
//!     udp dport 4789 counter drop comment "..."
//!   }
//! }
//! ```
//!
//! A node in `required` never sends VXLAN (the mesh routes a peer it cannot reach over
//! WireGuard to `unreachable`), and its peers send it WireGuard whenever it advertises it
//! ready; what still arrives on the VXLAN port comes from a peer that cannot encrypt
//! (encryption off, its `weft-wg` down): dropped here, counted, so none of it reaches a pod.
//! Relays never need VXLAN in this mode (a relay through a node is WireGuard or nothing). The
//! table is weft's own, like `inet weft-nat`: synced the same way, and removed when the node
//! is on `on` or `off` again.

use weft_netpol::ruleset::{
    Action, BaseHook, Chain, ChainPolicy, ChainType, Hook, Match, Protocol, Rule, Ruleset, Verdict,
};

/// The guard table (family `inet`).
pub const GUARD_TABLE: &str = "weft-guard";
/// Its one base chain.
pub const CHAIN: &str = "input";

/// The desired guard table for the VXLAN port `port`.
pub fn ruleset(port: u16) -> Ruleset {
    let hook = BaseHook {
        kind: ChainType::Filter,
        hook: Hook::Input,
        priority: 0,
        policy: ChainPolicy::Accept,
    };
    let drop_vxlan = Rule {
        matches: vec![Match::DestPort {
            protocol: Protocol::Udp,
            first: port,
            last: port,
        }],
        counter: true,
        action: Action::Verdict(Verdict::Drop),
        comment: Some(
            "encryption required: plain VXLAN from a peer that cannot encrypt is refused".into(),
        ),
    };
    let mut rs = Ruleset::new(GUARD_TABLE);
    rs.chains
        .insert(CHAIN.into(), Chain::base(CHAIN, hook, vec![drop_vxlan]));
    rs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_reads_as_nft_would_print_it() {
        let text = ruleset(4789).to_string();
        assert!(text.starts_with("table inet weft-guard {"), "{text}");
        assert!(
            text.contains("type filter hook input priority filter; policy accept;"),
            "{text}"
        );
        assert!(
            text.contains("udp dport 4789 counter drop comment \"encryption required:"),
            "{text}"
        );
        assert_eq!(
            ruleset(4789).schema(),
            Some(weft_netpol::ruleset::SCHEMA_VERSION)
        );
    }
}
