//! Resuming at open: every unfinished run is read and folded once; the engine refuses to open,
//! naming every missing type, when a run needs a workflow or a step kind that is not
//! registered (unless the operator allows it, and then those runs are left as they are); then
//! every running or compensating run gets its driver. On a store several engines share, "every
//! run" is every run this engine claimed (`store/postgres/lease.rs`), at open and then every
//! claim interval: a run whose owner died is adopted the same way. Claims take only runs that
//! are due (their wake time, kept in the run's row, has come).
//!
//! A store is read that way only when a type its runs use (`types_used.rs`) is not listed as
//! registered here, or, on sled, its wake index is not built yet; then the read builds the
//! list and the index. Otherwise sled's open reads the index: the runs due are read, checked
//! and driven as above, and the others are parked without being read
//! (`Cells::park_unread`); and on a shared store the open reads only the runs it claims.
//!
//! What a run needs registered:
//! - its workflow, while the body may still run: `running`, `suspended`, `paused`;
//! - the kind of every step its saga may still have to undo (completed or in doubt, not yet
//!   undone, with a compensation: [`crate::Step::COMPENSABLE`] steps): every unfinished run,
//!   and a completed child run with an unfinished ancestor reached through completed runs
//!   (that ancestor may compensate it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::cell::RunCell;
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::ids::{OperationIndex, RunId};
use crate::journal::{RunRecord, RunStatus};
use crate::registry::Registry;
use crate::replay::{step_undo_action, CompensationAction, RunState};
use crate::store::{Claimed, Token};
use crate::types_used::Types;
use crate::workflow::Workflows;

/// How many of the runs that need missing types an error names.
const EXAMPLES_NAMED: usize = 5;

/// The runs that need types this engine lacks, and those types.
#[derive(Default)]
pub(super) struct Unregistered {
    /// Each run, with what it lacks.
    pub(super) runs: BTreeMap<RunId, String>,
    workflows: BTreeSet<String>,
    step_kinds: BTreeSet<String>,
    /// Every type the runs checked need, registered or not (`types_used.rs`).
    needed: Types,
    /// Runs that could not be read (their journal), and so were not checked.
    unread: usize,
}

impl Unregistered {
    /// Notes what `record` (folded into `state`) needs that `registry` lacks.
    fn check(
        &mut self,
        workflows: &Workflows,
        registry: &Registry,
        record: &RunRecord,
        state: &RunState,
    ) {
        let mut lacks = Vec::new();
        let body_may_run = matches!(
            record.status,
            RunStatus::Running | RunStatus::Suspended | RunStatus::Paused
        );
        if body_may_run {
            self.needed.workflows.insert(record.workflow.clone());
        }
        if body_may_run && workflows.get(&record.workflow).is_none() {
            lacks.push(format!("workflow {:?}", record.workflow));
            self.workflows.insert(record.workflow.clone());
        }
        for index in 0..state.ops.len() {
            let index = OperationIndex(index as u32);
            let Some(op) = state.step(index) else {
                continue;
            };
            let must_undo = matches!(
                step_undo_action(state, index),
                Some(CompensationAction::Compensate { .. } | CompensationAction::Stuck { .. })
            );
            if must_undo {
                self.needed.step_kinds.insert(op.kind.clone());
            }
            if must_undo && registry.step(&op.kind).is_none() {
                lacks.push(format!("step kind {:?} (step {index})", op.kind));
                self.step_kinds.insert(op.kind.clone());
            }
        }
        if !lacks.is_empty() {
            self.runs.insert(record.id.clone(), lacks.join(", "));
        }
    }

