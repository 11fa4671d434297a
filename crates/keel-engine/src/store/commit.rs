//! Group commit: one committer thread makes writes durable for every waiting writer at once.
//!
//! Writers apply their change to sled (in memory), then ask for a [`SyncTicket`] and await it.
//! The committer takes the newest ticket number, syncs once, and resolves every ticket up to that
//! number: a sync started after a write was made covers that write. Syncs run one at a time,
//! with blocking calls, and nothing calls sled's `flush_async`, so writers cannot pile up inside
//! it (eight concurrent `flush_async` callers on a 2-worker runtime hung in 3 of 3 tries on this
//! machine).
//!
//! One exception, for a store whose sync needs only the calling thread (sled's, not
//! PostgreSQL's): a writer that waits for nothing else meanwhile (a run's main lane, which
//! awaits its own entry and nothing more) on a runtime of more than one thread, and asks for
//! a ticket while the committer sleeps, after [`QUIET`] syncs in a row that each answered one
//! ticket or none with no ticket issued during a writer's own sync, runs the sync itself, on
//! its own thread ([`Committer::ticket_alone`]). One run stepping alone then waits for one
//! wake-up (its own thread's, at the disk's interrupt), not three (the committer's at the
//! ticket, the committer's at the disk's interrupt, the writer's at the answer); on a virtual
//! machine whose idle CPUs halt, each goes through the hypervisor. It answers its own ticket
//! only, since others' writes may come after it began. While it runs, the sync is held: a
//! ticket issued meanwhile ends the streak and queues for the committer, which syncs again
//! once it ends. So at most one writer is ever blocked in a sync, and a writer starts one only
//! while writers come one at a time. The writer's thread hands its runtime's work to another
//! thread for the sync (`block_in_place`): a task it woke just before (in the thread's
//! next-task slot, which other threads do not steal) and its other tasks go on, and a disk
//! whose syncs take seconds takes no thread from the runtime. Only futures a workflow's own
//! code polls together with the step wait out the sync. The hand-off wakes a thread of
//! tokio's blocking pool, off the writer's path (no CPU per step measurable). A runtime of one
//! thread never takes this path: on a current-thread runtime no ticket could arrive during the
//! writer's sync to end the streak (every ready run would sync alone instead of sharing one),
//! and `block_in_place` panics there. A multi-threaded runtime of one worker is kept off it
//! too: as first built, before the hand-off, it starved crowds the same way; with the hand-off
//! it was not measured.
//!
//! A failed sync is final: the page cache may have dropped the dirty pages, so retrying could
//! report success for data that is gone. Every ticket from then on fails.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::{oneshot, watch};

use crate::error::{EngineError, Result};

/// What a durable write survives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Survives power loss: sled's flush, each of whose log writes ends in `fdatasync`, and
    /// each of whose blob files is synced as it is written (Keel's patched sled,
    /// `vendor/sled/KEEL-PATCHES.md`). The default.
    #[default]
    PowerLoss,
    /// Survives a crash of the process, not of the machine: sled's flush only (on Linux it
    /// ends in `sync_file_range`, which flushes neither the device cache nor file metadata).
    ProcessCrash,
}

/// What a ticket is answered with: durable, or the failure that made durability impossible.
type Answer = std::result::Result<(), String>;

/// The store's sync: makes everything written so far durable.
type SyncFn = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// Who may run the sync besides the committer thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Syncers {
    /// Only the committer thread (a sync that needs the async runtime, or a connection of
    /// its own, such as PostgreSQL's `COMMIT`).
    CommitterOnly,
    /// Also a lone writer ([`Committer::ticket_alone`]) while the committer sleeps: it runs
    /// the sync on its own thread, blocking it (its runtime work handed to another thread),
    /// and is answered without the committer's wake-ups. For a blocking sync that needs
    /// nothing but the calling thread (sled's `flush`).
    LoneWriter,
}

