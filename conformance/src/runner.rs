//! Replays cases against a cluster: set up, apply policies and steps, probe, judge.
//!
//! The effects sit behind two traits: a [`ClusterDriver`] makes namespaces, pods, Services and
//! policies exist (and waits until the dataplane has them), a [`Prober`] says whether one pod
//! reaches another. The real cluster harness implements both; so does the in-memory
//! [`Oracle`](crate::oracle::Oracle). One value implements both, borrowed mutably to change the
//! cluster and shared (across probe threads) to probe it.
//!
//! The validation rule is upstream's: probe the whole matrix; on any mismatch, probe the whole
//! matrix once more and judge that second table; loopback cells are not judged when the case
//! says `ignore_loopback`. A case whose feature tags the target lacks is skipped with the reason
//! (IPv6 checks alone are skipped without `Feature:IPv6DualStack`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use weft_netpol::ruleset::{Family, Protocol};

use crate::case::{
    Action, Case, CaseFile, Expectation, Feature, NamespaceSpec, PodAddresses, PodRef, PodSpec,
    Server, family_name,
};
use crate::matrix::{Cell, TruthTable};
use crate::report::{CaseReport, CheckReport, FileReport, Outcome};

/// What one probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The connection was established (for SCTP without sockets: the INIT was answered).
    Connected,
    /// Refused or timed out.
    Blocked,
    /// The probe could not be made; the reason is reported.
    NotObserved(String),
}

impl Observation {
    /// The truth-table cell.
    pub fn cell(&self) -> Cell {
        match self {
            Observation::Connected => Cell::Connected,
            Observation::Blocked => Cell::Blocked,
            Observation::NotObserved(_) => Cell::Unknown,
        }
    }
}

/// Probes one connection: from a pod, to another pod's Service (and, optionally, its pod IP),
/// on a port, protocol and family. Called from several threads at once.
pub trait Prober {
    /// Whether `from` reaches `to` on `port`/`protocol` over `family`.
    fn probe(
        &self,
        from: &PodRef,
        to: &PodRef,
        port: u16,
        protocol: Protocol,
        family: Family,
    ) -> Observation;
}

/// A change to the cluster that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct DriverError {
    /// What was being done (`create NetworkPolicy x/deny-all`).
    pub what: String,
    /// Why it failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl DriverError {
    /// An error for `what`, caused by `source`.
    pub fn new(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> DriverError {
        DriverError {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// The initial state of a case, as the driver must create it.
#[derive(Clone, Copy, Debug)]
pub struct CaseSetup<'a> {
    /// The case id (for names and logs).
    pub case_id: &'a str,
    /// Namespaces, in file order, with exactly these labels.
    pub namespaces: &'a [NamespaceSpec],
    /// Pods, in file order: each with a ClusterIP Service `s-<ns>-<pod>` selecting
    /// `pod: <name>`, one service port per served (port, protocol).
    pub pods: &'a [PodSpec],
    /// What every pod serves (the cross product), beside its declared container ports.
    pub server: &'a Server,
}

/// Makes the cluster state of a case exist. Every method returns once the change is in the API;
/// [`ClusterDriver::settle`] returns once the dataplane enforces it.
pub trait ClusterDriver {
    /// Whether the target supports a feature tag.
    fn supports(&self, feature: Feature) -> bool;

    /// Creates the namespaces, pods and Services, waits until every pod serves, and returns
    /// each pod's addresses. A pod with `ip`/`ipv6` gets exactly those when the target
    /// supports [`Feature::PinnedPodIps`].
    fn create_case(
        &mut self,
        setup: &CaseSetup<'_>,
    ) -> Result<BTreeMap<PodRef, PodAddresses>, DriverError>;

    /// Creates a policy (templates already filled).
    fn create_policy(&mut self, policy: &NetworkPolicy) -> Result<(), DriverError>;

    /// Replaces the policy with the same namespace and name.
    fn update_policy(&mut self, policy: &NetworkPolicy) -> Result<(), DriverError>;

    /// Deletes one policy.
    fn delete_policy(&mut self, namespace: &str, name: &str) -> Result<(), DriverError>;

    /// Deletes every policy in these namespaces.
    fn delete_all_policies(&mut self, namespaces: &[String]) -> Result<(), DriverError>;

    /// Merges labels into a namespace's.
    fn add_namespace_labels(
        &mut self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), DriverError>;

    /// Merges labels into a pod's.
    fn add_pod_labels(
        &mut self,
        pod: &PodRef,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), DriverError>;

    /// Replaces a pod's labels (they include `pod: <name>`).
    fn set_pod_labels(
        &mut self,
        pod: &PodRef,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), DriverError>;

    /// Creates a pod and its Service, waits until it serves, returns its addresses.
    fn create_pod(&mut self, pod: &PodSpec, server: &Server) -> Result<PodAddresses, DriverError>;

    /// Deletes a pod and its Service, and waits until both are gone.
    fn delete_pod(&mut self, pod: &PodRef) -> Result<(), DriverError>;

    /// Waits until the dataplane enforces every change made so far. Called before each batch
    /// of checks.
    fn settle(&mut self) -> Result<(), DriverError> {
        Ok(())
    }

    /// Removes everything the case created.
    fn delete_case(&mut self, setup: &CaseSetup<'_>) -> Result<(), DriverError>;
}

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The run's family: templates are filled with its addresses, and checks that name no
    /// family use it. IPv4 by default; IPv6 replays a file in IPv6-only mode.
    pub family: Family,
    /// Probes in flight at once.
    pub parallelism: usize,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            family: Family::V4,
            parallelism: 8,
        }
    }
}

