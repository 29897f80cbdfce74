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
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
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
    /// Cluster carrying this port's traffic when no route says otherwise; defaults to
    /// [`Cluster::outbound_name`] of the port and the service host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// HTTP routes (VirtualService `http`, HTTPRoute, GRPCRoute, TrafficSplit), in order:
    /// the first route with a matching [`HttpMatch`] wins. A request no route matches is
    /// answered 404 when routes exist; with no routes everything goes to `cluster`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_routes: Vec<HttpRoute>,
    /// TCP and TLS routes (VirtualService `tcp` and `tls`), first match wins; with no routes
    /// (or none matching) the connection goes to `cluster`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_routes: Vec<TcpRoute>,
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
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
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
    /// How requests are spread over the endpoints.
    #[serde(default, skip_serializing_if = "is_default")]
    pub load_balancer: LoadBalancer,
    /// Connection and request limits (circuit breaking).
    #[serde(default, skip_serializing_if = "is_default")]
    pub connection_pool: ConnectionPool,
    /// Ejection of misbehaving endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Bound on retries towards this cluster, as a share of its active requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// DestinationRule `trafficPolicy.loadBalancer`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// The policy.
    #[serde(default)]
    pub policy: LbPolicy,
    /// Consistent hashing; when set it replaces `policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
    /// New endpoints ramp up their share of traffic over this long (slow start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ms: Option<u64>,
}

/// `loadBalancer.simple`. The default is Istio's: `LEAST_REQUEST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    /// Weighted round robin.
    RoundRobin,
    /// Power of two choices on live load (in-flight requests, latency EWMA); Istio's default
    /// when a DestinationRule names no policy (or `UNSPECIFIED`).
    #[default]
    LeastRequest,
    /// Uniformly random.
    Random,
    /// To the original destination address, as the client meant it.
    Passthrough,
}

/// `loadBalancer.consistentHash`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    /// What is hashed.
    pub key: HashKey,
    /// Ring hash or Maglev.
    #[serde(default)]
    pub algorithm: HashAlgorithm,
}

/// The hashed request attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum HashKey {
    /// A request header.
    Header(String),
    /// A cookie; generated with this path and TTL when the request has none.
    Cookie {
        /// Cookie name.
        name: String,
        /// Path of a generated cookie.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        /// Lifetime of a generated cookie; absent: a session cookie.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
    },
    /// The client's address.
    SourceIp,
    /// A query parameter.
    QueryParameter(String),
}

/// Consistent hashing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum HashAlgorithm {
    /// Ketama ring with at least this many entries.
    Ring {
        /// Minimum ring size (Envoy's default 1024).
        min_ring_size: u32,
    },
    /// Maglev with this (prime) table size (default 65537).
    Maglev {
        /// Table size.
        table_size: u32,
    },
}

impl Default for HashAlgorithm {
    fn default() -> Self {
        HashAlgorithm::Ring {
            min_ring_size: 1024,
        }
    }
}

/// DestinationRule `trafficPolicy.connectionPool`. Absent limits are unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: connections to the cluster, all endpoints together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// `tcp.tcpKeepalive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: concurrent requests to the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: concurrent retries to the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// `http.idleTimeout`: idle upstream connections close after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
}

/// TCP keepalive settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpKeepalive {
    /// Idle time before probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    /// Between probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Probes before the connection is dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u32>,
}

/// DestinationRule `trafficPolicy.outlierDetection`, with Istio's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx (and connect failures) before ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx_errors: Option<u32>,
    /// Consecutive 502/503/504 (and connect failures) before ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are reconsidered.
    #[serde(default = "default_outlier_interval")]
    pub interval_ms: u64,
    /// Ejection time; the n-th ejection of an endpoint lasts n times this.
    #[serde(default = "default_base_ejection")]
    pub base_ejection_time_ms: u64,
    /// At most this share of endpoints is ejected at once.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, nothing is ejected.
    #[serde(default)]
    pub min_health_percent: u32,
}

fn default_outlier_interval() -> u64 {
    10_000
}
fn default_base_ejection() -> u64 {
    30_000
}
fn default_max_ejection_percent() -> u32 {
    10
}

