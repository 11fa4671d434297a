//! Reruns: a new run of a finished run's workflow, with its input or a corrected one. The new
//! run's record names the run it reruns (`rerun_of`); the journal of the run rerun gets a
//! `rerun_started` entry naming the new one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::operator::same_run;
use crate::engine::{Engine, Lineage};
use crate::error::{EngineError, Result};
use crate::ids::RunId;
use crate::journal::{Event, RunRecord};

/// How [`Engine::rerun`] makes the new run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rerun {
    /// The new run's id (a caller's id: [`RunId::new_top_level`]'s rules); when `None`,
    /// `<id>.rerun-<n>` (a child's `/` read as `.`), `n` counting the run's reruns from 1.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "as")]
    pub as_id: Option<String>,
    /// A corrected input; the run's own when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
}

impl Engine {
    /// Starts a new run of finished run `id`'s workflow, with its input (or `rerun.input`),
    /// under `rerun.as_id` or the next default id, and records the link in both runs. The new
    /// run is durable and driven when this returns, and the rerun's journal entry is durable
    /// (unless the run rerun was deleted meanwhile: the new run is returned all the same).
    ///
    /// Idempotent by the new id: repeating a call whose answer was lost (same `as_id`, or the
    /// default id before the first call recorded it) returns the same run, as long as the
    /// run rerun exists (once it is deleted, a repeated call answers `RunNotFound`). A run
    /// that has not finished is refused (cancel it first): two runs doing the same work at
    /// once would race for the same resources. A child run is rerun as a top-level run.
    pub async fn rerun(&self, id: &str, rerun: &Rerun) -> Result<RunRecord> {
        self.rerun_for(id, rerun, None).await
    }

    /// [`Engine::rerun`]; with `created_at`, only of the run of `id` created then (a batch's:
    /// the run its scan read), else `RunNotFound`. The rerun is of the run read here, and
    /// notes itself only in that run.
    pub(super) async fn rerun_for(
        &self,
        id: &str,
        rerun: &Rerun,
        created_at: Option<u64>,
    ) -> Result<RunRecord> {
        let old = self.record(id).await?;
        same_run(created_at, &old)?;
        if !old.status.is_terminal() {
            return Err(EngineError::InvalidState {
                id: old.id,
                status: old.status.to_string(),
                operation: "rerun it (only a finished run is rerun: cancel it first)",
            });
        }
        let reruns = self.reruns_of(&old.id).await?;
        let new_id = match &rerun.as_id {
            Some(as_id) => as_id.clone(),
            None => next_default_id(&old.id, &reruns)?,
        };
        let input = rerun.input.clone().unwrap_or_else(|| old.input.clone());
        let (new_id, input) = self.checked_json_start(&old.workflow, &new_id, input)?;
        if new_id == old.id {
            return Err(EngineError::InvalidRequest(format!(
                "a rerun of run {} needs another id than its own",
                old.id
            )));
        }
        let lineage = Lineage {
            parent: None,
            rerun_of: Some(old.id.clone()),
        };
        let record = self
            .start_value(&old.workflow, new_id, input, lineage, None)
            .await?;
        if !reruns.contains(&record.id) {
            let note = Event::RerunStarted {
                run: record.id.clone(),
            };
            let store = &*self.inner.env.store;
            let noted = self
                // Only in the run rerun: not in a run started under its id since.
                .operate_with(
                    old.id.as_str(),
                    Some(old.created_at_ms),
                    "record its rerun",
                    false,
                    |cell| cell.append(store, note.clone()).map(|()| true),
                )
                .await;
            match noted {
                Ok(Some(_)) => {}
                // Deleted (purged, collected) since it was read, and perhaps another run
                // started under its id: the new run stands, durable and driven, and the run
                // rerun has no journal left to note it in.
                Ok(None) | Err(EngineError::RunNotFound { .. }) => {
                    tracing::info!(run_id = %old.id, rerun = %record.id, "run rerun, then deleted before its journal noted the rerun");
                }
                Err(error) => return Err(error),
            }
        }
        tracing::info!(run_id = %old.id, rerun = %record.id, "run rerun");
        Ok(record)
    }

    /// The runs `id` was rerun as, oldest first, each once, as its journal records them. Two
    /// concurrent calls for the same default id both record it (each reads the journal
    /// before the other's entry): that is one rerun, so the next default id counts it once.
    pub(crate) async fn reruns_of(&self, id: &RunId) -> Result<Vec<RunId>> {
        let journal = self.inner.env.store.journal(id).await?;
        let mut reruns: Vec<RunId> = Vec::new();
        for entry in journal {
            if let Event::RerunStarted { run } = entry.event {
                if !reruns.contains(&run) {
                    reruns.push(run);
                }
            }
        }
        Ok(reruns)
    }
}

/// The next default rerun id of `id`, rerun as `reruns` so far: the first `n`th from the
/// count of reruns on whose id no recorded rerun is (one given as `<id>.rerun-<n>`, or a
/// journal that counted one concurrent rerun twice before its reruns were counted once,
/// would otherwise hand back that run for good).
fn next_default_id(id: &RunId, reruns: &[RunId]) -> Result<String> {
    let mut n = reruns.len() + 1;
    loop {
        let made = default_id(id, n)?;
        if !reruns.iter().any(|rerun| rerun.as_str() == made) {
            return Ok(made);
        }
        n += 1;
    }
}

/// The `n`th default rerun id of `id`: `<id>.rerun-<n>`, a child's `/` read as `.`.
fn default_id(id: &RunId, n: usize) -> Result<String> {
    let made = format!("{}.rerun-{n}", id.as_str().replace('/', "."));
    if made.len() > crate::limits::RUN_ID_LEN_MAX {
        return Err(EngineError::InvalidRequest(format!(
            "the default rerun id of run {id} would be longer than {} bytes: give one",
            crate::limits::RUN_ID_LEN_MAX
        )));
    }
    Ok(made)
}
