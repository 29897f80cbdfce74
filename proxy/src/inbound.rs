//! The inbound listener (15006): connections to the pod, redirected here, are authenticated
//! per the port's mTLS mode and delivered to the app on localhost at their original port.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, debug_span, info, warn};
use weft_api::config::{MtlsMode, Protocol};

use crate::app::Proxy;
use crate::detect::{self, Detected};
use crate::http::{self as h, Body, ServerProto};
use crate::metrics::{Direction, Outcome, Proto};
use crate::pool::H2Key;
use crate::tls::{self, PeerIdentity};
use crate::{socket, tcp};

/// Longest a mesh TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest ClientHello inspected for mesh ALPN.
const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// What the first bytes of an inbound connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// A TLS ClientHello offering a mesh ALPN: a sidecar.
    Mesh,
    /// Anything else, as detected.
    Plain(Detected),
}

/// Handles one connection accepted on the inbound listener.
pub async fn handle(proxy: Arc<Proxy>, stream: TcpStream, client: SocketAddr) {
    let _active = proxy.metrics.open(Direction::Inbound);
    let dst = match socket::original_dst(&stream) {
        Ok(dst) => socket::canonical(dst),
        Err(error) => {
            debug!(%client, %error, "inbound connection without original destination refused");
            proxy.metrics.connection(
                Direction::Inbound,
                Proto::Unknown,
                Outcome::RefusedLoop,
                false,
            );
            return;
        }
    };
    if proxy.settings.ports.all().contains(&dst.port()) {
        // Inbound delivers to localhost: without this, the admin port (localhost only)
        // would be reachable from outside the pod through the capture.
        warn!(%client, %dst, "inbound connection to a port of the proxy itself refused");
        proxy.metrics.connection(
            Direction::Inbound,
            Proto::Unknown,
            Outcome::RefusedLoop,
            false,
        );
        return;
    }
    let span = debug_span!("inbound", %client, port = dst.port());
    async move {
        let config = proxy.config.load_full();
        let (mode, declared) = config.snapshot.inbound.port(dst.port());
        // A declared HTTP port waits as long as it takes for the first bytes (mesh TLS or
        // plaintext HTTP); only undeclared ports give up early and fall back to TCP.
        let timeout = if declared.is_http() {
            detect::DECLARED_HTTP_WAIT
        } else {
            config.detect_timeout
        };
        let arrival = if mode == MtlsMode::Disable && matches!(declared, Protocol::Tcp | Protocol::Tls) {
            // Nothing to terminate and nothing to parse: server-first protocols never wait.
            Arrival::Plain(Detected::Tcp)
        } else {
            match sniff(&stream, timeout).await {
                Ok(a) => a,
                Err(error) => {
                    debug!(%error, "client went away during detection");
                    return;
                }
            }
        };
        match (arrival, mode) {
            (Arrival::Mesh, MtlsMode::Strict | MtlsMode::Permissive) => {
                terminate(proxy, stream, client, dst).await;
            }
            (Arrival::Plain(d), MtlsMode::Strict) => {
                warn!(%client, port = dst.port(), detected = ?d, "plaintext connection refused: mTLS mode is STRICT");
                proxy
                    .metrics
                    .connection(Direction::Inbound, proto_of(d), Outcome::RefusedPlaintext, false);
            }
            (arrival, _) => {
                let detected = match arrival {
                    Arrival::Mesh => Detected::Tls,
                    Arrival::Plain(d) => d,
                };
                let detected = match (declared, detected) {
                    (Protocol::Tcp | Protocol::Tls, _) => Detected::Tcp,
                    (Protocol::Http, Detected::Tcp | Detected::Tls) => Detected::Http1,
                    (Protocol::Http2 | Protocol::Grpc, Detected::Tcp | Detected::Tls) => Detected::Http2,
                    (_, d) => d,
                };
                plaintext(proxy, stream, dst, detected).await;
            }
        }
    }
    .instrument(span)
    .await
}

fn proto_of(d: Detected) -> Proto {
    match d {
        Detected::Http1 => Proto::Http1,
        Detected::Http2 => Proto::Http2,
        Detected::Tls => Proto::Tls,
        Detected::Tcp => Proto::Tcp,
    }
}

