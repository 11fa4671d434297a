//! A device run (`iot.onboard-device`) cancelled while its IoT creates are still inside the
//! cloud's visibility lag ends `compensated` with nothing left in moto, every time: the
//! compensation of a create must not conclude "it never existed" from not-found answers that
//! all fall inside the lag, nor fail for good when flapping reads say found, then not found.
//!
//! Each run goes through the fault proxy with a fixed IoT create lag of [`LAG_MS`] (reads and
//! uses of a new resource answer not-found meanwhile), in three variants: plain lag, flapping
//! reads (half the reads inside the lag are answered for real), and flapping reads with
//! deletes inside the lag answering not-found too. The cancel is sent as soon as the journal
//! holds the output of the last create (the policy); the test checks that it landed within
//! the lag of that create, then waits for the run to settle and reads moto directly.
//!
//! `KEEL_LAG_CANCEL_REPEATS` sets the runs per variant (default [`REPEATS_DEFAULT`]).

mod common;

use std::time::{Duration, Instant};

use common::env;
use keel_engine::{Entry, Event, OperationIndex, RunHistory, RunStatus, Step};
use keel_steps::aws::iot::{CreatePolicy, CreateThing, RegisterCertificate};
use keel_testkit::inventory::Inventory;
use keel_testkit::proxy::{Dist, LagRule, Rules};
use keel_workflows::iot::OnboardDevice;
use keel_workflows::sample::device;

/// How long a new IoT resource reads as missing through the proxy.
const LAG_MS: u64 = 3_000;

/// The cancel must be journaled at most this long after the last create's output, so the
/// compensation starts well inside that create's lag.
const CANCEL_WITHIN_MS: u64 = LAG_MS / 2;

/// How long one run may take to settle after the cancel (a fixed compensation waits until
/// not-found has outlasted the service's visibility lag before it concludes anything).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs per variant when `KEEL_LAG_CANCEL_REPEATS` is not set.
const REPEATS_DEFAULT: u32 = 3;

/// The device workflow's create steps, in the order it runs them.
const CREATE_KINDS: [&str; 3] = [
    CreateThing::KIND,
    RegisterCertificate::KIND,
    CreatePolicy::KIND,
];

/// One way the IoT lag behaves.
struct Variant {
    /// Names the runs and things (`<name>-<repetition>`).
    name: &'static str,
    /// Seeds the proxy (plus the repetition), so each repetition flaps differently.
    seed: u64,
    /// Chance that a read inside the lag is answered for real.
    flap_found_probability: f64,
    /// Whether deletes inside the lag answer not-found too.
    include_deletes: bool,
}

impl Variant {
    fn rules(&self, repetition: u32) -> Rules {
        Rules::seeded(self.seed + u64::from(repetition)).lag(LagRule {
            after_create: Some(Dist::fixed(LAG_MS)),
            flap_found_probability: self.flap_found_probability,
            include_deletes: self.include_deletes,
            ..LagRule::after_create("iot", LAG_MS)
        })
    }
}

/// Runs per variant: `KEEL_LAG_CANCEL_REPEATS`, or [`REPEATS_DEFAULT`].
fn repeats() -> u32 {
    match std::env::var("KEEL_LAG_CANCEL_REPEATS") {
        Err(_) => REPEATS_DEFAULT,
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => panic!("KEEL_LAG_CANCEL_REPEATS must be a positive integer, not {text:?}"),
        },
    }
}

/// Runs `variant` [`repeats`] times and fails with every bad run described.
async fn cancelled_in_lag_every_time(variant: Variant) {
    let started = Instant::now();
    let repeats = repeats();
    let mut failures = Vec::new();
    for repetition in 0..repeats {
        if let Err(failure) = cancel_one_run_in_lag(&variant, repetition).await {
            failures.push(failure);
        }
    }
    assert!(
        failures.is_empty(),
        "variant {}: {} of {repeats} runs cancelled in the IoT create lag were not undone \
         cleanly ({:.1} s):\n\n{}",
        variant.name,
        failures.len(),
        started.elapsed().as_secs_f64(),
        failures.join("\n\n")
    );
}

