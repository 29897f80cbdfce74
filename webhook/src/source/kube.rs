//! Kubernetes: kube-runtime reflectors over Namespaces, Services, EndpointSlices, Pods and
//! every Istio / Gateway API / SMI kind (as dynamic objects, read with
//! [`weft_api::crd::AnyResource`]). Also publishes the mesh root as the ConfigMap
//! `weft-ca-root-cert` in every namespace that has meshed pods.
//!
//! Each reflector keeps its own store (trimmed of what translation never reads before it is
//! stored); its events become [`Change`]s of the shared [`Store`], whose generation is what
//! discovery debounces into pushes. A (re-)list is buffered by the reflector and lands in the
//! store as one change when it completes, so proxies never see a half-listed kind.
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

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::core::Version;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{info, warn};
use weft_api::crd::{KNOWN_KINDS, KnownKind};

use crate::ca::store::publish_root_config_map;
use crate::resources::{Object, ObjectKey, Store, is_meshed, slim_pod};

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
    /// be read; a listed object that cannot be read keeps the version the store has.
    Replace {
        /// Every listed object.
        keys: BTreeSet<ObjectKey>,
        /// The listed objects that could be read.
        objects: Vec<Object>,
    },
}

/// A watched type: how it is trimmed before the reflector stores it, and read into an
/// [`Object`] of the store kind `kind`.
#[derive(Clone)]
pub struct Kind<K> {
    /// The store's name of the kind (`Pod`, `networking.istio.io/VirtualService`).
    pub kind: Cow<'static, str>,
    /// Drops what translation never reads, so that the reflector's store stays small.
    pub trim: fn(&mut K),
    /// Reads the object; `None` when it cannot be read (logged).
    pub read: fn(Arc<K>) -> Option<Object>,
}

impl<K> Debug for Kind<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kind").field("kind", &self.kind).finish()
    }
}

/// The store key of `obj` (namespace `default` when absent, as the store does).
pub fn key_of<K: Resource>(kind: &str, obj: &K) -> ObjectKey {
    let meta = obj.meta();
    ObjectKey {
        kind: kind.to_owned(),
        namespace: if kind == "Namespace" {
            String::new()
        } else {
            meta.namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned())
        },
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Turns a watch event, already applied to the reflector's store `reader`, into a change of
/// the shared store.
pub fn change_of<K>(kind: &Kind<K>, event: Event<K>, reader: &reflector::Store<K>) -> Change
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    match event {
        Event::Init | Event::InitApply(_) => Change::Nothing,
        Event::InitDone => {
            let listed = reader.state();
            Change::Replace {
                keys: listed.iter().map(|o| key_of(&kind.kind, &**o)).collect(),
                objects: listed.into_iter().filter_map(kind.read).collect(),
            }
        }
        Event::Apply(obj) => match (kind.read)(Arc::new(obj)) {
            Some(o) => Change::Upsert(o),
            // Its last good version stays.
            None => Change::Nothing,
        },
        Event::Delete(obj) => Change::Remove(key_of(&kind.kind, &obj)),
    }
}