    fn error(&self) -> EngineError {
        let quoted = |names: &BTreeSet<String>| {
            names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut missing = Vec::new();
        if !self.workflows.is_empty() {
            missing.push(format!("workflows {}", quoted(&self.workflows)));
        }
        if !self.step_kinds.is_empty() {
            missing.push(format!("step kinds {}", quoted(&self.step_kinds)));
        }
        let examples = self
            .runs
            .keys()
            .take(EXAMPLES_NAMED)
            .map(RunId::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        EngineError::Unregistered {
            runs: self.runs.len(),
            missing: missing.join("; "),
            examples,
        }
    }
}

/// Whether a completed run may still be compensated: an ancestor reached through completed
/// runs only is unfinished (a compensating run compensates its completed children, which
/// compensate theirs).
fn may_be_compensated(record: &RunRecord, lineage: &Lineage) -> bool {
    let (mut status, mut parent) = (record.status, record.parent.clone());
    // Bounded by the number of runs: an ancestor chain cannot be longer, even a corrupt one.
    for _ in 0..lineage.len() {
        if status != RunStatus::Completed {
            return !status.is_terminal();
        }
        match parent.as_ref().and_then(|parent| lineage.get(parent)) {
            Some((s, p)) => (status, parent) = (*s, p.clone()),
            None => return false,
        }
    }
    false
}

/// A run to drive: its record, its folded journal, and the token to write it with.
type Drivable = (RunRecord, RunState, Token);

/// Every run's status and parent, by id: what the check of completed children needs, kept
/// while the records themselves are consumed one by one.
type Lineage = HashMap<RunId, (RunStatus, Option<RunId>)>;

impl Engine {
    /// Resumes from the wake index when the store keeps one and every type its runs use is
    /// registered; else reads every run, checks registrations, drives every running or
    /// compensating run and builds the index (see the module doc). Nothing is driven, and
    /// nothing written, when the check refuses the store.
    pub(super) async fn resume_all(&self, allow_unregistered: bool) -> Result<()> {
        // Held until every run read here is in the map (`drive_all`), as `adopt` holds it: a
        // load meanwhile (a run the wake loop woke, loading a run it needs) waits, and then
        // finds the cell built here, never the reverse, a cell built from records read
        // before that load's run moved on.
        let _loading = self.inner.loading.lock().await;
        let env = &self.inner.env;
        let workflow = |name: &str| self.inner.workflows.get(name).is_some();
        let step_kind = |kind: &str| env.registry.step(kind).is_some();
        let workflows = self.inner.workflows.name_list();
        if env.types.all_registered(workflow, step_kind) {
            let reading = std::time::Instant::now();
            if let Some(wakes) = env.store.wakes().await? {
                tracing::info!(
                    entries = wakes.len(),
                    read_ms = reading.elapsed().as_millis(),
                    "wake index read"
                );
                return self.resume_from_wakes(wakes).await;
            }
            if env.store.claim_every().is_some() {
                // A shared store whose runs use only types registered here: no run needs
                // checking, and only the runs claimed (those due) are read.
                let claimed = env.store.claim(&workflows, env.clock.now_ms()).await?;
                crate::crash::point("open.after_claim");
                let resumed = self.adopt_locked(claimed).await?;
                tracing::info!(resumed, "engine open (by claims of the runs due)");
                return Ok(());
            }
        }
        let claimed = env.store.claim(&workflows, env.clock.now_ms()).await?;
        crate::crash::point("open.after_claim");
        // Every run in the store is checked, also those other engines own: engines sharing a
        // store must all be able to drive all of its runs, since any of them may take any
        // run over. Only the runs this engine claimed are driven.
        let stored = env.store.runs().await?;
        let unreadable = stored.iter().filter(|r| r.is_err()).count();
        let records = self.records_of(stored);
        let unsettled: Vec<RunId> = records
            .iter()
            .filter(|r| r.status.is_drivable())
            .map(|r| r.id.clone())
            .collect();
        let tokens = match claimed {
            Claimed::Everything => None,
            Claimed::Runs { runs, .. } => Some(runs.into_iter().collect()),
        };
        let (drivable, mut unregistered) = self.check_runs(records, tokens).await?;
        if !unregistered.runs.is_empty() && !allow_unregistered {
            return Err(unregistered.error());
        }
        let all_read = unreadable + unregistered.unread == 0;
        if all_read {
            // The types the runs use, as read (on a shared store, added to what is listed).
            env.types
                .replace(&*env.store, std::mem::take(&mut unregistered.needed))
                .await?;
        } else {
            // What could not be read was not checked: the next open reads every run again.
            tracing::warn!(
                unreadable,
                unread = unregistered.unread,
                "runs could not be read: the types they use are not listed, and the next open reads every run"
            );
        }
        if env.store.keeps_wakes() {
            // The index, built (again) from what was read: every unsettled run is loaded at
            // this open (or left undriven, and then read again by the next), so each gets
            // the entry "loaded"; the mark that the index is whole comes after them all (and
            // after the types: an index is only read with them).
            for id in &unsettled {
                env.store.set_wake(id, 0)?;
            }
            if all_read {
                env.store.wakes_built()?;
            }
        }
        if !unregistered.runs.is_empty() {
            self.leave_undriven(unregistered);
        }
        let resumed = drivable.len();
        self.drive_all(drivable).await?;
        tracing::info!(resumed, "engine open");
        Ok(())
    }

    /// Resumes from the wake index, every type the runs use being registered: the runs due
    /// (loaded when the engine stopped, or whose wake time passed) are read and driven; the
    /// others are parked without being read, to be loaded at their wake time or when
    /// something arrives for them. An entry whose run is gone or settled is dropped.
    async fn resume_from_wakes(&self, mut wakes: Vec<(u64, RunId)>) -> Result<()> {
        let env = &self.inner.env;
        let now_ms = env.clock.now_ms();
        let split = wakes.partition_point(|(wake_ms, _)| *wake_ms <= now_ms);
        let mut records = Vec::with_capacity(split);
        for (wake_ms, id) in &wakes[..split] {
            match env.store.run(id).await {
                Ok(Some(record)) if record.status.is_drivable() => {
                    // Rule 27: a run's entry is 0 before it is loaded to write (the open's
                    // repair after a crash checks only those).
                    if *wake_ms != 0 {
                        env.store.set_wake(id, 0)?;
                    }
                    records.push(record)
                }
                Ok(_) => env.store.clear_wake_at(id, *wake_ms)?,
                Err(error) => {
                    tracing::error!(run_id = %id, %error, "run record unreadable: not resumed")
                }
            }
        }
        let parked = wakes.len() - split;
        self.inner
            .cells
            .lock()
            .expect("cells lock")
            .park_unread(wakes.split_off(split));
        self.inner.wakes.notify_one();
        let (drivable, unregistered) = self.check_runs(records, None).await?;
        if !unregistered.runs.is_empty() {
            // Not reached while the types the runs use are all registered; if it is, these
            // runs say why they are not driven, as with `allow_unregistered`.
            self.leave_undriven(unregistered);
        }
        let resumed = drivable.len();
        self.drive_all(drivable).await?;
        tracing::info!(resumed, parked, "engine open (from the wake index)");
        Ok(())
    }

    /// Every run of `records` that may act (unfinished, or a completed child its parent may
    /// compensate), folded, and checked against the registrations: the drivable ones with
    /// their state and token (those in `tokens`, or all when `None`), and what the others
    /// lack.
    async fn check_runs(
        &self,
        records: Vec<RunRecord>,
        tokens: Option<HashMap<RunId, Token>>,
    ) -> Result<(Vec<Drivable>, Unregistered)> {
        let lineage: Lineage = records
            .iter()
            .map(|r| (r.id.clone(), (r.status, r.parent.clone())))
            .collect();
        let mut unregistered = Unregistered::default();
        let mut drivable = Vec::new();
        for record in records {
            let may_act = !record.status.is_terminal() || may_be_compensated(&record, &lineage);
            if !may_act {
                continue;
            }
            let state = match self.read_state(&record.id).await {
                Ok(state) => state,
                Err(error) => {
                    // Reported, and left as it is (`Engine::wait` says why it is not driven).
                    tracing::error!(run_id = %record.id, %error, "run not resumed");
                    unregistered.unread += 1;
                    continue;
                }
            };
            let (workflows, steps) = (&self.inner.workflows, &self.inner.env.registry);
            unregistered.check(workflows, steps, &record, &state);
            let token = match &tokens {
                None => Some(Token::CREATED),
                Some(tokens) => tokens.get(&record.id).copied(),
            };
            let registered = !unregistered.runs.contains_key(&record.id);
            if let (true, true, Some(token)) = (record.status.is_drivable(), registered, token) {
                drivable.push((record, state, token));
            }
        }
        Ok((drivable, unregistered))
    }

    /// Leaves the runs that need unregistered types as they are, remembering why (their
    /// waiters are told).
    fn leave_undriven(&self, unregistered: Unregistered) {
        for (id, lacks) in &unregistered.runs {
            tracing::warn!(run_id = %id, lacks = %lacks, "run needs unregistered types: left as it is");
        }
        *self.inner.undriven.lock().expect("undriven lock") = unregistered
            .runs
            .into_iter()
            .map(|(id, lacks)| (id, format!("it needs {lacks}, not registered here")))
            .collect();
    }

    /// Runs claimed after open: each is read, checked and driven as at open. A run that
    /// needs types not registered here is left as it is (logged), as is one whose journal
    /// cannot be read. A cell of the run still loaded from before another engine took it
    /// is stale: it is unloaded first.
    pub(super) async fn adopt(&self, claimed: Claimed) -> Result<()> {
        let _loading = self.inner.loading.lock().await;
        let adopted = self.adopt_locked(claimed).await?;
        if adopted > 0 {
            tracing::info!(adopted, "runs taken over from workers that are gone");
        }
        Ok(())
    }

    /// [`Engine::adopt`] under the loads' lock; returns how many runs it drives.
    async fn adopt_locked(&self, claimed: Claimed) -> Result<usize> {
        let Claimed::Runs { runs: claimed, .. } = claimed else {
            return Ok(0);
        };
        let mut records = Vec::new();
        for (id, _) in &claimed {
            match self.inner.env.store.run(id).await {
                Ok(record) => records.extend(record),
                Err(error) => tracing::error!(%error, "run record unreadable: left as it is"),
            }
        }
        let tokens = Some(claimed.into_iter().collect());
        let (drivable, unregistered) = self.check_runs(records, tokens).await?;
        // Claims take only runs of registered workflows; a run whose saga needs a step kind
        // not registered here stays this engine's, undriven, and says why.
        for (id, lacks) in unregistered.runs {
            tracing::error!(run_id = %id, lacks = %lacks, "claimed run needs unregistered types: left as it is");
            let reason = format!("it needs {lacks}, not registered on the worker that claimed it");
            self.inner
                .undriven
                .lock()
                .expect("undriven lock")
                .insert(id, reason);
        }
        for (record, _, _) in &drivable {
            if let Some(stale) = self.loaded(&record.id) {
                self.inner.unload(&stale, crate::cell::Stop::Moved);
            }
        }
        let adopted = drivable.len();
        self.drive_all(drivable).await?;
        Ok(adopted)
    }

    /// Loads every drivable run, counts its load, and starts its driver. Called under the
    /// loads' lock, held since the runs were read.
    async fn drive_all(&self, drivable: Vec<Drivable>) -> Result<()> {
        let cells: Vec<Arc<RunCell>> = drivable
            .into_iter()
            .map(|(record, state, token)| {
                let clock = self.inner.env.clock.clone();
                let outbox = Arc::clone(&self.inner.outbox);
                Arc::new(RunCell::new(record, state, clock, token, outbox))
            })
            .collect();
        self.count_loads(&cells).await?;
        // Every resumed run is in the map before any driver starts: a parent's driver may
        // look for its child at once (to start or await it), and must find the child's cell,
        // not load a second one. A run loaded meanwhile (a start of this engine's own that a
        // claim raced) keeps the cell it has.
        let cells: Vec<Arc<RunCell>> = {
            let mut map = self.inner.cells.lock().expect("cells lock");
            cells
                .into_iter()
                .filter(|cell| match map.insert(cell) {
                    Some(_) => {
                        tracing::warn!(run_id = %cell.id, "run loaded already: not loaded twice");
                        false
                    }
                    None => true,
                })
                .collect()
        };
        for cell in cells {
            self.spawn_driver(cell);
        }
        Ok(())
    }

    /// Counts this load of every run resumed at open in one write each and one sync for all
    /// (`poison.rs`; a driver would otherwise wait for a sync of its own). A run whose count
    /// is at the bound is left uncounted: its driver poisons it.
    async fn count_loads(&self, cells: &[Arc<RunCell>]) -> Result<()> {
        let mut counted = Vec::new();
        for cell in cells {
            let loads = crate::poison::loads_before(&self.inner.env, cell).await?;
            if loads < self.inner.env.poison_after_loads {
                self.inner.env.store.set_load_count(&cell.id, loads + 1)?;
                counted.push(cell);
            }
        }
        self.inner.env.store.sync().wait().await?;
        for cell in counted {
            cell.mark_load_counted();
        }
        Ok(())
    }

    /// The journal of `id`, folded.
    pub(super) async fn read_state(&self, id: &RunId) -> Result<RunState> {
        let entries = self.inner.env.store.journal(id).await?;
        RunState::from_entries(&entries).map_err(|detail| EngineError::Corrupt {
            key: format!("journal of run {id}"),
            detail,
        })
    }
}

impl Engine {
    /// On a store several engines share, claims and adopts the runs whose owner is gone and
    /// that are due: at once (after the open's own claim, the runs past its batch), then every
    /// claim interval, and when the engine's clock reaches the wake time the last claim named
    /// (the next run whose owner is gone; now, after a full batch) but never sooner than a
    /// tenth of the interval after it, until the engine shuts down or the store breaks.
    pub(super) fn spawn_claims(&self) {
        let Some(every) = self.inner.env.store.claim_every() else {
            return;
        };
        let engine = Arc::downgrade(&self.inner);
        let clock = self.inner.env.clock.clone();
        let mut shutdown = self.inner.env.shutdown.subscribe();
        let mut broken = self.inner.env.store.broken();
        tokio::spawn(async move {
            let mut next_wake_ms: Option<u64> = None;
            let mut first = true;
            loop {
                let interval = async {
                    if !std::mem::take(&mut first) {
                        tokio::time::sleep(every).await
                    }
                };
                let next_wake = async {
                    match next_wake_ms {
                        Some(at_ms) => {
                            tokio::time::sleep(every / 10).await;
                            clock.sleep_until(at_ms).await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = interval => {}
                    _ = next_wake => {}
                    _ = shutdown.wait_for(|down| *down) => return,
                    _ = broken.wait_for(Option::is_some) => return,
                }
                let Some(inner) = engine.upgrade() else {
                    return;
                };
                let engine = Engine { inner };
                engine.unload_stale();
                let workflows = engine.inner.workflows.name_list();
                let now_ms = engine.inner.env.clock.now_ms();
                // Kept only from a claim that answered: after a failure, the interval.
                next_wake_ms = None;
                match engine.inner.env.store.claim(&workflows, now_ms).await {
                    Ok(claimed) => {
                        if let Claimed::Runs {
                            next_wake_ms: next, ..
                        } = &claimed
                        {
                            next_wake_ms = *next;
                        }
                        if let Err(error) = engine.adopt(claimed).await {
                            tracing::error!(%error, "claimed runs could not be adopted");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "claiming runs failed"),
                }
            }
        });
    }

    /// Unloads every loaded run another engine took over (`JournalStore::fenced`), whether
    /// its driver writes or sleeps: its waiters then watch the store, and an operator call
    /// loads it afresh.
    fn unload_stale(&self) {
        let loaded: Vec<Arc<RunCell>> = self
            .inner
            .cells
            .lock()
            .expect("cells lock")
            .values()
            .cloned()
            .collect();
        for cell in loaded {
            let (id, token) = cell.token();
            if self.inner.env.store.fenced(id, token) {
                tracing::info!(run_id = %id, "run taken over by another worker: unloaded here");
                self.inner.unload(&cell, crate::cell::Stop::Moved);
            }
        }
    }
}
