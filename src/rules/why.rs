//! Why a rule did, will, or will not message one customer: the answer to the owner's "why
//! didn't Bob get the follow-up?".
//!
//! The answer comes from the same [`evaluate`] the dispatcher's guard runs before sending (and
//! whose conditions planning applies in SQL), fed with what the store says now: for a message
//! that is waiting, the checks as they would run when it is due; for an event that has no
//! message, the checks a message for it would meet. The check that fails decides the answer,
//! so `touchpoint why` and the customer page cannot disagree with what is sent. A check kind
//! added later shows up as [`Answer::Stopped`] with its own words, without code here.

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::Value;

use super::check::{Check, CheckRecord, Decision, Evaluation, Facts, MessageState, Verdict};
use super::{Rule, Trigger, Unless, evaluate};
use crate::calendar;

/// An event as the answer names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeenEvent {
    pub id: String,
    pub kind: String,
    pub at: DateTime<Utc>,
}

/// A suppression of the customer's address: the current one (`until` is `None`), or a period
/// that has ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeenSuppression {
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
    pub reason: String,
    /// Who put it there: `unsubscribe`, `bounce`, `complaint`, `manual`, ...
    pub source: String,
}

/// Where the rule's latest message for the customer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Scheduled or retrying: it will be checked again when due.
    Waiting,
    Sent,
    /// Skipped, failed, or its outcome unknown: it will not be tried again.
    Ended,
}

/// The rule's latest message for the customer (for an event rule, for the latest event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenMessage {
    pub id: i64,
    pub standing: Standing,
    /// Its state's name (`skipped`, `failed`, ...).
    pub state: String,
    pub trigger_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    pub reason: Option<String>,
    /// For a message its checks stopped: the check that did, in words, as kept when it ran.
    pub stopped_by: Option<String>,
}

/// What the answer reads besides the checks' own facts.
#[async_trait]
pub trait Witnesses: Facts {
    /// The customer's first event of `kind` after `after`: what an `unless` matched.
    async fn event_after(
        &self,
        kind: &str,
        after: DateTime<Utc>,
    ) -> Result<Option<SeenEvent>, Self::Error>;
    /// The suppression that covered the address at `at` (`None`: now).
    async fn suppression_at(
        &self,
        at: Option<DateTime<Utc>>,
    ) -> Result<Option<SeenSuppression>, Self::Error>;
}

/// What the store says about one customer and one rule.
#[derive(Debug, Clone)]
pub struct Circumstances {
    /// The customer's latest event of the rule's trigger kind.
    pub event: Option<SeenEvent>,
    pub message: Option<SeenMessage>,
    /// The customer's effective time zone.
    pub tz: Tz,
    pub default_expire_after: TimeDelta,
    pub max_attempts: u32,
}

/// Why a rule does or does not message the customer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Answer {
    /// A message is waiting and its checks would pass when it is due.
    Planned {
        message: i64,
        at: DateTime<Utc>,
    },
    /// Every check passes but planning has not made the message yet (it will on its next pass,
    /// or an anniversary's once it is within `planner.horizon`).
    NotYetPlanned {
        at: DateTime<Utc>,
    },
    /// Waiting for the send window to open (it was closed when the rule fired).
    OutsideWindow {
        message: Option<i64>,
        at: DateTime<Utc>,
    },
    AlreadySent {
        message: i64,
        at: Option<DateTime<Utc>>,
    },
    /// The message was skipped or failed; it is not tried again.
    Ended {
        message: i64,
        state: String,
        why: Option<String>,
        /// The check that stopped it, as kept when it ran.
        check: Option<String>,
    },
    RuleDisabled,
    NoTriggeringEvent {
        kind: String,
    },
    /// The event's message could not have gone out before its expiry (`expire_after`).
    EventTooOld {
        event: SeenEvent,
        expired_at: Option<DateTime<Utc>>,
    },
    /// The address was suppressed when the event occurred.
    SuppressedAtEvent {
        event: Option<SeenEvent>,
        suppression: Option<SeenSuppression>,
    },
    Suppressed {
        suppression: Option<SeenSuppression>,
    },
    Unsubscribed {
        suppression: Option<SeenSuppression>,
    },
    OnlyIf {
        attribute: String,
        value: Option<Value>,
        condition: String,
        /// The condition tests the triggering event's data (`event_field`), not an attribute.
        event_field: bool,
    },
    Unless {
        condition: String,
        /// The event that matched.
        matched: Option<SeenEvent>,
        /// The triggering event it came after (for `since = "trigger"`).
        trigger: Option<SeenEvent>,
    },
    /// Held back by the frequency limit: goes out at `until` (`None`: it was skipped, the limit
    /// would have held it past its expiry).
    FrequencyLimit {
        message: Option<i64>,
        until: Option<DateTime<Utc>>,
        /// The limit and what counted, in words.
        check: String,
    },
    /// Any other check that stopped it, in its own words (this is where check kinds added
    /// later appear).
    Stopped {
        check: String,
    },
}

