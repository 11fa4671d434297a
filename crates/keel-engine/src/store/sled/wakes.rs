//! The durable wake index (`engine/parking.rs`): when each drivable run must be driven next,
//! so that opening a store loads only the runs that are due and parks the others unread.
//!
//! Keys, in the runs' tree (every write is one key, as for the rest of the store):
//! - `w` + wake time (u64, big-endian) + run id: an entry (empty value). Wake time 0: the run
//!   is loaded (or must be at the next open); `u64::MAX`: it waits only for something to
//!   arrive (an event, an operator call);
//! - `v` + run id: the run's current wake time (u64, big-endian), to find its entry, when it
//!   is not 0: a run without `v` has its entry at 0, if it has one. So a run that is started,
//!   driven and settled without ever parking writes one key of the index and removes it
//!   (its `v` was two more writes: of the 17 sled writes of a run of 10 steps, or the seven
//!   of a run of none);
//! - `W2`: present once every drivable run has an entry (the index was built) by a version
//!   whose children set their parent's entry when they settle. `W` was the mark of the
//!   versions before: a store holding it was last indexed by one of them (perhaps after
//!   this version, whose mark it does not know to remove), so its index is not trusted:
//!   the open reads every run and builds it again, removing `W`.
//!
//! A new entry is written before the old one is removed, so a crash between leaves both
//! (the earlier one wins at the next open, which is safe), never neither. An entry whose run
//! is gone or settled is stale and harmless: the next open drops it.

use std::collections::HashMap;

use crate::error::Result;
use crate::ids::RunId;

use super::{Kv, SledStore};

const WAKE_PREFIX: u8 = b'w';
const WAKE_OF_PREFIX: u8 = b'v';
const BUILT_KEY: &[u8] = b"W2";
/// The mark of the index as versions before `BUILT_KEY` built it.
const OLD_BUILT_KEY: &[u8] = b"W";

/// Locks of the index, each over the runs whose ids hash to it (a fixed number of them).
const LOCKS: usize = 64;

/// The index's locks: a change of one run's keys holds its run's lock, so that no other
/// change of the same run comes between its reads and writes, while runs of other locks
/// change meanwhile (one lock for the whole index made the runtime's threads wait for each
/// other's starts and settles); the open's read of the whole index holds every lock.
pub(super) struct IndexLocks([std::sync::Mutex<()>; LOCKS]);

impl IndexLocks {
    pub(super) fn new() -> IndexLocks {
        IndexLocks(std::array::from_fn(|_| std::sync::Mutex::new(())))
    }

    /// The lock of run `id`'s keys.
    fn of(&self, id: &RunId) -> std::sync::MutexGuard<'_, ()> {
        self.0[IndexLocks::index(id)]
            .lock()
            .expect("wake index lock")
    }

    fn index(id: &RunId) -> usize {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        id.as_str().hash(&mut hasher);
        hasher.finish() as usize % LOCKS
    }

    /// Every lock, always taken in the same order.
    fn all(&self) -> Vec<std::sync::MutexGuard<'_, ()>> {
        self.0
            .iter()
            .map(|lock| lock.lock().expect("wake index lock"))
            .collect()
    }
}

/// The places in `wakes` (in wake-time order) of the entries of runs listed before, in
/// ascending order (`read_wakes` searches them), each with the place of its run's first
/// entry.
fn later_entries(wakes: &[(u64, RunId)]) -> Vec<(usize, usize)> {
    let mut first: HashMap<&str, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(wakes.len(), Default::default());
    let mut later = Vec::new();
    for (at, (_, id)) in wakes.iter().enumerate() {
        if let Some(&earliest) = first.get(id.as_str()) {
            later.push((at, earliest));
        } else {
            first.insert(id.as_str(), at);
        }
    }
    later
}

