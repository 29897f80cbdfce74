//! Retries: Envoy's retry conditions, per-try timeouts, jittered back-off, and the retry
//! budget that keeps retries from multiplying load.
//!
//! Budget: retries in flight to a cluster stay under `percent` of its active requests, but
//! `min_concurrency` are always allowed (Envoy's `retry_budget`, default 20% / 3 when the
//! cluster names none); `connectionPool.http.maxRetries` caps them too. A retry the budget
//! refuses is not sent: the last answer goes back to the client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::StatusCode;
use http::header::{self, HeaderMap};
use weft_api::config as model;

/// Retry on any 5xx, reset, connect failure or timeout.
const ON_5XX: u32 = 1;
/// Retry on 502, 503, 504, reset, connect failure or timeout.
const ON_GATEWAY_ERROR: u32 = 1 << 1;
/// Retry on a reset or timeout, connect failures included.
const ON_RESET: u32 = 1 << 2;
/// Retry when connecting failed.
const ON_CONNECT_FAILURE: u32 = 1 << 3;
/// Retry on 409.
const ON_RETRIABLE_4XX: u32 = 1 << 4;
/// Retry on an HTTP/2 REFUSED_STREAM.
const ON_REFUSED_STREAM: u32 = 1 << 5;
/// Retry on the listed status codes.
const ON_STATUS_CODES: u32 = 1 << 6;
const ON_GRPC_CANCELLED: u32 = 1 << 7;
const ON_GRPC_DEADLINE_EXCEEDED: u32 = 1 << 8;
const ON_GRPC_RESOURCE_EXHAUSTED: u32 = 1 << 9;
const ON_GRPC_UNAVAILABLE: u32 = 1 << 10;

/// Envoy's default back-off base interval.
const BACKOFF_BASE: Duration = Duration::from_millis(25);

/// A compiled `HTTPRetry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Timeout of each try.
    pub per_try_timeout: Option<Duration>,
    on: u32,
    codes: Vec<u16>,
}

/// How one try ended.
#[derive(Debug, Clone, Copy)]
pub enum TryOutcome<'a> {
    /// Response headers arrived.
    Response {
        /// Status.
        status: StatusCode,
        /// Headers (for `grpc-status` of trailers-only responses).
        headers: &'a HeaderMap,
    },
    /// Connecting failed: nothing was sent.
    ConnectFailure,
    /// The stream was refused by the peer before processing (HTTP/2 REFUSED_STREAM).
    RefusedStream,
    /// The connection or stream was reset after the request was sent.
    Reset,
    /// The per-try timeout fired.
    Timeout,
}

/// The gRPC status of a trailers-only response, if it is one.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        return None;
    }
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl RetryPolicy {
    /// Compiles a policy. Unknown conditions are ignored (Envoy ignores them too); numbers
    /// in `retryOn` are retriable status codes, as in Istio.
    pub fn compile(p: &model::RetryPolicy) -> RetryPolicy {
        let mut on = 0;
        let mut codes = p.retriable_status_codes.clone();
        for cond in p.retry_on.iter().flat_map(|c| c.split(',')) {
            let cond = cond.trim();
            on |= match cond {
                "5xx" => ON_5XX,
                "gateway-error" => ON_GATEWAY_ERROR,
                "reset" => ON_RESET,
                "connect-failure" => ON_CONNECT_FAILURE,
                "retriable-4xx" => ON_RETRIABLE_4XX,
                "refused-stream" => ON_REFUSED_STREAM,
                "retriable-status-codes" => ON_STATUS_CODES,
                "cancelled" => ON_GRPC_CANCELLED,
                "deadline-exceeded" => ON_GRPC_DEADLINE_EXCEEDED,
                "resource-exhausted" => ON_GRPC_RESOURCE_EXHAUSTED,
                "unavailable" => ON_GRPC_UNAVAILABLE,
                other => match other.parse::<u16>() {
                    Ok(code) => {
                        codes.push(code);
                        ON_STATUS_CODES
                    }
                    Err(_) => 0,
                },
            };
        }
        RetryPolicy {
            attempts: p.attempts,
            per_try_timeout: p
                .per_try_timeout_ms
                .filter(|t| *t > 0)
                .map(Duration::from_millis),
            on,
            codes,
        }
    }

    /// True when a try that ended so may be retried.
    pub fn retriable(&self, outcome: TryOutcome<'_>) -> bool {
        let on = |f: u32| self.on & f != 0;
        match outcome {
            TryOutcome::ConnectFailure => {
                on(ON_CONNECT_FAILURE | ON_5XX | ON_GATEWAY_ERROR | ON_RESET)
            }
            TryOutcome::RefusedStream => {
                on(ON_REFUSED_STREAM | ON_5XX | ON_GATEWAY_ERROR | ON_RESET)
            }
            TryOutcome::Reset | TryOutcome::Timeout => on(ON_5XX | ON_GATEWAY_ERROR | ON_RESET),
            TryOutcome::Response { status, headers } => {
                let code = status.as_u16();
                if on(ON_5XX) && status.is_server_error() {
                    return true;
                }
                if on(ON_GATEWAY_ERROR) && matches!(code, 502..=504) {
                    return true;
                }
                if on(ON_RETRIABLE_4XX) && code == 409 {
                    return true;
                }
                if on(ON_STATUS_CODES) && self.codes.contains(&code) {
                    return true;
                }
                match grpc_status(headers) {
                    Some(1) => on(ON_GRPC_CANCELLED),
                    Some(4) => on(ON_GRPC_DEADLINE_EXCEEDED),
                    Some(8) => on(ON_GRPC_RESOURCE_EXHAUSTED),
                    Some(14) => on(ON_GRPC_UNAVAILABLE),
                    _ => false,
                }
            }
        }
    }
}

