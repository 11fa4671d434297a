//! Waits: polling a probe until the resource it reads is usable, judged by the answers of
//! polls sent (docs/waits.md). The start and the end are journaled, and the polls so far
//! whenever the run parks between two polls; single polls are not.

use crate::contain::{contained, contained_sync};
use crate::error::Result;
use crate::ids::{Attempt, IdempotencyKey, OperationIndex};
use crate::interrupt::Interrupt;
use crate::journal::{ErrorClass, Event};
use crate::journal::{WaitOutcome, WaitPolls, WaitSchedule};
use crate::limiter::{Priority, Slot};
use crate::limits::{UNANSWERED_POLLS_MAX, UNANSWERED_SPAN_MIN};
use crate::replay::Op;
use crate::step::{StepContext, StepError};
use crate::wait::{Probe, WaitPolicy};
use crate::workflow::WorkflowError;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;

use super::Ctx;

impl Ctx {
    /// Polls `probe` under `policy` until it holds `policy.confirmations` times in a row
    /// (returning the last poll's output) or waiting is judged hopeless
    /// ([`WorkflowError::WaitTimedOut`], which the body may catch to recreate the resource).
    ///
    /// The start (with the resolved schedule and absolute deadline) and the end are
    /// journaled, and the polls so far whenever the run parks between two of them; single
    /// polls are not. The wait is judged by what the resource answered, not by what the
    /// engine did (docs/waits.md):
    /// - it times out only on a "not ready" answer to a poll *sent* at or after the deadline,
    ///   and only once it has had `confirmations` answers since it (re)started, so a deadline
    ///   that passed while the worker was down, or while polls queued at the rate limiter,
    ///   costs no resource its chance;
    /// - the deadline moves later by the time this process's polls spent queued at the
    ///   service's limiter;
    /// - a throttled or failed poll is no answer: it neither counts as a confirmation nor
    ///   breaks a run of them. Past the deadline, [`UNANSWERED_POLLS_MAX`] of them in a row,
    ///   over at least [`UNANSWERED_SPAN_MIN`], end the wait as failed, with the last error;
    /// - a next poll at least the engine's `park_after` away parks the run: the polls so far
    ///   are journaled (`WaitParked`), and a load from that park by the same engine goes on
    ///   from them;
    /// - after a restart (or any load but that one) a run of confirmations starts over, so a
    ///   resource is never granted with fewer than `confirmations` polls in a row.
    ///
    /// The time to readiness is recorded in the statistics of `wait:<kind>`, which
    /// [`WaitPolicy::learned`] reads, only when it measures the resource: see
    /// [`crate::stats`] and docs/waits.md.
    pub async fn wait<P: Probe>(
        &mut self,
        probe: P,
        policy: WaitPolicy,
    ) -> Result<P::Output, WorkflowError> {
        self.check()?;
        let index = self.next_index()?;
        let argument = self.argument(index, "wait", P::KIND, &probe)?;
        let started = match self.journaled_wait::<P>(index, &argument) {
            Ok(Some(Journaled::Ended(outcome))) => return self.wait_result::<P>(index, outcome),
            Ok(Some(Journaled::Under(start))) => start,
            Ok(None) => self.start_wait::<P>(index, argument, &policy).await?,
            Err(detail) => return Err(self.interrupt(Interrupt::NonDeterminism { index, detail })),
        };
        let outcome = self.poll_in_span(index, &probe, &started).await?;
        self.journal(Event::WaitEnded {
            step: index,
            outcome: outcome.clone(),
        })?;
        crate::stats::EventCounters::bump(&self.lane.env.counters.waits);
        // Not synced here: the next step's start record, or the run's terminal record, shares
        // this entry's sync, as for a step's outcome.
        crate::crash::point("wait.after_ended");
        self.wait_result::<P>(index, outcome)
    }

