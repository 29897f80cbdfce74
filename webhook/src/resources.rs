//! What the control plane knows of the cluster: namespaces, services, pods, endpoint slices,
//! nodes and the Istio / Gateway API / SMI resources, whichever source filled it (Kubernetes
//! watches or a directory of YAML). [`Store`] is the mutable, shared side; every change bumps a
//! generation that discovery watches. [`Resources`] is an immutable copy that translation reads.
//!
//! Nodes are the exception: only the injector reads them (their labels say where eBPF
//! redirection works, see [`crate::inject::mode`]), so they are kept as name → labels and a
//! change of a node never bumps the generation nor rebuilds the translation index.

use std::collections::BTreeMap;
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
    /// A pod (only the fields translation reads, see [`slim_pod`]).
    Pod(Arc<Pod>),
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
            Object::Pod(p) => ("Pod".to_owned(), &p.metadata),
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

    /// A pod, slimmed by [`slim_pod`].
    pub fn pod(p: Pod) -> Object {
        Object::Pod(Arc::new(slim_pod(p)))
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
    pub pods: BTreeMap<Key, Arc<Pod>>,
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
                self.pods.insert(meta_key(&p.metadata), p);
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
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<Pod>> {
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
    pub ip: Option<std::net::IpAddr>,
}

impl ProxyRef {
    /// The proxy of a pod.
    pub fn from_pod(pod: &Pod) -> ProxyRef {
        let spec = pod.spec.as_ref();
        ProxyRef {
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| {
                    s.service_account_name
                        .clone()
                        .or_else(|| s.service_account.clone())
                })
                .unwrap_or_else(|| "default".into()),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ip: pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
        }
    }
}

/// Whether `pod` carries a sidecar (its injector wrote the status annotation).
pub fn is_meshed(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION_SIDECAR_STATUS))
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

/// Keeps only what translation and discovery read of a pod: name, namespace, labels, the
/// sidecar status annotation, deletion time, service account, container ports, pod IP and
/// phase. A pod from a cluster is mostly managed fields, volumes and container details.
pub fn slim_pod(pod: Pod) -> Pod {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};
    let meta = pod.metadata;
    let annotations = meta.annotations.map(|a| {
        a.into_iter()
            .filter(|(k, _)| k == ANNOTATION_SIDECAR_STATUS)
            .collect::<BTreeMap<_, _>>()
    });
    Pod {
        metadata: ObjectMeta {
            name: meta.name,
            namespace: meta.namespace,
            labels: meta.labels,
            annotations,
            deletion_timestamp: meta.deletion_timestamp,
            creation_timestamp: meta.creation_timestamp,
            ..ObjectMeta::default()
        },
        spec: pod.spec.map(|s| PodSpec {
            service_account_name: s.service_account_name,
            service_account: s.service_account,
            containers: s
                .containers
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports,
                    ..Container::default()
                })
                .collect(),
            ..PodSpec::default()
        }),
        status: pod.status.map(|s| PodStatus {
            pod_ip: s.pod_ip,
            pod_ips: s.pod_ips,
            phase: s.phase,
            // Only the Ready condition: endpoints derived from pods honour it.
            conditions: s
                .conditions
                .map(|c| c.into_iter().filter(|c| c.type_ == "Ready").collect()),
            ..PodStatus::default()
        }),
    }
}
