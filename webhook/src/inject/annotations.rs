//! Istio's pod annotations and labels, read into the [`PodSettings`] of one injection.
//!
//! Every value is checked here; an invalid one denies the pod with a message that names the
//! annotation and quotes the value. The traffic annotations are parsed with `weft_api::redirect`'s
//! parsers so that what the injector accepts is what `weft-redirector init` accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, ResourceRequirements, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Deserialize;
use weft_api::redirect::{
    CidrSet, InitArgs, InterceptionMode, PortSet, parse_cidrs, parse_interfaces, parse_ports,
};

use super::Denial;
use crate::mesh::{MeshConfig, validate_host_port};

/// `sidecar.istio.io/inject` (label, and deprecated annotation).
pub const INJECT: &str = "sidecar.istio.io/inject";
/// Written by the injector: what it added (JSON).
pub const STATUS: &str = "sidecar.istio.io/status";
/// Per-pod override of the mesh's `nativeSidecar`.
pub const NATIVE_SIDECAR: &str = "sidecar.istio.io/nativeSidecar";
/// Proxy image override.
pub const PROXY_IMAGE: &str = "sidecar.istio.io/proxyImage";
/// Proxy CPU request.
pub const PROXY_CPU: &str = "sidecar.istio.io/proxyCPU";
/// Proxy memory request.
pub const PROXY_MEMORY: &str = "sidecar.istio.io/proxyMemory";
/// Proxy CPU limit.
pub const PROXY_CPU_LIMIT: &str = "sidecar.istio.io/proxyCPULimit";
/// Proxy memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "sidecar.istio.io/proxyMemoryLimit";
/// Proxy log level.
pub const LOG_LEVEL: &str = "sidecar.istio.io/logLevel";
/// `REDIRECT`, `EBPF` or `NONE` (`TPROXY` is denied).
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
/// Extra volumes for the proxy (JSON).
pub const USER_VOLUME: &str = "sidecar.istio.io/userVolume";
/// Extra mounts on the proxy (JSON).
pub const USER_VOLUME_MOUNT: &str = "sidecar.istio.io/userVolumeMount";
/// `false` keeps the app's probes as they are.
pub const REWRITE_PROBES: &str = "sidecar.istio.io/rewriteAppHTTPProbers";
/// Status port of the proxy.
pub const STATUS_PORT: &str = "status.sidecar.istio.io/port";
/// Per-pod proxy config (YAML or JSON).
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
/// Readiness probe tuning of the proxy.
pub const READINESS_INITIAL_DELAY: &str = "readiness.status.sidecar.istio.io/initialDelaySeconds";
/// Readiness probe tuning of the proxy.
pub const READINESS_PERIOD: &str = "readiness.status.sidecar.istio.io/periodSeconds";
/// Readiness probe tuning of the proxy.
pub const READINESS_FAILURE_THRESHOLD: &str = "readiness.status.sidecar.istio.io/failureThreshold";
/// Outbound destinations redirected to the proxy.
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
/// Outbound destinations never redirected.
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// Inbound ports redirected.
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
/// Inbound ports never redirected.
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
/// Outbound ports always redirected.
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
/// Outbound ports never redirected.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// Interfaces never redirected.
pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";

