//! `keel worker`: checks its data directory, takes its port, opens the store (resuming every
//! unfinished run), registers the provisioning workflows, serves the API, and drains on
//! SIGTERM or SIGINT.
//!
//! Data directory layout, under a directory owned by the worker's user and writable by no one
//! else (created with mode 0700): `journal/` (the sled store), `keys/` (device private keys,
//! owner-only) and `api-token` (the API token, mode 0600, made at the first start).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_engine::{Engine, EngineError, Leases};
use keel_steps::aws::x509::{KeyStore, KeyStoreError};
use keel_steps::aws::AwsClients;
use keel_workflows::KeelWorkflows;
use rand::RngCore;

use crate::api::{self, AllowedHosts, AppState};
use crate::limiters::LimiterHistory;
use crate::server::{self, Limits};
use crate::{LogFormat, StoreChoice, WorkerArgs};

/// The token file's name in the data directory.
pub(crate) const TOKEN_FILE: &str = "api-token";

/// Exit code of a worker stopped before its drain finished (the grace ran out, or a second
/// signal came): what was in flight runs again, with the same keys, at the next start.
pub(crate) const EXIT_NOT_DRAINED: u8 = 3;

/// Longest that open API connections get to finish after the stop signal.
const CONNECTION_GRACE_MAX: Duration = Duration::from_secs(5);

/// How the API authenticates requests.
#[derive(Debug)]
pub(crate) enum Auth {
    /// With this token (from `--token-file` or `KEEL_API_TOKEN`).
    Token(String),
    /// With the token in the data directory, made at the first start.
    DataDir,
    /// Not at all (`--no-auth`: loopback only, for tests and embedding).
    None,
}

/// How the worker stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// Every in-flight step finished and was recorded.
    Drained,
    /// The grace ran out first.
    NotDrained,
}

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkerError {
    /// `--no-auth` beyond loopback.
    #[error(
        "refusing to listen on {0} without an API token: --no-auth is for loopback \
         (127.0.0.1) only"
    )]
    TokenRequired(SocketAddr),
    /// The API token could not be made, read, or is not kept safe.
    #[error("API token file {path}: {detail}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The data directory could not be made or is not a directory.
    #[error("data directory {path}: {detail}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The device keys' directory is not the worker's own.
    #[error("{0}")]
    Keys(#[from] KeyStoreError),
    /// The engine did not open (locked by another process, corrupt, ...).
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// `--retention-for` names a workflow this worker does not register.
    #[error("--retention-for {name}: no such workflow (registered: {registered})")]
    UnknownWorkflow {
        /// The name given.
        name: String,
        /// The registered workflows' names.
        registered: String,
    },
    /// The store can make nothing durable any more (a failed sync, a lost lease): the
    /// worker exits so that its supervisor starts a fresh one.
    #[error("the store can make nothing durable any more ({0}): exiting so that a fresh worker takes over")]
    StoreBroken(String),
    /// The notification settings cannot be used (the secret file, https roots).
    #[error("{0}")]
    Notify(#[from] crate::notify::NotifyError),
    /// The trace export (`--otlp-endpoint`) cannot be set up.
    #[error("{0}")]
    Otlp(#[from] crate::otlp::OtlpError),
    /// Anything else of the runtime.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl WorkerError {
    /// The process exit code: 2 for a refused configuration, 1 otherwise.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            WorkerError::TokenRequired(_)
            | WorkerError::DataDir { .. }
            | WorkerError::Token { .. }
            | WorkerError::Keys(_)
            | WorkerError::Notify(_)
            | WorkerError::Otlp(_) => 2,
            WorkerError::UnknownWorkflow { .. } => 2,
            _ => 1,
        }
    }
}

