//! The guard: just before sending, the rule's checks run again (`rules::evaluate`) against
//! what the database and the sources say now. This file only reads the world for them: the
//! message's customer and event (from touchpoint's tables or the source the message was
//! planned from), the suppression list, and earlier events for `unless`.

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};

use super::Context;
use crate::plan::customer_timezone;
use crate::playbook::Playbook;
use crate::rules::{
    self, CheckRecord, Decision, Evaluation, FrequencyLimit, FrequencyUsage, MessageDetail,
    MessageState, Rule, SourceEvent,
};
use crate::sources::{Source, SourceError};
use crate::store::{
    CheckLine, ClaimedMessage, Customer, Event, Outcome, SendFacts, SharedStore, StoreError,
};

/// How long a message waits when its source cannot be read.
pub(super) const SOURCE_RETRY: TimeDelta = TimeDelta::seconds(30);

/// A read before sending failed: touchpoint's own database, or a source.
#[derive(Debug, thiserror::Error)]
pub(super) enum LookupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

pub(super) use crate::plan::why::Found;

/// Runs the rule's checks for a claimed message; the evaluation says what to do and keeps the
/// record of what was checked.
pub(super) async fn guard(
    context: &Context,
    playbook: &Playbook,
    rule: &Rule,
    claim: &ClaimedMessage,
    batch: Option<&SendFacts>,
) -> Result<Evaluation<Found>, LookupError> {
    let detail = MessageDetail::from_json(&claim.detail);
    let source = detail.source.as_ref();
    // Whose ids the customer's are: a source with its own customers, or touchpoint's.
    let space = source
        .and_then(|s| playbook.sources.source(&s.source))
        .and_then(Source::id_space);
    let facts = SendTime {
        context,
        playbook,
        rule,
        claim,
        source,
        space,
        batch,
    };
    let message = MessageState {
        expires_at: claim.expires_at,
        attempts: claim.attempts,
        max_attempts: context.settings.max_attempts,
    };
    rules::evaluate(rule, &message, &facts, Utc::now()).await
}

/// The outcome of a decision not to send now.
pub(super) fn stop(decision: Decision<Found>) -> Option<Outcome> {
    match decision {
        Decision::Send(_) => None,
        Decision::Skip(reason) => Some(Outcome::Skipped { reason }),
        Decision::Fail(reason) => Some(Outcome::Failed {
            reply: None,
            reason,
        }),
        Decision::Release { at, reason } => Some(Outcome::Released { at, reason }),
    }
}

/// The record's checks in words with their verdicts, as kept with the message.
pub(super) fn check_lines(record: &CheckRecord) -> Vec<CheckLine> {
    record
        .lines()
        .into_iter()
        .map(|(text, verdict)| CheckLine {
            text,
            verdict: verdict.name().to_string(),
        })
        .collect()
}

/// What the checks read, for one claimed message.
struct SendTime<'a> {
    context: &'a Context,
    playbook: &'a Playbook,
    rule: &'a Rule,
    claim: &'a ClaimedMessage,
    /// The source the message was planned from, if any.
    source: Option<&'a SourceEvent>,
    space: Option<&'a str>,
    /// What was read for the message's batch, when still fresh (`ahead`).
    batch: Option<&'a SendFacts>,
}