/// Whether the index was built, by this version's rules, since any older version built it.
fn built(kv: &Kv) -> Result<bool> {
    Ok(kv.contains(BUILT_KEY)? && !kv.contains(OLD_BUILT_KEY)?)
}

fn wake_key(wake_ms: u64, id: &RunId) -> Vec<u8> {
    let mut key = wake_key_prefix(wake_ms);
    key.extend_from_slice(id.as_str().as_bytes());
    key
}

fn wake_key_prefix(wake_ms: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(9);
    key.push(WAKE_PREFIX);
    key.extend_from_slice(&wake_ms.to_be_bytes());
    key
}

pub(super) fn wake_of_key(id: &RunId) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + id.as_str().len());
    key.push(WAKE_OF_PREFIX);
    key.extend_from_slice(id.as_str().as_bytes());
    key
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The index keys run `id` may have (its entry and its `v` key), for deleting the
/// run: without `v`, the entry at 0 (removing a key that is absent writes nothing).
pub(super) fn keys_of(kv: &Kv, id: &RunId) -> Result<Vec<Vec<u8>>> {
    let of = wake_of_key(id);
    Ok(match kv.get(&of)?.as_deref().and_then(be_u64) {
        Some(wake_ms) => vec![wake_key(wake_ms, id), of],
        None => vec![wake_key(0, id)],
    })
}

/// The runs whose entry is 0 (loaded when the store was last open), once the index is built;
/// `None` before.
pub(super) fn loaded_runs(kv: &Kv) -> Result<Option<Vec<RunId>>> {
    if !built(kv)? {
        return Ok(None);
    }
    let mut runs = Vec::new();
    for key in kv.keys_with_prefix(wake_key_prefix(0)) {
        // An entry that names no run is dropped by `read_wakes`, later in the open.
        if let Some(id) = std::str::from_utf8(&key?[9..])
            .ok()
            .and_then(|id| RunId::existing(id).ok())
        {
            runs.push(id);
        }
    }
    Ok(Some(runs))
}

impl SledStore {
    pub(super) fn write_wake(&self, id: &RunId, wake_ms: u64) -> Result<()> {
        let one_at_a_time = self.wakes_locks.of(id);
        self.write_wake_locked(&one_at_a_time, id, wake_ms, true)
    }

    /// [`SledStore::write_wake`] for a run whose entry is not at 0 only (its `v` key): a run
    /// without `v` is due already, or not indexed.
    pub(super) fn write_wake_if_indexed(&self, id: &RunId, wake_ms: u64) -> Result<()> {
        let one_at_a_time = self.wakes_locks.of(id);
        self.write_wake_locked(&one_at_a_time, id, wake_ms, false)
    }

    fn write_wake_locked(
        &self,
        _one_at_a_time: &std::sync::MutexGuard<'_, ()>,
        id: &RunId,
        wake_ms: u64,
        or_new: bool,
    ) -> Result<()> {
        let of = wake_of_key(id);
        let v = self.kv.get(&of)?.as_deref().and_then(be_u64);
        // Without `v`, the run's entry is at 0 or it has none: a run with an entry at 0 is
        // due already, and one with none is not indexed.
        if v.is_none() && !or_new {
            return Ok(());
        }
        let old = v.unwrap_or(0);
        let new_v = (wake_ms != 0).then_some(wake_ms);
        // The new entry first, then `v`, then the old entry: a crash between leaves two
        // entries (or an entry and a `v` at the other), and the earlier wins at the next
        // open (`read_wakes`).
        let writing = self.writes.begin();
        let had_entry = self.kv.insert(wake_key(wake_ms, id), &[])?.is_some();
        if had_entry && v == new_v {
            // Unchanged (sled writes nothing for a key set to the value it has).
            writing.changed_nothing();
            return Ok(());
        }
        match new_v {
            Some(at) if v != new_v => {
                self.kv.insert(of, &at.to_be_bytes())?;
            }
            None if v.is_some() => {
                self.kv.remove(&of)?;
            }
            _ => {}
        }
        if old != wake_ms {
            // Without `v`, the entry at 0, which may be absent (its removal then writes
            // nothing).
            self.kv.remove(wake_key(old, id))?;
        }
        drop(writing);
        Ok(())
    }

