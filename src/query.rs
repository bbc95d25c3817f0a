//! What both the CLI and the owner's web page show: the upcoming messages (`touchpoint plan`,
//! the page's Upcoming) and the log's columns (`touchpoint log --format csv`, the page's CSV
//! download). It sits below both, so neither depends on the other.

use chrono::{DateTime, TimeDelta, Utc};

use crate::output::when;
use crate::plan::{PlanSettings, plan_rule};
use crate::playbook::Playbook;
use crate::rules::Trigger;
use crate::store::{Event, LogEntry, LogFilter, SharedStore, StoreError};

/// What `plan` lists (and the web page's Upcoming): the messages due within `days` days, those
/// already scheduled and those the rules would create now, soonest first.
pub async fn upcoming(
    playbook: &Playbook,
    settings: &PlanSettings,
    store: &SharedStore,
    days: u32,
) -> Result<Upcoming, StoreError> {
    let now = Utc::now();
    let until = now + TimeDelta::days(i64::from(days));
    let mut rows = scheduled_rows(store, until).await?;
    rows.extend(rule_rows(playbook, settings, store, now, until).await?);
    let from_sources = crate::plan::plan_sources(
        store,
        &playbook.sources,
        playbook,
        &crate::plan::SourceCursors::new(),
        now,
        settings,
        false,
    )
    .await;
    for planned in from_sources.planned {
        let message = planned.message;
        if message.due_at > until {
            continue;
        }
        rows.push(PlannedRow {
            due_at: message.due_at,
            rule: message.rule,
            customer_id: message.customer_id,
            email: planned.customer.email,
            status: "not yet planned".into(),
            why: why_event(&planned.event),
            event: Some(planned.event),
            message_id: None,
        });
    }
    rows.sort_by(|a, b| {
        (a.due_at, &a.rule, &a.customer_id).cmp(&(b.due_at, &b.rule, &b.customer_id))
    });
    Ok(Upcoming {
        rows,
        unreadable: from_sources.failures,
    })
}

/// The messages already in the database that wait and are due before `until`.
async fn scheduled_rows(
    store: &SharedStore,
    until: DateTime<Utc>,
) -> Result<Vec<PlannedRow>, StoreError> {
    let waiting = store
        .log(&LogFilter {
            due_before: Some(until),
            ..LogFilter::default()
        })
        .await?;
    let mut rows = Vec::with_capacity(waiting.len());
    for entry in waiting {
        let event = match &entry.event_id {
            Some(id) => store.event(id).await?,
            None => None,
        };
        let why = match (&event, &entry.event_id) {
            (Some(event), _) => why_event(event),
            (None, Some(id)) => format!("event {id}"),
            (None, None) => "schedule".into(),
        };
        rows.push(PlannedRow {
            due_at: entry.next_attempt_at,
            rule: entry.rule,
            customer_id: entry.customer_id,
            email: entry.email.unwrap_or_default(),
            status: entry.state.to_string(),
            why,
            event,
            message_id: Some(entry.id),
        });
    }
    Ok(rows)
}

