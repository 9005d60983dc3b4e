//! Masquerade of pod → outside-cluster traffic: table `inet weft-nat` (DESIGN §4).
//!
//! ```text
//! table inet weft-nat {
//!   set cluster-v4 { type ipv4_addr; flags interval; elements = { 10.96.0.0/16, 10.244.0.0/16 } }
//!   set cluster-v6 { type ipv6_addr; flags interval; elements = { fd00:10:96::/112, fd00:10:244::/48 } }
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr @cluster-v4 ip daddr != @cluster-v4 counter masquerade comment "..."
//!     ip6 saddr @cluster-v6 ip6 daddr != @cluster-v6 counter masquerade comment "..."
//!   }
//! }
//! ```
//!
//! "Inside" is the pod CIDRs and the Service CIDRs: pod ↔ pod and pod ↔ Service traffic keeps
//! the pod's source address (policy on the far side judges the real pod); everything else a
//! pod sends leaves with the node's address. The table is weft's own, separate from the
//! policy table (`inet weft`), programmed through the same netlink backend the same way:
//! dump, diff, apply the difference in one transaction, never a flush.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use weft_netpol::ruleset::{
    Action, AddrField, BaseHook, Chain, ChainPolicy, ChainType, Family, Hook, Key, Match, Rule,
    Ruleset, Set, SetDef, Value,
};

/// The masquerade table (family `inet`).
pub const NAT_TABLE: &str = "weft-nat";
/// Its one base chain.
pub const CHAIN: &str = "postrouting";
/// Priority `srcnat`.
pub const SRCNAT_PRIORITY: i32 = 100;

/// Cluster CIDRs by default: pods (as the lab's and kubeadm's defaults) and Services.
pub const DEFAULT_CLUSTER_CIDRS: &str =
    "10.244.0.0/16,fd00:10:244::/48,10.96.0.0/16,fd00:10:96::/112";

/// The set of one family's cluster CIDRs.
pub fn set_name(family: Family) -> String {
    format!("cluster-{}", family.suffix())
}

/// Parses a comma-separated CIDR list (`--cluster-cidrs`); host bits are masked.
pub fn parse_cidrs(list: &str) -> Result<Vec<IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|e| format!("cluster CIDR {s:?}: {e}"))
        })
        .collect()
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn value(family: Family, n: u128) -> Value {
    match family {
        // Only IPv4 CIDRs are in a V4 range list: the value fits.
        Family::V4 => Value::V4(u32::try_from(n).unwrap_or(u32::MAX).into()),
        Family::V6 => Value::V6(n.into()),
    }
}

/// One family's CIDRs as disjoint, merged, inclusive ranges (over netlink, overlapping
/// intervals are refused: nft merges in userspace, so must we).
pub fn merged_ranges(cidrs: &[IpNet], family: Family) -> Vec<(u128, u128)> {
    let mut ranges: Vec<(u128, u128)> = cidrs
        .iter()
        .filter(|c| match family {
            Family::V4 => matches!(c, IpNet::V4(_)),
            Family::V6 => matches!(c, IpNet::V6(_)),
        })
        .map(|c| (to_u128(c.network()), to_u128(c.broadcast())))
        .collect();
    ranges.sort();
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (lo, hi) in ranges {
        match merged.last_mut() {
            Some(last) if last.1 >= lo || last.1.checked_add(1) == Some(lo) => {
                last.1 = last.1.max(hi)
            }
            _ => merged.push((lo, hi)),
        }
    }
    merged
}

