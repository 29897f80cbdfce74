//! The mesh CA over its real TLS port: who gets a certificate, what it looks like, and the
//! `cacerts` intermediate layout, also as files on disk (ECDSA, and RSA PKCS#1 keys made with
//! openssl as Istio's instructions do).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use weft_api::discovery::{CertificateRequest, CertificateResponse, ErrorResponse};
use weft_webhook::ca::Material;
use weft_webhook::ca::store::{self, load_or_create_dir};
use weft_webhook::testing::{Harness, TokenSigner, csr, issue, request_certificate};

const ID_A: &str = "spiffe://cluster.local/ns/genesis/sa/service-a";

fn body(csr: String) -> Vec<u8> {
    serde_json::to_vec(&CertificateRequest {
        csr,
        validity_secs: None,
    })
    .expect("json")
}

fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorResponse>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

#[tokio::test]
async fn refuses_what_the_token_does_not_grant() {
    let h = Harness::start(&[]).await;
    let (csr_a, _) = csr(&[ID_A]);
    let cases: Vec<(&str, Option<String>, String, u16, &str)> = vec![
        (
            "token of another service account",
            Some(h.signer.token("genesis", "service-b", "weft-ca", 3600)),
            csr_a.clone(),
            403,
            "identity mismatch",
        ),
        (
            "csr for another identity",
            Some(h.signer.token("genesis", "service-a", "weft-ca", 3600)),
            csr(&["spiffe://cluster.local/ns/genesis/sa/admin"]).0,
            403,
            "identity mismatch",
        ),
        (
            "csr with a second identity",
            Some(h.signer.token("genesis", "service-a", "weft-ca", 3600)),
            csr(&[ID_A, "spiffe://cluster.local/ns/other/sa/x"]).0,
            403,
            "identity mismatch",
        ),
        (
            "expired token",
            Some(h.signer.token("genesis", "service-a", "weft-ca", -3600)),
            csr_a.clone(),
            401,
            "expired",
        ),
        (
            "wrong audience",
            Some(h.signer.token("genesis", "service-a", "kubernetes", 3600)),
            csr_a.clone(),
            401,
            "audience",
        ),
        (
            "token signed by another key",
            Some(TokenSigner::new().token("genesis", "service-a", "weft-ca", 3600)),
            csr_a.clone(),
            401,
            "signature",
        ),
        ("no token", None, csr_a.clone(), 401, "missing bearer token"),
        (
            "malformed csr",
            Some(h.signer.token("genesis", "service-a", "weft-ca", 3600)),
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            400,
            "malformed csr",
        ),
    ];
    for (what, token, csr, status, message) in cases {
        let (got, body) =
            request_certificate(h.addr, &h.roots_pem, token.as_deref(), &body(csr)).await;
        let error = error_of(&body);
        assert_eq!(got, status, "{what}: {error}");
        assert!(
            error.contains(message),
            "{what}: {error:?} lacks {message:?}"
        );
    }
    let (got, body) = request_certificate(
        h.addr,
        &h.roots_pem,
        Some(&h.signer.token("genesis", "service-a", "weft-ca", 3600)),
        b"not json",
    )
    .await;
    assert_eq!(got, 400, "{}", error_of(&body));
    let metrics = h.discovery.metrics().encode();
    assert!(
        metrics.contains("weft_ca_refused_total{reason=\"identity\"} 3"),
        "{metrics}"
    );
    h.stop().await;
}

fn parse(pem: &str) -> x509_parser::certificate::X509Certificate<'static> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
    let der: &'static [u8] = Box::leak(der.as_ref().to_vec().into_boxed_slice());
    x509_parser::parse_x509_certificate(der).expect("x509").1
}

