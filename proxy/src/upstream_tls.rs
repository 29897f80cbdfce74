//! TLS to upstreams outside the mesh (DestinationRule `tls.mode: SIMPLE | MUTUAL`): a rustls
//! client trusting the given CAs (a PEM path or inline PEM) or, when none are given, the
//! system's; server names checked against `subjectAltNames` (DNS or URI SANs) or else the SNI;
//! a client certificate for MUTUAL. Mesh mTLS (ISTIO_MUTUAL and auto) is [`crate::tls`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use weft_api::config::{self as model, ConfigError, UpstreamTlsMode};

use crate::pool::{self, CountedIo};

/// Errors building an upstream TLS client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    /// A PEM source cannot be read or holds nothing usable.
    #[error("{what}: {reason}")]
    Pem {
        /// Which field.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// rustls refused the material.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// The verifier could not be built.
    #[error("verifier: {0}")]
    Verifier(String),
    /// A name is not a DNS name or IP address.
    #[error("{0:?} is not a server name")]
    Name(String),
}

impl UpstreamTlsError {
    /// As a config error on `field`.
    pub fn at(self, field: &str) -> ConfigError {
        ConfigError {
            field: field.to_owned(),
            reason: self.to_string(),
        }
    }
}

fn pem_source(what: &'static str, s: &str) -> Result<Vec<u8>, UpstreamTlsError> {
    if s.trim_start().starts_with("-----BEGIN") {
        return Ok(s.as_bytes().to_vec());
    }
    std::fs::read(s).map_err(|e| UpstreamTlsError::Pem {
        what,
        reason: format!("{s}: {e}"),
    })
}

fn certs(what: &'static str, s: &str) -> Result<Vec<CertificateDer<'static>>, UpstreamTlsError> {
    let pem = pem_source(what, s)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UpstreamTlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(UpstreamTlsError::Pem {
            what,
            reason: "no PEM certificate".into(),
        });
    }
    Ok(certs)
}

/// The TLS client of one cluster.
#[derive(Debug)]
pub struct UpstreamTls {
    /// For HTTP: ALPN `h2`, `http/1.1`.
    pub http: Arc<ClientConfig>,
    /// For TCP: no ALPN.
    pub tcp: Arc<ClientConfig>,
    /// SNI; `None`: the endpoint's IP address (and no SNI extension).
    pub server_name: Option<ServerName<'static>>,
}

