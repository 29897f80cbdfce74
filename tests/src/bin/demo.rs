//! `cargo xtask demo`: a local node with two meshed pods in namespace `genesis`; service-a
//! calls service-b through both sidecars over mutual TLS, and the demo shows what service-b
//! saw, then tears everything down (also on Ctrl-C).

use std::sync::{Arc, Mutex};

use anyhow::Context;
use weft_tests::localnode::{LocalNode, fixtures};
use weft_tests::sample::{GrpcReport, HttpReport, TcpReport};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let node = Arc::new(Mutex::new(Some(
        LocalNode::start().context("start the local node")?,
    )));
    teardown_on_signal(node.clone());
    let result = run(&node);
    // Drop tears the node down: namespaces, cgroups, processes, files.
    drop(node.lock().unwrap_or_else(|p| p.into_inner()).take());
    println!("\nlocal node removed.");
    result
}

fn teardown_on_signal(node: Arc<Mutex<Option<LocalNode>>>) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let Ok(rt) = rt else { return };
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        eprintln!("\ninterrupted: tearing the local node down");
        drop(node.lock().unwrap_or_else(|p| p.into_inner()).take());
        std::process::exit(130);
    });
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn run(node: &Mutex<Option<LocalNode>>) -> anyhow::Result<()> {
    let guard = node.lock().unwrap_or_else(|p| p.into_inner());
    let node = guard.as_ref().context("node gone")?;
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
    step("pods with the weft-init step and the weft-proxy sidecar");
    let b = node.run_pod(fixtures::meshed(fixtures::app_pod(
        "genesis",
        "service-b",
        "service-b",
        "service-b",
        &["--http", "8080", "--http", "9090", "--tcp-echo", "9000"],
    )))?;
    let a = node.run_pod(fixtures::meshed(fixtures::app_pod(
        "genesis",
        "service-a",
        "service-a",
        "service-a",
        &["--http", "8080"],
    )))?;
    println!("    service-a  {}  (sa service-a)", a.ip);
    println!("    service-b  {}  (sa service-b)", b.ip);

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

    step("service-b's sidecar metrics (from :15090/stats/prometheus)");
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
