//! From the text of a rules file to typed [`Rule`]s, with every mistake reported at its place.
//!
//! The TOML is read with `toml_edit`, which keeps the byte span of every key and value, so each
//! diagnostic points at the exact key or value to fix. A mistake never stops the reading: the
//! rest of the rule and the rest of the file are still checked, and only rules without mistakes
//! are returned.

use std::collections::HashMap;
use std::path::Path;

use chrono::{NaiveTime, TimeDelta, Weekday};
use croner::parser::{CronParser, Seconds, Year};
use toml_edit::{ImDocument, Item, TableLike, Value};

use super::{
    AttributeCondition, AttributeTest, FrequencyLimit, Origin, RatingRequest, RatingScale,
    Recipient, Rule, Trigger, Unless,
};
use crate::calendar::{QuietDate, SendWindow};
use crate::diag::{Diagnostic, line_column};
use crate::duration::{parse_clock, parse_duration};

const RULE_KEYS: &[&str] = &[
    "name",
    "description",
    "template",
    "subject",
    "enabled",
    "when",
    "unless",
    "only_if",
    "send_window",
    "expire_after",
    "track_opens",
    "track_clicks",
    "frequency_limit",
    "priority",
    "ignore_frequency_limit",
    "rating",
    "to",
];
const RATING_KEYS: &[&str] = &["scale", "question"];
const RATING_FORM: &str = "{ scale = \"csat\" } (1 to 5) or { scale = \"nps\" } (0 to 10), with an \
     optional question = \"How did we do?\"";
const WHEN_KEYS: &[&str] = &["event", "after", "anniversary_of", "at", "schedule"];
const UNLESS_KEYS: &[&str] = &["event", "since", "within"];
const ONLY_IF_KEYS: &[&str] = &[
    "attribute",
    "event_field",
    "equals",
    "in",
    "exists",
    "at_most",
    "at_least",
];
const ONLY_IF_TESTS: [&str; 5] = ["equals", "in", "exists", "at_most", "at_least"];
const WINDOW_KEYS: &[&str] = &["from", "to", "days", "skip_dates"];
const LIMIT_KEYS: &[&str] = &["max", "per"];
const LIMIT_FORM: &str = "{ max = 1, per = \"3d\" }";

const WHEN_FORMS: &str = "{ event = KIND, after = DURATION }, \
     { anniversary_of = KIND, at = \"HH:MM\" } or { schedule = CRON }";
const UNLESS_FORMS: &str =
    "{ event = KIND, since = \"trigger\" } or { event = KIND, within = DURATION }";
const ONLY_IF_FORMS: &str = "{ attribute = NAME, equals = VALUE }, \
     { attribute = NAME, in = [VALUES] }, { attribute = NAME, exists = true|false }, \
     { attribute = NAME, at_most = N } or { attribute = NAME, at_least = N } (or event_field = \
     NAME instead of attribute, to test the triggering event's data)";

/// Reads rules files one after the other, remembering rule names across files so that a name
/// used twice is reported at its second use.
pub(super) struct Loader<'t> {
    template_exists: &'t dyn Fn(&str) -> bool,
    names: HashMap<String, Origin>,
    pub(super) rules: Vec<Rule>,
    pub(super) diagnostics: Vec<Diagnostic>,
}

impl<'t> Loader<'t> {
    pub(super) fn new(template_exists: &'t dyn Fn(&str) -> bool) -> Self {
        Loader {
            template_exists,
            names: HashMap::new(),
            rules: Vec::new(),
            diagnostics: Vec::new(),
        }
    }

    /// Reads one file's text, adding its valid rules and its mistakes.
    pub(super) fn file(&mut self, path: &Path, source: &str) {
        let mut cx = Cx {
            path,
            source,
            template_exists: self.template_exists,
            names: &mut self.names,
            diags: &mut self.diagnostics,
        };
        let rules = cx.file();
        self.rules.extend(rules);
    }

    /// The valid rules and every mistake, sorted by file, line and column.
    pub(super) fn finish(mut self) -> (Vec<Rule>, Vec<Diagnostic>) {
        self.diagnostics
            .sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        (self.rules, self.diagnostics)
    }
}

/// One key of a table with its value and where both are written.
#[derive(Clone, Copy)]
struct Entry<'d> {
    key: &'d str,
    item: &'d Item,
    /// Byte offset of the value (of the key when the value has no span of its own).
    at: usize,
}

/// The known keys of a table; unknown ones have already been reported.
struct Fields<'d> {
    entries: Vec<Entry<'d>>,
}

impl<'d> Fields<'d> {
    fn get(&self, key: &str) -> Option<Entry<'d>> {
        self.entries.iter().find(|e| e.key == key).copied()
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// What a rule says about the frequency limit.
struct Limits {
    frequency_limit: Option<FrequencyLimit>,
    priority: i32,
    ignore_frequency_limit: bool,
}

/// The reading of one file.
struct Cx<'a> {
    path: &'a Path,
    source: &'a str,
    template_exists: &'a dyn Fn(&str) -> bool,
    names: &'a mut HashMap<String, Origin>,
    diags: &'a mut Vec<Diagnostic>,
}

