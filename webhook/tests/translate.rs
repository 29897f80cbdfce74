//! Translation: golden snapshots of bookinfo (Istio's sample, with every
//! `networking/*.yaml`) for a productpage and a reviews proxy, and one focused test per rule.
//! `WEFT_BLESS=1` rewrites the golden files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use weft_api::config::{
    HttpAction, LbPolicy, MtlsMode, OutboundTrafficPolicy, Protocol, Snapshot, StringMatch,
    UpstreamTlsMode,
};
use weft_api::validate::parse_documents;
use weft_webhook::resources::{Object, ProxyRef, Resources, Settings};
use weft_webhook::translate::translate;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/samples/bookinfo")
}

/// Builds resources from YAML. Deployments become one pod each (`<name>-0`, meshed, IPs
/// 10.44.1.N); Services get cluster IPs 10.96.1.N; config objects get creation times in
/// document order, so "oldest first" is the order of the input.
fn resources(yaml: &str) -> Resources {
    let mut r = Resources::new(Settings::default());
    let (mut pod_ip, mut vip, mut second) = (10, 10, 0);
    for doc in parse_documents(yaml) {
        let mut v = doc.content.expect("yaml");
        let kind = v["kind"].as_str().unwrap_or_default().to_owned();
        if v.pointer("/metadata/namespace").is_none() {
            v["metadata"]["namespace"] = json!("default");
        }
        match kind.as_str() {
            "Deployment" => {
                let mut template = v["spec"]["template"].clone();
                let name = format!("{}-0", v["metadata"]["name"].as_str().expect("name"));
                template["apiVersion"] = json!("v1");
                template["kind"] = json!("Pod");
                template["metadata"]["name"] = json!(name);
                template["metadata"]["namespace"] = v["metadata"]["namespace"].clone();
                template["metadata"]["annotations"]["sidecar.istio.io/status"] = json!("{}");
                template["status"] =
                    json!({"podIP": format!("10.44.1.{pod_ip}"), "phase": "Running"});
                pod_ip += 1;
                v = template;
            }
            "Service" if v.pointer("/spec/clusterIP").is_none() => {
                v["spec"]["clusterIP"] = json!(format!("10.96.1.{vip}"));
                vip += 1;
            }
            _ => {}
        }
        if v["apiVersion"].as_str().is_some_and(|a| a.contains('/'))
            && v.pointer("/metadata/creationTimestamp").is_none()
        {
            v["metadata"]["creationTimestamp"] = json!(format!(
                "2024-01-01T00:{:02}:{:02}Z",
                second / 60,
                second % 60
            ));
            second += 1;
        }
        if let Some(o) = Object::from_value(&v).unwrap_or_else(|e| panic!("{kind}: {e}")) {
            r.upsert(o);
        }
    }
    r
}

fn proxy(r: &Resources, ns: &str, name: &str) -> ProxyRef {
    ProxyRef::from_pod(
        r.pod(ns, name)
            .unwrap_or_else(|| panic!("no pod {ns}/{name}")),
    )
}

fn bookinfo() -> Resources {
    let mut yaml =
        std::fs::read_to_string(corpus().join("platform/kube/bookinfo.yaml")).expect("bookinfo");
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus().join("networking"))
        .expect("networking")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    for f in files {
        yaml.push_str("\n---\n");
        yaml.push_str(&std::fs::read_to_string(f).expect("read"));
    }
    resources(&yaml)
}

fn golden(name: &str, snapshot: &Snapshot) {
    snapshot.validate().expect("translated snapshots are valid");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/translate")
        .join(name);
    let text = serde_json::to_string_pretty(snapshot).expect("json") + "\n";
    if std::env::var_os("WEFT_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &text).expect("write");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing: run with WEFT_BLESS=1", path.display()));
    assert!(
        want == text,
        "{} differs (WEFT_BLESS=1 to accept):\n{text}",
        path.display()
    );
}

#[test]
fn bookinfo_golden() {
    let r = bookinfo();
    golden(
        "bookinfo-productpage.json",
        &translate(&r, &proxy(&r, "default", "productpage-v1-0")),
    );
    golden(
        "bookinfo-reviews-v2.json",
        &translate(&r, &proxy(&r, "default", "reviews-v2-0")),
    );
}

fn find_port<'a>(s: &'a Snapshot, host: &str, port: u16) -> &'a weft_api::config::ServicePort {
    s.services
        .iter()
        .find(|x| x.hostname == host)
        .unwrap_or_else(|| panic!("no service {host}"))
        .ports
        .iter()
        .find(|p| p.port == port)
        .expect("port")
}

fn cluster<'a>(s: &'a Snapshot, name: &str) -> &'a weft_api::config::Cluster {
    s.clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| {
            panic!(
                "no cluster {name}: {:?}",
                s.clusters.iter().map(|c| &c.name).collect::<Vec<_>>()
            )
        })
}

