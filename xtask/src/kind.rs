//! `cargo xtask kind-e2e`: the end-to-end scenarios on a kind cluster, for machines with
//! Docker and kind. Builds the images, loads them into the cluster, installs the CRDs and the
//! control plane, labels a namespace, deploys the sample services and checks that the webhook
//! injected them and that their traffic is mutual TLS with identities; then runs the
//! webhook's cluster tests. The cluster is deleted at the end unless `--keep` is given.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail, ensure};

use crate::{cargo, run};

const CLUSTER: &str = "weft-e2e";
const IMAGES: [(&str, &str); 4] = [
    ("proxy", "weft-proxy"),
    ("redirector", "weft-redirector"),
    ("webhook", "weft-webhook"),
    ("sample-app", "sample-app"),
];

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the scenario.
pub fn e2e(root: &Path, keep: bool) -> anyhow::Result<()> {
    for tool in ["docker", "kind", "kubectl"] {
        ensure!(
            Command::new(tool).arg("version").output().is_ok(),
            "kind-e2e needs {tool} on PATH (and a running Docker engine)"
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    if !output("kind", &["get", "clusters"])?
        .lines()
        .any(|l| l == CLUSTER)
    {
        run(
            root,
            "kind",
            &["create", "cluster", "--name", CLUSTER, "--wait", "180s"],
            &[],
        )?;
    }
    let result = scenario(root, version);
    if !keep {
        let _ = run(root, "kind", &["delete", "cluster", "--name", CLUSTER], &[]);
    }
    result
}

fn scenario(root: &Path, version: &str) -> anyhow::Result<()> {
    let context = format!("kind-{CLUSTER}");
    let kubectl = |args: &[&str]| -> anyhow::Result<String> {
        let mut all = vec!["--context", context.as_str()];
        all.extend_from_slice(args);
        output("kubectl", &all)
    };
    for (target, name) in IMAGES {
        let tag = format!("ghcr.io/weft-mesh/{name}:{version}");
        run(
            root,
            "docker",
            &[
                "build",
                "-f",
                "deploy/images/Dockerfile",
                "--target",
                target,
                "-t",
                &tag,
                ".",
            ],
            &[],
        )?;
        run(
            root,
            "kind",
            &["load", "docker-image", &tag, "--name", CLUSTER],
            &[],
        )?;
    }
    kubectl(&[
        "apply",
        "-f",
        &root.join("deploy/crds").display().to_string(),
    ])?;
    kubectl(&[
        "apply",
        "-f",
        &root.join("deploy/weft.yaml").display().to_string(),
    ])?;
    kubectl(&[
        "-n",
        "weft-system",
        "rollout",
        "status",
        "deployment/weft-control-plane",
        "--timeout=180s",
    ])?;

    let scenario =
        std::fs::read_to_string(root.join("tests/kind/genesis.yaml"))?.replace("VERSION", version);
    let file = std::env::temp_dir().join("weft-kind-genesis.yaml");
    std::fs::write(&file, scenario)?;
    kubectl(&["apply", "-f", &file.display().to_string()])?;
    for d in ["service-a", "service-b"] {
        kubectl(&[
            "-n",
            "genesis",
            "rollout",
            "status",
            &format!("deployment/{d}"),
            "--timeout=180s",
        ])?;
    }
    kubectl(&[
        "-n",
        "outside",
        "wait",
        "--for=condition=Ready",
        "pod/no-sidecar",
        "--timeout=120s",
    ])?;

    // The webhook injected every genesis pod, none in `outside`.
    let inits = kubectl(&[
        "-n",
        "genesis",
        "get",
        "pods",
        "-o",
        "jsonpath={.items[*].spec.initContainers[*].name}",
    ])?;
    ensure!(
        inits.matches("weft-proxy").count() >= 3,
        "pods not injected: {inits}"
    );
    let outside = kubectl(&[
        "-n",
        "outside",
        "get",
        "pod",
        "no-sidecar",
        "-o",
        "jsonpath={.spec.initContainers}",
    ])?;
    ensure!(
        outside.trim().is_empty(),
        "a pod outside the labelled namespace was injected: {outside}"
    );

    // service-a calls service-b: mutual TLS, B sees A's identity.
    let report = kubectl(&[
        "-n",
        "genesis",
        "exec",
        "deploy/service-a",
        "-c",
        "app",
        "--",
        "weft-sample-app",
        "http",
        "http://service-b:8080/",
        "--count",
        "20",
    ])?;
    ensure!(
        report.contains("\"ok\":20"),
        "service-a → service-b failed: {report}"
    );
    ensure!(
        report.contains("URI=spiffe://cluster.local/ns/genesis/sa/service-a"),
        "service-b did not see service-a's identity: {report}"
    );
    let grpc = kubectl(&[
        "-n",
        "genesis",
        "exec",
        "deploy/service-a",
        "-c",
        "app",
        "--",
        "weft-sample-app",
        "grpc",
        "http://service-b:9090",
    ])?;
    ensure!(
        grpc.contains("\"unary_message\":\"hello\""),
        "gRPC failed: {grpc}"
    );

    // STRICT: a pod without a sidecar is refused, mesh traffic still flows.
    let strict = std::env::temp_dir().join("weft-kind-strict.yaml");
    std::fs::write(
        &strict,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: genesis}\nspec: {mtls: {mode: STRICT}}\n",
    )?;
    kubectl(&["apply", "-f", &strict.display().to_string()])?;
    std::thread::sleep(std::time::Duration::from_secs(5));
    let ip = kubectl(&[
        "-n",
        "genesis",
        "get",
        "pods",
        "-l",
        "app=service-b",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ])?;
    let plain = kubectl(&[
        "-n",
        "outside",
        "exec",
        "no-sidecar",
        "--",
        "weft-sample-app",
        "http",
        &format!("http://{}:8080/", ip.trim()),
        "--timeout",
        "5s",
    ])?;
    ensure!(
        plain.contains("\"ok\":0"),
        "STRICT let plaintext through: {plain}"
    );
    let report = kubectl(&[
        "-n",
        "genesis",
        "exec",
        "deploy/service-a",
        "-c",
        "app",
        "--",
        "weft-sample-app",
        "http",
        "http://service-b:8080/",
    ])?;
    ensure!(
        report.contains("\"ok\":1"),
        "mesh traffic under STRICT failed: {report}"
    );

    run(
        root,
        &cargo(),
        &[
            "test",
            "-p",
            "weft-webhook",
            "--features",
            "kind",
            "--test",
            "cluster",
        ],
        &[],
    )?;
    println!("kind-e2e: all scenarios passed");
    Ok(())
}
