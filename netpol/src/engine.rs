//! The incremental engine: one cluster change in → the ops of one transaction out.
//!
//! [`Engine`] holds the cluster model and the desired [`Ruleset`] of its node, and keeps the
//! bookkeeping that lets a change touch only what it concerns: which local pod uses which group
//! chain, which group chains use which policy chain, which policy chains use which set. A pod
//! relabel costs set and map elements, plus at most a group chain added or removed; it never
//! walks the whole cluster. [`crate::compile::compile`] is the from-scratch reference: after any
//! sequence of changes, `engine.desired() == compile(engine.cluster())` (property-tested).
//!
//! Ops are computed by diffing only the objects a change touched ([`Tracker`]), with the same
//! [`crate::diff::diff`] used at start-up, so ordering and kernel rules live in one place.
//! Objects whose deletion the kernel needs postponed (see `diff`) are kept as pending and
//! deleted by the next call ([`Engine::pending_ops`] or the next change).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::compile::{
    self, PortScope, SetSpec, addr_value, base_ruleset, dispatch_map, group_chain,
    group_chain_name, named_port_keys, names, policy_chain, policy_chain_name,
};
use crate::diff::{Op, diff};
use crate::model::{
    Cluster, Direction, Namespace, NamespaceScope, ObjectKey, Pod, PodSelection, Policy,
};
use crate::ruleset::{Chain, Family, Key, Ruleset, Set, SetDef, Verdict};

/// One change of the cluster, as watches deliver them.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A pod was created or updated.
    UpsertPod(Pod),
    /// A pod is gone.
    DeletePod(ObjectKey),
    /// A namespace was created or updated.
    UpsertNamespace(Namespace),
    /// A namespace is gone.
    DeleteNamespace(String),
    /// A policy was created or updated (already validated).
    UpsertPolicy(Policy),
    /// A policy is gone.
    DeletePolicy(ObjectKey),
}

type SetRef = (SetSpec, Family);

/// The incremental engine of one node.
#[derive(Clone, Debug)]
pub struct Engine {
    node: String,
    cluster: Cluster,
    desired: Ruleset,
    /// Member pods by IP (to keep an element while another pod still contributes it).
    ip_pods: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    /// Local member pod → its group chain per direction (ingress, egress).
    pod_groups: BTreeMap<ObjectKey, [Option<String>; 2]>,
    /// Group chain → (its policy chains, number of local pods using it).
    groups: BTreeMap<String, (Vec<String>, usize)>,
    /// Policy chain → (policy, direction, sets it uses, number of groups using it).
    policy_chains: BTreeMap<String, PolicyChainUse>,
    /// Set in use → (its meaning, number of policy chains using it).
    sets: BTreeMap<String, (SetRef, usize)>,
    /// Objects the kernel still holds that the next transaction must delete.
    pending: Ruleset,
}

#[derive(Clone, Debug)]
struct PolicyChainUse {
    policy: ObjectKey,
    direction: Direction,
    refs: BTreeSet<SetRef>,
    users: usize,
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

impl Engine {
    /// An engine for `node` over an empty cluster.
    pub fn new(node: &str, table: &str) -> Engine {
        Engine::from_cluster(Cluster::default(), node, table)
    }

    /// An engine over a whole cluster (start-up): compiles from scratch and derives its
    /// bookkeeping.
    pub fn from_cluster(cluster: Cluster, node: &str, table: &str) -> Engine {
        let mut engine = Engine {
            node: node.to_string(),
            cluster: Cluster::default(),
            desired: base_ruleset(table),
            ip_pods: HashMap::new(),
            pod_groups: BTreeMap::new(),
            groups: BTreeMap::new(),
            policy_chains: BTreeMap::new(),
            sets: BTreeMap::new(),
            pending: Ruleset::new(table),
        };
        engine.cluster.namespaces = cluster.namespaces;
        engine.cluster.policies = cluster.policies;
        engine.cluster.pods = cluster.pods;
        for pod in engine.cluster.pods.values() {
            if pod.is_member() {
                for ip in &pod.ips {
                    engine
                        .ip_pods
                        .entry(*ip)
                        .or_default()
                        .insert(pod.key.clone());
                }
            }
        }
        // Start-up builds the whole table: nothing to diff, so nothing to record.
        let mut t = Tracker::untracked();
        let local: Vec<ObjectKey> = engine
            .cluster
            .pods
            .values()
            .filter(|p| p.is_member() && p.node == engine.node)
            .map(|p| p.key.clone())
            .collect();
        for key in local {
            let ips = engine.cluster.pods[&key].ips.clone();
            for ip in ips {
                let set = names::pods_local(crate::model::family_of(ip));
                t.put_elem(
                    &mut engine.desired,
                    &set,
                    Key::point(vec![addr_value(ip)]),
                    None,
                );
            }
            engine.update_local_pod(&mut t, &key, None);
        }
        engine
    }

