//! The contract between Weft's control plane (`weft-webhook`) and its data plane
//! (`weft-proxy`, `weft-redirector`).
//!
//! - [`config`]: the compiled, Kubernetes-independent view a proxy consumes.
//! - [`bootstrap`]: the environment a proxy is started with (set by the injector).
//! - [`redirect`]: the arguments of the injected `weft-redirector init` step.
//! - [`discovery`]: the wire protocol of the control plane's CA and config stream.
//!
//! The `crd` feature adds the Rust types of the Istio and Gateway API resources; the proxy
//! builds without it and so never compiles kube.
#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod config;
pub mod discovery;
pub mod redirect;

#[cfg(feature = "crd")]
pub mod crd;
#[cfg(feature = "crd")]
pub mod validate;
