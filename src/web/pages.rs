//! The pages: each handler reads what it shows from the store and hands it to its template.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Owner, Web, auth, encode_query, problem, redirect, safe_next};
use crate::daemon::Shared;
use crate::store::{LogEntry, LogFilter, MessageEvent, MessageState, StoreError};

/// Messages on one page of the log.
pub const PAGE_SIZE: i64 = 50;
/// Rows fetched per query while streaming the CSV download.
const CSV_BATCH: i64 = 1000;
/// The final states the overview counts, in the chart's stacking order.
const FINAL_STATES: [MessageState; 4] = [
    MessageState::Sent,
    MessageState::Failed,
    MessageState::Skipped,
    MessageState::Unknown,
];

pub(super) fn unavailable(web: &Web, error: &StoreError) -> Response {
    tracing::warn!(%error, "web page: database error");
    problem(
        web,
        StatusCode::SERVICE_UNAVAILABLE,
        "The database did not answer",
        "touchpoint cannot read its database right now. Try again in a minute; if it persists, look at the daemon's log.",
    )
}

fn not_found(owner: &Owner, what: &str) -> Response {
    owner.with_cookie(problem(
        &owner.web,
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("There is no {what} with that id."),
    ))
}

/// Start of the local day `days_back` days before today, in the page's time zone.
fn day_start(web: &Web, date: NaiveDate) -> DateTime<Utc> {
    crate::calendar::resolve_local(date.and_time(chrono::NaiveTime::MIN), web.timezone)
}

fn today(web: &Web, now: DateTime<Utc>) -> NaiveDate {
    now.with_timezone(&web.timezone).date_naive()
}

fn state_class(state: MessageState) -> &'static str {
    state.as_str()
}

// --- overview ------------------------------------------------------------------------------

#[derive(Default, Clone, Copy)]
struct Tally {
    sent: i64,
    failed: i64,
    skipped: i64,
    unknown: i64,
    opened: i64,
    clicked: i64,
}

impl Tally {
    fn add_state(&mut self, state: MessageState, n: i64) {
        match state {
            MessageState::Sent => self.sent += n,
            MessageState::Failed => self.failed += n,
            MessageState::Skipped => self.skipped += n,
            MessageState::Unknown => self.unknown += n,
            _ => {}
        }
    }

    fn add(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.failed += other.failed;
        self.skipped += other.skipped;
        self.unknown += other.unknown;
        self.opened += other.opened;
        self.clicked += other.clicked;
    }

    fn json(&self, rule: Option<&str>, from: NaiveDate) -> Value {
        let link = |state: &str| {
            let mut query = vec![("state", state.to_string()), ("from", from.to_string())];
            if let Some(rule) = rule {
                query.push(("rule", rule.to_string()));
            }
            format!("/log?{}", query_string(&query))
        };
        json!({
            "sent": self.sent, "failed": self.failed, "skipped": self.skipped,
            "unknown": self.unknown, "opened": self.opened, "clicked": self.clicked,
            "sent_link": link("sent"), "failed_link": link("failed"),
            "skipped_link": link("skipped"), "unknown_link": link("unknown"),
            "open_rate": percent(self.opened, self.sent),
            "click_rate": percent(self.clicked, self.sent),
        })
    }
}

fn percent(part: i64, whole: i64) -> String {
    if whole <= 0 || part <= 0 {
        return String::new();
    }
    format!("{:.0}%", 100.0 * part as f64 / whole as f64)
}

