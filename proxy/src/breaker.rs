//! Circuit breaking (DestinationRule `connectionPool`), with Envoy's semantics:
//! `http2MaxRequests` caps the requests in flight to a cluster, `maxConnections` the
//! connections (for HTTP/1 upstreams, one per request in flight; for TCP, one per proxied
//! connection), and `http1MaxPendingRequests` the requests queued waiting for a connection.
//! Whatever exceeds a limit is refused at once (503 with `x-envoy-overloaded: true`) and
//! counted. Counters are per cluster and survive config reloads; absent or zero limits
//! are unlimited (Istio's proto3 zero means "not set").

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::Notify;
use weft_api::config as model;

/// The limits of one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Connections.
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    pub max_pending: Option<u32>,
    /// Requests in flight.
    pub max_requests: Option<u32>,
}

impl Limits {
    /// The limits of a cluster's connection pool.
    pub fn from_pool(p: &model::ConnectionPool) -> Self {
        let set = |v: Option<u32>| v.filter(|n| *n > 0);
        Limits {
            max_connections: set(p.max_connections),
            max_pending: set(p.http1_max_pending_requests),
            max_requests: set(p.http2_max_requests),
        }
    }
}

/// Which limit refused a request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Overflow {
    /// `http2MaxRequests`.
    Requests,
    /// `http1MaxPendingRequests`.
    Pending,
    /// `maxConnections` (TCP).
    Connections,
    /// The retry budget or `maxRetries`.
    Retries,
}

impl Overflow {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Requests => "requests",
            Overflow::Pending => "pending",
            Overflow::Connections => "connections",
            Overflow::Retries => "retries",
        }
    }
}

/// A cluster's counters.
#[derive(Debug, Default)]
pub struct Breaker {
    active: Arc<AtomicU32>,
    pending: Arc<AtomicU32>,
    connections: Arc<AtomicU32>,
    released: Arc<Notify>,
}

/// A counted request; released on drop.
#[derive(Debug)]
pub struct RequestPermit(Arc<AtomicU32>);

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A counted connection; released on drop, waking one queued request.
#[derive(Debug)]
pub struct ConnectionPermit {
    count: Arc<AtomicU32>,
    released: Arc<Notify>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.released.notify_one();
    }
}

struct PendingGuard(Arc<AtomicU32>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Increments `counter` unless it already reached `limit`.
fn take(counter: &AtomicU32, limit: Option<u32>) -> bool {
    let mut cur = counter.load(Ordering::Acquire);
    loop {
        if limit.is_some_and(|l| cur >= l) {
            return false;
        }
        match counter.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
}

impl Breaker {
    /// Admits one request (every try counts), or refuses it.
    pub fn try_request(&self, limits: &Limits) -> Result<RequestPermit, Overflow> {
        if take(&self.active, limits.max_requests) {
            Ok(RequestPermit(self.active.clone()))
        } else {
            Err(Overflow::Requests)
        }
    }

    /// Requests in flight.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    /// Connections counted now.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    /// Requests queued for a connection now.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Acquire)
    }

    fn connection_permit(&self) -> ConnectionPermit {
        ConnectionPermit {
            count: self.connections.clone(),
            released: self.released.clone(),
        }
    }

    /// A connection at once, or `Overflow::Connections` (TCP proxying).
    pub fn try_connection(&self, limits: &Limits) -> Result<ConnectionPermit, Overflow> {
        if take(&self.connections, limits.max_connections) {
            Ok(self.connection_permit())
        } else {
            Err(Overflow::Connections)
        }
    }

    /// Counts a request waiting for a connection to be established (a multiplexed
    /// connection's handshake), or refuses it with `Overflow::Pending`.
    pub fn try_pending(&self, limits: &Limits) -> Result<impl Drop + Send + use<>, Overflow> {
        if take(&self.pending, limits.max_pending) {
            Ok(PendingGuard(self.pending.clone()))
        } else {
            Err(Overflow::Pending)
        }
    }

    /// A connection for one HTTP/1 request: at once when under `maxConnections`, else
    /// queued while fewer than `http1MaxPendingRequests` wait, else `Overflow::Pending`.
    pub async fn connection(&self, limits: &Limits) -> Result<ConnectionPermit, Overflow> {
        let mut queued: Option<PendingGuard> = None;
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if take(&self.connections, limits.max_connections) {
                return Ok(self.connection_permit());
            }
            if queued.is_none() {
                if !take(&self.pending, limits.max_pending) {
                    return Err(Overflow::Pending);
                }
                queued = Some(PendingGuard(self.pending.clone()));
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn requests_overflow_at_the_limit() {
        let b = Breaker::default();
        let l = Limits {
            max_requests: Some(2),
            ..Limits::default()
        };
        let p1 = b.try_request(&l).expect("1");
        let _p2 = b.try_request(&l).expect("2");
        assert_eq!(b.try_request(&l).expect_err("3"), Overflow::Requests);
        drop(p1);
        assert!(b.try_request(&l).is_ok());
        let unlimited = Limits::from_pool(&model::ConnectionPool {
            http2_max_requests: Some(0),
            ..Default::default()
        });
        assert_eq!(unlimited.max_requests, None, "zero means unset");
    }

    #[tokio::test]
    async fn pending_queue_then_overflow() {
        let b = Arc::new(Breaker::default());
        let l = Limits {
            max_connections: Some(1),
            max_pending: Some(1),
            max_requests: None,
        };
        let c1 = b.connection(&l).await.expect("first connects");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.connection(&l).await.map(|_| ()) }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while b.pending() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("second queues");
        assert_eq!(
            b.connection(&l).await.expect_err("third overflows"),
            Overflow::Pending
        );
        drop(c1);
        waiter
            .await
            .expect("task")
            .expect("queued request gets the connection");
        assert_eq!((b.pending(), b.connections()), (0, 0));
        let _t = b.try_connection(&l).expect("tcp");
        assert_eq!(
            b.try_connection(&l).expect_err("tcp limit"),
            Overflow::Connections
        );
    }
}