/// Istio annotations Weft knows and does not implement, with the reason given to the user as an
/// admission warning when a pod carries one.
pub const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "sidecar.istio.io/bootstrapOverride",
        "Weft's proxy is not Envoy and has no bootstrap file",
    ),
    (
        "sidecar.istio.io/discoveryAddress",
        "deprecated in Istio; set discoveryAddress in proxy.istio.io/config",
    ),
    (
        "sidecar.istio.io/proxyImageType",
        "Weft publishes one image type; use sidecar.istio.io/proxyImage",
    ),
    (
        "sidecar.istio.io/componentLogLevel",
        "Envoy component levels do not exist in Weft; use sidecar.istio.io/logLevel with a tracing filter",
    ),
    (
        "sidecar.istio.io/agentLogLevel",
        "Weft has no separate agent; sidecar.istio.io/logLevel covers the whole proxy",
    ),
    (
        "sidecar.istio.io/statsInclusionPrefixes",
        "Envoy stats filters do not apply to Weft's metrics",
    ),
    (
        "sidecar.istio.io/statsInclusionSuffixes",
        "Envoy stats filters do not apply to Weft's metrics",
    ),
    (
        "sidecar.istio.io/statsInclusionRegexps",
        "Envoy stats filters do not apply to Weft's metrics",
    ),
    (
        "sidecar.istio.io/statsHistogramBuckets",
        "Weft's metric buckets are fixed",
    ),
    (
        "sidecar.istio.io/statsFlushInterval",
        "Weft's metrics are pulled, not pushed",
    ),
    (
        "sidecar.istio.io/statsEvictionInterval",
        "Weft's metrics are pulled, not pushed",
    ),
    (
        "sidecar.istio.io/statsHistogramBins",
        "Weft's metric buckets are fixed",
    ),
    (
        "sidecar.istio.io/statsCompression",
        "Weft's metrics endpoint does not compress",
    ),
    (
        "sidecar.istio.io/extraStatTags",
        "Istio's Wasm telemetry tags do not apply to Weft",
    ),
    (
        "readiness.status.sidecar.istio.io/applicationPorts",
        "Weft's readiness does not wait for app ports",
    ),
    (
        "traffic.sidecar.istio.io/kubevirtInterfaces",
        "deprecated in Istio; KubeVirt rerouting is not implemented",
    ),
    (
        "inject.istio.io/templates",
        "Weft has one injection template, the sidecar",
    ),
    (
        "prometheus.istio.io/merge-metrics",
        "use enablePrometheusMerge in the mesh config",
    ),
    (
        "istio.io/rev",
        "Weft runs one control-plane revision; sidecar.istio.io/status records it",
    ),
    (
        "istio.io/reroute-virtual-interfaces",
        "treating a virtual interface's inbound traffic as outbound (KubeVirt, docker-in-docker) \
         is not implemented",
    ),
    (
        "proxy.istio.io/overrides",
        "written by Istio's injector; Weft takes overrides from a container named weft-proxy or \
         istio-proxy",
    ),
    (
        "ambient.istio.io/redirection",
        "Weft has no ambient mode; the pod is meshed with a sidecar",
    ),
    (
        "ambient.istio.io/bypass-inbound-capture",
        "Weft has no ambient mode; traffic.sidecar.istio.io/includeInboundPorts: \"\" captures \
         outbound traffic only",
    ),
    (
        "ambient.istio.io/dns-capture",
        "Weft has no ambient mode and does not proxy DNS",
    ),
];

/// Everything one injection needs from the pod's annotations and the mesh config.
#[derive(Debug, Clone)]
pub struct PodSettings {
    /// Arguments of `weft-redirector init` (proxy UID/GID filled in once the proxy is built).
    pub init_args: InitArgs,
    /// Inject as a native sidecar.
    pub native: bool,
    /// Start the app only once the proxy is ready.
    pub hold: bool,
    /// `terminationDrainDuration`.
    pub drain: Duration,
    /// Proxy resources.
    pub resources: ResourceRequirements,
    /// Proxy log filter.
    pub log_level: String,
    /// Status port (0: none).
    pub status_port: u16,
    /// Proxy image.
    pub proxy_image: String,
    /// Control plane address.
    pub control_plane: String,
    /// Proxy worker threads.
    pub concurrency: Option<u32>,
    /// Extra proxy environment (mesh `proxyMetadata`, then the pod's).
    pub proxy_env: BTreeMap<String, String>,
    /// `sidecar.istio.io/userVolume`.
    pub user_volumes: Vec<Volume>,
    /// `sidecar.istio.io/userVolumeMount`.
    pub user_volume_mounts: Vec<VolumeMount>,
    /// Rewrite app probes.
    pub rewrite_probes: bool,
    /// Proxy readiness probe: initial delay, period, failure threshold.
    pub readiness: (Option<i32>, i32, i32),
    /// Messages for the user about annotations that were ignored.
    pub warnings: Vec<String>,
}