    /// What the journal holds of wait `index` of `argument`: nothing yet, its end, or its
    /// start to go on from; an error naming the mismatch if it holds something else there.
    fn journaled_wait<P: Probe>(
        &mut self,
        index: OperationIndex,
        argument: &serde_json::Value,
    ) -> Result<Option<Journaled>, String> {
        // What goes on from the journal, without the argument (up to 48 KiB) it was matched by.
        let op = self.lane.cell.with_state(|state| match state.ops.get(index.0 as usize) {
            None => Ok(None),
            Some(Op::Wait(op)) if op.kind == P::KIND && op.argument == *argument => Ok(Some((
                op.schedule.clone(),
                op.started_at_ms,
                op.parked.clone(),
                op.outcome.clone(),
            ))),
            Some(Op::Wait(op)) => Err(format!(
                "journal holds wait {:?} with argument {}, code asks for wait {:?} with argument {}",
                op.kind,
                op.argument,
                P::KIND,
                argument
            )),
            Some(other) => Err(format!("journal holds {}, code asks for wait {:?}", other.describe(), P::KIND)),
        })?;
        let Some((schedule, started_at_ms, parked, outcome)) = op else {
            return Ok(None);
        };
        if let Some(outcome) = outcome {
            return Ok(Some(Journaled::Ended(outcome)));
        }
        // Loaded from the park this wait made (nothing of the run ran since): it goes on from
        // its polls so far. After any other load, it starts over.
        let parked = parked.filter(|_| self.lane.take_unparked());
        Ok(Some(Journaled::Under(WaitStart {
            schedule,
            started_at_ms,
            here: parked.as_ref().is_some_and(|p| p.here),
            polls: parked.map(|p| p.polls),
        })))
    }

    /// Starts wait `index`: resolves its schedule and journals it, durably.
    async fn start_wait<P: Probe>(
        &mut self,
        index: OperationIndex,
        argument: serde_json::Value,
        policy: &WaitPolicy,
    ) -> Result<WaitStart, WorkflowError> {
        let started_at_ms = self.now_ms();
        let stats = self.lane.env.stats.summary(&format!("wait:{}", P::KIND));
        let schedule = policy.resolve(started_at_ms, stats.as_ref());
        tracing::debug!(run_id = %self.lane.cell.id, step = index.0, kind = P::KIND, ?schedule, "wait starts");
        self.journal(Event::WaitStarted {
            step: index,
            kind: P::KIND.into(),
            argument,
            schedule: schedule.clone(),
        })?;
        self.durable().await?;
        crate::crash::point("wait.after_started");
        Ok(WaitStart {
            schedule,
            started_at_ms,
            here: true,
            polls: None,
        })
    }

    /// [`Ctx::poll`] in the operation's `wait` span (the parent of each poll's `probe` span),
    /// whose `outcome` field says how the wait ended: `ready`, `timed_out`, another ending,
    /// or `interrupted`.
    async fn poll_in_span<P: Probe>(
        &mut self,
        index: OperationIndex,
        probe: &P,
        start: &WaitStart,
    ) -> Result<WaitOutcome, WorkflowError> {
        let key = IdempotencyKey::for_step(&self.lane.cell.id, index);
        let span = tracing::info_span!(
            "wait",
            run_id = self.lane.cell.id.as_str(),
            step = index.0,
            kind = P::KIND,
            idempotency_key = %key,
            outcome = tracing::field::Empty,
        );
        let polled =
            tracing::Instrument::instrument(self.poll(index, probe, start), span.clone()).await;
        span.record(
            "outcome",
            match &polled {
                Ok(WaitOutcome::Ready { .. }) => "ready",
                Ok(WaitOutcome::TimedOut { .. }) => "timed_out",
                Ok(_) => "ended",
                Err(_) => "interrupted",
            },
        );
        polled
    }

