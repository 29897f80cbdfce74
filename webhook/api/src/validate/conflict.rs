//! Checks across the documents of one input: duplicates, and the combinations whose outcome
//! Istio documents as merged, ignored or undefined. Weft reports them instead of guessing:
//!
//! - several VirtualServices for one host on the mesh (sidecars): Istio does not merge them and
//!   which one applies is undefined (analyzer IST0109) — an error;
//!   Hosts are compared as Istio resolves them: a short name is a service of the
//!   VirtualService's own namespace, so `reviews` in `prod` and `reviews.prod.svc.cluster.local`
//!   in `other` are one host;
//! - a mesh VirtualService whose wildcard host covers a host another one names (`*.prod.svc…`
//!   and `reviews.prod.svc…`): Istio applies only the most specific one to that host and
//!   merges nothing — a warning;
//! - several VirtualServices for one host on one gateway: Istio merges their rules, oldest
//!   first — a warning;
//! - two routing configurations for one service, precedence undefined — an error: an
//!   HTTPRoute / GRPCRoute (GAMMA, parent a Service) and a mesh VirtualService (also through a
//!   wildcard host), a TrafficSplit and a mesh VirtualService, an HTTPRoute and a TrafficSplit,
//!   or several TrafficSplits for one root service (Weft's translator applies the oldest);
//! - several DestinationRules for one host: merged, the oldest's traffic policy wins and
//!   duplicate subsets are dropped — a warning;
//! - routes to a subset no DestinationRule in the input defines (IST0101) — a warning.

use std::collections::{BTreeMap, BTreeSet};

use super::{Finding, Severity};
use crate::crd::AnyResource;
use crate::crd::networking::{DestinationRule, VirtualService};

const DEFAULT_NAMESPACE: &str = "default";

fn namespace_of(resource: &AnyResource) -> String {
    resource
        .metadata()
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

/// Short names (`reviews`) resolve to the namespace of the resource that names them.
fn resolve_host(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

/// Where a resource is visible (`exportTo`): everywhere, or a set of namespaces.
#[derive(Clone, Debug, PartialEq)]
enum Visibility {
    All,
    Namespaces(BTreeSet<String>),
}

impl Visibility {
    fn of(export_to: &[String], namespace: &str) -> Self {
        if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
            return Self::All;
        }
        Self::Namespaces(
            export_to
                .iter()
                .filter(|e| *e != "~")
                .map(|e| {
                    if e == "." {
                        namespace.to_string()
                    } else {
                        e.clone()
                    }
                })
                .collect(),
        )
    }

    fn overlaps(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::All, _) | (_, Self::All) => true,
            (Self::Namespaces(a), Self::Namespaces(b)) => !a.is_disjoint(b),
        }
    }
}

struct Emitter {
    findings: Vec<Finding>,
}

impl Emitter {
    fn push(
        &mut self,
        severity: Severity,
        object: &str,
        field: impl Into<String>,
        message: String,
    ) {
        self.findings.push(Finding {
            object: object.to_string(),
            field: field.into(),
            message,
            severity,
        });
    }
}

/// The gateways a VirtualService applies to, `namespace/name` or `mesh`.
fn vs_gateways(vs: &VirtualService, namespace: &str) -> Vec<String> {
    if vs.spec.gateways.is_empty() {
        return vec!["mesh".to_string()];
    }
    vs.spec
        .gateways
        .iter()
        .map(|g| {
            if g == "mesh" || g.contains('/') {
                g.clone()
            } else if let Some((name, ns)) = g.split_once('.') {
                // Legacy `name.namespace.svc.cluster.local`.
                format!("{}/{name}", ns.split('.').next().unwrap_or(ns))
            } else {
                format!("{namespace}/{g}")
            }
        })
        .collect()
}

