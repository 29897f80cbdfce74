//! The injected containers and volumes, built as `k8s_openapi` values.

use std::path::Path;

use k8s_openapi::DeepMerge;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler,
    ObjectFieldSelector, Probe, ProjectedVolumeSource, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_api::bootstrap::{
    self as boot, AppPort, AppProbes, DEFAULT_CREDENTIALS_DIR, DEFAULT_ROOT_CERT_PATH,
    DEFAULT_TOKEN_PATH, PORT_PROMETHEUS, PORT_READINESS, PROXY_UID,
};
use weft_api::redirect::InitArgs;

use super::annotations::PodSettings;
use crate::mesh::MeshConfig;

/// Name of the injected sidecar.
pub const PROXY_CONTAINER: &str = "weft-proxy";
/// Name of the injected init container.
pub const INIT_CONTAINER: &str = "weft-init";
/// Istio's sidecar name: a user container of that name holds overrides for the proxy.
pub const ISTIO_PROXY_CONTAINER: &str = "istio-proxy";
/// Istio's init container name: a user container of that name holds overrides for `weft-init`.
pub const ISTIO_INIT_CONTAINER: &str = "istio-init";
/// Projected service-account token presented to the CA.
pub const TOKEN_VOLUME: &str = "weft-token";
/// Mesh root certificate (ConfigMap).
pub const ROOT_CERT_VOLUME: &str = "weft-root-cert";
/// In-memory directory for the proxy's key and certificate.
pub const CREDENTIALS_VOLUME: &str = "weft-credentials";
/// Path of the readiness endpoint on [`PORT_READINESS`].
pub const READY_PATH: &str = weft_api::bootstrap::PATH_READY;

/// Whether a volume name is one the injector adds.
pub fn is_weft_volume(name: &str) -> bool {
    matches!(name, TOKEN_VOLUME | ROOT_CERT_VOLUME | CREDENTIALS_VOLUME)
}

fn dir_of(path: &str) -> String {
    Path::new(path)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "/".to_owned())
}

