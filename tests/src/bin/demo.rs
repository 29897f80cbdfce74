//! `cargo xtask demo`: a local node with meshed pods in namespace `genesis`. service-a calls
//! service-b through both sidecars over mutual TLS (HTTP, gRPC, TCP) and the demo shows what
//! service-b saw; STRICT mTLS turns away a pod without a sidecar; then a canary rollout of
//! service-b v2 driven by an Istio VirtualService (100/0 → 90/10 → 0/100). Everything is torn
//! down at the end, on Ctrl-C and on SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use weft_tests::localnode::{self, LocalNode, PodRef, fixtures};
use weft_tests::sample::{GrpcReport, HttpReport, TcpReport};

/// Requests per canary step.
const CANARY_REQUESTS: u64 = 400;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let node = Arc::new(LocalNode::start().context("start the local node")?);
    localnode::teardown_on_signal(node.clone())?;
    let result = run(&node);
    // If `run` failed because a signal took the node away under it, the signal thread exits.
    localnode::wait_if_interrupted();
    node.teardown();
    println!("\nlocal node removed.");
    result
}

fn step(text: &str) {
    println!("\n==> {text}");
}

/// service-b's pod of `version`: HTTP on 8080, gRPC on 9090, TCP echo on 9000.
fn service_b(version: &str) -> Pod {
    let mut pod = fixtures::app_pod(
        "genesis",
        &format!("service-b-{version}"),
        "service-b",
        "service-b",
        &["--http", "8080", "--http", "9090", "--tcp-echo", "9000"],
    );
    pod.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("version".into(), version.into());
    fixtures::meshed(pod)
}

fn run(node: &LocalNode) -> anyhow::Result<()> {
    step("services service-a and service-b in namespace genesis");
    for (name, ports) in [
        ("service-a", vec![(8080, "http")]),
        (
            "service-b",
            vec![(8080, "http"), (9090, "grpc"), (9000, "tcp-echo")],
        ),
    ] {
        let vip = node.create_service(fixtures::service("genesis", name, &ports))?;
        println!("    {name}.genesis.svc.cluster.local -> {vip} (a VIP nothing routes)");
    }
    step("pods, admitted by the injection webhook: weft-init and the weft-proxy sidecar added");
    let b = node.run_pod(service_b("v1"))?;
    let a = node.run_pod(fixtures::meshed(fixtures::app_pod(
        "genesis",
        "service-a",
        "service-a",
        "service-a",
        &["--http", "8080"],
    )))?;
    let (init, containers) = node.pod_containers(&b)?;
    println!("    service-a     {}  (sa service-a)", a.ip);
    println!("    service-b-v1  {}  (sa service-b)", b.ip);
    println!("    service-b-v1 runs init containers {init:?}, containers {containers:?}");

    step("service-a: GET http://service-b:8080/hello  (plain HTTP/1.1 from the app)");
    let r: HttpReport = node.exec_json(
        &a,
        &["weft-sample-app", "http", "http://service-b:8080/hello"],
    )?;
    let reply = r.replies.first().context("no reply from service-b")?;
    println!("    status            {:?}", r.statuses);
    println!("    answered by       {}", reply.server);
    println!(
        "    service-b saw     {} {} over {}",
        reply.method, reply.path, reply.version
    );
    println!(
        "    caller identity   {}",
        reply.caller().unwrap_or("(none)")
    );
    println!(
        "    x-forwarded-client-cert: {}",
        reply.xfcc().unwrap_or("(none)")
    );

    step("service-a: gRPC unary and bidirectional stream to service-b:9090");
    let g: GrpcReport = node.exec_json(
        &a,
        &[
            "weft-sample-app",
            "grpc",
            "http://service-b:9090",
            "--stream",
            "3",
        ],
    )?;
    println!(
        "    unary             {:?} (caller {})",
        g.unary_message, g.unary_caller
    );
    println!("    stream            {:?}", g.stream_replies);
    if let Some(e) = g.error {
        println!("    error             {e}");
    }

    step("service-a: raw TCP echo to service-b:9000 (64 KiB, half-close)");
    let t: TcpReport = node.exec_json(&a, &["weft-sample-app", "tcp", "service-b:9000"])?;
    println!(
        "    sent {} bytes, received {}, identical: {}, error: {:?}",
        t.sent, t.received, t.identical, t.error
    );

    strict_mtls(node, &a, &b)?;
    canary(node, &a)?;

    step("service-b-v1's sidecar metrics (from :15090/stats/prometheus)");
    let metrics = node.proxy_metrics(&b)?;
    for line in metrics.lines().filter(|l| {
        (l.starts_with("weft_requests_total") || l.starts_with("weft_connections_total"))
            && l.contains("direction=\"inbound\"")
            && l.contains("mtls=\"true\"")
    }) {
        println!("    {line}");
    }
    Ok(())
}

