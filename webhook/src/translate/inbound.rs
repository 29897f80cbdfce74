//! How a workload accepts traffic: PeerAuthentication (workload policy over namespace policy
//! over the mesh policy in the root namespace, each level's `UNSET` inheriting the level
//! above, `PERMISSIVE` without any; `portLevelMtls` only from a policy with a selector, its
//! ports being container ports) and the protocols declared by the services selecting it.

use std::collections::BTreeMap;

use weft_api::config::{Inbound, InboundPort, MtlsMode, Protocol};
use weft_api::crd::AnyResource;
use weft_api::crd::security::{MtlsMode as PaMode, PeerAuthenticationSpec};

use super::registry::{RegPort, Target, resolve_target};
use super::{Index, labels_match};
use crate::resources::{ProxyRef, Resources};

fn pa(r: &AnyResource) -> Option<(&PeerAuthenticationSpec, &str)> {
    match r {
        AnyResource::PeerAuthentication(p) => Some((
            &p.spec,
            p.metadata.namespace.as_deref().unwrap_or("default"),
        )),
        _ => None,
    }
}

fn has_selector(spec: &PeerAuthenticationSpec) -> bool {
    spec.selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .is_some_and(|l| !l.is_empty())
}

fn mode(m: Option<PaMode>) -> Option<MtlsMode> {
    match m? {
        PaMode::Unset => None,
        PaMode::Disable => Some(MtlsMode::Disable),
        PaMode::Permissive => Some(MtlsMode::Permissive),
        PaMode::Strict => Some(MtlsMode::Strict),
    }
}

/// The mTLS mode of a workload and its per-port overrides (container ports).
pub fn peer_authentication_mode(
    index: &Index,
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> (MtlsMode, BTreeMap<u16, MtlsMode>) {
    let policies = || index.peer_authentications.iter().filter_map(|r| pa(r));
    let mesh = policies().find(|(s, ns)| *ns == root_namespace && !has_selector(s));
    let namespace_wide = policies().find(|(s, ns)| *ns == namespace && !has_selector(s));
    let workload = policies().find(|(s, ns)| {
        *ns == namespace
            && has_selector(s)
            && s.selector
                .as_ref()
                .and_then(|sel| sel.match_labels.as_ref())
                .is_some_and(|l| labels_match(l, labels))
    });
    let mut current = MtlsMode::Permissive;
    for level in [mesh, namespace_wide, workload].into_iter().flatten() {
        if let Some(m) = mode(level.0.mtls.as_ref().and_then(|m| m.mode)) {
            current = m;
        }
    }
    let mut ports = BTreeMap::new();
    if let Some((spec, _)) = workload {
        for (port, m) in spec.port_level_mtls.iter().flatten() {
            if let Ok(port) = u16::try_from(*port) {
                ports.insert(port, mode(m.mode).unwrap_or(current));
            }
        }
    }
    (current, ports)
}

/// The inbound settings of a proxy.
pub fn inbound(resources: &Resources, proxy: &ProxyRef) -> Inbound {
    let index = resources.index();
    let (mtls, port_modes) = peer_authentication_mode(
        &index,
        &resources.settings.root_namespace,
        &proxy.namespace,
        &proxy.labels,
    );
    let pod = resources.pod(&proxy.namespace, &proxy.name).map(|p| &**p);
    let mut ports: Vec<InboundPort> = Vec::new();
    for ((ns, _), svc) in resources
        .services
        .range((proxy.namespace.clone(), String::new())..)
    {
        if *ns != proxy.namespace {
            break;
        }
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        if !labels_match(selector, &proxy.labels) {
            continue;
        }
        for p in spec.ports.iter().flatten() {
            if p.protocol.as_deref() == Some("UDP") {
                continue;
            }
            let reg = RegPort {
                port: u16::try_from(p.port).unwrap_or(0),
                name: p.name.clone().unwrap_or_default(),
                protocol: Protocol::from_port(
                    p.name.as_deref().unwrap_or(""),
                    p.app_protocol.as_deref(),
                ),
                target: match &p.target_port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                        Target::Number(u16::try_from(*n).unwrap_or(0))
                    }
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => s
                        .parse()
                        .map(Target::Number)
                        .unwrap_or_else(|_| Target::Name(s.clone())),
                    None => Target::Number(u16::try_from(p.port).unwrap_or(0)),
                },
            };
            let Some(target) = resolve_target(&reg.target, pod) else {
                continue;
            };
            if ports.iter().any(|x| x.port == target) {
                continue;
            }
            ports.push(InboundPort {
                port: target,
                mtls: port_modes.get(&target).copied(),
                protocol: reg.protocol,
            });
        }
    }
    for (port, m) in &port_modes {
        if *port != 0 && !ports.iter().any(|p| p.port == *port) {
            ports.push(InboundPort {
                port: *port,
                mtls: Some(*m),
                protocol: Protocol::Auto,
            });
        }
    }
    ports.sort_by_key(|p| p.port);
    Inbound { mtls, ports }
}
