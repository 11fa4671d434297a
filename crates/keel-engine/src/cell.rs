//! The run cell: the one place a run's journal is appended to while the run is loaded.
//!
//! **Invariant:** at most one cell exists per run id in an engine, and at most one task
//! drives it; the engine's cell map enforces both. Operator calls (cancel, retry) append
//! through the same cell, under the same lock, so journal indexes never collide.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

use crate::clock::Clock;
use crate::error::{EngineError, Result};
use crate::ids::{JournalIndex, RunId};
use crate::journal::{Entry, Event, RunRecord, RunStatus};
use crate::limits::JOURNAL_ENTRIES_PER_RUN_MAX;
use crate::notice::Outbox;
use crate::replay::RunState;
use crate::requests::Requests;
use crate::run_slot::RunSlot;
use crate::store::{JournalStore, Space, Token};

struct Loaded {
    record: RunRecord,
    state: RunState,
    /// Set when a write to the store failed: memory is ahead of the store, so the cell
    /// accepts no more writes.
    write_failed: bool,
    /// Set when the cell leaves the engine's map; a detached cell accepts no writes, so a
    /// run never has two writers.
    detached: bool,
    /// An entry in `state` not yet handed to the store: a step's completion, which nothing
    /// waits on before the run's next entry, and which the store writes together with that
    /// entry, saving a write (`RunCell::append_deferred`). Handed over alone when the run's
    /// code waits first, before anything waits for the cell's writes to be durable, and
    /// before the cell is detached.
    deferred: Option<(JournalIndex, Entry)>,
}

/// Why a loaded run stopped being driven before it settled; its waiters are told.
#[derive(Clone, Debug)]
pub(crate) enum Stop {
    /// The engine shut down; the run resumes at the next open.
    ShutDown,
    /// The driver stopped on an engine error (or a bug); the run resumes at the next open.
    Error(String),
    /// Another engine sharing the store took the run over; it drives it now.
    Moved,
    /// The run parked (`engine/parking.rs`): nothing ended, a waiter looks again.
    Parked,
}

impl Stop {
    /// What a waiter of run `id` is answered.
    pub(crate) fn error(&self, id: &RunId) -> EngineError {
        match self {
            Stop::ShutDown => EngineError::ShutDown,
            Stop::Moved => EngineError::Fenced { id: id.clone() },
            // Waiters look again rather than answer (`Engine::wait`).
            Stop::Parked => EngineError::RunStopped {
                id: id.clone(),
                reason: "it parked".into(),
            },
            Stop::Error(reason) => EngineError::RunStopped {
                id: id.clone(),
                reason: reason.clone(),
            },
        }
    }
}

/// Where a loaded run stands with its load count (`poison.rs`): not counted yet, counted
/// (written) and not yet shown to survive, or nothing to forget (it survived, or it was
/// loaded by its start, which writes no count).
const LOAD_UNCOUNTED: u8 = 0;
const LOAD_COUNTED: u8 = 1;
const LOAD_CLEAR: u8 = 2;

pub(crate) struct RunCell {
    pub(crate) id: RunId,
    /// `LOAD_UNCOUNTED`, `LOAD_COUNTED` or `LOAD_CLEAR`.
    load: AtomicU8,
    /// Stamps every entry and record change.
    clock: Clock,
    /// What the store checks this cell's writes against (`store/mod.rs`).
    token: Token,
    /// Which transitions write a notice, shared by the engine's cells (`notice.rs`).
    outbox: Arc<Outbox>,
    loaded: Mutex<Loaded>,
    /// An operator's cancel (durably journaled first) and whether a pause request stands:
    /// from the journal when the cell is made, then told (a pause or a resume by
    /// [`RunCell::tell_pause`], once durable).
    pub(crate) requests: Requests,
    /// What waiters watch: the latest durable status, and why the cell was unloaded before
    /// its run settled, so that no waiter is left pending by a driver that stopped. (One
    /// channel for both: a channel costs about 400 bytes per loaded run.)
    pub(crate) watched: watch::Sender<Watched>,
    /// Woken when an event is delivered to the run or it publishes a value: what a blocked
    /// receive and a reader waiting for a value listen to (each checks the state again).
    pub(crate) news: Notify,
    /// The run's slot among the runs driven at once, while its driver holds it.
    pub(crate) slot: RunSlot,
    /// Set when this cell was loaded from a park its run's driver made in this engine, until
    /// the body's first run in the cell takes it ([`RunCell::take_unparked`]).
    unparked: AtomicBool,
}

