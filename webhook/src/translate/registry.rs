//! The service registry: Kubernetes Services (endpoints from EndpointSlices, or from pods
//! and the selector when a service has no slices, as in local mode) and ServiceEntries.
//!
//! An endpoint carries an identity (`spiffe://<td>/ns/<ns>/sa/<sa>`) when its pod is meshed
//! (`sidecar.istio.io/status`), its `security.istio.io/tlsMode` label is not `disabled`, and
//! its PeerAuthentication does not disable mTLS on the target port: the proxy then uses mesh
//! mTLS towards it (Istio's auto mTLS).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tracing::debug;
use weft_api::config::{MtlsMode, Protocol, spiffe_id};
use weft_api::crd::AnyResource;
use weft_api::crd::networking::{Location, Resolution, ServiceEntry};

use super::{Index, inbound, labels_match};
use crate::resources::{ANNOTATION_EXPORT_TO, CLUSTER_DOMAIN, LABEL_TLS_MODE, PodInfo, Resources};

/// Where a service port sends traffic on an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A port number.
    Number(u16),
    /// A named container port.
    Name(String),
}

/// A port of a registry service.
#[derive(Debug, Clone, PartialEq)]
pub struct RegPort {
    /// Service port.
    pub port: u16,
    /// Port name.
    pub name: String,
    /// Declared protocol.
    pub protocol: Protocol,
    /// Target on the endpoints.
    pub target: Target,
}

/// One endpoint of a registry service.
#[derive(Debug, Clone, PartialEq)]
pub struct RegEndpoint {
    /// Address.
    pub address: IpAddr,
    /// Service port → endpoint port.
    pub ports: Vec<(u16, u16)>,
    /// Workload labels.
    pub labels: Arc<BTreeMap<String, String>>,
    /// Mesh identity for auto mTLS (absent: plaintext), per service port.
    pub identity: Option<String>,
    /// Service ports whose target disables mTLS by PeerAuthentication.
    pub plaintext_ports: Vec<u16>,
    /// The identity of the workload's service account, meshed or not (for `ISTIO_MUTUAL`).
    pub account_identity: Option<String>,
    /// Relative weight.
    pub weight: u32,
}

impl RegEndpoint {
    /// The endpoint port for a service port.
    pub fn port_for(&self, service_port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|(p, _)| *p == service_port)
            .map(|(_, t)| *t)
    }

    /// The identity towards a service port (None where mTLS is disabled).
    pub fn identity_for(&self, service_port: u16) -> Option<String> {
        if self.plaintext_ports.contains(&service_port) {
            None
        } else {
            self.identity.clone()
        }
    }
}

/// A service of the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct RegService {
    /// Fully qualified host name.
    pub hostname: String,
    /// Namespace.
    pub namespace: String,
    /// Virtual IPs.
    pub vips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<RegPort>,
    /// `exportTo`.
    pub export_to: Vec<String>,
    /// Endpoints.
    pub endpoints: Vec<RegEndpoint>,
    /// Traffic goes to the original destination (ServiceEntry with resolution NONE or DNS
    /// names the model cannot carry).
    pub passthrough: bool,
    /// Outside the mesh (ServiceEntry `MESH_EXTERNAL`).
    pub external: bool,
}

/// Pods by `(namespace, label key, label value)`, so that a selector looks only at the pods
/// carrying its first label instead of the whole namespace.
pub(crate) type PodsByLabel<'a> = HashMap<(&'a str, &'a str, &'a str), Vec<&'a PodInfo>>;

fn pods_by_label(resources: &Resources) -> PodsByLabel<'_> {
    let mut out: PodsByLabel<'_> = HashMap::new();
    for ((ns, _), pod) in &resources.pods {
        for (k, v) in pod.labels.iter() {
            out.entry((ns.as_str(), k.as_str(), v.as_str()))
                .or_default()
                .push(&**pod);
        }
    }
    out
}

