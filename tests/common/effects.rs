//! What the effect suites (`engine_effects_*.rs`) share: the lookup effect, the kind of a step
//! turned into an effect, and the ground-truth log read for the effects that ran.

use std::path::Path;
use std::time::Duration;

use keel::{Ctx, EffectOptions, StepError, WorkflowError};
use keel_testkit::effects::{self, Action};

/// An hour: the sleeps that hold a run, and how long a failed undo waits for its retry.
pub(crate) const HOUR: Duration = Duration::from_secs(3600);

/// The kind of the lookup effect ([`lookup`]): it records itself in the ground-truth log, and
/// returns the id of the process that ran it, so a replayed output is told from a fresh one.
pub(crate) const LOOKUP: &str = "test.effects-lookup";

/// Runs [`LOOKUP`] as an effect of `ctx`, recording in `log`.
pub(crate) async fn lookup(
    ctx: &mut Ctx,
    log: &str,
    options: EffectOptions,
) -> Result<String, WorkflowError> {
    ctx.effect(LOOKUP, options, |sctx| {
        let log = log.to_string();
        async move {
            effects::record(&log, Action::Do, &sctx)?;
            Ok::<_, StepError>(format!("looked up by {}", std::process::id()))
        }
    })
    .await
}

/// The kind of a read-only step that later code turned into an effect.
pub(crate) const ENDPOINT: &str = "test.effects-describe-endpoint";

/// The effects that ran (the `Do` lines) in the ground-truth log at `log`.
pub(crate) fn effects_done(log: &str) -> Vec<effects::Effect> {
    effects::read(Path::new(log))
        .into_iter()
        .filter(|e| e.action == Action::Do)
        .collect()
}