/// Envoy's fully jittered exponential back-off before retry `n` (1-based): uniform in
/// `[0, (2^n - 1) × 25 ms)`, capped at 250 ms.
pub fn backoff(n: u32, roll: f64) -> Duration {
    let factor = (1u64 << n.min(10)) - 1;
    let upper = (BACKOFF_BASE * u32::try_from(factor).unwrap_or(u32::MAX)).min(BACKOFF_BASE * 10);
    upper.mul_f64(roll.clamp(0.0, 1.0))
}

/// Limits on concurrent retries to one cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetLimits {
    /// Share of active requests, percent.
    pub percent: f64,
    /// Retries always allowed.
    pub min_concurrency: u32,
    /// `connectionPool.http.maxRetries`.
    pub max_retries: Option<u32>,
}

impl Default for BudgetLimits {
    fn default() -> Self {
        let d = model::RetryBudget::default();
        BudgetLimits {
            percent: d.percent,
            min_concurrency: d.min_concurrency,
            max_retries: None,
        }
    }
}

impl BudgetLimits {
    /// Limits from a cluster's config.
    pub fn from_cluster(c: &model::Cluster) -> Self {
        let b = c.retry_budget.clone().unwrap_or_default();
        BudgetLimits {
            percent: b.percent,
            min_concurrency: b.min_concurrency,
            max_retries: c.connection_pool.max_retries.filter(|m| *m > 0),
        }
    }

    /// Retries allowed in flight while `active` requests are.
    pub fn allowed(&self, active: u32) -> u32 {
        let share = (f64::from(active) * self.percent / 100.0).floor();
        // `share` is non-negative and bounded by `active`.
        let share = if share.is_finite() && share > 0.0 {
            share.min(f64::from(u32::MAX)) as u32
        } else {
            0
        };
        let budget = share.max(self.min_concurrency);
        match self.max_retries {
            Some(m) => budget.min(m),
            None => budget,
        }
    }
}

/// Retries in flight to one cluster, shared across config versions.
#[derive(Debug, Default)]
pub struct Budget {
    in_flight: Arc<AtomicU32>,
}

