//! Deliver: hand a composed message to the transport behind the phase fence, and turn what the
//! mail server said into an outcome.
//!
//! The phase "the body is about to go out" is written (with the bodies and checks) before the
//! message takes a connection, and only while the claim is still held: an expired claim that
//! never reached it is simply rescheduled, one that did becomes `unknown` and is never resent
//! behind the owner's back. Writing it before taking a connection lets the write of one message
//! overlap the previous message's time on the wire (the dispatcher runs two messages per
//! connection). The body then starts only while the lease, by this process's clock, still
//! covers the transport's timeout for the body and its reply: a local deadline checked just
//! before the first byte, so no body starts after the lease could have run out.

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{TimeDelta, Utc};
use chrono_tz::Tz;
use tokio::time::Instant;

use super::ahead::Queued;
use super::compose::Composed;
use super::{Context, DispatchSettings, later};
use crate::backoff::backoff;
use crate::rules::{self, Decision, Rule};
use crate::store::{ClaimedMessage, FrequencyGate, Outcome};
use crate::transport::{OutgoingEmail, SendError};

/// Sends the message and says what became of it.
pub(super) async fn deliver(
    context: &Context,
    rule: &Rule,
    queued: &Queued,
    tz: Tz,
    composed: Composed,
) -> Outcome {
    let Composed {
        email,
        delivery,
        content,
    } = composed;
    let claim = &queued.claim;
    if context.hard_stop.is_cancelled() {
        return shutting_down();
    }
    let timeout = context.transport.body_deadline();
    // The body may start until this instant: then the lease still covers its send and reply.
    let start_by = queued.lease_ends.checked_sub(timeout);
    let Some(start_by) = start_by.filter(|by| Instant::now() < *by) else {
        return too_late();
    };
    let margin = TimeDelta::from_std(timeout).unwrap_or(TimeDelta::seconds(30));
    let store = &context.store;
    let begun = match gate(context, rule, claim) {
        Some(gate) => {
            let limited = store.begin_body_limited(
                claim.id,
                &claim.token,
                &delivery,
                &content,
                margin,
                &gate,
            );
            limited.await
        }
        None => {
            let plain = store.begin_body_with(claim.id, &claim.token, &delivery, &content, margin);
            plain.await
        }
    };
    let recorded = begun.unwrap_or_else(|error| {
        tracing::warn!(message_id = claim.id, %error, "cannot record the send; not sending the body");
        false
    });
    if recorded && let Some(held_back) = context.held_back() {
        // The relay failed for another message meanwhile: nothing of this one went out.
        return held_back;
    }
    let result = if recorded {
        match send_recorded(context, &email, start_by).await {
            Sending::Done(result) => result,
            Sending::ShuttingDown => return shutting_down(),
            Sending::TooLate => return too_late(),
        }
    } else {
        Err(SendError::Withdrawn)
    };
    outcome(context, rule, claim, tz, &delivery.email, result).await
}

/// How a send whose phase is recorded ended.
enum Sending {
    Done(Result<String, SendError>),
    /// The hard stop came before the body: nothing of it went out.
    ShuttingDown,
    /// The body could not start before the local deadline: nothing of it went out.
    TooLate,
}

/// Sends a message whose phase is recorded: the body starts only before `start_by` and the
/// hard stop; once it has started, the send is seen through.
async fn send_recorded(context: &Context, email: &OutgoingEmail, start_by: Instant) -> Sending {
    let hard_stop = &context.hard_stop;
    let body_started = AtomicBool::new(false);
    let missed_deadline = AtomicBool::new(false);
    let (started, missed) = (&body_started, &missed_deadline);
    let delivering = context.transport.deliver(email, || async move {
        if hard_stop.is_cancelled() {
            return false;
        }
        if Instant::now() >= start_by {
            missed.store(true, Ordering::SeqCst);
            return false;
        }
        started.store(true, Ordering::SeqCst);
        true
    });
    tokio::pin!(delivering);
    // Until the body starts, dropping the send closes the connection and delivers nothing: at
    // the hard stop the message waits for the next start, and at the deadline it is released
    // while the lease still holds (a connection, a greeting or an envelope that takes too long
    // must not keep a message whose phase says `body` until the reaper makes it `unknown`).
    let result = tokio::select! {
        result = &mut delivering => result,
        () = hard_stop.cancelled() => {
            if !body_started.load(Ordering::SeqCst) {
                return Sending::ShuttingDown;
            }
            delivering.await
        }
        () = tokio::time::sleep_until(start_by) => {
            if !body_started.load(Ordering::SeqCst) {
                return Sending::TooLate;
            }
            delivering.await
        }
    };
    if missed_deadline.load(Ordering::SeqCst) {
        return Sending::TooLate;
    }
    Sending::Done(result)
}

/// A message whose body could not start while its lease covered the send: nothing went out,
/// so it is due again shortly, the attempt not counted.
fn too_late() -> Outcome {
    Outcome::Released {
        at: Utc::now() + TOO_LATE_WAIT,
        reason: "not sent: too little of the claim's lease was left to send it".into(),
    }
}

/// How long a message that missed its start waits before it is claimed again: a relay that
/// slow is not asked again at once.
const TOO_LATE_WAIT: TimeDelta = TimeDelta::seconds(5);