impl Cx<'_> {
    fn error(&mut self, offset: usize, message: impl Into<String>) {
        self.diags.push(Diagnostic::at_offset(
            self.path,
            self.source,
            offset,
            message,
        ));
    }

    fn origin(&self, offset: usize) -> Origin {
        let (line, column) = line_column(self.source, offset);
        Origin {
            file: self.path.to_path_buf(),
            line,
            column,
        }
    }

    fn file(&mut self) -> Vec<Rule> {
        let doc = match ImDocument::parse(self.source) {
            Ok(doc) => doc,
            Err(e) => {
                let at = e.span().map_or(0, |span| span.start);
                self.error(at, format!("invalid TOML: {}", one_line(e.message())));
                return Vec::new();
            }
        };
        let root = doc.as_table();
        let mut rules = Vec::new();
        let mut tables_found = 0;
        let mut rule_key_reported = false;
        for (key, item) in root.iter() {
            let key_at = root
                .key(key)
                .and_then(|k| k.span())
                .map_or(0, |span| span.start);
            if key != "rule" {
                self.error(
                    key_at,
                    format!(
                        "unknown top-level key `{key}`: a rules file holds only [[rule]] tables \
                         (is a [[rule]] line missing above it?)"
                    ),
                );
                continue;
            }
            let before = self.diags.len();
            let tables = self.tables(item, key_at, "rule", "[[rule]] tables");
            rule_key_reported = self.diags.len() != before;
            tables_found += tables.len();
            for (table, at) in tables {
                if let Some(rule) = self.rule(table, at) {
                    rules.push(rule);
                }
            }
        }
        if tables_found == 0 && !rule_key_reported {
            self.diags.push(Diagnostic::whole_file(
                self.path,
                "no rules: a rules file holds one or more [[rule]] tables",
            ));
        }
        rules
    }

    /// The tables of an array of tables (`[[rule]]` or `[{ ... }, { ... }]`), each with the
    /// offset of its header or opening brace.
    fn tables<'d>(
        &mut self,
        item: &'d Item,
        fallback: usize,
        key: &str,
        expected: &str,
    ) -> Vec<(&'d dyn TableLike, usize)> {
        let mut out: Vec<(&'d dyn TableLike, usize)> = Vec::new();
        match item {
            Item::ArrayOfTables(array) => {
                for table in array.iter() {
                    out.push((table, table.span().map_or(fallback, |span| span.start)));
                }
            }
            Item::Value(Value::Array(array)) => {
                for value in array.iter() {
                    let at = value.span().map_or(fallback, |span| span.start);
                    match value {
                        Value::InlineTable(table) => out.push((table, at)),
                        other => self.error(
                            at,
                            format!(
                                "expected a table in `{key}`, found {}",
                                describe_value(other)
                            ),
                        ),
                    }
                }
            }
            other => {
                let at = other.span().map_or(fallback, |span| span.start);
                let found = if key == "rule" && other.is_table() {
                    "a single [rule] table (use double brackets: [[rule]])".to_string()
                } else {
                    describe(other).to_string()
                };
                self.error(
                    at,
                    format!("expected {expected} for `{key}`, found {found}"),
                );
            }
        }
        out
    }

    /// The known keys of `table`, reporting the others.
    fn fields<'d>(
        &mut self,
        table: &'d dyn TableLike,
        fallback: usize,
        context: &str,
        allowed: &[&str],
    ) -> Fields<'d> {
        let mut entries = Vec::new();
        for (key, item) in table.iter() {
            let key_at = table
                .key(key)
                .and_then(|k| k.span())
                .map_or(fallback, |span| span.start);
            if allowed.contains(&key) {
                let at = item.span().map_or(key_at, |span| span.start);
                entries.push(Entry { key, item, at });
            } else {
                let hint = closest(key, allowed)
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                self.error(
                    key_at,
                    format!(
                        "unknown key `{key}` in {context}{hint}; expected one of: {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
        Fields { entries }
    }

    fn string<'d>(&mut self, e: Entry<'d>) -> Option<&'d str> {
        match e.item.as_str() {
            Some(s) => Some(s),
            None => {
                self.error(
                    e.at,
                    format!(
                        "expected a string for `{}`, found {}",
                        e.key,
                        describe(e.item)
                    ),
                );
                None
            }
        }
    }

    /// A string that is not empty and has no spaces around it (event kinds, attribute names).
    fn name_like(&mut self, e: Entry<'_>, what: &str) -> Option<String> {
        let s = self.string(e)?;
        if s.trim().is_empty() {
            self.error(e.at, format!("`{}` is empty: expected {what}", e.key));
            None
        } else if s.trim() != s {
            self.error(
                e.at,
                format!("`{}` has spaces around \"{s}\": expected {what}", e.key),
            );
            None
        } else {
            Some(s.to_string())
        }
    }

    fn boolean(&mut self, e: Entry<'_>) -> Option<bool> {
        match e.item.as_bool() {
            Some(b) => Some(b),
            None => {
                self.error(
                    e.at,
                    format!(
                        "expected a boolean (true or false) for `{}`, found {}",
                        e.key,
                        describe(e.item)
                    ),
                );
                None
            }
        }
    }

    fn duration(&mut self, e: Entry<'_>) -> Option<TimeDelta> {
        let text = self.string(e)?;
        match parse_duration(text) {
            Ok(d) => Some(d),
            Err(why) => {
                self.error(
                    e.at,
                    format!("bad duration \"{text}\" for {}: {why}", e.key),
                );
                None
            }
        }
    }

    /// A duration longer than zero (`within`, `expire_after`).
    fn positive_duration(&mut self, e: Entry<'_>) -> Option<TimeDelta> {
        let d = self.duration(e)?;
        if d <= TimeDelta::zero() {
            self.error(e.at, format!("{} must be longer than 0s", e.key));
            return None;
        }
        Some(d)
    }

    fn clock(&mut self, e: Entry<'_>) -> Option<NaiveTime> {
        let text = self.string(e)?;
        match parse_clock(text) {
            Ok(t) => Some(t),
            Err(why) => {
                self.error(e.at, format!("bad time \"{text}\" for {}: {why}", e.key));
                None
            }
        }
    }

    fn table<'d>(&mut self, e: Entry<'d>, example: &str) -> Option<&'d dyn TableLike> {
        let table = e.item.as_table_like();
        if table.is_none() {
            self.error(
                e.at,
                format!(
                    "expected a table for `{}`, like {example}, found {}",
                    e.key,
                    describe(e.item)
                ),
            );
        }
        table
    }

    fn rule(&mut self, table: &dyn TableLike, header: usize) -> Option<Rule> {
        let before = self.diags.len();
        let f = self.fields(table, header, "rule", RULE_KEYS);

        let name = match f.get("name") {
            Some(e) => self.rule_name(e),
            None => {
                self.error(
                    header,
                    "rule is missing `name`: give it a unique name like name = \"thank-you-after-purchase\"",
                );
                None
            }
        };
        let label = name
            .as_deref()
            .map_or_else(|| "rule".to_string(), |n| format!("rule `{n}`"));

        let description = match f.get("description") {
            Some(e) => self.string(e).map(|s| Some(s.to_string())),
            None => Some(None),
        };
        let template = match f.get("template") {
            Some(e) => self.template(e),
            None => {
                self.error(
                    header,
                    format!(
                        "{label} is missing `template`: the base name of a template pair \
                         templates/NAME.html.hbs and templates/NAME.txt.hbs, like template = \"thank-you\""
                    ),
                );
                None
            }
        };
        let subject = match f.get("subject") {
            Some(e) => self.subject(e),
            None => {
                self.error(
                    header,
                    format!("{label} is missing `subject`: the email subject, like subject = \"Thank you, {{{{customer.first_name}}}}\""),
                );
                None
            }
        };
        let enabled = match f.get("enabled") {
            Some(e) => self.boolean(e),
            None => Some(true),
        };
        let trigger = match f.get("when") {
            Some(e) => self.when(e),
            None => {
                self.error(
                    header,
                    format!("{label} is missing `when`: expected one of {WHEN_FORMS}"),
                );
                None
            }
        };
        let unless = match f.get("unless") {
            Some(e) => self.unless(e, trigger.as_ref()),
            None => Some(Vec::new()),
        };
        let only_if = match f.get("only_if") {
            Some(e) => self.only_if(e),
            None => Some(Vec::new()),
        };
        let send_window = match f.get("send_window") {
            Some(e) => self.send_window(e).map(Some),
            None => Some(None),
        };
        let expire_after = match f.get("expire_after") {
            Some(e) => self.positive_duration(e).map(Some),
            None => Some(None),
        };
        let track_opens = match f.get("track_opens") {
            Some(e) => self.boolean(e),
            None => Some(false),
        };
        let track_clicks = match f.get("track_clicks") {
            Some(e) => self.boolean(e),
            None => Some(false),
        };
        let to = match f.get("to") {
            Some(e) => self.recipient(e),
            None => Some(Recipient::Customer),
        };
        let limits = self.limits(&f, to);
        let rating = match f.get("rating") {
            Some(e) => self.rating(e).map(Some),
            None => Some(None),
        };

        if self.diags.len() != before {
            return None;
        }
        let Limits {
            frequency_limit,
            priority,
            ignore_frequency_limit,
        } = limits?;
        let rating = rating?;
        let to = to?;
        let (
            Some(name),
            Some(description),
            Some((template, template_origin)),
            Some((subject, subject_origin)),
            Some(enabled),
            Some(trigger),
            Some(unless),
            Some(only_if),
            Some(send_window),
            Some(expire_after),
            Some(track_opens),
            Some(track_clicks),
        ) = (
            name,
            description,
            template,
            subject,
            enabled,
            trigger,
            unless,
            only_if,
            send_window,
            expire_after,
            track_opens,
            track_clicks,
        )
        else {
            return None;
        };
        Some(Rule {
            name,
            description,
            template,
            subject,
            enabled,
            trigger,
            unless,
            only_if,
            send_window,
            expire_after,
            track_opens,
            track_clicks,
            origin: self.origin(header),
            subject_origin,
            template_origin,
            frequency_limit,
            priority,
            ignore_frequency_limit,
            rating,
            to,
        })
    }

    /// `rating = { scale = "csat" | "nps", question = "..." }`.
    fn rating(&mut self, e: Entry<'_>) -> Option<RatingRequest> {
        let table = self.table(e, RATING_FORM)?;
        let before = self.diags.len();
        let f = self.fields(table, e.at, "rating", RATING_KEYS);
        let scale = match f.get("scale") {
            Some(x) => {
                let name = self.string(x)?;
                let scale = RatingScale::parse(name);
                if scale.is_none() {
                    self.error(
                        x.at,
                        format!("unknown rating scale {name:?}: expected {RATING_FORM}"),
                    );
                }
                scale
            }
            None => {
                self.error(
                    e.at,
                    format!("rating is missing `scale`: expected {RATING_FORM}"),
                );
                None
            }
        };
        let question = match f.get("question") {
            Some(x) => self.string(x).map(|q| Some(q.to_string())),
            None => Some(None),
        };
        if self.diags.len() != before {
            return None;
        }
        Some(RatingRequest {
            scale: scale?,
            question: question?,
        })
    }

    /// `to = "customer"` or `to = "owner"`.
    fn recipient(&mut self, e: Entry<'_>) -> Option<Recipient> {
        match e.item.as_str() {
            Some("customer") => Some(Recipient::Customer),
            Some("owner") => Some(Recipient::Owner),
            _ => {
                let found = describe(e.item);
                self.error(
                    e.at,
                    format!("expected \"customer\" or \"owner\" for `to`, found {found}"),
                );
                None
            }
        }
    }

    /// `frequency_limit`, `priority` and `ignore_frequency_limit`, which must not contradict;
    /// a rule to the owner never counts toward a customer's limit.
    fn limits(&mut self, f: &Fields<'_>, to: Option<Recipient>) -> Option<Limits> {
        let frequency_limit = match f.get("frequency_limit") {
            Some(e) => self.frequency_limit(e).map(Some),
            None => Some(None),
        };
        let priority = match f.get("priority") {
            Some(e) => self.priority(e),
            None => Some(0),
        };
        let ignore = f.get("ignore_frequency_limit");
        let ignore_frequency_limit = match ignore {
            Some(e) => self.boolean(e),
            None => Some(false),
        };
        if let (Some(Some(_)), Some(true), Some(e)) =
            (frequency_limit, ignore_frequency_limit, ignore)
        {
            self.error(
                e.at,
                "the rule sets both `frequency_limit` and `ignore_frequency_limit = true`: keep one",
            );
            return None;
        }
        let to_owner = to == Some(Recipient::Owner);
        if let (Some(Some(_)), true, Some(e)) =
            (frequency_limit, to_owner, f.get("frequency_limit"))
        {
            self.error(
                e.at,
                "a rule with to = \"owner\" writes to the business, not the customer: it has no frequency_limit",
            );
            return None;
        }
        Some(Limits {
            frequency_limit: frequency_limit?,
            priority: priority?,
            ignore_frequency_limit: ignore_frequency_limit? || to_owner,
        })
    }

    /// `{ max = N, per = DURATION }`.
    fn frequency_limit(&mut self, e: Entry<'_>) -> Option<FrequencyLimit> {
        let table = self.table(e, LIMIT_FORM)?;
        let f = self.fields(table, e.at, "frequency_limit", LIMIT_KEYS);
        let (Some(max), Some(per)) = (f.get("max"), f.get("per")) else {
            let missing = if f.has("max") { "per" } else { "max" };
            self.error(
                e.at,
                format!("frequency_limit is missing `{missing}`: expected {LIMIT_FORM}"),
            );
            return None;
        };
        let Some(count) = max.item.as_integer() else {
            let found = describe(max.item);
            self.error(
                max.at,
                format!("expected a whole number for `max`, like max = 1, found {found}"),
            );
            return None;
        };
        let per_at = per.at;
        let per = self.duration(per)?;
        match FrequencyLimit::new(count, per) {
            Ok(limit) => Some(limit),
            Err(why) => {
                let at = if per <= TimeDelta::zero() {
                    per_at
                } else {
                    max.at
                };
                self.error(at, format!("bad frequency_limit: {why}"));
                None
            }
        }
    }

    fn priority(&mut self, e: Entry<'_>) -> Option<i32> {
        let value = e.item.as_integer();
        match value.and_then(|n| i32::try_from(n).ok()) {
            Some(n) => Some(n),
            None => {
                let found = value.map_or_else(|| describe(e.item).to_string(), |n| n.to_string());
                self.error(
                    e.at,
                    format!(
                        "expected a whole number for `priority` (higher goes first, default 0), like priority = 10, found {found}"
                    ),
                );
                None
            }
        }
    }

    /// `skip_dates = ["12-25", "2026-12-31"]`.
    fn skip_dates(&mut self, e: Entry<'_>) -> Option<Vec<QuietDate>> {
        let Some(array) = e.item.as_array() else {
            self.error(
                e.at,
                format!(
                    "expected a list of dates for `skip_dates`, like skip_dates = [\"12-25\", \"2026-12-31\"], found {}",
                    describe(e.item)
                ),
            );
            return None;
        };
        let before = self.diags.len();
        let mut dates = Vec::new();
        for value in array.iter() {
            let at = value.span().map_or(e.at, |span| span.start);
            match value.as_str().map(QuietDate::parse) {
                Some(Ok(date)) if !dates.contains(&date) => dates.push(date),
                Some(Ok(_)) => {}
                Some(Err(why)) => self.error(at, format!("in `skip_dates`: {why}")),
                None => self.error(
                    at,
                    format!(
                        "expected a date string in `skip_dates`, like \"12-25\", found {}",
                        describe_value(value)
                    ),
                ),
            }
        }
        (self.diags.len() == before).then_some(dates)
    }

    /// The rule's name, checked and recorded; a name already used is reported here.
    fn rule_name(&mut self, e: Entry<'_>) -> Option<String> {
        let name = self.string(e)?;
        if let Err(why) = check_identifier(name) {
            self.error(e.at, format!("bad rule name \"{name}\": {why}"));
            return None;
        }
        if let Some(first) = self.names.get(name) {
            let message = format!(
                "duplicate rule name `{name}`: already used at {}:{}",
                first.file.display(),
                first.line
            );
            self.error(e.at, message);
            return None;
        }
        let origin = self.origin(e.at);
        self.names.insert(name.to_string(), origin);
        Some(name.to_string())
    }

    fn template(&mut self, e: Entry<'_>) -> Option<(String, Origin)> {
        let name = self.string(e)?;
        if let Err(why) = check_identifier(name) {
            self.error(e.at, format!("bad template name \"{name}\": {why}"));
            return None;
        }
        if !(self.template_exists)(name) {
            self.error(
                e.at,
                format!("no template `{name}`: expected templates/{name}.html.hbs and templates/{name}.txt.hbs"),
            );
            return None;
        }
        Some((name.to_string(), self.origin(e.at)))
    }

    fn subject(&mut self, e: Entry<'_>) -> Option<(String, Origin)> {
        let subject = self.string(e)?;
        if subject.trim().is_empty() {
            self.error(
                e.at,
                "the subject is empty: expected the text of the email's subject line",
            );
            return None;
        }
        if subject.contains(['\n', '\r']) {
            self.error(
                e.at,
                "the subject has a line break: a subject must be one line",
            );
            return None;
        }
        // Other control characters cannot go into the Subject header either.
        if let Err(problem) = crate::import::check_header_text("subject", subject) {
            self.error(
                e.at,
                format!("{problem}: a subject must be one line of text"),
            );
            return None;
        }
        if let Err(err) = handlebars::Template::compile(subject) {
            let place = err
                .pos()
                .map(|(_, column)| format!(" (near character {column})"))
                .unwrap_or_default();
            self.error(
                e.at,
                format!(
                    "bad Handlebars in subject{place}: {}",
                    one_line(&err.reason().to_string())
                ),
            );
            return None;
        }
        Some((subject.to_string(), self.origin(e.at)))
    }

    fn when(&mut self, e: Entry<'_>) -> Option<Trigger> {
        let table = self.table(e, "{ event = \"purchase\", after = \"2h\" }")?;
        let f = self.fields(table, e.at, "when", WHEN_KEYS);
        let event = f.has("event") || f.has("after");
        let anniversary = f.has("anniversary_of") || f.has("at");
        let schedule = f.has("schedule");
        let kinds = usize::from(event) + usize::from(anniversary) + usize::from(schedule);
        if kinds != 1 {
            let found = if kinds == 0 {
                "but has none".to_string()
            } else {
                let keys: Vec<String> = f.entries.iter().map(|x| format!("`{}`", x.key)).collect();
                format!("but mixes {}", keys.join(", "))
            };
            self.error(
                e.at,
                format!(
                    "`when` needs exactly one kind of trigger {found}; expected one of {WHEN_FORMS}"
                ),
            );
            return None;
        }
        if event {
            let kind = match f.get("event") {
                Some(x) => self.name_like(x, "the kind of event, like event = \"purchase\""),
                None => {
                    self.error(e.at, "`when` has `after` but no `event`: expected { event = KIND, after = DURATION }");
                    None
                }
            };
            let after = match f.get("after") {
                Some(x) => self.duration(x),
                None => {
                    self.error(
                        e.at,
                        "`when` with `event` is missing `after`: say how long after the event to send, \
                         like after = \"2h\" (\"0s\" for right away)",
                    );
                    None
                }
            };
            Some(Trigger::Event {
                kind: kind?,
                after: after?,
            })
        } else if anniversary {
            let kind = match f.get("anniversary_of") {
                Some(x) => self.name_like(
                    x,
                    "the kind of event or a date attribute, like anniversary_of = \"wedding\"",
                ),
                None => {
                    self.error(e.at, "`when` has `at` but no `anniversary_of`: expected { anniversary_of = KIND, at = \"HH:MM\" }");
                    None
                }
            };
            let at = match f.get("at") {
                Some(x) => self.clock(x),
                None => {
                    self.error(
                        e.at,
                        "`when` with `anniversary_of` is missing `at`: the time of day to send, like at = \"09:00\"",
                    );
                    None
                }
            };
            Some(Trigger::Anniversary {
                kind: kind?,
                at: at?,
            })
        } else {
            let x = f.get("schedule")?;
            let expression = self.string(x)?;
            let parser = CronParser::builder()
                .seconds(Seconds::Optional)
                .year(Year::Disallowed)
                .build();
            match parser.parse(expression) {
                Ok(cron) => Some(Trigger::Schedule {
                    expression: expression.to_string(),
                    cron,
                }),
                Err(err) => {
                    self.error(
                        x.at,
                        format!(
                            "bad cron schedule \"{expression}\": {}; expected 5 fields (minute hour \
                             day-of-month month day-of-week, like \"0 9 * * mon\") or 6 with seconds first",
                            one_line(&err.to_string()).trim_end_matches('.')
                        ),
                    );
                    None
                }
            }
        }
    }

    /// `unless = [...]`; `trigger` is the rule's trigger when it is valid.
    fn unless(&mut self, e: Entry<'_>, trigger: Option<&Trigger>) -> Option<Vec<Unless>> {
        let before = self.diags.len();
        let mut out = Vec::new();
        for (table, at) in self.tables(e.item, e.at, "unless", "an array of tables") {
            let f = self.fields(table, at, "unless", UNLESS_KEYS);
            let event = match f.get("event") {
                Some(x) => self.name_like(x, "the kind of event, like event = \"purchase\""),
                None => {
                    self.error(
                        at,
                        format!("unless condition is missing `event`: expected {UNLESS_FORMS}"),
                    );
                    None
                }
            };
            let condition = match (f.get("since"), f.get("within")) {
                (Some(_), Some(_)) => {
                    self.error(at, format!("unless condition has both `since` and `within`: expected {UNLESS_FORMS}"));
                    None
                }
                (None, None) => {
                    self.error(
                        at,
                        format!(
                            "unless condition needs `since` or `within`: expected {UNLESS_FORMS}"
                        ),
                    );
                    None
                }
                (Some(since), None) => self.since(since, trigger),
                (None, Some(within)) => self.positive_duration(within).map(Some),
            };
            if let (Some(event), Some(condition)) = (event, condition) {
                out.push(match condition {
                    None => Unless::SinceTrigger { event },
                    Some(within) => Unless::Within { event, within },
                });
            }
        }
        (self.diags.len() == before).then_some(out)
    }

    /// `since = "trigger"`: `Some(None)` when valid (no period).
    fn since(&mut self, e: Entry<'_>, trigger: Option<&Trigger>) -> Option<Option<TimeDelta>> {
        let text = self.string(e)?;
        if text != "trigger" {
            self.error(
                e.at,
                format!("bad since \"{text}\": expected since = \"trigger\" (for a period, use within = DURATION)"),
            );
            return None;
        }
        let kind = match trigger {
            Some(Trigger::Anniversary { .. }) => "an anniversary",
            Some(Trigger::Schedule { .. }) => "a schedule",
            Some(Trigger::Event { .. }) | None => return Some(None),
        };
        self.error(
            e.at,
            format!(
                "since = \"trigger\" needs an event trigger, but this rule's trigger is {kind}, \
                 which has no triggering event: use within = DURATION instead"
            ),
        );
        None
    }

    fn only_if(&mut self, e: Entry<'_>) -> Option<Vec<AttributeCondition>> {
        let before = self.diags.len();
        let mut out = Vec::new();
        for (table, at) in self.tables(e.item, e.at, "only_if", "an array of tables") {
            let f = self.fields(table, at, "only_if", ONLY_IF_KEYS);
            let event_field = f.has("event_field");
            let attribute = match (f.get("attribute"), f.get("event_field")) {
                (Some(x), None) => self.name_like(
                    x,
                    "the name of a customer attribute, like attribute = \"plan\"",
                ),
                (None, Some(x)) => self.name_like(
                    x,
                    "the name of a field of the event's data, like event_field = \"score\"",
                ),
                (Some(_), Some(_)) => {
                    self.error(
                        at,
                        format!("only_if condition has both `attribute` and `event_field`: use one; expected {ONLY_IF_FORMS}"),
                    );
                    None
                }
                (None, None) => {
                    self.error(
                        at,
                        format!(
                            "only_if condition is missing `attribute`: expected {ONLY_IF_FORMS}"
                        ),
                    );
                    None
                }
            };
            let tests: Vec<Entry<'_>> = ONLY_IF_TESTS.iter().filter_map(|k| f.get(k)).collect();
            let test = match tests.as_slice() {
                [x] if x.key == "equals" => self.json(*x).map(AttributeTest::Equals),
                [x] if x.key == "in" => self.json_list(*x).map(AttributeTest::In),
                [x] if x.key == "at_most" => self.number(*x).map(AttributeTest::AtMost),
                [x] if x.key == "at_least" => self.number(*x).map(AttributeTest::AtLeast),
                [x] => self.boolean(*x).map(AttributeTest::Exists),
                [] => {
                    self.error(
                        at,
                        format!("only_if condition needs one of `equals`, `in`, `exists`, `at_most` or `at_least`: expected {ONLY_IF_FORMS}"),
                    );
                    None
                }
                _ => {
                    let keys: Vec<String> = tests.iter().map(|x| format!("`{}`", x.key)).collect();
                    self.error(
                        at,
                        format!(
                            "only_if condition has {}: use exactly one; expected {ONLY_IF_FORMS}",
                            keys.join(" and ")
                        ),
                    );
                    None
                }
            };
            if let (Some(attribute), Some(test)) = (attribute, test) {
                out.push(AttributeCondition {
                    attribute,
                    test,
                    event_field,
                });
            }
        }
        (self.diags.len() == before).then_some(out)
    }

    /// An integer or a finite float, for `at_most` / `at_least`.
    fn number(&mut self, e: Entry<'_>) -> Option<f64> {
        match e.item.as_value() {
            Some(Value::Integer(i)) => Some(*i.value() as f64),
            Some(Value::Float(f)) if f.value().is_finite() => Some(*f.value()),
            _ => {
                self.error(
                    e.at,
                    format!(
                        "expected a number for `{}`, like {} = 2, found {}",
                        e.key,
                        e.key,
                        describe(e.item)
                    ),
                );
                None
            }
        }
    }

    /// A string, integer, float or boolean as JSON.
    fn json(&mut self, e: Entry<'_>) -> Option<serde_json::Value> {
        match e.item {
            Item::Value(value) => self.json_value(value, e.at, e.key),
            other => {
                self.error(
                    e.at,
                    format!(
                        "expected a string, number or boolean for `{}`, found {}",
                        e.key,
                        describe(other)
                    ),
                );
                None
            }
        }
    }

    fn json_value(&mut self, value: &Value, at: usize, key: &str) -> Option<serde_json::Value> {
        let at = value.span().map_or(at, |span| span.start);
        match value {
            Value::String(s) => Some(serde_json::Value::String(s.value().clone())),
            Value::Integer(i) => Some(serde_json::Value::from(*i.value())),
            Value::Boolean(b) => Some(serde_json::Value::Bool(*b.value())),
            Value::Float(f) => match serde_json::Number::from_f64(*f.value()) {
                Some(n) => Some(serde_json::Value::Number(n)),
                None => {
                    self.error(
                        at,
                        format!("expected a finite number for `{key}`, found {}", f.value()),
                    );
                    None
                }
            },
            other => {
                self.error(
                    at,
                    format!(
                        "expected a string, number or boolean for `{key}`, found {}",
                        describe_value(other)
                    ),
                );
                None
            }
        }
    }

    fn json_list(&mut self, e: Entry<'_>) -> Option<Vec<serde_json::Value>> {
        let Some(array) = e.item.as_array() else {
            self.error(
                e.at,
                format!(
                    "expected a list for `in`, like in = [\"gold\", \"silver\"], found {}",
                    describe(e.item)
                ),
            );
            return None;
        };
        if array.is_empty() {
            self.error(
                e.at,
                "`in` is an empty list, which nothing matches: list at least one value",
            );
            return None;
        }
        let before = self.diags.len();
        let values: Vec<_> = array
            .iter()
            .filter_map(|v| self.json_value(v, e.at, "in"))
            .collect();
        (self.diags.len() == before).then_some(values)
    }

    fn send_window(&mut self, e: Entry<'_>) -> Option<SendWindow> {
        let table = self.table(e, "{ from = \"09:00\", to = \"18:00\" }")?;
        let f = self.fields(table, e.at, "send_window", WINDOW_KEYS);
        let before = self.diags.len();
        let bound = |cx: &mut Self, key: &str| match f.get(key) {
            Some(x) => cx.clock(x),
            None => {
                cx.error(e.at, format!("send_window is missing `{key}`: expected {{ from = \"HH:MM\", to = \"HH:MM\" }}"));
                None
            }
        };
        let from = bound(self, "from");
        let to = bound(self, "to");
        let days = match f.get("days") {
            Some(x) => self.days(x).map(Some),
            None => Some(None),
        };
        let skip_dates = match f.get("skip_dates") {
            Some(x) => self.skip_dates(x),
            None => Some(Vec::new()),
        };
        let (Some(from), Some(to), Some(days), Some(skip_dates)) = (from, to, days, skip_dates)
        else {
            return None;
        };
        if from == to {
            self.error(
                e.at,
                format!(
                    "empty window: from and to are both {}; for an overnight window make from later than to",
                    from.format("%H:%M")
                ),
            );
            return None;
        }
        (self.diags.len() == before).then_some(SendWindow {
            from,
            to,
            days,
            skip_dates,
        })
    }

    fn days(&mut self, e: Entry<'_>) -> Option<Vec<Weekday>> {
        let Some(array) = e.item.as_array() else {
            self.error(
                e.at,
                format!(
                    "expected a list of days for `days`, like days = [\"mon\", \"fri\"], found {}",
                    describe(e.item)
                ),
            );
            return None;
        };
        if array.is_empty() {
            self.error(e.at, "`days` is an empty list, so the window never opens: list at least one day or leave `days` out");
            return None;
        }
        let before = self.diags.len();
        let mut days = Vec::new();
        for value in array.iter() {
            let at = value.span().map_or(e.at, |span| span.start);
            match value.as_str().map(|s| (s, weekday(s))) {
                Some((_, Some(day))) => {
                    if !days.contains(&day) {
                        days.push(day);
                    }
                }
                Some((text, None)) => self.error(
                    at,
                    format!("bad day \"{text}\": expected mon, tue, wed, thu, fri, sat or sun (or the full English name)"),
                ),
                None => self.error(
                    at,
                    format!("expected a day name in `days`, like \"mon\", found {}", describe_value(value)),
                ),
            }
        }
        (self.diags.len() == before).then_some(days)
    }
}

