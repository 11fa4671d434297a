//! `sftp.upload` against a real OpenSSH server (Debian's sshd on a loopback port, with
//! throwaway keys): a watcher on the server side that polls the destination every millisecond
//! catches a naive writer (parallel ranges over SFTP, the last first, so the file has its full
//! size early) and never catches an upload; a wrong or unknown host key is refused before
//! anything is written; a retry adopts a finished file and another content under the final
//! name is never overwritten; compensation removes only what the run uploaded; and SIGKILL at
//! each crash point leaves either nothing or the complete file under the final name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_engine::{
    crash, Ctx, Engine, ErrorClass, ErrorRecord, RunStatus, Workflow, WorkflowError,
};
use keel_steps::files::{digest_of, sha256_hex, PARTIAL_SUFFIX};
use keel_steps::sftp::{Connection, Credential, Server, Upload, Uploaded};
use keel_testkit::check::read_store_blocking;
use keel_testkit::crash::{is_child, path_env, ChildSpec};
use keel_testkit::sshd::Sshd;
use rand::{Rng, RngCore, SeedableRng};
use russh_sftp::protocol::{FileAttributes, OpenFlags};

/// Uploads its files one after the other.
struct UploadAll;

impl Workflow for UploadAll {
    const NAME: &'static str = "test.upload-all";
    type Input = Vec<Upload>;
    type Output = Vec<Uploaded>;

    async fn run(ctx: &mut Ctx, files: Vec<Upload>) -> Result<Vec<Uploaded>, WorkflowError> {
        let mut done = Vec::new();
        for file in files {
            done.push(ctx.step(file).await?);
        }
        Ok(done)
    }
}

/// One upload whose failure is its output: the class and message the step recorded.
struct Refusal;

impl Workflow for Refusal {
    const NAME: &'static str = "test.refusal";
    type Input = Upload;
    type Output = Option<ErrorRecord>;

    async fn run(ctx: &mut Ctx, upload: Upload) -> Result<Option<ErrorRecord>, WorkflowError> {
        match ctx.step(upload).await {
            Ok(_) => Ok(None),
            Err(WorkflowError::Step { error, .. }) => Ok(Some(error)),
            Err(other) => Err(other),
        }
    }
}

async fn engine(data: &Path) -> Engine {
    Engine::builder(data)
        .workflow::<UploadAll>()
        .workflow::<Refusal>()
        .steps(keel_steps::sftp::STEPS)
        .open()
        .await
        .unwrap()
}

/// The test's server, its local directories and the client's view of it.
struct Site {
    sshd: Sshd,
    /// Where the sources are (local to the client).
    sources: PathBuf,
    /// The destination directory: the server's path, which is also local here.
    outbox: PathBuf,
    _dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let sshd = Sshd::start(dir.path()).expect("sshd (scripts/test.sh installs it)");
        let (sources, outbox) = (dir.path().join("sources"), dir.path().join("outbox"));
        std::fs::create_dir_all(&sources).unwrap();
        std::fs::create_dir_all(&outbox).unwrap();
        Site {
            sshd,
            sources,
            outbox,
            _dir: dir,
        }
    }

    fn server(&self) -> Server {
        Server {
            host: "127.0.0.1".into(),
            port: self.sshd.port,
            user: self.sshd.user.clone(),
            known_hosts: self.sshd.known_hosts.clone(),
            credential: Credential::KeyFile {
                path: self.sshd.client_key.clone(),
            },
        }
    }

    /// A source file of `size` random bytes, and its upload to the outbox.
    fn upload(&self, rng: &mut impl RngCore, name: &str, size: usize) -> Upload {
        let mut bytes = vec![0u8; size];
        rng.fill_bytes(&mut bytes);
        let source = self.sources.join(name);
        std::fs::write(&source, &bytes).unwrap();
        Upload {
            server: self.server(),
            source,
            dir: self.outbox.display().to_string(),
            name: name.into(),
            size: size as u64,
            sha256: sha256_hex(&bytes),
        }
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.outbox)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// What the watcher expects under each final name: (size, sha256).
type Expected = Arc<Mutex<BTreeMap<String, (u64, String)>>>;

