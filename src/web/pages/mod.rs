//! The pages, one per file: each handler reads what it shows from the store and hands it to its
//! template. What several pages share (error pages, a message's row, names, dates) is here.

mod answers;
mod customer;
mod experience;
mod log;
mod login;
mod message;
mod overview;
mod preview;
mod suppressions;
mod upcoming;

use std::collections::{BTreeSet, HashMap};

use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Value, json};

use super::{Owner, Web, encode_query, problem};
use crate::store::{LogEntry, MessageState, StoreError};
use crate::web::Shared;

pub use customer::customer;
pub use experience::experience_page;
pub use log::{log, log_csv};
pub use login::{login, login_page, logout};
pub use message::{message, message_html};
pub use overview::overview;
pub use suppressions::{suppress, suppressions, unsuppress};
pub use upcoming::upcoming;

pub(super) fn unavailable(web: &Web, error: &StoreError) -> Response {
    tracing::warn!(%error, "web page: database error");
    problem(
        web,
        StatusCode::SERVICE_UNAVAILABLE,
        "The database did not answer",
        "touchpoint cannot read its database right now. Try again in a minute; if it persists, look at the daemon's log.",
    )
}

fn not_found(owner: &Owner, what: &str) -> Response {
    owner.with_cookie(problem(
        &owner.web,
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("There is no {what} with that id."),
    ))
}

/// A form whose CSRF token is missing or wrong changes nothing.
fn csrf_failed(owner: &Owner) -> Response {
    owner.with_cookie(problem(
        &owner.web,
        StatusCode::FORBIDDEN,
        "Nothing was changed",
        "The form was too old or did not come from this page. Go back, reload the page and try again.",
    ))
}

/// Start of the local day `days_back` days before today, in the page's time zone.
fn day_start(web: &Web, date: NaiveDate) -> DateTime<Utc> {
    crate::calendar::resolve_local(date.and_time(chrono::NaiveTime::MIN), web.timezone)
}

fn today(web: &Web, now: DateTime<Utc>) -> NaiveDate {
    now.with_timezone(&web.timezone).date_naive()
}

fn state_class(state: MessageState) -> &'static str {
    state.as_str()
}

fn plural(n: i64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `a=1&b=2`, values percent-encoded, empty values left out.
fn query_string(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| format!("{k}={}", encode_query(v.trim())))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes a path segment.
/// The customer's page; none for a message about no customer (the owner's digest).
fn customer_link(customer_id: &str) -> Option<String> {
    (!customer_id.is_empty()).then(|| format!("/customers/{}", encode_path(customer_id)))
}

fn encode_path(segment: &str) -> String {
    encode_query(segment)
}

/// Names of customers, for showing with their messages.
async fn customer_names(shared: &Shared, entries: &[LogEntry]) -> HashMap<String, String> {
    let ids: BTreeSet<&str> = entries.iter().map(|e| e.customer_id.as_str()).collect();
    let mut names = HashMap::new();
    for id in ids {
        if let Ok(Some(customer)) = shared.store.customer(id).await
            && let Some(name) = customer.name.filter(|n| !n.trim().is_empty())
        {
            names.insert(id.to_string(), name);
        }
    }
    names
}

/// How the log dates its messages, in words for the page (one definition everywhere: see
/// [`LogEntry::dated_at`]): for messages in `state`, or for any.
fn dating(state: Option<MessageState>) -> &'static str {
    match state {
        Some(MessageState::Sent) => "Dated by when they were sent",
        Some(MessageState::Failed) => "Dated by when they failed",
        Some(MessageState::Skipped) => "Dated by when they were skipped",
        Some(MessageState::Unknown) => "Dated by when their delivery became uncertain",
        Some(MessageState::Scheduled | MessageState::Retrying) => "Dated by when they are due",
        Some(MessageState::Sending) | None => {
            "Dated by what happened when: sent, failed or skipped at (due at, for what still waits)"
        }
    }
}

/// One message as a row of the log's table (also on the message and customer pages), dated
/// as the log dates it.
fn entry_row(web: &Web, entry: &LogEntry, names: &HashMap<String, String>) -> Value {
    let when = entry.dated_at();
    let when_label = match entry.sent_at {
        Some(_) => "sent",
        None if entry.state.is_final() => entry.state.as_str(),
        None => "due",
    };
    json!({
        "id": entry.id,
        "link": format!("/messages/{}", entry.id),
        "when": web.time(when),
        "when_label": when_label,
        "state": entry.state.as_str(),
        "state_class": state_class(entry.state),
        "rule": entry.rule,
        "customer_id": entry.customer_id,
        "customer_link": customer_link(&entry.customer_id),
        // The owner's digest is about no customer.
        "name": if entry.rule == crate::digest::RULE {
            Some("the owner's digest")
        } else {
            names.get(&entry.customer_id).map(String::as_str)
        },
        "email": entry.email.clone().unwrap_or_default(),
        "subject": entry.subject.clone().unwrap_or_default(),
        "opened": entry.opens > 0,
        "clicked": entry.clicks > 0,
        "reason": entry.reason.as_deref().map(preview::owner_reason).unwrap_or_default(),
    })
}

/// A JSON object as key/value lines for a template.
fn detail_pairs(detail: &Value) -> Vec<Value> {
    match detail {
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| {
                let text = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                json!({ "key": key, "value": text })
            })
            .collect(),
        Value::Null => Vec::new(),
        other => vec![json!({ "key": "", "value": other.to_string() })],
    }
}

/// [`detail_pairs`] for the owner: times in them (RFC 3339 text, such as a retry's
/// `next_attempt_at`) in the page's zone, plain dates as dates, no config key names.
fn timed_pairs(web: &Web, detail: &Value) -> Vec<Value> {
    let mut pairs = detail_pairs(detail);
    for pair in &mut pairs {
        let Some(text) = pair["value"].as_str() else {
            continue;
        };
        let shown = match DateTime::parse_from_rfc3339(text) {
            Ok(t) => web.event_time(t.with_timezone(&Utc)),
            Err(_) => preview::owner_reason(text),
        };
        pair["value"] = json!(shown);
    }
    pairs
}

/// A CSS class for a history line.
fn kind_class(kind: &str) -> &'static str {
    match kind {
        "sent" | "opened" | "clicked" => "good",
        "failed" | "unknown" | "bounced" | "complained" => "bad",
        "retrying" | "soft_bounced" | "unsubscribed" => "warn",
        _ => "plain",
    }
}
