//! The real HTTPS server on 127.0.0.1:0, called with real AdmissionReview JSON over TLS
//! (HTTP/1.1 and HTTP/2) by a hyper client that trusts the server's generated CA. The returned
//! base64 JSON patch is applied with json-patch and the result checked. Bad bodies (malformed,
//! oversized, truncated, never finished) get 400 with a message saying what was wrong, and never
//! hang. With Node objects in a local directory (read by the real local source into the real
//! store), a pod in eBPF mode gets it only where the nodes' agents are ready.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Pod;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use weft_webhook::mesh::MeshConfig;
use weft_webhook::resources::{Settings, Store};
use weft_webhook::server::{self, AppState, Limits, NodeSource};
use weft_webhook::serving_cert;
use weft_webhook::source::local::LocalSource;

struct TestServer {
    addr: SocketAddr,
    connector: TlsConnector,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    async fn start(limits: Limits) -> TestServer {
        TestServer::start_with(limits, None).await
    }

    async fn start_with(limits: Limits, nodes: Option<NodeSource>) -> TestServer {
        let cert = serving_cert::generate(&serving_cert::service_dns_names(
            "weft-control-plane",
            "weft-system",
        ))
        .expect("generate cert");
        let tls = serving_cert::server_config(&cert).expect("server config");
        let state = Arc::new(AppState {
            mesh: MeshConfig::default(),
            cluster_supports_native_sidecars: None,
            nodes,
        });
        let router = server::router_with(state, limits);
        let listener = server::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::serve(listener, tls, router, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(cert.ca_pem.as_bytes()).expect("ca pem"))
            .expect("add root");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TestServer {
            addr,
            connector: TlsConnector::from(Arc::new(config)),
            stop: Some(stop),
            task,
        }
    }

    async fn tls(&self) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        let name = ServerName::try_from("weft-control-plane.weft-system.svc").expect("name");
        self.connector
            .connect(name, tcp)
            .await
            .expect("tls handshake verifies the server")
    }

    /// A TLS connection without ALPN, so that hand-written HTTP/1.1 is what the server reads.
    async fn tls_http1(&self) -> TlsStream<TcpStream> {
        let mut config = rustls::ClientConfig::clone(self.connector.config());
        config.alpn_protocols.clear();
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("tls")
    }

    /// Writes `head` and `body` by hand over HTTP/1.1, half-closes the connection when `close`
    /// says so (else keeps it open and idle), and reads the whole answer.
    async fn raw(&self, head: &str, body: &[u8], close: bool) -> String {
        let mut tls = self.tls_http1().await;
        tls.write_all(head.as_bytes()).await.expect("write head");
        tls.write_all(body).await.expect("write body");
        tls.flush().await.expect("flush");
        if close {
            // close_notify, then FIN: the client is done sending.
            tls.shutdown().await.expect("half-close");
        }
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut answer))
            .await
            .expect("server answered and closed instead of hanging")
            .ok();
        text(&answer)
    }

    /// One request over a fresh connection, with HTTP/2 when ALPN picks it.
    async fn post(&self, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let tls = self.tls().await;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let req = Request::post(path)
            .header("content-type", "application/json")
            .header("host", "weft-control-plane.weft-system.svc")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let resp = if h2 {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .expect("h2 handshake");
            tokio::spawn(conn);
            send.send_request(req).await.expect("response")
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .expect("h1 handshake");
            tokio::spawn(conn);
            send.send_request(req).await.expect("response")
        };
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        (status, body)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops")
            .expect("server task");
    }
}

fn corpus_pod(file: &str) -> Pod {
    let yaml = std::fs::read_to_string(common::corpus_dir().join("inputs").join(file))
        .expect("read corpus");
    let (_, _, mut pod) = common::pods_in(&yaml).remove(0);
    // As the API server sends a Deployment's pod: generated name, namespace set.
    pod.metadata.name = None;
    pod.metadata.generate_name = Some("hello-5d4f8b7c9-".into());
    pod.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("pod-template-hash".into(), "5d4f8b7c9".into());
    pod.metadata.namespace = Some("genesis".into());
    pod
}

