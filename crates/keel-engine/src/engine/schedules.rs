//! Schedules, the I/O half (`schedule.rs` holds the types and the pure decisions): the
//! operator calls that store definitions (create, pause, resume, delete), their reads, and
//! the firing loop that starts each due fire once.
//!
//! A fire is started under a run id derived from the schedule's name and its fire time, by
//! the engine's idempotent start, and only then is how far the schedule fired written. So a
//! crash between the two, or two engines on one PostgreSQL database firing together, starts
//! the fire again under the same id, which finds the run the first start made.
//!
//! Definitions (space `schedule`) are written by operator calls only and fired-states
//! (space `schedule-fired`) by the firing loops only, so neither overwrites the other's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::limits::{INPUT_BYTES_MAX, KEYED_RECORD_BYTES_MAX};
use crate::schedule::{
    check_catch_up, check_name, fire_run_id, plan, view, Definition, FireTimes, Fired, Overlap,
    Plan, Schedule, ScheduleSpec,
};
use crate::store::{encode, Space};

/// How often the firing loop reads the schedules again although nothing woke it: another
/// engine sharing the store may have created, paused or deleted one. Real time, not the
/// engine's clock, which a test moves only to fire.
const SCHEDULES_REREAD: Duration = Duration::from_secs(10);

/// The firing loop's shared parts.
#[derive(Debug, Default)]
pub(super) struct Firing {
    /// Wakes the loop when this engine creates or resumes a schedule.
    changed: Arc<tokio::sync::Notify>,
    /// Held through a pass of the loop, so that shutdown waits for a fire in progress to be
    /// recorded (its start and its fired-state) before the store's last sync.
    pass: tokio::sync::Mutex<()>,
}

/// What [`Engine::create_schedule_outcome`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct CreatedSchedule {
    /// The schedule, as stored.
    pub schedule: Schedule,
    /// Whether this call created it (false: the same definition existed).
    pub new: bool,
}

impl Engine {
    /// Creates a schedule, durably, and wakes the firing loop. Idempotent: the same
    /// definition under an existing name returns the existing schedule; another definition
    /// under it is [`EngineError::ScheduleExists`]. A definition this engine cannot fire (a
    /// bad name, an unregistered workflow, an input the workflow refuses, a cron expression
    /// that does not parse, an interval under a second, a catch-up bound out of range) is
    /// refused with an error naming the field, and nothing is stored.
    pub async fn create_schedule(&self, spec: &ScheduleSpec) -> Result<Schedule> {
        Ok(self.create_schedule_outcome(spec).await?.schedule)
    }

    /// [`Engine::create_schedule`], telling whether the schedule is new.
    pub async fn create_schedule_outcome(&self, spec: &ScheduleSpec) -> Result<CreatedSchedule> {
        let now_ms = self.inner.env.clock.now_ms();
        self.check_schedule(spec, now_ms)?;
        if let Some(found) = self.definitions().await?.remove(&spec.name) {
            let found = found?;
            if found.spec != *spec {
                return Err(EngineError::ScheduleExists {
                    name: spec.name.clone(),
                });
            }
            return Ok(CreatedSchedule {
                schedule: self.view_of(&found).await?,
                new: false,
            });
        }
        let definition = Definition {
            spec: spec.clone(),
            created_at_ms: now_ms,
            paused: false,
            not_before_ms: None,
        };
        self.write_definition(&definition).await?;
        self.inner.schedules.changed.notify_one();
        tracing::info!(schedule = %spec.name, workflow = %spec.workflow, "schedule created");
        Ok(CreatedSchedule {
            schedule: view(&definition, &Fired::new(now_ms), now_ms),
            new: true,
        })
    }

    /// Every schedule, by name. A stored definition that does not decode is left out, with
    /// a warning.
    pub async fn schedules(&self) -> Result<Vec<Schedule>> {
        let mut fired = self.fired().await?;
        let now_ms = self.inner.env.clock.now_ms();
        let mut schedules = Vec::new();
        for (name, definition) in self.definitions().await? {
            match definition {
                Ok(definition) => {
                    let fired = current_fired(&definition, fired.remove(&name));
                    schedules.push(view(&definition, &fired, now_ms));
                }
                Err(error) => tracing::warn!(schedule = %name, %error, "schedule unreadable"),
            }
        }
        Ok(schedules)
    }

    /// The schedule `name`; [`EngineError::ScheduleNotFound`] if there is none.
    pub async fn schedule(&self, name: &str) -> Result<Schedule> {
        let definition = self.definition(name).await?;
        self.view_of(&definition).await
    }

