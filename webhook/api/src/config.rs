//! The config model: the compiled view of the mesh that one proxy consumes.
//!
//! The control plane computes one [`Snapshot`] per proxy (only what that workload needs) and
//! streams new versions; a static file in the same shape drives a proxy without a control
//! plane. Nothing here knows about Kubernetes. Durations are plain milliseconds so that the
//! JSON stays unambiguous; fields a newer control plane adds are ignored by older proxies.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The trust domain of SPIFFE identities when the mesh config names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// How long inbound and outbound listeners wait for a client's first bytes when the port's
/// protocol is not declared. After that the connection is treated as opaque TCP, so a
/// server-first protocol on an undeclared port waits this long once per connection.
pub const DEFAULT_PROTOCOL_DETECTION_TIMEOUT_MS: u64 = 500;

/// One versioned view of the mesh for one proxy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Version label; proxies acknowledge it and show it in `/config_dump`.
    #[serde(default)]
    pub version: String,
    /// The workload this view was computed for.
    #[serde(default)]
    pub workload: Workload,
    /// Mesh-wide settings.
    #[serde(default)]
    pub mesh: MeshSettings,
    /// Certificate files, for proxies run from a static file without a CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityFiles>,
    /// Services this workload may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Groups of endpoints that requests are balanced over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<Cluster>,
    /// How this workload accepts traffic.
    #[serde(default)]
    pub inbound: Inbound,
}

/// The workload a proxy runs beside.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Pod name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
    /// Service account, the `sa` part of the SPIFFE ID.
    #[serde(default)]
    pub service_account: String,
    /// Pod labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Workload {
    /// The SPIFFE ID of this workload in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        spiffe_id(trust_domain, &self.namespace, &self.service_account)
    }
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Settings that apply to the whole mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSettings {
    /// Trust domain of workload identities.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// What happens to connections for destinations the config does not know.
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// How long to wait for a client's first bytes on a port of undeclared protocol.
    #[serde(default = "default_detection_timeout")]
    pub protocol_detection_timeout_ms: u64,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            outbound_traffic_policy: OutboundTrafficPolicy::default(),
            protocol_detection_timeout_ms: DEFAULT_PROTOCOL_DETECTION_TIMEOUT_MS,
        }
    }
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}

fn default_detection_timeout() -> u64 {
    DEFAULT_PROTOCOL_DETECTION_TIMEOUT_MS
}

/// Istio's `outboundTrafficPolicy.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficPolicy {
    /// Unknown destinations pass through as plain TCP to the original destination.
    #[default]
    AllowAny,
    /// Unknown destinations are refused.
    RegistryOnly,
}

/// Paths of PEM files holding a workload's certificate chain, key and trusted roots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityFiles {
    /// Leaf certificate first, then intermediates.
    pub cert_chain: String,
    /// PKCS#8 or SEC1 private key.
    pub private_key: String,
    /// One or more trusted root certificates (several during a root rotation).
    pub root_cert: String,
}

/// The application protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Not declared: detected from the client's first bytes.
    #[default]
    Auto,
    /// HTTP/1.x (or HTTP/2 if the client speaks it).
    Http,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Opaque TCP, including server-first protocols: never waits for detection.
    Tcp,
    /// TLS originated by the application: forwarded as opaque bytes.
    Tls,
}

impl Protocol {
    /// Istio's protocol selection: `appProtocol` wins, else the port name's prefix before
    /// the first `-` (`http-web`, `grpc`, `tcp-db`, `mysql`). Unknown names mean [`Protocol::Auto`].
    pub fn from_port(name: &str, app_protocol: Option<&str>) -> Protocol {
        if let Some(p) = app_protocol.and_then(Self::from_name) {
            return p;
        }
        let prefix = name.split('-').next().unwrap_or_default();
        Self::from_name(prefix).unwrap_or(Protocol::Auto)
    }

    fn from_name(name: &str) -> Option<Protocol> {
        Some(match name.to_ascii_lowercase().as_str() {
            "http" | "grpc-web" | "kubernetes.io/ws" | "kubernetes.io/wss" => Protocol::Http,
            "http2" | "kubernetes.io/h2c" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "https" | "tls" => Protocol::Tls,
            "tcp" | "mysql" | "mongo" | "redis" | "smtp" | "postgres" | "postgresql" => {
                Protocol::Tcp
            }
            _ => return None,
        })
    }

    /// True for protocols the proxy handles as HTTP requests.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Auto => "auto",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
            Protocol::Tls => "tls",
        })
    }
}

/// A service this workload may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Fully qualified host name, e.g. `service-b.genesis.svc.cluster.local`.
    pub hostname: String,
    /// Namespace the service lives in.
    #[serde(default)]
    pub namespace: String,
    /// Virtual IPs (ClusterIPs). Connections to `vip:port` belong to this service.
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Service port.
    pub port: u16,
    /// Port name.
    #[serde(default)]
    pub name: String,
    /// Declared protocol; [`Protocol::Auto`] means detect.
    #[serde(default)]
    pub protocol: Protocol,
    /// Cluster carrying this port's traffic; defaults to [`Cluster::outbound_name`] of the
    /// port and the service host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

