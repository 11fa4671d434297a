//! Registered step types, with their types erased so that the saga can undo a step by kind
//! from the journal alone (registered workflows are in `workflow/registry.rs`).

use std::any::TypeId;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::retry::RetryPolicy;
use crate::step::{Compensation, Step, StepContext, StepError};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

type UndoFn = dyn Fn(Value, Option<Value>, StepContext) -> BoxFuture<Result<Compensation, StepError>>
    + Send
    + Sync;
type PolicyFn = dyn Fn(&Value) -> RetryPolicy + Send + Sync;
type ServiceFn = dyn Fn(&Value) -> Option<String> + Send + Sync;

pub(crate) struct StepEntry {
    type_id: TypeId,
    pub(crate) undo: Box<UndoFn>,
    pub(crate) undo_policy: Box<PolicyFn>,
    /// The service whose limiter the step's calls (and its compensation's) go through.
    pub(crate) rate_limit: Box<ServiceFn>,
}

/// Step types by kind.
#[derive(Default)]
pub(crate) struct Registry {
    steps: RwLock<HashMap<&'static str, Arc<StepEntry>>>,
}

impl Registry {
    /// Registers `S`; a second type under the same kind is refused.
    pub(crate) fn add_step<S: Step>(&self) -> Result<()> {
        let duplicate = || EngineError::DuplicateStepKind {
            kind: S::KIND.into(),
        };
        if let Some(existing) = self.steps.read().expect("registry lock").get(S::KIND) {
            return check_same::<S>(existing.type_id, duplicate);
        }
        let entry = StepEntry {
            type_id: TypeId::of::<S>(),
            undo: Box::new(|argument: Value, output: Option<Value>, ctx: StepContext| {
                Box::pin(async move {
                    let step: S = serde_json::from_value(argument).map_err(|e| {
                        StepError::permanent(format!(
                            "journaled argument of {} does not decode: {e}",
                            S::KIND
                        ))
                    })?;
                    let output = match output {
                        None => None,
                        Some(v) => Some(serde_json::from_value::<S::Output>(v).map_err(|e| {
                            StepError::permanent(format!(
                                "journaled output of {} does not decode: {e}",
                                S::KIND
                            ))
                        })?),
                    };
                    step.compensate(&ctx, output).await
                })
            }),
            undo_policy: Box::new(|argument: &Value| {
                serde_json::from_value::<S>(argument.clone())
                    .map(|s| s.compensation_retry_policy())
                    .unwrap_or_else(|_| RetryPolicy::no_retry())
            }),
            rate_limit: Box::new(|argument: &Value| {
                serde_json::from_value::<S>(argument.clone())
                    .ok()
                    .and_then(|s| s.rate_limit().map(str::to_owned))
            }),
        };
        self.insert::<S>(S::KIND, entry, duplicate)
    }

    /// Registers `kind` as an effect's ([`crate::Ctx::effect`]): its undo has nothing to do.
    /// A step type under the same kind is refused, as a second type is.
    pub(crate) fn add_effect(&self, kind: &'static str) -> Result<()> {
        let entry = StepEntry {
            type_id: TypeId::of::<NothingToUndo>(),
            undo: Box::new(|_, _, _| Box::pin(async { Ok(Compensation::NotCompensable) })),
            undo_policy: Box::new(|_| RetryPolicy::COMPENSATION_DEFAULT),
            rate_limit: Box::new(|_| None),
        };
        let duplicate = || EngineError::DuplicateStepKind { kind: kind.into() };
        self.insert::<NothingToUndo>(kind, entry, duplicate)
    }

    /// Inserts `entry` of type `T` under `kind`, unless another type holds the kind.
    fn insert<T: 'static>(
        &self,
        kind: &'static str,
        entry: StepEntry,
        duplicate: impl FnOnce() -> EngineError,
    ) -> Result<()> {
        let mut steps = self.steps.write().expect("registry lock");
        let entry = steps.entry(kind).or_insert_with(|| Arc::new(entry));
        check_same::<T>(entry.type_id, duplicate)
    }

    pub(crate) fn step(&self, kind: &str) -> Option<Arc<StepEntry>> {
        self.steps.read().expect("registry lock").get(kind).cloned()
    }
}

/// The type an effect's kind is registered as.
struct NothingToUndo;

/// `Ok` if the type registered under a name is `T` itself, else the duplicate's error.
pub(crate) fn check_same<T: 'static>(
    registered: TypeId,
    duplicate: impl FnOnce() -> EngineError,
) -> Result<()> {
    if registered == TypeId::of::<T>() {
        Ok(())
    } else {
        Err(duplicate())
    }
}

/// A step type, for registering whole sets of them at once: a step library exports
/// `pub const STEPS: &[StepType] = &[StepType::of::<CreateRole>(), ...]` and an engine takes
/// it with [`crate::EngineBuilder::steps`].
#[derive(Clone, Copy)]
pub struct StepType {
    kind: &'static str,
    type_name: fn() -> &'static str,
    register: fn(&Registry, &'static str) -> Result<()>,
}

impl StepType {
    /// The step type `S`.
    pub const fn of<S: Step>() -> StepType {
        StepType {
            kind: S::KIND,
            type_name: std::any::type_name::<S>,
            register: register_step::<S>,
        }
    }

    /// The kind of an effect ([`crate::Ctx::effect`]), which has nothing to undo. A run
    /// needs it registered only when its journal was written before start records said
    /// whether a step has a compensation: there any step reads as compensable, and the
    /// saga, finding no code for the kind, would stop the run in `compensation_failed` (and
    /// open would refuse the store); registered, the saga skips the step. So a library that
    /// turns a [`Step`] into an effect keeps the old kind in its set this way.
    pub const fn effect(kind: &'static str) -> StepType {
        StepType {
            kind,
            type_name: effect_type_name,
            register: Registry::add_effect,
        }
    }

    /// Its kind ([`Step::KIND`]).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Its Rust type's path, e.g. `keel_steps::aws::iam::CreateRole`; `effect` for an
    /// effect's kind.
    pub fn type_name(&self) -> &'static str {
        (self.type_name)()
    }

    pub(crate) fn register(&self, registry: &Registry) -> Result<()> {
        (self.register)(registry, self.kind)
    }
}

fn effect_type_name() -> &'static str {
    "effect"
}

fn register_step<S: Step>(registry: &Registry, _kind: &'static str) -> Result<()> {
    registry.add_step::<S>()
}

impl std::fmt::Debug for StepType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StepType({} = {})", self.kind, self.type_name())
    }
}
