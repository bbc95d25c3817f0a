//! The send-time checks of a rule, in one place: [`evaluate`] runs them in order, stops at the
//! first that fails, and keeps a [`CheckRecord`] of every check with what it saw and its
//! verdict (passed, failed, or not reached). The dispatcher's guard acts on the decision and
//! keeps the record's words with the message; the message page shows them, so "why was this
//! sent" is what ran, not a second description of the rule.
//!
//! Adding a condition kind: a variant in [`Check`], its step in [`evaluate`] (and in
//! [`Stage`]), and its words in `explain.rs`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::Value;

use super::{
    AttributeCondition, AttributeTest, FrequencyLimit, Rule, Trigger, Unless, format_duration,
};
use crate::calendar::{QuietDate, SendWindow};

/// One check the guard runs before sending, with what it looked at.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// The rule is enabled (`enabled = true`).
    Enabled { rule: String },
    /// The message is not past its expiry (`expire_after`); `None`: it never expires.
    NotExpired { expires_at: Option<DateTime<Utc>> },
    /// Attempts left (`delivery.max_attempts`); `attempt` counts this one.
    Attempts { attempt: i32, max: u32 },
    /// The customer, and the triggering event (kind, id) if there is one, still exist.
    Subject {
        customer: String,
        event: Option<(String, String)>,
    },
    /// The address is not on the suppression list.
    NotSuppressed,
    /// The address was not on the suppression list when the triggering event occurred (event
    /// rules): what happened while it was suppressed stays unsent after it is allowed again.
    NotSuppressedAtEvent { occurred_at: Option<DateTime<Utc>> },
    /// One `only_if` condition, with the customer's value (`None`: absent, or not reached).
    OnlyIf {
        condition: AttributeCondition,
        seen: Option<Value>,
    },
    /// One `unless` condition, with the moment events were looked for after (`None`: not
    /// reached).
    Unless {
        condition: Unless,
        after: Option<DateTime<Utc>>,
    },
    /// The send window, with the customer's local time when it was looked at.
    SendWindow {
        window: SendWindow,
        local: Option<DateTime<Tz>>,
    },
    /// The message was planned for a quiet date (`planned`, in the customer's zone) and goes
    /// out on the next allowed day instead.
    MovedFromQuietDate {
        planned: DateTime<Tz>,
        date: QuietDate,
    },
    /// The frequency limit, with how many counted messages went out to the customer within
    /// its window and how many of higher priority wait to go first (`None`: not reached).
    FrequencyLimit {
        limit: FrequencyLimit,
        counted: Option<usize>,
        outranked_by: usize,
    },
}

/// What the frequency limit looks at for one message, as of the check.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrequencyUsage {
    /// When the customer's counted messages went out within the limit's window.
    pub counted: Vec<DateTime<Utc>>,
    /// Those of `counted` still going out: they count, but may yet fail (and then not count).
    pub in_flight: Vec<DateTime<Utc>>,
    /// When the customer's waiting messages of higher-priority rules are due, those due within
    /// the limit's window from now: they compete for the same allowance and go first.
    pub outranked_by: Vec<DateTime<Utc>>,
}

impl FrequencyUsage {
    /// The counted messages that are settled (`sent` or `unknown`), not still going out.
    pub fn settled(&self) -> Vec<DateTime<Utc>> {
        let mut settled = self.counted.clone();
        for at in &self.in_flight {
            if let Some(i) = settled.iter().position(|s| s == at) {
                settled.remove(i);
            }
        }
        settled
    }
}

/// What became of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed,
    /// An earlier check failed, so this one did not run.
    NotReached,
}

/// Every check of one evaluation, in the order they ran.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckRecord {
    pub checks: Vec<(Check, Verdict)>,
}

impl CheckRecord {
    fn push(&mut self, check: Check, verdict: Verdict) {
        self.checks.push((check, verdict));
    }
}

/// What the guard should do with the message.
#[derive(Debug)]
pub enum Decision<S> {
    /// Every check passed: send to this subject.
    Send(S),
    /// Not sent, never will be: `skipped` with this reason.
    Skip(String),
    /// Not sent, never will be: `failed` with this reason.
    Fail(String),
    /// Not now: due again at `at`.
    Release { at: DateTime<Utc>, reason: String },
}

/// An evaluation: the decision and the record of the checks behind it.
#[derive(Debug)]
pub struct Evaluation<S> {
    pub decision: Decision<S>,
    pub record: CheckRecord,
}

/// The state of the message being checked.
#[derive(Debug, Clone, Copy)]
pub struct MessageState {
    pub expires_at: Option<DateTime<Utc>>,
    /// Attempts so far, this one included.
    pub attempts: i32,
    pub max_attempts: u32,
}

/// The customer and triggering event a message is about, as read at send time.
pub trait Subject {
    fn customer_id(&self) -> &str;
    fn attributes(&self) -> &Value;
    /// The triggering event's kind, id and time, if the rule has one.
    fn event(&self) -> Option<(&str, &str, DateTime<Utc>)>;
    /// The customer's effective time zone.
    fn timezone(&self) -> Tz;
    /// The triggering event's data, read now (a rating's score may have changed since
    /// planning); `None` without an event.
    fn event_data(&self) -> Option<&Value> {
        None
    }
}

