//! The local node's static mesh config: from its Services, running Pods and
//! PeerAuthentications, the snapshot each proxy reads from its `--config` file.
//!
//! This is the interim config source of the data-plane milestone; the control plane's
//! translation replaces it when pods get their config streamed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_api::config::{
    self as model, Cluster, Endpoint, IdentityFiles, Inbound, InboundPort, MtlsMode, Protocol,
    ServicePort, Snapshot, Workload,
};

/// A PeerAuthentication, reduced to what the data plane needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuth {
    /// Namespace; the mesh root namespace applies mesh-wide.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.selector.matchLabels`; `None` applies namespace-wide.
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.mtls.mode`; `None` inherits.
    pub mode: Option<MtlsMode>,
    /// `spec.portLevelMtls` (only honoured with a selector, as in Istio).
    pub ports: BTreeMap<u16, MtlsMode>,
}

/// The namespace whose PeerAuthentications apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "weft-system";

impl PeerAuth {
    /// Reads the fields Weft uses from a PeerAuthentication object.
    pub fn from_value(v: &serde_json::Value) -> anyhow::Result<PeerAuth> {
        let meta = &v["metadata"];
        let spec = &v["spec"];
        let mode = |m: &serde_json::Value| -> anyhow::Result<Option<MtlsMode>> {
            match m["mode"].as_str() {
                None | Some("UNSET") => Ok(None),
                Some("STRICT") => Ok(Some(MtlsMode::Strict)),
                Some("PERMISSIVE") => Ok(Some(MtlsMode::Permissive)),
                Some("DISABLE") => Ok(Some(MtlsMode::Disable)),
                Some(other) => anyhow::bail!("spec.mtls.mode: unknown mode {other:?}"),
            }
        };
        let selector = spec["selector"]["matchLabels"].as_object().map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        });
        let mut ports = BTreeMap::new();
        if let Some(pl) = spec["portLevelMtls"].as_object() {
            for (port, m) in pl {
                let port: u16 = port
                    .parse()
                    .map_err(|_| anyhow::anyhow!("spec.portLevelMtls: {port:?} is not a port"))?;
                if let Some(m) = mode(m)? {
                    ports.insert(port, m);
                }
            }
        }
        Ok(PeerAuth {
            namespace: meta["namespace"].as_str().unwrap_or("default").to_owned(),
            name: meta["name"].as_str().unwrap_or_default().to_owned(),
            selector,
            mode: mode(&spec["mtls"])?,
            ports,
        })
    }

    fn selects(&self, pod: &Pod) -> bool {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        self.selector
            .as_ref()
            .is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// A pod as the generator sees it.
pub struct PodView<'a> {
    /// The pod object.
    pub pod: &'a Pod,
    /// Its IPv4 address.
    pub ip: IpAddr,
    /// True when it runs a Weft proxy.
    pub meshed: bool,
}

/// Istio's PeerAuthentication precedence: workload selector, then namespace, then mesh-wide;
/// port-level settings only from a selecting policy. Default PERMISSIVE.
pub fn inbound_mtls(pod: &Pod, policies: &[PeerAuth]) -> (MtlsMode, BTreeMap<u16, MtlsMode>) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mesh = policies
        .iter()
        .find(|p| p.namespace == ROOT_NAMESPACE && p.selector.is_none());
    let namespace = policies
        .iter()
        .find(|p| p.namespace == ns && p.selector.is_none());
    let workload = policies
        .iter()
        .find(|p| p.namespace == ns && p.selects(pod));
    let mut mode = MtlsMode::Permissive;
    for p in [mesh, namespace, workload].into_iter().flatten() {
        if let Some(m) = p.mode {
            mode = m;
        }
    }
    (mode, workload.map(|w| w.ports.clone()).unwrap_or_default())
}

fn selects(svc: &Service, pod: &Pod) -> bool {
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    if selector.is_empty() || svc.metadata.namespace != pod.metadata.namespace {
        return false;
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Resolves a Service targetPort against a pod's container ports.
pub fn target_port(pod: &Pod, port: i32, target: Option<&IntOrString>) -> Option<u16> {
    match target {
        None => u16::try_from(port).ok(),
        Some(IntOrString::Int(p)) => u16::try_from(*p).ok(),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// The SPIFFE ID of a pod.
pub fn pod_identity(pod: &Pod, trust_domain: &str) -> String {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    model::spiffe_id(trust_domain, &ns, &sa)
}

/// Everything a snapshot is computed from.
pub struct Inputs<'a> {
    /// Services with their assigned VIPs.
    pub services: &'a [(Service, Vec<IpAddr>)],
    /// Running pods.
    pub pods: &'a [PodView<'a>],
    /// PeerAuthentications.
    pub peer_auths: &'a [PeerAuth],
    /// Trust domain.
    pub trust_domain: &'a str,
    /// Snapshot version.
    pub version: u64,
    /// Protocol detection timeout.
    pub detect_timeout_ms: u64,
}

/// The snapshot for the proxy of `me`.
pub fn snapshot(inputs: &Inputs<'_>, me: &PodView<'_>, identity: IdentityFiles) -> Snapshot {
    let pod = me.pod;
    let mut services = Vec::new();
    let mut clusters = Vec::new();
    let mut inbound_ports = BTreeMap::<u16, Protocol>::new();
    for (svc, vips) in inputs.services {
        let name = svc.metadata.name.clone().unwrap_or_default();
        let ns = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let hostname = format!("{name}.{ns}.svc.cluster.local");
        let mut ports = Vec::new();
        for sp in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            let Ok(port) = u16::try_from(sp.port) else {
                continue;
            };
            let protocol = Protocol::from_port(
                sp.name.as_deref().unwrap_or_default(),
                sp.app_protocol.as_deref(),
            );
            let mut endpoints = Vec::new();
            for p in inputs.pods.iter().filter(|p| selects(svc, p.pod)) {
                let Some(target) = target_port(p.pod, sp.port, sp.target_port.as_ref()) else {
                    continue;
                };
                if std::ptr::eq(p.pod, pod) {
                    inbound_ports.insert(target, protocol);
                }
                endpoints.push(Endpoint {
                    address: p.ip,
                    port: target,
                    identity: p.meshed.then(|| pod_identity(p.pod, inputs.trust_domain)),
                    labels: p.pod.metadata.labels.clone().unwrap_or_default(),
                    weight: 1,
                });
            }
            clusters.push(Cluster {
                name: Cluster::outbound_name(port, None, &hostname),
                endpoints,
                ..Default::default()
            });
            ports.push(ServicePort {
                port,
                name: sp.name.clone().unwrap_or_default(),
                protocol,
                ..Default::default()
            });
        }
        services.push(model::Service {
            hostname,
            namespace: ns,
            vips: vips.clone(),
            ports,
        });
    }
    let (mode, port_modes) = inbound_mtls(pod, inputs.peer_auths);
    let mut ports: BTreeMap<u16, InboundPort> = inbound_ports
        .into_iter()
        .map(|(port, protocol)| {
            (
                port,
                InboundPort {
                    port,
                    mtls: None,
                    protocol,
                },
            )
        })
        .collect();
    for (port, m) in port_modes {
        ports
            .entry(port)
            .or_insert(InboundPort {
                port,
                mtls: None,
                protocol: Protocol::Auto,
            })
            .mtls = Some(m);
    }
    Snapshot {
        version: inputs.version.to_string(),
        workload: Workload {
            name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
        },
        mesh: model::MeshSettings {
            trust_domain: inputs.trust_domain.to_owned(),
            protocol_detection_timeout_ms: inputs.detect_timeout_ms,
            ..Default::default()
        },
        identity: Some(identity),
        services,
        clusters,
        inbound: Inbound {
            mtls: mode,
            ports: ports.into_values().collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.namespace = Some("genesis".into());
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    fn pa(ns: &str, selector: Option<&str>, mode: MtlsMode, ports: &[(u16, MtlsMode)]) -> PeerAuth {
        PeerAuth {
            namespace: ns.into(),
            name: "p".into(),
            selector: selector.map(|s| [("app".to_string(), s.to_string())].into()),
            mode: Some(mode),
            ports: ports.iter().copied().collect(),
        }
    }

    #[test]
    fn peer_authentication_precedence() {
        let b = pod(&[("app", "b")]);
        assert_eq!(inbound_mtls(&b, &[]).0, MtlsMode::Permissive);
        let mesh = pa(ROOT_NAMESPACE, None, MtlsMode::Strict, &[]);
        assert_eq!(
            inbound_mtls(&b, std::slice::from_ref(&mesh)).0,
            MtlsMode::Strict
        );
        let ns = pa(
            "genesis",
            None,
            MtlsMode::Permissive,
            &[(9000, MtlsMode::Disable)],
        );
        let (mode, ports) = inbound_mtls(&b, &[mesh.clone(), ns.clone()]);
        assert_eq!(mode, MtlsMode::Permissive);
        assert!(ports.is_empty(), "port-level needs a selector");
        let wl = pa(
            "genesis",
            Some("b"),
            MtlsMode::Strict,
            &[(9000, MtlsMode::Permissive)],
        );
        let (mode, ports) = inbound_mtls(&b, &[mesh, ns, wl.clone()]);
        assert_eq!(mode, MtlsMode::Strict);
        assert_eq!(ports[&9000], MtlsMode::Permissive);
        let other = pod(&[("app", "c")]);
        assert_eq!(inbound_mtls(&other, &[wl]).0, MtlsMode::Permissive);
    }

    #[test]
    fn parses_peer_authentication() {
        let v: serde_json::Value = serde_yaml_ng::from_str(
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b, namespace: genesis}
spec:
  selector: {matchLabels: {app: b}}
  mtls: {mode: STRICT}
  portLevelMtls: {"9000": {mode: PERMISSIVE}}
"#,
        )
        .expect("yaml");
        let p = PeerAuth::from_value(&v).expect("valid");
        assert_eq!(p.mode, Some(MtlsMode::Strict));
        assert_eq!(p.ports[&9000], MtlsMode::Permissive);
        let mut bad = v.clone();
        bad["spec"]["mtls"]["mode"] = "STRICTER".into();
        assert!(
            PeerAuth::from_value(&bad)
                .expect_err("bad mode")
                .to_string()
                .contains("STRICTER")
        );
    }
}
