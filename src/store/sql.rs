//! What the one store needs from a database: a statement written once, with `?` placeholders
//! and its values (`Sql`), and a driver (`Driver`) that supplies the few pieces of SQL text that
//! really differ between databases (its dialect) and runs the statements.

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};

use super::engine::LogPart;
use super::{CustomerPatch, LogFilter, NewMessage, StoreResult};

/// One value bound to a `?` of a statement.
#[derive(Clone)]
pub enum Arg {
    Text(Option<String>),
    Int(i64),
    Int32(i32),
    Bool(bool),
    Float(f64),
    /// An instant; each driver stores it in its own form.
    Time(Option<DateTime<Utc>>),
    Json(Option<serde_json::Value>),
    /// A list of strings, for a driver whose dialect has arrays (`= ANY(?)`).
    TextList(Vec<String>),
}

impl Arg {
    pub fn json(value: &serde_json::Value) -> Arg {
        Arg::Json(Some(value.clone()))
    }
}

impl From<&str> for Arg {
    fn from(value: &str) -> Arg {
        Arg::Text(Some(value.to_string()))
    }
}

impl From<String> for Arg {
    fn from(value: String) -> Arg {
        Arg::Text(Some(value))
    }
}

impl From<&String> for Arg {
    fn from(value: &String) -> Arg {
        Arg::Text(Some(value.clone()))
    }
}

impl From<Option<&str>> for Arg {
    fn from(value: Option<&str>) -> Arg {
        Arg::Text(value.map(str::to_string))
    }
}

impl From<&Option<String>> for Arg {
    fn from(value: &Option<String>) -> Arg {
        Arg::Text(value.clone())
    }
}

impl From<Option<String>> for Arg {
    fn from(value: Option<String>) -> Arg {
        Arg::Text(value)
    }
}

impl From<i64> for Arg {
    fn from(value: i64) -> Arg {
        Arg::Int(value)
    }
}

impl From<i32> for Arg {
    fn from(value: i32) -> Arg {
        Arg::Int32(value)
    }
}

impl From<bool> for Arg {
    fn from(value: bool) -> Arg {
        Arg::Bool(value)
    }
}

impl From<f64> for Arg {
    fn from(value: f64) -> Arg {
        Arg::Float(value)
    }
}

impl From<DateTime<Utc>> for Arg {
    fn from(value: DateTime<Utc>) -> Arg {
        Arg::Time(Some(value))
    }
}

impl From<Option<DateTime<Utc>>> for Arg {
    fn from(value: Option<DateTime<Utc>>) -> Arg {
        Arg::Time(value)
    }
}

/// Which database a statement is written for, where SQL is written outside a [`Driver`] (the
/// queries an operator writes for a source) or numbered for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The placeholder of the `n`th value (from 1): `?1` on SQLite, `$1` on PostgreSQL. Either
    /// may appear more than once in a statement, every time standing for the same value.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
        }
    }
}

/// A statement (or a piece of one) with a `?` for each of its values, in order. The driver
/// turns the `?`s into its own placeholders when it runs the statement.
pub struct Sql {
    text: String,
    args: Vec<Arg>,
    persistent: bool,
}

impl Sql {
    pub fn new(text: impl Into<String>) -> Sql {
        Sql {
            text: text.into(),
            args: Vec::new(),
            persistent: true,
        }
    }

    /// Adds the value of the next `?` already in the text.
    pub fn arg(mut self, arg: impl Into<Arg>) -> Sql {
        self.args.push(arg.into());
        self
    }

    pub fn push(&mut self, text: impl AsRef<str>) -> &mut Sql {
        self.text.push_str(text.as_ref());
        self
    }

    /// Adds a `?` and its value.
    pub fn bind(&mut self, arg: impl Into<Arg>) -> &mut Sql {
        self.text.push('?');
        self.args.push(arg.into());
        self
    }

    pub fn append(&mut self, other: Sql) -> &mut Sql {
        self.text.push_str(&other.text);
        self.args.extend(other.args);
        self
    }