    /// Pauses schedule `name`, durably: it starts nothing until resumed. Pausing a paused
    /// schedule changes nothing.
    pub async fn pause_schedule(&self, name: &str) -> Result<Schedule> {
        // Not inside a pass of this engine's loop, which may have read the definition before
        // the pause: once this returns, this engine starts nothing more of it.
        let _pass = self.inner.schedules.pass.lock().await;
        let mut definition = self.definition(name).await?;
        if !definition.paused {
            definition.paused = true;
            self.write_definition(&definition).await?;
            tracing::info!(schedule = %name, "schedule paused");
        }
        self.view_of(&definition).await
    }

    /// Resumes schedule `name`, durably: it fires again from now on. Fires whose time passed
    /// while it was paused are never caught up, whatever its catch-up policy (a fire exactly
    /// at the resume time is due). Resuming a schedule that is not paused changes nothing.
    pub async fn resume_schedule(&self, name: &str) -> Result<Schedule> {
        let mut definition = self.definition(name).await?;
        if definition.paused {
            definition.paused = false;
            definition.not_before_ms = Some(self.inner.env.clock.now_ms());
            self.write_definition(&definition).await?;
            self.inner.schedules.changed.notify_one();
            tracing::info!(schedule = %name, "schedule resumed");
        }
        self.view_of(&definition).await
    }

    /// Deletes schedule `name` and how far it fired, durably; returns it as it was. Runs it
    /// started are untouched.
    pub async fn delete_schedule(&self, name: &str) -> Result<Schedule> {
        let _pass = self.inner.schedules.pass.lock().await;
        let definition = self.definition(name).await?;
        let schedule = self.view_of(&definition).await?;
        let store = &self.inner.env.store;
        store.delete_keyed(Space::Schedule, name)?;
        store.delete_keyed(Space::ScheduleFired, name)?;
        store.sync().wait().await?;
        tracing::info!(schedule = %name, "schedule deleted");
        Ok(schedule)
    }

    /// Refuses a definition this engine cannot fire, naming the field.
    fn check_schedule(&self, spec: &ScheduleSpec, now_ms: u64) -> Result<()> {
        let field = |field: &str, reason: String| {
            EngineError::InvalidRequest(format!("schedule field {field}: {reason}"))
        };
        check_name(&spec.name)
            .map_err(|reason| field("name", format!("{:?} {reason}", spec.name)))?;
        check_catch_up(spec.catch_up).map_err(|reason| field("catch_up", reason))?;
        FireTimes::new(&spec.every, now_ms)
            .map_err(|reason| EngineError::InvalidRequest(format!("schedule field {reason}")))?;
        // The input as each fire's start will check it: decoded by the workflow's type,
        // within the size limit, accepted by the workflow's own checks.
        let id = fire_run_id(&spec.name, now_ms);
        let (_, input) = self.checked_json_start(&spec.workflow, &id, spec.input.clone())?;
        let bytes = crate::limits::json_bytes(&input);
        if bytes > INPUT_BYTES_MAX {
            return Err(EngineError::TooLarge {
                what: format!("input of schedule {}", spec.name),
                bytes,
                limit: INPUT_BYTES_MAX,
            });
        }
        let entry = self
            .inner
            .workflows
            .get(&spec.workflow)
            .expect("checked_json_start found the workflow");
        (entry.validate)(&input).map_err(|e| EngineError::InvalidInput {
            workflow: spec.workflow.clone(),
            field: e.field,
            reason: e.reason,
        })
    }

    /// Every stored definition by name; one that does not decode is its error.
    async fn definitions(&self) -> Result<BTreeMap<String, Result<Definition>>> {
        let records = self.inner.env.store.keyed(Space::Schedule).await?;
        Ok(records
            .into_iter()
            .map(|(name, text)| {
                let decoded =
                    serde_json::from_str::<Definition>(&text).map_err(|e| EngineError::Corrupt {
                        key: format!("schedule {name}"),
                        detail: e.to_string(),
                    });
                (name, decoded)
            })
            .collect())
    }

    /// The definition of `name`, or [`EngineError::ScheduleNotFound`].
    async fn definition(&self, name: &str) -> Result<Definition> {
        match self.definitions().await?.remove(name) {
            Some(definition) => definition,
            None => Err(EngineError::ScheduleNotFound { name: name.into() }),
        }
    }

