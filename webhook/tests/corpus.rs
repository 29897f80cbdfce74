//! Every input of Istio's injection corpus (`shared/corpus/injection/inputs`) is injected, in
//! native and classic mode, and the result checked against the invariants of an injected pod
//! (not byte-compared with Istio's output: Weft's proxy is a different one). The
//! `traffic-annotations-bad-*` inputs must be denied, naming the annotation and value. Istio's
//! own injected outputs must be recognised as injected and left unchanged.

mod common;

use common::{
    Expect, check_injected, check_patch, corpus_dir, corpus_inputs, file_name, is_bad, pods_in,
};
use weft_webhook::inject::{Denial, InjectContext, Outcome, Skip, inject};
use weft_webhook::manifest::inject_yaml;
use weft_webhook::mesh::{MeshConfig, NativeSidecar};

fn mesh(native: bool) -> MeshConfig {
    MeshConfig {
        native_sidecar: if native {
            NativeSidecar::Enabled
        } else {
            NativeSidecar::Disabled
        },
        ..MeshConfig::default()
    }
}

/// How the corpus's inputs are meant to come out.
fn expected_skip(file: &str) -> Option<Skip> {
    match file {
        "hello-ignore.yaml" => Some(Skip::OptedOut),
        _ => None,
    }
}

#[test]
fn every_input_is_injected_with_the_invariants() {
    let mut injected = 0;
    for path in corpus_inputs().into_iter().filter(|p| !is_bad(p)) {
        let file = file_name(&path);
        let yaml = std::fs::read_to_string(&path).expect("read input");
        for native_mesh in [true, false] {
            let mesh = mesh(native_mesh);
            for (object, workload, pod) in pods_in(&yaml) {
                let label = format!("{file} {object} native={native_mesh}");
                let ctx = InjectContext {
                    workload_name: workload,
                    ..InjectContext::default()
                };
                let out = inject(&pod, &mesh, &ctx).unwrap_or_else(|e| panic!("{label}: {e}"));
                let injection = match (out, expected_skip(&file)) {
                    (Outcome::Skip(s), Some(expected)) => {
                        assert_eq!(s, expected, "{label}");
                        continue;
                    }
                    (Outcome::Skip(s), None) => panic!("{label}: unexpectedly skipped: {s}"),
                    (Outcome::Injected(i), None) => i,
                    (Outcome::Injected(_), Some(s)) => panic!("{label}: should be skipped: {s}"),
                };
                // The per-pod annotation wins over the mesh default.
                let native = match file.as_str() {
                    "native-sidecar-opt-out.yaml" => false,
                    _ => native_mesh,
                };
                let proxy_uid = if file == "proxy-override.yaml" {
                    1234
                } else {
                    1337
                };
                check_injected(&label, &pod, &injection.pod, Expect { native, proxy_uid });
                check_patch(&label, &pod, &injection.pod, &injection.patch);

                // Idempotent: the injected pod is recognised and left alone.
                match inject(&injection.pod, &mesh, &ctx).expect("reinjection") {
                    Outcome::Skip(Skip::AlreadyInjected) => {}
                    other => panic!("{label}: reinjection must be a no-op, got {other:?}"),
                }
                injected += 1;
            }
        }
    }
    assert!(injected >= 30, "only {injected} pods injected");
}

#[test]
fn bad_annotations_are_denied_naming_annotation_and_value() {
    let bad: Vec<_> = corpus_inputs().into_iter().filter(|p| is_bad(p)).collect();
    assert_eq!(bad.len(), 2, "{bad:?}");
    for path in bad {
        let file = file_name(&path);
        let expected = file
            .trim_start_matches("traffic-annotations-bad-")
            .trim_end_matches(".yaml")
            .to_owned();
        let yaml = std::fs::read_to_string(&path).expect("read input");
        for (object, _, pod) in pods_in(&yaml) {
            let denial = inject(&pod, &MeshConfig::default(), &InjectContext::default())
                .expect_err(&format!("{file} {object} must be denied"));
            let message = denial.to_string();
            assert!(
                message.to_lowercase().contains(&expected),
                "{file}: {message:?} should name {expected}"
            );
            assert!(
                message.contains("\"bad\""),
                "{file}: {message:?} should quote the value"
            );
            assert!(matches!(denial, Denial::Annotation { .. }), "{file}");
        }
        // The manifest path says the same, with the document.
        let e = inject_yaml(&yaml, &MeshConfig::default(), None)
            .expect_err("manifest injection denied")
            .to_string();
        assert!(
            e.to_lowercase().contains(&expected) && e.contains("document 1"),
            "{e}"
        );
    }
}

