//! The control plane end to end on a local node: certificates from the mesh CA rotate under
//! load, a control-plane restart fails no request, a config change reaches every proxy, and a
//! new root is trusted live during a rotation.

use std::time::Duration;

use weft_tests::localnode::{LocalNode, NodeOptions, PodRef, fixtures};
use weft_tests::sample::{HttpReport, LoadReport, TcpReport};

fn genesis(node: &LocalNode) -> (PodRef, PodRef) {
    node.create_service(fixtures::service(
        "genesis",
        "service-b",
        &[(8080, "http"), (9000, "tcp-echo")],
    ))
    .expect("service-b");
    let b = node
        .run_pod(fixtures::meshed(fixtures::app_pod(
            "genesis",
            "service-b",
            "service-b",
            "service-b",
            &["--http", "8080", "--tcp-echo", "9000"],
        )))
        .expect("service-b pod");
    let a = node
        .run_pod(fixtures::meshed(fixtures::client_pod(
            "genesis",
            "service-a",
            "service-a",
        )))
        .expect("service-a pod");
    (a, b)
}

fn load(node: &LocalNode, from: &PodRef, seconds: u32) -> weft_tests::localnode::Background {
    node.spawn_exec(
        from,
        &[
            "weft-sample-app",
            "load",
            "http://service-b:8080/",
            "--rps",
            "200",
            "--duration",
            &format!("{seconds}s"),
            "--conns",
            "4",
        ],
    )
    .expect("load")
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn certificates_rotate_under_load_without_a_failed_request() {
    // 10 s certificates: proxies renew every ~5 s, while requests and a long TCP stream flow.
    let node = LocalNode::start_with(NodeOptions {
        cert_ttl: Some(Duration::from_secs(10)),
        ..Default::default()
    })
    .expect("node");
    let (a, b) = genesis(&node);
    let requests = load(&node, &a, 13);
    let stream = node
        .spawn_exec(
            &a,
            &[
                "weft-sample-app",
                "tcp",
                "service-b:9000",
                "--bytes",
                "100000",
                "--over",
                "12s",
                "--timeout",
                "30s",
            ],
        )
        .expect("stream");
    let report: LoadReport = requests.wait_json().expect("load report");
    let t: TcpReport = stream.wait_json().expect("tcp report");
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.ok >= 2500, "{report:?}");
    assert!(
        t.identical && t.error.is_none(),
        "a connection opened before a rotation survives it: {t:?}"
    );
    for pod in [&a, &b] {
        let log = node.logs(pod, "weft-proxy");
        assert!(
            count(&log, "certificate from the CA") >= 3,
            "{}: the first certificate and at least two renewals:\n{log}",
            pod.name
        );
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_control_plane_restart_under_load_fails_no_request() {
    let node = LocalNode::start().expect("node");
    let (a, b) = genesis(&node);
    let requests = load(&node, &a, 8);
    std::thread::sleep(Duration::from_secs(2));
    // Down for two seconds: proxies keep serving their config and reconnect.
    node.restart_control_plane(Duration::from_secs(2))
        .expect("restart");
    let report: LoadReport = requests.wait_json().expect("load report");
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.ok >= 1550, "{report:?}");
    for pod in [&a, &b] {
        let log = node.logs(pod, "weft-proxy");
        assert!(
            log.contains("config stream failed"),
            "{}: saw the control plane go:\n{log}",
            pod.name
        );
        assert!(
            count(&log, "config stream open") >= 2,
            "{}: reconnected:\n{log}",
            pod.name
        );
    }
    // The restarted control plane serves config changes: a new pod is reached.
    node.create_service(fixtures::service("genesis", "late", &[(8080, "http")]))
        .expect("svc");
    node.run_pod(fixtures::meshed(fixtures::app_pod(
        "genesis",
        "late",
        "late",
        "late",
        &["--http", "8080"],
    )))
    .expect("late pod");
    let r: HttpReport = node
        .exec_json(&a, &["weft-sample-app", "http", "http://late:8080/"])
        .expect("report");
    assert_eq!(r.ok, 1, "{r:?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_virtual_service_change_reaches_every_proxy() {
    let node = LocalNode::start().expect("node");
    node.create_service(fixtures::service("genesis", "reviews", &[(8080, "http")]))
        .expect("svc");
    for v in ["v1", "v2"] {
        node.run_pod(fixtures::meshed(fixtures::versioned_pod(
            "genesis",
            &format!("reviews-{v}"),
            "reviews",
            v,
            "reviews",
        )))
        .expect("reviews pod");
    }
    let clients: Vec<PodRef> = (0..3)
        .map(|i| {
            node.run_pod(fixtures::meshed(fixtures::client_pod(
                "genesis",
                &format!("client-{i}"),
                "client",
            )))
            .expect("client")
        })
        .collect();
    let rules = |version: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: genesis}}
spec:
  host: reviews
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: genesis}}
spec:
  hosts: [reviews]
  http: [{{route: [{{destination: {{host: reviews, subset: {version}}}}}]}}]
