//! The HTTPS server: axum routes around [`crate::admission`], served over rustls.
//!
//! Routes: `POST /inject` (knowing the nodes through [`AppState::nodes`]), `POST /validate`,
//! `GET /healthz`. A request body that cannot be read in full gets 400 with a message saying
//! what was wrong: larger than [`MAX_BODY_BYTES`] (declared or sent), cut short by the client
//! (fewer bytes than its `content-length`), or not complete within [`REQUEST_TIMEOUT`]; so does
//! a body that is not an AdmissionReview. A connection that does not finish its TLS handshake
//! or send its headers in time is closed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::BytesMut;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use kube::core::DynamicObject;
use kube::core::admission::AdmissionReview;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::admission::{self, ReviewError};
use crate::inject::mode::NodeView;
use crate::mesh::MeshConfig;
use crate::resources::Store;

/// Largest request body accepted (the API server's own limit for an object is 3 MiB).
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Time a request's body has to arrive in full once its headers are in (and the time a
/// connection has to send its headers). The webhook configurations give the API server a
/// `timeoutSeconds` of 10 (deploy/weft.yaml): a stalled request is answered well before that.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time in-flight requests get to finish on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long after start an injection waits for the nodes' first list (a control plane
/// that just started has not read them yet). Afterwards, or when the list fails, it does not
/// wait: with the body's [`REQUEST_TIMEOUT`] the answer stays inside the API server's
/// `timeoutSeconds` of 10.
pub const NODES_LIST_WAIT: Duration = Duration::from_secs(3);

/// Errors of the server itself (not of single requests).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why a request body could not be read; the answer is 400 with this message.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// `content-length` announces more than the limit; the body is not read.
    #[error(
        "request body is larger than the limit of {limit} bytes (content-length is {declared})"
    )]
    DeclaredTooLarge {
        /// The announced length.
        declared: u64,
        /// [`Limits::max_body_bytes`].
        limit: usize,
    },
    /// More than the limit arrived (a body without `content-length`).
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// [`Limits::max_body_bytes`].
        limit: usize,
    },
    /// The client ended the body before its `content-length` (or the stream broke).
    #[error(
        "request body is truncated: {} arrived before the client stopped sending ({reason})",
        amount(*.received, *.expected)
    )]
    Truncated {
        /// Bytes read.
        received: usize,
        /// The announced length, when there was one.
        expected: Option<u64>,
        /// What the connection reported.
        reason: String,
    },
    /// The body did not arrive in full in time.
    #[error(
        "request body not complete within {timeout:?}: {} arrived",
        amount(*.received, *.expected)
    )]
    Timeout {
        /// [`Limits::request_timeout`].
        timeout: Duration,
        /// Bytes read.
        received: usize,
        /// The announced length, when there was one.
        expected: Option<u64>,
    },
}

/// `10 of 1000 bytes`, or `10 bytes` for a body of unannounced length.
fn amount(received: usize, expected: Option<u64>) -> String {
    match expected {
        Some(n) => format!("{received} of {n} bytes"),
        None => format!("{received} bytes"),
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// The mesh config.
    pub mesh: MeshConfig,
    /// What is known of the cluster's native sidecar support (`None`: no cluster).
    pub cluster_supports_native_sidecars: Option<bool>,
    /// Where the nodes are known (the control plane's store); `None` without a cluster or a
    /// local directory: a pod in eBPF mode then keeps it.
    pub nodes: Option<NodeSource>,
}

/// The nodes as the store holds them, for the injector's eBPF decision.
#[derive(Debug, Clone)]
pub struct NodeSource {
    store: Arc<Store>,
    listed: watch::Receiver<bool>,
    wait_until: tokio::time::Instant,
}

impl NodeSource {
    /// The nodes of `store`, complete once `listed` turns true. Requests in the first
    /// [`NODES_LIST_WAIT`] from now wait for that.
    pub fn new(store: Arc<Store>, listed: watch::Receiver<bool>) -> Self {
        Self {
            store,
            listed,
            wait_until: tokio::time::Instant::now() + NODES_LIST_WAIT,
        }
    }

    /// The nodes of `store`, which holds them all already (a directory read before serving).
    pub fn complete(store: Arc<Store>) -> Self {
        Self::new(store, watch::channel(true).1)
    }

    /// The nodes now: after the first list, or as they are when [`NODES_LIST_WAIT`] has passed
    /// since start (then the view says that the list is not complete).
    pub async fn view(&self) -> NodeView {
        let mut listed = self.listed.clone();
        if !*listed.borrow() {
            // A closed channel (the watch gone) or the deadline: the view says not listed.
            let _ = tokio::time::timeout_at(self.wait_until, listed.wait_for(|l| *l)).await;
        }
        let listed = *listed.borrow();
        NodeView {
            nodes: self.store.snapshot().nodes.clone(),
            listed,
        }
    }
}

/// Request limits of the router.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Time the body has to arrive in full, from the request's headers.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: MAX_BODY_BYTES,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// The webhook's routes with the default [`Limits`]. Other control-plane subsystems merge
/// their routers into this one.
pub fn router(state: Arc<AppState>) -> Router {
    router_with(state, Limits::default())
}

/// The webhook's routes with the given limits.
pub fn router_with(state: Arc<AppState>, limits: Limits) -> Router {
    Router::new()
        .route("/inject", post(inject))
        .route("/validate", post(validate))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Arc::new(Routes { app: state, limits }))
}