/// The rule's frequency limit as the body fence applies it, if the rule has one.
fn gate(context: &Context, rule: &Rule, claim: &ClaimedMessage) -> Option<FrequencyGate> {
    let limit = rule.limited()?;
    Some(FrequencyGate {
        customer_id: claim.customer_id.clone(),
        max: limit.max,
        per: limit.per,
        exempt_rules: context.playbook.borrow().rules.ignoring_frequency_limit(),
    })
}

fn shutting_down() -> Outcome {
    Outcome::Released {
        at: Utc::now(),
        reason: "the daemon is shutting down".into(),
    }
}

/// What the mail server's answer means for the message (and for the relay gate).
async fn outcome(
    context: &Context,
    rule: &Rule,
    claim: &ClaimedMessage,
    tz: Tz,
    email: &str,
    result: Result<String, SendError>,
) -> Outcome {
    let settings = &context.settings;
    match result {
        Ok(reply) => {
            context.relay.succeeded();
            Outcome::Sent { reply }
        }
        Err(SendError::Withdrawn) if context.hard_stop.is_cancelled() => shutting_down(),
        // begin_body said no: the claim was lost (then the fenced write below changes nothing),
        // or the message expired or its address was suppressed at the last moment.
        Err(SendError::Withdrawn) => withdrawn(context, rule, claim, tz, email).await,
        Err(SendError::RelayUnavailable(reason)) => {
            let until = context.relay.failed();
            tracing::warn!(%reason, "the mail relay is unavailable; pausing sending");
            context.health.relay_trouble(&reason);
            Outcome::Released {
                at: later(Utc::now(), until),
                reason: format!("the mail relay is unavailable: {reason}"),
            }
        }
        Err(SendError::Transient(reply)) => {
            context.relay.succeeded();
            retry_or_fail(settings, rule, claim, tz, reply)
        }
        Err(SendError::Permanent { reply, bad_address }) => {
            context.relay.succeeded();
            if bad_address {
                suppress_refused(context, claim, email, &reply).await;
            }
            Outcome::Failed {
                reply: Some(reply),
                reason: "the mail server refused the message permanently".into(),
            }
        }
        Err(SendError::Ambiguous(reason)) if settings.resend_unknown => {
            let reply = format!("no reply after the body: {reason}");
            retry_or_fail(settings, rule, claim, tz, reply)
        }
        Err(SendError::Ambiguous(reason)) => Outcome::Unknown { reason },
    }
}

/// An address the server refused as unknown goes on the suppression list.
async fn suppress_refused(context: &Context, claim: &ClaimedMessage, email: &str, reply: &str) {
    let reason = format!("rejected at SMTP: {reply}");
    if let Err(error) = context.store.suppress(email, &reason, "smtp").await {
        // The refusal is recorded either way; the next refusal suppresses.
        tracing::warn!(message_id = claim.id, %error, "cannot add the refused address to the suppressions");
    }
}

/// Why the body was not sent after all, as a fenced outcome.
async fn withdrawn(
    context: &Context,
    rule: &Rule,
    claim: &ClaimedMessage,
    tz: Tz,
    email: &str,
) -> Outcome {
    if claim.expires_at.is_some_and(|expiry| Utc::now() >= expiry) {
        return match rules::expired(claim.attempts) {
            Decision::Fail(reason) => Outcome::Failed {
                reply: None,
                reason,
            },
            Decision::Skip(reason) => Outcome::Skipped { reason },
            Decision::Release { at, reason } => Outcome::Released { at, reason },
            Decision::Send(never) => match never {},
        };
    }
    if matches!(context.store.is_suppressed(email).await, Ok(true)) {
        return Outcome::Skipped {
            reason: "the address was suppressed just before sending".into(),
        };
    }
    if let Some(outcome) = limit_reached(context, rule, claim, tz).await {
        return outcome;
    }
    Outcome::Released {
        at: Utc::now() + TimeDelta::seconds(5),
        reason: "not sent: the send could not be recorded before the body went out".into(),
    }
}

/// When the body fence refused because another message to the customer went out first (from
/// this process or another): the message waits until the limit allows it, or is skipped if
/// that is past its expiry. Never sent, never failed. (`None`: the limit was not the reason.)
async fn limit_reached(
    context: &Context,
    rule: &Rule,
    claim: &ClaimedMessage,
    tz: Tz,
) -> Option<Outcome> {
    let limit = rule.limited()?;
    let exempt = context.playbook.borrow().rules.ignoring_frequency_limit();
    let now = Utc::now();
    let (store, since) = (&context.store, now - limit.per);
    let customer = &claim.customer_id;
    let counted = store.counted_sends(customer, since, &exempt, claim.id);
    let in_flight = store.in_flight_sends(customer, since, &exempt, claim.id);
    let usage = rules::FrequencyUsage {
        counted: counted.await.ok()?,
        in_flight: in_flight.await.ok()?,
        outranked_by: Vec::new(),
    };
    let decision: Decision<super::guard::Found> =
        rules::limit_decision(rule, &limit, &usage, claim.expires_at, tz, now)?;
    super::guard::stop(decision)
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
    let at = Utc::now() + TimeDelta::from_std(delay).unwrap_or(TimeDelta::hours(1));
    let at = rule.next_open(at, tz);
    if claim.expires_at.is_some_and(|expiry| at > expiry) {
        return Outcome::Failed {
            reply: Some(reply),
            reason: "still not delivered when expire_after ran out".into(),
        };
    }
    Outcome::Retry { at, reply }
}
