//! Sidecar injection: the pure core behind `POST /inject` and `weft-webhook inject -f`.
//!
//! [`inject`] takes a pod as the API server sends it and answers with the patch that meshes
//! it, a reason to leave it alone, or a [`Denial`] naming the annotation and value at fault.
//! It does no I/O and is deterministic: the same pod and config give the same patch.
//!
//! What is added:
//! - `weft-init`, an init container running `weft-redirector init <InitArgs>` as root with
//!   `NET_ADMIN` and `NET_RAW` (skipped in interception mode `NONE`; in mode `EBPF` only where
//!   the nodes' eBPF agents are ready, else `REDIRECT` with a warning, see [`mode`]);
//! - `weft-proxy`, as a native sidecar (init container with `restartPolicy: Always` right after
//!   `weft-init`) or, in classic mode, as the first container with a postStart hook running
//!   `weft-proxy wait` (or as the last one when the app need not wait for it);
//! - the `weft-token`, `weft-root-cert` and `weft-credentials` volumes;
//! - rewritten app probes ([`probes`]);
//! - labels `security.istio.io/tlsMode`, `service.istio.io/canonical-name|revision` and
//!   annotations `sidecar.istio.io/status` ([`status`]), `kubectl.kubernetes.io/default-container`
//!   and `prometheus.io/*`.

pub mod annotations;
pub mod mode;
pub mod patch;
pub mod probes;
pub mod sidecar;
pub mod status;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, Pod};
use weft_api::bootstrap::{AppPort, AppProbes};
use weft_api::redirect::InterceptionMode;

use self::annotations::Decision;
use self::mode::NodeView;
use self::sidecar::{AppInfo, Placement};
use self::status::SidecarStatus;
use crate::mesh::MeshConfig;

/// Label: mTLS mode peers should use towards this pod.
pub const LABEL_TLS_MODE: &str = "security.istio.io/tlsMode";
/// Label: canonical service name.
pub const LABEL_CANONICAL_NAME: &str = "service.istio.io/canonical-name";
/// Label: canonical service revision.
pub const LABEL_CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
/// Annotation: the container `kubectl logs/exec` pick by default.
pub const ANNOTATION_DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";
/// Annotation: scrape this pod.
pub const ANNOTATION_PROMETHEUS_SCRAPE: &str = "prometheus.io/scrape";
/// Annotation: scrape port.
pub const ANNOTATION_PROMETHEUS_PORT: &str = "prometheus.io/port";
/// Annotation: scrape path.
pub const ANNOTATION_PROMETHEUS_PATH: &str = "prometheus.io/path";
/// Merged metrics path on the status port.
pub const PROMETHEUS_PATH: &str = weft_api::bootstrap::PATH_METRICS;

/// What the caller knows beyond the pod itself.
#[derive(Debug, Clone, Default)]
pub struct InjectContext {
    /// Namespace of the request (a pod being created may not carry it yet).
    pub namespace: Option<String>,
    /// Name of the workload owning the pod (the Deployment's name for `inject -f`); used for
    /// the canonical name when no label gives one.
    pub workload_name: Option<String>,
    /// `Some(true)` when the API server supports native sidecars (≥ 1.29), `Some(false)` when
    /// it does not, `None` when there is no cluster (then `nativeSidecar: auto` means native).
    pub cluster_supports_native_sidecars: Option<bool>,
    /// What is known of the nodes' eBPF agents: a pod in interception mode `EBPF` keeps it
    /// only where they are ready ([`mode::choose`]). `None` when nothing is known (offline
    /// `inject -f`): the requested mode is kept.
    pub nodes: Option<NodeView>,
}

