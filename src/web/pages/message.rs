//! `/messages/{id}`: one message as it was sent, its history, and why it was sent;
//! `/messages/{id}/body.html`: its HTML body for the page's sandboxed frame.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{customer_names, entry_row, kind_class, not_found, preview, timed_pairs, unavailable};
use crate::rules::{MessageDetail, Rule};
use crate::store::{
    CheckLine, Customer, Event, LogEntry, MessageEvent, SentContent, SharedStore, StoreError,
};
use crate::web::Shared;
use crate::web::{Owner, Web, why};

/// What the message page reads from the database.
struct Loaded {
    entry: LogEntry,
    history: Vec<MessageEvent>,
    content: Option<SentContent>,
    customer: Option<Customer>,
    event: Option<Event>,
    detail: MessageDetail,
}

impl Loaded {
    /// `None` when there is no such message.
    async fn read(store: &SharedStore, id: i64) -> Result<Option<Loaded>, StoreError> {
        let Some(entry) = store.message(id).await? else {
            return Ok(None);
        };
        let history = store.message_events(id).await?;
        let content = store.sent_content(id).await?;
        let customer = store.customer(&entry.customer_id).await?;
        let event = match &entry.event_id {
            Some(event) => store.event(event).await?,
            None => None,
        };
        let detail = store.message_detail(id).await?;
        Ok(Some(Loaded {
            entry,
            history,
            content,
            customer,
            event,
            detail: detail
                .map(|d| MessageDetail::from_json(&d))
                .unwrap_or_default(),
        }))
    }
}

fn history_row(web: &Web, event: &MessageEvent) -> Value {
    json!({
        "at": web.time(event.at),
        "kind": event.kind,
        "kind_class": kind_class(&event.kind),
        "attempt": event.attempt,
        "smtp_reply": event.smtp_reply,
        "detail": timed_pairs(web, &event.detail),
    })
}

/// One line per link, counting every click on it.
fn clicks(web: &Web, history: &[MessageEvent]) -> Vec<Value> {
    history
        .iter()
        .filter(|e| e.kind == "clicked")
        .map(|e| {
            json!({
                "at": web.time(e.at),
                "url": e.detail.get("url").and_then(Value::as_str).unwrap_or_default(),
                "times": (e.count > 1).then(|| format!("{} times", e.count)),
            })
        })
        .collect()
}

pub async fn message(
    owner: Owner,
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return not_found(&owner, "message");
    };
    let loaded = match Loaded::read(&shared.store, id).await {
        Ok(Some(loaded)) => loaded,
        Ok(None) => return not_found(&owner, "message"),
        Err(error) => return owner.with_cookie(unavailable(&owner.web, &error)),
    };
    let playbook = shared.playbook.borrow().clone();
    let rule = playbook.rule(&loaded.entry.rule);
    let names = customer_names(&shared, std::slice::from_ref(&loaded.entry)).await;
    let mut data = page_data(&owner.web, id, &loaded, rule);
    data["page"] = owner.page(&format!("Message {id}"), "log");
    data["m"] = entry_row(&owner.web, &loaded.entry, &names);
    let entry = &loaded.entry;
    // What was kept from an attempt is shown as it was; otherwise a preview.
    if loaded.content.is_none() {
        data["preview"] = json!(preview::preview(
            &owner.web,
            &playbook,
            entry,
            loaded.customer.as_ref(),
            loaded.event.as_ref(),
            &loaded.detail,
        ));
    }
    let email = entry.email.as_deref().unwrap_or_default();
    let suppressed = !email.is_empty() && shared.store.is_suppressed(email).await.unwrap_or(false);
    data["next_steps"] = json!(preview::next_steps(entry, suppressed));
    data["reason"] = json!(entry.reason.as_deref().map(preview::owner_reason));
    owner.render("message", &data)
}