const APP: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: a, labels: {app: client, version: v1}, annotations: {sidecar.istio.io/status: "{}"}}
spec: {serviceAccountName: client, containers: [{name: c, image: x, ports: [{containerPort: 8080}]}]}
status: {podIP: 10.44.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: b, labels: {app: other}, annotations: {sidecar.istio.io/status: "{}"}}
spec: {serviceAccountName: other, containers: [{name: c, image: x}]}
status: {podIP: 10.44.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: server-v1, namespace: a, labels: {app: server, version: v1}, annotations: {sidecar.istio.io/status: "{}"}}
spec: {serviceAccountName: server, containers: [{name: c, image: x, ports: [{containerPort: 9000, name: web}]}]}
status: {podIP: 10.44.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: server-v2, namespace: a, labels: {app: server, version: v2, security.istio.io/tlsMode: disabled}, annotations: {sidecar.istio.io/status: "{}"}}
spec: {serviceAccountName: server, containers: [{name: c, image: x, ports: [{containerPort: 9000, name: web}]}]}
status: {podIP: 10.44.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: a, labels: {app: server, version: v3}}
spec: {serviceAccountName: server, containers: [{name: c, image: x, ports: [{containerPort: 9000, name: web}]}]}
status: {podIP: 10.44.0.6}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: a}
spec: {clusterIP: 10.96.0.10, selector: {app: server}, ports: [{name: http, port: 80, targetPort: web}, {name: tcp-raw, port: 7000, targetPort: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: server-v2, namespace: a}
spec: {clusterIP: 10.96.0.12, selector: {app: server, version: v2}, ports: [{name: http, port: 80, targetPort: web}]}
---
apiVersion: v1
kind: Service
metadata: {name: client, namespace: a}
spec: {clusterIP: 10.96.0.11, selector: {app: client}, ports: [{name: grpc-api, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: hidden, namespace: b, annotations: {networking.istio.io/exportTo: "."}}
spec: {clusterIP: 10.96.0.20, selector: {app: other}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: open, namespace: b}
spec: {clusterIP: 10.96.0.21, selector: {app: other}, ports: [{name: http, port: 80}]}
"#;

fn with(extra: &str) -> Resources {
    resources(&format!("{APP}\n---\n{extra}"))
}

const SERVER: &str = "server.a.svc.cluster.local";

#[test]
fn endpoints_identity_and_protocols() {
    let r = with("");
    let s = translate(&r, &proxy(&r, "a", "client"));
    let c = cluster(&s, "outbound|80||server.a.svc.cluster.local");
    let ids: BTreeMap<String, Option<String>> = c
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.identity.clone()))
        .collect();
    assert_eq!(
        ids["10.44.0.4"].as_deref(),
        Some("spiffe://cluster.local/ns/a/sa/server")
    );
    assert_eq!(ids["10.44.0.5"], None, "tlsMode disabled");
    assert_eq!(ids["10.44.0.6"], None, "no sidecar");
    assert!(c.endpoints.iter().all(|e| e.port == 9000));
    assert_eq!(find_port(&s, SERVER, 80).protocol, Protocol::Http);
    assert_eq!(find_port(&s, SERVER, 7000).protocol, Protocol::Tcp);
    // Default HTTP routes carry Istio's default retries.
    let route = &find_port(&s, SERVER, 80).http_routes[0];
    let HttpAction::Forward(f) = &route.action else {
        panic!("forward")
    };
    let retries = f.retries.as_ref().expect("default retries");
    assert_eq!(retries.attempts, 2);
    assert_eq!(retries.retriable_status_codes, [503]);
    assert!(find_port(&s, SERVER, 7000).http_routes.is_empty());
    // Inbound: the client's own service declares grpc on 8080.
    assert_eq!(s.inbound.port(8080), (MtlsMode::Permissive, Protocol::Grpc));
}

#[test]
fn source_labels_namespace_and_gateways_are_per_proxy() {
    let r = with(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: server, namespace: a}
spec:
  hosts: [server]
  http:
  - match: [{sourceLabels: {app: client}, uri: {prefix: /api}}]
    route: [{destination: {host: server, port: {number: 80}}}]
    timeout: 1s
  - match: [{sourceNamespace: b}]
    route: [{destination: {host: server}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 50}}}
  - match: [{gateways: [my-gateway]}]
    route: [{destination: {host: server}}]
  - route: [{destination: {host: server}}]
"#,
    );
    let client = translate(&r, &proxy(&r, "a", "client"));
    let routes = &find_port(&client, SERVER, 80).http_routes;
    assert_eq!(routes.len(), 2, "{routes:#?}");
    assert_eq!(
        routes[0].matches[0].uri,
        Some(StringMatch::Prefix("/api".into()))
    );
    let other = translate(&r, &proxy(&r, "b", "other"));
    let routes = &find_port(&other, SERVER, 80).http_routes;
    assert_eq!(routes.len(), 2);
    let fault = routes[0].fault.as_ref().expect("fault");
    assert_eq!(fault.abort.as_ref().expect("abort").http_status, Some(418));
    assert_eq!(fault.abort.as_ref().expect("abort").percentage, 50.0);
    assert!(
        routes[0].matches[0] == Default::default(),
        "sourceNamespace is no request condition"
    );
}

