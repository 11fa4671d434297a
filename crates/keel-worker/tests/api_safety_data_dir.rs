//! The worker's data directory must be its own (docs/api.md "Safety"): one others can write to,
//! keys others can read, or a token planted as a link is refused before any store is opened.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{keel, refused, refused_start, worker, worker_command};
use keel_testkit::moto::TestAccount;

/// A data directory others can write to, a keys directory others can read, and a token
/// planted as a link are refused before any store is opened, naming what is wrong; fixed, the
/// worker starts.
#[test]
fn a_data_directory_others_can_write_to_is_refused_before_anything_runs() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = refused_start(&mut worker_command(&data, &account, &account.endpoint, &[]));
    refused(&out, 2, "mode 0777");
    refused(&out, 2, &data.display().to_string());
    assert_eq!(
        std::fs::read_dir(&data).unwrap().count(),
        0,
        "nothing made in it"
    );
    // Keys readable by others: refused too.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let keys = data.join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = refused_start(&mut worker_command(&data, &account, &account.endpoint, &[]));
    refused(&out, 2, "keys directory");
    refused(&out, 2, "mode 0755");
    assert!(!data.join("journal").exists(), "no store opened");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A token planted as a link to another file is not followed.
    let elsewhere = dir.path().join("planted");
    std::fs::write(&elsewhere, "attacker-token\n").unwrap();
    std::os::unix::fs::symlink(&elsewhere, data.join("api-token")).unwrap();
    let out = refused_start(&mut worker_command(&data, &account, &account.endpoint, &[]));
    refused(&out, 2, "api-token");
    std::fs::remove_file(data.join("api-token")).unwrap();
    // Fixed, the worker starts.
    let w = worker(&data, &account, &account.endpoint, &[]);
    let out = keel(&w, &["--json", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
