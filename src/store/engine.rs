//! The one storage implementation: every query written once, over a `Driver` that supplies
//! the SQL text that differs per database and runs the statements.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};

use super::group::GroupCommit;
use super::rows::{
    self, CandidateRow, ClaimRow, CustomerMessageEventRow, CustomerRow, EventRow, LogRow,
    MessageEventRow, SentContentRow, SuppressionPeriodRow, SuppressionRow,
};
use super::sql::{Arg, Driver, LoggedUpdate, Reply, Sql, Via};
use super::*;

/// The store over one database. `SqliteStore` and `PostgresStore` name its two drivers.
#[derive(Debug, Clone)]
pub struct SqlStore<D> {
    pub(super) driver: D,
    /// The body fences waiting to commit, grouped into one durable transaction.
    fences: Arc<GroupCommit<Fence, u64>>,
}

/// One body fence's write.
enum Fence {
    /// Without a frequency limit: written together with the plain fences next to it in the
    /// group, in one statement.
    Plain(PlainFence),
    /// With a frequency limit: its own statement (judged after the fences before it in the
    /// group) under the customer's serialisation key.
    Limited { key: String, sql: Sql },
}

/// What a fence without a frequency limit writes.
struct PlainFence {
    id: i64,
    token: String,
    delivery: Delivery,
    content: SentContent,
    margin: TimeDelta,
}

impl<D> SqlStore<D> {
    pub(super) fn new(driver: D) -> SqlStore<D> {
        SqlStore {
            driver,
            fences: Arc::default(),
        }
    }
}

/// How many rows one multi-row INSERT writes.
const CHUNK: usize = 500;

pub(super) const CUSTOMER_COLUMNS: &str = "id, email, name, timezone, attributes";
pub(super) const EVENT_COLUMNS: &str = "id, customer_id, kind, occurred_at, data";
const MESSAGE_WITH_CUSTOMER: &str = "FROM messages m LEFT JOIN customers c ON c.id = m.customer_id";
const NOT_SUPPRESSED: &str =
    " AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = lower(c.email))";
/// What happened while the address was suppressed stays unsent, also once it is allowed again.
const NOT_SUPPRESSED_AT_EVENT: &str = " AND NOT EXISTS (SELECT 1 FROM suppression_periods p \
     WHERE p.email = lower(c.email) AND p.since <= e.occurred_at AND p.until > e.occurred_at)";

/// [`LogEntry::dated_at`] in SQL, over the messages aliased `m` (`"m."`) or unaliased (`""`):
/// the log's order and date filters and the overview's counts all use it, and the
/// `messages_dated` index is built on the same expression.
pub(super) fn dated(alias: &str) -> String {
    format!(
        "(CASE WHEN {alias}sent_at IS NOT NULL THEN {alias}sent_at \
         WHEN {alias}state IN ('sent', 'failed', 'skipped', 'unknown') THEN {alias}updated_at \
         ELSE {alias}next_attempt_at END)"
    )
}

/// The log reads its messages in two parts, each in its order on its own index, and merges
/// them: `messages_dated` holds only the messages that do not wait (migration 0012), so that
/// the planner's rows enter one index fewer. A waiting message (scheduled or retrying) has no
/// `sent_at` (only the outcome `sent` sets it, and `sent` is final) and is not final, so
/// [`dated`] of it is its `next_attempt_at`, which `messages_waiting` orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogPart {
    /// Every state but scheduled and retrying: `messages_dated`, dated by [`dated`].
    History,
    /// Scheduled and retrying: `messages_waiting`, dated by `next_attempt_at`.
    Waiting,
    /// Every message: a count whose filter names no date needs neither index.
    Whole,
}

impl LogPart {
    /// The part's messages (of `messages m`): the predicate of its index word for word, since
    /// a partial index serves a query only when the query's WHERE says so.
    pub(super) fn rows(self) -> &'static str {
        match self {
            LogPart::History => "m.state NOT IN ('scheduled', 'retrying')",
            LogPart::Waiting => "m.state IN ('scheduled', 'retrying')",
            LogPart::Whole => "1 = 1",
        }
    }

    /// [`dated`] of the part's messages (`m`), as its index holds it.
    pub(super) fn date(self) -> String {
        match self {
            LogPart::History | LogPart::Whole => dated("m."),
            LogPart::Waiting => "m.next_attempt_at".to_string(),
        }
    }

    /// The parts that can hold messages the filter matches (none: it matches nothing).
    pub(super) fn of(filter: &LogFilter) -> &'static [LogPart] {
        let waits = |s: MessageState| matches!(s, MessageState::Scheduled | MessageState::Retrying);
        let history = filter.due_before.is_none() && filter.state.is_none_or(|s| !waits(s));
        let waiting = !filter.history && filter.state.is_none_or(waits);
        match (history, waiting) {
            (true, true) => &[LogPart::History, LogPart::Waiting],
            (true, false) => &[LogPart::History],
            (false, true) => &[LogPart::Waiting],
            (false, false) => &[],
        }
    }
}

/// Inserts the customers, or replaces every field of those that exist: one statement per
/// chunk.
pub(super) fn customer_upserts<D: Driver>(customers: &[&Customer]) -> Vec<Sql> {
    customers
        .chunks(CHUNK)
        .map(|chunk| {
            let mut sql = Sql::new(format!("INSERT INTO customers ({CUSTOMER_COLUMNS}) "));
            sql.values(chunk, |c| {
                vec![
                    c.id.as_str().into(),
                    c.email.as_str().into(),
                    (&c.name).into(),
                    (&c.timezone).into(),
                    Arg::json(&c.attributes),
                ]
            });
            sql.push(format!(
                " ON CONFLICT (id) DO UPDATE SET email = excluded.email, name = excluded.name, \
                 timezone = excluded.timezone, attributes = excluded.attributes, updated_at = {}",
                D::NOW
            ));
            sql
        })
        .collect()
}

/// `SELECT` of the customers with these ids.
pub(super) fn customers_by_id(ids: &[String]) -> Sql {
    let mut sql = Sql::new(format!(
        "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id IN "
    ));
    sql.list(ids);
    sql
}

/// Inserts the planner's messages, `CHUNK` rows per multi-row `VALUES` statement; a message
/// whose `dedupe_key` exists is left out (`Driver::insert_messages`, by default).
pub(super) fn message_inserts(messages: &[NewMessage]) -> Vec<Sql> {
    messages
        .chunks(CHUNK)
        .map(|chunk| {
            let mut sql = Sql::new(format!("INSERT INTO messages ({MESSAGE_INSERT_COLUMNS}) "));
            sql.values(chunk, |m| {
                vec![
                    m.rule.as_str().into(),
                    m.customer_id.as_str().into(),
                    (&m.event_id).into(),
                    m.dedupe_key.as_str().into(),
                    m.trigger_at.into(),
                    m.due_at.into(),
                    m.expires_at.into(),
                    m.due_at.into(),
                    Arg::json(&m.detail),
                ]
            });
            sql.push(" ON CONFLICT (dedupe_key) DO NOTHING");
            sql
        })
        .collect()
}

/// The columns the planner writes; `next_attempt_at` starts as `due_at`.
pub(super) const MESSAGE_INSERT_COLUMNS: &str = "rule, customer_id, event_id, dedupe_key, \
     trigger_at, due_at, expires_at, next_attempt_at, detail";

#[async_trait]
impl<D: Driver> CustomerStore for SqlStore<D> {
    async fn upsert_customers(&self, customers: &[Customer]) -> StoreResult<()> {
        let customers = by_id(customers, |c| &c.id);
        self.driver
            .execute_all(customer_upserts::<D>(&customers))
            .await?;
        Ok(())
    }