#[test]
fn specific_annotations_are_honoured() {
    let read =
        |f: &str| std::fs::read_to_string(corpus_dir().join("inputs").join(f)).expect("read input");
    let inject_one = |f: &str| {
        let (_, workload, pod) = pods_in(&read(f)).remove(0);
        let ctx = InjectContext {
            workload_name: workload,
            ..InjectContext::default()
        };
        match inject(&pod, &MeshConfig::default(), &ctx).expect("injects") {
            Outcome::Injected(i) => i,
            other => panic!("{f}: {other:?}"),
        }
    };
    let init_args = |i: &weft_webhook::Injection| {
        common::container(&i.pod, "weft-init")
            .and_then(|c| c.args.clone())
            .expect("init args")
    };

    // Traffic annotations reach weft-redirector; proxy.istio.io/config is read.
    let t = inject_one("traffic-annotations.yaml");
    let args = init_args(&t);
    for expected in [
        "--include-outbound-cidrs=127.0.0.0/24,10.96.0.0/24",
        "--exclude-outbound-cidrs=10.96.0.0/24,10.96.0.0/24",
        "--include-inbound-ports=1,2,3",
        "--exclude-inbound-ports=15020,15021,15090,4,5,6",
        "--exclude-outbound-ports=7,8,9",
    ] {
        assert!(
            args.contains(&expected.to_owned()),
            "{expected} in {args:?}"
        );
    }
    let proxy = common::container(&t.pod, "weft-proxy").expect("proxy");
    assert_eq!(common::env(proxy, "WEFT_CONTROL_PLANE"), Some("foo:123"));
    assert_eq!(common::env(proxy, "FOO"), Some("bar"));
    assert_eq!(
        common::env(proxy, "WEFT_CONCURRENCY"),
        Some("4"),
        "concurrency 0 with proxyCPU 4000m: four workers, as Istio's test input expects"
    );
    let res = proxy.resources.as_ref().expect("resources");
    assert_eq!(res.requests.as_ref().expect("requests")["cpu"].0, "4000m");
    assert!(
        res.limits.is_none(),
        "annotations replace the defaults as a whole"
    );

    // Empty includes disable capture.
    let e = inject_one("traffic-annotations-empty-includes.yaml");
    let args = init_args(&e);
    assert!(
        args.contains(&"--include-inbound-ports=".to_owned()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--include-outbound-cidrs=".to_owned()),
        "{args:?}"
    );

    // Resource annotations.
    let r = inject_one("resource_annotations.yaml");
    let res = common::container(&r.pod, "weft-proxy")
        .and_then(|c| c.resources.clone())
        .expect("resources");
    assert_eq!(res.requests.as_ref().expect("requests")["cpu"].0, "100m");
    assert_eq!(res.requests.as_ref().expect("requests")["memory"].0, "1Gi");
    assert_eq!(res.limits.as_ref().expect("limits")["cpu"].0, "1000m");
    assert_eq!(res.limits.as_ref().expect("limits")["memory"].0, "2Gi");

    // tlsMode set by the user is kept.
    let m = inject_one("hello-mtls-not-ready.yaml");
    assert_eq!(
        m.pod.metadata.labels.as_ref().expect("labels")["security.istio.io/tlsMode"],
        "disabled"
    );

    // Overrides from the user's istio-proxy container are applied to weft-proxy.
    let o = inject_one("proxy-override.yaml");
    let proxy = common::container(&o.pod, "weft-proxy").expect("proxy");
    assert_eq!(proxy.tty, Some(true));
    assert_eq!(proxy.termination_message_path.as_deref(), Some("/foo/bar"));
    assert!(
        proxy
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "certs")
    );
    assert_eq!(
        proxy
            .resources
            .as_ref()
            .expect("res")
            .requests
            .as_ref()
            .expect("req")["cpu"]
            .0,
        "123m"
    );
    assert!(common::container(&o.pod, "istio-proxy").is_none());
    assert!(common::container(&o.pod, "istio-init").is_none());
    assert!(
        o.warnings.iter().any(|w| w.contains("istio-init")),
        "{:?}",
        o.warnings
    );
    assert!(init_args(&o).contains(&"--proxy-uid=1234".to_owned()));

    // Canonical names come from labels, else the workload.
    let h = inject_one("hello.yaml");
    let labels = h.pod.metadata.labels.as_ref().expect("labels");
    assert_eq!(labels["service.istio.io/canonical-name"], "hello");
    assert_eq!(labels["service.istio.io/canonical-revision"], "latest");
    let g = inject_one("only-proxy-container.yaml");
    assert_eq!(
        g.pod.metadata.labels.as_ref().expect("labels")["service.istio.io/canonical-name"],
        "istio-ingressgateway"
    );
}