/// The answer for one rule, with the checks behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Why {
    pub rule: String,
    pub answer: Answer,
    pub record: CheckRecord,
}

impl Why {
    /// Whether the rule messages the customer (has, will, or would once planned).
    pub fn applies(&self) -> bool {
        matches!(
            self.answer,
            Answer::Planned { .. }
                | Answer::NotYetPlanned { .. }
                | Answer::OutsideWindow { .. }
                | Answer::AlreadySent { .. }
        )
    }
}

/// Answers why `rule` does or does not message the customer, as of `now`.
pub async fn explain<F: Witnesses>(
    rule: &Rule,
    circumstances: &Circumstances,
    facts: &F,
    now: DateTime<Utc>,
) -> Result<Why, F::Error> {
    let why = |answer| Why {
        rule: rule.name.clone(),
        answer,
        record: CheckRecord::default(),
    };
    if !rule.enabled {
        return Ok(why(Answer::RuleDisabled));
    }
    let event = circumstances.event.as_ref();
    let (message, at) = match &circumstances.message {
        Some(m) if m.standing == Standing::Sent => {
            let answer = Answer::AlreadySent {
                message: m.id,
                at: m.sent_at,
            };
            return Ok(why(answer));
        }
        Some(m) if m.standing == Standing::Ended => {
            let answer = Answer::Ended {
                message: m.id,
                state: m.state.clone(),
                why: m.reason.clone(),
                check: m.stopped_by.clone(),
            };
            return Ok(why(answer));
        }
        Some(m) => {
            let state = MessageState {
                expires_at: m.expires_at,
                attempts: m.attempts + 1,
                max_attempts: circumstances.max_attempts,
            };
            let at = m.next_attempt_at.max(now);
            (Some(m.id), Some((state, m.trigger_at, at)))
        }
        None => {
            // A message planned from a source's event has no event here: it is looked at above.
            if let (Some(kind), None) = (trigger_kind(rule), event) {
                let kind = kind.to_string();
                return Ok(why(Answer::NoTriggeringEvent { kind }));
            }
            (None, hypothetical(rule, circumstances, now))
        }
    };
    let Some((state, trigger_at, at)) = at else {
        // A yearly or recurring rule with no occurrence left (after the last storable year).
        let check = "no occurrence left to plan".to_string();
        return Ok(why(Answer::Stopped { check }));
    };
    let evaluation = evaluate(rule, &state, facts, at).await?;
    let mut answer = decide(&evaluation, message, at, event, facts).await?;
    if matches!(
        answer,
        Answer::Planned { .. } | Answer::NotYetPlanned { .. }
    ) && at > now
        && held_by_window(rule, trigger_at, circumstances.tz)
    {
        answer = Answer::OutsideWindow { message, at };
    }
    Ok(Why {
        rule: rule.name.clone(),
        answer,
        record: evaluation.record,
    })
}

/// The event kind a rule needs, if it is triggered by one.
fn trigger_kind(rule: &Rule) -> Option<&str> {
    match &rule.trigger {
        Trigger::Event { kind, .. } | Trigger::Anniversary { kind, .. } => Some(kind),
        Trigger::Schedule { .. } => None,
    }
}