/// Why a pod is not injected: sent back to the user as the admission denial message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// An annotation has a value Weft cannot use.
    #[error("annotation {name}={value:?} is invalid: {reason}")]
    Annotation {
        /// The annotation.
        name: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A label has a value Weft cannot use.
    #[error("label {name}={value:?} is invalid: {reason}")]
    Label {
        /// The label.
        name: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The pod itself cannot be injected.
    #[error("{0}")]
    Pod(String),
}

impl Denial {
    pub(crate) fn annotation(name: &str, value: &str, reason: impl fmt::Display) -> Denial {
        Denial::Annotation {
            name: name.to_owned(),
            value: value.to_owned(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn label(name: &str, value: &str, reason: impl fmt::Display) -> Denial {
        Denial::Label {
            name: name.to_owned(),
            value: value.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// Why a pod was left unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `sidecar.istio.io/inject` is false (label or annotation).
    OptedOut,
    /// The pod uses the node's network namespace; redirecting it would capture the node.
    HostNetwork,
    /// The pod already carries a sidecar (Weft's or Istio's), per `sidecar.istio.io/status`.
    AlreadyInjected,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Skip::OptedOut => "sidecar.istio.io/inject is false",
            Skip::HostNetwork => "pod uses the host network",
            Skip::AlreadyInjected => "pod is already injected",
        })
    }
}

/// An injected pod.
#[derive(Debug, Clone)]
pub struct Injection {
    /// The pod after injection.
    pub pod: Pod,
    /// The RFC 6902 patch from the pod as given to [`Injection::pod`].
    pub patch: json_patch::Patch,
    /// Annotations that were ignored and other things the user should know.
    pub warnings: Vec<String>,
    /// The interception mode injected (`EBPF` asked for may have become `REDIRECT`).
    pub mode: InterceptionMode,
}

/// The result of [`inject`] for a pod that is not denied.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Left unchanged.
    Skip(Skip),
    /// Injected.
    Injected(Box<Injection>),
}

/// Injects the sidecar into `pod`.
pub fn inject(pod: &Pod, mesh: &MeshConfig, ctx: &InjectContext) -> Result<Outcome, Denial> {
    let (after, warnings, mode) = match mutate(pod, mesh, ctx)? {
        Ok(done) => done,
        Err(skip) => return Ok(Outcome::Skip(skip)),
    };
    let before_json = serde_json::to_value(pod)
        .map_err(|e| Denial::Pod(format!("pod does not serialize: {e}")))?;
    let after_json = serde_json::to_value(&after)
        .map_err(|e| Denial::Pod(format!("injected pod does not serialize: {e}")))?;
    Ok(Outcome::Injected(Box::new(Injection {
        patch: patch::build(&before_json, &after_json),
        pod: after,
        warnings,
        mode,
    })))
}

/// Whether a pod carries a sidecar already: a status annotation (Weft's or Istio's) whose
/// containers are present. A status copied onto a pod without them is stale and ignored.
pub fn is_injected(pod: &Pod) -> bool {
    let Some(status) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::STATUS))
    else {
        return false;
    };
    let Some(spec) = &pod.spec else { return false };
    let present = |n: &str| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == n)
    };
    match SidecarStatus::parse(status) {
        Some(s) => s.container_names().any(present),
        // Unparseable: trust it if a sidecar of either mesh is there.
        None => [sidecar::PROXY_CONTAINER, sidecar::ISTIO_PROXY_CONTAINER]
            .into_iter()
            .any(present),
    }
}

type Mutated = Result<(Pod, Vec<String>, InterceptionMode), Skip>;

