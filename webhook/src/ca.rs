//! The mesh CA: the root (or the user's intermediate, Istio's `cacerts` layout), the trust
//! bundle sent to proxies, and the signing of workload certificates.
//!
//! - [`keys`]: reading CA keys in the PEM forms people have (PKCS#8, PKCS#1 RSA, SEC1 EC).
//! - [`store`]: where the CA material lives: a directory (local mode) or a Secret.
//! - [`token`]: who is asking: Kubernetes TokenReview or locally signed JWTs.
//!
//! A workload certificate has an empty subject, exactly one URI SAN (the SPIFFE ID of the
//! token that asked for it, marked critical as RFC 5280 wants for an empty subject), the
//! serverAuth and clientAuth EKUs, and a lifetime of [`weft_api::discovery::DEFAULT_CERT_TTL_SECS`]
//! unless the request asks for less (or more, up to [`CaOptions::max_ttl`]).

pub mod keys;
pub mod store;
pub mod token;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use weft_api::config::spiffe_id;
use weft_api::discovery::{CertificateRequest, CertificateResponse, DEFAULT_CERT_TTL_SECS};

/// Lifetime of a generated mesh root.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Longest workload certificate the CA issues, whatever the request says.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(7 * 86_400);
/// Certificates start this far in the past, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(300);
/// The shortest certificate the CA signs (rotation tests use short ones).
pub const MIN_TTL: Duration = Duration::from_secs(10);

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA material (certificates or key) is unusable.
    #[error("ca material: {0}")]
    Material(String),
    /// rcgen failed to build a certificate.
    #[error("cannot build a certificate")]
    Generate(#[source] rcgen::Error),
    /// The CSR cannot be read, or its signature is wrong.
    #[error("malformed csr: {0}")]
    Csr(String),
    /// The CSR asks for an identity the token does not grant.
    #[error("identity mismatch: {0}")]
    Identity(String),
    /// Reading or writing the store failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// The CA's material as stored: Istio's `cacerts` file names.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// `ca-cert.pem`: the signing certificate (the root itself, or an intermediate).
    pub ca_cert: String,
    /// `ca-key.pem`: its key.
    pub ca_key: String,
    /// `cert-chain.pem`: from the signing certificate up (may include the root); may be empty.
    pub cert_chain: String,
    /// `root-cert.pem`: the trusted roots, one or several.
    pub root_cert: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("ca_cert", &self.ca_cert)
            .field("ca_key", &"<redacted>")
            .field("cert_chain", &self.cert_chain)
            .field("root_cert", &self.root_cert)
            .finish()
    }
}

impl Material {
    /// A new self-signed mesh root (ECDSA P-256, ten years).
    pub fn generate(trust_domain: &str) -> Result<Material, CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        // Dated, so that the old and the new root of a rotation can be told apart.
        params.distinguished_name.push(
            DnType::CommonName,
            format!("weft mesh root {}", humantime::format_rfc3339_seconds(now)),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_TTL).into();
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        Ok(Material {
            ca_cert: cert.pem(),
            ca_key: key.serialize_pem(),
            cert_chain: String::new(),
            root_cert: cert.pem(),
        })
    }
}

/// How the CA issues.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// Trust domain of the SPIFFE IDs it issues.
    pub trust_domain: String,
    /// Lifetime when the request names none.
    pub default_ttl: Duration,
    /// Longest lifetime issued.
    pub max_ttl: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            trust_domain: weft_api::config::DEFAULT_TRUST_DOMAIN.to_owned(),
            default_ttl: Duration::from_secs(DEFAULT_CERT_TTL_SECS),
            max_ttl: DEFAULT_MAX_TTL,
        }
    }
}

/// Who a verified token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    /// Namespace of the service account.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// Pod the token was bound to, when the token says.
    pub pod: Option<String>,
}

/// The CA, ready to sign.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// PEM certificates sent after the leaf: the signing certificate and the chain above it,
    /// roots excluded.
    intermediates: Vec<String>,
    roots: Vec<String>,
    options: CaOptions,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("intermediates", &self.intermediates.len())
            .field("roots", &self.roots.len())
            .field("options", &self.options)
            .finish()
    }
}

/// Splits a PEM bundle into its certificates, each as one PEM block.
pub fn pem_certificates(pem: &str) -> Result<Vec<String>, CaError> {
    let ders: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CaError::Material(format!("certificate PEM: {e}")))?;
    Ok(ders.iter().map(|d| der_to_pem(d.as_ref())).collect())
}