/// Envoy's retry budget: retries in flight stay under `percent` of active requests (at
/// least `min_concurrency`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Share of active requests, percent.
    pub percent: f64,
    /// Retries always allowed concurrently.
    pub min_concurrency: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: 20.0,
            min_concurrency: 3,
        }
    }
}

/// One HTTP route: matches, then what to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// Name, for logs and metrics.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Any of these matches the request; empty matches everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    /// What happens to a matching request.
    pub action: HttpAction,
    /// Header changes on the request (after the destination's).
    #[serde(default, skip_serializing_if = "is_default")]
    pub request_headers: HeaderOps,
    /// Header changes on the response.
    #[serde(default, skip_serializing_if = "is_default")]
    pub response_headers: HeaderOps,
    /// Fault injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// CORS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsPolicy>,
}

/// A request match: every given condition must hold.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    /// Path (without query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    /// Method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// Host / `:authority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// Headers (`headers` and `withoutHeaders`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Query parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryMatch>,
    /// Compare `uri` case-insensitively.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    /// The port the client connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Istio's `StringMatch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with (Istio's `prefix`: plain text, `/api` matches `/apiary`).
    Prefix(String),
    /// Starts with whole `/`-separated segments (Gateway API `PathPrefix`): `/old` matches
    /// `/old`, `/old/` and `/old/x` but not `/oldish`; a trailing `/` in the prefix is ignored,
    /// so `/` matches every path. A prefix rewrite of such a match follows the Gateway API's
    /// `ReplacePrefixMatch` rules (no doubled or dropped `/`).
    SegmentPrefix(String),
    /// RE2 regex matching the whole value.
    Regex(String),
}

/// A header condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Lower-case name.
    pub name: String,
    /// The value condition; absent: the header must be present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<StringMatch>,
    /// Negated (`withoutHeaders`): the request must not match.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

/// A query parameter condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryMatch {
    /// Parameter name.
    pub name: String,
    /// The value condition; absent: the parameter must be present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<StringMatch>,
}

/// What a route does with a matching request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HttpAction {
    /// Forward to weighted clusters.
    Forward(Forward),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with a fixed response.
    DirectResponse(DirectResponse),
}

/// Forwarding.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Forward {
    /// Clusters with relative weights (a canary split when several).
    pub destinations: Vec<WeightedCluster>,
    /// Path and authority rewrites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Whole-request timeout, including retries; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    /// Shadow copies (fire and forget).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
}

/// A destination of a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedCluster {
    /// Cluster name.
    pub cluster: String,
    /// Relative weight.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Header changes on requests sent here.
    #[serde(default, skip_serializing_if = "is_default")]
    pub request_headers: HeaderOps,
    /// Header changes on responses from here.
    #[serde(default, skip_serializing_if = "is_default")]
    pub response_headers: HeaderOps,
}

/// Header manipulation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOps {
    /// Replace (or add) these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Append these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Remove these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Istio's `HTTPRewrite` / Gateway API's `URLRewrite`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    /// Replaces the part of the path the route's `uri` match matched (the whole path for an
    /// exact or regex match): as text after a `prefix` match, by Gateway API
    /// `ReplacePrefixMatch` rules after a `segmentPrefix` match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Regex rewrite of the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex: Option<RegexRewrite>,
    /// Replaces Host / `:authority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// `uriRegexRewrite`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegexRewrite {
    /// RE2 pattern.
    pub pattern: String,
    /// Replacement, with `\1` style groups.
    pub rewrite: String,
}

/// `HTTPRedirect`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// New path (replacing the whole path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Replaces the matched prefix of the path (Gateway API `ReplacePrefixMatch`, as
    /// [`Rewrite::uri`] does); the whole path when the route matched no prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// New authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// New scheme.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// New port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Status code (301 by default).
    #[serde(default = "default_redirect_code")]
    pub code: u16,
}

fn default_redirect_code() -> u16 {
    301
}

