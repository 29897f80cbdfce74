//! `cargo xtask bench`: Weft's benchmarks on a local node, each comparing modes in the same
//! run so that ratios hold on a noisy machine. Results go to `target/bench/` as a markdown
//! table and JSON.
//!
//! `dataplane`: fixed-rate HTTP/1.1 load (1000 rps, 16 connections, 1 KiB responses) from a
//! client pod to a server pod, direct, through the two Weft sidecars (mutual TLS), and through
//! an HAProxy pair doing the same mTLS hop; latency percentiles measured from each request's
//! scheduled start (no coordinated omission), and each proxy's CPU seconds and peak RSS.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;
use weft_tests::localnode::{
    self, Interception, LocalNode, NodeOptions, PodRef, ProcUsage, fixtures, proc_usage,
};
use weft_tests::sample::LoadReport;

#[derive(Debug, Clone, Serialize)]
struct ProxyUsage {
    name: String,
    cpu_seconds: f64,
    peak_rss_mb: f64,
}

#[derive(Debug, Clone, Serialize)]
struct ModeResult {
    mode: String,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    rps: f64,
    ok: u64,
    failed: u64,
    proxies: Vec<ProxyUsage>,
}

#[derive(Debug, Serialize)]
struct DataplaneReport {
    rps: u64,
    connections: u64,
    seconds: u64,
    /// Rounds the seconds were split into (see [`rounds`]).
    rounds: u64,
    /// The eBPF agents' `--short-circuit` (sk_msg between app and proxy sockets).
    short_circuit: String,
    response_bytes: usize,
    modes: Vec<ModeResult>,
    /// p50 added over direct, microseconds, per mode.
    added_p50_us: Vec<(String, i64)>,
    /// p99 added over direct, microseconds, per mode.
    added_p99_us: Vec<(String, i64)>,
}

const RPS: u64 = 1000;
const CONNS: u64 = 16;
const BYTES: usize = 1024;
/// Rules of the routing scenario's VirtualService (the matching one last).
const ROUTING_RULES: usize = 50;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let out = out_dir()?;
    std::fs::create_dir_all(&out)?;
    let seconds: u64 = std::env::var("WEFT_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let which: Vec<String> = std::env::args().skip(1).collect();
    let wants = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if wants("dataplane") {
        let rounds: u64 = std::env::var("WEFT_BENCH_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(6);
        let report = dataplane(seconds, rounds)?;
        write_dataplane(&out, &report)?;
    }
    Ok(())
}

fn out_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("WEFT_BENCH_DIR") {
        return Ok(PathBuf::from(d));
    }
    // target/<profile>/weft-bench -> target/bench
    let bins = weft_tests::binaries::dir()?;
    Ok(bins.parent().context("no target dir")?.join("bench"))
}

fn usage(node: &LocalNode, pod: &PodRef, container: &str) -> anyhow::Result<ProcUsage> {
    proc_usage(node.container_pid(pod, container)?)
}

fn load(node: &LocalNode, from: &PodRef, url: &str, seconds: u64) -> anyhow::Result<LoadReport> {
    let rps = RPS.to_string();
    let conns = CONNS.to_string();
    let duration = format!("{seconds}s");
    node.exec_json(
        from,
        &[
            "weft-sample-app",
            "load",
            url,
            "--rps",
            &rps,
            "--duration",
            &duration,
            "--conns",
            &conns,
        ],
    )
}

/// One mode of the data-plane scenario: the client pod, the URL it loads, and the proxies
/// (label, pod, container) whose CPU and memory count.
struct Mode<'a> {
    name: &'static str,
    from: &'a PodRef,
    url: String,
    proxies: Vec<(&'static str, &'a PodRef, &'static str)>,
}

