//! `weft-sample-app`: the application the local node runs in its pods. One binary, so a pod
//! needs no image: `serve` runs the servers (HTTP/1.1 and HTTP/2 echo with gRPC and WebSocket
//! on the same port, TCP echo, a server-first TCP protocol); the other subcommands are the
//! clients tests run inside pods (like `kubectl exec`), each printing a JSON report.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, Stream, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use weft_tests::sample::grpc::{CHAT, EchoRequest, EchoResponse, UNARY};
use weft_tests::sample::{
    EchoReply, GrpcReport, HttpReport, LoadReport, SeenRequest, TcpReport, WsReport,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Parser)]
#[command(
    name = "weft-sample-app",
    about = "Weft's sample app: servers and clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the servers.
    Serve {
        /// Name reported in replies.
        #[arg(long, env = "POD_NAME", default_value = "sample")]
        name: String,
        /// HTTP/1.1 + HTTP/2 (h2c) + gRPC + WebSocket port.
        #[arg(long = "http")]
        http: Vec<u16>,
        /// TCP echo port.
        #[arg(long = "tcp-echo")]
        tcp_echo: Vec<u16>,
        /// Server-first TCP port: a greeting is sent on accept, then echo.
        #[arg(long = "server-first")]
        server_first: Vec<u16>,
        /// Percentage of HTTP requests answered 500, spread evenly (50: every other one).
        /// Changed at run time with `GET /_control/fail/<percent>`.
        #[arg(long, default_value_t = 0)]
        fail_percent: u8,
        /// Delay every HTTP answer by this long (a slow shadow, a slow backend).
        #[arg(long, value_parser = humantime_duration)]
        delay_all: Option<Duration>,
    },
    /// HTTP requests; prints an HttpReport.
    Http {
        url: String,
        /// HTTP/2 with prior knowledge.
        #[arg(long)]
        h2: bool,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        concurrency: u64,
        /// `name: value` request headers.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Request body (POST when given).
        #[arg(long)]
        body: Option<String>,
        /// Method (default GET, or POST with a body).
        #[arg(long)]
        method: Option<String>,
        /// Replies to keep in the report.
        #[arg(long, default_value_t = 5)]
        keep: usize,
        #[arg(long, default_value = "15s", value_parser = humantime_duration)]
        timeout: Duration,
    },
    /// gRPC unary and bidirectional streaming; prints a GrpcReport.
    Grpc {
        url: String,
        #[arg(long, default_value_t = 5)]
        stream: u32,
    },
    /// WebSocket echo; prints a WsReport.
    Ws {
        url: String,
        #[arg(long, default_value_t = 10)]
        messages: u64,
    },
    /// TCP echo with half-close; prints a TcpReport.
    Tcp {
        addr: String,
        #[arg(long, default_value_t = 65536)]
        bytes: usize,
        /// Read the server's greeting before sending.
        #[arg(long)]
        greeting: bool,
        /// Text to embed at the start of the payload.
        #[arg(long)]
        marker: Option<String>,
        /// Spread the sending over this long (keeps the connection open, e.g. across reloads).
        #[arg(long, value_parser = humantime_duration)]
        over: Option<Duration>,
        #[arg(long, default_value = "15s", value_parser = humantime_duration)]
        timeout: Duration,
    },
    /// GET a URL and print the body (e.g. the proxy's `/config_dump` on localhost).
    Fetch { url: String },
    /// `POST /quitquitquit` to the sidecar's status port: the Job pattern in classic mode
    /// (the app's last step tells the proxy it is done).
    Quit {
        #[arg(long, default_value = "http://127.0.0.1:15020/quitquitquit")]
        url: String,
    },
    /// Fixed-rate HTTP load; prints a LoadReport.
    Load {
        url: String,
        #[arg(long, default_value_t = 100)]
        rps: u64,
        #[arg(long, default_value = "5s", value_parser = humantime_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 4)]
        conns: u64,
        #[arg(long)]
        h2: bool,
        #[arg(long, default_value = "10s", value_parser = humantime_duration)]
        timeout: Duration,
    },
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration like 500ms or 5s"))
}

fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if let Some(sec) = s.strip_suffix('s') {
        return sec.parse::<f64>().ok().map(Duration::from_secs_f64);
    }
    None
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve {
                name,
                http,
                tcp_echo,
                server_first,
                fail_percent,
                delay_all,
            } => {
                let state = Arc::new(ServerState {
                    name: Arc::from(name),
                    counter: AtomicU64::new(0),
                    fail_percent: AtomicU64::new(u64::from(fail_percent)),
                    delay_all,
                    seen: std::sync::Mutex::new(std::collections::VecDeque::new()),
                });
                serve(state, http, tcp_echo, server_first).await
            }
            Command::Http {
                url,
                h2,
                count,
                concurrency,
                headers,
                body,
                method,
                keep,
                timeout,
            } => print(
                &http_client(
                    &url,
                    h2,
                    count,
                    concurrency,
                    &headers,
                    body,
                    method,
                    keep,
                    timeout,
                )
                .await?,
            ),
            Command::Grpc { url, stream } => print(&grpc_client(&url, stream).await),
            Command::Fetch { url } => {
                let uri: http::Uri = url.parse().with_context(|| format!("url {url:?}"))?;
                let resp = http_client_for(false)
                    .request(Request::get(uri).body(Full::new(Bytes::new()))?)
                    .await?;
                let body = resp.into_body().collect().await?.to_bytes();
                println!("{}", String::from_utf8_lossy(&body));
                Ok(())
            }
            Command::Quit { url } => {
                let uri: http::Uri = url.parse().with_context(|| format!("url {url:?}"))?;
                let req = Request::post(uri).body(Full::new(Bytes::new()))?;
                let resp = http_client_for(false).request(req).await?;
                anyhow::ensure!(
                    resp.status().is_success(),
                    "quitquitquit answered {}",
                    resp.status()
                );
                Ok(())
            }
            Command::Ws { url, messages } => print(&ws_client(&url, messages).await),
            Command::Tcp {
                addr,
                bytes,
                greeting,
                marker,
                over,
                timeout,
            } => print(&tcp_client(&addr, bytes, greeting, marker, over, timeout).await),
            Command::Load {
                url,
                rps,
                duration,
                conns,
                h2,
                timeout,
            } => print(&load(&url, rps, duration, conns, h2, timeout).await?),
        }
    })
}

fn print<T: serde::Serialize>(report: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

// ---------------------------------------------------------------- servers

/// What the HTTP servers share.
struct ServerState {
    name: Arc<str>,
    counter: AtomicU64,
    fail_percent: AtomicU64,
    delay_all: Option<Duration>,
    /// The last requests received (`GET /_requests`), newest last.
    seen: std::sync::Mutex<std::collections::VecDeque<SeenRequest>>,
}

async fn serve(
    state: Arc<ServerState>,
    http: Vec<u16>,
    tcp_echo: Vec<u16>,
    server_first: Vec<u16>,
) -> anyhow::Result<()> {
    let name = state.name.clone();
    if http.is_empty() && tcp_echo.is_empty() && server_first.is_empty() {
        bail!("nothing to serve: give --http, --tcp-echo or --server-first");
    }
    let mut tasks = Vec::new();
    for port in http {
        let l = listen(port).await?;
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req| handle_http(state.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(s), svc)
                        .await;
                });
            }
        }));
    }
    for (port, greet) in tcp_echo
        .into_iter()
        .map(|p| (p, false))
        .chain(server_first.into_iter().map(|p| (p, true)))
    {
        let l = listen(port).await?;
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    if greet {
                        let _ = s
                            .write_all(format!("220 {name} ready\r\n").as_bytes())
                            .await;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        }));
    }
    eprintln!("weft-sample-app {name}: serving");
    // The accept loops never end: this returns only if one of them panics.
    futures_util::future::try_join_all(tasks).await?;
    Ok(())
}