/// Whether the send window was closed when the message was triggered, so it waits for the
/// window's next opening.
fn held_by_window(rule: &Rule, trigger_at: DateTime<Utc>, tz: Tz) -> bool {
    rule.send_window
        .as_ref()
        .is_some_and(|window| !window.contains(trigger_at, tz))
}

/// The message planning would make for the latest event (or the next occurrence), and when its
/// checks would run: its trigger time, and when it is due (or now if that has passed).
fn hypothetical(
    rule: &Rule,
    circumstances: &Circumstances,
    now: DateTime<Utc>,
) -> Option<(MessageState, DateTime<Utc>, DateTime<Utc>)> {
    let tz = circumstances.tz;
    let expire = rule
        .expire_after
        .unwrap_or(circumstances.default_expire_after);
    let trigger_at = match (&rule.trigger, &circumstances.event) {
        (Trigger::Event { after, .. }, Some(event)) => event.at.checked_add_signed(*after)?,
        (Trigger::Anniversary { .. }, Some(event)) => {
            rule.trigger
                .next_anniversary(event.at, tz, now - expire)?
                .at
        }
        (Trigger::Schedule { cron, .. }, _) => calendar::next_cron(cron, tz, now)?,
        _ => return None,
    };
    let (due_at, expires_at) = rule.planned_times(trigger_at, tz, expire)?;
    let state = MessageState {
        expires_at: Some(expires_at),
        attempts: 1,
        max_attempts: circumstances.max_attempts,
    };
    Some((state, trigger_at, due_at.max(now)))
}

/// The answer an evaluation gives: the decision, and for a stop, the check that made it with
/// what it found.
async fn decide<F: Witnesses>(
    evaluation: &Evaluation<F::Subject>,
    message: Option<i64>,
    at: DateTime<Utc>,
    event: Option<&SeenEvent>,
    facts: &F,
) -> Result<Answer, F::Error> {
    match &evaluation.decision {
        Decision::Send(_) => Ok(match message {
            Some(message) => Answer::Planned { message, at },
            None => Answer::NotYetPlanned { at },
        }),
        Decision::Release { at, .. } => Ok(match evaluation.record.failed() {
            Some(check @ Check::FrequencyLimit { .. }) => Answer::FrequencyLimit {
                message,
                until: Some(*at),
                check: check.failed(),
            },
            _ => Answer::OutsideWindow { message, at: *at },
        }),
        Decision::Skip(reason) | Decision::Fail(reason) => match evaluation.record.failed() {
            Some(check) => stopped_by(check, message, event, facts).await,
            None => Ok(Answer::Stopped {
                check: reason.clone(),
            }),
        },
    }
}

/// The answer for the check that stopped the message.
async fn stopped_by<F: Witnesses>(
    check: &Check,
    message: Option<i64>,
    event: Option<&SeenEvent>,
    facts: &F,
) -> Result<Answer, F::Error> {
    Ok(match (check, message, event) {
        (Check::NotExpired { expires_at }, None, Some(event)) => Answer::EventTooOld {
            event: event.clone(),
            expired_at: *expires_at,
        },
        (Check::FrequencyLimit { .. }, message, _) => Answer::FrequencyLimit {
            message,
            until: None,
            check: check.failed(),
        },
        (check, ..) => stopped_by_condition(check, event, facts).await?,
    })
}

/// The answer for a check other than expiry.
async fn stopped_by_condition<F: Witnesses>(
    check: &Check,
    event: Option<&SeenEvent>,
    facts: &F,
) -> Result<Answer, F::Error> {
    Ok(match check {
        Check::Enabled { .. } => Answer::RuleDisabled,
        Check::NotSuppressed => {
            let suppression = facts.suppression_at(None).await?;
            if suppression
                .as_ref()
                .is_some_and(|s| s.source == "unsubscribe")
            {
                Answer::Unsubscribed { suppression }
            } else {
                Answer::Suppressed { suppression }
            }
        }
        Check::NotSuppressedAtEvent { occurred_at } => Answer::SuppressedAtEvent {
            event: event.cloned(),
            suppression: match occurred_at {
                Some(at) => facts.suppression_at(Some(*at)).await?,
                None => None,
            },
        },
        Check::OnlyIf { condition, seen } => Answer::OnlyIf {
            attribute: condition.attribute.clone(),
            value: seen.clone(),
            condition: check.condition(),
            event_field: condition.event_field,
        },
        Check::Unless {
            condition,
            after: Some(after),
        } => {
            let kind = match condition {
                Unless::SinceTrigger { event } | Unless::Within { event, .. } => event,
            };
            Answer::Unless {
                condition: check.condition(),
                matched: facts.event_after(kind, *after).await?,
                trigger: match condition {
                    Unless::SinceTrigger { .. } => event.cloned(),
                    Unless::Within { .. } => None,
                },
            }
        }
        other => Answer::Stopped {
            check: other.failed(),
        },
    })
}