/// Polls `dir` every millisecond until stopped; returns every time a final name (not a
/// dotfile) held other content than expected.
fn watch(dir: PathBuf, expected: Expected, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut violations = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let want = expected.lock().unwrap().get(&name).cloned();
            match (digest_of(&entry.path()), want) {
                (Ok(got), Some(want)) if got == want => {}
                (Ok((size, _)), Some((want, _))) => violations.push(format!(
                    "{name}: visible with other content ({size} of {want} bytes)"
                )),
                (Ok(_), None) => violations.push(format!("{name}: not expected")),
                (Err(_), _) => {} // removed between the listing and the read
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    violations
}

/// The field report's writer, over SFTP: the final name opened at once, its last range
/// written first (so the file has its full size), then the others in parallel.
async fn naive_write(connection: &Connection, upload: &Upload) {
    let sftp = connection.sftp();
    let bytes = std::fs::read(&upload.source).unwrap();
    let path = format!("{}/{}", upload.dir, upload.name);
    let flags = OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE;
    let handle = sftp
        .open(path, flags, FileAttributes::empty())
        .await
        .unwrap()
        .handle;
    let part = 32 * 1024;
    let ranges: Vec<usize> = (0..bytes.len()).step_by(part).collect();
    let last = *ranges.last().unwrap();
    sftp.write(handle.as_str(), last as u64, bytes[last..].to_vec())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut writes = tokio::task::JoinSet::new();
    for start in ranges.into_iter().rev().skip(1) {
        let (sftp, handle) = (Arc::clone(sftp), handle.clone());
        let chunk = bytes[start..start + part].to_vec();
        writes.spawn(async move { sftp.write(handle, start as u64, chunk).await });
    }
    while let Some(done) = writes.join_next().await {
        done.unwrap().unwrap();
    }
    sftp.close(handle).await.unwrap();
}

/// A watcher polling the server's directory every millisecond catches the naive writer and
/// never sees a partial file from `sftp.upload`, over many seeded uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_catches_a_naive_writer_and_never_an_upload() {
    keel_testkit::init_tracing();
    let site = Site::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7366_7470);
    let expected: Expected = Arc::default();

    let naive = site.upload(&mut rng, "naive.bin", 1 << 20);
    expected
        .lock()
        .unwrap()
        .insert(naive.name.clone(), (naive.size, naive.sha256.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (d, e, s) = (site.outbox.clone(), expected.clone(), stop.clone());
        std::thread::spawn(move || watch(d, e, s))
    };
    let connection = Connection::open(&site.server()).await.unwrap();
    naive_write(&connection, &naive).await;
    connection.close().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::SeqCst);
    let caught = watcher.join().unwrap();
    assert!(
        !caught.is_empty(),
        "the watcher missed the naive writer's partial file"
    );
    assert_eq!(
        digest_of(&site.outbox.join("naive.bin")).unwrap(),
        (naive.size, naive.sha256.clone()),
        "the naive writer did finish"
    );
    std::fs::remove_file(site.outbox.join("naive.bin")).unwrap();

    let data = tempfile::tempdir().unwrap();
    let engine = engine(data.path()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (d, e, s) = (site.outbox.clone(), expected.clone(), stop.clone());
        std::thread::spawn(move || watch(d, e, s))
    };
    let mut uploaded = 0;
    for round in 0..4 {
        let mut files = Vec::new();
        for i in 0..4 {
            let name = format!("r{round}-f{i}.bin");
            let size = if i == 0 {
                0
            } else {
                rng.gen_range(1..(2 << 20))
            };
            let upload = site.upload(&mut rng, &name, size);
            expected
                .lock()
                .unwrap()
                .insert(name, (upload.size, upload.sha256.clone()));
            files.push(upload);
        }
        let run = engine
            .start::<UploadAll>(&format!("round-{round}"), files)
            .await
            .unwrap();
        uploaded += run.result().await.unwrap().len();
    }
    stop.store(true, Ordering::SeqCst);
    let violations = watcher.join().unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(uploaded, 16);
    let names = site.names();
    assert_eq!(names.len(), 16, "{names:?}");
    for name in &names {
        let want = expected.lock().unwrap()[name].clone();
        assert_eq!(digest_of(&site.outbox.join(name)).unwrap(), want, "{name}");
    }
    engine.shutdown().await;
}

