//! The owner's digest (`[digest]` in the config): a short summary mailed to the business on a
//! cron schedule, covering the period since the previous scheduled time.
//!
//! A digest is a message like every other: the planner inserts one row per scheduled time with
//! the dedupe key `_digest:<local slot>` (so restarts, `kill -9` and replicas never make two),
//! and the dispatcher claims it, renders it at send time (so the figures are fresh) and sends it
//! behind the same phase fence. Its rule name is [`RULE`], which no rule file can use (rule
//! names start with a letter or digit); its customer is `""`. Like a rule written
//! `to = "owner"` it ignores customers' suppressions and frequency limits.
//!
//! This module says what a digest is (its schedule, its figures, its words); it sits in the
//! engine layer beside `plan` and `dispatch`, which call it, and reads only the store, the
//! experience figures and the calendar below it.

use std::path::Path;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use crate::calendar;
use crate::diag::{Diagnostic, Diagnostics};
use crate::render::{Business, Rendered};
use crate::rules::{Origin, Recipient, Rule, Trigger};
use crate::store::{NewMessage, SharedStore, StoreResult};

/// The rule name of digest messages: not a name a rule file may use.
pub const RULE: &str = crate::rules::DIGEST_RULE;

/// How far ahead the digest looks for what is due.
pub const DUE_AHEAD: TimeDelta = TimeDelta::days(7);

/// The built-in template pair, used when `[digest]` names no `template`.
const BUILT_IN_TEXT: &str = include_str!("digest/digest.txt.hbs");
const BUILT_IN_HTML: &str = include_str!("digest/digest.html.hbs");
const DEFAULT_SUBJECT: &str = "{{business.name}}: your touchpoint digest to {{period.to}}";

/// `[digest]` as written in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestConfig {
    /// `false` stops planning digests (one already planned is skipped when due).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where the digest goes; `business.owner_email` when absent.
    #[serde(default)]
    pub to: Option<String>,
    /// Five cron fields, read in `defaults.timezone`: `"0 8 * * mon"`.
    #[serde(deserialize_with = "schedule")]
    pub schedule: Schedule,
    /// A template pair `<template>.txt.hbs` / `<template>.html.hbs` in the templates
    /// directory; the built-in one (src/digest/digest.*.hbs) when absent.
    #[serde(default)]
    pub template: Option<String>,
    /// The subject, a Handlebars template over the same context as the bodies.
    #[serde(default)]
    pub subject: Option<String>,
}

fn yes() -> bool {
    true
}

/// A parsed cron schedule and the text it was written as.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub expression: String,
    pub cron: croner::Cron,
}

impl Schedule {
    /// Five fields (minute hour day-of-month month day-of-week), like rules' `schedule`
    /// without the optional seconds.
    pub fn parse(expression: &str) -> Result<Schedule, String> {
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        match parser.parse(expression) {
            Ok(cron) => Ok(Schedule {
                expression: expression.to_string(),
                cron,
            }),
            Err(error) => Err(format!(
                "digest.schedule: bad cron schedule {expression:?}: {}; expected 5 fields (minute hour \
                 day-of-month month day-of-week) read in defaults.timezone, like \"0 8 * * mon\"",
                error.to_string().trim().trim_end_matches('.')
            )),
        }
    }
}

fn schedule<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Schedule, D::Error> {
    let text = String::deserialize(deserializer)?;
    Schedule::parse(&text).map_err(serde::de::Error::custom)
}

/// The digest as the daemon runs it: the config resolved against the business and templates.
#[derive(Debug, Clone)]
pub struct Digest {
    pub to: String,
    pub schedule: Schedule,
    /// `defaults.timezone`: the schedule's and the figures' time zone.
    pub tz: Tz,
    templates: DigestTemplates,
}

#[derive(Debug, Clone)]
struct DigestTemplates {
    subject: String,
    text: handlebars::Handlebars<'static>,
    html: handlebars::Handlebars<'static>,
}

/// One scheduled time: the digest planned for it and the period it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub at: DateTime<Utc>,
    /// The previous scheduled time: the period is `[period_start, at)`.
    pub period_start: DateTime<Utc>,
    /// The next scheduled time after `at`: a digest not sent by then is skipped, the next
    /// one says it all.
    pub expires_at: DateTime<Utc>,
    /// `_digest:2026-12-07T08:00`, the local time in the digest's zone.
    pub dedupe_key: String,
}

