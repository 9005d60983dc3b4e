//! The backend against the real kernel, each test in a network namespace it creates and
//! removes. Run with plain `cargo test -p weft-nft`; without root they print SKIPPED.
//! `--nocapture` shows the timings they measure.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use common::Netns;
use common::shapes::{
    accept, add_set, chain, every_shape, in_set, point, range, rule, set_def, v4,
};
use weft_netpol::diff::{Op, diff};
use weft_netpol::ruleset::{
    AddrField, ChainDef, Family, Key, KeyField, Match, Protocol, Rule, Ruleset, TABLE_NAME, Value,
    Verdict, table_comment,
};
use weft_nft::{NftError, NftOptions, NftThread, RawTable, expr};

fn start(ns: &Netns) -> NftThread {
    NftThread::spawn_in_netns(ns.path()).expect("backend in the test namespace")
}

fn raw(t: &NftThread) -> Option<RawTable> {
    t.run(|b| b.dump_raw(TABLE_NAME)).unwrap().unwrap()
}

fn json_objects<'a>(j: &'a serde_json::Value, kind: &str) -> Vec<&'a serde_json::Value> {
    j["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get(kind))
        .collect()
}

#[test]
fn every_shape_round_trips_through_the_kernel() {
    need_root!();
    let ns = Netns::new();
    let t = start(&ns);
    let desired = every_shape();
    let (d, report) = t.sync(desired.clone()).unwrap();
    assert_eq!(report.acks, report.messages);
    assert!(d.ops.len() > 30);
    let kt = t
        .run(|b| b.dump_table(TABLE_NAME))
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(kt.foreign.is_empty(), "{:#?}", kt.foreign);
    assert_eq!(t.dump(TABLE_NAME).unwrap(), Some(desired.clone()));

    // Independently: nft's own JSON view of the same kernel state.
    let j = ns.nft_json();
    let tables = json_objects(&j, "table");
    assert_eq!(tables.len(), 1);
    assert_eq!(tables[0]["name"], "weft");
    assert_eq!(tables[0]["family"], "inet");
    // nft 1.0.6 leaves table comments out of its JSON; its text listing has them.
    let text = ns.nft(&["list", "table", "inet", TABLE_NAME]);
    assert!(
        text.contains(&format!("comment \"{}\"", table_comment(1))),
        "{text}"
    );
    let sets: BTreeMap<String, &serde_json::Value> = json_objects(&j, "set")
        .into_iter()
        .chain(json_objects(&j, "map"))
        .map(|s| (s["name"].as_str().unwrap().to_string(), s))
        .collect();
    assert_eq!(sets.len(), desired.sets.len());
    for (name, want) in &desired.sets {
        let s = sets[name];
        let elems = s.get("elem").and_then(|e| e.as_array()).map_or(0, Vec::len);
        assert_eq!(elems, want.elements.len(), "elements of {name}");
        let flags: Vec<&str> = s
            .get("flags")
            .and_then(|f| f.as_array())
            .map(|f| f.iter().map(|x| x.as_str().unwrap()).collect())
            .unwrap_or_default();
        assert_eq!(flags.contains(&"interval"), want.def.interval, "{name}");
        assert_eq!(s.get("map").is_some(), want.def.verdict_map, "{name}");
        let types: Vec<String> = match &s["type"] {
            serde_json::Value::String(t) => vec![t.clone()],
            serde_json::Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().into()).collect(),
            other => panic!("type {other}"),
        };
        let want_types: Vec<&str> = want.def.key.iter().map(|k| k.nft_name()).collect();
        assert_eq!(types, want_types, "{name}");
        assert_eq!(
            s.get("comment").and_then(|c| c.as_str()),
            want.def.comment.as_deref()
        );
    }
    // A few elements as nft reads them back.
    let cidr = sets["cidr-v4"]["elem"].to_string();
    assert!(
        cidr.contains("\"10.2.0.0\"") && cidr.contains("255.255.255.0"),
        "{cidr}"
    );
    assert!(
        sets["ingress-dispatch-v4"]["elem"]
            .to_string()
            .contains("group-a")
    );
    let chains = json_objects(&j, "chain");
    assert_eq!(chains.len(), desired.chains.len());
    for c in chains {
        let want = &desired.chains[c["name"].as_str().unwrap()];
        match &want.def.base {
            Some(b) => {
                assert_eq!(c["hook"], b.hook.keyword());
                assert_eq!(c["prio"], b.priority);
                assert_eq!(c["policy"], "accept");
            }
            None => assert!(c.get("hook").is_none()),
        }
    }
    let rules = json_objects(&j, "rule");
    assert_eq!(rules.len(), desired.rule_count());
    for (name, c) in &desired.chains {
        let got: Vec<Option<&str>> = rules
            .iter()
            .filter(|r| r["chain"] == name.as_str())
            .map(|r| r.get("comment").and_then(|c| c.as_str()))
            .collect();
        let want: Vec<Option<&str>> = c.rules.iter().map(|r| r.comment.as_deref()).collect();
        assert_eq!(got, want, "rule comments of chain {name}");
    }
}

