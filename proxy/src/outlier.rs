//! Outlier detection (DestinationRule `outlierDetection`): per-endpoint counters of
//! consecutive 5xx and gateway errors, fed by every response and connect failure, eject an
//! endpoint for `baseEjectionTime × n`, n being how many times it was ejected (the count
//! decays by one for every `interval` it then stays healthy, as Envoy's multiplier does).
//! At most `maxEjectionPercent` of a cluster is ejected at once, but always at least one
//! endpoint may be (Envoy's rule); below `minHealthPercent` healthy endpoints the balancer
//! ignores ejections altogether (Envoy's panic threshold).
//!
//! Time is read from `tokio::time::Instant`, so tests drive it with `tokio::time::pause`.
//! Ejections end lazily: an endpoint is ejected while `now < ejected_until`, which needs no
//! timer task; Envoy un-ejects at the next interval tick instead, up to one interval later.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;
use weft_api::config as model;

/// Envoy's default `max_ejection_time`.
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// A compiled outlier detection policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierPolicy {
    consecutive_5xx: Option<u32>,
    consecutive_gateway: Option<u32>,
    interval: Duration,
    base_ejection: Duration,
    max_ejection_percent: u32,
    /// Below this share of available endpoints, ejections are ignored.
    pub min_health_percent: u32,
}

impl OutlierPolicy {
    /// Compiles a policy; `None` when it can never eject.
    pub fn compile(o: &model::OutlierDetection) -> Option<OutlierPolicy> {
        let p = OutlierPolicy {
            consecutive_5xx: o.consecutive_5xx_errors.filter(|n| *n > 0),
            consecutive_gateway: o.consecutive_gateway_errors.filter(|n| *n > 0),
            interval: Duration::from_millis(o.interval_ms.max(1)),
            base_ejection: Duration::from_millis(o.base_ejection_time_ms.max(1)),
            max_ejection_percent: o.max_ejection_percent.min(100),
            min_health_percent: o.min_health_percent.min(100),
        };
        (p.consecutive_5xx.is_some() || p.consecutive_gateway.is_some()).then_some(p)
    }

    /// How long the `n`-th ejection lasts.
    pub fn ejection_time(&self, n: u32) -> Duration {
        (self.base_ejection * n.max(1)).min(MAX_EJECTION_TIME.max(self.base_ejection))
    }

    /// True when one more ejection is allowed with `ejected` of `total` endpoints out.
    pub fn may_eject(&self, ejected: usize, total: usize) -> bool {
        ejected == 0 || (ejected + 1) * 100 <= total * self.max_ejection_percent as usize
    }
}

/// What a try told about an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// A response with this status.
    Status(StatusCode),
    /// Connect failure, reset or timeout: counts as a gateway error.
    LocalFailure,
}

#[derive(Debug, Default)]
struct Ejections {
    count: u32,
    until: Option<Instant>,
}

/// One endpoint's outlier state, shared across config versions.
#[derive(Debug)]
pub struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Nanoseconds after `base` until which the endpoint is ejected; 0: not ejected.
    ejected_until: AtomicU64,
    base: Instant,
    ejections: Mutex<Ejections>,
}

impl Default for OutlierState {
    fn default() -> Self {
        Self::new()
    }
}

