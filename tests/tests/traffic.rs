//! Traffic management end to end on a local node: Istio's VirtualService and DestinationRule,
//! the Gateway API's HTTPRoute and GRPCRoute (GAMMA: a Service as parent) and SMI's
//! TrafficSplit, translated by the control plane and honoured by the proxies. Several versions
//! of a service run as pods (like bookinfo's reviews v1, v2, v3).

use std::collections::BTreeMap;
use std::time::Duration;

use weft_tests::localnode::{LocalNode, PodRef, fixtures, metric};
use weft_tests::sample::{GrpcReport, HttpReport, SeenRequest, TcpReport};

/// `reviews` with pods v1, v2, v3 (extra `serve` arguments per version), per-version
/// Services (for Gateway API and SMI backends), subsets in a DestinationRule, and a client.
struct Reviews {
    node: LocalNode,
    client: PodRef,
    pods: BTreeMap<String, PodRef>,
}

fn reviews(extra: &[(&str, &[&str])]) -> Reviews {
    let node = LocalNode::start().expect("node");
    node.apply_yaml(
        r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {selector: {app: reviews}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {selector: {app: reviews, version: v1}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {selector: {app: reviews, version: v2}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v3, namespace: bookinfo}
spec: {selector: {app: reviews, version: v3}, ports: [{name: http, port: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"#,
    )
    .expect("services");
    let mut pods = BTreeMap::new();
    for v in ["v1", "v2", "v3"] {
        let mut pod =
            fixtures::versioned_pod("bookinfo", &format!("reviews-{v}"), "reviews", v, "reviews");
        if let Some((_, args)) = extra.iter().find(|(ver, _)| *ver == v) {
            let c = &mut pod.spec.as_mut().expect("spec").containers[0];
            c.args
                .get_or_insert_with(Vec::new)
                .extend(args.iter().map(|a| a.to_string()));
        }
        pods.insert(
            v.to_owned(),
            node.run_pod(fixtures::meshed(pod)).expect("reviews pod"),
        );
    }
    let client = node
        .run_pod(fixtures::meshed(fixtures::client_pod(
            "bookinfo",
            "productpage",
            "productpage",
        )))
        .expect("client");
    Reviews { node, client, pods }
}

impl Reviews {
    fn http(&self, args: &[&str]) -> HttpReport {
        let mut argv = vec!["weft-sample-app", "http"];
        argv.extend_from_slice(args);
        self.node
            .exec_json(&self.client, &argv)
            .expect("http report")
    }

    fn apply(&self, yaml: &str) {
        self.node.apply_yaml(yaml).expect("apply");
    }

    fn delete(&self, kind: &str, name: &str) {
        self.node
            .delete_config(kind, "bookinfo", name)
            .expect("delete");
    }

    fn share(&self, r: &HttpReport, version: &str) -> f64 {
        let n = r
            .servers
            .get(&format!("reviews-{version}"))
            .copied()
            .unwrap_or(0);
        100.0 * n as f64 / r.ok.max(1) as f64
    }

    /// What a version's app received (its `/_requests`, read from the node like a probe).
    fn seen(&self, version: &str) -> Vec<SeenRequest> {
        match self.node.http_get_body(
            std::net::IpAddr::V4(self.pods[version].ip),
            8080,
            "/_requests",
        ) {
            Ok((200, _, text)) => serde_json::from_str(&text).expect("seen requests"),
            other => panic!("/_requests of {version}: {other:?}"),
        }
    }
}

fn servers(r: &HttpReport) -> Vec<&str> {
    r.servers.keys().map(String::as_str).collect()
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn weighted_splits_land_within_three_points() {
    let t = reviews(&[]);
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
"#;
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 8080}]
  rules:
  - backendRefs:
    - {name: reviews-v1, port: 8080, weight: 90}
    - {name: reviews-v2, port: 8080, weight: 10}
"#;
    let split = r#"
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: reviews, namespace: bookinfo}
spec:
  service: reviews
  backends:
  - {service: reviews-v1, weight: 90}
  - {service: reviews-v2, weight: 10}
"#;
    for (kind, yaml) in [
        ("VirtualService", vs),
        ("HTTPRoute", route),
        ("TrafficSplit", split),
    ] {
        t.apply(yaml);
        let r = t.http(&[
            "http://reviews:8080/",
            "--count",
            "2000",
            "--concurrency",
            "8",
        ]);
        assert_eq!(r.ok, 2000, "{kind}: {r:?}");
        let v2 = t.share(&r, "v2");
        assert!(
            (7.0..=13.0).contains(&v2),
            "{kind}: v2 got {v2:.1}% ({:?})",
            r.servers
        );
        assert_eq!(t.share(&r, "v3"), 0.0, "{kind}");
        t.delete(kind, "reviews");
    }
    // A canary moved all the way: 0/100.
    t.apply(
        &vs.replace("weight: 90", "weight: 0")
            .replace("weight: 10", "weight: 100"),
    );
    let r = t.http(&["http://reviews:8080/", "--count", "50"]);
    assert_eq!(servers(&r), ["reviews-v2"], "{r:?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn header_matches_send_only_matching_requests_to_v2() {
    let t = reviews(&[]);
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"#;
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 8080}]
  rules:
  - matches: [{headers: [{name: end-user, value: jason}]}]
    backendRefs: [{name: reviews-v2, port: 8080}]
  - backendRefs: [{name: reviews-v1, port: 8080}]
"#;
    for (kind, yaml) in [("VirtualService", vs), ("HTTPRoute", route)] {
        t.apply(yaml);
        let r = t.http(&[
            "http://reviews:8080/",
            "--count",
            "40",
            "--header",
            "end-user: jason",
        ]);
        assert_eq!(servers(&r), ["reviews-v2"], "{kind}: {r:?}");
        let r = t.http(&[
            "http://reviews:8080/",
            "--count",
            "40",
            "--header",
            "end-user: mallory",
        ]);
        assert_eq!(servers(&r), ["reviews-v1"], "{kind}: {r:?}");
        t.delete(kind, "reviews");
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn prefix_rewrites_and_redirects() {
    let t = reviews(&[]);
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /old}}]
    rewrite: {uri: /new}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {exact: /moved}}]
    redirect: {uri: /elsewhere, redirectCode: 302}
  - route: [{destination: {host: reviews, subset: v1}}]
