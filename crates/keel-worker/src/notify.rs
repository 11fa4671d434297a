//! The notice sender: POSTs each pending notice ([`keel_engine::Notice`]) to every
//! `--notify-url`, signed with the `--notify-secret-file` key, and records each delivery in
//! the store, so that a restart neither loses nor (but for a crash between a delivery and
//! its record) repeats one. docs/notifications.md is the receiver's guide.
//!
//! One task: it asks the engine for the notices whose transitions are durable, sends each
//! to each URL that does not have it yet, one request at a time, and on a failure (no 2xx
//! within [`REQUEST_TIMEOUT`], a redirect included: none is followed) tries that notice and
//! URL again after a capped exponential backoff with jitter, logging one line per failure.
//! It wakes when this worker writes a notice, when a retry is due, and every
//! [`RESCAN_EVERY`] (notices other workers sharing a PostgreSQL store wrote; several workers
//! may then send the same notice: receivers drop duplicates by event id).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use hmac::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_engine::{Engine, Notice, RunStatus};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::watch;

use crate::outbound::HttpsConnector;

/// Longest a delivery may take, from connecting to the response's head.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The first retry's delay; each failure doubles it, up to [`RETRY_DELAY_MAX`].
const RETRY_DELAY_FIRST: Duration = Duration::from_secs(1);

/// The longest delay between two attempts of a notice at one URL.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(300);

/// How often the sender looks for notices without being woken.
const RESCAN_EVERY: Duration = Duration::from_secs(10);

/// The statuses notified when `--notify-on` is not given.
pub(crate) const NOTIFY_ON_DEFAULT: &str = "paused,suspended,compensation_failed";

/// Why the sender could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotifyError {
    /// The secret file is missing, unsafe or not a secret.
    #[error("notify secret file {path}: {detail}")]
    Secret {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// An https URL, and no trusted roots to check its certificate with.
    #[error("--notify-url with https: cannot load the system's trusted certificates: {0}")]
    Roots(std::io::Error),
}

/// A `--notify-url`: an absolute `http` or `https` URL with a host, without credentials or
/// a fragment.
pub(crate) fn notify_url(text: &str) -> Result<String, String> {
    crate::outbound::http_url(
        text,
        "https://hooks.example.com/keel",
        "put a shared secret in --notify-secret-file instead",
    )?;
    Ok(text.to_string())
}

/// A `--notify-on` word: a run status.
pub(crate) fn status_word(word: &str) -> Result<RunStatus, String> {
    serde_json::from_value(serde_json::Value::String(word.trim().into())).map_err(|_| {
        format!(
            "unknown status {word:?} (running, suspended, paused, compensating, \
             compensation_failed, completed, failed, compensated, resolved)"
        )
    })
}

/// Reads the HMAC key from `path`: refused unless it is a regular file of this user's that
/// nobody else may read, holding at least 16 visible characters (trimmed).
pub(crate) fn read_secret(path: &Path) -> Result<Vec<u8>, NotifyError> {
    crate::worker::read_token_file(path, true)
        .map(String::into_bytes)
        .map_err(|detail| NotifyError::Secret {
            path: path.to_path_buf(),
            detail,
        })
}

/// What a receiver gets: the notice without its delivery records.
#[derive(Serialize)]
struct Payload<'a> {
    event_id: &'a str,
    run_id: &'a str,
    workflow: &'a str,
    status: RunStatus,
    previous_status: RunStatus,
    error: Option<&'a str>,
    /// The transition's time, RFC 3339 (UTC, milliseconds).
    at: String,
    /// The same, in ms since the Unix epoch.
    at_ms: u64,
    parent: Option<&'a str>,
}

