//! Rust types of the Istio, Gateway API and SMI resources Weft consumes.
//!
//! One spec type per resource, faithful to the upstream APIs (istio/api protos, the Gateway API
//! CRDs, SMI `split.smi-spec.io`): field names in camelCase, optional fields as `Option`, lists as
//! `Vec` (or `Option<Vec>` where an empty list means something different from none). Durations
//! stay strings (`"1.5s"`) and are parsed by [`crate::validate`]. Unknown fields are ignored
//! when parsing, as the API server prunes them anyway; the validator reports them.
//!
//! Each resource is served under every version upstream serves (for Istio networking `v1`,
//! `v1beta1`, `v1alpha3`); the schemas are identical, so one spec type is stamped under each
//! version of the generated CRD (see [`crds`]).
//!
//! - [`networking`][]: `networking.istio.io` (VirtualService, DestinationRule, Gateway,
//!   ServiceEntry, Sidecar, WorkloadEntry)
//! - [`security`][]: `security.istio.io` (PeerAuthentication, AuthorizationPolicy,
//!   RequestAuthentication)
//! - [`telemetry`][]: `telemetry.istio.io` (Telemetry)
//! - [`gateway`][]: `gateway.networking.k8s.io` (GatewayClass, Gateway, HTTPRoute, GRPCRoute,
//!   TCPRoute, ReferenceGrant)
//! - [`smi`][]: `split.smi-spec.io` (TrafficSplit)

pub mod gateway;
pub mod networking;
pub mod security;
pub mod smi;
pub mod telemetry;

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::crd::merge_crds;
use kube::{CustomResourceExt, Resource};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The per-version CRDs of one resource could not be merged.
    #[error("merging the versions of {kind}")]
    Merge {
        /// Kind whose CRD failed.
        kind: String,
        /// Why.
        #[source]
        source: kube::core::crd::MergeError,
    },
    /// A generated CRD could not be rendered as YAML.
    #[error("rendering the CRD of {kind} as yaml")]
    Render {
        /// Kind whose CRD failed.
        kind: String,
        /// Why.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// The object is not a JSON object with a string `apiVersion` and `kind`.
    #[error("object has no apiVersion and kind")]
    NotAnObject,
    /// The object could not be read as its kind.
    #[error("{kind} {field}: {message}")]
    Parse {
        /// The kind the object claims to be.
        kind: String,
        /// Path of the field that failed, e.g. `spec.http[0].route`.
        field: String,
        /// What the deserializer said.
        message: String,
    },
}

/// The status Istio writes on its resources (`conditions`, `validationMessages`,
/// `observedGeneration`); kept as free-form JSON, as Istio's CRDs preserve unknown fields there.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IstioStatus(pub serde_json::Map<String, serde_json::Value>);

impl JsonSchema for IstioStatus {
    fn schema_name() -> Cow<'static, str> {
        "IstioStatus".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

/// Selects workloads by labels (`istio.io/api/type/v1beta1.WorkloadSelector`), used by the
/// security and telemetry resources and by DestinationRule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must carry; `{}` or none selects every workload of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
}

/// Reference to the resource a policy attaches to (`PolicyTargetReference`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    /// API group of the target (`""` for core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind of the target, e.g. `Service` or `Gateway`.
    pub kind: String,
    /// Name of the target.
    pub name: String,
    /// Namespace of the target; cross-namespace references are not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Every resource kind this module knows, parsed from any served version.
