//! Operator actions over every run a filter matches: cancel, pause, resume, retry a failed
//! compensation, resolve, rerun, purge. A call acts on at most [`BATCH_RUNS_MAX`] runs and
//! says where the next call goes on (a continuation token: when the batch began and the last
//! run id it looked at), so
//! a fleet's thousand runs are acted on in bounded steps that each report, per run, what was
//! done or why it was skipped. Each run's action is the engine's own operator call, durable
//! when it is reported; a batch cut short by a crash is repeated from its last token, and
//! every run whose action took effect is skipped the second time (its status no longer
//! admits it, a cancel or pause it asked for still stands, or, for a rerun, it was rerun
//! already).

use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};

use crate::engine::purge::LOADED;
use crate::engine::rerun::Rerun;
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::ids::RunId;
use crate::journal::{RunRecord, RunStatus};
use crate::replay::RunState;
use crate::store::RunsScan;

pub use crate::limits::BATCH_RUNS_MAX;

/// Run records read per store page while a batch scans.
const SCAN_PAGE: usize = 1000;

/// Most records one call reads past before it returns a continuation, whatever it matched:
/// a filter that matches little in a large store costs each call this much, not the store.
const SCAN_RECORDS_MAX: usize = 50_000;

/// Runs acted on at once within a call: their writes share the store's group commits.
const ACTIONS_CONCURRENT: usize = 16;

/// Which runs a batch (or a purge) applies to. Every field given must hold; at least one
/// must be given, so that no batch acts on every run by omission.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFilter {
    /// Runs in any of these statuses; any status when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<RunStatus>,
    /// Runs of this workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Runs whose id begins with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_prefix: Option<String>,
    /// Child runs of this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Runs created at or after this time (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_after_ms: Option<u64>,
    /// Runs created before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_before_ms: Option<u64>,
    /// Runs that finished before this time (finished runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_before_ms: Option<u64>,
}

impl RunFilter {
    /// Whether the filter names no criterion at all.
    pub fn is_empty(&self) -> bool {
        self == &RunFilter::default()
    }

    /// Whether `record` matches.
    pub fn matches(&self, record: &RunRecord) -> bool {
        let parent = self.parent.as_deref();
        (self.statuses.is_empty() || self.statuses.contains(&record.status))
            && self.workflow.as_ref().is_none_or(|w| *w == record.workflow)
            && self
                .id_prefix
                .as_ref()
                .is_none_or(|p| record.id.as_str().starts_with(p.as_str()))
            && parent.is_none_or(|p| record.parent.as_ref().is_some_and(|rp| rp.as_str() == p))
            && self
                .created_after_ms
                .is_none_or(|at| record.created_at_ms >= at)
            && self
                .created_before_ms
                .is_none_or(|at| record.created_at_ms < at)
            && self
                .finished_before_ms
                .is_none_or(|at| record.finished_at_ms.is_some_and(|f| f < at))
    }

