//! Storage: customers, events, the message outbox/log, message events and suppressions.
//!
//! One implementation (`SqlStore`, in `engine.rs`) writes every query once; it is generic over
//! a driver (`sql::Driver`) that supplies the SQL that really differs per database (its
//! dialect: placeholders, time encoding, the claim's lock clause, index hints, ...) and runs
//! the statements: `sqlite.rs` and `postgres.rs`. The callers see role traits (`PlanningStore`,
//! `OutboxStore`, `ConsentStore`, ...), gathered in `Store`. `tests/store_conformance.rs` is
//! what every driver must pass.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A customer as the business keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Customer {
    pub id: String,
    pub email: String,
    pub name: Option<String>,
    /// IANA time zone name; `None` means the configured default.
    pub timezone: Option<String>,
    /// A JSON object of the business's own fields (plan, city, vip...).
    pub attributes: serde_json::Value,
}

/// What a write says about an optional field of a customer that may exist already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Absent: keep what is stored.
    Keep,
    /// `null` or `""`: remove it.
    Clear,
    Set(String),
}

impl Change {
    fn apply(self, stored: Option<String>) -> Option<String> {
        match self {
            Change::Keep => stored,
            Change::Clear => None,
            Change::Set(value) => Some(value),
        }
    }
}

/// A customer as a request (or `touchpoint customer add`) gives it: it updates an existing
/// customer without wiping what it does not name.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerPatch {
    pub id: String,
    pub email: String,
    pub name: Change,
    pub timezone: Change,
    /// Attributes to set; the others are kept, and one set to `null` is removed.
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

impl CustomerPatch {
    /// The customer after this patch: `stored` (if any) with the fields it names changed.
    pub fn apply(self, stored: Option<Customer>) -> Customer {
        let (name, timezone, mut attributes) = match stored {
            Some(c) => (
                c.name,
                c.timezone,
                c.attributes.as_object().cloned().unwrap_or_default(),
            ),
            None => (None, None, serde_json::Map::new()),
        };
        for (key, value) in self.attributes {
            if value.is_null() {
                attributes.remove(&key);
            } else {
                attributes.insert(key, value);
            }
        }
        Customer {
            id: self.id,
            email: self.email,
            name: self.name.apply(name),
            timezone: self.timezone.apply(timezone),
            attributes: serde_json::Value::Object(attributes),
        }
    }
}

/// A lifecycle event: a purchase, a discovery call, a wedding.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub id: String,
    pub customer_id: String,
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    /// A JSON object of the event's own fields (order number, amount...).
    pub data: serde_json::Value,
}

mod engine;
mod group;
mod postgres;
mod ratings;
mod rows;
mod send_facts;
mod settings;
mod sql;
mod sqlite;

pub use engine::SqlStore;
pub use postgres::{PostgresDriver, PostgresStore};
pub use send_facts::{FactsWanted, SendFacts};
pub use settings::{DatabaseConfig, DatabaseUrl};
pub use sql::Dialect;
pub use sqlite::{SqliteDriver, SqliteStore};

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::TimeDelta;

/// Where a message is in its life. `sending` is the only state held under a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageState {
    Scheduled,
    Sending,
    Retrying,
    Sent,
    Failed,
    Skipped,
    /// The body was handed to the SMTP server but the reply was never recorded: it may or may
    /// not have been delivered. Never resent unless the operator asked for that.
    Unknown,
}

impl MessageState {
    pub const ALL: [MessageState; 7] = [
        MessageState::Scheduled,
        MessageState::Sending,
        MessageState::Retrying,
        MessageState::Sent,
        MessageState::Failed,
        MessageState::Skipped,
        MessageState::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Scheduled => "scheduled",
            MessageState::Sending => "sending",
            MessageState::Retrying => "retrying",
            MessageState::Sent => "sent",
            MessageState::Failed => "failed",
            MessageState::Skipped => "skipped",
            MessageState::Unknown => "unknown",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            MessageState::Sent
                | MessageState::Failed
                | MessageState::Skipped
                | MessageState::Unknown
        )
    }
}

