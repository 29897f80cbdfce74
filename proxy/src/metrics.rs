//! Prometheus metrics: connections and requests by direction, protocol and outcome.

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Which listener a connection or request came through.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// From the app out (15001).
    Outbound,
    /// Into the pod (15006).
    Inbound,
}

/// The protocol a connection was handled as.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 (including gRPC).
    Http2,
    /// Opaque TCP.
    Tcp,
    /// TLS the app originated, forwarded as bytes.
    Tls,
    /// Not yet known (refused before detection).
    Unknown,
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Served to the end.
    Success,
    /// Failed: upstream unreachable, reset, protocol error.
    Error,
    /// Plaintext refused by STRICT mTLS.
    RefusedPlaintext,
    /// The peer's certificate or identity was rejected.
    RefusedTls,
    /// A connection that would loop back into the proxy.
    RefusedLoop,
    /// A destination the config does not know, under REGISTRY_ONLY.
    RefusedUnknown,
    /// Passed through to a destination the config does not know (ALLOW_ANY).
    Passthrough,
}

macro_rules! label_values {
    ($($ty:ident { $($variant:ident => $text:literal),* $(,)? })*) => {$(
        impl $ty {
            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),* }
            }
        }
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}

label_values! {
    Direction { Outbound => "outbound", Inbound => "inbound" }
    Proto { Http1 => "http1", Http2 => "http2", Tcp => "tcp", Tls => "tls", Unknown => "unknown" }
    Outcome {
        Success => "success",
        Error => "error",
        RefusedPlaintext => "refused_plaintext",
        RefusedTls => "refused_tls",
        RefusedLoop => "refused_loop",
        RefusedUnknown => "refused_unknown_destination",
        Passthrough => "passthrough",
    }
}

/// Labels of `weft_connections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// Direction.
    pub direction: Direction,
    /// Protocol.
    pub protocol: Proto,
    /// Outcome.
    pub outcome: Outcome,
    /// True when the connection was mesh mTLS on the peer side.
    pub mtls: bool,
}

/// Labels of `weft_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Direction.
    pub direction: Direction,
    /// Protocol of the client side.
    pub protocol: Proto,
    /// HTTP status code returned to the client.
    pub code: u16,
    /// True when the mesh hop was mTLS.
    pub mtls: bool,
}

/// Labels that only carry a direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// Direction.
    pub direction: Direction,
}

/// Labels of `weft_config_updates_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateLabels {
    /// `accepted` or `rejected`.
    pub outcome: &'static str,
}

/// Labels of per-cluster traffic-management counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterEventLabels {
    /// Cluster name (bounded by the config).
    pub cluster: String,
    /// What happened (a fixed set per metric).
    pub kind: &'static str,
}

