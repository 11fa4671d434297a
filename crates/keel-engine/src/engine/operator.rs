//! Operator calls on a run: cancel, retry a failed compensation, resolve, resume. Each one
//! writes through the run's cell (loading it if needed, under the same lock as its driver),
//! makes the write durable, and leaves the run driven if the write made it drivable.

use std::sync::Arc;

use crate::cell::RunCell;
use crate::engine::{Engine, Loaded};
use crate::error::{EngineError, Result};
use crate::ids::RunId;
use crate::journal::{Event, RunRecord, RunStatus};
use crate::replay::RunState;

fn admits(record: &RunRecord, operation: &'static str, statuses: &[RunStatus]) -> Result<()> {
    if statuses.contains(&record.status) {
        Ok(())
    } else {
        Err(EngineError::InvalidState {
            id: record.id.clone(),
            status: record.status.to_string(),
            operation,
        })
    }
}

impl Engine {
    /// Cancels run `id`: the cancellation is durable when this returns, and from then on the
    /// run cannot complete. It stops at its next operation (an in-flight step finishes and is
    /// recorded; a sleep ends at once) and compensates. Cancelling a finished run is an error;
    /// cancelling a run that is already compensating changes nothing.
    pub async fn cancel(&self, id: &str) -> Result<RunRecord> {
        let outcome = self
            .operate(id, "cancel", |cell| {
                let already = cell.with_state(|s| s.cancel_requested)
                    || cell.record().status == RunStatus::Compensating;
                if already {
                    return Ok(false);
                }
                cell.append_if(&*self.inner.store, Event::CancelRequested, |record, _| {
                    admits(
                        record,
                        "cancel",
                        &[RunStatus::Running, RunStatus::Suspended],
                    )
                })?;
                Ok(true)
            })
            .await?;
        if let Some(cell) = outcome {
            cell.cancel.send_replace(true);
            tracing::info!(run_id = %cell.id, "cancel requested");
        }
        self.status(id).await
    }

    /// Retries the compensation of a run in `CompensationFailed`.
    pub async fn retry_compensation(&self, id: &str) -> Result<RunRecord> {
        self.transition_settled(
            id,
            "retry compensation",
            Event::CompensationRetried,
            RunStatus::Compensating,
        )
        .await
    }

    /// Marks a run in `CompensationFailed` as settled by an operator (terminal `Resolved`).
    pub async fn resolve(&self, id: &str, note: &str) -> Result<RunRecord> {
        let event = Event::RunResolved { note: note.into() };
        self.transition_settled(id, "resolve", event, RunStatus::Resolved)
            .await
    }

    /// Takes up a `Suspended` run again (after the workflow code was fixed).
    pub async fn resume(&self, id: &str) -> Result<RunRecord> {
        self.transition_settled(id, "resume", Event::RunResumed, RunStatus::Running)
            .await
    }

    async fn transition_settled(
        &self,
        id: &str,
        operation: &'static str,
        event: Event,
        to: RunStatus,
    ) -> Result<RunRecord> {
        let from = match to {
            RunStatus::Running => RunStatus::Suspended,
            _ => RunStatus::CompensationFailed,
        };
        let outcome = self
            .operate(id, operation, |cell| {
                let guard = |record: &RunRecord, _: &RunState| admits(record, operation, &[from]);
                cell.transition_if(&*self.inner.store, event.clone(), guard, to, |r| {
                    if to == RunStatus::Running {
                        r.error = None;
                    }
                })?;
                Ok(true)
            })
            .await?;
        if let Some(cell) = outcome {
            cell.status.send_replace(to);
        }
        self.status(id).await
    }

    /// Runs an operator `write` against run `id`'s cell, makes it durable, and leaves the run
    /// driven if it must be. `write` returns whether it wrote; the written cell is returned.
    /// A cell unloaded during the call is loaded again and the write retried.
    async fn operate(
        &self,
        id: &str,
        operation: &'static str,
        write: impl Fn(&Arc<RunCell>) -> Result<bool>,
    ) -> Result<Option<Arc<RunCell>>> {
        for _ in 0..8 {
            let record = self.record(id)?;
            let loaded = self.load_cell(record)?;
            let cell = match &loaded {
                Loaded::Fresh(cell) | Loaded::Existing(cell) => Arc::clone(cell),
            };
            let wrote = write(&cell);
            if let Loaded::Fresh(cell) = &loaded {
                // This call loaded the run: drive it if the write made it drivable, else
                // unload it again.
                let drivable = matches!(
                    cell.record().status,
                    RunStatus::Running | RunStatus::Compensating
                );
                if drivable && wrote.is_ok() {
                    self.spawn_driver(Arc::clone(cell));
                } else {
                    self.inner.unload(cell);
                }
            }
            match wrote {
                Ok(true) => {
                    self.inner.store.sync().wait().await?;
                    return Ok(Some(cell));
                }
                Ok(false) => return Ok(None),
                Err(EngineError::Detached { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(EngineError::InvalidState {
            id: RunId::new(id)?,
            status: "being loaded and unloaded concurrently".into(),
            operation,
        })
    }
}