impl fmt::Display for MessageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MessageState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MessageState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = MessageState::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown state {s:?}: expected one of {}", names.join(", "))
            })
    }
}

/// A message the planner wants to exist. Inserting it twice is a no-op (unique `dedupe_key`).
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub rule: String,
    pub customer_id: String,
    pub event_id: Option<String>,
    pub dedupe_key: String,
    pub trigger_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Facts the template needs that are fixed at planning (e.g. `{"years": 5}`).
    pub detail: serde_json::Value,
}

/// What a claim gives the dispatcher: the message and the token that fences its writes.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedMessage {
    pub id: i64,
    pub token: String,
    pub rule: String,
    pub customer_id: String,
    pub event_id: Option<String>,
    pub trigger_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Attempts so far, this one included.
    pub attempts: i32,
    pub detail: serde_json::Value,
}

/// The facts of a delivery attempt, written just before the body goes out.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub email: String,
    pub subject: String,
    pub message_id: String,
}

/// A frequency limit as the outbox applies it at the body fence: at most `max` messages that
/// count (see `OutboxStore::counted_sends`) to `customer_id` within `per` before now, by the
/// database's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct FrequencyGate {
    pub customer_id: String,
    pub max: u32,
    pub per: TimeDelta,
    /// Rules whose messages do not count (`ignore_frequency_limit = true`).
    pub exempt_rules: Vec<String>,
}

/// One "the body is about to go out" write, as [`OutboxStore::begin_bodies`] takes it: what
/// [`OutboxStore::begin_body_with`] (no `gate`) or [`OutboxStore::begin_body_limited`] write.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyStart {
    pub id: i64,
    pub token: String,
    pub delivery: Delivery,
    pub content: SentContent,
    pub margin: TimeDelta,
    pub gate: Option<FrequencyGate>,
}

/// One outcome, as [`OutboxStore::finish_all`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct Finishing<'a> {
    pub id: i64,
    pub token: &'a str,
    pub outcome: &'a Outcome,
}

/// What went out, kept with the message for the owner: the rendered bodies exactly as sent and
/// the checks that passed just before sending.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SentContent {
    pub text: String,
    pub html: String,
    /// The dispatcher's checks, in words ("customer is not on the suppression list", ...),
    /// each with what became of it.
    pub checks: Vec<CheckLine>,
}

/// One check the dispatcher ran, in words, and its verdict. Messages kept before verdicts were
/// (plain strings: only sent messages kept checks) read back as passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(from = "StoredCheckLine")]
pub struct CheckLine {
    pub text: String,
    /// `passed`, `failed` or `not_reached`.
    pub verdict: String,
}

impl CheckLine {
    pub fn passed(text: impl Into<String>) -> Self {
        CheckLine {
            text: text.into(),
            verdict: "passed".into(),
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum StoredCheckLine {
    Plain(String),
    Judged { text: String, verdict: String },
}

impl From<StoredCheckLine> for CheckLine {
    fn from(stored: StoredCheckLine) -> Self {
        match stored {
            StoredCheckLine::Plain(text) => CheckLine::passed(text),
            StoredCheckLine::Judged { text, verdict } => CheckLine { text, verdict },
        }
    }
}

/// A time the address was on the suppression list: now (`until` is `None`), or a period that
/// ended when it was allowed again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SuppressionPeriod {
    pub email: String,
    pub reason: String,
    pub source: String,
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
}

/// Messages of one rule that reached a state (or had an open or a click) within one UTC hour.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivityCount {
    /// The start of the hour.
    pub hour: DateTime<Utc>,
    pub rule: String,
    /// A final state (`sent`, `failed`, `skipped`, `unknown`).
    pub state: MessageState,
    pub count: i64,
}

/// One line of a customer's history that belongs to one of their messages.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CustomerMessageEvent {
    pub message: i64,
    pub rule: String,
    pub event: MessageEvent,
}

