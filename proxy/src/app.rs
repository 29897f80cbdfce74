//! Process wiring: shared state, config and identity sources, listeners, signals and the
//! drain on shutdown.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{info, warn};

use weft_api::discovery::Node;

use crate::ca::{self, CaClient};
use crate::config::Settings;
use crate::control::ControlPlane;
use crate::drain::Drain;
use crate::identity::{self, Identity};
use crate::metrics::{Direction, DirectionLabels, Metrics, Proto, RequestLabels, UpdateLabels};
use crate::pool::Pools;
use crate::snapshot::{self, Config, FileStamp};
use crate::{admin, discovery, inbound, outbound, socket};

/// State shared by every listener and connection.
#[derive(Debug)]
pub struct Proxy {
    /// Process settings.
    pub settings: Settings,
    /// The current config; connections keep the version they started with.
    pub config: ArcSwap<Config>,
    /// The workload's credentials.
    pub identity: Identity,
    /// Metrics.
    pub metrics: Metrics,
    /// Upstream connections.
    pub pools: Pools,
    /// Shutdown.
    pub drain: Drain,
    /// Asked to exit (`POST /quitquitquit`).
    pub quit: Notify,
    config_loaded: AtomicBool,
}

impl Proxy {
    /// Fresh state: empty config, no identity, not ready.
    pub fn new(settings: Settings) -> Arc<Proxy> {
        Arc::new(Proxy {
            pools: Pools::new(settings.connect_timeout),
            settings,
            config: ArcSwap::from_pointee(Config::empty()),
            identity: Identity::new(),
            metrics: Metrics::new(),
            drain: Drain::new(),
            quit: Notify::new(),
            config_loaded: AtomicBool::new(false),
        })
    }

    /// Ready: has a config and a certificate, and is not draining.
    pub fn is_ready(&self) -> bool {
        self.config_loaded.load(Ordering::Acquire)
            && self.identity.current().is_some()
            && !self.drain.is_draining()
    }

    /// Installs a new config. Connections already open keep the old one.
    pub fn apply(&self, config: Config) {
        let version = config.snapshot.version.clone();
        let keep: std::collections::HashSet<SocketAddr> = config
            .snapshot
            .clusters
            .iter()
            .flat_map(|c| {
                c.endpoints
                    .iter()
                    .map(|e| SocketAddr::new(e.address, e.port))
            })
            .collect();
        // Endpoint load, outlier state and circuit-breaker counters carry over.
        config.inherit_state(&self.config.load());
        self.config.store(Arc::new(config));
        // Connections to endpoints that left the config close once their streams end.
        self.pools
            .retain(|k| k.addr.ip().is_loopback() || keep.contains(&k.addr));
        self.config_loaded.store(true, Ordering::Release);
        self.metrics
            .config_updates
            .get_or_create(&UpdateLabels {
                outcome: "accepted",
            })
            .inc();
        info!(%version, "config applied");
    }

    /// Counts one HTTP request.
    pub fn record_request(
        &self,
        direction: Direction,
        protocol: Proto,
        status: StatusCode,
        mtls: bool,
        start: Instant,
    ) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                direction,
                protocol,
                code: status.as_u16(),
                mtls,
            })
            .inc();
        self.metrics
            .request_duration
            .get_or_create(&DirectionLabels { direction })
            .observe(start.elapsed().as_secs_f64());
    }

    /// Counts and logs a refused config; the current one stays.
    pub fn reject(&self, error: &dyn std::fmt::Display) {
        self.metrics
            .config_updates
            .get_or_create(&UpdateLabels {
                outcome: "rejected",
            })
            .inc();
        warn!(%error, "config rejected; keeping the last good one");
    }
}