    async fn merge_customers(&self, patches: &[CustomerPatch]) -> StoreResult<u64> {
        if patches.is_empty() {
            return Ok(0);
        }
        let patches = by_id(patches, |p| &p.id);
        self.driver.merge_customers(&patches).await
    }

    async fn insert_events(&self, events: &[Event]) -> StoreResult<u64> {
        let events = by_id(events, |e| &e.id);
        let statements = events
            .chunks(CHUNK)
            .map(|chunk| {
                let mut sql = Sql::new(format!("INSERT INTO events ({EVENT_COLUMNS}) "));
                sql.values(chunk, |e| {
                    vec![
                        e.id.as_str().into(),
                        e.customer_id.as_str().into(),
                        e.kind.as_str().into(),
                        e.occurred_at.into(),
                        Arg::json(&e.data),
                    ]
                });
                sql.push(" ON CONFLICT (id) DO NOTHING");
                sql
            })
            .collect();
        self.driver.execute_all(statements).await
    }

    async fn customer(&self, id: &str) -> StoreResult<Option<Customer>> {
        let sql = Sql::new(format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = ?"
        ))
        .arg(id);
        let row: Option<CustomerRow> = self.driver.fetch_optional(Via::Reader, sql).await?;
        Ok(row.map(Customer::from))
    }

    async fn customers_by_email(&self, email: &str, limit: i64) -> StoreResult<Vec<Customer>> {
        let sql = Sql::new(format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE lower(email) = ? ORDER BY id LIMIT ?"
        ))
        .arg(super::normalize_email(email))
        .arg(limit);
        let rows: Vec<CustomerRow> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows.into_iter().map(Customer::from).collect())
    }

    async fn event(&self, id: &str) -> StoreResult<Option<Event>> {
        let sql = Sql::new(format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = ?")).arg(id);
        let row: Option<EventRow> = self.driver.fetch_optional(Via::Reader, sql).await?;
        Ok(row.map(Event::from))
    }

    async fn latest_event(&self, customer_id: &str, kind: &str) -> StoreResult<Option<Event>> {
        let sql = Sql::new(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE customer_id = ? AND kind = ? \
             ORDER BY occurred_at DESC LIMIT 1"
        ))
        .arg(customer_id)
        .arg(kind);
        let row: Option<EventRow> = self.driver.fetch_optional(Via::Reader, sql).await?;
        Ok(row.map(Event::from))
    }

    async fn has_event_after(
        &self,
        customer_id: &str,
        kind: &str,
        after: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let sql = Sql::new(
            "SELECT 1 FROM events WHERE customer_id = ? AND kind = ? AND occurred_at > ? LIMIT 1",
        )
        .arg(customer_id)
        .arg(kind)
        .arg(after);
        self.driver.exists(Via::Reader, sql).await
    }

    async fn first_event_after(
        &self,
        customer_id: &str,
        kind: &str,
        after: DateTime<Utc>,
    ) -> StoreResult<Option<Event>> {
        let sql = Sql::new(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE customer_id = ? AND kind = ? \
             AND occurred_at > ? ORDER BY occurred_at, seq LIMIT 1"
        ))
        .arg(customer_id)
        .arg(kind)
        .arg(after);
        let row: Option<EventRow> = self.driver.fetch_optional(Via::Reader, sql).await?;
        Ok(row.map(Event::from))
    }

    async fn customer_events(&self, customer_id: &str, limit: i64) -> StoreResult<Vec<Event>> {
        let sql = Sql::new(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE customer_id = ? \
             ORDER BY occurred_at DESC, seq DESC LIMIT ?"
        ))
        .arg(customer_id)
        .arg(limit);
        let rows: Vec<EventRow> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows.into_iter().map(Event::from).collect())
    }
}

impl<D: Driver> SqlStore<D> {
    /// Leaves out suppressed customers, unless the rule writes to the owner about them.
    fn push_not_suppressed(sql: &mut Sql, q: &CandidateQuery) {
        if !q.include_suppressed {
            sql.push(NOT_SUPPRESSED);
        }
    }

    /// Events of a kind with no message of this rule yet (see `CandidateSource::NewEvents`).
    fn new_events(q: &CandidateQuery, kind: &str, from: DateTime<Utc>, unless: &[String]) -> Sql {
        let mut sql = Sql::new(format!(
            "SELECT e.seq, c.id AS customer_id, c.email, c.name, c.timezone, c.attributes, \
             e.id AS event_id, e.kind, e.occurred_at, e.data, {} AS last_trigger \
             FROM events e JOIN customers c ON c.id = e.customer_id WHERE e.kind = ",
            D::null("timestamptz")
        ));
        sql.bind(kind).push(" AND e.seq > ").bind(q.after_seq);
        sql.push(" AND e.seq <= ").bind(q.up_to_seq);
        sql.push(" AND e.occurred_at >= ").bind(from);
        // The fence in each anti-join on `messages` keeps the check a lookup in the index per
        // row. Without it, while `messages` has no statistics yet (a new database, or millions
        // of rows planned since the last ANALYZE), PostgreSQL joined every candidate against a
        // materialized list of all of this rule's messages: 43 s instead of 32 ms for one page
        // with 50,000 messages (BENCHMARKS.md, planning).
        sql.push(" AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.dedupe_key = ");
        sql.bind(format!("{}:", q.rule))
            .push(format!(" || e.id{})", D::FENCE));
        for later in unless {
            sql.push(
                " AND NOT EXISTS (SELECT 1 FROM events u WHERE u.customer_id = e.customer_id \
                 AND u.occurred_at > e.occurred_at AND u.kind = ",
            );
            sql.bind(later).push(")");
        }
        if !q.include_suppressed {
            sql.push(NOT_SUPPRESSED_AT_EVENT);
        }
        Self::push_not_suppressed(&mut sql, q);
        sql.push(" ORDER BY e.seq");
        sql
    }

    /// Events of a kind with no occurrence of this rule still to come (on these days of the
    /// year: checked before the lookups, which it spares the events outside them).
    fn recurring_events(q: &CandidateQuery, kind: &str, days: Option<&MonthDays>) -> Sql {
        let mut sql = Sql::new(
            "SELECT e.seq, c.id AS customer_id, c.email, c.name, c.timezone, c.attributes, \
             e.id AS event_id, e.kind, e.occurred_at, e.data, \
             (SELECT MAX(m.trigger_at) FROM messages m WHERE m.rule = ",
        );
        sql.bind(&q.rule)
            .push(" AND m.event_id = e.id) AS last_trigger ");
        sql.push("FROM events e JOIN customers c ON c.id = e.customer_id WHERE e.kind = ");
        sql.bind(kind).push(" AND e.seq > ").bind(q.after_seq);
        sql.push(" AND e.seq <= ").bind(q.up_to_seq);
        if let Some(days) = days {
            let day = D::month_day("e.occurred_at");
            let join = if days.from <= days.to { "AND" } else { "OR" };
            sql.push(format!(" AND ({day} >= "))
                .bind(&days.from)
                .push(format!(" {join} {day} <= "))
                .bind(&days.to)
                .push(")");
        }
        sql.push(" AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.rule = ")
            .bind(&q.rule);
        sql.push(" AND m.event_id = e.id AND m.trigger_at >= ")
            .bind(q.now)
            .push(format!("{})", D::FENCE));
        Self::push_not_suppressed(&mut sql, q);
        sql.push(" ORDER BY e.seq");
        sql
    }

