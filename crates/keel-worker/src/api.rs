//! The HTTP JSON API (docs/api.md): the engine's operations, `/metrics`, and the request
//! checks of docs/api.md "Safety" (the `Host` and `Origin` a request names, the token, JSON
//! bodies on every state change). Every error is `{"error": "<one line>", "kind": "<machine
//! word>"}` with a status that says whose fault it is (4xx: the request's; 5xx: the worker's).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel_engine::limits::{EVENT_PAYLOAD_BYTES_MAX, INPUT_BYTES_MAX};
use keel_engine::{Engine, EngineError, EventIn, RunStatus, RunsPage, RunsQuery, RUNS_PAGE_MAX};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest request body: an input and an event payload at their limits (a start with an
/// event), with room for the envelope.
pub(crate) const BODY_BYTES_MAX: usize = INPUT_BYTES_MAX + EVENT_PAYLOAD_BYTES_MAX + 16 * 1024;

/// The services whose rate limiters `/metrics` and `/v1/limiters` report.
pub(crate) const SERVICES: [&str; 4] = ["iam", "sts", "iot", "greengrass"];

/// Runs in a page of `GET /v1/runs` when the request does not say.
pub(crate) const RUNS_PAGE_DEFAULT: usize = 100;

mod batch;
mod events;
mod schedules;

pub(crate) use batch::{parse_time_ms, BatchRequest, FilterRequest, BATCH_LIMIT_DEFAULT};
pub(crate) use events::{parse_wait, uuid_v4, EVENT_ID_HEADER, PUBLISHED_WAIT_MAX};
use events::{published, send};

/// What every handler shares.
pub(crate) struct AppState {
    /// The engine.
    pub engine: Engine,
    /// The API token every request but `/v1/health` must carry; `None` only with `--no-auth`.
    pub token: Option<String>,
    /// The `Host` names requests may use.
    pub hosts: AllowedHosts,
    /// The limiters' samples since the worker started, for `GET /v1/limiters`.
    pub limiters: Arc<crate::limiters::LimiterHistory>,
}

/// The `Host` a request may name: the address the API listens on (any IP address when it
/// listens on all of them), `localhost` when it listens on loopback, and configured names.
/// A name a client resolved through DNS that the operator did not configure is refused: a
/// web page that rebinds its own name to 127.0.0.1 cannot read or start runs.
#[derive(Clone, Debug)]
pub(crate) struct AllowedHosts {
    /// The bound address.
    pub listen: SocketAddr,
    /// Names (lowercase, without port) allowed on any port, e.g. a proxy's.
    pub names: Vec<String>,
}

impl AllowedHosts {
    /// Whether a request naming `host` (a `Host` header's value) is for this worker.
    pub(crate) fn allow(&self, host: &str) -> bool {
        let Some((name, port)) = split_host(host) else {
            return false;
        };
        let port_ok = port.map_or(self.listen.port() == 80, |p| p == self.listen.port());
        let name = name.to_ascii_lowercase();
        if let Ok(ip) = name.parse::<IpAddr>() {
            let listened = port_ok && (ip == self.listen.ip() || self.listen.ip().is_unspecified());
            return listened || self.names.contains(&name);
        }
        if name == "localhost" && self.listen.ip().is_loopback() {
            return port_ok;
        }
        self.names.contains(&name)
    }
}

/// `name[:port]` or `[v6]:port` into the name (brackets removed) and the port.
fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (name, after) = rest.split_once(']')?;
        match after {
            "" => (name, None),
            _ => (name, Some(after.strip_prefix(':')?)),
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if name.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    Some((name, port))
}

/// An error answer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ApiError {
    /// One line that names the problem.
    pub error: String,
    /// A machine word: `not_found`, `idempotency_mismatch`, `invalid_input`, ...
    pub kind: String,
    #[serde(skip)]
    status: StatusCode,
}

