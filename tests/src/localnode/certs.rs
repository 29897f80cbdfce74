//! The local node's certificate authority (used until pods get their certificates from the
//! control plane's CA).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A root CA.
pub struct Ca {
    /// Root certificate, PEM.
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A workload's certificate and key, PEM.
pub struct Issued {
    /// Leaf certificate.
    pub cert_pem: String,
    /// PKCS#8 key.
    pub key_pem: String,
}

impl Ca {
    /// A new self-signed root named `org`.
    pub fn new(org: &str) -> anyhow::Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        (params.not_before, params.not_after) = validity(24 * 365);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA of existing PEM files (the control plane's `ca-cert.pem` and `ca-key.pem`).
    pub fn load(cert_pem: &str, key_pem: &str) -> anyhow::Result<Ca> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// A workload certificate for `spiffe_id` that also names `dns` (when not empty).
    pub fn issue_with_dns(&self, dns: &str, spiffe_id: &str) -> anyhow::Result<Issued> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        // Like Istio's workload certificates: the identity is the URI SAN, the subject is empty.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        if !dns.is_empty() {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.try_into()?));
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        (params.not_before, params.not_after) = validity(24);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// From an hour ago (clock skew) to `hours` from now.
fn validity(hours: u64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = std::time::SystemTime::now();
    (
        (now - std::time::Duration::from_secs(3600)).into(),
        (now + std::time::Duration::from_secs(hours * 3600)).into(),
    )
}