/// Every cross-document finding for the resources of one input, in input order.
pub(crate) fn check(resources: &[(String, AnyResource)]) -> Vec<Finding> {
    let mut out = Emitter {
        findings: Vec::new(),
    };

    // Duplicates: the later document replaces the earlier one when applied.
    let mut latest: BTreeMap<(String, String, String, String), usize> = BTreeMap::new();
    for (i, (label, resource)) in resources.iter().enumerate() {
        let known = resource.known_kind();
        let key = (
            known.group.to_string(),
            known.kind.to_string(),
            namespace_of(resource),
            resource.metadata().name.clone().unwrap_or_default(),
        );
        if let Some(previous) = latest.insert(key, i) {
            out.push(
                Severity::Warning,
                label,
                "metadata.name",
                format!(
                    "duplicate of document {} ({}): applying both keeps only this one",
                    previous + 1,
                    resources[previous].0
                ),
            );
        }
    }
    let kept: Vec<&(String, AnyResource)> = {
        let keep: BTreeSet<usize> = latest.values().copied().collect();
        resources
            .iter()
            .enumerate()
            .filter(|(i, _)| keep.contains(i))
            .map(|(_, r)| r)
            .collect()
    };

    let virtual_services: Vec<(&str, &VirtualService, String)> = kept
        .iter()
        .filter_map(|(label, r)| match r {
            AnyResource::VirtualService(vs) => Some((label.as_str(), vs, namespace_of(r))),
            _ => None,
        })
        .collect();
    let destination_rules: Vec<(&str, &DestinationRule, String)> = kept
        .iter()
        .filter_map(|(label, r)| match r {
            AnyResource::DestinationRule(dr) => Some((label.as_str(), dr, namespace_of(r))),
            _ => None,
        })
        .collect();

    virtual_service_hosts(&virtual_services, &mut out);
    mesh_route_overlaps(&kept, &virtual_services, &mut out);
    destination_rule_hosts(&destination_rules, &mut out);
    undefined_subsets(&virtual_services, &destination_rules, &mut out);
    out.findings
}

/// Whether host pattern `pattern` (`*`, `*.example.com` or a name) covers `host` (a name or a
/// narrower wildcard), as Istio matches hosts.
fn covers(pattern: &str, host: &str) -> bool {
    if pattern == "*" || pattern == host {
        return true;
    }
    pattern
        .strip_prefix('*')
        .is_some_and(|suffix| host.len() > suffix.len() && host.ends_with(suffix))
}

fn virtual_service_hosts(virtual_services: &[(&str, &VirtualService, String)], out: &mut Emitter) {
    wildcard_overlaps(virtual_services, out);
    // (gateway, host) -> [(vs index, host index)]
    let mut claims: BTreeMap<(String, String), Vec<(usize, usize)>> = BTreeMap::new();
    for (i, (_, vs, namespace)) in virtual_services.iter().enumerate() {
        for gateway in vs_gateways(vs, namespace) {
            for (h, host) in vs.spec.hosts.iter().enumerate() {
                claims
                    .entry((gateway.clone(), resolve_host(host, namespace)))
                    .or_default()
                    .push((i, h));
            }
        }
    }
    for ((gateway, host), claimants) in claims {
        if claimants.len() < 2 {
            continue;
        }
        let (first, _) = claimants[0];
        let (first_label, first_vs, first_ns) = &virtual_services[first];
        let first_visibility = Visibility::of(&first_vs.spec.export_to, first_ns);
        for &(i, h) in &claimants[1..] {
            if i == first {
                continue;
            }
            let (label, vs, namespace) = &virtual_services[i];
            let field = format!("spec.hosts[{h}]");
            if gateway == "mesh" {
                if !Visibility::of(&vs.spec.export_to, namespace).overlaps(&first_visibility) {
                    continue;
                }
                out.push(
                    Severity::Error,
                    label,
                    field,
                    format!(
                        "host {host} is also routed by {first_label} for the mesh: Istio does not merge VirtualServices bound to sidecars and which one applies is undefined (IST0109); merge them into one VirtualService"
                    ),
                );
            } else {
                out.push(
                    Severity::Warning,
                    label,
                    field,
                    format!(
                        "host {host} is also routed by {first_label} on gateway {gateway}: Istio merges their http rules in creation order (oldest first), so a catch-all rule of the older one hides the rules of the newer"
                    ),
                );
            }
        }
    }
}

fn wildcard_overlaps(virtual_services: &[(&str, &VirtualService, String)], out: &mut Emitter) {
    // (vs index, host index, resolved host) of every mesh host.
    let mut mesh = Vec::new();
    for (i, (_, vs, namespace)) in virtual_services.iter().enumerate() {
        if vs_gateways(vs, namespace).iter().any(|g| g == "mesh") {
            for (h, host) in vs.spec.hosts.iter().enumerate() {
                mesh.push((i, h, resolve_host(host, namespace)));
            }
        }
    }
    let mut reported = BTreeSet::new();
    for (i, h, wildcard) in &mesh {
        if !wildcard.starts_with('*') {
            continue;
        }
        let (label, vs, namespace) = &virtual_services[*i];
        let visibility = Visibility::of(&vs.spec.export_to, namespace);
        for (j, _, host) in &mesh {
            if j == i || host == wildcard || !covers(wildcard, host) {
                continue;
            }
            let (other_label, other, other_ns) = &virtual_services[*j];
            if !Visibility::of(&other.spec.export_to, other_ns).overlaps(&visibility)
                || !reported.insert((*i, *h, *j, host.clone()))
            {
                continue;
            }
            out.push(
                Severity::Warning,
                label,
                format!("spec.hosts[{h}]"),
                format!(
                    "host {wildcard} also covers {host}, which {other_label} routes for the mesh: Istio applies only the most specific host's VirtualService to {host} and merges nothing, so these rules do not apply to it"
                ),
            );
        }
    }
}

