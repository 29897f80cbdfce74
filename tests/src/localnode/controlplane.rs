//! The control plane of the local node: `weft-webhook serve` in local mode, in the node's
//! network namespace. It reads the node's objects from a YAML directory the node keeps in
//! step, signs workload certificates for tokens the node signs, streams config to proxies on
//! 10.44.0.1:15012, and is the admission webhook: every pod created in a namespace labelled
//! `istio-injection=enabled` is sent to it as a real `admission.k8s.io/v1` AdmissionReview
//! over HTTPS, and the JSON patch it answers is applied before the pod runs.

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

/// The node's address on its bridge, where control planes listen.
pub const NODE_IP: &str = "10.44.0.1";
/// The name the webhook's serving certificate carries.
const WEBHOOK_NAME: &str = "weft-control-plane.weft-system.svc";

/// A running control plane (and admission webhook).
#[derive(Debug)]
pub struct ControlPlane {
    child: Child,
    ca: Vec<CertificateDer<'static>>,
    node_ns: String,
    webhook_addr: SocketAddr,
    /// `host:port` of its CA and discovery port.
    pub address: String,
    /// PEM of the mesh root it signs with (what pods get as `weft-ca-root-cert`).
    pub root_cert_pem: String,
    /// Its log.
    pub log: PathBuf,
}

/// Ports and directories of one control-plane instance.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Its own directory (CA, mesh config, log).
    pub dir: PathBuf,
    /// The YAML directory it reads (shared by every instance of a node).
    pub config_dir: PathBuf,
    /// Public key verifying the node's tokens.
    pub token_key: PathBuf,
    /// Webhook port.
    pub webhook_port: u16,
    /// CA and discovery port.
    pub control_port: u16,
    /// cgroup it runs in (removed with the node).
    pub cgroup: PathBuf,
    /// More arguments (`--max-cert-ttl`, `--extra-root`).
    pub extra_args: Vec<String>,
}

/// Why admission did not let a pod through.
#[derive(Debug, thiserror::Error)]
#[error("admission webhook denied the pod: {0}")]
pub struct Denied(pub String);

/// What `/debug/sync` says.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SyncStatus {
    /// Store generation.
    pub generation: u64,
    /// Connected proxies.
    pub proxies: Vec<ProxySync>,
}

/// One proxy in `/debug/sync`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ProxySync {
    /// `namespace/name`.
    pub proxy: String,
    /// Last version sent.
    pub sent: Option<String>,
    /// Last version acknowledged.
    pub acked: Option<String>,
    /// Store generation its view is current at.
    pub generation: u64,
}

impl ProxySync {
    /// Up to date with the store at `generation`.
    pub fn synced(&self, generation: u64) -> bool {
        self.generation >= generation && self.sent.is_some() && self.sent == self.acked
    }
}

impl ControlPlane {
    /// Starts a control plane with `mesh_config` (YAML) and waits until it answers and its
    /// root certificate is written.
    pub fn start(
        bins: &Path,
        node_ns: &str,
        inst: &Instance,
        mesh_config: &str,
    ) -> anyhow::Result<ControlPlane> {
        let dir = &inst.dir;
        std::fs::create_dir_all(dir)?;
        std::fs::create_dir_all(&inst.cgroup)?;
        let mesh = dir.join("mesh.yaml");
        std::fs::write(&mesh, mesh_config)?;
        let ca_out = dir.join("webhook-ca.pem");
        let _ = std::fs::remove_file(&ca_out);
        let log = dir.join("control-plane.log");
        let webhook_addr: SocketAddr = format!("{NODE_IP}:{}", inst.webhook_port).parse()?;
        let address = format!("{NODE_IP}:{}", inst.control_port);
        let argv = vec![
            bins.join("weft-webhook").display().to_string(),
            "serve".into(),
            "--listen".into(),
            webhook_addr.to_string(),
            "--ca-out".into(),
            ca_out.display().to_string(),
            "--kubernetes".into(),
            "false".into(),
            "--mesh-config".into(),
            mesh.display().to_string(),
            "--local-dir".into(),
            inst.config_dir.display().to_string(),
            "--ca-dir".into(),
            dir.join("ca").display().to_string(),
            "--token-public-key".into(),
            inst.token_key.display().to_string(),
            "--control-plane-listen".into(),
            address.clone(),
            "--serving-ip".into(),
            NODE_IP.into(),
        ];
        let argv: Vec<String> = argv
            .into_iter()
            .chain(inst.extra_args.iter().cloned())
            .collect();
        let spec = ExecSpec {
            netns: PathBuf::from(network::netns_path(node_ns)),
            cgroup: Some(inst.cgroup.clone()),
            argv,
            env: vec![
                ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
                ("RUST_LOG".into(), "info".into()),
            ],
            ..Default::default()
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(bins.join("weft-pod-exec"))
            .env_clear()
            .env(SPEC_ENV, serde_json::to_string(&spec)?)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start weft-webhook")?;
        let mut cp = ControlPlane {
            child,
            ca: Vec::new(),
            node_ns: node_ns.to_owned(),
            webhook_addr,
            address,
            root_cert_pem: String::new(),
            log,
        };
        let root = dir.join("ca").join("root-cert.pem");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = cp.child.try_wait()? {
                bail!(
                    "the control plane exited ({status}): {}",
                    std::fs::read_to_string(&cp.log).unwrap_or_default()
                );
            }
            if let Ok(ca) = CertificateDer::pem_file_iter(&ca_out)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                && !ca.is_empty()
            {
                cp.ca = ca;
                if cp.post("/healthz", None).is_ok()
                    && let Ok(pem) = std::fs::read_to_string(&root)
                    && pem.contains("BEGIN CERTIFICATE")
                {
                    cp.root_cert_pem = pem;
                    return Ok(cp);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the control plane did not come up: {}",
                std::fs::read_to_string(&cp.log).unwrap_or_default()
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

    /// Where proxies stand (`/debug/sync`).
    pub fn sync_status(&self) -> anyhow::Result<SyncStatus> {
        let (status, body) = self.post("/debug/sync", None)?;
        anyhow::ensure!(status == 200, "/debug/sync answered {status}");
        Ok(serde_json::from_slice(&body)?)
    }

    /// The snapshot it computes for a pod (`/debug/config_dump?proxy=ns/name`).
    pub fn config_dump(&self, namespace: &str, name: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.post(
            &format!("/debug/config_dump?proxy={namespace}/{name}"),
            None,
        )?;
        anyhow::ensure!(
            status == 200,
            "/debug/config_dump answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok(serde_json::from_slice(&body)?)
    }

    /// Stops the process (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// One HTTPS request from the node's network.
    fn post(&self, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<(u16, Vec<u8>)> {
        let addr = self.webhook_addr;
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

impl Drop for ControlPlane {
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
