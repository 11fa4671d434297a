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
//! keel batch pause --status running --prefix plant- [--dry-run] [--yes]   (cancel, pause,
//!   resume, retry-compensation, resolve --note TEXT, rerun; by status, workflow, prefix,
//!   parent, creation time)
//! keel rerun ID [--as NEW_ID] [--input FILE|-], keel purge --before 2026-11-01 [--dry-run]
//! ```
//!
//! Exit codes: 0 success; 1 failure (the worker failed, is unreachable, or a waited-for run
//! did not complete); 2 refused (bad usage, bad input, a conflicting or unknown id); 3 the
//! worker stopped before its drain finished; 4 `keel get` found no value (newer than
//! `--after`).

// The CLI's output is its job: tables and JSON on stdout, errors and progress on stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

/// mimalloc rather than glibc's malloc: a step's path allocates and frees on several threads
/// (sled copies a leaf per insert), and glibc's arena locks cost about a quarter of its CPU
/// (docs/benchmarks.md, "mimalloc as the binaries' allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod api;
mod client;
mod history;
mod limiters;
mod metrics;
mod notify;
mod otlp;
mod outbound;
mod server;
mod ui;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
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
        /// Only runs whose id begins with this.
        #[arg(long)]
        prefix: Option<String>,
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
    /// Acts on every run a filter matches: a dry run first, a question on the terminal when
    /// more than one run matches (a script says --yes), then calls of up to --limit runs
    /// until every match was seen, each run's outcome printed. Exits 1 when the action
    /// failed on some run.
    Batch {
        /// What to do to each run.
        action: BatchVerb,
        #[command(flatten)]
        filter: FilterArgs,
        /// Runs created at or after this time (RFC 3339 in UTC, or a date: 2026-11-01).
        #[arg(long, value_parser = cli_time)]
        created_after: Option<String>,
        /// Runs created before this time (RFC 3339 in UTC, or a date).
        #[arg(long, value_parser = cli_time)]
        created_before: Option<String>,
        /// What the operator did (resolve only).
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        options: BatchArgs,
    },
    /// Starts a finished run again as a new run (same workflow; its input, or another),
    /// linked both ways: the new run's record says `rerun of`, the old run's history the
    /// rerun.
    Rerun {
        /// The finished run.
        id: String,
        /// The new run's id; default `ID.rerun-N`.
        #[arg(long = "as", value_name = "NEW_ID")]
        as_id: Option<String>,
        /// Another input: a JSON file, or `-` for standard input; default the run's own.
        #[arg(long)]
        input: Option<String>,
    },
    /// Deletes finished runs (with their journals and finished children) that finished
    /// before a time, and says how many; asks as `keel batch` does.
    Purge {
        /// Runs that finished before this time (RFC 3339 in UTC, or a date: 2026-11-01).
        #[arg(long, value_parser = cli_time)]
        before: String,
        /// Only runs in this status (completed, failed, compensated, resolved); repeatable.
        #[arg(long = "status")]
        statuses: Vec<String>,
        /// Only runs of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        #[command(flatten)]
        options: BatchArgs,
    },
}

/// The action of `keel batch`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum BatchVerb {
    /// Cancel running, suspended and paused runs: they compensate.
    Cancel,
    /// Pause running runs.
    Pause,
    /// Resume paused and suspended runs.
    Resume,
    /// Retry the compensation of runs whose compensation failed.
    RetryCompensation,
    /// Mark runs whose compensation failed as resolved (needs --note).
    Resolve,
    /// Start finished runs again, each under `ID.rerun-N`, with its own input.
    Rerun,
}

impl BatchVerb {
    /// The API's word.
    fn word(self) -> &'static str {
        match self {
            BatchVerb::Cancel => "cancel",
            BatchVerb::Pause => "pause",
            BatchVerb::Resume => "resume",
            BatchVerb::RetryCompensation => "retry_compensation",
            BatchVerb::Resolve => "resolve",
            BatchVerb::Rerun => "rerun",
        }
    }
}

/// Which runs `keel batch` acts on: every option given must hold; give at least one.
#[derive(clap::Args, Debug)]
struct FilterArgs {
    /// Runs in this status (running, paused, suspended, compensation_failed, completed,
    /// ...); repeatable: any of them.
    #[arg(long = "status")]
    statuses: Vec<String>,
    /// Runs of this workflow.
    #[arg(long)]
    workflow: Option<String>,
    /// Runs whose id begins with this.
    #[arg(long)]
    prefix: Option<String>,
    /// Child runs of this run.
    #[arg(long)]
    parent: Option<String>,
}

