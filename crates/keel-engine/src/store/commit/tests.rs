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

/// Names of the threads that ran each sync.
#[derive(Clone, Default)]
struct Syncs {
    threads: Arc<Mutex<Vec<String>>>,
}

impl Syncs {
    /// A sync that records its thread's name as it begins, then does what `then` says.
    fn record_then(
        &self,
        mut then: impl FnMut(&str) -> std::io::Result<()> + Send + 'static,
    ) -> impl FnMut() -> std::io::Result<()> + Send + 'static {
        let threads = Arc::clone(&self.threads);
        move || {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            threads.lock().unwrap().push(name.clone());
            then(&name)
        }
    }

    fn record(&self) -> impl FnMut() -> std::io::Result<()> + Send + 'static {
        self.record_then(|_| Ok(()))
    }

    fn threads(&self) -> Vec<String> {
        self.threads.lock().unwrap().clone()
    }

    /// Waits until `n` syncs have begun.
    fn until_begun(&self, n: usize) {
        until(|| self.threads().len() >= n, "a sync to begin");
    }
}

/// Waits, for 10 s at most, until `done` holds.
fn until(done: impl Fn() -> bool, what: &str) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("waited 10 s for {what}");
}

/// Waits until the committer sleeps on its condition variable.
fn until_asleep(committer: &Committer) {
    until(
        || committer.shared.requests.lock().unwrap().asleep,
        "the committer to fall asleep",
    );
}

/// Runs `future` on this thread, in a runtime of two worker threads (where a lone writer may
/// sync on its own thread), for 10 s at most.
fn runtime_block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), future)
                .await
                .expect("answered within 10 s")
        })
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
                    runtime_block_on(async { committer.ticket_alone().wait().await }).unwrap();
                }
            })
            .unwrap()
            .join()
            .unwrap();
    });
}

/// Lone writers until the streak holds, then one more on a thread named `writer`, whose
/// ticket is lone: its join handle, with the ticket's answer.
fn writer_after_the_streak(committer: &Arc<Committer>) -> std::thread::JoinHandle<Result<()>> {
    lone_writers(committer, QUIET);
    until_asleep(committer);
    let committer = Arc::clone(committer);
    std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || runtime_block_on(async { committer.ticket_alone().wait().await }))
        .unwrap()
}

/// One sync held until the test releases it.
struct Gate {
    entered: std::sync::mpsc::Receiver<()>,
    release: std::sync::mpsc::Sender<()>,
}

impl Gate {
    /// Waits, for 10 s at most, until the held sync has begun.
    fn until_entered(&self) {
        self.entered
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the held sync began within 10 s");
    }
}

/// A sync that records each call's thread, holds the calls numbered `held` (from 0) until
/// their gate is released, and returns what `result` says for each call.
fn gated_at<const N: usize>(
    syncs: &Syncs,
    held: [usize; N],
    mut result: impl FnMut(usize) -> std::io::Result<()> + Send + 'static,
) -> (
    impl FnMut() -> std::io::Result<()> + Send + 'static,
    [Gate; N],
) {
    let mut sides = Vec::new();
    let gates = held.map(|_| {
        let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        sides.push((entered_tx, release_rx));
        Gate { entered, release }
    });
    let mut call = 0;
    let sync = syncs.record_then(move |_| {
        let this = call;
        call += 1;
        if let Some(at) = held.iter().position(|held| *held == this) {
            let (entered, release) = &sides[at];
            entered.send(()).unwrap();
            // A test that failed drops its gate: the sync goes on.
            let _ = release.recv();
        }
        result(this)
    });
    (sync, gates)
}

/// Once writers have come one at a time for `QUIET` syncs, a lone writer of a store that
/// allows it, on a runtime of more than one thread, runs the sync on its own thread. A store
/// that does not allow it, and a writer that did not say it is alone, have every sync run by
/// the committer.
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

