//! The worker's optional OpenTelemetry trace export (`--otlp-endpoint`): the engine's
//! `tracing` spans (`run`, `step`, `attempt`, `wait`, `timer`, `child`, `compensation`) sent
//! as OTLP over HTTP/protobuf to a collector.
//!
//! The engine knows nothing of OpenTelemetry: it makes `tracing` spans with plain fields
//! (`run_id`, `step`, `kind`, `attempt`, `idempotency_key`, `outcome`). Here a
//! `tracing-opentelemetry` layer turns them into OpenTelemetry spans, a batch processor
//! hands them to one export thread, and [`KeelExporter`], on that thread (never on a step's
//! path), renames the fields into the `keel.` namespace, adds `keel.operation` and sets each
//! span's status from its outcome before the OTLP exporter sends the batch.
//!
//! Limits: each export request (retries included) gets [`EXPORT_TIMEOUT`]; the flush at
//! shutdown gets [`FLUSH_TIMEOUT`], so a dead collector never holds a stopping worker; a
//! failed export drops its batch (no run waits for, or fails because of, the collector) and
//! is logged at warn at most once per [`WARN_EVERY`], with how many failed since.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::{Status, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;

use crate::outbound::HttpsConnector;

/// Longest one export may take, from connecting to the collector's answer, retries included.
pub(crate) const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest the flush at shutdown may take: after it the worker exits and the spans still
/// queued are lost.
pub(crate) const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Fewest seconds between two warnings of failed exports.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Most bytes of a collector's answer read (an `ExportTraceServiceResponse` is tiny).
const ANSWER_BYTES_MAX: usize = 64 * 1024;

/// Most spans queued for export; past it new spans are dropped, not waited for.
const QUEUE_SPANS_MAX: usize = 8192;

/// The path of the traces signal under the collector's base URL.
const TRACES_PATH: &str = "/v1/traces";

/// Why the trace export could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OtlpError {
    /// An https endpoint, and no trusted roots to check its certificate with.
    #[error("--otlp-endpoint with https: cannot load the system's trusted certificates: {0}")]
    Roots(#[source] std::io::Error),
    /// The exporter's own HTTP runtime could not be made.
    #[error("--otlp-endpoint: cannot make the exporter's HTTP runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The OTLP exporter refused its configuration.
    #[error("--otlp-endpoint {endpoint}: {source}")]
    Exporter {
        /// The endpoint, as logs show it.
        endpoint: String,
        /// Why.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// An `--otlp-endpoint`: an absolute `http` or `https` URL with a host and without
/// credentials, query or fragment: the collector's base URL, to which `/v1/traces` is added.
pub(crate) fn otlp_endpoint(text: &str) -> Result<String, String> {
    let uri = crate::outbound::http_url(text, "http://127.0.0.1:4318", "they are not supported")?;
    if uri.query().is_some() || text.contains('#') {
        return Err(format!(
            "{text:?} has a query or fragment: give the collector's base URL (e.g. http://127.0.0.1:4318)"
        ));
    }
    Ok(text.to_string())
}

/// What the exporting layer sees, whatever `RUST_LOG` says of the logs: the engine's spans
/// (and the events inside them) at info and above, no other crate's.
pub(crate) fn exported_spans() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_target("keel_engine", tracing::Level::INFO)
}

/// The traces URL of a collector's base URL: `/v1/traces` added to its path.
fn traces_url(endpoint: &str) -> String {
    format!("{}{TRACES_PATH}", endpoint.trim_end_matches('/'))
}

/// The running export: the tracer provider whose batch thread sends the spans. Drop it
/// only through [`TraceExport::shutdown`], which flushes within a bound.
#[derive(Debug)]
pub(crate) struct TraceExport {
    provider: SdkTracerProvider,
}

impl TraceExport {
    /// Starts the export to the collector at `endpoint` (checked by [`otlp_endpoint`]) and
    /// returns it with the `tracing` layer that feeds it.
    pub(crate) fn start<S>(
        endpoint: &str,
    ) -> Result<(TraceExport, impl tracing_subscriber::Layer<S>), OtlpError>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        let client = HyperOtlpClient::new(endpoint.starts_with("https:"))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url(endpoint))
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|source| OtlpError::Exporter {
                endpoint: crate::notify::shown(endpoint),
                source,
            })?;
        let exporter = KeelExporter {
            inner: exporter,
            endpoint: crate::notify::shown(endpoint),
            failures: Failures::default(),
        };
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(QUEUE_SPANS_MAX)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(Resource::builder().with_service_name("keel-worker").build())
            .build();
        let tracer = provider.tracer("keel");
        // No code locations, thread names or busy/idle times: less work per span, on the
        // step's path, for attributes no one asked for.
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false);
        Ok((TraceExport { provider }, layer))
    }

    /// Sends what is queued, within [`FLUSH_TIMEOUT`], and stops the export thread; a
    /// collector that does not answer in time loses those spans, with a warning.
    pub(crate) fn shutdown(self) {
        match self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            Ok(()) => tracing::debug!("trace export flushed"),
            Err(error) => tracing::warn!(
                %error,
                timeout = ?FLUSH_TIMEOUT,
                "trace export: the last spans were not flushed to the collector"
            ),
        }
    }
}