impl UpstreamTls {
    /// Builds the client for a SIMPLE or MUTUAL cluster; `None` for other modes. `host` is
    /// the SNI used when the config names none (the service host name).
    pub fn build(
        tls: &model::UpstreamTls,
        host: &str,
    ) -> Result<Option<UpstreamTls>, UpstreamTlsError> {
        if !matches!(tls.mode, UpstreamTlsMode::Simple | UpstreamTlsMode::Mutual) {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        match &tls.ca_certificates {
            Some(ca) => {
                for c in certs("caCertificates", ca)? {
                    roots.add(c)?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
        let sni = tls.sni.as_deref().unwrap_or(host);
        let server_name = match ServerName::try_from(sni.to_owned()) {
            Ok(n) if !sni.is_empty() => Some(n),
            _ => None,
        };
        let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
            Arc::new(SkipVerify(provider.signature_verification_algorithms))
        } else if !tls.subject_alt_names.is_empty() {
            let anchors = roots.roots.clone();
            Arc::new(SanVerifier {
                anchors: anchors.into(),
                algorithms: provider.signature_verification_algorithms,
                names: tls.subject_alt_names.clone(),
            })
        } else {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| UpstreamTlsError::Verifier(e.to_string()))?
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (tls.mode, &tls.client_certificate, &tls.private_key) {
            (UpstreamTlsMode::Mutual, Some(chain), Some(key)) => {
                let chain = certs("clientCertificate", chain)?;
                let pem = pem_source("privateKey", key)?;
                let key =
                    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| UpstreamTlsError::Pem {
                        what: "privateKey",
                        reason: e.to_string(),
                    })?;
                builder.with_client_auth_cert(chain, key)?
            }
            (UpstreamTlsMode::Mutual, _, _) => {
                return Err(UpstreamTlsError::Pem {
                    what: "clientCertificate",
                    reason: "MUTUAL needs clientCertificate and privateKey".into(),
                });
            }
            _ => builder.with_no_client_auth(),
        };
        config.enable_sni = server_name
            .as_ref()
            .is_some_and(|n| matches!(n, ServerName::DnsName(_)));
        let tcp = Arc::new(config.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(UpstreamTls {
            http: Arc::new(config),
            tcp,
            server_name,
        }))
    }

    /// The server name for `addr`.
    pub fn name_for(&self, addr: SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }

    /// Connects and handshakes.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        timeout: Duration,
    ) -> io::Result<TlsStream<TcpStream>> {
        let tcp = crate::socket::connect(addr, timeout).await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        tokio::time::timeout(timeout, connector.connect(self.name_for(addr), tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tls handshake timed out"))?
    }
}

/// Accepts any certificate (`insecureSkipVerify`); handshake signatures are still checked.
#[derive(Debug)]
struct SkipVerify(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Verifies the chain, then that the certificate carries one of `names` (DNS names and IP
/// addresses through webpki, URIs such as SPIFFE IDs by comparing URI SANs).
#[derive(Debug)]
struct SanVerifier {
    anchors: Arc<[TrustAnchor<'static>]>,
    algorithms: WebPkiSupportedAlgorithms,
    names: Vec<String>,
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bad = |e: webpki::Error| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        };
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(bad)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(bad)?;
        let uris = uri_sans(end_entity);
        let ok = self.names.iter().any(|n| {
            if n.contains("://") {
                uris.iter().any(|u| u == n)
            } else {
                ServerName::try_from(n.as_str())
                    .is_ok_and(|sn| cert.verify_is_valid_for_subject_name(&sn).is_ok())
            }
        });
        if ok {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ))
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Connector of a SIMPLE / MUTUAL cluster's HTTP client: TLS to the URI's address.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    /// The cluster's TLS client.
    pub tls: Arc<UpstreamTls>,
    /// Connect and handshake timeout.
    pub timeout: Duration,
}

impl tower::Service<Uri> for TlsConnector {
    type Response = CountedIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr = pool::uri_addr(&uri, 443)?;
            let stream = this
                .tls
                .connect(addr, this.tls.http.clone(), this.timeout)
                .await?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(CountedIo::new(stream, h2))
        })
    }
}

/// The default provider is the only one in use; exposed for tests that build servers.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Server {
        addr: SocketAddr,
        ca_pem: String,
    }

    /// A TLS server whose self-signed certificate names `dns` and `uri`.
    async fn server(dns: &str, uri: &str) -> Server {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![dns.to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.try_into().expect("uri")));
        let cert = params.self_signed(&key).expect("cert");
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).expect("key"),
            )
            .expect("config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.write_all(b"hi").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        Server {
            addr,
            ca_pem: cert.pem(),
        }
    }

    async fn try_connect(tls: &model::UpstreamTls, s: &Server) -> Result<Vec<u8>, String> {
        let client = UpstreamTls::build(tls, "api.example.com")
            .map_err(|e| e.to_string())?
            .expect("simple");
        let mut stream = client
            .connect(s.addr, client.tcp.clone(), Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        stream
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        Ok(buf)
    }

    fn simple(ca: Option<&str>) -> model::UpstreamTls {
        model::UpstreamTls {
            mode: UpstreamTlsMode::Simple,
            ca_certificates: ca.map(str::to_owned),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn simple_tls_verifies_name_and_ca() {
        let s = server("api.example.com", "spiffe://ext/api").await;
        assert_eq!(
            try_connect(&simple(Some(&s.ca_pem)), &s).await.expect("ok"),
            b"hi"
        );
        let mut wrong = simple(Some(&s.ca_pem));
        wrong.sni = Some("other.example.com".into());
        assert!(
            try_connect(&wrong, &s).await.is_err(),
            "name mismatch refused"
        );
        let mut sans = wrong.clone();
        sans.subject_alt_names = vec!["spiffe://ext/api".into()];
        assert!(try_connect(&sans, &s).await.is_ok(), "URI SAN accepted");
        sans.subject_alt_names = vec!["api.example.com".into()];
        assert!(try_connect(&sans, &s).await.is_ok(), "DNS SAN accepted");
        sans.subject_alt_names = vec!["nope.example.com".into()];
        assert!(
            try_connect(&sans, &s).await.is_err(),
            "SAN mismatch refused"
        );
        let other = server("api.example.com", "spiffe://x/y").await;
        assert!(
            try_connect(&simple(Some(&s.ca_pem)), &other).await.is_err(),
            "unknown CA"
        );
        let mut skip = simple(Some(&s.ca_pem));
        skip.insecure_skip_verify = true;
        assert!(
            try_connect(&skip, &other).await.is_ok(),
            "insecureSkipVerify"
        );
    }

    #[test]
    fn ca_from_a_file_and_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("ca.pem");
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["x".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(&path, cert.pem()).expect("write");
        assert!(
            UpstreamTls::build(&simple(path.to_str()), "x")
                .expect("builds")
                .is_some()
        );
        let e = UpstreamTls::build(&simple(Some("/nonexistent/ca.pem")), "x").expect_err("missing");
        assert!(e.to_string().starts_with("caCertificates"), "{e}");
        let mutual = model::UpstreamTls {
            mode: UpstreamTlsMode::Mutual,
            ..Default::default()
        };
        assert!(
            UpstreamTls::build(&mutual, "x").is_err(),
            "MUTUAL without a certificate"
        );
        assert!(
            UpstreamTls::build(&model::UpstreamTls::default(), "x")
                .expect("auto")
                .is_none()
        );
    }
}