/// How an attempt ended; every variant is written only while the claim is still ours.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sent {
        reply: String,
    },
    /// A transient fault: try again at `at` (state `retrying`).
    Retry {
        at: DateTime<Utc>,
        reply: String,
    },
    Failed {
        reply: Option<String>,
        reason: String,
    },
    Skipped {
        reason: String,
    },
    Unknown {
        reason: String,
    },
    /// Not attempted after all (send window closed, relay down): back to `scheduled` at `at`,
    /// and the attempt is not counted.
    Released {
        at: DateTime<Utc>,
        reason: String,
    },
}

impl Outcome {
    pub fn state(&self) -> MessageState {
        match self {
            Outcome::Sent { .. } => MessageState::Sent,
            Outcome::Retry { .. } => MessageState::Retrying,
            Outcome::Failed { .. } => MessageState::Failed,
            Outcome::Skipped { .. } => MessageState::Skipped,
            Outcome::Unknown { .. } => MessageState::Unknown,
            Outcome::Released { .. } => MessageState::Scheduled,
        }
    }
}

/// What the reaper did with claims whose lease ran out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reaped {
    /// The body had not gone out: back to `scheduled`.
    pub rescheduled: u64,
    /// The body may have gone out: `unknown` (or `retrying` when resending is configured).
    pub unknown: u64,
}

/// Which rows a planning query looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum CandidateSource {
    /// Events of a kind with no message of this rule yet, occurred at or after `occurred_from`;
    /// `unless_since` lists kinds of which no later event of the customer may exist.
    NewEvents {
        kind: String,
        occurred_from: DateTime<Utc>,
        unless_since: Vec<String>,
    },
    /// Events of a kind (anniversaries) with no occurrence of this rule still to come; with
    /// `month_days`, only those that occurred (UTC) on one of these days of the year.
    RecurringEvents {
        kind: String,
        month_days: Option<MonthDays>,
    },
    /// Customers with no occurrence of this (scheduled) rule still to come.
    RecurringCustomers,
}

/// Days of the year as `MM-DD`, from `from` to `to` inclusive, past the year's end when `to`
/// comes before `from`.
#[derive(Debug, Clone, PartialEq)]
pub struct MonthDays {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CandidateQuery {
    pub rule: String,
    pub source: CandidateSource,
    /// Only rows with `after_seq < seq <= up_to_seq`: every rule of a pass sees the same rows.
    pub after_seq: i64,
    pub up_to_seq: i64,
    pub now: DateTime<Utc>,
    pub limit: i64,
    /// Customers on the suppression list too (rules written `to = "owner"`: the owner hears
    /// about every customer).
    pub include_suppressed: bool,
}

/// One row a rule might apply to, with what the planner needs to compute its time.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub seq: i64,
    pub customer: Customer,
    pub event: Option<Event>,
    /// The latest occurrence of this rule already planned for this event or customer.
    pub last_trigger: Option<DateTime<Utc>>,
}

/// The message log as the owner sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEntry {
    pub id: i64,
    pub rule: String,
    pub customer_id: String,
    pub email: Option<String>,
    pub subject: Option<String>,
    pub state: MessageState,
    pub event_id: Option<String>,
    pub trigger_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    pub smtp_reply: Option<String>,
    pub message_id: Option<String>,
    pub reason: Option<String>,
    pub updated_at: DateTime<Utc>,
    /// What the recipient did, from `message_events` (first time and count).
    pub opened_at: Option<DateTime<Utc>>,
    pub opens: i64,
    pub clicked_at: Option<DateTime<Utc>>,
    pub clicks: i64,
    pub bounced_at: Option<DateTime<Utc>>,
    pub complained_at: Option<DateTime<Utc>>,
    pub unsubscribed_at: Option<DateTime<Utc>>,
}

impl LogEntry {
    /// The one time the log, its filters, the overview and the exports date a message by:
    /// history by what happened when (sent at; failed, skipped or unknown at), the plan by
    /// when it is due. The store's `DATED` expression is the same rule in SQL.
    pub fn dated_at(&self) -> DateTime<Utc> {
        match self.sent_at {
            Some(sent) => sent,
            None if self.state.is_final() => self.updated_at,
            None => self.next_attempt_at,
        }
    }
}