    /// `VALUES (?, ?), (?, ?)`: one tuple per row, of the values `columns` gives.
    pub fn values<T>(&mut self, rows: &[T], columns: impl Fn(&T) -> Vec<Arg>) {
        self.text.push_str("VALUES ");
        for (n, row) in rows.iter().enumerate() {
            if n > 0 {
                self.text.push_str(", ");
            }
            self.text.push('(');
            for (i, arg) in columns(row).into_iter().enumerate() {
                if i > 0 {
                    self.text.push_str(", ");
                }
                self.bind(arg);
            }
            self.text.push(')');
        }
    }

    /// `(?, ?, ?)` of the values.
    pub fn list(&mut self, values: &[String]) -> &mut Sql {
        self.text.push('(');
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.bind(value);
        }
        self.text.push(')');
        self
    }

    /// Planned afresh on each run instead of as a cached prepared statement.
    pub fn persistent(&mut self, persistent: bool) -> &mut Sql {
        self.persistent = persistent;
        self
    }

    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// The text with `?` placeholders, and the values.
    pub fn into_parts(self) -> (String, Vec<Arg>) {
        (self.text, self.args)
    }

    /// The text with `$1, $2, ...` for its `?`s (none inside quoted literals), and the values.
    pub fn into_numbered(self) -> (String, Vec<Arg>) {
        let mut text = String::with_capacity(self.text.len() + 2 * self.args.len());
        let mut quoted = false;
        let mut n = 0;
        for c in self.text.chars() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    text.push(c);
                }
                '?' if !quoted => {
                    n += 1;
                    text.push_str(&Dialect::Postgres.placeholder(n));
                }
                _ => text.push(c),
            }
        }
        (text, self.args)
    }
}

/// The row types a driver decodes: every one decodes from SQLite and from PostgreSQL rows (a
/// third driver adds its row type here).
pub trait FromSqlRow:
    for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
    + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
    + Send
    + Unpin
    + 'static
{
}

impl<T> FromSqlRow for T where
    T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
        + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
        + Send
        + Unpin
        + 'static
{
}

/// Which connections a statement runs on: a driver with one writer (SQLite) sends writes and
/// reads that must see them to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Reader,
    Writer,
}

/// Where an `UPDATE` with history takes the history line's `smtp_reply` from.
pub enum Reply {
    /// The row's own `smtp_reply`.
    Kept,
    Given(Option<String>),
}

/// An `UPDATE messages SET {set} WHERE {rows}` that adds one line to `message_events` per row it
/// changed, with `attempt` = the row's attempts (after the update) + `attempt_offset`.
pub struct LoggedUpdate {
    pub set: Sql,
    pub rows: Sql,
    /// Pick the rows with `FOR UPDATE SKIP LOCKED` where the database has it: rows another
    /// process holds are left to it.
    pub skip_locked: bool,
    pub kind: String,
    pub attempt_offset: i32,
    pub reply: Reply,
    pub detail: serde_json::Value,
}

/// What the log's query over one part adds to find its rows fast (see each driver's
/// `log_narrowing`).
pub struct LogNarrowing {
    /// Text after `FROM messages m`: the index to read the part by, where the dialect names it.
    pub index: String,
    /// Keep the rule and state filters off their indexes: another filter drives the search.
    pub unindexed_rule_state: bool,
    /// Conditions for the customer search and the date range.
    pub conditions: Sql,
}

