//! Upstream connections: one multiplexed HTTP/2 connection per (peer, identity), over mesh
//! mTLS or plaintext, and pooled HTTP/1.1 connections for apps and endpoints that only
//! speak HTTP/1.
//!
//! Every HTTP request a sidecar sends to another sidecar rides the peer's single HTTP/2
//! connection, whatever protocol the app spoke: one TLS handshake per peer, not per request.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{CaptureConnection, Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use weft_api::config as model;

use crate::http::Body;
use crate::socket;
use crate::tls::{self, TlsContext};

/// Errors reaching an upstream.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// TCP connect failed or timed out.
    #[error("connect {addr}: {source}")]
    Connect {
        /// Upstream.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The mTLS handshake failed (wrong identity, unknown root, peer refused us).
    #[error("tls handshake with {addr}: {source}")]
    Tls {
        /// Upstream.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The HTTP/2 handshake failed.
    #[error("http/2 handshake with {addr}: {source}")]
    Handshake {
        /// Upstream.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
    /// Mesh mTLS is required but the proxy has no certificate yet.
    #[error("no workload certificate yet")]
    NoIdentity,
    /// Building the TLS client config failed.
    #[error(transparent)]
    Config(#[from] tls::TlsError),
}

impl PoolError {
    /// True when the failure happened before any byte of a request was sent, so a request
    /// can safely go to another endpoint.
    pub fn is_connect(&self) -> bool {
        !matches!(self, PoolError::Config(_))
    }
}

/// Opens a mesh mTLS connection to `addr`, requiring the peer to prove `identity`.
pub async fn connect_tls(
    ctx: &TlsContext,
    addr: SocketAddr,
    identity: &str,
    alpn: &'static [u8],
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, PoolError> {
    let config = ctx.client_config(identity, alpn)?;
    let tcp = socket::connect(addr, timeout)
        .await
        .map_err(|source| PoolError::Connect { addr, source })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    tokio::time::timeout(timeout, connector.connect(tls::server_name(addr.ip()), tcp))
        .await
        .map_err(|_| PoolError::Tls {
            addr,
            source: io::Error::new(io::ErrorKind::TimedOut, "tls handshake timed out"),
        })?
        .map_err(|source| PoolError::Tls { addr, source })
}

/// Key of a multiplexed connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct H2Key {
    /// Peer address.
    pub addr: SocketAddr,
    /// Identity the peer must prove; `None` for plaintext (prior-knowledge HTTP/2).
    pub identity: Option<Arc<str>>,
}

/// TCP keepalive probes (DestinationRule `connectionPool.tcp.tcpKeepalive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Keepalive {
    /// Idle time before probes.
    pub time: Option<Duration>,
    /// Between probes.
    pub interval: Option<Duration>,
    /// Probes before the connection is dead.
    pub probes: Option<u32>,
}

/// How a cluster's upstream connections behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PoolOptions {
    /// TCP keepalive.
    pub keepalive: Option<Keepalive>,
    /// Requests after which a connection is retired (`maxRequestsPerConnection`).
    pub max_requests_per_connection: Option<u32>,
    /// Idle connections close after this long (`idleTimeout`).
    pub idle_timeout: Option<Duration>,
}

impl PoolOptions {
    /// The options of a cluster's connection pool (zero means unset, as in Istio).
    pub fn from_model(p: &model::ConnectionPool) -> Self {
        PoolOptions {
            keepalive: p.tcp_keepalive.as_ref().map(|k| Keepalive {
                time: k.time_ms.map(Duration::from_millis),
                interval: k.interval_ms.map(Duration::from_millis),
                probes: k.probes,
            }),
            max_requests_per_connection: p.max_requests_per_connection.filter(|n| *n > 0),
            idle_timeout: p
                .idle_timeout_ms
                .filter(|t| *t > 0)
                .map(Duration::from_millis),
        }
    }
}

/// Requests a pooled upstream connection (plain HTTP/1, or TLS origination) has carried. Each
/// connection carries one in its hyper-util metadata ([`Connected::extra`]), so that the
/// request that reaches `maxRequestsPerConnection` can retire it ([`retire_after`]): the pooling
/// client counts nothing itself.
#[derive(Debug, Clone, Default)]
pub struct ConnUses(Arc<AtomicU32>);

impl ConnUses {
    /// Requests counted so far.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }
}

/// Counts one more request on the connection `captured` holds and, when it is the `max`-th,
/// poisons the connection: it finishes this request and is never handed out again.
pub fn retire_after(captured: &CaptureConnection, max: u32) {
    let meta = captured.connection_metadata();
    let Some(conn) = meta.as_ref() else {
        return;
    };
    let mut extras = http::Extensions::new();
    conn.get_extras(&mut extras);
    let Some(uses) = extras.get::<ConnUses>() else {
        return;
    };
    if uses.0.fetch_add(1, Ordering::AcqRel) + 1 >= max {
        conn.poison();
    }
}

pin_project_lite::pin_project! {
    /// A pooled upstream connection (plain TCP of the HTTP/1 pool, or a TLS origination's
    /// stream) with its request count, telling the client whether ALPN chose HTTP/2.
    pub struct CountedIo<T> {
        #[pin]
        inner: TokioIo<T>,
        h2: bool,
        uses: ConnUses,
    }
}

impl<T> CountedIo<T> {
    /// A new connection that has carried no request yet.
    pub fn new(stream: T, h2: bool) -> Self {
        CountedIo {
            inner: TokioIo::new(stream),
            h2,
            uses: ConnUses::default(),
        }
    }
}

impl<T> Connection for CountedIo<T> {
    fn connected(&self) -> Connected {
        let c = Connected::new().extra(self.uses.clone());
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> hyper::rt::Read for CountedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> hyper::rt::Write for CountedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
}

/// The address of a pooling client's URI, whose host is always an IP here.
pub fn uri_addr(uri: &Uri, default_port: u16) -> io::Result<SocketAddr> {
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = host.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{uri}: host is not an IP"),
        )
    })?;
    Ok(SocketAddr::new(ip, uri.port_u16().unwrap_or(default_port)))
}