/// Runs every case of a file, calling `on_case` as each finishes (to print as it goes).
pub fn run_file<T>(
    file: &CaseFile,
    target: &mut T,
    options: &RunOptions,
    on_case: &mut dyn FnMut(&CaseReport),
) -> FileReport
where
    T: ClusterDriver + Prober + Sync,
{
    let mut cases = Vec::with_capacity(file.cases.len());
    for case in &file.cases {
        let report = run_case(case, target, options);
        on_case(&report);
        cases.push(report);
    }
    FileReport::new(cases)
}

/// Why the target cannot run a case at all, if it cannot.
pub fn skip_reason(case: &Case, target: &dyn ClusterDriver) -> Option<String> {
    [Feature::SctpConnectivity, Feature::PinnedPodIps]
        .into_iter()
        .find(|f| case.needs(*f) && !target.supports(*f))
        .map(|f| format!("needs {f}, which this runner does not support"))
}

/// Runs one case: set up, policies, initial checks, steps, tear down.
pub fn run_case<T>(case: &Case, target: &mut T, options: &RunOptions) -> CaseReport
where
    T: ClusterDriver + Prober + Sync,
{
    if let Some(reason) = skip_reason(case, target) {
        return CaseReport::skipped(case, reason);
    }
    let setup = CaseSetup {
        case_id: &case.id,
        namespaces: &case.namespaces,
        pods: &case.pods,
        server: &case.server,
    };
    let mut run = CaseRun {
        case,
        options,
        addresses: BTreeMap::new(),
        checks: Vec::new(),
    };
    let error = run.execute(target, &setup).err();
    let mut checks = run.checks;
    // Checks after a failure are listed as not run, so every report has every check.
    for (step, expectation) in case.checks().skip(checks.len()) {
        checks.push(CheckReport::not_run(
            case,
            step,
            expectation,
            options.family,
        ));
    }
    let teardown = target
        .delete_case(&setup)
        .err()
        .map(|e| format!("teardown: {e}"));
    CaseReport::finish(case, checks, error.into_iter().chain(teardown).collect())
}

/// The state of one case while it runs.
struct CaseRun<'a> {
    case: &'a Case,
    options: &'a RunOptions,
    addresses: BTreeMap<PodRef, PodAddresses>,
    checks: Vec<CheckReport>,
}