async fn listen(port: u16) -> anyhow::Result<TcpListener> {
    // Dual-stack: one IPv6 socket that also accepts IPv4 (v4-mapped), when IPv6 is up.
    let v6 = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None);
    if let Ok(sock) = v6 {
        let _ = sock.set_only_v6(false);
        let _ = sock.set_reuse_address(true);
        let addr: std::net::SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
        if sock.bind(&addr.into()).is_ok() && sock.listen(1024).is_ok() {
            sock.set_nonblocking(true)?;
            return Ok(TcpListener::from_std(sock.into())?);
        }
    }
    TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("listen on {port}"))
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

async fn handle_http(
    state: Arc<ServerState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let name = state.name.clone();
    if let Some(p) = req
        .uri()
        .path()
        .strip_prefix("/_control/fail/")
        .and_then(|p| p.parse::<u64>().ok())
    {
        state.fail_percent.store(p.min(100), Ordering::Relaxed);
        return Ok(full(StatusCode::OK, format!("fail percent {p}\n")));
    }
    if req.uri().path() == "/_requests" {
        let seen: Vec<SeenRequest> = state.seen.lock().expect("lock").iter().cloned().collect();
        return Ok(full(
            StatusCode::OK,
            serde_json::to_vec(&seen).unwrap_or_default(),
        ));
    }
    {
        let mut seen = state.seen.lock().expect("lock");
        seen.push_back(SeenRequest {
            path: req.uri().path().to_owned(),
            host: req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| {
                    req.headers()
                        .get("host")
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_owned)
                })
                .unwrap_or_default(),
        });
        if seen.len() > 1000 {
            seen.pop_front();
        }
    }
    // Health checks answer at once whatever the configured slowness.
    if let Some(d) = state.delay_all
        && req.uri().path() != "/healthz"
    {
        tokio::time::sleep(d).await;
    }
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        return Ok(grpc_server(name, req).await);
    }
    if req.uri().path() == "/ws" {
        return Ok(websocket(req));
    }
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        return Ok(full(StatusCode::OK, "ok\n"));
    }
    // `/delay/<ms>` anywhere in the path (routes may add a prefix).
    if let Some(ms) = path
        .split("/delay/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|m| m.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|m| m.parse::<usize>().ok())
    {
        return Ok(full(StatusCode::OK, vec![b'x'; n]));
    }
    let mut status = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    // Failures spread evenly: request n fails when the running count of failures due
    // (n × percent / 100) steps up, so 50% fails every other request.
    let n = state.counter.fetch_add(1, Ordering::Relaxed);
    let percent = state.fail_percent.load(Ordering::Relaxed);
    if percent > 0 && ((n + 1) * percent / 100) != (n * percent / 100) {
        status = StatusCode::INTERNAL_SERVER_ERROR;
    }
    let mut headers = BTreeMap::<String, String>::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        headers
            .entry(k.as_str().to_owned())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| headers.get("host").cloned())
        .unwrap_or_default();
    let reply_base = EchoReply {
        server: name.to_string(),
        method: req.method().to_string(),
        path,
        query: req.uri().query().unwrap_or_default().to_owned(),
        version: format!("{:?}", req.version()),
        host,
        headers,
        body_len: 0,
    };
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reply = EchoReply {
        body_len: body.len(),
        ..reply_base
    };
    let mut resp = full(status, serde_json::to_vec(&reply).unwrap_or_default());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return full(StatusCode::BAD_REQUEST, "not a websocket request\n");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            let echo = match msg {
                Message::Text(_) | Message::Binary(_) => msg,
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(echo).await.is_err() {
                break;
            }
        }
    });
    let mut resp = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let h = resp.headers_mut();
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    resp
}

fn caller_of(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').find_map(|kv| kv.strip_prefix("URI=")))
        .unwrap_or_default()
        .to_owned()
}

async fn grpc_server(name: Arc<str>, req: Request<Incoming>) -> Response<Body> {
    let mut grpc =
        tonic::server::Grpc::new(tonic_prost::ProstCodec::<EchoResponse, EchoRequest>::default());
    let resp = match req.uri().path() {
        UNARY => grpc.unary(Unary(name), req).await,
        CHAT => grpc.streaming(Chat(name), req).await,
        _ => tonic::Status::unimplemented("no such method").into_http(),
    };
    resp.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync())
}

