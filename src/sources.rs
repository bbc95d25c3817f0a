//! Sources: the business's own database, read where it lives.
//!
//! A source is a read-only connection (SQLite or PostgreSQL) and named SQL queries that yield
//! events (`id, customer_id, kind, occurred_at, data`) or customers (`id, email, name, timezone,
//! attributes`) in touchpoint's shape. Event queries take the time window the planner needs as
//! `:from` and `:to`, so planning reads only what can become due; the customers query takes
//! `:id`, and is read again at send time so a changed address is used.
//!
//! Each backend only turns its values into [`Cell`]s; the columns are read into events and
//! customers by one piece of code, so both backends accept and reject the same things.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, NaiveDate, NaiveDateTime, TimeDelta, Utc};
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{Column, Executor, Row, TypeInfo, ValueRef};

use crate::settings::Secret;
use crate::store::{Customer, Event};
use crate::store::{DatabaseUrl, Dialect};

/// `[sources.NAME]` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `sqlite:PATH` or `postgres://...`; opened read-only. Put a password in the environment
    /// (`TOUCHPOINT_SOURCES__NAME__URL`), not in the file.
    pub url: Secret,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// How long one query may run before it is cancelled.
    #[serde(
        default = "default_query_timeout",
        deserialize_with = "crate::settings::duration"
    )]
    pub query_timeout: TimeDelta,
    /// How far before the last pass an incremental pass reads again: rows that become visible
    /// later than they occurred (committed late, or filtered on a status that changes) are
    /// found if they appear within this. The full pass (`planner.reconcile_every`) finds the
    /// rest.
    #[serde(
        default = "default_lookback",
        deserialize_with = "crate::settings::duration"
    )]
    pub lookback: TimeDelta,
    /// `[[sources.NAME.events]]`: queries that yield events.
    #[serde(default)]
    pub events: Vec<EventQueryConfig>,
    /// `[sources.NAME.customers]`: the query that reads one customer by `:id`. Without it, the
    /// source's events name customers of touchpoint's own table.
    #[serde(default)]
    pub customers: Option<CustomerQueryConfig>,
}