/// Runs the worker until SIGTERM or SIGINT; says whether the drain finished.
pub(crate) fn run(args: WorkerArgs, data_dir: PathBuf, auth: Auth) -> Result<Stopped, WorkerError> {
    if !args.listen.ip().is_loopback() && matches!(auth, Auth::None) {
        return Err(WorkerError::TokenRequired(args.listen));
    }
    let export = init_tracing(args.log_format, args.otlp_endpoint.as_deref())?;
    let stopped = run_traced(args, data_dir, auth);
    // After the runtime stopped, so that the spans its last tasks ended are sent too.
    if let Some(export) = export {
        export.shutdown();
    }
    stopped
}

/// [`run`] once its logging (and trace export) is set up.
fn run_traced(args: WorkerArgs, data_dir: PathBuf, auth: Auth) -> Result<Stopped, WorkerError> {
    descriptors_for(args.connections_max.into());
    make_data_dir(&data_dir)?;
    KeyStore::new(data_dir.join("keys")).check()?;
    let token = match auth {
        Auth::Token(token) => Some(token),
        Auth::DataDir => Some(data_dir_token(&data_dir)?),
        Auth::None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let stopped = runtime.block_on(serve(args, data_dir, token));
    // Steps still in flight after the grace are abandoned here; they run again at the next
    // start with the same idempotency keys.
    runtime.shutdown_timeout(Duration::from_secs(1));
    stopped
}

/// Logs to stderr and, given an OTLP endpoint, exports the engine's spans there too
/// (returned, to be flushed at exit).
fn init_tracing(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> Result<Option<crate::otlp::TraceExport>, WorkerError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,aws_config=warn,aws_smithy_runtime=warn".into());
    let Some(endpoint) = otlp_endpoint else {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        match format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
        return Ok(None);
    };
    use tracing_subscriber::prelude::*;
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.with_filter(filter).boxed(),
        LogFormat::Json => logs.json().with_filter(filter).boxed(),
    };
    let (export, spans) = crate::otlp::TraceExport::start(endpoint)?;
    tracing_subscriber::registry()
        .with(logs)
        .with(spans.with_filter(crate::otlp::exported_spans()))
        .init();
    Ok(Some(export))
}

/// Creates `path` (and parents) owner-only if missing; refuses a path that is not a
/// directory, or one that another user owns or may write to (they could plant keys, links or
/// a token of their own).
fn make_data_dir(path: &Path) -> Result<(), WorkerError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| WorkerError::DataDir {
                path: path.to_path_buf(),
                detail: format!("cannot create it: {e}"),
            })?,
        Err(e) => {
            return Err(WorkerError::DataDir {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })
        }
    }
    // Checked after creating too: someone may have made it in between.
    owner_only(path)
}

/// Raises the soft limit on open files to the hard one: the API's connections and the AWS
/// clients' share it, and a worker out of descriptors cannot even accept a health check.
/// Warns when the connection cap leaves too few for the rest.
fn descriptors_for(connections_max: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if limit.current != limit.maximum {
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, "could not raise the open-file limit");
        }
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if now < connections_max.saturating_add(256) {
        tracing::warn!(
            open_files = now,
            connections_max,
            "the open-file limit leaves little room beyond --connections-max for the store \
             and AWS; lower --connections-max or raise the limit"
        );
    }
}

