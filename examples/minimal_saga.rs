//! A minimal saga: three steps, each with a compensation. One run completes; another fails at
//! its third step and is compensated, newest first. Run it twice: the second time both runs
//! are found in the journal and returned as they finished, without running a step again.
//!
//! ```text
//! cargo run --example minimal_saga -- [DATA_DIR]
//! ```

// An example prints its results: that is what a reader runs it for.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use anyhow::Context;
use keel::{
    Compensation, Ctx, Engine, Event, RetryPolicy, Step, StepContext, StepError, Workflow,
    WorkflowError,
};
use serde::{Deserialize, Serialize};

/// Books one leg of a trip; undone by cancelling the booking.
#[derive(Serialize, Deserialize)]
struct Book {
    what: String,
    /// Refuse permanently, to show compensation.
    refuse: bool,
}

impl Step for Book {
    const KIND: &'static str = "trip.book";
    type Output = String;
    const RETRY_POLICY: RetryPolicy = RetryPolicy::DEFAULT
        .with_attempts_max(3)
        .with_backoff(Duration::from_millis(50), Duration::from_secs(1));

    async fn execute(&self, ctx: &StepContext) -> Result<String, StepError> {
        if self.refuse {
            return Err(StepError::permanent(format!("no {} available", self.what)));
        }
        // A real step sends ctx.key() as the API's client token.
        tracing::info!(what = %self.what, key = %ctx.key(), "booked");
        Ok(format!("{}-{}", self.what, &ctx.key().to_string()[..8]))
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        booking: Option<String>,
    ) -> Result<Compensation, StepError> {
        tracing::info!(what = %self.what, key = %ctx.key(), ?booking, "booking cancelled");
        Ok(Compensation::Done)
    }
}

#[derive(Serialize, Deserialize)]
struct Trip {
    traveller: String,
    fail_hotel: bool,
}

struct BookTrip;

impl Workflow for BookTrip {
    const NAME: &'static str = "example.book-trip";
    type Input = Trip;
    type Output = Vec<String>;

    async fn run(ctx: &mut Ctx, trip: Trip) -> Result<Vec<String>, WorkflowError> {
        let flight = ctx
            .step(Book {
                what: "flight".into(),
                refuse: false,
            })
            .await?;
        let car = ctx
            .step(Book {
                what: "car".into(),
                refuse: false,
            })
            .await?;
        let hotel = ctx
            .step(Book {
                what: "hotel".into(),
                refuse: trip.fail_hotel,
            })
            .await?;
        Ok(vec![trip.traveller, flight, car, hotel])
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::stderr)
        .init();
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "./keel-data/minimal-saga".into());
    let engine = Engine::builder(&dir)
        .workflow::<BookTrip>()
        .step::<Book>()
        .open()
        .await
        .context("opening engine")?;

    let ok = engine
        .start::<BookTrip>(
            "trip-ada",
            Trip {
                traveller: "ada".into(),
                fail_hotel: false,
            },
        )
        .await?;
    println!("trip-ada: {:?}", ok.result().await?);

    let failing = engine
        .start::<BookTrip>(
            "trip-bob",
            Trip {
                traveller: "bob".into(),
                fail_hotel: true,
            },
        )
        .await?;
    match failing.result().await {
        Ok(v) => println!("trip-bob unexpectedly completed: {v:?}"),
        Err(e) => println!("trip-bob: {e}"),
    }
    println!("journal of trip-bob:");
    for entry in engine.history("trip-bob").await?.entries {
        let line = match &entry.event {
            Event::StepStarted {
                step,
                kind,
                attempt,
                ..
            } => format!("{step} {kind} started (attempt {attempt})"),
            Event::StepCompleted { step, .. } => format!("{step} completed"),
            Event::StepFailed { step, error, .. } => format!("{step} failed: {}", error.message),
            Event::StepCompensationStarted { step, .. } => format!("{step} compensation started"),
            Event::StepCompensated { step } => format!("{step} compensated"),
            other => format!("{other:?}"),
        };
        println!("  {line}");
    }
    println!("data directory: {dir} (run again: both trips are answered from the journal)");
    engine.shutdown().await;
    Ok(())
}