#[derive(Clone)]
struct Unary(Arc<str>);

impl tonic::server::UnaryService<EchoRequest> for Unary {
    type Response = EchoResponse;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<EchoResponse>, tonic::Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        let server = self.0.to_string();
        Box::pin(async move {
            let caller = caller_of(request.metadata());
            let mut resp = tonic::Response::new(EchoResponse {
                message: request.into_inner().message,
                server,
                caller,
            });
            // Trailers carry metadata after the message; a proxy that drops trailers loses it.
            resp.metadata_mut().insert(
                "x-weft-sample-trailer",
                tonic::metadata::MetadataValue::from_static("kept"),
            );
            Ok(resp)
        })
    }
}

#[derive(Clone)]
struct Chat(Arc<str>);

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, tonic::Status>> + Send>>;

impl tonic::server::StreamingService<EchoRequest> for Chat {
    type Response = EchoResponse;
    type ResponseStream = ReplyStream;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<ReplyStream>, tonic::Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<EchoRequest>>) -> Self::Future {
        let server = self.0.to_string();
        Box::pin(async move {
            let caller = caller_of(request.metadata());
            let inbound = request.into_inner();
            let out = inbound.map(move |m| {
                m.map(|m| EchoResponse {
                    message: format!("echo:{}", m.message),
                    server: server.clone(),
                    caller: caller.clone(),
                })
            });
            Ok(tonic::Response::new(Box::pin(out) as ReplyStream))
        })
    }
}

// ---------------------------------------------------------------- clients

