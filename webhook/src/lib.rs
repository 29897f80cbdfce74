//! Weft's control plane, as a library so that tests, benchmarks and the binary share it.
//!
//! - [`inject`]: the pure injection core, `inject(&Pod, &MeshConfig, &InjectContext)`.
//! - [`mesh`]: the mesh config file the injector is configured with.
//! - [`admission`]: AdmissionReview in, AdmissionReview out, for `/inject` and `/validate`.
//! - [`manifest`]: `weft-webhook inject -f`, injection of YAML manifests (like `istioctl kube-inject`).
//! - [`server`]: the HTTPS server (axum on rustls) around [`admission`].
//! - [`serving_cert`]: the webhook's TLS certificate, from files or made at start.
//! - [`registration`]: keeping the webhook configurations' `caBundle` and the serving
//!   certificate in the cluster.
//! - [`serve`]: `weft-webhook serve`, which assembles the above into the running process.
#![forbid(unsafe_code)]

pub mod admission;
pub mod ca;
pub mod control_plane;
pub mod discovery;
pub mod inject;
pub mod manifest;
pub mod mesh;
pub mod metrics;
pub mod registration;
pub mod resources;
pub mod serve;
pub mod server;
pub mod serving_cert;
pub mod source;
#[cfg(feature = "testing")]
pub mod testing;
pub mod translate;

pub use inject::{Denial, InjectContext, Injection, Outcome, inject};
pub use mesh::MeshConfig;
