//! The CLI's verbs over many runs and over finished ones: `keel batch` and `keel purge` (a
//! dry run first, a question on the terminal when more than one run matches, then bounded
//! calls that follow the continuation until every match was seen, each repeated while the
//! worker is unreachable), and `keel rerun`.

use std::io::{BufRead, IsTerminal, Write};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{align, encode, read_json, record_details, Client, ClientError, Result};
use crate::api::BatchRequest;
use keel_engine::limits::INPUT_BYTES_MAX;
use keel_engine::{BatchOutcome, BatchReport, BatchRun, Rerun, RunRecord};

/// How long a batch call is repeated while the worker cannot be reached (it may be
/// restarting after a crash): the engine's batch acts on nothing twice, so the same call
/// again is safe.
const UNREACHABLE_RETRY_FOR: Duration = Duration::from_secs(60);

/// First and longest pause between two tries of a batch call.
const RETRY_PAUSE_FIRST: Duration = Duration::from_millis(100);
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(5);

/// Matches shown before the question.
const SHOWN_BEFORE_ASKING: usize = 10;

/// How a batch verb goes about it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BatchOptions {
    /// Only show what would be done.
    pub dry_run: bool,
    /// Act on several runs without asking.
    pub yes: bool,
}

/// What every call of a batch did, summed.
#[derive(Debug, Default, Serialize)]
pub(crate) struct BatchTotals {
    /// The action.
    pub action: String,
    /// Runs the calls matched.
    pub matched: u64,
    /// Runs acted on.
    pub done: u64,
    /// Runs skipped for their state.
    pub skipped: u64,
    /// Runs whose action failed.
    pub failed: u64,
    /// Calls made.
    pub calls: u64,
    /// Per run, in id order (kept for `--json` only).
    pub runs: Vec<BatchRun>,
}

impl Client {
    /// `keel batch`: the action on every run the filter matches; fails (exit 1) when the
    /// action failed on some run.
    pub(crate) fn batch(&self, request: BatchRequest, options: BatchOptions) -> Result<()> {
        let Some(totals) = self.run_batch(request, options)? else {
            return Ok(());
        };
        eprintln!(
            "{}: {} runs done, {} skipped, {} failed, in {} calls",
            totals.action, totals.done, totals.skipped, totals.failed, totals.calls
        );
        failed_runs(&totals)
    }

    /// `keel purge`: deletes the finished runs the filter matches, and says how many.
    pub(crate) fn purge(&self, request: BatchRequest, options: BatchOptions) -> Result<()> {
        let Some(totals) = self.run_batch(request, options)? else {
            return Ok(());
        };
        if !self.json {
            println!(
                "deleted {} runs ({} skipped, {} failed)",
                totals.done, totals.skipped, totals.failed
            );
        }
        failed_runs(&totals)
    }

    /// A dry run; with `options.dry_run` that is all (`None`). Else, once confirmed, the
    /// calls from the first match to the last, printing each run's outcome as it comes (or,
    /// with `--json`, all of them at the end). `None` too when nothing matched.
    fn run_batch(
        &self,
        mut request: BatchRequest,
        options: BatchOptions,
    ) -> Result<Option<BatchTotals>> {
        request.dry_run = true;
        let plan = self.batch_call(&request)?;
        if options.dry_run {
            self.print(&plan, || outcome_table(&plan.runs, true));
            eprintln!(
                "dry run: {}{} runs match; {} would be acted on, {} skipped{}",
                at_least(&plan),
                plan.matched,
                plan.done,
                plan.skipped,
                if plan.runs.len() < plan.matched as usize {
                    format!(" (the first {} listed)", plan.runs.len())
                } else {
                    String::new()
                }
            );
            return Ok(None);
        }
        if plan.matched == 0 {
            eprintln!("no run matches: nothing done");
            if self.json {
                self.print(&BatchTotals::named(&plan.action), String::new);
            }
            return Ok(None);
        }
        if plan.matched > 1 && !options.yes {
            confirm(&plan)?;
        }
        request.dry_run = false;
        let mut totals = BatchTotals::named(&plan.action);
        loop {
            let report = self.batch_call(&request)?;
            totals.add(&report);
            eprintln!(
                "{} call {}: {} runs, {} done, {} skipped, {} failed{}",
                report.action,
                totals.calls,
                report.matched,
                report.done,
                report.skipped,
                report.failed,
                if report.next.is_some() {
                    "; more follow"
                } else {
                    ""
                }
            );
            if self.json {
                totals.runs.extend(report.runs);
            } else if !report.runs.is_empty() {
                let table = outcome_table(&report.runs, false);
                // The header once: every call's rows go on the same table.
                let rows = if totals.calls == 1 {
                    table.as_str()
                } else {
                    table.split_once('\n').map_or("", |(_, rows)| rows)
                };
                print!("{rows}");
                let _ = std::io::stdout().flush();
            }
            match report.next {
                Some(next) => request.after = Some(next),
                None => break,
            }
        }
        if self.json {
            self.print(&totals, String::new);
        }
        Ok(Some(totals))
    }

