//! `/log`: the message log with filters and keyset pages, and `/log.csv`, every matching
//! message as CSV.

use std::collections::BTreeSet;
use std::str::FromStr;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{customer_names, dating, day_start, entry_row, plural, query_string, unavailable};
use crate::query::{LOG_HEADERS, log_row};
use crate::store::{LogCursor, LogFilter, MessageState, SharedStore, StoreError};
use crate::web::Shared;
use crate::web::{Owner, Web};

/// Messages on one page of the log.
pub const PAGE_SIZE: i64 = 50;
/// Rows fetched per query while streaming the CSV download.
const CSV_BATCH: i64 = 1000;

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

/// The filter, and what was wrong with the query (shown, not fatal). Without a state the log
/// is history: what waits to go out is in Upcoming (or behind the state filter).
fn log_filter(web: &Web, query: &LogQuery) -> (LogFilter, Vec<String>) {
    let mut problems = Vec::new();
    let mut filter = LogFilter {
        history: true,
        ..LogFilter::default()
    };
    if let Some(state) = given(&query.state) {
        match MessageState::from_str(state) {
            Ok(state) => {
                filter.state = Some(state);
                filter.history = false;
            }
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
    (filter, problems)
}

/// Where the page starts: after the message `before` names (the last one of the page before).
async fn page_start(
    store: &SharedStore,
    query: &LogQuery,
    problems: &mut Vec<String>,
) -> Result<Option<LogCursor>, StoreError> {
    let Some(before) = given(&query.before) else {
        return Ok(None);
    };
    let Ok(id) = before.parse::<i64>() else {
        problems.push(format!("before: {before:?} is not a message id"));
        return Ok(None);
    };
    match store.message(id).await? {
        Some(entry) => Ok(Some(LogCursor::after(&entry))),
        None => {
            problems.push(format!("before: there is no message {id}"));
            Ok(None)
        }
    }
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

/// The filter form's choices: every state and every rule, the picked ones selected.
fn choices(shared: &Shared, query: &LogQuery) -> (Vec<Value>, Vec<Value>) {
    let selected_state = given(&query.state).unwrap_or_default().to_string();
    let selected_rule = given(&query.rule).unwrap_or_default().to_string();
    let states: Vec<Value> = MessageState::ALL
        .iter()
        .map(|s| json!({ "name": s.as_str(), "selected": s.as_str() == selected_state }))
        .collect();
    let rules: Vec<Value> = rule_names(shared, &selected_rule)
        .into_iter()
        .map(|r| json!({ "selected": r == selected_rule, "name": r }))
        .collect();
    (states, rules)
}

pub async fn log(
    owner: Owner,
    State(shared): State<Shared>,
    Query(query): Query<LogQuery>,
) -> Response {
    let web = owner.web.clone();
    let (mut filter, mut problems) = log_filter(&web, &query);
    let read = async {
        filter.before = page_start(&shared.store, &query, &mut problems).await?;
        filter.limit = Some(PAGE_SIZE + 1);
        let count = shared.store.log_count(&filter).await?;
        Ok::<_, StoreError>((shared.store.log(&filter).await?, count))
    };
    let (mut entries, count) = match read.await {
        Ok(read) => read,
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
    let (states, rules) = choices(&shared, &query);
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
        "paged": filter.before.is_some(),
        "count": count,
        "count_text": format!("{count} message{}", plural(count)),
        "history": filter.history,
        "dating": dating(filter.state),
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
    let cursor = CsvCursor {
        store: shared.store.clone(),
        filter,
        header: false,
        done: false,
    };
    let stream = futures_util::stream::unfold(cursor, |mut cursor| async move {
        let chunk = cursor.next_chunk().await?;
        Some((chunk, cursor))
    });
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
        (
            header::CONTENT_DISPOSITION,
            "attachment; filename=\"touchpoint-log.csv\"",
        ),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    owner.with_cookie(response)
}

/// Where the CSV download is: the header line first, then one batch per query.
struct CsvCursor {
    store: SharedStore,
    filter: LogFilter,
    header: bool,
    done: bool,
}

impl CsvCursor {
    /// The next piece of the file; `None` at its end. A database error ends the file early
    /// (the download fails rather than looking complete).
    async fn next_chunk(&mut self) -> Option<std::io::Result<Vec<u8>>> {
        if self.done {
            return None;
        }
        let mut writer = csv::Writer::from_writer(Vec::new());
        if !self.header {
            self.header = true;
            let written = crate::output::write_csv_row(&mut writer, &LOG_HEADERS);
            return Some(
                written
                    .map_err(std::io::Error::other)
                    .and_then(|()| finish(writer)),
            );
        }
        let entries = match self.store.log(&self.filter).await {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(%error, "CSV download: database error; the file is cut short");
                self.done = true;
                return Some(Err(std::io::Error::other(error.to_string())));
            }
        };
        let last = entries.last()?;
        self.filter.before = Some(LogCursor::after(last));
        self.done = (entries.len() as i64) < CSV_BATCH;
        for entry in &entries {
            if let Err(error) = crate::output::write_csv_row(&mut writer, &log_row(entry)) {
                return Some(Err(std::io::Error::other(error)));
            }
        }
        Some(finish(writer))
    }
}

fn finish(writer: csv::Writer<Vec<u8>>) -> std::io::Result<Vec<u8>> {
    writer
        .into_inner()
        .map_err(|e| std::io::Error::other(e.to_string()))
}