fn mutate(pod: &Pod, mesh: &MeshConfig, ctx: &InjectContext) -> Result<Mutated, Denial> {
    match annotations::decision(pod)? {
        Decision::Inject => {}
        Decision::OptedOutByLabel | Decision::OptedOutByAnnotation => {
            return Ok(Err(Skip::OptedOut));
        }
    }
    let Some(spec) = &pod.spec else {
        return Err(Denial::Pod("pod has no spec".to_owned()));
    };
    if spec.host_network == Some(true) {
        return Ok(Err(Skip::HostNetwork));
    }
    if is_injected(pod) {
        return Ok(Err(Skip::AlreadyInjected));
    }
    if let Some(v) = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| sidecar::is_weft_volume(&v.name))
    {
        return Err(Denial::Pod(format!(
            "pod already has a volume named {}, which the injector adds",
            v.name
        )));
    }
    let mut settings = annotations::settings(pod, mesh, ctx.cluster_supports_native_sidecars)?;
    let mut warnings = std::mem::take(&mut settings.warnings);
    let choice = mode::choose(
        settings.init_args.mode,
        spec.node_name.as_deref(),
        ctx.nodes.as_ref(),
    );
    settings.init_args.mode = choice.mode;
    warnings.extend(choice.warning);

    let mut after = pod.clone();
    let spec = after.spec.get_or_insert_with(Default::default);

    // User containers that stand for the injected ones hold overrides.
    let is_proxy = |c: &Container| {
        matches!(
            c.name.as_str(),
            sidecar::PROXY_CONTAINER | sidecar::ISTIO_PROXY_CONTAINER
        )
    };
    let is_init = |c: &Container| {
        matches!(
            c.name.as_str(),
            sidecar::INIT_CONTAINER | sidecar::ISTIO_INIT_CONTAINER
        )
    };
    let mut proxy_overrides = take(&mut spec.containers, is_proxy);
    let mut init_overrides = Vec::new();
    if let Some(inits) = spec.init_containers.as_mut() {
        proxy_overrides.extend(take(inits, is_proxy));
        init_overrides = take(inits, is_init);
    }

    // What the proxy must know about the app.
    let mut app = AppInfo {
        containers: spec.containers.iter().map(|c| c.name.clone()).collect(),
        ports: Vec::new(),
        probes: AppProbes::new(),
    };
    let native_sidecar = |c: &Container| c.restart_policy.as_deref() == Some("Always");
    let app_containers = spec.containers.iter_mut().chain(
        spec.init_containers
            .iter_mut()
            .flatten()
            .filter(|c| native_sidecar(c)),
    );
    for c in app_containers {
        for p in c.ports.iter().flatten() {
            let Ok(port) = u16::try_from(p.container_port) else {
                continue;
            };
            app.ports.push(AppPort {
                name: p.name.clone(),
                container_port: port,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
            });
        }
        if settings.rewrite_probes && settings.status_port != 0 {
            probes::rewrite(c, settings.status_port, &mut app.probes, &mut warnings);
        }
    }

    let placement = if spec.containers.is_empty() {
        // Nothing to wait for: the proxy is the workload (a gateway-like pod).
        Placement::ClassicLast
    } else if settings.native {
        Placement::Native
    } else if settings.hold {
        Placement::ClassicFirst
    } else {
        Placement::ClassicLast
    };
    let mut proxy = sidecar::proxy(mesh, &settings, &app, placement);
    for o in proxy_overrides {
        warnings.extend(sidecar::apply_override(&mut proxy, o));
    }
    let sc = proxy.security_context.as_ref();
    let uid = sc.and_then(|s| s.run_as_user);
    let gid = sc.and_then(|s| s.run_as_group).or(uid);
    if let Some(uid) = uid.and_then(|u| u32::try_from(u).ok()) {
        settings.init_args.proxy_uid = uid;
    }
    if let Some(gid) = gid.and_then(|g| u32::try_from(g).ok()) {
        settings.init_args.proxy_gid = gid;
    }

    let mut added_init = Vec::new();
    let mut added = Vec::new();
    let mut front = Vec::new();
    if settings.init_args.mode == InterceptionMode::None {
        if !init_overrides.is_empty() {
            warnings.push(
                "interception mode NONE: no init container is injected and its overrides were ignored"
                    .to_owned(),
            );
        }
    } else {
        let mut init = sidecar::init(mesh, &settings.init_args);
        for o in init_overrides {
            warnings.extend(sidecar::apply_override(&mut init, o));
        }
        added_init.push(init.name.clone());
        front.push(init);
    }
    match placement {
        Placement::Native => {
            added_init.push(proxy.name.clone());
            front.push(proxy);
        }
        Placement::ClassicFirst => {
            added.push(proxy.name.clone());
            spec.containers.insert(0, proxy);
        }
        Placement::ClassicLast => {
            added.push(proxy.name.clone());
            spec.containers.push(proxy);
        }
    }
    if !front.is_empty() {
        let inits = spec.init_containers.get_or_insert_with(Vec::new);
        inits.splice(0..0, front);
    }

    let mut volumes = sidecar::volumes(mesh);
    volumes.extend(settings.user_volumes.iter().cloned());
    let volume_names = volumes.iter().map(|v| v.name.clone()).collect();
    spec.volumes.get_or_insert_with(Vec::new).extend(volumes);

    // Labels.
    let canonical_name = canonical_name(pod, ctx);
    let canonical_revision = canonical_revision(pod);
    let labels = after.metadata.labels.get_or_insert_with(BTreeMap::new);
    for (k, v) in [
        (LABEL_TLS_MODE, "istio".to_owned()),
        (LABEL_CANONICAL_NAME, canonical_name),
        (LABEL_CANONICAL_REVISION, canonical_revision),
    ] {
        labels.entry(k.to_owned()).or_insert(v);
    }

    // Annotations.
    let anns = after.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let status = SidecarStatus::new(added_init, added, volume_names, &mesh.revision);
    anns.insert(annotations::STATUS.to_owned(), status.to_annotation());
    if let Some(first) = app.containers.first() {
        anns.entry(ANNOTATION_DEFAULT_CONTAINER.to_owned())
            .or_insert_with(|| first.clone());
    }
    if mesh.enable_prometheus_merge && settings.status_port != 0 {
        let scrape = anns.get(ANNOTATION_PROMETHEUS_SCRAPE).map(String::as_str);
        let app_has_own = anns.contains_key(ANNOTATION_PROMETHEUS_PORT)
            || anns.contains_key(ANNOTATION_PROMETHEUS_PATH);
        if scrape.is_some_and(|s| s.eq_ignore_ascii_case("false")) {
            // The user does not want this pod scraped.
        } else if app_has_own {
            // Istio's metrics merge: the proxy scrapes the app's own endpoint and serves both
            // on the status port, so one scrape sees the app and its sidecar.
            match anns
                .get(ANNOTATION_PROMETHEUS_PORT)
                .map(|p| p.parse::<u16>())
            {
                Some(Ok(port)) if port != 0 => {
                    let target = weft_api::bootstrap::AppMetrics {
                        port,
                        path: anns
                            .get(ANNOTATION_PROMETHEUS_PATH)
                            .cloned()
                            .unwrap_or_else(|| "/metrics".to_owned()),
                    };
                    let json = serde_json::to_string(&target).unwrap_or_default();
                    let spec = after.spec.get_or_insert_with(Default::default);
                    if let Some(proxy) = spec
                        .containers
                        .iter_mut()
                        .chain(spec.init_containers.iter_mut().flatten())
                        .find(|c| c.name == sidecar::PROXY_CONTAINER)
                    {
                        proxy.env.get_or_insert_with(Vec::new).push(k8s_openapi::api::core::v1::EnvVar {
                            name: weft_api::bootstrap::ENV_APP_METRICS.to_owned(),
                            value: Some(json),
                            ..Default::default()
                        });
                    }
                    let anns = after.metadata.annotations.get_or_insert_with(BTreeMap::new);
                    anns.insert(ANNOTATION_PROMETHEUS_SCRAPE.to_owned(), "true".to_owned());
                    anns.insert(ANNOTATION_PROMETHEUS_PORT.to_owned(), settings.status_port.to_string());
                    anns.insert(ANNOTATION_PROMETHEUS_PATH.to_owned(), PROMETHEUS_PATH.to_owned());
                }
                _ => warnings.push(format!(
                    "the pod's own prometheus.io annotations were kept (no numeric prometheus.io/port \
                     to merge); the proxy's metrics are on port {} path {PROMETHEUS_PATH}",
                    settings.status_port
                )),
            }
        } else {
            anns.insert(ANNOTATION_PROMETHEUS_SCRAPE.to_owned(), "true".to_owned());
            anns.insert(
                ANNOTATION_PROMETHEUS_PORT.to_owned(),
                settings.status_port.to_string(),
            );
            anns.insert(
                ANNOTATION_PROMETHEUS_PATH.to_owned(),
                PROMETHEUS_PATH.to_owned(),
            );
        }
    }
    Ok(Ok((after, warnings, settings.init_args.mode)))
}

