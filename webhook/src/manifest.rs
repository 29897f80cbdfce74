//! `weft-webhook inject -f`: injection of YAML manifests, like `istioctl kube-inject`.
//!
//! Pods and the pod templates of Deployments, StatefulSets, DaemonSets, ReplicaSets,
//! ReplicationControllers, Jobs and CronJobs are injected, also inside a `List`; every other
//! document passes through. The template is changed by applying the same JSON patch the
//! admission webhook would return, so fields the typed model does not know are kept.

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use serde::Deserialize;
use serde_json::Value;

use crate::inject::{Denial, InjectContext, Outcome, inject};
use crate::mesh::MeshConfig;

/// Errors injecting a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A document is not YAML this tool can read.
    #[error("document {doc}: not valid YAML")]
    Yaml {
        /// 1-based document number.
        doc: usize,
        /// Why.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A pod template does not parse as one.
    #[error("document {doc} ({object}): pod template does not parse: {source}")]
    Template {
        /// 1-based document number.
        doc: usize,
        /// `Kind/name`.
        object: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Injection was denied.
    #[error("document {doc} ({object}): {source}")]
    Denied {
        /// 1-based document number.
        doc: usize,
        /// `Kind/name`.
        object: String,
        /// Why.
        #[source]
        source: Denial,
    },
    /// The injector's patch did not apply to the document (a bug).
    #[error("document {doc} ({object}): patch does not apply: {message}")]
    Patch {
        /// 1-based document number.
        doc: usize,
        /// `Kind/name`.
        object: String,
        /// Why.
        message: String,
    },
    /// The result does not serialize.
    #[error("cannot write YAML")]
    Write(#[source] serde_yaml_ng::Error),
}

/// Result of injecting a stream of documents.
#[derive(Debug, Clone, Default)]
pub struct Injected {
    /// The documents, injected or passed through, in order.
    pub documents: Vec<Value>,
    /// Warnings, each prefixed with its document.
    pub warnings: Vec<String>,
}

impl Injected {
    /// The documents as one YAML stream.
    pub fn to_yaml(&self) -> Result<String, ManifestError> {
        let mut out = String::new();
        for (i, doc) in self.documents.iter().enumerate() {
            if i > 0 {
                out.push_str("---\n");
            }
            out.push_str(&serde_yaml_ng::to_string(doc).map_err(ManifestError::Write)?);
        }
        Ok(out)
    }
}

/// Injects every workload in a YAML stream. `cluster_supports_native_sidecars` is `None`
/// without a cluster (then `nativeSidecar: auto` means native).
pub fn inject_yaml(
    yaml: &str,
    mesh: &MeshConfig,
    cluster_supports_native_sidecars: Option<bool>,
) -> Result<Injected, ManifestError> {
    let mut out = Injected::default();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let doc = i + 1;
        let value = Value::deserialize(de).map_err(|source| ManifestError::Yaml { doc, source })?;
        if value.is_null() {
            continue;
        }
        let value = inject_value(
            value,
            doc,
            mesh,
            cluster_supports_native_sidecars,
            &mut out.warnings,
        )?;
        out.documents.push(value);
    }
    Ok(out)
}

fn object_label(v: &Value) -> String {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("?");
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{kind}/{name}")
}

/// Where a kind keeps its pod template, as a JSON pointer; `""` for a Pod itself.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn inject_value(
    mut value: Value,
    doc: usize,
    mesh: &MeshConfig,
    native: Option<bool>,
    warnings: &mut Vec<String>,
) -> Result<Value, ManifestError> {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if kind == "List" {
        if let Some(items) = value.get_mut("items").and_then(Value::as_array_mut) {
            for item in items.iter_mut() {
                *item = inject_value(item.take(), doc, mesh, native, warnings)?;
            }
        }
        return Ok(value);
    }
    let Some(pointer) = template_pointer(&kind) else {
        return Ok(value);
    };
    let object = object_label(&value);
    let ctx = InjectContext {
        namespace: value
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_owned),
        workload_name: (kind != "Pod")
            .then(|| value.pointer("/metadata/name").and_then(Value::as_str))
            .flatten()
            .map(str::to_owned),
        cluster_supports_native_sidecars: native,
        // Offline there are no nodes to ask: a pod in eBPF mode keeps it.
        nodes: None,
    };
    let Some(template) = value.pointer_mut(pointer) else {
        return Ok(value);
    };
    let pod = if kind == "Pod" {
        serde_json::from_value::<Pod>(template.clone())
    } else {
        serde_json::from_value::<PodTemplateSpec>(template.clone()).map(|t| Pod {
            metadata: t.metadata.unwrap_or_default(),
            spec: t.spec,
            status: None,
        })
    }
    .map_err(|source| ManifestError::Template {
        doc,
        object: object.clone(),
        source,
    })?;
    match inject(&pod, mesh, &ctx) {
        Ok(Outcome::Skip(_)) => {}
        Ok(Outcome::Injected(injection)) => {
            // The typed pod may serialize fields the document leaves out (and vice versa);
            // the patch only touches what injection changed.
            if template.get("metadata").is_none_or(Value::is_null) {
                template["metadata"] = Value::Object(Default::default());
            }
            json_patch::patch(template, &injection.patch).map_err(|e| ManifestError::Patch {
                doc,
                object: object.clone(),
                message: e.to_string(),
            })?;
            warnings.extend(
                injection
                    .warnings
                    .iter()
                    .map(|w| format!("document {doc} ({object}): {w}")),
            );
        }
        Err(source) => {
            return Err(ManifestError::Denied {
                doc,
                object,
                source,
            });
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_other_kinds_and_injects_templates() {
        let yaml = "kind: Service\napiVersion: v1\nmetadata: {name: s}\n---\n\
            kind: CronJob\napiVersion: batch/v1\nmetadata: {name: c}\nspec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers: [{name: job, image: busybox}]\n";
        let out = inject_yaml(yaml, &MeshConfig::default(), None).expect("injects");
        assert_eq!(out.documents.len(), 2);
        assert_eq!(out.documents[0]["kind"], "Service");
        let t = &out.documents[1]["spec"]["jobTemplate"]["spec"]["template"];
        assert_eq!(t["spec"]["initContainers"][1]["name"], "weft-proxy");
        assert_eq!(
            t["metadata"]["labels"]["service.istio.io/canonical-name"],
            "c"
        );
    }
}
