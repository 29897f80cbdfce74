//! Routing cost per request: one route against fifty (the matching one last), as criterion
//! benchmarks, then a percentile table (mean, p50, p99 per match) measured per call.
//!
//! Run: `cargo bench -p weft-proxy --bench route`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use http::Request;
use http::request::Parts;
use weft_api::config::Snapshot;
use weft_proxy::route::RouteTable;
use weft_proxy::snapshot::Config;

/// A snapshot whose only service port has `n` routes; the last one matches the benchmark
/// request, each of the others differs in one condition (path, header, method or query).
fn config(n: usize) -> Config {
    let mut routes = String::new();
    for i in 0..n.saturating_sub(1) {
        let m = match i % 4 {
            0 => format!(
                "{{uri: {{prefix: /api/v{i}/}}, headers: [{{name: x-tenant, value: {{exact: t{i}}}}}]}}"
            ),
            1 => format!("{{uri: {{regex: '/users/[0-9]+/v{i}'}}, method: {{exact: POST}}}}"),
            2 => format!(
                "{{uri: {{exact: /api/items}}, headers: [{{name: x-version, value: {{prefix: 'v{i}.'}}}}]}}"
            ),
            _ => format!(
                "{{uri: {{prefix: /api/}}, queryParams: [{{name: variant, value: {{exact: b{i}}}}}]}}"
            ),
        };
        routes.push_str(&format!(
            "    - name: r{i}\n      matches: [{m}]\n      action: {{forward: {{destinations: [{{cluster: c}}]}}}}\n"
        ));
    }
    routes.push_str(
        "    - name: last\n      matches: [{uri: {prefix: /api/}, headers: [{name: x-tenant, value: {exact: acme}}], method: {exact: GET}}]\n      action: {forward: {destinations: [{cluster: c}]}}\n",
    );
    let yaml = format!(
        "services:\n- hostname: svc.ns.svc.cluster.local\n  vips: [10.96.0.1]\n  ports:\n  - port: 80\n    protocol: http\n    httpRoutes:\n{routes}clusters:\n- name: c\n  endpoints: [{{address: 10.44.0.1, port: 80}}]\n"
    );
    Config::compile(Snapshot::from_yaml(&yaml).expect("yaml")).expect("valid")
}

fn request() -> Parts {
    Request::builder()
        .uri("http://svc.ns.svc.cluster.local/api/items?variant=a&page=2")
        .header("x-tenant", "acme")
        .header("x-version", "v100.1")
        .header("user-agent", "bench")
        .header("accept", "application/json")
        .body(())
        .expect("request")
        .into_parts()
        .0
}

fn table(c: &Config) -> &RouteTable {
    let t = c
        .resolve("10.96.0.1:80".parse().expect("addr"))
        .expect("target");
    // The table lives as long as the config; leak the Arc clone to hand out a reference.
    let routes = t.routes.clone();
    Box::leak(Box::new(routes))
}

fn percentiles(name: &str, table: &RouteTable, parts: &Parts) {
    const BATCH: u32 = 16;
    const SAMPLES: usize = 50_000;
    let mut per_match: Vec<f64> = Vec::with_capacity(SAMPLES);
    for _ in 0..1000 {
        black_box(table.select(black_box(parts), 80));
    }
    for _ in 0..SAMPLES {
        let t = Instant::now();
        for _ in 0..BATCH {
            black_box(table.select(black_box(parts), 80));
        }
        per_match.push(t.elapsed().as_nanos() as f64 / f64::from(BATCH));
    }
    per_match.sort_by(f64::total_cmp);
    let mean = per_match.iter().sum::<f64>() / per_match.len() as f64;
    let at = |q: f64| per_match[((per_match.len() as f64 - 1.0) * q) as usize];
    println!(
        "{name:<12} mean {mean:>8.1} ns   p50 {:>8.1} ns   p99 {:>8.1} ns   p99.9 {:>8.1} ns  (per match, batches of {BATCH})",
        at(0.50),
        at(0.99),
        at(0.999)
    );
}

fn main() {
    let one = config(1);
    let fifty = config(50);
    let (t1, t50) = (table(&one), table(&fifty));
    let parts = request();
    assert_eq!(
        t1.select(&parts, 80).expect("match").route.name.as_ref(),
        "last"
    );
    assert_eq!(
        t50.select(&parts, 80).expect("match").route.name.as_ref(),
        "last"
    );

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut g = c.benchmark_group("route_select");
    g.bench_function("1_rule", |b| {
        b.iter(|| black_box(t1.select(black_box(&parts), 80)))
    });
    g.bench_function("50_rules_match_last", |b| {
        b.iter(|| black_box(t50.select(black_box(&parts), 80)))
    });
    g.finish();
    c.final_summary();

    println!("\nrouting cost per request:");
    percentiles("1 rule", t1, &parts);
    percentiles("50 rules", t50, &parts);
}