/// Removes and returns the containers matching `pred`, keeping the others in order.
fn take(list: &mut Vec<Container>, pred: impl Fn(&Container) -> bool) -> Vec<Container> {
    let (taken, kept) = std::mem::take(list).into_iter().partition(|c| pred(c));
    *list = kept;
    taken
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Istio's rule: the canonical-name label, else `app.kubernetes.io/name`, else `app`, else the
/// workload's name.
fn canonical_name(pod: &Pod, ctx: &InjectContext) -> String {
    [LABEL_CANONICAL_NAME, "app.kubernetes.io/name", "app"]
        .into_iter()
        .find_map(|k| label(pod, k))
        .map(str::to_owned)
        .or_else(|| ctx.workload_name.clone())
        .unwrap_or_else(|| workload_name(pod))
}

/// Istio's rule: the canonical-revision label, else `app.kubernetes.io/version`, else
/// `version`, else `latest`.
fn canonical_revision(pod: &Pod) -> String {
    [
        LABEL_CANONICAL_REVISION,
        "app.kubernetes.io/version",
        "version",
    ]
    .into_iter()
    .find_map(|k| label(pod, k))
    .unwrap_or("latest")
    .to_owned()
}

/// The owning workload's name guessed from the pod: `hello-5d4f8b7c9-x2x7q` of a Deployment
/// gives `hello`, `web-0` of a StatefulSet gives `web`, a Job's pod its Job.
fn workload_name(pod: &Pod) -> String {
    let m = &pod.metadata;
    let base = m
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            m.generate_name
                .as_ref()
                .map(|g| g.trim_end_matches('-').to_owned())
        })
        .unwrap_or_default();
    if let Some(job) = label(pod, "job-name") {
        return job.to_owned();
    }
    if let Some(hash) = label(pod, "pod-template-hash") {
        let generated = m
            .generate_name
            .as_deref()
            .map(|g| g.trim_end_matches('-'))
            .unwrap_or(&base);
        if let Some(w) = generated.strip_suffix(&format!("-{hash}")) {
            return w.to_owned();
        }
    }
    if label(pod, "statefulset.kubernetes.io/pod-name").is_some()
        && let Some((w, ordinal)) = base.rsplit_once('-')
        && ordinal.chars().all(|c| c.is_ascii_digit())
    {
        return w.to_owned();
    }
    if base.is_empty() {
        "unknown".to_owned()
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).expect("pod yaml")
    }

    #[test]
    fn workload_names() {
        let p = Pod {
            metadata: ObjectMeta {
                generate_name: Some("hello-5d4f8b7c9-".into()),
                labels: Some(BTreeMap::from([(
                    "pod-template-hash".into(),
                    "5d4f8b7c9".into(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(workload_name(&p), "hello");
        let p = Pod {
            metadata: ObjectMeta {
                name: Some("web-3".into()),
                labels: Some(BTreeMap::from([(
                    "statefulset.kubernetes.io/pod-name".into(),
                    "web-3".into(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(workload_name(&p), "web");
    }

    #[test]
    fn opt_out_label_beats_annotation() {
        let p = pod(r#"
metadata:
  name: p
  labels: {sidecar.istio.io/inject: "true"}
  annotations: {sidecar.istio.io/inject: "false"}
spec:
  containers: [{name: app, image: a}]
"#);
        let out = inject(&p, &MeshConfig::default(), &InjectContext::default()).expect("ok");
        assert!(matches!(out, Outcome::Injected(_)));
        let p = pod(r#"
metadata:
  name: p
  labels: {sidecar.istio.io/inject: "false"}
spec:
  containers: [{name: app, image: a}]
"#);
        let out = inject(&p, &MeshConfig::default(), &InjectContext::default()).expect("ok");
        assert!(matches!(out, Outcome::Skip(Skip::OptedOut)));
    }

    #[test]
    fn host_network_and_tproxy() {
        let p = pod("metadata: {name: p}\nspec: {hostNetwork: true, containers: [{name: a}]}");
        let out = inject(&p, &MeshConfig::default(), &InjectContext::default()).expect("ok");
        assert!(matches!(out, Outcome::Skip(Skip::HostNetwork)));
        let p = pod(r#"
metadata:
  name: p
  annotations: {sidecar.istio.io/interceptionMode: TPROXY}
spec:
  containers: [{name: a}]
"#);
        let e = inject(&p, &MeshConfig::default(), &InjectContext::default())
            .expect_err("tproxy denied")
            .to_string();
        assert!(
            e.contains("sidecar.istio.io/interceptionMode") && e.contains("TPROXY"),
            "{e}"
        );
    }

    /// The `--mode=` of the injected `weft-init` and the warnings.
    fn injected_mode(p: &Pod, mesh: &MeshConfig, nodes: Option<NodeView>) -> (String, Vec<String>) {
        let ctx = InjectContext {
            nodes,
            ..InjectContext::default()
        };
        let Outcome::Injected(inj) = inject(p, mesh, &ctx).expect("ok") else {
            panic!("not injected")
        };
        let spec = inj.pod.spec.expect("spec");
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == sidecar::INIT_CONTAINER)
            .expect("weft-init");
        let mode = init
            .args
            .iter()
            .flatten()
            .find_map(|a| a.strip_prefix("--mode="))
            .expect("--mode")
            .to_owned();
        assert_eq!(mode, inj.mode.as_str());
        (mode, inj.warnings)
    }

    #[test]
    fn ebpf_mode_falls_back_to_redirect_where_the_agent_is_not_ready() {
        let ebpf_pod = |node: &str| {
            pod(&format!(
                r#"
metadata:
  name: p
  annotations: {{sidecar.istio.io/interceptionMode: EBPF}}
spec:
  {node}
  containers: [{{name: a}}]
"#
            ))
        };
        let mixed = NodeView::from_labels([("n0", Some("ready")), ("n1", Some("unsupported"))]);
        let ready = NodeView::from_labels([("n0", Some("ready")), ("n1", Some("ready"))]);
        let mesh = MeshConfig::default();

        let (mode, warnings) = injected_mode(&ebpf_pod(""), &mesh, Some(mixed.clone()));
        assert_eq!(mode, "redirect");
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(r#""n1" (weft.dev/ebpf-redirect="unsupported")"#)),
            "{warnings:?}"
        );
        let (mode, warnings) = injected_mode(&ebpf_pod(""), &mesh, Some(ready));
        assert_eq!((mode.as_str(), warnings.len()), ("ebpf", 0), "{warnings:?}");
        // Bound to the ready node already.
        let (mode, warnings) = injected_mode(&ebpf_pod("nodeName: n0"), &mesh, Some(mixed.clone()));
        assert_eq!((mode.as_str(), warnings.len()), ("ebpf", 0), "{warnings:?}");
        // No node information: as asked.
        let (mode, _) = injected_mode(&ebpf_pod(""), &mesh, None);
        assert_eq!(mode, "ebpf");

        // The mesh config's EBPF falls back the same way; a pod's REDIRECT stays as it is.
        let mesh: MeshConfig =
            MeshConfig::from_yaml("interceptionMode: EBPF\n").expect("mesh config");
        let plain = pod("metadata: {name: p}\nspec: {containers: [{name: a}]}");
        let (mode, warnings) = injected_mode(&plain, &mesh, Some(NodeView::default()));
        assert_eq!(mode, "redirect");
        assert!(
            warnings.iter().any(|w| w.contains("not listed")),
            "{warnings:?}"
        );
        let redirect = pod(r#"
metadata:
  name: p
  annotations: {sidecar.istio.io/interceptionMode: REDIRECT}
spec:
  containers: [{name: a}]
"#);
        let (mode, warnings) = injected_mode(&redirect, &mesh, Some(mixed));
        assert_eq!(
            (mode.as_str(), warnings.len()),
            ("redirect", 0),
            "{warnings:?}"
        );
    }

    #[test]
    fn app_metrics_are_merged_on_the_status_port() {
        let p = pod(r#"
metadata:
  name: p
  annotations: {prometheus.io/scrape: "true", prometheus.io/port: "9100", prometheus.io/path: /m}
spec:
  containers: [{name: a}]
"#);
        let Outcome::Injected(inj) =
            inject(&p, &MeshConfig::default(), &InjectContext::default()).expect("ok")
        else {
            panic!("not injected")
        };
        let anns = inj.pod.metadata.annotations.clone().expect("annotations");
        assert_eq!(anns[ANNOTATION_PROMETHEUS_PORT], "15020");
        assert_eq!(anns[ANNOTATION_PROMETHEUS_PATH], PROMETHEUS_PATH);
        let spec = inj.pod.spec.expect("spec");
        let proxy = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .find(|c| c.name == sidecar::PROXY_CONTAINER)
            .expect("proxy");
        let env = proxy
            .env
            .iter()
            .flatten()
            .find(|e| e.name == weft_api::bootstrap::ENV_APP_METRICS)
            .and_then(|e| e.value.clone())
            .expect("app metrics env");
        let target: weft_api::bootstrap::AppMetrics = serde_json::from_str(&env).expect("json");
        assert_eq!((target.port, target.path.as_str()), (9100, "/m"));
    }
}
