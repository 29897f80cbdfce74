//! `weft-redirector node`: the eBPF node agent.
//!
//! It loads Weft's eBPF programs (`ebpf/`, built separately), attaches them at a cgroup root
//! (everything below it is seen: a local node's subtree, Kubernetes' `kubepods`), pins the
//! links and maps in bpffs so that traffic keeps flowing while the agent restarts, learns the
//! meshed pods (a directory of pod files, or the API server), keeps the maps equal to them,
//! and serves `/healthz` and `/metrics`.
//!
//! - [`pods`]: what a pod to redirect is, and the local node's pod files.
//! - [`rules`]: the pure core, a pod's redirection as map entries.
//! - [`netns`]: cookies, addresses and interfaces of network namespaces.
//! - [`bpf`]: loading, attaching, pinning, uninstalling.
//! - [`sync`]: keeping the maps equal to the pods.
//! - [`metrics`]: `/healthz` and `/metrics`.
//! - [`check`]: which hooks this kernel has.
//! - `k8s` (feature `kube`): pods from the API server.

pub mod bpf;
pub mod check;
#[cfg(feature = "kube")]
pub mod k8s;
pub mod metrics;
pub mod netns;
pub mod pods;
pub mod rules;
pub mod sync;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::cli::NodeCommand;
use bpf::{BpfError, Layout};
use metrics::{Health, SharedAgent};
use pods::{PodId, PodSpec};
use sync::Agent;

/// The meshed pods by id, as a source last saw them.
pub type Pods = BTreeMap<PodId, PodSpec>;

/// How often the whole state is synced even when nothing seems to change (repairs drift).
const RESYNC: Duration = Duration::from_secs(10);

/// Errors of the node agent.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Loading or attaching failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// The kernel lacks hooks.
    #[error(
        "this kernel lacks eBPF hooks that eBPF mode needs: {0}; use interceptionMode REDIRECT (iptables)"
    )]
    Unsupported(String),
    /// No pod source given.
    #[error("no pod source: pass --pods-dir DIR (local node) or --node-name NAME (Kubernetes)")]
    NoSource,
    /// The Kubernetes source failed.
    #[cfg(feature = "kube")]
    #[error(transparent)]
    Kube(#[from] k8s::KubeError),
    /// This build has no Kubernetes source.
    #[cfg(not(feature = "kube"))]
    #[error("this build has no Kubernetes support (feature `kube`); use --pods-dir")]
    NoKube,
    /// Runtime or listener setup failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl NodeCommand {
    /// The instance's pin directory.
    pub fn layout(&self) -> Layout {
        Layout {
            root: self
                .bpffs
                .clone()
                .unwrap_or_else(|| Path::new(bpf::DEFAULT_BPFFS_ROOT).join(&self.instance)),
        }
    }
}

/// `--uninstall`: removes the instance's pins; returns how many.
pub fn uninstall(cmd: &NodeCommand) -> Result<usize, NodeError> {
    let layout = cmd.layout();
    let n = bpf::uninstall(&layout)?;
    info!(dir = %layout.root.display(), pins = n, "uninstalled");
    Ok(n)
}

/// `--check`: every hook and whether it works.
pub fn check(cmd: &NodeCommand) -> Result<Vec<check::Hook>, NodeError> {
    let object = bpf::object_path(cmd.bpf_object.as_deref())?;
    let root = cmd
        .layout()
        .root
        .parent()
        .map_or_else(|| PathBuf::from(bpf::DEFAULT_BPFFS_ROOT), Path::to_owned);
    Ok(check::check(&object, &cmd.cgroup_root, &root))
}

/// `Err` naming the hooks that do not work.
pub fn require(hooks: &[check::Hook]) -> Result<(), NodeError> {
    let missing: Vec<&str> = hooks
        .iter()
        .filter(|h| h.result.is_err())
        .map(|h| h.name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(NodeError::Unsupported(missing.join(", ")))
    }
}

/// Runs the agent until SIGINT or SIGTERM. The pins stay: traffic keeps flowing.
pub fn run(cmd: &NodeCommand) -> Result<(), NodeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| NodeError::Io {
            what: "starting the async runtime",
            source,
        })?;
    runtime.block_on(run_async(cmd))
}

