//! What the control plane knows of the cluster: namespaces, services, pods, endpoint slices,
//! nodes and the Istio / Gateway API / SMI resources, whichever source filled it (Kubernetes
//! watches or a directory of YAML). [`Store`] is the mutable, shared side; every change bumps a
//! generation that discovery watches. [`Resources`] is an immutable copy that translation reads.
//!
//! Nodes are the exception: only the injector reads them (their labels say where eBPF
//! redirection works, see [`crate::inject::mode`]), so they are kept as name → labels and a
//! change of a node never bumps the generation nor rebuilds the translation index.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::watch;
use weft_api::crd::AnyResource;

use crate::translate::Index;

/// DNS domain of the cluster: services are `<name>.<ns>.svc.<domain>`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Pod annotation of an injected sidecar: the pod is meshed.
pub const ANNOTATION_SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Pod label: `disabled` means peers must not use mesh mTLS towards it.
pub const LABEL_TLS_MODE: &str = "security.istio.io/tlsMode";
/// Service annotation restricting where the service is visible.
pub const ANNOTATION_EXPORT_TO: &str = "networking.istio.io/exportTo";
/// Default Istio root namespace of Weft (mesh-wide policies live here).
pub const DEFAULT_ROOT_NAMESPACE: &str = "weft-system";

/// `(namespace, name)`.
pub type Key = (String, String);

/// Settings translation needs beside the objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Trust domain of SPIFFE identities.
    pub trust_domain: String,
    /// Namespace of mesh-wide policies (PeerAuthentication, Sidecar, DestinationRule).
    pub root_namespace: String,
    /// Protocol detection timeout handed to proxies, milliseconds.
    pub protocol_detection_timeout_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            trust_domain: weft_api::config::DEFAULT_TRUST_DOMAIN.to_owned(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
            protocol_detection_timeout_ms: weft_api::config::DEFAULT_PROTOCOL_DETECTION_TIMEOUT_MS,
        }
    }
}

/// An Istio / Gateway API / SMI resource with when it was created (its
/// `creationTimestamp`, else when this control plane first saw it), for "oldest first".
#[derive(Debug, Clone)]
pub struct ConfigEntry {
    /// The resource.
    pub resource: Arc<AnyResource>,
    /// Creation time.
    pub created: SystemTime,
}

/// `(group/kind, namespace, name)` of a config resource.
pub type ConfigKey = (String, String, String);

/// Nodes by name, each with its labels: all the control plane keeps of a node.
pub type NodeLabels = BTreeMap<String, BTreeMap<String, String>>;

/// One object from a source, shared (sources and the store hold the same allocation).
#[derive(Debug, Clone)]
pub enum Object {
    /// A namespace.
    Namespace(Arc<Namespace>),
    /// A service.
    Service(Arc<Service>),
    /// A pod (only what the control plane reads, see [`PodInfo`]).
    Pod(Arc<PodInfo>),
    /// An endpoint slice.
    EndpointSlice(Arc<EndpointSlice>),
    /// A node (only its name and labels, see [`Object::node`]).
    Node(Arc<Node>),
    /// An Istio / Gateway API / SMI resource.
    Config(Arc<AnyResource>),
}

/// Which object, for removal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// `Namespace`, `Service`, `Pod`, `EndpointSlice`, `Node` or `group/Kind`.
    pub kind: String,
    /// Namespace (empty for namespaces and nodes, which have none).
    pub namespace: String,
    /// Name.
    pub name: String,
}

fn meta_key(meta: &ObjectMeta) -> Key {
    (
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        meta.name.clone().unwrap_or_default(),
    )
}

impl Object {
    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        let (kind, meta) = match self {
            Object::Namespace(n) => {
                return ObjectKey {
                    kind: "Namespace".into(),
                    namespace: String::new(),
                    name: n.metadata.name.clone().unwrap_or_default(),
                };
            }
            Object::Node(n) => {
                return ObjectKey {
                    kind: "Node".into(),
                    namespace: String::new(),
                    name: n.metadata.name.clone().unwrap_or_default(),
                };
            }
            Object::Service(s) => ("Service".to_owned(), &s.metadata),
            Object::Pod(p) => {
                return ObjectKey {
                    kind: "Pod".into(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                };
            }
            Object::EndpointSlice(e) => ("EndpointSlice".to_owned(), &e.metadata),
            Object::Config(c) => {
                let k = c.known_kind();
                (format!("{}/{}", k.group, k.kind), c.metadata())
            }
        };
        let (namespace, name) = meta_key(meta);
        ObjectKey {
            kind,
            namespace,
            name,
        }
    }

