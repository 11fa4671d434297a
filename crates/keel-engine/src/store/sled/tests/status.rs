//! Unit tests of how the counts read a stored record's status (`counts::status_of`): from its
//! first bytes, or from the whole record, the same at open and at every write.

use super::*;

/// A record's JSON begins with its status, which the counts read from its first bytes alone
/// (`counts::status_of`). Bytes that do not begin so are decoded whole: a record written
/// before the status came first (its id first, and an input with a "status" of its own) is
/// counted at open by its own status, read back as it was, and a transition moves the counts
/// from that status.
#[test]
fn a_records_status_is_read_from_its_first_bytes_or_from_the_whole_record() {
    use super::super::counts::{first_status, status_of};
    for status in RunStatus::ALL {
        let record = RunRecord {
            status,
            ..running("a")
        };
        let bytes = encode("run record", &record, RUN_RECORD_BYTES_MAX).unwrap();
        assert!(
            bytes.starts_with(format!(r#"{{"status":"{status}","#).as_bytes()),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(first_status(&bytes), Some(status));
        assert_eq!(status_of(&bytes), Some(status));
    }
    // A word with an escape is read as JSON reads it; one whose string holds a quote ends
    // the first read early, and the whole decode says.
    let escaped = br#"{"status":"comp\u006ceted","id":"a"}"#;
    assert_eq!(first_status(escaped), Some(RunStatus::Completed));
    let quoted = br#"{"status":"completed\"","id":"a"}"#;
    assert_eq!(first_status(quoted), None);
    for unreadable in [
        &quoted[..],
        br#"{"status":"done","id":"a"}"#,
        br#"{"status":null}"#,
        br#"{"status":""#,
        b"{not json",
    ] {
        assert_eq!(status_of(unreadable), None, "{unreadable:?}");
    }

    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let id = RunId::new("old").unwrap();
    let old = br#"{"id":"old","workflow":"test.flow","version":1,"input":{"status":"failed"},"status":"running","created_at_ms":10,"updated_at_ms":10,"finished_at_ms":null,"output":null,"error":null}"#;
    assert_eq!(first_status(old), None);
    store.kv.insert(run_key(&id), old.to_vec()).unwrap();
    store.kv.flush().unwrap();
    drop(store);
    // Dropped without a release: the open counts every record.
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_counts(&store, &BTreeMap::from([(RunStatus::Running, 1)]));
    let as_written = RunRecord {
        input: serde_json::json!({"status": "failed"}),
        ..running("old")
    };
    assert_eq!(store.read_run(&id).unwrap(), Some(as_written));
    let [started, done] = entries();
    store
        .append(&id, JournalIndex(0), &[started], None, Token::CREATED)
        .unwrap();
    store
        .append(
            &id,
            JournalIndex(1),
            &[done],
            Some(&completed("old")),
            Token::CREATED,
        )
        .unwrap();
    assert_counts(&store, &BTreeMap::from([(RunStatus::Completed, 1)]));
}

/// A record whose status reads but whose rest does not decode (damaged) is counted by that
/// status by either count at open (in the background once the wake index is built, by the
/// repair pass before), as a delete then takes it off: the counts never take off a run they
/// did not count. (The repair pass left such a record out, and the delete then took the
/// other completed run's count.)
#[test]
fn a_damaged_record_is_counted_by_its_status_at_open_and_by_its_delete() {
    for index_built in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
        let bad = RunId::new("bad").unwrap();
        let damaged = br#"{"status":"completed","id":"bad","workflow":"#;
        store.kv.insert(run_key(&bad), damaged.to_vec()).unwrap();
        write_completed_run(&store, "good");
        if index_built {
            // Else the open's repair pass reads and counts every record.
            store.write_wakes_built().unwrap();
        }
        store.kv.flush().unwrap();
        drop(store);
        let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
        assert!(
            store.read_run(&bad).is_err(),
            "a damaged record reads as such"
        );
        assert_eq!(
            counted(&store),
            BTreeMap::from([(RunStatus::Completed, 2)]),
            "index built: {index_built}"
        );
        delete(&store, &[bad]);
        assert_eq!(
            counted(&store),
            BTreeMap::from([(RunStatus::Completed, 1)]),
            "index built: {index_built}"
        );
    }
}
