//! Safe file handoff, tried against a consumer that polls the destination every millisecond:
//! a naive writer (parallel ranged writes straight into the final name, the last range first,
//! as in the field report) is caught showing a partial file, which proves the watcher can see
//! one; `files.publish` never shows one, over many seeded runs. Then SIGKILL at each of the
//! publication's crash points: after restart, the destination holds either nothing under a
//! final name or the complete file, and no temporary file once the runs have ended.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_engine::{crash, Ctx, Engine, RunStatus, Workflow, WorkflowError};
use keel_steps::files::{digest_of, sha256_hex, Publish, Published, Source, PARTIAL_SUFFIX};
use keel_steps::s3::{DownloadToFile, S3Client};
use keel_testkit::check::read_store_blocking;
use keel_testkit::crash::{is_child, path_env, ChildSpec};
use keel_testkit::moto::TestAccount;
use rand::{Rng, RngCore, SeedableRng};

/// Publishes its files one after the other.
struct PublishAll;

impl Workflow for PublishAll {
    const NAME: &'static str = "test.publish-all";
    type Input = Vec<Publish>;
    type Output = Vec<Published>;

    async fn run(ctx: &mut Ctx, files: Vec<Publish>) -> Result<Vec<Published>, WorkflowError> {
        let mut done = Vec::new();
        for file in files {
            done.push(ctx.step(file).await?);
        }
        Ok(done)
    }
}

/// What the watcher expects under each final name: (size, sha256).
type Expected = Arc<Mutex<BTreeMap<String, (u64, String)>>>;

/// Polls `dir` every millisecond until stopped; returns every violation seen: a file under a
/// final name whose content is not the expected one, or a marker whose file is not complete.
fn watch(dir: PathBuf, expected: Expected, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut violations = Vec::new();
    let mut checked: BTreeMap<String, (u64, std::time::SystemTime)> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // temporary files are not for consumers
            }
            let Ok(meta) = entry.metadata() else { continue };
            let stamp = (meta.len(), meta.modified().unwrap());
            if checked.get(&name) == Some(&stamp) {
                continue;
            }
            let want = expected.lock().unwrap().clone();
            let (file, is_marker) = match name.strip_suffix(".sha256") {
                Some(file) => (file.to_string(), true),
                None => (name.clone(), false),
            };
            let Some((size, sha)) = want.get(&file) else {
                violations.push(format!("{name}: not expected"));
                continue;
            };
            match digest_of(&dir.join(&file)) {
                Ok((s, d)) if s == *size && d == *sha => {}
                Ok((s, _)) => violations.push(format!(
                    "{name}: {file} visible with wrong content ({s} of {size} bytes)"
                )),
                // A marker must never precede its file; a file that vanished was removed
                // (compensation), which is no partial read.
                Err(_) if is_marker => violations.push(format!("{name}: marker without file")),
                Err(_) => {}
            }
            checked.insert(name, stamp);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    violations
}

