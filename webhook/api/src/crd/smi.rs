//! `split.smi-spec.io`: TrafficSplit (SMI v1alpha2, v1alpha3, v1alpha4).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group.
pub const GROUP: &str = "split.smi-spec.io";

/// Splits traffic for a root service between backend services (`TrafficSplit`).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "split.smi-spec.io",
    version = "v1alpha4",
    kind = "TrafficSplit",
    plural = "trafficsplits",
    shortname = "ts",
    namespaced,
    derive = "PartialEq",
    derive = "Default",
    doc = "TrafficSplit allows users to incrementally direct percentages of traffic between various services.",
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.service"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSplitSpec {
    /// The root service clients address (FQDN or short name).
    pub service: String,
    /// Backend services and their weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<TrafficSplitBackend>,
    /// Route groups (e.g. HTTPRouteGroup) restricting the split (v1alpha3+).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TrafficSplitMatch>,
}

/// A backend of a split (`TrafficSplitBackend`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSplitBackend {
    /// Backend service name.
    pub service: String,
    /// Relative weight.
    pub weight: i64,
}

/// A route group the split applies to (`TypedLocalObjectReference`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSplitMatch {
    /// Kind, e.g. `HTTPRouteGroup`.
    pub kind: String,
    /// Name.
    pub name: String,
    /// API group, `specs.smi-spec.io` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
}
