//! The embedded default: one SQLite file in WAL mode, with a single writer connection (SQLite
//! allows one writer at a time; queuing writers in the pool beats retrying on SQLITE_BUSY) and a
//! few reader connections. Several processes on one file are safe: every claim is one UPDATE
//! statement, serialised by SQLite's write lock, and fenced by its token like on PostgreSQL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::{Arguments, ConnectOptions, SqliteConnection, SqlitePool};
use tokio::sync::{Mutex, MutexGuard};

use super::engine::{LogPart, SqlStore, customer_upserts, customers_by_id, message_inserts};
use super::rows::CustomerRow;
use super::sql::{
    Arg, Driver, FEW_CUSTOMERS, FromSqlRow, LogNarrowing, LoggedUpdate, MANY_ROWS, Reply, Sql, Via,
    like_pattern,
};
use super::{Customer, CustomerPatch, LogFilter, NewMessage, StoreError, StoreResult};

/// The store on a SQLite file.
pub type SqliteStore = SqlStore<SqliteDriver>;

/// SQLite's clock, in the canonical text form all times are stored in.
const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// Times are stored as text that sorts like the instants it names.
fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A modifier for SQLite's date functions: `'+120.000 seconds'`.
fn offset(d: TimeDelta) -> String {
    format!("{:+.3} seconds", d.num_milliseconds() as f64 / 1000.0)
}

