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
//! use keel_engine::{Compensation, Ctx, EffectOptions, Engine, Probe, Step, StepContext};
//! use keel_engine::{StepError, WaitPolicy, Workflow, WorkflowError};
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
//!     async fn compensate(&self, _ctx: &StepContext, _output: Option<String>) -> Result<Compensation, StepError> {
//!         Ok(Compensation::Done)
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
//!     async fn run(ctx: &mut Ctx, items: u64) -> Result<Vec<String>, WorkflowError> {
//!         // A lookup with nothing to undo is an effect: journaled, retried and replayed like
//!         // a step, with no type and nothing registered. The argument is journaled too.
//!         let options = EffectOptions::DEFAULT.argument(serde_json::json!({ "items": items }));
//!         let amount: u64 = ctx
//!             .effect("doc.price", options, |_sctx| async move { Ok::<_, StepError>(items * 7) })
//!             .await?;
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
//! ## Child runs, fan-outs, and testing with the test clock
//!
//! A workflow starts another workflow as a child run with [`Ctx::child`] (awaited; the
//! child has its own journal and saga, and is compensated with its parent), or many at once
//! with [`Ctx::children`]; [`Ctx::join`] runs steps concurrently, a bounded number at a time.
//! Each branch's result comes back in order, so the body decides what a failure means. A test
//! opens the engine on a [`testing::TestClock`], which moves only when the test moves it:
//! here a day's sleep in each child passes at once.
//!
//! ```
//! use std::time::Duration;
//! use keel_engine::testing::TestClock;
//! use keel_engine::{Ctx, Engine, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError};
//! use serde::{Deserialize, Serialize};
//!
//! /// Registers one device (pretend); a device has nothing to undo here.
//! #[derive(Serialize, Deserialize)]
//! struct Register {
//!     device: String,
//! }
//!
//! impl Step for Register {
//!     const KIND: &'static str = "doc.register";
//!     const COMPENSABLE: bool = false;
//!     type Output = String;
//!     async fn execute(&self, ctx: &StepContext) -> Result<String, StepError> {
//!         Ok(format!("{}@{}", self.device, ctx.key()))
//!     }
//! }
//!
//! /// One device: register it, then let it settle for a day.
//! struct Device;
//!
//! impl Workflow for Device {
//!     const NAME: &'static str = "doc.device";
//!     type Input = String;
//!     type Output = String;
//!     async fn run(ctx: &mut Ctx, device: String) -> Result<String, WorkflowError> {
//!         let registered = ctx.step(Register { device }).await?;
//!         ctx.sleep(Duration::from_secs(24 * 3600)).await?;
//!         Ok(registered)
//!     }
//! }
//!
//! /// A fleet: one child run per device, two at a time, then a final check of them all.
//! struct Fleet;
//!
//! impl Workflow for Fleet {
//!     const NAME: &'static str = "doc.fleet";
//!     type Input = Vec<String>;
//!     type Output = usize;
//!     async fn run(ctx: &mut Ctx, devices: Vec<String>) -> Result<usize, WorkflowError> {
//!         let mut done = Vec::new();
//!         for result in ctx.children::<Device>(devices, 2).await? {
//!             done.push(result?);
//!         }
//!         let checks = done.iter().map(|d| Register { device: format!("check-{d}") });
//!         let checked = ctx.join(checks.collect(), 4).await?;
//!         Ok(checked.into_iter().filter(Result::is_ok).count())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let clock = TestClock::new();
//! let engine = Engine::builder(dir.path())
//!     .clock(clock.clone())
//!     .workflow::<Fleet>()
//!     .workflow::<Device>()
//!     .open()
//!     .await?;
//! let devices = vec!["a".to_string(), "b".to_string(), "c".to_string()];
//! engine.start::<Fleet>("fleet-1", devices).await?;
//! // Moves the clock to each wake time as soon as everything sleeps: days pass at once.
//! let record = clock.skip_until_settled(&engine, "fleet-1").await?;
//! assert_eq!(record.status, RunStatus::Completed);
//! assert_eq!(record.output, Some(serde_json::json!(3)));
//! // Each child is a run of its own, under an id derived from its parent's.
//! let children = engine.list().await?.into_iter().filter(|r| r.parent.is_some()).count();
//! assert_eq!(children, 3);
//! engine.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Talking to a run
//! A run can wait for events from outside and publish values for outside readers.
//! [`Engine::send`] puts an event (a name, the sender's event id as its idempotency key, a
//! payload) durably in the run's mailbox; [`Ctx::receive`], [`Ctx::receive_until`] and
//! [`Ctx::receive_event`] take the earliest pending event of a name, each event once, in the
//! order they arrived, and replay takes the same one again. [`Ctx::publish`] records a value
//! (the last one per name wins) that [`Engine::published`] reads and
//! [`Engine::published_wait`] waits for.
//!
//! ```
//! use std::time::Duration;
//! use keel_engine::{Ctx, Engine, RunStatus, Workflow, WorkflowError};
//!
//! /// Waits up to an hour for an approval of `size` devices.
//! struct Approval;
//!
//! impl Workflow for Approval {
//!     const NAME: &'static str = "doc.approval";
//!     type Input = u32;
//!     type Output = String;
//!     async fn run(ctx: &mut Ctx, size: u32) -> Result<String, WorkflowError> {
//!         ctx.publish("status", &format!("{size} devices await approval")).await?;
//!         let by: String = ctx.receive_until("approve", Duration::from_secs(3600)).await?;
//!         ctx.publish("status", &"approved").await?;
//!         Ok(by)
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> keel_engine::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! let engine = Engine::builder(dir.path()).workflow::<Approval>().open().await?;
//! engine.start::<Approval>("fleet-9", 250).await?;
//! // Durable when it returns; the same event id again is the same event.
//! engine.send("fleet-9", "approve", "operator-7", "ticket-4711").await?;
//! assert!(engine.send("fleet-9", "approve", "operator-7", "ticket-4711").await?.duplicate);
//! let record = engine.wait("fleet-9").await?;
//! assert_eq!(record.status, RunStatus::Completed);
//! let status = engine.published("fleet-9", "status").await?.expect("published");
//! assert_eq!(status.value, serde_json::json!("approved"));
//! engine.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Where things are
//! The public surface is the names re-exported here, [`testing`] (the test clock) and
//! [`limits`] (every hard limit). The engine's internals, described in
//! `docs/ARCHITECTURE.md`, are private:
//! - `journal/`: what is stored (run records and journal entries; [`Entry`], [`Event`],
//!   [`RunRecord`] are re-exported).
//! - `replay/`: the pure fold of a journal into a run's state, and the decisions taken on it.
//! - Every journal write goes through the run's cell (`cell.rs`, under its lock): the lane
//!   (`lane.rs`) writes what the body's operations do, the saga (`saga.rs`) what compensation
//!   does, and `engine/operator.rs` what operators ask; `executor` drives a run through them.
//! - `store/`: the storage trait and its sled implementation, with group commit and the
//!   high-water mark.
//!
//! The workspace's own tests and benchmarks reach some internals (the replay fold, the
//! store's raw keys) through `test_utilities`, behind the `test-utilities` feature: it is not
//! API and carries no stability promise. `crash` (named crash points, compiled to nothing
//! without the `crash-points` feature) is public only for the workspace's step library and
//! crash tests, and hidden from these docs.
//!
//! Durability, the commit protocol and what a crash at each point leaves behind are described
//! in `docs/guarantees.md`.

