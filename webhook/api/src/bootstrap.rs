//! What a proxy is started with: the environment the injector sets on the `weft-proxy`
//! container. Everything else (certificates, config) the proxy obtains from the control plane
//! with these.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Pod name (downward API `metadata.name`).
pub const ENV_POD_NAME: &str = "POD_NAME";
/// Pod namespace (downward API `metadata.namespace`).
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
/// Pod IP (downward API `status.podIP`).
pub const ENV_INSTANCE_IP: &str = "INSTANCE_IP";
/// Service account (downward API `spec.serviceAccountName`).
pub const ENV_SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
/// Node name (downward API `spec.nodeName`).
pub const ENV_NODE_NAME: &str = "NODE_NAME";
/// `host:port` of the control plane's TLS port (CA and discovery).
pub const ENV_CONTROL_PLANE: &str = "WEFT_CONTROL_PLANE";
/// Trust domain of workload identities.
pub const ENV_TRUST_DOMAIN: &str = "WEFT_TRUST_DOMAIN";
/// JSON list of the app containers' ports ([`AppPort`]).
pub const ENV_APP_PORTS: &str = "WEFT_APP_PORTS";
/// Comma-separated names of the app containers.
pub const ENV_APP_CONTAINERS: &str = "WEFT_APP_CONTAINERS";
/// JSON [`AppProbes`]: the rewritten-probe table.
pub const ENV_APP_PROBES: &str = "WEFT_APP_PROBES";
/// How long the proxy drains on SIGTERM (`5s`, `500ms`).
pub const ENV_DRAIN_DURATION: &str = "WEFT_DRAIN_DURATION";
/// Path of the projected service-account token presented to the CA.
pub const ENV_TOKEN_PATH: &str = "WEFT_TOKEN_PATH";
/// Path of the mesh root certificate(s) (PEM).
pub const ENV_ROOT_CERT_PATH: &str = "WEFT_ROOT_CERT";
/// Directory, in memory, where the proxy keeps its key and certificate.
pub const ENV_CREDENTIALS_DIR: &str = "WEFT_CREDENTIALS_DIR";
/// Port of the status server (app probes, merged metrics, `/quitquitquit`); `0` disables it.
pub const ENV_STATUS_PORT: &str = "WEFT_STATUS_PORT";
/// Worker threads of the proxy: unset, one; `0`, one per CPU (Istio's `concurrency: 0`).
pub const ENV_CONCURRENCY: &str = "WEFT_CONCURRENCY";
/// `tracing` filter, e.g. `info` or `weft_proxy=debug`.
pub const ENV_LOG_LEVEL: &str = "WEFT_LOG_LEVEL";
/// `json` for machine-readable logs.
pub const ENV_LOG_FORMAT: &str = "LOG_FORMAT";

/// Default audience of the projected token the CA accepts.
pub const DEFAULT_CA_AUDIENCE: &str = "weft-ca";
/// Default token path inside the proxy container.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/weft-token";
/// Default root certificate path inside the proxy container.
pub const DEFAULT_ROOT_CERT_PATH: &str = "/var/run/weft/root/root-cert.pem";
/// Default credentials directory inside the proxy container.
pub const DEFAULT_CREDENTIALS_DIR: &str = "/var/run/weft/credentials";

/// Outbound capture port.
pub const PORT_OUTBOUND: u16 = 15001;
/// Inbound capture port.
pub const PORT_INBOUND: u16 = 15006;
/// Admin port (localhost only).
pub const PORT_ADMIN: u16 = 15000;
/// Status port: app probes, merged metrics, `/quitquitquit`.
pub const PORT_STATUS: u16 = 15020;
/// Readiness: `GET /healthz/ready`.
pub const PORT_READINESS: u16 = 15021;
/// Prometheus: `GET /stats/prometheus`.
pub const PORT_PROMETHEUS: u16 = 15090;
/// Control plane: CA and discovery over TLS.
pub const PORT_CONTROL_PLANE: u16 = 15012;
/// UID and GID the proxy runs as; redirection exempts them.
pub const PROXY_UID: u32 = 1337;

/// Readiness path (on [`PORT_READINESS`] and the status port).
pub const PATH_READY: &str = "/healthz/ready";
/// Prometheus path (on [`PORT_PROMETHEUS`] and the status port).
pub const PATH_METRICS: &str = "/stats/prometheus";
/// `POST` here on the status port makes the proxy drain and exit (Jobs in classic mode).
pub const PATH_QUIT: &str = "/quitquitquit";
/// Prefix of the rewritten app probes on the status port.
pub const PATH_APP_HEALTH_PREFIX: &str = "/app-health/";
/// `weft-proxy` with no subcommand runs the sidecar; `weft-proxy wait` blocks until the proxy
/// beside it is ready (the classic-mode postStart hook).
pub const PROXY_WAIT_SUBCOMMAND: &str = "wait";
/// JSON [`AppMetrics`]: where the app's own Prometheus metrics are, merged into the status
/// port's `/stats/prometheus` (Istio's `ISTIO_PROMETHEUS_ANNOTATIONS`).
pub const ENV_APP_METRICS: &str = "WEFT_APP_METRICS";

/// The status-port path of a rewritten probe: `kind` is `livez`, `readyz` or `startupz`.
pub fn app_health_path(container: &str, kind: &str) -> String {
    format!("{PATH_APP_HEALTH_PREFIX}{container}/{kind}")
}

/// The app's own metrics endpoint, from its original `prometheus.io/*` annotations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppMetrics {
    /// Port on localhost.
    pub port: u16,
    /// Path, default `/metrics`.
    #[serde(default = "default_metrics_path")]
    pub path: String,
}

fn default_metrics_path() -> String {
    "/metrics".to_owned()
}

/// A container port of the app, as passed in [`ENV_APP_PORTS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppPort {
    /// Port name, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Container port.
    pub container_port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    #[serde(default = "default_port_protocol")]
    pub protocol: String,
}

fn default_port_protocol() -> String {
    "TCP".to_owned()
}

/// Rewritten probes: status-port path (`/app-health/<container>/<livez|readyz|startupz>`) to
/// the original probe, which the proxy runs against the app over localhost.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// The original probe, with named ports already resolved to numbers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    /// HTTP GET probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetProbe>,
    /// TCP connect probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpProbe>,
    /// gRPC health probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcProbe>,
    /// Timeout of one probe, seconds (Kubernetes default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

/// An HTTP GET probe.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGetProbe {
    /// Path, default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Port.
    pub port: u16,
    /// Host header; the probe always connects to localhost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `HTTP` or `HTTPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Extra headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<ProbeHeader>,
}

/// A header of an HTTP probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeHeader {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A TCP probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpProbe {
    /// Port.
    pub port: u16,
}

/// A gRPC health-check probe (`grpc.health.v1.Health/Check`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcProbe {
    /// Port.
    pub port: u16,
    /// Service name sent in the health request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}