impl CaseRun<'_> {
    fn execute<T>(&mut self, target: &mut T, setup: &CaseSetup<'_>) -> Result<(), String>
    where
        T: ClusterDriver + Prober + Sync,
    {
        self.addresses = target
            .create_case(setup)
            .map_err(|e| format!("setup: {e}"))?;
        for policy in &self.case.policies {
            let object = self.render(policy)?;
            target
                .create_policy(&object)
                .map_err(|e| format!("policies: {e}"))?;
        }
        target.settle().map_err(|e| format!("settle: {e}"))?;
        for expectation in &self.case.expectations {
            let report = self.check(&*target, None, expectation, &self.case.pod_order);
            self.checks.push(report);
        }
        for (i, step) in self.case.steps.iter().enumerate() {
            for (j, action) in step.actions.iter().enumerate() {
                self.apply(target, action)
                    .map_err(|e| format!("steps[{i}] actions[{j}] ({}): {e}", action.name()))?;
            }
            target
                .settle()
                .map_err(|e| format!("steps[{i}]: settle: {e}"))?;
            for expectation in &step.expectations {
                let report = self.check(&*target, Some(i), expectation, &step.pod_order);
                self.checks.push(report);
            }
        }
        Ok(())
    }

    fn render(&self, policy: &crate::case::PolicyTemplate) -> Result<NetworkPolicy, String> {
        let family = self.options.family;
        let addresses = &self.addresses;
        policy
            .render(family, &|pod| {
                addresses.get(pod).and_then(|a| a.get(family))
            })
            .map_err(|e| e.to_string())
    }

    fn apply<T: ClusterDriver>(&mut self, target: &mut T, action: &Action) -> Result<(), String> {
        let done = match action {
            Action::CreatePolicy(policy) => target.create_policy(&self.render(policy)?),
            Action::UpdatePolicy(policy) => target.update_policy(&self.render(policy)?),
            Action::DeletePolicy { namespace, name } => target.delete_policy(namespace, name),
            Action::DeleteAllPolicies => {
                let names: Vec<String> = self
                    .case
                    .namespaces
                    .iter()
                    .map(|n| n.name.clone())
                    .collect();
                target.delete_all_policies(&names)
            }
            Action::AddNamespaceLabels { namespace, labels } => {
                target.add_namespace_labels(namespace, labels)
            }
            Action::AddPodLabels { pod, labels } => target.add_pod_labels(pod, labels),
            Action::SetPodLabels { pod, labels } => target.set_pod_labels(pod, labels),
            Action::CreatePod(spec) => {
                target.create_pod(spec, &self.case.server).map(|addresses| {
                    self.addresses.insert(spec.pod.clone(), addresses);
                })
            }
            Action::DeletePod(pod) => target.delete_pod(pod).map(|()| {
                self.addresses.remove(pod);
            }),
        };
        done.map_err(|e| e.to_string())
    }

    /// One check: probe, and on a mismatch probe once more and judge the second table.
    fn check<P: ClusterDriver + Prober + Sync + ?Sized>(
        &self,
        target: &P,
        step: Option<usize>,
        expectation: &Expectation,
        order: &[PodRef],
    ) -> CheckReport {
        let family = expectation.family.unwrap_or(self.options.family);
        if family == Family::V6 && !target.supports(Feature::Ipv6DualStack) {
            return CheckReport::skipped(
                self.case,
                step,
                expectation,
                family,
                format!(
                    "{} check, and this runner does not support {}",
                    family_name(family),
                    Feature::Ipv6DualStack
                ),
            );
        }
        let probe = || {
            probe_matrix(
                target,
                order,
                expectation.port,
                expectation.protocol,
                family,
                self.options.parallelism,
            )
        };
        let (first, first_notes) = probe();
        if expectation
            .expected
            .compare(&first, self.case.ignore_loopback)
            .passed()
        {
            return CheckReport::judged(
                self.case,
                step,
                expectation,
                family,
                first,
                None,
                first_notes,
            );
        }
        let (second, notes) = probe();
        CheckReport::judged(
            self.case,
            step,
            expectation,
            family,
            second,
            Some(first),
            notes,
        )
    }
}

/// At most this many distinct reasons for unobserved cells are kept per table.
const MAX_NOTES: usize = 5;