/// On a runtime of one thread (current-thread, or multi-threaded with one worker) a lone
/// writer leaves its sync to the committer: no other task could run during its own sync to
/// end the streak, so every ready run would sync alone.
#[test]
fn a_lone_writer_on_a_runtime_of_one_thread_leaves_the_sync_to_the_committer() {
    let syncs = Syncs::default();
    let committer = Committer::start(syncs.record(), Syncers::LoneWriter);
    lone_writers(&committer, QUIET + 1);
    assert_eq!(syncs.threads().last().unwrap(), "writer");
    let runtimes = [
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap(),
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap(),
    ];
    for runtime in &runtimes {
        until_asleep(&committer);
        let ticket = runtime.block_on(async { committer.ticket_alone() });
        assert!(format!("{ticket:?}").contains("queued"), "{ticket:?}");
        runtime_block_on(ticket.wait()).unwrap();
        assert_eq!(syncs.threads().last().unwrap(), "keel-committer");
    }
}

/// A ticket issued while a writer's sync runs is not answered by that sync (it may have
/// begun before the ticket's write): it stays unanswered after the writer's sync has ended,
/// until the committer's next sync, which never overlaps the writer's. The streak ends: the
/// next lone writer leaves its sync to the committer.
#[test]
fn a_ticket_issued_during_a_writers_sync_waits_for_a_later_one() {
    let syncs = Syncs::default();
    let quiet = QUIET as usize;
    // Call `quiet` is the writer's sync, the one after it the committer's.
    let (gated, [writer_gate, committer_gate]) = gated_at(&syncs, [quiet, quiet + 1], |_| Ok(()));
    let running = Arc::new(AtomicU64::new(0));
    let overlapped = Arc::new(AtomicU64::new(0));
    let (running_in, overlapped_in) = (Arc::clone(&running), Arc::clone(&overlapped));
    let mut gated = gated;
    let committer = Arc::new(Committer::start(
        move || {
            if running_in.fetch_add(1, Ordering::SeqCst) > 0 {
                overlapped_in.fetch_add(1, Ordering::SeqCst);
            }
            let synced = gated();
            running_in.fetch_sub(1, Ordering::SeqCst);
            synced
        },
        Syncers::LoneWriter,
    ));
    let writer = writer_after_the_streak(&committer);
    writer_gate.until_entered();
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
    writer_gate.release.send(()).unwrap();
    writer.join().unwrap().unwrap();
    committer_gate.until_entered();
    let early = answered.recv_timeout(std::time::Duration::from_millis(200));
    assert!(early.is_err(), "answered by the writer's sync: {early:?}");
    committer_gate.release.send(()).unwrap();
    answered
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the second ticket is answered")
        .unwrap();
    waiter.join().unwrap();
    let mut expected = vec!["keel-committer"; quiet];
    expected.extend(["writer", "keel-committer"]);
    assert_eq!(syncs.threads(), expected);
    assert_eq!(
        overlapped.load(Ordering::SeqCst),
        0,
        "two syncs ran at once"
    );
    assert!(committer.shared.requests.lock().unwrap().quiet < QUIET);
}

/// After a sync of the committer answered more than one ticket, lone writers leave their
/// syncs to the committer until `QUIET` syncs in a row answered one each.
#[test]
fn a_crowd_ends_the_streak() {
    let syncs = Syncs::default();
    let quiet = QUIET as usize;
    // Calls 0 to `quiet` are the streak and the writer's sync; the next, the committer's, is
    // held while two more tickets are issued, so that its next one answers both.
    let (sync, [gate]) = gated_at(&syncs, [quiet + 1], |_| Ok(()));
    let committer = Committer::start(sync, Syncers::LoneWriter);
    lone_writers(&committer, QUIET + 1);
    let mut expected = vec!["keel-committer"; quiet];
    expected.push("writer");
    assert_eq!(syncs.threads(), expected);
    until_asleep(&committer);
    drop(committer.ticket());
    gate.until_entered();
    let (second, third) = (committer.ticket(), committer.ticket());
    gate.release.send(()).unwrap();
    let (a, b) = runtime_block_on(async { tokio::join!(second.wait(), third.wait()) });
    a.unwrap();
    b.unwrap();
    let before = syncs.threads().len();
    assert_eq!(before, quiet + 3, "{:?}", syncs.threads());
    lone_writers(&committer, QUIET + 1);
    let threads = syncs.threads();
    let after: Vec<_> = threads[before..].iter().map(String::as_str).collect();
    assert_eq!(after, expected);
}