/// A database: its dialect (the SQL text that differs) and how statements run on it.
#[async_trait]
pub trait Driver: Send + Sync + fmt::Debug + 'static {
    // --- the dialect ------------------------------------------------------------------------
    /// The current time as stored, fixed for the statement (or, on PostgreSQL, the transaction).
    const NOW: &'static str;
    /// The current time as the clock reads while the statement runs.
    const CLOCK: &'static str;
    /// The lock clause that lets concurrent claimers pass each other's rows (empty where one
    /// writer at a time is the rule).
    const SKIP_LOCKED: &'static str;
    /// Ends a subquery so the planner keeps it a per-row index lookup (empty where not needed).
    const FENCE: &'static str;
    /// Whether the planning query may be kept as a cached prepared statement.
    const CACHE_CANDIDATE_PLANS: bool;
    /// How many values one `IN` list may hold (`push_in`).
    const LIST_CHUNK: usize;
    /// Seconds since the oldest due waiting message's `next_attempt_at` (an aggregate).
    const OLDEST_DUE_SECONDS: &'static str;
    /// The current unix time in whole seconds.
    const EPOCH_SECONDS: &'static str;

    /// `{clock} + by`, binding `by` in the driver's own form.
    fn push_later(sql: &mut Sql, clock: &str, by: TimeDelta);
    /// Milliseconds from the clock until the instant `expr`.
    fn millis_until(expr: &str) -> String;
    /// ` INDEXED BY {index}` where the planner needs the hint; empty elsewhere.
    fn indexed_by(index: &str) -> String;
    /// The column in a form the planner does not look up by index (`+col` on SQLite).
    fn unindexed(column: &str) -> String;
    /// A NULL column of a `UNION`-less SELECT, typed where the database needs it.
    fn null(pg_type: &str) -> String;
    /// The start of the UTC hour of the stored instant `column`.
    fn hour_of(column: &str) -> String;
    /// The UTC month and day (`MM-DD`, compared as text) of the stored instant `column`.
    fn month_day(column: &str) -> String;
    /// ` IN (...)` or ` = ANY(?)` of at most `LIST_CHUNK` values.
    fn push_in(sql: &mut Sql, values: &[String]);

    // --- running statements -------------------------------------------------------------------
    async fn fetch_all<T: FromSqlRow>(&self, via: Via, sql: Sql) -> StoreResult<Vec<T>>;
    async fn fetch_optional<T: FromSqlRow>(&self, via: Via, sql: Sql) -> StoreResult<Option<T>>;
    async fn fetch_one<T: FromSqlRow>(&self, via: Via, sql: Sql) -> StoreResult<T>;
    /// Whether the query returns a row.
    async fn exists(&self, via: Via, sql: Sql) -> StoreResult<bool>;
    /// Rows affected.
    async fn execute(&self, via: Via, sql: Sql) -> StoreResult<u64>;
    /// Runs the statements in one transaction; rows affected by all of them.
    async fn execute_all(&self, statements: Vec<Sql>) -> StoreResult<u64>;

    /// Runs the statements in one transaction, in order (each sees what the ones before it
    /// wrote), and returns each one's rows affected. Writes under the same one of the `locks`
    /// never run at the same time, from any process, and each sees what such writes committed
    /// before it (SQLite: its one writer does this already; PostgreSQL: a transaction-scoped
    /// advisory lock per key). The locks are taken first, before anything is read, in one order
    /// every process uses, so that groups of two processes wait for each other instead of
    /// deadlocking. The commit returns only once it is on disk (SQLite runs
    /// `synchronous = NORMAL` otherwise, which survives a crash of the process but not of the
    /// machine): the no-duplicate guarantee rests on these writes.
    /// Each statement ends in `RETURNING <an id>`: the ids each one returned.
    async fn execute_group(
        &self,
        locks: Vec<String>,
        statements: Vec<Sql>,
    ) -> StoreResult<Vec<Vec<i64>>>;

    // --- what differs beyond the text ---------------------------------------------------------
    async fn migrate(&self) -> StoreResult<()>;
    /// Each update and its history lines commit together; `together` asks for all of them in
    /// one transaction. The ids each update changed.
    async fn update_logged(
        &self,
        updates: Vec<LoggedUpdate>,
        together: bool,
    ) -> StoreResult<Vec<Vec<i64>>>;
    /// `update` (an `UPDATE ... RETURNING id, attempts`), then the statements `log` makes of
    /// the rows it changed, in one transaction whose commit need not wait for the disk; the
    /// changed rows' ids and attempts. (A group of outcomes: one statement for all their rows.)
    async fn update_then_log(
        &self,
        update: Sql,
        log: Box<dyn FnOnce(Vec<(i64, i32)>) -> Vec<Sql> + Send>,
    ) -> StoreResult<Vec<(i64, i32)>>;
    /// A relation `v` with the given (name, SQL type) columns, made from one JSON array
    /// parameter of objects with those keys (text, numbers, booleans; times as `time_text`).
    fn json_rows(sql: &mut Sql, json: serde_json::Value, columns: &[(&str, &str)]);
    /// The relation of `json_rows` for rows with large values (rendered bodies): by default
    /// the same JSON parameter; SQLite binds each value on its own, since its `->>` would
    /// parse the whole JSON once per column (BENCHMARKS.md).
    fn value_rows(sql: &mut Sql, rows: Vec<serde_json::Value>, columns: &[(&str, &str)]) {
        Self::json_rows(sql, serde_json::Value::Array(rows), columns);
    }
    /// A time as the JSON of `json_rows` carries it.
    fn time_text(at: DateTime<Utc>) -> String;
    /// The updates in one transaction whose commit need not wait for the disk (outcomes: one
    /// lost in a power cut leaves the attempt in phase `body`, which the reaper settles).
    async fn update_logged_relaxed(&self, updates: Vec<LoggedUpdate>)
    -> StoreResult<Vec<Vec<i64>>>;
    /// See `CustomerStore::merge_customers`; the patches are in id order.
    async fn merge_customers(&self, patches: &[&CustomerPatch]) -> StoreResult<u64>;
    /// See `PlanningStore::insert_messages`: the planner's messages, in order, each one
    /// skipped when its `dedupe_key` exists (or came earlier in `messages`); rows inserted.
    async fn insert_messages(&self, messages: &[NewMessage]) -> StoreResult<u64>;
    /// For one part of the log's query; `ordered`: it reads a page in the log's order (not
    /// a count).
    async fn log_narrowing(
        &self,
        filter: &LogFilter,
        part: LogPart,
        ordered: bool,
    ) -> StoreResult<LogNarrowing>;
}

