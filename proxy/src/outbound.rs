//! The outbound listener (15001): what the app sends, redirected here, goes to the service it
//! meant, routed and balanced, over mesh mTLS when the endpoint has a sidecar.
//!
//! HTTP requests go through the port's routes, taken from the config current when the
//! request arrives (first match wins; a port without routes has one catch-all route to its
//! cluster): CORS preflight, fault injection, then the action
//! (redirect, direct response, or forward: destination by weight, header operations,
//! rewrite, mirrors, and tries with per-try timeouts, retries under the cluster's budget and
//! circuit breaker, each try's outcome feeding outlier detection and the latency EWMA),
//! then response header operations. TCP and TLS connections go through the port's TCP
//! routes (port, destination subnet, and the SNI read from the app's ClientHello).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::Scheme;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{CaptureConnection, capture_connection};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, info, warn};
use weft_api::config::{OutboundTrafficPolicy, Protocol};

use crate::app::Proxy;
use crate::balance::{self, HashPolicy, PickContext, RequestHash};
use crate::breaker::{ConnectionPermit, Overflow};
use crate::detect::{self, Detected};
use crate::http::{self as h, Body, ServerProto};
use crate::metrics::{Direction, Metrics, Outcome, Proto};
use crate::outlier::Observation;
use crate::pool::{self, H2Key, PoolError};
use crate::replay::{self, ReplayBody};
use crate::retry::{self, RetryPermit, TryOutcome};
use crate::rewrite::HeaderOps;
use crate::route::{Action, CompiledRoute, ConnectionFacts, Destination, Forward};
use crate::snapshot::{Cluster, Endpoint, Picked, Target};
use crate::{fault, mirror, socket, tcp, tls};

/// How many endpoints a connection or request tries when connecting fails (without a retry
/// policy: nothing was sent, so another endpoint is always safe).
const CONNECT_ATTEMPTS: usize = 3;
/// Longest wait for the app's ClientHello when TCP routes match on SNI.
const SNI_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest ClientHello inspected for SNI.
const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// Marks a failure as a circuit-breaker overflow (answered with `x-envoy-overloaded`).
const OVERFLOW: &str = "overflow: ";
/// Longest a shadow request may take.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Handles one connection accepted on the outbound listener.
pub async fn handle(proxy: Arc<Proxy>, stream: TcpStream, client: SocketAddr) {
    let _active = proxy.metrics.open(Direction::Outbound);
    let dst = match socket::original_dst(&stream) {
        Ok(dst) => socket::canonical(dst),
        Err(error) => {
            debug!(%client, %error, "outbound connection without original destination refused");
            proxy.metrics.connection(
                Direction::Outbound,
                Proto::Unknown,
                Outcome::RefusedLoop,
                false,
            );
            return;
        }
    };
    if dst.port() == proxy.settings.ports.outbound {
        warn!(%client, %dst, "connection to the outbound listener itself refused (loop)");
        proxy.metrics.connection(
            Direction::Outbound,
            Proto::Unknown,
            Outcome::RefusedLoop,
            false,
        );
        return;
    }
    serve_connection(proxy, stream, client, dst).await;
}

/// Serves one accepted connection as outbound traffic the app meant for `dst` (what
/// [`handle`] does once it knows the original destination). Tests call it directly.
pub async fn serve_connection(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
) {
    let span = debug_span!("outbound", %client, %dst);
    async move {
        let config = proxy.config.load_full();
        let Some(target) = config.resolve(dst) else {
            return passthrough(
                &proxy,
                stream,
                dst,
                config.snapshot.mesh.outbound_traffic_policy,
            )
            .await;
        };
        let detected = match detect::for_port(&stream, target.protocol, config.detect_timeout).await
        {
            Ok(d) => d,
            Err(error) => {
                debug!(%error, "client went away during detection");
                return;
            }
        };
        let conn = Conn { client, dst };
        match detected {
            Detected::Http1 => serve_http(proxy, stream, target, Proto::Http1, conn).await,
            Detected::Http2 => serve_http(proxy, stream, target, Proto::Http2, conn).await,
            Detected::Tls => forward_tcp(&proxy, stream, &target, Proto::Tls, conn).await,
            Detected::Tcp => {
                let proto = if target.protocol == Protocol::Tls {
                    Proto::Tls
                } else {
                    Proto::Tcp
                };
                forward_tcp(&proxy, stream, &target, proto, conn).await
            }
        }
    }
    .instrument(span)
    .await
}

/// The two ends of the app's connection.
#[derive(Debug, Clone, Copy)]
struct Conn {
    client: SocketAddr,
    dst: SocketAddr,
}