pub async fn overview(owner: Owner, State(shared): State<Shared>) -> Response {
    let web = owner.web.clone();
    let store = &shared.store;
    let now = Utc::now();
    let today = today(&web, now);
    let first_day = today - TimeDelta::days(29);
    let week_day = today - TimeDelta::days(6);
    let since30 = day_start(&web, first_day);
    let since7 = day_start(&web, week_day);
    let loaded = async {
        Ok::<_, StoreError>((
            store.activity(since30).await?,
            store.engagement(since30).await?,
            store.engagement(since7).await?,
            // Cheap, by the state index (a GROUP BY over every message is not).
            vec![
                (
                    String::new(),
                    MessageState::Unknown,
                    store.count_state(MessageState::Unknown).await?,
                ),
                (
                    String::new(),
                    MessageState::Scheduled,
                    store.count_state(MessageState::Scheduled).await?,
                ),
                (
                    String::new(),
                    MessageState::Retrying,
                    store.count_state(MessageState::Retrying).await?,
                ),
            ],
        ))
    };
    let (activity, engaged30, engaged7, counts) = match loaded.await {
        Ok(loaded) => loaded,
        Err(error) => return owner.with_cookie(unavailable(&web, &error)),
    };

    // Per day (local) and state for the chart; per rule for the tables.
    let mut by_day: BTreeMap<NaiveDate, [i64; 4]> = BTreeMap::new();
    let mut rules30: BTreeMap<String, Tally> = BTreeMap::new();
    let mut rules7: BTreeMap<String, Tally> = BTreeMap::new();
    let running: Vec<String> = shared
        .playbook
        .borrow()
        .rules
        .rules
        .iter()
        .map(|r| r.name.clone())
        .collect();
    for name in &running {
        rules30.entry(name.clone()).or_default();
        rules7.entry(name.clone()).or_default();
    }
    for row in &activity {
        let day = row.hour.with_timezone(&web.timezone).date_naive();
        if day < first_day {
            continue;
        }
        if let Some(i) = FINAL_STATES.iter().position(|s| *s == row.state) {
            by_day.entry(day).or_default()[i] += row.count;
        }
        rules30
            .entry(row.rule.clone())
            .or_default()
            .add_state(row.state, row.count);
        if day >= week_day {
            rules7
                .entry(row.rule.clone())
                .or_default()
                .add_state(row.state, row.count);
        }
    }
    for (rules, engaged) in [(&mut rules30, &engaged30), (&mut rules7, &engaged7)] {
        for (rule, kind, n) in engaged {
            let tally = rules.entry(rule.clone()).or_default();
            match kind.as_str() {
                "opened" => tally.opened += n,
                "clicked" => tally.clicked += n,
                _ => {}
            }
        }
    }
    let table = |rules: &BTreeMap<String, Tally>, from: NaiveDate| {
        let mut total = Tally::default();
        let rows: Vec<Value> = rules
            .iter()
            .map(|(rule, tally)| {
                total.add(tally);
                let mut row = tally.json(Some(rule), from);
                row["rule"] = json!(rule);
                row["rule_link"] = json!(format!("/log?rule={}", encode_query(rule)));
                row
            })
            .collect();
        json!({ "rows": rows, "total": total.json(None, from), "from": from.to_string() })
    };

    let chart = chart(&web, first_day, today, &by_day);
    let of = |state: MessageState| -> i64 {
        counts
            .iter()
            .filter(|(_, s, _)| *s == state)
            .map(|(_, _, n)| n)
            .sum()
    };
    let failed7: i64 = rules7.values().map(|t| t.failed).sum();
    let attention = attention(
        &shared,
        &web,
        now,
        week_day,
        of(MessageState::Unknown),
        failed7,
    )
    .await;
    let data = json!({
        "page": owner.page("Overview", "overview"),
        "attention": attention,
        "week": table(&rules7, week_day),
        "month": table(&rules30, first_day),
        "chart": chart,
        "waiting": of(MessageState::Scheduled) + of(MessageState::Retrying),
        "retrying": of(MessageState::Retrying),
        "timezone": web.timezone.name(),
    });
    owner.render("overview", &data)
}

/// What needs the owner: unknown outcomes, recent failures, a relay that stopped taking mail,
/// a stuck dispatcher, a failed reload, database trouble.
async fn attention(
    shared: &Shared,
    web: &Web,
    now: DateTime<Utc>,
    week_day: NaiveDate,
    unknown: i64,
    failed: i64,
) -> Vec<Value> {
    let mut items = Vec::new();
    let health = &shared.health;
    if let Some((at, reason)) = health.last_relay_error()
        && now - at < TimeDelta::hours(24)
    {
        let latest_sent = shared
            .store
            .log(&LogFilter {
                state: Some(MessageState::Sent),
                limit: Some(1),
                ..LogFilter::default()
            })
            .await
            .ok()
            .and_then(|entries| entries.first().and_then(|e| e.sent_at));
        if latest_sent.is_none_or(|sent| sent < at) {
            items.push(json!({
                "level": "bad",
                "text": format!(
                    "The mail relay has not accepted mail since {}: {reason}. Messages wait and are tried again; nothing is lost.",
                    web.time(at)
                ),
                "link": "/upcoming", "link_text": "What is waiting",
            }));
        }
    }
    if unknown > 0 {
        items.push(json!({
            "level": "bad",
            "text": format!(
                "{unknown} message{} may or may not have been delivered (the relay took the body but its reply was lost). They are not sent again by themselves.",
                plural(unknown)
            ),
            "link": "/log?state=unknown", "link_text": "Look at them",
        }));
    }
    if failed > 0 {
        items.push(json!({
            "level": "bad",
            "text": format!("{failed} message{} failed in the last 7 days.", plural(failed)),
            "link": format!("/log?state=failed&from={week_day}"), "link_text": "See why",
        }));
    }
    let idle = health.dispatcher_idle_for();
    if idle > std::time::Duration::from_secs(30) {
        items.push(json!({
            "level": "bad",
            "text": format!("The dispatcher has not turned its loop for {}s: messages are not going out.", idle.as_secs()),
            "link": Value::Null, "link_text": Value::Null,
        }));
    }
    if let Some(reload) = health.last_reload().filter(|r| !r.ok) {
        items.push(json!({
            "level": "warn",
            "text": format!(
                "The last reload of the rules ({}) failed; the rules that were running still run: {}",
                web.time(reload.at),
                reload.message.lines().next().unwrap_or_default()
            ),
            "link": Value::Null, "link_text": Value::Null,
        }));
    }
    if let Some(error) = health.last_database_error() {
        items.push(json!({
            "level": "warn",
            "text": format!("The database reported a problem: {error}"),
            "link": Value::Null, "link_text": Value::Null,
        }));
    }
    items
}