/// Refuses a data directory that is not a directory, is owned by another user, or that group
/// or others may write to (it may be reached through a link: what it points at is checked).
fn owner_only(path: &Path) -> Result<(), WorkerError> {
    let error = |detail: String| WorkerError::DataDir {
        path: path.to_path_buf(),
        detail,
    };
    let meta = std::fs::metadata(path).map_err(|e| error(e.to_string()))?;
    if !meta.is_dir() {
        return Err(error("exists and is not a directory".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(error(format!(
            "owned by uid {}, not by this worker's user (uid {me}): it must be the worker's own",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(error(format!(
            "mode {mode:04o} lets other users write to it: make it owner-only (chmod 700 {})",
            path.display()
        )));
    }
    Ok(())
}

/// The API token kept in the data directory, made at the first start: 32 random bytes in hex,
/// written whole to a new owner-only file that is then linked into place, so a crash leaves
/// either no token file or a complete one.
fn data_dir_token(data_dir: &Path) -> Result<String, WorkerError> {
    let path = data_dir.join(TOKEN_FILE);
    let error = |detail: String| WorkerError::Token {
        path: path.clone(),
        detail,
    };
    if std::fs::symlink_metadata(&path).is_ok() {
        return read_token_file(&path, false).map_err(error);
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let temporary = data_dir.join(format!(".{TOKEN_FILE}.{:016x}", rand::random::<u64>()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(format!("{token}\n").as_bytes())?;
            file.sync_all()
        });
    let linked = written.and_then(|()| std::fs::hard_link(&temporary, &path));
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => {
            std::fs::File::open(data_dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| error(format!("cannot sync its directory: {e}")))?;
            tracing::info!(path = %path.display(), "made the API token");
            Ok(token)
        }
        // Another process made it first: use theirs, after the same checks.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_token_file(&path, false).map_err(error)
        }
        Err(e) => Err(error(format!("cannot create it: {e}"))),
    }
}

/// Fewest characters of a token.
const TOKEN_CHARS_MIN: usize = 16;

/// The token in `path`, trimmed: refused when the file is not a regular file owned by this
/// user that no one else may read, or is empty. `follow` lets `path` be a link (a file named
/// on the command line); the data directory's own file never is one.
pub(crate) fn read_token_file(path: &Path, follow: bool) -> Result<String, String> {
    let mut options = std::fs::OpenOptions::new();
    // Non-blocking, so that a FIFO planted or named as the token file cannot hang the open.
    let mut flags = libc::O_NONBLOCK;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    options.read(true).custom_flags(flags);
    let file = options
        .open(path)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "owned by uid {}, not by this user (uid {me})",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {mode:04o} lets other users read it: make it owner-only (chmod 600 {})",
            path.display()
        ));
    }
    let mut text = String::new();
    file.take(4096)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it: {e}"))?;
    check_token(text.trim())?;
    Ok(text.trim().to_string())
}

/// A token is at least [`TOKEN_CHARS_MIN`] visible ASCII characters, without spaces.
pub(crate) fn check_token(token: &str) -> Result<(), String> {
    if token.len() < TOKEN_CHARS_MIN || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "the token must be at least {TOKEN_CHARS_MIN} visible ASCII characters without \
             spaces"
        ));
    }
    Ok(())
}

/// Takes the port, opens the engine, serves the API until SIGTERM or SIGINT, then drains.
async fn serve(
    args: WorkerArgs,
    data_dir: PathBuf,
    token: Option<String>,
) -> Result<Stopped, WorkerError> {
    // The port first: a worker that cannot serve must not resume runs and call AWS.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| WorkerError::Listen {
            addr: args.listen,
            source,
        })?;
    let addr = listener.local_addr()?;
    let mut signals = Signals::install()?;
    // Checked before the store opens, like the port: a worker that cannot notify must not
    // make transitions nobody hears of.
    let sender = notice_sender(&args)?;
    let engine = open_engine(&args, &data_dir).await?;
    let grace = Duration::from_secs(args.grace_s);
    if futures_util::FutureExt::now_or_never(signals.next()).is_some() {
        // Stopped while the store opened: drain what the open resumed, serve nothing.
        return Ok(drain(&engine, grace).await);
    }
    let counting = announce_ready(&engine, addr, &args, &data_dir, token.as_deref())?;
    let limiters = Arc::new(LimiterHistory::default());
    let state = Arc::new(AppState {
        engine: engine.clone(),
        token,
        hosts: AllowedHosts {
            listen: addr,
            names: args.allowed_host.clone(),
        },
        limiters: limiters.clone(),
    });
    let limits = api_limits(&args, grace);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(limiters.run(engine.clone(), stopping.clone()));
    let notices = sender.map(|sender| tokio::spawn(sender.run(engine.clone(), stopping.clone())));
    let server = tokio::spawn(server::serve(
        listener,
        api::router(state),
        limits,
        stopping,
    ));
    tokio::select! {
        _ = signals.next() => {}
        reason = engine.broken() => {
            let _ = stop.send(true);
            let _ = server.await;
            return Err(WorkerError::StoreBroken(reason));
        }
    }
    exit_on_second_signal(signals);
    let _ = stop.send(true);
    tracing::info!(
        ?grace,
        "draining: the API stopped accepting, no new steps start, in-flight steps may finish"
    );
    if let Some(mut notices) = notices {
        // The sender finishes and records a delivery under way (the stop was sent above);
        // one cut off here is sent again at the next start: at least once.
        let within = grace.min(crate::notify::REQUEST_TIMEOUT + Duration::from_secs(1));
        if tokio::time::timeout(within, &mut notices).await.is_err() {
            notices.abort();
        }
    }
    let stopped = drain(&engine, grace).await;
    let _ = server.await;
    if let Some(mut counting) = counting {
        // It holds the engine: gone before `serve` returns, as the store is.
        counting.0.abort();
        let _ = (&mut counting.0).await;
    }
    Ok(stopped)
}

