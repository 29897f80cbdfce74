//! Weft's test harness: the *local node*, a Kubernetes-like node on one Linux host whose pods
//! are network namespaces, plus the sample app's protocol and the helpers the end-to-end
//! tests, the demo and the benchmarks share.
//!
//! Everything the local node creates lives in network namespaces of its own (a node
//! namespace with a bridge, one namespace per pod), cgroups under
//! `/sys/fs/cgroup/unified/weft/`, `/etc/netns/<pod>/` and a temporary directory; all of it is
//! removed when the [`localnode::LocalNode`] is dropped, including on panic and Ctrl-C.

pub mod binaries;
pub mod exec;
pub mod localnode;
pub mod sample;