impl ApiError {
    /// An error answer of `status`.
    pub(crate) fn new(status: StatusCode, kind: &str, error: impl Into<String>) -> ApiError {
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
            E::ScheduleNotFound { .. } => (StatusCode::NOT_FOUND, "schedule_not_found"),
            E::ScheduleExists { .. } => (StatusCode::CONFLICT, "schedule_exists"),
            E::IdempotencyMismatch { .. } => (StatusCode::CONFLICT, "idempotency_mismatch"),
            E::EventMismatch { .. } => (StatusCode::CONFLICT, "event_mismatch"),
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
            // Another worker took the run over meanwhile: the same call, again, goes there.
            E::Fenced { .. } => (StatusCode::SERVICE_UNAVAILABLE, "moved"),
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

pub(crate) type Answer<T> = Result<Json<T>, ApiError>;

/// The router, with the request checks, the body limit and JSON errors throughout.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/runs", post(start).get(list))
        // A literal colon mid-segment is no capture in axum 0.8 (captures are `{name}`).
        .route("/v1/runs:batch", post(batch::batch))
        .route("/v1/runs:counts", get(counts))
        .route("/v1/runs/{id}", get(status))
        .route("/v1/runs/{id}/history", get(history))
        .route("/v1/runs/{id}/{operation}", post(operate))
        .route("/v1/runs/{id}/rerun", post(batch::rerun))
        .route("/v1/runs/{id}/events/{name}", post(send))
        .route("/v1/runs/{id}/published/{name}", get(published))
        .route(
            "/v1/schedules",
            post(schedules::create).get(schedules::list),
        )
        .route(
            "/v1/schedules/{name}",
            get(schedules::show).delete(schedules::delete),
        )
        .route("/v1/schedules/{name}/{operation}", post(schedules::operate))
        .route("/v1/stats", get(stats))
        .route("/v1/limiters", get(limiters))
        .route("/metrics", get(metrics))
        .route("/ui", get(crate::ui::redirect))
        .route("/ui/", get(crate::ui::asset))
        .route("/ui/{file}", get(crate::ui::asset))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such API path") })
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on this path"),
            )
        })
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(middleware::from_fn_with_state(state.clone(), check))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// The checks every request passes before a handler sees it, in this order: it names this
/// worker in `Host` (421), comes from no other web origin (403), carries the token (401, all
/// but `/v1/health`), and a state change carries JSON (415).
async fn check(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    match refusal(
        &state,
        request.method(),
        request.uri().path(),
        request.headers(),
    ) {
        Some(error) => error.into_response(),
        None => next.run(request).await,
    }
}

fn refusal(state: &AppState, method: &Method, path: &str, headers: &HeaderMap) -> Option<ApiError> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST).unwrap_or_default();
    // One Host only: a proxy in front may read another one than this check would.
    if headers.get_all(header::HOST).iter().count() > 1 || !state.hosts.allow(host) {
        return Some(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_host",
            format!(
                "Host {host:?} is not this worker's address ({}); add the name with \
                 --allowed-host if a proxy or DNS name is meant to reach it",
                state.hosts.listen
            ),
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let same = origin.to_str().ok().is_some_and(|o| {
            ["http://", "https://"].iter().any(|scheme| {
                o.strip_prefix(scheme)
                    .is_some_and(|h| h.eq_ignore_ascii_case(host))
            })
        });
        if !same {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!("requests from another web origin ({origin:?}) are refused"),
            ));
        }
    }
    if text(header::HeaderName::from_static("sec-fetch-site")) == Some("cross-site") {
        return Some(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_origin",
            "cross-site requests are refused",
        ));
    }
    if let Some(token) = &state.token {
        let given = text(header::AUTHORIZATION).and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        // The console's own files hold no data: the page asks for the token and sends it
        // with each API call (docs/ui.md).
        let open = path == "/v1/health" || crate::ui::is_asset(method, path);
        if !open && !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return Some(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorised",
                "missing or wrong API token (Authorization: Bearer <token>; the worker keeps \
                 it in DATA_DIR/api-token, which the CLI reads with --data-dir)",
            ));
        }
    }
    if *method != Method::GET && *method != Method::HEAD {
        let json = text(header::CONTENT_TYPE).is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
        if !json {
            return Some(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "a request that changes state must be Content-Type: application/json",
            ));
        }
    }
    None
}

/// Turns every error answer that is not yet `{error, kind}` (axum's own rejections, say) into
/// one, keeping its status and its text.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let line = text.lines().next().unwrap_or_default().trim();
    let reason = status.canonical_reason().unwrap_or("error");
    let kind = reason.to_ascii_lowercase().replace([' ', '-'], "_");
    let error = if line.is_empty() { reason } else { line };
    ApiError::new(status, &kind, error).into_response()
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
#[serde(deny_unknown_fields)]
pub(crate) struct StartRequest {
    /// The workflow name.
    pub workflow: String,
    /// The run id.
    pub id: String,
    /// The input.
    pub input: serde_json::Value,
    /// An event to put in the run's mailbox as the run is made (durable with it); for a run
    /// that exists, it is sent to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<StartEvent>,
}

/// The `event` of a `POST /v1/runs` body. Its id is required: the start is idempotent by run
/// id, and a retried start must not deliver a second event.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartEvent {
    /// The event's name.
    pub name: String,
    /// The event's id (its idempotency key).
    pub event_id: String,
    /// The payload.
    pub payload: serde_json::Value,
}