/// The page's data but for the layout and the message's row.
fn page_data(web: &Web, id: i64, loaded: &Loaded, rule: Option<&Rule>) -> Value {
    let Loaded {
        entry,
        history,
        content,
        customer,
        event,
        detail,
    } = loaded;
    let (checks, conditions) = checks_and_conditions(content.as_ref(), rule);
    json!({
        "message_id": entry.message_id,
        "due": web.time(entry.due_at),
        "trigger_at": web.time(entry.trigger_at),
        "next_attempt": if entry.state.is_final() { None } else { Some(web.time(entry.next_attempt_at)) },
        "sent_at": entry.sent_at.map(|t| web.time(t)),
        "attempts": entry.attempts,
        "smtp_reply": entry.smtp_reply,
        "reason": entry.reason,
        "opens": entry.opens,
        "opened_at": entry.opened_at.map(|t| web.time(t)),
        "clicks_count": entry.clicks,
        "clicked_at": entry.clicked_at.map(|t| web.time(t)),
        "clicks": clicks(web, history),
        "tracks_opens": rule.is_some_and(|r| r.track_opens),
        "tracks_clicks": rule.is_some_and(|r| r.track_clicks),
        "history": history.iter().map(|e| history_row(web, e)).collect::<Vec<_>>(),
        "rule": rule.map(|r| json!({
            "name": r.name,
            "description": r.description,
            "trigger": why::trigger(r),
            "file": format!("{}:{}", r.origin.file.display(), r.origin.line),
        })),
        "rule_name": entry.rule,
        "event": event.as_ref().map(|e| json!({
            "id": e.id,
            "kind": e.kind,
            "at": web.event_time(e.occurred_at),
            "data": timed_pairs(web, &e.data),
        })),
        "event_id": entry.event_id,
        "checks": checks,
        "checks_recorded": !checks.is_empty(),
        "conditions": conditions,
        "about": about(detail),
        "customer": customer.as_ref().map(|c| json!({
            "name": c.name, "email": c.email, "timezone": c.timezone,
        })),
        "content": content.as_ref().map(|c| json!({
            "text": c.text,
            "html": c.html,
            "has_html": !c.html.is_empty(),
            "html_link": format!("/messages/{id}/body.html"),
        })),
    })
}

/// The checks the guard ran, each marked passed (✓), failed (✗) or not reached, as kept with
/// the message when it was sent or stopped. A message with no kept checks (not yet checked, or
/// kept before checks were) gets the rule's conditions as written today instead, unmarked.
fn checks_and_conditions(
    content: Option<&SentContent>,
    rule: Option<&Rule>,
) -> (Vec<Value>, Vec<String>) {
    let recorded: &[CheckLine] = content.map_or(&[], |c| c.checks.as_slice());
    if recorded.is_empty() {
        return (Vec::new(), rule.map(why::conditions).unwrap_or_default());
    }
    let checks = recorded
        .iter()
        .map(|line| {
            let (mark, words) = match line.verdict.as_str() {
                "passed" => ("✓", "passed"),
                "failed" => ("✗", "failed"),
                _ => ("–", "not reached"),
            };
            json!({
                "text": line.text,
                "verdict": line.verdict,
                "mark": mark,
                "verdict_words": words,
                "not_reached": words == "not reached",
            })
        })
        .collect();
    (checks, Vec::new())
}

/// What the message was about beyond its event, from what planning fixed
/// ([`MessageDetail`]): the anniversary's year, the source it was planned from.
fn about(detail: &MessageDetail) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(years) = detail.years {
        lines.push(format!(
            "For the anniversary after {years} year{}.",
            if years == 1 { "" } else { "s" }
        ));
    }
    if let Some(source) = &detail.source {
        lines.push(format!(
            "The event comes from the business's database ({}, {}).",
            source.source, source.query
        ));
    }
    lines
}

/// The HTML body as it was sent, for the sandboxed frame on the message page: no scripts, no
/// remote images (so looking at it never counts as an open), no forms.
pub async fn message_html(
    owner: Owner,
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let content = match shared.store.sent_content(id).await {
        Ok(Some(content)) if !content.html.is_empty() => content,
        Ok(_) => return (StatusCode::NOT_FOUND, "no HTML body was kept\n").into_response(),
        Err(error) => return unavailable(&owner.web, &error),
    };
    let mut response = content.html.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "SAMEORIGIN"),
        (
            header::CONTENT_SECURITY_POLICY,
            "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    owner.with_cookie(response)
}
