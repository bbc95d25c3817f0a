//! What both the CLI and the owner's web page show: the upcoming messages (`touchpoint plan`,
//! the page's Upcoming) and the log's columns (`touchpoint log --format csv`, the page's CSV
//! download). It sits below both, so neither depends on the other.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};

use crate::output::when;
use crate::plan::{PlanSettings, plan_rule};
use crate::playbook::Playbook;
use crate::rules::{HELD_BACK, QUIET_DATE, Rule, Trigger};
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
    forecast_limits(playbook, store, &mut rows, now).await?;
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
        let status = waiting_status(&entry);
        rows.push(PlannedRow {
            due_at: entry.next_attempt_at,
            rule: entry.rule,
            customer_id: entry.customer_id,
            email: entry.email.unwrap_or_default(),
            status,
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
    // Every next anniversary, also past `planner.horizon`: what the rules want, shown as not
    // yet planned (the planner makes it once it is within the horizon).
    let settings = &PlanSettings {
        horizon: None,
        ..settings.clone()
    };
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

/// A waiting message's state, and why it waits when the frequency limit or a quiet date held
/// it back (its due time is then when it may go).
fn waiting_status(entry: &LogEntry) -> String {
    match entry.reason.as_deref() {
        Some(reason) if reason.starts_with(HELD_BACK) || reason.starts_with(QUIET_DATE) => {
            format!("{}: {reason}", entry.state)
        }
        _ => entry.state.to_string(),
    }
}

/// Moves the rows the frequency limit will hold back to when it lets them go, and says so: per
/// customer, what went out within the longest limit's window and the rows before each one
/// count (the higher priority first among rows due at once). A forecast: the guard decides.
async fn forecast_limits(
    playbook: &Playbook,
    store: &SharedStore,
    rows: &mut [PlannedRow],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let rules = &playbook.rules;
    let Some(longest) = rules
        .rules
        .iter()
        .filter_map(Rule::limited)
        .map(|l| l.per)
        .max()
    else {
        return Ok(());
    };
    let exempt = rules.ignoring_frequency_limit();
    let priority = |row: &PlannedRow| playbook.rule(&row.rule).map_or(0, |r| r.priority);
    rows.sort_by_key(|row| (row.due_at, std::cmp::Reverse(priority(row))));
    let mut counted: HashMap<String, Vec<DateTime<Utc>>> = HashMap::new();
    for row in rows.iter_mut() {
        let Some(rule) = playbook.rule(&row.rule) else {
            continue;
        };
        if rule.ignore_frequency_limit {
            continue;
        }
        if !counted.contains_key(&row.customer_id) {
            let sent = store
                .counted_sends(&row.customer_id, now - longest, &exempt, 0)
                .await?;
            counted.insert(row.customer_id.clone(), sent);
        }
        let Some(sent) = counted.get_mut(&row.customer_id) else {
            continue;
        };
        if let Some(limit) = rule.limited() {
            let free = limit.next_allowed(sent, row.due_at);
            if free > row.due_at {
                row.status = format!(
                    "{}: {HELD_BACK} until {} (skipped if that is past its expiry)",
                    row.status,
                    when(Some(free))
                );
                row.due_at = free;
            }
        }
        sent.push(row.due_at);
    }
    Ok(())
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
