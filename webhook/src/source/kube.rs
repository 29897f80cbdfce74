//! Kubernetes: kube-runtime reflectors over Namespaces, Services, EndpointSlices, Pods, Nodes
//! (their metadata only: the injector reads their labels) and every Istio / Gateway API / SMI
//! kind (as dynamic objects, read with [`weft_api::crd::AnyResource`]). Also publishes the
//! mesh root as the ConfigMap `weft-ca-root-cert` in every namespace that has meshed pods.
//!
//! Each reflector keeps its own store (trimmed of what translation never reads before it is
//! stored); its events become [`Change`]s of the shared [`Store`], whose generation is what
//! discovery debounces into pushes. A (re-)list is buffered by the reflector and lands in the
//! store as one change when it completes, so proxies never see a half-listed kind. A node's
//! change reaches the store only when its labels change, and never bumps the generation
//! (nodes are not translated).
//!
//! Every Istio / Gateway API / SMI object goes through the validator first ([`super::screen`]):
//! one it rejects does not reach the store, where its last good version (if any) stays; the
//! admission webhook normally stops such objects, but the control plane does not count on it.
//!
//! For a custom resource kind, the version watched is the best one the cluster serves among
//! those Weft reads (`v1`, else `v1beta1`, else `v1alpha3` for Istio networking), found with
//! kube's discovery API when the watch starts and logged. A kind whose CRD is not installed
//! is logged once and stays empty; discovery is retried every [`CRD_RESCAN`], so installing
//! the CRD later works, and a CRD that goes away is looked up again.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::core::{PartialObjectMeta, Version};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, Lookup, store::Writer};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{info, warn};
use weft_api::crd::{KNOWN_KINDS, KnownKind};
use weft_api::validate::{Finding, Severity};

use super::screen::{self, Rejected, Screen};
use crate::ca::store::publish_root_config_map;
use crate::resources::{Object, ObjectKey, PodInfo, Store, is_translated, slim_node};

/// How often the root ConfigMaps are checked even without a change.
pub const ROOT_CONFIG_MAP_RESYNC: Duration = Duration::from_secs(300);
/// How often a custom resource kind the cluster does not serve is looked up again.
pub const CRD_RESCAN: Duration = Duration::from_secs(30);

/// What one watch event does to the [`Store`].
#[derive(Debug)]
pub enum Change {
    /// Nothing yet: a (re-)list is under way, and the reflector buffers it until it ends.
    Nothing,
    /// An object was added or changed.
    Upsert(Object),
    /// An object was deleted.
    Remove(ObjectKey),
    /// A (re-)list ended: the kind now holds exactly `keys`. `objects` are those that could
    /// be read and passed validation; any other listed object keeps the version the store
    /// has.
    Replace {
        /// Every listed object.
        keys: BTreeSet<ObjectKey>,
        /// The listed objects that could be read.
        objects: Vec<Object>,
    },
}

/// What reading one watched object gives.
#[derive(Debug)]
pub enum Read {
    /// The object, to be used.
    Use(Object),
    /// Nothing to use: a kind the store ignores, or an object that cannot be serialised
    /// (logged).
    Skip,
    /// The validator rejects this version: its last good version stays.
    Rejected(Rejected),
}

/// A watched type `K`: how it is trimmed into the `S` the reflector stores (`K` itself,
/// or for pods the much smaller [`PodInfo`]), and read into an [`Object`] of the store
/// kind `kind`.
#[derive(Clone)]
pub struct Kind<K, S = K> {
    /// The store's name of the kind (`Pod`, `networking.istio.io/VirtualService`).
    pub kind: Cow<'static, str>,
    /// Drops what translation never reads, so that the reflector's store stays small.
    pub trim: fn(K) -> S,
    /// Reads (and, for config kinds, validates) the object.
    pub read: fn(Arc<S>) -> Read,
}

impl<K, S> Debug for Kind<K, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kind").field("kind", &self.kind).finish()
    }
}

/// The store key of `obj` (namespace `default` when absent, as the store does; none for the
/// cluster-scoped Namespace and Node).
pub fn key_of<K: Lookup>(kind: &str, obj: &K) -> ObjectKey {
    ObjectKey {
        kind: kind.to_owned(),
        namespace: if matches!(kind, "Namespace" | "Node") {
            String::new()
        } else {
            obj.namespace()
                .map_or_else(|| "default".to_owned(), Cow::into_owned)
        },
        name: obj.name().map(Cow::into_owned).unwrap_or_default(),
    }
}

/// The reflector's key of a pod: [`PodInfo`] stands for the `Pod` it was read from.
impl Lookup for PodInfo {
    type DynamicType = ();

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Pod")
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("pods")
    }

    fn name(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.name))
    }

    fn namespace(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.namespace))
    }

    // Neither is kept: the reflector's keys compare namespace and name only.
    fn resource_version(&self) -> Option<Cow<'_, str>> {
        None
    }

    fn uid(&self) -> Option<Cow<'_, str>> {
        None
    }
}