impl ServicePort {
    /// The cluster this port's traffic goes to.
    pub fn cluster_name(&self, hostname: &str) -> String {
        self.cluster
            .clone()
            .unwrap_or_else(|| Cluster::outbound_name(self.port, None, hostname))
    }
}

/// A group of endpoints (a service port, or a subset of one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    /// Unique name, conventionally `outbound|<port>|<subset>|<host>`.
    pub name: String,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// TLS towards the endpoints.
    #[serde(default)]
    pub tls: UpstreamTls,
    /// Connect timeout; the proxy's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
}

impl Cluster {
    /// Istio's cluster naming: `outbound|8080|v1|reviews.default.svc.cluster.local`.
    pub fn outbound_name(port: u16, subset: Option<&str>, hostname: &str) -> String {
        format!("outbound|{port}|{}|{hostname}", subset.unwrap_or_default())
    }
}

/// One endpoint of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Pod (or host) address.
    pub address: IpAddr,
    /// Target port.
    pub port: u16,
    /// SPIFFE ID the endpoint's certificate must carry. Absent: the endpoint has no
    /// sidecar and is reached in plaintext (Istio's auto mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Labels of the endpoint's workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Relative weight for load balancing.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// TLS a proxy originates towards a cluster's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTls {
    /// Mode.
    #[serde(default)]
    pub mode: UpstreamTlsMode,
}

/// Istio's `ClientTLSSettings.TLSmode`, plus the automatic default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UpstreamTlsMode {
    /// Mesh mTLS to endpoints that have an identity, plaintext to the others.
    #[default]
    Auto,
    /// Mesh mTLS to every endpoint; an endpoint without identity is an error.
    IstioMutual,
    /// Plaintext.
    Disable,
}

/// How a workload accepts traffic.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inbound {
    /// Workload-wide mTLS mode (PeerAuthentication `mtls.mode`).
    #[serde(default)]
    pub mtls: MtlsMode,
    /// Per-port settings (PeerAuthentication `portLevelMtls`, declared protocols).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<InboundPort>,
}

impl Inbound {
    /// The settings for one port: its own entry, else the workload-wide mode.
    pub fn port(&self, port: u16) -> (MtlsMode, Protocol) {
        match self.ports.iter().find(|p| p.port == port) {
            Some(p) => (p.mtls.unwrap_or(self.mtls), p.protocol),
            None => (self.mtls, Protocol::Auto),
        }
    }
}

/// Settings of one inbound port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundPort {
    /// Container port.
    pub port: u16,
    /// mTLS mode for this port; the workload-wide mode when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// Declared protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// PeerAuthentication's mutual TLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only mesh mTLS is accepted; plaintext is refused.
    Strict,
    /// Both mesh mTLS and plaintext are accepted.
    #[default]
    Permissive,
    /// mTLS is not terminated: everything is passed to the app as it came.
    Disable,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        })
    }
}

/// A snapshot that breaks the model's rules; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// Path of the offending field, e.g. `services[1].ports[0].port`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl Snapshot {
    /// Checks the rules serde cannot: unique names, references that resolve, ports in range,
    /// identities that are SPIFFE IDs. A proxy refuses a snapshot that fails and keeps its last
    /// good one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.mesh.trust_domain.is_empty() || self.mesh.trust_domain.contains('/') {
            return Err(ConfigError::new(
                "mesh.trustDomain",
                format!("{:?} is not a trust domain", self.mesh.trust_domain),
            ));
        }
        let mut clusters = BTreeSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            if c.name.is_empty() {
                return Err(ConfigError::new(format!("clusters[{i}].name"), "is empty"));
            }
            if !clusters.insert(c.name.as_str()) {
                return Err(ConfigError::new(
                    format!("clusters[{i}].name"),
                    format!("duplicate cluster {:?}", c.name),
                ));
            }
            for (j, e) in c.endpoints.iter().enumerate() {
                let field = format!("clusters[{i}].endpoints[{j}]");
                if e.port == 0 {
                    return Err(ConfigError::new(format!("{field}.port"), "must not be 0"));
                }
                if let Some(id) = &e.identity {
                    check_spiffe_id(id)
                        .map_err(|r| ConfigError::new(format!("{field}.identity"), r))?;
                }
                if c.tls.mode == UpstreamTlsMode::IstioMutual && e.identity.is_none() {
                    return Err(ConfigError::new(
                        format!("{field}.identity"),
                        "required: the cluster's tls mode is ISTIO_MUTUAL",
                    ));
                }
            }
        }
        let mut listeners = BTreeSet::new();
        for (i, s) in self.services.iter().enumerate() {
            if s.hostname.is_empty() {
                return Err(ConfigError::new(
                    format!("services[{i}].hostname"),
                    "is empty",
                ));
            }
            for (j, p) in s.ports.iter().enumerate() {
                let field = format!("services[{i}].ports[{j}]");
                if p.port == 0 {
                    return Err(ConfigError::new(format!("{field}.port"), "must not be 0"));
                }
                if let Some(cluster) = &p.cluster
                    && !clusters.contains(cluster.as_str())
                {
                    return Err(ConfigError::new(
                        format!("{field}.cluster"),
                        format!("no cluster named {cluster:?}"),
                    ));
                }
                for vip in &s.vips {
                    if !listeners.insert((*vip, p.port)) {
                        return Err(ConfigError::new(
                            format!("services[{i}].vips"),
                            format!("{vip}:{} is claimed by two services", p.port),
                        ));
                    }
                }
            }
        }
        let mut inbound = BTreeSet::new();
        for (i, p) in self.inbound.ports.iter().enumerate() {
            if p.port == 0 {
                return Err(ConfigError::new(
                    format!("inbound.ports[{i}].port"),
                    "must not be 0",
                ));
            }
            if !inbound.insert(p.port) {
                return Err(ConfigError::new(
                    format!("inbound.ports[{i}].port"),
                    format!("port {} listed twice", p.port),
                ));
            }
        }
        Ok(())
    }
}