    /// The node this engine compiles for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The cluster as the engine knows it.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The desired table after every change so far.
    pub fn desired(&self) -> &Ruleset {
        &self.desired
    }

    /// Objects kept in the kernel one transaction longer (see the module docs).
    pub fn pending(&self) -> &Ruleset {
        &self.pending
    }

    /// Ops that delete pending objects (call after a transaction committed).
    pub fn pending_ops(&mut self) -> Vec<Op> {
        if self.pending.chains.is_empty() && self.pending.sets.is_empty() {
            return Vec::new();
        }
        self.finish(Tracker::default())
    }

    /// Ops that bring a kernel holding `current` (a fresh dump; `None`: no table) to the desired
    /// table: adoption at start-up, and recovery after a failed transaction. Objects the kernel
    /// must keep one transaction longer become pending.
    pub fn resync(&mut self, current: Option<&Ruleset>) -> Vec<Op> {
        let d = diff(current, &self.desired);
        self.pending = Ruleset::new(&self.desired.table);
        if let Some(cur) = current {
            for name in &d.deferred {
                if let Some(c) = cur.chains.get(name) {
                    self.pending.chains.insert(name.clone(), c.clone());
                }
                if let Some(s) = cur.sets.get(name) {
                    self.pending.sets.insert(name.clone(), s.clone());
                }
            }
        }
        d.ops
    }

    /// Applies one change to the model and returns the ops that bring a kernel holding the
    /// previous desired table (plus pending objects) to the new one.
    pub fn apply(&mut self, change: Change) -> Vec<Op> {
        self.apply_all([change])
    }

    /// Applies a burst of changes and returns the ops of ONE transaction for all of them: each
    /// object appears at most once, with its state before the first change and after the last
    /// (an element that moves twice is one delete + one add, never a chain of deletes and
    /// adds of the same element, which the kernel refuses within one transaction).
    pub fn apply_all(&mut self, changes: impl IntoIterator<Item = Change>) -> Vec<Op> {
        let mut t = Tracker::default();
        for change in changes {
            self.apply_into(&mut t, change);
        }
        self.finish(t)
    }

    fn apply_into(&mut self, t: &mut Tracker, change: Change) {
        match change {
            Change::UpsertPod(pod) => {
                let key = pod.key.clone();
                self.change_pod(t, &key, Some(pod));
            }
            Change::DeletePod(key) => self.change_pod(t, &key, None),
            Change::UpsertNamespace(ns) => {
                let name = ns.name.clone();
                self.change_namespace(t, &name, Some(ns));
            }
            Change::DeleteNamespace(name) => self.change_namespace(t, &name, None),
            Change::UpsertPolicy(p) => {
                let key = p.key.clone();
                self.change_policy(t, &key, Some(p));
            }
            Change::DeletePolicy(key) => self.change_policy(t, &key, None),
        }
    }

    /// Turns what a change touched into ops, and remembers what must be deleted later.
    fn finish(&mut self, t: Tracker) -> Vec<Op> {
        let (mut before, after) = t.partials(&self.desired);
        // The kernel also still holds the pending objects.
        for (name, set) in std::mem::take(&mut self.pending.sets) {
            before.sets.entry(name).or_insert(set);
        }
        for (name, chain) in std::mem::take(&mut self.pending.chains) {
            before.chains.entry(name).or_insert(chain);
        }
        let d = diff(Some(&before), &after);
        for name in &d.deferred {
            if let Some(c) = before.chains.remove(name) {
                self.pending.chains.insert(name.clone(), c);
            }
            if let Some(s) = before.sets.remove(name) {
                self.pending.sets.insert(name.clone(), s);
            }
        }
        d.ops
    }

    // ---- pods ------------------------------------------------------------------------------

    fn change_pod(&mut self, t: &mut Tracker, key: &ObjectKey, new: Option<Pod>) {
        let old = match &new {
            Some(p) => self.cluster.pods.insert(key.clone(), p.clone()),
            None => self.cluster.pods.remove(key),
        };
        if old == new {
            return;
        }
        let old_member = old.as_ref().filter(|p| p.is_member());
        let new_member = new.as_ref().filter(|p| p.is_member());
        if let Some(p) = old_member {
            for ip in &p.ips {
                if let Some(keys) = self.ip_pods.get_mut(ip) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.ip_pods.remove(ip);
                    }
                }
            }
        }
        if let Some(p) = new_member {
            for ip in &p.ips {
                self.ip_pods.entry(*ip).or_default().insert(key.clone());
            }
        }

