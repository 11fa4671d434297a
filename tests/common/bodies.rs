//! How many times workflow bodies ran, per run: a body runs at its start and again at every
//! load (after a park or a restart), so this counts a run's loads.

use std::collections::BTreeMap;
use std::sync::Mutex;

static BODIES: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

/// Counts one run of the body of run `id`: called first thing in the body.
pub(crate) fn ran(id: &str) {
    *BODIES.lock().unwrap().entry(id.to_string()).or_default() += 1;
}

/// How many times the bodies of the runs whose id starts with `prefix` ran.
pub(crate) fn of(prefix: &str) -> usize {
    BODIES
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _)| id.starts_with(prefix))
        .map(|(_, n)| n)
        .sum()
}
