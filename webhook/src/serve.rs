//! `weft-webhook serve`: the control-plane process. It loads the mesh config, gets its serving
//! certificate, registers itself with the cluster when there is one, and serves the webhook.
//!
//! Subsystems are assembled here: each contributes routes (merged into one router behind one
//! TLS listener) and background tasks (run until shutdown). The CA and discovery will join the
//! same way.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::mesh::{MeshConfig, MeshError};
use crate::registration::{self, RegistrationError};
use crate::server::{self, AppState, ServerError};
use crate::serving_cert::{self, CertError, ServingCert};

/// How often the webhook configurations' caBundle is checked.
pub const CA_BUNDLE_RECHECK: Duration = Duration::from_secs(60);

/// Options of `weft-webhook serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Mesh config file; defaults when absent.
    pub mesh_config: Option<PathBuf>,
    /// Serving certificate (PEM chain) and key; generated when absent.
    pub tls_cert: Option<PathBuf>,
    /// Key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// CA to publish as caBundle when `tls_cert` is given (default: the chain's last cert).
    pub tls_ca: Option<PathBuf>,
    /// Service name the API server calls (certificate SANs).
    pub service: String,
    /// Namespace of the control plane.
    pub namespace: String,
    /// Keep the generated certificate in this Secret (shared by replicas and restarts).
    pub serving_cert_secret: Option<String>,
    /// Name of the Mutating- and ValidatingWebhookConfiguration whose caBundle to keep.
    pub patch_webhook_ca: Option<String>,
    /// Write the CA clients must trust to this file (for the local node and scripts).
    pub ca_out: Option<PathBuf>,
    /// Talk to a cluster: `Some(true)` always, `Some(false)` never, `None` when in a pod or
    /// when an option needs it.
    pub kubernetes: Option<bool>,
}

/// Errors that stop `serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The mesh config is invalid.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// The serving certificate is unusable.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The cluster could not be reached or refused.
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    /// The kube client could not be configured.
    #[error("cannot configure the kubernetes client")]
    Kube(#[source] kube::Error),
    /// The listener failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// Writing `--ca-out` failed.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--tls-cert` without `--tls-key` or the reverse.
    #[error("--tls-cert and --tls-key go together")]
    HalfTls,
}

/// Runs the control plane until `shutdown` completes.
pub async fn run(opts: ServeOptions, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let mesh = match &opts.mesh_config {
        Some(path) => MeshConfig::load(path)?,
        None => MeshConfig::default(),
    };
    info!(
        proxy_image = %mesh.proxy_image,
        init_image = %mesh.init_image,
        control_plane = %mesh.control_plane_address,
        trust_domain = %mesh.trust_domain,
        native_sidecar = %mesh.native_sidecar,
        "mesh config"
    );

    let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let wants_cluster = opts
        .kubernetes
        .unwrap_or(in_pod || opts.patch_webhook_ca.is_some() || opts.serving_cert_secret.is_some());
    let client = if wants_cluster {
        Some(
            kube::Client::try_default()
                .await
                .map_err(ServeError::Kube)?,
        )
    } else {
        None
    };

    let cluster_native = match &client {
        None => None,
        Some(c) => match registration::supports_native_sidecars(c).await {
            Ok(yes) => Some(yes),
            Err(error) => {
                warn!(%error, "api server version unknown; nativeSidecar auto means classic");
                Some(false)
            }
        },
    };

    let dns_names = serving_cert::service_dns_names(&opts.service, &opts.namespace);
    let cert: ServingCert = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => serving_cert::from_files(c, k, opts.tls_ca.as_deref())?,
        (None, None) => match (&client, &opts.serving_cert_secret) {
            (Some(client), Some(secret)) => {
                registration::serving_cert_from_secret(client, &opts.namespace, secret, &dns_names)
                    .await?
            }
            _ => serving_cert::generate(&dns_names)?,
        },
        _ => return Err(ServeError::HalfTls),
    };
    if let Some(path) = &opts.ca_out {
        std::fs::write(path, &cert.ca_pem).map_err(|source| ServeError::Write {
            path: path.display().to_string(),
            source,
        })?;
    }
    let tls = serving_cert::server_config(&cert)?;

    let mut tasks = JoinSet::new();
    if let (Some(client), Some(name)) = (&client, &opts.patch_webhook_ca) {
        // The first update must succeed: without it the API server cannot call us.
        registration::patch_ca_bundle(client, name, &cert.ca_pem).await?;
        tasks.spawn(registration::keep_ca_bundle(
            client.clone(),
            name.clone(),
            cert.ca_pem.clone(),
            CA_BUNDLE_RECHECK,
        ));
    }

    let state = Arc::new(AppState {
        mesh,
        cluster_supports_native_sidecars: cluster_native,
    });
    let router = server::router(state);
    let listener = server::bind(opts.listen).await?;
    let result = server::serve(listener, tls, router, shutdown).await;
    tasks.shutdown().await;
    result.map_err(ServeError::from)
}