/// Why a pod is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Inject.
    Inject,
    /// `sidecar.istio.io/inject` says no, as a label.
    OptedOutByLabel,
    /// `sidecar.istio.io/inject` says no, as an annotation.
    OptedOutByAnnotation,
}

/// Parses a boolean the way Istio reads `sidecar.istio.io/inject` (YAML 1.1 booleans).
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" | "true" | "on" => Some(true),
        "n" | "no" | "false" | "off" => Some(false),
        _ => None,
    }
}

/// Reads `sidecar.istio.io/inject`: the label wins over the annotation.
pub fn decision(pod: &Pod) -> Result<Decision, Denial> {
    let meta = &pod.metadata;
    if let Some(v) = meta.labels.as_ref().and_then(|l| l.get(INJECT)) {
        return match parse_bool(v) {
            Some(true) => Ok(Decision::Inject),
            Some(false) => Ok(Decision::OptedOutByLabel),
            None => Err(Denial::label(INJECT, v, "expected true or false")),
        };
    }
    if let Some(v) = meta.annotations.as_ref().and_then(|a| a.get(INJECT)) {
        return match parse_bool(v) {
            Some(true) => Ok(Decision::Inject),
            Some(false) => Ok(Decision::OptedOutByAnnotation),
            None => Err(Denial::annotation(INJECT, v, "expected true or false")),
        };
    }
    Ok(Decision::Inject)
}

/// Checks a Kubernetes resource quantity (`100m`, `1.5Gi`, `2`, `1e3`).
pub fn validate_quantity(s: &str) -> Result<(), String> {
    let bad = || Err(format!("{s:?} is not a resource quantity"));
    let t = s.trim();
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    let digits_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(digits_end);
    if number.is_empty()
        || number == "."
        || number.matches('.').count() > 1
        || !number.chars().any(|c| c.is_ascii_digit())
    {
        return bad();
    }
    let ok = match suffix {
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T"
        | "P" | "E" => true,
        exp => exp
            .strip_prefix(['e', 'E'])
            .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
            .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())),
    };
    if ok { Ok(()) } else { bad() }
}

/// Turns Istio's log level names (`trace`, `debug`, `info`, `warning`, `error`, `critical`,
/// `off`) into a `tracing` level; also accepts a `tracing` filter such as
/// `info,weft_proxy::inbound=debug`.
pub fn parse_log_level(s: &str) -> Result<String, String> {
    fn level(l: &str) -> Option<&'static str> {
        Some(match l.to_ascii_lowercase().as_str() {
            "trace" => "trace",
            "debug" => "debug",
            "info" => "info",
            "warn" | "warning" => "warn",
            "error" | "critical" => "error",
            "off" => "off",
            _ => return None,
        })
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let directive = match part.split_once('=') {
            None => level(part).map(str::to_owned),
            Some((target, l)) => {
                let target_ok = !target.is_empty()
                    && target
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'));
                level(l)
                    .filter(|_| target_ok)
                    .map(|l| format!("{target}={l}"))
            }
        };
        match directive {
            Some(d) => out.push(d),
            None => {
                return Err(format!(
                    "{s:?} is not a log level (trace, debug, info, warning, error, critical, off) \
                     or a filter like info,weft_proxy=debug"
                ));
            }
        }
    }
    Ok(out.join(","))
}

/// Parses a duration as Istio writes them (`5s`, `1.5s`, `500ms`, `1m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(d) = humantime::parse_duration(t) {
        return Ok(d);
    }
    t.strip_suffix('s')
        .and_then(|n| n.parse::<f64>().ok())
        .filter(|n| n.is_finite() && *n >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a duration (like 5s or 500ms)"))
}

/// The part of Istio's `ProxyConfig` that Weft honours in `proxy.istio.io/config`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyConfigAnnotation {
    hold_application_until_proxy_starts: Option<bool>,
    termination_drain_duration: Option<String>,
    concurrency: Option<u32>,
    discovery_address: Option<String>,
    #[serde(default)]
    proxy_metadata: BTreeMap<String, String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