mod cell;
mod child;
mod clock;
mod contain;
#[doc(hidden)]
pub mod crash;
mod ctx;
mod effect;
mod engine;
mod env;
mod error;
mod executor;
mod ids;
mod interrupt;
mod journal;
mod lane;
mod limiter;
pub mod limits;
mod notice;
mod parallel;
mod poison;
mod registry;
mod replay;
mod requests;
mod resources;
mod retry;
mod run_slot;
mod saga;
mod schedule;
mod stats;
mod step;
mod store;
pub mod testing;
mod transition;
mod types_used;
mod wait;
mod workflow;

pub use child::FanOutProgress;
pub use clock::Clock;
pub use ctx::{Created, Ctx, Received};
pub use engine::{
    Batch, BatchAction, BatchOutcome, BatchReport, BatchRun, CreatedSchedule, Delivered, Engine,
    EngineBuilder, EventIn, Rerun, Resident, RunFilter, RunHandle, RunsPage, RunsQuery,
    BATCH_RUNS_MAX, GC_RUNS_PER_WRITE, LIST_SCAN_RECORDS_MAX, PARK_AFTER_DEFAULT,
    RETENTION_DEFAULT, RUNS_PAGE_MAX,
};
pub use error::{EngineError, Result};
pub use ids::child_id;
#[allow(deprecated)]
pub use ids::StepIndex;
pub use ids::{Attempt, IdempotencyKey, JournalIndex, OperationIndex, RunId};
pub use journal::{
    Entry, ErrorClass, ErrorRecord, Event, Published, RunHistory, RunRecord, RunStatus,
    WaitOutcome, WaitPolls, WaitSchedule,
};
pub use limiter::{
    Permit, Priority, RateLimit, RateLimiter, PROBES_IN_A_ROW_MAX, SLOW_START_EXIT_SHARE,
};
pub use notice::Notice;
pub use registry::StepType;
pub use retry::RetryPolicy;
pub use schedule::{CatchUp, Every, Overlap, Schedule, ScheduleSpec};
pub use stats::{Bucket, Counters, OperationStats, Outlier, DISTRIBUTION_FIRST_US};
pub use step::{Compensation, EffectOptions, Step, StepContext, StepError};
pub use store::{Durability, Leases};
pub use wait::{LearnedDeadline, Probe, WaitPolicy, LEARN_AFTER_DEFAULT};
pub use workflow::{InvalidInput, OnRetriesExhausted, Workflow, WorkflowError};

/// Internals the workspace's own tests and benchmarks look into (feature `test-utilities`):
/// not API, no stability promise.
#[cfg(feature = "test-utilities")]
pub mod test_utilities {
    /// The pure fold of a journal into a run's state.
    pub mod replay {
        pub use crate::replay::*;
    }
    pub use crate::journal::digest;
    pub use crate::stats::LatencyStats;
    pub use crate::store::sled::raw;
}