/// What the checks read from the world at send time (the database, the sources).
#[async_trait]
pub trait Facts: Sync {
    type Subject: Subject + Send + Sync;
    type Error: Send;
    /// The message's customer and event, read now; `Ok(Err(reason))` when either is gone.
    async fn subject(&self) -> Result<Result<Self::Subject, String>, Self::Error>;
    async fn is_suppressed(&self, subject: &Self::Subject) -> Result<bool, Self::Error>;
    /// Whether the address was on the suppression list at `at` (a period since ended counts).
    async fn was_suppressed_at(
        &self,
        subject: &Self::Subject,
        at: DateTime<Utc>,
    ) -> Result<bool, Self::Error>;
    /// Whether the customer had an event of `kind` after `after`.
    async fn had_event_after(
        &self,
        subject: &Self::Subject,
        kind: &str,
        after: DateTime<Utc>,
    ) -> Result<bool, Self::Error>;
    /// What counts toward `rule`'s frequency `limit` for this customer as of `now`. The
    /// default sees no earlier messages: facts that can read the outbox must say what it holds.
    async fn frequency_usage(
        &self,
        _subject: &Self::Subject,
        _rule: &Rule,
        _limit: &FrequencyLimit,
        _now: DateTime<Utc>,
    ) -> Result<FrequencyUsage, Self::Error> {
        Ok(FrequencyUsage::default())
    }
    /// When the message was planned to go (its trigger), if known: a message moved off a quiet
    /// date says so.
    fn planned_for(&self) -> Option<DateTime<Utc>> {
        None
    }
}

/// Where an evaluation stopped, to list the checks it did not reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Enabled,
    Expiry,
    Attempts,
    Subject,
    Suppression,
    SuppressionAtEvent,
    OnlyIf(usize),
    Unless(usize),
    Window,
    Frequency,
}

/// An evaluation under way: the record so far, and how to end it.
struct Run<'a> {
    rule: &'a Rule,
    message: &'a MessageState,
    record: CheckRecord,
}

impl Run<'_> {
    fn pass(&mut self, check: Check) {
        self.record.push(check, Verdict::Passed);
    }

    /// Ends the run with every check passed.
    fn send<S>(self, subject: S) -> Evaluation<S> {
        Evaluation {
            decision: Decision::Send(subject),
            record: self.record,
        }
    }

    /// Ends the run at `stage` with `check` failed; what comes after is not reached.
    fn stop<S>(mut self, stage: Stage, check: Check, decision: Decision<S>) -> Evaluation<S> {
        self.record.push(check, Verdict::Failed);
        for later in stages(self.rule).into_iter().filter(|s| *s > stage) {
            let check = unreached(self.rule, self.message, later);
            self.record.push(check, Verdict::NotReached);
        }
        Evaluation {
            decision,
            record: self.record,
        }
    }
}

/// Every stage of `rule`'s checks, in order.
fn stages(rule: &Rule) -> Vec<Stage> {
    let mut stages = vec![
        Stage::Enabled,
        Stage::Expiry,
        Stage::Attempts,
        Stage::Subject,
        Stage::Suppression,
    ];
    if matches!(rule.trigger, Trigger::Event { .. }) {
        stages.push(Stage::SuppressionAtEvent);
    }
    stages.extend((0..rule.only_if.len()).map(Stage::OnlyIf));
    stages.extend((0..rule.unless.len()).map(Stage::Unless));
    if rule.send_window.is_some() {
        stages.push(Stage::Window);
    }
    if rule.limited().is_some() {
        stages.push(Stage::Frequency);
    }
    stages
}

/// The check of a stage that did not run, with nothing seen.
fn unreached(rule: &Rule, message: &MessageState, stage: Stage) -> Check {
    match stage {
        Stage::Enabled => Check::Enabled {
            rule: rule.name.clone(),
        },
        Stage::Expiry => Check::NotExpired {
            expires_at: message.expires_at,
        },
        Stage::Attempts => Check::Attempts {
            attempt: message.attempts,
            max: message.max_attempts,
        },
        Stage::Subject => Check::Subject {
            customer: String::new(),
            event: None,
        },
        Stage::Suppression => Check::NotSuppressed,
        Stage::SuppressionAtEvent => Check::NotSuppressedAtEvent { occurred_at: None },
        Stage::OnlyIf(i) => Check::OnlyIf {
            condition: rule.only_if[i].clone(),
            seen: None,
        },
        Stage::Unless(i) => Check::Unless {
            condition: rule.unless[i].clone(),
            after: None,
        },
        Stage::Window => Check::SendWindow {
            window: rule.send_window.clone().unwrap_or_else(SendWindow::all_day),
            local: None,
        },
        Stage::Frequency => Check::FrequencyLimit {
            limit: rule.limited().unwrap_or(FrequencyLimit {
                max: 1,
                per: chrono::TimeDelta::zero(),
            }),
            counted: None,
            outranked_by: 0,
        },
    }
}