/// Reads the pod's annotations against the mesh config.
pub fn settings(
    pod: &Pod,
    mesh: &MeshConfig,
    cluster_supports_native: Option<bool>,
) -> Result<PodSettings, Denial> {
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let get = |name: &str| ann.get(name).map(String::as_str);
    let mut warnings = Vec::new();

    for (name, why) in UNSUPPORTED {
        if ann.contains_key(*name) {
            warnings.push(format!(
                "{name} is not supported by Weft and was ignored: {why}"
            ));
        }
    }

    // Traffic capture.
    let mut init_args = InitArgs {
        mode: mesh.interception_mode,
        ..InitArgs::default()
    };
    if let Some(v) = get(INTERCEPTION_MODE) {
        init_args.mode = if v.trim().eq_ignore_ascii_case("TPROXY") {
            return Err(Denial::annotation(
                INTERCEPTION_MODE,
                v,
                "TPROXY is not supported by Weft (it needs the proxy to keep client source \
                 addresses); use REDIRECT or EBPF",
            ));
        } else {
            v.parse::<InterceptionMode>()
                .map_err(|e| Denial::annotation(INTERCEPTION_MODE, v, e))?
        };
    }
    if let Some(v) = get(INCLUDE_OUTBOUND_IP_RANGES) {
        init_args.include_outbound_cidrs =
            CidrSet::parse(v).map_err(|e| Denial::annotation(INCLUDE_OUTBOUND_IP_RANGES, v, e))?;
    }
    if let Some(v) = get(EXCLUDE_OUTBOUND_IP_RANGES) {
        init_args.exclude_outbound_cidrs =
            parse_cidrs(v).map_err(|e| Denial::annotation(EXCLUDE_OUTBOUND_IP_RANGES, v, e))?;
    }
    if let Some(v) = get(INCLUDE_INBOUND_PORTS) {
        init_args.include_inbound_ports =
            PortSet::parse(v).map_err(|e| Denial::annotation(INCLUDE_INBOUND_PORTS, v, e))?;
    }
    let status_port = match get(STATUS_PORT) {
        None => mesh.status_port,
        Some(v) => v.trim().parse::<u16>().map_err(|_| {
            Denial::annotation(STATUS_PORT, v, "not a port (0-65535, 0: no status port)")
        })?,
    };
    if status_port != 0 {
        init_args.exclude_inbound_ports.push(status_port);
    }
    if let Some(v) = get(EXCLUDE_INBOUND_PORTS) {
        init_args
            .exclude_inbound_ports
            .extend(parse_ports(v).map_err(|e| Denial::annotation(EXCLUDE_INBOUND_PORTS, v, e))?);
    }
    dedup(&mut init_args.exclude_inbound_ports);
    if let Some(v) = get(INCLUDE_OUTBOUND_PORTS) {
        init_args.include_outbound_ports =
            parse_ports(v).map_err(|e| Denial::annotation(INCLUDE_OUTBOUND_PORTS, v, e))?;
    }
    if let Some(v) = get(EXCLUDE_OUTBOUND_PORTS) {
        init_args.exclude_outbound_ports =
            parse_ports(v).map_err(|e| Denial::annotation(EXCLUDE_OUTBOUND_PORTS, v, e))?;
    }
    if let Some(v) = get(EXCLUDE_INTERFACES) {
        init_args.exclude_interfaces =
            parse_interfaces(v).map_err(|e| Denial::annotation(EXCLUDE_INTERFACES, v, e))?;
    }

    // Start order.
    let native = match get(NATIVE_SIDECAR) {
        None => mesh.native_sidecar.resolve(cluster_supports_native),
        Some(v) => parse_bool(v)
            .ok_or_else(|| Denial::annotation(NATIVE_SIDECAR, v, "expected true or false"))?,
    };
    let mut hold = mesh.hold_application_until_proxy_starts;
    let mut drain = mesh.termination_drain_duration;
    let mut concurrency = mesh.concurrency;
    let mut control_plane = mesh.control_plane_address.clone();
    let mut proxy_env = mesh.proxy_metadata.clone();
    if let Some(v) = get(PROXY_CONFIG) {
        let pc: ProxyConfigAnnotation = if v.trim().is_empty() {
            ProxyConfigAnnotation::default()
        } else {
            serde_yaml_ng::from_str(v).map_err(|e| {
                Denial::annotation(PROXY_CONFIG, v, format!("not a valid proxy config: {e}"))
            })?
        };
        if let Some(h) = pc.hold_application_until_proxy_starts {
            hold = h;
        }
        if let Some(d) = &pc.termination_drain_duration {
            drain = parse_duration(d).map_err(|e| {
                Denial::annotation(PROXY_CONFIG, v, format!("terminationDrainDuration: {e}"))
            })?;
        }
        // Istio's 0 means "one per CPU"; the proxy reads it so.
        if pc.concurrency.is_some() {
            concurrency = pc.concurrency;
        }
        if let Some(addr) = &pc.discovery_address {
            validate_host_port(addr).map_err(|e| {
                Denial::annotation(PROXY_CONFIG, v, format!("discoveryAddress: {e}"))
            })?;
            control_plane = addr.clone();
        }
        proxy_env.extend(pc.proxy_metadata);
        for field in pc.other.keys() {
            warnings.push(format!(
                "{PROXY_CONFIG}: field {field} is not supported by Weft and was ignored"
            ));
        }
    }
    if let Some(grace) = pod
        .spec
        .as_ref()
        .map(|s| s.termination_grace_period_seconds.unwrap_or(30))
        && drain.as_secs_f64() >= grace as f64
    {
        warnings.push(format!(
            "terminationDrainDuration {} is not shorter than terminationGracePeriodSeconds {grace}: \
             the proxy will be killed while draining",
            humantime::format_duration(drain)
        ));
    }

    // Proxy container.
    let resources = resources(ann, mesh)?;
    // Istio sizes the proxy's workers from its CPU: with `concurrency: 0`, or unset when the
    // pod sets the proxy's CPU by annotation, one per core of the limit (else the request),
    // rounded up (2500m: 3). Weft's own default stays one worker, whatever the mesh's default
    // resources; a `0` with no CPU known is left to the proxy (one worker per CPU).
    let pod_sets_cpu = ann.contains_key(PROXY_CPU_LIMIT) || ann.contains_key(PROXY_CPU);
    if concurrency == Some(0) || (concurrency.is_none() && pod_sets_cpu) {
        let cpu = |m: &Option<BTreeMap<String, Quantity>>| {
            m.as_ref()
                .and_then(|m| m.get("cpu"))
                .and_then(|q| cores(&q.0))
        };
        if let Some(n) = cpu(&resources.limits).or_else(|| cpu(&resources.requests)) {
            concurrency = Some(n);
        }
    }
    let log_level = match get(LOG_LEVEL) {
        None => parse_log_level(&mesh.log_level).unwrap_or_else(|_| mesh.log_level.clone()),
        Some(v) => parse_log_level(v).map_err(|e| Denial::annotation(LOG_LEVEL, v, e))?,
    };
    let proxy_image = match get(PROXY_IMAGE) {
        None => mesh.proxy_image.clone(),
        Some(v) if v.trim().is_empty() || v.contains(char::is_whitespace) => {
            return Err(Denial::annotation(PROXY_IMAGE, v, "not an image reference"));
        }
        Some(v) => v.to_owned(),
    };
    let rewrite_probes = match get(REWRITE_PROBES) {
        None => mesh.rewrite_app_probes,
        Some(v) => parse_bool(v)
            .ok_or_else(|| Denial::annotation(REWRITE_PROBES, v, "expected true or false"))?,
    };
    let int = |name: &str, default: Option<i32>, min: i32| -> Result<Option<i32>, Denial> {
        match get(name) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<i32>() {
                Ok(n) if n >= min => Ok(Some(n)),
                _ => Err(Denial::annotation(
                    name,
                    v,
                    format!("expected a whole number of at least {min}"),
                )),
            },
        }
    };
    let readiness = (
        int(READINESS_INITIAL_DELAY, None, 0)?,
        int(READINESS_PERIOD, Some(15), 1)?.unwrap_or(15),
        int(READINESS_FAILURE_THRESHOLD, Some(4), 1)?.unwrap_or(4),
    );

    let (user_volumes, user_volume_mounts) = user_volumes(pod, ann)?;

    Ok(PodSettings {
        init_args,
        native,
        hold,
        drain,
        resources,
        log_level,
        status_port,
        proxy_image,
        control_plane,
        concurrency,
        proxy_env,
        user_volumes,
        user_volume_mounts,
        rewrite_probes,
        readiness,
        warnings,
    })
}