/// Detects the protocol and, for TLS, whether the ClientHello offers a mesh ALPN, without
/// consuming any byte.
async fn sniff(stream: &TcpStream, timeout: Duration) -> std::io::Result<Arrival> {
    let started = Instant::now();
    let detected = detect::detect(stream, timeout).await?;
    if detected != Detected::Tls {
        return Ok(Arrival::Plain(detected));
    }
    let deadline = started + timeout.max(Duration::from_secs(1));
    let mut buf = vec![0u8; MAX_CLIENT_HELLO];
    let mut backoff = Duration::from_micros(200);
    loop {
        let n = stream.peek(&mut buf).await?;
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            if acceptor.read_tls(&mut rd).is_err() {
                return Ok(Arrival::Plain(Detected::Tls));
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let mesh = accepted
                    .client_hello()
                    .alpn()
                    .is_some_and(tls::offers_mesh_alpn);
                return Ok(if mesh {
                    Arrival::Mesh
                } else {
                    Arrival::Plain(Detected::Tls)
                });
            }
            Ok(None) if n < MAX_CLIENT_HELLO && Instant::now() < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(10));
            }
            _ => return Ok(Arrival::Plain(Detected::Tls)),
        }
    }
}

/// Terminates mesh mTLS and serves what the ALPN says.
async fn terminate(proxy: Arc<Proxy>, stream: TcpStream, client: SocketAddr, dst: SocketAddr) {
    let Some(ctx) = proxy.identity.current() else {
        warn!(%client, "mesh connection refused: no workload certificate yet");
        proxy.metrics.connection(
            Direction::Inbound,
            Proto::Unknown,
            Outcome::RefusedTls,
            true,
        );
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.server_config());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            warn!(%client, %error, "mesh tls handshake failed");
            proxy.metrics.connection(
                Direction::Inbound,
                Proto::Unknown,
                Outcome::RefusedTls,
                true,
            );
            return;
        }
        Err(_) => {
            warn!(%client, "mesh tls handshake timed out");
            proxy.metrics.connection(
                Direction::Inbound,
                Proto::Unknown,
                Outcome::RefusedTls,
                true,
            );
            return;
        }
    };
    let conn = tls.get_ref().1;
    let peer = tls::peer_identity(conn).map(Arc::new);
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec).unwrap_or_default();
    debug!(peer = peer.as_ref().map(|p| p.spiffe_id.as_str()), alpn = %String::from_utf8_lossy(&alpn), "mesh connection");
    let local_id: Arc<str> = Arc::from(ctx.identity());
    if alpn == tls::ALPN_TCP {
        let mut tls = tls;
        let outcome =
            match socket::connect_app(dst.ip(), dst.port(), proxy.settings.connect_timeout).await {
                Ok(mut app) => {
                    tcp::splice(&proxy.metrics, Direction::Inbound, &mut tls, &mut app).await;
                    Outcome::Success
                }
                Err(error) => {
                    warn!(port = dst.port(), %error, "app connect failed");
                    Outcome::Error
                }
            };
        proxy
            .metrics
            .connection(Direction::Inbound, Proto::Tcp, outcome, true);
        return;
    }
    let (server, proto) = if alpn == tls::ALPN_H1 {
        (ServerProto::Http1, Proto::Http1)
    } else {
        (ServerProto::Http2, Proto::Http2)
    };
    let svc = InboundHttp {
        proxy: proxy.clone(),
        app: SocketAddr::new(loopback(dst.ip()), dst.port()),
        peer,
        local_id: Some(local_id),
        proto,
    };
    let outcome = match h::serve(tls, server, svc, &proxy.drain).await {
        Ok(()) => Outcome::Success,
        Err(error) => {
            debug!(%error, "mesh connection ended with error");
            Outcome::Error
        }
    };
    proxy
        .metrics
        .connection(Direction::Inbound, proto, outcome, true);
}

/// Plaintext (PERMISSIVE or DISABLE): HTTP is proxied request by request (so that a spoofed
/// client-certificate header is stripped), anything else is spliced to the app.
async fn plaintext(proxy: Arc<Proxy>, mut stream: TcpStream, dst: SocketAddr, detected: Detected) {
    let proto = proto_of(detected);
    let server = match detected {
        Detected::Http1 => ServerProto::Http1,
        Detected::Http2 => ServerProto::Http2,
        Detected::Tls | Detected::Tcp => {
            let outcome =
                match socket::connect_app(dst.ip(), dst.port(), proxy.settings.connect_timeout)
                    .await
                {
                    Ok(mut app) => {
                        tcp::splice(&proxy.metrics, Direction::Inbound, &mut stream, &mut app)
                            .await;
                        Outcome::Success
                    }
                    Err(error) => {
                        warn!(port = dst.port(), %error, "app connect failed");
                        Outcome::Error
                    }
                };
            proxy
                .metrics
                .connection(Direction::Inbound, proto, outcome, false);
            return;
        }
    };
    let svc = InboundHttp {
        proxy: proxy.clone(),
        app: SocketAddr::new(loopback(dst.ip()), dst.port()),
        peer: None,
        local_id: None,
        proto,
    };
    let outcome = match h::serve(stream, server, svc, &proxy.drain).await {
        Ok(()) => Outcome::Success,
        Err(error) => {
            debug!(%error, "plaintext connection ended with error");
            Outcome::Error
        }
    };
    proxy
        .metrics
        .connection(Direction::Inbound, proto, outcome, false);
}

