//! Keel: durable workflows with saga compensation.
//!
//! This crate is the public face of the workspace: what a user of the engine needs, by name.
//! The engine's internals (the replay fold, the store's implementation and key encodings, the
//! crash points, the limiter's permits, the raw latency reservoirs) are not part of it; the
//! workspace's own tests reach them through `keel_engine`. See `docs/ARCHITECTURE.md` for the
//! map of the code.

pub use keel_engine::{
    // The engine and its runs.
    child_id,
    // Ids, records and the journal as operators read it.
    Attempt,
    // Schedules.
    CatchUp,
    Clock,
    Compensation,
    // Rate limits and statistics.
    Counters,
    // Workflows, steps, waits and their context.
    Created,
    CreatedSchedule,
    Ctx,
    Delivered,
    Durability,
    EffectOptions,
    Engine,
    EngineBuilder,
    EngineError,
    Entry,
    ErrorClass,
    ErrorRecord,
    Event,
    EventIn,
    Every,
    FanOutProgress,
    IdempotencyKey,
    InvalidInput,
    JournalIndex,
    LearnedDeadline,
    Leases,
    Notice,
    OnRetriesExhausted,
    OperationIndex,
    OperationStats,
    Outlier,
    Overlap,
    Priority,
    Probe,
    Published,
    RateLimit,
    RateLimiter,
    Received,
    Resident,
    Result,
    RetryPolicy,
    RunHandle,
    RunHistory,
    RunId,
    RunRecord,
    RunStatus,
    RunsPage,
    RunsQuery,
    Schedule,
    ScheduleSpec,
    Step,
    StepContext,
    StepError,
    WaitOutcome,
    WaitPolicy,
    WaitPolls,
    WaitSchedule,
    Workflow,
    WorkflowError,
    LEARN_AFTER_DEFAULT,
    PARK_AFTER_DEFAULT,
    RETENTION_DEFAULT,
    RUNS_PAGE_MAX,
};

/// Every hard limit of the engine.
pub use keel_engine::limits;
/// The test clock, to drive a workflow's timers and waits in tests.
pub use keel_engine::testing;
/// Operating runs at fleet scale: batches by filter, reruns, purges.
pub use keel_engine::{Batch, BatchAction, BatchOutcome, BatchReport, BatchRun, Rerun, RunFilter};