#[test]
fn nft_text_of_our_table_loads_back_to_identical_netlink_objects() {
    need_root!();
    let ours = Netns::new();
    let t = start(&ours);
    t.sync(every_shape()).unwrap();
    let text = ours.nft(&["list", "table", "inet", TABLE_NAME]);

    let theirs = Netns::new();
    theirs.nft_file(&text);
    let t2 = start(&theirs);
    let a = raw(&t).unwrap().without_handles();
    let b = raw(&t2).unwrap().without_handles();
    assert_eq!(a.chains, b.chains);
    assert_eq!(a.sets, b.sets);
    assert_eq!(a.elements, b.elements);
    assert_eq!(a.rules, b.rules);
    assert_eq!(a, b);
    assert_eq!(t2.dump(TABLE_NAME).unwrap(), Some(every_shape()));
    // And nft prints both the same.
    assert_eq!(theirs.nft(&["list", "table", "inet", TABLE_NAME]), text);
}

#[test]
fn every_rule_shape_is_what_nft_generates_for_its_text() {
    need_root!();
    // nft writes each rule from our Display text; we read its bytecode back over netlink and
    // compare with what we would have written.
    let ns = Netns::new();
    let t = start(&ns);
    let mut desired = every_shape();
    for c in desired.chains.values_mut() {
        c.rules.clear();
    }
    t.sync(desired.clone()).unwrap();
    let shapes = every_shape();
    let mut script = String::new();
    for (name, c) in &shapes.chains {
        for r in &c.rules {
            script.push_str(&format!("add rule inet weft {name} {r}\n"));
        }
    }
    ns.nft_file(&script);
    let checked = script.lines().count();
    let dumped = raw(&t).unwrap();
    for (name, c) in &shapes.chains {
        let got = &dumped.rules[name];
        assert_eq!(got.len(), c.rules.len());
        for (r, g) in c.rules.iter().zip(got) {
            assert_eq!(
                g.exprs.as_ref().unwrap(),
                &expr::lower(r).unwrap(),
                "bytecode of `{r}` in {name}"
            );
            assert_eq!(
                g.udata,
                expr::rule_udata(r.comment.as_deref()).unwrap(),
                "{r}"
            );
        }
    }
    assert!(checked >= 20);
    assert_eq!(t.dump(TABLE_NAME).unwrap(), Some(shapes));
}