impl<'a> Payload<'a> {
    fn of(notice: &'a Notice) -> Payload<'a> {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(notice.at_ms);
        Payload {
            event_id: &notice.event_id,
            run_id: notice.run_id.as_str(),
            workflow: &notice.workflow,
            status: notice.status,
            previous_status: notice.previous_status,
            error: notice.error.as_deref(),
            at: humantime::format_rfc3339_millis(at).to_string(),
            at_ms: notice.at_ms,
            parent: notice.parent.as_ref().map(|p| p.as_str()),
        }
    }
}

/// `sha256=<hex>` of the HMAC-SHA256 of `"<timestamp>.<body>"` under `secret`.
pub(crate) fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The sender's settings and HTTP client.
pub(crate) struct Sender {
    urls: Vec<String>,
    secret: Option<Vec<u8>>,
    client: Client<HttpsConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("urls", &self.urls)
            .field("signed", &self.secret.is_some())
            .finish_non_exhaustive()
    }
}

/// When a notice may next be tried at a URL, and how many tries failed.
struct Retry {
    failures: u32,
    next: Instant,
}

impl Sender {
    /// A sender to `urls`, signing with `secret` if given. The system's trusted roots are
    /// loaded only when a URL is https.
    pub(crate) fn new(urls: Vec<String>, secret: Option<Vec<u8>>) -> Result<Sender, NotifyError> {
        let connector = crate::outbound::connector(urls.iter().any(|u| u.starts_with("https:")))
            .map_err(NotifyError::Roots)?;
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Sender {
            urls,
            secret,
            client,
        })
    }

    /// Delivers notices until `stop` turns true; a delivery under way then is finished and
    /// recorded (within [`REQUEST_TIMEOUT`]), so that a clean stop repeats none.
    pub(crate) async fn run(self, engine: Engine, mut stop: watch::Receiver<bool>) {
        let mut written = engine.notices_written();
        let mut retries: HashMap<(String, String), Retry> = HashMap::new();
        while !*stop.borrow() {
            let wake = match engine.notices().await {
                Ok(notices) => self.pass(&engine, notices, &mut retries, &stop).await,
                Err(error) => {
                    tracing::warn!(%error, "notices could not be read; trying again");
                    Some(Instant::now() + RETRY_DELAY_FIRST)
                }
            };
            let wake = wake
                .unwrap_or_else(|| Instant::now() + RESCAN_EVERY)
                .min(Instant::now() + RESCAN_EVERY);
            tokio::select! {
                _ = stop.changed() => {}
                _ = written.changed() => {}
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Sends every pending notice to every URL that lacks it and whose retry is due; returns
    /// when the next retry is due, if one is.
    async fn pass(
        &self,
        engine: &Engine,
        notices: Vec<Notice>,
        retries: &mut HashMap<(String, String), Retry>,
        stop: &watch::Receiver<bool>,
    ) -> Option<Instant> {
        // Retries of notices that are no longer pending are forgotten.
        retries.retain(|(event_id, _), _| notices.iter().any(|n| &n.event_id == event_id));
        let mut wake: Option<Instant> = None;
        for notice in &notices {
            let mut missing = 0;
            for url in &self.urls {
                if notice.delivered_to.contains(url) {
                    continue;
                }
                if *stop.borrow() {
                    return None;
                }
                let key = (notice.event_id.clone(), url.clone());
                if let Some(retry) = retries.get(&key) {
                    if retry.next > Instant::now() {
                        wake = Some(wake.map_or(retry.next, |w| w.min(retry.next)));
                        missing += 1;
                        continue;
                    }
                }
                match self.deliver(url, notice).await {
                    Ok(()) => {
                        retries.remove(&key);
                        if let Err(error) = engine.notice_delivered(&notice.event_id, url).await {
                            // Sent again at the next pass: at least once.
                            tracing::warn!(url = %shown(url), event_id = %notice.event_id, %error,
                                "a delivered notice could not be recorded");
                            missing += 1;
                        }
                    }
                    Err(reason) => {
                        let retry = retries.entry(key).or_insert(Retry {
                            failures: 0,
                            next: Instant::now(),
                        });
                        retry.failures += 1;
                        let delay = retry_delay(retry.failures);
                        retry.next = Instant::now() + delay;
                        wake = Some(wake.map_or(retry.next, |w| w.min(retry.next)));
                        missing += 1;
                        tracing::warn!(
                            url = %shown(url),
                            event_id = %notice.event_id,
                            error = %reason,
                            failures = retry.failures,
                            next_attempt_in = ?delay,
                            "notice not delivered"
                        );
                    }
                }
            }
            if missing == 0 {
                if let Err(error) = engine.notice_done(&notice.event_id).await {
                    tracing::warn!(event_id = %notice.event_id, %error,
                        "a delivered notice could not be deleted");
                }
            }
        }
        wake
    }

    /// POSTs `notice` to `url`: Ok on a 2xx answer within [`REQUEST_TIMEOUT`].
    async fn deliver(&self, url: &str, notice: &Notice) -> Result<(), String> {
        let body = serde_json::to_vec(&Payload::of(notice)).map_err(|e| e.to_string())?;
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut request = hyper::Request::post(url)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "keel-notify")
            .header("Keel-Event-Id", &notice.event_id)
            .header("Keel-Timestamp", timestamp.to_string());
        if let Some(secret) = &self.secret {
            request = request.header("Keel-Signature", signature(secret, timestamp, &body));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("{e}: {}", source_chain(&e)))?;
        let status = answer.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }
}

/// The causes of `error`, joined (hyper's own message is often just "client error").
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut next = error.source();
    while let Some(cause) = next {
        causes.push(cause.to_string());
        next = cause.source();
    }
    causes.join(": ")
}

