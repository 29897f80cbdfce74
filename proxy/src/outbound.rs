//! The outbound listener (15001): what the app sends, redirected here, goes to the service it
//! meant, over mesh mTLS when the endpoint has a sidecar.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, debug_span, warn};
use weft_api::config::{OutboundTrafficPolicy, Protocol};

use crate::app::Proxy;
use crate::detect::{self, Detected};
use crate::http::{self as h, Body, ServerProto};
use crate::metrics::{Direction, Outcome, Proto};
use crate::pool::{self, H2Key, PoolError};
use crate::snapshot::{Endpoint, Target};
use crate::{socket, tcp, tls};

/// How many endpoints a connection or request tries when connecting fails.
const CONNECT_ATTEMPTS: usize = 3;

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
        let detected = match target.protocol {
            Protocol::Tcp | Protocol::Tls => Detected::Tcp,
            _ => match detect::detect(&stream, config.detect_timeout).await {
                Ok(d) => d,
                Err(error) => {
                    debug!(%error, "client went away during detection");
                    return;
                }
            },
        };
        match detected {
            Detected::Http1 => serve_http(proxy, stream, target, Proto::Http1).await,
            Detected::Http2 => serve_http(proxy, stream, target, Proto::Http2).await,
            Detected::Tls => forward_tcp(&proxy, stream, &target, Proto::Tls).await,
            Detected::Tcp => forward_tcp(&proxy, stream, &target, Proto::Tcp).await,
        }
    }
    .instrument(span)
    .await
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

async fn forward_tcp(proxy: &Proxy, mut stream: TcpStream, target: &Target, proto: Proto) {
    let tls = proxy.identity.current();
    let mut last_error = None;
    for _ in 0..CONNECT_ATTEMPTS.min(target.cluster.endpoints.len().max(1)) {
        let Some(ep) = target.cluster.pick() else {
            break;
        };
        let timeout = target
            .cluster
            .connect_timeout
            .unwrap_or(proxy.settings.connect_timeout);
        let result = match (&ep.identity, tls.as_deref()) {
            (Some(id), Some(ctx)) => {
                match pool::connect_tls(ctx, ep.addr, id, tls::ALPN_TCP, timeout).await {
                    Ok(mut up) => {
                        tcp::splice(&proxy.metrics, Direction::Outbound, &mut stream, &mut up)
                            .await;
                        Ok(true)
                    }
                    Err(e) => Err(e),
                }
            }
            (Some(_), None) => Err(PoolError::NoIdentity),
            (None, _) => match socket::connect(ep.addr, timeout).await {
                Ok(mut up) => {
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
                last_error = Some(error);
            }
        }
    }
    let outcome = match last_error {
        Some(PoolError::Tls { .. }) => Outcome::RefusedTls,
        _ => Outcome::Error,
    };
    if last_error.is_none() {
        warn!(cluster = %target.cluster.name, "no endpoint for tcp connection");
    }
    proxy
        .metrics
        .connection(Direction::Outbound, proto, outcome, false);
}

async fn serve_http(proxy: Arc<Proxy>, stream: TcpStream, target: Arc<Target>, proto: Proto) {
    let svc = OutboundHttp {
        proxy: proxy.clone(),
        target,
        proto,
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

/// Forwards each request of one app connection to the target's endpoints.
#[derive(Clone)]
struct OutboundHttp {
    proxy: Arc<Proxy>,
    target: Arc<Target>,
    proto: Proto,
}

impl hyper::service::Service<Request<Incoming>> for OutboundHttp {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let start = Instant::now();
            let (resp, mtls) = this.forward(req).await;
            this.proxy
                .record_request(Direction::Outbound, this.proto, resp.status(), mtls, start);
            Ok(resp)
        })
    }
}

impl OutboundHttp {
    async fn forward(&self, mut req: Request<Incoming>) -> (Response<Body>, bool) {
        let grpc = h::is_grpc(&req);
        let cluster = &self.target.cluster;
        if h::is_upgrade(&req) {
            return self.forward_upgrade(req, grpc).await;
        }
        let authority = h::authority(&req).or_else(|| {
            format!("{}:{}", self.target.hostname, self.target.port)
                .parse()
                .ok()
        });
        h::strip_hop_by_hop(req.headers_mut());
        req.headers_mut().remove(h::ORIGIN_PROTO_HEADER);
        let origin_h1 = req.version() != Version::HTTP_2;
        let (parts, body) = req.into_parts();
        let mut req = Request::from_parts(parts, h::boxed(body));
        if let Some(a) = authority {
            h::set_absolute_uri(&mut req, a);
        }
        let tls = self.proxy.identity.current();
        let attempts = CONNECT_ATTEMPTS.min(cluster.endpoints.len().max(1));
        for attempt in 1..=attempts {
            let Some(ep) = cluster.pick() else { break };
            match self.send(ep, req, origin_h1, tls.as_deref()).await {
                Ok(resp) => return resp,
                Err((error, returned)) => {
                    warn!(endpoint = %ep.addr, %error, attempt, "upstream request failed");
                    match returned {
                        // Nothing was sent: the same request can go to another endpoint.
                        Some(r) if attempt < attempts => req = r,
                        _ => {
                            let msg = format!(
                                "upstream connect error or disconnect/reset before headers: {error}"
                            );
                            return (
                                h::error_response(StatusCode::SERVICE_UNAVAILABLE, grpc, &msg),
                                ep.identity.is_some(),
                            );
                        }
                    }
                }
            }
        }
        (
            h::error_response(StatusCode::SERVICE_UNAVAILABLE, grpc, "no healthy upstream"),
            false,
        )
    }

