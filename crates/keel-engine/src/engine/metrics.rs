//! What the engine measures: event counters, rate limiters and latency statistics.

use std::sync::Arc;
use std::time::Duration;

use crate::engine::Engine;
use crate::error::Result;
use crate::limiter::RateLimiter;
use crate::limits::STATS_FLUSH_INTERVAL;
use crate::stats::OperationStats;

impl Engine {
    /// Counts of retries, step compensations and ended waits since the engine opened.
    pub fn counters(&self) -> crate::stats::Counters {
        self.inner.env.counters.read()
    }

    /// The rate limiter of the service `name`, shared by every workflow of this engine
    /// (steps use it through [`Step::rate_limit`]; other code may too).
    pub fn rate_limiter(&self, name: &str) -> Arc<RateLimiter> {
        self.inner.env.limiters.get(name)
    }

    /// Latency statistics of every operation (`step:<kind>`, `wait:<kind>`) recorded in this
    /// data directory, sorted by operation.
    pub fn stats(&self) -> Vec<OperationStats> {
        self.inner.env.stats.all()
    }

    /// Latency statistics of one operation, if it has any.
    pub fn operation_stats(&self, operation: &str) -> Option<OperationStats> {
        self.inner.env.stats.summary(operation)
    }

    /// How many successful executions of `operation` took at most each of `bounds` (cumulative
    /// counts, for a histogram of fixed buckets such as Prometheus'), counted from its HDR
    /// histogram: within 0.1% of each bound, an execution may be counted on either side of it.
    /// `None` if the operation has no statistics.
    pub fn operation_counts_at_or_below(
        &self,
        operation: &str,
        bounds: &[Duration],
    ) -> Option<Vec<u64>> {
        let bounds_us: Vec<u64> = bounds
            .iter()
            .map(|b| u64::try_from(b.as_micros()).unwrap_or(u64::MAX))
            .collect();
        self.inner
            .env
            .stats
            .counts_at_or_below(operation, &bounds_us)
    }

    /// Records a duration for `operation` as if an execution had taken it: for importing
    /// history from elsewhere (or seeding a learned wait policy).
    pub fn record_duration(&self, operation: &str, duration: Duration) {
        self.inner
            .env
            .stats
            .record(operation, duration, "", self.inner.env.clock.now_ms());
    }

    /// Writes the statistics changed since the last write and waits until they are durable.
    /// The engine does this every second and at shutdown; a crash loses at most the last
    /// second's samples.
    pub async fn flush_stats(&self) -> Result<()> {
        self.inner.env.stats.flush(&*self.inner.env.store)?;
        self.inner.env.store.sync().wait().await
    }

    pub(super) fn spawn_stats_flush(&self) {
        let engine = Arc::downgrade(&self.inner);
        let mut shutdown = self.inner.env.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(STATS_FLUSH_INTERVAL) => {}
                    _ = shutdown.changed() => return,
                }
                let Some(inner) = engine.upgrade() else {
                    return;
                };
                if let Err(error) = inner.env.stats.flush(&*inner.env.store) {
                    tracing::warn!(%error, "latency statistics could not be written");
                }
                if let Err(error) = inner.env.stats.refresh_others(&*inner.env.store).await {
                    tracing::warn!(%error, "other workers' latency statistics could not be read");
                }
            }
        });
    }
}