fn default_max_connections() -> u32 {
    2
}
fn default_query_timeout() -> TimeDelta {
    TimeDelta::seconds(10)
}
fn default_lookback() -> TimeDelta {
    TimeDelta::minutes(1)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventQueryConfig {
    pub name: String,
    /// The event kinds the query yields; rules name them as they name native kinds.
    pub kinds: Vec<String>,
    /// SQL with `:from` and `:to`, the window of `occurred_at` the planner wants.
    pub query: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerQueryConfig {
    /// SQL with `:id`, yielding at most one row.
    pub query: String,
}

const EVENT_COLUMNS: [&str; 5] = ["id", "customer_id", "kind", "occurred_at", "data"];
const REQUIRED_EVENT_COLUMNS: [&str; 4] = ["id", "customer_id", "kind", "occurred_at"];
const CUSTOMER_COLUMNS: [&str; 5] = ["id", "email", "name", "timezone", "attributes"];
const REQUIRED_CUSTOMER_COLUMNS: [&str; 2] = ["id", "email"];

/// Checks what can be checked without a connection; each problem names the config key.
pub fn validate(sources: &BTreeMap<String, SourceConfig>, base_dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, source) in sources {
        let key = format!("sources.{name}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            problems.push(format!(
                "{key}: a source name may use only a-z, 0-9 and _ (so TOUCHPOINT_SOURCES__{}__URL can override its url)",
                name.to_ascii_uppercase()
            ));
        }
        if let Err(message) = DatabaseUrl::parse(source.url.expose(), base_dir) {
            problems.push(format!("{key}.url: {message}"));
        }
        if source.max_connections == 0 {
            problems.push(format!("{key}.max_connections: expected at least 1"));
        }
        if source.query_timeout <= TimeDelta::zero() {
            problems.push(format!("{key}.query_timeout: expected more than 0s"));
        }
        if source.lookback < TimeDelta::zero() {
            problems.push(format!("{key}.lookback: expected 0s or more"));
        }
        if source.events.is_empty() && source.customers.is_none() {
            problems.push(format!(
                "{key}: has no queries; add [[{key}.events]] (name, kinds, query) or [{key}.customers] (query)"
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, events) in source.events.iter().enumerate() {
            let at = format!("{key}.events[{i}] ({:?})", events.name);
            if events.name.trim().is_empty() {
                problems.push(format!("{key}.events[{i}].name: must not be empty"));
            } else if !names.insert(events.name.as_str()) {
                problems.push(format!("{at}: another query of this source has this name"));
            }
            if events.kinds.is_empty() || events.kinds.iter().any(|k| k.trim().is_empty()) {
                problems.push(format!(
                    "{at}.kinds: list the event kinds the query yields, e.g. kinds = [\"purchase\"]"
                ));
            }
            if let Err(message) = Sql::parse(&events.query, &["from", "to"]) {
                problems.push(format!("{at}.query: {message}"));
            }
        }
        if let Some(customers) = &source.customers
            && let Err(message) = Sql::parse(&customers.query, &["id"])
        {
            problems.push(format!("{key}.customers.query: {message}"));
        }
    }
    problems
}

/// A query with its `:name` parameters replaced by numbered placeholders: `?1` for SQLite,
/// `$1` for PostgreSQL ([`Dialect::placeholder`]), numbered in the order of `names`. Not the
/// store's `Sql`: that numbers each `?` of text touchpoint wrote as a new value, while this is
/// the operator's text, where a parameter may appear twice, `?` is PostgreSQL's JSON operator
/// and dollar quotes, `E''` strings and comments must be skipped.
#[derive(Debug, Clone, PartialEq)]
struct Sql {
    /// The text split at parameters: `parts[0] param[0] parts[1] ...`.
    parts: Vec<String>,
    params: Vec<usize>,
}

impl Sql {
    /// Every name must be used at least once; a `:word` that is not one of them is a mistake.
    /// String literals, quoted identifiers, comments and `::` casts are left alone.
    fn parse(text: &str, names: &[&str]) -> Result<Sql, String> {
        let text = text.trim().trim_end_matches(';').trim_end();
        if text.is_empty() {
            return Err("is empty".into());
        }
        let bytes = text.as_bytes();
        let mut parts = Vec::new();
        let mut params = Vec::new();
        let mut start = 0;
        let mut i = 0;
        // Inside `[...]` a colon is an array slice (`a[1:n]`), not a parameter.
        let mut brackets = 0usize;
        let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        while i < bytes.len() {
            match bytes[i] {
                b'[' => {
                    brackets += 1;
                    i += 1;
                }
                b']' => {
                    brackets = brackets.saturating_sub(1);
                    i += 1;
                }
                // PostgreSQL's E'...' strings, where \' does not end the string.
                b'E' | b'e'
                    if bytes.get(i + 1) == Some(&b'\'') && (i == 0 || !ident(bytes[i - 1])) =>
                {
                    i += 2;
                    while i < bytes.len() && bytes[i] != b'\'' {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
                // PostgreSQL's dollar quoting: $$...$$ or $tag$...$tag$.
                b'$' if (i == 0 || !ident(bytes[i - 1])) && dollar_tag(&text[i..]).is_some() => {
                    let tag = dollar_tag(&text[i..]).unwrap_or("$");
                    let body = i + tag.len();
                    i = text[body..]
                        .find(tag)
                        .map_or(bytes.len(), |end| body + end + tag.len());
                }
                quote @ (b'\'' | b'"') => {
                    i += 1;
                    while i < bytes.len() && bytes[i] != quote {
                        i += 1;
                    }
                    i += 1;
                }
                b'-' if bytes.get(i + 1) == Some(&b'-') => {
                    while i < bytes.len() && bytes[i] != b'\n' {
                        i += 1;
                    }
                }
                b'/' if bytes.get(i + 1) == Some(&b'*') => {
                    i = text[i + 2..]
                        .find("*/")
                        .map_or(bytes.len(), |end| i + end + 4);
                }
                b':' if bytes.get(i + 1) == Some(&b':') => i += 2,
                // A second statement would run outside the wrapping SELECT (SQLite runs every
                // statement of a query, including `VACUUM INTO 'file'`, which writes a copy).
                b';' => {
                    return Err(
                        "holds more than one statement (a `;` before its end); a source query is \
                         one SELECT"
                            .into(),
                    );
                }
                b':' if brackets == 0
                    && bytes.get(i + 1).is_some_and(|b| b.is_ascii_alphabetic()) =>
                {
                    let end = text[i + 1..]
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .map_or(bytes.len(), |n| i + 1 + n);
                    let word = &text[i + 1..end];
                    let Some(index) = names.iter().position(|n| *n == word) else {
                        return Err(format!(
                            "unknown parameter :{word}; this query takes {}",
                            list_params(names)
                        ));
                    };
                    parts.push(text[start..i].to_string());
                    params.push(index);
                    start = end;
                    i = end;
                }
                _ => i += 1,
            }
        }
        parts.push(text[start.min(text.len())..].to_string());
        let missing: Vec<_> = (0..names.len()).filter(|n| !params.contains(n)).collect();
        if !missing.is_empty() {
            let names: Vec<_> = missing.iter().map(|&n| format!(":{}", names[n])).collect();
            return Err(format!(
                "does not use {}; the query must filter on it so that only the rows needed are read",
                names.join(" and ")
            ));
        }
        Ok(Sql { parts, params })
    }

    fn render(&self, dialect: Dialect) -> String {
        let mut out = String::new();
        for (i, part) in self.parts.iter().enumerate() {
            out.push_str(part);
            if let Some(param) = self.params.get(i) {
                out.push_str(&dialect.placeholder(param + 1));
            }
        }
        out
    }
}

/// `$$` or `$tag$` at the start of `text`, if it opens a dollar-quoted string (not `$1`).
fn dollar_tag(text: &str) -> Option<&str> {
    let rest = text.strip_prefix('$')?;
    let end = rest.find('$')?;
    let tag = &rest[..end];
    let valid = tag
        .chars()
        .enumerate()
        .all(|(n, c)| c == '_' || c.is_ascii_alphabetic() || (n > 0 && c.is_ascii_digit()));
    valid.then(|| &text[..end + 2])
}

fn list_params(names: &[&str]) -> String {
    let names: Vec<_> = names.iter().map(|n| format!(":{n}")).collect();
    names.join(" and ")
}

/// Why a source could not be read. `Unavailable` is worth retrying soon; the rest needs the
/// operator (a query or a column that is wrong).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {source_name}: unavailable: {error}")]
    Unavailable {
        source_name: String,
        #[source]
        error: sqlx::Error,
    },
    #[error("source {source_name}, query {query}: {error}")]
    Query {
        source_name: String,
        query: String,
        #[source]
        error: sqlx::Error,
    },
    #[error("source {source_name}, query {query}: no answer within {seconds}s (query_timeout)")]
    Timeout {
        source_name: String,
        query: String,
        seconds: u64,
    },
    /// One row cannot be read (a NULL email, text where a time belongs); the others can.
    #[error("source {source_name}, query {query}: {message}")]
    Row {
        source_name: String,
        query: String,
        message: String,
    },
    /// The source failed a moment ago and is left alone for a while (backing off).
    #[error("source {source_name}: unavailable, not tried again for {seconds}s: {last}")]
    Paused {
        source_name: String,
        seconds: u64,
        last: String,
    },
}

impl SourceError {
    /// The source the error is about.
    pub fn source_name(&self) -> &str {
        match self {
            SourceError::Unavailable { source_name, .. }
            | SourceError::Query { source_name, .. }
            | SourceError::Timeout { source_name, .. }
            | SourceError::Row { source_name, .. }
            | SourceError::Paused { source_name, .. } => source_name,
        }
    }

    /// The error without the database's own words, which can quote the business's data (a
    /// value that did not convert, a constraint's row): what `/healthz` shows to anyone.
    pub fn summary(&self) -> String {
        match self {
            SourceError::Unavailable { source_name, .. }
            | SourceError::Paused { source_name, .. } => {
                format!("source {source_name}: unavailable")
            }
            SourceError::Query {
                source_name, query, ..
            } => format!("source {source_name}, query {query}: the query failed"),
            SourceError::Timeout {
                source_name,
                query,
                seconds,
            } => format!("source {source_name}, query {query}: no answer within {seconds}s"),
            SourceError::Row {
                source_name, query, ..
            } => format!("source {source_name}, query {query}: a row cannot be read"),
        }
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            SourceError::Unavailable { .. }
                | SourceError::Timeout { .. }
                | SourceError::Paused { .. }
        )
    }
}

/// One value of a row, whatever the backend.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Time(DateTime<Utc>),
    Json(serde_json::Value),
    /// A type we cannot read; the name says which, for the message.
    Unsupported(String),
}

