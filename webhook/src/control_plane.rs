//! The control plane's TLS port (15012): the CA (`POST /weft.v1/certificates`), config
//! distribution (`POST /weft.v1/discovery`), `GET /metrics`, `GET /healthz` and
//! `GET /debug/config_dump?proxy=ns/name` / `GET /debug/proxies`.
//!
//! The serving certificate is issued by the mesh CA (so proxies verify it with the root they
//! were given). HTTP/2 and HTTP/1.1. Client certificates are optional at the TLS layer (the
//! CA is called before the proxy has one) but verified against the trust bundle when shown;
//! discovery requires one and takes the proxy's identity from its SPIFFE URI SAN.
//!
//! The CA can be replaced while the port serves (a root rotation, see [`trust`]): signing
//! uses the [`LiveCa`], and [`LiveTls`] re-issues the serving certificate and re-reads the
//! trusted roots for new connections. Open connections and streams keep theirs.

pub mod trust;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};
use weft_api::discovery::{CertificateRequest, PATH_CERTIFICATES, PATH_DISCOVERY};

use crate::ca::token::{TokenError, TokenVerifier};
use crate::ca::{Ca, CaError, parse_spiffe, spiffe_of_certificate};
use crate::discovery::{Discovery, Peer, PeerIdentity, error};
use crate::metrics::Metrics;

/// Time a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a certificate request may take.
pub const SIGN_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on idle streams, to find proxies that went away.
pub const KEEPALIVE: Duration = Duration::from_secs(30);
/// Largest certificate request body.
pub const MAX_CSR_BODY: usize = 64 << 10;
/// Lifetime of the control plane's serving certificate (re-issued at every start).
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 86_400);

/// Errors of the control-plane port.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The serving certificate could not be made.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Tls(String),
    /// The listener failed.
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
pub struct ControlPlane {
    /// The CA (at start: [`router_with`] signs with the one in force).
    pub ca: Arc<Ca>,
    /// Token verification.
    pub verifier: TokenVerifier,
    /// Config distribution.
    pub discovery: Arc<Discovery>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// DNS names of the control plane's serving certificate.
pub fn serving_names(service: &str, namespace: &str, ips: &[std::net::IpAddr]) -> Vec<String> {
    let mut names = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_owned(),
        "localhost".to_owned(),
    ];
    names.extend(ips.iter().map(|ip| ip.to_string()));
    names
}

/// The CA in force: the one signing workload certificates, whose roots are the trust
/// bundle. A root rotation replaces it.
#[derive(Debug)]
pub struct LiveCa(watch::Sender<Arc<Ca>>);

impl LiveCa {
    /// Starts with `ca`.
    pub fn new(ca: Arc<Ca>) -> Arc<LiveCa> {
        Arc::new(LiveCa(watch::Sender::new(ca)))
    }

    /// The CA in force.
    pub fn current(&self) -> Arc<Ca> {
        self.0.borrow().clone()
    }

    /// Replaces the CA.
    pub fn replace(&self, ca: Arc<Ca>) {
        self.0.send_replace(ca);
    }

    /// Notified on every replacement.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Ca>> {
        self.0.subscribe()
    }
}

/// The port's serving certificate and client verifier, replaced when the CA changes; each
/// new handshake uses the current ones.
#[derive(Debug)]
pub struct LiveTls {
    names: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    cert: RwLock<Arc<CertifiedKey>>,
    verifier: RwLock<Arc<dyn ClientCertVerifier>>,
}

fn tls_error(e: impl std::fmt::Display) -> ControlPlaneError {
    ControlPlaneError::Tls(e.to_string())
}