    /// A namespace, without what translation does not read.
    pub fn namespace(mut n: Namespace) -> Object {
        n.metadata.managed_fields = None;
        n.spec = None;
        n.status = None;
        Object::Namespace(Arc::new(n))
    }

    /// A service, without what translation does not read.
    pub fn service(mut s: Service) -> Object {
        s.metadata.managed_fields = None;
        s.status = None;
        Object::Service(Arc::new(s))
    }

    /// A pod, as [`PodInfo`] keeps it.
    pub fn pod(p: Pod) -> Object {
        Object::Pod(Arc::new(PodInfo::from_pod(p)))
    }

    /// A node, slimmed by [`slim_node`].
    pub fn node(n: Node) -> Object {
        Object::Node(Arc::new(slim_node(n)))
    }

    /// Reads a Kubernetes object from JSON: `Ok(None)` for kinds the control plane ignores.
    pub fn from_value(value: &serde_json::Value) -> Result<Option<Object>, String> {
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        Ok(Some(match (api_version, kind) {
            ("v1", "Namespace") => Object::namespace(typed(kind, value)?),
            ("v1", "Service") => Object::service(typed(kind, value)?),
            ("v1", "Pod") => Object::pod(typed(kind, value)?),
            ("v1", "Node") => Object::node(typed(kind, value)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                Object::EndpointSlice(Arc::new(typed(kind, value)?))
            }
            _ => match AnyResource::from_value(value).map_err(|e| e.to_string())? {
                Some(r) => Object::Config(Arc::new(r)),
                None => return Ok(None),
            },
        }))
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    kind: &str,
    value: &serde_json::Value,
) -> Result<T, String> {
    serde_path_to_error::deserialize(value.clone())
        .map_err(|e| format!("{kind} {}: {}", e.path(), e.inner()))
}

/// An immutable view of everything known, shared by the translations of one push.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    /// Settings.
    pub settings: Settings,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    /// Services.
    pub services: BTreeMap<Key, Arc<Service>>,
    /// Pods.
    pub pods: BTreeMap<Key, Arc<PodInfo>>,
    /// Endpoint slices (Kubernetes only; without them endpoints come from pods and selectors).
    pub endpoint_slices: BTreeMap<Key, Arc<EndpointSlice>>,
    /// Nodes and their labels, for the injector; shared so that a request takes them without
    /// copying. Not translated for proxies.
    pub nodes: Arc<NodeLabels>,
    /// Istio / Gateway API / SMI resources.
    pub configs: BTreeMap<ConfigKey, ConfigEntry>,
    index: OnceLock<Arc<Index>>,
}

