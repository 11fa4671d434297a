//! Schedules: a workflow started on a cron expression or an interval. This module holds the
//! types an operator gives and reads ([`ScheduleSpec`], [`Schedule`]), what the store keeps
//! (`Definition`, written by operators, and `Fired`, written by the engines that fire it),
//! and the **pure** decision of which fire times are due, which of them to start and how
//! many to skip ([`plan`]). `engine/schedules.rs` does the I/O: it validates and stores
//! definitions, and its firing loop carries plans out.
//!
//! Time is UTC throughout. Fire times are whole seconds: a cron expression's matches, or an
//! interval's `anchor + k * interval` (k >= 1) where the anchor is the schedule's creation
//! time, rounded down to the second. Each fire is started under a run id derived from the
//! schedule's name and its fire time ([`fire_run_id`]), so that the engine's idempotent start
//! makes each fire one run however often it is attempted.
//!
//! What a plan decides, for the due fire times `after < t <= now` (where `after` is the
//! latest of the creation time, the last fire time decided, and the moment before the last
//! resume), newest first:
//!
//! | catch_up        | started                                     | skipped    |
//! |-----------------|---------------------------------------------|------------|
//! | `skip`          | those at most 60 s late (on time)           | the others |
//! | `latest`        | the newest                                  | the others |
//! | `all { max }`   | the newest `max`                            | the others |
//!
//! then with `overlap: skip`, nothing is started while the previous fire's run is
//! unfinished, and at most one (the newest) otherwise: every other due fire is skipped.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::limits::{
    SCHEDULE_CATCH_UP_MAX, SCHEDULE_FIRES_ENUMERATED_MAX, SCHEDULE_GRACE_MS,
    SCHEDULE_INTERVAL_SECONDS_MAX, SCHEDULE_NAME_LEN_MAX,
};

/// What an operator defines: start `workflow` with `input` at every fire time of `every`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// The schedule's name: 1 to 64 bytes of `[A-Za-z0-9._-]`, not beginning with `-` or `.`.
    pub name: String,
    /// The registered workflow each fire starts.
    pub workflow: String,
    /// The input of every run it starts (checked against the workflow at creation, and
    /// again at each start).
    #[serde(default)]
    pub input: Value,
    /// When it fires.
    pub every: Every,
    /// What happens to fires missed while no engine ran (default `skip`).
    #[serde(default)]
    pub catch_up: CatchUp,
    /// Whether a fire starts while the previous fire's run is unfinished (default `allow`).
    #[serde(default)]
    pub overlap: Overlap,
}

/// When a schedule fires. JSON: `{"cron": "0 3 * * *"}` or `{"interval": {"seconds": 3600}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Every {
    /// A standard five-field cron expression (minute hour day-of-month month day-of-week),
    /// evaluated in UTC.
    Cron(String),
    /// Every `seconds` (at least 1), counted from the schedule's creation.
    Interval {
        /// The interval.
        seconds: u64,
    },
}

/// What happens to fires missed while no engine ran (or while the firing loop was late).
/// JSON: `"skip"`, `"latest"` or `{"all": {"max": 10}}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CatchUp {
    /// Missed fires are skipped: only a fire at most 60 s late counts as on time.
    #[default]
    Skip,
    /// One catch-up: the latest missed fire is started, the others skipped.
    Latest,
    /// Every missed fire is started, up to the latest `max` (1 to 1000) of them.
    All {
        /// How many missed fires to start at most.
        max: u32,
    },
}

/// Whether a fire starts while the previous fire's run is unfinished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Every fire starts its run.
    #[default]
    Allow,
    /// A fire is skipped while the previous fire's run has not finished.
    Skip,
}

/// A schedule as the engine reports it: the definition and how far it fired.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The definition.
    pub spec: ScheduleSpec,
    /// Whether it is paused: a paused schedule starts nothing.
    pub paused: bool,
    /// When it was created (ms since the Unix epoch); an interval counts from it.
    pub created_at_ms: u64,
    /// Fire times before this (set at the last resume) are never started: fires missed while
    /// paused are not caught up.
    pub not_before_ms: Option<u64>,
    /// The fire time of the last run it started.
    pub last_fire_ms: Option<u64>,
    /// The id of the last run it started.
    pub last_run: Option<String>,
    /// How many fires started a run (or found their run started before).
    pub fires: u64,
    /// How many fire times were skipped (catch-up policy, overlap).
    pub skipped: u64,
    /// How many fires failed to start (the input no longer valid, say); each is logged.
    pub failed: u64,
    /// The next fire time, if it is not paused and will fire again.
    pub next_fire_ms: Option<u64>,
}

