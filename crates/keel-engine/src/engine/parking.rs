//! Parked runs: a run whose body waits long enough (a durable timer, a step's retry backoff,
//! an event, a child run, a wait's next poll) is unloaded while it waits, so that an idle
//! run costs a few hundred bytes instead of its cell, its driver and its body's future.
//!
//! A run parks only from its body's main lane (never from a branch of a fan-out), only at a
//! point where everything it waits on is in its journal (the timer's wake time, the failed
//! attempt's retry time, the receive, a wait's polls so far in a `WaitParked` entry), and only
//! when the wait is at least the engine's `park_after` (a child awaited, or a receive after
//! an event the run took since it was loaded, unless every run slot is taken: once it has
//! waited that long). A run loaded from a park its driver
//! made here, with no other engine's claim of it since (the same token), is marked so
//! (`RunCell::take_unparked`): nothing of it ran since that park, so a wait goes on from its
//! polls; any other load starts a wait over. Parking detaches its cell under the map lock and
//! the cell lock (so a send or an operator call either wrote before, and the run does not park,
//! or finds the cell gone and loads the run afresh), then unwinds the body as a shutdown does.
//! Waking is a load, as at open: the body replays from the journal to where it waited.
//!
//! What a parked run leaves in memory is an entry in [`Cells::parked`] and, for a wait with a
//! time, one in the timer set the wake loop ([`Engine::spawn_wakes`]) sleeps on. What is
//! durable is the store's wake index: sled's `store/sled/wakes.rs`, which an open reads to
//! park the runs it lists as waiting without reading them (`resume.rs`; without an index,
//! every unfinished run is loaded, replays to its wait and parks again); on PostgreSQL each
//! run's row (`keel_runs.wake_at`), which claims go by, so that an open takes only the runs
//! that are due and leaves the others in the database.
//!
//! Also here, the other way out of the map: unloading a cell whose run may not be driven
//! (settled, paused, suspended, or stopped by the engine), and the removal of a settled run's
//! wake index entry after the map lock is released (`Inner::take_out`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::cell::{RunCell, Stop};
use crate::engine::{Engine, Inner};
use crate::error::Result;
use crate::ids::RunId;
use crate::journal::RunStatus;
use crate::replay::RunState;
use crate::store::Token;

/// How long a run's wait must be for it to park, by default.
pub const PARK_AFTER_DEFAULT: Duration = Duration::from_secs(5);

/// A parked run's wake time when only something arriving for it loads it again (as in the
/// store's wake index).
const UNTIL_ARRIVAL: u64 = u64::MAX;

/// The engine's runs in memory: those loaded (a cell, driven or being settled) and those
/// parked. A run is in at most one of the two maps; both change under one lock.
#[derive(Default)]
pub(crate) struct Cells {
    loaded: HashMap<RunId, Arc<RunCell>>,
    parked: HashMap<RunId, Parked>,
    /// `(wake time, run)` of each parked run with a wake time (stale pairs are skipped).
    timers: BTreeSet<(u64, RunId)>,
    /// Runs whose cell left `loaded` settled and whose wake index entry is being removed,
    /// outside the lock (`Inner::take_out`), with how many such removals are under way.
    settling: HashMap<RunId, usize>,
    /// Runs a start of this engine is creating (`Engine::start_value`), until its cell is in
    /// `loaded` or the start ends without one, with how many such starts are under way: the
    /// record may be written already, and a load of the run waits for the start's cell.
    starting: HashMap<RunId, usize>,
    /// Told whenever a run leaves `settling` or `starting`.
    settled: Arc<Notify>,
    /// The number of the last park made (see [`Parked::park`]).
    parks: u64,
}

