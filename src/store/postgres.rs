//! PostgreSQL, for a business that runs several replicas of the daemon: claims use
//! `FOR UPDATE SKIP LOCKED`, so any number of processes share the work without waiting on each
//! other, and every lease is judged by the server's clock.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{Arguments, PgConnection, PgPool};

use super::engine::{LogPart, MESSAGE_INSERT_COLUMNS, SqlStore};
use super::sql::{
    Arg, Driver, FEW_CUSTOMERS, FromSqlRow, LogNarrowing, LoggedUpdate, Reply, Sql, Via,
    like_pattern,
};
use super::{Change, CustomerPatch, LogFilter, NewMessage, StoreError, StoreResult};

/// The store on a PostgreSQL database.
pub type PostgresStore = SqlStore<PostgresDriver>;

#[derive(Debug, Clone)]
pub struct PostgresDriver {
    pool: PgPool,
}

/// A pooled connection idle for longer than this is pinged before it is used again.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(5);

impl PostgresStore {
    pub async fn open(url: &str, max_connections: u32) -> StoreResult<PostgresStore> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| {
                StoreError::Invalid(format!("database.url is not a valid PostgreSQL URL: {e}"))
            })?
            .application_name("touchpoint")
            // Keep server NOTICEs ("relation ... already exists, skipping" on every migrate)
            // out of the operator's terminal; warnings and errors still come through.
            .options([("client_min_messages", "warning")]);
        // No ping before each use of a busy connection (sqlx's default pings every time): it is
        // a network round trip before every query, a third of all round trips while sending
        // (BENCHMARKS.md). A connection that sat idle is pinged, within acquire_timeout: one the
        // network dropped silently (a NAT or firewall timeout, a failover) would otherwise hang
        // its next query until the kernel gives up, minutes later.
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for > IDLE_BEFORE_PING {
                        sqlx::Connection::ping(connection).await?;
                    }
                    Ok(true)
                })
            })
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(SqlStore::new(PostgresDriver { pool }))
    }

    pub fn pool(&self) -> &PgPool {
        &self.driver.pool
    }
}

/// The values in PostgreSQL's types: timestamptz, jsonb, text[].
fn arguments(args: Vec<Arg>) -> StoreResult<PgArguments> {
    let mut out = PgArguments::default();
    for arg in args {
        let added = match arg {
            Arg::Text(v) => out.add(v),
            Arg::Int(v) => out.add(v),
            Arg::Int32(v) => out.add(v),
            Arg::Bool(v) => out.add(v),
            Arg::Float(v) => out.add(v),
            Arg::Time(v) => out.add(v),
            Arg::Json(v) => out.add(v.map(Json)),
            Arg::TextList(v) => out.add(v),
        };
        added.map_err(sqlx::Error::Encode)?;
    }
    Ok(out)
}

fn millis(d: TimeDelta) -> f64 {
    d.num_milliseconds() as f64
}

/// The history line's `smtp_reply`: the changed row's, or a bound value.
fn reply_column(sql: &mut Sql, reply: Reply) {
    match reply {
        Reply::Kept => sql.push("smtp_reply"),
        Reply::Given(reply) => sql.bind(reply),
    };
}

/// One statement: the UPDATE in a WITH, its history lines inserted from what it returned, so
/// both commit together.
fn logged_update_statement(update: LoggedUpdate) -> Sql {
    let mut sql = Sql::new("WITH changed AS (UPDATE messages SET ");
    sql.append(update.set).push(" WHERE ");
    if update.skip_locked {
        sql.push("id IN (SELECT id FROM messages WHERE ")
            .append(update.rows)
            .push(format!("{})", PostgresDriver::SKIP_LOCKED));
    } else {
        sql.append(update.rows);
    }
    sql.push(
        " RETURNING id, attempts, smtp_reply) \
         INSERT INTO message_events (message_id, kind, attempt, smtp_reply, detail) SELECT id, ",
    );
    sql.bind(update.kind)
        .push(", attempts + ")
        .bind(update.attempt_offset)
        .push(", ");
    reply_column(&mut sql, update.reply);
    sql.push(", ")
        .bind(Arg::Json(Some(update.detail)))
        .push(" FROM changed RETURNING message_id");
    sql
}

