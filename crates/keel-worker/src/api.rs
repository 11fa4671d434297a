//! The HTTP JSON API (docs/api.md): the engine's operations, `/metrics`, a token check and
//! body limits. Every error is `{"error": "<one line>", "kind": "<machine word>"}` with a
//! status that says whose fault it is (4xx: the request's; 5xx: the worker's).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel_engine::limits::INPUT_BYTES_MAX;
use keel_engine::{Engine, EngineError, RunStatus};
use serde::{Deserialize, Serialize};

/// Largest request body: an input at its limit, with room for the envelope.
pub const BODY_BYTES_MAX: usize = INPUT_BYTES_MAX + 16 * 1024;

/// The services whose rate limiters `/metrics` reports.
pub const SERVICES: [&str; 4] = ["iam", "sts", "iot", "greengrass"];

/// What every handler shares.
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// The API token every request must carry, if set.
    pub token: Option<String>,
}

/// An error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// One line that names the problem.
    pub error: String,
    /// A machine word: `not_found`, `idempotency_mismatch`, `invalid_input`, ...
    pub kind: String,
    #[serde(skip)]
    status: StatusCode,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, error: impl Into<String>) -> ApiError {
        ApiError {
            error: error.into(),
            kind: kind.into(),
            status,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        use EngineError as E;
        let (status, kind) = match &error {
            E::RunNotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            E::IdempotencyMismatch { .. } => (StatusCode::CONFLICT, "idempotency_mismatch"),
            E::InvalidState { .. } => (StatusCode::CONFLICT, "invalid_state"),
            E::UnknownWorkflow { .. } => (StatusCode::BAD_REQUEST, "unknown_workflow"),
            E::MalformedInput { .. } => (StatusCode::BAD_REQUEST, "malformed_input"),
            E::InvalidInput { .. } => (StatusCode::BAD_REQUEST, "invalid_input"),
            E::InvalidRunId { .. } => (StatusCode::BAD_REQUEST, "invalid_id"),
            E::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            E::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            E::LimitReached { .. } => (StatusCode::TOO_MANY_REQUESTS, "limit_reached"),
            E::ShutDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            E::RunStopped { .. } => (StatusCode::CONFLICT, "not_driven"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(%error, "request failed");
        }
        ApiError::new(status, kind, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self)).into_response()
    }
}

type Answer<T> = Result<Json<T>, ApiError>;

/// The router, with the token check and the body limit.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/runs", post(start).get(list))
        .route("/v1/runs/{id}", get(status))
        .route("/v1/runs/{id}/history", get(history))
        .route("/v1/runs/{id}/{operation}", post(operate))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such API path") })
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(middleware::from_fn_with_state(state.clone(), authorise))
        .with_state(state)
}

/// Refuses a request without the worker's token (when it has one).
async fn authorise(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorised",
                "missing or wrong API token (Authorization: Bearer <token>)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Compares in time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `POST /v1/runs` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct StartRequest {
    /// The workflow name.
    pub workflow: String,
    /// The run id.
    pub id: String,
    /// The input.
    pub input: serde_json::Value,
}

async fn start(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<keel_engine::RunRecord> {
    let body = body.map_err(|e| {
        ApiError::new(
            e.status(),
            "bad_body",
            format!(
                "request body: {} (limit {BODY_BYTES_MAX} bytes)",
                e.body_text()
            ),
        )
    })?;
    let request: StartRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            format!("request body is not {{\"workflow\", \"id\", \"input\"}}: {e}"),
        )
    })?;
    let record = state
        .engine
        .start_json(&request.workflow, &request.id, request.input)
        .await?;
    tracing::info!(run = %record.id, workflow = %record.workflow, "started");
    Ok(Json(record))
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
}

async fn list(
    State(state): State<Arc<AppState>>,
    Query(query): Query<ListQuery>,
) -> Answer<Vec<keel_engine::RunRecord>> {
    let wanted = match query.status.as_deref() {
        None => None,
        Some(word) => Some(parse_status(word)?),
    };
    let mut runs = state.engine.list().await?;
    runs.retain(|r| wanted.is_none_or(|s| r.status == s));
    Ok(Json(runs))
}

/// A status from its word, or an error listing the words.
pub fn parse_status(word: &str) -> Result<RunStatus, ApiError> {
    serde_json::from_value(serde_json::Value::String(word.into())).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_status",
            format!(
                "unknown status {word:?} (running, suspended, paused, compensating, \
                 compensation_failed, completed, failed, compensated, resolved)"
            ),
        )
    })
}

async fn status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Answer<keel_engine::RunRecord> {
    Ok(Json(state.engine.status(&id).await?))
}

async fn history(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Answer<keel_engine::RunHistory> {
    Ok(Json(state.engine.history(&id).await?))
}

/// `POST /v1/runs/{id}/resolve` body.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ResolveRequest {
    /// What the operator did.
    pub note: String,
}

async fn operate(
    State(state): State<Arc<AppState>>,
    Path((id, operation)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<keel_engine::RunRecord> {
    let engine = &state.engine;
    let record = match operation.as_str() {
        "cancel" => engine.cancel(&id).await?,
        "pause" => engine.pause(&id).await?,
        "resume" => engine.resume(&id).await?,
        "retry-compensation" => engine.retry_compensation(&id).await?,
        "resolve" => {
            let body = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
            let request: ResolveRequest = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_request",
                    format!("request body is not {{\"note\"}}: {e}"),
                )
            })?;
            engine.resolve(&id, &request.note).await?
        }
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                format!(
                    "unknown operation {other:?} (cancel, pause, resume, retry-compensation, \
                     resolve)"
                ),
            ))
        }
    };
    tracing::info!(run = %id, %operation, status = %record.status, "operator request");
    Ok(Json(record))
}

async fn stats(State(state): State<Arc<AppState>>) -> Json<Vec<keel_engine::OperationStats>> {
    Json(state.engine.stats())
}

async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let runs = state.engine.list().await?;
    let text = crate::metrics::render(&runs, &state.engine.stats(), &state.engine);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
