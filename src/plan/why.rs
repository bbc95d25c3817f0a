//! Why each rule does or does not message one customer (`touchpoint why`, the customer page),
//! with the facts read from touchpoint's database and the sources, answered by
//! [`rules::why::explain`]: the guard's own checks, so the answer is what would happen.

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;

use super::{PlanSettings, customer_timezone};
use crate::playbook::Playbook;
use crate::rules::why::{
    self, Circumstances, SeenEvent, SeenMessage, SeenSuppression, Standing, Why, Witnesses,
};
use crate::rules::{self, FrequencyLimit, FrequencyUsage, Rule, Trigger};
use crate::sources::SourceError;
use crate::store::{
    Customer, Event, LogEntry, LogFilter, MessageState, SharedStore, StoreError, SuppressionPeriod,
};

/// The rule's messages for the customer looked at, newest first, to find the latest.
const MESSAGES_LOOKED_AT: i64 = 100;

/// What the answer needs from the config.
#[derive(Debug, Clone)]
pub struct WhySettings {
    pub plan: PlanSettings,
    /// `delivery.max_attempts`.
    pub max_attempts: u32,
}

/// A read for the answer failed.
#[derive(Debug, thiserror::Error)]
pub enum WhyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("there is no rule {0:?} (see the rules directory)")]
    NoSuchRule(String),
}

/// For each rule (or only `only`), in the rules' order, why it does or does not message the
/// customer as of `now`. `Ok(None)`: there is no such customer.
pub async fn why_customer(
    store: &SharedStore,
    playbook: &Playbook,
    settings: &WhySettings,
    customer_id: &str,
    only: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Option<Vec<Why>>, WhyError> {
    let rules: Vec<&Rule> = match only {
        Some(name) => vec![
            playbook
                .rule(name)
                .ok_or_else(|| WhyError::NoSuchRule(name.to_string()))?,
        ],
        None => playbook.rules.rules.iter().collect(),
    };
    let Some(customer) = store.customer(customer_id).await? else {
        return Ok(None);
    };
    let tz = customer_timezone(&customer, settings.plan.default_timezone);
    let mut answers = Vec::with_capacity(rules.len());
    for rule in rules {
        answers.push(why_rule(store, playbook, settings, &customer, tz, rule, now).await?);
    }
    Ok(Some(answers))
}

async fn why_rule(
    store: &SharedStore,
    playbook: &Playbook,
    settings: &WhySettings,
    customer: &Customer,
    tz: Tz,
    rule: &Rule,
    now: DateTime<Utc>,
) -> Result<Why, WhyError> {
    let event = match &rule.trigger {
        Trigger::Event { kind, .. } | Trigger::Anniversary { kind, .. } => {
            store.latest_event(&customer.id, kind).await?
        }
        Trigger::Schedule { .. } => None,
    };
    let expire = rule
        .expire_after
        .unwrap_or(settings.plan.default_expire_after);
    let message = match latest_message(store, rule, customer, event.as_ref()).await? {
        Some(entry) => Some(seen_message(store, &entry, expire).await?),
        None => None,
    };
    let circumstances = Circumstances {
        event: event.as_ref().map(seen_event),
        message,
        tz,
        default_expire_after: settings.plan.default_expire_after,
        max_attempts: settings.max_attempts,
    };
    let facts = StoreFacts {
        store,
        playbook,
        customer,
        address: playbook.recipient(rule, &customer.email),
        event: event.as_ref(),
        tz,
        message: circumstances.message.as_ref().map(|m| (m.id, m.trigger_at)),
    };
    why::explain(rule, &circumstances, &facts, now).await
}

/// The rule's latest message (by due time) for the customer; for a rule with a triggering
/// event, for that event.
async fn latest_message(
    store: &SharedStore,
    rule: &Rule,
    customer: &Customer,
    event: Option<&Event>,
) -> Result<Option<LogEntry>, StoreError> {
    let entries = store
        .log(&LogFilter {
            customer_id: Some(customer.id.clone()),
            rule: Some(rule.name.clone()),
            limit: Some(MESSAGES_LOOKED_AT),
            ..LogFilter::default()
        })
        .await?;
    Ok(entries
        .into_iter()
        .filter(|m| m.customer_id == customer.id)
        .filter(|m| event.is_none_or(|e| m.event_id.as_deref() == Some(e.id.as_str())))
        .max_by_key(|m| (m.due_at, m.id)))
}

fn seen_event(event: &Event) -> SeenEvent {
    SeenEvent {
        id: event.id.clone(),
        kind: event.kind.clone(),
        at: event.occurred_at,
    }
}

/// A message as the answer sees it. Its expiry is the planner's (`due_at` plus the rule's
/// `expire_after`), which the log does not carry.
async fn seen_message(
    store: &SharedStore,
    entry: &LogEntry,
    expire: TimeDelta,
) -> Result<SeenMessage, StoreError> {
    let standing = match entry.state {
        MessageState::Sent => Standing::Sent,
        state if state.is_final() => Standing::Ended,
        _ => Standing::Waiting,
    };
    let stopped_by = match standing {
        Standing::Ended => store
            .sent_content(entry.id)
            .await?
            .and_then(|kept| kept.checks.into_iter().find(|c| c.verdict == "failed"))
            .map(|line| line.text),
        _ => None,
    };
    Ok(SeenMessage {
        id: entry.id,
        standing,
        state: entry.state.as_str().to_string(),
        trigger_at: entry.trigger_at,
        next_attempt_at: entry.next_attempt_at,
        expires_at: entry.due_at.checked_add_signed(expire),
        sent_at: entry.sent_at,
        attempts: entry.attempts,
        reason: entry.reason.clone(),
        stopped_by,
    })
}

fn seen_suppression(period: SuppressionPeriod) -> SeenSuppression {
    SeenSuppression {
        since: period.since,
        until: period.until,
        reason: period.reason,
        source: period.source,
    }
}

/// A customer and the triggering event (if the rule has one) as just read: what the checks
/// look at, for the guard (a message's) and for `why` (the latest event's).
#[derive(Debug, Clone)]
pub struct Found {
    pub customer: Customer,
    pub event: Option<Event>,
    /// The customer's effective time zone.
    pub tz: Tz,
}

impl rules::Subject for Found {
    fn customer_id(&self) -> &str {
        &self.customer.id
    }

    fn attributes(&self) -> &serde_json::Value {
        &self.customer.attributes
    }

    fn event(&self) -> Option<(&str, &str, DateTime<Utc>)> {
        self.event
            .as_ref()
            .map(|e| (e.kind.as_str(), e.id.as_str(), e.occurred_at))
    }

    fn timezone(&self) -> Tz {
        self.tz
    }

    fn event_data(&self) -> Option<&serde_json::Value> {
        self.event.as_ref().map(|e| &e.data)
    }
}

/// What the checks read: touchpoint's database, and the sources for `unless` events.
struct StoreFacts<'a> {
    store: &'a SharedStore,
    playbook: &'a Playbook,
    customer: &'a Customer,
    /// Where the rule's message goes: the customer, or the owner (`to = "owner"`), whose
    /// address is the one the suppression checks look at, as the guard does.
    address: &'a str,
    event: Option<&'a Event>,
    tz: Tz,
    /// The customer's message of this rule, if there is one: its id and when it was planned.
    message: Option<(i64, DateTime<Utc>)>,
}