fn random_file(rng: &mut impl RngCore, dir: &Path, name: &str, size: usize) -> (PathBuf, String) {
    let mut bytes = vec![0u8; size];
    rng.fill_bytes(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    (path, sha256_hex(&bytes))
}

/// The field report's writer: the final file at its full size at once, then its ranges
/// written in parallel, the last first.
fn naive_parallel_write(source: &Path, dest: &Path, ranges: u64) {
    let bytes = std::fs::read(source).unwrap();
    let file = std::fs::File::create(dest).unwrap();
    file.set_len(bytes.len() as u64).unwrap();
    let file = Arc::new(file);
    let bytes = Arc::new(bytes);
    let part = (bytes.len() as u64).div_ceil(ranges);
    let writers: Vec<_> = (0..ranges)
        .map(|i| {
            let (file, bytes) = (file.clone(), bytes.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5 * (ranges - 1 - i)));
                let start = (i * part) as usize;
                let end = ((i + 1) * part).min(bytes.len() as u64) as usize;
                file.write_at(&bytes[start..end], start as u64).unwrap();
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
}

/// A consumer polling the destination every millisecond catches a naive parallel writer
/// showing a partial file, and never sees one from `files.publish` over many seeded runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_catches_a_naive_writer_and_never_a_published_file() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let sources = dir.path().join("sources");
    let dest = dir.path().join("outbox");
    std::fs::create_dir_all(&sources).unwrap();
    std::fs::create_dir_all(&dest).unwrap();
    let expected: Expected = Arc::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x66_696c);

    // The naive writer: the watcher must catch it.
    let (source, sha) = random_file(&mut rng, &sources, "naive", 1 << 20);
    expected
        .lock()
        .unwrap()
        .insert("naive.bin".into(), (1 << 20, sha));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (d, e, s) = (dest.clone(), expected.clone(), stop.clone());
        std::thread::spawn(move || watch(d, e, s))
    };
    naive_parallel_write(&source, &dest.join("naive.bin"), 8);
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    let caught = watcher.join().unwrap();
    assert!(
        !caught.is_empty(),
        "the watcher missed the naive writer's partial file"
    );
    std::fs::remove_file(dest.join("naive.bin")).unwrap();

    // files.publish, over many seeded runs: never.
    let engine = Engine::builder(dir.path().join("data"))
        .workflow::<PublishAll>()
        .step::<Publish>()
        .open()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (d, e, s) = (dest.clone(), expected.clone(), stop.clone());
        std::thread::spawn(move || watch(d, e, s))
    };
    let mut published = 0;
    for round in 0..12 {
        let mut files = Vec::new();
        for i in 0..4 {
            let name = format!("r{round}-f{i}.bin");
            let size = rng.gen_range(0..(1usize << 20));
            let (path, sha) = random_file(&mut rng, &sources, &name, size);
            expected
                .lock()
                .unwrap()
                .insert(name.clone(), (size as u64, sha.clone()));
            let source = if size < 4096 && i == 0 {
                Source::Bytes {
                    bytes: std::fs::read(&path).unwrap(),
                }
            } else {
                Source::File { path }
            };
            files.push(Publish {
                source,
                dir: dest.clone(),
                name,
                size: size as u64,
                sha256: sha,
                marker: i % 2 == 0,
            });
        }
        let run = engine
            .start::<PublishAll>(&format!("round-{round}"), files)
            .await
            .unwrap();
        published += run.result().await.unwrap().len();
    }
    stop.store(true, Ordering::SeqCst);
    let violations = watcher.join().unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(published, 48);
    let partials = std::fs::read_dir(&dest)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with(PARTIAL_SUFFIX)
        })
        .count();
    assert_eq!(partials, 0);
    engine.shutdown().await;
}

const KEPT: &str = "kept";
const UNDONE: &str = "undone";

/// The kill-test child's files: three kept (two with markers), and two published then undone
/// by a third whose digest is wrong (a permanent failure: the run compensates).
fn crash_inputs(sources: &Path, dest: &Path) -> (Vec<Publish>, Vec<Publish>) {
    let publish = |name: &str, marker: bool, corrupt: bool| {
        let path = sources.join(name);
        let (size, mut sha) = digest_of(&path).unwrap();
        if corrupt {
            sha = "0".repeat(64);
        }
        Publish {
            source: Source::File { path },
            dir: dest.to_path_buf(),
            name: name.into(),
            size,
            sha256: sha,
            marker,
        }
    };
    (
        vec![
            publish("k0.bin", true, false),
            publish("k1.bin", false, false),
            publish("k2.bin", true, false),
        ],
        vec![
            publish("u0.bin", true, false),
            publish("u1.bin", false, false),
            publish("u2.bin", false, true),
        ],
    )
}

fn crash_child() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name}"));
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let engine = Engine::builder(var("KEEL_DATA_DIR"))
            .workflow::<PublishAll>()
            .step::<Publish>()
            .open()
            .await
            .unwrap();
        let (kept, undone) = crash_inputs(
            Path::new(&var("KEEL_TEST_SOURCES")),
            Path::new(&var("KEEL_TEST_DEST")),
        );
        let kept = engine.start::<PublishAll>(KEPT, kept).await.unwrap();
        let undone = engine.start::<PublishAll>(UNDONE, undone).await.unwrap();
        let _ = kept.result().await;
        let _ = undone.result().await;
        engine.shutdown().await;
    });
}

