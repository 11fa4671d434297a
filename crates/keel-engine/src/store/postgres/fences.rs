//! What this worker knows of the runs it lost: its writes the database refused, and claims of
//! runs at epochs newer than the tokens its cells hold (its own claims, and the other
//! workers', read at every lease renewal). A cell whose token is behind either is fenced: it
//! stops before its next poll (`store::while_leased`) or sync (`RunCell::durable`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ids::RunId;
use crate::store::Token;

/// How long a claim seen is remembered: far longer than any cell takes to learn of it (the
/// engine looks for stale cells every claim interval).
const REMEMBERED: Duration = Duration::from_secs(600);

/// See the module doc.
#[derive(Debug, Default)]
pub(super) struct Fences {
    known: Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    /// Writes the database refused, with the token they carried.
    refused: HashSet<(RunId, Token)>,
    /// The newest epoch each run was claimed at, and when that was learned.
    newest: HashMap<RunId, (i64, Instant)>,
}

impl Fences {
    /// The database refused a write of run `id` made with `token`.
    pub(super) fn refused(&self, id: RunId, token: Token) {
        self.known
            .lock()
            .expect("fences lock")
            .refused
            .insert((id, token));
    }

    /// Run `id` was claimed at `epoch` (by this worker or another).
    pub(super) fn claimed(&self, id: RunId, epoch: i64) {
        let mut known = self.known.lock().expect("fences lock");
        let now = Instant::now();
        let newest = known.newest.entry(id).or_insert((epoch, now));
        if epoch >= newest.0 {
            *newest = (epoch, now);
        }
    }

    /// Whether a cell of run `id` holding `token` has lost the run.
    pub(super) fn fenced(&self, id: &RunId, token: Token) -> bool {
        let known = self.known.lock().expect("fences lock");
        known.refused.contains(&(id.clone(), token))
            || known
                .newest
                .get(id)
                .is_some_and(|(epoch, _)| *epoch > token.0)
    }

    /// Forgets claims learned more than [`REMEMBERED`] ago.
    pub(super) fn prune(&self) {
        let mut known = self.known.lock().expect("fences lock");
        known.newest.retain(|_, (_, at)| at.elapsed() < REMEMBERED);
    }
}