    /// Customers with no occurrence of this rule still to come.
    fn recurring_customers(q: &CandidateQuery) -> Sql {
        let mut sql = Sql::new(format!(
            "SELECT c.seq, c.id AS customer_id, c.email, c.name, c.timezone, c.attributes, \
             {} AS event_id, {} AS kind, {} AS occurred_at, {} AS data, \
             (SELECT MAX(m.trigger_at) FROM messages m WHERE m.rule = ",
            D::null("text"),
            D::null("text"),
            D::null("timestamptz"),
            D::null("jsonb"),
        ));
        // `event_id IS NULL`: a schedule's messages have no event, and the partial index
        // `messages_rule_customer` (0011) holds only those.
        sql.bind(&q.rule)
            .push(" AND m.event_id IS NULL AND m.customer_id = c.id) AS last_trigger ");
        sql.push("FROM customers c WHERE c.seq > ")
            .bind(q.after_seq);
        sql.push(" AND c.seq <= ").bind(q.up_to_seq);
        sql.push(" AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.rule = ")
            .bind(&q.rule);
        sql.push(" AND m.event_id IS NULL AND m.customer_id = c.id AND m.trigger_at >= ")
            .bind(q.now)
            .push(format!("{})", D::FENCE));
        Self::push_not_suppressed(&mut sql, q);
        sql.push(" ORDER BY c.seq");
        sql
    }
}

#[async_trait]
impl<D: Driver> PlanningStore for SqlStore<D> {
    async fn max_seqs(&self) -> StoreResult<(i64, i64)> {
        let sql = Sql::new(
            "SELECT (SELECT COALESCE(MAX(seq), 0) FROM customers), (SELECT COALESCE(MAX(seq), 0) FROM events)",
        );
        self.driver.fetch_one(Via::Reader, sql).await
    }

    async fn candidates(&self, q: &CandidateQuery) -> StoreResult<Vec<Candidate>> {
        let mut sql = match &q.source {
            CandidateSource::NewEvents {
                kind,
                occurred_from,
                unless_since,
            } => Self::new_events(q, kind, *occurred_from, unless_since),
            CandidateSource::RecurringEvents { kind, month_days } => {
                Self::recurring_events(q, kind, month_days.as_ref())
            }
            CandidateSource::RecurringCustomers => Self::recurring_customers(q),
        };
        sql.push(" LIMIT ").bind(q.limit);
        // PostgreSQL plans it afresh each time: the generic plan it settles on after five runs
        // was made while `messages` was still small (a nested loop over all of it), and stays
        // when a first pass has grown it to millions.
        sql.persistent(D::CACHE_CANDIDATE_PLANS);
        let rows: Vec<CandidateRow> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows.into_iter().map(Candidate::from).collect())
    }

    async fn insert_messages(&self, messages: &[NewMessage]) -> StoreResult<u64> {
        if messages.is_empty() {
            return Ok(0);
        }
        self.driver.insert_messages(messages).await
    }

    async fn existing_dedupe_keys(&self, keys: &[String]) -> StoreResult<HashSet<String>> {
        let mut found = HashSet::new();
        for chunk in keys.chunks(D::LIST_CHUNK) {
            let mut sql = Sql::new("SELECT dedupe_key FROM messages WHERE dedupe_key");
            D::push_in(&mut sql, chunk);
            let rows: Vec<(String,)> = self.driver.fetch_all(Via::Reader, sql).await?;
            found.extend(rows.into_iter().map(|(key,)| key));
        }
        Ok(found)
    }
}

impl<D: Driver> SqlStore<D> {
    /// The write of the body fence: the phase, what goes out, and when (`body_at`, what the
    /// frequency limit counts), only while the claim is held with `margin` of its lease left,
    /// the message has not expired and the address is not suppressed.
    fn begin_body(
        id: i64,
        token: &str,
        delivery: &Delivery,
        content: &SentContent,
        margin: TimeDelta,
    ) -> Sql {
        let mut sql = Sql::new("UPDATE messages SET phase = 'body', email = ");
        sql.bind(delivery.email.as_str())
            .push(", subject = ")
            .bind(delivery.subject.as_str());
        sql.push(", message_id = ")
            .bind(delivery.message_id.as_str());
        sql.push(", body_text = COALESCE(")
            .bind(content.text.as_str());
        sql.push(", body_text), body_html = COALESCE(")
            .bind(content.html.as_str());
        sql.push(", body_html), checks = COALESCE(")
            .bind(Arg::Json(Some(
                serde_json::to_value(&content.checks).unwrap_or_default(),
            )));
        // body_at by the clock, not the transaction's start: a fence that waited for a group's
        // locks must not date its send earlier than it went out (the frequency window counts
        // from it).
        sql.push(format!(
            ", checks), body_at = {clock}, updated_at = {now} WHERE id = ",
            clock = D::CLOCK,
            now = D::NOW
        ));
        sql.bind(id).push(" AND claim_token = ").bind(token);
        sql.push(" AND state = 'sending' AND lease_expires_at > ");
        D::push_later(&mut sql, D::CLOCK, margin);
        sql.push(format!(
            " AND (expires_at IS NULL OR expires_at > {}) \
             AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = ",
            D::CLOCK
        ));
        sql.bind(normalize_email(&delivery.email)).push(")");
        sql
    }
}

/// `FROM messages o WHERE ...` the customer's messages that count toward a frequency limit:
/// `sent`, `unknown`, or with the body going out right now, of rules not in `exempt_rules`,
/// other than message `except`. (A message that went back to retrying after its body was
/// refused does not count; `body_at` is when its body last started going out.)
fn push_counted(sql: &mut Sql, customer_id: &str, exempt_rules: &[String], except: i64) {
    sql.push("FROM messages o WHERE o.customer_id = ")
        .bind(customer_id);
    sql.push(" AND o.body_at IS NOT NULL AND o.id <> ")
        .bind(except);
    sql.push(" AND (o.state IN ('sent', 'unknown') OR (o.state = 'sending' AND o.phase = 'body'))");
    if !exempt_rules.is_empty() {
        sql.push(" AND o.rule NOT IN ").list(exempt_rules);
    }
}

