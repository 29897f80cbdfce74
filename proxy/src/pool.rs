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
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

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

type Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

/// Shared upstream connections.
#[derive(Debug)]
pub struct Pools {
    h2: Mutex<HashMap<H2Key, Slot>>,
    h1: Client<Connector, Body>,
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
            });
        Self {
            h2: Mutex::new(HashMap::new()),
            h1,
            connect_timeout,
        }
    }

    /// A ready sender on the multiplexed connection for `key`, opening it if needed. Callers
    /// that arrive while it is being opened wait for that one handshake.
    pub async fn h2(
        &self,
        key: &H2Key,
        tls: Option<&TlsContext>,
        timeout: Option<Duration>,
    ) -> Result<http2::SendRequest<Body>, PoolError> {
        let slot = {
            let mut map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let mut guard = slot.lock().await;
        if let Some(sender) = guard.as_ref()
            && !sender.is_closed()
        {
            return Ok(sender.clone());
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
                handshake(io, key.addr).await?
            }
        };
        *guard = Some(sender.clone());
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
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let ip: IpAddr = host.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{uri}: host is not an IP"),
                )
            })?;
            let port = uri.port_u16().unwrap_or(80);
            connect_plain(SocketAddr::new(ip, port), timeout)
                .await
                .map(TokioIo::new)
        })
    }
}