impl Digest {
    /// The running digest, or `None` when there is no `[digest]` or it is off. Mistakes
    /// (no address, a template that does not exist or does not render) name the config file.
    pub fn load(
        config: Option<&DigestConfig>,
        business: &Business,
        templates_dir: &Path,
        tz: Tz,
        config_path: &Path,
    ) -> Result<Option<Digest>, Diagnostics> {
        let Some(config) = config.filter(|c| c.enabled) else {
            return Ok(None);
        };
        let problem =
            |message: String| Diagnostics(vec![Diagnostic::whole_file(config_path, message)]);
        let to = match config.to.as_deref().or(business.owner_email.as_deref()) {
            Some(to) => to.trim().to_string(),
            None => {
                return Err(problem(
                    "[digest] has no address: set to = \"owner@acme.example\" in [digest] or owner_email in [business]"
                        .into(),
                ));
            }
        };
        if to.parse::<lettre::Address>().is_err() {
            return Err(problem(format!(
                "digest.to {to:?} is not an email address: write it like to = \"owner@acme.example\""
            )));
        }
        let templates = DigestTemplates::load(config, templates_dir).map_err(&problem)?;
        let digest = Digest {
            to,
            schedule: config.schedule.clone(),
            tz,
            templates,
        };
        // Strict mode only fails on what a render reaches: render a full and an empty sample.
        for sample in [Figures::sample(), Figures::default()] {
            digest
                .render(business, &sample, sample.period_start)
                .map_err(&problem)?;
        }
        Ok(Some(digest))
    }

    /// The first scheduled time after `now`, with its period. `None` when the schedule never
    /// fires again.
    pub fn next_slot(&self, now: DateTime<Utc>) -> Option<Slot> {
        let cron = &self.schedule.cron;
        let at = calendar::next_cron(cron, self.tz, now)?;
        let expires_at = calendar::next_cron(cron, self.tz, at).unwrap_or(at + TimeDelta::days(7));
        let period_start = previous_slot(cron, self.tz, at).unwrap_or(at - TimeDelta::days(7));
        let local = at.with_timezone(&self.tz).format("%Y-%m-%dT%H:%M");
        Some(Slot {
            at,
            period_start,
            expires_at,
            dedupe_key: format!("{RULE}:{local}"),
        })
    }

    /// A stand-in rule for the send path (retries, the body fence): to the owner, never held
    /// back by a frequency limit, no send window.
    pub fn rule(&self) -> Rule {
        let origin = Origin {
            file: "[digest]".into(),
            line: 0,
            column: 0,
        };
        Rule {
            name: RULE.to_string(),
            description: Some("the owner's digest ([digest] in the config)".into()),
            template: String::new(),
            subject: self.templates.subject.clone(),
            enabled: true,
            trigger: Trigger::Schedule {
                expression: self.schedule.expression.clone(),
                cron: self.schedule.cron.clone(),
            },
            unless: Vec::new(),
            only_if: Vec::new(),
            send_window: None,
            expire_after: None,
            track_opens: false,
            track_clicks: false,
            origin: origin.clone(),
            subject_origin: origin.clone(),
            template_origin: origin,
            frequency_limit: None,
            priority: 0,
            ignore_frequency_limit: true,
            rating: None,
            to: Recipient::Owner,
        }
    }