/// What a run's waiters watch (see [`RunCell::watched`]).
#[derive(Clone, Debug)]
pub(crate) struct Watched {
    /// The latest durable status.
    pub(crate) status: RunStatus,
    /// Set when nobody drives the run any more although it has not settled.
    pub(crate) stopped: Option<Stop>,
}

impl Watched {
    /// Whether a waiter has its answer: the run settled, or nobody drives it.
    pub(crate) fn answered(&self) -> bool {
        !self.status.is_drivable() || self.stopped.is_some()
    }
}

impl RunCell {
    pub(crate) fn new(
        record: RunRecord,
        state: RunState,
        clock: Clock,
        token: Token,
        outbox: Arc<Outbox>,
    ) -> RunCell {
        let requests = Requests::new(state.cancel_requested, state.pause_requested);
        let (watched, _) = watch::channel(Watched {
            status: record.status,
            stopped: None,
        });
        RunCell {
            id: record.id.clone(),
            load: AtomicU8::new(LOAD_UNCOUNTED),
            clock,
            token,
            outbox,
            loaded: Mutex::new(Loaded {
                record,
                state,
                write_failed: false,
                detached: false,
                deferred: None,
            }),
            requests,
            watched,
            news: Notify::new(),
            slot: RunSlot::default(),
            unparked: AtomicBool::new(false),
        }
    }

    /// Notes that this cell is loaded from a park its run's driver made in this engine:
    /// nothing of the run ran since its journal's last entry. Called before its driver starts.
    pub(crate) fn mark_unparked(&self) {
        self.unparked.store(true, Ordering::Release);
    }

    /// Whether this cell was loaded from a park its run's driver made in this engine, asked
    /// once: by the body's first run in the cell ([`crate::lane::Lane::new`]), whose wait
    /// the run parked in then goes on from its polls so far. A later run of the body in the
    /// same cell (after a pause that a resume overtook) may follow polls that were never
    /// journaled: it starts the wait over, as any other load does.
    pub(crate) fn take_unparked(&self) -> bool {
        self.unparked.swap(false, Ordering::AcqRel)
    }

    /// Whether this load of the run needs no counting any more: counted already (at open,
    /// or by its driver), or made by the run's start.
    pub(crate) fn load_counted(&self) -> bool {
        self.load.load(Ordering::Acquire) != LOAD_UNCOUNTED
    }

    /// Notes that this load is counted in the store.
    pub(crate) fn mark_load_counted(&self) {
        self.load.store(LOAD_COUNTED, Ordering::Release);
    }

    /// Notes that this load is the run's first, made by its start: nothing is written (a
    /// death during it is inferred at the next load from the journal being empty).
    pub(crate) fn mark_started(&self) {
        self.load.store(LOAD_CLEAR, Ordering::Release);
    }