"#;
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
    backendRefs: [{name: reviews-v1, port: 8080}]
  - matches: [{path: {type: Exact, value: /moved}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /elsewhere}, statusCode: 302}}]
  - backendRefs: [{name: reviews-v1, port: 8080}]
"#;
    for (kind, yaml) in [("VirtualService", vs), ("HTTPRoute", route)] {
        t.apply(yaml);
        let r = t.http(&["http://reviews:8080/old/page?x=1"]);
        assert_eq!(r.ok, 1, "{kind}: {r:?}");
        assert_eq!(r.replies[0].path, "/new/page", "{kind}");
        assert_eq!(r.replies[0].query, "x=1", "{kind}");
        let r = t.http(&["http://reviews:8080/moved"]);
        assert_eq!(r.statuses.get(&302), Some(&1), "{kind}: {r:?}");
        let location = r.first_headers.get("location").cloned().unwrap_or_default();
        assert!(
            location.ends_with("/elsewhere"),
            "{kind}: location {location:?}"
        );
        t.delete(kind, "reviews");
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn retries_mask_a_half_failing_pod_within_the_budget() {
    // v1 fails every other request.
    let t = reviews(&[("v1", &["--fail-percent", "50"])]);
    let without = t.http(&["http://reviews-v1:8080/", "--count", "200"]);
    let failed = without.statuses.get(&500).copied().unwrap_or(0);
    assert!(
        (80..=120).contains(&failed),
        "without retries about half fail: {without:?}"
    );
    t.apply(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-v1, namespace: bookinfo}
spec:
  hosts: [reviews-v1]
  http:
  - route: [{destination: {host: reviews-v1}}]
    retries: {attempts: 5, perTryTimeout: 2s, retryOn: 5xx}
"#,
    );
    let dump = t
        .node
        .exec(
            &t.client,
            None,
            &[
                "weft-sample-app",
                "fetch",
                "http://127.0.0.1:15000/config_dump",
            ],
        )
        .expect("dump");
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(
        dump.contains("perTryTimeoutMs"),
        "the client proxy has the retry policy once apply_yaml returns:\n{dump}"
    );
    // One client: with failures strictly alternating, concurrent clients could keep landing
    // one request on the failing turns, which says nothing about retries.
    let r = t.http(&["http://reviews-v1:8080/", "--count", "400"]);
    let m = t.node.proxy_metrics(&t.client).expect("metrics");
    let retry_lines: Vec<&str> = m.lines().filter(|l| l.contains("retries")).collect();
    assert!(
        r.ok >= 396,
        "≥99% success with retries: ok {} statuses {:?}\n{}",
        r.ok,
        r.statuses,
        retry_lines.join("\n")
    );
    let retried = metric(&m, "weft_upstream_retries_total", &[("kind", "retried")]);
    assert!(
        (150.0..=400.0).contains(&retried),
        "about one retry per failing request: {retried}\n{m}"
    );

    // v1 now fails every request: each gets exactly 5 retries (6 tries), never more.
    let (status, _, _) = t
        .node
        .http_get_body(
            std::net::IpAddr::V4(t.pods["v1"].ip),
            8080,
            "/_control/fail/100",
        )
        .expect("control v1");
    assert_eq!(status, 200);
    let retries = |kind: &str| {
        let m = t.node.proxy_metrics(&t.client).expect("metrics");
        metric(&m, "weft_upstream_retries_total", &[("kind", kind)])
    };
    let before = retries("retried");
    let r = t.http(&["http://reviews-v1:8080/", "--count", "20"]);
    assert_eq!(r.statuses.get(&500), Some(&20), "{r:?}");
    assert_eq!(
        retries("retried") - before,
        100.0,
        "attempts: 5 means 5 retries per request"
    );

    // 40 slow failing requests at once: the budget (20% of active requests, at least 3)
    // admits far fewer than the 200 retries the attempts alone would allow.
    let (before, refused_before) = (retries("retried"), retries("budget_exhausted"));
    let r = t.http(&[
        "http://reviews-v1:8080/delay/300",
        "--count",
        "40",
        "--concurrency",
        "40",
    ]);
    assert_eq!(r.statuses.get(&500), Some(&40), "{r:?}");
    let (sent, refused) = (
        retries("retried") - before,
        retries("budget_exhausted") - refused_before,
    );
    assert!(sent < 200.0, "the budget let {sent} retries through");
    assert!(
        refused >= 1.0,
        "no retry was refused by the budget ({sent} sent)"
    );

    // The same as an HTTPRoute rule's `retry` (Gateway API): v1 back to failing half.
    t.node
        .http_get_body(
            std::net::IpAddr::V4(t.pods["v1"].ip),
            8080,
            "/_control/fail/50",
        )
        .expect("control v1");
    t.delete("VirtualService", "reviews-v1");
    t.apply(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-v1, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews-v1, port: 8080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 8080}]
    retry: {attempts: 5, codes: [500]}