fn verify_chain(resp: &CertificateResponse) {
    let roots: Vec<CertificateDer<'static>> = resp
        .roots
        .iter()
        .map(|r| CertificateDer::from_pem_slice(r.as_bytes()).expect("root"))
        .collect();
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .expect("anchor")
                .to_owned()
        })
        .collect();
    let leaf = CertificateDer::from_pem_slice(resp.cert_chain[0].as_bytes()).expect("leaf");
    let intermediates: Vec<CertificateDer<'static>> = resp.cert_chain[1..]
        .iter()
        .map(|c| CertificateDer::from_pem_slice(c.as_bytes()).expect("intermediate"))
        .collect();
    let ee = webpki::EndEntityCert::try_from(&leaf).expect("end entity");
    ee.verify_for_usage(
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
        &anchors,
        &intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .expect("chains to the root as a client certificate");
    ee.verify_for_usage(
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
        &anchors,
        &intermediates,
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .expect("and as a server certificate");
}

#[tokio::test]
async fn signs_a_correct_request() {
    let h = Harness::start(&[]).await;
    let (resp, _key) = issue(h.addr, &h.roots_pem, &h.signer, "genesis", "service-a").await;
    assert_eq!(resp.cert_chain.len(), 1);
    assert_eq!(resp.roots.len(), 1);
    let cert = parse(&resp.cert_chain[0]);
    assert!(
        cert.subject().iter_attributes().next().is_none(),
        "empty subject"
    );
    let san = cert
        .subject_alternative_name()
        .expect("san")
        .expect("present");
    assert!(san.critical, "SAN is critical with an empty subject");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    assert_eq!(names, [format!("URI({ID_A:?})")]);
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    let bc = cert.basic_constraints().expect("bc");
    assert!(bc.is_none_or(|b| !b.value.ca));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let not_after = cert.validity().not_after.timestamp();
    let not_before = cert.validity().not_before.timestamp();
    assert!((not_after - now - 24 * 3600).abs() < 120, "24 h lifetime");
    assert!(
        not_before <= now && now - not_before < 600,
        "back-dated a little"
    );
    verify_chain(&resp);
    h.stop().await;
}

/// Istio's `cacerts`: a root, an intermediate that signs, `cert-chain.pem` = intermediate +
/// root, `root-cert.pem` holding the current and the next root.
#[tokio::test]
async fn cacerts_intermediate_layout() {
    let root_key = KeyPair::generate().expect("key");
    let mut root = CertificateParams::default();
    root.distinguished_name = DistinguishedName::new();
    root.distinguished_name
        .push(DnType::CommonName, "user root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = root.self_signed(&root_key).expect("root");
    let root_issuer = Issuer::new(root, root_key);
    let inter_key = KeyPair::generate().expect("key");
    let mut inter = CertificateParams::default();
    inter.distinguished_name = DistinguishedName::new();
    inter
        .distinguished_name
        .push(DnType::CommonName, "user intermediate");
    inter.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    inter.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let inter_cert = inter
        .signed_by(&inter_key, &root_issuer)
        .expect("intermediate");
    let next_root = Material::generate("cluster.local")
        .expect("next root")
        .root_cert;
    let material = Material {
        ca_cert: inter_cert.pem(),
        ca_key: inter_key.serialize_pem(),
        cert_chain: format!("{}{}", inter_cert.pem(), root_cert.pem()),
        root_cert: format!("{}{}", root_cert.pem(), next_root),
    };
    let h = Harness::start_with(&[], Some(material)).await;
    let (resp, _) = issue(h.addr, &h.roots_pem, &h.signer, "genesis", "service-a").await;
    assert_eq!(
        resp.cert_chain.len(),
        2,
        "leaf then the intermediate, no root"
    );
    assert_eq!(
        parse(&resp.cert_chain[1]).subject().to_string(),
        "CN=user intermediate"
    );
    assert_eq!(resp.roots.len(), 2, "both roots of the rotation");
    verify_chain(&resp);
    h.stop().await;
}

#[tokio::test]
async fn the_port_refuses_clients_without_the_mesh_root() {
    let h = Harness::start(&[]).await;
    let other = Material::generate("cluster.local")
        .expect("other root")
        .root_cert;
    let tcp = tokio::net::TcpStream::connect(h.addr).await.expect("tcp");
    let tls = weft_webhook::testing::client_tls(&other, None);
    let name =
        rustls_pki_types::ServerName::try_from("weft-control-plane.weft-system.svc").expect("name");
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .expect("handshake finishes");
    assert!(
        result.is_err(),
        "the serving certificate chains to the mesh root only"
    );
    h.stop().await;
}

/// Verifies `resp`'s leaf through its chain to the roots of a `root-cert.pem` file (not to the
/// roots the CA answered with).
fn verify_to_root_file(resp: &CertificateResponse, root_cert_pem: &str) {
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(root_cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("root-cert.pem");
    assert!(!roots.is_empty(), "root-cert.pem holds a certificate");
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .expect("anchor")
                .to_owned()
        })
        .collect();
    let leaf = CertificateDer::from_pem_slice(resp.cert_chain[0].as_bytes()).expect("leaf");
    let intermediates: Vec<CertificateDer<'static>> = resp.cert_chain[1..]
        .iter()
        .map(|c| CertificateDer::from_pem_slice(c.as_bytes()).expect("intermediate"))
        .collect();
    let ee = webpki::EndEntityCert::try_from(&leaf).expect("end entity");
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            &intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .expect("the workload certificate chains to root-cert.pem through ca-cert.pem");
    }
    // Without the intermediate the leaf does not verify: the chain is what carries it.
    let ee = webpki::EndEntityCert::try_from(&leaf).expect("end entity");
    assert!(
        ee.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .is_err()
    );
}