impl Resources {
    /// An empty view with these settings.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            ..Default::default()
        }
    }

    /// Adds or replaces an object.
    pub fn upsert(&mut self, object: Object) {
        if let Object::Node(n) = &object {
            // Not translated: the index stays.
            let name = n.metadata.name.clone().unwrap_or_default();
            let labels = n.metadata.labels.clone().unwrap_or_default();
            Arc::make_mut(&mut self.nodes).insert(name, labels);
            return;
        }
        self.index = OnceLock::new();
        match object {
            Object::Namespace(n) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                self.namespaces.insert(name, n);
            }
            Object::Service(s) => {
                self.services.insert(meta_key(&s.metadata), s);
            }
            Object::Pod(p) => {
                self.pods.insert((p.namespace.clone(), p.name.clone()), p);
            }
            Object::EndpointSlice(e) => {
                self.endpoint_slices.insert(meta_key(&e.metadata), e);
            }
            Object::Node(_) => {}
            Object::Config(c) => {
                let k = c.known_kind();
                let (ns, name) = meta_key(c.metadata());
                let key = (format!("{}/{}", k.group, k.kind), ns, name);
                let created = c
                    .metadata()
                    .creation_timestamp
                    .as_ref()
                    .map(|t| SystemTime::from(t.0))
                    .or_else(|| self.configs.get(&key).map(|e| e.created))
                    .unwrap_or_else(SystemTime::now);
                self.configs.insert(
                    key,
                    ConfigEntry {
                        resource: c,
                        created,
                    },
                );
            }
        }
    }

    /// Removes an object; true when it was there.
    pub fn remove(&mut self, key: &ObjectKey) -> bool {
        if key.kind == "Node" {
            return self.nodes.contains_key(&key.name)
                && Arc::make_mut(&mut self.nodes).remove(&key.name).is_some();
        }
        self.index = OnceLock::new();
        let k = (key.namespace.clone(), key.name.clone());
        match key.kind.as_str() {
            "Namespace" => self.namespaces.remove(&key.name).is_some(),
            "Service" => self.services.remove(&k).is_some(),
            "Pod" => self.pods.remove(&k).is_some(),
            "EndpointSlice" => self.endpoint_slices.remove(&k).is_some(),
            kind => self.configs.remove(&(kind.to_owned(), k.0, k.1)).is_some(),
        }
    }

    /// Drops every object of `kind` that `keep` refuses (a Kubernetes re-list).
    pub fn retain_kind(&mut self, kind: &str, keep: impl Fn(&ObjectKey) -> bool) {
        let key = |ns: &str, name: &str| ObjectKey {
            kind: kind.to_owned(),
            namespace: ns.to_owned(),
            name: name.to_owned(),
        };
        if kind == "Node" {
            if self.nodes.keys().any(|n| !keep(&key("", n))) {
                Arc::make_mut(&mut self.nodes).retain(|n, _| keep(&key("", n)));
            }
            return;
        }
        self.index = OnceLock::new();
        match kind {
            "Namespace" => self.namespaces.retain(|n, _| keep(&key("", n))),
            "Service" => self.services.retain(|(ns, n), _| keep(&key(ns, n))),
            "Pod" => self.pods.retain(|(ns, n), _| keep(&key(ns, n))),
            "EndpointSlice" => self.endpoint_slices.retain(|(ns, n), _| keep(&key(ns, n))),
            _ => self
                .configs
                .retain(|(k, ns, n), _| k != kind || keep(&key(ns, n))),
        }
    }

    /// The derived index (service registry, resources by kind, oldest first), built once.
    pub fn index(&self) -> Arc<Index> {
        self.index
            .get_or_init(|| Arc::new(Index::build(self)))
            .clone()
    }

    /// A pod by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<PodInfo>> {
        self.pods.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Whether storing `object` would change nothing: a node whose labels are those already
    /// stored. Kubernetes sends a node's every status update; only its labels matter here.
    pub fn holds(&self, object: &Object) -> bool {
        match object {
            Object::Node(n) => {
                let name = n.metadata.name.as_deref().unwrap_or_default();
                let empty = BTreeMap::new();
                self.nodes
                    .get(name)
                    .is_some_and(|stored| stored == n.metadata.labels.as_ref().unwrap_or(&empty))
            }
            _ => false,
        }
    }
}

/// Whether a change of objects of this kind can change what proxies are sent (nodes cannot).
pub fn is_translated(kind: &str) -> bool {
    kind != "Node"
}

/// The shared, mutable store. Writers bump the generation; readers take [`Store::snapshot`].
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Arc<Resources>>,
    generation: watch::Sender<u64>,
}

impl Store {
    /// An empty store.
    pub fn new(settings: Settings) -> Arc<Store> {
        Arc::new(Store {
            inner: Mutex::new(Arc::new(Resources::new(settings))),
            generation: watch::Sender::new(0),
        })
    }

    /// Changes the resources; the generation is bumped when `change` says something changed.
    pub fn update(&self, change: impl FnOnce(&mut Resources) -> bool) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let resources = Arc::make_mut(&mut guard);
        if change(resources) {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// The current resources.
    pub fn snapshot(&self) -> Arc<Resources> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Watches the generation (bumped on every change).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }
}

/// The workload a proxy serves, as translation sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct ProxyRef {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Service account.
    pub service_account: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Pod IP.
    pub ip: Option<IpAddr>,
}