"#
        )
    };
    for version in ["v2", "v1", "v2"] {
        // apply_yaml returns once every proxy acknowledged the new config.
        node.apply_yaml(&rules(version)).expect("virtual service");
        for c in &clients {
            let r: HttpReport = node
                .exec_json(
                    c,
                    &[
                        "weft-sample-app",
                        "http",
                        "http://reviews:8080/",
                        "--count",
                        "10",
                    ],
                )
                .expect("report");
            assert_eq!(r.ok, 10, "{r:?}");
            assert_eq!(
                r.servers.keys().collect::<Vec<_>>(),
                [&format!("reviews-{version}")],
                "{}: every request goes to {version}",
                c.name
            );
        }
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_new_root_is_trusted_live_during_a_rotation() {
    let node = LocalNode::start().expect("node");
    let (a, b) = genesis(&node);
    // A workload with a certificate from a new root (which trusts the current one too).
    node.create_service(fixtures::service("genesis", "newroot", &[(8080, "http")]))
        .expect("svc");
    let mut pod = fixtures::app_pod(
        "genesis",
        "newroot",
        "newroot",
        "newroot",
        &["--http", "8080"],
    );
    pod.metadata.annotations = Some(
        [(
            weft_tests::localnode::ANNOTATION_CA.to_string(),
            "rogue".to_string(),
        )]
        .into(),
    );
    let n = node.run_pod(fixtures::meshed(pod)).expect("new-root pod");
    let call = |from: &PodRef, url: &str| -> HttpReport {
        node.exec_json(from, &["weft-sample-app", "http", url, "--timeout", "5s"])
            .expect("report")
    };
    assert_eq!(
        call(&a, "http://newroot:8080/").ok,
        0,
        "the new root is not trusted yet"
    );
    assert_eq!(
        call(&n, "http://service-b:8080/").ok,
        0,
        "nor are its clients"
    );
    // The overlap: the control plane's trust bundle gets the new root; proxies pick it up on
    // their config stream without a restart (their certificates are unchanged).
    node.restart_control_plane_with(Duration::from_millis(200), &[node.rogue_root_file()])
        .expect("restart with both roots");
    node.sync(Duration::from_secs(20)).expect("synced");
    let r = call(&a, "http://newroot:8080/");
    assert_eq!(r.ok, 1, "a server with the new root: {r:?}");
    let r = call(&n, "http://service-b:8080/");
    assert_eq!(r.ok, 1, "a client with the new root: {r:?}");
    let r = call(&a, "http://service-b:8080/");
    assert_eq!(r.ok, 1, "the old root still works: {r:?}");
    for pod in [&a, &b] {
        let log = node.logs(pod, "weft-proxy");
        assert!(log.contains("trust bundle updated"), "{}:\n{log}", pod.name);
    }
}