    /// Every stored fired-state by name (those that do not decode left out, with a warning:
    /// the schedule then fires as if nothing had fired, and the idempotent start finds the
    /// runs it started).
    async fn fired(&self) -> Result<BTreeMap<String, Fired>> {
        let records = self.inner.env.store.keyed(Space::ScheduleFired).await?;
        let mut fired = BTreeMap::new();
        for (name, text) in records {
            match serde_json::from_str::<Fired>(&text) {
                Ok(record) => {
                    fired.insert(name, record);
                }
                Err(error) => tracing::warn!(schedule = %name, %error, "fired-state unreadable"),
            }
        }
        Ok(fired)
    }

    async fn view_of(&self, definition: &Definition) -> Result<Schedule> {
        let fired = self.fired().await?.remove(&definition.spec.name);
        let fired = current_fired(definition, fired);
        Ok(view(definition, &fired, self.inner.env.clock.now_ms()))
    }

    /// Writes `definition` and waits until it is durable.
    async fn write_definition(&self, definition: &Definition) -> Result<()> {
        let what = format!("schedule {}", definition.spec.name);
        let text = encode(&what, definition, KEYED_RECORD_BYTES_MAX)?;
        let store = &self.inner.env.store;
        store.put_keyed(Space::Schedule, &definition.spec.name, &text)?;
        store.sync().wait().await
    }

    /// Writes how far schedule `name` fired and waits until it is durable.
    async fn write_fired(&self, name: &str, fired: &Fired) -> Result<()> {
        let text = encode(
            &format!("fired-state of schedule {name}"),
            fired,
            KEYED_RECORD_BYTES_MAX,
        )?;
        let store = &self.inner.env.store;
        store.put_keyed(Space::ScheduleFired, name, &text)?;
        store.sync().wait().await
    }

