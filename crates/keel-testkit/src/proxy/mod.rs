//! The fault proxy: an HTTP proxy between the AWS SDK and moto that makes moto misbehave the
//! way the real cloud does, by seeded rules, and records every request with what it did to it.
//!
//! It knows each request's service (the SigV4 credential scope of the `Authorization` header)
//! and operation (the query protocol's `Action` for IAM and STS; method and path for IoT and
//! Greengrass, from a table generated from the SDK), and the values in it that can name a
//! resource. Faults ([`Fault`]) answer in the service's real error shape; lag ([`LagRule`])
//! makes new resources read as missing for a while and deleted ones as present; the proxy also
//! plays the parts of real AWS that moto lacks: AssumeRole denial for roles that do not exist or
//! have not propagated ([`AssumeRoleRule`]), and a Greengrass deployment lifecycle
//! ([`DeploymentRule`]). docs/testing.md lists every gap and how it is handled.
//!
//! The proxy runs on a thread of its own with its own runtime, so sync tests (the crash
//! harness's parents) and async tests use it alike, and it outlives the worker processes a test
//! kills.

mod classify;
mod operations;
mod rules;
mod shapes;
mod state;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{http, Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;

pub use rules::{
    AssumeRoleRule, DeploymentRule, Dist, Ec2Rule, Fault, FaultRule, LagRule, Rules, RulesError,
    SERVICES,
};

use classify::{classify, Call};
use shapes::ErrorKind;
use state::{ClientToken, RuleCount, State, Upstream};

/// Largest request body the proxy reads (AWS's own limits are far below).
const BODY_MAX: usize = 16 << 20;
/// Cached read answers kept for delete lag before the cache starts over.
const CACHE_MAX: usize = 10_000;

/// Errors from starting a proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The rules are invalid.
    #[error(transparent)]
    Rules(#[from] RulesError),
    /// The upstream is not an `http://host:port` URL.
    #[error("the upstream {0:?} is not an http://host:port URL")]
    BadUpstream(String),
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The proxy's runtime or thread could not start.
    #[error("cannot start the proxy's runtime: {0}")]
    Runtime(std::io::Error),
}

/// What the proxy did to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Applied {
    /// Answered with the service's throttling error.
    Throttled,
    /// Answered with a 5xx error.
    ServerError {
        /// The status.
        status: u16,
    },
    /// Connection closed before forwarding; moto never saw the request.
    ResetBeforeForward,
    /// Forwarded (moto did it), then the connection was closed without an answer.
    LostResponse,
    /// A new resource read as missing (create lag).
    LagNotFound,
    /// A read during the create lag answered for real (flapping).
    LagFound,
    /// A deleted resource read as present (delete lag), from an earlier answer.
    DeletedStillPresent,
    /// STS AssumeRole denied: the role does not exist or has not propagated.
    AssumeRoleDenied,
    /// GetDeploymentStatus answered by the proxy's deployment lifecycle.
    Deployment {
        /// The status it reported.
        status: String,
    },
    /// EC2: a create with a client token used before, with the same parameters, answered with
    /// the first create's answer (moto was not asked: it would create again).
    ClientTokenReplayed,
    /// EC2: a create with a client token used before with other parameters, answered with
    /// `IdempotentParameterMismatch`.
    ClientTokenMismatch,
    /// EC2: instances moto says are running read `pending` (not started yet, or stuck).
    InstancePending,
    /// EC2: an instance read by id answered as missing (flapping).
    InstanceMissing,
}

/// One request the proxy handled.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// Order of arrival, from 0.
    pub seq: u64,
    /// The service (`iam`, `sts`, `iot`, `greengrass`, `unknown`).
    pub service: String,
    /// The operation (`CreateRole`, ..., `Unknown`).
    pub operation: String,
    /// HTTP method and path.
    pub method: String,
    /// HTTP path.
    pub path: String,
    /// Latency the proxy added, in milliseconds.
    pub latency_ms: u64,
    /// What the proxy did, if anything.
    pub fault: Option<Applied>,
    /// Whether moto saw the request.
    pub forwarded: bool,
    /// moto's status, if it answered.
    pub upstream_status: Option<u16>,
    /// The status the proxy answered; `None` when it closed the connection without an
    /// answer. A client that hung up before the answer got nothing either way.
    pub status: Option<u16>,
}

