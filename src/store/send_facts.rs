//! What the guard reads just before sending, for a whole batch of claimed messages at once: the
//! customers, the triggering events, the suppressions of the recipients and the latest events
//! that `unless` conditions ask about. Three or four queries per batch instead of four per
//! message; each answer means what the one-message read it replaces means.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::engine::{CUSTOMER_COLUMNS, EVENT_COLUMNS, SqlStore};
use super::rows::{CustomerRow, EventRow};
use super::sql::{Driver, FromSqlRow, Sql, Via};
use super::{Customer, Event, StoreResult, normalize_email};

/// An ended suppression: since, until.
type Period = (DateTime<Utc>, DateTime<Utc>);

/// What to read for a batch.
#[derive(Debug, Clone, Default)]
pub struct FactsWanted {
    pub customer_ids: Vec<String>,
    pub event_ids: Vec<String>,
    /// Recipients other than the customers themselves (the owner, for rules `to = "owner"`).
    pub addresses: Vec<String>,
    /// Event kinds that `unless` conditions name: the latest of each is read per customer.
    pub unless_kinds: Vec<String>,
}

/// What was read. Every answer says `None` for what was not asked for, so a caller can fall
/// back to reading it alone; for what was asked, a missing row is a real "no".
#[derive(Debug, Clone, Default)]
pub struct SendFacts {
    customer_ids: HashSet<String>,
    event_ids: HashSet<String>,
    addresses: HashSet<String>,
    kinds: HashSet<String>,
    customers: HashMap<String, Customer>,
    events: HashMap<String, Event>,
    /// Addresses on the suppression list, with since when.
    suppressed: HashMap<String, DateTime<Utc>>,
    /// Ended suppressions of each address.
    periods: HashMap<String, Vec<Period>>,
    /// The latest event of each (customer, kind) asked about.
    latest: HashMap<(String, String), DateTime<Utc>>,
}

impl SendFacts {
    /// As [`CustomerStore::customer`](super::CustomerStore::customer).
    pub fn customer(&self, id: &str) -> Option<Option<&Customer>> {
        self.customer_ids
            .contains(id)
            .then(|| self.customers.get(id))
    }

    /// As [`CustomerStore::event`](super::CustomerStore::event).
    pub fn event(&self, id: &str) -> Option<Option<&Event>> {
        self.event_ids.contains(id).then(|| self.events.get(id))
    }

    /// As [`ConsentStore::is_suppressed`](super::ConsentStore::is_suppressed).
    pub fn is_suppressed(&self, email: &str) -> Option<bool> {
        let email = normalize_email(email);
        self.addresses
            .contains(&email)
            .then(|| self.suppressed.contains_key(&email))
    }

    /// Whether [`ConsentStore::suppressed_at`](super::ConsentStore::suppressed_at) finds a
    /// suppression in force at `at`: the current one if it began by then, else an ended one
    /// that spanned it.
    pub fn was_suppressed_at(&self, email: &str, at: DateTime<Utc>) -> Option<bool> {
        let email = normalize_email(email);
        if !self.addresses.contains(&email) {
            return None;
        }
        let current = self
            .suppressed
            .get(&email)
            .is_some_and(|&since| since <= at);
        let ended = self.periods.get(&email).is_some_and(|periods| {
            periods
                .iter()
                .any(|&(since, until)| since <= at && until > at)
        });
        Some(current || ended)
    }

    /// As [`CustomerStore::has_event_after`](super::CustomerStore::has_event_after).
    pub fn has_event_after(
        &self,
        customer_id: &str,
        kind: &str,
        after: DateTime<Utc>,
    ) -> Option<bool> {
        if !self.customer_ids.contains(customer_id) || !self.kinds.contains(kind) {
            return None;
        }
        let key = (customer_id.to_string(), kind.to_string());
        Some(self.latest.get(&key).is_some_and(|&latest| latest > after))
    }
}

impl<D: Driver> SqlStore<D> {
    /// The facts for a batch; see [`OutboxStore::send_facts`](super::OutboxStore::send_facts).
    pub(super) async fn read_send_facts(&self, wanted: &FactsWanted) -> StoreResult<SendFacts> {
        let mut facts = SendFacts {
            customer_ids: wanted.customer_ids.iter().cloned().collect(),
            event_ids: wanted.event_ids.iter().cloned().collect(),
            kinds: wanted.unless_kinds.iter().cloned().collect(),
            ..SendFacts::default()
        };
        let customer_ids: Vec<String> = facts.customer_ids.iter().cloned().collect();
        let event_ids: Vec<String> = facts.event_ids.iter().cloned().collect();
        let query = format!("SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id");
        for row in self.rows_in::<CustomerRow>(&query, &customer_ids).await? {
            let customer = Customer::from(row);
            facts.customers.insert(customer.id.clone(), customer);
        }
        let query = format!("SELECT {EVENT_COLUMNS} FROM events WHERE id");
        for row in self.rows_in::<EventRow>(&query, &event_ids).await? {
            let event = Event::from(row);
            facts.events.insert(event.id.clone(), event);
        }
        let recipients = facts.customers.values().map(|c| c.email.as_str());
        let recipients = recipients.chain(wanted.addresses.iter().map(String::as_str));
        facts.addresses = recipients.map(normalize_email).collect();
        self.read_suppressions(&mut facts).await?;
        self.read_latest_events(&mut facts, &customer_ids).await?;
        Ok(facts)
    }

    async fn read_suppressions(&self, facts: &mut SendFacts) -> StoreResult<()> {
        let addresses: Vec<String> = facts.addresses.iter().cloned().collect();
        let current = "SELECT email, created_at FROM suppressions WHERE email";
        for (email, since) in self
            .rows_in::<(String, DateTime<Utc>)>(current, &addresses)
            .await?
        {
            facts.suppressed.insert(email, since);
        }
        let ended = "SELECT email, since, until FROM suppression_periods WHERE email";
        for (email, since, until) in self
            .rows_in::<(String, DateTime<Utc>, DateTime<Utc>)>(ended, &addresses)
            .await?
        {
            facts.periods.entry(email).or_default().push((since, until));
        }
        Ok(())
    }

    async fn read_latest_events(
        &self,
        facts: &mut SendFacts,
        customer_ids: &[String],
    ) -> StoreResult<()> {
        if facts.kinds.is_empty() {
            return Ok(());
        }
        let kinds: Vec<String> = facts.kinds.iter().cloned().collect();
        for chunk in customer_ids.chunks(D::LIST_CHUNK) {
            let mut sql =
                Sql::new("SELECT customer_id, kind, MAX(occurred_at) FROM events WHERE kind");
            D::push_in(&mut sql, &kinds);
            sql.push(" AND customer_id");
            D::push_in(&mut sql, chunk);
            sql.push(" GROUP BY customer_id, kind");
            let rows: Vec<(String, String, Option<DateTime<Utc>>)> =
                self.driver.fetch_all(Via::Reader, sql).await?;
            for (customer_id, kind, latest) in rows {
                if let Some(latest) = latest {
                    facts.latest.insert((customer_id, kind), latest);
                }
            }
        }
        Ok(())
    }

    /// `query` followed by ` IN (...)` of `values`, in chunks the driver takes.
    async fn rows_in<T: FromSqlRow>(&self, query: &str, values: &[String]) -> StoreResult<Vec<T>> {
        let mut rows = Vec::new();
        for chunk in values.chunks(D::LIST_CHUNK) {
            let mut sql = Sql::new(query);
            D::push_in(&mut sql, chunk);
            rows.extend(self.driver.fetch_all::<T>(Via::Reader, sql).await?);
        }
        Ok(rows)
    }
}