impl ProxyRef {
    /// The proxy of a pod.
    pub fn from_pod(pod: &PodInfo) -> ProxyRef {
        ProxyRef {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            service_account: pod.service_account().to_owned(),
            labels: (*pod.labels).clone(),
            ip: pod.ip,
        }
    }
}

/// Keeps only what the injector reads of a node: its name and labels. A node from a cluster
/// is mostly status (conditions, images, addresses) that changes all the time.
pub fn slim_node(node: Node) -> Node {
    Node {
        metadata: ObjectMeta {
            name: node.metadata.name,
            labels: node.metadata.labels,
            ..ObjectMeta::default()
        },
        spec: None,
        status: None,
    }
}

/// What the control plane keeps of a pod: only what translation, discovery and the root
/// ConfigMap publisher read. Even slimmed, a k8s-openapi `Pod` is about 5 KB (the `Pod` and
/// `Container` structs alone are 2.4 KB each); this is a few hundred bytes, which is what
/// lets 10,000 pods fit in the push benchmark's memory budget.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInfo {
    /// Namespace (`default` when the pod names none, as for every stored object).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.serviceAccountName`: the account endpoint identities name (`default` when absent).
    pub service_account_name: Option<String>,
    /// `spec.serviceAccount`, the deprecated alias, kept only when `serviceAccountName` is
    /// absent: the account a proxy runs as falls back to it (see [`PodInfo::service_account`]).
    pub deprecated_service_account: Option<String>,
    /// Labels; shared with the endpoints translation derives from the pod.
    pub labels: Arc<BTreeMap<String, String>>,
    /// `status.podIP`, when it is an address.
    pub ip: Option<IpAddr>,
    /// Carries a sidecar: its injector wrote the `sidecar.istio.io/status` annotation.
    pub meshed: bool,
    /// Being deleted (`metadata.deletionTimestamp` is set).
    pub terminating: bool,
    /// Its phase is `Succeeded` or `Failed`.
    pub completed: bool,
    /// Its `Ready` condition is `False` (an absent condition does not count: local pods have
    /// none).
    pub unready: bool,
    /// Named container ports, `(name, containerPort)`, in container order; the first port of
    /// each name only, since a name resolves to the first port that has it.
    pub named_ports: Vec<(String, i32)>,
}