/// `HTTPDirectResponse`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectResponse {
    /// Status code.
    pub status: u16,
    /// Body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// `HTTPRetry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try (Istio's `attempts`).
    pub attempts: u32,
    /// Timeout of each try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    /// Envoy's conditions: `5xx`, `gateway-error`, `reset`, `connect-failure`,
    /// `retriable-4xx`, `refused-stream`, `retriable-status-codes`, and the gRPC ones
    /// `cancelled`, `deadline-exceeded`, `resource-exhausted`, `unavailable`.
    #[serde(default)]
    pub retry_on: Vec<String>,
    /// Codes for `retriable-status-codes` (numbers in `retryOn`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
}

/// `HTTPFaultInjection`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// Delay before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer with an error instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// A delay fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// Delay.
    pub fixed_delay_ms: u64,
    /// Share of requests delayed, percent.
    #[serde(default = "hundred")]
    pub percentage: f64,
}

/// An abort fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// HTTP status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// gRPC status name (`UNAVAILABLE`) or number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// Share of requests aborted, percent.
    #[serde(default = "hundred")]
    pub percentage: f64,
}

fn hundred() -> f64 {
    100.0
}

/// A shadow destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// Cluster receiving copies.
    pub cluster: String,
    /// Share of requests copied, percent.
    #[serde(default = "hundred")]
    pub percentage: f64,
}

/// `CorsPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicy {
    /// Allowed origins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<StringMatch>,
    /// Allowed methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// Allowed request headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    /// Headers the browser may read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// Preflight cache time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_secs: Option<u64>,
    /// `Access-Control-Allow-Credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
}

/// A TCP or TLS route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    /// Any of these; empty matches every connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TcpMatch>,
    /// Clusters with relative weights.
    pub destinations: Vec<WeightedCluster>,
}