impl Answer {
    /// The answer in words for the owner, with times written by `time`.
    pub fn words(&self, time: &dyn Fn(DateTime<Utc>) -> String) -> String {
        if let Some(words) = self.message_words(time) {
            return words;
        }
        let event = |e: &SeenEvent| format!("the {:?} event {:?} on {}", e.kind, e.id, time(e.at));
        let suppression = |s: &Option<SeenSuppression>| {
            s.as_ref()
                .map(|s| suppression_words(s, time))
                .unwrap_or_default()
        };
        match self {
            Answer::RuleDisabled => "not sent: the rule is disabled".into(),
            Answer::NoTriggeringEvent { kind } => {
                format!("not sent: the customer has no {kind:?} event")
            }
            Answer::EventTooOld {
                event: e,
                expired_at,
            } => format!(
                "not sent: {} is too old (its message would have expired{})",
                event(e),
                expired_at
                    .map(|at| format!(" on {}", time(at)))
                    .unwrap_or_default()
            ),
            Answer::SuppressedAtEvent {
                event: e,
                suppression: s,
            } => format!(
                "not sent: the address was suppressed when {} happened{}",
                e.as_ref().map_or_else(|| "the event".to_string(), event),
                suppression(s)
            ),
            Answer::Suppressed { suppression: s } => format!(
                "not sent: the address is on the suppression list{}",
                suppression(s)
            ),
            Answer::Unsubscribed { suppression } => format!(
                "not sent: the customer unsubscribed{}",
                suppression
                    .as_ref()
                    .map(|s| format!(" on {}", time(s.since)))
                    .unwrap_or_default()
            ),
            Answer::OnlyIf {
                attribute,
                value,
                condition,
                event_field,
            } => format!(
                "not sent: {condition}, and {} {attribute:?} is {}",
                if *event_field {
                    "the event's"
                } else {
                    "the customer's"
                },
                value
                    .as_ref()
                    .map_or_else(|| "not set".to_string(), ToString::to_string)
            ),
            Answer::Unless {
                condition,
                matched,
                trigger,
            } => {
                let matched = matched
                    .as_ref()
                    .map_or_else(|| "an event matched".to_string(), event);
                let after = trigger
                    .as_ref()
                    .map(|t| format!(", after {}", event(t)))
                    .unwrap_or_default();
                format!("not sent: {condition} — {matched}{after}")
            }
            Answer::FrequencyLimit {
                message,
                until,
                check,
            } => match until {
                Some(until) => format!(
                    "held back by the frequency limit: {} goes out at {} ({check})",
                    message.map_or_else(|| "the message".to_string(), |m| format!("message {m}")),
                    time(*until)
                ),
                None => format!("not sent: {check}"),
            },
            Answer::Stopped { check } => format!("not sent: {check}"),
            _ => String::new(),
        }
    }

    /// The words of an answer about a message (planned, waiting, sent, ended); `None` for the
    /// others.
    fn message_words(&self, time: &dyn Fn(DateTime<Utc>) -> String) -> Option<String> {
        Some(match self {
            Answer::Planned { message, at } => {
                format!("planned: message {message}, due {}", time(*at))
            }
            Answer::NotYetPlanned { at } => format!(
                "applies: planning will make the message on its next pass, or an anniversary's once it is within planner.horizon (due {})",
                time(*at)
            ),
            Answer::OutsideWindow { message, at } => format!(
                "waiting for the send window: {} goes out at {}",
                message.map_or_else(|| "the message".to_string(), |m| format!("message {m}")),
                time(*at)
            ),
            Answer::AlreadySent { message, at } => format!(
                "already sent: message {message}{}",
                at.map(|at| format!(" on {}", time(at))).unwrap_or_default()
            ),
            Answer::Ended {
                message,
                state,
                why,
                check,
            } => match check {
                Some(check) => format!("not sent: message {message} was {state}: {check}"),
                None => format!(
                    "not sent: message {message} was {state}{}",
                    why.as_ref().map(|w| format!(" ({w})")).unwrap_or_default()
                ),
            },
            _ => return None,
        })
    }