/// PeerAuthentication STRICT: a pod without a sidecar is refused, service-a is not.
fn strict_mtls(node: &LocalNode, a: &PodRef, b: &PodRef) -> anyhow::Result<()> {
    step("PeerAuthentication STRICT in genesis; a pod without a sidecar calls service-b-v1");
    node.apply_yaml(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: genesis}\nspec: {mtls: {mode: STRICT}}\n",
    )?;
    let legacy = node.run_pod(fixtures::client_pod("genesis", "legacy", "legacy"))?;
    let url = format!("http://{}:8080/hello", b.ip);
    let r: HttpReport = node.exec_json(&legacy, &["weft-sample-app", "http", &url])?;
    println!(
        "    legacy (no sidecar) -> {url}: {}",
        if r.ok == 0 {
            format!(
                "refused ({:?})",
                r.errors
                    .keys()
                    .next()
                    .map(String::as_str)
                    .unwrap_or("error")
            )
        } else {
            format!("answered {:?}", r.statuses)
        }
    );
    let r: HttpReport = node.exec_json(
        a,
        &["weft-sample-app", "http", "http://service-b:8080/hello"],
    )?;
    println!(
        "    service-a (sidecar, mTLS) -> service-b: {:?}",
        r.statuses
    );
    Ok(())
}

/// A canary rollout of service-b v2 with a DestinationRule and a VirtualService.
fn canary(node: &LocalNode, a: &PodRef) -> anyhow::Result<()> {
    step("canary: subsets v1 and v2 of service-b, all traffic to v1, then service-b-v2 starts");
    let vs = |v1: u32, v2: u32| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: service-b, namespace: genesis}}\nspec:\n  hosts: [service-b]\n  http:\n  - route:\n    - {{destination: {{host: service-b, subset: v1}}, weight: {v1}}}\n    - {{destination: {{host: service-b, subset: v2}}, weight: {v2}}}\n"
        )
    };
    node.apply_yaml(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: service-b, namespace: genesis}}\nspec:\n  host: service-b\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n---\n{}",
        vs(100, 0)
    ))?;
    node.run_pod(service_b("v2"))?;
    for (v1, v2) in [(100, 0), (90, 10), (0, 100)] {
        if (v1, v2) != (100, 0) {
            node.apply_yaml(&vs(v1, v2))?;
        }
        let count = CANARY_REQUESTS.to_string();
        let r: HttpReport = node.exec_json(
            a,
            &[
                "weft-sample-app",
                "http",
                "http://service-b:8080/canary",
                "--count",
                &count,
                "--concurrency",
                "8",
            ],
        )?;
        let n = |v: &str| {
            r.servers
                .get(&format!("service-b-{v}"))
                .copied()
                .unwrap_or(0)
        };
        println!(
            "    VirtualService weights v1={v1:<3} v2={v2:<3} -> {CANARY_REQUESTS} requests: v1 answered {:>3}, v2 answered {:>3}, failed {}",
            n("v1"),
            n("v2"),
            r.failed()
        );
    }
    Ok(())
}
