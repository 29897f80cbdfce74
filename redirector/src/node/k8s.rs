//! Kubernetes pod discovery (`--node-name`): the meshed pods scheduled on this node, from the
//! API server (a watch on `spec.nodeName`).
//!
//! A pod is meshed in eBPF mode when it carries `sidecar.istio.io/status` (it was injected)
//! and its init step runs `weft-redirector init --mode=ebpf` (or its
//! `sidecar.istio.io/interceptionMode` annotation says `EBPF`). Its redirection is parsed from
//! the init step's own arguments, with the init step's parser. Its network namespace is
//! found through its cgroup (`…pod<uid>…` under the cgroup root): any process of the pod
//! (the sandbox's pause process) gives `/proc/<pid>/ns/net` (the agent needs `hostPID`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser as _;
use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};
use weft_api::redirect::{InitArgs, InterceptionMode};

use super::pods::{PodId, PodSpec};
use crate::cli::{Cli, Command};

/// The injection status annotation.
pub const ANNOTATION_STATUS: &str = "sidecar.istio.io/status";
/// The interception mode annotation.
pub const ANNOTATION_INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
/// Node label the agent sets: `ready` when eBPF mode works on the node, `unsupported` when
/// the kernel lacks a hook (the injector then keeps pods of this node in iptables mode).
pub const NODE_LABEL: &str = "weft.dev/ebpf-redirect";

/// Errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No client configuration.
    #[error("kubernetes client")]
    Client(#[source] kube::Error),
    /// An API call failed.
    #[error("kubernetes API: {what}")]
    Api {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: kube::Error,
    },
}

/// The redirection wanted by a pod, if it is meshed in eBPF mode.
pub fn ebpf_args(pod: &Pod) -> Option<InitArgs> {
    let annotations = pod.metadata.annotations.as_ref()?;
    annotations.get(ANNOTATION_STATUS)?;
    let spec = pod.spec.as_ref()?;
    let from_init = spec.init_containers.iter().flatten().find_map(|c| {
        let args = c.args.as_ref()?;
        if args.first().map(String::as_str) != Some("init") {
            return None;
        }
        let argv = std::iter::once("weft-redirector".to_owned()).chain(args.iter().cloned());
        match Cli::try_parse_from(argv).ok()?.command {
            Command::Init(init) => Some(init.redirect.to_init_args()),
            _ => None,
        }
    });
    let annotated = annotations
        .get(ANNOTATION_INTERCEPTION_MODE)
        .and_then(|m| m.parse::<InterceptionMode>().ok());
    match (from_init, annotated) {
        (Some(args), _) if args.mode == InterceptionMode::Ebpf => Some(args),
        (None, Some(InterceptionMode::Ebpf)) => Some(InitArgs {
            mode: InterceptionMode::Ebpf,
            ..InitArgs::default()
        }),
        _ => None,
    }
}

/// The cgroup directory of the pod with `uid` under `root` (cgroupfs `pod<uid>` or systemd
/// `…-pod<uid_with_underscores>.slice`), searched a few levels deep.
pub fn pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let wanted = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
    let mut frontier = vec![root.to_owned()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for dir in frontier {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !path.is_dir() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if wanted
                    .iter()
                    .any(|w| name == *w || name.ends_with(&format!("-{w}.slice")))
                {
                    return Some(path);
                }
                next.push(path);
            }
        }
        frontier = next;
    }
    None
}