    /// The run showed that it survives being driven (a call of its code returned, or it
    /// parked, or its driver stopped): its load count is forgotten, durably with the next
    /// sync, which is asked for without waiting (a crash before it counts one load too many).
    pub(crate) fn survived(&self, store: &dyn JournalStore) {
        let counted = self.load.compare_exchange(
            LOAD_COUNTED,
            LOAD_CLEAR,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if counted.is_ok() {
            if let Err(error) = store.set_load_count(&self.id, 0) {
                tracing::warn!(run_id = %self.id, %error, "load count not forgotten");
            }
            drop(store.sync());
        }
    }

    /// The store's token this cell writes with, and the run's id: what
    /// [`crate::store::while_leased`] checks an effect of the run against.
    pub(crate) fn token(&self) -> (&RunId, Token) {
        (&self.id, self.token)
    }

    /// Waits until this cell's writes so far are durable. Fails with
    /// [`EngineError::Fenced`] when one of them was dropped because another engine took the
    /// run over: the caller must then act on nothing it wrote, and stop driving the run.
    pub(crate) async fn durable(&self, store: &dyn JournalStore) -> Result<()> {
        self.durable_as(store, false).await
    }

    /// [`RunCell::durable`], for a writer that is `alone`: it waits for nothing else until
    /// its writes are durable ([`JournalStore::sync_alone`]).
    pub(crate) async fn durable_as(&self, store: &dyn JournalStore, alone: bool) -> Result<()> {
        self.flush(store)?;
        let ticket = if alone {
            store.sync_alone()
        } else {
            store.sync()
        };
        ticket.wait().await?;
        if store.fenced(&self.id, self.token) {
            self.loaded.lock().expect("cell lock").write_failed = true;
            return Err(EngineError::Fenced {
                id: self.id.clone(),
            });
        }
        Ok(())
    }

    /// Whether what this cell holds may be ahead of the store: one of its writes failed, or
    /// was dropped because another engine took the run over. Reads must go to the store.
    pub(crate) fn stale(&self, store: &dyn JournalStore) -> bool {
        self.loaded.lock().expect("cell lock").write_failed || store.fenced(&self.id, self.token)
    }

    /// Tells the run's lanes whether a pause request stands, as the journal's state says
    /// under the cell lock: a pause and a resume each call it once durable, and whichever
    /// ends last tells what the state says then, never a value an earlier call read (a
    /// resume that ended after a later pause would otherwise withdraw that pause).
    pub(crate) fn tell_pause(&self) {
        let loaded = self.loaded.lock().expect("cell lock");
        self.requests.tell_pause(loaded.state.pause_requested);
    }

    /// Reads the run state.
    pub(crate) fn with_state<R>(&self, f: impl FnOnce(&RunState) -> R) -> R {
        f(&self.loaded.lock().expect("cell lock").state)
    }

    /// Detaches the cell if `unload` gives a reason for it (from the record and whether a
    /// storage write failed in the cell): `Some(None)` when the run settled, `Some(Some(stop))`
    /// when it stops otherwise, whose waiters are then told why unless they have their answer
    /// (a durable end, published). Returns whether it did.
    pub(crate) fn detach_if(
        &self,
        store: &dyn JournalStore,
        unload: impl FnOnce(&RunRecord, bool) -> Option<Option<Stop>>,
    ) -> bool {
        let mut loaded = self.loaded.lock().expect("cell lock");
        // A failure leaves `write_failed` set, which `unload` hears of.
        let _ = self.flush_locked(&mut loaded, store);
        if let Some(stop) = unload(&loaded.record, loaded.write_failed) {
            loaded.detached = true;
            if let Some(stop) = stop {
                // A settled record whose end was never published is told too: its settling
                // write's sync failed, so the end is not durable, and nothing else would
                // answer its waiters.
                let drivable = loaded.record.status.is_drivable();
                self.watched.send_if_modified(|watched| {
                    let tell = drivable || !watched.answered();
                    if tell {
                        watched.stopped = Some(stop);
                    }
                    tell
                });
            }
        }
        loaded.detached
    }

    /// Detaches the cell to park its run if `may` accepts the run as it is under the cell
    /// lock, and no write failed in it; its waiters are told to look again. Returns whether
    /// this call detached it (a cell detached before is never parked).
    pub(crate) fn park_if(&self, may: impl FnOnce(&RunRecord, &RunState) -> bool) -> bool {
        let mut loaded = self.loaded.lock().expect("cell lock");
        // Parking follows a sync of everything the run wrote (its wake index entry is written
        // after, `engine/parking.rs`); an entry deferred since (a branch's completion, which
        // never parks) keeps the run loaded.
        if loaded.deferred.is_some() {
            return false;
        }
        if loaded.detached || loaded.write_failed || !may(&loaded.record, &loaded.state) {
            return false;
        }
        loaded.detached = true;
        self.watched
            .send_modify(|watched| watched.stopped = Some(Stop::Parked));
        true
    }

    /// Runs `f` under the cell lock if the run is unsettled (drivable) and the cell in use:
    /// no settling write of this cell can come before `f` returns (a parent parking until
    /// this child settles, `engine/parking.rs`). `None` if the run settled or the cell is
    /// detached.
    pub(crate) fn while_unsettled<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let loaded = self.loaded.lock().expect("cell lock");
        if loaded.detached || loaded.write_failed || !loaded.record.status.is_drivable() {
            return None;
        }
        let made = f();
        drop(loaded);
        Some(made)
    }

    /// Tells waiters the run's current status. Called after the caller's transition is
    /// durable; the run may have moved on since (a resume racing a pause), and then waiters
    /// hear the newer status, never a stale one. (`Engine::wait` syncs before it answers, so
    /// nobody outside hears of a status before it is durable.)
    pub(crate) fn publish(&self) {
        let current = self.status();
        self.watched.send_if_modified(|watched| {
            let changed = watched.status != current;
            watched.status = current;
            changed
        });
    }

