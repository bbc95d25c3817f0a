//! PostgreSQL, for a business that runs several replicas of the daemon: claims use
//! `FOR UPDATE SKIP LOCKED`, so any number of processes share the work without waiting on each
//! other, and every lease is judged by the server's clock.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::rows::{
    self, CandidateRow, ClaimRow, CustomerMessageEventRow, CustomerRow, EventRow, LogRow,
    MessageEventRow, SentContentRow, SuppressionRow,
};
use super::sqlite::{EXPIRY_TRANSITIONS, like_pattern, reap_transitions};
use super::*;

#[derive(Debug, Clone)]
pub struct PostgresStore {
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
        Ok(PostgresStore { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn begin_body_keeping(
        &self,
        id: i64,
        token: &str,
        delivery: &Delivery,
        content: Option<&SentContent>,
        margin: TimeDelta,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE messages SET phase = 'body', email = $1, subject = $2, message_id = $3, \
             body_text = COALESCE($7, body_text), body_html = COALESCE($8, body_html), \
             checks = COALESCE($9, checks), updated_at = now() \
             WHERE id = $4 AND claim_token = $5 AND state = 'sending' \
             AND lease_expires_at > clock_timestamp() + $6 * interval '1 millisecond' \
             AND (expires_at IS NULL OR expires_at > clock_timestamp()) \
             AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = $10)",
        )
        .bind(&delivery.email)
        .bind(&delivery.subject)
        .bind(&delivery.message_id)
        .bind(id)
        .bind(token)
        .bind(millis(margin))
        .bind(content.map(|c| &c.text))
        .bind(content.map(|c| &c.html))
        .bind(content.map(|c| Json(&c.checks)))
        .bind(normalize_email(&delivery.email))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
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

fn millis(d: TimeDelta) -> f64 {
    d.num_milliseconds() as f64
}

/// A customer search matching at most this many customers looks up their messages by index.
const FEW_CUSTOMERS: usize = 500;
/// A date range matching fewer messages than this bounds the ids the log walks.
const MANY_ROWS: i64 = 5000;

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn upsert_customers(&self, customers: &[Customer]) -> StoreResult<()> {
        let customers = by_id(customers, |c| &c.id);
        let mut tx = self.pool.begin().await?;
        for chunk in customers.chunks(500) {
            let mut query = QueryBuilder::<Postgres>::new(
                "INSERT INTO customers (id, email, name, timezone, attributes) ",
            );
            query.push_values(chunk, |mut row, c| {
                row.push_bind(&c.id)
                    .push_bind(&c.email)
                    .push_bind(&c.name)
                    .push_bind(&c.timezone)
                    .push_bind(Json(&c.attributes));
            });
            query.push(
                " ON CONFLICT (id) DO UPDATE SET email = excluded.email, name = excluded.name, \
                 timezone = excluded.timezone, attributes = excluded.attributes, updated_at = now()",
            );
            query.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn merge_customers(&self, patches: &[CustomerPatch]) -> StoreResult<u64> {
        if patches.is_empty() {
            return Ok(0);
        }
        let patches = by_id(patches, |p| &p.id);
        let columns = MergeColumns::of(&patches);
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

    async fn insert_events(&self, events: &[Event]) -> StoreResult<u64> {
        let events = by_id(events, |e| &e.id);
        let mut tx = self.pool.begin().await?;
        let mut inserted = 0;
        for chunk in events.chunks(500) {
            let mut query = QueryBuilder::<Postgres>::new(
                "INSERT INTO events (id, customer_id, kind, occurred_at, data) ",
            );
            query.push_values(chunk, |mut row, e| {
                row.push_bind(&e.id)
                    .push_bind(&e.customer_id)
                    .push_bind(&e.kind)
                    .push_bind(e.occurred_at)
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
            "SELECT id, email, name, timezone, attributes FROM customers WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Customer::from))
    }

    async fn event(&self, id: &str) -> StoreResult<Option<Event>> {
        let row: Option<EventRow> = sqlx::query_as(
            "SELECT id, customer_id, kind, occurred_at, data FROM events WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Event::from))
    }

    async fn latest_event(&self, customer_id: &str, kind: &str) -> StoreResult<Option<Event>> {
        let row: Option<EventRow> = sqlx::query_as(
            "SELECT id, customer_id, kind, occurred_at, data FROM events WHERE customer_id = $1 AND kind = $2 \
             ORDER BY occurred_at DESC LIMIT 1",
        )
        .bind(customer_id)
        .bind(kind)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Event::from))
    }

    async fn has_event_after(
        &self,
        customer_id: &str,
        kind: &str,
        after: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM events WHERE customer_id = $1 AND kind = $2 AND occurred_at > $3 LIMIT 1",
        )
        .bind(customer_id)
        .bind(kind)
        .bind(after)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    async fn max_seqs(&self) -> StoreResult<(i64, i64)> {
        let seqs: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COALESCE(MAX(seq), 0) FROM customers), (SELECT COALESCE(MAX(seq), 0) FROM events)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(seqs)
    }

    async fn candidates(&self, q: &CandidateQuery) -> StoreResult<Vec<Candidate>> {
        let mut query = QueryBuilder::<Postgres>::new("");
        match &q.source {
            CandidateSource::NewEvents {
                kind,
                occurred_from,
                unless_since,
            } => {
                query.push(
                    "SELECT e.seq, c.id AS customer_id, c.email, c.name, c.timezone, c.attributes, \
                     e.id AS event_id, e.kind, e.occurred_at, e.data, NULL::timestamptz AS last_trigger \
                     FROM events e JOIN customers c ON c.id = e.customer_id WHERE e.kind = ",
                );
                query
                    .push_bind(kind)
                    .push(" AND e.seq > ")
                    .push_bind(q.after_seq);
                query.push(" AND e.seq <= ").push_bind(q.up_to_seq);
                query
                    .push(" AND e.occurred_at >= ")
                    .push_bind(*occurred_from);
                // `OFFSET 0` in each anti-join on `messages`: it keeps the check a lookup in
                // the index per row. Without it, while `messages` has no statistics yet (a new
                // database, or millions of rows planned since the last ANALYZE), PostgreSQL
                // joined every candidate against a materialized list of all of this rule's
                // messages: 43 s instead of 32 ms for one page with 50,000 messages
                // (BENCHMARKS.md, planning).
                query.push(" AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.dedupe_key = ");
                query
                    .push_bind(format!("{}:", q.rule))
                    .push(" || e.id OFFSET 0)");
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
                    .push_bind(q.now)
                    .push(" OFFSET 0)");
                query.push(
                    " AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = lower(c.email))",
                );
                query.push(" ORDER BY e.seq");
            }
            CandidateSource::RecurringCustomers => {
                query.push(
                    "SELECT c.seq, c.id AS customer_id, c.email, c.name, c.timezone, c.attributes, \
                     NULL::text AS event_id, NULL::text AS kind, NULL::timestamptz AS occurred_at, \
                     NULL::jsonb AS data, (SELECT MAX(m.trigger_at) FROM messages m WHERE m.rule = ",
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
                    .push_bind(q.now)
                    .push(" OFFSET 0)");
                query.push(
                    " AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = lower(c.email))",
                );
                query.push(" ORDER BY c.seq");
            }
        }
        query.push(" LIMIT ").push_bind(q.limit);
        // Planned afresh each time, not as a cached prepared statement: the generic plan that
        // PostgreSQL settles on after five runs was made while `messages` was still small (a
        // nested loop over all of it), and stays when a first pass has grown it to millions.
        let rows: Vec<CandidateRow> = query
            .build_query_as()
            .persistent(false)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Candidate::from).collect())
    }

    async fn existing_dedupe_keys(
        &self,
        keys: &[String],
    ) -> StoreResult<std::collections::HashSet<String>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT dedupe_key FROM messages WHERE dedupe_key = ANY($1)")
                .bind(keys)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(key,)| key).collect())
    }

    async fn insert_messages(&self, messages: &[NewMessage]) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let mut inserted = 0;
        for chunk in messages.chunks(500) {
            let mut query = QueryBuilder::<Postgres>::new(
                "INSERT INTO messages (rule, customer_id, event_id, dedupe_key, trigger_at, due_at, \
                 expires_at, next_attempt_at, detail) ",
            );
            query.push_values(chunk, |mut row, m| {
                row.push_bind(&m.rule)
                    .push_bind(&m.customer_id)
                    .push_bind(&m.event_id)
                    .push_bind(&m.dedupe_key)
                    .push_bind(m.trigger_at)
                    .push_bind(m.due_at)
                    .push_bind(m.expires_at)
                    .push_bind(m.due_at)
                    .push_bind(Json(&m.detail));
            });
            query.push(" ON CONFLICT (dedupe_key) DO NOTHING");
            inserted += query.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn expire_overdue(&self) -> StoreResult<Vec<i64>> {
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::new();
        for (from, to, reason) in EXPIRY_TRANSITIONS {
            let rows: Vec<(i64,)> = sqlx::query_as(&format!(
                "WITH expired AS ( \
                   UPDATE messages SET state = '{to}', reason = $1, updated_at = now() \
                   WHERE id IN (SELECT id FROM messages WHERE state = '{from}' AND expires_at < now() \
                                FOR UPDATE SKIP LOCKED) \
                   RETURNING id, attempts, smtp_reply) \
                 INSERT INTO message_events (message_id, kind, attempt, smtp_reply, detail) \
                 SELECT id, '{to}', attempts, smtp_reply, $2 FROM expired RETURNING message_id"
            ))
            .bind(reason)
            .bind(Json(serde_json::json!({ "reason": reason })))
            .fetch_all(&mut *tx)
            .await?;
            ids.extend(rows.into_iter().map(|(id,)| id));
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
        let rows: Vec<ClaimRow> = sqlx::query_as(&format!(
            "UPDATE messages SET state = 'sending', claim_token = $1, claimed_by = $2, \
             lease_expires_at = now() + $3 * interval '1 millisecond', phase = 'claimed', \
             attempts = attempts + 1, updated_at = now() \
             WHERE id IN (SELECT id FROM messages WHERE state IN ('scheduled', 'retrying') \
                          AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT $4 \
                          FOR UPDATE SKIP LOCKED) \
             RETURNING {}",
            rows::CLAIM_COLUMNS
        ))
        .bind(&token)
        .bind(instance)
        .bind(millis(lease))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut claims: Vec<_> = rows.into_iter().map(|row| row.into_claim(&token)).collect();
        claims.sort_by_key(|c| (c.due_at, c.id));
        Ok(claims)
    }

    async fn next_due_in(&self) -> StoreResult<Option<TimeDelta>> {
        let millis: Option<f64> = sqlx::query_scalar(
            "SELECT (EXTRACT(EPOCH FROM (MIN(next_attempt_at) - clock_timestamp())) * 1000)::float8 \
             FROM messages WHERE state IN ('scheduled', 'retrying')",
        )
        .fetch_one(&self.pool)
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
        let (kind, reply, detail) = rows::outcome_event(outcome);
        // One statement: the state change and its history line commit together.
        let done: Option<i64> = sqlx::query_scalar(
            "WITH changed AS ( \
               UPDATE messages SET state = $1, next_attempt_at = COALESCE($2, next_attempt_at), \
               smtp_reply = COALESCE($3, smtp_reply), reason = $4, \
               sent_at = CASE WHEN $5 THEN now() ELSE sent_at END, attempts = attempts - $6, \
               claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL, phase = NULL, updated_at = now() \
               WHERE id = $7 AND claim_token = $8 AND state = 'sending' RETURNING id, attempts) \
             INSERT INTO message_events (message_id, kind, attempt, smtp_reply, detail) \
             SELECT id, $9, attempts + $6, $10, $11 FROM changed RETURNING message_id",
        )
        .bind(columns.state)
        .bind(columns.next_attempt_at)
        .bind(columns.smtp_reply)
        .bind(columns.reason)
        .bind(columns.sent)
        .bind(columns.uncount)
        .bind(id)
        .bind(token)
        .bind(kind)
        .bind(reply)
        .bind(Json(detail))
        .fetch_optional(&self.pool)
        .await?;
        Ok(done.is_some())
    }

    async fn reap_expired(&self, resend_unknown: bool) -> StoreResult<Reaped> {
        let mut reaped = Reaped::default();
        for (phase, to, reason) in reap_transitions(resend_unknown) {
            let rows: Vec<(i64,)> = sqlx::query_as(&format!(
                "WITH reaped AS ( \
                   UPDATE messages SET state = '{to}', reason = $1, claim_token = NULL, \
                   claimed_by = NULL, lease_expires_at = NULL, phase = NULL, updated_at = now() \
                   WHERE id IN (SELECT id FROM messages WHERE state = 'sending' AND phase = '{phase}' \
                                AND lease_expires_at < now() FOR UPDATE SKIP LOCKED) \
                   RETURNING id, attempts) \
                 INSERT INTO message_events (message_id, kind, attempt, detail) \
                 SELECT id, '{to}', attempts, $2 FROM reaped RETURNING message_id"
            ))
            .bind(reason)
            .bind(Json(serde_json::json!({ "reason": reason })))
            .fetch_all(&self.pool)
            .await?;
            let count = rows.len() as u64;
            if phase == "claimed" {
                reaped.rescheduled += count
            } else {
                reaped.unknown += count
            }
        }
        Ok(reaped)
    }

    async fn is_suppressed(&self, email: &str) -> StoreResult<bool> {
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM suppressions WHERE email = $1")
            .bind(normalize_email(email))
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    async fn suppress(&self, email: &str, reason: &str, source: &str) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO suppressions (email, reason, source) VALUES ($1, $2, $3) ON CONFLICT (email) DO NOTHING",
        )
        .bind(normalize_email(email))
        .bind(reason)
        .bind(source)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn unsuppress(&self, email: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM suppressions WHERE email = $1")
            .bind(normalize_email(email))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn suppressions(&self) -> StoreResult<Vec<Suppression>> {
        let rows: Vec<SuppressionRow> = sqlx::query_as(
            "SELECT email, reason, source, created_at FROM suppressions ORDER BY created_at, email",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Suppression::from).collect())
    }

    async fn setting_or_insert(&self, key: &str, value: &str) -> StoreResult<String> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                .bind(key)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn message(&self, id: i64) -> StoreResult<Option<LogEntry>> {
        let row: Option<LogRow> = sqlx::query_as(&format!(
            "SELECT {} FROM messages m LEFT JOIN customers c ON c.id = m.customer_id WHERE m.id = $1",
            rows::LOG_COLUMNS
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(LogEntry::from))
    }

    async fn message_by_message_id(&self, message_id: &str) -> StoreResult<Option<LogEntry>> {
        let wanted = format!("<{}>", message_id.trim().trim_matches(['<', '>']));
        let row: Option<LogRow> = sqlx::query_as(&format!(
            "SELECT {} FROM messages m LEFT JOIN customers c ON c.id = m.customer_id WHERE m.message_id = $1 \
             ORDER BY m.id DESC LIMIT 1",
            rows::LOG_COLUMNS
        ))
        .bind(wanted)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(LogEntry::from))
    }

    async fn add_message_event(
        &self,
        message_id: i64,
        kind: &str,
        detail: &serde_json::Value,
    ) -> StoreResult<()> {
        sqlx::query("INSERT INTO message_events (message_id, kind, detail) VALUES ($1, $2, $3)")
            .bind(message_id)
            .bind(kind)
            .bind(Json(detail))
            .execute(&self.pool)
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
            "INSERT INTO message_events (message_id, kind, detail, once_key) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (message_id, kind, once_key) WHERE once_key IS NOT NULL \
             DO UPDATE SET count = message_events.count + 1 RETURNING count = 1",
        )
        .bind(message_id)
        .bind(kind)
        .bind(Json(detail))
        .bind(key)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn events_for_address(&self, email: &str, kind: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(DISTINCT e.message_id) FROM message_events e JOIN messages m ON m.id = e.message_id \
             WHERE lower(m.email) = $1 AND e.kind = $2",
        )
        .bind(normalize_email(email))
        .bind(kind)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn log(&self, filter: &LogFilter) -> StoreResult<Vec<LogEntry>> {
        let mut query = QueryBuilder::<Postgres>::new(format!(
            "SELECT {} FROM messages m LEFT JOIN customers c ON c.id = m.customer_id WHERE 1 = 1",
            rows::LOG_COLUMNS
        ));
        if let Some(since) = filter.since {
            query.push(" AND m.updated_at >= ").push_bind(since);
        }
        if let Some(rule) = &filter.rule {
            query.push(" AND m.rule = ").push_bind(rule);
        }
        if let Some(state) = filter.state {
            query.push(" AND m.state = ").push_bind(state.as_str());
        }
        if let Some(customer) = &filter.customer_id {
            query.push(" AND m.customer_id = ").push_bind(customer);
        }
        if let Some(due_before) = filter.due_before {
            query
                .push(" AND m.state IN ('scheduled', 'retrying') AND m.next_attempt_at <= ")
                .push_bind(due_before);
        }
        if let Some(before) = filter.before_id {
            query.push(" AND m.id < ").push_bind(before);
        }
        // The planner misjudges substring searches and date ranges (it expects few matches
        // spread evenly over the ids), so it either sorts every match or walks the whole log.
        // A capped look first: a few matching customers are looked up by index; many are
        // checked row by row while walking ids newest first (a scalar subquery, which the
        // planner keeps as a per-row check). A narrow date range bounds the ids to walk.
        if let Some(search) = filter.customer_search.as_deref() {
            let pattern = like_pattern(search);
            let ids: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT id FROM customers WHERE id = $1 OR lower(email) LIKE $2 ESCAPE '\\' \
                 OR lower(name) LIKE $2 ESCAPE '\\' LIMIT {}",
                FEW_CUSTOMERS + 1
            ))
            .bind(search)
            .bind(&pattern)
            .fetch_all(&self.pool)
            .await?;
            if ids.len() <= FEW_CUSTOMERS {
                query
                    .push(" AND m.customer_id = ANY(")
                    .push_bind(ids)
                    .push(")");
            } else {
                query
                    .push(" AND COALESCE((SELECT TRUE FROM customers s WHERE s.id = m.customer_id AND (s.id = ")
                    .push_bind(search.to_string());
                query
                    .push(" OR lower(s.email) LIKE ")
                    .push_bind(pattern.clone())
                    .push(" ESCAPE '\\'");
                query
                    .push(" OR lower(s.name) LIKE ")
                    .push_bind(pattern)
                    .push(" ESCAPE '\\')), FALSE)");
            }
        }
        if filter.from.is_some() || filter.until.is_some() {
            // Open ends as times far outside any message's (and inside PostgreSQL's range).
            let from = filter.from.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
            let until = filter
                .until
                .unwrap_or(DateTime::<Utc>::UNIX_EPOCH + chrono::TimeDelta::days(365 * 8000));
            let range = "COALESCE(sent_at, due_at) >= $1 AND COALESCE(sent_at, due_at) < $2";
            let matches: i64 = sqlx::query_scalar(&format!(
                "SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE {range} LIMIT {MANY_ROWS}) t"
            ))
            .bind(from)
            .bind(until)
            .fetch_one(&self.pool)
            .await?;
            if matches < MANY_ROWS {
                // OFFSET 0 keeps the planner from turning MIN/MAX into walks of the id index.
                let (low, high): (Option<i64>, Option<i64>) = sqlx::query_as(&format!(
                    "SELECT MIN(id), MAX(id) FROM (SELECT id FROM messages WHERE {range} OFFSET 0) t"
                ))
                .bind(from)
                .bind(until)
                .fetch_one(&self.pool)
                .await?;
                query
                    .push(" AND m.id >= ")
                    .push_bind(low.unwrap_or(0))
                    .push(" AND m.id <= ")
                    .push_bind(high.unwrap_or(-1));
            }
            query
                .push(" AND COALESCE(m.sent_at, m.due_at) >= ")
                .push_bind(from);
            query
                .push(" AND COALESCE(m.sent_at, m.due_at) < ")
                .push_bind(until);
        }
        if filter.due_before.is_some() {
            query.push(" ORDER BY m.next_attempt_at, m.id");
        } else {
            query.push(" ORDER BY m.id DESC");
        }
        if let Some(limit) = filter.limit {
            query.push(" LIMIT ").push_bind(limit);
        }
        let rows: Vec<LogRow> = query.build_query_as().fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(LogEntry::from).collect())
    }