/// How many syncs in a row must each have answered one ticket or none, with no ticket issued
/// during a writer's own sync, before a lone writer syncs on its own thread: writers come one
/// at a time, not in a crowd, whose writers would each sync alone instead of sharing one.
const QUIET: u32 = 4;

#[derive(Default)]
struct Requests {
    /// The number of the last ticket issued.
    issued: u64,
    /// The number of the last ticket answered by the committer's syncs (or failed).
    answered: u64,
    /// Unanswered tickets, oldest first (numbers are issued in increasing order), each with
    /// the channel that wakes exactly its own waiter. One channel per ticket, not one shared
    /// broadcast: with thousands of runs waiting, a broadcast wakes every one of them on every
    /// sync only for most to find it was not theirs.
    waiting: VecDeque<(u64, oneshot::Sender<Answer>)>,
    /// Set once a sync failed; final.
    failure: Option<String>,
    stop: bool,
    /// Whether the committer waits on the condition variable for a ticket: only then does
    /// a new ticket signal it (a signal is a system call even with nobody waiting). A busy
    /// committer takes every ticket issued meanwhile when its sync ends.
    asleep: bool,
    /// Syncs in a row that each answered one ticket or none, with no ticket issued during a
    /// writer's own sync (saturating); see [`QUIET`].
    quiet: u32,
    /// Whether a writer runs the sync on its own thread now.
    writer_syncing: bool,
}

impl Requests {
    /// Whether a lone writer may sync on its own thread now: the committer sleeps with
    /// nothing to answer, writers have come one at a time for [`QUIET`] syncs, and the store
    /// neither failed nor stops.
    fn lone(&self) -> bool {
        self.asleep && self.quiet >= QUIET && self.failure.is_none() && !self.stop
    }
}

struct Shared {
    requests: Mutex<Requests>,
    wake: Condvar,
    /// Set, with the reason, once the store can make nothing durable any more.
    broken: watch::Sender<Option<String>>,
    /// The sync, held by whoever runs it: one sync at a time.
    sync: Mutex<SyncFn>,
    syncers: Syncers,
}

/// Waits for the durability of the writes made before it was issued.
#[must_use = "a write is not durable until its ticket resolves"]
pub(crate) struct SyncTicket {
    state: TicketState,
}

enum TicketState {
    /// Queued for the committer, or answered already.
    Queued(oneshot::Receiver<Answer>),
    /// Issued to a lone writer while writers came one at a time: its waiter may sync on its
    /// own thread.
    Lone(Arc<Shared>),
    /// Waited for or dropped.
    Done,
}

impl std::fmt::Debug for SyncTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            TicketState::Queued(_) => "queued",
            TicketState::Lone(_) => "lone",
            TicketState::Done => "done",
        };
        f.debug_struct("SyncTicket").field("state", &state).finish()
    }
}

impl SyncTicket {
    /// Resolves once the writes before this ticket are durable.
    pub(crate) async fn wait(mut self) -> Result<()> {
        if let TicketState::Lone(shared) = &self.state {
            let shared = Arc::clone(shared);
            match shared.sync_here() {
                Ok(answer) => {
                    self.state = TicketState::Done;
                    return settled(answer);
                }
                Err(queued) => self.state = TicketState::Queued(queued),
            }
        }
        let answer = match std::mem::replace(&mut self.state, TicketState::Done) {
            TicketState::Queued(answer) => answer,
            TicketState::Lone(_) | TicketState::Done => unreachable!("a ticket is waited for once"),
        };
        match answer.await {
            Ok(answer) => settled(answer),
            // The committer never drops an unanswered ticket while it runs.
            Err(_) => Err(EngineError::ShutDown),
        }
    }
}

impl Drop for SyncTicket {
    /// A ticket dropped unwaited still asks for a sync: the committer runs it.
    fn drop(&mut self) {
        if let TicketState::Lone(shared) = std::mem::replace(&mut self.state, TicketState::Done) {
            drop(shared.enqueue(shared.requests.lock().expect("committer lock")));
        }
    }
}