/// Turns on TCP keepalive on an upstream socket.
pub fn set_keepalive(stream: &TcpStream, k: &Keepalive) -> io::Result<()> {
    let mut ka = socket2::TcpKeepalive::new();
    if let Some(t) = k.time {
        ka = ka.with_time(t);
    }
    if let Some(i) = k.interval {
        ka = ka.with_interval(i);
    }
    if let Some(p) = k.probes {
        ka = ka.with_retries(p);
    }
    socket2::SockRef::from(stream).set_tcp_keepalive(&ka)
}

/// One multiplexed connection and how it has been used.
#[derive(Debug)]
struct H2Conn {
    sender: http2::SendRequest<Body>,
    requests: u32,
    last_used: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<H2Conn>>>;

/// Shared upstream connections.
#[derive(Debug)]
pub struct Pools {
    h2: Mutex<HashMap<H2Key, Slot>>,
    h1: Client<Connector, Body>,
    h1_custom: Mutex<HashMap<PoolOptions, Client<Connector, Body>>>,
    connect_timeout: Duration,
}

impl Pools {
    /// Empty pools.
    pub fn new(connect_timeout: Duration) -> Self {
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(Connector {
                timeout: connect_timeout,
                keepalive: None,
            });
        Self {
            h2: Mutex::new(HashMap::new()),
            h1,
            h1_custom: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// The HTTP/1.1 client for a cluster's pool options: the shared one for defaults, else
    /// one per distinct set of options. `maxRequestsPerConnection` is honoured by the sender
    /// ([`retire_after`]); a limit of 1 also keeps no idle connection.
    pub fn h1_client(&self, options: &PoolOptions) -> Client<Connector, Body> {
        if *options == PoolOptions::default() {
            return self.h1.clone();
        }
        let mut map = self.h1_custom.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(*options)
            .or_insert_with(|| {
                let mut b = Client::builder(TokioExecutor::new());
                b.pool_idle_timeout(options.idle_timeout.unwrap_or(Duration::from_secs(60)))
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new());
                if options.max_requests_per_connection == Some(1) {
                    b.pool_max_idle_per_host(0);
                }
                b.build(Connector {
                    timeout: self.connect_timeout,
                    keepalive: options.keepalive,
                })
            })
            .clone()
    }

    /// A ready sender on the multiplexed connection for `key`, opening it if needed. Callers
    /// that arrive while it is being opened wait for that one handshake.
    pub async fn h2(
        &self,
        key: &H2Key,
        tls: Option<&TlsContext>,
        timeout: Option<Duration>,
    ) -> Result<http2::SendRequest<Body>, PoolError> {
        self.h2_with(key, tls, timeout, &PoolOptions::default())
            .await
    }

    /// True when a live multiplexed connection for `key` exists (a request need not wait
    /// for a handshake).
    pub fn h2_ready(&self, key: &H2Key) -> bool {
        let slot = {
            let map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            map.get(key).cloned()
        };
        slot.is_some_and(|s| {
            s.try_lock()
                .is_ok_and(|g| g.as_ref().is_some_and(|c| !c.sender.is_closed()))
        })
    }

    /// As [`Pools::h2`], honouring a cluster's pool options: a connection that served
    /// `maxRequestsPerConnection` requests or sat idle past `idleTimeout` is replaced.
    pub async fn h2_with(
        &self,
        key: &H2Key,
        tls: Option<&TlsContext>,
        timeout: Option<Duration>,
        options: &PoolOptions,
    ) -> Result<http2::SendRequest<Body>, PoolError> {
        let slot = {
            let mut map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let mut guard = slot.lock().await;
        let now = Instant::now();
        if let Some(conn) = guard.as_mut()
            && !conn.sender.is_closed()
            && options
                .max_requests_per_connection
                .is_none_or(|m| conn.requests < m)
            && options
                .idle_timeout
                .is_none_or(|t| now.duration_since(conn.last_used) < t)
        {
            conn.requests += 1;
            conn.last_used = now;
            return Ok(conn.sender.clone());
        }
        let timeout = timeout.unwrap_or(self.connect_timeout);
        let sender = match &key.identity {
            Some(identity) => {
                let ctx = tls.ok_or(PoolError::NoIdentity)?;
                let io = connect_tls(ctx, key.addr, identity, tls::ALPN_H2, timeout).await?;
                handshake(io, key.addr).await?
            }
            None => {
                let io = connect_plain(key.addr, timeout).await.map_err(|source| {
                    PoolError::Connect {
                        addr: key.addr,
                        source,
                    }
                })?;
                if let Some(k) = &options.keepalive {
                    let _ = set_keepalive(&io, k);
                }
                handshake(io, key.addr).await?
            }
        };
        *guard = Some(H2Conn {
            sender: sender.clone(),
            requests: 1,
            last_used: now,
        });
        Ok(sender)
    }

    /// Sends an HTTP/1.1 request whose URI is absolute (`http://<addr>/path`); the `Host`
    /// header, when present, is kept as the client sent it.
    pub fn send_h1(
        &self,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Incoming>, hyper_util::client::legacy::Error>> + use<>
    {
        self.h1.request(req)
    }

    /// Drops multiplexed connections whose key `keep` rejects (endpoints gone from config).
    pub fn retain(&self, keep: impl Fn(&H2Key) -> bool) {
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep(k));
    }

    /// Number of multiplexed connection slots.
    pub fn h2_len(&self) -> usize {
        self.h2.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

async fn handshake<IO>(io: IO, addr: SocketAddr) -> Result<http2::SendRequest<Body>, PoolError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(false)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| PoolError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%addr, %error, "upstream http/2 connection ended");
        }
    });
    Ok(sender)
}

/// Plain TCP to an upstream; the app on loopback is tried on both families.
pub async fn connect_plain(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    if addr.ip().is_loopback() {
        socket::connect_app(addr.ip(), addr.port(), timeout).await
    } else {
        socket::connect(addr, timeout).await
    }
}

/// Connector of the HTTP/1.1 pool: connects to the URI's address (always an IP here).
#[derive(Debug, Clone)]
pub struct Connector {
    timeout: Duration,
    keepalive: Option<Keepalive>,
}

impl tower::Service<Uri> for Connector {
    type Response = CountedIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        let keepalive = self.keepalive;
        Box::pin(async move {
            let stream = connect_plain(uri_addr(&uri, 80)?, timeout).await?;
            if let Some(k) = &keepalive {
                let _ = set_keepalive(&stream, k);
            }
            Ok(CountedIo::new(stream, false))
        })
    }
}
