//! Discovery sources: what fills the [`crate::resources::Store`].
//!
//! - [`local`]: a directory of YAML files (local mode), polled.
//! - [`kube`]: Kubernetes reflectors (Services, EndpointSlices, Pods, Namespaces and every
//!   Istio / Gateway API / SMI kind, at the version the cluster serves), plus the
//!   root-certificate ConfigMaps.

pub mod kube;
pub mod local;
