//! Rendering: the subject, plain-text body and HTML body of a message, from Handlebars templates.
//!
//! A templates directory holds one pair per template name, `<name>.html.hbs` and `<name>.txt.hbs`,
//! and `partials/*.hbs`, each registered as a partial named by its file stem (`partials/layout.hbs`
//! is used as `{{#> layout}}...{{/layout}}`). Two registries share the compiled templates: the
//! HTML one escapes every value (`{{customer.name}}` cannot inject markup), the text one does not;
//! subjects are rendered by the text one, then put on one line (all runs of white space, newlines
//! included, become one space, and the ends are trimmed).
//!
//! # What a template sees
//!
//! See [`message_context`]: `customer` (`id`, `email`, `name`, `first_name`, `timezone`,
//! `attributes`), `event` (`id`, `kind`, `occurred_at`, `data`; null for schedule rules), `rule`
//! (`name`, `description`), `business` (`name`, `address`, `website`), `years` (anniversaries; null
//! otherwise), `message.id`, `unsubscribe_url` (null when there is none, and in messages to the
//! owner) and `customer_url` (the owner's page about the customer). Every one of these
//! keys is always present, null when it has no value. Only the two free-form maps,
//! `customer.attributes` and `event.data`, have keys that some customers or events lack.
//!
//! `customer.first_name` is the first word of the name, `""` when there is no name: write
//! `Hi {{default customer.first_name "there"}},` rather than `Hi {{customer.first_name}},`.
//!
//! # Helpers (in both registries)
//!
//! - `{{date event.occurred_at "%B %-d, %Y"}}`: an RFC 3339 time in the customer's time zone (or
//!   `tz="Europe/Paris"`), or a `YYYY-MM-DD` date as it is, with a chrono format string (default
//!   `"%B %-d, %Y"`). A plain date stored as midnight UTC is shown as that date everywhere.
//! - `{{default customer.first_name "there"}}`: the value, or the fallback when the value is null,
//!   blank, or an absent optional value (see below). Also usable as a subexpression.
//! - `{{ordinal years}}`: 1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, 101st, 111th...
//! - `{{nl2br business.address}}`: in HTML, the escaped value with its line breaks as `<br>`; in
//!   text, the value as it is.
//!
//! # Strict mode, as found in handlebars 6.4 and as made here
//!
//! Both registries are strict. What handlebars itself does with a value that is not there:
//!
//! - `{{customr.name}}` is an error naming `customr.name`; so is a path through null
//!   (`{{event.kind}}` when `event` is null). A key that is present with null renders `""`.
//! - `{{#if x}}` / `{{#unless x}}` never fail: a missing `x` is simply false, so a misspelt
//!   `{{#if customr.name}}` would silently hide its block. touchpoint replaces `if` and `unless`
//!   with versions that accept a missing value only where absence is legitimate: a key inside a
//!   free-form map (`{{#if customer.attributes.vip}}`, `{{#if event.data.order_number}}`, also
//!   through `#with`/`#each` blocks over them) or below a null (`{{#if event.data.x}}` in a
//!   schedule rule). Anything else missing (`customr.name`, `customer.nickname`) is an error.
//! - `{{#each x}}` and `{{#with x}}` on a missing `x` are errors unless the block has an
//!   `{{else}}`: wrap an optional list in `{{#if}}` or give it an `{{else}}`.
//! - Helper parameters: a missing value reaches the helper as "missing". The built-in `eq`, `ne`,
//!   `gt`, `lt`, `and`, `or`, `not`, `len`... then fail ("param ... required but not found"), so
//!   compare an optional value through `default`: `{{#if (eq (default customer.attributes.plan "")
//!   "gold")}}`. `date`, `ordinal` and `nl2br` fail on a missing value; `default` accepts one
//!   where `#if` would.
//! - The built-in `lookup` fails on a missing key even inside `{{#if (lookup ...)}}`. touchpoint
//!   replaces it: a missing key is an error when printed, and false in `#if`/`default`.
//! - A partial block naming a partial that does not exist (`{{#> layuot}}...{{/layuot}}`) silently
//!   renders its body without the layout; [`Templates::load`] therefore reports every partial name
//!   that is not a file in `partials/` (or an inline partial).
//!
//! Strict mode only sees the branches a render takes, so [`Templates::check`] renders each rule
//! twice: with [`sample_context`] and with a sparse sample (no name, no description, no website,
//! no unsubscribe link). Event data in the samples holds only what is sure to be there (the
//! fields an `only_if` `event_field` condition requires; a `rated` event's `score`, `scale`,
//! `rule` and `message_id`): a template that prints any other `{{event.data.x}}` without
//! `#if`/`default` is reported, because a real event may lack it.
//!
//! A rule with `rating` also gets `rating` (`scale`, `question`, `scores` with a signed `url`
//! each), `{{rating_url N}}` and the built-in partial `{{> rating}}` (see [`rating`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::fs;
use std::path::{Path, PathBuf};

use chrono::format::StrftimeItems;
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use chrono_tz::Tz;
use handlebars::template::{Parameter, TemplateElement};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, JsonRender, JsonTruthy, Output,
    PathAndJson, RenderContext, RenderErrorReason, Renderable, ScopedJson, Template,
};
use serde_json::{Value, json};

use crate::diag::{Diagnostic, Diagnostics};
use crate::rules::{Rule, RuleSet, Trigger};

pub mod rating;
use crate::store::{Customer, Event};

/// What the business says about itself in every message (from the config's `[business]` table).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Business {
    pub name: String,
    /// The postal address shown in every footer; may span several lines.
    pub address: String,
    #[serde(default)]
    pub website: Option<String>,
    /// Where rules written `to = "owner"` send (and the digest, unless it names its own).
    #[serde(default)]
    pub owner_email: Option<String>,
}

/// `[templates]` in the config: where the templates live.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatesConfig {
    #[serde(default = "default_templates_dir")]
    pub dir: PathBuf,
}
impl Default for TemplatesConfig {
    fn default() -> Self {
        TemplatesConfig {
            dir: default_templates_dir(),
        }
    }
}
fn default_templates_dir() -> PathBuf {
    PathBuf::from("templates")
}

/// A rendered message.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// One line, trimmed, not escaped.
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Which part of a message failed to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Subject,
    Text,
    Html,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Subject => "subject",
            Part::Text => "text body",
            Part::Html => "HTML body",
        })
    }
}

/// Why a message could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(
        "rule {rule:?} uses template {template:?}, but the templates directory has no \
         {template}.html.hbs and {template}.txt.hbs pair"
    )]
    UnknownTemplate { rule: String, template: String },
    #[error(transparent)]
    Failed(Box<Failure>),
}

impl RenderError {
    /// The variable strict mode found missing, as written in the template.
    pub fn missing(&self) -> Option<&str> {
        match self {
            RenderError::Failed(failure) => failure.missing.as_deref(),
            RenderError::UnknownTemplate { .. } => None,
        }
    }
}

/// A template that failed to render: which one, where, and why.
#[derive(Debug, thiserror::Error)]
#[error("{part} of rule {rule:?}{}: {problem}", location(file.as_deref(), *line, *column))]
pub struct Failure {
    pub rule: String,
    pub part: Part,
    /// The template file, relative to the templates directory; `None` for the subject.
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The variable that was not there (strict mode), as written in the template.
    pub missing: Option<String>,
    /// What went wrong, for an operator.
    pub problem: String,
}

fn location(file: Option<&Path>, line: Option<usize>, column: Option<usize>) -> String {
    let at = match (line, column) {
        (Some(1), Some(column)) if file.is_none() => format!("character {column}"),
        (Some(line), Some(column)) => format!("line {line}, column {column}"),
        (Some(line), None) => format!("line {line}"),
        _ => String::new(),
    };
    match (file, at.is_empty()) {
        (Some(file), true) => format!(" ({})", file.display()),
        (Some(file), false) => format!(" ({}, {at})", file.display()),
        (None, true) => String::new(),
        (None, false) => format!(" ({at} of the subject)"),
    }
}

/// Said after a missing variable: the two usual causes and the cure for the second.
const MISSING_HINT: &str = "misspelt? A value that may be absent needs {{#if ...}} or \
                            {{default ... \"fallback\"}}";

/// The free-form maps of the context: keys below these may legitimately be absent.
const FREE_FORM: [[&str; 2]; 2] = [["customer", "attributes"], ["event", "data"]];

/// The compiled templates, partials and subjects. Cloning copies the compiled templates (the
/// helpers are shared); the daemon shares one behind an `Arc` and swaps it on reload.
#[derive(Clone, Debug)]
pub struct Templates {
    dir: PathBuf,
    html: Handlebars<'static>,
    text: Handlebars<'static>,
    /// Names of the complete pairs.
    pages: BTreeSet<String>,
    /// Registry name -> file relative to `dir`, for messages.
    files: HashMap<String, PathBuf>,
}

