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
        .expect("static request parts are valid");
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