"#,
    );
    let r = t.http(&["http://reviews-v1:8080/", "--count", "400"]);
    assert!(
        r.ok >= 396,
        "HTTPRoute retry: ok {} statuses {:?}",
        r.ok,
        r.statuses
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn timeouts_fire_near_their_setting() {
    let t = reviews(&[]);
    // Within 10% of the setting (the issue's bound), measured by the client.
    let within = |ms: u64, setting: u64| {
        ms as f64 >= setting as f64 * 0.90 && ms as f64 <= setting as f64 * 1.10
    };
    t.apply(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /per-try}}]
    route: [{destination: {host: reviews, subset: v1}}]
    timeout: 10s
    retries: {attempts: 1, perTryTimeout: 400ms, retryOn: connect-failure}
  - route: [{destination: {host: reviews, subset: v1}}]
    timeout: 1s
"#,
    );
    let r = t.http(&["http://reviews:8080/delay/3000"]);
    assert_eq!(r.statuses.get(&504), Some(&1), "{r:?}");
    assert!(
        within(r.latencies_ms[0], 1000),
        "route timeout 1s fired at {} ms",
        r.latencies_ms[0]
    );
    let r = t.http(&["http://reviews:8080/per-try/delay/3000"]);
    assert_eq!(r.statuses.get(&504), Some(&1), "{r:?}");
    assert!(
        within(r.latencies_ms[0], 400),
        "per-try timeout 400ms fired at {} ms",
        r.latencies_ms[0]
    );
    t.delete("VirtualService", "reviews");
    t.apply(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 8080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 8080}]
    timeouts: {request: 1s}
