//! Purging a finished run: it and its descendants deleted in one atomic write, checked under
//! the loads' lock (the purge action of a batch, `engine/batch.rs`).

use std::collections::HashSet;

use crate::engine::batch::STARTED_AGAIN;
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::ids::RunId;
use crate::journal::Event;

/// Why a purge skips a run loaded in this engine (its cell is in the map).
pub(super) const LOADED: &str = "is loaded (a waiter is reading it)";

impl Engine {
    /// Deletes finished run `id` and its descendants (finished: a child of a finished parent
    /// has settled) in one atomic write, durable when this returns. The descendants are
    /// found through the journals, where every child is journaled before it exists
    /// (`ChildStarted`), not by their ids: a child whose `<parent>/<index>` would be too long
    /// is `child-<uuid>` ([`crate::child_id`]), under no prefix of its parent's.
    ///
    /// Checked and deleted under the loads' lock: a run loaded since the batch's check (a
    /// rerun noting itself in the run's journal loads it) would otherwise write its journal
    /// after its record was deleted, a key no record owns that a new run of the same id then
    /// reads as its own; and the run must still be the one created at `created_at_ms` that
    /// the batch matched. `Some(reason)` when one of the runs is loaded, or the run is
    /// another now; the whole purge is skipped then.
    pub(super) async fn purge_one(&self, id: &RunId, created_at_ms: u64) -> Result<Option<String>> {
        let loading = self.inner.loading.lock().await;
        let store = &self.inner.env.store;
        match store.run(id).await? {
            None => return Err(EngineError::RunNotFound { id: id.clone() }),
            Some(record) if record.created_at_ms != created_at_ms => {
                return Ok(Some(STARTED_AGAIN.into()))
            }
            Some(record) if !record.status.is_terminal() => {
                return Err(EngineError::InvalidState {
                    id: id.clone(),
                    status: record.status.to_string(),
                    operation: "purge",
                })
            }
            Some(_) => {}
        }
        let mut ids = vec![id.clone()];
        let mut seen: HashSet<RunId> = HashSet::from([id.clone()]);
        let mut read = 0;
        while let Some(parent) = ids.get(read).cloned() {
            read += 1;
            for entry in store.journal(&parent).await? {
                let Event::ChildStarted { child, .. } = entry.event else {
                    continue;
                };
                // None: journaled, and never made (its parent ended first). A run of that id
                // that names another parent is a caller's run that took a `child-<uuid>` id
                // first, not this run's child.
                let Some(record) = store.run(&child).await? else {
                    continue;
                };
                if record.parent.as_ref() != Some(&parent) {
                    continue;
                }
                if !record.status.is_terminal() {
                    return Err(EngineError::InvalidState {
                        id: id.clone(),
                        status: format!("finished but its child {child} is {}", record.status),
                        operation: "purge",
                    });
                }
                if seen.insert(child.clone()) {
                    ids.push(child);
                }
            }
        }
        if let Some(loaded) = ids.iter().find(|id| self.held(id)) {
            return Ok(Some(if loaded == id {
                LOADED.into()
            } else {
                format!("its descendant {loaded} is loaded")
            }));
        }
        store.delete_runs(&ids).await?;
        // Written: a load from now on finds no record. The sync needs no lock, and purges
        // running side by side share it.
        drop(loading);
        store.sync().wait().await?;
        tracing::info!(run_id = %id, runs = ids.len(), "run purged");
        Ok(None)
    }
}