/// A row as column name -> value.
type Record = BTreeMap<String, Cell>;

/// The source's own read-only pool: not a store driver, which writes (migrations, a writer
/// connection) and owns its schema.
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Pool {
    fn dialect(&self) -> Dialect {
        match self {
            Pool::Sqlite(_) => Dialect::Sqlite,
            Pool::Postgres(_) => Dialect::Postgres,
        }
    }
}

/// An event query, ready for its backend.
#[derive(Debug)]
pub struct EventQuery {
    pub name: String,
    pub kinds: Vec<String>,
    sql: String,
}

/// Why a query's latest run failed: `detail` for the log and the operator's commands, `summary`
/// (no data from the source) for `/healthz`.
#[derive(Debug, Clone)]
struct Failure {
    summary: String,
    detail: String,
}

/// One configured source: its connection, its queries and what it has done.
pub struct Source {
    pub name: String,
    location: String,
    pool: Pool,
    timeout: Duration,
    pub events: Vec<EventQuery>,
    customers: Option<String>,
    /// How far incremental passes read again (`lookback`).
    pub lookback: TimeDelta,
    pub rows_read: AtomicU64,
    pub errors: AtomicU64,
    /// Rows skipped because they cannot be read.
    pub bad_rows: AtomicU64,
    /// While the source is unavailable: consecutive failures, and until when it is left alone.
    pause: Mutex<(u32, Option<Instant>)>,
    /// The latest error of each query whose latest run failed.
    failing: Mutex<BTreeMap<String, Failure>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("location", &self.location)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

/// Every configured source.
#[derive(Debug, Default)]
pub struct Sources {
    pub sources: Vec<Source>,
}

/// What the planner wants from an event query, and where the event lives afterwards.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceEvent {
    pub source: String,
    pub query: String,
    pub event: Event,
}