fn settled(answer: Answer) -> Result<()> {
    answer.map_err(|failure| EngineError::Sync {
        path: PathBuf::from("<store>"),
        source: std::io::Error::other(failure),
    })
}

impl Shared {
    /// Queues a ticket for the committer, waking it if it sleeps.
    fn enqueue(&self, mut requests: MutexGuard<'_, Requests>) -> oneshot::Receiver<Answer> {
        let (sender, answer) = oneshot::channel();
        if let Some(failure) = &requests.failure {
            let _ = sender.send(Err(failure.clone()));
            return answer;
        }
        if requests.writer_syncing {
            // Writers do not come one at a time.
            requests.quiet = 0;
        }
        requests.issued += 1;
        let ticket = requests.issued;
        requests.waiting.push_back((ticket, sender));
        // The first ticket after the committer fell asleep wakes it; later ones find it
        // awake (or about to be) and need not.
        let wake = std::mem::take(&mut requests.asleep);
        drop(requests);
        if wake {
            self.wake.notify_one();
        }
        answer
    }

    /// Runs the sync on this thread for a lone writer's ticket, if writers still come one at
    /// a time ([`Requests::lone`]) and no sync runs: the answer, or else the ticket queued for
    /// the committer. The sync starts after the ticket was issued, so it covers the writes
    /// made before it.
    fn sync_here(&self) -> std::result::Result<Answer, oneshot::Receiver<Answer>> {
        let mut requests = self.requests.lock().expect("committer lock");
        if let Some(failure) = &requests.failure {
            return Ok(Err(failure.clone()));
        }
        let held = if requests.lone() {
            self.sync.try_lock().ok()
        } else {
            None
        };
        let Some(mut sync) = held else {
            return Err(self.enqueue(requests));
        };
        requests.writer_syncing = true;
        drop(requests);
        // The runtime thread's other tasks, the one it woke last among them, go on on another
        // thread meanwhile.
        let answer = tokio::task::block_in_place(|| run(&mut sync));
        if let Err(failure) = &answer {
            for (_, sender) in self.failed(failure) {
                let _ = sender.send(answer.clone());
            }
        }
        let mut requests = self.requests.lock().expect("committer lock");
        requests.writer_syncing = false;
        if requests.quiet > 0 {
            requests.quiet = requests.quiet.saturating_add(1);
        }
        Ok(answer)
    }

    /// Runs the sync with `sync` held, unless an earlier one failed: no sync follows a failed
    /// one.
    fn run_held(&self, sync: &mut SyncFn) -> Answer {
        if let Some(failure) = &self.requests.lock().expect("committer lock").failure {
            return Err(failure.clone());
        }
        run(sync)
    }

    /// Records a failed sync (final): every ticket waiting is taken, to be failed, and
    /// `ticket` fails new ones at once.
    fn failed(&self, failure: &str) -> Vec<(u64, oneshot::Sender<Answer>)> {
        let mut requests = self.requests.lock().expect("committer lock");
        requests.failure.get_or_insert_with(|| failure.to_owned());
        self.broken.send_if_modified(|current| {
            let first = current.is_none();
            if first {
                *current = Some(format!("a sync failed: {failure}"));
            }
            first
        });
        requests.answered = requests.issued;
        requests.waiting.drain(..).collect()
    }
}

/// Runs the sync. A panic in it is a failed sync (final, as any other): it would otherwise
/// unwind through a writer's task, or end the committer thread with tickets unanswered.
fn run(sync: &mut SyncFn) -> Answer {
    crate::crash::point("commit.before_sync");
    let synced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(sync))
        .unwrap_or_else(|_| Err(std::io::Error::other("the sync panicked")));
    synced.map_err(|error| {
        tracing::error!(%error, "sync failed; the store accepts no more durable writes");
        error.to_string()
    })
}