/// The pods of `ns` that `selector` (non-empty) selects.
fn selected<'a>(
    by_label: &PodsByLabel<'a>,
    ns: &str,
    selector: &BTreeMap<String, String>,
) -> Vec<&'a PodInfo> {
    let Some((k, v)) = selector.iter().next() else {
        return Vec::new();
    };
    by_label
        .get(&(ns, k.as_str(), v.as_str()))
        .map(|pods| {
            pods.iter()
                .copied()
                .filter(|p| labels_match(selector, &p.labels))
                .collect()
        })
        .unwrap_or_default()
}

fn target_of(port: &k8s_openapi::api::core::v1::ServicePort) -> Target {
    match &port.target_port {
        Some(IntOrString::Int(n)) => u16::try_from(*n)
            .map(Target::Number)
            .unwrap_or(Target::Number(0)),
        Some(IntOrString::String(name)) => match name.parse::<u16>() {
            Ok(n) => Target::Number(n),
            Err(_) => Target::Name(name.clone()),
        },
        None => Target::Number(u16::try_from(port.port).unwrap_or(0)),
    }
}

/// Resolves a target on a pod: numbers as they are, names through the containers' ports.
pub(crate) fn resolve_target(target: &Target, pod: Option<&PodInfo>) -> Option<u16> {
    match target {
        Target::Number(0) => None,
        Target::Number(n) => Some(*n),
        Target::Name(name) => pod?.named_port(name),
    }
}

struct PodFacts {
    identity: Option<String>,
    account_identity: String,
    mtls: (MtlsMode, BTreeMap<u16, MtlsMode>),
}

fn pod_facts(resources: &Resources, index: &Index, pod: &PodInfo) -> PodFacts {
    let ns = pod.namespace.as_str();
    // `serviceAccountName` only (not the deprecated alias that a proxy's account falls back
    // to): the API server fills it from the alias, so they differ only in local YAML.
    let sa = pod.service_account_name.as_deref().unwrap_or("default");
    let account_identity = spiffe_id(&resources.settings.trust_domain, ns, sa);
    let tls_disabled = pod
        .labels
        .get(LABEL_TLS_MODE)
        .is_some_and(|m| m == "disabled");
    let identity = (pod.meshed && !tls_disabled).then(|| account_identity.clone());
    let mtls = inbound::peer_authentication_mode(
        index,
        &resources.settings.root_namespace,
        ns,
        &pod.labels,
    );
    PodFacts {
        identity,
        account_identity,
        mtls,
    }
}

fn endpoint_for_pod(
    pod: &PodInfo,
    address: IpAddr,
    facts: &PodFacts,
    ports: &[RegPort],
    explicit: Option<&[(u16, u16)]>,
) -> RegEndpoint {
    let mapped: Vec<(u16, u16)> = match explicit {
        Some(e) => e.to_vec(),
        None => ports
            .iter()
            .filter_map(|p| resolve_target(&p.target, Some(pod)).map(|t| (p.port, t)))
            .collect(),
    };
    let plaintext_ports = mapped
        .iter()
        .filter(|(_, target)| {
            facts.mtls.1.get(target).copied().unwrap_or(facts.mtls.0) == MtlsMode::Disable
        })
        .map(|(p, _)| *p)
        .collect();
    RegEndpoint {
        address,
        ports: mapped,
        labels: pod.labels.clone(),
        identity: facts.identity.clone(),
        plaintext_ports,
        account_identity: Some(facts.account_identity.clone()),
        weight: 1,
    }
}