/// This transaction's commit returns before its WAL record is flushed (a crash of the server
/// may lose it; the database stays consistent). Only for writes the guarantee does not rest on.
async fn relax_commit(connection: &mut PgConnection) -> StoreResult<()> {
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(connection)
        .await?;
    Ok(())
}

async fn changed_ids(connection: &mut PgConnection, sql: Sql) -> StoreResult<Vec<i64>> {
    let (text, args) = sql.into_numbered();
    let rows: Vec<(i64,)> = sqlx::query_as_with(&text, arguments(args)?)
        .fetch_all(connection)
        .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

impl PostgresDriver {
    /// The planner misjudges substring searches and date ranges (it expects few matches
    /// spread evenly over the ids), so it either sorts every match or walks the whole log.
    /// A capped look first: a few matching customers are looked up by index; many are
    /// checked row by row while walking ids newest first (a scalar subquery, which the
    /// planner keeps as a per-row check).
    async fn customer_search(&self, search: &str) -> StoreResult<Sql> {
        let pattern = like_pattern(search);
        let lookup = Sql::new(format!(
            "SELECT id FROM customers WHERE id = ? OR lower(email) LIKE ? ESCAPE '\\' \
             OR lower(name) LIKE ? ESCAPE '\\' LIMIT {}",
            FEW_CUSTOMERS + 1
        ))
        .arg(search)
        .arg(&pattern)
        .arg(&pattern);
        let ids: Vec<(String,)> = self.fetch_all(Via::Reader, lookup).await?;
        let mut sql = Sql::new("");
        if ids.len() <= FEW_CUSTOMERS {
            let ids: Vec<String> = ids.into_iter().map(|(id,)| id).collect();
            sql.push(" AND m.customer_id = ANY(")
                .bind(Arg::TextList(ids))
                .push(")");
        } else {
            sql.push(
                " AND COALESCE((SELECT TRUE FROM customers s WHERE s.id = m.customer_id AND (s.id = ",
            )
            .bind(search);
            sql.push(" OR lower(s.email) LIKE ")
                .bind(pattern.as_str())
                .push(" ESCAPE '\\'");
            sql.push(" OR lower(s.name) LIKE ")
                .bind(pattern)
                .push(" ESCAPE '\\')), FALSE)");
        }
        Ok(sql)
    }

    /// The log's date range, on the part's index (`messages_dated` or `messages_waiting`,
    /// which also gives the part's order, so a wide range reads no more rows than a page shows).
    fn date_range(filter: &LogFilter, part: LogPart) -> Sql {
        // Open ends as times far outside any message's (and inside PostgreSQL's range).
        let from = filter.from.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        let until = filter
            .until
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(365 * 8000));
        let date = part.date();
        let mut sql = Sql::new("");
        sql.push(format!(" AND {date} >= ")).bind(from);
        sql.push(format!(" AND {date} < ")).bind(until);
        sql
    }
}

#[async_trait]
impl Driver for PostgresDriver {
    const NOW: &'static str = "now()";
    const CLOCK: &'static str = "clock_timestamp()";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    // `OFFSET 0` in each anti-join on `messages` of the planning query (see `candidates`).
    const FENCE: &'static str = " OFFSET 0";
    const CACHE_CANDIDATE_PLANS: bool = false;
    const LIST_CHUNK: usize = usize::MAX;
    const OLDEST_DUE_SECONDS: &'static str =
        "EXTRACT(EPOCH FROM now() - MIN(next_attempt_at))::float8";
    const EPOCH_SECONDS: &'static str = "extract(epoch FROM now())::bigint";

    fn push_later(sql: &mut Sql, clock: &str, by: TimeDelta) {
        sql.push(format!("{clock} + "))
            .bind(millis(by))
            .push(" * interval '1 millisecond'");
    }

    fn millis_until(expr: &str) -> String {
        format!("(EXTRACT(EPOCH FROM ({expr} - clock_timestamp())) * 1000)::float8")
    }

    fn indexed_by(_index: &str) -> String {
        String::new()
    }

    fn unindexed(column: &str) -> String {
        column.to_string()
    }

    fn null(pg_type: &str) -> String {
        format!("NULL::{pg_type}")
    }

    fn hour_of(column: &str) -> String {
        format!("date_trunc('hour', {column} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'")
    }