/// Runs every mode `rounds` times, `seconds / rounds` each, in an order rotated each round,
/// so that a slow spell of a shared machine, or whichever mode happens to run first, does not
/// decide a comparison. A mode's percentiles are the medians of its rounds' percentiles; its
/// CPU seconds add up over the rounds and its peak RSS is the largest seen.
fn rounds(
    node: &LocalNode,
    modes: &[Mode<'_>],
    seconds: u64,
    rounds: u64,
) -> anyhow::Result<Vec<ModeResult>> {
    let rounds = rounds.max(1);
    let each = (seconds / rounds).max(1);
    for m in modes {
        println!("  {}: warm-up", m.name);
        load(node, m.from, &m.url, 2)?;
    }
    let mut runs: Vec<Vec<ModeResult>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds as usize {
        println!("  round {} of {rounds}", round + 1);
        for i in (0..modes.len()).map(|i| (i + round) % modes.len()) {
            runs[i].push(measured(node, &modes[i], each)?);
        }
    }
    Ok(runs.into_iter().map(combine).collect())
}

/// One result out of a mode's rounds (see [`rounds`]).
fn combine(runs: Vec<ModeResult>) -> ModeResult {
    fn median(mut v: Vec<u64>) -> u64 {
        v.sort_unstable();
        v[v.len() / 2]
    }
    let first = &runs[0];
    let proxies = first
        .proxies
        .iter()
        .enumerate()
        .map(|(i, p)| ProxyUsage {
            name: p.name.clone(),
            cpu_seconds: runs.iter().map(|r| r.proxies[i].cpu_seconds).sum(),
            peak_rss_mb: runs
                .iter()
                .map(|r| r.proxies[i].peak_rss_mb)
                .fold(0.0, f64::max),
        })
        .collect();
    ModeResult {
        mode: first.mode.clone(),
        p50_us: median(runs.iter().map(|r| r.p50_us).collect()),
        p90_us: median(runs.iter().map(|r| r.p90_us).collect()),
        p99_us: median(runs.iter().map(|r| r.p99_us).collect()),
        rps: runs.iter().map(|r| r.rps).sum::<f64>() / runs.len() as f64,
        ok: runs.iter().map(|r| r.ok).sum(),
        failed: runs.iter().map(|r| r.failed).sum(),
        proxies,
    }
}

/// One measurement of `mode` for `seconds`.
fn measured(node: &LocalNode, mode: &Mode<'_>, seconds: u64) -> anyhow::Result<ModeResult> {
    let Mode {
        name: mode,
        from,
        url,
        proxies,
    } = mode;
    let before: Vec<ProcUsage> = proxies
        .iter()
        .map(|(_, p, c)| usage(node, p, c))
        .collect::<Result<_, _>>()?;
    println!("  {mode}: {RPS} rps for {seconds}s over {CONNS} connections");
    let r = load(node, from, url, seconds)?;
    let mut usages = Vec::new();
    for ((name, p, c), b) in proxies.iter().zip(before) {
        let a = usage(node, p, c)?;
        usages.push(ProxyUsage {
            name: (*name).to_owned(),
            cpu_seconds: a.cpu_seconds - b.cpu_seconds,
            peak_rss_mb: a.peak_rss_bytes as f64 / 1_048_576.0,
        });
    }
    println!(
        "  {mode}: p50 {} µs, p90 {} µs, p99 {} µs, {:.0} rps, {} failed",
        r.p50_us, r.p90_us, r.p99_us, r.rps, r.failed
    );
    Ok(ModeResult {
        mode: (*mode).to_owned(),
        p50_us: r.p50_us,
        p90_us: r.p90_us,
        p99_us: r.p99_us,
        rps: r.rps,
        ok: r.ok,
        failed: r.failed,
        proxies: usages,
    })
}

fn haproxy_pod(
    pod: k8s_openapi::api::core::v1::Pod,
    cfg: &Path,
) -> k8s_openapi::api::core::v1::Pod {
    let mut pod = pod;
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.containers.push(k8s_openapi::api::core::v1::Container {
        name: "haproxy".into(),
        command: Some(vec!["/usr/sbin/haproxy".into()]),
        args: Some(vec!["-db".into(), "-f".into(), cfg.display().to_string()]),
        ..Default::default()
    });
    pod
}

/// The VirtualService of the routing scenario: `rules` HTTP routes on `host`, only the last
/// of which matches the benchmark's requests (`/bytes/…`); the others match on a header and
/// a path the load never sends, so each request is checked against all of them.
fn routing_rules(host: &str, rules: usize) -> String {
    let mut yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}, namespace: bench}}\nspec:\n  hosts: [{host}]\n  http:\n"
    );
    for i in 1..rules {
        yaml.push_str(&format!(
            "  - match: [{{uri: {{prefix: /never-{i}/}}, headers: {{x-bench-rule: {{exact: \"{i}\"}}}}}}]\n    route: [{{destination: {{host: {host}}}}}]\n"
        ));
    }
    yaml.push_str(&format!(
        "  - match: [{{uri: {{prefix: /bytes/}}}}]\n    route: [{{destination: {{host: {host}}}}}]\n"
    ));
    yaml
}

