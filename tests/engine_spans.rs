//! The engine's spans, which the worker exports as traces (`--otlp-endpoint`): a run's
//! every operation is one span under the run's (step, wait, timer, fork, child, receive,
//! compensation), a step's every attempt one span under the step's, a fork's branches under
//! the fork's, and a child run a trace of its own. Recorded by a subscriber layer of the
//! test's, so that every kind of operation is checked, not only those the worker's
//! workflows take (tests/otlp.rs in keel-worker checks the export itself).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::{
    Compensation, Ctx, Engine, RetryPolicy, RunStatus, Step, StepContext, StepError, Workflow,
    WorkflowError,
};
use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// One span as opened: its name, its fields, and its parent's id.
#[derive(Clone, Debug)]
struct Opened {
    id: u64,
    name: String,
    fields: BTreeMap<String, String>,
    parent: Option<u64>,
}

/// Keeps every span opened, in order.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Opened>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let parent = ctx
            .span(id)
            .and_then(|s| s.parent())
            .map(|p| p.id().into_u64());
        self.0.lock().unwrap().push(Opened {
            id: id.into_u64(),
            name: attrs.metadata().name().into(),
            fields,
            parent,
        });
    }
}

/// A step that fails its first attempt (retryably) and undoes itself.
#[derive(Serialize, Deserialize)]
struct Flaky(u32);

impl Step for Flaky {
    const KIND: &'static str = "spans.flaky";
    type Output = ();
    const RETRY_POLICY: RetryPolicy = RetryPolicy {
        backoff_initial: Duration::from_millis(5),
        backoff_max: Duration::from_millis(5),
        attempts_max: 3,
        elapsed_max: None,
    };
    async fn execute(&self, ctx: &StepContext) -> Result<(), StepError> {
        if self.0 == 0 && ctx.attempt().0 == 1 {
            return Err(StepError::retryable("the first attempt fails"));
        }
        Ok(())
    }
    async fn compensate(
        &self,
        _ctx: &StepContext,
        _output: Option<()>,
    ) -> Result<Compensation, StepError> {
        Ok(Compensation::Done)
    }
}

/// A child run: one step.
struct Leaf;

impl Workflow for Leaf {
    const NAME: &'static str = "spans.leaf";
    type Input = u32;
    type Output = ();
    async fn run(ctx: &mut Ctx, n: u32) -> Result<(), WorkflowError> {
        ctx.step(Flaky(100 + n)).await
    }
}

/// Every kind of operation, then a failure: the completed steps are compensated.
struct Everything;

