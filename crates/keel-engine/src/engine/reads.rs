//! Reading runs: records, journals and lists (each durable when returned), and waiting for a
//! run to settle, with every way a run can stop being driven answered.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cell::{RunCell, Stop};
use crate::engine::cells::InMemory;
use crate::engine::{Engine, RunFilter};
use crate::error::{EngineError, Result};
use crate::ids::RunId;
use crate::journal::{RunHistory, RunRecord, RunStatus};
use crate::replay::RunState;
use crate::store::RunsScan;

pub use crate::limits::RUNS_PAGE_MAX;

/// How often [`Engine::wait`] first reads a run another engine drives, and at most.
const POLL_FIRST: std::time::Duration = std::time::Duration::from_millis(20);
const POLL_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// Most records one [`Engine::list_page`] call reads when the query filters on more than
/// the id prefix (which the store applies itself by where it starts and stops reading; the
/// status too on a store with an index by status, PostgreSQL): the page then holds the
/// matches among them, possibly fewer than the limit, with `next` to read on.
pub const LIST_SCAN_RECORDS_MAX: usize = 10_000;

/// Which runs [`Engine::list_page`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunsQuery {
    /// Only runs in this status; every status when `None`.
    pub status: Option<RunStatus>,
    /// Start after this run id (the previous page's `next`); from the first when `None`.
    pub after: Option<String>,
    /// Only runs whose id begins with this (a fleet's children: `fleet-7/`); any when `None`.
    pub prefix: Option<String>,
    /// Most records in the page, 1 to [`RUNS_PAGE_MAX`].
    pub limit: usize,
    /// Only runs of this workflow.
    pub workflow: Option<String>,
    /// Only child runs of this run.
    pub parent: Option<String>,
    /// Only runs created at or after this time (ms since the Unix epoch).
    pub created_after_ms: Option<u64>,
    /// Only runs created before this time (ms since the Unix epoch).
    pub created_before_ms: Option<u64>,
}

impl RunsQuery {
    /// The criteria the store does not apply itself, as a batch filter; `None` when there
    /// are none.
    fn beyond_the_store(&self) -> Option<RunFilter> {
        let filter = RunFilter {
            workflow: self.workflow.clone(),
            parent: self.parent.clone(),
            created_after_ms: self.created_after_ms,
            created_before_ms: self.created_before_ms,
            ..RunFilter::default()
        };
        (!filter.is_empty()).then_some(filter)
    }
}

/// One page of run records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunsPage {
    /// The records, in id order.
    pub runs: Vec<RunRecord>,
    /// The `after` of the next page; `None` when this is the last.
    pub next: Option<RunId>,
}

impl Engine {
    /// The run record of `id`.
    ///
    /// Durable when returned: the read is followed by a sync, so a status (say, `completed`)
    /// is never reported before it would survive a crash. Group commit makes that sync cheap.
    pub async fn status(&self, id: &str) -> Result<RunRecord> {
        let record = self.record(id).await?;
        self.inner.env.store.sync().wait().await?;
        Ok(record)
    }

    /// The run record and every journal entry of `id`, durable when returned (see
    /// [`Engine::status`]).
    pub async fn history(&self, id: &str) -> Result<RunHistory> {
        let run = self.record(id).await?;
        let entries = self.inner.env.store.journal(&run.id).await?;
        self.inner.env.store.sync().wait().await?;
        Ok(RunHistory { run, entries })
    }

    /// Every readable run record (unreadable ones are logged and left out), durable when
    /// returned (see [`Engine::status`]).
    pub async fn list(&self) -> Result<Vec<RunRecord>> {
        let runs = self.records().await?;
        self.inner.env.store.sync().wait().await?;
        Ok(runs)
    }