/// The message of the upload's failure, which must be permanent: retrying cannot help.
async fn failure(engine: &Engine, id: &str, upload: Upload) -> String {
    let run = engine.start::<Refusal>(id, upload).await.unwrap();
    let error = run.result().await.unwrap().expect("the upload must fail");
    assert_eq!(error.class, ErrorClass::Permanent, "{}", error.message);
    error.message
}

/// A server whose key is not the one recorded, a server not recorded at all and a missing
/// known-hosts file are refused with an error naming the file, a credential the server does
/// not take or that cannot be read with one naming the credential's file, all before anything
/// is written; a wrong source is refused before connecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_host_key_or_credential_is_refused_and_nothing_is_written() {
    keel_testkit::init_tracing();
    let site = Site::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x686b);
    let data = tempfile::tempdir().unwrap();
    let engine = engine(data.path()).await;
    let upload = site.upload(&mut rng, "a.bin", 100_000);

    let wrong = site
        .sshd
        .wrong_known_hosts(&site.sources.join("wrong_known_hosts"))
        .unwrap();
    let mut changed = upload.clone();
    changed.server.known_hosts = wrong.clone();
    let error = failure(&engine, "changed", changed).await;
    assert!(
        error.contains("host key is not the one recorded at line 1 of")
            && error.contains("wrong_known_hosts: refused"),
        "{error}"
    );

    let unknown_file = site.sources.join("unknown_known_hosts");
    std::fs::write(&unknown_file, "# nothing recorded\n").unwrap();
    let mut unknown = upload.clone();
    unknown.server.known_hosts = unknown_file;
    let error = failure(&engine, "unknown", unknown).await;
    let entry = format!("has no key for [127.0.0.1]:{}", site.sshd.port);
    assert!(error.contains(&entry), "{error}");

    let mut missing = upload.clone();
    missing.server.known_hosts = site.sources.join("absent");
    let error = failure(&engine, "missing", missing).await;
    assert!(error.contains("absent does not exist"), "{error}");

    // Credentials: a key the server does not know, a password it does not take (this server
    // allows keys only), and files that are not there; each named in the error.
    let stranger = site.sources.join("stranger_ed25519");
    let keygen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&stranger)
        .status()
        .unwrap();
    assert!(keygen.success());
    let password = site.sources.join("password");
    std::fs::write(&password, "not-the-password\n").unwrap();
    let credentials = [
        (
            Credential::KeyFile { path: stranger },
            "refused the login (key file",
        ),
        (
            Credential::PasswordFile { path: password },
            "refused the login (password file",
        ),
        (
            Credential::KeyFile {
                path: site.sources.join("no-key"),
            },
            "cannot load the key file",
        ),
        (
            Credential::PasswordFile {
                path: site.sources.join("no-password"),
            },
            "cannot read the password file",
        ),
    ];
    for (i, (credential, why)) in credentials.into_iter().enumerate() {
        let mut refused = upload.clone();
        refused.server.credential = credential;
        let error = failure(&engine, &format!("login-{i}"), refused).await;
        assert!(error.contains(why), "{why}: {error}");
    }

    let mut wrong_source = upload.clone();
    wrong_source.sha256 = "0".repeat(64);
    let error = failure(&engine, "wrong-source", wrong_source).await;
    assert!(error.contains("not uploaded"), "{error}");

    assert!(site.names().is_empty(), "{:?}", site.names());
    // The same upload with the right file goes through: the refusals were the host key's.
    let run = engine
        .start::<UploadAll>("right", vec![upload])
        .await
        .unwrap();
    run.result().await.unwrap();
    assert_eq!(site.names(), ["a.bin"]);
    engine.shutdown().await;
}