/// Extra facts about one message that are not in the customer, event, rule or business.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageExtras {
    /// Whole years since the original event, for anniversaries.
    pub years: Option<i32>,
    /// The message's Message-ID header value.
    pub message_id: String,
    pub unsubscribe_url: Option<String>,
    /// The owner's page about the customer (`None` without a URL to reach the daemon at).
    pub customer_url: Option<String>,
    /// The effective IANA time zone of the customer (their own or the configured default).
    pub timezone: String,
}

impl Templates {
    /// Loads every `<name>.html.hbs` + `<name>.txt.hbs` pair in `dir`, and every
    /// `dir/partials/*.hbs` as a partial named by its stem, usable from both kinds.
    ///
    /// Every mistake is reported at once: an unreadable directory or file, a lone half of a pair,
    /// a `.hbs` file named neither way, a syntax error (at its line and column), and a partial
    /// used but not defined. Files whose name starts with `.` are skipped.
    pub fn load(dir: &Path) -> Result<Templates, Diagnostics> {
        let mut templates = Templates::empty(dir);
        let mut problems = Vec::new();

        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                return Err(Diagnostics(vec![Diagnostic::whole_file(
                    dir,
                    format!("cannot read the templates directory: {e}"),
                )]));
            }
        };
        let mut pairs: BTreeMap<String, [Option<PathBuf>; 2]> = BTreeMap::new();
        for (name, path) in list_files(dir, entries, &mut problems) {
            if let Some(stem) = name.strip_suffix(".html.hbs") {
                pairs.entry(stem.to_string()).or_default()[0] = Some(path);
            } else if let Some(stem) = name.strip_suffix(".txt.hbs") {
                pairs.entry(stem.to_string()).or_default()[1] = Some(path);
            } else if name.ends_with(".hbs") {
                problems.push(Diagnostic::whole_file(
                    &path,
                    "not a template: name it <name>.html.hbs or <name>.txt.hbs (partials go in \
                     partials/)",
                ));
            }
        }

        let partials_dir = dir.join("partials");
        match fs::read_dir(&partials_dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => problems.push(Diagnostic::whole_file(
                &partials_dir,
                format!("cannot read the partials directory: {e}"),
            )),
            Ok(entries) => {
                for (name, path) in list_files(&partials_dir, entries, &mut problems) {
                    let Some(stem) = name.strip_suffix(".hbs") else {
                        continue;
                    };
                    let file = Path::new("partials").join(&name);
                    if let Some(template) = compile_file(&path, stem, &mut problems) {
                        templates.register(stem, template, file);
                    }
                }
            }
        }

        for (name, halves) in pairs {
            match halves {
                [Some(html), Some(text)] => {
                    let html_name = format!("{name}.html.hbs");
                    let text_name = format!("{name}.txt.hbs");
                    let html = compile_file(&html, &html_name, &mut problems);
                    let text = compile_file(&text, &text_name, &mut problems);
                    if let (Some(html), Some(text)) = (html, text) {
                        templates.register(&html_name, html, PathBuf::from(&html_name));
                        templates.register(&text_name, text, PathBuf::from(&text_name));
                        templates.pages.insert(name);
                    }
                }
                [Some(html), None] => problems.push(Diagnostic::whole_file(
                    &html,
                    format!(
                        "has no plain-text twin: add {name}.txt.hbs next to it (every message has \
                         an HTML and a text body)"
                    ),
                )),
                [None, Some(text)] => problems.push(Diagnostic::whole_file(
                    &text,
                    format!(
                        "has no HTML twin: add {name}.html.hbs next to it (every message has an \
                         HTML and a text body)"
                    ),
                )),
                [None, None] => {}
            }
        }

        for (name, file) in &templates.files {
            if let Some(template) = templates.text.get_template(name) {
                for (line, column, partial) in templates.unknown_partials(template) {
                    problems.push(Diagnostic {
                        file: dir.join(file),
                        line,
                        column,
                        message: templates.unknown_partial_message(&partial),
                    });
                }
            }
        }

        if problems.is_empty() {
            Ok(templates)
        } else {
            problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            Err(Diagnostics(problems))
        }
    }

    fn empty(dir: &Path) -> Templates {
        Templates {
            dir: dir.to_path_buf(),
            html: registry(true),
            text: registry(false),
            pages: BTreeSet::new(),
            files: HashMap::new(),
        }
    }

    fn register(&mut self, name: &str, template: Template, file: PathBuf) {
        self.html.register_template(name, template.clone());
        self.text.register_template(name, template);
        self.files.insert(name.to_string(), file);
    }

    /// The directory the templates were loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the pair `<name>.html.hbs` / `<name>.txt.hbs` was loaded.
    pub fn exists(&self, name: &str) -> bool {
        self.pages.contains(name)
    }

    /// The names of the loaded pairs, sorted.
    pub fn names(&self) -> Vec<String> {
        self.pages.iter().cloned().collect()
    }

    /// Compiles every rule's subject once (rules sharing a subject share the compiled template).
    /// A syntax error, or an unknown partial, is a diagnostic at the rule's `subject`.
    pub fn with_subjects(mut self, rules: &RuleSet) -> Result<Templates, Diagnostics> {
        let mut problems = Vec::new();
        for rule in &rules.rules {
            let key = subject_key(&rule.subject);
            if self.text.has_template(&key) {
                continue;
            }
            let at = &rule.subject_origin;
            let diagnostic = |message: String| Diagnostic {
                file: at.file.clone(),
                line: at.line,
                column: at.column,
                message: format!("subject of rule {:?}: {message}", rule.name),
            };
            match Template::compile_with_name(&rule.subject, key.clone()) {
                Ok(template) => {
                    let unknown = self.unknown_partials(&template);
                    if unknown.is_empty() {
                        self.text.register_template(&key, template);
                    }
                    for (_, _, partial) in unknown {
                        problems.push(diagnostic(self.unknown_partial_message(&partial)));
                    }
                }
                Err(e) => {
                    let at = match e.pos() {
                        Some((1, column)) => format!(" at character {column} of the subject"),
                        Some((line, column)) => {
                            format!(" at line {line}, column {column} of the subject")
                        }
                        None => String::new(),
                    };
                    problems.push(diagnostic(format!("{}{at}", e.reason())));
                }
            }
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(Diagnostics(problems))
        }
    }

    /// Renders the subject (not escaped, on one line), the text body (not escaped) and the HTML
    /// body (values escaped). A subject not registered by [`Templates::with_subjects`] is compiled
    /// on the spot.
    pub fn render(&self, rule: &Rule, context: &Value) -> Result<Rendered, RenderError> {
        if !self.exists(&rule.template) {
            return Err(RenderError::UnknownTemplate {
                rule: rule.name.clone(),
                template: rule.template.clone(),
            });
        }
        let context = Context::from(context.clone());
        Ok(Rendered {
            subject: self.render_part(rule, Part::Subject, &context)?,
            text: self.render_part(rule, Part::Text, &context)?,
            html: self.render_part(rule, Part::Html, &context)?,
        })
    }

    fn render_part(
        &self,
        rule: &Rule,
        part: Part,
        context: &Context,
    ) -> Result<String, RenderError> {
        let rendered = match part {
            Part::Subject => {
                let key = subject_key(&rule.subject);
                let raw = if self.text.has_template(&key) {
                    self.text.render_with_context(&key, context)
                } else {
                    self.text
                        .render_template_with_context(&rule.subject, context)
                };
                raw.map(|subject| subject.split_whitespace().collect::<Vec<_>>().join(" "))
            }
            Part::Text => self
                .text
                .render_with_context(&format!("{}.txt.hbs", rule.template), context),
            Part::Html => self
                .html
                .render_with_context(&format!("{}.html.hbs", rule.template), context),
        };
        rendered.map_err(|e| self.failure(rule, part, &e))
    }

    fn failure(&self, rule: &Rule, part: Part, error: &handlebars::RenderError) -> RenderError {
        let page = match part {
            Part::Subject => None,
            Part::Text => Some(PathBuf::from(format!("{}.txt.hbs", rule.template))),
            Part::Html => Some(PathBuf::from(format!("{}.html.hbs", rule.template))),
        };
        // The template (or partial) the error is in; a subject is in no file.
        let file = match &error.template_name {
            Some(name) => self.files.get(name).cloned().or(page),
            None => page,
        };
        let (mut line, mut column) = (error.line_no, error.column_no);
        let mut missing = None;
        let problem = match error.reason() {
            RenderErrorReason::MissingVariable(Some(path)) => {
                missing = Some(path.clone());
                format!("{path:?} is not in this message's context ({MISSING_HINT})")
            }
            RenderErrorReason::MissingVariable(None) => {
                format!("a value used here is missing ({MISSING_HINT})")
            }
            RenderErrorReason::TemplateError(e) => {
                if let Some((l, c)) = e.pos() {
                    (line, column) = (Some(l), Some(c));
                }
                e.reason().to_string()
            }
            RenderErrorReason::PartialNotFound(name) => self.unknown_partial_message(name),
            RenderErrorReason::HelperNotFound(name) => format!(
                "there is no helper {name:?} (touchpoint adds date, default, ordinal, nl2br and \
                 rating_url to the Handlebars built-ins)"
            ),
            other => other.to_string(),
        };
        RenderError::Failed(Box::new(Failure {
            rule: rule.name.clone(),
            part,
            file,
            line,
            column,
            missing,
            problem,
        }))
    }

    /// Renders every rule with [`sample_context`] and with a sparse sample (strict mode), and
    /// returns one diagnostic per failure, at the rule's `template` (bodies) or `subject`, naming
    /// the template file, line and column and the missing variable.
    pub fn check(&self, rules: &RuleSet, business: &Business) -> Vec<Diagnostic> {
        let mut found: Vec<Diagnostic> = Vec::new();
        for rule in &rules.rules {
            let at = |part: Part, message: String| {
                let origin = if part == Part::Subject {
                    &rule.subject_origin
                } else {
                    &rule.template_origin
                };
                Diagnostic {
                    file: origin.file.clone(),
                    line: origin.line,
                    column: origin.column,
                    message,
                }
            };
            let mut parts = vec![Part::Subject];
            if self.exists(&rule.template) {
                parts.extend([Part::Text, Part::Html]);
            } else {
                let have = if self.pages.is_empty() {
                    "there are none".to_string()
                } else {
                    format!("there are {}", self.names().join(", "))
                };
                let message = format!(
                    "rule {:?}: no template {:?}: expected {} and {} ({have})",
                    rule.name,
                    rule.template,
                    self.dir
                        .join(format!("{}.html.hbs", rule.template))
                        .display(),
                    self.dir
                        .join(format!("{}.txt.hbs", rule.template))
                        .display(),
                );
                found.push(at(Part::Text, message));
            }
            let full = Context::from(sample_context(rule, business));
            let sparse = Context::from(sparse_context(rule, business));
            for part in parts {
                let (error, note) = match self.render_part(rule, part, &full) {
                    Err(e) => (e, ""),
                    Ok(_) => match self.render_part(rule, part, &sparse) {
                        Err(e) => (
                            e,
                            " (seen with a sample that has no customer name, rule description, \
                             business website or unsubscribe link)",
                        ),
                        Ok(_) => continue,
                    },
                };
                let diagnostic = at(part, format!("{}{note}", self.describe(&error)));
                if !found.contains(&diagnostic) {
                    found.push(diagnostic);
                }
            }
        }
        found
    }

    /// An error as `check` reports it: the template file with its full path.
    fn describe(&self, error: &RenderError) -> String {
        let RenderError::Failed(failure) = error else {
            return error.to_string();
        };
        let Failure {
            rule,
            part,
            file,
            line,
            column,
            problem,
            ..
        } = failure.as_ref();
        let Some(file) = file else {
            return format!(
                "rule {rule:?}, subject{}: {problem}",
                location(None, *line, *column)
            );
        };
        let mut at = self.dir.join(file).display().to_string();
        if let Some(line) = line {
            let _ = write!(at, ":{line}");
            if let Some(column) = column {
                let _ = write!(at, ":{column}");
            }
        }
        format!("rule {rule:?}, {part}: {at}: {problem}")
    }

    /// Partials used by `template` that are neither loaded nor defined inline in it.
    fn unknown_partials(&self, template: &Template) -> Vec<(usize, usize, String)> {
        let mut inline = BTreeSet::new();
        collect_inline_partials(template, &mut inline);
        let mut unknown = Vec::new();
        collect_unknown_partials(
            template,
            &|name: &str| {
                name.starts_with('@')
                    || name == rating::PARTIAL
                    || inline.contains(name)
                    || self.is_partial(name)
            },
            &mut unknown,
        );
        unknown
    }

    fn is_partial(&self, name: &str) -> bool {
        self.files
            .get(name)
            .is_some_and(|file| file.starts_with("partials"))
    }

    fn unknown_partial_message(&self, name: &str) -> String {
        let mut have: Vec<&str> = self
            .files
            .keys()
            .filter(|n| self.is_partial(n))
            .map(String::as_str)
            .collect();
        have.sort_unstable();
        let have = if have.is_empty() {
            "there are none".to_string()
        } else {
            format!("there are {}", have.join(", "))
        };
        format!(
            "there is no partial {name:?}: expected {} ({have})",
            self.dir
                .join("partials")
                .join(format!("{name}.hbs"))
                .display()
        )
    }
}