impl Sources {
    /// Sets up a pool per source without connecting: a source that is down does not stop the
    /// daemon from starting, and is tried again at every use.
    pub fn from_config(
        sources: &BTreeMap<String, SourceConfig>,
        base_dir: &Path,
    ) -> Result<Sources, String> {
        let mut out = Vec::new();
        for (name, config) in sources {
            out.push(Source::new(name, config, base_dir)?);
        }
        Ok(Sources { sources: out })
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The event queries that yield `kind`, with their source.
    pub fn queries_for<'a>(
        &'a self,
        kind: &'a str,
    ) -> impl Iterator<Item = (&'a Source, &'a EventQuery)> + 'a {
        self.sources.iter().flat_map(move |source| {
            source
                .events
                .iter()
                .filter(move |q| q.kinds.iter().any(|k| k == kind))
                .map(move |q| (source, q))
        })
    }

    pub fn source(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// Whether the customer has an event of `kind` that occurred strictly after `after`, in
    /// the sources whose customers are those of `space`: a source's own customers query makes
    /// its ids its own (client 17 of the shop is not touchpoint's customer 17); sources without
    /// one name touchpoint's customers (`space` is `None`).
    pub async fn has_event_after(
        &self,
        space: Option<&str>,
        customer_id: &str,
        kind: &str,
        after: DateTime<Utc>,
    ) -> Result<bool, SourceError> {
        // Events dated in the future count, as they do in touchpoint's own table.
        let to = Utc::now() + TimeDelta::days(3650);
        for (source, query) in self.queries_for(kind) {
            if source.id_space() != space {
                continue;
            }
            let events = source
                .customer_events(query, customer_id, kind, after, to)
                .await?;
            if events.iter().any(|e| e.occurred_at > after) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Runs every query once with a zero-width window (and the customers query for an id
    /// that names nobody), and checks the columns they return. Returns one line per source.
    pub async fn check(&self) -> Result<Vec<String>, Vec<String>> {
        let mut lines = Vec::new();
        let mut problems = Vec::new();
        for source in &self.sources {
            match source.check().await {
                Ok(line) => lines.push(line),
                Err(mut found) => problems.append(&mut found),
            }
        }
        if problems.is_empty() {
            Ok(lines)
        } else {
            Err(problems)
        }
    }
}

impl Source {
    fn new(name: &str, config: &SourceConfig, base_dir: &Path) -> Result<Source, String> {
        let key = format!("sources.{name}");
        let url = DatabaseUrl::parse(config.url.expose(), base_dir)
            .map_err(|e| format!("{key}.url: {e}"))?;
        let timeout = config
            .query_timeout
            .to_std()
            .unwrap_or(Duration::from_secs(30));
        let pool = match &url {
            DatabaseUrl::Sqlite(path) => {
                // Read-only, and never created: a wrong path is an error, not an empty file.
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .read_only(true)
                    .create_if_missing(false)
                    .busy_timeout(Duration::from_secs(5));
                Pool::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(config.max_connections.max(1))
                        .acquire_timeout(Duration::from_secs(10))
                        .connect_lazy_with(options),
                )
            }
            DatabaseUrl::Postgres(text) => {
                // A little longer than our own deadline, so that ours decides (as a timeout,
                // with back-off) rather than the server's cancel (a query error).
                let timeout_ms = (timeout.as_millis() as u64 + 2_000).to_string();
                let options = PgConnectOptions::from_str(text)
                    .map_err(|e| format!("{key}.url is not a valid PostgreSQL URL: {e}"))?
                    .application_name("touchpoint-source")
                    // Read-only by default, and each query in a READ ONLY transaction of its
                    // own besides (`read_only`); times without a zone are UTC, as touchpoint
                    // reads them.
                    .options([
                        ("default_transaction_read_only", "on"),
                        ("TimeZone", "UTC"),
                        ("statement_timeout", timeout_ms.as_str()),
                        ("client_min_messages", "warning"),
                    ]);
                Pool::Postgres(
                    PgPoolOptions::new()
                        .max_connections(config.max_connections.max(1))
                        .acquire_timeout(Duration::from_secs(10))
                        .connect_lazy_with(options),
                )
            }
        };
        let dialect = pool.dialect();
        let mut events = Vec::new();
        for query in &config.events {
            let sql = Sql::parse(&query.query, &["from", "to"])
                .map_err(|e| format!("{key}.events ({:?}).query: {e}", query.name))?;
            events.push(EventQuery {
                name: query.name.clone(),
                kinds: query.kinds.clone(),
                sql: sql.render(dialect),
            });
        }
        let customers = match &config.customers {
            Some(c) => Some(
                Sql::parse(&c.query, &["id"])
                    .map_err(|e| format!("{key}.customers.query: {e}"))?
                    .render(dialect),
            ),
            None => None,
        };
        Ok(Source {
            name: name.to_string(),
            location: url.describe(),
            pool,
            timeout,
            events,
            customers,
            lookback: config.lookback,
            rows_read: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bad_rows: AtomicU64::new(0),
            pause: Mutex::new((0, None)),
            failing: Mutex::new(BTreeMap::new()),
        })
    }

    fn dialect(&self) -> Dialect {
        self.pool.dialect()
    }

    /// Whether this source has its own customers query.
    pub fn has_customers(&self) -> bool {
        self.customers.is_some()
    }

    /// Whose customers this source's events name: its own (`Some(name)`), or touchpoint's.
    pub fn id_space(&self) -> Option<&str> {
        self.customers.as_ref().map(|_| self.name.as_str())
    }

    /// What fails now: the latest error of each query whose latest run failed.
    pub fn last_error(&self) -> Option<String> {
        self.failures(|f| &f.detail)
    }

    /// Like [`Source::last_error`], without anything read from the source: for `/healthz`.
    pub fn last_error_summary(&self) -> Option<String> {
        self.failures(|f| &f.summary)
    }

    fn failures(&self, text: impl Fn(&Failure) -> &String) -> Option<String> {
        let failing = self.failing.lock().ok()?;
        let texts: Vec<&str> = failing.values().map(|f| text(f).as_str()).collect();
        (!texts.is_empty()).then(|| texts.join("; "))
    }

    /// Events of the query with `from <= occurred_at < to` (as the query filters them).
    pub async fn events_in(
        &self,
        query: &EventQuery,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Event>, SourceError> {
        let binds = [Bind::From(from), Bind::To(to)];
        let rows = self.fetch(&query.name, &query.sql, &binds).await?;
        Ok(self.read_events(query, rows))
    }

    /// One event, read again by its id, in a window of a day either side of the time it
    /// occurred (wide enough for times kept as dates, or as text in another form).
    pub async fn event(
        &self,
        query: &EventQuery,
        id: &str,
        occurred_at: DateTime<Utc>,
    ) -> Result<Option<Event>, SourceError> {
        let sql = wrap(
            &query.sql,
            &format!("CAST(id AS TEXT) = {}", self.dialect().placeholder(3)),
        );
        let binds = [
            Bind::From(occurred_at - TimeDelta::days(1)),
            Bind::To(occurred_at + TimeDelta::days(1)),
            Bind::Text(id.to_string()),
        ];
        let rows = self.fetch(&query.name, &sql, &binds).await?;
        Ok(self.read_events(query, rows).into_iter().next())
    }

    /// A customer's events of `kind` in the window.
    async fn customer_events(
        &self,
        query: &EventQuery,
        customer_id: &str,
        kind: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Event>, SourceError> {
        let dialect = self.dialect();
        let sql = wrap(
            &query.sql,
            &format!(
                "CAST(customer_id AS TEXT) = {} AND kind = {}",
                dialect.placeholder(3),
                dialect.placeholder(4)
            ),
        );
        let binds = [
            Bind::From(from),
            Bind::To(to),
            Bind::Text(customer_id.to_string()),
            Bind::Text(kind.to_string()),
        ];
        let rows = self.fetch(&query.name, &sql, &binds).await?;
        Ok(self.read_events(query, rows))
    }

    /// The customer with this id from the customers query; `None` when it has no row.
    pub async fn customer(&self, id: &str) -> Result<Option<Customer>, SourceError> {
        let Some(sql) = &self.customers else {
            return Ok(None);
        };
        let rows = self
            .fetch("customers", sql, &[Bind::Text(id.to_string())])
            .await?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        read_customer(&row).map(Some).map_err(|message| {
            self.bad_rows.fetch_add(1, Ordering::Relaxed);
            SourceError::Row {
                source_name: self.name.clone(),
                query: "customers".into(),
                message,
            }
        })
    }

    /// The rows as events. A row that cannot be read is skipped (counted, logged, and shown
    /// in /healthz), so that one odd row does not hold up every other customer's message.
    fn read_events(&self, query: &EventQuery, rows: Vec<Record>) -> Vec<Event> {
        let mut events = Vec::with_capacity(rows.len());
        let mut bad = Vec::new();
        for row in &rows {
            match read_event(row) {
                Ok(event) if query.kinds.contains(&event.kind) => events.push(event),
                Ok(event) => bad.push(format!(
                    "event {:?} is of kind {:?}, which the query does not declare in kinds = {:?}",
                    event.id, event.kind, query.kinds
                )),
                Err(message) => bad.push(message),
            }
        }
        let key = format!("{} (rows)", query.name);
        if let Ok(mut failing) = self.failing.lock() {
            match bad.first() {
                Some(first) => {
                    self.bad_rows.fetch_add(bad.len() as u64, Ordering::Relaxed);
                    tracing::warn!(source = %self.name, query = %query.name, skipped = bad.len(), first = %first, "skipped rows that cannot be read");
                    let summary = format!(
                        "source {}, query {}: {} row(s) skipped",
                        self.name,
                        query.name,
                        bad.len()
                    );
                    let detail = format!("{summary}, e.g. {first}");
                    failing.insert(key, Failure { summary, detail });
                }
                None => {
                    failing.remove(&key);
                }
            }
        }
        events
    }

    fn failed(&self, query: &str, error: &SourceError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut failing) = self.failing.lock() {
            let failure = Failure {
                summary: error.summary(),
                detail: error.to_string(),
            };
            failing.insert(query.to_string(), failure);
        }
    }

    /// Runs one query with a deadline and reads its rows as records.
    async fn fetch(
        &self,
        query: &str,
        sql: &str,
        binds: &[Bind],
    ) -> Result<Vec<Record>, SourceError> {
        if let Some(paused) = self.paused() {
            return Err(paused);
        }
        let fetching = async {
            match &self.pool {
                Pool::Sqlite(pool) => {
                    let mut q = sqlx::query(sql);
                    for bind in binds {
                        q = match bind {
                            Bind::From(t) => q.bind(sqlite_time(*t)),
                            // Rounded up: text of whole seconds must not lose the last second.
                            Bind::To(t) => q.bind(sqlite_time(
                                t.duration_round_up(TimeDelta::seconds(1)).unwrap_or(*t),
                            )),
                            Bind::Text(s) => q.bind(s.clone()),
                        };
                    }
                    let rows = q.fetch_all(pool).await?;
                    Ok::<Vec<Record>, sqlx::Error>(rows.iter().map(sqlite_record).collect())
                }
                Pool::Postgres(pool) => {
                    let mut q = sqlx::query(sql);
                    for bind in binds {
                        q = match bind {
                            Bind::From(t) | Bind::To(t) => q.bind(*t),
                            Bind::Text(s) => q.bind(s.clone()),
                        };
                    }
                    let mut tx = read_only(pool).await?;
                    let rows = q.fetch_all(&mut *tx).await?;
                    tx.rollback().await?;
                    Ok(rows.iter().map(postgres_record).collect())
                }
            }
        };
        let result = match tokio::time::timeout(self.timeout, fetching).await {
            Ok(Ok(records)) => Ok(records),
            Ok(Err(error)) => Err(self.classify(query, error)),
            Err(_) => Err(SourceError::Timeout {
                source_name: self.name.clone(),
                query: query.to_string(),
                seconds: self.timeout.as_secs(),
            }),
        };
        match &result {
            Ok(records) => {
                self.rows_read
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                if let Ok(mut failing) = self.failing.lock() {
                    failing.remove(query);
                }
                if let Ok(mut pause) = self.pause.lock() {
                    *pause = (0, None);
                }
            }
            Err(error) => {
                self.failed(query, error);
                if error.is_unavailable() {
                    self.back_off();
                }
            }
        }
        result
    }

    /// While a source is away every use would wait for a connection timeout; it is left alone
    /// for a while instead, longer after each failure (1 s up to 5 minutes).
    fn back_off(&self) {
        if let Ok(mut pause) = self.pause.lock() {
            pause.0 += 1;
            let delay =
                crate::backoff::backoff(pause.0, Duration::from_secs(1), Duration::from_secs(300));
            pause.1 = Some(Instant::now() + delay);
        }
    }

    /// The error to give without trying, while the source is left alone.
    fn paused(&self) -> Option<SourceError> {
        let until = self.pause.lock().ok()?.1?;
        let left = until.checked_duration_since(Instant::now())?;
        Some(SourceError::Paused {
            source_name: self.name.clone(),
            seconds: left.as_secs().max(1),
            last: self.last_error().unwrap_or_default(),
        })
    }

    /// How long until the source is tried again, if it is being left alone.
    pub fn paused_for(&self) -> Option<Duration> {
        let until = self.pause.lock().ok()?.1?;
        until.checked_duration_since(Instant::now())
    }

    fn classify(&self, query: &str, error: sqlx::Error) -> SourceError {
        let source_name = self.name.clone();
        if crate::store::StoreError::is_transient(&error) {
            SourceError::Unavailable { source_name, error }
        } else {
            SourceError::Query {
                source_name,
                query: query.to_string(),
                error,
            }
        }
    }

    /// Checks every query: its columns, the forms touchpoint wraps it in, one run with a
    /// zero-width window, and a sample of rows from any time, which must read and fall inside
    /// the window the query was given. Returns the summary line and notes, or the mistakes.
    async fn check(&self) -> Result<String, Vec<String>> {
        let mut problems = Vec::new();
        let mut notes = Vec::new();
        let mut sampled_customer = None;
        for query in &self.events {
            match self.check_event_query(query).await {
                Ok((note, customer)) => {
                    notes.extend(note);
                    sampled_customer = sampled_customer.or(customer);
                }
                Err(problem) => problems.push(problem),
            }
        }
        if let Some(sql) = &self.customers {
            let checked = self
                .check_columns(
                    "customers",
                    sql,
                    &CUSTOMER_COLUMNS,
                    &REQUIRED_CUSTOMER_COLUMNS,
                )
                .await;
            match (checked, sampled_customer) {
                (Err(problem), _) => problems.push(problem),
                (Ok(()), Some((customer, event))) => match self.customer(&customer).await {
                    Ok(Some(_)) => {}
                    Ok(None) => notes.push(format!(
                        "source {}: the customers query finds no customer {customer:?} (of event {event:?}); such events are not planned",
                        self.name
                    )),
                    Err(error) => problems.push(error.to_string()),
                },
                // Without a sample id only preparing is possible: an id that names nobody
                // may not even parse as the key's type (an integer, a UUID).
                (Ok(()), None) => {}
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let kinds: Vec<_> = self.events.iter().flat_map(|q| q.kinds.clone()).collect();
        let mut line = format!(
            "source {} ({}): OK; events: {}; customers: {}",
            self.name,
            self.location,
            if kinds.is_empty() {
                "none".into()
            } else {
                kinds.join(", ")
            },
            if self.customers.is_some() {
                "from the source"
            } else {
                "touchpoint's own"
            }
        );
        for note in notes {
            line.push_str("\n  note: ");
            line.push_str(&note);
        }
        Ok(line)
    }

    /// One event query's checks; returns a note, if any, and a (customer, event) id pair from
    /// the sample for checking the customers query.
    async fn check_event_query(
        &self,
        query: &EventQuery,
    ) -> Result<(Option<String>, Option<(String, String)>), String> {
        let name = |what: String| format!("source {}, query {}: {what}", self.name, query.name);
        self.check_columns(
            &query.name,
            &query.sql,
            &EVENT_COLUMNS,
            &REQUIRED_EVENT_COLUMNS,
        )
        .await?;
        // The forms used at send time, so a trailing comment or a stray `;` shows here.
        let dialect = self.dialect();
        let filter = format!(
            "CAST(id AS TEXT) = {} AND CAST(customer_id AS TEXT) = {} AND kind = {}",
            dialect.placeholder(3),
            dialect.placeholder(3),
            dialect.placeholder(4)
        );
        let wrapped = wrap(&query.sql, &filter);
        self.prepare(
            &wrapped,
            &[Param::Time, Param::Time, Param::Text, Param::Text],
        )
        .await
        .map_err(|error| {
            name(format!(
                "cannot be used as a subquery, as touchpoint reads it at send time: {error}"
            ))
        })?;
        let now = Utc::now();
        self.events_in(query, now, now)
            .await
            .map_err(|e| e.to_string())?;
        let from = DateTime::<Utc>::UNIX_EPOCH;
        let to = now + TimeDelta::days(1);
        let sample = format!("{} LIMIT 20", wrap(&query.sql, "1 = 1"));
        let rows = self
            .fetch(&query.name, &sample, &[Bind::From(from), Bind::To(to)])
            .await
            .map_err(|e| e.to_string())?;
        let read: Vec<Result<Event, String>> = rows.iter().map(read_event).collect();
        let good: Vec<&Event> = read.iter().filter_map(|r| r.as_ref().ok()).collect();
        let first_bad = read.iter().find_map(|r| r.as_ref().err());
        if let Some(outside) = good
            .iter()
            .find(|e| e.occurred_at < from || e.occurred_at >= to)
        {
            return Err(name(format!(
                "asked for events before {to}, it returned event {:?} that occurred at {}: the filter compares :from and :to with times kept in another form (see the README)",
                outside.id, outside.occurred_at
            )));
        }
        let note = match (good.is_empty(), first_bad) {
            (true, Some(bad)) => return Err(name(format!("no row can be read: {bad}"))),
            (false, Some(bad)) => Some(name(format!(
                "{} of {} sampled rows cannot be read and will be skipped, e.g. {bad}",
                read.len() - good.len(),
                read.len()
            ))),
            (true, None) => Some(name(
                "returned no rows for any time until tomorrow; if the table has rows, the filter compares :from and :to with times kept in another form (see the README)".into(),
            )),
            (false, None) => None,
        };
        let customer = good.first().map(|e| (e.customer_id.clone(), e.id.clone()));
        Ok((note, customer))
    }

    /// Prepares the query (without running it) and checks the names and, where the backend
    /// says them, the types of its columns.
    async fn check_columns(
        &self,
        query: &str,
        sql: &str,
        expected: &[&str],
        required: &[&str],
    ) -> Result<(), String> {
        let params: &[Param] = if query == "customers" {
            &[Param::Text]
        } else {
            &[Param::Time, Param::Time]
        };
        let columns = self
            .prepare(sql, params)
            .await
            .map_err(|error| self.classify(query, error).to_string())?;
        let name = |what: String| format!("source {}, query {query}: {what}", self.name);
        let missing: Vec<_> = required
            .iter()
            .filter(|c| !columns.iter().any(|(n, _)| n == *c))
            .copied()
            .collect();
        if !missing.is_empty() {
            return Err(name(format!(
                "no column {} (it returns {}; it must return {}, renamed with AS where needed)",
                missing.join(", "),
                columns
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                expected.join(", ")
            )));
        }
        for (column, type_name) in &columns {
            if let Err(message) = column_type_fits(column, type_name) {
                return Err(name(message));
            }
        }
        Ok(())
    }
}

/// The user's query as a subquery, filtered further. The newlines keep a trailing `--`
/// comment in the user's text from swallowing the rest.
fn wrap(sql: &str, filter: &str) -> String {
    format!("SELECT * FROM (\n{sql}\n) AS touchpoint_source WHERE {filter}")
}

/// A value to bind; the window's times are bound as each backend compares them best.
enum Bind {
    /// The start of a window (inclusive).
    From(DateTime<Utc>),
    /// Its end (exclusive).
    To(DateTime<Utc>),
    Text(String),
}

/// SQLite has no time type: the window is bound as UTC text in the format of its own
/// `datetime()` (`2026-11-29 10:00:00`), whole seconds, which compares as text with columns
/// kept that way.
fn sqlite_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// What a parameter is bound as, for preparing a query without running it.
#[derive(Clone, Copy)]
enum Param {
    Time,
    Text,
}

impl Source {
    /// Prepares `sql` with the parameter types it will be run with (PostgreSQL keeps the
    /// prepared statement, and a later run binding other types would reuse it), and returns
    /// its columns' names and types.
    async fn prepare(
        &self,
        sql: &str,
        params: &[Param],
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        match &self.pool {
            Pool::Sqlite(pool) => pool.prepare(sql).await.map(|s| column_types(&s)),
            Pool::Postgres(pool) => {
                use sqlx::postgres::PgTypeInfo;
                let types: Vec<PgTypeInfo> = params
                    .iter()
                    .map(|p| match p {
                        Param::Time => <DateTime<Utc> as sqlx::Type<sqlx::Postgres>>::type_info(),
                        Param::Text => <String as sqlx::Type<sqlx::Postgres>>::type_info(),
                    })
                    .collect();
                let mut tx = read_only(pool).await?;
                let columns = (&mut *tx)
                    .prepare_with(sql, &types)
                    .await
                    .map(|s| column_types(&s))?;
                tx.rollback().await?;
                Ok(columns)
            }
        }
    }
}

/// A transaction that PostgreSQL keeps read-only whatever the query does: the session's
/// `default_transaction_read_only` (set when connecting) is only a default, which a query may
/// turn off with `set_config` for the queries after it. Each query gets its own, rolled back
/// afterwards, which also undoes any setting the query changed.
async fn read_only(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with("BEGIN READ ONLY").await
}

fn column_types<'q, S: sqlx::Statement<'q>>(statement: &S) -> Vec<(String, String)> {
    statement
        .columns()
        .iter()
        .map(|c| (c.name().to_string(), c.type_info().name().to_string()))
        .collect()
}

/// Whether a column's declared type can hold what touchpoint reads from it. Unknown types
/// (SQLite expressions have none) pass: the rows are checked as they are read.
fn column_type_fits(column: &str, type_name: &str) -> Result<(), String> {
    let t = type_name.to_ascii_uppercase();
    let fits = match column {
        "occurred_at" => !matches!(
            t.as_str(),
            "BOOL" | "BOOLEAN" | "JSON" | "JSONB" | "BYTEA" | "BLOB" | "UUID"
        ),
        "data" | "attributes" => !matches!(
            t.as_str(),
            "INT2"
                | "INT4"
                | "INT8"
                | "INTEGER"
                | "FLOAT4"
                | "FLOAT8"
                | "REAL"
                | "BOOL"
                | "BOOLEAN"
                | "TIMESTAMPTZ"
                | "TIMESTAMP"
                | "DATE"
        ),
        "id" | "customer_id" | "kind" | "email" | "name" | "timezone" => !matches!(
            t.as_str(),
            "UUID" | "NUMERIC" | "JSON" | "JSONB" | "BYTEA" | "BLOB"
        ),
        _ => true,
    };
    if fits {
        return Ok(());
    }
    let hint = match column {
        "occurred_at" => "a time: timestamptz, timestamp, date, or text like 2026-11-29T10:00:00Z",
        "data" | "attributes" => "a JSON object: json, jsonb, or text holding JSON",
        _ => "text or an integer (cast it, e.g. id::text)",
    };
    Err(format!("column {column} is {type_name}; expected {hint}"))
}

fn sqlite_record(row: &SqliteRow) -> Record {
    let mut record = Record::new();
    for (i, column) in row.columns().iter().enumerate() {
        let cell = match row.try_get_raw(i) {
            Ok(value) if value.is_null() => Cell::Null,
            Ok(value) => match value.type_info().name() {
                "INTEGER" => row.try_get::<i64, _>(i).map(Cell::Int),
                "REAL" => row.try_get::<f64, _>(i).map(Cell::Float),
                "TEXT" => row.try_get::<String, _>(i).map(Cell::Text),
                other => Ok(Cell::Unsupported(other.to_string())),
            }
            .unwrap_or_else(|e| Cell::Unsupported(e.to_string())),
            Err(e) => Cell::Unsupported(e.to_string()),
        };
        record.insert(column.name().to_string(), cell);
    }
    record
}

fn postgres_record(row: &PgRow) -> Record {
    let mut record = Record::new();
    for (i, column) in row.columns().iter().enumerate() {
        let type_name = column.type_info().name().to_string();
        let cell = match row.try_get_raw(i) {
            Ok(value) if value.is_null() => Ok(Cell::Null),
            Ok(_) => match type_name.as_str() {
                "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CITEXT" => {
                    row.try_get::<String, _>(i).map(Cell::Text)
                }
                "INT2" => row.try_get::<i16, _>(i).map(|v| Cell::Int(v.into())),
                "INT4" => row.try_get::<i32, _>(i).map(|v| Cell::Int(v.into())),
                "INT8" => row.try_get::<i64, _>(i).map(Cell::Int),
                "FLOAT4" => row.try_get::<f32, _>(i).map(|v| Cell::Float(v.into())),
                "FLOAT8" => row.try_get::<f64, _>(i).map(Cell::Float),
                "BOOL" => row.try_get::<bool, _>(i).map(Cell::Bool),
                "TIMESTAMPTZ" => row.try_get::<DateTime<Utc>, _>(i).map(Cell::Time),
                "TIMESTAMP" => row
                    .try_get::<NaiveDateTime, _>(i)
                    .map(|t| Cell::Time(t.and_utc())),
                "DATE" => row
                    .try_get::<NaiveDate, _>(i)
                    .map(|d| Cell::Time(d.and_time(chrono::NaiveTime::MIN).and_utc())),
                "JSON" | "JSONB" => row.try_get::<serde_json::Value, _>(i).map(Cell::Json),
                other => Ok(Cell::Unsupported(other.to_string())),
            },
            Err(e) => Err(e),
        }
        .unwrap_or_else(|e| Cell::Unsupported(format!("{type_name} ({e})")));
        record.insert(column.name().to_string(), cell);
    }
    record
}

fn read_event(row: &Record) -> Result<Event, String> {
    let id = text(row, "id")?;
    Ok(Event {
        customer_id: text(row, "customer_id").map_err(|e| format!("event {id:?}: {e}"))?,
        kind: text(row, "kind").map_err(|e| format!("event {id:?}: {e}"))?,
        occurred_at: time(row, "occurred_at").map_err(|e| format!("event {id:?}: {e}"))?,
        data: object(row, "data").map_err(|e| format!("event {id:?}: {e}"))?,
        id,
    })
}

fn read_customer(row: &Record) -> Result<Customer, String> {
    let id = text(row, "id")?;
    let at = |e: String| format!("customer {id:?}: {e}");
    let email = text(row, "email").map_err(at)?;
    let name = optional_text(row, "name").map_err(at)?;
    // The checks of every other writer: a name or address that cannot go into a header skips
    // the row here rather than failing the message later.
    crate::import::check_header_text("email address", email.trim()).map_err(at)?;
    if let Some(name) = &name {
        crate::import::check_header_text("name", name.trim()).map_err(at)?;
    }
    let timezone = optional_text(row, "timezone").map_err(at)?;
    Ok(Customer {
        email,
        name,
        timezone: timezone.filter(|t| !t.trim().is_empty()),
        attributes: object(row, "attributes").map_err(at)?,
        id,
    })
}

fn optional_text(row: &Record, column: &str) -> Result<Option<String>, String> {
    match row.get(column) {
        None | Some(Cell::Null) => Ok(None),
        Some(Cell::Text(s)) => Ok(Some(s.clone())),
        Some(Cell::Int(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(format!(
            "column {column} holds {}; expected text",
            describe(other)
        )),
    }
}

fn text(row: &Record, column: &str) -> Result<String, String> {
    optional_text(row, column)?.ok_or_else(|| format!("column {column} is missing or NULL"))
}

/// A time: a timestamp, text (RFC 3339, `YYYY-MM-DD HH:MM:SS[.fff]` as UTC, or a date), or
/// an integer of seconds since 1970.
fn time(row: &Record, column: &str) -> Result<DateTime<Utc>, String> {
    match row.get(column) {
        Some(Cell::Time(t)) => Ok(*t),
        Some(Cell::Int(seconds)) => DateTime::from_timestamp(*seconds, 0)
            .ok_or_else(|| format!("column {column}: {seconds} is out of range as seconds since 1970")),
        Some(Cell::Text(s)) => parse_source_time(s)
            .ok_or_else(|| format!("column {column}: {s:?} is not a time (expected RFC 3339, YYYY-MM-DD HH:MM:SS in UTC, or a date)")),
        None | Some(Cell::Null) => Err(format!("column {column} is missing or NULL")),
        Some(other) => Err(format!("column {column} holds {}; expected a time", describe(other))),
    }
}

fn parse_source_time(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
}

/// A JSON object: json, or text holding one; NULL or a missing column is `{}`.
fn object(row: &Record, column: &str) -> Result<serde_json::Value, String> {
    let value = match row.get(column) {
        None | Some(Cell::Null) => return Ok(serde_json::json!({})),
        Some(Cell::Json(v)) => v.clone(),
        Some(Cell::Text(s)) => {
            serde_json::from_str(s).map_err(|e| format!("column {column} is not JSON: {e}"))?
        }
        Some(other) => {
            return Err(format!(
                "column {column} holds {}; expected a JSON object",
                describe(other)
            ));
        }
    };
    match value {
        serde_json::Value::Object(_) => Ok(value),
        serde_json::Value::Null => Ok(serde_json::json!({})),
        other => Err(format!(
            "column {column} is {other}; expected a JSON object"
        )),
    }
}

fn describe(cell: &Cell) -> String {
    match cell {
        Cell::Null => "NULL".into(),
        Cell::Text(_) => "text".into(),
        Cell::Int(_) => "an integer".into(),
        Cell::Float(_) => "a number".into(),
        Cell::Bool(_) => "a boolean".into(),
        Cell::Time(_) => "a time".into(),
        Cell::Json(_) => "JSON".into(),
        Cell::Unsupported(name) => {
            format!("a value of type {name} that touchpoint cannot read (cast it to text)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_become_numbered_placeholders() {
        let sql = Sql::parse(
            "SELECT id, ':from' AS lit, \"a:to\", x::text -- :nope\n FROM t WHERE at >= :from AND at < :to /* :no */ AND b >= :from;",
            &["from", "to"],
        )
        .unwrap();
        assert_eq!(
            sql.render(Dialect::Postgres),
            "SELECT id, ':from' AS lit, \"a:to\", x::text -- :nope\n FROM t WHERE at >= $1 AND at < $2 /* :no */ AND b >= $1"
        );
        assert_eq!(
            sql.render(Dialect::Sqlite),
            "SELECT id, ':from' AS lit, \"a:to\", x::text -- :nope\n FROM t WHERE at >= ?1 AND at < ?2 /* :no */ AND b >= ?1"
        );
        let quoted = Sql::parse(
            "SELECT $$ :no $$, $q$ :nor $q$, E'it\\'s :not', a[1:n], x->>'a:b' FROM t WHERE at >= :from AND at < :to",
            &["from", "to"],
        )
        .unwrap();
        assert_eq!(quoted.params, [0, 1]);
        let cast = Sql::parse(
            "SELECT * FROM t WHERE at >= :from::timestamp AND at < :to::timestamp",
            &["from", "to"],
        )
        .unwrap();
        assert_eq!(
            cast.render(Dialect::Postgres),
            "SELECT * FROM t WHERE at >= $1::timestamp AND at < $2::timestamp"
        );
    }

    #[test]
    fn parameter_mistakes_are_named() {
        let unknown = Sql::parse(
            "SELECT * FROM t WHERE at >= :since AND at < :to",
            &["from", "to"],
        );
        assert_eq!(
            unknown.unwrap_err(),
            "unknown parameter :since; this query takes :from and :to"
        );
        let missing = Sql::parse("SELECT * FROM orders", &["from", "to"]).unwrap_err();
        assert!(
            missing.starts_with("does not use :from and :to"),
            "{missing}"
        );
        assert_eq!(Sql::parse("  ; ", &["id"]).unwrap_err(), "is empty");
        let two = "SELECT * FROM t WHERE id = :id; VACUUM INTO '/tmp/copy.db'";
        let error = Sql::parse(two, &["id"]).unwrap_err();
        assert!(
            error.starts_with("holds more than one statement"),
            "{error}"
        );
        // A `;` inside a literal or comment, or at the very end, is not a second statement.
        Sql::parse("SELECT ';' AS s FROM t WHERE id = :id -- a; b\n;", &["id"]).unwrap();
    }

    #[test]
    fn rows_are_read_with_errors_that_name_the_column() {
        let mut row = Record::new();
        row.insert("id".into(), Cell::Int(17));
        row.insert("customer_id".into(), Cell::Text("c1".into()));
        row.insert("kind".into(), Cell::Text("purchase".into()));
        row.insert(
            "occurred_at".into(),
            Cell::Text("2026-11-29 10:00:00.5".into()),
        );
        row.insert("data".into(), Cell::Text(r#"{"total": 12.5}"#.into()));
        let event = read_event(&row).unwrap();
        assert_eq!(event.id, "17");
        assert_eq!(
            event.occurred_at.to_rfc3339(),
            "2026-11-29T10:00:00.500+00:00"
        );
        assert_eq!(event.data["total"], 12.5);

        row.insert("occurred_at".into(), Cell::Int(1_764_410_400));
        assert_eq!(
            read_event(&row).unwrap().occurred_at.to_rfc3339(),
            "2025-11-29T10:00:00+00:00"
        );
        row.insert("occurred_at".into(), Cell::Text("yesterday".into()));
        let error = read_event(&row).unwrap_err();
        assert!(
            error.starts_with("event \"17\": column occurred_at: \"yesterday\" is not a time"),
            "{error}"
        );
        row.insert("occurred_at".into(), Cell::Null);
        assert_eq!(
            read_event(&row).unwrap_err(),
            "event \"17\": column occurred_at is missing or NULL"
        );
        row.insert("occurred_at".into(), Cell::Text("2026-11-29".into()));
        row.insert("data".into(), Cell::Text("[1]".into()));
        assert_eq!(
            read_event(&row).unwrap_err(),
            "event \"17\": column data is [1]; expected a JSON object"
        );
        row.insert("data".into(), Cell::Unsupported("NUMERIC".into()));
        assert!(
            read_event(&row)
                .unwrap_err()
                .contains("type NUMERIC that touchpoint cannot read (cast it to text)")
        );
    }

    #[test]
    fn declared_types_that_cannot_fit_are_refused() {
        assert!(column_type_fits("occurred_at", "TIMESTAMPTZ").is_ok());
        assert!(column_type_fits("occurred_at", "TEXT").is_ok());
        assert!(column_type_fits("occurred_at", "NULL").is_ok());
        assert_eq!(
            column_type_fits("data", "INT4").unwrap_err(),
            "column data is INT4; expected a JSON object: json, jsonb, or text holding JSON"
        );
        assert!(
            column_type_fits("id", "UUID")
                .unwrap_err()
                .contains("id::text")
        );
    }
}
