//! On the message page, for a message that did not go out (failed, skipped, unknown, still
//! waiting): what it would have said, rendered now the way the dispatcher renders, and what the
//! owner can do next.

use serde_json::{Value, json};

use crate::dispatch::{Draft, MessageInputs, render_message};
use crate::playbook::Playbook;
use crate::rules::MessageDetail;
use crate::store::{Customer, Event, LogEntry, MessageState};
use crate::web::Web;

/// The message as it would be rendered now (subject, text and HTML source), or why it cannot
/// be; `None` for a message that was sent (the page shows it as sent).
pub(super) fn preview(
    web: &Web,
    playbook: &Playbook,
    entry: &LogEntry,
    customer: Option<&Customer>,
    event: Option<&Event>,
    detail: &MessageDetail,
) -> Option<Value> {
    if entry.state == MessageState::Sent {
        return None;
    }
    let Some(rule) = playbook.rule(&entry.rule) else {
        return Some(json!({ "problem": "Its rule is gone, so there is nothing to show." }));
    };
    let Some(customer) = customer else {
        return Some(json!({ "problem": "The customer is gone, so there is nothing to show." }));
    };
    let draft = Draft {
        customer,
        event,
        tz: crate::plan::customer_timezone(customer, web.plan.default_timezone),
        detail,
    };
    let inputs = MessageInputs {
        draft: &draft,
        message_id: format!("<preview-{}@touchpoint>", entry.id),
        unsubscribe_url: None,
        rating_url: None,
        customer_url: None,
    };
    Some(match render_message(playbook, rule, &inputs) {
        Ok(rendered) => json!({
            "subject": rendered.subject,
            "text": rendered.text,
            "html": rendered.html,
            "has_html": !rendered.html.is_empty(),
        }),
        Err(error) => json!({
            "problem": format!("It cannot be rendered with today's templates: {error}"),
        }),
    })
}

/// What the owner can do about a message that did not go out, in a sentence or two.
pub(super) fn next_steps(entry: &LogEntry, suppressed: bool) -> Option<String> {
    let refused = entry
        .smtp_reply
        .as_deref()
        .is_some_and(|reply| reply.starts_with('5'));
    let text = match entry.state {
        MessageState::Sent => return None,
        _ if suppressed => {
            "The address is now suppressed, so nothing more goes to it: correct the email in your customer records, or allow the address again on the Suppressions page."
        }
        MessageState::Failed if refused => {
            "The customer's mail server refused the address: correct the email in your customer records; a new event sends the next message."
        }
        MessageState::Failed => {
            "It could not be delivered in the time the rule allows. If the mail relay was down, nothing else is needed: later messages go out once it is back."
        }
        MessageState::Skipped => {
            "It was not sent for the reason above; nothing is needed unless that reason is wrong (then correct the customer's data or the rule)."
        }
        MessageState::Unknown => {
            "It may or may not have arrived. Ask the customer, or look in the mail relay's log, before sending anything again."
        }
        MessageState::Scheduled | MessageState::Retrying | MessageState::Sending => {
            "It has not gone out yet; the checks just before sending can still stop it. To stop it now, suppress the address."
        }
    };
    Some(text.to_string())
}

/// A reason as the owner reads it: without the names of config keys.
pub(super) fn owner_reason(reason: &str) -> String {
    reason
        .replace("within expire_after", "in the time the rule allows")
        .replace("expire_after", "the time the rule allows")
}
