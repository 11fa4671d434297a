//! Keel's engine: durable workflows with saga compensation, on an embedded sled store.
//!
//! # A tour
//!
//! A [`Workflow`] is ordinary async Rust that takes its side effects through a [`Ctx`]:
//! [`Ctx::step`] runs a [`Step`], [`Ctx::sleep`] sets a durable timer and [`Ctx::wait`] polls
//! a [`Probe`] until what a step made is usable (k confirmations in a row, a deadline judged
//! by what the resource answered, not by the engine's queueing: `docs/waits.md`). Every step is
//! journaled with a stable [`IdempotencyKey`], durably, before its side effect begins, and its
//! outcome is durable before the run's next side effect begins or its end is reported (the
//! outcome and the next step's start share one sync). If the process dies, opening the
//! [`Engine`] again replays each unfinished run: recorded steps return their recorded output
//! without running, the step that was in flight runs again with the same key, and a run that
//! cannot finish is compensated: its completed (and in-doubt) steps are undone, newest first,
//! from the journal alone.
//!
//! A side effect with nothing to undo (a lookup, a read) needs no type: [`Ctx::effect`] runs
//! a closure as a step whose `COMPENSABLE` is false, with its settings in [`EffectOptions`]
//! (retry policy, rate limit, and the argument it is journaled with), and journals, retries,
//! contains and replays it exactly as such a step; the saga passes over it, and nothing is
//! registered for it. A step that must be undone stays a [`Step`], a serialisable value plus
//! a trait impl registered by kind, because compensation must run from the journal alone,
//! after a restart, without the workflow's code or its closures: the saga finds the step's
//! code by its journaled kind and hands it the journaled value.
//!
//! The engine survives its users' faults: a panic in a step, a compensation, a probe or a
//! workflow body is that call's failure, never a hung run; a run whose driving kills the
//! whole process at every load is suspended as poisoned after
//! [`limits::POISON_LOADS_DEFAULT`] loads; an output that cannot be kept is undone, not
//! leaked; a store whose unfinished runs need unregistered types, or whose log lost what it
//! had acknowledged, refuses to open and says why. Timers of hours or days are tested in
//! milliseconds on a [`testing::TestClock`].
//!
//! ```
//! use std::time::Duration;
//! use keel_engine::{Ctx, Engine, Probe, Step, StepContext, StepError, Undo, WaitPolicy};
//! use keel_engine::{Workflow, WorkflowError};
//! use serde::{Deserialize, Serialize};
//!
//! /// Reserves `amount` from a (pretend) account; undone by releasing it.
//! #[derive(Serialize, Deserialize)]
//! struct Reserve {
//!     amount: u64,
//! }
//!
//! impl Step for Reserve {
//!     const KIND: &'static str = "doc.reserve";
//!     type Output = String;
//!     async fn execute(&self, ctx: &StepContext) -> Result<String, StepError> {
//!         // A real step passes ctx.key() to the API as its client token.
//!         Ok(format!("reservation-{}", ctx.key()))
//!     }
//!     async fn compensate(&self, _ctx: &StepContext, _output: Option<String>) -> Result<Undo, StepError> {
//!         Ok(Undo::Done)
//!     }
//! }
//!
//! /// Whether a reservation is confirmed by the (pretend) account: here, at the second read.
//! #[derive(Serialize, Deserialize)]
//! struct Confirmed {
//!     reservation: String,
//! }
//!
//! impl Probe for Confirmed {
//!     const KIND: &'static str = "doc.confirmed";
//!     type Output = String;
//!     async fn probe(&self, ctx: &StepContext) -> Result<Option<String>, StepError> {
//!         // Ok(None): not yet. A throttled read (StepError::throttled) is no answer.
//!         Ok((ctx.attempt().0 >= 2).then(|| self.reservation.clone()))
//!     }
//! }
//!
//! struct Checkout;
//!
//! impl Workflow for Checkout {
//!     const NAME: &'static str = "doc.checkout";
//!     type Input = u64;
//!     type Output = Vec<String>;
//!     async fn run(ctx: &mut Ctx, amount: u64) -> Result<Vec<String>, WorkflowError> {
//!         let first = ctx.step(Reserve { amount }).await?;
//!         // Poll every 5 ms until it reads "confirmed" twice in a row; hopeless after 10 s.
//!         let policy = WaitPolicy::every(Duration::from_millis(5), Duration::from_secs(10))
//!             .confirmations(2);
//!         ctx.wait(Confirmed { reservation: first.clone() }, policy).await?;
//!         ctx.sleep(Duration::from_millis(1)).await?;
//!         let second = ctx.step(Reserve { amount: amount * 2 }).await?;
//!         Ok(vec![first, second])
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let engine = Engine::builder(dir.path()).workflow::<Checkout>().step::<Reserve>().open().await?;
//! let run = engine.start::<Checkout>("order-1", 5).await?;
//! let reservations = run.result().await?;
//! assert_eq!(reservations.len(), 2);
//! // Starting the same id with the same input returns the same run, finished.
//! let again = engine.start::<Checkout>("order-1", 5).await?;
//! assert_eq!(again.result().await?, reservations);
//! engine.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Where things are
//! - [`journal`]: what is stored (run records and journal entries).
//! - [`replay`]: the pure fold of a journal into a run's state, and the decisions taken on it.
//! - Every journal write goes through the run's cell (`cell.rs`, under its lock): the lane
//!   (`lane.rs`) writes what the body's operations do, the saga (`saga.rs`) what compensation
//!   does, and `engine/operator.rs` what operators ask; `executor` drives a run through them.
//! - [`store`]: the storage trait and its sled implementation, with group commit and the
//!   high-water mark.
//! - [`testing`]: the test clock.
//! - [`limits`]: every hard limit.
//!
//! Durability, the commit protocol and what a crash at each point leaves behind are described
//! in `docs/guarantees.md`.

mod cell;
mod child;
mod clock;
mod contain;
pub mod crash;
mod ctx;
mod effect;
mod engine;
mod env;
mod error;
mod executor;
mod ids;
mod interrupt;
pub mod journal;
mod lane;
mod limiter;
pub mod limits;
mod parallel;
mod poison;
mod registry;
pub mod replay;
mod resources;
mod retry;
mod saga;
mod stats;
mod step;
pub mod store;
pub mod testing;
mod transition;
mod wait;
mod workflow;

pub use clock::Clock;
pub use ctx::{Created, Ctx};
pub use engine::{
    Engine, EngineBuilder, RunHandle, RunsPage, RunsQuery, RETENTION_DEFAULT, RUNS_PAGE_MAX,
};
pub use error::{EngineError, Result};
pub use ids::child_id;
pub use ids::{Attempt, IdempotencyKey, JournalIndex, RunId, StepIndex};
pub use journal::{
    Entry, ErrorClass, ErrorRecord, Event, RunHistory, RunRecord, RunStatus, WaitOutcome,
    WaitSchedule,
};
pub use limiter::{
    Permit, Priority, RateLimit, RateLimiter, PROBES_IN_A_ROW_MAX, SLOW_START_EXIT_SHARE,
};
pub use registry::StepType;
pub use retry::RetryPolicy;
pub use stats::{Counters, LatencyStats, OperationStats, Outlier};
pub use step::{EffectOptions, Step, StepContext, StepError, Undo};
pub use store::Durability;
pub use wait::{LearnedDeadline, Probe, WaitPolicy, LEARN_AFTER_DEFAULT};
pub use workflow::{InvalidInput, OnRetriesExhausted, Workflow, WorkflowError};
