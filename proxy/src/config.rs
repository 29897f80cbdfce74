//! Runtime settings of the proxy process: every environment variable it reads, its default,
//! parsing and validation. The mesh config itself (services, endpoints, policy) is not here:
//! it arrives as a `weft_api::config::Snapshot` (see [`crate::snapshot`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use weft_api::bootstrap::{self as boot, AppMetrics, AppProbes};

/// How long in-flight requests may take to finish after SIGTERM (Istio's
/// `terminationDrainDuration`).
pub const ENV_DRAIN_DURATION: &str = boot::ENV_DRAIN_DURATION;
/// Default drain duration.
pub const DEFAULT_DRAIN_DURATION: Duration = Duration::from_secs(5);
/// Worker threads.
pub const ENV_CONCURRENCY: &str = boot::ENV_CONCURRENCY;
/// Default worker threads: one, on a current-thread runtime. Istio's sidecars default to 2;
/// measured with `cargo xtask bench` (1000 rps, 2 vCPUs), one worker adds 6-18% less latency
/// at p50 and spends 17-24% less CPU than two, since no request hops between threads. A pod
/// that needs more sets `concurrency` in `proxy.istio.io/config`.
pub const DEFAULT_CONCURRENCY: usize = 1;
/// Timeout of a connect to an upstream or to the app.
pub const ENV_CONNECT_TIMEOUT: &str = "WEFT_CONNECT_TIMEOUT";
/// Default connect timeout (Istio's `connectTimeout` default).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a config file given with `--config` is checked for changes.
pub const ENV_CONFIG_POLL_INTERVAL: &str = "WEFT_CONFIG_POLL_INTERVAL";
/// Default config poll interval.
pub const DEFAULT_CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Status port (app probes, merged metrics, `/quitquitquit`).
pub const ENV_STATUS_PORT: &str = boot::ENV_STATUS_PORT;

/// Where the proxy's listeners bind. Fixed ports, as Istio's, so tools and habits carry over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    /// Outbound capture.
    pub outbound: u16,
    /// Inbound capture.
    pub inbound: u16,
    /// Admin, on localhost only.
    pub admin: u16,
    /// App probes, merged metrics, `/quitquitquit`.
    pub status: u16,
    /// Readiness.
    pub readiness: u16,
    /// Prometheus.
    pub prometheus: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            outbound: boot::PORT_OUTBOUND,
            inbound: boot::PORT_INBOUND,
            admin: boot::PORT_ADMIN,
            status: boot::PORT_STATUS,
            readiness: boot::PORT_READINESS,
            prometheus: boot::PORT_PROMETHEUS,
        }
    }
}

impl Ports {
    /// Every port the proxy itself listens on.
    pub fn all(&self) -> [u16; 6] {
        [
            self.outbound,
            self.inbound,
            self.admin,
            self.status,
            self.readiness,
            self.prometheus,
        ]
    }
}

/// The workload the proxy runs beside, from the downward API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// `POD_NAME`.
    pub name: String,
    /// `POD_NAMESPACE`.
    pub namespace: String,
    /// `SERVICE_ACCOUNT`.
    pub service_account: String,
    /// `INSTANCE_IP`.
    pub ip: Option<IpAddr>,
    /// `NODE_NAME`.
    pub node: String,
}

/// Everything the process needs besides the mesh config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Static config file (`--config`); the control plane is used when absent.
    pub config_file: Option<PathBuf>,
    /// Listener ports.
    pub ports: Ports,
    /// Drain deadline on SIGTERM.
    pub drain_duration: Duration,
    /// Worker threads.
    pub concurrency: usize,
    /// Connect timeout towards upstreams and the app.
    pub connect_timeout: Duration,
    /// Poll interval of the config file.
    pub config_poll_interval: Duration,
    /// The pod.
    pub pod: PodInfo,
    /// Rewritten app probes served on the status port.
    pub app_probes: AppProbes,
    /// The app's own metrics endpoint, merged into the status port's metrics.
    pub app_metrics: Option<AppMetrics>,
    /// Control plane address (`host:port`).
    pub control_plane: Option<String>,
    /// Trust domain the proxy expects its identity in.
    pub trust_domain: Option<String>,
    /// Projected token presented to the CA.
    pub token_path: PathBuf,
    /// Mesh root certificate used to trust the control plane.
    pub root_cert_path: PathBuf,
    /// Where the key and certificate are kept.
    pub credentials_dir: PathBuf,
}

/// A setting that does not parse; the message names the variable and the value.
#[derive(Debug, thiserror::Error)]
#[error("{name}={value:?}: {reason}")]
pub struct SettingsError {
    name: &'static str,
    value: String,
    reason: String,
}

