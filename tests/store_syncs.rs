//! What a commit asks of the disk on the sled store, counted by `strace` around a child
//! process that runs one workflow of sequential steps (each step's start is made durable
//! before the step runs, so each is at least one commit):
//!
//! - at `PowerLoss`, every commit is one `fdatasync` of sled's log, ended by sled's own write
//!   (Keel's patched sled, `vendor/sled/KEEL-PATCHES.md`), and there is no
//!   `sync_file_range`: one device round trip per commit. With the published sled 0.34.7
//!   each commit was a waited `sync_file_range` and then the committer's `fdatasync`;
//! - at `ProcessCrash`, commits are `sync_file_range` only, and the log is never
//!   `fdatasync`ed.
//!
//! - at `PowerLoss`, the commits' writes land in space the log file already has (sled
//!   allocates each segment that grows the file before writing into it, `zero_new_segments`),
//!   so their `fdatasync`s write no new file size.
//!
//! Needs `strace` (scripts/test.sh installs Debian's when it is missing).

use std::path::Path;
use std::process::{Command, Stdio};

use keel::{Ctx, Durability, Engine, Step, StepContext, StepError, Workflow, WorkflowError};
use keel_testkit::crash::{is_child, path_env};
use serde::{Deserialize, Serialize};

const STEPS: u32 = 40;

/// Does nothing; its number makes every journal entry distinct, and its padding (empty
/// unless a test asks) makes the journal as large as a test needs.
#[derive(Serialize, Deserialize)]
struct Nothing(u32, String);

impl Step for Nothing {
    const KIND: &'static str = "test.nothing";
    type Output = ();
    const COMPENSABLE: bool = false;

    async fn execute(&self, _: &StepContext) -> Result<(), StepError> {
        Ok(())
    }
}

/// `n` steps, one after the other, each padded with `padding` bytes.
struct Sequential;

impl Workflow for Sequential {
    const NAME: &'static str = "test.sequential";
    type Input = (u32, usize);
    type Output = ();

    async fn run(ctx: &mut Ctx, (n, padding): (u32, usize)) -> Result<(), WorkflowError> {
        for i in 0..n {
            let padding = format!("{i:08}").repeat(padding / 8);
            ctx.step(Nothing(i, padding)).await?;
        }
        Ok(())
    }
}

fn durability_named(name: &str) -> Durability {
    match name {
        "PowerLoss" => Durability::PowerLoss,
        "ProcessCrash" => Durability::ProcessCrash,
        other => panic!("unknown durability {other}"),
    }
}

/// The child: one run of `STEPS` steps to its end, on a fresh store (steps of 40 KiB with
/// `KEEL_LARGE_STEPS` set: sled rewrites leaves of several of them into blob files).
fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let durability = durability_named(&std::env::var("KEEL_DURABILITY").expect("KEEL_DURABILITY"));
    let padding = match std::env::var_os("KEEL_LARGE_STEPS") {
        Some(_) => 40 * 1024,
        None => 0,
    };
    keel_testkit::crash::runtime().block_on(async {
        let engine = Engine::builder(&dir)
            .durability(durability)
            .workflow::<Sequential>()
            .step::<Nothing>()
            .open()
            .await
            .expect("opening the store");
        engine
            .start::<Sequential>("sequential", (STEPS, padding))
            .await
            .expect("starting")
            .result()
            .await
            .expect("the run completes");
        engine.shutdown().await;
    });
}

/// How many calls of each sync the child made on sled's log file `db` (the mark file's
/// syncs, which follow the commits at most every 100 ms, are left out), and how often it
/// listed sled's blob directory.
#[derive(Debug)]
struct Syncs {
    fdatasync: usize,
    sync_file_range: usize,
    blob_listings: usize,
}

/// Runs the child under `strace` at `durability` and counts its syncs.
fn traced(test_name: &str, dir: &Path, durability: &str) -> Syncs {
    let text = strace(
        test_name,
        dir,
        durability,
        "fdatasync,sync_file_range,openat",
        &[],
    );
    let on_log = |call: &str| {
        text.lines()
            .filter(|line| line.contains(&format!("{call}(")) && line.contains("/db>"))
            .count()
    };
    Syncs {
        fdatasync: on_log("fdatasync"),
        sync_file_range: on_log("sync_file_range"),
        blob_listings: text
            .lines()
            .filter(|line| {
                line.contains("openat(")
                    && line.contains("O_DIRECTORY")
                    && line.contains("/blobs\"")
            })
            .count(),
    }
}

