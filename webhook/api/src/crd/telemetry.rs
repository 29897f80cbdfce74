//! `telemetry.istio.io`: Telemetry (istio/api `telemetry/v1alpha1/telemetry.proto`, served as
//! v1 and v1alpha1). The shape is complete enough to carry metrics, access logging and tracing
//! settings to the proxies.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{IstioStatus, PolicyTargetReference, WorkloadSelector};

/// The API group.
pub const GROUP: &str = "telemetry.istio.io";

/// Metrics, access logging and tracing for workloads (`Telemetry`).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "telemetry.istio.io",
    version = "v1",
    kind = "Telemetry",
    plural = "telemetries",
    shortname = "telemetry",
    category = "istio-io",
    category = "telemetry-istio-io",
    namespaced,
    status = "IstioStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Telemetry configuration for workloads.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// Workloads this applies to (exclusive with `targetRef(s)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Gateways or services this applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Tracing settings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tracing: Vec<Tracing>,
    /// Metrics settings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<Metrics>,
    /// Access logging settings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_logging: Vec<AccessLogging>,
}

/// Reference to a mesh-config extension provider (`ProviderRef`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderRef {
    /// Provider name, e.g. `prometheus`, `envoy`.
    pub name: String,
}

/// Which side of the traffic a setting applies to (`WorkloadMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkloadMode {
    /// Both sides.
    ClientAndServer,
    /// Outbound only.
    Client,
    /// Inbound only.
    Server,
}

/// Traffic side selector (`Tracing.TracingSelector`, `AccessLogging.LogSelector`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModeSelector {
    /// The side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<WorkloadMode>,
}

/// Tracing settings (`Tracing`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tracing {
    /// Side of the traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#match: Option<ModeSelector>,
    /// Tracing providers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderRef>,
    /// Sampling percentage (0..=100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_sampling_percentage: Option<f64>,
    /// Do not report spans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_span_reporting: Option<bool>,
    /// Do not propagate trace context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_context_propagation: Option<bool>,
    /// Extra span tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_tags: BTreeMap<String, CustomTag>,
    /// Sample by `x-request-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_request_id_for_trace_sampling: Option<bool>,
    /// Add Istio's standard tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_istio_tags: Option<bool>,
}

/// A span tag source; exactly one is set (`Tracing.CustomTag`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomTag {
    /// A fixed value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub literal: Option<LiteralTag>,
    /// An environment variable of the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<NamedTag>,
    /// A request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<NamedTag>,
    /// A formatter expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatter: Option<LiteralTag>,
}

/// A fixed tag value (`Tracing.Literal`, `Tracing.Formatter`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LiteralTag {
    /// The value.
    pub value: String,
}

/// A tag read from a named source (`Tracing.Environment`, `Tracing.RequestHeader`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamedTag {
    /// Variable or header name.
    pub name: String,
    /// Value when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_value: Option<String>,
}

/// Metrics settings (`Metrics`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    /// Metrics providers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderRef>,
    /// Per-metric overrides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<MetricsOverrides>,
    /// Reporting interval for TCP metrics (duration string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting_interval: Option<String>,
}

/// Istio's standard metrics (`MetricSelector.IstioMetric`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IstioMetric {
    /// Every metric.
    AllMetrics,
    /// `requests_total`.
    RequestCount,
    /// `request_duration_milliseconds`.
    RequestDuration,
    /// `request_bytes`.
    RequestSize,
    /// `response_bytes`.
    ResponseSize,
    /// `tcp_connections_opened_total`.
    TcpOpenedConnections,
    /// `tcp_connections_closed_total`.
    TcpClosedConnections,
    /// `tcp_sent_bytes_total`.
    TcpSentBytes,
    /// `tcp_received_bytes_total`.
    TcpReceivedBytes,
    /// `request_messages_total`.
    GrpcRequestMessages,
    /// `response_messages_total`.
    GrpcResponseMessages,
}

/// Which metrics an override applies to (`MetricSelector`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricSelector {
    /// A standard metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<IstioMetric>,
    /// A custom metric name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_metric: Option<String>,
    /// Side of the traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<WorkloadMode>,
}

/// Operation on a metric tag (`MetricsOverrides.TagOverride.Operation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TagOperation {
    /// Insert or replace the tag.
    Upsert,
    /// Remove the tag.
    Remove,
}

/// Change to one metric tag (`MetricsOverrides.TagOverride`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TagOverride {
    /// Operation (UPSERT by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<TagOperation>,
    /// CEL expression for the value (UPSERT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Per-metric override (`MetricsOverrides`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsOverrides {
    /// Which metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#match: Option<MetricSelector>,
    /// Disable them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// Tag changes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tag_overrides: BTreeMap<String, TagOverride>,
}

/// Access-log filter (`AccessLogging.Filter`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogFilter {
    /// CEL expression selecting the requests logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
}

/// Access logging settings (`AccessLogging`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogging {
    /// Side of the traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#match: Option<ModeSelector>,
    /// Logging providers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderRef>,
    /// Disable logging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// Which requests are logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<AccessLogFilter>,
}
