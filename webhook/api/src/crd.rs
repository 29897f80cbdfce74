//! Rust types of the Istio, Gateway API and SMI resources Weft consumes.
