//! What a run's code is given of the engine: the store, the step registry, the resources,
//! the limiters, the statistics and the clock, and (through [`Runs`]) the few things it asks
//! of the engine about other runs. The executor, the saga, the body's context and its lanes
//! take a [`RunEnv`], never the engine itself, so they do not depend on it: the engine
//! builds the environment and implements [`Runs`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{watch, Semaphore};

use crate::cell::{RunCell, Stop};
use crate::clock::Clock;
use crate::error::{EngineError, Result};
use crate::ids::RunId;
use crate::journal::RunRecord;
use crate::limiter::{RateLimit, RateLimiter};
use crate::registry::Registry;
use crate::replay::RunState;
use crate::resources::Resources;
use crate::stats::{EventCounters, StatsBook};
use crate::store::JournalStore;
use crate::types_used::TypesUsed;

/// What a run's code asks of the engine about runs: child runs, and letting go of its own
/// cell. Implemented by the engine.
pub(crate) trait Runs: Send + Sync {
    /// Starts (or finds) child run `child` of `parent`; durable and driven when it resolves.
    fn start_child(
        self: Arc<Self>,
        workflow: String,
        child: RunId,
        input: Value,
        parent: RunId,
    ) -> BoxFuture<'static, Result<()>>;

    /// Waits until run `id` settles (`Engine::wait`).
    fn wait(self: Arc<Self>, id: RunId) -> BoxFuture<'static, Result<RunRecord>>;

    /// Undoes child run `child` for its parent's saga and waits until it settled; `None` if
    /// it was never created.
    fn compensate_child(
        self: Arc<Self>,
        child: RunId,
        parent: RunId,
    ) -> BoxFuture<'static, Result<Option<RunRecord>>>;

    /// Unloads `cell` unless it must still be driven; whether it was unloaded.
    fn unload_if_settled(&self, cell: &Arc<RunCell>) -> bool;

    /// Unloads `cell` whatever its status, telling its waiters `stop`.
    fn unload(&self, cell: &Arc<RunCell>, stop: Stop);

    /// Parks the run of `cell` until `wake_at_ms` (or until something arrives for it) if
    /// it may, and `ready` accepts its state; with `awaiting`, until that child run settles
    /// too. Whether it parked (`engine/parking.rs`).
    fn park(
        &self,
        cell: &Arc<RunCell>,
        wake_at_ms: Option<u64>,
        ready: &(dyn Fn(&RunState) -> bool + Sync),
        awaiting: Option<&RunId>,
    ) -> bool;
}

/// The limiter of each service, made on first use from the configured rate limits.
#[derive(Default)]
pub(crate) struct Limiters {
    made: Mutex<HashMap<String, Arc<RateLimiter>>>,
    configured: HashMap<String, RateLimit>,
}

impl Limiters {
    pub(crate) fn new(configured: HashMap<String, RateLimit>) -> Limiters {
        Limiters {
            made: Mutex::new(HashMap::new()),
            configured,
        }
    }

    /// The limiter of the service `name`, created on first use.
    pub(crate) fn get(&self, name: &str) -> Arc<RateLimiter> {
        let mut made = self.made.lock().expect("limiters lock");
        Arc::clone(made.entry(name.to_string()).or_insert_with(|| {
            let limit = self.configured.get(name).cloned().unwrap_or_default();
            Arc::new(RateLimiter::new(name, limit))
        }))
    }
}

/// The engine as a run's code sees it.
pub(crate) struct RunEnv {
    pub(crate) store: Arc<dyn JournalStore>,
    /// Step kinds, for undoing a step from the journal alone.
    pub(crate) registry: Registry,
    pub(crate) resources: Arc<Resources>,
    pub(crate) limiters: Limiters,
    pub(crate) stats: StatsBook,
    pub(crate) counters: EventCounters,
    pub(crate) clock: Clock,
    /// Slots for runs driven at once.
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Loads without survival after which a run is poisoned (`poison.rs`).
    pub(crate) poison_after_loads: u32,
    /// How long a wait of a run's body must be for the run to park (`engine/parking.rs`);
    /// `None`: runs never park.
    pub(crate) park_after: Option<Duration>,
    /// The types the store's runs use (`types_used.rs`).
    pub(crate) types: TypesUsed,
    /// The engine, held weakly: it owns this environment.
    pub(crate) runs: Weak<dyn Runs>,
}

impl RunEnv {
    /// The engine, unless it is gone (then the run's code stops as at shutdown).
    pub(crate) fn runs(&self) -> Result<Arc<dyn Runs>> {
        self.runs.upgrade().ok_or(EngineError::ShutDown)
    }

    /// Whether a wait from `now_ms` until `at_ms` is long enough to park the run.
    pub(crate) fn parks_for(&self, now_ms: u64, at_ms: u64) -> bool {
        self.park_after
            .is_some_and(|after| at_ms.saturating_sub(now_ms) >= after.as_millis() as u64)
    }

    /// Whether the engine is shutting down.
    pub(crate) fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}
