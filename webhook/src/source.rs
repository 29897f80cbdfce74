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