#[test]
fn subsets_and_policy_merge() {
    let r = with(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: server, namespace: a}
spec:
  host: server
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool: {tcp: {maxConnections: 10, connectTimeout: 250ms}, http: {http2MaxRequests: 100}}
    outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 1m}
    portLevelSettings:
    - port: {number: 7000}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: X-User, ringHash: {minimumRingSize: 2048}}}
      tls: {mode: ISTIO_MUTUAL}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: server, namespace: a}
spec:
  hosts: [server]
  http:
  - route:
    - {destination: {host: server, subset: v1}, weight: 80, headers: {request: {set: {x-canary: "no"}}}}
    - {destination: {host: server, subset: v2}, weight: 20}
    mirror: {host: server, subset: v1}
    mirrorPercentage: {value: 5}
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "5xx,gateway-error,429"}
"#,
    );
    let s = translate(&r, &proxy(&r, "a", "client"));
    let v1 = cluster(&s, "outbound|80|v1|server.a.svc.cluster.local");
    assert_eq!(v1.endpoints.len(), 1);
    assert_eq!(v1.endpoints[0].address.to_string(), "10.44.0.4");
    assert_eq!(v1.load_balancer.policy, LbPolicy::Random);
    assert_eq!(v1.connect_timeout_ms, Some(250));
    assert_eq!(v1.connection_pool.max_connections, Some(10));
    assert_eq!(
        v1.outlier_detection
            .as_ref()
            .expect("od")
            .base_ejection_time_ms,
        60_000
    );
    let v2 = cluster(&s, "outbound|80|v2|server.a.svc.cluster.local");
    assert_eq!(v2.tls.mode, UpstreamTlsMode::IstioMutual);
    assert_eq!(
        v2.endpoints[0].identity.as_deref(),
        Some("spiffe://cluster.local/ns/a/sa/server"),
        "ISTIO_MUTUAL uses the service account even where auto mTLS would not"
    );
    let hash = v2.load_balancer.consistent_hash.as_ref().expect("hash");
    assert_eq!(hash.key, weft_api::config::HashKey::Header("x-user".into()));
    assert_eq!(
        v2.connection_pool.http2_max_requests,
        Some(100),
        "top-level pool kept"
    );
    let tcp = cluster(&s, "outbound|7000||server.a.svc.cluster.local");
    assert_eq!(
        tcp.load_balancer.policy,
        LbPolicy::LeastRequest,
        "port-level settings"
    );
    cluster(&s, "outbound|7000|v2|server.a.svc.cluster.local");
    let HttpAction::Forward(f) = &find_port(&s, SERVER, 80).http_routes[0].action else {
        panic!()
    };
    assert_eq!(
        f.destinations.iter().map(|d| d.weight).collect::<Vec<_>>(),
        [80, 20]
    );
    assert_eq!(f.destinations[0].request_headers.set["x-canary"], "no");
    assert_eq!(f.mirrors[0].percentage, 5.0);
    let retries = f.retries.as_ref().expect("retries");
    assert_eq!(retries.attempts, 3);
    assert_eq!(retries.per_try_timeout_ms, Some(2000));
    assert_eq!(
        retries.retry_on,
        ["5xx", "gateway-error", "retriable-status-codes"]
    );
    assert_eq!(retries.retriable_status_codes, [429]);
}