fn dataplane(seconds: u64, rounds_wanted: u64) -> anyhow::Result<DataplaneReport> {
    let rounds = rounds_wanted.clamp(1, seconds.max(1));
    println!(
        "dataplane: direct vs Weft sidecars (iptables and eBPF redirection, 1 and 50 routing rules) vs HAProxy mTLS pair"
    );
    let mut proxy_env = vec![("WEFT_LOG_LEVEL".to_string(), "warn".to_string())];
    if let Ok(c) = std::env::var("WEFT_BENCH_PROXY_CONCURRENCY") {
        proxy_env.push(("WEFT_CONCURRENCY".into(), c));
    }
    // An eBPF node: pods annotated `sidecar.istio.io/interceptionMode: REDIRECT` keep
    // iptables rules of their own, the others are redirected by the node agent, so both
    // redirect modes are measured on the same node in the same run.
    // `WEFT_BENCH_SHORT_CIRCUIT=both` measures the agents' opt-in sk_msg both ways.
    let short_circuit =
        std::env::var("WEFT_BENCH_SHORT_CIRCUIT").unwrap_or_else(|_| "to-proxy".into());
    let agent_args = vec![format!("--short-circuit={short_circuit}")];
    let node = Arc::new(LocalNode::start_with(NodeOptions {
        proxy_env,
        agent_args,
        interception: Interception::Ebpf,
        nodes: 1,
        ..Default::default()
    })?);
    localnode::teardown_on_signal(node.clone())?;
    let modes = measure_dataplane(&node, seconds, rounds);
    // Whatever happened, the node goes: the signal thread holds it too, so dropping ours
    // would not tear it down.
    localnode::wait_if_interrupted();
    node.teardown();
    let modes = modes?;
    let direct = modes[0].clone();
    let added = |f: fn(&ModeResult) -> u64| -> Vec<(String, i64)> {
        modes[1..]
            .iter()
            .map(|m| (m.mode.clone(), f(m) as i64 - f(&direct) as i64))
            .collect()
    };
    Ok(DataplaneReport {
        rps: RPS,
        connections: CONNS,
        seconds,
        rounds,
        short_circuit,
        response_bytes: BYTES,
        added_p50_us: added(|m| m.p50_us),
        added_p99_us: added(|m| m.p99_us),
        modes,
    })
}

