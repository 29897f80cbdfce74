//! Translation: what one proxy needs, computed from [`Resources`] as a
//! [`weft_api::config::Snapshot`]. Pure: no I/O, no clock (except what a resource says).
//!
//! - [`registry`]: the service registry (Kubernetes Services with their endpoints from
//!   EndpointSlices or, without slices, from pods and selectors; ServiceEntries).
//! - [`policy`]: DestinationRule traffic policies (subsets, load balancing, connection pool,
//!   outlier detection, TLS, port-level settings).
//! - [`routes`]: VirtualService http / tcp / tls routes, delegates, Istio's default retries.
//! - [`gamma`]: Gateway API HTTPRoute / GRPCRoute with a Service parent, SMI TrafficSplit.
//! - [`inbound`]: PeerAuthentication and the declared inbound ports.
//!
//! What a proxy sees: every service exported to its namespace (`exportTo`, the Service
//! annotation `networking.istio.io/exportTo`) that its `Sidecar` egress hosts allow; a
//! cluster per service port and per DestinationRule subset; routes whose `sourceLabels`,
//! `sourceNamespace`, `gateways` and `sourceSubnet` match this proxy. One service takes its
//! routes from one resource, as an Istio sidecar does: among several VirtualServices for a
//! host the most specific host, then the oldest (creation time, then namespace/name); among
//! that VirtualService, the HTTPRoutes / GRPCRoutes attached to the service and its
//! TrafficSplits, the oldest. What loses is logged at warn with both names, and
//! `weft-webhook validate` reports every such conflict.

pub mod gamma;
pub mod inbound;
pub mod policy;
pub mod registry;
pub mod routes;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use weft_api::config::{
    Cluster, MeshSettings, OutboundTrafficPolicy, Service, ServicePort, Snapshot, Workload,
};
use weft_api::crd::AnyResource;
use weft_api::crd::networking::{OutboundTrafficMode, SidecarSpec};

pub use registry::{RegEndpoint, RegPort, RegService};

use crate::resources::{CLUSTER_DOMAIN, ProxyRef, Resources};

/// Everything derived once per [`Resources`]: the registry and the config resources by kind,
/// oldest first.
#[derive(Debug, Default)]
pub struct Index {
    /// Services by host name.
    pub services: Vec<RegService>,
    by_host: HashMap<String, usize>,
    /// VirtualServices, oldest first.
    pub virtual_services: Vec<Arc<AnyResource>>,
    /// DestinationRules, oldest first.
    pub destination_rules: Vec<Arc<AnyResource>>,
    /// Sidecars, oldest first.
    pub sidecars: Vec<Arc<AnyResource>>,
    /// PeerAuthentications, oldest first.
    pub peer_authentications: Vec<Arc<AnyResource>>,
    /// HTTPRoutes and GRPCRoutes, oldest first.
    pub gamma_routes: Vec<Arc<AnyResource>>,
    /// TrafficSplits, oldest first.
    pub traffic_splits: Vec<Arc<AnyResource>>,
    /// Label keys that some selector of a proxy's outbound view looks at (VirtualService
    /// `sourceLabels`, Sidecar and DestinationRule `workloadSelector`): proxies of one
    /// namespace that agree on these have the same [`Outbound`].
    pub outbound_label_keys: BTreeSet<String>,
    /// Some VirtualService tcp match has a `sourceSubnet`: the proxy's address is part of
    /// what its [`Outbound`] depends on.
    pub outbound_depends_on_ip: bool,
    /// Age rank of every config resource (0 the oldest), by the address of its `Arc`.
    ages: HashMap<usize, usize>,
}

/// The key under which [`Index::outbound_key`] records the proxy's address. A label key
/// cannot start with `:`, so it never collides with a label.
const IP_KEY: &str = ":ip";

