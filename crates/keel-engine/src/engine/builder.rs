//! Configuring and opening an engine: registrations, resources, limits, the clock, and what
//! opening a damaged or foreign store does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::clock::Clock;
use crate::engine::{Engine, Inner, RETENTION_DEFAULT};
use crate::env::{Limiters, RunEnv};
use crate::error::{EngineError, Result};
use crate::journal::RunStatus;
use crate::limiter::RateLimit;
use crate::limits::CONCURRENT_RUNS_MAX;
use crate::notice::Outbox;
use crate::registry::{Registry, StepType};
use crate::resources::Resources;
use crate::stats::StatsBook;
use crate::step::Step;
use crate::store::postgres::PostgresStore;
use crate::store::sled::{LostData, SledOptions, SledStore};
use crate::store::{Durability, JournalStore, Leases};
use crate::types_used::TypesUsed;
use crate::workflow::{Workflow, Workflows};

/// Options and registrations for [`Engine::open`].
pub struct EngineBuilder {
    path: PathBuf,
    durability: Durability,
    runs_concurrent_max: usize,
    poison_after_loads: u32,
    park_after: Option<Duration>,
    retention: Duration,
    retention_for: HashMap<String, Duration>,
    gc_interval: Duration,
    workflows: Workflows,
    registry: Registry,
    registry_error: Option<EngineError>,
    allow_unregistered: bool,
    lost_data: LostData,
    /// The bound on sled's cache.
    sled_cache_bytes: u64,
    /// The PostgreSQL database to keep runs in instead of a sled store in `path`.
    postgres: Option<String>,
    leases: Leases,
    rate_limits: HashMap<String, RateLimit>,
    resources: Resources,
    clock: Clock,
    /// Transitions into these statuses write notices (`notice.rs`).
    notify_on: Vec<RunStatus>,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("runs_concurrent_max", &self.runs_concurrent_max)
            .field("poison_after_loads", &self.poison_after_loads)
            .field("park_after", &self.park_after)
            .field("retention", &self.retention)
            .field("retention_for", &self.retention_for)
            .field("gc_interval", &self.gc_interval)
            .field("allow_unregistered", &self.allow_unregistered)
            .field("rate_limits", &self.rate_limits)
            .field("leases", &self.leases)
            .field("notify_on", &self.notify_on)
            .field(
                "postgres",
                &self
                    .postgres
                    .as_deref()
                    .map(crate::store::postgres::redacted),
            )
            .finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// Registers a resource steps read with [`crate::StepContext::resource`] (an SDK client,
    /// say); one per type, a later one replacing an earlier.
    pub fn resource<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.resources.insert(value);
        self
    }

    /// Sets the rate limit of the service `name` (steps name it in [`Step::rate_limit`]).
    /// Services without one get [`RateLimit::default`].
    pub fn rate_limit(mut self, name: &str, limit: RateLimit) -> Self {
        self.rate_limits.insert(name.to_string(), limit);
        self
    }

    /// Registers a workflow type, so its unfinished runs resume at open. A second type with
    /// the same name makes [`EngineBuilder::open`] fail.
    pub fn workflow<W: Workflow>(mut self) -> Self {
        if let Err(e) = self.workflows.add::<W>() {
            self.registry_error.get_or_insert(e);
        }
        self
    }

    /// Registers a step type, so compensation can undo it from the journal even when no run
    /// has executed it since the engine opened. A second type with the same kind makes
    /// [`EngineBuilder::open`] fail.
    pub fn step<S: Step>(mut self) -> Self {
        if let Err(e) = self.registry.add_step::<S>() {
            self.registry_error.get_or_insert(e);
        }
        self
    }

    /// Registers every step type of a set (a step library's `STEPS`).
    pub fn steps(mut self, set: &[StepType]) -> Self {
        for step in set {
            if let Err(e) = step.register(&self.registry) {
                self.registry_error.get_or_insert(e);
            }
        }
        self
    }

    /// Opens a store whose unfinished runs need workflows or step kinds that are not
    /// registered, instead of refusing it ([`EngineError::Unregistered`]): those runs are
    /// left as they are, undriven (their waiters hear why), until an engine that registers
    /// the types opens the store.
    pub fn allow_unregistered(self) -> Self {
        EngineBuilder {
            allow_unregistered: true,
            ..self
        }
    }

    /// The clock every journaled time comes from and every timer sleeps on (default: the
    /// system's wall clock). Tests pass a [`crate::testing::TestClock`].
    pub fn clock(self, clock: impl Into<Clock>) -> Self {
        EngineBuilder {
            clock: clock.into(),
            ..self
        }
    }

    /// Opens a store that lost data it had acknowledged ([`EngineError::LostData`]: sled's
    /// log holds less than the store's high-water mark) with what is left, instead of
    /// refusing it. Runs that finished or moved on after the loss point may be gone or rolled
    /// back; rolled-back runs run their lost steps again, with the same idempotency keys.
    /// For an operator who knows of the loss and accepts it.
    pub fn accept_data_loss(self) -> Self {
        EngineBuilder {
            lost_data: LostData::Accept,
            ..self
        }
    }

    /// Keeps runs in the PostgreSQL database at `url` (`postgres://user:password@host/db`)
    /// instead of a sled store in the builder's directory, which still holds the worker's own
    /// files. Opening creates or migrates the schema, and refuses a database whose schema is
    /// newer than this binary's ([`EngineError::SchemaNewer`]). Several engines may share the
    /// database: each drives the runs it owns, and takes over those of an engine whose lease
    /// ran out ([`EngineBuilder::leases`]).
    /// A write is durable when its transaction commits: the database's `synchronous_commit`
    /// must be `on` (its default) for the durability [`Durability::PowerLoss`] promises;
    /// [`EngineBuilder::durability`] and [`EngineBuilder::accept_data_loss`] are the sled
    /// store's and change nothing here.
    pub fn postgres(self, url: impl Into<String>) -> Self {
        EngineBuilder {
            postgres: Some(url.into()),
            ..self
        }
    }

    /// How an engine on PostgreSQL holds its runs: the lease length, how often it is renewed,
    /// and how often the engine looks for runs whose owner is gone (default
    /// [`Leases::default`]). Opening refuses a renewal longer than a third of the lease.
    pub fn leases(self, leases: Leases) -> Self {
        EngineBuilder { leases, ..self }
    }

    /// Writes a [`crate::Notice`] for every transition of a run into one of `statuses`
    /// (default: none, and no cost), durable with the transition, for a sender to deliver
    /// ([`Engine::notices`]). Notices exist from the transition on: a run found in one of
    /// the statuses at open, entered before they were asked for, gets none.
    pub fn notify_on(self, statuses: &[RunStatus]) -> Self {
        EngineBuilder {
            notify_on: statuses.to_vec(),
            ..self
        }
    }

    /// The bound on sled's cache of the store's pages (default:
    /// [`crate::limits::SLED_CACHE_BYTES_DEFAULT`], 32 MiB; at least
    /// [`crate::limits::SLED_CACHE_BYTES_MIN`]). Pages read or written stay in it until it is
    /// full: a larger cache keeps more of the runs an engine wrote in memory, however few of
    /// them are loaded (sled's own default, 1 GiB, held about a gigabyte after a million runs);
    /// a smaller one reads evicted pages from the log again when a run is loaded. sled counts
    /// a page by its size on disk, so the memory the cache takes is larger than the bound.
    /// No effect with a PostgreSQL store.
    pub fn sled_cache_bytes(self, bytes: u64) -> Self {
        EngineBuilder {
            sled_cache_bytes: bytes.max(crate::limits::SLED_CACHE_BYTES_MIN),
            ..self
        }
    }

    /// What a durable write survives (default: power loss).
    pub fn durability(self, durability: Durability) -> Self {
        EngineBuilder { durability, ..self }
    }

    /// How many runs are driven at once (default 10,000); more wait for a slot.
    pub fn runs_concurrent_max(self, runs: usize) -> Self {
        EngineBuilder {
            runs_concurrent_max: runs.clamp(1, CONCURRENT_RUNS_MAX),
            ..self
        }
    }

    /// How many loads in a row, each ended by the process dying before the run showed that
    /// it survives being driven, make a run poisoned: not driven again until an operator
    /// resumes it (see the crate docs on crash loops). Default
    /// [`crate::limits::POISON_LOADS_DEFAULT`]; at least 1.
    pub fn poison_after_loads(self, loads: u32) -> Self {
        EngineBuilder {
            poison_after_loads: loads.max(1),
            ..self
        }
    }

    /// How long a wait of a run's body must be for the run to park: to be unloaded while it
    /// waits, holding no memory but a small entry, and loaded again (its body replayed from
    /// its journal) when its time comes or something arrives for it. Parks at once: a durable
    /// timer ([`crate::Ctx::sleep`]), a step's backoff before its next attempt and a wait's
    /// time until its next poll ([`crate::Ctx::wait`], which journals its polls so far
    /// first), each `park_after` long or longer, and a receive of events (with no deadline,
    /// or one `park_after` away or more) when the run has taken no event since it was loaded
    /// or every run slot is taken ([`EngineBuilder::runs_concurrent_max`]). Parks once it has
    /// waited `park_after`: a child run awaited (on sled), and a receive after the run took an
    /// event since it was loaded, if its deadline (if any) is `park_after` or more after that
    /// (so that a run taking events one after another is not loaded again for each; it keeps
    /// its run slot meanwhile). Only the body's main sequence parks, never a branch of a
    /// fan-out. Default [`crate::PARK_AFTER_DEFAULT`]; `None`: runs never park.
    ///
    /// A parked run's body code outside its operations runs again at every wake, as after a
    /// restart: with a wait whose polls are `park_after` or more apart, at every such poll.
    pub fn park_after(self, park_after: Option<Duration>) -> Self {
        EngineBuilder { park_after, ..self }
    }

    /// How long finished runs are kept before garbage collection (default 7 days).
    pub fn retention(self, retention: Duration) -> Self {
        EngineBuilder { retention, ..self }
    }

    /// How long finished runs of `workflow` are kept, overriding the engine's retention and
    /// the workflow's own ([`crate::Workflow::RETENTION`]).
    pub fn retention_for(mut self, workflow: &str, retention: Duration) -> Self {
        self.retention_for.insert(workflow.to_string(), retention);
        self
    }

    /// The names of the workflows registered so far, sorted: for checking an operator's
    /// per-workflow settings ([`EngineBuilder::retention_for`]) before the engine opens.
    pub fn workflow_names(&self) -> Vec<String> {
        self.workflows.name_list()
    }

    /// How often garbage collection runs in the background (default 10 minutes).
    pub fn gc_interval(self, interval: Duration) -> Self {
        EngineBuilder {
            gc_interval: interval.max(Duration::from_secs(1)),
            ..self
        }
    }

    /// Opens the store and resumes every unfinished run of a registered workflow. Must be
    /// called inside a tokio runtime.
    pub async fn open(self) -> Result<Engine> {
        if let Some(e) = self.registry_error {
            return Err(e);
        }
        let store = self.open_store().await?;
        let stats = StatsBook::load(&*store).await?;
        let types = TypesUsed::load(&*store).await?;
        let (shutdown, _) = watch::channel(false);
        let (drivers, _) = watch::channel(0usize);
        let env = RunEnv {
            store,
            registry: self.registry,
            resources: Arc::new(self.resources),
            limiters: Limiters::new(self.rate_limits),
            stats,
            counters: Default::default(),
            clock: self.clock,
            permits: Arc::new(Semaphore::new(self.runs_concurrent_max)),
            shutdown,
            poison_after_loads: self.poison_after_loads,
            park_after: self.park_after,
            types,
            runs: Weak::<Inner>::new(),
        };
        // The environment holds the engine weakly (the engine owns it).
        let inner = Arc::new_cyclic(|inner: &Weak<Inner>| Inner {
            env: Arc::new(RunEnv {
                runs: inner.clone(),
                ..env
            }),
            workflows: Arc::new(self.workflows),
            path: self.path,
            cells: Mutex::default(),
            wakes: Default::default(),
            loading: tokio::sync::Mutex::new(()),
            drivers,
            retention: self.retention,
            retention_for: self.retention_for,
            undriven: Mutex::new(HashMap::new()),
            schedules: Default::default(),
            outbox: Arc::new(Outbox::new(&self.notify_on)),
        });
        let engine = Engine { inner };
        engine.spawn_wakes();
        if let Err(error) = engine.resume_all(self.allow_unregistered).await {
            return Err(engine.open_failed(error));
        }
        engine.spawn_claims();
        engine.spawn_gc(self.gc_interval);
        engine.spawn_stats_flush();
        engine.spawn_schedules();
        Ok(engine)
    }
}

