//! Graceful shutdown: one signal that every listener and connection watches, and a tracker
//! that tells when the last connection is gone.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared drain state. Cloning is cheap; all clones observe the same signal.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    signal: CancellationToken,
    tasks: TaskTracker,
}

impl Drain {
    /// A drain that has not started.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining: listeners stop accepting, HTTP connections finish their in-flight
    /// requests and close.
    pub fn start(&self) {
        self.signal.cancel();
        self.tasks.close();
    }

    /// True once draining has started.
    pub fn is_draining(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Resolves when draining starts.
    pub fn signaled(&self) -> impl Future<Output = ()> + Send + 'static {
        self.signal.clone().cancelled_owned()
    }

    /// Runs a connection task that the drain waits for.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Number of connection tasks still running.
    pub fn active(&self) -> usize {
        self.tasks.len()
    }

    /// Waits for every tracked task to end, up to `deadline`. Returns how many were still
    /// running when the deadline passed (0 when all ended in time).
    pub async fn wait(&self, deadline: Duration) -> usize {
        self.tasks.close();
        match tokio::time::timeout(deadline, self.tasks.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tasks.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_tasks_then_gives_up_at_deadline() {
        let drain = Drain::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        drain.spawn(async move {
            let _ = rx.await;
        });
        drain.spawn(std::future::pending());
        assert_eq!(drain.active(), 2);
        assert!(!drain.is_draining());
        drain.start();
        assert!(drain.is_draining());
        tokio::time::timeout(Duration::from_secs(1), drain.signaled())
            .await
            .expect("signal fires");
        tx.send(()).expect("task alive");
        let left = drain.wait(Duration::from_millis(100)).await;
        assert_eq!(left, 1, "the pending task outlives the deadline");
    }
}