#[test]
fn an_element_only_change_sends_element_messages_only() {
    need_root!();
    let ns = Netns::new();
    let t = start(&ns);
    let before = every_shape();
    t.sync(before.clone()).unwrap();
    // A pod relabel: one pod leaves a selector set, another joins; its dispatch verdict changes.
    let mut after = before.clone();
    let pods = &mut after.sets.get_mut("pods-v4").unwrap().elements;
    pods.remove(&point(v4("10.244.1.3")));
    pods.insert(point(v4("10.244.1.9")), None);
    after
        .sets
        .get_mut("ingress-dispatch-v4")
        .unwrap()
        .elements
        .insert(
            point(v4("10.244.1.3")),
            Some(Verdict::Jump("group-a".into())),
        );
    let (d, report) = t.sync(after.clone()).unwrap();
    assert!(d.ops.iter().all(Op::is_element_op), "{:?}", d.ops);
    assert_eq!(report.other_messages, 0);
    // pods-v4: one add, one delete; the map element: delete + add.
    assert_eq!(report.element_messages, 4);
    assert_eq!(report.acks, 4);
    println!(
        "relabel: {} ops, {} element messages, {} bytes, {:?}",
        report.ops, report.element_messages, report.bytes, report.elapsed
    );
    assert_eq!(t.dump(TABLE_NAME).unwrap(), Some(after));
}

#[test]
fn a_batch_with_one_bad_op_is_rejected_whole() {
    need_root!();
    let ns = Netns::new();
    let t = start(&ns);
    t.sync(every_shape()).unwrap();
    let before = raw(&t).unwrap();
    let ops = vec![
        Op::AddElements {
            set: "pods-v4".into(),
            elements: vec![(point(v4("10.244.7.7")), None)],
        },
        Op::AddChain(ChainDef {
            name: "new-chain".into(),
            base: None,
        }),
        Op::FlushChain("pol-1".into()),
        Op::AddRule {
            chain: "no-such-chain".into(),
            rule: rule(vec![], accept()),
        },
    ];
    let err = t.apply(TABLE_NAME, ops).unwrap_err();
    match &err {
        NftError::Rejected { index, object, .. } => {
            assert_eq!(*index, 3, "{err}");
            assert!(object.contains("no-such-chain"), "{err}");
        }
        other => panic!("expected Rejected, got {other}"),
    }
    assert_eq!(err.errno(), Some(libc_enoent()));
    println!("rejected as expected: {err}");
    assert_eq!(raw(&t).unwrap(), before);
    // The socket is still good for the next transaction.
    let (_, report) = t.sync(every_shape()).unwrap();
    assert_eq!(report.messages, 0);
}

fn libc_enoent() -> i32 {
    2
}

#[test]
fn adopt_over_an_unchanged_kernel_writes_nothing() {
    need_root!();
    let ns = Netns::new();
    {
        let first = start(&ns);
        first.sync(every_shape()).unwrap();
    }
    // A new process (new backend, new socket) finds the table as it left it.
    let restarted = start(&ns);
    let started = Instant::now();
    let (d, report) = restarted.sync(every_shape()).unwrap();
    println!("adopt with nothing changed: {:?}", started.elapsed());
    assert!(d.is_empty(), "{:?}", d.ops);
    assert_eq!(report.messages, 0);
}

#[test]
fn adopt_repairs_exactly_an_element_removed_by_hand() {
    need_root!();
    let ns = Netns::new();
    let t = start(&ns);
    let desired = every_shape();
    t.sync(desired.clone()).unwrap();
    ns.nft(&[
        "delete",
        "element",
        "inet",
        "weft",
        "pods-v4",
        "{ 10.244.1.3 }",
    ]);
    ns.nft(&[
        "delete",
        "element",
        "inet",
        "weft",
        "cidr-v4",
        "{ 192.168.1.5-192.168.1.9 }",
    ]);
    let restarted = start(&ns);
    let (d, report) = restarted.sync(desired.clone()).unwrap();
    assert_eq!(
        d.ops,
        vec![
            Op::AddElements {
                set: "cidr-v4".into(),
                elements: vec![(range(v4("192.168.1.5"), v4("192.168.1.9")), None)],
            },
            Op::AddElements {
                set: "pods-v4".into(),
                elements: vec![(point(v4("10.244.1.3")), None)],
            },
        ]
    );
    assert_eq!((report.element_messages, report.other_messages), (2, 0));
    assert_eq!(restarted.dump(TABLE_NAME).unwrap(), Some(desired));
}

