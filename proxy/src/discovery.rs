//! The config stream from the control plane: one long-lived, full-duplex HTTP/2 request over
//! mutual TLS. Snapshots arrive as they change; each is acknowledged, or refused with the
//! reason (the proxy then keeps its last good one). When the stream breaks the proxy keeps
//! serving its current config and reconnects with backoff.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use weft_api::discovery::{
    CONTENT_TYPE_NDJSON, DiscoveryRequest, DiscoveryResponse, Node, PATH_DISCOVERY,
    decode_messages, encode_message,
};

use crate::app::Proxy;
use crate::control::{ControlError, ControlPlane};
use crate::snapshot::Config;

/// Errors of one stream.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// Connecting failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The stream failed.
    #[error("config stream: {0}")]
    Http(#[from] hyper::Error),
    /// The control plane refused the stream.
    #[error("the control plane refused the config stream ({status}): {message}")]
    Refused {
        /// Status.
        status: StatusCode,
        /// Body.
        message: String,
    },
    /// A message did not parse.
    #[error("bad message on the config stream: {0}")]
    Decode(#[from] serde_json::Error),
    /// No certificate yet to authenticate with.
    #[error("no workload certificate yet")]
    NoIdentity,
    /// The request could not be built from the control-plane address.
    #[error("cannot build the config stream request for {addr}: {source}")]
    Request {
        /// The control-plane address.
        addr: String,
        /// Why.
        #[source]
        source: http::Error,
    },
}

/// Keeps the config stream open for as long as the proxy runs.
pub async fn run(proxy: Arc<Proxy>, control_plane: ControlPlane, node: Node) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if proxy.identity.current().is_none() {
            // The CA client installs the first certificate; the stream needs it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        match stream_once(&proxy, &control_plane, &node, &mut backoff).await {
            Ok(()) => info!("config stream closed by the control plane; reconnecting"),
            Err(error) => {
                warn!(%error, control_plane = control_plane.addr(), "config stream failed; keeping the last config")
            }
        }
        // Jitter spreads reconnects of many proxies after a control-plane restart.
        let jitter = Duration::from_millis(u64::from(std::process::id() % 100));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn stream_once(
    proxy: &Arc<Proxy>,
    control_plane: &ControlPlane,
    node: &Node,
    backoff: &mut Duration,
) -> Result<(), DiscoveryError> {
    let ctx = proxy.identity.current().ok_or(DiscoveryError::NoIdentity)?;
    let mut sender = control_plane
        .connect(
            ctx.roots(),
            Some(ctx.client_credentials()),
            proxy.settings.connect_timeout,
        )
        .await?;
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let body = StreamBody::new(tokio_stream_of(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let req = Request::post(format!("https://{}{PATH_DISCOVERY}", control_plane.addr()))
        .header(http::header::CONTENT_TYPE, CONTENT_TYPE_NDJSON)
        .body(crate::http::boxed(body))
        .map_err(|source| DiscoveryError::Request {
            addr: control_plane.addr().to_owned(),
            source,
        })?;
    let hello = DiscoveryRequest {
        node: Some(node.clone()),
        ..Default::default()
    };
    let _ = tx.send(Bytes::from(encode_message(&hello)?)).await;
    let resp = sender.send_request(req).await?;
    if resp.status() != StatusCode::OK {
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        return Err(DiscoveryError::Refused {
            status,
            message: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    info!(control_plane = control_plane.addr(), "config stream open");
    *backoff = Duration::from_millis(100);
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        for message in decode_messages::<DiscoveryResponse>(&mut buf)? {
            let ack = apply(proxy, message);
            if tx.send(Bytes::from(encode_message(&ack)?)).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Applies one snapshot; returns the acknowledgement (or refusal) to send.
fn apply(proxy: &Proxy, message: DiscoveryResponse) -> DiscoveryRequest {
    let version = message.version.clone();
    if !message.trust_bundle.is_empty() {
        let roots: Result<Vec<CertificateDer<'static>>, _> = message
            .trust_bundle
            .iter()
            .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()))
            .collect();
        match roots
            .map_err(|e| e.to_string())
            .and_then(|r| proxy.identity.update_roots(r).map_err(|e| e.to_string()))
        {
            Ok(()) => {}
            Err(error) => warn!(%error, "trust bundle refused"),
        }
    }
    let mut snapshot = message.snapshot;
    // Certificates come from the CA, never from the stream.
    snapshot.identity = None;
    match Config::compile(snapshot) {
        Ok(config) => {
            debug!(%version, "snapshot received");
            proxy.apply(config);
            DiscoveryRequest {
                version: Some(version),
                ..Default::default()
            }
        }
        Err(error) => {
            proxy.reject(&error);
            DiscoveryRequest {
                version: Some(version),
                error: Some(error.to_string()),
                ..Default::default()
            }
        }
    }
}

fn tokio_stream_of(
    mut rx: mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Bytes> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    //! Against the real control plane (the webhook crate's in-process harness): mutual TLS,
    //! HTTP/2, its discovery server.

    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustls::pki_types::PrivateKeyDer;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;
    use weft_webhook::ca::Material;
    use weft_webhook::testing::Harness;

    use super::*;
    use crate::config::Settings;
    use crate::tls::Credentials;

    const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: service-a-1
  namespace: genesis
  labels: {app: service-a}
  annotations: {sidecar.istio.io/status: '{}'}
spec:
  serviceAccountName: service-a
  containers: [{name: app, image: x, ports: [{containerPort: 8080, name: http}]}]
status: {podIP: 10.44.0.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: service-b-1
  namespace: genesis
  labels: {app: service-b}
  annotations: {sidecar.istio.io/status: '{}'}
spec:
  serviceAccountName: service-b
  containers: [{name: app, image: x, ports: [{containerPort: 9090, name: http}]}]
status: {podIP: 10.44.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: service-b, namespace: genesis}
spec:
  clusterIP: 10.96.0.11
  selector: {app: service-b}
  ports: [{name: http, port: 8080, targetPort: http}]
"#;

    fn virtual_service(uri_regex: &str) -> String {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: service-b, namespace: genesis}}
spec:
  hosts: [service-b]
  http:
  - match: [{{uri: {{regex: '{uri_regex}'}}}}]
    route: [{{destination: {{host: service-b}}}}]
  - route: [{{destination: {{host: service-b}}}}]
"#
        )
    }

    const WAIT: Duration = Duration::from_secs(20);

    fn node() -> Node {
        Node {
            name: "service-a-1".into(),
            namespace: "genesis".into(),
            ip: None,
            proxy_version: "test".into(),
        }
    }

    fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("PEM certificates")
    }

    /// A proxy holding a workload certificate of `h`'s CA for genesis/service-a.
    fn proxy_of(h: &Harness) -> Arc<Proxy> {
        let proxy = Proxy::new(Settings::from_source(None, |_| None).expect("default settings"));
        let (chain, key) = h.workload_cert("genesis", "service-a");
        proxy
            .identity
            .install(Credentials {
                chain: pem_certs(&chain),
                key: PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
                roots: pem_certs(&h.roots_pem),
            })
            .expect("credentials");
        proxy
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn version(proxy: &Proxy) -> String {
        proxy.config.load().snapshot.version.clone()
    }

    fn routes_to_b(proxy: &Proxy) -> usize {
        proxy
            .config
            .load()
            .snapshot
            .services
            .iter()
            .find(|s| s.hostname == "service-b.genesis.svc.cluster.local")
            .map_or(0, |s| s.ports.iter().map(|p| p.http_routes.len()).sum())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_snapshot_is_nacked_and_the_last_good_one_stays() {
        let h = Harness::start_unscreened(&[("pods.yaml", PODS)]).await;
        let proxy = proxy_of(&h);
        let cp = ControlPlane::parse(&h.addr.to_string()).expect("address");
        let task = tokio::spawn(run(proxy.clone(), cp, node()));
        eventually("first snapshot", || !version(&proxy).is_empty()).await;
        let good = version(&proxy);
        assert_eq!(routes_to_b(&proxy), 1, "the default route");

        // A control plane that does not screen its input sends a regex the proxy cannot
        // compile; the proxy refuses the whole snapshot.
        h.write("vs.yaml", &virtual_service("/v[0-9"));
        eventually("a nack", || {
            h.discovery
                .proxies()
                .first()
                .and_then(|s| s.nacked.clone())
                .is_some_and(|n| n.contains("regex"))
        })
        .await;
        let status = h.discovery.proxies();
        let nacked = status[0].nacked.as_deref().expect("nacked");
        let refused_version = nacked.split(':').next().expect("version: reason");
        assert_ne!(refused_version, good);
        assert_eq!(status[0].acked.as_deref(), Some(good.as_str()));
        assert_eq!(version(&proxy), good, "the last good config stays in use");
        assert_eq!(routes_to_b(&proxy), 1);

        // The stream goes on: a good change is applied and acknowledged.
        h.write("vs.yaml", &virtual_service("/v[0-9]+"));
        eventually("the fixed config", || routes_to_b(&proxy) == 2).await;
        let applied = version(&proxy);
        eventually("its ack", || {
            h.discovery.proxies().first().and_then(|s| s.acked.clone()) == Some(applied.clone())
        })
        .await;
        task.abort();
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_trust_bundle_reaches_the_identity() {
        let h = Harness::start(&[("pods.yaml", PODS)]).await;
        let proxy = proxy_of(&h);
        let before = proxy.identity.current().expect("identity");
        assert_eq!(before.roots().len(), 1);
        let cp = ControlPlane::parse(&h.addr.to_string()).expect("address");
        let task = tokio::spawn(run(proxy.clone(), cp, node()));
        eventually("first snapshot", || !version(&proxy).is_empty()).await;

        let next = Material::generate("cluster.local").expect("next root");
        h.discovery
            .set_trust_bundle(vec![h.roots_pem.clone(), next.root_cert.clone()]);
        eventually("both roots trusted", || {
            proxy
                .identity
                .current()
                .is_some_and(|c| c.roots().len() == 2)
        })
        .await;
        let after = proxy.identity.current().expect("identity");
        assert_eq!(after.roots()[1], pem_certs(&next.root_cert)[0]);
        assert_eq!(after.identity(), before.identity(), "same certificate");
        assert_eq!(after.not_after(), before.not_after());
        task.abort();
        h.stop().await;
    }

    /// A TCP relay in front of the control plane, so that it can go away and come back on
    /// the same address. While it has no upstream it closes every connection at once and
    /// counts them.
    struct Relay {
        addr: SocketAddr,
        upstream: Arc<Mutex<Option<SocketAddr>>>,
        refused: Arc<AtomicUsize>,
        open: Arc<Mutex<Vec<JoinHandle<()>>>>,
        task: JoinHandle<()>,
    }

    impl Relay {
        async fn start(upstream: SocketAddr) -> Relay {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let upstream = Arc::new(Mutex::new(Some(upstream)));
            let refused = Arc::new(AtomicUsize::new(0));
            let open: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
            let task = tokio::spawn({
                let (upstream, refused, open) = (upstream.clone(), refused.clone(), open.clone());
                async move {
                    while let Ok((mut inbound, _)) = listener.accept().await {
                        let to = *upstream.lock().expect("lock");
                        let Some(to) = to else {
                            refused.fetch_add(1, Ordering::SeqCst);
                            continue;
                        };
                        open.lock().expect("lock").push(tokio::spawn(async move {
                            if let Ok(mut outbound) = TcpStream::connect(to).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                    .await;
                            }
                        }));
                    }
                }
            });
            Relay {
                addr,
                upstream,
                refused,
                open,
                task,
            }
        }

        /// The control plane is away: open connections break, new ones are closed at once.
        fn cut(&self) {
            *self.upstream.lock().expect("lock") = None;
            for conn in self.open.lock().expect("lock").drain(..) {
                conn.abort();
            }
        }

        fn restore(&self, upstream: SocketAddr) {
            *self.upstream.lock().expect("lock") = Some(upstream);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stream_comes_back_with_backoff_after_the_control_plane_does() {
        let material = Material::generate("cluster.local").expect("ca");
        let first = Harness::start_with(&[("pods.yaml", PODS)], Some(material.clone())).await;
        let relay = Relay::start(first.addr).await;
        let proxy = proxy_of(&first);
        let cp = ControlPlane::parse(&relay.addr.to_string()).expect("address");
        let task = tokio::spawn(run(proxy.clone(), cp, node()));
        eventually("first snapshot", || !version(&proxy).is_empty()).await;
        let good = version(&proxy);

        // The control plane goes away.
        relay.cut();
        first.stop().await;
        eventually("reconnect attempts", || {
            relay.refused.load(Ordering::SeqCst) >= 2
        })
        .await;
        let started = tokio::time::Instant::now();
        let at_start = relay.refused.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let attempts = relay.refused.load(Ordering::SeqCst) - at_start;
        let elapsed = started.elapsed();
        // Doubling from 100 ms: a handful in three seconds (fewer on a slow machine), where
        // retrying without backoff would make hundreds.
        assert!(
            attempts <= 10,
            "{attempts} attempts in {elapsed:?}: no backoff"
        );
        assert_eq!(version(&proxy), good, "the last config stays while away");

        // It comes back (same CA, a changed config) on the same address.
        let second = Harness::start_with(
            &[
                ("pods.yaml", PODS),
                ("vs.yaml", &virtual_service("/v[0-9]+")),
            ],
            Some(material),
        )
        .await;
        relay.restore(second.addr);
        eventually("the new control plane's config", || {
            routes_to_b(&proxy) == 2
        })
        .await;
        eventually("the stream registered", || {
            second.discovery.proxies().len() == 1
        })
        .await;
        task.abort();
        relay.task.abort();
        second.stop().await;
    }
}