/// Waiting messages past `expires_at`: never attempted ones are skipped; ones that were tried
/// and are waiting to retry have failed (their last reply is kept).
const EXPIRY_TRANSITIONS: [(&str, &str, &str); 2] = [
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
fn reap_transitions(resend_unknown: bool) -> [(&'static str, &'static str, &'static str); 2] {
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

/// The columns of a group of plain fences, as `plain_fences` passes them.
const FENCE_COLUMNS: [(&str, &str); 9] = [
    ("id", "bigint"),
    ("token", "text"),
    ("email", "text"),
    ("subject", "text"),
    ("message_id", "text"),
    ("body_text", "text"),
    ("body_html", "text"),
    ("checks", "jsonb"),
    ("suppressed_as", "text"),
];

/// Most fences in one statement: nine parameters each stay far below SQLite's limit (32,766
/// in the bundled library, 999 before 3.32) for any pool size.
const MAX_FENCE_ROWS: usize = 100;

/// The columns of a group of outcomes, as `finish_group` passes them (name, PostgreSQL type).
const FINISH_COLUMNS: [(&str, &str); 8] = [
    ("id", "bigint"),
    ("token", "text"),
    ("state", "text"),
    ("next_at", "timestamptz"),
    ("reply", "text"),
    ("reason", "text"),
    ("sent", "boolean"),
    ("uncount", "integer"),
];

impl<D: Driver> SqlStore<D> {
    /// A group of outcomes in one checked statement (each row its own token, as River's batch
    /// completer does) and their history lines in one more, in one transaction.
    async fn finish_group(&self, outcomes: &[Finishing<'_>]) -> StoreResult<Vec<(i64, i32)>> {
        let rows = outcomes
            .iter()
            .map(|o| {
                let c = rows::outcome_columns(o.outcome);
                serde_json::json!({
                    "id": o.id,
                    "token": o.token,
                    "state": c.state,
                    "next_at": c.next_attempt_at.map(D::time_text),
                    "reply": c.smtp_reply,
                    "reason": c.reason,
                    "sent": c.sent,
                    "uncount": c.uncount,
                })
            })
            .collect();
        let mut sql = Sql::new(format!(
            "UPDATE messages SET state = v.state, \
             next_attempt_at = COALESCE(v.next_at, messages.next_attempt_at), \
             smtp_reply = COALESCE(v.reply, messages.smtp_reply), reason = v.reason, \
             sent_at = CASE WHEN v.sent THEN {now} ELSE messages.sent_at END, \
             attempts = messages.attempts - v.uncount, claim_token = NULL, claimed_by = NULL, \
             lease_expires_at = NULL, phase = NULL, updated_at = {now} FROM ",
            now = D::NOW
        ));
        D::json_rows(&mut sql, serde_json::Value::Array(rows), &FINISH_COLUMNS);
        sql.push(
            " WHERE messages.id = v.id AND messages.claim_token = v.token \
             AND messages.state = 'sending' RETURNING messages.id, messages.attempts",
        );
        let lines: HashMap<i64, HistoryLine> = outcomes
            .iter()
            .map(|o| (o.id, HistoryLine::of(o.outcome)))
            .collect();
        let log = Box::new(move |changed: Vec<(i64, i32)>| history_inserts(&lines, &changed));
        self.driver.update_then_log(sql, log).await
    }

    /// Outcomes one statement each (in the order of the ids: two groups touching common rows
    /// lock them in one order), in one transaction.
    async fn finish_each(&self, outcomes: &[Finishing<'_>]) -> StoreResult<Vec<bool>> {
        let mut order: Vec<usize> = (0..outcomes.len()).collect();
        order.sort_by_key(|&i| outcomes[i].id);
        let updates = order
            .iter()
            .map(|&i| Self::finish_update(outcomes[i].id, outcomes[i].token, outcomes[i].outcome))
            .collect();
        let changed = self.driver.update_logged_relaxed(updates).await?;
        let mut held = vec![false; outcomes.len()];
        for (&i, ids) in order.iter().zip(changed) {
            held[i] = !ids.is_empty();
        }
        Ok(held)
    }
}

/// What an outcome's history line says, besides the message and its attempt.
struct HistoryLine {
    kind: &'static str,
    reply: Option<String>,
    detail: serde_json::Value,
    /// Added to the message's attempts after the update (a release is not an attempt).
    uncount: i32,
}

impl HistoryLine {
    fn of(outcome: &Outcome) -> HistoryLine {
        let (kind, reply, detail) = rows::outcome_event(outcome);
        HistoryLine {
            kind,
            reply: reply.map(str::to_string),
            detail,
            uncount: rows::outcome_columns(outcome).uncount,
        }
    }
}

/// The history lines of the changed messages, `CHUNK` rows per INSERT.
fn history_inserts(lines: &HashMap<i64, HistoryLine>, changed: &[(i64, i32)]) -> Vec<Sql> {
    let rows: Vec<(i64, i32, &HistoryLine)> = changed
        .iter()
        .filter_map(|&(id, attempts)| Some((id, attempts, lines.get(&id)?)))
        .collect();
    rows.chunks(CHUNK)
        .map(|chunk| {
            let mut sql = Sql::new(
                "INSERT INTO message_events (message_id, kind, attempt, smtp_reply, detail) ",
            );
            sql.values(chunk, |(id, attempts, line)| {
                vec![
                    (*id).into(),
                    line.kind.into(),
                    (attempts + line.uncount).into(),
                    line.reply.as_deref().into(),
                    Arg::json(&line.detail),
                ]
            });
            sql
        })
        .collect()
}

impl<D: Driver> SqlStore<D> {
    /// The fenced write of an outcome and its history line.
    fn finish_update(id: i64, token: &str, outcome: &Outcome) -> LoggedUpdate {
        let columns = rows::outcome_columns(outcome);
        let (kind, reply, detail) = rows::outcome_event(outcome);
        let mut set = Sql::new("state = ");
        set.bind(columns.state)
            .push(", next_attempt_at = COALESCE(")
            .bind(columns.next_attempt_at);
        set.push(", next_attempt_at), smtp_reply = COALESCE(")
            .bind(columns.smtp_reply);
        set.push(", smtp_reply), reason = ").bind(columns.reason);
        set.push(", sent_at = CASE WHEN ").bind(columns.sent);
        set.push(format!(
            " THEN {} ELSE sent_at END, attempts = attempts - ",
            D::NOW
        ));
        set.bind(columns.uncount);
        set.push(format!(
            ", claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL, phase = NULL, \
             updated_at = {}",
            D::NOW
        ));
        LoggedUpdate {
            set,
            rows: Sql::new("id = ? AND claim_token = ? AND state = 'sending'")
                .arg(id)
                .arg(token),
            skip_locked: false,
            kind: kind.to_string(),
            attempt_offset: columns.uncount,
            reply: Reply::Given(reply.map(str::to_string)),
            detail,
        }
    }
}

impl<D: Driver> SqlStore<D> {
    /// A body fence's write: [`begin_body`](Self::begin_body), and with a frequency limit, only
    /// while fewer than `max` of the customer's counted messages went out within `per`, judged
    /// in the same statement under the customer's serialisation key.
    fn fence(
        id: i64,
        token: &str,
        delivery: &Delivery,
        content: &SentContent,
        margin: TimeDelta,
        gate: Option<&FrequencyGate>,
    ) -> Fence {
        let Some(gate) = gate else {
            return Fence::Plain(PlainFence {
                id,
                token: token.to_string(),
                delivery: delivery.clone(),
                content: content.clone(),
                margin,
            });
        };
        let mut sql = Self::begin_body(id, token, delivery, content, margin);
        sql.push(" AND (SELECT COUNT(*) ");
        push_counted(&mut sql, &gate.customer_id, &gate.exempt_rules, id);
        sql.push(" AND o.body_at > ");
        D::push_later(&mut sql, D::CLOCK, -gate.per);
        sql.push(") < ").bind(i64::from(gate.max));
        sql.push(" RETURNING id");
        let key = format!("customer:{}", gate.customer_id);
        Fence::Limited { key, sql }
    }

    /// Plain fences with one margin as one statement: each row checks its own token, lease
    /// margin, expiry and suppression, as [`begin_body`](Self::begin_body) does for one.
    fn plain_fences(fences: &[&PlainFence]) -> Sql {
        let rows: Vec<serde_json::Value> = fences
            .iter()
            .map(|f| {
                serde_json::json!({
                    "id": f.id,
                    "token": f.token,
                    "email": f.delivery.email,
                    "subject": f.delivery.subject,
                    "message_id": f.delivery.message_id,
                    "body_text": f.content.text,
                    "body_html": f.content.html,
                    "checks": serde_json::to_value(&f.content.checks).unwrap_or_default(),
                    "suppressed_as": normalize_email(&f.delivery.email),
                })
            })
            .collect();
        let mut sql = Sql::new(format!(
            "UPDATE messages SET phase = 'body', email = v.email, subject = v.subject, \
             message_id = v.message_id, body_text = COALESCE(v.body_text, messages.body_text), \
             body_html = COALESCE(v.body_html, messages.body_html), \
             checks = COALESCE(v.checks, messages.checks), body_at = {clock}, \
             updated_at = {now} FROM ",
            clock = D::CLOCK,
            now = D::NOW
        ));
        D::value_rows(&mut sql, rows, &FENCE_COLUMNS);
        sql.push(
            " WHERE messages.id = v.id AND messages.claim_token = v.token \
             AND messages.state = 'sending' AND messages.lease_expires_at > ",
        );
        let margin = fences.first().map_or(TimeDelta::zero(), |f| f.margin);
        D::push_later(&mut sql, D::CLOCK, margin);
        sql.push(format!(
            " AND (messages.expires_at IS NULL OR messages.expires_at > {clock}) \
             AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = v.suppressed_as) \
             RETURNING messages.id",
            clock = D::CLOCK
        ));
        sql
    }

    /// `counted_sends`, or with `in_flight` only those still going out.
    async fn counted(
        &self,
        customer_id: &str,
        since: DateTime<Utc>,
        exempt_rules: &[String],
        except: i64,
        in_flight: bool,
    ) -> StoreResult<Vec<DateTime<Utc>>> {
        let mut sql = Sql::new("SELECT o.body_at ");
        push_counted(&mut sql, customer_id, exempt_rules, except);
        sql.push(" AND o.body_at > ").bind(since);
        if in_flight {
            sql.push(" AND o.state = 'sending'");
        }
        sql.push(" ORDER BY o.body_at");
        let rows: Vec<(DateTime<Utc>,)> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows.into_iter().map(|(at,)| at).collect())
    }

    /// One fence, committed with whatever other fences wait at the same time.
    async fn grouped_fence(&self, fence: Fence) -> StoreResult<bool> {
        let affected = self
            .fences
            .submit(fence, |group| self.commit_fences(group))
            .await?;
        Ok(affected == 1)
    }

    /// The fences in one durable transaction, in order; each one's rows affected.
    async fn commit_fences(&self, fences: Vec<Fence>) -> StoreResult<Vec<u64>> {
        let mut locks = Vec::new();
        let mut statements = Vec::new();
        // Which fences each statement writes, in the group's order: a run of plain fences (one
        // margin) is one statement, and a limited fence its own (`None`: answered by whether
        // its statement returned a row).
        let mut members: Vec<Vec<(usize, Option<i64>)>> = Vec::new();
        let mut run: Vec<(usize, PlainFence)> = Vec::new();
        let count = fences.len();
        for (i, fence) in fences.into_iter().enumerate() {
            match fence {
                Fence::Plain(plain) => {
                    let other_margin = run
                        .first()
                        .is_some_and(|(_, first)| first.margin != plain.margin);
                    if other_margin || run.len() == MAX_FENCE_ROWS {
                        Self::flush_run(&mut run, &mut statements, &mut members);
                    }
                    run.push((i, plain));
                }
                Fence::Limited { key, sql } => {
                    Self::flush_run(&mut run, &mut statements, &mut members);
                    locks.push(key);
                    statements.push(sql);
                    members.push(vec![(i, None)]);
                }
            }
        }
        Self::flush_run(&mut run, &mut statements, &mut members);
        let returned = self.driver.execute_group(locks, statements).await?;
        let mut affected = vec![0; count];
        for (written, ids) in members.iter().zip(returned) {
            for &(i, id) in written {
                let held = match id {
                    Some(id) => ids.contains(&id),
                    None => !ids.is_empty(),
                };
                affected[i] = u64::from(held);
            }
        }
        Ok(affected)
    }

    /// The run of plain fences so far as one statement.
    fn flush_run(
        run: &mut Vec<(usize, PlainFence)>,
        statements: &mut Vec<Sql>,
        members: &mut Vec<Vec<(usize, Option<i64>)>>,
    ) {
        if run.is_empty() {
            return;
        }
        let plain: Vec<&PlainFence> = run.iter().map(|(_, fence)| fence).collect();
        statements.push(Self::plain_fences(&plain));
        members.push(
            run.drain(..)
                .map(|(i, fence)| (i, Some(fence.id)))
                .collect(),
        );
    }
}

#[async_trait]
impl<D: Driver> OutboxStore for SqlStore<D> {
    async fn expire_overdue(&self) -> StoreResult<Vec<i64>> {
        let updates = EXPIRY_TRANSITIONS
            .iter()
            .map(|(from, to, reason)| LoggedUpdate {
                set: Sql::new(format!(
                    "state = '{to}', reason = ?, updated_at = {}",
                    D::NOW
                ))
                .arg(*reason),
                rows: Sql::new(format!(
                    "state = '{from}' AND expires_at IS NOT NULL AND expires_at < {}",
                    D::NOW
                )),
                skip_locked: true,
                kind: to.to_string(),
                attempt_offset: 0,
                reply: Reply::Kept,
                detail: serde_json::json!({ "reason": reason }),
            })
            .collect();
        let changed = self.driver.update_logged(updates, true).await?;
        Ok(changed.into_iter().flatten().collect())
    }

    async fn claim_due(
        &self,
        instance: &str,
        limit: u32,
        lease: TimeDelta,
    ) -> StoreResult<Vec<ClaimedMessage>> {
        let token = uuid::Uuid::new_v4().to_string();
        // The index hint here, in next_due_in and in due_backlog: without statistics (no
        // ANALYZE) SQLite takes `messages_expiring (state, ...)` for `state IN (...)` and sorts
        // every waiting message on each call, which made sending quadratic and an idle daemon
        // with a million future messages scan them all every few seconds (BENCHMARKS.md).
        let mut sql = Sql::new("UPDATE messages SET state = 'sending', claim_token = ");
        sql.bind(token.as_str())
            .push(", claimed_by = ")
            .bind(instance);
        sql.push(", lease_expires_at = ");
        D::push_later(&mut sql, D::NOW, lease);
        sql.push(format!(
            ", phase = 'claimed', attempts = attempts + 1, updated_at = {now} \
             WHERE id IN (SELECT id FROM messages{hint} WHERE state IN ('scheduled', 'retrying') \
             AND next_attempt_at <= {now} ORDER BY next_attempt_at LIMIT ",
            now = D::NOW,
            hint = D::indexed_by("messages_waiting"),
        ));
        sql.bind(i64::from(limit));
        sql.push(format!(
            "{}) RETURNING {}",
            D::SKIP_LOCKED,
            rows::CLAIM_COLUMNS
        ));
        let rows: Vec<ClaimRow> = self.driver.fetch_all(Via::Writer, sql).await?;
        let mut claims: Vec<_> = rows.into_iter().map(|row| row.into_claim(&token)).collect();
        claims.sort_by_key(|c| (c.due_at, c.id));
        Ok(claims)
    }

    async fn next_due_in(&self) -> StoreResult<Option<TimeDelta>> {
        let sql = Sql::new(format!(
            "SELECT {} FROM messages{} WHERE state IN ('scheduled', 'retrying')",
            D::millis_until("MIN(next_attempt_at)"),
            D::indexed_by("messages_waiting"),
        ));
        let (millis,): (Option<f64>,) = self.driver.fetch_one(Via::Reader, sql).await?;
        Ok(millis.map(|ms| TimeDelta::milliseconds(ms.max(0.0).ceil() as i64)))
    }

    async fn begin_body_with(
        &self,
        id: i64,
        token: &str,
        delivery: &Delivery,
        content: &SentContent,
        margin: TimeDelta,
    ) -> StoreResult<bool> {
        let fence = Self::fence(id, token, delivery, content, margin, None);
        self.grouped_fence(fence).await
    }

    async fn begin_body_limited(
        &self,
        id: i64,
        token: &str,
        delivery: &Delivery,
        content: &SentContent,
        margin: TimeDelta,
        gate: &FrequencyGate,
    ) -> StoreResult<bool> {
        let fence = Self::fence(id, token, delivery, content, margin, Some(gate));
        self.grouped_fence(fence).await
    }

    async fn begin_bodies(&self, starts: &[BodyStart]) -> StoreResult<Vec<bool>> {
        let fences = starts
            .iter()
            .map(|s| {
                let gate = s.gate.as_ref();
                Self::fence(s.id, &s.token, &s.delivery, &s.content, s.margin, gate)
            })
            .collect();
        let affected = self.commit_fences(fences).await?;
        Ok(affected.into_iter().map(|n| n == 1).collect())
    }

    async fn counted_sends(
        &self,
        customer_id: &str,
        since: DateTime<Utc>,
        exempt_rules: &[String],
        except: i64,
    ) -> StoreResult<Vec<DateTime<Utc>>> {
        self.counted(customer_id, since, exempt_rules, except, false)
            .await
    }

    async fn in_flight_sends(
        &self,
        customer_id: &str,
        since: DateTime<Utc>,
        exempt_rules: &[String],
        except: i64,
    ) -> StoreResult<Vec<DateTime<Utc>>> {
        self.counted(customer_id, since, exempt_rules, except, true)
            .await
    }

    async fn waiting_due(
        &self,
        customer_id: &str,
        rules: &[String],
        until: DateTime<Utc>,
        except: i64,
    ) -> StoreResult<Vec<DateTime<Utc>>> {
        if rules.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new("SELECT next_attempt_at FROM messages WHERE customer_id = ");
        sql.bind(customer_id).push(" AND id <> ").bind(except);
        sql.push(
            " AND (state IN ('scheduled', 'retrying') OR (state = 'sending' AND phase = 'claimed')) \
             AND next_attempt_at <= ",
        );
        sql.bind(until).push(" AND rule IN ").list(rules);
        sql.push(" ORDER BY next_attempt_at LIMIT 1000");
        let rows: Vec<(DateTime<Utc>,)> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows.into_iter().map(|(at,)| at).collect())
    }

    async fn send_facts(&self, wanted: &FactsWanted) -> StoreResult<SendFacts> {
        self.read_send_facts(wanted).await
    }

    async fn keep_checks(&self, id: i64, token: &str, checks: &[CheckLine]) -> StoreResult<bool> {
        let checks = serde_json::to_value(checks).unwrap_or_default();
        let mut sql = Sql::new("UPDATE messages SET checks = ");
        sql.bind(Arg::Json(Some(checks)));
        sql.push(format!(", updated_at = {} WHERE id = ", D::NOW));
        sql.bind(id).push(" AND claim_token = ").bind(token);
        Ok(self.driver.execute(Via::Writer, sql).await? == 1)
    }

    async fn finish(&self, id: i64, token: &str, outcome: &Outcome) -> StoreResult<bool> {
        let update = Self::finish_update(id, token, outcome);
        let changed = self.driver.update_logged(vec![update], false).await?;
        Ok(changed.iter().any(|ids| !ids.is_empty()))
    }

    async fn finish_all(&self, outcomes: &[Finishing<'_>]) -> StoreResult<Vec<bool>> {
        let ids: HashSet<i64> = outcomes.iter().map(|o| o.id).collect();
        if ids.len() < outcomes.len() {
            // Two attempts of one message (a stale claim and its successor): row by row, so
            // each is answered for its own token.
            return self.finish_each(outcomes).await;
        }
        let changed: HashSet<i64> = self
            .finish_group(outcomes)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        Ok(outcomes.iter().map(|o| changed.contains(&o.id)).collect())
    }

    async fn reap_expired(&self, resend_unknown: bool) -> StoreResult<Reaped> {
        let transitions = reap_transitions(resend_unknown);
        let updates = transitions
            .iter()
            .map(|(phase, to, reason)| LoggedUpdate {
                set: Sql::new(format!(
                    "state = '{to}', reason = ?, claim_token = NULL, claimed_by = NULL, \
                     lease_expires_at = NULL, phase = NULL, updated_at = {}",
                    D::NOW
                ))
                .arg(*reason),
                rows: Sql::new(format!(
                    "state = 'sending' AND phase = '{phase}' AND lease_expires_at < {}",
                    D::NOW
                )),
                skip_locked: true,
                kind: to.to_string(),
                attempt_offset: 0,
                reply: Reply::Given(None),
                detail: serde_json::json!({ "reason": reason }),
            })
            .collect();
        let changed = self.driver.update_logged(updates, false).await?;
        let mut reaped = Reaped::default();
        for ((phase, _, _), ids) in transitions.iter().zip(changed) {
            let count = ids.len() as u64;
            if *phase == "claimed" {
                reaped.rescheduled += count
            } else {
                reaped.unknown += count
            }
        }
        Ok(reaped)
    }
}

#[async_trait]
impl<D: Driver> ConsentStore for SqlStore<D> {
    async fn is_suppressed(&self, email: &str) -> StoreResult<bool> {
        let sql =
            Sql::new("SELECT 1 FROM suppressions WHERE email = ?").arg(normalize_email(email));
        self.driver.exists(Via::Reader, sql).await
    }

    async fn suppress(&self, email: &str, reason: &str, source: &str) -> StoreResult<bool> {
        let sql = Sql::new(
            "INSERT INTO suppressions (email, reason, source) VALUES (?, ?, ?) ON CONFLICT (email) DO NOTHING",
        )
        .arg(normalize_email(email))
        .arg(reason)
        .arg(source);
        Ok(self.driver.execute(Via::Writer, sql).await? > 0)
    }

    async fn unsuppress(&self, email: &str) -> StoreResult<bool> {
        let email = normalize_email(email);
        let keep = Sql::new(format!(
            "INSERT INTO suppression_periods (email, reason, source, since, until) \
             SELECT email, reason, source, created_at, {} FROM suppressions WHERE email = ?",
            D::NOW
        ))
        .arg(email.as_str());
        let delete = Sql::new("DELETE FROM suppressions WHERE email = ?").arg(email.as_str());
        Ok(self.driver.execute_all(vec![keep, delete]).await? > 0)
    }

    async fn suppressed_at(
        &self,
        email: &str,
        at: Option<DateTime<Utc>>,
    ) -> StoreResult<Option<SuppressionPeriod>> {
        let email = normalize_email(email);
        let mut current = Sql::new(format!(
            "SELECT email, reason, source, created_at AS since, {} AS until \
             FROM suppressions WHERE email = ",
            D::null("timestamptz")
        ));
        current.bind(email.as_str());
        if let Some(at) = at {
            current.push(" AND created_at <= ").bind(at);
        }
        let row: Option<SuppressionPeriodRow> =
            self.driver.fetch_optional(Via::Reader, current).await?;
        let Some(at) = at.filter(|_| row.is_none()) else {
            return Ok(row.map(SuppressionPeriod::from));
        };
        let ended = Sql::new(
            "SELECT email, reason, source, since, until FROM suppression_periods \
             WHERE email = ? AND since <= ? AND until > ? ORDER BY since DESC LIMIT 1",
        )
        .arg(email.as_str())
        .arg(at)
        .arg(at);
        let row: Option<SuppressionPeriodRow> =
            self.driver.fetch_optional(Via::Reader, ended).await?;
        Ok(row.map(SuppressionPeriod::from))
    }

    async fn suppressions(&self) -> StoreResult<Vec<Suppression>> {
        let sql = Sql::new(
            "SELECT email, reason, source, created_at FROM suppressions ORDER BY created_at, email",
        );
        let rows: Vec<SuppressionRow> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows.into_iter().map(Suppression::from).collect())
    }
}

#[async_trait]
impl<D: Driver> TrackingStore for SqlStore<D> {
    async fn message_by_message_id(&self, message_id: &str) -> StoreResult<Option<LogEntry>> {
        let wanted = format!("<{}>", message_id.trim().trim_matches(['<', '>']));
        let sql = Sql::new(format!(
            "SELECT {} {MESSAGE_WITH_CUSTOMER} WHERE m.message_id = ? ORDER BY m.id DESC LIMIT 1",
            rows::LOG_COLUMNS
        ))
        .arg(wanted);
        let row: Option<LogRow> = self.driver.fetch_optional(Via::Reader, sql).await?;
        Ok(row.map(LogEntry::from))
    }

    async fn add_message_event(
        &self,
        message_id: i64,
        kind: &str,
        detail: &serde_json::Value,
    ) -> StoreResult<()> {
        let sql =
            Sql::new("INSERT INTO message_events (message_id, kind, detail) VALUES (?, ?, ?)")
                .arg(message_id)
                .arg(kind)
                .arg(Arg::json(detail));
        self.driver.execute(Via::Writer, sql).await?;
        Ok(())
    }

    async fn record_message_event_once(
        &self,
        message_id: i64,
        kind: &str,
        key: &str,
        detail: &serde_json::Value,
    ) -> StoreResult<bool> {
        let sql = Sql::new(
            "INSERT INTO message_events (message_id, kind, detail, once_key) VALUES (?, ?, ?, ?) \
             ON CONFLICT (message_id, kind, once_key) WHERE once_key IS NOT NULL \
             DO UPDATE SET count = message_events.count + 1 RETURNING count = 1",
        )
        .arg(message_id)
        .arg(kind)
        .arg(Arg::json(detail))
        .arg(key);
        let (first,): (bool,) = self.driver.fetch_one(Via::Writer, sql).await?;
        Ok(first)
    }

    async fn events_for_address(&self, email: &str, kind: &str) -> StoreResult<i64> {
        let sql = Sql::new(
            "SELECT COUNT(DISTINCT e.message_id) FROM message_events e JOIN messages m ON m.id = e.message_id \
             WHERE lower(m.email) = ? AND e.kind = ?",
        )
        .arg(normalize_email(email))
        .arg(kind);
        let (count,): (i64,) = self.driver.fetch_one(Via::Reader, sql).await?;
        Ok(count)
    }
}

impl<D: Driver> SqlStore<D> {
    /// `SELECT {select} FROM messages m ... WHERE` the log's filter over one part of the log,
    /// without order or limit (`log`, `log_count`). `join` follows `messages m` and its index;
    /// `ordered`: the caller reads a page in the log's order (not a count).
    async fn log_query(
        &self,
        filter: &LogFilter,
        part: LogPart,
        (select, join): (&str, &str),
        ordered: bool,
    ) -> StoreResult<Sql> {
        let narrowing = self.driver.log_narrowing(filter, part, ordered).await?;
        let other = |column: &str| {
            if narrowing.unindexed_rule_state {
                D::unindexed(column)
            } else {
                column.to_string()
            }
        };
        let mut sql = Sql::new(format!(
            "SELECT {select} FROM messages m{}{join} WHERE {}",
            narrowing.index,
            part.rows()
        ));
        let date = part.date();
        if let Some(since) = filter.since {
            sql.push(format!(" AND {date} >= ")).bind(since);
        }
        if let Some(rule) = &filter.rule {
            sql.push(format!(" AND {} = ", other("m.rule"))).bind(rule);
        }
        if let Some(state) = filter.state {
            sql.push(format!(" AND {} = ", other("m.state")))
                .bind(state.as_str());
        }
        if let Some(customer) = &filter.customer_id {
            sql.push(" AND m.customer_id = ").bind(customer);
        }
        if let Some(due_before) = filter.due_before {
            sql.push(" AND m.next_attempt_at <= ").bind(due_before);
        }
        if let Some(before) = filter.before {
            sql.push(format!(" AND ({date} < "))
                .bind(before.at)
                .push(format!(" OR ({date} = "))
                .bind(before.at)
                .push(" AND m.id < ")
                .bind(before.id)
                .push("))");
        }
        sql.append(narrowing.conditions);
        Ok(sql)
    }
}

const CUSTOMER_JOIN: &str = " LEFT JOIN customers c ON c.id = m.customer_id";

#[async_trait]
impl<D: Driver> ReportingStore for SqlStore<D> {
    async fn log(&self, filter: &LogFilter) -> StoreResult<Vec<LogEntry>> {
        let limit = |sql: &mut Sql| {
            if let Some(limit) = filter.limit {
                sql.push(" LIMIT ").bind(limit);
            }
        };
        let sql = match LogPart::of(filter) {
            [] => return Ok(Vec::new()),
            [part] => {
                let mut sql = self
                    .log_query(filter, *part, (rows::LOG_COLUMNS, CUSTOMER_JOIN), true)
                    .await?;
                if filter.due_before.is_some() {
                    sql.push(" ORDER BY m.next_attempt_at, m.id");
                } else {
                    sql.push(format!(" ORDER BY {} DESC, m.id DESC", part.date()));
                }
                limit(&mut sql);
                sql
            }
            parts => {
                // Each part newest first, at most `limit` of each, merged by the same order: the
                // first `limit` of the merge are the first `limit` of the whole log.
                let mut sql = Sql::new("SELECT ");
                sql.push(rows::LOG_COLUMNS).push(" FROM (");
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        sql.push(" UNION ALL ");
                    }
                    let date = part.date();
                    sql.push("SELECT * FROM (");
                    sql.append(
                        self.log_query(
                            filter,
                            *part,
                            (&format!("m.id AS id, {date} AS at"), ""),
                            true,
                        )
                        .await?,
                    );
                    sql.push(format!(" ORDER BY {date} DESC, m.id DESC"));
                    limit(&mut sql);
                    sql.push(format!(") AS part{i}"));
                }
                sql.push(format!(
                    ") AS page JOIN messages m ON m.id = page.id{CUSTOMER_JOIN} \
                     ORDER BY page.at DESC, page.id DESC"
                ));
                limit(&mut sql);
                sql
            }
        };
        let rows: Vec<LogRow> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows.into_iter().map(LogEntry::from).collect())
    }

    async fn log_count(&self, filter: &LogFilter) -> StoreResult<i64> {
        let whole = LogFilter {
            before: None,
            limit: None,
            ..filter.clone()
        };
        let parts = match LogPart::of(&whole) {
            [_, _] if whole.since.is_none() && whole.from.is_none() && whole.until.is_none() => {
                &[LogPart::Whole]
            }
            parts => parts,
        };
        let mut sql = Sql::new("SELECT CAST(0 AS BIGINT)");
        for part in parts {
            sql.push(" + (");
            sql.append(
                self.log_query(&whole, *part, ("COUNT(*)", ""), false)
                    .await?,
            );
            sql.push(")");
        }
        let (count,): (i64,) = self.driver.fetch_one(Via::Reader, sql).await?;
        Ok(count)
    }

    async fn message(&self, id: i64) -> StoreResult<Option<LogEntry>> {
        let sql = Sql::new(format!(
            "SELECT {} {MESSAGE_WITH_CUSTOMER} WHERE m.id = ?",
            rows::LOG_COLUMNS
        ))
        .arg(id);
        let row: Option<LogRow> = self.driver.fetch_optional(Via::Reader, sql).await?;
        Ok(row.map(LogEntry::from))
    }

    async fn message_events(&self, message_id: i64) -> StoreResult<Vec<MessageEvent>> {
        let sql = Sql::new(
            "SELECT kind, at, attempt, smtp_reply, detail, count FROM message_events WHERE message_id = ? ORDER BY id",
        )
        .arg(message_id);
        let rows: Vec<MessageEventRow> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows.into_iter().map(MessageEvent::from).collect())
    }

    async fn counts(&self) -> StoreResult<Vec<(String, MessageState, i64)>> {
        let sql = Sql::new(
            "SELECT rule, state, COUNT(*) FROM messages GROUP BY rule, state ORDER BY rule, state",
        );
        let rows: Vec<(String, String, i64)> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(rule, state, n)| {
                MessageState::from_str(&state).ok().map(|s| (rule, s, n))
            })
            .collect())
    }

    async fn due_backlog(&self) -> StoreResult<(i64, Option<f64>)> {
        let sql = Sql::new(format!(
            "SELECT COUNT(*), {} FROM messages{} \
             WHERE state IN ('scheduled', 'retrying') AND next_attempt_at <= {}",
            D::OLDEST_DUE_SECONDS,
            D::indexed_by("messages_waiting"),
            D::NOW
        ));
        self.driver.fetch_one(Via::Reader, sql).await
    }

    async fn sent_content(&self, message_id: i64) -> StoreResult<Option<SentContent>> {
        let sql = Sql::new("SELECT body_text, body_html, checks FROM messages WHERE id = ?")
            .arg(message_id);
        let row: Option<SentContentRow> = self.driver.fetch_optional(Via::Reader, sql).await?;
        Ok(row.and_then(SentContentRow::into_content))
    }

    async fn message_detail(&self, message_id: i64) -> StoreResult<Option<serde_json::Value>> {
        let sql = Sql::new("SELECT detail FROM messages WHERE id = ?").arg(message_id);
        let row: Option<(sqlx::types::Json<serde_json::Value>,)> =
            self.driver.fetch_optional(Via::Reader, sql).await?;
        Ok(row.map(|(detail,)| detail.0))
    }

    async fn activity(&self, since: DateTime<Utc>) -> StoreResult<Vec<ActivityCount>> {
        let part = LogPart::History;
        let sql = Sql::new(format!(
            "SELECT {} AS hour, m.rule, m.state, COUNT(*) FROM messages m \
             WHERE {} AND {} IN ('sent', 'failed', 'skipped', 'unknown') AND {} >= ? \
             GROUP BY hour, m.rule, m.state ORDER BY hour, m.rule, m.state",
            D::hour_of(&part.date()),
            part.rows(),
            D::unindexed("m.state"),
            part.date(),
        ))
        .arg(since);
        let rows: Vec<(DateTime<Utc>, String, String, i64)> =
            self.driver.fetch_all(Via::Reader, sql).await?;
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

    async fn reply_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        let sql = Sql::new(
            "SELECT m.rule, COUNT(*) FROM message_events e JOIN messages m ON m.id = e.message_id \
             WHERE e.kind = 'replied' GROUP BY m.rule ORDER BY m.rule",
        );
        let mut counts: Vec<(String, i64)> = self.driver.fetch_all(Via::Reader, sql).await?;
        let sql = Sql::new("SELECT COUNT(*) FROM events WHERE kind = 'replied'");
        let (all,): (i64,) = self.driver.fetch_one(Via::Reader, sql).await?;
        let without_message = all - counts.iter().map(|(_, n)| n).sum::<i64>();
        if without_message > 0 {
            counts.insert(0, (String::new(), without_message));
        }
        Ok(counts)
    }

    async fn engagement(&self, since: DateTime<Utc>) -> StoreResult<Vec<(String, String, i64)>> {
        let sql = Sql::new(
            "SELECT m.rule, CASE WHEN e.kind = 'soft_bounced' THEN 'bounced' ELSE e.kind END AS what, \
             COUNT(DISTINCT e.message_id) FROM message_events e \
             JOIN messages m ON m.id = e.message_id \
             WHERE e.kind IN ('opened', 'clicked', 'bounced', 'soft_bounced', 'unsubscribed') AND e.at >= ? \
             GROUP BY m.rule, what ORDER BY m.rule, what",
        )
        .arg(since);
        self.driver.fetch_all(Via::Reader, sql).await
    }

    async fn count_state(&self, state: MessageState) -> StoreResult<i64> {
        let sql = Sql::new("SELECT COUNT(*) FROM messages WHERE state = ?").arg(state.as_str());
        let (count,): (i64,) = self.driver.fetch_one(Via::Reader, sql).await?;
        Ok(count)
    }

    async fn customer_message_events(
        &self,
        customer_id: &str,
        limit: i64,
    ) -> StoreResult<Vec<CustomerMessageEvent>> {
        let sql = Sql::new(
            "SELECT e.message_id, m.rule, e.kind, e.at, e.attempt, e.smtp_reply, e.detail, e.count \
             FROM message_events e JOIN messages m ON m.id = e.message_id \
             WHERE m.customer_id = ? ORDER BY e.at DESC, e.id DESC LIMIT ?",
        )
        .arg(customer_id)
        .arg(limit);
        let rows: Vec<CustomerMessageEventRow> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows.into_iter().map(CustomerMessageEvent::from).collect())
    }

    async fn events_of_kind_since(
        &self,
        kind: &str,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<Event>> {
        let sql = Sql::new(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE kind = ? AND occurred_at >= ? \
             ORDER BY occurred_at, seq"
        ))
        .arg(kind)
        .arg(since);
        let rows: Vec<EventRow> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows.into_iter().map(Event::from).collect())
    }

    async fn sent_per_rule(&self, since: DateTime<Utc>) -> StoreResult<Vec<(String, i64)>> {
        let sql = Sql::new(
            "SELECT rule, COUNT(*) FROM messages WHERE state = 'sent' AND sent_at >= ? \
             GROUP BY rule ORDER BY rule",
        )
        .arg(since);
        self.driver.fetch_all(Via::Reader, sql).await
    }

    async fn replies_waiting(&self, since: DateTime<Utc>) -> StoreResult<Vec<Event>> {
        // The customer's address as it is now: a message to an address they no longer have
        // answered nobody.
        let sql = Sql::new(
            "SELECT e.id, e.customer_id, e.kind, e.occurred_at, e.data FROM events e \
             JOIN customers c ON c.id = e.customer_id \
             WHERE e.kind = 'replied' AND e.occurred_at >= ? \
             AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.customer_id = e.customer_id \
             AND m.state = 'sent' AND m.sent_at > e.occurred_at AND LOWER(m.email) = LOWER(c.email)) \
             ORDER BY e.occurred_at, e.seq",
        )
        .arg(since);
        let rows: Vec<EventRow> = self.driver.fetch_all(Via::Reader, sql).await?;
        Ok(rows.into_iter().map(Event::from).collect())
    }

    async fn due_per_rule(&self, until: DateTime<Utc>) -> StoreResult<Vec<(String, i64)>> {
        let sql = Sql::new(
            "SELECT rule, COUNT(*) FROM messages WHERE state IN ('scheduled', 'retrying') \
             AND next_attempt_at < ? GROUP BY rule ORDER BY rule",
        )
        .arg(until);
        self.driver.fetch_all(Via::Reader, sql).await
    }
}

