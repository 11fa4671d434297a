//! Effects: steps with nothing to undo, written as a closure ([`Ctx::effect`]) instead of a
//! [`crate::Step`] type.
//!
//! An effect runs through the step attempt loop (`lane.rs`, through [`Attempted`]), so it is
//! journaled, retried, rate-limited, contained, measured and replayed exactly as a step whose
//! `COMPENSABLE` is false; the saga passes over it, so nothing is registered for it.
//! Compensable steps stay types: the saga undoes them from the journal alone, after a
//! restart, without the workflow's code, and a closure is the workflow's code.

use std::future::Future;
use std::marker::PhantomData;

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ctx::Ctx;
use crate::lane::Attempted;
use crate::retry::RetryPolicy;
use crate::step::{EffectOptions, StepContext, StepError};
use crate::workflow::WorkflowError;

impl Ctx {
    /// Runs the effect `f` (or replays its recorded output), retrying per `options`: a side
    /// effect with nothing to undo (a lookup, a read), without a [`crate::Step`] type.
    ///
    /// The effect is journaled as a step of kind `kind` whose `COMPENSABLE` is false, with
    /// `options`' argument (`null` by default): its start is durable before `f` runs, each
    /// attempt calls `f` again with that attempt's [`StepContext`] (same idempotency key,
    /// next attempt number), and its output is journaled. On replay a recorded output is
    /// returned without calling `f`; another kind or argument at this operation than the
    /// journal holds suspends the run as non-deterministic, as for a step. A panic in `f`
    /// is a failed attempt (retryable). The saga passes over an effect, and nothing needs
    /// registering for it.
    ///
    /// Use a [`crate::Step`] instead when the effect must be undone: compensation runs from
    /// the journal alone, after a restart, without the workflow's code or this closure, so a
    /// compensable step is data (its value, journaled) plus a trait impl registered by kind.
    ///
    /// `kind` names a kind of effect (statistics group by it, under `step:<kind>`), like
    /// [`crate::Step::KIND`], and must not change once journals hold it. Returns `f`'s
    /// output, or [`WorkflowError::Step`] when it failed for good.
    ///
    /// ```
    /// use keel_engine::{Ctx, EffectOptions, Engine, StepError, Workflow, WorkflowError};
    ///
    /// /// Greets an account's holder: a lookup with nothing to undo, as an effect.
    /// struct Greet;
    ///
    /// impl Workflow for Greet {
    ///     const NAME: &'static str = "doc.greet";
    ///     type Input = u32;
    ///     type Output = String;
    ///     async fn run(ctx: &mut Ctx, account: u32) -> Result<String, WorkflowError> {
    ///         // Journaled with the account: replay notices code that looks up another.
    ///         let options = EffectOptions::DEFAULT
    ///             .rate_limit("accounts")
    ///             .argument(serde_json::json!({ "account": account }));
    ///         let holder: String = ctx
    ///             .effect("doc.lookup-holder", options, |sctx| async move {
    ///                 // A real lookup calls a service: sctx.resource::<Client>(), with
    ///                 // sctx.key() and sctx.attempt() to tell attempts apart.
    ///                 let _ = sctx.attempt();
    ///                 Ok::<_, StepError>(format!("holder of {account}"))
    ///             })
    ///             .await?;
    ///         Ok(format!("hello, {holder}"))
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// // Nothing registered for the effect: only the workflow.
    /// let engine = Engine::builder(dir.path()).workflow::<Greet>().open().await?;
    /// let run = engine.start::<Greet>("greet-7", 7).await?;
    /// assert_eq!(run.result().await?, "hello, holder of 7");
    /// engine.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn effect<T, F, Fut>(
        &mut self,
        kind: &'static str,
        options: EffectOptions,
        f: F,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: FnMut(StepContext) -> Fut + Send,
        Fut: Future<Output = Result<T, StepError>> + Send,
    {
        self.check()?;
        let index = self.next_index()?;
        let argument = self.argument(index, "effect", kind, &options.argument)?;
        let mut call = EffectAttempts {
            kind,
            options,
            f,
            future: PhantomData,
        };
        self.attempted(index, argument, &mut call).await
    }
}

/// The attempts of an effect: each calls the closure again.
struct EffectAttempts<F, Fut> {
    kind: &'static str,
    options: EffectOptions,
    f: F,
    future: PhantomData<fn() -> Fut>,
}

impl<'a, T, F, Fut> Attempted<'a, T> for EffectAttempts<F, Fut>
where
    F: FnMut(StepContext) -> Fut + Send,
    Fut: Future<Output = Result<T, StepError>> + Send + 'a,
{
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn compensable(&self) -> bool {
        false
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.options.retry_policy
    }

    fn rate_limit(&self) -> Option<&str> {
        self.options.rate_limit
    }

    fn call(&mut self, ctx: StepContext) -> BoxFuture<'a, Result<T, StepError>> {
        Box::pin((self.f)(ctx))
    }
}