impl Index {
    /// Builds the index of `resources`.
    pub fn build(resources: &Resources) -> Index {
        let mut configs: Vec<_> = resources.configs.iter().collect();
        configs.sort_by(|(ka, a), (kb, b)| {
            a.created
                .cmp(&b.created)
                .then_with(|| (&ka.1, &ka.2).cmp(&(&kb.1, &kb.2)))
        });
        let mut index = Index::default();
        for (age, (_, entry)) in configs.into_iter().enumerate() {
            let r = entry.resource.clone();
            index.ages.insert(Arc::as_ptr(&r) as usize, age);
            match &*r {
                AnyResource::VirtualService(_) => index.virtual_services.push(r),
                AnyResource::DestinationRule(_) => index.destination_rules.push(r),
                AnyResource::Sidecar(_) => index.sidecars.push(r),
                AnyResource::PeerAuthentication(_) => index.peer_authentications.push(r),
                AnyResource::HttpRoute(_) | AnyResource::GrpcRoute(_) => index.gamma_routes.push(r),
                AnyResource::TrafficSplit(_) => index.traffic_splits.push(r),
                _ => {}
            }
        }
        index.outbound_label_keys = outbound_label_keys(&index);
        index.outbound_depends_on_ip = index.virtual_services.iter().any(|r| match &**r {
            AnyResource::VirtualService(vs) => vs
                .spec
                .tcp
                .iter()
                .flat_map(|t| t.r#match.iter())
                .any(|m| m.source_subnet.as_deref().is_some_and(|s| !s.is_empty())),
            _ => false,
        });
        index.services = registry::build(resources, &index);
        index.by_host = index
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.hostname.clone(), i))
            .collect();
        index
    }

    /// The service of a host name.
    pub fn service(&self, hostname: &str) -> Option<&RegService> {
        self.by_host.get(hostname).map(|i| &self.services[*i])
    }

    /// How old a config resource of this index is relative to the others: 0 for the oldest
    /// (creation time, then namespace/name). A resource not in the index counts as newest.
    pub fn age(&self, resource: &Arc<AnyResource>) -> usize {
        self.ages
            .get(&(Arc::as_ptr(resource) as usize))
            .copied()
            .unwrap_or(usize::MAX)
    }

    /// What a proxy's [`Outbound`] depends on: its namespace, the labels selectors use, and
    /// its address when a `sourceSubnet` looks at it (under the key `:ip`).
    pub fn outbound_key(&self, proxy: &ProxyRef) -> (String, BTreeMap<String, String>) {
        let mut labels: BTreeMap<String, String> = proxy
            .labels
            .iter()
            .filter(|(k, _)| self.outbound_label_keys.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if self.outbound_depends_on_ip {
            labels.insert(
                IP_KEY.to_owned(),
                proxy.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            );
        }
        (proxy.namespace.clone(), labels)
    }
}

fn outbound_label_keys(index: &Index) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for r in index
        .virtual_services
        .iter()
        .chain(&index.sidecars)
        .chain(&index.destination_rules)
    {
        match &**r {
            AnyResource::VirtualService(vs) => {
                let s = &vs.spec;
                keys.extend(
                    s.http
                        .iter()
                        .flat_map(|h| h.r#match.iter())
                        .flat_map(|m| m.source_labels.keys().cloned()),
                );
                keys.extend(
                    s.tcp
                        .iter()
                        .flat_map(|h| h.r#match.iter())
                        .flat_map(|m| m.source_labels.keys().cloned()),
                );
                keys.extend(
                    s.tls
                        .iter()
                        .flat_map(|h| h.r#match.iter())
                        .flat_map(|m| m.source_labels.keys().cloned()),
                );
            }
            AnyResource::Sidecar(sc) => {
                keys.extend(
                    sc.spec
                        .workload_selector
                        .iter()
                        .flat_map(|w| w.labels.keys().cloned()),
                );
            }
            AnyResource::DestinationRule(dr) => {
                keys.extend(
                    dr.spec
                        .workload_selector
                        .iter()
                        .flat_map(|w| w.match_labels.iter().flatten().map(|(k, _)| k.clone())),
                );
            }
            _ => {}
        }
    }
    keys
}

/// The snapshot of one proxy (version left empty: discovery stamps it).
pub fn translate(resources: &Resources, proxy: &ProxyRef) -> Snapshot {
    let outbound = outbound(resources, proxy);
    Snapshot {
        version: String::new(),
        workload: workload(proxy),
        mesh: MeshSettings {
            trust_domain: resources.settings.trust_domain.clone(),
            outbound_traffic_policy: outbound.outbound_traffic_policy,
            protocol_detection_timeout_ms: resources.settings.protocol_detection_timeout_ms,
        },
        identity: None,
        services: outbound.services,
        clusters: outbound.clusters,
        inbound: inbound::inbound(resources, proxy),
    }
}

/// The workload part of a snapshot.
pub fn workload(proxy: &ProxyRef) -> Workload {
    Workload {
        name: proxy.name.clone(),
        namespace: proxy.namespace.clone(),
        service_account: proxy.service_account.clone(),
        labels: proxy.labels.clone(),
    }
}

/// What a proxy may call. Depends on the proxy only through [`Index::outbound_key`], so
/// callers may share it between proxies with equal keys.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outbound {
    /// Services with their routes.
    pub services: Vec<Service>,
    /// Every cluster a service or route names.
    pub clusters: Vec<Cluster>,
    /// From the proxy's Sidecar, else allow any.
    pub outbound_traffic_policy: OutboundTrafficPolicy,
}

/// A cluster a route or service refers to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ClusterRef {
    pub host: String,
    pub port: u16,
    pub subset: Option<String>,
}

