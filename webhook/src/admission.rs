//! AdmissionReview in, AdmissionReview out: the protocol side of `/inject` and `/validate`,
//! independent of HTTP so that it can be tested and benchmarked directly.
//!
//! A body that is not an `admission.k8s.io/v1` AdmissionReview with a request is a
//! [`ReviewError`] (HTTP 400 with its message). A well-formed review always gets an
//! AdmissionReview back: allowed, allowed with a patch, or denied with a message.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, META_API_VERSION_V1, META_KIND, Operation,
};
use kube::core::{DynamicObject, Status};
use tracing::{debug, info, warn};
use weft_api::validate::{Severity, validate_object};

use crate::inject::mode::NodeView;
use crate::inject::{InjectContext, Outcome, inject};
use crate::mesh::MeshConfig;

/// Why a request body is not an AdmissionReview this webhook can answer.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// Not JSON, truncated, or not shaped like an AdmissionReview.
    #[error("request body is not a valid AdmissionReview: {0}")]
    Json(#[source] serde_json::Error),
    /// JSON of another kind or version.
    #[error(
        "request body is a {kind:?} of apiVersion {api_version:?}, expected AdmissionReview of admission.k8s.io/v1"
    )]
    WrongType {
        /// The `kind` sent.
        kind: String,
        /// The `apiVersion` sent.
        api_version: String,
    },
    /// An AdmissionReview without a `request`.
    #[error("AdmissionReview has no request")]
    NoRequest,
}

/// Parses and checks an AdmissionReview body.
pub fn parse_request(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, ReviewError> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(ReviewError::Json)?;
    if review.types.kind != META_KIND || review.types.api_version != META_API_VERSION_V1 {
        return Err(ReviewError::WrongType {
            kind: review.types.kind,
            api_version: review.types.api_version,
        });
    }
    review.try_into().map_err(|_| ReviewError::NoRequest)
}

fn object_name(req: &AdmissionRequest<DynamicObject>) -> String {
    let meta = req.object.as_ref().map(|o| &o.metadata);
    match (
        req.name.as_str(),
        meta.and_then(|m| m.generate_name.as_deref()),
    ) {
        ("", Some(g)) => format!("{g}*"),
        (n, _) => n.to_owned(),
    }
}

fn denied(req: &AdmissionRequest<DynamicObject>, message: String) -> AdmissionResponse {
    let mut resp = AdmissionResponse::from(req).deny(&message);
    resp.result = Status::failure(&message, "BadRequest").with_code(400);
    resp
}

fn with_warnings(mut resp: AdmissionResponse, warnings: Vec<String>) -> AdmissionResponse {
    if !warnings.is_empty() {
        resp.warnings = Some(warnings);
    }
    resp
}

/// Serializes a review the way the API server documents it: the patch as base64 text.
/// (kube-core writes the patch bytes as a JSON array of numbers, which Go happens to accept but
/// other clients of the webhook do not expect.)
pub fn to_json(review: &AdmissionReview<DynamicObject>) -> Result<Vec<u8>, serde_json::Error> {
    let mut value = serde_json::to_value(review)?;
    if let Some(patch) = review.response.as_ref().and_then(|r| r.patch.as_ref())
        && let Some(response) = value.get_mut("response")
    {
        response["patch"] = serde_json::Value::String(STANDARD.encode(patch));
    }
    serde_json::to_vec(&value)
}

/// Answers a `/inject` review: pods being created get the sidecar; anything else is allowed
/// unchanged. Without node information: a pod in eBPF mode keeps it (see
/// [`review_inject_with_nodes`]).
pub fn review_inject(
    body: &[u8],
    mesh: &MeshConfig,
    cluster_supports_native_sidecars: Option<bool>,
) -> Result<AdmissionReview<DynamicObject>, ReviewError> {
    review_inject_with_nodes(body, mesh, cluster_supports_native_sidecars, None)
}