impl Settings {
    /// Reads the settings from the process environment.
    pub fn from_env(config_file: Option<PathBuf>) -> Result<Self, SettingsError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::from_source(config_file, |k| env.get(k).cloned())
    }

    /// Reads the settings from any source of strings (tests pass a map).
    pub fn from_source(
        config_file: Option<PathBuf>,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingsError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let duration = |name: &'static str, default: Duration| match get(name) {
            None => Ok(default),
            Some(v) => humantime::parse_duration(v.trim()).map_err(|e| SettingsError {
                name,
                value: v.clone(),
                reason: e.to_string(),
            }),
        };
        let concurrency = match get(ENV_CONCURRENCY) {
            None => DEFAULT_CONCURRENCY,
            Some(v) => match v.trim().parse::<usize>() {
                // Istio's `concurrency: 0`: one worker per CPU.
                Ok(0) => std::thread::available_parallelism().map_or(1, |n| n.get().min(64)),
                Ok(n) if (1..=64).contains(&n) => n,
                _ => {
                    return Err(SettingsError {
                        name: ENV_CONCURRENCY,
                        value: v,
                        reason: "must be a number of threads between 1 and 64 (0: one per CPU)"
                            .into(),
                    });
                }
            },
        };
        let mut ports = Ports::default();
        if let Some(v) = get(ENV_STATUS_PORT) {
            ports.status = match v.trim().parse::<u16>() {
                Ok(p) => p,
                Err(_) => {
                    return Err(SettingsError {
                        name: ENV_STATUS_PORT,
                        value: v,
                        reason:
                            "must be a port between 1 and 65535, or 0 to disable the status server"
                                .into(),
                    });
                }
            };
        }
        let app_probes = match get(boot::ENV_APP_PROBES) {
            None => AppProbes::new(),
            Some(v) => serde_json::from_str(&v).map_err(|e| SettingsError {
                name: boot::ENV_APP_PROBES,
                value: v.clone(),
                reason: e.to_string(),
            })?,
        };
        let app_metrics = match get(boot::ENV_APP_METRICS) {
            None => None,
            Some(v) => Some(serde_json::from_str(&v).map_err(|e| SettingsError {
                name: boot::ENV_APP_METRICS,
                value: v.clone(),
                reason: e.to_string(),
            })?),
        };
        let ip = match get(boot::ENV_INSTANCE_IP) {
            None => None,
            Some(v) => Some(v.trim().parse::<IpAddr>().map_err(|e| SettingsError {
                name: boot::ENV_INSTANCE_IP,
                value: v.clone(),
                reason: e.to_string(),
            })?),
        };
        let path = |name: &str, default: &str| {
            PathBuf::from(get(name).unwrap_or_else(|| default.to_owned()))
        };
        Ok(Settings {
            config_file,
            ports,
            drain_duration: duration(ENV_DRAIN_DURATION, DEFAULT_DRAIN_DURATION)?,
            concurrency,
            connect_timeout: duration(ENV_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT)?,
            config_poll_interval: duration(ENV_CONFIG_POLL_INTERVAL, DEFAULT_CONFIG_POLL_INTERVAL)?,
            pod: PodInfo {
                name: get(boot::ENV_POD_NAME).unwrap_or_default(),
                namespace: get(boot::ENV_POD_NAMESPACE).unwrap_or_default(),
                service_account: get(boot::ENV_SERVICE_ACCOUNT).unwrap_or_default(),
                ip,
                node: get(boot::ENV_NODE_NAME).unwrap_or_default(),
            },
            app_probes,
            app_metrics,
            control_plane: get(boot::ENV_CONTROL_PLANE),
            trust_domain: get(boot::ENV_TRUST_DOMAIN),
            token_path: path(boot::ENV_TOKEN_PATH, boot::DEFAULT_TOKEN_PATH),
            root_cert_path: path(boot::ENV_ROOT_CERT_PATH, boot::DEFAULT_ROOT_CERT_PATH),
            credentials_dir: path(boot::ENV_CREDENTIALS_DIR, boot::DEFAULT_CREDENTIALS_DIR),
        })
    }

    /// Listen addresses for a capture port: IPv4 always, IPv6 when the namespace has it.
    pub fn capture_addrs(port: u16) -> [SocketAddr; 2] {
        [
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults() {
        let s = Settings::from_source(None, source(&[])).expect("defaults");
        assert_eq!(s.drain_duration, DEFAULT_DRAIN_DURATION);
        assert_eq!(s.concurrency, 1);
        assert_eq!(s.ports.status, 15020);
        assert!(s.app_probes.is_empty());
        assert_eq!(s.token_path, PathBuf::from(boot::DEFAULT_TOKEN_PATH));
    }

    #[test]
    fn parses_values() {
        let s = Settings::from_source(
            None,
            source(&[
                ("WEFT_DRAIN_DURATION", "750ms"),
                ("WEFT_CONCURRENCY", "3"),
                ("INSTANCE_IP", "10.44.0.3"),
                ("POD_NAMESPACE", "genesis"),
                (
                    "WEFT_APP_PROBES",
                    r#"{"/app-health/app/readyz":{"httpGet":{"path":"/ready","port":8080}}}"#,
                ),
            ]),
        )
        .expect("valid");
        assert_eq!(s.drain_duration, Duration::from_millis(750));
        assert_eq!(s.concurrency, 3);
        assert_eq!(s.pod.ip, Some("10.44.0.3".parse().expect("ip")));
        assert_eq!(s.pod.namespace, "genesis");
        assert_eq!(
            s.app_probes["/app-health/app/readyz"]
                .http_get
                .as_ref()
                .expect("http probe")
                .port,
            8080
        );
    }

    #[test]
    fn errors_name_the_variable() {
        let e = Settings::from_source(None, source(&[("WEFT_DRAIN_DURATION", "soon")]))
            .expect_err("bad duration");
        assert!(
            e.to_string().starts_with("WEFT_DRAIN_DURATION=\"soon\""),
            "{e}"
        );
        let s = Settings::from_source(
            None,
            source(&[("WEFT_CONCURRENCY", "0"), ("WEFT_STATUS_PORT", "0")]),
        )
        .expect("0 means one per CPU / disabled");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(64));
        assert_eq!((s.concurrency, s.ports.status), (cpus, 0));
        let e = Settings::from_source(None, source(&[("WEFT_CONCURRENCY", "65")]))
            .expect_err("bad concurrency");
        assert!(e.to_string().contains("WEFT_CONCURRENCY"), "{e}");
        let e =
            Settings::from_source(None, source(&[("WEFT_APP_PROBES", "{")])).expect_err("bad json");
        assert!(e.to_string().contains("WEFT_APP_PROBES"), "{e}");
    }
}