    /// Creates run `id` with `create` (which writes its record, or finds one and writes
    /// nothing), the run's entry at 0 written first: it is loaded from then on, and a crash
    /// between the two leaves a stale entry (dropped at the next open), never a record
    /// without its entry. A run without a record has no `v` (a version before this one may
    /// have left one at 0, which is harmless), so nothing is read first. If `create` found
    /// the run (or failed), its index is left as it was: the entry is removed again unless
    /// the run had it already. Under the run's lock of the index, so that no change of the
    /// found run's entry comes between.
    pub(super) fn create_with_entry<T>(
        &self,
        id: &RunId,
        create: impl FnOnce() -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let _one_at_a_time = self.wakes_locks.of(id);
        let key = wake_key(0, id);
        let writing = self.writes.begin();
        let had_entry = self.kv.insert(&key, &[])?.is_some();
        if had_entry {
            writing.changed_nothing();
        } else {
            drop(writing);
        }
        crate::crash::point("start.after_wake_entry");
        let found = create();
        if !had_entry && !matches!(found, Ok(None)) {
            let _writing = self.writes.begin();
            self.kv.remove(&key)?;
        }
        found
    }

    /// Removes run `id`'s entry, and then its `v` if the entry was not at 0: a crash between
    /// leaves a `v` without its entry, which no open reads (the next change of the run's
    /// entry, or the run's deletion, removes it). A run settles loaded, so its entry is at 0
    /// and found by its removal, with nothing read first and nothing more to remove: no `v`
    /// is written beside an entry at 0, and the open (`read_wakes`) removes one a crash
    /// left there. Only a `v` at 0 written by a version before this one may stay, harmless
    /// as any `v` without its entry.
    pub(super) fn remove_wake(&self, id: &RunId) -> Result<()> {
        let _one_at_a_time = self.wakes_locks.of(id);
        let removed = |key: &[u8]| -> Result<bool> {
            let old = self.kv.remove(key)?;
            Ok(old.is_some())
        };
        let writing = self.writes.begin();
        if removed(&wake_key(0, id))? {
            return Ok(());
        }
        // An entry elsewhere, found through `v`, or none.
        let of = wake_of_key(id);
        let Some(v) = self.kv.get(&of)? else {
            writing.changed_nothing();
            return Ok(());
        };
        if let Some(wake_ms) = be_u64(&v) {
            removed(&wake_key(wake_ms, id))?;
        }
        removed(&of)?;
        drop(writing);
        Ok(())
    }

    /// Removes run `id`'s entry at `wake_ms` and its `v` key: an entry found by
    /// `read_wakes` whose `v` may be missing (a crash between a first entry and its `v`).
    pub(super) fn remove_wake_at(&self, id: &RunId, wake_ms: u64) -> Result<()> {
        let _one_at_a_time = self.wakes_locks.of(id);
        let mut keys = keys_of(&self.kv, id)?;
        keys.push(wake_key(wake_ms, id));
        let _writing = self.writes.begin();
        for key in keys {
            self.kv.remove(key)?;
        }
        Ok(())
    }

