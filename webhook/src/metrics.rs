//! The control plane's Prometheus metrics (`GET /metrics` on the webhook port and on the
//! control-plane port).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Why the CA refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `token`, `identity`, `csr`, `unavailable`.
    pub reason: String,
}

/// Which kind of config object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConfigKindLabels {
    /// The store's name of the kind, `group/Kind` (`networking.istio.io/VirtualService`):
    /// the group tells Istio's `Gateway` from the Gateway API's.
    pub kind: String,
}

/// Every metric.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Snapshots sent.
    pub pushes: Counter,
    /// Snapshots acknowledged.
    pub acks: Counter,
    /// Snapshots refused by proxies.
    pub nacks: Counter,
    /// From the config change to the proxy's ack, seconds.
    pub push_ack_seconds: Histogram,
    /// Translation time of one proxy's snapshot, seconds.
    pub translate_seconds: Histogram,
    /// Proxies with an open stream.
    pub connected_proxies: Gauge,
    /// Workload certificates signed.
    pub ca_signed: Counter,
    /// Certificate requests refused.
    pub ca_refused: Family<RefusalLabels, Counter>,
    /// Config objects the validator rejects, held back from proxies now (see
    /// [`crate::source::screen`]).
    pub config_rejected: Family<ConfigKindLabels, Gauge>,
    /// Rejected versions of config objects seen (each one logged once).
    pub config_rejections: Family<ConfigKindLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weft");
        let pushes = Counter::default();
        let acks = Counter::default();
        let nacks = Counter::default();
        let push_ack_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let translate_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let connected_proxies = Gauge::default();
        let ca_signed = Counter::default();
        let ca_refused = Family::<RefusalLabels, Counter>::default();
        let config_rejected = Family::<ConfigKindLabels, Gauge>::default();
        let config_rejections = Family::<ConfigKindLabels, Counter>::default();
        registry.register("pushes", "Snapshots sent to proxies", pushes.clone());
        registry.register(
            "push_acks",
            "Snapshots acknowledged by proxies",
            acks.clone(),
        );
        registry.register("push_nacks", "Snapshots refused by proxies", nacks.clone());
        registry.register(
            "push_ack_seconds",
            "Time from a config change to a proxy's acknowledgement",
            push_ack_seconds.clone(),
        );
        registry.register(
            "translate_seconds",
            "Time to compute one proxy's snapshot",
            translate_seconds.clone(),
        );
        registry.register(
            "connected_proxies",
            "Proxies with an open config stream",
            connected_proxies.clone(),
        );
        registry.register(
            "ca_signed",
            "Workload certificates signed",
            ca_signed.clone(),
        );
        registry.register(
            "ca_refused",
            "Certificate requests refused",
            ca_refused.clone(),
        );
        registry.register(
            "config_rejected",
            "Config objects held back because the validator rejects them (their last good version, if any, stays in force)",
            config_rejected.clone(),
        );
        registry.register(
            "config_rejections",
            "Rejected versions of config objects seen",
            config_rejections.clone(),
        );
        Self {
            registry,
            pushes,
            acks,
            nacks,
            push_ack_seconds,
            translate_seconds,
            connected_proxies,
            ca_signed,
            ca_refused,
            config_rejected,
            config_rejections,
        }
    }
}

impl Metrics {
    /// Counts a refusal.
    pub fn refused(&self, reason: &str) {
        self.ca_refused
            .get_or_create(&RefusalLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