    /// Sends one request to one endpoint. On a failure before anything was sent, the request
    /// is handed back for another attempt.
    async fn send(
        &self,
        ep: &Endpoint,
        mut req: Request<Body>,
        origin_h1: bool,
        tls: Option<&tls::TlsContext>,
    ) -> Result<(Response<Body>, bool), (SendError, Option<Request<Body>>)> {
        let timeout = self.target.cluster.connect_timeout;
        match &ep.identity {
            Some(id) => {
                let key = H2Key {
                    addr: ep.addr,
                    identity: Some(id.clone()),
                };
                let mut sender = match self.proxy.pools.h2(&key, tls, timeout).await {
                    Ok(s) => s,
                    Err(e) => return Err((SendError::Pool(e), Some(req))),
                };
                if origin_h1 {
                    req.headers_mut()
                        .insert(h::ORIGIN_PROTO_HEADER, http::HeaderValue::from_static("h1"));
                }
                req.headers_mut().remove(http::header::HOST);
                *req.version_mut() = Version::HTTP_2;
                if sender.ready().await.is_err() {
                    return Err((SendError::Closed, Some(req)));
                }
                match sender.send_request(req).await {
                    Ok(resp) => Ok((upstream_response(resp), true)),
                    Err(e) => Err((SendError::Http(e), None)),
                }
            }
            None if origin_h1 => {
                let authority = h::authority(&req);
                if let Some(a) = &authority
                    && !req.headers().contains_key(http::header::HOST)
                    && let Ok(v) = http::HeaderValue::from_str(a.as_str())
                {
                    req.headers_mut().insert(http::header::HOST, v);
                }
                let addr_authority = ep
                    .addr
                    .to_string()
                    .parse()
                    .expect("a socket address is an authority");
                h::set_absolute_uri(&mut req, addr_authority);
                *req.version_mut() = Version::HTTP_11;
                match self.proxy.pools.send_h1(req).await {
                    Ok(resp) => Ok((upstream_response(resp), false)),
                    Err(e) => Err((SendError::Client(e), None)),
                }
            }
            None => {
                let key = H2Key {
                    addr: ep.addr,
                    identity: None,
                };
                let mut sender = match self.proxy.pools.h2(&key, None, timeout).await {
                    Ok(s) => s,
                    Err(e) => return Err((SendError::Pool(e), Some(req))),
                };
                if sender.ready().await.is_err() {
                    return Err((SendError::Closed, Some(req)));
                }
                match sender.send_request(req).await {
                    Ok(resp) => Ok((upstream_response(resp), false)),
                    Err(e) => Err((SendError::Http(e), None)),
                }
            }
        }
    }

    async fn forward_upgrade(&self, req: Request<Incoming>, grpc: bool) -> (Response<Body>, bool) {
        let Some(ep) = self.target.cluster.pick() else {
            return (
                h::error_response(StatusCode::SERVICE_UNAVAILABLE, grpc, "no healthy upstream"),
                false,
            );
        };
        let timeout = self
            .target
            .cluster
            .connect_timeout
            .unwrap_or(self.proxy.settings.connect_timeout);
        let drain = &self.proxy.drain;
        let result = match (&ep.identity, self.proxy.identity.current()) {
            (Some(id), Some(ctx)) => {
                match pool::connect_tls(&ctx, ep.addr, id, tls::ALPN_H1, timeout).await {
                    Ok(io) => h::forward_upgrade(req, io, drain)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            (Some(_), None) => Err(PoolError::NoIdentity.to_string()),
            (None, _) => match socket::connect(ep.addr, timeout).await {
                Ok(io) => h::forward_upgrade(req, io, drain)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        };
        match result {
            Ok(resp) => (resp, ep.identity.is_some()),
            Err(error) => {
                warn!(endpoint = %ep.addr, %error, "upgrade request failed");
                (
                    h::error_response(StatusCode::SERVICE_UNAVAILABLE, grpc, &error),
                    ep.identity.is_some(),
                )
            }
        }
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
}