    /// Every run's entry in wake-time order, once the index is built (one per run: see
    /// below).
    pub(super) fn read_wakes(&self) -> Result<Option<Vec<(u64, RunId)>>> {
        if !built(&self.kv)? {
            return Ok(None);
        }
        let _every_run = self.wakes_locks.all();
        // Its repairs are writes like any other (counted: `sync.rs`), if it makes any.
        let writing = self.writes.begin();
        let mut repaired = false;
        let mut wakes = Vec::new();
        for item in self.kv.keys_with_prefix([WAKE_PREFIX]) {
            let key = item?;
            let parsed = key
                .get(1..9)
                .and_then(be_u64)
                .zip(key.get(9..))
                .map(|(wake_ms, id)| {
                    let run = std::str::from_utf8(id)
                        .ok()
                        .and_then(|id| RunId::existing(id).ok());
                    (wake_ms, run)
                });
            match parsed {
                Some((wake_ms, Some(run))) => wakes.push((wake_ms, run)),
                Some((_, None)) => {
                    tracing::warn!(key = %super::readable_key(&key), "wake index entry names no run id: dropped");
                    repaired = true;
                    self.kv.remove(&key)?;
                }
                None => {
                    tracing::warn!(key = %super::readable_key(&key), "wake index entry unreadable: dropped");
                    repaired = true;
                    self.kv.remove(&key)?;
                }
            }
        }
        // An entry a crash left beside the run's earlier one (the new one is written before
        // the old one is removed, and `v` between): the earliest stands (the scan is in
        // wake-time order), and `v` is set to it (none for 0), so that the next change of the
        // entry removes it. A run with one entry has `v` at it, or none: at 0, or after a
        // crash between a first entry elsewhere and its `v`, in which case its next change
        // leaves this entry, to be found here next time. Found after the scan, by a map of
        // the ids in `wakes` (not of copies of them made during it).
        let later = later_entries(&wakes);
        for &(at, first) in &later {
            let (wake_ms, id) = &wakes[at];
            let earliest = wakes[first].0;
            repaired = true;
            if earliest == 0 {
                self.kv.remove(wake_of_key(id))?;
            } else {
                self.kv.insert(wake_of_key(id), &earliest.to_be_bytes())?;
            }
            self.kv.remove(wake_key(*wake_ms, id))?;
        }
        if !later.is_empty() {
            let mut place = 0..;
            wakes.retain(|_| {
                let at = place.next().unwrap_or_default();
                later
                    .binary_search_by_key(&at, |&(later_at, _)| later_at)
                    .is_err()
            });
        }
        if !repaired {
            writing.changed_nothing();
        }
        Ok(Some(wakes))
    }