/// The verdict on a message past its expiry: the same the periodic expiry sweep gives (and the
/// dispatcher when the last-moment write refuses an expired message).
pub fn expired(attempts: i32) -> Decision<std::convert::Infallible> {
    if attempts > 1 {
        Decision::Fail("expired while retrying: not delivered within expire_after".into())
    } else {
        Decision::Skip("expired: could not go out within expire_after of its due time".into())
    }
}

fn widen<S>(decision: Decision<std::convert::Infallible>) -> Decision<S> {
    match decision {
        Decision::Send(never) => match never {},
        Decision::Skip(reason) => Decision::Skip(reason),
        Decision::Fail(reason) => Decision::Fail(reason),
        Decision::Release { at, reason } => Decision::Release { at, reason },
    }
}

/// Runs `rule`'s send-time checks for a message, in order, as of `now`: enabled, not expired,
/// attempts left, the customer and event still there, not suppressed, each `only_if`, each
/// `unless`, the send window. Stops at the first that fails.
pub async fn evaluate<F: Facts>(
    rule: &Rule,
    message: &MessageState,
    facts: &F,
    now: DateTime<Utc>,
) -> Result<Evaluation<F::Subject>, F::Error> {
    let mut run = Run {
        rule,
        message,
        record: CheckRecord::default(),
    };
    let enabled = Check::Enabled {
        rule: rule.name.clone(),
    };
    if !rule.enabled {
        let reason = format!("the rule {:?} is disabled", rule.name);
        return Ok(run.stop(Stage::Enabled, enabled, Decision::Skip(reason)));
    }
    run.pass(enabled);
    let not_expired = Check::NotExpired {
        expires_at: message.expires_at,
    };
    if message.expires_at.is_some_and(|expiry| now > expiry) {
        // Never sent late.
        let decision = widen(expired(message.attempts));
        return Ok(run.stop(Stage::Expiry, not_expired, decision));
    }
    run.pass(not_expired);
    let attempts = Check::Attempts {
        attempt: message.attempts,
        max: message.max_attempts,
    };
    if message.attempts > message.max_attempts as i32 {
        let reason = format!("gave up after {} attempts", message.max_attempts);
        return Ok(run.stop(Stage::Attempts, attempts, Decision::Fail(reason)));
    }
    run.pass(attempts);
    let subject = match facts.subject().await? {
        Ok(subject) => subject,
        Err(reason) => {
            let check = unreached(rule, message, Stage::Subject);
            return Ok(run.stop(Stage::Subject, check, Decision::Skip(reason)));
        }
    };
    run.pass(Check::Subject {
        customer: subject.customer_id().to_string(),
        event: subject
            .event()
            .map(|(kind, id, _)| (kind.to_string(), id.to_string())),
    });
    conditions(run, facts, subject, now).await
}

/// Suppression and `only_if`, once the message's subject is known.
async fn conditions<F: Facts>(
    mut run: Run<'_>,
    facts: &F,
    subject: F::Subject,
    now: DateTime<Utc>,
) -> Result<Evaluation<F::Subject>, F::Error> {
    let rule = run.rule;
    if facts.is_suppressed(&subject).await? {
        let reason = "the address is on the suppression list".to_string();
        return Ok(run.stop(
            Stage::Suppression,
            Check::NotSuppressed,
            Decision::Skip(reason),
        ));
    }
    run.pass(Check::NotSuppressed);
    let mut run = match suppressed_at_event(run, facts, &subject).await? {
        Ok(run) => run,
        Err(stopped) => return Ok(stopped),
    };
    for (i, condition) in rule.only_if.iter().enumerate() {
        let event_data = subject.event_data();
        let check = Check::OnlyIf {
            condition: condition.clone(),
            seen: condition.seen(subject.attributes(), event_data).cloned(),
        };
        if !condition.holds_for(subject.attributes(), event_data) {
            let reason = if condition.event_field {
                "the triggering event no longer matches the rule's only_if conditions".into()
            } else {
                "the customer no longer matches the rule's only_if conditions".into()
            };
            return Ok(run.stop(Stage::OnlyIf(i), check, Decision::Skip(reason)));
        }
        run.pass(check);
    }
    unless_and_window(run, facts, subject, now).await
}

/// For an event rule, whether the address was suppressed when the event occurred: such an
/// event never becomes a message, not even after the address is allowed again.
async fn suppressed_at_event<'a, F: Facts>(
    mut run: Run<'a>,
    facts: &F,
    subject: &F::Subject,
) -> Result<Result<Run<'a>, Evaluation<F::Subject>>, F::Error> {
    let occurred_at = match (&run.rule.trigger, subject.event()) {
        (Trigger::Event { .. }, Some((_, _, occurred_at))) => occurred_at,
        _ => return Ok(Ok(run)),
    };
    let check = Check::NotSuppressedAtEvent {
        occurred_at: Some(occurred_at),
    };
    if facts.was_suppressed_at(subject, occurred_at).await? {
        let reason =
            "the address was on the suppression list when the triggering event occurred".into();
        let stage = Stage::SuppressionAtEvent;
        return Ok(Err(run.stop(stage, check, Decision::Skip(reason))));
    }
    run.pass(check);
    Ok(Ok(run))
}