/// Every file under a final name in `dest` is complete; markers only beside complete files.
fn only_complete_files(dest: &Path, sources: &Path, point: &str) {
    for entry in std::fs::read_dir(dest).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let file = name.strip_suffix(".sha256").unwrap_or(&name);
        let want = digest_of(&sources.join(file)).unwrap();
        let got = digest_of(&dest.join(file))
            .unwrap_or_else(|e| panic!("{point}: {name} without its file: {e}"));
        assert_eq!(got, want, "{point}: {file} is not complete");
    }
}

/// Killed at each of the publication's crash points, the destination never holds a partial
/// file under a final name, and after restarts it holds the kept run's complete files and
/// markers, nothing of the undone run, and no temporary file.
#[test]
fn killed_at_each_publication_crash_point_no_final_name_ever_holds_a_partial_file() {
    const NAME: &str =
        "killed_at_each_publication_crash_point_no_final_name_ever_holds_a_partial_file";
    if is_child() {
        return crash_child();
    }
    keel_testkit::init_tracing();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b_696c);
    let mut kills = 0;
    for point in crash::STEP_LIBRARY_POINTS {
        let dir = tempfile::tempdir().unwrap();
        let sources = dir.path().join("sources");
        let dest = dir.path().join("outbox");
        std::fs::create_dir_all(&sources).unwrap();
        std::fs::create_dir_all(&dest).unwrap();
        for name in ["k0.bin", "k1.bin", "k2.bin", "u0.bin", "u1.bin", "u2.bin"] {
            // Over one chunk (1 MiB), so the copy meets its mid-write point.
            let size = rng.gen_range((1 << 20) + 1..(3 << 20));
            random_file(&mut rng, &sources, name, size);
        }
        let spec = ChildSpec {
            test_name: NAME,
            env: vec![
                ("KEEL_DATA_DIR".into(), path_env(dir.path(), "data")),
                ("KEEL_TEST_SOURCES".into(), path_env(dir.path(), "sources")),
                ("KEEL_TEST_DEST".into(), path_env(dir.path(), "outbox")),
            ],
        };
        // At the point's first hit, then at a seeded later one if the restart meets it again.
        kills += spec.kill_at_first_and_later_hit(
            point,
            rng.gen_range(1..4u32),
            Duration::from_secs(120),
            || only_complete_files(&dest, &sources, point),
        );
        spec.run_until_finished(Duration::from_secs(120));
        only_complete_files(&dest, &sources, point);
        let mut names: Vec<String> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "k0.bin",
                "k0.bin.sha256",
                "k1.bin",
                "k2.bin",
                "k2.bin.sha256"
            ],
            "{point}: the kept files and markers, nothing of the undone run, no temporary file"
        );
        read_store_blocking(&dir.path().join("data"), async |engine| {
            assert_eq!(
                engine.status(KEPT).await.unwrap().status,
                RunStatus::Completed
            );
            assert_eq!(
                engine.status(UNDONE).await.unwrap().status,
                RunStatus::Compensated
            );
        });
    }
    assert!(kills >= crash::STEP_LIBRARY_POINTS.len(), "{kills} kills");
}

/// Downloads its objects one after the other.
struct DownloadAll;

impl Workflow for DownloadAll {
    const NAME: &'static str = "test.download-all";
    type Input = Vec<DownloadToFile>;
    type Output = Vec<Published>;

    async fn run(
        ctx: &mut Ctx,
        files: Vec<DownloadToFile>,
    ) -> Result<Vec<Published>, WorkflowError> {
        let mut done = Vec::new();
        for file in files {
            done.push(ctx.step(file).await?);
        }
        Ok(done)
    }
}