/// A destination the config does not know: ALLOW_ANY forwards it untouched, REGISTRY_ONLY
/// refuses it.
async fn passthrough(
    proxy: &Proxy,
    mut stream: TcpStream,
    dst: SocketAddr,
    policy: OutboundTrafficPolicy,
) {
    if policy == OutboundTrafficPolicy::RegistryOnly {
        debug!("unknown destination refused (REGISTRY_ONLY)");
        proxy.metrics.connection(
            Direction::Outbound,
            Proto::Tcp,
            Outcome::RefusedUnknown,
            false,
        );
        return;
    }
    let outcome = match socket::connect(dst, proxy.settings.connect_timeout).await {
        Ok(mut upstream) => {
            tcp::splice(
                &proxy.metrics,
                Direction::Outbound,
                &mut stream,
                &mut upstream,
            )
            .await;
            Outcome::Passthrough
        }
        Err(error) => {
            debug!(%error, "passthrough connect failed");
            Outcome::Error
        }
    };
    proxy
        .metrics
        .connection(Direction::Outbound, Proto::Tcp, outcome, false);
}

/// The SNI of the app's TLS ClientHello, read without consuming it.
async fn peek_sni(stream: &TcpStream) -> Option<String> {
    let deadline = Instant::now() + SNI_TIMEOUT;
    let mut buf = vec![0u8; MAX_CLIENT_HELLO];
    let mut backoff = Duration::from_micros(200);
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 || buf[0] != 0x16 {
            return None;
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            if acceptor.read_tls(&mut rd).is_err() {
                return None;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return accepted.client_hello().server_name().map(str::to_owned),
            Ok(None) if n < MAX_CLIENT_HELLO && Instant::now() < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(10));
            }
            _ => return None,
        }
    }
}

async fn forward_tcp(
    proxy: &Proxy,
    mut stream: TcpStream,
    target: &Target,
    proto: Proto,
    conn: Conn,
) {
    let cluster = if target.tcp_routes.is_empty() {
        target.cluster.clone()
    } else {
        let sni = if target.tcp_routes.needs_sni() {
            peek_sni(&stream).await
        } else {
            None
        };
        let facts = ConnectionFacts {
            port: conn.dst.port(),
            dst: conn.dst,
            sni: sni.as_deref(),
        };
        match target.tcp_routes.select(&facts).and_then(|r| r.pick()) {
            Some(c) => c.clone(),
            None => target.cluster.clone(),
        }
    };
    let state = cluster.state().clone();
    let _permit = match state.breaker.try_connection(&cluster.limits) {
        Ok(p) => p,
        Err(overflow) => {
            Metrics::cluster_event(
                &proxy.metrics.upstream_overflow,
                &cluster.name,
                overflow.as_str(),
            );
            warn!(cluster = %cluster.name, "tcp connection refused: maxConnections reached");
            proxy
                .metrics
                .connection(Direction::Outbound, proto, Outcome::Error, false);
            return;
        }
    };
    let tls = proxy.identity.current();
    let timeout = cluster
        .connect_timeout
        .unwrap_or(proxy.settings.connect_timeout);
    let hash = match &cluster.hash {
        Some(HashPolicy::SourceIp) => Some(balance::hash_ip(conn.client.ip())),
        _ => None,
    };
    let mut last_error = None;
    let mut avoid = None;
    for _ in 0..CONNECT_ATTEMPTS.min(cluster.endpoints.len().max(1)) {
        let ctx = PickContext {
            hash,
            dst: Some(conn.dst),
            avoid,
            now: Instant::now(),
        };
        let Some(picked) = cluster.select(&ctx) else {
            break;
        };
        let ep = &picked.endpoint;
        avoid = Some(ep.addr);
        let result = match (&ep.identity, tls.as_deref(), &cluster.upstream_tls) {
            (Some(id), Some(ctx), _) => {
                match pool::connect_tls(ctx, ep.addr, id, tls::ALPN_TCP, timeout).await {
                    Ok(mut up) => {
                        observe(
                            proxy,
                            &cluster,
                            &picked,
                            Observation::Status(StatusCode::OK),
                        );
                        let _in_flight = picked.state.start();
                        tcp::splice(&proxy.metrics, Direction::Outbound, &mut stream, &mut up)
                            .await;
                        Ok(true)
                    }
                    Err(e) => Err(e),
                }
            }
            (Some(_), None, _) => Err(PoolError::NoIdentity),
            (None, _, Some(utls)) => match utls.connect(ep.addr, utls.tcp.clone(), timeout).await {
                Ok(mut up) => {
                    observe(
                        proxy,
                        &cluster,
                        &picked,
                        Observation::Status(StatusCode::OK),
                    );
                    let _in_flight = picked.state.start();
                    tcp::splice(&proxy.metrics, Direction::Outbound, &mut stream, &mut up).await;
                    Ok(false)
                }
                Err(source) => Err(PoolError::Tls {
                    addr: ep.addr,
                    source,
                }),
            },
            (None, _, None) => match socket::connect(ep.addr, timeout).await {
                Ok(mut up) => {
                    if let Some(k) = &cluster.pool.keepalive {
                        let _ = pool::set_keepalive(&up, k);
                    }
                    observe(
                        proxy,
                        &cluster,
                        &picked,
                        Observation::Status(StatusCode::OK),
                    );
                    let _in_flight = picked.state.start();
                    tcp::splice(&proxy.metrics, Direction::Outbound, &mut stream, &mut up).await;
                    Ok(false)
                }
                Err(source) => Err(PoolError::Connect {
                    addr: ep.addr,
                    source,
                }),
            },
        };
        match result {
            Ok(mtls) => {
                proxy
                    .metrics
                    .connection(Direction::Outbound, proto, Outcome::Success, mtls);
                return;
            }
            Err(error) => {
                warn!(endpoint = %ep.addr, %error, "upstream connect failed");
                observe(proxy, &cluster, &picked, Observation::LocalFailure);
                last_error = Some(error);
            }
        }
    }
    let outcome = match last_error {
        Some(PoolError::Tls { .. }) => Outcome::RefusedTls,
        _ => Outcome::Error,
    };
    if last_error.is_none() {
        warn!(cluster = %cluster.name, "no endpoint for tcp connection");
    }
    proxy
        .metrics
        .connection(Direction::Outbound, proto, outcome, false);
}

