//! Injection of a typical pod (an app container with ports, probes, env, a volume, some labels
//! and annotations, plus a logging sidecar): the pure core and the whole AdmissionReview round
//! (JSON in, JSON with the base64 patch out). Besides criterion's mean, each call is timed and
//! p50 / p99 / max printed, since the goal is a p99 under 1 ms.
//!
//! Under `cargo bench` the summary (p50 / p99 per scenario in µs, and whether p99 < 1 ms) is also
//! written as `inject.md` and `inject.json` to `$WEFT_BENCH_DIR`, else `<target dir>/bench/`.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use weft_webhook::admission::{review_inject, to_json};
use weft_webhook::{InjectContext, MeshConfig, Outcome, inject};

const TYPICAL_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  generateName: reviews-v1-5b7f9c8d4-
  namespace: bookinfo
  labels:
    app: reviews
    version: v1
    pod-template-hash: 5b7f9c8d4
  annotations:
    traffic.sidecar.istio.io/excludeOutboundPorts: "5432"
    proxy.istio.io/config: |
      terminationDrainDuration: 10s
spec:
  serviceAccountName: bookinfo-reviews
  volumes:
    - name: tmp
      emptyDir: {}
  containers:
    - name: reviews
      image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.2
      imagePullPolicy: IfNotPresent
      ports:
        - name: http
          containerPort: 9080
        - name: metrics
          containerPort: 9090
      env:
        - name: LOG_DIR
          value: /tmp/logs
      resources:
        requests: {cpu: 100m, memory: 256Mi}
        limits: {memory: 512Mi}
      livenessProbe:
        httpGet: {path: /health, port: http}
        periodSeconds: 10
      readinessProbe:
        httpGet: {path: /ready, port: 9080}
      startupProbe:
        tcpSocket: {port: http}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
    - name: log-shipper
      image: docker.io/fluent/fluent-bit:3.0
      readinessProbe:
        exec: {command: [cat, /tmp/ready]}
"#;

fn timed<F: FnMut()>(hist: &Mutex<Histogram<u64>>, mut f: F) -> impl FnMut(u64) -> Duration {
    move |iters| {
        let mut total = Duration::ZERO;
        let mut h = hist.lock().expect("histogram lock");
        for _ in 0..iters {
            let start = Instant::now();
            f();
            let elapsed = start.elapsed();
            total += elapsed;
            let _ = h.record(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
        }
        total
    }
}

/// The goal: p99 of one injection under 1 ms.
const TARGET_P99_US: f64 = 1000.0;

/// One scenario's figures, in microseconds.
struct Summary {
    name: &'static str,
    calls: u64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn summarize(name: &'static str, hist: &Mutex<Histogram<u64>>) -> Summary {
    let h = hist.lock().expect("histogram lock");
    let us = |ns: u64| ns as f64 / 1000.0;
    let s = Summary {
        name,
        calls: h.len(),
        p50: us(h.value_at_quantile(0.5)),
        p90: us(h.value_at_quantile(0.9)),
        p99: us(h.value_at_quantile(0.99)),
        max: us(h.max()),
    };
    println!(
        "{name}: {} calls, p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        s.calls, s.p50, s.p90, s.p99, s.max
    );
    s
}

/// `$WEFT_BENCH_DIR`, else `bench/` in the target directory this benchmark was built in
/// (`<target>/<profile>/deps/inject-…`).
fn out_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WEFT_BENCH_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.parent()?.to_path_buf())
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("bench")
}

fn write_summary(summaries: &[Summary]) {
    let mut md = String::from(
        "# Injection benchmark\n\n\
         Each call timed separately (criterion's sampling, hdrhistogram); target: p99 under 1 ms.\n\n\
         | scenario | calls | p50 (µs) | p90 (µs) | p99 (µs) | max (µs) | p99 < 1 ms |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut scenarios = Vec::new();
    for s in summaries {
        let ok = s.p99 < TARGET_P99_US;
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
            s.name,
            s.calls,
            s.p50,
            s.p90,
            s.p99,
            s.max,
            if ok { "yes" } else { "no" }
        ));
        scenarios.push(json!({
            "name": s.name,
            "calls": s.calls,
            "p50_us": s.p50,
            "p90_us": s.p90,
            "p99_us": s.p99,
            "max_us": s.max,
            "p99_under_1ms": ok,
        }));
    }
    let summary = json!({
        "benchmark": "inject",
        "target_p99_us": TARGET_P99_US,
        "scenarios": scenarios,
    });
    let dir = out_dir();
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    for (file, text) in [
        ("inject.md", md),
        (
            "inject.json",
            serde_json::to_string_pretty(&summary).expect("summary json"),
        ),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        println!("wrote {}", path.display());
    }
}

fn bench(c: &mut Criterion) {
    let pod: Pod = serde_yaml_ng::from_str(TYPICAL_POD).expect("typical pod parses");
    let mesh = MeshConfig::default();
    let ctx = InjectContext::default();
    assert!(matches!(
        inject(&pod, &mesh, &ctx).expect("injects"),
        Outcome::Injected(_)
    ));
    let review = serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "bookinfo",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": serde_json::to_value(&pod).expect("pod json"),
            "oldObject": null,
            "dryRun": false
        }
    }))
    .expect("review json");

    let core = Mutex::new(Histogram::<u64>::new(3).expect("histogram"));
    let full = Mutex::new(Histogram::<u64>::new(3).expect("histogram"));
    let mut group = c.benchmark_group("inject");
    group.bench_function("typical_pod", |b| {
        b.iter_custom(timed(&core, || {
            black_box(inject(black_box(&pod), &mesh, &ctx).expect("injects"));
        }))
    });
    group.bench_function("admission_review_json", |b| {
        b.iter_custom(timed(&full, || {
            let answer = review_inject(black_box(&review), &mesh, None).expect("review");
            black_box(to_json(&answer).expect("json"));
        }))
    });
    group.finish();
    let summaries = [
        summarize("inject/typical_pod", &core),
        summarize("inject/admission_review_json", &full),
    ];
    // `cargo test --benches` runs each benchmark once as a test: no figures worth keeping.
    if std::env::args().any(|a| a == "--bench") {
        write_summary(&summaries);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