/// Runs the child under `strace -e trace=calls` at `durability` in the data directory
/// `dir/durability`, with `env` set too, and returns the trace.
fn strace(
    test_name: &str,
    dir: &Path,
    durability: &str,
    calls: &str,
    env: &[(&str, &str)],
) -> String {
    let trace = dir.join(format!("{durability}.strace"));
    let exe = std::env::current_exe().expect("current test binary");
    let status = Command::new("strace")
        // `-y` prints each descriptor's path: `fdatasync(9</tmp/.../db>)`.
        .args(["-f", "-qq", "-y", "-e"])
        .arg(format!("trace={calls}"))
        .arg("-o")
        .arg(&trace)
        .arg(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(keel_testkit::crash::CHILD_ENV, "1")
        .env("KEEL_DATA_DIR", path_env(dir, durability))
        .env("KEEL_DURABILITY", durability)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("strace runs (scripts/test.sh installs it: apt-get install strace)");
    assert!(status.success(), "the traced child failed: {status}");
    std::fs::read_to_string(&trace).expect("strace's output")
}

#[test]
fn a_power_loss_commit_is_one_fdatasync_and_a_process_crash_commit_none() {
    const NAME: &str = "a_power_loss_commit_is_one_fdatasync_and_a_process_crash_commit_none";
    if is_child() {
        return child_main();
    }
    let dir = tempfile::tempdir().unwrap();

    let power_loss = traced(NAME, dir.path(), "PowerLoss");
    assert_eq!(
        power_loss.sync_file_range, 0,
        "at PowerLoss sled's log writes must end in fdatasync, not sync_file_range: {power_loss:?}"
    );
    // Each step's start is its own commit; opening the store and the run's start and end add
    // a few more.
    assert!(
        power_loss.fdatasync >= STEPS as usize,
        "fewer fdatasyncs than commits: a step was not made durable ({power_loss:?})"
    );
    assert!(
        power_loss.fdatasync < 2 * STEPS as usize,
        "more than one fdatasync per commit ({power_loss:?})"
    );
    // The blob directory is listed only at open (Keel's sync of the blobs there before sled
    // opens, and sled's own removal of unreferenced ones): sled syncs the blobs it writes.
    assert!(
        power_loss.blob_listings <= 2,
        "the blob directory was listed after the open: {power_loss:?}"
    );

    let process_crash = traced(NAME, dir.path(), "ProcessCrash");
    assert!(
        process_crash.sync_file_range >= STEPS as usize,
        "at ProcessCrash each commit is sled's sync_file_range: {process_crash:?}"
    );
    assert_eq!(
        process_crash.fdatasync, 0,
        "at ProcessCrash the log is never fdatasynced: {process_crash:?}"
    );
}

/// At `PowerLoss` sled `fsync`s every blob file it writes, and then the directory that holds
/// it, on the thread that wrote it, before that thread does anything else the trace shows:
/// the blob is durable before the log message that points at it can be written, and so
/// before sled can remove the blob it replaces. A run of large steps, whose leaves sled
/// rewrites into blob files, under `strace`. (Before, the committer synced blobs after its
/// flush: a blob sled's own cleaning wrote and pointed at between commits could replace a
/// synced one that sled then removed, and come back empty after a power loss.)
#[test]
fn a_power_loss_blob_is_synced_by_its_writer_before_anything_else() {
    const NAME: &str = "a_power_loss_blob_is_synced_by_its_writer_before_anything_else";
    if is_child() {
        return child_main();
    }
    let dir = tempfile::tempdir().unwrap();
    let env = [("KEEL_LARGE_STEPS", "1")];
    let text = strace(NAME, dir.path(), "PowerLoss", "openat,fsync", &env);
    // `PID openat(..., "/.../blobs/N", O_WRONLY|O_CREAT|O_EXCL...) = 9</.../blobs/N>`, then
    // `PID fsync(9</.../blobs/N>)`; a call another thread interrupts is split into
    // `... <unfinished ...>` and `PID <... fsync resumed>) = 0`.
    let blob_of = |line: &str| -> Option<String> {
        let start = line.find("/blobs/")? + "/blobs/".len();
        let name: String = line[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        (!name.is_empty()).then_some(name)
    };
    let pid_of = |line: &str| line.split_whitespace().next().unwrap_or("").to_string();
    let calls: Vec<&str> = text.lines().filter(|l| !l.contains(" resumed>")).collect();
    let mut blobs = 0;
    for (i, line) in calls.iter().enumerate() {
        if !(line.contains("openat(") && line.contains("O_CREAT")) {
            continue;
        }
        let Some(blob) = blob_of(line) else { continue };
        blobs += 1;
        let pid = pid_of(line);
        let mut next = calls[i + 1..].iter().filter(|l| pid_of(l) == pid);
        let first = next.next().copied().unwrap_or("nothing");
        assert!(
            first.contains(" fsync(") && blob_of(first).as_deref() == Some(blob.as_str()),
            "blob {blob}: its writer's next call is not its fsync but {first}"
        );
        let directory_synced = next
            .take(2)
            .any(|l| l.contains(" fsync(") && l.contains("/blobs>"));
        assert!(
            directory_synced,
            "blob {blob}: its directory was not synced next"
        );
    }
    assert!(
        blobs > 0,
        "sled wrote no blob file, so the test tests nothing: make the steps larger"
    );
}

/// sled's segment size (its default, which Keel keeps).
const SEGMENT_BYTES: u64 = 512 * 1024;

/// Steps of the run that records the log's length, and the padding each step's argument
/// carries: together about 1.3 MiB of journal, so that sled's log moves into new segments
/// while the run goes on (below 128 KiB a value stays in the log, not in a blob file).
const LENGTH_STEPS: u32 = 64;
const PADDING_BYTES: usize = 20 * 1024;

/// The length of sled's log file, as each step saw it: each step runs after its start was
/// made durable, so each length is the file's after a commit.
static LOG_LENGTHS: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

/// Records the length of `db` in the directory it names; its padding fills the log.
#[derive(Serialize, Deserialize)]
struct LogLength {
    dir: String,
    padding: String,
}

impl Step for LogLength {
    const KIND: &'static str = "test.log_length";
    type Output = ();
    const COMPENSABLE: bool = false;

    async fn execute(&self, _: &StepContext) -> Result<(), StepError> {
        let length = std::fs::metadata(Path::new(&self.dir).join("db"))
            .map_err(|e| StepError::permanent(e.to_string()))?
            .len();
        LOG_LENGTHS.lock().unwrap().push(length);
        Ok(())
    }
}

/// `LENGTH_STEPS` steps recording the log's length.
struct Lengths;

impl Workflow for Lengths {
    const NAME: &'static str = "test.lengths";
    type Input = String;
    type Output = ();

    async fn run(ctx: &mut Ctx, dir: String) -> Result<(), WorkflowError> {
        for i in 0..LENGTH_STEPS {
            // Distinct in every step, so that no two journal entries are alike.
            let padding = format!("{i:05}").repeat(PADDING_BYTES / 5);
            ctx.step(LogLength {
                dir: dir.clone(),
                padding,
            })
            .await?;
        }
        Ok(())
    }
}

/// At `PowerLoss` (the default) sled gives the log file each new segment before it writes
/// into it, at open and whenever the log moves into a segment past the file's end: after
/// every commit the file is a whole number of segments, and it grows once per segment, not
/// with each commit. Without that, it grew at every commit.
#[tokio::test]
async fn a_power_loss_commit_writes_into_space_the_log_already_has() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path())
        .workflow::<Lengths>()
        .step::<LogLength>()
        .open()
        .await
        .unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    engine
        .start::<Lengths>("lengths", path)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    engine.shutdown().await;
    let lengths = LOG_LENGTHS.lock().unwrap().clone();
    assert_eq!(lengths.len(), LENGTH_STEPS as usize);
    assert!(
        lengths.iter().all(|length| length % SEGMENT_BYTES == 0),
        "the log ends inside a segment after a commit, so commits grow the file: {lengths:?}"
    );
    let growths = lengths.windows(2).filter(|w| w[1] != w[0]).count();
    assert!(
        growths >= 2,
        "the log never moved into a new segment during the run, so allocation at a \
         segment's turn went untested: {lengths:?}"
    );
    assert!(
        growths <= LENGTH_STEPS as usize / 4,
        "the log grew during {growths} of {LENGTH_STEPS} commits: {lengths:?}"
    );
}