        // Peer sets in use: this pod's contribution before and after. A pure relabel (same
        // addresses, ports, node) can only change sets whose pod selector reads a changed key.
        let ns_labels = self.cluster.namespace_labels(&key.namespace).cloned();
        let changed_keys = match (old_member, new_member) {
            (Some(o), Some(n)) if o.ips == n.ips && o.ports == n.ports && o.node == n.node => {
                Some(changed_label_keys(&o.labels, &n.labels))
            }
            _ => None,
        };
        let specs: Vec<(String, SetRef)> = self
            .sets
            .iter()
            .filter(|(_, ((spec, _), _))| match &changed_keys {
                Some(keys) => spec_reads_any_label(spec, keys),
                None => true,
            })
            .map(|(name, (r, _))| (name.clone(), r.clone()))
            .collect();
        for (name, (spec, family)) in specs {
            let before = contribution(&spec, family, old_member, ns_labels.as_ref(), &self.node);
            let after = contribution(&spec, family, new_member, ns_labels.as_ref(), &self.node);
            self.move_elements(t, &name, &spec, family, before, after, key);
        }

        // This node's own pods: local set, dispatch, groups.
        let was_local = old_member.is_some_and(|p| p.node == self.node);
        let is_local = new_member.is_some_and(|p| p.node == self.node);
        if was_local || is_local {
            for family in Family::ALL {
                let set = names::pods_local(family);
                let before: BTreeSet<Key> = old_member
                    .filter(|_| was_local)
                    .and_then(|p| p.ip(family))
                    .map(|ip| Key::point(vec![addr_value(ip)]))
                    .into_iter()
                    .collect();
                let after: BTreeSet<Key> = new_member
                    .filter(|_| is_local)
                    .and_then(|p| p.ip(family))
                    .map(|ip| Key::point(vec![addr_value(ip)]))
                    .into_iter()
                    .collect();
                for k in before.difference(&after) {
                    let ip = key_ip(k);
                    if !self.other_local_has_ip(key, ip) {
                        t.del_elem(&mut self.desired, &set, k);
                    }
                }
                for k in after.difference(&before) {
                    t.put_elem(&mut self.desired, &set, k.clone(), None);
                }
            }
            let old_local = old_member.filter(|_| was_local).cloned();
            self.update_local_pod(t, key, old_local.as_ref());
        }
    }

    fn other_local_has_ip(&self, except: &ObjectKey, ip: IpAddr) -> bool {
        self.ip_pods.get(&ip).is_some_and(|keys| {
            keys.iter().any(|k| {
                k != except
                    && self
                        .cluster
                        .pods
                        .get(k)
                        .is_some_and(|p| p.node == self.node)
            })
        })
    }

    /// Moves one pod's elements in one set from `before` to `after`, keeping elements another
    /// member pod still contributes (two pods can briefly share an IP).
    #[allow(clippy::too_many_arguments)] // one set, one pod: all of it is needed here
    fn move_elements(
        &mut self,
        t: &mut Tracker,
        set: &str,
        spec: &SetSpec,
        family: Family,
        before: Vec<Key>,
        after: Vec<Key>,
        pod: &ObjectKey,
    ) {
        if before == after {
            return;
        }
        let after_set: BTreeSet<&Key> = after.iter().collect();
        for k in &before {
            if after_set.contains(k) {
                continue;
            }
            let ip = key_ip(k);
            let still = self.ip_pods.get(&ip).is_some_and(|keys| {
                keys.iter().filter(|o| *o != pod).any(|o| {
                    let other = self.cluster.pods.get(o);
                    let labels = self.cluster.namespace_labels(&o.namespace);
                    contribution(spec, family, other, labels, &self.node).contains(k)
                })
            });
            if !still {
                t.del_elem(&mut self.desired, set, k);
            }
        }
        for k in after {
            t.put_elem(&mut self.desired, set, k, None);
        }
    }

    /// Recomputes a local pod's group chains and dispatch elements. `old` is the pod as it was
    /// (None if it was not a local member); the cluster holds the new state.
    fn update_local_pod(&mut self, t: &mut Tracker, key: &ObjectKey, old: Option<&Pod>) {
        let new = self
            .cluster
            .pods
            .get(key)
            .filter(|p| p.is_member() && p.node == self.node)
            .cloned();
        let old_groups = self.pod_groups.remove(key).unwrap_or_default();
        let mut new_groups: [Option<String>; 2] = [None, None];
        for direction in Direction::ALL {
            let i = dir_index(direction);
            let policies: Vec<Policy> = match &new {
                Some(p) => compile::isolating(&self.cluster, p, direction)
                    .into_iter()
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            let chain_names: Vec<String> = policies
                .iter()
                .map(|p| policy_chain_name(p, direction))
                .collect();
            let group = (!policies.is_empty()).then(|| group_chain_name(&chain_names, direction));
            if group != old_groups[i]
                && let Some(g) = &group
            {
                self.acquire_group(t, g, &chain_names, &policies, direction);
            }
            // Dispatch elements: old IPs out, new IPs in (a changed verdict is handled by diff).
            for family in Family::ALL {
                let map = dispatch_map(direction, family);
                let old_key = old
                    .filter(|_| old_groups[i].is_some())
                    .and_then(|p| p.ip(family))
                    .map(|ip| Key::point(vec![addr_value(ip)]));
                let new_elem = new.as_ref().and_then(|p| p.ip(family)).and_then(|ip| {
                    group
                        .clone()
                        .map(|g| (Key::point(vec![addr_value(ip)]), Verdict::Jump(g)))
                });
                if let Some(k) = &old_key
                    && new_elem.as_ref().map(|(nk, _)| nk) != Some(k)
                {
                    t.del_elem(&mut self.desired, &map, k);
                }
                if let Some((k, v)) = new_elem {
                    t.put_elem(&mut self.desired, &map, k, Some(v));
                }
            }
            if group != old_groups[i]
                && let Some(g) = &old_groups[i]
            {
                self.release_group(t, g);
            }
            new_groups[i] = group;
        }
        if new.is_some() && new_groups.iter().any(Option::is_some) {
            self.pod_groups.insert(key.clone(), new_groups);
        }
    }

    fn acquire_group(
        &mut self,
        t: &mut Tracker,
        group: &str,
        chain_names: &[String],
        policies: &[Policy],
        direction: Direction,
    ) {
        if let Some((_, users)) = self.groups.get_mut(group) {
            *users += 1;
            return;
        }
        for (name, policy) in chain_names.iter().zip(policies) {
            self.acquire_policy_chain(t, name, policy, direction);
        }
        let refs: Vec<&Policy> = policies.iter().collect();
        let chain = group_chain(group, chain_names, &refs, direction);
        t.put_chain(&mut self.desired, chain);
        self.groups
            .insert(group.to_string(), (chain_names.to_vec(), 1));
    }

    fn release_group(&mut self, t: &mut Tracker, group: &str) {
        let Some((_, users)) = self.groups.get_mut(group) else {
            return;
        };
        *users -= 1;
        if *users > 0 {
            return;
        }
        let (chains, _) = self.groups.remove(group).expect("present above");
        t.remove_chain(&mut self.desired, group);
        for c in chains {
            self.release_policy_chain(t, &c);
        }
    }

    fn acquire_policy_chain(
        &mut self,
        t: &mut Tracker,
        name: &str,
        policy: &Policy,
        direction: Direction,
    ) {
        if let Some(u) = self.policy_chains.get_mut(name) {
            u.users += 1;
            return;
        }
        let (chain, refs) = policy_chain(policy, direction);
        for r in &refs {
            self.acquire_set(t, r);
        }
        t.put_chain(&mut self.desired, chain);
        self.policy_chains.insert(
            name.to_string(),
            PolicyChainUse {
                policy: policy.key.clone(),
                direction,
                refs,
                users: 1,
            },
        );
    }

    fn release_policy_chain(&mut self, t: &mut Tracker, name: &str) {
        let Some(u) = self.policy_chains.get_mut(name) else {
            return;
        };
        u.users -= 1;
        if u.users > 0 {
            return;
        }
        let u = self.policy_chains.remove(name).expect("present above");
        t.remove_chain(&mut self.desired, name);
        for r in &u.refs {
            self.release_set(t, r);
        }
    }

    fn acquire_set(&mut self, t: &mut Tracker, r: &SetRef) {
        let name = r.0.name(r.1);
        if let Some((_, users)) = self.sets.get_mut(&name) {
            *users += 1;
            return;
        }
        let def = r.0.def(r.1);
        t.put_set(&mut self.desired, def);
        for k in r.0.elements(&self.cluster, &self.node, r.1) {
            t.put_elem(&mut self.desired, &name, k, None);
        }
        self.sets.insert(name, (r.clone(), 1));
    }

    fn release_set(&mut self, t: &mut Tracker, r: &SetRef) {
        let name = r.0.name(r.1);
        let Some((_, users)) = self.sets.get_mut(&name) else {
            return;
        };
        *users -= 1;
        if *users == 0 {
            self.sets.remove(&name);
            t.remove_set(&mut self.desired, &name);
        }
    }

    // ---- namespaces ------------------------------------------------------------------------

    fn change_namespace(&mut self, t: &mut Tracker, name: &str, new: Option<Namespace>) {
        let old_labels = self.cluster.namespace_labels(name).cloned();
        match &new {
            Some(ns) => {
                self.cluster.namespaces.insert(name.to_string(), ns.clone());
            }
            None => {
                self.cluster.namespaces.remove(name);
            }
        }
        let new_labels = new.map(|n| n.labels);
        if old_labels == new_labels {
            return;
        }
        // Only selections with a namespaceSelector can see namespace labels.
        let specs: Vec<(String, SetRef)> = self
            .sets
            .iter()
            .filter(|(_, ((spec, _), _))| spec_has_namespace_selector(spec))
            .map(|(n, (r, _))| (n.clone(), r.clone()))
            .collect();
        if specs.is_empty() {
            return;
        }
        let pods: Vec<Pod> = self.cluster.pods_in_namespace(name).cloned().collect();
        for pod in pods.iter().filter(|p| p.is_member()) {
            for (set, (spec, family)) in &specs {
                let before =
                    contribution(spec, *family, Some(pod), old_labels.as_ref(), &self.node);
                let after = contribution(spec, *family, Some(pod), new_labels.as_ref(), &self.node);
                self.move_elements(t, set, spec, *family, before, after, &pod.key);
            }
        }
    }

    // ---- policies --------------------------------------------------------------------------

    fn change_policy(&mut self, t: &mut Tracker, key: &ObjectKey, new: Option<Policy>) {
        let old = match &new {
            Some(p) => self.cluster.policies.insert(key.clone(), p.clone()),
            None => self.cluster.policies.remove(key),
        };
        if old == new {
            return;
        }
        // A chain in use whose policy changed: rewrite it (same name), move its set references.
        if let Some(p) = &new {
            for direction in Direction::ALL {
                let name = policy_chain_name(p, direction);
                let Some(u) = self.policy_chains.get(&name) else {
                    continue;
                };
                if p.rules(direction).is_none() {
                    continue; // no longer isolating this way: the group update below drops it
                }
                let old_refs = u.refs.clone();
                let (chain, refs) = policy_chain(p, direction);
                for r in refs.difference(&old_refs) {
                    self.acquire_set(t, r);
                }
                t.put_chain(&mut self.desired, chain);
                for r in old_refs.difference(&refs) {
                    self.release_set(t, r);
                }
                if let Some(u) = self.policy_chains.get_mut(&name) {
                    u.refs = refs;
                }
            }
        }
        // Which local pods of its namespace it isolates may have changed: only a pod that the
        // old and the new version select differently (per direction) changes group; the others
        // keep theirs (group names and contents depend on chain names, which are stable).
        let isolates = |p: Option<&Policy>, pod: &Pod, d: Direction| {
            p.is_some_and(|p| p.rules(d).is_some() && p.subject.matches(&pod.labels))
        };
        let local: Vec<ObjectKey> = self
            .cluster
            .pods_in_namespace(&key.namespace)
            .filter(|p| p.is_member() && p.node == self.node)
            .filter(|p| {
                Direction::ALL
                    .into_iter()
                    .any(|d| isolates(old.as_ref(), p, d) != isolates(new.as_ref(), p, d))
            })
            .map(|p| p.key.clone())
            .collect();
        for pod in local {
            let current = self.cluster.pods.get(&pod).cloned();
            self.update_local_pod(t, &pod, current.as_ref());
        }
    }

    /// Internal consistency check for tests: bookkeeping agrees with the desired table.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (name, u) in &self.policy_chains {
            if !self.desired.chains.contains_key(name) {
                return Err(format!("policy chain {name} in use but not desired"));
            }
            if u.users == 0 {
                return Err(format!("policy chain {name} has no users"));
            }
            let _ = (&u.policy, u.direction);
        }
        for name in self.groups.keys() {
            if !self.desired.chains.contains_key(name) {
                return Err(format!("group chain {name} in use but not desired"));
            }
        }
        for name in self.sets.keys() {
            if !self.desired.sets.contains_key(name) {
                return Err(format!("set {name} in use but not desired"));
            }
        }
        Ok(())
    }
}