fn plural(n: i64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Messages per day by state as stacked bars, laid out here so the template only draws them.
fn chart(
    web: &Web,
    first: NaiveDate,
    last: NaiveDate,
    by_day: &BTreeMap<NaiveDate, [i64; 4]>,
) -> Value {
    const WIDTH: f64 = 640.0;
    const TOP: f64 = 14.0;
    const PLOT: f64 = 150.0;
    const LEFT: f64 = 48.0;
    let days: Vec<NaiveDate> = first.iter_days().take_while(|d| *d <= last).collect();
    let max = by_day
        .values()
        .map(|counts| counts.iter().sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    // A round top for the scale: 1, 2, 5, 10, 20, 50...
    let mut top = 1i64;
    for step in [1, 2, 5].iter().cycle().scan(1i64, |scale, &s| {
        let value = s * *scale;
        if s == 5 {
            *scale *= 10;
        }
        Some(value)
    }) {
        top = step;
        if step >= max {
            break;
        }
    }
    let slot = (WIDTH - LEFT) / days.len().max(1) as f64;
    let bar = (slot * 0.72).max(1.0);
    let mut total = 0i64;
    let bars: Vec<Value> = days
        .iter()
        .enumerate()
        .map(|(i, day)| {
            let counts = by_day.get(day).copied().unwrap_or_default();
            let x = LEFT + i as f64 * slot + (slot - bar) / 2.0;
            let mut y = TOP + PLOT;
            let mut segments = Vec::new();
            let mut parts = Vec::new();
            for (state, n) in FINAL_STATES.iter().zip(counts) {
                if n == 0 {
                    continue;
                }
                total += n;
                let h = PLOT * n as f64 / top as f64;
                y -= h;
                segments.push(json!({
                    "class": state.as_str(),
                    "x": round(x), "y": round(y), "w": round(bar), "h": round(h.max(0.5)),
                }));
                parts.push(format!("{n} {state}"));
            }
            let label = day.format("%a %b %-d").to_string();
            let title = if parts.is_empty() {
                format!("{label}: nothing")
            } else {
                format!("{label}: {}", parts.join(", "))
            };
            json!({ "segments": segments, "title": title })
        })
        .collect();
    let mut ticks = Vec::new();
    for (i, day) in days.iter().enumerate() {
        // Every 7th day counting back from today, so today always has its label.
        if (days.len() - 1 - i) % 7 == 0 {
            let last = i + 1 == days.len();
            ticks.push(json!({
                "x": if last { WIDTH } else { round(LEFT + i as f64 * slot + slot / 2.0) },
                "anchor": if last { "end" } else { "middle" },
                "label": day.format("%b %-d").to_string(),
            }));
        }
    }
    json!({
        "width": WIDTH, "height": TOP + PLOT + 30.0,
        "left": LEFT, "top": TOP, "bottom": TOP + PLOT, "label_y": TOP + PLOT + 22.0,
        "mid": round(TOP + PLOT / 2.0), "mid_label": if top % 2 == 0 { (top / 2).to_string() } else { String::new() },
        "max_label": top.to_string(),
        "bars": bars, "ticks": ticks,
        "summary": format!(
            "Messages per day over the last {} days by state ({} in all), days in {}",
            days.len(), total, web.timezone.name()
        ),
        "empty": total == 0,
    })
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

// --- the log ---------------------------------------------------------------------------------

/// The log's filters as they arrive in the query string (empty fields from the form are none).
#[derive(Debug, Default, Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    rule: Option<String>,
    /// A customer's id, or part of their name or email.
    #[serde(default)]
    q: Option<String>,
    /// Dates (YYYY-MM-DD) in the page's time zone, both included.
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    /// Keyset pagination: messages with an id below this.
    #[serde(default)]
    before: Option<String>,
}

fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// The filter, and what was wrong with the query (shown, not fatal).
fn log_filter(web: &Web, query: &LogQuery) -> (LogFilter, Vec<String>) {
    let mut problems = Vec::new();
    let mut filter = LogFilter::default();
    if let Some(state) = given(&query.state) {
        match MessageState::from_str(state) {
            Ok(state) => filter.state = Some(state),
            Err(message) => problems.push(message),
        }
    }
    filter.rule = given(&query.rule).map(str::to_string);
    filter.customer_search = given(&query.q).map(str::to_string);
    let date = |value: &str, what: &str, problems: &mut Vec<String>| {
        NaiveDate::parse_from_str(value, "%Y-%m-%d")
            .map_err(|_| problems.push(format!("{what}: {value:?} is not a date like 2026-11-23")))
            .ok()
    };
    if let Some(from) = given(&query.from).and_then(|v| date(v, "from", &mut problems)) {
        filter.from = Some(day_start(web, from));
    }
    if let Some(to) = given(&query.to).and_then(|v| date(v, "to", &mut problems)) {
        filter.until = to.succ_opt().map(|next| day_start(web, next));
    }
    if let Some(before) = given(&query.before) {
        match before.parse::<i64>() {
            Ok(id) => filter.before_id = Some(id),
            Err(_) => problems.push(format!("before: {before:?} is not a message id")),
        }
    }
    (filter, problems)
}

/// `a=1&b=2`, values percent-encoded, empty values left out.
fn query_string(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| format!("{k}={}", encode_query(v.trim())))
        .collect::<Vec<_>>()
        .join("&")
}

fn filter_pairs(query: &LogQuery) -> Vec<(&'static str, String)> {
    let get = |v: &Option<String>| given(v).unwrap_or_default().to_string();
    vec![
        ("state", get(&query.state)),
        ("rule", get(&query.rule)),
        ("q", get(&query.q)),
        ("from", get(&query.from)),
        ("to", get(&query.to)),
    ]
}

/// Names of customers, for showing with their messages.
async fn customer_names(shared: &Shared, entries: &[LogEntry]) -> HashMap<String, String> {
    let ids: BTreeSet<&str> = entries.iter().map(|e| e.customer_id.as_str()).collect();
    let mut names = HashMap::new();
    for id in ids {
        if let Ok(Some(customer)) = shared.store.customer(id).await
            && let Some(name) = customer.name.filter(|n| !n.trim().is_empty())
        {
            names.insert(id.to_string(), name);
        }
    }
    names
}

fn entry_row(web: &Web, entry: &LogEntry, names: &HashMap<String, String>) -> Value {
    let (when, when_label) = match entry.sent_at {
        Some(sent) => (sent, "sent"),
        None if entry.state.is_final() => (entry.updated_at, entry.state.as_str()),
        None => (entry.next_attempt_at, "due"),
    };
    json!({
        "id": entry.id,
        "link": format!("/messages/{}", entry.id),
        "when": web.time(when),
        "when_label": when_label,
        "state": entry.state.as_str(),
        "state_class": state_class(entry.state),
        "rule": entry.rule,
        "customer_id": entry.customer_id,
        "customer_link": format!("/customers/{}", encode_path(&entry.customer_id)),
        "name": names.get(&entry.customer_id),
        "email": entry.email.clone().unwrap_or_default(),
        "subject": entry.subject.clone().unwrap_or_default(),
        "opened": entry.opens > 0,
        "clicked": entry.clicks > 0,
        "reason": entry.reason.clone().unwrap_or_default(),
    })
}

/// Percent-encodes a path segment.
fn encode_path(segment: &str) -> String {
    encode_query(segment)
}

/// The rule names the owner may pick: the running rules, and the one picked (a rule that is
/// gone, reached from the overview).
fn rule_names(shared: &Shared, selected: &str) -> Vec<String> {
    let mut names: BTreeSet<String> = shared
        .playbook
        .borrow()
        .rules
        .rules
        .iter()
        .map(|r| r.name.clone())
        .collect();
    if !selected.is_empty() {
        names.insert(selected.to_string());
    }
    names.into_iter().collect()
}

pub async fn log(
    owner: Owner,
    State(shared): State<Shared>,
    Query(query): Query<LogQuery>,
) -> Response {
    let web = owner.web.clone();
    let (mut filter, problems) = log_filter(&web, &query);
    filter.limit = Some(PAGE_SIZE + 1);
    let mut entries = match shared.store.log(&filter).await {
        Ok(entries) => entries,
        Err(error) => return owner.with_cookie(unavailable(&web, &error)),
    };
    let more = entries.len() as i64 > PAGE_SIZE;
    entries.truncate(PAGE_SIZE as usize);
    let names = customer_names(&shared, &entries).await;
    let rows: Vec<Value> = entries.iter().map(|e| entry_row(&web, e, &names)).collect();
    let pairs = filter_pairs(&query);
    let filters = query_string(&pairs);
    let older = match (more, entries.last()) {
        (true, Some(last)) => {
            let mut with_before = pairs.clone();
            with_before.push(("before", last.id.to_string()));
            Some(format!("/log?{}", query_string(&with_before)))
        }
        _ => None,
    };
    let selected_state = given(&query.state).unwrap_or_default().to_string();
    let selected_rule = given(&query.rule).unwrap_or_default().to_string();
    let states: Vec<Value> = MessageState::ALL
        .iter()
        .map(|s| json!({ "name": s.as_str(), "selected": s.as_str() == selected_state }))
        .collect();
    let rules: Vec<Value> = rule_names(&shared, &selected_rule)
        .into_iter()
        .map(|r| json!({ "selected": r == selected_rule, "name": r }))
        .collect();
    let data = json!({
        "page": owner.page("Message log", "log"),
        "rows": rows,
        "states": states,
        "rules": rules,
        "q": given(&query.q).unwrap_or_default(),
        "from": given(&query.from).unwrap_or_default(),
        "to": given(&query.to).unwrap_or_default(),
        "problems": problems,
        "filtered": !filters.is_empty(),
        "csv_link": if filters.is_empty() { "/log.csv".to_string() } else { format!("/log.csv?{filters}") },
        "first_link": if filters.is_empty() { "/log".to_string() } else { format!("/log?{filters}") },
        "paged": filter.before_id.is_some(),
        "older_link": older,
        "timezone": web.timezone.name(),
    });
    owner.render("log", &data)
}

/// The filtered log as CSV (the columns of `touchpoint log --format csv`), every matching
/// message, streamed in keyset batches so a large log never sits in memory.
pub async fn log_csv(
    owner: Owner,
    State(shared): State<Shared>,
    Query(query): Query<LogQuery>,
) -> Response {
    let (mut filter, problems) = log_filter(&owner.web, &query);
    if !problems.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            format!("{}\n", problems.join("\n")),
        )
            .into_response();
    }
    filter.limit = Some(CSV_BATCH);
    let store = shared.store.clone();
    struct Cursor {
        store: crate::store::SharedStore,
        filter: LogFilter,
        header: bool,
        done: bool,
    }
    let cursor = Cursor {
        store,
        filter,
        header: false,
        done: false,
    };
    let stream = futures_util::stream::unfold(cursor, |mut cursor| async move {
        if cursor.done {
            return None;
        }
        let mut writer = csv::Writer::from_writer(Vec::new());
        if !cursor.header {
            cursor.header = true;
            let written = crate::output::write_csv_row(&mut writer, &crate::query::LOG_HEADERS);
            let bytes = written.map_err(std::io::Error::other).and_then(|()| {
                writer
                    .into_inner()
                    .map_err(|e| std::io::Error::other(e.to_string()))
            });
            return Some((bytes, cursor));
        }
        let entries = match cursor.store.log(&cursor.filter).await {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(%error, "CSV download: database error; the file is cut short");
                cursor.done = true;
                return Some((Err(std::io::Error::other(error.to_string())), cursor));
            }
        };
        let last = entries.last()?;
        cursor.filter.before_id = Some(last.id);
        cursor.done = (entries.len() as i64) < CSV_BATCH;
        for entry in &entries {
            if let Err(error) =
                crate::output::write_csv_row(&mut writer, &crate::query::log_row(entry))
            {
                return Some((Err(std::io::Error::other(error)), cursor));
            }
        }
        let bytes = writer
            .into_inner()
            .map_err(|e| std::io::Error::other(e.to_string()));
        Some((bytes, cursor))
    });
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"touchpoint-log.csv\""),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    owner.with_cookie(response)
}

