//! Operator calls on a run: cancel, pause, resume, retry a failed compensation, resolve;
//! and the compensation of a child run on behalf of its parent's saga. Each one
//! writes through the run's cell (loading it if needed, under the same lock as its driver),
//! makes the write durable, and leaves the run driven if the write made it drivable.

use std::sync::Arc;

use crate::cell::{RunCell, Stop};
use crate::engine::{Engine, Loaded};
use crate::error::{EngineError, Result};
use crate::ids::RunId;
use crate::journal::{Event, RunRecord, RunStatus};
use crate::limits::ERROR_MESSAGE_BYTES_MAX;
use crate::replay::RunState;
use crate::store::Takeover;
use crate::transition::refuse_if_cancelled;

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

/// `RunNotFound` unless `record` is the run created at `created_at` (when given): an operator
/// call for the run a batch's scan read, whose id may name another run now (that one
/// deleted, and another started under its id since).
pub(super) fn same_run(created_at: Option<u64>, record: &RunRecord) -> Result<()> {
    match created_at {
        Some(at) if at != record.created_at_ms => Err(EngineError::RunNotFound {
            id: record.id.clone(),
        }),
        _ => Ok(()),
    }
}

impl Engine {
    /// Cancels run `id`: the cancellation is durable when this returns, and from then on the
    /// run cannot complete. A running run stops at its next operation (an in-flight step
    /// finishes and is recorded; a sleep or a wait ends at once) and compensates; a
    /// suspended or paused one compensates at once. Cancelling a finished run is an error;
    /// cancelling a run that is already compensating changes nothing.
    pub async fn cancel(&self, id: &str) -> Result<RunRecord> {
        self.cancel_made(id, None).await.map(|(record, _)| record)
    }

    /// [`Engine::cancel`], and whether this call made the cancel (`false`: one was standing
    /// already, or the run was compensating); with `created_at`, only of the run of `id`
    /// created then ([`Engine::operate`]).
    pub(super) async fn cancel_made(
        &self,
        id: &str,
        created_at: Option<u64>,
    ) -> Result<(RunRecord, bool)> {
        const REASON: &str = "cancelled by operator";
        let outcome = self
            .operate(id, created_at, "cancel", |cell| {
                let status = cell.status();
                // A standing request counts as done unless the run stopped for an operator
                // with it standing (a journal written before a stop to pause or a suspension
                // yielded to a cancel): then it compensates now. A run that was cancelled and
                // has since ended is finished like any other.
                let stopped = matches!(status, RunStatus::Suspended | RunStatus::Paused);
                let already = status == RunStatus::Compensating
                    || (!stopped
                        && !status.is_terminal()
                        && cell.with_state(|s| s.cancel_requested));
                if already {
                    return Ok(false);
                }
                if matches!(status, RunStatus::Suspended | RunStatus::Paused) {
                    // Nothing is in flight: compensation begins now.
                    let guard = |record: &RunRecord, _: &RunState| {
                        admits(record, "cancel", &[RunStatus::Suspended, RunStatus::Paused])
                    };
                    let event = Event::CompensationStarted {
                        reason: REASON.into(),
                    };
                    cell.transition_if(
                        &*self.inner.env.store,
                        event,
                        guard,
                        RunStatus::Compensating,
                        |r| r.error = Some(REASON.into()),
                    )?;
                    return Ok(true);
                }
                cell.append_if(
                    &*self.inner.env.store,
                    Event::CancelRequested,
                    |record, _| admits(record, "cancel", &[RunStatus::Running]),
                )?;
                Ok(true)
            })
            .await?;
        let made = outcome.is_some();
        if let Some(cell) = outcome {
            cell.requests.cancel();
            cell.publish();
            tracing::info!(run_id = %cell.id, "cancel requested");
        }
        Ok((self.status(id).await?, made))
    }

    /// Pauses running run `id`: the request is durable when this returns; no new step or
    /// child run starts from then on (nor a timer or a poll, once the run hears of it, which
    /// is when this returns or before), in-flight steps finish and are recorded,
    /// and the run's status becomes `paused` (await it with [`Engine::wait`]). A paused run
    /// stays paused across restarts until [`Engine::resume`] (or is cancelled). Pausing a
    /// run that is paused or pausing changes nothing; only running runs can be paused.
    pub async fn pause(&self, id: &str) -> Result<RunRecord> {
        self.pause_made(id, None).await.map(|(record, _)| record)
    }