/// The stored definition (space `schedule`), written by operator calls only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Definition {
    pub(crate) spec: ScheduleSpec,
    pub(crate) created_at_ms: u64,
    pub(crate) paused: bool,
    pub(crate) not_before_ms: Option<u64>,
}

/// How far a schedule fired (space `schedule-fired`), written by the firing loops only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fired {
    /// The `created_at_ms` of the definition this belongs to: a record left by a schedule
    /// deleted and created again under its name is not the new one's.
    pub(crate) created_at_ms: u64,
    /// Every fire time up to this one is decided (started or skipped).
    pub(crate) decided_through_ms: Option<u64>,
    pub(crate) last_fire_ms: Option<u64>,
    pub(crate) last_run: Option<String>,
    pub(crate) fires: u64,
    pub(crate) skipped: u64,
    pub(crate) failed: u64,
}

impl Fired {
    /// Nothing fired yet for the definition created at `created_at_ms`.
    pub(crate) fn new(created_at_ms: u64) -> Fired {
        Fired {
            created_at_ms,
            ..Fired::default()
        }
    }
}

/// Checks a schedule name: 1 to [`SCHEDULE_NAME_LEN_MAX`] bytes of `[A-Za-z0-9._-]`, not
/// beginning with `-` or `.`. The message names the rule broken.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > SCHEDULE_NAME_LEN_MAX {
        return Err(format!("must be 1 to {SCHEDULE_NAME_LEN_MAX} bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "character {c:?} is not allowed (use letters, digits and . _ -)"
        ));
    }
    if name.starts_with(['-', '.']) {
        return Err("must not begin with - or .".into());
    }
    Ok(())
}

/// Checks the catch-up policy's bound.
pub(crate) fn check_catch_up(catch_up: CatchUp) -> Result<(), String> {
    match catch_up {
        CatchUp::All { max } if !(1..=SCHEDULE_CATCH_UP_MAX).contains(&max) => Err(format!(
            "all: max {max} is out of range (1..={SCHEDULE_CATCH_UP_MAX})"
        )),
        _ => Ok(()),
    }
}

/// The run id of the fire of schedule `name` at `fire_ms`: `name@YYYYMMDDTHHMMSSZ`.
pub(crate) fn fire_run_id(name: &str, fire_ms: u64) -> String {
    let civil = civil_of(utc_seconds(fire_ms));
    format!(
        "{name}@{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        civil.year(),
        civil.month(),
        civil.day(),
        civil.hour(),
        civil.minute(),
        civil.second()
    )
}

/// The fire times of a schedule: the matches of a cron expression, or an interval's.
#[derive(Debug)]
pub(crate) enum FireTimes {
    /// `anchor_ms + k * every_ms`, k >= 1.
    Interval { anchor_ms: u64, every_ms: u64 },
    /// The matches of a cron expression, whole seconds in UTC.
    Cron(Box<croner::Cron>),
}

impl FireTimes {
    /// The fire times of `every` for a schedule created at `created_at_ms`; the message
    /// names the field and what is wrong (a cron expression's parser's own words).
    pub(crate) fn new(every: &Every, created_at_ms: u64) -> Result<FireTimes, String> {
        match every {
            Every::Interval { seconds } => {
                if !(1..=SCHEDULE_INTERVAL_SECONDS_MAX).contains(seconds) {
                    return Err(format!(
                        "every.interval.seconds: {seconds} is out of range \
                         (1..={SCHEDULE_INTERVAL_SECONDS_MAX})"
                    ));
                }
                Ok(FireTimes::Interval {
                    anchor_ms: created_at_ms / 1000 * 1000,
                    every_ms: seconds * 1000,
                })
            }
            Every::Cron(expression) => {
                let parser = croner::parser::CronParser::builder()
                    .seconds(croner::parser::Seconds::Disallowed)
                    .year(croner::parser::Year::Disallowed)
                    .build();
                let cron = parser.parse(expression).map_err(|e| {
                    format!("every.cron: {expression:?} is not a five-field cron expression: {e}")
                })?;
                let times = FireTimes::Cron(Box::new(cron));
                if times.next_after(created_at_ms).is_none() {
                    return Err(format!("every.cron: {expression:?} never matches a time"));
                }
                Ok(times)
            }
        }
    }