// --- one message -------------------------------------------------------------------------------

fn detail_pairs(detail: &Value) -> Vec<Value> {
    match detail {
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| {
                let text = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                json!({ "key": key, "value": text })
            })
            .collect(),
        Value::Null => Vec::new(),
        other => vec![json!({ "key": "", "value": other.to_string() })],
    }
}

fn history_row(web: &Web, event: &MessageEvent) -> Value {
    json!({
        "at": web.time(event.at),
        "kind": event.kind,
        "kind_class": kind_class(&event.kind),
        "attempt": event.attempt,
        "smtp_reply": event.smtp_reply,
        "detail": detail_pairs(&event.detail),
    })
}

/// A CSS class for a history line.
fn kind_class(kind: &str) -> &'static str {
    match kind {
        "sent" | "opened" | "clicked" => "good",
        "failed" | "unknown" | "bounced" | "complained" => "bad",
        "retrying" | "soft_bounced" | "unsubscribed" => "warn",
        _ => "plain",
    }
}

pub async fn message(
    owner: Owner,
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let web = owner.web.clone();
    let Ok(id) = id.parse::<i64>() else {
        return not_found(&owner, "message");
    };
    let store = &shared.store;
    let loaded = async {
        let Some(entry) = store.message(id).await? else {
            return Ok(None);
        };
        let history = store.message_events(id).await?;
        let content = store.sent_content(id).await?;
        let customer = store.customer(&entry.customer_id).await?;
        let event = match &entry.event_id {
            Some(event) => store.event(event).await?,
            None => None,
        };
        Ok::<_, StoreError>(Some((entry, history, content, customer, event)))
    };
    let (entry, history, content, customer, event) = match loaded.await {
        Ok(Some(loaded)) => loaded,
        Ok(None) => return not_found(&owner, "message"),
        Err(error) => return owner.with_cookie(unavailable(&web, &error)),
    };
    let playbook = shared.playbook.borrow().clone();
    let rule = playbook.rule(&entry.rule);
    let clicks: Vec<Value> = history
        .iter()
        .filter(|e| e.kind == "clicked")
        .map(|e| {
            json!({
                "at": web.time(e.at),
                "url": e.detail.get("url").and_then(Value::as_str).unwrap_or_default(),
                // One line per link, counting every click on it.
                "times": (e.count > 1).then(|| format!("{} times", e.count)),
            })
        })
        .collect();
    let (checks, checks_recorded) = match &content {
        Some(content) if !content.checks.is_empty() => (content.checks.clone(), true),
        _ => (rule.map(super::why::conditions).unwrap_or_default(), false),
    };
    let names = customer_names(&shared, std::slice::from_ref(&entry)).await;
    let data = json!({
        "page": owner.page(&format!("Message {id}"), "log"),
        "m": entry_row(&web, &entry, &names),
        "message_id": entry.message_id,
        "due": web.time(entry.due_at),
        "trigger_at": web.time(entry.trigger_at),
        "next_attempt": if entry.state.is_final() { None } else { Some(web.time(entry.next_attempt_at)) },
        "sent_at": entry.sent_at.map(|t| web.time(t)),
        "attempts": entry.attempts,
        "smtp_reply": entry.smtp_reply,
        "reason": entry.reason,
        "opens": entry.opens,
        "opened_at": entry.opened_at.map(|t| web.time(t)),
        "clicks_count": entry.clicks,
        "clicked_at": entry.clicked_at.map(|t| web.time(t)),
        "clicks": clicks,
        "tracks_opens": rule.is_some_and(|r| r.track_opens),
        "tracks_clicks": rule.is_some_and(|r| r.track_clicks),
        "history": history.iter().map(|e| history_row(&web, e)).collect::<Vec<_>>(),
        "rule": rule.map(|r| json!({
            "name": r.name,
            "description": r.description,
            "trigger": super::why::trigger(r),
            "file": format!("{}:{}", r.origin.file.display(), r.origin.line),
        })),
        "rule_name": entry.rule,
        "event": event.as_ref().map(|e| json!({
            "id": e.id,
            "kind": e.kind,
            "at": web.time(e.occurred_at),
            "data": detail_pairs(&e.data),
        })),
        "event_id": entry.event_id,
        "checks": checks,
        "checks_recorded": checks_recorded,
        "customer": customer.as_ref().map(|c| json!({
            "name": c.name, "email": c.email, "timezone": c.timezone,
        })),
        "content": content.as_ref().map(|c| json!({
            "text": c.text,
            "html": c.html,
            "has_html": !c.html.is_empty(),
            "html_link": format!("/messages/{id}/body.html"),
        })),
    });
    owner.render("message", &data)
}

