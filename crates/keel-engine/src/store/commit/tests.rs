//! The committer's tests: group commit, failure, and the lone writer's own sync.

use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// Many concurrent writers are answered by far fewer syncs, and none waits forever, on a
/// two-worker runtime (the configuration where sled's flush_async hung).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tickets_share_syncs() {
    let syncs = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&syncs);
    let committer = Arc::new(Committer::start(
        move || {
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(())
        },
        Syncers::CommitterOnly,
    ));
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
    let committer = Committer::start(|| Ok(()), Syncers::CommitterOnly);
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
    let committer = Committer::start(
        || Err(std::io::Error::other("disk gone")),
        Syncers::CommitterOnly,
    );
    let err = committer.ticket().wait().await.unwrap_err().to_string();
    assert!(err.contains("disk gone"), "{err}");
    assert!(committer.ticket().wait().await.is_err());
}

/// Names of the threads that ran each sync, and a way to hold a sync until released.
#[derive(Clone, Default)]
struct Syncs {
    threads: Arc<Mutex<Vec<String>>>,
}

impl Syncs {
    fn record(&self) -> impl FnMut() -> std::io::Result<()> + Send + 'static {
        self.record_taking(std::time::Duration::ZERO)
    }

    /// Records each sync's thread as it begins, then takes `duration`.
    fn record_taking(
        &self,
        duration: std::time::Duration,
    ) -> impl FnMut() -> std::io::Result<()> + Send + 'static {
        let threads = Arc::clone(&self.threads);
        move || {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            threads.lock().unwrap().push(name);
            std::thread::sleep(duration);
            Ok(())
        }
    }

    fn threads(&self) -> Vec<String> {
        self.threads.lock().unwrap().clone()
    }
}

/// Waits until the committer sleeps on its condition variable.
fn until_asleep(committer: &Committer) {
    for _ in 0..10_000 {
        if committer.shared.requests.lock().unwrap().asleep {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("the committer never fell asleep");
}

fn runtime_block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

/// `n` lone writers one after another, each once the committer sleeps, on a thread named
/// `writer`.
fn lone_writers(committer: &Committer, n: u32) {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("writer".into())
            .spawn_scoped(scope, || {
                for _ in 0..n {
                    until_asleep(committer);
                    runtime_block_on(committer.ticket_alone().wait()).unwrap();
                }
            })
            .unwrap()
            .join()
            .unwrap();
    });
}

/// Once writers have come one at a time for `QUIET` syncs, a lone writer of a store that
/// allows it runs the sync on its own thread (no wake-up of the committer, nor of the
/// writer when it is answered). A store that does not allow it, and a writer that did not
/// say it is alone, have every sync run by the committer.
#[test]
fn a_lone_writer_syncs_on_its_own_thread_once_writers_come_one_at_a_time() {
    let quiet = QUIET as usize;
    for (syncers, writer_thread) in [
        (Syncers::LoneWriter, "writer"),
        (Syncers::CommitterOnly, "keel-committer"),
    ] {
        let syncs = Syncs::default();
        let committer = Committer::start(syncs.record(), syncers);
        lone_writers(&committer, QUIET + 3);
        let mut expected = vec!["keel-committer"; quiet];
        expected.extend([writer_thread; 3]);
        assert_eq!(syncs.threads(), expected, "{syncers:?}");
        until_asleep(&committer);
        runtime_block_on(committer.ticket().wait()).unwrap();
        assert_eq!(syncs.threads().last().unwrap(), "keel-committer");
    }
}

/// A ticket issued while a writer's sync runs is not answered by that sync (it may have
/// begun before the ticket's write): the committer syncs again for it, after the writer's
/// sync ends, never during it. The streak ends: the next lone writer leaves its sync to
/// the committer.
#[test]
fn a_ticket_issued_during_a_writers_sync_waits_for_a_later_one() {
    let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let running = Arc::new(AtomicU64::new(0));
    let syncs = Arc::new(AtomicU64::new(0));
    let (running_in, syncs_in) = (Arc::clone(&running), Arc::clone(&syncs));
    let committer = Arc::new(Committer::start(
        move || {
            assert_eq!(
                running_in.fetch_add(1, Ordering::SeqCst),
                0,
                "two syncs at once"
            );
            if syncs_in.fetch_add(1, Ordering::SeqCst) == u64::from(QUIET) {
                entered_tx.send(()).unwrap();
                release_rx.lock().unwrap().recv().unwrap();
            }
            running_in.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        },
        Syncers::LoneWriter,
    ));
    lone_writers(&committer, QUIET);
    until_asleep(&committer);
    let first = committer.ticket_alone();
    let writer = std::thread::spawn(move || runtime_block_on(first.wait()));
    entered.recv().unwrap();
    // The writer's sync is running (and holds the sync): a second ticket is queued.
    let second = committer.ticket();
    let (answered_tx, answered) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let result = runtime_block_on(second.wait());
        answered_tx.send(result).unwrap();
    });
    let early = answered.recv_timeout(std::time::Duration::from_millis(200));
    assert!(
        early.is_err(),
        "answered during the writer's sync: {early:?}"
    );
    release.send(()).unwrap();
    writer.join().unwrap().unwrap();
    answered
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the second ticket is answered")
        .unwrap();
    waiter.join().unwrap();
    assert_eq!(syncs.load(Ordering::SeqCst), u64::from(QUIET) + 2);
    assert!(committer.shared.requests.lock().unwrap().quiet < QUIET);
}

