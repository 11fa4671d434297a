//! The API's schedules (docs/api.md "Schedules"): `POST /v1/schedules` creates one (201, or
//! 200 when the same definition exists), `GET /v1/schedules` lists them,
//! `GET /v1/schedules/{name}` reads one, `POST /v1/schedules/{name}/pause` and `/resume`
//! pause and resume it, and `DELETE /v1/schedules/{name}` deletes it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keel_engine::{Schedule, ScheduleSpec};

use super::{decode, Answer, ApiError, AppState, EmptyRequest};

/// `POST /v1/schedules`: the body is the definition.
pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let spec: ScheduleSpec = decode(
        body,
        r#"{"name", "workflow", "input", "every"[, "catch_up", "overlap"]}"#,
    )?;
    let created = state.engine.create_schedule_outcome(&spec).await?;
    // The engine logs the creation, the pause, the resume and the deletion itself.
    let status = if created.new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(created.schedule)).into_response())
}

/// `GET /v1/schedules`: every schedule, by name.
pub(super) async fn list(State(state): State<Arc<AppState>>) -> Answer<Vec<Schedule>> {
    Ok(Json(state.engine.schedules().await?))
}

/// `GET /v1/schedules/{name}`.
pub(super) async fn show(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Answer<Schedule> {
    Ok(Json(state.engine.schedule(&name).await?))
}

/// `POST /v1/schedules/{name}/{pause|resume}`, body `{}`.
pub(super) async fn operate(
    State(state): State<Arc<AppState>>,
    Path((name, operation)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<Schedule> {
    let schedule = match operation.as_str() {
        "pause" => {
            decode::<EmptyRequest>(body, "{}")?;
            state.engine.pause_schedule(&name).await?
        }
        "resume" => {
            decode::<EmptyRequest>(body, "{}")?;
            state.engine.resume_schedule(&name).await?
        }
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                format!("unknown schedule operation {other:?} (pause, resume)"),
            ))
        }
    };
    Ok(Json(schedule))
}

/// `DELETE /v1/schedules/{name}`, body `{}` (or none): answers the schedule as it was.
pub(super) async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<Schedule> {
    let body = body.map(|b| {
        if b.is_empty() {
            Bytes::from_static(b"{}")
        } else {
            b
        }
    });
    decode::<EmptyRequest>(body, "{}")?;
    Ok(Json(state.engine.delete_schedule(&name).await?))
}
