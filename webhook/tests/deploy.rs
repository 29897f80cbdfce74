//! `deploy/`: the Helm chart is rendered here without helm (its templates use only value
//! substitution, `quote` and `if`) and must equal the committed `deploy/weft.yaml`
//! (`WEFT_BLESS=1` regenerates it). The rendered objects are then checked against what the
//! webhook expects: names, Service, paths, selectors, policies, RBAC, mesh config.

use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use serde::Deserialize;
use serde_yaml_ng::Value;
use weft_webhook::mesh::MeshConfig;

const RELEASE_NAME: &str = "weft";
const RELEASE_NAMESPACE: &str = "weft-system";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn lookup<'a>(root: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(root, |v, key| match v.get(key) {
        Some(next) => next,
        None => panic!("values.yaml has no {path}"),
    })
}

fn scalar(v: &Value, what: &str) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => panic!("{what} is not a scalar: {other:?}"),
    }
}

/// Evaluates one `{{ }}` expression; `None` for control words handled by the caller.
fn eval(expr: &str, values: &Value, chart: &Value) -> String {
    let (expr, quote) = match expr.split_once('|') {
        Some((e, f)) if f.trim() == "quote" => (e.trim(), true),
        Some((_, f)) => panic!("unsupported template function {f:?}: extend the renderer"),
        None => (expr, false),
    };
    let text = if let Some(path) = expr.strip_prefix(".Values.") {
        scalar(lookup(values, path), expr)
    } else if let Some(path) = expr.strip_prefix(".Chart.") {
        let key = path[..1].to_lowercase() + &path[1..];
        scalar(lookup(chart, &key), expr)
    } else {
        match expr {
            ".Release.Namespace" => RELEASE_NAMESPACE.to_owned(),
            ".Release.Name" => RELEASE_NAME.to_owned(),
            _ => panic!("unsupported template expression {expr:?}: extend the renderer"),
        }
    };
    if quote {
        serde_json::to_string(&text).expect("quote")
    } else {
        text
    }
}

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false))
        && v.as_str() != Some("")
        && v.as_u64() != Some(0)
}

/// Renders one template the way helm does for the constructs the chart uses.
fn render_template(text: &str, values: &Value, chart: &Value) -> String {
    let mut out = String::new();
    let mut rest = text;
    // Stack of "is this branch emitted".
    let mut emit = vec![true];
    while let Some(start) = rest.find("{{") {
        let (before, after_open) = rest.split_at(start);
        let end = after_open.find("}}").expect("unclosed {{");
        let inner = &after_open[2..end];
        let trim_left = inner.starts_with('-');
        let trim_right = inner.ends_with('-');
        let expr = inner.trim_start_matches('-').trim_end_matches('-').trim();
        if emit.iter().all(|e| *e) {
            out.push_str(before);
        }
        if trim_left {
            let kept = out.trim_end().len();
            out.truncate(kept);
        }
        rest = &after_open[end + 2..];
        if trim_right {
            rest = rest.trim_start();
        }
        if let Some(cond) = expr.strip_prefix("if ") {
            let path = cond.trim().strip_prefix(".Values.").expect("if on a value");
            emit.push(truthy(lookup(values, path)));
        } else if expr == "end" {
            assert!(emit.len() > 1, "unbalanced end");
            emit.pop();
        } else if emit.iter().all(|e| *e) {
            out.push_str(&eval(expr, values, chart));
        }
    }
    assert_eq!(emit.len(), 1, "unclosed if");
    out.push_str(rest);
    out
}

fn render() -> String {
    let chart_dir = deploy_dir().join("charts/weft");
    let values: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(chart_dir.join("values.yaml")).expect("values.yaml"),
    )
    .expect("values parse");
    let chart: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(chart_dir.join("Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart parses");
    let mut templates: Vec<PathBuf> = std::fs::read_dir(chart_dir.join("templates"))
        .expect("templates")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    templates.sort();
    // Documents in helm's install order, so that `kubectl apply -f` of the file works too.
    let mut docs: Vec<(usize, String)> = Vec::new();
    for t in templates {
        let text = std::fs::read_to_string(&t).expect("template");
        let rendered = render_template(&text, &values, &chart);
        let source = t.file_name().expect("name").to_string_lossy().into_owned();
        for doc in rendered.split("\n---\n") {
            let doc = doc.trim_matches('\n');
            let kind = doc
                .lines()
                .find_map(|l| l.strip_prefix("kind: "))
                .map(str::trim);
            let Some(kind) = kind else { continue };
            let rank = INSTALL_ORDER
                .iter()
                .position(|k| *k == kind)
                .unwrap_or_else(|| panic!("{kind} missing from INSTALL_ORDER"));
            docs.push((
                rank,
                format!("---\n# Source: weft/templates/{source}\n{doc}\n"),
            ));
        }
    }
    docs.sort_by_key(|(rank, _)| *rank);
    let mut out = String::from(
        "# Rendered from deploy/charts/weft (release \"weft\" in namespace weft-system) by\n\
         # `WEFT_BLESS=1 cargo test -p weft-webhook --test deploy`. Do not edit by hand.\n",
    );
    for (_, doc) in docs {
        out.push_str(&doc);
    }
    out
}

