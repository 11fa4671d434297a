//! Testing workflows: a clock the test moves, so timers, retry backoffs and wait deadlines of
//! hours or days are tested in milliseconds, deterministically.
//!
//! Open the engine with a [`TestClock`]; every journaled time comes from it and every timer
//! sleeps on it. [`TestClock::skip_until_settled`] waits for a run and moves the clock to each
//! wake time as soon as anything sleeps (time skipping), so a run that sleeps three days
//! finishes at once, its journal saying three days passed:
//!
//! ```
//! use std::time::Duration;
//! use keel_engine::testing::TestClock;
//! use keel_engine::{Ctx, Engine, RunStatus, Workflow, WorkflowError};
//!
//! /// Waits three days, then says how long it waited.
//! struct Reminder;
//!
//! impl Workflow for Reminder {
//!     const NAME: &'static str = "doc.reminder";
//!     type Input = ();
//!     type Output = u64;
//!     async fn run(ctx: &mut Ctx, _: ()) -> Result<u64, WorkflowError> {
//!         ctx.sleep(Duration::from_secs(3 * 24 * 3600)).await?;
//!         Ok(3)
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let clock = TestClock::new();
//! let engine = Engine::builder(dir.path()).clock(clock.clone()).workflow::<Reminder>().open().await?;
//! engine.start::<Reminder>("remind-ada", ()).await?;
//! let record = clock.skip_until_settled(&engine, "remind-ada").await?;
//! assert_eq!(record.status, RunStatus::Completed);
//! assert_eq!(clock.now_ms() - TestClock::START_MS, 3 * 24 * 3600 * 1000);
//! engine.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! For finer control, [`TestClock::next_wake`] waits until something sleeps and tells when it
//! wakes, and [`TestClock::advance`] moves the time by hand (say, to just before a deadline).

pub use crate::clock::TestClock;
