//! Mesh mutual TLS: rustls configs built from a workload's credentials, SPIFFE identity
//! checks, and the ALPN values that mark mesh traffic.
//!
//! Between sidecars only TLS 1.3 is offered. The server side requires a client certificate
//! that chains to the mesh roots; the client side checks the chain and that the peer's
//! SPIFFE ID is the one the config expects for that endpoint, inside the handshake, so no
//! byte of the request reaches a peer with the wrong identity.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};

/// ALPN of a multiplexed HTTP/2 connection between sidecars. HTTP/1 requests ride it too,
/// marked with [`crate::http::ORIGIN_PROTO_HEADER`] so the far side restores HTTP/1.1.
pub const ALPN_H2: &[u8] = b"weft/h2";
/// ALPN of an opaque TCP stream between sidecars.
pub const ALPN_TCP: &[u8] = b"weft/tcp";
/// ALPN of an HTTP/1.1 connection between sidecars, used for protocol upgrades (WebSocket).
pub const ALPN_H1: &[u8] = b"weft/http1.1";
/// Every mesh ALPN, in the server's order of preference.
pub const MESH_ALPNS: [&[u8]; 3] = [ALPN_H2, ALPN_TCP, ALPN_H1];

/// True when a ClientHello's ALPN list marks mesh traffic.
pub fn offers_mesh_alpn<'a>(mut alpns: impl Iterator<Item = &'a [u8]>) -> bool {
    alpns.any(|p| MESH_ALPNS.contains(&p))
}

/// Errors building TLS state from credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The leaf certificate carries no `spiffe://` URI SAN.
    #[error("the workload certificate has no SPIFFE ID (URI SAN spiffe://...)")]
    NoSpiffeId,
    /// A certificate does not parse.
    #[error("certificate does not parse: {0}")]
    BadCertificate(String),
    /// No trusted root.
    #[error("no trusted root certificate")]
    NoRoots,
    /// rustls refused the key, certificates or roots.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A workload's certificate chain, private key and trusted roots.
#[derive(Debug)]
pub struct Credentials {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key of the leaf.
    pub key: PrivateKeyDer<'static>,
    /// Trusted roots (several during a root rotation).
    pub roots: Vec<CertificateDer<'static>>,
}

/// What a verified peer certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The SPIFFE ID from the URI SAN.
    pub spiffe_id: String,
    /// SHA-256 of the leaf certificate, lowercase hex.
    pub cert_hash: String,
    /// Subject distinguished name, possibly empty.
    pub subject: String,
}

/// Facts read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// First `spiffe://` URI SAN.
    pub spiffe_id: Option<String>,
    /// Subject DN.
    pub subject: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Parses the facts Weft needs from a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let spiffe_id = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.to_string()),
                _ => None,
            })
        });
    let time = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok(CertInfo {
        spiffe_id,
        subject: cert.subject().to_string(),
        not_before: time(cert.validity().not_before.timestamp()),
        not_after: time(cert.validity().not_after.timestamp()),
    })
}

/// The identity a peer proved in a finished handshake.
pub fn peer_identity(state: &rustls::CommonState) -> Option<PeerIdentity> {
    let leaf = state.peer_certificates()?.first()?;
    let info = cert_info(leaf).ok()?;
    Some(PeerIdentity {
        spiffe_id: info.spiffe_id?,
        cert_hash: hex::encode(Sha256::digest(leaf.as_ref())),
        subject: info.subject,
    })
}

