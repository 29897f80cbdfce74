//! The API server's admission step, as the local node plays it: `weft-webhook serve` runs in
//! the node's network namespace, and every pod created in a namespace labelled
//! `istio-injection=enabled` is sent to it as a real `admission.k8s.io/v1` AdmissionReview
//! over HTTPS; the JSON patch it answers is applied before the pod runs.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::network;
use crate::exec::{ExecSpec, SPEC_ENV};

/// Where the webhook listens in the node namespace.
pub const WEBHOOK_ADDR: &str = "10.44.0.1:443";
/// The name its serving certificate carries.
const WEBHOOK_NAME: &str = "weft-control-plane.weft-system.svc";

/// A running `weft-webhook serve`.
#[derive(Debug)]
pub struct Webhook {
    child: Child,
    ca: Vec<CertificateDer<'static>>,
    node_ns: String,
    /// Its log.
    pub log: PathBuf,
}

/// Why admission did not let a pod through.
#[derive(Debug, thiserror::Error)]
#[error("admission webhook denied the pod: {0}")]
pub struct Denied(pub String);

impl Webhook {
    /// Starts the webhook with `mesh_config` (YAML) and `extra` arguments and waits until it
    /// answers.
    pub fn start(
        bins: &Path,
        node_ns: &str,
        dir: &Path,
        mesh_config: &str,
        extra: &[String],
    ) -> anyhow::Result<Webhook> {
        let mesh = dir.join("mesh.yaml");
        std::fs::write(&mesh, mesh_config)?;
        let ca_out = dir.join("webhook-ca.pem");
        let _ = std::fs::remove_file(&ca_out);
        let log = dir.join("webhook.log");
        let mut argv = vec![
            bins.join("weft-webhook").display().to_string(),
            "serve".into(),
            "--listen".into(),
            WEBHOOK_ADDR.into(),
            "--ca-out".into(),
            ca_out.display().to_string(),
            "--kubernetes".into(),
            "false".into(),
            "--mesh-config".into(),
            mesh.display().to_string(),
        ];
        argv.extend(extra.iter().cloned());
        let spec = ExecSpec {
            netns: PathBuf::from(network::netns_path(node_ns)),
            argv,
            env: vec![
                ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
                ("RUST_LOG".into(), "info".into()),
            ],
            ..Default::default()
        };
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bins.join("weft-pod-exec"))
            .env_clear()
            .env(SPEC_ENV, serde_json::to_string(&spec)?)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start weft-webhook")?;
        let mut webhook = Webhook {
            child,
            ca: Vec::new(),
            node_ns: node_ns.to_owned(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = webhook.child.try_wait()? {
                bail!(
                    "weft-webhook exited ({status}): {}",
                    std::fs::read_to_string(&webhook.log).unwrap_or_default()
                );
            }
            if ca_out.exists()
                && let Ok(ca) = CertificateDer::pem_file_iter(&ca_out)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                && !ca.is_empty()
            {
                webhook.ca = ca;
                if webhook.post("/healthz", None).is_ok() {
                    return Ok(webhook);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "weft-webhook did not come up: {}",
                std::fs::read_to_string(&webhook.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends the pod through `/inject` as the API server would for a CREATE, and applies the
    /// patch. Returns the pod to run and the webhook's warnings.
    pub fn mutate(&self, pod: &Pod) -> anyhow::Result<(Pod, Vec<String>)> {
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let uid = format!("localnode-{}-{}", std::process::id(), now_nanos());
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": pod.metadata.name,
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod,
                "oldObject": null,
                "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
            }
        });
        let (status, body) = self.post("/inject", Some(serde_json::to_vec(&review)?))?;
        anyhow::ensure!(
            status == 200,
            "webhook answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        let answer: serde_json::Value =
            serde_json::from_slice(&body).context("AdmissionReview answer")?;
        let response = &answer["response"];
        anyhow::ensure!(
            response["uid"] == uid,
            "answer for another request: {answer}"
        );
        let warnings = response["warnings"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter_map(|w| w.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if response["allowed"] != true {
            return Err(Denied(
                response["status"]["message"]
                    .as_str()
                    .unwrap_or("no reason given")
                    .to_owned(),
            )
            .into());
        }
        let Some(patch) = response["patch"].as_str() else {
            return Ok((pod.clone(), warnings));
        };
        anyhow::ensure!(
            response["patchType"] == "JSONPatch",
            "unexpected patchType {}",
            response["patchType"]
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .context("patch is not base64")?;
        let patch: json_patch::Patch =
            serde_json::from_slice(&bytes).context("patch is not a JSON patch")?;
        let mut value = serde_json::to_value(pod)?;
        json_patch::patch(&mut value, &patch).context("the patch does not apply to the pod")?;
        Ok((
            serde_json::from_value(value).context("patched pod")?,
            warnings,
        ))
    }

    /// One HTTPS request from the node's network.
    fn post(&self, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<(u16, Vec<u8>)> {
        let addr: SocketAddr = WEBHOOK_ADDR.parse()?;
        let tcp = network::in_netns(&self.node_ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })??;
        tcp.set_nonblocking(true)?;
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let path = path.to_owned();
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from(WEBHOOK_NAME)?, tcp)
                .await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            let method = if body.is_some() { "POST" } else { "GET" };
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, WEBHOOK_NAME)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
            let resp =
                tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok((status, bytes.to_vec()))
        })
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