/// Each call of [`CountedStep`], by its run's name, over the test's engines.
static HELD_STEPS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The [`Held`] runs whose first step has returned to their code.
static HELD_PAST: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Lets every [`Held`] run go on, once true.
fn held_release() -> &'static tokio::sync::watch::Sender<bool> {
    static RELEASE: std::sync::OnceLock<tokio::sync::watch::Sender<bool>> =
        std::sync::OnceLock::new();
    RELEASE.get_or_init(|| tokio::sync::watch::channel(false).0)
}

async fn released() {
    let mut release = held_release().subscribe();
    release
        .wait_for(|go| *go)
        .await
        .expect("the sender is static");
}

/// Notes its call in [`HELD_STEPS`]; with `held`, then waits for [`held_release`].
#[derive(Serialize, Deserialize)]
struct CountedStep {
    name: String,
    held: bool,
}

impl Step for CountedStep {
    const KIND: &'static str = "test.counted";
    type Output = ();
    const COMPENSABLE: bool = false;

    async fn execute(&self, _: &StepContext) -> Result<(), StepError> {
        HELD_STEPS.lock().unwrap().push(self.name.clone());
        if self.held {
            released().await;
        }
        Ok(())
    }
}

/// A counted step, then another step. Held in the step (input `true`), or after it in the
/// run's code (`false`), on something outside the journal ([`held_release`]).
struct Held;