/// Starts a device run, cancels it inside its creates' lag, waits for it to settle and
/// checks status and moto. `Err` describes what went wrong.
async fn cancel_one_run_in_lag(variant: &Variant, repetition: u32) -> Result<(), String> {
    let env = env(variant.rules(repetition)).await;
    let id = format!("{}-{repetition}", variant.name);
    env.engine
        .start::<OnboardDevice>(&id, device(&id))
        .await
        .unwrap();
    // Cancel as soon as the last create's output is journaled (or the run stopped running
    // without getting there, which the scenario check below reports).
    keel_testkit::poll::until(&env.engine, &id, |h| {
        creates_journaled(h) || h.run.status != RunStatus::Running
    })
    .await;
    let cancel = env.engine.cancel(&id).await;
    let cancelled = env.engine.history(&id).await.unwrap();
    if let Err(error) = cancel {
        panic!(
            "run {id}: the cancel was refused ({error}), so the scenario did not happen:\n{}",
            journal_trail(&cancelled)
        );
    }
    check_cancel_inside_lag(&id, &cancelled);

    let settled = tokio::time::timeout(SETTLE_TIMEOUT, env.engine.wait(&id))
        .await
        .unwrap_or_else(|_| panic!("run {id} did not settle within {SETTLE_TIMEOUT:?}"))
        .unwrap_or_else(|error| panic!("waiting for run {id}: {error}"));
    let history = env.engine.history(&id).await.unwrap();
    let truth = Inventory::read(&env.direct)
        .await
        .expect("moto's inventory");
    env.engine.shutdown().await;

    if settled.status == RunStatus::Compensated && truth.is_empty() {
        return Ok(());
    }
    Err(format!(
        "run {id}: status {} (error: {})\nmoto still holds: {}\n{}",
        settled.status,
        settled.error.as_deref().unwrap_or("none"),
        leftovers(&truth),
        journal_trail(&history)
    ))
}

/// Whether every create step of the device workflow has its output in the journal.
fn creates_journaled(history: &RunHistory) -> bool {
    CREATE_KINDS
        .iter()
        .all(|kind| completed_at_ms(history, kind).is_some())
}

/// The step index the journal gives the step of `kind`.
fn step_of(history: &RunHistory, kind: &str) -> Option<OperationIndex> {
    history.entries.iter().find_map(|entry| match &entry.event {
        Event::StepStarted { step, kind: k, .. } if k == kind => Some(*step),
        _ => None,
    })
}

/// When the output of the step of `kind` was journaled.
fn completed_at_ms(history: &RunHistory, kind: &str) -> Option<u64> {
    let index = step_of(history, kind)?;
    history.entries.iter().find_map(|entry| match &entry.event {
        Event::StepCompleted { step, .. } if *step == index => Some(entry.at_ms),
        _ => None,
    })
}

fn cancel_at_ms(history: &RunHistory) -> Option<u64> {
    history
        .entries
        .iter()
        .find(|entry| matches!(entry.event, Event::CancelRequested))
        .map(|entry| entry.at_ms)
}

/// The scenario's precondition: every create's output was journaled before the cancel, and
/// the cancel came within [`CANCEL_WITHIN_MS`] of the last one, so the compensation runs
/// while the creates are still in their lag. A run that misses it tests nothing: panic.
fn check_cancel_inside_lag(id: &str, history: &RunHistory) {
    let cancel = cancel_at_ms(history).unwrap_or_else(|| {
        panic!(
            "run {id}: no cancel in the journal:\n{}",
            journal_trail(history)
        )
    });
    for kind in CREATE_KINDS {
        let completed = completed_at_ms(history, kind).unwrap_or_else(|| {
            panic!(
                "run {id}: {kind} had no output journaled before the cancel:\n{}",
                journal_trail(history)
            )
        });
        assert!(
            completed <= cancel,
            "run {id}: {kind}'s output was journaled after the cancel"
        );
    }
    let last = completed_at_ms(history, CreatePolicy::KIND).expect("checked above");
    assert!(
        cancel - last <= CANCEL_WITHIN_MS,
        "run {id}: the cancel came {} ms after the policy was created, not within \
         {CANCEL_WITHIN_MS} ms: the scenario did not happen inside the lag",
        cancel - last
    );
}

