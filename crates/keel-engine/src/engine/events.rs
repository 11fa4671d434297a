//! Events in and values out, at the engine: sending an event to a run's mailbox (durable
//! before the send returns, idempotent by event id), starting a run with an event, and
//! reading, or waiting for, the values a run published.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cell::RunCell;
use crate::engine::{Engine, Lineage};
use crate::error::{EngineError, Result};
use crate::ids::{check_event_id, check_event_name, JournalIndex, RunId};
use crate::journal::{digest, Entry, Event, Published, RunRecord, RunStatus};
use crate::limits::{EVENT_PAYLOAD_BYTES_MAX, MAILBOX_EVENTS_MAX};
use crate::replay::{latest_published, RunState};
use crate::store::Token;
use crate::workflow::Workflow;
use crate::RunHandle;

/// How often a reader waiting for a value polls a run another engine drives, first and at
/// most.
const POLL_FIRST: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(500);

/// An event to send to a run: its name, the sender's idempotency key, and its payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventIn {
    /// The event's name (what a receive asks for).
    pub name: String,
    /// The sender's idempotency key: the same id twice is one event.
    pub event_id: String,
    /// The payload.
    pub payload: Value,
}

impl EventIn {
    /// An event named `name` with id `event_id` and `payload` (serialised).
    pub fn new<T: Serialize + ?Sized>(name: &str, event_id: &str, payload: &T) -> Result<EventIn> {
        let payload = serde_json::to_value(payload).map_err(|source| EngineError::Serialise {
            what: format!("payload of event {name:?}"),
            source,
        })?;
        let event = EventIn {
            name: name.into(),
            event_id: event_id.into(),
            payload,
        };
        event.check()?;
        Ok(event)
    }

    /// Checks the name, the id and the payload's size.
    fn check(&self) -> Result<()> {
        check_event_name("event name", &self.name).map_err(EngineError::InvalidRequest)?;
        check_event_id(&self.event_id).map_err(EngineError::InvalidRequest)?;
        let bytes = crate::limits::json_bytes(&self.payload);
        if bytes > EVENT_PAYLOAD_BYTES_MAX {
            return Err(EngineError::TooLarge {
                what: format!("payload of event {:?}", self.name),
                bytes,
                limit: EVENT_PAYLOAD_BYTES_MAX,
            });
        }
        Ok(())
    }

    fn describe(name: &str, payload_digest: &str) -> String {
        format!("name {name:?} and payload {payload_digest}")
    }

    /// Whether this is the event delivered before under its id (name and payload agree),
    /// else the mismatch.
    fn same_as(&self, id: &RunId, name: &str, payload_digest: &str) -> Result<()> {
        let mine = digest(&self.payload);
        if self.name == name && mine == payload_digest {
            return Ok(());
        }
        Err(EngineError::EventMismatch {
            id: id.clone(),
            event_id: self.event_id.clone(),
            existing: EventIn::describe(name, payload_digest),
            requested: EventIn::describe(&self.name, &mine),
        })
    }

    fn delivered(&self) -> Event {
        Event::EventDelivered {
            name: self.name.clone(),
            event_id: self.event_id.clone(),
            payload: self.payload.clone(),
        }
    }
}

/// What [`Engine::send`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// The run.
    pub run_id: RunId,
    /// The event's name.
    pub name: String,
    /// The event's id.
    pub event_id: String,
    /// Whether the event had been delivered before under this id (nothing was stored now).
    pub duplicate: bool,
}

/// Whether run `record` takes events: a run that may still receive one (running, or paused
/// or suspended and resumable), not cancelled.
fn takes_events(record: &RunRecord, state: Option<&RunState>) -> Result<()> {
    let cancelled = state.is_some_and(|s| s.cancel_requested);
    match record.status {
        RunStatus::Running | RunStatus::Paused | RunStatus::Suspended if !cancelled => Ok(()),
        status => Err(EngineError::InvalidState {
            id: record.id.clone(),
            status: if cancelled {
                "cancelled".into()
            } else {
                status.to_string()
            },
            operation: "receive an event",
        }),
    }
}

/// What a send of `event` to run `id` (as `record` and `state` have it) writes: the delivery,
/// or nothing for an event delivered before (the same one; another under its id is a
/// mismatch), or a refusal (the run takes no events, its mailbox is full).
fn delivery(
    id: &RunId,
    record: &RunRecord,
    state: &RunState,
    event: &EventIn,
) -> Result<Option<Event>> {
    if let Some(before) = state.mailbox.get(&event.event_id) {
        event.same_as(id, &before.name, &before.digest)?;
        return Ok(None);
    }
    takes_events(record, Some(state))?;
    if state.mailbox.pending >= MAILBOX_EVENTS_MAX {
        return Err(EngineError::LimitReached {
            what: format!("events waiting in the mailbox of run {id}"),
            limit: u64::from(MAILBOX_EVENTS_MAX),
        });
    }
    Ok(Some(event.delivered()))
}