impl LiveTls {
    fn parts(
        ca: &Ca,
        names: &[String],
        provider: &Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<(Arc<CertifiedKey>, Arc<dyn ClientCertVerifier>), ControlPlaneError> {
        let (chain_pem, key_pem) = ca.sign_serving(names, SERVING_CERT_TTL)?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(tls_error)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(tls_error)?;
        let cert = CertifiedKey::from_der(chain, key, provider).map_err(tls_error)?;
        let mut roots = RootCertStore::empty();
        for pem in ca.roots() {
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()).flatten() {
                roots.add(der).map_err(tls_error)?;
            }
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                // Hints could not follow a rotation (they are borrowed); clients send their
                // one certificate anyway.
                .clear_root_hint_subjects()
                .build()
                .map_err(tls_error)?;
        Ok((Arc::new(cert), verifier))
    }

    /// A serving certificate for `names` from `ca`, and a verifier of `ca`'s roots.
    pub fn new(ca: &Ca, names: &[String]) -> Result<Arc<LiveTls>, ControlPlaneError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert, verifier) = Self::parts(ca, names, &provider)?;
        Ok(Arc::new(LiveTls {
            names: names.to_vec(),
            provider,
            cert: RwLock::new(cert),
            verifier: RwLock::new(verifier),
        }))
    }

    /// Re-issues the serving certificate from `ca` and trusts `ca`'s roots, for new
    /// connections. On error the current ones stay.
    pub fn update(&self, ca: &Ca) -> Result<(), ControlPlaneError> {
        let (cert, verifier) = Self::parts(ca, &self.names, &self.provider)?;
        *self.cert.write().unwrap_or_else(|e| e.into_inner()) = cert;
        *self.verifier.write().unwrap_or_else(|e| e.into_inner()) = verifier;
        Ok(())
    }

    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.verifier
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A server config (HTTP/2 and HTTP/1.1) that follows this.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, ControlPlaneError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .with_client_cert_verifier(self.clone())
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for LiveTls {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.cert.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl ClientCertVerifier for LiveTls {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // The CA is called before the proxy has a certificate.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier().supported_verify_schemes()
    }
}

/// The TLS config of the port: a serving certificate from the CA, client certificates
/// optional but verified against the trust bundle. Fixed: see [`LiveTls`] to follow a
/// rotation.
pub fn tls_config(
    ca: &Ca,
    names: &[String],
) -> Result<Arc<rustls::ServerConfig>, ControlPlaneError> {
    LiveTls::new(ca, names)?.server_config()
}

/// Routes shared by both ports: `/metrics` and the debug pages.
pub fn observability_router(discovery: Arc<Discovery>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/debug/config_dump", get(config_dump))
        .route("/debug/proxies", get(proxies))
        .route("/debug/sync", get(sync))
        .with_state(discovery)
}

/// The routes of the port, signing with `state.ca` for good.
pub fn router(state: Arc<ControlPlane>) -> Router {
    let ca = LiveCa::new(state.ca.clone());
    router_with(state, ca)
}

/// What the port's handlers share.
#[derive(Debug, Clone)]
struct Port {
    state: Arc<ControlPlane>,
    ca: Arc<LiveCa>,
}

/// The routes of the port, signing with the CA in force in `ca` (`state.ca` is not used).
pub fn router_with(state: Arc<ControlPlane>, ca: Arc<LiveCa>) -> Router {
    Router::new()
        .route(PATH_CERTIFICATES, post(certificates))
        .route(PATH_DISCOVERY, post(discovery))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Port {
            state: state.clone(),
            ca,
        })
        .merge(observability_router(state.discovery.clone()))
}

async fn sync(State(d): State<Arc<Discovery>>) -> Response {
    axum::Json(d.sync_status()).into_response()
}

async fn metrics(State(d): State<Arc<Discovery>>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        d.metrics().encode(),
    )
        .into_response()
}

async fn config_dump(State(d): State<Arc<Discovery>>, uri: http::Uri) -> Response {
    let proxy = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("proxy="))
        .unwrap_or_default()
        .replace("%2F", "/")
        .replace("%2f", "/");
    let Some((ns, name)) = proxy.split_once('/') else {
        return error(StatusCode::BAD_REQUEST, "proxy=namespace/name");
    };
    match d.config_dump(ns, name) {
        Some(s) => match serde_json::to_string_pretty(&s) {
            Ok(json) => ([(http::header::CONTENT_TYPE, "application/json")], json).into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        None => error(StatusCode::NOT_FOUND, &format!("no pod {ns}/{name}")),
    }
}