/// Label keys whose value differs between two label maps (added, removed or changed).
fn changed_label_keys(
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    keys.extend(b.keys().filter(|k| !a.contains_key(*k)).cloned());
    keys
}

/// Whether a set's membership could change when these pod label keys change.
fn spec_reads_any_label(spec: &SetSpec, keys: &BTreeSet<String>) -> bool {
    let sel = match spec {
        SetSpec::Pods(sel)
        | SetSpec::NamedPort {
            scope: PortScope::Selection(sel) | PortScope::LocalSubjects(sel),
            ..
        } => sel,
        SetSpec::Block(_)
        | SetSpec::NamedPort {
            scope: PortScope::AllPods,
            ..
        } => return false,
    };
    sel.pods.keys().any(|k| keys.contains(k))
}

/// Whether a set's content depends on namespace labels.
fn spec_has_namespace_selector(spec: &SetSpec) -> bool {
    let sel = match spec {
        SetSpec::Pods(sel)
        | SetSpec::NamedPort {
            scope: PortScope::Selection(sel),
            ..
        } => sel,
        _ => return false,
    };
    matches!(sel.namespaces, NamespaceScope::Selected(_))
}

/// The elements one member pod adds to a set (empty for non-members).
fn contribution(
    spec: &SetSpec,
    family: Family,
    pod: Option<&Pod>,
    ns_labels: Option<&BTreeMap<String, String>>,
    node: &str,
) -> Vec<Key> {
    let Some(pod) = pod.filter(|p| p.is_member()) else {
        return Vec::new();
    };
    let selected = |sel: &PodSelection| sel.matches(pod, ns_labels);
    match spec {
        SetSpec::Pods(sel) => {
            if selected(sel) {
                pod.ip(family)
                    .map(|ip| vec![Key::point(vec![addr_value(ip)])])
                    .unwrap_or_default()
            } else {
                Vec::new()
            }
        }
        SetSpec::Block(_) => Vec::new(),
        SetSpec::NamedPort {
            scope,
            name,
            protocol,
        } => {
            let in_scope = match scope {
                PortScope::Selection(sel) => selected(sel),
                PortScope::AllPods => true,
                PortScope::LocalSubjects(sel) => pod.node == node && selected(sel),
            };
            if in_scope {
                named_port_keys(pod, name, *protocol, family)
            } else {
                Vec::new()
            }
        }
    }
}

