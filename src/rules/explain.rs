//! A rule and its checks in words, for the business owner: what the message page and the
//! dispatcher's kept record say. Each condition kind's words sit next to each other here, so a
//! new kind gets its words in the same place as its others.

use chrono::{DateTime, Utc};

use super::check::{Check, CheckRecord, Verdict};
use super::{
    AttributeCondition, AttributeTest, FrequencyLimit, Rule, Trigger, Unless, format_duration,
};
use crate::calendar::SendWindow;

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
    lines.extend(frequency_words(rule));
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
    let whose = if condition.event_field {
        "the triggering event's"
    } else {
        "the customer's"
    };
    let who = if condition.event_field {
        "the triggering event"
    } else {
        "the customer"
    };
    match &condition.test {
        AttributeTest::Equals(value) => format!("only if {whose} {name:?} is {value}"),
        AttributeTest::In(values) => {
            let list: Vec<String> = values.iter().map(ToString::to_string).collect();
            format!("only if {whose} {name:?} is one of {}", list.join(", "))
        }
        AttributeTest::Exists(true) => format!("only if {who} has a {name:?}"),
        AttributeTest::Exists(false) => format!("only if {who} has no {name:?}"),
        AttributeTest::AtMost(limit) => format!("only if {whose} {name:?} is at most {limit}"),
        AttributeTest::AtLeast(limit) => format!("only if {whose} {name:?} is at least {limit}"),
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
    let quiet = if window.skip_dates.is_empty() {
        String::new()
    } else {
        let dates: Vec<String> = window.skip_dates.iter().map(ToString::to_string).collect();
        format!(" except on {}", dates.join(", "))
    };
    let hours = if window.from == window.to && window.from == chrono::NaiveTime::MIN {
        "at any time".to_string()
    } else {
        format!(
            "between {} and {}",
            window.from.format("%H:%M"),
            window.to.format("%H:%M")
        )
    };
    format!("{hours}{days}{quiet}, in the customer's time zone")
}

fn limit_words(limit: &FrequencyLimit) -> String {
    let messages = if limit.max == 1 {
        "message"
    } else {
        "messages"
    };
    format!(
        "at most {} {messages} to a customer within {}, across all rules",
        limit.max,
        format_duration(limit.per)
    )
}

/// The frequency limit and priority of a rule, in words.
fn frequency_words(rule: &Rule) -> Vec<String> {
    if rule.ignore_frequency_limit {
        return vec!["not held back by the frequency limit, and not counted toward it".into()];
    }
    let mut lines = Vec::new();
    if let Some(limit) = &rule.frequency_limit {
        lines.push(limit_words(limit));
    }
    if rule.priority != 0 {
        lines.push(format!(
            "priority {}: goes before messages of lower priority when they compete for the limit",
            rule.priority
        ));
    }
    lines
}

fn utc_minute(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

impl CheckRecord {
    /// The checks that passed, one line each with the values they saw, in the order they ran:
    /// for a message that was sent, every check that ran.
    pub fn passed_lines(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|(_, verdict)| *verdict == Verdict::Passed)
            .map(|(check, _)| check.passed())
            .collect()
    }
}

impl CheckRecord {
    /// Every check in the order it ran, each with its words for its verdict: what the message
    /// page shows (with ✓, ✗ or "not reached") and the dispatcher keeps with the message.
    pub fn lines(&self) -> Vec<(String, Verdict)> {
        self.checks
            .iter()
            .map(|(check, verdict)| (check.words(*verdict), *verdict))
            .collect()
    }

    /// The check that stopped the evaluation, if one did.
    pub fn failed(&self) -> Option<&Check> {
        self.checks
            .iter()
            .find(|(_, verdict)| *verdict == Verdict::Failed)
            .map(|(check, _)| check)
    }
}

impl Check {
    /// The check's words for a verdict.
    pub fn words(&self, verdict: Verdict) -> String {
        match verdict {
            Verdict::Passed => self.passed(),
            Verdict::Failed => self.failed(),
            Verdict::NotReached => self.condition(),
        }
    }