async fn run_async(cmd: &NodeCommand) -> Result<(), NodeError> {
    if cmd.pods_dir.is_none() && cmd.node_name.is_none() {
        return Err(NodeError::NoSource);
    }
    let shared: SharedAgent = Arc::new(Mutex::new(None));
    let health = Arc::new(Mutex::new(Health::Starting));
    let listener = metrics::bind(cmd.listen)
        .await
        .map_err(|source| NodeError::Io {
            what: "binding the metrics listener",
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Io {
        what: "metrics listener address",
        source,
    })?;
    info!(%addr, "serving /healthz and /metrics");
    tokio::spawn(metrics::serve(
        listener,
        metrics::registry(shared.clone()),
        health.clone(),
    ));

    let layout = cmd.layout();
    let object = bpf::object_path(cmd.bpf_object.as_deref())?;
    let started = Instant::now();
    let loaded = match bpf::load(&object, &layout, &cmd.cgroup_root) {
        Ok(loaded) => loaded,
        Err(e @ BpfError::Program { .. }) => {
            let why = chain(&e);
            set_unsupported(cmd, &health, &why).await;
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    info!(
        object = %object.display(),
        pins = %layout.root.display(),
        cgroup = %cmd.cgroup_root.display(),
        restarted = loaded.reused_links,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "programs attached"
    );
    *shared.lock().unwrap_or_else(|p| p.into_inner()) = Some(Agent::new(
        loaded,
        layout,
        cmd.cgroup_root.clone(),
        cmd.short_circuit.flags(),
    ));
    #[cfg(feature = "kube")]
    if let Some(node) = &cmd.node_name
        && let Err(error) = k8s::label_node(node, "ready").await
    {
        warn!(error = %chain(&error), "cannot label the node");
    }
    *health.lock().unwrap_or_else(|p| p.into_inner()) = Health::Ready;

    // `None` until the source has said what the pods are: syncing an empty set first would
    // release every pod of a restarted agent.
    let (tx, rx) = tokio::sync::watch::channel(None);
    let source = match (&cmd.pods_dir, &cmd.node_name) {
        (Some(dir), _) => {
            let dir = dir.clone();
            let poll = Duration::from_millis(cmd.poll_ms);
            std::thread::spawn(move || poll_dir(&dir, poll, &tx));
            None
        }
        #[cfg(feature = "kube")]
        (None, Some(node)) => Some(tokio::spawn(k8s::watch_pods(
            node.clone(),
            cmd.cgroup_root.clone(),
            tx,
        ))),
        #[cfg(not(feature = "kube"))]
        (None, Some(_)) => return Err(NodeError::NoKube),
        (None, None) => return Err(NodeError::NoSource),
    };
    let syncer = shared.clone();
    std::thread::spawn(move || sync_loop(&syncer, rx));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| NodeError::Io {
            what: "installing the SIGTERM handler",
            source,
        })?;
    match source {
        Some(task) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            r = task => match r {
                Ok(Ok(())) => warn!("pod source ended"),
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => error!(error = %e, "pod source panicked"),
            },
        },
        None => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
    }
    info!("stopping; programs stay attached (weft-redirector node --uninstall removes them)");
    Ok(())
}

async fn set_unsupported(cmd: &NodeCommand, health: &Mutex<Health>, why: &str) {
    *health.lock().unwrap_or_else(|p| p.into_inner()) = Health::Unsupported(why.to_owned());
    #[cfg(feature = "kube")]
    if let Some(node) = &cmd.node_name
        && let Err(error) = k8s::label_node(node, "unsupported").await
    {
        warn!(error = %chain(&error), "cannot label the node");
    }
    #[cfg(not(feature = "kube"))]
    let _ = cmd;
}

/// Reads the pods directory every `poll` and publishes the meshed pods when they change.
fn poll_dir(dir: &Path, poll: Duration, tx: &tokio::sync::watch::Sender<Option<Pods>>) {
    let mut reported = String::new();
    loop {
        match pods::read_dir(dir) {
            Ok((desired, errors)) => {
                let text: String = errors.iter().map(|e| format!("{e}\n")).collect();
                if text != reported {
                    for e in &errors {
                        warn!(error = %e, "pod file ignored");
                    }
                    reported = text;
                }
                let desired = Some(desired);
                tx.send_if_modified(|cur| {
                    let changed = *cur != desired;
                    *cur = desired;
                    changed
                });
            }
            Err(e) => {
                let text = e.to_string();
                if text != reported {
                    warn!(error = %chain(&e), "cannot read pods directory");
                    reported = text;
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        std::thread::sleep(poll);
    }
}

/// Syncs the maps when the pods change, and every [`RESYNC`] anyway.
fn sync_loop(shared: &SharedAgent, mut rx: tokio::sync::watch::Receiver<Option<Pods>>) {
    let mut last = Instant::now() - RESYNC;
    let mut failing = false;
    loop {
        let changed = rx.has_changed().unwrap_or(false);
        if changed || last.elapsed() >= RESYNC || failing {
            let Some(desired) = rx.borrow_and_update().clone() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
            let Some(agent) = guard.as_mut() else {
                return;
            };
            match agent.sync(&desired) {
                Ok(report) => {
                    if failing {
                        info!("sync recovered");
                    }
                    failing = false;
                    tracing::debug!(?report, "synced");
                }
                Err(e) => {
                    if !failing {
                        error!(error = %chain(&e), "sync failed; retrying");
                    }
                    failing = true;
                }
            }
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(if failing { 500 } else { 50 }));
    }
}

/// An error with its sources, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