    /// The subject and both bodies for these figures.
    pub fn render(
        &self,
        business: &Business,
        figures: &Figures,
        now: DateTime<Utc>,
    ) -> Result<Rendered, String> {
        let context = figures.context(business, self.tz, now);
        let t = &self.templates;
        let subject = t
            .text
            .render_template(&t.subject, &context)
            .map_err(|e| format!("[digest] subject: {}", one_line(&e.to_string())))?;
        let text = t
            .text
            .render("text", &context)
            .map_err(|e| format!("[digest] text body: {}", one_line(&e.to_string())))?;
        let html = t
            .html
            .render("html", &context)
            .map_err(|e| format!("[digest] HTML body: {}", one_line(&e.to_string())))?;
        Ok(Rendered {
            subject: subject.split_whitespace().collect::<Vec<_>>().join(" "),
            text,
            html,
        })
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl DigestTemplates {
    fn load(config: &DigestConfig, dir: &Path) -> Result<DigestTemplates, String> {
        let (text, html) = match &config.template {
            None => (BUILT_IN_TEXT.to_string(), BUILT_IN_HTML.to_string()),
            Some(name) => {
                let read = |suffix: &str| {
                    let path = dir.join(format!("{name}.{suffix}.hbs"));
                    std::fs::read_to_string(&path).map_err(|e| {
                        format!(
                            "digest.template {name:?}: cannot read {}: {e} (the template is a pair {name}.txt.hbs and {name}.html.hbs in the templates directory)",
                            path.display()
                        )
                    })
                };
                (read("txt")?, read("html")?)
            }
        };
        let subject = config
            .subject
            .clone()
            .unwrap_or_else(|| DEFAULT_SUBJECT.to_string());
        let mut text_registry = crate::render::helper_registry(false);
        let mut html_registry = crate::render::helper_registry(true);
        let which = config.template.as_deref().unwrap_or("built-in digest");
        text_registry
            .register_template_string("text", text)
            .map_err(|e| {
                format!(
                    "digest template {which:?} (text): {}",
                    one_line(&e.to_string())
                )
            })?;
        html_registry
            .register_template_string("html", html)
            .map_err(|e| {
                format!(
                    "digest template {which:?} (HTML): {}",
                    one_line(&e.to_string())
                )
            })?;
        handlebars::Template::compile(&subject)
            .map_err(|e| format!("digest.subject: {}", one_line(&e.to_string())))?;
        Ok(DigestTemplates {
            subject,
            text: text_registry,
            html: html_registry,
        })
    }
}

/// The last scheduled time before `slot`: stepping back in doubling spans until one is found,
/// then forward to the last one before `slot` (bounded by about two years back).
fn previous_slot(cron: &croner::Cron, tz: Tz, slot: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut back = TimeDelta::minutes(1);
    while back <= TimeDelta::days(800) {
        let first = calendar::next_cron(cron, tz, slot - back).filter(|first| *first < slot);
        if let Some(mut last) = first {
            while let Some(next) = calendar::next_cron(cron, tz, last).filter(|n| *n < slot) {
                last = next;
            }
            return Some(last);
        }
        back = back * 2;
    }
    None
}

/// Plans the next digest, unless it is planned already. Returns how many rows were new (0 or 1).
pub async fn plan(store: &SharedStore, digest: &Digest, now: DateTime<Utc>) -> StoreResult<u64> {
    let Some(slot) = digest.next_slot(now) else {
        return Ok(0);
    };
    // Read first: an insert that conflicts still uses up an id on PostgreSQL, every pass.
    let keys = [slot.dedupe_key.clone()];
    if !store.existing_dedupe_keys(&keys).await?.is_empty() {
        return Ok(0);
    }
    let message = NewMessage {
        rule: RULE.to_string(),
        customer_id: String::new(),
        event_id: None,
        dedupe_key: slot.dedupe_key,
        trigger_at: slot.at,
        due_at: slot.at,
        expires_at: Some(slot.expires_at),
        detail: json!({ "period_start": slot.period_start }),
    };
    store.insert_messages(&[message]).await
}

/// The start of the period a planned digest covers, from its detail (a week before its time
/// when the detail lacks it).
pub fn period_start(detail: &Value, trigger_at: DateTime<Utc>) -> DateTime<Utc> {
    detail
        .get("period_start")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or(trigger_at - TimeDelta::days(7))
}

/// What went out for one rule in the period.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleActivity {
    pub rule: String,
    pub sent: i64,
    pub failed: i64,
    pub skipped: i64,
    /// Handed to the mail server without an answer (`unknown`).
    pub unknown: i64,
}

/// A reply nobody has answered through touchpoint yet.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitingReply {
    pub at: DateTime<Utc>,
    pub customer_id: String,
    pub customer: String,
    pub rule: Option<String>,
    pub snippet: String,
    pub customer_url: Option<String>,
}

/// Everything a digest says, read at send time.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub rules: Vec<RuleActivity>,
    pub ratings: crate::experience::Figures,
    pub rating_rules: Vec<crate::experience::RuleFigures>,
    pub waiting: Vec<WaitingReply>,
    /// Waiting messages due within [`DUE_AHEAD`], per rule.
    pub due: Vec<(String, i64)>,
}

impl Default for Figures {
    fn default() -> Self {
        // Any fixed time will do for a sample.
        let at = DateTime::<Utc>::from_timestamp(1_764_576_000, 0).unwrap_or_default();
        Figures {
            period_start: at - TimeDelta::days(7),
            period_end: at,
            rules: Vec::new(),
            ratings: crate::experience::Figures::default(),
            rating_rules: Vec::new(),
            waiting: Vec::new(),
            due: Vec::new(),
        }
    }
}

