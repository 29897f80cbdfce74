//! Helpers for tests and benchmarks (feature `testing`): a control plane in process on
//! loopback, tokens signed like the local node's, and a simulated proxy that speaks the
//! real protocol over mutual TLS and HTTP/2.
#![allow(
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    reason = "test helpers"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::mpsc;
use weft_api::discovery::{
    CertificateRequest, CertificateResponse, DiscoveryRequest, DiscoveryResponse, Node,
    PATH_CERTIFICATES, PATH_DISCOVERY, decode_messages, encode_message,
};

use crate::ca::token::TokenVerifier;
use crate::ca::{Ca, CaOptions, Material};
use crate::control_plane::{self, ControlPlane};
use crate::discovery::Discovery;
use crate::metrics::Metrics;
use crate::resources::{Settings, Store};
use crate::source::local::LocalSource;
use crate::source::screen::Screen;

/// Signs tokens the way the local node does (ES256, Kubernetes service-account claims).
pub struct TokenSigner {
    key: EncodingKey,
    public_pem: String,
}

impl Default for TokenSigner {
    fn default() -> Self {
        Self::new()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl TokenSigner {
    /// A new P-256 key.
    pub fn new() -> Self {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let pair = KeyPair::generate().unwrap();
        Self {
            key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            public_pem: pair.public_key_pem(),
        }
    }

    /// The PEM public key (`--token-public-key`).
    pub fn public_key_pem(&self) -> &str {
        &self.public_pem
    }

    /// A token for `ns/sa` with audience `aud`, expiring `ttl_secs` from now (negative: past).
    pub fn token(&self, ns: &str, sa: &str, aud: &str, ttl_secs: i64) -> String {
        let now = now();
        let claims = serde_json::json!({
            "iss": "https://localnode.weft.dev",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": [aud],
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + ttl_secs,
            "kubernetes.io": {
                "namespace": ns,
                "serviceaccount": {"name": sa, "uid": "00000000-0000-0000-0000-000000000001"},
                "pod": {"name": format!("{sa}-pod"), "uid": "00000000-0000-0000-0000-000000000002"},
            },
        });
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.key).unwrap()
    }
}

/// A CSR for these URI SANs, with its key.
pub fn csr(uris: &[&str]) -> (String, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    (params.serialize_request(&key).unwrap().pem().unwrap(), key)
}

/// A control plane in this process on 127.0.0.1, local mode.
pub struct Harness {
    /// Its directory (`config/`, `ca/`).
    pub dir: tempfile::TempDir,
    /// The control-plane address.
    pub addr: SocketAddr,
    /// The trust bundle.
    pub roots_pem: String,
    /// The token signer whose key the CA trusts.
    pub signer: TokenSigner,
    /// Discovery.
    pub discovery: Arc<Discovery>,
    /// The store.
    pub store: Arc<Store>,
    /// The CA.
    pub ca: Arc<Ca>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Harness {
    /// The config directory.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// Starts one with a new CA and the given config files (`name`, YAML).
    pub async fn start(files: &[(&str, &str)]) -> Harness {
        Self::start_with(files, None).await
    }

    /// Starts one whose config source does not screen objects with the validator, as a
    /// control plane of an older version (or one whose validator misses a case) would send
    /// them: for tests of the proxies' own refusal of a snapshot.
    pub async fn start_unscreened(files: &[(&str, &str)]) -> Harness {
        Self::start_inner(files, None, false).await
    }

    /// Starts one; `material` replaces the generated CA.
    pub async fn start_with(files: &[(&str, &str)], material: Option<Material>) -> Harness {
        Self::start_inner(files, material, true).await
    }

    async fn start_inner(
        files: &[(&str, &str)],
        material: Option<Material>,
        screened: bool,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::create_dir_all(&config).unwrap();
        for (name, text) in files {
            write_atomic(&config.join(name), text);
        }
        let material = material.unwrap_or_else(|| Material::generate("cluster.local").unwrap());
        let ca = Arc::new(Ca::new(&material, &[], CaOptions::default()).unwrap());
        let signer = TokenSigner::new();
        let verifier =
            TokenVerifier::local_from_pem(signer.public_key_pem().as_bytes(), "weft-ca").unwrap();
        let store = Store::new(Settings::default());
        let metrics = Arc::new(Metrics::default());
        let mut source = LocalSource::new(config).with_screen(if screened {
            Screen::new(&metrics)
        } else {
            Screen::pass_all()
        });
        source.sync(&store);
        let discovery = Discovery::new(
            store.clone(),
            metrics.clone(),
            ca.roots().to_vec(),
            crate::discovery::DEBOUNCE,
        );
        let mut tasks = vec![
            tokio::spawn(source.run(store.clone())),
            tokio::spawn(discovery.clone().run()),
        ];
        let names = control_plane::serving_names(
            "weft-control-plane",
            "weft-system",
            &["127.0.0.1".parse().unwrap()],
        );
        let tls = control_plane::tls_config(&ca, &names).unwrap();
        let listener = control_plane::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let router = control_plane::router(Arc::new(ControlPlane {
            ca: ca.clone(),
            verifier,
            discovery: discovery.clone(),
            metrics,
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tasks.push(tokio::spawn(control_plane::serve(
            listener,
            tls,
            router,
            "cluster.local".into(),
            async move {
                let _ = stopped.await;
            },
        )));
        Harness {
            dir,
            addr,
            roots_pem: ca.roots_pem(),
            signer,
            discovery,
            store,
            ca: ca.clone(),
            stop: Some(stop),
            tasks,
        }
    }

    /// Writes a config file (atomically).
    pub fn write(&self, name: &str, text: &str) {
        write_atomic(&self.config_dir().join(name), text);
    }

    /// A workload certificate for `ns/sa`, straight from the CA: `(chain PEM, key PEM)`.
    pub fn workload_cert(&self, ns: &str, sa: &str) -> (String, String) {
        let id = weft_api::config::spiffe_id("cluster.local", ns, sa);
        let (csr, key) = csr(&[&id]);
        let resp = self
            .ca
            .sign_workload(
                &crate::ca::Requester {
                    namespace: ns.into(),
                    service_account: sa.into(),
                    pod: None,
                },
                &CertificateRequest {
                    csr,
                    validity_secs: None,
                },
            )
            .unwrap();
        (resp.cert_chain.concat(), key.serialize_pem())
    }

    /// Stops the servers.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

fn write_atomic(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS client config trusting `roots_pem`, with an optional client certificate.
pub fn client_tls(roots_pem: &str, identity: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(der.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(chain.as_bytes())
                    .map(|c| c.unwrap())
                    .collect();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

type Sender = hyper::client::conn::http2::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
>;

/// An HTTP/2 connection to the control plane.
pub async fn connect(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::try_from("weft-control-plane.weft-system.svc").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// `POST /weft.v1/certificates`: `(status, body)`.
pub async fn request_certificate(
    addr: SocketAddr,
    roots_pem: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut sender = connect(addr, client_tls(roots_pem, None)).await;
    let mut req = http::Request::post(format!(
        "https://weft-control-plane.weft-system.svc{PATH_CERTIFICATES}"
    ))
    .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)).boxed())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, body)
}

/// Asks for a certificate for `ns/sa` with a fresh key, as a proxy does.
pub async fn issue(
    addr: SocketAddr,
    roots_pem: &str,
    signer: &TokenSigner,
    ns: &str,
    sa: &str,
) -> (CertificateResponse, KeyPair) {
    let id = weft_api::config::spiffe_id("cluster.local", ns, sa);
    let (csr_pem, key) = csr(&[&id]);
    let token = signer.token(ns, sa, "weft-ca", 3600);
    let body = serde_json::to_vec(&CertificateRequest {
        csr: csr_pem,
        validity_secs: None,
    })
    .unwrap();
    let (status, body) = request_certificate(addr, roots_pem, Some(&token), &body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    (serde_json::from_slice(&body).unwrap(), key)
}

/// A simulated proxy's config stream.
pub struct ProxyStream {
    tx: mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>,
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    /// The status of the response.
    pub status: u16,
    /// Set when the response was an error.
    pub error_body: Option<String>,
}

impl ProxyStream {
    /// Opens `POST /weft.v1/discovery` with a client certificate and introduces `node`.
    pub async fn open(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, node: Node) -> ProxyStream {
        let mut sender = connect(addr, tls).await;
        let (tx, rx) = mpsc::channel(8);
        let body = StreamBody::new(futures_util::stream::unfold(
            rx,
            |mut rx: mpsc::Receiver<_>| async move { rx.recv().await.map(|f| (f, rx)) },
        ));
        let first = encode_message(&DiscoveryRequest {
            node: Some(node),
            ..Default::default()
        })
        .unwrap();
        tx.send(Ok(Frame::data(Bytes::from(first)))).await.unwrap();
        let req = http::Request::post(format!(
            "https://weft-control-plane.weft-system.svc{PATH_DISCOVERY}"
        ))
        .header(
            http::header::CONTENT_TYPE,
            weft_api::discovery::CONTENT_TYPE_NDJSON,
        )
        .body(http_body_util::combinators::BoxBody::new(body))
        .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let mut stream = ProxyStream {
            tx,
            body: resp.into_body(),
            buf: Vec::new(),
            status,
            error_body: None,
        };
        if status != 200 {
            let mut all = Vec::new();
            while let Some(Ok(f)) = stream.body.frame().await {
                if let Ok(d) = f.into_data() {
                    all.extend_from_slice(&d);
                }
            }
            stream.error_body = Some(String::from_utf8_lossy(&all).into_owned());
        }
        stream
    }

    /// The next raw message line (without parsing the snapshot), or None at the end.
    pub async fn next_raw(&mut self) -> Option<Vec<u8>> {
        let mut scanned = 0;
        loop {
            if let Some(end) = self.buf[scanned..].iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=scanned + end).collect();
                return Some(line);
            }
            scanned = self.buf.len();
            match self.body.frame().await? {
                Ok(f) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// The next response, parsed, within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<DiscoveryResponse> {
        let mut line = tokio::time::timeout(timeout, self.next_raw())
            .await
            .ok()??;
        let mut out: Vec<DiscoveryResponse> = decode_messages(&mut line).unwrap();
        out.pop()
    }

    /// The version of the next response, read without parsing the snapshot (benchmarks).
    pub async fn next_version(&mut self) -> Option<String> {
        let line = self.next_raw().await?;
        // `{"version":"N",...`: the encoder always writes the version first.
        let text = std::str::from_utf8(&line[..line.len().min(64)]).ok()?;
        let rest = text.strip_prefix("{\"version\":\"")?;
        Some(rest.split('"').next()?.to_owned())
    }

    /// Acknowledges a version.
    pub async fn ack(&self, version: &str) {
        self.send(DiscoveryRequest {
            version: Some(version.into()),
            ..Default::default()
        })
        .await;
    }

    /// Refuses a version.
    pub async fn nack(&self, version: &str, reason: &str) {
        self.send(DiscoveryRequest {
            version: Some(version.into()),
            error: Some(reason.into()),
            ..Default::default()
        })
        .await;
    }

    async fn send(&self, m: DiscoveryRequest) {
        let bytes = encode_message(&m).unwrap();
        let _ = self.tx.send(Ok(Frame::data(Bytes::from(bytes)))).await;
    }
}