    /// What the check asks, without a result: for a check that was not reached.
    pub fn condition(&self) -> String {
        match self {
            Check::Enabled { rule } => format!("the rule {rule:?} is enabled"),
            Check::NotExpired { .. } => "not past its expiry".into(),
            Check::Attempts { max, .. } => format!("at most {max} attempts"),
            Check::Subject { .. } => "the customer and the triggering event still exist".into(),
            Check::NotSuppressed => "the address is not on the suppression list".into(),
            Check::NotSuppressedAtEvent { .. } => {
                "the address was not on the suppression list when the event occurred".into()
            }
            Check::OnlyIf { condition, .. } => only_if(condition),
            Check::Unless { condition, .. } => unless(condition),
            Check::SendWindow { window, .. } => format!("only {}", window_words(window)),
            Check::MovedFromQuietDate { date, .. } => {
                format!("moved off a quiet date ({date}) to the next allowed day")
            }
            Check::FrequencyLimit { limit, .. } => limit_words(limit),
        }
    }

    /// What the check found when it failed: the condition that stopped the message.
    pub fn failed(&self) -> String {
        if let Some(words) = self.judged(false) {
            return words;
        }
        match self {
            Check::Enabled { rule } => format!("the rule {rule:?} is disabled"),
            Check::NotExpired {
                expires_at: Some(expiry),
            } => format!("expired (too late after {})", utc_minute(*expiry)),
            Check::NotExpired { expires_at: None } => "expired".into(),
            Check::Attempts { max, .. } => format!("no attempts left (at most {max})"),
            Check::Subject { .. } => "the customer or the triggering event no longer exists".into(),
            Check::NotSuppressed => "the address is on the suppression list".into(),
            other => format!("{}: not met", other.condition()),
        }
    }

    /// What the check found when it passed.
    pub fn passed(&self) -> String {
        if let Some(words) = self.judged(true) {
            return words;
        }
        match self {
            Check::Enabled { rule } => format!("the rule {rule:?} is enabled"),
            Check::NotExpired {
                expires_at: Some(expiry),
            } => format!("not expired (too late after {})", utc_minute(*expiry)),
            Check::NotExpired { expires_at: None } => "no expiry".into(),
            Check::Attempts { attempt, .. } => format!("attempt {attempt}"),
            Check::Subject {
                event: Some((kind, id)),
                ..
            } => format!("the triggering {kind:?} event {id:?} still exists"),
            Check::Subject {
                customer,
                event: None,
            } => format!("the customer {customer:?} still exists"),
            other => other.condition(),
        }
    }

    /// A condition's words with what it saw, as it `held` or not; `None` for the checks whose
    /// words do not follow that pattern.
    fn judged(&self, held: bool) -> Option<String> {
        Some(match self {
            Check::NotSuppressedAtEvent { occurred_at } => format!(
                "the address was {}on the suppression list when the event occurred{}",
                if held { "not " } else { "" },
                occurred_at
                    .map(|at| format!(" ({})", utc_minute(at)))
                    .unwrap_or_default()
            ),
            Check::OnlyIf { condition, seen } => {
                let value = seen
                    .as_ref()
                    .map_or_else(|| "none".to_string(), ToString::to_string);
                let verdict = if held { "held" } else { "not met" };
                let whose = if condition.event_field {
                    "the event's"
                } else {
                    "the customer's"
                };
                format!("{}: {verdict} ({whose} is {value})", only_if(condition))
            }
            Check::Unless { condition, after } => {
                let since = after.map(utc_minute).unwrap_or_default();
                let (verdict, some) = if held {
                    ("held", "no")
                } else {
                    ("matched", "a")
                };
                let found = match condition {
                    Unless::SinceTrigger { event } => {
                        format!("{some} {event:?} event after {since}")
                    }
                    Unless::Within { event, .. } => format!("{some} {event:?} event since {since}"),
                };
                format!("{}: {verdict} ({found})", unless(condition))
            }
            Check::SendWindow {
                window,
                local: Some(local),
            } => format!(
                "{}: {} (it was {} in {})",
                window_words(window),
                if held { "open" } else { "closed" },
                local.format("%a %H:%M"),
                local.timezone().name()
            ),
            Check::MovedFromQuietDate { planned, date } => format!(
                "planned for {}, a quiet date ({date}) in {}: moved to the next allowed day",
                planned.format("%a %d %b %Y %H:%M"),
                planned.timezone().name()
            ),
            Check::FrequencyLimit {
                limit,
                counted: Some(counted),
                outranked_by,
            } => {
                let waiting = match outranked_by {
                    0 => "none of higher priority waiting".to_string(),
                    n => format!("{n} of higher priority waiting"),
                };
                format!(
                    "{}: {} ({counted} counted within {}, {waiting})",
                    limit_words(limit),
                    if held { "held" } else { "reached" },
                    format_duration(limit.per)
                )
            }
            _ => return None,
        })
    }
}