/// A parked run.
struct Parked {
    /// When the run must be loaded again; [`UNTIL_ARRIVAL`]: only when something arrives
    /// for it.
    wake_at_ms: u64,
    /// Which park of the run this is: numbered in the engine, so that the wake loop, which
    /// loads a run without holding the map lock, takes out only the park it set out to load
    /// and never one its run made since (loaded by a send meanwhile and parked again).
    park: u64,
    /// Told when the run is loaded again; made only when somebody waits for the run.
    unparked: Option<Arc<Notify>>,
    /// The token of the cell whose driver parked the run in this engine; `None` for a run
    /// parked from the wake index at open. A load with the same token (no other engine took
    /// the run since) finds nothing of the run ran since that park: a wait it parked in goes
    /// on from its polls so far.
    parked_by: Option<Token>,
}

/// How many runs an engine holds in memory, by how ([`Engine::resident`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resident {
    /// Runs loaded: a cell, and a driver unless it is settling.
    pub loaded: usize,
    /// Runs parked while their body waits: an entry of a few hundred bytes each.
    pub parked: usize,
}

/// What [`Cells::state_of`] found of a run.
pub(crate) enum InMemory {
    Loaded,
    /// Parked: the notification comes when the run is loaded again. It was made under the
    /// map lock, so a load after this call is never missed (see [`Notify::notify_waiters`]).
    Parked(tokio::sync::futures::OwnedNotified),
    Absent,
}

impl Cells {
    /// The loaded cell of `id`, if any.
    pub(crate) fn get(&self, id: &RunId) -> Option<&Arc<RunCell>> {
        self.loaded.get(id)
    }

    /// Whether run `id` is loaded, or its cell is still settling out (its wake index entry
    /// being removed), or a start is creating it.
    pub(crate) fn contains_key(&self, id: &RunId) -> bool {
        self.loaded.contains_key(id) || self.in_transit(id)
    }

    /// Whether run `id`'s cell is settling out, or a start is putting one in.
    fn in_transit(&self, id: &RunId) -> bool {
        self.settling.contains_key(id) || self.starting.contains_key(id)
    }

    /// Marks run `id` being started, until [`Cells::started`].
    pub(crate) fn starting(&mut self, id: &RunId) {
        *self.starting.entry(id.clone()).or_default() += 1;
    }

    /// A start of run `id` put its cell in, or ended without one: whoever waits for it is
    /// told.
    pub(crate) fn started(&mut self, id: &RunId) {
        if let Some(under_way) = self.starting.get_mut(id) {
            *under_way -= 1;
            if *under_way == 0 {
                self.starting.remove(id);
                self.settled.notify_waiters();
            }
        }
    }

    /// Marks run `id` settling: its cell left the map settled, and its wake index entry is
    /// being removed until [`Cells::settled`].
    pub(crate) fn settling(&mut self, id: &RunId) {
        *self.settling.entry(id.clone()).or_default() += 1;
    }

    /// Run `id`'s entry was removed: whoever waits for it to settle out is told.
    pub(crate) fn settled(&mut self, id: &RunId) {
        if let Some(under_way) = self.settling.get_mut(id) {
            *under_way -= 1;
            if *under_way == 0 {
                self.settling.remove(id);
                self.settled.notify_waiters();
            }
        }
    }

    /// While run `id` is settling out or being started, the notification of its end (made
    /// under the map lock, so [`Cells::settled`] or [`Cells::started`] after this call is
    /// never missed); `None` when it is neither.
    pub(crate) fn settling_ends(&self, id: &RunId) -> Option<tokio::sync::futures::OwnedNotified> {
        self.in_transit(id)
            .then(|| Arc::clone(&self.settled).notified_owned())
    }