    /// Starts the firing loop: it fires what is due, then sleeps on the engine's clock until
    /// the earliest next fire, but reads the schedules again after [`SCHEDULES_REREAD`] of
    /// real time and at once when this engine creates or resumes one; it stops at shutdown.
    /// With no schedule it never sleeps on the clock, so a test clock sees no sleeper.
    pub(super) fn spawn_schedules(&self) {
        let engine = Arc::downgrade(&self.inner);
        let changed = self.inner.schedules.changed.clone();
        let mut shutdown = self.inner.env.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                let Some(inner) = engine.upgrade() else {
                    return;
                };
                if *shutdown.borrow() {
                    return;
                }
                let engine = Engine { inner };
                let next_fire_ms = match engine.fire_due().await {
                    Ok(next) => next,
                    Err(error) => {
                        tracing::warn!(%error, "schedules could not be fired");
                        None
                    }
                };
                let clock = engine.inner.env.clock.clone();
                drop(engine);
                let fire = async {
                    match next_fire_ms {
                        Some(at_ms) => clock.sleep_until(at_ms).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = fire => {}
                    _ = tokio::time::sleep(SCHEDULES_REREAD) => {}
                    _ = changed.notified() => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
    }

    /// Waits for a pass of the firing loop in progress to end (called at shutdown, once the
    /// engine says it is shutting down: a pass starts no fire after that).
    pub(super) async fn schedules_stopped(&self) {
        let _pass = self.inner.schedules.pass.lock().await;
    }

    /// Fires every schedule's due fires; returns the earliest next fire time.
    async fn fire_due(&self) -> Result<Option<u64>> {
        let _pass = self.inner.schedules.pass.lock().await;
        if self.inner.env.shutting_down() {
            return Ok(None);
        }
        // Fired-states first: one is written only while its definition exists, so a
        // fired-state with no definition read after it belongs to a deleted schedule (a loop
        // wrote it after the delete), and goes with the next sync.
        let mut fired = self.fired().await?;
        let definitions = self.definitions().await?;
        for name in fired.keys().filter(|n| !definitions.contains_key(*n)) {
            self.inner
                .env
                .store
                .delete_keyed(Space::ScheduleFired, name)?;
        }
        let mut next_fire_ms: Option<u64> = None;
        for (name, definition) in definitions {
            if self.inner.env.shutting_down() {
                break;
            }
            let definition = match definition {
                Ok(definition) => definition,
                Err(error) => {
                    tracing::warn!(schedule = %name, %error, "schedule unreadable: not fired");
                    continue;
                }
            };
            let state = current_fired(&definition, fired.remove(&name));
            match self.fire_one(&definition, state).await {
                Ok(Some(at_ms)) => {
                    next_fire_ms = Some(next_fire_ms.map_or(at_ms, |n| n.min(at_ms)));
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(schedule = %name, %error, "schedule not fired"),
            }
        }
        Ok(next_fire_ms)
    }

    /// Carries out the plan of one schedule now; returns its next fire time.
    async fn fire_one(&self, definition: &Definition, mut fired: Fired) -> Result<Option<u64>> {
        let spec = &definition.spec;
        if self.inner.workflows.get(&spec.workflow).is_none() {
            // Another engine sharing the store registers it and fires it; deciding its fires
            // here would record them as failed and lose them there.
            tracing::debug!(schedule = %spec.name, workflow = %spec.workflow, "schedule of a workflow not registered here: left to the engines that register it");
            return Ok(None);
        }
        let times = FireTimes::new(&spec.every, definition.created_at_ms).map_err(|reason| {
            EngineError::Corrupt {
                key: format!("schedule {}", spec.name),
                detail: reason,
            }
        })?;
        let previous_unfinished = match (&fired.last_run, spec.overlap) {
            (Some(run), Overlap::Skip) => self.unfinished(run).await?,
            _ => false,
        };
        let now_ms = self.inner.env.clock.now_ms();
        let Plan {
            start,
            skipped,
            decided_through_ms,
            next_fire_ms,
        } = plan(&times, definition, &fired, previous_unfinished, now_ms);
        if skipped > 0 {
            tracing::warn!(
                schedule = %spec.name,
                skipped,
                through_ms = decided_through_ms,
                catch_up = ?spec.catch_up,
                previous_unfinished,
                "schedule fires skipped"
            );
            fired.skipped += skipped;
        }
        for fire_ms in start {
            if self.inner.env.shutting_down() {
                return Ok(None);
            }
            let id = fire_run_id(&spec.name, fire_ms);
            crate::crash::point("schedule.before_start");
            match self
                .start_json(&spec.workflow, &id, spec.input.clone())
                .await
            {
                Ok(_) => {
                    fired.fires += 1;
                    fired.last_fire_ms = Some(fire_ms);
                    fired.last_run = Some(id.clone());
                    tracing::info!(schedule = %spec.name, run_id = %id, "schedule fired");
                }
                Err(EngineError::IdempotencyMismatch { .. }) => {
                    // A run under this fire's id exists with another input (a schedule of
                    // this name, since deleted): the fire time has had its run.
                    fired.fires += 1;
                    fired.last_fire_ms = Some(fire_ms);
                    fired.last_run = Some(id.clone());
                    tracing::info!(schedule = %spec.name, run_id = %id, "schedule fire found its run started before");
                }
                Err(EngineError::ShutDown) => return Ok(None),
                Err(
                    error @ (EngineError::InvalidInput { .. }
                    | EngineError::MalformedInput { .. }
                    | EngineError::TooLarge { .. }
                    | EngineError::InvalidRunId { .. }),
                ) => {
                    // The fire can never start (the workflow's new version refuses the
                    // input, say): counted as failed, and the schedule goes on.
                    fired.failed += 1;
                    tracing::warn!(schedule = %spec.name, run_id = %id, %error, "schedule fire failed to start");
                }
                // Anything else may pass (the store, a lease): the fire stays undecided and
                // the next pass tries it again.
                Err(error) => return Err(error),
            }
            crate::crash::point("schedule.after_start");
            fired.decided_through_ms = Some(fire_ms);
            self.write_fired(&spec.name, &fired).await?;
            crate::crash::point("schedule.after_fired");
        }
        if decided_through_ms > fired.decided_through_ms {
            fired.decided_through_ms = decided_through_ms;
            self.write_fired(&spec.name, &fired).await?;
        }
        Ok(next_fire_ms)
    }

    /// Whether run `id` exists and has not finished.
    async fn unfinished(&self, id: &str) -> Result<bool> {
        let Ok(id) = crate::ids::RunId::existing(id) else {
            return Ok(false);
        };
        let record = self.inner.env.store.run(&id).await?;
        Ok(record.is_some_and(|r| !r.status.is_terminal()))
    }
}

/// How far `definition` fired: the stored state if it belongs to this definition (not to an
/// earlier schedule of the same name), else nothing yet.
fn current_fired(definition: &Definition, fired: Option<Fired>) -> Fired {
    fired
        .filter(|f| f.created_at_ms == definition.created_at_ms)
        .unwrap_or_else(|| Fired::new(definition.created_at_ms))
}