/// The desired masquerade table for these cluster CIDRs. A family without CIDRs gets no set
/// and no rule (its pods' traffic is never masqueraded).
pub fn ruleset(cidrs: &[IpNet]) -> Ruleset {
    let mut rs = Ruleset::new(NAT_TABLE);
    let mut rules = Vec::new();
    for family in Family::ALL {
        let ranges = merged_ranges(cidrs, family);
        if ranges.is_empty() {
            continue;
        }
        let name = set_name(family);
        let elements: BTreeMap<Key, Option<_>> = ranges
            .into_iter()
            .map(|(lo, hi)| {
                (
                    Key::range(vec![value(family, lo)], vec![value(family, hi)]),
                    None,
                )
            })
            .collect();
        rs.sets.insert(
            name.clone(),
            Set {
                def: SetDef {
                    name: name.clone(),
                    key: vec![family.addr_type()],
                    interval: true,
                    verdict_map: false,
                    comment: Some("cluster CIDRs (pods and Services): never masqueraded".into()),
                },
                elements,
            },
        );
        let in_cluster = |field, negate| Match::AddrInSet {
            family,
            field,
            set: name.clone(),
            negate,
        };
        rules.push(Rule {
            matches: vec![
                in_cluster(AddrField::Saddr, false),
                in_cluster(AddrField::Daddr, true),
            ],
            counter: true,
            action: Action::Masquerade,
            comment: Some("pod to outside the cluster CIDRs: source NAT to the node".into()),
        });
    }
    let hook = BaseHook {
        kind: ChainType::Nat,
        hook: Hook::Postrouting,
        priority: SRCNAT_PRIORITY,
        policy: ChainPolicy::Accept,
    };
    rs.chains
        .insert(CHAIN.into(), Chain::base(CHAIN, hook, rules));
    rs
}

/// Brings one of weft's own small tables (`inet weft-nat`, `inet weft-guard`) to `desired`
/// (`None`: removes it, for `--no-masquerade` or encryption no longer required) through
/// `nft`; returns the number of ops applied (0 when the kernel already agreed).
pub fn sync(
    nft: &weft_nft::NftThread,
    table: &str,
    desired: Option<&Ruleset>,
) -> Result<usize, weft_nft::NftError> {
    match desired {
        Some(rs) => nft.sync(rs.clone()).map(|(diff, _)| diff.ops.len()),
        None => {
            if nft.dump(table)?.is_none() {
                return Ok(0);
            }
            nft.apply(table, vec![weft_netpol::diff::Op::DeleteTable])?;
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table_reads_as_nft_would_print_it() {
        let rs = ruleset(&parse_cidrs(DEFAULT_CLUSTER_CIDRS).unwrap());
        let text = rs.to_string();
        assert!(
            text.contains("elements = { 10.96.0.0/16,\n\t\t\t     10.244.0.0/16 }"),
            "{text}"
        );
        assert!(text.contains("fd00:10:96::/112"), "{text}");
        assert!(text.contains("type nat hook postrouting priority srcnat; policy accept;"));
        assert!(
            text.contains("ip saddr @cluster-v4 ip daddr != @cluster-v4 counter masquerade"),
            "{text}"
        );
        assert!(text.contains("ip6 saddr @cluster-v6 ip6 daddr != @cluster-v6 counter masquerade"));
        assert_eq!(rs.schema(), Some(weft_netpol::ruleset::SCHEMA_VERSION));
    }

    #[test]
    fn overlapping_and_touching_cidrs_merge_and_host_bits_are_masked() {
        let cidrs =
            parse_cidrs("10.244.1.7/24, 10.244.0.0/16,10.245.0.0/16,192.168.0.0/24").unwrap();
        let r = merged_ranges(&cidrs, Family::V4);
        assert_eq!(
            r,
            vec![(0x0af4_0000, 0x0af5_ffff), (0xc0a8_0000, 0xc0a8_00ff)]
        );
        assert!(merged_ranges(&cidrs, Family::V6).is_empty());
        let rs = ruleset(&cidrs);
        assert!(!rs.sets.contains_key("cluster-v6"));
        assert_eq!(
            rs.chains[CHAIN].rules.len(),
            1,
            "no IPv6 rule without IPv6 CIDRs"
        );
        assert!(parse_cidrs("10.0.0.0/33").is_err());
    }
}
