//! `keel worker --sled-cache-mib`: the bound reaches the sled store (its open says so in the
//! log), without it the store gets the engine's default bound rather than sled's 1 GiB, and a
//! value under the store's minimum is refused before anything is opened. The worker makes no
//! AWS call while idle, so no emulator is needed.

use std::path::Path;
use std::process::{Command, Stdio};

use keel_testkit::demo::Worker;

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

fn worker_command(data: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(KEEL);
    command
        .args(["worker", "--listen", "127.0.0.1:0"])
        .args(["--aws-endpoint", "http://127.0.0.1:9"])
        .arg("--data-dir")
        .arg(data)
        .args(["--log-format", "json"])
        .args(extra)
        .env_remove("KEEL_SLED_CACHE_MIB")
        .env_remove("KEEL_STORE")
        .env("RUST_LOG", "keel_engine=info");
    command
}

/// Starts a worker on a fresh data directory in `dir` with `extra` arguments, stops it, and
/// returns its store's open line from the log.
fn store_open_logged(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let data = dir.join("data");
    let log = dir.join("worker.log");
    let mut command = worker_command(&data, extra);
    command.stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    let worker = Worker::start(command, &data).expect("the worker starts");
    drop(worker);
    let logged = std::fs::read_to_string(&log).unwrap();
    let open = logged
        .lines()
        .find(|l| l.contains("sled store open"))
        .unwrap_or_else(|| panic!("no store open in the log: {logged}"));
    serde_json::from_str(open).unwrap()
}

#[test]
fn without_a_bound_the_store_gets_the_engines_default() {
    let dir = tempfile::tempdir().unwrap();
    let open = store_open_logged(dir.path(), &[]);
    assert_eq!(
        open["fields"]["cache_bytes"],
        keel_engine::limits::SLED_CACHE_BYTES_DEFAULT,
        "{open}"
    );
}

#[test]
fn the_sled_cache_bound_reaches_the_store_and_a_too_small_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = store_open_logged(dir.path(), &["--sled-cache-mib", "64"]);
    assert_eq!(open["fields"]["cache_bytes"], 67_108_864, "{open}");

    let refused_dir = dir.path().join("refused");
    let output = worker_command(&refused_dir, &["--sled-cache-mib", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--sled-cache-mib"), "{stderr}");
    assert!(stderr.contains("8.."), "the minimum is named: {stderr}");
    assert!(!refused_dir.exists(), "nothing was created");
}
