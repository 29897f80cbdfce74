//! The mesh config: what the injector adds and with which defaults.
//!
//! A YAML file (`--mesh-config FILE`; in a cluster the `mesh.yaml` key of the ConfigMap
//! `weft-mesh` in `weft-system`, mounted as a file). Every field has a default, so an empty file
//! is a valid config. Unknown fields are reported (see [`MeshConfig::unknown_fields`]) and
//! ignored; a value that does not parse or validate is an error.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use weft_api::bootstrap::{DEFAULT_CA_AUDIENCE, PORT_CONTROL_PLANE, PORT_STATUS};
use weft_api::redirect::InterceptionMode;

use crate::inject::annotations::{parse_log_level, validate_quantity};

/// Registry and repository of the proxy image; the tag is the crate version.
pub const DEFAULT_PROXY_IMAGE_REPO: &str = "ghcr.io/weft-mesh/weft-proxy";
/// Registry and repository of the init (redirector) image; the tag is the crate version.
pub const DEFAULT_INIT_IMAGE_REPO: &str = "ghcr.io/weft-mesh/weft-redirector";
/// Name of the ConfigMap holding the mesh root certificate, in every meshed namespace.
pub const DEFAULT_ROOT_CERT_CONFIG_MAP: &str = "weft-ca-root-cert";
/// Service through which proxies reach the control plane.
pub const DEFAULT_CONTROL_PLANE_SERVICE: &str = "weft-control-plane.weft-system.svc";

/// Errors loading a mesh config.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The file could not be read.
    #[error("cannot read mesh config {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not parse or a field has the wrong type.
    #[error("mesh config field {path}: {message}")]
    Parse {
        /// Path of the field (`.` for the whole document).
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A field parsed but its value is not acceptable.
    #[error("mesh config field {field}: {message}")]
    Invalid {
        /// The field, as written in YAML.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Whether the proxy is injected as a Kubernetes native sidecar (an init container with
/// `restartPolicy: Always`, Kubernetes ≥ 1.29) or as a regular container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NativeSidecar {
    /// Native where the API server supports it (≥ 1.29); native when no cluster is known
    /// (`inject -f`, the local node, tests).
    #[default]
    Auto,
    /// Always native.
    Enabled,
    /// Always a regular container.
    Disabled,
}

impl NativeSidecar {
    /// Resolves the mode given what is known of the cluster: `Some(supported)` when the API
    /// server's version is known, `None` when there is no cluster.
    pub fn resolve(self, cluster_supports_native: Option<bool>) -> bool {
        match self {
            NativeSidecar::Enabled => true,
            NativeSidecar::Disabled => false,
            NativeSidecar::Auto => cluster_supports_native.unwrap_or(true),
        }
    }
}

impl fmt::Display for NativeSidecar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NativeSidecar::Auto => "auto",
            NativeSidecar::Enabled => "true",
            NativeSidecar::Disabled => "false",
        })
    }
}

impl Serialize for NativeSidecar {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NativeSidecar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(NativeSidecar::Enabled),
            Raw::Bool(false) => Ok(NativeSidecar::Disabled),
            Raw::Str(s) => match s.to_ascii_lowercase().as_str() {
                "auto" => Ok(NativeSidecar::Auto),
                "true" => Ok(NativeSidecar::Enabled),
                "false" => Ok(NativeSidecar::Disabled),
                _ => Err(serde::de::Error::custom(format!(
                    "nativeSidecar must be auto, true or false, not {s:?}"
                ))),
            },
        }
    }
}