/// The address of a key whose first field is an address.
fn key_ip(k: &Key) -> IpAddr {
    match k.from[0] {
        crate::ruleset::Value::V4(a) => IpAddr::V4(a),
        crate::ruleset::Value::V6(a) => IpAddr::V6(a),
        _ => unreachable!("weft's element-tracked sets are keyed by address first"),
    }
}

/// Records what a change touched in the desired table, so ops come from a diff of just that.
#[derive(Default, Debug)]
pub struct Tracker {
    /// False at start-up: mutate without recording (the caller diffs whole tables).
    off: bool,
    /// Set name → its definition before the change (None: did not exist).
    sets: BTreeMap<String, Option<SetDef>>,
    /// (set, key) → the element's data before the change (None: absent).
    elems: BTreeMap<(String, Key), Option<Option<Verdict>>>,
    /// Chain name → the chain before the change (None: did not exist).
    chains: BTreeMap<String, Option<Chain>>,
}

impl Tracker {
    /// A tracker that records nothing.
    fn untracked() -> Tracker {
        Tracker {
            off: true,
            ..Tracker::default()
        }
    }

    fn note_set(&mut self, rs: &Ruleset, name: &str) {
        if self.off {
            return;
        }
        if !self.sets.contains_key(name) {
            let def = rs.sets.get(name).map(|s| s.def.clone());
            self.sets.insert(name.to_string(), def);
        }
    }