#[allow(clippy::too_many_arguments)]
async fn http_client(
    url: &str,
    h2: bool,
    count: u64,
    concurrency: u64,
    headers: &[String],
    body: Option<String>,
    method: Option<String>,
    keep: usize,
    timeout: Duration,
) -> anyhow::Result<HttpReport> {
    let uri: http::Uri = url.parse().with_context(|| format!("url {url:?}"))?;
    let client = http_client_for(h2);
    let mut parsed_headers = Vec::new();
    for h in headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("header {h:?} is not name: value"))?;
        parsed_headers.push((
            http::HeaderName::from_bytes(k.trim().as_bytes())?,
            HeaderValue::from_str(v.trim())?,
        ));
    }
    let report = Arc::new(tokio::sync::Mutex::new(HttpReport::default()));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let method = method.clone();
        let (client, uri, report, next, body, parsed_headers) = (
            client.clone(),
            uri.clone(),
            report.clone(),
            next.clone(),
            body.clone(),
            parsed_headers.clone(),
        );
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let mut req = Request::builder()
                    .method(method.as_deref().unwrap_or(if body.is_some() {
                        "POST"
                    } else {
                        "GET"
                    }))
                    .uri(uri.clone());
                for (k, v) in &parsed_headers {
                    req = req.header(k, v);
                }
                let req = req
                    .body(Full::new(Bytes::from(body.clone().unwrap_or_default())))
                    .expect("request parts are valid");
                let started = Instant::now();
                let result = tokio::time::timeout(timeout, async {
                    let resp = client.request(req).await?;
                    let status = resp.status().as_u16();
                    let version = format!("{:?}", resp.version());
                    let headers: BTreeMap<String, String> = resp
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_owned(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect();
                    let bytes = resp.into_body().collect().await?.to_bytes();
                    Ok::<_, BoxError>((status, version, headers, bytes))
                })
                .await;
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let mut r = report.lock().await;
                if r.latencies_ms.len() < 10_000 {
                    r.latencies_ms.push(elapsed_ms);
                }
                match result {
                    Ok(Ok((status, version, headers, bytes))) => {
                        if r.first_headers.is_empty() {
                            r.first_headers = headers;
                        }
                        *r.statuses.entry(status).or_default() += 1;
                        *r.versions.entry(version).or_default() += 1;
                        if (200..300).contains(&status) {
                            r.ok += 1;
                        }
                        if let Ok(reply) = serde_json::from_slice::<EchoReply>(&bytes) {
                            *r.servers.entry(reply.server.clone()).or_default() += 1;
                            if r.replies.len() < keep {
                                r.replies.push(reply);
                            }
                        }
                    }
                    Ok(Err(e)) => *r.errors.entry(error_chain(&*e)).or_default() += 1,
                    Err(_) => *r.errors.entry("timeout".to_owned()).or_default() += 1,
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let report = report.lock().await.clone();
    Ok(report)
}

fn http_client_for(h2: bool) -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    let mut builder = Client::builder(TokioExecutor::new());
    builder.pool_idle_timeout(Duration::from_secs(30));
    if h2 {
        builder.http2_only(true);
    }
    builder.build(connector)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn grpc_client(url: &str, stream: u32) -> GrpcReport {
    let mut report = GrpcReport::default();
    if let Err(e) = grpc_calls(url, stream, &mut report).await {
        report.error = Some(format!("{e:#}"));
    }
    report
}

async fn grpc_calls(url: &str, stream: u32, report: &mut GrpcReport) -> anyhow::Result<()> {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .connect()
        .await
        .context("grpc connect")?;
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.context("grpc ready")?;
    let resp = client
        .unary(
            tonic::Request::new(EchoRequest {
                message: "hello".into(),
            }),
            http::uri::PathAndQuery::from_static(UNARY),
            tonic_prost::ProstCodec::<EchoRequest, EchoResponse>::default(),
        )
        .await
        .map_err(|s| anyhow::anyhow!("unary: {s}"))?;
    report.trailer = resp
        .metadata()
        .get("x-weft-sample-trailer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let reply = resp.into_inner();
    report.unary_message = reply.message;
    report.unary_server = reply.server;
    report.unary_caller = reply.caller;

    // Bidirectional: send one message, wait for its echo, then the next — proving both
    // directions flow while the stream stays open.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let outbound = tokio_stream_from(rx);
    client.ready().await.context("grpc ready")?;
    let resp = client.streaming(
        tonic::Request::new(outbound),
        http::uri::PathAndQuery::from_static(CHAT),
        tonic_prost::ProstCodec::<EchoRequest, EchoResponse>::default(),
    );
    let first = EchoRequest {
        message: "m0".into(),
    };
    tx.send(first).await.context("send first")?;
    let mut inbound = resp
        .await
        .map_err(|s| anyhow::anyhow!("chat: {s}"))?
        .into_inner();
    for i in 0..stream {
        let msg = inbound
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("chat recv: {s}"))?
            .context("stream ended early")?;
        report.stream_server = msg.server;
        report.stream_replies.push(msg.message);
        if i + 1 < stream {
            tx.send(EchoRequest {
                message: format!("m{}", i + 1),
            })
            .await
            .context("send")?;
        }
    }
    drop(tx);
    Ok(())
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn ws_client(url: &str, messages: u64) -> WsReport {
    let mut report = WsReport::default();
    let run = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .context("connect")?;
        for i in 0..messages {
            let text = format!("message {i}");
            ws.send(Message::text(text.clone())).await.context("send")?;
            report.sent += 1;
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str() == text => report.echoed += 1,
                other => bail!("unexpected reply {other:?}"),
            }
        }
        ws.close(None).await.ok();
        Ok::<_, anyhow::Error>(())
    };
    if let Err(e) = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timeout")))
    {
        report.error = Some(format!("{e:#}"));
    }
    report
}

