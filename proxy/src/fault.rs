//! Fault injection (VirtualService `fault`): a delay before forwarding and an abort instead
//! of forwarding, each applied to a percentage of requests. As in Envoy, the delay comes
//! first, then the abort; an aborted gRPC request gets a trailers-only response carrying the
//! configured `grpc-status`.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use weft_api::config as model;

use crate::http::{self as h, Body};

/// gRPC status codes by name, in code order.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status from its name (`UNAVAILABLE`) or number (`14`).
pub fn grpc_code(s: &str) -> Option<u32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u32>() {
        return (n < 17).then_some(n);
    }
    GRPC_CODES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(s))
        .and_then(|p| u32::try_from(p).ok())
}

/// How an aborted request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// This HTTP status (mapped to a gRPC status for gRPC requests).
    Http(StatusCode),
    /// A trailers-only gRPC response with this status.
    Grpc(u32),
}

/// A compiled fault.
#[derive(Debug, Clone)]
pub struct Fault {
    delay: Option<(Duration, f64)>,
    abort: Option<(Abort, f64)>,
}

/// What the fault does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    /// Wait this long first.
    pub delay: Option<Duration>,
    /// Then answer instead of forwarding.
    pub abort: Option<Abort>,
}

impl Fault {
    /// Compiles a fault; an abort without a usable status is dropped.
    pub fn compile(f: &model::Fault) -> Fault {
        let abort = f.abort.as_ref().and_then(|a| {
            let kind = match (&a.grpc_status, a.http_status) {
                (Some(g), _) => Abort::Grpc(grpc_code(g)?),
                (None, Some(code)) => Abort::Http(StatusCode::from_u16(code).ok()?),
                (None, None) => return None,
            };
            Some((kind, a.percentage))
        });
        Fault {
            delay: f
                .delay
                .as_ref()
                .map(|d| (Duration::from_millis(d.fixed_delay_ms), d.percentage)),
            abort,
        }
    }

    /// Decides with `roll()` returning uniform values in `[0, 100)`.
    pub fn decide_with(&self, mut roll: impl FnMut() -> f64) -> Decision {
        Decision {
            delay: self.delay.and_then(|(d, pct)| (roll() < pct).then_some(d)),
            abort: self.abort.and_then(|(a, pct)| (roll() < pct).then_some(a)),
        }
    }

    /// Decides for one request.
    pub fn decide(&self) -> Decision {
        self.decide_with(|| fastrand::f64() * 100.0)
    }
}

/// The response of an aborted request.
pub fn abort_response(abort: Abort, grpc_request: bool) -> Response<Body> {
    let mut resp = match abort {
        Abort::Http(status) => h::error_response(status, grpc_request, "fault filter abort"),
        Abort::Grpc(code) => {
            let mut r = Response::new(h::empty());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            r.headers_mut()
                .insert("grpc-status", HeaderValue::from(code));
            r.headers_mut().insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            r
        }
    };
    resp.headers_mut()
        .insert("x-weft-fault", HeaderValue::from_static("abort"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(yaml: &str) -> Fault {
        Fault::compile(&crate::route::test_yaml(yaml).expect("yaml"))
    }

    #[test]
    fn grpc_codes_by_name_or_number() {
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_code("resource_exhausted"), Some(8));
        assert_eq!(grpc_code("4"), Some(4));
        assert_eq!(grpc_code("99"), None);
        assert_eq!(grpc_code("NOPE"), None);
    }

    #[test]
    fn percentages_decide() {
        let f = fault(
            "{delay: {fixedDelayMs: 50, percentage: 30}, abort: {httpStatus: 503, percentage: 10}}",
        );
        let mut rolls = [29.9, 10.0].into_iter();
        let d = f.decide_with(|| rolls.next().expect("roll"));
        assert_eq!(d.delay, Some(Duration::from_millis(50)));
        assert_eq!(d.abort, None, "10.0 is not under 10%");
        let mut rolls = [30.0, 9.99].into_iter();
        let d = f.decide_with(|| rolls.next().expect("roll"));
        assert_eq!(d.delay, None);
        assert_eq!(d.abort, Some(Abort::Http(StatusCode::SERVICE_UNAVAILABLE)));
        let mut rng = fastrand::Rng::with_seed(7);
        let aborted = (0..10_000)
            .filter(|_| f.decide_with(|| rng.f64() * 100.0).abort.is_some())
            .count();
        assert!((800..1200).contains(&aborted), "{aborted} of 10000 at 10%");
    }

    #[test]
    fn grpc_abort_is_trailers_only() {
        let f = fault("{abort: {grpcStatus: UNAVAILABLE}}");
        let d = f.decide();
        let r = abort_response(d.abort.expect("100% by default"), true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        let r = abort_response(Abort::Http(StatusCode::FORBIDDEN), false);
        assert_eq!(r.status(), 403);
        let r = abort_response(Abort::Http(StatusCode::SERVICE_UNAVAILABLE), true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
    }
}
