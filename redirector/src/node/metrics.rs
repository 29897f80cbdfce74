//! `/healthz` and `/metrics` (Prometheus text) of the node agent.
//!
//! Metrics are read from the kernel at each scrape: the programs' per-CPU counters summed
//! (`weft_redirector_ebpf_events_total{event}`), the entries of each map
//! (`weft_redirector_map_entries{map}`, counted by iterating the map), and the pods taken or
//! waiting (`weft_redirector_pods`, `weft_redirector_pods_skipped`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use weft_ebpf_maps::Counter;

use super::sync::Agent;

/// The agent, shared by the sync loop and the HTTP handlers.
pub type SharedAgent = Arc<Mutex<Option<Agent>>>;

/// What `/healthz` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Programs attached, pods being synced.
    Ready,
    /// Still starting.
    Starting,
    /// The kernel lacks a hook: the node cannot do eBPF mode (pods use iptables mode).
    Unsupported(String),
}

/// State of the HTTP handlers.
#[derive(Clone)]
struct Http {
    registry: Arc<Registry>,
    health: Arc<Mutex<Health>>,
}

#[derive(Debug)]
struct AgentCollector(SharedAgent);

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(agent) = guard.as_ref() else {
            return Ok(());
        };
        let counters = agent.maps().counters();
        let sizes = agent.maps().sizes();
        let (pods, skipped) = (agent.last.pods, agent.last.skipped.len());
        drop(guard);

        let mut family = encoder.encode_descriptor(
            "ebpf_events",
            "Events counted by the eBPF programs (summed over CPUs)",
            None,
            MetricType::Counter,
        )?;
        for (c, v) in Counter::ALL.iter().zip(counters) {
            let labels = [("event", c.name())];
            ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "map_entries",
            "Entries in each eBPF map",
            None,
            MetricType::Gauge,
        )?;
        for (name, n) in sizes {
            let labels = [("map", name)];
            ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
        }
        let gauge = |encoder: &mut DescriptorEncoder, name, help, v: usize| {
            ConstGauge::new(v as i64).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)
        };
        gauge(
            &mut encoder,
            "pods",
            "Meshed pods whose traffic the agent redirects",
            pods,
        )?;
        gauge(
            &mut encoder,
            "pods_skipped",
            "Meshed pods the agent could not take yet (network namespace missing …)",
            skipped,
        )?;
        Ok(())
    }
}

/// The registry of the agent's metrics.
pub fn registry(agent: SharedAgent) -> Registry {
    let mut registry = Registry::with_prefix("weft_redirector");
    registry.register_collector(Box::new(AgentCollector(agent)));
    registry
}

/// Serves `/healthz` and `/metrics` on `listener` until the process exits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    health: Arc<Mutex<Health>>,
) -> std::io::Result<()> {
    let state = Http {
        registry: Arc::new(registry),
        health,
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app).await
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn healthz(State(s): State<Http>) -> impl IntoResponse {
    let health = s.health.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match health {
        Health::Ready => (StatusCode::OK, "ok\n".to_owned()),
        Health::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned()),
        // The agent is healthy; the node just cannot do eBPF mode, which pods must know.
        Health::Unsupported(why) => (StatusCode::OK, format!("unsupported: {why}\n")),
    }
}

async fn metrics(State(s): State<Http>) -> impl IntoResponse {
    let registry = s.registry.clone();
    // Counting map entries iterates the maps: off the async threads.
    let text = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).map(|()| out)
    })
    .await;
    match text {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
