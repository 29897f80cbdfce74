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
        None,
        "concurrency 0 = proxy default"
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