/// Probes every ordered pair of `pods` with `parallelism` probes in flight; returns the table
/// and the reasons of cells that could not be observed (`from -> to: reason`).
pub fn probe_matrix<P: Prober + Sync + ?Sized>(
    prober: &P,
    pods: &[PodRef],
    port: u16,
    protocol: Protocol,
    family: Family,
    parallelism: usize,
) -> (TruthTable, Vec<String>) {
    let n = pods.len();
    let jobs = n * n;
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let job = next.fetch_add(1, Ordering::Relaxed);
            if job >= jobs {
                return done;
            }
            let (from, to) = (job / n, job % n);
            done.push((
                job,
                prober.probe(&pods[from], &pods[to], port, protocol, family),
            ));
        }
    };
    let workers = parallelism.clamp(1, jobs.max(1));
    let results: Vec<(usize, Observation)> = if workers == 1 {
        work()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers).map(|_| scope.spawn(work)).collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        })
    };
    let mut table = TruthTable::filled(pods.to_vec(), Cell::Unknown);
    let mut notes = Vec::new();
    let mut sorted = results;
    sorted.sort_by_key(|(job, _)| *job);
    for (job, observation) in sorted {
        let (from, to) = (job / n, job % n);
        table.set(from, to, observation.cell());
        if let Observation::NotObserved(reason) = observation
            && notes.len() < MAX_NOTES
        {
            notes.push(format!("{} -> {}: {reason}", pods[from], pods[to]));
        }
    }
    (table, notes)
}

