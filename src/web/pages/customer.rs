//! `/customers/{id}`: one customer's timeline (their events, what happened to their messages,
//! a suppression) and their messages.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::response::Response;
use chrono::{DateTime, Utc};

use crate::rules::why::Answer;
use serde_json::{Value, json};

use super::{
    detail_pairs, encode_path, entry_row, kind_class, not_found, timed_pairs, unavailable,
};
use crate::plan::why::{WhySettings, why_customer};
use crate::store::{
    Customer, CustomerMessageEvent, Event, LogEntry, LogFilter, SharedStore, StoreError,
    Suppression,
};
use crate::web::Shared;
use crate::web::{Owner, Web, encode_query};

/// What the customer page reads from the database.
struct Loaded {
    customer: Customer,
    events: Vec<Event>,
    messages: Vec<LogEntry>,
    activity: Vec<CustomerMessageEvent>,
    /// `Some` when the address is suppressed (`Some(None)`: suppressed, the entry not found).
    suppression: Option<Option<Suppression>>,
}

impl Loaded {
    /// `None` when there is no such customer.
    async fn read(store: &SharedStore, id: &str) -> Result<Option<Loaded>, StoreError> {
        let Some(customer) = store.customer(id).await? else {
            return Ok(None);
        };
        let events = store.customer_events(id, 200).await?;
        let messages = store
            .log(&LogFilter {
                customer_id: Some(id.to_string()),
                limit: Some(200),
                ..LogFilter::default()
            })
            .await?;
        let activity = store.customer_message_events(id, 500).await?;
        let suppression = if store.is_suppressed(&customer.email).await? {
            let email = crate::store::normalize_email(&customer.email);
            Some(
                store
                    .suppressions()
                    .await?
                    .into_iter()
                    .find(|s| s.email == email),
            )
        } else {
            None
        };
        Ok(Some(Loaded {
            customer,
            events,
            messages,
            activity,
            suppression,
        }))
    }
}

pub async fn customer(
    owner: Owner,
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let web = owner.web.clone();
    let loaded = match Loaded::read(&shared.store, &id).await {
        Ok(Some(loaded)) => loaded,
        Ok(None) => return not_found(&owner, "customer"),
        Err(error) => return owner.with_cookie(unavailable(&web, &error)),
    };
    let timeline = timeline(&web, &loaded);
    let (rules, rules_error) = rule_answers(&shared, &web, &id).await;
    let Loaded {
        customer,
        messages,
        suppression,
        ..
    } = loaded;
    let names = HashMap::from([(
        customer.id.clone(),
        customer.name.clone().unwrap_or_default(),
    )]);
    let title = customer
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| customer.email.clone());
    let data = json!({
        "page": owner.page(&title, "log"),
        "customer": {
            "id": customer.id,
            "name": customer.name,
            "email": customer.email,
            "timezone": customer.timezone.clone().unwrap_or_else(|| format!("{} (default)", web.plan.default_timezone.name())),
            "attributes": detail_pairs(&customer.attributes),
        },
        "suppressed": suppression.is_some(),
        "suppression_reason": suppression.flatten().map(|s| s.reason),
        "timeline": timeline,
        "rules": rules,
        "rules_error": rules_error,
        "messages": messages.iter().map(|m| entry_row(&web, m, &names)).collect::<Vec<_>>(),
        "log_link": format!("/log?q={}", encode_query(&customer.id)),
        "back": format!("/customers/{}", encode_path(&customer.id)),
    });
    owner.render("customer", &data)
}

/// Everything that happened to the customer, newest first.
fn timeline(web: &Web, loaded: &Loaded) -> Vec<Value> {
    let mut timeline: Vec<(DateTime<Utc>, Value)> = Vec::new();
    for event in &loaded.events {
        let line = super::answers::answer_line(web, event).unwrap_or_else(|| {
            json!({
                "at": web.event_time(event.occurred_at),
                "kind": event.kind,
                "kind_class": "event",
                "what": format!("{} (event {})", event.kind, event.id),
                "link": Value::Null,
                "detail": timed_pairs(web, &event.data),
            })
        });
        timeline.push((event.occurred_at, line));
    }
    for line in &loaded.activity {
        timeline.push((line.event.at, message_line(web, line)));
    }
    if let Some(Some(s)) = &loaded.suppression {
        timeline.push((
            s.created_at,
            json!({
                "at": web.time(s.created_at),
                "kind": "suppressed",
                "kind_class": "bad",
                "what": format!("{} put on the suppression list ({})", s.email, s.source),
                "link": "/suppressions",
                "detail": [{ "key": "reason", "value": s.reason }],
            }),
        ));
    }
    timeline.sort_by_key(|line| std::cmp::Reverse(line.0));
    timeline.into_iter().map(|(_, v)| v).collect()
}

/// A line of one of the customer's messages' history.
fn message_line(web: &Web, line: &CustomerMessageEvent) -> Value {
    let what = match line.event.kind.as_str() {
        "clicked" => format!(
            "clicked {} in message {}",
            line.event
                .detail
                .get("url")
                .and_then(Value::as_str)
                .unwrap_or("a link"),
            line.message
        ),
        kind => format!("{kind}: message {} ({})", line.message, line.rule),
    };
    let mut detail = timed_pairs(web, &line.event.detail);
    detail.retain(|d| d["key"] != "url");
    if let Some(reply) = &line.event.smtp_reply {
        detail.push(json!({ "key": "SMTP reply", "value": reply }));
    }
    json!({
        "at": web.time(line.event.at),
        "kind": line.event.kind,
        "kind_class": kind_class(&line.event.kind),
        "what": what,
        "link": format!("/messages/{}", line.message),
        "detail": detail,
    })
}

/// For each rule, whether it messages the customer and, if not, why (the `touchpoint why`
/// answer, in the page's time zone); or what kept the answer from being read.
async fn rule_answers(shared: &Shared, web: &Web, id: &str) -> (Vec<Value>, Option<String>) {
    let playbook = shared.playbook.borrow().clone();
    let settings = WhySettings {
        plan: web.plan.clone(),
        max_attempts: web.max_attempts,
    };
    let answers =
        match why_customer(&shared.store, &playbook, &settings, id, None, Utc::now()).await {
            Ok(answers) => answers.unwrap_or_default(),
            Err(error) => {
                tracing::warn!(customer = %id, %error, "cannot say why rules do or do not apply");
                return (Vec::new(), Some(format!("Cannot tell right now: {error}")));
            }
        };
    let time = |t| web.time(t);
    let rows = answers
        .iter()
        .map(|why| {
            let message = match &why.answer {
                Answer::Planned { message, .. }
                | Answer::AlreadySent { message, .. }
                | Answer::Ended { message, .. }
                | Answer::OutsideWindow {
                    message: Some(message),
                    ..
                } => Some(*message),
                _ => None,
            };
            json!({
                "rule": why.rule,
                "applies": why.applies(),
                "says": why.answer.words(&time),
                "link": message.map(|m| format!("/messages/{m}")),
            })
        })
        .collect();
    (rows, None)
}