    /// Every loaded cell.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Arc<RunCell>> {
        self.loaded.values()
    }

    /// Puts `cell` in the map, unless a cell of its run is there already (then that cell is
    /// returned). A parked run is parked no more: whoever waits for it is told.
    pub(crate) fn insert(&mut self, cell: &Arc<RunCell>) -> Option<Arc<RunCell>> {
        if let Some(existing) = self.loaded.get(&cell.id) {
            return Some(Arc::clone(existing));
        }
        self.loaded.insert(cell.id.clone(), Arc::clone(cell));
        let token = cell.token().1;
        if self
            .unpark(&cell.id)
            .is_some_and(|parked| parked.parked_by == Some(token))
        {
            cell.mark_unparked();
        }
        None
    }

    /// Takes `cell` out of the map if it is the one there.
    pub(crate) fn remove(&mut self, cell: &Arc<RunCell>) {
        if self
            .loaded
            .get(&cell.id)
            .is_some_and(|c| Arc::ptr_eq(c, cell))
        {
            self.loaded.remove(&cell.id);
        }
    }

    /// Whether run `id` is parked.
    pub(crate) fn is_parked(&self, id: &RunId) -> bool {
        self.parked.contains_key(id)
    }

    /// The number of run `id`'s park, if it is parked.
    fn park_of(&self, id: &RunId) -> Option<u64> {
        self.parked.get(id).map(|parked| parked.park)
    }

    /// A new park's number.
    fn next_park(&mut self) -> u64 {
        self.parks += 1;
        self.parks
    }

    /// Whether run `id` is loaded or parked, and for a parked one, the notification of its
    /// next load.
    pub(crate) fn state_of(&mut self, id: &RunId) -> InMemory {
        if self.loaded.contains_key(id) {
            return InMemory::Loaded;
        }
        match self.parked.get_mut(id) {
            Some(parked) => {
                let unparked = parked.unparked.get_or_insert_with(Default::default);
                InMemory::Parked(Arc::clone(unparked).notified_owned())
            }
            None => InMemory::Absent,
        }
    }

    /// How many runs are loaded and how many parked.
    pub(crate) fn counts(&self) -> Resident {
        Resident {
            // A run settling out still has its cell, until its entry is removed.
            loaded: self.loaded.len() + self.settling.len(),
            parked: self.parked.len(),
        }
    }

    /// Takes out the parked runs whose wake time is at or before `now_ms` (they stay parked
    /// until loaded); returns them, each with the number of its park, and the next wake time
    /// after.
    fn due(&mut self, now_ms: u64) -> (Vec<(RunId, u64)>, Option<u64>) {
        let mut due = Vec::new();
        while let Some((at_ms, id)) = self.timers.first().cloned() {
            if at_ms > now_ms {
                return (due, Some(at_ms));
            }
            self.timers.pop_first();
            // A pair left by an earlier park of the run (it was loaded and parked again).
            let current = self.parked.get(&id).filter(|p| p.wake_at_ms == at_ms);
            if let Some(parked) = current {
                due.push((id, parked.park));
            }
        }
        (due, None)
    }

    /// Makes parked run `id` due now, because a child of it settled: the wake loop loads it.
    /// Only a run parked with no wake time (waiting for something to arrive) can be waiting
    /// for its child; one parked on its own timer is left to it. Returns whether it was made
    /// due.
    pub(crate) fn make_due(&mut self, id: &RunId) -> bool {
        let Some(parked) = self.parked.get_mut(id) else {
            return false;
        };
        if parked.wake_at_ms != UNTIL_ARRIVAL {
            return false;
        }
        // A sleep to the end of time has its timer pair at `UNTIL_ARRIVAL`.
        self.timers.remove(&(UNTIL_ARRIVAL, id.clone()));
        parked.wake_at_ms = 0;
        self.timers.insert((0, id.clone()));
        true
    }

    /// Takes parked run `id` out of the parked runs (it is loaded, another engine holds it,
    /// or it cannot be loaded), telling whoever waits for it; what it was, if it was parked.
    fn unpark(&mut self, id: &RunId) -> Option<Parked> {
        let parked = self.parked.remove(id)?;
        // Also for `UNTIL_ARRIVAL`: a timer at the end of time (a saturated sleep) has its
        // pair at that same time.
        self.timers.remove(&(parked.wake_at_ms, id.clone()));
        if let Some(unparked) = &parked.unparked {
            unparked.notify_waiters();
        }
        Some(parked)
    }

    /// Takes parked run `id` out of the parked runs, as [`Cells::unpark`] does, if its park is
    /// still number `park`.
    fn unpark_if(&mut self, id: &RunId, park: u64) {
        if self.park_of(id) == Some(park) {
            self.unpark(id);
        }
    }

    /// Parks runs that were never loaded (an open from the wake index), each until its wake
    /// time ([`UNTIL_ARRIVAL`]: until something arrives for it). `runs` come in wake-time order, as
    /// the index holds them, so the timers of an engine that has none yet are built in one
    /// pass (a million parked runs at open).
    pub(crate) fn park_unread(&mut self, runs: Vec<(u64, RunId)>) {
        self.parked.reserve(runs.len());
        let timed = runs
            .iter()
            .filter(|(wake_ms, _)| *wake_ms != UNTIL_ARRIVAL)
            .map(|(wake_ms, id)| (*wake_ms, id.clone()));
        if self.timers.is_empty() {
            self.timers = timed.collect();
        } else {
            self.timers.extend(timed);
        }
        for (wake_at_ms, id) in runs {
            let park = self.next_park();
            self.parked.insert(
                id,
                Parked {
                    wake_at_ms,
                    park,
                    unparked: None,
                    parked_by: None,
                },
            );
        }
    }
}