#[test]
fn a_rule_added_by_hand_is_replaced_and_other_tables_are_untouched() {
    need_root!();
    let ns = Netns::new();
    ns.nft_file(
        "table ip kube-proxy {
            chain services {
                type nat hook prerouting priority dstnat; policy accept;
                ip daddr 10.96.0.1 tcp dport 443 dnat to 10.0.0.5:6443
            }
        }
        table inet other {
            set s { type ipv4_addr; elements = { 1.2.3.4 }; }
            chain c { ip saddr @s log drop; }
        }
        ",
    );
    let others_before = [
        ns.nft(&["list", "table", "ip", "kube-proxy"]),
        ns.nft(&["list", "table", "inet", "other"]),
    ];
    let t = start(&ns);
    let desired = every_shape();
    t.sync(desired.clone()).unwrap();
    ns.nft(&["add", "rule", "inet", "weft", "pol-1", "log", "accept"]);
    let kt = t
        .run(|b| b.dump_table(TABLE_NAME))
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(kt.foreign.len(), 1, "{:?}", kt.foreign);
    println!("foreign: {}", kt.foreign[0]);
    let (d, _) = t.sync(desired.clone()).unwrap();
    assert_eq!(d.ops[0], Op::FlushChain("pol-1".into()));
    assert_eq!(t.dump(TABLE_NAME).unwrap(), Some(desired.clone()));

    // A schema change replaces our table in one transaction; still nothing else moves.
    let mut next = desired.clone();
    next.comment = table_comment(2);
    let (d, _) = t.sync(next.clone()).unwrap();
    assert_eq!(
        d.ops[..2],
        [
            Op::DeleteTable,
            Op::AddTable {
                comment: table_comment(2)
            }
        ]
    );
    assert_eq!(t.dump(TABLE_NAME).unwrap(), Some(next));
    let others_after = [
        ns.nft(&["list", "table", "ip", "kube-proxy"]),
        ns.nft(&["list", "table", "inet", "other"]),
    ];
    assert_eq!(others_before, others_after);
}

#[test]
fn an_old_schema_table_is_replaced_in_one_transaction() {
    need_root!();
    let ns = Netns::new();
    ns.nft_file(
        "table inet weft {
            comment \"weft schema=0\"
            chain forward { type filter hook forward priority 0; policy accept; ct state invalid drop; }
        }
        ",
    );
    let t = start(&ns);
    let desired = every_shape();
    let (d, report) = t.sync(desired.clone()).unwrap();
    assert_eq!(d.ops[0], Op::DeleteTable);
    assert_eq!(report.acks, report.messages);
    assert_eq!(t.dump(TABLE_NAME).unwrap(), Some(desired));
}

