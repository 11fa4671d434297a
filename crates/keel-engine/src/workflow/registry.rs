//! Registered workflow types, with their types erased so that the executor can run a
//! workflow by name, and their inputs checked and stored in one form.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use serde_json::Value;

use crate::contain::{contained, contained_sync};
use crate::ctx::Ctx;
use crate::error::{EngineError, Result};
use crate::registry::{check_same, BoxFuture};
use crate::workflow::{InvalidInput, OnRetriesExhausted, Workflow, WorkflowError};

/// Why an erased workflow body produced no output value.
pub(crate) enum BodyError {
    /// The workflow returned an error.
    Workflow(WorkflowError),
    /// The stored input does not decode as the workflow's input type (the code changed).
    Input(serde_json::Error),
    /// The output does not serialise.
    Output(serde_json::Error),
    /// The body (or the decoding of its input, or the encoding of its output) panicked,
    /// with this message.
    Panicked(String),
}

/// Why an input does not decode as a workflow's input type, and where.
pub(crate) struct InputError {
    pub(crate) field: String,
    pub(crate) source: serde_json::Error,
}

impl InputError {
    /// The engine's error for this input of `workflow`. A field the input type does not know
    /// (`#[serde(deny_unknown_fields)]`) is [`EngineError::InvalidInput`], like a value the
    /// workflow's checks refuse: the JSON is well formed, but it asks for something the
    /// workflow does not do (a typo of a real field would otherwise be dropped in silence).
    /// Anything else is [`EngineError::MalformedInput`].
    pub(crate) fn into_engine_error(self, workflow: &str) -> EngineError {
        match unknown_field_reason(&self.source.to_string()) {
            Some(reason) => EngineError::InvalidInput {
                workflow: workflow.into(),
                field: self.field,
                reason,
            },
            None => EngineError::MalformedInput {
                workflow: workflow.into(),
                field: self.field,
                source: self.source,
            },
        }
    }
}

/// serde's message for an unknown field (``unknown field `x`, expected one of `a`, `b` `` or
/// ``unknown field `x`, there are no fields``) as a reason beside the field's path, which
/// names `x` already: ``unknown field (expected one of `a`, `b`)``. serde_json's errors have
/// no finer kind than "data", so the message is what tells them apart.
fn unknown_field_reason(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    if rest.ends_with("`, there are no fields") {
        return Some("unknown field (there are no fields)".into());
    }
    let at = rest.find("`, expected ")?;
    Some(format!("unknown field ({})", &rest[at + "`, ".len()..]))
}