    /// The first fire time after `after_ms`.
    pub(crate) fn next_after(&self, after_ms: u64) -> Option<u64> {
        match self {
            FireTimes::Interval {
                anchor_ms,
                every_ms,
            } => {
                let k = match after_ms.checked_sub(*anchor_ms) {
                    None => 1,
                    Some(since) => since / every_ms + 1,
                };
                anchor_ms.checked_add(k.checked_mul(*every_ms)?)
            }
            FireTimes::Cron(cron) => {
                let at = cron
                    .find_next_occurrence(&Utc(utc_seconds(after_ms)), false)
                    .ok()?;
                u64::try_from(at.0).ok()?.checked_mul(1000)
            }
        }
    }

    /// The last fire time at or before `at_ms`.
    fn previous_at_or_before(&self, at_ms: u64) -> Option<u64> {
        match self {
            FireTimes::Interval {
                anchor_ms,
                every_ms,
            } => {
                let k = at_ms.checked_sub(*anchor_ms)? / every_ms;
                (k >= 1).then(|| anchor_ms + k * every_ms)
            }
            FireTimes::Cron(cron) => {
                let at = cron
                    .find_previous_occurrence(&Utc(utc_seconds(at_ms)), true)
                    .ok()?;
                u64::try_from(at.0).ok()?.checked_mul(1000)
            }
        }
    }

    /// The fire times in `(after_ms, now_ms]`: the newest `keep` of them (newest first) and
    /// how many there are. An interval counts them exactly; a cron expression's are
    /// enumerated newest first, at most [`SCHEDULE_FIRES_ENUMERATED_MAX`] of them, and the
    /// older ones past that bound are not counted.
    fn due(&self, after_ms: u64, now_ms: u64, keep: usize) -> (Vec<u64>, u64) {
        let mut newest = Vec::new();
        let mut count: u64 = 0;
        let mut at = now_ms;
        while let Some(t) = self.previous_at_or_before(at) {
            if t <= after_ms {
                break;
            }
            if newest.len() < keep {
                newest.push(t);
            }
            count += 1;
            if let FireTimes::Interval { every_ms, .. } = self {
                if newest.len() == keep {
                    // The rest by arithmetic: fire times every `every_ms` down to `after_ms`.
                    count += (t - after_ms - 1) / every_ms;
                    break;
                }
            }
            if count as usize >= SCHEDULE_FIRES_ENUMERATED_MAX {
                break;
            }
            match t.checked_sub(1) {
                Some(before) => at = before,
                None => break,
            }
        }
        (newest, count)
    }
}

/// What the firing loop is to do for one schedule now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The fire times to start, oldest first.
    pub(crate) start: Vec<u64>,
    /// How many due fire times are skipped (all older than the first to start).
    pub(crate) skipped: u64,
    /// The newest due fire time (every fire time up to it is decided by this plan), if any
    /// was due.
    pub(crate) decided_through_ms: Option<u64>,
    /// The first fire time after now, for the loop's next wake.
    pub(crate) next_fire_ms: Option<u64>,
}

/// Decides, from the definition, how far it fired, whether the previous fire's run is
/// unfinished and the time, which fire times to start and how many to skip (the table in the
/// module doc). Pure.
pub(crate) fn plan(
    times: &FireTimes,
    definition: &Definition,
    fired: &Fired,
    previous_unfinished: bool,
    now_ms: u64,
) -> Plan {
    if definition.paused {
        return Plan {
            start: Vec::new(),
            skipped: 0,
            decided_through_ms: None,
            next_fire_ms: None,
        };
    }
    let after_ms = undecided_after(definition, fired);
    let keep = match definition.spec.catch_up {
        CatchUp::Skip => {
            // Only fires within the grace can be on time: keep no more than fit in it.
            let span = SCHEDULE_GRACE_MS;
            match times {
                FireTimes::Interval { every_ms, .. } => (span / every_ms + 1) as usize,
                FireTimes::Cron(_) => (span / 60_000 + 1) as usize,
            }
        }
        CatchUp::Latest => 1,
        CatchUp::All { max } => max as usize,
    };
    let (newest, count) = times.due(after_ms, now_ms, keep);
    let mut start: Vec<u64> = match definition.spec.catch_up {
        CatchUp::Skip => newest
            .iter()
            .copied()
            .filter(|t| now_ms - t <= SCHEDULE_GRACE_MS)
            .collect(),
        CatchUp::Latest | CatchUp::All { .. } => newest.clone(),
    };
    if definition.spec.overlap == Overlap::Skip {
        if previous_unfinished {
            start.clear();
        } else {
            start.truncate(1);
        }
    }
    start.reverse();
    Plan {
        skipped: count - start.len() as u64,
        start,
        decided_through_ms: newest.first().copied(),
        next_fire_ms: times.next_after(now_ms.max(after_ms)),
    }
}

