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
//! What a parked run leaves in memory is an entry in the parked runs of [`Cells`]
//! (`cells.rs`) and, for a wait with a time, one in the timer set the wake loop
//! ([`Engine::spawn_wakes`]) sleeps on. What is durable is the store's wake index: sled's
//! `store/sled/wakes.rs`, which an open reads to park the runs it lists as waiting without
//! reading them (`resume.rs`; without an index, every unfinished run is loaded, replays to
//! its wait and parks again); on PostgreSQL each run's row (`keel_runs.wake_at`), which
//! claims go by, so that an open takes only the runs that are due and leaves the others in
//! the database.
//!
//! Also here, the other way out of the map: unloading a cell whose run may not be driven
//! (settled, paused, suspended, or stopped by the engine), and the removal of a settled run's
//! wake index entry after the map lock is released (`Inner::take_out`).

use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use crate::cell::{RunCell, Stop};
use crate::engine::cells::{Cells, UNTIL_ARRIVAL};
use crate::engine::{Engine, Inner, Resident};
use crate::error::Result;
use crate::ids::RunId;
use crate::journal::RunStatus;
use crate::replay::RunState;

/// How long a run's wait must be for it to park, by default.
pub const PARK_AFTER_DEFAULT: Duration = Duration::from_secs(5);

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
        let earliest = cells.park(&cell.id, wake_at_ms, cell.token().1);
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
                    cells.unpark_if(&id, park);
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