    async fn poll<P: Probe>(
        &mut self,
        index: OperationIndex,
        probe: &P,
        start: &WaitStart,
    ) -> Result<WaitOutcome, WorkflowError> {
        let schedule = &start.schedule;
        let mut resumed = start.polls.is_some();
        let mut polls = start.polls.clone().unwrap_or_else(|| WaitPolls {
            last_sent_ms: start.started_at_ms,
            next_at_ms: start
                .started_at_ms
                .saturating_add(schedule.initial_delay_ms),
            ..WaitPolls::default()
        });
        loop {
            let wake_at_ms = polls.wake_at_ms(schedule);
            self.sleep_to_poll(index, &polls, start.here, wake_at_ms)
                .await?;
            let scheduled_ms = self.now_ms();
            // The first poll after a load from the wait's park: how late the load made it
            // counts as time held, for the time to readiness (not for the deadline, which a
            // late sleep in memory does not move either).
            let late_ms = match std::mem::take(&mut resumed) {
                true => scheduled_ms.saturating_sub(wake_at_ms),
                false => 0,
            };
            let (answer, sent_ms) =
                match self.poll_once(index, probe, Attempt(polls.sent + 1)).await {
                    Ok(polled) => polled,
                    Err(cause) => return Err(self.interrupt(cause)),
                };
            // A poll answered, and nothing of it journaled: a restart from here starts the
            // wait over, whatever its last `WaitParked` entry says.
            crate::crash::point("wait.after_poll");
            let queued_ms = sent_ms.saturating_sub(scheduled_ms);
            let gap_ms = wake_at_ms.saturating_sub(polls.last_sent_ms);
            polls.sent += 1;
            polls.queued_ms += queued_ms;
            polls.last_sent_ms = sent_ms;
            let deadline_ms = schedule.deadline_ms.saturating_add(polls.queued_ms);
            let sent = SentPoll {
                sent_ms,
                delayed_ms: queued_ms.saturating_add(late_ms),
                gap_ms,
                past_deadline: sent_ms >= deadline_ms,
            };
            let kind = P::KIND;
            match polls.judge(answer, &sent, schedule.confirmations) {
                Verdict::Ready(output) => return Ok(self.ready::<P>(output, start, &polls)),
                Verdict::Ended(outcome) => {
                    tracing::info!(run_id = %self.lane.cell.id, step = index.0, kind, polls = polls.sent, ?outcome, "wait ended without the resource ready");
                    return Ok(outcome);
                }
                Verdict::Again => {}
            }
            self.plan_next_poll(start, &mut polls, sent_ms, queued_ms);
        }
    }

    /// Sets when the next poll of `polls` is due, after one sent at `sent_ms` that queued
    /// `queued_ms` at the limiter, and the interval the schedule carries on.
    fn plan_next_poll(
        &mut self,
        start: &WaitStart,
        polls: &mut WaitPolls,
        sent_ms: u64,
        queued_ms: u64,
    ) {
        let offset_ms = self.now_ms().saturating_sub(start.started_at_ms);
        let (next_offset_ms, carried_ms) = start.schedule.next_poll(
            offset_ms,
            polls.interval_ms,
            polls.streak,
            self.lane.rng.gen(),
        );
        polls.interval_ms = carried_ms;
        // No more often than the limiter serves polls: after one that queued `queued_ms`, the
        // next waits at least as long, so densely polling waits leave the service's budget to
        // the calls that make progress.
        polls.next_at_ms = start
            .started_at_ms
            .saturating_add(next_offset_ms)
            .max(sent_ms.saturating_add(queued_ms));
    }

    /// Sleeps until `wake_at_ms`, the next poll's time. A sleep long enough to park the run
    /// journals the polls so far first (`WaitParked`), which the wait goes on from when the
    /// run is loaded from that park. Whether to park is decided once, here.
    async fn sleep_to_poll(
        &mut self,
        index: OperationIndex,
        polls: &WaitPolls,
        here: bool,
        wake_at_ms: u64,
    ) -> Result<(), WorkflowError> {
        let park = self.lane.may_park(self.now_ms(), wake_at_ms);
        if park {
            self.journal(Event::WaitParked {
                step: index,
                polls: polls.clone(),
                here,
            })?;
        }
        if self.interrupt.is_some() {
            return Err(WorkflowError::Interrupted);
        }
        let slept = self.lane.sleep_or_park(wake_at_ms, park).await;
        slept.map_err(|cause| self.interrupt(cause))
    }

