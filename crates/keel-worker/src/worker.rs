//! `keel worker`: opens the store (resuming every unfinished run), registers the provisioning
//! workflows, serves the API, and drains on SIGTERM or SIGINT.
//!
//! Data directory layout: `journal/` (the sled store) and `keys/` (device private keys,
//! owner-only), under a directory created with mode 0700.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_engine::{Engine, EngineError};
use keel_steps::aws::x509::KeyStore;
use keel_steps::aws::AwsClients;
use keel_workflows::KeelWorkflows;

use crate::api::{self, AppState};
use crate::{LogFormat, WorkerArgs};

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Listening beyond loopback without a token.
    #[error(
        "refusing to listen on {0} without an API token: set KEEL_API_TOKEN or --token-file, \
         or listen on loopback (127.0.0.1)"
    )]
    TokenRequired(SocketAddr),
    /// The data directory could not be made or is not a directory.
    #[error("data directory {path}: {detail}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
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
    /// Anything else of the runtime.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl WorkerError {
    /// The process exit code: 2 for a refused configuration, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            WorkerError::TokenRequired(_) => 2,
            _ => 1,
        }
    }
}

/// Runs the worker until SIGTERM or SIGINT.
pub fn run(args: WorkerArgs, token: Option<String>) -> Result<(), WorkerError> {
    if !args.listen.ip().is_loopback() && token.is_none() {
        return Err(WorkerError::TokenRequired(args.listen));
    }
    init_tracing(args.log_format);
    make_data_dir(&args.data_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args, token))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,aws_config=warn,aws_smithy_runtime=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Creates `path` (and parents) owner-only if missing; refuses a path that is not a directory.
fn make_data_dir(path: &Path) -> Result<(), WorkerError> {
    use std::os::unix::fs::DirBuilderExt;
    let error = |detail: String| WorkerError::DataDir {
        path: path.to_path_buf(),
        detail,
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(error("exists and is not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| error(format!("cannot create it: {e}"))),
        Err(e) => Err(error(e.to_string())),
    }
}

async fn serve(args: WorkerArgs, token: Option<String>) -> Result<(), WorkerError> {
    let mut aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(args.aws_region.clone()));
    if let Some(endpoint) = &args.aws_endpoint {
        aws = aws.endpoint_url(endpoint);
    }
    let sdk = aws.load().await;
    let mut builder = Engine::builder(args.data_dir.join("journal"))
        .provisioning_workflows()
        .runs_concurrent_max(args.max_concurrent)
        .resource(AwsClients::new(&sdk))
        .resource(KeyStore::new(args.data_dir.join("keys")));
    if args.allow_unregistered {
        builder = builder.allow_unregistered();
    }
    if args.accept_data_loss {
        builder = builder.accept_data_loss();
    }
    let engine = builder.open().await?;
    let unfinished = engine
        .list()
        .await?
        .iter()
        .filter(|r| !r.status.is_terminal())
        .count();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| WorkerError::Listen {
            addr: args.listen,
            source,
        })?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        data_dir = %args.data_dir.display(),
        aws_endpoint = args.aws_endpoint.as_deref().unwrap_or("AWS"),
        unfinished,
        token = token.is_some(),
        "worker ready"
    );
    // The first line on stdout is the API's address (port 0 picks a free one), for scripts.
    println!("keel worker listening on http://{addr}");
    let state = Arc::new(AppState {
        engine: engine.clone(),
        token,
    });
    let served = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(signalled())
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "the API server failed");
    }
    let grace = Duration::from_secs(args.grace_s);
    tracing::info!(
        ?grace,
        "draining: no new steps start; in-flight steps may finish"
    );
    match tokio::time::timeout(grace, engine.shutdown()).await {
        Ok(()) => tracing::info!("drained; unfinished runs resume at the next start"),
        Err(_) => tracing::warn!(
            ?grace,
            "in-flight steps did not finish within the grace period; they run again, with \
             the same idempotency keys, at the next start"
        ),
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
async fn signalled() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
