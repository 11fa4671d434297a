//! Events in and values out, as the journal tells them: the run's mailbox (events delivered
//! from outside, in arrival order, each consumed at most once), the receives that take events
//! out of it, and the values the body published.

use std::collections::HashMap;

use serde_json::Value;

use super::{Op, RunState};
use crate::ids::OperationIndex;
use crate::journal::{digest, Published};

/// One delivered event.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// Its name.
    pub name: String,
    /// The sender's idempotency key.
    pub event_id: String,
    /// A digest of its payload: what a second send of the same id is compared with.
    pub digest: String,
    /// When it was delivered (the journal entry's time).
    pub at_ms: u64,
    /// Its payload while it waits in the mailbox; taken by the receive that consumes it.
    pub payload: Option<Value>,
}

/// The run's mailbox: every event delivered, in arrival order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mailbox {
    /// Deliveries in arrival order, consumed ones included (their ids stay known).
    pub deliveries: Vec<Delivery>,
    /// Position in `deliveries` by event id.
    pub by_id: HashMap<String, usize>,
    /// Deliveries before this position are all consumed.
    first_pending: usize,
    /// Deliveries not consumed yet.
    pub pending: u32,
}

impl Mailbox {
    /// The delivery with id `event_id`, if any.
    pub fn get(&self, event_id: &str) -> Option<&Delivery> {
        self.by_id.get(event_id).map(|&i| &self.deliveries[i])
    }

    /// The earliest pending delivery with one of `names`.
    pub fn first_of(&self, names: &[String]) -> Option<&Delivery> {
        self.deliveries[self.first_pending..]
            .iter()
            .find(|d| d.payload.is_some() && names.contains(&d.name))
    }
}

/// An event a receive took.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedEvent {
    /// Its name.
    pub name: String,
    /// Its id.
    pub event_id: String,
    /// Its payload.
    pub payload: Value,
}

/// A receive as the journal tells it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceiveOp {
    /// The names it takes an event of.
    pub names: Vec<String>,
    /// When it stops waiting, if it does.
    pub deadline_ms: Option<u64>,
    /// How it ended: the event it took, or `None` inside for a timeout.
    pub outcome: Option<Option<ReceivedEvent>>,
}

/// What a receive does next.
#[derive(Clone, Debug, PartialEq)]
pub enum ReceiveAction {
    /// The journal says it took this event: return it.
    Received(ReceivedEvent),
    /// The journal says it timed out.
    TimedOut,
    /// Take this pending event (journal `EventReceived`).
    Take(String),
    /// The deadline passed and no event of its names was delivered before it: journal
    /// `ReceiveTimedOut`.
    TimeOut,
    /// Nothing to take yet: wait for a delivery (or the deadline).
    Wait,
}

/// What the receive at `step` does next at time `now_ms`; `None` if `step` is no receive.
///
/// A pending event of the receive's names is taken if it was delivered before the deadline,
/// even when the run gets to it only after (the worker was down, say). One delivered at the
/// deadline or after stays in the mailbox for a later receive (the receive times out at its
/// deadline, and a delivery stamped with it may come after that decision).
pub fn receive_action(
    state: &RunState,
    step: OperationIndex,
    now_ms: u64,
) -> Option<ReceiveAction> {
    let Some(Op::Receive(op)) = state.ops.get(step.0 as usize) else {
        return None;
    };
    Some(match &op.outcome {
        Some(Some(event)) => ReceiveAction::Received(event.clone()),
        Some(None) => ReceiveAction::TimedOut,
        None => {
            let deadline = op.deadline_ms.unwrap_or(u64::MAX);
            match state.mailbox.first_of(&op.names) {
                Some(delivery) if delivery.at_ms < deadline => {
                    ReceiveAction::Take(delivery.event_id.clone())
                }
                _ if now_ms >= deadline => ReceiveAction::TimeOut,
                _ => ReceiveAction::Wait,
            }
        }
    })
}

impl RunState {
    /// `EventDelivered`: an event joins the mailbox. An id delivered twice is a corrupt
    /// journal (the sender's check keeps a second send of an id out of it).
    pub(super) fn event_delivered(
        &mut self,
        name: &str,
        event_id: &str,
        payload: &Value,
        at_ms: u64,
    ) -> Result<(), String> {
        let mailbox = &mut self.mailbox;
        if mailbox.by_id.contains_key(event_id) {
            return Err(format!("event {event_id:?} delivered twice"));
        }
        mailbox
            .by_id
            .insert(event_id.to_owned(), mailbox.deliveries.len());
        mailbox.deliveries.push(Delivery {
            name: name.to_owned(),
            event_id: event_id.to_owned(),
            digest: digest(payload),
            at_ms,
            payload: Some(payload.clone()),
        });
        mailbox.pending += 1;
        Ok(())
    }

