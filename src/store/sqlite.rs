//! The embedded default: one SQLite file in WAL mode, with a single writer connection (SQLite
//! allows one writer at a time; queuing writers in the pool beats retrying on SQLITE_BUSY) and a
//! few reader connections. Several processes on one file are safe: every claim is one UPDATE
//! statement, serialised by SQLite's write lock, and fenced by its token like on PostgreSQL.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use super::rows::{
    self, CandidateRow, ClaimRow, CustomerMessageEventRow, CustomerRow, EventRow, LogRow,
    MessageEventRow, SentContentRow, SuppressionRow,
};
use super::*;

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

#[derive(Debug, Clone)]
pub struct SqliteStore {
    path: PathBuf,
    writer: SqlitePool,
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
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer,
            reader,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the log's query should find its rows. SQLite keeps no statistics unless ANALYZE
    /// ran, so it cannot tell a customer or date filter that matches a handful of messages from
    /// one that matches half the log, and for the latter it would sort every match to return
    /// one page. A capped look first decides: a few matching customers or dates drive the
    /// search through their index; many are checked while walking ids newest first, which
    /// stops at LIMIT (starting at the newest message in the date range).
    async fn log_access_path(&self, filter: &LogFilter) -> StoreResult<LogPath> {
        if filter.due_before.is_some() || filter.customer_id.is_some() {
            return Ok(LogPath::Plain);
        }
        if let Some(search) = filter.customer_search.as_deref() {
            let pattern = like_pattern(search);
            let ids: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT id FROM customers WHERE id = ? OR lower(email) LIKE ? ESCAPE '\\' \
                 OR lower(name) LIKE ? ESCAPE '\\' LIMIT {}",
                FEW_CUSTOMERS + 1
            ))
            .bind(search)
            .bind(&pattern)
            .bind(&pattern)
            .fetch_all(&self.reader)
            .await?;
            if ids.len() <= FEW_CUSTOMERS {
                return Ok(LogPath::Customers(ids));
            }
        }
        if filter.from.is_none() && filter.until.is_none() {
            return Ok(LogPath::Plain);
        }
        let (from, until) = date_bounds(filter);
        let matches: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM (SELECT 1 FROM messages \
             WHERE COALESCE(sent_at, due_at) >= ? AND COALESCE(sent_at, due_at) < ? LIMIT {MANY_ROWS})"
        ))
        .bind(&from)
        .bind(&until)
        .fetch_one(&self.reader)
        .await?;
        if matches < MANY_ROWS {
            return Ok(LogPath::Dates);
        }
        // Read from the date index alone (it holds the rowid).
        let newest: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(id) FROM messages WHERE COALESCE(sent_at, due_at) >= ? AND COALESCE(sent_at, due_at) < ?",
        )
        .bind(&from)
        .bind(&until)
        .fetch_one(&self.reader)
        .await?;
        Ok(LogPath::IdsFrom(newest))
    }

    async fn begin_body_keeping(
        &self,
        id: i64,
        token: &str,
        delivery: &Delivery,
        content: Option<&SentContent>,
        margin: TimeDelta,
    ) -> StoreResult<bool> {
        let done = sqlx::query(&format!(
            "UPDATE messages SET phase = 'body', email = ?, subject = ?, message_id = ?, \
             body_text = COALESCE(?, body_text), body_html = COALESCE(?, body_html), \
             checks = COALESCE(?, checks), updated_at = {NOW} \
             WHERE id = ? AND claim_token = ? AND state = 'sending' \
             AND lease_expires_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) \
             AND (expires_at IS NULL OR expires_at > {NOW}) \
             AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = ?)"
        ))
        .bind(&delivery.email)
        .bind(&delivery.subject)
        .bind(&delivery.message_id)
        .bind(content.map(|c| &c.text))
        .bind(content.map(|c| &c.html))
        .bind(content.map(|c| Json(&c.checks)))
        .bind(id)
        .bind(token)
        .bind(offset(margin))
        .bind(normalize_email(&delivery.email))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// Inserts the customers, or replaces every field of those that exist.
async fn write_customers(
    connection: &mut sqlx::SqliteConnection,
    customers: &[&Customer],
) -> StoreResult<()> {
    for chunk in customers.chunks(500) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO customers (id, email, name, timezone, attributes) ",
        );
        query.push_values(chunk, |mut row, c| {
            row.push_bind(&c.id)
                .push_bind(&c.email)
                .push_bind(&c.name)
                .push_bind(&c.timezone)
                .push_bind(Json(&c.attributes));
        });
        query.push(format!(
            " ON CONFLICT (id) DO UPDATE SET email = excluded.email, name = excluded.name, \
             timezone = excluded.timezone, attributes = excluded.attributes, updated_at = {NOW}"
        ));
        query.build().execute(&mut *connection).await?;
    }
    Ok(())
}