impl OutlierState {
    /// A healthy endpoint.
    pub fn new() -> Self {
        OutlierState {
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            base: Instant::now(),
            ejections: Mutex::new(Ejections::default()),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// True while ejected.
    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        until != 0 && self.nanos(now) < until
    }

    /// Counts one observation; true when a threshold is reached and the endpoint should be
    /// ejected (if the cluster allows it).
    pub fn observe(&self, obs: Observation, policy: &OutlierPolicy) -> bool {
        let (is_5xx, is_gateway) = match obs {
            Observation::LocalFailure => (true, true),
            Observation::Status(s) => (s.is_server_error(), matches!(s.as_u16(), 502..=504)),
        };
        let bump = |c: &AtomicU32, hit: bool| {
            if hit {
                c.fetch_add(1, Ordering::AcqRel) + 1
            } else {
                c.store(0, Ordering::Release);
                0
            }
        };
        let n5 = bump(&self.consecutive_5xx, is_5xx);
        let ng = bump(&self.consecutive_gateway, is_gateway);
        policy.consecutive_5xx.is_some_and(|t| n5 >= t)
            || policy.consecutive_gateway.is_some_and(|t| ng >= t)
    }

    /// Ejects the endpoint now; returns how long.
    pub fn eject(&self, now: Instant, policy: &OutlierPolicy) -> Duration {
        let mut e = self.ejections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = e.until
            && now >= until
        {
            let healthy = now.duration_since(until);
            let decayed = healthy.as_nanos() / policy.interval.as_nanos().max(1);
            e.count = e
                .count
                .saturating_sub(u32::try_from(decayed).unwrap_or(u32::MAX));
        }
        e.count = e.count.saturating_add(1);
        let time = policy.ejection_time(e.count);
        let until = now + time;
        e.until = Some(until);
        self.ejected_until
            .store(self.nanos(until).max(1), Ordering::Release);
        self.consecutive_5xx.store(0, Ordering::Release);
        self.consecutive_gateway.store(0, Ordering::Release);
        time
    }

    /// How many times the endpoint was ejected (after decay at its last ejection).
    pub fn ejection_count(&self) -> u32 {
        self.ejections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> OutlierPolicy {
        OutlierPolicy::compile(&crate::route::test_yaml(yaml).expect("yaml")).expect("policy")
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_grows_with_each_ejection_and_ends_on_time() {
        let p = policy("{consecutive5xxErrors: 3, intervalMs: 10000, baseEjectionTimeMs: 30000}");
        let s = OutlierState::new();
        let ok = Observation::Status(StatusCode::OK);
        let err = Observation::Status(StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!s.observe(err, &p));
        assert!(!s.observe(err, &p));
        assert!(!s.observe(ok, &p), "a success resets the count");
        assert!(!s.observe(err, &p) && !s.observe(err, &p));
        assert!(s.observe(err, &p), "third consecutive 5xx");
        let t0 = Instant::now();
        assert_eq!(s.eject(t0, &p), Duration::from_secs(30));
        assert!(s.is_ejected(Instant::now()));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(s.is_ejected(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!s.is_ejected(Instant::now()), "back after baseEjectionTime");
        // Ejected again at once: twice as long.
        assert_eq!(s.eject(Instant::now(), &p), Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!s.is_ejected(Instant::now()));
        // Healthy for two intervals: the multiplier decays from 2 to 0, so the next is 1×.
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(s.eject(Instant::now(), &p), Duration::from_secs(30));
        assert_eq!(s.ejection_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_errors_and_local_failures() {
        let p = policy("{consecutiveGatewayErrors: 2}");
        let s = OutlierState::new();
        assert!(!s.observe(Observation::Status(StatusCode::INTERNAL_SERVER_ERROR), &p));
        assert!(!s.observe(Observation::Status(StatusCode::BAD_GATEWAY), &p));
        assert!(s.observe(Observation::LocalFailure, &p));
        assert!(OutlierPolicy::compile(&crate::route::test_yaml("{}").expect("yaml")).is_none());
    }

    #[test]
    fn max_ejection_percent_allows_at_least_one() {
        let p = policy("{consecutive5xxErrors: 1, maxEjectionPercent: 10}");
        assert!(p.may_eject(0, 3), "one always");
        assert!(!p.may_eject(1, 3));
        assert!(p.may_eject(1, 20), "2 of 20 is 10%");
        assert!(!p.may_eject(2, 20));
        let all = policy("{consecutive5xxErrors: 1, maxEjectionPercent: 100}");
        assert!(all.may_eject(2, 3));
        assert_eq!(p.ejection_time(100), MAX_EJECTION_TIME);
    }
}