/// How `keel batch` and `keel purge` go about it.
#[derive(clap::Args, Debug)]
struct BatchArgs {
    /// Most runs per call (1 to 1000); the calls go on until every match was seen.
    #[arg(long, default_value_t = api::BATCH_LIMIT_DEFAULT, value_parser = clap::value_parser!(u16).range(1..=1000).map(usize::from))]
    limit: usize,
    /// Only show which runs match and what would be done to each.
    #[arg(long)]
    dry_run: bool,
    /// Act on more than one run without asking.
    #[arg(long)]
    yes: bool,
}

impl BatchArgs {
    fn options(&self) -> client::BatchOptions {
        client::BatchOptions {
            dry_run: self.dry_run,
            yes: self.yes,
        }
    }
}

/// A time on the command line: RFC 3339 in UTC (`2026-11-01T12:00:00Z`) or a date
/// (`2026-11-01`, its midnight UTC), as the API's RFC 3339 text.
fn cli_time(text: &str) -> Result<String, String> {
    let is_date = text.len() == 10 && text.as_bytes()[4] == b'-' && text.as_bytes()[7] == b'-';
    let full = if is_date {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    api::parse_time_ms(&full)?;
    Ok(full)
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
    /// With the sled store: the bound on its cache of the store's pages, in MiB (default:
    /// 32; sled counts a page by its size on disk, so the cache takes more memory). Pages read
    /// or written stay in it until it is full; a larger cache keeps more of the runs the
    /// worker wrote in memory however few are loaded, a smaller one reads evicted pages from
    /// disk again when a run is loaded.
    #[arg(long, env = "KEEL_SLED_CACHE_MIB", value_parser = clap::value_parser!(u64).range((keel_engine::limits::SLED_CACHE_BYTES_MIN >> 20)..=1_048_576))]
    pub sled_cache_mib: Option<u64>,
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
    /// How long finished runs are kept before they are deleted (30d, 12h, ...), unless their
    /// workflow says otherwise or --retention-for does.
    #[arg(long, env = "KEEL_RETENTION", default_value = "7d", value_parser = retention)]
    pub retention: Duration,
    /// How long finished runs of one workflow are kept: WORKFLOW=DURATION (e.g.
    /// `sample.inbox=12h`); repeatable. An unregistered workflow is refused at start.
    #[arg(long, env = "KEEL_RETENTION_FOR", value_delimiter = ',', value_parser = retention_for)]
    pub retention_for: Vec<(String, Duration)>,
    /// Export traces over OTLP (HTTP/protobuf) to the collector at this http(s) base URL,
    /// e.g. http://127.0.0.1:4318 (`/v1/traces` is added): a span per run, per operation
    /// and per attempt (docs/observability.md). Without it nothing is exported.
    #[arg(long, env = "KEEL_OTLP_ENDPOINT", value_name = "URL", value_parser = otlp::otlp_endpoint)]
    pub otlp_endpoint: Option<String>,
}

/// A retention: a `humantime` duration (`30d`, `12h`, `90m`) of at least a second.
fn retention(text: &str) -> Result<Duration, String> {
    let kept = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration such as 30d, 12h or 90m: {e}"))?;
    if kept < Duration::from_secs(1) {
        return Err(format!("{text:?} is under a second"));
    }
    Ok(kept)
}

/// A `--retention-for`: `WORKFLOW=DURATION`.
fn retention_for(text: &str) -> Result<(String, Duration), String> {
    let Some((workflow, kept)) = text.split_once('=') else {
        return Err(format!(
            "{text:?} is not WORKFLOW=DURATION (e.g. sample.inbox=12h)"
        ));
    };
    if workflow.is_empty() {
        return Err(format!("{text:?} names no workflow"));
    }
    Ok((workflow.to_string(), retention(kept)?))
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
            prefix,
            limit,
        } => client.list(
            status.as_deref(),
            after.as_deref(),
            prefix.as_deref(),
            limit,
        ),
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
        Command::Batch {
            action,
            filter,
            created_after,
            created_before,
            note,
            options,
        } => {
            let request = api::BatchRequest {
                action: action.word().into(),
                filter: api::FilterRequest {
                    statuses: filter.statuses,
                    workflow: filter.workflow,
                    id_prefix: filter.prefix,
                    parent: filter.parent,
                    created_after,
                    created_before,
                    finished_before: None,
                },
                dry_run: false,
                after: None,
                limit: Some(options.limit),
                note,
            };
            client.batch(request, options.options())
        }
        Command::Rerun { id, as_id, input } => client.rerun(&id, as_id, input.as_deref()),
        Command::Purge {
            before,
            statuses,
            workflow,
            options,
        } => {
            let request = api::BatchRequest {
                action: "purge".into(),
                filter: api::FilterRequest {
                    statuses,
                    workflow,
                    finished_before: Some(before),
                    ..api::FilterRequest::default()
                },
                dry_run: false,
                after: None,
                limit: Some(options.limit),
                note: None,
            };
            client.purge(request, options.options())
        }
    }
}