/// Feeds outlier detection and counts an ejection.
fn observe(proxy: &Proxy, cluster: &Cluster, picked: &Picked, obs: Observation) {
    if let Some(time) = cluster.observe(picked, obs) {
        Metrics::cluster_event(&proxy.metrics.outlier_ejections, &cluster.name, "ejected");
        info!(cluster = %cluster.name, endpoint = %picked.endpoint.addr, ?time, "endpoint ejected");
    }
}

async fn serve_http(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    target: Arc<Target>,
    proto: Proto,
    conn: Conn,
) {
    let svc = OutboundHttp {
        proxy: proxy.clone(),
        target,
        proto,
        conn,
    };
    let server = if proto == Proto::Http2 {
        ServerProto::Http2
    } else {
        ServerProto::Http1
    };
    let outcome = match h::serve(stream, server, svc, &proxy.drain).await {
        Ok(()) => Outcome::Success,
        Err(error) => {
            debug!(%error, "client connection ended with error");
            Outcome::Error
        }
    };
    proxy
        .metrics
        .connection(Direction::Outbound, proto, outcome, true);
}

/// Routes and forwards each request of one app connection.
#[derive(Clone)]
struct OutboundHttp {
    proxy: Arc<Proxy>,
    target: Arc<Target>,
    proto: Proto,
    conn: Conn,
}

impl hyper::service::Service<Request<Incoming>> for OutboundHttp {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let start = std::time::Instant::now();
            let (resp, mtls) = this.route(req).await;
            this.proxy
                .record_request(Direction::Outbound, this.proto, resp.status(), mtls, start);
            Ok(resp)
        })
    }
}

/// What changes a response on its way back to the app.
struct ResponseOps<'a> {
    route: &'a CompiledRoute,
    destination: Option<&'a HeaderOps>,
    cors: Option<HeaderValue>,
    set_cookie: Option<HeaderValue>,
}

impl ResponseOps<'_> {
    fn apply(&self, resp: &mut Response<Body>) {
        let headers = resp.headers_mut();
        if let Some(ops) = self.destination {
            ops.apply(headers);
        }
        self.route.response_headers.apply(headers);
        if let (Some(cors), Some(origin)) = (&self.route.cors, &self.cors) {
            cors.decorate(origin.clone(), headers);
        }
        if let Some(c) = &self.set_cookie {
            headers.append(header::SET_COOKIE, c.clone());
        }
    }
}

/// A finished try: the response, whether the hop was mesh mTLS, and the connection permit
/// of an HTTP/1 upstream.
struct Sent {
    resp: Response<Body>,
    mtls: bool,
    conn: Option<ConnectionPermit>,
}

impl OutboundHttp {
    /// Where a request goes: the current config's target, so that route and endpoint
    /// changes reach long-lived app connections (keep-alive, HTTP/2) at their next request;
    /// the connection's own target when the destination has left the config. Requests in
    /// flight keep the clusters they picked.
    fn current_target(&self) -> Arc<Target> {
        self.proxy
            .config
            .load()
            .resolve(self.conn.dst)
            .unwrap_or_else(|| self.target.clone())
    }