/// The registry name of a subject: never a file name, and the same for identical subjects.
fn subject_key(subject: &str) -> String {
    format!("subject:{subject}")
}

/// The regular files (following symbolic links) of a directory, sorted, without hidden ones.
fn list_files(
    dir: &Path,
    entries: fs::ReadDir,
    problems: &mut Vec<Diagnostic>,
) -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                problems.push(Diagnostic::whole_file(dir, format!("cannot list: {e}")));
                continue;
            }
        };
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            if path.extension().is_some_and(|ext| ext == "hbs") {
                problems.push(Diagnostic::whole_file(
                    &path,
                    "the file name is not valid UTF-8",
                ));
            }
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => files.push((name, path)),
            Ok(_) => {}
            Err(e) => problems.push(Diagnostic::whole_file(&path, format!("cannot read: {e}"))),
        }
    }
    files.sort();
    files
}

fn compile_file(path: &Path, name: &str, problems: &mut Vec<Diagnostic>) -> Option<Template> {
    let source = match fs::read_to_string(path) {
        Ok(source) => source,
        Err(e) => {
            problems.push(Diagnostic::whole_file(path, format!("cannot read: {e}")));
            return None;
        }
    };
    match Template::compile_with_name(&source, name.to_string()) {
        Ok(template) => Some(template),
        Err(e) => {
            let (line, column) = e.pos().unwrap_or((0, 0));
            problems.push(Diagnostic {
                file: path.to_path_buf(),
                line,
                column,
                message: format!("template syntax: {}", e.reason()),
            });
            None
        }
    }
}

/// Child templates of an element: block bodies, `{{else}}` branches, partial-block bodies.
fn children(element: &TemplateElement) -> Vec<&Template> {
    match element {
        TemplateElement::HelperBlock(h) => h.template.iter().chain(h.inverse.iter()).collect(),
        TemplateElement::DecoratorBlock(d) | TemplateElement::PartialBlock(d) => {
            d.template.iter().collect()
        }
        _ => Vec::new(),
    }
}

fn collect_inline_partials(template: &Template, names: &mut BTreeSet<String>) {
    for element in &template.elements {
        if let TemplateElement::DecoratorBlock(d) = element
            && d.name.as_name() == Some("inline")
            && let Some(Parameter::Literal(Value::String(name))) = d.params.first()
        {
            names.insert(name.clone());
        }
        for child in children(element) {
            collect_inline_partials(child, names);
        }
    }
}

fn collect_unknown_partials(
    template: &Template,
    known: &dyn Fn(&str) -> bool,
    unknown: &mut Vec<(usize, usize, String)>,
) {
    for (i, element) in template.elements.iter().enumerate() {
        if let TemplateElement::PartialExpression(d) | TemplateElement::PartialBlock(d) = element
            && let Some(name) = d.name.as_name()
            && !known(name)
        {
            let (line, column) = template.mapping.get(i).map_or((0, 0), |m| (m.0, m.1));
            unknown.push((line, column, name.to_string()));
        }
        for child in children(element) {
            collect_unknown_partials(child, known, unknown);
        }
    }
}

/// A strict registry with touchpoint's helpers (`default`, `date`, `if`...), for templates that
/// are not a rule's (the owner's digest): HTML-escaping when `html`.
pub fn helper_registry(html: bool) -> Handlebars<'static> {
    registry(html)
}

fn registry(html: bool) -> Handlebars<'static> {
    let mut registry = Handlebars::new();
    registry.set_strict_mode(true);
    if !html {
        registry.register_escape_fn(handlebars::no_escape);
    }
    registry.register_helper("if", Box::new(StrictIf { positive: true }));
    registry.register_helper("unless", Box::new(StrictIf { positive: false }));
    registry.register_helper("lookup", Box::new(Lookup));
    registry.register_helper("default", Box::new(DefaultHelper));
    registry.register_helper("date", Box::new(DateHelper));
    registry.register_helper("ordinal", Box::new(OrdinalHelper));
    registry.register_helper("nl2br", Box::new(Nl2br { html }));
    rating::register(&mut registry, html);
    registry
}