    fn month_day(column: &str) -> String {
        // "C": digits and a dash compare the same in every collation, but faster.
        format!("to_char({column} AT TIME ZONE 'UTC', 'MM-DD') COLLATE \"C\"")
    }

    fn push_in(sql: &mut Sql, values: &[String]) {
        sql.push(" = ANY(")
            .bind(Arg::TextList(values.to_vec()))
            .push(")");
    }

    async fn fetch_all<T: FromSqlRow>(&self, _via: Via, sql: Sql) -> StoreResult<Vec<T>> {
        let persistent = sql.is_persistent();
        let (text, args) = sql.into_numbered();
        Ok(sqlx::query_as_with(&text, arguments(args)?)
            .persistent(persistent)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn fetch_optional<T: FromSqlRow>(&self, _via: Via, sql: Sql) -> StoreResult<Option<T>> {
        let (text, args) = sql.into_numbered();
        Ok(sqlx::query_as_with(&text, arguments(args)?)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn fetch_one<T: FromSqlRow>(&self, _via: Via, sql: Sql) -> StoreResult<T> {
        let (text, args) = sql.into_numbered();
        Ok(sqlx::query_as_with(&text, arguments(args)?)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn exists(&self, _via: Via, sql: Sql) -> StoreResult<bool> {
        let (text, args) = sql.into_numbered();
        let row = sqlx::query_with(&text, arguments(args)?)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn execute(&self, _via: Via, sql: Sql) -> StoreResult<u64> {
        let (text, args) = sql.into_numbered();
        Ok(sqlx::query_with(&text, arguments(args)?)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn execute_all(&self, statements: Vec<Sql>) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let mut affected = 0;
        for sql in statements {
            let (text, args) = sql.into_numbered();
            affected += sqlx::query_with(&text, arguments(args)?)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(affected)
    }

    async fn execute_group(
        &self,
        locks: Vec<String>,
        statements: Vec<Sql>,
    ) -> StoreResult<Vec<Vec<i64>>> {
        let mut tx = self.pool.begin().await?;
        if !locks.is_empty() {
            // Held until commit, taken in the order of the lock ids (every process uses the
            // same), before any statement reads: each statement's snapshot (Read Committed)
            // then sees what the last holder of its key committed.
            let keys: Vec<String> = locks.iter().map(|k| format!("touchpoint:{k}")).collect();
            // A replica stalled inside its own group (SIGSTOP, a lost network) must not stop
            // every fence of this daemon behind the turn: give up after a few seconds, the
            // group's messages are released and tried again.
            sqlx::query("SET LOCAL lock_timeout = '5s'")
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "SELECT count(pg_advisory_xact_lock(h)) FROM \
                 (SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY h) AS ids",
            )
            .bind(keys)
            .execute(&mut *tx)
            .await?;
        }
        let mut returned = Vec::with_capacity(statements.len());
        for sql in statements {
            let (text, args) = sql.into_numbered();
            let ids: Vec<(i64,)> = sqlx::query_as_with(&text, arguments(args)?)
                .fetch_all(&mut *tx)
                .await?;
            returned.push(ids.into_iter().map(|(id,)| id).collect());
        }
        tx.commit().await?;
        Ok(returned)
    }

    async fn update_then_log(
        &self,
        update: Sql,
        log: Box<dyn FnOnce(Vec<(i64, i32)>) -> Vec<Sql> + Send>,
    ) -> StoreResult<Vec<(i64, i32)>> {
        let mut tx = self.pool.begin().await?;
        relax_commit(&mut tx).await?;
        let (text, args) = update.into_numbered();
        let changed: Vec<(i64, i32)> = sqlx::query_as_with(&text, arguments(args)?)
            .fetch_all(&mut *tx)
            .await?;
        for sql in log(changed.clone()) {
            let (text, args) = sql.into_numbered();
            sqlx::query_with(&text, arguments(args)?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    fn json_rows(sql: &mut Sql, json: serde_json::Value, columns: &[(&str, &str)]) {
        let typed: Vec<String> = columns
            .iter()
            .map(|(name, pg_type)| format!("{name} {pg_type}"))
            .collect();
        sql.push("jsonb_to_recordset(")
            .bind(Arg::Json(Some(json)))
            .push(format!(") AS v({})", typed.join(", ")));
    }

    fn time_text(at: DateTime<Utc>) -> String {
        at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    }

    async fn update_logged_relaxed(
        &self,
        updates: Vec<LoggedUpdate>,
    ) -> StoreResult<Vec<Vec<i64>>> {
        let mut tx = self.pool.begin().await?;
        relax_commit(&mut tx).await?;
        let mut changed = Vec::with_capacity(updates.len());
        for update in updates {
            changed.push(changed_ids(&mut tx, logged_update_statement(update)).await?);
        }
        tx.commit().await?;
        Ok(changed)
    }

    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn update_logged(
        &self,
        updates: Vec<LoggedUpdate>,
        together: bool,
    ) -> StoreResult<Vec<Vec<i64>>> {
        let mut changed = Vec::with_capacity(updates.len());
        if together && updates.len() > 1 {
            let mut tx = self.pool.begin().await?;
            for update in updates {
                changed.push(changed_ids(&mut tx, logged_update_statement(update)).await?);
            }
            tx.commit().await?;
        } else {
            let mut connection = self.pool.acquire().await?;
            for update in updates {
                changed.push(changed_ids(&mut connection, logged_update_statement(update)).await?);
            }
        }
        Ok(changed)
    }

    async fn merge_customers(&self, patches: &[&CustomerPatch]) -> StoreResult<u64> {
        let columns = MergeColumns::of(patches);
        // One statement: each row is inserted, or merged with the row as it is once locked.
        let created: Vec<bool> = sqlx::query_scalar(MERGE_CUSTOMERS)
            .bind(columns.ids)
            .bind(columns.emails)
            .bind(columns.names)
            .bind(columns.set_names)
            .bind(columns.timezones)
            .bind(columns.set_timezones)
            .bind(columns.attributes)
            .bind(columns.removed)
            .fetch_all(&self.pool)
            .await?;
        Ok(created.into_iter().filter(|&new| new).count() as u64)
    }

    async fn insert_messages(&self, messages: &[NewMessage]) -> StoreResult<u64> {
        // One statement per page (the planner's pages are PAGE rows): the rows go over as eight
        // arrays, so the server parses and plans one short statement, not 45,000 parameters.
        // Larger lists (a source's whole window) commit together, as the VALUES inserts did.
        let mut tx = self.pool.begin().await?;
        let mut inserted = 0;
        for chunk in messages.chunks(ARRAY_INSERT_ROWS) {
            let columns = MessageColumns::of(chunk);
            inserted += sqlx::query(&INSERT_MESSAGES)
                .bind(columns.rules)
                .bind(columns.customer_ids)
                .bind(columns.event_ids)
                .bind(columns.dedupe_keys)
                .bind(columns.trigger_ats)
                .bind(columns.due_ats)
                .bind(columns.expires_ats)
                .bind(columns.details)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn log_narrowing(
        &self,
        filter: &LogFilter,
        part: LogPart,
        _ordered: bool,
    ) -> StoreResult<LogNarrowing> {
        let mut conditions = Sql::new("");
        if let Some(search) = filter.customer_search.as_deref() {
            conditions.append(self.customer_search(search).await?);
        }
        if filter.from.is_some() || filter.until.is_some() {
            conditions.append(Self::date_range(filter, part));
        }
        Ok(LogNarrowing {
            index: String::new(),
            unindexed_rule_state: false,
            conditions,
        })
    }
}

/// Customer patches as parallel arrays, one element per customer, for `MERGE_CUSTOMERS`.
struct MergeColumns {
    ids: Vec<String>,
    emails: Vec<String>,
    /// The name to write; `set_names` says whether to write it on an existing customer.
    names: Vec<Option<String>>,
    set_names: Vec<bool>,
    timezones: Vec<Option<String>>,
    set_timezones: Vec<bool>,
    /// The attributes to set (an object)...
    attributes: Vec<serde_json::Value>,
    /// ...and the names of those to remove (an array of strings).
    removed: Vec<serde_json::Value>,
}

impl MergeColumns {
    fn of(patches: &[&CustomerPatch]) -> MergeColumns {
        let written = |change: &Change| match change {
            Change::Set(value) => Some(value.clone()),
            Change::Keep | Change::Clear => None,
        };
        let mut columns = MergeColumns {
            ids: Vec::with_capacity(patches.len()),
            emails: Vec::with_capacity(patches.len()),
            names: Vec::with_capacity(patches.len()),
            set_names: Vec::with_capacity(patches.len()),
            timezones: Vec::with_capacity(patches.len()),
            set_timezones: Vec::with_capacity(patches.len()),
            attributes: Vec::with_capacity(patches.len()),
            removed: Vec::with_capacity(patches.len()),
        };
        for patch in patches {
            columns.ids.push(patch.id.clone());
            columns.emails.push(patch.email.clone());
            columns.names.push(written(&patch.name));
            columns.set_names.push(patch.name != Change::Keep);
            columns.timezones.push(written(&patch.timezone));
            columns.set_timezones.push(patch.timezone != Change::Keep);
            let (removed, set): (Vec<_>, Vec<_>) = patch
                .attributes
                .iter()
                .partition(|(_, value)| value.is_null());
            let set: serde_json::Map<_, _> = set
                .into_iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            columns.attributes.push(serde_json::Value::Object(set));
            columns
                .removed
                .push(removed.into_iter().map(|(k, _)| k.clone()).collect());
        }
        columns
    }
}

/// Inserts each customer in the order given, or merges it into the stored row as that row is
/// when locked: fields the patch does not name, and attributes it does not mention, are kept.
/// `xmax = 0` holds for a row this statement inserted, not for one it updated.
const MERGE_CUSTOMERS: &str = "\
WITH input AS (
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bool[], $5::text[], $6::bool[], $7::jsonb[], $8::jsonb[])
    WITH ORDINALITY AS i (id, email, name, set_name, timezone, set_timezone, attributes, removed, n)
)
INSERT INTO customers AS c (id, email, name, timezone, attributes)
SELECT id, email, name, timezone, attributes FROM input ORDER BY n
ON CONFLICT (id) DO UPDATE SET
    email = excluded.email,
    (name, timezone, attributes) = (
        SELECT CASE WHEN i.set_name THEN excluded.name ELSE c.name END,
               CASE WHEN i.set_timezone THEN excluded.timezone ELSE c.timezone END,
               (c.attributes - ARRAY(SELECT jsonb_array_elements_text(i.removed))) || excluded.attributes
        FROM input i WHERE i.id = excluded.id
    ),
    updated_at = now()
RETURNING (xmax = 0)";

/// Rows per `INSERT_MESSAGES` statement: the planner's page.
const ARRAY_INSERT_ROWS: usize = 5_000;

/// The planner's messages as parallel arrays, one element per message, for `INSERT_MESSAGES`.
struct MessageColumns {
    rules: Vec<String>,
    customer_ids: Vec<String>,
    event_ids: Vec<Option<String>>,
    dedupe_keys: Vec<String>,
    trigger_ats: Vec<DateTime<Utc>>,
    due_ats: Vec<DateTime<Utc>>,
    expires_ats: Vec<Option<DateTime<Utc>>>,
    details: Vec<Json<serde_json::Value>>,
}

impl MessageColumns {
    fn of(messages: &[NewMessage]) -> MessageColumns {
        MessageColumns {
            rules: messages.iter().map(|m| m.rule.clone()).collect(),
            customer_ids: messages.iter().map(|m| m.customer_id.clone()).collect(),
            event_ids: messages.iter().map(|m| m.event_id.clone()).collect(),
            dedupe_keys: messages.iter().map(|m| m.dedupe_key.clone()).collect(),
            trigger_ats: messages.iter().map(|m| m.trigger_at).collect(),
            due_ats: messages.iter().map(|m| m.due_at).collect(),
            expires_ats: messages.iter().map(|m| m.expires_at).collect(),
            details: messages.iter().map(|m| Json(m.detail.clone())).collect(),
        }
    }
}

/// Inserts the arrays' rows in their order (ids follow it, as with `VALUES`); a row whose
/// `dedupe_key` exists, or came earlier in the arrays, is skipped.
static INSERT_MESSAGES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO messages ({MESSAGE_INSERT_COLUMNS}) \
         SELECT rule, customer_id, event_id, dedupe_key, trigger_at, due_at, expires_at, due_at, \
         detail FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], \
         $6::timestamptz[], $7::timestamptz[], $8::jsonb[]) WITH ORDINALITY \
         AS i (rule, customer_id, event_id, dedupe_key, trigger_at, due_at, expires_at, detail, n) \
         ORDER BY n ON CONFLICT (dedupe_key) DO NOTHING"
    )
});
