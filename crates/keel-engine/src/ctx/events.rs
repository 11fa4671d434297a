//! Talking to a run from outside: `Ctx::receive*` takes an event delivered to the run's
//! mailbox ([`crate::Engine::send`]), waiting durably for one; `Ctx::publish` records a value
//! readers get with [`crate::Engine::published`]. Both are journaled operations, so replay
//! takes the same event and publishes nothing twice.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::Ctx;
use crate::clock::millis_saturating;
use crate::error::EngineError;
use crate::ids::{check_event_name, OperationIndex};
use crate::interrupt::Interrupt;
use crate::journal::{digest, Event};
use crate::limits::{EVENT_PAYLOAD_BYTES_MAX, RECEIVE_NAMES_MAX};
use crate::replay::{receive_action, Op, ReceiveAction, RunState};
use crate::workflow::WorkflowError;

/// An event a receive took: its name and id (the sender's), and its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received<T> {
    /// The event's name.
    pub name: String,
    /// The id its sender gave it.
    pub event_id: String,
    /// Its payload.
    pub payload: T,
}

impl Ctx {
    /// Waits durably for an event named `name` sent to this run ([`crate::Engine::send`]),
    /// takes it out of the run's mailbox and returns its payload. Events sent before the run
    /// asks are kept, and taken in the order they arrived; each is taken by one receive only,
    /// and replay takes the same one again. A cancel or a pause of the run ends the wait.
    pub async fn receive<T: DeserializeOwned>(&mut self, name: &str) -> Result<T, WorkflowError> {
        Ok(self.receive_event(&[name], None).await?.payload)
    }

    /// Like [`Ctx::receive`], giving up `within` after the receive began: then
    /// [`WorkflowError::EventTimedOut`], which the body may catch. The deadline is journaled
    /// as an absolute time, so a restart neither shortens nor extends it, and an event
    /// delivered before it is taken even if the run gets to it only later.
    pub async fn receive_until<T: DeserializeOwned>(
        &mut self,
        name: &str,
        within: Duration,
    ) -> Result<T, WorkflowError> {
        Ok(self.receive_event(&[name], Some(within)).await?.payload)
    }

    /// Takes the earliest event delivered under any of `names` (waiting for one, up to
    /// `within` if given), with its name and id: for a run that waits for one of several
    /// answers (an approval or a rejection, say).
    pub async fn receive_event<T: DeserializeOwned>(
        &mut self,
        names: &[&str],
        within: Option<Duration>,
    ) -> Result<Received<T>, WorkflowError> {
        self.check()?;
        let names = match receive_names(names) {
            Ok(names) => names,
            Err(detail) => {
                let e = EngineError::InvalidRequest(detail);
                return Err(self.interrupt(Interrupt::Engine(e)));
            }
        };
        let index = self.next_index()?;
        let journaled = self
            .lane
            .cell
            .with_state(|state| match state.ops.get(index.0 as usize) {
                None => Ok(false),
                Some(Op::Receive(op)) if op.names == names => Ok(true),
                Some(other) => Err(format!(
                    "journal holds {}, code asks for a receive of {names:?}",
                    other.describe()
                )),
            });
        match journaled {
            Ok(true) => {}
            Ok(false) => {
                let deadline_ms =
                    within.map(|d| self.now_ms().saturating_add(millis_saturating(d)));
                self.journal(Event::ReceiveStarted {
                    step: index,
                    names: names.clone(),
                    deadline_ms,
                })?;
                if deadline_ms.is_some() {
                    // The deadline is durable before anything waits on it.
                    self.durable().await?;
                }
            }
            Err(detail) => return Err(self.interrupt(Interrupt::NonDeterminism { index, detail })),
        }
        let span = tracing::info_span!(
            "receive",
            run_id = self.lane.cell.id.as_str(),
            step = index.0,
            names = ?names,
        );
        tracing::Instrument::instrument(self.received(index, names), span).await
    }