/// The messages the enabled rules would create now (over the database's customers and events),
/// due before `until`; nothing is written.
async fn rule_rows(
    playbook: &Playbook,
    settings: &PlanSettings,
    store: &SharedStore,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<PlannedRow>, StoreError> {
    let (customers_hi, events_hi) = store.max_seqs().await?;
    let mut rows = Vec::new();
    for rule in playbook.rules.rules.iter().filter(|r| r.enabled) {
        let up_to = if matches!(rule.trigger, Trigger::Schedule { .. }) {
            customers_hi
        } else {
            events_hi
        };
        let mut found = Vec::new();
        plan_rule(
            store,
            rule,
            0,
            up_to,
            now,
            settings,
            false,
            |planned, candidates| {
                for message in planned.iter().filter(|m| m.due_at <= until).cloned() {
                    let candidate = candidates
                        .iter()
                        .find(|c| c.customer.id == message.customer_id);
                    let email = candidate
                        .map(|c| c.customer.email.clone())
                        .unwrap_or_default();
                    let event = candidate.and_then(|c| {
                        c.event
                            .as_ref()
                            .filter(|e| Some(&e.id) == message.event_id.as_ref())
                    });
                    let why = event.map_or_else(|| "schedule".to_string(), why_event);
                    found.push(PlannedRow {
                        due_at: message.due_at,
                        rule: message.rule,
                        customer_id: message.customer_id,
                        email,
                        status: "not yet planned".into(),
                        why,
                        event: event.cloned(),
                        message_id: None,
                    });
                }
            },
        )
        .await?;
        rows.extend(found);
    }
    Ok(rows)
}

/// What `upcoming` found, and the sources it could not read (their messages are missing).
#[derive(Debug)]
pub struct Upcoming {
    pub rows: Vec<PlannedRow>,
    pub unreadable: Vec<String>,
}

/// One message `plan` expects to go out.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedRow {
    pub due_at: DateTime<Utc>,
    pub rule: String,
    pub customer_id: String,
    pub email: String,
    /// The message's state, or "not yet planned".
    pub status: String,
    /// The triggering event ("purchase p1 at ...", times in UTC) or "schedule".
    pub why: String,
    /// The triggering event itself, for a view that shows its time in another zone.
    #[serde(skip)]
    pub event: Option<Event>,
    pub message_id: Option<i64>,
}

/// "purchase p1 at 2026-11-23 09:00:00Z"; a plain date as the date ("wedding w1 on
/// 2019-11-12").
fn why_event(event: &Event) -> String {
    match crate::calendar::plain_date(event.occurred_at) {
        Some(date) => format!("{} {} on {date}", event.kind, event.id),
        None => format!(
            "{} {} at {}",
            event.kind,
            event.id,
            when(Some(event.occurred_at))
        ),
    }
}

/// One per value of [`log_row`], in the same order.
pub const LOG_HEADERS: [&str; 22] = [
    "id",
    "rule",
    "customer_id",
    "email",
    "subject",
    "state",
    "due_at",
    "sent_at",
    "attempts",
    "smtp_reply",
    "message_id",
    "reason",
    "event_id",
    "updated_at",
    "opened_at",
    "opens",
    "clicked_at",
    "clicks",
    "bounced_at",
    "complained_at",
    "unsubscribed_at",
    "when",
];

/// One message as the log's columns ([`LOG_HEADERS`]), times in UTC; `when` is the time the
/// log dates it by ([`LogEntry::dated_at`]: sent, failed or skipped at, or due at).
pub fn log_row(e: &LogEntry) -> [String; LOG_HEADERS.len()] {
    [
        e.id.to_string(),
        e.rule.clone(),
        e.customer_id.clone(),
        e.email.clone().unwrap_or_default(),
        e.subject.clone().unwrap_or_default(),
        e.state.to_string(),
        when(Some(e.due_at)),
        when(e.sent_at),
        e.attempts.to_string(),
        e.smtp_reply.clone().unwrap_or_default(),
        e.message_id.clone().unwrap_or_default(),
        e.reason.clone().unwrap_or_default(),
        e.event_id.clone().unwrap_or_default(),
        when(Some(e.updated_at)),
        when(e.opened_at),
        e.opens.to_string(),
        when(e.clicked_at),
        e.clicks.to_string(),
        when(e.bounced_at),
        when(e.complained_at),
        when(e.unsubscribed_at),
        when(Some(e.dated_at())),
    ]
}

/// What the recipient did, in a few words for the table: `opened 2x, clicked, unsubscribed`.
pub fn activity(e: &LogEntry) -> String {
    let times = |n: i64| {
        if n > 1 {
            format!(" {n}x")
        } else {
            String::new()
        }
    };
    let mut parts = Vec::new();
    if e.opens > 0 {
        parts.push(format!("opened{}", times(e.opens)));
    }
    if e.clicks > 0 {
        parts.push(format!("clicked{}", times(e.clicks)));
    }
    for (at, what) in [
        (e.bounced_at, "bounced"),
        (e.complained_at, "complained"),
        (e.unsubscribed_at, "unsubscribed"),
    ] {
        if at.is_some() {
            parts.push(what.to_string());
        }
    }
    parts.join(", ")
}