/// The HTML body as it was sent, for the sandboxed frame on the message page: no scripts, no
/// remote images (so looking at it never counts as an open), no forms.
pub async fn message_html(
    owner: Owner,
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let content = match shared.store.sent_content(id).await {
        Ok(Some(content)) if !content.html.is_empty() => content,
        Ok(_) => return (StatusCode::NOT_FOUND, "no HTML body was kept\n").into_response(),
        Err(error) => return unavailable(&owner.web, &error),
    };
    let mut response = content.html.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "SAMEORIGIN"),
        (
            header::CONTENT_SECURITY_POLICY,
            "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    owner.with_cookie(response)
}

// --- one customer -------------------------------------------------------------------------------

pub async fn customer(
    owner: Owner,
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let web = owner.web.clone();
    let store = &shared.store;
    let loaded = async {
        let Some(customer) = store.customer(&id).await? else {
            return Ok(None);
        };
        let events = store.customer_events(&id, 200).await?;
        let messages = store
            .log(&LogFilter {
                customer_id: Some(id.clone()),
                limit: Some(200),
                ..LogFilter::default()
            })
            .await?;
        let activity = store.customer_message_events(&id, 500).await?;
        let suppression = if store.is_suppressed(&customer.email).await? {
            let email = crate::store::normalize_email(&customer.email);
            Some(
                store
                    .suppressions()
                    .await?
                    .into_iter()
                    .find(|s| s.email == email),
            )
        } else {
            None
        };
        Ok::<_, StoreError>(Some((customer, events, messages, activity, suppression)))
    };
    let (customer, events, messages, activity, suppression) = match loaded.await {
        Ok(Some(loaded)) => loaded,
        Ok(None) => return not_found(&owner, "customer"),
        Err(error) => return owner.with_cookie(unavailable(&web, &error)),
    };
    let mut timeline: Vec<(DateTime<Utc>, Value)> = Vec::new();
    for event in &events {
        timeline.push((
            event.occurred_at,
            json!({
                "at": web.time(event.occurred_at),
                "kind": event.kind,
                "kind_class": "event",
                "what": format!("{} (event {})", event.kind, event.id),
                "link": Value::Null,
                "detail": detail_pairs(&event.data),
            }),
        ));
    }
    for line in &activity {
        let what = match line.event.kind.as_str() {
            "clicked" => format!(
                "clicked {} in message {}",
                line.event
                    .detail
                    .get("url")
                    .and_then(Value::as_str)
                    .unwrap_or("a link"),
                line.message
            ),
            kind => format!("{kind}: message {} ({})", line.message, line.rule),
        };
        let mut detail = detail_pairs(&line.event.detail);
        detail.retain(|d| d["key"] != "url");
        if let Some(reply) = &line.event.smtp_reply {
            detail.push(json!({ "key": "SMTP reply", "value": reply }));
        }
        timeline.push((
            line.event.at,
            json!({
                "at": web.time(line.event.at),
                "kind": line.event.kind,
                "kind_class": kind_class(&line.event.kind),
                "what": what,
                "link": format!("/messages/{}", line.message),
                "detail": detail,
            }),
        ));
    }
    if let Some(Some(s)) = &suppression {
        timeline.push((
            s.created_at,
            json!({
                "at": web.time(s.created_at),
                "kind": "suppressed",
                "kind_class": "bad",
                "what": format!("{} put on the suppression list ({})", s.email, s.source),
                "link": "/suppressions",
                "detail": [{ "key": "reason", "value": s.reason }],
            }),
        ));
    }
    timeline.sort_by_key(|line| std::cmp::Reverse(line.0));
    let names = HashMap::from([(
        customer.id.clone(),
        customer.name.clone().unwrap_or_default(),
    )]);
    let attributes = detail_pairs(&customer.attributes);
    let title = customer
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| customer.email.clone());
    let data = json!({
        "page": owner.page(&title, "log"),
        "customer": {
            "id": customer.id,
            "name": customer.name,
            "email": customer.email,
            "timezone": customer.timezone.clone().unwrap_or_else(|| format!("{} (default)", web.plan.default_timezone.name())),
            "attributes": attributes,
        },
        "suppressed": suppression.is_some(),
        "suppression_reason": suppression.flatten().map(|s| s.reason),
        "timeline": timeline.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "messages": messages.iter().map(|m| entry_row(&web, m, &names)).collect::<Vec<_>>(),
        "log_link": format!("/log?q={}", encode_query(&customer.id)),
        "back": format!("/customers/{}", encode_path(&customer.id)),
    });
    owner.render("customer", &data)
}

