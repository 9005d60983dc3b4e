//! A hand-built table with every set kind, every match and action, IPv4 and IPv6, and the
//! small constructors the kernel tests share.

#![allow(dead_code)] // each test binary uses a part of it

use std::net::{Ipv4Addr, Ipv6Addr};

use weft_netpol::ruleset::{
    Action, AddrField, BaseHook, Chain, ChainDef, ChainPolicy, ChainType, CtMarkField, CtState,
    Family, Hook, IfaceField, Key, KeyField, LogSpec, Match, Protocol, Rule, Ruleset, Set, SetDef,
    TABLE_NAME, Value, Verdict,
};

pub fn v4(s: &str) -> Value {
    Value::V4(s.parse::<Ipv4Addr>().unwrap())
}

pub fn v6(s: &str) -> Value {
    Value::V6(s.parse::<Ipv6Addr>().unwrap())
}

pub fn point(v: Value) -> Key {
    Key::point(vec![v])
}

pub fn range(a: Value, b: Value) -> Key {
    Key::range(vec![a], vec![b])
}

pub fn set_def(name: &str, key: Vec<KeyField>, interval: bool, map: bool) -> SetDef {
    SetDef {
        name: name.into(),
        key,
        interval,
        verdict_map: map,
        comment: None,
    }
}

pub fn add_set(rs: &mut Ruleset, def: SetDef, elements: Vec<(Key, Option<Verdict>)>) {
    rs.sets.insert(
        def.name.clone(),
        Set {
            def,
            elements: elements.into_iter().collect(),
        },
    );
}

pub fn chain(rs: &mut Ruleset, name: &str, base: Option<BaseHook>, rules: Vec<Rule>) {
    rs.chains.insert(
        name.into(),
        Chain {
            def: ChainDef {
                name: name.into(),
                base,
            },
            rules,
        },
    );
}

pub fn rule(matches: Vec<Match>, action: Action) -> Rule {
    Rule {
        matches,
        counter: false,
        action,
        comment: None,
    }
}

pub fn accept() -> Action {
    Action::Verdict(Verdict::Accept)
}

pub fn in_set(family: Family, field: AddrField, set: &str, negate: bool) -> Match {
    Match::AddrInSet {
        family,
        field,
        set: set.into(),
        negate,
    }
}