/// The mesh config. Field names are camelCase in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshConfig {
    /// Image of the `weft-proxy` sidecar (entrypoint `weft-proxy`).
    pub proxy_image: String,
    /// Image of the `weft-init` init container (entrypoint `weft-redirector`).
    pub init_image: String,
    /// `imagePullPolicy` of both injected containers; unset leaves Kubernetes' default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// `host:port` of the control plane's TLS port (CA and discovery).
    pub control_plane_address: String,
    /// Trust domain of workload identities.
    pub trust_domain: String,
    /// `auto`, `true` or `false`; per pod `sidecar.istio.io/nativeSidecar` wins.
    pub native_sidecar: NativeSidecar,
    /// Start the app only once the proxy is ready (classic mode: proxy first plus a postStart
    /// hook that waits; native sidecars are always ordered by their startup probe).
    pub hold_application_until_proxy_starts: bool,
    /// How long the proxy drains on SIGTERM (`5s`).
    #[serde(with = "duration_text")]
    pub termination_drain_duration: Duration,
    /// How long the classic-mode postStart hook waits for the proxy to become ready.
    #[serde(with = "duration_text")]
    pub proxy_ready_timeout: Duration,
    /// Istio's `protocolDetectionTimeout`: how long proxies wait for a client's first bytes
    /// on a port of undeclared protocol.
    #[serde(with = "duration_text")]
    pub protocol_detection_timeout: Duration,
    /// Audience of the projected service-account token the CA accepts.
    pub ca_audience: String,
    /// Lifetime of the projected token, seconds (Kubernetes minimum 600).
    pub token_expiration_seconds: i64,
    /// ConfigMap holding the mesh root certificate (`root-cert.pem`) in each namespace.
    pub root_cert_config_map: String,
    /// Default proxy log level (`info`, or a `tracing` filter).
    pub log_level: String,
    /// Default interception mode: `REDIRECT`, `EBPF` or `NONE`. `EBPF` is injected only where
    /// the nodes' eBPF agents are ready, else `REDIRECT` (see [`crate::inject::mode`]).
    pub interception_mode: InterceptionMode,
    /// Port of the proxy's status server (app probes, merged metrics, `/quitquitquit`).
    pub status_port: u16,
    /// Resources of the proxy container when the pod sets none by annotation.
    pub default_resources: ResourceRequirements,
    /// Resources of the `weft-init` container.
    pub init_resources: ResourceRequirements,
    /// Rewrite app HTTP, TCP and gRPC probes to go through the proxy's status port.
    pub rewrite_app_probes: bool,
    /// Add `prometheus.io/*` annotations pointing at the status port's merged metrics.
    pub enable_prometheus_merge: bool,
    /// Revision written in the `sidecar.istio.io/status` annotation.
    pub revision: String,
    /// Worker threads of every proxy. Unset: one, or from the proxy's CPU where the pod sets
    /// it; `0`: from the proxy's CPU (limit, else request), as Istio does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Extra environment variables of every proxy (Istio's `proxyMetadata`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub proxy_metadata: BTreeMap<String, String>,
    /// Top-level fields this version does not know: reported at load and ignored.
    #[serde(skip)]
    pub unknown: Vec<String>,
}

/// Every field name of [`MeshConfig`] as written in YAML.
pub const FIELDS: &[&str] = &[
    "proxyImage",
    "initImage",
    "imagePullPolicy",
    "controlPlaneAddress",
    "trustDomain",
    "nativeSidecar",
    "holdApplicationUntilProxyStarts",
    "terminationDrainDuration",
    "proxyReadyTimeout",
    "protocolDetectionTimeout",
    "caAudience",
    "tokenExpirationSeconds",
    "rootCertConfigMap",
    "logLevel",
    "interceptionMode",
    "statusPort",
    "defaultResources",
    "initResources",
    "rewriteAppProbes",
    "enablePrometheusMerge",
    "revision",
    "concurrency",
    "proxyMetadata",
];

