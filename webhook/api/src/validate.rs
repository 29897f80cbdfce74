//! Semantic validation of Istio / Gateway API / SMI resources, shared by the control plane's
//! `POST /validate` admission endpoint and `weft-webhook validate -f FILE`.
//!
//! Three layers, each naming the offending field:
//!
//! 1. Structure, against the generated CRD schema ([`schema`]): types, enum values, bounds,
//!    required fields; unknown top-level fields are errors, unknown fields elsewhere warnings
//!    (the API server would silently drop them).
//! 2. Semantics per kind, following Istio's `pkg/config/validation` and the Gateway API's CEL
//!    rules (hosts, weights, durations, ports, regexes, headers, retry conditions, mTLS modes,
//!    JWT rules, authorization rules, filters …).
//!    Valid fields and kinds Weft does not honour yet are warnings naming them
//!    ([`unsupported`]), so that nothing is ignored without a word.
//! 3. Across documents ([`validate_documents`] only): duplicates, and the conflicts whose
//!    outcome Istio documents as merged, undefined or ignored (several VirtualServices for one
//!    host, HTTPRoute and VirtualService for one service, several DestinationRules for one
//!    host, TrafficSplit and VirtualService for one service).

mod conflict;
mod document;
mod gateway;
mod networking;
mod schema;
mod security;
mod smi;
mod syntax;
mod telemetry;
mod unsupported;

use std::fmt;

use serde::Serialize;
use serde_json::Value;

pub use document::{Document, DocumentError, parse_documents};

use crate::crd::{self, AnyResource, CrdError};

/// One problem found in one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `Kind/namespace/name` of the document, or `document N` when it has none.
    pub object: String,
    /// Path of the offending field, e.g. `spec.http[0].route[1].weight`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// Errors reject the object; warnings are reported and accepted.
    pub severity: Severity,
}

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The object is rejected.
    Error,
    /// The object is accepted; the message is shown.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Error => "error",
            Self::Warning => "warning",
        })
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}: {}", self.severity, self.object, self.message)
        } else {
            write!(
                f,
                "{}: {}: {}: {}",
                self.severity, self.object, self.field, self.message
            )
        }
    }
}

/// Whether any finding is an error.
pub fn has_errors(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
}

/// Collects the findings of one object.
pub(crate) struct Report {
    object: String,
    findings: Vec<Finding>,
}

impl Report {
    fn new(object: String) -> Self {
        Self {
            object,
            findings: Vec::new(),
        }
    }

    fn push(&mut self, severity: Severity, field: impl Into<String>, message: impl Into<String>) {
        self.findings.push(Finding {
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
            severity,
        });
    }

    /// Records an error on `field`.
    pub(crate) fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, field, message);
    }

    /// Records a warning on `field`.
    pub(crate) fn warning(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, field, message);
    }

    /// Records an error on `field` when `result` is one.
    pub(crate) fn check<T>(&mut self, field: impl Into<String>, result: Result<T, String>) {
        if let Err(message) = result {
            self.error(field, message);
        }
    }

    fn has_errors(&self) -> bool {
        has_errors(&self.findings)
    }
}

/// What validating one object produced.
struct Checked {
    object: String,
    findings: Vec<Finding>,
    resource: Option<AnyResource>,
}

/// `Kind/namespace/name`, or `document N`.
fn object_label(object: &Value, index: usize) -> String {
    let kind = object.get("kind").and_then(Value::as_str);
    let metadata = object.get("metadata");
    let name = metadata.and_then(|m| m.get("name")).and_then(Value::as_str);
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("");
    match (kind, name) {
        (Some(kind), Some(name)) => format!("{kind}/{namespace}/{name}"),
        _ => format!("document {index}"),
    }
}

fn validate_metadata(known: &crd::KnownKind, object: &Value, report: &mut Report) {
    let metadata = object.get("metadata");
    let name = metadata.and_then(|m| m.get("name")).and_then(Value::as_str);
    let generate_name = metadata
        .and_then(|m| m.get("generateName"))
        .and_then(Value::as_str);
    match name {
        None if generate_name.is_none() => {
            report.error("metadata.name", "Required value: name is required")
        }
        None => {}
        Some(name) => {
            if !syntax::is_dns1123_subdomain(name) {
                // Istio's own reference examples use such names; the API server would refuse them.
                report.warning(
                    "metadata.name",
                    format!("Invalid value: {name:?}: must be a lowercase RFC 1123 subdomain"),
                );
            } else if known.group == crd::networking::GROUP
                && known.kind == "Gateway"
                && !syntax::is_dns1123_label(name)
            {
                // Istio refers to gateways as namespace/name, so the name may not contain dots.
                report.error(
                    "metadata.name",
                    format!("invalid gateway name: {name:?} (must be a DNS label)"),
                );
            }
        }
    }
    if let Some(namespace) = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        && !syntax::is_dns1123_label(namespace)
    {
        report.warning(
            "metadata.namespace",
            format!(
                "Invalid value: {namespace:?}: Kubernetes namespaces are lowercase RFC 1123 labels"
            ),
        );
    }
}