    async fn route(&self, req: Request<Incoming>) -> (Response<Body>, bool) {
        let grpc = h::is_grpc(&req);
        let upgrade = h::is_upgrade(&req);
        let (mut parts, body) = req.into_parts();
        let target = self.current_target();
        let Some(sel) = target.routes.select(&parts, self.conn.dst.port()) else {
            debug!(path = parts.uri.path(), "no route matched");
            return (
                h::error_response(StatusCode::NOT_FOUND, grpc, "route not found"),
                false,
            );
        };
        let route = sel.route;
        let mut ops = ResponseOps {
            route,
            destination: None,
            cors: None,
            set_cookie: None,
        };
        // Istio's filter order: CORS, then fault injection, then the router.
        if let Some(cors) = &route.cors {
            if let Some(mut resp) = cors.preflight(&parts) {
                route.response_headers.apply(resp.headers_mut());
                return (resp, false);
            }
            ops.cors = cors.allowed_origin(&parts.headers).cloned();
        }
        if let Some(f) = &route.fault {
            let d = f.decide();
            if let Some(delay) = d.delay {
                Metrics::kind_event(&self.proxy.metrics.faults, "delay");
                tokio::time::sleep(delay).await;
            }
            if let Some(abort) = d.abort {
                Metrics::kind_event(&self.proxy.metrics.faults, "abort");
                let mut resp = fault::abort_response(abort, grpc);
                ops.apply(&mut resp);
                return (resp, false);
            }
        }
        let fwd = match &route.action {
            Action::Redirect(r) => {
                let mut resp = r.response(&parts, sel.matched_prefix());
                ops.apply(&mut resp);
                return (resp, false);
            }
            Action::Direct(d) => {
                let mut resp = d.response();
                ops.apply(&mut resp);
                return (resp, false);
            }
            Action::Forward(f) => f,
        };
        let dest = fwd.pick_destination();
        ops.destination = Some(&dest.response_headers);
        if !upgrade {
            h::strip_hop_by_hop(&mut parts.headers);
        }
        parts.headers.remove(h::ORIGIN_PROTO_HEADER);
        let authority = crate::route::request_authority(&parts)
            .and_then(|a| a.parse().ok())
            .or_else(|| format!("{}:{}", target.hostname, target.port).parse().ok());
        // Upgrades keep the origin form the app sent (WebSocket servers expect it).
        if let Some(a) = authority.filter(|_| !upgrade) {
            let mut req = Request::from_parts(parts, ());
            h::set_absolute_uri(&mut req, a);
            parts = req.into_parts().0;
        }
        dest.request_headers.apply(&mut parts.headers);
        route.request_headers.apply(&mut parts.headers);
        if let Some(rw) = &fwd.rewrite {
            rw.apply(&mut parts, sel.matched_prefix());
        }
        let cluster = &dest.cluster;
        let hash = cluster
            .hash
            .as_ref()
            .map(|p| p.hash(&parts, self.conn.client.ip()))
            .unwrap_or_default();
        let (mut resp, mtls) = if upgrade {
            self.forward_upgrade(Request::from_parts(parts, body), grpc, cluster, &hash)
                .await
        } else {
            self.forward(parts, body, fwd, dest, grpc, &hash).await
        };
        ops.set_cookie = hash.set_cookie;
        ops.apply(&mut resp);
        (resp, mtls)
    }