fn loopback(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    }
}

/// Delivers each request of one inbound connection to the app.
#[derive(Clone)]
struct InboundHttp {
    proxy: Arc<Proxy>,
    app: SocketAddr,
    peer: Option<Arc<PeerIdentity>>,
    local_id: Option<Arc<str>>,
    proto: Proto,
}

impl hyper::service::Service<Request<Incoming>> for InboundHttp {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let start = Instant::now();
            let resp = this.forward(req).await;
            this.proxy.record_request(
                Direction::Inbound,
                this.proto,
                resp.status(),
                this.peer.is_some(),
                start,
            );
            Ok(resp)
        })
    }
}

impl InboundHttp {
    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        let grpc = h::is_grpc(&req);
        // Only this proxy vouches for the caller: whatever came from outside goes.
        req.headers_mut().remove(h::XFCC);
        if let (Some(peer), Some(local)) = (&self.peer, &self.local_id)
            && let Some(v) = h::xfcc_value(local, peer)
        {
            req.headers_mut().insert(h::XFCC, v);
        }
        let marker = req.headers_mut().remove(h::ORIGIN_PROTO_HEADER);
        let to_h1 = match req.version() {
            Version::HTTP_2 => marker.is_some_and(|v| v == "h1"),
            _ => true,
        };
        if h::is_upgrade(&req) {
            return match socket::connect_app(
                self.app.ip(),
                self.app.port(),
                self.proxy.settings.connect_timeout,
            )
            .await
            {
                Ok(io) => match h::forward_upgrade(req, io, &self.proxy.drain).await {
                    Ok(resp) => resp,
                    Err(error) => {
                        warn!(%error, "app upgrade failed");
                        h::error_response(StatusCode::BAD_GATEWAY, grpc, "app upgrade failed")
                    }
                },
                Err(error) => app_unavailable(self.app, &error.to_string(), grpc),
            };
        }
        let authority = h::authority(&req);
        h::strip_hop_by_hop(req.headers_mut());
        let (parts, body) = req.into_parts();
        let mut req = Request::from_parts(parts, h::boxed(body));
        if to_h1 {
            if let Some(a) = &authority
                && !req.headers().contains_key(http::header::HOST)
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(http::header::HOST, v);
            }
            let app_authority = self
                .app
                .to_string()
                .parse()
                .expect("a socket address is an authority");
            h::set_absolute_uri(&mut req, app_authority);
            *req.version_mut() = Version::HTTP_11;
            match self.proxy.pools.send_h1(req).await {
                Ok(resp) => app_response(resp),
                Err(error) => app_unavailable(self.app, &error.to_string(), grpc),
            }
        } else {
            if let Some(a) = authority {
                h::set_absolute_uri(&mut req, a);
            }
            req.headers_mut().remove(http::header::HOST);
            *req.version_mut() = Version::HTTP_2;
            let key = H2Key {
                addr: self.app,
                identity: None,
            };
            let mut sender = match self.proxy.pools.h2(&key, None, None).await {
                Ok(s) => s,
                Err(error) => return app_unavailable(self.app, &error.to_string(), grpc),
            };
            if let Err(error) = sender.ready().await {
                return app_unavailable(self.app, &error.to_string(), grpc);
            }
            match sender.send_request(req).await {
                Ok(resp) => app_response(resp),
                Err(error) => app_unavailable(self.app, &error.to_string(), grpc),
            }
        }
    }
}

fn app_response(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    h::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, h::boxed(body))
}

fn app_unavailable(app: SocketAddr, error: &str, grpc: bool) -> Response<Body> {
    info!(%app, %error, "app unavailable");
    h::error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        grpc,
        &format!("upstream connect error or disconnect/reset before headers: {error}"),
    )
}
