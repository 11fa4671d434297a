//! The API's events: `POST /v1/runs/{id}/events/{name}` sends an event to a run, and
//! `GET /v1/runs/{id}/published/{name}` reads (or long-polls) a value it published.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use keel_engine::{Delivered, Published};
use serde::Deserialize;

use super::{decode, Answer, ApiError, AppState};

/// Longest long poll of `GET /v1/runs/{id}/published/{name}?wait=`: a request is answered
/// within it (plus the store's sync), well inside the timeouts of clients and proxies.
pub(crate) const PUBLISHED_WAIT_MAX: Duration = Duration::from_secs(60);

/// The header that carries a sent event's id (its idempotency key).
pub(crate) const EVENT_ID_HEADER: &str = "event-id";

/// `POST /v1/runs/{id}/events/{name}`: the body is the payload; the `Event-Id` header its id,
/// one made up (a UUID) when missing, which the answer carries.
pub(super) async fn send(
    State(state): State<Arc<AppState>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer<Delivered> {
    let event_id = event_id(&headers)?;
    let payload: serde_json::Value = decode(body, "(the event's payload)")?;
    let delivered = state.engine.send(&id, &name, &payload, &event_id).await?;
    tracing::info!(run = %id, %name, %event_id, duplicate = delivered.duplicate, "event sent");
    Ok(Json(delivered))
}

/// The request's event id: its one `Event-Id` header (the engine checks the rules), or a
/// new UUID v4.
fn event_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let mut given = headers.get_all(EVENT_ID_HEADER).iter();
    match (given.next(), given.next()) {
        (None, _) => Ok(uuid_v4()),
        (Some(value), None) => value.to_str().map(str::to_owned).map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the Event-Id header must be printable ASCII without spaces",
            )
        }),
        (Some(_), Some(_)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a request takes one Event-Id header, not several",
        )),
    }
}

/// A random UUID (version 4), as text.
pub(crate) fn uuid_v4() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublishedQuery {
    wait: Option<String>,
    after: Option<u64>,
}

/// `GET /v1/runs/{id}/published/{name}[?wait=D][&after=VERSION]`: the latest value, at once
/// or, with `wait`, once there is one newer than `after` (any, without it), the run can
/// publish nothing more, or the wait is over. `404 not_published` when there is none.
pub(super) async fn published(
    State(state): State<Arc<AppState>>,
    Path((id, name)): Path<(String, String)>,
    query: Result<Query<PublishedQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer<Published> {
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{} (the query takes wait, after)", e.body_text()),
        )
    })?;
    let wait = match query.wait.as_deref() {
        None => None,
        Some(text) => Some(parse_wait(text).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("wait: {e}"),
            )
        })?),
    };
    let value = match wait {
        None => state.engine.published(&id, &name).await?,
        Some(wait) => {
            state
                .engine
                .published_wait(&id, &name, query.after, wait)
                .await?
        }
    };
    value.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_published",
            format!("run {id} has published no value named {name:?}"),
        )
    })
}

/// A wait: `500ms`, `30s`, `1m` (any unit `humantime` reads), or plain seconds (`30`), at
/// most [`PUBLISHED_WAIT_MAX`].
pub(crate) fn parse_wait(text: &str) -> Result<Duration, String> {
    let malformed =
        || format!("{text:?} is not a duration (e.g. 500ms, 30s, 1m, or 30 for seconds)");
    let too_long = || {
        format!(
            "{text:?} is longer than the longest wait, {} s",
            PUBLISHED_WAIT_MAX.as_secs()
        )
    };
    let wait = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let seconds = text.parse::<u64>().map_err(|_| too_long())?;
        Duration::from_secs(seconds)
    } else {
        match humantime::parse_duration(text) {
            Ok(wait) => wait,
            Err(humantime::DurationError::NumberOverflow) => return Err(too_long()),
            Err(_) => return Err(malformed()),
        }
    };
    if wait > PUBLISHED_WAIT_MAX {
        return Err(too_long());
    }
    Ok(wait)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{parse_wait, uuid_v4};

    #[test]
    fn waits_are_read_in_their_units_and_capped() {
        assert_eq!(parse_wait("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_wait("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_wait("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_wait("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_wait("0"), Ok(Duration::ZERO));
        assert_eq!(parse_wait("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "-1s", "ms", "soon"] {
            let e = parse_wait(bad).unwrap_err();
            assert!(e.contains("not a duration"), "{bad:?}: {e}");
        }
        for long in [
            "61s",
            "2m",
            "1h",
            "60001ms",
            "99999999999999999999",
            "18446744073709551615m",
        ] {
            let e = parse_wait(long).unwrap_err();
            assert!(e.contains("60 s"), "{long:?}: {e}");
        }
    }

    #[test]
    fn made_up_event_ids_are_version_4_uuids() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(id.as_bytes()[14], b'4', "{id}");
        assert!(
            matches!(id.as_bytes()[19], b'8' | b'9' | b'a' | b'b'),
            "{id}"
        );
        assert_ne!(id, uuid_v4());
    }
}