#[test]
fn istio_injected_pods_are_left_unchanged() {
    let dir = corpus_dir().join("injected");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("read injected") {
        let path = entry.expect("entry").path();
        let yaml = std::fs::read_to_string(&path).expect("read");
        for (object, _, pod) in pods_in(&yaml) {
            let label = format!("{} {object}", file_name(&path));
            let out = inject(&pod, &MeshConfig::default(), &InjectContext::default())
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let expected = if file_name(&path).starts_with("hello-ignore") {
                Skip::OptedOut
            } else {
                Skip::AlreadyInjected
            };
            assert!(
                matches!(out, Outcome::Skip(s) if s == expected),
                "{label}: {out:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 9);
}

#[test]
fn manifests_inject_every_document_and_pass_others_through() {
    for path in corpus_inputs().into_iter().filter(|p| !is_bad(p)) {
        let yaml = std::fs::read_to_string(&path).expect("read input");
        let out = inject_yaml(&yaml, &MeshConfig::default(), None)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let text = out.to_yaml().expect("yaml");
        // Injecting the output again changes nothing.
        let again = inject_yaml(&text, &MeshConfig::default(), None).expect("reinject");
        assert_eq!(again.to_yaml().expect("yaml"), text, "{}", path.display());
        let pods = pods_in(&yaml).len();
        assert_eq!(
            text.matches("sidecar.istio.io/status").count(),
            if file_name(&path) == "hello-ignore.yaml" {
                0
            } else {
                pods
            },
            "{}",
            path.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Annotations of issue 3 point 5 that no corpus input carries: a pod made here for each, the
// injected pod checked for what the annotation must change.

const APP_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: app-1
  namespace: genesis
  labels: {app: app}
  annotations: {}
spec:
  serviceAccountName: app
  containers:
    - name: app
      image: app:1
      ports: [{name: http, containerPort: 8080}]
      readinessProbe:
        httpGet: {path: /ready, port: http}
      livenessProbe:
        tcpSocket: {port: 8080}
"#;

/// The app pod with `annotations`.
fn annotated(annotations: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Pod {
    let mut pod: k8s_openapi::api::core::v1::Pod =
        serde_yaml_ng::from_str(APP_POD).expect("pod yaml");
    let anns = pod
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    for (k, v) in annotations {
        anns.insert((*k).to_owned(), (*v).to_owned());
    }
    pod
}

fn try_inject(
    annotations: &[(&str, &str)],
    mesh: &MeshConfig,
) -> Result<weft_webhook::Injection, Denial> {
    let pod = annotated(annotations);
    match inject(&pod, mesh, &InjectContext::default())? {
        Outcome::Injected(i) => {
            check_patch(&format!("{annotations:?}"), &pod, &i.pod, &i.patch);
            Ok(*i)
        }
        Outcome::Skip(s) => panic!("{annotations:?}: skipped: {s}"),
    }
}

fn injected(annotations: &[(&str, &str)], mesh: &MeshConfig) -> weft_webhook::Injection {
    try_inject(annotations, mesh).unwrap_or_else(|e| panic!("{annotations:?}: {e}"))
}

/// Denied, with a message that names the annotation and quotes the value.
fn denied(annotation: &str, value: &str, mesh: &MeshConfig) -> String {
    let denial = try_inject(&[(annotation, value)], mesh)
        .map(|i| i.pod)
        .expect_err(&format!("{annotation}={value:?} must be denied"));
    let message = denial.to_string();
    assert!(
        matches!(denial, Denial::Annotation { .. }),
        "{annotation}: {denial:?}"
    );
    assert!(
        message.contains(annotation),
        "{message:?} names {annotation}"
    );
    assert!(
        message.contains(&format!("{value:?}")),
        "{message:?} quotes {value:?}"
    );
    message
}

fn init_args(i: &weft_webhook::Injection) -> Vec<String> {
    common::container(&i.pod, "weft-init")
        .and_then(|c| c.args.clone())
        .expect("weft-init args")
}

fn proxy(i: &weft_webhook::Injection) -> &k8s_openapi::api::core::v1::Container {
    common::container(&i.pod, "weft-proxy").expect("weft-proxy")
}

fn has_arg(i: &weft_webhook::Injection, arg: &str) {
    let args = init_args(i);
    assert!(args.iter().any(|a| a == arg), "{arg} in {args:?}");
}

#[test]
fn traffic_annotations_without_corpus_inputs() {
    let mesh = MeshConfig::default();
    let i = injected(
        &[(
            "traffic.sidecar.istio.io/includeOutboundPorts",
            "5432, 6379",
        )],
        &mesh,
    );
    has_arg(&i, "--include-outbound-ports=5432,6379");
    denied(
        "traffic.sidecar.istio.io/includeOutboundPorts",
        "5432,x",
        &mesh,
    );

    let i = injected(
        &[("traffic.sidecar.istio.io/excludeInterfaces", "eth1,net1")],
        &mesh,
    );
    has_arg(&i, "--exclude-interfaces=eth1,net1");
    denied(
        "traffic.sidecar.istio.io/excludeInterfaces",
        "eth1,not an if",
        &mesh,
    );

    let i = injected(
        &[(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.96.0.0/12,fd00::/8",
        )],
        &mesh,
    );
    has_arg(&i, "--exclude-outbound-cidrs=10.96.0.0/12,fd00::/8");
    let message = denied(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "10.96.0.0/33",
        &mesh,
    );
    assert!(message.contains("not a CIDR"), "{message}");
}

#[test]
fn interception_modes() {
    let mesh = MeshConfig::default();
    for (mode, flag) in [("REDIRECT", "--mode=redirect"), ("EBPF", "--mode=ebpf")] {
        let i = injected(&[("sidecar.istio.io/interceptionMode", mode)], &mesh);
        has_arg(&i, flag);
        check_injected(
            mode,
            &annotated(&[("sidecar.istio.io/interceptionMode", mode)]),
            &i.pod,
            Expect {
                native: true,
                proxy_uid: 1337,
            },
        );
    }
    // NONE: no redirection, so no init container; the proxy is still there.
    let i = injected(&[("sidecar.istio.io/interceptionMode", "NONE")], &mesh);
    assert!(common::container(&i.pod, "weft-init").is_none());
    let spec = i.pod.spec.as_ref().expect("spec");
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    assert_eq!(inits.len(), 1, "only the native proxy: {inits:?}");
    assert_eq!(inits[0].name, "weft-proxy");
    assert_eq!(inits[0].restart_policy.as_deref(), Some("Always"));
    let status =
        i.pod.metadata.annotations.as_ref().expect("annotations")["sidecar.istio.io/status"]
            .clone();
    assert!(
        !status.contains("weft-init") && status.contains("weft-proxy"),
        "{status}"
    );

    let message = denied("sidecar.istio.io/interceptionMode", "TPROXY", &mesh);
    assert!(message.contains("TPROXY is not supported"), "{message}");
    denied("sidecar.istio.io/interceptionMode", "SOMETIMES", &mesh);
}

#[test]
fn log_level_reaches_the_proxy() {
    let mesh = MeshConfig::default();
    for (value, filter) in [
        ("warning", "warn"),
        ("debug", "debug"),
        (
            "info,weft_proxy::inbound=trace",
            "info,weft_proxy::inbound=trace",
        ),
    ] {
        let i = injected(&[("sidecar.istio.io/logLevel", value)], &mesh);
        assert_eq!(
            common::env(proxy(&i), "WEFT_LOG_LEVEL"),
            Some(filter),
            "{value}"
        );
    }
    denied("sidecar.istio.io/logLevel", "loud", &mesh);
}

#[test]
fn user_volumes_are_added_and_mounted() {
    let mesh = MeshConfig::default();
    let i = injected(
        &[
            (
                "sidecar.istio.io/userVolume",
                r#"[{"name": "extra-certs", "secret": {"secretName": "extra"}}]"#,
            ),
            (
                "sidecar.istio.io/userVolumeMount",
                r#"[{"name": "extra-certs", "mountPath": "/etc/extra", "readOnly": true}]"#,
            ),
        ],
        &mesh,
    );
    let volumes = i
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let extra = volumes
        .iter()
        .find(|v| v.name == "extra-certs")
        .expect("user volume in the pod");
    assert_eq!(
        extra.secret.as_ref().and_then(|s| s.secret_name.as_deref()),
        Some("extra")
    );
    let mount = proxy(&i)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "extra-certs")
        .expect("user mount on the proxy");
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/etc/extra", Some(true))
    );
    // The app's own container is not given the mount.
    let app = common::container(&i.pod, "app").expect("app");
    assert!(
        app.volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != "extra-certs")
    );

    // Istio's older object form.
    let i = injected(
        &[
            (
                "sidecar.istio.io/userVolume",
                r#"{"cache": {"emptyDir": {}}}"#,
            ),
            (
                "sidecar.istio.io/userVolumeMount",
                r#"{"cache": {"mountPath": "/cache"}}"#,
            ),
        ],
        &mesh,
    );
    assert!(
        proxy(&i)
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "cache" && m.mount_path == "/cache")
    );

    let message = denied(
        "sidecar.istio.io/userVolume",
        r#"[{"name": "extra-certs", "secret": "#,
        &mesh,
    );
    assert!(message.contains("not valid JSON"), "{message}");
    let message = denied(
        "sidecar.istio.io/userVolumeMount",
        r#"[{"name": "x", "mountPath": "/x"}"#,
        &mesh,
    );
    assert!(message.contains("not valid JSON"), "{message}");
    let message = denied(
        "sidecar.istio.io/userVolumeMount",
        r#"[{"name": "nowhere", "mountPath": "/x"}]"#,
        &mesh,
    );
    assert!(message.contains("no volume named \"nowhere\""), "{message}");
}

fn classic() -> MeshConfig {
    MeshConfig {
        native_sidecar: NativeSidecar::Disabled,
        ..MeshConfig::default()
    }
}

fn post_start(c: &k8s_openapi::api::core::v1::Container) -> Option<Vec<String>> {
    c.lifecycle
        .as_ref()
        .and_then(|l| l.post_start.as_ref())
        .and_then(|h| h.exec.as_ref())
        .and_then(|e| e.command.clone())
}

#[test]
fn proxy_config_hold_and_drain() {
    const PC: &str = "proxy.istio.io/config";
    let mesh = classic();

    // Classic, hold: the proxy first, its postStart hook holding the app.
    let i = injected(&[(PC, "holdApplicationUntilProxyStarts: true")], &mesh);
    let containers = &i.pod.spec.as_ref().expect("spec").containers;
    assert_eq!(containers[0].name, "weft-proxy");
    let hook = post_start(&containers[0]).expect("postStart hook");
    assert_eq!(&hook[..2], ["weft-proxy", "wait"]);

    // Classic, no hold (Placement::ClassicLast): the proxy last, no hook, started with the app.
    let i = injected(
        &[(PC, "{\"holdApplicationUntilProxyStarts\": false}")],
        &mesh,
    );
    let containers = &i.pod.spec.as_ref().expect("spec").containers;
    let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "weft-proxy"]);
    assert_eq!(post_start(&containers[1]), None);
    assert_eq!(containers[1].lifecycle, None);
    assert_eq!(containers[1].restart_policy, None);
    // The mesh default says the same.
    let no_hold = MeshConfig {
        hold_application_until_proxy_starts: false,
        ..classic()
    };
    let i = injected(&[], &no_hold);
    let containers = &i.pod.spec.as_ref().expect("spec").containers;
    assert_eq!(
        containers.last().map(|c| c.name.as_str()),
        Some("weft-proxy")
    );
    assert_eq!(containers.last().and_then(post_start), None);

    // terminationDrainDuration reaches the proxy.
    let i = injected(
        &[(
            PC,
            "terminationDrainDuration: 17s\nholdApplicationUntilProxyStarts: true",
        )],
        &MeshConfig::default(),
    );
    assert_eq!(common::env(proxy(&i), "WEFT_DRAIN_DURATION"), Some("17s"));
    let i = injected(
        &[(PC, "terminationDrainDuration: 1.5s")],
        &MeshConfig::default(),
    );
    assert_eq!(
        common::env(proxy(&i), "WEFT_DRAIN_DURATION"),
        Some("1s 500ms")
    );

    let message = denied(
        PC,
        "holdApplicationUntilProxyStarts: [",
        &MeshConfig::default(),
    );
    assert!(message.contains("not a valid proxy config"), "{message}");
    let message = denied(
        PC,
        "holdApplicationUntilProxyStarts: maybe",
        &MeshConfig::default(),
    );
    assert!(message.contains("not a valid proxy config"), "{message}");
    let message = denied(PC, "terminationDrainDuration: soon", &MeshConfig::default());
    assert!(message.contains("terminationDrainDuration"), "{message}");
}

#[test]
fn status_port_annotation() {
    const PORT: &str = "status.sidecar.istio.io/port";
    let mesh = MeshConfig::default();

    let i = injected(&[(PORT, "15555")], &mesh);
    let p = proxy(&i);
    assert_eq!(common::env(p, "WEFT_STATUS_PORT"), Some("15555"));
    let args = init_args(&i);
    let excluded = args
        .iter()
        .find_map(|a| a.strip_prefix("--exclude-inbound-ports="))
        .expect("exclude-inbound-ports");
    assert!(excluded.split(',').any(|p| p == "15555"), "{args:?}");
    let app = common::container(&i.pod, "app").expect("app");
    let ready = app
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("rewritten readiness");
    assert_eq!(
        ready.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15555)
    );
    assert_eq!(ready.path.as_deref(), Some("/app-health/app/readyz"));
    let anns = i.pod.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(anns["prometheus.io/port"], "15555");
    // The proxy's own probes stay on the readiness port.
    assert_eq!(
        p.readiness_probe
            .as_ref()
            .and_then(|r| r.http_get.as_ref())
            .map(|h| h.port.clone()),
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021))
    );

    // 0: no status server, so no probe rewriting and no metrics annotations.
    let before = annotated(&[(PORT, "0")]);
    let i = injected(&[(PORT, "0")], &mesh);
    assert_eq!(common::env(proxy(&i), "WEFT_STATUS_PORT"), Some("0"));
    assert_eq!(common::env(proxy(&i), "WEFT_APP_PROBES"), None);
    let app = common::container(&i.pod, "app").expect("app");
    let app_before = &before.spec.as_ref().expect("spec").containers[0];
    assert_eq!(app.readiness_probe, app_before.readiness_probe);
    assert_eq!(app.liveness_probe, app_before.liveness_probe);
    let anns = i.pod.metadata.annotations.as_ref().expect("annotations");
    assert!(!anns.contains_key("prometheus.io/port"), "{anns:?}");

    for bad in ["70000", "-1", "http"] {
        let message = denied(PORT, bad, &mesh);
        assert!(message.contains("not a port"), "{message}");
    }
}

