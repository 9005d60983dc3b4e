//! The in-memory target: a [`ClusterDriver`] and [`Prober`] backed by weft-netpol's evaluator.
//!
//! It keeps a `weft_netpol::model::Cluster` built from the case's namespaces, pods and policies
//! (policies go through `Policy::from_api`, as the agent's do) and answers each probe with
//! `eval::allowed` on the pods' addresses, as the first packet looks after kube-proxy's DNAT.
//! A destination that serves nothing on the port counts as blocked. Replaying a case file here
//! checks the file against the NetworkPolicy semantics without any cluster, the way youki checks
//! its suite against runc.
//!
//! Pods get addresses by the `PinnedPodIPs` plan of CASES.md: a pod's own `ip`/`ipv6` if it
//! has them, else the next free `10.244.(128+n).k` / `fd00:10:244:<hex(0x80+n)>::<hex(k)>` of
//! its namespace's number n.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use weft_netpol::eval::{self, Connection};
use weft_netpol::model::{Cluster, ContainerPort, Namespace, ObjectKey, Pod, Policy};
use weft_netpol::ruleset::{Family, Protocol};

use crate::case::{Feature, PodAddresses, PodRef, PodSpec, Server};
use crate::runner::{CaseSetup, ClusterDriver, DriverError, Observation, Prober};

/// The evaluator as a cluster. Supports every feature tag.
#[derive(Clone, Debug, Default)]
pub struct Oracle {
    cluster: Cluster,
    /// What each pod answers on.
    serves: BTreeMap<PodRef, BTreeSet<(u16, Protocol)>>,
    /// Namespace name to its 1-based number in the case.
    numbers: BTreeMap<String, usize>,
    /// Addresses handed out in this case.
    used: BTreeSet<IpAddr>,
}

impl Oracle {
    /// An empty oracle.
    pub fn new() -> Oracle {
        Oracle::default()
    }

    /// The model as it stands (for tests and explanations).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn key(pod: &PodRef) -> ObjectKey {
        ObjectKey::new(&pod.namespace, &pod.name)
    }

    fn add_pod(&mut self, spec: &PodSpec, server: &Server) -> Result<PodAddresses, DriverError> {
        let what = || format!("create pod {}", spec.pod);
        let number = *self
            .numbers
            .get(&spec.pod.namespace)
            .ok_or_else(|| DriverError::new(what(), "its namespace does not exist"))?;
        let requested = PodAddresses {
            ipv4: spec.ip,
            ipv6: spec.ipv6,
        };
        let addresses = crate::case::assign_addresses(number, requested, &self.used)
            .map_err(|why| DriverError::new(what(), why))?;
        let ips: Vec<IpAddr> = Family::ALL
            .iter()
            .filter_map(|f| addresses.get(*f))
            .collect();
        self.used.extend(ips.iter().copied());
        let pod = Pod {
            key: Oracle::key(&spec.pod),
            uid: format!("uid-{}-{}", spec.pod.namespace, spec.pod.name),
            labels: spec.labels.clone(),
            ips,
            node: format!("node-{number}"),
            ports: spec
                .ports
                .iter()
                .map(|p| ContainerPort {
                    name: p.name.clone(),
                    port: p.container_port,
                    protocol: p.protocol,
                })
                .collect(),
            host_network: false,
            terminated: false,
        };
        self.cluster.pods.insert(pod.key.clone(), pod);
        let serves = server
            .endpoints()
            .into_iter()
            .chain(spec.ports.iter().map(|p| (p.container_port, p.protocol)))
            .collect();
        self.serves.insert(spec.pod.clone(), serves);
        Ok(addresses)
    }

    fn pod_mut(&mut self, pod: &PodRef, what: &str) -> Result<&mut Pod, DriverError> {
        self.cluster
            .pods
            .get_mut(&Oracle::key(pod))
            .ok_or_else(|| DriverError::new(format!("{what} {pod}"), "no such pod"))
    }

    fn policy(policy: &NetworkPolicy, what: &str) -> Result<Policy, DriverError> {
        Policy::from_api(policy).map_err(|e| DriverError::new(what, e))
    }
}

fn policy_name(policy: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        policy.metadata.namespace.as_deref().unwrap_or_default(),
        policy.metadata.name.as_deref().unwrap_or_default()
    )
}

impl ClusterDriver for Oracle {
    fn supports(&self, _feature: Feature) -> bool {
        true
    }