/// Runs the proxy until SIGTERM, SIGINT or `/quitquitquit`, then drains.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let proxy = Proxy::new(settings);
    let ports = proxy.settings.ports.clone();
    // Where config and identity come from: a static file (reloaded on change), or the
    // control plane (CA and config stream) with only the bootstrap environment.
    let mut file_sources = None;
    let mut background = Vec::new();
    match (&proxy.settings.config_file, &proxy.settings.control_plane) {
        (Some(file), _) => {
            let mut sources = FileSources::new(file.clone());
            sources.reload(&proxy, true)?;
            file_sources = Some(sources);
        }
        (None, Some(addr)) => {
            let control_plane = ControlPlane::parse(addr)?;
            let pod = &proxy.settings.pod;
            anyhow::ensure!(
                !pod.namespace.is_empty() && !pod.service_account.is_empty(),
                "POD_NAMESPACE and SERVICE_ACCOUNT must be set to ask the CA for an identity"
            );
            let trust_domain = proxy
                .settings
                .trust_domain
                .clone()
                .unwrap_or_else(|| weft_api::config::DEFAULT_TRUST_DOMAIN.to_owned());
            let client = CaClient {
                control_plane: control_plane.clone(),
                token_path: proxy.settings.token_path.clone(),
                root_cert_path: proxy.settings.root_cert_path.clone(),
                spiffe_id: weft_api::config::spiffe_id(
                    &trust_domain,
                    &pod.namespace,
                    &pod.service_account,
                ),
                timeout: proxy.settings.connect_timeout,
            };
            let node = Node {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                ip: pod.ip,
                proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            };
            info!(control_plane = %addr, identity = %client.spiffe_id, "bootstrapping from the control plane");
            background.push(tokio::spawn(ca::run(proxy.clone(), client)));
            background.push(tokio::spawn(discovery::run(
                proxy.clone(),
                control_plane,
                node,
            )));
        }
        (None, None) => anyhow::bail!(
            "no config source: give --config FILE, or set WEFT_CONTROL_PLANE (with the token and root certificate)"
        ),
    }

    let outbound =
        socket::bind_dual(&Settings::capture_addrs(ports.outbound)).context("outbound listener")?;
    let inbound =
        socket::bind_dual(&Settings::capture_addrs(ports.inbound)).context("inbound listener")?;
    for l in outbound {
        tokio::spawn(accept(proxy.clone(), l, Direction::Outbound));
    }
    for l in inbound {
        tokio::spawn(accept(proxy.clone(), l, Direction::Inbound));
    }
    let local = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let admin = socket::bind(local(ports.admin)).context("admin listener")?;
    tokio::spawn(admin::serve(proxy.clone(), admin, admin::Surface::Admin));
    for (port, surface) in [
        (ports.readiness, admin::Surface::Readiness),
        (ports.prometheus, admin::Surface::Prometheus),
        (ports.status, admin::Surface::Status),
    ] {
        if port == 0 {
            continue;
        }
        for l in socket::bind_dual(&Settings::capture_addrs(port))
            .with_context(|| format!("{surface:?} listener"))?
        {
            tokio::spawn(admin::serve(proxy.clone(), l, surface));
        }
    }
    if let Some(sources) = file_sources {
        let proxy = proxy.clone();
        background.push(tokio::spawn(async move { sources.watch(&proxy).await }));
    }
    info!(
        identity = proxy.identity.current().map(|c| c.identity().to_owned()),
        outbound = ports.outbound,
        inbound = ports.inbound,
        "weft-proxy started"
    );

    wait_for_shutdown(&proxy).await?;
    let deadline = proxy.settings.drain_duration;
    info!(?deadline, active = proxy.drain.active(), "draining");
    proxy.drain.start();
    for task in background {
        task.abort();
    }
    let left = proxy.drain.wait(deadline).await;
    if left > 0 {
        warn!(left, "drain deadline passed with connections still open");
    }
    info!("weft-proxy stopped");
    Ok(())
}

async fn wait_for_shutdown(proxy: &Proxy) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
        () = proxy.quit.notified() => info!("quit requested"),
    }
    Ok(())
}

async fn accept(proxy: Arc<Proxy>, listener: TcpListener, direction: Direction) {
    let signal = proxy.drain.signaled();
    tokio::pin!(signal);
    loop {
        let (stream, client): (TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(error) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut signal => break,
        };
        let _ = stream.set_nodelay(true);
        let client = socket::canonical(client);
        let proxy2 = proxy.clone();
        match direction {
            Direction::Outbound => proxy.drain.spawn(outbound::handle(proxy2, stream, client)),
            Direction::Inbound => proxy.drain.spawn(inbound::handle(proxy2, stream, client)),
        }
    }
    info!(?direction, "listener closed");
}

/// The static config file and the certificate files it names, watched for changes.
struct FileSources {
    config_file: PathBuf,
    config_stamp: FileStamp,
    identity_files: Vec<PathBuf>,
    identity_stamp: FileStamp,
}

impl FileSources {
    fn new(config_file: PathBuf) -> Self {
        Self {
            config_file,
            config_stamp: FileStamp::default(),
            identity_files: Vec::new(),
            identity_stamp: FileStamp::default(),
        }
    }

    /// Loads what changed. At start an error is fatal; later it keeps the last good state.
    fn reload(&mut self, proxy: &Proxy, first: bool) -> anyhow::Result<()> {
        let config_stamp = FileStamp::of(std::slice::from_ref(&self.config_file));
        let identity_stamp = FileStamp::of(&self.identity_files);
        if !first && config_stamp == self.config_stamp && identity_stamp == self.identity_stamp {
            return Ok(());
        }
        self.config_stamp = config_stamp;
        let config = match snapshot::load_file(&self.config_file) {
            Ok(c) => c,
            Err(e) if first => return Err(e.into()),
            Err(e) => {
                proxy.reject(&e);
                return Ok(());
            }
        };
        if let Some(files) = &config.snapshot.identity {
            let paths: Vec<PathBuf> = [&files.cert_chain, &files.private_key, &files.root_cert]
                .iter()
                .map(PathBuf::from)
                .collect();
            let stamp = FileStamp::of(&paths);
            if first || paths != self.identity_files || stamp != self.identity_stamp {
                let installed = identity::load_files(files)
                    .map_err(anyhow::Error::from)
                    .and_then(|creds| proxy.identity.install(creds).map_err(Into::into));
                match installed {
                    Ok(_) => {
                        self.identity_files = paths;
                        self.identity_stamp = stamp;
                    }
                    Err(e) if first => return Err(e.context("workload identity")),
                    Err(e) => {
                        proxy.reject(&format!("workload identity: {e:#}"));
                        return Ok(());
                    }
                }
            }
        }
        proxy.apply(config);
        Ok(())
    }

    async fn watch(mut self, proxy: &Proxy) {
        let mut tick = tokio::time::interval(proxy.settings.config_poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = self.reload(proxy, false) {
                warn!(error = %format!("{error:#}"), "config reload failed");
            }
        }
    }
}