/// A writer's failed sync is final as the committer's is: its ticket, a ticket waiting
/// meanwhile (with the failure, not a dropped answer) and every later one fail with it, the
/// store is broken, and nothing syncs again.
#[test]
fn a_failed_sync_on_a_writers_thread_is_final() {
    let syncs = Syncs::default();
    let quiet = QUIET as usize;
    // Call `quiet` is the writer's, and fails.
    let (sync, [gate]) = gated_at(&syncs, [quiet], move |call| {
        if call == quiet {
            return Err(std::io::Error::other("disk gone"));
        }
        Ok(())
    });
    let committer = Arc::new(Committer::start(sync, Syncers::LoneWriter));
    let writer = writer_after_the_streak(&committer);
    gate.until_entered();
    let waiting = committer.ticket();
    gate.release.send(()).unwrap();
    for result in [writer.join().unwrap(), runtime_block_on(waiting.wait())] {
        let err = result.unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
    }
    assert!(committer.broken().borrow().is_some());
    for _ in 0..3 {
        let err = runtime_block_on(async { committer.ticket_alone().wait().await }).unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
        let err = runtime_block_on(committer.ticket().wait()).unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
    }
    drop(Arc::into_inner(committer).expect("the writer's thread has ended"));
    let mut expected = vec!["keel-committer"; quiet];
    expected.push("writer");
    assert_eq!(syncs.threads(), expected);
}

/// A sync that panics fails like one that returns an error, on either thread: final, and
/// every ticket, waiting or later, is answered with the failure (none waits forever).
#[test]
fn a_panicking_sync_is_a_failed_one() {
    for thread in ["keel-committer", "writer"] {
        let syncs = Syncs::default();
        let sync = syncs.record_then(move |name| {
            if name == thread {
                panic!("sled asserted");
            }
            Ok(())
        });
        let committer = Committer::start(sync, Syncers::LoneWriter);
        // The committer's first syncs panic unless they are the writer's to panic.
        if thread == "writer" {
            lone_writers(&committer, QUIET);
        }
        until_asleep(&committer);
        let err = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("writer".into())
                .spawn_scoped(scope, || {
                    runtime_block_on(async { committer.ticket_alone().wait().await })
                })
                .unwrap()
                .join()
                .unwrap()
                .unwrap_err()
        });
        assert!(err.to_string().contains("the sync panicked"), "{err}");
        let err = runtime_block_on(committer.ticket().wait()).unwrap_err();
        assert!(err.to_string().contains("the sync panicked"), "{err}");
        assert!(committer.broken().borrow().is_some());
        drop(committer);
        assert_eq!(syncs.threads().last().unwrap(), thread);
        assert_eq!(syncs.threads().iter().filter(|t| *t == thread).count(), 1);
    }
}

/// A lone writer's ticket dropped without being waited for still gets its sync, from the
/// committer.
#[test]
fn a_dropped_ticket_still_asks_for_a_sync() {
    let syncs = Syncs::default();
    let committer = Committer::start(syncs.record(), Syncers::LoneWriter);
    lone_writers(&committer, QUIET + 1);
    until_asleep(&committer);
    let ticket = runtime_block_on(async { committer.ticket_alone() });
    assert!(format!("{ticket:?}").contains("lone"), "{ticket:?}");
    drop(ticket);
    syncs.until_begun(QUIET as usize + 2);
    assert_eq!(syncs.threads().last().unwrap(), "keel-committer");
}