/// What moto holds, by name and ARN.
fn leftovers(truth: &Inventory) -> String {
    if truth.is_empty() {
        return "nothing".into();
    }
    let mut lines = vec![truth.summary()];
    for thing in &truth.things {
        lines.push(format!("  thing {} ({})", thing.name, thing.arn));
    }
    for certificate in &truth.certificates {
        lines.push(format!(
            "  certificate {} ({}, {})",
            certificate.id, certificate.status, certificate.arn
        ));
    }
    for policy in &truth.iot_policies {
        lines.push(format!(
            "  IoT policy {} (targets {:?})",
            policy.name, policy.targets
        ));
    }
    lines.join("\n")
}

/// For each create step: when its output was journaled and the ARN in it, and how its
/// compensation went, with times relative to the cancel.
fn journal_trail(history: &RunHistory) -> String {
    let base = cancel_at_ms(history).unwrap_or(history.run.created_at_ms);
    let at = |entry: &Entry| entry.at_ms as i64 - base as i64;
    let mut lines = vec!["journal (ms relative to the cancel):".to_string()];
    for kind in CREATE_KINDS {
        let Some(index) = step_of(history, kind) else {
            lines.push(format!("  {kind}: never started"));
            continue;
        };
        let about = || {
            history
                .entries
                .iter()
                .filter(move |e| e.event.step() == Some(index))
        };
        let output = about().find_map(|e| match &e.event {
            Event::StepCompleted { output, .. } => Some(format!(
                "output at {:+} ms, arn {}",
                at(e),
                output["arn"].as_str().unwrap_or("?")
            )),
            _ => None,
        });
        let undo_attempts: Vec<i64> = about()
            .filter(|e| matches!(e.event, Event::StepCompensationStarted { .. }))
            .map(at)
            .collect();
        let undo_end = about().find_map(|e| match &e.event {
            Event::StepCompensated { .. } => Some(format!("compensated at {:+} ms", at(e))),
            Event::RunCompensationFailed { error, .. } => {
                Some(format!("failed for good at {:+} ms: {error}", at(e)))
            }
            _ => None,
        });
        lines.push(format!(
            "  step {} {kind}: {}; undo attempts at {undo_attempts:?} ms; {}",
            index.0,
            output.as_deref().unwrap_or("no output"),
            undo_end.as_deref().unwrap_or("not undone")
        ));
    }
    lines.join("\n")
}

/// Cancelled while every read of its new resources answers not-found, a device run ends
/// `compensated` and leaves nothing in moto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_run_cancelled_in_the_create_lag_is_compensated_to_nothing() {
    cancelled_in_lag_every_time(Variant {
        name: "lag",
        seed: 100,
        flap_found_probability: 0.0,
        include_deletes: false,
    })
    .await;
}

/// Cancelled while reads of its new resources answer found or not-found at random, a device
/// run ends `compensated` (found, then not-found, is lag, not a permanent failure of the
/// compensation) and leaves nothing in moto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_run_cancelled_in_flapping_create_lag_is_compensated_to_nothing() {
    cancelled_in_lag_every_time(Variant {
        name: "flap",
        seed: 200,
        flap_found_probability: 0.5,
        include_deletes: false,
    })
    .await;
}

/// Cancelled while reads flap and deletes answer not-found too, a device run ends
/// `compensated` (a delete's not-found inside the lag does not mean the resource is gone)
/// and leaves nothing in moto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_run_cancelled_in_flapping_create_lag_with_lagging_deletes_is_compensated_to_nothing(
) {
    cancelled_in_lag_every_time(Variant {
        name: "flap-deletes",
        seed: 300,
        flap_found_probability: 0.5,
        include_deletes: true,
    })
    .await;
}