    /// [`Engine::pause`], and whether this call made the pause (`false`: one was standing
    /// already, or the run was paused).
    pub(super) async fn pause_made(
        &self,
        id: &str,
        created_at: Option<u64>,
    ) -> Result<(RunRecord, bool)> {
        let outcome = self
            .operate(id, created_at, "pause", |cell| {
                let already =
                    cell.with_state(|s| s.pause_requested) || cell.status() == RunStatus::Paused;
                if already {
                    return Ok(false);
                }
                cell.append_if(
                    &*self.inner.env.store,
                    Event::PauseRequested,
                    |record, state| {
                        admits(record, "pause", &[RunStatus::Running])?;
                        refuse_if_cancelled(record, state, "pause")
                    },
                )?;
                Ok(true)
            })
            .await?;
        let made = outcome.is_some();
        if let Some(cell) = outcome {
            cell.tell_pause();
            tracing::info!(run_id = %cell.id, "pause requested");
        }
        Ok((self.status(id).await?, made))
    }

    /// Takes up a `Paused` run again (a step that had run out of retries gets a new round
    /// of attempts), withdraws a pause request the run has not reached yet, or takes up a
    /// `Suspended` run after its workflow code was fixed.
    pub async fn resume(&self, id: &str) -> Result<RunRecord> {
        self.resume_for(id, None).await
    }

    /// [`Engine::resume`]; with `created_at`, only of the run of `id` created then
    /// ([`Engine::operate`]).
    pub(super) async fn resume_for(&self, id: &str, created_at: Option<u64>) -> Result<RunRecord> {
        let record = self.record(id).await?;
        same_run(created_at, &record)?;
        if self.inner.workflows.get(&record.workflow).is_none() {
            // Resumed, nobody here could run its body.
            return Err(EngineError::InvalidState {
                id: record.id,
                status: format!(
                    "{} and its workflow {:?} is not registered with this engine",
                    record.status, record.workflow
                ),
                operation: "resume",
            });
        }
        let outcome = self
            .operate(id, created_at, "resume", |cell| {
                // Decided on the status read here, checked again under the cell lock: a
                // pausing run may settle as paused in between, and then the resume is
                // decided again on that status (once: only an operator call moves a paused
                // run on), rather than refused as "paused".
                let mut written = self.resume_as(cell, cell.status());
                if let Err(EngineError::InvalidState { .. }) = written {
                    let now = cell.status();
                    if now == RunStatus::Paused {
                        written = self.resume_as(cell, now);
                    }
                }
                written.map(|()| true)
            })
            .await?;
        if let Some(cell) = outcome {
            cell.tell_pause();
            cell.publish();
            tracing::info!(run_id = %cell.id, "run resumed");
        }
        self.status(id).await
    }

    /// `resume`'s write on a run read as `status`: a running run's pause request is
    /// withdrawn, a suspended or paused run is taken up.
    fn resume_as(&self, cell: &RunCell, status: RunStatus) -> Result<()> {
        let store = &*self.inner.env.store;
        if status == RunStatus::Running {
            return cell.append_if(store, Event::RunResumed, |record, state| {
                admits(record, "resume", &[RunStatus::Running])?;
                if !state.pause_requested {
                    return Err(EngineError::InvalidState {
                        id: record.id.clone(),
                        status: "running and not paused".into(),
                        operation: "resume",
                    });
                }
                Ok(())
            });
        }
        let guard = |record: &RunRecord, _: &RunState| {
            admits(record, "resume", &[RunStatus::Suspended, RunStatus::Paused])
        };
        cell.transition_if(store, Event::RunResumed, guard, RunStatus::Running, |r| {
            r.error = None
        })
    }

    /// Retries the compensation of a run in `CompensationFailed`.
    pub async fn retry_compensation(&self, id: &str) -> Result<RunRecord> {
        self.retry_compensation_for(id, None).await
    }

    /// [`Engine::retry_compensation`]; with `created_at`, only of the run of `id` created
    /// then ([`Engine::operate`]).
    pub(super) async fn retry_compensation_for(
        &self,
        id: &str,
        created_at: Option<u64>,
    ) -> Result<RunRecord> {
        self.transition_settled(
            id,
            created_at,
            "retry compensation",
            Event::CompensationRetried,
            RunStatus::Compensating,
        )
        .await
    }