/// The `unless` conditions and the send window, the checks that come last.
async fn unless_and_window<F: Facts>(
    mut run: Run<'_>,
    facts: &F,
    subject: F::Subject,
    now: DateTime<Utc>,
) -> Result<Evaluation<F::Subject>, F::Error> {
    let rule = run.rule;
    for (i, condition) in rule.unless.iter().enumerate() {
        let (kind, after, why) = match condition {
            Unless::SinceTrigger { event: kind } => {
                // Only event triggers may say `since = "trigger"` (the parser sees to it).
                let Some((_, _, occurred_at)) = subject.event() else {
                    continue;
                };
                (kind, occurred_at, "since the triggering event")
            }
            Unless::Within {
                event: kind,
                within,
            } => (kind, now - *within, "recently"),
        };
        let check = Check::Unless {
            condition: condition.clone(),
            after: Some(after),
        };
        if facts.had_event_after(&subject, kind, after).await? {
            let reason = format!("unless: the customer had a {kind:?} event {why}");
            return Ok(run.stop(Stage::Unless(i), check, Decision::Skip(reason)));
        }
        run.pass(check);
    }
    let run = match window(run, &subject, facts.planned_for(), now) {
        Ok(run) => run,
        Err(stopped) => return Ok(stopped),
    };
    frequency(run, facts, subject, now).await
}

/// The send window (with its quiet dates): `Err` with the evaluation when it is closed.
fn window<'a, S: Subject>(
    mut run: Run<'a>,
    subject: &S,
    planned: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<Run<'a>, Evaluation<S>> {
    let rule = run.rule;
    let Some(window) = &rule.send_window else {
        return Ok(run);
    };
    let tz = subject.timezone();
    let check = Check::SendWindow {
        window: window.clone(),
        local: Some(now.with_timezone(&tz)),
    };
    if window.contains(now, tz) {
        run.pass(check);
        let moved = planned.and_then(|p| Some((p, window.quiet_at(p, tz)?)));
        if let Some((planned, date)) = moved {
            let planned = planned.with_timezone(&tz);
            if planned.date_naive() != now.with_timezone(&tz).date_naive() {
                run.pass(Check::MovedFromQuietDate { planned, date });
            }
        }
        return Ok(run);
    }
    let reason = match window.quiet_at(now, tz) {
        Some(date) => format!("{QUIET_DATE} ({date}) in the customer's time zone"),
        None => "outside the send window".into(),
    };
    let at = window.next_open(now, tz);
    let decision = wait_or_expire(run.message.expires_at, at, reason, || {
        "expired: the send window does not open again before expire_after runs out".into()
    });
    Err(run.stop(Stage::Window, check, decision))
}

/// How a reason starts when the frequency limit holds a message back (`plan` and Upcoming show
/// such waiting messages with it).
pub const HELD_BACK: &str = "held back by the frequency limit";
/// How a reason starts when a quiet date holds a message back.
pub const QUIET_DATE: &str = "a quiet date";

/// How long a message outranked by one due now waits before it looks again.
const OUTRANKED_WAIT: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// How long a message waits for another one to the same customer whose body is going out.
const IN_FLIGHT_WAIT: chrono::TimeDelta = chrono::TimeDelta::seconds(10);

/// The frequency limit, the last check: the customer is under it, and no message of higher
/// priority is waiting for what is left of the allowance.
async fn frequency<F: Facts>(
    mut run: Run<'_>,
    facts: &F,
    subject: F::Subject,
    now: DateTime<Utc>,
) -> Result<Evaluation<F::Subject>, F::Error> {
    let rule = run.rule;
    let Some(limit) = rule.limited() else {
        return Ok(run.send(subject));
    };
    let usage = facts.frequency_usage(&subject, rule, &limit, now).await?;
    let check = Check::FrequencyLimit {
        limit,
        counted: Some(usage.counted.len()),
        outranked_by: usage.outranked_by.len(),
    };
    let expires_at = run.message.expires_at;
    let tz = subject.timezone();
    let Some(decision) = limit_decision(rule, &limit, &usage, expires_at, tz, now) else {
        run.pass(check);
        return Ok(run.send(subject));
    };
    Ok(run.stop(Stage::Frequency, check, decision))
}