/// A running fault proxy. Dropping it stops it.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (moto's URL).
    pub fn start(upstream: &str, rules: Rules) -> Result<FaultProxy, ProxyError> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), upstream, rules)
    }

    /// Starts a proxy listening on `listen`.
    pub fn start_on(
        listen: SocketAddr,
        upstream: &str,
        rules: Rules,
    ) -> Result<FaultProxy, ProxyError> {
        rules.validate()?;
        let upstream_base = upstream.trim_end_matches('/').to_string();
        let uri: http::Uri = upstream_base
            .parse()
            .map_err(|_| ProxyError::BadUpstream(upstream.into()))?;
        if uri.scheme_str() != Some("http")
            || uri.authority().is_none()
            || !matches!(uri.path(), "" | "/")
        {
            return Err(ProxyError::BadUpstream(upstream.into()));
        }
        let listener = std::net::TcpListener::bind(listen).map_err(|source| ProxyError::Bind {
            addr: listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| ProxyError::Bind {
            addr: listen,
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ProxyError::Bind {
                addr: listen,
                source,
            })?;
        let shared = Arc::new(Shared {
            upstream: upstream_base,
            client: Client::builder(TokioExecutor::new()).build_http(),
            state: Mutex::new(State::new(rules)),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ProxyError::Runtime)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let serving = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("keel-fault-proxy-{}", addr.port()))
            .spawn(move || runtime.block_on(serve(listener, serving, stopped)))
            .map_err(ProxyError::Runtime)?;
        tracing::info!(%addr, upstream, "fault proxy started");
        Ok(FaultProxy {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The proxy's base URL, to give the SDK as its endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the rules; their counters start over (what the proxy knows of created and
    /// deleted resources stays).
    pub fn set_rules(&self, rules: Rules) -> Result<(), RulesError> {
        rules.validate()?;
        let mut state = self.shared.lock();
        state.fired = vec![RuleCount::default(); rules.faults.len()];
        state.rules = rules;
        Ok(())
    }

    /// Every request so far, in order of arrival.
    pub fn requests(&self) -> Vec<RequestRecord> {
        let mut log = self.shared.lock().log.clone();
        log.sort_by_key(|r| r.seq);
        log
    }

    /// The requests for `operation`.
    pub fn requests_for(&self, operation: &str) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .filter(|r| r.operation == operation)
            .collect()
    }

    /// The faults applied so far, in order of arrival, as (operation, fault).
    pub fn faults(&self) -> Vec<(String, Applied)> {
        self.requests()
            .into_iter()
            .filter_map(|r| r.fault.map(|f| (r.operation, f)))
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "fault proxy cannot use its socket");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "fault proxy accept failed");
                        continue;
                    }
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(shared.clone(), request));
                    if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                        tracing::debug!(error = %e, "fault proxy connection ended");
                    }
                });
            }
        }
    }
}

/// Returned by the handler to make hyper close the connection without answering.
#[derive(Debug, thiserror::Error)]
#[error("connection closed by the fault proxy ({0})")]
struct Dropped(&'static str);

type Answer = Result<Response<Full<Bytes>>, Dropped>;

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Answer {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, BODY_MAX).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::warn!(error = %e, "fault proxy could not read a request body");
            return Ok(plain(
                413,
                format!("request body unreadable or over {BODY_MAX} bytes: {e}"),
            ));
        }
    };
    // From here the request is the service's, as a request AWS has received is carried out
    // whether or not its caller waits for the answer. A caller that hangs up (a worker
    // killed mid-call) makes hyper drop this future; the task goes on, so moto's effect and
    // the proxy's record of it (a deployment's lifecycle, a create's lag, a client token's
    // first answer) stay in step.
    match tokio::spawn(carry_out(shared, parts, body)).await {
        Ok(answer) => answer,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(Dropped("the proxy is stopping")),
    }
}

/// Plays the rules on a received request: its latency, its fault, the parts of AWS the
/// proxy plays itself, or moto's answer; and records it.
async fn carry_out(shared: Arc<Shared>, parts: http::request::Parts, body: Bytes) -> Answer {
    let call = classify(&parts, &body);
    let (seq, latency_ms, fault) = shared.decide(&call);
    let mut record = RequestRecord {
        seq,
        service: call.service.clone(),
        operation: call.operation.clone(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        latency_ms,
        fault: None,
        forwarded: false,
        upstream_status: None,
        status: None,
    };
    if latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
    }
    let answer = shared.answer(&call, &parts, body, fault, &mut record).await;
    record.status = answer.as_ref().ok().map(|r| r.status().as_u16());
    tracing::debug!(
        seq,
        service = %record.service,
        operation = %record.operation,
        fault = ?record.fault,
        status = ?record.status,
        "fault proxy request"
    );
    shared.lock().log.push(record);
    answer
}

fn plain(status: u16, text: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(text)))
        .expect("a valid response")
}

struct Shared {
    upstream: String,
    client: Client<HttpConnector, Full<Bytes>>,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers the request and runs the fault rules.
    fn decide(&self, call: &Call) -> (u64, u64, Option<Fault>) {
        self.lock().decide(call)
    }