/// The outcome of a whole case from its checks and errors.
pub(crate) fn case_outcome(checks: &[CheckReport], errors: &[String]) -> (Outcome, Option<String>) {
    if !errors.is_empty() {
        return (Outcome::Failed, Some(errors.join("; ")));
    }
    let failed = checks
        .iter()
        .filter(|c| c.result == Outcome::Failed)
        .count();
    if failed > 0 {
        return (
            Outcome::Failed,
            Some(format!("{failed} of {} checks failed", checks.len())),
        );
    }
    if !checks.is_empty() && checks.iter().all(|c| c.result == Outcome::Skipped) {
        let reason = checks[0].reason.clone().unwrap_or_default();
        return (
            Outcome::Skipped,
            Some(format!("every check skipped: {reason}")),
        );
    }
    (Outcome::Passed, None)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::case;
    use crate::oracle::Oracle;

    const FILE: &str = r#"
schema_version: 2
cases:
- id: b-isolated
  server: {ports: [80], protocols: [TCP]}
  namespaces: {x: {labels: {}}}
  pods:
    x/a: {labels: {pod: a}}
    x/b: {labels: {pod: b}}
  pod_order: [x/a, x/b]
  ignore_loopback: true
  policies:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {namespace: x, name: b-no-ingress}
    spec: {podSelector: {matchLabels: {pod: b}}, policyTypes: [Ingress]}
  expectations:
  - {port: 80, protocol: TCP, matrix: ['.X', '.X']}
"#;

    /// The oracle, except that one cell answers wrong for its first `wrong_times` probes.
    struct Flaky {
        oracle: Oracle,
        cell: (PodRef, PodRef),
        wrong_left: Mutex<usize>,
        probes: AtomicUsize,
    }

    impl Flaky {
        fn new(wrong_times: usize) -> Flaky {
            Flaky {
                oracle: Oracle::new(),
                cell: (PodRef::new("x", "a"), PodRef::new("x", "b")),
                wrong_left: Mutex::new(wrong_times),
                probes: AtomicUsize::new(0),
            }
        }
    }

    impl Prober for Flaky {
        fn probe(
            &self,
            from: &PodRef,
            to: &PodRef,
            port: u16,
            protocol: Protocol,
            family: Family,
        ) -> Observation {
            self.probes.fetch_add(1, Ordering::Relaxed);
            let truth = self.oracle.probe(from, to, port, protocol, family);
            let mut left = self.wrong_left.lock().expect("not poisoned");
            if (from, to) == (&self.cell.0, &self.cell.1) && *left > 0 {
                *left -= 1;
                return match truth {
                    Observation::Connected => Observation::Blocked,
                    _ => Observation::Connected,
                };
            }
            truth
        }
    }

    /// Driving goes to the oracle unchanged.
    impl ClusterDriver for Flaky {
        fn supports(&self, feature: Feature) -> bool {
            self.oracle.supports(feature)
        }
        fn create_case(
            &mut self,
            setup: &CaseSetup<'_>,
        ) -> Result<BTreeMap<PodRef, PodAddresses>, DriverError> {
            self.oracle.create_case(setup)
        }
        fn create_policy(&mut self, policy: &NetworkPolicy) -> Result<(), DriverError> {
            self.oracle.create_policy(policy)
        }
        fn update_policy(&mut self, policy: &NetworkPolicy) -> Result<(), DriverError> {
            self.oracle.update_policy(policy)
        }
        fn delete_policy(&mut self, namespace: &str, name: &str) -> Result<(), DriverError> {
            self.oracle.delete_policy(namespace, name)
        }
        fn delete_all_policies(&mut self, namespaces: &[String]) -> Result<(), DriverError> {
            self.oracle.delete_all_policies(namespaces)
        }
        fn add_namespace_labels(
            &mut self,
            namespace: &str,
            labels: &BTreeMap<String, String>,
        ) -> Result<(), DriverError> {
            self.oracle.add_namespace_labels(namespace, labels)
        }
        fn add_pod_labels(
            &mut self,
            pod: &PodRef,
            labels: &BTreeMap<String, String>,
        ) -> Result<(), DriverError> {
            self.oracle.add_pod_labels(pod, labels)
        }
        fn set_pod_labels(
            &mut self,
            pod: &PodRef,
            labels: &BTreeMap<String, String>,
        ) -> Result<(), DriverError> {
            self.oracle.set_pod_labels(pod, labels)
        }
        fn create_pod(
            &mut self,
            pod: &PodSpec,
            server: &Server,
        ) -> Result<PodAddresses, DriverError> {
            self.oracle.create_pod(pod, server)
        }
        fn delete_pod(&mut self, pod: &PodRef) -> Result<(), DriverError> {
            self.oracle.delete_pod(pod)
        }
        fn delete_case(&mut self, setup: &CaseSetup<'_>) -> Result<(), DriverError> {
            self.oracle.delete_case(setup)
        }
    }

    fn run(target: &mut Flaky) -> CaseReport {
        let file = case::parse(FILE).expect("valid fixture");
        let options = RunOptions {
            parallelism: 3,
            ..RunOptions::default()
        };
        run_case(&file.cases[0], target, &options)
    }

    #[test]
    fn a_steady_target_is_probed_once() {
        let mut target = Flaky::new(0);
        let report = run(&mut target);
        assert_eq!(report.result, Outcome::Passed);
        assert_eq!(report.checks[0].tries, 1);
        assert_eq!(target.probes.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn wrong_once_then_right_passes_after_reprobing_the_whole_matrix() {
        let mut target = Flaky::new(1);
        let report = run(&mut target);
        assert_eq!(report.result, Outcome::Passed, "{report:?}");
        let check = &report.checks[0];
        assert_eq!(check.tries, 2);
        assert_eq!(
            target.probes.load(Ordering::Relaxed),
            8,
            "both rounds probe every cell"
        );
        assert_eq!(
            check.first_observed.as_ref().map(TruthTable::rows),
            Some(vec!["..".to_string(), ".X".to_string()])
        );
    }

    #[test]
    fn wrong_twice_fails_with_the_three_tables() {
        let mut target = Flaky::new(2);
        let report = run(&mut target);
        assert_eq!(report.result, Outcome::Failed);
        let check = &report.checks[0];
        assert_eq!(
            (check.tries, check.correct, check.wrong, check.ignored),
            (2, 1, 1, 2)
        );
        let mut text = Vec::new();
        report.write_text(&mut text, false).expect("in memory");
        let text = String::from_utf8(text).expect("utf-8");
        assert!(
            text.starts_with("FAIL b-isolated: 1 of 1 checks failed\n"),
            "{text}"
        );
        assert!(text.contains("correct:1, incorrect:1, ignored:2, result=false (after re-probing the whole matrix)"), "{text}");
        assert!(
            text.contains("    expected:\n    -\tx/a\tx/b\n    x/a\t.\tX\n    x/b\t.\tX\n"),
            "{text}"
        );
        assert!(
            text.contains("    observed:\n    -\tx/a\tx/b\n    x/a\t.\t.\n"),
            "{text}"
        );
        assert!(text.contains("\n    x/a\t-\tX\n    x/b\t.\t-"), "{text}");
        let cell = check.cells.iter().find(|c| !c.ok).expect("one wrong cell");
        assert_eq!(
            (
                cell.from.to_string(),
                cell.to.to_string(),
                cell.expected,
                cell.observed
            ),
            ("x/a".into(), "x/b".into(), "blocked", "connected")
        );
    }

    /// A target without SCTP or pinned addresses.
    struct Plain(Oracle);

    impl Prober for Plain {
        fn probe(
            &self,
            from: &PodRef,
            to: &PodRef,
            port: u16,
            protocol: Protocol,
            family: Family,
        ) -> Observation {
            self.0.probe(from, to, port, protocol, family)
        }
    }

    #[test]
    fn unsupported_features_skip_with_the_reason() {
        let sctp = FILE
            .replace("protocols: [TCP]", "protocols: [SCTP]")
            .replace("protocol: TCP", "protocol: SCTP")
            .replace(
                "  pod_order",
                "  feature_tags: [Feature:SCTPConnectivity]\n  pod_order",
            );
        let file = case::parse(&sctp).expect("valid");
        let lacking = Plain(Oracle::new());
        assert_eq!(
            skip_reason(&file.cases[0], &lacking).as_deref(),
            Some("needs Feature:SCTPConnectivity, which this runner does not support")
        );
        assert_eq!(skip_reason(&file.cases[0], &Oracle::new()), None);
    }

    impl ClusterDriver for Plain {
        fn supports(&self, feature: Feature) -> bool {
            feature == Feature::LinuxOnly
        }
        fn create_case(
            &mut self,
            setup: &CaseSetup<'_>,
        ) -> Result<BTreeMap<PodRef, PodAddresses>, DriverError> {
            self.0.create_case(setup)
        }
        fn create_policy(&mut self, policy: &NetworkPolicy) -> Result<(), DriverError> {
            self.0.create_policy(policy)
        }
        fn update_policy(&mut self, policy: &NetworkPolicy) -> Result<(), DriverError> {
            self.0.update_policy(policy)
        }
        fn delete_policy(&mut self, namespace: &str, name: &str) -> Result<(), DriverError> {
            self.0.delete_policy(namespace, name)
        }
        fn delete_all_policies(&mut self, namespaces: &[String]) -> Result<(), DriverError> {
            self.0.delete_all_policies(namespaces)
        }
        fn add_namespace_labels(
            &mut self,
            namespace: &str,
            labels: &BTreeMap<String, String>,
        ) -> Result<(), DriverError> {
            self.0.add_namespace_labels(namespace, labels)
        }
        fn add_pod_labels(
            &mut self,
            pod: &PodRef,
            labels: &BTreeMap<String, String>,
        ) -> Result<(), DriverError> {
            self.0.add_pod_labels(pod, labels)
        }
        fn set_pod_labels(
            &mut self,
            pod: &PodRef,
            labels: &BTreeMap<String, String>,
        ) -> Result<(), DriverError> {
            self.0.set_pod_labels(pod, labels)
        }
        fn create_pod(
            &mut self,
            pod: &PodSpec,
            server: &Server,
        ) -> Result<PodAddresses, DriverError> {
            self.0.create_pod(pod, server)
        }
        fn delete_pod(&mut self, pod: &PodRef) -> Result<(), DriverError> {
            self.0.delete_pod(pod)
        }
        fn delete_case(&mut self, setup: &CaseSetup<'_>) -> Result<(), DriverError> {
            self.0.delete_case(setup)
        }
    }

    #[test]
    fn ipv6_checks_are_skipped_without_dual_stack_and_the_case_says_so() {
        let v6 = FILE
            .replace(
                "protocol: TCP, matrix",
                "protocol: TCP, family: IPv6, matrix",
            )
            .replace(
                "  pod_order",
                "  feature_tags: [Feature:IPv6DualStack]\n  pod_order",
            );
        let file = case::parse(&v6).expect("valid");
        let report = run_case(
            &file.cases[0],
            &mut Plain(Oracle::new()),
            &RunOptions::default(),
        );
        assert_eq!(report.result, Outcome::Skipped);
        assert_eq!(report.checks[0].result, Outcome::Skipped);
        assert!(
            report
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("Feature:IPv6DualStack")),
            "{report:?}"
        );
        let ran = run_case(&file.cases[0], &mut Oracle::new(), &RunOptions::default());
        assert_eq!(
            (ran.result, ran.checks[0].family),
            (Outcome::Passed, "IPv6")
        );
    }

    #[test]
    fn a_driver_error_fails_the_case_and_lists_later_checks_as_not_run() {
        let steps = format!(
            "{FILE}  steps:\n  - actions: [{{action: delete_pod, pod: x/b}}]\n    pod_order: [x/a]\n    expectations: [{{port: 80, protocol: TCP, matrix: ['.']}}]\n"
        );
        let file = case::parse(&steps).expect("valid");
        /// Fails every pod deletion.
        struct Stuck(Oracle);
        impl Prober for Stuck {
            fn probe(
                &self,
                from: &PodRef,
                to: &PodRef,
                port: u16,
                protocol: Protocol,
                family: Family,
            ) -> Observation {
                self.0.probe(from, to, port, protocol, family)
            }
        }
        impl ClusterDriver for Stuck {
            fn supports(&self, _: Feature) -> bool {
                true
            }
            fn create_case(
                &mut self,
                s: &CaseSetup<'_>,
            ) -> Result<BTreeMap<PodRef, PodAddresses>, DriverError> {
                self.0.create_case(s)
            }
            fn create_policy(&mut self, p: &NetworkPolicy) -> Result<(), DriverError> {
                self.0.create_policy(p)
            }
            fn update_policy(&mut self, p: &NetworkPolicy) -> Result<(), DriverError> {
                self.0.update_policy(p)
            }
            fn delete_policy(&mut self, n: &str, m: &str) -> Result<(), DriverError> {
                self.0.delete_policy(n, m)
            }
            fn delete_all_policies(&mut self, n: &[String]) -> Result<(), DriverError> {
                self.0.delete_all_policies(n)
            }
            fn add_namespace_labels(
                &mut self,
                n: &str,
                l: &BTreeMap<String, String>,
            ) -> Result<(), DriverError> {
                self.0.add_namespace_labels(n, l)
            }
            fn add_pod_labels(
                &mut self,
                p: &PodRef,
                l: &BTreeMap<String, String>,
            ) -> Result<(), DriverError> {
                self.0.add_pod_labels(p, l)
            }
            fn set_pod_labels(
                &mut self,
                p: &PodRef,
                l: &BTreeMap<String, String>,
            ) -> Result<(), DriverError> {
                self.0.set_pod_labels(p, l)
            }
            fn create_pod(&mut self, p: &PodSpec, s: &Server) -> Result<PodAddresses, DriverError> {
                self.0.create_pod(p, s)
            }
            fn delete_pod(&mut self, p: &PodRef) -> Result<(), DriverError> {
                Err(DriverError::new(
                    format!("delete pod {p}"),
                    "timed out waiting for the Service to go",
                ))
            }
            fn delete_case(&mut self, s: &CaseSetup<'_>) -> Result<(), DriverError> {
                self.0.delete_case(s)
            }
        }
        let report = run_case(
            &file.cases[0],
            &mut Stuck(Oracle::new()),
            &RunOptions::default(),
        );
        assert_eq!(report.result, Outcome::Failed);
        assert_eq!(
            report.reason.as_deref(),
            Some(
                "steps[0] actions[0] (delete_pod): delete pod x/b: timed out waiting for the Service to go"
            )
        );
        let results: Vec<Outcome> = report.checks.iter().map(|c| c.result).collect();
        assert_eq!(results, vec![Outcome::Passed, Outcome::NotRun]);
    }
}