/// The one writer connection, held by whoever writes (a lock, not a pool: a pool pings a
/// connection each time it is given back, a round trip to its worker thread per write).
#[derive(Debug, Clone)]
pub struct SqliteDriver {
    path: PathBuf,
    writer: Arc<Mutex<SqliteConnection>>,
    reader: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path, max_connections: u32) -> StoreResult<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Invalid(format!(
                    "cannot create the database directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // No ping before each use (sqlx's default): a SQLite connection cannot go away under
        // us, and the ping is a round trip to the connection's worker thread that doubled the
        // thread hand-offs of every query (BENCHMARKS.md, sending).
        let writer = Arc::new(Mutex::new(
            options
                .clone()
                .pragma("cache_size", WRITER_CACHE_KIB)
                .connect()
                .await?,
        ));
        let reader = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(SqlStore::new(SqliteDriver {
            path: path.to_path_buf(),
            writer,
            reader,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.driver.path
    }
}

/// The writer's page cache (negative: KiB; SQLite's default is 2 MB). Planning a page inserts
/// into every index of `messages`; a cache that holds their hot pages saves re-reading them
/// from the OS for each page (BENCHMARKS.md, planning). Pages are allocated as used, and
/// sending fills it too: 32 MB took the daemon's peak memory sending 20,000 from 26 to 60 MB.
const WRITER_CACHE_KIB: &str = "-8192";

/// History lines per multi-row INSERT (5 parameters each, well under SQLite's limit).
const CHUNK_LINES: usize = 200;

/// A JSON value as the parameter SQLite's `->>` would have made of it.
fn json_arg(value: Option<serde_json::Value>) -> Arg {
    use serde_json::Value;
    match value {
        None | Some(Value::Null) => Arg::Text(None),
        Some(Value::String(text)) => Arg::Text(Some(text)),
        Some(Value::Bool(flag)) => Arg::Bool(flag),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(int) => Arg::Int(int),
            None => Arg::Float(n.as_f64().unwrap_or_default()),
        },
        Some(other) => Arg::Json(Some(other)),
    }
}

/// The values in SQLite's forms: times as canonical text, JSON as text.
fn arguments<'q>(args: Vec<Arg>) -> StoreResult<SqliteArguments<'q>> {
    let mut out = SqliteArguments::default();
    for arg in args {
        let added = match arg {
            Arg::Text(v) => out.add(v),
            Arg::Int(v) => out.add(v),
            Arg::Int32(v) => out.add(v),
            Arg::Bool(v) => out.add(v),
            Arg::Float(v) => out.add(v),
            Arg::Time(v) => out.add(v.map(ts)),
            Arg::Json(v) => out.add(v.map(Json)),
            Arg::TextList(_) => {
                return Err(StoreError::Invalid(
                    "SQLite has no list parameters (a bug: use Driver::push_in)".into(),
                ));
            }
        };
        added.map_err(sqlx::Error::Encode)?;
    }
    Ok(out)
}

impl SqliteDriver {
    async fn writer(&self) -> MutexGuard<'_, SqliteConnection> {
        self.writer.lock().await
    }

    /// How the log's query should find its rows. SQLite keeps no statistics unless ANALYZE
    /// ran, so it cannot tell a customer or date filter that matches a handful of messages from
    /// one that matches half the log, and for the latter it would sort every match to return
    /// one page. A capped look first decides: a few matching customers or dates drive the
    /// search through their index; many are checked while walking ids newest first, which
    /// stops at LIMIT (starting at the newest message in the date range).
    async fn log_access_path(&self, filter: &LogFilter, part: LogPart) -> StoreResult<LogPath> {
        if filter.due_before.is_some() || filter.customer_id.is_some() {
            return Ok(LogPath::Plain);
        }
        if let Some(search) = filter.customer_search.as_deref() {
            let pattern = like_pattern(search);
            let sql = Sql::new(format!(
                "SELECT id FROM customers WHERE id = ? OR lower(email) LIKE ? ESCAPE '\\' \
                 OR lower(name) LIKE ? ESCAPE '\\' LIMIT {}",
                FEW_CUSTOMERS + 1
            ))
            .arg(search)
            .arg(&pattern)
            .arg(&pattern);
            let ids: Vec<(String,)> = self.fetch_all(Via::Reader, sql).await?;
            if ids.len() <= FEW_CUSTOMERS {
                return Ok(LogPath::Customers(
                    ids.into_iter().map(|(id,)| id).collect(),
                ));
            }
        }
        if filter.from.is_none() && filter.until.is_none() {
            return Ok(LogPath::Plain);
        }
        let (from, until) = date_bounds(filter);
        let date = part.date();
        let sql = Sql::new(format!(
            "SELECT COUNT(*) FROM (SELECT 1 FROM messages m{} WHERE {} \
             AND {date} >= ? AND {date} < ? LIMIT {MANY_ROWS})",
            by_date(part),
            part.rows()
        ))
        .arg(&from)
        .arg(&until);
        let (matches,): (i64,) = self.fetch_one(Via::Reader, sql).await?;
        // A wide range: the date index gives the log's order anyway; the planner may still
        // prefer the rule or state index for a rare rule or state.
        Ok(if matches < MANY_ROWS {
            LogPath::Dates
        } else {
            LogPath::Plain
        })
    }

    /// Reads, merges and writes the patched customers under the write lock.
    async fn merge_locked(
        connection: &mut SqliteConnection,
        patches: &[&CustomerPatch],
    ) -> StoreResult<u64> {
        let mut stored: HashMap<String, Customer> = HashMap::new();
        for chunk in patches.chunks(500) {
            let ids: Vec<String> = chunk.iter().map(|p| p.id.clone()).collect();
            let rows: Vec<CustomerRow> =
                fetch_all_on(&mut *connection, customers_by_id(&ids)).await?;
            stored.extend(rows.into_iter().map(|row| {
                let customer = Customer::from(row);
                (customer.id.clone(), customer)
            }));
        }
        let mut created = 0;
        let merged: Vec<Customer> = patches
            .iter()
            .map(|patch| {
                let before = stored.remove(&patch.id);
                created += u64::from(before.is_none());
                (*patch).clone().apply(before)
            })
            .collect();
        for sql in customer_upserts::<SqliteDriver>(&merged.iter().collect::<Vec<_>>()) {
            execute_on(&mut *connection, sql).await?;
        }
        Ok(created)
    }
}

async fn fetch_all_on<T: FromSqlRow>(
    connection: &mut SqliteConnection,
    sql: Sql,
) -> StoreResult<Vec<T>> {
    let (text, args) = sql.into_parts();
    Ok(sqlx::query_as_with(&text, arguments(args)?)
        .fetch_all(connection)
        .await?)
}

/// The statements (each `... RETURNING id`) in one transaction that holds the write lock from
/// its start; the ids each one returned.
async fn run_immediate(
    connection: &mut SqliteConnection,
    statements: Vec<Sql>,
) -> StoreResult<Vec<Vec<i64>>> {
    let mut tx = sqlx::Connection::begin_with(&mut *connection, "BEGIN IMMEDIATE").await?;
    let mut returned = Vec::with_capacity(statements.len());
    for sql in statements {
        let ids: Vec<(i64,)> = fetch_all_on(&mut tx, sql).await?;
        returned.push(ids.into_iter().map(|(id,)| id).collect());
    }
    tx.commit().await?;
    Ok(returned)
}

async fn execute_on(connection: &mut SqliteConnection, sql: Sql) -> StoreResult<u64> {
    let (text, args) = sql.into_parts();
    Ok(sqlx::query_with(&text, arguments(args)?)
        .execute(connection)
        .await?
        .rows_affected())
}

#[async_trait]
impl Driver for SqliteDriver {
    const NOW: &'static str = NOW;
    const CLOCK: &'static str = NOW;
    // One writer at a time: the claim's UPDATE holds the write lock, nothing to skip.
    const SKIP_LOCKED: &'static str = "";
    const FENCE: &'static str = "";
    const CACHE_CANDIDATE_PLANS: bool = true;
    const LIST_CHUNK: usize = 500;
    const OLDEST_DUE_SECONDS: &'static str = "MAX((julianday(strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) - julianday(next_attempt_at)) * 86400.0)";
    const EPOCH_SECONDS: &'static str = "CAST(strftime('%s', 'now') AS INTEGER)";

    fn push_later(sql: &mut Sql, _clock: &str, by: TimeDelta) {
        sql.push("strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ")
            .bind(offset(by))
            .push(")");
    }

    fn millis_until(expr: &str) -> String {
        format!("(julianday({expr}) - julianday({NOW})) * 86400000.0")
    }

    fn indexed_by(index: &str) -> String {
        format!(" INDEXED BY {index}")
    }

    fn unindexed(column: &str) -> String {
        format!("+{column}")
    }

    fn null(_pg_type: &str) -> String {
        "NULL".into()
    }

    fn hour_of(column: &str) -> String {
        format!("substr({column}, 1, 13) || ':00:00Z'")
    }

    fn month_day(column: &str) -> String {
        // Times are kept as `YYYY-MM-DDTHH:MM:SS.sssZ` (see `ts`).
        format!("substr({column}, 6, 5)")
    }

    fn push_in(sql: &mut Sql, values: &[String]) {
        sql.push(" IN ");
        if values.is_empty() {
            sql.push("(NULL)");
        } else {
            sql.list(values);
        }
    }

    async fn fetch_all<T: FromSqlRow>(&self, via: Via, sql: Sql) -> StoreResult<Vec<T>> {
        let persistent = sql.is_persistent();
        let (text, args) = sql.into_parts();
        let query = sqlx::query_as_with(&text, arguments(args)?).persistent(persistent);
        Ok(match via {
            Via::Reader => query.fetch_all(&self.reader).await?,
            Via::Writer => query.fetch_all(&mut *self.writer().await).await?,
        })
    }

    async fn fetch_optional<T: FromSqlRow>(&self, via: Via, sql: Sql) -> StoreResult<Option<T>> {
        let (text, args) = sql.into_parts();
        let query = sqlx::query_as_with(&text, arguments(args)?);
        Ok(match via {
            Via::Reader => query.fetch_optional(&self.reader).await?,
            Via::Writer => query.fetch_optional(&mut *self.writer().await).await?,
        })
    }

    async fn fetch_one<T: FromSqlRow>(&self, via: Via, sql: Sql) -> StoreResult<T> {
        let (text, args) = sql.into_parts();
        let query = sqlx::query_as_with(&text, arguments(args)?);
        Ok(match via {
            Via::Reader => query.fetch_one(&self.reader).await?,
            Via::Writer => query.fetch_one(&mut *self.writer().await).await?,
        })
    }

    async fn exists(&self, via: Via, sql: Sql) -> StoreResult<bool> {
        let (text, args) = sql.into_parts();
        let query = sqlx::query_with(&text, arguments(args)?);
        let row = match via {
            Via::Reader => query.fetch_optional(&self.reader).await?,
            Via::Writer => query.fetch_optional(&mut *self.writer().await).await?,
        };
        Ok(row.is_some())
    }

    async fn execute(&self, via: Via, sql: Sql) -> StoreResult<u64> {
        let (text, args) = sql.into_parts();
        let query = sqlx::query_with(&text, arguments(args)?);
        let done = match via {
            Via::Reader => query.execute(&self.reader).await?,
            Via::Writer => query.execute(&mut *self.writer().await).await?,
        };
        Ok(done.rows_affected())
    }

    async fn execute_all(&self, statements: Vec<Sql>) -> StoreResult<u64> {
        let mut writer = self.writer().await;
        let mut tx = sqlx::Connection::begin(&mut *writer).await?;
        let mut affected = 0;
        for sql in statements {
            affected += execute_on(&mut tx, sql).await?;
        }
        tx.commit().await?;
        Ok(affected)
    }

    async fn execute_group(
        &self,
        _locks: Vec<String>,
        statements: Vec<Sql>,
    ) -> StoreResult<Vec<Vec<i64>>> {
        // The write lock from BEGIN IMMEDIATE on serialises every writer of the file, of this
        // process or another, so the keys need no locks of their own.
        let mut writer = self.writer().await;
        // In WAL mode `NORMAL` syncs the log only at checkpoints: a commit survives a killed
        // process, not a power cut. `FULL` syncs the log at this commit (one fsync for the
        // whole group); the connection goes back to `NORMAL` for everything else.
        sqlx::query("PRAGMA synchronous = FULL")
            .execute(&mut *writer)
            .await?;
        let result = run_immediate(&mut writer, statements).await;
        let restored = sqlx::query("PRAGMA synchronous = NORMAL")
            .execute(&mut *writer)
            .await;
        if let Err(error) = restored {
            // The group is committed either way; only later commits would sync more than needed.
            tracing::warn!(%error, "cannot set the SQLite writer back to synchronous = NORMAL");
        }
        result
    }

    async fn migrate(&self) -> StoreResult<()> {
        // sqlx takes no lock for SQLite: two processes starting on a fresh file would both
        // read "nothing applied" and the second would fail on `CREATE TABLE`. Holding the write
        // lock (BEGIN IMMEDIATE, waiting out busy_timeout) across the whole run serialises them;
        // sqlx's per-migration transactions become savepoints inside this one.
        let mut connection = self.writer().await;
        let mut tx = sqlx::Connection::begin_with(&mut *connection, "BEGIN IMMEDIATE").await?;
        // `run_direct`: `run(&mut *tx)` hits sqlx's "Acquire is not general enough" in async-trait.
        sqlx::migrate!("./migrations/sqlite")
            .run_direct(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// No DML in a WITH on SQLite: each UPDATE returns its rows and their history lines follow,
    /// all in one transaction (which the single writer makes exclusive).
    async fn update_logged(
        &self,
        updates: Vec<LoggedUpdate>,
        _together: bool,
    ) -> StoreResult<Vec<Vec<i64>>> {
        let mut writer = self.writer().await;
        let mut tx = sqlx::Connection::begin(&mut *writer).await?;
        let mut changed = Vec::with_capacity(updates.len());
        // The history lines of all the updates, written in one statement at the end.
        let mut lines: Vec<[Arg; 5]> = Vec::new();
        for update in updates {
            let mut sql = Sql::new("UPDATE messages SET ");
            sql.append(update.set).push(" WHERE ").append(update.rows);
            sql.push(" RETURNING id, attempts, smtp_reply");
            let rows: Vec<(i64, i32, Option<String>)> = fetch_all_on(&mut tx, sql).await?;
            let mut ids = Vec::with_capacity(rows.len());
            for (id, attempts, kept) in rows {
                let reply = match &update.reply {
                    Reply::Kept => kept,
                    Reply::Given(reply) => reply.clone(),
                };
                lines.push([
                    id.into(),
                    update.kind.as_str().into(),
                    (attempts + update.attempt_offset).into(),
                    reply.into(),
                    Arg::json(&update.detail),
                ]);
                ids.push(id);
            }
            changed.push(ids);
        }
        for chunk in lines.chunks(CHUNK_LINES) {
            let mut sql = Sql::new(
                "INSERT INTO message_events (message_id, kind, attempt, smtp_reply, detail) ",
            );
            sql.values(chunk, |line| line.to_vec());
            execute_on(&mut tx, sql).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    async fn update_then_log(
        &self,
        update: Sql,
        log: Box<dyn FnOnce(Vec<(i64, i32)>) -> Vec<Sql> + Send>,
    ) -> StoreResult<Vec<(i64, i32)>> {
        // Every commit but the body fence's runs `synchronous = NORMAL` already.
        let mut writer = self.writer().await;
        let mut tx = sqlx::Connection::begin(&mut *writer).await?;
        let changed: Vec<(i64, i32)> = fetch_all_on(&mut tx, update).await?;
        for sql in log(changed.clone()) {
            execute_on(&mut tx, sql).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    fn json_rows(sql: &mut Sql, json: serde_json::Value, columns: &[(&str, &str)]) {
        let picked: Vec<String> = columns
            .iter()
            .map(|(name, _)| format!("value ->> '{name}' AS {name}"))
            .collect();
        sql.push(format!("(SELECT {} FROM json_each(", picked.join(", ")));
        sql.bind(Arg::Text(Some(json.to_string()))).push(")) AS v");
    }

    fn value_rows(sql: &mut Sql, rows: Vec<serde_json::Value>, columns: &[(&str, &str)]) {
        let picked: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, (name, _))| format!("column{} AS {name}", i + 1))
            .collect();
        sql.push(format!("(SELECT {} FROM (VALUES ", picked.join(", ")));
        for (r, mut row) in rows.into_iter().enumerate() {
            sql.push(if r == 0 { "(" } else { ", (" });
            for (c, (name, _)) in columns.iter().enumerate() {
                if c > 0 {
                    sql.push(", ");
                }
                let value = row.as_object_mut().and_then(|o| o.remove(*name));
                sql.bind(json_arg(value));
            }
            sql.push(")");
        }
        sql.push(")) AS v");
    }

    fn time_text(at: DateTime<Utc>) -> String {
        ts(at)
    }

    async fn update_logged_relaxed(
        &self,
        updates: Vec<LoggedUpdate>,
    ) -> StoreResult<Vec<Vec<i64>>> {
        // Every commit but the body fence's runs `synchronous = NORMAL` already.
        self.update_logged(updates, true).await
    }

    async fn merge_customers(&self, patches: &[&CustomerPatch]) -> StoreResult<u64> {
        // BEGIN IMMEDIATE takes the write lock before the rows are read, so no other writer (of
        // this process or another) changes them between the read and the write: each patch is
        // merged with the row as it is written. (SQLite's json_patch would not do: it merges
        // nested objects too, and drops nulls inside the values it sets.)
        let mut writer = self.writer().await;
        let mut tx = sqlx::Connection::begin_with(&mut *writer, "BEGIN IMMEDIATE").await?;
        let created = Self::merge_locked(&mut tx, patches).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn insert_messages(&self, messages: &[NewMessage]) -> StoreResult<u64> {
        self.execute_all(message_inserts(messages)).await
    }

    async fn log_narrowing(
        &self,
        filter: &LogFilter,
        part: LogPart,
        ordered: bool,
    ) -> StoreResult<LogNarrowing> {
        let path = self.log_access_path(filter, part).await?;
        let mut sql = Sql::new("");
        if let Some(search) = filter.customer_search.as_deref() {
            match &path {
                LogPath::Customers(ids) => {
                    sql.push(" AND m.customer_id");
                    Self::push_in(&mut sql, ids);
                }
                _ => {
                    let pattern = like_pattern(search);
                    sql.push(" AND +m.customer_id IN (SELECT s.id FROM customers s WHERE s.id = ")
                        .bind(search);
                    sql.push(" OR lower(s.email) LIKE ")
                        .bind(pattern.as_str())
                        .push(" ESCAPE '\\'");
                    sql.push(" OR lower(s.name) LIKE ")
                        .bind(pattern)
                        .push(" ESCAPE '\\')");
                }
            }
        }
        if filter.from.is_some() || filter.until.is_some() {
            let (from, until) = date_bounds(filter);
            let by_index = if matches!(path, LogPath::Dates) {
                ""
            } else {
                "+"
            };
            let date = part.date();
            sql.push(format!(" AND {by_index}{date} >= ")).bind(from);
            sql.push(format!(" AND {by_index}{date} < ")).bind(until);
        }
        // Without statistics SQLite would read a page of waiting messages by
        // `messages_expiring` or `messages_state` (for `state IN (...)`) and sort them all, as
        // it once did for the claim: name the index, unless a customer or a rule (with its
        // state) drives. A count without a narrow date range is cheapest on `messages_state`.
        let index = match part {
            LogPart::History | LogPart::Whole => "",
            LogPart::Waiting
                if filter.customer_id.is_some() || matches!(path, LogPath::Customers(_)) =>
            {
                " INDEXED BY messages_customer"
            }
            LogPart::Waiting if filter.rule.is_some() && !path.drives() => "",
            LogPart::Waiting if !ordered && !matches!(path, LogPath::Dates) => "",
            LogPart::Waiting => by_date(part),
        };
        Ok(LogNarrowing {
            index: index.to_string(),
            unindexed_rule_state: path.drives(),
            conditions: sql,
        })
    }
}

/// How `log` finds its rows (see `log_access_path`).
#[derive(Debug)]
enum LogPath {
    /// As SQLite's planner sees fit (filters without such trouble).
    Plain,
    /// These customers' messages, by the customer index.
    Customers(Vec<String>),
    /// The messages of a narrow date range, by the date index.
    Dates,
}

impl LogPath {
    /// Whether a filter other than rule and state drives the search.
    fn drives(&self) -> bool {
        matches!(self, LogPath::Customers(_) | LogPath::Dates)
    }
}

/// The index hint that reads a part of the log by its date (SQLite's planner picks
/// `messages_dated` on its own).
fn by_date(part: LogPart) -> &'static str {
    match part {
        LogPart::History | LogPart::Whole => "",
        LogPart::Waiting => " INDEXED BY messages_waiting",
    }
}

/// The date range of a log filter as stored text; open ends reach past every time.
fn date_bounds(filter: &LogFilter) -> (String, String) {
    (
        filter.from.map(ts).unwrap_or_default(),
        filter.until.map_or_else(|| "9999".to_string(), ts),
    )
}