/// Failed exports since the last warning, and when that was.
#[derive(Debug, Default)]
struct Failures {
    since_warning: AtomicU64,
    warned_at: Mutex<Option<Instant>>,
}

impl Failures {
    /// Counts a failure, and says whether to warn now (and of how many) or stay quiet.
    fn count(&self) -> Option<u64> {
        let failed = self.since_warning.fetch_add(1, Ordering::Relaxed) + 1;
        let mut warned_at = self.warned_at.lock().expect("warned_at lock");
        let now = Instant::now();
        if warned_at.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            return None;
        }
        *warned_at = Some(now);
        self.since_warning.store(0, Ordering::Relaxed);
        Some(failed)
    }
}

/// The OTLP exporter, behind the engine-to-OpenTelemetry mapping of each span and the
/// rate-limited warning of failures.
#[derive(Debug)]
struct KeelExporter {
    inner: opentelemetry_otlp::SpanExporter,
    endpoint: String,
    failures: Failures,
}

impl SpanExporter for KeelExporter {
    async fn export(&self, mut batch: Vec<SpanData>) -> OTelSdkResult {
        batch.iter_mut().for_each(keel_span);
        let exported = self.inner.export(batch).await;
        if let Err(error) = &exported {
            if let Some(failed) = self.failures.count() {
                tracing::warn!(
                    endpoint = %self.endpoint,
                    %error,
                    failed_exports = failed,
                    "OTLP trace export failed; its spans are dropped (runs go on; the next \
                     warning comes at most once a minute)"
                );
            }
        }
        exported
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The engine's span fields and their OpenTelemetry attribute names.
const KEEL_ATTRIBUTES: [(&str, &str); 12] = [
    ("run_id", "keel.run_id"),
    ("workflow", "keel.workflow"),
    ("step", "keel.step"),
    ("kind", "keel.kind"),
    ("attempt", "keel.attempt"),
    ("idempotency_key", "keel.idempotency_key"),
    ("outcome", "keel.outcome"),
    ("poll", "keel.poll"),
    ("child", "keel.child_run_id"),
    ("branches", "keel.branches"),
    ("width", "keel.width"),
    ("names", "keel.event_names"),
];

/// Spans of operations: their `keel.operation` is `<name>:<kind>`, as in the statistics.
const OPERATION_SPANS: [&str; 4] = ["step", "wait", "child", "compensation"];

/// Maps one engine span to its exported form: fields renamed into `keel.`, the operation
/// named, and the status set from the outcome (`ok`, `ready`: ok; `retryable`,
/// `permanent`, `failed`, `timed_out`: error; `interrupted` and the rest: unset).
fn keel_span(span: &mut SpanData) {
    let mut outcome = None;
    let mut kind = None;
    for attribute in &mut span.attributes {
        let Some((_, renamed)) = KEEL_ATTRIBUTES
            .iter()
            .find(|(field, _)| *field == attribute.key.as_str())
        else {
            continue;
        };
        attribute.key = opentelemetry::Key::from_static_str(renamed);
        match *renamed {
            "keel.outcome" => outcome = Some(attribute.value.as_str().into_owned()),
            "keel.kind" => kind = Some(attribute.value.as_str().into_owned()),
            _ => {}
        }
    }
    if let Some(kind) = kind {
        if OPERATION_SPANS.contains(&span.name.as_ref()) {
            let operation = format!("{}:{kind}", span.name);
            span.attributes
                .push(KeyValue::new("keel.operation", Value::from(operation)));
        }
    }
    span.status = match outcome.as_deref() {
        Some("ok" | "ready") => Status::Ok,
        Some(failed @ ("retryable" | "permanent" | "failed" | "timed_out")) => {
            Status::error(failed.to_string())
        }
        _ => span.status.clone(),
    };
}

/// The exporter's HTTP client: hyper (with rustls for https), driven by a runtime of its own
/// on the batch processor's export thread, so that an export never takes a thread of the
/// worker's runtime and needs no HTTP crate the worker does not already build.
struct HyperOtlpClient {
    client: Client<HttpsConnector, Full<Bytes>>,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for HyperOtlpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperOtlpClient").finish_non_exhaustive()
    }
}

impl HyperOtlpClient {
    /// A client for http, and for https too when `https` (the system's trusted roots are
    /// loaded only then).
    fn new(https: bool) -> Result<HyperOtlpClient, OtlpError> {
        let connector = crate::outbound::connector(https).map_err(OtlpError::Roots)?;
        // No idle connections kept: between exports (seconds apart) nothing drives them.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(OtlpError::Runtime)?;
        Ok(HyperOtlpClient { client, runtime })
    }