    /// The id prefix every record this filter can match begins with: its own, or its
    /// parent's children's (`parent/`, unless the parent's id is long enough for a child's
    /// to be `child-<uuid>`: [`crate::ids::children_under`]); the longer when both (it
    /// implies the other, or nothing matches).
    pub(super) fn id_prefix_to_scan(&self) -> Option<String> {
        let children = self
            .parent
            .as_ref()
            .filter(|p| crate::ids::children_under(p))
            .map(|p| format!("{p}/"));
        match (self.id_prefix.clone(), children) {
            (Some(a), Some(b)) => Some(if a.len() >= b.len() { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// The store scan that visits every record this filter can match.
    fn scan(&self, after: Option<RunId>, limit: usize) -> RunsScan {
        let prefix = self.id_prefix_to_scan();
        RunsScan {
            after,
            // Statuses are matched here, not by the store: a page then reads at most `limit`
            // records, so a call's bound on records read holds whatever the filter.
            status: None,
            prefix,
            limit,
            examine_max: None,
        }
    }
}

/// What a batch does to each run it matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum BatchAction {
    /// [`Engine::cancel`]: running, suspended and paused runs compensate.
    Cancel,
    /// [`Engine::pause`]: running runs.
    Pause,
    /// [`Engine::resume`]: paused and suspended runs.
    Resume,
    /// [`Engine::retry_compensation`]: runs whose compensation failed.
    RetryCompensation,
    /// [`Engine::resolve`] with this note: runs whose compensation failed.
    Resolve {
        /// What the operator did.
        note: String,
    },
    /// [`Engine::rerun`] with the same input under the default id: finished runs not rerun
    /// before.
    Rerun,
    /// Deletes finished runs (and their finished children) with their journals.
    Purge,
}

impl BatchAction {
    /// The action's name, as the API spells it.
    pub fn name(&self) -> &'static str {
        match self {
            BatchAction::Cancel => "cancel",
            BatchAction::Pause => "pause",
            BatchAction::Resume => "resume",
            BatchAction::RetryCompensation => "retry_compensation",
            BatchAction::Resolve { .. } => "resolve",
            BatchAction::Rerun => "rerun",
            BatchAction::Purge => "purge",
        }
    }

    /// The statuses a run must be in for the action to apply.
    fn admits(&self) -> &'static [RunStatus] {
        use RunStatus::*;
        match self {
            BatchAction::Cancel => &[Running, Suspended, Paused],
            BatchAction::Pause => &[Running],
            BatchAction::Resume => &[Paused, Suspended],
            BatchAction::RetryCompensation | BatchAction::Resolve { .. } => &[CompensationFailed],
            BatchAction::Rerun | BatchAction::Purge => &[Completed, Failed, Compensated, Resolved],
        }
    }
}

/// A batch: an action, the runs it applies to, and where this call starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// What to do.
    #[serde(flatten)]
    pub action: BatchAction,
    /// To which runs.
    pub filter: RunFilter,
    /// Only count the matches and list the first `limit`, with what would be done to each.
    #[serde(default)]
    pub dry_run: bool,
    /// The previous call's `next` (opaque): go on where it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Most runs acted on (or listed, in a dry run), 1 to [`BATCH_RUNS_MAX`].
    pub limit: usize,
}

/// What a batch did (or, in a dry run, would do) to one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchOutcome {
    /// The action took effect (durable).
    Done,
    /// The run's state does not admit the action; `reason` says why.
    Skipped,
    /// The action failed; `reason` has the error. The next run is still acted on.
    Failed,
    /// Dry run: the action would apply.
    WouldAct,
    /// Dry run: the run would be skipped; `reason` says why.
    WouldSkip,
}

/// One run of a batch's report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchRun {
    /// The run.
    pub id: RunId,
    /// Its workflow.
    pub workflow: String,
    /// Its status when the batch found it.
    pub status: RunStatus,
    /// What happened.
    pub outcome: BatchOutcome,
    /// Its status after the action (when it was done and the run is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now: Option<RunStatus>,
    /// Why it was skipped or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The rerun started (a rerun batch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun: Option<RunId>,
}

/// What one batch call did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchReport {
    /// The action.
    pub action: String,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// Runs matched by this call (a dry run: every match after `after` among the records it
    /// read; `next` is set when it stopped at its bound of records read).
    pub matched: u64,
    /// Runs the action took effect on (a dry run: would take effect on).
    pub done: u64,
    /// Runs skipped for their state.
    pub skipped: u64,
    /// Runs whose action failed.
    pub failed: u64,
    /// Per run, in id order (a dry run: the first `limit` matches).
    pub runs: Vec<BatchRun>,
    /// Where the next call goes on (pass it as `after`); `None` when every match was seen.
    pub next: Option<String>,
}