/// Checks that `id` is `spiffe://<trust-domain>/<path>`.
pub fn check_spiffe_id(id: &str) -> Result<(), String> {
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("{id:?} is not a SPIFFE ID (spiffe://<trust-domain>/...)"))?;
    match rest.split_once('/') {
        Some((td, path)) if !td.is_empty() && !path.is_empty() => Ok(()),
        _ => Err(format!(
            "{id:?} is not a SPIFFE ID (spiffe://<trust-domain>/...)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        serde_yaml_ng::from_str(
            r#"
version: "1"
workload: {name: service-a, namespace: genesis, serviceAccount: service-a}
services:
- hostname: service-b.genesis.svc.cluster.local
  namespace: genesis
  vips: [10.96.0.10]
  ports: [{port: 8080, name: http, protocol: http}]
clusters:
- name: "outbound|8080||service-b.genesis.svc.cluster.local"
  endpoints:
  - {address: 10.44.0.3, port: 8080, identity: "spiffe://cluster.local/ns/genesis/sa/service-b"}
inbound:
  mtls: STRICT
  ports: [{port: 9000, mtls: PERMISSIVE, protocol: tcp}]
"#,
        )
        .expect("sample parses")
    }

    #[test]
    fn defaults_and_lookups() {
        let s = sample();
        s.validate().expect("sample is valid");
        assert_eq!(s.mesh.trust_domain, "cluster.local");
        assert_eq!(s.clusters[0].endpoints[0].weight, 1);
        assert_eq!(s.inbound.port(8080), (MtlsMode::Strict, Protocol::Auto));
        assert_eq!(s.inbound.port(9000), (MtlsMode::Permissive, Protocol::Tcp));
        assert_eq!(
            s.services[0].ports[0].cluster_name(&s.services[0].hostname),
            "outbound|8080||service-b.genesis.svc.cluster.local"
        );
        assert_eq!(
            s.workload.spiffe_id("cluster.local"),
            "spiffe://cluster.local/ns/genesis/sa/service-a"
        );
    }

    #[test]
    fn json_round_trip() {
        let s = sample();
        let json = serde_json::to_string(&s).expect("serialises");
        let back: Snapshot = serde_json::from_str(&json).expect("parses back");
        assert_eq!(s, back);
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = sample();
        s.clusters[0].endpoints[0].identity = Some("service-b".into());
        let e = s.validate().expect_err("bad identity");
        assert_eq!(e.field, "clusters[0].endpoints[0].identity");

        let mut s = sample();
        s.services[0].ports[0].cluster = Some("nope".into());
        assert_eq!(
            s.validate().expect_err("dangling ref").to_string(),
            "services[0].ports[0].cluster: no cluster named \"nope\""
        );

        let mut s = sample();
        s.clusters.push(s.clusters[0].clone());
        assert_eq!(s.validate().expect_err("dup").field, "clusters[1].name");

        let mut s = sample();
        s.services.push(s.services[0].clone());
        assert!(
            s.validate()
                .expect_err("dup vip")
                .reason
                .contains("claimed by two")
        );
    }

    #[test]
    fn protocol_from_port_names() {
        assert_eq!(Protocol::from_port("http-web", None), Protocol::Http);
        assert_eq!(Protocol::from_port("grpc", None), Protocol::Grpc);
        assert_eq!(Protocol::from_port("mysql", None), Protocol::Tcp);
        assert_eq!(Protocol::from_port("web", None), Protocol::Auto);
        assert_eq!(
            Protocol::from_port("tcp", Some("kubernetes.io/h2c")),
            Protocol::Http2
        );
        assert_eq!(Protocol::from_port("http", Some("unknown")), Protocol::Http);
    }
}
