//! The README's demo end to end (smaller counts): moto, the fault proxy, a real worker
//! process SIGKILLed midway, a late failure compensated, the AWS API checked.

/// The README's demo runs end to end (a worker SIGKILLed midway, a late failure compensated)
/// and its own check of the AWS API passes.
#[test]
fn the_demo_runs_end_to_end_and_verifies_itself() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let options = keel_testkit::demo::DemoOptions {
        keel: env!("CARGO_BIN_EXE_keel").into(),
        dir: dir.path().to_path_buf(),
        clients: 2,
        fleet: 6,
        seed: 3,
    };
    let mut narration = Vec::new();
    let result = keel_testkit::demo::run(&options, &mut narration);
    let narration = String::from_utf8_lossy(&narration);
    assert!(result.is_ok(), "{result:?}\n{narration}");
    for expected in [
        "SIGKILL the worker",
        "compensated",
        "p99 ms",
        "ok: 9 things",
    ] {
        assert!(narration.contains(expected), "{expected:?} in\n{narration}");
    }
}