#[derive(Clone, Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "a resource is parsed once per document and matched at once; boxes would only add noise"
)]
pub enum AnyResource {
    /// `networking.istio.io` VirtualService.
    VirtualService(networking::VirtualService),
    /// `networking.istio.io` DestinationRule.
    DestinationRule(networking::DestinationRule),
    /// `networking.istio.io` Gateway.
    IstioGateway(networking::Gateway),
    /// `networking.istio.io` ServiceEntry.
    ServiceEntry(networking::ServiceEntry),
    /// `networking.istio.io` Sidecar.
    Sidecar(networking::Sidecar),
    /// `networking.istio.io` WorkloadEntry.
    WorkloadEntry(networking::WorkloadEntry),
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication(security::PeerAuthentication),
    /// `security.istio.io` AuthorizationPolicy.
    AuthorizationPolicy(security::AuthorizationPolicy),
    /// `security.istio.io` RequestAuthentication.
    RequestAuthentication(security::RequestAuthentication),
    /// `telemetry.istio.io` Telemetry.
    Telemetry(telemetry::Telemetry),
    /// `gateway.networking.k8s.io` GatewayClass.
    GatewayClass(gateway::GatewayClass),
    /// `gateway.networking.k8s.io` Gateway.
    Gateway(gateway::Gateway),
    /// `gateway.networking.k8s.io` HTTPRoute.
    HttpRoute(gateway::HTTPRoute),
    /// `gateway.networking.k8s.io` GRPCRoute.
    GrpcRoute(gateway::GRPCRoute),
    /// `gateway.networking.k8s.io` TCPRoute.
    TcpRoute(gateway::TCPRoute),
    /// `gateway.networking.k8s.io` ReferenceGrant.
    ReferenceGrant(gateway::ReferenceGrant),
    /// `split.smi-spec.io` TrafficSplit.
    TrafficSplit(smi::TrafficSplit),
}

/// Group, kind and served versions of one resource Weft knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownKind {
    /// API group.
    pub group: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Versions served, the storage version first.
    pub versions: &'static [&'static str],
}

const ISTIO_NETWORKING_VERSIONS: &[&str] = &["v1", "v1alpha3", "v1beta1"];
const ISTIO_SECURITY_VERSIONS: &[&str] = &["v1", "v1beta1"];
const ISTIO_TELEMETRY_VERSIONS: &[&str] = &["v1", "v1alpha1"];
const GATEWAY_V1_V1BETA1: &[&str] = &["v1", "v1beta1"];
const GATEWAY_V1: &[&str] = &["v1"];
const GATEWAY_TCP_VERSIONS: &[&str] = &["v1", "v1alpha2"];
// Upstream stores ReferenceGrant as v1beta1.
const GATEWAY_REFERENCE_GRANT_VERSIONS: &[&str] = &["v1beta1", "v1"];
const SMI_SPLIT_VERSIONS: &[&str] = &["v1alpha4", "v1alpha2", "v1alpha3"];

/// Every kind this module knows, in the order the CRDs are generated.
pub const KNOWN_KINDS: &[KnownKind] = &[
    KnownKind {
        group: networking::GROUP,
        kind: "DestinationRule",
        versions: ISTIO_NETWORKING_VERSIONS,
    },
    KnownKind {
        group: networking::GROUP,
        kind: "Gateway",
        versions: ISTIO_NETWORKING_VERSIONS,
    },
    KnownKind {
        group: networking::GROUP,
        kind: "ServiceEntry",
        versions: ISTIO_NETWORKING_VERSIONS,
    },
    KnownKind {
        group: networking::GROUP,
        kind: "Sidecar",
        versions: ISTIO_NETWORKING_VERSIONS,
    },
    KnownKind {
        group: networking::GROUP,
        kind: "VirtualService",
        versions: ISTIO_NETWORKING_VERSIONS,
    },
    KnownKind {
        group: networking::GROUP,
        kind: "WorkloadEntry",
        versions: ISTIO_NETWORKING_VERSIONS,
    },
    KnownKind {
        group: security::GROUP,
        kind: "AuthorizationPolicy",
        versions: ISTIO_SECURITY_VERSIONS,
    },
    KnownKind {
        group: security::GROUP,
        kind: "PeerAuthentication",
        versions: ISTIO_SECURITY_VERSIONS,
    },
    KnownKind {
        group: security::GROUP,
        kind: "RequestAuthentication",
        versions: ISTIO_SECURITY_VERSIONS,
    },
    KnownKind {
        group: telemetry::GROUP,
        kind: "Telemetry",
        versions: ISTIO_TELEMETRY_VERSIONS,
    },
    KnownKind {
        group: gateway::GROUP,
        kind: "GatewayClass",
        versions: GATEWAY_V1_V1BETA1,
    },
    KnownKind {
        group: gateway::GROUP,
        kind: "Gateway",
        versions: GATEWAY_V1_V1BETA1,
    },
    KnownKind {
        group: gateway::GROUP,
        kind: "GRPCRoute",
        versions: GATEWAY_V1,
    },
    KnownKind {
        group: gateway::GROUP,
        kind: "HTTPRoute",
        versions: GATEWAY_V1_V1BETA1,
    },
    KnownKind {
        group: gateway::GROUP,
        kind: "ReferenceGrant",
        versions: GATEWAY_REFERENCE_GRANT_VERSIONS,
    },
    KnownKind {
        group: gateway::GROUP,
        kind: "TCPRoute",
        versions: GATEWAY_TCP_VERSIONS,
    },
    KnownKind {
        group: smi::GROUP,
        kind: "TrafficSplit",
        versions: SMI_SPLIT_VERSIONS,
    },
];

