//! Which interception mode a pod gets: eBPF only where it is known to work.
//!
//! A pod whose mode is `EBPF` (mesh config `interceptionMode`, or the pod's
//! `sidecar.istio.io/interceptionMode`) needs the node agent (`weft-redirector node`) on the node
//! it runs on: its init step only checks that the agent took it, and fails the pod otherwise.
//! The agent labels its node [`LABEL_EBPF_REDIRECT`]`=`[`EBPF_READY`] once its programs are
//! attached, or [`EBPF_UNSUPPORTED`] when the kernel lacks a hook. [`choose`] keeps `EBPF` only
//! when that label says `ready` where the pod will run:
//!
//! - a pod with `spec.nodeName` (already bound) runs there: that node must be `ready`;
//! - a pod not scheduled yet (the usual case at admission) may land on any node: every known
//!   node must be `ready`, and there must be at least one.
//!
//! Otherwise the pod gets `REDIRECT` (iptables rules in its own network namespace, which work
//! on every node) and a warning saying why. `REDIRECT` and `NONE` are never changed. Without
//! node information (`weft-webhook inject -f`, or a webhook with no cluster and no local
//! directory) the requested mode is kept.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use weft_api::redirect::InterceptionMode;

use crate::resources::NodeLabels;

/// Node label the eBPF node agent sets (the redirector's `NODE_LABEL`).
pub const LABEL_EBPF_REDIRECT: &str = "weft.dev/ebpf-redirect";
/// [`LABEL_EBPF_REDIRECT`] value: the agent's programs are attached on the node.
pub const EBPF_READY: &str = "ready";
/// [`LABEL_EBPF_REDIRECT`] value: a hook the agent needs cannot attach on the node's kernel.
pub const EBPF_UNSUPPORTED: &str = "unsupported";
/// Nodes named in a warning at most; the API server truncates long admission warnings.
pub const MAX_NODES_NAMED: usize = 5;

/// What the injector knows of the cluster's nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Every known node and its labels.
    pub nodes: Arc<NodeLabels>,
    /// False while the control plane has not listed the nodes yet (just started, or the list
    /// fails): then no node is known to be ready.
    pub listed: bool,
}

impl NodeView {
    /// A complete view of these nodes.
    pub fn listed(nodes: Arc<NodeLabels>) -> Self {
        Self {
            nodes,
            listed: true,
        }
    }

    /// A view of nodes given as `(name, label value)`, `None` for a node without the label.
    pub fn from_labels<'a>(nodes: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> Self {
        let nodes = nodes
            .into_iter()
            .map(|(name, value)| {
                let labels = value
                    .map(|v| BTreeMap::from([(LABEL_EBPF_REDIRECT.to_owned(), v.to_owned())]))
                    .unwrap_or_default();
                (name.to_owned(), labels)
            })
            .collect();
        Self::listed(Arc::new(nodes))
    }

    fn label(&self, node: &str) -> Option<Option<&str>> {
        self.nodes
            .get(node)
            .map(|labels| labels.get(LABEL_EBPF_REDIRECT).map(String::as_str))
    }
}

/// The mode a pod gets and, when it is not the one asked for, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The mode to inject.
    pub mode: InterceptionMode,
    /// The admission warning explaining a fallback.
    pub warning: Option<String>,
}

/// How a known node's label reads in a warning.
fn describe(value: Option<&str>) -> String {
    match value {
        None => format!("no {LABEL_EBPF_REDIRECT} label"),
        Some(v) => format!("{LABEL_EBPF_REDIRECT}={v:?}"),
    }
}