    fn create_case(
        &mut self,
        setup: &CaseSetup<'_>,
    ) -> Result<BTreeMap<PodRef, PodAddresses>, DriverError> {
        *self = Oracle::default();
        for (i, ns) in setup.namespaces.iter().enumerate() {
            self.numbers.insert(ns.name.clone(), i + 1);
            self.cluster
                .namespaces
                .insert(ns.name.clone(), Namespace::new(&ns.name, ns.labels.clone()));
        }
        let mut addresses = BTreeMap::new();
        for pod in setup.pods {
            addresses.insert(pod.pod.clone(), self.add_pod(pod, setup.server)?);
        }
        Ok(addresses)
    }

    fn create_policy(&mut self, policy: &NetworkPolicy) -> Result<(), DriverError> {
        let what = format!("create NetworkPolicy {}", policy_name(policy));
        let policy = Oracle::policy(policy, &what)?;
        if self.cluster.policies.contains_key(&policy.key) {
            return Err(DriverError::new(what, "already exists"));
        }
        self.cluster.policies.insert(policy.key.clone(), policy);
        Ok(())
    }

    fn update_policy(&mut self, policy: &NetworkPolicy) -> Result<(), DriverError> {
        let what = format!("update NetworkPolicy {}", policy_name(policy));
        let policy = Oracle::policy(policy, &what)?;
        match self.cluster.policies.get_mut(&policy.key) {
            Some(slot) => {
                *slot = policy;
                Ok(())
            }
            None => Err(DriverError::new(what, "not found")),
        }
    }

    fn delete_policy(&mut self, namespace: &str, name: &str) -> Result<(), DriverError> {
        match self
            .cluster
            .policies
            .remove(&ObjectKey::new(namespace, name))
        {
            Some(_) => Ok(()),
            None => Err(DriverError::new(
                format!("delete NetworkPolicy {namespace}/{name}"),
                "not found",
            )),
        }
    }

    fn delete_all_policies(&mut self, namespaces: &[String]) -> Result<(), DriverError> {
        self.cluster
            .policies
            .retain(|key, _| !namespaces.contains(&key.namespace));
        Ok(())
    }

    fn add_namespace_labels(
        &mut self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let ns = self.cluster.namespaces.get_mut(namespace).ok_or_else(|| {
            DriverError::new(format!("label namespace {namespace}"), "no such namespace")
        })?;
        ns.labels.extend(labels.clone());
        Ok(())
    }

    fn add_pod_labels(
        &mut self,
        pod: &PodRef,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        self.pod_mut(pod, "label pod")?
            .labels
            .extend(labels.clone());
        Ok(())
    }

    fn set_pod_labels(
        &mut self,
        pod: &PodRef,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        self.pod_mut(pod, "relabel pod")?.labels = labels.clone();
        Ok(())
    }

    fn create_pod(&mut self, pod: &PodSpec, server: &Server) -> Result<PodAddresses, DriverError> {
        if self.cluster.pods.contains_key(&Oracle::key(&pod.pod)) {
            return Err(DriverError::new(
                format!("create pod {}", pod.pod),
                "already exists",
            ));
        }
        self.add_pod(pod, server)
    }

    fn delete_pod(&mut self, pod: &PodRef) -> Result<(), DriverError> {
        let removed = self
            .cluster
            .pods
            .remove(&Oracle::key(pod))
            .ok_or_else(|| DriverError::new(format!("delete pod {pod}"), "no such pod"))?;
        for ip in &removed.ips {
            self.used.remove(ip);
        }
        self.serves.remove(pod);
        Ok(())
    }

    fn delete_case(&mut self, _setup: &CaseSetup<'_>) -> Result<(), DriverError> {
        *self = Oracle::default();
        Ok(())
    }
}

impl Prober for Oracle {
    fn probe(
        &self,
        from: &PodRef,
        to: &PodRef,
        port: u16,
        protocol: Protocol,
        family: Family,
    ) -> Observation {
        let pod = |p: &PodRef| self.cluster.pods.get(&Oracle::key(p));
        let (Some(src), Some(dst)) = (pod(from), pod(to)) else {
            return Observation::NotObserved("no such pod".to_string());
        };
        let (Some(src_ip), Some(dst_ip)) = (src.ip(family), dst.ip(family)) else {
            return Observation::NotObserved("a pod lacks an address of the family".to_string());
        };
        if !self
            .serves
            .get(to)
            .is_some_and(|s| s.contains(&(port, protocol)))
        {
            return Observation::Blocked;
        }
        let connection = Connection {
            src: src_ip,
            dst: dst_ip,
            protocol,
            port,
        };
        if eval::allowed(&self.cluster, &connection) {
            Observation::Connected
        } else {
            Observation::Blocked
        }
    }
}