/// `%text%` for LIKE, lower-cased, with LIKE's own wildcards escaped by `\`.
pub fn like_pattern(text: &str) -> String {
    let escaped = text
        .trim()
        .to_lowercase()
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// A customer search matching at most this many customers looks up their messages by index.
pub const FEW_CUSTOMERS: usize = 500;
/// A date range matching at least this many messages is walked in id order instead.
pub const MANY_ROWS: i64 = 5000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_placeholders_skip_quoted_text() {
        let mut sql = Sql::new("SELECT '?', x FROM t WHERE a = ");
        sql.bind(1i64)
            .push(" AND b LIKE ")
            .bind("%")
            .push(" ESCAPE '\\'");
        sql.push(" AND c = ").bind(true);
        let (text, args) = sql.into_numbered();
        assert_eq!(
            text,
            "SELECT '?', x FROM t WHERE a = $1 AND b LIKE $2 ESCAPE '\\' AND c = $3"
        );
        assert_eq!(args.len(), 3);
    }

    #[test]
    fn placeholders_are_numbered_in_each_dialect() {
        assert_eq!(Dialect::Sqlite.placeholder(3), "?3");
        assert_eq!(Dialect::Postgres.placeholder(12), "$12");
    }

    #[test]
    fn values_make_one_tuple_per_row() {
        let mut sql = Sql::new("INSERT INTO t (a, b) ");
        sql.values(&[1i64, 2], |n| vec![Arg::Int(*n), Arg::Bool(true)]);
        let (text, args) = sql.into_parts();
        assert_eq!(text, "INSERT INTO t (a, b) VALUES (?, ?), (?, ?)");
        assert_eq!(args.len(), 4);
    }
}