    /// A copy of the run record.
    pub(crate) fn record(&self) -> RunRecord {
        self.loaded.lock().expect("cell lock").record.clone()
    }

    /// The run's status, without copying its record (whose input may be large).
    pub(crate) fn status(&self) -> RunStatus {
        self.loaded.lock().expect("cell lock").record.status
    }

    /// What `read` takes from the run record, under the cell's lock (keep it short).
    pub(crate) fn with_record<T>(&self, read: impl FnOnce(&RunRecord) -> T) -> T {
        read(&self.loaded.lock().expect("cell lock").record)
    }

    /// Appends `event` (not yet durable: callers request a sync before acting on it).
    pub(crate) fn append(&self, store: &dyn JournalStore, event: Event) -> Result<()> {
        self.append_if(store, event, |_, _| Ok(()))
    }

    /// Appends `event`, a step's completion, but hands it to the store only with the next
    /// entry, or alone when the run's code waits first ([`RunCell::flushing_when_idle`]),
    /// something waits for the cell's writes to be durable ([`RunCell::durable`]) or the
    /// cell is detached: one store write fewer per step. Until then a crash loses it as it
    /// may lose any write not yet synced, and the step runs again with the same key. A write
    /// that fails is reported by the call that hands the entry over.
    pub(crate) fn append_deferred(&self, store: &dyn JournalStore, event: Event) -> Result<()> {
        self.write_as(
            store,
            |_, _| Ok(Some(event)),
            None::<fn(&mut RunRecord)>,
            true,
        )
        .map(|_| ())
    }

    /// Runs `body` (the run's workflow code), handing the deferred entry, if any, to the store
    /// whenever it waits (a poll that returns pending): so an entry is deferred only while the
    /// run goes straight on to its next entry (a no-op step's completion and the next step's
    /// start are written together), never across a wait of the run (a rate limit's queue, a
    /// branch's long step, code awaiting something else), after which it reaches the store
    /// as soon as it would have before. A failed write is logged here, and the cell's next
    /// write fails with [`EngineError::RunStopped`], which stops the driver.
    pub(crate) async fn flushing_when_idle<F: std::future::Future>(
        &self,
        store: &dyn JournalStore,
        body: F,
    ) -> F::Output {
        let mut body = std::pin::pin!(body);
        std::future::poll_fn(|cx| {
            let polled = body.as_mut().poll(cx);
            if polled.is_pending() {
                if let Err(error) = self.flush(store) {
                    tracing::error!(run_id = %self.id, %error, "a step's completion could not be written");
                }
            }
            polled
        })
        .await
    }

    /// Hands the deferred entry, if any, to the store ([`RunCell::append_deferred`]).
    fn flush(&self, store: &dyn JournalStore) -> Result<()> {
        let mut loaded = self.loaded.lock().expect("cell lock");
        self.flush_locked(&mut loaded, store)
    }

    fn flush_locked(&self, loaded: &mut Loaded, store: &dyn JournalStore) -> Result<()> {
        let Some((index, entry)) = loaded.deferred.take() else {
            return Ok(());
        };
        if let Err(e) = store.append(
            &self.id,
            index,
            std::slice::from_ref(&entry),
            None,
            self.token,
        ) {
            // Memory is ahead of the store: as for a failed append.
            loaded.write_failed = true;
            return Err(e);
        }
        Ok(())
    }

    /// Appends `event` if `guard` accepts the run as it is under the cell lock.
    pub(crate) fn append_if(
        &self,
        store: &dyn JournalStore,
        event: Event,
        guard: impl FnOnce(&RunRecord, &RunState) -> Result<()>,
    ) -> Result<()> {
        let make =
            |record: &RunRecord, state: &RunState| guard(record, state).map(|()| Some(event));
        self.write(store, make, None::<fn(&mut RunRecord)>)
            .map(|_| ())
    }

    /// Appends the event `make` decides on from the run as it is under the cell lock, if it
    /// decides on one; returns it.
    pub(crate) fn append_made(
        &self,
        store: &dyn JournalStore,
        make: impl FnOnce(&RunRecord, &RunState) -> Result<Option<Event>>,
    ) -> Result<Option<Event>> {
        self.write(store, make, None::<fn(&mut RunRecord)>)
    }