#[async_trait]
impl rules::Facts for SendTime<'_> {
    type Subject = Found;
    type Error = LookupError;

    async fn subject(&self) -> Result<Result<Found, String>, LookupError> {
        let reads = Reads {
            store: &self.context.store,
            batch: self.batch,
        };
        let found = match self.source {
            None => own_subject(&reads, self.claim).await?,
            Some(source) => source_subject(&reads, self.playbook, self.claim, source).await?,
        };
        let tz = self.context.settings.default_timezone;
        Ok(found.map(|(customer, event)| Found {
            tz: customer_timezone(&customer, tz),
            customer,
            event,
        }))
    }

    /// The recipient's address: the customer's, or for a rule `to = "owner"` the owner's (the
    /// customer's suppression does not stop the owner hearing about them).
    async fn is_suppressed(&self, subject: &Found) -> Result<bool, LookupError> {
        let address = self.playbook.recipient(self.rule, &subject.customer.email);
        if let Some(answer) = self.batch.and_then(|b| b.is_suppressed(address)) {
            return Ok(answer);
        }
        Ok(self.context.store.is_suppressed(address).await?)
    }

    async fn was_suppressed_at(
        &self,
        subject: &Found,
        at: DateTime<Utc>,
    ) -> Result<bool, LookupError> {
        let store = &self.context.store;
        let address = self.playbook.recipient(self.rule, &subject.customer.email);
        if let Some(answer) = self.batch.and_then(|b| b.was_suppressed_at(address, at)) {
            return Ok(answer);
        }
        Ok(store.suppressed_at(address, Some(at)).await?.is_some())
    }

    async fn had_event_after(
        &self,
        subject: &Found,
        kind: &str,
        after: DateTime<Utc>,
    ) -> Result<bool, LookupError> {
        let id = &subject.customer.id;
        if self.space.is_none() {
            let batch = self.batch.and_then(|b| b.has_event_after(id, kind, after));
            let own = match batch {
                Some(answer) => answer,
                None => self.context.store.has_event_after(id, kind, after).await?,
            };
            if own {
                return Ok(true);
            }
        }
        let sources = &self.playbook.sources;
        Ok(sources.has_event_after(self.space, id, kind, after).await?)
    }

    async fn frequency_usage(
        &self,
        _subject: &Found,
        rule: &Rule,
        limit: &FrequencyLimit,
        now: DateTime<Utc>,
    ) -> Result<FrequencyUsage, LookupError> {
        // By the message's customer id, as the body fence counts (`deliver::gate`).
        let (store, claim) = (&self.context.store, self.claim);
        let rules = &self.playbook.rules;
        let exempt = rules.ignoring_frequency_limit();
        let since = now - limit.per;
        let counted = store
            .counted_sends(&claim.customer_id, since, &exempt, claim.id)
            .await?;
        let in_flight = store
            .in_flight_sends(&claim.customer_id, since, &exempt, claim.id)
            .await?;
        let outranking = rules.outranking(rule);
        let until = now + limit.per;
        let outranked_by = store
            .waiting_due(&claim.customer_id, &outranking, until, claim.id)
            .await?;
        Ok(FrequencyUsage {
            counted,
            in_flight,
            outranked_by,
        })
    }

    fn planned_for(&self) -> Option<DateTime<Utc>> {
        Some(self.claim.trigger_at)
    }
}

/// What a subject lookup finds: the customer and event, or why the message is skipped.
type Lookup = Result<(Customer, Option<Event>), String>;

/// Reads of touchpoint's own tables: from the batch's facts where they answer, else alone.
struct Reads<'a> {
    store: &'a SharedStore,
    batch: Option<&'a SendFacts>,
}

impl Reads<'_> {
    async fn customer(&self, id: &str) -> Result<Option<Customer>, StoreError> {
        match self.batch.and_then(|b| b.customer(id)) {
            Some(found) => Ok(found.cloned()),
            None => self.store.customer(id).await,
        }
    }

    async fn event(&self, id: &str) -> Result<Option<Event>, StoreError> {
        match self.batch.and_then(|b| b.event(id)) {
            Some(found) => Ok(found.cloned()),
            None => self.store.event(id).await,
        }
    }
}

/// The customer and event from touchpoint's own tables.
async fn own_subject(reads: &Reads<'_>, claim: &ClaimedMessage) -> Result<Lookup, LookupError> {
    let Some(customer) = reads.customer(&claim.customer_id).await? else {
        return Ok(Err("the customer no longer exists".into()));
    };
    let event = match &claim.event_id {
        Some(id) => match reads.event(id).await? {
            Some(event) => Some(event),
            None => return Ok(Err(format!("the triggering event {id:?} no longer exists"))),
        },
        None => None,
    };
    Ok(Ok((customer, event)))
}

/// The event from the source the message was planned from, and its customer from the source's
/// customers (or touchpoint's table when the source has none).
async fn source_subject(
    reads: &Reads<'_>,
    playbook: &Playbook,
    claim: &ClaimedMessage,
    planned_from: &SourceEvent,
) -> Result<Lookup, LookupError> {
    let source_name = &planned_from.source;
    let Some(source) = playbook.sources.source(source_name) else {
        return Ok(Err(format!(
            "the source {source_name:?} is no longer configured"
        )));
    };
    let query_name = &planned_from.query;
    let Some(query) = source.events.iter().find(|q| &q.name == query_name) else {
        return Ok(Err(format!(
            "the source {source_name:?} no longer has the query {query_name:?}"
        )));
    };
    let occurred_at = planned_from.occurred_at.unwrap_or(claim.trigger_at);
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
        reads.customer(&claim.customer_id).await?
    };
    let Some(customer) = customer else {
        return Ok(Err(format!(
            "the customer {:?} is no longer in the source {source_name:?}",
            claim.customer_id
        )));
    };
    Ok(Ok((customer, Some(event))))
}