    /// Marks a run in `CompensationFailed` as settled by an operator (terminal `Resolved`).
    pub async fn resolve(&self, id: &str, note: &str) -> Result<RunRecord> {
        self.resolve_for(id, note, None).await
    }

    /// [`Engine::resolve`]; with `created_at`, only of the run of `id` created then
    /// ([`Engine::operate`]).
    pub(super) async fn resolve_for(
        &self,
        id: &str,
        note: &str,
        created_at: Option<u64>,
    ) -> Result<RunRecord> {
        if note.len() > ERROR_MESSAGE_BYTES_MAX {
            return Err(EngineError::TooLarge {
                what: format!("resolution note of run {id}"),
                bytes: note.len(),
                limit: ERROR_MESSAGE_BYTES_MAX,
            });
        }
        let event = Event::RunResolved { note: note.into() };
        self.transition_settled(id, created_at, "resolve", event, RunStatus::Resolved)
            .await
    }

    /// A transition out of `CompensationFailed`.
    async fn transition_settled(
        &self,
        id: &str,
        created_at: Option<u64>,
        operation: &'static str,
        event: Event,
        to: RunStatus,
    ) -> Result<RunRecord> {
        let outcome = self
            .operate(id, created_at, operation, |cell| {
                let guard = |record: &RunRecord, _: &RunState| {
                    admits(record, operation, &[RunStatus::CompensationFailed])
                };
                cell.transition_if(&*self.inner.env.store, event.clone(), guard, to, |_| {})?;
                Ok(true)
            })
            .await?;
        if let Some(cell) = outcome {
            cell.publish();
        }
        self.status(id).await
    }

    /// Moves completed child run `child` into compensation (its own saga), for `reason`.
    async fn compensate_completed(&self, child: &RunId, reason: &str) -> Result<()> {
        let cell = self
            .operate(child.as_str(), None, "compensate for its parent", |cell| {
                let guard = |record: &RunRecord, _: &RunState| {
                    admits(record, "compensate", &[RunStatus::Completed])
                };
                let event = Event::CompensationStarted {
                    reason: reason.into(),
                };
                cell.transition_if(
                    &*self.inner.env.store,
                    event,
                    guard,
                    RunStatus::Compensating,
                    |r| {
                        r.error = Some(reason.into());
                        r.output = None;
                        r.finished_at_ms = None;
                    },
                )?;
                Ok(true)
            })
            .await?;
        if let Some(cell) = cell {
            cell.publish();
        }
        Ok(())
    }

    /// Undoes child run `child` for its parent's saga and waits until the child settled: a
    /// completed child compensates (its own saga), a running, suspended or paused one is
    /// cancelled, one whose compensation had already failed is retried once. Returns the child's final
    /// record (compensated, failed, resolved, or still `CompensationFailed`), or `None` if
    /// the child was never created.
    pub(crate) async fn compensate_child(
        &self,
        child: &RunId,
        parent: &RunId,
    ) -> Result<Option<RunRecord>> {
        let reason = format!("parent run {parent} compensates");
        let mut retried = false;
        for _ in 0..8 {
            if *self.inner.env.shutdown.borrow() {
                return Err(EngineError::ShutDown);
            }
            let Some(record) = self.inner.env.store.run(child).await? else {
                return Ok(None);
            };
            let asked = match record.status {
                RunStatus::Completed => self.compensate_completed(child, &reason).await,
                RunStatus::Running | RunStatus::Suspended | RunStatus::Paused => {
                    self.cancel(child.as_str()).await.map(|_| ())
                }
                RunStatus::CompensationFailed if !retried => {
                    retried = true;
                    self.retry_compensation(child.as_str()).await.map(|_| ())
                }
                RunStatus::Compensating | RunStatus::CompensationFailed => Ok(()),
                RunStatus::Failed | RunStatus::Compensated | RunStatus::Resolved => {
                    return Ok(Some(record))
                }
            };
            match asked {
                // From here on a failed compensation is the answer, not something to retry.
                Ok(()) => retried = true,
                // The child moved on meanwhile: look again.
                Err(EngineError::InvalidState { .. }) => continue,
                Err(e) => return Err(e),
            }
            let record = self.wait(child.as_str()).await?;
            match record.status {
                RunStatus::Failed | RunStatus::Compensated | RunStatus::Resolved => {
                    return Ok(Some(record))
                }
                RunStatus::CompensationFailed if retried => return Ok(Some(record)),
                _ => {}
            }
        }
        Err(EngineError::InvalidState {
            id: child.clone(),
            status: "not settling (is its workflow registered here?)".into(),
            operation: "compensate for its parent",
        })
    }