/// The part of helm's install order the chart uses.
const INSTALL_ORDER: &[&str] = &[
    "Namespace",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "Deployment",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
];

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("rendered yaml parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn one<T: serde::de::DeserializeOwned>(docs: &[Value], kind: &str) -> T {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    serde_yaml_ng::from_value(found[0].clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn rendered_manifest_is_current() {
    let rendered = render();
    let path = deploy_dir().join("weft.yaml");
    if std::env::var_os("WEFT_BLESS").is_some() {
        std::fs::write(&path, &rendered).expect("write weft.yaml");
        return;
    }
    let committed = std::fs::read_to_string(&path).expect("deploy/weft.yaml exists");
    assert!(
        committed == rendered,
        "deploy/weft.yaml is out of date with deploy/charts/weft: run \
         WEFT_BLESS=1 cargo test -p weft-webhook --test deploy"
    );
}

#[test]
fn rendered_manifest_matches_what_the_webhook_expects() {
    let docs = documents(&render());
    let svc: Service = one(&docs, "Service");
    let deploy: Deployment = one(&docs, "Deployment");
    let mutating: MutatingWebhookConfiguration = one(&docs, "MutatingWebhookConfiguration");
    let validating: ValidatingWebhookConfiguration = one(&docs, "ValidatingWebhookConfiguration");
    let cm: ConfigMap = one(&docs, "ConfigMap");
    let cluster_role: ClusterRole = one(&docs, "ClusterRole");
    let role: Role = one(&docs, "Role");

    // The control plane's arguments tie the objects together.
    let pod = deploy.spec.template.spec.as_ref().expect("pod spec");
    let c = &pod.containers[0];
    let args = c.args.clone().expect("args");
    assert_eq!(args[0], "serve");
    let arg = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("--{name} in {args:?}"))
            .to_owned()
    };
    let svc_name = svc.metadata.name.clone().expect("service name");
    assert_eq!(
        arg("service"),
        svc_name,
        "certificate names match the Service"
    );
    assert_eq!(svc.metadata.namespace.as_deref(), Some(RELEASE_NAMESPACE));
    assert_eq!(
        deploy.metadata.namespace.as_deref(),
        Some(RELEASE_NAMESPACE)
    );
    let listen_port: i32 = arg("listen")
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("listen port");
    let container_port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("https-webhook"))
        .expect("webhook port");
    assert_eq!(container_port.container_port, listen_port);
    let svc_port = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.iter().find(|p| p.port == 443))
        .expect("service port 443");
    assert_eq!(
        svc_port.target_port,
        Some(
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                "https-webhook".into()
            )
        )
    );
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .expect("selector");
    let labels = deploy
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("pod labels");
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    assert_eq!(
        labels.get("sidecar.istio.io/inject").map(String::as_str),
        Some("false")
    );

    // Webhook configurations: the name the control plane patches, the Service, the paths.
    let webhook_name = arg("patch-webhook-ca");
    assert_eq!(
        mutating.metadata.name.as_deref(),
        Some(webhook_name.as_str())
    );
    assert_eq!(
        validating.metadata.name.as_deref(),
        Some(webhook_name.as_str())
    );
    let hooks = mutating.webhooks.clone().expect("webhooks");
    assert_eq!(hooks.len(), 2);
    for h in &hooks {
        let s = h.client_config.service.as_ref().expect("service ref");
        assert_eq!(s.name, svc_name);
        assert_eq!(s.namespace, RELEASE_NAMESPACE);
        assert_eq!(s.path.as_deref(), Some("/inject"));
        assert_eq!(s.port, Some(443));
        assert!(
            h.client_config.ca_bundle.is_none(),
            "filled in by the control plane"
        );
        assert_eq!(h.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(h.side_effects, "None");
        assert!(h.timeout_seconds.is_some_and(|t| (1..=30).contains(&t)));
        assert!(h.reinvocation_policy.is_some());
        assert_eq!(h.admission_review_versions, ["v1"]);
        let rule = &h.rules.as_ref().expect("rules")[0];
        assert_eq!(rule.operations.as_deref(), Some(&["CREATE".to_owned()][..]));
        assert_eq!(rule.resources.as_deref(), Some(&["pods".to_owned()][..]));
    }
    let ns_hook = &hooks[0];
    assert_eq!(
        ns_hook
            .namespace_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .and_then(|l| l.get("istio-injection"))
            .map(String::as_str),
        Some("enabled")
    );
    let opt_out = ns_hook
        .object_selector
        .as_ref()
        .and_then(|s| s.match_expressions.as_ref())
        .expect("object selector");
    assert_eq!(opt_out[0].key, "sidecar.istio.io/inject");
    assert_eq!(opt_out[0].operator, "NotIn");
    let opt_in = hooks[1]
        .object_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .expect("opt-in selector");
    assert_eq!(
        opt_in.get("sidecar.istio.io/inject").map(String::as_str),
        Some("true")
    );
    let v = &validating.webhooks.as_ref().expect("validating webhooks")[0];
    assert_eq!(
        v.client_config
            .service
            .as_ref()
            .and_then(|s| s.path.as_deref()),
        Some("/validate")
    );

    // Mesh config: parses, no unknown fields, mounted where --mesh-config reads it.
    let mesh_yaml = cm
        .data
        .as_ref()
        .and_then(|d| d.get("mesh.yaml"))
        .expect("mesh.yaml");
    let mesh = MeshConfig::from_yaml(mesh_yaml).expect("mesh config valid");
    assert_eq!(mesh.unknown_fields().count(), 0, "{mesh_yaml}");
    assert_eq!(
        mesh.proxy_image,
        format!("ghcr.io/weft-mesh/weft-proxy:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        mesh.control_plane_address,
        MeshConfig::default().control_plane_address
    );
    let mount = c.volume_mounts.as_ref().expect("mounts")[0]
        .mount_path
        .clone();
    assert_eq!(arg("mesh-config"), format!("{mount}/mesh.yaml"));

    // RBAC: no wildcards; writes only to named objects (webhook configurations, the root
    // ConfigMap), plus creating TokenReviews and the root ConfigMap; discovery only reads.
    for rule in cluster_role.rules.iter().flatten() {
        assert!(!rule.verbs.iter().any(|v| v == "*"), "{rule:?}");
        let resources = rule.resources.clone().unwrap_or_default();
        assert!(!resources.iter().any(|r| r == "*"), "{rule:?}");
        let groups = rule.api_groups.clone().unwrap_or_default();
        if groups.iter().any(|g| g == "admissionregistration.k8s.io") {
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&[webhook_name.clone()][..])
            );
        } else if resources == ["tokenreviews"] || rule.verbs == ["create"] {
            assert_eq!(rule.verbs, ["create"], "{rule:?}");
        } else if resources == ["configmaps"] {
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&[MeshConfig::default().root_cert_config_map][..])
            );
        } else {
            assert_eq!(rule.verbs, ["get", "list", "watch"], "{rule:?}");
        }
    }
    // Every kind the Kubernetes source watches can be listed and watched, nodes included
    // (the injector's eBPF decision reads their labels).
    let reads = |group: &str, resource: &str| {
        cluster_role.rules.iter().flatten().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && ["list", "watch"]
                    .iter()
                    .all(|v| r.verbs.iter().any(|x| x == v))
                && r.resource_names.is_none()
        })
    };
    for (group, resource) in [
        ("", "namespaces"),
        ("", "services"),
        ("", "pods"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        assert!(
            reads(group, resource),
            "the control plane cannot list and watch {resource:?} of group {group:?}"
        );
    }
    assert_eq!(arg("control-plane-listen"), "0.0.0.0:15012");
    assert!(
        c.ports.iter().flatten().any(|p| p.container_port == 15012),
        "the control-plane port is declared"
    );
    let secret = arg("serving-cert-secret");
    assert!(role.rules.iter().flatten().any(|r| {
        r.resource_names
            .as_ref()
            .is_some_and(|n| n.contains(&secret))
    }));
    for rule in role.rules.iter().flatten() {
        assert_eq!(rule.resources.as_deref(), Some(&["secrets".to_owned()][..]));
    }
}

#[test]
fn chart_version_follows_the_crate() {
    let chart: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(deploy_dir().join("charts/weft/Chart.yaml")).expect("chart"),
    )
    .expect("parse");
    assert_eq!(
        scalar(lookup(&chart, "appVersion"), "appVersion"),
        env!("CARGO_PKG_VERSION")
    );
    let values: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(deploy_dir().join("charts/weft/values.yaml")).expect("values"),
    )
    .expect("parse");
    assert_eq!(
        scalar(lookup(&values, "image.tag"), "tag"),
        env!("CARGO_PKG_VERSION")
    );
}
