//! The HTTPS server: axum routes around [`crate::admission`], served over rustls.
//!
//! Routes: `POST /inject`, `POST /validate`, `GET /healthz`. Bodies over [`MAX_BODY_BYTES`] get
//! 413, bodies that are not an AdmissionReview 400, both with a message; a request not complete
//! within [`REQUEST_TIMEOUT`] gets 408 and its connection is closed, as does a connection that
//! does not finish its TLS handshake or send its headers in time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use kube::core::DynamicObject;
use kube::core::admission::AdmissionReview;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::admission::{self, ReviewError};
use crate::mesh::MeshConfig;

/// Largest request body accepted (the API server's own limit for an object is 3 MiB).
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Time a request has from its first byte to its answer (the API server gives up at 30 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time in-flight requests get to finish on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// The mesh config.
    pub mesh: MeshConfig,
    /// What is known of the cluster's native sidecar support (`None`: no cluster).
    pub cluster_supports_native_sidecars: Option<bool>,
}

/// Request limits of the router.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Time from the request's headers to its answer.
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
        .with_state(state)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            with_timeout(limits, req, next)
        }))
}

async fn with_timeout(limits: Limits, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limits.request_timeout, next.run(req)).await {
        Ok(resp) if resp.status() == StatusCode::PAYLOAD_TOO_LARGE => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is larger than the limit of {} bytes\n",
                limits.max_body_bytes
            ),
        )
            .into_response(),
        Ok(resp) => resp,
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request not complete within {:?} (truncated body?)\n",
                limits.request_timeout
            ),
        )
            .into_response(),
    }
}

fn body_error(rejection: BytesRejection) -> Response {
    let status = rejection.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "request body is too large\n".to_owned()
    } else {
        format!("cannot read request body: {}\n", rejection.body_text())
    };
    debug!(%status, %message, "bad request body");
    (status, message).into_response()
}

fn review_error(error: ReviewError) -> Response {
    debug!(%error, "bad admission review");
    (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response()
}

async fn inject(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return body_error(r),
    };
    match admission::review_inject(&body, &state.mesh, state.cluster_supports_native_sidecars) {
        Ok(review) => review_response(&review),
        Err(e) => review_error(e),
    }
}

async fn validate(body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return body_error(r),
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
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT);
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