/// `event` with its object trimmed by `trim`.
fn trimmed<K, S>(event: Event<K>, trim: fn(K) -> S) -> Event<S> {
    match event {
        Event::Apply(o) => Event::Apply(trim(o)),
        Event::Delete(o) => Event::Delete(trim(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(trim(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// Turns a watch event, already applied to the reflector's store `reader`, into a change of
/// the shared store. Objects the validator rejects are held back in `screen` (their last good
/// version stays in the store) and released when a valid version arrives or they go away.
pub fn change_of<K, S>(
    kind: &Kind<K, S>,
    event: Event<S>,
    reader: &reflector::Store<S>,
    screen: &Screen,
) -> Change
where
    S: Lookup + Clone + 'static,
    S::DynamicType: Eq + Hash + Clone,
{
    match event {
        Event::Init | Event::InitApply(_) => Change::Nothing,
        Event::InitDone => {
            let listed = reader.state();
            let keys: BTreeSet<ObjectKey> =
                listed.iter().map(|o| key_of(&kind.kind, &**o)).collect();
            let mut objects = Vec::with_capacity(listed.len());
            for obj in listed {
                let key = key_of(&kind.kind, &*obj);
                match (kind.read)(obj) {
                    Read::Use(o) => {
                        screen.release(&key, true);
                        objects.push(o);
                    }
                    Read::Skip => {}
                    Read::Rejected(rejected) => screen.hold(&key, rejected),
                }
            }
            // Held objects deleted during a watch gap.
            for key in screen.held_keys() {
                if key.kind == kind.kind && !keys.contains(&key) {
                    screen.release(&key, false);
                }
            }
            Change::Replace { keys, objects }
        }
        Event::Apply(obj) => {
            let key = key_of(&kind.kind, &obj);
            match (kind.read)(Arc::new(obj)) {
                Read::Use(o) => {
                    screen.release(&key, true);
                    Change::Upsert(o)
                }
                // Its last good version stays.
                Read::Skip => Change::Nothing,
                Read::Rejected(rejected) => {
                    screen.hold(&key, rejected);
                    Change::Nothing
                }
            }
        }
        Event::Delete(obj) => {
            let key = key_of(&kind.kind, &obj);
            screen.release(&key, false);
            Change::Remove(key)
        }
    }
}

/// Applies `change` (of objects of `kind`) to `store`. The generation is bumped only for
/// kinds that are translated (not for nodes).
pub fn apply(store: &Store, kind: &str, change: Change) {
    let translated = is_translated(kind);
    match change {
        Change::Nothing => {}
        // A node's status update: its labels, all that is kept, are the same.
        Change::Upsert(o) if store.snapshot().holds(&o) => {}
        Change::Upsert(o) => store.update(|r| {
            r.upsert(o);
            translated
        }),
        Change::Remove(key) => store.update(|r| r.remove(&key) && translated),
        Change::Replace { keys, objects } => store.update(|r| {
            r.retain_kind(kind, |k| keys.contains(k));
            for o in objects {
                r.upsert(o);
            }
            translated
        }),
    }
}

/// Why a reflector stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stopped {
    /// The API server no longer serves the resource (CRD deleted, version dropped).
    NotServed,
    /// The stream ended.
    Ended,
}

fn not_served(error: &watcher::Error) -> bool {
    matches!(
        error,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s)) if s.code == 404
    )
}

/// Runs one reflector until its stream ends, or (when `stop_if_not_served`) until the API
/// server says the resource is not served. `listed` turns true after the first full list has
/// reached the store.
async fn reflect<K, S>(
    api: Api<K>,
    writer: Writer<S>,
    kind: Kind<K, S>,
    store: Arc<Store>,
    screen: &Screen,
    listed: Option<watch::Sender<bool>>,
    stop_if_not_served: bool,
) -> Stopped
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
    S: Lookup + Clone + Send + Sync + 'static,
    S::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let reader = writer.as_reader();
    let trim = kind.trim;
    let mut stream = reflector::reflector(
        writer,
        watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .map_ok(move |event| trimmed(event, trim)),
    )
    .boxed();
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                let done = matches!(event, Event::InitDone);
                apply(&store, &kind.kind, change_of(&kind, event, &reader, screen));
                if done {
                    if let Some(listed) = &listed {
                        listed.send_replace(true);
                    }
                    if failing {
                        info!(kind = %kind.kind, "watch established");
                        failing = false;
                    }
                }
            }
            Err(error) => {
                if stop_if_not_served && not_served(&error) {
                    return Stopped::NotServed;
                }
                if !failing {
                    warn!(kind = %kind.kind, %error, "cannot watch; keeping what is known until it can");
                    failing = true;
                }
            }
        }
    }
    Stopped::Ended
}