/// A second upload of the same content to the same name adopts the file; the server's
/// RENAME refuses to replace it; another content under the final name is a permanent
/// conflict and stays as it was; a run that fails after an upload removes its file and
/// leaves the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_adopts_its_file_never_overwrites_another_and_compensates_its_own() {
    keel_testkit::init_tracing();
    let site = Site::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6164_6f70);
    let data = tempfile::tempdir().unwrap();
    let engine = engine(data.path()).await;

    let first = site.upload(&mut rng, "first.bin", 300_000);
    let run = engine
        .start::<UploadAll>("first", vec![first.clone()])
        .await
        .unwrap();
    run.result().await.unwrap();
    let again = engine
        .start::<UploadAll>("again", vec![first.clone()])
        .await
        .unwrap();
    assert_eq!(again.result().await.unwrap()[0].sha256, first.sha256);

    // What the step's rename relies on: the server's RENAME refuses an existing target.
    let connection = Connection::open(&site.server()).await.unwrap();
    std::fs::write(site.outbox.join(".newer"), b"newer").unwrap();
    let outbox = site.outbox.display();
    let replaced = connection
        .sftp()
        .rename(format!("{outbox}/.newer"), format!("{outbox}/first.bin"))
        .await;
    assert!(replaced.is_err(), "RENAME replaced an existing file");
    connection.close().await;
    std::fs::remove_file(site.outbox.join(".newer")).unwrap();
    assert_eq!(
        digest_of(&site.outbox.join("first.bin")).unwrap(),
        (first.size, first.sha256.clone())
    );

    let theirs = b"another writer's content".to_vec();
    std::fs::write(site.outbox.join("taken.bin"), &theirs).unwrap();
    let mut taken = site.upload(&mut rng, "taken.bin", 200_000);
    taken.name = "taken.bin".into();
    let error = failure(&engine, "taken", taken).await;
    assert!(error.contains("not overwritten"), "{error}");
    assert_eq!(
        std::fs::read(site.outbox.join("taken.bin")).unwrap(),
        theirs
    );

    let kept = site.upload(&mut rng, "undone.bin", 400_000);
    let mut broken = site.upload(&mut rng, "broken.bin", 1000);
    broken.sha256 = "1".repeat(64);
    let run = engine
        .start::<UploadAll>("undone", vec![kept, broken])
        .await
        .unwrap();
    assert!(run.result().await.is_err());
    assert_eq!(
        engine.status("undone").await.unwrap().status,
        RunStatus::Compensated
    );
    assert_eq!(site.names(), ["first.bin", "taken.bin"]);
    engine.shutdown().await;
}

const KEPT: &str = "kept";
const UNDONE: &str = "undone";

/// The kill-test child's uploads: three kept, and two uploaded then undone because the third
/// source is not what it should be (a permanent failure: the run compensates).
fn crash_inputs(sources: &Path, outbox: &Path, server: Server) -> (Vec<Upload>, Vec<Upload>) {
    let upload = |name: &str, corrupt: bool| {
        let source = sources.join(name);
        let (size, mut sha256) = digest_of(&source).unwrap();
        if corrupt {
            sha256 = "0".repeat(64);
        }
        Upload {
            server: server.clone(),
            source,
            dir: outbox.display().to_string(),
            name: name.into(),
            size,
            sha256,
        }
    };
    (
        vec![
            upload("k0.bin", false),
            upload("k1.bin", false),
            upload("k2.bin", false),
        ],
        vec![
            upload("u0.bin", false),
            upload("u1.bin", false),
            upload("u2.bin", true),
        ],
    )
}

