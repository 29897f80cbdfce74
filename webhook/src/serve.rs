//! `weft-webhook serve`: the control-plane process. It loads the mesh config, gets its serving
//! certificate, registers itself with the cluster when there is one, and serves the webhook.
//!
//! Subsystems are assembled here: each contributes routes and background tasks (run until
//! shutdown). The mesh CA and config distribution listen on their own TLS port
//! (`--control-plane-listen`, 15012) and run in one of two modes:
//!
//! - local (`--local-dir DIR`): config from a directory of YAML, the CA in `--ca-dir` (root
//!   published as `<ca-dir>/root-cert.pem`), tokens checked with `--token-public-key`;
//! - Kubernetes (in a pod, or `--kubernetes true`): watches, the CA in a Secret (`cacerts` if
//!   the user made one, else `weft-ca`), TokenReview, the root published as a ConfigMap in
//!   every namespace with meshed pods.
//!
//! In both, the CA material and the extra roots are read again while running (see
//! [`crate::control_plane::trust`]): a new root or CA reaches every proxy on its open config
//! stream, the published root file or ConfigMaps, and the port's own TLS.
//!
//! In both, the injector reads the nodes from the store: a pod in eBPF interception mode keeps
//! it only where the nodes' eBPF agents are ready (see [`crate::inject::mode`]).
//!
//! Without either (`--kubernetes false` and no `--local-dir`) only the webhook runs, knowing no
//! nodes: a pod in eBPF mode keeps it.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::ca::store::{self as ca_store, StoreError};
use crate::ca::token::{TokenError, TokenVerifier};
use crate::ca::{CaError, CaOptions, Material};
use crate::control_plane::trust::{CaSource, Rotation, TrustError};
use crate::control_plane::{self, ControlPlane, ControlPlaneError, LiveCa, LiveTls};
use crate::discovery::{DEBOUNCE, Discovery};
use crate::mesh::{MeshConfig, MeshError};
use crate::metrics::Metrics;
use crate::registration::{self, RegistrationError};
use crate::resources::{Settings, Store};
use crate::server::{self, AppState, NodeSource, ServerError};
use crate::serving_cert::{self, CertError, ServingCert};
use crate::source::kube as kube_source;
use crate::source::local::LocalSource;
use crate::source::screen::Screen;

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
    /// Local mode: the directory of YAML (pods, services, config).
    pub local_dir: Option<PathBuf>,
    /// Local mode: where the CA lives (created on first start).
    pub ca_dir: Option<PathBuf>,
    /// Local mode: PEM public key that verifies proxies' tokens (ES256).
    pub token_public_key: Option<PathBuf>,
    /// Address of the CA and discovery port.
    pub control_plane_listen: SocketAddr,
    /// IP SANs of the control plane's serving certificate.
    pub serving_ips: Vec<IpAddr>,
    /// Trust domain; the mesh config's when absent.
    pub trust_domain: Option<String>,
    /// Namespace of mesh-wide policies.
    pub root_namespace: String,
    /// Extra trusted roots, e.g. the next root during a rotation: PEM files, or directories
    /// whose `*.pem` / `*.crt` files are each one. Read again while running: a root added or
    /// removed reaches the proxies without a restart.
    pub extra_roots: Vec<PathBuf>,
    /// Longest workload certificate issued.
    pub max_cert_ttl: Duration,
}

