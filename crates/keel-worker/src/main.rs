//! `keel`: the worker that runs Keel's provisioning workflows, and the CLI that drives a
//! running worker over its HTTP admin API.
//!
//! ```text
//! keel worker --data-dir ./keel-data --listen 127.0.0.1:7878 --aws-endpoint http://127.0.0.1:4566
//! keel start greengrass.provision-core --id plant --input core.json --wait
//! keel status plant | keel list --status running | keel history plant | keel stats
//! keel cancel|pause|resume|retry-compensation ID, keel resolve ID --note TEXT
//! keel send ID NAME --data FILE|- [--event-id X], keel get ID NAME [--wait 30s] [--after N]
//! keel schedule create NAME (--cron EXPR | --every 1h) --workflow W --input FILE|- | list | show|pause|resume|delete NAME
//! ```
//!
//! Exit codes: 0 success; 1 failure (the worker failed, is unreachable, or a waited-for run
//! did not complete); 2 refused (bad usage, bad input, a conflicting or unknown id); 3 the
//! worker stopped before its drain finished; 4 `keel get` found no value (newer than
//! `--after`).

// The CLI's output is its job: tables and JSON on stdout, errors and progress on stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod api;
mod client;
mod history;
mod metrics;
mod notify;
mod server;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Runs Keel's provisioning workflows (`keel worker`) and drives a running worker.
#[derive(Parser)]
#[command(
    name = "keel",
    version,
    after_help = "Exit codes: 0 success (for the worker: it drained); 1 failure (the worker \
                  failed or is unreachable, or a waited-for run did not complete); 2 refused \
                  (bad usage, bad input, a conflicting or unknown id); 3 the worker stopped \
                  before its drain finished; 4 `keel get` found no value (newer than --after)."
)]
struct Cli {
    /// The worker's API (for every verb but `worker`).
    #[arg(
        long,
        env = "KEEL_API",
        global = true,
        default_value = "http://127.0.0.1:7878"
    )]
    api: String,
    /// The worker's data directory: its journal, device keys and API token. The worker
    /// makes the token (`api-token`, mode 0600) at its first start; the CLI reads it from
    /// there unless `--token-file` or `KEEL_API_TOKEN` gives one.
    #[arg(
        long,
        env = "KEEL_DATA_DIR",
        global = true,
        default_value = "./keel-data"
    )]
    data_dir: PathBuf,
    /// A file holding the API token (owner-only), instead of the data directory's; else
    /// `KEEL_API_TOKEN`.
    #[arg(long, env = "KEEL_API_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the worker: opens the store, resumes unfinished runs, serves the API.
    Worker(WorkerArgs),
    /// Starts a run (idempotent by id: the same id and input return the existing run).
    Start {
        /// The workflow, e.g. `greengrass.provision-core`.
        workflow: String,
        /// The run's id (its idempotency key).
        #[arg(long)]
        id: String,
        /// The input: a JSON file, or `-` for standard input.
        #[arg(long)]
        input: String,
        /// Wait until the run ends, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// One run's record.
    Status {
        /// The run id.
        id: String,
    },
    /// Runs in id order, a page at a time: every status, or one.
    List {
        /// running, suspended, paused, completed, failed, compensating, compensated,
        /// compensation_failed, ...
        #[arg(long)]
        status: Option<String>,
        /// Start after this run id (the `next` a previous page named).
        #[arg(long)]
        after: Option<String>,
        /// Most runs shown (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// A run's journal as a table: step, kind, attempts, duration, outcome, compensation.
    History {
        /// The run id.
        id: String,
    },
    /// Cancels a run: it compensates.
    Cancel {
        /// The run id.
        id: String,
    },
    /// Pauses a run once its in-flight steps end.
    Pause {
        /// The run id.
        id: String,
    },
    /// Resumes a paused or suspended run.
    Resume {
        /// The run id.
        id: String,
    },
    /// Retries the compensation of a run whose compensation failed.
    RetryCompensation {
        /// The run id.
        id: String,
    },
    /// Marks a run whose compensation failed as resolved by an operator.
    Resolve {
        /// The run id.
        id: String,
        /// What the operator did.
        #[arg(long)]
        note: String,
    },
    /// Schedules: workflows started on a cron expression (UTC) or an interval.
    Schedule {
        #[command(subcommand)]
        command: client::schedules::ScheduleCommand,
    },
    /// Latency per operation: count, min, mean, max, sigma, p50, p99 and the worst outliers.
    Stats,
    /// Sends an event to a run; a receive of NAME in the run takes it. Idempotent by event
    /// id: the same id again is the same event.
    Send {
        /// The run id.
        id: String,
        /// The event's name (1 to 64 of ASCII letters, digits, `.`, `_` and `-`).
        name: String,
        /// The payload: a JSON file, or `-` for standard input.
        #[arg(long)]
        data: String,
        /// The event's id (1 to 128 printable ASCII characters, no spaces). Without it, a new
        /// one is made and printed on stderr: retry a send whose answer got lost with it, or
        /// the retry is a second event.
        #[arg(long)]
        event_id: Option<String>,
    },
    /// The latest value a run published under NAME, with its version. Exits 4 when there is
    /// none (or none newer than --after).
    Get {
        /// The run id.
        id: String,
        /// The value's name.
        name: String,
        /// Wait up to this long for a value (newer than --after): 500ms, 30s, 1m or plain
        /// seconds; at most 60 s. It ends early when the run can publish nothing more.
        #[arg(long, value_parser = api::parse_wait)]
        wait: Option<Duration>,
        /// The version already seen: only a newer value counts.
        #[arg(long)]
        after: Option<u64>,
    },
}

/// How the worker logs.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `keel worker` (its data directory is the global `--data-dir`, created owner-only if
/// missing).
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// Where the API listens.
    #[arg(long, env = "KEEL_LISTEN", default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// Serve the API without a token. Loopback only; for tests and embedding: any local user
    /// (and any process of theirs) can then start runs.
    #[arg(long, env = "KEEL_NO_AUTH")]
    pub no_auth: bool,
    /// Another name requests may give in `Host` (a proxy's or a DNS name of this machine),
    /// beyond the listen address and, on loopback, `localhost`. Repeatable.
    #[arg(long, env = "KEEL_ALLOWED_HOSTS", value_delimiter = ',', value_parser = host_name)]
    pub allowed_host: Vec<String>,
    /// Most open API connections; at the cap a new one evicts the oldest idle one.
    #[arg(long, env = "KEEL_CONNECTIONS_MAX", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub connections_max: u16,
    /// Seconds a client has to send a request's head, and then its body.
    #[arg(long, env = "KEEL_READ_TIMEOUT_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub read_timeout_s: u64,
    /// The AWS endpoint URL (moto, a proxy); default: the real AWS endpoints.
    #[arg(long, env = "KEEL_AWS_ENDPOINT", value_parser = endpoint_url)]
    pub aws_endpoint: Option<String>,
    /// The AWS region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub aws_region: String,
    /// Most runs driven at once.
    #[arg(
        long,
        alias = "max-concurrent",
        env = "KEEL_RUNS_CONCURRENT_MAX",
        default_value_t = 1000
    )]
    pub runs_concurrent_max: usize,
    /// On SIGTERM or SIGINT, how long in-flight steps get to finish (seconds); a second
    /// signal exits at once.
    #[arg(long, env = "KEEL_GRACE_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub grace_s: u64,
    /// Log format.
    #[arg(long, env = "KEEL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Open a store whose unfinished runs need workflows or step kinds this worker does not
    /// have, leaving those runs as they are. Without it the worker refuses to start and
    /// names every missing type.
    #[arg(long, env = "KEEL_ALLOW_UNREGISTERED")]
    pub allow_unregistered: bool,
    /// Open a store that lost data it had acknowledged (sled's log holds less than its
    /// high-water mark, `journal/keel.mark`) and go on with what is left. Without it the
    /// worker refuses to start and names the loss: restore the data directory from a backup
    /// first if you have one.
    #[arg(long, env = "KEEL_ACCEPT_DATA_LOSS")]
    pub accept_data_loss: bool,
    /// Where runs are kept: `sled` (an embedded store in DATA_DIR/journal, the default) or a
    /// PostgreSQL URL, `postgres://user:password@host:port/database` (pass it in KEEL_STORE
    /// rather than on the command line, where other users can read the password). The
    /// worker creates or migrates the database's schema. Several workers may share one
    /// database: each drives the runs it owns and takes over those of a worker whose lease
    /// ran out.
    #[arg(long, env = "KEEL_STORE", default_value = "sled", value_parser = store_choice, hide_env_values = true)]
    pub store: StoreChoice,
    /// With a PostgreSQL store: how long this worker's runs stay its own without a renewal
    /// (milliseconds); another worker takes them over after that. The lease is renewed, and
    /// runs of gone workers looked for, every fifth of it.
    #[arg(long, env = "KEEL_LEASE_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1_000..=600_000))]
    pub lease_ms: u64,
    /// POST a JSON event to this http(s) URL whenever a run enters a status of --notify-on,
    /// retried with backoff until it answers 2xx; at least once, with an event id to drop
    /// duplicates by (docs/notifications.md). Repeatable; in the environment, comma-separated.
    #[arg(long, env = "KEEL_NOTIFY_URL", value_delimiter = ',', value_parser = notify::notify_url)]
    pub notify_url: Vec<String>,
    /// A file (owner-only) holding the key that signs every notification:
    /// `Keel-Signature: sha256=<hex HMAC-SHA256 of "<Keel-Timestamp>.<body>">`.
    #[arg(long, env = "KEEL_NOTIFY_SECRET_FILE")]
    pub notify_secret_file: Option<PathBuf>,
    /// The statuses whose entry is notified, comma-separated (any run status).
    #[arg(long, env = "KEEL_NOTIFY_ON", value_delimiter = ',', default_value = notify::NOTIFY_ON_DEFAULT, value_parser = notify::status_word)]
    pub notify_on: Vec<keel_engine::RunStatus>,
}