/// What the frequency `limit` of `rule` does to a message as of `now`, given what counts
/// (`usage`): `None` if it may go; else it waits until the limit (and the send window) lets it,
/// or is skipped if that is past `expires_at`. Used by the guard, and by the dispatcher when the
/// body fence refused because another message went out first.
pub fn limit_decision<S>(
    rule: &Rule,
    limit: &FrequencyLimit,
    usage: &FrequencyUsage,
    expires_at: Option<DateTime<Utc>>,
    tz: Tz,
    now: DateTime<Utc>,
) -> Option<Decision<S>> {
    let free_at = limit.next_allowed(&usage.counted, now);
    let left = (limit.max as usize).saturating_sub(usage.counted.len());
    let (at, why) = if free_at > now && limit.next_allowed(&usage.settled(), now) <= now {
        // Full only with messages whose bodies are going out right now: ask again once they
        // are settled rather than wait out the whole window for a send that may fail.
        let why = "the frequency limit: another message to this customer is going out right now";
        (now + IN_FLIGHT_WAIT, why.to_string())
    } else if free_at > now {
        let why = format!(
            "the frequency limit: {} sent to this customer within {}",
            usage.counted.len(),
            format_duration(limit.per)
        );
        (free_at, why)
    } else if !usage.outranked_by.is_empty() && usage.outranked_by.len() >= left {
        let first = usage.outranked_by.iter().min().copied().unwrap_or(now);
        let why = "the frequency limit: a message of a higher-priority rule goes first".into();
        (first.max(now) + OUTRANKED_WAIT, why)
    } else {
        return None;
    };
    let at = rule.next_open(at, tz);
    Some(wait_or_expire(
        expires_at,
        at,
        format!("held back by {why}"),
        || {
            format!(
                "expired: held back by {why}, and it allows the next message only after expire_after runs out"
            )
        },
    ))
}

/// Due again at `at` for `reason`, or skipped (with the words `expired` gives) when that is
/// past `expires_at`: never sent late.
fn wait_or_expire<S>(
    expires_at: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
    reason: String,
    expired: impl FnOnce() -> String,
) -> Decision<S> {
    if expires_at.is_some_and(|expiry| at > expiry) {
        Decision::Skip(expired())
    } else {
        Decision::Release { at, reason }
    }
}

impl Rule {
    /// When a message triggered at `trigger_at` is due (the send window's next opening) and
    /// when it expires (`expire` later); `None` past what times can hold.
    pub fn planned_times(
        &self,
        trigger_at: DateTime<Utc>,
        tz: Tz,
        expire: chrono::TimeDelta,
    ) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let due_at = self.next_open(trigger_at, tz);
        Some((due_at, due_at.checked_add_signed(expire)?))
    }

    /// The first moment from `at` the rule lets a message go out: `at` itself, or the next
    /// opening of its send window in `tz`.
    pub fn next_open(&self, at: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        match &self.send_window {
            Some(window) => window.next_open(at, tz),
            None => at,
        }
    }

    /// The frequency limit that holds this rule's messages back, if any.
    pub fn limited(&self) -> Option<FrequencyLimit> {
        self.frequency_limit
            .filter(|_| !self.ignore_frequency_limit)
    }

    /// The event kinds of `unless = { event = KIND, since = "trigger" }`: planning leaves out
    /// events already followed by one (an anti-join), so they never become messages.
    pub fn unless_since_trigger(&self) -> Vec<String> {
        self.unless
            .iter()
            .filter_map(|u| match u {
                Unless::SinceTrigger { event } => Some(event.clone()),
                Unless::Within { .. } => None,
            })
            .collect()
    }
}

impl AttributeCondition {
    /// Whether the condition holds for these customer attributes (null counts as absent).
    pub fn holds(&self, attributes: &Value) -> bool {
        self.holds_for(attributes, None)
    }

    /// The value the condition looks at: the customer's attribute, or for `event_field` the
    /// triggering event's data field (absent when there is no event). Null counts as absent.
    pub fn seen<'v>(
        &self,
        attributes: &'v Value,
        event_data: Option<&'v Value>,
    ) -> Option<&'v Value> {
        let source = if self.event_field {
            event_data?
        } else {
            attributes
        };
        source.get(&self.attribute).filter(|v| !v.is_null())
    }

    /// Whether the condition holds for these customer attributes and this event data.
    pub fn holds_for(&self, attributes: &Value, event_data: Option<&Value>) -> bool {
        let value = self.seen(attributes, event_data);
        match &self.test {
            AttributeTest::AtMost(limit) => value.and_then(as_number).is_some_and(|v| v <= *limit),
            AttributeTest::AtLeast(limit) => value.and_then(as_number).is_some_and(|v| v >= *limit),
            AttributeTest::Exists(wanted) => value.is_some() == *wanted,
            AttributeTest::Equals(expected) => value.is_some_and(|v| json_equal(v, expected)),
            AttributeTest::In(options) => {
                value.is_some_and(|v| options.iter().any(|o| json_equal(v, o)))
            }
        }
    }
}

/// Whether every `only_if` condition holds for these attributes.
pub fn attributes_match(conditions: &[AttributeCondition], attributes: &Value) -> bool {
    conditions_match(conditions, attributes, None)
}

