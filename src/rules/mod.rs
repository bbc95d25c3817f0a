//! Rules: what to send, to whom and when, read from `*.toml` files in the rules directory.
//!
//! Loading reports every mistake at once, each with file, line and column, and never panics on
//! what an operator wrote.

mod check;
mod detail;
pub mod explain;
mod parse;
mod rating;
#[cfg(test)]
mod tests;
pub mod why;

use std::fs;
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveTime, TimeDelta, Utc};
use chrono_tz::Tz;

use crate::calendar::{self, Anniversary, SendWindow};
use crate::diag::{Diagnostic, Diagnostics};

pub use crate::duration::{MAX_DURATION_DAYS, format_duration, parse_clock, parse_duration};
pub use check::conditions_match;
pub use check::{
    Check, CheckRecord, Decision, Evaluation, Facts, FrequencyUsage, HELD_BACK, MessageState,
    QUIET_DATE, Subject, Verdict, attributes_match, evaluate, expired, limit_decision,
};
pub use detail::{MessageDetail, SourceEvent};
pub use rating::{RatingRequest, RatingScale};

/// The rule name of the owner's digest messages (`[digest]`, see `crate::digest`): a rule file
/// cannot use it (rule names start with a letter or digit), so the two never mix.
pub const DIGEST_RULE: &str = "_digest";

/// All rules from a rules directory, in file-name order then file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
}

/// Where something was written, for messages that point the operator at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub description: Option<String>,
    /// Base name of the template pair `<template>.html.hbs` / `<template>.txt.hbs`.
    pub template: String,
    /// A Handlebars template string (not HTML-escaped).
    pub subject: String,
    pub enabled: bool,
    pub trigger: Trigger,
    pub unless: Vec<Unless>,
    pub only_if: Vec<AttributeCondition>,
    pub send_window: Option<SendWindow>,
    /// A message not sent within this of its due time is skipped as expired.
    pub expire_after: Option<TimeDelta>,
    /// Count opens with a tracking pixel (off by default, for the customer's privacy).
    pub track_opens: bool,
    /// Send links through the daemon to count clicks (off by default).
    pub track_clicks: bool,
    /// Where the rule's `[[rule]]` table starts.
    pub origin: Origin,
    /// Where the `subject` value and the `template` value are written.
    pub subject_origin: Origin,
    pub template_origin: Origin,
    /// How often one customer may hear from touchpoint, across all rules, for this rule's
    /// messages to go: the rule's own `frequency_limit`, else `[defaults] frequency_limit`
    /// (filled in by [`RuleSet::apply_defaults`]). `None`: no limit.
    pub frequency_limit: Option<FrequencyLimit>,
    /// `priority = N` (default 0): when messages to one customer compete for the allowance, the
    /// higher goes first.
    pub priority: i32,
    /// `ignore_frequency_limit = true`: never held back, and not counted toward the limit.
    /// Always true for a rule written `to = "owner"`.
    pub ignore_frequency_limit: bool,
    /// `rating = { scale = "csat" | "nps", question = "..." }`: the message asks for a rating,
    /// and its templates get `{{rating_url N}}` and `{{> rating}}`.
    pub rating: Option<RatingRequest>,
    /// `to = "owner"`: the message goes to `business.owner_email`, about the customer.
    pub to: Recipient,
}

/// Who a rule's messages go to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Recipient {
    /// `to = "customer"` (the default).
    #[default]
    Customer,
    /// `to = "owner"`: the business hears about the customer (`business.owner_email`). Such
    /// messages ignore the customer's suppression and unsubscribe state and never count toward
    /// the customer's frequency limit.
    Owner,
}

/// `frequency_limit = { max = N, per = DURATION }`: at most `max` messages to one customer
/// within any `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrequencyLimit {
    pub max: u32,
    pub per: TimeDelta,
}

impl FrequencyLimit {
    /// A limit from what was written, or what to change: `max` at least 1, `per` longer than 0.
    pub fn new(max: i64, per: TimeDelta) -> Result<FrequencyLimit, String> {
        let max = u32::try_from(max)
            .ok()
            .filter(|m| *m >= 1)
            .ok_or_else(|| format!("`max` must be a whole number from 1 up, found {max}"))?;
        if per <= TimeDelta::zero() {
            return Err("`per` must be longer than 0s, like per = \"3d\"".into());
        }
        Ok(FrequencyLimit { max, per })
    }

    /// The first moment from `now` another message may go, given the moments the counted ones
    /// went out (any order): `now` while fewer than `max` went out within `per` before it,
    /// else when enough of them have left the window.
    pub fn next_allowed(&self, counted: &[DateTime<Utc>], now: DateTime<Utc>) -> DateTime<Utc> {
        let mut within: Vec<DateTime<Utc>> = counted
            .iter()
            .copied()
            .filter(|at| *at > now - self.per)
            .collect();
        let max = self.max as usize;
        if within.len() < max {
            return now;
        }
        within.sort();
        // Once the (n - max + 1) oldest have left the window, max - 1 remain.
        within[within.len() - max] + self.per
    }
}

/// What `[defaults]` in touchpoint.toml says about every rule.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleDefaults {
    /// For rules without their own `frequency_limit` (and not ignoring it).
    pub frequency_limit: Option<FrequencyLimit>,
    /// `quiet_dates`: added to every rule's `send_window.skip_dates` (a rule without a window
    /// gets one open all day).
    pub quiet_dates: Vec<calendar::QuietDate>,
}