impl PodInfo {
    /// Reads what the control plane keeps of `pod`.
    pub fn from_pod(pod: Pod) -> PodInfo {
        let meta = pod.metadata;
        let (service_account_name, deprecated_service_account, named_ports) = match pod.spec {
            Some(spec) => {
                let mut named: Vec<(String, i32)> = Vec::new();
                for port in spec
                    .containers
                    .into_iter()
                    .flat_map(|c| c.ports.into_iter().flatten())
                {
                    if let Some(name) = port.name
                        && !named.iter().any(|(n, _)| *n == name)
                    {
                        named.push((name, port.container_port));
                    }
                }
                let deprecated = spec
                    .service_account
                    .filter(|_| spec.service_account_name.is_none());
                (spec.service_account_name, deprecated, named)
            }
            None => (None, None, Vec::new()),
        };
        let status = pod.status.unwrap_or_default();
        PodInfo {
            namespace: meta.namespace.unwrap_or_else(|| "default".to_owned()),
            name: meta.name.unwrap_or_default(),
            service_account_name,
            deprecated_service_account,
            labels: Arc::new(meta.labels.unwrap_or_default()),
            ip: status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()),
            meshed: meta
                .annotations
                .is_some_and(|a| a.contains_key(ANNOTATION_SIDECAR_STATUS)),
            terminating: meta.deletion_timestamp.is_some(),
            completed: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
            unready: status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "False"),
            named_ports,
        }
    }

    /// The account the pod runs as: `serviceAccountName`, else the deprecated
    /// `serviceAccount`, else `default`.
    pub fn service_account(&self) -> &str {
        self.service_account_name
            .as_deref()
            .or(self.deprecated_service_account.as_deref())
            .unwrap_or("default")
    }

    /// The address an endpoint of this pod is served on: none while the pod is being deleted,
    /// has completed, is not ready, or has no address, as an EndpointSlice would have it.
    pub fn serving_ip(&self) -> Option<IpAddr> {
        if self.terminating || self.completed || self.unready {
            return None;
        }
        self.ip
    }

    /// The number of the container port named `name` (the first that has it), if it is a
    /// port number.
    pub fn named_port(&self, name: &str) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, port)| u16::try_from(*port).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as the API server returns it (`kubectl get pod -o json`), trimmed of volumes
    /// and most of the container details but with everything that used to ride along.
    fn cluster_pod() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "reviews-v2-7d79d5bd5d-xk2lp",
                "namespace": "bookinfo",
                "uid": "0f1e0c52-8a61-4f0e-9d7c-8f6c2a0e4b11",
                "resourceVersion": "48213",
                "creationTimestamp": "2024-05-02T10:11:12Z",
                "generateName": "reviews-v2-7d79d5bd5d-",
                "labels": {
                    "app": "reviews",
                    "version": "v2",
                    "pod-template-hash": "7d79d5bd5d",
                    "security.istio.io/tlsMode": "istio"
                },
                "annotations": {
                    "sidecar.istio.io/status": "{\"initContainers\":[\"istio-init\"],\"containers\":[\"istio-proxy\"]}",
                    "kubectl.kubernetes.io/default-container": "reviews",
                    "prometheus.io/port": "15020"
                },
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-v2-7d79d5bd5d",
                    "uid": "6b0a4b3e-1111-4c55-9d7c-000000000001", "controller": true
                }],
                "managedFields": [{
                    "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                    "time": "2024-05-02T10:11:12Z", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:labels": {}}}
                }]
            },
            "spec": {
                "serviceAccountName": "bookinfo-reviews",
                "serviceAccount": "bookinfo-reviews",
                "nodeName": "node-1",
                "initContainers": [{
                    "name": "istio-init", "image": "istio/proxyv2",
                    "ports": [{"name": "init", "containerPort": 1}]
                }],
                "containers": [
                    {
                        "name": "reviews", "image": "istio/examples-bookinfo-reviews-v2",
                        "ports": [
                            {"name": "http", "containerPort": 9080, "protocol": "TCP"},
                            {"containerPort": 9443, "protocol": "TCP"}
                        ],
                        "env": [{"name": "LOG_DIR", "value": "/tmp/logs"}]
                    },
                    {
                        "name": "istio-proxy", "image": "istio/proxyv2",
                        "ports": [
                            {"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"},
                            {"name": "http", "containerPort": 8080, "protocol": "TCP"}
                        ]
                    }
                ]
            },
            "status": {
                "phase": "Running",
                "hostIP": "172.18.0.2",
                "podIP": "10.244.1.7",
                "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00:10:244:1::7"}],
                "conditions": [
                    {"type": "Initialized", "status": "True"},
                    {"type": "Ready", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "PodScheduled", "status": "True"}
                ],
                "containerStatuses": [{
                    "name": "reviews", "ready": true, "restartCount": 0, "image": "x", "imageID": "y"
                }]
            }
        })
    }

    fn read(value: &serde_json::Value) -> Arc<PodInfo> {
        match Object::from_value(value) {
            Ok(Some(Object::Pod(p))) => p,
            other => panic!("not read as a pod: {other:?}"),
        }
    }

    #[test]
    fn a_cluster_pod_keeps_what_translation_reads() {
        let pod = read(&cluster_pod());
        assert_eq!(pod.namespace, "bookinfo");
        assert_eq!(pod.name, "reviews-v2-7d79d5bd5d-xk2lp");
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("bookinfo-reviews")
        );
        assert_eq!(pod.service_account(), "bookinfo-reviews");
        assert_eq!(
            pod.labels.get("version").map(String::as_str),
            Some("v2"),
            "labels select pods and subsets"
        );
        assert_eq!(pod.labels.len(), 4);
        assert_eq!(
            pod.labels.get(LABEL_TLS_MODE).map(String::as_str),
            Some("istio")
        );
        assert!(pod.meshed, "the sidecar status annotation");
        assert_eq!(pod.ip, Some("10.244.1.7".parse().expect("ip")));
        assert_eq!(pod.serving_ip(), pod.ip, "running and ready");
        // A name resolves to the first container port that has it; unnamed ports and init
        // containers' ports are never targets.
        assert_eq!(
            pod.named_ports,
            [
                ("http".to_owned(), 9080),
                ("http-envoy-prom".to_owned(), 15090)
            ]
        );
        assert_eq!(pod.named_port("http"), Some(9080));
        assert_eq!(pod.named_port("init"), None);
        let key = Object::Pod(pod.clone()).key();
        assert_eq!(
            (key.kind.as_str(), key.namespace.as_str(), key.name.as_str()),
            ("Pod", "bookinfo", "reviews-v2-7d79d5bd5d-xk2lp")
        );
        let proxy = ProxyRef::from_pod(&pod);
        assert_eq!(
            proxy,
            ProxyRef {
                namespace: "bookinfo".into(),
                name: "reviews-v2-7d79d5bd5d-xk2lp".into(),
                service_account: "bookinfo-reviews".into(),
                labels: (*pod.labels).clone(),
                ip: pod.ip,
            }
        );
    }

    #[test]
    fn pods_that_do_not_serve_have_no_endpoint_address() {
        let with = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = cluster_pod();
            edit(&mut v);
            read(&v)
        };
        let deleting = with(&|v| {
            v["metadata"]["deletionTimestamp"] = "2024-05-02T11:00:00Z".into();
        });
        assert!(deleting.terminating && deleting.serving_ip().is_none());
        for phase in ["Succeeded", "Failed"] {
            let done = with(&|v| v["status"]["phase"] = phase.into());
            assert!(done.completed && done.serving_ip().is_none(), "{phase}");
        }
        let pending = with(&|v| v["status"]["phase"] = "Pending".into());
        assert_eq!(
            pending.serving_ip(),
            pending.ip,
            "only finished phases stop serving"
        );
        let unready = with(&|v| v["status"]["conditions"][1]["status"] = "False".into());
        assert!(unready.unready && unready.serving_ip().is_none());
        // Another condition False, or no conditions at all (local pods): still served.
        let other = with(&|v| v["status"]["conditions"][2]["status"] = "False".into());
        assert_eq!(other.serving_ip(), other.ip);
        let bare = with(&|v| {
            v["status"] = serde_json::json!({"podIP": "10.244.1.7"});
        });
        assert_eq!(bare.serving_ip(), Some("10.244.1.7".parse().expect("ip")));
        let unaddressed = with(&|v| v["status"]["podIP"] = "not-an-ip".into());
        assert_eq!((unaddressed.ip, unaddressed.serving_ip()), (None, None));
        let unmeshed = with(&|v| {
            v["metadata"]["annotations"]
                .as_object_mut()
                .expect("annotations")
                .remove(ANNOTATION_SIDECAR_STATUS);
        });
        assert!(!unmeshed.meshed);
    }

    #[test]
    fn service_accounts_and_ports_read_as_before() {
        let mut v = cluster_pod();
        let spec = v["spec"].as_object_mut().expect("spec");
        spec.remove("serviceAccountName");
        spec.insert("serviceAccount".into(), "legacy".into());
        // The proxy runs as the deprecated alias; endpoint identities read only the name.
        let legacy = read(&v);
        assert_eq!(legacy.service_account_name, None);
        assert_eq!(legacy.service_account(), "legacy");
        v["spec"]
            .as_object_mut()
            .expect("spec")
            .remove("serviceAccount");
        assert_eq!(read(&v).service_account(), "default");
        assert_eq!(read(&v).deprecated_service_account, None);
        // With both, the alias is not kept: nothing reads it.
        assert_eq!(read(&cluster_pod()).deprecated_service_account, None);
        // A first port of a name that is no port number resolves to nothing, as before.
        let mut v = cluster_pod();
        v["spec"]["containers"][0]["ports"][0]["containerPort"] = 70000.into();
        let odd = read(&v);
        assert_eq!(odd.named_port("http"), None);
        // No namespace: `default`, as every stored object.
        let mut v = cluster_pod();
        v["metadata"]
            .as_object_mut()
            .expect("meta")
            .remove("namespace");
        assert_eq!(read(&v).namespace, "default");
    }
}