    /// One request, blocking the calling (export) thread until the answer or
    /// [`EXPORT_TIMEOUT`].
    fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let request = hyper::Request::from_parts(parts, Full::new(body));
        self.runtime.block_on(async {
            let answered = tokio::time::timeout(EXPORT_TIMEOUT, async {
                let answer = self.client.request(request).await?;
                let (parts, body) = answer.into_parts();
                let body = Limited::new(body, ANSWER_BYTES_MAX)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            })
            .await;
            match answered {
                Ok(answer) => answer,
                Err(_) => Err(format!("no answer within {EXPORT_TIMEOUT:?}").into()),
            }
        })
    }
}

impl HttpClient for HyperOtlpClient {
    // The trait is an `async_trait`; written out here, so that no macro crate is needed.
    fn send_bytes<'client, 'call>(
        &'client self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'call>>
    where
        'client: 'call,
        Self: 'call,
    {
        // The batch processor's thread polls this with a plain executor: the request blocks
        // that thread, which does nothing else.
        let answer = self.send(request);
        Box::pin(std::future::ready(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_or_https_base_urls() {
        assert!(otlp_endpoint("http://127.0.0.1:4318").is_ok());
        assert!(otlp_endpoint("https://collector.example.com").is_ok());
        for bad in [
            "127.0.0.1:4318",
            "ftp://127.0.0.1:4318",
            "http://",
            "http://user:pw@host:4318",
            "http://host:4318/?x=1",
            "not a url",
        ] {
            assert!(otlp_endpoint(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn traces_go_to_v1_traces_under_the_base_url() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4318/otel/"),
            "http://127.0.0.1:4318/otel/v1/traces"
        );
    }

    #[test]
    fn failures_warn_once_per_period_with_the_count_since() {
        let failures = Failures::default();
        assert_eq!(failures.count(), Some(1));
        assert_eq!(failures.count(), None);
        assert_eq!(failures.count(), None);
        *failures.warned_at.lock().unwrap() = Some(Instant::now() - WARN_EVERY);
        assert_eq!(failures.count(), Some(3));
    }
}