/// Rule and template names go into keys, file names and URLs: ASCII letters, digits, `-`, `_`
/// and `.`, starting with a letter or digit.
fn check_identifier(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".to_string());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{bad:?} is not allowed: use only letters, digits, `-`, `_` and `.`, like \"thank-you-after-purchase\""
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("it must start with a letter or a digit".to_string());
    }
    Ok(())
}

fn weekday(text: &str) -> Option<Weekday> {
    let lower = text.to_ascii_lowercase();
    let days = [
        ("mon", "monday", Weekday::Mon),
        ("tue", "tuesday", Weekday::Tue),
        ("wed", "wednesday", Weekday::Wed),
        ("thu", "thursday", Weekday::Thu),
        ("fri", "friday", Weekday::Fri),
        ("sat", "saturday", Weekday::Sat),
        ("sun", "sunday", Weekday::Sun),
    ];
    days.iter()
        .find(|(short, long, _)| lower == *short || lower == *long)
        .map(|&(_, _, day)| day)
}

/// What a value is, for "expected X, found Y".
fn describe(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(value) => describe_value(value),
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
    }
}

fn describe_value(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "a table",
    }
}

/// Error text from a library on one line, for `file:line:column: message` output.
fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The allowed key closest to a misspelt one, if it is close enough to be a likely typo: one
/// edit (a third of the length for long keys), a swap of neighbours counting as one.
fn closest<'k>(key: &str, allowed: &[&'k str]) -> Option<&'k str> {
    if key.chars().count() < 3 {
        return None;
    }
    allowed
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|&(d, k)| d <= (k.len() / 3).max(1))
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of
/// neighbouring characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_for_likely_typos_only() {
        assert_eq!(closest("tempalte", RULE_KEYS), Some("template"));
        assert_eq!(closest("form", WINDOW_KEYS), Some("from"));
        assert_eq!(closest("equal", ONLY_IF_KEYS), Some("equals"));
        assert_eq!(closest("Name", RULE_KEYS), Some("name"));
        assert_eq!(closest("tz", WINDOW_KEYS), None);
        assert_eq!(closest("colour", RULE_KEYS), None);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("ab", "ba"), 1);
    }

    #[test]
    fn weekdays_short_and_long_in_any_case() {
        assert_eq!(weekday("MON"), Some(Weekday::Mon));
        assert_eq!(weekday("Sunday"), Some(Weekday::Sun));
        assert_eq!(weekday("thurs"), None);
        assert_eq!(weekday(""), None);
    }
}
