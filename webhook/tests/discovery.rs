//! Config distribution over the real port (mutual TLS, HTTP/2, NDJSON both ways) with a
//! simulated proxy holding a workload certificate from the CA.

use std::time::Duration;

use weft_api::config::HttpAction;
use weft_api::discovery::Node;
use weft_webhook::testing::{Harness, ProxyStream, client_tls, issue};

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: service-a-1
  namespace: genesis
  labels: {app: service-a}
  annotations: {sidecar.istio.io/status: '{}'}
spec:
  serviceAccountName: service-a
  containers: [{name: app, image: x, ports: [{containerPort: 8080, name: http}]}]
status: {podIP: 10.44.0.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: service-b-1
  namespace: genesis
  labels: {app: service-b, version: v1}
  annotations: {sidecar.istio.io/status: '{}'}
spec:
  serviceAccountName: service-b
  containers: [{name: app, image: x, ports: [{containerPort: 9090, name: http}]}]
status: {podIP: 10.44.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: other, labels: {app: intruder}}
spec: {serviceAccountName: intruder, containers: [{name: app, image: x}]}
status: {podIP: 10.44.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: service-b, namespace: genesis}
spec:
  clusterIP: 10.96.0.11
  selector: {app: service-b}
  ports: [{name: http, port: 8080, targetPort: http}]
"#;

const VS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: service-b, namespace: genesis}
spec:
  hosts: [service-b]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: service-b}}]
    timeout: 2s
  - route: [{destination: {host: service-b}}]
"#;

fn node(ns: &str, name: &str) -> Node {
    Node {
        name: name.into(),
        namespace: ns.into(),
        ip: None,
        proxy_version: "test".into(),
    }
}