#[test]
fn least_request_is_the_default_load_balancer() {
    let r = with(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: server, namespace: a}
spec:
  host: server
  trafficPolicy:
    loadBalancer: {simple: UNSPECIFIED}
    portLevelSettings: [{port: {number: 7000}, loadBalancer: {simple: ROUND_ROBIN}}]
  subsets:
  - {name: v1, labels: {version: v1}, trafficPolicy: {connectionPool: {tcp: {maxConnections: 5}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: client, namespace: a}
spec:
  host: client
  trafficPolicy: {loadBalancer: {simple: LEAST_CONN}}
"#,
    );
    let s = translate(&r, &proxy(&r, "a", "client"));
    let policy = |name: &str| cluster(&s, name).load_balancer.policy;
    assert_eq!(
        policy("outbound|80||server.a.svc.cluster.local"),
        LbPolicy::LeastRequest,
        "UNSPECIFIED"
    );
    assert_eq!(
        policy("outbound|80|v1|server.a.svc.cluster.local"),
        LbPolicy::LeastRequest,
        "a subset without loadBalancer"
    );
    assert_eq!(
        policy("outbound|7000||server.a.svc.cluster.local"),
        LbPolicy::RoundRobin,
        "asked for"
    );
    assert_eq!(
        policy("outbound|8080||client.a.svc.cluster.local"),
        LbPolicy::LeastRequest,
        "LEAST_CONN is LEAST_REQUEST's old name"
    );
    assert_eq!(
        policy("outbound|80||open.b.svc.cluster.local"),
        LbPolicy::LeastRequest,
        "no DestinationRule"
    );
}

#[test]
fn export_to_hides_services_and_rules() {
    let r = with(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: open, namespace: b}
spec:
  hosts: [open]
  exportTo: ["."]
  http: [{route: [{destination: {host: open}}], timeout: 7s}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: open, namespace: b}
spec: {host: open, exportTo: [b], trafficPolicy: {loadBalancer: {simple: RANDOM}}}
"#,
    );
    let client = translate(&r, &proxy(&r, "a", "client"));
    assert!(
        !client
            .services
            .iter()
            .any(|s| s.hostname == "hidden.b.svc.cluster.local")
    );
    let open = find_port(&client, "open.b.svc.cluster.local", 80);
    assert_eq!(
        open.http_routes[0].name, "default",
        "the VirtualService is not exported to a"
    );
    assert_eq!(
        cluster(&client, "outbound|80||open.b.svc.cluster.local")
            .load_balancer
            .policy,
        LbPolicy::LeastRequest,
        "Istio's default"
    );
    let other = translate(&r, &proxy(&r, "b", "other"));
    assert!(
        other
            .services
            .iter()
            .any(|s| s.hostname == "hidden.b.svc.cluster.local")
    );
    let HttpAction::Forward(f) =
        &find_port(&other, "open.b.svc.cluster.local", 80).http_routes[0].action
    else {
        panic!()
    };
    assert_eq!(f.timeout_ms, Some(7000));
    assert_eq!(
        cluster(&other, "outbound|80||open.b.svc.cluster.local")
            .load_balancer
            .policy,
        LbPolicy::Random
    );
}

#[test]
fn sidecar_egress_limits_what_a_proxy_sees() {
    let r = with(
        r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: weft-system}
spec:
  egress: [{hosts: ["./*"]}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: client, namespace: a}
spec:
  workloadSelector: {labels: {app: client}}
  egress: [{hosts: ["b/open.b.svc.cluster.local"]}]
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"#,
    );
    let client = translate(&r, &proxy(&r, "a", "client"));
    let hosts: Vec<&str> = client
        .services
        .iter()
        .map(|s| s.hostname.as_str())
        .collect();
    assert_eq!(hosts, ["open.b.svc.cluster.local"]);
    assert_eq!(
        client.mesh.outbound_traffic_policy,
        OutboundTrafficPolicy::RegistryOnly
    );
    let other = translate(&r, &proxy(&r, "b", "other"));
    let hosts: Vec<&str> = other.services.iter().map(|s| s.hostname.as_str()).collect();
    assert_eq!(
        hosts,
        ["hidden.b.svc.cluster.local", "open.b.svc.cluster.local"],
        "root namespace default: own namespace only"
    );
}

#[test]
fn peer_authentication_precedence() {
    let mesh = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: weft-system}
spec: {mtls: {mode: STRICT}}
"#;
    let r = with(mesh);
    assert_eq!(
        translate(&r, &proxy(&r, "a", "client")).inbound.mtls,
        MtlsMode::Strict
    );
    let r = with(&format!(
        r#"{mesh}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: a}}
spec: {{mtls: {{mode: PERMISSIVE}}, portLevelMtls: {{8080: {{mode: DISABLE}}}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: server, namespace: a}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  mtls: {{mode: UNSET}}
  portLevelMtls: {{9000: {{mode: DISABLE}}}}
"#
    ));
    let client = translate(&r, &proxy(&r, "a", "client"));
    assert_eq!(
        client.inbound.mtls,
        MtlsMode::Permissive,
        "namespace over mesh"
    );
    assert_eq!(
        client.inbound.port(8080).0,
        MtlsMode::Permissive,
        "portLevelMtls needs a selector"
    );
    let server = translate(&r, &proxy(&r, "a", "server-v1"));
    assert_eq!(server.inbound.mtls, MtlsMode::Permissive, "UNSET inherits");
    assert_eq!(
        server.inbound.port(9000),
        (MtlsMode::Disable, Protocol::Http),
        "container port"
    );
    // Peers see that the server takes plaintext on 9000: no identity on those endpoints.
    let c = cluster(&client, "outbound|80||server.a.svc.cluster.local");
    assert!(c.endpoints.iter().all(|e| e.identity.is_none()), "{c:#?}");
    let other = translate(&r, &proxy(&r, "b", "other"));
    assert_eq!(other.inbound.mtls, MtlsMode::Strict, "mesh-wide");
}

#[test]
fn gamma_http_route_filters() {
    let r = with(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server, namespace: a}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Version, value: v2}], remove: [x-debug]}
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: server-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}]
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: server-v2, port: 80}, percent: 10}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-served-by, value: mesh}]}
    backendRefs: [{name: server, port: 80, weight: 9}, {name: server-v2, port: 80, weight: 1}]
    timeouts: {request: 3s}