    /// One page of the run records in id order: those after `query.after` with
    /// `query.status` (any when `None`), at most `query.limit` (1 to [`RUNS_PAGE_MAX`]). The
    /// page's `next` is the id to pass as `after` for the following page, `None` on the last.
    /// A page reads the store from `after` until it is full or has read
    /// [`LIST_SCAN_RECORDS_MAX`] records (a status few runs are in, on a store without an index
    /// by status), so its cost is bounded whatever the store holds; a page cut short holds
    /// fewer runs than the limit, or none, and its `next` reads on. Durable when returned (see
    /// [`Engine::status`]).
    pub async fn list_page(&self, query: &RunsQuery) -> Result<RunsPage> {
        if query.limit == 0 || query.limit > RUNS_PAGE_MAX {
            return Err(EngineError::InvalidRequest(format!(
                "limit {} is out of range (1..={RUNS_PAGE_MAX})",
                query.limit
            )));
        }
        let after = query.after.as_deref().map(RunId::existing).transpose()?;
        if let Some(filter) = query.beyond_the_store() {
            return self.list_filtered(query, &filter, after).await;
        }
        let scan = RunsScan {
            after,
            status: query.status,
            prefix: query.prefix.clone(),
            limit: query.limit,
            examine_max: Some(LIST_SCAN_RECORDS_MAX),
        };
        let page = self.inner.env.store.runs_page(&scan).await?;
        self.inner.env.store.sync().wait().await?;
        let mut runs = Vec::with_capacity(page.records.len());
        for record in page.records {
            match record {
                Ok(record) => runs.push(record),
                Err(error) => tracing::error!(%error, "run record unreadable: not listed"),
            }
        }
        let next = match (page.more, page.resume_after) {
            (false, _) => None,
            (true, Some(read_to)) => Some(read_to),
            (true, None) => runs.last().map(|r| r.id.clone()),
        };
        Ok(RunsPage { runs, next })
    }

    /// A page of the runs that match `filter` besides the store's own criteria: the store
    /// reads pages by status and id prefix (a parent's children share `parent/`), this keeps
    /// the matches, and stops at `query.limit` matches or [`LIST_SCAN_RECORDS_MAX`] records
    /// read, whichever comes first.
    async fn list_filtered(
        &self,
        query: &RunsQuery,
        filter: &RunFilter,
        mut after: Option<RunId>,
    ) -> Result<RunsPage> {
        let prefix = RunFilter {
            id_prefix: query.prefix.clone(),
            ..filter.clone()
        }
        .id_prefix_to_scan();
        let (mut runs, mut read) = (Vec::new(), 0);
        let next = loop {
            let chunk = (LIST_SCAN_RECORDS_MAX - read).min(1_000);
            let scan = RunsScan {
                after: after.clone(),
                status: query.status,
                prefix: prefix.clone(),
                limit: chunk,
                examine_max: Some(chunk),
            };
            let page = self.inner.env.store.runs_page(&scan).await?;
            // The store read at most `chunk` records (of other statuses, too) for this page.
            read += chunk;
            let mut full = None;
            for record in page.records {
                match record {
                    Ok(record) => {
                        after = Some(record.id.clone());
                        if filter.matches(&record) {
                            runs.push(record);
                            if runs.len() == query.limit {
                                full = after.clone();
                                break;
                            }
                        }
                    }
                    Err(error) => tracing::error!(%error, "run record unreadable: not listed"),
                }
            }
            if let Some(last) = full {
                break Some(last);
            }
            if !page.more {
                break None;
            }
            if let Some(read_to) = page.resume_after {
                after = Some(read_to);
            }
            if read >= LIST_SCAN_RECORDS_MAX {
                break after;
            }
        };
        self.inner.env.store.sync().wait().await?;
        Ok(RunsPage { runs, next })
    }

    /// How many runs the store holds in each status (statuses with none are left out): kept
    /// by the sled store as it writes records (taken from a clean close, else counted once
    /// at open: after a crash, with the wake index built, in the background, and a call
    /// waits for that count), counted by PostgreSQL from its index by status.
    pub async fn run_counts(&self) -> Result<BTreeMap<RunStatus, u64>> {
        self.inner.env.store.run_counts().await
    }

    /// The stored record of `id`, durable or not: for the engine's own decisions only.
    pub(super) async fn record(&self, id: &str) -> Result<RunRecord> {
        // Any id a run may have been made under, a child's or one of earlier rules.
        let id = RunId::existing(id)?;
        self.inner
            .env
            .store
            .run(&id)
            .await?
            .ok_or(EngineError::RunNotFound { id })
    }

    /// Every readable stored record, durable or not: for the engine's own decisions only.
    pub(super) async fn records(&self) -> Result<Vec<RunRecord>> {
        Ok(self.records_of(self.inner.env.store.runs().await?))
    }

    /// The readable records of `stored` (the others are logged and left out).
    pub(super) fn records_of(&self, stored: Vec<Result<RunRecord>>) -> Vec<RunRecord> {
        let mut runs = Vec::new();
        for record in stored {
            match record {
                Ok(record) => runs.push(record),
                Err(error) => tracing::error!(%error, "run record unreadable: not listed"),
            }
        }
        runs
    }