impl Engine {
    /// Applies `batch.action` to the runs `batch.filter` matches after `batch.after`, at most
    /// `batch.limit` of them, and reports per run what happened; or, with `dry_run`, counts
    /// the matches, lists the first `limit` and changes nothing. Either reads at most 50,000
    /// records and then says where to go on (`next`).
    ///
    /// Each run's action is the engine's own operator call and is durable when reported.
    /// A run whose status does not admit the action is skipped with the reason; a run whose
    /// action fails is reported as failed and the batch goes on. The report's `next` is where
    /// a following call goes on; `None` once every match was seen. Repeating a call (its
    /// answer lost) acts on nothing twice: a run acted on no longer admits the action (a
    /// running run whose cancel or pause is requested and not yet reached is skipped, and a
    /// rerun batch skips runs rerun before).
    pub async fn batch(&self, batch: &Batch) -> Result<BatchReport> {
        self.check_batch(batch)?;
        let mut report = BatchReport {
            action: batch.action.name().into(),
            dry_run: batch.dry_run,
            matched: 0,
            done: 0,
            skipped: 0,
            failed: 0,
            runs: Vec::new(),
            next: None,
        };
        let mut matched = Vec::new();
        // A batch acts on the runs that existed when its first call began: a run started
        // since (a rerun this batch made, whose id sorts after its original's) is never
        // matched by a later call.
        let (began_ms, mut after) = match batch.after.as_deref() {
            Some(token) => {
                let (began_ms, last) = Continuation::parse(token)?;
                (began_ms, Some(last))
            }
            None => (self.inner.env.clock.now_ms(), None),
        };
        let token =
            |after: &Option<RunId>| after.as_ref().map(|id| Continuation::format(began_ms, id));
        let mut scanned = 0;
        'scan: loop {
            let scan = batch.filter.scan(after.clone(), SCAN_PAGE);
            let page = self.inner.env.store.runs_page(&scan).await?;
            for record in page.records {
                let record = match record {
                    Ok(record) => record,
                    Err(error) => {
                        tracing::error!(%error, "run record unreadable: left out of the batch");
                        continue;
                    }
                };
                scanned += 1;
                after = Some(record.id.clone());
                if !batch.filter.matches(&record) || started_since(&record, began_ms) {
                    continue;
                }
                if batch.dry_run {
                    report.matched += 1;
                    let skip = self.skip_reason(&batch.action, &record, true).await?;
                    if skip.is_none() {
                        report.done += 1;
                    } else {
                        report.skipped += 1;
                    }
                    if report.runs.len() < batch.limit {
                        report.runs.push(planned(record, skip));
                    }
                    continue;
                }
                matched.push(record);
                if matched.len() == batch.limit || scanned >= SCAN_RECORDS_MAX {
                    report.next = token(&after);
                    break 'scan;
                }
            }
            if !page.more {
                break;
            }
            if scanned >= SCAN_RECORDS_MAX {
                report.next = token(&after);
                break;
            }
        }
        if batch.dry_run {
            self.inner.env.store.sync().wait().await?;
            return Ok(report);
        }
        report.matched = matched.len() as u64;
        let runs: Vec<BatchRun> = stream::iter(matched)
            .map(|record| self.act(&batch.action, record))
            .buffered(ACTIONS_CONCURRENT)
            .collect()
            .await;
        for run in &runs {
            match run.outcome {
                BatchOutcome::Done => report.done += 1,
                BatchOutcome::Failed => report.failed += 1,
                _ => report.skipped += 1,
            }
        }
        report.runs = runs;
        if report.next.is_some() && report.matched < batch.limit as u64 {
            // Cut by the scan bound: say how far it got.
            tracing::info!(scanned, "batch scanned its bound; the next call goes on");
        }
        tracing::info!(
            action = batch.action.name(),
            done = report.done,
            skipped = report.skipped,
            failed = report.failed,
            "batch acted"
        );
        Ok(report)
    }

    fn check_batch(&self, batch: &Batch) -> Result<()> {
        if batch.limit == 0 || batch.limit > BATCH_RUNS_MAX {
            return Err(EngineError::InvalidRequest(format!(
                "limit {} is out of range (1..={BATCH_RUNS_MAX})",
                batch.limit
            )));
        }
        let filter = &batch.filter;
        if filter.is_empty() {
            return Err(EngineError::InvalidRequest(
                "a batch needs a filter: give at least one of statuses, workflow, id_prefix, \
                 parent, created_after, created_before, finished_before"
                    .into(),
            ));
        }
        if let (Some(from), Some(to)) = (filter.created_after_ms, filter.created_before_ms) {
            if from >= to {
                return Err(EngineError::InvalidRequest(format!(
                    "created_after ({from} ms) is not before created_before ({to} ms): \
                     nothing can match"
                )));
            }
        }
        if let Some(parent) = &filter.parent {
            RunId::existing(parent.as_str())?;
        }
        if matches!(batch.action, BatchAction::Purge) {
            if filter.finished_before_ms.is_none() {
                return Err(EngineError::InvalidRequest(
                    "a purge needs finished_before: only runs that finished before it are \
                     deleted"
                        .into(),
                ));
            }
            if let Some(status) = filter.statuses.iter().find(|s| !s.is_terminal()) {
                return Err(EngineError::InvalidRequest(format!(
                    "a purge deletes finished runs only: status {status} is not finished \
                     (completed, failed, compensated, resolved)"
                )));
            }
        }
        if let BatchAction::Resolve { note } = &batch.action {
            if note.trim().is_empty() {
                return Err(EngineError::InvalidRequest(
                    "a resolve needs a note saying what the operator did".into(),
                ));
            }
        }
        Ok(())
    }

    /// Why `record` would be skipped by `action`, or `None` if the action applies. A dry run
    /// (`dry_run`) reads no journal to tell.
    async fn skip_reason(
        &self,
        action: &BatchAction,
        record: &RunRecord,
        dry_run: bool,
    ) -> Result<Option<String>> {
        let admits = action.admits();
        if !admits.contains(&record.status) {
            let words: Vec<&str> = admits.iter().map(|s| s.as_str()).collect();
            return Ok(Some(format!(
                "is {}: {} needs {}",
                record.status,
                action.name(),
                words.join(" or ")
            )));
        }
        match action {
            BatchAction::Cancel | BatchAction::Pause if record.status == RunStatus::Running => {
                Ok(self.standing_request(action, &record.id, !dry_run).await)
            }
            BatchAction::Rerun => Ok(self
                .reruns_of(&record.id)
                .await?
                .last()
                .map(|rerun| format!("was rerun already, as {rerun}"))),
            BatchAction::Purge => {
                if let Some(parent) = &record.parent {
                    if self.inner.env.store.run(parent).await?.is_some() {
                        return Ok(Some(format!(
                            "its parent {parent} is kept (it is deleted with it)"
                        )));
                    }
                }
                if self.held(&record.id) {
                    return Ok(Some(LOADED.into()));
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Why a cancel or a pause (`action`) of running run `id` would change nothing: a cancel
    /// already requested (a pause is refused then), or a pause already requested, that the
    /// run has not reached yet (its step is in flight). Told from the run's cell when it is
    /// loaded here; when another engine drives it (a shared store) and `read_journal`, from
    /// its journal, since the call would take the run over from its driver only to find the
    /// request there. Otherwise `None`, and the call itself tells: on a store of one engine,
    /// a running run that is not loaded is one whose driver stopped, and the call loads and
    /// drives it again.
    async fn standing_request(
        &self,
        action: &BatchAction,
        id: &RunId,
        read_journal: bool,
    ) -> Option<String> {
        let read = |state: &RunState| (state.cancel_requested, state.pause_requested);
        let (cancel, pause) = if let Some(cell) = self.loaded(id) {
            cell.with_state(read)
        } else if read_journal && self.driven_elsewhere(id) {
            match self.read_state(id).await {
                Ok(state) => read(&state),
                Err(error) => return Some(format!("its journal cannot be read: {error}")),
            }
        } else {
            return None;
        };
        match action {
            BatchAction::Cancel if cancel => Some(already_requested(action).into()),
            BatchAction::Pause if cancel => Some("is cancelled: cannot pause".into()),
            BatchAction::Pause if pause => Some(already_requested(action).into()),
            _ => None,
        }
    }

    /// Applies `action` to `record`'s run and says what happened.
    async fn act(&self, action: &BatchAction, record: RunRecord) -> BatchRun {
        let created_at_ms = record.created_at_ms;
        let mut run = planned(record, None);
        let outcome = self.act_on(action, &mut run, created_at_ms).await;
        match outcome {
            Ok(Some(reason)) => {
                run.outcome = BatchOutcome::Skipped;
                run.reason = Some(reason);
            }
            Ok(None) => run.outcome = BatchOutcome::Done,
            Err(EngineError::InvalidState { status, .. }) => {
                // The run moved on between the check and the action.
                run.outcome = BatchOutcome::Skipped;
                run.reason = Some(format!("is {status}: cannot {}", action.name()));
            }
            Err(EngineError::RunNotFound { .. }) => {
                run.outcome = BatchOutcome::Skipped;
                run.reason = Some("no longer exists".into());
            }
            Err(error) => {
                tracing::warn!(run_id = %run.id, action = action.name(), %error, "batch action failed");
                run.outcome = BatchOutcome::Failed;
                run.reason = Some(error.to_string());
            }
        }
        run
    }

    /// The action on `run`, the run of that id created at `created_at_ms` that the batch's
    /// scan read: `Some(reason)` when skipped, else done (with `run.now` and `run.rerun`
    /// filled in).
    async fn act_on(
        &self,
        action: &BatchAction,
        run: &mut BatchRun,
        created_at_ms: u64,
    ) -> Result<Option<String>> {
        let id = run.id.to_string();
        // The scan's copy may be stale: the check is made on the record as stored now. The
        // action checks the creation time again where no delete can come between (a run
        // deleted and started again from here on is `RunNotFound` to it).
        let record = self.record(&id).await?;
        if record.created_at_ms != created_at_ms {
            return Ok(Some(STARTED_AGAIN.into()));
        }
        if let Some(reason) = self.skip_reason(action, &record, false).await? {
            return Ok(Some(reason));
        }
        crate::crash::point("batch.before_action");
        let of = Some(created_at_ms);
        let now = match action {
            BatchAction::Cancel | BatchAction::Pause => {
                let (now, made) = match action {
                    BatchAction::Cancel => self.cancel_made(&id, of).await?,
                    _ => self.pause_made(&id, of).await?,
                };
                if !made {
                    // The run moved on since the check: another call's request came in, or
                    // it began compensating (or paused) of its own accord.
                    return Ok(Some(match now.status {
                        RunStatus::Running => already_requested(action).into(),
                        status => format!("is {status}: cannot {}", action.name()),
                    }));
                }
                now
            }
            BatchAction::Resume => self.resume_for(&id, of).await?,
            BatchAction::RetryCompensation => self.retry_compensation_for(&id, of).await?,
            BatchAction::Resolve { note } => self.resolve_for(&id, note, of).await?,
            BatchAction::Rerun => {
                run.rerun = Some(self.rerun_for(&id, &Rerun::default(), of).await?.id);
                record
            }
            BatchAction::Purge => {
                if let Some(reason) = self.purge_one(&run.id, created_at_ms).await? {
                    return Ok(Some(reason));
                }
                crate::crash::point("batch.after_action");
                return Ok(None);
            }
        };
        crate::crash::point("batch.after_action");
        run.now = Some(now.status);
        Ok(None)
    }
}

/// Why a batch skips a run whose id now names another run than the one its scan read (that
/// one was deleted, and a run started under its id since).
pub(super) const STARTED_AGAIN: &str = "was deleted and started again since the batch read it";

/// Whether `record`'s run was started after a batch that began at `began_ms`: later, or a
/// rerun in the same millisecond (the clock's grain; a run the batch reruns is older).
fn started_since(record: &RunRecord, began_ms: u64) -> bool {
    record.created_at_ms > began_ms
        || (record.rerun_of.is_some() && record.created_at_ms == began_ms)
}

/// A batch's continuation token: `<ms the batch began>~<last run id read>` (`~` is no
/// run-id character).
struct Continuation;

impl Continuation {
    fn format(began_ms: u64, last: &RunId) -> String {
        format!("{began_ms}~{last}")
    }

    fn parse(token: &str) -> Result<(u64, RunId)> {
        let bad = || {
            EngineError::InvalidRequest(format!(
                "continuation {token:?} is not one a batch returned (pass its `next` as is)"
            ))
        };
        let (began, last) = token.split_once('~').ok_or_else(bad)?;
        let began = began.parse().map_err(|_| bad())?;
        let last = RunId::existing(last).map_err(|_| bad())?;
        Ok((began, last))
    }
}

/// A report line for `record` before anything is done: what a dry run says of it.
fn planned(record: RunRecord, skip: Option<String>) -> BatchRun {
    BatchRun {
        id: record.id,
        workflow: record.workflow,
        status: record.status,
        outcome: if skip.is_some() {
            BatchOutcome::WouldSkip
        } else {
            BatchOutcome::WouldAct
        },
        now: None,
        reason: skip,
        rerun: None,
    }
}

/// Why a batch skips a running run whose `action` (a cancel or a pause) is already requested:
/// the request stands until the run's steps in flight end, and a second one would change
/// nothing.
fn already_requested(action: &BatchAction) -> &'static str {
    match action {
        BatchAction::Cancel => "is running with a cancel already requested: it compensates once its steps in flight end",
        _ => "is running with a pause already requested: it pauses once its steps in flight end",
    }
}