"#,
    );
    let s = translate(&r, &proxy(&r, "a", "client"));
    let routes = &find_port(&s, SERVER, 80).http_routes;
    assert_eq!(routes.len(), 3);
    assert_eq!(
        routes[0].matches[0].uri,
        Some(StringMatch::Exact("/old".into())),
        "exact first"
    );
    assert!(
        matches!(&routes[0].action, HttpAction::Redirect(r) if r.uri.as_deref() == Some("/new") && r.code == 301)
    );
    assert_eq!(
        routes[1].matches[0].uri,
        Some(StringMatch::SegmentPrefix("/v2".into())),
        "PathPrefix matches whole segments"
    );
    assert_eq!(
        routes[2].matches[0].uri,
        Some(StringMatch::SegmentPrefix("/".into())),
        "a rule without matches matches every path"
    );
    assert_eq!(routes[1].request_headers.set["x-version"], "v2");
    assert_eq!(routes[1].request_headers.remove, ["x-debug"]);
    let HttpAction::Forward(f) = &routes[1].action else {
        panic!()
    };
    assert_eq!(
        f.rewrite.as_ref().expect("rewrite").uri.as_deref(),
        Some("/")
    );
    assert_eq!(
        f.destinations[0].cluster,
        "outbound|80||server-v2.a.svc.cluster.local"
    );
    let HttpAction::Forward(f) = &routes[2].action else {
        panic!()
    };
    assert_eq!(
        f.destinations.iter().map(|d| d.weight).collect::<Vec<_>>(),
        [9, 1]
    );
    assert_eq!(f.timeout_ms, Some(3000));
    assert_eq!(f.mirrors[0].percentage, 10.0);
    assert_eq!(routes[2].response_headers.add["x-served-by"], "mesh");
    // The tcp port is not attached (parentRef port 80).
    assert!(find_port(&s, SERVER, 7000).http_routes.is_empty());
}

#[test]
fn grpc_route_matches_and_filters() {
    let r = with(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: api, namespace: a}
spec:
  parentRefs: [{group: "", kind: Service, name: client, port: 8080}]
  rules:
  - matches: [{method: {service: helloworld.Greeter, method: SayHello}, headers: [{name: X-Tenant, value: acme}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Route, value: grpc}], add: [{name: x-trace, value: "1"}], remove: [X-Debug]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-served-by, value: mesh}]}
    - type: RequestMirror
      requestMirror: {backendRef: {name: server-v2, port: 80}}
    backendRefs:
    - name: server
      port: 80
      weight: 3
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-backend, value: server}]}}]
    - {name: server-v2, port: 80, weight: 1}
  - matches: [{method: {service: helloworld.Greeter}}]
    backendRefs: [{name: server-v2, port: 80}]
"#,
    );
    let s = translate(&r, &proxy(&r, "b", "other"));
    let routes = &find_port(&s, "client.a.svc.cluster.local", 8080).http_routes;
    assert_eq!(routes.len(), 2, "{routes:#?}");
    let say_hello = &routes[0];
    assert_eq!(
        say_hello.matches[0].uri,
        Some(StringMatch::Exact("/helloworld.Greeter/SayHello".into()))
    );
    assert_eq!(say_hello.matches[0].headers[0].name, "x-tenant");
    assert_eq!(say_hello.request_headers.set["x-route"], "grpc");
    assert_eq!(say_hello.request_headers.add["x-trace"], "1");
    assert_eq!(say_hello.request_headers.remove, ["x-debug"]);
    assert_eq!(say_hello.response_headers.set["x-served-by"], "mesh");
    let HttpAction::Forward(f) = &say_hello.action else {
        panic!("{say_hello:#?}")
    };
    assert_eq!(
        f.mirrors[0].cluster,
        "outbound|80||server-v2.a.svc.cluster.local"
    );
    assert_eq!(
        f.destinations
            .iter()
            .map(|d| (d.cluster.as_str(), d.weight))
            .collect::<Vec<_>>(),
        [
            ("outbound|80||server.a.svc.cluster.local", 3),
            ("outbound|80||server-v2.a.svc.cluster.local", 1)
        ]
    );
    assert_eq!(
        f.destinations[0].request_headers.set["x-backend"], "server",
        "backendRef filters"
    );
    assert!(f.destinations[1].request_headers.set.is_empty());
    assert_eq!(
        routes[1].matches[0].uri,
        Some(StringMatch::Prefix("/helloworld.Greeter/".into())),
        "a service match is a prefix of whole segments already"
    );
}

#[test]
fn traffic_split_weights_backends() {
    let r = with(
        r#"
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: server, namespace: a}
spec:
  service: server
  backends: [{service: server, weight: 90}, {service: server-v2, weight: 10}]
"#,
    );
    let s = translate(&r, &proxy(&r, "a", "client"));
    let HttpAction::Forward(f) = &find_port(&s, SERVER, 80).http_routes[0].action else {
        panic!()
    };
    assert_eq!(
        f.destinations
            .iter()
            .map(|d| (d.cluster.as_str(), d.weight))
            .collect::<Vec<_>>(),
        [
            ("outbound|80||server.a.svc.cluster.local", 90),
            ("outbound|80||server-v2.a.svc.cluster.local", 10)
        ]
    );
    let tcp = &find_port(&s, SERVER, 7000).tcp_routes[0];
    assert_eq!(
        tcp.destinations[1].cluster,
        "outbound|7000||server-v2.a.svc.cluster.local"
    );
    s.validate()
        .expect("the missing server-v2:7000 is an empty cluster, not a dangling name");
}