#[async_trait]
impl<D: Driver> SharedStateStore for SqlStore<D> {
    async fn setting_or_insert(&self, key: &str, value: &str) -> StoreResult<String> {
        let insert = Sql::new(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
        )
        .arg(key)
        .arg(value);
        self.driver.execute(Via::Writer, insert).await?;
        let select = Sql::new("SELECT value FROM settings WHERE key = ?").arg(key);
        let (value,): (String,) = self.driver.fetch_one(Via::Writer, select).await?;
        Ok(value)
    }

    async fn revoke_session(&self, nonce_hash: &str, expires_at: i64) -> StoreResult<()> {
        let expired = Sql::new(format!(
            "DELETE FROM web_session_revocations WHERE expires_at < {}",
            D::EPOCH_SECONDS
        ));
        self.driver.execute(Via::Writer, expired).await?;
        let insert = Sql::new(
            "INSERT INTO web_session_revocations (nonce_hash, expires_at) VALUES (?, ?) \
             ON CONFLICT (nonce_hash) DO NOTHING",
        )
        .arg(nonce_hash)
        .arg(expires_at);
        self.driver.execute(Via::Writer, insert).await?;
        Ok(())
    }

    async fn session_revoked(&self, nonce_hash: &str) -> StoreResult<bool> {
        let sql =
            Sql::new("SELECT 1 FROM web_session_revocations WHERE nonce_hash = ?").arg(nonce_hash);
        self.driver.exists(Via::Reader, sql).await
    }
}

#[async_trait]
impl<D: Driver> Store for SqlStore<D> {
    async fn migrate(&self) -> StoreResult<()> {
        self.driver.migrate().await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.driver
            .execute(Via::Reader, Sql::new("SELECT 1"))
            .await?;
        Ok(())
    }
}
