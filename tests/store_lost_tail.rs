//! A store that lost data it had acknowledged says so: with sled's `db` file cut to 10%,
//! 20%, ... 90% of what its log's data spans (`cut_copy`), on a small store (5 finished runs) and on a large one (a few
//! MB, thousands of runs), opening is refused every time the cut lost acknowledged data, with
//! an error naming the loss and what to do (a cut that removed only the never-filled end of
//! sled's log opens, whole); an operator can accept the loss knowingly and go on with what is
//! left.
//!
//! Before the high-water mark, every one of those cuts opened without an error: on the small
//! store finished runs vanished or rolled back and ran their last steps again; on the large
//! one every run was gone.

use std::path::{Path, PathBuf};

use keel::{
    Ctx, Engine, EngineError, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError,
};
use serde::{Deserialize, Serialize};

/// Returns its number.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Add {
    n: u32,
}

impl Step for Add {
    const KIND: &'static str = "test.add";
    type Output = u32;
    const COMPENSABLE: bool = false;

    async fn execute(&self, _: &StepContext) -> Result<u32, StepError> {
        Ok(self.n)
    }
}

/// `steps` steps; outputs their sum.
struct Sum;

impl Workflow for Sum {
    const NAME: &'static str = "test.sum";
    type Input = u32;
    type Output = u32;

    async fn run(ctx: &mut Ctx, steps: u32) -> Result<u32, WorkflowError> {
        let mut sum = 0;
        for n in 0..steps {
            sum += ctx.step(Add { n }).await?;
        }
        Ok(sum)
    }
}

async fn open(dir: &Path) -> keel::Result<Engine> {
    Engine::builder(dir)
        .workflow::<Sum>()
        .step::<Add>()
        .open()
        .await
}

/// A store of `runs` finished runs of `steps` steps, closed cleanly.
async fn store(dir: &Path, runs: usize, steps: u32) {
    let engine = open(dir).await.unwrap();
    let mut handles = Vec::new();
    for i in 0..runs {
        handles.push(
            engine
                .start::<Sum>(&format!("run-{i}"), steps)
                .await
                .unwrap(),
        );
    }
    for handle in handles {
        handle.result().await.unwrap();
    }
    engine.shutdown().await;
}

/// A copy of the store in `from` at `to`, with its `db` file cut to `percent` of what its
/// acknowledged writes span: the length its high-water mark gives (a clean close writes the
/// run counts after the mark, and a cut of the file's whole length could keep every
/// acknowledged write), and no further than the log's last byte that is not zero (at
/// `PowerLoss` sled allocates each segment that grows the file before it writes into it, so
/// the file, and the length the mark records, end in up to about two segments of zeros,
/// which a cut can remove without losing anything; the mark's length, rounded up to a
/// segment, then rarely bounds the cut, and the run counts a clean close writes after the
/// mark may be cut too, which the refusals below allow for).
fn cut_copy(from: &Path, to: &Path, percent: usize) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    let db = std::fs::read(from.join("db")).unwrap();
    let marked = keel_engine::test_utilities::raw::marked_db_bytes(from).expect("a mark");
    let written = db
        .iter()
        .rposition(|byte| *byte != 0)
        .map_or(0, |at| at + 1);
    let marked = usize::try_from(marked).unwrap().min(written);
    std::fs::write(to.join("db"), &db[..marked * percent / 100]).unwrap();
}

/// Every file of the store in `dir` with its bytes.
fn files(dir: &Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

/// The kept copies of `db` in the store at `dir` (`db.as-found-*`).
fn kept_copies(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("db.as-found-")
        })
        .collect()
}