fn validate_one(object: &Value, index: usize) -> Checked {
    let label = object_label(object, index);
    let mut report = Report::new(label.clone());
    let Some(map) = object.as_object() else {
        report.error("", "document is not a map");
        return Checked {
            object: label,
            findings: report.findings,
            resource: None,
        };
    };
    let api_version = map.get("apiVersion").and_then(Value::as_str);
    let kind = map.get("kind").and_then(Value::as_str);
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        report.error(
            if api_version.is_none() {
                "apiVersion"
            } else {
                "kind"
            },
            "Required value: apiVersion and kind are required",
        );
        return Checked {
            object: label,
            findings: report.findings,
            resource: None,
        };
    };
    let (group, version) = crd::split_api_version(api_version);
    let Some(known) = crd::known_kind(group, kind) else {
        if crd::KNOWN_GROUPS.contains(&group) {
            report.warning(
                "kind",
                format!("kind {kind:?} of {group} is not supported by Weft; not validated"),
            );
        }
        return Checked {
            object: label,
            findings: report.findings,
            resource: None,
        };
    };
    if !known.versions.contains(&version) {
        report.error(
            "apiVersion",
            format!(
                "version {version:?} of {kind} is not served; served: {}",
                known.versions.join(", ")
            ),
        );
    }
    validate_metadata(known, object, &mut report);
    schema::check(known.group, known.kind, object, &mut report);

    let resource = match AnyResource::from_value(object) {
        Ok(resource) => resource,
        Err(CrdError::Parse { field, message, .. }) => {
            if !report.has_errors() {
                report.error(field, format!("cannot be read: {message}"));
            }
            None
        }
        Err(error) => {
            report.error("", error.to_string());
            None
        }
    };
    if let Some(resource) = &resource {
        let namespace = resource.metadata().namespace.as_deref();
        match resource {
            AnyResource::VirtualService(r) => {
                networking::virtual_service(&r.spec, namespace, &mut report)
            }
            AnyResource::DestinationRule(r) => {
                networking::destination_rule(&r.spec, namespace, &mut report)
            }
            AnyResource::IstioGateway(r) => networking::gateway(&r.spec, &mut report),
            AnyResource::ServiceEntry(r) => {
                networking::service_entry(&r.spec, namespace, &mut report)
            }
            AnyResource::Sidecar(r) => networking::sidecar(&r.spec, &mut report),
            AnyResource::WorkloadEntry(r) => {
                networking::workload_entry(&r.spec, "spec", None, true, &mut report)
            }
            AnyResource::PeerAuthentication(r) => {
                security::peer_authentication(&r.spec, &mut report)
            }
            AnyResource::AuthorizationPolicy(r) => {
                security::authorization_policy(&r.spec, &r.metadata, &mut report)
            }
            AnyResource::RequestAuthentication(r) => {
                security::request_authentication(&r.spec, &mut report)
            }
            AnyResource::Telemetry(r) => telemetry::telemetry(&r.spec, &mut report),
            AnyResource::GatewayClass(r) => gateway::gateway_class(&r.spec, &mut report),
            AnyResource::Gateway(r) => gateway::gateway(&r.spec, &mut report),
            AnyResource::HttpRoute(r) => gateway::http_route(&r.spec, &mut report),
            AnyResource::GrpcRoute(r) => gateway::grpc_route(&r.spec, &mut report),
            AnyResource::TcpRoute(r) => gateway::tcp_route(&r.spec, &mut report),
            AnyResource::ReferenceGrant(r) => gateway::reference_grant(&r.spec, &mut report),
            AnyResource::TrafficSplit(r) => smi::traffic_split(&r.spec, &mut report),
        }
        unsupported::check(known.group, known.kind, object, &mut report);
    }
    Checked {
        object: label,
        findings: report.findings,
        resource,
    }
}

/// Validates one object given as JSON (as an AdmissionReview carries it). Kinds Weft does not
/// know are accepted without findings.
pub fn validate_object(object: &Value) -> Vec<Finding> {
    validate_one(object, 1).findings
}

/// Validates every document of a YAML stream (as `weft-webhook validate -f` reads it), with
/// cross-document checks such as two VirtualServices claiming one host.
pub fn validate_documents(yaml: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut resources = Vec::new();
    for document in parse_documents(yaml) {
        match document.content {
            Ok(object) => {
                let checked = validate_one(&object, document.index);
                findings.extend(checked.findings);
                if let Some(resource) = checked.resource {
                    resources.push((checked.object, resource));
                }
            }
            Err(error) => findings.push(Finding {
                object: format!("document {}", document.index),
                field: error.field,
                message: error.message,
                severity: Severity::Error,
            }),
        }
    }
    findings.extend(conflict::check(&resources));
    findings
}
