//! The dispatcher: sleep until the earliest message is due, claim a batch, and for each
//! message guard (re-check the rule), render, send and record the outcome.
//!
//! Every write of an attempt carries the claim's token, so a process that stalled past its
//! lease cannot overwrite what another did. The phase "the body is about to go out" is written
//! before the body is sent: an expired claim that never reached it is simply rescheduled, one
//! that did becomes `unknown` and is never resent behind the owner's back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use lettre::message::Mailbox;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::backoff;
use crate::daemon::Health;
use crate::links::{self, Link, LinkSigner, MessageTags};
use crate::plan::{attributes_match, customer_timezone};
use crate::playbook::Playbook;
use crate::render::{MessageExtras, message_context};
use crate::rules::{Rule, Unless};
use crate::sources::{Source, SourceError};
use crate::store::{
    ClaimedMessage, Customer, Delivery, Event, Outcome, SentContent, SharedStore, StoreError,
};
use crate::transport::dkim::Dkim;
use crate::transport::{self, SendError, Transport};

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

    fn failed(&self) -> Instant {
        let Ok(mut state) = self.state.lock() else {
            return Instant::now();
        };
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
    /// Wakes the dispatcher when an outcome makes a message due again (retry, release).
    wake: Arc<Notify>,
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
        let permits = Arc::new(Semaphore::new(self.transport.parallelism()));
        let context = Arc::new(Context {
            store: self.store.clone(),
            playbook: self.playbook.clone(),
            transport: self.transport.clone(),
            settings: self.settings.clone(),
            health: self.health.clone(),
            relay: RelayGate::default(),
            hard_stop,
            wake: self.wake.clone(),
        });
        let mut last_reap: Option<Instant> = None;
        let mut db_failures = 0u32;
        while !shutdown.is_cancelled() {
            self.health.dispatcher_alive();
            if let Some(until) = context.relay.paused_until() {
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
            let first = tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            };
            let free = 1 + permits.available_permits() as u32;
            let claims = match self
                .store
                .claim_due(
                    &self.settings.instance,
                    free.min(self.settings.batch_size),
                    self.settings.lease,
                )
                .await
            {
                Ok(claims) => claims,
                Err(error) => {
                    db_failures += 1;
                    drop(first);
                    self.database_trouble(&error, db_failures, &shutdown).await;
                    continue;
                }
            };
            if db_failures > 0 {
                tracing::info!("the database is reachable again; dispatching resumes");
                db_failures = 0;
            }
            self.health.database_ok();
            if claims.is_empty() {
                drop(first);
                self.sleep_until_due(&shutdown).await;
                continue;
            }
            let mut first = Some(first);
            for claim in claims {
                let permit = match first.take() {
                    Some(permit) => permit,
                    None => match permits.clone().try_acquire_owned() {
                        Ok(permit) => permit,
                        // Cannot happen: we claimed no more than the free permits.
                        Err(_) => match permits.clone().acquire_owned().await {
                            Ok(permit) => permit,
                            Err(_) => break,
                        },
                    },
                };
                tracker.spawn(send_one(context.clone(), claim, permit));
            }
        }
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
async fn send_one(context: Arc<Context>, claim: ClaimedMessage, _permit: OwnedSemaphorePermit) {
    let started = std::time::Instant::now();
    let outcome = match attempt(&context, &claim).await {
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
    record(&context, &claim, &outcome).await;
    if matches!(outcome, Outcome::Retry { .. } | Outcome::Released { .. }) {
        // Due again soon: the dispatcher may be asleep until its heartbeat.
        context.wake.notify_one();
    }
    context
        .health
        .record_outcome(&claim.rule, &outcome, started.elapsed());
    if matches!(outcome, Outcome::Sent { .. }) {
        let late = (Utc::now() - claim.due_at).num_milliseconds() as f64 / 1000.0;
        context.health.record_lateness(late);
    }
}

/// Writes the outcome, retrying while the database is away, until the hard stop.
async fn record(context: &Context, claim: &ClaimedMessage, outcome: &Outcome) {
    let mut failures = 0;
    loop {
        match context.store.finish(claim.id, &claim.token, outcome).await {
            Ok(true) => {
                tracing::info!(
                    message_id = claim.id,
                    rule = %claim.rule,
                    customer = %claim.customer_id,
                    state = %outcome.state(),
                    attempt = claim.attempts,
                    "{}",
                    describe(outcome)
                );
                return;
            }
            Ok(false) => {
                tracing::warn!(message_id = claim.id, state = %outcome.state(), "the claim was lost before the outcome was recorded; another process owns the message now");
                return;
            }
            Err(error) if error.is_unavailable() && !context.hard_stop.is_cancelled() => {
                failures += 1;
                context.health.database_error(&error);
                let delay = backoff(
                    failures,
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                );
                tracing::warn!(message_id = claim.id, %error, "cannot record the outcome yet; retrying");
                tokio::select! {
                    () = context.hard_stop.cancelled() => {}
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => {
                // The lease will expire and the reaper decides by the recorded phase.
                tracing::error!(message_id = claim.id, %error, state = %outcome.state(), "could not record the outcome");
                return;
            }
        }
    }
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

/// How long a message waits when its source cannot be read.
const SOURCE_RETRY: TimeDelta = TimeDelta::seconds(30);

/// A read before sending failed: touchpoint's own database, or a source.
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// Guard, render and send. `Ok(None)`: the claim was lost and nothing may be written.
async fn attempt(
    context: &Context,
    claim: &ClaimedMessage,
) -> Result<Option<Outcome>, LookupError> {
    let settings = &context.settings;
    let playbook = context.playbook.borrow().clone();
    let Some(rule) = playbook.rule(&claim.rule) else {
        return Ok(Some(Outcome::Skipped {
            reason: format!("the rule {:?} no longer exists", claim.rule),
        }));
    };
    let (customer, event) = match guard(context, &playbook, rule, claim).await? {
        Guarded::Send { customer, event } => (customer, event),
        Guarded::Stop(outcome) => return Ok(Some(outcome)),
    };
    let tz = customer_timezone(&customer, settings.default_timezone);
    let now = Utc::now();
    if let Some(window) = &rule.send_window
        && !window.contains(now, tz)
    {
        let at = window.next_open(now, tz);
        if claim.expires_at.is_some_and(|expiry| at > expiry) {
            return Ok(Some(Outcome::Skipped {
                reason: "expired: the send window does not open again before expire_after runs out"
                    .into(),
            }));
        }
        return Ok(Some(Outcome::Released {
            at,
            reason: "outside the send window".into(),
        }));
    }
    if context.hard_stop.is_cancelled() {
        return Ok(Some(Outcome::Released {
            at: now,
            reason: "the daemon is shutting down".into(),
        }));
    }
    if let Some(until) = context.relay.paused_until() {
        return Ok(Some(Outcome::Released {
            at: later(now, until),
            reason: "the mail relay is paused".into(),
        }));
    }

    let message_id = transport::message_id_for(
        claim.id,
        &settings.tags.message_id(claim.id),
        &rule.name,
        &settings.message_id_domain,
    );
    let unsubscribe_url = settings
        .links
        .as_ref()
        .map(|l| l.url(&Link::Unsubscribe { message: claim.id }));
    let extras = MessageExtras {
        years: claim
            .detail
            .get("years")
            .and_then(serde_json::Value::as_i64)
            .map(|y| y as i32),
        message_id: message_id.clone(),
        unsubscribe_url: unsubscribe_url.clone(),
        timezone: tz.name().to_string(),
    };
    let template_context =
        message_context(&customer, event.as_ref(), rule, &playbook.business, &extras);
    let rendered = match playbook.templates.render(rule, &template_context) {
        Ok(rendered) => rendered,
        Err(error) => {
            return Ok(Some(Outcome::Failed {
                reply: None,
                reason: format!("cannot render: {error}"),
            }));
        }
    };
    let html = tracked_html(
        settings,
        rule,
        claim.id,
        rendered.html,
        unsubscribe_url.as_deref(),
    );
    // Kept with the message for the owner: what went out, and why it was allowed to.
    let content = SentContent {
        text: rendered.text.clone(),
        html: html.clone(),
        checks: crate::web::why::checks_passed(rule, &customer, event.as_ref(), claim, tz, now),
    };
    let email = transport::build_email(transport::EmailParts {
        from: &settings.from,
        reply_to: settings.reply_to.as_ref(),
        to_name: customer.name.as_deref(),
        to_email: &customer.email,
        subject: &rendered.subject,
        text: rendered.text,
        html,
        message_id: message_id.clone(),
        headers: extra_headers(settings, rule, unsubscribe_url.as_deref()),
        dkim: settings.dkim.as_deref(),
        envelope_from: settings
            .bounce_address
            .as_ref()
            .and_then(|a| verp(a, claim.id, &settings.tags)),
    });
    let email = match email {
        Ok(email) => email,
        Err(reason) => {
            return Ok(Some(Outcome::Failed {
                reply: None,
                reason,
            }));
        }
    };
    let delivery = Delivery {
        email: customer.email.clone(),
        subject: rendered.subject.clone(),
        message_id,
    };
    let margin =
        TimeDelta::from_std(context.transport.body_deadline()).unwrap_or(TimeDelta::seconds(30));
    let store = &context.store;
    let hard_stop = &context.hard_stop;
    // Set once the body may be going out; from then on the send must be seen through.
    let body_started = std::sync::atomic::AtomicBool::new(false);
    let started = &body_started;
    let delivering = context.transport.deliver(&email, || async move {
        if hard_stop.is_cancelled() {
            return false;
        }
        match store.begin_body_with(claim.id, &claim.token, &delivery, &content, margin).await {
            Ok(held) => {
                started.store(held, std::sync::atomic::Ordering::SeqCst);
                held
            }
            Err(error) => {
                tracing::warn!(message_id = claim.id, %error, "cannot record the send; not sending the body");
                false
            }
        }
    });
    tokio::pin!(delivering);
    let result = tokio::select! {
        result = &mut delivering => result,
        () = hard_stop.cancelled() => {
            if body_started.load(std::sync::atomic::Ordering::SeqCst) {
                delivering.await
            } else {
                // Still at MAIL/RCPT/DATA: dropping the send closes the connection and
                // delivers nothing, so the message can wait for the next start.
                return Ok(Some(Outcome::Released { at: Utc::now(), reason: "the daemon is shutting down".into() }));
            }
        }
    };
    Ok(match result {
        Ok(reply) => {
            context.relay.succeeded();
            Some(Outcome::Sent { reply })
        }
        Err(SendError::Withdrawn) if context.hard_stop.is_cancelled() => Some(Outcome::Released {
            at: Utc::now(),
            reason: "the daemon is shutting down".into(),
        }),
        // begin_body said no: the claim was lost (then the fenced write below changes nothing),
        // or the message expired or its address was suppressed at the last moment.
        Err(SendError::Withdrawn) => Some(withdrawn(context, claim, &customer.email).await),
        Err(SendError::RelayUnavailable(reason)) => {
            let until = context.relay.failed();
            tracing::warn!(%reason, "the mail relay is unavailable; pausing sending");
            context.health.relay_trouble(&reason);
            Some(Outcome::Released {
                at: later(Utc::now(), until),
                reason: format!("the mail relay is unavailable: {reason}"),
            })
        }
        Err(SendError::Transient(reply)) => {
            context.relay.succeeded();
            Some(retry_or_fail(settings, rule, claim, tz, reply))
        }
        Err(SendError::Permanent { reply, bad_address }) => {
            context.relay.succeeded();
            if bad_address {
                context
                    .store
                    .suppress(
                        &customer.email,
                        &format!("rejected at SMTP: {reply}"),
                        "smtp",
                    )
                    .await
                    .unwrap_or_else(|error| {
                        // The refusal is recorded below either way; the next refusal suppresses.
                        tracing::warn!(message_id = claim.id, %error, "cannot add the refused address to the suppressions");
                        false
                    });
            }
            Some(Outcome::Failed {
                reply: Some(reply),
                reason: "the mail server refused the message permanently".into(),
            })
        }
        Err(SendError::Ambiguous(reason)) if settings.resend_unknown => Some(retry_or_fail(
            settings,
            rule,
            claim,
            tz,
            format!("no reply after the body: {reason}"),
        )),
        Err(SendError::Ambiguous(reason)) => Some(Outcome::Unknown { reason }),
    })
}

/// Why the body was not sent after all, as a fenced outcome.
async fn withdrawn(context: &Context, claim: &ClaimedMessage, email: &str) -> Outcome {
    if claim.expires_at.is_some_and(|expiry| Utc::now() >= expiry) {
        return if claim.attempts > 1 {
            Outcome::Failed {
                reply: None,
                reason: "expired while retrying: not delivered within expire_after".into(),
            }
        } else {
            Outcome::Skipped {
                reason: "expired: could not go out within expire_after of its due time".into(),
            }
        };
    }
    if matches!(context.store.is_suppressed(email).await, Ok(true)) {
        return Outcome::Skipped {
            reason: "the address was suppressed just before sending".into(),
        };
    }
    Outcome::Released {
        at: Utc::now() + TimeDelta::seconds(5),
        reason: "not sent: the send could not be recorded before the body went out".into(),
    }
}

/// Click tracking and the open pixel, where the rule asks for them.
fn tracked_html(
    settings: &DispatchSettings,
    rule: &Rule,
    message: i64,
    html: String,
    keep: Option<&str>,
) -> String {
    let Some(signer) = &settings.links else {
        return html;
    };
    let mut html = html;
    if rule.track_clicks {
        html = links::track_clicks(&html, keep, |url| {
            signer.url(&Link::Click {
                message,
                url: url.to_string(),
            })
        });
    }
    if rule.track_opens {
        html = links::add_open_pixel(&html, &signer.url(&Link::Open { message }));
    }
    html
}

/// `List-Unsubscribe` (RFC 2369) with one-click `List-Unsubscribe-Post` (RFC 8058).
fn extra_headers(
    settings: &DispatchSettings,
    rule: &Rule,
    unsubscribe_url: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![("X-Touchpoint-Rule", rule.name.clone())];
    let mut targets = Vec::new();
    if let Some(url) = unsubscribe_url {
        targets.push(format!("<{url}>"));
    }
    if let Some(mailto) = &settings.unsubscribe_mailto {
        targets.push(format!("<mailto:{mailto}?subject=unsubscribe>"));
    }
    if !targets.is_empty() {
        headers.push(("List-Unsubscribe", targets.join(", ")));
    }
    if unsubscribe_url.is_some() {
        headers.push(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click".into()));
    }
    headers
}

/// `bounces@acme.example` -> `bounces+42.TAG@acme.example`, TAG signing the message id (see
/// [`crate::bounce::parse_verp`]).
pub fn verp(
    bounce_address: &lettre::Address,
    message: i64,
    tags: &MessageTags,
) -> Option<lettre::Address> {
    format!(
        "{}+{message}.{}@{}",
        bounce_address.user(),
        tags.verp(message),
        bounce_address.domain()
    )
    .parse()
    .ok()
}

/// Checks again, just before sending, everything that could have changed since planning.
async fn guard(
    context: &Context,
    playbook: &Playbook,
    rule: &Rule,
    claim: &ClaimedMessage,
) -> Result<Guarded, LookupError> {
    let stop = |outcome| Ok(Guarded::Stop(outcome));
    let skip = |reason: String| Ok(Guarded::Stop(Outcome::Skipped { reason }));
    if !rule.enabled {
        return skip(format!("the rule {:?} is disabled", rule.name));
    }
    if claim.expires_at.is_some_and(|expiry| Utc::now() > expiry) {
        // Never sent late: the same verdict the periodic expiry sweep would give.
        return stop(if claim.attempts > 1 {
            Outcome::Failed {
                reply: None,
                reason: "expired while retrying: not delivered within expire_after".into(),
            }
        } else {
            Outcome::Skipped {
                reason: "expired: could not go out within expire_after of its due time".into(),
            }
        });
    }
    if claim.attempts > context.settings.max_attempts as i32 {
        return stop(Outcome::Failed {
            reply: None,
            reason: format!("gave up after {} attempts", context.settings.max_attempts),
        });
    }
    let (customer, event) = match subject(context, playbook, claim).await? {
        Ok(found) => found,
        Err(reason) => return skip(reason),
    };
    // Whose ids the customer's are: a source with its own customers, or touchpoint's.
    let space = source_of(claim)
        .and_then(|name| playbook.sources.source(name))
        .and_then(Source::id_space);
    let store = &context.store;
    if store.is_suppressed(&customer.email).await? {
        return skip("the address is on the suppression list".into());
    }
    if !attributes_match(&rule.only_if, &customer.attributes) {
        return skip("the customer no longer matches the rule's only_if conditions".into());
    }
    let now = Utc::now();
    for condition in &rule.unless {
        let (kind, after, why) = match condition {
            Unless::SinceTrigger { event: kind } => {
                let Some(trigger) = &event else { continue };
                (kind, trigger.occurred_at, "since the triggering event")
            }
            Unless::Within {
                event: kind,
                within,
            } => (kind, now - *within, "recently"),
        };
        let own_table = space.is_none() && store.has_event_after(&customer.id, kind, after).await?;
        if own_table
            || playbook
                .sources
                .has_event_after(space, &customer.id, kind, after)
                .await?
        {
            return skip(format!("unless: the customer had a {kind:?} event {why}"));
        }
    }
    Ok(Guarded::Send { customer, event })
}

/// What the guard decided: send to this customer about this event, or stop with an outcome.
enum Guarded {
    Send {
        customer: Customer,
        event: Option<Event>,
    },
    Stop(Outcome),
}

/// The source a message was planned from, if any.
fn source_of(claim: &ClaimedMessage) -> Option<&str> {
    claim.detail.get("source").and_then(|v| v.as_str())
}

/// The message's customer and event, read now: from touchpoint's own tables, or from the
/// source the message was planned from (its detail says which). `Err(reason)` when either is
/// gone, so the message is skipped with that reason.
async fn subject(
    context: &Context,
    playbook: &Playbook,
    claim: &ClaimedMessage,
) -> Result<Result<(Customer, Option<Event>), String>, LookupError> {
    let Some(source_name) = source_of(claim) else {
        let store = &context.store;
        let Some(customer) = store.customer(&claim.customer_id).await? else {
            return Ok(Err("the customer no longer exists".into()));
        };
        let event = match &claim.event_id {
            Some(id) => match store.event(id).await? {
                Some(event) => Some(event),
                None => return Ok(Err(format!("the triggering event {id:?} no longer exists"))),
            },
            None => None,
        };
        return Ok(Ok((customer, event)));
    };
    let Some(source) = playbook.sources.source(source_name) else {
        return Ok(Err(format!(
            "the source {source_name:?} is no longer configured"
        )));
    };
    let query_name = claim
        .detail
        .get("query")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let Some(query) = source.events.iter().find(|q| q.name == query_name) else {
        return Ok(Err(format!(
            "the source {source_name:?} no longer has the query {query_name:?}"
        )));
    };
    let occurred_at = claim
        .detail
        .get("occurred_at")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or(claim.trigger_at);
    let id = claim.event_id.as_deref().unwrap_or_default();
    let Some(event) = source.event(query, id, occurred_at).await? else {
        return Ok(Err(format!(
            "the triggering event {id:?} is no longer in the source {source_name:?}"
        )));
    };
    let customer = if source.has_customers() {
        match source.customer(&claim.customer_id).await {
            Ok(customer) => customer,
            Err(SourceError::Row { message, .. }) => {
                return Ok(Err(format!(
                    "the customer cannot be read from the source {source_name:?}: {message}"
                )));
            }
            Err(error) => return Err(error.into()),
        }
    } else {
        context.store.customer(&claim.customer_id).await?
    };
    let Some(customer) = customer else {
        return Ok(Err(format!(
            "the customer {:?} is no longer in the source {source_name:?}",
            claim.customer_id
        )));
    };
    Ok(Ok((customer, Some(event))))
}

/// A transient failure: retry with backoff, or fail when attempts or time run out.
fn retry_or_fail(
    settings: &DispatchSettings,
    rule: &Rule,
    claim: &ClaimedMessage,
    tz: Tz,
    reply: String,
) -> Outcome {
    if claim.attempts >= settings.max_attempts as i32 {
        return Outcome::Failed {
            reply: Some(reply),
            reason: format!("gave up after {} attempts", claim.attempts),
        };
    }
    let delay = backoff(
        claim.attempts.max(1) as u32,
        settings.retry_base,
        settings.retry_max,
    );
    let mut at = Utc::now() + TimeDelta::from_std(delay).unwrap_or(TimeDelta::hours(1));
    if let Some(window) = &rule.send_window {
        at = window.next_open(at, tz);
    }
    if claim.expires_at.is_some_and(|expiry| at > expiry) {
        return Outcome::Failed {
            reply: Some(reply),
            reason: "still not delivered when expire_after ran out".into(),
        };
    }
    Outcome::Retry { at, reply }
}

/// A tokio instant as wall-clock time (for recording when a paused message is due again).
fn later(now: DateTime<Utc>, until: Instant) -> DateTime<Utc> {
    now + TimeDelta::from_std(until.saturating_duration_since(Instant::now())).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verp_address_carries_the_message_id_and_its_signature() {
        let tags = MessageTags::new(b"test secret");
        let bounces: lettre::Address = "bounces@acme.example".parse().unwrap();
        let address = verp(&bounces, 42, &tags).unwrap();
        assert_eq!(
            address.to_string(),
            format!("bounces+42.{}@acme.example", tags.verp(42))
        );
        let parsed = crate::bounce::parse_verp(address.as_ref()).unwrap();
        assert_eq!(parsed.message, 42);
        assert!(tags.verp_matches(42, parsed.tag.as_deref().unwrap()));
    }

    #[test]
    fn the_relay_gate_pauses_after_a_failure_and_reopens_after_success() {
        let gate = RelayGate::default();
        assert!(gate.paused_until().is_none());
        gate.failed();
        assert!(gate.paused_until().is_some());
        gate.succeeded();
        assert!(gate.paused_until().is_none());
    }
}