/// After a sync of the committer answered more than one ticket, lone writers leave their
/// syncs to the committer until `QUIET` syncs in a row answered one each.
#[test]
fn a_crowd_ends_the_streak() {
    let syncs = Syncs::default();
    let taking = std::time::Duration::from_millis(20);
    let committer = Committer::start(syncs.record_taking(taking), Syncers::LoneWriter);
    lone_writers(&committer, QUIET + 1);
    assert_eq!(syncs.threads().last().unwrap(), "writer");
    // Two tickets issued during a sync of the committer: its next one answers both.
    until_asleep(&committer);
    drop(committer.ticket());
    while syncs.threads().len() < QUIET as usize + 2 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let (second, third) = (committer.ticket(), committer.ticket());
    let (a, b) = runtime_block_on(async { tokio::join!(second.wait(), third.wait()) });
    a.unwrap();
    b.unwrap();
    let before = syncs.threads().len();
    lone_writers(&committer, QUIET + 1);
    let threads = syncs.threads();
    let after: Vec<_> = threads[before..].iter().map(String::as_str).collect();
    let mut expected = vec!["keel-committer"; QUIET as usize];
    expected.push("writer");
    assert_eq!(after, expected);
}

/// A writer's failed sync is final as the committer's is: its ticket, the tickets
/// waiting and every later one fail with it, the store is broken, and nothing syncs again.
#[test]
fn a_failed_sync_on_a_writers_thread_is_final() {
    let syncs = Syncs::default();
    let record = Arc::clone(&syncs.threads);
    let mut counted = syncs.record();
    let committer = Committer::start(
        move || {
            counted()?;
            if record.lock().unwrap().last().unwrap() == "writer" {
                return Err(std::io::Error::other("disk gone"));
            }
            Ok(())
        },
        Syncers::LoneWriter,
    );
    lone_writers(&committer, QUIET);
    until_asleep(&committer);
    let err = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("writer".into())
            .spawn_scoped(scope, || runtime_block_on(committer.ticket_alone().wait()))
            .unwrap()
            .join()
            .unwrap()
            .unwrap_err()
    });
    assert!(err.to_string().contains("disk gone"), "{err}");
    assert!(committer.broken().borrow().is_some());
    for _ in 0..3 {
        let err = runtime_block_on(committer.ticket_alone().wait()).unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
        let err = runtime_block_on(committer.ticket().wait()).unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
    }
    drop(committer);
    let mut expected = vec!["keel-committer"; QUIET as usize];
    expected.push("writer");
    assert_eq!(syncs.threads(), expected);
}

/// A lone writer's ticket dropped without being waited for still gets its sync, from the
/// committer.
#[test]
fn a_dropped_ticket_still_asks_for_a_sync() {
    let syncs = Syncs::default();
    let committer = Committer::start(syncs.record(), Syncers::LoneWriter);
    lone_writers(&committer, QUIET + 1);
    until_asleep(&committer);
    drop(committer.ticket_alone());
    while syncs.threads().len() < QUIET as usize + 2 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(syncs.threads().last().unwrap(), "keel-committer");
}

/// A sync that panics fails like one that returns an error, on either thread: final, and
/// every ticket, waiting or later, is answered with the failure (none waits forever).
#[test]
fn a_panicking_sync_is_a_failed_one() {
    for lone in [false, true] {
        let calls = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&calls);
        let committer = Committer::start(
            move || {
                if counter.fetch_add(1, Ordering::SeqCst) >= u64::from(QUIET) {
                    panic!("sled asserted");
                }
                Ok(())
            },
            Syncers::LoneWriter,
        );
        lone_writers(&committer, QUIET);
        until_asleep(&committer);
        let ticket = if lone {
            committer.ticket_alone()
        } else {
            committer.ticket()
        };
        let err = runtime_block_on(ticket.wait()).unwrap_err();
        assert!(err.to_string().contains("the sync panicked"), "{err}");
        let err = runtime_block_on(committer.ticket().wait()).unwrap_err();
        assert!(err.to_string().contains("the sync panicked"), "{err}");
        assert!(committer.broken().borrow().is_some());
        drop(committer);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            u64::from(QUIET) + 1,
            "lone {lone}"
        );
    }
}
