//! The webhook's TLS serving certificate: read from files, or made at start (a small CA and a
//! leaf signed by it, so that the CA can go in the webhook configurations' `caBundle`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors making or loading the serving certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The PEM holds no certificate or no key.
    #[error("{0}")]
    Pem(String),
    /// rcgen failed.
    #[error("cannot generate the serving certificate")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("the serving certificate or key is not usable")]
    Tls(#[from] rustls::Error),
    /// The certificate is not X.509 that can be parsed.
    #[error("cannot parse the serving certificate: {0}")]
    Parse(String),
}

/// A serving certificate (chain), its key, and the CA that clients must trust (the `caBundle`).
#[derive(Clone)]
pub struct ServingCert {
    /// Leaf certificate, PEM, optionally followed by intermediates.
    pub cert_pem: String,
    /// Private key of the leaf, PEM.
    pub key_pem: String,
    /// What clients trust, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .field("ca_pem", &self.ca_pem)
            .finish()
    }
}

/// DNS names of the control-plane Service, as the API server calls it.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ]
}

/// The current year, roughly (rcgen takes calendar dates).
fn current_year() -> i32 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    1970 + i32::try_from(now / 31_556_952).unwrap_or(55)
}

/// Makes a CA and a leaf for `dns_names` (IP addresses among them become IP SANs), valid for
/// ten years.
pub fn generate(dns_names: &[String]) -> Result<ServingCert, CertError> {
    // Back-dated by a year so that clocks a little behind still accept it.
    let year = current_year();
    let (not_before, not_after) = (
        rcgen::date_time_ymd(year - 1, 1, 1),
        rcgen::date_time_ymd(year + 10, 1, 1),
    );

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "weft-webhook serving CA");
    ca.distinguished_name.push(DnType::OrganizationName, "weft");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(dns_names.to_vec())?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(
        DnType::CommonName,
        dns_names
            .first()
            .map(String::as_str)
            .unwrap_or("weft-webhook"),
    );
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    Ok(ServingCert {
        cert_pem: leaf_cert.pem(),
        key_pem: leaf_key.serialize_pem(),
        ca_pem: ca_cert.pem(),
    })
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Reads a certificate and key from files. The CA clients trust is `ca` when given, else the
/// last certificate of the chain file.
pub fn from_files(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<ServingCert, CertError> {
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let ca_pem = match ca {
        Some(ca) => read(ca)?,
        None => last_pem_block(&cert_pem).ok_or_else(|| {
            CertError::Pem(format!("{} holds no PEM certificate", cert.display()))
        })?,
    };
    let serving = ServingCert {
        cert_pem,
        key_pem,
        ca_pem,
    };
    server_config(&serving)?;
    Ok(serving)
}

/// The last `CERTIFICATE` block of a PEM chain (the one closest to the root).
fn last_pem_block(pem: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.rfind(BEGIN)?;
    let end = pem[start..].find(END)? + start + END.len();
    Some(format!("{}\n", &pem[start..end]))
}

/// The rustls server config (ring provider, TLS 1.2 and 1.3, ALPN h2 and http/1.1).
pub fn server_config(cert: &ServingCert) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| CertError::Pem(format!("serving certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(CertError::Pem(
            "no certificate in the serving certificate PEM".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| CertError::Pem(format!("serving key PEM: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Whether the leaf certificate expires within `margin`, or covers none of `dns_name`.
pub fn needs_renewal(
    cert: &ServingCert,
    dns_name: &str,
    margin: Duration,
) -> Result<bool, CertError> {
    let der = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .next()
        .ok_or_else(|| CertError::Pem("no certificate".into()))?
        .map_err(|e| CertError::Pem(e.to_string()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let expires = u64::try_from(x509.validity().not_after.timestamp()).unwrap_or(0);
    let covers = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value.general_names.iter().any(
                |n| matches!(n, x509_parser::extensions::GeneralName::DNSName(d) if *d == dns_name),
            )
        });
    Ok(!covers || expires < now + margin.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_cert_is_usable_and_pem_last_block() {
        let names = service_dns_names("weft-control-plane", "weft-system");
        let cert = generate(&names).expect("generate");
        server_config(&cert).expect("rustls accepts it");
        assert!(
            !needs_renewal(
                &cert,
                "weft-control-plane.weft-system.svc",
                Duration::from_secs(86_400 * 30)
            )
            .expect("parse")
        );
        assert!(needs_renewal(&cert, "elsewhere.svc", Duration::ZERO).expect("parse"));
        let chain = format!("{}{}", cert.cert_pem, cert.ca_pem);
        assert_eq!(
            last_pem_block(&chain).as_deref(),
            Some(cert.ca_pem.as_str())
        );
    }
}
