//! The dispatcher: sleep until the earliest message is due, claim a batch ahead with the facts
//! its checks need ([`ahead`]), and for each message [`guard`] (re-check the rule), [`compose`]
//! (render, links, headers), [`deliver`] (send behind the phase fence) and hand the outcome to
//! [`complete`], which writes outcomes in groups. This file is the loop: sleeping, claiming,
//! reaping and the relay gate.
//!
//! Every write of an attempt carries the claim's token, so a process that stalled past its
//! lease cannot overwrite what another did.

mod ahead;
mod complete;
mod compose;
mod deliver;
mod guard;
mod owner_digest;

pub use compose::{Draft, MessageInputs, TEST_SUBJECT_PREFIX, compose_draft, render_message, verp};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use lettre::message::Mailbox;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use ahead::{Queue, Queued};
use guard::{LookupError, SOURCE_RETRY};

use crate::backoff::backoff;
use crate::links::{LinkSigner, MessageTags};
use crate::metrics::Health;
use crate::playbook::Playbook;
use crate::rules::Decision;
use crate::sources::{Source, SourceError};
use crate::store::{ClaimedMessage, Outcome, SharedStore, StoreError};
use crate::transport::Transport;
use crate::transport::dkim::Dkim;

/// What the dispatcher needs from the config.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub instance: String,
    pub batch_size: u32,
    pub lease: TimeDelta,
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub resend_unknown: bool,
    pub from: Mailbox,
    pub reply_to: Option<Mailbox>,
    pub message_id_domain: String,
    pub default_timezone: Tz,
    /// How often expired claims are reaped and overdue messages expired.
    pub reap_every: Duration,
    /// Signs unsubscribe, open and click links; `None` when there is no URL to reach us at.
    pub links: Option<LinkSigner>,
    /// `List-Unsubscribe: <mailto:...>` as well, when configured.
    pub unsubscribe_mailto: Option<String>,
    pub dkim: Option<Arc<Dkim>>,
    /// VERP: with `bounces+ID.TAG@domain` as the envelope sender, a bounce names its message.
    pub bounce_address: Option<lettre::Address>,
    /// Sign VERP addresses and make Message-IDs unguessable (from the link secret).
    pub tags: MessageTags,
    /// `[replies] address`: every message's Reply-To is this with a signed tag
    /// (`replies+ID.TAG@...`), in place of `sender.reply_to`.
    pub reply_address: Option<lettre::Address>,
}

/// While the relay is unreachable, nobody sends: one failure pauses everyone, with backoff.
#[derive(Debug, Default)]
struct RelayGate {
    state: Mutex<(u32, Option<Instant>)>,
}

impl RelayGate {
    fn paused_until(&self) -> Option<Instant> {
        let state = self.state.lock().ok()?;
        state.1.filter(|until| *until > Instant::now())
    }

    /// One outage fails every connection's message at about the same time: they count as one
    /// failure, so the backoff grows by outage, not by connection.
    fn failed(&self) -> Instant {
        let Ok(mut state) = self.state.lock() else {
            return Instant::now();
        };
        if let Some(until) = state.1.filter(|until| *until > Instant::now()) {
            return until;
        }
        state.0 += 1;
        let until =
            Instant::now() + backoff(state.0, Duration::from_secs(1), Duration::from_secs(300));
        state.1 = Some(until);
        until
    }

    fn succeeded(&self) {
        if let Ok(mut state) = self.state.lock() {
            *state = (0, None);
        }
    }
}

pub struct Dispatcher {
    pub store: SharedStore,
    pub playbook: watch::Receiver<Arc<Playbook>>,
    pub transport: Arc<Transport>,
    pub settings: Arc<DispatchSettings>,
    pub wake: Arc<Notify>,
    pub health: Arc<Health>,
}

/// What one send task needs, shared.
struct Context {
    store: SharedStore,
    playbook: watch::Receiver<Arc<Playbook>>,
    transport: Arc<Transport>,
    settings: Arc<DispatchSettings>,
    health: Arc<Health>,
    relay: RelayGate,
    /// Fires when the shutdown deadline passes: unsent messages are released, not sent.
    hard_stop: CancellationToken,
    /// Writes the outcomes, in groups.
    completer: complete::Completer,
}