impl ClusterRef {
    pub(crate) fn name(&self) -> String {
        Cluster::outbound_name(self.port, self.subset.as_deref(), &self.host)
    }
}

/// The per-proxy translation context.
pub(crate) struct Ctx<'a> {
    pub resources: &'a Resources,
    pub index: &'a Index,
    pub proxy: &'a ProxyRef,
    /// Clusters referenced so far.
    pub wanted: BTreeSet<ClusterRef>,
}

impl Ctx<'_> {
    /// Resolves a destination host written in namespace `ns` and a port to a cluster, and
    /// records it as wanted. `port` absent: the service's only port, else `fallback_port`.
    pub fn cluster_for(
        &mut self,
        host: &str,
        ns: &str,
        port: Option<u16>,
        subset: Option<&str>,
        fallback_port: u16,
    ) -> String {
        let host = resolve_host(host, ns);
        let port = port.unwrap_or_else(|| match self.index.service(&host) {
            Some(s) if s.ports.len() == 1 => s.ports[0].port,
            _ => fallback_port,
        });
        let r = ClusterRef {
            host,
            port,
            subset: subset.filter(|s| !s.is_empty()).map(str::to_owned),
        };
        let name = r.name();
        self.wanted.insert(r);
        name
    }
}

/// Computes the outbound view of `proxy`.
pub fn outbound(resources: &Resources, proxy: &ProxyRef) -> Outbound {
    let index = resources.index();
    let mut ctx = Ctx {
        resources,
        index: &index,
        proxy,
        wanted: BTreeSet::new(),
    };
    let sidecar = sidecar_for(&index, proxy, &resources.settings.root_namespace);
    let outbound_traffic_policy = match sidecar
        .and_then(|s| s.outbound_traffic_policy.as_ref())
        .and_then(|p| p.mode)
    {
        Some(OutboundTrafficMode::RegistryOnly) => OutboundTrafficPolicy::RegistryOnly,
        _ => OutboundTrafficPolicy::AllowAny,
    };
    let mut services = Vec::new();
    for svc in &index.services {
        if !exported_to(&svc.export_to, &svc.namespace, &proxy.namespace) {
            continue;
        }
        if let Some(sidecar) = sidecar
            && !sidecar_allows(sidecar, proxy, svc)
        {
            continue;
        }
        let mut ports = Vec::new();
        for port in &svc.ports {
            let default = ClusterRef {
                host: svc.hostname.clone(),
                port: port.port,
                subset: None,
            };
            ctx.wanted.insert(default);
            let (http_routes, tcp_routes) = routes::for_port(&mut ctx, svc, port);
            ports.push(ServicePort {
                port: port.port,
                name: port.name.clone(),
                protocol: port.protocol,
                cluster: None,
                http_routes,
                tcp_routes,
            });
        }
        // Subset clusters exist for every subset, as in Istio, routed to or not.
        if let Some(dr) = policy::destination_rule(&ctx, &svc.hostname) {
            for subset in &dr.subsets {
                for port in &svc.ports {
                    ctx.wanted.insert(ClusterRef {
                        host: svc.hostname.clone(),
                        port: port.port,
                        subset: Some(subset.name.clone()),
                    });
                }
            }
        }
        services.push(Service {
            hostname: svc.hostname.clone(),
            namespace: svc.namespace.clone(),
            vips: svc.vips.clone(),
            ports,
        });
    }
    let wanted = std::mem::take(&mut ctx.wanted);
    let mut clusters = Vec::with_capacity(wanted.len());
    let mut dr_cache: BTreeMap<String, Option<policy::MergedRule>> = BTreeMap::new();
    for r in wanted {
        let dr = dr_cache
            .entry(r.host.clone())
            .or_insert_with(|| policy::destination_rule(&ctx, &r.host))
            .as_ref();
        clusters.push(policy::cluster(&ctx, &r, dr));
    }
    Outbound {
        services,
        clusters,
        outbound_traffic_policy,
    }
}