fn resources(req: [(&str, &str); 2], lim: [(&str, &str); 2]) -> ResourceRequirements {
    let map = |kv: [(&str, &str); 2]| {
        Some(
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                .collect(),
        )
    };
    ResourceRequirements {
        requests: map(req),
        limits: map(lim),
        ..Default::default()
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION");
        Self {
            proxy_image: format!("{DEFAULT_PROXY_IMAGE_REPO}:{version}"),
            init_image: format!("{DEFAULT_INIT_IMAGE_REPO}:{version}"),
            image_pull_policy: None,
            control_plane_address: format!("{DEFAULT_CONTROL_PLANE_SERVICE}:{PORT_CONTROL_PLANE}"),
            trust_domain: "cluster.local".to_owned(),
            native_sidecar: NativeSidecar::Auto,
            hold_application_until_proxy_starts: true,
            termination_drain_duration: Duration::from_secs(5),
            proxy_ready_timeout: Duration::from_secs(120),
            protocol_detection_timeout: Duration::from_millis(
                weft_api::config::DEFAULT_PROTOCOL_DETECTION_TIMEOUT_MS,
            ),
            ca_audience: DEFAULT_CA_AUDIENCE.to_owned(),
            token_expiration_seconds: 43_200,
            root_cert_config_map: DEFAULT_ROOT_CERT_CONFIG_MAP.to_owned(),
            log_level: "info".to_owned(),
            interception_mode: InterceptionMode::Redirect,
            status_port: PORT_STATUS,
            default_resources: resources(
                [("cpu", "100m"), ("memory", "128Mi")],
                [("cpu", "2"), ("memory", "1Gi")],
            ),
            init_resources: resources(
                [("cpu", "10m"), ("memory", "16Mi")],
                [("cpu", "100m"), ("memory", "64Mi")],
            ),
            rewrite_app_probes: true,
            enable_prometheus_merge: true,
            revision: "default".to_owned(),
            concurrency: None,
            proxy_metadata: BTreeMap::new(),
            unknown: Vec::new(),
        }
    }
}

impl MeshConfig {
    /// Parses and validates a mesh config. Empty text gives the defaults.
    pub fn from_yaml(text: &str) -> Result<MeshConfig, MeshError> {
        let mut config: MeshConfig = if text.trim().is_empty() {
            MeshConfig::default()
        } else {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| MeshError::Parse {
                path: e.path().to_string(),
                message: e.inner().to_string(),
            })?
        };
        // Serde ignores unknown fields; find them to tell the user.
        if let Ok(serde_yaml_ng::Value::Mapping(map)) = serde_yaml_ng::from_str(text) {
            config.unknown = map
                .keys()
                .map(|k| k.as_str().map_or_else(|| format!("{k:?}"), str::to_owned))
                .filter(|k| !FIELDS.contains(&k.as_str()))
                .collect();
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a mesh config file, and logs a warning for each unknown field.
    pub fn load(path: &Path) -> Result<MeshConfig, MeshError> {
        let text = std::fs::read_to_string(path).map_err(|source| MeshError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config = MeshConfig::from_yaml(&text)?;
        for field in config.unknown_fields() {
            tracing::warn!(field, path = %path.display(), "unknown mesh config field ignored");
        }
        Ok(config)
    }

    /// Top-level fields of the file that this version does not know.
    pub fn unknown_fields(&self) -> impl Iterator<Item = &str> {
        self.unknown.iter().map(String::as_str)
    }

    /// Checks the values serde could not check.
    pub fn validate(&self) -> Result<(), MeshError> {
        let invalid = |field, message: String| Err(MeshError::Invalid { field, message });
        if self.proxy_image.trim().is_empty() {
            return invalid("proxyImage", "must not be empty".into());
        }
        if self.init_image.trim().is_empty() {
            return invalid("initImage", "must not be empty".into());
        }
        if let Some(p) = &self.image_pull_policy
            && !matches!(p.as_str(), "Always" | "IfNotPresent" | "Never")
        {
            return invalid(
                "imagePullPolicy",
                format!("{p:?} is not Always, IfNotPresent or Never"),
            );
        }
        if let Err(message) = validate_host_port(&self.control_plane_address) {
            return invalid("controlPlaneAddress", message);
        }
        if self.trust_domain.is_empty() || self.trust_domain.contains(['/', ':', ' ']) {
            return invalid(
                "trustDomain",
                format!("{:?} is not a trust domain", self.trust_domain),
            );
        }
        if self.ca_audience.trim().is_empty() {
            return invalid("caAudience", "must not be empty".into());
        }
        if self.token_expiration_seconds < 600 {
            return invalid(
                "tokenExpirationSeconds",
                format!(
                    "{} is below Kubernetes' minimum of 600",
                    self.token_expiration_seconds
                ),
            );
        }
        if self.root_cert_config_map.trim().is_empty() {
            return invalid("rootCertConfigMap", "must not be empty".into());
        }
        if let Err(e) = parse_log_level(&self.log_level) {
            return invalid("logLevel", e);
        }
        if self.proxy_ready_timeout.is_zero() {
            return invalid("proxyReadyTimeout", "must be more than 0s".into());
        }
        for (field, res) in [
            ("defaultResources", &self.default_resources),
            ("initResources", &self.init_resources),
        ] {
            for (kind, map) in [("requests", &res.requests), ("limits", &res.limits)] {
                for (name, q) in map.iter().flatten() {
                    if let Err(e) = validate_quantity(&q.0) {
                        return invalid(field, format!("{kind}.{name}: {e}"));
                    }
                }
            }
        }
        if self.concurrency.is_some_and(|n| n > 64) {
            return invalid(
                "concurrency",
                "must be at most 64 (0: from the proxy's CPU, as in Istio)".into(),
            );
        }
        Ok(())
    }
}

/// Checks `host:port` with a non-zero port.
pub(crate) fn validate_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} is not host:port"));
    };
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(format!("{s:?} has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{s:?} has no valid port (1-65535)")),
    }
}