    /// Runs an operator `write` against run `id`'s cell, makes it durable, and leaves the run
    /// driven if it must be. `write` returns whether it wrote; the written cell is returned.
    /// A cell unloaded during the call is loaded again and the write retried.
    ///
    /// With `created_at`, the call is for the run of `id` created then (the one a batch's
    /// scan read), else it answers `RunNotFound`: checked on the record before the run is
    /// loaded (another run is not loaded, nor taken from another engine, for nothing), and
    /// again on the loaded cell, which no delete of this engine takes away while it is in
    /// the engine's map (a purge and a collection skip a loaded run), so a run deleted and
    /// started again under the id at any moment before is never written here. (A delete by
    /// another engine sharing the database does not look at this map: the write is fenced
    /// then.)
    async fn operate(
        &self,
        id: &str,
        created_at: Option<u64>,
        operation: &'static str,
        write: impl Fn(&Arc<RunCell>) -> Result<bool>,
    ) -> Result<Option<Arc<RunCell>>> {
        self.operate_with(id, created_at, operation, true, write)
            .await
    }

    /// [`Engine::operate`]; with `takes_up` false, the write does not count as an operator
    /// taking the run up (an event sent to it), so its crash-loop count stands (`poison.rs`).
    pub(super) async fn operate_with(
        &self,
        id: &str,
        created_at: Option<u64>,
        operation: &'static str,
        takes_up: bool,
        write: impl Fn(&Arc<RunCell>) -> Result<bool>,
    ) -> Result<Option<Arc<RunCell>>> {
        for _ in 0..8 {
            let record = self.record(id).await?;
            same_run(created_at, &record)?;
            if created_at.is_some() {
                // A call for a given run (a batch's action, a rerun's note), between its
                // check of the run as stored and its load (whose cell is checked again below).
                crate::crash::point("operator.before_load");
            }
            let run_id = record.id.clone();
            let loaded = self
                .load_cell(record, Takeover::Always)
                .await?
                .ok_or(EngineError::RunNotFound { id: run_id })?;
            let cell = match &loaded {
                Loaded::Fresh(cell) | Loaded::Existing(cell) => Arc::clone(cell),
            };
            let mut wrote = cell
                .with_record(|record| same_run(created_at, record))
                .and_then(|()| write(&cell));
            if takes_up && matches!(wrote, Ok(true)) && cell.status().is_drivable() {
                // An operator took the run up (resumed, cancelled, retried): the deaths of
                // earlier loads no longer count against it (`poison.rs`), whether this call
                // loaded it or its driver still holds it.
                if let Err(error) = self.inner.env.store.set_load_count(&cell.id, 0) {
                    wrote = Err(error);
                }
            }
            if let Loaded::Fresh(cell) = &loaded {
                // This call loaded (and, on a shared store, took) the run: drive it if it is
                // drivable, the write refused or not (nobody else drives it now), else unload
                // it again. Decided under the cell lock (`Inner::unload_if_settled`): another
                // call that found this cell loaded may resume the run meanwhile, and then
                // either its write comes first and the run is driven here, or the unload
                // comes first and that call's write is refused and it loads the run afresh.
                let lost = matches!(
                    wrote,
                    Err(EngineError::Detached { .. } | EngineError::Fenced { .. })
                );
                if lost {
                    self.inner
                        .unload(cell, Stop::Error("an operator call failed".into()));
                } else if !self.inner.unload_if_settled(cell) {
                    self.spawn_driver(Arc::clone(cell));
                }
            }
            match wrote {
                Ok(true) => {
                    cell.durable(&*self.inner.env.store).await?;
                    return Ok(Some(cell));
                }
                Ok(false) => return Ok(None),
                Err(EngineError::Detached { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(EngineError::InvalidState {
            id: RunId::existing(id)?,
            status: "being loaded and unloaded concurrently".into(),
            operation,
        })
    }
}