#[test]
fn native_sidecar_annotation_beats_the_mesh() {
    // The mesh says classic, and the cluster is said not to support native sidecars: the
    // annotation still forces native.
    for support in [None, Some(false), Some(true)] {
        let pod = annotated(&[("sidecar.istio.io/nativeSidecar", "true")]);
        let ctx = InjectContext {
            cluster_supports_native_sidecars: support,
            ..InjectContext::default()
        };
        let Outcome::Injected(i) = inject(&pod, &classic(), &ctx).expect("injects") else {
            panic!("not injected");
        };
        check_injected(
            "nativeSidecar=true",
            &pod,
            &i.pod,
            Expect {
                native: true,
                proxy_uid: 1337,
            },
        );
        let spec = i.pod.spec.as_ref().expect("spec");
        assert!(spec.containers.iter().all(|c| c.name != "weft-proxy"));
    }
    let pod = annotated(&[("sidecar.istio.io/nativeSidecar", "false")]);
    let Outcome::Injected(i) =
        inject(&pod, &mesh(true), &InjectContext::default()).expect("injects")
    else {
        panic!("not injected");
    };
    check_injected(
        "nativeSidecar=false",
        &pod,
        &i.pod,
        Expect {
            native: false,
            proxy_uid: 1337,
        },
    );
    denied(
        "sidecar.istio.io/nativeSidecar",
        "sometimes",
        &MeshConfig::default(),
    );
}

#[test]
fn unsupported_istio_annotations_are_warned_about() {
    let i = injected(
        &[
            ("istio.io/rev", "canary"),
            ("ambient.istio.io/redirection", "enabled"),
        ],
        &MeshConfig::default(),
    );
    for name in ["istio.io/rev", "ambient.istio.io/redirection"] {
        assert!(
            i.warnings
                .iter()
                .any(|w| w.starts_with(&format!("{name} is not supported by Weft"))),
            "{name}: {:?}",
            i.warnings
        );
    }
    // The annotations themselves are kept on the pod.
    let anns = i.pod.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(anns["istio.io/rev"], "canary");
    for (name, _) in weft_webhook::inject::annotations::UNSUPPORTED {
        let i = injected(&[(*name, "x")], &MeshConfig::default());
        assert!(
            i.warnings.iter().any(|w| w.contains(name)),
            "{name}: {:?}",
            i.warnings
        );
    }
}