/// The first mesh VirtualService host (as `(label, host index)`) that covers `service`.
fn mesh_claim<'a>(
    mesh_hosts: &BTreeMap<String, (&'a str, usize)>,
    service: &str,
) -> Option<(&'a str, usize)> {
    mesh_hosts.get(service).copied().or_else(|| {
        mesh_hosts
            .iter()
            .filter(|(pattern, _)| covers(pattern, service))
            // The most specific wildcard, as Istio picks it.
            .max_by_key(|(pattern, _)| pattern.len())
            .map(|(_, claim)| *claim)
    })
}

fn mesh_route_overlaps(
    kept: &[&(String, AnyResource)],
    virtual_services: &[(&str, &VirtualService, String)],
    out: &mut Emitter,
) {
    // Mesh hosts of VirtualServices.
    let mut mesh_hosts: BTreeMap<String, (&str, usize)> = BTreeMap::new();
    for (label, vs, namespace) in virtual_services {
        if vs_gateways(vs, namespace).iter().any(|g| g == "mesh") {
            for (h, host) in vs.spec.hosts.iter().enumerate() {
                mesh_hosts
                    .entry(resolve_host(host, namespace))
                    .or_insert((label, h));
            }
        }
    }
    // Services routed by HTTPRoutes / GRPCRoutes, and roots of TrafficSplits.
    let mut gamma: BTreeMap<String, (&str, &str, usize)> = BTreeMap::new();
    let mut splits: BTreeMap<String, &str> = BTreeMap::new();
    for (label, resource) in kept {
        let namespace = namespace_of(resource);
        let parents = match resource {
            AnyResource::HttpRoute(r) => Some(("HTTPRoute", &r.spec.parent_refs)),
            AnyResource::GrpcRoute(r) => Some(("GRPCRoute", &r.spec.parent_refs)),
            AnyResource::TcpRoute(r) => Some(("TCPRoute", &r.spec.parent_refs)),
            _ => None,
        };
        if let Some((kind, parents)) = parents {
            for (i, parent) in parents.iter().enumerate() {
                let core = parent
                    .group
                    .as_deref()
                    .is_some_and(|g| g.is_empty() || g == "core");
                if !core || parent.kind.as_deref() != Some("Service") {
                    continue;
                }
                let service_ns = parent
                    .namespace
                    .clone()
                    .unwrap_or_else(|| namespace.clone());
                let service = format!("{}.{service_ns}.svc.cluster.local", parent.name);
                // The translator routes HTTP and gRPC from these (TCPRoute is not translated).
                if kind != "TCPRoute" {
                    gamma.entry(service.clone()).or_insert((label, kind, i));
                }
                if let Some((vs_label, h)) = mesh_claim(&mesh_hosts, &service) {
                    out.push(
                        Severity::Error,
                        label,
                        format!("spec.parentRefs[{i}]"),
                        format!(
                            "{kind} routes service {service} for the mesh, and so does {vs_label} (spec.hosts[{h}]): Istio gives no precedence between a VirtualService and a Gateway API route for one service; keep one"
                        ),
                    );
                }
            }
        }
        if let AnyResource::TrafficSplit(split) = resource {
            let service = resolve_host(&split.spec.service, &namespace);
            if let Some((vs_label, h)) = mesh_claim(&mesh_hosts, &service) {
                out.push(
                    Severity::Error,
                    label,
                    "spec.service",
                    format!(
                        "TrafficSplit splits service {service}, which {vs_label} (spec.hosts[{h}]) also routes: two traffic splits for one service; keep one"
                    ),
                );
            }
            match splits.get(&service) {
                Some(first) => out.push(
                    Severity::Error,
                    label,
                    "spec.service",
                    format!(
                        "service {service} is also split by {first}: SMI defines no precedence between TrafficSplits for one service (Weft applies the oldest); keep one"
                    ),
                ),
                None => {
                    splits.insert(service, label);
                }
            }
        }
    }
    // Gateway API routes and TrafficSplits for one service.
    for (label, resource) in kept {
        let AnyResource::TrafficSplit(split) = resource else {
            continue;
        };
        let service = resolve_host(&split.spec.service, &namespace_of(resource));
        if let Some((route_label, kind, i)) = gamma.get(&service) {
            out.push(
                Severity::Error,
                label,
                "spec.service",
                format!(
                    "TrafficSplit splits service {service}, which {kind} {route_label} (spec.parentRefs[{i}]) also routes: two routing configurations for one service, precedence undefined (Weft applies the oldest); keep one"
                ),
            );
        }
    }
}