#[test]
fn twenty_thousand_elements_commit_in_one_batch() {
    need_root!();
    let ns = Netns::new();
    let t = start(&ns);
    let mut desired = Ruleset::new(TABLE_NAME);
    let elements: Vec<(Key, Option<Verdict>)> = (0..20_000u32)
        .map(|i| (point(Value::V4(Ipv4Addr::from(0x0a00_0000 + i))), None))
        .collect();
    add_set(
        &mut desired,
        set_def("big-v4", vec![KeyField::Ipv4Addr], false, false),
        elements.clone(),
    );
    let ranges: Vec<(Key, Option<Verdict>)> = (0..20_000u32)
        .map(|i| {
            let base = 0x6400_0000 + i * 4;
            (
                range(
                    Value::V4(Ipv4Addr::from(base)),
                    Value::V4(Ipv4Addr::from(base + 1)),
                ),
                None,
            )
        })
        .collect();
    add_set(
        &mut desired,
        set_def("big-cidr-v4", vec![KeyField::Ipv4Addr], true, false),
        ranges,
    );
    let (_, report) = t.sync(desired.clone()).unwrap();
    println!(
        "20,000 elements + 20,000 ranges: {} messages ({} element), {} KiB, {:?} ({:?} encoding)",
        report.messages,
        report.element_messages,
        report.bytes / 1024,
        report.elapsed,
        report.encoding
    );
    assert_eq!(report.acks, report.messages);
    let started = Instant::now();
    let dumped = t.dump(TABLE_NAME).unwrap().unwrap();
    println!("dump of 40,000 elements: {:?}", started.elapsed());
    assert_eq!(dumped.sets["big-v4"].elements.len(), 20_000);
    assert_eq!(dumped.sets["big-cidr-v4"].elements.len(), 20_000);
    assert_eq!(dumped, desired);
    // Independently, nft counts them too.
    let listed = ns.nft(&["-j", "list", "set", "inet", "weft", "big-v4"]);
    assert_eq!(listed.matches("\"10.").count(), 20_000);
}

fn many_rules(n: usize) -> Ruleset {
    let mut desired = Ruleset::new(TABLE_NAME);
    add_set(
        &mut desired,
        set_def("pods-v4", vec![KeyField::Ipv4Addr], false, false),
        vec![],
    );
    let rules = (0..n)
        .map(|i| Rule {
            comment: Some(format!("ns/policy-{i} ingress[0]")),
            counter: true,
            ..rule(
                vec![
                    in_set(Family::V4, AddrField::Saddr, "pods-v4", false),
                    Match::DestPort {
                        protocol: Protocol::Tcp,
                        first: (i % 60000) as u16 + 1,
                        last: (i % 60000) as u16 + 1,
                    },
                ],
                accept(),
            )
        })
        .collect();
    chain(&mut desired, "pol-many", None, rules);
    desired
}

#[test]
fn four_thousand_rules_commit_with_every_ack_read() {
    need_root!();
    let ns = Netns::new();
    let t = start(&ns);
    let desired = many_rules(4000);
    let (_, report) = t.sync(desired.clone()).unwrap();
    println!(
        "4,000 rules: {} messages, {} KiB in one datagram, {} acks, {:?} ({:?} encoding)",
        report.messages,
        report.bytes / 1024,
        report.acks,
        report.elapsed,
        report.encoding
    );
    assert_eq!(report.messages, 4003);
    assert_eq!(report.acks, report.messages);
    let started = Instant::now();
    let raw_table = raw(&t).unwrap();
    println!("dump of 4,000 rules: {:?}", started.elapsed());
    assert_eq!(raw_table.rule_count(), 4000);
    assert_eq!(t.dump(TABLE_NAME).unwrap(), Some(desired));
}

#[test]
fn lost_acks_are_reported_as_outcome_unknown_and_the_socket_is_replaced() {
    need_root!();
    let ns = Netns::new();
    // A receive buffer far too small for 4,000 acks: the kernel drops most of them (ENOBUFS).
    let t = NftThread::start(
        Some(ns.path()),
        NftOptions {
            fixed_rcvbuf: Some(4096),
            ..NftOptions::default()
        },
    )
    .unwrap();
    let desired = many_rules(4000);
    let err = t.sync(desired.clone()).unwrap_err();
    assert!(err.outcome_unknown(), "{err}");
    println!("as expected: {err}");
    // The transaction did commit (the acks were lost, not the rules): a fresh dump says so, on
    // a fresh socket, and the next sync has nothing to do.
    assert_eq!(raw(&t).unwrap().rule_count(), 4000);
    let (d, _) = t.sync(desired).unwrap();
    assert!(d.is_empty());
}

