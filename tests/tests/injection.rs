//! Sidecar injection end to end on a local node: pods of a namespace labelled
//! `istio-injection=enabled` go through the running `weft-webhook` over HTTPS as real
//! AdmissionReviews; the returned JSON patch is applied and the patched pod runs, so the
//! injected `weft-init` and `weft-proxy` are what carry its traffic.

use std::time::Duration;

use weft_tests::localnode::{LocalNode, NodeOptions, PodRef};
use weft_tests::sample::HttpReport;

/// The user's YAML: a labelled namespace, two services and their Deployments, written as a
/// user would (no sidecar anywhere), with a readiness probe on the server.
const GENESIS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: genesis
  labels: {istio-injection: enabled}
---
apiVersion: v1
kind: Service
metadata: {name: service-b, namespace: genesis}
spec:
  selector: {app: service-b}
  ports: [{name: http, port: 8080, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: service-b, namespace: genesis}
spec:
  replicas: 2
  selector: {matchLabels: {app: service-b}}
  template:
    metadata: {labels: {app: service-b, version: v1}}
    spec:
      serviceAccountName: service-b
      containers:
      - name: app
        image: ghcr.io/weft-mesh/sample-app:dev
        command: [weft-sample-app, serve, --http, "8080"]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        ports: [{name: http, containerPort: 8080}]
        securityContext: {runAsUser: 1000}
        readinessProbe:
          httpGet: {path: /healthz, port: http}
          periodSeconds: 1
        livenessProbe:
          tcpSocket: {port: 8080}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: service-a, namespace: genesis}
spec:
  selector: {matchLabels: {app: service-a}}
  template:
    metadata: {labels: {app: service-a}}
    spec:
      serviceAccountName: service-a
      containers:
      - name: app
        image: ghcr.io/weft-mesh/sample-app:dev
        command: [weft-sample-app, serve, --http, "8081"]
        securityContext: {runAsUser: 1000}
"#;

