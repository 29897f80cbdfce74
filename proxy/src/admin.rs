//! The proxy's own HTTP surfaces: admin (127.0.0.1:15000), readiness (15021), Prometheus
//! (15090) and status (15020: app probes, metrics, `/quitquitquit`).
//!
//! The status port listens on every address and is not behind mTLS (the kubelet probes it), so
//! `POST /quitquitquit` is accepted only from loopback, that is from the pod itself, as Istio
//! does; anyone else gets 403.

use std::convert::Infallible;
use std::net::SocketAddr;
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
        let (stream, peer) = match listener.accept().await {
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
                async move { Ok::<_, Infallible>(route(&proxy, surface, peer, req).await) }
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

/// Whether `peer` may make the proxy exit: only a process of the pod itself, over loopback.
/// (An IPv4-mapped IPv6 peer counts by its IPv4 address.)
pub fn may_quit(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

async fn route(
    proxy: &Proxy,
    surface: Surface,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
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
        (&Method::POST, PATH_QUIT) if !may_quit(peer) => {
            warn!(%peer, "quitquitquit refused: not from loopback");
            text(
                StatusCode::FORBIDDEN,
                format!(
                    "POST {PATH_QUIT} is accepted only from localhost (a container of this pod); \
                     {} is not a loopback address\n",
                    peer.ip()
                ),
            )
        }
        (&Method::POST, PATH_QUIT) => {
            info!(%peer, "quitquitquit: the app containers are done, exiting");
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

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::process::Command;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;

    use super::*;
    use crate::config::Settings;

    /// An address that is not loopback, added to `lo` of the test's own network namespace
    /// (TEST-NET-1, never routed anywhere).
    const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    #[test]
    fn only_loopback_peers_may_quit() {
        let at = |ip: std::net::IpAddr| SocketAddr::new(ip, 40000);
        assert!(may_quit(at(Ipv4Addr::LOCALHOST.into())));
        assert!(may_quit(at(Ipv4Addr::new(127, 0, 0, 2).into())));
        assert!(may_quit(at(Ipv6Addr::LOCALHOST.into())));
        // A dual-stack listener reports IPv4 peers as IPv4-mapped IPv6 addresses.
        assert!(may_quit(at(Ipv4Addr::LOCALHOST.to_ipv6_mapped().into())));
        assert!(!may_quit(at(OUTSIDE.into())));
        assert!(!may_quit(at(OUTSIDE.to_ipv6_mapped().into())));
        assert!(!may_quit(at(Ipv4Addr::UNSPECIFIED.into())));
        assert!(!may_quit(at("fd00::1".parse().expect("ip"))));
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip {args:?}: {e} (iproute2 is needed)"));
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `POST /quitquitquit` from `from` to the status server at `to`: (status line, body).
    async fn post_quit(from: Ipv4Addr, to: SocketAddr) -> String {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(from.into(), 0))
            .expect("bind client");
        let mut stream = socket.connect(to).await.expect("connect");
        stream
            .write_all(
                b"POST /quitquitquit HTTP/1.1\r\nhost: pod\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await
            .expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("the status server answers")
            .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// The real status server, listening on every address as in a pod, called over real TCP
    /// from a non-loopback source address and from loopback. Runs in a network namespace of
    /// its own thread so that the other address exists without touching the machine.
    #[test]
    fn quitquitquit_is_refused_from_outside_the_pod() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect(
                "unshare(CLONE_NEWNET): this test makes a network namespace and needs root, \
                 as the project's tests do",
            );
            ip(&["link", "set", "lo", "up"]);
            ip(&["addr", "add", &format!("{OUTSIDE}/32"), "dev", "lo"]);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let settings = Settings::from_source(None, |_| None).expect("settings");
                let proxy = Proxy::new(settings);
                let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
                    .await
                    .expect("bind status");
                let port = listener.local_addr().expect("addr").port();
                tokio::spawn(serve(proxy.clone(), listener, Surface::Status));

                let refused = post_quit(OUTSIDE, SocketAddr::from((OUTSIDE, port))).await;
                assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
                assert!(
                    refused.contains("accepted only from localhost")
                        && refused.contains("192.0.2.1 is not a loopback address"),
                    "{refused}"
                );
                // The refusal did not leave a quit request behind.
                assert!(
                    tokio::time::timeout(Duration::from_millis(200), proxy.quit.notified())
                        .await
                        .is_err(),
                    "a refused quitquitquit must not stop the proxy"
                );

                let accepted = post_quit(
                    Ipv4Addr::LOCALHOST,
                    SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                )
                .await;
                assert!(accepted.starts_with("HTTP/1.1 200"), "{accepted}");
                tokio::time::timeout(Duration::from_secs(5), proxy.quit.notified())
                    .await
                    .expect("quitquitquit from loopback asks the proxy to exit");
            });
        })
        .join()
        .expect("test thread");
    }
}