fn review(kind: &str, resource: &str, object: Value) -> Vec<u8> {
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": resource},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": resource},
            "name": "",
            "namespace": "genesis",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
            "someFutureField": {"tolerated": true}
        }
    });
    serde_json::to_vec(&review).expect("serialize review")
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_over_https_returns_a_patch_that_injects() {
    let server = TestServer::start(Limits::default()).await;
    for file in ["hello.yaml", "ready_live.yaml", "traffic-annotations.yaml"] {
        let pod = corpus_pod(file);
        let (status, body) = server
            .post(
                "/inject",
                review("Pod", "pods", serde_json::to_value(&pod).expect("pod")),
            )
            .await;
        assert_eq!(status, 200, "{file}: {}", text(&body));
        let answer: Value = serde_json::from_slice(&body).expect("answer is json");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let resp = &answer["response"];
        assert_eq!(resp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(resp["allowed"], true, "{file}: {resp}");
        assert_eq!(resp["patchType"], "JSONPatch");
        let patch = STANDARD
            .decode(resp["patch"].as_str().expect("patch is base64 text"))
            .expect("base64");
        let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("json patch");
        let mut doc = serde_json::to_value(&pod).expect("pod json");
        json_patch::patch(&mut doc, &patch).expect("patch applies");
        let injected: Pod = serde_json::from_value(doc).expect("injected pod");
        common::check_injected(
            file,
            &pod,
            &injected,
            common::Expect {
                native: true,
                proxy_uid: 1337,
            },
        );
        assert_eq!(
            injected.metadata.labels.as_ref().expect("labels")["service.istio.io/canonical-name"],
            if file == "traffic-annotations.yaml" {
                "traffic"
            } else {
                "hello"
            }
        );
    }
    server.stop().await;
}

/// What `/inject` answered for `pod`: the injected `weft-init`'s `--mode=` and the warnings.
async fn inject_mode(server: &TestServer, pod: &Pod) -> (String, Vec<String>) {
    let (status, body) = server
        .post(
            "/inject",
            review("Pod", "pods", serde_json::to_value(pod).expect("pod")),
        )
        .await;
    assert_eq!(status, 200, "{}", text(&body));
    let answer: Value = serde_json::from_slice(&body).expect("answer is json");
    let resp = &answer["response"];
    assert_eq!(resp["allowed"], true, "{resp}");
    let patch = STANDARD
        .decode(resp["patch"].as_str().expect("a patch"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("json patch");
    let mut doc = serde_json::to_value(pod).expect("pod json");
    json_patch::patch(&mut doc, &patch).expect("patch applies");
    let injected: Pod = serde_json::from_value(doc).expect("injected pod");
    let init = common::container(&injected, "weft-init").expect("weft-init");
    let mode = init
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--mode="))
        .expect("--mode")
        .to_owned();
    let warnings = resp["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| w.as_str().expect("warning text").to_owned())
        .collect();
    (mode, warnings)
}

fn write_nodes(dir: &std::path::Path, nodes: &[(&str, Option<&str>)]) {
    let docs: Vec<String> = nodes
        .iter()
        .map(|(name, label)| {
            let label = label
                .map(|v| format!("\n    weft.dev/ebpf-redirect: {v}"))
                .unwrap_or_default();
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/os: linux{label}\n"
            )
        })
        .collect();
    // Atomically, as the README asks of local-mode files.
    let tmp = dir.join(".nodes.yaml.tmp");
    std::fs::write(&tmp, docs.join("---\n")).expect("write nodes");
    std::fs::rename(&tmp, dir.join("nodes.yaml")).expect("rename nodes");
}

fn ebpf_pod(node_name: Option<&str>) -> Pod {
    let mut pod = corpus_pod("hello.yaml");
    pod.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("sidecar.istio.io/interceptionMode".into(), "EBPF".into());
    if let Some(node) = node_name {
        pod.spec.as_mut().expect("spec").node_name = Some(node.into());
    }
    pod
}

fn ebpf_warnings(warnings: &[String]) -> Vec<&String> {
    warnings
        .iter()
        .filter(|w| w.contains("weft.dev/ebpf-redirect"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_mode_only_where_the_nodes_agents_are_ready() {
    let tmp = tempfile::tempdir().expect("tmp");
    write_nodes(
        tmp.path(),
        &[("node-0", Some("ready")), ("node-1", Some("unsupported"))],
    );
    let store = Store::new(Settings::default());
    let mut source = LocalSource::new(tmp.path().to_path_buf());
    assert!(source.sync(&store));
    let server =
        TestServer::start_with(Limits::default(), Some(NodeSource::complete(store.clone()))).await;

    // Not scheduled yet, one node unsupported: iptables, and a warning naming that node.
    let (mode, warnings) = inject_mode(&server, &ebpf_pod(None)).await;
    assert_eq!(mode, "redirect", "{warnings:?}");
    let w = ebpf_warnings(&warnings);
    assert_eq!(w.len(), 1, "{warnings:?}");
    assert!(
        w[0].contains(r#""node-1" (weft.dev/ebpf-redirect="unsupported")"#)
            && !w[0].contains("node-0")
            && w[0].contains("iptables (REDIRECT)"),
        "{w:?}"
    );
    // Bound to the ready node, or to the unsupported one.
    let (mode, warnings) = inject_mode(&server, &ebpf_pod(Some("node-0"))).await;
    assert_eq!(mode, "ebpf", "{warnings:?}");
    assert!(ebpf_warnings(&warnings).is_empty(), "{warnings:?}");
    let (mode, warnings) = inject_mode(&server, &ebpf_pod(Some("node-1"))).await;
    assert_eq!(mode, "redirect");
    assert!(
        ebpf_warnings(&warnings)
            .iter()
            .any(|w| w.contains(r#"its node "node-1" has weft.dev/ebpf-redirect="unsupported""#)),
        "{warnings:?}"
    );
    // A pod that asks for iptables is never told anything.
    let mut plain = ebpf_pod(None);
    plain.metadata.annotations = None;
    let (mode, warnings) = inject_mode(&server, &plain).await;
    assert_eq!(mode, "redirect");
    assert!(ebpf_warnings(&warnings).is_empty(), "{warnings:?}");

    // The agent on node-1 comes up: every node is ready, eBPF it is.
    write_nodes(
        tmp.path(),
        &[("node-0", Some("ready")), ("node-1", Some("ready"))],
    );
    assert!(source.sync(&store));
    let (mode, warnings) = inject_mode(&server, &ebpf_pod(None)).await;
    assert_eq!(mode, "ebpf", "{warnings:?}");
    assert!(ebpf_warnings(&warnings).is_empty(), "{warnings:?}");

    // No nodes at all.
    std::fs::remove_file(tmp.path().join("nodes.yaml")).expect("rm");
    assert!(source.sync(&store));
    let (mode, warnings) = inject_mode(&server, &ebpf_pod(None)).await;
    assert_eq!(mode, "redirect");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("no node reports a ready eBPF agent")),
        "{warnings:?}"
    );
    server.stop().await;
}

/// A control plane that has just started answers once the nodes are listed, not before; a
/// list that never completes makes the pod fall back, saying so, once the wait is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_waits_for_the_first_list_of_nodes() {
    let store = Store::new(Settings::default());
    let (listed_tx, listed) = tokio::sync::watch::channel(false);
    let server = TestServer::start_with(
        Limits::default(),
        Some(NodeSource::new(store.clone(), listed)),
    )
    .await;
    let lister = tokio::spawn({
        let store = store.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            store.update(|r| {
                for name in ["node-0", "node-1"] {
                    let node = json!({
                        "apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": name, "labels": {"weft.dev/ebpf-redirect": "ready"}},
                    });
                    let object = weft_webhook::resources::Object::from_value(&node)
                        .expect("a node")
                        .expect("a kind the store keeps");
                    r.upsert(object);
                }
                false
            });
            listed_tx.send_replace(true);
        }
    });
    let (mode, warnings) = inject_mode(&server, &ebpf_pod(None)).await;
    assert_eq!(mode, "ebpf", "{warnings:?}");
    lister.await.expect("lister");
    server.stop().await;

    // The same ready nodes in the store, but their list never completes (a watch that RBAC
    // refuses): nothing is known to work.
    let (_never_tx, never) = tokio::sync::watch::channel(false);
    let server =
        TestServer::start_with(Limits::default(), Some(NodeSource::new(store, never))).await;
    let (mode, warnings) = inject_mode(&server, &ebpf_pod(None)).await;
    assert_eq!(mode, "redirect");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("has not listed the cluster's nodes yet")),
        "{warnings:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_denials_skips_and_other_kinds() {
    let server = TestServer::start(Limits::default()).await;

    // A bad annotation: 200 with allowed=false naming it.
    let bad = corpus_pod("traffic-annotations-bad-includeinboundports.yaml");
    let (status, body) = server
        .post(
            "/inject",
            review("Pod", "pods", serde_json::to_value(&bad).expect("pod")),
        )
        .await;
    assert_eq!(status, 200);
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(resp["response"]["allowed"], false);
    let message = resp["response"]["status"]["message"]
        .as_str()
        .expect("message");
    assert!(
        message.contains("traffic.sidecar.istio.io/includeInboundPorts") && message.contains("bad"),
        "{message}"
    );

    // Opted out: allowed, no patch.
    let ignored = corpus_pod("hello-ignore.yaml");
    let (status, body) = server
        .post(
            "/inject",
            review("Pod", "pods", serde_json::to_value(&ignored).expect("pod")),
        )
        .await;
    assert_eq!(status, 200);
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(resp["response"]["allowed"], true);
    assert!(resp["response"].get("patch").is_none(), "{resp}");

    // Another kind sent by a misconfigured webhook: allowed unchanged.
    let (status, body) = server
        .post(
            "/inject",
            review(
                "Deployment",
                "deployments",
                json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {}}),
            ),
        )
        .await;
    assert_eq!(status, 200);
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(resp["response"]["allowed"], true);
    assert!(resp["response"].get("patch").is_none());

    // A pod that is not a pod: denied with the reason.
    let (status, body) = server
        .post(
            "/inject",
            review(
                "Pod",
                "pods",
                json!({"metadata": {"name": "p"}, "spec": {"containers": "nope"}}),
            ),
        )
        .await;
    assert_eq!(status, 200);
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(resp["response"]["allowed"], false);
    assert!(text(&body).contains("not a valid Pod"), "{}", text(&body));

    // /validate: the corpus's valid, invalid and deprecated objects.
    let corpus_object = |path: &str, kind: &str| {
        let yaml = std::fs::read_to_string(common::corpus_dir().join("..").join(path))
            .expect("read corpus object");
        let doc = serde_yaml_ng::Deserializer::from_str(&yaml)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("yaml"))
            .find(|d| d.get("kind").is_some())
            .expect("a document");
        review(kind, &format!("{}s", kind.to_lowercase()), doc)
    };
    let (status, body) = server
        .post(
            "/validate",
            corpus_object(
                "samples/bookinfo/networking/virtual-service-all-v1.yaml",
                "VirtualService",
            ),
        )
        .await;
    assert_eq!(status, 200, "{}", text(&body));
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(resp["response"]["allowed"], true, "{resp}");

    let (status, body) = server
        .post(
            "/validate",
            corpus_object(
                "istio-api/invalid/istioctl-validate/invalid-virtual-service-negative-weight.yaml",
                "VirtualService",
            ),
        )
        .await;
    assert_eq!(status, 200, "{}", text(&body));
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(resp["response"]["allowed"], false, "{resp}");
    let message = resp["response"]["status"]["message"]
        .as_str()
        .expect("message");
    assert!(
        message.contains("spec.http[0].route[1].weight"),
        "{message}"
    );

    let (status, body) = server
        .post(
            "/validate",
            corpus_object(
                "istio-api/invalid/istioctl-validate/warning-deprecated-consecutive-errors.yaml",
                "DestinationRule",
            ),
        )
        .await;
    assert_eq!(status, 200, "{}", text(&body));
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(resp["response"]["allowed"], true, "{resp}");
    let warnings = resp["response"]["warnings"].as_array().expect("warnings");
    assert!(
        warnings[0]
            .as_str()
            .is_some_and(|w| w.contains("consecutiveErrors")),
        "{warnings:?}"
    );

    // Valid Istio that Weft does not enforce is admitted, with a warning that says so.
    let (status, body) = server
        .post(
            "/validate",
            corpus_object(
                "istio-api/valid/api-reference-examples/authorization_policy-02.yaml",
                "AuthorizationPolicy",
            ),
        )
        .await;
    assert_eq!(status, 200, "{}", text(&body));
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(resp["response"]["allowed"], true, "{resp}");
    let warnings = resp["response"]["warnings"].as_array().expect("warnings");
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("NOT ENFORCED"))),
        "{warnings:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_clear_400_answers() {
    let server = TestServer::start(Limits::default()).await;
    let good = review(
        "Pod",
        "pods",
        serde_json::to_value(corpus_pod("pod.yaml")).expect("pod"),
    );

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed",
            b"{this is not json".to_vec(),
            400,
            "not a valid AdmissionReview",
        ),
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            400,
            "EOF while parsing",
        ),
        ("empty", Vec::new(), 400, "not a valid AdmissionReview"),
        (
            "wrong kind",
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}}))
                .expect("json"),
            400,
            "expected AdmissionReview",
        ),
        (
            "no request",
            serde_json::to_vec(
                &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}),
            )
            .expect("json"),
            400,
            "no request",
        ),
        (
            "oversized",
            vec![b' '; server::MAX_BODY_BYTES + 1],
            400,
            "request body is larger than the limit of 4194304 bytes",
        ),
    ];
    for (what, body, status, needle) in cases {
        let (got, answer) =
            tokio::time::timeout(Duration::from_secs(20), server.post("/inject", body))
                .await
                .unwrap_or_else(|_| panic!("{what}: server hung"));
        assert_eq!(got, status, "{what}: {}", text(&answer));
        assert!(text(&answer).contains(needle), "{what}: {}", text(&answer));
    }

    let tls = server.tls().await;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("/healthz")
                .header("host", "x")
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("healthz");
    assert_eq!(resp.status(), 200);
    server.stop().await;
}

