//! Garbage collection: deleting runs finished longer ago than the retention.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::millis_saturating;
use crate::engine::Engine;
use crate::error::Result;

impl Engine {
    /// Deletes runs that finished longer ago than their workflow's retention (an operator's
    /// [`crate::EngineBuilder::retention_for`], else the workflow's own
    /// [`crate::Workflow::RETENTION`], else the engine's); returns how many, once their
    /// deletion is durable.
    ///
    /// Runs are deleted `GC_RUNS_PER_WRITE` to one atomic write: sled 0.34's atomic multi-key
    /// write waits out any sync in progress (see `store/sled/mod.rs`), so one per run would
    /// stall the store once per run.
    pub async fn collect_garbage(&self) -> Result<usize> {
        const GC_RUNS_PER_WRITE: usize = 256;
        let now = self.inner.env.clock.now_ms();
        let mut expired_ids = Vec::new();
        for record in self.records().await? {
            let horizon =
                now.saturating_sub(millis_saturating(self.retention_of(&record.workflow)));
            let expired = record.status.is_terminal()
                && record.finished_at_ms.is_some_and(|at| at <= horizon);
            // A child is kept while its parent is, which may still compensate it.
            let parent_kept = match &record.parent {
                Some(parent) => self.inner.env.store.run(parent).await?.is_some(),
                None => false,
            };
            let expired = expired && !parent_kept;
            let loaded = self
                .inner
                .cells
                .lock()
                .expect("cells lock")
                .contains_key(&record.id);
            if expired && !loaded {
                expired_ids.push(record.id);
            }
        }
        let mut collected = 0;
        for chunk in expired_ids.chunks(GC_RUNS_PER_WRITE) {
            self.inner.env.store.delete_runs(chunk).await?;
            collected += chunk.len();
        }
        if collected > 0 {
            self.inner.env.store.sync().wait().await?;
            tracing::info!(collected, "finished runs collected");
        }
        Ok(collected)
    }

    /// How long finished runs of `workflow` are kept.
    pub fn retention_of(&self, workflow: &str) -> Duration {
        if let Some(retention) = self.inner.retention_for.get(workflow) {
            return *retention;
        }
        self.inner
            .workflows
            .get(workflow)
            .and_then(|entry| entry.retention)
            .unwrap_or(self.inner.retention)
    }

    pub(super) fn spawn_gc(&self, interval: Duration) {
        let engine = Arc::downgrade(&self.inner);
        let mut shutdown = self.inner.env.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                let Some(inner) = engine.upgrade() else {
                    return;
                };
                let engine = Engine { inner };
                if let Err(error) = engine.collect_garbage().await {
                    tracing::warn!(%error, "garbage collection failed");
                }
                drop(engine);
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
    }
}