/// The stored customers the patches name, by id.
async fn stored_customers(
    connection: &mut sqlx::SqliteConnection,
    patches: &[&CustomerPatch],
) -> StoreResult<std::collections::HashMap<String, Customer>> {
    let mut stored = std::collections::HashMap::new();
    for chunk in patches.chunks(500) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT id, email, name, timezone, attributes FROM customers WHERE id IN (",
        );
        let mut ids = query.separated(", ");
        for patch in chunk {
            ids.push_bind(&patch.id);
        }
        query.push(")");
        let rows: Vec<CustomerRow> = query.build_query_as().fetch_all(&mut *connection).await?;
        stored.extend(rows.into_iter().map(|row| {
            let customer = Customer::from(row);
            (customer.id.clone(), customer)
        }));
    }
    Ok(stored)
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        // sqlx takes no lock for SQLite: two processes starting on a fresh file would both
        // read "nothing applied" and the second would fail on `CREATE TABLE`. Holding the write
        // lock (BEGIN IMMEDIATE, waiting out busy_timeout) across the whole run serialises them;
        // sqlx's per-migration transactions become savepoints inside this one.
        let mut connection = self.writer.acquire().await?;
        let mut tx = sqlx::Connection::begin_with(&mut *connection, "BEGIN IMMEDIATE").await?;
        // `run_direct`: `run(&mut *tx)` hits sqlx's "Acquire is not general enough" in async-trait.
        sqlx::migrate!("./migrations/sqlite")
            .run_direct(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn upsert_customers(&self, customers: &[Customer]) -> StoreResult<()> {
        let customers = by_id(customers, |c| &c.id);
        let mut tx = self.writer.begin().await?;
        write_customers(&mut tx, &customers).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn merge_customers(&self, patches: &[CustomerPatch]) -> StoreResult<u64> {
        if patches.is_empty() {
            return Ok(0);
        }
        let patches = by_id(patches, |p| &p.id);
        // BEGIN IMMEDIATE takes the write lock before the rows are read, so no other writer (of
        // this process or another) changes them between the read and the write: each patch is
        // merged with the row as it is written. (SQLite's json_patch would not do: it merges
        // nested objects too, and drops nulls inside the values it sets.)
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let mut stored = stored_customers(&mut tx, &patches).await?;
        let mut created = 0;
        let merged: Vec<Customer> = patches
            .into_iter()
            .map(|patch| {
                let before = stored.remove(&patch.id);
                created += u64::from(before.is_none());
                patch.clone().apply(before)
            })
            .collect();
        write_customers(&mut tx, &merged.iter().collect::<Vec<_>>()).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn insert_events(&self, events: &[Event]) -> StoreResult<u64> {
        let events = by_id(events, |e| &e.id);
        let mut tx = self.writer.begin().await?;
        let mut inserted = 0;
        for chunk in events.chunks(500) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO events (id, customer_id, kind, occurred_at, data) ",
            );
            query.push_values(chunk, |mut row, e| {
                row.push_bind(&e.id)
                    .push_bind(&e.customer_id)
                    .push_bind(&e.kind)
                    .push_bind(ts(e.occurred_at))
                    .push_bind(Json(&e.data));
            });
            query.push(" ON CONFLICT (id) DO NOTHING");
            inserted += query.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn customer(&self, id: &str) -> StoreResult<Option<Customer>> {
        let row: Option<CustomerRow> = sqlx::query_as(
            "SELECT id, email, name, timezone, attributes FROM customers WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(Customer::from))
    }

    async fn event(&self, id: &str) -> StoreResult<Option<Event>> {
        let row: Option<EventRow> = sqlx::query_as(
            "SELECT id, customer_id, kind, occurred_at, data FROM events WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(Event::from))
    }

    async fn latest_event(&self, customer_id: &str, kind: &str) -> StoreResult<Option<Event>> {
        let row: Option<EventRow> = sqlx::query_as(
            "SELECT id, customer_id, kind, occurred_at, data FROM events WHERE customer_id = ? AND kind = ? \
             ORDER BY occurred_at DESC LIMIT 1",
        )
        .bind(customer_id)
        .bind(kind)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(Event::from))
    }

    async fn has_event_after(
        &self,
        customer_id: &str,
        kind: &str,
        after: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM events WHERE customer_id = ? AND kind = ? AND occurred_at > ? LIMIT 1",
        )
        .bind(customer_id)
        .bind(kind)
        .bind(ts(after))
        .fetch_optional(&self.reader)
        .await?;
        Ok(found.is_some())
    }

    async fn max_seqs(&self) -> StoreResult<(i64, i64)> {
        let seqs: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COALESCE(MAX(seq), 0) FROM customers), (SELECT COALESCE(MAX(seq), 0) FROM events)",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(seqs)
    }

    async fn candidates(&self, q: &CandidateQuery) -> StoreResult<Vec<Candidate>> {
        let mut query = QueryBuilder::<Sqlite>::new("");
        match &q.source {
            CandidateSource::NewEvents {
                kind,
                occurred_from,
                unless_since,
            } => {
                query.push(
                    "SELECT e.seq, c.id AS customer_id, c.email, c.name, c.timezone, c.attributes, \
                     e.id AS event_id, e.kind, e.occurred_at, e.data, NULL AS last_trigger \
                     FROM events e JOIN customers c ON c.id = e.customer_id WHERE e.kind = ",
                );
                query
                    .push_bind(kind)
                    .push(" AND e.seq > ")
                    .push_bind(q.after_seq);
                query.push(" AND e.seq <= ").push_bind(q.up_to_seq);
                query
                    .push(" AND e.occurred_at >= ")
                    .push_bind(ts(*occurred_from));
                query.push(" AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.dedupe_key = ");
                query.push_bind(format!("{}:", q.rule)).push(" || e.id)");
                for later in unless_since {
                    query.push(
                        " AND NOT EXISTS (SELECT 1 FROM events u WHERE u.customer_id = e.customer_id \
                         AND u.occurred_at > e.occurred_at AND u.kind = ",
                    );
                    query.push_bind(later).push(")");
                }
                query.push(
                    " AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = lower(c.email))",
                );
                query.push(" ORDER BY e.seq");
            }
            CandidateSource::RecurringEvents { kind } => {
                query.push(
                    "SELECT e.seq, c.id AS customer_id, c.email, c.name, c.timezone, c.attributes, \
                     e.id AS event_id, e.kind, e.occurred_at, e.data, \
                     (SELECT MAX(m.trigger_at) FROM messages m WHERE m.rule = ",
                );
                query
                    .push_bind(&q.rule)
                    .push(" AND m.event_id = e.id) AS last_trigger ");
                query
                    .push("FROM events e JOIN customers c ON c.id = e.customer_id WHERE e.kind = ");
                query
                    .push_bind(kind)
                    .push(" AND e.seq > ")
                    .push_bind(q.after_seq);
                query.push(" AND e.seq <= ").push_bind(q.up_to_seq);
                query
                    .push(" AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.rule = ")
                    .push_bind(&q.rule);
                query
                    .push(" AND m.event_id = e.id AND m.trigger_at >= ")
                    .push_bind(ts(q.now))
                    .push(")");
                query.push(
                    " AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = lower(c.email))",
                );
                query.push(" ORDER BY e.seq");
            }
            CandidateSource::RecurringCustomers => {
                query.push(
                    "SELECT c.seq, c.id AS customer_id, c.email, c.name, c.timezone, c.attributes, \
                     NULL AS event_id, NULL AS kind, NULL AS occurred_at, NULL AS data, \
                     (SELECT MAX(m.trigger_at) FROM messages m WHERE m.rule = ",
                );
                query
                    .push_bind(&q.rule)
                    .push(" AND m.customer_id = c.id) AS last_trigger ");
                query
                    .push("FROM customers c WHERE c.seq > ")
                    .push_bind(q.after_seq);
                query.push(" AND c.seq <= ").push_bind(q.up_to_seq);
                query
                    .push(" AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.rule = ")
                    .push_bind(&q.rule);
                query
                    .push(" AND m.customer_id = c.id AND m.trigger_at >= ")
                    .push_bind(ts(q.now))
                    .push(")");
                query.push(
                    " AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = lower(c.email))",
                );
                query.push(" ORDER BY c.seq");
            }
        }
        query.push(" LIMIT ").push_bind(q.limit);
        let rows: Vec<CandidateRow> = query.build_query_as().fetch_all(&self.reader).await?;
        Ok(rows.into_iter().map(Candidate::from).collect())
    }

    async fn existing_dedupe_keys(
        &self,
        keys: &[String],
    ) -> StoreResult<std::collections::HashSet<String>> {
        let mut found = std::collections::HashSet::new();
        for chunk in keys.chunks(500) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "SELECT dedupe_key FROM messages WHERE dedupe_key IN (",
            );
            let mut list = query.separated(", ");
            for key in chunk {
                list.push_bind(key);
            }
            query.push(")");
            let rows: Vec<(String,)> = query.build_query_as().fetch_all(&self.reader).await?;
            found.extend(rows.into_iter().map(|(key,)| key));
        }
        Ok(found)
    }

    async fn insert_messages(&self, messages: &[NewMessage]) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await?;
        let mut inserted = 0;
        for chunk in messages.chunks(500) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO messages (rule, customer_id, event_id, dedupe_key, trigger_at, due_at, \
                 expires_at, next_attempt_at, detail) ",
            );
            query.push_values(chunk, |mut row, m| {
                row.push_bind(&m.rule)
                    .push_bind(&m.customer_id)
                    .push_bind(&m.event_id)
                    .push_bind(&m.dedupe_key)
                    .push_bind(ts(m.trigger_at))
                    .push_bind(ts(m.due_at))
                    .push_bind(m.expires_at.map(ts))
                    .push_bind(ts(m.due_at))
                    .push_bind(Json(&m.detail));
            });
            query.push(" ON CONFLICT (dedupe_key) DO NOTHING");
            inserted += query.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn expire_overdue(&self) -> StoreResult<Vec<i64>> {
        let mut tx = self.writer.begin().await?;
        let mut ids = Vec::new();
        for (from, to, reason) in EXPIRY_TRANSITIONS {
            let rows: Vec<(i64, i32, Option<String>)> = sqlx::query_as(&format!(
                "UPDATE messages SET state = '{to}', reason = ?, updated_at = {NOW} \
                 WHERE state = '{from}' AND expires_at IS NOT NULL AND expires_at < {NOW} \
                 RETURNING id, attempts, smtp_reply"
            ))
            .bind(reason)
            .fetch_all(&mut *tx)
            .await?;
            for (id, attempts, reply) in rows {
                sqlx::query(
                    "INSERT INTO message_events (message_id, kind, attempt, smtp_reply, detail) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(id)
                .bind(to)
                .bind(attempts)
                .bind(reply)
                .bind(Json(serde_json::json!({ "reason": reason })))
                .execute(&mut *tx)
                .await?;
                ids.push(id);
            }
        }
        tx.commit().await?;
        Ok(ids)
    }

    async fn claim_due(
        &self,
        instance: &str,
        limit: u32,
        lease: TimeDelta,
    ) -> StoreResult<Vec<ClaimedMessage>> {
        let token = uuid::Uuid::new_v4().to_string();
        // INDEXED BY here, in next_due_in and in due_backlog: without statistics (no ANALYZE)
        // SQLite takes `messages_expiring (state, ...)` for `state IN (...)` and sorts every
        // waiting message on each call, which made sending quadratic and an idle daemon with a
        // million future messages scan them all every few seconds (BENCHMARKS.md).
        let rows: Vec<ClaimRow> = sqlx::query_as(&format!(
            "UPDATE messages SET state = 'sending', claim_token = ?, claimed_by = ?, \
             lease_expires_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?), phase = 'claimed', \
             attempts = attempts + 1, updated_at = {NOW} \
             WHERE id IN (SELECT id FROM messages INDEXED BY messages_waiting \
                          WHERE state IN ('scheduled', 'retrying') \
                          AND next_attempt_at <= {NOW} ORDER BY next_attempt_at LIMIT ?) \
             RETURNING {}",
            rows::CLAIM_COLUMNS
        ))
        .bind(&token)
        .bind(instance)
        .bind(offset(lease))
        .bind(i64::from(limit))
        .fetch_all(&self.writer)
        .await?;
        let mut claims: Vec<_> = rows.into_iter().map(|row| row.into_claim(&token)).collect();
        claims.sort_by_key(|c| (c.due_at, c.id));
        Ok(claims)
    }

    async fn next_due_in(&self) -> StoreResult<Option<TimeDelta>> {
        let millis: Option<f64> = sqlx::query_scalar(&format!(
            "SELECT (julianday(MIN(next_attempt_at)) - julianday({NOW})) * 86400000.0 \
             FROM messages INDEXED BY messages_waiting WHERE state IN ('scheduled', 'retrying')"
        ))
        .fetch_one(&self.reader)
        .await?;
        Ok(millis.map(|ms| TimeDelta::milliseconds(ms.max(0.0).ceil() as i64)))
    }

    async fn begin_body(
        &self,
        id: i64,
        token: &str,
        delivery: &Delivery,
        margin: TimeDelta,
    ) -> StoreResult<bool> {
        self.begin_body_keeping(id, token, delivery, None, margin)
            .await
    }

    async fn begin_body_with(
        &self,
        id: i64,
        token: &str,
        delivery: &Delivery,
        content: &SentContent,
        margin: TimeDelta,
    ) -> StoreResult<bool> {
        self.begin_body_keeping(id, token, delivery, Some(content), margin)
            .await
    }

    async fn finish(&self, id: i64, token: &str, outcome: &Outcome) -> StoreResult<bool> {
        let columns = rows::outcome_columns(outcome);
        let mut tx = self.writer.begin().await?;
        let attempts: Option<i32> = sqlx::query_scalar(&format!(
            "UPDATE messages SET state = ?, next_attempt_at = COALESCE(?, next_attempt_at), \
             smtp_reply = COALESCE(?, smtp_reply), reason = ?, \
             sent_at = CASE WHEN ? THEN {NOW} ELSE sent_at END, attempts = attempts - ?, \
             claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL, phase = NULL, updated_at = {NOW} \
             WHERE id = ? AND claim_token = ? AND state = 'sending' RETURNING attempts"
        ))
        .bind(columns.state)
        .bind(columns.next_attempt_at.map(ts))
        .bind(columns.smtp_reply)
        .bind(columns.reason)
        .bind(columns.sent)
        .bind(columns.uncount)
        .bind(id)
        .bind(token)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(attempts) = attempts else {
            return Ok(false);
        };
        let (kind, reply, detail) = rows::outcome_event(outcome);
        sqlx::query("INSERT INTO message_events (message_id, kind, attempt, smtp_reply, detail) VALUES (?, ?, ?, ?, ?)")
            .bind(id)
            .bind(kind)
            .bind(attempts + columns.uncount)
            .bind(reply)
            .bind(Json(detail))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn reap_expired(&self, resend_unknown: bool) -> StoreResult<Reaped> {
        let mut tx = self.writer.begin().await?;
        let mut reaped = Reaped::default();
        for (phase, to, reason) in reap_transitions(resend_unknown) {
            let rows: Vec<(i64, i32)> = sqlx::query_as(&format!(
                "UPDATE messages SET state = '{to}', reason = ?, claim_token = NULL, \
                 claimed_by = NULL, lease_expires_at = NULL, phase = NULL, updated_at = {NOW} \
                 WHERE state = 'sending' AND phase = '{phase}' AND lease_expires_at < {NOW} \
                 RETURNING id, attempts"
            ))
            .bind(reason)
            .fetch_all(&mut *tx)
            .await?;
            for (id, attempts) in &rows {
                sqlx::query("INSERT INTO message_events (message_id, kind, attempt, detail) VALUES (?, ?, ?, ?)")
                    .bind(id)
                    .bind(to)
                    .bind(attempts)
                    .bind(Json(serde_json::json!({ "reason": reason })))
                    .execute(&mut *tx)
                    .await?;
            }
            let count = rows.len() as u64;
            if phase == "claimed" {
                reaped.rescheduled += count
            } else {
                reaped.unknown += count
            }
        }
        tx.commit().await?;
        Ok(reaped)
    }

    async fn is_suppressed(&self, email: &str) -> StoreResult<bool> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM suppressions WHERE email = ?")
            .bind(normalize_email(email))
            .fetch_optional(&self.reader)
            .await?;
        Ok(found.is_some())
    }

    async fn suppress(&self, email: &str, reason: &str, source: &str) -> StoreResult<bool> {
        let done = sqlx::query("INSERT INTO suppressions (email, reason, source) VALUES (?, ?, ?) ON CONFLICT (email) DO NOTHING")
            .bind(normalize_email(email))
            .bind(reason)
            .bind(source)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn unsuppress(&self, email: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM suppressions WHERE email = ?")
            .bind(normalize_email(email))
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn suppressions(&self) -> StoreResult<Vec<Suppression>> {
        let rows: Vec<SuppressionRow> = sqlx::query_as(
            "SELECT email, reason, source, created_at FROM suppressions ORDER BY created_at, email",
        )
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(Suppression::from).collect())
    }

    async fn setting_or_insert(&self, key: &str, value: &str) -> StoreResult<String> {
        sqlx::query("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.writer)
            .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
                .bind(key)
                .fetch_one(&self.writer)
                .await?,
        )
    }

    async fn message(&self, id: i64) -> StoreResult<Option<LogEntry>> {
        let row: Option<LogRow> = sqlx::query_as(&format!(
            "SELECT {} FROM messages m LEFT JOIN customers c ON c.id = m.customer_id WHERE m.id = ?",
            rows::LOG_COLUMNS
        ))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(LogEntry::from))
    }

    async fn message_by_message_id(&self, message_id: &str) -> StoreResult<Option<LogEntry>> {
        let wanted = format!("<{}>", message_id.trim().trim_matches(['<', '>']));
        let row: Option<LogRow> = sqlx::query_as(&format!(
            "SELECT {} FROM messages m LEFT JOIN customers c ON c.id = m.customer_id WHERE m.message_id = ? \
             ORDER BY m.id DESC LIMIT 1",
            rows::LOG_COLUMNS
        ))
        .bind(wanted)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(LogEntry::from))
    }

    async fn add_message_event(
        &self,
        message_id: i64,
        kind: &str,
        detail: &serde_json::Value,
    ) -> StoreResult<()> {
        sqlx::query("INSERT INTO message_events (message_id, kind, detail) VALUES (?, ?, ?)")
            .bind(message_id)
            .bind(kind)
            .bind(Json(detail))
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn record_message_event_once(
        &self,
        message_id: i64,
        kind: &str,
        key: &str,
        detail: &serde_json::Value,
    ) -> StoreResult<bool> {
        Ok(sqlx::query_scalar(
            "INSERT INTO message_events (message_id, kind, detail, once_key) VALUES (?, ?, ?, ?) \
             ON CONFLICT (message_id, kind, once_key) WHERE once_key IS NOT NULL \
             DO UPDATE SET count = count + 1 RETURNING count = 1",
        )
        .bind(message_id)
        .bind(kind)
        .bind(Json(detail))
        .bind(key)
        .fetch_one(&self.writer)
        .await?)
    }

    async fn events_for_address(&self, email: &str, kind: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(DISTINCT e.message_id) FROM message_events e JOIN messages m ON m.id = e.message_id \
             WHERE lower(m.email) = ? AND e.kind = ?",
        )
        .bind(normalize_email(email))
        .bind(kind)
        .fetch_one(&self.reader)
        .await?)
    }

    async fn log(&self, filter: &LogFilter) -> StoreResult<Vec<LogEntry>> {
        let path = self.log_access_path(filter).await?;
        // `+` keeps SQLite off a column's index when another filter drives the search.
        let other = if path.drives() { "+" } else { "" };
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {} FROM messages m LEFT JOIN customers c ON c.id = m.customer_id WHERE 1 = 1",
            rows::LOG_COLUMNS
        ));
        if let Some(since) = filter.since {
            query.push(" AND m.updated_at >= ").push_bind(ts(since));
        }
        if let Some(rule) = &filter.rule {
            query.push(format!(" AND {other}m.rule = ")).push_bind(rule);
        }
        if let Some(state) = filter.state {
            query
                .push(format!(" AND {other}m.state = "))
                .push_bind(state.as_str());
        }
        if let Some(customer) = &filter.customer_id {
            query.push(" AND m.customer_id = ").push_bind(customer);
        }
        if let Some(due_before) = filter.due_before {
            query
                .push(" AND m.state IN ('scheduled', 'retrying') AND m.next_attempt_at <= ")
                .push_bind(ts(due_before));
        }
        if let Some(before) = filter.before_id {
            query.push(" AND m.id < ").push_bind(before);
        }
        if let Some(search) = filter.customer_search.as_deref() {
            match &path {
                LogPath::Customers(ids) => {
                    query.push(" AND m.customer_id IN (");
                    let mut list = query.separated(", ");
                    // Never matches; keeps the list valid when nobody matched.
                    list.push("NULL");
                    for id in ids {
                        list.push_bind(id.clone());
                    }
                    query.push(")");
                }
                _ => {
                    let pattern = like_pattern(search);
                    query
                        .push(" AND +m.customer_id IN (SELECT s.id FROM customers s WHERE s.id = ")
                        .push_bind(search.to_string());
                    query
                        .push(" OR lower(s.email) LIKE ")
                        .push_bind(pattern.clone())
                        .push(" ESCAPE '\\'");
                    query
                        .push(" OR lower(s.name) LIKE ")
                        .push_bind(pattern)
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
            query
                .push(format!(" AND {by_index}COALESCE(m.sent_at, m.due_at) >= "))
                .push_bind(from);
            query
                .push(format!(" AND {by_index}COALESCE(m.sent_at, m.due_at) < "))
                .push_bind(until);
        }
        if let LogPath::IdsFrom(Some(newest)) = path {
            query.push(" AND m.id <= ").push_bind(newest);
        }
        if filter.due_before.is_some() {
            query.push(" ORDER BY m.next_attempt_at, m.id");
        } else {
            query.push(" ORDER BY m.id DESC");
        }
        if let Some(limit) = filter.limit {
            query.push(" LIMIT ").push_bind(limit);
        }
        let rows: Vec<LogRow> = query.build_query_as().fetch_all(&self.reader).await?;
        Ok(rows.into_iter().map(LogEntry::from).collect())
    }

    async fn message_events(&self, message_id: i64) -> StoreResult<Vec<MessageEvent>> {
        let rows: Vec<MessageEventRow> = sqlx::query_as(
            "SELECT kind, at, attempt, smtp_reply, detail, count FROM message_events WHERE message_id = ? ORDER BY id",
        )
        .bind(message_id)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(MessageEvent::from).collect())
    }

    async fn due_backlog(&self) -> StoreResult<(i64, Option<f64>)> {
        let row: (i64, Option<f64>) = sqlx::query_as(&format!("SELECT COUNT(*), MAX((julianday({NOW}) - julianday(next_attempt_at)) * 86400.0) FROM messages \
             INDEXED BY messages_waiting WHERE state IN ('scheduled', 'retrying') AND next_attempt_at <= {NOW}")).fetch_one(&self.reader).await?;
        Ok(row)
    }

    async fn counts(&self) -> StoreResult<Vec<(String, MessageState, i64)>> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT rule, state, COUNT(*) FROM messages GROUP BY rule, state ORDER BY rule, state",
        )
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(rule, state, n)| {
                MessageState::from_str(&state).ok().map(|s| (rule, s, n))
            })
            .collect())
    }

    async fn sent_content(&self, message_id: i64) -> StoreResult<Option<SentContent>> {
        let row: Option<SentContentRow> =
            sqlx::query_as("SELECT body_text, body_html, checks FROM messages WHERE id = ?")
                .bind(message_id)
                .fetch_optional(&self.reader)
                .await?;
        Ok(row.and_then(SentContentRow::into_content))
    }

    async fn activity(&self, since: DateTime<Utc>) -> StoreResult<Vec<ActivityCount>> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT substr(updated_at, 1, 13) || ':00:00Z' AS hour, rule, state, COUNT(*) FROM messages \
             WHERE +state IN ('sent', 'failed', 'skipped', 'unknown') AND updated_at >= ? \
             GROUP BY hour, rule, state ORDER BY hour, rule, state",
        )
        .bind(ts(since))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(hour, rule, state, count)| {
                Some(ActivityCount {
                    hour: DateTime::parse_from_rfc3339(&hour)
                        .ok()?
                        .with_timezone(&Utc),
                    rule,
                    state: state.parse().ok()?,
                    count,
                })
            })
            .collect())
    }

    async fn engagement(&self, since: DateTime<Utc>) -> StoreResult<Vec<(String, String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT m.rule, e.kind, COUNT(DISTINCT e.message_id) FROM message_events e \
             JOIN messages m ON m.id = e.message_id \
             WHERE e.kind IN ('opened', 'clicked') AND e.at >= ? GROUP BY m.rule, e.kind ORDER BY m.rule, e.kind",
        )
        .bind(ts(since))
        .fetch_all(&self.reader)
        .await?)
    }

    async fn count_state(&self, state: MessageState) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE state = ?")
                .bind(state.as_str())
                .fetch_one(&self.reader)
                .await?,
        )
    }

    async fn customer_events(&self, customer_id: &str, limit: i64) -> StoreResult<Vec<Event>> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT id, customer_id, kind, occurred_at, data FROM events WHERE customer_id = ? \
             ORDER BY occurred_at DESC, seq DESC LIMIT ?",
        )
        .bind(customer_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(Event::from).collect())
    }

    async fn customer_message_events(
        &self,
        customer_id: &str,
        limit: i64,
    ) -> StoreResult<Vec<CustomerMessageEvent>> {
        let rows: Vec<CustomerMessageEventRow> = sqlx::query_as(
            "SELECT e.message_id, m.rule, e.kind, e.at, e.attempt, e.smtp_reply, e.detail, e.count \
             FROM message_events e JOIN messages m ON m.id = e.message_id \
             WHERE m.customer_id = ? ORDER BY e.at DESC, e.id DESC LIMIT ?",
        )
        .bind(customer_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(CustomerMessageEvent::from).collect())
    }

    async fn revoke_session(&self, nonce_hash: &str, expires_at: i64) -> StoreResult<()> {
        sqlx::query("DELETE FROM web_session_revocations WHERE expires_at < CAST(strftime('%s', 'now') AS INTEGER)")
            .execute(&self.writer)
            .await?;
        sqlx::query(
            "INSERT INTO web_session_revocations (nonce_hash, expires_at) VALUES (?, ?) \
             ON CONFLICT (nonce_hash) DO NOTHING",
        )
        .bind(nonce_hash)
        .bind(expires_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn session_revoked(&self, nonce_hash: &str) -> StoreResult<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM web_session_revocations WHERE nonce_hash = ?")
                .bind(nonce_hash)
                .fetch_optional(&self.reader)
                .await?;
        Ok(found.is_some())
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
    /// Ids newest first, from the newest message of a wide date range (none: no match).
    IdsFrom(Option<i64>),
}

impl LogPath {
    /// Whether a filter other than rule and state drives the search.
    fn drives(&self) -> bool {
        matches!(self, LogPath::Customers(_) | LogPath::Dates)
    }
}

/// The date range of a log filter as stored text; open ends reach past every time.
fn date_bounds(filter: &LogFilter) -> (String, String) {
    (
        filter.from.map(ts).unwrap_or_default(),
        filter.until.map_or_else(|| "9999".to_string(), ts),
    )
}

/// A customer search matching at most this many customers looks up their messages by index.
const FEW_CUSTOMERS: usize = 500;
/// A date range matching at least this many messages is walked in id order instead.
const MANY_ROWS: i64 = 5000;

/// `%text%` for LIKE, lower-cased, with LIKE's own wildcards escaped by `\`.
pub(super) fn like_pattern(text: &str) -> String {
    let escaped = text
        .trim()
        .to_lowercase()
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// Waiting messages past `expires_at`: never attempted ones are skipped; ones that were tried
/// and are waiting to retry have failed (their last reply is kept).
pub(super) const EXPIRY_TRANSITIONS: [(&str, &str, &str); 2] = [
    (
        "scheduled",
        "skipped",
        "expired: could not go out within expire_after of its due time",
    ),
    (
        "retrying",
        "failed",
        "expired while retrying: still not delivered at the end of expire_after",
    ),
];

/// What happens to a claim whose lease ran out, by the phase its attempt reached.
pub(super) fn reap_transitions(
    resend_unknown: bool,
) -> [(&'static str, &'static str, &'static str); 2] {
    [
        (
            "claimed",
            "scheduled",
            "claim expired before the body was sent; rescheduled",
        ),
        if resend_unknown {
            (
                "body",
                "retrying",
                "claim expired after the body was handed over; resending as configured",
            )
        } else {
            (
                "body",
                "unknown",
                "claim expired after the body was handed to the SMTP server; it may or may not have been delivered",
            )
        },
    ]
}