/// The mode for a pod that asks for `requested`, bound to `node_name` if it is scheduled
/// already, given what is known of the nodes (`None`: nothing, the requested mode is kept).
pub fn choose(
    requested: InterceptionMode,
    node_name: Option<&str>,
    nodes: Option<&NodeView>,
) -> Choice {
    let keep = Choice {
        mode: requested,
        warning: None,
    };
    let Some(view) = nodes else { return keep };
    if requested != InterceptionMode::Ebpf {
        return keep;
    }
    let why = match node_name.filter(|n| !n.is_empty()) {
        _ if !view.listed => {
            "the control plane has not listed the cluster's nodes yet, so no node reports a \
             ready eBPF agent"
                .to_owned()
        }
        Some(node) => match view.label(node) {
            Some(Some(EBPF_READY)) => return keep,
            Some(value) => format!("its node {node:?} has {}", describe(value)),
            None => format!("its node {node:?} is not known to the control plane"),
        },
        None if view.nodes.is_empty() => "no node reports a ready eBPF agent".to_owned(),
        None => {
            let not_ready: Vec<(&String, Option<&str>)> = view
                .nodes
                .iter()
                .map(|(name, labels)| (name, labels.get(LABEL_EBPF_REDIRECT).map(String::as_str)))
                .filter(|(_, value)| *value != Some(EBPF_READY))
                .collect();
            if not_ready.is_empty() {
                return keep;
            }
            let mut why = format!(
                "the pod is not scheduled yet and {} of {} nodes do not report a ready eBPF \
                 agent: ",
                not_ready.len(),
                view.nodes.len()
            );
            for (i, (name, value)) in not_ready.iter().take(MAX_NODES_NAMED).enumerate() {
                if i > 0 {
                    why.push_str(", ");
                }
                let _ = write!(why, "{name:?} ({})", describe(*value));
            }
            if not_ready.len() > MAX_NODES_NAMED {
                let _ = write!(why, " and {} more", not_ready.len() - MAX_NODES_NAMED);
            }
            why
        }
    };
    Choice {
        mode: InterceptionMode::Redirect,
        warning: Some(format!(
            "interception mode EBPF needs the node agent's {LABEL_EBPF_REDIRECT}={EBPF_READY} \
             where the pod runs; {why}: the pod uses iptables (REDIRECT) instead"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EBPF: InterceptionMode = InterceptionMode::Ebpf;
    const REDIRECT: InterceptionMode = InterceptionMode::Redirect;

    fn view(nodes: &[(&'static str, Option<&'static str>)]) -> NodeView {
        NodeView::from_labels(nodes.iter().copied())
    }

    fn warning(c: &Choice) -> &str {
        c.warning.as_deref().expect("a warning")
    }

    #[test]
    fn ebpf_is_kept_when_every_node_is_ready() {
        let nodes = view(&[("node-0", Some("ready")), ("node-1", Some("ready"))]);
        let c = choose(EBPF, None, Some(&nodes));
        assert_eq!(
            c,
            Choice {
                mode: EBPF,
                warning: None
            }
        );
    }

    #[test]
    fn one_unsupported_node_means_redirect_naming_it() {
        let nodes = view(&[
            ("node-0", Some("ready")),
            ("node-1", Some("unsupported")),
            ("node-2", Some("ready")),
        ]);
        let c = choose(EBPF, None, Some(&nodes));
        assert_eq!(c.mode, REDIRECT);
        let w = warning(&c);
        assert!(
            w.contains(r#""node-1" (weft.dev/ebpf-redirect="unsupported")"#),
            "{w}"
        );
        assert!(w.contains("1 of 3 nodes"), "{w}");
        assert!(!w.contains("node-0") && !w.contains("node-2"), "{w}");
        assert!(w.contains("iptables (REDIRECT)"), "{w}");
    }

    #[test]
    fn unlabelled_nodes_and_no_nodes_mean_redirect() {
        let nodes = view(&[("node-0", None), ("node-1", Some("ready"))]);
        let c = choose(EBPF, None, Some(&nodes));
        assert_eq!(c.mode, REDIRECT);
        let w = warning(&c);
        assert!(
            w.contains(r#""node-0" (no weft.dev/ebpf-redirect label)"#),
            "{w}"
        );

        let c = choose(EBPF, None, Some(&view(&[])));
        assert_eq!(c.mode, REDIRECT);
        assert!(
            warning(&c).contains("no node reports a ready eBPF agent"),
            "{c:?}"
        );

        // Known nodes but none listed yet: nothing is known to work.
        let unlisted = NodeView {
            listed: false,
            ..view(&[("node-0", Some("ready"))])
        };
        let c = choose(EBPF, None, Some(&unlisted));
        assert_eq!(c.mode, REDIRECT);
        assert!(warning(&c).contains("not listed"), "{c:?}");
    }

    #[test]
    fn a_scheduled_pod_needs_only_its_own_node() {
        let nodes = view(&[
            ("node-0", Some("ready")),
            ("node-1", Some("unsupported")),
            ("node-2", None),
        ]);
        let c = choose(EBPF, Some("node-0"), Some(&nodes));
        assert_eq!((c.mode, c.warning), (EBPF, None));

        let c = choose(EBPF, Some("node-1"), Some(&nodes));
        assert_eq!(c.mode, REDIRECT);
        let w = warning(&c);
        assert!(
            w.contains(r#"its node "node-1" has weft.dev/ebpf-redirect="unsupported""#),
            "{w}"
        );

        let c = choose(EBPF, Some("node-2"), Some(&nodes));
        assert_eq!(c.mode, REDIRECT);
        assert!(warning(&c).contains("no weft.dev/ebpf-redirect label"));

        let c = choose(EBPF, Some("node-9"), Some(&nodes));
        assert_eq!(c.mode, REDIRECT);
        assert!(
            warning(&c).contains(r#"its node "node-9" is not known to the control plane"#),
            "{c:?}"
        );
    }

    #[test]
    fn redirect_and_none_are_never_changed() {
        for nodes in [
            view(&[("node-0", Some("unsupported"))]),
            view(&[("node-0", Some("ready"))]),
            view(&[]),
        ] {
            for node in [None, Some("node-0")] {
                for mode in [REDIRECT, InterceptionMode::None] {
                    let c = choose(mode, node, Some(&nodes));
                    assert_eq!((c.mode, c.warning), (mode, None), "{mode:?} {node:?}");
                }
            }
        }
    }

    #[test]
    fn without_node_information_the_requested_mode_is_kept() {
        for node in [None, Some("node-0")] {
            let c = choose(EBPF, node, None);
            assert_eq!((c.mode, c.warning), (EBPF, None));
        }
    }

    #[test]
    fn a_long_list_of_nodes_is_cut_short() {
        let names: Vec<String> = (0..12).map(|i| format!("node-{i:02}")).collect();
        let nodes = NodeView::from_labels(names.iter().map(|n| (n.as_str(), None)));
        let w = choose(EBPF, None, Some(&nodes)).warning.expect("a warning");
        assert!(w.contains("12 of 12 nodes"), "{w}");
        assert!(w.contains("node-04") && !w.contains("node-05"), "{w}");
        assert!(w.contains("and 7 more"), "{w}");
    }
}
