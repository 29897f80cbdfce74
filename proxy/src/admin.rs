//! The proxy's own HTTP surfaces: admin (127.0.0.1:15000), readiness (15021), Prometheus
//! (15090) and status (15020: app probes, metrics, `/quitquitquit`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use weft_api::bootstrap::{PATH_APP_HEALTH_PREFIX, PATH_METRICS, PATH_QUIT, PATH_READY};

use crate::app::Proxy;
use crate::http::Body;
use crate::probe;

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything, localhost only.
    Admin,
    /// `GET /healthz/ready`.
    Readiness,
    /// `GET /stats/prometheus`.
    Prometheus,
    /// App probes, readiness, metrics, `/quitquitquit`.
    Status,
}

/// Serves one surface until the process exits (it outlives the drain, so the kubelet sees
/// the proxy go unready while it drains).
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener, surface: Surface) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                warn!(%error, ?surface, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(route(&proxy, surface, req).await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%error, "admin connection ended with error");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn route(proxy: &Proxy, surface: Surface, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let method = req.method();
    let allowed = match surface {
        Surface::Admin => true,
        Surface::Readiness => path == PATH_READY,
        Surface::Prometheus => path == PATH_METRICS,
        Surface::Status => {
            path == PATH_READY
                || path == PATH_METRICS
                || path == PATH_QUIT
                || path.starts_with(PATH_APP_HEALTH_PREFIX)
        }
    };
    if !allowed {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    match (method, path) {
        (&Method::GET, PATH_READY) => {
            let mut r = if proxy.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if proxy.drain.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for config and certificate\n",
                )
            };
            // Lets a control plane or test harness see which config version is live.
            if let Ok(v) = header::HeaderValue::from_str(&proxy.config.load().snapshot.version) {
                r.headers_mut().insert("x-weft-config-version", v);
            }
            r
        }
        (&Method::GET, PATH_METRICS) => {
            let mut body = proxy.metrics.encode();
            if surface == Surface::Status
                && let Some(app) = &proxy.settings.app_metrics
            {
                // Istio's merge: one scrape of the status port sees the sidecar and the app.
                match probe::fetch_text(app.port, &app.path).await {
                    Ok(text) => {
                        body.push_str(&text);
                        if !text.ends_with('\n') {
                            body.push('\n');
                        }
                    }
                    Err(error) => debug!(port = app.port, %error, "app metrics unavailable"),
                }
            }
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::POST, PATH_QUIT) => {
            info!("quitquitquit: the app containers are done, exiting");
            proxy.quit.notify_one();
            text(StatusCode::OK, "exiting\n")
        }
        (&Method::GET, "/config_dump") => json(&config_dump(proxy)),
        (&Method::GET, p) if p.starts_with(PATH_APP_HEALTH_PREFIX) => app_health(proxy, p).await,
        (&Method::GET, "/") => text(
            StatusCode::OK,
            "weft-proxy admin: /config_dump /healthz/ready /stats/prometheus POST /quitquitquit\n",
        ),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    }
}

fn config_dump(proxy: &Proxy) -> serde_json::Value {
    let config = proxy.config.load();
    let identity = proxy.identity.current().map(|c| {
        serde_json::json!({
            "spiffeId": c.identity(),
            "notAfter": c.not_after().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        })
    });
    serde_json::json!({
        "version": config.snapshot.version,
        "ready": proxy.is_ready(),
        "draining": proxy.drain.is_draining(),
        "identity": identity,
        "snapshot": config.snapshot,
    })
}

async fn app_health(proxy: &Proxy, path: &str) -> Response<Body> {
    let Some(probe) = proxy.settings.app_probes.get(path) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no probe registered for {path}\n"),
        );
    };
    match probe::check(probe).await {
        Ok(()) => text(StatusCode::OK, "ok\n"),
        Err(error) => {
            debug!(path, target = ?probe::target(probe), %error, "app probe failed");
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n"))
        }
    }
}