/// Applies `change` (of objects of `kind`) to `store`.
pub fn apply(store: &Store, kind: &str, change: Change) {
    match change {
        Change::Nothing => {}
        Change::Upsert(o) => store.update(|r| {
            r.upsert(o);
            true
        }),
        Change::Remove(key) => store.update(|r| r.remove(&key)),
        Change::Replace { keys, objects } => store.update(|r| {
            r.retain_kind(kind, |k| keys.contains(k));
            for o in objects {
                r.upsert(o);
            }
            true
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
async fn reflect<K>(
    api: Api<K>,
    writer: Writer<K>,
    kind: Kind<K>,
    store: Arc<Store>,
    listed: Option<watch::Sender<bool>>,
    stop_if_not_served: bool,
) -> Stopped
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let reader = writer.as_reader();
    let mut stream = reflector::reflector(
        writer,
        watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(kind.trim),
    )
    .boxed();
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                let done = matches!(event, Event::InitDone);
                apply(&store, &kind.kind, change_of(&kind, event, &reader));
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

async fn reflect_typed<K>(
    client: kube::Client,
    kind: Kind<K>,
    store: Arc<Store>,
    listed: Option<watch::Sender<bool>>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
{
    let (_, writer) = reflector::store::<K>();
    reflect(Api::all(client), writer, kind, store, listed, false).await;
}

fn trim_namespace(n: &mut Namespace) {
    n.metadata.managed_fields = None;
    n.spec = None;
    n.status = None;
}

fn trim_service(s: &mut Service) {
    s.metadata.managed_fields = None;
    s.status = None;
}

fn trim_pod(p: &mut Pod) {
    *p = slim_pod(std::mem::take(p));
}

fn trim_endpoint_slice(e: &mut EndpointSlice) {
    e.metadata.managed_fields = None;
}

fn trim_dynamic(o: &mut DynamicObject) {
    o.metadata.managed_fields = None;
}

/// Namespaces, as the store reads them.
pub const NAMESPACES: Kind<Namespace> = Kind {
    kind: Cow::Borrowed("Namespace"),
    trim: trim_namespace,
    read: |n| Some(Object::Namespace(n)),
};
/// Services.
pub const SERVICES: Kind<Service> = Kind {
    kind: Cow::Borrowed("Service"),
    trim: trim_service,
    read: |s| Some(Object::Service(s)),
};
/// Pods (slimmed before they are stored, see [`slim_pod`]).
pub const PODS: Kind<Pod> = Kind {
    kind: Cow::Borrowed("Pod"),
    trim: trim_pod,
    read: |p| Some(Object::Pod(p)),
};
/// EndpointSlices.
pub const ENDPOINT_SLICES: Kind<EndpointSlice> = Kind {
    kind: Cow::Borrowed("EndpointSlice"),
    trim: trim_endpoint_slice,
    read: |e| Some(Object::EndpointSlice(e)),
};

fn read_dynamic(obj: Arc<DynamicObject>) -> Option<Object> {
    let value = match serde_json::to_value(&*obj) {
        Ok(v) => v,
        Err(error) => {
            warn!(%error, "object cannot be serialised; ignored");
            return None;
        }
    };
    match Object::from_value(&value) {
        Ok(o) => o,
        Err(error) => {
            let name = obj.metadata.name.as_deref().unwrap_or_default();
            let namespace = obj.metadata.namespace.as_deref().unwrap_or_default();
            warn!(%namespace, %name, %error, "object cannot be read; keeping its last good version");
            None
        }
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
async fn reflect_crd(client: kube::Client, known: &'static KnownKind, store: Arc<Store>) {
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
        match reflect(api, writer, kind.clone(), store.clone(), None, true).await {
            Stopped::NotServed => {
                info!(kind = %kind.kind, version = %resource.version, "no longer served; looking again");
            }
            Stopped::Ended => tokio::time::sleep(CRD_RESCAN).await,
        }
    }
}

/// Starts every watch on `client`; they run until aborted. The returned receiver turns true
/// once every pod has been listed into the store (see
/// [`crate::discovery::Discovery::require_known_pods`]).
pub fn spawn_watches(
    client: &kube::Client,
    store: &Arc<Store>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> watch::Receiver<bool> {
    let (pods_listed, listed) = watch::channel(false);
    tasks.spawn(reflect_typed(
        client.clone(),
        NAMESPACES,
        store.clone(),
        None,
    ));
    tasks.spawn(reflect_typed(client.clone(), SERVICES, store.clone(), None));
    tasks.spawn(reflect_typed(
        client.clone(),
        PODS,
        store.clone(),
        Some(pods_listed),
    ));
    tasks.spawn(reflect_typed(
        client.clone(),
        ENDPOINT_SLICES,
        store.clone(),
        None,
    ));
    for known in KNOWN_KINDS {
        tasks.spawn(reflect_crd(client.clone(), known, store.clone()));
    }
    listed
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
            .filter(|(_, p)| is_meshed(p))
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
    fn feed<K>(
        kind: &Kind<K>,
        writer: &mut Writer<K>,
        reader: &reflector::Store<K>,
        store: &Store,
        events: Vec<Event<K>>,
    ) -> Vec<&'static str>
    where
        K: Resource + Clone + 'static,
        K::DynamicType: Eq + Hash + Clone,
    {
        let mut seen = Vec::new();
        for mut event in events {
            if let Event::Apply(o) | Event::InitApply(o) | Event::Delete(o) = &mut event {
                (kind.trim)(o);
            }
            writer.apply_watcher_event(&event);
            let change = change_of(kind, event, reader);
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
        let (reader, mut writer) = store::<Pod>();
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
        assert!(a.metadata.managed_fields.is_none(), "trimmed");
        assert_eq!(
            a.spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref()),
            Some("cart")
        );
        // The reflector's store holds the trimmed pod too: one small copy each.
        assert!(
            reader
                .state()
                .iter()
                .all(|p| p.metadata.managed_fields.is_none())
        );

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
                .and_then(|p| p.spec.as_ref())
                .and_then(|s| s.service_account_name.as_deref()),
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
        let good = virtual_service("reviews", serde_json::json!({"hosts": ["reviews"]}));
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
        let vs = virtual_service("reviews", serde_json::json!({"hosts": ["reviews"]}));
        let read = read_dynamic(Arc::new(vs.clone())).expect("readable");
        let kind = dynamic_kind(known("networking.istio.io", "VirtualService"));
        assert_eq!(key_of(&kind.kind, &vs), read.key());
    }
}