fn kubernetes_service(
    resources: &Resources,
    index: &Index,
    svc: &Service,
    slices_by_service: &HashMap<
        (String, String),
        Vec<&k8s_openapi::api::discovery::v1::EndpointSlice>,
    >,
    by_label: &PodsByLabel<'_>,
    facts: &mut HashMap<(String, String), PodFacts>,
) -> Option<RegService> {
    let spec = svc.spec.as_ref()?;
    let ns = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc.metadata.name.clone()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        debug!(%ns, %name, "ExternalName services are not translated");
        return None;
    }
    let mut vips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    // `clusterIP` repeats the first of `clusterIPs`: keep each address once, in order.
    let mut seen = std::collections::HashSet::new();
    vips.retain(|ip| seen.insert(*ip));
    let ports: Vec<RegPort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p != "UDP"))
        .filter_map(|p| {
            Some(RegPort {
                port: u16::try_from(p.port).ok().filter(|p| *p != 0)?,
                name: p.name.clone().unwrap_or_default(),
                protocol: Protocol::from_port(
                    p.name.as_deref().unwrap_or(""),
                    p.app_protocol.as_deref(),
                ),
                target: target_of(p),
            })
        })
        .collect();
    let export_to = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_EXPORT_TO))
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let mut endpoints = Vec::new();
    let key = (ns.clone(), name.clone());
    if let Some(slices) = slices_by_service.get(&key) {
        for slice in slices {
            let slice_ports: Vec<(String, u16)> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p.name.clone().unwrap_or_default(),
                        u16::try_from(p.port?).ok()?,
                    ))
                })
                .collect();
            let mapping: Vec<(u16, u16)> = ports
                .iter()
                .filter_map(|p| {
                    slice_ports
                        .iter()
                        .find(|(n, _)| *n == p.name)
                        .map(|(_, t)| (p.port, *t))
                })
                .collect();
            for ep in slice.endpoints.iter().flatten() {
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                let pod = ep
                    .target_ref
                    .as_ref()
                    .filter(|t| t.kind.as_deref() == Some("Pod"))
                    .and_then(|t| {
                        resources.pod(t.namespace.as_deref().unwrap_or(&ns), t.name.as_deref()?)
                    });
                for address in ep.addresses.iter().take(1) {
                    let Ok(address) = address.parse::<IpAddr>() else {
                        continue;
                    };
                    let endpoint = match pod {
                        Some(pod) => {
                            let k = (ns.clone(), pod.name.clone());
                            let f = facts
                                .entry(k)
                                .or_insert_with(|| pod_facts(resources, index, pod));
                            endpoint_for_pod(pod, address, f, &ports, Some(&mapping))
                        }
                        None => RegEndpoint {
                            address,
                            ports: mapping.clone(),
                            labels: Arc::default(),
                            identity: None,
                            plaintext_ports: Vec::new(),
                            account_identity: None,
                            weight: 1,
                        },
                    };
                    endpoints.push(endpoint);
                }
            }
        }
    } else if let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) {
        for pod in selected(by_label, &ns, selector) {
            let Some(address) = pod.serving_ip() else {
                continue;
            };
            let f = facts
                .entry((ns.clone(), pod.name.clone()))
                .or_insert_with(|| pod_facts(resources, index, pod));
            endpoints.push(endpoint_for_pod(pod, address, f, &ports, None));
        }
    }
    Some(RegService {
        hostname: format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
        namespace: ns,
        vips,
        ports,
        export_to,
        endpoints,
        passthrough: false,
        external: false,
    })
}

