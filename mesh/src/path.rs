//! Which path each peer's traffic takes, decided from probe results alone (pure: no sockets,
//! no clock). Each node probes its direct path to every peer; results pass through
//! [`Hysteresis`] (N consecutive failures to call a path down, M consecutive successes to call
//! it up again), so a flapping link does not flap routes. For a peer C:
//!
//! ```text
//! direct path to C up                                   → Direct
//! else: some B with our path to B up and B reporting C up → Relay { via: B }  (sticky)
//! else                                                   → Unreachable
//! ```
//!
//! A direct path counts as up only if our probes say so *and* the peer does not report its
//! direct path to us down, so both ends of a broken path relay (symmetry matters for
//! WireGuard, which drops a relayed packet unless the receiver also relays the other way).
//! B's report is B's own hysteresis-filtered view of its *direct* paths, learned over the
//! control connection ([`crate::message::MeshMessage::Reachability`]), so relays are one hop.
//! State is per peer: a probe result for B changes only B's path and the paths that relay (or
//! could relay) through B; a chosen relay is kept while it stays valid, so another node's
//! recovery never moves a working relayed path. The dataplane turns each [`PathChange`] into
//! that one peer's route (via B's tunnel address instead of C's).

use std::collections::BTreeMap;

use crate::wire::NodeName;

/// How many consecutive results flip a path's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hysteresis {
    /// Consecutive failed probes to call an up path down.
    pub down_after: u32,
    /// Consecutive successful probes to call a down path up.
    pub up_after: u32,
}

impl Default for Hysteresis {
    /// Down after 3 failures, up after 5 successes: at one probe a second, a path is
    /// abandoned in 3 s and trusted again only after 5 s of clean probes.
    fn default() -> Self {
        Hysteresis {
            down_after: 3,
            up_after: 5,
        }
    }
}

/// The filtered health of one direct path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkHealth {
    up: bool,
    /// Consecutive results that contradict `up`.
    against: u32,
}

impl LinkHealth {
    /// A path not probed yet counts as up (the overlay starts direct).
    pub fn new() -> LinkHealth {
        LinkHealth {
            up: true,
            against: 0,
        }
    }

    /// Whether the path is considered up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Down, but the latest probe answered: the path may be coming back (it is trusted again
    /// only after `up_after` answers in a row).
    pub fn recovering(&self) -> bool {
        !self.up && self.against > 0
    }

    /// Records one probe result; `true` if the health flipped.
    pub fn observe(&mut self, ok: bool, h: Hysteresis) -> bool {
        if ok == self.up {
            self.against = 0;
            return false;
        }
        self.against += 1;
        let needed = if self.up { h.down_after } else { h.up_after };
        if self.against >= needed.max(1) {
            self.up = ok;
            self.against = 0;
            true
        } else {
            false
        }
    }
}

impl Default for LinkHealth {
    fn default() -> Self {
        LinkHealth::new()
    }
}

/// How traffic to one peer goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// Straight to the peer.
    Direct,
    /// Through another node that reaches it.
    Relay {
        /// The relaying node.
        via: NodeName,
    },
    /// Neither (traffic keeps the direct route: nothing better is known).
    Unreachable,
}

/// One peer's path changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathChange {
    /// The peer.
    pub peer: NodeName,
    /// Its old path.
    pub from: Path,
    /// Its new path.
    pub to: Path,
}

/// This node's view: its direct paths, what peers report, and the resulting paths.
#[derive(Debug, Clone)]
pub struct PathTable {
    me: NodeName,
    hysteresis: Hysteresis,
    links: BTreeMap<NodeName, LinkHealth>,
    /// Reporter B → (C → B's direct path to C is up).
    reports: BTreeMap<NodeName, BTreeMap<NodeName, bool>>,
    /// Reporter B → B's direct path to *us* is up (B's own probes of us).
    seen_by: BTreeMap<NodeName, bool>,
    paths: BTreeMap<NodeName, Path>,
}

impl PathTable {
    /// An empty table for node `me`.
    pub fn new(me: NodeName, hysteresis: Hysteresis) -> PathTable {
        PathTable {
            me,
            hysteresis,
            links: BTreeMap::new(),
            reports: BTreeMap::new(),
            seen_by: BTreeMap::new(),
            paths: BTreeMap::new(),
        }
    }