    /// The receive at `index` (journaled) once an event of `names` is taken, or its deadline
    /// passed.
    async fn received<T: DeserializeOwned>(
        &mut self,
        index: OperationIndex,
        names: Vec<String>,
    ) -> Result<Received<T>, WorkflowError> {
        // When the run parks if it still waits: at once, or, once it took an event since it
        // was loaded, `park_after` into the wait, so that a run taking events one after
        // another stays loaded between them (each load replays its journal). A run that
        // waits for its first event parks at once: many runs that start to wait together
        // (a fleet's devices) hold no driver each meanwhile. So does one when every run slot
        // is taken: a run waiting in memory keeps its slot, which a run with work may need.
        let stays = self.took_event && self.lane.env.permits.available_permits() > 0;
        let mut park_at_ms = self.lane.env.park_after.map(|after| {
            if stays {
                self.now_ms().saturating_add(millis_saturating(after))
            } else {
                0
            }
        });
        loop {
            self.check()?;
            let cell = Arc::clone(&self.lane.cell);
            // Listening before looking: a delivery after the look wakes the wait below.
            let news = cell.news.notified();
            tokio::pin!(news);
            news.as_mut().enable();
            let now_ms = self.now_ms();
            let made = cell.append_made(&*self.lane.env.store, |_, state| {
                Ok(match receive_action(state, index, now_ms) {
                    Some(ReceiveAction::Take(event_id)) => Some(Event::EventReceived {
                        step: index,
                        event_id,
                    }),
                    Some(ReceiveAction::TimeOut) => Some(Event::ReceiveTimedOut { step: index }),
                    _ => None,
                })
            });
            match made {
                Ok(Some(Event::EventReceived { .. })) => {
                    self.took_event = true;
                    crate::crash::point("event.after_received")
                }
                Ok(_) => {}
                Err(e) => return Err(self.interrupt(Interrupt::Engine(e))),
            }
            let deadline_ms = match cell.with_state(|state| {
                let action = receive_action(state, index, now_ms);
                let deadline = match state.ops.get(index.0 as usize) {
                    Some(Op::Receive(op)) => op.deadline_ms,
                    _ => None,
                };
                (action, deadline)
            }) {
                (Some(ReceiveAction::Received(event)), _) => {
                    let payload = serde_json::from_value(event.payload).map_err(|e| {
                        WorkflowError::EventMalformed {
                            step: index,
                            name: event.name.clone(),
                            event_id: event.event_id.clone(),
                            error: e.to_string(),
                        }
                    })?;
                    return Ok(Received {
                        name: event.name,
                        event_id: event.event_id,
                        payload,
                    });
                }
                (Some(ReceiveAction::TimedOut), _) => {
                    return Err(WorkflowError::EventTimedOut { step: index, names })
                }
                (_, deadline_ms) => deadline_ms,
            };
            // Waiting: whatever killed the process before, this run got this far.
            cell.survived(&*self.lane.env.store);
            // A deadline sooner than `park_after` from now, or than the park's time, is waited
            // for in memory.
            if let (Some(deadline), Some(at)) = (deadline_ms, park_at_ms) {
                if !self.lane.env.parks_for(now_ms, deadline) || deadline <= at {
                    park_at_ms = None;
                }
            }
            if park_at_ms.is_some_and(|at| at <= now_ms) {
                // Parked only if nothing was delivered since the look above (decided under
                // the cell lock, where deliveries are written).
                let waits = |state: &RunState| {
                    matches!(
                        receive_action(state, index, now_ms),
                        Some(ReceiveAction::Wait)
                    )
                };
                // Not parked (an event just delivered, a cancel or pause asked for, an engine
                // going away): waits in memory, and tries again when something wakes it.
                match self.lane.park(deadline_ms, &waits, None).await {
                    Ok(false) => {}
                    Ok(true) => return Err(self.interrupt(Interrupt::Parked)),
                    Err(cause) => return Err(self.interrupt(cause)),
                }
            }
            let clock = self.lane.env.clock.clone();
            let wake_at_ms = match (deadline_ms, park_at_ms.filter(|at| *at > now_ms)) {
                (Some(deadline), Some(park)) => Some(deadline.min(park)),
                (deadline, park) => deadline.or(park),
            };
            let wake = async {
                match wake_at_ms {
                    Some(at_ms) => clock.sleep_until(at_ms).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = news => {}
                _ = wake => {}
                cause = self.lane.interrupted() => return Err(self.interrupt(cause)),
            }
        }
    }

    /// Publishes `value` under `name`, durably: readers of the run's values
    /// ([`crate::Engine::published`], the API's `GET /v1/runs/{id}/published/{name}`) get the
    /// latest one per name, and those waiting for a newer one are woken. A publish is a
    /// journaled operation: replay publishes nothing again, and a replay that publishes another
    /// name or value at that point is non-determinism.
    pub async fn publish<T: Serialize>(
        &mut self,
        name: &str,
        value: &T,
    ) -> Result<(), WorkflowError> {
        self.check()?;
        let value = match check_event_name("published value name", name)
            .map_err(EngineError::InvalidRequest)
            .and_then(|()| {
                serde_json::to_value(value).map_err(|source| EngineError::Serialise {
                    what: format!("published value {name:?}"),
                    source,
                })
            }) {
            Ok(value) => value,
            Err(e) => return Err(self.interrupt(Interrupt::Engine(e))),
        };
        let bytes = crate::limits::json_bytes(&value);
        if bytes > EVENT_PAYLOAD_BYTES_MAX {
            let e = EngineError::TooLarge {
                what: format!("published value {name:?}"),
                bytes,
                limit: EVENT_PAYLOAD_BYTES_MAX,
            };
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        let index = self.next_index()?;
        let journaled = self
            .lane
            .cell
            .with_state(|state| match state.ops.get(index.0 as usize) {
                None => Ok(false),
                Some(Op::Publish { name: n, digest: d }) if n == name && *d == digest(&value) => {
                    Ok(true)
                }
                Some(other) => Err(format!(
                    "journal holds {}, code asks for a publish of {name:?} with value {}",
                    other.describe(),
                    digest(&value)
                )),
            });
        match journaled {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.journal(Event::ValuePublished {
                    step: index,
                    name: name.into(),
                    value,
                })?;
                self.durable().await?;
                crate::crash::point("event.after_published");
                self.lane.cell.news.notify_waiters();
                Ok(())
            }
            Err(detail) => Err(self.interrupt(Interrupt::NonDeterminism { index, detail })),
        }
    }
}

/// The names of a receive, checked: 1 to [`RECEIVE_NAMES_MAX`] valid names, none twice.
fn receive_names(names: &[&str]) -> Result<Vec<String>, String> {
    if names.is_empty() || names.len() > RECEIVE_NAMES_MAX {
        return Err(format!(
            "a receive takes 1 to {RECEIVE_NAMES_MAX} event names, not {}",
            names.len()
        ));
    }
    let mut checked: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        check_event_name("event name", name)?;
        if checked.iter().any(|n| n == name) {
            return Err(format!("a receive names event {name:?} twice"));
        }
        checked.push((*name).to_owned());
    }
    Ok(checked)
}