/// The groups this module owns (a kind of one of them that Weft does not know is an error).
pub const KNOWN_GROUPS: &[&str] = &[
    networking::GROUP,
    security::GROUP,
    telemetry::GROUP,
    gateway::GROUP,
    smi::GROUP,
];

/// Finds the known kind for a group and kind name.
pub fn known_kind(group: &str, kind: &str) -> Option<&'static KnownKind> {
    KNOWN_KINDS
        .iter()
        .find(|k| k.group == group && k.kind == kind)
}

/// Splits an `apiVersion` into group and version (`v1` alone is the core group).
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.rsplit_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version),
    }
}

impl AnyResource {
    /// Reads a known resource from JSON. `Ok(None)` when the object's group and kind are not
    /// ones Weft knows; a missing or `null` spec reads as an empty one.
    pub fn from_value(object: &serde_json::Value) -> Result<Option<Self>, CrdError> {
        let map = object.as_object().ok_or(CrdError::NotAnObject)?;
        let api_version = map
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .ok_or(CrdError::NotAnObject)?;
        let kind = map
            .get("kind")
            .and_then(|v| v.as_str())
            .ok_or(CrdError::NotAnObject)?;
        let (group, _) = split_api_version(api_version);
        let Some(known) = known_kind(group, kind) else {
            return Ok(None);
        };
        // The API server prunes nulls before anything reads the object; so does this.
        let mut object = without_nulls(object);
        if let Some(map) = object.as_object_mut() {
            if map.get("spec").is_none_or(serde_json::Value::is_null) {
                map.insert("spec".into(), serde_json::Value::Object(Default::default()));
            }
            // The status is ours to write, never an input; a malformed one must not hide the spec.
            map.remove("status");
        }
        let resource = match (known.group, known.kind) {
            (networking::GROUP, "VirtualService") => Self::VirtualService(parse(kind, object)?),
            (networking::GROUP, "DestinationRule") => Self::DestinationRule(parse(kind, object)?),
            (networking::GROUP, "Gateway") => Self::IstioGateway(parse(kind, object)?),
            (networking::GROUP, "ServiceEntry") => Self::ServiceEntry(parse(kind, object)?),
            (networking::GROUP, "Sidecar") => Self::Sidecar(parse(kind, object)?),
            (networking::GROUP, "WorkloadEntry") => Self::WorkloadEntry(parse(kind, object)?),
            (security::GROUP, "PeerAuthentication") => {
                Self::PeerAuthentication(parse(kind, object)?)
            }
            (security::GROUP, "AuthorizationPolicy") => {
                Self::AuthorizationPolicy(parse(kind, object)?)
            }
            (security::GROUP, "RequestAuthentication") => {
                Self::RequestAuthentication(parse(kind, object)?)
            }
            (telemetry::GROUP, "Telemetry") => Self::Telemetry(parse(kind, object)?),
            (gateway::GROUP, "GatewayClass") => Self::GatewayClass(parse(kind, object)?),
            (gateway::GROUP, "Gateway") => Self::Gateway(parse(kind, object)?),
            (gateway::GROUP, "HTTPRoute") => Self::HttpRoute(parse(kind, object)?),
            (gateway::GROUP, "GRPCRoute") => Self::GrpcRoute(parse(kind, object)?),
            (gateway::GROUP, "TCPRoute") => Self::TcpRoute(parse(kind, object)?),
            (gateway::GROUP, "ReferenceGrant") => Self::ReferenceGrant(parse(kind, object)?),
            (smi::GROUP, "TrafficSplit") => Self::TrafficSplit(parse(kind, object)?),
            _ => return Ok(None),
        };
        Ok(Some(resource))
    }

