//! The engine's runs in memory, under one lock: the runs loaded (a cell, driven or being
//! settled), the runs parked (an entry each, and a timer pair for a wait with a time), and the
//! runs in transit (a start creating one, or a settled cell whose wake index entry is being
//! removed), which a load waits out. What goes in and out, and when, is decided by the
//! engine's loads (`engine.rs`), starts (`start.rs`) and parks and unloads (`parking.rs`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::cell::RunCell;
use crate::ids::RunId;
use crate::store::Token;

/// A parked run's wake time when only something arriving for it loads it again (as in the
/// store's wake index).
pub(super) const UNTIL_ARRIVAL: u64 = u64::MAX;

/// A map keyed by run id, with foldhash's hasher: std's (SipHash) was a tenth of the time an
/// open of a million parked runs took (in this map of parked runs and in the wake index's
/// read). Without foldhash's `std` feature (as the build takes it) its seed comes from the
/// process's address-space layout, weaker than std's random seed, and foldhash does not
/// claim resistance to keys chosen to collide: run ids come from callers the worker's API
/// authenticated.
type ByRun<V> = HashMap<RunId, V, foldhash::fast::RandomState>;

/// The engine's runs in memory: those loaded (a cell, driven or being settled) and those
/// parked. A run is in at most one of the two maps; both change under one lock.
#[derive(Default)]
pub(crate) struct Cells {
    loaded: ByRun<Arc<RunCell>>,
    parked: ByRun<Parked>,
    /// `(wake time, run)` of each parked run with a wake time (stale pairs are skipped).
    timers: BTreeSet<(u64, RunId)>,
    /// Runs whose cell left `loaded` settled and whose wake index entry is being removed,
    /// outside the lock (`Inner::take_out`), with how many such removals are under way.
    settling: ByRun<usize>,
    /// Runs a start of this engine is creating (`Engine::start_value`), until its cell is in
    /// `loaded` or the start ends without one, with how many such starts are under way: the
    /// record may be written already, and a load of the run waits for the start's cell.
    starting: ByRun<usize>,
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

/// How many runs an engine holds in memory, by how
/// ([`Engine::resident`](crate::Engine::resident)).
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
    pub(super) fn park_of(&self, id: &RunId) -> Option<u64> {
        self.parked.get(id).map(|parked| parked.park)
    }

    /// A new park's number.
    fn next_park(&mut self) -> u64 {
        self.parks += 1;
        self.parks
    }

    /// Parks run `id` (its cell taken out of the loaded runs) until `wake_at_ms` (`None`:
    /// until something arrives for it), parked by the cell whose token is `parked_by`.
    /// Returns whether its wake time is now the earliest of the timers (the wake loop must
    /// be told).
    pub(super) fn park(&mut self, id: &RunId, wake_at_ms: Option<u64>, parked_by: Token) -> bool {
        self.loaded.remove(id);
        let park = self.next_park();
        self.parked.insert(
            id.clone(),
            Parked {
                wake_at_ms: wake_at_ms.unwrap_or(UNTIL_ARRIVAL),
                park,
                unparked: None,
                parked_by: Some(parked_by),
            },
        );
        let Some(at_ms) = wake_at_ms else {
            return false;
        };
        let earliest = self.timers.first().is_none_or(|(first, _)| at_ms < *first);
        self.timers.insert((at_ms, id.clone()));
        earliest
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
    pub(super) fn due(&mut self, now_ms: u64) -> (Vec<(RunId, u64)>, Option<u64>) {
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
    pub(super) fn unpark_if(&mut self, id: &RunId, park: u64) {
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