    /// One `POST /v1/runs:batch`, made again with a growing pause while the worker cannot be
    /// reached or is restarting, for up to [`UNREACHABLE_RETRY_FOR`].
    fn batch_call(&self, request: &BatchRequest) -> Result<BatchReport> {
        let mut given_up_at = None;
        let mut pause = RETRY_PAUSE_FIRST;
        loop {
            let error = match self.post("/v1/runs:batch", request) {
                Err(error) if worth_retrying(&error) => error,
                other => return other,
            };
            let deadline =
                *given_up_at.get_or_insert_with(|| Instant::now() + UNREACHABLE_RETRY_FOR);
            if Instant::now() + pause > deadline {
                return Err(error);
            }
            if pause == RETRY_PAUSE_FIRST {
                eprintln!(
                    "keel: {error}; trying the same call again for up to {} s",
                    UNREACHABLE_RETRY_FOR.as_secs()
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
        }
    }

    /// `keel rerun`: a new run of finished run `id`, under `as_id` or the next default id,
    /// with the input in `input` (a file, or `-`) or the run's own.
    pub(crate) fn rerun(&self, id: &str, as_id: Option<String>, input: Option<&str>) -> Result<()> {
        let input = match input {
            Some(source) => Some(read_json(source, "input", INPUT_BYTES_MAX)?),
            None => None,
        };
        let request = Rerun { as_id, input };
        let record: RunRecord = self.post(&format!("/v1/runs/{}/rerun", encode(id)), &request)?;
        self.print(&record, || record_details(&record));
        Ok(())
    }
}

impl BatchTotals {
    fn named(action: &str) -> BatchTotals {
        BatchTotals {
            action: action.to_string(),
            ..BatchTotals::default()
        }
    }

    fn add(&mut self, report: &BatchReport) {
        self.calls += 1;
        self.matched += report.matched;
        self.done += report.done;
        self.skipped += report.skipped;
        self.failed += report.failed;
    }
}

/// Exit 1 when the action failed on some run.
fn failed_runs(totals: &BatchTotals) -> Result<()> {
    if totals.failed == 0 {
        return Ok(());
    }
    Err(ClientError::Local(format!(
        "{} failed on {} runs (their reasons are in the table)",
        totals.action, totals.failed
    )))
}

/// Whether a batch call that got `error` is worth making again: the worker is unreachable
/// (down, restarting, the connection reset) or says it is stopping or busy.
fn worth_retrying(error: &ClientError) -> bool {
    match error {
        ClientError::Unreachable { .. } => true,
        ClientError::Refused { status, .. } => *status == 503,
        _ => false,
    }
}

/// "at least " when a dry run stopped at its bound of records read before the last match.
fn at_least(plan: &BatchReport) -> &'static str {
    if plan.next.is_some() {
        "at least "
    } else {
        ""
    }
}

/// Asks on the terminal whether to act on the runs `plan` matched; refuses without asking
/// when stdin is no terminal (a script must say `--yes`).
fn confirm(plan: &BatchReport) -> Result<()> {
    let n = plan.matched;
    if !std::io::stdin().is_terminal() {
        return Err(ClientError::Usage(format!(
            "{} would act on {n} runs and stdin is not a terminal to ask: add --yes (see \
             --dry-run for the list)",
            plan.action
        )));
    }
    let shown = &plan.runs[..plan.runs.len().min(SHOWN_BEFORE_ASKING)];
    eprint!("{}", outcome_table(shown, true));
    if shown.len() < n as usize {
        eprintln!("... and {} more", n as usize - shown.len());
    }
    eprint!(
        "{}: {}{n} runs match ({} would be skipped). Act on {n} runs? [y/N] ",
        plan.action,
        at_least(plan),
        plan.skipped
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| ClientError::Local(format!("cannot read the answer: {e}")))?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        return Ok(());
    }
    Err(ClientError::Local("not confirmed: nothing done".into()))
}

/// The runs of a report as a table: id, workflow, status, outcome, and the status after the
/// action (`now`) and the reason or the rerun's id, or, for a dry run, the reason only.
fn outcome_table(runs: &[BatchRun], planned: bool) -> String {
    let word = |outcome: BatchOutcome| match outcome {
        BatchOutcome::Done => "done",
        BatchOutcome::Skipped => "skipped",
        BatchOutcome::Failed => "failed",
        BatchOutcome::WouldAct => "would act",
        BatchOutcome::WouldSkip => "would skip",
    };
    let note = |run: &BatchRun| match (&run.rerun, &run.reason) {
        (Some(rerun), _) => format!("rerun as {rerun}"),
        (None, Some(reason)) => reason.clone(),
        (None, None) => String::new(),
    };
    if planned {
        let header = ["id", "workflow", "status", "outcome", "reason"];
        let rows: Vec<[String; 5]> = runs
            .iter()
            .map(|run| {
                [
                    run.id.to_string(),
                    run.workflow.clone(),
                    run.status.to_string(),
                    word(run.outcome).into(),
                    note(run),
                ]
            })
            .collect();
        return align(&header, &rows);
    }
    let header = ["id", "status", "outcome", "now", "reason or rerun"];
    let rows: Vec<[String; 5]> = runs
        .iter()
        .map(|run| {
            [
                run.id.to_string(),
                run.status.to_string(),
                word(run.outcome).into(),
                run.now.map(|s| s.to_string()).unwrap_or_default(),
                note(run),
            ]
        })
        .collect();
    align(&header, &rows)
}
