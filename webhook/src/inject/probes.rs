//! Probe rewriting: the kubelet's HTTP, TCP and gRPC probes of app containers would be captured
//! by the proxy's inbound listener and, under STRICT mTLS, refused. They become
//! `GET :<status port>/app-health/<container>/<livez|readyz|startupz>`; the originals go to the
//! proxy in the [`AppProbes`] table and it runs them against the app over localhost.

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_api::bootstrap::{AppProbe, AppProbes, GrpcProbe, HttpGetProbe, ProbeHeader, TcpProbe};

/// The status-port path of a rewritten probe.
pub fn app_health_path(container: &str, kind: &str) -> String {
    weft_api::bootstrap::app_health_path(container, kind)
}

/// Rewrites the probes of one app container in place, adding the originals to `table`.
/// Exec probes are left alone; a probe whose named port the container does not declare is left
/// alone with a warning.
pub fn rewrite(
    container: &mut Container,
    status_port: u16,
    table: &mut AppProbes,
    warnings: &mut Vec<String>,
) {
    let name = container.name.clone();
    let ports = container.ports.clone().unwrap_or_default();
    let resolve = |port: &IntOrString| -> Option<u16> {
        match port {
            IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p > 0),
            IntOrString::String(s) => ports
                .iter()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .or_else(|| s.parse::<u16>().ok().filter(|p| *p > 0)),
        }
    };
    for (kind, probe) in [
        ("livez", &mut container.liveness_probe),
        ("readyz", &mut container.readiness_probe),
        ("startupz", &mut container.startup_probe),
    ] {
        let Some(p) = probe.as_mut() else { continue };
        let path = app_health_path(&name, kind);
        if is_rewritten(p, status_port, &path) {
            continue;
        }
        let original = if let Some(h) = &p.http_get {
            resolve(&h.port).map(|port| AppProbe {
                http_get: Some(HttpGetProbe {
                    path: h.path.clone(),
                    port,
                    host: h.host.clone(),
                    scheme: h.scheme.clone(),
                    http_headers: h
                        .http_headers
                        .iter()
                        .flatten()
                        .map(|h| ProbeHeader {
                            name: h.name.clone(),
                            value: h.value.clone(),
                        })
                        .collect(),
                }),
                ..AppProbe::default()
            })
        } else if let Some(t) = &p.tcp_socket {
            resolve(&t.port).map(|port| AppProbe {
                tcp_socket: Some(TcpProbe { port }),
                ..AppProbe::default()
            })
        } else if let Some(g) = &p.grpc {
            resolve(&IntOrString::Int(g.port)).map(|port| AppProbe {
                grpc: Some(GrpcProbe {
                    port,
                    service: g.service.clone(),
                }),
                ..AppProbe::default()
            })
        } else {
            continue;
        };
        let Some(mut original) = original else {
            warnings.push(format!(
                "container {name}: the {kind} probe's port is not a port of the container; \
                 the probe was not rewritten and may fail under STRICT mTLS"
            ));
            continue;
        };
        original.timeout_seconds = p.timeout_seconds.and_then(|t| u32::try_from(t).ok());
        table.insert(path.clone(), original);
        p.exec = None;
        p.tcp_socket = None;
        p.grpc = None;
        p.http_get = Some(HTTPGetAction {
            path: Some(path),
            port: IntOrString::Int(i32::from(status_port)),
            ..HTTPGetAction::default()
        });
    }
}

fn is_rewritten(p: &Probe, status_port: u16, path: &str) -> bool {
    p.http_get.as_ref().is_some_and(|h| {
        h.port == IntOrString::Int(i32::from(status_port)) && h.path.as_deref() == Some(path)
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ContainerPort, GRPCAction, TCPSocketAction};

    use super::*;

    fn probe_http(port: IntOrString) -> Option<Probe> {
        Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port,
                ..Default::default()
            }),
            period_seconds: Some(7),
            timeout_seconds: Some(2),
            ..Default::default()
        })
    }

    #[test]
    fn http_tcp_grpc_exec() {
        let mut c = Container {
            name: "app".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            liveness_probe: probe_http(IntOrString::String("http".into())),
            readiness_probe: Some(Probe {
                tcp_socket: Some(TCPSocketAction {
                    port: IntOrString::Int(9000),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            startup_probe: Some(Probe {
                grpc: Some(GRPCAction {
                    port: 9090,
                    service: Some("svc".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut table = AppProbes::new();
        let mut warnings = Vec::new();
        rewrite(&mut c, 15020, &mut table, &mut warnings);
        assert!(warnings.is_empty());
        let live = c.liveness_probe.as_ref().expect("liveness");
        assert_eq!(live.period_seconds, Some(7));
        let h = live.http_get.as_ref().expect("http");
        assert_eq!(h.path.as_deref(), Some("/app-health/app/livez"));
        assert_eq!(h.port, IntOrString::Int(15020));
        assert!(c.readiness_probe.as_ref().expect("r").tcp_socket.is_none());
        assert_eq!(table.len(), 3);
        let l = &table["/app-health/app/livez"];
        assert_eq!(l.http_get.as_ref().map(|h| h.port), Some(8080));
        assert_eq!(l.timeout_seconds, Some(2));
        assert_eq!(
            table["/app-health/app/readyz"].tcp_socket,
            Some(TcpProbe { port: 9000 })
        );
        assert_eq!(
            table["/app-health/app/startupz"]
                .grpc
                .as_ref()
                .map(|g| g.port),
            Some(9090)
        );
        // Idempotent.
        let before = c.clone();
        rewrite(&mut c, 15020, &mut table, &mut warnings);
        assert_eq!(c, before);
    }

    #[test]
    fn unknown_named_port_is_kept() {
        let mut c = Container {
            name: "app".into(),
            liveness_probe: probe_http(IntOrString::String("nope".into())),
            ..Default::default()
        };
        let before = c.clone();
        let mut warnings = Vec::new();
        rewrite(&mut c, 15020, &mut AppProbes::new(), &mut warnings);
        assert_eq!(c, before);
        assert_eq!(warnings.len(), 1);
    }
}