/// A connection match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpMatch {
    /// Port the client connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// SNI of the app's TLS ClientHello (`*.example.com` wildcards).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
    /// The original destination is in one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<ipnet::IpNet>,
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
    /// SNI for SIMPLE / MUTUAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// PEM of the CAs trusted for SIMPLE / MUTUAL (path or inline PEM); absent: the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    /// Client certificate chain (MUTUAL), path or inline PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    /// Client key (MUTUAL), path or inline PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// Names the server certificate must carry (DNS or URI SAN); empty: the SNI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// Skip server verification (DestinationRule `insecureSkipVerify`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
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
    /// TLS to a server outside the mesh (DestinationRule `SIMPLE`).
    Simple,
    /// Mutual TLS with the given client certificate (DestinationRule `MUTUAL`).
    Mutual,
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
    /// Parses a snapshot from YAML or JSON text. Enums are single-key maps in both
    /// (`{exact: jason}`, `{forward: {...}}`); errors name the offending field.
    pub fn from_yaml(text: &str) -> Result<Snapshot, ConfigError> {
        let value: serde_json::Value = serde_yaml_ng::from_str(text).map_err(|e| {
            ConfigError::new(
                e.location()
                    .map(|l| format!("line {} column {}", l.line(), l.column()))
                    .unwrap_or_else(|| "document".into()),
                e.to_string(),
            )
        })?;
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::new(
                if path == "." { "snapshot".into() } else { path },
                e.inner().to_string(),
            )
        })
    }

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
                for (k, r) in p.http_routes.iter().enumerate() {
                    let field = format!("{field}.httpRoutes[{k}]");
                    let destinations: &[WeightedCluster] = match &r.action {
                        HttpAction::Forward(f) => {
                            if f.destinations.is_empty() {
                                return Err(ConfigError::new(
                                    format!("{field}.action.forward.destinations"),
                                    "is empty",
                                ));
                            }
                            for (m, mirror) in f.mirrors.iter().enumerate() {
                                if !clusters.contains(mirror.cluster.as_str()) {
                                    return Err(ConfigError::new(
                                        format!("{field}.action.forward.mirrors[{m}].cluster"),
                                        format!("no cluster named {:?}", mirror.cluster),
                                    ));
                                }
                            }
                            &f.destinations
                        }
                        _ => &[],
                    };
                    for (d, dest) in destinations.iter().enumerate() {
                        if !clusters.contains(dest.cluster.as_str()) {
                            return Err(ConfigError::new(
                                format!("{field}.action.forward.destinations[{d}].cluster"),
                                format!("no cluster named {:?}", dest.cluster),
                            ));
                        }
                    }
                }
                for (k, r) in p.tcp_routes.iter().enumerate() {
                    for (d, dest) in r.destinations.iter().enumerate() {
                        if !clusters.contains(dest.cluster.as_str()) {
                            return Err(ConfigError::new(
                                format!("{field}.tcpRoutes[{k}].destinations[{d}].cluster"),
                                format!("no cluster named {:?}", dest.cluster),
                            ));
                        }
                    }
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
        Snapshot::from_yaml(
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
    fn routes_parse_and_validate() {
        let mut s = sample();
        let port: ServicePort = serde_json::from_value(
            serde_yaml_ng::from_str::<serde_json::Value>(
                r#"
port: 8080
protocol: http
httpRoutes:
- name: v2-for-testers
  matches: [{headers: [{name: end-user, value: {exact: jason}}]}]
  action:
    forward:
      destinations: [{cluster: "outbound|8080||service-b.genesis.svc.cluster.local", weight: 90}]
      retries: {attempts: 3, perTryTimeoutMs: 200, retryOn: [5xx, connect-failure]}
      timeoutMs: 1000
- action: {redirect: {uri: /new, code: 302}}
- action: {directResponse: {status: 503, body: down}}
"#,
            )
            .expect("yaml"),
        )
        .expect("routes parse");
        assert_eq!(port.http_routes.len(), 3);
        assert!(matches!(&port.http_routes[1].action, HttpAction::Redirect(r) if r.code == 302));
        s.services[0].ports = vec![port];
        s.validate().expect("valid");
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<Snapshot>(&json).expect("back"), s);
        if let HttpAction::Forward(f) = &mut s.services[0].ports[0].http_routes[0].action {
            f.destinations[0].cluster = "nowhere".into();
        }
        assert_eq!(
            s.validate().expect_err("dangling").field,
            "services[0].ports[0].httpRoutes[0].action.forward.destinations[0].cluster"
        );
    }

    #[test]
    fn struct_variant_fields_are_camel_case() {
        let lb: LoadBalancer = serde_json::from_str(
            r#"{"consistentHash": {"key": {"cookie": {"name": "s", "ttlMs": 1000}}, "algorithm": {"maglev": {"tableSize": 65537}}}}"#,
        )
        .expect("camelCase fields");
        let ch = lb.consistent_hash.expect("hash");
        assert_eq!(ch.algorithm, HashAlgorithm::Maglev { table_size: 65537 });
        assert!(matches!(
            ch.key,
            HashKey::Cookie {
                ttl_ms: Some(1000),
                ..
            }
        ));
        let json = serde_json::to_string(&HashAlgorithm::default()).expect("json");
        assert_eq!(json, r#"{"ring":{"minRingSize":1024}}"#);
    }

    #[test]
    fn segment_prefix_and_default_load_balancer() {
        let m: HttpMatch =
            serde_json::from_str(r#"{"uri": {"segmentPrefix": "/old"}}"#).expect("parses");
        assert_eq!(m.uri, Some(StringMatch::SegmentPrefix("/old".into())));
        assert_eq!(
            serde_json::to_string(&m).expect("json"),
            r#"{"uri":{"segmentPrefix":"/old"}}"#
        );
        assert_eq!(
            LbPolicy::default(),
            LbPolicy::LeastRequest,
            "Istio's default"
        );
        let c: Cluster = serde_json::from_str(r#"{"name": "c"}"#).expect("parses");
        assert_eq!(c.load_balancer.policy, LbPolicy::LeastRequest);
        let rr: Cluster =
            serde_json::from_str(r#"{"name": "c", "loadBalancer": {"policy": "ROUND_ROBIN"}}"#)
                .expect("parses");
        assert!(
            serde_json::to_string(&rr)
                .expect("json")
                .contains("ROUND_ROBIN"),
            "a non-default policy is written out"
        );
    }

    #[test]
    fn yaml_errors_name_the_field() {
        let e = Snapshot::from_yaml("services: [{hostname: x, ports: [{port: 99999}]}]")
            .expect_err("port out of range");
        assert_eq!(e.field, "services[0].ports[0].port", "{e}");
        let e = Snapshot::from_yaml("services: {").expect_err("not yaml");
        assert!(e.field.starts_with("line "), "{e}");
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