/// A request body decoded as `T`: `malformed_request` when it is not JSON, `invalid_input`
/// naming the field when a field is unknown, missing or of the wrong type.
pub(crate) fn decode<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    shape: &str,
) -> Result<T, ApiError> {
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
    let mut decoder = serde_json::Deserializer::from_slice(&body);
    let decoded: Result<T, _> = serde_path_to_error::deserialize(&mut decoder);
    let decoded = match decoded {
        Ok(value) => value,
        Err(e) => return Err(decode_error(e.path().to_string(), e.into_inner(), shape)),
    };
    decoder
        .end()
        .map_err(|e| decode_error(".".into(), e, shape))?;
    Ok(decoded)
}

fn decode_error(path: String, inner: serde_json::Error, shape: &str) -> ApiError {
    if !inner.is_data() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            format!("request body is not JSON {shape}: {inner}"),
        );
    }
    let at = if path == "." {
        String::new()
    } else {
        format!("field {path}: ")
    };
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_input",
        format!("request body: {at}{inner} (expected {shape})"),
    )
}

async fn start(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<keel_engine::RunRecord> {
    let request: StartRequest = decode(body, r#"{"workflow", "id", "input"[, "event"]}"#)?;
    let engine = &state.engine;
    let record = match request.event {
        None => {
            engine
                .start_json(&request.workflow, &request.id, request.input)
                .await?
        }
        Some(event) => {
            let event = EventIn {
                name: event.name,
                event_id: event.event_id,
                payload: event.payload,
            };
            engine
                .start_json_with_event(&request.workflow, &request.id, request.input, event)
                .await?
        }
    };
    tracing::info!(run = %record.id, workflow = %record.workflow, "started");
    Ok(Json(record))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    after: Option<String>,
    prefix: Option<String>,
    limit: Option<usize>,
    workflow: Option<String>,
    parent: Option<String>,
    created_after: Option<String>,
    created_before: Option<String>,
}

async fn list(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer<RunsPage> {
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "{} (the query takes status, after, prefix, limit, workflow, parent, \
                 created_after, created_before)",
                e.body_text()
            ),
        )
    })?;
    let status = match query.status.as_deref() {
        None => None,
        Some(word) => Some(parse_status(word)?),
    };
    let limit = query.limit.unwrap_or(RUNS_PAGE_DEFAULT);
    if limit == 0 || limit > RUNS_PAGE_MAX {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("limit {limit} is out of range (1..={RUNS_PAGE_MAX})"),
        ));
    }
    let time = |field: &str, text: Option<&str>| -> Result<Option<u64>, ApiError> {
        text.map(|t| {
            parse_time_ms(t).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("{field}: {e}"),
                )
            })
        })
        .transpose()
    };
    let page = state
        .engine
        .list_page(&RunsQuery {
            status,
            after: query.after,
            prefix: query.prefix,
            limit,
            workflow: query.workflow,
            parent: query.parent,
            created_after_ms: time("created_after", query.created_after.as_deref())?,
            created_before_ms: time("created_before", query.created_before.as_deref())?,
        })
        .await?;
    Ok(Json(page))
}

/// `GET /v1/runs:counts`: how many runs the store holds in each status (every status named,
/// at 0 when there are none), and in all.
async fn counts(State(state): State<Arc<AppState>>) -> Answer<serde_json::Value> {
    let counts = state.engine.run_counts().await?;
    let mut by_status = serde_json::Map::new();
    for status in RunStatus::ALL {
        let n = counts.get(&status).copied().unwrap_or(0);
        by_status.insert(status.as_str().into(), n.into());
    }
    let total: u64 = counts.values().sum();
    Ok(Json(
        serde_json::json!({"counts": by_status, "total": total}),
    ))
}

/// A status from its word, or an error listing the words.
pub(crate) fn parse_status(word: &str) -> Result<RunStatus, ApiError> {
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
#[serde(deny_unknown_fields)]
pub(crate) struct ResolveRequest {
    /// What the operator did.
    pub note: String,
}

/// The body of every other operation: `{}`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmptyRequest {}

async fn operate(
    State(state): State<Arc<AppState>>,
    Path((id, operation)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<keel_engine::RunRecord> {
    let engine = &state.engine;
    let empty = |body| decode::<EmptyRequest>(body, "{}");
    let record = match operation.as_str() {
        "cancel" => {
            empty(body)?;
            engine.cancel(&id).await?
        }
        "pause" => {
            empty(body)?;
            engine.pause(&id).await?
        }
        "resume" => {
            empty(body)?;
            engine.resume(&id).await?
        }
        "retry-compensation" => {
            empty(body)?;
            engine.retry_compensation(&id).await?
        }
        "resolve" => {
            let request: ResolveRequest = decode(body, r#"{"note"}"#)?;
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

/// Each service's rate limiter now, with its samples of the last hour (oldest first).
async fn limiters(State(state): State<Arc<AppState>>) -> Json<Vec<crate::limiters::LimiterView>> {
    Json(state.limiters.views(&state.engine))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let counts = state.engine.run_counts().await?;
    let text = crate::metrics::render(&counts, &state.engine.stats(), &state.engine);
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}