    fn note_elem(&mut self, rs: &Ruleset, set: &str, key: &Key) {
        if self.off {
            return;
        }
        self.note_set(rs, set);
        self.elems
            .entry((set.to_string(), key.clone()))
            .or_insert_with(|| rs.sets.get(set).and_then(|s| s.elements.get(key)).cloned());
    }

    fn put_elem(&mut self, rs: &mut Ruleset, set: &str, key: Key, data: Option<Verdict>) {
        self.note_elem(rs, set, &key);
        if let Some(s) = rs.sets.get_mut(set) {
            s.elements.insert(key, data);
        }
    }

    fn del_elem(&mut self, rs: &mut Ruleset, set: &str, key: &Key) {
        self.note_elem(rs, set, key);
        if let Some(s) = rs.sets.get_mut(set) {
            s.elements.remove(key);
        }
    }

    fn put_set(&mut self, rs: &mut Ruleset, def: SetDef) {
        self.note_set(rs, &def.name);
        rs.sets
            .entry(def.name.clone())
            .or_insert_with(|| Set::new(def));
    }

    fn remove_set(&mut self, rs: &mut Ruleset, name: &str) {
        self.note_set(rs, name);
        if let Some(s) = rs.sets.get(name).filter(|_| !self.off) {
            let keys: Vec<Key> = s.elements.keys().cloned().collect();
            for k in keys {
                self.note_elem(rs, name, &k);
            }
        }
        rs.sets.remove(name);
    }

    fn put_chain(&mut self, rs: &mut Ruleset, chain: Chain) {
        if !self.off && !self.chains.contains_key(&chain.def.name) {
            let before = rs.chains.get(&chain.def.name).cloned();
            self.chains.insert(chain.def.name.clone(), before);
        }
        rs.chains.insert(chain.def.name.clone(), chain);
    }

    fn remove_chain(&mut self, rs: &mut Ruleset, name: &str) {
        if !self.off && !self.chains.contains_key(name) {
            let before = rs.chains.get(name).cloned();
            self.chains.insert(name.to_string(), before);
        }
        rs.chains.remove(name);
    }

