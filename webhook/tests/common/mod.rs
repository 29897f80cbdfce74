//! Helpers shared by the integration tests: the corpus, pods out of manifests, and the
//! invariants every injected pod must satisfy.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod, PodTemplateSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde_json::Value;
use weft_api::bootstrap::{self as boot, AppPort, AppProbes};
use weft_webhook::inject::annotations::STATUS;
use weft_webhook::inject::status::SidecarStatus;

/// The injection corpus: `shared/corpus/injection` beside the repository.
pub fn corpus_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/injection");
    assert!(
        dir.join("inputs").is_dir(),
        "the injection corpus is missing: expected {} (shared/corpus beside the repository)",
        dir.display()
    );
    dir
}

/// Every input file of the corpus, sorted.
pub fn corpus_inputs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir().join("inputs"))
        .expect("read corpus inputs")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "corpus looks truncated: {files:?}");
    files
}

/// Whether the corpus expects this input to be rejected.
pub fn is_bad(path: &Path) -> bool {
    file_name(path).starts_with("traffic-annotations-bad-")
}

/// The file name.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned()
}

/// A workload's pods found in a YAML stream: `(Kind/name, workload name, pod)`.
pub fn pods_in(yaml: &str) -> Vec<(String, Option<String>, Pod)> {
    let mut out = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v = Value::deserialize(de).expect("yaml document");
        collect(&v, &mut out);
    }
    out
}

fn collect(v: &Value, out: &mut Vec<(String, Option<String>, Pod)>) {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default();
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let label = format!("{kind}/{}", name.clone().unwrap_or_default());
    let template = match kind {
        "List" => {
            for item in v["items"].as_array().into_iter().flatten() {
                collect(item, out);
            }
            return;
        }
        "Pod" => {
            let pod: Pod = serde_json::from_value(v.clone()).expect("pod");
            out.push((label, None, pod));
            return;
        }
        "CronJob" => v.pointer("/spec/jobTemplate/spec/template"),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            v.pointer("/spec/template")
        }
        _ => None,
    };
    if let Some(t) = template {
        let t: PodTemplateSpec = serde_json::from_value(t.clone()).expect("template");
        out.push((
            label,
            name,
            Pod {
                metadata: t.metadata.unwrap_or_default(),
                spec: t.spec,
                status: None,
            },
        ));
    }
}

/// The value of an env var of a container.
pub fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

/// The downward-API field of an env var of a container.
pub fn env_field<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str())
}

/// Finds a container by name among containers and init containers.
pub fn container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == name)
}

fn is_user_proxy_or_init(name: &str) -> bool {
    matches!(
        name,
        "istio-proxy" | "istio-init" | "weft-proxy" | "weft-init"
    )
}

fn ready_probe_ok(p: Option<&Probe>) -> bool {
    p.and_then(|p| p.http_get.as_ref()).is_some_and(|h| {
        h.path.as_deref() == Some("/healthz/ready") && h.port == IntOrString::Int(15021)
    })
}

/// What a test expects of one injection.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Native sidecar (else classic).
    pub native: bool,
    /// The proxy's UID (1337 unless a user override says otherwise).
    pub proxy_uid: i64,
}