fn crash_child() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name}"));
    let server: Server = serde_json::from_str(&var("KEEL_TEST_SERVER")).unwrap();
    keel_testkit::crash::runtime().block_on(async {
        let engine = engine(Path::new(&var("KEEL_DATA_DIR"))).await;
        let (kept, undone) = crash_inputs(
            Path::new(&var("KEEL_TEST_SOURCES")),
            Path::new(&var("KEEL_TEST_OUTBOX")),
            server,
        );
        let kept = engine.start::<UploadAll>(KEPT, kept).await.unwrap();
        let undone = engine.start::<UploadAll>(UNDONE, undone).await.unwrap();
        let _ = kept.result().await;
        let _ = undone.result().await;
        engine.shutdown().await;
    });
}

/// Every file under a final name in `outbox` is complete.
fn only_complete_files(outbox: &Path, sources: &Path, point: &str) {
    for entry in std::fs::read_dir(outbox).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let want = digest_of(&sources.join(&name)).unwrap();
        let got = digest_of(&outbox.join(&name)).unwrap();
        assert_eq!(got, want, "{point}: {name} is not complete");
    }
}

/// Killed at each SFTP crash point and at the engine's points around a step and its undo,
/// the server never holds a partial file under a final name, and after restarts it holds the
/// kept run's complete files, nothing of the undone run, and no temporary file.
#[test]
fn killed_at_each_upload_crash_point_no_final_name_ever_holds_a_partial_file() {
    const NAME: &str = "killed_at_each_upload_crash_point_no_final_name_ever_holds_a_partial_file";
    if is_child() {
        return crash_child();
    }
    keel_testkit::init_tracing();
    let site = Site::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b69_6c6c);
    let points = crash::SFTP_POINTS.iter().chain(&[
        "step.after_started",
        "step.after_effect",
        "saga.after_undo_started",
        "saga.after_undo",
    ]);
    let (mut kills, mut later_kills) = (0, 0);
    for point in points {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&site.outbox).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        for name in ["k0.bin", "k1.bin", "k2.bin", "u0.bin", "u1.bin", "u2.bin"] {
            // Over the requests in flight (1 MiB), so a kill after the first write leaves most
            // of the file unwritten.
            let size = rng.gen_range((1 << 20) + 1..(2 << 20));
            let mut bytes = vec![0u8; size];
            rng.fill_bytes(&mut bytes);
            std::fs::write(site.sources.join(name), bytes).unwrap();
        }
        let spec = ChildSpec {
            test_name: NAME,
            env: vec![
                ("KEEL_DATA_DIR".into(), path_env(dir.path(), "data")),
                (
                    "KEEL_TEST_SOURCES".into(),
                    site.sources.display().to_string(),
                ),
                ("KEEL_TEST_OUTBOX".into(), site.outbox.display().to_string()),
                (
                    "KEEL_TEST_SERVER".into(),
                    serde_json::to_string(&site.server()).unwrap(),
                ),
            ],
        };
        // At the point's first hit, then at a seeded later one if the restart meets it again.
        let killed = spec.kill_at_first_and_later_hit(
            point,
            rng.gen_range(1..4u32),
            Duration::from_secs(120),
            || only_complete_files(&site.outbox, &site.sources, point),
        );
        kills += killed;
        later_kills += killed - 1;
        spec.run_until_finished(Duration::from_secs(120));
        only_complete_files(&site.outbox, &site.sources, point);
        assert_eq!(
            site.names(),
            ["k0.bin", "k1.bin", "k2.bin"],
            "{point}: the kept files, nothing of the undone run, no temporary file"
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
    assert!(
        later_kills > 0,
        "{kills} kills, none at a later hit: the seeded second kills never happened"
    );
    assert!(
        !site.names().iter().any(|n| n.ends_with(PARTIAL_SUFFIX)),
        "no temporary file"
    );
}
