//! The change monitor against the real kernel: our own transactions are told apart from
//! someone else's (`nft`), other tables are ignored, and generations follow `GETGEN`.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Netns;
use common::shapes::{add_set, point, set_def, v4};
use weft_netpol::ruleset::{KeyField, Ruleset, TABLE_NAME};
use weft_nft::NftThread;
use weft_nft::monitor::{Event, Monitor};

/// Collects events on a thread inside `ns` until `want` says enough (at most 10 s).
fn watch(
    ns: &Netns,
    ready: mpsc::SyncSender<()>,
    want: impl Fn(&[Event]) -> bool + Send + 'static,
) -> std::thread::JoinHandle<Vec<Event>> {
    // A second backend thread is just a thread inside the namespace: the monitor runs there.
    let host = NftThread::spawn_in_netns(ns.path()).expect("thread in the test namespace");
    std::thread::spawn(move || {
        host.run(move |_| {
            let mut m = Monitor::open(TABLE_NAME).expect("subscribe to nftables notifications");
            ready.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut seen = Vec::new();
            while Instant::now() < deadline && !want(&seen) {
                seen.extend(
                    m.next(Duration::from_millis(200))
                        .expect("read notifications"),
                );
            }
            seen
        })
        .expect("the monitor's thread")
    })
}

#[test]
fn own_commits_foreign_commits_and_other_tables_are_told_apart() {
    need_root!();
    let ns = Netns::new();
    let t = NftThread::spawn_in_netns(ns.path()).expect("backend in the test namespace");
    // The table and set exist before the monitor starts, so the events below are elements.
    let mut desired = Ruleset::new(TABLE_NAME);
    let def = set_def("sel-monitor", vec![KeyField::Ipv4Addr], false, false);
    add_set(&mut desired, def.clone(), vec![]);
    t.sync(desired.clone()).expect("table and set");

    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let done = |e: &[Event]| {
        e.iter().any(|e| matches!(e, Event::Own { .. }))
            && e.iter().any(|e| matches!(e, Event::Foreign { .. }))
            && e.iter().any(|e| matches!(e, Event::Elsewhere { .. }))
    };
    let watcher = watch(&ns, ready_tx, done);
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    // 1. Ours: an element added by this process's backend thread.
    let mut with_elem = Ruleset::new(TABLE_NAME);
    add_set(&mut with_elem, def, vec![(point(v4("10.244.7.7")), None)]);
    let (d, _) = t.sync(with_elem).expect("own element");
    assert_eq!(d.ops.len(), 1, "{:?}", d.ops);
    let gen_after_own = t.run(|b| b.generation()).unwrap().unwrap();
    // 2. Someone else's table: not ours, whoever commits it.
    ns.nft(&["add", "table", "inet", "kube-proxy-like"]);
    // 3. Someone else changing our table: drift.
    ns.nft(&[
        "delete",
        "element",
        "inet",
        TABLE_NAME,
        "sel-monitor",
        "{ 10.244.7.7 }",
    ]);
    let gen_now = t.run(|b| b.generation()).unwrap().unwrap();

    let seen = watcher.join().unwrap();
    assert!(done(&seen), "missing events, saw {seen:?}");
    let own = seen.iter().find_map(|e| match e {
        Event::Own {
            generation,
            objects,
        } => Some((*generation, *objects)),
        _ => None,
    });
    assert_eq!(own, Some((gen_after_own, 1)), "{seen:?}");
    let elsewhere: Vec<u32> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Elsewhere { generation } => Some(*generation),
            _ => None,
        })
        .collect();
    assert_eq!(elsewhere, vec![gen_after_own + 1], "{seen:?}");
    match seen.iter().find(|e| matches!(e, Event::Foreign { .. })) {
        Some(Event::Foreign {
            generation,
            process,
            objects,
            pid,
        }) => {
            assert_eq!(*generation, gen_now, "the last commit is nft's");
            assert_eq!(process, "nft");
            assert_eq!(*objects, 1);
            assert_ne!(*pid, std::process::id());
        }
        other => panic!("no foreign event: {other:?} in {seen:?}"),
    }
    // The independent reader agrees the element is gone (so the event described a real change).
    let j = ns.nft_json();
    let set = j["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o.get("set").filter(|s| s["name"] == "sel-monitor"))
        .expect("the set is there")
        .clone();
    assert!(set.get("elem").is_none(), "{set}");
}