impl Inner {
    /// Unloads `cell` unless it must still be driven: its status is running or compensating
    /// (an operator call may have just made it so), the engine is up and no storage write
    /// failed in it. Returns whether it was unloaded. Decided under the map lock, so an operator
    /// call either sees the cell loaded (and its driver goes on) or loads it afresh.
    pub(crate) fn unload_if_settled(&self, cell: &Arc<RunCell>) -> bool {
        let cells = self.cells.lock().expect("cells lock");
        let shutting_down = self.env.shutting_down();
        let detached = cell.detach_if(&*self.env.store, |record, write_failed| {
            if shutting_down {
                Some(Some(Stop::ShutDown))
            } else if write_failed {
                Some(Some(Stop::Error("a write to its journal failed".into())))
            } else if !record.status.is_drivable() {
                Some(None)
            } else {
                None
            }
        });
        if detached {
            self.take_out(cells, cell);
            self.stopped_alive(cell);
        }
        detached
    }

    /// Takes the detached `cell` out of the map and releases the map lock, `cells`. If its
    /// run settled, its wake index entry goes (the settling write comes before it in the
    /// store's order), and a parent parked until it settled is due now; an unsettled run
    /// keeps its entry, and the next open drives it.
    ///
    /// The entry is removed after the map lock is released: it is a store write, and every
    /// start's load waited for it under that lock. Meanwhile the run is settling in the map,
    /// and `Engine::load_cell` waits for it to end, so that no new cell of the run writes
    /// its entry before this removal.
    fn take_out(&self, mut cells: MutexGuard<'_, Cells>, cell: &Arc<RunCell>) {
        cells.remove(cell);
        let (status, parent) = cell.with_record(|r| (r.status, r.parent.clone()));
        if status.is_drivable() {
            return;
        }
        cells.settling(&cell.id);
        drop(cells);
        let _out = SettlingOut {
            inner: self,
            id: &cell.id,
            parent,
        };
        if let Err(error) = self.env.store.clear_wake(&cell.id) {
            // Left stale: the next open reads the run, finds it settled and drops it.
            tracing::warn!(run_id = %cell.id, %error, "wake index entry not removed");
        }
    }

    /// A driver stopped while the process lives: if the run has not settled, this load does
    /// not count against it (`poison.rs`). A settled run's count is left: only an operator
    /// call, which clears it, drives such a run again.
    fn stopped_alive(&self, cell: &RunCell) {
        if cell.status().is_drivable() {
            cell.survived(&*self.env.store);
        }
    }

    /// Unloads `cell` whatever its status; if the run has not settled, its waiters are told
    /// `stop`.
    pub(crate) fn unload(&self, cell: &Arc<RunCell>, stop: Stop) {
        let cells = self.cells.lock().expect("cells lock");
        cell.detach_if(&*self.env.store, |_, _| Some(Some(stop)));
        self.take_out(cells, cell);
        self.stopped_alive(cell);
    }
}