/// Every cut of the store in `dir` is refused with an error that names the damage, where the
/// log as found was kept and what to do. sled's recovery rewrites what it cannot read of
/// `db` when it opens, so before it does, the cut `db` (shorter than at the last mark) is
/// copied aside byte for byte; nothing else of the store changes (but for a snapshot sled
/// may write of what it recovered), and a second open is refused again.
/// Whether `engine` holds every one of the `runs` runs of `steps` steps, completed with its
/// sum: what a cut that only removed the unused tail of sled's log leaves.
async fn whole(engine: &Engine, runs: usize, steps: u32) -> bool {
    let held = engine.list().await.unwrap();
    let sum = serde_json::json!((0..steps).sum::<u32>());
    held.len() == runs
        && held
            .iter()
            .all(|r| r.status == RunStatus::Completed && r.output.as_ref() == Some(&sum))
}

/// Cuts `dir`'s `db` at 10%, 20%, ... 90%. Each cut that lost acknowledged data is refused,
/// twice. sled's log can end in space it allocated but never filled (how much depends on
/// when its flusher ran): a cut there loses nothing, and such a store opens, whole; at least
/// five of the nine cuts must reach the data and be refused.
async fn every_cut_is_refused(dir: &Path, what: &str, runs: usize, steps: u32) {
    keel_testkit::init_tracing();
    let cuts = tempfile::tempdir().unwrap();
    let db_bytes = std::fs::metadata(dir.join("db")).unwrap().len();
    let mut refused = 0;
    for percent in (10..=90).step_by(10) {
        let copy: PathBuf = cuts.path().join(format!("cut-{percent}"));
        cut_copy(dir, &copy, percent);
        let before = files(&copy);
        let opened = open(&copy).await;
        if let Err(error) = &opened {
            tracing::info!(what, percent, %error, "refused");
        }
        let first = match opened {
            Ok(engine) => {
                let held = engine.list().await.unwrap().len();
                assert!(
                    whole(&engine, runs, steps).await,
                    "{what} ({db_bytes} bytes) cut to {percent}% opened, holding {held} runs"
                );
                tracing::info!(what, percent, "the cut lost nothing: opened whole");
                engine.shutdown().await;
                continue;
            }
            Err(error @ (EngineError::LostData { .. } | EngineError::StoreDamaged { .. })) => {
                let text = error.to_string();
                assert!(
                    text.contains("backup") && text.contains("db.as-found-"),
                    "{text}"
                );
                if matches!(error, EngineError::LostData { .. }) {
                    assert!(
                        text.contains("keel.mark") && text.contains("accept_data_loss"),
                        "{text}"
                    );
                }
                text
            }
            Err(other) => panic!("{what} cut to {percent}%: unexpected error {other}"),
        };
        let kept = kept_copies(&copy);
        assert_eq!(kept.len(), 1, "{what} cut to {percent}%: {kept:?}");
        let cut_db = &before.iter().find(|(name, _)| name == "db").unwrap().1;
        assert!(
            &std::fs::read(&kept[0]).unwrap() == cut_db,
            "the copy is the log as found"
        );
        let after = files(&copy);
        let others = |files: &[(std::ffi::OsString, Vec<u8>)]| -> Vec<_> {
            files
                .iter()
                // sled's recovery rewrites `db` and may write a snapshot of what it recovered.
                .filter(|(name, _)| {
                    let name = name.to_string_lossy();
                    name != "db" && !name.starts_with("db.as-found-") && !name.starts_with("snap.")
                })
                .cloned()
                .collect()
        };
        let names = |files: &[(std::ffi::OsString, Vec<u8>)]| -> Vec<std::ffi::OsString> {
            files.iter().map(|(n, _)| n.clone()).collect()
        };
        assert!(
            others(&after) == others(&before),
            "{what} cut to {percent}%: a file besides db changed: {:?} -> {:?}",
            names(&before),
            names(&after)
        );
        refused += 1;
        match open(&copy).await {
            // sled's first recovery of a torn log can be more pessimistic than its second:
            // the second may open only a store that lost nothing.
            Ok(engine) => assert!(
                whole(&engine, runs, steps).await,
                "{what} cut to {percent}%: a second open opened what the first refused \
                 ({first}), and runs are missing"
            ),
            Err(again) => assert!(
                matches!(
                    again,
                    EngineError::LostData { .. } | EngineError::StoreDamaged { .. }
                ),
                "{what} cut to {percent}%: second open: {again} (first: {first})"
            ),
        }
    }
    assert!(
        refused >= 5,
        "{what}: only {refused} of 9 cuts were refused"
    );
}

