//! `weft-redirector`: transparent redirection of a pod's traffic to its Weft proxy.
//!
//! - [`cli`]: the command line; `init` parses the injector's flags ([`weft_api::redirect`]).
//! - [`iptables`]: the pure core, Istio-equivalent NAT rules as data and their
//!   `iptables-restore` text.
//! - [`state`]: Weft's part of the current rule set, read from `iptables-save`, and its removal.
//! - [`apply`]: the thin adapter that runs the save and restore binaries.
//! - [`loopback`]: the IPv6 inbound passthrough source `::6` on `lo`.
//! - [`ebpf`]: the init step in eBPF mode: checks that the node agent has taken the pod.
//! - [`node`]: the eBPF node agent (`weft-redirector node`).
// `deny`, not `forbid`: two `bpf(2)` calls in `node::bpf::sys` need it, and say why.
#![deny(unsafe_code)]

pub mod apply;
pub mod cli;
pub mod ebpf;
pub mod iptables;
pub mod loopback;
pub mod node;
pub mod state;
