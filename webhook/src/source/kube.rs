//! Kubernetes: watches of Namespaces, Services, EndpointSlices, Pods and every Istio /
//! Gateway API / SMI kind (as dynamic objects, read with [`weft_api::crd::AnyResource`]). A
//! kind whose CRD is not installed is logged once and stays empty; its watch keeps retrying
//! with backoff, so installing the CRD later works. Also publishes the mesh root as the
//! ConfigMap `weft-ca-root-cert` in every namespace that has meshed pods.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use tracing::{info, warn};
use weft_api::crd::KNOWN_KINDS;

use crate::ca::store::publish_root_config_map;
use crate::resources::{Object, ObjectKey, Store, is_meshed};

/// How often the root ConfigMaps are checked even without a change.
pub const ROOT_CONFIG_MAP_RESYNC: Duration = Duration::from_secs(300);

fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if let Some(stem) = lower.strip_suffix('y')
        && !stem.ends_with(['a', 'e', 'i', 'o', 'u'])
    {
        format!("{stem}ies")
    } else if lower.ends_with('s') {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}

async fn watch<K>(api: Api<K>, kind: String, store: Arc<Store>, convert: fn(K) -> Option<Object>)
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut reported = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(obj)) | Ok(Event::Apply(obj)) => {
                if let Some(o) = convert(obj) {
                    listing.insert(o.key());
                    store.update(|r| {
                        r.upsert(o);
                        true
                    });
                }
            }
            Ok(Event::InitDone) => {
                let keep = std::mem::take(&mut listing);
                store.update(|r| {
                    r.retain_kind(&kind, |k| keep.contains(k));
                    true
                });
                if reported {
                    info!(%kind, "watch established");
                    reported = false;
                }
            }
            Ok(Event::Delete(obj)) => {
                if let Some(o) = convert(obj) {
                    let key = o.key();
                    store.update(|r| r.remove(&key));
                }
            }
            Err(error) => {
                if !reported {
                    warn!(%kind, %error, "cannot watch; treated as empty until it can (CRD not installed?)");
                    reported = true;
                }
            }
        }
    }
}

fn dynamic(obj: DynamicObject) -> Option<Object> {
    let value = serde_json::to_value(&obj).ok()?;
    match Object::from_value(&value) {
        Ok(o) => o,
        Err(error) => {
            warn!(%error, "object cannot be read; ignored");
            None
        }
    }
}

/// Starts every watch on `client`; they run until aborted.
pub fn spawn_watches(
    client: &kube::Client,
    store: &Arc<Store>,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    tasks.spawn(watch(
        Api::<Namespace>::all(client.clone()),
        "Namespace".into(),
        store.clone(),
        |o| Some(Object::namespace(o)),
    ));
    tasks.spawn(watch(
        Api::<Service>::all(client.clone()),
        "Service".into(),
        store.clone(),
        |o| Some(Object::service(o)),
    ));
    tasks.spawn(watch(
        Api::<Pod>::all(client.clone()),
        "Pod".into(),
        store.clone(),
        |o| Some(Object::pod(o)),
    ));
    tasks.spawn(watch(
        Api::<EndpointSlice>::all(client.clone()),
        "EndpointSlice".into(),
        store.clone(),
        |o| Some(Object::EndpointSlice(Arc::new(o))),
    ));
    for known in KNOWN_KINDS {
        let version = known.versions.first().copied().unwrap_or("v1");
        let gvk = GroupVersionKind::gvk(known.group, version, known.kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, &plural(known.kind));
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        tasks.spawn(watch(
            api,
            format!("{}/{}", known.group, known.kind),
            store.clone(),
            dynamic,
        ));
    }
}

/// Keeps the root ConfigMap in every namespace with meshed pods (and the control plane's).
pub async fn keep_root_config_maps(
    client: kube::Client,
    store: Arc<Store>,
    control_plane_namespace: String,
    name: String,
    roots_pem: String,
) {
    let mut generation = store.subscribe();
    let mut published: BTreeSet<String> = BTreeSet::new();
    let mut last_full = tokio::time::Instant::now();
    loop {
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
            () = tokio::time::sleep(Duration::from_secs(30)) => {},
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn plurals() {
        assert_eq!(super::plural("ServiceEntry"), "serviceentries");
        assert_eq!(super::plural("Gateway"), "gateways");
        assert_eq!(super::plural("GatewayClass"), "gatewayclasses");
        assert_eq!(
            super::plural("AuthorizationPolicy"),
            "authorizationpolicies"
        );
        assert_eq!(super::plural("HTTPRoute"), "httproutes");
    }
}
