//! Objects the tests, the demo and the benchmarks build pods from.

use std::collections::BTreeMap;

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HTTPGetAction, Pod, PodSpec, Probe, SecurityContext, Service,
    ServicePort, ServiceSpec, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// A Service `name` in `namespace` selecting `app=<name>`, with `(port, port name)` pairs
/// (the port name declares the protocol, Istio style: `http`, `grpc`, `tcp-echo`, …).
pub fn service(namespace: &str, name: &str, ports: &[(u16, &str)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some([("app".to_string(), name.to_string())].into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(port, pname)| ServicePort {
                        name: Some((*pname).into()),
                        port: i32::from(*port),
                        target_port: Some(IntOrString::Int(i32::from(*port))),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod running `weft-sample-app serve <serve_args>` as its only container (uid 1000), in
/// service account `sa`, labelled `app=<app>`. The first `--http` port, if any, gets a
/// readiness probe on `/healthz`.
pub fn app_pod(namespace: &str, name: &str, app: &str, sa: &str, serve_args: &[&str]) -> Pod {
    let mut args: Vec<String> = vec!["serve".into()];
    args.extend(serve_args.iter().map(|s| s.to_string()));
    let http_port = serve_args
        .windows(2)
        .find(|w| w[0] == "--http")
        .and_then(|w| w[1].parse::<i32>().ok());
    let ports: Vec<i32> = serve_args
        .windows(2)
        .filter(|w| w[0].starts_with("--"))
        .filter_map(|w| w[1].parse::<i32>().ok())
        .collect();
    let readiness = match http_port {
        Some(port) => Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::Int(port),
                ..Default::default()
            }),
            period_seconds: Some(1),
            ..Default::default()
        },
        None => Probe {
            tcp_socket: ports.first().map(|p| TCPSocketAction {
                port: IntOrString::Int(*p),
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some([("app".to_string(), app.to_string())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(sa.into()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("ghcr.io/weft-mesh/sample-app:dev".into()),
                command: Some(vec!["weft-sample-app".into()]),
                args: Some(args),
                ports: Some(
                    ports
                        .iter()
                        .map(|p| ContainerPort {
                            container_port: *p,
                            ..Default::default()
                        })
                        .collect(),
                ),
                readiness_probe: (!ports.is_empty()).then_some(readiness),
                env: Some(vec![k8s_openapi::api::core::v1::EnvVar {
                    name: "POD_NAME".into(),
                    value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
                        field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                            field_path: "metadata.name".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                security_context: Some(SecurityContext {
                    run_as_user: Some(1000),
                    run_as_group: Some(1000),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// [`app_pod`] with a `version` label (subsets: v1, v2, …); the pod serves HTTP on 8080.
pub fn versioned_pod(namespace: &str, name: &str, app: &str, version: &str, sa: &str) -> Pod {
    let mut pod = app_pod(namespace, name, app, sa, &["--http", "8080"]);
    pod.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("version".into(), version.into());
    pod
}

/// A client-only pod (`sleep`-like): the sample app serving a health port only.
pub fn client_pod(namespace: &str, name: &str, sa: &str) -> Pod {
    app_pod(namespace, name, name, sa, &["--http", "8081"])
}

/// Asks for injection (the pod label `sidecar.istio.io/inject: "true"`): the node sends the
/// pod through the injection webhook, which adds `weft-init` and `weft-proxy`.
pub fn meshed(mut pod: Pod) -> Pod {
    pod.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("sidecar.istio.io/inject".into(), "true".into());
    pod
}

/// The pods a Deployment's ReplicaSet would create: `<name>-<n>` from the template.
pub fn pods_of(d: &Deployment) -> anyhow::Result<Vec<Pod>> {
    let name = d.metadata.name.clone().context("Deployment has no name")?;
    let spec = &d.spec;
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let template = &spec.template;
    (0..replicas)
        .map(|i| {
            let mut meta = template.metadata.clone().unwrap_or_default();
            meta.name = Some(format!("{name}-{i}"));
            meta.namespace = d.metadata.namespace.clone();
            Ok(Pod {
                metadata: meta,
                spec: Some(
                    template
                        .spec
                        .clone()
                        .context("Deployment template has no spec")?,
                ),
                status: None,
            })
        })
        .collect()
}
