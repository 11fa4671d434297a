//! Group commit: one committer thread makes writes durable for every waiting writer at once.
//!
//! Writers apply their change to sled (in memory), then ask for a [`SyncTicket`] and await it.
//! The committer takes the newest ticket number, syncs once, and resolves every ticket up to that
//! number: a sync started after a write was made covers that write. Because exactly one thread
//! ever syncs, and it syncs with blocking calls outside the async runtime, writers cannot pile
//! up inside sled's `flush_async` (eight concurrent `flush_async` callers on a 2-worker runtime
//! hung in 3 of 3 tries on this machine).
//!
//! A failed sync is final: the page cache may have dropped the dirty pages, so retrying could
//! report success for data that is gone. Every ticket from then on fails.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
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

#[derive(Default)]
struct Requests {
    /// The number of the last ticket issued.
    issued: u64,
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
}

struct Shared {
    requests: Mutex<Requests>,
    wake: Condvar,
    /// Set, with the reason, once the store can make nothing durable any more.
    broken: watch::Sender<Option<String>>,
}

/// Waits for the durability of the writes made before it was issued.
#[must_use = "a write is not durable until its ticket resolves"]
#[derive(Debug)]
pub(crate) struct SyncTicket {
    answer: oneshot::Receiver<Answer>,
}

impl SyncTicket {
    /// Resolves once the writes before this ticket are durable.
    pub(crate) async fn wait(self) -> Result<()> {
        match self.answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(failure)) => Err(EngineError::Sync {
                path: PathBuf::from("<store>"),
                source: std::io::Error::other(failure),
            }),
            // The committer never drops an unanswered ticket while it runs.
            Err(_) => Err(EngineError::ShutDown),
        }
    }
}

/// The committer thread and its queue of tickets.
pub(crate) struct Committer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    /// Starts the committer; `sync` makes everything written so far durable.
    pub(crate) fn start(sync: impl FnMut() -> std::io::Result<()> + Send + 'static) -> Committer {
        let shared = Arc::new(Shared {
            requests: Mutex::new(Requests::default()),
            wake: Condvar::new(),
            broken: watch::Sender::new(None),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("keel-committer".into())
            .spawn(move || committer(&thread_shared, sync))
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
        let (sender, answer) = oneshot::channel();
        let mut requests = self.shared.requests.lock().expect("committer lock");
        if let Some(failure) = &requests.failure {
            let _ = sender.send(Err(failure.clone()));
            return SyncTicket { answer };
        }
        requests.issued += 1;
        let ticket = requests.issued;
        requests.waiting.push_back((ticket, sender));
        // The first ticket after the committer fell asleep wakes it; later ones find it
        // awake (or about to be) and need not.
        let wake = std::mem::take(&mut requests.asleep);
        drop(requests);
        if wake {
            self.shared.wake.notify_one();
        }
        SyncTicket { answer }
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

fn committer(shared: &Shared, mut sync: impl FnMut() -> std::io::Result<()>) {
    let mut done: u64 = 0;
    loop {
        let target = {
            let mut requests = shared.requests.lock().expect("committer lock");
            while requests.issued == done && !requests.stop {
                requests.asleep = true;
                requests = shared.wake.wait(requests).expect("committer lock");
            }
            requests.asleep = false;
            if requests.issued == done {
                return; // stop requested and every ticket answered
            }
            requests.issued
        };
        crate::crash::point("commit.before_sync");
        let answer: Answer = sync().map_err(|error| {
            tracing::error!(%error, "sync failed; the store accepts no more durable writes");
            error.to_string()
        });
        let answered: Vec<_> = {
            let mut requests = shared.requests.lock().expect("committer lock");
            done = target;
            if let Err(failure) = &answer {
                // No sync follows a failed one: every ticket still waiting fails too, and
                // `ticket` fails new ones at once.
                requests.failure = Some(failure.clone());
                shared.broken.send_if_modified(|current| {
                    let first = current.is_none();
                    if first {
                        *current = Some(format!("a sync failed: {failure}"));
                    }
                    first
                });
                done = requests.issued;
                requests.waiting.drain(..).collect()
            } else {
                let covered = requests
                    .waiting
                    .iter()
                    .take_while(|(ticket, _)| *ticket <= target)
                    .count();
                requests.waiting.drain(..covered).collect()
            }
        };
        // Woken outside the lock, each waiter exactly once.
        for (_, sender) in answered {
            let _ = sender.send(answer.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Many concurrent writers are answered by far fewer syncs, and none waits forever, on a
    /// two-worker runtime (the configuration where sled's flush_async hung).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_tickets_share_syncs() {
        let syncs = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&syncs);
        let committer = Arc::new(Committer::start(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(())
        }));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let committer = Arc::clone(&committer);
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    committer.ticket().wait().await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let syncs = syncs.load(Ordering::SeqCst);
        assert!(syncs < 640, "640 tickets took {syncs} syncs: no batching");
    }

    /// A ticket issued while the committer sleeps wakes it, each time it fell asleep (it is
    /// signalled only then).
    #[tokio::test]
    async fn tickets_wake_a_sleeping_committer() {
        let committer = Committer::start(|| Ok(()));
        for _ in 0..3 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let answered = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                committer.ticket().wait(),
            );
            answered
                .await
                .expect("a sleeping committer answers")
                .unwrap();
        }
    }

    /// After a failed sync every ticket fails, including ones issued later.
    #[tokio::test]
    async fn sync_failure_is_final() {
        let committer = Committer::start(|| Err(std::io::Error::other("disk gone")));
        let err = committer.ticket().wait().await.unwrap_err().to_string();
        assert!(err.contains("disk gone"), "{err}");
        assert!(committer.ticket().wait().await.is_err());
    }
}
