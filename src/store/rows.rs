//! Row shapes shared by both backends: every column type here decodes from SQLite's TEXT/INTEGER
//! and from PostgreSQL's timestamptz/jsonb/bigint alike.

use chrono::{DateTime, Utc};
use sqlx::types::Json;

use super::{
    Candidate, CheckLine, ClaimedMessage, Customer, CustomerMessageEvent, Event, LogEntry,
    MessageEvent, MessageState, SentContent, Suppression, SuppressionPeriod,
};

#[derive(sqlx::FromRow)]
pub(super) struct CustomerRow {
    id: String,
    email: String,
    name: Option<String>,
    timezone: Option<String>,
    attributes: Json<serde_json::Value>,
}

impl From<CustomerRow> for Customer {
    fn from(row: CustomerRow) -> Self {
        Customer {
            id: row.id,
            email: row.email,
            name: row.name,
            timezone: row.timezone,
            attributes: row.attributes.0,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct EventRow {
    id: String,
    customer_id: String,
    kind: String,
    occurred_at: DateTime<Utc>,
    data: Json<serde_json::Value>,
}

impl From<EventRow> for Event {
    fn from(row: EventRow) -> Self {
        Event {
            id: row.id,
            customer_id: row.customer_id,
            kind: row.kind,
            occurred_at: row.occurred_at,
            data: row.data.0,
        }
    }
}

/// A customer, optionally one of their events, and the rule's latest planned occurrence.
#[derive(sqlx::FromRow)]
pub(super) struct CandidateRow {
    seq: i64,
    customer_id: String,
    email: String,
    name: Option<String>,
    timezone: Option<String>,
    attributes: Json<serde_json::Value>,
    event_id: Option<String>,
    kind: Option<String>,
    occurred_at: Option<DateTime<Utc>>,
    data: Option<Json<serde_json::Value>>,
    last_trigger: Option<DateTime<Utc>>,
}

impl From<CandidateRow> for Candidate {
    fn from(row: CandidateRow) -> Self {
        let event = match (row.event_id, row.kind, row.occurred_at) {
            (Some(id), Some(kind), Some(occurred_at)) => Some(Event {
                id,
                customer_id: row.customer_id.clone(),
                kind,
                occurred_at,
                data: row.data.map_or(serde_json::Value::Null, |d| d.0),
            }),
            _ => None,
        };
        Candidate {
            seq: row.seq,
            customer: Customer {
                id: row.customer_id,
                email: row.email,
                name: row.name,
                timezone: row.timezone,
                attributes: row.attributes.0,
            },
            event,
            last_trigger: row.last_trigger,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct ClaimRow {
    id: i64,
    rule: String,
    customer_id: String,
    event_id: Option<String>,
    trigger_at: DateTime<Utc>,
    due_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    attempts: i32,
    detail: Json<serde_json::Value>,
}

impl ClaimRow {
    pub(super) fn into_claim(self, token: &str) -> ClaimedMessage {
        ClaimedMessage {
            id: self.id,
            token: token.to_string(),
            rule: self.rule,
            customer_id: self.customer_id,
            event_id: self.event_id,
            trigger_at: self.trigger_at,
            due_at: self.due_at,
            expires_at: self.expires_at,
            attempts: self.attempts,
            detail: self.detail.0,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct LogRow {
    id: i64,
    rule: String,
    customer_id: String,
    email: Option<String>,
    subject: Option<String>,
    state: String,
    event_id: Option<String>,
    trigger_at: DateTime<Utc>,
    due_at: DateTime<Utc>,
    next_attempt_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
    attempts: i32,
    smtp_reply: Option<String>,
    message_id: Option<String>,
    reason: Option<String>,
    updated_at: DateTime<Utc>,
    opened_at: Option<DateTime<Utc>>,
    opens: i64,
    clicked_at: Option<DateTime<Utc>>,
    clicks: i64,
    bounced_at: Option<DateTime<Utc>>,
    complained_at: Option<DateTime<Utc>>,
    unsubscribed_at: Option<DateTime<Utc>>,
}

impl From<LogRow> for LogEntry {
    fn from(row: LogRow) -> Self {
        LogEntry {
            id: row.id,
            rule: row.rule,
            customer_id: row.customer_id,
            email: row.email,
            subject: row.subject,
            // The column's CHECK constraint admits only known states.
            state: row.state.parse().unwrap_or(MessageState::Unknown),
            event_id: row.event_id,
            trigger_at: row.trigger_at,
            due_at: row.due_at,
            next_attempt_at: row.next_attempt_at,
            sent_at: row.sent_at,
            attempts: row.attempts,
            smtp_reply: row.smtp_reply,
            message_id: row.message_id,
            reason: row.reason,
            updated_at: row.updated_at,
            opened_at: row.opened_at,
            opens: row.opens,
            clicked_at: row.clicked_at,
            clicks: row.clicks,
            bounced_at: row.bounced_at,
            complained_at: row.complained_at,
            unsubscribed_at: row.unsubscribed_at,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct MessageEventRow {
    kind: String,
    at: DateTime<Utc>,
    attempt: Option<i32>,
    smtp_reply: Option<String>,
    detail: Json<serde_json::Value>,
    count: i64,
}

impl From<MessageEventRow> for MessageEvent {
    fn from(row: MessageEventRow) -> Self {
        MessageEvent {
            kind: row.kind,
            at: row.at,
            attempt: row.attempt,
            smtp_reply: row.smtp_reply,
            detail: row.detail.0,
            count: row.count,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct CustomerMessageEventRow {
    message_id: i64,
    rule: String,
    kind: String,
    at: DateTime<Utc>,
    attempt: Option<i32>,
    smtp_reply: Option<String>,
    detail: Json<serde_json::Value>,
    count: i64,
}

impl From<CustomerMessageEventRow> for CustomerMessageEvent {
    fn from(row: CustomerMessageEventRow) -> Self {
        CustomerMessageEvent {
            message: row.message_id,
            rule: row.rule,
            event: MessageEvent {
                kind: row.kind,
                at: row.at,
                attempt: row.attempt,
                smtp_reply: row.smtp_reply,
                detail: row.detail.0,
                count: row.count,
            },
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct SentContentRow {
    body_text: Option<String>,
    body_html: Option<String>,
    checks: Option<Json<Vec<CheckLine>>>,
}

impl SentContentRow {
    /// `None` when nothing was kept for the message.
    pub(super) fn into_content(self) -> Option<SentContent> {
        if self.body_text.is_none() && self.body_html.is_none() && self.checks.is_none() {
            return None;
        }
        Some(SentContent {
            text: self.body_text.unwrap_or_default(),
            html: self.body_html.unwrap_or_default(),
            checks: self.checks.map(|c| c.0).unwrap_or_default(),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct SuppressionRow {
    email: String,
    reason: String,
    source: String,
    created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(super) struct SuppressionPeriodRow {
    email: String,
    reason: String,
    source: String,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
}

impl From<SuppressionPeriodRow> for SuppressionPeriod {
    fn from(row: SuppressionPeriodRow) -> Self {
        SuppressionPeriod {
            email: row.email,
            reason: row.reason,
            source: row.source,
            since: row.since,
            until: row.until,
        }
    }
}

impl From<SuppressionRow> for Suppression {
    fn from(row: SuppressionRow) -> Self {
        Suppression {
            email: row.email,
            reason: row.reason,
            source: row.source,
            created_at: row.created_at,
        }
    }
}

/// The columns of a log row, for both backends' SELECTs (messages `m`, customers `c`).
pub(super) const LOG_COLUMNS: &str = "m.id, m.rule, m.customer_id, COALESCE(m.email, c.email) AS email, m.subject, \
     m.state, m.event_id, m.trigger_at, m.due_at, m.next_attempt_at, m.sent_at, m.attempts, m.smtp_reply, \
     m.message_id, m.reason, m.updated_at, \
     (SELECT MIN(e.at) FROM message_events e WHERE e.message_id = m.id AND e.kind = 'opened') AS opened_at, \
     (SELECT CAST(COALESCE(SUM(e.count), 0) AS BIGINT) FROM message_events e WHERE e.message_id = m.id AND e.kind = 'opened') AS opens, \
     (SELECT MIN(e.at) FROM message_events e WHERE e.message_id = m.id AND e.kind = 'clicked') AS clicked_at, \
     (SELECT CAST(COALESCE(SUM(e.count), 0) AS BIGINT) FROM message_events e WHERE e.message_id = m.id AND e.kind = 'clicked') AS clicks, \
     (SELECT MIN(e.at) FROM message_events e WHERE e.message_id = m.id AND e.kind IN ('bounced', 'soft_bounced')) AS bounced_at, \
     (SELECT MIN(e.at) FROM message_events e WHERE e.message_id = m.id AND e.kind = 'complained') AS complained_at, \
     (SELECT MIN(e.at) FROM message_events e WHERE e.message_id = m.id AND e.kind = 'unsubscribed') AS unsubscribed_at";

/// The columns a claim returns.
pub(super) const CLAIM_COLUMNS: &str =
    "id, rule, customer_id, event_id, trigger_at, due_at, expires_at, attempts, detail";

/// The message_events kind and detail for an outcome.
pub(super) fn outcome_event(
    outcome: &super::Outcome,
) -> (&'static str, Option<&str>, serde_json::Value) {
    use super::Outcome::*;
    match outcome {
        Sent { reply } => ("sent", Some(reply.as_str()), serde_json::json!({})),
        Retry { at, reply } => (
            "retrying",
            Some(reply.as_str()),
            serde_json::json!({ "next_attempt_at": at }),
        ),
        Failed { reply, reason } => (
            "failed",
            reply.as_deref(),
            serde_json::json!({ "reason": reason }),
        ),
        Skipped { reason } => ("skipped", None, serde_json::json!({ "reason": reason })),
        Unknown { reason } => ("unknown", None, serde_json::json!({ "reason": reason })),
        Released { at, reason } => (
            "released",
            None,
            serde_json::json!({ "reason": reason, "next_attempt_at": at }),
        ),
    }
}

/// The columns an outcome sets: (state, next_attempt_at, smtp_reply, reason, sent, uncount).
pub(super) struct OutcomeColumns<'a> {
    pub state: &'static str,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub smtp_reply: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub sent: bool,
    /// 1 when the attempt does not count (released), else 0.
    pub uncount: i32,
}

pub(super) fn outcome_columns(outcome: &super::Outcome) -> OutcomeColumns<'_> {
    use super::Outcome::*;
    let state = outcome.state().as_str();
    let base = OutcomeColumns {
        state,
        next_attempt_at: None,
        smtp_reply: None,
        reason: None,
        sent: false,
        uncount: 0,
    };
    match outcome {
        Sent { reply } => OutcomeColumns {
            smtp_reply: Some(reply),
            sent: true,
            ..base
        },
        Retry { at, reply } => OutcomeColumns {
            next_attempt_at: Some(*at),
            smtp_reply: Some(reply),
            ..base
        },
        Failed { reply, reason } => OutcomeColumns {
            smtp_reply: reply.as_deref(),
            reason: Some(reason),
            ..base
        },
        Skipped { reason } | Unknown { reason } => OutcomeColumns {
            reason: Some(reason),
            ..base
        },
        Released { at, reason } => OutcomeColumns {
            next_attempt_at: Some(*at),
            reason: Some(reason),
            uncount: 1,
            ..base
        },
    }
}