    pub(super) fn write_wakes_built(&self) -> Result<()> {
        let _writing = self.writes.begin();
        self.kv.insert(BUILT_KEY, &[1u8])?;
        self.kv.remove(OLD_BUILT_KEY)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::commit::Durability;
    use crate::store::sled::{LostData, SledOptions};

    fn open(dir: &std::path::Path) -> SledStore {
        let options = SledOptions {
            durability: Durability::ProcessCrash,
            lost_data: LostData::Refuse,
            cache_bytes: None,
        };
        SledStore::open(dir, options).unwrap()
    }

    fn run(id: &str) -> RunId {
        RunId::new(id).unwrap()
    }

    /// What the index holds: its entries (wake time, run) and its `v` keys (run, wake time).
    type Held = (Vec<(u64, String)>, Vec<(String, u64)>);

    fn held(store: &SledStore) -> Held {
        let entries = store
            .kv
            .keys_with_prefix([WAKE_PREFIX])
            .map(|key| {
                let key = key.unwrap();
                let wake_ms = be_u64(&key[1..9]).unwrap();
                (wake_ms, String::from_utf8(key[9..].to_vec()).unwrap())
            })
            .collect();
        let ofs = store
            .kv
            .scan_prefix([WAKE_OF_PREFIX])
            .map(|item| {
                let (key, value) = item.unwrap();
                let id = String::from_utf8(key[1..].to_vec()).unwrap();
                (id, be_u64(&value).unwrap())
            })
            .collect();
        (entries, ofs)
    }

    fn entry(wake_ms: u64, id: &str) -> (u64, String) {
        (wake_ms, id.to_string())
    }

    /// A run that is started and settles without parking writes one key of the index and
    /// removes it; one that parks gets `v` while it is parked, and loses it when it is due.
    #[test]
    fn a_run_at_0_has_no_v_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let writes = |store: &SledStore| (store.writes.begun(), store.writes.done());

        store.write_wake(&run("short"), 0).unwrap();
        assert_eq!(held(&store), (vec![entry(0, "short")], vec![]));
        let before = writes(&store);
        store.write_wake(&run("short"), 0).unwrap();
        assert_eq!(writes(&store), before, "an unchanged entry is no write");
        store.remove_wake(&run("short")).unwrap();
        assert_eq!(held(&store), (vec![], vec![]));

        store.write_wake(&run("parks"), 0).unwrap();
        store.write_wake(&run("parks"), 5_000).unwrap();
        assert_eq!(
            held(&store),
            (vec![entry(5_000, "parks")], vec![("parks".into(), 5_000)])
        );
        store.write_wake(&run("parks"), 7_000).unwrap();
        assert_eq!(
            held(&store),
            (vec![entry(7_000, "parks")], vec![("parks".into(), 7_000)])
        );
        // A child's settling makes its parked parent due; a parent at 0 or unindexed is left.
        store.write_wake_if_indexed(&run("parks"), 0).unwrap();
        assert_eq!(held(&store), (vec![entry(0, "parks")], vec![]));
        store.write_wake_if_indexed(&run("unindexed"), 0).unwrap();
        assert_eq!(held(&store), (vec![entry(0, "parks")], vec![]));
        store.write_wake(&run("parks"), u64::MAX).unwrap();
        store.remove_wake(&run("parks")).unwrap();
        assert_eq!(held(&store), (vec![], vec![]));
        assert_eq!(
            keys_of(&store.kv, &run("parks")).unwrap(),
            vec![wake_key(0, &run("parks"))]
        );
    }

    /// A run created gets its entry at 0; a start that finds its run (or fails) leaves the
    /// index as it was, whether the run was loaded, parked or settled.
    #[test]
    fn a_start_that_finds_its_run_leaves_the_index_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let created = store.create_with_entry(&run("new"), || Ok(None::<()>));
        assert!(created.unwrap().is_none());
        assert_eq!(held(&store), (vec![entry(0, "new")], vec![]));