/// Captures what the translator logs (at warn and above) while `f` runs.
fn warnings<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&sink.0.lock().expect("lock")).into_owned();
    (out, text)
}

#[test]
fn delegates_and_several_virtual_services() {
    let r = with(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root, namespace: a}
spec:
  hosts: [server.a.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /shop}}]
    delegate: {name: shop, namespace: a}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: a}
spec:
  http:
  - match: [{headers: {x-beta: {exact: "1"}}}]
    route: [{destination: {host: server-v2}}]
  - route: [{destination: {host: server}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: later, namespace: a}
spec:
  hosts: [server]
  http: [{directResponse: {status: 503, body: {string: down}}}]
"#,
    );
    let (s, logs) = warnings(|| translate(&r, &proxy(&r, "a", "client")));
    let routes = &find_port(&s, SERVER, 80).http_routes;
    assert_eq!(
        routes.len(),
        2,
        "the oldest VirtualService only: {routes:#?}"
    );
    assert_eq!(
        routes[0].matches[0].uri,
        Some(StringMatch::Prefix("/shop".into()))
    );
    assert_eq!(routes[0].matches[0].headers[0].name, "x-beta");
    assert_eq!(
        routes[1].matches[0].uri,
        Some(StringMatch::Prefix("/shop".into()))
    );
    assert!(
        logs.contains("WARN")
            && logs.contains("VirtualService/a/root")
            && logs.contains("VirtualService/a/later"),
        "both names at warn: {logs}"
    );
}

#[test]
fn the_most_specific_then_the_oldest_virtual_service_applies() {
    let r = with(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wide, namespace: a}
spec:
  hosts: ["*.a.svc.cluster.local"]
  http: [{directResponse: {status: 418}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: exact, namespace: b}
spec:
  hosts: [server.a.svc.cluster.local]
  http: [{directResponse: {status: 200}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: short, namespace: a}
spec:
  hosts: [server]
  http: [{directResponse: {status: 201}}]
"#,
    );
    let (s, logs) = warnings(|| translate(&r, &proxy(&r, "a", "client")));
    let status = |host: &str, port: u16| match &find_port(&s, host, port).http_routes[..] {
        [route] => match &route.action {
            HttpAction::DirectResponse(d) => d.status,
            other => panic!("{other:?}"),
        },
        other => panic!("{host}: {other:#?}"),
    };
    assert_eq!(
        status(SERVER, 80),
        200,
        "an exact host beats a wildcard; the FQDN from b is older than the short name in a"
    );
    assert_eq!(
        status("server-v2.a.svc.cluster.local", 80),
        418,
        "the wildcard still covers the other services"
    );
    for name in [
        "VirtualService/b/exact",
        "VirtualService/a/short",
        "VirtualService/a/wide",
    ] {
        assert!(logs.contains(name), "{name}: {logs}");
    }
}

#[test]
fn nested_delegation_is_refused_and_the_rest_translated() {
    let r = with(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root, namespace: a}
spec:
  hosts: [server]
  http:
  - match: [{uri: {prefix: /self}}]
    delegate: {name: selfish}
  - match: [{uri: {prefix: /loop}}]
    delegate: {name: ping}
  - route: [{destination: {host: server}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: selfish, namespace: a}
spec:
  http:
  - match: [{uri: {prefix: /self/again}}]
    delegate: {name: selfish}
  - route: [{destination: {host: server-v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ping, namespace: a}
spec:
  http: [{delegate: {name: pong}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pong, namespace: a}
spec:
  http: [{delegate: {name: ping}}]
"#,
    );
    let (s, logs) = warnings(|| translate(&r, &proxy(&r, "a", "client")));
    s.validate().expect("valid");
    let routes = &find_port(&s, SERVER, 80).http_routes;
    assert_eq!(routes.len(), 2, "{routes:#?}");
    assert_eq!(
        routes[0].matches[0].uri,
        Some(StringMatch::Prefix("/self".into())),
        "the self-delegating route is dropped, the delegate's other route kept"
    );
    let HttpAction::Forward(f) = &routes[0].action else {
        panic!("{routes:#?}")
    };
    assert_eq!(
        f.destinations[0].cluster,
        "outbound|80||server-v2.a.svc.cluster.local"
    );
    assert!(
        routes[1].matches.is_empty(),
        "the root's last route survives"
    );
    assert!(
        logs.contains("VirtualService/a/selfish") && logs.contains("VirtualService/a/ping"),
        "warnings name the VirtualServices: {logs}"
    );
}

#[test]
fn the_oldest_routing_resource_of_a_service_applies() {
    const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server, namespace: a}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules: [{backendRefs: [{name: server-v2, port: 80}]}]
"#;
    const SPLIT: &str = r#"
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: first, namespace: a}
spec:
  service: server
  backends: [{service: server, weight: 50}, {service: server-v2, weight: 50}]
"#;
    const SPLIT2: &str = r#"
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: second, namespace: a}
spec:
  service: server
  backends: [{service: server-v2, weight: 1}]
"#;
    const VS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: server, namespace: a}
spec:
  hosts: [server]
  http: [{directResponse: {status: 204}}]
"#;
    let first_route = |docs: &[&str]| {
        let r = with(&docs.join("\n---\n"));
        warnings(|| {
            let s = translate(&r, &proxy(&r, "a", "client"));
            find_port(&s, SERVER, 80).http_routes[0].clone()
        })
    };
    // HTTPRoute older than the TrafficSplit.
    let (route, logs) = first_route(&[ROUTE, SPLIT]);
    assert_eq!(route.name, "a.server.0");
    assert!(
        logs.contains("HTTPRoute/a/server") && logs.contains("TrafficSplit/a/first"),
        "{logs}"
    );
    // TrafficSplits: the oldest, then the HTTPRoute loses to it.
    let (route, logs) = first_route(&[SPLIT, SPLIT2, ROUTE]);
    assert_eq!(route.name, "trafficsplit");
    let HttpAction::Forward(f) = &route.action else {
        panic!("{route:#?}")
    };
    assert_eq!(f.destinations.len(), 2, "the first split: {route:#?}");
    assert!(logs.contains("TrafficSplit/a/second"), "{logs}");
    assert!(logs.contains("HTTPRoute/a/server"), "{logs}");
    // A VirtualService younger than the HTTPRoute loses too; older, it wins.
    let (route, logs) = first_route(&[ROUTE, VS]);
    assert_eq!(route.name, "a.server.0");
    assert!(logs.contains("VirtualService/a/server"), "{logs}");
    let (route, _) = first_route(&[VS, ROUTE]);
    assert!(
        matches!(route.action, HttpAction::DirectResponse(ref d) if d.status == 204),
        "{route:#?}"
    );
}