/// A run marked settling in the map while its wake index entry is removed
/// (`Inner::take_out`). Dropped, the mark goes and a parent parked until the run settled is
/// due: also when the removal panicked, so that the run's later loads do not wait for ever.
struct SettlingOut<'a> {
    inner: &'a Inner,
    id: &'a RunId,
    parent: Option<RunId>,
}

impl Drop for SettlingOut<'_> {
    fn drop(&mut self) {
        // Not held across the removal, so not poisoned by a panic in it; if another panic
        // poisoned it, the engine is broken anyway, and unwinding here must not panic again.
        let Ok(mut cells) = self.inner.cells.lock() else {
            return;
        };
        cells.settled(self.id);
        if let Some(parent) = &self.parent {
            if cells.make_due(parent) {
                self.inner.wakes.notify_one();
            }
        }
    }
}

impl Inner {
    /// Parks the run of `cell`, waiting until `wake_at_ms` (or for something to arrive, when
    /// `None`), if it may: the engine is up, no write failed in the cell, the run is running
    /// with no cancel or pause requested, and `ready` accepts its state (nothing it waits for
    /// has arrived). Decided under the map lock and the cell lock. Returns whether it parked:
    /// then the cell is detached and out of the map, and its body must unwind
    /// ([`crate::interrupt::Interrupt::Parked`]).
    ///
    /// With `awaiting`, the run waits for that child run to settle, and parks only if the
    /// child is parked, or loaded and unsettled: then the child's cell lock is held until the
    /// run's index entry is written, so the child's settling write (which sets the entry to
    /// "loaded" first, `cell.rs`) comes after it, and its unload finds the run parked
    /// ([`Cells::make_due`]). A child in neither map may have settled: the run does not park.
    pub(crate) fn park(
        &self,
        cell: &Arc<RunCell>,
        wake_at_ms: Option<u64>,
        ready: &(dyn Fn(&RunState) -> bool + Sync),
        awaiting: Option<&RunId>,
    ) -> bool {
        let mut cells = self.cells.lock().expect("cells lock");
        if self.env.shutting_down() {
            return false;
        }
        if !cells.get(&cell.id).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            return false;
        }
        let Some(child) = awaiting else {
            return self.park_locked(&mut cells, cell, wake_at_ms, ready);
        };
        if cells.is_parked(child) {
            return self.park_locked(&mut cells, cell, wake_at_ms, ready);
        }
        let Some(child_cell) = cells.get(child).cloned() else {
            return false;
        };
        child_cell
            .while_unsettled(|| self.park_locked(&mut cells, cell, wake_at_ms, ready))
            .unwrap_or(false)
    }

    /// [`Inner::park`] under the map lock.
    fn park_locked(
        &self,
        cells: &mut Cells,
        cell: &Arc<RunCell>,
        wake_at_ms: Option<u64>,
        ready: &(dyn Fn(&RunState) -> bool + Sync),
    ) -> bool {
        let parked = cell.park_if(|record, state| {
            record.status == RunStatus::Running
                && !state.cancel_requested
                && !state.pause_requested
                && ready(state)
        });
        if !parked {
            return false;
        }
        cells.loaded.remove(&cell.id);
        let park = cells.next_park();
        cells.parked.insert(
            cell.id.clone(),
            Parked {
                wake_at_ms: wake_at_ms.unwrap_or(UNTIL_ARRIVAL),
                park,
                unparked: None,
                parked_by: Some(cell.token().1),
            },
        );
        let earliest = match wake_at_ms {
            Some(at_ms) => {
                let earliest = cells.timers.first().is_none_or(|(first, _)| at_ms < *first);
                cells.timers.insert((at_ms, cell.id.clone()));
                earliest
            }
            None => false,
        };
        // The run's wake index entry, after everything the run wrote (made durable before
        // this call): until it is durable, the entry says "loaded", and an open drives it.
        if let Err(error) = self
            .env
            .store
            .set_wake(&cell.id, wake_at_ms.unwrap_or(UNTIL_ARRIVAL))
        {
            tracing::warn!(run_id = %cell.id, %error, "wake index entry not written: the next open loads the run");
        }
        crate::crash::point("park.after_index");
        if earliest {
            self.wakes.notify_one();
        }
        tracing::debug!(run_id = %cell.id, wake_at_ms, "run parked");
        true
    }
}