/// A retry the budget admitted; released on drop.
#[derive(Debug)]
pub struct RetryPermit(Arc<AtomicU32>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Budget {
    /// Admits one retry while `active` requests are in flight, or refuses it.
    pub fn try_acquire(&self, limits: &BudgetLimits, active: u32) -> Option<RetryPermit> {
        let allowed = limits.allowed(active);
        let mut cur = self.in_flight.load(Ordering::Acquire);
        loop {
            if cur >= allowed {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(RetryPermit(self.in_flight.clone())),
                Err(now) => cur = now,
            }
        }
    }

    /// Retries in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn policy(on: &[&str], codes: &[u16]) -> RetryPolicy {
        RetryPolicy::compile(&model::RetryPolicy {
            attempts: 3,
            per_try_timeout_ms: Some(100),
            retry_on: on.iter().map(|s| s.to_string()).collect(),
            retriable_status_codes: codes.to_vec(),
        })
    }

    fn resp(status: u16, grpc: Option<&str>) -> (StatusCode, HeaderMap) {
        let mut h = HeaderMap::new();
        if let Some(g) = grpc {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_str(g).expect("value"));
        }
        (StatusCode::from_u16(status).expect("status"), h)
    }

    #[test]
    fn conditions_table() {
        use TryOutcome as T;
        type Case<'a> = (&'a [&'a str], &'a [u16], u16, Option<&'a str>, bool);
        let cases: &[Case<'_>] = &[
            (&["5xx"], &[], 500, None, true),
            (&["5xx"], &[], 503, None, true),
            (&["5xx"], &[], 404, None, false),
            (&["gateway-error"], &[], 500, None, false),
            (&["gateway-error"], &[], 502, None, true),
            (&["gateway-error"], &[], 504, None, true),
            (&["retriable-4xx"], &[], 409, None, true),
            (&["retriable-4xx"], &[], 429, None, false),
            (&["retriable-status-codes"], &[429], 429, None, true),
            (&["retriable-status-codes"], &[], 429, None, false),
            (&["429"], &[], 429, None, true),
            (&["connect-failure"], &[], 503, None, false),
            (&["unavailable"], &[], 200, Some("14"), true),
            (&["unavailable"], &[], 200, Some("4"), false),
            (&["deadline-exceeded"], &[], 200, Some("4"), true),
            (&["cancelled"], &[], 200, Some("1"), true),
            (&["resource-exhausted"], &[], 200, Some("8"), true),
            (&["5xx,unavailable"], &[], 200, Some("14"), true),
            (&["5xx"], &[], 200, Some("14"), false),
        ];
        for (on, codes, status, grpc, want) in cases {
            let p = policy(on, codes);
            let (s, h) = resp(*status, *grpc);
            let got = p.retriable(T::Response {
                status: s,
                headers: &h,
            });
            assert_eq!(
                got, *want,
                "retryOn {on:?} codes {codes:?} status {status} grpc {grpc:?}"
            );
        }
        let cf = |on: &[&str]| policy(on, &[]).retriable(T::ConnectFailure);
        assert!(
            cf(&["connect-failure"]) && cf(&["5xx"]) && cf(&["gateway-error"]) && cf(&["reset"])
        );
        assert!(!cf(&["retriable-4xx"]) && !cf(&["unavailable"]));
        let reset = |on: &[&str]| policy(on, &[]).retriable(T::Reset);
        assert!(reset(&["reset"]) && reset(&["5xx"]) && !reset(&["connect-failure"]));
        assert!(policy(&["refused-stream"], &[]).retriable(T::RefusedStream));
        assert!(policy(&["5xx"], &[]).retriable(T::Timeout));
        assert!(!policy(&["connect-failure"], &[]).retriable(T::Timeout));
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        assert_eq!(backoff(1, 0.0), Duration::ZERO);
        assert_eq!(backoff(1, 1.0), Duration::from_millis(25));
        assert_eq!(backoff(2, 1.0), Duration::from_millis(75));
        assert_eq!(backoff(9, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(40, 0.5), Duration::from_millis(125));
    }

    #[test]
    fn budget_defaults_to_twenty_percent_with_three_minimum() {
        let limits = BudgetLimits::default();
        assert_eq!(limits.allowed(0), 3);
        assert_eq!(limits.allowed(10), 3);
        assert_eq!(limits.allowed(100), 20);
        let capped = BudgetLimits {
            max_retries: Some(2),
            ..BudgetLimits::default()
        };
        assert_eq!(capped.allowed(100), 2, "maxRetries caps the budget");
        let b = Budget::default();
        let permits: Vec<_> = (0..3)
            .map(|_| b.try_acquire(&limits, 5).expect("within minimum"))
            .collect();
        assert!(
            b.try_acquire(&limits, 5).is_none(),
            "fourth refused at 5 active"
        );
        assert!(
            b.try_acquire(&limits, 20).is_some_and(|p| {
                drop(p);
                true
            }),
            "20 active allow 4"
        );
        drop(permits);
        assert_eq!(b.in_flight(), 0, "permits release on drop");
    }
}