        leave(&store, "parked", &[5_000], Some(5_000));
        leave(&store, "loaded", &[0], None);
        let before = held(&store);
        for id in ["new", "parked", "loaded", "settled"] {
            let found = store.create_with_entry(&run(id), || Ok(Some(())));
            assert!(found.unwrap().is_some());
            assert_eq!(held(&store), before, "after finding {id}");
        }
        let failed = store.create_with_entry(&run("unreadable"), || {
            Err::<Option<()>, _>(crate::error::EngineError::ShutDown)
        });
        assert!(failed.is_err());
        assert_eq!(held(&store), before, "after a failed create");
    }

    /// While one run's entry changes (here: a start between its entry and its record), a
    /// run of another lock changes its own: one lock for the whole index held it until then.
    #[test]
    fn runs_of_other_locks_change_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let first = run("first");
        let other = (0..)
            .map(|n| run(&format!("other-{n}")))
            .find(|id| IndexLocks::index(id) != IndexLocks::index(&first))
            .unwrap();
        let (done, other_changed) = std::sync::mpsc::channel();
        let (holding, first_holds) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let (store, first) = (&store, &first);
            let created = scope.spawn(move || {
                store.create_with_entry(first, || {
                    // The first run's lock is held here.
                    holding.send(()).unwrap();
                    let waited = other_changed.recv_timeout(std::time::Duration::from_secs(10));
                    assert!(
                        waited.is_ok(),
                        "the other run's change waited for this lock"
                    );
                    Ok(None::<()>)
                })
            });
            first_holds.recv().unwrap();
            store.write_wake(&other, 5_000).unwrap();
            done.send(()).unwrap();
            assert!(created.join().unwrap().unwrap().is_none());
        });
        assert_eq!(
            held(&store),
            (
                vec![entry(0, "first"), entry(5_000, other.as_str())],
                vec![(other.as_str().to_owned(), 5_000)]
            )
        );
    }

    /// Writes run `id`'s index keys as a version before this one or a crash left them:
    /// entries at `entries`, and `v` at `v`.
    fn leave(store: &SledStore, id: &str, entries: &[u64], v: Option<u64>) {
        for &wake_ms in entries {
            store.kv.insert(wake_key(wake_ms, &run(id)), &[]).unwrap();
        }
        if let Some(wake_ms) = v {
            let value = wake_ms.to_be_bytes();
            store.kv.insert(wake_of_key(&run(id)), &value).unwrap();
        }
    }

    /// A store written by the versions that kept `v` at 0 too: the run's next change of its
    /// entry drops it. Its settling does not (it removes the entry at 0 and reads nothing):
    /// that `v` stays until the run is deleted, read by no open.
    #[test]
    fn a_v_key_at_0_is_dropped_by_the_next_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = run("old");
        leave(&store, "old", &[0], Some(0));
        store.write_wake(&id, 0).unwrap();
        assert_eq!(held(&store), (vec![entry(0, "old")], vec![]));

        leave(&store, "old", &[], Some(0));
        store.write_wake(&id, 9_000).unwrap();
        assert_eq!(
            held(&store),
            (vec![entry(9_000, "old")], vec![("old".into(), 9_000)])
        );
        store.kv.remove(wake_key(9_000, &id)).unwrap();
        leave(&store, "old", &[0], Some(0));
        store.remove_wake(&id).unwrap();
        assert_eq!(held(&store), (vec![], vec![("old".into(), 0)]));
        assert_eq!(
            keys_of(&store.kv, &id).unwrap(),
            vec![wake_key(0, &id), wake_of_key(&id)],
            "the run's deletion removes that v"
        );
    }

    /// What a crash leaves between the writes of a change: the earlier entry wins at the next
    /// open, and the index is left as that entry's change would have left it.
    #[test]
    fn an_open_repairs_what_a_crash_left_between_the_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.write_wakes_built().unwrap();
        // Parking from 0, cut after the new entry: no `v` yet.
        leave(&store, "a", &[0, 5_000], None);
        // Parking from 0, cut after `v`.
        leave(&store, "b", &[0, 6_000], Some(6_000));
        // (Made due from 6,000 and cut after its new entry leaves b's state, after `v`'s
        // removal a's.)
        // Moved from 7,000 to 8,000, cut after `v`: the earlier entry stands, `v` back at it.
        leave(&store, "c", &[7_000, 8_000], Some(8_000));
        // Three entries (no single crash leaves them; two without an open between could),
        // with a run of one entry, and an entry naming no run id, among them: the earliest
        // of each run stands, in order, and the others go.
        leave(&store, "d", &[9_000, 10_000, 12_000], Some(12_000));
        leave(&store, "e", &[11_000], Some(11_000));
        let mut no_id = wake_key_prefix(9_500);
        no_id.extend_from_slice(b"not an id!");
        store.kv.insert(no_id, &[]).unwrap();

        let wakes = store.read_wakes().unwrap().unwrap();
        let due: Vec<(u64, String)> = wakes
            .iter()
            .map(|(at, id)| (*at, id.as_str().to_string()))
            .collect();
        let expected = vec![
            entry(0, "a"),
            entry(0, "b"),
            entry(7_000, "c"),
            entry(9_000, "d"),
            entry(11_000, "e"),
        ];
        assert_eq!(due, expected);
        let ofs = vec![
            ("c".into(), 7_000),
            ("d".into(), 9_000),
            ("e".into(), 11_000),
        ];
        assert_eq!(held(&store), (expected, ofs));
    }
}