    async fn message_events(&self, message_id: i64) -> StoreResult<Vec<MessageEvent>> {
        let rows: Vec<MessageEventRow> = sqlx::query_as(
            "SELECT kind, at, attempt, smtp_reply, detail, count FROM message_events WHERE message_id = $1 ORDER BY id",
        )
        .bind(message_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(MessageEvent::from).collect())
    }

    async fn due_backlog(&self) -> StoreResult<(i64, Option<f64>)> {
        let row: (i64, Option<f64>) = sqlx::query_as("SELECT COUNT(*), EXTRACT(EPOCH FROM now() - MIN(next_attempt_at))::float8 FROM messages \
             WHERE state IN ('scheduled', 'retrying') AND next_attempt_at <= now()").fetch_one(&self.pool).await?;
        Ok(row)
    }

    async fn counts(&self) -> StoreResult<Vec<(String, MessageState, i64)>> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT rule, state, COUNT(*) FROM messages GROUP BY rule, state ORDER BY rule, state",
        )
        .fetch_all(&self.pool)
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
            sqlx::query_as("SELECT body_text, body_html, checks FROM messages WHERE id = $1")
                .bind(message_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.and_then(SentContentRow::into_content))
    }

    async fn activity(&self, since: DateTime<Utc>) -> StoreResult<Vec<ActivityCount>> {
        let rows: Vec<(DateTime<Utc>, String, String, i64)> = sqlx::query_as(
            "SELECT date_trunc('hour', updated_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour, rule, state, COUNT(*) FROM messages \
             WHERE state IN ('sent', 'failed', 'skipped', 'unknown') AND updated_at >= $1 \
             GROUP BY hour, rule, state ORDER BY hour, rule, state",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(hour, rule, state, count)| {
                Some(ActivityCount {
                    hour,
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
             WHERE e.kind IN ('opened', 'clicked') AND e.at >= $1 GROUP BY m.rule, e.kind ORDER BY m.rule, e.kind",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn count_state(&self, state: MessageState) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE state = $1")
                .bind(state.as_str())
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn customer_events(&self, customer_id: &str, limit: i64) -> StoreResult<Vec<Event>> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT id, customer_id, kind, occurred_at, data FROM events WHERE customer_id = $1 \
             ORDER BY occurred_at DESC, seq DESC LIMIT $2",
        )
        .bind(customer_id)
        .bind(limit)
        .fetch_all(&self.pool)
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
             WHERE m.customer_id = $1 ORDER BY e.at DESC, e.id DESC LIMIT $2",
        )
        .bind(customer_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(CustomerMessageEvent::from).collect())
    }

    async fn revoke_session(&self, nonce_hash: &str, expires_at: i64) -> StoreResult<()> {
        sqlx::query("DELETE FROM web_session_revocations WHERE expires_at < extract(epoch FROM now())::bigint")
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO web_session_revocations (nonce_hash, expires_at) VALUES ($1, $2) \
             ON CONFLICT (nonce_hash) DO NOTHING",
        )
        .bind(nonce_hash)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn session_revoked(&self, nonce_hash: &str) -> StoreResult<bool> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM web_session_revocations WHERE nonce_hash = $1")
                .bind(nonce_hash)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
    }
}