/// One DER certificate as a PEM block.
pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn is_self_signed(pem: &str) -> bool {
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(pem.as_bytes()).next() else {
        return false;
    };
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, c)| c.subject() == c.issuer())
        .unwrap_or(false)
}

fn serial() -> SerialNumber {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos() as u64;
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&nanos.to_be_bytes());
    bytes[8..12].copy_from_slice(&std::process::id().to_be_bytes());
    bytes[12..].copy_from_slice(&(count as u32).to_be_bytes());
    // Positive and without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// Builds the CA from its material; `extra_roots` (PEM) join the trust bundle, as during a
    /// root rotation.
    pub fn new(
        material: &Material,
        extra_roots: &[String],
        options: CaOptions,
    ) -> Result<Ca, CaError> {
        let key = keys::key_pair_from_pem(&material.ca_key)
            .map_err(|e| CaError::Material(format!("ca-key.pem: {e}")))?;
        let signing = pem_certificates(&material.ca_cert)?;
        let signing_cert = signing
            .first()
            .ok_or_else(|| CaError::Material("ca-cert.pem holds no certificate".into()))?
            .clone();
        let issuer = Issuer::from_ca_cert_pem(&signing_cert, key)
            .map_err(|e| CaError::Material(format!("ca-cert.pem: {e}")))?;
        let mut roots = Vec::new();
        for pem in std::iter::once(material.root_cert.as_str())
            .chain(extra_roots.iter().map(String::as_str))
        {
            for cert in pem_certificates(pem)? {
                if !roots.contains(&cert) {
                    roots.push(cert);
                }
            }
        }
        if roots.is_empty() {
            if is_self_signed(&signing_cert) {
                roots.push(signing_cert.clone());
            } else {
                return Err(CaError::Material(
                    "root-cert.pem holds no certificate and ca-cert.pem is not a root".into(),
                ));
            }
        }
        // The chain sent with each leaf: signing certificate, then cert-chain.pem, never a
        // root (the proxy has those), never twice.
        let mut intermediates = Vec::new();
        for cert in
            std::iter::once(signing_cert.clone()).chain(pem_certificates(&material.cert_chain)?)
        {
            if !roots.contains(&cert) && !is_self_signed(&cert) && !intermediates.contains(&cert) {
                intermediates.push(cert);
            }
        }
        Ok(Ca {
            issuer,
            intermediates,
            roots,
            options,
        })
    }

    /// The PEM roots the mesh trusts (two or more during a rotation).
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// The roots as one PEM file.
    pub fn roots_pem(&self) -> String {
        self.roots.concat()
    }

    /// The trust domain of issued identities.
    pub fn trust_domain(&self) -> &str {
        &self.options.trust_domain
    }

    /// Signs `request` for `requester`: the CSR's only SAN must be the requester's SPIFFE ID.
    pub fn sign_workload(
        &self,
        requester: &Requester,
        request: &CertificateRequest,
    ) -> Result<CertificateResponse, CaError> {
        let expected = spiffe_id(
            &self.options.trust_domain,
            &requester.namespace,
            &requester.service_account,
        );
        let csr = CertificateSigningRequestParams::from_pem(&request.csr)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let sans = &csr.params.subject_alt_names;
        if sans.is_empty() {
            return Err(CaError::Csr(format!(
                "the csr has no subject alternative name; expected the URI {expected}"
            )));
        }
        let only_ours = matches!(sans.as_slice(), [SanType::URI(uri)] if uri.as_str() == expected);
        if !only_ours {
            let asked: Vec<String> = sans.iter().map(san_text).collect();
            return Err(CaError::Identity(format!(
                "the csr asks for [{}] but the token grants only {expected}",
                asked.join(", ")
            )));
        }
        let ttl = request
            .validity_secs
            .map(Duration::from_secs)
            .unwrap_or(self.options.default_ttl)
            .min(self.options.max_ttl)
            .max(MIN_TTL);
        let params = workload_params(&expected, ttl)?;
        let cert = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(CaError::Generate)?;
        let mut cert_chain = vec![cert.pem()];
        cert_chain.extend(self.intermediates.iter().cloned());
        Ok(CertificateResponse {
            cert_chain,
            roots: self.roots.clone(),
        })
    }

    /// A serving certificate for the control plane itself (DNS and IP SANs), with its key:
    /// `(chain PEM, key PEM)`.
    pub fn sign_serving(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(CaError::Generate)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names
                .first()
                .map(String::as_str)
                .unwrap_or("weft-control-plane"),
        );
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.as_str()
                        .try_into()
                        .map_err(|e: rcgen::Error| CaError::Material(format!("{name}: {e}")))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).into();
        params.serial_number = Some(serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Generate)?;
        let mut chain = cert.pem();
        for c in &self.intermediates {
            chain.push_str(c);
        }
        Ok((chain, key.serialize_pem()))
    }
}