"#,
    );
    let r = t.http(&["http://reviews:8080/delay/3000"]);
    assert_eq!(r.statuses.get(&504), Some(&1), "HTTPRoute: {r:?}");
    assert!(
        within(r.latencies_ms[0], 1000),
        "HTTPRoute timeout fired at {} ms",
        r.latencies_ms[0]
    );
    // `backendRequest` is the per-try timeout.
    t.apply(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 8080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 8080}]
    timeouts: {request: 10s, backendRequest: 400ms}
"#,
    );
    let r = t.http(&["http://reviews:8080/delay/3000"]);
    assert_eq!(
        r.statuses.get(&504),
        Some(&1),
        "HTTPRoute backendRequest: {r:?}"
    );
    assert!(
        within(r.latencies_ms[0], 400),
        "HTTPRoute backendRequest timeout fired at {} ms",
        r.latencies_ms[0]
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn faults_abort_and_delay() {
    let t = reviews(&[]);
    t.apply(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /slow}}]
    fault: {delay: {fixedDelay: 600ms, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"#,
    );
    let r = t.http(&["http://reviews:8080/abort", "--count", "10"]);
    assert_eq!(r.statuses.get(&418), Some(&10), "{r:?}");
    assert!(r.servers.is_empty(), "aborted requests never reach the app");
    let fast = t.http(&["http://reviews:8080/", "--count", "5"]);
    let slow = t.http(&["http://reviews:8080/slow", "--count", "5"]);
    assert_eq!(slow.ok, 5, "{slow:?}");
    let min_slow = *slow.latencies_ms.iter().min().expect("latencies");
    let max_fast = *fast.latencies_ms.iter().max().expect("latencies");
    assert!(min_slow >= 600, "the delay is added: {min_slow} ms");
    assert!(
        min_slow >= max_fast + 500,
        "slow {min_slow} ms vs fast {max_fast} ms"
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn mirroring_copies_to_the_shadow_without_the_client_waiting() {
    // The shadow (v2) takes two seconds to answer anything.
    let t = reviews(&[("v2", &["--delay-all", "2s"])]);
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100}
"#;
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 8080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 8080}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: reviews-v2, port: 8080}}}]
"#;
    let mut expected = 0;
    for (kind, yaml, path) in [
        ("VirtualService", vs, "/mirrored-vs"),
        ("HTTPRoute", route, "/mirrored-route"),
    ] {
        t.apply(yaml);
        let r = t.http(&[&format!("http://reviews:8080{path}"), "--count", "5"]);
        assert_eq!(servers(&r), ["reviews-v1"], "{kind}: {r:?}");
        let slowest = *r.latencies_ms.iter().max().expect("latencies");
        assert!(
            slowest < 1500,
            "{kind}: the client waited for the shadow ({slowest} ms)"
        );
        expected += 5;
        let seen = wait_for(|| {
            let seen: Vec<SeenRequest> = t
                .seen("v2")
                .into_iter()
                .filter(|s| s.path.starts_with("/mirrored"))
                .collect();
            (seen.len() >= expected).then_some(seen)
        });
        let copies: Vec<&SeenRequest> = seen.iter().filter(|s| s.path == path).collect();
        assert_eq!(copies.len(), 5, "{kind}: {seen:?}");
        assert!(
            copies.iter().all(|s| s.host.contains("-shadow")),
            "{kind}: {copies:?}"
        );
        t.delete(kind, "reviews");
    }
}

fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached in 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn consistent_hash_by_header_sends_each_key_to_one_pod() {
    let t = reviews(&[]);
    t.apply(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
"#,
    );
    let mut chosen = std::collections::BTreeSet::new();
    for user in ["ana", "bo", "cy", "dee", "eli", "fay", "gus", "hal"] {
        let r = t.http(&[
            "http://reviews:8080/",
            "--count",
            "15",
            "--concurrency",
            "3",
            "--header",
            &format!("x-user: {user}"),
        ]);
        assert_eq!(r.ok, 15, "{r:?}");
        assert_eq!(
            r.servers.len(),
            1,
            "{user} went to several pods: {:?}",
            r.servers
        );
        chosen.extend(r.servers.keys().cloned());
    }
    assert!(chosen.len() >= 2, "keys spread over pods: {chosen:?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn connection_pool_overflow_is_answered_503_and_counted() {
    let t = reviews(&[]);
    t.apply(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-v1, namespace: bookinfo}
spec:
  host: reviews-v1
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, http2MaxRequests: 1}
"#,
    );
    let r = t.http(&[
        "http://reviews-v1:8080/delay/1500",
        "--count",
        "6",
        "--concurrency",
        "6",
    ]);
    let overflow = r.statuses.get(&503).copied().unwrap_or(0);
    assert!(r.ok >= 1 && overflow >= 3, "{r:?}");
    let quick = r.latencies_ms.iter().filter(|ms| **ms < 700).count() as u64;
    assert!(
        quick >= overflow,
        "overflow is answered at once: {:?}",
        r.latencies_ms
    );
    let m = t.node.proxy_metrics(&t.client).expect("metrics");
    // The mesh hop is HTTP/2: http2MaxRequests is the limit that refused them.
    assert!(
        metric(&m, "weft_upstream_overflow_total", &[("kind", "requests")]) >= overflow as f64,
        "{m}"
    );
}

/// HTTP/1.1 and TCP to a service outside the mesh: `maxConnections` bounds the upstream
/// connections (one per HTTP/1.1 request in flight, one per TCP connection),
/// `http1MaxPendingRequests` the requests waiting for one; the rest are refused at once.
#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn http1_and_tcp_connection_limits_overflow_at_once() {
    let t = reviews(&[]);
    t.node
        .create_service(fixtures::service(
            "bookinfo",
            "legacy",
            &[(8080, "http"), (9000, "tcp-echo")],
        ))
        .expect("service");
    t.node
        .run_pod(fixtures::app_pod(
            "bookinfo",
            "legacy",
            "legacy",
            "legacy",
            &["--http", "8080", "--tcp-echo", "9000"],
        ))
        .expect("legacy pod without a sidecar");
    t.apply(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: legacy, namespace: bookinfo}
