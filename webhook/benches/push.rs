//! Push benchmark: how long a config change takes to reach every proxy.
//!
//! The real `weft-webhook serve` runs in local mode as a child process (so its CPU time and
//! peak memory are its own, read from `/proc/<pid>`), with 1,000 Services and 10,000 meshed
//! pods (10 endpoints each) in its config directory. This process gets 200 workload
//! certificates from its CA (real token, CSR, TLS) and opens 200 config streams over mutual
//! TLS and HTTP/2, one connection each, acking every snapshot as soon as it is read. Then,
//! alternately, a VirtualService and a Service change on disk (atomic rename); the latency
//! of one change is from the rename to the last of the 200 acks (it includes the control
//! plane's 50 ms directory poll and 100 ms debounce). Repeated 100 times: p50 / p99.
//!
//! Writes `push.md` and `push.json` to `$WEFT_BENCH_DIR` (default `target/bench/`) and prints
//! the table.
//! `WEFT_PUSH_BENCH_PROXIES`, `…_SERVICES`, `…_ENDPOINTS`, `…_CHANGES` override the sizes.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use weft_api::discovery::Node;
use weft_webhook::testing::{ProxyStream, TokenSigner, client_tls, issue};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn services_yaml(services: usize, changed_port: u16) -> String {
    let mut out = String::new();
    for i in 0..services {
        let port = if i == services - 1 {
            changed_port
        } else {
            8080
        };
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: 10.96.{}.{}\n  selector: {{app: svc-{i}}}\n  ports: [{{name: http, port: {port}, targetPort: 8080}}]\n",
            i / 250,
            i % 250 + 1
        );
    }
    out
}

fn pods_yaml(from: usize, to: usize, per_service: usize) -> String {
    let mut out = String::new();
    for n in from..to {
        let svc = n / per_service;
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: svc-{svc}-{}\n  namespace: bench\n  labels: {{app: svc-{svc}, version: v1}}\n  annotations: {{sidecar.istio.io/status: '{{}}'}}\nspec:\n  serviceAccountName: svc-{svc}\n  containers: [{{name: app, image: x, ports: [{{containerPort: 8080}}]}}]\nstatus: {{podIP: 10.{}.{}.{}}}\n",
            n % per_service,
            100 + n / 65_000,
            (n / 250) % 256,
            n % 250 + 1
        );
    }
    out
}

fn vs_yaml(timeout_secs: usize) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc-0, namespace: bench}}\nspec:\n  hosts: [svc-0]\n  http:\n  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]\n    route: [{{destination: {{host: svc-1}}}}]\n  - route: [{{destination: {{host: svc-0}}}}]\n    timeout: {timeout_secs}s\n"
    )
}