/// Loads the `cacerts` directory `dir` as the control plane does with `--ca-dir`, runs the CA
/// on its TLS port and has it sign a workload certificate.
async fn sign_with_cacerts_dir(dir: &std::path::Path) {
    let files_before: Vec<(String, String)> = [
        store::FILE_CA_CERT,
        store::FILE_CA_KEY,
        store::FILE_CERT_CHAIN,
        store::FILE_ROOT_CERT,
    ]
    .iter()
    .map(|f| {
        (
            (*f).to_owned(),
            std::fs::read_to_string(dir.join(f)).expect("cacerts file"),
        )
    })
    .collect();
    let material = load_or_create_dir(dir, "cluster.local").expect("the user's cacerts load");
    // Loading never rewrites the user's files.
    for (f, text) in &files_before {
        assert_eq!(
            &std::fs::read_to_string(dir.join(f)).expect("read"),
            text,
            "{f}"
        );
    }
    let root_file = std::fs::read_to_string(dir.join(store::FILE_ROOT_CERT)).expect("root");
    let ca_cert_file = std::fs::read_to_string(dir.join(store::FILE_CA_CERT)).expect("ca cert");
    let h = Harness::start_with(&[], Some(material)).await;
    let (resp, _key) = issue(h.addr, &h.roots_pem, &h.signer, "genesis", "service-a").await;
    assert_eq!(resp.cert_chain.len(), 2, "leaf, then the intermediate");
    assert_eq!(
        CertificateDer::from_pem_slice(resp.cert_chain[1].as_bytes()).expect("der"),
        CertificateDer::from_pem_slice(ca_cert_file.as_bytes()).expect("der"),
        "the intermediate sent is ca-cert.pem"
    );
    assert_eq!(resp.roots.len(), 1);
    assert_eq!(
        CertificateDer::from_pem_slice(resp.roots[0].as_bytes()).expect("der"),
        CertificateDer::from_pem_slice(root_file.as_bytes()).expect("der"),
        "the trust bundle is root-cert.pem"
    );
    let leaf = parse(&resp.cert_chain[0]);
    assert_eq!(
        leaf.issuer().to_string(),
        parse(&ca_cert_file).subject().to_string()
    );
    verify_to_root_file(&resp, &root_file);
    h.stop().await;
}