/// Durations written as humantime text (`5s`, `500ms`, `1m 30s`).
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_default() {
        let c = MeshConfig::from_yaml("").expect("empty");
        assert_eq!(c, MeshConfig::default());
        assert!(c.proxy_image.ends_with(env!("CARGO_PKG_VERSION")));
        assert_eq!(
            c.control_plane_address,
            "weft-control-plane.weft-system.svc:15012"
        );
    }

    #[test]
    fn fields_and_unknown_fields() {
        let c = MeshConfig::from_yaml(
            "proxyImage: example/proxy:1\nnativeSidecar: false\nterminationDrainDuration: 20s\nfrobnicate: 3\n",
        )
        .expect("parses");
        assert_eq!(c.proxy_image, "example/proxy:1");
        assert_eq!(c.native_sidecar, NativeSidecar::Disabled);
        assert_eq!(c.termination_drain_duration, Duration::from_secs(20));
        assert_eq!(c.unknown_fields().collect::<Vec<_>>(), ["frobnicate"]);
        let c = MeshConfig::from_yaml("nativeSidecar: auto").expect("auto");
        assert!(c.native_sidecar.resolve(None));
        assert!(!c.native_sidecar.resolve(Some(false)));
    }

    #[test]
    fn field_list_is_complete() {
        let full = MeshConfig {
            image_pull_policy: Some("Always".into()),
            concurrency: Some(2),
            proxy_metadata: BTreeMap::from([("A".into(), "b".into())]),
            ..MeshConfig::default()
        };
        let value = serde_yaml_ng::to_value(&full).expect("serialize");
        let serde_yaml_ng::Value::Mapping(map) = value else {
            panic!("mapping")
        };
        let keys: Vec<&str> = map.keys().filter_map(|k| k.as_str()).collect();
        assert_eq!(keys, FIELDS);
        let back = MeshConfig::from_yaml(&serde_yaml_ng::to_string(&full).expect("yaml"))
            .expect("roundtrip");
        assert_eq!(back, full);
    }

    #[test]
    fn concurrency_zero_is_istios_and_too_many_is_an_error() {
        let m = MeshConfig::from_yaml("concurrency: 0\n").expect("0 is valid");
        assert_eq!(m.concurrency, Some(0));
        let e = MeshConfig::from_yaml("concurrency: 65\n").expect_err("too many");
        assert!(e.to_string().contains("concurrency"), "{e}");
    }

    #[test]
    fn bad_values_are_errors() {
        for (yaml, field) in [
            ("controlPlaneAddress: nowhere", "controlPlaneAddress"),
            ("terminationDrainDuration: soon", "terminationDrainDuration"),
            ("interceptionMode: TPROXY", "TPROXY"),
            ("nativeSidecar: maybe", "nativeSidecar"),
            ("logLevel: loud", "logLevel"),
            ("tokenExpirationSeconds: 60", "tokenExpirationSeconds"),
            (
                "defaultResources: {requests: {cpu: lots}}",
                "defaultResources",
            ),
        ] {
            let e = MeshConfig::from_yaml(yaml).expect_err(yaml).to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }
}