impl Workflow for Everything {
    const NAME: &'static str = "spans.everything";
    type Input = ();
    type Output = ();
    async fn run(ctx: &mut Ctx, _: ()) -> Result<(), WorkflowError> {
        ctx.step(Flaky(0)).await?;
        ctx.sleep(Duration::from_millis(10)).await?;
        for branch in ctx.join(vec![Flaky(1), Flaky(2)], 2).await? {
            branch?;
        }
        ctx.child::<Leaf>(1).await?;
        for child in ctx.children::<Leaf>(vec![2, 3], 2).await? {
            child?;
        }
        ctx.receive::<u32>("go").await?;
        Err(WorkflowError::failed("the end: undo it all"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_and_attempt_is_a_span_under_its_run() {
    let recorder = Recorder::default();
    // The only test of this binary: the subscriber is the process's, so that every runtime
    // thread's spans reach it.
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(recorder.clone()))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The run stays loaded at its receive (it never parks): one driver, one `run` span. (A
    // run that parks gets a `run` span per load, each a root.)
    let engine = keel_testkit::store::builder(dir.path().join("data"))
        .park_after(None)
        .workflow::<Everything>()
        .workflow::<Leaf>()
        .step::<Flaky>()
        .open()
        .await
        .unwrap();
    let run = engine.start::<Everything>("traced", ()).await.unwrap();
    wait_for_receive(&engine).await;
    engine.send("traced", "go", &1, "go-1").await.unwrap();
    let end = engine.wait(run.id().as_str()).await.unwrap();
    assert_eq!(end.status, RunStatus::Compensated, "{:?}", end.error);
    engine.shutdown().await;

    let spans = recorder.0.lock().unwrap().clone();
    let by_id: BTreeMap<u64, &Opened> = spans.iter().map(|s| (s.id, s)).collect();
    let parent_name = |s: &Opened| s.parent.and_then(|p| by_id.get(&p)).map(|p| p.name.clone());
    let of_run = |id: &str| -> Vec<&Opened> {
        spans
            .iter()
            .filter(|s| s.fields.get("run_id").map(String::as_str) == Some(id))
            .collect()
    };
    let names: Vec<String> = of_run("traced")
        .iter()
        .map(|s| format!("{}<{}", s.name, parent_name(s).unwrap_or_default()))
        .collect();

    // The run's span is a root, once.
    let runs: Vec<_> = of_run("traced")
        .into_iter()
        .filter(|s| s.name == "run")
        .collect();
    assert_eq!(runs.len(), 1, "{names:?}");
    assert_eq!(runs[0].parent, None, "the run span is a trace's root");
    let run_span = runs[0].id;

    // Each operation once, directly under the run's span, with its operation number.
    let under_run = |name: &str| -> Vec<&Opened> {
        of_run("traced")
            .into_iter()
            .filter(|s| s.name == name && s.parent == Some(run_span))
            .collect()
    };
    let step_numbers = |spans: &[&Opened]| -> Vec<String> {
        spans.iter().map(|s| s.fields["step"].clone()).collect()
    };
    // Operation numbers: 0 the flaky step, 1 the timer, 2 the join (branches 3, 4), 5 the
    // child, 6 the children's fork (branches 7, 8), 9 the receive.
    assert_eq!(step_numbers(&under_run("step")), ["0"], "{names:?}");
    assert_eq!(step_numbers(&under_run("timer")), ["1"], "{names:?}");
    assert_eq!(step_numbers(&under_run("fork")), ["2", "6"], "{names:?}");
    assert_eq!(step_numbers(&under_run("child")), ["5"], "{names:?}");
    assert_eq!(step_numbers(&under_run("receive")), ["9"], "{names:?}");

    // The forks' branches are under their fork: two steps under the join, two children
    // under the children's fork.
    let forks = under_run("fork");
    for (fork, branch, numbers) in [
        (forks[0], "step", ["3", "4"]),
        (forks[1], "child", ["7", "8"]),
    ] {
        let mut under: Vec<String> = of_run("traced")
            .iter()
            .filter(|s| s.name == branch && s.parent == Some(fork.id))
            .map(|s| s.fields["step"].clone())
            .collect();
        under.sort();
        assert_eq!(
            under, numbers,
            "{branch} branches of fork {}: {names:?}",
            fork.fields["step"]
        );
    }

    // The flaky step's two attempts under its step span, with the step's idempotency key.
    let step0 = under_run("step")[0];
    let attempts: Vec<&Opened> = spans
        .iter()
        .filter(|s| s.name == "attempt" && s.parent == Some(step0.id))
        .collect();
    let numbers: Vec<&str> = attempts
        .iter()
        .map(|s| s.fields["attempt"].as_str())
        .collect();
    assert_eq!(numbers, ["1", "2"], "{names:?}");
    for attempt in &attempts {
        assert_eq!(
            attempt.fields["idempotency_key"],
            step0.fields["idempotency_key"]
        );
    }

    // Compensation: one span per completed step undone (0, 3, 4; the children undo their
    // own), each under the run's span.
    let mut undone = step_numbers(&under_run("compensation"));
    undone.sort();
    assert_eq!(undone, ["0", "3", "4"], "{names:?}");

    // Each child run is a trace of its own, with its step under it.
    for child in ["traced/5", "traced/7", "traced/8"] {
        let spans = of_run(child);
        let run = spans.iter().find(|s| s.name == "run").unwrap_or_else(|| {
            panic!("no run span for child {child}: {names:?}");
        });
        assert_eq!(run.parent, None, "child {child}'s run span is a root");
        assert!(
            spans
                .iter()
                .any(|s| s.name == "step" && s.parent == Some(run.id)),
            "child {child}'s step under its run span"
        );
    }
}

/// Waits until the run waits for its event.
async fn wait_for_receive(engine: &Engine) {
    for _ in 0..2_000 {
        let history = engine.history("traced").await.unwrap();
        let waiting = history
            .entries
            .iter()
            .any(|e| matches!(e.event, keel::Event::ReceiveStarted { .. }));
        if waiting {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the run never reached its receive");
}