async fn proxy(h: &Harness, ns: &str, sa: &str, pod: &str) -> ProxyStream {
    let (cert, key) = issue(h.addr, &h.roots_pem, &h.signer, ns, sa).await;
    let chain = cert.cert_chain.concat();
    let tls = client_tls(&h.roots_pem, Some((&chain, &key.serialize_pem())));
    ProxyStream::open(h.addr, tls, node(ns, pod)).await
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn snapshot_ack_update_nack_and_reconnect() {
    let h = Harness::start(&[("pods.yaml", PODS)]).await;
    let mut p = proxy(&h, "genesis", "service-a", "service-a-1").await;
    assert_eq!(p.status, 200, "{:?}", p.error_body);
    let first = p.next(WAIT).await.expect("first snapshot");
    assert_eq!(first.version, first.snapshot.version);
    assert_eq!(first.trust_bundle, vec![h.roots_pem.clone()]);
    first.snapshot.validate().expect("valid");
    assert_eq!(first.snapshot.workload.service_account, "service-a");
    let svc = first
        .snapshot
        .services
        .iter()
        .find(|s| s.hostname == "service-b.genesis.svc.cluster.local")
        .expect("service-b visible");
    assert_eq!(svc.ports[0].http_routes.len(), 1, "the default route");
    let cluster = first
        .snapshot
        .clusters
        .iter()
        .find(|c| c.name == "outbound|8080||service-b.genesis.svc.cluster.local")
        .expect("cluster");
    assert_eq!(cluster.endpoints.len(), 1);
    assert_eq!(
        cluster.endpoints[0].port, 9090,
        "named target port resolved"
    );
    assert_eq!(
        cluster.endpoints[0].identity.as_deref(),
        Some("spiffe://cluster.local/ns/genesis/sa/service-b")
    );
    p.ack(&first.version).await;

    // A VirtualService appears in the directory: a new version follows.
    h.write("vs.yaml", VS);
    let second = p.next(WAIT).await.expect("second snapshot");
    assert!(
        second.version.parse::<u64>().expect("number")
            > first.version.parse::<u64>().expect("number")
    );
    let routes = &second
        .snapshot
        .services
        .iter()
        .find(|s| s.hostname == "service-b.genesis.svc.cluster.local")
        .expect("service-b")
        .ports[0]
        .http_routes;
    assert_eq!(routes.len(), 2);
    assert!(matches!(&routes[0].action, HttpAction::Forward(f) if f.timeout_ms == Some(2000)));
    p.nack(&second.version, "cannot apply: test").await;

    // Nothing changed: nothing is sent.
    h.write(
        "unrelated.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    );
    assert!(
        p.next(Duration::from_millis(600)).await.is_none(),
        "no push without a change"
    );

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = h.discovery.metrics().encode();
        if metrics.contains("weft_push_nacks_total 1") && metrics.contains("weft_push_acks_total 1")
        {
            assert!(metrics.contains("weft_connected_proxies 1"), "{metrics}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = h.discovery.proxies();
    assert_eq!(status.len(), 1);
    assert!(
        status[0]
            .nacked
            .as_deref()
            .is_some_and(|n| n.contains("cannot apply"))
    );

    // Reconnect: the proxy gets the current snapshot again.
    drop(p);
    let mut again = proxy(&h, "genesis", "service-a", "service-a-1").await;
    let third = again.next(WAIT).await.expect("snapshot after reconnect");
    assert_eq!(third.snapshot.services, second.snapshot.services);
    again.ack(&third.version).await;
    h.stop().await;
}

#[tokio::test]
async fn a_proxy_cannot_ask_for_another_namespace_or_account() {
    let h = Harness::start(&[("pods.yaml", PODS)]).await;
    // A certificate of namespace `other` asking for a pod of `genesis`.
    let (cert, key) = issue(h.addr, &h.roots_pem, &h.signer, "other", "intruder").await;
    let tls = client_tls(
        &h.roots_pem,
        Some((&cert.cert_chain.concat(), &key.serialize_pem())),
    );
    let p = ProxyStream::open(h.addr, tls, node("genesis", "service-a-1")).await;
    assert_eq!(p.status, 403);
    assert!(
        p.error_body
            .as_deref()
            .is_some_and(|b| b.contains("namespace")),
        "{:?}",
        p.error_body
    );

    // Same namespace, another service account's pod.
    let p = proxy(&h, "genesis", "service-b", "service-a-1").await;
    assert_eq!(p.status, 403);
    assert!(
        p.error_body
            .as_deref()
            .is_some_and(|b| b.contains("service account"))
    );

    // No client certificate at all.
    let p = ProxyStream::open(
        h.addr,
        client_tls(&h.roots_pem, None),
        node("genesis", "service-a-1"),
    )
    .await;
    assert_eq!(p.status, 401);
    h.stop().await;
}

#[tokio::test]
async fn a_slow_proxy_does_not_hold_back_others() {
    let h = Harness::start(&[("pods.yaml", PODS)]).await;
    // This one never reads.
    let _slow = proxy(&h, "genesis", "service-b", "service-b-1").await;
    let mut fast = proxy(&h, "genesis", "service-a", "service-a-1").await;
    let first = fast.next(WAIT).await.expect("first");
    fast.ack(&first.version).await;
    for i in 0..5 {
        h.write(
            "vs.yaml",
            &VS.replace("timeout: 2s", &format!("timeout: {}s", i + 3)),
        );
        let next = fast
            .next(WAIT)
            .await
            .expect("update despite the slow proxy");
        fast.ack(&next.version).await;
    }
    h.stop().await;
}

fn service_object(name: &str, vip: u8) -> weft_webhook::resources::Object {
    let value = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "genesis"},
        "spec": {
            "clusterIP": format!("10.96.1.{vip}"),
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80}],
        },
    });
    weft_webhook::resources::Object::from_value(&value)
        .expect("a service")
        .expect("a kind the store keeps")
}

fn hostnames(m: &weft_api::discovery::DiscoveryResponse) -> Vec<String> {
    m.snapshot
        .services
        .iter()
        .map(|s| s.hostname.clone())
        .collect()
}