    /// Appends `event` and changes the run record in one atomic write.
    pub(crate) fn transition(
        &self,
        store: &dyn JournalStore,
        event: Event,
        status: RunStatus,
        change: impl FnOnce(&mut RunRecord),
    ) -> Result<()> {
        self.transition_if(store, event, |_, _| Ok(()), status, change)
    }

    /// Like [`RunCell::transition`], if `guard` accepts the run as it is under the cell lock.
    pub(crate) fn transition_if(
        &self,
        store: &dyn JournalStore,
        event: Event,
        guard: impl FnOnce(&RunRecord, &RunState) -> Result<()>,
        status: RunStatus,
        change: impl FnOnce(&mut RunRecord),
    ) -> Result<()> {
        let make =
            |record: &RunRecord, state: &RunState| guard(record, state).map(|()| Some(event));
        self.write(
            store,
            make,
            Some(|record: &mut RunRecord| {
                record.status = status;
                record.updated_at_ms = self.clock.now_ms();
                if status.is_terminal() {
                    record.finished_at_ms = Some(record.updated_at_ms);
                }
                change(record);
            }),
        )
        .map(|_| ())
    }

    /// Writes the event `make` decides on (none: nothing is written), with the record
    /// changed by `change` if given, in one atomic write (after the deferred entry, if any).
    fn write(
        &self,
        store: &dyn JournalStore,
        make: impl FnOnce(&RunRecord, &RunState) -> Result<Option<Event>>,
        change: Option<impl FnOnce(&mut RunRecord)>,
    ) -> Result<Option<Event>> {
        self.write_as(store, make, change, false)
    }