impl Engine {
    /// How many runs this engine holds in memory: loaded, and parked.
    pub fn resident(&self) -> Resident {
        self.inner.cells.lock().expect("cells lock").counts()
    }

    /// Starts the loop that loads parked runs when their wake time comes, until shutdown.
    pub(super) fn spawn_wakes(&self) {
        let engine = Arc::downgrade(&self.inner);
        let wakes = Arc::clone(&self.inner.wakes);
        let mut shutdown = self.inner.env.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                let Some(inner) = engine.upgrade() else {
                    return;
                };
                if *shutdown.borrow() {
                    return;
                }
                let engine = Engine { inner };
                let next_ms = engine.wake_due().await;
                let clock = engine.inner.env.clock.clone();
                drop(engine);
                let next = async {
                    match next_ms {
                        Some(at_ms) => clock.sleep_until(at_ms).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = next => {}
                    _ = wakes.notified() => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
    }

    /// Loads every parked run whose wake time came; returns the next wake time. A run that
    /// cannot be loaded (its record or journal does not read) is left as it is, undriven
    /// until the next open, and its waiters are told why.
    async fn wake_due(&self) -> Option<u64> {
        let now_ms = self.inner.env.clock.now_ms();
        let (due, next_ms) = self.inner.cells.lock().expect("cells lock").due(now_ms);
        for (id, park) in due {
            if let Err(error) = self.wake(&id, park).await {
                tracing::error!(run_id = %id, %error, "parked run could not be loaded: left as it is until the next open");
                let reason = format!("it could not be loaded at its wake time: {error}");
                // Unless the run was loaded meanwhile (and maybe parked again): then it is
                // taken care of. The reason goes in first: waiters told of the unpark read it.
                let mut cells = self.inner.cells.lock().expect("cells lock");
                if cells.park_of(&id) == Some(park) {
                    self.inner
                        .undriven
                        .lock()
                        .expect("undriven lock")
                        .insert(id.clone(), reason);
                    cells.unpark(&id);
                }
            }
        }
        next_ms
    }

    /// Loads run `id`, parked by its park number `park`, and drives it, unless it was loaded
    /// meanwhile.
    async fn wake(&self, id: &RunId, park: u64) -> Result<()> {
        if self.inner.cells.lock().expect("cells lock").park_of(id) != Some(park) {
            return Ok(());
        }
        crate::crash::point("wake.before_load");
        let record = self.record(id.as_str()).await?;
        tracing::debug!(run_id = %id, "parked run woken");
        self.load(record).await?;
        crate::crash::point("wake.after_load");
        // Still parked by the same park: the load put no cell in the map, because another
        // engine sharing the store holds the run now. It is not this engine's to wake; its
        // waiters watch the store. A load that found a cell loaded by a send or an operator
        // call meanwhile leaves a park its driver made since alone.
        self.inner
            .cells
            .lock()
            .expect("cells lock")
            .unpark_if(id, park);
        Ok(())
    }

    /// Waits until parked run `id` is loaded again (`unparked`), the engine shuts down, or,
    /// on a store several engines share, a poll interval passed (another engine may have
    /// taken the run over).
    pub(super) async fn unparked(
        &self,
        unparked: tokio::sync::futures::OwnedNotified,
        poll: Duration,
    ) {
        let mut shutdown = self.inner.env.shutdown.subscribe();
        let shared = self.inner.env.store.claim_every().is_some();
        let poll = async {
            if shared {
                tokio::time::sleep(poll).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = unparked => {}
            _ = shutdown.wait_for(|down| *down) => {}
            _ = poll => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::TestClock;
    use crate::{Ctx, Workflow, WorkflowError};

    /// Takes one event named `go`.
    struct Receiver;

    impl Workflow for Receiver {
        const NAME: &'static str = "test.receiver";
        type Input = ();
        type Output = ();

        async fn run(ctx: &mut Ctx, (): ()) -> std::result::Result<(), WorkflowError> {
            ctx.receive_event::<serde_json::Value>(&["go"], None)
                .await?;
            Ok(())
        }
    }

    async fn loaded_count(engine: &Engine, loaded: usize) {
        for _ in 0..5_000 {
            if engine.resident().loaded == loaded {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the engine holds {:?}", engine.resident());
    }

    /// A run parks awaiting another only while that one may still settle here: loaded and
    /// unsettled (or parked). One in neither map may have settled already (its unload, which
    /// wakes a parked parent, has passed), so parking then could be for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_parks_awaiting_another_only_while_that_one_is_unsettled_here() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing parks by itself: every run stays loaded in its receive.
        let engine = Engine::builder(dir.path())
            .clock(TestClock::new())
            .park_after(None)
            .workflow::<Receiver>()
            .open()
            .await
            .unwrap();
        for id in ["waiter", "ended", "running"] {
            engine.start::<Receiver>(id, ()).await.unwrap();
        }
        loaded_count(&engine, 3).await;
        let id = |s: &str| RunId::new(s).unwrap();
        let waiter = engine.loaded(&id("waiter")).expect("loaded");
        let park = |awaiting: &str| {
            engine
                .inner
                .park(&waiter, None, &|_| true, Some(&id(awaiting)))
        };

        assert!(!park("nobody"), "a run this engine does not hold");
        engine.send("ended", "go", &1, "go-1").await.unwrap();
        engine.wait("ended").await.unwrap();
        loaded_count(&engine, 2).await;
        assert!(!park("ended"), "a run that settled and was unloaded");
        assert_eq!(
            engine.resident(),
            Resident {
                loaded: 2,
                parked: 0
            }
        );

        assert!(park("running"), "a loaded, unsettled run");
        assert_eq!(
            engine.resident(),
            Resident {
                loaded: 1,
                parked: 1
            }
        );
        engine.shutdown().await;
    }

    /// A run's cell that left the map settled removes the run's wake index entry after the
    /// map lock is released; a load of the run meanwhile (an operator call) waits for that,
    /// so the load's own entry is never the one removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_waits_for_the_run_to_settle_out() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::builder(dir.path())
            .clock(TestClock::new())
            .workflow::<Receiver>()
            .open()
            .await
            .unwrap();
        engine.start::<Receiver>("ended", ()).await.unwrap();
        engine.send("ended", "go", &1, "go-1").await.unwrap();
        engine.wait("ended").await.unwrap();
        loaded_count(&engine, 0).await;
        let id = RunId::new("ended").unwrap();
        let entries = || async {
            let wakes = engine.inner.env.store.wakes().await.unwrap().unwrap();
            wakes.into_iter().filter(|(_, run)| *run == id).count()
        };
        assert_eq!(entries().await, 0, "a settled run keeps no entry");

        // As `Inner::take_out` leaves it between the map and the entry's removal.
        engine.inner.cells.lock().unwrap().settling(&id);
        let load = tokio::spawn({
            let engine = engine.clone();
            async move { engine.cancel("ended").await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !load.is_finished(),
            "the load waited for the run to settle out"
        );
        assert_eq!(entries().await, 0, "the waiting load wrote no entry");

        engine.inner.cells.lock().unwrap().settled(&id);
        let cancelled = tokio::time::timeout(Duration::from_secs(30), load)
            .await
            .expect("the load went on once the run settled out")
            .unwrap();
        assert!(
            matches!(cancelled, Err(crate::EngineError::InvalidState { .. })),
            "{cancelled:?}"
        );
        loaded_count(&engine, 0).await;
        assert_eq!(entries().await, 0, "the load removed its own entry");
        engine.shutdown().await;
    }
}