/// The network namespace of a process in `cgroup` or below: `<proc>/<pid>/ns/net`.
pub fn netns_of(cgroup: &Path, proc_root: &Path) -> Option<PathBuf> {
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter(|l| !l.is_empty()) {
                let ns = proc_root.join(pid).join("ns/net");
                if ns.exists() {
                    return Some(ns);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    None
}

fn spec_of(pod: &Pod, cgroup_root: &Path) -> Option<PodSpec> {
    let args = ebpf_args(pod)?;
    let uid = pod.metadata.uid.as_deref()?;
    let cgroup = pod_cgroup(cgroup_root, uid)?;
    let netns = netns_of(&cgroup, Path::new("/proc"))?;
    let ips = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    Some(PodSpec {
        id: PodId {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
        },
        netns,
        cgroup: Some(cgroup),
        ips,
        args,
    })
}

/// Watches the pods of `node` and publishes the meshed ones on `tx` (again every few seconds,
/// so that pods whose sandbox was not there yet are found). Runs until the watch ends.
pub async fn watch_pods(
    node: String,
    cgroup_root: PathBuf,
    tx: watch::Sender<Option<BTreeMap<PodId, PodSpec>>>,
) -> Result<(), KubeError> {
    let client = Client::try_default().await.map_err(KubeError::Client)?;
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut pods: BTreeMap<(String, String), Pod> = BTreeMap::new();
    let mut listing: BTreeMap<(String, String), Pod> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    // Nothing is published before the first full listing: an agent restarting must not
    // release the pods it does not know yet.
    let mut listed = false;
    info!(%node, "watching pods");
    loop {
        tokio::select! {
            event = stream.try_next() => match event {
                Ok(Some(event)) => {
                    let key = |p: &Pod| (p.metadata.namespace.clone().unwrap_or_default(), p.metadata.name.clone().unwrap_or_default());
                    match event {
                        watcher::Event::Apply(p) => { pods.insert(key(&p), p); }
                        watcher::Event::Delete(p) => { pods.remove(&key(&p)); }
                        watcher::Event::Init => listing.clear(),
                        watcher::Event::InitApply(p) => { listing.insert(key(&p), p); }
                        watcher::Event::InitDone => {
                            pods = std::mem::take(&mut listing);
                            listed = true;
                        }
                    }
                }
                Ok(None) => return Ok(()),
                Err(error) => warn!(%error, "pod watch"),
            },
            _ = tick.tick() => {}
        }
        if !listed {
            continue;
        }
        let root = cgroup_root.clone();
        let snapshot: Vec<Pod> = pods.values().cloned().collect();
        let desired = tokio::task::spawn_blocking(move || {
            snapshot
                .iter()
                .filter_map(|p| spec_of(p, &root))
                .map(|s| (s.id.clone(), s))
                .collect::<BTreeMap<_, _>>()
        })
        .await
        .unwrap_or_default();
        let desired = Some(desired);
        tx.send_if_modified(|cur| {
            let changed = *cur != desired;
            *cur = desired;
            changed
        });
    }
}

/// Sets [`NODE_LABEL`] on `node` to `value`.
pub async fn label_node(node: &str, value: &str) -> Result<(), KubeError> {
    let client = Client::try_default().await.map_err(KubeError::Client)?;
    let api: Api<Node> = Api::all(client);
    let patch = serde_json::json!({"metadata": {"labels": {NODE_LABEL: value}}});
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| KubeError::Api {
            what: "labelling the node",
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec as K8sPodSpec};
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(init_args: Option<Vec<&str>>, annotations: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("0a1b-2c3d".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).into(), (*v).into()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(K8sPodSpec {
                init_containers: init_args.map(|a| {
                    vec![Container {
                        name: "weft-init".into(),
                        args: Some(a.into_iter().map(Into::into).collect()),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn meshed_in_ebpf_mode_from_the_init_arguments() {
        let status = (ANNOTATION_STATUS, "{}");
        let args = pod(
            Some(vec!["init", "--mode=ebpf", "--exclude-outbound-ports=5432"]),
            &[status],
        );
        let got = ebpf_args(&args).expect("ebpf");
        assert_eq!(got.exclude_outbound_ports, vec![5432]);
        assert_eq!(got.mode, InterceptionMode::Ebpf);
        // iptables mode, no status, or no init step: not ours.
        assert!(ebpf_args(&pod(Some(vec!["init", "--mode=redirect"]), &[status])).is_none());
        assert!(ebpf_args(&pod(Some(vec!["init", "--mode=ebpf"]), &[])).is_none());
        assert!(ebpf_args(&pod(None, &[status])).is_none());
        // The annotation alone (e.g. an init step rendered by another injector).
        let annotated = pod(None, &[status, (ANNOTATION_INTERCEPTION_MODE, "EBPF")]);
        assert_eq!(
            ebpf_args(&annotated).expect("annotated").mode,
            InterceptionMode::Ebpf
        );
    }

    #[test]
    fn pods_are_found_through_their_cgroup() {
        let root = tempfile::tempdir().expect("tempdir");
        let systemd = root
            .path()
            .join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b_2c3d.slice");
        let container = systemd.join("cri-containerd-abc.scope");
        std::fs::create_dir_all(&container).expect("mkdir");
        std::fs::write(
            container.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .expect("write");
        assert_eq!(pod_cgroup(root.path(), "0a1b-2c3d"), Some(systemd.clone()));
        assert_eq!(pod_cgroup(root.path(), "ffff"), None);
        let ns = netns_of(&systemd, Path::new("/proc")).expect("netns");
        assert_eq!(
            ns,
            PathBuf::from(format!("/proc/{}/ns/net", std::process::id()))
        );
        let cgroupfs = root.path().join("kubepods/besteffort/pod0a1b-2c3d");
        std::fs::create_dir_all(&cgroupfs).expect("mkdir");
        let other = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(other.path().join("kubepods/besteffort/pod0a1b-2c3d"))
            .expect("mkdir");
        assert!(pod_cgroup(other.path(), "0a1b-2c3d").is_some());
        assert_eq!(
            netns_of(&other.path().join("kubepods"), Path::new("/proc")),
            None
        );
    }
}