    /// Writes the resource back as JSON (under its storage version).
    pub fn to_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            Self::VirtualService(r) => serde_json::to_value(r),
            Self::DestinationRule(r) => serde_json::to_value(r),
            Self::IstioGateway(r) => serde_json::to_value(r),
            Self::ServiceEntry(r) => serde_json::to_value(r),
            Self::Sidecar(r) => serde_json::to_value(r),
            Self::WorkloadEntry(r) => serde_json::to_value(r),
            Self::PeerAuthentication(r) => serde_json::to_value(r),
            Self::AuthorizationPolicy(r) => serde_json::to_value(r),
            Self::RequestAuthentication(r) => serde_json::to_value(r),
            Self::Telemetry(r) => serde_json::to_value(r),
            Self::GatewayClass(r) => serde_json::to_value(r),
            Self::Gateway(r) => serde_json::to_value(r),
            Self::HttpRoute(r) => serde_json::to_value(r),
            Self::GrpcRoute(r) => serde_json::to_value(r),
            Self::TcpRoute(r) => serde_json::to_value(r),
            Self::ReferenceGrant(r) => serde_json::to_value(r),
            Self::TrafficSplit(r) => serde_json::to_value(r),
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Self::VirtualService(r) => &r.metadata,
            Self::DestinationRule(r) => &r.metadata,
            Self::IstioGateway(r) => &r.metadata,
            Self::ServiceEntry(r) => &r.metadata,
            Self::Sidecar(r) => &r.metadata,
            Self::WorkloadEntry(r) => &r.metadata,
            Self::PeerAuthentication(r) => &r.metadata,
            Self::AuthorizationPolicy(r) => &r.metadata,
            Self::RequestAuthentication(r) => &r.metadata,
            Self::Telemetry(r) => &r.metadata,
            Self::GatewayClass(r) => &r.metadata,
            Self::Gateway(r) => &r.metadata,
            Self::HttpRoute(r) => &r.metadata,
            Self::GrpcRoute(r) => &r.metadata,
            Self::TcpRoute(r) => &r.metadata,
            Self::ReferenceGrant(r) => &r.metadata,
            Self::TrafficSplit(r) => &r.metadata,
        }
    }

    /// The group and kind of the resource.
    pub fn known_kind(&self) -> &'static KnownKind {
        let (group, kind) = match self {
            Self::VirtualService(_) => (networking::GROUP, "VirtualService"),
            Self::DestinationRule(_) => (networking::GROUP, "DestinationRule"),
            Self::IstioGateway(_) => (networking::GROUP, "Gateway"),
            Self::ServiceEntry(_) => (networking::GROUP, "ServiceEntry"),
            Self::Sidecar(_) => (networking::GROUP, "Sidecar"),
            Self::WorkloadEntry(_) => (networking::GROUP, "WorkloadEntry"),
            Self::PeerAuthentication(_) => (security::GROUP, "PeerAuthentication"),
            Self::AuthorizationPolicy(_) => (security::GROUP, "AuthorizationPolicy"),
            Self::RequestAuthentication(_) => (security::GROUP, "RequestAuthentication"),
            Self::Telemetry(_) => (telemetry::GROUP, "Telemetry"),
            Self::GatewayClass(_) => (gateway::GROUP, "GatewayClass"),
            Self::Gateway(_) => (gateway::GROUP, "Gateway"),
            Self::HttpRoute(_) => (gateway::GROUP, "HTTPRoute"),
            Self::GrpcRoute(_) => (gateway::GROUP, "GRPCRoute"),
            Self::TcpRoute(_) => (gateway::GROUP, "TCPRoute"),
            Self::ReferenceGrant(_) => (gateway::GROUP, "ReferenceGrant"),
            Self::TrafficSplit(_) => (smi::GROUP, "TrafficSplit"),
        };
        KNOWN_KINDS
            .iter()
            .find(|k| k.group == group && k.kind == kind)
            .expect("every AnyResource variant is listed in KNOWN_KINDS")
    }
}