/// Whole cores a CPU quantity (`2`, `0.5`, `2500m`) amounts to, rounded up; `None` for a
/// quantity that is not a plain or milli amount.
fn cores(quantity: &str) -> Option<u32> {
    let q = quantity.trim();
    let millis: f64 = match q.strip_suffix('m') {
        Some(m) => m.parse().ok()?,
        None => q.parse::<f64>().ok()? * 1000.0,
    };
    (millis.is_finite() && millis > 0.0).then(|| ((millis / 1000.0).ceil() as u32).clamp(1, 64))
}

fn dedup(ports: &mut Vec<u16>) {
    let mut seen = BTreeSet::new();
    ports.retain(|p| seen.insert(*p));
}

/// Proxy resources: Istio's rule, the annotations replace the defaults as a whole when any is set.
fn resources(
    ann: &BTreeMap<String, String>,
    mesh: &MeshConfig,
) -> Result<ResourceRequirements, Denial> {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (name, is_limit, resource) in [
        (PROXY_CPU, false, "cpu"),
        (PROXY_MEMORY, false, "memory"),
        (PROXY_CPU_LIMIT, true, "cpu"),
        (PROXY_MEMORY_LIMIT, true, "memory"),
    ] {
        if let Some(v) = ann.get(name) {
            validate_quantity(v).map_err(|e| Denial::annotation(name, v, e))?;
            let map = if is_limit { &mut limits } else { &mut requests };
            map.insert(resource.to_owned(), Quantity(v.trim().to_owned()));
        }
    }
    if requests.is_empty() && limits.is_empty() {
        return Ok(mesh.default_resources.clone());
    }
    Ok(ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    })
}

