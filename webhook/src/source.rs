//! Discovery sources: what fills the [`crate::resources::Store`].
//!
//! - [`local`]: a directory of YAML files (local mode), polled.
//! - [`kube`]: Kubernetes watches (Services, EndpointSlices, Pods, Namespaces and every
//!   Istio / Gateway API / SMI kind), plus the root-certificate ConfigMaps.

pub mod kube;
pub mod local;