fn pushes(h: &Harness) -> u64 {
    let metrics = h.discovery.metrics().encode();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("weft_pushes_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no weft_pushes_total in {metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_is_one_push() {
    let h = Harness::start(&[("pods.yaml", PODS)]).await;
    let mut p = proxy(&h, "genesis", "service-a", "service-a-1").await;
    assert_eq!(p.status, 200, "{:?}", p.error_body);
    let first = p.next(WAIT).await.expect("first snapshot");
    p.ack(&first.version).await;
    let before = pushes(&h);

    // Twenty changes, one store update each, a millisecond apart: each well inside the
    // debounce of the one before, while discovery runs beside them (without the debounce it
    // would push a snapshot with only the first few).
    const N: usize = 20;
    for i in 0..N {
        let object = service_object(&format!("burst-{i}"), i as u8 + 1);
        h.store.update(|r| {
            r.upsert(object);
            true
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The next message holds all of them: nothing was pushed half-way through the burst.
    let burst = p.next(WAIT).await.expect("snapshot after the burst");
    let names = hostnames(&burst);
    for i in 0..N {
        let host = format!("burst-{i}.genesis.svc.cluster.local");
        assert!(names.contains(&host), "{host} missing from {names:?}");
    }
    p.ack(&burst.version).await;

    // A change after the window: the very next message is that change (no stray push of the
    // burst in between), and the burst cost one push.
    h.store.update(|r| {
        r.upsert(service_object("later", 200));
        true
    });
    let later = p.next(WAIT).await.expect("snapshot after a later change");
    assert!(
        hostnames(&later).contains(&"later.genesis.svc.cluster.local".to_owned()),
        "{:?}",
        hostnames(&later)
    );
    assert!(later.version.parse::<u64>().expect("n") > burst.version.parse::<u64>().expect("n"));
    p.ack(&later.version).await;
    assert_eq!(
        pushes(&h),
        before + 2,
        "one push for the burst, one for the later change"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_new_trust_bundle_reaches_an_open_stream() {
    let h = Harness::start(&[("pods.yaml", PODS)]).await;
    let mut p = proxy(&h, "genesis", "service-a", "service-a-1").await;
    let first = p.next(WAIT).await.expect("first snapshot");
    assert_eq!(first.trust_bundle, vec![h.roots_pem.clone()]);
    p.ack(&first.version).await;
    let next = weft_webhook::ca::Material::generate("cluster.local").expect("root");
    h.discovery
        .set_trust_bundle(vec![h.roots_pem.clone(), next.root_cert.clone()]);
    let m = p.next(WAIT).await.expect("the new bundle");
    assert_eq!(m.trust_bundle, vec![h.roots_pem.clone(), next.root_cert]);
    assert_eq!(
        m.snapshot.services, first.snapshot.services,
        "config unchanged"
    );
    h.stop().await;
}

#[tokio::test]
async fn kubernetes_mode_admits_only_pods_that_exist() {
    let h = Harness::start(&[("pods.yaml", PODS)]).await;
    let (listed_tx, listed) = tokio::sync::watch::channel(false);
    h.discovery.require_known_pods(listed);

    // A pod that exists, with the certificate's service account; it waits for the listing.
    let opening = tokio::spawn({
        let (addr, roots) = (h.addr, h.roots_pem.clone());
        let (chain, key) = h.workload_cert("genesis", "service-a");
        async move {
            let tls = client_tls(&roots, Some((&chain, &key)));
            ProxyStream::open(addr, tls, node("genesis", "service-a-1")).await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    listed_tx.send_replace(true);
    let mut p = opening.await.expect("join");
    assert_eq!(p.status, 200, "{:?}", p.error_body);
    p.next(WAIT).await.expect("snapshot");

    // A pod that does not exist: refused, naming it.
    let ghost = proxy(&h, "genesis", "service-a", "ghost-1").await;
    assert_eq!(ghost.status, 403);
    assert!(
        ghost
            .error_body
            .as_deref()
            .is_some_and(|b| b.contains("no pod genesis/ghost-1")),
        "{:?}",
        ghost.error_body
    );

    // A pod whose watch event trails its proxy: admitted once it shows up.
    let late = tokio::spawn({
        let (addr, roots) = (h.addr, h.roots_pem.clone());
        let (chain, key) = h.workload_cert("genesis", "service-a");
        async move {
            let tls = client_tls(&roots, Some((&chain, &key)));
            ProxyStream::open(addr, tls, node("genesis", "late-1")).await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.write(
        "late.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: late-1, namespace: genesis, labels: {app: late}}\nspec: {serviceAccountName: service-a, containers: [{name: app, image: x}]}\nstatus: {podIP: 10.44.0.7}\n",
    );
    let mut late = late.await.expect("join");
    assert_eq!(late.status, 200, "{:?}", late.error_body);
    let snapshot = late.next(WAIT).await.expect("snapshot");
    assert_eq!(
        snapshot
            .snapshot
            .workload
            .labels
            .get("app")
            .map(String::as_str),
        Some("late")
    );
    h.stop().await;
}

/// The HTTP routes of service-b in a snapshot.
fn service_b_routes(
    m: &weft_api::discovery::DiscoveryResponse,
) -> Vec<weft_api::config::HttpRoute> {
    m.snapshot
        .services
        .iter()
        .find(|s| s.hostname == "service-b.genesis.svc.cluster.local")
        .expect("service-b")
        .ports[0]
        .http_routes
        .clone()
}

fn first_timeout_ms(routes: &[weft_api::config::HttpRoute]) -> Option<u64> {
    match &routes.first()?.action {
        HttpAction::Forward(f) => f.timeout_ms,
        _ => None,
    }
}

/// What a proxy gets must always be something it can apply: a VirtualService that the
/// validator rejects (here an invalid regex, which a proxy would refuse, and with it the
/// whole snapshot) is held back, its last good version stays in force, and every other change
/// keeps reaching the proxy. Once fixed, the fixed version is sent.
#[tokio::test]
async fn a_rejected_virtual_service_does_not_stall_other_changes() {
    const BAD_REGEX: &str = "/api/(";
    let h = Harness::start(&[("pods.yaml", PODS), ("vs.yaml", VS)]).await;
    let mut p = proxy(&h, "genesis", "service-a", "service-a-1").await;
    assert_eq!(p.status, 200, "{:?}", p.error_body);
    let first = p.next(WAIT).await.expect("first snapshot");
    let good_routes = service_b_routes(&first);
    assert_eq!(good_routes.len(), 2);
    assert_eq!(first_timeout_ms(&good_routes), Some(2000));
    p.ack(&first.version).await;

    // The VirtualService turns bad (an RE2 syntax error), and a VirtualService that has never
    // been good appears beside it.
    let bad = VS
        .replace(
            "match: [{headers: {end-user: {exact: jason}}}]",
            &format!("match: [{{uri: {{regex: '{BAD_REGEX}'}}}}]"),
        )
        .replace("timeout: 2s", "timeout: 7s");
    assert!(bad.contains(BAD_REGEX) && bad.contains("7s"));
    h.write("vs.yaml", &bad);
    h.write(
        "ratings.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: ratings, namespace: genesis}}\nspec:\n  hosts: [ratings]\n  http:\n  - match: [{{uri: {{regex: '{BAD_REGEX}'}}}}]\n    route: [{{destination: {{host: ratings}}}}]\n"
        ),
    );
    assert!(
        p.next(Duration::from_millis(600)).await.is_none(),
        "rejected objects change nothing a proxy sees"
    );
    let held = |h: &Harness| {
        let text = h.discovery.metrics().encode();
        text.lines()
            .find(|l| {
                l.starts_with("weft_config_rejected{")
                    && l.contains("kind=\"networking.istio.io/VirtualService\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no weft_config_rejected for VirtualServices:\n{text}"))
    };
    assert_eq!(held(&h), 2.0, "both bad VirtualServices are held back");

    // Other objects keep changing, and each change reaches the proxy, with service-b still
    // routed by the last good VirtualService.
    for (i, vip) in [(1, 21), (2, 22)] {
        h.write(
            "service-c.yaml",
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: service-c, namespace: genesis}}\nspec:\n  clusterIP: 10.96.0.{vip}\n  ports: [{{name: http, port: 8080}}]\n"
            ),
        );
        let m = p
            .next(WAIT)
            .await
            .expect("an update while the bad objects sit there");
        let c = m
            .snapshot
            .services
            .iter()
            .find(|s| s.hostname == "service-c.genesis.svc.cluster.local")
            .unwrap_or_else(|| panic!("update {i}: service-c missing"));
        assert_eq!(
            c.vips,
            [format!("10.96.0.{vip}")
                .parse::<std::net::IpAddr>()
                .expect("ip")]
        );
        m.snapshot.validate().expect("what is sent is valid");
        assert_eq!(
            service_b_routes(&m),
            good_routes,
            "the last good version stays"
        );
        let json = serde_json::to_string(&m.snapshot).expect("json");
        assert!(
            !json.contains(BAD_REGEX),
            "update {i} carries the bad regex"
        );
        p.ack(&m.version).await;
    }

    // Fixed: the fixed version reaches the proxy.
    h.write("vs.yaml", &bad.replace(BAD_REGEX, "^/api/.*"));
    let fixed = p.next(WAIT).await.expect("the fixed VirtualService");
    let routes = service_b_routes(&fixed);
    assert_eq!(first_timeout_ms(&routes), Some(7000), "{routes:?}");
    let json = serde_json::to_string(&routes).expect("json");
    assert!(json.contains("^/api/.*"), "{json}");
    assert_eq!(
        held(&h),
        1.0,
        "only the ratings VirtualService is still held back"
    );
    p.ack(&fixed.version).await;
    h.stop().await;
}