/// The pods, services and routes of the data-plane scenario on `node`, then every mode
/// measured ([`rounds`]); `direct` first.
fn measure_dataplane(
    node: &LocalNode,
    seconds: u64,
    rounds_count: u64,
) -> anyhow::Result<Vec<ModeResult>> {
    let dir = node.dir().join("bench");
    std::fs::create_dir_all(&dir)?;

    // The reference pair: HAProxy terminating and originating mTLS, as in tools/netbench.sh.
    let (ca, (cc, ck), (sc, sk)) = (
        node.reference_ca_pem().to_owned(),
        node.issue_cert("bench-client", "spiffe://cluster.local/ns/bench/sa/client")?,
        node.issue_cert("bench-server", "spiffe://cluster.local/ns/bench/sa/server")?,
    );
    std::fs::write(dir.join("ca.pem"), ca)?;
    std::fs::write(dir.join("client.bundle"), format!("{cc}{ck}"))?;
    std::fs::write(dir.join("server.bundle"), format!("{sc}{sk}"))?;

    for name in ["bench-ipt", "bench-ebpf"] {
        node.create_service(fixtures::service("bench", name, &[(8080, "http")]))?;
    }
    // A second Service over the iptables server pods, for the 50-rule VirtualService.
    let mut routed = fixtures::service("bench", "bench-routed", &[(8080, "http")]);
    if let Some(spec) = routed.spec.as_mut() {
        spec.selector = Some([("app".to_string(), "bench-ipt".to_string())].into());
    }
    node.create_service(routed)?;
    node.apply_yaml(&format!(
        "{}---\n{}",
        routing_rules("bench-ipt", 1),
        routing_rules("bench-routed", ROUTING_RULES)
    ))?;

    // Server pod addresses are allocated in order: the plain server is created first.
    let plain_server_ip = "10.44.0.2";
    let hs = dir.join("server.cfg");
    std::fs::write(
        &hs,
        format!(
            "global\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend in\n  bind {plain_server_ip}:15443 ssl crt {d}/server.bundle ca-file {d}/ca.pem verify required\n  default_backend app\n\
             backend app\n  http-reuse always\n  server app 127.0.0.1:8080\n",
            d = dir.display()
        ),
    )?;
    let hc = dir.join("client.cfg");
    std::fs::write(
        &hc,
        format!(
            "global\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend out\n  bind 127.0.0.1:15001\n  default_backend b\n\
             backend b\n  http-reuse always\n  server s {plain_server_ip}:15443 ssl crt {d}/client.bundle ca-file {d}/ca.pem verify required verifyhost bench-server\n",
            d = dir.display()
        ),
    )?;
    let plain_server = node.run_pod(haproxy_pod(
        fixtures::app_pod(
            "bench",
            "plain-server",
            "plain-server",
            "server",
            &["--http", "8080"],
        ),
        &hs,
    ))?;
    anyhow::ensure!(
        plain_server.ip.to_string() == plain_server_ip,
        "unexpected address {}",
        plain_server.ip
    );
    let plain_client = node.run_pod(haproxy_pod(
        fixtures::client_pod("bench", "plain-client", "client"),
        &hc,
    ))?;
    let iptables = |pod| with_interception(pod, "REDIRECT");
    let ipt_server = node.run_pod(iptables(fixtures::meshed(fixtures::app_pod(
        "bench",
        "ipt-server",
        "bench-ipt",
        "server",
        &["--http", "8080"],
    ))))?;
    let ipt_client = node.run_pod(iptables(fixtures::meshed(fixtures::client_pod(
        "bench",
        "ipt-client",
        "client",
    ))))?;
    let ebpf_server = node.run_pod(fixtures::meshed(fixtures::app_pod(
        "bench",
        "ebpf-server",
        "bench-ebpf",
        "server",
        &["--http", "8080"],
    )))?;
    let ebpf_client = node.run_pod(fixtures::meshed(fixtures::client_pod(
        "bench",
        "ebpf-client",
        "client",
    )))?;

    let path = format!("/bytes/{BYTES}");
    let sidecars = |client, server| {
        vec![
            ("client sidecar", client, "weft-proxy"),
            ("server sidecar", server, "weft-proxy"),
        ]
    };
    let plan = [
        Mode {
            name: "direct",
            from: &plain_client,
            url: format!("http://{}:8080{path}", plain_server.ip),
            proxies: vec![],
        },
        Mode {
            name: "weft-iptables",
            from: &ipt_client,
            url: format!("http://bench-ipt:8080{path}"),
            proxies: sidecars(&ipt_client, &ipt_server),
        },
        Mode {
            name: "weft-ebpf",
            from: &ebpf_client,
            url: format!("http://bench-ebpf:8080{path}"),
            proxies: sidecars(&ebpf_client, &ebpf_server),
        },
        Mode {
            name: "weft-iptables-50-rules",
            from: &ipt_client,
            url: format!("http://bench-routed:8080{path}"),
            proxies: sidecars(&ipt_client, &ipt_server),
        },
        Mode {
            name: "haproxy-mtls",
            from: &plain_client,
            url: format!("http://127.0.0.1:15001{path}"),
            proxies: vec![
                ("client haproxy", &plain_client, "haproxy"),
                ("server haproxy", &plain_server, "haproxy"),
            ],
        },
    ];
    rounds(node, &plan, seconds, rounds_count)
}

/// Sets the pod's `sidecar.istio.io/interceptionMode`.
fn with_interception(
    mut pod: k8s_openapi::api::core::v1::Pod,
    mode: &str,
) -> k8s_openapi::api::core::v1::Pod {
    pod.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("sidecar.istio.io/interceptionMode".into(), mode.into());
    pod
}