/// Reads `userVolume` / `userVolumeMount`: a JSON array of volumes (mounts), or Istio's older
/// object form `{"name": {volume without name}}`.
fn user_volumes(
    pod: &Pod,
    ann: &BTreeMap<String, String>,
) -> Result<(Vec<Volume>, Vec<VolumeMount>), Denial> {
    fn named_list<T: serde::de::DeserializeOwned>(name: &str, v: &str) -> Result<Vec<T>, Denial> {
        let json: serde_json::Value = serde_json::from_str(v)
            .map_err(|e| Denial::annotation(name, v, format!("not valid JSON: {e}")))?;
        let items = match json {
            serde_json::Value::Array(items) => items,
            serde_json::Value::Object(map) => map
                .into_iter()
                .map(|(key, mut item)| {
                    if let Some(o) = item.as_object_mut() {
                        o.entry("name").or_insert(serde_json::Value::String(key));
                    }
                    item
                })
                .collect(),
            _ => {
                return Err(Denial::annotation(
                    name,
                    v,
                    "expected a JSON array or object",
                ));
            }
        };
        items
            .into_iter()
            .map(|i| {
                serde_json::from_value(i).map_err(|e| Denial::annotation(name, v, e.to_string()))
            })
            .collect()
    }
    let volumes: Vec<Volume> = match ann.get(USER_VOLUME) {
        None => Vec::new(),
        Some(v) => named_list(USER_VOLUME, v)?,
    };
    let mounts: Vec<VolumeMount> = match ann.get(USER_VOLUME_MOUNT) {
        None => Vec::new(),
        Some(v) => named_list(USER_VOLUME_MOUNT, v)?,
    };
    let pod_volumes: BTreeSet<&str> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .map(|v| v.name.as_str())
        .collect();
    for vol in &volumes {
        if pod_volumes.contains(vol.name.as_str()) || super::sidecar::is_weft_volume(&vol.name) {
            let v = ann.get(USER_VOLUME).map(String::as_str).unwrap_or_default();
            return Err(Denial::annotation(
                USER_VOLUME,
                v,
                format!("volume {:?} already exists in the pod", vol.name),
            ));
        }
    }
    for m in &mounts {
        let known = pod_volumes.contains(m.name.as_str())
            || volumes.iter().any(|v| v.name == m.name)
            || super::sidecar::is_weft_volume(&m.name);
        if !known || m.mount_path.trim().is_empty() {
            let v = ann
                .get(USER_VOLUME_MOUNT)
                .map(String::as_str)
                .unwrap_or_default();
            let why = if known {
                format!("mount of {:?} has no mountPath", m.name)
            } else {
                format!("no volume named {:?} in the pod or {USER_VOLUME}", m.name)
            };
            return Err(Denial::annotation(USER_VOLUME_MOUNT, v, why));
        }
    }
    Ok((volumes, mounts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in [
            "100m", "1", "1.5Gi", "2000", "1e3", "0.5", "+1", "128Mi", "1E", "4000m",
        ] {
            assert!(validate_quantity(ok).is_ok(), "{ok}");
        }
        for bad in ["", "abc", "1.2.3", "10 m", "1Zi", "m", ".", "1e"] {
            assert!(validate_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu_quantities_in_whole_cores() {
        for (q, n) in [
            ("2", 2),
            ("2500m", 3),
            ("0.5", 1),
            ("100m", 1),
            ("4000m", 4),
        ] {
            assert_eq!(cores(q), Some(n), "{q}");
        }
        for q in ["0", "0m", "1Gi", "abc", ""] {
            assert_eq!(cores(q), None, "{q}");
        }
        assert_eq!(cores("1000"), Some(64), "capped at the proxy's maximum");
    }

    #[test]
    fn concurrency_follows_istio_where_the_pod_sizes_the_proxy() {
        let with = |ann: &[(&str, &str)], mesh: &MeshConfig| {
            let mut pod = Pod::default();
            pod.metadata.annotations = Some(
                ann.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            );
            settings(&pod, mesh, Some(true)).expect("valid").concurrency
        };
        let mesh = MeshConfig::default();
        // Nothing set: Weft's default (one worker), not the mesh default resources' 2 CPUs.
        assert_eq!(with(&[], &mesh), None);
        assert_eq!(with(&[(PROXY_CPU_LIMIT, "2500m")], &mesh), Some(3));
        assert_eq!(with(&[(PROXY_CPU, "1500m")], &mesh), Some(2));
        // An explicit value wins over the CPU.
        let pc = |c: &str| format!("concurrency: {c}");
        assert_eq!(
            with(&[(PROXY_CPU_LIMIT, "4"), (PROXY_CONFIG, &pc("1"))], &mesh),
            Some(1)
        );
        // 0: from the proxy's CPU, the mesh default's limit when the pod sets none.
        assert_eq!(with(&[(PROXY_CONFIG, &pc("0"))], &mesh), Some(2));
        let bare = MeshConfig {
            default_resources: ResourceRequirements::default(),
            ..MeshConfig::default()
        };
        assert_eq!(
            with(&[(PROXY_CONFIG, &pc("0"))], &bare),
            Some(0),
            "one per CPU"
        );
        let pinned = MeshConfig {
            concurrency: Some(3),
            ..MeshConfig::default()
        };
        assert_eq!(with(&[(PROXY_CPU_LIMIT, "8")], &pinned), Some(3));
    }

    #[test]
    fn log_levels() {
        assert_eq!(parse_log_level("warning").as_deref(), Ok("warn"));
        assert_eq!(parse_log_level("critical").as_deref(), Ok("error"));
        assert_eq!(
            parse_log_level("info,weft_proxy::tls=debug").as_deref(),
            Ok("info,weft_proxy::tls=debug")
        );
        assert!(parse_log_level("loud").is_err());
        assert!(parse_log_level("a b=debug").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn bools() {
        assert_eq!(parse_bool("Yes"), Some(true));
        assert_eq!(parse_bool("off"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