    /// Waits until run `id` settles (any status but running or compensating) and returns its
    /// record, through any number of parks of the run. Every way a run can stop being driven
    /// answers: [`EngineError::ShutDown`] when
    /// the engine shuts down under the run, [`EngineError::RunStopped`] when its driver
    /// stopped on an engine error or nobody here drives it (its workflow is not registered).
    /// On a store several engines share, a run another engine drives is watched in the
    /// store until it settles.
    pub async fn wait(&self, id: &str) -> Result<RunRecord> {
        let run_id = RunId::existing(id)?;
        let mut poll = POLL_FIRST;
        loop {
            let cell = self.loaded(&run_id);
            if let Some(cell) = &cell {
                let mut watched = cell.watched.subscribe();
                let stopped = match watched.wait_for(|w| w.answered()).await {
                    Ok(watched) => watched.stopped.clone(),
                    // The cell is gone: the store answers below.
                    Err(_) => None,
                };
                match stopped {
                    // Driven elsewhere now, or parked: looked at again below.
                    Some(Stop::Moved | Stop::Parked) | None => {}
                    Some(stop) => return Err(stop.error(&run_id)),
                }
            }
            let record = self.status(id).await?;
            if !record.status.is_drivable() {
                return Ok(record);
            }
            if *self.inner.env.shutdown.borrow() {
                return Err(EngineError::ShutDown);
            }
            let in_memory = self
                .inner
                .cells
                .lock()
                .expect("cells lock")
                .state_of(&run_id);
            match in_memory {
                // Taken up again (an operator resumed it) by the same or a fresh cell: wait on.
                InMemory::Loaded => continue,
                // Parked: waited for until it is loaded again, then watched as above.
                InMemory::Parked(unparked) => {
                    self.unparked(unparked, poll).await;
                    poll = (poll * 2).min(POLL_MAX);
                    continue;
                }
                InMemory::Absent => {
                    // Being started (its record written, its cell not in yet): looked at again
                    // once its cell is in.
                    let starting = self
                        .inner
                        .cells
                        .lock()
                        .expect("cells lock")
                        .settling_ends(&run_id);
                    if let Some(started) = starting {
                        started.await;
                        continue;
                    }
                    // Loaded, settled and unloaded since the status was read (a wake or a send
                    // took it up): the record says so now, or it is loaded again.
                    let record = self.record(id).await?;
                    let in_memory = self
                        .inner
                        .cells
                        .lock()
                        .expect("cells lock")
                        .state_of(&run_id);
                    if !record.status.is_drivable() || !matches!(in_memory, InMemory::Absent) {
                        continue;
                    }
                }
            }
            if self.driven_elsewhere(&record.id) {
                let mut shutdown = self.inner.env.shutdown.subscribe();
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.wait_for(|down| *down) => {}
                }
                poll = (poll * 2).min(POLL_MAX);
                continue;
            }
            let reason = self.undriven_reason(&record).await;
            return Err(EngineError::RunStopped { id: run_id, reason });
        }
    }

    /// Whether a running or compensating run not loaded here is another engine's to drive:
    /// the store is shared and this engine did not leave it undriven.
    pub(super) fn driven_elsewhere(&self, id: &RunId) -> bool {
        self.inner.env.store.claim_every().is_some()
            && !self
                .inner
                .undriven
                .lock()
                .expect("undriven lock")
                .contains_key(id)
    }

    /// Why a running or compensating run that is not loaded is not driven here.
    async fn undriven_reason(&self, record: &RunRecord) -> String {
        if let Some(reason) = self
            .inner
            .undriven
            .lock()
            .expect("undriven lock")
            .get(&record.id)
        {
            return reason.clone();
        }
        if record.status == RunStatus::Running
            && self.inner.workflows.get(&record.workflow).is_none()
        {
            return format!(
                "its workflow {:?} is not registered with this engine",
                record.workflow
            );
        }
        match self.inner.env.store.journal(&record.id).await {
            Err(error) => format!("its journal cannot be read: {error}"),
            Ok(entries) => match RunState::from_entries(&entries) {
                Err(detail) => format!("its journal is corrupt: {detail}"),
                Ok(_) => {
                    "its driver stopped on an engine error; it resumes at the next open".into()
                }
            },
        }
    }

    /// Whether run `id` is loaded or settling out (its cell removing its wake index entry,
    /// which a new run of the same id would have): a run neither deletion may touch.
    pub(super) fn held(&self, id: &RunId) -> bool {
        self.inner
            .cells
            .lock()
            .expect("cells lock")
            .contains_key(id)
    }

    /// The loaded cell of `id`, if any.
    pub(super) fn loaded(&self, id: &RunId) -> Option<Arc<RunCell>> {
        self.inner
            .cells
            .lock()
            .expect("cells lock")
            .get(id)
            .cloned()
    }
}