/// Every fire time up to this one is decided, or may never be started: the latest of the
/// creation time, the last fire time decided and the moment before the last resume.
fn undecided_after(definition: &Definition, fired: &Fired) -> u64 {
    let mut after_ms = definition.created_at_ms;
    if let Some(decided) = fired.decided_through_ms {
        after_ms = after_ms.max(decided);
    }
    if let Some(not_before) = definition.not_before_ms {
        after_ms = after_ms.max(not_before.saturating_sub(1));
    }
    after_ms
}

/// The schedule as reported at `now_ms`.
pub(crate) fn view(definition: &Definition, fired: &Fired, now_ms: u64) -> Schedule {
    let next_fire_ms = match FireTimes::new(&definition.spec.every, definition.created_at_ms) {
        Ok(times) if !definition.paused => {
            times.next_after(now_ms.max(undecided_after(definition, fired)))
        }
        _ => None,
    };
    Schedule {
        spec: definition.spec.clone(),
        paused: definition.paused,
        created_at_ms: definition.created_at_ms,
        not_before_ms: definition.not_before_ms,
        last_fire_ms: fired.last_fire_ms,
        last_run: fired.last_run.clone(),
        fires: fired.fires,
        skipped: fired.skipped,
        failed: fired.failed,
        next_fire_ms,
    }
}

/// Whole seconds since the Unix epoch of `ms`, rounded down.
fn utc_seconds(ms: u64) -> i64 {
    (ms / 1000) as i64
}

/// A UTC time in whole seconds since the Unix epoch, as croner searches over it: no date
/// library is needed for a time zone without daylight saving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Utc(i64);

const SECONDS_PER_DAY: i64 = 86_400;

/// The civil date and time of `seconds` since the Unix epoch, in UTC.
fn civil_of(seconds: i64) -> croner::CivilDateTime {
    let days = seconds.div_euclid(SECONDS_PER_DAY);
    let of_day = seconds.rem_euclid(SECONDS_PER_DAY) as u32;
    let (year, month, day) = civil_from_days(days);
    croner::CivilDateTime::from_ymd_hms_opt(
        year,
        month,
        day,
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
    )
    .expect("a date computed from a day count is valid")
}

/// Year, month (1-12) and day (1-31) of a count of days since 1970-01-01, in the proleptic
/// Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i32, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year as i32, month, day)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i32, month: u32, day: u32) -> i64 {
    let year = i64::from(year) - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl croner::CronDateTime for Utc {
    fn to_civil(&self) -> croner::CivilDateTime {
        civil_of(self.0)
    }

    fn civil_weekday(&self) -> croner::Weekday {
        // 1970-01-01 was a Thursday (4 days from Sunday).
        let days = self.0.div_euclid(SECONDS_PER_DAY);
        croner::Weekday::from_days_from_sunday((days + 4).rem_euclid(7) as u32)
    }

    fn resolve_civil(
        &self,
        civil: croner::CivilDateTime,
    ) -> Result<croner::Resolution<Self>, croner::errors::CronError> {
        let days = days_from_civil(civil.year(), civil.month(), civil.day());
        let of_day = i64::from(civil.hour() * 3600 + civil.minute() * 60 + civil.second());
        Ok(croner::Resolution::Single(Utc(
            days * SECONDS_PER_DAY + of_day
        )))
    }

    fn checked_add_seconds(&self, seconds: i64) -> Option<Self> {
        self.0.checked_add(seconds).map(Utc)
    }

    fn cmp_instant(&self, other: &Self) -> Ordering {
        self.0.cmp(&other.0)
    }
}

#[cfg(test)]
mod tests;