/// Whether run `record` may still publish a value (its body may run again).
fn may_publish(record: &RunRecord) -> bool {
    matches!(
        record.status,
        RunStatus::Running | RunStatus::Paused | RunStatus::Suspended
    )
}

impl Engine {
    /// Sends `event` (named `name`, with idempotency key `event_id`) to run `id`: it is
    /// durable in the run's mailbox when this returns, and the run's next receive of `name`
    /// takes it (events of a name are taken in the order they arrived). The same `event_id`
    /// again is the same event (`duplicate` in the answer, nothing stored), even after the
    /// run took it or finished; with another name or payload it is
    /// [`EngineError::EventMismatch`]. A run that can receive nothing any more (finished,
    /// compensating, cancelled) refuses with [`EngineError::InvalidState`]; a full mailbox
    /// ([`MAILBOX_EVENTS_MAX`] events not yet taken) with [`EngineError::LimitReached`].
    ///
    /// On a store several workers share, the run is taken over by this engine to take the
    /// event, as for an operator's call.
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        id: &str,
        name: &str,
        payload: &T,
        event_id: &str,
    ) -> Result<Delivered> {
        let event = EventIn::new(name, event_id, payload)?;
        let id = RunId::existing(id)?;
        self.send_checked(&id, &event).await
    }

    /// [`Engine::send`] of a checked event.
    pub(super) async fn send_checked(&self, id: &RunId, event: &EventIn) -> Result<Delivered> {
        if *self.inner.env.shutdown.borrow() {
            return Err(EngineError::ShutDown);
        }
        let answer = |duplicate| Delivered {
            run_id: id.clone(),
            name: event.name.clone(),
            event_id: event.event_id.clone(),
            duplicate,
        };
        let store = &*self.inner.env.store;
        if self.loaded(id).is_none() {
            // Not driven here: a send with nothing to write (a duplicate, or a refusal) is
            // answered from the stored journal, so that it takes no run over (on a shared
            // store) and loads none.
            let record = self.record(id.as_str()).await?;
            let entries = store.journal(&record.id).await?;
            let state =
                RunState::from_entries(&entries).map_err(|detail| EngineError::Corrupt {
                    key: format!("journal of run {id}"),
                    detail,
                })?;
            if delivery(id, &record, &state, event)?.is_none() {
                store.sync().wait().await?;
                return Ok(answer(true));
            }
        }
        // The cell that found the event delivered before, if one did.
        let found: std::sync::Mutex<Option<Arc<RunCell>>> = std::sync::Mutex::new(None);
        let written = self
            .operate_with(id.as_str(), None, "receive an event", false, |cell| {
                let made =
                    cell.append_made(store, |record, state| delivery(id, record, state, event))?;
                if made.is_none() {
                    *found.lock().expect("found lock") = Some(Arc::clone(cell));
                }
                Ok(made.is_some())
            })
            .await?;
        match written {
            Some(cell) => {
                crate::crash::point("event.after_delivered");
                cell.news.notify_waiters();
                tracing::debug!(run_id = %id, name = %event.name, event_id = %event.event_id, "event delivered");
                Ok(answer(false))
            }
            None => {
                // Delivered before, perhaps by a concurrent send whose write is not durable
                // yet: acknowledged once it is durable and was not dropped.
                let cell = found
                    .into_inner()
                    .expect("found lock")
                    .expect("a cell found the event");
                cell.durable(store).await?;
                Ok(answer(true))
            }
        }
    }

    /// Starts a run of `W` with id `id` and `event` in its mailbox: when this returns, the run
    /// and the event are durable, and the event is the run's first journal entry (no load of
    /// the run comes between). If the run exists (same workflow and input, as for
    /// [`Engine::start`]), the event is sent to it (as [`Engine::send`], idempotent by its
    /// id), so a call that failed is simply made again: a crash before it returned may have
    /// kept the run without its event, and the same call then delivers it.
    pub async fn start_with_event<W: Workflow>(
        &self,
        id: &str,
        input: W::Input,
        event: EventIn,
    ) -> Result<RunHandle<W>> {
        event.check()?;
        let (id, input) = self.checked_typed_start::<W>(id, input)?;
        let record = self
            .start_value(W::NAME, id, input, Lineage::default(), Some(&event))
            .await?;
        Ok(RunHandle::new(self.clone(), record.id))
    }

    /// [`Engine::start_with_event`] of a registered workflow with a JSON input, checked as
    /// [`Engine::start_json`] checks it.
    pub async fn start_json_with_event(
        &self,
        workflow: &str,
        id: &str,
        input: Value,
        event: EventIn,
    ) -> Result<RunRecord> {
        event.check()?;
        let (id, input) = self.checked_json_start(workflow, id, input)?;
        self.start_value(workflow, id, input, Lineage::default(), Some(&event))
            .await
    }

    /// Writes `event` as the first entry of the journal of run `record`, just created and
    /// not yet synced; returns the journal's state.
    pub(super) fn deliver_first(&self, record: &RunRecord, event: &EventIn) -> Result<RunState> {
        let entry = Entry {
            at_ms: self.inner.env.clock.now_ms(),
            event: event.delivered(),
        };
        self.inner.env.store.append(
            &record.id,
            JournalIndex(0),
            std::slice::from_ref(&entry),
            None,
            Token::CREATED,
        )?;
        let state = RunState::from_entries(std::slice::from_ref(&entry)).map_err(|detail| {
            EngineError::Corrupt {
                key: format!("run {}", record.id),
                detail,
            }
        })?;
        Ok(state)
    }

    /// The latest value run `id` published under `name` ([`crate::Ctx::publish`]), if any.
    /// Durable when returned.
    pub async fn published(&self, id: &str, name: &str) -> Result<Option<Published>> {
        let id = RunId::existing(id)?;
        check_event_name("published value name", name).map_err(EngineError::InvalidRequest)?;
        let (value, _) = self.published_now(&id, name).await?;
        self.inner.env.store.sync().wait().await?;
        Ok(value)
    }

    /// Waits up to `timeout` for run `id` to publish a value under `name` newer than version
    /// `newer_than` (any value when `None`), and returns the latest one: the newer value as
    /// soon as it is durable, or, when the time is up or the run can publish nothing any
    /// more (it finished, or compensates), whatever is there (perhaps the same version, or
    /// none).
    pub async fn published_wait(
        &self,
        id: &str,
        name: &str,
        newer_than: Option<u64>,
        timeout: Duration,
    ) -> Result<Option<Published>> {
        let id = RunId::existing(id)?;
        check_event_name("published value name", name).map_err(EngineError::InvalidRequest)?;
        let now = tokio::time::Instant::now();
        // A wait too long to count ends at the end of time (a century will do).
        let until = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        let mut poll = POLL_FIRST;
        loop {
            let cell = self.loaded(&id);
            // Listening before looking: a publish or an end after the look wakes the wait.
            let news = cell.as_ref().map(|cell| cell.news.notified());
            tokio::pin!(news);
            if let Some(news) = news.as_mut().as_pin_mut() {
                news.enable();
            }
            let mut watched = cell.as_ref().map(|cell| cell.watched.subscribe());
            let (value, record) = self.published_now(&id, name).await?;
            let newer = match (&value, newer_than) {
                (Some(value), Some(seen)) => value.version > seen,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if newer || !may_publish(&record) || tokio::time::Instant::now() >= until {
                self.inner.env.store.sync().wait().await?;
                return Ok(value);
            }
            let mut shutdown = self.inner.env.shutdown.subscribe();
            match (watched.as_mut(), news.as_mut().as_pin_mut()) {
                (Some(watched), Some(news)) => {
                    tokio::select! {
                        _ = news => {}
                        _ = watched.changed() => {}
                        _ = tokio::time::sleep_until(until) => {}
                        _ = shutdown.wait_for(|down| *down) => return Err(EngineError::ShutDown),
                    }
                }
                _ => {
                    // Driven elsewhere (or not at all): the store is read again.
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = tokio::time::sleep_until(until) => {}
                        _ = shutdown.wait_for(|down| *down) => return Err(EngineError::ShutDown),
                    }
                    poll = (poll * 2).min(POLL_MAX);
                }
            }
        }
    }

    /// The latest value of `name` of run `id` as this engine knows it now (its cell's, or
    /// the store's), durable or not, with the run's record.
    async fn published_now(
        &self,
        id: &RunId,
        name: &str,
    ) -> Result<(Option<Published>, RunRecord)> {
        if let Some(cell) = self.loaded(id) {
            if !cell.stale(&*self.inner.env.store) {
                let value = cell.with_state(|state| state.published.get(name).cloned());
                return Ok((value, cell.record()));
            }
        }
        let record = self.record(id.as_str()).await?;
        let entries = self.inner.env.store.journal(id).await?;
        Ok((latest_published(&entries, name), record))
    }
}
