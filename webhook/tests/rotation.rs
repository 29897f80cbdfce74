//! Root rotation through the whole `serve` wiring in local mode: a root added to the extra
//! roots, then a new CA written to the CA directory, reach a connected proxy on its open
//! config stream, the published root file, the CA and the port's own TLS, without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use weft_api::discovery::{CertificateRequest, CertificateResponse, DiscoveryResponse, Node};
use weft_webhook::ca::Material;
use weft_webhook::serve::{ServeOptions, run};
use weft_webhook::testing::{
    ProxyStream, TokenSigner, client_tls, csr, issue, request_certificate,
};

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: service-a-1
  namespace: genesis
  labels: {app: service-a}
  annotations: {sidecar.istio.io/status: '{}'}
spec:
  serviceAccountName: service-a
  containers: [{name: app, image: x}]
status: {podIP: 10.44.0.2}
"#;

const WAIT: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Whether the leaf of `resp` chains to `root` alone. (Generated roots all have the same
/// name, so names tell nothing.)
fn chains_to(resp: &CertificateResponse, root: &str) -> bool {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, UnixTime};
    let root = CertificateDer::from_pem_slice(root.as_bytes()).expect("root");
    let anchors = vec![
        webpki::anchor_from_trusted_cert(&root)
            .expect("anchor")
            .to_owned(),
    ];
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
    .is_ok()
}

/// The next message whose trust bundle satisfies `want`, acknowledging every one read.
async fn bundle_where(p: &mut ProxyStream, want: impl Fn(&[String]) -> bool) -> DiscoveryResponse {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = p
            .next(left)
            .await
            .expect("a snapshot on the open stream before the deadline");
        p.ack(&m.version).await;
        if want(&m.trust_bundle) {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_root_and_a_new_ca_reach_an_open_stream() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = tmp.path().join("config");
    let ca_dir = tmp.path().join("ca");
    let extra = tmp.path().join("extra-roots");
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::create_dir_all(&extra).expect("mkdir");
    write(&config.join("pods.yaml"), PODS);
    let signer = TokenSigner::new();
    let key = tmp.path().join("token-key.pub");
    std::fs::write(&key, signer.public_key_pem()).expect("write key");

    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut opts = ServeOptions::new(([127, 0, 0, 1], free_port()).into());
    opts.kubernetes = Some(false);
    opts.local_dir = Some(config.clone());
    opts.ca_dir = Some(ca_dir.clone());
    opts.token_public_key = Some(key);
    opts.control_plane_listen = addr;
    opts.serving_ips = vec![addr.ip()];
    opts.extra_roots = vec![extra.clone()];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(opts, async move {
        let _ = stopped.await;
    }));

    // Up: the root file is published and the port answers.
    let deadline = tokio::time::Instant::now() + WAIT;
    let old_root = loop {
        if let Ok(root) = std::fs::read_to_string(ca_dir.join("root-cert.pem"))
            && !root.is_empty()
            && tokio::net::TcpStream::connect(addr).await.is_ok()
        {
            break root;
        }
        assert!(!server.is_finished(), "serve stopped: {:?}", server.await);
        assert!(
            tokio::time::Instant::now() < deadline,
            "control plane not up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let (cert, key) = issue(addr, &old_root, &signer, "genesis", "service-a").await;
    let tls = client_tls(
        &old_root,
        Some((&cert.cert_chain.concat(), &key.serialize_pem())),
    );
    let node = Node {
        name: "service-a-1".into(),
        namespace: "genesis".into(),
        ip: None,
        proxy_version: "test".into(),
    };
    let mut p = ProxyStream::open(addr, tls, node.clone()).await;
    assert_eq!(p.status, 200, "{:?}", p.error_body);
    let first = p.next(WAIT).await.expect("first snapshot");
    assert_eq!(first.trust_bundle, vec![old_root.clone()]);
    p.ack(&first.version).await;

    // 1. A new root dropped in the extra-root directory: pushed on the open stream.
    let next = Material::generate("cluster.local").expect("next root");
    write(&extra.join("next.pem"), &next.root_cert);
    let m = bundle_where(&mut p, |b| b.len() == 2).await;
    assert!(chains_to(&cert, &old_root) && !chains_to(&cert, &next.root_cert));
    assert_eq!(
        m.trust_bundle,
        vec![old_root.clone(), next.root_cert.clone()]
    );
    assert!(m.version.parse::<u64>().expect("n") > first.version.parse::<u64>().expect("n"));
    assert_eq!(
        std::fs::read_to_string(ca_dir.join("root-cert.pem")).expect("published"),
        m.trust_bundle.concat(),
        "the bootstrap root file holds the bundle"
    );

    // 2. The CA itself replaced by the next root (its root file keeps the old one: the
    // overlap). New certificates come from the next root; the port serves a certificate of
    // the next root, so a client that trusts only the next root gets in.
    write(&ca_dir.join("ca-key.pem"), &next.ca_key);
    write(&ca_dir.join("ca-cert.pem"), &next.ca_cert);
    write(
        &ca_dir.join("root-cert.pem"),
        &format!("{}{}", next.root_cert, old_root),
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    let (new_cert, new_key) = loop {
        // A certificate request trusting both roots, as a proxy with the bundle would.
        let (resp, key) = issue(
            addr,
            &format!("{old_root}{}", next.root_cert),
            &signer,
            "genesis",
            "service-a",
        )
        .await;
        if chains_to(&resp, &next.root_cert) {
            break (resp, key);
        }
        assert!(chains_to(&resp, &old_root), "from one root or the other");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CA never switched"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(new_cert.roots.contains(&next.root_cert));
    let (csr_pem, _) = csr(&["spiffe://cluster.local/ns/genesis/sa/service-a"]);
    let body = serde_json::to_vec(&CertificateRequest {
        csr: csr_pem,
        validity_secs: None,
    })
    .expect("json");
    let token = signer.token("genesis", "service-a", "weft-ca", 600);
    let (status, _) = request_certificate(addr, &next.root_cert, Some(&token), &body).await;
    assert_eq!(status, 200, "the port's certificate comes from the new CA");

    // The open stream is still the same one and keeps both roots.
    let m = bundle_where(&mut p, |b| {
        b.contains(&next.root_cert) && b.contains(&old_root)
    })
    .await;
    assert_eq!(m.trust_bundle.len(), 2);
    // A proxy with a certificate of the new CA opens its stream; so does the old one's
    // certificate (the old root is still trusted).
    let tls = client_tls(
        &next.root_cert,
        Some((&new_cert.cert_chain.concat(), &new_key.serialize_pem())),
    );
    let mut q = ProxyStream::open(addr, tls, node).await;
    assert_eq!(q.status, 200, "{:?}", q.error_body);
    let snapshot = q
        .next(WAIT)
        .await
        .expect("snapshot for the new certificate");
    assert!(snapshot.trust_bundle.contains(&next.root_cert));

    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, server).await;
}