    /// A short name of the answer, the `reason` of the JSON form.
    pub fn name(&self) -> &'static str {
        match self {
            Answer::Planned { .. } => "planned",
            Answer::NotYetPlanned { .. } => "not_yet_planned",
            Answer::OutsideWindow { .. } => "outside_window",
            Answer::AlreadySent { .. } => "already_sent",
            Answer::Ended { .. } => "ended",
            Answer::RuleDisabled => "rule_disabled",
            Answer::NoTriggeringEvent { .. } => "no_triggering_event",
            Answer::EventTooOld { .. } => "event_too_old",
            Answer::SuppressedAtEvent { .. } => "suppressed_at_event",
            Answer::Suppressed { .. } => "suppressed",
            Answer::Unsubscribed { .. } => "unsubscribed",
            Answer::OnlyIf { .. } => "only_if",
            Answer::Unless { .. } => "unless",
            Answer::FrequencyLimit { .. } => "frequency_limit",
            Answer::Stopped { .. } => "stopped",
        }
    }
}

fn suppression_words(s: &SeenSuppression, time: &dyn Fn(DateTime<Utc>) -> String) -> String {
    let until = s
        .until
        .map(|until| format!(" until {}", time(until)))
        .unwrap_or_default();
    format!(
        " (since {}{until}: {}, by {})",
        time(s.since),
        s.reason,
        s.source
    )
}

impl Verdict {
    /// The verdict's name in output for programs.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Failed => "failed",
            Verdict::NotReached => "not_reached",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::rules::Subject;

    /// Customer "c1", their call "k1", and their later events.
    struct World {
        later: Vec<SeenEvent>,
        plan: &'static str,
    }

    struct Found(Value, DateTime<Utc>);

    impl Subject for Found {
        fn customer_id(&self) -> &str {
            "c1"
        }
        fn attributes(&self) -> &Value {
            &self.0
        }
        fn event(&self) -> Option<(&str, &str, DateTime<Utc>)> {
            Some(("call", "k1", self.1))
        }
        fn timezone(&self) -> Tz {
            Tz::UTC
        }
    }

    #[async_trait]
    impl Facts for World {
        type Subject = Found;
        type Error = ();
        async fn subject(&self) -> Result<Result<Found, String>, ()> {
            Ok(Ok(Found(
                json!({ "plan": self.plan }),
                at("2026-03-02T08:00:00Z"),
            )))
        }
        async fn is_suppressed(&self, _: &Found) -> Result<bool, ()> {
            Ok(false)
        }
        async fn was_suppressed_at(&self, _: &Found, _: DateTime<Utc>) -> Result<bool, ()> {
            Ok(false)
        }
        async fn had_event_after(
            &self,
            _: &Found,
            kind: &str,
            after: DateTime<Utc>,
        ) -> Result<bool, ()> {
            Ok(self.event_after(kind, after).await?.is_some())
        }
    }

    #[async_trait]
    impl Witnesses for World {
        async fn event_after(
            &self,
            kind: &str,
            after: DateTime<Utc>,
        ) -> Result<Option<SeenEvent>, ()> {
            Ok(self
                .later
                .iter()
                .find(|e| e.kind == kind && e.at > after)
                .cloned())
        }
        async fn suppression_at(
            &self,
            _: Option<DateTime<Utc>>,
        ) -> Result<Option<SeenSuppression>, ()> {
            Ok(None)
        }
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn rule() -> Rule {
        let source = r#"[[rule]]
name = "follow-up"
template = "t"
subject = "Hi"
when = { event = "call", after = "2d" }
only_if = [{ attribute = "plan", equals = "gold" }]
unless = [{ event = "purchase", since = "trigger" }]
send_window = { from = "09:00", to = "17:00" }
expire_after = "3d"
"#;
        let (mut rules, problems) =
            super::super::parse_file(Path::new("r.toml"), source, &|_| true);
        assert!(problems.is_empty(), "{problems:?}");
        rules.remove(0)
    }