impl ServeOptions {
    /// Options with the defaults of the command line.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            mesh_config: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            service: "weft-control-plane".into(),
            namespace: "weft-system".into(),
            serving_cert_secret: None,
            patch_webhook_ca: None,
            ca_out: None,
            kubernetes: None,
            local_dir: None,
            ca_dir: None,
            token_public_key: None,
            control_plane_listen: SocketAddr::from((
                [0, 0, 0, 0],
                weft_api::bootstrap::PORT_CONTROL_PLANE,
            )),
            serving_ips: Vec::new(),
            trust_domain: None,
            root_namespace: crate::resources::DEFAULT_ROOT_NAMESPACE.into(),
            extra_roots: Vec::new(),
            max_cert_ttl: crate::ca::DEFAULT_MAX_TTL,
        }
    }
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
    /// The CA could not be loaded or made.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The CA store failed.
    #[error(transparent)]
    CaStore(#[from] StoreError),
    /// The token key is unusable.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Local mode needs a token key.
    #[error("local mode needs --token-public-key (the key that signs the proxies' tokens)")]
    NoTokenKey,
    /// The control-plane port failed.
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    /// The CA material or an extra root could not be read.
    #[error(transparent)]
    Trust(#[from] TrustError),
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
    let wants_cluster = opts.kubernetes.unwrap_or(
        opts.local_dir.is_none()
            && (in_pod || opts.patch_webhook_ca.is_some() || opts.serving_cert_secret.is_some()),
    );
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

    let trust_domain = opts
        .trust_domain
        .clone()
        .unwrap_or_else(|| mesh.trust_domain.clone());
    let control = if opts.local_dir.is_some() || client.is_some() {
        Some(start_control_plane(&opts, client.as_ref(), &mesh, &trust_domain, &mut tasks).await?)
    } else {
        info!("no --local-dir and no cluster: the CA and discovery are off");
        None
    };

    let state = Arc::new(AppState {
        mesh,
        cluster_supports_native_sidecars: cluster_native,
        nodes: control.as_ref().map(|c| c.nodes.clone()),
    });
    let mut router = server::router(state);
    if let Some(c) = &control {
        router = router.merge(control_plane::observability_router(c.cp.discovery.clone()));
    }
    let listener = server::bind(opts.listen).await?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let webhook = server::serve(listener, tls, router, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let result = match control {
        Some(c) => {
            let cp_router = control_plane::router_with(c.cp, c.live_ca);
            let cp_serve =
                control_plane::serve(c.listener, c.tls, cp_router, trust_domain, async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                });
            let (result, ()) = tokio::join!(webhook, cp_serve);
            result
        }
        None => webhook.await,
    };
    tasks.shutdown().await;
    result.map_err(ServeError::from)
}

/// The control plane, ready to serve.
struct Started {
    /// Shared state.
    cp: Arc<ControlPlane>,
    /// The CA in force.
    live_ca: Arc<LiveCa>,
    /// The control-plane port.
    listener: tokio::net::TcpListener,
    /// Its TLS.
    tls: Arc<rustls::ServerConfig>,
    /// The nodes, for the injector.
    nodes: NodeSource,
}

/// Loads the CA, starts the sources, discovery and the root rotation, and binds the
/// control-plane port.
async fn start_control_plane(
    opts: &ServeOptions,
    client: Option<&kube::Client>,
    mesh: &MeshConfig,
    trust_domain: &str,
    tasks: &mut JoinSet<()>,
) -> Result<Started, ServeError> {
    let (source, material) = match (&opts.ca_dir, client) {
        (Some(dir), _) => (
            CaSource::Dir(dir.clone()),
            ca_store::load_or_create_dir(dir, trust_domain)?,
        ),
        (None, Some(client)) => (
            CaSource::Secret {
                client: client.clone(),
                namespace: opts.namespace.clone(),
            },
            ca_store::load_or_create_secret(client, &opts.namespace, trust_domain).await?,
        ),
        (None, None) => {
            warn!("no --ca-dir: the mesh root lives in memory and changes at every start");
            let material = Material::generate(trust_domain)?;
            (CaSource::Memory(material.clone()), material)
        }
    };
    let (rotation, ca) = Rotation::start(
        source,
        material,
        opts.extra_roots.clone(),
        CaOptions {
            trust_domain: trust_domain.to_owned(),
            max_ttl: opts.max_cert_ttl,
            ..CaOptions::default()
        },
    )?;
    info!(roots = ca.roots().len(), %trust_domain, "mesh ca ready");

    let verifier = match (&opts.token_public_key, client) {
        (Some(path), _) => TokenVerifier::local_from_file(path, &mesh.ca_audience)?,
        (None, Some(client)) => TokenVerifier::Kubernetes {
            client: client.clone(),
            audience: mesh.ca_audience.clone(),
        },
        (None, None) => return Err(ServeError::NoTokenKey),
    };

    let store = Store::new(Settings {
        trust_domain: trust_domain.to_owned(),
        root_namespace: opts.root_namespace.clone(),
        protocol_detection_timeout_ms: u64::try_from(mesh.protocol_detection_timeout.as_millis())
            .unwrap_or(u64::MAX),
    });
    let metrics = Arc::new(Metrics::default());
    // Objects the validator refuses are held back (their last good version stays) and
    // counted in `weft_config_rejected`.
    let screen = Screen::new(&metrics);
    let mut pods_listed = None;
    let mut nodes = NodeSource::complete(store.clone());
    if let Some(dir) = &opts.local_dir {
        let mut source = LocalSource::new(dir.clone()).with_screen(screen);
        // Before discovery starts: its first epoch is the directory's content (and the
        // injector's first view of the nodes is complete).
        source.sync(&store);
        tasks.spawn(source.run(store.clone()));
    } else if let Some(client) = client {
        let listed = kube_source::spawn_watches(client, &store, &screen, tasks);
        nodes = NodeSource::new(store.clone(), listed.nodes);
        pods_listed = Some(listed.pods);
    }
    let discovery = Discovery::new(
        store.clone(),
        metrics.clone(),
        ca.roots().to_vec(),
        DEBOUNCE,
    );
    let (roots_tx, roots_rx) = tokio::sync::watch::channel(ca.roots_pem());
    if let (Some(client), Some(listed)) = (client, pods_listed) {
        discovery.require_known_pods(listed);
        tasks.spawn(kube_source::keep_root_config_maps(
            client.clone(),
            store.clone(),
            opts.namespace.clone(),
            mesh.root_cert_config_map.clone(),
            roots_rx,
        ));
    }
    tasks.spawn(discovery.clone().run());

    let names = control_plane::serving_names(&opts.service, &opts.namespace, &opts.serving_ips);
    let tls = LiveTls::new(&ca, &names)?;
    let server_config = tls.server_config()?;
    let live = LiveCa::new(ca.clone());
    tasks.spawn(rotation.run(live.clone(), {
        let discovery = discovery.clone();
        move |ca| {
            if let Err(error) = tls.update(ca) {
                warn!(%error, "cannot re-issue the control plane's serving certificate; keeping the current one");
            }
            discovery.set_trust_bundle(ca.roots().to_vec());
            roots_tx.send_replace(ca.roots_pem());
        }
    }));
    let listener = control_plane::bind(opts.control_plane_listen).await?;
    Ok(Started {
        cp: Arc::new(ControlPlane {
            ca,
            verifier,
            discovery,
            metrics,
        }),
        live_ca: live,
        listener,
        tls: server_config,
        nodes,
    })
}