impl Dispatcher {
    /// Runs until `shutdown`; in-flight sends are spawned on `tracker` and finish on their own.
    /// `hard_stop` tells them to give up what has not started sending.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        // Two messages per connection: one on the wire, the next writing its phase meanwhile
        // (`deliver`).
        let permits = Arc::new(Semaphore::new(2 * self.transport.parallelism()));
        // One unwritten outcome per connection at most: what a crash can lose (RELIABILITY.md).
        let (completer, writer) = complete::completer(
            self.transport.parallelism(),
            self.store.clone(),
            self.health.clone(),
            self.wake.clone(),
            hard_stop.clone(),
        );
        // Ends once the dispatcher and every send task have dropped the context.
        tracker.spawn(writer.run());
        let context = Arc::new(Context {
            store: self.store.clone(),
            playbook: self.playbook.clone(),
            transport: self.transport.clone(),
            settings: self.settings.clone(),
            health: self.health.clone(),
            relay: RelayGate::default(),
            hard_stop,
            completer,
        });
        let connections = self.transport.parallelism();
        let mut queue = Queue::new(connections, self.settings.batch_size);
        let mut last_reap: Option<Instant> = None;
        let mut db_failures = 0u32;
        while !shutdown.is_cancelled() {
            self.health.dispatcher_alive();
            if let Some(until) = context.relay.paused_until() {
                // Nobody sends while the relay is away: give the held claims back meanwhile.
                let at = later(Utc::now(), until);
                queue
                    .release_all(&context, at, "the mail relay is paused")
                    .await;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep_until(until) => continue,
                }
            }
            if last_reap.is_none_or(|at| at.elapsed() >= self.settings.reap_every) {
                match self.housekeeping().await {
                    Ok(()) => last_reap = Some(Instant::now()),
                    Err(error) => {
                        db_failures += 1;
                        self.database_trouble(&error, db_failures, &shutdown).await;
                        continue;
                    }
                }
            }
            // While every connection is busy, keep turning the loop (health, watchdog).
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            };
            if context.relay.paused_until().is_some() {
                // A send failed while this loop waited for its connection.
                continue;
            }
            if queue.wants_more(connections) {
                match queue.fill(&context).await {
                    Ok(_) => {
                        if db_failures > 0 {
                            tracing::info!("the database is reachable again; dispatching resumes");
                            db_failures = 0;
                        }
                        self.health.database_ok();
                    }
                    Err(error) => {
                        db_failures += 1;
                        drop(permit);
                        self.database_trouble(&error, db_failures, &shutdown).await;
                        continue;
                    }
                }
            }
            let Some(next) = queue.pop() else {
                drop(permit);
                self.sleep_until_due(&shutdown).await;
                continue;
            };
            tracker.spawn(send_one(context.clone(), next, permit));
        }
        queue
            .release_all(&context, Utc::now(), "the daemon is shutting down")
            .await;
        tracing::debug!("dispatcher stopped claiming");
    }

    /// Reaps expired claims and expires overdue messages.
    async fn housekeeping(&self) -> Result<(), StoreError> {
        let reaped = self
            .store
            .reap_expired(self.settings.resend_unknown)
            .await?;
        if reaped.rescheduled > 0 {
            tracing::warn!(
                count = reaped.rescheduled,
                "rescheduled messages whose claim expired before sending"
            );
        }
        if reaped.unknown > 0 {
            tracing::warn!(
                count = reaped.unknown,
                "messages whose claim expired after the body was handed over are now `unknown`"
            );
        }
        let expired = self.store.expire_overdue().await?;
        if !expired.is_empty() {
            tracing::warn!(
                count = expired.len(),
                "skipped messages that expired before they could go out"
            );
        }
        Ok(())
    }

    /// Sleeps until the next message is due, a wake-up (new plans, reload), the next
    /// housekeeping, or shutdown, whichever is first.
    async fn sleep_until_due(&self, shutdown: &CancellationToken) {
        let heartbeat = self.settings.reap_every.min(Duration::from_secs(10));
        let next = match self.store.next_due_in().await {
            Ok(Some(delta)) => delta.to_std().unwrap_or_default().min(heartbeat),
            Ok(None) => heartbeat,
            Err(error) => {
                tracing::warn!(%error, "cannot read the next due time");
                heartbeat
            }
        };
        if next.is_zero() {
            return;
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(next) => {}
            () = self.wake.notified() => {}
        }
    }

    async fn database_trouble(
        &self,
        error: &StoreError,
        failures: u32,
        shutdown: &CancellationToken,
    ) {
        self.health.database_error(error);
        let delay = backoff(
            failures,
            Duration::from_millis(250),
            Duration::from_secs(30),
        );
        tracing::warn!(%error, failures, retry_in = ?delay, "database error while dispatching; retrying");
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One message, from guard to recorded outcome. Holds a transport permit throughout.
async fn send_one(context: Arc<Context>, queued: Queued, _permit: OwnedSemaphorePermit) {
    let started = std::time::Instant::now();
    let claim = &queued.claim;
    let outcome = match attempt(&context, &queued).await {
        Ok(Some(outcome)) => outcome,
        Ok(None) => return,
        Err(LookupError::Store(error)) => {
            // The guard could not read the database: try again soon, without counting it.
            tracing::warn!(message_id = claim.id, %error, "database error before sending; released");
            context.health.database_error(&error);
            Outcome::Released {
                at: Utc::now() + TimeDelta::seconds(5),
                reason: format!("database error: {error}"),
            }
        }
        Err(LookupError::Source(error)) => {
            // The business's database is away or its query broke: the message waits (until it
            // expires), the other rules go on. While the source is left alone after a failure,
            // its messages wait that long, and say so once.
            if matches!(error, SourceError::Paused { .. }) {
                tracing::debug!(message_id = claim.id, %error, "source paused; released");
            } else {
                tracing::warn!(message_id = claim.id, %error, "cannot read the source before sending; released");
            }
            let wait = context
                .playbook
                .borrow()
                .sources
                .source(error.source_name())
                .and_then(Source::paused_for)
                .and_then(|d| TimeDelta::from_std(d).ok())
                .unwrap_or_default()
                .max(SOURCE_RETRY);
            Outcome::Released {
                at: Utc::now() + wait,
                reason: error.to_string(),
            }
        }
    };
    // The connection takes its next message once the completer has room for this outcome.
    context
        .completer
        .hand_over(queued.claim, outcome, started)
        .await;
}

/// Guard, compose and deliver. `Ok(None)`: the claim was lost and nothing may be written.
async fn attempt(context: &Context, queued: &Queued) -> Result<Option<Outcome>, LookupError> {
    let (claim, facts) = (&queued.claim, queued.fresh_facts());
    let playbook = context.playbook.borrow().clone();
    if claim.rule == crate::digest::RULE {
        return owner_digest::attempt(context, &playbook, queued).await;
    }
    let Some(rule) = playbook.rule(&claim.rule) else {
        return Ok(Some(Outcome::Skipped {
            reason: format!("the rule {:?} no longer exists", claim.rule),
        }));
    };
    let evaluation = guard::guard(context, &playbook, rule, claim, facts).await?;
    let found = match evaluation.decision {
        Decision::Send(found) => found,
        decision => {
            if matches!(decision, Decision::Skip(_) | Decision::Fail(_)) {
                keep_checks(context, claim, &evaluation.record).await?;
            }
            return Ok(guard::stop(decision));
        }
    };
    if let Some(outcome) = context.held_back() {
        return Ok(Some(outcome));
    }
    let settings = &context.settings;
    let record = &evaluation.record;
    let composed = match compose::compose(settings, &playbook, rule, claim, &found, record) {
        Ok(composed) => composed,
        Err(reason) => {
            return Ok(Some(Outcome::Failed {
                reply: None,
                reason,
            }));
        }
    };
    let outcome = deliver::deliver(context, rule, queued, found.tz, composed).await;
    Ok(Some(outcome))
}

/// Keeps the checks that stopped a message with it, so the message page shows which one did.
async fn keep_checks(
    context: &Context,
    claim: &ClaimedMessage,
    record: &crate::rules::CheckRecord,
) -> Result<(), LookupError> {
    let lines = guard::check_lines(record);
    context
        .store
        .keep_checks(claim.id, &claim.token, &lines)
        .await?;
    Ok(())
}

impl Context {
    /// A message that passed its checks but may not go out now: shutdown, or a paused relay.
    fn held_back(&self) -> Option<Outcome> {
        let now = Utc::now();
        if self.hard_stop.is_cancelled() {
            return Some(Outcome::Released {
                at: now,
                reason: "the daemon is shutting down".into(),
            });
        }
        let until = self.relay.paused_until()?;
        Some(Outcome::Released {
            at: later(now, until),
            reason: "the mail relay is paused".into(),
        })
    }
}

/// A tokio instant as wall-clock time (for recording when a paused message is due again).
fn later(now: DateTime<Utc>, until: Instant) -> DateTime<Utc> {
    now + TimeDelta::from_std(until.saturating_duration_since(Instant::now())).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_gate_pauses_after_a_failure_and_reopens_after_success() {
        let gate = RelayGate::default();
        assert!(gate.paused_until().is_none());
        let until = gate.failed();
        assert!(gate.paused_until().is_some());
        assert_eq!(
            gate.failed(),
            until,
            "a failure during the pause is the same outage"
        );
        assert_eq!(gate.state.lock().map(|s| s.0).ok(), Some(1));
        gate.succeeded();
        assert!(gate.paused_until().is_none());
    }
}