/// `(cpu seconds, VmHWM MiB, VmRSS MiB)` of a process.
fn usage(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    let hz: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (ticks / hz, kib("VmHWM:"), kib("VmRSS:"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn main() {
    // `cargo bench` passes `--bench`; other arguments (filters) do not apply here.
    let proxies = env_usize("WEFT_PUSH_BENCH_PROXIES", 200);
    let services = env_usize("WEFT_PUSH_BENCH_SERVICES", 1000);
    let endpoints = env_usize("WEFT_PUSH_BENCH_ENDPOINTS", 10_000);
    let changes = env_usize("WEFT_PUSH_BENCH_CHANGES", 100);
    let per_service = (endpoints / services).max(1);
    assert!(proxies <= services, "one proxy per service at most");

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    write_atomic(
        &config.join("services.yaml"),
        &services_yaml(services, 8080),
    );
    let files = 10;
    let total = services * per_service;
    for f in 0..files {
        let (from, to) = (total * f / files, total * (f + 1) / files);
        write_atomic(
            &config.join(format!("pods-{f}.yaml")),
            &pods_yaml(from, to, per_service),
        );
    }
    write_atomic(&config.join("vs.yaml"), &vs_yaml(1));
    let signer = TokenSigner::new();
    let key_file = dir.path().join("token-key.pub");
    std::fs::write(&key_file, signer.public_key_pem()).expect("key");
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, "").expect("mesh");

    let cp_port = free_port();
    let webhook_port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_weft-webhook"))
        .args(["serve", "--kubernetes", "false", "--listen"])
        .arg(format!("127.0.0.1:{webhook_port}"))
        .arg("--local-dir")
        .arg(&config)
        .arg("--ca-dir")
        .arg(dir.path().join("ca"))
        .arg("--token-public-key")
        .arg(&key_file)
        .arg("--control-plane-listen")
        .arg(format!("127.0.0.1:{cp_port}"))
        .args(["--serving-ip", "127.0.0.1", "--mesh-config"])
        .arg(&mesh)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn weft-webhook");
    let pid = child.id();
    let _child = Kill(child);
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", cp_port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "control plane did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let load_secs = started.elapsed().as_secs_f64();
    let roots = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).expect("root");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{cp_port}").parse().expect("addr");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime.block_on(async move {
        let (acks_tx, mut acks_rx) = mpsc::unbounded_channel::<(usize, u64, Instant)>();
        for i in 0..proxies {
            let sa = format!("svc-{i}");
            let (cert, key) = issue(addr, &roots, &signer, "bench", &sa).await;
            let tls = client_tls(
                &roots,
                Some((&cert.cert_chain.concat(), &key.serialize_pem())),
            );
            let node = Node {
                name: format!("svc-{i}-0"),
                namespace: "bench".into(),
                ip: None,
                proxy_version: "bench".into(),
            };
            let mut stream = ProxyStream::open(addr, tls, node).await;
            assert_eq!(stream.status, 200, "{:?}", stream.error_body);
            let tx = acks_tx.clone();
            tokio::spawn(async move {
                while let Some(version) = stream.next_version().await {
                    stream.ack(&version).await;
                    let v = version.parse().unwrap_or(0);
                    if tx.send((i, v, Instant::now())).is_err() {
                        return;
                    }
                }
            });
        }
        // Everyone has its first snapshot.
        let mut seen = HashSet::new();
        while seen.len() < proxies {
            let (i, _, _) = tokio::time::timeout(Duration::from_secs(120), acks_rx.recv())
                .await
                .expect("initial snapshots")
                .expect("channel");
            seen.insert(i);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        while acks_rx.try_recv().is_ok() {}
        let (cpu_before, _, _) = usage(pid);
        let mut latencies = Vec::new();
        for n in 0..changes {
            let kind = if n % 2 == 0 {
                "VirtualService"
            } else {
                "Service"
            };
            let t0 = Instant::now();
            if n % 2 == 0 {
                write_atomic(&config.join("vs.yaml"), &vs_yaml(n + 2));
            } else {
                let port = if n % 4 == 1 { 8081 } else { 8080 };
                write_atomic(
                    &config.join("services.yaml"),
                    &services_yaml(services, port),
                );
            }
            let mut got = HashSet::new();
            let mut last = t0;
            while got.len() < proxies {
                match tokio::time::timeout(Duration::from_secs(30), acks_rx.recv()).await {
                    Ok(Some((i, _, at))) => {
                        if got.insert(i) {
                            last = at;
                        }
                    }
                    _ => panic!(
                        "change {n} ({kind}): only {} of {proxies} proxies acked",
                        got.len()
                    ),
                }
            }
            let ms = (last - t0).as_secs_f64() * 1000.0;
            eprintln!("change {n:2} {kind:<14} last ack after {ms:7.1} ms");
            latencies.push(ms);
            tokio::time::sleep(Duration::from_millis(300)).await;
            while acks_rx.try_recv().is_ok() {}
        }
        let (cpu_after, hwm, rss) = usage(pid);
        (latencies, cpu_after - cpu_before, hwm, rss)
    });
    let (mut latencies, cpu, hwm, rss) = report;
    latencies.sort_by(f64::total_cmp);
    let p50 = percentile(&latencies, 50.0);
    let p99 = percentile(&latencies, 99.0);
    let max = latencies.last().copied().unwrap_or(f64::NAN);
    let cpu_per_push = cpu / changes as f64;
    let hwm_mb = hwm * 1.048_576;
    let table = format!(
        "# Control-plane push benchmark\n\n\
         {services} services, {} endpoints, {proxies} proxies on mTLS HTTP/2 streams, {changes} changes \
         (VirtualService and Service alternately); latency = file rename → last proxy's ack.\n\n\
         | metric | value | target |\n|---|---|---|\n\
         | push latency p50 | {p50:.1} ms | |\n\
         | push latency p99 | {p99:.1} ms | < 1000 ms |\n\
         | push latency max | {max:.1} ms | |\n\
         | control-plane CPU during the changes | {cpu:.2} s ({cpu_per_push:.3} s per change) | |\n\
         | control-plane peak memory (VmHWM) | {hwm:.1} MiB = {hwm_mb:.1} MB | < 200 MB |\n\
         | control-plane memory after (VmRSS) | {rss:.1} MiB | |\n\
         | initial load (start → listening) | {load_secs:.2} s | |\n\n\
         Method: `weft-webhook serve` in local mode is a child process (its own CPU and memory, from \
         /proc/<pid>/stat and /proc/<pid>/status); the simulated proxies are tasks of the benchmark \
         process, each with its own TLS connection and a certificate from the control plane's CA. \
         The latency includes the 50 ms directory poll and the 100 ms debounce. Both processes share \
         the machine's cores.\n",
        services * per_service,
    );
    println!("{table}");
    let out = std::env::var_os("WEFT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("bench"));
    std::fs::create_dir_all(&out).expect("bench dir");
    std::fs::write(out.join("push.md"), &table).expect("push.md");
    let json = serde_json::json!({
        "services": services,
        "endpoints": services * per_service,
        "proxies": proxies,
        "changes": changes,
        "latency_ms": {"p50": p50, "p99": p99, "max": max, "samples": latencies},
        "cpu_seconds": cpu,
        "peak_memory_mib": hwm,
        "peak_memory_mb": hwm_mb,
        "rss_after_mib": rss,
        "load_seconds": load_secs,
        "targets": {"p99_ms": 1000, "memory_mb": 200},
    });
    std::fs::write(
        out.join("push.json"),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("push.json");
}