#[test]
fn re_adding_an_existing_element_is_not_eexist() {
    need_root!();
    let ns = Netns::new();
    let t = start(&ns);
    t.sync(every_shape()).unwrap();
    let again = vec![
        Op::AddElements {
            set: "pods-v4".into(),
            elements: vec![(point(v4("10.244.1.2")), None)],
        },
        Op::AddElements {
            set: "cidr-v4".into(),
            elements: vec![(range(v4("192.168.1.5"), v4("192.168.1.9")), None)],
        },
        Op::AddElements {
            set: "ingress-dispatch-v4".into(),
            elements: vec![(
                point(v4("10.244.1.2")),
                Some(Verdict::Jump("group-a".into())),
            )],
        },
        Op::AddSet(every_shape().sets["ports"].def.clone()),
        Op::AddChain(every_shape().chains["egress"].def.clone()),
    ];
    t.apply(TABLE_NAME, again).unwrap();
    assert_eq!(t.dump(TABLE_NAME).unwrap(), Some(every_shape()));
}

#[test]
fn a_map_verdict_changes_by_delete_and_add() {
    need_root!();
    let ns = Netns::new();
    let t = start(&ns);
    let mut desired = every_shape();
    t.sync(desired.clone()).unwrap();
    let key = point(v4("10.244.1.2"));
    // The kernel refuses a re-add with other data (EEXIST), and the batch with it.
    let readd = Op::AddElements {
        set: "ingress-dispatch-v4".into(),
        elements: vec![(key.clone(), Some(Verdict::Drop))],
    };
    let err = t.apply(TABLE_NAME, vec![readd]).unwrap_err();
    assert_eq!(err.errno(), Some(17), "{err}");
    // diff says delete + add, in one batch.
    desired
        .sets
        .get_mut("ingress-dispatch-v4")
        .unwrap()
        .elements
        .insert(key.clone(), Some(Verdict::Drop));
    let (d, report) = t.sync(desired.clone()).unwrap();
    assert_eq!(d.ops.len(), 2, "{:?}", d.ops);
    assert_eq!(report.element_messages, 2);
    assert_eq!(t.dump(TABLE_NAME).unwrap(), Some(desired));
}

#[test]
fn element_deletes_without_destroy_fail_on_absent_elements() {
    need_root!();
    let ns = Netns::new();
    let strict = NftThread::start(
        Some(ns.path()),
        NftOptions {
            no_destroy: true,
            ..NftOptions::default()
        },
    )
    .unwrap();
    strict.sync(every_shape()).unwrap();
    let del_absent = Op::DeleteElements {
        set: "pods-v4".into(),
        keys: vec![point(v4("10.9.9.9")), point(v4("10.244.1.2"))],
    };
    let err = strict
        .apply(TABLE_NAME, vec![del_absent.clone()])
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc_enoent()), "{err}");
    let t = start(&ns);
    if t.run(|b| b.kernel().has_destroy()).unwrap() {
        // DESTROYSETELEM: the absent one is ignored, the present one goes.
        t.apply(TABLE_NAME, vec![del_absent]).unwrap();
        let dumped = t.dump(TABLE_NAME).unwrap().unwrap();
        assert!(
            !dumped.sets["pods-v4"]
                .elements
                .contains_key(&point(v4("10.244.1.2")))
        );
    } else {
        println!("SKIPPED part: kernel without DESTROYSETELEM");
    }
}

#[test]
fn a_missing_table_dumps_as_none_and_a_bad_netns_is_an_error() {
    need_root!();
    let ns = Netns::new();
    let t = start(&ns);
    assert_eq!(t.dump(TABLE_NAME).unwrap(), None);
    assert!(diff(None, &every_shape()).ops.len() > 30);
    let err = NftThread::spawn_in_netns("/run/netns/weft-t-does-not-exist").err();
    assert!(matches!(err, Some(NftError::Netns { .. })), "{err:?}");
}