fn destination_rule_hosts(
    destination_rules: &[(&str, &DestinationRule, String)],
    out: &mut Emitter,
) {
    let mut by_host: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (i, (_, dr, namespace)) in destination_rules.iter().enumerate() {
        let selector = serde_json::to_string(&dr.spec.workload_selector).unwrap_or_default();
        by_host
            .entry((resolve_host(&dr.spec.host, namespace), selector))
            .or_default()
            .push(i);
    }
    for ((host, _), rules) in by_host {
        let Some((&first, rest)) = rules.split_first() else {
            continue;
        };
        let (first_label, first_dr, first_ns) = &destination_rules[first];
        let first_visibility = Visibility::of(&first_dr.spec.export_to, first_ns);
        let mut subsets: BTreeSet<&str> = first_dr
            .spec
            .subsets
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        for &i in rest {
            let (label, dr, namespace) = &destination_rules[i];
            if !Visibility::of(&dr.spec.export_to, namespace).overlaps(&first_visibility) {
                continue;
            }
            let mut notes = Vec::new();
            if dr.spec.traffic_policy.is_some() && first_dr.spec.traffic_policy.is_some() {
                notes.push("its top-level trafficPolicy is ignored".to_string());
            }
            let duplicates: Vec<&str> = dr
                .spec
                .subsets
                .iter()
                .map(|s| s.name.as_str())
                .filter(|n| !subsets.insert(n))
                .collect();
            if !duplicates.is_empty() {
                notes.push(format!(
                    "its subsets {} are already defined and are ignored",
                    duplicates.join(", ")
                ));
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join("; "))
            };
            out.push(
                Severity::Warning,
                label,
                "spec.host",
                format!(
                    "host {host} also has DestinationRule {first_label}: Istio merges DestinationRules for one host in creation order, the oldest's trafficPolicy wins{notes}"
                ),
            );
        }
    }
}

fn undefined_subsets(
    virtual_services: &[(&str, &VirtualService, String)],
    destination_rules: &[(&str, &DestinationRule, String)],
    out: &mut Emitter,
) {
    let mut subsets: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for (_, dr, namespace) in destination_rules {
        subsets
            .entry(resolve_host(&dr.spec.host, namespace))
            .or_default()
            .extend(dr.spec.subsets.iter().map(|s| s.name.as_str()));
    }
    for (label, vs, namespace) in virtual_services {
        let mut check = |host: &str, subset: Option<&String>, field: String| {
            let Some(subset) = subset else { return };
            let host = resolve_host(host, namespace);
            if let Some(defined) = subsets.get(&host)
                && !defined.contains(subset.as_str())
            {
                out.push(
                        Severity::Warning,
                        label,
                        field,
                        format!("subset {subset:?} of host {host} is not defined by the DestinationRules for that host in this input (IST0101)"),
                    );
            }
        };
        for (i, http) in vs.spec.http.iter().enumerate() {
            for (j, route) in http.route.iter().enumerate() {
                check(
                    &route.destination.host,
                    route.destination.subset.as_ref(),
                    format!("spec.http[{i}].route[{j}].destination.subset"),
                );
            }
        }
        for (i, tcp) in vs.spec.tcp.iter().enumerate() {
            for (j, route) in tcp.route.iter().enumerate() {
                check(
                    &route.destination.host,
                    route.destination.subset.as_ref(),
                    format!("spec.tcp[{i}].route[{j}].destination.subset"),
                );
            }
        }
        for (i, tls) in vs.spec.tls.iter().enumerate() {
            for (j, route) in tls.route.iter().enumerate() {
                check(
                    &route.destination.host,
                    route.destination.subset.as_ref(),
                    format!("spec.tls[{i}].route[{j}].destination.subset"),
                );
            }
        }
    }
}