/// Istio's `cacerts` as files: ECDSA keys (PKCS#8), intermediate signing.
#[tokio::test]
async fn cacerts_directory_from_files() {
    let root_key = KeyPair::generate().expect("key");
    let mut root = CertificateParams::default();
    root.distinguished_name = DistinguishedName::new();
    root.distinguished_name
        .push(DnType::CommonName, "user root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = root.self_signed(&root_key).expect("root");
    let root_issuer = Issuer::new(root, root_key);
    let inter_key = KeyPair::generate().expect("key");
    let mut inter = CertificateParams::default();
    inter.distinguished_name = DistinguishedName::new();
    inter
        .distinguished_name
        .push(DnType::CommonName, "user intermediate");
    inter.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    inter.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let inter_cert = inter
        .signed_by(&inter_key, &root_issuer)
        .expect("intermediate");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("cacerts");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join(store::FILE_CA_CERT), inter_cert.pem()).expect("write");
    std::fs::write(dir.join(store::FILE_CA_KEY), inter_key.serialize_pem()).expect("write");
    std::fs::write(
        dir.join(store::FILE_CERT_CHAIN),
        format!("{}{}", inter_cert.pem(), root_cert.pem()),
    )
    .expect("write");
    std::fs::write(dir.join(store::FILE_ROOT_CERT), root_cert.pem()).expect("write");
    sign_with_cacerts_dir(&dir).await;
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run openssl ({e}): this test makes the cacerts files with the openssl \
                 command line (Debian package openssl), as Istio's instructions do"
            )
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Istio's `cacerts` made the way Istio's certificate tools make them: RSA keys in PKCS#1
/// (`BEGIN RSA PRIVATE KEY`), an intermediate signed by the root with openssl.
#[tokio::test]
async fn cacerts_directory_with_rsa_pkcs1_keys_from_openssl() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("cacerts");
    std::fs::create_dir(&dir).expect("mkdir");
    let work = tmp.path();
    openssl(
        work,
        &["genrsa", "-traditional", "-out", "root-key.pem", "2048"],
    );
    openssl(
        work,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root-key.pem",
            "-sha256",
            "-days",
            "3650",
            "-subj",
            "/O=Istio/CN=Root CA",
            "-addext",
            "basicConstraints=critical,CA:true",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "cacerts/root-cert.pem",
        ],
    );
    openssl(
        work,
        &[
            "genrsa",
            "-traditional",
            "-out",
            "cacerts/ca-key.pem",
            "2048",
        ],
    );
    openssl(
        work,
        &[
            "req",
            "-new",
            "-key",
            "cacerts/ca-key.pem",
            "-sha256",
            "-subj",
            "/O=Istio/CN=Intermediate CA/L=cluster1",
            "-out",
            "ca.csr",
        ],
    );
    std::fs::write(
        work.join("ca.ext"),
        "basicConstraints = critical, CA:true, pathlen:0\n\
         keyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign\n\
         subjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid:always\n",
    )
    .expect("ext");
    openssl(
        work,
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            "cacerts/root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-days",
            "730",
            "-sha256",
            "-extfile",
            "ca.ext",
            "-out",
            "cacerts/ca-cert.pem",
        ],
    );
    let ca_cert = std::fs::read_to_string(dir.join("ca-cert.pem")).expect("ca cert");
    let root_cert = std::fs::read_to_string(dir.join("root-cert.pem")).expect("root");
    std::fs::write(dir.join("cert-chain.pem"), format!("{ca_cert}{root_cert}")).expect("chain");
    let key = std::fs::read_to_string(dir.join("ca-key.pem")).expect("key");
    assert!(
        key.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "openssl wrote PKCS#1: {}",
        key.lines().next().unwrap_or_default()
    );
    sign_with_cacerts_dir(&dir).await;
}
