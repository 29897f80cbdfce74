//! Discovery sources: what fills the [`crate::resources::Store`].
//!
//! - [`local`]: a directory of YAML files (local mode), polled.
//! - [`kube`]: Kubernetes reflectors (Services, EndpointSlices, Pods, Namespaces and every
//!   Istio / Gateway API / SMI kind, at the version the cluster serves), plus the
//!   root-certificate ConfigMaps.
//! - [`screen`]: what both run every Istio / Gateway API / SMI object through before the
//!   store sees it, so that an object the validator rejects never reaches a proxy.

pub mod kube;
pub mod local;
pub mod screen;

/// The regex of the first match of the stored VirtualService `shop/name`, if it is stored
/// (the screening tests of both sources).
#[cfg(test)]
fn stored_regex(store: &crate::resources::Store, name: &str) -> Option<String> {
    let r = store.snapshot();
    let entry = r.configs.get(&(
        "networking.istio.io/VirtualService".to_owned(),
        "shop".to_owned(),
        name.to_owned(),
    ))?;
    let weft_api::crd::AnyResource::VirtualService(vs) = &*entry.resource else {
        panic!("a VirtualService")
    };
    let value = serde_json::to_value(&vs.spec).expect("serialisable");
    value["http"][0]["match"][0]["uri"]["regex"]
        .as_str()
        .map(str::to_owned)
}
