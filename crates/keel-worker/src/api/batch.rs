//! The API's actions on many runs and on finished ones: `POST /v1/runs:batch` applies an
//! operator action (or a purge) to the runs a filter matches, a bounded call at a time, and
//! `POST /v1/runs/{id}/rerun` starts a finished run again. The request speaks the API's
//! words (statuses as words, times as RFC 3339); the engine's [`Batch`] speaks ids and
//! milliseconds.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use keel_engine::{Batch, BatchAction, BatchReport, Rerun, RunFilter, RunRecord};
use serde::{Deserialize, Serialize};

use super::{decode, parse_status, Answer, ApiError, AppState};

/// Runs a batch call acts on when the request does not say.
pub(crate) const BATCH_LIMIT_DEFAULT: usize = 100;

/// `POST /v1/runs:batch` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchRequest {
    /// `cancel`, `pause`, `resume`, `retry_compensation`, `resolve`, `rerun` or `purge`.
    pub action: String,
    /// Which runs.
    pub filter: FilterRequest,
    /// Only count the matches and list the first `limit`, changing nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// The previous call's `next`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Most runs acted on (or listed) by this call, 1 to 1000; default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// What the operator did (`resolve` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The `filter` of a batch request: every field given must hold, and at least one is given.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilterRequest {
    /// Runs in any of these statuses (words: `running`, `paused`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<String>,
    /// Runs of this workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Runs whose id begins with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_prefix: Option<String>,
    /// Child runs of this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Runs created at or after this time (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_after: Option<String>,
    /// Runs created before this time (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_before: Option<String>,
    /// Runs that finished before this time (RFC 3339, UTC); a purge needs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_before: Option<String>,
}

/// The shape a batch body is refused against.
const BATCH_SHAPE: &str =
    r#"{"action", "filter": {...}[, "dry_run"][, "after"][, "limit"][, "note"]}"#;

/// `POST /v1/runs:batch`: one bounded call of a batch; the report's `next` says where the
/// following call goes on.
pub(super) async fn batch(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<BatchReport> {
    let request: BatchRequest = decode(body, BATCH_SHAPE)?;
    let batch = engine_batch(request)?;
    let report = state.engine.batch(&batch).await?;
    if !report.dry_run {
        tracing::info!(
            action = %report.action,
            done = report.done,
            skipped = report.skipped,
            failed = report.failed,
            "operator batch"
        );
    }
    Ok(Json(report))
}

/// The engine's batch for an API request: statuses and times read, the action named.
pub(crate) fn engine_batch(request: BatchRequest) -> Result<Batch, ApiError> {
    let action = action(&request.action, request.note)?;
    let f = request.filter;
    let statuses = f
        .statuses
        .iter()
        .map(|word| parse_status(word))
        .collect::<Result<Vec<_>, _>>()?;
    let filter = RunFilter {
        statuses,
        workflow: f.workflow,
        id_prefix: f.id_prefix,
        parent: f.parent,
        created_after_ms: time_ms("filter.created_after", f.created_after.as_deref())?,
        created_before_ms: time_ms("filter.created_before", f.created_before.as_deref())?,
        finished_before_ms: time_ms("filter.finished_before", f.finished_before.as_deref())?,
    };
    Ok(Batch {
        action,
        filter,
        dry_run: request.dry_run,
        after: request.after,
        limit: request.limit.unwrap_or(BATCH_LIMIT_DEFAULT),
    })
}

/// The action named `word` (`retry-compensation`, the operation's path word, is read as
/// `retry_compensation`); a note is for `resolve` only.
fn action(word: &str, note: Option<String>) -> Result<BatchAction, ApiError> {
    let action = match word.replace('-', "_").as_str() {
        "cancel" => BatchAction::Cancel,
        "pause" => BatchAction::Pause,
        "resume" => BatchAction::Resume,
        "retry_compensation" => BatchAction::RetryCompensation,
        "resolve" => {
            return Ok(BatchAction::Resolve {
                note: note.unwrap_or_default(),
            })
        }
        "rerun" => BatchAction::Rerun,
        "purge" => BatchAction::Purge,
        _ => {
            return Err(invalid(format!(
                "unknown action {word:?} (cancel, pause, resume, retry_compensation, resolve, \
                 rerun, purge)"
            )))
        }
    };
    if note.is_some() {
        return Err(invalid(format!(
            "a note is for the resolve action only, not for {word}"
        )));
    }
    Ok(action)
}

/// An RFC 3339 time in UTC (`2026-12-01T00:00:00Z`; `Z`, `+00:00` or nothing for UTC, a
/// space for `T`, fractions of a second) as ms since the Unix epoch.
pub(crate) fn time_ms(field: &str, text: Option<&str>) -> Result<Option<u64>, ApiError> {
    let Some(text) = text else {
        return Ok(None);
    };
    parse_time_ms(text)
        .map(Some)
        .map_err(|e| invalid(format!("{field}: {e}")))
}

/// [`time_ms`] of a given text, with the reason it is refused.
pub(crate) fn parse_time_ms(text: &str) -> Result<u64, String> {
    let at = humantime::parse_rfc3339_weak(text).map_err(|e| {
        format!("{text:?} is not an RFC 3339 time in UTC, e.g. 2026-12-01T00:00:00Z ({e})")
    })?;
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?
        .as_millis();
    u64::try_from(ms).map_err(|_| format!("{text:?} is too far in the future"))
}

fn invalid(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
}

/// `POST /v1/runs/{id}/rerun` `{"as", "input"}` (both optional): `201` with the new run's
/// record, or `200` with it when the call made none (a repeated call: the rerun is
/// idempotent by the new run's id).
pub(super) async fn rerun(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RunRecord>), ApiError> {
    let request: Rerun = decode(body, r#"{["as": "new-id"][, "input": {...}]}"#)?;
    let asked_ms = now_ms();
    let record = state.engine.rerun(&id, &request).await?;
    // The engine answers the existing run for a repeated call; only a run it made now is new.
    let status = if record.created_at_ms >= asked_ms {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    tracing::info!(run = %id, rerun = %record.id, new = status == StatusCode::CREATED, "rerun");
    Ok((status, Json(record)))
}

/// Now, in ms since the Unix epoch (the engine's clock in a worker).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::{action, parse_time_ms};
    use keel_engine::BatchAction;

    #[test]
    fn times_are_read_as_rfc_3339_in_utc() {
        assert_eq!(parse_time_ms("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_time_ms("2026-12-01T00:00:00Z"), Ok(1_796_083_200_000));
        assert_eq!(
            parse_time_ms("2026-12-01 00:00:00.5"),
            Ok(1_796_083_200_500)
        );
        assert_eq!(
            parse_time_ms("2026-12-01T00:00:00+00:00"),
            Ok(1_796_083_200_000)
        );
        for bad in [
            "",
            "2026-12-01",
            "yesterday",
            "2026-12-01T00:00:00+02:00",
            "1969-12-31T00:00:00Z",
        ] {
            let e = parse_time_ms(bad).unwrap_err();
            assert!(e.contains(bad), "{bad:?}: {e}");
        }
    }

    #[test]
    fn actions_are_words_and_a_note_is_for_resolve_only() {
        assert_eq!(
            action("retry-compensation", None).unwrap(),
            BatchAction::RetryCompensation
        );
        assert_eq!(
            action("resolve", Some("fixed".into())).unwrap(),
            BatchAction::Resolve {
                note: "fixed".into()
            }
        );
        assert!(action("pause", Some("x".into())).is_err());
        let e = action("explode", None).unwrap_err();
        assert!(e.error.contains("explode"), "{}", e.error);
    }
}