// --- upcoming -------------------------------------------------------------------------------------

pub async fn upcoming(owner: Owner, State(shared): State<Shared>) -> Response {
    let web = owner.web.clone();
    let playbook = shared.playbook.borrow().clone();
    let upcoming = crate::query::upcoming(&playbook, &web.plan, &shared.store, 7).await;
    let rows = match upcoming {
        Ok(upcoming) => {
            for problem in &upcoming.unreadable {
                tracing::warn!(%problem, "web page: the plan leaves out a source it cannot read");
            }
            upcoming.rows
        }
        Err(error) => {
            tracing::warn!(%error, "web page: cannot compute the plan");
            return owner.with_cookie(problem(
                &web,
                StatusCode::SERVICE_UNAVAILABLE,
                "The plan cannot be computed",
                "touchpoint cannot read its database right now. Try again in a minute.",
            ));
        }
    };
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "due": web.time(r.due_at),
                "rule": r.rule,
                "customer_id": r.customer_id,
                "customer_link": format!("/customers/{}", encode_path(&r.customer_id)),
                "email": r.email,
                "status": r.status,
                "why": r.why,
                "link": r.message_id.map(|id| format!("/messages/{id}")),
            })
        })
        .collect();
    let data = json!({
        "page": owner.page("Upcoming", "upcoming"),
        "rows": rows,
        "timezone": web.timezone.name(),
    });
    owner.render("upcoming", &data)
}