#[test]
fn tcp_and_tls_routes_by_port_sni_weight_and_source_subnet() {
    let r = with(
        r#"
apiVersion: v1
kind: Service
metadata: {name: edge, namespace: a}
spec:
  clusterIP: 10.96.0.30
  selector: {app: server}
  ports: [{name: tls, port: 443, targetPort: 9000}, {name: tcp-db, port: 5432, targetPort: 9000}, {name: tcp-cache, port: 6379, targetPort: 9000}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: edge, namespace: a}
spec:
  hosts: [edge]
  tls:
  - match: [{port: 443, sniHosts: ["*.api.example", "www.example"]}]
    route:
    - {destination: {host: server, port: {number: 7000}}, weight: 70}
    - {destination: {host: server-v2, port: {number: 80}}, weight: 30}
  tcp:
  - match: [{port: 5432, sourceSubnet: "10.44.0.3"}]
    route: [{destination: {host: server-v2, port: {number: 80}}}]
  - match: [{port: 5432, sourceSubnet: 10.44.0.0/30}]
    route: [{destination: {host: server, port: {number: 7000}}}]
  - match: [{port: 6379, destinationSubnets: [10.96.0.30/32]}]
    route:
    - {destination: {host: server, port: {number: 7000}}, weight: 1}
    - {destination: {host: server-v2, port: {number: 80}}, weight: 3}
"#,
    );
    const EDGE: &str = "edge.a.svc.cluster.local";
    let client = translate(&r, &proxy(&r, "a", "client"));
    client.validate().expect("valid");
    let tls = find_port(&client, EDGE, 443);
    assert_eq!(tls.protocol, Protocol::Tls);
    assert_eq!(tls.tcp_routes.len(), 1, "{:#?}", tls.tcp_routes);
    assert_eq!(
        tls.tcp_routes[0].matches[0].sni_hosts,
        ["*.api.example", "www.example"]
    );
    assert_eq!(
        tls.tcp_routes[0]
            .destinations
            .iter()
            .map(|d| (d.cluster.as_str(), d.weight))
            .collect::<Vec<_>>(),
        [
            ("outbound|7000||server.a.svc.cluster.local", 70),
            ("outbound|80||server-v2.a.svc.cluster.local", 30)
        ]
    );
    // Port 5432: the client (10.44.0.2) is in 10.44.0.0/30, but is not 10.44.0.3.
    let db = find_port(&client, EDGE, 5432);
    assert_eq!(db.tcp_routes.len(), 1, "{:#?}", db.tcp_routes);
    assert!(
        db.tcp_routes[0].matches[0] == Default::default(),
        "sourceSubnet is decided per proxy, no connection condition"
    );
    assert_eq!(
        db.tcp_routes[0].destinations[0].cluster,
        "outbound|7000||server.a.svc.cluster.local"
    );
    let cache = find_port(&client, EDGE, 6379);
    assert_eq!(
        cache.tcp_routes.len(),
        1,
        "port-matched: one route per port"
    );
    assert_eq!(
        cache.tcp_routes[0].matches[0].destination_subnets,
        ["10.96.0.30/32".parse::<ipnet::IpNet>().expect("net")]
    );
    assert_eq!(
        cache.tcp_routes[0]
            .destinations
            .iter()
            .map(|d| d.weight)
            .collect::<Vec<_>>(),
        [1, 3]
    );
    // The pod at 10.44.0.3 (namespace b) is in both; its own address comes first.
    let other = translate(&r, &proxy(&r, "b", "other"));
    let db = find_port(&other, EDGE, 5432);
    assert_eq!(db.tcp_routes.len(), 2, "{:#?}", db.tcp_routes);
    assert_eq!(
        db.tcp_routes[0].destinations[0].cluster,
        "outbound|80||server-v2.a.svc.cluster.local"
    );
    // Their outbound views differ, so they are not shared.
    let index = r.index();
    assert_ne!(
        index.outbound_key(&proxy(&r, "a", "client")).1,
        index
            .outbound_key(&ProxyRef {
                ip: Some("10.44.0.9".parse().expect("ip")),
                ..proxy(&r, "a", "client")
            })
            .1
    );
}

