//! `weft-proxy`: Weft's data plane, the sidecar that sits beside every meshed workload.
//!
//! Traffic the redirector captures arrives on two listeners: outbound (15001) for what the app
//! sends, inbound (15006) for what reaches the pod. Both recover the original destination with
//! `SO_ORIGINAL_DST`, detect the protocol when the config does not declare it, and forward:
//! HTTP request by request (HTTP/1.1 and HTTP/2 from the app both ride one pooled HTTP/2
//! connection per peer), everything else as opaque bytes, over mutual TLS with SPIFFE
//! identities between sidecars. The proxy knows nothing about Kubernetes: it consumes the
//! config model of `weft-api`. See `ARCHITECTURE.md` for ports, threads and the life of a
//! request.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod breaker;
pub mod ca;
pub mod config;
pub mod control;
pub mod cors;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod fault;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod mirror;
pub mod outbound;
pub mod outlier;
pub mod pool;
pub mod probe;
pub mod replay;
pub mod retry;
pub mod rewrite;
pub mod route;
pub mod snapshot;
pub mod socket;
pub mod tcp;
pub mod tls;
pub mod upstream_tls;