    /// Sets the member peers (from Node objects): new peers start Direct, departed peers are
    /// forgotten along with their reports.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = NodeName>) -> Vec<PathChange> {
        let wanted: BTreeMap<NodeName, ()> = peers
            .into_iter()
            .filter(|p| *p != self.me)
            .map(|p| (p, ()))
            .collect();
        self.links.retain(|p, _| wanted.contains_key(p));
        self.reports.retain(|p, _| wanted.contains_key(p));
        self.seen_by.retain(|p, _| wanted.contains_key(p));
        self.paths.retain(|p, _| wanted.contains_key(p));
        for p in wanted.keys() {
            if !self.links.contains_key(p) {
                self.links.insert(p.clone(), LinkHealth::new());
                self.paths.insert(p.clone(), Path::Direct);
            }
        }
        self.recompute()
    }

    /// Records a probe of our direct path to `peer`.
    pub fn probe(&mut self, peer: &NodeName, ok: bool) -> Vec<PathChange> {
        let h = self.hysteresis;
        let Some(link) = self.links.get_mut(peer) else {
            return Vec::new();
        };
        let before = *link;
        link.observe(ok, h);
        // Recomputed also when a down path starts or stops answering (no flip): that
        // decides whether a new relay may be chosen.
        if *link != before {
            self.recompute()
        } else {
            Vec::new()
        }
    }

    /// Replaces what `from` reports about its direct paths (ignored if `from` is not a peer).
    pub fn report(&mut self, from: &NodeName, reach: &[(NodeName, bool)]) -> Vec<PathChange> {
        if !self.links.contains_key(from) {
            return Vec::new();
        }
        let r = reach
            .iter()
            .filter(|(c, _)| c != from && *c != self.me)
            .cloned()
            .collect();
        self.reports.insert(from.clone(), r);
        match reach.iter().find(|(c, _)| *c == self.me) {
            Some((_, up)) => self.seen_by.insert(from.clone(), *up),
            None => self.seen_by.remove(from),
        };
        self.recompute()
    }

    /// Drops `from`'s report (its control connection ended: the report may be stale).
    pub fn forget_report(&mut self, from: &NodeName) -> Vec<PathChange> {
        let had_seen = self.seen_by.remove(from).is_some();
        if self.reports.remove(from).is_some() || had_seen {
            self.recompute()
        } else {
            Vec::new()
        }
    }

    /// The current path to `peer`.
    pub fn path(&self, peer: &NodeName) -> Option<&Path> {
        self.paths.get(peer)
    }

    /// Peers currently relayed (`weft_mesh_relayed_peers`).
    pub fn relayed(&self) -> usize {
        self.paths
            .values()
            .filter(|p| matches!(p, Path::Relay { .. }))
            .count()
    }

    /// What we tell peers: our filtered direct-path health to each peer.
    pub fn my_report(&self) -> Vec<(NodeName, bool)> {
        self.links
            .iter()
            .map(|(p, l)| (p.clone(), l.is_up()))
            .collect()
    }

    /// Our direct path to `p` is usable: our probes say up, and `p` does not report its
    /// path to us down. Both ends thus leave a path together, so relays are symmetric (a
    /// WireGuard peer accepts a relayed packet only if it relays the other way too).
    fn link_up(&self, p: &NodeName) -> bool {
        self.links.get(p).is_some_and(LinkHealth::is_up) && self.seen_by.get(p) != Some(&false)
    }

    fn can_relay(&self, via: &NodeName, target: &NodeName) -> bool {
        via != target
            && self.link_up(via)
            && self.reports.get(via).and_then(|r| r.get(target)).copied() == Some(true)
    }

    /// The decision for one peer given the current one (each peer on its own: no other
    /// peer's path is an input).
    fn decide(&self, peer: &NodeName, current: &Path) -> Path {
        if self.link_up(peer) {
            return Path::Direct;
        }
        if let Path::Relay { via } = current
            && self.can_relay(via, peer)
        {
            return current.clone();
        }
        // A path that is not in use and answers our probes again is coming back (a link back
        // up after an outage: its far end and every relay candidate recover at about the
        // same time, each after its own hysteresis, in an order set by probe phases). That
        // covers our probes having answered once (recovering) and our side being up while
        // the peer's report still says down (its hysteresis a tick behind ours). Moving the
        // peer onto a relay now would change routes and WireGuard peers twice within seconds
        // while the direct path already carries traffic (an unreachable peer keeps its
        // direct route), so no new relay is chosen for it. A path in use (Direct) that the
        // peer reports down is still relayed at once: both ends must leave it together.
        if *current != Path::Direct
            && self
                .links
                .get(peer)
                .is_some_and(|l| l.recovering() || l.is_up())
        {
            return Path::Unreachable;
        }
        self.links
            .keys()
            .find(|b| self.can_relay(b, peer))
            .map_or(Path::Unreachable, |b| Path::Relay { via: b.clone() })
    }

    fn recompute(&mut self) -> Vec<PathChange> {
        let mut changes = Vec::new();
        let peers: Vec<NodeName> = self.paths.keys().cloned().collect();
        for peer in peers {
            let current = self.paths[&peer].clone();
            let next = self.decide(&peer, &current);
            if next != current {
                self.paths.insert(peer.clone(), next.clone());
                changes.push(PathChange {
                    peer,
                    from: current,
                    to: next,
                });
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::new(s).expect("name")
    }

    fn relay(via: &str) -> Path {
        Path::Relay { via: n(via) }
    }

    #[derive(Debug, Clone)]
    enum Ev {
        /// A probe of our direct path to a peer.
        Probe(&'static str, bool),
        /// The same probe result `k` times.
        Probes(&'static str, bool, u32),
        /// A peer's reachability report.
        Report(&'static str, &'static [(&'static str, bool)]),
        /// A peer's control connection ended.
        Forget(&'static str),
    }
    use Ev::*;

    fn table() -> PathTable {
        let mut t = PathTable::new(
            n("a"),
            Hysteresis {
                down_after: 3,
                up_after: 2,
            },
        );
        t.set_peers(["a", "b", "c", "d"].map(n));
        t
    }

    fn apply(t: &mut PathTable, ev: &Ev) -> Vec<PathChange> {
        match ev {
            Probe(p, ok) => t.probe(&n(p), *ok),
            Probes(p, ok, k) => (0..*k).flat_map(|_| t.probe(&n(p), *ok)).collect(),
            Report(from, r) => t.report(
                &n(from),
                &r.iter().map(|(c, up)| (n(c), *up)).collect::<Vec<_>>(),
            ),
            Forget(from) => t.forget_report(&n(from)),
        }
    }

    #[test]
    fn decisions_follow_probes_reports_and_hysteresis() {
        type Case<'a> = (&'a str, &'a [Ev], &'a [(&'a str, Path)]);
        let cases: &[Case<'_>] = &[
            (
                "fresh peers are direct",
                &[],
                &[
                    ("b", Path::Direct),
                    ("c", Path::Direct),
                    ("d", Path::Direct),
                ],
            ),
            (
                "two failures are not enough",
                &[Probes("c", false, 2)],
                &[("c", Path::Direct)],
            ),
            (
                "three failures without a report: unreachable",
                &[Probes("c", false, 3)],
                &[("c", Path::Unreachable)],
            ),
            (
                "a success resets the failure streak",
                &[
                    Probes("c", false, 2),
                    Probe("c", true),
                    Probes("c", false, 2),
                ],
                &[("c", Path::Direct)],
            ),
            (
                "down, and b reaches c: relay via b",
                &[Report("b", &[("c", true)]), Probes("c", false, 3)],
                &[("c", relay("b")), ("b", Path::Direct), ("d", Path::Direct)],
            ),
            (
                "a report that arrives later turns unreachable into relay",
                &[Probes("c", false, 3), Report("d", &[("c", true)])],
                &[("c", relay("d"))],
            ),
            (
                "a relay we cannot reach ourselves is not used",
                &[
                    Report("b", &[("c", true)]),
                    Probes("b", false, 3),
                    Probes("c", false, 3),
                ],
                &[("c", Path::Unreachable), ("b", Path::Unreachable)],
            ),
            (
                "a relay that reports c down is not used",
                &[
                    Report("b", &[("c", false)]),
                    Report("d", &[("c", true)]),
                    Probes("c", false, 3),
                ],
                &[("c", relay("d"))],
            ),
            (
                "one success is not enough to come back",
                &[
                    Report("b", &[("c", true)]),
                    Probes("c", false, 3),
                    Probe("c", true),
                ],
                &[("c", relay("b"))],
            ),
            (
                "back to direct after two successes",
                &[
                    Report("b", &[("c", true)]),
                    Probes("c", false, 3),
                    Probes("c", true, 2),
                ],
                &[("c", Path::Direct)],
            ),
            (
                "the relay is sticky while it stays valid",
                &[
                    Report("d", &[("c", true)]),
                    Probes("c", false, 3),
                    Report("b", &[("c", true)]),
                ],
                &[("c", relay("d"))],
            ),
            (
                "the relay goes down: another one takes over",
                &[
                    Report("b", &[("c", true)]),
                    Report("d", &[("c", true)]),
                    Probes("c", false, 3),
                    Probes("b", false, 3),
                ],
                &[("c", relay("d")), ("b", Path::Unreachable)],
            ),
            (
                "the relay's control connection ends: its report is dropped",
                &[
                    Report("b", &[("c", true)]),
                    Probes("c", false, 3),
                    Forget("b"),
                ],
                &[("c", Path::Unreachable)],
            ),
            (
                "reports about ourselves or the reporter are ignored",
                &[
                    Report("b", &[("a", true), ("b", true)]),
                    Probes("b", false, 3),
                ],
                &[("b", Path::Unreachable)],
            ),
            (
                "a down path that answers again gets no new relay",
                &[
                    Probes("c", false, 3),
                    Probe("c", true),
                    Report("b", &[("c", true)]),
                ],
                &[("c", Path::Unreachable)],
            ),
            (
                "once it fails again, the relay is taken",
                &[
                    Probes("c", false, 3),
                    Probe("c", true),
                    Report("b", &[("c", true)]),
                    Probe("c", false),
                ],
                &[("c", relay("b"))],
            ),
            (
                "our own link back up: the peer that recovers first is no detour for the others",
                &[
                    Report("b", &[("c", true), ("d", true)]),
                    Report("d", &[("b", true), ("c", true)]),
                    Probes("b", false, 3),
                    Probes("c", false, 3),
                    Probes("d", false, 3),
                    Probe("c", true),
                    Probe("d", true),
                    Probes("b", true, 2),
                ],
                &[
                    ("b", Path::Direct),
                    ("c", Path::Unreachable),
                    ("d", Path::Unreachable),
                ],
            ),
            (
                "our side is back up but the peer's report lags: no new relay",
                &[
                    Report("b", &[("c", true)]),
                    Report("c", &[("a", false)]),
                    Probes("c", false, 3),
                    Forget("b"),
                    Probes("c", true, 2),
                    Report("b", &[("c", true)]),
                ],
                &[("c", Path::Unreachable)],
            ),
            (
                "a direct path the peer reports down is relayed at once (both ends leave it)",
                &[Report("b", &[("c", true)]), Report("c", &[("a", false)])],
                &[("c", relay("b"))],
            ),
            (
                "reports from non-members are ignored",
                &[Report("x", &[("c", true)]), Probes("c", false, 3)],
                &[("c", Path::Unreachable)],
            ),
        ];
        for (what, events, expect) in cases {
            let mut t = table();
            for e in *events {
                apply(&mut t, e);
            }
            for (peer, path) in *expect {
                assert_eq!(t.path(&n(peer)), Some(path), "{what}: path to {peer}");
            }
        }
    }

    #[test]
    fn a_flapping_link_does_not_flap_routes() {
        // Alternating results, and bursts one short of each threshold: no change ever.
        let patterns: &[&[bool]] = &[
            &[false, true, false, true, false, true, false, true],
            &[false, false, true, false, false, true, false, false, true],
        ];
        for pattern in patterns {
            let mut t = table();
            t.report(&n("b"), &[(n("c"), true)]);
            for _ in 0..50 {
                for ok in *pattern {
                    assert_eq!(t.probe(&n("c"), *ok), vec![], "{pattern:?}");
                }
            }
            assert_eq!(t.path(&n("c")), Some(&Path::Direct));
        }
        // Once relayed, single good probes between failures do not bring it back.
        let mut t = table();
        t.report(&n("b"), &[(n("c"), true)]);
        apply(&mut t, &Probes("c", false, 3));
        for _ in 0..50 {
            assert_eq!(t.probe(&n("c"), true), vec![]);
            assert_eq!(t.probe(&n("c"), false), vec![]);
        }
        assert_eq!(t.path(&n("c")), Some(&relay("b")));
    }

    #[test]
    fn a_blip_on_one_path_changes_only_that_peer() {
        let mut t = table();
        t.report(&n("b"), &[(n("c"), true), (n("d"), true)]);
        t.report(&n("d"), &[(n("b"), true), (n("c"), true)]);
        let changes = apply(&mut t, &Probes("b", false, 3));
        assert_eq!(
            changes,
            vec![PathChange {
                peer: n("b"),
                from: Path::Direct,
                to: relay("d")
            }]
        );
        let changes = apply(&mut t, &Probes("b", true, 2));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].peer, n("b"));
        assert_eq!(t.path(&n("c")), Some(&Path::Direct));
        assert_eq!(t.path(&n("d")), Some(&Path::Direct));
    }

    #[test]
    fn a_blip_on_the_relay_moves_only_the_peers_it_relays() {
        let mut t = table();
        t.report(&n("b"), &[(n("c"), true)]);
        t.report(&n("d"), &[(n("b"), true)]);
        apply(&mut t, &Probes("c", false, 3));
        assert_eq!(t.relayed(), 1);
        let changes = apply(&mut t, &Probes("b", false, 3));
        let moved: Vec<_> = changes.iter().map(|c| c.peer.as_str()).collect();
        assert_eq!(moved, ["b", "c"]);
        assert_eq!(t.path(&n("b")), Some(&relay("d")));
        assert_eq!(t.path(&n("c")), Some(&Path::Unreachable));
        assert_eq!(t.path(&n("d")), Some(&Path::Direct));
    }

    #[test]
    fn membership_changes_add_direct_peers_and_forget_departed_ones() {
        let mut t = table();
        t.report(&n("b"), &[(n("c"), true)]);
        apply(&mut t, &Probes("c", false, 3));
        let changes = t.set_peers(["a", "c", "d", "e"].map(n));
        assert_eq!(
            changes,
            vec![PathChange {
                peer: n("c"),
                from: relay("b"),
                to: Path::Unreachable
            }]
        );
        assert_eq!(t.path(&n("b")), None);
        assert_eq!(t.path(&n("e")), Some(&Path::Direct));
        assert_eq!(
            t.my_report(),
            vec![(n("c"), false), (n("d"), true), (n("e"), true)]
        );
    }

    #[test]
    fn a_peer_that_reports_us_down_is_relayed_even_while_our_probes_succeed() {
        let mut t = table();
        apply(&mut t, &Report("b", &[("c", true), ("a", true)]));
        assert_eq!(t.path(&n("c")), Some(&Path::Direct));
        let changes = apply(&mut t, &Report("c", &[("a", false), ("b", true)]));
        assert_eq!(t.path(&n("c")), Some(&relay("b")), "{changes:?}");
        assert_eq!(
            t.my_report().iter().find(|(p, _)| *p == n("c")),
            Some(&(n("c"), true)),
            "our own report stays our probes' view (no lock-step of two down reports)"
        );
        apply(&mut t, &Report("c", &[("a", true), ("b", true)]));
        assert_eq!(t.path(&n("c")), Some(&Path::Direct));
        apply(&mut t, &Report("c", &[("a", false)]));
        apply(&mut t, &Forget("c"));
        assert_eq!(
            t.path(&n("c")),
            Some(&Path::Direct),
            "a stale report is forgotten"
        );
    }
}