/// Checks every invariant of an injected pod against the pod it came from.
pub fn check_injected(label: &str, before: &Pod, after: &Pod, expect: Expect) {
    let spec = after.spec.as_ref().expect("spec");
    let before_spec = before.spec.as_ref().expect("spec before");
    let inits = spec.init_containers.clone().unwrap_or_default();

    // Order: weft-init first; the proxy right after it (native) or first container (classic).
    assert_eq!(
        inits[0].name, "weft-init",
        "{label}: weft-init must run first"
    );
    let app_names: Vec<&str> = before_spec
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .filter(|n| !is_user_proxy_or_init(n))
        .collect();
    let proxy = if expect.native && !app_names.is_empty() {
        assert_eq!(
            inits[1].name, "weft-proxy",
            "{label}: native proxy after weft-init"
        );
        assert_eq!(
            inits[1].restart_policy.as_deref(),
            Some("Always"),
            "{label}"
        );
        assert!(
            spec.containers.iter().all(|c| c.name != "weft-proxy"),
            "{label}"
        );
        &inits[1]
    } else {
        let p = &spec.containers[0];
        assert_eq!(p.name, "weft-proxy", "{label}: classic proxy first");
        assert_eq!(p.restart_policy, None, "{label}");
        if !app_names.is_empty() {
            let hook = p
                .lifecycle
                .as_ref()
                .and_then(|l| l.post_start.as_ref())
                .and_then(|h| h.exec.as_ref())
                .and_then(|e| e.command.clone())
                .expect("classic proxy has a postStart wait");
            assert_eq!(&hook[..2], ["weft-proxy", "wait"], "{label}");
            assert!(hook[2].starts_with("--timeout="), "{label}");
        }
        p
    };
    // App containers keep their order, after the proxy in classic mode.
    let after_apps: Vec<&str> = spec
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .filter(|n| *n != "weft-proxy")
        .collect();
    assert_eq!(after_apps, app_names, "{label}: app containers and order");
    // User init containers keep their order after ours.
    let user_inits: Vec<&str> = before_spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .filter(|n| !is_user_proxy_or_init(n))
        .collect();
    let after_user_inits: Vec<&str> = inits
        .iter()
        .map(|c| c.name.as_str())
        .filter(|n| !n.starts_with("weft-"))
        .collect();
    assert_eq!(
        after_user_inits, user_inits,
        "{label}: user init containers"
    );

    // weft-init.
    let init = &inits[0];
    assert_eq!(
        init.command.as_deref(),
        Some(&["weft-redirector".to_owned()][..])
    );
    let args = init.args.clone().expect("init args");
    assert_eq!(args[0], "init", "{label}");
    assert!(args.iter().any(|a| a.starts_with("--mode=")), "{label}");
    assert!(
        args.contains(&format!("--proxy-uid={}", expect.proxy_uid)),
        "{label}: {args:?}"
    );
    let isc = init
        .security_context
        .as_ref()
        .expect("init security context");
    assert_eq!(isc.run_as_user, Some(0), "{label}");
    assert_eq!(isc.run_as_non_root, Some(false), "{label}");
    let caps = isc.capabilities.as_ref().expect("caps");
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_owned(), "NET_RAW".to_owned()][..]),
        "{label}"
    );
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "{label}"
    );

    // weft-proxy.
    assert_eq!(
        proxy.command.as_deref(),
        Some(&["weft-proxy".to_owned()][..])
    );
    let psc = proxy
        .security_context
        .as_ref()
        .expect("proxy security context");
    assert_eq!(psc.run_as_user, Some(expect.proxy_uid), "{label}");
    assert_eq!(psc.run_as_non_root, Some(true), "{label}");
    assert_eq!(
        psc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()]),
        "{label}"
    );
    if expect.proxy_uid == 1337 {
        assert_eq!(psc.run_as_group, Some(1337), "{label}");
        assert_eq!(psc.read_only_root_filesystem, Some(true), "{label}");
        assert_eq!(psc.allow_privilege_escalation, Some(false), "{label}");
    }
    assert!(
        ready_probe_ok(proxy.readiness_probe.as_ref()),
        "{label}: readiness"
    );
    assert!(
        ready_probe_ok(proxy.startup_probe.as_ref()),
        "{label}: startup"
    );
    for (var, field) in [
        (boot::ENV_POD_NAME, "metadata.name"),
        (boot::ENV_POD_NAMESPACE, "metadata.namespace"),
        (boot::ENV_INSTANCE_IP, "status.podIP"),
        (boot::ENV_SERVICE_ACCOUNT, "spec.serviceAccountName"),
        (boot::ENV_NODE_NAME, "spec.nodeName"),
    ] {
        assert_eq!(env_field(proxy, var), Some(field), "{label}: {var}");
    }
    assert!(env(proxy, boot::ENV_CONTROL_PLANE).is_some(), "{label}");
    assert_eq!(
        env(proxy, boot::ENV_TRUST_DOMAIN),
        Some("cluster.local"),
        "{label}"
    );
    assert_eq!(
        env(proxy, boot::ENV_TOKEN_PATH),
        Some(boot::DEFAULT_TOKEN_PATH)
    );
    assert_eq!(
        env(proxy, boot::ENV_ROOT_CERT_PATH),
        Some(boot::DEFAULT_ROOT_CERT_PATH)
    );
    assert_eq!(
        env(proxy, boot::ENV_CREDENTIALS_DIR),
        Some(boot::DEFAULT_CREDENTIALS_DIR)
    );
    let drain = env(proxy, boot::ENV_DRAIN_DURATION).expect("drain duration");
    humantime::parse_duration(drain).expect("drain duration is humantime");
    assert_eq!(
        env(proxy, boot::ENV_APP_CONTAINERS),
        Some(app_names.join(",").as_str()),
        "{label}"
    );
    let ports: Vec<AppPort> =
        serde_json::from_str(env(proxy, boot::ENV_APP_PORTS).expect("app ports")).expect("json");
    let expected_ports: Vec<u16> = before_spec
        .containers
        .iter()
        .filter(|c| !is_user_proxy_or_init(&c.name))
        .chain(
            before_spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always")),
        )
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| u16::try_from(p.container_port).expect("port"))
        .collect();
    assert_eq!(
        ports.iter().map(|p| p.container_port).collect::<Vec<_>>(),
        expected_ports,
        "{label}: app ports"
    );

    // Probes: every HTTP/TCP/gRPC probe of an app container rewritten, its original in the table.
    let status_port: u16 = env(proxy, boot::ENV_STATUS_PORT)
        .expect("status port")
        .parse()
        .expect("number");
    let table: AppProbes = env(proxy, boot::ENV_APP_PROBES)
        .map(|t| serde_json::from_str(t).expect("probe table json"))
        .unwrap_or_default();
    let mut expected_entries = 0;
    let befores = before_spec.containers.iter().chain(
        before_spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always")),
    );
    for b in befores.filter(|c| !is_user_proxy_or_init(&c.name)) {
        let a = container(after, &b.name).expect("app container kept");
        for (kind, bp, ap) in [
            ("livez", &b.liveness_probe, &a.liveness_probe),
            ("readyz", &b.readiness_probe, &a.readiness_probe),
            ("startupz", &b.startup_probe, &a.startup_probe),
        ] {
            let Some(bp) = bp else {
                assert!(ap.is_none(), "{label}");
                continue;
            };
            let ap = ap.as_ref().expect("probe kept");
            if bp.exec.is_some() {
                assert_eq!(bp, ap, "{label}: exec probes are left alone");
                continue;
            }
            expected_entries += 1;
            let path = format!("/app-health/{}/{kind}", b.name);
            let h = ap.http_get.as_ref().expect("rewritten to httpGet");
            assert_eq!(h.path.as_deref(), Some(path.as_str()), "{label}");
            assert_eq!(h.port, IntOrString::Int(i32::from(status_port)), "{label}");
            assert_eq!(ap.period_seconds, bp.period_seconds, "{label}: timing kept");
            let entry = table
                .get(&path)
                .unwrap_or_else(|| panic!("{label}: {path} in table"));
            let original_port = |p: &IntOrString| match p {
                IntOrString::Int(n) => u16::try_from(*n).expect("port"),
                IntOrString::String(name) => b
                    .ports
                    .iter()
                    .flatten()
                    .find(|cp| cp.name.as_deref() == Some(name))
                    .map(|cp| u16::try_from(cp.container_port).expect("port"))
                    .expect("named port resolves"),
            };
            if let Some(bh) = &bp.http_get {
                let eh = entry.http_get.as_ref().expect("http entry");
                assert_eq!(eh.port, original_port(&bh.port), "{label}: {path}");
                assert_eq!(eh.path, bh.path, "{label}: {path}");
            } else if let Some(bt) = &bp.tcp_socket {
                assert_eq!(
                    entry.tcp_socket.as_ref().map(|t| t.port),
                    Some(original_port(&bt.port))
                );
            } else if let Some(bg) = &bp.grpc {
                assert_eq!(
                    entry.grpc.as_ref().map(|g| i32::from(g.port)),
                    Some(bg.port)
                );
            }
        }
    }
    assert_eq!(table.len(), expected_entries, "{label}: probe table size");

    // Volumes and mounts.
    let vols = spec.volumes.clone().unwrap_or_default();
    let vol = |n: &str| vols.iter().find(|v| v.name == n).cloned();
    let token = vol("weft-token").expect("token volume");
    let sat = token
        .projected
        .as_ref()
        .expect("projected")
        .sources
        .as_ref()
        .expect("sources")[0]
        .service_account_token
        .clone()
        .expect("sa token");
    assert_eq!(sat.audience.as_deref(), Some(boot::DEFAULT_CA_AUDIENCE));
    assert_eq!(sat.expiration_seconds, Some(43_200));
    assert_eq!(sat.path, "weft-token");
    let root = vol("weft-root-cert").expect("root cert volume");
    assert_eq!(
        root.config_map.as_ref().map(|c| c.name.as_str()),
        Some("weft-ca-root-cert")
    );
    let creds = vol("weft-credentials").expect("credentials volume");
    assert_eq!(
        creds.empty_dir.as_ref().and_then(|e| e.medium.as_deref()),
        Some("Memory")
    );
    let mounts = proxy.volume_mounts.clone().unwrap_or_default();
    for (name, path) in [
        ("weft-token", "/var/run/secrets/tokens"),
        ("weft-root-cert", "/var/run/weft/root"),
        ("weft-credentials", "/var/run/weft/credentials"),
    ] {
        assert!(
            mounts
                .iter()
                .any(|m| m.name == name && m.mount_path == path),
            "{label}: mount {name} at {path}"
        );
    }
    for v in before_spec.volumes.iter().flatten() {
        assert!(
            vol(&v.name).is_some(),
            "{label}: user volume {} kept",
            v.name
        );
    }

    // Labels and annotations.
    let labels = after.metadata.labels.clone().unwrap_or_default();
    let before_labels = before.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("security.istio.io/tlsMode"),
        Some(
            before_labels
                .get("security.istio.io/tlsMode")
                .unwrap_or(&"istio".to_owned())
        ),
        "{label}"
    );
    assert!(
        labels
            .get("service.istio.io/canonical-name")
            .is_some_and(|n| !n.is_empty()),
        "{label}"
    );
    assert!(
        labels.contains_key("service.istio.io/canonical-revision"),
        "{label}"
    );
    for (k, v) in &before_labels {
        assert_eq!(labels.get(k), Some(v), "{label}: user label {k} kept");
    }
    let anns: BTreeMap<String, String> = after.metadata.annotations.clone().unwrap_or_default();
    let status =
        SidecarStatus::parse(anns.get(STATUS).expect("status annotation")).expect("status parses");
    let mut status_containers: Vec<&str> = status.container_names().collect();
    status_containers.sort_unstable();
    let mut expected_status = vec!["weft-init", "weft-proxy"];
    expected_status.sort_unstable();
    assert_eq!(status_containers, expected_status, "{label}");
    assert_eq!(
        status.volumes,
        Some(vec![
            "weft-token".to_owned(),
            "weft-root-cert".to_owned(),
            "weft-credentials".to_owned()
        ]),
        "{label}"
    );
    if let Some(first) = app_names.first() {
        assert_eq!(
            anns.get("kubectl.kubernetes.io/default-container")
                .map(String::as_str),
            Some(*first),
            "{label}"
        );
    }
    assert_eq!(
        anns.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        anns.get("prometheus.io/port").map(String::as_str),
        Some("15020")
    );
    assert_eq!(
        anns.get("prometheus.io/path").map(String::as_str),
        Some("/stats/prometheus")
    );
    let before_anns = before.metadata.annotations.clone().unwrap_or_default();
    for (k, v) in &before_anns {
        assert_eq!(anns.get(k), Some(v), "{label}: user annotation {k} kept");
    }
}

/// Applies a JSON patch to the serialized pod and checks it gives `after`.
pub fn check_patch(label: &str, before: &Pod, after: &Pod, patch: &json_patch::Patch) {
    let mut doc = serde_json::to_value(before).expect("serialize");
    json_patch::patch(&mut doc, patch).unwrap_or_else(|e| panic!("{label}: patch applies: {e}"));
    let patched: Pod = serde_json::from_value(doc).expect("patched pod parses");
    assert_eq!(&patched, after, "{label}: patch gives the injected pod");
}
