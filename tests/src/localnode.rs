//! The local node: a Kubernetes-like node on one Linux host.
//!
//! The node lives in a network namespace of its own holding a bridge (10.44.0.0/16,
//! fd00:44::/64). Each pod is a network namespace attached to that bridge by a veth pair,
//! with its own cgroup and a hosts file mapping service names to service VIPs (10.96.0.0/16)
//! that nothing routes: only the mesh's redirection makes them reachable. Pods are Kubernetes
//! `Pod` objects; their init containers and containers run as the processes their images
//! stand for, through `weft-pod-exec`, in the pod's namespaces with the container's user.
//!
//! Nothing is added to the machine's own network namespace, and everything is removed on
//! drop (also on panic), with a sweep of what a killed run left behind at the next start.

mod certs;
pub mod controlplane;
pub mod fixtures;
pub mod network;
pub mod redirect;
mod tokens;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus, Probe, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::binaries;
use crate::exec::{BindMount, ExecSpec, SPEC_ENV};
use certs::Ca;
use controlplane::{ControlPlane, Instance};
use network::Subnet;
use redirect::Agent;
pub use redirect::Interception;
use tokens::TokenSigner;

/// Root of the local nodes' cgroups.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified/weft";
/// Pod annotation (local node only): the pod's proxy gets a token of this service account
/// (and asks for its identity), while the mesh expects the pod's own: like a stolen token.
/// Peers must refuse it; the tests of wrong identities use it.
pub const ANNOTATION_TOKEN_SA: &str = "localnode.weft.dev/token-service-account";
/// Pod annotation (local node only): `rogue` makes the pod's proxy use a second control plane
/// whose CA is another root, one the mesh does not trust.
pub const ANNOTATION_CA: &str = "localnode.weft.dev/ca";
/// Pod annotation (local node only): the path of a static config file (the `weft-api`
/// config model) for the pod's proxy, run as `weft-proxy --config PATH` without the control
/// plane; the file names the certificate files it uses.
pub const ANNOTATION_PROXY_CONFIG: &str = "localnode.weft.dev/proxy-config";
/// The node label the eBPF agent sets: `ready` or `unsupported`.
pub const REDIRECT_NODE_LABEL: &str = "weft.dev/ebpf-redirect";
/// Binaries the local node knows how to run, by command or image name.
const KNOWN_BINARIES: [&str; 4] = [
    "weft-proxy",
    "weft-redirector",
    "weft-sample-app",
    "weft-webhook",
];
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static NODE_SEQ: AtomicU32 = AtomicU32::new(0);

/// How a local node is set up.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Protocol detection timeout (the mesh config's `protocolDetectionTimeout`).
    pub detect_timeout: Duration,
    /// Native sidecars (`nativeSidecar: true`) or classic ones, in the mesh config.
    pub native_sidecars: bool,
    /// Extra environment for every `weft-proxy` container (e.g. `WEFT_LOG_LEVEL`).
    pub proxy_env: Vec<(String, String)>,
    /// Longest workload certificate the CA signs (short ones make proxies rotate often).
    pub cert_ttl: Option<Duration>,
    /// iptables in each pod, or the node agents' eBPF programs.
    pub interception: Interception,
    /// Simulated nodes (cgroup subtrees, each with its own eBPF agent); pods alternate
    /// between them unless `spec.nodeName` names one (`node-0`, `node-1`, …).
    pub nodes: usize,
    /// Extra arguments of every `weft-redirector node` (e.g. `--short-circuit=both`).
    pub agent_args: Vec<String>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            detect_timeout: Duration::from_millis(500),
            native_sidecars: true,
            proxy_env: vec![("WEFT_LOG_LEVEL".into(), "info".into())],
            cert_ttl: None,
            interception: Interception::Iptables,
            nodes: 1,
            agent_args: Vec::new(),
        }
    }
}

impl NodeOptions {
    /// The mesh config of the node's control plane (`controlPlaneAddress` is its own).
    fn mesh_config(&self, control_plane: &str) -> String {
        format!(
            "controlPlaneAddress: {control_plane}\nnativeSidecar: \"{}\"\nterminationDrainDuration: 5s\nprotocolDetectionTimeout: {}ms\ninterceptionMode: {}\n",
            self.native_sidecars,
            self.detect_timeout.as_millis(),
            match self.interception {
                Interception::Iptables => "REDIRECT",
                Interception::Ebpf => "EBPF",
            }
        )
    }
}

/// A running pod, as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// IPv6 address.
    pub ip6: Ipv6Addr,
    /// Network namespace.
    pub netns: String,
}

#[derive(Debug)]
enum Role {
    Sidecar,
    Main,
}

#[derive(Debug)]
struct Proc {
    container: String,
    role: Role,
    child: Child,
    exited: Option<ExitStatus>,
}

#[derive(Debug)]
struct PodRun {
    pod: Pod,
    r: PodRef,
    dir: PathBuf,
    cgroup: PathBuf,
    procs: Vec<Proc>,
    /// Its proxy follows the control plane (not a static config file): `sync` waits for it.
    meshed: bool,
    running: bool,
}

#[derive(Debug, Default)]
struct State {
    next_pod: u16,
    next_vip: u16,
    services: Vec<(Service, Vec<IpAddr>)>,
    pods: Vec<PodRun>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

/// A local node. Dropping it tears everything down.
pub struct LocalNode {
    id: String,
    ns: String,
    dir: tempfile::TempDir,
    cgroup: PathBuf,
    bins: PathBuf,
    ca: Ca,
    tokens: TokenSigner,
    config_dir: PathBuf,
    options: NodeOptions,
    state: Mutex<State>,
    control_plane: Mutex<Option<ControlPlane>>,
    rogue: Mutex<Option<ControlPlane>>,
    sync_seq: AtomicU64,
    agents: Mutex<Vec<Agent>>,
}

impl std::fmt::Debug for LocalNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNode")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl LocalNode {
    /// Starts a node with default options.
    pub fn start() -> anyhow::Result<LocalNode> {
        Self::start_with(NodeOptions::default())
    }

    /// Starts a node: sweeps what dead runs left, creates the node namespace and bridge.
    pub fn start_with(options: NodeOptions) -> anyhow::Result<LocalNode> {
        anyhow::ensure!(
            nix::unistd::geteuid().is_root(),
            "the local node needs root (network namespaces, iptables, cgroups)"
        );
        let bins = binaries::dir()?;
        sweep_stale(&bins);
        for b in [
            "weft-proxy",
            "weft-redirector",
            "weft-sample-app",
            "weft-pod-exec",
            "weft-webhook",
        ] {
            binaries::path(b)?;
        }
        let id = format!(
            "{}-{}",
            std::process::id(),
            NODE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let ns = format!("weft-{id}-node");
        let dir = tempfile::Builder::new()
            .prefix(&format!("weft-{id}-"))
            .tempdir()
            .context("node directory")?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let cgroup = PathBuf::from(CGROUP_ROOT).join(&id);
        let node = LocalNode {
            id,
            ns: ns.clone(),
            dir,
            cgroup: cgroup.clone(),
            bins,
            ca: Ca::new("weft local node reference root")?,
            tokens: TokenSigner::new()?,
            config_dir: PathBuf::new(),
            options,
            state: Mutex::new(State {
                next_pod: 2,
                next_vip: 10,
                ..Default::default()
            }),
            control_plane: Mutex::new(None),
            rogue: Mutex::new(None),
            sync_seq: AtomicU64::new(0),
            agents: Mutex::new(Vec::new()),
        };
        let mut node = node;
        node.config_dir = node.dir.path().join("config");
        // From here on, Drop cleans up whatever was created.
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("create cgroup {}", cgroup.display()))?;
        network::create_node(&ns)?;
        fs::create_dir_all(&node.config_dir)?;
        fs::write(
            node.dir.path().join("token-key.pub"),
            &node.tokens.public_pem,
        )?;
        if node.options.interception == Interception::Ebpf {
            let mut agents = Vec::new();
            for i in 0..node.options.nodes.max(1) {
                agents.push(Agent::start(
                    &node.bins,
                    &ns,
                    node.dir.path(),
                    &cgroup,
                    &node.id,
                    i,
                    &node.options.agent_args,
                )?);
            }
            *node.agents.lock().unwrap_or_else(|p| p.into_inner()) = agents;
        }
        node.publish_nodes()?;
        let cp = node.start_control_plane("control-plane", 443, 15012, &[])?;
        *node.control_plane.lock().unwrap_or_else(|p| p.into_inner()) = Some(cp);
        tracing::info!(node = %node.id, "local node started");
        Ok(node)
    }