/// `reviews` in `default` is `reviews.default.svc.cluster.local`; names with a dot or a
/// wildcard are taken as they are.
pub fn resolve_host(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.svc.{CLUSTER_DOMAIN}")
    }
}

/// Whether a host pattern (`*`, `*.example.com`, exact) covers `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" || pattern == host {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => host.strip_prefix('*').is_some_and(|s| pattern.ends_with(s)),
    }
}

/// Istio's `exportTo`: empty or `*` everywhere, `.` the owner's namespace, `~` nowhere, else
/// the namespaces named.
pub fn exported_to(export_to: &[String], owner_namespace: &str, proxy_namespace: &str) -> bool {
    if export_to.is_empty() {
        return true;
    }
    export_to.iter().any(|e| match e.as_str() {
        "*" => true,
        "." => owner_namespace == proxy_namespace,
        "~" => false,
        ns => ns == proxy_namespace,
    })
}

/// Whether every label of `selector` is on `labels`.
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn sidecar_spec(r: &AnyResource) -> Option<(&SidecarSpec, &str)> {
    match r {
        AnyResource::Sidecar(s) => Some((
            &s.spec,
            s.metadata.namespace.as_deref().unwrap_or("default"),
        )),
        _ => None,
    }
}

/// The Sidecar of a proxy: one selecting it in its namespace, else the namespace's default
/// one (no selector), else the root namespace's default one. Oldest wins among equals.
pub(crate) fn sidecar_for<'a>(
    index: &'a Index,
    proxy: &'a ProxyRef,
    root_namespace: &'a str,
) -> Option<&'a SidecarSpec> {
    fn in_ns<'a>(
        index: &'a Index,
        ns: &'a str,
    ) -> impl Iterator<Item = (&'a SidecarSpec, &'a str)> {
        index
            .sidecars
            .iter()
            .filter_map(|r| sidecar_spec(r))
            .filter(move |(_, n)| *n == ns)
    }
    in_ns(index, &proxy.namespace)
        .find(|(s, _)| {
            s.workload_selector
                .as_ref()
                .is_some_and(|w| !w.labels.is_empty() && labels_match(&w.labels, &proxy.labels))
        })
        .or_else(|| {
            in_ns(index, &proxy.namespace).find(|(s, _)| {
                s.workload_selector
                    .as_ref()
                    .is_none_or(|w| w.labels.is_empty())
            })
        })
        .or_else(|| {
            in_ns(index, root_namespace).find(|(s, _)| {
                s.workload_selector
                    .as_ref()
                    .is_none_or(|w| w.labels.is_empty())
            })
        })
        .map(|(s, _)| s)
}

/// Whether a Sidecar's egress hosts (`ns/host`, `*/…`, `./…`, `~/…`) allow a service.
pub(crate) fn sidecar_allows(sidecar: &SidecarSpec, proxy: &ProxyRef, svc: &RegService) -> bool {
    if sidecar.egress.is_empty() {
        return true;
    }
    sidecar.egress.iter().flat_map(|e| e.hosts.iter()).any(|h| {
        let (ns, host) = h.split_once('/').unwrap_or(("*", h.as_str()));
        let ns_ok = match ns {
            "*" => true,
            "." => svc.namespace == proxy.namespace,
            "~" => false,
            n => svc.namespace == n,
        };
        ns_ok && host_matches(host, &svc.hostname)
    })
}

/// Parses a protobuf-style duration (`1.5s`, `100ms`, `1h30m`, `10us`) into milliseconds.
pub fn duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        total += number * factor;
        rest = &rest[unit_end..];
    }
    Some(total.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_ms("1.5s"), Some(1500));
        assert_eq!(duration_ms("100ms"), Some(100));
        assert_eq!(duration_ms("1h1m"), Some(3_660_000));
        assert_eq!(duration_ms("soon"), None);
        assert_eq!(duration_ms("10"), None);
    }

    #[test]
    fn hosts_and_export() {
        assert!(host_matches("*", "a.b"));
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert_eq!(
            resolve_host("reviews", "default"),
            "reviews.default.svc.cluster.local"
        );
        assert!(exported_to(&[], "a", "b"));
        assert!(!exported_to(&[".".into()], "a", "b"));
        assert!(exported_to(&[".".into()], "a", "a"));
        assert!(!exported_to(&["~".into()], "a", "a"));
        assert!(exported_to(&["b".into()], "a", "b"));
    }
}