    /// `ReceiveStarted`: a receive takes the next operation number.
    pub(super) fn receive_started(
        &mut self,
        step: OperationIndex,
        names: &[String],
        deadline_ms: Option<u64>,
    ) -> Result<(), String> {
        if step.0 as usize != self.ops.len() {
            return Err(format!(
                "receive {step} started out of order (next is #{})",
                self.ops.len()
            ));
        }
        self.ops.push(Op::Receive(ReceiveOp {
            names: names.to_vec(),
            deadline_ms,
            outcome: None,
        }));
        Ok(())
    }

    /// `EventReceived`: an open receive consumes a pending event of one of its names.
    pub(super) fn event_received(
        &mut self,
        step: OperationIndex,
        event_id: &str,
    ) -> Result<(), String> {
        let Some(Op::Receive(op)) = self.ops.get_mut(step.0 as usize) else {
            return Err(format!("event_received for {step}, which is not a receive"));
        };
        if op.outcome.is_some() {
            return Err(format!("receive {step} ended twice"));
        }
        let mailbox = &mut self.mailbox;
        let Some(&at) = mailbox.by_id.get(event_id) else {
            return Err(format!(
                "receive {step} took event {event_id:?}, never delivered"
            ));
        };
        let delivery = &mut mailbox.deliveries[at];
        if !op.names.contains(&delivery.name) {
            return Err(format!(
                "receive {step} of {:?} took event {event_id:?} named {:?}",
                op.names, delivery.name
            ));
        }
        let Some(payload) = delivery.payload.take() else {
            return Err(format!("event {event_id:?} consumed twice"));
        };
        op.outcome = Some(Some(ReceivedEvent {
            name: delivery.name.clone(),
            event_id: event_id.to_owned(),
            payload,
        }));
        mailbox.pending -= 1;
        while mailbox
            .deliveries
            .get(mailbox.first_pending)
            .is_some_and(|d| d.payload.is_none())
        {
            mailbox.first_pending += 1;
        }
        Ok(())
    }

    /// `ReceiveTimedOut`: an open receive gave up at its deadline.
    pub(super) fn receive_timed_out(&mut self, step: OperationIndex) -> Result<(), String> {
        match self.ops.get_mut(step.0 as usize) {
            Some(Op::Receive(op)) if op.outcome.is_none() && op.deadline_ms.is_some() => {
                op.outcome = Some(None);
                Ok(())
            }
            _ => Err(format!(
                "receive_timed_out for {step}, which is no open receive with a deadline"
            )),
        }
    }

    /// `ValuePublished`: a publish takes the next operation number, and its value replaces
    /// the name's last one.
    pub(super) fn value_published(
        &mut self,
        step: OperationIndex,
        name: &str,
        value: &Value,
        at_ms: u64,
    ) -> Result<(), String> {
        if step.0 as usize != self.ops.len() {
            return Err(format!(
                "publish {step} out of order (next is #{})",
                self.ops.len()
            ));
        }
        self.ops.push(Op::Publish {
            name: name.to_owned(),
            digest: digest(value),
        });
        self.progress_published(name, value, at_ms);
        Ok(())
    }

    /// `ProgressPublished` (and the value of a `ValuePublished`): the value replaces the
    /// name's last one.
    pub(super) fn progress_published(&mut self, name: &str, value: &Value, at_ms: u64) {
        // The entry's journal index (`len` is advanced after this fold) orders versions.
        let version = u64::from(self.len);
        self.published.insert(
            name.to_owned(),
            Published {
                value: value.clone(),
                version,
                at_ms,
            },
        );
    }
}

/// The latest value published under `name` in `entries` (a journal read from the store), with
/// the same versions as [`RunState::published`] gives.
pub fn latest_published(entries: &[crate::journal::Entry], name: &str) -> Option<Published> {
    entries
        .iter()
        .enumerate()
        .rev()
        .find_map(|(index, entry)| match &entry.event {
            crate::journal::Event::ValuePublished {
                name: published,
                value,
                ..
            }
            | crate::journal::Event::ProgressPublished {
                name: published,
                value,
            } if published == name => Some(Published {
                value: value.clone(),
                version: index as u64,
                at_ms: entry.at_ms,
            }),
            _ => None,
        })
}