    /// One poll of `probe` (number `poll`), in a slot of its service's limiter, and the engine
    /// clock's time when it was sent (after its slot). A panicking poll is a failed poll, as
    /// a retryable error is. An interrupt heard while the poll queued for its slot (a pause
    /// or a cancel that returned meanwhile) comes instead, and nothing is sent.
    async fn poll_once<P: Probe>(
        &mut self,
        index: OperationIndex,
        probe: &P,
        poll: Attempt,
    ) -> Result<(Result<Option<P::Output>, StepError>, u64), Interrupt> {
        let ctx = StepContext {
            run_id: self.lane.cell.id.clone(),
            step: index,
            key: IdempotencyKey::for_step(&self.lane.cell.id, index),
            attempt: poll,
            resources: Arc::clone(&self.lane.env.resources),
            clock: self.lane.env.clock.clone(),
            effect_by_ms: None,
        };
        let span = tracing::debug_span!("probe", run_id = %self.lane.cell.id, step = index.0, kind = P::KIND, poll = poll.0);
        let service = contained_sync(|| probe.rate_limit().map(str::to_owned))
            .ok()
            .flatten();
        let limiter = service.map(|name| self.lane.env.limiters.get(&name));
        let slot = Slot::take(limiter.as_deref(), Priority::Probe).await;
        self.lane.check()?;
        let sent_ms = self.now_ms();
        let call = tracing::Instrument::instrument(async { probe.probe(&ctx).await }, span);
        let polled = contained(call)
            .await
            .unwrap_or_else(|panic| Err(StepError::retryable(format!("panicked: {panic}"))));
        slot.report(&polled);
        // Polls are not journaled: a poll that returned is what shows the run survives them.
        self.lane.cell.survived(&*self.lane.env.store);
        Ok((polled, sent_ms))
    }

    /// The outcome of a wait whose probe held: its last output. The time to readiness (from
    /// the wait's start to the sending of the poll that first saw it ready) is recorded under
    /// `wait:<kind>` when it measures the resource: the wait started in this drive of the run
    /// (no restart or suspension inside it), and that poll was not held at the limiter for
    /// longer than the interval it was scheduled after.
    fn ready<P: Probe>(
        &mut self,
        output: P::Output,
        start: &WaitStart,
        polls: &WaitPolls,
    ) -> WaitOutcome {
        let output = match serde_json::to_value(&output) {
            Ok(v) => v,
            Err(e) => {
                let error = StepError::permanent(format!(
                    "output of probe {} does not serialise: {e}",
                    P::KIND
                ));
                return WaitOutcome::Failed {
                    error: error.to_record(),
                    polls: polls.sent,
                };
            }
        };
        let held_ms = polls
            .first_ready_gap_ms
            .max(start.schedule.dense_interval_ms);
        if start.here && polls.first_ready_queued_ms <= held_ms {
            let waited_ms = polls.streak_started_ms.saturating_sub(start.started_at_ms);
            self.lane.env.stats.record(
                &format!("wait:{}", P::KIND),
                Duration::from_millis(waited_ms),
                self.lane.cell.id.as_str(),
                self.now_ms(),
            );
        } else {
            tracing::debug!(run_id = %self.lane.cell.id, kind = P::KIND, here = start.here, queued_ms = polls.first_ready_queued_ms, "time to readiness not recorded: it would measure the engine, not the resource");
        }
        WaitOutcome::Ready {
            output,
            polls: polls.sent,
        }
    }

    fn wait_result<P: Probe>(
        &mut self,
        index: OperationIndex,
        outcome: WaitOutcome,
    ) -> Result<P::Output, WorkflowError> {
        match outcome {
            WaitOutcome::Ready { output, .. } => serde_json::from_value(output).map_err(|e| {
                let detail = format!("recorded output of wait {} does not decode: {e}", P::KIND);
                self.interrupt(Interrupt::NonDeterminism { index, detail })
            }),
            WaitOutcome::TimedOut { polls } => Err(WorkflowError::WaitTimedOut {
                step: index,
                kind: P::KIND.into(),
                polls,
            }),
            WaitOutcome::Failed { error, .. } => Err(WorkflowError::Step {
                step: index,
                kind: P::KIND.into(),
                error,
            }),
        }
    }
}

/// What the journal holds of a wait already started.
enum Journaled {
    /// It ended so.
    Ended(WaitOutcome),
    /// It is under way: its start, and the polls it goes on from.
    Under(WaitStart),
}