fn call_b(node: &LocalNode, a: &PodRef, count: &str) -> HttpReport {
    node.exec_json(
        a,
        &[
            "weft-sample-app",
            "http",
            "http://service-b:8080/",
            "--count",
            count,
        ],
    )
    .expect("http report")
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn deployments_in_a_labelled_namespace_are_meshed_by_the_webhook() {
    for native in [true, false] {
        let node = LocalNode::start_with(NodeOptions {
            native_sidecars: native,
            ..Default::default()
        })
        .expect("node");
        let pods = node.apply_yaml(GENESIS).expect("apply");
        assert_eq!(pods.len(), 3, "two service-b replicas and one service-a");
        let a = node.pod("genesis", "service-a-0").expect("service-a pod");
        let b0 = node.pod("genesis", "service-b-0").expect("service-b pod");

        // What the webhook added, as the pod runs.
        let (inits, containers) = node.pod_containers(&b0).expect("containers");
        if native {
            assert_eq!(
                inits,
                ["weft-init", "weft-proxy"],
                "native sidecar after the init step"
            );
            assert_eq!(containers, ["app"]);
        } else {
            assert_eq!(inits, ["weft-init"]);
            assert_eq!(
                containers,
                ["weft-proxy", "app"],
                "classic: the proxy first, with a postStart wait"
            );
        }
        let logs = node.logs(&b0, "weft-init");
        assert!(
            logs.is_empty() || !logs.to_lowercase().contains("error"),
            "{logs}"
        );

        // The injected init step and proxy carry the traffic: mTLS with identities, spread
        // over both replicas.
        let r = call_b(&node, &a, "20");
        assert_eq!(r.ok, 20, "native={native}: {r:?}");
        assert_eq!(r.servers.len(), 2, "both replicas answered: {r:?}");
        assert_eq!(
            r.replies[0].caller(),
            Some("spiffe://cluster.local/ns/genesis/sa/service-a"),
            "{r:?}"
        );
        // The rewritten readiness probe (kubelet → :15020/app-health/app/readyz → the app on
        // localhost) passed: run_pod waited for it. It keeps passing under STRICT mTLS.
        node.apply_yaml(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: genesis}\nspec: {mtls: {mode: STRICT}}\n",
        )
        .expect("strict");
        node.wait_config_applied(Duration::from_secs(10))
            .expect("applied");
        let (status, _) = node
            .http_get(std::net::IpAddr::V4(b0.ip), 15020, "/app-health/app/readyz")
            .expect("probe");
        assert_eq!(status, 200, "app probe through the proxy under STRICT");
        let (status, _) = node
            .http_get(std::net::IpAddr::V4(b0.ip), 15020, "/app-health/app/livez")
            .expect("probe");
        assert_eq!(status, 200, "tcp liveness probe through the proxy");
        let r = call_b(&node, &a, "4");
        assert_eq!(r.ok, 4, "mesh traffic under STRICT: {r:?}");
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_job_pod_completes_in_both_sidecar_modes() {
    for native in [true, false] {
        let node = LocalNode::start_with(NodeOptions {
            native_sidecars: native,
            ..Default::default()
        })
        .expect("node");
        node.apply_yaml(GENESIS).expect("apply");
        // The Job pattern: the app does its work; in classic mode it then tells the proxy it
        // is done (native sidecars are stopped by the kubelet after the app exits).
        let command = if native {
            r#"[weft-sample-app, http, "http://service-b:8080/job"]"#
        } else {
            r#"[/bin/sh, -c, "weft-sample-app http http://service-b:8080/job && weft-sample-app quit"]"#
        };
        let job = format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: report, namespace: genesis, labels: {{job-name: report}}}}
spec:
  restartPolicy: Never
  serviceAccountName: reporter
  containers:
  - name: job
    image: ghcr.io/weft-mesh/sample-app:dev
    command: {command}
    securityContext: {{runAsUser: 1000}}
"#
        );
        let pods = node.apply_yaml(&job).expect("job pod");
        let statuses = node
            .wait_completed(&pods[0], Duration::from_secs(30))
            .expect("completes");
        assert!(statuses["job"].success(), "native={native}: {statuses:?}");
        assert!(
            statuses.get("weft-proxy").is_some_and(|s| s.success()),
            "native={native}: the proxy exits 0 when the job is done: {statuses:?}\n{}",
            node.logs(&pods[0], "weft-proxy")
        );
        let log = node.logs(&pods[0], "job");
        assert!(
            log.contains("\"ok\":1"),
            "the job's request went through the mesh: {log}"
        );
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn invalid_annotations_deny_the_pod_and_opt_outs_are_honoured() {
    let node = LocalNode::start_with(NodeOptions::default()).expect("node");
    node.label_namespace("genesis", "istio-injection", "enabled");
    let bad = r#"
apiVersion: v1
kind: Pod
metadata:
  name: bad
  namespace: genesis
  annotations: {traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.0.0.0/33"}
spec:
  containers: [{name: app, command: [weft-sample-app, serve, --http, "8080"]}]
"#;
    let err = node.apply_yaml(bad).expect_err("denied").to_string();
    assert!(
        err.contains("denied")
            && err.contains("excludeOutboundIPRanges")
            && err.contains("10.0.0.0/33"),
        "{err}"
    );
    let opt_out = r#"
apiVersion: v1
kind: Pod
metadata:
  name: plain
  namespace: genesis
  labels: {sidecar.istio.io/inject: "false"}
spec:
  containers: [{name: app, command: [weft-sample-app, serve, --http, "8080"]}]
"#;
    let pods = node.apply_yaml(opt_out).expect("runs");
    let (inits, containers) = node.pod_containers(&pods[0]).expect("containers");
    assert!(
        inits.is_empty() && containers == ["app"],
        "opted out: {inits:?} {containers:?}"
    );
    // Outside a labelled namespace nothing is injected either.
    let other = opt_out
        .replace("namespace: genesis", "namespace: elsewhere")
        .replace("sidecar.istio.io/inject: \"false\"", "app: other");
    let pods = node.apply_yaml(&other).expect("runs");
    let (inits, _) = node.pod_containers(&pods[0]).expect("containers");
    assert!(inits.is_empty(), "{inits:?}");
}