/// The context a template sees. `event` is null for schedule rules; `years` is null unless
/// given (anniversaries). `customer.attributes` and `event.data` are always objects.
pub fn message_context(
    customer: &Customer,
    event: Option<&Event>,
    rule: &Rule,
    business: &Business,
    extra: &MessageExtras,
) -> Value {
    let name = customer.name.as_deref().map_or("", str::trim);
    json!({
        "customer": {
            "id": customer.id,
            "email": customer.email,
            "name": name,
            "first_name": name.split_whitespace().next().unwrap_or(""),
            "timezone": extra.timezone,
            "attributes": object_or_empty(&customer.attributes),
        },
        "event": event.map(|event| json!({
            "id": event.id,
            "kind": event.kind,
            "occurred_at": event.occurred_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            "data": object_or_empty(&event.data),
        })),
        "rule": { "name": rule.name, "description": rule.description },
        "business": {
            "name": business.name,
            "address": business.address,
            "website": business.website,
        },
        "years": extra.years,
        "message": { "id": extra.message_id },
        "unsubscribe_url": extra.unsubscribe_url,
        // Filled in for rules with `rating` ([`rating::context`]).
        "rating": null,
        "customer_url": extra.customer_url,
    })
}

fn object_or_empty(value: &Value) -> Value {
    if value.is_object() {
        value.clone()
    } else {
        json!({})
    }
}

/// A realistic sample for `check`, `preview` and docs: a customer named Alex Morgan in
/// Europe/London with the attributes the rule's `only_if` conditions name; an event of the rule's
/// kind with empty data (none for schedule rules); `years = 5` for anniversaries; an unsubscribe
/// link.
pub fn sample_context(rule: &Rule, business: &Business) -> Value {
    sample(rule, business, true)
}

/// The sample with every optional value left out, to exercise the `{{else}}` branches.
fn sparse_context(rule: &Rule, business: &Business) -> Value {
    let mut rule = rule.clone();
    rule.description = None;
    let business = Business {
        website: None,
        ..business.clone()
    };
    sample(&rule, &business, false)
}

fn sample(rule: &Rule, business: &Business, full: bool) -> Value {
    let mut attributes = serde_json::Map::new();
    for condition in rule.only_if.iter().filter(|c| !c.event_field) {
        if let Some(value) = rating::sample_value(&condition.test) {
            attributes.insert(condition.attribute.clone(), value);
        }
    }
    let customer = Customer {
        id: "sample-customer".to_string(),
        email: "alex.morgan@example.com".to_string(),
        name: full.then(|| "Alex Morgan".to_string()),
        timezone: Some("Europe/London".to_string()),
        attributes: Value::Object(attributes),
    };
    let at = |seconds| DateTime::<Utc>::from_timestamp(seconds, 0).unwrap_or(DateTime::UNIX_EPOCH);
    let (event, years) = match &rule.trigger {
        // 2025-03-14T15:30:00Z
        Trigger::Event { kind, .. } => (Some((kind, at(1_741_966_200))), None),
        // 2021-06-12T15:00:00Z, five years before the sample's anniversary
        Trigger::Anniversary { kind, .. } => (Some((kind, at(1_623_510_000))), Some(5)),
        Trigger::Schedule { .. } => (None, None),
    };
    let event = event.map(|(kind, occurred_at)| Event {
        id: "sample-event".to_string(),
        customer_id: customer.id.clone(),
        kind: kind.clone(),
        occurred_at,
        data: rating::with_event_fields(sample_event_data(kind, full), &rule.only_if),
    });
    let extra = MessageExtras {
        years,
        message_id: "<sample.touchpoint@example.com>".to_string(),
        unsubscribe_url: full.then(|| "https://example.com/unsubscribe/sample".to_string()),
        customer_url: full.then(|| "https://example.com/customers/sample-customer".to_string()),
        timezone: "Europe/London".to_string(),
    };
    let mut context = message_context(&customer, event.as_ref(), rule, business, &extra);
    if let Some(request) = &rule.rating {
        context["rating"] = rating::context(request, &rating::sample_url);
    }
    context
}

/// The data of the events touchpoint itself records (`rated`, `replied`), so that templates
/// about them (an owner's alert) can be checked; `{}` for every other kind.
fn sample_event_data(kind: &str, full: bool) -> Value {
    match kind {
        "rated" => {
            let mut data =
                json!({"score": 2, "scale": "csat", "rule": "thank-you", "message_id": 1});
            if full {
                data["comment"] = json!("The roses arrived wilted.");
            }
            data
        }
        "replied" => json!({
            "rule": "thank-you", "message_id": 1, "snippet": "Thank you, see you soon", "auto": false
        }),
        _ => json!({}),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn other(message: String) -> handlebars::RenderError {
    RenderErrorReason::Other(message).into()
}

/// Parameter `index` of `helper`, which must be there (strict mode names the missing path).
fn required<'a, 'rc>(
    h: &'a Helper<'rc>,
    index: usize,
    helper: &'static str,
) -> Result<&'a PathAndJson<'rc>, handlebars::RenderError> {
    let param = h
        .param(index)
        .ok_or(RenderErrorReason::ParamNotFoundForIndex(helper, index))?;
    if param.is_value_missing() {
        return Err(handlebars::RenderError::strict_error(param.relative_path()));
    }
    Ok(param)
}

/// Whether a missing parameter may count as absent (false, empty) rather than be an error: it is
/// a key inside a free-form map, or below a null, or the result of a subexpression (which
/// checked its own inputs), or written in a form this does not follow (local variables).
fn absence_is_allowed<'rc>(
    param: &PathAndJson<'rc>,
    ctx: &'rc Context,
    rc: &RenderContext<'_, 'rc>,
) -> bool {
    let Some(path) = param.relative_path() else {
        return true;
    };
    let Some((prefix, mut segments)) = split_path(path) else {
        return true;
    };
    while segments.pop().is_some() {
        let parent = match (segments.is_empty(), prefix.as_str()) {
            (true, "") => "this".to_string(),
            (true, "@root.") => "@root".to_string(),
            (true, prefix) => format!("{prefix}this"),
            (false, prefix) => format!("{prefix}{}", segments.join(".")),
        };
        match rc.evaluate(ctx, &parent) {
            Err(_) => return true,
            Ok(ScopedJson::Missing) => {}
            Ok(ScopedJson::Context(value, at)) => {
                return value.is_null()
                    || FREE_FORM
                        .iter()
                        .any(|map| at.len() >= 2 && at[..2] == map[..]);
            }
            Ok(_) => return true,
        }
    }
    false
}

/// A path as written, split into a prefix (`@root.`, `../`) and its segments; `None` for local
/// variables (`@index`) and malformed paths.
fn split_path(raw: &str) -> Option<(String, Vec<&str>)> {
    let mut rest = raw;
    let mut prefix = String::new();
    if let Some(after) = rest.strip_prefix("@root") {
        rest = after.strip_prefix(['.', '/'])?;
        prefix.push_str("@root.");
    } else if rest.starts_with('@') {
        return None;
    }
    while let Some(after) = rest.strip_prefix("../") {
        prefix.push_str("../");
        rest = after;
    }
    for this in ["./", "this.", "this/"] {
        if let Some(after) = rest.strip_prefix(this) {
            rest = after;
            break;
        }
    }
    let mut segments = Vec::new();
    let (mut start, mut in_brackets) = (0, false);
    for (i, c) in rest.char_indices() {
        match c {
            '[' => in_brackets = true,
            ']' => in_brackets = false,
            '.' | '/' if !in_brackets => {
                segments.push(&rest[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    segments.push(&rest[start..]);
    if segments.iter().any(|s| s.is_empty()) {
        return None;
    }
    Some((prefix, segments))
}

/// Writes a helper's text, escaped unless the registry or a triple-stash says not to.
fn write_escaped(
    r: &Handlebars<'_>,
    rc: &RenderContext<'_, '_>,
    out: &mut dyn Output,
    text: &str,
) -> HelperResult {
    if rc.is_disable_escape() {
        out.write(text)?;
    } else {
        out.write(&r.get_escape_fn()(text))?;
    }
    Ok(())
}

/// `if` and `unless`, which accept a missing value only where absence is legitimate.
struct StrictIf {
    positive: bool,
}

impl HelperDef for StrictIf {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let name = if self.positive { "if" } else { "unless" };
        let param = h
            .param(0)
            .ok_or(RenderErrorReason::ParamNotFoundForIndex(name, 0))?;
        if r.strict_mode() && param.is_value_missing() && !absence_is_allowed(param, ctx, rc) {
            return Err(handlebars::RenderError::strict_error(param.relative_path()));
        }
        let include_zero = h
            .hash_get("includeZero")
            .and_then(|v| v.value().as_bool())
            .unwrap_or(false);
        let chosen = if param.value().is_truthy(include_zero) == self.positive {
            h.template()
        } else {
            h.inverse()
        };
        match chosen {
            Some(template) => template.render(r, ctx, rc, out),
            None => Ok(()),
        }
    }
}

/// `lookup`: a missing key is "missing" (an error when printed, false in `#if`), not an error
/// in itself.
struct Lookup;

impl HelperDef for Lookup {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, handlebars::RenderError> {
        let collection = h
            .param(0)
            .ok_or(RenderErrorReason::ParamNotFoundForIndex("lookup", 0))?;
        let key = h
            .param(1)
            .ok_or(RenderErrorReason::ParamNotFoundForIndex("lookup", 1))?;
        if r.strict_mode()
            && collection.is_value_missing()
            && !absence_is_allowed(collection, ctx, rc)
        {
            return Err(handlebars::RenderError::strict_error(
                collection.relative_path(),
            ));
        }
        let found = match collection.value() {
            Value::Array(items) => key
                .value()
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| items.get(i)),
            Value::Object(map) => key.value().as_str().and_then(|k| map.get(k)),
            _ => None,
        };
        Ok(found.map_or(ScopedJson::Missing, |value| {
            ScopedJson::Derived(value.clone())
        }))
    }

    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let value = self.call_inner(h, r, ctx, rc)?;
        if r.strict_mode() && value.is_missing() {
            let collection = h.param(0).and_then(|p| p.relative_path().cloned());
            let key = h.param(1).map(|p| p.value().to_string());
            let what = format!(
                "lookup {} {}",
                collection.as_deref().unwrap_or("(value)"),
                key.as_deref().unwrap_or("")
            );
            return Err(handlebars::RenderError::strict_error(Some(&what)));
        }
        write_escaped(r, rc, out, &value.render())
    }
}

/// `{{default value "fallback"}}`: the fallback when the value is null, blank, or absent.
struct DefaultHelper;

impl HelperDef for DefaultHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, handlebars::RenderError> {
        let value = h
            .param(0)
            .ok_or(RenderErrorReason::ParamNotFoundForIndex("default", 0))?;
        let fallback = required(h, 1, "default")?;
        if value.is_value_missing() {
            if r.strict_mode() && !absence_is_allowed(value, ctx, rc) {
                return Err(handlebars::RenderError::strict_error(value.relative_path()));
            }
            return Ok(ScopedJson::Derived(fallback.value().clone()));
        }
        let blank = match value.value() {
            Value::Null => true,
            Value::String(s) => s.trim().is_empty(),
            _ => false,
        };
        let chosen = if blank { fallback } else { value };
        Ok(ScopedJson::Derived(chosen.value().clone()))
    }
}

/// `{{date value "format" tz="Zone"}}`.
struct DateHelper;

const DEFAULT_DATE_FORMAT: &str = "%B %-d, %Y";

impl HelperDef for DateHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, handlebars::RenderError> {
        let value = required(h, 0, "date")?;
        let format = match h.param(1) {
            None => DEFAULT_DATE_FORMAT,
            Some(format) => format.value().as_str().ok_or_else(|| {
                other(format!(
                    "date: the format must be a quoted chrono format such as \"%B %-d, %Y\", \
                     found {}",
                    format.value()
                ))
            })?,
        };
        let items = StrftimeItems::new(format).parse().map_err(|_| {
            other(format!(
                "date: {format:?} is not a valid format (see chrono's strftime)"
            ))
        })?;
        let Some(text) = value.value().as_str() else {
            return Err(other(format!(
                "date: expects an RFC 3339 time or a YYYY-MM-DD date, found {}",
                value.value()
            )));
        };
        let mut rendered = String::new();
        let parsed = DateTime::parse_from_rfc3339(text).ok();
        // A plain date (a wedding imported as 2019-06-15 is stored as midnight UTC) is that
        // date for everyone, not the evening before west of Greenwich; an explicit tz= still
        // converts it.
        let plain = parsed
            .filter(|_| h.hash_get("tz").is_none())
            .and_then(|time| crate::calendar::plain_date(time.with_timezone(&chrono::Utc)));
        let as_date = plain.and_then(|date| {
            let mut text = String::new();
            write!(text, "{}", date.format_with_items(items.iter()))
                .ok()
                .map(|()| text)
        });
        let written = if let Some(date) = as_date {
            // (A format asking for the time of a plain date falls through to the time below.)
            rendered = date;
            Ok(())
        } else if let Some(time) = parsed {
            let zone = h
                .hash_get("tz")
                .and_then(|tz| tz.value().as_str())
                .or_else(|| {
                    ctx.data()
                        .pointer("/customer/timezone")
                        .and_then(Value::as_str)
                })
                .unwrap_or("UTC");
            let zone: Tz = zone
                .parse()
                .map_err(|_| other(format!("date: unknown time zone {zone:?}")))?;
            write!(
                rendered,
                "{}",
                time.with_timezone(&zone).format_with_items(items.iter())
            )
        } else if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
            write!(rendered, "{}", date.format_with_items(items.iter()))
        } else {
            return Err(other(format!(
                "date: {text:?} is neither an RFC 3339 time nor a YYYY-MM-DD date"
            )));
        };
        written.map_err(|_| {
            other(format!(
                "date: {format:?} asks for more than {text:?} has (a time of a date?)"
            ))
        })?;
        Ok(ScopedJson::Derived(Value::String(rendered)))
    }
}