/// A small store (5 finished runs, no sled snapshot): every cut is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_store_cut_short_is_refused_at_every_cut() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path(), 5, 3).await;
    every_cut_is_refused(dir.path(), "a store of 5 runs", 5, 3).await;
}

/// A large store (thousands of runs over several sled segments): every cut is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_store_cut_short_is_refused_at_every_cut() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path(), 2_000, 4).await;
    let db_bytes = std::fs::metadata(dir.path().join("db")).unwrap().len();
    assert!(db_bytes > 4 << 20, "a large store: {db_bytes} bytes");
    every_cut_is_refused(dir.path(), "a store of 2,000 runs", 2_000, 4).await;
}

/// An operator who accepts the loss opens the cut store with what is left: the runs that
/// are still there resume and finish, and from then on the store opens without the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_loss_opens_with_what_is_left() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path(), 5, 3).await;
    // A cut inside the runs' writes. The shutdown writes the latency statistics and run
    // counts after them, and where the runs' writes end in this small log depends on how
    // the group commit batched them, so a cut at 40% has (about once in 200 tries) lost only
    // what the shutdown wrote. The first cut, from 40% down in steps of 5 (so that it keeps
    // most runs), that lost a run or rolled one back is the one tried. A cut sled cannot
    // recover from at all (`StoreDamaged`, see `every_cut_is_refused`) is passed over.
    for percent in (10..=40).rev().step_by(5) {
        let cut = tempfile::tempdir().unwrap();
        cut_copy(dir.path(), cut.path(), percent);
        match open(cut.path()).await {
            Err(EngineError::LostData { .. }) => {}
            Err(EngineError::StoreDamaged { .. }) => continue,
            Err(other) => panic!("cut to {percent}%: {other}"),
            Ok(_) => panic!("cut to {percent}%: opened without the loss"),
        }
        let engine = Engine::builder(cut.path())
            .workflow::<Sum>()
            .step::<Add>()
            .accept_data_loss()
            .open()
            .await
            .unwrap();
        let left = engine.list().await.unwrap();
        if left.len() == 5 && left.iter().all(|r| r.status == RunStatus::Completed) {
            // This cut lost only what the shutdown wrote after the runs.
            engine.shutdown().await;
            continue;
        }
        for record in &left {
            let record = engine.wait(record.id.as_str()).await.unwrap();
            assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
        }
        engine.shutdown().await;
        drop(engine);
        let engine = open(cut.path())
            .await
            .expect("the accepted state is the new mark");
        engine.shutdown().await;
        return;
    }
    panic!("no cut from 40% down lost a run or rolled one back");
}

/// A mark file with no whole slot cannot say what the store acknowledged: the store is
/// refused, naming the file, until the operator accepts what sled holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_mark_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path(), 2, 2).await;
    std::fs::write(dir.path().join("keel.mark"), [0xAB; 64]).unwrap();
    match open(dir.path()).await {
        Err(EngineError::StoreDamaged { file, .. }) => assert!(file.ends_with("keel.mark")),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a store with an unreadable mark opened"),
    }
    let engine = Engine::builder(dir.path())
        .workflow::<Sum>()
        .accept_data_loss()
        .open()
        .await
        .unwrap();
    assert_eq!(engine.list().await.unwrap().len(), 2);
    engine.shutdown().await;
}

/// A store written before marks existed (no mark file) opens, and gets one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_a_mark_opens_and_gets_one() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path(), 2, 2).await;
    std::fs::remove_file(dir.path().join("keel.mark")).unwrap();
    let engine = open(dir.path()).await.unwrap();
    assert_eq!(engine.list().await.unwrap().len(), 2);
    engine.shutdown().await;
    drop(engine);
    assert!(dir.path().join("keel.mark").exists());
}
