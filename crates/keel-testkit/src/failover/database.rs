//! What the shared database says about the workers, read from outside them: who owns which
//! unfinished runs, how long a killed worker's runs took to move to another, and what a
//! stopped worker wrote once continued. Times are the database's clock (`clock_timestamp()`),
//! as text, so that they compare with the rows' own.

use std::collections::HashMap;

use serde_json::Value;

use crate::effects::{Action, Effect};
use crate::postgres::query_texts;

/// The statuses of a run that is finished.
const TERMINAL: &str = "status IN ('completed', 'failed', 'compensated', 'resolved')";

/// The database as the parent reads it before a disruption.
#[derive(Debug)]
pub struct Snapshot {
    /// The database's clock.
    pub now: String,
    /// How many runs exist.
    pub created: usize,
    /// How many of them are unfinished.
    pub unfinished: usize,
    /// Worker ids by pid (the newest registration of each pid).
    pub workers: HashMap<u32, String>,
    /// Unfinished runs by owner, with their epochs.
    pub owned: HashMap<String, Vec<(String, i64)>>,
}

const SNAPSHOT: &str = "SELECT json_build_object(
    'now', clock_timestamp()::text,
    'created', (SELECT count(*) FROM keel_runs),
    'unfinished', (SELECT count(*) FROM keel_runs WHERE status IN ('running', 'compensating')),
    'workers', (SELECT coalesce(json_object_agg(pid::text, id), '{}') FROM
                  (SELECT DISTINCT ON (pid) pid, id FROM keel_workers
                   ORDER BY pid, started_at DESC) w),
    'owned', (SELECT coalesce(json_object_agg(owner, runs), '{}') FROM
                (SELECT owner, json_agg(json_build_array(id, epoch)) AS runs FROM keel_runs
                 WHERE status IN ('running', 'compensating') AND owner IS NOT NULL
                 GROUP BY owner) o))::text";

impl Snapshot {
    /// Reads the snapshot of the database at `url`, in one statement.
    pub async fn take(url: &str) -> Snapshot {
        let text = query_texts(url, SNAPSHOT).await.remove(0);
        let value: Value = serde_json::from_str(&text).expect("the snapshot's JSON");
        let count = |key: &str| value[key].as_u64().expect("a count") as usize;
        let workers = value["workers"].as_object().expect("workers");
        let owned = value["owned"].as_object().expect("owned");
        Snapshot {
            now: value["now"].as_str().expect("now").to_string(),
            created: count("created"),
            unfinished: count("unfinished"),
            workers: workers
                .iter()
                .map(|(pid, id)| (pid.parse().expect("a pid"), id.as_str().unwrap().into()))
                .collect(),
            owned: owned
                .iter()
                .map(|(owner, runs)| {
                    let runs = runs.as_array().unwrap().iter();
                    let runs =
                        runs.map(|r| (r[0].as_str().unwrap().into(), r[1].as_i64().unwrap()));
                    (owner.clone(), runs.collect())
                })
                .collect(),
        }
    }

    /// The worker id of process `pid`, if it registered, and the unfinished runs it owns.
    pub fn owned_by_pid(&self, pid: u32) -> (Option<String>, Vec<(String, i64)>) {
        let worker = self.workers.get(&pid).cloned();
        let runs = worker.as_ref().and_then(|w| self.owned.get(w)).cloned();
        (worker, runs.unwrap_or_default())
    }
}

/// `text` as an SQL string literal.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The database's clock.
pub async fn now(url: &str) -> String {
    query_texts(url, "SELECT clock_timestamp()::text")
        .await
        .remove(0)
}

/// How many runs are not finished, and how many exist.
pub async fn open_runs(url: &str) -> (usize, usize) {
    let sql = format!(
        "SELECT (count(*) FILTER (WHERE NOT {TERMINAL}))::text || '/' || count(*)::text \
         FROM keel_runs"
    );
    let text = query_texts(url, &sql).await.remove(0);
    let (open, created) = text.split_once('/').expect("two counts");
    (
        open.parse().expect("a count"),
        created.parse().expect("a count"),
    )
}

/// Every unfinished run with its status, owner and epoch, then every worker with its lease,
/// a line each.
pub async fn unfinished_report(url: &str) -> String {
    let runs = query_texts(
        url,
        &format!(
            "SELECT format('%s %s owner %s epoch %s', id, status, owner, epoch) FROM keel_runs \
             WHERE NOT {TERMINAL} ORDER BY id"
        ),
    )
    .await;
    let workers = query_texts(
        url,
        "SELECT format('worker %s pid %s lease until %s (now %s)', id, pid, lease_until, \
         clock_timestamp()) FROM keel_workers ORDER BY started_at",
    )
    .await;
    format!("{}\n{}", runs.join("\n"), workers.join("\n"))
}

/// The journal rows `worker` wrote at `at` (the database's clock) or later, each as "run R
/// row P at T".
pub async fn rows_written_since(url: &str, worker: &str, at: &str) -> Vec<String> {
    let (worker, at) = (quoted(worker), quoted(at));
    query_texts(
        url,
        &format!(
            "SELECT format('run %s row %s at %s', run_id, position, written_at) \
             FROM keel_journal WHERE written_by = {worker} AND written_at >= {at}::timestamptz"
        ),
    )
    .await
}