async fn reflect_typed<K, S>(
    client: kube::Client,
    kind: Kind<K, S>,
    store: Arc<Store>,
    screen: Screen,
    listed: Option<watch::Sender<bool>>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
    S: Lookup + Clone + Send + Sync + 'static,
    S::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
{
    let (_, writer) = reflector::store::<S>();
    reflect(
        Api::all(client),
        writer,
        kind,
        store,
        &screen,
        listed,
        false,
    )
    .await;
}

fn trim_namespace(mut n: Namespace) -> Namespace {
    n.metadata.managed_fields = None;
    n.spec = None;
    n.status = None;
    n
}

fn trim_service(mut s: Service) -> Service {
    s.metadata.managed_fields = None;
    s.status = None;
    s
}

fn trim_node(mut n: PartialObjectMeta<Node>) -> PartialObjectMeta<Node> {
    let meta = std::mem::take(&mut n.metadata);
    n.metadata = slim_node(Node {
        metadata: meta,
        ..Node::default()
    })
    .metadata;
    n
}

fn read_node(n: Arc<PartialObjectMeta<Node>>) -> Read {
    Read::Use(Object::node(Node {
        metadata: n.metadata.clone(),
        ..Node::default()
    }))
}

fn trim_endpoint_slice(mut e: EndpointSlice) -> EndpointSlice {
    e.metadata.managed_fields = None;
    e
}

fn trim_dynamic(mut o: DynamicObject) -> DynamicObject {
    o.metadata.managed_fields = None;
    o
}

/// Namespaces, as the store reads them.
pub const NAMESPACES: Kind<Namespace> = Kind {
    kind: Cow::Borrowed("Namespace"),
    trim: trim_namespace,
    read: |n| Read::Use(Object::Namespace(n)),
};
/// Services.
pub const SERVICES: Kind<Service> = Kind {
    kind: Cow::Borrowed("Service"),
    trim: trim_service,
    read: |s| Read::Use(Object::Service(s)),
};
/// Pods, kept as [`PodInfo`] (by the reflector too, so that no full `Pod` outlives its
/// event; the store shares the reflector's allocation for every listed pod).
pub const PODS: Kind<Pod, PodInfo> = Kind {
    kind: Cow::Borrowed("Pod"),
    trim: PodInfo::from_pod,
    read: |p| Read::Use(Object::Pod(p)),
};
/// Nodes: their metadata only (a metadata watch; a node's status is most of it and changes
/// all the time), slimmed to name and labels (see [`slim_node`]).
pub const NODES: Kind<PartialObjectMeta<Node>> = Kind {
    kind: Cow::Borrowed("Node"),
    trim: trim_node,
    read: read_node,
};
/// EndpointSlices.
pub const ENDPOINT_SLICES: Kind<EndpointSlice> = Kind {
    kind: Cow::Borrowed("EndpointSlice"),
    trim: trim_endpoint_slice,
    read: |e| Read::Use(Object::EndpointSlice(e)),
};

/// Validates, then reads, an Istio / Gateway API / SMI object.
fn read_dynamic(obj: Arc<DynamicObject>) -> Read {
    let value = match serde_json::to_value(&*obj) {
        Ok(v) => v,
        Err(error) => {
            warn!(%error, "object cannot be serialised; ignored");
            return Read::Skip;
        }
    };
    if let Err(rejected) = screen::check(&value) {
        return Read::Rejected(rejected);
    }
    match Object::from_value(&value) {
        Ok(Some(o)) => Read::Use(o),
        Ok(None) => Read::Skip,
        // The validator reads the object the same way, so this is not expected; should it
        // happen, the object is held back like any other rejected one.
        Err(error) => Read::Rejected(Rejected {
            content: screen::content_hash(&value),
            findings: vec![Finding {
                object: format!(
                    "{}/{}/{}",
                    obj.types
                        .as_ref()
                        .map(|t| t.kind.as_str())
                        .unwrap_or_default(),
                    obj.metadata.namespace.as_deref().unwrap_or_default(),
                    obj.metadata.name.as_deref().unwrap_or_default()
                ),
                field: String::new(),
                message: format!("cannot be read: {error}"),
                severity: Severity::Error,
            }],
        }),
    }
}

/// A custom resource kind, read as dynamic objects; its store name is `group/Kind`.
fn dynamic_kind(known: &KnownKind) -> Kind<DynamicObject> {
    Kind {
        kind: Cow::Owned(format!("{}/{}", known.group, known.kind)),
        trim: trim_dynamic,
        read: read_dynamic,
    }
}

/// The version of `known` to watch: among the versions Weft reads, the most stable and most
/// recent one (Kubernetes' version priority: `v1` > `v1beta1` > `v1alpha3`) that the cluster
/// serves the kind in. `served` lists, per served version of the group, its resources (as
/// [`kube::discovery::ApiGroup::versioned_resources`] gives them).
pub fn choose_version<'a>(
    known: &KnownKind,
    served: &'a [(String, Vec<ApiResource>)],
) -> Option<&'a ApiResource> {
    served
        .iter()
        .filter(|(version, _)| known.versions.contains(&version.as_str()))
        .filter_map(|(version, resources)| {
            resources
                .iter()
                .find(|r| r.kind == known.kind && r.group == known.group)
                .map(|r| (Version::parse(version).priority(), r))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, r)| r)
}