    /// Tries, retries and mirrors of one forwarded request.
    async fn forward(
        &self,
        parts: Parts,
        body: Incoming,
        fwd: &Forward,
        dest: &Destination,
        grpc: bool,
        hash: &RequestHash,
    ) -> (Response<Body>, bool) {
        let cluster = &dest.cluster;
        let metrics = &self.proxy.metrics;
        let started = Instant::now();
        let deadline = fwd.timeout.map(|t| started + t);
        let origin_h1 = parts.version != Version::HTTP_2;
        let mirrors: Vec<&mirror::MirrorPolicy> = fwd
            .mirrors
            .iter()
            .filter(|m| m.fires(fastrand::f64() * 100.0))
            .collect();
        let policy = fwd.retry.as_ref();
        let body = h::boxed(body);
        let empty_body = http_body::Body::is_end_stream(&body);
        let needs_copy = policy.is_some() || !mirrors.is_empty();
        let mut template = needs_copy.then(|| {
            let mut t = parts.clone();
            t.extensions = http::Extensions::new();
            t
        });
        if empty_body && let Some(t) = &template {
            for m in &mirrors {
                self.spawn_mirror(m, t, Bytes::new(), origin_h1);
            }
        }
        let (first_body, replay) = if needs_copy && !empty_body {
            let r = ReplayBody::new(body, replay::DEFAULT_CAP);
            let first = r.replay().map(h::boxed).unwrap_or_else(h::empty);
            (first, Some(r))
        } else {
            (body, None)
        };
        let mut next: Option<Request<Body>> = Some(Request::from_parts(parts, first_body));
        let tries = 1 + policy.map_or(0, |p| p.attempts);
        let state = cluster.state().clone();
        let tls = self.proxy.identity.current();
        let mut attempt = 0u32;
        let mut connect_fallbacks = 0usize;
        let mut avoid = None;
        let mut retry_permit: Option<RetryPermit> = None;
        let result = loop {
            attempt += 1;
            let req = match next.take() {
                Some(r) => r,
                None => {
                    let rebuilt = template.as_ref().and_then(|t| {
                        let body = match &replay {
                            Some(r) => h::boxed(r.replay()?),
                            None => h::empty(),
                        };
                        Some(Request::from_parts(t.clone(), body))
                    });
                    match rebuilt {
                        Some(r) => r,
                        None => {
                            break Err((
                                StatusCode::SERVICE_UNAVAILABLE,
                                "upstream reset and the request cannot be replayed".to_owned(),
                                false,
                            ));
                        }
                    }
                }
            };
            let permit = match state.breaker.try_request(&cluster.limits) {
                Ok(p) => p,
                Err(o) => break Err(self.overflow(cluster, o)),
            };
            let ctx = PickContext {
                hash: hash.hash,
                dst: Some(self.conn.dst),
                avoid,
                now: Instant::now(),
            };
            let Some(picked) = cluster.select(&ctx) else {
                break Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy upstream".to_owned(),
                    false,
                ));
            };
            avoid = Some(picked.endpoint.addr);
            let in_flight = picked.state.start();
            let now = Instant::now();
            let try_deadline = match (policy.and_then(|p| p.per_try_timeout), deadline) {
                (Some(t), Some(d)) => Some((now + t).min(d)),
                (Some(t), None) => Some(now + t),
                (None, d) => d,
            };
            let send = send_once(
                &self.proxy,
                cluster,
                &picked.endpoint,
                req,
                origin_h1,
                tls.as_deref(),
            );
            let result = match try_deadline {
                Some(d) => tokio::time::timeout_at(d, send).await.ok(),
                None => Some(send.await),
            };
            let mesh = picked.endpoint.identity.is_some();
            // What the try says, and whether (and how) it may go again.
            let (outcome_ok, retry_from): (Option<Sent>, Option<Option<Request<Body>>>) =
                match result {
                    Some(Ok(sent)) => {
                        picked.state.observe_latency(now.elapsed(), Instant::now());
                        let status = outlier_status(&sent.resp);
                        observe(&self.proxy, cluster, &picked, Observation::Status(status));
                        let retriable = policy.is_some_and(|p| {
                            p.retriable(TryOutcome::Response {
                                status: sent.resp.status(),
                                headers: sent.resp.headers(),
                            })
                        });
                        if retriable && attempt < tries {
                            (Some(sent), Some(None))
                        } else {
                            if retriable {
                                Metrics::cluster_event(
                                    &metrics.upstream_retries,
                                    &cluster.name,
                                    "attempts_exhausted",
                                );
                            }
                            (Some(sent), None)
                        }
                    }
                    Some(Err((SendError::Overflow(o), _))) => break Err(self.overflow(cluster, o)),
                    Some(Err((error, returned))) => {
                        warn!(endpoint = %picked.endpoint.addr, %error, attempt, "upstream request failed");
                        observe(&self.proxy, cluster, &picked, Observation::LocalFailure);
                        let outcome = error.outcome(returned.is_some());
                        let connect = matches!(outcome, TryOutcome::ConnectFailure);
                        let n = cluster.endpoints.len().max(1);
                        if connect
                            && policy.is_none()
                            && returned.is_some()
                            && connect_fallbacks + 1 < CONNECT_ATTEMPTS.min(n)
                        {
                            // Nothing was sent: another endpoint is safe without a retry policy.
                            connect_fallbacks += 1;
                            attempt -= 1;
                            next = returned;
                            drop((permit, in_flight));
                            continue;
                        }
                        if policy.is_some_and(|p| p.retriable(outcome)) && attempt < tries {
                            (None, Some(returned))
                        } else {
                            let msg = format!(
                                "upstream connect error or disconnect/reset before headers: {error}"
                            );
                            break Err((StatusCode::SERVICE_UNAVAILABLE, msg, mesh));
                        }
                    }
                    None => {
                        observe(&self.proxy, cluster, &picked, Observation::LocalFailure);
                        let overall = deadline.is_some_and(|d| Instant::now() >= d);
                        if !overall
                            && policy.is_some_and(|p| p.retriable(TryOutcome::Timeout))
                            && attempt < tries
                        {
                            (None, Some(None))
                        } else {
                            break Err((
                                StatusCode::GATEWAY_TIMEOUT,
                                "upstream request timeout".to_owned(),
                                mesh,
                            ));
                        }
                    }
                };
            match retry_from {
                None => {
                    let sent = outcome_ok.expect("a try without retry ended with a response");
                    if attempt > 1 {
                        Metrics::cluster_event(&metrics.upstream_retries, &cluster.name, "success");
                    }
                    break Ok((sent, permit, in_flight, picked));
                }
                Some(returned) => {
                    // A retry: the budget must allow it and the body must be replayable.
                    let replayable = returned.is_some()
                        || template.is_some()
                            && replay.as_ref().is_none_or(|r| r.replay().is_some());
                    let admitted = replayable
                        .then(|| {
                            state
                                .budget
                                .try_acquire(&cluster.budget, state.breaker.active())
                        })
                        .flatten();
                    match admitted {
                        Some(p) => {
                            Metrics::cluster_event(
                                &metrics.upstream_retries,
                                &cluster.name,
                                "retried",
                            );
                            retry_permit = Some(p);
                            drop((outcome_ok, permit, in_flight));
                            next = returned;
                            let pause = retry::backoff(attempt, fastrand::f64());
                            match deadline {
                                Some(d) if Instant::now() + pause >= d => {
                                    break Err((
                                        StatusCode::GATEWAY_TIMEOUT,
                                        "upstream request timeout".to_owned(),
                                        mesh,
                                    ));
                                }
                                _ => tokio::time::sleep(pause).await,
                            }
                        }
                        None => {
                            let kind = if replayable {
                                "budget_exhausted"
                            } else {
                                "not_replayable"
                            };
                            Metrics::cluster_event(&metrics.upstream_retries, &cluster.name, kind);
                            match outcome_ok {
                                Some(sent) => break Ok((sent, permit, in_flight, picked)),
                                None => {
                                    break Err((
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        "upstream reset; retry not admitted".to_owned(),
                                        mesh,
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        };
        if !empty_body
            && !mirrors.is_empty()
            && let (Some(t), Some(r)) = (template.take(), &replay)
        {
            match r.complete() {
                Some((data, _)) => {
                    for m in &mirrors {
                        self.spawn_mirror(m, &t, data.clone(), origin_h1);
                    }
                }
                None => {
                    for _ in &mirrors {
                        Metrics::kind_event(&metrics.mirror_requests, "skipped_body");
                    }
                }
            }
        }
        if attempt >= tries && tries > 1 && result.is_err() {
            Metrics::cluster_event(
                &metrics.upstream_retries,
                &cluster.name,
                "attempts_exhausted",
            );
        }
        match result {
            Ok((sent, permit, in_flight, _picked)) => {
                let Sent { resp, mtls, conn } = sent;
                let (parts, body) = resp.into_parts();
                let guard: Box<dyn Send> = Box::new((permit, in_flight, conn, retry_permit));
                (
                    Response::from_parts(parts, h::guarded(body, guard, deadline)),
                    mtls,
                )
            }
            Err((_, msg, mtls)) if msg.starts_with(OVERFLOW) => (
                h::overloaded_response(grpc, msg.trim_start_matches(OVERFLOW)),
                mtls,
            ),
            Err((status, msg, mtls)) => (h::error_response(status, grpc, &msg), mtls),
        }
    }

    fn overflow(&self, cluster: &Cluster, o: Overflow) -> (StatusCode, String, bool) {
        Metrics::cluster_event(
            &self.proxy.metrics.upstream_overflow,
            &cluster.name,
            o.as_str(),
        );
        debug!(cluster = %cluster.name, limit = o.as_str(), "circuit breaker overflow");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{OVERFLOW}{}", o.as_str()),
            false,
        )
    }

    fn spawn_mirror(
        &self,
        m: &mirror::MirrorPolicy,
        template: &Parts,
        body: Bytes,
        origin_h1: bool,
    ) {
        let proxy = self.proxy.clone();
        let cluster = m.cluster.clone();
        let body = if body.is_empty() {
            h::empty()
        } else {
            Full::new(body).map_err(|e| match e {}).boxed_unsync()
        };
        let req = mirror::shadow_request(template, body);
        let started = mirror::spawn(async move {
            let Some(picked) = cluster.select(&PickContext::now()) else {
                Metrics::kind_event(&proxy.metrics.mirror_requests, "failed");
                return;
            };
            let _in_flight = picked.state.start();
            let tls = proxy.identity.current();
            let send = send_once(
                &proxy,
                &cluster,
                &picked.endpoint,
                req,
                origin_h1,
                tls.as_deref(),
            );
            let outcome = match tokio::time::timeout(MIRROR_TIMEOUT, send).await {
                Ok(Ok(sent)) => {
                    let _ = sent.resp.into_body().collect().await;
                    "sent"
                }
                _ => "failed",
            };
            Metrics::kind_event(&proxy.metrics.mirror_requests, outcome);
        });
        if !started {
            Metrics::kind_event(&self.proxy.metrics.mirror_requests, "skipped_overflow");
        }
    }

    async fn forward_upgrade(
        &self,
        req: Request<Incoming>,
        grpc: bool,
        cluster: &Arc<Cluster>,
        hash: &RequestHash,
    ) -> (Response<Body>, bool) {
        let ctx = PickContext {
            hash: hash.hash,
            dst: Some(self.conn.dst),
            avoid: None,
            now: Instant::now(),
        };
        let Some(picked) = cluster.select(&ctx) else {
            return (
                h::error_response(StatusCode::SERVICE_UNAVAILABLE, grpc, "no healthy upstream"),
                false,
            );
        };
        let ep = &picked.endpoint;
        let timeout = cluster
            .connect_timeout
            .unwrap_or(self.proxy.settings.connect_timeout);
        let drain = &self.proxy.drain;
        let result = match (
            &ep.identity,
            self.proxy.identity.current(),
            &cluster.upstream_tls,
        ) {
            (Some(id), Some(ctx), _) => {
                match pool::connect_tls(&ctx, ep.addr, id, tls::ALPN_H1, timeout).await {
                    Ok(io) => h::forward_upgrade(req, io, drain)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            (Some(_), None, _) => Err(PoolError::NoIdentity.to_string()),
            (None, _, Some(utls)) => match utls.connect(ep.addr, utls.tcp.clone(), timeout).await {
                Ok(io) => h::forward_upgrade(req, io, drain)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            (None, _, None) => match socket::connect(ep.addr, timeout).await {
                Ok(io) => h::forward_upgrade(req, io, drain)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        };
        match result {
            Ok(resp) => {
                observe(
                    &self.proxy,
                    cluster,
                    &picked,
                    Observation::Status(resp.status()),
                );
                (resp, ep.identity.is_some())
            }
            Err(error) => {
                warn!(endpoint = %ep.addr, %error, "upgrade request failed");
                observe(&self.proxy, cluster, &picked, Observation::LocalFailure);
                (
                    h::error_response(StatusCode::SERVICE_UNAVAILABLE, grpc, &error),
                    ep.identity.is_some(),
                )
            }
        }
    }
}

/// The status outlier detection sees: a trailers-only gRPC error counts as the HTTP status
/// it stands for (as Envoy's router maps it).
fn outlier_status(resp: &Response<Body>) -> StatusCode {
    match retry::grpc_status(resp.headers()) {
        Some(14) => StatusCode::SERVICE_UNAVAILABLE,
        Some(4) => StatusCode::GATEWAY_TIMEOUT,
        Some(2 | 13 | 15) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => resp.status(),
    }
}

/// Sends one request to one endpoint of `cluster`. On a failure before anything was sent,
/// the request is handed back for another attempt.
async fn send_once(
    proxy: &Proxy,
    cluster: &Cluster,
    ep: &Endpoint,
    mut req: Request<Body>,
    origin_h1: bool,
    tls: Option<&tls::TlsContext>,
) -> Result<Sent, (SendError, Option<Request<Body>>)> {
    let timeout = cluster.connect_timeout;
    if let Some(client) = &cluster.tls_client {
        // TLS origination (SIMPLE / MUTUAL): the client pools and negotiates h2 or h1.
        if let Some(a) = h::authority(&req)
            && !req.headers().contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(header::HOST, v);
        }
        let addr_authority = ep
            .addr
            .to_string()
            .parse()
            .expect("a socket address is an authority");
        h::set_absolute_uri(&mut req, addr_authority);
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTPS);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = Version::HTTP_11;
        let captured = retiring(cluster, &mut req);
        return match client.request(req).await {
            Ok(resp) => {
                retire(cluster, captured.as_ref());
                Ok(Sent {
                    resp: upstream_response(resp),
                    mtls: false,
                    conn: None,
                })
            }
            Err(e) => Err((SendError::Client(e), None)),
        };
    }
    let state = cluster.state();
    match &ep.identity {
        Some(id) => {
            let key = H2Key {
                addr: ep.addr,
                identity: Some(id.clone()),
            };
            let _pending = if proxy.pools.h2_ready(&key) {
                None
            } else {
                match state.breaker.try_pending(&cluster.limits) {
                    Ok(p) => Some(p),
                    Err(o) => return Err((SendError::Overflow(o), Some(req))),
                }
            };
            let mut sender = match proxy.pools.h2_with(&key, tls, timeout, &cluster.pool).await {
                Ok(s) => s,
                Err(e) => return Err((SendError::Pool(e), Some(req))),
            };
            drop(_pending);
            if origin_h1 {
                req.headers_mut()
                    .insert(h::ORIGIN_PROTO_HEADER, HeaderValue::from_static("h1"));
            }
            req.headers_mut().remove(header::HOST);
            *req.version_mut() = Version::HTTP_2;
            if sender.ready().await.is_err() {
                return Err((SendError::Closed, Some(req)));
            }
            match sender.send_request(req).await {
                Ok(resp) => Ok(Sent {
                    resp: upstream_response(resp),
                    mtls: true,
                    conn: None,
                }),
                Err(e) => Err((SendError::Http(e), None)),
            }
        }
        None if origin_h1 => {
            let conn = match state.breaker.connection(&cluster.limits).await {
                Ok(c) => c,
                Err(o) => return Err((SendError::Overflow(o), Some(req))),
            };
            let authority = h::authority(&req);
            if let Some(a) = &authority
                && !req.headers().contains_key(header::HOST)
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(header::HOST, v);
            }
            let addr_authority = ep
                .addr
                .to_string()
                .parse()
                .expect("a socket address is an authority");
            h::set_absolute_uri(&mut req, addr_authority);
            *req.version_mut() = Version::HTTP_11;
            if cluster.pool.max_requests_per_connection == Some(1) {
                req.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            let captured = retiring(cluster, &mut req);
            match proxy.pools.h1_client(&cluster.pool).request(req).await {
                Ok(resp) => {
                    retire(cluster, captured.as_ref());
                    Ok(Sent {
                        resp: upstream_response(resp),
                        mtls: false,
                        conn: Some(conn),
                    })
                }
                Err(e) => Err((SendError::Client(e), None)),
            }
        }
        None => {
            let key = H2Key {
                addr: ep.addr,
                identity: None,
            };
            let _pending = if proxy.pools.h2_ready(&key) {
                None
            } else {
                match state.breaker.try_pending(&cluster.limits) {
                    Ok(p) => Some(p),
                    Err(o) => return Err((SendError::Overflow(o), Some(req))),
                }
            };
            let mut sender = match proxy
                .pools
                .h2_with(&key, None, timeout, &cluster.pool)
                .await
            {
                Ok(s) => s,
                Err(e) => return Err((SendError::Pool(e), Some(req))),
            };
            drop(_pending);
            if sender.ready().await.is_err() {
                return Err((SendError::Closed, Some(req)));
            }
            match sender.send_request(req).await {
                Ok(resp) => Ok(Sent {
                    resp: upstream_response(resp),
                    mtls: false,
                    conn: None,
                }),
                Err(e) => Err((SendError::Http(e), None)),
            }
        }
    }
}

/// Watches which pooled connection carries `req` when the cluster limits requests per
/// connection.
fn retiring(cluster: &Cluster, req: &mut Request<Body>) -> Option<CaptureConnection> {
    cluster
        .pool
        .max_requests_per_connection
        .map(|_| capture_connection(req))
}

/// Counts a request against its pooled connection, retiring the connection at the cluster's
/// `maxRequestsPerConnection`.
fn retire(cluster: &Cluster, captured: Option<&CaptureConnection>) {
    if let (Some(max), Some(c)) = (cluster.pool.max_requests_per_connection, captured) {
        pool::retire_after(c, max);
    }
}

fn upstream_response(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    h::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, h::boxed(body))
}

/// Why a request to one endpoint failed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Pool(PoolError),
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Http(hyper::Error),
    #[error(transparent)]
    Client(hyper_util::client::legacy::Error),
    #[error("circuit breaker overflow: {}", .0.as_str())]
    Overflow(Overflow),
}

/// True when an HTTP/2 stream was refused (nothing was processed).
fn refused_stream(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if let Some(h2e) = e.downcast_ref::<h2::Error>()
            && h2e.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

impl SendError {
    /// The retry condition this failure falls under.
    fn outcome(&self, nothing_sent: bool) -> TryOutcome<'static> {
        match self {
            SendError::Pool(_) | SendError::Closed => TryOutcome::ConnectFailure,
            SendError::Client(e) if e.is_connect() => TryOutcome::ConnectFailure,
            _ if nothing_sent => TryOutcome::ConnectFailure,
            SendError::Http(e) if refused_stream(e) => TryOutcome::RefusedStream,
            SendError::Client(e) if refused_stream(e) => TryOutcome::RefusedStream,
            _ => TryOutcome::Reset,
        }
    }
}