impl RuleSet {
    /// Fills in what `[defaults]` says for rules that do not say it themselves.
    pub fn apply_defaults(&mut self, defaults: &RuleDefaults) {
        for rule in &mut self.rules {
            if rule.frequency_limit.is_none() && !rule.ignore_frequency_limit {
                rule.frequency_limit = defaults.frequency_limit;
            }
            if defaults.quiet_dates.is_empty() {
                continue;
            }
            let window = rule.send_window.get_or_insert_with(SendWindow::all_day);
            for date in &defaults.quiet_dates {
                if !window.skip_dates.contains(date) {
                    window.skip_dates.push(*date);
                }
            }
        }
    }

    /// Rules whose messages the frequency limit neither holds back nor counts.
    pub fn ignoring_frequency_limit(&self) -> Vec<String> {
        self.rules
            .iter()
            .filter(|r| r.ignore_frequency_limit)
            .map(|r| r.name.clone())
            .collect()
    }

    /// Rules whose messages go before `rule`'s when they compete for the allowance.
    pub fn outranking(&self, rule: &Rule) -> Vec<String> {
        self.rules
            .iter()
            .filter(|r| r.priority > rule.priority && !r.ignore_frequency_limit)
            .map(|r| r.name.clone())
            .collect()
    }
}

// A schedule's parsed cron is large, but there is one trigger per rule, built once at loading.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    /// `when = { event = KIND, after = DURATION }`
    Event { kind: String, after: TimeDelta },
    /// `when = { anniversary_of = KIND, at = "HH:MM" }`: yearly, in the customer's time zone.
    Anniversary { kind: String, at: NaiveTime },
    /// `when = { schedule = CRON }`: recurring, stepped in each customer's time zone.
    Schedule {
        expression: String,
        cron: croner::Cron,
    },
}

impl Trigger {
    /// For an anniversary rule, the next anniversary (not before `not_before`, in `tz`) of an
    /// event that occurred at `occurred_at`: what planning schedules and `preview` shows.
    pub fn next_anniversary(
        &self,
        occurred_at: DateTime<Utc>,
        tz: Tz,
        not_before: DateTime<Utc>,
    ) -> Option<Anniversary> {
        let Trigger::Anniversary { at, .. } = self else {
            return None;
        };
        let date = calendar::anniversary_date(occurred_at, tz);
        calendar::next_anniversary(date, *at, tz, not_before)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unless {
    /// `{ event = KIND, since = "trigger" }`: an event of KIND after the triggering event.
    SinceTrigger { event: String },
    /// `{ event = KIND, within = DURATION }`: an event of KIND in the DURATION before the check.
    Within { event: String, within: TimeDelta },
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttributeCondition {
    /// The customer attribute's name, or the event data field's (`event_field`).
    pub attribute: String,
    pub test: AttributeTest,
    /// `event_field = NAME` rather than `attribute = NAME`: the condition tests the triggering
    /// event's data (a rating's `score`), not the customer's attributes.
    pub event_field: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttributeTest {
    Equals(serde_json::Value),
    In(Vec<serde_json::Value>),
    /// `exists = true` requires the attribute, `exists = false` requires its absence.
    Exists(bool),
    /// `at_most = N`: a number (or a string holding one) no greater than N.
    AtMost(f64),
    /// `at_least = N`: a number (or a string holding one) no less than N.
    AtLeast(f64),
}

/// Reads every `*.toml` in `dir` (sorted by file name; not recursive). `template_exists` says
/// whether a template pair of that name exists.
///
/// Files whose name starts with `.` (editor lock and backup files) and directories are skipped.
/// Every mistake in every file is returned at once, sorted by file, line and column; a directory
/// without rules files is a mistake too.
pub fn load_dir(
    dir: &Path,
    template_exists: &dyn Fn(&str) -> bool,
) -> Result<RuleSet, Diagnostics> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            return Err(Diagnostics(vec![Diagnostic::whole_file(
                dir,
                format!("cannot read the rules directory: {e}"),
            )]));
        }
    };
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                problems.push(Diagnostic::whole_file(
                    dir,
                    format!("cannot list the rules directory: {e}"),
                ));
                continue;
            }
        };
        let name = entry.file_name();
        let path = entry.path();
        let is_toml = path.extension().is_some_and(|ext| ext == "toml");
        let hidden = name.to_string_lossy().starts_with('.');
        if !is_toml || hidden {
            continue;
        }
        // Follows symbolic links: a link to a rules file counts, a link to a directory does not.
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => files.push((name, path)),
            Err(e) => problems.push(Diagnostic::whole_file(&path, format!("cannot read: {e}"))),
        }
    }
    files.sort();

    let mut loader = parse::Loader::new(template_exists);
    for (_, path) in &files {
        match fs::read_to_string(path) {
            Ok(source) => loader.file(path, &source),
            Err(e) => problems.push(Diagnostic::whole_file(path, format!("cannot read: {e}"))),
        }
    }
    if files.is_empty() && problems.is_empty() {
        problems.push(Diagnostic::whole_file(
            dir,
            "no rules files (*.toml) in the rules directory",
        ));
    }
    let (rules, mut diagnostics) = loader.finish();
    if problems.is_empty() && diagnostics.is_empty() {
        return Ok(RuleSet { rules });
    }
    diagnostics.extend(problems);
    diagnostics.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    Err(Diagnostics(diagnostics))
}

/// Parses one file's text. Returns the rules that are valid and the mistakes found (sorted by
/// line and column); never stops at the first mistake. Names are checked for uniqueness within
/// this file only; [`load_dir`] checks them across files.
pub fn parse_file(
    path: &Path,
    source: &str,
    template_exists: &dyn Fn(&str) -> bool,
) -> (Vec<Rule>, Vec<Diagnostic>) {
    let mut loader = parse::Loader::new(template_exists);
    loader.file(path, source);
    loader.finish()
}