/// What the cluster serves of `group`: per version, its resources.
async fn served_versions(
    client: &kube::Client,
    group: &str,
) -> Result<Vec<(String, Vec<ApiResource>)>, kube::Error> {
    let group = kube::discovery::group(client, group).await?;
    Ok(group
        .versions()
        .map(|v| {
            let resources = group
                .versioned_resources(v)
                .into_iter()
                .map(|(r, _)| r)
                .collect();
            (v.to_owned(), resources)
        })
        .collect())
}

/// Watches one custom resource kind, at the version the cluster serves, for as long as the
/// task runs.
async fn reflect_crd(
    client: kube::Client,
    known: &'static KnownKind,
    store: Arc<Store>,
    screen: Screen,
) {
    let kind = dynamic_kind(known);
    let mut reported = false;
    // Whether the store may hold objects of the kind (from an earlier watch).
    let mut held = false;
    loop {
        let chosen = match served_versions(&client, known.group).await {
            Ok(served) => choose_version(known, &served).cloned(),
            Err(kube::Error::Discovery(_)) => None,
            Err(error) => {
                if !reported {
                    warn!(kind = %kind.kind, %error, "api discovery failed; retrying");
                    reported = true;
                }
                tokio::time::sleep(CRD_RESCAN).await;
                continue;
            }
        };
        let Some(resource) = chosen else {
            if !reported {
                warn!(
                    kind = %kind.kind,
                    versions = ?known.versions,
                    "not served by the cluster (CRD not installed?); treated as empty until it is"
                );
                reported = true;
            }
            if std::mem::take(&mut held) {
                // The CRD went away, and its objects with it.
                for key in screen.held_keys() {
                    if key.kind == kind.kind {
                        screen.release(&key, false);
                    }
                }
                apply(
                    &store,
                    &kind.kind,
                    Change::Replace {
                        keys: BTreeSet::new(),
                        objects: Vec::new(),
                    },
                );
            }
            tokio::time::sleep(CRD_RESCAN).await;
            continue;
        };
        reported = false;
        held = true;
        info!(kind = %kind.kind, version = %resource.version, "watching");
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let writer = Writer::new(resource.clone());
        match reflect(
            api,
            writer,
            kind.clone(),
            store.clone(),
            &screen,
            None,
            true,
        )
        .await
        {
            Stopped::NotServed => {
                info!(kind = %kind.kind, version = %resource.version, "no longer served; looking again");
            }
            Stopped::Ended => tokio::time::sleep(CRD_RESCAN).await,
        }
    }
}

/// What has been listed into the store once: each turns true when its first full list is in.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Every pod (see [`crate::discovery::Discovery::require_known_pods`]).
    pub pods: watch::Receiver<bool>,
    /// Every node (the injector's eBPF decision waits for it, see
    /// [`crate::server::NodeSource`]).
    pub nodes: watch::Receiver<bool>,
}