fn service_entry(
    resources: &Resources,
    index: &Index,
    se: &ServiceEntry,
    by_label: &PodsByLabel<'_>,
    facts: &mut HashMap<(String, String), PodFacts>,
) -> Vec<RegService> {
    let ns = se
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = &se.spec;
    let vips: Vec<IpAddr> = spec
        .addresses
        .iter()
        .filter_map(|a| {
            let (ip, prefix) = a.split_once('/').unwrap_or((a, ""));
            let ip: IpAddr = ip.parse().ok()?;
            let full = if ip.is_ipv4() { "32" } else { "128" };
            (prefix.is_empty() || prefix == full).then_some(ip)
        })
        .collect();
    let ports: Vec<RegPort> = spec
        .ports
        .iter()
        .filter_map(|p| {
            let number = u16::try_from(p.number?).ok()?;
            let protocol = p.protocol.as_deref().unwrap_or("").to_ascii_lowercase();
            Some(RegPort {
                port: number,
                name: p.name.clone().unwrap_or_default(),
                protocol: Protocol::from_port(&protocol, None),
                target: Target::Number(
                    p.target_port
                        .and_then(|t| u16::try_from(t).ok())
                        .unwrap_or(number),
                ),
            })
        })
        .collect();
    let internal = spec.location == Some(Location::MeshInternal);
    let mut endpoints = Vec::new();
    let mut has_names = false;
    for we in spec.endpoints.iter().flatten() {
        let Some(address) = we.address.as_deref() else {
            continue;
        };
        let Ok(ip) = address.parse::<IpAddr>() else {
            has_names = true;
            continue;
        };
        let mapped = ports
            .iter()
            .map(|p| {
                let target = we
                    .ports
                    .get(&p.name)
                    .and_then(|t| u16::try_from(*t).ok())
                    .unwrap_or(match p.target {
                        Target::Number(n) => n,
                        Target::Name(_) => p.port,
                    });
                (p.port, target)
            })
            .collect();
        let account = we
            .service_account
            .as_deref()
            .map(|sa| spiffe_id(&resources.settings.trust_domain, &ns, sa));
        endpoints.push(RegEndpoint {
            address: ip,
            ports: mapped,
            labels: Arc::new(we.labels.clone()),
            identity: account.clone().filter(|_| internal),
            plaintext_ports: Vec::new(),
            account_identity: account,
            weight: we.weight.unwrap_or(1).max(1),
        });
    }
    if let Some(selector) = spec
        .workload_selector
        .as_ref()
        .filter(|s| !s.labels.is_empty())
    {
        for pod in selected(by_label, &ns, &selector.labels) {
            let Some(address) = pod.serving_ip() else {
                continue;
            };
            let f = facts
                .entry((ns.clone(), pod.name.clone()))
                .or_insert_with(|| pod_facts(resources, index, pod));
            endpoints.push(endpoint_for_pod(pod, address, f, &ports, None));
        }
    }
    let passthrough = match spec.resolution {
        Some(Resolution::None) | None => true,
        Some(Resolution::Static) => false,
        // The model's endpoints are addresses: DNS names resolve at the client, which then
        // connects to the original destination.
        Some(_) => endpoints.is_empty() || has_names,
    };
    spec.hosts
        .iter()
        .map(|host| RegService {
            hostname: host.clone(),
            namespace: ns.clone(),
            vips: vips.clone(),
            ports: ports.clone(),
            export_to: spec.export_to.clone(),
            endpoints: endpoints.clone(),
            passthrough,
            external: !internal,
        })
        .collect()
}

/// Builds the registry, sorted by host name; the first definition of a host wins
/// (Kubernetes Services before ServiceEntries, ServiceEntries oldest first).
pub(crate) fn build(resources: &Resources, index: &Index) -> Vec<RegService> {
    let mut slices_by_service: HashMap<(String, String), Vec<_>> = HashMap::new();
    for ((ns, _), slice) in &resources.endpoint_slices {
        if let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        {
            slices_by_service
                .entry((ns.clone(), svc.clone()))
                .or_default()
                .push(&**slice);
        }
    }
    let mut facts = HashMap::new();
    let by_label = pods_by_label(resources);
    let mut out: BTreeMap<String, RegService> = BTreeMap::new();
    for svc in resources.services.values() {
        if let Some(s) = kubernetes_service(
            resources,
            index,
            svc,
            &slices_by_service,
            &by_label,
            &mut facts,
        ) {
            out.entry(s.hostname.clone()).or_insert(s);
        }
    }
    let mut entries: Vec<_> = resources
        .configs
        .values()
        .filter(|e| matches!(&*e.resource, AnyResource::ServiceEntry(_)))
        .collect();
    entries.sort_by_key(|e| e.created);
    for entry in entries {
        if let AnyResource::ServiceEntry(se) = &*entry.resource {
            for s in service_entry(resources, index, se, &by_label, &mut facts) {
                if out.contains_key(&s.hostname) {
                    debug!(host = %s.hostname, "host already defined; ServiceEntry ignored for it");
                    continue;
                }
                out.insert(s.hostname.clone(), s);
            }
        }
    }
    out.into_values().collect()
}