    /// [`RunCell::write`]; with `defer`, an entry without a record change is kept as the
    /// deferred entry if there is none yet (and `None` returned).
    fn write_as(
        &self,
        store: &dyn JournalStore,
        make: impl FnOnce(&RunRecord, &RunState) -> Result<Option<Event>>,
        change: Option<impl FnOnce(&mut RunRecord)>,
        defer: bool,
    ) -> Result<Option<Event>> {
        let mut loaded = self.loaded.lock().expect("cell lock");
        if loaded.detached {
            return Err(EngineError::Detached {
                id: self.id.clone(),
            });
        }
        if loaded.write_failed {
            // Not `InvalidState`, which callers read as a race with an operator's call and
            // retry: the driver must stop (the run resumes at the next open).
            return Err(EngineError::RunStopped {
                id: self.id.clone(),
                reason: "a write to its journal failed; it resumes at the next open".into(),
            });
        }
        // What memory holds is what the store holds (or will, at the next sync): decisions
        // on it stand.
        let Some(event) = make(&loaded.record, &loaded.state)? else {
            return Ok(None);
        };
        // Status transitions and undo records go past the bound, so that a run that reached
        // it can still be suspended, cancelled and compensated.
        let bounded = change.is_none() && !loaded.state.compensating;
        if bounded && loaded.state.len >= JOURNAL_ENTRIES_PER_RUN_MAX {
            return Err(EngineError::LimitReached {
                what: format!("journal entries of run {}", self.id),
                limit: u64::from(JOURNAL_ENTRIES_PER_RUN_MAX),
            });
        }
        let index = JournalIndex(loaded.state.len);
        let entry = Entry {
            at_ms: self.clock.now_ms(),
            event,
        };
        // Checked when written as when read: an entry the state machine rejects is a bug in
        // the executor, and must never reach the disk.
        if let Err(e) = loaded.state.apply(&entry) {
            panic!(
                "bug: run {} would journal an entry its own state machine rejects: {e}",
                self.id
            );
        }
        if defer && change.is_none() && loaded.deferred.is_none() {
            loaded.deferred = Some((index, entry));
            return Ok(None);
        }
        let record = change.map(|change| {
            let mut record = loaded.record.clone();
            change(&mut record);
            record
        });
        // A child run settling: its parent may be parked until it does (`child.rs`). The
        // parent's wake index entry says "loaded" before the child's record says settled, so
        // an open after a crash between the two drives the parent, which reads the child.
        // Written before the notice, so that a failure here leaves no notice to tidy up.
        let parent = record.as_ref().and_then(|after| {
            (loaded.record.status.is_drivable() && !after.status.is_drivable())
                .then_some(after.parent.as_ref())
                .flatten()
        });
        if let Some(parent) = parent {
            if let Err(e) = store.wake_if_indexed(parent) {
                // Memory (the state) is ahead of the store already: as for a failed append.
                loaded.write_failed = true;
                return Err(e);
            }
        }
        // A transition someone wants to hear of writes its notice first: writes become
        // durable in the order they were made, so the transition is never durable without
        // its notice (`notice.rs` says how a notice without its transition is told apart).
        let notice = record
            .as_ref()
            .and_then(|after| self.outbox.notice(&loaded.record, after, index, &entry));
        if let Some(notice) = &notice {
            if let Err(e) = notice.put(store) {
                // Memory (the state) is ahead of the store already: as for a failed append.
                // The transition is not made, so none is left without its notice.
                loaded.write_failed = true;
                return Err(e);
            }
        }
        // The deferred entry goes first, in the same write (no allocation for either).
        let (written, entry) = match loaded.deferred.take() {
            Some((first, deferred)) => {
                let pair = [deferred, entry];
                let written = store.append(&self.id, first, &pair, record.as_ref(), self.token);
                let [_, entry] = pair;
                (written, entry)
            }
            None => (
                store.append(
                    &self.id,
                    index,
                    std::slice::from_ref(&entry),
                    record.as_ref(),
                    self.token,
                ),
                entry,
            ),
        };
        if let Err(e) = written {
            // Memory is now ahead of the store: the cell must not be used again. Its driver
            // stops; the run is reloaded from the store by the next open.
            loaded.write_failed = true;
            if let Some(notice) = &notice {
                // Never handed out without its entry anyway; this only tidies up.
                let _ = store.delete_keyed(Space::Notice, &notice.event_id);
            }
            return Err(e);
        }
        if let Some(record) = record {
            loaded.record = record;
        }
        if notice.is_some() {
            self.outbox.wrote();
        }
        Ok(Some(entry.event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Attempt, OperationIndex};
    use crate::store::sled::{LostData, SledOptions, SledStore};
    use crate::store::Durability;

    /// A deferred completion whose write fails when the run's code waits (here: one too large
    /// to encode) stops the run at its next write with `RunStopped`, which its driver acts
    /// on, and not `InvalidState`, which the executor reads as a race with an operator's call
    /// and retries (a paused run's driver spun on it); the store holds nothing of it.
    #[tokio::test]
    async fn a_failed_deferred_write_stops_the_run_at_its_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let options = SledOptions {
            durability: Durability::ProcessCrash,
            lost_data: LostData::Refuse,
            cache_bytes: None,
        };
        let store = SledStore::open(dir.path(), options).unwrap();
        let record = RunRecord {
            id: RunId::new("failing").unwrap(),
            workflow: "test.flow".into(),
            version: 1,
            input: serde_json::json!(null),
            status: RunStatus::Running,
            created_at_ms: 1,
            updated_at_ms: 1,
            finished_at_ms: None,
            output: None,
            error: None,
            parent: None,
            rerun_of: None,
        };
        assert!(store.create_run(&record).await.unwrap().is_none());
        let id = record.id.clone();
        let cell = RunCell::new(
            record,
            RunState::default(),
            Clock::system(),
            Token::CREATED,
            Arc::new(Outbox::new(&[])),
        );
        let started = |step: u32| Event::StepStarted {
            step: OperationIndex(step),
            kind: "test.step".into(),
            argument: serde_json::json!(null),
            attempt: Attempt(1),
            compensable: false,
        };
        cell.append(&store, started(0)).unwrap();
        let too_large = "x".repeat(crate::limits::ENTRY_BYTES_MAX);
        cell.append_deferred(
            &store,
            Event::StepCompleted {
                step: OperationIndex(0),
                attempt: Attempt(1),
                output: serde_json::json!(too_large),
            },
        )
        .unwrap();
        // The run's code waits once: the completion is written then, and fails.
        cell.flushing_when_idle(&store, tokio::task::yield_now())
            .await;
        match cell.append(&store, started(1)) {
            Err(EngineError::RunStopped { reason, .. }) => {
                assert!(reason.contains("write to its journal failed"), "{reason}")
            }
            other => panic!("expected RunStopped, got {other:?}"),
        }
        assert_eq!(store.journal(&id).await.unwrap().len(), 1, "the start only");
    }
}