/// The delay after `failures` failed tries: [`RETRY_DELAY_FIRST`] doubled per failure up to
/// [`RETRY_DELAY_MAX`], then a random part of its upper half taken off, so that receivers
/// coming back up are not hit by every notice at once.
fn retry_delay(failures: u32) -> Duration {
    let doubled = RETRY_DELAY_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(20));
    let capped = doubled.min(RETRY_DELAY_MAX);
    let jitter = rand::random::<f64>() * 0.5;
    capped.mul_f64(1.0 - jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature is the hex HMAC-SHA256 of "<timestamp>.<body>", as a receiver computes
    /// it with other tools: the expected value is
    /// `printf '1700000000.{}' | openssl dgst -sha256 -hmac key`.
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        assert_eq!(
            signature(b"key", 1_700_000_000, b"{}"),
            "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }

    /// Delays double from one second, never pass five minutes, and keep at least half.
    #[test]
    fn retry_delays_double_up_to_the_cap_with_jitter() {
        for (failures, full) in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (40, 300)] {
            let delay = retry_delay(failures);
            let full = Duration::from_secs(full);
            assert!(delay <= full && delay >= full / 2, "{failures}: {delay:?}");
        }
    }

    /// Only http and https URLs with a host are taken, without credentials.
    #[test]
    fn notify_urls_are_http_or_https_with_a_host() {
        assert!(notify_url("http://127.0.0.1:9/hook").is_ok());
        assert!(notify_url("https://hooks.example.com/keel?x=1").is_ok());
        for bad in [
            "ftp://example.com/",
            "example.com/hook",
            "http:///hook",
            "https://user:pw@example.com/",
            "not a url",
        ] {
            assert!(notify_url(bad).is_err(), "{bad}");
        }
    }

    /// Status words are the API's; an unknown one is refused, named.
    #[test]
    fn status_words_are_run_statuses() {
        assert_eq!(
            status_word("compensation_failed").unwrap(),
            RunStatus::CompensationFailed
        );
        let error = status_word("stalled").unwrap_err();
        assert!(error.contains("\"stalled\""), "{error}");
    }
}

/// `url` as logs show it: scheme, host and port, the path and query left out, since a
/// webhook's URL often carries its secret there.
pub(crate) fn shown(url: &str) -> String {
    match url.parse::<hyper::Uri>() {
        Ok(uri) => match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(authority)) => format!("{scheme}://{authority}/..."),
            _ => "(a URL)".into(),
        },
        Err(_) => "(a URL)".into(),
    }
}

#[cfg(test)]
mod shown_tests {
    #[test]
    fn a_url_is_logged_without_its_path_or_query() {
        assert_eq!(
            super::shown("https://hooks.example.com/services/T0/B0/secret?token=x"),
            "https://hooks.example.com/..."
        );
        assert_eq!(
            super::shown("http://127.0.0.1:9099/hook"),
            "http://127.0.0.1:9099/..."
        );
    }
}