async fn proxies(State(d): State<Arc<Discovery>>) -> Response {
    axum::Json(d.proxies()).into_response()
}

async fn discovery(
    State(port): State<Port>,
    Extension(peer): Extension<Peer>,
    body: Body,
) -> Response {
    port.state.discovery.clone().stream(peer, body).await
}

fn token_status(e: &TokenError) -> StatusCode {
    match e {
        TokenError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        TokenError::Key { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::UNAUTHORIZED,
    }
}

async fn certificates(State(port): State<Port>, headers: HeaderMap, body: Bytes) -> Response {
    let ca = port.ca.current();
    match tokio::time::timeout(SIGN_TIMEOUT, sign(&port.state, &ca, &headers, &body)).await {
        Ok(r) => r,
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "signing timed out"),
    }
}

async fn sign(state: &ControlPlane, ca: &Ca, headers: &HeaderMap, body: &[u8]) -> Response {
    let refuse = |reason: &str, status: StatusCode, message: String| {
        state.metrics.refused(reason);
        debug!(%status, %message, "certificate request refused");
        error(status, &message)
    };
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return refuse(
            "token",
            StatusCode::UNAUTHORIZED,
            TokenError::Missing.to_string(),
        );
    };
    let requester = match state.verifier.verify(token).await {
        Ok(r) => r,
        Err(e) => {
            let reason = if matches!(e, TokenError::Unavailable(_)) {
                "unavailable"
            } else {
                "token"
            };
            return refuse(reason, token_status(&e), e.to_string());
        }
    };
    if body.len() > MAX_CSR_BODY {
        return refuse(
            "csr",
            StatusCode::PAYLOAD_TOO_LARGE,
            "request too large".into(),
        );
    }
    let request: CertificateRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                "csr",
                StatusCode::BAD_REQUEST,
                format!("bad certificate request: {e}"),
            );
        }
    };
    match ca.sign_workload(&requester, &request) {
        Ok(resp) => {
            state.metrics.ca_signed.inc();
            info!(namespace = %requester.namespace, service_account = %requester.service_account, pod = requester.pod.as_deref().unwrap_or(""), "workload certificate signed");
            axum::Json(resp).into_response()
        }
        Err(e @ CaError::Identity(_)) => refuse("identity", StatusCode::FORBIDDEN, e.to_string()),
        Err(e @ CaError::Csr(_)) => refuse("csr", StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => {
            warn!(error = %e, "signing failed");
            refuse("internal", StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

/// The identity in a verified client certificate, if it is a SPIFFE workload of `trust_domain`.
pub fn peer_of(certs: Option<&[CertificateDer<'_>]>, trust_domain: &str) -> Peer {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Peer(None);
    };
    let Some(spiffe) = spiffe_of_certificate(leaf.as_ref()) else {
        return Peer(None);
    };
    match parse_spiffe(&spiffe) {
        Some((td, ns, sa)) if td == trust_domain => Peer(Some(PeerIdentity {
            trust_domain: td.to_owned(),
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
            spiffe: spiffe.clone(),
        })),
        _ => Peer(None),
    }
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ControlPlaneError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ControlPlaneError::Listen { addr, source })
}

/// Serves the port until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    trust_domain: String,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "control plane listening");
    }
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer_addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        let trust_domain = trust_domain.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    debug!(peer = %peer_addr, %error, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(peer = %peer_addr, "tls handshake timed out");
                    return;
                }
            };
            let peer = peer_of(tls.get_ref().1.peer_certificates(), &trust_domain);
            let service = TowerToHyperService::new(router.layer(Extension(peer)));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(KEEPALIVE))
                .max_concurrent_streams(64);
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(conn.into_owned()).await {
                debug!(peer = %peer_addr, %error, "connection ended with an error");
            }
        });
    }
    info!("control plane shutting down");
    if tokio::time::timeout(Duration::from_secs(2), graceful.shutdown())
        .await
        .is_err()
    {
        debug!("streams still open at shutdown");
    }
}