fn post_head(path: &str, length: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{length}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_body_gets_400_when_the_client_stops_sending() {
    let server = TestServer::start(Limits::default()).await;
    for path in ["/inject", "/validate"] {
        // Promise 1000 bytes, send 10, then half-close: the client has nothing more to send.
        let answer = server
            .raw(
                &post_head(path, "content-length: 1000\r\n"),
                b"{\"apiVersi",
                true,
            )
            .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(
            answer.contains("request body is truncated: 10 of 1000 bytes arrived"),
            "{path}: {answer}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_400_declared_or_streamed() {
    let server = TestServer::start(Limits {
        max_body_bytes: 1024,
        ..Limits::default()
    })
    .await;
    // Announced: refused before the body is read.
    let answer = server
        .raw(
            &post_head("/inject", "content-length: 5000\r\n"),
            b"{",
            false,
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains(
            "request body is larger than the limit of 1024 bytes (content-length is 5000)"
        ),
        "{answer}"
    );
    // Chunked, no length announced: refused once more than the limit has arrived.
    let chunk = vec![b' '; 2000];
    let mut body = format!("{:x}\r\n", chunk.len()).into_bytes();
    body.extend_from_slice(&chunk);
    body.extend_from_slice(b"\r\n0\r\n\r\n");
    let answer = server
        .raw(
            &post_head("/inject", "transfer-encoding: chunked\r\n"),
            &body,
            false,
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("request body is larger than the limit of 1024 bytes"),
        "{answer}"
    );
    server.stop().await;
}

/// The API server calls the webhook with `timeoutSeconds` from deploy/weft.yaml: a body that
/// never arrives is answered before that, even while the nodes' first list is awaited.
#[test]
fn the_body_deadline_is_shorter_than_the_webhook_timeout() {
    let yaml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/weft.yaml"),
    )
    .expect("read deploy/weft.yaml");
    let mut timeouts = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&yaml) {
        let v = <Value as serde::Deserialize>::deserialize(doc).expect("yaml");
        if v["kind"] == "MutatingWebhookConfiguration"
            || v["kind"] == "ValidatingWebhookConfiguration"
        {
            for hook in v["webhooks"].as_array().into_iter().flatten() {
                timeouts.push(hook["timeoutSeconds"].as_u64().expect("timeoutSeconds"));
            }
        }
    }
    assert!(!timeouts.is_empty(), "no webhooks in deploy/weft.yaml");
    for t in timeouts {
        assert!(
            server::REQUEST_TIMEOUT < Duration::from_secs(t),
            "REQUEST_TIMEOUT {:?} must be shorter than the webhook's timeoutSeconds {t}",
            server::REQUEST_TIMEOUT
        );
        // Right after start an injection may also wait for the nodes' first list.
        assert!(
            server::REQUEST_TIMEOUT + server::NODES_LIST_WAIT < Duration::from_secs(t),
            "REQUEST_TIMEOUT {:?} and NODES_LIST_WAIT {:?} must fit in timeoutSeconds {t}",
            server::REQUEST_TIMEOUT,
            server::NODES_LIST_WAIT
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_gets_400_instead_of_hanging() {
    let server = TestServer::start(Limits {
        request_timeout: Duration::from_millis(500),
        ..Limits::default()
    })
    .await;
    // Promise 1000 bytes, send 10, then wait with the connection open.
    let answer = server
        .raw(
            &post_head("/inject", "content-length: 1000\r\n"),
            b"{\"apiVersi",
            false,
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("request body not complete within 500ms: 10 of 1000 bytes arrived"),
        "{answer}"
    );
    server.stop().await;
}