    fn circumstances(message: Option<SeenMessage>) -> Circumstances {
        Circumstances {
            event: Some(SeenEvent {
                id: "k1".into(),
                kind: "call".into(),
                at: at("2026-03-02T08:00:00Z"),
            }),
            message,
            tz: Tz::UTC,
            default_expire_after: TimeDelta::days(1),
            max_attempts: 3,
        }
    }

    fn waiting(attempts: i32) -> SeenMessage {
        SeenMessage {
            id: 7,
            standing: Standing::Waiting,
            state: "retrying".into(),
            trigger_at: at("2026-03-04T10:00:00Z"),
            next_attempt_at: at("2026-03-04T10:00:00Z"),
            expires_at: Some(at("2026-03-07T09:00:00Z")),
            sent_at: None,
            attempts,
            reason: None,
            stopped_by: None,
        }
    }

    async fn answer(message: Option<SeenMessage>, world: &World, now: DateTime<Utc>) -> Why {
        explain(&rule(), &circumstances(message), world, now)
            .await
            .unwrap()
    }

    fn utc(t: DateTime<Utc>) -> String {
        t.to_rfc3339()
    }

    #[tokio::test]
    async fn an_unless_names_the_event_that_matched_and_the_trigger() {
        let world = World {
            later: vec![SeenEvent {
                id: "p9".into(),
                kind: "purchase".into(),
                at: at("2026-03-02T09:00:00Z"),
            }],
            plan: "gold",
        };
        let now = at("2026-03-02T12:00:00Z");
        let why = answer(None, &world, now).await;
        let Answer::Unless {
            matched, trigger, ..
        } = &why.answer
        else {
            panic!("{:?}", why.answer);
        };
        assert_eq!(matched.as_ref().map(|e| e.id.as_str()), Some("p9"));
        assert_eq!(trigger.as_ref().map(|e| e.id.as_str()), Some("k1"));
        assert!(!why.applies());
        let words = why.answer.words(&utc);
        assert!(
            words.contains("\"p9\" on 2026-03-02T09:00:00+00:00"),
            "{words}"
        );
    }

    #[tokio::test]
    async fn a_waiting_message_is_planned_or_stopped_by_the_check_that_would_fail() {
        let world = World {
            later: vec![],
            plan: "gold",
        };
        let now = at("2026-03-02T12:00:00Z");
        let planned = answer(Some(waiting(1)), &world, now).await;
        assert_eq!(
            planned.answer,
            Answer::Planned {
                message: 7,
                at: at("2026-03-04T10:00:00Z")
            }
        );
        // A check with no answer of its own (here: attempts) speaks in its own words, as a
        // check kind added later will.
        let tired = answer(Some(waiting(3)), &world, now).await;
        assert_eq!(
            tired.answer,
            Answer::Stopped {
                check: "no attempts left (at most 3)".into()
            }
        );
        let silver = World {
            later: vec![],
            plan: "silver",
        };
        let why = answer(None, &silver, now).await;
        assert!(
            matches!(&why.answer, Answer::OnlyIf { attribute, value: Some(v), .. } if attribute == "plan" && v == "silver"),
            "{:?}",
            why.answer
        );
    }

    #[tokio::test]
    async fn a_message_triggered_outside_the_window_waits_for_it() {
        let world = World {
            later: vec![],
            plan: "gold",
        };
        let now = at("2026-03-02T12:00:00Z");
        let mut message = waiting(1);
        message.trigger_at = at("2026-03-04T20:00:00Z");
        message.next_attempt_at = at("2026-03-05T09:00:00Z");
        let why = answer(Some(message), &world, now).await;
        assert_eq!(
            why.answer,
            Answer::OutsideWindow {
                message: Some(7),
                at: at("2026-03-05T09:00:00Z")
            }
        );
    }
}