    async fn answer(
        &self,
        call: &Call,
        parts: &http::request::Parts,
        body: Bytes,
        fault: Option<Fault>,
        record: &mut RequestRecord,
    ) -> Answer {
        match fault {
            Some(Fault::Throttle) => {
                record.fault = Some(Applied::Throttled);
                return Ok(shapes::error(call, ErrorKind::Throttle, "Rate exceeded"));
            }
            Some(Fault::ServerError { status }) => {
                record.fault = Some(Applied::ServerError { status });
                return Ok(shapes::error(
                    call,
                    ErrorKind::Server(status),
                    "injected by keel-fault-proxy",
                ));
            }
            Some(Fault::ResetBeforeForward) => {
                record.fault = Some(Applied::ResetBeforeForward);
                return Err(Dropped("reset before forwarding"));
            }
            _ => {}
        }
        // EC2's client tokens, which moto ignores: after the faults that stop a request
        // before it reaches EC2, before those that let it through.
        let token = self.lock().client_token(call);
        match token {
            Some(ClientToken::Replay(first)) => {
                record.fault = Some(Applied::ClientTokenReplayed);
                if matches!(fault, Some(Fault::LostResponse)) {
                    return Err(Dropped("lost response"));
                }
                self.lock().replay_answered(call, &first);
                return Ok(first.to_response());
            }
            Some(ClientToken::Mismatch) => {
                record.fault = Some(Applied::ClientTokenMismatch);
                return Ok(shapes::error(
                    call,
                    ErrorKind::IdempotentParameterMismatch,
                    "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).",
                ));
            }
            None => {}
        }
        if let Some(Fault::LostResponse) = fault {
            record.fault = Some(Applied::LostResponse);
            if let Ok(upstream) = self.forward(parts, body, record).await {
                self.observe(call, &upstream, false);
            }
            return Err(Dropped("lost response"));
        }
        if let Some(response) = self.play(call, parts, record).await {
            return Ok(response);
        }
        match self.forward(parts, body, record).await {
            Ok(mut upstream) => {
                self.observe(call, &upstream, true);
                let missing = self.lock().ec2_instances_read(call, &mut upstream, record);
                Ok(missing.unwrap_or_else(|| upstream.to_response()))
            }
            Err(e) => Ok(plain(
                502,
                format!("keel-fault-proxy: upstream {} failed: {e}", self.upstream),
            )),
        }
    }

    /// The parts of AWS the proxy plays itself: the deployment lifecycle, AssumeRole denial,
    /// create lag and delete lag. `None` means: forward to moto.
    async fn play(
        &self,
        call: &Call,
        parts: &http::request::Parts,
        record: &mut RequestRecord,
    ) -> Option<Response<Full<Bytes>>> {
        if let Some(answer) = self.lock().deployment_answer(call, record) {
            return Some(answer);
        }
        if call.service == "sts" && call.operation == "AssumeRole" {
            if let Some(denied) = self.assume_role_denied(call, parts).await {
                record.fault = Some(Applied::AssumeRoleDenied);
                return Some(shapes::error(call, ErrorKind::AccessDenied, &denied));
            }
        }
        self.lock().lag_answer(call, record)
    }

    /// Why AssumeRole must be denied, if it must.
    async fn assume_role_denied(
        &self,
        call: &Call,
        parts: &http::request::Parts,
    ) -> Option<String> {
        let arn = call.param("RoleArn")?.to_string();
        let (known, deny_unknown) = {
            let state = self.lock();
            (
                state.assumable_at(&arn),
                state.rules.assume_role.deny_unknown_roles,
            )
        };
        let denied = |why: &str| {
            Some(format!(
                "User is not authorized to perform: sts:AssumeRole on resource: {arn} ({why}; keel-fault-proxy)"
            ))
        };
        match known {
            Some(assumable_at) if Instant::now() < assumable_at => {
                denied("the role has not propagated yet")
            }
            Some(_) => None,
            None if deny_unknown => {
                let name = arn.rsplit('/').next().unwrap_or_default();
                match self.role_exists(name, parts).await {
                    Ok(true) => None,
                    Ok(false) => denied("the role does not exist"),
                    Err(e) => {
                        tracing::warn!(error = %e, "fault proxy could not ask moto whether a role exists");
                        None
                    }
                }
            }
            None => None,
        }
    }

    /// Asks moto (IAM GetRole, as the caller's account) whether a role exists.
    async fn role_exists(&self, name: &str, parts: &http::request::Parts) -> Result<bool, String> {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("Action", "GetRole")
            .append_pair("Version", "2010-05-08")
            .append_pair("RoleName", name)
            .finish();
        let mut request = Request::builder()
            .method("POST")
            .uri(format!("{}/", self.upstream))
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        if let Some(auth) = parts.headers.get(http::header::AUTHORIZATION) {
            // Same access key (so the same moto account), with IAM as the service.
            let auth = auth
                .to_str()
                .unwrap_or_default()
                .replace("/sts/aws4_request", "/iam/aws4_request");
            request = request.header(http::header::AUTHORIZATION, auth);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        Ok(response.status().is_success())
    }

    async fn forward(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        record: &mut RequestRecord,
    ) -> Result<Upstream, String> {
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut request = Request::builder()
            .method(parts.method.clone())
            .uri(format!("{}{path}", self.upstream));
        for (name, value) in &parts.headers {
            if !matches!(
                name.as_str(),
                "connection" | "keep-alive" | "transfer-encoding"
            ) {
                request = request.header(name, value);
            }
        }
        let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
        record.forwarded = true;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (head, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        record.upstream_status = Some(head.status.as_u16());
        Ok(Upstream {
            status: head.status,
            headers: head.headers,
            body,
        })
    }

    fn observe(&self, call: &Call, upstream: &Upstream, answered: bool) {
        self.lock().observe(call, upstream, answered);
    }
}