/// S3 objects are downloaded to their final names only complete and verified, a single-part
/// object by its ETag and a multipart one by the digest given; a multipart object without a
/// digest and a wrong digest are refused, and a watcher never sees a partial file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_objects_land_only_complete_verified_by_etag_or_given_digest() {
    keel_testkit::init_tracing();
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let sdk = account.sdk_config().await;
    let s3 = S3Client::new(&sdk).0;
    s3.create_bucket().bucket("drop").send().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("outbox");
    std::fs::create_dir_all(&dest).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0073_3364);
    let expected: Expected = Arc::default();

    // One object in a single part (ETag = MD5), one uploaded in two parts (multipart ETag).
    let mut single = vec![0u8; 6 << 20];
    rng.fill_bytes(&mut single);
    s3.put_object()
        .bucket("drop")
        .key("single")
        .body(single.clone().into())
        .send()
        .await
        .unwrap();
    let mut multi = vec![0u8; 11 << 20];
    rng.fill_bytes(&mut multi);
    let upload = s3
        .create_multipart_upload()
        .bucket("drop")
        .key("multi")
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap();
    let mut completed = Vec::new();
    for (n, chunk) in multi.chunks(6 << 20).enumerate() {
        let part = s3
            .upload_part()
            .bucket("drop")
            .key("multi")
            .upload_id(upload_id)
            .part_number(n as i32 + 1)
            .body(chunk.to_vec().into())
            .send()
            .await
            .unwrap();
        completed.push(
            aws_sdk_s3::types::CompletedPart::builder()
                .part_number(n as i32 + 1)
                .e_tag(part.e_tag().unwrap())
                .build(),
        );
    }
    // moto 5.2 answers CompleteMultipartUpload with a root element the SDK does not accept
    // (`...Response` for `...Result`); the upload is complete all the same, as HEAD shows.
    let _ = s3
        .complete_multipart_upload()
        .bucket("drop")
        .key("multi")
        .upload_id(upload_id)
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
                .set_parts(Some(completed))
                .build(),
        )
        .send()
        .await;
    let head = s3
        .head_object()
        .bucket("drop")
        .key("multi")
        .send()
        .await
        .unwrap();
    assert!(
        head.e_tag().unwrap().ends_with("-2\""),
        "{:?}",
        head.e_tag()
    );
    for (name, bytes) in [("single.bin", &single), ("multi.bin", &multi)] {
        expected
            .lock()
            .unwrap()
            .insert(name.into(), (bytes.len() as u64, sha256_hex(bytes)));
    }

    let engine = Engine::builder(dir.path().join("data"))
        .workflow::<DownloadAll>()
        .step::<DownloadToFile>()
        .resource(S3Client::new(&sdk))
        .open()
        .await
        .unwrap();
    let download = |key: &str, name: &str, sha256: Option<String>| DownloadToFile {
        bucket: "drop".into(),
        key: key.into(),
        dir: dest.clone(),
        name: name.into(),
        parts: 4,
        marker: true,
        sha256,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (d, e, s) = (dest.clone(), expected.clone(), stop.clone());
        std::thread::spawn(move || watch(d, e, s))
    };
    // A multipart object without a digest to check against is refused, and nothing lands.
    let refused = engine
        .start::<DownloadAll>("unverifiable", vec![download("multi", "multi.bin", None)])
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("give sha256"), "{refused}");
    assert!(!dest.join("multi.bin").exists());
    // The single-part object by its ETag, the multipart one by the given digest.
    let files = vec![
        download("single", "single.bin", None),
        download("multi", "multi.bin", Some(sha256_hex(&multi))),
    ];
    let done = engine
        .start::<DownloadAll>("both", files.clone())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(done[0].sha256, sha256_hex(&single));
    assert_eq!(std::fs::read(dest.join("multi.bin")).unwrap(), multi);
    // A wrong digest: refused for good, and the final name never shows the content.
    let wrong = engine
        .start::<DownloadAll>(
            "wrong",
            vec![download("single", "other.bin", Some("ab".repeat(32)))],
        )
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(wrong.contains("expected abab"), "{wrong}");
    stop.store(true, Ordering::SeqCst);
    let violations = watcher.join().unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
    let mut names: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "multi.bin",
            "multi.bin.sha256",
            "single.bin",
            "single.bin.sha256"
        ]
    );
    engine.shutdown().await;
}
