//! The workload certificate from the control plane's CA: a key generated here (it never
//! leaves the pod), a CSR for exactly the pod's SPIFFE ID, the projected service-account
//! token as proof, and rotation at half life without dropping connections.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};
use weft_api::discovery::{
    CertificateRequest, CertificateResponse, ErrorResponse, PATH_CERTIFICATES,
};

use crate::app::Proxy;
use crate::control::{ControlError, ControlPlane};
use crate::tls::Credentials;

/// Errors getting a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The token file cannot be read.
    #[error("read token {path}: {source}")]
    Token {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The root certificate file cannot be read.
    #[error("read root certificate {path}: {reason}")]
    Root {
        /// File.
        path: String,
        /// Cause.
        reason: String,
    },
    /// Key or CSR generation failed.
    #[error("csr: {0}")]
    Csr(#[from] rcgen::Error),
    /// Talking to the control plane failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The request failed on the way.
    #[error("certificate request: {0}")]
    Http(#[from] hyper::Error),
    /// The CA refused.
    #[error("the CA refused the certificate request ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// The CA's reason.
        message: String,
    },
    /// The answer is not a certificate chain.
    #[error("bad answer from the CA: {0}")]
    BadAnswer(String),
}

/// What the proxy needs to ask for its certificate.
#[derive(Debug, Clone)]
pub struct CaClient {
    /// The control plane.
    pub control_plane: ControlPlane,
    /// Projected service-account token.
    pub token_path: PathBuf,
    /// Mesh root certificate(s), to trust the control plane at bootstrap.
    pub root_cert_path: PathBuf,
    /// The identity to ask for.
    pub spiffe_id: String,
    /// Connect and request timeout.
    pub timeout: Duration,
}

impl CaClient {
    /// Roots to trust the control plane with: the bootstrap file.
    pub fn bootstrap_roots(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let path = self.root_cert_path.display().to_string();
        let roots = CertificateDer::pem_file_iter(&self.root_cert_path)
            .map_err(|e| CaError::Root {
                path: path.clone(),
                reason: e.to_string(),
            })?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaError::Root {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if roots.is_empty() {
            return Err(CaError::Root {
                path,
                reason: "no PEM certificate".into(),
            });
        }
        Ok(roots)
    }

    /// Generates a key and asks the CA to certify it.
    pub async fn fetch(&self, trusted: &[CertificateDer<'static>]) -> Result<Credentials, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(self.spiffe_id.as_str().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let token = std::fs::read_to_string(&self.token_path).map_err(|source| CaError::Token {
            path: self.token_path.display().to_string(),
            source,
        })?;
        let body = serde_json::to_vec(&CertificateRequest {
            csr,
            validity_secs: None,
        })
        .map_err(|e| CaError::BadAnswer(e.to_string()))?;
        let mut sender = self
            .control_plane
            .connect(trusted, None, self.timeout)
            .await?;
        let req = Request::post(format!(
            "https://{}{PATH_CERTIFICATES}",
            self.control_plane.addr()
        ))
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(crate::http::boxed(Full::new(Bytes::from(body))))
        .map_err(|e| CaError::BadAnswer(e.to_string()))?;
        let resp = tokio::time::timeout(self.timeout, sender.send_request(req))
            .await
            .map_err(|_| CaError::BadAnswer("timed out".into()))??;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorResponse>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(CaError::Refused { status, message });
        }
        let answer: CertificateResponse =
            serde_json::from_slice(&bytes).map_err(|e| CaError::BadAnswer(e.to_string()))?;
        let pem_list = |list: &[String]| -> Result<Vec<CertificateDer<'static>>, CaError> {
            let mut out = Vec::new();
            for pem in list {
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    out.push(cert.map_err(|e| CaError::BadAnswer(e.to_string()))?);
                }
            }
            Ok(out)
        };
        let chain = pem_list(&answer.cert_chain)?;
        let roots = pem_list(&answer.roots)?;
        if chain.is_empty() || roots.is_empty() {
            return Err(CaError::BadAnswer(
                "empty certificate chain or roots".into(),
            ));
        }
        Ok(Credentials {
            chain,
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            roots,
        })
    }
}

/// When to renew a certificate received at `received` and valid until `not_after`: half way
/// through the validity left at receipt. (CAs backdate `not_before` for clock skew, so the
/// certificate's own start would make short-lived certificates renew at once.)
pub fn renewal_time(
    received: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
) -> SystemTime {
    let start = received.max(not_before);
    let life = not_after.duration_since(start).unwrap_or_default();
    start + life / 2
}

/// Gets the first certificate (retrying with backoff until it succeeds), then renews it at
/// half life for as long as the proxy runs. New connections use the new certificate; open
/// ones keep theirs.
pub async fn run(proxy: Arc<Proxy>, client: CaClient) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let trusted = match proxy.identity.current() {
            Some(ctx) => ctx.roots().to_vec(),
            None => match client.bootstrap_roots() {
                Ok(r) => r,
                Err(error) => {
                    warn!(%error, "no root certificate to trust the control plane yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        match client.fetch(&trusted).await {
            Ok(creds) => match proxy.identity.install(creds) {
                Ok(ctx) => {
                    backoff = Duration::from_millis(200);
                    let renew = renewal_time(SystemTime::now(), ctx.not_before(), ctx.not_after());
                    info!(identity = ctx.identity(), renew_in = ?renew.duration_since(SystemTime::now()).unwrap_or_default(), "certificate from the CA");
                    let wait = renew.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(error) => warn!(%error, "certificate from the CA is not usable"),
            },
            Err(error) => {
                warn!(%error, control_plane = client.control_plane.addr(), "certificate request failed")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let end = start + Duration::from_secs(24 * 3600);
        assert_eq!(
            renewal_time(start, start, end),
            start + Duration::from_secs(12 * 3600)
        );
        assert_eq!(
            renewal_time(end, end, start),
            end,
            "an expired certificate renews at once"
        );
        // Backdated by five minutes, valid ten seconds from receipt: renew in five seconds.
        let received = start + Duration::from_secs(300);
        let end = received + Duration::from_secs(10);
        assert_eq!(
            renewal_time(received, start, end),
            received + Duration::from_secs(5)
        );
    }
}
