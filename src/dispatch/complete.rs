//! The completer: send tasks hand their outcomes over and move on; one task writes them in
//! groups (whatever arrived within a few milliseconds), one transaction per group, each row
//! checking its own token (as River's batch completer does).
//!
//! An outcome is written without waiting for the disk, and a killed daemon loses the ones not
//! yet written: their messages stay in phase `body` (the reaper makes them `unknown`) or
//! `claimed` (rescheduled), never sent twice. To bound that loss, at most `slots` outcomes
//! (one per SMTP connection) wait unwritten at a time; a send task waits for a slot before
//! its connection takes the next message.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::backoff::backoff;
use crate::metrics::Health;
use crate::store::{ClaimedMessage, Finishing, Outcome, SharedStore};

/// How long the completer waits for more outcomes to join a group.
const GATHER: Duration = Duration::from_millis(2);

/// An outcome on its way to the database.
pub(super) struct Done {
    pub claim: ClaimedMessage,
    pub outcome: Outcome,
    /// When the attempt started, for the send-time metric.
    pub started: std::time::Instant,
    /// Held until the outcome is written.
    slot: OwnedSemaphorePermit,
}

/// The send tasks' end of the completer.
pub(super) struct Completer {
    queue: mpsc::UnboundedSender<Done>,
    slots: Arc<Semaphore>,
}

/// What the completer task needs.
pub(super) struct Writer {
    pub store: SharedStore,
    pub health: Arc<Health>,
    pub wake: Arc<Notify>,
    /// Past the shutdown deadline an outcome the database does not take is given up.
    pub hard_stop: CancellationToken,
    queue: mpsc::UnboundedReceiver<Done>,
    slots: usize,
}

/// A completer with `slots` outcomes at most waiting to be written, and the task's half.
pub(super) fn completer(
    slots: usize,
    store: SharedStore,
    health: Arc<Health>,
    wake: Arc<Notify>,
    hard_stop: CancellationToken,
) -> (Completer, Writer) {
    let slots = slots.max(1);
    let (queue, receiver) = mpsc::unbounded_channel();
    let completer = Completer {
        queue,
        slots: Arc::new(Semaphore::new(slots)),
    };
    let writer = Writer {
        store,
        health,
        wake,
        hard_stop,
        queue: receiver,
        slots,
    };
    (completer, writer)
}

impl Completer {
    /// Hands the outcome over, once a slot is free. If the completer is gone (it only ends
    /// when every send task has), the outcome is lost like in a crash: the reaper settles it.
    pub(super) async fn hand_over(
        &self,
        claim: ClaimedMessage,
        outcome: Outcome,
        started: std::time::Instant,
    ) {
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return;
        };
        let done = Done {
            claim,
            outcome,
            started,
            slot,
        };
        if let Err(lost) = self.queue.send(done) {
            let id = lost.0.claim.id;
            tracing::error!(
                message_id = id,
                "the completer has stopped; the outcome is left to the reaper"
            );
        }
    }
}

impl Writer {
    /// Writes outcomes until every send task and the dispatcher have let go of the queue.
    pub(super) async fn run(mut self) {
        while let Some(first) = self.queue.recv().await {
            let mut group = vec![first];
            while group.len() < self.slots {
                match tokio::time::timeout(GATHER, self.queue.recv()).await {
                    Ok(Some(done)) => group.push(done),
                    Ok(None) | Err(_) => break,
                }
            }
            self.write(group).await;
        }
        tracing::debug!("completer stopped");
    }

    /// Writes one group, retrying while the database is away (until the hard stop); if the
    /// group fails otherwise, each outcome is tried alone, so one bad row fails only itself.
    async fn write(&self, group: Vec<Done>) {
        let finishing: Vec<Finishing<'_>> = group
            .iter()
            .map(|d| Finishing {
                id: d.claim.id,
                token: &d.claim.token,
                outcome: &d.outcome,
            })
            .collect();
        let written = match self.retrying(&finishing).await {
            Ok(held) => held.into_iter().map(Some).collect(),
            // Past the hard stop with the database away, one by one would only wait longer.
            Err(error) if finishing.len() > 1 && !error.is_unavailable() => {
                let mut each = Vec::with_capacity(finishing.len());
                for one in &finishing {
                    let held = self.retrying(std::slice::from_ref(one)).await;
                    each.push(held.ok().and_then(|h| h.first().copied()));
                }
                each
            }
            Err(_) => vec![None; finishing.len()],
        };
        for (done, held) in group.into_iter().zip(written) {
            self.report(done, held);
        }
    }

    /// `finish_all`, again after a backoff while the error says trying again can succeed.
    async fn retrying(
        &self,
        finishing: &[Finishing<'_>],
    ) -> Result<Vec<bool>, crate::store::StoreError> {
        let mut failures = 0;
        loop {
            match self.store.finish_all(finishing).await {
                Ok(held) => return Ok(held),
                Err(error) if error.is_unavailable() && !self.hard_stop.is_cancelled() => {
                    failures += 1;
                    self.health.database_error(&error);
                    let delay = retry_delay(failures);
                    tracing::warn!(count = finishing.len(), %error, "cannot record outcomes yet; retrying");
                    tokio::select! {
                        () = self.hard_stop.cancelled() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err(error) => {
                    // The leases will expire and the reaper decides by the recorded phase.
                    for one in finishing {
                        tracing::error!(message_id = one.id, %error, state = %one.outcome.state(), "could not record the outcome");
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Logs one outcome as written (or not), wakes the dispatcher for what is due again, and
    /// counts it. `held`: `None` when it could not be written.
    fn report(&self, done: Done, held: Option<bool>) {
        let Done {
            claim,
            outcome,
            started,
            slot,
        } = done;
        drop(slot);
        match held {
            Some(true) => tracing::info!(
                message_id = claim.id,
                rule = %claim.rule,
                customer = %claim.customer_id,
                state = %outcome.state(),
                attempt = claim.attempts,
                "{}",
                describe(&outcome)
            ),
            Some(false) => {
                tracing::warn!(message_id = claim.id, state = %outcome.state(), "the claim was lost before the outcome was recorded; another process owns the message now")
            }
            None => {}
        }
        if matches!(outcome, Outcome::Retry { .. } | Outcome::Released { .. }) {
            // Due again soon: the dispatcher may be asleep until its heartbeat.
            self.wake.notify_one();
        }
        self.health
            .record_outcome(&claim.rule, &outcome, started.elapsed());
        if matches!(outcome, Outcome::Sent { .. }) {
            let late = (Utc::now() - claim.due_at).num_milliseconds() as f64 / 1000.0;
            self.health.record_lateness(late);
        }
    }
}

/// How long to wait before the `failures`th retry of a group. The first few come quickly:
/// after a database restart the pool hands out its dead connections one at a time, each
/// failing once, and every send task waits on the completer meanwhile.
fn retry_delay(failures: u32) -> Duration {
    const QUICK: u32 = 10;
    if failures <= QUICK {
        return Duration::from_millis(50);
    }
    backoff(
        failures - QUICK,
        Duration::from_millis(200),
        Duration::from_secs(10),
    )
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Sent { reply } => format!("sent: {reply}"),
        Outcome::Retry { at, reply } => format!("will retry at {at}: {reply}"),
        Outcome::Failed { reason, reply } => format!(
            "failed: {reason}{}",
            reply
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
        Outcome::Skipped { reason } => format!("skipped: {reason}"),
        Outcome::Unknown { reason } => format!("outcome unknown: {reason}"),
        Outcome::Released { at, reason } => format!("not sent now ({reason}); due again at {at}"),
    }
}