/// The handlers' state: the shared state and the request limits.
#[derive(Debug)]
struct Routes {
    app: Arc<AppState>,
    limits: Limits,
}

/// Reads a whole request body within `limits`. The size is checked against `content-length`
/// before anything is read, and against what arrives for a body without one; the whole body
/// must arrive within [`Limits::request_timeout`].
pub async fn read_body(req: Request, limits: Limits) -> Result<Bytes, BodyError> {
    let expected = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let limit = limits.max_body_bytes;
    if let Some(declared) = expected
        && declared > limit as u64
    {
        return Err(BodyError::DeclaredTooLarge { declared, limit });
    }
    let deadline = tokio::time::Instant::now() + limits.request_timeout;
    let mut body: Body = req.into_body();
    let capacity = expected.map_or(0, |n| usize::try_from(n).unwrap_or(limit).min(limit));
    let mut buf = BytesMut::with_capacity(capacity);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(BodyError::Timeout {
                    timeout: limits.request_timeout,
                    received: buf.len(),
                    expected,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                return Err(BodyError::Truncated {
                    received: buf.len(),
                    expected,
                    reason: error_chain(&error),
                });
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(BodyError::TooLarge { limit });
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

fn body_error(error: BodyError) -> Response {
    debug!(%error, "bad request body");
    // What is left of the body is unread: the connection cannot carry another request
    // (HTTP/2 drops the header and resets only the stream).
    (
        StatusCode::BAD_REQUEST,
        [(http::header::CONNECTION, "close")],
        format!("{error}\n"),
    )
        .into_response()
}

fn review_error(error: ReviewError) -> Response {
    debug!(%error, "bad admission review");
    (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response()
}

async fn inject(State(routes): State<Arc<Routes>>, req: Request) -> Response {
    let body = match read_body(req, routes.limits).await {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    let app = &routes.app;
    let nodes = match &app.nodes {
        Some(source) => Some(source.view().await),
        None => None,
    };
    match admission::review_inject_with_nodes(
        &body,
        &app.mesh,
        app.cluster_supports_native_sidecars,
        nodes,
    ) {
        Ok(review) => review_response(&review),
        Err(e) => review_error(e),
    }
}

async fn validate(State(routes): State<Arc<Routes>>, req: Request) -> Response {
    let body = match read_body(req, routes.limits).await {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    match admission::review_validate(&body) {
        Ok(review) => review_response(&review),
        Err(e) => review_error(e),
    }
}

fn review_response(review: &AdmissionReview<DynamicObject>) -> Response {
    match admission::to_json(review) {
        Ok(json) => ([(http::header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(error) => {
            warn!(%error, "cannot serialize admission review");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot serialize the answer\n",
            )
                .into_response()
        }
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` completes, then gives in-flight
/// requests [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "webhook listening");
    }
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    debug!(%peer, %error, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "tls handshake timed out");
                    return;
                }
            };
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // A client that half-closes after a short body still gets its 400.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .half_close(true);
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(conn.into_owned()).await {
                debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    info!("webhook shutting down");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("connections still open after the shutdown grace period");
    }
    Ok(())
}

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen { addr, source })
}