spec:
  host: legacy
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
"#,
    );
    // Six at once, 1.5 s each: one gets the connection, one waits for it, four are refused.
    let r = t.http(&[
        "http://legacy:8080/delay/1500",
        "--count",
        "6",
        "--concurrency",
        "6",
    ]);
    assert_eq!((r.ok, r.statuses.get(&503).copied()), (2, Some(4)), "{r:?}");
    let quick = r.latencies_ms.iter().filter(|ms| **ms < 700).count();
    assert!(
        quick >= 4,
        "overflow is answered at once: {:?}",
        r.latencies_ms
    );
    let m = t.node.proxy_metrics(&t.client).expect("metrics");
    assert!(
        metric(&m, "weft_upstream_overflow_total", &[("kind", "pending")]) >= 4.0,
        "{m}"
    );

    // TCP: a second connection while the first is open is refused.
    let first = t
        .node
        .spawn_exec(
            &t.client,
            &[
                "weft-sample-app",
                "tcp",
                "legacy:9000",
                "--bytes",
                "5000",
                "--over",
                "2s",
            ],
        )
        .expect("first tcp");
    std::thread::sleep(Duration::from_millis(500));
    let second: TcpReport = t
        .node
        .exec_json(
            &t.client,
            &[
                "weft-sample-app",
                "tcp",
                "legacy:9000",
                "--bytes",
                "100",
                "--timeout",
                "5s",
            ],
        )
        .expect("second tcp");
    assert!(!second.identical && second.received == 0, "{second:?}");
    let first: TcpReport = first.wait_json().expect("first report");
    assert!(first.identical && first.error.is_none(), "{first:?}");
    let m = t.node.proxy_metrics(&t.client).expect("metrics");
    assert!(
        metric(
            &m,
            "weft_upstream_overflow_total",
            &[("kind", "connections")]
        ) >= 1.0,
        "{m}"
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn a_failing_endpoint_is_ejected_and_returns_after_the_ejection_time() {
    // v3 fails everything until told otherwise.
    let t = reviews(&[("v3", &["--fail-percent", "100"])]);
    t.apply(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100}
"#,
    );
    let warm = t.http(&["http://reviews:8080/", "--count", "12"]);
    assert!(
        warm.statuses.get(&500).copied().unwrap_or(0) <= 3,
        "{warm:?}"
    );
    let r = t.http(&["http://reviews:8080/", "--count", "30"]);
    assert_eq!(r.ok, 30, "v3 is ejected: {r:?}");
    assert!(!r.servers.contains_key("reviews-v3"), "{r:?}");
    let m = t.node.proxy_metrics(&t.client).expect("metrics");
    assert!(
        metric(&m, "weft_outlier_ejections_total", &[]) >= 1.0,
        "{m}"
    );
    // It recovers; after the ejection time it is back in rotation.
    let (status, _) = t
        .node
        .http_get(
            std::net::IpAddr::V4(t.pods["v3"].ip),
            15020,
            "/healthz/ready",
        )
        .expect("reachable");
    assert_eq!(status, 200);
    let out = t
        .node
        .exec(
            &t.pods["v3"],
            None,
            &[
                "weft-sample-app",
                "http",
                "http://127.0.0.1:8080/_control/fail/0",
            ],
        )
        .expect("exec");
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(3500));
    let r = t.http(&["http://reviews:8080/", "--count", "30"]);
    assert_eq!(r.ok, 30, "{r:?}");
    assert!(r.servers.contains_key("reviews-v3"), "v3 is back: {r:?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn grpc_is_routed_by_method_path() {
    let t = reviews(&[]);
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {exact: /weft.sample.Echo/Chat}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"#;
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 8080}]
  rules:
  - matches: [{method: {service: weft.sample.Echo, method: Chat}}]
    backendRefs: [{name: reviews-v2, port: 8080}]
  - backendRefs: [{name: reviews-v1, port: 8080}]
"#;
    for (kind, yaml) in [("VirtualService", vs), ("GRPCRoute", route)] {
        t.apply(yaml);
        let g: GrpcReport = t
            .node
            .exec_json(
                &t.client,
                &[
                    "weft-sample-app",
                    "grpc",
                    "http://reviews:8080",
                    "--stream",
                    "3",
                ],
            )
            .expect("grpc");
        assert_eq!(g.error, None, "{kind}");
        assert_eq!(g.unary_server, "reviews-v1", "{kind}: unary goes to v1");
        assert_eq!(g.stream_server, "reviews-v2", "{kind}: Chat goes to v2");
        assert_eq!(g.trailer, "kept", "{kind}");
        t.delete(kind, "reviews");
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn cors_preflights_are_answered_by_the_proxy() {
    let t = reviews(&[]);
    t.apply(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v1}}]
    corsPolicy:
      allowOrigins: [{exact: "https://shop.example"}]
      allowMethods: [GET, POST]
      maxAge: 24h