    /// (before, after): rulesets holding only the touched objects, each element only if it
    /// changed, so `diff(before, after)` is the change and nothing else.
    fn partials(&self, desired: &Ruleset) -> (Ruleset, Ruleset) {
        let mut before = Ruleset {
            comment: desired.comment.clone(),
            ..Ruleset::new(&desired.table)
        };
        let mut after = before.clone();
        for (name, def) in &self.sets {
            if let Some(def) = def {
                before.sets.insert(name.clone(), Set::new(def.clone()));
            }
            if let Some(s) = desired.sets.get(name) {
                after.sets.insert(name.clone(), Set::new(s.def.clone()));
            }
        }
        for ((set, key), was) in &self.elems {
            let now = desired.sets.get(set).and_then(|s| s.elements.get(key));
            if now == was.as_ref() {
                continue;
            }
            if let (Some(data), Some(s)) = (was, before.sets.get_mut(set)) {
                s.elements.insert(key.clone(), data.clone());
            }
            if let (Some(data), Some(s)) = (now, after.sets.get_mut(set)) {
                s.elements.insert(key.clone(), data.clone());
            }
        }
        for (name, was) in &self.chains {
            let now = desired.chains.get(name);
            if now == was.as_ref() {
                continue;
            }
            if let Some(c) = was {
                before.chains.insert(name.clone(), c.clone());
            }
            if let Some(c) = now {
                after.chains.insert(name.clone(), c.clone());
            }
        }
        (before, after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::fake::FakeBackend;
    use crate::synth::{self, GenParams, Rng};
    use proptest::prelude::*;

    const TABLE: &str = "weft";
    const NODE: &str = "node-0";

    /// The kernel after the engine's ops equals the desired table plus pending objects.
    fn kernel_matches(fake: &FakeBackend, engine: &Engine) -> Result<(), String> {
        let mut expected = engine.desired().clone();
        for (n, c) in &engine.pending().chains {
            expected
                .chains
                .entry(n.clone())
                .or_insert_with(|| c.clone());
        }
        for (n, s) in &engine.pending().sets {
            expected.sets.entry(n.clone()).or_insert_with(|| s.clone());
        }
        let got = fake.dump().ok_or("no table in the kernel")?;
        if *got != expected {
            return Err(format!(
                "kernel differs from desired+pending\n--- kernel\n{got}\n--- expected\n{expected}"
            ));
        }
        Ok(())
    }

    fn run_changes(seed: u64, p: &GenParams, steps: usize) -> Result<(), TestCaseError> {
        let mut cluster = synth::cluster(p, seed);
        let mut engine = Engine::from_cluster(cluster.clone(), NODE, TABLE);
        let want = compile(&cluster, NODE, TABLE);
        prop_assert!(
            *engine.desired() == want,
            "start: engine differs from compile\n--- engine\n{}\n--- compile\n{want}",
            engine.desired()
        );
        let mut fake = FakeBackend::new();
        fake.apply(TABLE, &diff(None, engine.desired()).ops)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut rng = Rng::new(seed ^ 0x5eed);
        for step in 0..steps {
            let change = synth::change(&mut rng, p, &cluster, step);
            synth::apply_change(&mut cluster, &change);
            let ops = engine.apply(change.clone());
            let want = compile(&cluster, NODE, TABLE);
            prop_assert!(
                *engine.desired() == want,
                "step {step} {change:?}: incremental desired differs from compile\n--- engine\n{}\n--- compile\n{want}",
                engine.desired()
            );
            engine
                .check_invariants()
                .map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?;
            fake.apply(TABLE, &ops).map_err(|e| {
                TestCaseError::fail(format!(
                    "step {step} {change:?}: kernel refused {e}: {ops:#?}"
                ))
            })?;
            kernel_matches(&fake, &engine).map_err(TestCaseError::fail)?;
            if rng.chance(20) {
                // A burst, as the controller coalesces them: one transaction for all.
                let burst: Vec<Change> = (0..rng.below(6) + 2)
                    .map(|i| {
                        let c = synth::change(&mut rng, p, &cluster, 1000 * step + i);
                        synth::apply_change(&mut cluster, &c);
                        c
                    })
                    .collect();
                let ops = engine.apply_all(burst);
                let want = compile(&cluster, NODE, TABLE);
                prop_assert!(
                    *engine.desired() == want,
                    "step {step}: burst differs from compile"
                );
                fake.apply(TABLE, &ops).map_err(|e| {
                    TestCaseError::fail(format!("step {step} burst: kernel refused {e}"))
                })?;
                kernel_matches(&fake, &engine).map_err(TestCaseError::fail)?;
                // Within one transaction every element is touched at most once per kind of op.
                let mut seen = std::collections::BTreeSet::new();
                for op in &ops {
                    if let Op::DeleteElements { set, keys } = op {
                        for k in keys {
                            prop_assert!(
                                seen.insert((set.clone(), k.clone())),
                                "{set} {k} deleted twice in one batch"
                            );
                        }
                    }
                }
            }
            if rng.chance(50) {
                let ops = engine.pending_ops();
                fake.apply(TABLE, &ops)
                    .map_err(|e| TestCaseError::fail(format!("pending: {e}")))?;
                prop_assert!(
                    engine.pending().chains.is_empty() && engine.pending().sets.is_empty()
                );
                kernel_matches(&fake, &engine).map_err(TestCaseError::fail)?;
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn incremental_changes_equal_a_fresh_compile_and_the_kernel_follows(
            seed in any::<u64>(), ns in 1usize..4, pods in 0usize..24, pols in 0usize..12,
        ) {
            run_changes(seed, &GenParams::small(ns, pods, pols), 25)?;
        }
    }

    fn relabelled(engine: &Engine, key: &ObjectKey, app: &str) -> Pod {
        let mut pod = engine.cluster().pods[key].clone();
        pod.labels.insert("app".into(), app.into());
        pod
    }

    #[test]
    fn relabel_touches_only_set_elements() {
        // A pod that is a peer of a policy on this node, moved from one selector to another.
        let p = GenParams::small(3, 30, 12);
        let cluster = synth::cluster(&p, 7);
        let mut engine = Engine::from_cluster(cluster, NODE, TABLE);
        let remote = engine
            .cluster()
            .pods
            .values()
            .find(|p| p.node != NODE && p.is_member())
            .map(|p| p.key.clone())
            .expect("the generator puts pods on node-1");
        let before = engine.cluster().pods[&remote].labels["app"].clone();
        let after = if before == "a0" { "a1" } else { "a0" };
        let ops = engine.apply(Change::UpsertPod(relabelled(&engine, &remote, after)));
        assert!(
            ops.iter().all(Op::is_element_op),
            "a remote pod relabel must only move set elements: {ops:#?}"
        );
        // Every element op carries this pod's addresses and nothing else.
        let ips = &engine.cluster().pods[&remote].ips;
        for op in &ops {
            let keys: Vec<&Key> = match op {
                Op::AddElements { elements, .. } => elements.iter().map(|(k, _)| k).collect(),
                Op::DeleteElements { keys, .. } => keys.iter().collect(),
                _ => unreachable!(),
            };
            for k in keys {
                assert!(ips.contains(&key_ip(k)), "{k} is not an address of the pod");
            }
        }
    }

    #[test]
    fn relabel_of_a_local_pod_changes_at_most_one_group_chain_each_way() {
        let p = GenParams::small(2, 20, 10);
        for seed in 0..40 {
            let cluster = synth::cluster(&p, seed);
            let mut engine = Engine::from_cluster(cluster, NODE, TABLE);
            let Some(local) = engine
                .cluster()
                .pods
                .values()
                .find(|p| p.node == NODE && p.is_member())
                .map(|p| p.key.clone())
            else {
                continue;
            };
            let ops = engine.apply(Change::UpsertPod(relabelled(&engine, &local, "a2")));
            let added_groups = ops
                .iter()
                .filter(|o| matches!(o, Op::AddChain(c) if c.name.starts_with("grp-")))
                .count();
            assert!(added_groups <= 2, "seed {seed}: {ops:#?}");
            let deleted_groups = ops
                .iter()
                .filter(|o| matches!(o, Op::DeleteChain(c) if c.starts_with("grp-")))
                .count();
            assert_eq!(deleted_groups, 0, "group deletes wait one transaction");
        }
    }

    #[test]
    fn resync_adopts_an_unchanged_kernel_with_no_ops_and_repairs_drift() {
        let p = GenParams::small(2, 12, 6);
        let cluster = synth::cluster(&p, 11);
        let mut engine = Engine::from_cluster(cluster, NODE, TABLE);
        let mut fake = FakeBackend::new();
        fake.apply(TABLE, &engine.resync(None)).unwrap();
        // A restarted process over the same kernel: nothing to write.
        assert!(engine.resync(fake.dump()).is_empty());
        // Someone deletes an element by hand: exactly that element comes back.
        let mut removed = None;
        fake.tamper(|t| {
            let set = t
                .sets
                .values_mut()
                .find(|s| !s.elements.is_empty())
                .unwrap();
            let k = set.elements.keys().next().cloned().unwrap();
            set.elements.remove(&k);
            removed = Some((set.def.name.clone(), k));
        });
        let ops = engine.resync(fake.dump());
        let (set, key) = removed.unwrap();
        assert_eq!(ops.len(), 1, "{ops:#?}");
        assert!(
            matches!(&ops[0], Op::AddElements { set: s, elements } if *s == set && elements[0].0 == key)
        );
        fake.apply(TABLE, &ops).unwrap();
        assert_eq!(fake.dump(), Some(engine.desired()));
    }

    #[test]
    fn an_unchanged_object_produces_no_ops() {
        let p = GenParams::small(2, 10, 5);
        let cluster = synth::cluster(&p, 3);
        let mut engine = Engine::from_cluster(cluster, NODE, TABLE);
        let pod = engine.cluster().pods.values().next().cloned().unwrap();
        assert!(engine.apply(Change::UpsertPod(pod)).is_empty());
        let pol = engine.cluster().policies.values().next().cloned().unwrap();
        assert!(engine.apply(Change::UpsertPolicy(pol)).is_empty());
    }
}
