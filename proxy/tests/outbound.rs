//! In-process tests of the outbound side's traffic management: real hyper clients and
//! servers on 127.0.0.1, the proxy's outbound handling in between (via
//! `outbound::serve_connection`, with the original destination given). Endpoints have no
//! identity, so upstream hops are plaintext.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_api::config::Snapshot;
use weft_proxy::app::Proxy;
use weft_proxy::config::Settings;
use weft_proxy::outbound;
use weft_proxy::snapshot::Config;

/// The service VIP every test's client "meant".
const VIP: &str = "10.96.0.1:80";

type ServerBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(s: impl Into<Bytes>) -> ServerBody {
    Full::new(s.into()).boxed()
}

/// An upstream HTTP server (HTTP/1.1 and HTTP/2) answering with `handler`.
async fn server<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ServerBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A server answering 200 with `name` as body and `x-backend: name`.
async fn named(name: &'static str) -> SocketAddr {
    server(move |_req| async move {
        let mut r = Response::new(full(name));
        r.headers_mut()
            .insert("x-backend", name.parse().expect("value"));
        r
    })
    .await
}

/// The proxy's outbound side for `yaml`, listening on a local port as if every connection
/// had been redirected from [`VIP`].
struct Harness {
    proxy: Arc<Proxy>,
    addr: SocketAddr,
}

async fn harness(yaml: &str) -> Harness {
    let settings = Settings::from_source(None, |_| None).expect("settings");
    let proxy = Proxy::new(settings);
    proxy.apply(config(yaml));
    let addr = listen(&proxy, VIP).await;
    Harness { proxy, addr }
}

fn config(yaml: &str) -> Config {
    Config::compile(Snapshot::from_yaml(yaml).expect("yaml")).expect("valid config")
}

/// A local port whose connections the proxy handles as if redirected from `dst`.
async fn listen(proxy: &Arc<Proxy>, dst: &str) -> SocketAddr {
    let dst: SocketAddr = dst.parse().expect("dst");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let p = proxy.clone();
    tokio::spawn(async move {
        while let Ok((stream, client)) = listener.accept().await {
            tokio::spawn(outbound::serve_connection(p.clone(), stream, client, dst));
        }
    });
    addr
}

/// The value of counter `kind` of `weft_upstream_retries_total` for cluster `main`.
fn retries_metric(metrics: &str, kind: &str) -> usize {
    let prefix = format!("weft_upstream_retries_total{{cluster=\"main\",kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().expect("a count"))
        .unwrap_or(0)
}

impl Harness {
    fn client(&self) -> Client<HttpConnector, Full<Bytes>> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("host", "svc.test:80");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Full::new(Bytes::new())).expect("request")
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
        let resp = self
            .client()
            .request(self.request("GET", path, headers))
            .await
            .expect("response");
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (status, parts.headers, body)
    }

    fn metrics(&self) -> String {
        self.proxy.metrics.encode()
    }
}

fn ep(addr: SocketAddr) -> String {
    format!("{{address: {}, port: {}}}", addr.ip(), addr.port())
}

/// A snapshot with one HTTP service port (VIP:80) whose cluster `main` holds `endpoints`;
/// `port_extra` is YAML added to the port (routes), `clusters_extra` more clusters, and
/// `main_extra` fields of `main`.
fn snapshot(
    endpoints: &[SocketAddr],
    main_extra: &str,
    port_extra: &str,
    clusters_extra: &str,
) -> String {
    let eps: Vec<String> = endpoints.iter().map(|a| ep(*a)).collect();
    format!(
        r#"
services:
- hostname: svc.test
  vips: [10.96.0.1]
  ports:
  - port: 80
    protocol: http
    cluster: main
{port_extra}
clusters:
- name: main
  endpoints: [{}]
{main_extra}
{clusters_extra}
"#,
        eps.join(", ")
    )
}

