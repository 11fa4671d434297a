//! The engine's error type. Messages are lowercase, name the thing and the value, and keep
//! their source.

use std::path::PathBuf;

use crate::ids::{OperationIndex, RunId};
use crate::journal::{ErrorRecord, RunStatus};

/// What a store's log holds, for [`EngineError::LostData`].
fn held_text(held: u64, held_at: &str) -> String {
    if held == 0 {
        "no commit at all".into()
    } else {
        format!("the commits up to #{held} (the last made {held_at})")
    }
}

/// Where the damaged log was kept, for [`EngineError::LostData`].
fn kept_text(kept: &Option<PathBuf>) -> String {
    match kept {
        Some(path) => format!(
            "; sled's recovery rewrote what it could not read, and the log as found is kept in {}",
            path.display()
        ),
        None => String::new(),
    }
}

/// A `Result` with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Everything the engine can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The data directory is held by another process.
    #[error("data directory {path} is locked by another process")]
    Locked {
        /// The data directory.
        path: PathBuf,
    },
    /// The store could not be read or written. The underlying error is the storage
    /// engine's own, kept as a source so that this type names no storage crate.
    #[error("storage error at {path}: {source}")]
    Storage {
        /// The data directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The PostgreSQL store could not be reached, read or written. The underlying error is
    /// kept as a source so that this type names no database crate.
    #[error("database error at {database}: {source}")]
    Database {
        /// The database, as its URL without the password.
        database: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The database's schema is newer than this binary knows: written by a newer Keel.
    /// Nothing is changed.
    #[error("database {database} has schema version {found}, newer than this binary's {supported}: run a Keel release that knows it")]
    SchemaNewer {
        /// The database, as its URL without the password.
        database: String,
        /// The version the database is at.
        found: u32,
        /// The newest version this binary knows.
        supported: u32,
    },
    /// Syncing the store's files to disk failed. Writes after this point are not durable, so
    /// the engine stops accepting work.
    #[error("sync of {path} failed: {source}")]
    Sync {
        /// The file that failed to sync.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The store broke while the engine opened: a sync failed, or (on PostgreSQL) this
    /// engine's lease ended, as it does for a worker paused past it, and other engines may
    /// own its runs now. The open's writes from the break on are not durable; what failed
    /// is kept as the source. Open the store again (a worker exits so that its supervisor
    /// starts a fresh one). A break after the open's last write is not this error: the open
    /// succeeds and [`crate::Engine::broken`] resolves.
    #[error("the store broke while the engine opened ({reason}): open it again")]
    BrokeWhileOpening {
        /// Why the store can make nothing durable any more.
        reason: String,
        /// What the open was doing when it failed.
        #[source]
        source: Box<EngineError>,
    },
    /// The store holds less than its high-water mark says it acknowledged: sled lost
    /// acknowledged writes (a file cut short or damaged).
    #[error("store {path} lost data it had acknowledged: sled's log holds {}, but keel.mark records commit #{marked} (made {marked_at}) as durable, so the work acknowledged after what the log holds is missing (finished runs may be gone, others rolled back){}; restore the data directory from a backup, or open it with accept_data_loss (keel worker --accept-data-loss) to go on with what is left", held_text(*.held, .held_at), kept_text(.kept))]
    LostData {
        /// The data directory.
        path: PathBuf,
        /// The last commit the store holds.
        held: u64,
        /// When it was made.
        held_at: String,
        /// The last commit the mark says was durable.
        marked: u64,
        /// When it was made.
        marked_at: String,
        /// Where `db` was copied, as found, before sled's recovery rewrote it, if it was.
        kept: Option<PathBuf>,
    },
    /// A file of the store cannot be read at all.
    #[error("store file {file} is damaged: {detail}; {advice}")]
    StoreDamaged {
        /// The damaged file.
        file: PathBuf,
        /// What is wrong with it.
        detail: String,
        /// What an operator can do.
        advice: String,
    },
    /// A stored record could not be decoded or breaks an invariant.
    #[error("corrupt record {key}: {detail}")]
    Corrupt {
        /// A readable form of the record's key.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A run id is malformed.
    #[error("invalid run id {id:?}: {reason}")]
    InvalidRunId {
        /// The rejected id.
        id: String,
        /// Why it was rejected.
        reason: String,
    },
    /// No workflow of this name is registered with the engine.
    #[error("unknown workflow {name:?} (registered: {registered})")]
    UnknownWorkflow {
        /// The requested name.
        name: String,
        /// The registered names, comma separated.
        registered: String,
    },
    /// A workflow input could not be decoded.
    #[error("malformed input for workflow {workflow:?}: field {field}: {source}")]
    MalformedInput {
        /// The workflow name.
        workflow: String,
        /// The path of the offending field, e.g. `devices[3].name`.
        field: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// An input decodes but the workflow's own checks refuse it ([`crate::Workflow::validate`]).
    #[error("invalid input for workflow {workflow:?}: field {field}: {reason}")]
    InvalidInput {
        /// The workflow name.
        workflow: String,
        /// The path of the offending field, e.g. `devices[3].name`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value is larger than its limit.
    #[error("{what} is {bytes} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size.
        bytes: usize,
        /// The limit (see `limits.rs`).
        limit: usize,
    },
    /// A limit on counts was reached.
    #[error("limit reached: {what} (limit {limit})")]
    LimitReached {
        /// What reached its limit.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// A workflow asked the engine for something meaningless (a fan-out of width 0).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The id is taken by a run of another workflow or with another input.
    #[error("run {id} already exists with {existing}, not {requested}")]
    IdempotencyMismatch {
        /// The run id.
        id: RunId,
        /// What the existing run has (workflow and input digest).
        existing: String,
        /// What this call asked for.
        requested: String,
    },
    /// An event id was sent to the run before with another name or payload.
    #[error("event {event_id:?} was sent to run {id} before with {existing}, not {requested}")]
    EventMismatch {
        /// The run.
        id: RunId,
        /// The event id.
        event_id: String,
        /// What the first send carried (name and payload digest).
        existing: String,
        /// What this send carries.
        requested: String,
    },
    /// A schedule of this name exists with another definition.
    #[error("schedule {name:?} exists with another definition; delete it first to replace it")]
    ScheduleExists {
        /// The schedule's name.
        name: String,
    },
    /// No schedule has this name.
    #[error("no schedule named {name:?}")]
    ScheduleNotFound {
        /// The schedule's name.
        name: String,
    },
    /// No run has this id.
    #[error("no run with id {id}")]
    RunNotFound {
        /// The run id.
        id: RunId,
    },
    /// The operation does not apply to a run in this state.
    #[error("run {id} is {status}: cannot {operation}")]
    InvalidState {
        /// The run id.
        id: RunId,
        /// Its status.
        status: String,
        /// What was asked.
        operation: &'static str,
    },
    /// A value could not be serialised.
    #[error("cannot serialise {what}: {source}")]
    Serialise {
        /// What was being serialised.
        what: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The engine is shutting down or has shut down.
    #[error("engine is shut down")]
    ShutDown,
    /// A step definition was registered twice with different types.
    #[error("step kind {kind:?} registered twice")]
    DuplicateStepKind {
        /// The kind.
        kind: String,
    },
    /// Two workflow types were registered under one name.
    #[error("workflow {name:?} registered twice, by two different types")]
    DuplicateWorkflow {
        /// The name.
        name: String,
    },
    /// The store holds unfinished runs that need workflow types or step kinds this engine
    /// has not registered (see `EngineBuilder::allow_unregistered`).
    #[error("the store holds {runs} unfinished runs that need types this engine has not registered: {missing}; register them, or open with allow_unregistered to leave those runs as they are (first runs: {examples})")]
    Unregistered {
        /// How many runs need them.
        runs: usize,
        /// Every missing workflow and step kind, e.g. `workflows "a", "b"; step kinds "x"`.
        missing: String,
        /// The first few of those runs.
        examples: String,
    },
    /// The run settled without an output.
    #[error("run {id} ended {status}: {error}")]
    RunEnded {
        /// The run id.
        id: RunId,
        /// Its status.
        status: RunStatus,
        /// The recorded reason.
        error: String,
    },
    /// Nobody drives the run any more although it has not settled: its driver stopped on an
    /// engine error (it resumes at the next open), or this engine cannot drive it.
    #[error("run {id} is not being driven: {reason}")]
    RunStopped {
        /// The run id.
        id: RunId,
        /// Why.
        reason: String,
    },
    /// Internal: a write went to a run cell that was unloaded meanwhile; the caller retries
    /// with a fresh load.
    #[error("run {id} was unloaded during the call; try again")]
    Detached {
        /// The run id.
        id: RunId,
    },
    /// Another engine sharing the PostgreSQL store took run `id` over (its owner's lease ran
    /// out, or an operator call on that engine): this engine's writes to it were refused and
    /// it no longer drives it. The run goes on there; ask any engine for it.
    #[error("run {id} was taken over by another worker: this worker no longer drives it (the run goes on there)")]
    Fenced {
        /// The run id.
        id: RunId,
    },
}

/// Why a workflow body returned without an output.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// A step failed for good (permanent error, or its retry policy ran out). Workflow code
    /// may catch this and take another path; propagated, it makes the run compensate.
    #[error("step {step} ({kind}) failed: {}", error.message)]
    Step {
        /// The operation number.
        step: OperationIndex,
        /// The step kind.
        kind: String,
        /// The recorded error.
        error: ErrorRecord,
    },
    /// A wait's deadline passed before its probe held. Workflow code may catch this (say, to
    /// recreate the resource); propagated, it makes the run compensate.
    #[error("wait {step} ({kind}) timed out after {polls} polls")]
    WaitTimedOut {
        /// The operation number.
        step: OperationIndex,
        /// The wait kind.
        kind: String,
        /// Polls made since the wait (or its last resumption) began.
        polls: u32,
    },
    /// A receive's deadline passed with no event of its names delivered before it. Workflow
    /// code may catch this (say, to go on without an approval); propagated, it makes the run
    /// compensate.
    #[error("receive {step} of {} timed out: no such event was delivered before its deadline", names.join(" or "))]
    EventTimedOut {
        /// The operation number.
        step: OperationIndex,
        /// The names it waited for.
        names: Vec<String>,
    },
    /// A received event's payload does not decode into the type the body asked for. The
    /// event is consumed (replay gives this error again); the body may catch it and receive
    /// another.
    #[error(
        "receive {step} took event {event_id:?} ({name}), whose payload does not decode: {error}"
    )]
    EventMalformed {
        /// The operation number.
        step: OperationIndex,
        /// The event's name.
        name: String,
        /// The event's id.
        event_id: String,
        /// Why it does not decode.
        error: String,
    },
    /// The compensation of a resource the run recreated while going on (see
    /// [`crate::Ctx::create_and_wait`]) failed for good.
    #[error("compensation of step {step} ({kind}) failed: {}", error.message)]
    CompensationFailed {
        /// The operation number.
        step: OperationIndex,
        /// The step kind.
        kind: String,
        /// The recorded error.
        error: ErrorRecord,
    },
    /// A child run did not complete: it failed, compensated itself, or was resolved by an
    /// operator. Its own saga undid what it did.
    #[error("child run {child} ({workflow}) ended {status}: {error}")]
    Child {
        /// The parent's operation number.
        step: OperationIndex,
        /// The child's workflow.
        workflow: String,
        /// The child's run id.
        child: RunId,
        /// How it ended.
        status: RunStatus,
        /// Why.
        error: String,
    },
    /// No branch of a `select` succeeded.
    #[error("no branch of select {fork} succeeded: {}", errors.join("; "))]
    NoneSucceeded {
        /// The fork's operation number.
        fork: OperationIndex,
        /// Each branch's error, in list order.
        errors: Vec<String>,
    },
    /// The workflow decided to fail (business logic).
    #[error("{0}")]
    Failed(String),
    /// The engine stopped the run (cancellation, shutdown, non-determinism, storage failure).
    /// Workflow code should propagate it; the engine acts on the cause whatever is returned.
    #[error("run interrupted by the engine")]
    Interrupted,
}

impl WorkflowError {
    /// A business failure with this message.
    pub fn failed(message: impl Into<String>) -> Self {
        WorkflowError::Failed(message.into())
    }
}

/// An id refused where it entered the engine.
impl From<crate::ids::InvalidRunId> for EngineError {
    fn from(e: crate::ids::InvalidRunId) -> Self {
        EngineError::InvalidRunId {
            id: e.id,
            reason: e.reason,
        }
    }
}