/// The issues' targets, each line saying what was measured against what was asked.
fn targets(r: &DataplaneReport) -> Vec<String> {
    let p50 = |mode: &str| {
        r.added_p50_us
            .iter()
            .find(|(m, _)| m == mode)
            .map(|(_, v)| *v)
    };
    let p99 = |mode: &str| {
        r.added_p99_us
            .iter()
            .find(|(m, _)| m == mode)
            .map(|(_, v)| *v)
    };
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut out = Vec::new();
    for m in &r.modes {
        let sent = m.ok + m.failed;
        if m.failed > 0 {
            out.push(format!(
                "{}: {} of {sent} requests failed; its latencies leave those out, so they flatter it",
                m.mode, m.failed
            ));
        }
    }
    if let (Some(weft), Some(haproxy)) = (p50("weft-iptables"), p50("haproxy-mtls"))
        && haproxy > 0
    {
        let pct = 100.0 * weft as f64 / haproxy as f64;
        out.push(format!(
            "the two sidecars add {weft} µs at p50, {pct:.0}% of the {haproxy} µs the HAProxy pair adds (target: at most 50%): {}",
            verdict(pct <= 50.0)
        ));
    }
    for m in r.modes.iter().filter(|m| m.mode.starts_with("weft")) {
        let peak = m.proxies.iter().map(|p| p.peak_rss_mb).fold(0.0, f64::max);
        out.push(format!(
            "{}: largest sidecar peak RSS {peak:.1} MB at {} rps (target: under 15 MB): {}",
            m.mode,
            r.rps,
            verdict(peak < 15.0)
        ));
    }
    for (what, f) in [("p50", &p50 as &dyn Fn(&str) -> Option<i64>), ("p99", &p99)] {
        if let (Some(ipt), Some(ebpf)) = (f("weft-iptables"), f("weft-ebpf"))
            && ipt > 0
        {
            let less = 100.0 * (ipt - ebpf) as f64 / ipt as f64;
            out.push(format!(
                "eBPF redirection adds {ebpf} µs at {what} against {ipt} µs for iptables: {less:.0}% less (target: at least 20% less): {}",
                verdict(less >= 20.0)
            ));
        }
        if let (Some(one), Some(fifty)) = (f("weft-iptables"), f("weft-iptables-50-rules")) {
            out.push(format!(
                "{ROUTING_RULES} routing rules (the matching one last) against 1: {:+} µs at {what} end to end (per-request matcher cost: see route.md)",
                fifty - one
            ));
        }
    }
    out
}

fn write_dataplane(out: &Path, r: &DataplaneReport) -> anyhow::Result<()> {
    let mut md = String::new();
    writeln!(
        md,
        "# Data plane: {} rps, {} connections, {} s, {} B responses\n\nEach mode ran {} rounds of {} s, the modes' order rotated each round; percentiles are the medians of the rounds', CPU seconds their sum. eBPF agents: `--short-circuit={}`.\n",
        r.rps,
        r.connections,
        r.seconds,
        r.response_bytes,
        r.rounds,
        (r.seconds / r.rounds).max(1),
        r.short_circuit
    )?;
    writeln!(
        md,
        "| mode | p50 µs | p90 µs | p99 µs | rps | failed | proxy CPU s (client / server) | peak RSS MB (client / server) |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---|---|")?;
    for m in &r.modes {
        let cpu: Vec<String> = m
            .proxies
            .iter()
            .map(|p| format!("{:.2}", p.cpu_seconds))
            .collect();
        let rss: Vec<String> = m
            .proxies
            .iter()
            .map(|p| format!("{:.1}", p.peak_rss_mb))
            .collect();
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} |",
            m.mode,
            m.p50_us,
            m.p90_us,
            m.p99_us,
            m.rps,
            m.failed,
            if cpu.is_empty() {
                "-".into()
            } else {
                cpu.join(" / ")
            },
            if rss.is_empty() {
                "-".into()
            } else {
                rss.join(" / ")
            },
        )?;
    }
    writeln!(md, "\nAdded over direct (µs):\n")?;
    writeln!(md, "| mode | p50 | p99 |")?;
    writeln!(md, "|---|---:|---:|")?;
    for ((mode, p50), (_, p99)) in r.added_p50_us.iter().zip(&r.added_p99_us) {
        writeln!(md, "| {mode} | {p50} | {p99} |")?;
    }
    writeln!(md, "\nTargets:\n")?;
    for line in targets(r) {
        writeln!(md, "- {line}")?;
    }
    std::fs::write(out.join("dataplane.md"), &md)?;
    std::fs::write(out.join("dataplane.json"), serde_json::to_string_pretty(r)?)?;
    println!("\n{md}");
    println!("written to {}", out.display());
    Ok(())
}