/// A task aborted when this goes, on every way out of `serve` (it holds the engine).
struct AbortedOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortedOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Logs that the worker is ready, with how many runs it resumed, and prints the API's
/// address as the first line on stdout. Counts not at hand (a sled store counting its runs
/// after a crash, in the background; PostgreSQL's query) are not waited for: a task logs
/// them when they come, returned to be ended with the worker.
fn announce_ready(
    engine: &Engine,
    addr: SocketAddr,
    args: &WorkerArgs,
    data_dir: &Path,
    token: Option<&str>,
) -> Result<Option<AbortedOnDrop>, WorkerError> {
    fn unfinished(counts: &std::collections::BTreeMap<keel_engine::RunStatus, u64>) -> u64 {
        counts
            .iter()
            .filter(|(status, _)| !status.is_terminal())
            .map(|(_, n)| n)
            .sum()
    }
    // One call, polled once here and, if not ready, driven on by the task.
    let mut counts = Box::pin({
        let engine = engine.clone();
        async move { engine.run_counts().await }
    });
    let (counted, counting) = match futures_util::FutureExt::now_or_never(&mut counts) {
        Some(counts) => (Some(unfinished(&counts?)), None),
        None => {
            let counting = tokio::spawn(async move {
                match counts.await {
                    Ok(counts) => {
                        tracing::info!(unfinished = unfinished(&counts), "runs counted")
                    }
                    Err(error) => tracing::error!(%error, "the runs could not be counted"),
                }
            });
            (None, Some(AbortedOnDrop(counting)))
        }
    };
    tracing::info!(
        %addr,
        data_dir = %data_dir.display(),
        aws_endpoint = args.aws_endpoint.as_deref().unwrap_or("AWS"),
        unfinished = counted,
        auth = token.is_some(),
        "worker ready"
    );
    // The first line on stdout is the API's address (port 0 picks a free one), for scripts.
    println!("keel worker listening on http://{addr}");
    Ok(counting)
}

/// The API server's limits from the worker's arguments; open connections get at most
/// [`CONNECTION_GRACE_MAX`] of the drain's grace.
fn api_limits(args: &WorkerArgs, grace: Duration) -> Limits {
    Limits {
        connections_max: args.connections_max.into(),
        read_timeout: Duration::from_secs(args.read_timeout_s),
        body_bytes_max: api::BODY_BYTES_MAX,
        grace: grace.min(CONNECTION_GRACE_MAX),
    }
}

/// Exits at once, not drained, on a second stop signal during the drain.
fn exit_on_second_signal(mut signals: Signals) {
    tokio::spawn(async move {
        signals.next().await;
        tracing::warn!(
            "second signal: exiting now; unfinished steps run again, with the same \
             idempotency keys, at the next start"
        );
        std::process::exit(EXIT_NOT_DRAINED.into());
    });
}