/// Where a worker keeps its runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded sled store in the data directory.
    Sled,
    /// A PostgreSQL database, by URL.
    Postgres(String),
}

/// A `--store`: `sled` or a `postgres://` (or `postgresql://`) URL.
fn store_choice(text: &str) -> Result<StoreChoice, String> {
    if text == "sled" {
        return Ok(StoreChoice::Sled);
    }
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return Ok(StoreChoice::Postgres(text.to_string()));
    }
    Err("expected `sled` or a PostgreSQL URL (postgres://user:password@host:port/database)".into())
}

/// An `--aws-endpoint`: an absolute `http` or `https` URL with a host.
fn endpoint_url(text: &str) -> Result<String, String> {
    let uri: axum::http::Uri = text
        .parse()
        .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.host().is_none_or(str::is_empty) {
        return Err(format!(
            "{text:?} is not an http(s) URL with a host (e.g. http://127.0.0.1:4566)"
        ));
    }
    Ok(text.to_string())
}

/// An `--allowed-host` name: letters, digits, `.` and `-`, lowercased.
fn host_name(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 253
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if !ok {
        return Err(format!(
            "{text:?} is not a host name (letters, digits, . and -; no port)"
        ));
    }
    Ok(text.to_ascii_lowercase())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let token = match client::token(cli.token_file.as_deref()) {
        Ok(token) => token,
        Err(message) => {
            eprintln!("keel: {message}");
            return ExitCode::from(2);
        }
    };
    if let Command::Worker(args) = cli.command {
        return run_worker(args, cli.data_dir, token);
    }
    run_client(cli, token)
}

