//! Garbage collection: deleting runs finished longer ago than the retention.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::millis_saturating;
use crate::engine::Engine;
use crate::error::Result;
use crate::ids::RunId;
use crate::journal::RunRecord;
use crate::store::RunsScan;

/// Run records garbage collection reads at a time.
const GC_RUNS_PER_PAGE: usize = 1_000;

/// Runs garbage collection deletes in one atomic write (see [`Engine::collect_garbage`]).
pub const GC_RUNS_PER_WRITE: usize = 256;

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
        let now = self.inner.env.clock.now_ms();
        let mut expired_ids = Vec::new();
        // A page at a time, so that a store of a million runs is never all in memory (the
        // ids of the expired ones are).
        let mut scan = RunsScan {
            after: None,
            status: None,
            prefix: None,
            limit: GC_RUNS_PER_PAGE,
            examine_max: None,
        };
        loop {
            let page = self.inner.env.store.runs_page(&scan).await?;
            for record in page.records.into_iter().flatten() {
                scan.after = Some(record.id.clone());
                if self.expired(&record, now).await? {
                    expired_ids.push(record.id);
                }
            }
            if !page.more {
                break;
            }
            // A page is read on the runtime's thread: let the runs' tasks in between.
            tokio::task::yield_now().await;
        }
        if !expired_ids.is_empty() {
            crate::crash::point("gc.before_delete");
        }
        let mut collected = 0;
        for chunk in expired_ids.chunks(GC_RUNS_PER_WRITE) {
            let deleted = self.delete_expired(chunk, now).await?;
            if deleted > 0 {
                // Each write is atomic; the ones written so far are not synced yet.
                crate::crash::point("gc.after_delete");
            }
            collected += deleted;
        }
        if collected > 0 {
            self.inner.env.store.sync().wait().await?;
            tracing::info!(collected, "finished runs collected");
        }
        Ok(collected)
    }

    /// Deletes the runs of `ids`, found expired at `now` by a scan, that are expired still:
    /// each judged again on its record as stored now, under the loads' lock. Between the
    /// scan and here, a run may have been loaded (a rerun noting itself in its journal), or
    /// deleted by a purge and started again under the same id; deleting it then would leave
    /// a journal key without a record, or delete a run that was just started. With the lock
    /// held, no load puts a cell of any of them in the map until they are deleted, and no
    /// start can make a run whose record is still there. Returns how many were deleted.
    async fn delete_expired(&self, ids: &[RunId], now: u64) -> Result<usize> {
        let _loading = self.inner.loading.lock().await;
        let mut still = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(record) = self.inner.env.store.run(id).await? {
                if self.expired(&record, now).await? {
                    still.push(record.id);
                }
            }
        }
        if !still.is_empty() {
            self.inner.env.store.delete_runs(&still).await?;
        }
        Ok(still.len())
    }

    /// Whether `record`'s run finished longer ago than its retention, at `now` (ms), and may
    /// go: no parent that may still compensate it is kept, and it is not loaded.
    async fn expired(&self, record: &RunRecord, now: u64) -> Result<bool> {
        let horizon = now.saturating_sub(millis_saturating(self.retention_of(&record.workflow)));
        let expired =
            record.status.is_terminal() && record.finished_at_ms.is_some_and(|at| at <= horizon);
        if !expired {
            return Ok(false);
        }
        // A child is kept while its parent is, which may still compensate it.
        if let Some(parent) = &record.parent {
            if self.inner.env.store.run(parent).await?.is_some() {
                return Ok(false);
            }
        }
        Ok(!self.held(&record.id))
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