/// Opens the engine on the data directory's journal, with the provisioning workflows and
/// the AWS clients and key store their steps use.
async fn open_engine(args: &WorkerArgs, data_dir: &Path) -> Result<Engine, WorkerError> {
    let mut aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(args.aws_region.clone()));
    if let Some(endpoint) = &args.aws_endpoint {
        aws = aws.endpoint_url(endpoint);
    }
    let sdk = aws.load().await;
    let mut builder = Engine::builder(data_dir.join("journal"))
        .provisioning_workflows()
        // Calls no AWS API: for trying the events API (`keel send`, `keel get`).
        .workflow::<keel_workflows::sample::Inbox>()
        .runs_concurrent_max(args.runs_concurrent_max)
        .retention(args.retention)
        .resource(AwsClients::new(&sdk))
        .resource(KeyStore::new(data_dir.join("keys")));
    // Checked before the store opens: a typo would silently keep runs for the default time.
    let registered = builder.workflow_names();
    for (workflow, kept) in &args.retention_for {
        if !registered.contains(workflow) {
            return Err(WorkerError::UnknownWorkflow {
                name: workflow.clone(),
                registered: registered.join(", "),
            });
        }
        builder = builder.retention_for(workflow, *kept);
    }
    if args.allow_unregistered {
        builder = builder.allow_unregistered();
    }
    if !args.notify_url.is_empty() {
        // Without a URL no notice is written: nobody would ever take it out of the store.
        builder = builder.notify_on(&args.notify_on);
    }
    if args.accept_data_loss {
        builder = builder.accept_data_loss();
    }
    if let Some(mib) = args.sled_cache_mib {
        match &args.store {
            StoreChoice::Postgres(_) => {
                tracing::warn!("--sled-cache-mib with a PostgreSQL store: it has no effect")
            }
            StoreChoice::Sled => builder = builder.sled_cache_bytes(mib * 1024 * 1024),
        }
    }
    if let StoreChoice::Postgres(url) = &args.store {
        let lease = Duration::from_millis(args.lease_ms);
        builder = builder.postgres(url).leases(Leases {
            length: lease,
            renew_every: lease / 5,
            claim_every: lease / 5,
        });
    }
    match builder.open().await {
        // Its lease ended while it opened (a paused worker): as after any break, a fresh
        // worker takes over.
        Err(EngineError::BrokeWhileOpening { reason, source }) => Err(WorkerError::StoreBroken(
            format!("{reason}; the open failed on: {source}"),
        )),
        opened => Ok(opened?),
    }
}

/// The notice sender the arguments ask for, if any: its secret read and checked.
fn notice_sender(args: &WorkerArgs) -> Result<Option<crate::notify::Sender>, WorkerError> {
    if args.notify_url.is_empty() {
        if args.notify_secret_file.is_some() {
            tracing::warn!("--notify-secret-file without --notify-url: nothing is notified");
        }
        return Ok(None);
    }
    let secret = match &args.notify_secret_file {
        Some(path) => Some(crate::notify::read_secret(path)?),
        None => None,
    };
    let sender = crate::notify::Sender::new(args.notify_url.clone(), secret)?;
    let shown: Vec<String> = args
        .notify_url
        .iter()
        .map(|u| crate::notify::shown(u))
        .collect();
    tracing::info!(urls = ?shown, on = ?args.notify_on, "notifying");
    Ok(Some(sender))
}

/// Shuts the engine down within `grace`: whether in-flight steps finished (those that did
/// not run again, with the same keys, at the next start).
async fn drain(engine: &Engine, grace: Duration) -> Stopped {
    if tokio::time::timeout(grace, engine.shutdown()).await.is_ok() {
        tracing::info!("drained; unfinished runs resume at the next start");
        Stopped::Drained
    } else {
        tracing::warn!(
            ?grace,
            "in-flight steps did not finish within the grace period; they run again, with \
             the same idempotency keys, at the next start"
        );
        Stopped::NotDrained
    }
}

/// SIGTERM and SIGINT, installed before anything runs so that none is lost.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM"),
            _ = self.int.recv() => tracing::info!("SIGINT"),
        }
    }
}