/// TLS state for one generation of credentials: the server config and a cache of client
/// configs, one per expected peer identity and ALPN.
#[derive(Debug)]
pub struct TlsContext {
    identity: String,
    not_before: SystemTime,
    not_after: SystemTime,
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    anchors: Arc<[TrustAnchor<'static>]>,
    provider: Arc<CryptoProvider>,
    server: Arc<ServerConfig>,
    clients: Mutex<ClientConfigs>,
}

/// Client configs by expected peer identity and ALPN.
type ClientConfigs = HashMap<(String, &'static [u8]), Arc<ClientConfig>>;

/// Bound on cached client configs; the cache is cleared when it is reached.
const MAX_CLIENT_CONFIGS: usize = 4096;

impl TlsContext {
    /// Builds the server config and checks that the credentials are usable.
    pub fn new(creds: Credentials) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let leaf = creds.chain.first().ok_or(TlsError::NoSpiffeId)?;
        let info = cert_info(leaf)?;
        let identity = info.spiffe_id.ok_or(TlsError::NoSpiffeId)?;
        if creds.roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        let mut store = RootCertStore::empty();
        let mut anchors = Vec::new();
        for root in &creds.roots {
            store.add(root.clone())?;
            let anchor = webpki::anchor_from_trusted_cert(root)
                .map_err(|e| TlsError::BadCertificate(format!("root: {e}")))?;
            anchors.push(anchor.to_owned());
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
                .build()?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
        server.alpn_protocols = MESH_ALPNS.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            identity,
            not_before: info.not_before,
            not_after: info.not_after,
            roots: creds.roots,
            chain: creds.chain,
            key: creds.key,
            anchors: anchors.into(),
            provider,
            server: Arc::new(server),
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// This workload's SPIFFE ID.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// When the workload certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When the workload certificate became valid.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The trusted roots.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The certificate chain and a copy of the key, to present to the control plane.
    pub fn client_credentials(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain.clone(), self.key.clone_key())
    }

    /// The same certificate with another set of trusted roots (a root rotation).
    pub fn with_roots(&self, roots: Vec<CertificateDer<'static>>) -> Result<TlsContext, TlsError> {
        TlsContext::new(Credentials {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots,
        })
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// Config for accepting mesh connections.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// Config for connecting to a peer that must prove `expected_peer`, speaking `alpn`.
    pub fn client_config(
        &self,
        expected_peer: &str,
        alpn: &'static [u8],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let key = (expected_peer.to_owned(), alpn);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let verifier = Arc::new(PeerVerifier {
            anchors: self.anchors.clone(),
            algorithms: self.provider.signature_verification_algorithms,
            expected: expected_peer.to_owned(),
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![alpn.to_vec()];
        // Peers are addressed by IP; the identity check replaces host name checks.
        config.enable_sni = false;
        let config = Arc::new(config);
        if clients.len() >= MAX_CLIENT_CONFIGS {
            clients.clear();
        }
        clients.insert(key, config.clone());
        Ok(config)
    }
}

/// The server name handed to rustls for a peer address (SNI is off).
pub fn server_name(addr: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.into())
}

/// Verifies a peer's chain to the mesh roots and its SPIFFE ID.
#[derive(Debug)]
struct PeerVerifier {
    anchors: Arc<[TrustAnchor<'static>]>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: String,
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// The peer's certificate is valid but names another workload.
#[derive(Debug, thiserror::Error)]
#[error("peer identity {found:?} is not the expected {expected:?}")]
pub struct IdentityMismatch {
    /// What the config allows.
    pub expected: String,
    /// What the certificate says.
    pub found: String,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        let found = cert_info(end_entity)
            .ok()
            .and_then(|i| i.spiffe_id)
            .unwrap_or_default();
        if found != self.expected {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(IdentityMismatch {
                    expected: self.expected.clone(),
                    found,
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
pub(crate) mod test_certs {
    //! Certificates for unit tests, made with rcgen.
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };

    pub struct Ca {
        pub cert: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Ca {
        pub fn new(name: &str) -> Ca {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, name);
            let cert = params.self_signed(&key).expect("self-signed");
            Ca {
                cert: cert.der().clone(),
                issuer: Issuer::new(params, key),
            }
        }

        pub fn workload(&self, spiffe_id: &str) -> Credentials {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("uri"))];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &self.issuer).expect("signed");
            Credentials {
                chain: vec![cert.der().clone()],
                key: PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
                roots: vec![self.cert.clone()],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_certs::Ca;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const A: &str = "spiffe://cluster.local/ns/genesis/sa/service-a";
    const B: &str = "spiffe://cluster.local/ns/genesis/sa/service-b";

    /// Runs one handshake: a server with `server` credentials, a client with `client`
    /// credentials expecting `expected`. Returns what each side saw of the other.
    async fn handshake(
        server: Credentials,
        client: Credentials,
        expected: &str,
    ) -> Result<(Option<PeerIdentity>, Vec<u8>), String> {
        let server = TlsContext::new(server).expect("server ctx");
        let client = TlsContext::new(client).expect("client ctx");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let peer = peer_identity(tls.get_ref().1);
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((peer, alpn.unwrap_or_default()))
        });
        let connector = tokio_rustls::TlsConnector::from(
            client
                .client_config(expected, ALPN_TCP)
                .expect("client config"),
        );
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let result = connector.connect(server_name(addr.ip()), tcp).await;
        match result {
            Ok(mut tls) => {
                let mut buf = Vec::new();
                tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
                assert_eq!(buf, b"hello");
                srv.await.expect("server task")
            }
            Err(e) => {
                srv.abort();
                Err(e.to_string())
            }
        }
    }

    #[tokio::test]
    async fn mutual_tls_with_expected_identity() {
        let ca = Ca::new("mesh");
        let (peer, alpn) = handshake(ca.workload(B), ca.workload(A), B)
            .await
            .expect("handshake succeeds");
        let peer = peer.expect("client presented a certificate");
        assert_eq!(peer.spiffe_id, A);
        assert_eq!(peer.cert_hash.len(), 64);
        assert_eq!(alpn, ALPN_TCP);
    }

    #[tokio::test]
    async fn wrong_identity_is_rejected_by_the_client() {
        let ca = Ca::new("mesh");
        let err = handshake(ca.workload(A), ca.workload(A), B)
            .await
            .expect_err("server is A, client expects B");
        assert!(
            err.contains("IdentityMismatch")
                && err.contains("sa/service-a")
                && err.contains("sa/service-b"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn other_root_is_rejected_both_ways() {
        let mesh = Ca::new("mesh");
        let rogue = Ca::new("rogue");
        let err = handshake(rogue.workload(B), mesh.workload(A), B)
            .await
            .expect_err("server from another root");
        assert!(err.to_lowercase().contains("unknown"), "{err}");
        // Client from another root: the server refuses its certificate; the client sees the
        // alert when it reads.
        let mut creds = rogue.workload(A);
        creds.roots = vec![mesh.cert.clone()];
        let err = handshake(mesh.workload(B), creds, B)
            .await
            .expect_err("client from another root");
        // The server's refusal reaches the client as a TLS alert about its certificate.
        let lower = err.to_lowercase();
        assert!(
            lower.contains("alert")
                && (lower.contains("certificate") || lower.contains("unknownca")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn only_tls_1_3_is_spoken_between_sidecars() {
        let ca = Ca::new("mesh");
        let server = TlsContext::new(ca.workload(B)).expect("server ctx");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        let srv = tokio::spawn(async move {
            let mut versions = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.expect("accept");
                versions.push(
                    acceptor
                        .accept(tcp)
                        .await
                        .map(|tls| tls.get_ref().1.protocol_version())
                        .map_err(|e| e.to_string()),
                );
            }
            versions
        });

        // A sidecar's client: TLS 1.3.
        let client = TlsContext::new(ca.workload(A)).expect("client ctx");
        let connector = tokio_rustls::TlsConnector::from(
            client.client_config(B, ALPN_TCP).expect("client config"),
        );
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let tls = connector
            .connect(server_name(addr.ip()), tcp)
            .await
            .expect("mesh handshake");
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );

        // A client with a valid mesh certificate that only speaks TLS 1.2 is refused.
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert.clone()).expect("root");
        let creds = ca.workload(A);
        let old =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS12])
                .expect("tls 1.2 config")
                .with_root_certificates(roots)
                .with_client_auth_cert(creds.chain, creds.key)
                .expect("client cert");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let err = tokio_rustls::TlsConnector::from(Arc::new(old))
            .connect(server_name(addr.ip()), tcp)
            .await
            .expect_err("TLS 1.2 must be refused");
        // No version in common: the handshake fails on both sides over the protocol version.
        let err = err.to_string();
        assert!(
            err.contains("Tls12NotOffered") || err.contains("ProtocolVersion"),
            "{err}"
        );

        let versions = srv.await.expect("server task");
        assert_eq!(versions[0], Ok(Some(rustls::ProtocolVersion::TLSv1_3)));
        let refused = versions[1].as_ref().expect_err("server refused TLS 1.2");
        assert!(
            refused.contains("Tls12NotOffered") || refused.contains("ProtocolVersion"),
            "{refused}"
        );
    }

    #[test]
    fn cert_without_spiffe_id_is_refused() {
        let ca = Ca::new("mesh");
        let mut creds = ca.workload(A);
        creds.chain = vec![ca.cert.clone()];
        assert!(matches!(TlsContext::new(creds), Err(TlsError::NoSpiffeId)));
    }
}