// --- suppressions ---------------------------------------------------------------------------------

pub async fn suppressions(owner: Owner, State(shared): State<Shared>) -> Response {
    let web = owner.web.clone();
    let list = match shared.store.suppressions().await {
        Ok(list) => list,
        Err(error) => return owner.with_cookie(unavailable(&web, &error)),
    };
    let rows: Vec<Value> = list
        .iter()
        .rev()
        .map(|s| {
            json!({
                "email": s.email,
                "reason": s.reason,
                "source": s.source,
                "at": web.time(s.created_at),
            })
        })
        .collect();
    let data = json!({
        "page": owner.page("Suppressions", "suppressions"),
        "rows": rows,
        "error": Value::Null,
        "email": "",
    });
    owner.render("suppressions", &data)
}

#[derive(Debug, Deserialize)]
pub struct SuppressForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    reason: String,
    /// Where to go afterwards (a path on this site).
    #[serde(default)]
    back: Option<String>,
}

fn csrf_failed(owner: &Owner) -> Response {
    owner.with_cookie(problem(
        &owner.web,
        StatusCode::FORBIDDEN,
        "Nothing was changed",
        "The form was too old or did not come from this page. Go back, reload the page and try again.",
    ))
}

pub async fn suppress(
    owner: Owner,
    State(shared): State<Shared>,
    Form(form): Form<SuppressForm>,
) -> Response {
    if !owner.csrf_ok(&form.csrf) {
        return csrf_failed(&owner);
    }
    let email = form.email.trim();
    if let Err(message) = crate::import::check_email(email) {
        let web = owner.web.clone();
        let rows: Vec<Value> = shared
            .store
            .suppressions()
            .await
            .unwrap_or_default()
            .iter()
            .rev()
            .map(|s| json!({ "email": s.email, "reason": s.reason, "source": s.source, "at": web.time(s.created_at) }))
            .collect();
        let data = json!({
            "page": owner.page("Suppressions", "suppressions"),
            "rows": rows,
            "error": message,
            "email": email,
        });
        let mut response = owner.render("suppressions", &data);
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    }
    let reason = match form.reason.trim() {
        "" => "added by the owner on the web page",
        reason => reason,
    };
    if let Err(error) = shared.store.suppress(email, reason, "owner").await {
        return owner.with_cookie(unavailable(&owner.web, &error));
    }
    // Addresses only at debug level, like everywhere else in the logs.
    tracing::info!("an address was suppressed from the web page");
    tracing::debug!(email, "suppressed from the web page");
    owner.with_cookie(redirect(&safe_next(
        form.back.as_deref().or(Some("/suppressions")),
    )))
}

pub async fn unsuppress(
    owner: Owner,
    State(shared): State<Shared>,
    Form(form): Form<SuppressForm>,
) -> Response {
    if !owner.csrf_ok(&form.csrf) {
        return csrf_failed(&owner);
    }
    if let Err(error) = shared.store.unsuppress(form.email.trim()).await {
        return owner.with_cookie(unavailable(&owner.web, &error));
    }
    tracing::info!("an address was removed from the suppressions from the web page");
    tracing::debug!(email = form.email.trim(), "unsuppressed from the web page");
    owner.with_cookie(redirect(&safe_next(
        form.back.as_deref().or(Some("/suppressions")),
    )))
}