/// Reads the figures for the period `[period_start, now]`. `customer_url` gives the owner's
/// page about a customer, when the daemon has a URL.
pub async fn figures(
    store: &SharedStore,
    period_start: DateTime<Utc>,
    now: DateTime<Utc>,
    customer_url: &(dyn Fn(&str) -> Option<String> + Sync),
) -> StoreResult<Figures> {
    let rules = activity(store, period_start).await?;
    // The same figures as `touchpoint report` and the Experience page, not a second formula.
    let experience = crate::experience::experience(store, period_start, None).await?;
    let rating_rules = experience
        .rules
        .into_iter()
        .filter(|r| r.figures.rated > 0)
        .collect();
    let mut waiting = Vec::new();
    for event in store.replies_waiting(period_start).await? {
        let customer = store.customer(&event.customer_id).await?;
        let text = |key: &str| {
            event
                .data
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let (rule, snippet) = (text("rule"), text("snippet").unwrap_or_default());
        waiting.push(WaitingReply {
            at: event.occurred_at,
            customer: customer
                .map(|c| c.name.filter(|n| !n.trim().is_empty()).unwrap_or(c.email))
                .unwrap_or_else(|| event.customer_id.clone()),
            customer_url: customer_url(&event.customer_id),
            customer_id: event.customer_id,
            rule,
            snippet,
        });
    }
    let due = store
        .due_per_rule(now + DUE_AHEAD)
        .await?
        .into_iter()
        .filter(|(rule, _)| rule != RULE)
        .collect();
    Ok(Figures {
        period_start,
        period_end: now,
        rules,
        ratings: experience.total,
        rating_rules,
        waiting,
        due,
    })
}

/// Finished messages per rule since `since`, the digests themselves left out.
async fn activity(store: &SharedStore, since: DateTime<Utc>) -> StoreResult<Vec<RuleActivity>> {
    use crate::store::MessageState as S;
    let mut by_rule: std::collections::BTreeMap<String, RuleActivity> = Default::default();
    for count in store.activity(since).await? {
        if count.rule == RULE {
            continue;
        }
        let entry = by_rule
            .entry(count.rule.clone())
            .or_insert_with(|| RuleActivity {
                rule: count.rule.clone(),
                ..RuleActivity::default()
            });
        match count.state {
            S::Sent => entry.sent += count.count,
            S::Failed => entry.failed += count.count,
            S::Skipped => entry.skipped += count.count,
            S::Unknown => entry.unknown += count.count,
            _ => {}
        }
    }
    Ok(by_rule.into_values().collect())
}

/// `80%`, `66.7%`: a share as the report prints it, without a trailing `.0`.
fn percent(value: Option<f64>) -> Option<String> {
    value.map(|v| format!("{}%", trim_zero(v)))
}

/// NPS is a score from -100 to +100, signed.
fn signed(value: Option<f64>) -> Option<String> {
    value.map(|v| {
        let sign = if v > 0.0 { "+" } else { "" };
        format!("{sign}{}", trim_zero(v))
    })
}

fn trim_zero(v: f64) -> String {
    let text = format!("{v:.1}");
    text.strip_suffix(".0").map(str::to_string).unwrap_or(text)
}

impl Figures {
    /// A digest with something in every list, for checking templates.
    fn sample() -> Figures {
        let base = Figures::default();
        let ratings = crate::experience::Figures {
            sent: 12,
            rated: 5,
            replied: 2,
            csat_answers: 4,
            csat: Some(75.0),
            nps_answers: 1,
            nps: Some(100.0),
            rating_rate: Some(41.7),
            reply_rate: Some(16.7),
        };
        Figures {
            rules: vec![RuleActivity {
                rule: "thank-you".into(),
                sent: 12,
                failed: 1,
                skipped: 2,
                unknown: 1,
            }],
            rating_rules: vec![crate::experience::RuleFigures {
                rule: "thank-you".into(),
                figures: ratings.clone(),
            }],
            ratings,
            waiting: vec![WaitingReply {
                at: base.period_end - TimeDelta::days(1),
                customer_id: "c1".into(),
                customer: "Alex Morgan".into(),
                rule: Some("thank-you".into()),
                snippet: "Could you deliver on Friday instead?".into(),
                customer_url: Some("https://touchpoint.example/customers/c1".into()),
            }],
            due: vec![("follow-up".into(), 3)],
            ..base
        }
    }

    /// What the templates see; see the README's "The weekly digest" for the keys.
    fn context(&self, business: &Business, tz: Tz, now: DateTime<Utc>) -> Value {
        let local = |at: DateTime<Utc>| {
            at.with_timezone(&tz)
                .format("%a %-d %b %Y, %H:%M")
                .to_string()
        };
        let total = |f: fn(&RuleActivity) -> i64| self.rules.iter().map(f).sum::<i64>();
        json!({
            "business": {
                "name": business.name,
                "address": business.address,
                "website": business.website,
            },
            "period": {
                "from": local(self.period_start),
                "to": local(self.period_end),
                "timezone": tz.name(),
            },
            "generated_at": local(now),
            "rules": self.rules.iter().map(|r| json!({
                "rule": r.rule, "sent": r.sent, "failed": r.failed,
                "skipped": r.skipped, "unknown": r.unknown,
            })).collect::<Vec<_>>(),
            "totals": {
                "sent": total(|r| r.sent),
                "failed": total(|r| r.failed),
                "skipped": total(|r| r.skipped),
                "unknown": total(|r| r.unknown),
            },
            "ratings": rating_json(&self.ratings),
            "rating_rules": self.rating_rules.iter().map(|r| {
                let mut value = rating_json(&r.figures);
                value["rule"] = json!(r.rule);
                value
            }).collect::<Vec<_>>(),
            "replies_waiting": self.waiting.iter().map(|w| json!({
                "at": local(w.at),
                "customer_id": w.customer_id,
                "customer": w.customer,
                "rule": w.rule,
                "snippet": w.snippet,
                "customer_url": w.customer_url,
            })).collect::<Vec<_>>(),
            "due": self.due.iter().map(|(rule, count)| json!({ "rule": rule, "count": count })).collect::<Vec<_>>(),
            "due_total": self.due.iter().map(|(_, n)| n).sum::<i64>(),
        })
    }
}

fn rating_json(figures: &crate::experience::Figures) -> Value {
    json!({
        "rated": figures.rated,
        "csat": percent(figures.csat),
        "csat_answers": figures.csat_answers,
        "nps": signed(figures.nps),
        "nps_answers": figures.nps_answers,
        "replied": figures.replied,
        "csat_answers_text": answers(figures.csat_answers),
        "nps_answers_text": answers(figures.nps_answers),
    })
}

fn answers(n: i64) -> String {
    if n == 1 {
        "1 answer".into()
    } else {
        format!("{n} answers")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(expression: &str, tz: Tz) -> Digest {
        let config = DigestConfig {
            enabled: true,
            to: Some("owner@acme.example".into()),
            schedule: Schedule::parse(expression).unwrap(),
            template: None,
            subject: None,
        };
        let business = Business {
            name: "Acme".into(),
            address: "1 Main St".into(),
            website: None,
            owner_email: None,
        };
        Digest::load(
            Some(&config),
            &business,
            Path::new("/nonexistent"),
            tz,
            Path::new("t.toml"),
        )
        .unwrap()
        .unwrap()
    }

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn the_next_weekly_digest_keeps_local_time_across_spring_forward() {
        let d = digest("0 8 * * mon", chrono_tz::Europe::Berlin);
        // Friday before the change (29 March 2026, 02:00 -> 03:00 in Berlin).
        let slot = d.next_slot(utc("2026-03-27T12:00:00Z")).unwrap();
        assert_eq!(slot.at, utc("2026-03-30T06:00:00Z"), "08:00 CEST");
        assert_eq!(slot.period_start, utc("2026-03-23T07:00:00Z"), "08:00 CET");
        assert_eq!(slot.expires_at, utc("2026-04-06T06:00:00Z"));
        assert_eq!(slot.dedupe_key, "_digest:2026-03-30T08:00");
        // The period is a week less the hour the clocks lost.
        assert_eq!(slot.at - slot.period_start, TimeDelta::hours(7 * 24 - 1));
    }

    #[test]
    fn the_next_digest_keeps_local_time_across_fall_back_in_new_york() {
        let d = digest("0 8 * * mon", chrono_tz::America::New_York);
        // 1 November 2026, 02:00 EDT -> 01:00 EST.
        let slot = d.next_slot(utc("2026-10-31T12:00:00Z")).unwrap();
        assert_eq!(slot.at, utc("2026-11-02T13:00:00Z"), "08:00 EST");
        assert_eq!(slot.period_start, utc("2026-10-26T12:00:00Z"), "08:00 EDT");
        assert_eq!(slot.dedupe_key, "_digest:2026-11-02T08:00");
    }

    #[test]
    fn a_time_in_the_gap_moves_forward_and_is_planned_once() {
        let d = digest("30 2 * * *", chrono_tz::Europe::Berlin);
        let slot = d.next_slot(utc("2026-03-28T12:00:00Z")).unwrap();
        // 02:30 does not exist on 29 March: it is sent at 03:30 CEST (01:30 UTC).
        assert_eq!(slot.at, utc("2026-03-29T01:30:00Z"));
        assert_eq!(slot.dedupe_key, "_digest:2026-03-29T03:30");
        let after = d.next_slot(slot.at).unwrap();
        assert_eq!(after.at, utc("2026-03-30T00:30:00Z"));
        assert_eq!(after.period_start, slot.at);
    }

    #[test]
    fn every_pass_within_a_period_plans_the_same_slot() {
        let d = digest("0 8 * * mon", chrono_tz::Europe::Berlin);
        let first = d.next_slot(utc("2026-12-01T09:00:00Z")).unwrap();
        let later = d.next_slot(utc("2026-12-07T06:59:59Z")).unwrap();
        assert_eq!(first, later);
        let next = d.next_slot(first.at).unwrap();
        assert_eq!(next.period_start, first.at);
        assert_ne!(next.dedupe_key, first.dedupe_key);
    }

    #[test]
    fn a_bad_schedule_says_what_is_expected() {
        let error = Schedule::parse("0 8 * mon").unwrap_err();
        assert!(error.contains("digest.schedule"), "{error}");
        assert!(error.contains("expected 5 fields"), "{error}");
        assert!(
            Schedule::parse("0 0 8 * * mon").is_err(),
            "no seconds field"
        );
    }

    #[test]
    fn a_digest_needs_an_address_and_templates_that_render() {
        let business = Business {
            name: "Acme".into(),
            address: "1 Main St".into(),
            website: None,
            owner_email: None,
        };
        let config =
            |to: Option<&str>, template: Option<&str>, subject: Option<&str>| DigestConfig {
                enabled: true,
                to: to.map(str::to_string),
                schedule: Schedule::parse("0 8 * * mon").unwrap(),
                template: template.map(str::to_string),
                subject: subject.map(str::to_string),
            };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("mine.txt.hbs"),
            "{{period.from}} {{misspelt}}",
        )
        .unwrap();
        std::fs::write(dir.path().join("mine.html.hbs"), "<p>{{period.from}}</p>").unwrap();
        let load = |c: &DigestConfig| {
            Digest::load(
                Some(c),
                &business,
                dir.path(),
                chrono_tz::UTC,
                Path::new("t.toml"),
            )
            .map(|_| ())
            .map_err(|d| d.to_string())
        };
        let owner = Some("owner@acme.example");
        for (config, expected) in [
            (config(None, None, None), "[digest] has no address"),
            (
                config(Some("nobody"), None, None),
                "digest.to \"nobody\" is not an email address",
            ),
            (
                config(owner, Some("nope"), None),
                "digest.template \"nope\": cannot read",
            ),
            (config(owner, None, Some("{{#if x}}")), "digest.subject"),
            (config(owner, Some("mine"), None), "[digest] text body"),
        ] {
            let error = load(&config).unwrap_err();
            assert!(error.contains(expected), "{expected:?} not in {error}");
        }
        let off = DigestConfig {
            enabled: false,
            ..config(None, None, None)
        };
        assert!(matches!(
            Digest::load(
                Some(&off),
                &business,
                dir.path(),
                chrono_tz::UTC,
                Path::new("t.toml")
            ),
            Ok(None)
        ));
    }

    #[test]
    fn figures_render_with_shares_and_signed_nps() {
        let d = digest("0 8 * * mon", chrono_tz::UTC);
        let business = Business {
            name: "Acme".into(),
            address: "1 Main St".into(),
            website: None,
            owner_email: None,
        };
        let sample = Figures::sample();
        let rendered = d.render(&business, &sample, sample.period_end).unwrap();
        assert!(
            rendered
                .text
                .contains("thank-you: 12 sent, 1 failed, 2 skipped"),
            "{}",
            rendered.text
        );
        assert!(
            rendered.text.contains("CSAT 75% of 4 answers"),
            "{}",
            rendered.text
        );
        assert!(
            rendered.text.contains("NPS +100 from 1 answer"),
            "{}",
            rendered.text
        );
        assert!(
            rendered
                .text
                .contains("Could you deliver on Friday instead?")
        );
        assert!(rendered.text.contains("follow-up: 3"));
        assert!(rendered.html.contains("Alex Morgan"));
        assert!(rendered.subject.starts_with("Acme: your touchpoint digest"));
    }
}