/// The committer thread and its queue of tickets.
pub(crate) struct Committer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    /// Starts the committer; `sync` makes everything written so far durable.
    pub(crate) fn start(
        sync: impl FnMut() -> std::io::Result<()> + Send + 'static,
        syncers: Syncers,
    ) -> Committer {
        let shared = Arc::new(Shared {
            requests: Mutex::new(Requests::default()),
            wake: Condvar::new(),
            broken: watch::Sender::new(None),
            sync: Mutex::new(Box::new(sync)),
            syncers,
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("keel-committer".into())
            .spawn(move || committer(&thread_shared))
            .expect("spawning the committer thread");
        Committer {
            shared,
            thread: Some(thread),
        }
    }

    /// The store's health: `Some(reason)` once a sync failed (final), or once
    /// [`Committer::break_with`] was called.
    pub(crate) fn broken(&self) -> watch::Receiver<Option<String>> {
        self.shared.broken.subscribe()
    }

    /// Marks the store broken for `reason` (a lease lost, say) although no sync failed yet:
    /// whoever watches [`Committer::broken`] stops. The first reason stays.
    pub(crate) fn break_with(&self) -> impl Fn(String) + Send + Sync + 'static {
        let broken = self.shared.broken.clone();
        move |reason| {
            broken.send_if_modified(|current| {
                let first = current.is_none();
                if first {
                    *current = Some(reason);
                }
                first
            });
        }
    }

    /// Issues a ticket for every write made before this call.
    pub(crate) fn ticket(&self) -> SyncTicket {
        SyncTicket {
            state: TicketState::Queued(
                self.shared
                    .enqueue(self.shared.requests.lock().expect("committer lock")),
            ),
        }
    }

    /// Issues a ticket for every write made before this call, to a writer that waits for
    /// nothing else until it is answered: with [`Syncers::LoneWriter`], on a runtime of more
    /// than one thread, while writers come one at a time, the writer runs the sync itself when
    /// it waits.
    pub(crate) fn ticket_alone(&self) -> SyncTicket {
        // More than one runtime thread (the module doc says why). This also keeps
        // current-thread runtimes, where `block_in_place` panics, off the path: the main lane
        // waits for its ticket in the same task and poll as it takes it.
        let multi_threaded = || {
            tokio::runtime::Handle::try_current()
                .is_ok_and(|runtime| runtime.metrics().num_workers() > 1)
        };
        let requests = self.shared.requests.lock().expect("committer lock");
        let state =
            if self.shared.syncers == Syncers::LoneWriter && requests.lone() && multi_threaded() {
                TicketState::Lone(Arc::clone(&self.shared))
            } else {
                TicketState::Queued(self.shared.enqueue(requests))
            };
        SyncTicket { state }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.shared.requests.lock().expect("committer lock").stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // The committer finishes the sync in progress and answers every issued ticket.
            let _ = thread.join();
        }
    }
}

fn committer(shared: &Shared) {
    loop {
        let target = {
            let mut requests = shared.requests.lock().expect("committer lock");
            while requests.issued == requests.answered && !requests.stop {
                requests.asleep = true;
                requests = shared.wake.wait(requests).expect("committer lock");
            }
            requests.asleep = false;
            if requests.issued == requests.answered {
                return; // stop requested and every ticket answered
            }
            requests.issued
        };
        // A writer syncing on its own thread holds the sync: this one starts after it. A
        // failure is recorded before the sync is let go, so that none follows it.
        let mut sync = shared.sync.lock().expect("sync lock");
        let answer = shared.run_held(&mut sync);
        let answered: Vec<_> = match &answer {
            Err(failure) => shared.failed(failure),
            Ok(()) => {
                let mut requests = shared.requests.lock().expect("committer lock");
                requests.answered = requests.answered.max(target);
                let covered = requests
                    .waiting
                    .iter()
                    .take_while(|(ticket, _)| *ticket <= target)
                    .count();
                requests.quiet = match covered {
                    0 | 1 => requests.quiet.saturating_add(1),
                    _ => 0,
                };
                requests.waiting.drain(..covered).collect()
            }
        };
        drop(sync);
        // Woken outside the lock, each waiter exactly once.
        for (_, sender) in answered {
            let _ = sender.send(answer.clone());
        }
    }
}

#[cfg(test)]
mod tests;
