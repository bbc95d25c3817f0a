//! Why a message exists and why it was allowed to go out, in words for the business owner.
//!
//! [`checks_passed`] is called by the dispatcher right after its guard let a message through,
//! and its lines are kept with the message (`messages.checks`), so the message page shows what
//! was checked at the time, not what the rule says today.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::calendar::SendWindow;
use crate::rules::{AttributeCondition, AttributeTest, Rule, Trigger, Unless, format_duration};
use crate::store::{ClaimedMessage, Customer, Event};

/// When the rule fires, in words: "2h after a purchase event".
pub fn trigger(rule: &Rule) -> String {
    match &rule.trigger {
        Trigger::Event { kind, after } => {
            format!("{} after a {kind:?} event", format_duration(*after))
        }
        Trigger::Anniversary { kind, at } => format!(
            "every year on the date of the {kind:?} event, at {} in the customer's time zone",
            at.format("%H:%M")
        ),
        Trigger::Schedule { expression, .. } => {
            format!("on the schedule {expression:?}, in each customer's time zone")
        }
    }
}

/// The rule's conditions, in words, as written in its file today.
pub fn conditions(rule: &Rule) -> Vec<String> {
    let mut lines = Vec::new();
    if !rule.enabled {
        lines.push("the rule is disabled (enabled = false)".into());
    }
    lines.extend(rule.only_if.iter().map(only_if));
    lines.extend(rule.unless.iter().map(unless));
    if let Some(window) = &rule.send_window {
        lines.push(format!("only {}", window_words(window)));
    }
    if let Some(expire) = rule.expire_after {
        lines.push(format!(
            "skipped if it cannot go out within {} of its due time",
            format_duration(expire)
        ));
    }
    lines.push("never to an address on the suppression list".into());
    lines
}

fn only_if(condition: &AttributeCondition) -> String {
    let name = &condition.attribute;
    match &condition.test {
        AttributeTest::Equals(value) => format!("only if the customer's {name:?} is {value}"),
        AttributeTest::In(values) => {
            let list: Vec<String> = values.iter().map(ToString::to_string).collect();
            format!(
                "only if the customer's {name:?} is one of {}",
                list.join(", ")
            )
        }
        AttributeTest::Exists(true) => format!("only if the customer has a {name:?}"),
        AttributeTest::Exists(false) => format!("only if the customer has no {name:?}"),
    }
}

fn unless(condition: &Unless) -> String {
    match condition {
        Unless::SinceTrigger { event } => {
            format!("unless the customer had a {event:?} event after the triggering one")
        }
        Unless::Within { event, within } => format!(
            "unless the customer had a {event:?} event within {} before sending",
            format_duration(*within)
        ),
    }
}

fn window_words(window: &SendWindow) -> String {
    let days = match &window.days {
        Some(days) => {
            let names: Vec<String> = days.iter().map(ToString::to_string).collect();
            format!(" on {}", names.join(", "))
        }
        None => String::new(),
    };
    format!(
        "between {} and {}{days}, in the customer's time zone",
        window.from.format("%H:%M"),
        window.to.format("%H:%M")
    )
}

/// What the dispatcher's guard found just before sending (every line held, or the message would
/// have been skipped), with the values it saw.
pub fn checks_passed(
    rule: &Rule,
    customer: &Customer,
    event: Option<&Event>,
    claim: &ClaimedMessage,
    tz: Tz,
    now: DateTime<Utc>,
) -> Vec<String> {
    let mut lines = vec![format!("the rule {:?} is enabled", rule.name)];
    match event {
        Some(event) => lines.push(format!(
            "the triggering {:?} event {:?} still exists",
            event.kind, event.id
        )),
        None => lines.push(format!("the customer {:?} still exists", customer.id)),
    }
    lines.push("the address is not on the suppression list".into());
    for condition in &rule.only_if {
        let value = customer
            .attributes
            .get(&condition.attribute)
            .filter(|v| !v.is_null())
            .map_or_else(|| "none".to_string(), ToString::to_string);
        lines.push(format!(
            "{}: held (the customer's is {value})",
            only_if(condition)
        ));
    }
    for condition in &rule.unless {
        let found = match (condition, event) {
            (Unless::SinceTrigger { .. }, None) => continue,
            (Unless::SinceTrigger { event: kind }, Some(trigger)) => format!(
                "no {kind:?} event after {}",
                trigger.occurred_at.format("%Y-%m-%d %H:%M UTC")
            ),
            (
                Unless::Within {
                    event: kind,
                    within,
                },
                _,
            ) => format!(
                "no {kind:?} event since {}",
                (now - *within).format("%Y-%m-%d %H:%M UTC")
            ),
        };
        lines.push(format!("{}: held ({found})", unless(condition)));
    }
    if let Some(window) = &rule.send_window {
        lines.push(format!(
            "{}: open (it was {} in {})",
            window_words(window),
            now.with_timezone(&tz).format("%a %H:%M"),
            tz.name()
        ));
    }
    match claim.expires_at {
        Some(expiry) => lines.push(format!(
            "not expired (too late after {})",
            expiry.format("%Y-%m-%d %H:%M UTC")
        )),
        None => lines.push("no expiry".into()),
    }
    lines.push(format!("attempt {}", claim.attempts));
    lines
}