/// `keel worker`: decides how the API authenticates, runs the worker and maps how it
/// stopped to the exit code.
fn run_worker(args: WorkerArgs, data_dir: PathBuf, token: Option<String>) -> ExitCode {
    let auth = match (args.no_auth, token) {
        (true, Some(_)) => {
            eprintln!("keel worker: --no-auth and an API token exclude each other");
            return ExitCode::from(2);
        }
        (true, None) => worker::Auth::None,
        (false, Some(token)) => worker::Auth::Token(token),
        (false, None) => worker::Auth::DataDir,
    };
    match worker::run(args, data_dir, auth) {
        Ok(worker::Stopped::Drained) => ExitCode::SUCCESS,
        Ok(worker::Stopped::NotDrained) => ExitCode::from(worker::EXIT_NOT_DRAINED),
        Err(error) => {
            eprintln!("keel worker: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Every verb but `worker`: finds the API token (given, or the data directory's), checks
/// that a token goes only to the worker's own listener, and runs the verb.
fn run_client(cli: Cli, token: Option<String>) -> ExitCode {
    let token = match token {
        Some(token) => Some(token),
        None => match client::data_dir_token(&cli.data_dir) {
            Ok(token) => token,
            Err(message) => {
                eprintln!("keel: {message}");
                return ExitCode::from(2);
            }
        },
    };
    if token.is_some() {
        if let Err(message) = client::check_listener(&cli.api) {
            eprintln!("keel: {message}");
            return ExitCode::from(1);
        }
    }
    let client = client::Client::new(&cli.api, token, cli.json);
    match run_verb(&client, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keel: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Runs one of the client's verbs against the worker.
fn run_verb(client: &client::Client, command: Command) -> Result<(), client::ClientError> {
    match command {
        Command::Worker(_) => unreachable!("handled in main"),
        Command::Start {
            workflow,
            id,
            input,
            wait,
        } => client.start(&workflow, &id, &input, wait),
        Command::Status { id } => client.status(&id),
        Command::List {
            status,
            after,
            limit,
        } => client.list(status.as_deref(), after.as_deref(), limit),
        Command::History { id } => client.history(&id),
        Command::Cancel { id } => client.operate(&id, "cancel", None),
        Command::Pause { id } => client.operate(&id, "pause", None),
        Command::Resume { id } => client.operate(&id, "resume", None),
        Command::RetryCompensation { id } => client.operate(&id, "retry-compensation", None),
        Command::Resolve { id, note } => client.operate(&id, "resolve", Some(note)),
        Command::Stats => client.stats(),
        Command::Schedule { command } => client.schedule(command),
        Command::Send {
            id,
            name,
            data,
            event_id,
        } => client.send(&id, &name, &data, event_id),
        Command::Get {
            id,
            name,
            wait,
            after,
        } => client.get_published(&id, &name, wait, after),
    }
}