"#,
    );
    let r = t.http(&[
        "http://reviews:8080/",
        "--method",
        "OPTIONS",
        "--header",
        "origin: https://shop.example",
        "--header",
        "access-control-request-method: POST",
    ]);
    assert_eq!(r.ok, 1, "{r:?}");
    assert!(
        r.servers.is_empty(),
        "the preflight is answered by the proxy"
    );
    assert_eq!(
        r.first_headers
            .get("access-control-allow-origin")
            .map(String::as_str),
        Some("https://shop.example"),
        "{r:?}"
    );
    let r = t.http(&[
        "http://reviews:8080/",
        "--header",
        "origin: https://shop.example",
    ]);
    assert_eq!(
        r.first_headers
            .get("access-control-allow-origin")
            .map(String::as_str),
        Some("https://shop.example")
    );
    assert_eq!(servers(&r), ["reviews-v1"]);
}

/// LEAST_REQUEST weighs endpoints by their live load (requests in flight × latency): a slow
/// pod gets a small share, where ROUND_ROBIN gives it a third.
#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn least_request_steers_away_from_a_slow_endpoint() {
    let t = reviews(&[("v1", &["--delay-all", "150ms"])]);
    let share_v1 = |policy: &str| {
        t.apply(&format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec:\n  host: reviews\n  trafficPolicy: {{loadBalancer: {{simple: {policy}}}}}\n"
        ));
        let r = t.http(&[
            "http://reviews:8080/lb",
            "--count",
            "600",
            "--concurrency",
            "8",
        ]);
        assert_eq!(r.ok, 600, "{policy}: {r:?}");
        (t.share(&r, "v1"), r)
    };
    let (rr, r) = share_v1("ROUND_ROBIN");
    assert!(
        (28.0..=39.0).contains(&rr),
        "ROUND_ROBIN gave v1 {rr:.1}%: {:?}",
        r.servers
    );
    let (lr, r) = share_v1("LEAST_REQUEST");
    assert!(
        lr < 15.0,
        "LEAST_REQUEST gave the slow v1 {lr:.1}%: {:?}",
        r.servers
    );
}

/// Endpoints come and go under load: a pod deleted with a grace period finishes its
/// in-flight requests and stops getting new ones, a new pod starts getting traffic, and no
/// request fails.
#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn endpoints_come_and_go_under_load_without_a_failed_request() {
    let t = reviews(&[]);
    let load = t
        .node
        .spawn_exec(
            &t.client,
            &[
                "weft-sample-app",
                "load",
                "http://reviews:8080/delay/100",
                "--rps",
                "50",
                "--duration",
                "6s",
                "--conns",
                "16",
            ],
        )
        .expect("load");
    std::thread::sleep(Duration::from_millis(1500));
    // v3 goes: its endpoint is withdrawn first, its containers get SIGTERM after.
    t.node
        .delete_pod(&t.pods["v3"], Duration::from_secs(5))
        .expect("delete v3");
    // v4 comes.
    t.node
        .run_pod(fixtures::meshed(fixtures::versioned_pod(
            "bookinfo",
            "reviews-v4",
            "reviews",
            "v4",
            "reviews",
        )))
        .expect("v4");
    let report: weft_tests::sample::LoadReport = load.wait_json().expect("load report");
    assert_eq!(
        report.failed,
        0,
        "{report:?}\nclient proxy:\n{}",
        t.node.logs(&t.client, "weft-proxy")
    );
    assert!(report.ok >= 250, "{report:?}");
    // After the churn: v3 gets nothing, v4 gets its share.
    let r = t.http(&[
        "http://reviews:8080/after",
        "--count",
        "300",
        "--concurrency",
        "4",
    ]);
    assert_eq!(r.ok, 300, "{r:?}");
    assert_eq!(r.servers.get("reviews-v3"), None, "{:?}", r.servers);
    assert!(
        r.servers.get("reviews-v4").copied().unwrap_or(0) >= 50,
        "{:?}",
        r.servers
    );
}