/// Labels of counters that only carry a fixed kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// What happened.
    pub kind: &'static str,
}

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connections by direction, protocol and outcome.
    pub connections: Family<ConnectionLabels, Counter>,
    /// Connections open now.
    pub connections_active: Family<DirectionLabels, Gauge>,
    /// HTTP requests by direction, protocol and response code.
    pub requests: Family<RequestLabels, Counter>,
    /// HTTP request duration, seconds, until response headers.
    pub request_duration: Family<DirectionLabels, Histogram>,
    /// Bytes received from the client side of opaque TCP connections.
    pub tcp_received_bytes: Family<DirectionLabels, Counter>,
    /// Bytes sent to the client side of opaque TCP connections.
    pub tcp_sent_bytes: Family<DirectionLabels, Counter>,
    /// Config snapshots accepted or rejected.
    pub config_updates: Family<UpdateLabels, Counter>,
    /// Requests and connections refused by circuit breakers, by cluster and limit.
    pub upstream_overflow: Family<ClusterEventLabels, Counter>,
    /// Retries by cluster and outcome (`retried`, `success`, `budget_exhausted`,
    /// `attempts_exhausted`).
    pub upstream_retries: Family<ClusterEventLabels, Counter>,
    /// Outlier ejections by cluster (`kind` is `ejected`).
    pub outlier_ejections: Family<ClusterEventLabels, Counter>,
    /// Shadow requests by outcome (`sent`, `failed`, `skipped_body`, `skipped_overflow`).
    pub mirror_requests: Family<KindLabels, Counter>,
    /// Injected faults by kind (`delay`, `abort`).
    pub faults: Family<KindLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `weft` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft");
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections handled, by direction, protocol and outcome",
            connections.clone(),
        );
        let connections_active = Family::<DirectionLabels, Gauge>::default();
        registry.register(
            "connections_active",
            "Connections open now",
            connections_active.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests, by direction, protocol and response code",
            requests.clone(),
        );
        let request_duration = Family::<DirectionLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers",
            request_duration.clone(),
        );
        let tcp_received_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "tcp_received_bytes",
            "Bytes received from the client of opaque TCP connections",
            tcp_received_bytes.clone(),
        );
        let tcp_sent_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "tcp_sent_bytes",
            "Bytes sent to the client of opaque TCP connections",
            tcp_sent_bytes.clone(),
        );
        let config_updates = Family::<UpdateLabels, Counter>::default();
        registry.register(
            "config_updates",
            "Config snapshots accepted or rejected",
            config_updates.clone(),
        );
        let upstream_overflow = Family::<ClusterEventLabels, Counter>::default();
        registry.register(
            "upstream_overflow",
            "Requests and connections refused by a cluster's circuit breaker, by limit",
            upstream_overflow.clone(),
        );
        let upstream_retries = Family::<ClusterEventLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Retries to a cluster, by outcome",
            upstream_retries.clone(),
        );
        let outlier_ejections = Family::<ClusterEventLabels, Counter>::default();
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            outlier_ejections.clone(),
        );
        let mirror_requests = Family::<KindLabels, Counter>::default();
        registry.register(
            "mirror_requests",
            "Shadow requests, by outcome",
            mirror_requests.clone(),
        );
        let faults = Family::<KindLabels, Counter>::default();
        registry.register("faults", "Injected faults, by kind", faults.clone());
        Self {
            registry,
            upstream_overflow,
            upstream_retries,
            outlier_ejections,
            mirror_requests,
            faults,
            connections,
            connections_active,
            requests,
            request_duration,
            tcp_received_bytes,
            tcp_sent_bytes,
            config_updates,
        }
    }

    /// Counts one finished connection.
    pub fn connection(&self, direction: Direction, protocol: Proto, outcome: Outcome, mtls: bool) {
        self.connections
            .get_or_create(&ConnectionLabels {
                direction,
                protocol,
                outcome,
                mtls,
            })
            .inc();
    }

    /// Counts one event of a cluster in `family`.
    pub fn cluster_event(
        family: &Family<ClusterEventLabels, Counter>,
        cluster: &str,
        kind: &'static str,
    ) {
        family
            .get_or_create(&ClusterEventLabels {
                cluster: cluster.to_owned(),
                kind,
            })
            .inc();
    }

    /// Counts one event of a fixed kind in `family`.
    pub fn kind_event(family: &Family<KindLabels, Counter>, kind: &'static str) {
        family.get_or_create(&KindLabels { kind }).inc();
    }

    /// Tracks an open connection until the guard drops.
    pub fn open(&self, direction: Direction) -> ActiveGuard {
        let gauge = self
            .connections_active
            .get_or_create_owned(&DirectionLabels { direction });
        gauge.inc();
        ActiveGuard(gauge)
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Decrements the active-connections gauge on drop.
#[derive(Debug)]
pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_counters_with_labels() {
        let m = Metrics::new();
        m.connection(
            Direction::Inbound,
            Proto::Tcp,
            Outcome::RefusedPlaintext,
            false,
        );
        {
            let _g = m.open(Direction::Outbound);
            assert!(
                m.encode()
                    .contains("weft_connections_active{direction=\"outbound\"} 1")
            );
        }
        let text = m.encode();
        assert!(
            text.contains(
                "weft_connections_total{direction=\"inbound\",protocol=\"tcp\",outcome=\"refused_plaintext\",mtls=\"false\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("weft_connections_active{direction=\"outbound\"} 0"));
    }

    #[test]
    fn traffic_management_counters() {
        let m = Metrics::new();
        Metrics::cluster_event(&m.upstream_overflow, "outbound|80||b", "pending");
        Metrics::cluster_event(&m.upstream_retries, "outbound|80||b", "retried");
        Metrics::kind_event(&m.mirror_requests, "sent");
        let text = m.encode();
        assert!(
            text.contains(
                "weft_upstream_overflow_total{cluster=\"outbound|80||b\",kind=\"pending\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("weft_mirror_requests_total{kind=\"sent\"} 1"),
            "{text}"
        );
    }
}