/// `path` with control characters escaped, so that an error naming a field keeps to one line
/// whatever keys the caller's JSON holds.
fn one_line(path: String) -> String {
    if !path.chars().any(char::is_control) {
        return path;
    }
    path.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

type RunFn = dyn Fn(Ctx, Value) -> BoxFuture<(Ctx, Result<Value, BodyError>)> + Send + Sync;
type NormaliseFn = dyn Fn(&Value) -> Result<Value, InputError> + Send + Sync;
type ValidateFn = dyn Fn(&Value) -> std::result::Result<(), InvalidInput> + Send + Sync;

pub(crate) struct WorkflowEntry {
    type_id: TypeId,
    pub(crate) version: u32,
    pub(crate) on_retries_exhausted: OnRetriesExhausted,
    /// The workflow's own retention of finished runs, if it has one.
    pub(crate) retention: Option<std::time::Duration>,
    pub(crate) run: Box<RunFn>,
    /// Decodes an input as the workflow's input type and encodes it again, so the stored
    /// input is the same whether it came as JSON or as a typed value.
    pub(crate) normalise_input: Box<NormaliseFn>,
    /// Runs the workflow's own input checks on a stored-form input.
    pub(crate) validate: Box<ValidateFn>,
}

/// Workflow types by name.
#[derive(Default)]
pub(crate) struct Workflows {
    entries: RwLock<HashMap<&'static str, Arc<WorkflowEntry>>>,
}

impl Workflows {
    /// Registers `W`; a second type under the same name is refused (a run's name must
    /// lead to exactly one body).
    pub(crate) fn add<W: Workflow>(&self) -> Result<()> {
        if let Some(existing) = self.entries.read().expect("registry lock").get(W::NAME) {
            return check_same::<W>(existing.type_id, || EngineError::DuplicateWorkflow {
                name: W::NAME.into(),
            });
        }
        let entry = WorkflowEntry {
            type_id: TypeId::of::<W>(),
            version: W::VERSION,
            on_retries_exhausted: W::ON_RETRIES_EXHAUSTED,
            retention: W::RETENTION,
            run: Box::new(run_body::<W>),
            validate: Box::new(validate_input::<W>),
            normalise_input: Box::new(normalise_input::<W>),
        };
        let mut workflows = self.entries.write().expect("registry lock");
        let entry = workflows.entry(W::NAME).or_insert_with(|| Arc::new(entry));
        check_same::<W>(entry.type_id, || EngineError::DuplicateWorkflow {
            name: W::NAME.into(),
        })
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<WorkflowEntry>> {
        self.entries
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    pub(crate) fn names(&self) -> String {
        self.name_list().join(", ")
    }

    /// Every registered workflow's name, sorted.
    pub(crate) fn name_list(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .entries
            .read()
            .expect("registry lock")
            .keys()
            .map(|name| name.to_string())
            .collect();
        names.sort_unstable();
        names
    }
}

/// Runs `W`'s body on a stored input: decodes the input, runs the body, encodes the output,
/// any of which may panic (contained). The body borrows `ctx`, so a panic leaves `ctx` (and
/// the interrupt it may hold) to the executor.
fn run_body<W: Workflow>(mut ctx: Ctx, input: Value) -> BoxFuture<(Ctx, Result<Value, BodyError>)> {
    Box::pin(async move {
        let body = async {
            match serde_json::from_value::<W::Input>(input) {
                Err(e) => Err(BodyError::Input(e)),
                Ok(input) => match W::run(&mut ctx, input).await {
                    Ok(output) => serde_json::to_value(output).map_err(BodyError::Output),
                    Err(e) => Err(BodyError::Workflow(e)),
                },
            }
        };
        let result = contained(body)
            .await
            .unwrap_or_else(|panic| Err(BodyError::Panicked(panic)));
        (ctx, result)
    })
}

/// Runs `W`'s own input checks on a stored-form input; a panicking check refuses it.
fn validate_input<W: Workflow>(input: &Value) -> std::result::Result<(), InvalidInput> {
    let checked = contained_sync(|| match W::Input::deserialize(input) {
        Ok(typed) => W::validate(&typed),
        Err(e) => Err(InvalidInput::new("(the input itself)", e.to_string())),
    });
    checked.unwrap_or_else(|panic| {
        Err(InvalidInput::new(
            "(the input itself)",
            format!("the workflow's validate panicked: {panic}"),
        ))
    })
}

/// Decodes an input as `W`'s input type, naming the field that does not, and encodes it
/// again (the stored form).
fn normalise_input<W: Workflow>(input: &Value) -> std::result::Result<Value, InputError> {
    let normalised = contained_sync(|| {
        let typed: W::Input = serde_path_to_error::deserialize(input).map_err(|e| InputError {
            field: match e.path().to_string() {
                path if path == "." => "(the input itself)".to_string(),
                path => one_line(path),
            },
            source: e.into_inner(),
        })?;
        serde_json::to_value(typed).map_err(|source| InputError {
            field: "(re-encoding)".into(),
            source,
        })
    });
    normalised.unwrap_or_else(|panic| {
        Err(InputError {
            field: "(the input itself)".into(),
            source: serde::de::Error::custom(format!("decoding panicked: {panic}")),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        name: String,
    }

    #[derive(Debug, serde::Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        inner: Inner,
        #[serde(default)]
        count: u32,
        #[serde(default)]
        tags: Vec<String>,
    }

    #[derive(Debug, serde::Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Nothing {}

    struct Strict;

    impl Workflow for Strict {
        const NAME: &'static str = "test.strict";
        type Input = Outer;
        type Output = ();
        async fn run(_ctx: &mut Ctx, _input: Outer) -> Result<(), WorkflowError> {
            Ok(())
        }
    }

    fn error(input: serde_json::Value) -> String {
        match normalise_input::<Strict>(&input) {
            Ok(value) => panic!("accepted {value}"),
            Err(e) => e.into_engine_error(Strict::NAME).to_string(),
        }
    }

    /// An unknown field is InvalidInput naming its path and what was expected, in one line
    /// whatever the key holds; a field of the wrong type stays MalformedInput.
    #[test]
    fn unknown_fields_are_invalid_input_naming_their_path() {
        assert_eq!(
            error(serde_json::json!({"inner": {"name": "n"}, "cuont": 1})),
            "invalid input for workflow \"test.strict\": field cuont: unknown field (expected \
             one of `inner`, `count`, `tags`)"
        );
        assert_eq!(
            error(serde_json::json!({"inner": {"name": "n", "nmae": 1}})),
            "invalid input for workflow \"test.strict\": field inner.nmae: unknown field \
             (expected `name`)"
        );
        let message = error(serde_json::json!({"inner": {"name": "n", "a\nb\u{1b}": 1}}));
        assert!(
            !message.contains('\n') && !message.contains('\u{1b}'),
            "{message}"
        );
        assert!(
            message.contains("field inner.a\\nb\\u{1b}: unknown field"),
            "{message}"
        );
        assert!(error(serde_json::json!({"inner": {"name": 1}})).starts_with("malformed input"));
        assert_eq!(
            unknown_field_reason("unknown field `x`, there are no fields").as_deref(),
            Some("unknown field (there are no fields)")
        );
        let none = serde_json::from_value::<Nothing>(serde_json::json!({"x": 1})).unwrap_err();
        assert!(unknown_field_reason(&none.to_string()).is_some(), "{none}");
        assert_eq!(unknown_field_reason("invalid type: string \"x\""), None);
    }
}
