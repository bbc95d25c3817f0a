//! How the customer's answers read on their timeline: a rating (`rated`, from the rating page)
//! and a reply (`replied`, from `touchpoint inbound` or the watched mailbox) in words, linked to
//! the message they answer.

use serde_json::{Value, json};

use crate::store::Event;
use crate::web::Web;

/// The timeline line of a `rated`, `replied` or `auto_replied` event (`touchpoint inbound`
/// records an out-of-office as `auto_replied`, so it cannot stop a follow-up); `None` for any
/// other kind.
pub(super) fn answer_line(web: &Web, event: &Event) -> Option<Value> {
    let data = &event.data;
    let message = data.get("message_id").and_then(Value::as_i64);
    let rule = data.get("rule").and_then(Value::as_str);
    let about = match (message, rule) {
        (Some(id), Some(rule)) => format!(" to message {id} ({rule})"),
        (Some(id), None) => format!(" to message {id}"),
        (None, Some(rule)) => format!(" to {rule}"),
        (None, None) => String::new(),
    };
    let (what, class, detail) = match event.kind.as_str() {
        "rated" => rating(data, &about)?,
        "replied" | "auto_replied" => reply(data, &about),
        _ => return None,
    };
    Some(json!({
        "at": web.time(event.occurred_at),
        "kind": event.kind,
        "kind_class": class,
        "what": what,
        "link": message.map(|id| format!("/messages/{id}")),
        "detail": detail,
    }))
}

/// "rated 2 of 5", with the comment; a low score stands out.
fn rating(data: &Value, about: &str) -> Option<(String, &'static str, Vec<Value>)> {
    let score = data.get("score").and_then(Value::as_i64)?;
    let (top, low) = match data.get("scale").and_then(Value::as_str) {
        Some("nps") => (10, 6),
        _ => (5, 2),
    };
    let class = if score <= low { "bad" } else { "good" };
    let comment = data.get("comment").and_then(Value::as_str).map(str::trim);
    let detail = comment
        .filter(|c| !c.is_empty())
        .map(|c| vec![json!({ "key": "comment", "value": c })])
        .unwrap_or_default();
    Some((format!("rated {score} of {top}{about}"), class, detail))
}

/// "replied", or "auto-reply" for an out-of-office, with the reply's first words.
fn reply(data: &Value, about: &str) -> (String, &'static str, Vec<Value>) {
    let auto = data.get("auto").and_then(Value::as_bool) == Some(true);
    let (what, class) = if auto {
        (format!("auto-reply{about}"), "plain")
    } else {
        (format!("replied{about}"), "warn")
    };
    let snippet = data.get("snippet").and_then(Value::as_str).unwrap_or("");
    let detail = vec![json!({ "key": "reply", "value": snippet })];
    (what, class, detail)
}