impl Workflow for Held {
    const NAME: &'static str = "test.held";
    type Input = bool;
    type Output = ();

    async fn run(ctx: &mut Ctx, in_step: bool) -> Result<(), WorkflowError> {
        let name = ctx.run_id().as_str().to_owned();
        ctx.step(CountedStep {
            name: name.clone(),
            held: in_step,
        })
        .await?;
        HELD_PAST.lock().unwrap().push(name);
        if !in_step {
            released().await;
        }
        ctx.step(Nothing(1, String::new())).await?;
        Ok(())
    }
}

/// Waits until `list` names `name`.
async fn listed(list: &std::sync::Mutex<Vec<String>>, name: &str) {
    for _ in 0..2_000 {
        if list.lock().unwrap().iter().any(|n| n == name) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("{name} never got there");
}

/// How many raw journal values run `id` has in the sled store at `dir` (no engine open).
fn journal_values(dir: &Path, id: &str) -> usize {
    let key = keel_engine::test_utilities::raw::journal_key_of(
        &keel::RunId::new(id).unwrap(),
        keel::JournalIndex(0),
    );
    let prefix = &key[..key.len() - 4];
    let db = keel_testkit::raw::open(dir);
    db.scan_prefix(prefix).count()
}

/// A step's completion is not written on its own: the store gets it with the run's next
/// entry, as one sled value (`cell.rs`, `append_deferred`), so a sequential run of n steps
/// has n fewer journal values than entries (and one fewer again: the last completion and
/// the run's end are held in its settled record, `store/sled/journal.rs`). But it waits for no more than that: a run whose
/// code waits on something else after a step has the completion in the store meanwhile, and
/// a run stopped by a shutdown right after a step writes it as its cell is unloaded (reopened,
/// it does not run the step again).
#[tokio::test]
async fn a_steps_completion_is_written_with_the_next_entry() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        Engine::builder(dir.path())
            .workflow::<Sequential>()
            .workflow::<Held>()
            .step::<Nothing>()
            .step::<CountedStep>()
            .open()
    };
    let engine = open().await.unwrap();
    let sequential = engine
        .start::<Sequential>("sequential", (10, 0))
        .await
        .unwrap();
    sequential.result().await.unwrap();
    drop(sequential); // it holds the engine, and so the store
    let entries = engine.history("sequential").await.unwrap().entries.len();
    assert_eq!(entries, 21, "10 steps' starts and completions, and the end");

    engine.start::<Held>("held-code", false).await.unwrap();
    engine.start::<Held>("held-step", true).await.unwrap();
    listed(&HELD_PAST, "held-code").await;
    listed(&HELD_STEPS, "held-step").await;
    // The run's code waits after the step: its completion is in the store.
    let read = engine.history("held-code").await.unwrap();
    assert!(
        matches!(
            read.entries.last().map(|entry| &entry.event),
            Some(keel::Event::StepCompleted { .. })
        ),
        "{read:?}"
    );
    // Both runs wait on something the engine cannot interrupt, so the shutdown starts first
    // and they are let go after. `held-step`'s step then completes, and its next step stops
    // the run at once: the completion is written as its cell is unloaded.
    tokio::join!(engine.shutdown(), async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        held_release().send_replace(true);
    });
    drop(engine);
    assert_eq!(
        journal_values(dir.path(), "sequential"),
        entries - 11,
        "each completion shares its value with the next entry, the last two in the record"
    );

    let engine = open().await.unwrap();
    for name in ["held-code", "held-step"] {
        let record = engine.wait(name).await.unwrap();
        assert_eq!(record.status, keel::RunStatus::Completed, "{record:?}");
        let ran = HELD_STEPS
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == name)
            .count();
        assert_eq!(
            ran, 1,
            "run {name}'s first step ran again: its completion was lost"
        );
    }
    engine.shutdown().await;
}
