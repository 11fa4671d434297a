//! The API's HTTP/1.1 server: the accept loop and each connection's life, with the defences a
//! server on a shared machine needs against slow and idle clients (docs/api.md "Safety").
//!
//! - A client has [`Limits::read_timeout`] to send a request's head once the server waits for
//!   it (after connecting, and between keep-alive requests), and again to send its body; a
//!   body declared or found to be over [`Limits::body_bytes_max`] is refused without reading
//!   the rest.
//! - At most [`Limits::connections_max`] connections are open. A connection counts as *busy*
//!   only from when its request has fully arrived until its answer is sent; when the cap is reached,
//!   a new connection evicts the oldest connection that is not busy (an idle one, or one that
//!   trickles its head or body). Idle connections therefore never keep a real request out,
//!   and a request that arrived is never cut off. Only when every connection is busy is a
//!   new one answered `503` and closed.
//! - On the stop signal ([`serve`]) the listener closes at once; a connection with no request
//!   in hand closes at once, one answering a request finishes that answer and closes;
//!   whatever is still open when the grace runs out is dropped.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

use crate::api::ApiError;

/// What the server allows a client.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most open connections.
    pub connections_max: usize,
    /// How long a client may take to send a request's head, and then its body.
    pub read_timeout: Duration,
    /// Largest request body.
    pub body_bytes_max: usize,
    /// After the stop signal, how long open connections may take to finish.
    pub grace: Duration,
}

/// The open connections, oldest first, and whether each is answering a request.
#[derive(Default)]
struct Connections {
    open: Mutex<BTreeMap<u64, Connection>>,
}

#[derive(Clone)]
struct Connection {
    busy: Arc<AtomicUsize>,
    evict: Arc<Notify>,
}

impl Connections {
    /// Admits connection `id`, evicting the oldest connection that is not busy when the cap
    /// is reached; `None` when every connection is busy.
    fn admit(&self, id: u64, max: usize) -> Option<Connection> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= max {
            let idle = open
                .iter()
                .find(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
                .map(|(id, _)| *id)?;
            if let Some(evicted) = open.remove(&idle) {
                evicted.evict.notify_one();
            }
        }
        let connection = Connection {
            busy: Arc::new(AtomicUsize::new(0)),
            evict: Arc::new(Notify::new()),
        };
        open.insert(id, connection.clone());
        Some(connection)
    }

    fn close(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Marks a connection busy while a request that fully arrived is answered.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::AcqRel);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `router` on `listener` until `stop` turns true, then lets open connections finish
/// within the grace. Returns once every connection is closed or dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let connections = Arc::new(Connections::default());
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        next_id += 1;
        // Reap finished connections so the set stays as large as what is open.
        while tasks.try_join_next().is_some() {}
        let Some(connection) = connections.admit(next_id, limits.connections_max) else {
            tracing::warn!(%peer, "every connection is busy: refusing one");
            tasks.spawn(refuse(stream));
            continue;
        };
        let (router, connections, stop) = (router.clone(), connections.clone(), stop.clone());
        let id = next_id;
        tasks.spawn(async move {
            connection_life(stream, router, limits, &connection, stop).await;
            connections.close(id);
        });
    }
    drop(listener);
    tracing::info!(
        open = connections.len(),
        grace = ?limits.grace,
        "the API stopped accepting connections"
    );
    let drained = tokio::time::timeout(limits.grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "connections still open after the grace: dropping them"
        );
        tasks.abort_all();
    }
}

/// One connection: served until the client leaves, it is evicted, or the server stops.
async fn connection_life(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    connection: &Connection,
    mut stop: watch::Receiver<bool>,
) {
    let busy = connection.busy.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        answer(request, router.clone(), limits, busy.clone())
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .max_buf_size(64 * 1024);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    tokio::select! {
        _ = served.as_mut() => return,
        _ = connection.evict.notified() => {}
        _ = stop.wait_for(|stop| *stop) => {}
    }
    // Evicted or stopping: a connection with no request in hand closes now; one answering a
    // request finishes that answer (bounded: a client that never reads it is dropped), then
    // closes.
    if connection.busy.load(Ordering::Acquire) == 0 {
        return;
    }
    served.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.read_timeout.max(limits.grace), served).await;
}

/// Reads the whole body within the read timeout and the size limit, then hands the request
/// to the router with the connection marked busy.
async fn answer(
    request: Request<Incoming>,
    router: Router,
    limits: Limits,
    busy: Arc<AtomicUsize>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.body_bytes_max as u64) {
        return Ok(closing(too_large(limits)));
    }
    let read = Limited::new(body, limits.body_bytes_max).collect();
    let bytes = match tokio::time::timeout(limits.read_timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            return Ok(closing(too_large(limits)));
        }
        Ok(Err(error)) => {
            return Ok(closing(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("reading the request body: {error}"),
            )));
        }
        Err(_) => {
            return Ok(closing(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {:?}",
                    limits.read_timeout
                ),
            )));
        }
    };
    // Busy from here until the answer's last byte is handed to the connection: a request
    // that arrived is never evicted, nor is its answer cut off.
    let busy = Busy::new(&busy);
    let request = Request::from_parts(parts, Body::from(bytes));
    let response = router.oneshot(request).await.unwrap_or_else(|e| match e {});
    Ok(response.map(|body| Body::new(WhileBusy { body, _busy: busy })))
}

/// An answer's body that keeps its connection marked busy until it is sent or dropped.
struct WhileBusy {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for WhileBusy {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

fn too_large(limits: Limits) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!(
            "the request body is over the limit of {} bytes",
            limits.body_bytes_max
        ),
    )
}

/// An error answer after which the connection closes (its body was not read to the end).
fn closing(error: ApiError) -> Response<Body> {
    let mut response = axum::response::IntoResponse::into_response(error);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Answers `503` on a connection the server has no room for, and closes it.
async fn refuse(mut stream: TcpStream) {
    let body =
        r#"{"error":"the worker has no room for another connection now; retry","kind":"busy"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes())).await;
}
