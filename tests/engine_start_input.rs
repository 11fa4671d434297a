//! What a start takes: a malformed start request (input of the wrong shape, a field the input
//! type does not know, an unknown workflow, an invalid run id) is refused with a typed error
//! naming what is wrong and stores nothing; a workflow of unit input and output runs.

mod common;

use common::start::{fixture, open};
use keel::{Ctx, EngineError, Workflow, WorkflowError};
use serde::{Deserialize, Serialize};

/// `start_json` refuses a malformed input, an unknown workflow (listing the registered ones)
/// and an invalid run id, each with its typed error, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_json_refuses_bad_requests_and_stores_nothing() {
    let f = fixture();
    let engine = open(&f.data).await;
    let log = f.log.to_string_lossy().into_owned();

    let wrong_type = serde_json::json!({"steps": "three", "gate": null, "log": log});
    let err = engine
        .start_json("test.plain", "bad-1", wrong_type)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::MalformedInput { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.starts_with("malformed input for workflow \"test.plain\""),
        "{message}"
    );

    let missing = serde_json::json!({"gate": null, "log": log});
    let err = engine
        .start_json("test.plain", "bad-2", missing)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::MalformedInput { .. }), "{err}");
    assert!(err.to_string().contains("missing field `steps`"), "{err}");

    let err = engine
        .start_json("no.such-flow", "bad-3", serde_json::json!({}))
        .await
        .unwrap_err();
    match &err {
        EngineError::UnknownWorkflow { name, registered } => {
            assert_eq!(name, "no.such-flow");
            assert_eq!(registered, "test.effect-flow, test.plain");
        }
        other => panic!("expected UnknownWorkflow, got {other}"),
    }
    assert_eq!(
        err.to_string(),
        "unknown workflow \"no.such-flow\" (registered: test.effect-flow, test.plain)"
    );

    let good_input = serde_json::to_value(f.input(1)).unwrap();
    for bad_id in ["a b", "", "tab\there", "nul\u{0}byte"] {
        let err = engine
            .start_json("test.plain", bad_id, good_input.clone())
            .await
            .unwrap_err();
        match &err {
            EngineError::InvalidRunId { id, .. } => assert_eq!(id, bad_id),
            other => panic!("id {bad_id:?}: expected InvalidRunId, got {other}"),
        }
    }
    let err = engine
        .start_json("test.plain", &"x".repeat(129), good_input.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::InvalidRunId { .. }), "{err}");

    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");
    assert!(f.effects().is_empty(), "nothing ran");
    engine.shutdown().await;
    drop(engine);
    let engine = open(&f.data).await;
    assert!(
        engine.list().await.unwrap().is_empty(),
        "nothing stored, after a reopen either"
    );
    engine.shutdown().await;
}

/// The error for an input field of the wrong type names that field, so the caller can tell
/// which part of a large input to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_error_names_the_bad_field() {
    let f = fixture();
    let engine = open(&f.data).await;
    let log = f.log.to_string_lossy().into_owned();
    let wrong_type = serde_json::json!({"steps": "three", "gate": null, "log": log});
    let err = engine
        .start_json("test.plain", "bad-field", wrong_type)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::MalformedInput { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("steps"),
        "the message names the field of the wrong type: {message}"
    );
    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");
    engine.shutdown().await;
}

/// Input of [`StrictFlow`]: unknown fields are refused, here and in the nested role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictInput {
    role: StrictRole,
    #[serde(default)]
    note: Option<String>,
}

/// The nested part of [`StrictInput`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictRole {
    name: String,
    #[serde(default)]
    managed_policy_arns: Vec<String>,
}

/// A workflow whose input refuses unknown fields; it does nothing.
struct StrictFlow;

impl Workflow for StrictFlow {
    const NAME: &'static str = "test.strict";
    type Input = StrictInput;
    type Output = ();

    async fn run(_ctx: &mut Ctx, _input: StrictInput) -> Result<(), WorkflowError> {
        Ok(())
    }
}

/// A field the input type does not know (a typo of a real one, nested or at the top) is
/// refused by `start_json` as `InvalidInput` naming its path and the fields expected there,
/// in one line, and nothing is stored; a field of the wrong type is still `MalformedInput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_input_fields_are_refused_naming_their_path() {
    let f = fixture();
    let engine = keel_testkit::open_engine(|| {
        keel_testkit::store::builder(&f.data).workflow::<StrictFlow>()
    })
    .await;
    let typo = serde_json::json!({"role": {"name": "r", "managed_policy_arn": ["arn"]}});
    let err = engine
        .start_json("test.strict", "typo", typo)
        .await
        .unwrap_err();
    match &err {
        EngineError::InvalidInput { field, reason, .. } => {
            assert_eq!(field, "role.managed_policy_arn");
            assert_eq!(
                reason,
                "unknown field (expected `name` or `managed_policy_arns`)"
            );
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "invalid input for workflow \"test.strict\": field role.managed_policy_arn: unknown \
         field (expected `name` or `managed_policy_arns`)"
    );
    let top = serde_json::json!({"role": {"name": "r"}, "colour": "red"});
    let err = engine
        .start_json("test.strict", "top", top)
        .await
        .unwrap_err();
    match &err {
        EngineError::InvalidInput { field, reason, .. } => {
            assert_eq!(field, "colour");
            assert_eq!(reason, "unknown field (expected `role` or `note`)");
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let wrong_type = serde_json::json!({"role": {"name": 7}});
    let err = engine
        .start_json("test.strict", "wrong", wrong_type)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::MalformedInput { .. }), "{err}");
    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");

    let known = serde_json::json!({"role": {"name": "r", "managed_policy_arns": ["arn"]}});
    let record = engine.start_json("test.strict", "ok", known).await.unwrap();
    assert_eq!(record.input["role"]["managed_policy_arns"][0], "arn");
    engine.shutdown().await;
}

/// A workflow with no steps and a unit output.
struct UnitFlow;

impl keel::Workflow for UnitFlow {
    const NAME: &'static str = "test.unit";
    type Input = ();
    type Output = ();
    async fn run(_ctx: &mut keel::Ctx, _input: ()) -> Result<(), keel::WorkflowError> {
        Ok(())
    }
}

/// A run whose output is `()` (stored as JSON null, which reads back as an absent output)
/// completes and its result can be awaited.
#[tokio::test]
async fn unit_output_completes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = keel_testkit::store::builder(dir.path())
        .workflow::<UnitFlow>()
        .open()
        .await
        .unwrap();
    engine
        .start::<UnitFlow>("unit", ())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(
        engine.status("unit").await.unwrap().status,
        keel::RunStatus::Completed
    );
    engine.shutdown().await;
}