/// A table with every set kind, every match and action, IPv4 and IPv6.
pub fn every_shape() -> Ruleset {
    use KeyField::*;
    let mut rs = Ruleset::new(TABLE_NAME);
    add_set(
        &mut rs,
        SetDef {
            comment: Some("local pods".into()),
            ..set_def("pods-v4", vec![Ipv4Addr], false, false)
        },
        vec![
            (point(v4("10.244.1.2")), None),
            (point(v4("10.244.1.3")), None),
        ],
    );
    add_set(
        &mut rs,
        set_def("pods-v6", vec![Ipv6Addr], false, false),
        vec![(point(v6("fd00::2")), None), (point(v6("fd00::3")), None)],
    );
    add_set(
        &mut rs,
        SetDef {
            comment: Some("10.0.0.0/8 except 10.1.0.0/16".into()),
            ..set_def("cidr-v4", vec![Ipv4Addr], true, false)
        },
        vec![
            (range(v4("10.0.0.0"), v4("10.0.255.255")), None),
            (range(v4("10.2.0.0"), v4("10.255.255.255")), None),
            (range(v4("172.16.0.0"), v4("172.16.255.255")), None),
            // Adjacent to the one before: the kernel keeps the end of one and the start of the
            // next at the same address.
            (range(v4("172.17.0.0"), v4("172.17.255.255")), None),
            (range(v4("192.168.1.5"), v4("192.168.1.9")), None),
            (range(v4("203.0.113.7"), v4("203.0.113.7")), None),
            (range(v4("255.255.255.0"), v4("255.255.255.255")), None),
        ],
    );
    add_set(
        &mut rs,
        set_def("world-v4", vec![Ipv4Addr], true, false),
        vec![
            (range(v4("0.0.0.0"), v4("9.255.255.255")), None),
            (range(v4("11.0.0.0"), v4("255.255.255.255")), None),
        ],
    );
    add_set(
        &mut rs,
        set_def("cidr-v6", vec![Ipv6Addr], true, false),
        vec![
            (
                range(
                    v6("2001:db8::"),
                    v6("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"),
                ),
                None,
            ),
            (range(v6("fd00::10"), v6("fd00::1f")), None),
            (
                range(v6("ffff::"), v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
                None,
            ),
        ],
    );
    add_set(
        &mut rs,
        set_def("world-v6", vec![Ipv6Addr], true, false),
        vec![(
            range(v6("::"), v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            None,
        )],
    );
    let np = |a: Value, p: Protocol, port: u16| {
        (
            Key::point(vec![a, Value::Proto(p.number()), Value::Port(port)]),
            None,
        )
    };
    add_set(
        &mut rs,
        SetDef {
            comment: Some("named ports".into()),
            ..set_def(
                "nport-v4",
                vec![Ipv4Addr, InetProto, InetService],
                false,
                false,
            )
        },
        vec![
            np(v4("10.244.1.2"), Protocol::Tcp, 8080),
            np(v4("10.244.1.3"), Protocol::Udp, 53),
            np(v4("10.244.1.3"), Protocol::Sctp, 9999),
        ],
    );
    add_set(
        &mut rs,
        set_def(
            "nport-v6",
            vec![Ipv6Addr, InetProto, InetService],
            false,
            false,
        ),
        vec![np(v6("fd00::2"), Protocol::Tcp, 8080)],
    );
    let pr = |p: Protocol, a: u16, b: u16| {
        (
            Key::range(
                vec![Value::Proto(p.number()), Value::Port(a)],
                vec![Value::Proto(p.number()), Value::Port(b)],
            ),
            None,
        )
    };
    add_set(
        &mut rs,
        set_def("ports", vec![InetProto, InetService], true, false),
        vec![
            pr(Protocol::Tcp, 1000, 2000),
            pr(Protocol::Udp, 53, 53),
            pr(Protocol::Sctp, 40000, 65535),
        ],
    );
    add_set(
        &mut rs,
        set_def("services", vec![InetService], false, false),
        vec![
            (point(Value::Port(80)), None),
            (point(Value::Port(443)), None),
        ],
    );
    add_set(
        &mut rs,
        set_def("protos", vec![InetProto], false, false),
        vec![
            (point(Value::Proto(6)), None),
            (point(Value::Proto(132)), None),
        ],
    );
    let jump = |c: &str| Some(Verdict::Jump(c.into()));
    add_set(
        &mut rs,
        SetDef {
            comment: Some("isolated local pods".into()),
            ..set_def("ingress-dispatch-v4", vec![Ipv4Addr], false, true)
        },
        vec![
            (point(v4("10.244.1.2")), jump("group-a")),
            (point(v4("10.244.1.3")), Some(Verdict::Accept)),
            (point(v4("10.244.1.4")), Some(Verdict::Drop)),
        ],
    );
    add_set(
        &mut rs,
        set_def("ingress-dispatch-v6", vec![Ipv6Addr], false, true),
        vec![(point(v6("fd00::2")), jump("group-a"))],
    );
    add_set(
        &mut rs,
        set_def("egress-dispatch-v4", vec![Ipv4Addr], false, true),
        vec![(point(v4("10.244.1.2")), jump("group-a"))],
    );
    add_set(
        &mut rs,
        set_def("egress-dispatch-v6", vec![Ipv6Addr], false, true),
        vec![],
    );
    add_set(
        &mut rs,
        set_def("cidr-map-v4", vec![Ipv4Addr], true, true),
        vec![
            (range(v4("10.0.0.0"), v4("10.255.255.255")), jump("group-a")),
            (range(v4("11.0.0.1"), v4("11.0.0.1")), Some(Verdict::Accept)),
        ],
    );
    add_set(
        &mut rs,
        set_def("empty-cidr-v4", vec![Ipv4Addr], true, false),
        vec![],
    );

    let base = |hook, kind, priority| {
        Some(BaseHook {
            kind,
            hook,
            priority,
            policy: ChainPolicy::Accept,
        })
    };
    let ct = Match::Ct(CtState::EstablishedRelated);
    chain(
        &mut rs,
        "egress",
        base(Hook::Forward, ChainType::Filter, -1),
        vec![
            rule(vec![ct.clone()], accept()),
            rule(
                vec![
                    Match::IfacePrefix {
                        field: IfaceField::Input,
                        prefix: "weft".into(),
                    },
                    Match::FibSaddrIifMissing,
                ],
                Action::Verdict(Verdict::Drop),
            ),
            rule(
                vec![],
                Action::Vmap {
                    family: Family::V4,
                    field: AddrField::Saddr,
                    map: "egress-dispatch-v4".into(),
                },
            ),
            rule(
                vec![],
                Action::Vmap {
                    family: Family::V6,
                    field: AddrField::Saddr,
                    map: "egress-dispatch-v6".into(),
                },
            ),
        ],
    );
    chain(
        &mut rs,
        "ingress",
        base(Hook::Forward, ChainType::Filter, 0),
        vec![
            rule(vec![ct], accept()),
            rule(
                vec![],
                Action::Vmap {
                    family: Family::V4,
                    field: AddrField::Daddr,
                    map: "ingress-dispatch-v4".into(),
                },
            ),
            rule(
                vec![],
                Action::Vmap {
                    family: Family::V6,
                    field: AddrField::Daddr,
                    map: "ingress-dispatch-v6".into(),
                },
            ),
            rule(
                vec![],
                Action::Vmap {
                    family: Family::V4,
                    field: AddrField::Saddr,
                    map: "cidr-map-v4".into(),
                },
            ),
        ],
    );
    // The masquerade rules of table `inet weft-nat`: pods to outside the cluster CIDRs.
    let masquerade = |family, set: &str| {
        rule(
            vec![
                in_set(family, AddrField::Saddr, set, false),
                in_set(family, AddrField::Daddr, set, true),
            ],
            Action::Masquerade,
        )
    };
    chain(
        &mut rs,
        "postrouting",
        base(Hook::Postrouting, ChainType::Nat, 100),
        vec![
            rule(
                vec![Match::IfacePrefix {
                    field: IfaceField::Output,
                    prefix: "weft".into(),
                }],
                accept(),
            ),
            masquerade(Family::V4, "cidr-v4"),
            masquerade(Family::V6, "cidr-v6"),
            Rule {
                counter: true,
                comment: Some("pods to the outside".into()),
                ..masquerade(Family::V4, "world-v4")
            },
            rule(vec![], Action::Masquerade),
        ],
    );
    // The `--encryption required` guard's shape: an input hook, a UDP port, a counted drop.
    chain(
        &mut rs,
        "input",
        base(Hook::Input, ChainType::Filter, 0),
        vec![Rule {
            counter: true,
            comment: Some("plain VXLAN refused".into()),
            ..rule(
                vec![Match::DestPort {
                    protocol: Protocol::Udp,
                    first: 4789,
                    last: 4789,
                }],
                Action::Verdict(Verdict::Drop),
            )
        }],
    );
    chain(
        &mut rs,
        "group-a",
        None,
        vec![
            rule(vec![], Action::Verdict(Verdict::Jump("pol-1".into()))),
            // The rate-limited nflog of denied new connections, default and other bursts.
            Rule {
                comment: Some("log denied new ingress connections (rate-limited)".into()),
                ..rule(
                    vec![],
                    Action::LogLimited(LogSpec {
                        rate_per_second: 10,
                        burst: 5,
                        group: 7,
                        prefix: "weft-drop group-a ".into(),
                    }),
                )
            },
            rule(
                vec![],
                Action::LogLimited(LogSpec {
                    rate_per_second: 1000,
                    burst: 50,
                    group: 65535,
                    prefix: "x".repeat(127),
                }),
            ),
            Rule {
                counter: true,
                ..rule(vec![], Action::Verdict(Verdict::Drop))
            },
        ],
    );
    let mut pol = Vec::new();
    for (family, pods) in [(Family::V4, "pods-v4"), (Family::V6, "pods-v6")] {
        for protocol in Protocol::ALL {
            pol.push(Rule {
                comment: Some(format!("ns/p ingress[0] {}", protocol.api_name())),
                ..rule(
                    vec![
                        in_set(family, AddrField::Saddr, pods, false),
                        Match::DestPort {
                            protocol,
                            first: 80,
                            last: 80,
                        },
                    ],
                    accept(),
                )
            });
            pol.push(Rule {
                counter: true,
                ..rule(
                    vec![
                        in_set(family, AddrField::Daddr, pods, false),
                        Match::DestPort {
                            protocol,
                            first: 1000,
                            last: 2000,
                        },
                    ],
                    accept(),
                )
            });
        }
        pol.push(rule(
            vec![in_set(family, AddrField::Saddr, pods, true)],
            Action::Verdict(Verdict::Drop),
        ));
    }
    pol.push(rule(
        vec![Match::DestPortInSet {
            family: Family::V4,
            set: "nport-v4".into(),
        }],
        accept(),
    ));
    pol.push(rule(
        vec![Match::DestPortInSet {
            family: Family::V6,
            set: "nport-v6".into(),
        }],
        accept(),
    ));
    // Two address matches of one family in one rule (a peer and a named port, as compile
    // writes them): nft emits the `meta nfproto` guard once.
    for (family, cidr, nport) in [
        (Family::V4, "cidr-v4", "nport-v4"),
        (Family::V6, "cidr-v6", "nport-v6"),
    ] {
        pol.push(rule(
            vec![
                in_set(family, AddrField::Saddr, cidr, false),
                Match::DestPortInSet {
                    family,
                    set: nport.into(),
                },
            ],
            accept(),
        ));
    }
    pol.push(rule(vec![Match::L4Proto(Protocol::Sctp)], accept()));
    // Accept rules that write a rule id into their field of the conntrack mark: the default
    // ingress and egress fields, a one-bit field at the top, ids at both ends of a field.
    for (field, value, counter) in [
        (0x000f_ff00u32, 0x000f_e600u32, true),
        (0xfff0_0000, 0x0010_0000, true),
        (0xfff0_0000, 0xfff0_0000, false),
        (0x8000_0000, 0x8000_0000, true),
    ] {
        pol.push(Rule {
            counter,
            comment: Some(format!(
                "ns/p ingress[1] from[0] id={}",
                value >> field.trailing_zeros()
            )),
            ..rule(
                vec![in_set(Family::V4, AddrField::Saddr, "pods-v4", false)],
                Action::MarkAccept(CtMarkField { field, value }),
            )
        });
    }
    pol.push(rule(
        vec![in_set(Family::V4, AddrField::Saddr, "cidr-v4", false)],
        accept(),
    ));
    pol.push(rule(
        vec![in_set(Family::V4, AddrField::Daddr, "world-v4", false)],
        accept(),
    ));
    pol.push(rule(
        vec![in_set(Family::V6, AddrField::Saddr, "cidr-v6", false)],
        accept(),
    ));
    pol.push(Rule {
        comment: Some("c".repeat(128)),
        ..rule(
            vec![in_set(Family::V6, AddrField::Daddr, "world-v6", true)],
            Action::Verdict(Verdict::Jump("leaf".into())),
        )
    });
    chain(&mut rs, "pol-1", None, pol);
    chain(&mut rs, "leaf", None, vec![]);
    rs
}