impl Engine {
    /// Stops what a failed open started (the wake loop, drivers of runs it parked or drove):
    /// the caller gets an error, not an engine. A store that broke under the open (its lease
    /// ended while the worker was paused, say) is said so, [`EngineError::BrokeWhileOpening`]:
    /// the caller opens again, as after any break. The lease is checked by the clock too: a
    /// step of the open may have failed on it before the renewer marked the store broken.
    fn open_failed(&self, error: EngineError) -> EngineError {
        self.inner.env.shutdown.send_replace(true);
        let store = &self.inner.env.store;
        let broken = store.broken().borrow().clone().or_else(|| {
            (!store.leased()).then(|| "the lease ended by this worker's clock".to_string())
        });
        match broken {
            Some(reason) => EngineError::BrokeWhileOpening {
                reason,
                source: Box::new(error),
            },
            None => error,
        }
    }
}

impl EngineBuilder {
    /// Opens the store the builder names: the PostgreSQL database, or the sled store in
    /// the directory.
    async fn open_store(&self) -> Result<Arc<dyn JournalStore>> {
        if let Some(url) = &self.postgres {
            // The worker's name: its directory, so that an engine reopened on the same
            // directory after a crash takes its runs back at once (`lease.rs`).
            let path = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
            let name = path.display().to_string();
            let store = PostgresStore::open(url, self.leases, &name).await?;
            return Ok(Arc::new(store));
        }
        let path = self.path.clone();
        let options = SledOptions {
            durability: self.durability,
            lost_data: self.lost_data,
            cache_bytes: Some(self.sled_cache_bytes),
        };
        let store = tokio::task::spawn_blocking(move || SledStore::open(&path, options))
            .await
            .map_err(|e| EngineError::Storage {
                path: self.path.clone(),
                source: format!("the store's opening thread failed: {e}").into(),
            })??;
        Ok(Arc::new(store))
    }
}

impl Engine {
    /// Starts configuring an engine whose data lives in `path` (created if missing, with
    /// owner-only permissions).
    pub fn builder(path: impl AsRef<Path>) -> EngineBuilder {
        EngineBuilder {
            path: path.as_ref().to_owned(),
            durability: Durability::default(),
            runs_concurrent_max: 10_000,
            poison_after_loads: crate::limits::POISON_LOADS_DEFAULT,
            park_after: Some(crate::engine::PARK_AFTER_DEFAULT),
            retention: RETENTION_DEFAULT,
            retention_for: HashMap::new(),
            gc_interval: Duration::from_secs(600),
            workflows: Workflows::default(),
            registry: Registry::default(),
            registry_error: None,
            allow_unregistered: false,
            lost_data: LostData::Refuse,
            sled_cache_bytes: crate::limits::SLED_CACHE_BYTES_DEFAULT,
            postgres: None,
            leases: Leases::default(),
            rate_limits: HashMap::new(),
            resources: Resources::default(),
            clock: Clock::system(),
            notify_on: Vec::new(),
        }
    }
}