fn file_of(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The three volumes every injected pod gets.
pub fn volumes(mesh: &MeshConfig) -> Vec<Volume> {
    vec![
        Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(mesh.ca_audience.clone()),
                        expiration_seconds: Some(mesh.token_expiration_seconds),
                        path: file_of(DEFAULT_TOKEN_PATH),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: ROOT_CERT_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: mesh.root_cert_config_map.clone(),
                items: Some(vec![KeyToPath {
                    key: file_of(DEFAULT_ROOT_CERT_PATH),
                    path: file_of(DEFAULT_ROOT_CERT_PATH),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: CREDENTIALS_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ready_probe(period: i32, failure: i32, initial_delay: Option<i32>) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(READY_PATH.to_owned()),
            port: IntOrString::Int(i32::from(PORT_READINESS)),
            ..Default::default()
        }),
        initial_delay_seconds: initial_delay,
        period_seconds: Some(period),
        failure_threshold: Some(failure),
        timeout_seconds: Some(3),
        ..Default::default()
    }
}

/// What the proxy is told about the app.
#[derive(Debug, Clone, Default)]
pub struct AppInfo {
    /// Names of the app containers.
    pub containers: Vec<String>,
    /// Their ports.
    pub ports: Vec<AppPort>,
    /// The rewritten-probe table.
    pub probes: AppProbes,
}

/// Where the proxy goes and how it is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// An init container with `restartPolicy: Always`, right after `weft-init`.
    Native,
    /// The first regular container, with a postStart hook that waits until it is ready.
    ClassicFirst,
    /// The last regular container, started alongside the app.
    ClassicLast,
}

/// Builds the `weft-proxy` container.
pub fn proxy(
    mesh: &MeshConfig,
    settings: &PodSettings,
    app: &AppInfo,
    placement: Placement,
) -> Container {
    let mut envs = vec![
        field_env(boot::ENV_POD_NAME, "metadata.name"),
        field_env(boot::ENV_POD_NAMESPACE, "metadata.namespace"),
        field_env(boot::ENV_INSTANCE_IP, "status.podIP"),
        field_env(boot::ENV_SERVICE_ACCOUNT, "spec.serviceAccountName"),
        field_env(boot::ENV_NODE_NAME, "spec.nodeName"),
        env(boot::ENV_CONTROL_PLANE, settings.control_plane.clone()),
        env(boot::ENV_TRUST_DOMAIN, mesh.trust_domain.clone()),
        env(boot::ENV_TOKEN_PATH, DEFAULT_TOKEN_PATH),
        env(boot::ENV_ROOT_CERT_PATH, DEFAULT_ROOT_CERT_PATH),
        env(boot::ENV_CREDENTIALS_DIR, DEFAULT_CREDENTIALS_DIR),
        env(boot::ENV_STATUS_PORT, settings.status_port.to_string()),
        env(
            boot::ENV_DRAIN_DURATION,
            humantime::format_duration(settings.drain).to_string(),
        ),
        env(boot::ENV_LOG_LEVEL, settings.log_level.clone()),
    ];
    if let Some(n) = settings.concurrency {
        envs.push(env(boot::ENV_CONCURRENCY, n.to_string()));
    }
    envs.push(env(boot::ENV_APP_CONTAINERS, app.containers.join(",")));
    envs.push(env(
        boot::ENV_APP_PORTS,
        serde_json::to_string(&app.ports).expect("app ports always serialize"),
    ));
    if !app.probes.is_empty() {
        envs.push(env(
            boot::ENV_APP_PROBES,
            serde_json::to_string(&app.probes).expect("app probes always serialize"),
        ));
    }
    for (name, value) in &settings.proxy_env {
        // The injector's own variables win over proxyMetadata.
        if !envs.iter().any(|e| &e.name == name) {
            envs.push(env(name, value.clone()));
        }
    }

    let mut mounts = vec![
        VolumeMount {
            name: TOKEN_VOLUME.to_owned(),
            mount_path: dir_of(DEFAULT_TOKEN_PATH),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: ROOT_CERT_VOLUME.to_owned(),
            mount_path: dir_of(DEFAULT_ROOT_CERT_PATH),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: CREDENTIALS_VOLUME.to_owned(),
            mount_path: DEFAULT_CREDENTIALS_DIR.to_owned(),
            ..Default::default()
        },
    ];
    mounts.extend(settings.user_volume_mounts.iter().cloned());

    let uid = i64::from(PROXY_UID);
    let (initial_delay, period, failure) = settings.readiness;
    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: mesh.image_pull_policy.clone(),
        command: Some(vec!["weft-proxy".to_owned()]),
        env: Some(envs),
        ports: Some(vec![ContainerPort {
            name: Some("http-envoy-prom".to_owned()),
            container_port: i32::from(PORT_PROMETHEUS),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        readiness_probe: Some(ready_probe(period, failure, initial_delay)),
        startup_probe: Some(ready_probe(1, 600, None)),
        lifecycle: (placement == Placement::ClassicFirst).then(|| Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "weft-proxy".to_owned(),
                        weft_api::bootstrap::PROXY_WAIT_SUBCOMMAND.to_owned(),
                        format!(
                            "--timeout={}",
                            humantime::format_duration(mesh.proxy_ready_timeout)
                        ),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: Some(settings.resources.clone()),
        restart_policy: (placement == Placement::Native).then(|| "Always".to_owned()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_group: Some(uid),
            run_as_non_root: Some(true),
            run_as_user: Some(uid),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// Builds the `weft-init` container: `weft-redirector init` with the pod's arguments.
pub fn init(mesh: &MeshConfig, args: &InitArgs) -> Container {
    let mut argv = vec!["init".to_owned()];
    argv.extend(args.to_args());
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(mesh.init_image.clone()),
        image_pull_policy: mesh.image_pull_policy.clone(),
        command: Some(vec!["weft-redirector".to_owned()]),
        args: Some(argv),
        resources: Some(mesh.init_resources.clone()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            privileged: Some(false),
            read_only_root_filesystem: Some(false),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            run_as_user: Some(0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Merges a user-supplied container of the same role (`weft-proxy` / `istio-proxy`,
/// `weft-init` / `istio-init`) over the injected one, field by field with Kubernetes' merge
/// rules (lists of env, ports and mounts merged by key, maps by key, the rest replaced).
///
/// An `istio-*` container's image, command and args are for Istio's binaries and are dropped;
/// so is `image: auto`. Returns a warning when something was dropped.
pub fn apply_override(injected: &mut Container, mut user: Container) -> Option<String> {
    let from_istio = user.name.starts_with("istio-");
    let mut dropped = Vec::new();
    if user.image.as_deref() == Some("auto") {
        user.image = None;
    }
    if from_istio {
        for (what, present) in [
            ("image", user.image.take().is_some()),
            ("command", user.command.take().is_some()),
            ("args", user.args.take().is_some()),
        ] {
            if present {
                dropped.push(what);
            }
        }
    }
    let original_name = std::mem::replace(&mut user.name, injected.name.clone());
    injected.merge_from(user);
    (!dropped.is_empty()).then(|| {
        format!(
            "container {original_name}: {} are for Istio's images and were ignored; \
             its other fields were applied to {}",
            dropped.join(", "),
            injected.name
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;

    #[test]
    fn override_merges() {
        let mesh = MeshConfig::default();
        let settings = super::super::annotations::settings(
            &k8s_openapi::api::core::v1::Pod::default(),
            &mesh,
            None,
        )
        .expect("settings");
        let mut p = proxy(&mesh, &settings, &AppInfo::default(), Placement::Native);
        let user = Container {
            name: ISTIO_PROXY_CONTAINER.into(),
            image: Some("auto".into()),
            args: Some(vec!["proxy".into()]),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([("cpu".into(), Quantity("123m".into()))])),
                ..Default::default()
            }),
            security_context: Some(SecurityContext {
                run_as_user: Some(1234),
                ..Default::default()
            }),
            tty: Some(true),
            ..Default::default()
        };
        let warning = apply_override(&mut p, user).expect("args dropped");
        assert!(warning.contains("args"), "{warning}");
        assert_eq!(p.name, PROXY_CONTAINER);
        assert_eq!(p.image.as_deref(), Some(mesh.proxy_image.as_str()));
        assert_eq!(p.args, None);
        assert_eq!(p.tty, Some(true));
        let res = p.resources.expect("resources");
        let req = res.requests.expect("requests");
        assert_eq!(req["cpu"].0, "123m");
        assert_eq!(req["memory"].0, "128Mi");
        let sc = p.security_context.expect("sc");
        assert_eq!(sc.run_as_user, Some(1234));
        assert_eq!(sc.run_as_group, Some(1337));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
    }
}