/// `{{ordinal 21}}` is `21st`.
struct OrdinalHelper;

impl HelperDef for OrdinalHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, handlebars::RenderError> {
        let value = required(h, 0, "ordinal")?.value();
        let number = value
            .as_i64()
            .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
            .ok_or_else(|| other(format!("ordinal: expects a whole number, found {value}")))?;
        Ok(ScopedJson::Derived(Value::String(ordinal(number))))
    }
}

/// 1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, 22nd, 101st, 111th, 112th.
pub fn ordinal(n: i64) -> String {
    let abs = n.unsigned_abs();
    let suffix = match (abs % 10, abs % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// `{{nl2br value}}`: in HTML the escaped value with `<br>` at its line breaks.
struct Nl2br {
    html: bool,
}

impl HelperDef for Nl2br {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        _: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let text = required(h, 0, "nl2br")?.value().render();
        if !self.html {
            return write_escaped(r, rc, out, &text);
        }
        let escaped = if rc.is_disable_escape() {
            text
        } else {
            r.get_escape_fn()(&text)
        };
        let lines: Vec<&str> = escaped.lines().map(str::trim_end).collect();
        out.write(&lines.join("<br>\n"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chrono::{NaiveTime, TimeDelta};

    use super::*;
    use crate::rules::{AttributeCondition, AttributeTest, Origin, Unless};

    const TEMPLATES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/templates");

    fn origin(line: usize, column: usize) -> Origin {
        Origin {
            file: PathBuf::from("config/rules/test.toml"),
            line,
            column,
        }
    }

    fn rule(name: &str, template: &str, subject: &str, trigger: Trigger) -> Rule {
        Rule {
            name: name.to_string(),
            description: Some("A test rule".to_string()),
            template: template.to_string(),
            subject: subject.to_string(),
            enabled: true,
            trigger,
            unless: Vec::new(),
            only_if: Vec::new(),
            send_window: None,
            expire_after: None,
            track_opens: false,
            track_clicks: false,
            origin: origin(1, 1),
            subject_origin: origin(4, 11),
            template_origin: origin(3, 12),
            frequency_limit: None,
            priority: 0,
            ignore_frequency_limit: false,
            rating: None,
            to: crate::rules::Recipient::Customer,
        }
    }

    fn purchase() -> Trigger {
        Trigger::Event {
            kind: "purchase".to_string(),
            after: TimeDelta::hours(2),
        }
    }

    /// The three rules of DESIGN.md, as config/rules/*.toml writes them.
    fn example_rules() -> RuleSet {
        let mut follow_up = rule(
            "discovery-call-follow-up",
            "follow-up",
            "As promised: next steps",
            Trigger::Event {
                kind: "discovery_call".to_string(),
                after: TimeDelta::days(3),
            },
        );
        follow_up.unless = vec![Unless::SinceTrigger {
            event: "purchase".to_string(),
        }];
        let nine = NaiveTime::from_hms_opt(9, 0, 0).unwrap();
        RuleSet {
            rules: vec![
                rule(
                    "thank-you-after-purchase",
                    "thank-you",
                    "Thank you for your order, {{customer.first_name}}",
                    purchase(),
                ),
                follow_up,
                rule(
                    "wedding-anniversary",
                    "anniversary",
                    "Happy anniversary, {{customer.first_name}}!",
                    Trigger::Anniversary {
                        kind: "wedding".to_string(),
                        at: nine,
                    },
                ),
            ],
        }
    }

    fn business() -> Business {
        Business {
            name: "Bloom & Petal".to_string(),
            address: "12 Harbour Road\nBrighton BN1 1AA".to_string(),
            website: Some("https://bloomandpetal.example".to_string()),
            owner_email: None,
        }
    }

    /// A templates directory with the given files (paths relative to it).
    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = dir.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        dir
    }

    fn load(files: &[(&str, &str)]) -> (tempfile::TempDir, Templates) {
        let dir = dir_with(files);
        let templates = Templates::load(dir.path()).unwrap();
        (dir, templates)
    }

    /// Renders one body template against `context` (HTML registry) for quick helper tests.
    fn html(body: &str, context: &Value) -> Result<String, RenderError> {
        let (_dir, templates) = load(&[("t.html.hbs", body), ("t.txt.hbs", "")]);
        let rule = rule("r", "t", "s", purchase());
        templates.render(&rule, context).map(|r| r.html)
    }

    fn context() -> Value {
        let rule = rule("r", "t", "s", purchase());
        let mut context = sample_context(&rule, &business());
        context["customer"]["attributes"] = json!({ "plan": "gold", "tags": ["a", "b"] });
        context["event"]["data"] = json!({ "order_number": "A-17" });
        context
    }

    fn missing(result: Result<String, RenderError>) -> Option<String> {
        match result {
            Err(RenderError::Failed(failure)) => failure.missing,
            other => panic!("expected a strict-mode failure, got {other:?}"),
        }
    }

    #[test]
    fn the_example_templates_render_for_the_three_example_rules() {
        let rules = example_rules();
        let templates = Templates::load(Path::new(TEMPLATES))
            .unwrap()
            .with_subjects(&rules)
            .unwrap();
        assert_eq!(templates.names(), ["anniversary", "follow-up", "thank-you"]);
        assert_eq!(
            templates.check(&rules, &business()),
            Vec::<Diagnostic>::new()
        );

        let render = |i: usize| {
            let rule = &rules.rules[i];
            templates
                .render(rule, &sample_context(rule, &business()))
                .unwrap()
        };
        let thanks = render(0);
        assert_eq!(thanks.subject, "Thank you for your order, Alex");
        assert!(
            thanks
                .text
                .starts_with("Hi Alex,\n\nThank you for your order. It means")
        );
        assert!(
            thanks
                .text
                .contains("\n-- \nBloom & Petal\n12 Harbour Road\nBrighton BN1 1AA\n")
        );
        assert!(
            thanks
                .text
                .contains("Unsubscribe: https://example.com/unsubscribe/sample")
        );
        assert!(
            thanks.html.starts_with("<!DOCTYPE html>"),
            "{}",
            thanks.html
        );
        assert!(thanks.html.contains("Hi Alex,</p>"));
        assert!(thanks.html.contains("Bloom &amp; Petal"));
        assert!(
            thanks
                .html
                .contains("12 Harbour Road<br>\nBrighton BN1 1AA")
        );
        assert!(thanks.html.contains("Unsubscribe</a>"));

        let follow_up = render(1);
        assert_eq!(follow_up.subject, "As promised: next steps");
        // 2025-03-14T15:30:00Z is a Friday afternoon in London.
        assert!(
            follow_up
                .text
                .contains("talking with us on Friday, March 14."),
            "{}",
            follow_up.text
        );
        assert!(!follow_up.text.contains("What we agreed"));

        let anniversary = render(2);
        assert_eq!(anniversary.subject, "Happy anniversary, Alex!");
        assert!(anniversary.text.contains("Happy 5th anniversary!"));
        assert!(anniversary.html.contains("Happy 5th anniversary!"));
    }

    #[test]
    fn the_example_templates_read_well_without_a_name_or_an_unsubscribe_link() {
        let rules = example_rules();
        let templates = Templates::load(Path::new(TEMPLATES))
            .unwrap()
            .with_subjects(&rules)
            .unwrap();
        let thank_you = &rules.rules[0];
        let mut context = sparse_context(thank_you, &business());
        context["event"]["data"] = json!({ "order_number": "A-17" });
        let rendered = templates.render(thank_you, &context).unwrap();
        assert_eq!(rendered.subject, "Thank you for your order,");
        assert!(
            rendered
                .text
                .starts_with("Hi there,\n\nThank you for your order (no. A-17).")
        );
        assert!(!rendered.text.contains("Unsubscribe"));
        assert!(!rendered.html.contains("Unsubscribe"));
        assert!(!rendered.html.contains("href"));
    }

    #[test]
    fn html_escapes_customer_data_but_subject_and_text_do_not() {
        let (_dir, templates) = load(&[
            ("t.html.hbs", "<p>{{customer.name}}</p>"),
            ("t.txt.hbs", "{{customer.name}}"),
        ]);
        let rule = rule("r", "t", "Hello {{customer.name}}", purchase());
        let mut context = context();
        let name = r#"<script>alert(1)</script> & "Bob""#;
        context["customer"]["name"] = json!(name);
        let rendered = templates.render(&rule, &context).unwrap();
        assert_eq!(
            rendered.html,
            "<p>&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;Bob&quot;</p>"
        );
        assert_eq!(rendered.text, name);
        assert_eq!(rendered.subject, format!("Hello {name}"));
    }

    #[test]
    fn check_reports_a_misspelt_variable_with_the_template_file_line_and_column() {
        let (dir, templates) = load(&[
            ("bad.html.hbs", "<p>Hi</p>\n<p>{{customr.name}}</p>"),
            ("bad.txt.hbs", "Hi"),
        ]);
        let rules = RuleSet {
            rules: vec![rule("misspelt", "bad", "Hello", purchase())],
        };
        let found = templates.check(&rules, &business());
        assert_eq!(found.len(), 1, "{found:?}");
        let d = &found[0];
        assert_eq!(
            (d.file.as_path(), d.line, d.column),
            (Path::new("config/rules/test.toml"), 3, 12)
        );
        let file = dir.path().join("bad.html.hbs");
        assert!(
            d.message.contains(&format!("{}:2:4:", file.display())),
            "{}",
            d.message
        );
        assert!(d.message.contains("\"customr.name\""), "{}", d.message);
        assert!(
            d.message.contains("rule \"misspelt\", HTML body"),
            "{}",
            d.message
        );
    }

    #[test]
    fn check_reports_subject_errors_at_the_subject_and_sparse_only_failures() {
        let (_dir, templates) = load(&[
            (
                "t.html.hbs",
                "{{#if unsubscribe_url}}ok{{else}}{{unsubscribe_link}}{{/if}}",
            ),
            ("t.txt.hbs", "ok"),
        ]);
        let rules = RuleSet {
            rules: vec![rule("r", "t", "Hi {{customer.nam}}", purchase())],
        };
        let found = templates.check(&rules, &business());
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!((found[0].line, found[0].column), (4, 11));
        assert!(found[0].message.contains("subject") && found[0].message.contains("customer.nam"));
        assert_eq!((found[1].line, found[1].column), (3, 12));
        assert!(found[1].message.contains("unsubscribe_link"));
        assert!(
            found[1].message.contains("no customer name"),
            "{}",
            found[1].message
        );
    }

    #[test]
    fn check_reports_a_rule_whose_template_does_not_exist() {
        let (_dir, templates) = load(&[("t.html.hbs", ""), ("t.txt.hbs", "")]);
        let rules = RuleSet {
            rules: vec![rule("r", "nope", "Hi", purchase())],
        };
        let found = templates.check(&rules, &business());
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].line, found[0].column), (3, 12));
        assert!(
            found[0].message.contains("nope.html.hbs"),
            "{}",
            found[0].message
        );
        assert!(
            found[0].message.contains("there are t"),
            "{}",
            found[0].message
        );
        let error = templates.render(&rules.rules[0], &context()).unwrap_err();
        assert!(matches!(error, RenderError::UnknownTemplate { .. }));
        assert!(
            error
                .to_string()
                .contains("no nope.html.hbs and nope.txt.hbs pair")
        );
    }

    #[test]
    fn if_and_unless_accept_an_absent_optional_value_but_not_a_misspelt_name() {
        let c = context();
        let ok = |t: &str| html(t, &c).unwrap();
        assert_eq!(
            ok("{{#if customer.attributes.vip}}vip{{else}}regular{{/if}}"),
            "regular"
        );
        assert_eq!(
            ok("{{#if customer.attributes.plan}}{{customer.attributes.plan}}{{/if}}"),
            "gold"
        );
        assert_eq!(
            ok("{{#unless event.data.gift}}not a gift{{/unless}}"),
            "not a gift"
        );
        assert_eq!(
            ok("{{#with customer.attributes}}{{#if vip}}v{{else}}r{{/if}}{{/with}}"),
            "r"
        );
        assert_eq!(
            ok("{{#if customer.attributes.address.city}}x{{else}}none{{/if}}"),
            "none"
        );
        assert_eq!(ok("{{#if unsubscribe_url}}u{{/if}}"), "u");
        assert_eq!(
            ok("{{#if @root.customer.attributes.vip}}v{{else}}r{{/if}}"),
            "r"
        );
        assert_eq!(
            ok("{{#each customer.attributes.tags}}{{#if this.x}}!{{/if}}{{this}}{{/each}}"),
            "ab"
        );

        assert_eq!(
            missing(html("{{customr.name}}", &c)).as_deref(),
            Some("customr.name")
        );
        assert_eq!(
            missing(html("{{#if customr.name}}x{{/if}}", &c)).as_deref(),
            Some("customr.name")
        );
        assert_eq!(
            missing(html("{{#unless customer.nickname}}x{{/unless}}", &c)).as_deref(),
            Some("customer.nickname")
        );
        assert_eq!(
            missing(html("{{#if bogus}}x{{/if}}", &c)).as_deref(),
            Some("bogus")
        );
        assert_eq!(
            missing(html("{{customer.attributes.vip}}", &c)).as_deref(),
            Some("customer.attributes.vip")
        );
        // Through a null: fine to test, an error to print.
        let mut schedule = c.clone();
        schedule["event"] = Value::Null;
        assert_eq!(
            html("{{#if event.data.x}}x{{else}}no event{{/if}}", &schedule).unwrap(),
            "no event"
        );
        assert_eq!(
            missing(html("{{event.kind}}", &schedule)).as_deref(),
            Some("event.kind")
        );
    }

    #[test]
    fn each_default_and_lookup_in_strict_mode() {
        let c = context();
        let ok = |t: &str| html(t, &c).unwrap();
        // `each` over a missing list needs an `else` (or an `if` around it).
        assert_eq!(
            ok("{{#each customer.attributes.kids}}x{{else}}none{{/each}}"),
            "none"
        );
        assert!(html("{{#each customer.attributes.kids}}x{{/each}}", &c).is_err());
        // `default` falls back on null, blank and absent optional values, not on misspellings.
        assert_eq!(
            ok(r#"{{default customer.attributes.nick "friend"}}"#),
            "friend"
        );
        assert_eq!(ok(r#"{{default customer.attributes.plan "none"}}"#), "gold");
        assert_eq!(ok(r#"{{default rule.description "none"}}"#), "A test rule");
        let mut nameless = c.clone();
        nameless["customer"]["first_name"] = json!("");
        assert_eq!(
            html(r#"Hi {{default customer.first_name "there"}}"#, &nameless).unwrap(),
            "Hi there"
        );
        assert_eq!(
            missing(html(r#"{{default customr.first_name "x"}}"#, &c)).as_deref(),
            Some("customr.first_name")
        );
        // Comparing an optional value goes through `default`: the built-in `eq` needs both.
        assert!(
            html(
                r#"{{#if (eq customer.attributes.tier "gold")}}g{{/if}}"#,
                &c
            )
            .is_err()
        );
        assert_eq!(
            ok(r#"{{#if (eq (default customer.attributes.tier "") "gold")}}g{{else}}n{{/if}}"#),
            "n"
        );
        // `lookup`: a missing key is false in `if` and an error when printed.
        assert_eq!(ok(r#"{{lookup customer.attributes "plan"}}"#), "gold");
        assert_eq!(
            ok(r#"{{#if (lookup customer.attributes "vip")}}v{{else}}r{{/if}}"#),
            "r"
        );
        assert_eq!(
            ok(r#"{{default (lookup customer.attributes "nick") "friend"}}"#),
            "friend"
        );
        assert_eq!(ok(r#"{{lookup customer.attributes.tags 1}}"#), "b");
        let printed = missing(html(r#"{{lookup customer.attributes "vip"}}"#, &c));
        assert_eq!(
            printed.as_deref(),
            Some(r#"lookup customer.attributes "vip""#)
        );
        assert_eq!(
            missing(html(r#"{{lookup customr.attributes "vip"}}"#, &c)).as_deref(),
            Some("customr.attributes")
        );
    }

    #[test]
    fn subjects_are_put_on_one_line() {
        let (_dir, templates) = load(&[("t.html.hbs", ""), ("t.txt.hbs", "")]);
        let rules = RuleSet {
            rules: vec![rule(
                "r",
                "t",
                "  Hello\n{{customer.name}},\r\n\tyour order  ",
                purchase(),
            )],
        };
        let templates = templates.with_subjects(&rules).unwrap();
        let mut context = context();
        context["customer"]["name"] = json!("Ann\nLee");
        let rendered = templates.render(&rules.rules[0], &context).unwrap();
        assert_eq!(rendered.subject, "Hello Ann Lee, your order");
    }

    #[test]
    fn a_subject_syntax_error_is_reported_at_the_subject() {
        let (_dir, templates) = load(&[("t.html.hbs", ""), ("t.txt.hbs", "")]);
        let rules = RuleSet {
            rules: vec![rule("r", "t", "Hi {{customer.name", purchase())],
        };
        let Diagnostics(found) = templates.with_subjects(&rules).unwrap_err();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].line, found[0].column), (4, 11));
        assert!(
            found[0]
                .message
                .starts_with("subject of rule \"r\": invalid handlebars syntax")
        );
        assert!(
            found[0].message.contains("at character 19 of the subject"),
            "{}",
            found[0].message
        );
    }

    #[test]
    fn ordinals() {
        let cases = [
            (0, "0th"),
            (1, "1st"),
            (2, "2nd"),
            (3, "3rd"),
            (4, "4th"),
            (10, "10th"),
            (11, "11th"),
            (12, "12th"),
            (13, "13th"),
            (21, "21st"),
            (22, "22nd"),
            (23, "23rd"),
            (100, "100th"),
            (101, "101st"),
            (111, "111th"),
            (112, "112th"),
            (-1, "-1st"),
        ];
        for (n, expected) in cases {
            assert_eq!(ordinal(n), expected);
        }
        let mut c = context();
        c["years"] = json!(12);
        assert_eq!(html("{{ordinal years}}", &c).unwrap(), "12th");
        assert_eq!(html(r#"{{ordinal "21"}}"#, &c).unwrap(), "21st");
        c["years"] = Value::Null;
        let error = html("{{ordinal years}}", &c).unwrap_err().to_string();
        assert!(
            error.contains("ordinal: expects a whole number, found null"),
            "{error}"
        );
    }

    #[test]
    fn dates_are_shown_in_the_customer_time_zone_including_feb_29() {
        let mut c = context();
        c["event"]["occurred_at"] = json!("2020-02-29T23:30:00Z");
        c["customer"]["timezone"] = json!("UTC");
        assert_eq!(
            html("{{date event.occurred_at}}", &c).unwrap(),
            "February 29, 2020"
        );
        c["customer"]["timezone"] = json!("Pacific/Auckland");
        assert_eq!(
            html("{{date event.occurred_at}}", &c).unwrap(),
            "March 1, 2020"
        );
        assert_eq!(
            html(
                r#"{{date event.occurred_at "%-d %b %Y %H:%M" tz="America/New_York"}}"#,
                &c
            )
            .unwrap(),
            "29 Feb 2020 18:30"
        );
        // A plain date (midnight UTC) is that date west of Greenwich too, unless tz= asks.
        c["event"]["occurred_at"] = json!("2019-06-15T00:00:00Z");
        c["customer"]["timezone"] = json!("America/Los_Angeles");
        assert_eq!(
            html("{{date event.occurred_at}}", &c).unwrap(),
            "June 15, 2019"
        );
        assert_eq!(
            html(r#"{{date event.occurred_at "%H:%M"}}"#, &c).unwrap(),
            "17:00"
        );
        assert_eq!(
            html(r#"{{date event.occurred_at tz="America/New_York"}}"#, &c).unwrap(),
            "June 14, 2019"
        );
        c["event"]["occurred_at"] = json!("2020-02-29T23:30:00Z");
        c["customer"]["attributes"]["wedding"] = json!("2020-02-29");
        assert_eq!(
            html(r#"{{date customer.attributes.wedding "%B %-d"}}"#, &c).unwrap(),
            "February 29"
        );
        let bad = |t: &str| html(t, &c).unwrap_err().to_string();
        assert!(bad(r#"{{date event.occurred_at "%Q"}}"#).contains("not a valid format"));
        assert!(bad(r#"{{date customer.attributes.wedding "%H:%M"}}"#).contains("asks for more"));
        assert!(bad(r#"{{date rule.name}}"#).contains("neither an RFC 3339 time"));
        assert!(
            bad(r#"{{date event.occurred_at tz="Mars/Olympus"}}"#).contains("unknown time zone")
        );

        // A Feb 29 wedding, five years on.
        let templates = Templates::load(Path::new(TEMPLATES)).unwrap();
        let rules = example_rules();
        let anniversary = &rules.rules[2];
        let customer = Customer {
            id: "c1".to_string(),
            email: "pat@example.com".to_string(),
            name: Some("  Pat  Quinn ".to_string()),
            timezone: None,
            attributes: Value::Null,
        };
        let wedding = Event {
            id: "e1".to_string(),
            customer_id: "c1".to_string(),
            kind: "wedding".to_string(),
            occurred_at: "2020-02-29T14:00:00Z".parse().unwrap(),
            data: Value::Null,
        };
        let extra = MessageExtras {
            years: Some(5),
            message_id: "<m1@example.com>".to_string(),
            unsubscribe_url: None,
            timezone: "Europe/Dublin".to_string(),
            customer_url: None,
        };
        let context = message_context(&customer, Some(&wedding), anniversary, &business(), &extra);
        let rendered = templates.render(anniversary, &context).unwrap();
        assert_eq!(rendered.subject, "Happy anniversary, Pat!");
        assert!(
            rendered
                .text
                .starts_with("Dear Pat,\n\nHappy 5th anniversary!\n")
        );
    }

    #[test]
    fn the_context_has_every_key_with_nulls_for_what_is_not_there() {
        let schedule = rule(
            "monthly",
            "t",
            "s",
            Trigger::Schedule {
                expression: "0 9 1 * *".to_string(),
                cron: "0 9 1 * *".parse().unwrap(),
            },
        );
        let customer = Customer {
            id: "c1".to_string(),
            email: "a@example.com".to_string(),
            name: None,
            timezone: None,
            attributes: Value::Null,
        };
        let extra = MessageExtras {
            years: None,
            message_id: "<m@example.com>".to_string(),
            unsubscribe_url: None,
            timezone: "Europe/Paris".to_string(),
            customer_url: None,
        };
        let context = message_context(&customer, None, &schedule, &business(), &extra);
        assert_eq!(
            context,
            json!({
                "customer": {
                    "id": "c1", "email": "a@example.com", "name": "", "first_name": "",
                    "timezone": "Europe/Paris", "attributes": {},
                },
                "event": null,
                "rule": { "name": "monthly", "description": "A test rule" },
                "business": {
                    "name": "Bloom & Petal",
                    "address": "12 Harbour Road\nBrighton BN1 1AA",
                    "website": "https://bloomandpetal.example",
                },
                "years": null,
                "message": { "id": "<m@example.com>" },
                "unsubscribe_url": null,
                "rating": null,
                "customer_url": null,
            })
        );
        // Samples follow the trigger and the only_if conditions.
        let mut vip = schedule.clone();
        vip.only_if = vec![
            AttributeCondition {
                attribute: "plan".to_string(),
                test: AttributeTest::In(vec![json!("gold"), json!("silver")]),
                event_field: false,
            },
            AttributeCondition {
                attribute: "vip".to_string(),
                test: AttributeTest::Equals(json!(true)),
                event_field: false,
            },
            AttributeCondition {
                attribute: "city".to_string(),
                test: AttributeTest::Exists(true),
                event_field: false,
            },
            AttributeCondition {
                attribute: "banned".to_string(),
                test: AttributeTest::Exists(false),
                event_field: false,
            },
        ];
        let sample = sample_context(&vip, &business());
        assert_eq!(sample["event"], Value::Null);
        assert_eq!(sample["years"], Value::Null);
        assert_eq!(
            sample["customer"]["attributes"],
            json!({ "plan": "gold", "vip": true, "city": "sample" })
        );
        let rules = example_rules();
        let anniversary = sample_context(&rules.rules[2], &business());
        assert_eq!(anniversary["years"], json!(5));
        assert_eq!(anniversary["event"]["kind"], json!("wedding"));
        assert_eq!(
            sample_context(&rules.rules[1], &business())["event"]["kind"],
            json!("discovery_call")
        );
    }

    #[test]
    fn a_lone_half_of_a_pair_and_a_stray_hbs_file_are_diagnostics() {
        let dir = dir_with(&[
            ("alone.html.hbs", "<p>hi</p>"),
            ("solo.txt.hbs", "hi"),
            ("typo.htm.hbs", "hi"),
            ("ok.html.hbs", "<p>ok</p>"),
            ("ok.txt.hbs", "ok"),
            ("README.md", "not a template"),
            (".ok.html.hbs.swp", "editor junk"),
        ]);
        let Diagnostics(found) = Templates::load(dir.path()).unwrap_err();
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0].file, dir.path().join("alone.html.hbs"));
        assert!(found[0].message.contains("add alone.txt.hbs"));
        assert_eq!(found[1].file, dir.path().join("solo.txt.hbs"));
        assert!(found[1].message.contains("add solo.html.hbs"));
        assert_eq!(found[2].file, dir.path().join("typo.htm.hbs"));
    }

    #[test]
    fn syntax_errors_are_all_reported_with_line_and_column() {
        let dir = dir_with(&[
            (
                "a.html.hbs",
                "<p>\n  {{#if customer.name}}\n</p>\n{{/each}}",
            ),
            ("a.txt.hbs", "line 1\n{{customer.name"),
            ("partials/p.hbs", "{{> }}"),
        ]);
        let Diagnostics(found) = Templates::load(dir.path()).unwrap_err();
        let brief: Vec<_> = found
            .iter()
            .map(|d| {
                (
                    d.file.strip_prefix(dir.path()).unwrap().to_path_buf(),
                    d.line,
                    d.column,
                )
            })
            .collect();
        assert_eq!(
            brief,
            [
                (PathBuf::from("a.html.hbs"), 4, 1),
                (PathBuf::from("a.txt.hbs"), 2, 16),
                (PathBuf::from("partials/p.hbs"), 1, 5),
            ]
        );
        assert!(
            found[0]
                .message
                .contains(r#"helper "if" was opened, but "each" is closing"#)
        );
        assert!(
            found[0]
                .to_string()
                .contains("a.html.hbs:4:1: template syntax:")
        );
    }

    #[test]
    fn an_unreadable_directory_is_a_diagnostic() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nowhere");
        let Diagnostics(found) = Templates::load(&missing).unwrap_err();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].file, missing);
        assert!(
            found[0]
                .message
                .starts_with("cannot read the templates directory")
        );
    }

    #[test]
    fn partials_are_shared_by_both_kinds_and_unknown_ones_are_caught() {
        let (_dir, templates) = load(&[
            ("partials/frame.hbs", "[{{> @partial-block}}|{{> sign}}]"),
            ("partials/sign.hbs", "{{business.name}}"),
            (
                "t.html.hbs",
                "{{#> frame}}<b>{{customer.first_name}}</b>{{/frame}}",
            ),
            (
                "t.txt.hbs",
                "{{#*inline \"hello\"}}Hello{{/inline}}{{> hello}} {{> sign}}",
            ),
        ]);
        let with_sign = rule("r", "t", "{{> sign}}: hi", purchase());
        let rendered = templates.render(&with_sign, &context()).unwrap();
        assert_eq!(rendered.html, "[<b>Alex</b>|Bloom &amp; Petal]");
        assert_eq!(rendered.text, "Hello Bloom & Petal");
        assert_eq!(rendered.subject, "Bloom & Petal: hi");
        assert!(templates.exists("t") && !templates.exists("frame") && !templates.exists("sign"));

        // A misspelt layout would otherwise silently drop the layout (handlebars renders the body).
        let dir = dir_with(&[
            ("partials/layout.hbs", "{{> @partial-block}}"),
            (
                "t.html.hbs",
                "x\n{{#if rule.name}}{{#> layuot}}body{{/layuot}}{{/if}}",
            ),
            ("t.txt.hbs", "{{> footer}}"),
        ]);
        let Diagnostics(found) = Templates::load(dir.path()).unwrap_err();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!((found[0].line, found[0].column), (2, 18));
        assert!(
            found[0]
                .message
                .starts_with("there is no partial \"layuot\""),
            "{}",
            found[0].message
        );
        assert!(found[0].message.contains("(there are layout)"));
        assert!(found[1].message.contains("\"footer\""));
        let (_dir, templates) = load(&[("t.html.hbs", ""), ("t.txt.hbs", "")]);
        let rules = RuleSet {
            rules: vec![rule("r", "t", "{{> nope}}", purchase())],
        };
        let Diagnostics(found) = templates.with_subjects(&rules).unwrap_err();
        assert!(found[0].message.contains("there is no partial \"nope\""));
    }

    #[test]
    fn nl2br_breaks_lines_in_html_only() {
        let (_dir, templates) = load(&[
            ("t.html.hbs", "{{nl2br business.address}}"),
            ("t.txt.hbs", "{{nl2br business.address}}"),
        ]);
        let mut c = context();
        c["business"]["address"] = json!("1 <Main> St\r\nTown");
        let rendered = templates
            .render(&rule("r", "t", "s", purchase()), &c)
            .unwrap();
        assert_eq!(rendered.html, "1 &lt;Main&gt; St<br>\nTown");
        assert_eq!(rendered.text, "1 <Main> St\r\nTown");
    }

    #[test]
    fn render_errors_say_which_part_file_and_place() {
        let (_dir, templates) = load(&[
            ("partials/foot.hbs", "ok\n  {{busines.name}}"),
            ("t.html.hbs", "{{> foot}}"),
            ("t.txt.hbs", "fine"),
        ]);
        let error = templates
            .render(&rule("r", "t", "s", purchase()), &context())
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "HTML body of rule \"r\" (partials/foot.hbs, line 2, column 3): \"busines.name\" is not in \
             this message's context (misspelt? A value that may be absent needs {{#if ...}} or \
             {{default ... \"fallback\"}})"
        );
    }

    #[test]
    fn templates_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync + Clone>() {}
        shareable::<Templates>();
    }
}