/// A wait's journaled start, whether it was journaled by this drive of the run, and the polls
/// it goes on from.
struct WaitStart {
    schedule: WaitSchedule,
    started_at_ms: u64,
    /// Started in this drive of the run, or in the one that parked it and was loaded from
    /// that park: no restart or suspension since.
    here: bool,
    /// The polls so far, when the run is loaded from the park this wait made; `None`: none
    /// yet, or the wait starts over.
    polls: Option<WaitPolls>,
}

/// One poll as sent: when, how long it was delayed (queued at the limiter, and late after a
/// load from the wait's park), the interval it was scheduled after, and whether it was sent
/// past the (queue-extended) deadline.
struct SentPoll {
    sent_ms: u64,
    delayed_ms: u64,
    gap_ms: u64,
    past_deadline: bool,
}

/// What one poll's answer does to a wait.
enum Verdict<T> {
    /// Ready `confirmations` times in a row: the wait ends ready with this output.
    Ready(T),
    /// The wait ends otherwise (timed out, or failed).
    Ended(WaitOutcome),
    /// Poll again.
    Again,
}

/// What a wait's polls have seen: [`WaitPolls`], journaled when the run parks between them.
impl WaitPolls {
    /// When the next poll is sent: at its time, or at the deadline (moved later by the time
    /// polls queued) if that comes first with no run of confirmations under way, so that a
    /// poll sent there judges the resource (once).
    fn wake_at_ms(&self, schedule: &WaitSchedule) -> u64 {
        let deadline_ms = schedule.deadline_ms.saturating_add(self.queued_ms);
        if self.streak == 0 && self.last_sent_ms < deadline_ms {
            self.next_at_ms.min(deadline_ms)
        } else {
            self.next_at_ms
        }
    }

    /// A poll got an answer, ready or not.
    fn answered(&mut self) {
        self.answers += 1;
        self.unanswered = 0;
    }

    /// Counts `answer` to the poll `sent` and judges the wait by it: ready answers in a row
    /// up to `confirmations`; a "not ready" past the deadline (after at least
    /// `confirmations` answers) times it out; a permanent error fails it; no answer neither
    /// grows nor breaks the streak, and [`UNANSWERED_POLLS_MAX`] of them in a row past the
    /// deadline, spanning at least [`UNANSWERED_SPAN_MIN`], fail it.
    fn judge<T>(
        &mut self,
        answer: Result<Option<T>, StepError>,
        sent: &SentPoll,
        confirmations: u32,
    ) -> Verdict<T> {
        match answer {
            Ok(Some(output)) => {
                if self.streak == 0 {
                    self.streak_started_ms = sent.sent_ms;
                    self.first_ready_queued_ms = sent.delayed_ms;
                    self.first_ready_gap_ms = sent.gap_ms;
                }
                self.streak += 1;
                self.answered();
                if self.streak >= confirmations {
                    return Verdict::Ready(output);
                }
            }
            Ok(None) => {
                self.streak = 0;
                self.answered();
                if sent.past_deadline && self.answers >= confirmations {
                    return Verdict::Ended(WaitOutcome::TimedOut { polls: self.sent });
                }
            }
            Err(error) if error.class() == ErrorClass::Permanent => {
                return Verdict::Ended(WaitOutcome::Failed {
                    error: error.to_record(),
                    polls: self.sent,
                });
            }
            Err(error) => {
                if !sent.past_deadline {
                    self.unanswered = 0;
                } else {
                    if self.unanswered == 0 {
                        self.unanswered_since_ms = sent.sent_ms;
                    }
                    self.unanswered += 1;
                }
                tracing::debug!(%error, unanswered = self.unanswered, "probe failed; no answer");
                let span_ms = sent.sent_ms.saturating_sub(self.unanswered_since_ms);
                if self.unanswered >= UNANSWERED_POLLS_MAX
                    && span_ms >= UNANSWERED_SPAN_MIN.as_millis() as u64
                {
                    let error = StepError::retryable(format!(
                        "{} polls in a row past the deadline, over {:.1} s, got no answer; the last: {error}",
                        self.unanswered,
                        span_ms as f64 / 1000.0
                    ));
                    return Verdict::Ended(WaitOutcome::Failed {
                        error: error.to_record(),
                        polls: self.sent,
                    });
                }
            }
        }
        Verdict::Again
    }
}