#[async_trait]
impl rules::Facts for StoreFacts<'_> {
    type Subject = Found;
    type Error = WhyError;

    async fn subject(&self) -> Result<Result<Found, String>, WhyError> {
        Ok(Ok(Found {
            customer: self.customer.clone(),
            event: self.event.cloned(),
            tz: self.tz,
        }))
    }

    async fn is_suppressed(&self, _subject: &Found) -> Result<bool, WhyError> {
        Ok(self.store.is_suppressed(self.address).await?)
    }

    async fn was_suppressed_at(
        &self,
        _subject: &Found,
        at: DateTime<Utc>,
    ) -> Result<bool, WhyError> {
        let found = self.store.suppressed_at(self.address, Some(at)).await?;
        Ok(found.is_some())
    }

    async fn had_event_after(
        &self,
        subject: &Found,
        kind: &str,
        after: DateTime<Utc>,
    ) -> Result<bool, WhyError> {
        let id = &subject.customer.id;
        if self.store.has_event_after(id, kind, after).await? {
            return Ok(true);
        }
        let sources = &self.playbook.sources;
        Ok(sources.has_event_after(None, id, kind, after).await?)
    }

    /// What the guard counts (`dispatch::guard`), other than this rule's own message.
    async fn frequency_usage(
        &self,
        subject: &Found,
        rule: &Rule,
        limit: &FrequencyLimit,
        now: DateTime<Utc>,
    ) -> Result<FrequencyUsage, WhyError> {
        let rules = &self.playbook.rules;
        let exempt = rules.ignoring_frequency_limit();
        // Message ids start at 1: 0 leaves none out.
        let except = self.message.map_or(0, |(id, _)| id);
        let customer = &subject.customer.id;
        let since = now - limit.per;
        let counted = self
            .store
            .counted_sends(customer, since, &exempt, except)
            .await?;
        let in_flight = self
            .store
            .in_flight_sends(customer, since, &exempt, except)
            .await?;
        let outranking = rules.outranking(rule);
        let outranked_by = self
            .store
            .waiting_due(customer, &outranking, now + limit.per, except)
            .await?;
        Ok(FrequencyUsage {
            counted,
            in_flight,
            outranked_by,
        })
    }

    fn planned_for(&self) -> Option<DateTime<Utc>> {
        self.message.map(|(_, trigger_at)| trigger_at)
    }
}

#[async_trait]
impl Witnesses for StoreFacts<'_> {
    async fn event_after(
        &self,
        kind: &str,
        after: DateTime<Utc>,
    ) -> Result<Option<SeenEvent>, WhyError> {
        let event = self
            .store
            .first_event_after(&self.customer.id, kind, after)
            .await?;
        Ok(event.as_ref().map(seen_event))
    }

    async fn suppression_at(
        &self,
        at: Option<DateTime<Utc>>,
    ) -> Result<Option<SeenSuppression>, WhyError> {
        let period = self.store.suppressed_at(self.address, at).await?;
        Ok(period.map(seen_suppression))
    }
}