fn without_nulls(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(without_nulls).collect())
        }
        other => other.clone(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    kind: &str,
    object: serde_json::Value,
) -> Result<T, CrdError> {
    serde_path_to_error::deserialize(object).map_err(|error| CrdError::Parse {
        kind: kind.to_string(),
        field: error.path().to_string(),
        message: error.into_inner().to_string(),
    })
}

/// Stamps the single-version CRD of `T` under every served version and merges them, storage
/// version first and the others in name order.
fn multi_version<T: CustomResourceExt + Resource<DynamicType = ()>>(
    versions: &[&str],
) -> Result<CustomResourceDefinition, CrdError> {
    let base = T::crd();
    let kind = T::kind(&()).to_string();
    let storage = versions.first().copied().unwrap_or("v1");
    let stamped = versions
        .iter()
        .map(|version| {
            let mut crd = base.clone();
            for v in &mut crd.spec.versions {
                v.name = (*version).to_string();
            }
            crd
        })
        .collect();
    let mut merged =
        merge_crds(stamped, storage).map_err(|source| CrdError::Merge { kind, source })?;
    merged
        .spec
        .versions
        .sort_by(|a, b| b.storage.cmp(&a.storage).then_with(|| a.name.cmp(&b.name)));
    Ok(merged)
}

/// Every CRD Weft serves, generated from the types: Istio networking, security and telemetry,
/// the Gateway API, SMI TrafficSplit.
pub fn crds() -> Result<Vec<CustomResourceDefinition>, CrdError> {
    Ok(vec![
        multi_version::<networking::DestinationRule>(ISTIO_NETWORKING_VERSIONS)?,
        multi_version::<networking::Gateway>(ISTIO_NETWORKING_VERSIONS)?,
        multi_version::<networking::ServiceEntry>(ISTIO_NETWORKING_VERSIONS)?,
        multi_version::<networking::Sidecar>(ISTIO_NETWORKING_VERSIONS)?,
        multi_version::<networking::VirtualService>(ISTIO_NETWORKING_VERSIONS)?,
        multi_version::<networking::WorkloadEntry>(ISTIO_NETWORKING_VERSIONS)?,
        multi_version::<security::AuthorizationPolicy>(ISTIO_SECURITY_VERSIONS)?,
        multi_version::<security::PeerAuthentication>(ISTIO_SECURITY_VERSIONS)?,
        multi_version::<security::RequestAuthentication>(ISTIO_SECURITY_VERSIONS)?,
        multi_version::<telemetry::Telemetry>(ISTIO_TELEMETRY_VERSIONS)?,
        multi_version::<gateway::GatewayClass>(GATEWAY_V1_V1BETA1)?,
        multi_version::<gateway::Gateway>(GATEWAY_V1_V1BETA1)?,
        multi_version::<gateway::GRPCRoute>(GATEWAY_V1)?,
        multi_version::<gateway::HTTPRoute>(GATEWAY_V1_V1BETA1)?,
        multi_version::<gateway::ReferenceGrant>(GATEWAY_REFERENCE_GRANT_VERSIONS)?,
        multi_version::<gateway::TCPRoute>(GATEWAY_TCP_VERSIONS)?,
        multi_version::<smi::TrafficSplit>(SMI_SPLIT_VERSIONS)?,
    ])
}

/// The generated CRDs rendered as YAML, one multi-document file per API group, keyed by file
/// name (`networking.istio.io.yaml` …). Deterministic: the same types give the same bytes.
pub fn crd_files() -> Result<BTreeMap<String, String>, CrdError> {
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for crd in crds()? {
        let kind = crd.spec.names.kind.clone();
        let yaml =
            serde_yaml_ng::to_string(&crd).map_err(|source| CrdError::Render { kind, source })?;
        let file = files
            .entry(format!("{}.yaml", crd.spec.group))
            .or_insert_with(|| {
                "# Generated from the Rust types in webhook/api/src/crd; do not edit.\n".to_string()
            });
        file.push_str("---\n");
        file.push_str(&yaml);
    }
    Ok(files)
}