/// [`review_inject`] knowing the nodes: a pod in eBPF mode gets it only where the nodes'
/// eBPF agents are ready, else iptables mode and an admission warning saying why
/// ([`crate::inject::mode::choose`]).
pub fn review_inject_with_nodes(
    body: &[u8],
    mesh: &MeshConfig,
    cluster_supports_native_sidecars: Option<bool>,
    nodes: Option<NodeView>,
) -> Result<AdmissionReview<DynamicObject>, ReviewError> {
    let req = parse_request(body)?;
    Ok(inject_response(&req, mesh, cluster_supports_native_sidecars, nodes).into_review())
}

fn inject_response(
    req: &AdmissionRequest<DynamicObject>,
    mesh: &MeshConfig,
    cluster_supports_native_sidecars: Option<bool>,
    nodes: Option<NodeView>,
) -> AdmissionResponse {
    let name = object_name(req);
    let namespace = req.namespace.clone().unwrap_or_default();
    let allowed = AdmissionResponse::from(req);
    if req.kind.kind != "Pod" || req.sub_resource.is_some() || req.operation != Operation::Create {
        debug!(uid = %req.uid, kind = %req.kind.kind, operation = ?req.operation, "not a pod creation, allowed unchanged");
        return allowed;
    }
    let Some(object) = &req.object else {
        return allowed;
    };
    let pod = match pod_from(object) {
        Ok(pod) => pod,
        Err(e) => {
            warn!(uid = %req.uid, %namespace, %name, error = %e, "pod does not parse");
            return denied(req, format!("object is not a valid Pod: {e}"));
        }
    };
    let ctx = InjectContext {
        namespace: req.namespace.clone(),
        workload_name: None,
        cluster_supports_native_sidecars,
        nodes,
    };
    match inject(&pod, mesh, &ctx) {
        Ok(Outcome::Skip(reason)) => {
            info!(uid = %req.uid, %namespace, %name, %reason, "injection skipped");
            allowed
        }
        Ok(Outcome::Injected(injection)) => {
            let mode = injection.mode.as_str();
            let warnings = injection.warnings.len();
            info!(uid = %req.uid, %namespace, %name, %mode, warnings, ops = injection.patch.0.len(), "injected");
            match allowed.with_patch(injection.patch) {
                Ok(resp) => with_warnings(resp, injection.warnings),
                Err(e) => denied(req, format!("internal error: {e}")),
            }
        }
        Err(denial) => {
            info!(uid = %req.uid, %namespace, %name, %denial, "injection denied");
            denied(req, denial.to_string())
        }
    }
}

/// Rebuilds a typed pod from the review's object (its metadata is typed already).
fn pod_from(object: &DynamicObject) -> Result<Pod, serde_json::Error> {
    let spec = match object.data.get("spec") {
        Some(spec) => Some(serde_json::from_value(spec.clone())?),
        None => None,
    };
    let status = match object.data.get("status") {
        Some(status) if !status.is_null() => Some(serde_json::from_value(status.clone())?),
        _ => None,
    };
    Ok(Pod {
        metadata: object.metadata.clone(),
        spec,
        status,
    })
}

/// Answers a `/validate` review: denied when the validator finds an error (each finding's field
/// and message in the denial); its warnings become admission warnings.
pub fn review_validate(body: &[u8]) -> Result<AdmissionReview<DynamicObject>, ReviewError> {
    let req = parse_request(body)?;
    Ok(validate_response(&req).into_review())
}

fn validate_response(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let allowed = AdmissionResponse::from(req);
    let Some(object) = &req.object else {
        return allowed;
    };
    if req.operation == Operation::Delete {
        return allowed;
    }
    let value = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => return denied(req, format!("object does not serialize: {e}")),
    };
    let findings = validate_object(&value);
    let describe = |f: &weft_api::validate::Finding| format!("{}: {}", f.field, f.message);
    let errors: Vec<String> = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(describe)
        .collect();
    let warnings: Vec<String> = findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
        .map(describe)
        .collect();
    let name = object_name(req);
    if errors.is_empty() {
        debug!(uid = %req.uid, kind = %req.kind.kind, %name, warnings = warnings.len(), "valid");
        with_warnings(allowed, warnings)
    } else {
        info!(uid = %req.uid, kind = %req.kind.kind, %name, errors = errors.len(), "invalid config denied");
        with_warnings(denied(req, errors.join("; ")), warnings)
    }
}