    /// The node's network namespace (its "host network").
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// The node's working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a YAML stream: Services, Pods, Deployments (their replicas become pods),
    /// PeerAuthentications. Namespaces, ServiceAccounts and ConfigMaps are accepted and
    /// ignored. Returns the pods started.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<Vec<PodRef>> {
        let mut started = Vec::new();
        let mut config_changed = false;
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
            let mut value = serde_json::Value::deserialize_from(doc)
                .with_context(|| format!("document {i}: not YAML"))?;
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let api_version = value["apiVersion"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "Service" => {
                    self.create_service(serde_json::from_value(value).context("Service")?)?;
                }
                "Pod" => started.push(self.run_pod(serde_json::from_value(value).context("Pod")?)?),
                "Deployment" => {
                    let d: Deployment = serde_json::from_value(value).context("Deployment")?;
                    for pod in fixtures::pods_of(&d)? {
                        started.push(self.run_pod(pod)?);
                    }
                }
                "Namespace" => {
                    let name = value["metadata"]["name"]
                        .as_str()
                        .context("Namespace without a name")?
                        .to_owned();
                    let labels = value["metadata"]["labels"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                                .collect()
                        })
                        .unwrap_or_default();
                    self.state().namespaces.insert(name.clone(), labels);
                    self.publish("Namespace", "", &name, &value)?;
                    config_changed = true;
                }
                "Node" => {
                    let name = value["metadata"]["name"]
                        .as_str()
                        .context("Node without a name")?
                        .to_owned();
                    self.publish("Node", "", &name, &value)?;
                    config_changed = true;
                }
                "ServiceAccount" | "ConfigMap" => {}
                _ if api_version.contains("istio.io/")
                    || api_version.starts_with("gateway.networking.k8s.io/")
                    || api_version.starts_with("split.smi-spec.io/") =>
                {
                    // Mesh config: the control plane reads it from the node's directory.
                    let meta = &mut value["metadata"];
                    if meta["namespace"].is_null() {
                        meta["namespace"] = "default".into();
                    }
                    let ns = meta["namespace"].as_str().unwrap_or("default").to_owned();
                    let name = meta["name"]
                        .as_str()
                        .with_context(|| format!("document {i}: {kind} without a name"))?
                        .to_owned();
                    self.publish(&kind, &ns, &name, &value)?;
                    config_changed = true;
                }
                other => bail!("document {i}: the local node does not run kind {other:?}"),
            }
        }
        if config_changed {
            self.sync(Duration::from_secs(20))?;
        }
        Ok(started)
    }

    /// Removes a config object applied with [`LocalNode::apply_yaml`].
    pub fn delete_config(&self, kind: &str, namespace: &str, name: &str) -> anyhow::Result<()> {
        self.unpublish(kind, namespace, name)?;
        self.sync(Duration::from_secs(20))
    }

    /// Adds a Service and assigns its VIPs.
    pub fn create_service(&self, mut svc: Service) -> anyhow::Result<IpAddr> {
        let v4 = {
            let mut st = self.state();
            if svc.metadata.namespace.is_none() {
                svc.metadata.namespace = Some("default".into());
            }
            let n = st.next_vip;
            st.next_vip += 1;
            let (v4, v6) = (IpAddr::V4(Subnet::vip4(n)), IpAddr::V6(Subnet::vip6(n)));
            let spec = svc.spec.get_or_insert_with(Default::default);
            spec.cluster_ip = Some(v4.to_string());
            spec.cluster_ips = Some(vec![v4.to_string(), v6.to_string()]);
            st.services.push((svc.clone(), vec![v4, v6]));
            let all: Vec<(String, String)> = st
                .pods
                .iter()
                .map(|p| (p.r.netns.clone(), p.r.namespace.clone()))
                .collect();
            for (netns, namespace) in all {
                self.write_hosts(&st, &netns, &namespace, None)?;
            }
            v4
        };
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc
            .metadata
            .name
            .clone()
            .context("Service without a name")?;
        self.publish("Service", &ns, &name, &serde_json::to_value(&svc)?)?;
        self.sync(Duration::from_secs(20))?;
        Ok(v4)
    }

    /// Sets a label on a namespace (`istio-injection=enabled` turns on injection there).
    pub fn label_namespace(&self, namespace: &str, key: &str, value: &str) {
        self.state()
            .namespaces
            .entry(namespace.to_owned())
            .or_default()
            .insert(key.to_owned(), value.to_owned());
    }

    /// What the API server does before storing a pod: when the pod's namespace is labelled
    /// `istio-injection=enabled` (or the pod `sidecar.istio.io/inject=true`), the injection
    /// webhook's patch. Returns the webhook's warnings.
    pub fn admit(&self, pod: Pod) -> anyhow::Result<(Pod, Vec<String>)> {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let ns_enabled = self
            .state()
            .namespaces
            .get(&ns)
            .and_then(|l| l.get("istio-injection"))
            .is_some_and(|v| v == "enabled");
        let pod_enabled = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("sidecar.istio.io/inject"))
            .is_some_and(|v| v == "true");
        if !(ns_enabled || pod_enabled) {
            return Ok((pod, Vec::new()));
        }
        let guard = self.control_plane.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().context("no control plane")?.mutate(&pod)
    }

    /// Creates a pod and runs it: admission (the injection webhook), network, volumes, init
    /// containers in order, native sidecars until they are started, containers with their
    /// postStart hooks; then waits until every readiness probe passes, publishes the pod as
    /// ready (an endpoint from then on) and waits until every proxy has the new config.
    pub fn run_pod(&self, pod: Pod) -> anyhow::Result<PodRef> {
        let (mut pod, warnings) = self.admit(pod)?;
        for w in warnings {
            tracing::info!(warning = %w, "admission warning");
        }
        let ns = pod
            .metadata
            .namespace
            .get_or_insert_with(|| "default".into())
            .clone();
        let name = pod
            .metadata
            .name
            .clone()
            .context("pod has no metadata.name")?;
        let spec = pod.spec.as_mut().context("pod has no spec")?;
        if spec.service_account_name.is_none() {
            spec.service_account_name = Some("default".into());
        }
        let zones = self.options.nodes.max(1);
        let zone = spec
            .node_name
            .as_deref()
            .and_then(|n| n.strip_prefix("node-"))
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| *i < zones);
        let meshed = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .any(|c| self.program(c).is_ok_and(|p| p.ends_with("weft-proxy")))
            && !pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(ANNOTATION_PROXY_CONFIG));
        let (n, r, dir, cgroup) = {
            let mut st = self.state();
            anyhow::ensure!(
                !st.pods
                    .iter()
                    .any(|p| p.r.namespace == ns && p.r.name == name),
                "pod {ns}/{name} already exists"
            );
            let n = st.next_pod;
            st.next_pod += 1;
            let r = PodRef {
                namespace: ns.clone(),
                name: name.clone(),
                ip: Subnet::pod4(n),
                ip6: Subnet::pod6(n),
                netns: format!("weft-{}-{n}-{}", self.id, truncate(&name, 24)),
            };
            let dir = self.dir.path().join(format!("pod-{n}-{name}"));
            // Pods alternate between the simulated nodes unless they name one.
            let zone = zone.unwrap_or(usize::from(n) % zones);
            let cgroup = if self.options.interception == Interception::Ebpf {
                self.cgroup
                    .join(format!("node-{zone}"))
                    .join(format!("pod-{n}"))
            } else {
                self.cgroup.join(format!("pod-{n}"))
            };
            if let Some(spec) = pod.spec.as_mut() {
                spec.node_name = Some(format!("node-{zone}"));
            }
            st.pods.push(PodRun {
                pod: pod.clone(),
                r: r.clone(),
                dir: dir.clone(),
                cgroup: cgroup.clone(),
                procs: Vec::new(),
                meshed,
                running: false,
            });
            (n, r, dir, cgroup)
        };
        pod.status = Some(pod_status(&r, false));
        let control_plane = self.pod_overrides(&mut pod)?;
        self.with_pod(&r, |p| p.pod = pod.clone())?;
        self.publish("Pod", &ns, &name, &serde_json::to_value(&pod)?)?;
        self.start_pod(n, &r, &pod, &dir, &cgroup, &control_plane)
            .with_context(|| format!("pod {ns}/{name}: {}", self.pod_logs_tail(&r)))?;
        Ok(r)
    }

    /// The local-node-only annotations: a proxy presenting another service account's token
    /// ([`ANNOTATION_TOKEN_SA`]) or using a control plane with another root
    /// ([`ANNOTATION_CA`]). Returns the root certificate the pod trusts.
    fn pod_overrides(&self, pod: &mut Pod) -> anyhow::Result<String> {
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let mut env = Vec::new();
        if let Some(sa) = annotations.get(ANNOTATION_TOKEN_SA) {
            env.push(("SERVICE_ACCOUNT".to_owned(), sa.clone()));
        }
        let root = match annotations.get(ANNOTATION_CA).map(String::as_str) {
            Some("rogue") => {
                let mut rogue = self.rogue.lock().unwrap_or_else(|p| p.into_inner());
                if rogue.is_none() {
                    // A root being introduced: it trusts the current one too.
                    let current = self.dir.path().join("control-plane/ca/root-cert.pem");
                    *rogue = Some(self.start_control_plane(
                        "rogue-control-plane",
                        444,
                        15013,
                        &[current],
                    )?);
                }
                let cp = rogue.as_ref().context("rogue control plane")?;
                env.push(("WEFT_CONTROL_PLANE".to_owned(), cp.address.clone()));
                cp.root_cert_pem.clone()
            }
            Some(other) => bail!("{ANNOTATION_CA}: unknown value {other:?} (only \"rogue\")"),
            None => self.root_cert_pem(),
        };
        if let Some(file) = annotations.get(ANNOTATION_PROXY_CONFIG)
            && let Some(spec) = pod.spec.as_mut()
        {
            for c in spec
                .init_containers
                .iter_mut()
                .flatten()
                .chain(spec.containers.iter_mut())
                .filter(|c| c.name == "weft-proxy")
            {
                c.args = Some(vec!["--config".into(), file.clone()]);
                c.env
                    .get_or_insert_with(Vec::new)
                    .retain(|e| e.name != "WEFT_CONTROL_PLANE");
            }
        }
        if !env.is_empty()
            && let Some(spec) = pod.spec.as_mut()
        {
            for c in spec
                .init_containers
                .iter_mut()
                .flatten()
                .chain(spec.containers.iter_mut())
                .filter(|c| c.name == "weft-proxy")
            {
                let list = c.env.get_or_insert_with(Vec::new);
                for (k, v) in &env {
                    list.retain(|e| &e.name != k);
                    list.push(k8s_openapi::api::core::v1::EnvVar {
                        name: k.clone(),
                        value: Some(v.clone()),
                        ..Default::default()
                    });
                }
            }
        }
        Ok(root)
    }

    fn start_pod(
        &self,
        n: u16,
        r: &PodRef,
        pod: &Pod,
        dir: &Path,
        cgroup: &Path,
        root_cert: &str,
    ) -> anyhow::Result<()> {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
        fs::create_dir_all(cgroup)
            .with_context(|| format!("create cgroup {}", cgroup.display()))?;
        network::create_pod(&self.ns, &r.netns, n)?;
        {
            let st = self.state();
            self.write_hosts(&st, &r.netns, &r.namespace, Some((r.ip, &r.name)))?;
        }
        self.prepare_volumes(pod, dir, root_cert)?;
        // Pods whose init step runs in eBPF mode (the mesh default of an eBPF node, or the
        // pod's `sidecar.istio.io/interceptionMode`); others keep their own iptables rules.
        let ebpf_init = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .filter(|c| c.name == "weft-init")
            .flat_map(|c| c.args.iter().flatten())
            .any(|a| a == "--mode=ebpf");
        if ebpf_init {
            // The agent must know the pod before its init step verifies it was taken.
            let zone = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
            let agent = agents
                .iter()
                .find(|a| a.cgroup_root.ends_with(&zone))
                .context("the pod is in eBPF mode but its node has no eBPF agent (NodeOptions::interception)")?;
            agent.add_pod(
                pod,
                cgroup,
                &r.netns,
                &[IpAddr::V4(r.ip), IpAddr::V6(r.ip6)],
            )?;
        }
        let spec = pod.spec.as_ref().context("pod has no spec")?;
        for c in spec.init_containers.iter().flatten() {
            let sidecar = c.restart_policy.as_deref() == Some("Always");
            let child = self.spawn_container(r, pod, c, dir, cgroup, &[])?;
            if sidecar {
                self.add_proc(r, c, Role::Sidecar, child)?;
                if let Some(probe) = &c.startup_probe {
                    self.wait_probe(r, &c.name, probe, Duration::from_secs(30))?;
                }
            } else {
                let status = wait_child(child, Duration::from_secs(60))
                    .with_context(|| format!("init container {}", c.name))?;
                if !status.success() {
                    bail!(
                        "init container {} failed ({status}): {}",
                        c.name,
                        self.container_log(dir, &c.name)
                    );
                }
            }
        }
        for c in &spec.containers {
            let child = self.spawn_container(r, pod, c, dir, cgroup, &[])?;
            self.add_proc(r, c, Role::Main, child)?;
            if let Some(exec) = c
                .lifecycle
                .as_ref()
                .and_then(|l| l.post_start.as_ref())
                .and_then(|h| h.exec.as_ref())
            {
                let argv: Vec<String> = exec.command.clone().unwrap_or_default();
                let spec = self.exec_spec(r, pod, c, dir, cgroup, Some(argv))?;
                let out = run_exec(&self.bins, &spec, Duration::from_secs(120))?;
                if !out.status.success() {
                    bail!(
                        "postStart hook of {} failed: {}",
                        c.name,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
        {
            if let Some(probe) = &c.readiness_probe {
                self.wait_probe(r, &c.name, probe, Duration::from_secs(30))?;
            }
        }
        let ready = {
            let mut st = self.state();
            let p = st.pods.iter_mut().find(|p| p.r == *r).context("pod gone")?;
            p.running = true;
            p.pod.status = Some(pod_status(r, true));
            p.pod.clone()
        };
        self.publish("Pod", &r.namespace, &r.name, &serde_json::to_value(&ready)?)?;
        self.sync(Duration::from_secs(20))?;
        tracing::info!(pod = %r.name, ip = %r.ip, "pod running");
        Ok(())
    }

    fn add_proc(&self, r: &PodRef, c: &Container, role: Role, child: Child) -> anyhow::Result<()> {
        self.with_pod(r, |p| {
            p.procs.push(Proc {
                container: c.name.clone(),
                role,
                child,
                exited: None,
            })
        })
    }

    fn with_pod<T>(&self, r: &PodRef, f: impl FnOnce(&mut PodRun) -> T) -> anyhow::Result<T> {
        let mut st = self.state();
        let p = st
            .pods
            .iter_mut()
            .find(|p| p.r.namespace == r.namespace && p.r.name == r.name)
            .with_context(|| format!("no pod {}/{}", r.namespace, r.name))?;
        Ok(f(p))
    }

    /// A pod's init container and container names, in order, as it runs.
    pub fn pod_containers(&self, r: &PodRef) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        self.with_pod(r, |p| {
            let spec = p.pod.spec.clone().unwrap_or_default();
            (
                spec.init_containers
                    .iter()
                    .flatten()
                    .map(|c| c.name.clone())
                    .collect(),
                spec.containers.iter().map(|c| c.name.clone()).collect(),
            )
        })
    }

    /// Finds a running pod by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodRef> {
        self.state()
            .pods
            .iter()
            .find(|p| p.r.namespace == namespace && p.r.name == name)
            .map(|p| p.r.clone())
    }

    /// The program a container runs: a Weft binary by command or image name, or an absolute
    /// path.
    fn program(&self, c: &Container) -> anyhow::Result<PathBuf> {
        let cmd = c.command.as_ref().and_then(|v| v.first()).cloned();
        let name = match &cmd {
            Some(cmd) => Path::new(cmd)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            None => {
                let image = c.image.clone().unwrap_or_default();
                let repo = image.rsplit('/').next().unwrap_or_default();
                repo.split([':', '@']).next().unwrap_or_default().to_owned()
            }
        };
        if let Some(known) = KNOWN_BINARIES
            .iter()
            .find(|b| name == **b || (name == "sample-app" && **b == "weft-sample-app"))
        {
            return binaries::path(known);
        }
        match cmd {
            Some(cmd) if Path::new(&cmd).is_absolute() && Path::new(&cmd).exists() => {
                Ok(PathBuf::from(cmd))
            }
            _ => bail!(
                "container {}: the local node has no binary for image {:?} / command {:?}",
                c.name,
                c.image,
                c.command
            ),
        }
    }

    fn exec_spec(
        &self,
        r: &PodRef,
        pod: &Pod,
        c: &Container,
        dir: &Path,
        cgroup: &Path,
        argv_override: Option<Vec<String>>,
    ) -> anyhow::Result<ExecSpec> {
        // The Weft binaries stand for the container images: a shell in a container finds them.
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), format!("{}:{PATH}", self.bins.display())),
            ("HOME".into(), "/".into()),
            ("HOSTNAME".into(), r.name.clone()),
        ];
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => expand(v, &env),
                (None, Some(from)) => match &from.field_ref {
                    Some(f) => field_ref(pod, &f.field_path),
                    None => String::new(),
                },
                (None, None) => String::new(),
            };
            env.retain(|(k, _)| k != &e.name);
            env.push((e.name.clone(), value));
        }
        let is_proxy = self.program(c).is_ok_and(|p| p.ends_with("weft-proxy"));
        let argv: Vec<String> = match argv_override {
            Some(a) => {
                let mut a = a;
                if let Some(first) = a.first_mut()
                    && let Some(known) = KNOWN_BINARIES.iter().find(|b| first.ends_with(*b))
                {
                    *first = binaries::path(known)?.display().to_string();
                }
                a
            }
            None => {
                let mut a = vec![self.program(c)?.display().to_string()];
                a.extend(c.command.iter().flatten().skip(1).map(|s| expand(s, &env)));
                a.extend(c.args.iter().flatten().map(|s| expand(s, &env)));
                a
            }
        };
        if is_proxy && !argv.iter().any(|a| a == "wait") {
            for (k, v) in &self.options.proxy_env {
                env.retain(|(name, _)| name != k);
                env.push((k.clone(), v.clone()));
            }
        }
        let sc = c.security_context.as_ref();
        let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
        let uid = sc
            .and_then(|s| s.run_as_user)
            .or(psc.and_then(|s| s.run_as_user))
            .unwrap_or(0);
        let gid = sc
            .and_then(|s| s.run_as_group)
            .or(psc.and_then(|s| s.run_as_group))
            .unwrap_or(uid);
        let mut mounts = Vec::new();
        let mut private_dirs = HashSet::new();
        for m in c.volume_mounts.iter().flatten() {
            let source = dir.join("volumes").join(&m.name);
            anyhow::ensure!(
                source.exists(),
                "container {}: no volume {:?}",
                c.name,
                m.name
            );
            let target = PathBuf::from(&m.mount_path);
            let resolved = m.mount_path.replacen("/var/run/", "/run/", 1);
            if resolved.starts_with("/run/") {
                if !Path::new(&resolved).exists() {
                    private_dirs.insert(PathBuf::from("/run"));
                }
            } else if !target.exists() {
                bail!(
                    "container {}: mount path {} does not exist on this host (the local node creates mount points only under /run)",
                    c.name,
                    m.mount_path
                );
            }
            let source = match &m.sub_path {
                Some(sp) if !sp.is_empty() => source.join(sp),
                _ => source,
            };
            mounts.push(BindMount {
                source,
                target: PathBuf::from(resolved),
                read_only: m.read_only.unwrap_or(false),
            });
        }
        Ok(ExecSpec {
            netns: PathBuf::from(network::netns_path(&r.netns)),
            hosts_file: Some(hosts_path(&r.netns)),
            private_dirs: private_dirs.into_iter().collect(),
            mounts,
            cgroup: Some(cgroup.to_path_buf()),
            host_mounts: false,
            uid: u32::try_from(uid).unwrap_or(0),
            gid: u32::try_from(gid).unwrap_or(0),
            workdir: c.working_dir.as_ref().map(PathBuf::from),
            argv,
            env,
        })
    }

    fn spawn_container(
        &self,
        r: &PodRef,
        pod: &Pod,
        c: &Container,
        dir: &Path,
        cgroup: &Path,
        extra_args: &[String],
    ) -> anyhow::Result<Child> {
        let mut spec = self.exec_spec(r, pod, c, dir, cgroup, None)?;
        spec.argv.extend(extra_args.iter().cloned());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", c.name)))?;
        let child = Command::new(self.bins.join("weft-pod-exec"))
            .env_clear()
            .env(SPEC_ENV, serde_json::to_string(&spec)?)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start container {}", c.name))?;
        tracing::debug!(pod = %r.name, container = %c.name, pid = child.id(), "container started");
        Ok(child)
    }

    /// Runs a command in a pod, like `kubectl exec`: the named container's (default: the
    /// first regular container's) user, environment and volumes.
    pub fn exec(
        &self,
        r: &PodRef,
        container: Option<&str>,
        argv: &[&str],
    ) -> anyhow::Result<Output> {
        let spec = self.exec_spec_for(r, container, argv)?;
        run_exec(&self.bins, &spec, Duration::from_secs(300))
    }

    /// Like [`LocalNode::exec`], parsing stdout as JSON; fails with stderr when it is not.
    pub fn exec_json<T: serde::de::DeserializeOwned>(
        &self,
        r: &PodRef,
        argv: &[&str],
    ) -> anyhow::Result<T> {
        let out = self.exec(r, None, argv)?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "{argv:?} in {}: exit {}, stdout {:?}, stderr {:?}",
                r.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts a command in a pod without waiting (collect it with [`Background::wait`]).
    pub fn spawn_exec(&self, r: &PodRef, argv: &[&str]) -> anyhow::Result<Background> {
        let spec = self.exec_spec_for(r, None, argv)?;
        let child = Command::new(self.bins.join("weft-pod-exec"))
            .env_clear()
            .env(SPEC_ENV, serde_json::to_string(&spec)?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(Background { child: Some(child) })
    }

    fn exec_spec_for(
        &self,
        r: &PodRef,
        container: Option<&str>,
        argv: &[&str],
    ) -> anyhow::Result<ExecSpec> {
        let (pod, dir, cgroup) =
            self.with_pod(r, |p| (p.pod.clone(), p.dir.clone(), p.cgroup.clone()))?;
        let spec = pod.spec.as_ref().context("pod has no spec")?;
        let c = match container {
            Some(name) => spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|c| c.name == name)
                .with_context(|| format!("no container {name} in {}", r.name))?,
            None => spec
                .containers
                .iter()
                .find(|c| !self.program(c).is_ok_and(|p| p.ends_with("weft-proxy")))
                .or(spec.containers.first())
                .context("pod has no container")?,
        };
        self.exec_spec(
            r,
            &pod,
            c,
            &dir,
            &cgroup,
            Some(argv.iter().map(|s| s.to_string()).collect()),
        )
    }

    /// Sends a signal to a container's process.
    pub fn signal(&self, r: &PodRef, container: &str, sig: Signal) -> anyhow::Result<()> {
        let pid = self.with_pod(r, |p| {
            p.procs
                .iter()
                .find(|c| c.container == container && c.exited.is_none())
                .map(|c| c.child.id())
        })?;
        let pid = pid.with_context(|| format!("no running container {container} in {}", r.name))?;
        kill(Pid::from_raw(i32::try_from(pid)?), sig)?;
        Ok(())
    }

    /// Waits for a container's process to exit.
    pub fn wait_exit(
        &self,
        r: &PodRef,
        container: &str,
        timeout: Duration,
    ) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.with_pod(r, |p| {
                p.procs
                    .iter_mut()
                    .find(|c| c.container == container)
                    .map(|c| {
                        if c.exited.is_none() {
                            c.exited = c.child.try_wait().ok().flatten();
                        }
                        c.exited
                    })
            })?;
            match status {
                None => bail!("no container {container} in {}", r.name),
                Some(Some(s)) => return Ok(s),
                Some(None) if Instant::now() > deadline => {
                    bail!(
                        "container {container} of {} still running after {timeout:?}",
                        r.name
                    )
                }
                Some(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// A container's log.
    pub fn logs(&self, r: &PodRef, container: &str) -> String {
        self.with_pod(r, |p| self.container_log(&p.dir, container))
            .unwrap_or_default()
    }

    fn container_log(&self, dir: &Path, container: &str) -> String {
        fs::read_to_string(dir.join(format!("{container}.log"))).unwrap_or_default()
    }

    fn pod_logs_tail(&self, r: &PodRef) -> String {
        let Ok(dir) = self.with_pod(r, |p| p.dir.clone()) else {
            return String::new();
        };
        let mut out = String::new();
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                out.push_str(&format!(
                    "\n--- {} ---\n{}",
                    path.file_name().unwrap_or_default().to_string_lossy(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        for agent in self.agents.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let log = agent.log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            out.push_str(&format!(
                "\n--- eBPF agent {} ---\n{}",
                agent.instance,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        out
    }

    /// Waits until a pod's regular containers have all exited (a Job's pod), then stops its
    /// native sidecars as the kubelet does. Returns every container's exit status.
    pub fn wait_completed(
        &self,
        r: &PodRef,
        timeout: Duration,
    ) -> anyhow::Result<BTreeMap<String, ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            let running: Vec<String> = self.with_pod(r, |p| {
                p.procs
                    .iter_mut()
                    .filter(|c| matches!(c.role, Role::Main))
                    .filter_map(|c| {
                        if c.exited.is_none() {
                            c.exited = c.child.try_wait().ok().flatten();
                        }
                        c.exited.is_none().then(|| c.container.clone())
                    })
                    .collect()
            })?;
            if running.is_empty() {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not complete: still running {running:?}",
                r.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let sidecars: Vec<String> = self.with_pod(r, |p| {
            p.procs
                .iter()
                .filter(|c| matches!(c.role, Role::Sidecar) && c.exited.is_none())
                .map(|c| c.container.clone())
                .collect()
        })?;
        for c in &sidecars {
            let _ = self.signal(r, c, Signal::SIGTERM);
        }
        for c in &sidecars {
            self.wait_exit(
                r,
                c,
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_secs(1)),
            )?;
        }
        self.with_pod(r, |p| {
            p.procs
                .iter()
                .filter_map(|c| Some((c.container.clone(), c.exited?)))
                .collect()
        })
    }

    /// Deletes a pod the way the kubelet does: regular containers get SIGTERM first, native
    /// sidecars after them; whatever is left after `grace` is killed.
    pub fn delete_pod(&self, r: &PodRef, grace: Duration) -> anyhow::Result<()> {
        let run = {
            let mut st = self.state();
            let i = st
                .pods
                .iter()
                .position(|p| p.r == *r)
                .with_context(|| format!("no pod {}", r.name))?;
            st.pods.remove(i)
        };
        for agent in self.agents.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            agent.remove_pod(&r.namespace, &r.name);
        }
        // The endpoint goes first, as the API server removes it when deletion starts.
        self.unpublish("Pod", &r.namespace, &r.name)?;
        self.sync(Duration::from_secs(20))?;
        teardown_pod(run, grace);
        Ok(())
    }

    fn write_hosts(
        &self,
        st: &State,
        netns: &str,
        namespace: &str,
        me: Option<(Ipv4Addr, &str)>,
    ) -> anyhow::Result<()> {
        let path = hosts_path(netns);
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
        match me {
            Some((ip, name)) => text.push_str(&format!("{ip} {name}\n")),
            None => {
                if let Ok(old) = fs::read_to_string(&path)
                    && let Some(line) = old.lines().nth(2)
                {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        for (svc, vips) in &st.services {
            let name = svc.metadata.name.clone().unwrap_or_default();
            let ns = svc.metadata.namespace.clone().unwrap_or_default();
            let mut names = vec![
                format!("{name}.{ns}"),
                format!("{name}.{ns}.svc"),
                format!("{name}.{ns}.svc.cluster.local"),
            ];
            if ns == namespace {
                names.insert(0, name.clone());
            }
            for vip in vips {
                text.push_str(&format!("{vip} {}\n", names.join(" ")));
            }
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn prepare_volumes(&self, pod: &Pod, dir: &Path, root_cert: &str) -> anyhow::Result<()> {
        let root = dir.join("volumes");
        fs::create_dir_all(&root)?;
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        // The token's service account: the pod's, unless a test makes it present another's.
        let sa = annotations
            .get(ANNOTATION_TOKEN_SA)
            .cloned()
            .unwrap_or_else(|| {
                pod.spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into())
            });
        for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let path = root.join(&v.name);
            fs::create_dir_all(&path)?;
            // Any container user may write (emptyDir semantics without fsGroup).
            fs::set_permissions(&path, fs::Permissions::from_mode(0o1777))?;
            if let Some(cm) = &v.config_map
                && cm.name == "weft-ca-root-cert"
            {
                write_file(&path.join("root-cert.pem"), root_cert, 0o644)?;
            }
            if let Some(projected) = &v.projected {
                for source in projected.sources.iter().flatten() {
                    if let Some(t) = &source.service_account_token {
                        let audience = t.audience.clone().unwrap_or_else(|| "kubernetes".into());
                        let ttl = t
                            .expiration_seconds
                            .and_then(|s| u64::try_from(s).ok())
                            .unwrap_or(3600);
                        let token = self.tokens.sign(&ns, &sa, &name, &audience, ttl)?;
                        write_file(&path.join(&t.path), &token, 0o644)?;
                    }
                    if let Some(cm) = &source.config_map
                        && cm.name == "weft-ca-root-cert"
                    {
                        write_file(&path.join("root-cert.pem"), root_cert, 0o644)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The mesh root of the node's control plane.
    pub fn root_cert_pem(&self) -> String {
        self.control_plane
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.root_cert_pem.clone())
            .unwrap_or_default()
    }

    fn start_control_plane(
        &self,
        name: &str,
        webhook_port: u16,
        control_port: u16,
        extra_roots: &[PathBuf],
    ) -> anyhow::Result<ControlPlane> {
        let mut extra_args = Vec::new();
        if let Some(ttl) = self.options.cert_ttl {
            extra_args.extend(["--max-cert-ttl".to_owned(), format!("{}s", ttl.as_secs())]);
        }
        for root in extra_roots {
            extra_args.extend(["--extra-root".to_owned(), root.display().to_string()]);
        }
        let inst = Instance {
            dir: self.dir.path().join(name),
            config_dir: self.config_dir.clone(),
            token_key: self.dir.path().join("token-key.pub"),
            webhook_port,
            control_port,
            cgroup: self.cgroup.join(name),
            extra_args,
        };
        let address = format!("{}:{control_port}", controlplane::NODE_IP);
        ControlPlane::start(
            &self.bins,
            &self.ns,
            &inst,
            &self.options.mesh_config(&address),
        )
    }

    /// Kills the control plane and starts it again (same CA, same config directory), as a
    /// crash and a restart would. Proxies keep their config meanwhile and reconnect.
    pub fn restart_control_plane(&self, down_for: Duration) -> anyhow::Result<()> {
        self.restart_control_plane_with(down_for, &[])
    }

    /// [`LocalNode::restart_control_plane`], trusting `extra_roots` (PEM files) besides its
    /// own root from then on: the overlap of a root rotation.
    pub fn restart_control_plane_with(
        &self,
        down_for: Duration,
        extra_roots: &[PathBuf],
    ) -> anyhow::Result<()> {
        {
            let mut guard = self.control_plane.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(cp) = guard.as_mut() {
                cp.kill();
            }
            *guard = None;
        }
        std::thread::sleep(down_for);
        let cp = self.start_control_plane("control-plane", 443, 15012, extra_roots)?;
        *self.control_plane.lock().unwrap_or_else(|p| p.into_inner()) = Some(cp);
        Ok(())
    }

    /// The root certificate of the rogue control plane (started by a pod annotated
    /// `localnode.weft.dev/ca: rogue`), as a file.
    pub fn rogue_root_file(&self) -> PathBuf {
        self.dir.path().join("rogue-control-plane/ca/ca-cert.pem")
    }

    /// Kills the eBPF agent of simulated node `index` and starts it again; its pinned programs
    /// keep redirecting while it is down.
    pub fn restart_agent(&self, index: usize, down_for: Duration) -> anyhow::Result<()> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents
            .get_mut(index)
            .context("no such agent")?
            .restart(down_for)
    }

    /// Publishes the simulated nodes as Node objects, as the API server holds them: each
    /// eBPF agent labels its node `weft.dev/ebpf-redirect` with what its `/healthz` says
    /// (`ready`, or `unsupported` when the kernel lacks a hook), as the DaemonSet's agent does;
    /// nodes without an agent carry no such label.
    fn publish_nodes(&self) -> anyhow::Result<()> {
        let agents: Vec<(String, SocketAddr)> = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|a| (a.node_name(), a.listen()))
            .collect();
        for i in 0..self.options.nodes.max(1) {
            let name = format!("node-{i}");
            let mut labels = serde_json::Map::new();
            labels.insert("kubernetes.io/hostname".into(), name.clone().into());
            if let Some((_, listen)) = agents.iter().find(|(n, _)| *n == name) {
                let (_, _, body) = self.http_get_body(listen.ip(), listen.port(), "/healthz")?;
                let state = if body.trim() == "ok" {
                    "ready"
                } else {
                    "unsupported"
                };
                labels.insert(REDIRECT_NODE_LABEL.into(), state.into());
            }
            let node = serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels},
            });
            self.publish("Node", "", &name, &node)?;
        }
        Ok(())
    }

    /// The snapshot the control plane computes for a pod (`/debug/config_dump`).
    pub fn config_dump(&self, namespace: &str, name: &str) -> anyhow::Result<serde_json::Value> {
        let cp = self.control_plane.lock().unwrap_or_else(|p| p.into_inner());
        cp.as_ref()
            .context("no control plane")?
            .config_dump(namespace, name)
    }

    /// A workload certificate and key (PEM) for `spiffe_id`, signed by the mesh CA itself
    /// (the control plane's `ca-key.pem`), as a proxy with a static config would be given.
    pub fn issue_mesh_cert(&self, spiffe_id: &str) -> anyhow::Result<(String, String)> {
        let dir = self.dir.path().join("control-plane/ca");
        let ca = Ca::load(
            &fs::read_to_string(dir.join("ca-cert.pem"))?,
            &fs::read_to_string(dir.join("ca-key.pem"))?,
        )
        .context("the mesh CA")?;
        let issued = ca.issue_with_dns("", spiffe_id)?;
        Ok((issued.cert_pem, issued.key_pem))
    }

    /// The eBPF agents' Prometheus text, one entry per simulated node.
    pub fn agent_metrics(&self) -> anyhow::Result<Vec<String>> {
        let listens: Vec<SocketAddr> = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(Agent::listen)
            .collect();
        listens
            .into_iter()
            .map(|l| {
                let (status, _, body) = self.http_get_body(l.ip(), l.port(), "/metrics")?;
                anyhow::ensure!(status == 200, "agent {l}: /metrics answered {status}");
                Ok(body)
            })
            .collect()
    }

    /// The NAT rules in a pod's network namespace (`iptables-save -t nat` and its IPv6 twin).
    pub fn pod_nat_rules(&self, r: &PodRef) -> anyhow::Result<String> {
        let mut out = String::new();
        for tool in ["iptables-save", "ip6tables-save"] {
            let o = Command::new("ip")
                .args(["netns", "exec", &r.netns, tool, "-t", "nat"])
                .output()
                .with_context(|| format!("run {tool} in {}", r.netns))?;
            anyhow::ensure!(
                o.status.success(),
                "{tool}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            out.push_str(&String::from_utf8_lossy(&o.stdout));
        }
        Ok(out)
    }

    /// Established TCP sockets in a pod's network namespace matching an `ss` filter (e.g.
    /// `dst 10.44.0.2`), counted.
    pub fn established(&self, r: &PodRef, filter: &str) -> anyhow::Result<usize> {
        let mut argv = vec![
            "netns",
            "exec",
            &r.netns,
            "ss",
            "-Htn",
            "state",
            "established",
        ];
        argv.extend(filter.split_whitespace());
        let o = Command::new("ip").args(&argv).output().context("run ss")?;
        anyhow::ensure!(
            o.status.success(),
            "ss {filter}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count())
    }

    /// The eBPF agents' logs.
    pub fn agent_logs(&self) -> String {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(Agent::log)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The control plane's log.
    pub fn control_plane_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("control-plane/control-plane.log"))
            .unwrap_or_default()
    }

    fn object_path(&self, kind: &str, namespace: &str, name: &str) -> PathBuf {
        let clean = |s: &str| {
            s.replace(
                |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '.',
                "_",
            )
        };
        self.config_dir.join(format!(
            "{}-{}-{}.yaml",
            clean(kind),
            clean(namespace),
            clean(name)
        ))
    }

    /// Writes an object where the control plane reads it (atomically).
    fn publish(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        value: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let path = self.object_path(kind, namespace, name);
        write_file(&path, &serde_yaml_ng::to_string(value)?, 0o644)
    }

    fn unpublish(&self, kind: &str, namespace: &str, name: &str) -> anyhow::Result<()> {
        match fs::remove_file(self.object_path(kind, namespace, name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Waits until the control plane has read everything written so far and every running
    /// proxy has acknowledged a view at least that recent. A marker object changes on every
    /// call, so there is always a new generation to wait for.
    pub fn sync(&self, timeout: Duration) -> anyhow::Result<()> {
        let seq = self.sync_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let marker = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "weft-localnode-sync", "labels": {"weft.dev/sync": seq.to_string()}},
        });
        let before = self.with_control_planes(|cp| cp.sync_status().map(|s| s.generation))?;
        self.publish("Namespace", "", "weft-localnode-sync", &marker)?;
        let deadline = Instant::now() + timeout;
        // The control plane reads the marker: its generation moves past what it was.
        let targets = loop {
            let now = self.with_control_planes(|cp| cp.sync_status().map(|s| s.generation))?;
            if now.iter().zip(&before).all(|(n, b)| n > b) {
                break now;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the control plane did not read the config directory"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let proxies: Vec<String> = {
            let st = self.state();
            st.pods
                .iter()
                .filter(|p| p.meshed)
                .map(|p| format!("{}/{}", p.r.namespace, p.r.name))
                .collect()
        };
        loop {
            let statuses = self.with_control_planes(|cp| cp.sync_status())?;
            let mut lagging = Vec::new();
            for name in &proxies {
                let Some(pod) = self.pod_by_label(name) else {
                    continue;
                };
                if !self.proxy_running(&pod) {
                    continue;
                }
                let synced = statuses.iter().zip(&targets).any(|(s, target)| {
                    s.proxies
                        .iter()
                        .any(|p| &p.proxy == name && p.synced(*target))
                });
                if !synced {
                    lagging.push(name.clone());
                }
            }
            if lagging.is_empty() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "proxies did not acknowledge the config at generation {targets:?}: {lagging:?} (control plane: {statuses:?})\n{}",
                tail(&self.control_plane_log(), 30)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pod_by_label(&self, label: &str) -> Option<PodRef> {
        let (ns, name) = label.split_once('/')?;
        self.pod(ns, name)
    }

    /// Runs `f` on every control plane of the node (the main one, and the rogue one when a
    /// test started it).
    fn with_control_planes<T>(
        &self,
        f: impl Fn(&ControlPlane) -> anyhow::Result<T>,
    ) -> anyhow::Result<Vec<T>> {
        let mut out = Vec::new();
        for slot in [&self.control_plane, &self.rogue] {
            let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(cp) = guard.as_ref() {
                out.push(f(cp)?);
            }
        }
        Ok(out)
    }

    /// Compatibility name of [`LocalNode::sync`].
    pub fn wait_config_applied(&self, timeout: Duration) -> anyhow::Result<()> {
        self.sync(timeout)
    }

    /// True while the pod's `weft-proxy` process runs.
    fn proxy_running(&self, r: &PodRef) -> bool {
        self.with_pod(r, |p| {
            p.procs.iter_mut().any(|c| {
                if c.container == "weft-proxy" && c.exited.is_none() {
                    c.exited = c.child.try_wait().ok().flatten();
                }
                c.container == "weft-proxy" && c.exited.is_none()
            })
        })
        .unwrap_or(false)
    }

    fn wait_probe(
        &self,
        r: &PodRef,
        container: &str,
        probe: &Probe,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("not run");
        while Instant::now() < deadline {
            match self.run_probe(r, probe) {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            let exited = self.with_pod(r, |p| {
                p.procs
                    .iter_mut()
                    .find(|c| c.container == container)
                    .and_then(|c| c.child.try_wait().ok().flatten())
            })?;
            if let Some(status) = exited {
                bail!("container {container} exited ({status}) before it was ready");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("container {container} not ready after {timeout:?}: {last}")
    }

    /// Runs a probe the way the kubelet does, from the node's network.
    fn run_probe(&self, r: &PodRef, probe: &Probe) -> anyhow::Result<()> {
        let port_of = |p: &IntOrString| -> anyhow::Result<u16> {
            match p {
                IntOrString::Int(i) => Ok(u16::try_from(*i)?),
                IntOrString::String(name) => {
                    let pod = self.with_pod(r, |p| p.pod.clone())?;
                    pod.spec
                        .iter()
                        .flat_map(|s| s.containers.iter())
                        .flat_map(|c| c.ports.iter().flatten())
                        .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                        .map(|cp| u16::try_from(cp.container_port))
                        .transpose()?
                        .with_context(|| format!("no container port named {name}"))
                }
            }
        };
        if let Some(h) = &probe.http_get {
            let port = port_of(&h.port)?;
            let (status, _) =
                self.http_get(IpAddr::V4(r.ip), port, h.path.as_deref().unwrap_or("/"))?;
            anyhow::ensure!((200..400).contains(&status), "HTTP probe returned {status}");
            return Ok(());
        }
        if let Some(t) = &probe.tcp_socket {
            let port = port_of(&t.port)?;
            let addr = SocketAddr::new(IpAddr::V4(r.ip), port);
            network::in_netns(&self.ns, move || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            })??;
            return Ok(());
        }
        if let Some(e) = &probe.exec {
            let argv: Vec<String> = e.command.clone().unwrap_or_default();
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let out = self.exec(r, None, &argv)?;
            anyhow::ensure!(out.status.success(), "exec probe failed");
            return Ok(());
        }
        bail!("unsupported probe")
    }

    /// `GET http://ip:port/path` from the node's network: status and lower-case headers.
    pub fn http_get(
        &self,
        ip: IpAddr,
        port: u16,
        path: &str,
    ) -> anyhow::Result<(u16, BTreeMap<String, String>)> {
        self.http_get_body(ip, port, path).map(|(s, h, _)| (s, h))
    }

    /// `GET http://ip:port/path` from the node's network: status, headers and body.
    pub fn http_get_body(
        &self,
        ip: IpAddr,
        port: u16,
        path: &str,
    ) -> anyhow::Result<(u16, BTreeMap<String, String>, String)> {
        let addr = SocketAddr::new(ip, port);
        let mut s = network::in_netns(&self.ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        })??;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let mut lines = resp.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .context("no HTTP status line")?;
        let headers = lines
            .by_ref()
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let body: Vec<&str> = lines.collect();
        Ok((status, headers, body.join("\n")))
    }

    /// Starts a packet capture of all pod-to-pod traffic: a packet socket on every
    /// interface of the node namespace (each frame is seen on the veth it crosses).
    pub fn capture(&self) -> anyhow::Result<Capture> {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockProtocol, SockType, setsockopt, socket, sockopt,
        };
        let fd = network::in_netns(&self.ns, || {
            socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )
        })?
        .context("packet socket")?;
        setsockopt(&fd, sockopt::RcvBufForce, &(32 * 1024 * 1024)).context("SO_RCVBUFFORCE")?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 50_000),
        )
        .context("SO_RCVTIMEO")?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                match nix::sys::socket::recv(
                    fd.as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::empty(),
                ) {
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    // Timeout with nothing queued: done once asked to stop.
                    Err(_) if stop2.load(Ordering::Acquire) => break,
                    Err(_) => {}
                }
            }
            out
        });
        Ok(Capture {
            stop,
            reader: Some(reader),
        })
    }
}

/// A command running in a pod.
#[derive(Debug)]
pub struct Background {
    child: Option<Child>,
}

impl Background {
    /// Whether the command is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for the command and returns its output.
    pub fn wait(mut self) -> anyhow::Result<Output> {
        let child = self.child.take().context("already waited")?;
        Ok(child.wait_with_output()?)
    }

    /// Waits and parses stdout as JSON.
    pub fn wait_json<T: serde::de::DeserializeOwned>(self) -> anyhow::Result<T> {
        let out = self.wait()?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "exit {}, stdout {:?}, stderr {:?}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running packet capture.
#[derive(Debug)]
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Capture {
    /// Stops the capture once every queued frame is read; returns the raw frames, back to
    /// back.
    pub fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        self.stop.store(true, Ordering::Release);
        let reader = self.reader.take().context("capture already finished")?;
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("capture thread panicked"))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl LocalNode {
    /// Removes everything the node made: pods (their processes, namespaces, hosts files,
    /// cgroups), eBPF agents and their pins, control planes, the node namespace and the
    /// node's files. Idempotent, and callable from another thread while the node is in use
    /// (a signal handler): what is torn down is taken out of the node first.
    pub fn teardown(&self) {
        let pods = std::mem::take(&mut self.state().pods);
        for run in pods {
            teardown_pod(run, Duration::from_secs(2));
        }
        drop(std::mem::take(
            &mut *self.agents.lock().unwrap_or_else(|p| p.into_inner()),
        ));
        for cp in [&self.control_plane, &self.rogue] {
            drop(cp.lock().unwrap_or_else(|p| p.into_inner()).take());
        }
        network::delete_netns(&self.ns);
        remove_cgroup(&self.cgroup);
        let _ = fs::remove_dir_all(self.dir.path());
        tracing::info!(node = %self.id, "local node removed");
    }
}

/// Set once [`teardown_on_signal`] has seen a signal.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For programs that run a node (the demo, the benchmarks): on SIGINT or SIGTERM, tears
/// `node` down while other threads may still be using it, then exits with status 130.
pub fn teardown_on_signal(node: std::sync::Arc<LocalNode>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("signal runtime")?;
    // Registered before returning, so that no signal finds the default handler.
    let (mut int, mut term) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("\ninterrupted: tearing the local node down");
        node.teardown();
        std::process::exit(130);
    });
    Ok(())
}

/// Whether a signal is tearing the node down ([`teardown_on_signal`]): errors the main
/// thread meets then are the teardown's doing, not worth reporting.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// When a signal is tearing the node down ([`teardown_on_signal`]), waits for that thread to
/// end the process, so that returning from `main` does not cut the teardown short.
pub fn wait_if_interrupted() {
    if interrupted() {
        loop {
            std::thread::park();
        }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn teardown_pod(mut run: PodRun, grace: Duration) {
    let term = |procs: &mut Vec<Proc>, pick: &dyn Fn(&Role) -> bool| {
        for p in procs
            .iter_mut()
            .filter(|p| pick(&p.role) && p.exited.is_none())
        {
            if let Ok(pid) = i32::try_from(p.child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        for p in procs
            .iter_mut()
            .filter(|p| pick(&p.role) && p.exited.is_none())
        {
            loop {
                if let Ok(Some(s)) = p.child.try_wait() {
                    p.exited = Some(s);
                    break;
                }
                if Instant::now() > deadline {
                    let _ = p.child.kill();
                    p.exited = p.child.wait().ok();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    term(&mut run.procs, &|r| matches!(r, Role::Main));
    term(&mut run.procs, &|r| matches!(r, Role::Sidecar));
    remove_cgroup(&run.cgroup);
    network::delete_netns(&run.r.netns);
    let _ = fs::remove_dir_all(
        hosts_path(&run.r.netns)
            .parent()
            .unwrap_or(Path::new("/nonexistent")),
    );
}

/// Kills whatever is left in a cgroup subtree and removes it.
fn remove_cgroup(cg: &Path) {
    if !cg.exists() {
        return;
    }
    let _ = fs::write(cg.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut dirs = Vec::new();
        collect_dirs(cg, &mut dirs);
        // Deepest first.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        let mut all = true;
        for d in dirs {
            if fs::remove_dir(&d).is_err() && d.exists() {
                all = false;
            }
        }
        if all || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&e.path(), out);
        }
    }
}

/// Removes namespaces, hosts files and cgroups of local nodes whose process is gone.
fn sweep_stale(bins: &Path) {
    let dead = |name: &str| -> bool {
        name.strip_prefix("weft-")
            .and_then(|r| r.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for ns in network::list_netns() {
        if dead(&ns) {
            tracing::info!(netns = %ns, "removing namespace of a dead local node");
            network::delete_netns(&ns);
            let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&ns));
        }
    }
    for e in fs::read_dir("/etc/netns").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    for e in fs::read_dir(CGROUP_ROOT).into_iter().flatten().flatten() {
        let name = format!("weft-{}", e.file_name().to_string_lossy());
        if dead(&name) {
            remove_cgroup(&e.path());
        }
    }
    // Node directories (`$TMPDIR/weft-<pid>-<seq>-XXXXXX`).
    for e in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if dead(&name) && e.path().is_dir() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    // eBPF agents' pins (`/sys/fs/bpf/weft/<pid>-<seq>-<node>`).
    for e in fs::read_dir("/sys/fs/bpf/weft")
        .into_iter()
        .flatten()
        .flatten()
    {
        let instance = e.file_name().to_string_lossy().into_owned();
        if dead(&format!("weft-{instance}")) {
            redirect::uninstall(bins, &instance);
        }
    }
}

/// A pod's status as the node publishes it: its addresses, and Ready once its probes pass
/// (endpoints only count ready pods).
fn pod_status(r: &PodRef, ready: bool) -> PodStatus {
    PodStatus {
        pod_ip: Some(r.ip.to_string()),
        pod_ips: Some(vec![
            k8s_openapi::api::core::v1::PodIP {
                ip: r.ip.to_string(),
            },
            k8s_openapi::api::core::v1::PodIP {
                ip: r.ip6.to_string(),
            },
        ]),
        host_ip: Some(Subnet::GATEWAY4.to_string()),
        phase: Some(if ready { "Running" } else { "Pending" }.into()),
        conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The last `n` lines of a log.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn hosts_path(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns).join("hosts")
}

fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp-write");
    fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path)?;
    Ok(())
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn wait_child(mut child: Child, timeout: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run_exec(bins: &Path, spec: &ExecSpec, timeout: Duration) -> anyhow::Result<Output> {
    let child = Command::new(bins.join("weft-pod-exec"))
        .env_clear()
        .env(SPEC_ENV, serde_json::to_string(spec)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out?),
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            bail!("{:?} did not finish within {timeout:?}", spec.argv)
        }
    }
}

/// Kubernetes' `$(VAR)` expansion in command, args and env values.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) => {
                let name = &after[..j];
                match env.iter().rev().find(|(k, _)| k == name) {
                    Some((_, v)) => out.push_str(v),
                    None => {
                        out.push_str("$(");
                        out.push_str(name);
                        out.push(')');
                    }
                }
                rest = &after[j + 1..];
            }
            None => {
                out.push_str(&rest[i..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The downward API.
fn field_ref(pod: &Pod, path: &str) -> String {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let bracket = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        map.as_ref()?.get(key).cloned()
    };
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone().or_else(|| meta.name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()),
        "status.podIPs" => status.and_then(|s| s.pod_ip.clone()),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()),
        p if p.starts_with("metadata.labels['") => bracket("metadata.labels['", &meta.labels),
        p if p.starts_with("metadata.annotations['") => {
            bracket("metadata.annotations['", &meta.annotations)
        }
        _ => None,
    }
    .unwrap_or_default()
}

trait DeserializeFrom: Sized {
    fn deserialize_from(d: serde_yaml_ng::Deserializer<'_>) -> Result<Self, serde_yaml_ng::Error>;
}

impl DeserializeFrom for serde_json::Value {
    fn deserialize_from(d: serde_yaml_ng::Deserializer<'_>) -> Result<Self, serde_yaml_ng::Error> {
        serde::Deserialize::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_expansion() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("x$(A)y$(B)$(", &env), "x1y$(B)$(");
    }

    #[test]
    fn downward_api() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("p".into());
        pod.metadata.labels = Some([("app".to_string(), "b".to_string())].into());
        pod.status = Some(PodStatus {
            pod_ip: Some("10.44.0.2".into()),
            ..Default::default()
        });
        assert_eq!(field_ref(&pod, "metadata.name"), "p");
        assert_eq!(field_ref(&pod, "status.podIP"), "10.44.0.2");
        assert_eq!(field_ref(&pod, "metadata.labels['app']"), "b");
        assert_eq!(field_ref(&pod, "metadata.labels['x']"), "");
    }
}

/// The value of a Prometheus sample (the sum over all series matching every `labels` pair).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl LocalNode {
    /// A pod's proxy metrics (port 15090), read from the node's network.
    pub fn proxy_metrics(&self, r: &PodRef) -> anyhow::Result<String> {
        let (status, _, body) = self.http_get_body(
            IpAddr::V4(r.ip),
            weft_api::bootstrap::PORT_PROMETHEUS,
            "/stats/prometheus",
        )?;
        anyhow::ensure!(status == 200, "metrics of {} answered {status}", r.name);
        Ok(body)
    }
}

impl LocalNode {
    /// The PID of a running container's process.
    pub fn container_pid(&self, r: &PodRef, container: &str) -> anyhow::Result<u32> {
        self.with_pod(r, |p| {
            p.procs
                .iter()
                .find(|c| c.container == container && c.exited.is_none())
                .map(|c| c.child.id())
        })?
        .with_context(|| format!("no running container {container} in {}", r.name))
    }

    /// PEM of the node's reference CA (not the mesh's): for reference proxies in benchmarks.
    pub fn reference_ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// Issues a certificate from the reference CA with a DNS name and a SPIFFE ID (for
    /// reference proxies in benchmarks): (certificate PEM, key PEM).
    pub fn issue_cert(&self, dns: &str, spiffe_id: &str) -> anyhow::Result<(String, String)> {
        let issued = self.ca.issue_with_dns(dns, spiffe_id)?;
        Ok((issued.cert_pem, issued.key_pem))
    }
}

/// CPU time and peak memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcUsage {
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
    /// Peak resident set size, bytes (VmHWM).
    pub peak_rss_bytes: u64,
    /// Current resident set size, bytes.
    pub rss_bytes: u64,
}

/// Reads a process's CPU time and memory.
pub fn proc_usage(pid: u32) -> anyhow::Result<ProcUsage> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short stat")?.parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the name.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)
        .context("sysconf(_SC_CLK_TCK)")? as f64;
    let cpu_seconds = (ticks(11)? + ticks(12)?) / hz;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcUsage {
        cpu_seconds,
        peak_rss_bytes: kb("VmHWM:") * 1024,
        rss_bytes: kb("VmRSS:") * 1024,
    })
}