async fn tcp_client(
    addr: &str,
    bytes: usize,
    greeting: bool,
    marker: Option<String>,
    over: Option<Duration>,
    timeout: Duration,
) -> TcpReport {
    let mut report = TcpReport::default();
    let run = async {
        let mut s = TcpStream::connect(addr).await.context("connect")?;
        if greeting {
            let mut buf = Vec::new();
            let mut byte = [0u8; 1];
            while !buf.ends_with(b"\r\n") {
                let n = s.read(&mut byte).await.context("read greeting")?;
                if n == 0 {
                    bail!("closed before greeting");
                }
                buf.push(byte[0]);
            }
            report.greeting = Some(String::from_utf8_lossy(&buf).trim().to_owned());
        }
        let mut payload: Vec<u8> = (0..bytes).map(|i| (i * 7 % 251) as u8).collect();
        if let Some(m) = &marker {
            let m = m.as_bytes();
            let n = m.len().min(payload.len());
            payload[..n].copy_from_slice(&m[..n]);
        }
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            match over {
                None => w.write_all(&payload).await?,
                Some(over) => {
                    let chunks = 50usize;
                    let size = payload.len().div_ceil(chunks).max(1);
                    for chunk in payload.chunks(size) {
                        w.write_all(chunk).await?;
                        tokio::time::sleep(over / chunks as u32).await;
                    }
                }
            }
            w.shutdown().await?;
            Ok::<_, std::io::Error>(payload)
        });
        let mut received = Vec::new();
        r.read_to_end(&mut received).await.context("read echo")?;
        let payload = writer.await?.context("write")?;
        report.sent = payload.len() as u64;
        report.received = received.len() as u64;
        report.identical = received == payload;
        report.clean_close = true;
        Ok::<_, anyhow::Error>(())
    };
    if let Err(e) = tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timeout")))
    {
        report.error = Some(format!("{e:#}"));
    }
    report
}

async fn load(
    url: &str,
    rps: u64,
    duration: Duration,
    conns: u64,
    h2: bool,
    timeout: Duration,
) -> anyhow::Result<LoadReport> {
    let uri: http::Uri = url.parse().with_context(|| format!("url {url:?}"))?;
    let total = (rps as f64 * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rps.max(1) as f64);
    let start = Instant::now() + Duration::from_millis(20);
    // Open loop: a dispatcher thread releases each request at its scheduled time (thread
    // sleeps are precise to tens of microseconds; tokio's timer has millisecond granularity),
    // and latency counts from that scheduled time, so a stall is charged to every request it
    // delays (no coordinated omission).
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let dispatcher = std::thread::spawn(move || {
        for i in 0..total {
            let scheduled = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            if tx.send(scheduled).is_err() {
                break;
            }
        }
    });
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let hist = Arc::new(std::sync::Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    ));
    let failures = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..conns.max(1) {
        // One client per worker: each worker is one connection, as in a fixed-connection test.
        let client = http_client_for(h2);
        let (uri, rx, hist, failures, ok) = (
            uri.clone(),
            rx.clone(),
            hist.clone(),
            failures.clone(),
            ok.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let Some(scheduled) = rx.lock().await.recv().await else {
                    break;
                };
                let req = Request::get(uri.clone())
                    .body(Full::new(Bytes::new()))
                    .expect("valid request");
                let result = tokio::time::timeout(timeout, async {
                    let resp = client.request(req).await?;
                    let status = resp.status();
                    resp.into_body().collect().await?;
                    Ok::<_, BoxError>(status)
                })
                .await;
                let elapsed = scheduled.elapsed();
                match result {
                    Ok(Ok(s)) if s.is_success() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        let _ = hist.lock().expect("histogram lock").record(
                            u64::try_from(elapsed.as_micros())
                                .unwrap_or(u64::MAX)
                                .max(1),
                        );
                    }
                    Ok(Ok(s)) => {
                        *failures
                            .lock()
                            .expect("lock")
                            .entry(format!("status {}", s.as_u16()))
                            .or_default() += 1
                    }
                    Ok(Err(e)) => {
                        *failures
                            .lock()
                            .expect("lock")
                            .entry(error_chain(&*e))
                            .or_default() += 1
                    }
                    Err(_) => {
                        *failures
                            .lock()
                            .expect("lock")
                            .entry("timeout".into())
                            .or_default() += 1
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    dispatcher
        .join()
        .map_err(|_| anyhow::anyhow!("dispatcher panicked"))?;
    let elapsed = start.elapsed().as_secs_f64().max(0.001);
    let hist = hist.lock().expect("lock");
    let failures = failures.lock().expect("lock").clone();
    let ok = ok.load(Ordering::Relaxed);
    Ok(LoadReport {
        ok,
        failed: failures.values().sum(),
        failures,
        rps: (ok as f64) / elapsed,
        p50_us: hist.value_at_quantile(0.50),
        p90_us: hist.value_at_quantile(0.90),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
    })
}
