//! Traffic mirroring (VirtualService `mirror` / `mirrors`): a copy of a share of requests goes
//! to a shadow cluster, fire and forget. The copy's authority carries the `-shadow` suffix
//! (Envoy's convention, so the shadow can tell), its response is thrown away, and the client
//! never waits for it. Copies in flight are bounded process-wide; a request whose body is
//! too large to keep (see [`crate::replay`]) is not mirrored. Both cases are counted.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::Request;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, Uri};

use crate::snapshot::Cluster;

/// Most shadow requests in flight at once, process-wide.
pub const MAX_IN_FLIGHT: usize = 256;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// A compiled mirror.
#[derive(Debug, Clone)]
pub struct MirrorPolicy {
    /// Shadow cluster.
    pub cluster: Arc<Cluster>,
    /// Share of requests copied, percent.
    pub percentage: f64,
}

impl MirrorPolicy {
    /// True when this request is copied, with `roll` uniform in `[0, 100)`.
    pub fn fires(&self, roll: f64) -> bool {
        roll < self.percentage
    }
}

/// `host:port` → `host-shadow:port` (IPv6 literals are left alone, as Envoy does).
pub fn shadow_authority(authority: &str) -> String {
    if authority.starts_with('[') {
        return authority.to_owned();
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

/// The head of the shadow copy of a request.
pub fn shadow_request<B>(parts: &Parts, body: B) -> Request<B> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    let mut uri = parts.uri.clone().into_parts();
    if let Some(a) = &parts.uri.authority()
        && let Ok(shadow) = Authority::try_from(shadow_authority(a.as_str()))
    {
        uri.authority = Some(shadow);
    }
    if let Ok(u) = Uri::from_parts(uri) {
        *req.uri_mut() = u;
    }
    if let Some(host) = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        && let Ok(v) = HeaderValue::from_str(&shadow_authority(host))
    {
        req.headers_mut().insert(header::HOST, v);
    }
    req
}

/// Runs a shadow request in the background unless [`MAX_IN_FLIGHT`] already run; false when
/// it was dropped.
pub fn spawn<F>(task: F) -> bool
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut cur = IN_FLIGHT.load(Ordering::Acquire);
    loop {
        if cur >= MAX_IN_FLIGHT {
            return false;
        }
        match IN_FLIGHT.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break,
            Err(now) => cur = now,
        }
    }
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        }
    }
    tokio::spawn(async move {
        let _release = Release;
        task.await;
    });
    true
}

/// Shadow requests in flight.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_authorities() {
        assert_eq!(shadow_authority("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(shadow_authority("reviews.ns.svc"), "reviews.ns.svc-shadow");
        assert_eq!(shadow_authority("[fd00::1]:80"), "[fd00::1]:80");
    }

    #[test]
    fn shadow_request_rewrites_uri_and_host() {
        let parts = Request::builder()
            .method("POST")
            .uri("http://b:8080/x?y=1")
            .header("host", "b:8080")
            .header("x-id", "7")
            .body(())
            .expect("req")
            .into_parts()
            .0;
        let shadow = shadow_request(&parts, ());
        assert_eq!(shadow.uri(), "http://b-shadow:8080/x?y=1");
        assert_eq!(shadow.headers()["host"], "b-shadow:8080");
        assert_eq!(shadow.headers()["x-id"], "7");
        assert_eq!(shadow.method(), "POST");
    }

    #[tokio::test]
    async fn spawn_is_bounded() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut started = 0;
        for _ in 0..MAX_IN_FLIGHT + 10 {
            let mut rx = rx.clone();
            if spawn(async move {
                let _ = rx.wait_for(|v| *v).await;
            }) {
                started += 1;
            }
        }
        assert!(started <= MAX_IN_FLIGHT, "{started}");
        assert!(!spawn(async {}), "full");
        tx.send(true).expect("release");
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while in_flight() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("all finish");
    }
}