#[test]
fn service_entries() {
    let r = with(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: a}
spec:
  hosts: [db.example.com]
  addresses: [192.0.2.10/32]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 192.0.2.11}, {address: 192.0.2.12, ports: {tcp-pg: 6432}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: a}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: DNS
"#,
    );
    let s = translate(&r, &proxy(&r, "a", "client"));
    let db = s
        .services
        .iter()
        .find(|x| x.hostname == "db.example.com")
        .expect("db");
    assert_eq!(db.vips[0].to_string(), "192.0.2.10");
    let c = cluster(&s, "outbound|5432||db.example.com");
    assert_eq!(
        c.endpoints.iter().map(|e| e.port).collect::<Vec<_>>(),
        [5432, 6432]
    );
    assert!(c.endpoints.iter().all(|e| e.identity.is_none()));
    let api = cluster(&s, "outbound|443||api.example.com");
    assert_eq!(
        api.load_balancer.policy,
        LbPolicy::Passthrough,
        "DNS resolution: to the original destination"
    );
    assert_eq!(
        find_port(&s, "api.example.com", 443).protocol,
        Protocol::Tls
    );
}

#[test]
fn unknown_destinations_become_empty_clusters() {
    let r = with(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: server, namespace: a}
spec:
  hosts: [server]
  http: [{route: [{destination: {host: nowhere, port: {number: 80}}}, {destination: {host: server, subset: missing}}]}]
"#,
    );
    let s = translate(&r, &proxy(&r, "a", "client"));
    s.validate().expect("valid");
    assert!(
        cluster(&s, "outbound|80||nowhere.a.svc.cluster.local")
            .endpoints
            .is_empty()
    );
    assert!(
        cluster(&s, "outbound|80|missing|server.a.svc.cluster.local")
            .endpoints
            .is_empty()
    );
}

#[test]
fn corpus_samples_translate_to_valid_snapshots() {
    let r = bookinfo();
    for pod in r.pods.values() {
        let s = translate(&r, &ProxyRef::from_pod(pod));
        s.validate()
            .unwrap_or_else(|e| panic!("{:?}: {e}", pod.name));
    }
    let v: Value =
        serde_json::to_value(translate(&r, &proxy(&r, "default", "ratings-v1-0"))).expect("json");
    assert!(v["services"].as_array().is_some_and(|s| !s.is_empty()));
}

#[test]
fn dual_stack_vips_once_and_unready_pods_are_not_endpoints() {
    let r = with(
        r#"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: a}
spec:
  clusterIP: 10.96.7.7
  clusterIPs: [10.96.7.7, "fd00:96::7"]
  selector: {app: dual}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: dual-ready, namespace: a, labels: {app: dual}}
spec: {containers: [{name: app}]}
status:
  podIP: 10.44.9.1
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Pod
metadata: {name: dual-starting, namespace: a, labels: {app: dual}}
spec: {containers: [{name: app}]}
status:
  podIP: 10.44.9.2
  conditions: [{type: Ready, status: "False"}]
"#,
    );
    let s = translate(&r, &proxy(&r, "a", "client"));
    s.validate().expect("a valid snapshot");
    let svc = s
        .services
        .iter()
        .find(|x| x.hostname == "dual.a.svc.cluster.local")
        .expect("service");
    assert_eq!(svc.vips.len(), 2, "{:?}", svc.vips);
    let c = cluster(&s, "outbound|80||dual.a.svc.cluster.local");
    let addrs: Vec<String> = c.endpoints.iter().map(|e| e.address.to_string()).collect();
    assert_eq!(
        addrs,
        ["10.44.9.1"],
        "a pod that is not Ready is not an endpoint"
    );
}