fn workload_params(uri: &str, ttl: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        uri.try_into()
            .map_err(|e: rcgen::Error| CaError::Csr(format!("{uri}: {e}")))?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ttl).into();
    params.serial_number = Some(serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::URI(u) => format!("URI:{}", u.as_str()),
        SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        SanType::Rfc822Name(e) => format!("email:{}", e.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        _ => "otherName".to_owned(),
    }
}

/// The SPIFFE ID in a certificate's URI SANs, when it has exactly one.
pub fn spiffe_of_certificate(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .filter(|u| u.starts_with("spiffe://"))
        .collect();
    match uris.as_slice() {
        [one] => Some((*one).to_owned()),
        _ => None,
    }
}

/// Splits `spiffe://<td>/ns/<ns>/sa/<sa>` into `(td, ns, sa)`.
pub fn parse_spiffe(id: &str) -> Option<(&str, &str, &str)> {
    let rest = id.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    let mut parts = path.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) if !ns.is_empty() && !sa.is_empty() => {
            Some((td, ns, sa))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn csr_for(uris: &[&str]) -> (String, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("uri")))
            .collect();
        let csr = params.serialize_request(&key).expect("csr");
        (csr.pem().expect("pem"), key)
    }

    fn requester() -> Requester {
        Requester {
            namespace: "genesis".into(),
            service_account: "service-a".into(),
            pod: None,
        }
    }

    #[test]
    fn signs_exactly_the_token_identity() {
        let material = Material::generate("cluster.local").expect("root");
        let ca = Ca::new(&material, &[], CaOptions::default()).expect("ca");
        let id = "spiffe://cluster.local/ns/genesis/sa/service-a";
        let (csr, _) = csr_for(&[id]);
        let resp = ca
            .sign_workload(
                &requester(),
                &CertificateRequest {
                    csr,
                    validity_secs: None,
                },
            )
            .expect("signed");
        assert_eq!(resp.cert_chain.len(), 1, "a root CA sends only the leaf");
        assert_eq!(resp.roots, vec![material.root_cert.clone()]);
        let der = CertificateDer::from_pem_slice(resp.cert_chain[0].as_bytes()).expect("der");
        assert_eq!(spiffe_of_certificate(der.as_ref()).as_deref(), Some(id));

        let (other, _) = csr_for(&["spiffe://cluster.local/ns/genesis/sa/service-b"]);
        let err = ca
            .sign_workload(
                &requester(),
                &CertificateRequest {
                    csr: other,
                    validity_secs: None,
                },
            )
            .expect_err("other identity");
        assert!(matches!(err, CaError::Identity(_)), "{err}");
        let (two, _) = csr_for(&[id, "spiffe://cluster.local/ns/genesis/sa/service-b"]);
        assert!(matches!(
            ca.sign_workload(
                &requester(),
                &CertificateRequest {
                    csr: two,
                    validity_secs: None
                }
            ),
            Err(CaError::Identity(_))
        ));
        assert!(matches!(
            ca.sign_workload(
                &requester(),
                &CertificateRequest {
                    csr: "garbage".into(),
                    validity_secs: None
                }
            ),
            Err(CaError::Csr(_))
        ));
    }

    #[test]
    fn generated_roots_are_named_by_their_date() {
        let material = Material::generate("cluster.local").expect("root");
        let der = CertificateDer::from_pem_slice(material.root_cert.as_bytes()).expect("der");
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .expect("a common name")
            .to_owned();
        let date = cn.strip_prefix("weft mesh root ").expect("named");
        let issued = humantime::parse_rfc3339(date).expect("an RFC 3339 date");
        let age = SystemTime::now()
            .duration_since(issued)
            .expect("not in the future");
        assert!(age < Duration::from_secs(60), "{cn}");
    }

    #[test]
    fn spiffe_parsing() {
        assert_eq!(
            parse_spiffe("spiffe://cluster.local/ns/a/sa/b"),
            Some(("cluster.local", "a", "b"))
        );
        assert_eq!(parse_spiffe("spiffe://cluster.local/ns/a/sa/b/c"), None);
        assert_eq!(parse_spiffe("spiffe://cluster.local/ns//sa/b"), None);
    }
}