/// Where a page of the log ends: the next page holds the messages dated before `at`, or at
/// `at` with an id below `id` (the log is ordered by [`LogEntry::dated_at`], newest first).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogCursor {
    pub at: DateTime<Utc>,
    pub id: i64,
}

impl LogCursor {
    pub fn after(entry: &LogEntry) -> LogCursor {
        LogCursor {
            at: entry.dated_at(),
            id: entry.id,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogFilter {
    /// Messages dated ([`LogEntry::dated_at`]) at or after this.
    pub since: Option<DateTime<Utc>>,
    pub rule: Option<String>,
    pub state: Option<MessageState>,
    pub customer_id: Option<String>,
    /// Only waiting messages (scheduled or retrying) due no later than this, soonest first
    /// (the upcoming plan).
    pub due_before: Option<DateTime<Utc>>,
    /// Only messages after this one in the log's order (keyset pagination, newest first).
    pub before: Option<LogCursor>,
    /// Only history: leaves out the messages that wait (scheduled, retrying), which belong to
    /// the plan.
    pub history: bool,
    /// Only messages to customers whose id is this, or whose name or email contains it
    /// (case-insensitive).
    pub customer_search: Option<String>,
    /// Only messages dated ([`LogEntry::dated_at`]) at or after this...
    pub from: Option<DateTime<Utc>>,
    /// ...and before this.
    pub until: Option<DateTime<Utc>>,
    pub limit: Option<i64>,
}

/// One line of a message's history: a state change or a tracking event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageEvent {
    pub kind: String,
    /// When it first happened.
    pub at: DateTime<Utc>,
    pub attempt: Option<i32>,
    pub smtp_reply: Option<String>,
    pub detail: serde_json::Value,
    /// How many times it happened: opens, clicks and reports recorded once per message (and
    /// link) count their repeats here.
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suppression {
    pub email: String,
    pub reason: String,
    pub source: String,
    pub created_at: DateTime<Utc>,
}

/// A failed database operation. `Unavailable` and `Conflict` are worth retrying; the rest
/// needs a person.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// PostgreSQL aborted the transaction over a conflict with another one running at the same
    /// time (a deadlock, 40P01, or a serialization failure, 40001); run again, it succeeds.
    #[error("the database aborted the transaction over a conflict with another: {0}")]
    Conflict(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Query(#[source] sqlx::Error),
    #[error("cannot apply the database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// Whether trying again later can succeed: the database is away, or it aborted the
    /// transaction over a conflict with another.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Conflict(_))
    }

    /// Whether the transaction lost a conflict with another (deadlock, serialization failure):
    /// running it again at once is the cure.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }
}

impl StoreError {
    /// Whether a database error is a connection or resource fault or a lost conflict, worth
    /// retrying, rather than a mistake in a query or in the data.
    pub fn is_transient(error: &sqlx::Error) -> bool {
        matches!(
            StoreError::from_kind(error),
            Kind::Unavailable | Kind::Conflict
        )
    }

    fn from_kind(error: &sqlx::Error) -> Kind {
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => Kind::Unavailable,
            sqlx::Error::Database(db) => {
                // PostgreSQL: 57P01 admin shutdown / terminated connection, 08xxx connection
                // faults, 53xxx out of resources. SQLite: 5 busy, 6 locked, also as extended
                // codes (517 BUSY_SNAPSHOT, 261 BUSY_RECOVERY...) whose low byte is the primary.
                let code = db.code().unwrap_or_default();
                if matches!(code.as_ref(), "40001" | "40P01") {
                    return Kind::Conflict;
                }
                let sqlite_primary = code.parse::<i32>().ok().map(|c| c & 0xff);
                // 3D000: the database does not exist (dropped, or not created yet): an outage
                // for the operator to mend, not a mistake in what was written.
                if code.starts_with("08")
                    || code.starts_with("3D")
                    || code.starts_with("57P")
                    || code.starts_with("53")
                    || matches!(sqlite_primary, Some(5 | 6))
                {
                    Kind::Unavailable
                } else {
                    Kind::Query
                }
            }
            _ => Kind::Query,
        }
    }
}

enum Kind {
    Unavailable,
    Conflict,
    Query,
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match StoreError::from_kind(&error) {
            Kind::Unavailable => StoreError::Unavailable(error),
            Kind::Conflict => StoreError::Conflict(error),
            Kind::Query => StoreError::Query(error),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The rows in the order of their ids (bytewise): batches that overlap take the locks of
/// their common rows in the same order, so two of them wait for each other instead of
/// deadlocking.
fn by_id<T>(rows: &[T], id: impl Fn(&T) -> &str) -> Vec<&T> {
    let mut sorted: Vec<&T> = rows.iter().collect();
    sorted.sort_by(|a, b| id(a).cmp(id(b)));
    sorted
}

/// Customers and their events: written by ingest, the importer and the CLI; read by every
/// part that renders or checks a message.
#[async_trait]
pub trait CustomerStore: Send + Sync {
    /// Inserts or replaces customers, all in one transaction. Every write of several rows
    /// goes in the order of their ids, so that writers of overlapping batches take the rows'
    /// locks in one order and cannot deadlock.
    async fn upsert_customers(&self, customers: &[Customer]) -> StoreResult<()>;
    /// Inserts customers or changes the fields each patch names, all in one transaction, each
    /// merged with the row as it is when written (under its lock), so that two writers changing
    /// one customer at the same moment both keep their changes. Returns how many were new.
    async fn merge_customers(&self, patches: &[CustomerPatch]) -> StoreResult<u64>;
    /// Inserts events in one transaction; an event whose id exists already is left as it is.
    /// Returns how many were new.
    async fn insert_events(&self, events: &[Event]) -> StoreResult<u64>;
    async fn customer(&self, id: &str) -> StoreResult<Option<Customer>>;
    /// The customers whose address is `email`, compared without case (at most `limit`, in
    /// the order of their ids): who sent an inbound mail, when nothing else says.
    async fn customers_by_email(&self, email: &str, limit: i64) -> StoreResult<Vec<Customer>>;
    async fn event(&self, id: &str) -> StoreResult<Option<Event>>;
    /// The customer's most recent event of `kind`.
    async fn latest_event(&self, customer_id: &str, kind: &str) -> StoreResult<Option<Event>>;
    /// Whether the customer has an event of `kind` that occurred strictly after `after`.
    async fn has_event_after(
        &self,
        customer_id: &str,
        kind: &str,
        after: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// A customer's latest events, newest first.
    async fn customer_events(&self, customer_id: &str, limit: i64) -> StoreResult<Vec<Event>>;
    /// The customer's first event of `kind` that occurred strictly after `after`.
    async fn first_event_after(
        &self,
        customer_id: &str,
        kind: &str,
        after: DateTime<Utc>,
    ) -> StoreResult<Option<Event>>;
}

/// What the planner reads and writes.
#[async_trait]
pub trait PlanningStore: Send + Sync {
    /// The highest `seq` of customers and of events, for the planner's cursors.
    async fn max_seqs(&self) -> StoreResult<(i64, i64)>;
    async fn candidates(&self, query: &CandidateQuery) -> StoreResult<Vec<Candidate>>;
    /// Inserts the messages that do not exist yet (a `dedupe_key` is unique); returns how many
    /// were new.
    async fn insert_messages(&self, messages: &[NewMessage]) -> StoreResult<u64>;
    /// Which of these dedupe keys have a message already.
    async fn existing_dedupe_keys(
        &self,
        keys: &[String],
    ) -> StoreResult<std::collections::HashSet<String>>;
}

/// The outbox as the dispatcher works it: claims, the body fence, outcomes and the reaper.
/// Every write that concerns a claimed message takes its token and changes nothing when the
/// claim is no longer held (returns `false`).
#[async_trait]
pub trait OutboxStore: Send + Sync {
    /// Skips waiting messages whose `expires_at` has passed; returns their ids.
    async fn expire_overdue(&self) -> StoreResult<Vec<i64>>;
    /// Claims up to `limit` due messages for `lease`, moving them to `sending`.
    async fn claim_due(
        &self,
        instance: &str,
        limit: u32,
        lease: TimeDelta,
    ) -> StoreResult<Vec<ClaimedMessage>>;
    /// How long until the earliest waiting message is due, by the database's clock; zero if
    /// one is due now, `None` if nothing waits.
    async fn next_due_in(&self) -> StoreResult<Option<TimeDelta>>;
    /// Records that the body is about to go out, and keeps what goes out (bodies and checks),
    /// in one write. `false` if the claim was lost, has less than `margin` of its lease left,
    /// the message has expired, or the address has been suppressed meanwhile (all judged in
    /// this one statement, by the database): then the body must not be sent.
    async fn begin_body_with(
        &self,
        id: i64,
        token: &str,
        delivery: &Delivery,
        content: &SentContent,
        margin: TimeDelta,
    ) -> StoreResult<bool>;
    /// [`begin_body_with`](Self::begin_body_with), and only while the customer is under the
    /// `gate`'s frequency limit, judged in the same write: at most one write per customer runs
    /// at a time (see `Driver::execute_group`), so two processes can never both pass.
    /// `false` also when the limit is reached: then the body must not be sent.
    async fn begin_body_limited(
        &self,
        id: i64,
        token: &str,
        delivery: &Delivery,
        content: &SentContent,
        margin: TimeDelta,
        gate: &FrequencyGate,
    ) -> StoreResult<bool>;
    /// Several body fences in one durable transaction, in the order given: each is judged as
    /// its own `begin_body_with` / `begin_body_limited` would be, and sees what the ones before
    /// it in the group wrote (two messages of one customer: the second counts the first).
    /// `begin_body_with` and `begin_body_limited` themselves are grouped with whatever other
    /// fences are waiting at the same time (one commit, one fsync, for all of them).
    async fn begin_bodies(&self, starts: &[BodyStart]) -> StoreResult<Vec<bool>>;
    /// When the customer's messages that count toward a frequency limit went out after
    /// `since`, oldest first: `sent`, `unknown`, or with the body going out now, of rules not
    /// in `exempt_rules`, other than message `except`.
    async fn counted_sends(
        &self,
        customer_id: &str,
        since: DateTime<Utc>,
        exempt_rules: &[String],
        except: i64,
    ) -> StoreResult<Vec<DateTime<Utc>>>;
    /// Those of [`counted_sends`](Self::counted_sends) whose body is going out right now
    /// (`sending`): they count, but may yet fail.
    async fn in_flight_sends(
        &self,
        customer_id: &str,
        since: DateTime<Utc>,
        exempt_rules: &[String],
        except: i64,
    ) -> StoreResult<Vec<DateTime<Utc>>>;
    /// When the customer's waiting messages of `rules` (scheduled, retrying, or claimed but not
    /// yet sending their body) are due, those due by `until`, earliest first, other than
    /// message `except`.
    async fn waiting_due(
        &self,
        customer_id: &str,
        rules: &[String],
        until: DateTime<Utc>,
        except: i64,
    ) -> StoreResult<Vec<DateTime<Utc>>>;
    /// What the send-time checks read, for a batch of claimed messages in a few queries: the
    /// customers, events, the recipients' suppressions and the latest events of `unless` kinds.
    async fn send_facts(&self, wanted: &FactsWanted) -> StoreResult<SendFacts>;
    /// Records how the attempt ended. `false` if the claim was lost (nothing written).
    async fn finish(&self, id: i64, token: &str, outcome: &Outcome) -> StoreResult<bool>;
    /// Records several outcomes in one transaction whose commit need not wait for the disk;
    /// each row checks its own token, `false` for those whose claim was lost (only those).
    async fn finish_all(&self, outcomes: &[Finishing<'_>]) -> StoreResult<Vec<bool>>;
    /// Keeps the checks of a claimed message that was stopped (skipped or failed by its
    /// checks), for the message page; `false` if the claim was lost.
    async fn keep_checks(&self, id: i64, token: &str, checks: &[CheckLine]) -> StoreResult<bool>;
    /// Returns expired claims: before the body to `scheduled`, after it to `unknown` (or to
    /// `retrying` with `resend_unknown`).
    async fn reap_expired(&self, resend_unknown: bool) -> StoreResult<Reaped>;
}

/// The suppression list: addresses that must get nothing more. Addresses are kept normalised
/// (`normalize_email`), whatever form they are given in.
#[async_trait]
pub trait ConsentStore: Send + Sync {
    async fn is_suppressed(&self, email: &str) -> StoreResult<bool>;
    /// Adds the address; `false` if it was suppressed already (the first reason is kept).
    async fn suppress(&self, email: &str, reason: &str, source: &str) -> StoreResult<bool>;
    /// Allows the address again; the time it was suppressed is kept as a period (see
    /// [`ConsentStore::suppressed_at`]).
    async fn unsuppress(&self, email: &str) -> StoreResult<bool>;
    async fn suppressions(&self) -> StoreResult<Vec<Suppression>>;
    /// The suppression covering the address at `at` (`None`: now): the current entry if it
    /// began by then, else an ended period that held it.
    async fn suppressed_at(
        &self,
        email: &str,
        at: Option<DateTime<Utc>>,
    ) -> StoreResult<Option<SuppressionPeriod>>;
}

/// What recipients did: opens, clicks, bounces, complaints, unsubscribes.
#[async_trait]
pub trait TrackingStore: Send + Sync {
    /// The message that went out with this Message-ID (with or without angle brackets).
    async fn message_by_message_id(&self, message_id: &str) -> StoreResult<Option<LogEntry>>;
    /// Adds a line to a message's history (opened, clicked, bounced, unsubscribed...).
    async fn add_message_event(
        &self,
        message_id: i64,
        kind: &str,
        detail: &serde_json::Value,
    ) -> StoreResult<()>;
    /// Adds a line to a message's history once per (`kind`, `key`) (a unique key decides): a
    /// repeat only adds one to the line's count, so a flood of opens, clicks or reports cannot
    /// grow the table. `true` when this was the first.
    async fn record_message_event_once(
        &self,
        message_id: i64,
        kind: &str,
        key: &str,
        detail: &serde_json::Value,
    ) -> StoreResult<bool>;
    /// How many of the messages sent to `email` have had an event of `kind` (a message counts
    /// once, however often it had one).
    async fn events_for_address(&self, email: &str, kind: &str) -> StoreResult<i64>;
}

/// The log as the owner's web page, the CLI and the metrics read it.
#[async_trait]
pub trait ReportingStore: Send + Sync {
    /// The messages that match, newest first by [`LogEntry::dated_at`] (soonest first with
    /// `due_before`), at most `limit`.
    async fn log(&self, filter: &LogFilter) -> StoreResult<Vec<LogEntry>>;
    /// How many messages match the filter, whatever its `limit` and `before`.
    async fn log_count(&self, filter: &LogFilter) -> StoreResult<i64>;
    /// One message of the log.
    async fn message(&self, id: i64) -> StoreResult<Option<LogEntry>>;
    async fn message_events(&self, message_id: i64) -> StoreResult<Vec<MessageEvent>>;
    /// Messages per (rule, state).
    async fn counts(&self) -> StoreResult<Vec<(String, MessageState, i64)>>;
    /// Waiting messages already due (by the database's clock), and how late the oldest is.
    async fn due_backlog(&self) -> StoreResult<(i64, Option<f64>)>;
    /// What a message looked like when it went out; `None` if nothing was kept (not sent yet,
    /// or sent before the bodies were kept).
    async fn sent_content(&self, message_id: i64) -> StoreResult<Option<SentContent>>;
    /// What planning fixed about the message (`messages.detail`, read as `rules::MessageDetail`).
    async fn message_detail(&self, message_id: i64) -> StoreResult<Option<serde_json::Value>>;
    /// Messages that reached a final state at or after `since` (dated as the log dates them), per
    /// hour, rule and state.
    async fn activity(&self, since: DateTime<Utc>) -> StoreResult<Vec<ActivityCount>>;
    /// Customers' replies (`replied` events) by the rule of the message they answered; those
    /// tied to no message (known by the sender's address alone) under the rule `""`.
    async fn reply_counts(&self) -> StoreResult<Vec<(String, i64)>>;
    /// How many messages of each rule were opened, clicked, bounced (hard or soft) or led to an
    /// unsubscribe at or after `since`: (rule, `opened` | `clicked` | `bounced` |
    /// `unsubscribed`, distinct messages).
    async fn engagement(&self, since: DateTime<Utc>) -> StoreResult<Vec<(String, String, i64)>>;
    /// How many messages are in this state (by the state index; cheap for rare states).
    async fn count_state(&self, state: MessageState) -> StoreResult<i64>;
    /// The latest history lines of a customer's messages, newest first.
    async fn customer_message_events(
        &self,
        customer_id: &str,
        limit: i64,
    ) -> StoreResult<Vec<CustomerMessageEvent>>;
    /// Events of one kind that occurred at or after `since`, oldest first (the experience
    /// report reads `rated` and `replied` events with this).
    async fn events_of_kind_since(
        &self,
        kind: &str,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<Event>>;
    /// Messages sent at or after `since`, per rule.
    async fn sent_per_rule(&self, since: DateTime<Utc>) -> StoreResult<Vec<(String, i64)>>;
    /// `replied` events at or after `since` still waiting for an answer: no message was sent to
    /// the customer's address after the reply arrived (messages to the owner about the customer
    /// do not count). Oldest first.
    async fn replies_waiting(&self, since: DateTime<Utc>) -> StoreResult<Vec<Event>>;
    /// Waiting messages (scheduled or retrying) next due before `until`, per rule.
    async fn due_per_rule(&self, until: DateTime<Utc>) -> StoreResult<Vec<(String, i64)>>;
}

/// State every process shares: settings (the link-signing key) and the web page's logged-out
/// sessions.
#[async_trait]
pub trait SharedStateStore: Send + Sync {
    /// The stored value of a setting, creating it with `value` if it has none yet. Every
    /// process gets the same value.
    async fn setting_or_insert(&self, key: &str, value: &str) -> StoreResult<String>;
    /// Records a logged-out session (by a hash of its nonce) until `expires_at` (unix seconds),
    /// when its cookie would have expired anyway; deletes records that have expired.
    async fn revoke_session(&self, nonce_hash: &str, expires_at: i64) -> StoreResult<()>;
    /// Whether the session was logged out (by any process using this database).
    async fn session_revoked(&self, nonce_hash: &str) -> StoreResult<bool>;
}

/// All the daemon and the CLI need from a database: every role, and the schema. Callers that
/// hold a `SharedStore` call any role's methods; code that needs one role can take just it.
#[async_trait]
pub trait Store:
    CustomerStore
    + PlanningStore
    + OutboxStore
    + ConsentStore
    + TrackingStore
    + ReportingStore
    + SharedStateStore
    + RatingStore
    + fmt::Debug
{
    async fn migrate(&self) -> StoreResult<()>;
    async fn ping(&self) -> StoreResult<()>;
}

pub type SharedStore = Arc<dyn Store>;

pub use ratings::{Rating, RatingStore};

/// Opens the database named by the URL (creating a SQLite file and its directory if missing).
pub async fn open(url: &DatabaseUrl, max_connections: u32) -> StoreResult<SharedStore> {
    Ok(match url {
        DatabaseUrl::Sqlite(path) => Arc::new(SqliteStore::open(path, max_connections).await?),
        DatabaseUrl::Postgres(url) => Arc::new(PostgresStore::open(url, max_connections).await?),
    })
}

/// Lower-cased address, the form suppressions are kept in.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}