/// Whether every `only_if` condition holds for these attributes and the triggering event's
/// data (`None`: no event, so every `event_field` condition fails).
pub fn conditions_match(
    conditions: &[AttributeCondition],
    attributes: &Value,
    event_data: Option<&Value>,
) -> bool {
    conditions
        .iter()
        .all(|condition| condition.holds_for(attributes, event_data))
}

/// A number, or a string holding one (a CSV import gives strings).
fn as_number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// JSON equality where `1` equals `1.0`; a CSV import gives strings, so `"1"` equals `1` too.
fn json_equal(a: &Value, b: &Value) -> bool {
    use serde_json::Value::{Number, String};
    match (a, b) {
        (Number(x), Number(y)) => x.as_f64() == y.as_f64(),
        (String(s), Number(n)) | (Number(n), String(s)) => {
            s.trim().parse::<f64>().ok() == n.as_f64()
        }
        (String(s), Value::Bool(b)) | (Value::Bool(b), String(s)) => s
            .trim()
            .eq_ignore_ascii_case(if *b { "true" } else { "false" }),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chrono::TimeDelta;
    use serde_json::json;

    use super::*;

    /// A customer "c1" with an event "p1", and the events it had since (kind, at).
    struct World {
        attributes: Value,
        suppressed: bool,
        /// A suppression that has ended: (since, until).
        suppressed_during: Option<(DateTime<Utc>, DateTime<Utc>)>,
        later_events: Vec<(&'static str, DateTime<Utc>)>,
        gone: bool,
        usage: FrequencyUsage,
        planned: Option<DateTime<Utc>>,
    }

    #[derive(Debug)]
    struct Found(Value, DateTime<Utc>);

    impl Subject for Found {
        fn customer_id(&self) -> &str {
            "c1"
        }
        fn attributes(&self) -> &Value {
            &self.0
        }
        fn event(&self) -> Option<(&str, &str, DateTime<Utc>)> {
            Some(("purchase", "p1", self.1))
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
            if self.gone {
                return Ok(Err("the customer no longer exists".into()));
            }
            Ok(Ok(Found(
                self.attributes.clone(),
                at("2026-03-02T08:00:00Z"),
            )))
        }
        async fn is_suppressed(&self, _: &Found) -> Result<bool, ()> {
            Ok(self.suppressed)
        }
        async fn was_suppressed_at(&self, _: &Found, at: DateTime<Utc>) -> Result<bool, ()> {
            Ok(self
                .suppressed_during
                .is_some_and(|(from, to)| from <= at && at < to))
        }
        async fn had_event_after(
            &self,
            _: &Found,
            kind: &str,
            after: DateTime<Utc>,
        ) -> Result<bool, ()> {
            Ok(self
                .later_events
                .iter()
                .any(|(k, t)| *k == kind && *t > after))
        }
        async fn frequency_usage(
            &self,
            _: &Found,
            _: &Rule,
            _: &FrequencyLimit,
            _: DateTime<Utc>,
        ) -> Result<FrequencyUsage, ()> {
            Ok(self.usage.clone())
        }
        fn planned_for(&self) -> Option<DateTime<Utc>> {
            self.planned
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
when = { event = "purchase", after = "2h" }
only_if = [{ attribute = "plan", equals = "gold" }]
unless = [{ event = "refund", since = "trigger" }, { event = "review", within = "7d" }]
send_window = { from = "09:00", to = "17:00" }
"#;
        let (mut rules, problems) =
            super::super::parse_file(Path::new("r.toml"), source, &|_| true);
        assert!(problems.is_empty(), "{problems:?}");
        rules.remove(0)
    }

    fn world() -> World {
        World {
            attributes: json!({ "plan": "gold" }),
            suppressed: false,
            suppressed_during: None,
            later_events: vec![],
            gone: false,
            usage: FrequencyUsage::default(),
            planned: None,
        }
    }

    const MESSAGE: MessageState = MessageState {
        expires_at: None,
        attempts: 1,
        max_attempts: 3,
    };

    fn verdicts(record: &CheckRecord) -> Vec<Verdict> {
        record.checks.iter().map(|(_, v)| *v).collect()
    }

    #[tokio::test]
    async fn a_message_that_passes_records_every_check_in_the_order_it_ran() {
        let now = at("2026-03-02T10:00:00Z");
        let evaluation = evaluate(&rule(), &MESSAGE, &world(), now).await.unwrap();
        assert!(matches!(evaluation.decision, Decision::Send(_)));
        assert_eq!(
            evaluation.record.passed_lines(),
            [
                "the rule \"follow-up\" is enabled",
                "no expiry",
                "attempt 1",
                "the triggering \"purchase\" event \"p1\" still exists",
                "the address is not on the suppression list",
                "the address was not on the suppression list when the event occurred (2026-03-02 08:00 UTC)",
                "only if the customer's \"plan\" is \"gold\": held (the customer's is \"gold\")",
                "unless the customer had a \"refund\" event after the triggering one: held (no \"refund\" event after 2026-03-02 08:00 UTC)",
                "unless the customer had a \"review\" event within 1w before sending: held (no \"review\" event since 2026-02-23 10:00 UTC)",
                "between 09:00 and 17:00, in the customer's time zone: open (it was Mon 10:00 in UTC)",
            ]
        );
    }

    #[tokio::test]
    async fn the_first_failing_check_stops_the_rest_which_are_not_reached() {
        let now = at("2026-03-02T10:00:00Z");
        let mut world = world();
        world.later_events = vec![("refund", at("2026-03-02T09:00:00Z"))];
        let evaluation = evaluate(&rule(), &MESSAGE, &world, now).await.unwrap();
        let Decision::Skip(reason) = evaluation.decision else {
            panic!("{:?}", evaluation.decision);
        };
        assert_eq!(
            reason,
            "unless: the customer had a \"refund\" event since the triggering event"
        );
        use Verdict::{Failed, NotReached, Passed};
        assert_eq!(
            verdicts(&evaluation.record),
            [
                Passed, Passed, Passed, Passed, Passed, Passed, Passed, Failed, NotReached,
                NotReached
            ]
        );
    }

    #[tokio::test]
    async fn a_vanished_subject_or_a_closed_window_decide_with_the_old_reasons() {
        let mut gone = world();
        gone.gone = true;
        let now = at("2026-03-02T10:00:00Z");
        let evaluation = evaluate(&rule(), &MESSAGE, &gone, now).await.unwrap();
        assert!(
            matches!(&evaluation.decision, Decision::Skip(r) if r == "the customer no longer exists")
        );
        assert_eq!(evaluation.record.checks.len(), 10);

        let evening = at("2026-03-02T20:00:00Z");
        let evaluation = evaluate(&rule(), &MESSAGE, &world(), evening)
            .await
            .unwrap();
        let Decision::Release { at: due, reason } = evaluation.decision else {
            panic!("{:?}", evaluation.decision);
        };
        assert_eq!(
            (due, reason.as_str()),
            (at("2026-03-03T09:00:00Z"), "outside the send window")
        );
        let soon = MessageState {
            expires_at: Some(at("2026-03-02T22:00:00Z")),
            ..MESSAGE
        };
        let evaluation = evaluate(&rule(), &soon, &world(), evening).await.unwrap();
        assert!(
            matches!(evaluation.decision, Decision::Skip(r) if r.starts_with("expired: the send window"))
        );
    }

    #[tokio::test]
    async fn an_event_from_a_suppressed_period_is_skipped_after_the_address_is_allowed_again() {
        let now = at("2026-03-02T10:00:00Z");
        let mut world = world();
        world.suppressed_during = Some((at("2026-03-02T07:00:00Z"), at("2026-03-02T09:00:00Z")));
        let evaluation = evaluate(&rule(), &MESSAGE, &world, now).await.unwrap();
        let Decision::Skip(reason) = evaluation.decision else {
            panic!("{:?}", evaluation.decision);
        };
        assert!(
            reason.contains("when the triggering event occurred"),
            "{reason}"
        );
        let failed = evaluation.record.failed().unwrap();
        assert_eq!(
            failed.words(Verdict::Failed),
            "the address was on the suppression list when the event occurred (2026-03-02 08:00 UTC)"
        );
        // A period that ended before the event does not count.
        world.suppressed_during = Some((at("2026-03-01T07:00:00Z"), at("2026-03-02T07:59:00Z")));
        let evaluation = evaluate(&rule(), &MESSAGE, &world, now).await.unwrap();
        assert!(matches!(evaluation.decision, Decision::Send(_)));
    }

    #[tokio::test]
    async fn expiry_and_attempts_come_before_any_lookup() {
        let late = MessageState {
            expires_at: Some(at("2026-03-01T00:00:00Z")),
            attempts: 2,
            max_attempts: 3,
        };
        let mut gone = world();
        gone.gone = true;
        let now = at("2026-03-02T10:00:00Z");
        let evaluation = evaluate(&rule(), &late, &gone, now).await.unwrap();
        assert!(
            matches!(&evaluation.decision, Decision::Fail(r) if r.starts_with("expired while retrying"))
        );
        let tired = MessageState {
            attempts: 4,
            ..MESSAGE
        };
        let evaluation = evaluate(&rule(), &tired, &gone, now).await.unwrap();
        assert!(
            matches!(&evaluation.decision, Decision::Fail(r) if r == "gave up after 3 attempts")
        );
    }

    /// The test rule with a limit of one per 3 days, or another rule text appended.
    fn limited(extra: &str) -> Rule {
        let source = format!(
            "[[rule]]\nname = \"r\"\ntemplate = \"t\"\nsubject = \"Hi\"\n\
             when = {{ event = \"purchase\", after = \"2h\" }}\n\
             send_window = {{ from = \"09:00\", to = \"17:00\", skip_dates = [\"12-25\"] }}\n{extra}\n"
        );
        let (mut rules, problems) =
            super::super::parse_file(Path::new("r.toml"), &source, &|_| true);
        assert!(problems.is_empty(), "{problems:?}");
        rules.remove(0)
    }

    #[tokio::test]
    async fn the_frequency_limit_holds_a_message_until_the_oldest_leaves_the_window() {
        let rule = limited("frequency_limit = { max = 1, per = \"3d\" }");
        let now = at("2026-03-02T10:00:00Z");
        let evaluation = evaluate(&rule, &MESSAGE, &world(), now).await.unwrap();
        assert!(matches!(evaluation.decision, Decision::Send(_)));
        assert_eq!(
            evaluation.record.passed_lines().last().map(String::as_str),
            Some(
                "at most 1 message to a customer within 3d, across all rules: held (0 counted within 3d, none of higher priority waiting)"
            )
        );
        // One went out yesterday at 20:00: the next may go three days on, in the window.
        let mut busy = world();
        busy.usage.counted = vec![at("2026-03-01T20:00:00Z")];
        let evaluation = evaluate(&rule, &MESSAGE, &busy, now).await.unwrap();
        let Decision::Release { at: due, reason } = evaluation.decision else {
            panic!("{:?}", evaluation.decision);
        };
        assert_eq!(
            due,
            at("2026-03-05T09:00:00Z"),
            "20:00 is outside the window"
        );
        assert_eq!(
            reason,
            "held back by the frequency limit: 1 sent to this customer within 3d"
        );
        assert_eq!(
            evaluation.record.checks.last().map(|(_, v)| *v),
            Some(Verdict::Failed)
        );
        // Too late for expire_after: skipped, with the reason.
        let soon = MessageState {
            expires_at: Some(at("2026-03-03T10:00:00Z")),
            ..MESSAGE
        };
        let evaluation = evaluate(&rule, &soon, &busy, now).await.unwrap();
        assert!(
            matches!(&evaluation.decision, Decision::Skip(r) if r.starts_with("expired: held back by the frequency limit")),
            "{:?}",
            evaluation.decision
        );
        // A limit of two lets the second go.
        let two = limited("frequency_limit = { max = 2, per = \"3d\" }");
        let evaluation = evaluate(&two, &MESSAGE, &busy, now).await.unwrap();
        assert!(matches!(evaluation.decision, Decision::Send(_)));
    }

    #[tokio::test]
    async fn a_higher_priority_message_due_within_the_window_goes_first() {
        let rule = limited("frequency_limit = { max = 1, per = \"1d\" }");
        let now = at("2026-03-02T10:00:00Z");
        let mut contested = world();
        contested.usage.outranked_by = vec![at("2026-03-02T12:00:00Z")];
        let evaluation = evaluate(&rule, &MESSAGE, &contested, now).await.unwrap();
        let Decision::Release { at: due, reason } = evaluation.decision else {
            panic!("{:?}", evaluation.decision);
        };
        assert_eq!(due, at("2026-03-02T12:00:05Z"));
        assert_eq!(
            reason,
            "held back by the frequency limit: a message of a higher-priority rule goes first"
        );
        // With room for both, nothing is held back.
        let roomy = limited("frequency_limit = { max = 2, per = \"1d\" }");
        let evaluation = evaluate(&roomy, &MESSAGE, &contested, now).await.unwrap();
        assert!(matches!(evaluation.decision, Decision::Send(_)));
        // A rule that ignores the limit has no such check at all.
        let alert = limited("ignore_frequency_limit = true");
        let mut busy = contested;
        busy.usage.counted = vec![now - TimeDelta::hours(1)];
        let evaluation = evaluate(&alert, &MESSAGE, &busy, now).await.unwrap();
        assert!(matches!(evaluation.decision, Decision::Send(_)));
        assert!(
            !evaluation
                .record
                .checks
                .iter()
                .any(|(c, _)| matches!(c, Check::FrequencyLimit { .. }))
        );
    }

    #[tokio::test]
    async fn a_quiet_date_moves_the_message_and_its_why_says_so() {
        let rule = limited("");
        // Christmas, 10:00 UTC: closed for the quiet date, open on the 26th at 09:00.
        let christmas = at("2026-12-25T10:00:00Z");
        let evaluation = evaluate(&rule, &MESSAGE, &world(), christmas)
            .await
            .unwrap();
        let Decision::Release { at: due, reason } = evaluation.decision else {
            panic!("{:?}", evaluation.decision);
        };
        assert_eq!(due, at("2026-12-26T09:00:00Z"));
        assert_eq!(reason, "a quiet date (12-25) in the customer's time zone");
        // Sent on the 26th, its record says it was planned for the quiet date.
        let mut planned = world();
        planned.planned = Some(christmas);
        let evaluation = evaluate(&rule, &MESSAGE, &planned, due).await.unwrap();
        assert!(matches!(evaluation.decision, Decision::Send(_)));
        let lines = evaluation.record.passed_lines();
        assert!(
            lines.contains(
                &"planned for Fri 25 Dec 2026 10:00, a quiet date (12-25) in UTC: moved to the next allowed day"
                    .to_string()
            ),
            "{lines:#?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("except on 12-25")),
            "{lines:#?}"
        );
    }
}
