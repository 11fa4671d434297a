//! Named crash points, for crash tests in the manner of sled's: a test runs a child process
//! with `KEEL_CRASH_AT=<point>` (and optionally `KEEL_CRASH_SKIP=<n>` to pass the point `n`
//! times first), and the child kills itself with SIGKILL when it reaches the point. With
//! `KEEL_CRASH_SIGNAL=STOP` it stops itself with SIGSTOP instead, as a paused machine does,
//! until the test continues it; with `KEEL_CRASH_SIGNAL=HANG` only the thread that reached
//! the point stops, for good, as a thread descheduled there would, while the rest of the
//! process goes on (the test kills it). Apart from the crash, `KEEL_PAUSE_AT=<point>[,<point>...]`
//! makes the thread that reaches any of those points sleep `KEEL_PAUSE_MS` (1,000 by default)
//! at every hit and then go on, as a thread the system left unscheduled there for a while
//! would: a race test stretches a window between two steps of one task with it. Without the
//! `crash-points` feature every point compiles to nothing.

/// Every crash point, in the order a run meets them. Crash tests iterate over this list.
pub const POINTS: &[&str] = &[
    "open.before_mark_rename",
    "start.after_create",
    "start.after_sync",
    "step.before_started",
    "step.after_started",
    "step.after_effect",
    "step.after_outcome",
    "step.after_failure",
    "timer.after_set",
    "timer.after_fired",
    "wait.after_started",
    "wait.after_poll",
    "wait.after_ended",
    "event.after_delivered",
    "event.after_received",
    "event.after_published",
    "child.after_started",
    "child.after_created",
    "child.after_ended",
    "commit.before_sync",
    "store.after_transition_entry",
    "postgres.after_commit",
    "run.before_terminal",
    "run.after_terminal",
    "saga.after_compensation_started",
    "saga.after_undo_started",
    "saga.after_undo",
    "saga.after_undo_recorded",
];

/// The points only a sled store meets (its opening, its transitions' commit point (the
/// entry, before the record's view; for a settling one its only write, the record), and a
/// new run's wake index entry, which only it keeps; that one is listed in [`PARK_POINTS`]).
pub const SLED_POINTS: &[&str] = &[
    "open.before_mark_rename",
    "store.after_transition_entry",
    "start.after_wake_entry",
];

/// The points only a PostgreSQL store meets.
pub const POSTGRES_POINTS: &[&str] = &["postgres.after_commit"];

/// The points of an engine's open (`engine/resume.rs`): a worker stopped there loses its
/// lease while it opens.
pub const OPEN_POINTS: &[&str] = &["open.after_claim"];

/// The points of the wake index and of parking (`engine/parking.rs`), met in full only by
/// runs that park; their crash tests iterate over this list (on PostgreSQL, which keeps wake
/// times in the run's row and writes none at a start, without `start.after_wake_entry`: see
/// [`SLED_POINTS`]).
pub const PARK_POINTS: &[&str] = &[
    "start.after_wake_entry",
    "park.after_index",
    "wake.before_load",
    "wake.after_index",
    "wake.after_load",
];

/// The points of operator calls for a given run, met only by batches and reruns: before
/// each matched run's action (the batch's scan read it, nothing of its action done); in the
/// action (a cancel, pause, resume, retry or resolve), or in a rerun's note in the run it
/// reruns, between its check of the run as stored and its load (`engine/operator.rs`); and
/// after the batch's action is durable. Their crash tests iterate over this list.
pub const OPERATOR_POINTS: &[&str] = &[
    "batch.before_action",
    "operator.before_load",
    "batch.after_action",
];

/// The points of garbage collection (`engine/gc.rs`): between its scan and its deletes, and
/// after each of its atomic writes (before their sync), met only when a collection found runs
/// to delete; its crash and race tests are in `tests/engine_delete_races.rs`.
pub const GC_POINTS: &[&str] = &["gc.before_delete", "gc.after_delete"];