#[tokio::test]
async fn without_routes_requests_go_to_the_port_cluster() {
    let a = named("a").await;
    let h = harness(&snapshot(&[a], "", "", "")).await;
    let (status, headers, body) = h.get("/x", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-backend"], "a");
    assert_eq!(body, "a");
}

#[tokio::test]
async fn retries_turn_a_half_failing_upstream_into_success() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let flaky = server(move |_req| {
        let n = h2.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut r = Response::new(full("x"));
            if n.is_multiple_of(2) {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            r
        }
    })
    .await;
    let routes = r#"
    httpRoutes:
    - action:
        forward:
          destinations: [{cluster: main}]
          retries: {attempts: 5, retryOn: [5xx]}"#;
    let h = harness(&snapshot(&[flaky], "", routes, "")).await;
    const N: usize = 200;
    let ok = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // Two clients: within the budget's minimum of three concurrent retries.
    for _ in 0..2 {
        let client = h.client();
        let ok = ok.clone();
        let reqs: Vec<_> = (0..N / 2).map(|_| h.request("GET", "/", &[])).collect();
        tasks.push(tokio::spawn(async move {
            for req in reqs {
                let resp = client.request(req).await.expect("response");
                if resp.status() == 200 {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
                let _ = resp.into_body().collect().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let ok = ok.load(Ordering::SeqCst);
    assert!(ok * 100 >= N * 99, "{ok} of {N} succeeded: {}", h.metrics());
    let total = hits.load(Ordering::SeqCst);
    let m = h.metrics();
    let retried = retries_metric(&m, "retried");
    assert_eq!(
        total,
        N + retried,
        "every extra try is a counted retry: {m}"
    );
    // The upstream alternates 503 and 200 and a request stops at its first 200, so the 200s
    // are exactly the successful requests and the 503s as many (or one more): every failed
    // try was retried, and nothing was retried after a success.
    assert!(
        (2 * ok..=2 * ok + 1).contains(&total),
        "{total} tries for {ok} successes: {m}"
    );
}

#[tokio::test]
async fn the_retry_budget_bounds_retries() {
    // Always failing, slow enough that requests overlap: with a budget of 0% and one
    // concurrent retry, retries never overlap one another.
    const N: usize = 20;
    const SLOW: Duration = Duration::from_millis(200);
    #[derive(Default)]
    struct Seen {
        arrivals: usize,
        retries_in_flight: usize,
        max_retries_in_flight: usize,
    }
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let s2 = seen.clone();
    let failing = server(move |_req| {
        let seen = s2.clone();
        async move {
            // All first tries arrive at once; a retry only after a first try failed (200 ms
            // later), so arrivals after the N-th are retries.
            let retry = {
                let mut s = seen.lock().expect("lock");
                s.arrivals += 1;
                let retry = s.arrivals > N;
                if retry {
                    s.retries_in_flight += 1;
                    s.max_retries_in_flight = s.max_retries_in_flight.max(s.retries_in_flight);
                }
                retry
            };
            tokio::time::sleep(SLOW).await;
            if retry {
                seen.lock().expect("lock").retries_in_flight -= 1;
            }
            let mut r = Response::new(full("no"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        }
    })
    .await;
    let routes = r#"
    httpRoutes:
    - action:
        forward:
          destinations: [{cluster: main}]
          retries: {attempts: 5, retryOn: [gateway-error]}"#;
    let extra = "  retryBudget: {percent: 0, minConcurrency: 1}";
    let h = harness(&snapshot(&[failing], extra, routes, "")).await;
    let client = h.client();
    let futs: Vec<_> = (0..N)
        .map(|_| client.request(h.request("GET", "/", &[])))
        .collect();
    for r in futures_util::future::join_all(futs).await {
        assert_eq!(r.expect("response").status(), 503);
    }
    let seen = seen.lock().expect("lock");
    let m = h.metrics();
    let retried = retries_metric(&m, "retried");
    assert_eq!(
        seen.arrivals,
        N + retried,
        "every extra try is a counted retry: {m}"
    );
    assert!(retried >= 1, "minConcurrency admits a retry: {m}");
    assert_eq!(
        seen.max_retries_in_flight, 1,
        "the budget (0% of active, at least 1) allows one retry in flight at a time"
    );
    // Without the budget every request would retry 5 times; each refused retry ended a
    // request, and each request retried at most until its first refusal.
    let refused = retries_metric(&m, "budget_exhausted");
    assert_eq!(refused + retries_metric(&m, "attempts_exhausted"), N, "{m}");
    assert!(
        retried < N,
        "{retried} retries: the budget did not bound them: {m}"
    );
}

#[tokio::test]
async fn timeouts_fire_near_their_setting() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    // The first request of each pair is slow.
    let slow_then_fast = server(move |req| {
        let n = h2.fetch_add(1, Ordering::SeqCst);
        async move {
            if req.uri().path() == "/always-slow" || n.is_multiple_of(2) {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Response::new(full("done"))
        }
    })
    .await;
    let routes = r#"
    httpRoutes:
    - matches: [{uri: {exact: /always-slow}}]
      action: {forward: {destinations: [{cluster: main}], timeoutMs: 300}}
    - action:
        forward:
          destinations: [{cluster: main}]
          timeoutMs: 5000
          retries: {attempts: 2, perTryTimeoutMs: 200, retryOn: [5xx]}"#;
    let h = harness(&snapshot(&[slow_then_fast], "", routes, "")).await;
    let t = Instant::now();
    let (status, _, body) = h.get("/always-slow", &[]).await;
    let took = t.elapsed();
    assert_eq!(status, 504, "{body:?}");
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(2000),
        "route timeout took {took:?}"
    );
    hits.store(0, Ordering::SeqCst);
    let t = Instant::now();
    let (status, _, body) = h.get("/retry", &[]).await;
    let took = t.elapsed();
    assert_eq!((status, body.as_ref()), (StatusCode::OK, b"done".as_ref()));
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(2000),
        "per-try timeout then a retry took {took:?}"
    );
}

#[tokio::test]
async fn faults_abort_and_delay() {
    let a = named("a").await;
    let routes = r#"
    httpRoutes:
    - matches: [{uri: {prefix: /abort}}]
      fault: {abort: {httpStatus: 418}}
      action: {forward: {destinations: [{cluster: main}]}}
    - matches: [{uri: {prefix: /grpc-abort}}]
      fault: {abort: {grpcStatus: UNAVAILABLE}}
      action: {forward: {destinations: [{cluster: main}]}}
    - matches: [{uri: {prefix: /delay}}]
      fault: {delay: {fixedDelayMs: 300}}
      action: {forward: {destinations: [{cluster: main}]}}
    - matches: [{uri: {prefix: /never}}]
      fault: {abort: {httpStatus: 500, percentage: 0}}
      action: {forward: {destinations: [{cluster: main}]}}"#;
    let h = harness(&snapshot(&[a], "", routes, "")).await;
    assert_eq!(h.get("/abort", &[]).await.0, 418);
    let (status, headers, _) = h
        .get("/grpc-abort", &[("content-type", "application/grpc")])
        .await;
    assert_eq!(
        (status, &headers["grpc-status"]),
        (StatusCode::OK, &"14".parse().expect("v"))
    );
    let t = Instant::now();
    let (status, _, body) = h.get("/delay", &[]).await;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, b"a".as_ref()));
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(h.get("/never", &[]).await.0, 200);
    assert!(
        h.metrics().contains("weft_faults_total{kind=\"abort\"} 2"),
        "{}",
        h.metrics()
    );
}

#[tokio::test]
async fn mirrors_reach_the_shadow_without_the_client_waiting() {
    let primary = named("primary").await;
    let seen: Arc<Mutex<Vec<(String, Bytes)>>> = Arc::default();
    let s2 = seen.clone();
    let shadow = server(move |req| {
        let seen = s2.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let host = req
                .headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            seen.lock().expect("lock").push((host, body));
            Response::new(full("shadow"))
        }
    })
    .await;
    let routes = r#"
    httpRoutes:
    - action:
        forward:
          destinations: [{cluster: main}]
          mirrors: [{cluster: shadow, percentage: 100}]"#;
    let clusters = format!("- name: shadow\n  endpoints: [{}]", ep(shadow));
    let h = harness(&snapshot(&[primary], "", routes, &clusters)).await;
    let t = Instant::now();
    let (status, _, body) = h.get("/m", &[]).await;
    assert_eq!(
        (status, body.as_ref()),
        (StatusCode::OK, b"primary".as_ref())
    );
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "client waited for the shadow: {:?}",
        t.elapsed()
    );
    // A request with a body: the shadow gets the same body.
    let mut req = h.request("POST", "/m", &[]);
    *req.body_mut() = Full::new(Bytes::from_static(b"payload"));
    let resp = h.client().request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if seen.lock().expect("lock").len() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shadow never reached: {}",
            h.metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = seen.lock().expect("lock").clone();
    assert!(
        seen.iter().all(|(host, _)| host == "svc.test-shadow:80"),
        "{seen:?}"
    );
    assert!(seen.iter().any(|(_, body)| body == "payload"), "{seen:?}");
}

#[tokio::test]
async fn consistent_hash_by_header_sticks() {
    let backends = [named("a").await, named("b").await, named("c").await];
    let lb = "  loadBalancer: {consistentHash: {key: {header: x-user}, algorithm: {maglev: {tableSize: 65537}}}}";
    let h = harness(&snapshot(&backends, lb, "", "")).await;
    let mut by_user: HashMap<String, String> = HashMap::new();
    for round in 0..4 {
        for u in 0..20 {
            let user = format!("user-{u}");
            let (status, headers, _) = h.get("/", &[("x-user", &user)]).await;
            assert_eq!(status, 200);
            let backend = headers["x-backend"].to_str().expect("ascii").to_owned();
            match by_user.get(&user) {
                Some(b) => assert_eq!(*b, backend, "{user} moved in round {round}"),
                None => {
                    by_user.insert(user, backend);
                }
            }
        }
    }
    let distinct: std::collections::HashSet<_> = by_user.values().collect();
    assert!(
        distinct.len() >= 2,
        "users spread over backends: {distinct:?}"
    );
}

#[tokio::test]
async fn cookie_hash_sets_a_cookie_and_sticks() {
    let backends = [named("a").await, named("b").await, named("c").await];
    let lb = "  loadBalancer: {consistentHash: {key: {cookie: {name: weft-session, path: /, ttlMs: 60000}}}}";
    let h = harness(&snapshot(&backends, lb, "", "")).await;
    let (_, headers, _) = h.get("/", &[]).await;
    let cookie = headers["set-cookie"].to_str().expect("ascii").to_owned();
    assert!(cookie.contains("Max-Age=60"), "{cookie}");
    let pair = cookie.split(';').next().expect("pair").to_owned();
    let first = headers["x-backend"].clone();
    for _ in 0..10 {
        let (_, headers, _) = h.get("/", &[("cookie", &pair)]).await;
        assert_eq!(headers["x-backend"], first, "sticky by cookie");
        assert!(!headers.contains_key("set-cookie"));
    }
}

#[tokio::test]
async fn circuit_breaker_overflow_is_refused_at_once_and_counted() {
    let slow = server(|_req| async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        Response::new(full("slow"))
    })
    .await;
    let pool = "  connectionPool: {maxConnections: 1, http1MaxPendingRequests: 1}";
    let h = harness(&snapshot(&[slow], pool, "", "")).await;
    let client = h.client();
    let t = Instant::now();
    let futs: Vec<_> = (0..5)
        .map(|_| {
            let client = client.clone();
            let req = h.request("GET", "/", &[]);
            async move {
                let resp = client.request(req).await.expect("response");
                (resp.status(), resp.headers().clone(), Instant::now())
            }
        })
        .collect();
    let results = futures_util::future::join_all(futs).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert_eq!(
        ok,
        2,
        "one in flight, one queued: {:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert_eq!(refused.len(), 3);
    for r in &refused {
        assert_eq!(r.1["x-envoy-overloaded"], "true");
        assert!(r.2 - t < Duration::from_millis(500), "refused at once");
    }
    assert!(
        h.metrics()
            .contains("weft_upstream_overflow_total{cluster=\"main\",kind=\"pending\"} 3"),
        "{}",
        h.metrics()
    );
}

#[tokio::test]
async fn max_requests_caps_concurrent_requests() {
    let slow = server(|_req| async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        Response::new(full("slow"))
    })
    .await;
    let pool = "  connectionPool: {http2MaxRequests: 2}";
    let h = harness(&snapshot(&[slow], pool, "", "")).await;
    let client = h.client();
    let futs: Vec<_> = (0..4)
        .map(|_| client.request(h.request("GET", "/", &[])))
        .collect();
    let statuses: Vec<u16> = futures_util::future::join_all(futs)
        .await
        .into_iter()
        .map(|r| r.expect("response").status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        2,
        "{statuses:?}"
    );
    assert!(
        h.metrics().contains("kind=\"requests\"} 2"),
        "{}",
        h.metrics()
    );
}

#[tokio::test]
async fn failing_endpoints_are_ejected_and_return() {
    let good = named("good").await;
    let bad = server(|_req| async {
        let mut r = Response::new(full("bad"));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
    .await;
    // Round robin, so that the bad endpoint takes every other request until ejected.
    let od = "  loadBalancer: {policy: ROUND_ROBIN}\n  outlierDetection: {consecutive5xxErrors: 2, intervalMs: 100, baseEjectionTimeMs: 1500, maxEjectionPercent: 50}";
    let h = harness(&snapshot(&[good, bad], od, "", "")).await;
    let mut errors = 0;
    for _ in 0..6 {
        if h.get("/", &[]).await.0 == 500 {
            errors += 1;
        }
    }
    assert_eq!(errors, 2, "two 5xx, then ejected");
    for _ in 0..20 {
        assert_eq!(h.get("/", &[]).await.0, 200, "bad endpoint is ejected");
    }
    assert!(
        h.metrics()
            .contains("weft_outlier_ejections_total{cluster=\"main\",kind=\"ejected\"} 1"),
        "{}",
        h.metrics()
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut back = false;
    for _ in 0..4 {
        if h.get("/", &[]).await.0 == 500 {
            back = true;
        }
    }
    assert!(back, "the endpoint returns after baseEjectionTime");
}

/// An HTTP/2 (prior knowledge) connection to the harness.
async fn h2_client(h: &Harness) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(h.addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn grpc_is_routed_by_method_path_and_keeps_trailers() {
    let grpc_server = |name: &'static str| {
        server(move |_req| async move {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().expect("v"));
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from(name))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
            r.headers_mut()
                .insert("content-type", "application/grpc".parse().expect("v"));
            r
        })
    };
    let (a, b) = (grpc_server("greeter").await, grpc_server("other").await);
    let routes = r#"
    httpRoutes:
    - matches: [{uri: {prefix: /helloworld.Greeter/}}]
      action: {forward: {destinations: [{cluster: greeter}]}}
    - action: {forward: {destinations: [{cluster: main}]}}"#;
    let clusters = format!("- name: greeter\n  endpoints: [{}]", ep(a));
    let h = harness(&snapshot(&[b], "", routes, &clusters)).await;
    let mut sender = h2_client(&h).await;
    for (path, want) in [
        ("/helloworld.Greeter/SayHello", "greeter"),
        ("/other.Svc/Call", "other"),
    ] {
        let req = Request::builder()
            .method("POST")
            .uri(format!("http://svc.test:80{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.expect("body");
        assert_eq!(
            collected.trailers().expect("trailers")["grpc-status"],
            "0",
            "{path}"
        );
        assert_eq!(collected.to_bytes(), want, "{path}");
    }
}

#[tokio::test]
async fn header_operations_on_requests_and_responses() {
    let echo = server(|req| async move {
        let mut r = Response::new(full("echo"));
        for name in ["x-route", "x-dest", "x-drop", "x-keep"] {
            if let Some(v) = req.headers().get(name) {
                r.headers_mut().insert(
                    format!("echo-{name}")
                        .parse::<http::HeaderName>()
                        .expect("name"),
                    v.clone(),
                );
            }
        }
        r.headers_mut()
            .insert("x-upstream-secret", "1".parse().expect("v"));
        r
    })
    .await;
    let routes = r#"
    httpRoutes:
    - requestHeaders: {set: {x-route: from-route}, remove: [x-drop]}
      responseHeaders: {add: {x-served-by: weft}, remove: [x-upstream-secret]}
      action:
        forward:
          destinations:
          - cluster: main
            requestHeaders: {set: {x-dest: from-dest, x-route: from-dest}}
            responseHeaders: {set: {x-dest-resp: yes}}"#;
    let h = harness(&snapshot(&[echo], "", routes, "")).await;
    let (status, headers, _) = h.get("/", &[("x-drop", "1"), ("x-keep", "2")]).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["echo-x-route"], "from-route",
        "route ops after destination ops"
    );
    assert_eq!(headers["echo-x-dest"], "from-dest");
    assert_eq!(headers["echo-x-keep"], "2");
    assert!(!headers.contains_key("echo-x-drop"));
    assert_eq!(headers["x-served-by"], "weft");
    assert_eq!(headers["x-dest-resp"], "yes");
    assert!(!headers.contains_key("x-upstream-secret"));
}

#[tokio::test]
async fn redirects_direct_responses_rewrites_and_404() {
    let echo = server(|req| async move {
        let host = req.headers().get("host").cloned();
        let mut r = Response::new(full(
            req.uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
        ));
        if let Some(h) = host {
            r.headers_mut().insert("echo-host", h);
        }
        r
    })
    .await;
    let routes = r#"
    httpRoutes:
    - matches: [{uri: {prefix: /old}}]
      action: {redirect: {uri: /new, code: 302}}
    - matches: [{uri: {exact: /health}}]
      action: {directResponse: {status: 200, body: healthy}}
    - matches: [{uri: {prefix: /v1/}}]
      action: {forward: {destinations: [{cluster: main}], rewrite: {uri: /v2/, authority: internal.svc:8080}}}
    - matches: [{uri: {regex: '/users/[0-9]+'}}]
      action: {forward: {destinations: [{cluster: main}], rewrite: {uriRegex: {pattern: '^/users/([0-9]+)$', rewrite: '/u?id=\1'}}}}"#;
    let h = harness(&snapshot(&[echo], "", routes, "")).await;
    let (status, headers, _) = h.get("/old/page?x=1", &[]).await;
    assert_eq!(status, 302);
    assert_eq!(headers["location"], "http://svc.test/new?x=1");
    let (status, _, body) = h.get("/health", &[]).await;
    assert_eq!(
        (status, body.as_ref()),
        (StatusCode::OK, b"healthy".as_ref())
    );
    let (status, headers, body) = h.get("/v1/items?q=2", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, "/v2/items?q=2");
    assert_eq!(headers["echo-host"], "internal.svc:8080");
    let (_, _, body) = h.get("/users/42", &[]).await;
    assert_eq!(body, "/u?id=42");
    assert_eq!(h.get("/nowhere", &[]).await.0, 404);
}

#[tokio::test]
async fn weighted_split_stays_within_three_points() {
    let (a, b) = (named("a").await, named("b").await);
    let routes = r#"
    httpRoutes:
    - action:
        forward:
          destinations: [{cluster: main, weight: 90}, {cluster: canary, weight: 10}]"#;
    let clusters = format!("- name: canary\n  endpoints: [{}]", ep(b));
    let h = harness(&snapshot(&[a], "", routes, &clusters)).await;
    const N: usize = 2000;
    let a_count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = h.client();
        let reqs: Vec<_> = (0..N / 8).map(|_| h.request("GET", "/", &[])).collect();
        let a_count = a_count.clone();
        tasks.push(tokio::spawn(async move {
            for req in reqs {
                let resp = client.request(req).await.expect("response");
                if resp.headers()["x-backend"] == "a" {
                    a_count.fetch_add(1, Ordering::SeqCst);
                }
                let _ = resp.into_body().collect().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let share = a_count.load(Ordering::SeqCst) as f64 * 100.0 / N as f64;
    assert!((87.0..=93.0).contains(&share), "main got {share:.1}%");
}

#[tokio::test]
async fn cors_preflight_is_answered_and_responses_decorated() {
    let a = named("a").await;
    let routes = r#"
    httpRoutes:
    - cors: {allowOrigins: [{exact: 'https://app.example'}], allowMethods: [GET, PUT], maxAgeSecs: 60}
      action: {forward: {destinations: [{cluster: main}]}}"#;
    let h = harness(&snapshot(&[a], "", routes, "")).await;
    let resp = h
        .client()
        .request(h.request(
            "OPTIONS",
            "/",
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "PUT"),
            ],
        ))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-methods"], "GET,PUT");
    assert!(
        !resp.headers().contains_key("x-backend"),
        "answered by the proxy"
    );
    let (_, headers, _) = h.get("/", &[("origin", "https://app.example")]).await;
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(headers["x-backend"], "a");
}

#[tokio::test]
async fn tcp_routes_by_sni() {
    async fn tcp_server(tag: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(tag).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        addr
    }
    let (a, b) = (tcp_server(b"A").await, tcp_server(b"B").await);
    let yaml = format!(
        r#"
services:
- hostname: svc.test
  vips: [10.96.0.1]
  ports:
  - port: 80
    protocol: tls
    cluster: b
    tcpRoutes:
    - matches: [{{sniHosts: ["*.a.example"]}}]
      destinations: [{{cluster: a}}]
clusters:
- name: a
  endpoints: [{}]
- name: b
  endpoints: [{}]
"#,
        ep(a),
        ep(b)
    );
    let h = harness(&yaml).await;
    for (sni, want) in [("api.a.example", b"A"), ("api.b.example", b"B")] {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            sni.to_owned().try_into().expect("name"),
        )
        .expect("client");
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).expect("client hello");
        let mut s = TcpStream::connect(h.addr).await.expect("connect");
        s.write_all(&hello).await.expect("write");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(got, want, "sni {sni}");
    }
}

#[tokio::test]
async fn a_reload_keeps_endpoint_state_and_in_flight_requests() {
    let slow = server(|_req| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Response::new(full("slow"))
    })
    .await;
    let pool = "  connectionPool: {http2MaxRequests: 1}";
    let yaml = snapshot(&[slow], pool, "", "");
    let h = harness(&yaml).await;
    let client = h.client();
    let in_flight = tokio::spawn(client.request(h.request("GET", "/", &[])));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The same snapshot again: the breaker still counts the request in flight.
    h.proxy
        .apply(Config::compile(Snapshot::from_yaml(&yaml).expect("yaml")).expect("valid"));
    assert_eq!(
        h.get("/", &[]).await.0,
        503,
        "limit of 1 still counts the old request"
    );
    let resp = in_flight
        .await
        .expect("task")
        .expect("in-flight request survived the reload");
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
    assert_eq!(h.get("/", &[]).await.0, 200);
}

#[tokio::test]
async fn endpoint_churn_keeps_in_flight_requests_and_new_endpoints_take_traffic() {
    let old = server(|_req| async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let mut r = Response::new(full("old"));
        r.headers_mut()
            .insert("x-backend", "old".parse().expect("value"));
        r
    })
    .await;
    let new = named("new").await;
    let h = harness(&snapshot(&[old], "", "", "")).await;
    let client = h.client();
    // A slow request to the endpoint about to leave.
    let in_flight = tokio::spawn(client.request(h.request("GET", "/", &[])));
    // Steady traffic across the change, one request at a time per client.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..3 {
        let client = h.client();
        let stop = stop.clone();
        let reqs: Vec<_> = (0..1000).map(|_| h.request("GET", "/", &[])).collect();
        load.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for req in reqs {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let resp = client.request(req).await.expect("response");
                let status = resp.status();
                let backend = resp
                    .headers()
                    .get("x-backend")
                    .map(|v| v.to_str().expect("ascii").to_owned());
                let _ = resp.into_body().collect().await;
                seen.push((status, backend));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The old endpoint leaves the config, a new one joins.
    h.proxy.apply(config(&snapshot(&[new], "", "", "")));
    let resp = in_flight
        .await
        .expect("task")
        .expect("the in-flight request survived the change");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backend"], "old");
    assert_eq!(
        resp.into_body().collect().await.expect("body").to_bytes(),
        "old"
    );
    let (status, headers, _) = h.get("/", &[]).await;
    assert_eq!(
        (status, &headers["x-backend"]),
        (StatusCode::OK, &"new".parse().expect("v"))
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let mut new_seen = 0;
    for task in load {
        let seen = task.await.expect("load task");
        assert!(
            seen.iter().all(|(status, _)| *status == 200),
            "no request failed across the change: {seen:?}"
        );
        // Requests to the old endpoint came first; once a client saw the new one, it stayed.
        let first_new = seen.iter().position(|(_, b)| b.as_deref() == Some("new"));
        let first_new = first_new.expect("every client reached the new endpoint");
        assert!(
            seen[first_new..]
                .iter()
                .all(|(_, b)| b.as_deref() == Some("new")),
            "{seen:?}"
        );
        new_seen += seen.len() - first_new;
    }
    assert!(new_seen >= 3, "the new endpoint took the traffic");
}

/// A TCP server that sends `tag` as soon as a client connects, then closes.
async fn tagging_tcp_server(tag: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(tag).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn tcp_routes_by_port_with_weights() {
    let (a, b, c) = (
        tagging_tcp_server(b"A").await,
        tagging_tcp_server(b"B").await,
        tagging_tcp_server(b"C").await,
    );
    let yaml = format!(
        r#"
services:
- hostname: db.test
  vips: [10.96.0.1]
  ports:
  - port: 5432
    protocol: tcp
    cluster: c
    tcpRoutes:
    - matches: [{{port: 6379}}]
      destinations: [{{cluster: c}}]
    - matches: [{{port: 5432}}]
      destinations: [{{cluster: a, weight: 75}}, {{cluster: b, weight: 25}}]
  - port: 6379
    protocol: tcp
    cluster: a
    tcpRoutes:
    - matches: [{{port: 6379}}]
      destinations: [{{cluster: c}}]
clusters:
- name: a
  endpoints: [{}]
- name: b
  endpoints: [{}]
- name: c
  endpoints: [{}]
"#,
        ep(a),
        ep(b),
        ep(c)
    );
    let settings = Settings::from_source(None, |_| None).expect("settings");
    let proxy = Proxy::new(settings);
    proxy.apply(config(&yaml));
    let postgres = listen(&proxy, "10.96.0.1:5432").await;
    let redis = listen(&proxy, "10.96.0.1:6379").await;
    async fn tag(addr: SocketAddr) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .expect("in time")
            .expect("read");
        got
    }
    const N: usize = 400;
    let mut counts: HashMap<Vec<u8>, usize> = HashMap::new();
    for _ in 0..N {
        *counts.entry(tag(postgres).await).or_default() += 1;
    }
    assert_eq!(
        counts.get(b"C".as_slice()),
        None,
        "the 6379 route does not apply to 5432: {counts:?}"
    );
    let share_a = counts.get(b"A".as_slice()).copied().unwrap_or(0) * 100 / N;
    assert!(
        (67..=83).contains(&share_a),
        "75/25 split gave {share_a}% to a: {counts:?}"
    );
    assert_eq!(
        counts.values().sum::<usize>(),
        N,
        "every connection reached a backend: {counts:?}"
    );
    for _ in 0..20 {
        assert_eq!(tag(redis).await, b"C", "port 6379 has its own route");
    }
}

/// One HTTP/1.1 GET through the harness from source address `from`; the backend's name.
async fn get_from(h: &Harness, from: std::net::IpAddr, path: &str) -> String {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .expect("bind a loopback source address");
    let stream = socket.connect(h.addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header("host", "svc.test:80")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    resp.headers()["x-backend"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

#[tokio::test]
async fn consistent_hash_by_source_ip_sticks() {
    let backends = [named("a").await, named("b").await, named("c").await];
    let lb = "  loadBalancer: {consistentHash: {key: sourceIp}}";
    let h = harness(&snapshot(&backends, lb, "", "")).await;
    let mut by_ip: HashMap<std::net::IpAddr, String> = HashMap::new();
    for round in 0..3 {
        for last in 2..26u8 {
            let ip = std::net::IpAddr::from([127, 0, 0, last]);
            // A new connection each time: only the address ties the requests together.
            let backend = get_from(&h, ip, "/").await;
            match by_ip.get(&ip) {
                Some(b) => assert_eq!(*b, backend, "{ip} moved in round {round}"),
                None => {
                    by_ip.insert(ip, backend);
                }
            }
        }
    }
    let distinct: std::collections::HashSet<_> = by_ip.values().collect();
    assert!(
        distinct.len() >= 2,
        "sources spread over backends: {by_ip:?}"
    );
}

#[tokio::test]
async fn consistent_hash_by_query_parameter_sticks() {
    let backends = [named("a").await, named("b").await, named("c").await];
    let lb = "  loadBalancer: {consistentHash: {key: {queryParameter: user}, algorithm: {ring: {minRingSize: 2048}}}}";
    let h = harness(&snapshot(&backends, lb, "", "")).await;
    let mut by_user: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for u in 0..24 {
            // Other parameters around it change nothing.
            let path = format!("/items?page={round}&user=u{u}&sort=x{round}");
            let (status, headers, _) = h.get(&path, &[]).await;
            assert_eq!(status, 200);
            let backend = headers["x-backend"].to_str().expect("ascii").to_owned();
            match by_user.get(&format!("u{u}")) {
                Some(b) => assert_eq!(*b, backend, "u{u} moved in round {round}"),
                None => {
                    by_user.insert(format!("u{u}"), backend);
                }
            }
        }
    }
    let distinct: std::collections::HashSet<_> = by_user.values().collect();
    assert!(
        distinct.len() >= 2,
        "users spread over backends: {by_user:?}"
    );
}

/// A certificate authority and what it signs, for upstream TLS tests.
struct TestCa {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "weft test ca");
        let cert = params.self_signed(&key).expect("self-signed");
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// `(certificate PEM, key PEM)` for `dns` (a server) or a client named `cn`.
    fn leaf(&self, dns: &[&str], cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

fn der(pem: &str) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem")
}

/// An HTTPS server that requires a client certificate issued by `ca` and answers with the
/// number of certificates the client presented.
async fn mtls_server(ca: &TestCa) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let (cert, key) = ca.leaf(&["api.example.com"], "api");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&ca.pem)).expect("root");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("client verifier");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![der(&cert)],
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let presented = tls.get_ref().1.peer_certificates().map_or(0, <[_]>::len);
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let host = req
                        .headers()
                        .get("host")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let mut r = Response::new(full(format!("client certs: {presented}")));
                    r.headers_mut()
                        .insert("echo-host", host.parse().expect("value"));
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn mutual_tls_to_an_upstream_outside_the_mesh() {
    let ca = TestCa::new();
    let upstream = mtls_server(&ca).await;
    let (client_cert, client_key) = ca.leaf(&[], "weft client");
    let tls = |mode: &str, with_cert: bool| {
        let mut t = format!(
            "  tls: {{mode: {mode}, sni: api.example.com, caCertificates: {}",
            serde_json::to_string(&ca.pem).expect("json")
        );
        if with_cert {
            t.push_str(&format!(
                ", clientCertificate: {}, privateKey: {}",
                serde_json::to_string(&client_cert).expect("json"),
                serde_json::to_string(&client_key).expect("json")
            ));
        }
        t.push('}');
        t
    };
    let h = harness(&snapshot(&[upstream], &tls("MUTUAL", true), "", "")).await;
    for _ in 0..3 {
        let (status, headers, body) = h.get("/x", &[]).await;
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(
            body, "client certs: 1",
            "the client certificate was presented"
        );
        assert_eq!(
            headers["echo-host"], "svc.test:80",
            "the app's Host is kept"
        );
    }
    // The same server refuses a client without a certificate (SIMPLE).
    let h = harness(&snapshot(&[upstream], &tls("SIMPLE", false), "", "")).await;
    let (status, _, body) = h.get("/x", &[]).await;
    assert_eq!(status, 503, "{body:?}");
}

#[tokio::test]
async fn max_requests_per_connection_retires_http1_connections() {
    // Requests seen per upstream connection (by the proxy's source port).
    let per_conn: Arc<Mutex<HashMap<SocketAddr, usize>>> = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let pc = per_conn.clone();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let pc = pc.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    *pc.lock().expect("lock").entry(peer).or_default() += 1;
                    async { Ok::<_, Infallible>(Response::new(full("ok"))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    for (limit, requests) in [(3usize, 9usize), (2, 7)] {
        per_conn.lock().expect("lock").clear();
        let pool = format!("  connectionPool: {{maxRequestsPerConnection: {limit}}}");
        let h = harness(&snapshot(&[upstream], &pool, "", "")).await;
        for _ in 0..requests {
            assert_eq!(h.get("/", &[]).await.0, 200);
            // Let the connection go back to the pool before the next request.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let counts: Vec<usize> = per_conn.lock().expect("lock").values().copied().collect();
        assert_eq!(counts.iter().sum::<usize>(), requests);
        assert!(
            counts.iter().all(|c| *c <= limit),
            "no connection carried more than {limit}: {counts:?}"
        );
        assert!(
            counts.contains(&limit),
            "connections are reused up to the limit: {counts:?}"
        );
        assert!(counts.len() >= requests.div_ceil(limit), "{counts:?}");
    }
}