/// Starts every watch on `client`; they run until aborted. Objects the validator refuses are
/// held back in `screen` (made with [`Screen::new`] to count them in the control plane's
/// metrics).
pub fn spawn_watches(
    client: &kube::Client,
    store: &Arc<Store>,
    screen: &Screen,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Listed {
    let (pods_listed, pods) = watch::channel(false);
    let (nodes_listed, nodes) = watch::channel(false);
    tasks.spawn(reflect_typed(
        client.clone(),
        NAMESPACES,
        store.clone(),
        screen.clone(),
        None,
    ));
    tasks.spawn(reflect_typed(
        client.clone(),
        SERVICES,
        store.clone(),
        screen.clone(),
        None,
    ));
    tasks.spawn(reflect_typed(
        client.clone(),
        PODS,
        store.clone(),
        screen.clone(),
        Some(pods_listed),
    ));
    tasks.spawn(reflect_typed(
        client.clone(),
        NODES,
        store.clone(),
        screen.clone(),
        Some(nodes_listed),
    ));
    tasks.spawn(reflect_typed(
        client.clone(),
        ENDPOINT_SLICES,
        store.clone(),
        screen.clone(),
        None,
    ));
    for known in KNOWN_KINDS {
        tasks.spawn(reflect_crd(
            client.clone(),
            known,
            store.clone(),
            screen.clone(),
        ));
    }
    Listed { pods, nodes }
}

/// Keeps the root ConfigMap in every namespace with meshed pods (and the control plane's)
/// holding the current trust bundle `roots` (PEM); a new bundle is written everywhere.
pub async fn keep_root_config_maps(
    client: kube::Client,
    store: Arc<Store>,
    control_plane_namespace: String,
    name: String,
    mut roots: watch::Receiver<String>,
) {
    let mut generation = store.subscribe();
    let mut published: BTreeSet<String> = BTreeSet::new();
    let mut last_full = tokio::time::Instant::now();
    let mut roots_open = true;
    loop {
        let roots_pem = roots.borrow_and_update().clone();
        let resources = store.snapshot();
        let mut wanted: BTreeSet<String> = resources
            .pods
            .iter()
            .filter(|(_, p)| p.meshed)
            .map(|((ns, _), _)| ns.clone())
            .collect();
        wanted.insert(control_plane_namespace.clone());
        if last_full.elapsed() >= ROOT_CONFIG_MAP_RESYNC {
            published.clear();
            last_full = tokio::time::Instant::now();
        }
        for ns in wanted.difference(&published.clone()) {
            if publish_root_config_map(&client, ns, &name, &roots_pem)
                .await
                .is_ok()
            {
                published.insert(ns.clone());
            }
        }
        tokio::select! {
            _ = generation.changed() => {},
            changed = roots.changed(), if roots_open => {
                if changed.is_ok() {
                    info!(namespaces = published.len(), "trust bundle changed; republishing the root config maps");
                    published.clear();
                } else {
                    // The rotation is gone (shutting down): the bundle stays as it is.
                    roots_open = false;
                }
            },
            () = tokio::time::sleep(Duration::from_secs(30)) => {},
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    use kube::api::{GroupVersionKind, ObjectMeta};
    use kube::runtime::reflector::store;

    use super::*;
    use crate::metrics::Metrics;
    use crate::resources::Settings;

    fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    }

    fn known(group: &str, kind: &str) -> &'static KnownKind {
        weft_api::crd::known_kind(group, kind).expect("a known kind")
    }

    #[test]
    fn the_most_stable_served_version_is_chosen() {
        let vs = known("networking.istio.io", "VirtualService");
        let served = |versions: &[&str]| -> Vec<(String, Vec<ApiResource>)> {
            versions
                .iter()
                .map(|v| {
                    (
                        (*v).to_owned(),
                        vec![
                            resource(
                                "networking.istio.io",
                                v,
                                "VirtualService",
                                "virtualservices",
                            ),
                            resource("networking.istio.io", v, "Gateway", "gateways"),
                        ],
                    )
                })
                .collect()
        };
        // Discovery lists versions by priority; the choice must not depend on that order.
        for (versions, want) in [
            (&["v1", "v1beta1", "v1alpha3"][..], "v1"),
            (&["v1alpha3", "v1beta1", "v1"][..], "v1"),
            (&["v1beta1", "v1alpha3"][..], "v1beta1"),
            (&["v1alpha3"][..], "v1alpha3"),
        ] {
            let served = served(versions);
            let chosen = choose_version(vs, &served).expect("served");
            assert_eq!(chosen.version, want, "{versions:?}");
            assert_eq!(chosen.api_version, format!("networking.istio.io/{want}"));
            assert_eq!(chosen.plural, "virtualservices");
        }
        // A version Weft does not read is never chosen; a group without the kind is nothing.
        assert!(choose_version(vs, &served(&["v2alpha1"])).is_none());
        let without: Vec<(String, Vec<ApiResource>)> = vec![(
            "v1".into(),
            vec![resource("networking.istio.io", "v1", "Gateway", "gateways")],
        )];
        assert!(choose_version(vs, &without).is_none());
        assert!(choose_version(vs, &[]).is_none());
        // The kind served in v1beta1 only, while the group has v1 for others.
        let mixed: Vec<(String, Vec<ApiResource>)> = vec![
            (
                "v1".into(),
                vec![resource("networking.istio.io", "v1", "Gateway", "gateways")],
            ),
            (
                "v1beta1".into(),
                vec![resource(
                    "networking.istio.io",
                    "v1beta1",
                    "VirtualService",
                    "virtualservices",
                )],
            ),
        ];
        assert_eq!(
            choose_version(vs, &mixed).map(|r| r.version.as_str()),
            Some("v1beta1")
        );
        // SMI: alpha versions by number.
        let split = known("split.smi-spec.io", "TrafficSplit");
        let smi: Vec<(String, Vec<ApiResource>)> = ["v1alpha2", "v1alpha4", "v1alpha3"]
            .iter()
            .map(|v| {
                (
                    (*v).to_owned(),
                    vec![resource(
                        "split.smi-spec.io",
                        v,
                        "TrafficSplit",
                        "trafficsplits",
                    )],
                )
            })
            .collect();
        assert_eq!(
            choose_version(split, &smi).map(|r| r.version.as_str()),
            Some("v1alpha4")
        );
    }

    fn pod(name: &str, sa: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                managed_fields: Some(vec![ManagedFieldsEntry::default()]),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(sa.into()),
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("app:1".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some("10.0.0.7".into()),
                ..Default::default()
            }),
        }
    }

    /// Feeds events through a real reflector store, as the watch does.
    fn feed<K, S>(
        kind: &Kind<K, S>,
        writer: &mut Writer<S>,
        reader: &reflector::Store<S>,
        store: &Store,
        events: Vec<Event<K>>,
    ) -> Vec<&'static str>
    where
        S: Lookup + Clone + 'static,
        S::DynamicType: Eq + Hash + Clone,
    {
        feed_screened(kind, writer, reader, store, &Screen::default(), events)
    }

    fn feed_screened<K, S>(
        kind: &Kind<K, S>,
        writer: &mut Writer<S>,
        reader: &reflector::Store<S>,
        store: &Store,
        screen: &Screen,
        events: Vec<Event<K>>,
    ) -> Vec<&'static str>
    where
        S: Lookup + Clone + 'static,
        S::DynamicType: Eq + Hash + Clone,
    {
        let mut seen = Vec::new();
        for event in events {
            let event = trimmed(event, kind.trim);
            writer.apply_watcher_event(&event);
            let change = change_of(kind, event, reader, screen);
            seen.push(match &change {
                Change::Nothing => "nothing",
                Change::Upsert(_) => "upsert",
                Change::Remove(_) => "remove",
                Change::Replace { .. } => "replace",
            });
            apply(store, &kind.kind, change);
        }
        seen
    }

    #[test]
    fn pod_events_become_store_changes() {
        let (reader, mut writer) = store::<PodInfo>();
        let store = Store::new(Settings::default());
        // The initial list lands in one change, when it is complete.
        let seen = feed(
            &PODS,
            &mut writer,
            &reader,
            &store,
            vec![
                Event::Init,
                Event::InitApply(pod("a", "cart")),
                Event::InitApply(pod("b", "cart")),
            ],
        );
        assert_eq!(seen, ["nothing", "nothing", "nothing"]);
        assert_eq!(store.generation(), 0, "nothing before the list is complete");
        let seen = feed(&PODS, &mut writer, &reader, &store, vec![Event::InitDone]);
        assert_eq!(seen, ["replace"]);
        let r = store.snapshot();
        assert_eq!(r.pods.len(), 2);
        let a = r.pod("shop", "a").expect("pod a");
        assert_eq!(a.service_account_name.as_deref(), Some("cart"));
        assert_eq!(a.ip, Some("10.0.0.7".parse().expect("ip")));
        // The reflector's store holds the same small copy as the shared store: one each.
        let listed = reader.state();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|p| {
            r.pod(&p.namespace, &p.name)
                .is_some_and(|stored| Arc::ptr_eq(stored, p))
        }));

        // Changes and deletions one by one.
        feed(
            &PODS,
            &mut writer,
            &reader,
            &store,
            vec![
                Event::Apply(pod("a", "vault")),
                Event::Delete(pod("b", "cart")),
                Event::Apply(pod("c", "cart")),
            ],
        );
        let r = store.snapshot();
        let names: Vec<&str> = r.pods.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(
            r.pod("shop", "a")
                .and_then(|p| p.service_account_name.as_deref()),
            Some("vault")
        );

        // A re-list after a watch gap: what was deleted meanwhile goes, the rest stays.
        feed(
            &PODS,
            &mut writer,
            &reader,
            &store,
            vec![
                Event::Init,
                Event::InitApply(pod("c", "cart")),
                Event::InitApply(pod("d", "cart")),
            ],
        );
        assert_eq!(
            store.snapshot().pods.len(),
            2,
            "the old view until the list ends"
        );
        feed(&PODS, &mut writer, &reader, &store, vec![Event::InitDone]);
        let r = store.snapshot();
        let names: Vec<&str> = r.pods.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["c", "d"]);
    }

    fn virtual_service(name: &str, spec: serde_json::Value) -> DynamicObject {
        let ar = resource(
            "networking.istio.io",
            "v1beta1",
            "VirtualService",
            "virtualservices",
        );
        DynamicObject::new(name, &ar)
            .within("shop")
            .data(serde_json::json!({ "spec": spec }))
    }

    #[test]
    fn custom_resource_events_keep_the_last_good_version() {
        let ar = resource(
            "networking.istio.io",
            "v1beta1",
            "VirtualService",
            "virtualservices",
        );
        let mut writer = Writer::<DynamicObject>::new(ar);
        let reader = writer.as_reader();
        let kind = dynamic_kind(known("networking.istio.io", "VirtualService"));
        let store = Store::new(Settings::default());
        let good = routed("reviews", "^/v1/.*");
        let bad = virtual_service("reviews", serde_json::json!({"hosts": "not a list"}));
        feed(
            &kind,
            &mut writer,
            &reader,
            &store,
            vec![Event::Init, Event::InitApply(good), Event::InitDone],
        );
        let key = (
            "networking.istio.io/VirtualService".to_owned(),
            "shop".to_owned(),
            "reviews".to_owned(),
        );
        assert!(store.snapshot().configs.contains_key(&key));
        // An update that cannot be read: the last good version stays, also across a re-list.
        let seen = feed(
            &kind,
            &mut writer,
            &reader,
            &store,
            vec![
                Event::Apply(bad.clone()),
                Event::Init,
                Event::InitApply(bad.clone()),
                Event::InitDone,
            ],
        );
        assert_eq!(seen, ["nothing", "nothing", "nothing", "replace"]);
        assert!(store.snapshot().configs.contains_key(&key));
        // Its deletion removes it, readable or not.
        feed(
            &kind,
            &mut writer,
            &reader,
            &store,
            vec![Event::Delete(bad)],
        );
        assert!(store.snapshot().configs.is_empty());
    }

    /// A VirtualService routing `/v1/…` (matched by `regex`) to `reviews`.
    fn routed(name: &str, regex: &str) -> DynamicObject {
        virtual_service(
            name,
            serde_json::json!({
                "hosts": [name],
                "http": [{
                    "match": [{"uri": {"regex": regex}}],
                    "route": [{"destination": {"host": name}}],
                }],
            }),
        )
    }

    fn metric(metrics: &Metrics, name: &str) -> String {
        let prefix = format!("{name}{{kind=\"networking.istio.io/VirtualService\"}} ");
        let text = metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {prefix} in {text}"))
    }

    #[test]
    fn rejected_objects_are_held_back_with_their_last_good_version() {
        let ar = resource(
            "networking.istio.io",
            "v1",
            "VirtualService",
            "virtualservices",
        );
        let mut writer = Writer::<DynamicObject>::new(ar);
        let reader = writer.as_reader();
        let kind = dynamic_kind(known("networking.istio.io", "VirtualService"));
        let store = Store::new(Settings::default());
        let metrics = Metrics::default();
        let screen = Screen::new(&metrics);
        let key = |name: &str| ObjectKey {
            kind: kind.kind.to_string(),
            namespace: "shop".into(),
            name: name.into(),
        };
        let mut feed = |events| feed_screened(&kind, &mut writer, &reader, &store, &screen, events);
        let regex = |name: &str| crate::source::stored_regex(&store, name);

        // The first list: one good object, one the validator rejects (no earlier version).
        let seen = feed(vec![
            Event::Init,
            Event::InitApply(routed("reviews", "^/v1/.*")),
            Event::InitApply(routed("ratings", "/v1/(")),
            Event::InitDone,
        ]);
        assert_eq!(seen, ["nothing", "nothing", "nothing", "replace"]);
        assert_eq!(regex("reviews").as_deref(), Some("^/v1/.*"));
        assert_eq!(
            store.snapshot().configs.len(),
            1,
            "the rejected one is absent"
        );
        let held = screen.held();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].0, key("ratings"));
        assert!(
            held[0]
                .1
                .iter()
                .any(|f| f.field == "spec.http[0].match[0].uri.regex"),
            "{held:?}"
        );
        assert_eq!(metric(&metrics, "weft_config_rejected"), "1");

        // A bad update of the good one: nothing changes, the good version stays in force.
        let generation = store.generation();
        let seen = feed(vec![Event::Apply(routed("reviews", "^/v2/[a-"))]);
        assert_eq!(seen, ["nothing"]);
        assert_eq!(store.generation(), generation, "no change reaches proxies");
        assert_eq!(regex("reviews").as_deref(), Some("^/v1/.*"));
        assert_eq!(metric(&metrics, "weft_config_rejected"), "2");
        assert_eq!(metric(&metrics, "weft_config_rejections_total"), "2");

        // A re-list sees both bad versions again: still held, not reported again, and the
        // last good version survives the replace.
        feed(vec![
            Event::Init,
            Event::InitApply(routed("reviews", "^/v2/[a-")),
            Event::InitApply(routed("ratings", "/v1/(")),
            Event::InitDone,
        ]);
        assert_eq!(regex("reviews").as_deref(), Some("^/v1/.*"));
        assert_eq!(regex("ratings"), None);
        assert_eq!(metric(&metrics, "weft_config_rejected"), "2");
        assert_eq!(metric(&metrics, "weft_config_rejections_total"), "2");

        // Fixed: the fixed version is used and the hold lifted.
        let seen = feed(vec![Event::Apply(routed("ratings", "^/v1/(a|b)$"))]);
        assert_eq!(seen, ["upsert"]);
        assert_eq!(regex("ratings").as_deref(), Some("^/v1/(a|b)$"));
        assert_eq!(screen.held_keys(), vec![key("reviews")]);
        assert_eq!(metric(&metrics, "weft_config_rejected"), "1");

        // Deleting the held one removes it and its hold.
        let seen = feed(vec![Event::Delete(routed("reviews", "^/v2/[a-"))]);
        assert_eq!(seen, ["remove"]);
        assert_eq!(regex("reviews"), None);
        assert!(screen.held_keys().is_empty());
        assert_eq!(metric(&metrics, "weft_config_rejected"), "0");

        // A held object deleted during a watch gap: the re-list lifts its hold.
        feed(vec![Event::Apply(routed("details", "("))]);
        assert_eq!(screen.held_keys(), vec![key("details")]);
        feed(vec![
            Event::Init,
            Event::InitApply(routed("ratings", "^/v1/(a|b)$")),
            Event::InitDone,
        ]);
        assert!(screen.held_keys().is_empty());
        assert_eq!(metric(&metrics, "weft_config_rejected"), "0");
        assert_eq!(metric(&metrics, "weft_config_rejections_total"), "3");
    }

    /// A node as the metadata watch sends it.
    fn node(name: &str, ebpf: Option<&str>, resource_version: &str) -> PartialObjectMeta<Node> {
        use kube::core::PartialObjectMetaExt as _;
        let mut labels = std::collections::BTreeMap::from([(
            "kubernetes.io/hostname".to_owned(),
            name.to_owned(),
        )]);
        if let Some(v) = ebpf {
            labels.insert("weft.dev/ebpf-redirect".into(), v.into());
        }
        ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            annotations: Some([("node.alpha.kubernetes.io/ttl".into(), "0".into())].into()),
            resource_version: Some(resource_version.into()),
            managed_fields: Some(vec![ManagedFieldsEntry::default()]),
            ..Default::default()
        }
        .into_response_partial::<Node>()
    }

    fn ebpf_labels(store: &Store) -> Vec<(String, Option<String>)> {
        store
            .snapshot()
            .nodes
            .iter()
            .map(|(n, l)| (n.clone(), l.get("weft.dev/ebpf-redirect").cloned()))
            .collect()
    }

    #[test]
    fn node_events_keep_their_labels_and_never_wake_discovery() {
        let (reader, mut writer) = store::<PartialObjectMeta<Node>>();
        let store = Store::new(Settings::default());
        let seen = feed(
            &NODES,
            &mut writer,
            &reader,
            &store,
            vec![
                Event::Init,
                Event::InitApply(node("n0", Some("ready"), "1")),
                Event::InitApply(node("n1", None, "1")),
                Event::InitDone,
            ],
        );
        assert_eq!(seen, ["nothing", "nothing", "nothing", "replace"]);
        assert_eq!(
            ebpf_labels(&store),
            [
                ("n0".to_owned(), Some("ready".to_owned())),
                ("n1".to_owned(), None)
            ]
        );
        assert!(
            reader
                .state()
                .iter()
                .all(|n| n.metadata.managed_fields.is_none()
                    && n.metadata.annotations.is_none()
                    && n.metadata.resource_version.is_none()),
            "the reflector keeps names and labels only"
        );
        assert_eq!(store.generation(), 0, "nodes are not translated");

        // A status update (new resourceVersion, same labels) leaves the store as it is; the
        // agent's label reaches it.
        let before = store.snapshot();
        feed(
            &NODES,
            &mut writer,
            &reader,
            &store,
            vec![Event::Apply(node("n0", Some("ready"), "2"))],
        );
        assert!(
            Arc::ptr_eq(&before, &store.snapshot()),
            "no copy of the store"
        );
        feed(
            &NODES,
            &mut writer,
            &reader,
            &store,
            vec![
                Event::Apply(node("n1", Some("unsupported"), "3")),
                Event::Apply(node("n2", Some("ready"), "3")),
                Event::Delete(node("n0", Some("ready"), "4")),
            ],
        );
        assert_eq!(
            ebpf_labels(&store),
            [
                ("n1".to_owned(), Some("unsupported".to_owned())),
                ("n2".to_owned(), Some("ready".to_owned()))
            ]
        );
        assert_eq!(
            store.snapshot().nodes["n2"]
                .get("kubernetes.io/hostname")
                .map(String::as_str),
            Some("n2")
        );
        assert_eq!(store.generation(), 0);
        let n = node("n1", None, "5");
        assert_eq!(key_of("Node", &n), read_key(NODES.read, n));
    }

    fn read_key<K>(read: fn(Arc<K>) -> Read, obj: K) -> ObjectKey {
        let Read::Use(o) = read(Arc::new(obj)) else {
            panic!("readable")
        };
        o.key()
    }

    #[test]
    fn keys_follow_the_store() {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            key_of("Namespace", &ns),
            Object::Namespace(Arc::new(ns.clone())).key()
        );
        let p = pod("a", "cart");
        assert_eq!(key_of("Pod", &p), Object::pod(p.clone()).key());
        let vs = routed("reviews", "^/v1/.*");
        let Read::Use(read) = read_dynamic(Arc::new(vs.clone())) else {
            panic!("readable")
        };
        let kind = dynamic_kind(known("networking.istio.io", "VirtualService"));
        assert_eq!(key_of(&kind.kind, &vs), read.key());
    }
}