/// Whether `worker`'s lease had ended by `at` (the database's clock); `None` when the worker
/// has no row.
pub async fn lease_ended_by(url: &str, worker: &str, at: &str) -> Option<bool> {
    let (worker, at) = (quoted(worker), quoted(at));
    let rows = query_texts(
        url,
        &format!(
            "SELECT (lease_until < {at}::timestamptz)::text FROM keel_workers \
             WHERE id = {worker}"
        ),
    )
    .await;
    rows.first().map(|ended| ended == "true")
}

/// How many journal rows of `effect`'s run, written by `worker`, begin the attempt that made
/// `effect` (its `step_started`, or its `step_compensation_started` for an undo).
pub async fn attempt_begun_by(url: &str, effect: &Effect, worker: &str) -> usize {
    let kind = match effect.action {
        Action::Do => "step_started",
        Action::Undo => "step_compensation_started",
    };
    let began = format!(
        r#"{{"type": "{kind}", "step": {}, "attempt": {}}}"#,
        effect.step, effect.attempt
    );
    let rows = query_texts(
        url,
        &format!(
            "SELECT count(*)::text FROM keel_journal WHERE run_id = {} \
             AND written_by = {} AND entry::jsonb @> {}::jsonb",
            quoted(&effect.run),
            quoted(worker),
            quoted(&began)
        ),
    )
    .await;
    rows[0].parse().expect("a count")
}

/// What the database knows around a late `effect` of `worker`, for a failure message: when
/// the poll that recorded the effect began (by the wall clock, which the database shares on
/// one machine), the worker's lease, every claim of the effect's run, and the run's journal
/// rows of the step.
pub async fn late_effect_context(url: &str, effect: &Effect, worker: &str) -> Vec<String> {
    let (run, worker) = (quoted(&effect.run), quoted(worker));
    let (step, at_us) = (
        effect.step,
        effect.at_us.map_or("NULL".into(), |us| us.to_string()),
    );
    let sql = format!(
        "SELECT format('the effect''s poll began at %s', to_timestamp({at_us}::float8 / 1e6))
         UNION ALL SELECT format('worker %s lease until %s', id, lease_until) FROM keel_workers \
         WHERE id = {worker}
         UNION ALL (SELECT format('claim of epoch %s by %s at %s', epoch, worker, claimed_at) \
         FROM keel_claims WHERE run_id = {run} ORDER BY epoch)
         UNION ALL (SELECT format('row %s epoch %s by %s at %s: %s', position, epoch, \
         written_by, written_at, entry) FROM keel_journal WHERE run_id = {run} \
         AND entry::jsonb @> '{{\"step\": {step}}}' ORDER BY position)"
    );
    query_texts(url, &sql).await
}

/// A kill, as the database saw the victim just before it.
#[derive(Debug)]
pub struct Kill {
    /// The database's clock just before the SIGKILL.
    pub at: String,
    /// The victim's worker id, if it had registered.
    pub worker: Option<String>,
    /// The unfinished runs it owned, with their epochs.
    pub runs: Vec<(String, i64)>,
    /// Whether unfinished runs existed: only such kills count towards the quota.
    pub counted: bool,
    /// Whether the victim's successor opens in its directory, superseding it at once;
    /// otherwise its runs move when its lease ends.
    pub in_place: bool,
}

/// How long a kill's runs took to move, in ms from the kill.
#[derive(Debug)]
pub struct Failover {
    /// To the first journal row of the victim's runs written by another worker at a later
    /// epoch.
    pub first_entry_ms: Option<f64>,
    /// To the first claim of one of them by another worker.
    pub first_claim_ms: Option<f64>,
    /// Whether the victim's successor opened in its directory (superseding it).
    pub in_place: bool,
}

/// The failover of every kill whose victim owned unfinished runs.
///
/// # Panics
/// When such a victim had not registered (it cannot own runs then).
pub async fn failovers(url: &str, kills: &[Kill]) -> Vec<Failover> {
    let mut measured = Vec::new();
    for kill in kills.iter().filter(|k| !k.runs.is_empty()) {
        let victim = quoted(kill.worker.as_ref().expect("an owner is registered"));
        let at = quoted(&kill.at);
        let runs: Vec<String> = kill
            .runs
            .iter()
            .map(|(id, epoch)| format!("({}, {epoch}::bigint)", quoted(id)))
            .collect();
        let since = |column: &str| {
            format!("(extract(epoch FROM min({column}) - {at}::timestamptz) * 1000)::float8::text")
        };
        let sql = format!(
            "WITH v(run_id, epoch) AS (VALUES {runs})
             SELECT coalesce((SELECT {entry} FROM v JOIN keel_journal j
                                ON j.run_id = v.run_id AND j.epoch > v.epoch
                              WHERE j.written_by IS DISTINCT FROM {victim}), '')
                    || '|' ||
                    coalesce((SELECT {claim} FROM v JOIN keel_claims c
                                ON c.run_id = v.run_id AND c.epoch > v.epoch
                              WHERE c.worker <> {victim}), '')",
            runs = runs.join(", "),
            entry = since("j.written_at"),
            claim = since("c.claimed_at"),
        );
        let row = query_texts(url, &sql).await.remove(0);
        let (entry, claim) = row.split_once('|').expect("two figures");
        let parse = |text: &str| (!text.is_empty()).then(|| text.parse::<f64>().expect("ms"));
        measured.push(Failover {
            first_entry_ms: parse(entry),
            first_claim_ms: parse(claim),
            in_place: kill.in_place,
        });
    }
    measured
}