/// The step library's crash points (keel-steps' file publication), met only by runs that
/// use those steps; their crash tests iterate over this list.
pub const STEP_LIBRARY_POINTS: &[&str] = &[
    "publish.after_partial_write",
    "publish.after_sync",
    "publish.after_rename",
    "publish.after_marker",
];

/// The SFTP upload's crash points (keel-steps' `sftp.upload`), met only by runs that use it;
/// its crash test iterates over this list.
pub const SFTP_POINTS: &[&str] = &[
    "sftp.after_partial_write",
    "sftp.after_sync",
    "sftp.after_rename",
];

/// The points of a schedule's fire (`engine/schedules.rs`), met only by engines with
/// schedules; their crash tests iterate over this list.
pub const SCHEDULE_POINTS: &[&str] = &[
    "schedule.before_start",
    "schedule.after_start",
    "schedule.after_fired",
];

/// Kills the process if `name` is the armed crash point.
#[cfg(feature = "crash-points")]
pub fn point(name: &'static str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static ARMED: OnceLock<Option<(String, u64, Option<String>)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    debug_assert!(
        POINTS.contains(&name)
            || STEP_LIBRARY_POINTS.contains(&name)
            || SFTP_POINTS.contains(&name)
            || OPERATOR_POINTS.contains(&name)
            || GC_POINTS.contains(&name)
            || SCHEDULE_POINTS.contains(&name)
            || PARK_POINTS.contains(&name)
            || OPEN_POINTS.contains(&name),
        "crash point {name} is not listed in POINTS"
    );
    let armed = ARMED.get_or_init(|| {
        let at = std::env::var("KEEL_CRASH_AT").ok()?;
        let skip = std::env::var("KEEL_CRASH_SKIP")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Some((at, skip, std::env::var("KEEL_CRASH_SIGNAL").ok()))
    });
    pause(name);
    if let Some((at, skip, signal)) = armed {
        if at == name && HITS.fetch_add(1, Ordering::SeqCst) == *skip {
            match signal.as_deref() {
                Some("STOP") => {
                    tracing::warn!(point = name, "crash point reached: SIGSTOP");
                    raise(libc::SIGSTOP);
                    tracing::warn!(point = name, "continued after SIGSTOP");
                }
                Some("HANG") => {
                    tracing::warn!(point = name, "crash point reached: this thread hangs");
                    loop {
                        std::thread::park();
                    }
                }
                _ => {
                    tracing::warn!(point = name, "crash point reached: SIGKILL");
                    raise(libc::SIGKILL);
                    unreachable!("SIGKILL returned");
                }
            }
        }
    }
}

/// Sleeps `KEEL_PAUSE_MS` on this thread if `name` is among the points of `KEEL_PAUSE_AT`.
#[cfg(feature = "crash-points")]
fn pause(name: &'static str) {
    use std::sync::OnceLock;
    use std::time::Duration;

    static PAUSED: OnceLock<(Vec<String>, Duration)> = OnceLock::new();
    let (points, pause) = PAUSED.get_or_init(|| {
        let points = std::env::var("KEEL_PAUSE_AT")
            .map(|at| at.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        let ms = std::env::var("KEEL_PAUSE_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(1_000);
        (points, Duration::from_millis(ms))
    });
    if points.iter().any(|point| point == name) {
        tracing::warn!(
            point = name,
            pause_ms = pause.as_millis(),
            "pause point reached: this thread sleeps"
        );
        std::thread::sleep(*pause);
    }
}

#[cfg(feature = "crash-points")]
#[allow(unsafe_code)]
fn raise(signal: libc::c_int) {
    // SAFETY: raise(2) has no memory-safety preconditions. SIGKILL cannot be caught, so the
    // process ends here exactly as if another process had killed it; SIGSTOP stops every
    // thread until a SIGCONT, as if the machine had paused.
    unsafe {
        libc::raise(signal);
    }
}

/// Does nothing: crash points are compiled out without the `crash-points` feature.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn point(_name: &'static str) {}