/// A runtime of two threads named `runtime-thread`, and a committer after the streak whose
/// next sync (a lone writer's, if one comes) is held by the gate.
fn streak_held_next() -> (tokio::runtime::Runtime, Syncs, Gate, Arc<Committer>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("runtime-thread")
        .enable_time()
        .build()
        .unwrap();
    let syncs = Syncs::default();
    let (sync, [gate]) = gated_at(&syncs, [QUIET as usize], |_| Ok(()));
    let committer = Arc::new(Committer::start(sync, Syncers::LoneWriter));
    lone_writers(&committer, QUIET);
    until_asleep(&committer);
    (runtime, syncs, gate, committer)
}

/// Waits, for 10 s at most, for the writer's task on `runtime`, which must succeed.
fn writer_answered(runtime: &tokio::runtime::Runtime, writer: tokio::task::JoinHandle<Result<()>>) {
    runtime
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), writer)
                .await
                .expect("the writer answered within 10 s")
        })
        .unwrap()
        .unwrap();
}

/// While a lone writer's sync runs on a runtime thread, the tasks of that thread go on
/// elsewhere: one it woke just before (which tokio keeps in the thread's next-task slot,
/// where no other thread takes it) runs before the sync ends.
#[test]
fn a_task_woken_before_a_writers_sync_runs_during_it() {
    // The runtime first, so that a failed check drops the gate (letting the held sync go)
    // before the runtime, whose drop waits for its threads.
    let (runtime, syncs, gate, committer) = streak_held_next();
    let (ran_tx, ran) = std::sync::mpsc::channel::<()>();
    let (waiting_tx, waiting) = std::sync::mpsc::channel::<()>();
    let (wake, woken) = tokio::sync::oneshot::channel::<()>();
    let _woken_task = runtime.spawn(async move {
        waiting_tx.send(()).unwrap();
        woken.await.unwrap();
        ran_tx.send(()).unwrap();
    });
    waiting
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the task to wake began");
    // Let it reach its await.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let writer_committer = Arc::clone(&committer);
    let writer = runtime.spawn(async move {
        let ticket = writer_committer.ticket_alone();
        wake.send(()).unwrap();
        ticket.wait().await
    });
    gate.until_entered();
    assert_eq!(
        syncs.threads().last().unwrap(),
        "runtime-thread",
        "the writer's sync runs on its runtime thread"
    );
    let during = ran.recv_timeout(std::time::Duration::from_secs(10));
    gate.release.send(()).unwrap();
    assert!(
        during.is_ok(),
        "the woken task waited for the writer's sync to end"
    );
    writer_answered(&runtime, writer);
}

/// A lone writer's sync that takes long (a slow disk) takes no thread from the runtime: with
/// the sync held, two tasks that each block until the other runs still meet on a runtime of
/// two threads.
#[test]
fn a_long_sync_of_a_writer_leaves_the_runtime_its_threads() {
    // The runtime first, so that a failed check drops the gate (letting the held sync go)
    // before the runtime, whose drop waits for its threads.
    let (runtime, syncs, gate, committer) = streak_held_next();
    let writer_committer = Arc::clone(&committer);
    let writer = runtime.spawn(async move { writer_committer.ticket_alone().wait().await });
    gate.until_entered();
    assert_eq!(syncs.threads().last().unwrap(), "runtime-thread");
    // Each task blocks its thread until the other has begun: they meet only if two threads
    // run tasks while the writer's sync is held.
    let (a_tx, a_rx) = std::sync::mpsc::channel::<()>();
    let (b_tx, b_rx) = std::sync::mpsc::channel::<()>();
    let meet = |mine: std::sync::mpsc::Sender<()>, other: std::sync::mpsc::Receiver<()>| {
        runtime.spawn(async move {
            let _ = mine.send(());
            other
                .recv_timeout(std::time::Duration::from_secs(10))
                .is_ok()
        })
    };
    let (a, b) = (meet(a_tx, b_rx), meet(b_tx, a_rx));
    let met = runtime.block_on(async { (a.await.unwrap_or(false), b.await.unwrap_or(false)) });
    gate.release.send(()).unwrap();
    assert_eq!(met, (true, true), "two tasks ran during the writer's sync");
    writer_answered(&runtime, writer);
}
