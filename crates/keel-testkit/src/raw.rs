//! Raw access to a closed engine's sled store, for tests that make a store as damage or an
//! earlier version of Keel would have left it (say, runs under ids that today's rules refuse).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::poll::CONDITION_TIMEOUT;

/// Opens the raw sled store at `data`, waiting (bounded by [`CONDITION_TIMEOUT`]) while the
/// lock of a store this process has just closed is still held: sled's background threads let
/// go of it a moment after the engine is dropped.
///
/// The run counts a clean close left (key `C`: `keel-engine`'s `store/sled/recovery.rs`) are
/// removed, as the test may change records behind them: the next open counts every run, as
/// after a crash.
pub fn open(data: &Path) -> sled::Db {
    let db = try_open(data).unwrap_or_else(|e| panic!("opening {} raw: {e}", data.display()));
    db.remove(b"C")
        .expect("removing the counts of a clean close");
    db.flush().expect("flushing the store");
    db
}

/// What plain sled says of the store at `data` ([`open`] without the panic, for a test that
/// expects sled to refuse the store): waits, bounded by [`CONDITION_TIMEOUT`], while the lock
/// of a store this process has just closed is still held, then returns sled's answer.
pub fn try_open(data: &Path) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    loop {
        match sled::open(data) {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// Replaces `from` by `to` in every key and value of the store's default tree (run records,
/// journals, load counts, statistics) and flushes: with `from` a run id that occurs nowhere
/// else, this renames the run, its journal and its children (`from/N`) as if they had been
/// made under `to`. Returns how many keys changed.
pub fn rename(db: &sled::Db, from: &str, to: &str) -> usize {
    let mut renamed = 0;
    let items: Vec<_> = db
        .iter()
        .map(|item| item.expect("reading the store"))
        .collect();
    for (key, value) in items {
        let new_key = replaced(&key, from.as_bytes(), to.as_bytes());
        let new_value = replaced(&value, from.as_bytes(), to.as_bytes());
        if new_key == *key && new_value == *value {
            continue;
        }
        if new_key != *key {
            db.remove(&key).expect("removing the old key");
            renamed += 1;
        }
        db.insert(new_key, new_value).expect("writing the new key");
    }
    db.flush().expect("flushing the store");
    renamed
}

/// Removes the store's wake index (keys `w`, `v`, `W2` and `W`: `keel-engine`'s
/// `store/sled/wakes.rs`) and flushes, as in a store written before Keel kept one: the next
/// open reads every run and builds it again. Returns how many keys went.
pub fn forget_wake_index(db: &sled::Db) -> usize {
    let mut keys: Vec<sled::IVec> = vec![sled::IVec::from(&b"W2"[..]), sled::IVec::from(&b"W"[..])];
    for prefix in [b'w', b'v'] {
        keys.extend(
            db.scan_prefix([prefix])
                .keys()
                .map(|k| k.expect("reading the store")),
        );
    }
    let mut removed = 0;
    for key in keys {
        if db.remove(&key).expect("removing a key").is_some() {
            removed += 1;
        }
    }
    db.flush().expect("flushing the store");
    removed
}

fn replaced(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.starts_with(from) {
            out.extend_from_slice(to);
            rest = &rest[from.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}