// --- login and logout -----------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
pub struct NextQuery {
    #[serde(default)]
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: Option<String>,
}

/// The login form, with a CSRF token tied to a `tp_csrf` cookie (set here when missing).
fn login_form(
    web: &Web,
    headers: &HeaderMap,
    status: StatusCode,
    next: &str,
    error: Option<&str>,
) -> Response {
    let (binding, cookie) = match super::cookie_value(headers, auth::CSRF_COOKIE) {
        Some(value) => (value.to_string(), None),
        None => {
            let value = auth::random_token();
            let cookie = web.cookie(auth::CSRF_COOKIE, &value, None, web.secure(headers));
            (value, Some(cookie))
        }
    };
    let data = json!({
        "page": { "title": "Log in", "nav": "", "csrf": "", "logged_in": false },
        "csrf": web.keys.csrf_token(&binding),
        "next": next,
        "error": error,
    });
    let mut response = web.render("login", &data);
    *response.status_mut() = status;
    if let Some(cookie) = cookie
        && let Ok(value) = HeaderValue::from_str(&cookie)
    {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

pub async fn login_page(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<NextQuery>,
) -> Response {
    let Some(web) = shared.web.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let next = safe_next(query.next.as_deref());
    if web.password_hash.is_none() {
        return match super::not_for_you(&web, Some(peer), &headers) {
            Some(refusal) => refusal,
            None => redirect(&next),
        };
    }
    match web.session(&headers, &shared.store).await {
        Ok(Some(_)) => redirect(&next),
        Ok(None) => login_form(&web, &headers, StatusCode::OK, &next, None),
        Err(error) => unavailable(&web, &error),
    }
}

/// 429 with `Retry-After` and the login form saying why.
fn too_many(web: &Web, headers: &HeaderMap, next: &str, wait: u64, message: &str) -> Response {
    let mut response = login_form(
        web,
        headers,
        StatusCode::TOO_MANY_REQUESTS,
        next,
        Some(message),
    );
    if let Ok(value) = HeaderValue::from_str(&wait.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Checks the password (one check at a time); `None` when no answer came within `HASH_WAIT`.
async fn check_password(web: &Web, password: String) -> Option<bool> {
    web.passwords
        .as_ref()?
        .check(password, super::HASH_WAIT)
        .await
}

pub async fn login(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let Some(web) = shared.web.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let next = safe_next(form.next.as_deref());
    if web.password_hash.is_none() {
        return redirect(&next);
    }
    let ip = super::client::client_ip(Some(peer), &headers, &web.proxies);
    let binding = super::cookie_value(&headers, auth::CSRF_COOKIE).unwrap_or_default();
    if !web.keys.csrf_ok(binding, &form.csrf) {
        return login_form(
            &web,
            &headers,
            StatusCode::FORBIDDEN,
            &next,
            Some("The form was too old or did not come from this page. Please try again."),
        );
    }
    // Counted before the check: parallel attempts get no more checks than sequential ones.
    if let Err(wait) = web.keys.reserve_login(ip) {
        tracing::warn!(%ip, "web login: too many failed attempts");
        let minutes = wait.div_ceil(60);
        let message = format!(
            "Too many wrong passwords from your address. Try again in {minutes} minute{}.",
            plural(minutes as i64)
        );
        return too_many(&web, &headers, &next, wait, &message);
    }
    let Some(verified) = check_password(&web, form.password).await else {
        web.keys.release_login(ip);
        tracing::warn!(%ip, "web login: too many logins at once");
        let message = "Too many logins at once. Try again in a few seconds.";
        return too_many(&web, &headers, &next, 2, message);
    };
    if !verified {
        tracing::warn!(%ip, "web login: wrong password");
        return login_form(
            &web,
            &headers,
            StatusCode::UNAUTHORIZED,
            &next,
            Some("That password is not right."),
        );
    }
    web.keys.login_succeeded(ip);
    tracing::info!(%ip, "web login");
    let lifetime = web.session_lifetime;
    let (_, cookie) = web.keys.new_session(Utc::now() + lifetime);
    let mut response = redirect(&next);
    let set = web.cookie(
        auth::SESSION_COOKIE,
        &cookie,
        Some(lifetime.num_seconds()),
        web.secure(&headers),
    );
    if let Ok(value) = HeaderValue::from_str(&set) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

#[derive(Debug, Deserialize)]
pub struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

/// Ends the session for good (in the database, for every replica and after restarts); if the
/// database cannot record it, says so and keeps the cookie, so that the owner can try again.
pub async fn logout(
    owner: Owner,
    State(shared): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    if !owner.csrf_ok(&form.csrf) {
        return csrf_failed(&owner);
    }
    let web = &owner.web;
    if let Some(session) = &owner.session
        && let Err(error) = web.end_session(session, &shared.store).await
    {
        return unavailable(web, &error);
    }
    let target = if web.password_hash.is_some() {
        "/login"
    } else {
        "/"
    };
    let mut response = redirect(target);
    let cleared = web.cookie(auth::SESSION_COOKIE, "", Some(0), web.secure(&headers));
    if let Ok(value) = HeaderValue::from_str(&cleared) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}
